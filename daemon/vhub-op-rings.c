/* SPDX-License-Identifier: MIT */
/*
 * The ops that start and stop rings: START (also the restore's rebase),
 * STOP, RESET, REMOVE's last stop, and the dirty-log switch of running rings.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhub-device-internal.h"
#include "vhub-eventfd.h"
#include "vhub-inflight.h"
#include "vhub-log.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

/* ---- the VMM's eventfds ---- */

int vring_signal(struct vhub_device *d, unsigned index, int fd, const char *what) {
        unsigned long long suppressed;
        char more[96] = "";
        int r = vhub_eventfd_signal(fd);

        if (r == 0)
                return 0;
        d->stats.eventfd_skipped++;
        if (!vhub_log_ratelimit(&d->eventfd_failures, vhub_now_usec(), &suppressed))
                return r;
        if (d->eventfd_failures.total > 1)
                snprintf(more, sizeof(more), " (%llu more since the last report, %llu in all)",
                         suppressed, d->eventfd_failures.total);
        if (r == -EAGAIN)
                device_log(d, LOG_WARNING, NULL,
                           "ring %u: the VMM's %s eventfd is not writable (its counter is full and "
                           "unread): not signalled again%s", index, what, more);
        else
                device_log(d, LOG_WARNING, NULL, "ring %u: cannot signal the VMM's %s eventfd: %s%s",
                           index, what, strerror(-r), more);
        return r;
}

/* ---- start ---- */

static struct vhub_vring *start_vrings(struct vhub_device *d, struct vhub_op *op, unsigned *ret_n) {
        if (op->restore) {
                *ret_n = d->queues;
                return d->vrings;
        }
        *ret_n = op->u.start.n_vrings;
        return op->u.start.vrings;
}

/* SET_FEATURES' value: the driver's features plus what the daemon adds. */
static uint64_t features_to_send(struct vhub_device *d, uint64_t f) {
        f &= ~(UINT64_C(1) << VHU_F_PROTOCOL_FEATURES);
        if (dev_protocol_features_on(d))
                f |= UINT64_C(1) << VHU_F_PROTOCOL_FEATURES;
        if (d->vm->logging)
                f |= UINT64_C(1) << VHU_VIRTIO_F_LOG_ALL;
        return f;
}

static uint64_t start_features(struct vhub_device *d, struct vhub_op *op) {
        return features_to_send(d, op->restore ? d->acked_features : op->u.start.features);
}

/* SET_LOG_BASE with the VM's log memfd. */
static int send_log_base(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_log log = { .mmap_size = d->vm->log_size, .mmap_offset = 0 };
        struct vhu_msg m;
        int r;

        r = vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_BASE, device_need_reply(d), &log,
                          sizeof(log), &d->vm->log_fd, 1);
        if (r < 0)
                return device_op_error(op, VHUB_ERR_INTERNAL, REQ(VHU_REQ_SET_LOG_BASE),
                                       "cannot build SET_LOG_BASE: %s", strerror(-r));
        return device_send(d, op, &m, 0);
}

static uint16_t start_queue_size(struct vhub_vring *v, unsigned n) {
        uint32_t max = 0;

        for (unsigned i = 0; i < n; i++)
                if (v[i].configured && v[i].size > max)
                        max = v[i].size;
        return (uint16_t)(max > 0xffff ? 0xffff : max);
}

bool rings_restorable(const struct vhub_device *d, char *why, size_t len) {
        if (features_iommu(d->acked_features))
                snprintf(why, len, "device %s ran with VIRTIO_F_IOMMU_PLATFORM: its rings cannot be restored",
                         d->name);
        else if (features_packed(d->acked_features))
                /* The packed inflight region (inflight_info_packed) would
                 * say where the back-end was, but no back-end here writes
                 * one (docs/reconnect.md, "Packed rings"). */
                snprintf(why, len,
                         "device %s ran with VIRTIO_F_RING_PACKED: its rings cannot be restored (a packed "
                         "ring's position is not in guest memory)", d->name);
        else
                return true;
        return false;
}

