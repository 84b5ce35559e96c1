/* SPDX-License-Identifier: MIT */
/*
 * VMs and their memory: a region change goes to every connected device of
 * the VM at once (pipelined), and the call answers when all have applied
 * it.  If one refuses or is lost, those that applied it are rolled back to
 * the committed table; a device that cannot be rolled back is failed.
 * Memory changes of one VM are serialized; device handshakes sync against
 * the committed table and never overlap a change.  (vhub-vm.c for the VM.)
 */

#include <errno.h>
#include <fcntl.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhub-call.h"
#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-device.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhost-user.h"
#include "vhu-fd.h"

#include "vhub-vm-internal.h"

static void vm_mem_queue_run(struct vhub_vm *vm);

/* ---- memory ---- */

bool vhub_vm_memory_busy(const struct vhub_vm *vm) {
        const struct vhub_mem_op *op = TAILQ_FIRST(&vm->mem_ops);

        return op && op->phase != VHUB_MEM_PHASE_QUEUED;
}

const struct vhub_region *vhub_vm_region_by_id(const struct vhub_vm *vm, uint64_t id) {
        const struct vhub_region *r = vhub_mem_table_find_id(&vm->mem, id);
        const struct vhub_mem_op *op = TAILQ_FIRST(&vm->mem_ops);

        if (r)
                return r;
        if (op && op->phase != VHUB_MEM_PHASE_QUEUED && op->region.id == id)
                return &op->region;
        return NULL;
}

int vhub_vm_memory_target(const struct vhub_vm *vm, const struct vhub_region ***ret_regions,
                          size_t *ret_n) {
        const struct vhub_mem_op *op = TAILQ_FIRST(&vm->mem_ops);
        const struct vhub_region **v;
        size_t n = 0;

        v = calloc(vm->mem.n + 1, sizeof(*v));
        if (!v)
                return -ENOMEM;
        for (size_t i = 0; i < vm->mem.n; i++) {
                if (op && op->phase == VHUB_MEM_PHASE_APPLY && op->kind == VHUB_MEM_OP_REMOVE &&
                    vm->mem.regions[i].id == op->region.id)
                        continue;
                v[n++] = &vm->mem.regions[i];
        }
        if (op && op->phase == VHUB_MEM_PHASE_APPLY && op->kind == VHUB_MEM_OP_ADD)
                v[n++] = &op->region;
        *ret_regions = v;
        *ret_n = n;
        return 0;
}

static bool device_in_fanout(const struct vhub_device *d) {
        return !d->removing && d->mem_synced && vhub_device_is_connected(d);
}

/* Fan the active op's current phase out to every device that needs it. */
static void vm_mem_fanout(struct vhub_vm *vm, struct vhub_mem_op *op) {
        struct vhub_device *d, *next;

        /* hold one count so syncs that finish at once cannot end the phase early */
        op->outstanding = 1;
        for (d = TAILQ_FIRST(&vm->devices); d; d = next) {
                next = TAILQ_NEXT(d, link);
                if (!device_in_fanout(d))
                        continue;
                if (op->phase == VHUB_MEM_PHASE_ROLLBACK) {
                        /* only devices whose table differs from the committed one */
                        bool has = vhub_device_shadow_has(d, op->region.id);

                        if ((op->kind == VHUB_MEM_OP_ADD && !has) ||
                            (op->kind == VHUB_MEM_OP_REMOVE && has))
                                continue;
                }
                op->outstanding++;
                if (vhub_device_queue_mem_sync(d, op) < 0) {
                        op->outstanding--;
                        if (op->phase == VHUB_MEM_PHASE_APPLY && !op->failed) {
                                op->failed = true;
                                vhub_error_set_backend(&op->error, VHUB_ERR_INTERNAL, d->name, NULL,
                                                       "out of memory");
                        }
                }
        }
        op->outstanding--;
}

