/* SPDX-License-Identifier: MIT */
/*
 * MEM_SYNC: make a back-end's memory table equal to what its VM wants
 * (REM_MEM_REG before ADD_MEM_REG, or one SET_MEM_TABLE), tracking what it
 * has mapped in the device's shadow.  Also used by the handshake.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-device-vmm-internal.h"
#include "vhub-vm.h"

/* The table the back-end must hold: the VM's, or a front-door device's own
 * (its VMM's, docs/front-door.md). */
static int device_memory_target(const struct vhub_device *d, const struct vhub_op *op,
                                const struct vhub_region ***ret_regions, size_t *ret_n) {
        if (dev_is_front_door(d))
                return vmm_memory_target(d, op, ret_regions, ret_n);
        return vhub_vm_memory_target(d->vm, ret_regions, ret_n);
}

static const struct vhub_region *device_region_by_id(const struct vhub_device *d, uint64_t id) {
        return dev_is_front_door(d) ? vmm_region_by_id(d, id) : vhub_vm_region_by_id(d->vm, id);
}

/* ---- memory sync: make the back-end's table equal to the VM's target ---- */

int mem_sync_prepare(struct vhub_device *d, struct vhub_op *op) {
        const struct vhub_region **target;
        size_t n;
        int r;

        r = device_memory_target(d, op, &target, &n);
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
                        const struct vhub_region *reg = device_region_by_id(d, d->shadow[i]);

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

int mem_sync_send(struct vhub_device *d, struct vhub_op *op) {
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

void mem_sync_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                              uint32_t tag, struct vhu_msg *reply) {
        size_t i = TAG_INDEX(tag);

        op_check_ack(d, op, request, reply);
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
void mem_sync_commit_unacked(struct vhub_device *d, struct vhub_op *op) {
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

/* The handshake's sync and a fan-out member hold copies (fds borrowed). */
void mem_sync_free(struct vhub_op *op) {
        free(op->u.mem.add);
        free(op->u.mem.remove);
        free(op->u.mem.remove_ids);
        free(op->u.mem.target_ids);
}

/* ---- mem sync (a member of a VM fan-out) ---- */

int mem_sync_stage(struct vhub_device *d, struct vhub_op *op) {
        int r;

        if (op->stage > 0)
                return OP_STAGE_DONE;
        r = mem_sync_prepare(d, op);
        if (r < 0)
                return r;
        r = mem_sync_send(d, op);
        return r < 0 ? r : OP_STAGE_NEXT;
}

void mem_sync_complete(struct vhub_device *d, struct vhub_op *op, int r) {
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
