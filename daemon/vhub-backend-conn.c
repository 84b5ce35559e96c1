/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhub-backend-conn.h"
#include "vhub-loop.h"
#include "vhub-time.h"
#include "vhu-fd.h"
#include "vhu-socket.h"

struct pending_reply {
        uint32_t request;
        uint32_t flags;
        uint32_t tag;
        uint64_t deadline;
};

struct vhub_bconn {
        int fd;
        struct event_base *base;
        struct event *ev_read;
        struct event *ev_write;
        struct event *ev_timer;
        struct event *ev_lost;
        struct vhu_reader reader;
        struct vhu_writer writer;
        uint64_t protocol_features;
        uint64_t timeout_usec;
        uint64_t write_deadline;   /* 0: the writer is not stalled */

        struct pending_reply *pending;  /* ring buffer */
        unsigned cap, head, count;
        unsigned max_pending;           /* the ring grows up to this */

        const struct vhub_bconn_ops *ops;
        void *userdata;

        bool lost;
        bool peer_gone;            /* a write found the peer closed: nothing more is
                                    * written; the loss comes from the read side */
        bool lost_timeout;
        uint32_t lost_request;
        char lost_reason[200];

        bool dispatching;          /* inside ops->on_reply */
        bool free_requested;       /* vhub_bconn_free() called while dispatching */
};

static void bconn_rearm_timer(struct vhub_bconn *c) {
        uint64_t deadline = 0, now;
        struct timeval tv;

        if (c->lost)
                return;
        if (c->count > 0)
                deadline = c->pending[c->head].deadline;
        if (c->write_deadline && (!deadline || c->write_deadline < deadline))
                deadline = c->write_deadline;
        if (!deadline) {
                evtimer_del(c->ev_timer);
                return;
        }
        now = vhub_now_usec();
        tv = vhub_timeval_from_usec(deadline > now ? deadline - now : 0);
        evtimer_add(c->ev_timer, &tv);
}

void vhub_bconn_fail(struct vhub_bconn *c, bool timeout, uint32_t request, const char *reason) {
        if (!c || c->lost)
                return;
        c->lost = true;
        c->lost_timeout = timeout;
        c->lost_request = request;
        snprintf(c->lost_reason, sizeof(c->lost_reason), "%s", reason);
        event_del(c->ev_read);
        event_del(c->ev_write);
        evtimer_del(c->ev_timer);
        /* Report from the loop, never from inside the caller's stack. */
        event_active(c->ev_lost, 0, 0);
}

static void bconn_lost_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_bconn *c = userdata;

        c->ops->on_lost(c->userdata, c->lost_timeout, c->lost_request, c->lost_reason);
}

/* After a write: r is vhu_writer_flush()'s or vhu_writer_send()'s result. */
static void bconn_after_write(struct vhub_bconn *c, int r) {
        if (r == 0) {
                event_del(c->ev_write);
                if (c->write_deadline) {
                        c->write_deadline = 0;
                        bconn_rearm_timer(c);
                }
        } else if (r == -EAGAIN) {
                event_add(c->ev_write, NULL);
                if (!c->write_deadline) {
                        c->write_deadline = vhub_now_usec() + c->timeout_usec;
                        bconn_rearm_timer(c);
                }
        } else if (r == -EPIPE || r == -ECONNRESET) {
                /* The back-end closed.  What it answered before it did is
                 * still to be read, in order: the read side reaches its EOF
                 * after those replies and reports the loss naming the request
                 * really left unanswered (several requests go out at once,
                 * so a write can find the peer gone before the replies to
                 * earlier ones are read).  Every awaited reply keeps its
                 * deadline meanwhile. */
                c->peer_gone = true;
                vhu_writer_clear(&c->writer);
                event_del(c->ev_write);
                c->write_deadline = 0;
                bconn_rearm_timer(c);
        } else {
                char why[128];

                snprintf(why, sizeof(why), "write to back-end failed: %s", strerror(-r));
                /* name the request the caller waits on (error.data.request) */
                vhub_bconn_fail(c, false, c->count ? c->pending[c->head].request : 0, why);
        }
}

static void bconn_flush(struct vhub_bconn *c) {
        if (!c->lost && !c->peer_gone)
                bconn_after_write(c, vhu_writer_flush(&c->writer, c->fd));
}

static void bconn_write_cb(evutil_socket_t fd, short what, void *userdata) {
        bconn_flush(userdata);
}

