/* SPDX-License-Identifier: MIT */
/*
 * VMs: their fds, their names, their life (create, attach, linger,
 * destroy, free) and the shared objects their VMM exports.  The rest by
 * job, sharing vhub-vm-internal.h: vhub-vm-memory.c (a memory change
 * fanned out to every device), vhub-vm-dirty-log.c (dirty logging).
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

void vm_region_untrack(struct vhub_vm *vm, const struct vhub_region *r) {
        if (r)
                vm_fd_untrack(vm, vm->fd_group, r->fd, "region/%llu", (unsigned long long)r->id);
}

static void vm_shared_untrack(struct vhub_vm *vm, const struct vhub_shared_object *o) {
        char u[37];

        if (o->fd < 0)
                return;
        vhub_uuid_format(o->uuid, u);
        vm_fd_untrack(vm, vm->fd_group_shared, o->fd, "shared/%s", u);
}

void vhub_vm_foreach_fd(const struct vhub_vm *vm, const struct vhub_fd_visitor *v) {
        const struct vhub_mem_op *mop;
        const struct vhub_device *d;
        char u[37];

        for (size_t i = 0; i < vm->mem.n; i++)
                vm_fd_visit(vm, v, vm->mem.regions[i].fd, vm->fd_group, "region/%llu",
                            (unsigned long long)vm->mem.regions[i].id);
        TAILQ_FOREACH(mop, &vm->mem_ops, link)
                vm_fd_visit(vm, v, mop->region.fd, NULL, "region/%llu", (unsigned long long)mop->region.id);
        vm_fd_visit(vm, v, vm->log_fd, vm->fd_group, "log");
        if (vm->snap.fd >= 0) {
                char snap[VHUB_FD_GROUP_MAX];

                /* stored on its own, under its own name (vhub-commit.h) */
                vm_fd_visit(vm, v, vm->snap.fd, vhub_fd_group(snap, VHUB_SNAP_GROUP_VM, vm->id), "snapshot");
        }
        for (size_t i = 0; i < vm->shared.n; i++) {
                vhub_uuid_format(vm->shared.objects[i].uuid, u);
                vm_fd_visit(vm, v, vm->shared.objects[i].fd, vm->fd_group_shared, "shared/%s", u);
        }
        for (unsigned i = 0; vm->postcopy_batch && i < vm->postcopy_batch->n_postcopy; i++)
                vm_fd_visit(vm, v, vm->postcopy_batch->postcopy[i].ufd, NULL, "postcopy/%s",
                            vm->postcopy_batch->postcopy[i].device);
        TAILQ_FOREACH(d, &vm->devices, link)
                vhub_device_foreach_fd(d, v);
}

/* ---- names: hash lookups, never a walk over every VM or device ---- */

/* A VM's key: its uid and name (names are per uid). */
static uint64_t vm_name_hash(const struct vhub_context *ctx, uid_t uid, const char *name) {
        uint8_t key[sizeof(uint32_t) + VHUB_NAME_MAX];
        uint32_t u = (uint32_t)uid;
        size_t len = strnlen(name, VHUB_NAME_MAX);

        memcpy(key, &u, sizeof(u));
        memcpy(key + sizeof(u), name, len);
        return vhub_hash_bytes(&ctx->vms_by_name, key, sizeof(u) + len);
}

struct vhub_vm *vhub_vm_find(struct vhub_context *ctx, uid_t uid, const char *name) {
        uint64_t hash = vm_name_hash(ctx, uid, name);

        for (struct vhub_hash_node *n = vhub_hash_first(&ctx->vms_by_name, hash); n;
             n = vhub_hash_next(n, hash)) {
                struct vhub_vm *vm = vhub_hash_entry(n, struct vhub_vm, by_name);

                /* a VM being torn down is gone for its uid: its name can be used again */
                if (vm->uid == uid && !vm->destroying && strcmp(vm->name, name) == 0)
                        return vm;
        }
        return NULL;
}

