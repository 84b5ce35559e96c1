/* SPDX-License-Identifier: MIT */
/*
 * The stages of every device operation.  A stage queues its requests at
 * once; op_on_reply() records what each reply says; op_complete() commits
 * the op's effect on the model (or undoes it) and answers its call.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-backend-channel.h"
#include "vhub-backend-conn.h"
#include "vhub-context.h"
#include "vhub-device-internal.h"
#include "vhub-log.h"
#include "vhub-vm.h"

#define REQ(r) vhu_request_name(VHU_DIR_FRONTEND, (r))

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
        if (op->kind == VHUB_OP_SINGLE && op->u.single.fd >= 0)
                close(op->u.single.fd);
        if (op->kind == VHUB_OP_GET_SHARED && op->u.shared.fd >= 0)
                close(op->u.shared.fd);
        free(op->restored);
        free(op);
}

/* A u64 REPLY_ACK: 0 is success. */
static void check_ack(struct vhub_device *d, struct vhub_op *op, uint32_t request,
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

/* ---- memory sync: make the back-end's table equal to the VM's target ---- */

static int mem_sync_prepare(struct vhub_device *d, struct vhub_op *op) {
        const struct vhub_region **target;
        struct vhub_vm *vm = d->vm;
        size_t n;
        int r;

        r = vhub_vm_memory_target(vm, &target, &n);
        if (r < 0)
                return device_op_error(op, VHUB_ERR_INTERNAL, NULL, "out of memory");
        op->u.mem.target_ids = calloc(n ? n : 1, sizeof(uint64_t));
        op->u.mem.add = calloc(n ? n : 1, sizeof(struct vhub_region));
        op->u.mem.remove_ids = calloc(d->n_shadow ? d->n_shadow : 1, sizeof(uint64_t));
        op->u.mem.remove = calloc(d->n_shadow ? d->n_shadow : 1, sizeof(struct vhub_region));
        if (!op->u.mem.target_ids || !op->u.mem.add || !op->u.mem.remove_ids || !op->u.mem.remove) {
                free(target);
                return device_op_error(op, VHUB_ERR_INTERNAL, NULL, "out of memory");
        }
        op->u.mem.n_target = n;
        for (size_t i = 0; i < n; i++)
                op->u.mem.target_ids[i] = target[i]->id;

        if (n > d->max_mem_slots) {
                free(target);
                return device_op_error(op, VHUB_ERR_LIMIT, NULL,
                                       "device %s takes at most %u memory regions", d->name,
                                       d->max_mem_slots);
        }
        if (!dev_has_pf(d, VHU_PF_CONFIGURE_MEM_SLOTS)) {
                bool same = n == d->n_shadow;

                for (size_t i = 0; same && i < n; i++)
                        same = vhub_device_shadow_has(d, target[i]->id);
                op->u.mem.whole_table = !same;
                for (size_t i = 0; i < n; i++)
                        op->u.mem.add[i] = *target[i];
                op->u.mem.n_add = same ? 0 : n;
                free(target);
                if (!same && n == 0)
                        return device_op_error(op, VHUB_ERR_REGION, REQ(VHU_REQ_SET_MEM_TABLE),
                                               "device %s cannot drop its last memory region: its back-end lacks CONFIGURE_MEM_SLOTS",
                                               d->name);
                return 0;
        }
        for (size_t i = 0; i < d->n_shadow; i++) {
                bool keep = false;

                for (size_t k = 0; !keep && k < n; k++)
                        keep = target[k]->id == d->shadow[i];
                if (!keep) {
                        const struct vhub_region *reg = vhub_vm_region_by_id(vm, d->shadow[i]);

                        op->u.mem.remove_ids[op->u.mem.n_remove] = d->shadow[i];
                        if (reg)
                                op->u.mem.remove[op->u.mem.n_remove] = *reg;
                        op->u.mem.n_remove++;
                }
        }
        for (size_t k = 0; k < n; k++)
                if (!vhub_device_shadow_has(d, target[k]->id))
                        op->u.mem.add[op->u.mem.n_add++] = *target[k];
        free(target);
        return 0;
}

static void region_to_wire(const struct vhub_region *r, struct vhu_mem_region *w) {
        w->gpa = r->gpa;
        w->size = r->size;
        w->uaddr = r->uaddr;
        w->mmap_offset = r->offset;
}

static int mem_sync_send(struct vhub_device *d, struct vhub_op *op) {
        bool ack = device_need_reply(d);
        struct vhu_msg m;
        int r;

        if (op->u.mem.whole_table) {
                struct vhu_mem_region regs[VHU_MEM_TABLE_MAX_REGIONS];
                int fds[VHU_MEM_TABLE_MAX_REGIONS];

                for (size_t i = 0; i < op->u.mem.n_add; i++) {
                        region_to_wire(&op->u.mem.add[i], &regs[i]);
                        fds[i] = op->u.mem.add[i].fd;
                }
                r = vhu_msg_build_mem_table(&m, ack, regs, fds, (unsigned)op->u.mem.n_add);
                if (r < 0)
                        return device_op_error(op, VHUB_ERR_INTERNAL, REQ(VHU_REQ_SET_MEM_TABLE),
                                               "cannot build SET_MEM_TABLE: %s", strerror(-r));
                return device_send(d, op, &m, TAG(TAGK_MEM_TABLE, 0));
        }
        /* spec: REM before ADD, so a back-end at its slot limit can take the new one */
        for (size_t i = 0; i < op->u.mem.n_remove; i++) {
                struct vhu_mem_region w;

                region_to_wire(&op->u.mem.remove[i], &w);
                vhu_msg_build_mem_single(&m, VHU_REQ_REM_MEM_REG, ack, &w, -1);
                r = device_send(d, op, &m, TAG(TAGK_MEM_REMOVE, i));
                if (r < 0)
                        return r;
        }
        for (size_t i = 0; i < op->u.mem.n_add; i++) {
                struct vhu_mem_region w;

                region_to_wire(&op->u.mem.add[i], &w);
                vhu_msg_build_mem_single(&m, VHU_REQ_ADD_MEM_REG, ack, &w, op->u.mem.add[i].fd);
                r = device_send(d, op, &m, TAG(TAGK_MEM_ADD, i));
                if (r < 0)
                        return r;
        }
        return 0;
}

static void mem_sync_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                              uint32_t tag, struct vhu_msg *reply) {
        size_t i = TAG_INDEX(tag);

        check_ack(d, op, request, reply);
        if (reply->payload.u64 != 0)
                return;
        switch (TAG_KIND(tag)) {
        case TAGK_MEM_ADD:
                if (i < op->u.mem.n_add)
                        shadow_add(d, op->u.mem.add[i].id);
                break;
        case TAGK_MEM_REMOVE:
                if (i < op->u.mem.n_remove)
                        shadow_remove(d, op->u.mem.remove_ids[i]);
                break;
        case TAGK_MEM_TABLE:
                shadow_clear(d);
                for (size_t k = 0; k < op->u.mem.n_target; k++)
                        shadow_add(d, op->u.mem.target_ids[k]);
                break;
        default:
                break;
        }
}