static void bconn_timer_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_bconn *c = userdata;
        uint64_t now = vhub_now_usec();
        char why[200];

        if (c->count > 0 && c->pending[c->head].deadline <= now) {
                uint32_t req = c->pending[c->head].request;

                snprintf(why, sizeof(why), "no reply to %s within %llu ms",
                         vhu_request_name(VHU_DIR_FRONTEND, req),
                         (unsigned long long)(c->timeout_usec / 1000));
                vhub_bconn_fail(c, true, req, why);
                return;
        }
        if (c->write_deadline && c->write_deadline <= now) {
                snprintf(why, sizeof(why), "back-end did not read its socket for %llu ms",
                         (unsigned long long)(c->timeout_usec / 1000));
                vhub_bconn_fail(c, true, c->count ? c->pending[c->head].request : 0, why);
                return;
        }
        bconn_rearm_timer(c);
}

static void bconn_free_now(struct vhub_bconn *c) {
        vhub_event_freep(&c->ev_read);
        vhub_event_freep(&c->ev_write);
        vhub_event_freep(&c->ev_timer);
        vhub_event_freep(&c->ev_lost);
        vhu_reader_reset(&c->reader);
        vhu_writer_set_fds_hook(&c->writer, NULL, NULL); /* its owner is going too */
        vhu_writer_clear(&c->writer);
        c->fd = vhu_safe_close(c->fd);
        free(c->pending);
        free(c);
}

/* The smallest payload the awaited reply can have (0 if unknown). */
static uint32_t bconn_reply_min_payload(const struct vhub_bconn *c) {
        const struct vhu_request_info *info;

        if (c->count == 0)
                return 0;
        info = vhu_request_info(VHU_DIR_FRONTEND, c->pending[c->head].request);
        if (!info)
                return 0;
        switch (info->reply) {
        case VHU_REPLY_ALWAYS:
                return info->reply_min_size;
        case VHU_REPLY_IF_LOG_SHMFD:
                if (c->protocol_features & VHU_PF_BIT(VHU_PF_LOG_SHMFD))
                        return info->reply_min_size;
                return sizeof(uint64_t);
        case VHU_REPLY_ACK_ONLY:
        default:
                return sizeof(uint64_t); /* a REPLY_ACK u64 */
        }
}

/*
 * One reply per wake-up: the reply comes in one recvmsg() (header and its
 * known minimum payload together) and no read is spent on finding the
 * socket empty; if more is there, the level-triggered event fires again.
 */
static void bconn_read_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_bconn *c = userdata;
        const char *problem = NULL;
        struct pending_reply p;
        struct vhu_msg msg;
        char why[200];
        int r;

        if (c->lost)
                return;
        vhu_msg_init(&msg);
        r = vhu_reader_read_hint(&c->reader, c->fd, &msg, bconn_reply_min_payload(c));
        if (r == -EAGAIN)
                return;
        if (r == 0) {
                vhub_bconn_fail(c, false, c->count ? c->pending[c->head].request : 0,
                                "back-end closed the connection");
                return;
        }
        if (r < 0) {
                if (r == -EPROTO)
                        snprintf(why, sizeof(why), "protocol violation in back-end message framing");
                else
                        snprintf(why, sizeof(why), "back-end connection error: %s", strerror(-r));
                vhub_bconn_fail(c, false, c->count ? c->pending[c->head].request : 0, why);
                return;
        }
        if (c->count == 0) {
                snprintf(why, sizeof(why), "unsolicited message %u from the back-end", msg.hdr.request);
                vhu_msg_clear(&msg);
                vhub_bconn_fail(c, false, 0, why);
                return;
        }
        p = c->pending[c->head];
        if (vhu_validate_reply(VHU_DIR_FRONTEND, p.request, p.flags, c->protocol_features, &msg,
                               &problem) < 0) {
                snprintf(why, sizeof(why), "bad reply to %s: %s",
                         vhu_request_name(VHU_DIR_FRONTEND, p.request), problem ? problem : "invalid");
                vhu_msg_clear(&msg);
                vhub_bconn_fail(c, false, p.request, why);
                return;
        }
        c->head = (c->head + 1) % c->cap;
        c->count--;
        bconn_rearm_timer(c);

        c->dispatching = true;
        c->ops->on_reply(c->userdata, p.request, p.tag, &msg);
        c->dispatching = false;
        vhu_msg_clear(&msg);
        if (c->free_requested)
                bconn_free_now(c);
}

