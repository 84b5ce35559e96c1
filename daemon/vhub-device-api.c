/* SPDX-License-Identifier: MIT */
/*
 * The device calls the model offers (start, stop, config, reset, net,
 * state transfer, and the ops the VM queues): validation, then an op.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhub-device-internal.h"
#include "vhub-eventfd.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

/* fds a start takes in every case: closed when no op took them. */
static void vring_params_close(struct vhub_vring_params *vp, unsigned n) {
        for (unsigned i = 0; i < n; i++) {
                vp[i].kick_fd = vhu_safe_close(vp[i].kick_fd);
                vp[i].call_fd = vhu_safe_close(vp[i].call_fd);
                vp[i].err_fd = vhu_safe_close(vp[i].err_fd);
        }
}

/* spec "Vring descriptor indices for packed virtqueues": a packed ring
 * starts at index 0 with both wrap counters 1 (virtio 1.1 "Driver and
 * Device Ring Wrap Counters": each "initialized to 1"); 0 would start the
 * back-end a lap behind the driver's first descriptors. */
static uint32_t start_default_base(uint64_t features) {
        return features_packed(features) ? UINT32_C(0x80008000) : 0;
}

/* The rings move into the op at once: whatever happens next, op_free()
 * closes their fds unless the start commits them. */
static int start_take_rings(struct vhub_op *op, uint64_t features, struct vhub_vring_params *vp,
                            unsigned n) {
        op->u.start.vrings = calloc(n ? n : 1, sizeof(struct vhub_vring));
        if (!op->u.start.vrings)
                return -ENOMEM;
        op->u.start.features = features;
        op->u.start.n_vrings = n;
        for (unsigned i = 0; i < n; i++)
                op->u.start.vrings[i] = (struct vhub_vring){
                        .configured = true,
                        .index = vp[i].index,
                        .size = vp[i].size,
                        .desc = vp[i].desc,
                        .avail = vp[i].avail,
                        .used = vp[i].used,
                        .base = vp[i].base_given ? vp[i].base : start_default_base(features),
                        .kick_fd = VHU_TAKE_FD(vp[i].kick_fd),
                        .call_fd = VHU_TAKE_FD(vp[i].call_fd),
                        .err_fd = VHU_TAKE_FD(vp[i].err_fd),
                };
        return 0;
}

/* What device.start checks of each ring before anything is sent. */
static int start_check_ring(struct vhub_device *d, uint64_t features, unsigned i,
                            const struct vhub_vring *v, bool seen[VHUB_MAX_QUEUES], struct vhub_error *err) {
        struct vhu_vring_addr dummy;

        if (v->index >= d->queues || seen[v->index])
                return vhub_error_set(err, VHUB_ERR_PARAMS, "vrings[%u].index %u is out of range or repeated",
                                      i, v->index);
        seen[v->index] = true;
        /* virtio "Packed Virtqueues": any size up to 32768; a split ring's
         * is a power of 2 */
        if (v->size == 0 || v->size > 32768 || (!features_packed(features) && (v->size & (v->size - 1))))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "vrings[%u].size must be %s up to 32768", i,
                                      features_packed(features) ? "1" : "a power of 2");
        if (!features_packed(features) && v->base > 0xffff)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "vrings[%u].base 0x%x is no split ring index (at most 65535)", i, v->base);
        if (features_packed(features) && ((v->base & 0x7fff) >= v->size || ((v->base >> 16) & 0x7fff) >= v->size))
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "vrings[%u].base 0x%x: a packed ring's avail and used indexes (bits 0-14, 16-30) must be below its size %u",
                                      i, v->base, v->size);
        if (v->call_fd < 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "vrings[%u] needs a call fd", i);
        /* spec SET_VRING_KICK "invalid FD flag": no kick fd, the VMM
         * kicks in-band (device.kick -> VRING_KICK) */
        if (v->kick_fd < 0 && !dev_has_pf(d, VHU_PF_INBAND_NOTIFICATIONS))
                return vhub_error_set(err, VHUB_ERR_UNSUPPORTED,
                                      "vrings[%u] has no kick fd and device %s's back-end has no INBAND_NOTIFICATIONS protocol feature",
                                      i, d->name);
        /* the daemon writes to them (the start kick, in-band calls): a
         * full blocking pipe in their place would stall the loop */
        if ((v->kick_fd >= 0 && !vhub_fd_is_eventfd(v->kick_fd)) || !vhub_fd_is_eventfd(v->call_fd) ||
            (v->err_fd >= 0 && !vhub_fd_is_eventfd(v->err_fd)))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "vrings[%u].%s must be an eventfd", i,
                                      v->kick_fd >= 0 && !vhub_fd_is_eventfd(v->kick_fd) ? "kick"
                                      : !vhub_fd_is_eventfd(v->call_fd)                  ? "call"
                                                                                 : "err");
        if (v->desc % 16 || v->avail % (features_packed(features) ? 4 : 2) || v->used % 4)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "vrings[%u]: desc must be 16-, avail %d- and used 4-byte aligned", i,
                                      features_packed(features) ? 4 : 2);
        if (vring_addr(d->vm, features, v->index, v->size, v->desc, v->avail, v->used,
                       &dummy) < 0)
                return vhub_error_set(err, VHUB_ERR_REGION,
                                      "vrings[%u]: desc, avail and used must each lie inside one memory region", i);
        return 0;
}

