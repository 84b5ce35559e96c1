/* SPDX-License-Identifier: MIT */
/*
 * The daemon context: the one object holding all daemon state (config, the
 * event loop, every VM).  Nothing else in the daemon is global.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/types.h>

#include "vhub-config.h"
#include "vhub-event.h"
#include "vhub-fd-budget.h"
#include "vhub-snapshot.h"

struct event_base;
struct event;
struct vhub_backend_dirs;
struct vhub_fd_visitor;
struct vhub_fdstore;
struct vhub_owner;
struct vhub_vm;
struct vhub_socket_watcher;
struct vhub_vmm_door;

TAILQ_HEAD(vhub_vm_list, vhub_vm);
TAILQ_HEAD(vhub_vm_snap_list, vhub_vm);
TAILQ_HEAD(vhub_commit_wait_list, vhub_commit_wait);

struct vhub_context {
        struct event_base *base;
        struct vhub_config *config;
        struct vhub_vm_list vms;
        unsigned n_vms;
        unsigned n_devices;
        uint64_t next_region_id;
        uint64_t next_vm_id;              /* never reused: they name fd-store groups */
        uint64_t next_device_id;
        uint64_t start_usec;              /* CLOCK_MONOTONIC: uptime */
        uint64_t start_realtime_usec;     /* CLOCK_REALTIME: daemon.info's started_at */
        struct vhub_event_sink_list sinks;          /* one per face that listens */
        struct vhub_fd_budget fd_budget;            /* from RLIMIT_NOFILE at init */
        struct vhub_fd_ledger fd_ledger;            /* what each uid holds (vhub-fd-budget.h) */
        struct vhub_hash vms_by_name;               /* (uid, name) -> VM (vhub_vm_find) */
        struct vhub_socket_watcher *socket_watcher; /* back-end sockets re-created (vhub-socket-watch.h) */
        struct vhub_backend_dirs *backend_dirs;     /* see vhub-backend-path.h */
        struct vhub_fdstore *fdstore;               /* systemd's fd store (disabled without
                                                     * $NOTIFY_SOCKET or with --no-fd-store) */
        unsigned n_channels_paused;  /* back-end channels waiting for an owner to read */
        const struct vhub_vmm_door *vmm_door;       /* the front door, if any (vhub-device-vmm.h) */
        bool shutting_down;
        /* the restart snapshots (vhub-commit.h); ev_commit NULL: none kept */
        struct event *ev_commit;
        struct vhub_snap_writer snap_writer;        /* one buffer, reused by every write */
        struct vhub_vm_snap_list snap_dirty;        /* VMs whose snapshot is out of date */
        bool snap_daemon_dirty;
        bool snap_faces_dirty;                      /* a face's own snapshot files (vhub_changed_face()) */
        bool snap_faces_all;                        /* ... every one of them */
        struct vhub_commit_wait_list commit_waits;  /* what waits for the turn's commit */
        uint64_t commit_turn;                       /* turns' commits run so far (commit_cb()) */
        void (*commit_daemon)(void *userdata);      /* the root writes the daemon's */
        void (*commit_faces)(void *userdata, bool all); /* and has the faces write theirs */
        void *commit_userdata;
        bool restoring;              /* claiming stored fds: they are group members already */
        uint64_t restarts;           /* restarts this state was carried across (daemon.info) */
        /* called when the model's counts change (systemd STATUS=) */
        void (*on_counts_changed)(void *userdata);
        void *counts_userdata;
};

/* Also raises the soft RLIMIT_NOFILE to the hard limit and derives the fd
 * budget from it (vhub-fd-budget.h), and connects the fd store (unless
 * --no-fd-store).  On failure nothing is left to free. */
int vhub_context_init(struct vhub_context *ctx, struct event_base *base, struct vhub_config *config);
/* Tear down every VM (back-ends closed, fds released).  Completes pending calls. */
void vhub_context_done(struct vhub_context *ctx);
/* Shutdown: every VM stops its devices and closes its back-ends, in
 * parallel; each goes when its devices have (n_vms tells). */
