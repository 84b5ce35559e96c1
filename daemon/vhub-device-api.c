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
#include "vhub-vm.h"

static bool is_eventfd(int fd) {
        char path[64], target[64];
        ssize_t n;

        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        n = readlink(path, target, sizeof(target) - 1);
        if (n < 0)
                return false;
        target[n] = '\0';
        return strcmp(target, "anon_inode:[eventfd]") == 0;
}

static bool device_check_usable(struct vhub_device *d, struct vhub_call *call) {
        struct vhub_error err;

        if (d->removing) {
                vhub_error_set(&err, VHUB_ERR_NO_DEVICE, "device %s is being removed", d->name);
                vhub_call_fail(call, &err);
                return false;
        }
        /* an outage (a restore attempt included) fails every call at once with
         * -32006, not -32004, and nothing waits behind a restore attempt */
        if (d->state == VHUB_DEV_DISCONNECTED || d->state == VHUB_DEV_FAILED ||
            (d->state == VHUB_DEV_CONNECTING && d->handshaken)) {
                vhub_error_set_backend(&err, VHUB_ERR_BACKEND, d->name, NULL,
                                       d->state == VHUB_DEV_FAILED
                                               ? "device %s has failed; remove and add it again"
                                               : "device %s is disconnected; its back-end is being reconnected",
                                       d->name);
                vhub_call_fail(call, &err);
                return false;
        }
        return true;
}

