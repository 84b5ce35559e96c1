/* SPDX-License-Identifier: MIT */
/*
 * The single-request ops: GET/SET_CONFIG, one acked request (RARP, MTU,
 * device state), and GET_SHARED_OBJECT for another device's lookup.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhub-device-internal.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

/* ---- config ---- */

int config_stage(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_msg m;
        int r;

        if (op->stage > 0)
                return OP_STAGE_DONE;
        if (op->kind == VHUB_OP_CONFIG_GET)
                r = vhu_msg_build_config(&m, VHU_REQ_GET_CONFIG, false, op->u.config.offset,
                                         op->u.config.size, 0, NULL);
        else
                r = vhu_msg_build_config(&m, VHU_REQ_SET_CONFIG, device_need_reply(d),
                                         op->u.config.offset, op->u.config.size,
                                         VHU_CONFIG_FLAG_WRITABLE, op->u.config.data);
        if (r < 0)
                return device_op_error(op, VHUB_ERR_PARAMS, NULL, "bad config access: %s",
                                       strerror(-r));
        return device_send(d, op, &m, 0) < 0 ? op->result : OP_STAGE_NEXT;
}

void config_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                            uint32_t tag, struct vhu_msg *reply) {
        if (request != VHU_REQ_GET_CONFIG) {
                op_check_ack(d, op, request, reply);
                return;
        }
        if (reply->hdr.size != VHU_CONFIG_HEADER_SIZE + op->u.config.size ||
            reply->payload.config.size != op->u.config.size ||
            reply->payload.config.offset != op->u.config.offset) {
                device_op_error(op, VHUB_ERR_BACKEND, REQ(request),
                                "back-end failed GET_CONFIG of %u bytes at offset %u",
                                op->u.config.size, op->u.config.offset);
                return;
        }
        memcpy(op->u.config.data, reply->payload.config.data, op->u.config.size);
}

/* ---- single request ---- */

/* A kick queued behind a stop must not go out: libvhost-user starts a
 * stopped ring on VRING_KICK. */
static bool single_kick_ring_stopped(const struct vhub_device *d, const struct vhub_op *op,
                                     uint32_t *ret_index) {
        struct vhu_vring_state st;

        memcpy(&st, op->u.single.payload, sizeof(st));
        *ret_index = st.index;
        return d->state != VHUB_DEV_RUNNING || st.index >= d->queues || !d->vrings[st.index].configured;
}

int single_stage(struct vhub_device *d, struct vhub_op *op) {
        uint32_t index;
        struct vhu_msg m;
        int r;

        if (op->stage > 0)
                return OP_STAGE_DONE;
        /* checked when it runs: a START queued before it may ack the bit */
        if (op->u.single.request == VHU_REQ_IOTLB_MSG && !features_iommu(d->acked_features))
                return device_op_error(op, VHUB_ERR_UNSUPPORTED, REQ(op->u.single.request),
                                       "device %s: VIRTIO_F_IOMMU_PLATFORM is not acked (start the device with it)",
                                       d->name);
        if (op->u.single.request == VHU_REQ_VRING_KICK && single_kick_ring_stopped(d, op, &index))
                return device_op_error(op, VHUB_ERR_STATE, REQ(VHU_REQ_VRING_KICK),
                                       "device %s: ring %u stopped before the kick could be sent",
                                       d->name, index);
        r = vhu_msg_build(&m, VHU_DIR_FRONTEND, op->u.single.request, device_need_reply(d),
                          op->u.single.payload, op->u.single.size,
                          op->u.single.fd >= 0 ? &op->u.single.fd : NULL,
                          op->u.single.fd >= 0 ? 1 : 0);
        if (r < 0)
                return device_op_error(op, VHUB_ERR_INTERNAL, REQ(op->u.single.request),
                                       "cannot build %s: %s", REQ(op->u.single.request),
                                       strerror(-r));
        return device_send(d, op, &m, 0) < 0 ? op->result : OP_STAGE_NEXT;
}

