/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhub-vmm-conn.h"
#include "vhu-socket.h"
#include "vmm-clock.h"

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
        int fd;
        struct event *ev_read;
        struct event *ev_write;
        struct event *ev_timer;
        struct event *ev_lost;
        struct vhu_reader reader;
        struct vhu_writer writer;
        struct vhub_vmm_conn_limits limits;
        uint64_t write_deadline;     /* 0: the writer is not stalled */
        bool reading;                /* ev_read is armed */

        uint64_t offered_pf;
        uint64_t pf;                 /* acked by the VMM */

        struct pending_answer *pending;  /* ring of limits.max_pending */
        unsigned head, count;
        uint64_t next_id;

        const struct vhub_vmm_conn_ops *ops;
        void *userdata;

        bool lost;
        char lost_reason[256];
        bool dispatching;            /* inside ops->on_request */
        bool free_requested;         /* vhub_vmm_conn_free() called meanwhile */
};

void vhub_vmm_conn_limits_default(struct vhub_vmm_conn_limits *l) {
        *l = (struct vhub_vmm_conn_limits){
                .max_pending = 32,
                .max_queued_bytes = 1u << 20,
                .write_timeout_ms = 5000,
                .answer_timeout_ms = 0,
        };
}

static void conn_lose(struct vhub_vmm_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void conn_lose(struct vhub_vmm_conn *c, const char *fmt, ...) {
        va_list ap;

        if (c->lost)
                return;
        c->lost = true;
        va_start(ap, fmt);
        vsnprintf(c->lost_reason, sizeof(c->lost_reason), fmt, ap);
        va_end(ap);
        event_del(c->ev_read);
        event_del(c->ev_write);
        evtimer_del(c->ev_timer);
        c->reading = false;
        /* reported from the loop, never inside the caller's stack */
        event_active(c->ev_lost, 0, 0);
}

static void conn_lost_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_conn *c = userdata;

        c->ops->on_lost(c->userdata, c->lost_reason);
}

static struct pending_answer *pending_at(const struct vhub_vmm_conn *c, unsigned i) {
        return &c->pending[(c->head + i) % c->limits.max_pending];
}

static struct pending_answer *pending_find(const struct vhub_vmm_conn *c, uint64_t id) {
        uint64_t first;

        if (c->count == 0 || id == 0)
                return NULL;
        first = pending_at(c, 0)->id;
        if (id < first || id - first >= c->count)
                return NULL;
        return pending_at(c, (unsigned)(id - first));
}

static void conn_rearm_timer(struct vhub_vmm_conn *c) {
        uint64_t deadline = c->write_deadline;
        struct timeval tv;

        if (c->lost)
                return;
        /* the head is the oldest unanswered request (answered ones leave at once) */
        if (c->count > 0 && pending_at(c, 0)->deadline &&
            (!deadline || pending_at(c, 0)->deadline < deadline))
                deadline = pending_at(c, 0)->deadline;
        if (!deadline) {
                evtimer_del(c->ev_timer);
                return;
        }
        tv = vmm_timeval_until(deadline);
        evtimer_add(c->ev_timer, &tv);
}

static void conn_set_reading(struct vhub_vmm_conn *c, bool on) {
        if (c->lost || c->reading == on)
                return;
        c->reading = on;
        if (on)
                event_add(c->ev_read, NULL); /* level-triggered: buffered requests fire it */
        else
                event_del(c->ev_read);
}

/* r: what vhu_writer_send()/vhu_writer_flush() returned. */
static void conn_after_write(struct vhub_vmm_conn *c, int r) {
        if (r == 0) {
                event_del(c->ev_write);
                if (c->write_deadline) {
                        c->write_deadline = 0;
                        conn_rearm_timer(c);
                }
                return;
        }
        if (r != -EAGAIN) {
                conn_lose(c, "cannot write to the VMM: %s", strerror(-r));
                return;
        }
        if (c->writer.n_bytes > c->limits.max_queued_bytes) {
                conn_lose(c, "the VMM does not read its answers (%zu bytes queued)", c->writer.n_bytes);
                return;
        }
        event_add(c->ev_write, NULL);
        if (!c->write_deadline) {
                c->write_deadline = vmm_now_usec() + (uint64_t)c->limits.write_timeout_ms * 1000u;
                conn_rearm_timer(c);
        }
}

static void conn_write_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_conn *c = userdata;

        if (!c->lost)
                conn_after_write(c, vhu_writer_flush(&c->writer, c->fd));
}

static void conn_send(struct vhub_vmm_conn *c, const struct vhu_msg *m) {
        int r = vhu_writer_send(&c->writer, c->fd, m);

        if (r == -ENOMEM || r == -EMFILE || r == -EINVAL)
                conn_lose(c, "cannot queue an answer to the VMM: %s", strerror(-r));
        else
                conn_after_write(c, r);
}

/* The head was answered: drop it, send whatever was held behind it. */
static void conn_pop_answered(struct vhub_vmm_conn *c) {
        c->head = (c->head + 1) % c->limits.max_pending;
        c->count--;
        while (c->count > 0 && pending_at(c, 0)->held && !c->lost) {
                struct pending_answer *p = pending_at(c, 0);

                conn_send(c, p->held);
                vhu_msg_clear(p->held); /* the writer took its own fds */
                free(p->held);
                p->held = NULL;
                c->head = (c->head + 1) % c->limits.max_pending;
                c->count--;
        }
        if (c->count < c->limits.max_pending)
                conn_set_reading(c, true);
        conn_rearm_timer(c);
}

