/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-vmm-conn.h"
#include "vmm-clock.h"
#include "vmm-stream.h"
#include "vhu-fd.h"

/* Requests read per wake-up: one busy VMM cannot starve the loop. */
#define CONN_READ_BUDGET 16

/* One request the VMM waits for, in arrival order. */
struct pending_answer {
        uint64_t id;
        uint32_t request;
        uint32_t flags;              /* as received: decides the reply's shape */
        uint64_t protocol_features;  /* negotiated when it arrived */
        uint64_t deadline;           /* answer_timeout_ms after arrival; 0: none */
        struct vhu_msg *held;        /* answered before those ahead of it: the
                                      * answer, with fds of its own (dup'd) */
};

struct vhub_vmm_conn {
        struct vmm_stream stream;    /* first: vmm_stream_new_owner() */
        struct vhub_vmm_conn_limits limits;

        uint64_t offered_pf;
        uint64_t pf;                 /* acked by the VMM */

        unsigned head, count;
        uint64_t next_id;

        const struct vhub_vmm_conn_ops *ops;
        void *userdata;

        bool face_paused;            /* vhub_vmm_conn_pause() */
        bool dispatching;            /* inside ops->on_request */
        bool free_requested;         /* vhub_vmm_conn_free() called meanwhile */

        struct pending_answer pending[];  /* ring of limits.max_pending */
};

_Static_assert(offsetof(struct vhub_vmm_conn, stream) == 0, "the stream comes first");

void vhub_vmm_conn_limits_default(struct vhub_vmm_conn_limits *l) {
        *l = (struct vhub_vmm_conn_limits){
                .max_pending = 32,
                .max_queued_bytes = 1u << 20,
                .write_timeout_ms = 5000,
                .answer_timeout_ms = 0,
        };
}

/* The ring slot of the i-th oldest pending request (0: the head). */
static unsigned pending_slot(const struct vhub_vmm_conn *c, unsigned i) {
        return (c->head + i) % c->limits.max_pending;
}

static struct pending_answer *pending_at(struct vhub_vmm_conn *c, unsigned i) {
        return &c->pending[pending_slot(c, i)];
}

/* Where the request answer id names stands among the pending, or -ENOENT. */
static int pending_find(const struct vhub_vmm_conn *c, uint64_t id) {
        uint64_t first;

        if (c->count == 0 || id == 0)
                return -ENOENT;
        first = c->pending[c->head].id;
        if (id < first || id - first >= c->count)
                return -ENOENT;
        return (int)(id - first);
}

/* The head is the oldest unanswered request (answered ones leave at once). */
static void conn_rearm(struct vhub_vmm_conn *c) {
        vmm_stream_rearm(&c->stream, c->count > 0 ? pending_at(c, 0)->deadline : 0);
}

static void conn_on_timer(void *owner, uint64_t now) {
        struct vhub_vmm_conn *c = owner;

        if (c->count > 0 && pending_at(c, 0)->deadline && pending_at(c, 0)->deadline <= now) {
                vmm_stream_lose(&c->stream, true, "%s from the VMM not answered within %u ms",
                                vhu_request_name(VHU_DIR_FRONTEND, pending_at(c, 0)->request),
                                c->limits.answer_timeout_ms);
                return;
        }
        conn_rearm(c);
}

static void conn_on_lost(void *owner) {
        struct vhub_vmm_conn *c = owner;

        c->ops->on_lost(c->userdata, c->stream.lost_reason);
}

static void conn_send(struct vhub_vmm_conn *c, const struct vhu_msg *m) {
        int r = vmm_stream_send(&c->stream, m);

        if (r < 0)
                vmm_stream_lose(&c->stream, false, "cannot queue an answer to the VMM: %s", strerror(-r));
}

/* The head was answered: drop it, send whatever was held behind it. */
static void conn_pop_answered(struct vhub_vmm_conn *c) {
        c->head = (c->head + 1) % c->limits.max_pending;
        c->count--;
        while (c->count > 0 && pending_at(c, 0)->held && !c->stream.lost) {
                struct pending_answer *p = pending_at(c, 0);

                conn_send(c, p->held);
                vhu_msg_clear(p->held); /* the writer took its own fds */
                free(p->held);
                p->held = NULL;
                c->head = (c->head + 1) % c->limits.max_pending;
                c->count--;
        }
        vmm_stream_set_reading(&c->stream, !c->face_paused);
        conn_rearm(c);
}