bool vhub_vm_visible_to(const struct vhub_vm *vm, uid_t uid) {
        return vhub_uid_sees(uid, vm->uid);
}

const char *vhub_vm_name(const struct vhub_vm *vm) {
        return vm->name;
}

uid_t vhub_vm_uid(const struct vhub_vm *vm) {
        return vm->uid;
}

const struct vhub_owner *vhub_vm_owner(const struct vhub_vm *vm) {
        return vm->owner;
}

static uint64_t device_name_hash(const struct vhub_vm *vm, const char *name) {
        return vhub_hash_bytes(&vm->devices_by_name, name, strnlen(name, VHUB_NAME_MAX));
}

struct vhub_device *vhub_vm_find_device(struct vhub_vm *vm, const char *name) {
        uint64_t hash = device_name_hash(vm, name);

        for (struct vhub_hash_node *n = vhub_hash_first(&vm->devices_by_name, hash); n;
             n = vhub_hash_next(n, hash)) {
                struct vhub_device *d = vhub_hash_entry(n, struct vhub_device, by_name);

                if (strcmp(d->name, name) == 0)
                        return d;
        }
        return NULL;
}

void vhub_vm_link_device(struct vhub_vm *vm, struct vhub_device *d) {
        TAILQ_INSERT_TAIL(&vm->devices, d, link);
        vhub_hash_insert(&vm->devices_by_name, &d->by_name, device_name_hash(vm, d->name));
        vm->n_devices++;
        vm->ctx->n_devices++;
        if (vm->listed)
                vhub_fd_ledger_listed_add(vm->ctx, vm->uid, 0, 1);
        vhub_fd_budget_vm_changed(vm);
}

void vhub_vm_unlink_device(struct vhub_vm *vm, struct vhub_device *d) {
        TAILQ_REMOVE(&vm->devices, d, link);
        vhub_hash_remove(&vm->devices_by_name, &d->by_name);
        vm->n_devices--;
        vm->ctx->n_devices--;
        if (vm->listed)
                vhub_fd_ledger_listed_add(vm->ctx, vm->uid, 0, -1);
        vhub_fd_budget_vm_changed(vm);
}

/* A VM's own events: vm.created, vm.lingering, vm.destroyed. */
static void vm_emit(struct vhub_vm *vm, enum vhub_event_type type, const char *reason) {
        struct vhub_event ev = { .type = type, .vm = vm, .reason = reason, .linger_ms = vm->linger_ms };

        vhub_context_emit(vm->ctx, &ev);
}

static void vm_linger_expired(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vm *vm = userdata;

        vm_log(vm, LOG_INFO, "linger time of %llu ms passed without vm.attach; destroying",
               (unsigned long long)vm->linger_ms);
        vm->destroy_reason = VHUB_VM_DESTROYED_LINGER_EXPIRED;
        vhub_vm_destroy(vm, NULL);
}

/* A VM's store entries (its two groups, its snapshot file) count for its
 * uid's share of the fd store (VHUB_VM_STORE_ENTRIES). */
static void vm_own_entries(struct vhub_vm *vm, bool own) {
        vhub_fd_group_own(vm->ctx, VHUB_FD_GROUP_VM, vm->id, vm->uid, own);
        vhub_fd_group_own(vm->ctx, VHUB_FD_GROUP_SHARED, vm->id, vm->uid, own);
        vhub_fd_group_own(vm->ctx, VHUB_SNAP_GROUP_VM, vm->id, vm->uid, own);
}

