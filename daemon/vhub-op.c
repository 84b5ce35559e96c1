/* SPDX-License-Identifier: MIT */
/*
 * Device operations: the table of op kinds (the states a call may find the
 * device in, each kind's hooks), the gate every call passes, and what every
 * kind shares (REPLY_ACK checks, answering the call).  A stage queues its
 * requests at once; op_on_reply() records what each reply says;
 * op_complete() commits the op's effect on the model (or undoes it) and
 * answers its call.  The kinds themselves live in vhub-op-*.c.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "vhub-device-internal.h"
#include "vhub-log.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

/* A u64 REPLY_ACK: 0 is success. */
void op_check_ack(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                      const struct vhu_msg *reply) {
        /* SET_LOG_BASE's reply (with LOG_SHMFD) only says it was processed:
         * libvhost-user echoes the log size there, DPDK sends nothing. */
        if (request == VHU_REQ_SET_LOG_BASE)
                return;
        if (reply->hdr.size == sizeof(uint64_t) && reply->payload.u64 == 0)
                return;
        device_op_error(op, VHUB_ERR_BACKEND, REQ(request), "back-end refused %s (status %llu)",
                        REQ(request),
                        reply->hdr.size == sizeof(uint64_t) ? (unsigned long long)reply->payload.u64
                                                            : 0ULL);
        snprintf(op->error.device, sizeof(op->error.device), "%s", d->name);
}

int op_restored_begin(const struct vhub_device *d, struct vhub_op *op) {
        free(op->restored);
        op->restored = calloc(d->queues ? d->queues : 1, sizeof(*op->restored));
        op->n_restored = 0;
        op->restore_exact = true;
        if (!op->restored)
                return device_op_error(op, VHUB_ERR_INTERNAL, NULL, "out of memory");
        return 0;
}

void op_restored_ring(struct vhub_op *op, uint32_t index, uint16_t used_idx, uint16_t avail_idx, bool loss_read,
                      uint16_t loss_avail, uint16_t loss_used, bool tracked) {
        struct vhub_event_vring *v = &op->restored[op->n_restored++];

        v->index = index;
        v->base = used_idx;
        v->outstanding = loss_read ? (uint16_t)(loss_avail - loss_used) : (uint16_t)(avail_idx - used_idx);
        if (v->outstanding > 1 && !tracked)
                op->restore_exact = false;
}

static void op_ack_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                         struct vhu_msg *reply) {
        op_check_ack(d, op, request, reply);
}

/* The call of an op that has ended: its outputs are filled by then. */
void op_complete_call(struct vhub_device *d, struct vhub_op *op, int r) {
        struct vhub_call *call = op->call;

        op->call = NULL;
        if (!call)
                return;
        if (r < 0) {
                if (op->error.code == 0)
                        vhub_error_set(&op->error, VHUB_ERR_INTERNAL, "internal error (%d)", r);
                if ((op->error.code == VHUB_ERR_BACKEND || op->error.code == VHUB_ERR_TIMEOUT) &&
                    !op->error.device[0])
                        snprintf(op->error.device, sizeof(op->error.device), "%s", d->name);
                vhub_call_fail(call, &op->error);
                return;
        }
        vhub_call_complete(call, 0);
}

/* ---- the op kinds ---- */

/* The states a call may find a device in (the gate's outage check comes first). */
#define UP (DEV_STATE_BIT(VHUB_DEV_READY) | DEV_STATE_BIT(VHUB_DEV_RUNNING) | DEV_STATE_BIT(VHUB_DEV_STOPPED))

/*
 * One row per op kind:
 *   states     where a call may submit it (device_submit()); 0: only the
 *              model queues it (a handshake, a VM's fan-out, a removal)
 *   stage      queues one stage's requests: OP_STAGE_NEXT / WAIT / DONE, or < 0
 *   on_reply   records what a reply says
 *   complete   commits the op's effect on the model, or undoes it; answers the call
 *   fd_at      where in the op the one fd it may own lies (0: none): -1
 *              when made, closed when freed, counted by the fd budget
 *   free       frees anything else it owns; fds counts the fds among that,
 *              visit names them (vhub_device_foreach_fd())
 */
