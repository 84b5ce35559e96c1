/* SPDX-License-Identifier: MIT */
/*
 * The rings of a front-door device outside the VMM's requests:
 *
 * VMM_RESTORE, after a restore's handshake (which synced the VMM's memory
 * table): the VMM's session replayed from the records -- its features, the
 * inflight region, every ring as the VMM set it up (started rings rebased to
 * the used index in guest memory, kick last), the enables, the MTU, the
 * status, one kick per started ring -- then device.reconnected.  The VMM's
 * connection is not touched (docs/front-door.md, "Back-end loss").
 *
 * VMM_STOP, when the VMM left: GET_VRING_BASE of every started ring, then
 * the back-end is made ready for the next VMM, whose addresses are not this
 * one's.  With RESET_DEVICE it is reset and the VMM's memory removed (with
 * CONFIGURE_MEM_SLOTS; without it the table stays mapped until the next
 * VMM's SET_MEM_TABLE replaces it), and it stays connected.  Without it a
 * back-end keeps the old VMM's ring addresses, which libvhost-user maps
 * again at every memory change (qemu-storage-daemon 7.2 panics on the next
 * VMM's first ADD_MEM_REG): only a new connection is a clean slate, so the
 * connection is dropped and restored (device.disconnected and
 * device.reconnected say so).  Then the records go.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-device-vmm-internal.h"
#include "vhub-log.h"

/* ---- VMM_RESTORE ---- */

/* spec "Vring descriptor indices": a split ring restarts at its used index,
 * read from guest memory (what the JSON-RPC restore does, vhub-op-rings.c). */
static int restore_rebase(struct vhub_device *d, struct vhub_op *op) {
        bool in_order = d->acked_features & (UINT64_C(1) << VHU_VIRTIO_F_IN_ORDER);
        bool inflight = dev_has_pf(d, VHU_PF_INFLIGHT_SHMFD) && d->vmm->inflight_set && d->inflight_fd >= 0;

        if (op_restored_begin(d, op) < 0)
                return op->result;
        for (unsigned i = 0; i < d->queues; i++) {
                struct vhub_vmm_ring *r = &d->vmm->rings[i];
                uint16_t used_idx, avail_idx;

                if (!r->started)
                        continue;
                /* rings behind IOVAs or packed rings: their indexes cannot be read */
                if (features_iommu(d->acked_features) ||
                    features_packed(d->acked_features)) {
                        op->give_up = true;
                        return device_op_error(op, VHUB_ERR_BACKEND, NULL,
                                               "device %s ran %s rings: they cannot be restored", d->name,
                                               features_iommu(d->acked_features) ? "IOMMU" : "packed");
                }
                if (!r->addr_set || vmm_read_guest(d, r->addr.used + 2, &used_idx, sizeof(used_idx)) < 0 ||
                    vmm_read_guest(d, r->addr.avail + 2, &avail_idx, sizeof(avail_idx)) < 0)
                        return device_op_error(op, VHUB_ERR_REGION, NULL,
                                               "cannot read ring %u's indexes from the VMM's memory", i);
                r->base = used_idx;
                r->base_set = true;
                op_restored_ring(op, i, used_idx, avail_idx, r->loss_read, r->loss_avail, r->loss_used,
                                 inflight || in_order);
        }
        return 0;
}

static int send_state(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t index,
                      uint32_t num) {
        struct vhu_msg m;

        vhu_msg_build_state(&m, request, device_need_reply(d), index, num);
        return device_send(d, op, &m, TAG(TAGK_VRING, index));
}

/* SET_VRING_KICK/CALL/ERR as the VMM sent it: its u64 (index, "no fd" bit)
 * and the daemon's dup of its fd. */
static int send_ring_fd(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t index,
                        uint64_t u64, int fd) {
        struct vhu_msg m;
        int r;

        r = vhu_msg_build(&m, VHU_DIR_FRONTEND, request, device_need_reply(d), &u64, sizeof(u64),
                          fd >= 0 ? &fd : NULL, fd >= 0 ? 1 : 0);
        if (r < 0)
                return device_op_error(op, VHUB_ERR_INTERNAL, REQ(request), "cannot build %s: %s", REQ(request),
                                       strerror(-r));
        return device_send(d, op, &m, TAG(TAGK_VRING, index));
}

static int restore_ring(struct vhub_device *d, struct vhub_op *op, unsigned i) {
        const struct vhub_vmm_ring *v = &d->vmm->rings[i];
        struct vhu_msg m;
        int r = 0;

        if (v->num_set && (r = send_state(d, op, VHU_REQ_SET_VRING_NUM, i, v->num)) < 0)
                return r;
        if (v->base_set && (r = send_state(d, op, VHU_REQ_SET_VRING_BASE, i, v->base)) < 0)
                return r;
        if (v->endian_set && (r = send_state(d, op, VHU_REQ_SET_VRING_ENDIAN, i, v->endian)) < 0)
                return r;
        if (v->addr_set) {
                vhu_msg_build_vring_addr(&m, device_need_reply(d), &v->addr);
                if ((r = device_send(d, op, &m, TAG(TAGK_VRING, i))) < 0)
                        return r;
        }
        /* CALL before KICK (backends.md: qemu-storage-daemon) */
        if (v->call_set && (r = send_ring_fd(d, op, VHU_REQ_SET_VRING_CALL, i, v->call_u64, v->call_fd)) < 0)
                return r;
        if (v->err_set && (r = send_ring_fd(d, op, VHU_REQ_SET_VRING_ERR, i, v->err_u64, v->err_fd)) < 0)
                return r;
        /* only a started ring is kicked: SET_VRING_KICK starts it */
        if (v->started && v->kick_set)
                r = send_ring_fd(d, op, VHU_REQ_SET_VRING_KICK, i, v->kick_u64, v->kick_fd);
        return r;
}

