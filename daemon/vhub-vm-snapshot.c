/* SPDX-License-Identifier: MIT */
/*
 * A VM in its restart snapshot (vhub-model-snapshot.h): its identity and
 * credentials, its back-end request token counter, its owner (a face's connection, by the face's id) or its
 * linger time left, the committed memory table, the dirty log, shared
 * objects, and its devices (vhub-device-snapshot.c).  A memory change in
 * flight is not in it: the table is the committed one, and the devices the
 * change was running on are busy, so lost and restored against it.
 */
#include <errno.h>
#include <event2/event.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-context.h"
#include "vhub-device-vmm-internal.h"
#include "vhub-device.h"
#include "vhub-fd-claim.h"
#include "vhub-log.h"
#include "vhub-model-snapshot.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

enum {
        VM_ID = 1,
        VM_NAME,
        VM_UID,
        VM_GID,
        VM_GROUPS,              /* u32 each */
        VM_OWNER_FACE,          /* with VM_OWNER_ID: it had an owner */
        VM_OWNER_ID,
        VM_LINGER_MS,
        VM_LINGER_LEFT_MS,      /* only while its linger timer runs */
        VM_DESTROYING,
        VM_POSTCOPY,
        VM_REGION,              /* nest: RG_* */
        VM_LOG,                 /* nest: LG_* */
        VM_SHARED,              /* nest: SH_* */
        VM_DEVICE,              /* nest: the device's (vhub-device-snapshot.c) */
        /* added within format 1 (an older reader skips them) */
        VM_CRED_UID,            /* its credentials' uid, when not VM_UID (root's, for a VM
                                 * root made for another uid); VM_GID and VM_GROUPS go with it */
        VM_NEXT_TOKEN,          /* no back-end request token it gave out is past it */
        _VM_TAG_NEXT
};

enum { RG_ID = 1, RG_GPA, RG_SIZE, RG_OFFSET, RG_UADDR, RG_PAGE_SIZE, RG_FD };
enum { LG_SIZE = 1, LG_FD };
enum { SH_UUID = 1, SH_FD, SH_DEVICE };

int vhub_vm_serialize(const struct vhub_vm *vm, struct vhub_snap_writer *w) {
        const struct vhub_fdstore *s = vm->ctx->fdstore;
        const struct vhub_device *d;

        /* version 2 changed the daemon's snapshot, not a VM's: a version-1
         * vhubd reads it (a downgrade, docs/restart.md "Versions") */
        w->compat = VHUB_SNAP_COMPAT_V1;
        vhub_snap_put_u64(w, VM_ID, vm->id);
        vhub_snap_put_str(w, VM_NAME, vm->name);
        vhub_snap_put_u32(w, VM_UID, (uint32_t)vm->uid);
        if (vm->cred.uid != vm->uid)
                vhub_snap_put_u32(w, VM_CRED_UID, (uint32_t)vm->cred.uid);
        vhub_snap_put_u32(w, VM_GID, (uint32_t)vm->cred.gid);
        vhub_snap_put_groups(w, VM_GROUPS, &vm->cred);
        /* the count reserved ahead: the next process starts past every token given out */
        vhub_snap_put_u64(w, VM_NEXT_TOKEN, vm->token_reserved > vm->next_token ? vm->token_reserved : vm->next_token);
        if (vm->owner) {
                vhub_snap_put_u32(w, VM_OWNER_FACE, vm->owner->face);
                vhub_snap_put_u64(w, VM_OWNER_ID, vm->owner->id);
        }
        vhub_snap_put_u64(w, VM_LINGER_MS, vm->linger_ms);
        if (evtimer_pending(vm->linger_timer, NULL)) {
                uint64_t now = vhub_now_usec();

                vhub_snap_put_u64(w, VM_LINGER_LEFT_MS, vm->linger_deadline_usec > now
                                          ? (vm->linger_deadline_usec - now + 999) / 1000 : 0);
        }
        vhub_snap_put_bool(w, VM_DESTROYING, vm->destroying);
        vhub_snap_put_u32(w, VM_POSTCOPY, vm->postcopy);
        for (size_t i = 0; i < vm->mem.n; i++)
                vhub_snap_put_region(w, VM_REGION, s, vm->fd_group, &vm->mem.regions[i]);
        if (vm->logging && vm->log_fd >= 0) {
                vhub_snap_begin(w, VM_LOG);
                vhub_snap_put_u64(w, LG_SIZE, vm->log_size);
                vhub_snap_put_fd(w, LG_FD, s, vm->fd_group, vm->log_fd);
                vhub_snap_end(w);
        }
        for (size_t i = 0; i < vm->shared.n; i++) {
                const struct vhub_shared_object *o = &vm->shared.objects[i];

                vhub_snap_begin(w, VM_SHARED);
                vhub_snap_put_bytes(w, SH_UUID, o->uuid, sizeof(o->uuid));
                if (o->device)
                        vhub_snap_put_str(w, SH_DEVICE, o->device->name);
                else
                        vhub_snap_put_fd(w, SH_FD, s, vm->fd_group_shared, o->fd);
                vhub_snap_end(w);
        }
        TAILQ_FOREACH(d, &vm->devices, link) {
                vhub_snap_begin(w, VM_DEVICE);
                vhub_device_serialize(d, w);
                vhub_snap_end(w);
        }
        return w->error;
}

