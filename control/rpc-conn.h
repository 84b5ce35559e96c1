/* SPDX-License-Identifier: MIT */
/*
 * One JSON-RPC control connection: the contract's framing (one compact JSON
 * value per '\n'-terminated line, fds as SCM_RIGHTS, "fds": N per message),
 * on libevent, never blocking.
 *
 * Input: bytes and fds are read with recvmsg(MSG_CMSG_CLOEXEC); received fds
 * join a FIFO in arrival order.  When a line is complete it is parsed; a
 * message declaring "fds": N takes N fds from the front of the FIFO.
 *   - line longer than limits.max_line  -> error -32600 id null, then close
 *   - line not complete limits.line_timeout_ms after its first byte was
 *     read (a partial line pins its bytes)  -> error -32600 id null, then close
 *   - invalid JSON                      -> error -32700 id null, keep going
 *   - fewer queued fds than declared when the line is complete, or fds
 *     queued while no partial line remains, or more than 253 fds declared,
 *     or a bad "fds" member            -> error -32600 id null, close,
 *                                         every queued fd closed
 * Each good message goes to ops->on_message with its fds (the callee owns
 * both).  Blank lines are ignored.  The lines of one read are handed over
 * for at most RPC_SLICE_USEC (then the rest wait in the input buffer, and
 * nothing more is read, until the loop has run everything else that is
 * due), so that one peer's write cannot hold the loop.  ops->admit_fds may refuse fds as they
 * arrive (a budget): -32008 id null, then close as for a framing violation.
 *
 * EOF from the peer stops reading.  If the peer only shut down its sending
 * side and ops->on_eof is set, the connection stays open for writing until
 * the owner calls rpc_conn_close_after_flush() (requests already read
 * still get their answers); otherwise it closes once the output is flushed.
 *
 * Output: rpc_conn_send() serializes compactly, appends '\n', dups the fds
 * and queues them attached to the first byte of that line.  The queue is
 * bounded by limits.max_out_bytes: a peer that does not read falls behind,
 * and once the bound is passed the connection is closed (on_close runs from
 * the event loop, never from inside rpc_conn_send()).  Each queued line
 * takes what its bytes need, not the serializer's spare room.
 */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

struct event_base;
struct rpc_conn;

#define RPC_MAX_FDS_PER_MESSAGE 253
/* How long the lines of one read, or one message's work, may hold the loop
 * before it gets its turn back (the control layer slices batches by it). */
#define RPC_SLICE_USEC 10000

/* The fds one message carried.  Owned: close with rpc_fds_clear(). */
struct rpc_fds {
        int *fds;
        unsigned n;
};

void rpc_fds_clear(struct rpc_fds *f);
/* Steal fds[idx]; -1 if idx is out of range or already taken. */
int rpc_fds_take(struct rpc_fds *f, unsigned idx);

struct rpc_conn_limits {
        size_t max_line;       /* default 1 MiB (the contract) */
        unsigned line_timeout_ms; /* a line must be complete this long after its
                                   * first byte was read (default 10 s) */
        size_t max_out_bytes;  /* bound of the output queue */
        unsigned max_fds_queued; /* fds received but not yet claimed */
        unsigned max_out_fds;    /* dup'd fds in the output queue (default 1024) */
};

struct rpc_conn_ops {
        /* A complete, parsed message (object or batch array).  msg is a new
         * reference the callee must json_decref(); fds is moved to the
         * callee, who must rpc_fds_clear() it. */
        void (*on_message)(struct rpc_conn *c, json_t *msg, struct rpc_fds *fds, void *userdata);
        /* The connection is gone (peer closed, I/O error, framing violation
         * or output overflow).  Called once, from the event loop; the owner
         * then calls rpc_conn_free(). */
        void (*on_close)(struct rpc_conn *c, const char *reason, void *userdata);

        /* Optional.  The peer shut down its sending side; nothing more is
         * read.  The owner closes with rpc_conn_close_after_flush() once it
         * has answered what it read. */
        void (*on_eof)(struct rpc_conn *c, void *userdata);
        /* Optional.  n fds just arrived and are queued (counted by
         * rpc_conn_fds_held()).  Return 0 to keep them, or negative with one
         * sentence in detail: the peer gets -32008 with it, every queued fd
         * is closed and the connection closes. */
        int (*admit_fds)(struct rpc_conn *c, unsigned n, char *detail, size_t detail_len,
                         void *userdata);
        /* Optional.  The output queue has just become empty. */
        void (*on_drained)(struct rpc_conn *c, void *userdata);
        /* Optional.  rpc_conn_fds_held() went down by itself: fds queued
         * for output written, or fds dropped as the connection is refused
         * or closed.  Called from wherever that happens, rpc_conn_send()
         * included: it must only take note, never call back into c. */
        void (*on_fds_dropped)(struct rpc_conn *c, void *userdata);
        /* Optional.  Bytes were read and every complete line among them
         * handed over: what rpc_conn_unhandled_input() holds changed (a
         * partial line grew), though no message came of it. */
        void (*on_input)(struct rpc_conn *c, void *userdata);
        /* Optional.  A message that an earlier process had read (its line
         * was carried by rpc_conn_restore_input()) declares fds, which
         * stayed behind: msg (a new reference, the callee's) is not handed
         * to on_message.  Unset: a framing violation, as for any missing fd. */
        void (*on_fds_lost)(struct rpc_conn *c, json_t *msg, void *userdata);
};