/* Without REPLY_ACK nothing was acknowledged one by one: the barrier
 * proved the back-end processed all of it. */
static void mem_sync_commit_unacked(struct vhub_device *d, struct vhub_op *op) {
        if (device_need_reply(d))
                return;
        if (op->u.mem.whole_table) {
                shadow_clear(d);
                for (size_t k = 0; k < op->u.mem.n_target; k++)
                        shadow_add(d, op->u.mem.target_ids[k]);
                return;
        }
        for (size_t i = 0; i < op->u.mem.n_remove; i++)
                shadow_remove(d, op->u.mem.remove_ids[i]);
        for (size_t i = 0; i < op->u.mem.n_add; i++)
                shadow_add(d, op->u.mem.add[i].id);
}

static void release_handshake_sync(struct vhub_device *d, struct vhub_op *op) {
        if (!op->holds_handshake_sync)
                return;
        op->holds_handshake_sync = false;
        d->vm->handshake_syncs--;
        vhub_vm_handshake_sync_done(d->vm);
}

/* ---- handshake ---- */

static int handshake_negotiate(struct vhub_device *d, struct vhub_op *op) {
        bool ack;
        uint64_t pf = 0;
        struct vhu_msg m;
        int r;

        if (op->hs_features & (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES)) {
                pf = op->hs_pf_offer & VHUB_SUPPORTED_PROTOCOL_FEATURES;
                /* spec "In-band notifications": only with BACKEND_REQ and REPLY_ACK */
                if (!(pf & VHU_PF_BIT(VHU_PF_BACKEND_REQ)) || !(pf & VHU_PF_BIT(VHU_PF_REPLY_ACK)))
                        pf &= ~VHU_PF_BIT(VHU_PF_INBAND_NOTIFICATIONS);
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
                d->channel = vhub_backend_channel_free(d->channel);
                channel_r = vhub_backend_channel_new(d, fds[0], &d->channel);
                if (channel_r < 0) {
                        close(fds[1]);
                        return device_op_error(op, VHUB_ERR_INTERNAL, REQ(VHU_REQ_SET_BACKEND_REQ_FD),
                                               "cannot set up the back-end channel: %s",
                                               strerror(-channel_r));
                }
                vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_BACKEND_REQ_FD, ack, NULL, 0,
                              &fds[1], 1);
                r = device_send(d, op, &m, 0);
                close(fds[1]); /* the writer holds its own copy */
                if (r < 0)
                        return r;
        }
        if (dev_has_pf(d, VHU_PF_CONFIGURE_MEM_SLOTS)) {
                vhu_msg_build_none(&m, VHU_REQ_GET_MAX_MEM_SLOTS, false);
                if ((r = device_send(d, op, &m, 0)) < 0)
                        return r;
        }
        return 0;
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