/* After a loss: restart every ring at the used index in guest memory. */
static int start_rebase(struct vhub_device *d, struct vhub_op *op) {
        bool in_order = d->acked_features & (UINT64_C(1) << VHU_VIRTIO_F_IN_ORDER);
        bool inflight = dev_has_pf(d, VHU_PF_INFLIGHT_SHMFD) && d->inflight_fd >= 0;
        char why[200];

        /* A loss fails such a device at once (device_give_up_if_lost());
         * this is for an outage a vhubd without that check left behind in
         * its snapshot: never a ring started from a base that is not one. */
        if (!rings_restorable(d, why, sizeof(why))) {
                op->give_up = true;
                return device_op_error(op, VHUB_ERR_BACKEND, NULL, "%s", why);
        }
        if (op_restored_begin(d, op) < 0)
                return op->result;
        for (unsigned i = 0; i < d->queues; i++) {
                struct vhub_vring *v = &d->vrings[i];
                uint16_t used_idx, avail_idx;
                int r;

                if (!v->configured)
                        continue;
                r = vhub_mem_table_read(&d->vm->mem, v->used + 2, &used_idx, sizeof(used_idx));
                if (r == 0)
                        r = vhub_mem_table_read(&d->vm->mem, v->avail + 2, &avail_idx, sizeof(avail_idx));
                if (r < 0)
                        return device_op_error(op, VHUB_ERR_REGION, NULL,
                                               "cannot read ring %u's indexes from guest memory: %s", i,
                                               strerror(-r));
                v->base = used_idx;
                op_restored_ring(op, i, used_idx, avail_idx, v->loss_read, v->loss_avail, v->loss_used,
                                 inflight || in_order);
        }
        return 0;
}

/* The used ring's gpa doubles as the log address.  A packed ring's
 * "avail" and "used" are its driver and device event suppression areas:
 * 4 bytes each (virtio "Event Suppression Structure Format"). */
int vring_addr(const struct vhub_vm *vm, uint64_t features, uint32_t index, uint32_t size, uint64_t desc,
                      uint64_t avail, uint64_t used, struct vhu_vring_addr *ret) {
        struct vhu_vring_addr a = { .index = index, .log = used };
        bool iova = features_iommu(features), packed = features_packed(features);

        /* spec "IOMMU support": the back-end resolves them with IOTLB
         * updates (or asks with a miss); QEMU sends the IOVAs too */
        if (iova) {
                a.desc = desc;
                a.avail = avail;
                a.used = used;
                *ret = a;
                return 0;
        }
        if (vhub_mem_table_gpa_to_uaddr(&vm->mem, desc, (uint64_t)size * 16, &a.desc) < 0 ||
            vhub_mem_table_gpa_to_uaddr(&vm->mem, avail, packed ? 4 : 6 + (uint64_t)size * 2, &a.avail) < 0 ||
            vhub_mem_table_gpa_to_uaddr(&vm->mem, used, packed ? 4 : 6 + (uint64_t)size * 8, &a.used) < 0)
                return -ERANGE;
        *ret = a;
        return 0;
}

/*
 * spec SET_VRING_ENDIAN: "for legacy devices", once per ring "before the
 * front-end starts the VQ", when CROSS_ENDIAN is negotiated.  The contract
 * has no endianness parameter, so a legacy driver (no VERSION_1) is taken to
 * be of the host's byte order, the only one the daemon knows; a
 * cross-endian guest is not described (docs/protocol-coverage.md).
 */
static int send_vring_endian(struct vhub_device *d, struct vhub_op *op, const struct vhub_vring *v) {
        struct vhu_msg m;

        if (!dev_has_pf(d, VHU_PF_CROSS_ENDIAN) ||
            (start_features(d, op) & (UINT64_C(1) << VHU_VIRTIO_F_VERSION_1)))
                return 0;
        vhu_msg_build_state(&m, VHU_REQ_SET_VRING_ENDIAN, device_need_reply(d), v->index,
                            __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__ ? 1 : 0);
        return device_send(d, op, &m, TAG(TAGK_VRING, v->index));
}