struct vhub_vm *vhub_vm_alloc(struct vhub_context *ctx, uint64_t id, uid_t uid, const char *name,
                              uint64_t linger_ms, const struct vhub_cred *cred) {
        struct vhub_vm *vm = calloc(1, sizeof(*vm));

        if (!vm)
                return NULL;
        vm->ctx = ctx;
        vm->id = id;
        vhub_fd_group(vm->fd_group, VHUB_FD_GROUP_VM, vm->id);
        vhub_fd_group(vm->fd_group_shared, VHUB_FD_GROUP_SHARED, vm->id);
        snprintf(vm->name, sizeof(vm->name), "%s", name);
        vm->uid = uid;
        vm_own_entries(vm, true);
        vm->linger_ms = linger_ms;
        vm->destroy_reason = VHUB_VM_DESTROYED_DESTROY;
        vhub_mem_table_init(&vm->mem);
        vhub_shared_table_init(&vm->shared);
        vm->log_fd = -1;
        vm->snap.fd = -1;
        vm->snap.newest = -1;
        TAILQ_INIT(&vm->mem_ops);
        TAILQ_INIT(&vm->devices);
        vm->linger_timer = evtimer_new(ctx->base, vm_linger_expired, vm);
        if (!vm->linger_timer || vhub_hash_init(&vm->devices_by_name) < 0 ||
            vhub_cred_copy(cred, &vm->cred) < 0) {
                vhub_event_freep(&vm->linger_timer);
                vhub_hash_done(&vm->devices_by_name);
                vhub_cred_done(&vm->cred);
                vm_own_entries(vm, false);
                free(vm);
                return NULL;
        }
        return vm;
}

void vhub_vm_discard(struct vhub_vm *vm) {
        vhub_event_freep(&vm->linger_timer);
        vhub_snap_file_close(&vm->snap);
        vhub_mem_table_done(&vm->mem);
        vhub_shared_table_done(&vm->shared);
        vhub_cred_done(&vm->cred);
        vhub_hash_done(&vm->devices_by_name);
        vm_own_entries(vm, false);
        free(vm);
}

int vhub_vm_link(struct vhub_vm *vm) {
        struct vhub_context *ctx = vm->ctx;
        int r = vhub_fd_ledger_vm_added(ctx, vm);

        if (r < 0)
                return r;
        TAILQ_INSERT_TAIL(&ctx->vms, vm, link);
        vhub_hash_insert(&ctx->vms_by_name, &vm->by_name, vm_name_hash(ctx, vm->uid, vm->name));
        /* a restored VM may be in the middle of vm.destroy: not listed */
        vm->listed = !vm->destroying;
        if (vm->listed)
                vhub_fd_ledger_listed_add(ctx, vm->uid, 1, 0);
        ctx->n_vms++;
        vhub_fd_budget_vm_changed(vm);
        return 0;
}

int vhub_vm_create(struct vhub_context *ctx, uid_t uid, const char *name, uint64_t linger_ms,
                   const struct vhub_owner *owner, const struct vhub_cred *cred,
                   struct vhub_error *err, struct vhub_vm **ret) {
        struct vhub_vm *vm;
        int r;

        if (vhub_vm_find(ctx, uid, name))
                return vhub_error_set(err, VHUB_ERR_EXISTS, "VM %s already exists", name);
        if (vhub_context_count_vms(ctx, uid) >= ctx->config->limits.vms_per_uid)
                return vhub_error_set(err, VHUB_ERR_LIMIT, "uid %u already has %u VMs (the limit)",
                                      (unsigned)uid, ctx->config->limits.vms_per_uid);
        r = vhub_fd_store_check(ctx, uid, VHUB_VM_STORE_ENTRIES, err);
        if (r < 0)
                return r;
        vm = vhub_vm_alloc(ctx, ++ctx->next_vm_id, uid, name, linger_ms, cred);
        if (!vm)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        vm->owner = owner;
        if (vhub_vm_link(vm) < 0) {
                vhub_vm_discard(vm);
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        }
        vhub_context_counts_changed(ctx);
        vm_log(vm, LOG_INFO, "VM created (uid %u)", (unsigned)uid);
        /* the creator gets it too: it is the owner */
        vm_emit(vm, VHUB_EV_VM_CREATED, NULL);
        vhub_changed(ctx, vm);
        vhub_changed(ctx, NULL);        /* the id counter (the daemon's snapshot) */
        *ret = vm;
        return 0;
}