/* The back-end's session id, or a refusal (a negative virtio-crypto status). */
static void crypto_session_on_reply(struct vhub_op *op, const struct vhu_msg *reply) {
        int64_t id;

        if (reply->hdr.size != sizeof(struct vhu_crypto_session)) {
                device_op_error(op, VHUB_ERR_BACKEND, REQ(VHU_REQ_CREATE_CRYPTO_SESSION),
                                "back-end answered CREATE_CRYPTO_SESSION with %u bytes, not the %zu of a session description",
                                reply->hdr.size, sizeof(struct vhu_crypto_session));
                return;
        }
        id = reply->payload.crypto_session.session_id;
        if (id < 0) {
                /* virtio-crypto's status codes (VIRTIO_CRYPTO_ERR ... INVSESS) */
                static const char *const status[] = { "", ": error", ": bad message", ": not supported",
                                                      ": invalid session" };

                device_op_error(op, VHUB_ERR_BACKEND, REQ(VHU_REQ_CREATE_CRYPTO_SESSION),
                                "back-end refused the crypto session (virtio-crypto status %lld%s)",
                                (long long)-id, -id < 5 ? status[-id] : "");
                return;
        }
        op->u.single.u64 = (uint64_t)id;
}

void single_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                            uint32_t tag, struct vhu_msg *reply) {
        if (request == VHU_REQ_CREATE_CRYPTO_SESSION) {
                crypto_session_on_reply(op, reply);
                return;
        }
        if (request != VHU_REQ_SET_DEVICE_STATE_FD) {
                op_check_ack(d, op, request, reply);
                return;
        }
        /* bits 0-7: error; bit 8: no fd of the back-end's own */
        if ((reply->payload.u64 & 0xff) != 0) {
                device_op_error(op, VHUB_ERR_BACKEND, REQ(request),
                                "back-end refused SET_DEVICE_STATE_FD (status %llu)",
                                (unsigned long long)(reply->payload.u64 & 0xff));
                return;
        }
        if (!(reply->payload.u64 & VHU_DEVICE_STATE_NOFD_MASK) && reply->n_fds == 1) {
                vhu_safe_close(op->u.single.fd);
                /* the back-end's own channel: handed to the VMM in the result */
                op->u.single.fd = vhu_msg_take_fd(reply, 0);
                op->u.single.u64 = 1;
        }
}

void single_free(struct vhub_op *op) {
        free(op->u.single.payload);
}

/* ---- GET_SHARED_OBJECT (this device exports what another looks up) ---- */

int get_shared_stage(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_msg m;
        int r;

        if (op->stage > 0)
                return OP_STAGE_DONE;
        r = vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_GET_SHARED_OBJECT, false, op->u.shared.uuid, 16,
                          NULL, 0);
        if (r < 0)
                return device_op_error(op, VHUB_ERR_INTERNAL, REQ(VHU_REQ_GET_SHARED_OBJECT),
                                       "cannot build GET_SHARED_OBJECT: %s", strerror(-r));
        return device_send(d, op, &m, 0) < 0 ? op->result : OP_STAGE_NEXT;
}

void get_shared_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                                uint32_t tag, struct vhu_msg *reply) {
        /* libvhost-user echoes the UUID; others answer a u64 (0 = success) */
        bool ok = reply->n_fds == 1 &&
                  ((reply->hdr.size == 16 && memcmp(reply->payload.shared.uuid, op->u.shared.uuid, 16) == 0) ||
                   (reply->hdr.size == 8 && reply->payload.u64 == 0));

        if (!ok) {
                /* a refusal, not a protocol violation: the lookup just fails */
                op->u.shared.fd = -1;
                return;
        }
        op->u.shared.fd = vhu_msg_take_fd(reply, 0);
}

void config_get_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (r == 0 && op->call) {
                op->call->out.config_get.size = op->u.config.size;
                memcpy(op->call->out.config_get.data, op->u.config.data, op->u.config.size);
        }
        op_complete_call(d, op, r);
}

void get_shared_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        struct vhub_device *req = vhub_vm_find_device(d->vm, op->u.shared.requester);
        /* handed over below, or closed (op_free() closes a failed op's) */
        int fd = r == 0 ? VHU_TAKE_FD(op->u.shared.fd) : -1;

        if (req)
                device_shared_lookup_done(req, op->u.shared.token, fd);
        else
                vhu_safe_close(fd);
}

void single_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (r == 0 && op->call && op->u.single.request == VHU_REQ_CREATE_CRYPTO_SESSION)
                op->call->out.crypto_session.session_id = op->u.single.u64;
        if (r == 0 && op->call && op->u.single.request == VHU_REQ_SET_DEVICE_STATE_FD) {
                op->call->out.state_fd.fd = op->u.single.u64 ? VHU_TAKE_FD(op->u.single.fd) : -1;
        }
        op_complete_call(d, op, r);
}