static int send_vring(struct vhub_device *d, struct vhub_op *op, const struct vhub_vring *v) {
        bool ack = device_need_reply(d);
        struct vhu_vring_addr a;
        struct vhu_msg m;
        int r;

        if (vring_addr(d->vm, op->restore ? d->acked_features : op->u.start.features,
                       v->index, v->size, v->desc, v->avail, v->used, &a) < 0)
                return device_op_error(op, VHUB_ERR_REGION, REQ(VHU_REQ_SET_VRING_ADDR),
                                       "ring %u does not lie inside the VM's memory", v->index);
        if (d->vm->logging)
                a.flags |= VHU_VRING_F_LOG;
        vhu_msg_build_state(&m, VHU_REQ_SET_VRING_NUM, ack, v->index, v->size);
        if ((r = device_send(d, op, &m, TAG(TAGK_VRING, v->index))) < 0)
                return r;
        vhu_msg_build_state(&m, VHU_REQ_SET_VRING_BASE, ack, v->index, v->base);
        if ((r = device_send(d, op, &m, TAG(TAGK_VRING, v->index))) < 0)
                return r;
        if ((r = send_vring_endian(d, op, v)) < 0)
                return r;
        vhu_msg_build_vring_addr(&m, ack, &a);
        if ((r = device_send(d, op, &m, TAG(TAGK_VRING, v->index))) < 0)
                return r;
        /* CALL before KICK: libvhost-user starts the ring on KICK, and with a
         * kick already pending and no call fd, qemu-storage-daemon aborts. */
        vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_CALL, ack, v->index, v->call_fd);
        if ((r = device_send(d, op, &m, TAG(TAGK_VRING, v->index))) < 0)
                return r;
        if (v->err_fd >= 0) {
                vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_ERR, ack, v->index, v->err_fd);
                if ((r = device_send(d, op, &m, TAG(TAGK_VRING, v->index))) < 0)
                        return r;
        }
        vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_KICK, ack, v->index, v->kick_fd);
        return device_send(d, op, &m, TAG(TAGK_VRING, v->index));
}

