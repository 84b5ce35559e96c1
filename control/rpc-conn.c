/* SPDX-License-Identifier: MIT */
/*
 * Framing layer of the control socket.  spec: "Transport and framing".
 *
 * One connection is a small state machine:
 *
 *   OPEN      reading and writing
 *   DRAINING  not reading any more; flushing the output queue, then CLOSING
 *             (rpc_conn_close_after_flush(), peer EOF, framing violation)
 *   CLOSING   on_close is scheduled (event_active on close_ev); no more I/O
 *   CLOSED    on_close has run; only rpc_conn_free() is left to do
 *
 * on_close always runs from close_ev, never from inside an rpc_conn_*() call
 * or an on_message callback, and at most once.
 *
 * Input: bytes go to in_buf (at most max_line + 1 bytes: one line of
 * max_line bytes plus its '\n'), fds to the in_fds FIFO.  Each complete line
 * is parsed and handed to on_message with the fds it declares.
 *
 * Output: one out_msg per queued line, each with the dups of its fds; a
 * sendmsg() that carries fds always starts at the first byte of their line.
 */
#include "rpc-conn.h"
#include "vhu-scm.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define RPC_DEFAULT_MAX_LINE        (1024u * 1024u)     /* spec: "longer than 1 MiB" */
/* A client writes a line at once: one still incomplete after this long
 * only pins memory (up to max_line per connection, for ever). */
#define RPC_DEFAULT_LINE_TIMEOUT_MS 10000u
#define RPC_DEFAULT_MAX_OUT_BYTES   (4u * 1024u * 1024u)
#define RPC_DEFAULT_MAX_FDS_QUEUED  1024u
/* Dup'd fds waiting in the output queue: a peer that does not read must not
 * pin an unbounded number of our fds either. */
#define RPC_DEFAULT_MAX_OUT_FDS     1024u

#define RPC_IN_BUF_MIN              4096u
#define RPC_IN_BUF_KEEP             (64u * 1024u)  /* shrink back below this when idle */
#define RPC_SEND_IOV_MAX            64
#define RPC_OUT_CHUNK               (16u * 1024u)

#define JSONRPC_PARSE_ERROR         (-32700)
#define JSONRPC_INVALID_REQUEST     (-32600)
#define JSONRPC_LIMIT_REACHED       (-32008)   /* the contract's "resource limit reached" */

enum rpc_conn_state {
        RPC_CONN_OPEN,
        RPC_CONN_DRAINING,
        RPC_CONN_CLOSING,
        RPC_CONN_CLOSED,
};

/* Queued output: lines without fds share chunks of RPC_OUT_CHUNK bytes, so
 * what a connection pins is what it has to send, not an allocation per
 * line; a line with fds, or a big one, has an out_msg of its own. */
struct out_msg {
        struct out_msg *next;
        int *fds;          /* dups, closed once the first byte is sent */
        unsigned n_fds;
        size_t len;        /* bytes of lines in data */
        size_t cap;        /* room in data */
        size_t off;        /* bytes already sent */
        char data[];
};

struct rpc_conn {
        struct event_base *base;
        int fd;
        struct rpc_conn_limits limits;
        const struct rpc_conn_ops *ops;
        void *userdata;

        enum rpc_conn_state state;
        bool read_closed;           /* EOF seen: reading stopped, writing goes on */
        char close_reason[160];

        struct ucred peer;

        struct event *read_ev;
        struct event *write_ev;     /* added only while output is queued */
        struct event *close_ev;     /* activated to run on_close */
        struct event *line_ev;      /* the partial line's deadline, pending while there is one */
        struct event *resume_ev;    /* hands over the lines left in in_buf, from the loop */
        bool paused;                /* rpc_conn_pause_input(): no lines handed over, nothing read */

        /* input */
        char *in_buf;
        size_t in_len;
        size_t in_cap;
        int *in_fds;                /* valid fds are in_fds[in_head .. in_head + in_n) */
        unsigned in_head;
        unsigned in_n;
        unsigned in_cap_fds;

        /* output */
        struct out_msg *out_head;
        struct out_msg *out_tail;
        size_t out_bytes;
        unsigned out_fds;

        size_t peak_memory;         /* see rpc_conn_take_peak_memory() */

        /* inside on_message: defer freeing and dropping of in_buf */
        unsigned processing;
        bool free_pending;
};

static void close_fd(int fd) {
        if (fd >= 0) {
                int saved = errno;
                (void) close(fd);
                errno = saved;
        }
}

void rpc_fds_clear(struct rpc_fds *f) {
        if (!f)
                return;
        for (unsigned i = 0; i < f->n; i++)
                close_fd(f->fds[i]);
        free(f->fds);
        f->fds = NULL;
        f->n = 0;
}

int rpc_fds_take(struct rpc_fds *f, unsigned idx) {
        int fd;

        if (!f || idx >= f->n || !f->fds)
                return -1;
        fd = f->fds[idx];
        f->fds[idx] = -1;
        return fd;
}

