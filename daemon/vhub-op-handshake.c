/* SPDX-License-Identifier: MIT */
/*
 * HANDSHAKE: features, protocol features, queues, owner, back-end channel,
 * memory slots, then the memory table -- on device.add and on every restore.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-backend-conn.h"
#include "vhub-device-vmm-internal.h"
#include "vhub-log.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

static void release_handshake_sync(struct vhub_device *d, struct vhub_op *op) {
        if (!op->holds_handshake_sync)
                return;
        op->holds_handshake_sync = false;
        d->vm->handshake_syncs--;
        vhub_vm_handshake_sync_done(d->vm);
}

/* ---- handshake ---- */

/* Bit 21 is GPA_ADDRESSES, but SHMEM was drafted as bit 20 and rust-vmm's
 * vhost crate (<= 0.16) sets bit 21 for it: an offer of 21 without 22 most
 * likely means SHMEM.  Neither is used then (21 is never acked); say why. */
static void handshake_log_bit21(struct vhub_device *d, uint64_t offer) {
        if (!(offer & VHU_PF_BIT(VHU_PF_GPA_ADDRESSES)) || (offer & VHU_PF_BIT(VHU_PF_SHMEM)))
                return;
        device_log(d, LOG_WARNING, REQ(VHU_REQ_GET_PROTOCOL_FEATURES),
                   "back-end offers protocol feature 21 (GPA_ADDRESSES) without 22 (SHMEM): "
                   "likely a rust-vmm vhost crate <= 0.16 back-end that sets bit 21 meaning SHMEM; "
                   "bit 21 is never acked, so neither GPA addresses nor shared memory regions are used");
}

static int handshake_negotiate(struct vhub_device *d, struct vhub_op *op) {
        bool ack;
        uint64_t pf = 0;
        struct vhu_msg m;
        int r;

        if (op->hs_features & (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES)) {
                /* spec: INBAND_NOTIFICATIONS only with BACKEND_REQ and
                 * REPLY_ACK, GET_VRING_BASE_INFLIGHT only with INFLIGHT_SHMFD,
                 * GET_VRING_BASE_SKIP_DRAIN only with both */
                pf = vhu_protocol_features_consistent(op->hs_pf_offer &
                                                      VHUB_SUPPORTED_PROTOCOL_FEATURES);
                if (!op->restore) /* once per device */
                        handshake_log_bit21(d, op->hs_pf_offer);
        }
        if (op->restore) {
                if ((d->features & ~op->hs_features) != 0) {
                        op->give_up = true;
                        return device_op_error(op, VHUB_ERR_BACKEND, REQ(VHU_REQ_GET_FEATURES),
                                               "back-end now offers features 0x%llx, less than the 0x%llx it offered before",
                                               (unsigned long long)op->hs_features,
                                               (unsigned long long)d->features);
                }
                if ((d->protocol_features & ~pf) != 0) {
                        op->give_up = true;
                        return device_op_error(op, VHUB_ERR_BACKEND, REQ(VHU_REQ_GET_PROTOCOL_FEATURES),
                                               "back-end now offers protocol features 0x%llx, less than the 0x%llx negotiated before",
                                               (unsigned long long)op->hs_pf_offer,
                                               (unsigned long long)d->protocol_features);
                }
                pf = d->protocol_features; /* the same set as before */
        } else {
                d->features = op->hs_features;
        }
        d->protocol_features = pf;
        vhub_bconn_set_protocol_features(d->conn, 0);

        if (dev_protocol_features_on(d)) {
                vhu_msg_build_u64(&m, VHU_REQ_SET_PROTOCOL_FEATURES, false, pf);
                r = device_send(d, op, &m, 0);
                if (r < 0)
                        return r;
        }
        /* from here on replies follow the negotiated set */
        vhub_bconn_set_protocol_features(d->conn, pf);
        ack = device_need_reply(d);
        if (dev_has_pf(d, VHU_PF_MQ)) {
                vhu_msg_build_none(&m, VHU_REQ_GET_QUEUE_NUM, false);
                if ((r = device_send(d, op, &m, 0)) < 0)
                        return r;
        }
        vhu_msg_build_none(&m, VHU_REQ_SET_OWNER, ack);
        if ((r = device_send(d, op, &m, 0)) < 0)
                return r;
        if (dev_has_pf(d, VHU_PF_BACKEND_REQ)) {
                int fds[2], channel_r;

                if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, fds) < 0)
                        return device_op_error(op, VHUB_ERR_INTERNAL, REQ(VHU_REQ_SET_BACKEND_REQ_FD),
                                               "socketpair: %s", strerror(errno));
                channel_r = device_channel_open(d, fds[0]);
                if (channel_r < 0) {
                        vhu_safe_close(fds[1]);
                        return device_op_error(op, VHUB_ERR_INTERNAL, REQ(VHU_REQ_SET_BACKEND_REQ_FD),
                                               "cannot set up the back-end channel: %s",
                                               strerror(-channel_r));
                }
                vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_BACKEND_REQ_FD, ack, NULL, 0,
                              &fds[1], 1);
                r = device_send(d, op, &m, 0);
                vhu_safe_close(fds[1]); /* the writer holds its own copy */
                if (r < 0)
                        return r;
        }
        if (dev_has_pf(d, VHU_PF_CONFIGURE_MEM_SLOTS)) {
                vhu_msg_build_none(&m, VHU_REQ_GET_MAX_MEM_SLOTS, false);
                if ((r = device_send(d, op, &m, 0)) < 0)
                        return r;
        }
        if (dev_has_pf(d, VHU_PF_SHMEM)) {
                vhu_msg_build_none(&m, VHU_REQ_GET_SHMEM_CONFIG, false);
                if ((r = device_send(d, op, &m, 0)) < 0)
                        return r;
        }
        return 0;
}