static void vm_mem_op_finish(struct vhub_vm *vm, struct vhub_mem_op *op) {
        struct vhub_call *call = op->call;

        TAILQ_REMOVE(&vm->mem_ops, op, link);
        vhub_fd_budget_vm_changed(vm);  /* the region's fd: into the table, or closed */
        if (!op->failed) {
                if (op->kind == VHUB_MEM_OP_ADD) {
                        /* commit: the table takes the fd */
                        if (vhub_mem_table_add(&vm->mem, &op->region) < 0) {
                                vhub_error_set(&op->error, VHUB_ERR_INTERNAL, "out of memory");
                                op->failed = true;
                        } else {
                                vm_fd_track(vm, vm->fd_group, vm->mem.regions[vm->mem.n - 1].fd,
                                            "region/%llu", (unsigned long long)op->region.id);
                                vm_log(vm, LOG_INFO, "memory region gpa 0x%llx size 0x%llx added",
                                       (unsigned long long)op->region.gpa,
                                       (unsigned long long)op->region.size);
                        }
                } else {
                        vm_region_untrack(vm, vhub_mem_table_find_gpa(&vm->mem, op->region.gpa));
                        vhub_mem_table_remove(&vm->mem, op->region.gpa, NULL);
                        vm_log(vm, LOG_INFO, "memory region gpa 0x%llx removed",
                               (unsigned long long)op->region.gpa);
                }
        }
        if (op->failed)
                vhub_call_fail(call, &op->error);
        else
                vhub_call_complete(call, 0);
        vm_mem_op_free(op);

        /* parked handshakes can sync now, then the next change may start */
        if (vm_resume_parked(vm))
                vm_mem_queue_run(vm);
}

static void vm_mem_op_step(struct vhub_vm *vm, struct vhub_mem_op *op) {
        while (op->outstanding == 0) {
                if (op->phase == VHUB_MEM_PHASE_APPLY && op->failed) {
                        op->phase = VHUB_MEM_PHASE_ROLLBACK;
                        vm_mem_fanout(vm, op);
                        continue;
                }
                vm_mem_op_finish(vm, op);
                return;
        }
}

void vhub_vm_device_synced(struct vhub_vm *vm, struct vhub_device *dev, int r,
                           const struct vhub_error *err) {
        struct vhub_mem_op *op = TAILQ_FIRST(&vm->mem_ops);

        if (!op || op->outstanding == 0)
                return;
        if (r < 0) {
                if (op->phase == VHUB_MEM_PHASE_APPLY && !op->failed) {
                        op->failed = true;
                        vhub_error_copy(&op->error, err);
                        if (!op->error.device[0])
                                snprintf(op->error.device, sizeof(op->error.device), "%s", dev->name);
                } else if (op->phase == VHUB_MEM_PHASE_ROLLBACK && vhub_device_is_connected(dev)) {
                        /* it holds a table nobody else has: never leave that silently */
                        vhub_log_vm_device(LOG_ERR, vm, dev->name, "memory rollback failed; failing the device");
                        vhub_device_fail_now(dev, "memory table rollback failed; the back-end's table is unknown");
                        if (op->error.detail[0]) {
                                size_t n = strlen(op->error.detail);

                                snprintf(op->error.detail + n, sizeof(op->error.detail) - n,
                                         "; device %s could not be rolled back and was failed",
                                         dev->name);
                        }
                }
        }
        if (--op->outstanding == 0)
                vm_mem_op_step(vm, op);
}

void vhub_vm_handshake_sync_done(struct vhub_vm *vm) {
        if (vm->handshake_syncs == 0)
                vm_mem_queue_run(vm);
}

/* A device whose handshake synced after an addition was queued was not
 * counted by vhub_vm_memory_add(): check its slots before anything is sent. */
