/* SPDX-License-Identifier: MIT */
/*
 * A device in its VM's restart snapshot (vhub-model-snapshot.h): what
 * device.list, device.stats and a restore need -- its identity, the
 * credentials it acts with (its adder's) and its link,
 * its state, what was negotiated, its rings and inflight region, the
 * memory its back-end has mapped, its outage and backoff -- and each fd it
 * keeps by the identity key it has in the device's fd-store group.
 *
 * A device is *busy* when an op runs on it (a request may be on the wire,
 * or a stage pending): the snapshot is written as the op sends its first
 * request and after it ends (vhub-op-engine.c, op_said_busy()), so a
 * snapshot that says busy is a device that may have had a request in
 * flight at the crash; a planned restart lets ops finish
 * first.  A busy device is restored as lost (the reconnect path, with its
 * events); an idle one takes its connection back and nothing is sent.
 */
#include <endian.h>
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-backend-channel.h"
#include "vhub-backend-conn.h"
#include "vhub-backend-path.h"
#include "vhub-context.h"
#include "vhub-device-vmm-internal.h"
#include "vhub-fd-claim.h"
#include "vhub-model-snapshot.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

enum {
        D_ID = 1,
        D_NAME,
        D_PATH,
        D_TYPE,
        D_MODE,
        D_FACE,
        D_RECONNECT_MS,
        D_REQUESTED_QUEUES,
        D_STATE,
        D_STATE_BEFORE_LOSS,
        D_BUSY,
        D_REMOVING,
        D_SOCK,                 /* keys of its fds */
        D_CHAN,
        D_LISTEN,
        D_DIRFD,
        D_INFLIGHT,
        D_LISTENER,             /* nest: LS_* */
        D_RECONNECT_DELAY_MS,
        D_RECONNECT_LEFT_MS,    /* only while a reconnect timer runs */
        D_RECONNECTS,
        D_OUTAGE_AGO_USEC,      /* times as "how long ago": CLOCK_MONOTONIC does */
        D_OUTAGE_FAILURES,      /* not survive a reboot, and a restart is not one */
        D_RESTORED_AGO_USEC,
        D_HANDSHAKEN,
        D_FEATURES,
        D_PROTOCOL_FEATURES,
        D_ACKED_FEATURES,
        D_BACKEND_QUEUE_NUM,
        D_QUEUES,
        D_MAX_MEM_SLOTS,
        D_RING,                 /* nest: R_* */
        D_SHMEM_SIZES,          /* u64 each */
        D_INFLIGHT_SIZE,
        D_INFLIGHT_QUEUE_SIZE,
        D_SHADOW,               /* region ids, u64 each */
        D_MEM_SYNCED,
        D_STATS,                /* nest: ST_* */
        D_VMM_CONNECTED,        /* a front-door device's VMM was connected */
        /* added within format 1 (an older reader skips it) */
        D_CRED,                 /* nest: whose rights it acts with (vhub_snap_put_cred()) */
        D_CHAN_WAIT,            /* bytes: a back-end request waiting for the VMM (chan_wait_put()) */
        D_VMM_SESSION,          /* nest: a front-door VMM's session carried whole
                                 * (vhub-device-vmm-snapshot.c); not critical */
        D_VM_GROUP,             /* bool: its fds are in its VM's group v<vm id>, not d<id>
                                 * (a device.add since h-devadd: no push of a group of its
                                 * own); not critical: an older reader restores the device
                                 * as lost (its fds unclaimed), docs/restart.md */
};

enum { LS_NAME = 1, LS_DEV, LS_INO, LS_CTIME_SEC, LS_CTIME_NSEC };

enum {
        R_INDEX = 1,
        R_CONFIGURED,
        R_SIZE,
        R_DESC,
        R_AVAIL,
        R_USED,
        R_BASE,
        R_KICK,
        R_CALL,
        R_ERR,
        R_LOSS_AVAIL,
        R_LOSS_USED,
        R_LOSS_READ,
};

enum {
        ST_REQUESTS = 1,
        ST_REPLIES,
        ST_TIMEOUTS,
        ST_LOSSES,
        ST_BACKEND_REQUESTS,
        ST_EVENTFD_SKIPPED,
        ST_HANDSHAKE_USEC,
        ST_RESTORE_USEC,
        ST_RESTORED,
        ST_LOST,
        ST_LAST_LOSS_REALTIME,
        ST_LAST_LOSS_REASON,
        ST_STATE_AGO_USEC,
};

static bool device_busy(const struct vhub_device *d) {
        const struct vhub_op *op = TAILQ_FIRST(&d->ops);

        return op && op->running;
}