void vhub_device_start(struct vhub_device *d, uint64_t features, struct vhub_vring_params *vp,
                       unsigned n, struct vhub_call *call) {
        bool seen[VHUB_MAX_QUEUES] = { false };
        struct vhub_error err = { 0 };
        struct vhub_op *op;

        op = device_submit(d, VHUB_OP_START, call);
        if (!op) {
                vring_params_close(vp, n);
                return;
        }
        if (start_take_rings(op, features, vp, n) < 0) {
                vring_params_close(vp, n);
                op_refusef(op, VHUB_ERR_INTERNAL, "out of memory");
                return;
        }
        if (n == 0 || n > d->queues) {
                op_refusef(op, VHUB_ERR_PARAMS, "vrings: %u given, device %s has %u queues", n, d->name,
                           d->queues);
                return;
        }
        for (unsigned i = 0; i < n; i++)
                if (start_check_ring(d, features, i, &op->u.start.vrings[i], seen, &err) < 0) {
                        op_refuse(op, &err);
                        return;
                }
        device_queue_op(d, op);
}

void vhub_device_stop(struct vhub_device *d, bool drain, struct vhub_call *call) {
        const uint64_t skip_drain = VHU_PF_BIT(VHU_PF_GET_VRING_BASE_SKIP_DRAIN) |
                                    vhu_protocol_feature_requires(VHU_PF_GET_VRING_BASE_SKIP_DRAIN);
        struct vhub_op *op = device_submit(d, VHUB_OP_STOP, call);

        if (!op)
                return;
        if (!drain && (d->protocol_features & skip_drain) != skip_drain) {
                op_refusef(op, VHUB_ERR_UNSUPPORTED,
                           "device %s: a stop without draining needs the GET_VRING_BASE_SKIP_DRAIN, GET_VRING_BASE_INFLIGHT and INFLIGHT_SHMFD protocol features; the back-end negotiated 0x%llx",
                           d->name, (unsigned long long)d->protocol_features);
                return;
        }
        op->u.stop.skip_drain = !drain;
        device_queue_op(d, op);
}

static void config_queue(struct vhub_device *d, enum vhub_op_kind kind, uint32_t offset,
                         const void *data, uint32_t size, struct vhub_call *call) {
        struct vhub_op *op = device_submit(d, kind, call);

        if (!op)
                return;
        if (!dev_has_pf(d, VHU_PF_CONFIG)) {
                op_refusef(op, VHUB_ERR_UNSUPPORTED, "device %s: the back-end has no CONFIG protocol feature",
                           d->name);
                return;
        }
        if (size == 0 || size > VHU_MAX_CONFIG_SIZE || offset > VHU_MAX_CONFIG_SIZE ||
            offset + size > VHU_MAX_CONFIG_SIZE) {
                op_refusef(op, VHUB_ERR_PARAMS, "config access of %u bytes at offset %u is outside 0..%u",
                           size, offset, VHU_MAX_CONFIG_SIZE);
                return;
        }
        op->u.config.offset = offset;
        op->u.config.size = size;
        if (data)
                memcpy(op->u.config.data, data, size);
        device_queue_op(d, op);
}

void vhub_device_config_get(struct vhub_device *d, uint32_t offset, uint32_t size,
                            struct vhub_call *call) {
        config_queue(d, VHUB_OP_CONFIG_GET, offset, NULL, size, call);
}

void vhub_device_config_set(struct vhub_device *d, uint32_t offset, const void *data,
                            uint32_t size, struct vhub_call *call) {
        config_queue(d, VHUB_OP_CONFIG_SET, offset, data, size, call);
}

int vhub_device_queue_mem_sync(struct vhub_device *d, struct vhub_mem_op *mem_op) {
        struct vhub_op *op = op_new(VHUB_OP_MEM_SYNC, NULL);

        if (!op)
                return -ENOMEM;
        op->mem_op = mem_op;
        device_queue_op(d, op);
        return 0;
}