void rpc_conn_limits_default(struct rpc_conn_limits *l) {
        *l = (struct rpc_conn_limits) {
                .max_line = RPC_DEFAULT_MAX_LINE,
                .line_timeout_ms = RPC_DEFAULT_LINE_TIMEOUT_MS,
                .max_out_bytes = RPC_DEFAULT_MAX_OUT_BYTES,
                .max_fds_queued = RPC_DEFAULT_MAX_FDS_QUEUED,
                .max_out_fds = RPC_DEFAULT_MAX_OUT_FDS,
        };
}

uid_t rpc_conn_peer_uid(const struct rpc_conn *c) {
        return c->peer.uid;
}

gid_t rpc_conn_peer_gid(const struct rpc_conn *c) {
        return c->peer.gid;
}

pid_t rpc_conn_peer_pid(const struct rpc_conn *c) {
        return c->peer.pid;
}

bool rpc_conn_is_closing(const struct rpc_conn *c) {
        return c->state != RPC_CONN_OPEN;
}

bool rpc_conn_read_closed(const struct rpc_conn *c) {
        return c->read_closed;
}

size_t rpc_conn_queued_bytes(const struct rpc_conn *c) {
        return c->out_bytes;
}

unsigned rpc_conn_queued_fds(const struct rpc_conn *c) {
        return c->out_fds;
}

unsigned rpc_conn_fds_held(const struct rpc_conn *c) {
        return (c->fd >= 0 ? 1 : 0) + c->in_n + c->out_fds;
}

static void note_memory(struct rpc_conn *c) {
        size_t n = c->in_cap + c->out_bytes;

        if (n > c->peak_memory)
                c->peak_memory = n;
}

size_t rpc_conn_take_peak_memory(struct rpc_conn *c) {
        size_t peak = c->peak_memory;

        c->peak_memory = c->in_cap + c->out_bytes;
        return peak;
}

const struct rpc_conn_limits *rpc_conn_limits(const struct rpc_conn *c) {
        return &c->limits;
}

/* ---- input fd FIFO ---------------------------------------------------- */

static void in_fds_close_all(struct rpc_conn *c) {
        for (unsigned i = 0; i < c->in_n; i++)
                close_fd(c->in_fds[c->in_head + i]);
        c->in_head = 0;
        c->in_n = 0;
}

/* Appends fds; on failure (over max_fds_queued, -ENOMEM) the caller still
 * owns all of them. */
static int in_fds_push(struct rpc_conn *c, const int *fds, unsigned n) {
        if (n > c->limits.max_fds_queued - c->in_n)
                return -EMFILE;
        if (c->in_head > 0 && c->in_head + c->in_n + n > c->in_cap_fds) {
                memmove(c->in_fds, c->in_fds + c->in_head, c->in_n * sizeof(int));
                c->in_head = 0;
        }
        if (c->in_n + n > c->in_cap_fds) {
                unsigned cap = c->in_cap_fds ? c->in_cap_fds : 16;
                int *p;

                while (cap < c->in_n + n)
                        cap *= 2;
                if (cap > c->limits.max_fds_queued)
                        cap = c->limits.max_fds_queued;
                p = realloc(c->in_fds, cap * sizeof(int));
                if (!p)
                        return -ENOMEM;
                c->in_fds = p;
                c->in_cap_fds = cap;
        }
        memcpy(c->in_fds + c->in_head + c->in_n, fds, n * sizeof(int));
        c->in_n += n;
        return 0;
}

/* Moves the first n queued fds into ret (n <= in_n). */
static int in_fds_pop(struct rpc_conn *c, unsigned n, struct rpc_fds *ret) {
        int *fds = NULL;

        if (n > 0) {
                fds = malloc(n * sizeof(int));
                if (!fds)
                        return -ENOMEM;
                memcpy(fds, c->in_fds + c->in_head, n * sizeof(int));
                c->in_head += n;
                c->in_n -= n;
                if (c->in_n == 0)
                        c->in_head = 0;
        }
        ret->fds = fds;
        ret->n = n;
        return 0;
}

/* ---- output queue ----------------------------------------------------- */

static struct out_msg *out_msg_free(struct out_msg *m) {
        if (!m)
                return NULL;
        for (unsigned i = 0; i < m->n_fds; i++)
                close_fd(m->fds[i]);
        free(m->fds);
        free(m);
        return NULL;
}

static void out_drop_all(struct rpc_conn *c) {
        while (c->out_head) {
                struct out_msg *m = c->out_head;

                c->out_head = m->next;
                out_msg_free(m);
        }
        c->out_tail = NULL;
        c->out_bytes = 0;
        c->out_fds = 0;
}

/* ---- closing ---------------------------------------------------------- */

/* Input is dropped once nothing can read it any more; while on_message runs
 * the line loop still points into in_buf, so it does this itself. */