static uint64_t ago(uint64_t then_usec) {
        uint64_t now = vhub_now_usec();

        return then_usec && then_usec <= now ? now - then_usec : 0;
}

static void put_u64_array(struct vhub_snap_writer *w, uint32_t tag, const uint64_t *v, size_t n) {
        uint8_t *b;

        if (n == 0)
                return;
        b = malloc(n * 8);
        if (!b) {
                w->error = w->error ? w->error : -ENOMEM;
                return;
        }
        for (size_t i = 0; i < n; i++)
                for (int k = 0; k < 8; k++)
                        b[i * 8 + k] = (uint8_t)(v[i] >> (8 * k));
        vhub_snap_put_bytes(w, tag, b, n * 8);
        free(b);
}

/* *ret malloc()ed (NULL when empty). */
static int get_u64_array(const struct vhub_snap_rec *rec, uint64_t **ret, size_t *ret_n) {
        const uint8_t *p;
        const void *raw;
        size_t n;
        uint64_t *v;
        int r = vhub_snap_get_bytes(rec, &raw, &n);

        if (r < 0)
                return r;
        if (n % 8)
                return -EBADMSG;
        p = raw;
        v = n ? calloc(n / 8, sizeof(*v)) : NULL;
        if (n && !v)
                return -ENOMEM;
        for (size_t i = 0; i < n / 8; i++)
                for (int k = 7; k >= 0; k--)
                        v[i] = (v[i] << 8) | p[i * 8 + (size_t)k];
        free(*ret);
        *ret = v;
        *ret_n = n / 8;
        return 0;
}

/* A back-end request that waits for the VMM's device.backend_reply when a
 * planned restart begins, as 20 bytes: token (u64), then the request's
 * header -- request, flags, size (u32 each), all little-endian. */
#define CHAN_WAIT_SIZE 20

static void chan_wait_put(const struct vhub_device *d, struct vhub_snap_writer *w) {
        uint8_t buf[CHAN_WAIT_SIZE];
        struct vhu_header hdr;
        uint32_t h[3];
        uint64_t token;

        if (!device_channel_owner_wait(d, &token, &hdr))
                return;
        token = htole64(token);
        h[0] = htole32(hdr.request);
        h[1] = htole32(hdr.flags);
        h[2] = htole32(hdr.size);
        memcpy(buf, &token, sizeof(token));
        memcpy(buf + 8, h, sizeof(h));
        vhub_snap_put_bytes(w, D_CHAN_WAIT, buf, sizeof(buf));
}

/* ... and the channel of the next process waits for that reply again (the
 * VMM has the event and its token).  A malformed record: the request is
 * not waited for (the back-end's own timeout applies), nothing else is
 * refused for it. */
static void chan_wait_restore(struct vhub_device *d, const struct vhub_snap_rec *rec) {
        const uint8_t *p = NULL;
        struct vhu_header hdr;
        uint64_t token = 0;
        uint32_t h[3];
        size_t n = 0;

        if (vhub_snap_get_bytes(rec, (const void **)&p, &n) >= 0 && n == CHAN_WAIT_SIZE) {
                memcpy(&token, p, sizeof(token));
                memcpy(h, p + 8, sizeof(h));
                token = le64toh(token);
        }
        if (token != 0) {
                hdr = (struct vhu_header){ .request = le32toh(h[0]), .flags = le32toh(h[1]),
                                           .size = le32toh(h[2]) };
                if (vhu_request_info(VHU_DIR_BACKEND, hdr.request)) {
                        device_channel_restore_owner_wait(d, token, &hdr);
                        return;
                }
        }
        device_log(d, LOG_WARNING, NULL, "a back-end request waiting for the VMM could not be carried");
}

