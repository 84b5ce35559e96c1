/* SPDX-License-Identifier: MIT */
/*
 * A front-door device's VMM session in its VM's restart snapshot
 * (docs/restart.md, "Front-door devices"): the records a restore replays --
 * what the VMM negotiated, its memory table as it gave it, its rings with
 * their eventfds, status, inflight, log -- and the face's own record (its
 * socket, listener, the VMM's connection and channel: frontdoor/), so that
 * the next process takes the VMM's connection back where this one stopped
 * reading it, and the VMM notices nothing.
 *
 * Written only when the session can be carried whole: a planned restart
 * has stopped reading the VMM at a message boundary, every request of it
 * is answered and sent, nothing waits on its channel (the face says so:
 * vhub_vmm_face_ops.at_rest).  Any other snapshot -- every one a crash can
 * leave -- has no such record, and the next process closes the VMM's
 * connection as before (it reconnects): after a crash a message may have
 * been half-read, or an answer owed, that no snapshot recorded.
 *
 * The record is not critical: a daemon that does not know it skips it and
 * closes the VMM's connection, which is what it did anyway.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-context.h"
#include "vhub-device-vmm-internal.h"
#include "vhub-fd-claim.h"
#include "vhub-model-snapshot.h"
#include "vhub-snapshot.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

enum {
        V_FEATURES = 1,         /* present: SET_FEATURES was sent (acked: the device's own) */
        V_STATUS,
        V_MTU,
        V_LOG_SIZE,             /* with V_LOG_OFFSET, V_LOG_FD: SET_LOG_BASE */
        V_LOG_OFFSET,
        V_LOG_FD,
        V_INFLIGHT_SIZE,        /* with the next three: SET_INFLIGHT_FD's payload */
        V_INFLIGHT_OFFSET,
        V_INFLIGHT_QUEUES,
        V_INFLIGHT_QUEUE_SIZE,
        V_REGION,               /* nest: RG_* */
        V_RING,                 /* nest: VR_* */
        V_FACE,                 /* nest: the face's (frontdoor/) */
        V_CONFIG,               /* bytes: a GET_CONFIG answer kept for an outage,
                                 * u32 offset, then the config bytes (little-endian) */
};

enum { RG_ID = 1, RG_GPA, RG_SIZE, RG_OFFSET, RG_UADDR, RG_PAGE_SIZE, RG_FD };

enum {
        VR_INDEX = 1,
        VR_SET,                 /* the ring_flag bits below */
        VR_NUM,
        VR_BASE,
        VR_ENDIAN,
        VR_ENABLE,
        VR_ADDR_FLAGS,
        VR_DESC,
        VR_USED,
        VR_AVAIL,
        VR_LOG,
        VR_KICK_U64,
        VR_CALL_U64,
        VR_ERR_U64,
        VR_KICK,
        VR_CALL,
        VR_ERR,
};

enum ring_flag {
        RF_NUM = 1u << 0,
        RF_BASE = 1u << 1,
        RF_ADDR = 1u << 2,
        RF_ENDIAN = 1u << 3,
        RF_ENABLE = 1u << 4,
        RF_KICK = 1u << 5,
        RF_CALL = 1u << 6,
        RF_ERR = 1u << 7,
        RF_STARTED = 1u << 8,
        RF_BASE_FROM_STATE = 1u << 9,
};

static uint32_t ring_flags(const struct vhub_vmm_ring *r) {
        return (r->num_set ? RF_NUM : 0) | (r->base_set ? RF_BASE : 0) | (r->addr_set ? RF_ADDR : 0) |
               (r->endian_set ? RF_ENDIAN : 0) | (r->enable_set ? RF_ENABLE : 0) | (r->kick_set ? RF_KICK : 0) |
               (r->call_set ? RF_CALL : 0) | (r->err_set ? RF_ERR : 0) | (r->started ? RF_STARTED : 0) |
               (r->base_from_state ? RF_BASE_FROM_STATE : 0);
}

static void ring_set_flags(struct vhub_vmm_ring *r, uint32_t f) {
        r->num_set = f & RF_NUM;
        r->base_set = f & RF_BASE;
        r->addr_set = f & RF_ADDR;
        r->endian_set = f & RF_ENDIAN;
        r->enable_set = f & RF_ENABLE;
        r->kick_set = f & RF_KICK;
        r->call_set = f & RF_CALL;
        r->err_set = f & RF_ERR;
        r->started = f & RF_STARTED;
        r->base_from_state = f & RF_BASE_FROM_STATE;
}

