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
 * The bytes and fds in both directions are vhub-frame's (one line buffer of
 * at most max_line + 1 bytes, the fd FIFO, the output chunks with their
 * dups), shared with the client library; this file adds the loop, the
 * bounds and the JSON-RPC framing errors.  Each complete line is parsed and
 * handed to on_message with the fds it declares.
 */
#include "rpc-conn.h"
#include "vhub-frame.h"
#include "vhu-fd.h"
#include "vhub-loop.h"

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

#define JSONRPC_PARSE_ERROR         (-32700)
#define JSONRPC_INVALID_REQUEST     (-32600)
#define JSONRPC_LIMIT_REACHED       (-32008)   /* the contract's "resource limit reached" */

enum rpc_conn_state {
        RPC_CONN_OPEN,
        RPC_CONN_DRAINING,
        RPC_CONN_CLOSING,
        RPC_CONN_CLOSED,
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
        struct event *write_ev;     /* activated when output is queued; added
                                     * (EPOLLOUT) only while the socket is full */
        struct event *close_ev;     /* activated to run on_close */
        struct event *line_ev;      /* the partial line's deadline, pending while there is one */
        struct event *resume_ev;    /* hands over the lines left in the input buffer, from the loop */
        bool paused;                /* rpc_conn_pause_input(): no lines handed over, nothing read */
        bool stopped;               /* rpc_conn_stop_reading(): the same, for good (a
                                     * planned restart): no resume, no line deadline */
        size_t carried;             /* bytes at the front of the input that an earlier
                                     * process read (rpc_conn_restore_input()): the fds
                                     * that came with them were not carried */

        struct vhub_frame_in in;
        struct vhub_frame_out out;    /* small lines share chunks: a connection
                                       * pins what it has to send, not an
                                       * allocation per line */

        size_t peak_memory;         /* see rpc_conn_take_peak_memory() */

        /* inside on_message: defer freeing and dropping of in_buf */
        unsigned processing;
        bool free_pending;
};

void rpc_fds_clear(struct rpc_fds *f) {
        if (!f)
                return;
        if (f->fds)
                vhu_close_many(f->fds, f->n);
        free(f->fds);
        f->fds = NULL;
        f->n = 0;
}

int rpc_fds_take(struct rpc_fds *f, unsigned idx) {
        if (!f || idx >= f->n || !f->fds)
                return -1;
        return VHU_TAKE_FD(f->fds[idx]);
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
        return c->out.bytes;
}

unsigned rpc_conn_queued_fds(const struct rpc_conn *c) {
        return c->out.n_fds;
}

unsigned rpc_conn_fds_held(const struct rpc_conn *c) {
        return (c->fd >= 0 ? 1 : 0) + vhub_frame_in_queued_fds(&c->in) + c->out.n_fds;
}

int rpc_conn_fd(const struct rpc_conn *c) {
        return c->fd;
}

void rpc_conn_foreach_fd(const struct rpc_conn *c, void (*fn)(int fd, const char *what, void *userdata),
                         void *userdata) {
        if (c->fd >= 0)
                fn(c->fd, NULL, userdata);
        vhub_frame_in_foreach_fd(&c->in, fn, userdata);
        vhub_frame_out_foreach_fd(&c->out, fn, userdata);
}

static size_t memory_now(const struct rpc_conn *c) {
        return vhub_frame_in_buffer_size(&c->in) + c->out.bytes;
}

static void note_memory(struct rpc_conn *c) {
        size_t n = memory_now(c);

        if (n > c->peak_memory)
                c->peak_memory = n;
}

size_t rpc_conn_take_peak_memory(struct rpc_conn *c) {
        size_t peak = c->peak_memory;

        c->peak_memory = memory_now(c);
        return peak;
}

const struct rpc_conn_limits *rpc_conn_limits(const struct rpc_conn *c) {
        return &c->limits;
}

/* ---- closing ---------------------------------------------------------- */

/* Input is dropped once nothing can read it any more; while on_message runs
 * the line loop still points into in_buf, so it does this itself. */
static void fds_dropped(struct rpc_conn *c);

