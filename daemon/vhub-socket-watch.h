/* SPDX-License-Identifier: MIT */
/*
 * Watching for back-end sockets to be (re)created: one inotify instance for
 * the whole daemon (an instance per device would run into the per-uid limit
 * of inotify instances with many devices down at once), one watch per
 * socket, each with its own callback.  A disconnected client-mode device
 * watches its socket, so that when its back-end creates the socket again
 * the device reconnects at once instead of waiting for its next timed
 * attempt.
 *
 * A leaf: it knows paths and callbacks, nothing of devices.  The instance
 * holds an fd only while something is watched.
 */
#pragma once

struct event_base;
struct vhub_socket_watcher;
struct vhub_socket_watch;

typedef void (*vhub_socket_appeared_fn)(void *userdata);

/* No fd yet: the first watch opens the inotify instance. */
struct vhub_socket_watcher *vhub_socket_watcher_new(struct event_base *base);
/* Frees the watches left too; NULL-safe.  Not from inside a callback. */
struct vhub_socket_watcher *vhub_socket_watcher_free(struct vhub_socket_watcher *w);

/* Call fn(userdata) whenever a file named like socket_path's last part is
 * created in (or moved into, or changes attributes in) its directory.
 * The directory is looked up with the caller's file-system identity (the
 * caller enters the device's credentials: -EACCES for a directory that uid
 * could not watch itself).
 * 0, or -errno (the directory cannot be watched: timed retries only). */
int vhub_socket_watch_add(struct vhub_socket_watcher *w, const char *socket_path,
                          vhub_socket_appeared_fn fn, void *userdata, struct vhub_socket_watch **ret);
/* The inotify fd (-1 while nothing is watched): made again when needed, so
 * not stored. */
int vhub_socket_watcher_fd(const struct vhub_socket_watcher *w);
/* Stop watching; NULL-safe, allowed inside any watch's callback.  Returns NULL. */
struct vhub_socket_watch *vhub_socket_watch_remove(struct vhub_socket_watch *watch);