/* An addition owns its region's fd until the table takes it; a removal's
 * region is a copy whose fd is -1. */
void vm_mem_op_free(struct vhub_mem_op *op) {
        vhu_safe_close(op->region.fd);
        free(op);
}

void vhub_vm_free(struct vhub_vm *vm) {
        struct vhub_mem_op *mop;
        struct vhub_device *d;
        struct vhub_error err;

        if (!vm || vm->freeing)
                return;
        vm->freeing = true;
        vhub_error_set(&err, VHUB_ERR_NO_VM, "VM %s was destroyed", vm->name);
        /* devices first: their ops may point at the memory ops */
        while ((d = TAILQ_FIRST(&vm->devices))) {
                vhub_vm_unlink_device(vm, d);
                vhub_device_free(d);
        }
        while ((mop = TAILQ_FIRST(&vm->mem_ops))) {
                TAILQ_REMOVE(&vm->mem_ops, mop, link);
                vhub_call_fail(mop->call, &err);
                vm_mem_op_free(mop);
        }
        if (vm->log_batch) {
                vhub_call_fail(vm->log_batch->call, &err);
                free(vm->log_batch);
                vm->log_batch = NULL;
        }
        if (vm->postcopy_batch) {
                vhub_call_fail(vm->postcopy_batch->call, &err);
                vhub_vm_batch_free(vm->postcopy_batch);
                vm->postcopy_batch = NULL;
        }
        /* after its devices' device.removed, before vm.destroy answers (at
         * shutdown nobody is told: vhub_context_emit() sends nothing) */
        vm_emit(vm, VHUB_EV_VM_DESTROYED, vm->destroy_reason);
        if (vm->destroy_call) {
                struct vhub_call *c = vm->destroy_call;

                vm->destroy_call = NULL;
                vhub_call_complete(c, 0);
        }
        TAILQ_REMOVE(&vm->ctx->vms, vm, link);
        vhub_hash_remove(&vm->ctx->vms_by_name, &vm->by_name);
        if (vm->listed)
                vhub_fd_ledger_listed_add(vm->ctx, vm->uid, -1, 0); /* its devices are gone */
        vm->ctx->n_vms--;
        vhub_context_counts_changed(vm->ctx);
        vhub_commit_vm_gone(vm);
        vm_log(vm, LOG_INFO, "VM destroyed");
        vhub_event_freep(&vm->linger_timer);
        for (size_t i = 0; i < vm->shared.n; i++)
                vm_shared_untrack(vm, &vm->shared.objects[i]);
        vhub_shared_table_done(&vm->shared);
        vm_log_close(vm);
        for (size_t i = 0; i < vm->mem.n; i++)
                vm_region_untrack(vm, &vm->mem.regions[i]);
        vhub_mem_table_done(&vm->mem);
        vhub_cred_done(&vm->cred);
        vhub_hash_done(&vm->devices_by_name);
        /* last: closing what it held marks it changed (vm_log_close()), and
         * a VM left marked would be counted after it is freed */
        vhub_fd_ledger_vm_gone(vm->ctx, vm);
        vm_own_entries(vm, false);
        free(vm);
}

void vhub_vm_device_gone(struct vhub_vm *vm) {
        if (vm->destroying && !vm->freeing && vm->holds == 0 && vm->n_devices == 0)
                vhub_vm_free(vm);
}

/* Resume every parked handshake.  A resumed op may end and free its device
 * (a failed device.add), so the list is scanned again from the head after
 * each resume; each resume unparks its device, so this ends.  Returns false
 * if the VM itself went (being destroyed, its last device gone). */