void vhub_context_destroy_vms(struct vhub_context *ctx);
/* In a fatal signal's handler: remove the server-mode sockets the daemon
 * created, relative to their directory fds and only if the name still
 * holds the inode bind() created (fstatat, unlinkat: async-signal-safe; the
 * lists may be mid-change).  Never by path: the uid owns directories on it. */
void vhub_context_crash_unlink(const struct vhub_context *ctx);
/* Every sink gets ev (none once shutting down), stamped with the time
 * (unless ev has one) and its VM's uid. */
void vhub_context_emit(struct vhub_context *ctx, const struct vhub_event *ev);
void vhub_context_add_sink(struct vhub_context *ctx, struct vhub_event_sink *sink);
void vhub_context_remove_sink(struct vhub_context *ctx, struct vhub_event_sink *sink);
/* Whether the VM's owner is behind on its events (vhub_owner_ops.congested). */
bool vhub_context_events_congested(struct vhub_context *ctx, const struct vhub_vm *vm);
/* The owner of vm caught up on its events, or vm has a new owner (or none):
 * its paused back-end channels read again. */
void vhub_context_events_drained(struct vhub_context *ctx, struct vhub_vm *vm);
/* A face's connection caught up on its events: the channels of its VMs read again. */
void vhub_context_owner_drained(struct vhub_context *ctx, const struct vhub_owner *owner);
/* A face's connection is going: each VM it owns lingers or is destroyed
 * (nothing here waits for back-ends); the model drops every pointer to it. */
void vhub_context_owner_gone(struct vhub_context *ctx, const struct vhub_owner *owner);
/* A restore: a face took back its connection owner (same face and id as
 * in the snapshot): the VMs it owned are its again. */
void vhub_context_owner_restored(struct vhub_context *ctx, const struct vhub_owner *owner);
/* A restore is complete (every face took its connections back): devices
 * that had a request in flight are lost now, outages go on, VMs whose
 * owner did not come back linger or go (vhub-model-snapshot.h). */
void vhub_context_restore_finish(struct vhub_context *ctx);
/* Some op or memory change waits on a back-end, or a back-end channel has
 * a request to finish (a planned restart waits until nothing does). */
bool vhub_context_busy(const struct vhub_context *ctx);
/* A planned restart: no back-end channel reads a new request (what the
 * back-ends send waits in their sockets for the next process). */
void vhub_context_pause_channels(struct vhub_context *ctx);
void vhub_context_counts_changed(struct vhub_context *ctx);
/* Number of VMs owned by uid (those being destroyed included). */
unsigned vhub_context_count_vms(const struct vhub_context *ctx, uid_t uid);
/* For the faces, which read no field of the context. */
struct event_base *vhub_context_base(const struct vhub_context *ctx);
const struct vhub_fd_budget *vhub_context_fd_budget(const struct vhub_context *ctx);
/* What uid, the non-root uids and everyone make the daemon hold now: the
 * model's fds and every face's (its sink's count_fds). */
void vhub_context_fd_usage(struct vhub_context *ctx, uid_t uid, struct vhub_fd_usage *u);
/* May uid make the daemon hold n more fds (vhub_fd_budget_check() on the
 * usage above)?  0, or -32008 in err. */
int vhub_context_check_fds(struct vhub_context *ctx, uid_t uid, unsigned n, unsigned slack,
                           struct vhub_error *err);
/* The fd store every owner's fds go to (vhub-fd-track.h); a disabled
 * store, or NULL in a context that never had one, takes nothing. */
struct vhub_fdstore *vhub_context_fdstore(const struct vhub_context *ctx);
/* Every fd the model holds: the back-end directories', the socket
 * watcher's, the fd store's own, and every VM's (vhub_vm_foreach_fd()). */
void vhub_context_foreach_fd(const struct vhub_context *ctx, const struct vhub_fd_visitor *v);
bool vhub_context_shutting_down(const struct vhub_context *ctx);
