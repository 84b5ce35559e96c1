/* SPDX-License-Identifier: MIT */
/*
 * A VM's dirty log: started and stopped on every device at once as one
 * batch, undone when one fails (vhub-vm.c for the VM).
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

/* ---- dirty logging ---- */

static void vm_log_fanout(struct vhub_vm *vm, struct vhub_vm_batch *b, bool enable);

void vm_log_close(struct vhub_vm *vm) {
        vhub_fd_budget_vm_changed(vm);
        vm_fd_untrack(vm, vm->fd_group, vm->log_fd, "log");
        vm->log_fd = vhu_safe_close(vm->log_fd);
        vm->log_size = 0;
}

/* A start that failed: the devices that did start logging stop again (no
 * device keeps logging into a log nobody reads); the log closes after. */
static void vm_log_undo(struct vhub_vm *vm) {
        struct vhub_vm_batch *u = calloc(1, sizeof(*u));

        vm->logging = false;
        if (!u) {
                vm_log_close(vm);
                return;
        }
        u->kind = VHUB_BATCH_LOG_STOP;
        vm->log_batch = u;
        vm_log_fanout(vm, u, false);
}

static void vm_batch_finish(struct vhub_vm *vm, struct vhub_vm_batch *b) {
        struct vhub_call *call = b->call;

        vm->log_batch = NULL;
        if (b->kind == VHUB_BATCH_LOG_START) {
                if (b->failed) {
                        vhub_call_fail(call, &b->error);
                        vm_log_undo(vm);
                } else {
                        int fd = fcntl(vm->log_fd, F_DUPFD_CLOEXEC, 3);

                        if (fd < 0) {
                                vhub_error_set(&b->error, VHUB_ERR_INTERNAL, "dup: %s", strerror(errno));
                                vhub_call_fail(call, &b->error);
                                vm_log_undo(vm);
                        } else {
                                vm_log(vm, LOG_INFO, "dirty logging started (%llu bytes of log)",
                                       (unsigned long long)vm->log_size);
                                if (call) {
                                        call->out.dirty_log.fd = fd;
                                        call->out.dirty_log.size = vm->log_size;
                                        vhub_call_complete(call, 0);
                                } else {
                                        vhu_safe_close(fd);
                                }
                        }
                }
        } else {
                vm_log_close(vm);
                vm_log(vm, LOG_INFO, "dirty logging stopped");
                if (b->failed)
                        vhub_call_fail(call, &b->error);
                else
                        vhub_call_complete(call, 0);
        }
        free(b);
}

void vhub_vm_batch_device_done(struct vhub_vm *vm, struct vhub_vm_batch *b, struct vhub_device *dev,
                               int r, const struct vhub_error *err) {
        if (r < 0 && !b->failed) {
                b->failed = true;
                vhub_error_copy(&b->error, err);
                if (!b->error.device[0])
                        snprintf(b->error.device, sizeof(b->error.device), "%s", dev->name);
        }
        if (--b->outstanding == 0)
                vm_batch_finish(vm, b);
}

static void vm_log_fanout(struct vhub_vm *vm, struct vhub_vm_batch *b, bool enable) {
        struct vhub_device *d;

        b->outstanding = 1; /* held during the loop */
        TAILQ_FOREACH(d, &vm->devices, link) {
                if (d->removing || !vhub_device_is_connected(d) || !d->handshaken)
                        continue;
                b->outstanding++;
                if (vhub_device_queue_log(d, b, enable) < 0) {
                        b->outstanding--;
                        if (!b->failed) {
                                b->failed = true;
                                vhub_error_set(&b->error, VHUB_ERR_INTERNAL, "out of memory");
                        }
                }
        }
        if (--b->outstanding == 0)
                vm_batch_finish(vm, b);
}

void vhub_vm_dirty_log_start(struct vhub_vm *vm, struct vhub_call *call) {
        struct vhub_error err = { 0 };
        struct vhub_vm_batch *b;
        struct vhub_device *d;
        uint64_t end, size;
        int fd;

        if (vm->logging || vm->log_batch) {
                vhub_error_set(&err, VHUB_ERR_STATE, "dirty logging is already %s",
                               vm->log_batch ? "changing" : "on");
                goto fail;
        }
        /* the VMM logs through its own SET_LOG_BASE */
        if (vhub_vm_check_no_front_door(vm, "dirty logging through vm.dirty_log", &err) < 0)
                goto fail;
        end = vhub_mem_table_end(&vm->mem);
        if (end == 0) {
                vhub_error_set(&err, VHUB_ERR_STATE, "VM %s has no memory to log", vm->name);
                goto fail;
        }
        TAILQ_FOREACH(d, &vm->devices, link) {
                if (d->removing)
                        continue;
                if (!(d->protocol_features & VHU_PF_BIT(VHU_PF_LOG_SHMFD)) ||
                    !(d->features & (UINT64_C(1) << VHU_VIRTIO_F_LOG_ALL))) {
                        vhub_error_set(&err, VHUB_ERR_UNSUPPORTED,
                                       "device %s cannot log dirty memory (needs LOG_SHMFD and VHOST_F_LOG_ALL)",
                                       d->name);
                        snprintf(err.device, sizeof(err.device), "%s", d->name);
                        goto fail;
                }
        }
        /* one bit per 4 KiB page from gpa 0 to the end of the highest region */
        size = (end / VHU_LOG_PAGE + 7) / 8;
        size = (size + 4095) & ~(uint64_t)4095;
        fd = memfd_create("vhub-dirty-log", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)size) < 0) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "cannot create the log memfd: %s", strerror(errno));
                vhu_safe_close(fd);
                goto fail;
        }
        b = calloc(1, sizeof(*b));
        if (!b) {
                vhu_safe_close(fd);
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        b->kind = VHUB_BATCH_LOG_START;
        b->call = call;
        vm->log_fd = fd;
        vm_fd_track(vm, vm->fd_group, vm->log_fd, "log");
        vhub_fd_budget_vm_changed(vm);
        vm->log_size = size;
        vm->logging = true;
        vm->log_batch = b;
        vm_log_fanout(vm, b, true);
        return;
fail:
        vhub_call_fail(call, &err);
}

void vhub_vm_dirty_log_stop(struct vhub_vm *vm, struct vhub_call *call) {
        struct vhub_error err = { 0 };
        struct vhub_vm_batch *b;

        if (!vm->logging || vm->log_batch) {
                vhub_error_set(&err, VHUB_ERR_STATE, "dirty logging is %s",
                               vm->log_batch ? "changing" : "off");
                vhub_call_fail(call, &err);
                return;
        }
        b = calloc(1, sizeof(*b));
        if (!b) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                vhub_call_fail(call, &err);
                return;
        }
        b->kind = VHUB_BATCH_LOG_STOP;
        b->call = call;
        vm->logging = false;
        vm->log_batch = b;
        vm_log_fanout(vm, b, false);
}