bool vmm_carry_put(const struct vhub_device *d, struct vhub_snap_writer *w, uint32_t tag) {
        const struct vhub_device_vmm *s = d->vmm;
        const struct vhub_fdstore *st = d->vm->ctx->fdstore;
        const char *g = d->fd_group;

        if (!s || !s->connected || s->leaving || !s->face_ops || !s->face_ops->at_rest ||
            !s->face_ops->at_rest(s->face))
                return false;
        vhub_snap_begin(w, tag);
        if (s->features_set)
                vhub_snap_put_u64(w, V_FEATURES, s->features);
        if (s->status_set)
                vhub_snap_put_u64(w, V_STATUS, s->status);
        if (s->mtu_set)
                vhub_snap_put_u64(w, V_MTU, s->mtu);
        if (s->log_set) {
                vhub_snap_put_u64(w, V_LOG_SIZE, s->log.mmap_size);
                vhub_snap_put_u64(w, V_LOG_OFFSET, s->log.mmap_offset);
                vhub_snap_put_fd(w, V_LOG_FD, st, g, s->log_fd);
        }
        if (s->inflight_set) {
                vhub_snap_put_u64(w, V_INFLIGHT_SIZE, s->inflight.mmap_size);
                vhub_snap_put_u64(w, V_INFLIGHT_OFFSET, s->inflight.mmap_offset);
                vhub_snap_put_u32(w, V_INFLIGHT_QUEUES, s->inflight.num_queues);
                vhub_snap_put_u32(w, V_INFLIGHT_QUEUE_SIZE, s->inflight.queue_size);
        }
        for (size_t i = 0; i < s->mem.n; i++) {
                const struct vhub_region *r = &s->mem.regions[i];

                vhub_snap_begin(w, V_REGION);
                vhub_snap_put_u64(w, RG_ID, r->id);
                vhub_snap_put_u64(w, RG_GPA, r->gpa);
                vhub_snap_put_u64(w, RG_SIZE, r->size);
                vhub_snap_put_u64(w, RG_OFFSET, r->offset);
                vhub_snap_put_u64(w, RG_UADDR, r->uaddr);
                vhub_snap_put_u64(w, RG_PAGE_SIZE, r->page_size);
                vhub_snap_put_fd(w, RG_FD, st, g, r->fd);
                vhub_snap_end(w);
        }
        for (unsigned i = 0; s->rings && i < d->queues; i++) {
                const struct vhub_vmm_ring *r = &s->rings[i];
                uint32_t f = ring_flags(r);

                if (f == 0)
                        continue;
                vhub_snap_begin(w, V_RING);
                vhub_snap_put_u32(w, VR_INDEX, i);
                vhub_snap_put_u32(w, VR_SET, f);
                vhub_snap_put_u32(w, VR_NUM, r->num);
                vhub_snap_put_u32(w, VR_BASE, r->base);
                vhub_snap_put_u32(w, VR_ENDIAN, r->endian);
                vhub_snap_put_u32(w, VR_ENABLE, r->enable);
                vhub_snap_put_u32(w, VR_ADDR_FLAGS, r->addr.flags);
                vhub_snap_put_u64(w, VR_DESC, r->addr.desc);
                vhub_snap_put_u64(w, VR_USED, r->addr.used);
                vhub_snap_put_u64(w, VR_AVAIL, r->addr.avail);
                vhub_snap_put_u64(w, VR_LOG, r->addr.log);
                vhub_snap_put_u64(w, VR_KICK_U64, r->kick_u64);
                vhub_snap_put_u64(w, VR_CALL_U64, r->call_u64);
                vhub_snap_put_u64(w, VR_ERR_U64, r->err_u64);
                vhub_snap_put_fd(w, VR_KICK, st, g, r->kick_fd);
                vhub_snap_put_fd(w, VR_CALL, st, g, r->call_fd);
                vhub_snap_put_fd(w, VR_ERR, st, g, r->err_fd);
                vhub_snap_end(w);
        }
        for (unsigned i = 0; i < s->n_config; i++) {
                /* oldest first: read back in order, the newest is the last */
                unsigned k = (s->next_config + VMM_CONFIG_CACHE - s->n_config + i) % VMM_CONFIG_CACHE;
                uint8_t b[4 + VHU_MAX_CONFIG_SIZE];

                for (int j = 0; j < 4; j++)
                        b[j] = (uint8_t)(s->config[k].offset >> (8 * j));
                memcpy(b + 4, s->config[k].data, s->config[k].size);
                vhub_snap_put_bytes(w, V_CONFIG, b, 4 + s->config[k].size);
        }
        vhub_snap_begin(w, V_FACE);
        s->face_ops->save(s->face, w);
        vhub_snap_end(w);
        vhub_snap_end(w);
        return true;
}