int vhub_device_serialize(const struct vhub_device *d, struct vhub_snap_writer *w) {
        const struct vhub_fdstore *s = d->vm->ctx->fdstore;
        const char *g = d->fd_group;

        vhub_snap_put_u64(w, D_ID, d->id);
        vhub_snap_put_str(w, D_NAME, d->name);
        vhub_snap_put_str(w, D_PATH, d->socket_path);
        vhub_snap_put_str(w, D_TYPE, d->type);
        vhub_snap_put_u32(w, D_MODE, d->mode);
        vhub_snap_put_u32(w, D_FACE, d->face);
        vhub_snap_put_u32(w, D_RECONNECT_MS, d->reconnect_ms);
        vhub_snap_put_u32(w, D_REQUESTED_QUEUES, d->requested_queues);
        vhub_snap_put_cred(w, D_CRED, &d->cred);
        vhub_snap_put_u32(w, D_STATE, d->state);
        vhub_snap_put_u32(w, D_STATE_BEFORE_LOSS, d->state_before_loss);
        vhub_snap_put_bool(w, D_BUSY, device_busy(d));
        vhub_snap_put_bool(w, D_REMOVING, d->removing);
        if (strcmp(d->fd_group, d->vm->fd_group) == 0) {
                vhub_snap_put_bool(w, D_VM_GROUP, true);
                /* a format-1 vhubd would look for its fds in d<id> and lose
                 * them: it must refuse the VM instead (a planned stop moves
                 * them there first: vhub_devices_own_groups()) */
                w->compat = VHUB_SNAP_COMPAT;
        }
        if (d->vmm && d->vmm->connected)
                vhub_snap_put_bool(w, D_VMM_CONNECTED, true);
        if (d->conn)
                vhub_snap_put_fd(w, D_SOCK, s, g, vhub_bconn_fd(d->conn));
        if (d->channel)
                vhub_snap_put_fd(w, D_CHAN, s, g, vhub_backend_channel_fd(d->channel));
        vhub_snap_put_fd(w, D_LISTEN, s, g, d->listen_fd);
        if (d->listener) {
                struct vhub_backend_listener_state st;

                vhub_snap_put_fd(w, D_DIRFD, s, g, vhub_backend_listener_dir_fd(d->listener));
                vhub_backend_listener_get(d->listener, &st);
                vhub_snap_begin(w, D_LISTENER);
                vhub_snap_put_str(w, LS_NAME, st.name);
                vhub_snap_put_u64(w, LS_DEV, st.dev);
                vhub_snap_put_u64(w, LS_INO, st.ino);
                vhub_snap_put_i64(w, LS_CTIME_SEC, st.ctime_sec);
                vhub_snap_put_i64(w, LS_CTIME_NSEC, st.ctime_nsec);
                vhub_snap_end(w);
        }
        vhub_snap_put_fd(w, D_INFLIGHT, s, g, d->inflight_fd);
        vhub_snap_put_u32(w, D_RECONNECT_DELAY_MS, d->reconnect_delay_ms);
        if (d->ev_reconnect && evtimer_pending(d->ev_reconnect, NULL)) {
                uint64_t now = vhub_now_usec();

                vhub_snap_put_u64(w, D_RECONNECT_LEFT_MS, d->reconnect_deadline_usec > now
                                          ? (d->reconnect_deadline_usec - now + 999) / 1000 : 0);
        }
        vhub_snap_put_u32(w, D_RECONNECTS, d->reconnects);
        vhub_snap_put_u64(w, D_OUTAGE_AGO_USEC, ago(d->outage_usec));
        vhub_snap_put_u32(w, D_OUTAGE_FAILURES, d->outage_failures);
        vhub_snap_put_u64(w, D_RESTORED_AGO_USEC, ago(d->restored_usec));
        vhub_snap_put_bool(w, D_HANDSHAKEN, d->handshaken);
        vhub_snap_put_u64(w, D_FEATURES, d->features);
        vhub_snap_put_u64(w, D_PROTOCOL_FEATURES, d->protocol_features);
        vhub_snap_put_u64(w, D_ACKED_FEATURES, d->acked_features);
        vhub_snap_put_u32(w, D_BACKEND_QUEUE_NUM, d->backend_queue_num);
        vhub_snap_put_u32(w, D_QUEUES, d->queues);
        vhub_snap_put_u32(w, D_MAX_MEM_SLOTS, d->max_mem_slots);
        for (unsigned i = 0; d->vrings && i < d->queues; i++) {
                const struct vhub_vring *v = &d->vrings[i];

                if (!v->configured && v->kick_fd < 0 && v->call_fd < 0 && v->err_fd < 0 && !v->loss_read)
                        continue;
                vhub_snap_begin(w, D_RING);
                vhub_snap_put_u32(w, R_INDEX, i);
                vhub_snap_put_bool(w, R_CONFIGURED, v->configured);
                vhub_snap_put_u32(w, R_SIZE, v->size);
                vhub_snap_put_u64(w, R_DESC, v->desc);
                vhub_snap_put_u64(w, R_AVAIL, v->avail);
                vhub_snap_put_u64(w, R_USED, v->used);
                vhub_snap_put_u32(w, R_BASE, v->base);
                vhub_snap_put_fd(w, R_KICK, s, g, v->kick_fd);
                vhub_snap_put_fd(w, R_CALL, s, g, v->call_fd);
                vhub_snap_put_fd(w, R_ERR, s, g, v->err_fd);
                vhub_snap_put_u32(w, R_LOSS_AVAIL, v->loss_avail);
                vhub_snap_put_u32(w, R_LOSS_USED, v->loss_used);
                vhub_snap_put_bool(w, R_LOSS_READ, v->loss_read);
                vhub_snap_end(w);
        }
        put_u64_array(w, D_SHMEM_SIZES, d->shmem_sizes, d->n_shmem);
        vhub_snap_put_u64(w, D_INFLIGHT_SIZE, d->inflight_size);
        vhub_snap_put_u32(w, D_INFLIGHT_QUEUE_SIZE, d->inflight_queue_size);
        put_u64_array(w, D_SHADOW, d->shadow, d->n_shadow);
        vhub_snap_put_bool(w, D_MEM_SYNCED, d->mem_synced);
        chan_wait_put(d, w);
        if (d->vmm)
                (void)vmm_carry_put(d, w, D_VMM_SESSION);
        vhub_snap_begin(w, D_STATS);
        vhub_snap_put_u64(w, ST_REQUESTS, d->stats.requests);
        vhub_snap_put_u64(w, ST_REPLIES, d->stats.replies);
        vhub_snap_put_u64(w, ST_TIMEOUTS, d->stats.timeouts);
        vhub_snap_put_u64(w, ST_LOSSES, d->stats.losses);
        vhub_snap_put_u64(w, ST_BACKEND_REQUESTS, d->stats.backend_requests);
        vhub_snap_put_u64(w, ST_EVENTFD_SKIPPED, d->stats.eventfd_skipped);
        vhub_snap_put_u64(w, ST_HANDSHAKE_USEC, d->stats.handshake_usec);
        vhub_snap_put_u64(w, ST_RESTORE_USEC, d->stats.restore_usec);
        vhub_snap_put_bool(w, ST_RESTORED, d->stats.restored);
        vhub_snap_put_bool(w, ST_LOST, d->stats.lost);
        vhub_snap_put_u64(w, ST_LAST_LOSS_REALTIME, d->stats.last_loss_realtime_usec);
        vhub_snap_put_str(w, ST_LAST_LOSS_REASON, d->stats.last_loss_reason);
        vhub_snap_put_u64(w, ST_STATE_AGO_USEC, ago(d->stats.state_since_usec));
        vhub_snap_end(w);
        return w->error;
}