static void in_drop(struct rpc_conn *c) {
        if (c->line_ev)
                event_del(c->line_ev);
        if (c->processing)
                return;
        in_fds_close_all(c);
        free(c->in_fds);
        c->in_fds = NULL;
        c->in_cap_fds = 0;
        free(c->in_buf);
        c->in_buf = NULL;
        c->in_len = 0;
        c->in_cap = 0;
}

static void set_reason(struct rpc_conn *c, const char *fmt, ...)
        __attribute__((format(printf, 2, 3)));
static void set_reason(struct rpc_conn *c, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(c->close_reason, sizeof(c->close_reason), fmt, ap);
        va_end(ap);
}

/* Stops all I/O and lets the event loop run on_close.  The reason must have
 * been set with set_reason() (or be kept from the DRAINING state). */
static void schedule_close(struct rpc_conn *c) {
        if (c->state >= RPC_CONN_CLOSING)
                return;
        c->state = RPC_CONN_CLOSING;
        event_del(c->read_ev);
        event_del(c->write_ev);
        in_drop(c);
        out_drop_all(c);
        event_active(c->close_ev, EV_TIMEOUT, 0);
}

static void close_cb(evutil_socket_t fd, short what, void *userdata) {
        struct rpc_conn *c = userdata;
        char reason[sizeof(c->close_reason)];

        if (c->state != RPC_CONN_CLOSING)
                return;
        c->state = RPC_CONN_CLOSED;
        /* on_close usually frees c: hand it a copy that outlives c */
        memcpy(reason, c->close_reason, sizeof(reason));
        if (c->ops && c->ops->on_close)
                c->ops->on_close(c, reason, c->userdata);
}

/* Stop reading; close once the output queue is empty. */
static void start_draining(struct rpc_conn *c) {
        if (c->state != RPC_CONN_OPEN)
                return;
        c->state = RPC_CONN_DRAINING;
        event_del(c->read_ev);
        in_drop(c);
        if (!c->out_head)
                schedule_close(c);
}

void rpc_conn_abort(struct rpc_conn *c, const char *reason) {
        if (!c || c->state >= RPC_CONN_CLOSING)
                return;
        set_reason(c, "%s", reason ? reason : "closed");
        schedule_close(c);
}

void rpc_conn_close_after_flush(struct rpc_conn *c, const char *reason) {
        if (!c || c->state != RPC_CONN_OPEN)
                return;
        set_reason(c, "%s", reason ? reason : "closed");
        start_draining(c);
}

/* ---- writing ---------------------------------------------------------- */

static bool errno_is_peer_gone(int e) {
        return e == EPIPE || e == ECONNRESET;
}

static void out_consume(struct rpc_conn *c, size_t n) {
        while (n > 0 && c->out_head) {
                struct out_msg *m = c->out_head;
                size_t left = m->len - m->off;

                /* the line's first byte is out: its fds went with it */
                if (m->n_fds > 0) {
                        for (unsigned i = 0; i < m->n_fds; i++)
                                close_fd(m->fds[i]);
                        c->out_fds -= m->n_fds;
                        m->n_fds = 0;
                }
                if (n < left) {
                        m->off += n;
                        c->out_bytes -= n;
                        return;
                }
                n -= left;
                c->out_bytes -= left;
                c->out_head = m->next;
                if (!c->out_head)
                        c->out_tail = NULL;
                out_msg_free(m);
        }
}

/* Sends as much as the socket takes.  0 when done or blocked, -errno on a
 * write error (the caller closes). */
static int out_flush(struct rpc_conn *c) {
        while (c->out_head) {
                VHU_SCM_BUF(control, RPC_MAX_FDS_PER_MESSAGE);
                struct iovec iov[RPC_SEND_IOV_MAX];
                struct msghdr mh = { .msg_iov = iov };
                struct out_msg *m = c->out_head;
                ssize_t n;
                int iovcnt = 0;

                /* fds only ever ride with their line's first byte */
                vhu_scm_attach(&mh, control.buf, sizeof(control.buf), m->fds, m->n_fds);
                iov[iovcnt++] = (struct iovec) { m->data + m->off, m->len - m->off };
                /* later lines may join this sendmsg() unless they carry fds */
                for (m = m->next; m && m->n_fds == 0 && iovcnt < RPC_SEND_IOV_MAX; m = m->next)
                        iov[iovcnt++] = (struct iovec) { m->data, m->len };
                mh.msg_iovlen = iovcnt;

                n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN || errno == EWOULDBLOCK)
                                return 0;
                        return -errno;
                }
                out_consume(c, (size_t) n);
        }
        return 0;
}

static void write_cb(evutil_socket_t fd, short what, void *userdata) {
        struct rpc_conn *c = userdata;
        int r;

        if (c->state >= RPC_CONN_CLOSING)
                return;
        r = out_flush(c);
        if (r < 0) {
                /* when draining, keep the reason we were closing for */
                if (c->state == RPC_CONN_OPEN && errno_is_peer_gone(-r))
                        set_reason(c, "peer closed");
                else if (c->state == RPC_CONN_OPEN)
                        set_reason(c, "write error: %s", strerror(-r));
                schedule_close(c);
                return;
        }
        if (!c->out_head) {
                event_del(c->write_ev);
                if (c->state == RPC_CONN_DRAINING)
                        schedule_close(c);
                else if (c->ops && c->ops->on_drained)
                        c->ops->on_drained(c, c->userdata);
        }
}