static void conn_free_now(struct vhub_vmm_conn *c) {
        while (c->count > 0) {
                struct pending_answer *p = pending_at(c, 0);

                if (p->held) {
                        vhu_msg_clear(p->held);
                        free(p->held);
                }
                c->head = (c->head + 1) % c->limits.max_pending;
                c->count--;
        }
        vmm_stream_done(&c->stream);
        free(c);
}

/* spec "Protocol features": the front-end acks a subset of the offer. */
static bool conn_accept_protocol_features(struct vhub_vmm_conn *c, uint64_t acked) {
        if (acked & ~c->offered_pf) {
                vmm_stream_lose(&c->stream, false,
                                "the VMM acked protocol features 0x%llx beyond the 0x%llx offered",
                                (unsigned long long)acked, (unsigned long long)c->offered_pf);
                return false;
        }
        if (vhu_protocol_features_consistent(acked) != acked) {
                vmm_stream_lose(&c->stream, false,
                                "the VMM acked protocol features 0x%llx without what the spec requires with them",
                                (unsigned long long)acked);
                return false;
        }
        c->pf = acked;
        return true;
}

/* One whole message from the VMM: validate, note what it waits for, hand it over. */
static void conn_handle(struct vhub_vmm_conn *c, struct vhu_msg *m) {
        const char *why = NULL;
        uint64_t id = 0;

        if (vhu_validate_request(VHU_DIR_FRONTEND, c->pf, m, &why) < 0) {
                vmm_stream_lose(&c->stream, false, "bad request %s (%u) from the VMM: %s",
                                vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request), m->hdr.request,
                                why ? why : "invalid");
                return;
        }
        if (m->hdr.request == VHU_REQ_SET_PROTOCOL_FEATURES &&
            !conn_accept_protocol_features(c, m->payload.u64))
                return;
        /* after SET_PROTOCOL_FEATURES: the set it made decides (as back-ends do) */
        if (vhu_request_expects_reply(VHU_DIR_FRONTEND, m->hdr.request, m->hdr.flags, c->pf)) {
                struct pending_answer *p = pending_at(c, c->count);

                *p = (struct pending_answer){
                        .id = c->next_id++,
                        .request = m->hdr.request,
                        .flags = m->hdr.flags,
                        .protocol_features = c->pf,
                };
                if (c->limits.answer_timeout_ms)
                        p->deadline = vmm_now_usec() + (uint64_t)c->limits.answer_timeout_ms * 1000u;
                c->count++;
                if (c->count == 1)
                        conn_rearm(c);
                id = p->id;
        }
        c->dispatching = true;
        c->ops->on_request(c->userdata, m, id);
        c->dispatching = false;
}

/* Whether the VMM's socket holds bytes to read now (or an error to report):
 * peeked, nothing taken. */
