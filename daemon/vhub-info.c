/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <sys/time.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-device-vmm-internal.h"
#include "vhub-info.h"
#include "vhub-time.h"
#include "vhub-vm.h"

/* A list the methods answer with: a VM being destroyed is already gone. */
static bool vm_listed(const struct vhub_vm *vm, uid_t uid) {
        return !vm->destroying && vhub_vm_visible_to(vm, uid);
}

void vhub_info_daemon(const struct vhub_context *ctx, uid_t uid, struct vhub_daemon_info *ret) {
        const struct vhub_vm *vm;

        *ret = (struct vhub_daemon_info){
                .uptime_usec = vhub_now_usec() - ctx->start_usec,
                .started_realtime_usec = ctx->start_realtime_usec,
                .protocol_features = VHUB_SUPPORTED_PROTOCOL_FEATURES,
                .restarts = ctx->restarts,
                .fd_store = vhub_commit_enabled(ctx),
        };
        TAILQ_FOREACH(vm, &ctx->vms, link)
                if (vm_listed(vm, uid)) {
                        ret->vms++;
                        ret->devices += vm->n_devices;
                }
}

/* Room for n items (at least one, so that a list of none is not NULL). */
static void *info_array(size_t n, size_t size) {
        return calloc(n ? n : 1, size);
}

/* A lingering VM's time left, in ms; false for a VM with an owner.  libevent
 * gives the deadline in the clock event_base_gettimeofday_cached() reads. */
static bool vm_linger_remaining_ms(const struct vhub_vm *vm, uint64_t *ret) {
        struct timeval deadline, now, left;

        if (vm->owner || vm->destroying || !evtimer_pending(vm->linger_timer, &deadline) ||
            event_base_gettimeofday_cached(vm->ctx->base, &now) < 0)
                return false;
        timersub(&deadline, &now, &left);
        *ret = left.tv_sec < 0 ? 0 : (uint64_t)left.tv_sec * 1000 + (uint64_t)left.tv_usec / 1000;
        return true;
}

static void vm_info(struct vhub_vm_info *i, struct vhub_vm *vm) {
        i->vm = vm;
        snprintf(i->name, sizeof(i->name), "%s", vm->name);
        i->uid = vm->uid;
        i->n_regions = vm->mem.n;
        i->n_devices = vm->n_devices;
        i->lingering = vm_linger_remaining_ms(vm, &i->linger_remaining_ms);
}

int vhub_info_vms(const struct vhub_context *ctx, uid_t uid, struct vhub_vm_info **ret, size_t *ret_n) {
        struct vhub_vm_info *v = info_array(ctx->n_vms, sizeof(*v));
        struct vhub_vm *vm;

        if (!v)
                return -ENOMEM;
        *ret = v;
        *ret_n = 0;
        TAILQ_FOREACH(vm, &ctx->vms, link)
                if (vm_listed(vm, uid))
                        vm_info(&v[(*ret_n)++], vm);
        return 0;
}

static void device_info(struct vhub_device_info *i, const struct vhub_device *d) {
        snprintf(i->name, sizeof(i->name), "%s", d->name);
        snprintf(i->socket, sizeof(i->socket), "%s", d->socket_path);
        i->state = d->state;
        i->mode = d->mode;
        i->face = d->face;
        i->features = d->features;
        i->acked_features = d->acked_features;
        i->protocol_features = d->protocol_features;
        i->queues = d->queues;
        i->reconnects = d->reconnects;
        snprintf(i->type, sizeof(i->type), "%s", d->type);
        i->front_door = d->vmm != NULL;
        if (d->vmm) {
                snprintf(i->vmm_socket, sizeof(i->vmm_socket), "%s", d->vmm->socket_path ? d->vmm->socket_path : "");
                i->vmm_connected = d->vmm->connected;
        }
}

int vhub_info_devices(const struct vhub_vm *vm, struct vhub_device_info **ret, size_t *ret_n) {
        struct vhub_device_info *v = info_array(vm->n_devices, sizeof(*v));
        const struct vhub_device *d;
        size_t n = 0;

        if (!v)
                return -ENOMEM;
        TAILQ_FOREACH(d, &vm->devices, link)
                device_info(&v[n++], d);
        *ret = v;
        *ret_n = n;
        return 0;
}

void vhub_info_device_stats(const struct vhub_device *d, struct vhub_device_stats_info *ret) {
        *ret = (struct vhub_device_stats_info){
                .state = d->state,
                .since_usec = vhub_now_usec() - d->stats.state_since_usec,
                .reconnects = d->reconnects,
                .counters = d->stats,
        };
}

int vhub_info_regions(const struct vhub_vm *vm, struct vhub_region_info **ret, size_t *ret_n) {
        struct vhub_region_info *v = info_array(vm->mem.n, sizeof(*v));

        if (!v)
                return -ENOMEM;
        for (size_t i = 0; i < vm->mem.n; i++) {
                const struct vhub_region *r = &vm->mem.regions[i];

                v[i] = (struct vhub_region_info){
                        .gpa = r->gpa, .size = r->size, .offset = r->offset, .uaddr = r->uaddr,
                };
        }
        *ret = v;
        *ret_n = vm->mem.n;
        return 0;
}

int vhub_info_shared_objects(const struct vhub_vm *vm, struct vhub_shared_object_info **ret,
                             size_t *ret_n) {
        struct vhub_shared_object_info *v = info_array(vm->shared.n, sizeof(*v));

        if (!v)
                return -ENOMEM;
        for (size_t i = 0; i < vm->shared.n; i++) {
                const struct vhub_shared_object *o = &vm->shared.objects[i];

                memcpy(v[i].uuid, o->uuid, sizeof(v[i].uuid));
                snprintf(v[i].exporter, sizeof(v[i].exporter), "%s", o->device ? o->device->name : "");
        }
        *ret = v;
        *ret_n = vm->shared.n;
        return 0;
}