bool vm_resume_parked(struct vhub_vm *vm) {
        struct vhub_device *d;

        vm->holds++;
again:
        TAILQ_FOREACH(d, &vm->devices, link)
                if (vhub_device_is_parked(d)) {
                        vhub_device_resume_parked(d);
                        goto again;
                }
        vm->holds--;
        if (vm->destroying && vm->holds == 0 && vm->n_devices == 0) {
                vhub_vm_free(vm);
                return false;
        }
        return true;
}

void vhub_vm_destroy(struct vhub_vm *vm, struct vhub_call *call) {
        struct vhub_device *d, *next;

        if (vm->destroying) {
                struct vhub_error err;

                vhub_error_set(&err, VHUB_ERR_NO_VM, "VM %s is already being destroyed", vm->name);
                vhub_call_fail(call, &err);
                return;
        }
        vm->destroying = true;
        if (vm->listed) {
                /* gone for lists */
                vhub_fd_ledger_listed_add(vm->ctx, vm->uid, -1, -(int)vm->n_devices);
                vm->listed = false;
        }
        vm->destroy_call = call;
        vhub_changed(vm->ctx, vm);
        evtimer_del(vm->linger_timer);
        if (vm->n_devices == 0) {
                vhub_vm_free(vm);
                return;
        }
        /* every device stops and closes in parallel; the last one frees the VM */
        for (d = TAILQ_FIRST(&vm->devices); d; d = next) {
                next = TAILQ_NEXT(d, link);
                if (!d->removing)
                        vhub_device_remove(d, NULL);
        }
}

/* The linger timer starts: linger_ms from now (the snapshot keeps what is left). */
static void vm_linger_start(struct vhub_vm *vm) {
        struct timeval tv = vhub_timeval_from_ms(vm->linger_ms);

        evtimer_add(vm->linger_timer, &tv);
        vm->linger_deadline_usec = vhub_now_usec() + vm->linger_ms * 1000;
        vhub_changed(vm->ctx, vm);
}

void vhub_vm_owner_gone(struct vhub_vm *vm) {
        vm->owner = NULL;
        if (vm->destroying)
                return;
        if (vm->linger_ms == 0) {
                vm_log(vm, LOG_INFO, "owning connection closed; destroying the VM");
                vm->destroy_reason = VHUB_VM_DESTROYED_OWNER_CLOSED;
                vhub_vm_destroy(vm, NULL);
                return;
        }
        if (vm->vmm_holds > 0) {
                vhub_changed(vm->ctx, vm);
                vm_log(vm, LOG_INFO, "owning connection closed; lingering while %u VMMs are connected, "
                       "then for %llu ms", vm->vmm_holds, (unsigned long long)vm->linger_ms);
        } else {
                vm_linger_start(vm);
                vm_log(vm, LOG_INFO, "owning connection closed; lingering for %llu ms",
                       (unsigned long long)vm->linger_ms);
        }
        vm_emit(vm, VHUB_EV_LINGERING, NULL);
}

void vhub_vm_vmm_hold(struct vhub_vm *vm) {
        if (vm->vmm_holds++ > 0 || vm->owner || vm->destroying || !evtimer_pending(vm->linger_timer, NULL))
                return;
        evtimer_del(vm->linger_timer);
        vhub_changed(vm->ctx, vm);
        vm_log(vm, LOG_INFO, "a VMM connected: the linger timer waits while a VMM is connected");
}

void vhub_vm_vmm_release(struct vhub_vm *vm) {
        if (vm->vmm_holds > 0)
                vm->vmm_holds--;
        if (vm->vmm_holds > 0 || vm->owner || vm->destroying || vm->freeing || vm->linger_ms == 0)
                return;
        vm_linger_start(vm);
        vm_log(vm, LOG_INFO, "its last VMM left; lingering for %llu ms", (unsigned long long)vm->linger_ms);
}