/* ---- restore ---- */


/* What a device's record says, before anything is made of it. */
struct device_rec {
        uint64_t id;
        char name[VHUB_NAME_MAX + 1];
        char *path;
        bool busy, removing, has_listener, vmm_connected, has_cred, vm_group;
        bool has_sock, has_chan, has_listen, has_dirfd, has_inflight;
        struct vhub_fd_key sock, chan, listen, dirfd, inflight;
        struct vhub_backend_listener_state listener;
        bool reconnect_armed;
        uint64_t reconnect_left_ms;
};

#define LS(type, member) VHUB_SNAP_FIELD(type, struct vhub_backend_listener_state, member)
static const struct vhub_snap_field listener_fields[] = {
        [LS_NAME] = LS(STR, name),               [LS_DEV] = LS(U64, dev),
        [LS_INO] = LS(U64, ino),                 [LS_CTIME_SEC] = LS(I64, ctime_sec),
        [LS_CTIME_NSEC] = LS(I64, ctime_nsec),
};

static int read_listener(const struct vhub_snap_rec *rec, struct vhub_backend_listener_state *st) {
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        int r = vhub_snap_enter(rec, &it);

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0)
                if ((r = VHUB_SNAP_GET_FIELD(listener_fields, &x, st)) == 0)
                        r = vhub_snap_unknown(&x);
        return r;
}

#define RING(type, member) VHUB_SNAP_FIELD(type, struct vhub_vring, member)
static const struct vhub_snap_field ring_fields[] = {
        [R_CONFIGURED] = RING(BOOL, configured), [R_SIZE] = RING(U32, size), [R_BASE] = RING(U32, base),
        [R_DESC] = RING(U64, desc), [R_AVAIL] = RING(U64, avail), [R_USED] = RING(U64, used),
        [R_LOSS_AVAIL] = RING(U16, loss_avail), [R_LOSS_USED] = RING(U16, loss_used),
        [R_LOSS_READ] = RING(BOOL, loss_read),
};