/* GET_SHMEM_CONFIG's sizes (validated: nregions <= 256, page multiples).
 * spec: they "remain valid and unchanged for the entire lifetime of the
 * connection"; the VMM laid out its shared memory from the first ones, so
 * a restored back-end must report the same. */
static void handshake_on_shmem_config(struct vhub_device *d, struct vhub_op *op,
                                      const struct vhu_shmem_config *c) {
        size_t bytes = (size_t) c->nregions * sizeof(uint64_t);

        if (op->restore) {
                if (c->nregions != d->n_shmem ||
                    (bytes && memcmp(c->memory_sizes, d->shmem_sizes, bytes) != 0)) {
                        op->give_up = true;
                        device_op_error(op, VHUB_ERR_BACKEND, REQ(VHU_REQ_GET_SHMEM_CONFIG),
                                        "back-end now reports %u shared memory regions of other sizes than the %u it reported before",
                                        c->nregions, d->n_shmem);
                }
                return;
        }
        free(d->shmem_sizes);
        d->shmem_sizes = calloc(c->nregions ? c->nregions : 1, sizeof(uint64_t));
        if (!d->shmem_sizes) {
                device_op_error(op, VHUB_ERR_INTERNAL, REQ(VHU_REQ_GET_SHMEM_CONFIG), "out of memory");
                return;
        }
        if (bytes)
                memcpy(d->shmem_sizes, c->memory_sizes, bytes);
        d->n_shmem = c->nregions;
}