int start_stage(struct vhub_device *d, struct vhub_op *op) {
        bool ack = device_need_reply(d);
        struct vhub_vring *v;
        struct vhu_msg m;
        unsigned n;
        int r;

        v = start_vrings(d, op, &n);
        switch (op->stage) {
        case 0:
                if (op->restore && (r = start_rebase(d, op)) < 0)
                        return r;
                vhu_msg_build_u64(&m, VHU_REQ_SET_FEATURES, ack, start_features(d, op));
                if ((r = device_send(d, op, &m, 0)) < 0)
                        return r;
                if (d->vm->logging && d->vm->log_fd >= 0 && (r = send_log_base(d, op)) < 0)
                        return r;
                if (dev_has_pf(d, VHU_PF_INFLIGHT_SHMFD) && d->inflight_fd < 0) {
                        struct vhu_inflight inf = {
                                .num_queues = (uint16_t)d->queues,
                                .queue_size = start_queue_size(v, n),
                        };

                        vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_GET_INFLIGHT_FD, false, &inf,
                                      sizeof(inf), NULL, 0);
                        if ((r = device_send(d, op, &m, 0)) < 0)
                                return r;
                        return OP_STAGE_NEXT; /* SET_INFLIGHT_FD needs its answer */
                }
                /* Nothing up to DRIVER_OK needs an answer to what came
                 * before: the back-end takes them in order, so they go in
                 * one round trip, and stage 4's kicks follow every ack
                 * (an enable must be acked before the first kick).  If any
                 * is refused, rings may have started: start_complete()
                 * drops the connection (stage >= 1), as for a ring. */
                op->stage = 1;
                /* fallthrough */
        case 1:
                if (dev_has_pf(d, VHU_PF_INFLIGHT_SHMFD) && d->inflight_fd >= 0) {
                        struct vhu_inflight inf = {
                                .mmap_size = d->inflight_size,
                                .mmap_offset = 0,
                                .num_queues = (uint16_t)d->queues,
                                .queue_size = d->inflight_queue_size,
                        };

                        vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_INFLIGHT_FD, ack, &inf,
                                      sizeof(inf), &d->inflight_fd, 1);
                        if ((r = device_send(d, op, &m, 0)) < 0)
                                return r;
                }
                for (unsigned i = 0; i < n; i++)
                        if (v[i].configured && (r = send_vring(d, op, &v[i])) < 0)
                                return r;
                /* spec "Ring states": rings start disabled once PROTOCOL_FEATURES is on */
                for (unsigned i = 0; dev_protocol_features_on(d) && i < n; i++) {
                        if (!v[i].configured)
                                continue;
                        vhu_msg_build_state(&m, VHU_REQ_SET_VRING_ENABLE, ack, v[i].index, 1);
                        if ((r = device_send(d, op, &m, TAG(TAGK_VRING, v[i].index))) < 0)
                                return r;
                }
                if (dev_has_pf(d, VHU_PF_STATUS)) {
                        /* DPDK's vhost starts nothing before DRIVER_OK */
                        vhu_msg_build_u64(&m, VHU_REQ_SET_STATUS, ack,
                                          VHU_STATUS_ACKNOWLEDGE | VHU_STATUS_DRIVER |
                                                  VHU_STATUS_FEATURES_OK | VHU_STATUS_DRIVER_OK);
                        if ((r = device_send(d, op, &m, 0)) < 0)
                                return r;
                }
                op->stage = 3; /* the kicks are next, once all of it is answered */
                return OP_STAGE_NEXT;
        case 4:
                /* one kick per ring, so a kick the driver wrote before the
                 * back-end watched its fd is never lost; a ring without a
                 * kick fd gets it in-band */
                for (unsigned i = 0; i < n; i++) {
                        if (!v[i].configured)
                                continue;
                        if (v[i].kick_fd < 0) {
                                vhu_msg_build_state(&m, VHU_REQ_VRING_KICK, ack, v[i].index, 0);
                                if ((r = device_send(d, op, &m, TAG(TAGK_VRING, v[i].index))) < 0)
                                        return r;
                        } else {
                                (void)vring_signal(d, v[i].index, v[i].kick_fd, "kick");
                        }
                }
                return OP_STAGE_NEXT;
        }
        return OP_STAGE_DONE;
}

void start_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                           uint32_t tag, struct vhu_msg *reply) {
        if (request == VHU_REQ_GET_INFLIGHT_FD) {
                int fd = -1;

                if (reply->n_fds == 1)
                        fd = vhu_msg_take_fd(reply, 0);
                if (fd < 0 || reply->payload.inflight.mmap_size == 0) {
                        vhu_safe_close(fd);
                        device_op_error(op, VHUB_ERR_BACKEND, REQ(request),
                                        "back-end gave no inflight buffer");
                        return;
                }
                device_set_inflight(d, fd);
                d->inflight_size = reply->payload.inflight.mmap_size;
                d->inflight_queue_size = reply->payload.inflight.queue_size;
                return;
        }
        op_check_ack(d, op, request, reply);
}

/* The rings of a START not yet committed: the VMM's eventfds are the op's. */
void start_free(struct vhub_op *op) {
        for (unsigned i = 0; op->u.start.vrings && i < op->u.start.n_vrings; i++)
                vring_close_fds(&op->u.start.vrings[i]);
        free(op->u.start.vrings);
}

