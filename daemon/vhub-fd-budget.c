/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>

#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-device.h"
#include "vhub-fd-budget.h"
#include "vhub-log.h"
#include "vhub-vm.h"

/* The reserve: an eighth of the limit, at least this many. */
#define FD_RESERVE_MIN 64u
/* Fewer than this per uid is no budget at all: one VM, a device, a ring. */
#define FD_PER_UID_MIN 16u

void vhub_fd_budget_split(struct vhub_fd_budget *b, unsigned limit, unsigned per_uid) {
        unsigned usable, max_per_uid;

        b->limit = limit;
        b->reserve = limit / 8 > FD_RESERVE_MIN ? limit / 8 : FD_RESERVE_MIN;
        if (b->reserve > limit / 2)
                b->reserve = limit / 2;
        usable = limit - b->reserve;
        /* root keeps at least one uid's share */
        max_per_uid = usable / 2;
        if (per_uid == 0)
                per_uid = usable / 4;
        if (per_uid > max_per_uid)
                per_uid = max_per_uid;
        if (per_uid < FD_PER_UID_MIN)
                per_uid = FD_PER_UID_MIN;
        b->per_uid = per_uid;
        b->non_root = usable > per_uid ? usable - per_uid : 0;
}

void vhub_fd_budget_setup(struct vhub_fd_budget *b, unsigned per_uid) {
        struct rlimit rl;
        unsigned limit = 1024;

        if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
                /* every fd is poll()ed through epoll, never select(): the
                 * whole hard limit is usable */
                if (rl.rlim_cur < rl.rlim_max) {
                        struct rlimit raised = { .rlim_cur = rl.rlim_max, .rlim_max = rl.rlim_max };

                        if (setrlimit(RLIMIT_NOFILE, &raised) == 0)
                                rl.rlim_cur = rl.rlim_max;
                }
                limit = rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > (1u << 30) ? 1u << 30
                                                                                 : (unsigned)rl.rlim_cur;
        }
        vhub_fd_budget_split(b, limit, per_uid);
}

void vhub_fd_budget_describe(const struct vhub_fd_budget *b, char *buf, size_t len) {
        snprintf(buf, len,
                 "fd limit %u: %u per non-root uid, %u for all non-root uids together, %u kept in reserve",
                 b->limit, b->per_uid, b->non_root, b->reserve);
}

static unsigned fd_if(int fd) {
        return fd >= 0 ? 1 : 0;
}

/*
 * With the fd store (restart snapshots) a VM also holds its snapshot
 * memfd, and a restart passes the new process one fd per stored group at
 * once -- the VM's memory, its shared objects, each device and a
 * front-door device's own -- on top of every fd it then takes back out of
 * them: the budget keeps room for those, or a daemon filled to its limit
 * runs out of fds restoring (the stashes read short, back-ends' sockets
 * refused: devices lost).  While it runs the same room holds the writing
 * end a group keeps while it changes (vhub-fdstore-internal.h, STASH_*): one per
 * group, and never at the same time as the stash passed at a start.
 */
static unsigned vm_restart_fds(const struct vhub_vm *vm) {
        const struct vhub_device *d;
        unsigned n = 2 + (vm->shared.n > 0);   /* snapshot, memory, shared objects */

        TAILQ_FOREACH(d, &vm->devices, link)
                n += 1 + (d->vmm != NULL);
        return n;
}

static unsigned vm_fds(const struct vhub_vm *vm) {
        const struct vhub_mem_op *mop;
        const struct vhub_device *d;
        unsigned n = (unsigned)vm->mem.n + fd_if(vm->log_fd);

        if (vhub_commit_enabled(vm->ctx))
                n += vm_restart_fds(vm);

        TAILQ_FOREACH(mop, &vm->mem_ops, link)
                if (mop->kind == VHUB_MEM_OP_ADD)
                        n += fd_if(mop->region.fd);
        for (size_t i = 0; i < vm->shared.n; i++)
                n += fd_if(vm->shared.objects[i].fd);
        TAILQ_FOREACH(d, &vm->devices, link)
                n += vhub_device_fds_held(d);
        return n;
}