static int handshake_check(struct vhub_device *d, struct vhub_op *op) {
        unsigned want, limit;

        if (!dev_has_pf(d, VHU_PF_CONFIGURE_MEM_SLOTS))
                d->max_mem_slots = VHU_MEM_TABLE_MAX_REGIONS;
        if (d->max_mem_slots > VHUB_DAEMON_MEM_SLOTS)
                d->max_mem_slots = VHUB_DAEMON_MEM_SLOTS;
        if (op->restore)
                return 0;

        limit = VHUB_MAX_QUEUES;
        if (d->backend_queue_num) {
                limit = d->backend_queue_num;
                /* GET_QUEUE_NUM counts queue pairs for net back-ends */
                if (strcmp(d->type, "net") == 0)
                        limit = d->backend_queue_num * 2 + 1;
                if (limit > VHUB_MAX_QUEUES)
                        limit = VHUB_MAX_QUEUES;
        }
        want = d->requested_queues ? d->requested_queues
                                   : (d->backend_queue_num ? d->backend_queue_num : 1);
        if (want > VHUB_MAX_QUEUES)
                want = VHUB_MAX_QUEUES;
        if (want > limit)
                return device_op_error(op, VHUB_ERR_UNSUPPORTED, REQ(VHU_REQ_GET_QUEUE_NUM),
                                       "device %s: %u queues requested, the back-end supports %u",
                                       d->name, want, limit);
        d->queues = want;
        d->vrings = calloc(d->queues, sizeof(*d->vrings));
        if (!d->vrings)
                return device_op_error(op, VHUB_ERR_INTERNAL, NULL, "out of memory");
        for (unsigned i = 0; i < d->queues; i++) {
                d->vrings[i].index = i;
                d->vrings[i].kick_fd = d->vrings[i].call_fd = d->vrings[i].err_fd = -1;
        }
        if (d->vm->logging && (!dev_has_pf(d, VHU_PF_LOG_SHMFD) ||
                               !(d->features & (UINT64_C(1) << VHU_VIRTIO_F_LOG_ALL))))
                return device_op_error(op, VHUB_ERR_UNSUPPORTED, NULL,
                                       "VM %s is logging dirty memory and device %s cannot (needs LOG_SHMFD and VHOST_F_LOG_ALL)",
                                       d->vm->name, d->name);
        if (d->vm->mem.n > d->max_mem_slots)
                return device_op_error(op, VHUB_ERR_LIMIT, NULL,
                                       "VM %s has %zu memory regions; device %s takes at most %u",
                                       d->vm->name, d->vm->mem.n, d->name, d->max_mem_slots);
        return 0;
}

int handshake_stage(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_msg m;
        int r;

        switch (op->stage) {
        case 0:
                vhu_msg_build_none(&m, VHU_REQ_GET_FEATURES, false);
                vhub_bconn_set_protocol_features(d->conn, 0);
                return device_send(d, op, &m, 0) < 0 ? op->result : OP_STAGE_WAIT;
        case 1:
                if (!(op->hs_features & (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES)))
                        return OP_STAGE_NEXT;
                vhu_msg_build_none(&m, VHU_REQ_GET_PROTOCOL_FEATURES, false);
                return device_send(d, op, &m, 0) < 0 ? op->result : OP_STAGE_WAIT;
        case 2:
                r = handshake_negotiate(d, op);
                return r < 0 ? r : OP_STAGE_NEXT;
        case 3:
                /* park before the check: a resumed stage runs again, and
                 * handshake_check() allocates the vrings (once) */
                if (vhub_vm_memory_busy(d->vm)) {
                        op->parked = true; /* vhub_device_resume_parked() brings us back */
                        return OP_STAGE_WAIT;
                }
                r = handshake_check(d, op);
                if (r < 0)
                        return r;
                d->vm->handshake_syncs++;
                op->holds_handshake_sync = true;
                r = mem_sync_prepare(d, op);
                if (r < 0)
                        return r;
                r = mem_sync_send(d, op);
                return r < 0 ? r : OP_STAGE_NEXT;
        case 4:
                mem_sync_commit_unacked(d, op);
                d->mem_synced = true;
                release_handshake_sync(d, op);
                return OP_STAGE_DONE;
        }
        return OP_STAGE_DONE;
}