/* ---- restore ---- */

/* Every field of a region record but RG_FD is a u64 of struct vhub_region:
 * where, by tag (RG_ID .. RG_PAGE_SIZE). */
static const size_t region_u64[] = {
        [RG_ID] = offsetof(struct vhub_region, id),
        [RG_GPA] = offsetof(struct vhub_region, gpa),
        [RG_SIZE] = offsetof(struct vhub_region, size),
        [RG_OFFSET] = offsetof(struct vhub_region, offset),
        [RG_UADDR] = offsetof(struct vhub_region, uaddr),
        [RG_PAGE_SIZE] = offsetof(struct vhub_region, page_size),
};

void vhub_snap_put_region(struct vhub_snap_writer *w, uint32_t tag, const struct vhub_fdstore *s,
                          const char *group, const struct vhub_region *r) {
        vhub_snap_begin(w, tag);
        for (uint32_t t = RG_ID; t <= RG_PAGE_SIZE; t++) {
                uint64_t v;

                memcpy(&v, (const char *)r + region_u64[t], sizeof(v));
                vhub_snap_put_u64(w, t, v);
        }
        vhub_snap_put_fd(w, RG_FD, s, group, r->fd);
        vhub_snap_end(w);
}

int vhub_snap_get_region(const struct vhub_snap_rec *rec, struct vhub_fd_claim *claim, struct vhub_region *ret) {
        struct vhub_fd_key key = { 0 };
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        int r = vhub_snap_enter(rec, &it);

        *ret = (struct vhub_region){ .fd = -1 };
        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                if (x.tag >= RG_ID && x.tag <= RG_PAGE_SIZE)
                        r = vhub_snap_get_u64(&x, (uint64_t *)((char *)ret + region_u64[x.tag]));
                else if (x.tag == RG_FD)
                        r = vhub_snap_get_key(&x, &key);
                else
                        r = vhub_snap_unknown(&x);
        }
        if (r < 0)
                return r;
        if (!ret->id || !ret->size)
                return -EBADMSG;
        ret->fd = vhub_fd_claim(claim, &key);
        return 0;
}

static int read_region(struct vhub_vm *vm, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec) {
        struct vhub_region reg;
        int r = vhub_snap_get_region(rec, claim, &reg), fd;

        if (r < 0)
                return r;
        if (reg.fd < 0) {
                vhub_log_vm(LOG_WARNING, vm, "region %llu: its fd was not passed back: the region is gone",
                            (unsigned long long)reg.id);
                return 0;
        }
        if (vm->ctx->next_region_id < reg.id)
                vm->ctx->next_region_id = reg.id;
        fd = reg.fd;
        r = vhub_mem_table_add(&vm->mem, &reg);
        if (r < 0)
                vhub_fd_claim_gone(claim, fd);  /* closed by the table */
        return r;
}

static int read_log(struct vhub_vm *vm, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec) {
        struct vhub_fd_key key = { 0 };
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        uint64_t size = 0;
        int r = vhub_snap_enter(rec, &it);

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                switch (x.tag) {
                case LG_SIZE: r = vhub_snap_get_u64(&x, &size); break;
                case LG_FD: r = vhub_snap_get_key(&x, &key); break;
                default: r = vhub_snap_unknown(&x); break;
                }
        }
        if (r < 0)
                return r;
        vm->log_fd = vhub_fd_claim(claim, &key);
        if (vm->log_fd < 0) {
                vm->log_fd = -1;
                vhub_log_vm(LOG_WARNING, vm, "the dirty log's fd was not passed back: logging is off");
                return 0;
        }
        vm->logging = true;
        vm->log_size = size;
        return 0;
}

/* A shared object, the VMM's or a device's, read once the devices are back
 * and in the snapshot's order, so that shared_object.list lists them as
 * before the restart. */