static int handshake_stage(struct vhub_device *d, struct vhub_op *op) {
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

static void handshake_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
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
        case VHU_REQ_ADD_MEM_REG:
        case VHU_REQ_REM_MEM_REG:
        case VHU_REQ_SET_MEM_TABLE:
                mem_sync_on_reply(d, op, request, tag, reply);
                break;
        default:
                check_ack(d, op, request, reply);
                break;
        }
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

/* After a loss: restart every ring at the used index in guest memory. */
static int start_rebase(struct vhub_device *d, struct vhub_op *op) {
        bool in_order = d->acked_features & (UINT64_C(1) << VHU_VIRTIO_F_IN_ORDER);
        bool inflight = dev_has_pf(d, VHU_PF_INFLIGHT_SHMFD) && d->inflight_fd >= 0;
        unsigned n = 0;

        op->restored = calloc(d->queues ? d->queues : 1, sizeof(*op->restored));
        if (!op->restored)
                return device_op_error(op, VHUB_ERR_INTERNAL, NULL, "out of memory");
        op->restore_exact = true;
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
                op->restored[n].index = i;
                op->restored[n].base = used_idx;
                /* counted when the back-end was lost: the driver may have
                 * queued more since, which the restart picks up anyway */
                op->restored[n].outstanding = v->loss_read ? (uint16_t)(v->loss_avail - v->loss_used)
                                                           : (uint16_t)(avail_idx - used_idx);
                if (op->restored[n].outstanding > 1 && !inflight && !in_order)
                        op->restore_exact = false;
                n++;
        }
        op->n_restored = n;
        return 0;
}

/* A ring's SET_VRING_ADDR: the VMM's user addresses of its three parts
 * (each must lie inside one region), the used ring's gpa for logging. */