struct dump_buf {
        char *p;
        size_t len;
        size_t cap;
        bool oom;
};

static int dump_cb(const char *buf, size_t size, void *userdata) {
        struct dump_buf *d = userdata;

        if (size > d->cap - d->len) {
                size_t cap = d->cap;
                char *p;

                while (size > cap - d->len) {
                        if (cap > SIZE_MAX / 2) {
                                d->oom = true;
                                return -1;
                        }
                        cap *= 2;
                }
                p = realloc(d->p, cap);
                if (!p) {
                        d->oom = true;
                        return -1;
                }
                d->p = p;
                d->cap = cap;
        }
        memcpy(d->p + d->len, buf, size);
        d->len += size;
        return 0;
}

/* If the message is an object that carries fds, its "fds" must say so. */
static bool msg_declares_fds(json_t *msg, unsigned n_fds) {
        json_t *v;

        if (!json_is_object(msg))
                return true;
        v = json_object_get(msg, "fds");
        if (n_fds == 0)
                return !v || (json_is_integer(v) && json_integer_value(v) == 0);
        return json_is_integer(v) && json_integer_value(v) == (json_int_t) n_fds;
}

/* Past the output bound the connection is closed: a peer that does not
 * read is dropped, never waited for. */
static bool out_over_bound(struct rpc_conn *c, size_t len, unsigned n_fds) {
        if (n_fds > c->limits.max_out_fds - c->out_fds) {
                set_reason(c, "client too slow: over %u fds queued for output", c->limits.max_out_fds);
                return true;
        }
        if (len > c->limits.max_out_bytes - c->out_bytes) {
                set_reason(c, "client too slow: output queue over %zu bytes", c->limits.max_out_bytes);
                return true;
        }
        return false;
}

/* Where a line of len bytes ('\n' included) goes: the spare room of the
 * tail chunk when the line is small and carries no fds, else a new out_msg
 * (*ret_new; a chunk for a small line, exactly its size otherwise).  NULL
 * when out of memory.  out_commit() queues what was written there. */
static char *out_room(struct rpc_conn *c, size_t len, bool with_fds, struct out_msg **ret_new) {
        struct out_msg *t = c->out_tail, *m;
        bool small = !with_fds && len <= RPC_OUT_CHUNK / 2;
        size_t cap = small ? RPC_OUT_CHUNK : len;

        *ret_new = NULL;
        if (small && t && t->n_fds == 0 && t->cap - t->len >= len)
                return t->data + t->len;
        m = malloc(sizeof(*m) + cap);
        if (!m)
                return NULL;
        *m = (struct out_msg) { .cap = cap };
        *ret_new = m;
        return m->data;
}

/* Queue the line written where out_room() said (fds: dups, taken). */
static int out_commit(struct rpc_conn *c, struct out_msg *m, size_t len, int *fds, unsigned n_fds) {
        if (m) {
                m->len = len;
                m->fds = fds;
                m->n_fds = n_fds;
                if (c->out_tail)
                        c->out_tail->next = m;
                else
                        c->out_head = m;
                c->out_tail = m;
                c->out_fds += n_fds;
        } else {
                c->out_tail->len += len;
        }
        c->out_bytes += len;
        note_memory(c);
        /* written from the loop, so a send never calls back into the owner */
        if (event_add(c->write_ev, NULL) < 0) {
                set_reason(c, "cannot watch the socket for writing");
                schedule_close(c);
                return -ENOMEM;
        }
        return 0;
}