struct op_class {
        const char *name;
        unsigned states;
        int (*stage)(struct vhub_device *d, struct vhub_op *op);
        void (*on_reply)(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                         struct vhu_msg *reply);
        void (*complete)(struct vhub_device *d, struct vhub_op *op, int r);
        size_t fd_at;
        void (*free)(struct vhub_op *op);
        unsigned (*fds)(const struct vhub_op *op);
        void (*visit)(const struct vhub_device *d, const struct vhub_op *op, const struct vhub_fd_visitor *v);
};

#define FD_AT(member) offsetof(struct vhub_op, member)

static const struct op_class op_classes[_VHUB_OP_MAX] = {
        [VHUB_OP_HANDSHAKE] = { "handshake", 0, handshake_stage, handshake_on_reply, handshake_complete, 0,
                                mem_sync_free, NULL },
        [VHUB_OP_START] = { "start", DEV_STATE_BIT(VHUB_DEV_READY) | DEV_STATE_BIT(VHUB_DEV_STOPPED),
                            start_stage, start_on_reply, start_complete, 0, start_free, start_fds,
                            start_foreach_fd },
        [VHUB_OP_STOP] = { "stop", DEV_STATE_BIT(VHUB_DEV_RUNNING), stop_stage, stop_on_reply, stop_complete },
        /* queued behind the first handshake, which gives it its answer */
        [VHUB_OP_CONFIG_GET] = { "config-get", DEV_STATE_BIT(VHUB_DEV_CONNECTING) | UP, config_stage,
                                 config_on_reply, config_get_complete },
        [VHUB_OP_CONFIG_SET] = { "config-set", DEV_STATE_BIT(VHUB_DEV_CONNECTING) | UP, config_stage,
                                 config_on_reply, op_complete_call },
        [VHUB_OP_MEM_SYNC] = { "memory-sync", 0, mem_sync_stage, mem_sync_on_reply, mem_sync_complete, 0,
                               mem_sync_free, NULL },
        [VHUB_OP_REMOVE] = { "remove", 0, remove_stage, stop_on_reply, remove_complete },
        [VHUB_OP_SINGLE] = { "request", UP, single_stage, single_on_reply, single_complete,
                             FD_AT(u.single.fd), single_free, NULL },
        [VHUB_OP_RESET] = { "reset", UP, reset_stage, stop_on_reply, reset_complete },
        [VHUB_OP_LOG] = { "dirty-log", 0, log_stage, op_ack_on_reply, log_complete },
        [VHUB_OP_GET_SHARED] = { "get-shared-object", 0, get_shared_stage, get_shared_on_reply,
                                 get_shared_complete, FD_AT(u.shared.fd) },
        [VHUB_OP_POSTCOPY] = { "postcopy", 0, postcopy_stage, postcopy_on_reply, postcopy_complete,
                               FD_AT(u.postcopy.ufd), postcopy_free, NULL },
        /* the front door's (vhub-op-passthrough.c, vhub-op-vmm-restore.c) */
        [VHUB_OP_PASSTHROUGH] = { "vmm-request", 0, passthrough_stage, passthrough_on_reply,
                                  passthrough_complete, 0, passthrough_free, passthrough_fds,
                                  passthrough_foreach_fd },
        [VHUB_OP_VMM_RESTORE] = { "vmm-restore", 0, vmm_restore_stage, vmm_restore_on_reply,
                                  vmm_restore_complete },
        [VHUB_OP_VMM_STOP] = { "vmm-stop", 0, vmm_stop_stage, vmm_stop_on_reply, vmm_stop_complete, 0,
                               mem_sync_free, NULL },
};

/* The one fd the op may own, or NULL. */
static int *op_owned_fd(const struct vhub_op *op) {
        size_t at = op_classes[op->kind].fd_at;

        return at ? (int *)((char *)op + at) : NULL;
}

const char *vhub_op_kind_to_string(enum vhub_op_kind kind) {
        return (unsigned)kind < _VHUB_OP_MAX ? op_classes[kind].name : "unknown";
}

struct vhub_op *op_new(enum vhub_op_kind kind, struct vhub_call *call) {
        struct vhub_op *op = calloc(1, sizeof(*op));

        if (!op)
                return NULL;
        op->kind = kind;
        op->call = call;
        if (op_owned_fd(op))
                *op_owned_fd(op) = -1;
        return op;
}

void op_free(struct vhub_op *op) {
        int *fd;

        if (!op)
                return;
        vhub_commit_wait_cancel(&op->busy_wait);
        fd = op_owned_fd(op);
        if (fd)
                *fd = vhu_safe_close(*fd);
        if (op_classes[op->kind].free)
                op_classes[op->kind].free(op);
        free(op->restored);
        free(op);
}