/* ---- restore ---- */

static int read_config(struct vhub_device_vmm *s, const struct vhub_snap_rec *x) {
        const uint8_t *b;
        const void *raw;
        size_t n;
        unsigned k = s->next_config;
        int r = vhub_snap_get_bytes(x, &raw, &n);

        if (r < 0)
                return r;
        if (n < 4 || n - 4 > VHU_MAX_CONFIG_SIZE)
                return -EBADMSG;
        b = raw;
        s->config[k].offset = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
        s->config[k].size = (uint32_t)(n - 4);
        memcpy(s->config[k].data, b + 4, n - 4);
        s->next_config = (k + 1) % VMM_CONFIG_CACHE;
        if (s->n_config < VMM_CONFIG_CACHE)
                s->n_config++;
        return 0;
}

/* An fd the record names by key: claimed from the device's group, or
 * -ENOENT (the record is not carried then). */
static int claim_key(struct vhub_fd_claim *claim, const struct vhub_snap_rec *x, int *ret) {
        struct vhub_fd_key key;
        int r = vhub_snap_get_key(x, &key);

        if (r < 0)
                return r;
        r = vhub_fd_claim(claim, &key);
        if (r < 0)
                return r;
        vhu_safe_close(*ret);
        *ret = r;
        return 0;
}

static int read_region(struct vhub_mem_table *t, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec) {
        struct vhub_region rg = { .fd = -1 };
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        int r = vhub_snap_enter(rec, &it);

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                switch (x.tag) {
                case RG_ID: r = vhub_snap_get_u64(&x, &rg.id); break;
                case RG_GPA: r = vhub_snap_get_u64(&x, &rg.gpa); break;
                case RG_SIZE: r = vhub_snap_get_u64(&x, &rg.size); break;
                case RG_OFFSET: r = vhub_snap_get_u64(&x, &rg.offset); break;
                case RG_UADDR: r = vhub_snap_get_u64(&x, &rg.uaddr); break;
                case RG_PAGE_SIZE: r = vhub_snap_get_u64(&x, &rg.page_size); break;
                case RG_FD: r = claim_key(claim, &x, &rg.fd); break;
                default: r = vhub_snap_unknown(&x); break;
                }
        }
        if (r >= 0 && (rg.fd < 0 || rg.size == 0 || rg.id == 0))
                r = -EBADMSG;
        if (r < 0) {
                vhu_safe_close(rg.fd);
                return r;
        }
        return vhub_mem_table_add(t, &rg); /* takes the fd */
}

static int read_vmm_ring(struct vhub_device *d, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec) {
        struct vhub_vmm_ring v = { .kick_fd = -1, .call_fd = -1, .err_fd = -1 };
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        uint32_t index = UINT32_MAX, f = 0;
        int r = vhub_snap_enter(rec, &it);

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                switch (x.tag) {
                case VR_INDEX: r = vhub_snap_get_u32(&x, &index); break;
                case VR_SET: r = vhub_snap_get_u32(&x, &f); break;
                case VR_NUM: r = vhub_snap_get_u32(&x, &v.num); break;
                case VR_BASE: r = vhub_snap_get_u32(&x, &v.base); break;
                case VR_ENDIAN: r = vhub_snap_get_u32(&x, &v.endian); break;
                case VR_ENABLE: r = vhub_snap_get_u32(&x, &v.enable); break;
                case VR_ADDR_FLAGS: r = vhub_snap_get_u32(&x, &v.addr.flags); break;
                case VR_DESC: r = vhub_snap_get_u64(&x, &v.addr.desc); break;
                case VR_USED: r = vhub_snap_get_u64(&x, &v.addr.used); break;
                case VR_AVAIL: r = vhub_snap_get_u64(&x, &v.addr.avail); break;
                case VR_LOG: r = vhub_snap_get_u64(&x, &v.addr.log); break;
                case VR_KICK_U64: r = vhub_snap_get_u64(&x, &v.kick_u64); break;
                case VR_CALL_U64: r = vhub_snap_get_u64(&x, &v.call_u64); break;
                case VR_ERR_U64: r = vhub_snap_get_u64(&x, &v.err_u64); break;
                case VR_KICK: r = claim_key(claim, &x, &v.kick_fd); break;
                case VR_CALL: r = claim_key(claim, &x, &v.call_fd); break;
                case VR_ERR: r = claim_key(claim, &x, &v.err_fd); break;
                default: r = vhub_snap_unknown(&x); break;
                }
        }
        if (r >= 0 && !vmm_ring_ok(d, index))
                r = -EBADMSG;
        if (r < 0) {
                vhu_safe_close(v.kick_fd);
                vhu_safe_close(v.call_fd);
                vhu_safe_close(v.err_fd);
                return r;
        }
        ring_set_flags(&v, f);
        v.addr.index = index;
        {
                int kick = v.kick_fd, call = v.call_fd, err = v.err_fd;

                v.kick_fd = v.call_fd = v.err_fd = -1;
                vmm_ring_close_fds(d, index);
                d->vmm->rings[index] = v;
                /* tracked as the device's again (members already: restoring) */
                vmm_ring_set_fd(d, index, VMM_RING_KICK, kick);
                vmm_ring_set_fd(d, index, VMM_RING_CALL, call);
                vmm_ring_set_fd(d, index, VMM_RING_ERR, err);
        }
        return 0;
}