static int dup_fds(const int *fds, unsigned n, int **ret) {
        int *dups;

        *ret = NULL;
        if (n == 0)
                return 0;
        dups = malloc(n * sizeof(int));
        if (!dups)
                return -ENOMEM;
        for (unsigned i = 0; i < n; i++) {
                dups[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
                if (dups[i] < 0) {
                        int r = -errno;

                        while (i > 0)
                                close_fd(dups[--i]);
                        free(dups);
                        return r;
                }
        }
        *ret = dups;
        return 0;
}

int rpc_conn_send(struct rpc_conn *c, json_t *msg, const int *fds, unsigned n_fds) {
        struct dump_buf d = { .cap = 256 };
        struct out_msg *m;
        int *dups = NULL;
        char *room;
        int r;

        if (!c || !msg || (n_fds > 0 && !fds) || n_fds > RPC_MAX_FDS_PER_MESSAGE)
                return -EINVAL;
        if (c->state >= RPC_CONN_CLOSING)
                return -ENOTCONN;
        if (!msg_declares_fds(msg, n_fds))
                return -EINVAL;

        d.p = malloc(d.cap);
        if (!d.p)
                return -ENOMEM;
        if (json_dump_callback(msg, dump_cb, &d, JSON_COMPACT | JSON_ENCODE_ANY) < 0) {
                r = d.oom ? -ENOMEM : -EINVAL;
                goto out;
        }
        if (dump_cb("\n", 1, &d) < 0) {
                r = -ENOMEM;
                goto out;
        }
        if (out_over_bound(c, d.len, n_fds)) {
                schedule_close(c);
                r = -ENOBUFS;
                goto out;
        }
        r = dup_fds(fds, n_fds, &dups);
        if (r < 0)
                goto out;
        room = out_room(c, d.len, n_fds > 0, &m);
        if (!room) {
                for (unsigned i = 0; i < n_fds; i++)
                        close_fd(dups[i]);
                free(dups);
                r = -ENOMEM;
                goto out;
        }
        memcpy(room, d.p, d.len);
        r = out_commit(c, m, d.len, dups, n_fds);
out:
        free(d.p);
        return r;
}

int rpc_conn_send_parts(struct rpc_conn *c, const struct iovec *parts, unsigned n_parts) {
        struct out_msg *m;
        size_t len = 1, off = 0;
        char *room;

        if (!c || (n_parts > 0 && !parts))
                return -EINVAL;
        if (c->state >= RPC_CONN_CLOSING)
                return -ENOTCONN;
        for (unsigned i = 0; i < n_parts; i++) {
                if (parts[i].iov_len > SIZE_MAX / 2 - len)
                        return -EINVAL;
                len += parts[i].iov_len;
        }
        if (out_over_bound(c, len, 0)) {
                schedule_close(c);
                return -ENOBUFS;
        }
        room = out_room(c, len, false, &m);
        if (!room)
                return -ENOMEM;
        for (unsigned i = 0; i < n_parts; i++) {
                memcpy(room + off, parts[i].iov_base, parts[i].iov_len);
                off += parts[i].iov_len;
        }
        room[off] = '\n';
        return out_commit(c, m, len, NULL, 0);
}

int rpc_conn_send_error(struct rpc_conn *c, json_t *id, int code, const char *message,
                        json_t *data) {
        json_t *msg, *err;
        int r;

        err = json_pack("{s:i, s:s}", "code", code, "message", message ? message : "error");
        if (!err)
                return -ENOMEM;
        if (data && json_object_set(err, "data", data) < 0) {
                json_decref(err);
                return -ENOMEM;
        }
        msg = json_pack("{s:s, s:O, s:o}", "jsonrpc", "2.0", "id", id ? id : json_null(),
                        "error", err);
        if (!msg)
                return -ENOMEM;
        r = rpc_conn_send(c, msg, NULL, 0);
        json_decref(msg);
        return r;
}

/* ---- reading ---------------------------------------------------------- */

static void send_error_detail(struct rpc_conn *c, int code, const char *message,
                              const char *detail) {
        json_t *data = json_pack("{s:s}", "detail", detail);

        /* if this fails the peer misses a courtesy, not a state change */
        (void) rpc_conn_send_error(c, NULL, code, message, data);
        json_decref(data);
}

/* The peer broke the framing (or a bound on its fds): the error with id
 * null, every queued fd closed, then close. */
static void refuse_and_close(struct rpc_conn *c, int code, const char *message, const char *detail) {
        if (c->state != RPC_CONN_OPEN)
                return;
        in_fds_close_all(c);
        send_error_detail(c, code, message, detail);
        if (c->state != RPC_CONN_OPEN)
                return;          /* the error overflowed the queue: closing already */
        set_reason(c, "%s: %s", code == JSONRPC_LIMIT_REACHED ? "fd limit" : "framing violation",
                   detail);
        start_draining(c);
}

/* spec: "framing violation": -32600 id null, close, every queued fd closed */
static void framing_violation(struct rpc_conn *c, const char *detail) {
        refuse_and_close(c, JSONRPC_INVALID_REQUEST, "Invalid Request", detail);
}

/* "fds": N — absent is 0; anything but an integer 0..253 is an error. */
static int msg_fds_member(json_t *obj, unsigned *ret) {
        json_t *v = json_object_get(obj, "fds");
        json_int_t n;

        if (!v) {
                *ret = 0;
                return 0;
        }
        if (!json_is_integer(v))
                return -EINVAL;
        n = json_integer_value(v);
        if (n < 0 || n > RPC_MAX_FDS_PER_MESSAGE)
                return -EINVAL;
        *ret = (unsigned) n;
        return 0;
}

/* How many fds a message takes from the FIFO.  A batch takes the sum of
 * its element objects' "fds", in element order; non-object elements take
 * none (the dispatcher answers them -32600). */
static int msg_fds_count(json_t *msg, unsigned *ret) {
        unsigned total = 0, n;
        size_t i;
        json_t *e;

        if (json_is_object(msg))
                return msg_fds_member(msg, ret);
        if (json_is_array(msg)) {
                json_array_foreach(msg, i, e) {
                        if (!json_is_object(e))
                                continue;
                        if (msg_fds_member(e, &n) < 0)
                                return -EINVAL;
                        if (n > UINT_MAX - total)
                                return -EINVAL;
                        total += n;
                }
        }
        *ret = total;
        return 0;
}

static bool line_is_blank(const char *p, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r')
                        return false;
        return true;
}

static void handle_line(struct rpc_conn *c, const char *p, size_t n) {
        struct rpc_fds fds = { NULL, 0 };
        json_error_t jerr;
        unsigned need;
        json_t *msg;
        char detail[256];

        if (line_is_blank(p, n))
                return;

        /* without JSON_DISABLE_EOF_CHECK, bytes after the value are an error */
        /* "\u0000" is valid JSON: the parser keeps it, and every string
         * consumer checks json_string_length() against strlen() */
        msg = json_loadb(p, n, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
        if (!msg) {
                snprintf(detail, sizeof(detail), "invalid JSON at column %d: %s",
                         jerr.column, jerr.text);
                send_error_detail(c, JSONRPC_PARSE_ERROR, "Parse error", detail);
                return;
        }

        if (msg_fds_count(msg, &need) < 0) {
                json_decref(msg);
                snprintf(detail, sizeof(detail),
                         "\"fds\" must be an integer from 0 to %d", RPC_MAX_FDS_PER_MESSAGE);
                framing_violation(c, detail);
                return;
        }
        if (need > c->in_n) {
                json_decref(msg);
                snprintf(detail, sizeof(detail),
                         "message declares %u fds but only %u were received with it",
                         need, c->in_n);
                framing_violation(c, detail);
                return;
        }
        if (!json_is_object(msg) && !json_is_array(msg)) {
                /* valid JSON, but no request: not a framing problem */
                json_decref(msg);
                send_error_detail(c, JSONRPC_INVALID_REQUEST, "Invalid Request",
                                  "a message must be a JSON object or an array of them");
                return;
        }
        if (in_fds_pop(c, need, &fds) < 0) {
                json_decref(msg);
                set_reason(c, "out of memory");
                schedule_close(c);
                return;
        }

        if (c->ops && c->ops->on_message)
                c->ops->on_message(c, msg, &fds, c->userdata);
        else {
                json_decref(msg);
                rpc_fds_clear(&fds);
        }
}

static void really_free(struct rpc_conn *c);

/* The partial line left in in_buf must be complete line_timeout_ms after
 * its first byte was read: armed when one starts (nothing was pending, or
 * a line just ended before it), dropped when none is left. */
static void line_deadline_update(struct rpc_conn *c, bool line_ended) {
        struct timeval tv = {
                .tv_sec = c->limits.line_timeout_ms / 1000,
                .tv_usec = (c->limits.line_timeout_ms % 1000) * 1000,
        };

        if (c->in_len == 0)
                event_del(c->line_ev);
        else if (line_ended || !evtimer_pending(c->line_ev, NULL))
                evtimer_add(c->line_ev, &tv);
}

static void line_timeout_cb(evutil_socket_t fd, short what, void *userdata) {
        struct rpc_conn *c = userdata;
        char detail[128];
        int avail = 0;

        if (c->state != RPC_CONN_OPEN || c->read_closed || c->in_len == 0)
                return;
        /* the rest may be in the socket already, its read event due in
         * this same turn of the loop: that read decides */
        if (ioctl(c->fd, FIONREAD, &avail) == 0 && avail > 0) {
                line_deadline_update(c, true);
                return;
        }
        snprintf(detail, sizeof(detail), "line not complete %u ms after its first byte",
                 c->limits.line_timeout_ms);
        framing_violation(c, detail);
}

static uint64_t now_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

/* Lines are left in in_buf (a slice ended, or the owner paused): nothing is
 * read meanwhile, and no deadline runs for a line that cannot progress. */
static void hold_input(struct rpc_conn *c) {
        static const struct timeval now = { 0, 0 };

        event_del(c->read_ev);
        event_del(c->line_ev);
        /* a zero timer, not event_active(): the loop polls every fd and
         * runs every due timer before it comes back here */
        if (!c->paused)
                evtimer_add(c->resume_ev, &now);
}

/* Hands the complete lines to handle_line(), for at most RPC_SLICE_USEC.
 * Returns false if c was freed. */
static bool process_lines(struct rpc_conn *c) {
        uint64_t started = now_usec();
        bool held = false;
        size_t start = 0;

        c->processing++;
        while (c->state == RPC_CONN_OPEN && !c->free_pending) {
                char *nl = memchr(c->in_buf + start, '\n', c->in_len - start);
                size_t n;

                if (!nl)
                        break;
                if (c->paused || now_usec() - started >= RPC_SLICE_USEC) {
                        held = true;
                        break;
                }
                n = (size_t) (nl - (c->in_buf + start));
                if (n > c->limits.max_line) {
                        framing_violation(c, "line longer than the limit");
                        break;
                }
                handle_line(c, c->in_buf + start, n);
                start += n + 1;
        }
        c->processing--;

        if (c->free_pending) {
                really_free(c);
                return false;
        }
        if (c->state != RPC_CONN_OPEN) {
                in_drop(c);     /* deferred while on_message ran */
                return true;
        }

        memmove(c->in_buf, c->in_buf + start, c->in_len - start);
        c->in_len -= start;
        if (held || c->paused) {
                /* the checks below are for what is left once every line is handed over */
                hold_input(c);
                return true;
        }
        line_deadline_update(c, start > 0);

        if (c->in_len > c->limits.max_line) {
                char detail[128];

                snprintf(detail, sizeof(detail), "line longer than %zu bytes",
                         c->limits.max_line);
                framing_violation(c, detail);
        } else if (c->in_len == 0 && c->in_n > 0) {
                char detail[128];

                snprintf(detail, sizeof(detail), "%u fds received that no message claims",
                         c->in_n);
                framing_violation(c, detail);
        }
        return true;
}

/* Room to read into: grow towards max_line + 1, shrink back when idle. */
static int in_reserve(struct rpc_conn *c) {
        size_t hard = c->limits.max_line + 1;
        size_t want = c->in_cap;
        char *p;

        if (c->in_len == 0 && c->in_cap > RPC_IN_BUF_KEEP)
                want = RPC_IN_BUF_MIN;
        else if (c->in_cap - c->in_len < RPC_IN_BUF_MIN && c->in_cap < hard)
                want = c->in_cap ? c->in_cap * 2 : RPC_IN_BUF_MIN;
        if (want > hard)
                want = hard;
        if (want == c->in_cap && c->in_buf)
                return 0;
        p = realloc(c->in_buf, want);
        if (!p)
                return c->in_cap > c->in_len ? 0 : -ENOMEM;
        c->in_buf = p;
        c->in_cap = want;
        note_memory(c);
        return 0;
}

/* After EOF: did the peer close its socket (POLLHUP: nobody will read an
 * answer) or only shut down its sending side? */
static bool peer_hung_up(const struct rpc_conn *c) {
        struct pollfd p = { .fd = c->fd, .events = POLLOUT };

        return poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR));
}