int vhub_bconn_new(struct event_base *base, int fd, unsigned timeout_ms, unsigned max_pending,
                   const struct vhub_bconn_ops *ops, void *userdata, struct vhub_bconn **ret) {
        struct vhub_bconn *c;
        int r;

        r = vhu_set_nonblocking(fd);
        if (r < 0) {
                vhu_safe_close(fd);
                return r;
        }
        c = calloc(1, sizeof(*c));
        if (!c) {
                vhu_safe_close(fd);
                return -ENOMEM;
        }
        c->fd = fd;
        c->base = base;
        c->ops = ops;
        c->userdata = userdata;
        c->timeout_usec = (uint64_t)timeout_ms * 1000u;
        c->max_pending = max_pending ? max_pending : 1;
        /* most ops await a handful of replies: the ring grows when one
         * awaits more (a device holds it all its life) */
        c->cap = c->max_pending < 16 ? c->max_pending : 16;
        c->pending = calloc(c->cap, sizeof(*c->pending));
        vhu_reader_init(&c->reader);
        vhu_writer_init(&c->writer);
        vhu_writer_set_fds_hook(&c->writer, ops->on_fds_changed, userdata);
        c->ev_read = event_new(base, fd, EV_READ | EV_PERSIST, bconn_read_cb, c);
        c->ev_write = event_new(base, fd, EV_WRITE | EV_PERSIST, bconn_write_cb, c);
        c->ev_timer = evtimer_new(base, bconn_timer_cb, c);
        c->ev_lost = event_new(base, -1, 0, bconn_lost_cb, c);
        if (!c->pending || !c->ev_read || !c->ev_write || !c->ev_timer || !c->ev_lost ||
            event_add(c->ev_read, NULL) < 0) {
                bconn_free_now(c); /* closes fd: it is taken in every case */
                return -ENOMEM;
        }
        *ret = c;
        return 0;
}

struct vhub_bconn *vhub_bconn_free(struct vhub_bconn *c) {
        if (!c)
                return NULL;
        if (c->dispatching) {
                c->free_requested = true;
                c->lost = true;
                event_del(c->ev_read);
                event_del(c->ev_write);
                evtimer_del(c->ev_timer);
                event_del(c->ev_lost);
                return NULL;
        }
        bconn_free_now(c);
        return NULL;
}

void vhub_bconn_set_protocol_features(struct vhub_bconn *c, uint64_t protocol_features) {
        c->protocol_features = protocol_features;
}

uint64_t vhub_bconn_protocol_features(const struct vhub_bconn *c) {
        return c->protocol_features;
}

static int bconn_send(struct vhub_bconn *c, const struct vhu_msg *m, uint32_t tag, bool await) {
        bool expects;
        int r;

        if (c->lost)
                return -ENOTCONN;
        expects = await || vhu_request_expects_reply(VHU_DIR_FRONTEND, m->hdr.request, m->hdr.flags,
                                                     c->protocol_features);
        if (expects && c->count == c->cap) {
                /* grow the ring (in order from head) up to max_pending */
                unsigned cap = c->cap * 2 > c->max_pending ? c->max_pending : c->cap * 2;
                struct pending_reply *n;

                if (cap == c->cap)
                        return -ENOBUFS;
                n = calloc(cap, sizeof(*n));
                if (!n)
                        return -ENOMEM;
                for (unsigned i = 0; i < c->count; i++)
                        n[i] = c->pending[(c->head + i) % c->cap];
                free(c->pending);
                c->pending = n;
                c->cap = cap;
                c->head = 0;
        }
        /* a closed peer takes nothing more; it is awaited like the rest, so
         * that the loss, from the read side, names what was left unanswered */
        r = c->peer_gone ? 0 : vhu_writer_send(&c->writer, c->fd, m);
        if (r == -ENOMEM || r == -EINVAL)
                return r;
        if (expects) {
                struct pending_reply *p = &c->pending[(c->head + c->count) % c->cap];

                p->request = m->hdr.request;
                /* an awaited reply is validated as NEED_REPLY would have asked for */
                p->flags = m->hdr.flags | (await ? VHU_FLAG_NEED_REPLY : 0);
                p->tag = tag;
                p->deadline = vhub_now_usec() + c->timeout_usec;
                c->count++;
                if (c->count == 1)
                        bconn_rearm_timer(c);
        }
        /* 0: all out; -EAGAIN: arm the write event and its deadline; else
         * the loss, naming the request just queued if nothing else waits */
        bconn_after_write(c, r);
        return expects ? 1 : 0;
}

int vhub_bconn_send(struct vhub_bconn *c, const struct vhu_msg *m, uint32_t tag) {
        return bconn_send(c, m, tag, false);
}

int vhub_bconn_send_awaiting(struct vhub_bconn *c, const struct vhu_msg *m, uint32_t tag) {
        return bconn_send(c, m, tag, true);
}

unsigned vhub_bconn_awaiting(const struct vhub_bconn *c) {
        return c->count;
}

bool vhub_bconn_write_pending(const struct vhub_bconn *c) {
        return vhu_writer_pending(&c->writer);
}

unsigned vhub_bconn_queued_fds(const struct vhub_bconn *c) {
        return c->writer.n_fds;
}

bool vhub_bconn_is_lost(const struct vhub_bconn *c) {
        return c->lost;
}

int vhub_bconn_fd(const struct vhub_bconn *c) {
        return c->fd;
}

void vhub_bconn_foreach_fd(const struct vhub_bconn *c, vhu_fd_fn fn, void *userdata) {
        vhu_conn_foreach_fd(c->fd, &c->reader, &c->writer, fn, userdata);
}