static int vring_addr(const struct vhub_vm *vm, uint32_t index, uint32_t size, uint64_t desc,
                      uint64_t avail, uint64_t used, struct vhu_vring_addr *ret) {
        struct vhu_vring_addr a = { .index = index, .log = used };

        if (vhub_mem_table_gpa_to_uaddr(&vm->mem, desc, (uint64_t)size * 16, &a.desc) < 0 ||
            vhub_mem_table_gpa_to_uaddr(&vm->mem, avail, 6 + (uint64_t)size * 2, &a.avail) < 0 ||
            vhub_mem_table_gpa_to_uaddr(&vm->mem, used, 6 + (uint64_t)size * 8, &a.used) < 0)
                return -ERANGE;
        *ret = a;
        return 0;
}

static int send_vring(struct vhub_device *d, struct vhub_op *op, const struct vhub_vring *v) {
        bool ack = device_need_reply(d);
        struct vhu_vring_addr a;
        struct vhu_msg m;
        int r;

        if (vring_addr(d->vm, v->index, v->size, v->desc, v->avail, v->used, &a) < 0)
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

static int start_stage(struct vhub_device *d, struct vhub_op *op) {
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
                }
                return OP_STAGE_NEXT;
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
                return OP_STAGE_NEXT;
        case 2:
                if (!dev_protocol_features_on(d))
                        return OP_STAGE_NEXT;
                /* spec "Ring states": rings start disabled once PROTOCOL_FEATURES is on */
                for (unsigned i = 0; i < n; i++) {
                        if (!v[i].configured)
                                continue;
                        vhu_msg_build_state(&m, VHU_REQ_SET_VRING_ENABLE, ack, v[i].index, 1);
                        if ((r = device_send(d, op, &m, TAG(TAGK_VRING, v[i].index))) < 0)
                                return r;
                }
                return OP_STAGE_NEXT;
        case 3:
                if (!dev_has_pf(d, VHU_PF_STATUS))
                        return OP_STAGE_NEXT;
                /* DPDK's vhost starts nothing before DRIVER_OK */
                vhu_msg_build_u64(&m, VHU_REQ_SET_STATUS, ack,
                                  VHU_STATUS_ACKNOWLEDGE | VHU_STATUS_DRIVER |
                                          VHU_STATUS_FEATURES_OK | VHU_STATUS_DRIVER_OK);
                if ((r = device_send(d, op, &m, 0)) < 0)
                        return r;
                return OP_STAGE_NEXT;
        case 4: {
                /* one kick per ring, so a kick the driver wrote before the
                 * back-end watched its fd is never lost */
                uint64_t one = 1;

                for (unsigned i = 0; i < n; i++)
                        if (v[i].configured && v[i].kick_fd >= 0 &&
                            write(v[i].kick_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
                                device_log(d, LOG_WARNING, NULL, "kick on ring %u failed: %s",
                                           v[i].index, strerror(errno));
                return OP_STAGE_DONE;
        }
        }
        return OP_STAGE_DONE;
}

static void start_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                           uint32_t tag, struct vhu_msg *reply) {
        if (request == VHU_REQ_GET_INFLIGHT_FD) {
                int fd = -1;

                if (reply->n_fds == 1)
                        fd = vhu_msg_take_fd(reply, 0);
                if (fd < 0 || reply->payload.inflight.mmap_size == 0) {
                        if (fd >= 0)
                                close(fd);
                        device_op_error(op, VHUB_ERR_BACKEND, REQ(request),
                                        "back-end gave no inflight buffer");
                        return;
                }
                if (d->inflight_fd >= 0)
                        close(d->inflight_fd);
                d->inflight_fd = fd;
                d->inflight_size = reply->payload.inflight.mmap_size;
                d->inflight_queue_size = reply->payload.inflight.queue_size;
                return;
        }
        check_ack(d, op, request, reply);
}

/* ---- stop ---- */

static int stop_stage(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_msg m;
        int r;

        if (op->stage > 0)
                return OP_STAGE_DONE;
        for (unsigned i = 0; i < d->queues; i++) {
                if (!d->vrings[i].configured)
                        continue;
                vhu_msg_build_state(&m, VHU_REQ_GET_VRING_BASE, false, i, 0);
                if ((r = device_send(d, op, &m, TAG(TAGK_VRING, i))) < 0)
                        return r;
        }
        return OP_STAGE_NEXT;
}