static int read_shared(struct vhub_vm *vm, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec) {
        struct vhub_fd_key key = { 0 };
        char device[VHUB_NAME_MAX + 1] = "";
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        const void *uuid = NULL;
        size_t n = 0;
        int r = vhub_snap_enter(rec, &it), fd;

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                switch (x.tag) {
                case SH_UUID: r = vhub_snap_get_bytes(&x, &uuid, &n); break;
                case SH_FD: r = vhub_snap_get_key(&x, &key); break;
                case SH_DEVICE: r = vhub_snap_get_str(&x, device, sizeof(device)); break;
                default: r = vhub_snap_unknown(&x); break;
                }
        }
        if (r < 0)
                return r;
        if (!uuid || n != 16)
                return -EBADMSG;
        if (device[0]) {
                struct vhub_device *d = vhub_vm_find_device(vm, device);

                return d ? vhub_shared_table_add(&vm->shared, uuid, d, -1,
                                                 vm->ctx->config->limits.shared_objects_per_vm) : 0;
        }
        fd = vhub_fd_claim(claim, &key);
        if (fd < 0)
                return 0;       /* not passed back: it is gone */
        r = vhub_shared_table_add(&vm->shared, uuid, NULL, fd, vm->ctx->config->limits.shared_objects_per_vm);
        if (r < 0)
                vhub_fd_claim_gone(claim, fd);  /* closed by the table */
        return r;
}

/* The VM's own records (not its children), by tag. */
#define VM(type, member, ...) VHUB_SNAP_FIELD(type, struct vhub_vm, member, __VA_ARGS__)
static const struct vhub_snap_field vm_fields[] = {
        [VM_OWNER_FACE] = VM(U32, restore_owner_face, VHUB_SNAP_UPTO(_VHUB_FACE_MAX - 1),
                             VHUB_SNAP_SEEN(struct vhub_vm, restore_owned)),
        [VM_OWNER_ID] = VM(U64, restore_owner_id),
        [VM_LINGER_MS] = VM(U64, linger_ms),
        [VM_LINGER_LEFT_MS] = VM(U64, restore_linger_left_ms, VHUB_SNAP_SEEN(struct vhub_vm, restore_linger)),
        [VM_DESTROYING] = VM(BOOL, destroying),
        [VM_NEXT_TOKEN] = VM(U64, next_token),
        [VM_POSTCOPY] = VM(U32, postcopy, VHUB_SNAP_UPTO(VHUB_VM_POSTCOPY_LISTENING)),
};

/* The VM's own records into vm (the rest are read by vhub_vm_restore(), or
 * its children). */
static int read_vm(struct vhub_vm *vm, const struct vhub_snap_doc *doc) {
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        int r;

        vhub_snap_doc_iter(doc, &it);
        while ((r = vhub_snap_next(&it, &x)) > 0)
                if ((r = VHUB_SNAP_GET_FIELD(vm_fields, &x, vm)) < 0)
                        return r;
        return r;
}

