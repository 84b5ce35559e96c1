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
 * Written only when the session can be carried whole: the VMM's stream is
 * at a message boundary, every request of it is answered and sent or one
 * the face carries to handle again, nothing waits on its channel (the face
 * says so: vhub_vmm_face_ops.at_rest).  Any other snapshot has no such
 * record, and the next process closes the VMM's connection as before (it
 * reconnects): a message may have been half-read, or an answer owed, that
 * no snapshot recorded.
 *
 * The record is not critical: a daemon that does not know it skips it and
 * closes the VMM's connection, which is what it did anyway.
 */
#include <errno.h>
#include <stddef.h>
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
        V_REGION,               /* nest: vhub_snap_put_region() */
        V_RING,                 /* nest: VR_* */
        V_FACE,                 /* nest: the face's (frontdoor/) */
        V_CONFIG,               /* bytes: a GET_CONFIG answer kept for an outage,
                                 * u32 offset, then the config bytes (little-endian) */
};

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

/* A ring record's plain fields, by tag (the writer and the reader share them). */
struct ring_field {
        uint32_t tag;
        size_t off;
};

#define ARRAY_N(a) (sizeof(a) / sizeof((a)[0]))
#define RING_AT(member) offsetof(struct vhub_vmm_ring, member)

static const struct ring_field ring_u32[] = {
        { VR_NUM, RING_AT(num) },          { VR_BASE, RING_AT(base) },
        { VR_ENDIAN, RING_AT(endian) },    { VR_ENABLE, RING_AT(enable) },
        { VR_ADDR_FLAGS, RING_AT(addr.flags) },
};

static const struct ring_field ring_u64[] = {
        { VR_DESC, RING_AT(addr.desc) },   { VR_USED, RING_AT(addr.used) },
        { VR_AVAIL, RING_AT(addr.avail) }, { VR_LOG, RING_AT(addr.log) },
        { VR_KICK_U64, RING_AT(kick_u64) }, { VR_CALL_U64, RING_AT(call_u64) },
        { VR_ERR_U64, RING_AT(err_u64) },
};

/* VR_KICK, VR_CALL, VR_ERR follow enum vmm_ring_fd's order */
static const uint32_t ring_fd_tag[] = { VR_KICK, VR_CALL, VR_ERR };
_Static_assert(VR_CALL - VR_KICK == VMM_RING_CALL && VR_ERR - VR_KICK == VMM_RING_ERR && VMM_RING_KICK == 0,
               "ring fd tags in enum vmm_ring_fd's order");

static const struct ring_field *field_find(const struct ring_field *t, size_t n, uint32_t tag) {
        for (size_t i = 0; i < n; i++)
                if (t[i].tag == tag)
                        return &t[i];
        return NULL;
}

static void *field_at(struct vhub_vmm_ring *r, size_t off) {
        return (char *)r + off;
}

static uint32_t field_u32(const struct vhub_vmm_ring *r, size_t off) {
        uint32_t v;

        memcpy(&v, (const char *)r + off, sizeof(v));
        return v;
}

static uint64_t field_u64(const struct vhub_vmm_ring *r, size_t off) {
        uint64_t v;

        memcpy(&v, (const char *)r + off, sizeof(v));
        return v;
}