void start_foreach_fd(const struct vhub_device *d, const struct vhub_op *op, const struct vhub_fd_visitor *v) {
        for (unsigned i = 0; op->u.start.vrings && i < op->u.start.n_vrings; i++) {
                const struct vhub_vring *r = &op->u.start.vrings[i];

                device_fd_visit(d, v, r->kick_fd, NULL, "op/start/ring%u.kick", r->index);
                device_fd_visit(d, v, r->call_fd, NULL, "op/start/ring%u.call", r->index);
                device_fd_visit(d, v, r->err_fd, NULL, "op/start/ring%u.err", r->index);
        }
}

unsigned start_fds(const struct vhub_op *op) {
        unsigned n = 0;

        for (unsigned i = 0; op->u.start.vrings && i < op->u.start.n_vrings; i++)
                n += vring_fds_held(&op->u.start.vrings[i]);
        return n;
}

/* ---- stop ---- */

/* GET_VRING_BASE to every configured ring (stopping it); the replies land in
 * stop_on_reply() (stop, remove and reset share it).  Returns
 * device_send()'s error. */
static int send_get_vring_bases(struct vhub_device *d, struct vhub_op *op, uint32_t request) {
        struct vhu_msg m;
        int r;

        for (unsigned i = 0; i < d->queues; i++) {
                if (!d->vrings[i].configured)
                        continue;
                vhu_msg_build_state(&m, request, false, i, 0);
                if ((r = device_send(d, op, &m, TAG(TAGK_VRING, i))) < 0)
                        return r;
        }
        return 0;
}

int stop_stage(struct vhub_device *d, struct vhub_op *op) {
        int r;

        if (op->stage > 0)
                return OP_STAGE_DONE;
        r = send_get_vring_bases(d, op, op->u.stop.skip_drain ? VHU_REQ_GET_VRING_BASE_SKIP_DRAIN
                                                              : VHU_REQ_GET_VRING_BASE);
        return r < 0 ? r : OP_STAGE_NEXT;
}

/* Whether GET_VRING_BASE's num is a ring position.  spec "A vring
 * descriptor index for split virtqueues": bits 0-15 the next avail index,
 * bits 16-31 reserved (zero).  "Vring descriptor indices for packed
 * virtqueues": bits 0-14 the next avail index and bit 15 its wrap counter,
 * bits 16-30 the next used index and bit 31 its wrap counter; a packed
 * ring's indexes are positions in the ring, so below its size. */
static bool vring_base_valid(const struct vhub_device *d, const struct vhub_vring *v, uint32_t num) {
        if (!features_packed(d->acked_features))
                return num <= 0xffff;
        return (num & 0x7fff) < v->size && ((num >> 16) & 0x7fff) < v->size;
}

/* A reply that breaks the protocol fails the op and loses the back-end:
 * nothing it said reaches the VMM. */
static void stop_violation(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                           const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void stop_violation(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                           const char *fmt, ...) {
        char reason[160];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(reason, sizeof(reason), fmt, ap);
        va_end(ap);
        device_op_error(op, VHUB_ERR_BACKEND, REQ(request), "device %s: %s", d->name, reason);
        snprintf(op->error.device, sizeof(op->error.device), "%s", d->name);
        device_mark_lost(d, reason);
}

void stop_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                          uint32_t tag, struct vhu_msg *reply) {
        const struct vhu_vring_state *st = &reply->payload.state;
        unsigned i = TAG_INDEX(tag);

        if (request != VHU_REQ_GET_VRING_BASE && request != VHU_REQ_GET_VRING_BASE_SKIP_DRAIN) {
                op_check_ack(d, op, request, reply);
                return;
        }
        if (st->index != i || i >= d->queues) {
                stop_violation(d, op, request, "GET_VRING_BASE reply names ring %u, asked for %u",
                               st->index, i);
                return;
        }
        if (!vring_base_valid(d, &d->vrings[i], st->num)) {
                stop_violation(d, op, request,
                               "GET_VRING_BASE reply for ring %u: 0x%x is not a ring index "
                               "(protocol violation)", i, st->num);
                return;
        }
        d->vrings[i].base = st->num;
}

/* ---- remove ---- */