void handshake_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                               uint32_t tag, struct vhu_msg *reply) {
        switch (request) {
        case VHU_REQ_GET_FEATURES:
                op->hs_features = reply->payload.u64;
                break;
        case VHU_REQ_GET_PROTOCOL_FEATURES:
                op->hs_pf_offer = reply->payload.u64;
                break;
        case VHU_REQ_GET_QUEUE_NUM:
                if (reply->payload.u64 == 0) {
                        device_op_error(op, VHUB_ERR_BACKEND, REQ(request),
                                        "back-end reports 0 queues");
                        break;
                }
                if (op->restore && d->queues > 0 && reply->payload.u64 < d->backend_queue_num) {
                        op->give_up = true;
                        device_op_error(op, VHUB_ERR_BACKEND, REQ(request),
                                        "back-end now supports %llu queues, fewer than the %u before",
                                        (unsigned long long)reply->payload.u64, d->backend_queue_num);
                        break;
                }
                d->backend_queue_num = reply->payload.u64 > 0xffff ? 0xffff : (unsigned)reply->payload.u64;
                break;
        case VHU_REQ_GET_MAX_MEM_SLOTS:
                if (reply->payload.u64 == 0) {
                        device_op_error(op, VHUB_ERR_BACKEND, REQ(request),
                                        "back-end reports 0 memory slots");
                        break;
                }
                d->max_mem_slots = reply->payload.u64 > VHUB_DAEMON_MEM_SLOTS
                                           ? VHUB_DAEMON_MEM_SLOTS
                                           : (unsigned)reply->payload.u64;
                break;
        case VHU_REQ_GET_SHMEM_CONFIG:
                handshake_on_shmem_config(d, op, &reply->payload.shmem_config);
                break;
        case VHU_REQ_ADD_MEM_REG:
        case VHU_REQ_REM_MEM_REG:
        case VHU_REQ_SET_MEM_TABLE:
                mem_sync_on_reply(d, op, request, tag, reply);
                break;
        default:
                op_check_ack(d, op, request, reply);
                break;
        }
}

void handshake_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        release_handshake_sync(d, op);
        if (r == 0) /* device.stats: waiting for a memory change included */
                d->stats.handshake_usec = vhub_now_usec() - op->started_usec;
        if (!op->restore) {
                if (r < 0) {
                        d->destroy_pending = true;
                        op_complete_call(d, op, r);
                        return;
                }
                d->handshaken = true;
                device_set_state(d, VHUB_DEV_READY, "handshake done");
                /* a front-door device: its socket, now that its offer is known */
                if (dev_is_front_door(d) && vmm_open(d, &op->error) < 0) {
                        d->destroy_pending = true;
                        op_complete_call(d, op, vhub_error_errno(op->error.code));
                        return;
                }
                if (op->call) {
                        op->call->out.device_add.features = d->features;
                        op->call->out.device_add.protocol_features = d->protocol_features;
                        op->call->out.device_add.queues = d->queues;
                        op->call->out.device_add.max_mem_slots = d->max_mem_slots;
                        op->call->out.device_add.has_shmem = d->shmem_sizes != NULL;
                        op->call->out.device_add.n_shmem = d->n_shmem;
                        if (dev_is_front_door(d))
                                snprintf(op->call->out.device_add.vmm_socket,
                                         sizeof(op->call->out.device_add.vmm_socket), "%s",
                                         d->vmm->socket_path);
                        if (d->n_shmem)
                                memcpy(op->call->out.device_add.shmem_sizes, d->shmem_sizes,
                                       d->n_shmem * sizeof(uint64_t));
                }
                if (d->shmem_sizes)
                        device_log(d, LOG_INFO, REQ(VHU_REQ_GET_SHMEM_CONFIG),
                                   "%u shared memory regions", d->n_shmem);
                device_log(d, LOG_INFO, NULL,
                           "handshake done: features 0x%llx, protocol features 0x%llx, %u queues, %u memory slots",
                           (unsigned long long)d->features, (unsigned long long)d->protocol_features,
                           d->queues, d->max_mem_slots);
                op_complete_call(d, op, 0);
                return;
        }
        if (r < 0) {
                device_restore_failed(d, op);
                return;
        }
        if (!op->restore_continues)
                device_restored(d, NULL, 0, true);
}