unsigned op_fds_held(const struct vhub_op *op) {
        const int *fd = op_owned_fd(op);

        return (fd && *fd >= 0) + (op_classes[op->kind].fds ? op_classes[op->kind].fds(op) : 0);
}

void op_foreach_fd(const struct vhub_device *d, const struct vhub_op *op, const struct vhub_fd_visitor *v) {
        const int *fd = op_owned_fd(op);

        if (fd)
                device_fd_visit(d, v, *fd, NULL, "op/%s", op_classes[op->kind].name);
        if (op_classes[op->kind].visit)
                op_classes[op->kind].visit(d, op, v);
}

/* "ready, running or stopped": the states of mask, for an error. */
static void states_describe(unsigned mask, char *buf, size_t len) {
        unsigned n = 0, total = (unsigned)__builtin_popcount(mask);
        size_t off = 0;

        buf[0] = '\0';
        for (unsigned s = 0; s < _VHUB_DEV_STATE_MAX && off < len; s++) {
                if (!(mask & DEV_STATE_BIT(s)))
                        continue;
                n++;
                off += (size_t)snprintf(buf + off, len - off, "%s%s",
                                        n == 1 ? "" : n == total ? " or " : ", ",
                                        vhub_device_state_to_string((enum vhub_device_state)s));
        }
}

struct vhub_op *device_submit(struct vhub_device *d, enum vhub_op_kind kind, struct vhub_call *call) {
        unsigned states = op_classes[kind].states;
        struct vhub_error err;
        struct vhub_op *op;

        if (d->removing) {
                vhub_error_set(&err, VHUB_ERR_NO_DEVICE, "device %s is being removed", d->name);
                goto fail;
        }
        /* contract: the VMM drives a front-door device; only reads are others' */
        if (d->vmm && kind != VHUB_OP_CONFIG_GET) {
                vhub_error_set(&err, VHUB_ERR_STATE,
                               "device %s is driven by its VMM through the front door; %s is the VMM's",
                               d->name, op_classes[kind].name);
                goto fail;
        }
        /* an outage (a restore attempt included) fails every call at once with
         * -32006, not -32004, and nothing waits behind a restore attempt */
        if (d->state == VHUB_DEV_DISCONNECTED || d->state == VHUB_DEV_RESTORING ||
            d->state == VHUB_DEV_FAILED) {
                vhub_error_set_backend(&err, VHUB_ERR_BACKEND, d->name, NULL,
                                       d->state == VHUB_DEV_FAILED
                                               ? "device %s has failed; remove and add it again"
                                               : "device %s is disconnected; its back-end is being reconnected",
                                       d->name);
                goto fail;
        }
        if (!(states & DEV_STATE_BIT(d->state))) {
                char needs[80];

                states_describe(states, needs, sizeof(needs));
                vhub_error_set(&err, VHUB_ERR_STATE, "device %s is %s; %s needs %s", d->name,
                               vhub_device_state_to_string(d->state), op_classes[kind].name, needs);
                goto fail;
        }
        op = op_new(kind, call);
        if (op)
                return op;
        vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
fail:
        vhub_call_fail(call, &err);
        return NULL;
}

void op_refuse(struct vhub_op *op, const struct vhub_error *err) {
        struct vhub_call *call = op->call;

        op->call = NULL;
        op_free(op);
        vhub_call_fail(call, err);
}

void op_refusef(struct vhub_op *op, int code, const char *fmt, ...) {
        struct vhub_error err;
        va_list ap;

        va_start(ap, fmt);
        vhub_error_setv(&err, code, fmt, ap);
        va_end(ap);
        op_refuse(op, &err);
}

int op_stage_send(struct vhub_device *d, struct vhub_op *op) {
        return op_classes[op->kind].stage(d, op);
}

void op_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                 struct vhu_msg *reply) {
        op_classes[op->kind].on_reply(d, op, request, tag, reply);
}

void op_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        /* a restore's failure is a failed attempt: the device logs those */
        if (r < 0)
                device_log(d, op->restore ? LOG_DEBUG : LOG_INFO, op->error.request, "%s failed: %s",
                           vhub_op_kind_to_string(op->kind), op->error.detail);
        op_classes[op->kind].complete(d, op, r);
}