static void stop_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                          uint32_t tag, struct vhu_msg *reply) {
        unsigned i = TAG_INDEX(tag);

        if (request != VHU_REQ_GET_VRING_BASE) {
                check_ack(d, op, request, reply);
                return;
        }
        if (reply->payload.state.index != i || i >= d->queues) {
                device_op_error(op, VHUB_ERR_BACKEND, REQ(request),
                                "GET_VRING_BASE reply names ring %u, asked for %u",
                                reply->payload.state.index, i);
                return;
        }
        d->vrings[i].base = reply->payload.state.num;
}

/* ---- config ---- */

static int config_stage(struct vhub_device *d, struct vhub_op *op) {
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

static void config_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                            uint32_t tag, struct vhu_msg *reply) {
        if (request != VHU_REQ_GET_CONFIG) {
                check_ack(d, op, request, reply);
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

/* ---- mem sync (a member of a VM fan-out) ---- */

static int mem_sync_stage(struct vhub_device *d, struct vhub_op *op) {
        int r;

        if (op->stage > 0)
                return OP_STAGE_DONE;
        r = mem_sync_prepare(d, op);
        if (r < 0)
                return r;
        r = mem_sync_send(d, op);
        return r < 0 ? r : OP_STAGE_NEXT;
}

/* ---- remove ---- */

static int remove_stage(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_msg m;

        if (op->stage > 0 || !vhub_device_is_connected(d) || d->state != VHUB_DEV_RUNNING)
                return OP_STAGE_DONE;
        /* stop the rings so the back-end lets go of guest memory cleanly */
        for (unsigned i = 0; i < d->queues; i++) {
                if (!d->vrings[i].configured)
                        continue;
                vhu_msg_build_state(&m, VHU_REQ_GET_VRING_BASE, false, i, 0);
                if (device_send(d, op, &m, TAG(TAGK_VRING, i)) < 0)
                        return OP_STAGE_DONE;
        }
        return OP_STAGE_NEXT;
}

/* ---- single request ---- */

static int single_stage(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_msg m;
        int r;

        if (op->stage > 0)
                return OP_STAGE_DONE;
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

/* ---- reset ---- */

static int reset_stage(struct vhub_device *d, struct vhub_op *op) {
        bool ack = device_need_reply(d);
        struct vhu_msg m;
        int r;

        switch (op->stage) {
        case 0:
                if (d->state != VHUB_DEV_RUNNING)
                        return OP_STAGE_NEXT;
                for (unsigned i = 0; i < d->queues; i++) {
                        if (!d->vrings[i].configured)
                                continue;
                        vhu_msg_build_state(&m, VHU_REQ_GET_VRING_BASE, false, i, 0);
                        if ((r = device_send(d, op, &m, TAG(TAGK_VRING, i))) < 0)
                                return r;
                }
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

static int log_stage(struct vhub_device *d, struct vhub_op *op) {
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
                        if (vring_addr(d->vm, i, v->size, v->desc, v->avail, v->used, &a) < 0)
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

/* ---- GET_SHARED_OBJECT (this device exports what another looks up) ---- */

static int get_shared_stage(struct vhub_device *d, struct vhub_op *op) {
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

static void get_shared_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
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

static void single_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                            uint32_t tag, struct vhu_msg *reply) {
        if (request != VHU_REQ_SET_DEVICE_STATE_FD) {
                check_ack(d, op, request, reply);
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
                if (op->u.single.fd >= 0)
                        close(op->u.single.fd);
                /* the back-end's own channel: handed to the VMM in the result */
                op->u.single.fd = vhu_msg_take_fd(reply, 0);
                op->u.single.u64 = 1;
        }
}

static void ack_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                         struct vhu_msg *reply) {
        check_ack(d, op, request, reply);
}

/* ---- completion ---- */

static void complete_call(struct vhub_device *d, struct vhub_op *op, int r) {
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

static void handshake_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        release_handshake_sync(d, op);
        if (!op->restore) {
                if (r < 0) {
                        d->destroy_pending = true;
                        complete_call(d, op, r);
                        return;
                }
                d->handshaken = true;
                device_set_state(d, VHUB_DEV_READY);
                if (op->call) {
                        op->call->out.device_add.features = d->features;
                        op->call->out.device_add.protocol_features = d->protocol_features;
                        op->call->out.device_add.queues = d->queues;
                        op->call->out.device_add.max_mem_slots = d->max_mem_slots;
                }
                device_log(d, LOG_INFO, NULL,
                           "handshake done: features 0x%llx, protocol features 0x%llx, %u queues, %u memory slots",
                           (unsigned long long)d->features, (unsigned long long)d->protocol_features,
                           d->queues, d->max_mem_slots);
                complete_call(d, op, 0);
                return;
        }
        if (r < 0) {
                if (op->give_up)
                        device_give_up(d, op->error.detail);
                else if (vhub_device_is_connected(d))
                        device_mark_lost(d, op->error.detail); /* retried with backoff */
                return;
        }
        if (d->state_before_loss != VHUB_DEV_RUNNING)
                device_restored(d, NULL, 0, true);
}

static void start_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (op->restore) {
                if (r < 0) {
                        if (vhub_device_is_connected(d))
                                device_mark_lost(d, op->error.detail);
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
                complete_call(d, op, r);
                return;
        }
        for (unsigned i = 0; i < d->queues; i++) {
                vring_close_fds(&d->vrings[i]);
                d->vrings[i].configured = false;
        }
        for (unsigned i = 0; i < op->u.start.n_vrings; i++) {
                struct vhub_vring *src = &op->u.start.vrings[i];

                d->vrings[src->index] = *src;
                src->kick_fd = src->call_fd = src->err_fd = -1; /* moved */
        }
        d->acked_features = op->u.start.features;
        device_set_state(d, VHUB_DEV_RUNNING);
        complete_call(d, op, 0);
}

static void stop_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (r < 0) {
                complete_call(d, op, r);
                return;
        }
        if (op->call) {
                unsigned n = 0;

                for (unsigned i = 0; i < d->queues; i++)
                        if (d->vrings[i].configured) {
                                op->call->out.device_stop.vrings[n].index = i;
                                op->call->out.device_stop.vrings[n].base = d->vrings[i].base;
                                n++;
                        }
                op->call->out.device_stop.n_vrings = n;
        }
        for (unsigned i = 0; i < d->queues; i++) {
                vring_close_fds(&d->vrings[i]);
                d->vrings[i].configured = false;
        }
        device_set_state(d, VHUB_DEV_STOPPED);
        complete_call(d, op, 0);
}

static void config_get_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (r == 0 && op->call) {
                op->call->out.config_get.size = op->u.config.size;
                memcpy(op->call->out.config_get.data, op->u.config.data, op->u.config.size);
        }
        complete_call(d, op, r);
}

static void mem_sync_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (r == 0)
                mem_sync_commit_unacked(d, op);
        /* a device on its way out does not fail its VM's change */
        if (r < 0 && d->removing)
                r = 0;
        if (op->mem_op) {
                if (r < 0 && !op->error.device[0])
                        snprintf(op->error.device, sizeof(op->error.device), "%s", d->name);
                vhub_vm_device_synced(d->vm, d, r, &op->error);
        }
}

static void remove_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        d->destroy_pending = true;
        complete_call(d, op, 0); /* a back-end that fails its last stop changes nothing */
}

static void reset_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (r == 0) {
                for (unsigned i = 0; i < d->queues; i++) {
                        vring_close_fds(&d->vrings[i]);
                        d->vrings[i].configured = false;
                }
                /* a fresh inflight buffer after a reset (spec: GET_INFLIGHT_FD) */
                if (d->inflight_fd >= 0)
                        close(d->inflight_fd);
                d->inflight_fd = -1;
                d->acked_features = 0;
                device_set_state(d, VHUB_DEV_READY);
        }
        complete_call(d, op, r);
}