static bool vm_mem_op_over_limit(struct vhub_vm *vm, const struct vhub_mem_op *op,
                                 struct vhub_error *err) {
        const struct vhub_device *d;

        if (op->kind != VHUB_MEM_OP_ADD)
                return false;
        TAILQ_FOREACH(d, &vm->devices, link) {
                if (!device_in_fanout(d) || vm->mem.n + 1 <= d->max_mem_slots)
                        continue;
                vhub_error_set(err, VHUB_ERR_LIMIT, "device %s takes at most %u memory regions%s",
                               d->name, d->max_mem_slots,
                               d->max_mem_slots == 8 ? " (SET_MEM_TABLE, no CONFIGURE_MEM_SLOTS)" : "");
                snprintf(err->device, sizeof(err->device), "%s", d->name);
                return true;
        }
        return false;
}

/* Start the queue head if nothing blocks it (refusing heads over a limit). */
static void vm_mem_queue_run(struct vhub_vm *vm) {
        struct vhub_error err = { 0 };
        struct vhub_mem_op *op;

        for (;;) {
                op = TAILQ_FIRST(&vm->mem_ops);
                if (!op || op->phase != VHUB_MEM_PHASE_QUEUED || vm->handshake_syncs > 0 || vm->freeing)
                        return;
                if (!vm_mem_op_over_limit(vm, op, &err))
                        break;
                TAILQ_REMOVE(&vm->mem_ops, op, link);
                vhub_call_fail(op->call, &err);
                vm_mem_op_free(op);
                vhub_fd_budget_vm_changed(vm);
        }
        op->phase = VHUB_MEM_PHASE_APPLY;
        vm_mem_fanout(vm, op);
        vm_mem_op_step(vm, op);
}

static int vm_mem_queue(struct vhub_vm *vm, struct vhub_mem_op *op) {
        TAILQ_INSERT_TAIL(&vm->mem_ops, op, link);
        vm_mem_queue_run(vm);
        return 0;
}

/* Regions once everything queued is applied (removals not counted: a
 * limit check must hold even if they fail). */
static size_t vm_regions_after_queue(const struct vhub_vm *vm) {
        const struct vhub_mem_op *op;
        size_t n = vm->mem.n;

        TAILQ_FOREACH(op, &vm->mem_ops, link)
                if (op->kind == VHUB_MEM_OP_ADD)
                        n++;
        return n;
}

