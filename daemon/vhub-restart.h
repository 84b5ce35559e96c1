/* SPDX-License-Identifier: MIT */
/*
 * Restart with guests running (docs/restart.md): the composition root's
 * part -- the daemon's own snapshot ("S": its counters and the faces'
 * state), taking a stored state back at start, and the planned restart's
 * sequence.  The model writes and reads its VMs' snapshots itself
 * (vhub-commit.h, vhub-model-snapshot.h).
 */
#pragma once

#include <stdbool.h>

struct vhubd;
struct vhub_fdstore_restore;

/* ctx->commit_daemon: write the daemon's snapshot (v is the userdata). */
void vhub_restart_commit_daemon(void *userdata);
/* ctx->commit_faces: have the faces write their own (the control
 * connections' records; all: every one). */
void vhub_restart_commit_faces(void *userdata, bool all);

/* The snapshots a start was passed, read and checked before anything is
 * taken: 1 (there is a state to restore), 0 (none: a first start), or
 * -errno after a log line saying why (the caller aborts the restore map:
 * the stored fds stay for a daemon that can read them). */
int vhub_restart_load(struct vhubd *v, struct vhub_fdstore_restore *r);
/* Rebuild the model from what vhub_restart_load() read (before the faces). */
int vhub_restart_model(struct vhubd *v, struct vhub_fdstore_restore *r);
/* The faces' part, once they exist: connections carried, then every
 * device's and VM's restore finished.  -EMFILE, with nothing finished, if
 * some group could not be taken back for want of fds (the start fails). */
int vhub_restart_faces(struct vhubd *v, struct vhub_fdstore_restore *r);
/* Whether the last start carried a state (daemon.restarted was sent). */
bool vhub_restart_carried(const struct vhubd *v);

/* The planned restart (SIGTERM/SIGINT with the fd store): stop reading
 * requests from anyone, wait (at most --backend-timeout-ms) for what is in
 * flight, write every snapshot, then done() is called: the process exits
 * without closing or telling anyone anything. */
int vhub_restart_begin(struct vhubd *v, void (*done)(void *userdata), void *userdata);
/* Write every snapshot, close the control connections left out of it (over
 * what a restart carries) and hand the store what is queued (the last step). */
void vhub_restart_finish(struct vhubd *v);
/* What the above hold (vhubd_done()). */
void vhub_restart_free(struct vhubd *v);