static void read_cb(evutil_socket_t fd, short what, void *userdata) {
        VHU_SCM_BUF(control, RPC_MAX_FDS_PER_MESSAGE);
        struct rpc_conn *c = userdata;
        struct iovec iov;
        struct msghdr mh = {
                .msg_iov = &iov,
                .msg_iovlen = 1,
                .msg_control = control.buf,
                .msg_controllen = sizeof(control.buf),
        };
        bool fds_ok = true;
        unsigned n_fds = 0;
        ssize_t n;

        if (c->state != RPC_CONN_OPEN || c->read_closed || c->paused)
                return;
        if (in_reserve(c) < 0) {
                set_reason(c, "out of memory");
                schedule_close(c);
                return;
        }
        iov = (struct iovec) { c->in_buf + c->in_len, c->in_cap - c->in_len };

        n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0) {
                if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
                        return;
                if (errno_is_peer_gone(errno))
                        set_reason(c, "peer closed");
                else
                        set_reason(c, "read error: %s", strerror(errno));
                schedule_close(c);
                return;
        }

        /* Every fd that arrived is queued or closed, whatever else happens. */
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
                const int *p;
                unsigned k;

                if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                        continue;
                p = (const int *) CMSG_DATA(cm);
                k = (unsigned) ((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                if (fds_ok && in_fds_push(c, p, k) == 0) {
                        n_fds += k;
                        continue;
                }
                fds_ok = false;
                for (unsigned i = 0; i < k; i++) {
                        int f;

                        memcpy(&f, p + i, sizeof(f));
                        close_fd(f);
                }
        }
        if (mh.msg_flags & MSG_CTRUNC) {
                /* room was made for the most one sendmsg() can carry: the
                 * kernel had no fd numbers left for them */
                refuse_and_close(c, JSONRPC_LIMIT_REACHED, "resource limit reached",
                                 "fds lost on receipt: the daemon is out of fds");
                return;
        }
        if (!fds_ok) {
                char detail[128];

                snprintf(detail, sizeof(detail), "more than %u fds queued",
                         c->limits.max_fds_queued);
                framing_violation(c, detail);
                return;
        }
        if (n_fds > 0 && c->ops && c->ops->admit_fds) {
                char detail[256] = "";

                if (c->ops->admit_fds(c, n_fds, detail, sizeof(detail), c->userdata) < 0) {
                        refuse_and_close(c, JSONRPC_LIMIT_REACHED, "resource limit reached",
                                         detail[0] ? detail : "too many fds");
                        return;
                }
        }

        if (n == 0) {
                set_reason(c, "peer closed");
                if (c->ops && c->ops->on_eof && !peer_hung_up(c)) {
                        /* half-closed: answers to what was read still go out */
                        c->read_closed = true;
                        event_del(c->read_ev);
                        in_drop(c);
                        c->ops->on_eof(c, c->userdata);
                        return;
                }
                start_draining(c);
                return;
        }
        c->in_len += (size_t) n;
        process_lines(c);
}