static void log_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        vhub_vm_batch_device_done(d->vm, op->u.log.batch, d, d->removing ? 0 : r, &op->error);
}

static void get_shared_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        struct vhub_device *req = vhub_vm_find_device(d->vm, op->u.shared.requester);
        int fd = r == 0 ? op->u.shared.fd : -1;

        if (fd >= 0)
                op->u.shared.fd = -1; /* handed over below, or closed */
        if (req && req->channel)
                vhub_backend_channel_lookup_done(req->channel, op->u.shared.token, fd);
        else if (fd >= 0)
                close(fd);
}

static void single_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        if (r == 0 && op->call && op->u.single.request == VHU_REQ_SET_DEVICE_STATE_FD) {
                op->call->out.state_fd.fd = op->u.single.u64 ? op->u.single.fd : -1;
                if (op->u.single.u64)
                        op->u.single.fd = -1;
        }
        complete_call(d, op, r);
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
        [VHUB_OP_CONFIG_SET] = { "config-set", config_stage, config_on_reply, complete_call },
        [VHUB_OP_MEM_SYNC]   = { "memory-sync", mem_sync_stage, mem_sync_on_reply, mem_sync_complete },
        [VHUB_OP_REMOVE]     = { "remove", remove_stage, stop_on_reply, remove_complete },
        [VHUB_OP_SINGLE]     = { "request", single_stage, single_on_reply, single_complete },
        [VHUB_OP_RESET]      = { "reset", reset_stage, stop_on_reply, reset_complete },
        [VHUB_OP_LOG]        = { "dirty-log", log_stage, ack_on_reply, log_complete },
        [VHUB_OP_GET_SHARED] = { "get-shared-object", get_shared_stage, get_shared_on_reply, get_shared_complete },
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
        if (r < 0)
                device_log(d, LOG_INFO, op->error.request, "%s failed: %s", vhub_op_kind_to_string(op->kind),
                           op->error.detail);
        op_classes[op->kind].complete(d, op, r);
}