static int ring_fd_of(const struct vhub_vmm_ring *r, enum vmm_ring_fd which) {
        return which == VMM_RING_KICK ? r->kick_fd : which == VMM_RING_CALL ? r->call_fd : r->err_fd;
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
        for (size_t i = 0; i < s->mem.n; i++)
                vhub_snap_put_region(w, V_REGION, st, g, &s->mem.regions[i]);
        for (unsigned i = 0; s->rings && i < d->queues; i++) {
                const struct vhub_vmm_ring *r = &s->rings[i];
                uint32_t f = ring_flags(r);

                if (f == 0)
                        continue;
                vhub_snap_begin(w, V_RING);
                vhub_snap_put_u32(w, VR_INDEX, i);
                vhub_snap_put_u32(w, VR_SET, f);
                for (size_t k = 0; k < ARRAY_N(ring_u32); k++)
                        vhub_snap_put_u32(w, ring_u32[k].tag, field_u32(r, ring_u32[k].off));
                for (size_t k = 0; k < ARRAY_N(ring_u64); k++)
                        vhub_snap_put_u64(w, ring_u64[k].tag, field_u64(r, ring_u64[k].off));
                for (enum vmm_ring_fd k = VMM_RING_KICK; k <= VMM_RING_ERR; k++)
                        vhub_snap_put_fd(w, ring_fd_tag[k], st, g, ring_fd_of(r, k));
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
        vhub_fd_claim_drop(claim, *ret);       /* named twice: the last one */
        *ret = r;
        return 0;
}

/* A region of the VMM's table; its memfd must come back, else nothing is
 * carried (the back-end maps it). */
static int read_region(struct vhub_mem_table *t, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec) {
        struct vhub_region rg;
        int r = vhub_snap_get_region(rec, claim, &rg), fd = rg.fd;

        if (r < 0 || fd < 0)
                return r < 0 ? r : fd;
        r = vhub_mem_table_add(t, &rg); /* takes the fd: closed on failure */
        if (r < 0)
                vhub_fd_claim_gone(claim, fd);
        return r;
}

static int read_vmm_ring(struct vhub_device *d, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec) {
        struct vhub_vmm_ring v = { .kick_fd = -1, .call_fd = -1, .err_fd = -1 };
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        uint32_t index = UINT32_MAX, f = 0;
        int fds[] = { -1, -1, -1 }, r = vhub_snap_enter(rec, &it);   /* enum vmm_ring_fd */
        const struct ring_field *rf;

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                if (x.tag == VR_INDEX)
                        r = vhub_snap_get_u32(&x, &index);
                else if (x.tag == VR_SET)
                        r = vhub_snap_get_u32(&x, &f);
                else if ((rf = field_find(ring_u32, ARRAY_N(ring_u32), x.tag)))
                        r = vhub_snap_get_u32(&x, (uint32_t *)field_at(&v, rf->off));
                else if ((rf = field_find(ring_u64, ARRAY_N(ring_u64), x.tag)))
                        r = vhub_snap_get_u64(&x, (uint64_t *)field_at(&v, rf->off));
                else if (x.tag >= VR_KICK && x.tag <= VR_ERR)
                        r = claim_key(claim, &x, &fds[x.tag - VR_KICK]);
                else
                        r = vhub_snap_unknown(&x);
        }
        if (r >= 0 && !vmm_ring_ok(d, index))
                r = -EBADMSG;
        if (r < 0) {
                /* claimed, so members of the group: out of it, then closed */
                for (enum vmm_ring_fd k = VMM_RING_KICK; k <= VMM_RING_ERR; k++)
                        vhub_fd_claim_drop(claim, fds[k]);
                return r;
        }
        ring_set_flags(&v, f);
        v.addr.index = index;
        vmm_ring_close_fds(d, index);
        d->vmm->rings[index] = v;
        /* tracked as the device's again (members already: restoring) */
        for (enum vmm_ring_fd k = VMM_RING_KICK; k <= VMM_RING_ERR; k++)
                vmm_ring_set_fd(d, index, k, fds[k]);
        return 0;
}

/* The session's plain records, by tag (a size or a record present: its
 * request was made). */
#define SESSION(type, member, ...) VHUB_SNAP_FIELD(type, struct vhub_device_vmm, member, __VA_ARGS__)
#define SESSION_SEEN(flag) VHUB_SNAP_SEEN(struct vhub_device_vmm, flag)
static const struct vhub_snap_field session_fields[] = {
        [V_FEATURES] = SESSION(U64, features, SESSION_SEEN(features_set)),
        [V_STATUS] = SESSION(U64, status, SESSION_SEEN(status_set)),
        [V_MTU] = SESSION(U64, mtu, SESSION_SEEN(mtu_set)),
        [V_LOG_SIZE] = SESSION(U64, log.mmap_size, SESSION_SEEN(log_set)),
        [V_LOG_OFFSET] = SESSION(U64, log.mmap_offset),
        [V_INFLIGHT_SIZE] = SESSION(U64, inflight.mmap_size, SESSION_SEEN(inflight_set)),
        [V_INFLIGHT_OFFSET] = SESSION(U64, inflight.mmap_offset),
        [V_INFLIGHT_QUEUES] = SESSION(U16, inflight.num_queues),
        [V_INFLIGHT_QUEUE_SIZE] = SESSION(U16, inflight.queue_size),
};

int vmm_carry_restore(struct vhub_device *d, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec) {
        struct vhub_device_vmm *s = d->vmm;
        struct vhub_mem_table t;
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        int log_fd = -1, r = vhub_snap_enter(rec, &it);

        vhub_mem_table_init(&t);
        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                if ((r = VHUB_SNAP_GET_FIELD(session_fields, &x, s)) != 0)
                        continue;
                switch (x.tag) {
                case V_LOG_FD: r = claim_key(claim, &x, &log_fd); break;
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