static void resume_cb(evutil_socket_t fd, short what, void *userdata) {
        struct rpc_conn *c = userdata;

        if (c->state != RPC_CONN_OPEN || c->paused)
                return;
        if (!c->read_closed && event_add(c->read_ev, NULL) < 0) {
                set_reason(c, "cannot watch the socket for reading");
                schedule_close(c);
                return;
        }
        process_lines(c);
}

void rpc_conn_pause_input(struct rpc_conn *c) {
        if (!c || c->paused)
                return;
        c->paused = true;
        event_del(c->read_ev);
        event_del(c->resume_ev);
        event_del(c->line_ev);
}

void rpc_conn_resume_input(struct rpc_conn *c) {
        static const struct timeval now = { 0, 0 };

        if (!c || !c->paused)
                return;
        c->paused = false;
        if (c->state == RPC_CONN_OPEN)
                evtimer_add(c->resume_ev, &now);
}

/* ---- life cycle ------------------------------------------------------- */

static void really_free(struct rpc_conn *c) {
        if (c->read_ev)
                event_free(c->read_ev);
        if (c->write_ev)
                event_free(c->write_ev);
        if (c->close_ev)
                event_free(c->close_ev);
        if (c->line_ev)
                event_free(c->line_ev);
        c->line_ev = NULL;      /* in_drop() below looks */
        if (c->resume_ev)
                event_free(c->resume_ev);
        c->processing = 0;
        in_drop(c);
        out_drop_all(c);
        close_fd(c->fd);
        free(c);
}

