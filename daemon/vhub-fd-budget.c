/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <sys/resource.h>

#include "vhub-context.h"
#include "vhub-device.h"
#include "vhub-fd-budget.h"
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

static unsigned vm_fds(const struct vhub_vm *vm) {
        const struct vhub_mem_op *mop;
        const struct vhub_device *d;
        unsigned n = (unsigned)vm->mem.n + fd_if(vm->log_fd);

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

void vhub_fd_usage_add_model(const struct vhub_context *ctx, struct vhub_fd_usage *u) {
        const struct vhub_vm *vm;

        TAILQ_FOREACH(vm, &ctx->vms, link)
                vhub_fd_usage_add(u, vm->uid, vm_fds(vm));
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