/* ---- public entry points ---- */

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
                if (vp[i].kick_fd < 0 || vp[i].call_fd < 0) {
                        vhub_error_set(&err, VHUB_ERR_PARAMS, "vrings[%u] needs kick and call fds", i);
                        goto fail;
                }
                /* the daemon writes to them (the start kick, in-band calls): a
                 * full blocking pipe in their place would stall the loop */
                if (!is_eventfd(vp[i].kick_fd) || !is_eventfd(vp[i].call_fd) ||
                    (vp[i].err_fd >= 0 && !is_eventfd(vp[i].err_fd))) {
                        vhub_error_set(&err, VHUB_ERR_PARAMS, "vrings[%u].%s must be an eventfd", i,
                                       !is_eventfd(vp[i].kick_fd)   ? "kick"
                                       : !is_eventfd(vp[i].call_fd) ? "call"
                                                                    : "err");
                        goto fail;
                }
                if (vp[i].desc % 16 || vp[i].avail % 2 || vp[i].used % 4) {
                        vhub_error_set(&err, VHUB_ERR_PARAMS,
                                       "vrings[%u]: desc must be 16-, avail 2- and used 4-byte aligned", i);
                        goto fail;
                }
                if (vring_addr(d->vm, vp[i].index, vp[i].size, vp[i].desc, vp[i].avail, vp[i].used, &dummy) < 0) {
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

void vhub_device_stop(struct vhub_device *d, struct vhub_call *call) {
        struct vhub_error err;
        struct vhub_op *op;

        if (!device_check_usable(d, call))
                return;
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
        if (!dev_has_pf(d, feature)) {
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
        op->u.single.size = size;
        if (size)
                memcpy(op->u.single.payload, payload, size);
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