int remove_stage(struct vhub_device *d, struct vhub_op *op) {
        if (op->stage > 0 || !vhub_device_is_connected(d) || d->state != VHUB_DEV_RUNNING)
                return OP_STAGE_DONE;
        /* stop the rings so the back-end lets go of guest memory cleanly */
        if (send_get_vring_bases(d, op, VHU_REQ_GET_VRING_BASE) < 0)
                return OP_STAGE_DONE;
        return OP_STAGE_NEXT;
}

/* ---- reset ---- */

int reset_stage(struct vhub_device *d, struct vhub_op *op) {
        bool ack = device_need_reply(d);
        struct vhu_msg m;
        int r;

        switch (op->stage) {
        case 0:
                if (d->state != VHUB_DEV_RUNNING)
                        return OP_STAGE_NEXT;
                if ((r = send_get_vring_bases(d, op, VHU_REQ_GET_VRING_BASE)) < 0)
                        return r;
                return OP_STAGE_NEXT;
        case 1:
                if (dev_has_pf(d, VHU_PF_RESET_DEVICE))
                        vhu_msg_build_none(&m, VHU_REQ_RESET_DEVICE, ack);
                else if (dev_has_pf(d, VHU_PF_STATUS))
                        vhu_msg_build_u64(&m, VHU_REQ_SET_STATUS, ack, 0);
                else
                        return OP_STAGE_DONE; /* stopping the rings is all there is */
                return device_send(d, op, &m, 0) < 0 ? op->result : OP_STAGE_NEXT;
        }
        return OP_STAGE_DONE;
}

/* ---- dirty log on/off ---- */

int log_stage(struct vhub_device *d, struct vhub_op *op) {
        bool ack = device_need_reply(d);
        struct vhu_msg m;
        int r;

        if (op->stage > 0)
                return OP_STAGE_DONE;
        if (op->u.log.enable && (r = send_log_base(d, op)) < 0)
                return r;
        if (d->state == VHUB_DEV_RUNNING) {
                /* spec "Migration": LOG_ALL in the features, VHOST_VRING_F_LOG per ring */
                vhu_msg_build_u64(&m, VHU_REQ_SET_FEATURES, ack, features_to_send(d, d->acked_features));
                if ((r = device_send(d, op, &m, 0)) < 0)
                        return r;
                for (unsigned i = 0; i < d->queues; i++) {
                        const struct vhub_vring *v = &d->vrings[i];
                        struct vhu_vring_addr a;

                        if (!v->configured)
                                continue;
                        if (vring_addr(d->vm, d->acked_features, i, v->size, v->desc,
                                       v->avail, v->used, &a) < 0)
                                return device_op_error(op, VHUB_ERR_REGION, REQ(VHU_REQ_SET_VRING_ADDR),
                                                       "ring %u does not lie inside the VM's memory", i);
                        if (op->u.log.enable)
                                a.flags = VHU_VRING_F_LOG;
                        vhu_msg_build_vring_addr(&m, ack, &a);
                        if ((r = device_send(d, op, &m, TAG(TAGK_VRING, i))) < 0)
                                return r;
                }
        }
        return OP_STAGE_NEXT;
}

void start_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (op->restore) {
                if (r < 0) {
                        device_restore_failed(d, op);
                        return;
                }
                device_restored(d, op->restored, op->n_restored, op->restore_exact);
                return;
        }
        if (r < 0) {
                /* Some rings may have started: a fresh connection is the only
                 * clean slate, and the restore brings back the prior state. */
                if (op->stage >= 1 && vhub_device_is_connected(d))
                        device_mark_lost(d, op->error.detail);
                op_complete_call(d, op, r);
                return;
        }
        for (unsigned i = 0; i < d->queues; i++)
                device_ring_close(d, i);
        for (unsigned i = 0; i < op->u.start.n_vrings; i++)
                device_ring_commit(d, &op->u.start.vrings[i]);
        d->acked_features = op->u.start.features;
        device_set_state(d, VHUB_DEV_RUNNING, "rings started");
        op_complete_call(d, op, 0);
}