void vhub_fd_usage_add(struct vhub_fd_usage *u, uid_t holder_uid, unsigned n) {
        u->total += n;
        if (holder_uid != 0)
                u->non_root += n;
        if (holder_uid == u->uid)
                u->by_uid += n;
}

/* ---- the ledger ---- */

int vhub_fd_ledger_init(struct vhub_fd_ledger *l) {
        l->total = l->non_root = 0;
        l->face_total = l->face_non_root = 0;
        l->done = false;
        TAILQ_INIT(&l->marked);
        return vhub_hash_init(&l->uids);
}

void vhub_fd_ledger_done(struct vhub_fd_ledger *l) {
        /* the VMs are gone; what is left is the faces', whose connections
         * close after the model: they count nothing more from here */
        for (size_t b = 0; b < l->uids.n_buckets; b++)
                for (struct vhub_hash_node *n = l->uids.buckets[b], *next; n; n = next) {
                        next = n->next;
                        free(vhub_hash_entry(n, struct vhub_uid_usage, node));
                }
        vhub_hash_done(&l->uids);
        l->done = true;
}

static uint64_t uid_hash(const struct vhub_fd_ledger *l, uid_t uid) {
        return vhub_hash_bytes(&l->uids, &uid, sizeof(uid));
}

static struct vhub_uid_usage *uid_usage(const struct vhub_fd_ledger *l, uid_t uid) {
        uint64_t hash = uid_hash(l, uid);

        for (struct vhub_hash_node *n = vhub_hash_first(&l->uids, hash); n; n = vhub_hash_next(n, hash)) {
                struct vhub_uid_usage *e = vhub_hash_entry(n, struct vhub_uid_usage, node);

                if (e->uid == uid)
                        return e;
        }
        return NULL;
}

unsigned vhub_fd_ledger_vms(const struct vhub_fd_ledger *l, uid_t uid) {
        const struct vhub_uid_usage *e = uid_usage(l, uid);

        return e ? e->vms : 0;
}

/* uid's entry, made now if it has none (NULL without memory). */
static struct vhub_uid_usage *uid_entry(struct vhub_fd_ledger *l, uid_t uid) {
        struct vhub_uid_usage *e = uid_usage(l, uid);

        if (!e) {
                e = calloc(1, sizeof(*e));
                if (!e)
                        return NULL;
                e->uid = uid;
                vhub_hash_insert(&l->uids, &e->node, uid_hash(l, uid));
        }
        return e;
}

/* e goes once nothing of its uid is counted any more. */
static void uid_entry_release(struct vhub_fd_ledger *l, struct vhub_uid_usage *e) {
        if (e->vms > 0 || e->face_holders > 0)
                return;
        vhub_hash_remove(&l->uids, &e->node);
        free(e);
}

int vhub_fd_ledger_vm_added(struct vhub_context *ctx, struct vhub_vm *vm) {
        struct vhub_fd_ledger *l = &ctx->fd_ledger;
        struct vhub_uid_usage *e = uid_entry(l, vm->uid);

        if (!e)
                return -ENOMEM;
        e->vms++;
        vm->fds_counted = 0;
        vm->fds_marked = false;
        return 0;
}

/* Move vm's part of the sums from what it was counted at to n. */
static void ledger_set_vm(struct vhub_fd_ledger *l, struct vhub_uid_usage *e, struct vhub_vm *vm,
                          unsigned n) {
        e->fds = e->fds - vm->fds_counted + n;
        l->total = l->total - vm->fds_counted + n;
        if (vm->uid != 0)
                l->non_root = l->non_root - vm->fds_counted + n;
        vm->fds_counted = n;
}