void vhub_device_start(struct vhub_device *d, uint64_t features, struct vhub_vring_params *vp,
                       unsigned n, struct vhub_call *call) {
        struct vhub_error err = { 0 };
        struct vhub_op *op = NULL;
        bool seen[VHUB_MAX_QUEUES] = { false };

        if (!device_check_usable(d, call))
                goto close_fds;
        if (d->state != VHUB_DEV_READY && d->state != VHUB_DEV_STOPPED) {
                vhub_error_set(&err, VHUB_ERR_STATE, "device %s is %s; start needs ready or stopped",
                               d->name, vhub_device_state_to_string(d->state));
                goto fail;
        }
        if (n == 0 || n > d->queues) {
                vhub_error_set(&err, VHUB_ERR_PARAMS, "vrings: %u given, device %s has %u queues", n,
                               d->name, d->queues);
                goto fail;
        }
        for (unsigned i = 0; i < n; i++) {
                struct vhu_vring_addr dummy;

                if (vp[i].index >= d->queues || seen[vp[i].index]) {
                        vhub_error_set(&err, VHUB_ERR_PARAMS, "vrings[%u].index %u is out of range or repeated",
                                       i, vp[i].index);
                        goto fail;
                }
                seen[vp[i].index] = true;
                if (vp[i].size == 0 || vp[i].size > 32768 || (vp[i].size & (vp[i].size - 1))) {
                        vhub_error_set(&err, VHUB_ERR_PARAMS,
                                       "vrings[%u].size must be a power of 2 up to 32768", i);
                        goto fail;
                }
                if (vp[i].call_fd < 0) {
                        vhub_error_set(&err, VHUB_ERR_PARAMS, "vrings[%u] needs a call fd", i);
                        goto fail;
                }
                /* spec SET_VRING_KICK "invalid FD flag": no kick fd, the VMM
                 * kicks in-band (device.kick -> VRING_KICK) */
                if (vp[i].kick_fd < 0 && !dev_has_pf(d, VHU_PF_INBAND_NOTIFICATIONS)) {
                        vhub_error_set(&err, VHUB_ERR_UNSUPPORTED,
                                       "vrings[%u] has no kick fd and device %s's back-end has no INBAND_NOTIFICATIONS protocol feature",
                                       i, d->name);
                        goto fail;
                }
                /* the daemon writes to them (the start kick, in-band calls): a
                 * full blocking pipe in their place would stall the loop */
                if ((vp[i].kick_fd >= 0 && !is_eventfd(vp[i].kick_fd)) || !is_eventfd(vp[i].call_fd) ||
                    (vp[i].err_fd >= 0 && !is_eventfd(vp[i].err_fd))) {
                        vhub_error_set(&err, VHUB_ERR_PARAMS, "vrings[%u].%s must be an eventfd", i,
                                       vp[i].kick_fd >= 0 && !is_eventfd(vp[i].kick_fd) ? "kick"
                                       : !is_eventfd(vp[i].call_fd)                     ? "call"
                                                                                        : "err");
                        goto fail;
                }
                if (vp[i].desc % 16 || vp[i].avail % 2 || vp[i].used % 4) {
                        vhub_error_set(&err, VHUB_ERR_PARAMS,
                                       "vrings[%u]: desc must be 16-, avail 2- and used 4-byte aligned", i);
                        goto fail;
                }
                if (vring_addr(d->vm, features_iommu(features), vp[i].index, vp[i].size, vp[i].desc,
                               vp[i].avail, vp[i].used, &dummy) < 0) {
                        vhub_error_set(&err, VHUB_ERR_REGION,
                                       "vrings[%u]: desc, avail and used must each lie inside one memory region", i);
                        goto fail;
                }
        }
        op = device_op_new(VHUB_OP_START, call);
        if (!op || !(op->u.start.vrings = calloc(n, sizeof(struct vhub_vring)))) {
                free(op);
                op = NULL;
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        op->u.start.features = features;
        op->u.start.n_vrings = n;
        for (unsigned i = 0; i < n; i++) {
                struct vhub_vring *v = &op->u.start.vrings[i];

                v->configured = true;
                v->index = vp[i].index;
                v->size = vp[i].size;
                v->desc = vp[i].desc;
                v->avail = vp[i].avail;
                v->used = vp[i].used;
                v->base = vp[i].base;
                v->kick_fd = vp[i].kick_fd;
                v->call_fd = vp[i].call_fd;
                v->err_fd = vp[i].err_fd;
                vp[i].kick_fd = vp[i].call_fd = vp[i].err_fd = -1;
        }
        device_queue_op(d, op);
        return;

fail:
        vhub_call_fail(call, &err);
close_fds:
        for (unsigned i = 0; i < n; i++) {
                struct vhub_vring tmp = { .kick_fd = vp[i].kick_fd, .call_fd = vp[i].call_fd,
                                          .err_fd = vp[i].err_fd };

                vring_close_fds(&tmp);
                vp[i].kick_fd = vp[i].call_fd = vp[i].err_fd = -1;
        }
}

void vhub_device_stop(struct vhub_device *d, bool drain, struct vhub_call *call) {
        const uint64_t skip_drain = VHU_PF_BIT(VHU_PF_GET_VRING_BASE_SKIP_DRAIN) |
                                    vhu_protocol_feature_requires(VHU_PF_GET_VRING_BASE_SKIP_DRAIN);
        struct vhub_error err;
        struct vhub_op *op;

        if (!device_check_usable(d, call))
                return;
        if (!drain && (d->protocol_features & skip_drain) != skip_drain) {
                vhub_error_set(&err, VHUB_ERR_UNSUPPORTED,
                               "device %s: a stop without draining needs the GET_VRING_BASE_SKIP_DRAIN, GET_VRING_BASE_INFLIGHT and INFLIGHT_SHMFD protocol features; the back-end negotiated 0x%llx",
                               d->name, (unsigned long long)d->protocol_features);
                vhub_call_fail(call, &err);
                return;
        }
        if (d->state != VHUB_DEV_RUNNING) {
                vhub_error_set(&err, VHUB_ERR_STATE, "device %s is %s; stop needs running", d->name,
                               vhub_device_state_to_string(d->state));
                vhub_call_fail(call, &err);
                return;
        }
        op = device_op_new(VHUB_OP_STOP, call);
        if (!op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                vhub_call_fail(call, &err);
                return;
        }
        op->u.stop.skip_drain = !drain;
        device_queue_op(d, op);
}

static void config_queue(struct vhub_device *d, enum vhub_op_kind kind, uint32_t offset,
                         const void *data, uint32_t size, struct vhub_call *call) {
        struct vhub_error err;
        struct vhub_op *op;

        if (!device_check_usable(d, call))
                return;
        if (!dev_has_pf(d, VHU_PF_CONFIG)) {
                vhub_error_set(&err, VHUB_ERR_UNSUPPORTED,
                               "device %s: the back-end has no CONFIG protocol feature", d->name);
                vhub_call_fail(call, &err);
                return;
        }
        if (size == 0 || size > VHU_MAX_CONFIG_SIZE || offset > VHU_MAX_CONFIG_SIZE ||
            offset + size > VHU_MAX_CONFIG_SIZE) {
                vhub_error_set(&err, VHUB_ERR_PARAMS,
                               "config access of %u bytes at offset %u is outside 0..%u", size, offset,
                               VHU_MAX_CONFIG_SIZE);
                vhub_call_fail(call, &err);
                return;
        }
        op = device_op_new(kind, call);
        if (!op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                vhub_call_fail(call, &err);
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
        struct vhub_op *op = device_op_new(VHUB_OP_MEM_SYNC, NULL);

        if (!op)
                return -ENOMEM;
        op->mem_op = mem_op;
        device_queue_op(d, op);
        return 0;
}

int vhub_device_queue_log(struct vhub_device *d, struct vhub_vm_batch *batch, bool enable) {
        struct vhub_op *op = device_op_new(VHUB_OP_LOG, NULL);

        if (!op)
                return -ENOMEM;
        op->u.log.batch = batch;
        op->u.log.enable = enable;
        device_queue_op(d, op);
        return 0;
}

int vhub_device_queue_get_shared(struct vhub_device *d, const uint8_t uuid[16], const char *requester,
                                 uint64_t token) {
        struct vhub_op *op = device_op_new(VHUB_OP_GET_SHARED, NULL);

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
        struct vhub_error err;
        struct vhub_op *op;

        if (!device_check_usable(d, call))
                return;
        if (d->state != VHUB_DEV_READY && d->state != VHUB_DEV_RUNNING && d->state != VHUB_DEV_STOPPED) {
                vhub_error_set(&err, VHUB_ERR_STATE, "device %s is %s; reset needs ready, running or stopped",
                               d->name, vhub_device_state_to_string(d->state));
                vhub_call_fail(call, &err);
                return;
        }
        op = device_op_new(VHUB_OP_RESET, call);
        if (!op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                vhub_call_fail(call, &err);
                return;
        }
        device_queue_op(d, op);
}

/* One request with an optional fd, gated on a protocol feature. */
static void queue_single(struct vhub_device *d, uint32_t request, unsigned feature, const void *payload,
                         uint32_t size, int fd, struct vhub_call *call) {
        struct vhub_error err;
        struct vhub_op *op;

        if (!device_check_usable(d, call))
                goto close_fd;
        if (d->state == VHUB_DEV_CONNECTING || d->state == VHUB_DEV_FAILED ||
            d->state == VHUB_DEV_DISCONNECTED) {
                vhub_error_set(&err, VHUB_ERR_STATE, "device %s is %s", d->name,
                               vhub_device_state_to_string(d->state));
                goto fail;
        }
        if (feature != UINT_MAX && !dev_has_pf(d, feature)) {
                vhub_error_set(&err, VHUB_ERR_UNSUPPORTED,
                               "device %s: the back-end has no %s protocol feature (needed for %s)",
                               d->name, vhu_protocol_feature_name(feature), REQ(request));
                goto fail;
        }
        op = device_op_new(VHUB_OP_SINGLE, call);
        if (!op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        op->u.single.request = request;
        op->u.single.fd = -1;
        if (size && !(op->u.single.payload = malloc(size))) {
                op_free(op);
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        if (size)
                memcpy(op->u.single.payload, payload, size);
        op->u.single.size = size;
        op->u.single.fd = fd;
        device_queue_op(d, op);
        return;
fail:
        vhub_call_fail(call, &err);
close_fd:
        if (fd >= 0)
                close(fd);
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
        struct vhub_error err;

        if (!device_check_usable(d, call))
                return;
        /* spec "In-band notifications" */
        if (!dev_has_pf(d, VHU_PF_INBAND_NOTIFICATIONS)) {
                vhub_error_set(&err, VHUB_ERR_UNSUPPORTED,
                               "device %s: the back-end has no INBAND_NOTIFICATIONS protocol feature (needed for VRING_KICK)",
                               d->name);
                vhub_call_fail(call, &err);
                return;
        }
        if (d->state != VHUB_DEV_RUNNING) {
                vhub_error_set(&err, VHUB_ERR_STATE, "device %s is %s; a kick needs running", d->name,
                               vhub_device_state_to_string(d->state));
                vhub_call_fail(call, &err);
                return;
        }
        if (index >= d->queues || !d->vrings[index].configured) {
                vhub_error_set(&err, VHUB_ERR_PARAMS, "'index': ring %u of device %s was not started",
                               index, d->name);
                vhub_call_fail(call, &err);
                return;
        }
        queue_single(d, VHU_REQ_VRING_KICK, VHU_PF_INBAND_NOTIFICATIONS, &st, sizeof(st), -1, call);
}

void vhub_device_state_fd(struct vhub_device *d, bool load, int fd, struct vhub_call *call) {
        struct vhu_device_state st = {
                .direction = load ? VHU_TRANSFER_LOAD : VHU_TRANSFER_SAVE,
                .phase = VHU_TRANSFER_PHASE_STOPPED,
        };
        struct vhub_error err;

        /* spec "Migrating back-end state": only the stopped phase exists */
        if (d->state == VHUB_DEV_RUNNING) {
                vhub_error_set(&err, VHUB_ERR_STATE, "device %s is running; stop it before transferring state",
                               d->name);
                vhub_call_fail(call, &err);
                close(fd);
                return;
        }
        queue_single(d, VHU_REQ_SET_DEVICE_STATE_FD, VHU_PF_DEVICE_STATE, &st, sizeof(st), fd, call);
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
        struct vhub_error err;

        /* spec "IOMMU support": misses come over the back-end channel, and
         * QEMU refuses an IOMMU without BACKEND_REQ and REPLY_ACK too */
        if (!device_check_usable(d, call))
                return;
        if (!dev_has_pf(d, VHU_PF_BACKEND_REQ) || !dev_has_pf(d, VHU_PF_REPLY_ACK)) {
                vhub_error_set(&err, VHUB_ERR_UNSUPPORTED,
                               "device %s: IOTLB messages need the BACKEND_REQ and REPLY_ACK protocol features",
                               d->name);
                vhub_call_fail(call, &err);
                return;
        }
        if (!features_iommu(d->features)) {
                vhub_error_set(&err, VHUB_ERR_UNSUPPORTED,
                               "device %s: the back-end does not offer VIRTIO_F_IOMMU_PLATFORM", d->name);
                vhub_call_fail(call, &err);
                return;
        }
        if (msg->type == VHU_IOTLB_UPDATE && !uaddr_in_memory(d->vm, msg->uaddr, msg->size)) {
                /* spec: "Addresses and size must be within vhost memory regions" */
                vhub_error_set(&err, VHUB_ERR_REGION,
                               "uaddr 0x%llx + size 0x%llx does not lie inside one of the VM's memory regions",
                               (unsigned long long)msg->uaddr, (unsigned long long)msg->size);
                vhub_call_fail(call, &err);
                return;
        }
        queue_single(d, VHU_REQ_IOTLB_MSG, VHU_PF_REPLY_ACK, msg, sizeof(*msg), -1, call);
}

int vhub_device_queue_postcopy(struct vhub_device *d, struct vhub_vm_batch *batch,
                               enum vhub_postcopy_step step) {
        struct vhub_op *op = device_op_new(VHUB_OP_POSTCOPY, NULL);

        if (!op)
                return -ENOMEM;
        op->u.postcopy.batch = batch;
        op->u.postcopy.step = step;
        op->u.postcopy.ufd = -1;
        device_queue_op(d, op);
        return 0;
}