/*
 * spec GET_VRING_BASE: with GET_VRING_BASE_INFLIGHT the back-end "may
 * suspend in-flight I/O requests and record them" in the inflight region
 * (GET_VRING_BASE_SKIP_DRAIN: must).  The region stays with the device and
 * goes back with SET_INFLIGHT_FD at the next start, where the back-end
 * resubmits them; here they are counted for the VMM.  Every request fetched
 * and not used is suspended, so the count is base - used index.
 */
static int32_t stop_count_suspended(struct vhub_device *d, unsigned i) {
        const struct vhub_vring *v = &d->vrings[i];
        uint16_t used_idx = 0;
        unsigned count = 0;
        int r;

        /* a packed ring's region is inflight_info_packed, and its used
         * position is not in guest memory: not counted */
        if (!dev_has_pf(d, VHU_PF_GET_VRING_BASE_INFLIGHT) || d->inflight_fd < 0 ||
            features_packed(d->acked_features))
                return -1;
        r = vhub_mem_table_read(&d->vm->mem, v->used + 2, &used_idx, sizeof(used_idx));
        if (r == 0)
                r = vhub_inflight_count_split(d->inflight_fd, d->inflight_size, d->inflight_queue_size,
                                              i, used_idx, &count);
        if (r < 0) {
                device_log(d, LOG_WARNING, NULL, "ring %u: cannot read its inflight region: %s", i,
                           strerror(-r));
                return -1;
        }
        if (count != (uint16_t) (v->base - used_idx))
                device_log(d, LOG_WARNING, NULL,
                           "ring %u stopped at %u with used index %u, but %u requests are recorded in flight",
                           i, v->base, used_idx, count);
        else if (count > 0)
                device_log(d, LOG_INFO, NULL,
                           "ring %u stopped at %u with %u requests suspended in the inflight region", i,
                           v->base, count);
        return (int32_t) count;
}

void stop_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (r < 0) {
                op_complete_call(d, op, r);
                return;
        }
        if (op->call) {
                struct vhub_vring_base *bases;
                unsigned n = 0;

                for (unsigned i = 0; i < d->queues; i++)
                        n += d->vrings[i].configured;
                /* sized to the rings that ran, not to the most a device may have */
                bases = vhub_call_own(op->call, n, sizeof(*bases));
                if (n && !bases)        /* the rings still stop below; the call fails */
                        device_op_error(op, VHUB_ERR_INTERNAL, NULL, "out of memory");
                n = 0;
                for (unsigned i = 0; bases && i < d->queues; i++)
                        if (d->vrings[i].configured) {
                                bases[n].index = i;
                                bases[n].base = d->vrings[i].base;
                                bases[n].inflight = stop_count_suspended(d, i);
                                n++;
                        }
                op->call->out.device_stop.vrings = bases;
                op->call->out.device_stop.n_vrings = n;
        }
        for (unsigned i = 0; i < d->queues; i++)
                device_ring_close(d, i);
        device_set_state(d, VHUB_DEV_STOPPED, "rings stopped");
        op_complete_call(d, op, op->result);
}

void remove_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        d->destroy_pending = true;
        /* before device.remove answers, as every event of a call */
        device_announce_removed(d);
        op_complete_call(d, op, 0); /* a back-end that fails its last stop changes nothing */
}

void reset_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (r == 0) {
                for (unsigned i = 0; i < d->queues; i++)
                        device_ring_close(d, i);
                /* a fresh inflight buffer after a reset (spec: GET_INFLIGHT_FD) */
                device_set_inflight(d, -1);
                d->acked_features = 0;
                device_set_state(d, VHUB_DEV_READY, "reset");
        }
        op_complete_call(d, op, r);
}

void log_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        vhub_vm_batch_device_done(d->vm, op->u.log.batch, d, d->removing ? 0 : r, &op->error);
}
