/* SPDX-License-Identifier: MIT */
/*
 * One inotify instance for the whole daemon, one watch per directory that
 * holds the socket of a disconnected client-mode device: when a back-end
 * re-creates its socket, its device reconnects at once instead of waiting
 * for the next timed attempt.  (An instance per device would run into the
 * per-uid limit of inotify instances with many devices down at once.)
 */
#pragma once

struct vhub_context;

/* Watch the directory of socket_path; returns the watch descriptor. */
int vhub_socket_watch_add(struct vhub_context *ctx, const char *socket_path);
/* Drop one reference to wd (from vhub_socket_watch_add). */
void vhub_socket_watch_remove(struct vhub_context *ctx, int wd);
/* Close the instance (context teardown). */
void vhub_socket_watch_done(struct vhub_context *ctx);
