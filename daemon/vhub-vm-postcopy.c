/* SPDX-License-Identifier: MIT */
/*
 * Postcopy migration, the VM as its destination (spec "Postcopy"): advise
 * (every back-end opens a userfaultfd and hands it over), listen (every
 * back-end maps the VM's memory so that touching a missing page faults to
 * the VMM), end.  Each step is one POSTCOPY op on every device at once (a
 * VM batch, like dirty logging); the call answers when all have.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhub-device-internal.h"
#include "vhub-log.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

static const char *const step_names[] = {
        [VHUB_POSTCOPY_ADVISE] = "advise",
        [VHUB_POSTCOPY_LISTEN] = "listen",
        [VHUB_POSTCOPY_END] = "end",
};

void vhub_vm_batch_free(struct vhub_vm_batch *b) {
        if (!b)
                return;
        for (unsigned i = 0; i < b->n_postcopy; i++) {
                b->postcopy[i].ufd = vhu_safe_close(b->postcopy[i].ufd);
                free(b->postcopy[i].regions);
        }
        free(b->postcopy);
        free(b);
}

static void vm_postcopy_finish(struct vhub_vm *vm, struct vhub_vm_batch *b) {
        struct vhub_call *call = b->call;

        vm->postcopy_batch = NULL;
        switch (b->postcopy_step) {
        case VHUB_POSTCOPY_ADVISE:
                if (!b->failed)
                        vm->postcopy = VHUB_VM_POSTCOPY_ADVISED;
                break;
        case VHUB_POSTCOPY_LISTEN:
                /* even a partial listen needs an end: some back-ends fault now */
                vm->postcopy = VHUB_VM_POSTCOPY_LISTENING;
                break;
        default:
                vm->postcopy = VHUB_VM_POSTCOPY_OFF;
                break;
        }
        vhub_log_vm(b->failed ? LOG_WARNING : LOG_INFO, vm, "postcopy %s %s", step_names[b->postcopy_step],
                    b->failed ? "failed" : "done");
        if (b->failed) {
                vhub_call_fail(call, &b->error);
        } else if (call) {
                call->out.postcopy.devices = b->postcopy;
                call->out.postcopy.n_devices = b->n_postcopy;
                b->postcopy = NULL;
                b->n_postcopy = 0;
                vhub_call_complete(call, 0);
        }
        vhub_vm_batch_free(b);
}

void vhub_vm_postcopy_device_done(struct vhub_vm *vm, struct vhub_vm_batch *b, struct vhub_device *dev,
                                  int r, const struct vhub_error *err, int ufd,
                                  struct vhub_postcopy_region *regions, unsigned n_regions) {
        if (r < 0 && !b->failed) {
                b->failed = true;
                vhub_error_copy(&b->error, err);
                if (!b->error.device[0])
                        snprintf(b->error.device, sizeof(b->error.device), "%s", dev->name);
        }
        if (r == 0 && b->n_postcopy < b->cap_postcopy) {
                struct vhub_postcopy_device *pd = &b->postcopy[b->n_postcopy++];

                snprintf(pd->device, sizeof(pd->device), "%s", dev->name);
                pd->ufd = ufd;
                pd->regions = regions;
                pd->n_regions = n_regions;
        } else {
                vhu_safe_close(ufd);
                free(regions);
        }
        if (--b->outstanding == 0)
                vm_postcopy_finish(vm, b);
}