static void in_drop(struct rpc_conn *c) {
        bool had_fds;

        if (c->line_ev)
                event_del(c->line_ev);
        if (c->processing)
                return;
        had_fds = vhub_frame_in_queued_fds(&c->in) > 0;
        vhub_frame_in_done(&c->in);
        if (had_fds)
                fds_dropped(c);
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
static void fds_dropped(struct rpc_conn *c) {
        /* not from really_free(): the owner is freeing c */
        if (c->ops && c->ops->on_fds_dropped && c->read_ev)
                c->ops->on_fds_dropped(c, c->userdata);
}

static void schedule_close(struct rpc_conn *c) {
        if (c->state >= RPC_CONN_CLOSING)
                return;
        c->state = RPC_CONN_CLOSING;
        event_del(c->read_ev);
        event_del(c->write_ev);
        in_drop(c);
        if (c->out.n_fds > 0) {
                vhub_frame_out_done(&c->out);
                fds_dropped(c);
        } else {
                vhub_frame_out_done(&c->out);
        }
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
        if (!vhub_frame_out_pending(&c->out))
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

static void write_cb(evutil_socket_t fd, short what, void *userdata) {
        struct rpc_conn *c = userdata;
        unsigned fds_before = c->out.n_fds;
        int r;

        if (c->state >= RPC_CONN_CLOSING)
                return;
        r = vhub_frame_out_flush(&c->out, c->fd);
        if (c->out.n_fds < fds_before)
                fds_dropped(c);
        if (r < 0) {
                /* when draining, keep the reason we were closing for */
                if (c->state == RPC_CONN_OPEN && errno_is_peer_gone(-r))
                        set_reason(c, "peer closed");
                else if (c->state == RPC_CONN_OPEN)
                        set_reason(c, "write error: %s", strerror(-r));
                schedule_close(c);
                return;
        }
        if (vhub_frame_out_pending(&c->out)) {
                /* the socket is full: wait until it takes more */
                if (event_add(c->write_ev, NULL) < 0) {
                        set_reason(c, "cannot watch the socket for writing");
                        schedule_close(c);
                }
                return;
        }
        event_del(c->write_ev);
        if (c->state == RPC_CONN_DRAINING)
                schedule_close(c);
        else if (c->ops && c->ops->on_drained)
                c->ops->on_drained(c, c->userdata);
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
        if (n_fds > c->limits.max_out_fds - c->out.n_fds) {
                set_reason(c, "client too slow: over %u fds queued for output", c->limits.max_out_fds);
                return true;
        }
        if (len > c->limits.max_out_bytes - c->out.bytes) {
                set_reason(c, "client too slow: output queue over %zu bytes", c->limits.max_out_bytes);
                return true;
        }
        return false;
}

/* Queue one line (the parts, then '\n') with dups of fds, within the
 * bounds; written from the loop, so a send never calls back into the owner. */
static int out_queue(struct rpc_conn *c, const struct iovec *parts, unsigned n_parts, const int *fds,
                     unsigned n_fds) {
        size_t len = 1;
        int r;

        for (unsigned i = 0; i < n_parts; i++) {
                if (parts[i].iov_len > SIZE_MAX / 2 - len)
                        return -EINVAL;
                len += parts[i].iov_len;
        }
        if (out_over_bound(c, len, n_fds)) {
                schedule_close(c);
                return -ENOBUFS;
        }
        r = vhub_frame_out_queue(&c->out, parts, n_parts, fds, n_fds, NULL);
        if (r < 0)
                return r;
        note_memory(c);
        /* Written from the loop, so a send never calls back into the owner
         * and a line follows whatever the caller's callback still does
         * (an answer comes after the side effects of its request).  The
         * socket usually takes it at once: write_cb runs after the current
         * callback without being watched for EPOLLOUT, and arms that only
         * if bytes are left. */
        if (!event_pending(c->write_ev, EV_WRITE, NULL))
                event_active(c->write_ev, EV_WRITE, 0);
        return 0;
}

int rpc_conn_send(struct rpc_conn *c, json_t *msg, const int *fds, unsigned n_fds) {
        struct iovec line;
        char *p;
        int r;

        if (!c || !msg || (n_fds > 0 && !fds) || n_fds > RPC_MAX_FDS_PER_MESSAGE)
                return -EINVAL;
        if (c->state >= RPC_CONN_CLOSING)
                return -ENOTCONN;
        if (!msg_declares_fds(msg, n_fds))
                return -EINVAL;
        r = vhub_frame_encode(msg, &p, &line.iov_len);
        if (r < 0)
                return r;
        line.iov_base = p;
        r = out_queue(c, &line, 1, fds, n_fds);
        free(p);
        return r;
}

int rpc_conn_send_parts(struct rpc_conn *c, const struct iovec *parts, unsigned n_parts) {
        if (!c || (n_parts > 0 && !parts))
                return -EINVAL;
        if (c->state >= RPC_CONN_CLOSING)
                return -ENOTCONN;
        return out_queue(c, parts, n_parts, NULL, 0);
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
        if (vhub_frame_in_queued_fds(&c->in) > 0) {
                vhub_frame_in_drop_fds(&c->in);
                fds_dropped(c);
        }
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

static void handle_line(struct rpc_conn *c, const char *p, size_t n, bool carried) {
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
        if (carried && need > 0 && c->ops && c->ops->on_fds_lost) {
                /* its fds stayed with the earlier process: whatever is
                 * queued came after it, for the lines that follow */
                c->ops->on_fds_lost(c, msg, c->userdata);
                return;
        }
        if (need > vhub_frame_in_queued_fds(&c->in)) {
                json_decref(msg);
                snprintf(detail, sizeof(detail),
                         "message declares %u fds but only %u were received with it",
                         need, vhub_frame_in_queued_fds(&c->in));
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
        if (vhub_frame_in_take_fds(&c->in, need, &fds.fds) < 0) {
                json_decref(msg);
                set_reason(c, "out of memory");
                schedule_close(c);
                return;
        }
        fds.n = need;

        if (c->ops && c->ops->on_message)
                c->ops->on_message(c, msg, &fds, c->userdata);
        else {
                json_decref(msg);
                rpc_fds_clear(&fds);
        }
}

static void really_free(struct rpc_conn *c);

/* The partial line left in the input buffer must be complete line_timeout_ms after
 * its first byte was read: armed when one starts (nothing was pending, or
 * a line just ended before it), dropped when none is left. */
static void line_deadline_update(struct rpc_conn *c, bool line_ended) {
        struct timeval tv = {
                .tv_sec = c->limits.line_timeout_ms / 1000,
                .tv_usec = (c->limits.line_timeout_ms % 1000) * 1000,
        };

        if (vhub_frame_in_pending_bytes(&c->in) == 0)
                event_del(c->line_ev);
        else if (line_ended || !evtimer_pending(c->line_ev, NULL))
                evtimer_add(c->line_ev, &tv);
}

static void line_timeout_cb(evutil_socket_t fd, short what, void *userdata) {
        struct rpc_conn *c = userdata;
        char detail[128];
        int avail = 0;

        if (c->state != RPC_CONN_OPEN || c->read_closed || c->stopped || vhub_frame_in_pending_bytes(&c->in) == 0)
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

/* Lines are left in the input buffer (a slice ended, or the owner paused): nothing is
 * read meanwhile, and no deadline runs for a line that cannot progress. */
static void hold_input(struct rpc_conn *c) {
        static const struct timeval now = { 0, 0 };

        event_del(c->read_ev);
        event_del(c->line_ev);
        /* a zero timer, not event_active(): the loop polls every fd and
         * runs every due timer before it comes back here */
        if (!c->paused && !c->stopped)
                evtimer_add(c->resume_ev, &now);
}

/* Hands the complete lines to handle_line(), for at most RPC_SLICE_USEC.
 * Returns false if c was freed. */
static bool process_lines(struct rpc_conn *c) {
        uint64_t started = now_usec();
        unsigned handed = 0;
        bool held = false;
        const char *line;
        bool carried;
        size_t n;
        int r;

        c->processing++;
        while (c->state == RPC_CONN_OPEN && !c->free_pending) {
                if (c->paused || c->stopped || now_usec() - started >= RPC_SLICE_USEC) {
                        held = vhub_frame_in_pending_bytes(&c->in) > 0;
                        break;
                }
                if (vhub_frame_in_next_line(&c->in, &line, &n) <= 0)
                        break;
                handed++;
                carried = c->carried > 0;
                c->carried = c->carried > n + 1 ? c->carried - (n + 1) : 0;
                if (n > c->limits.max_line) {
                        framing_violation(c, "line longer than the limit");
                        break;
                }
                handle_line(c, line, n, carried);
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
        if (held || c->paused || c->stopped) {
                /* the checks below are for what is left once every line is handed over */
                hold_input(c);
                return true;
        }
        line_deadline_update(c, handed > 0);

        r = vhub_frame_in_check(&c->in);
        if (r == -EMSGSIZE) {
                char detail[128];

                snprintf(detail, sizeof(detail), "line longer than %zu bytes", c->limits.max_line);
                framing_violation(c, detail);
        } else if (r == -EBADMSG) {
                char detail[128];

                snprintf(detail, sizeof(detail), "%u fds received that no message claims",
                         vhub_frame_in_queued_fds(&c->in));
                framing_violation(c, detail);
        }
        return true;
}

/* After EOF: did the peer close its socket (POLLHUP: nobody will read an
 * answer) or only shut down its sending side? */
static bool peer_hung_up(const struct rpc_conn *c) {
        struct pollfd p = { .fd = c->fd, .events = POLLOUT };

        return poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR));
}

static void read_cb(evutil_socket_t fd, short what, void *userdata) {
        struct rpc_conn *c = userdata;
        unsigned n_fds = 0;
        ssize_t n;

        if (c->state != RPC_CONN_OPEN || c->read_closed || c->paused || c->stopped)
                return;
        /* every fd that arrives is queued or closed, whatever else happens */
        n = vhub_frame_in_read(&c->in, c->fd, &n_fds);
        note_memory(c);
        if (n == -EAGAIN)
                return;
        if (n == -EPROTO) {
                /* room was made for the most one sendmsg() can carry: the
                 * kernel had no fd numbers left for them */
                refuse_and_close(c, JSONRPC_LIMIT_REACHED, "resource limit reached",
                                 "fds lost on receipt: the daemon is out of fds");
                return;
        }
        if (n == -ENOBUFS) {
                char detail[128];

                snprintf(detail, sizeof(detail), "more than %u fds queued", c->limits.max_fds_queued);
                framing_violation(c, detail);
                return;
        }
        if (n == -EMSGSIZE) {
                char detail[128];

                snprintf(detail, sizeof(detail), "line longer than %zu bytes", c->limits.max_line);
                framing_violation(c, detail);
                return;
        }
        if (n < 0) {
                if (n == -ENOMEM)
                        set_reason(c, "out of memory");
                else if (errno_is_peer_gone((int)-n))
                        set_reason(c, "peer closed");
                else
                        set_reason(c, "read error: %s", strerror((int)-n));
                schedule_close(c);
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
        if (process_lines(c) && c->state == RPC_CONN_OPEN && c->ops && c->ops->on_input)
                c->ops->on_input(c, c->userdata);
}

static void resume_cb(evutil_socket_t fd, short what, void *userdata) {
        struct rpc_conn *c = userdata;

        if (c->state != RPC_CONN_OPEN || c->paused || c->stopped)
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
        if (c->state == RPC_CONN_OPEN && !c->stopped)
                evtimer_add(c->resume_ev, &now);
}

/* ---- a restart (docs/restart.md) -------------------------------------- */

void rpc_conn_stop_reading(struct rpc_conn *c) {
        c->stopped = true;
        event_del(c->read_ev);
        /* lines held by a slice or a pause stay in the input for the next
         * process, and a partial line has no deadline: it cannot progress */
        event_del(c->resume_ev);
        event_del(c->line_ev);
}

size_t rpc_conn_unhandled_input(const struct rpc_conn *c, const char **ret) {
        *ret = vhub_frame_in_pending(&c->in);
        return vhub_frame_in_pending_bytes(&c->in);
}

size_t rpc_conn_partial_input(const struct rpc_conn *c) {
        return vhub_frame_in_partial_bytes(&c->in);
}

int rpc_conn_restore_input(struct rpc_conn *c, const void *p, size_t n) {
        static const struct timeval now = { 0, 0 };
        int r = vhub_frame_in_push(&c->in, p, n);

        if (r < 0)
                return r;
        note_memory(c);
        /* complete lines among them (held by a slice when the earlier
         * process stopped) are handed over from the loop, as a slice's
         * rest would be: nothing new may come to wake the connection */
        c->carried = vhub_frame_in_pending_bytes(&c->in);
        if (c->state == RPC_CONN_OPEN && !c->paused && !c->stopped)
                evtimer_add(c->resume_ev, &now);
        return 0;
}

ssize_t rpc_conn_unsent_output(const struct rpc_conn *c, char **ret) {
        return vhub_frame_out_unsent(&c->out, ret);
}

int rpc_conn_restore_output(struct rpc_conn *c, const void *p, size_t n) {
        int r;

        if (c->state >= RPC_CONN_CLOSING)
                return -ENOTCONN;
        r = vhub_frame_out_queue_raw(&c->out, p, n);
        if (r < 0)
                return r;
        note_memory(c);
        return n > 0 && event_add(c->write_ev, NULL) < 0 ? -ENOMEM : 0;
}

int rpc_conn_flush_now(struct rpc_conn *c) {
        if (c->state >= RPC_CONN_CLOSING)
                return -ENOTCONN;
        return vhub_frame_out_flush(&c->out, c->fd);
}

/* ---- life cycle ------------------------------------------------------- */

static void really_free(struct rpc_conn *c) {
        vhub_event_freep(&c->read_ev);      /* fds_dropped() looks: the owner is not told */
        vhub_event_freep(&c->write_ev);
        vhub_event_freep(&c->close_ev);
        vhub_event_freep(&c->line_ev);      /* in_drop() below looks */
        vhub_event_freep(&c->resume_ev);
        c->processing = 0;
        in_drop(c);
        vhub_frame_out_done(&c->out);
        vhu_safe_close(c->fd);
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
                vhu_safe_close(fd);
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
                vhu_safe_close(fd);
                return -EINVAL;
        }

        c = calloc(1, sizeof(*c));
        if (!c) {
                vhu_safe_close(fd);
                return -ENOMEM;
        }
        c->fd = fd;
        c->base = base;
        c->limits = l;
        c->ops = ops;
        c->userdata = userdata;
        c->state = RPC_CONN_OPEN;
        vhub_frame_in_init(&c->in, l.max_line, l.max_fds_queued);
        vhub_frame_out_init(&c->out, true);

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
