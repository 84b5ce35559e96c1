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
struct vhub_cred;

/* Watch the directory of socket_path, looked up with cred's rights (the
 * VM's, as every other operation on its back-end paths): a directory that
 * identity could not watch itself is not watched (-EACCES) and the device
 * waits for its timed retries.  Returns the watch descriptor. */
int vhub_socket_watch_add(struct vhub_context *ctx, const char *socket_path, const struct vhub_cred *cred);
/* Drop one reference to wd (from vhub_socket_watch_add). */
void vhub_socket_watch_remove(struct vhub_context *ctx, int wd);
/* Close the instance (context teardown). */
void vhub_socket_watch_done(struct vhub_context *ctx);