int vmm_carry_restore(struct vhub_device *d, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec) {
        struct vhub_device_vmm *s = d->vmm;
        struct vhub_mem_table t;
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        uint32_t u = 0;
        int log_fd = -1, r = vhub_snap_enter(rec, &it);

        vhub_mem_table_init(&t);
        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                u = 0;
                switch (x.tag) {
                case V_FEATURES: r = vhub_snap_get_u64(&x, &s->features); s->features_set = true; break;
                case V_STATUS: r = vhub_snap_get_u64(&x, &s->status); s->status_set = true; break;
                case V_MTU: r = vhub_snap_get_u64(&x, &s->mtu); s->mtu_set = true; break;
                case V_LOG_SIZE: r = vhub_snap_get_u64(&x, &s->log.mmap_size); s->log_set = true; break;
                case V_LOG_OFFSET: r = vhub_snap_get_u64(&x, &s->log.mmap_offset); break;
                case V_LOG_FD: r = claim_key(claim, &x, &log_fd); break;
                case V_INFLIGHT_SIZE:
                        r = vhub_snap_get_u64(&x, &s->inflight.mmap_size);
                        s->inflight_set = true;
                        break;
                case V_INFLIGHT_OFFSET: r = vhub_snap_get_u64(&x, &s->inflight.mmap_offset); break;
                case V_INFLIGHT_QUEUES:
                        r = vhub_snap_get_u32(&x, &u);
                        s->inflight.num_queues = (uint16_t)u;
                        r = r < 0 ? r : u > UINT16_MAX ? -EBADMSG : 0;
                        break;
                case V_INFLIGHT_QUEUE_SIZE:
                        r = vhub_snap_get_u32(&x, &u);
                        s->inflight.queue_size = (uint16_t)u;
                        r = r < 0 ? r : u > UINT16_MAX ? -EBADMSG : 0;
                        break;
                case V_REGION: r = read_region(&t, claim, &x); break;
                case V_RING: r = read_vmm_ring(d, claim, &x); break;
                case V_CONFIG: r = read_config(s, &x); break;
                case V_FACE: break;     /* vmm_carry_adopt() */
                default: r = vhub_snap_unknown(&x); break;
                }
        }
        /* the session's memory, as the records hold it: the back-end's copy
         * is the device's own (its shadow), carried beside it */
        vmm_mem_replace(d, &t);
        vhub_mem_table_done(&t);
        vmm_log_fd_set(d, log_fd);
        if (r < 0)
                vmm_records_clear(d);
        return r;
}

int vmm_carry_adopt(struct vhub_device *d, struct vhub_fdstore_restore *fr, const struct vhub_snap_rec *rec) {
        const struct vhub_vmm_door *door = d->vm->ctx->vmm_door;
        struct vhub_device_vmm *s = d->vmm;
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        struct vhub_cred owner;
        int r = vhub_snap_enter(rec, &it);

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0 && x.tag != V_FACE)
                ;
        if (r == 0)
                r = -EBADMSG;   /* no face: nothing to resume the VMM on */
        if (r >= 0 && (!door || !door->adopt))
                r = -EOPNOTSUPP;
        if (r >= 0 && (r = vmm_owner(d->vm, &owner)) >= 0) {
                r = door->adopt(door->userdata, d, &owner, fr, &x, &s->face, &s->face_ops, &s->socket_path);
                vhub_cred_done(&owner);
        }
        if (r < 0) {
                vmm_records_clear(d);
                return r;
        }
        s->connected = true;
        s->had_vmm = false;
        /* a connected VMM keeps a lingering VM (docs/front-door.md, "Lifetime") */
        vhub_vm_vmm_hold(d->vm);
        device_log(d, LOG_INFO, NULL, "its VMM's session on %s was carried across the daemon's restart",
                   s->socket_path);
        return 0;
}