int vhub_device_queue_log(struct vhub_device *d, struct vhub_vm_batch *batch, bool enable) {
        struct vhub_op *op = op_new(VHUB_OP_LOG, NULL);

        if (!op)
                return -ENOMEM;
        op->u.log.batch = batch;
        op->u.log.enable = enable;
        device_queue_op(d, op);
        return 0;
}

int vhub_device_queue_get_shared(struct vhub_device *d, const uint8_t uuid[16], const char *requester,
                                 uint64_t token) {
        struct vhub_op *op = op_new(VHUB_OP_GET_SHARED, NULL);

        if (!op)
                return -ENOMEM;
        memcpy(op->u.shared.uuid, uuid, 16);
        snprintf(op->u.shared.requester, sizeof(op->u.shared.requester), "%s", requester);
        op->u.shared.token = token;
        op->u.shared.fd = -1;
        device_queue_op(d, op);
        return 0;
}

void vhub_device_reset(struct vhub_device *d, struct vhub_call *call) {
        struct vhub_op *op = device_submit(d, VHUB_OP_RESET, call);

        if (op)
                device_queue_op(d, op);
}

/* One request of a SINGLE op that passed the gate, with an optional fd
 * (taken), gated on a protocol feature. */
static void single_queue(struct vhub_device *d, struct vhub_op *op, uint32_t request, unsigned feature,
                         const void *payload, uint32_t size, int fd) {
        op->u.single.request = request;
        op->u.single.fd = fd;
        if (feature != UINT_MAX && !dev_has_pf(d, feature)) {
                op_refusef(op, VHUB_ERR_UNSUPPORTED,
                           "device %s: the back-end has no %s protocol feature (needed for %s)", d->name,
                           vhu_protocol_feature_name(feature), REQ(request));
                return;
        }
        if (size && !(op->u.single.payload = malloc(size))) {
                op_refusef(op, VHUB_ERR_INTERNAL, "out of memory");
                return;
        }
        if (size)
                memcpy(op->u.single.payload, payload, size);
        op->u.single.size = size;
        device_queue_op(d, op);
}

/* The same for a call that checks nothing else; fd taken in every case. */
static void queue_single(struct vhub_device *d, uint32_t request, unsigned feature, const void *payload,
                         uint32_t size, int fd, struct vhub_call *call) {
        struct vhub_op *op = device_submit(d, VHUB_OP_SINGLE, call);

        if (!op) {
                vhu_safe_close(fd);
                return;
        }
        single_queue(d, op, request, feature, payload, size, fd);
}

void vhub_device_send_rarp(struct vhub_device *d, const uint8_t mac[6], struct vhub_call *call) {
        uint8_t payload[8] = { 0 };

        memcpy(payload, mac, 6); /* spec: the first 6 bytes hold the MAC */
        queue_single(d, VHU_REQ_SEND_RARP, VHU_PF_RARP, payload, 8, -1, call);
}

void vhub_device_set_mtu(struct vhub_device *d, uint16_t mtu, struct vhub_call *call) {
        uint64_t v = mtu;

        queue_single(d, VHU_REQ_NET_SET_MTU, VHU_PF_NET_MTU, &v, 8, -1, call);
}

void vhub_device_kick(struct vhub_device *d, uint32_t index, struct vhub_call *call) {
        struct vhu_vring_state st = { .index = index, .num = 0 };
        struct vhub_op *op = device_submit(d, VHUB_OP_SINGLE, call);

        if (!op)
                return;
        /* spec "In-band notifications" */
        if (!dev_has_pf(d, VHU_PF_INBAND_NOTIFICATIONS)) {
                op_refusef(op, VHUB_ERR_UNSUPPORTED,
                           "device %s: the back-end has no INBAND_NOTIFICATIONS protocol feature (needed for VRING_KICK)",
                           d->name);
                return;
        }
        if (d->state != VHUB_DEV_RUNNING) {
                op_refusef(op, VHUB_ERR_STATE, "device %s is %s; a kick needs running", d->name,
                           vhub_device_state_to_string(d->state));
                return;
        }
        if (index >= d->queues || !d->vrings[index].configured) {
                op_refusef(op, VHUB_ERR_PARAMS, "'index': ring %u of device %s was not started", index, d->name);
                return;
        }
        single_queue(d, op, VHU_REQ_VRING_KICK, VHU_PF_INBAND_NOTIFICATIONS, &st, sizeof(st), -1);
}