/* Whether every device can take this step; err names the first that cannot. */
static int vm_postcopy_check(struct vhub_vm *vm, unsigned step, struct vhub_error *err) {
        struct vhub_device *d;

        if (vm->postcopy_batch)
                return vhub_error_set(err, VHUB_ERR_STATE, "a postcopy step is already in progress");
        if (step == VHUB_POSTCOPY_ADVISE && vm->postcopy != VHUB_VM_POSTCOPY_OFF)
                return vhub_error_set(err, VHUB_ERR_STATE, "postcopy was already advised");
        if (step == VHUB_POSTCOPY_LISTEN && vm->postcopy != VHUB_VM_POSTCOPY_ADVISED)
                return vhub_error_set(err, VHUB_ERR_STATE, "postcopy listen needs advise first%s",
                                      vm->postcopy == VHUB_VM_POSTCOPY_LISTENING ? " (already listening)" : "");
        if (step == VHUB_POSTCOPY_END && vm->postcopy == VHUB_VM_POSTCOPY_OFF)
                return vhub_error_set(err, VHUB_ERR_STATE, "postcopy was not advised");
        if (step != VHUB_POSTCOPY_END && !TAILQ_FIRST(&vm->devices))
                return vhub_error_set(err, VHUB_ERR_STATE, "VM %s has no devices", vm->name);
        if (step == VHUB_POSTCOPY_ADVISE && vm->logging)
                return vhub_error_set(err, VHUB_ERR_STATE, "VM %s is logging dirty memory (a source, not a destination)",
                                      vm->name);
        if (step == VHUB_POSTCOPY_LISTEN && vm->mem.n > VHU_MEM_TABLE_MAX_REGIONS)
                return vhub_error_set(err, VHUB_ERR_LIMIT,
                                      "VM %s has %zu memory regions; postcopy registers them with one SET_MEM_TABLE (at most %d)",
                                      vm->name, vm->mem.n, VHU_MEM_TABLE_MAX_REGIONS);
        if (step == VHUB_POSTCOPY_LISTEN && !TAILQ_EMPTY(&vm->mem_ops))
                return vhub_error_set(err, VHUB_ERR_STATE, "VM %s is changing its memory", vm->name);
        if (step == VHUB_POSTCOPY_END)
                return 0;
        TAILQ_FOREACH(d, &vm->devices, link) {
                if (d->removing)
                        continue;
                if (!vhub_device_is_connected(d) || !d->handshaken)
                        return vhub_error_set_backend(err, VHUB_ERR_BACKEND, d->name, NULL,
                                                      "device %s is %s", d->name,
                                                      vhub_device_state_to_string(d->state));
                /* the reply dance of SET_MEM_TABLE in postcopy mode is acked */
                if (!dev_has_pf(d, VHU_PF_PAGEFAULT) || !dev_has_pf(d, VHU_PF_REPLY_ACK))
                        return vhub_error_set(err, VHUB_ERR_UNSUPPORTED,
                                              "device %s cannot do postcopy (needs PAGEFAULT and REPLY_ACK)",
                                              d->name);
                /* its rings would point into mappings the listen replaces */
                if (step == VHUB_POSTCOPY_LISTEN && d->state == VHUB_DEV_RUNNING)
                        return vhub_error_set(err, VHUB_ERR_STATE,
                                              "device %s is running; postcopy listen comes before device.start",
                                              d->name);
        }
        return 0;
}

void vhub_vm_postcopy(struct vhub_vm *vm, unsigned step, struct vhub_call *call) {
        struct vhub_error err = { 0 };
        struct vhub_vm_batch *b;
        struct vhub_device *d;

        if (step > VHUB_POSTCOPY_END) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "unknown postcopy step %u", step);
                goto fail;
        }
        if (vhub_vm_check_no_front_door(vm, "postcopy through vm.postcopy", &err) < 0 ||
            vm_postcopy_check(vm, step, &err) < 0)
                goto fail;
        b = calloc(1, sizeof(*b));
        if (!b || !(b->postcopy = calloc(vm->n_devices ? vm->n_devices : 1, sizeof(*b->postcopy)))) {
                free(b);
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        b->cap_postcopy = vm->n_devices ? vm->n_devices : 1; /* devices added later take no part */
        b->kind = VHUB_BATCH_POSTCOPY;
        b->postcopy_step = step;
        b->call = call;
        vm->postcopy_batch = b;
        b->outstanding = 1; /* held during the loop */
        TAILQ_FOREACH(d, &vm->devices, link) {
                if (d->removing || !vhub_device_is_connected(d) || !d->handshaken)
                        continue;
                if (step == VHUB_POSTCOPY_END && !dev_has_pf(d, VHU_PF_PAGEFAULT))
                        continue;
                b->outstanding++;
                if (vhub_device_queue_postcopy(d, b, step) < 0) {
                        b->outstanding--;
                        if (!b->failed) {
                                b->failed = true;
                                vhub_error_set(&b->error, VHUB_ERR_INTERNAL, "out of memory");
                        }
                }
        }
        if (--b->outstanding == 0)
                vm_postcopy_finish(vm, b);
        return;
fail:
        vhub_call_fail(call, &err);
}