void vhub_fd_ledger_vm_gone(struct vhub_context *ctx, struct vhub_vm *vm) {
        struct vhub_fd_ledger *l = &ctx->fd_ledger;
        struct vhub_uid_usage *e = uid_usage(l, vm->uid);

        if (vm->fds_marked) {
                TAILQ_REMOVE(&l->marked, vm, fds_link);
                vm->fds_marked = false;
        }
        if (!e)
                return;
        ledger_set_vm(l, e, vm, 0);  /* everything it held is closed with it */
        e->vms--;
        uid_entry_release(l, e);
}

int vhub_fd_ledger_face_set(struct vhub_context *ctx, uid_t uid, unsigned was, unsigned now, int holders) {
        struct vhub_fd_ledger *l = &ctx->fd_ledger;
        struct vhub_uid_usage *e;

        if (l->done)
                return 0;
        e = uid_entry(l, uid);
        if (!e)
                return -ENOMEM;
        e->face_fds = e->face_fds - was + now;
        e->face_holders += (unsigned)holders;   /* unsigned wrap-around subtracts */
        l->face_total = l->face_total - was + now;
        if (uid != 0)
                l->face_non_root = l->face_non_root - was + now;
        uid_entry_release(l, e);
        return 0;
}

void vhub_fd_usage_add_faces(const struct vhub_context *ctx, struct vhub_fd_usage *u) {
        const struct vhub_fd_ledger *l = &ctx->fd_ledger;
        const struct vhub_uid_usage *e = l->done ? NULL : uid_usage(l, u->uid);

        u->total += l->face_total;
        u->non_root += l->face_non_root;
        u->by_uid += e ? e->face_fds : 0;
}

void vhub_fd_budget_vm_changed(struct vhub_vm *vm) {
        if (!vm || vm->fds_marked)
                return;
        vm->fds_marked = true;
        TAILQ_INSERT_TAIL(&vm->ctx->fd_ledger.marked, vm, fds_link);
}

void vhub_fd_ledger_listed_add(struct vhub_context *ctx, uid_t uid, int vms, int devices) {
        struct vhub_fd_ledger *l = &ctx->fd_ledger;
        struct vhub_uid_usage *e = uid_usage(l, uid);

        /* unsigned wrap-around adds a negative change */
        l->listed.vms += (unsigned)vms;
        l->listed.devices += (unsigned)devices;
        if (e) {
                e->listed.vms += (unsigned)vms;
                e->listed.devices += (unsigned)devices;
        }
}

/* A difference means a change that did not go through vhub-vm.c's counts:
 * log it (the answer is the walk's). */
static struct vhub_listed listed_verify(const struct vhub_context *ctx, uid_t uid, struct vhub_listed kept) {
        struct vhub_listed walked = { 0 };
        const struct vhub_vm *vm;

        TAILQ_FOREACH(vm, &ctx->vms, link)
                if (!vm->destroying && vhub_vm_visible_to(vm, uid)) {
                        walked.vms++;
                        walked.devices += vm->n_devices;
                }
        if (walked.vms == kept.vms && walked.devices == kept.devices)
                return kept;
        log_error("listed counts out of step for uid %u: %u VMs and %u devices, the ledger had %u and %u",
                  (unsigned)uid, walked.vms, walked.devices, kept.vms, kept.devices);
        if (getenv("VHUB_FD_LEDGER_ABORT"))
                abort();
        return walked;
}

struct vhub_listed vhub_fd_ledger_listed(const struct vhub_context *ctx, uid_t uid) {
        const struct vhub_uid_usage *e;
        struct vhub_listed kept = { 0 };

        /* vhub_uid_sees(): root sees every uid's VMs, any other uid its own */
        if (uid == 0) {
                kept = ctx->fd_ledger.listed;
        } else {
                e = uid_usage(&ctx->fd_ledger, uid);
                if (e)
                        kept = e->listed;
        }
        if (vhub_log_get_level() >= LOG_DEBUG)
                return listed_verify(ctx, uid, kept);
        return kept;
}

