/* SPDX-License-Identifier: MIT */
/*
 * The model commits its state into the restart snapshots (docs/restart.md,
 * "Snapshot files"): one snapshot memfd per VM ("s<id>" in the fd store),
 * rewritten when that VM changes, and the daemon's own ("S", written by the
 * composition root through ctx->commit_daemon, since it holds the faces).
 *
 * A change marks its VM (or the daemon) dirty; what is dirty is written
 * once, after the loop's current callback (the turn's commit, below), and
 * at once when an op sends its first request to a device's back-end (so
 * that a snapshot never calls a device idle while one of its requests is
 * on the wire) -- but for a front-door VMM's request, which waits for the
 * turn's commit instead.  Every write first brings the fd store's
 * groups up to date: an fd is in the store before a snapshot names it.
 * Nothing happens without an fd store (--no-fd-store, no $NOTIFY_SOCKET).
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

struct vhub_context;
struct vhub_vm;

/* The kind letter of a VM's snapshot in the fd store, and the daemon's name. */
#define VHUB_SNAP_GROUP_VM      's'
#define VHUB_SNAP_GROUP_CONN    'k'     /* a control connection's record (format 2) */
#define VHUB_SNAP_NAME_DAEMON   "S"

/* Snapshots are kept (the fd store is enabled).  Sets up the deferred write. */
int vhub_commit_setup(struct vhub_context *ctx);
void vhub_commit_done(struct vhub_context *ctx);
bool vhub_commit_enabled(const struct vhub_context *ctx);
/* vm changed (NULL: the daemon's own state). */
void vhub_changed(struct vhub_context *ctx, struct vhub_vm *vm);
/* A face's own snapshot file is out of date (a control connection's record,
 * kept apart so that a call on one connection rewrites that connection's
 * record only): the face keeps track of which, and writes them through
 * ctx->commit_faces at the next commit. */
void vhub_changed_face(struct vhub_context *ctx);

struct vhub_snap_file;
struct vhub_snap_writer;
/* The writer every snapshot is serialized with, reset for a new document. */
struct vhub_snap_writer *vhub_commit_writer(struct vhub_context *ctx);
/* Commit what was serialized into vhub_commit_writer() to f, which is made
 * and stored under name the first time (in the store before anything is
 * written into it); with skip_empty an empty document makes no file (there
 * is nothing for a restart to carry).  0 or -errno (logged by the caller);
 * at --log-level debug each write is logged with its size. */
int vhub_commit_file(struct vhub_context *ctx, struct vhub_snap_file *f, const char *name, bool skip_empty);
/* f's owner goes: its name out of the store and the file closed. */
void vhub_commit_file_gone(struct vhub_context *ctx, struct vhub_snap_file *f, const char *name);
/* Write every dirty snapshot now. */
void vhub_commit_now(struct vhub_context *ctx);
/* Mark everything dirty: written after the loop's current callback. */
void vhub_commit_all_later(struct vhub_context *ctx);
/* Mark everything dirty and write it (the planned restart's last step). */
void vhub_commit_all(struct vhub_context *ctx);
/* vm goes: off the dirty list, its snapshot out of the store and closed. */
void vhub_commit_vm_gone(struct vhub_vm *vm);

/*
 * The turn's commit: what is dirty is written once after the loop's current
 * callbacks (every message read and reply taken in this wake-up), and what
 * waits for it runs then, in the order it was queued -- a VMM's request
 * that goes to the back-end once a snapshot says its device is busy, an
 * answer that goes out once a snapshot no longer carries its request.  A
 * flood of VMM requests then costs one write per turn and VM, not several
 * per request (docs/restart.md, "A VMM's flood of tiny requests").  A
 * commit made at once (vhub_commit_now()) counts for the snapshots but runs
 * none of them: they run from the loop, never inside the caller's stack.
 * The owner checks, when run, whether the write it waited for was stored
 * (vm->snap_stored); it cancels the wait before it goes.
 */
struct vhub_commit_wait {
        TAILQ_ENTRY(vhub_commit_wait) link;
        struct vhub_context *ctx;               /* non-NULL: queued */
        uint64_t turn;
        void (*run)(struct vhub_commit_wait *w);
};
/* Queue w (not queued yet) for the turn's commit; only with commits enabled. */
void vhub_commit_after(struct vhub_context *ctx, struct vhub_commit_wait *w);
/* w will not run (NULL or not queued: nothing). */
void vhub_commit_wait_cancel(struct vhub_commit_wait *w);
static inline bool vhub_commit_waiting(const struct vhub_commit_wait *w) {
        return w && w->ctx;
}