/* Identity first: what the VM is called and whose it is. */
static int read_identity(const struct vhub_snap_doc *doc, uint64_t *id, char *name, size_t name_size,
                         uid_t *uid, struct vhub_cred *cred) {
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        bool have_cred_uid = false;
        uid_t cred_uid = 0;
        uint32_t u = 0;
        int r;

        vhub_snap_doc_iter(doc, &it);
        while ((r = vhub_snap_next(&it, &x)) > 0) {
                switch (x.tag) {
                case VM_ID: r = vhub_snap_get_u64(&x, id); break;
                case VM_NAME: r = vhub_snap_get_str(&x, name, name_size); break;
                case VM_UID: r = vhub_snap_get_u32(&x, &u); cred->uid = (uid_t)u; break;
                case VM_GID: r = vhub_snap_get_u32(&x, &u); cred->gid = (gid_t)u; break;
                case VM_CRED_UID: r = vhub_snap_get_u32(&x, &u); cred_uid = (uid_t)u; have_cred_uid = true; break;
                case VM_GROUPS: r = vhub_snap_get_groups(&x, cred); break;
                default:
                        r = x.tag < _VM_TAG_NEXT ? 0 : vhub_snap_unknown(&x);
                        break;
                }
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        *uid = cred->uid;
        /* without VM_CRED_UID (an older writer, or the VM's own): its uid's */
        if (have_cred_uid)
                cred->uid = cred_uid;
        return *id && name[0] ? 0 : -EBADMSG;
}

int vhub_vm_restore(struct vhub_context *ctx, struct vhub_fdstore_restore *r, const struct vhub_snap_doc *doc,
                    int snap_fd, struct vhub_vm **ret, const char **why) {
        struct vhub_cred cred = { 0 };
        struct vhub_fd_claim mem, shared;
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        char name[VHUB_NAME_MAX + 1] = "";
        struct vhub_vm *vm;
        uint64_t id = 0;
        uid_t uid = 0;
        int k;

        *why = NULL;
        k = read_identity(doc, &id, name, sizeof(name), &uid, &cred);
        if (k < 0) {
                vhub_cred_done(&cred);
                vhu_safe_close(snap_fd);
                *why = "the VM's identity is malformed";
                return k;
        }
        vm = vhub_vm_alloc(ctx, id, uid, name, 0, &cred);
        vhub_cred_done(&cred);
        if (!vm) {
                vhu_safe_close(snap_fd);
                return -ENOMEM;
        }
        k = vhub_snap_file_adopt(snap_fd, &vm->snap, why);
        if (k >= 0)
                k = read_vm(vm, doc);
        if (k < 0) {
                *why = *why ? *why : "the VM's record is malformed";
                vhub_vm_discard(vm);
                return k;
        }
        k = vhub_vm_link(vm);
        if (k < 0) {
                vhub_vm_discard(vm);
                return k;
        }
        if (ctx->next_vm_id < id)
                ctx->next_vm_id = id;

        vhub_fd_claim_open(r, ctx->fdstore, vm->fd_group, &mem);
        vhub_snap_doc_iter(doc, &it);
        while (k >= 0 && vhub_snap_next(&it, &x) > 0) {
                if (x.tag == VM_REGION)
                        k = read_region(vm, &mem, &x);
                else if (x.tag == VM_LOG)
                        k = read_log(vm, &mem, &x);
        }
        /* open until the devices are back: those added since h-devadd
         * keep their fds in the VM's group */
        vhub_snap_doc_iter(doc, &it);
        while (k >= 0 && vhub_snap_next(&it, &x) > 0) {
                struct vhub_snap_iter dit;
                struct vhub_device *d;

                if (x.tag != VM_DEVICE)
                        continue;
                k = vhub_snap_enter(&x, &dit);
                if (k >= 0)
                        k = vhub_device_restore(vm, r, &mem, &dit, &d, why);
        }
        vhub_fd_claim_close(&mem);
        vhub_fd_claim_open(r, ctx->fdstore, vm->fd_group_shared, &shared);
        vhub_snap_doc_iter(doc, &it);
        while (k >= 0 && vhub_snap_next(&it, &x) > 0)
                if (x.tag == VM_SHARED)
                        k = read_shared(vm, &shared, &x);
        vhub_fd_claim_close(&shared);
        if (k >= 0) {
                struct vhub_device *d;

                /* a back-end out of line with the table is restored as lost:
                 * the restore's handshake syncs it to the table (a front-door
                 * device's is its VMM's, empty unless its session was carried) */
                TAILQ_FOREACH(d, &vm->devices, link)
                        if (d->mem_synced && d->conn &&
                            !vhub_device_shadow_is(d, d->vmm ? &d->vmm->mem : &vm->mem))
                                d->restore_lost = true;
        }
        if (k < 0) {
                *why = *why ? *why : "a record of the VM is malformed";
                vhub_log_vm(LOG_ERR, vm, "cannot restore the VM: %s (%s)", *why, strerror(-k));
        }
        vhub_log_vm(LOG_INFO, vm, "VM restored: %zu regions, %u devices", vm->mem.n, vm->n_devices);
        *ret = vm;
        return k;
}

void vhub_vm_restore_finish(struct vhub_vm *vm) {
        struct vhub_device *d, *next;
        struct timeval tv;

        vm->holds++;
        for (d = TAILQ_FIRST(&vm->devices); d; d = next) {
                next = TAILQ_NEXT(d, link);
                vhub_device_restore_finish(d);
        }
        vm->holds--;
        if (vm->destroying) {
                /* vm.destroy was running: it runs again (its call is answered -32011) */
                vm->destroying = false;
                vhub_vm_destroy(vm, NULL);
                return;
        }
        if (vm->restore_owned) {
                /* its connection did not come back */
                vm->restore_owned = false;
                vhub_vm_owner_gone(vm);
                return;
        }
        if (!vm->owner && vm->restore_linger) {
                tv = vhub_timeval_from_ms(vm->restore_linger_left_ms);
                evtimer_add(vm->linger_timer, &tv);
                vm->linger_deadline_usec = vhub_now_usec() + vm->restore_linger_left_ms * 1000;
        } else if (!vm->owner && vm->linger_ms > 0 && vm->vmm_holds == 0) {
                /* held by a front-door VMM whose session was not carried
                 * (a crash: docs/front-door.md): it lingers from now, or
                 * until the VMM comes back; a carried VMM holds it still */
                vhub_vm_vmm_hold(vm);
                vhub_vm_vmm_release(vm);
        }
        vm->restore_linger = false;
}