static int read_ring(struct vhub_device *d, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec) {
        struct vhub_fd_key kick = { 0 }, call = { 0 }, err = { 0 };
        struct vhub_vring v = { .kick_fd = -1, .call_fd = -1, .err_fd = -1 };
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        bool have_index = false;
        int r = vhub_snap_enter(rec, &it);

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                if ((r = VHUB_SNAP_GET_FIELD(ring_fields, &x, &v)) != 0)
                        continue;
                switch (x.tag) {
                case R_INDEX: r = vhub_snap_get_u32(&x, &v.index); have_index = true; break;
                case R_KICK: r = vhub_snap_get_key(&x, &kick); break;
                case R_CALL: r = vhub_snap_get_key(&x, &call); break;
                case R_ERR: r = vhub_snap_get_key(&x, &err); break;
                default: r = vhub_snap_unknown(&x); break;
                }
        }
        if (r < 0)
                return r;
        if (!have_index || v.index >= d->queues)
                return -EBADMSG;
        /* a ring fd the store did not pass back: the ring cannot run as it
         * did; a loss restores it (the restore's START needs its fds, so
         * the device then fails: the VMM must start it again) */
        v.kick_fd = vhub_fd_claim(claim, &kick);
        v.call_fd = vhub_fd_claim(claim, &call);
        v.err_fd = vhub_fd_claim(claim, &err);
        if (v.kick_fd < 0)
                v.kick_fd = -1;
        if (v.call_fd < 0)
                v.call_fd = -1;
        if (v.err_fd < 0)
                v.err_fd = -1;
        if ((kick.ino && v.kick_fd < 0) || (call.ino && v.call_fd < 0) || (err.ino && v.err_fd < 0)) {
                /* what came back of the ring goes too (members already) */
                vhub_fd_claim_drop(claim, v.kick_fd);
                vhub_fd_claim_drop(claim, v.call_fd);
                vhub_fd_claim_drop(claim, v.err_fd);
                return -ENOENT;
        }
        d->vrings[v.index] = v;
        return 0;
}

#define ST(type, member) VHUB_SNAP_FIELD(type, struct vhub_device_stats, member)
static const struct vhub_snap_field stats_fields[] = {
        [ST_REQUESTS] = ST(U64, requests),                 [ST_REPLIES] = ST(U64, replies),
        [ST_TIMEOUTS] = ST(U64, timeouts),                 [ST_LOSSES] = ST(U64, losses),
        [ST_BACKEND_REQUESTS] = ST(U64, backend_requests), [ST_EVENTFD_SKIPPED] = ST(U64, eventfd_skipped),
        [ST_HANDSHAKE_USEC] = ST(U64, handshake_usec),     [ST_RESTORE_USEC] = ST(U64, restore_usec),
        [ST_RESTORED] = ST(BOOL, restored),                [ST_LOST] = ST(BOOL, lost),
        [ST_LAST_LOSS_REALTIME] = ST(U64, last_loss_realtime_usec),
        [ST_LAST_LOSS_REASON] = ST(STR, last_loss_reason),
};

static int read_stats(struct vhub_device *d, const struct vhub_snap_rec *rec) {
        struct vhub_device_stats *st = &d->stats;
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        uint64_t a = 0;
        int r = vhub_snap_enter(rec, &it);

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                if ((r = VHUB_SNAP_GET_FIELD(stats_fields, &x, st)) != 0)
                        continue;
                if (x.tag != ST_STATE_AGO_USEC) {
                        r = vhub_snap_unknown(&x);
                } else if ((r = vhub_snap_get_u64(&x, &a)) >= 0) {
                        st->state_since_usec = vhub_now_usec() - a;
                }
        }
        return r;
}

static uint64_t since(uint64_t ago_usec) {
        uint64_t now = vhub_now_usec();

        return ago_usec && ago_usec < now ? now - ago_usec : 0;
}

/* The device's scalars, by tag (the rest: read_fields()). */
#define DEV(type, member, ...) VHUB_SNAP_FIELD(type, struct vhub_device, member, __VA_ARGS__)
static const struct vhub_snap_field device_fields[] = {
        [D_TYPE] = DEV(STR, type),
        [D_MODE] = DEV(U32, mode, VHUB_SNAP_UPTO(VHUB_DEV_MODE_SERVER)),
        [D_FACE] = DEV(U32, face, VHUB_SNAP_UPTO(_VHUB_FACE_MAX - 1)),
        [D_RECONNECT_MS] = DEV(U32, reconnect_ms),
        [D_REQUESTED_QUEUES] = DEV(U32, requested_queues),
        [D_STATE] = DEV(U32, state, VHUB_SNAP_UPTO(_VHUB_DEV_STATE_MAX - 1)),
        [D_STATE_BEFORE_LOSS] = DEV(U32, state_before_loss, VHUB_SNAP_UPTO(_VHUB_DEV_STATE_MAX - 1)),
        [D_RECONNECT_DELAY_MS] = DEV(U32, reconnect_delay_ms),
        [D_RECONNECTS] = DEV(U32, reconnects),
        [D_OUTAGE_FAILURES] = DEV(U32, outage_failures),
        [D_HANDSHAKEN] = DEV(BOOL, handshaken),
        [D_FEATURES] = DEV(U64, features),
        [D_PROTOCOL_FEATURES] = DEV(U64, protocol_features),
        [D_ACKED_FEATURES] = DEV(U64, acked_features),
        [D_BACKEND_QUEUE_NUM] = DEV(U32, backend_queue_num),
        [D_QUEUES] = DEV(U32, queues, VHUB_SNAP_UPTO(VHUB_MAX_QUEUES)),
        [D_MAX_MEM_SLOTS] = DEV(U32, max_mem_slots),
        [D_INFLIGHT_SIZE] = DEV(U64, inflight_size),
        [D_INFLIGHT_QUEUE_SIZE] = DEV(U16, inflight_queue_size),
        [D_MEM_SYNCED] = DEV(BOOL, mem_synced),
};