static void conn_timer_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_conn *c = userdata;
        uint64_t now = vmm_now_usec();

        if (c->count > 0 && pending_at(c, 0)->deadline && pending_at(c, 0)->deadline <= now) {
                conn_lose(c, "%s from the VMM not answered within %u ms",
                          vhu_request_name(VHU_DIR_FRONTEND, pending_at(c, 0)->request),
                          c->limits.answer_timeout_ms);
                return;
        }
        if (c->write_deadline && c->write_deadline <= now) {
                conn_lose(c, "the VMM took none of its answers for %u ms", c->limits.write_timeout_ms);
                return;
        }
        conn_rearm_timer(c);
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
        if (c->ev_read)
                event_free(c->ev_read);
        if (c->ev_write)
                event_free(c->ev_write);
        if (c->ev_timer)
                event_free(c->ev_timer);
        if (c->ev_lost)
                event_free(c->ev_lost);
        vhu_reader_reset(&c->reader);
        vhu_writer_clear(&c->writer);
        if (c->fd >= 0)
                close(c->fd);
        free(c->pending);
        free(c);
}

/* spec "Protocol features": the front-end acks a subset of the offer. */
static bool conn_accept_protocol_features(struct vhub_vmm_conn *c, uint64_t acked) {
        if (acked & ~c->offered_pf) {
                conn_lose(c, "the VMM acked protocol features 0x%llx beyond the 0x%llx offered",
                          (unsigned long long)acked, (unsigned long long)c->offered_pf);
                return false;
        }
        if (vhu_protocol_features_consistent(acked) != acked) {
                conn_lose(c, "the VMM acked protocol features 0x%llx without what the spec requires with them",
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
                conn_lose(c, "bad request %s (%u) from the VMM: %s",
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
                        conn_rearm_timer(c);
                id = p->id;
        }
        c->dispatching = true;
        c->ops->on_request(c->userdata, m, id);
        c->dispatching = false;
}

static void conn_read_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_conn *c = userdata;

        for (int budget = CONN_READ_BUDGET; budget > 0; budget--) {
                struct vhu_msg m;
                int r;

                if (c->lost || c->free_requested)
                        break;
                if (c->count >= c->limits.max_pending) {
                        /* back-pressure: the VMM waits for its answers */
                        conn_set_reading(c, false);
                        break;
                }
                vhu_msg_init(&m);
                r = vhu_reader_read(&c->reader, c->fd, &m);
                if (r == -EAGAIN)
                        break;
                if (r == 0) {
                        conn_lose(c, "the VMM closed the connection");
                        break;
                }
                if (r < 0) {
                        if (r == -EPROTO)
                                conn_lose(c, "protocol violation in the VMM's message framing "
                                             "(a payload beyond %u bytes, more than %u fds, or fds off a message's first byte)",
                                          VHU_MAX_PAYLOAD, VHU_MAX_FDS);
                        else if (r == -ECONNRESET)
                                conn_lose(c, "the VMM closed the connection inside a message");
                        else
                                conn_lose(c, "cannot read from the VMM: %s", strerror(-r));
                        break;
                }
                conn_handle(c, &m);
                vhu_msg_clear(&m);
        }
        if (c->free_requested)
                conn_free_now(c);
}

int vhub_vmm_conn_new(struct event_base *base, int fd, const struct vhub_vmm_conn_limits *limits,
                      const struct vhub_vmm_conn_ops *ops, void *userdata, struct vhub_vmm_conn **ret) {
        struct vhub_vmm_conn *c;
        int fl;

        fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
                int r = -errno;

                close(fd);
                return r;
        }
        c = calloc(1, sizeof(*c));
        if (!c) {
                close(fd);
                return -ENOMEM;
        }
        c->fd = fd;
        if (limits)
                c->limits = *limits;
        else
                vhub_vmm_conn_limits_default(&c->limits);
        if (c->limits.max_pending == 0)
                c->limits.max_pending = 1;
        c->ops = ops;
        c->userdata = userdata;
        c->next_id = 1;
        vhu_reader_init(&c->reader);
        vhu_writer_init(&c->writer);
        c->pending = calloc(c->limits.max_pending, sizeof(*c->pending));
        c->ev_read = event_new(base, fd, EV_READ | EV_PERSIST, conn_read_cb, c);
        c->ev_write = event_new(base, fd, EV_WRITE | EV_PERSIST, conn_write_cb, c);
        c->ev_timer = evtimer_new(base, conn_timer_cb, c);
        c->ev_lost = event_new(base, -1, 0, conn_lost_cb, c);
        if (!c->pending || !c->ev_read || !c->ev_write || !c->ev_timer || !c->ev_lost ||
            event_add(c->ev_read, NULL) < 0) {
                conn_free_now(c);
                return -ENOMEM;
        }
        c->reading = true;
        *ret = c;
        return 0;
}

struct vhub_vmm_conn *vhub_vmm_conn_free(struct vhub_vmm_conn *c) {
        if (!c)
                return NULL;
        if (c->dispatching) {
                /* the read loop frees it when on_request returns */
                c->free_requested = true;
                c->lost = true;
                event_del(c->ev_read);
                event_del(c->ev_write);
                evtimer_del(c->ev_timer);
                event_del(c->ev_lost);
                return NULL;
        }
        conn_free_now(c);
        return NULL;
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
        const struct pending_answer *p = pending_find(c, answer_id);

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

        if (c->lost)
                return -ENOTCONN;
        p = pending_find(c, answer_id);
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

void vhub_vmm_conn_fail(struct vhub_vmm_conn *c, const char *reason) {
        conn_lose(c, "%s", reason);
}

bool vhub_vmm_conn_is_lost(const struct vhub_vmm_conn *c) {
        return c->lost;
}

unsigned vhub_vmm_conn_pending(const struct vhub_vmm_conn *c) {
        return c->count;
}