void rpc_conn_limits_default(struct rpc_conn_limits *l);

/* Takes ownership of fd (a connected AF_UNIX stream socket). */
int rpc_conn_new(struct event_base *base, int fd, const struct rpc_conn_limits *limits,
                 const struct rpc_conn_ops *ops, void *userdata, struct rpc_conn **ret);
/* Closes the socket and every queued fd; NULL-safe; returns NULL. */
struct rpc_conn *rpc_conn_free(struct rpc_conn *c);

/* Peer credentials (SO_PEERCRED), read once at rpc_conn_new(). */
uid_t rpc_conn_peer_uid(const struct rpc_conn *c);
gid_t rpc_conn_peer_gid(const struct rpc_conn *c);
pid_t rpc_conn_peer_pid(const struct rpc_conn *c);

/*
 * Queue one message.  If n_fds > 0 the caller has already put "fds": n_fds
 * into msg.  fds are dup'd; the caller keeps its own.  Returns 0, -ENOBUFS
 * when the output bound is passed (the connection is then scheduled to
 * close), -ENOTCONN after close, -ENOMEM.  msg is not stolen.
 */
int rpc_conn_send(struct rpc_conn *c, json_t *msg, const int *fds, unsigned n_fds);

/*
 * Queue one line that is already serialized JSON (without the '\n'), made of
 * the parts in order (e.g. a batch answer assembled from its responses).
 * Same bound and returns as rpc_conn_send(); no fds.
 */
int rpc_conn_send_parts(struct rpc_conn *c, const struct iovec *parts, unsigned n_parts);

/* Send a JSON-RPC error object {jsonrpc, id, error:{code, message, data?}}. */
int rpc_conn_send_error(struct rpc_conn *c, json_t *id, int code, const char *message,
                        json_t *data);

/* No more lines are handed over and nothing more is read until
 * rpc_conn_resume_input() (e.g. while the owner works through one message
 * in slices).  Output goes on. */
void rpc_conn_pause_input(struct rpc_conn *c);
/* Lines waiting in the input buffer are handed over again, from the loop
 * (never from inside this call). */
void rpc_conn_resume_input(struct rpc_conn *c);

/* Close now: what is queued is dropped (its fds closed), nothing more is
 * read or written; on_close follows from the loop. */
void rpc_conn_abort(struct rpc_conn *c, const char *reason);

/* Stop reading, flush what is queued, then close (on_close follows). */
void rpc_conn_close_after_flush(struct rpc_conn *c, const char *reason);

bool rpc_conn_is_closing(const struct rpc_conn *c);
/* The peer has shut down its sending side (see ops->on_eof). */
bool rpc_conn_read_closed(const struct rpc_conn *c);
size_t rpc_conn_queued_bytes(const struct rpc_conn *c);
/* dup'd fds waiting in the output queue */
unsigned rpc_conn_queued_fds(const struct rpc_conn *c);
/* Every fd this connection holds: its socket, fds received and not yet
 * claimed by a message, and the copies waiting in the output queue. */
unsigned rpc_conn_fds_held(const struct rpc_conn *c);
/* Its socket (the connection keeps it). */
int rpc_conn_fd(const struct rpc_conn *c);
/* Those fds one by one: fn(fd, what, userdata), what NULL for the socket,
 * "in" for a received fd no message claimed yet, "out" for a copy queued. */
void rpc_conn_foreach_fd(const struct rpc_conn *c, void (*fn)(int fd, const char *what, void *userdata),
                         void *userdata);
/* The most its input buffer and output queue held since the last call
 * (then it starts again from what they hold now): a big one is worth giving
 * back to the system once freed. */
size_t rpc_conn_take_peak_memory(struct rpc_conn *c);
/* A planned restart (docs/restart.md): read nothing more and hand over no
 * line again (for good: rpc_conn_resume_input() does not undo it, and a
 * partial line has no deadline any more); the bytes read and not yet
 * handled (a partial line, and complete ones a slice or a pause held),
 * valid until the next call on c; write what the socket takes now (0: all
 * of it, 1: some is left, -errno). */
void rpc_conn_stop_reading(struct rpc_conn *c);
size_t rpc_conn_unhandled_input(const struct rpc_conn *c, const char **ret);
/* The last of those bytes that are a partial line (no '\n' yet). */
size_t rpc_conn_partial_input(const struct rpc_conn *c);
int rpc_conn_flush_now(struct rpc_conn *c);
/* The next process: the bytes an earlier one had read, as if just read:
 * the complete lines among them are handed over from the loop (never from
 * inside this call), before anything new is read; those that declare fds
 * go to ops->on_fds_lost.  0, -EMSGSIZE, -ENOMEM. */
int rpc_conn_restore_input(struct rpc_conn *c, const void *p, size_t n);
/* Output not written yet (a planned restart carries it): as
 * vhub_frame_out_unsent().  The next process queues it before anything
 * else: 0, -ENOTCONN, -ENOMEM. */
ssize_t rpc_conn_unsent_output(const struct rpc_conn *c, char **ret);
int rpc_conn_restore_output(struct rpc_conn *c, const void *p, size_t n);
/* The bounds in force (defaults filled in). */
const struct rpc_conn_limits *rpc_conn_limits(const struct rpc_conn *c);