/* Count the marked VMs again. */
static void ledger_recount_marked(struct vhub_fd_ledger *l) {
        struct vhub_vm *vm;

        while ((vm = TAILQ_FIRST(&l->marked))) {
                struct vhub_uid_usage *e = uid_usage(l, vm->uid);

                TAILQ_REMOVE(&l->marked, vm, fds_link);
                vm->fds_marked = false;
                if (e)
                        ledger_set_vm(l, e, vm, vm_fds(vm));
        }
}

/* --log-level debug: count everything and compare; a difference is a
 * change nobody marked (logged, and the ledger counted again). */
static void ledger_verify(struct vhub_context *ctx, uid_t uid) {
        struct vhub_fd_ledger *l = &ctx->fd_ledger;
        const struct vhub_uid_usage *e = uid_usage(l, uid);
        struct vhub_fd_usage full = { .uid = uid };
        struct vhub_vm *vm;

        TAILQ_FOREACH(vm, &ctx->vms, link)
                vhub_fd_usage_add(&full, vm->uid, vm_fds(vm));
        if (full.total == l->total && full.non_root == l->non_root && full.by_uid == (e ? e->fds : 0))
                return;
        log_error("fd ledger out of step (a change to what a VM holds was not marked): counted %u in all, "
                  "%u for non-root uids, %u for uid %u; the ledger had %u, %u, %u",
                  full.total, full.non_root, full.by_uid, (unsigned)uid, l->total, l->non_root,
                  e ? e->fds : 0);
        if (getenv("VHUB_FD_LEDGER_ABORT"))
                abort();
        TAILQ_FOREACH(vm, &ctx->vms, link)
                vhub_fd_budget_vm_changed(vm);
        ledger_recount_marked(l);
}

void vhub_fd_usage_add_model(struct vhub_context *ctx, struct vhub_fd_usage *u) {
        struct vhub_fd_ledger *l = &ctx->fd_ledger;
        const struct vhub_uid_usage *e;

        ledger_recount_marked(l);
        if (vhub_log_get_level() >= LOG_DEBUG)
                ledger_verify(ctx, u->uid);
        e = uid_usage(l, u->uid);
        u->total += l->total;
        u->non_root += l->non_root;
        u->by_uid += e ? e->fds : 0;
}

int vhub_fd_budget_check(const struct vhub_fd_budget *b, const struct vhub_fd_usage *u, unsigned n,
                         unsigned slack, struct vhub_error *err) {
        if (u->uid == 0) {
                if (u->total + n <= b->limit - b->reserve + slack)
                        return 0;
                return vhub_error_set(err, VHUB_ERR_LIMIT,
                                      "the daemon holds %u fds; %u more would reach its reserve of %u (fd limit %u)",
                                      u->total, n, b->reserve, b->limit);
        }
        if (u->by_uid + n > b->per_uid + slack) {
                if (n == 0)
                        return vhub_error_set(err, VHUB_ERR_LIMIT,
                                              "uid %u holds %u fds, past its fd budget of %u (--max-fds-per-uid)",
                                              (unsigned)u->uid, u->by_uid, b->per_uid);
                return vhub_error_set(err, VHUB_ERR_LIMIT,
                                      "uid %u holds %u fds; %u more would pass its fd budget of %u (--max-fds-per-uid)",
                                      (unsigned)u->uid, u->by_uid, n, b->per_uid);
        }
        /* other uids' numbers stay out of the detail: no oracle on them */
        if (u->non_root + n > b->non_root + slack)
                return vhub_error_set(err, VHUB_ERR_LIMIT,
                                      "the fds the daemon lets non-root uids hold (%u of its fd limit %u) are in use; uid %u holds %u",
                                      b->non_root, b->limit, (unsigned)u->uid, u->by_uid);
        return 0;
}