int vhub_vm_check_no_front_door(const struct vhub_vm *vm, const char *what, struct vhub_error *err) {
        const struct vhub_device *d;

        TAILQ_FOREACH(d, &vm->devices, link)
                if (d->vmm && !d->removing)
                        return vhub_error_set(err, VHUB_ERR_STATE,
                                              "VM %s has front-door device %s, whose memory is its VMM's: no %s",
                                              vm->name, d->name, what);
        return 0;
}

uint64_t vhub_vm_new_token(struct vhub_vm *vm) {
        if (++vm->next_token > vm->token_reserved) {
                /* a restored VM's starts at 0: its first token reserves */
                vm->token_reserved = vm->next_token + VHUB_VM_TOKEN_RESERVE;
                vhub_changed(vm->ctx, vm);
        }
        return vm->next_token;
}

int vhub_vm_attach(struct vhub_vm *vm, const struct vhub_owner *owner, const struct vhub_cred *cred,
                   struct vhub_error *err) {
        if (vm->destroying)
                return vhub_error_set(err, VHUB_ERR_NO_VM, "VM %s is being destroyed", vm->name);
        if (vm->owner && vm->owner != owner)
                return vhub_error_set(err, VHUB_ERR_STATE,
                                      "VM %s is owned by a live connection; only a lingering VM can be attached",
                                      vm->name);
        /* root naming another uid's VM does not lend it root's rights; the
         * uid's own devices act with its groups of now */
        if (cred->uid == vm->uid) {
                struct vhub_device *d;
                struct vhub_cred fresh;

                if (vhub_cred_copy(cred, &fresh) < 0)
                        return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
                vhub_cred_done(&vm->cred);
                vm->cred = fresh;
                TAILQ_FOREACH(d, &vm->devices, link) {
                        if (d->cred.uid != cred->uid || vhub_cred_copy(cred, &fresh) < 0)
                                continue;
                        vhub_cred_done(&d->cred);
                        d->cred = fresh;
                }
        }
        evtimer_del(vm->linger_timer);
        vm->owner = owner;
        vhub_changed(vm->ctx, vm);
        vm_log(vm, LOG_INFO, "VM attached by a new connection");
        return 0;
}

/* ---- shared objects the VMM exports ---- */

int vhub_vm_shared_add(struct vhub_vm *vm, const uint8_t uuid[16], int fd, struct vhub_error *err) {
        char u[37];
        int r;

        vhub_uuid_format(uuid, u);
        vhub_fd_budget_vm_changed(vm);
        r = vhub_shared_table_add(&vm->shared, uuid, NULL, fd, vm->ctx->config->limits.shared_objects_per_vm);
        if (r < 0) {
                if (r == -EEXIST)
                        return vhub_error_set(err, VHUB_ERR_EXISTS, "shared object %s already exists", u);
                if (r == -ENOSPC)
                        return vhub_error_set(err, VHUB_ERR_LIMIT, "VM %s has %u shared objects (the limit)",
                                              vm->name, vm->ctx->config->limits.shared_objects_per_vm);
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        }
        vm_fd_track(vm, vm->fd_group_shared, vhub_shared_table_find(&vm->shared, uuid)->fd, "shared/%s", u);
        vm_log(vm, LOG_DEBUG, "shared object %s exported by the VMM", u);
        return 0;
}

int vhub_vm_shared_remove(struct vhub_vm *vm, const uint8_t uuid[16], struct vhub_error *err) {
        struct vhub_shared_object *o = vhub_shared_table_find(&vm->shared, uuid);
        char u[37];

        vhub_uuid_format(uuid, u);
        if (!o)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'uuid': VM %s has no shared object %s", vm->name, u);
        if (o->device)
                return vhub_error_set(err, VHUB_ERR_STATE,
                                      "shared object %s was exported by device %s; only its exporter removes it",
                                      u, o->device->name);
        vm_shared_untrack(vm, o);
        vhub_shared_table_remove(&vm->shared, uuid, NULL);
        vhub_fd_budget_vm_changed(vm);
        return 0;
}