int vmm_restore_stage(struct vhub_device *d, struct vhub_op *op) {
        struct vhub_device_vmm *s = d->vmm;
        bool ack = device_need_reply(d);
        struct vhu_msg m;
        int r;

        switch (op->stage) {
        case 0:
                if ((r = restore_rebase(d, op)) < 0)
                        return r;
                if (s->features_set) {
                        vhu_msg_build_u64(&m, VHU_REQ_SET_FEATURES, ack, s->features);
                        if ((r = device_send(d, op, &m, 0)) < 0)
                                return r;
                }
                if (s->log_set) {
                        vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_BASE, ack, &s->log, sizeof(s->log),
                                      &s->log_fd, 1);
                        if ((r = device_send(d, op, &m, 0)) < 0)
                                return r;
                }
                return OP_STAGE_NEXT;
        case 1:
                if (s->inflight_set && d->inflight_fd >= 0 && dev_has_pf(d, VHU_PF_INFLIGHT_SHMFD)) {
                        vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_INFLIGHT_FD, ack, &s->inflight,
                                      sizeof(s->inflight), &d->inflight_fd, 1);
                        if ((r = device_send(d, op, &m, 0)) < 0)
                                return r;
                }
                for (unsigned i = 0; i < d->queues; i++)
                        if ((r = restore_ring(d, op, i)) < 0)
                                return r;
                return OP_STAGE_NEXT;
        case 2:
                for (unsigned i = 0; i < d->queues; i++)
                        if (s->rings[i].enable_set &&
                            (r = send_state(d, op, VHU_REQ_SET_VRING_ENABLE, i, s->rings[i].enable)) < 0)
                                return r;
                if (s->mtu_set && dev_has_pf(d, VHU_PF_NET_MTU)) {
                        vhu_msg_build_u64(&m, VHU_REQ_NET_SET_MTU, ack, s->mtu);
                        if ((r = device_send(d, op, &m, 0)) < 0)
                                return r;
                }
                return OP_STAGE_NEXT;
        case 3:
                if (!s->status_set || !dev_has_pf(d, VHU_PF_STATUS))
                        return OP_STAGE_NEXT;
                /* DPDK's vhost starts nothing before DRIVER_OK */
                vhu_msg_build_u64(&m, VHU_REQ_SET_STATUS, ack, s->status);
                if ((r = device_send(d, op, &m, 0)) < 0)
                        return r;
                return OP_STAGE_NEXT;
        case 4:
                /* a kick the guest wrote while nobody watched is not lost */
                for (unsigned i = 0; i < d->queues; i++)
                        if (s->rings[i].started && s->rings[i].kick_fd >= 0)
                                (void)vring_signal(d, i, s->rings[i].kick_fd, "kick");
                return OP_STAGE_NEXT;
        }
        return OP_STAGE_DONE;
}

void vmm_restore_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                          struct vhu_msg *reply) {
        op_check_ack(d, op, request, reply);
}

void vmm_restore_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (r < 0) {
                device_restore_failed(d, op);
                return;
        }
        device_restored(d, op->restored, op->n_restored, op->restore_exact);
}

/* ---- VMM_STOP ---- */

int vmm_stop_stage(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_msg m;
        int r;

        switch (op->stage) {
        case 0:
                for (unsigned i = 0; i < d->queues; i++) {
                        if (!d->vmm->rings[i].started)
                                continue;
                        vhu_msg_build_state(&m, VHU_REQ_GET_VRING_BASE, false, i, 0);
                        if ((r = device_send(d, op, &m, TAG(TAGK_VRING, i))) < 0)
                                return r;
                }
                return OP_STAGE_NEXT;
        case 1:
                if (!dev_has_pf(d, VHU_PF_RESET_DEVICE))
                        return OP_STAGE_DONE; /* the connection is renewed instead */
                vhu_msg_build_none(&m, VHU_REQ_RESET_DEVICE, device_need_reply(d));
                if ((r = device_send(d, op, &m, 0)) < 0)
                        return r;
                return OP_STAGE_NEXT;
        case 2:
                /* without CONFIGURE_MEM_SLOTS there is no empty table to send */
                if (!dev_has_pf(d, VHU_PF_CONFIGURE_MEM_SLOTS) || d->n_shadow == 0)
                        return OP_STAGE_DONE;
                if ((r = mem_sync_prepare(d, op)) < 0 || (r = mem_sync_send(d, op)) < 0)
                        return r;
                return OP_STAGE_NEXT;
        case 3:
                mem_sync_commit_unacked(d, op);
                return OP_STAGE_DONE;
        }
        return OP_STAGE_DONE;
}

void vmm_stop_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                       struct vhu_msg *reply) {
        if (request == VHU_REQ_GET_VRING_BASE)
                return; /* the ring stopped; nobody needs where */
        if (request == VHU_REQ_RESET_DEVICE) {
                op_check_ack(d, op, request, reply);
                return;
        }
        mem_sync_on_reply(d, op, request, tag, reply);
}

void vmm_stop_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        /* whatever the back-end did: the session is over (a loss restores
         * the back-end with nothing of it) */
        d->vmm->leaving = false;
        if (r < 0 && vhub_device_is_connected(d))
                device_mark_lost(d, op->error.detail[0] ? op->error.detail : "stopping the VMM's rings failed");
        else if (!dev_has_pf(d, VHU_PF_RESET_DEVICE) && vhub_device_is_connected(d))
                device_renew_link(d, "the VMM left and the back-end has no RESET_DEVICE: "
                                     "a new connection for the next VMM");
        vmm_records_clear(d);
        vmm_update_state(d, "the VMM left");
}