struct rpc_conn *rpc_conn_free(struct rpc_conn *c) {
        if (!c)
                return NULL;
        if (c->processing) {
                /* called from on_message: process_lines() frees on return */
                c->free_pending = true;
                return NULL;
        }
        really_free(c);
        return NULL;
}

static int socket_check(int fd) {
        int type = 0, domain = 0;
        socklen_t len = sizeof(type);

        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0)
                return -errno;
        len = sizeof(domain);
        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0)
                return -errno;
        if (type != SOCK_STREAM || domain != AF_UNIX)
                return -EPROTOTYPE;
        return 0;
}

/* fd is ours from the start: it is closed on failure too. */
int rpc_conn_new(struct event_base *base, int fd, const struct rpc_conn_limits *limits,
                 const struct rpc_conn_ops *ops, void *userdata, struct rpc_conn **ret) {
        struct rpc_conn_limits l;
        struct rpc_conn *c;
        socklen_t len;
        int flags, r;

        if (!base || fd < 0 || !ret) {
                close_fd(fd);
                return -EINVAL;
        }

        /* zero fields take the defaults */
        rpc_conn_limits_default(&l);
        if (limits) {
                if (limits->max_line)
                        l.max_line = limits->max_line;
                if (limits->line_timeout_ms)
                        l.line_timeout_ms = limits->line_timeout_ms;
                if (limits->max_out_bytes)
                        l.max_out_bytes = limits->max_out_bytes;
                if (limits->max_fds_queued)
                        l.max_fds_queued = limits->max_fds_queued;
                if (limits->max_out_fds)
                        l.max_out_fds = limits->max_out_fds;
        }
        if (l.max_line >= SIZE_MAX / 2) {
                close_fd(fd);
                return -EINVAL;
        }

        c = calloc(1, sizeof(*c));
        if (!c) {
                close_fd(fd);
                return -ENOMEM;
        }
        c->fd = fd;
        c->base = base;
        c->limits = l;
        c->ops = ops;
        c->userdata = userdata;
        c->state = RPC_CONN_OPEN;

        r = socket_check(fd);
        if (r < 0)
                goto fail;
        len = sizeof(c->peer);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c->peer, &len) < 0) {
                r = -errno;
                goto fail;
        }
        flags = fcntl(fd, F_GETFL);
        if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
                r = -errno;
                goto fail;
        }

        c->read_ev = event_new(base, fd, EV_READ | EV_PERSIST, read_cb, c);
        c->write_ev = event_new(base, fd, EV_WRITE | EV_PERSIST, write_cb, c);
        c->close_ev = event_new(base, -1, 0, close_cb, c);
        c->line_ev = evtimer_new(base, line_timeout_cb, c);
        c->resume_ev = evtimer_new(base, resume_cb, c);
        if (!c->read_ev || !c->write_ev || !c->close_ev || !c->line_ev || !c->resume_ev) {
                r = -ENOMEM;
                goto fail;
        }
        if (event_add(c->read_ev, NULL) < 0) {
                r = -ENOMEM;
                goto fail;
        }

        *ret = c;
        return 0;

fail:
        really_free(c);
        return r;
}