/* What the record says before anything is made of it, by tag. */
#define REC(type, member, ...) VHUB_SNAP_FIELD(type, struct device_rec, member, __VA_ARGS__)
static const struct vhub_snap_field record_fields[] = {
        [D_ID] = REC(U64, id),
        [D_NAME] = REC(STR, name),
        [D_BUSY] = REC(BOOL, busy),
        [D_REMOVING] = REC(BOOL, removing),
        [D_VMM_CONNECTED] = REC(BOOL, vmm_connected),
        [D_RECONNECT_LEFT_MS] = REC(U64, reconnect_left_ms, VHUB_SNAP_SEEN(struct device_rec, reconnect_armed)),
};

/* The record's scalars into d and rec; rings and stats after, once the
 * number of queues is known. */
static int read_fields(struct vhub_device *d, struct device_rec *rec, struct vhub_snap_iter *it) {
        struct vhub_snap_iter again = *it;
        struct vhub_snap_rec x;
        uint64_t a;
        int r = 0;
        char buf[4096];

        while ((r = vhub_snap_next(&again, &x)) > 0) {
                if ((r = VHUB_SNAP_GET_FIELD(device_fields, &x, d)) != 0 ||
                    (r = VHUB_SNAP_GET_FIELD(record_fields, &x, rec)) != 0) {
                        if (r < 0)
                                return r;
                        continue;
                }
                a = 0;
                switch (x.tag) {
                case D_PATH:
                        r = vhub_snap_get_str(&x, buf, sizeof(buf));
                        if (r >= 0) {
                                free(rec->path);
                                rec->path = strdup(buf);
                                r = rec->path ? 0 : -ENOMEM;
                        }
                        break;
                case D_SOCK: r = vhub_snap_get_key(&x, &rec->sock); rec->has_sock = true; break;
                case D_CHAN: r = vhub_snap_get_key(&x, &rec->chan); rec->has_chan = true; break;
                case D_LISTEN: r = vhub_snap_get_key(&x, &rec->listen); rec->has_listen = true; break;
                case D_DIRFD: r = vhub_snap_get_key(&x, &rec->dirfd); rec->has_dirfd = true; break;
                case D_INFLIGHT: r = vhub_snap_get_key(&x, &rec->inflight); rec->has_inflight = true; break;
                case D_LISTENER: r = read_listener(&x, &rec->listener); rec->has_listener = true; break;
                case D_OUTAGE_AGO_USEC: r = vhub_snap_get_u64(&x, &a); d->outage_usec = since(a); break;
                case D_RESTORED_AGO_USEC: r = vhub_snap_get_u64(&x, &a); d->restored_usec = since(a); break;
                case D_SHMEM_SIZES: {
                        size_t n = 0;

                        r = get_u64_array(&x, &d->shmem_sizes, &n);
                        d->n_shmem = (unsigned)n;
                        break;
                }
                case D_SHADOW:
                        r = get_u64_array(&x, &d->shadow, &d->n_shadow);
                        d->cap_shadow = d->n_shadow;
                        break;
                case D_CRED: r = vhub_snap_get_cred(&x, &d->cred); rec->has_cred = true; break;
                case D_VM_GROUP: r = vhub_snap_get_bool(&x, &rec->vm_group); break;
                case D_RING:
                case D_STATS:
                case D_CHAN_WAIT:
                case D_VMM_SESSION:
                        break;  /* below */
                default: r = vhub_snap_unknown(&x); break;
                }
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        if (!rec->id || !rec->name[0] || !rec->path)
                return -EBADMSG;
        /* an older writer's device acted with its VM's credentials */
        if (!rec->has_cred)
                return vhub_cred_copy(&d->vm->cred, &d->cred);
        return 0;
}

int vhub_device_restore(struct vhub_vm *vm, struct vhub_fdstore_restore *r, struct vhub_fd_claim *vm_claim,
                        struct vhub_snap_iter *it, struct vhub_device **ret, const char **why) {
        struct vhub_context *ctx = vm->ctx;
        struct device_rec rec = { 0 };
        struct vhub_backend_listener *l = NULL;
        struct vhub_fd_claim own = { 0 }, *claim = &own;
        struct vhub_snap_iter again;
        struct vhub_snap_rec x, vmm_rec;
        struct vhub_device *d;
        bool vmm_carried = false;
        int sock = -1, chan = -1, listen = -1, k;

        *ret = NULL;
        d = calloc(1, sizeof(*d));
        if (!d)
                return -ENOMEM;
        TAILQ_INIT(&d->ops);
        d->vm = vm;
        d->listen_fd = -1;
        d->inflight_fd = -1;
        k = read_fields(d, &rec, it);
        if (k < 0) {
                *why = "a device record is malformed";
                vhub_cred_done(&d->cred);
                free(d->shmem_sizes);
                free(d->shadow);
                free(rec.path);
                free(d);
                return k;
        }
        d->id = rec.id;
        if (rec.vm_group)
                snprintf(d->fd_group, sizeof(d->fd_group), "%s", vm->fd_group);
        else
                vhub_fd_group(d->fd_group, VHUB_FD_GROUP_DEVICE, d->id);
        snprintf(d->name, sizeof(d->name), "%s", rec.name);
        d->socket_path = rec.path;
        d->vrings = calloc(d->queues ? d->queues : 1, sizeof(*d->vrings));
        for (unsigned i = 0; d->vrings && i < d->queues; i++)
                d->vrings[i] = (struct vhub_vring){ .index = i, .kick_fd = -1, .call_fd = -1, .err_fd = -1 };
        if (!d->vrings) {
                vhub_cred_done(&d->cred);
                free(d->shmem_sizes);
                free(d->shadow);
                free(d->socket_path);
                free(d);
                return -ENOMEM;
        }
        if (ctx->next_device_id < d->id)
                ctx->next_device_id = d->id;
        vhub_fd_group_own(ctx, VHUB_FD_GROUP_DEVICE, d->id, vm->uid, true);

        /* its VM's group is the VM's restore's to take and to close */
        if (rec.vm_group)
                claim = vm_claim;
        else
                vhub_fd_claim_open(r, ctx->fdstore, d->fd_group, &own);
        k = 0;
        again = *it;
        while (k >= 0 && vhub_snap_next(&again, &x) > 0) {
                if (x.tag == D_RING)
                        k = read_ring(d, claim, &x);
                else if (x.tag == D_STATS)
                        k = read_stats(d, &x);
        }
        if (k == -ENOENT) {
                device_log(d, LOG_WARNING, NULL, "a ring's eventfd was not passed back: restored as lost");
                rec.busy = true;
        } else if (k < 0) {
                *why = "a ring record of a device is malformed";
        }
        if (rec.has_sock && (sock = vhub_fd_claim(claim, &rec.sock)) < 0)
                rec.busy = true;        /* its connection is gone: a loss */
        if (rec.has_chan && (chan = vhub_fd_claim(claim, &rec.chan)) < 0)
                rec.busy = true;
        if (rec.has_inflight) {
                int fd = vhub_fd_claim(claim, &rec.inflight);

                d->inflight_fd = fd >= 0 ? fd : -1;
                if (fd < 0)
                        device_log(d, LOG_WARNING, NULL, "its inflight region was not passed back: a later "
                                   "loss of its back-end cannot resubmit what was in flight");
        }
        if (rec.has_listen && rec.has_dirfd && rec.has_listener) {
                int dfd = vhub_fd_claim(claim, &rec.dirfd);

                listen = vhub_fd_claim(claim, &rec.listen);
                if (dfd >= 0 && listen >= 0 && !(l = vhub_backend_listener_adopt(dfd, &rec.listener)))
                        vhub_fd_claim_gone(claim, dfd);        /* adopt() closed it */
                else if (!l)
                        vhub_fd_claim_drop(claim, dfd);
                if (!l) {
                        /* half a listener is none: the socket is made again
                         * (vhub_device_restore_finish()) */
                        device_log(d, LOG_WARNING, NULL, "its back-end listener was not passed back whole");
                        listen = vhub_fd_claim_drop(claim, listen);
                }
        }
        d->restore_relisten = d->mode == VHUB_DEV_MODE_SERVER && !l;
        /* what the device holds joins its group again (the fds are members
         * already: ctx->restoring) */
        for (unsigned i = 0; i < d->queues; i++) {
                device_fd_track(d, d->vrings[i].kick_fd, "ring%u.kick", i);
                device_fd_track(d, d->vrings[i].call_fd, "ring%u.call", i);
                device_fd_track(d, d->vrings[i].err_fd, "ring%u.err", i);
        }
        device_fd_track(d, d->inflight_fd, "inflight");
        /* a front-door VMM's session carried whole: its records' fds are the
         * device's group's (the face takes its own below) */
        if (k >= 0 && d->face == VHUB_FACE_FRONT_DOOR && d->handshaken && !rec.removing &&
            d->state != VHUB_DEV_CONNECTING) {
                again = *it;
                while (!vmm_carried && vhub_snap_next(&again, &x) > 0)
                        if (x.tag == D_VMM_SESSION) {
                                vmm_rec = x;
                                vmm_carried = vmm_session_restore(d, false) >= 0 &&
                                              vmm_carry_restore(d, claim, &vmm_rec) >= 0;
                                if (!vmm_carried)
                                        device_log(d, LOG_WARNING, NULL, "its VMM's session record cannot "
                                                   "be read: the VMM's connection closes");
                        }
        }
        if (claim == &own)
                vhub_fd_claim_close(&own);

        vhub_vm_link_device(vm, d);
        if (k >= 0 || k == -ENOENT)
                k = device_link_restore(d, sock, chan, listen, l);
        else {
                /* claimed, so members of the group: out of it, then closed */
                vhub_fd_claim_drop(claim, sock);
                vhub_fd_claim_drop(claim, chan);
                vhub_fd_claim_drop(claim, listen);
                vhub_fd_claim_gone(claim, vhub_backend_listener_dir_fd(l));
                vhub_backend_listener_forget(l);
        }
        if (k < 0 && !*why)
                *why = "a device's link could not be made again";
        /* a front-door device: its VMM's session, carried or not (vmm_session_restore()) */
        if (k >= 0 && d->handshaken && !rec.removing && d->state != VHUB_DEV_CONNECTING &&
            d->face == VHUB_FACE_FRONT_DOOR && (k = vmm_session_restore(d, rec.vmm_connected)) < 0)
                *why = "out of memory restoring a front-door device";
        if (k >= 0 && vmm_carried && d->vmm && vmm_carry_adopt(d, r, &vmm_rec) < 0) {
                device_log(d, LOG_WARNING, NULL, "its VMM's connection could not be taken back: it closes");
                d->vmm->had_vmm = rec.vmm_connected;
        }
        /* a device.add or device.remove in flight: its call is answered
         * -32011, and the device goes (its connection closes) */
        if (k < 0 || !d->handshaken || rec.removing || d->state == VHUB_DEV_CONNECTING) {
                if (k >= 0)
                        device_log(d, LOG_INFO, NULL, "was being %s when the daemon stopped: removed",
                                   rec.removing ? "removed" : "added");
                d->handshaken = false;  /* never announced again */
                TAILQ_REMOVE(&vm->devices, d, link);
                vm->n_devices--;
                ctx->n_devices--;
                vhub_device_free(d);
                return k < 0 ? k : 0;
        }
        again = *it;
        while (vhub_snap_next(&again, &x) > 0)
                if (x.tag == D_CHAN_WAIT)
                        chan_wait_restore(d, &x);
        d->restore_lost = rec.busy || d->state == VHUB_DEV_RESTORING;
        d->restore_reconnect_left_ms = rec.reconnect_armed ? rec.reconnect_left_ms : 0;
        d->restore_reconnect_armed = rec.reconnect_armed;
        if (d->state == VHUB_DEV_RESTORING) {
                /* connected again, the restore ops were running: start over */
                d->state = VHUB_DEV_DISCONNECTED;
        }
        device_log(d, LOG_DEBUG, NULL, "restored: %s%s", vhub_device_state_to_string(d->state),
                   d->restore_lost ? ", a request was in flight: lost" : "");
        *ret = d;
        return 0;
}

void vhub_device_restore_finish(struct vhub_device *d) {
        if (d->restore_relisten) {
                d->restore_relisten = false;
                device_link_relisten(d);
        }
        if (d->vmm && vmm_restore_finish(d)) {
                d->restore_lost = false;
                return;
        }
        if (d->state == VHUB_DEV_DISCONNECTED) {
                /* the outage goes on where it was: a connection the restore
                 * attempt had made goes, the next attempt when it was due */
                if (d->conn)
                        device_drop_connection(d);
                device_link_resume_outage(d, d->restore_reconnect_armed ? (unsigned)d->restore_reconnect_left_ms : 0);
        } else if (d->restore_lost) {
                if (d->conn)
                        device_mark_lost(d, "a request was in flight when the daemon stopped");
                else {
                        /* no connection came back: the loss is now */
                        device_set_state(d, VHUB_DEV_DISCONNECTED,
                                         "its connection did not survive the daemon's restart");
                        device_give_up_if_lost(d);
                }
        }
        d->restore_lost = false;
}
