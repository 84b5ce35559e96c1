/* SPDX-License-Identifier: MIT */
/*
 * The fd budget: one uid must not exhaust the fds every uid shares
 * (docs/control-api.md "Limits").
 *
 * At start the daemon raises its soft RLIMIT_NOFILE to the hard limit and
 * splits it:
 *
 *   reserve   never handed to any uid: the daemon's own fds, the copies it
 *             makes while sending, accepting a connection to answer it
 *   per_uid   what one non-root uid may make the daemon hold
 *             (--max-fds-per-uid; default a quarter of limit - reserve)
 *   non_root  what every non-root uid together may make it hold: the rest
 *             after root's share (limit - reserve - per_uid), so that root
 *             always has at least per_uid
 *
 * Root is not limited per uid, only by limit - reserve.
 *
 * What a uid "holds" is counted from the objects that hold fds: its VMs'
 * regions, shared objects, dirty log, devices' sockets, ring eventfds and
 * inflight fds, fds ops own until they commit, and its control connections
 * with the fds queued on them (the control layer adds those).
 *
 * The model's part is kept in a ledger, so that a check costs the same with
 * one VM or thousands: each VM's count is kept with the VM, and per uid and
 * overall as sums of those.  Code that may change what a VM holds marks it
 * (vhub_fd_budget_vm_changed(), cheap, any number of times); the next check
 * counts the marked VMs again (O(their objects)) and updates the sums.  A
 * VM that was changed and not marked is counted right again the next time
 * it is marked: a miss is never cumulative.  At --log-level debug every
 * check also counts everything and logs a difference.
 */
#pragma once

#include <stdbool.h>
#include <sys/queue.h>
#include <sys/types.h>

#include "vhub-error.h"
#include "vhub-hash.h"

struct vhub_context;
struct vhub_vm;

/* What a device holds of its own once it runs: its socket, the back-end
 * channel, a server-mode listening socket and its directory's fd, the
 * inflight fd. */
#define VHUB_DEVICE_OWN_FDS 5

struct vhub_fd_budget {
        unsigned limit;
        unsigned reserve;
        unsigned per_uid;
        unsigned non_root;
};

/* What daemon.info answers: the VMs not being destroyed and their devices
 * (those being removed included), kept as they change so that the answer
 * does not walk every VM. */
struct vhub_listed {
        unsigned vms, devices;
};

/* One uid's entry in the ledger: it exists while the uid has a VM. */
struct vhub_uid_usage {
        struct vhub_hash_node node;
        uid_t uid;
        unsigned vms;                   /* its VMs, those being destroyed included */
        unsigned fds;                   /* what its VMs hold, as last counted */
        struct vhub_listed listed;      /* what daemon.info counts for it */
        unsigned face_fds;              /* what the faces hold for it (its connections) */
        unsigned face_holders;          /* the faces' objects counted into face_fds */
};

TAILQ_HEAD(vhub_vm_fd_marked, vhub_vm);

/* What the model holds, per uid and in all. */
struct vhub_fd_ledger {
        struct vhub_hash uids;          /* uid -> struct vhub_uid_usage */
        unsigned total, non_root;       /* sums of the VMs' counts */
        unsigned face_total, face_non_root; /* sums of what the faces hold */
        bool done;                      /* vhub_fd_ledger_done(): the faces close after it */
        struct vhub_vm_fd_marked marked;/* VMs to count again */
        struct vhub_listed listed;      /* everyone's: what root sees */
};

/* What is held now: by one uid, by all non-root uids, by everyone. */
struct vhub_fd_usage {
        uid_t uid;
        unsigned by_uid;
        unsigned non_root;
        unsigned total;
};

/*
 * Raise the soft RLIMIT_NOFILE to the hard limit and derive the budget;
 * per_uid 0 takes the default.  A per_uid beyond what the limit allows is
 * lowered to that (the budget says so in vhub_fd_budget_describe()).
 */
void vhub_fd_budget_setup(struct vhub_fd_budget *b, unsigned per_uid);
/* The split itself, for a given limit. */
void vhub_fd_budget_split(struct vhub_fd_budget *b, unsigned limit, unsigned per_uid);
/* The split as one sentence, for the startup log. */
void vhub_fd_budget_describe(const struct vhub_fd_budget *b, char *buf, size_t len);

/* -ENOMEM. */
int vhub_fd_ledger_init(struct vhub_fd_ledger *l);
/* After every VM is gone. */
void vhub_fd_ledger_done(struct vhub_fd_ledger *l);
/* A VM joins its uid's entry (made now: -ENOMEM) / leaves it for good. */
int vhub_fd_ledger_vm_added(struct vhub_context *ctx, struct vhub_vm *vm);
void vhub_fd_ledger_vm_gone(struct vhub_context *ctx, struct vhub_vm *vm);
/* How many VMs uid has (the per-uid VM limit). */
unsigned vhub_fd_ledger_vms(const struct vhub_fd_ledger *l, uid_t uid);
/* uid's listed counts change by vms and devices (vhub-vm.c: a VM created,
 * destroyed or freed, a device linked or unlinked in a VM not being destroyed). */
void vhub_fd_ledger_listed_add(struct vhub_context *ctx, uid_t uid, int vms, int devices);
/* What uid sees (root: everyone's).  At --log-level debug also counted by
 * walking every VM; a difference is logged (VHUB_FD_LEDGER_ABORT: aborts). */
struct vhub_listed vhub_fd_ledger_listed(const struct vhub_context *ctx, uid_t uid);
/* What vm holds may have changed: count it again at the next check. */
void vhub_fd_budget_vm_changed(struct vhub_vm *vm);

/* Count what the model holds into u (u->uid selects the uid; zero u first):
 * the marked VMs are counted again first. */
void vhub_fd_usage_add_model(struct vhub_context *ctx, struct vhub_fd_usage *u);
/* Count n fds held on behalf of holder_uid (a control connection's). */
void vhub_fd_usage_add(struct vhub_fd_usage *u, uid_t holder_uid, unsigned n);

/* What one of a face's objects holds for uid (a control connection: its
 * socket, fds received and not taken yet, dups queued for it) went from
 * was to now, kept in the ledger as the face counts it, so that a check
 * does not ask the face to walk its objects.  holders: +1 when the object
 * is counted for the first time, -1 when it goes (now 0); uid's entry
 * lives while it has VMs or such objects.  -ENOMEM (nothing changed) when
 * the entry cannot be made. */
int vhub_fd_ledger_face_set(struct vhub_context *ctx, uid_t uid, unsigned was, unsigned now, int holders);
/* Add what the ledger keeps of the faces' fds into u (a sink's count_fds,
 * once the face has brought its counts up to date). */
void vhub_fd_usage_add_faces(const struct vhub_context *ctx, struct vhub_fd_usage *u);

/*
 * May u->uid make the daemon hold n more fds?  slack lets fds that have
 * already arrived pass above the budget by that much (they are answered
 * -32008 and closed when their request is dispatched).  0, or -32008 in
 * err naming the limit that stops it.
 */
int vhub_fd_budget_check(const struct vhub_fd_budget *b, const struct vhub_fd_usage *u, unsigned n,
                         unsigned slack, struct vhub_error *err);