static bool conn_bytes_wait(const struct vhub_vmm_conn *c) {
        uint8_t b;
        ssize_t n = recv(c->stream.fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);

        return n > 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static void conn_on_readable(void *owner) {
        struct vhub_vmm_conn *c = owner;
        bool told = false;

        for (int budget = CONN_READ_BUDGET; budget > 0; budget--) {
                struct vhu_msg m;
                int r;

                if (c->stream.lost || c->free_requested)
                        break;
                if (c->face_paused || c->count >= c->limits.max_pending) {
                        /* back-pressure: the VMM waits for its answers */
                        vmm_stream_set_reading(&c->stream, false);
                        break;
                }
                /* before the first bytes, and again before each message that
                 * waits after one (handling it may have written a snapshot
                 * that carries the session again); not where there is
                 * nothing to take (that would undo such a snapshot) */
                if (c->ops->on_before_read && (!told || conn_bytes_wait(c))) {
                        told = true;
                        c->ops->on_before_read(c->userdata);
                        if (c->stream.lost || c->free_requested)
                                break;
                }
                vhu_msg_init(&m);
                r = vhu_reader_read(&c->stream.reader, c->stream.fd, &m);
                if (r == -EAGAIN)
                        break;
                if (r == 0) {
                        vmm_stream_lose(&c->stream, false, "the VMM closed the connection");
                        break;
                }
                if (r < 0) {
                        if (r == -EPROTO)
                                vmm_stream_lose(&c->stream, false,
                                                "protocol violation in the VMM's message framing "
                                                "(a payload beyond %u bytes, more than %u fds, or fds off a message's first byte)",
                                                VHU_MAX_PAYLOAD, VHU_MAX_FDS);
                        else if (r == -ECONNRESET)
                                vmm_stream_lose(&c->stream, false, "the VMM closed the connection inside a message");
                        else
                                vmm_stream_lose(&c->stream, false, "cannot read from the VMM: %s", strerror(-r));
                        break;
                }
                conn_handle(c, &m);
                vhu_msg_clear(&m);
        }
        if (c->free_requested)
                conn_free_now(c);
}

static void conn_on_fds_changed(void *owner) {
        struct vhub_vmm_conn *c = owner;

        if (c->ops->on_fds_changed)
                c->ops->on_fds_changed(c->userdata);
}

static const struct vmm_stream_ops conn_stream_ops = {
        .on_readable = conn_on_readable,
        .on_timer = conn_on_timer,
        .on_lost = conn_on_lost,
        .on_fds_changed = conn_on_fds_changed,
};

int vhub_vmm_conn_new(struct event_base *base, int fd, const struct vhub_vmm_conn_limits *limits,
                      const struct vhub_vmm_conn_ops *ops, void *userdata, struct vhub_vmm_conn **ret) {
        struct vhub_vmm_conn_limits l;
        struct vhub_vmm_conn *c;
        int r;

        if (limits)
                l = *limits;
        else
                vhub_vmm_conn_limits_default(&l);
        if (l.max_pending == 0)
                l.max_pending = 1;
        /* the ring comes with the connection */
        c = vmm_stream_new_owner(sizeof(*c) + (size_t)l.max_pending * sizeof(c->pending[0]), base, fd,
                                 "its connection", l.max_queued_bytes, l.write_timeout_ms,
                                 &conn_stream_ops, &r);
        if (!c)
                return r;
        c->limits = l;
        c->ops = ops;
        c->userdata = userdata;
        c->next_id = 1;
        *ret = c;
        return 0;
}

struct vhub_vmm_conn *vhub_vmm_conn_free(struct vhub_vmm_conn *c) {
        if (!c)
                return NULL;
        if (c->dispatching) {
                /* the read loop frees it when on_request returns */
                c->free_requested = true;
                vmm_stream_abandon(&c->stream);
                return NULL;
        }
        conn_free_now(c);
        return NULL;
}

bool vhub_vmm_conn_quiet(const struct vhub_vmm_conn *c, unsigned awaited) {
        if (!vmm_stream_at_rest(&c->stream) || c->count != awaited || c->free_requested)
                return false;
        for (unsigned i = 0; i < c->count; i++)
                if (c->pending[pending_slot(c, i)].held)
                        return false;   /* an answer given and not sent */
        return true;
}

bool vhub_vmm_conn_at_rest(const struct vhub_vmm_conn *c) {
        return vhub_vmm_conn_quiet(c, 0);
}

void vhub_vmm_conn_redo(struct vhub_vmm_conn *c, struct vhu_msg *m) {
        if (c->stream.lost || c->free_requested || c->dispatching)
                return;
        if (c->count >= c->limits.max_pending) {
                /* never left unanswered: the VMM reconnects instead */
                vmm_stream_lose(&c->stream, false, "more requests carried across a restart than %u",
                                c->limits.max_pending);
                return;
        }
        conn_handle(c, m);
        if (c->free_requested)
                conn_free_now(c);
}

int vhub_vmm_conn_resume(struct vhub_vmm_conn *c, uint64_t acked) {
        /* the rules SET_PROTOCOL_FEATURES met when the VMM sent it */
        if ((acked & ~c->offered_pf) || vhu_protocol_features_consistent(acked) != acked)
                return -EPROTO;
        c->pf = acked;
        return 0;
}

void vhub_vmm_conn_offer_protocol_features(struct vhub_vmm_conn *c, uint64_t offer) {
        c->offered_pf = offer;
}

uint64_t vhub_vmm_conn_protocol_features(const struct vhub_vmm_conn *c) {
        return c->pf;
}

/* A request carries a reply of its own whatever NEED_REPLY says. */
static bool pending_wants_reply(const struct pending_answer *p) {
        return vhu_request_expects_reply(VHU_DIR_FRONTEND, p->request, p->flags & ~VHU_FLAG_NEED_REPLY,
                                         p->protocol_features);
}

enum vhub_vmm_answer_kind vhub_vmm_conn_answer_kind(const struct vhub_vmm_conn *c, uint64_t answer_id) {
        int i = pending_find(c, answer_id);
        const struct pending_answer *p = i < 0 ? NULL : &c->pending[pending_slot(c, (unsigned)i)];

        if (!p || p->held)
                return VHUB_VMM_ANSWER_NONE;
        return pending_wants_reply(p) ? VHUB_VMM_ANSWER_REPLY : VHUB_VMM_ANSWER_ACK;
}

/* Send (in order) or hold one answer; r is built and validated. */
static int conn_answer(struct vhub_vmm_conn *c, struct pending_answer *p, struct vhu_msg *r) {
        struct vhu_msg *held;

        if (p == pending_at(c, 0)) {
                conn_send(c, r);
                conn_pop_answered(c);
                return 0;
        }
        held = malloc(sizeof(*held));
        if (!held)
                return -ENOMEM;
        *held = *r;
        for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                held->fds[i] = -1;
        held->n_fds = 0;
        vhu_msg_own_fds(held);
        /* the caller's fds are borrowed: hold copies of our own */
        for (unsigned i = 0; i < r->n_fds; i++) {
                held->fds[i] = fcntl(r->fds[i], F_DUPFD_CLOEXEC, 3);
                if (held->fds[i] < 0) {
                        int e = -errno;

                        vhu_msg_clear(held);
                        free(held);
                        return e;
                }
                held->n_fds = i + 1;
        }
        p->held = held;
        return 0;
}

static int conn_answer_with(struct vhub_vmm_conn *c, uint64_t answer_id, bool own_reply,
                            const void *payload, uint32_t size, const int *fds, unsigned n_fds) {
        struct pending_answer *p;
        const char *why = NULL;
        struct vhu_msg r;
        int at;

        if (c->stream.lost)
                return -ENOTCONN;
        at = pending_find(c, answer_id);
        p = at < 0 ? NULL : pending_at(c, (unsigned)at);
        if (!p || p->held || pending_wants_reply(p) != own_reply)
                return -ENOENT;
        if (size > VHU_MAX_PAYLOAD || n_fds > VHU_MAX_FDS || (size && !payload) || (n_fds && !fds))
                return -EINVAL;
        vhu_msg_init(&r);
        r.hdr.request = p->request;
        r.hdr.flags = VHU_VERSION | VHU_FLAG_REPLY;
        r.hdr.size = size;
        if (size)
                memcpy(r.payload.raw, payload, size);
        for (unsigned i = 0; i < n_fds; i++) {
                if (fds[i] < 0)
                        return -EINVAL;
                r.fds[i] = fds[i];
        }
        r.n_fds = n_fds;
        /* what the VMM's front-end would refuse is a bug here, never sent */
        if (vhu_validate_reply(VHU_DIR_FRONTEND, p->request, p->flags, p->protocol_features, &r,
                               &why) < 0)
                return -EINVAL;
        return conn_answer(c, p, &r); /* r's fds stay the caller's */
}

int vhub_vmm_conn_reply(struct vhub_vmm_conn *c, uint64_t answer_id, const void *payload,
                        uint32_t size, const int *fds, unsigned n_fds) {
        return conn_answer_with(c, answer_id, true, payload, size, fds, n_fds);
}

int vhub_vmm_conn_reply_u64(struct vhub_vmm_conn *c, uint64_t answer_id, uint64_t value) {
        return conn_answer_with(c, answer_id, true, &value, sizeof(value), NULL, 0);
}

int vhub_vmm_conn_ack(struct vhub_vmm_conn *c, uint64_t answer_id, uint64_t status) {
        return conn_answer_with(c, answer_id, false, &status, sizeof(status), NULL, 0);
}

void vhub_vmm_conn_pause(struct vhub_vmm_conn *c, bool paused) {
        c->face_paused = paused;
        vmm_stream_set_reading(&c->stream, !paused && c->count < c->limits.max_pending);
}

void vhub_vmm_conn_fail(struct vhub_vmm_conn *c, const char *reason) {
        vmm_stream_lose(&c->stream, false, "%s", reason);
}

bool vhub_vmm_conn_is_lost(const struct vhub_vmm_conn *c) {
        return c->stream.lost;
}

unsigned vhub_vmm_conn_pending(const struct vhub_vmm_conn *c) {
        return c->count;
}

int vhub_vmm_conn_fd(const struct vhub_vmm_conn *c) {
        return c->stream.fd;
}

void vhub_vmm_conn_foreach_fd(const struct vhub_vmm_conn *c, vhu_fd_fn fn, void *userdata) {
        vmm_stream_foreach_fd(&c->stream, fn, userdata);
        for (unsigned i = 0; i < c->count; i++) {
                const struct pending_answer *p = &c->pending[pending_slot(c, i)];

                for (unsigned k = 0; p->held && k < p->held->n_fds; k++)
                        fn(p->held->fds[k], "held", userdata);
        }
}
