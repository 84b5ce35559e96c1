/* SPDX-License-Identifier: MIT */
/*
 * Device operations: what every op kind shares (freeing, REPLY_ACK checks,
 * answering the call) and the table of op kinds.  A stage queues its
 * requests at once; op_on_reply() records what each reply says;
 * op_complete() commits the op's effect on the model (or undoes it) and
 * answers its call.  The kinds themselves live in vhub-op-*.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "vhub-device-internal.h"
#include "vhub-log.h"

void op_free(struct vhub_op *op) {
        if (!op)
                return;
        if (op->kind == VHUB_OP_START && op->u.start.vrings) {
                for (unsigned i = 0; i < op->u.start.n_vrings; i++)
                        vring_close_fds(&op->u.start.vrings[i]);
                free(op->u.start.vrings);
        }
        if (op->kind == VHUB_OP_MEM_SYNC || op->kind == VHUB_OP_HANDSHAKE) {
                free(op->u.mem.add);
                free(op->u.mem.remove);
                free(op->u.mem.remove_ids);
                free(op->u.mem.target_ids);
        }
        if (op->kind == VHUB_OP_SINGLE) {
                if (op->u.single.fd >= 0)
                        close(op->u.single.fd);
                free(op->u.single.payload);
        }
        if (op->kind == VHUB_OP_POSTCOPY) {
                if (op->u.postcopy.ufd >= 0)
                        close(op->u.postcopy.ufd);
                free(op->u.postcopy.table);
                free(op->u.postcopy.backend_uaddr);
        }
        if (op->kind == VHUB_OP_GET_SHARED && op->u.shared.fd >= 0)
                close(op->u.shared.fd);
        free(op->restored);
        free(op);
}

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

/* ---- the op kinds: stages, replies, completion ---- */

struct op_class {
        const char *name;
        int (*stage)(struct vhub_device *d, struct vhub_op *op);
        void (*on_reply)(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                         struct vhu_msg *reply);
        void (*complete)(struct vhub_device *d, struct vhub_op *op, int r);
};

static const struct op_class op_classes[_VHUB_OP_MAX] = {
        [VHUB_OP_HANDSHAKE]  = { "handshake", handshake_stage, handshake_on_reply, handshake_complete },
        [VHUB_OP_START]      = { "start", start_stage, start_on_reply, start_complete },
        [VHUB_OP_STOP]       = { "stop", stop_stage, stop_on_reply, stop_complete },
        [VHUB_OP_CONFIG_GET] = { "config-get", config_stage, config_on_reply, config_get_complete },
        [VHUB_OP_CONFIG_SET] = { "config-set", config_stage, config_on_reply, op_complete_call },
        [VHUB_OP_MEM_SYNC]   = { "memory-sync", mem_sync_stage, mem_sync_on_reply, mem_sync_complete },
        [VHUB_OP_REMOVE]     = { "remove", remove_stage, stop_on_reply, remove_complete },
        [VHUB_OP_SINGLE]     = { "request", single_stage, single_on_reply, single_complete },
        [VHUB_OP_RESET]      = { "reset", reset_stage, stop_on_reply, reset_complete },
        [VHUB_OP_LOG]        = { "dirty-log", log_stage, op_ack_on_reply, log_complete },
        [VHUB_OP_GET_SHARED] = { "get-shared-object", get_shared_stage, get_shared_on_reply, get_shared_complete },
        [VHUB_OP_POSTCOPY]   = { "postcopy", postcopy_stage, postcopy_on_reply, postcopy_complete },
};

const char *vhub_op_kind_to_string(enum vhub_op_kind kind) {
        return (unsigned)kind < _VHUB_OP_MAX ? op_classes[kind].name : "unknown";
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