void vhub_device_state_fd(struct vhub_device *d, bool load, int fd, struct vhub_call *call) {
        struct vhu_device_state st = {
                .direction = load ? VHU_TRANSFER_LOAD : VHU_TRANSFER_SAVE,
                .phase = VHU_TRANSFER_PHASE_STOPPED,
        };
        struct vhub_op *op = device_submit(d, VHUB_OP_SINGLE, call);

        if (!op) {
                vhu_safe_close(fd);
                return;
        }
        op->u.single.fd = fd; /* op_refuse() closes it */
        /* spec "Migrating back-end state": only the stopped phase exists */
        if (d->state == VHUB_DEV_RUNNING) {
                op_refusef(op, VHUB_ERR_STATE, "device %s is running; stop it before transferring state",
                           d->name);
                return;
        }
        single_queue(d, op, VHU_REQ_SET_DEVICE_STATE_FD, VHU_PF_DEVICE_STATE, &st, sizeof(st), fd);
}

void vhub_device_check_state(struct vhub_device *d, struct vhub_call *call) {
        queue_single(d, VHU_REQ_CHECK_DEVICE_STATE, VHU_PF_DEVICE_STATE, NULL, 0, -1, call);
}

void vhub_device_crypto_create(struct vhub_device *d, const struct vhu_crypto_session *s,
                               struct vhub_call *call) {
        queue_single(d, VHU_REQ_CREATE_CRYPTO_SESSION, VHU_PF_CRYPTO_SESSION, s, sizeof(*s), -1, call);
}

void vhub_device_crypto_close(struct vhub_device *d, uint64_t session_id, struct vhub_call *call) {
        queue_single(d, VHU_REQ_CLOSE_CRYPTO_SESSION, VHU_PF_CRYPTO_SESSION, &session_id,
                     sizeof(session_id), -1, call);
}

void vhub_device_gpu_set_socket(struct vhub_device *d, int fd, struct vhub_call *call) {
        /* spec: no protocol feature gates GPU_SET_SOCKET */
        queue_single(d, VHU_REQ_GPU_SET_SOCKET, UINT_MAX, NULL, 0, fd, call);
}

/* Whether [uaddr, uaddr + size) lies inside one region, in the VMM's addresses. */
static bool uaddr_in_memory(const struct vhub_vm *vm, uint64_t uaddr, uint64_t size) {
        for (size_t i = 0; i < vm->mem.n; i++) {
                const struct vhub_region *r = &vm->mem.regions[i];

                if (uaddr >= r->uaddr && size <= r->size && uaddr - r->uaddr <= r->size - size)
                        return true;
        }
        return false;
}

void vhub_device_iotlb(struct vhub_device *d, const struct vhu_iotlb *msg, struct vhub_call *call) {
        struct vhub_op *op = device_submit(d, VHUB_OP_SINGLE, call);

        if (!op)
                return;
        /* spec "IOMMU support": misses come over the back-end channel, and
         * QEMU refuses an IOMMU without BACKEND_REQ and REPLY_ACK too */
        if (!dev_has_pf(d, VHU_PF_BACKEND_REQ) || !dev_has_pf(d, VHU_PF_REPLY_ACK)) {
                op_refusef(op, VHUB_ERR_UNSUPPORTED,
                           "device %s: IOTLB messages need the BACKEND_REQ and REPLY_ACK protocol features",
                           d->name);
                return;
        }
        if (!features_iommu(d->features)) {
                op_refusef(op, VHUB_ERR_UNSUPPORTED,
                           "device %s: the back-end does not offer VIRTIO_F_IOMMU_PLATFORM", d->name);
                return;
        }
        if (msg->type == VHU_IOTLB_UPDATE && !uaddr_in_memory(d->vm, msg->uaddr, msg->size)) {
                /* spec: "Addresses and size must be within vhost memory regions" */
                op_refusef(op, VHUB_ERR_REGION,
                           "uaddr 0x%llx + size 0x%llx does not lie inside one of the VM's memory regions",
                           (unsigned long long)msg->uaddr, (unsigned long long)msg->size);
                return;
        }
        single_queue(d, op, VHU_REQ_IOTLB_MSG, VHU_PF_REPLY_ACK, msg, sizeof(*msg), -1);
}

int vhub_device_queue_postcopy(struct vhub_device *d, struct vhub_vm_batch *batch,
                               enum vhub_postcopy_step step) {
        struct vhub_op *op = op_new(VHUB_OP_POSTCOPY, NULL);

        if (!op)
                return -ENOMEM;
        op->u.postcopy.batch = batch;
        op->u.postcopy.step = step;
        op->u.postcopy.ufd = -1;
        device_queue_op(d, op);
        return 0;
}