void vhub_vm_memory_add(struct vhub_vm *vm, struct vhub_region *region, struct vhub_call *call) {
        const struct vhub_limits *lim = &vm->ctx->config->limits;
        struct vhub_error err = { 0 };
        struct vhub_mem_op *op, *q;
        struct vhub_device *d;
        size_t n_after;
        int r;

        if (vm->destroying) {
                vhub_error_set(&err, VHUB_ERR_NO_VM, "VM %s is being destroyed", vm->name);
                goto fail;
        }
        if (vhub_vm_check_no_front_door(vm, "vm.memory.add", &err) < 0)
                goto fail;
        if (vm->postcopy != VHUB_VM_POSTCOPY_OFF) {
                /* back-ends registered the table with their userfaultfd at listen */
                vhub_error_set(&err, VHUB_ERR_STATE, "VM %s is in postcopy; end it before changing memory",
                               vm->name);
                goto fail;
        }
        r = vhub_mem_table_check_new(&vm->mem, region, &err);
        if (r < 0)
                goto fail;
        /* also against additions still waiting in the queue */
        TAILQ_FOREACH(q, &vm->mem_ops, link) {
                struct vhub_mem_table pending = { .regions = &q->region, .n = 1, .cap = 1 };

                if (q->kind != VHUB_MEM_OP_ADD)
                        continue;
                if (vhub_mem_table_check_new(&pending, region, &err) < 0)
                        goto fail;
        }
        if (vm->logging && region->gpa + region->size > vm->log_size * 8 * VHU_LOG_PAGE) {
                vhub_error_set(&err, VHUB_ERR_STATE,
                               "dirty logging covers guest memory below 0x%llx; stop it before adding memory beyond",
                               (unsigned long long)(vm->log_size * 8 * VHU_LOG_PAGE));
                goto fail;
        }
        n_after = vm_regions_after_queue(vm) + 1;
        if (n_after > lim->regions_per_vm) {
                vhub_error_set(&err, VHUB_ERR_LIMIT, "VM %s would have %zu regions; the limit is %u",
                               vm->name, n_after, lim->regions_per_vm);
                goto fail;
        }
        TAILQ_FOREACH(d, &vm->devices, link) {
                if (d->removing || !d->handshaken)
                        continue;
                if (n_after > d->max_mem_slots) {
                        vhub_error_set(&err, VHUB_ERR_LIMIT,
                                       "device %s takes at most %u memory regions%s", d->name,
                                       d->max_mem_slots,
                                       d->max_mem_slots == 8 ? " (SET_MEM_TABLE, no CONFIGURE_MEM_SLOTS)" : "");
                        snprintf(err.device, sizeof(err.device), "%s", d->name);
                        goto fail;
                }
        }
        op = calloc(1, sizeof(*op));
        if (!op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        op->kind = VHUB_MEM_OP_ADD;
        op->region = *region;
        op->region.id = ++vm->ctx->next_region_id;
        vhub_changed(vm->ctx, NULL);    /* the id counter (the daemon's snapshot) */
        op->region.fd = VHU_TAKE_FD(region->fd); /* the op owns it until commit */
        op->call = call;
        vhub_fd_budget_vm_changed(vm);
        vm_mem_queue(vm, op);
        return;

fail:
        region->fd = vhu_safe_close(region->fd);
        vhub_call_fail(call, &err);
}

void vhub_vm_memory_remove(struct vhub_vm *vm, uint64_t gpa, struct vhub_call *call) {
        const struct vhub_region *r;
        struct vhub_error err = { 0 };
        struct vhub_mem_op *op;
        struct vhub_device *d;

        if (vm->destroying) {
                vhub_error_set(&err, VHUB_ERR_NO_VM, "VM %s is being destroyed", vm->name);
                goto fail;
        }
        if (vhub_vm_check_no_front_door(vm, "vm.memory.remove", &err) < 0)
                goto fail;
        if (vm->postcopy != VHUB_VM_POSTCOPY_OFF) {
                vhub_error_set(&err, VHUB_ERR_STATE, "VM %s is in postcopy; end it before changing memory",
                               vm->name);
                goto fail;
        }
        r = vhub_mem_table_find_gpa(&vm->mem, gpa);
        if (!r) {
                vhub_error_set(&err, VHUB_ERR_REGION, "VM %s has no region at gpa 0x%llx", vm->name,
                               (unsigned long long)gpa);
                goto fail;
        }
        TAILQ_FOREACH(op, &vm->mem_ops, link)
                if (op->kind == VHUB_MEM_OP_REMOVE && op->region.gpa == gpa) {
                        vhub_error_set(&err, VHUB_ERR_STATE, "region at gpa 0x%llx is already being removed",
                                       (unsigned long long)gpa);
                        goto fail;
                }
        TAILQ_FOREACH(d, &vm->devices, link)
                if (!d->removing && vhub_device_rings_in(d, r->gpa, r->size)) {
                        vhub_error_set(&err, VHUB_ERR_STATE,
                                       "region at gpa 0x%llx holds rings of running device %s; stop it first",
                                       (unsigned long long)gpa, d->name);
                        goto fail;
                }
        op = calloc(1, sizeof(*op));
        if (!op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        op->kind = VHUB_MEM_OP_REMOVE;
        op->region = *r;
        op->region.fd = -1; /* the table keeps it until commit */
        op->call = call;
        vm_mem_queue(vm, op);
        return;

fail:
        vhub_call_fail(call, &err);
}
