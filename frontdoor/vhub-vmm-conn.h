/* SPDX-License-Identifier: MIT */
/*
 * One VMM's connection to a front-door socket, where vhubd plays the
 * vhost-user *back-end*: the mirror of daemon/vhub-backend-conn.h.  A leaf:
 * protocol/ and libevent, nothing of the model.
 *
 * Requests in.  Each front-end request is read with protocol/'s reader
 * (never past a message, so every fd stays with the message it came with),
 * validated strictly with vhu_validate_request(VHU_DIR_FRONTEND, ...)
 * against the protocol features negotiated *with this VMM*, and handed with
 * its fds to ops->on_request.  Anything invalid -- bad flags, an unknown or
 * unnegotiated request, wrong sizes or fd counts, an oversized message, fds
 * off a message's first byte, protocol features acked that were not offered
 * -- loses the connection: a VMM is one more untrusted peer.
 *
 * Answers out.  A request the VMM waits for (one with a reply of its own,
 * or NEED_REPLY with REPLY_ACK negotiated: vhu_request_expects_reply()) is
 * handed over with a non-zero answer id, and must be answered exactly once,
 * now or later, with vhub_vmm_conn_reply() or vhub_vmm_conn_ack().  Answers
 * go out in request order whatever order they are given in: one given early
 * is held until those before it are answered.  A second answer, or one to
 * an unknown id, is refused (-ENOENT) and sends nothing.
 *
 * Bounds.  At most limits.max_pending requests await answers; at that many
 * the connection stops reading (the VMM waits, nothing is dropped).  A VMM
 * that does not take its answers -- more than max_queued_bytes queued, or
 * nothing taken for write_timeout_ms -- is dropped; the daemon never blocks
 * on it.  A request left unanswered for answer_timeout_ms is a bug of the
 * face above (it must answer within --backend-timeout-ms, from the
 * back-end or its own state): the connection is closed rather than leave
 * the VMM waiting forever.
 *
 * Loss is reported once through ops->on_lost, always from the event loop
 * (never from inside a call into this connection); after it nothing is
 * read or sent, and answers return -ENOTCONN.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vhu-message.h"
#include "vhu-socket.h"

struct event_base;
struct vhub_vmm_conn;

struct vhub_vmm_conn_limits {
        unsigned max_pending;        /* requests awaiting an answer before reading pauses */
        size_t max_queued_bytes;     /* answers queued towards a VMM that does not read */
        unsigned write_timeout_ms;   /* a VMM that takes none of its answers this long */
        unsigned answer_timeout_ms;  /* a request unanswered this long (0: no limit) */
};

/* Defaults: 32 pending, 1 MiB queued, 5000 ms without reading, no answer limit. */
void vhub_vmm_conn_limits_default(struct vhub_vmm_conn_limits *l);

struct vhub_vmm_conn_ops {
        /*
         * A validated front-end request.  The callee takes the fds it keeps
         * from m (vhu_msg_take_fd); the rest are closed when it returns.
         * answer_id is 0 when the VMM waits for nothing, else the id to
         * answer with.  The callee may answer, or free the connection, from
         * inside the call.
         */
        void (*on_request)(void *userdata, struct vhu_msg *m, uint64_t answer_id);
        /* The connection is lost; reason is a sentence for the log. */
        void (*on_lost)(void *userdata, const char *reason);
        /* Optional: the fds it holds (a message half-read, dups of answers
         * waiting to go) changed; only take note. */
        void (*on_fds_changed)(void *userdata);
        /* Optional: bytes are about to be taken from the VMM's socket (once
         * per wake-up, before the first, and again before each later
         * message: handling the one before may have written a snapshot that
         * carries the session): a restart's snapshot that carries the
         * session must stop saying it is at rest first. */
        void (*on_before_read)(void *userdata);
};

/* What an answer id wants. */
enum vhub_vmm_answer_kind {
        VHUB_VMM_ANSWER_NONE,        /* unknown id: answered already, or never issued */
        VHUB_VMM_ANSWER_ACK,         /* a REPLY_ACK: vhub_vmm_conn_ack() */
        VHUB_VMM_ANSWER_REPLY,       /* the request's own reply: vhub_vmm_conn_reply() */
};

/*
 * fd: a connected AF_UNIX stream socket, taken in every case (closed on
 * failure).  limits NULL: the defaults.
 */
int vhub_vmm_conn_new(struct event_base *base, int fd, const struct vhub_vmm_conn_limits *limits,
                      const struct vhub_vmm_conn_ops *ops, void *userdata, struct vhub_vmm_conn **ret);
/* Closes the socket, drops unanswered requests and queued answers.  NULL-safe;
 * may be called from inside ops->on_request; returns NULL. */
struct vhub_vmm_conn *vhub_vmm_conn_free(struct vhub_vmm_conn *c);

/*
 * The protocol features GET_PROTOCOL_FEATURES answers with: a
 * SET_PROTOCOL_FEATURES acking any bit beyond them, or a set the spec does
 * not allow (vhu_protocol_features_consistent()), loses the connection.
 */
void vhub_vmm_conn_offer_protocol_features(struct vhub_vmm_conn *c, uint64_t offer);
/*
 * A restart of the daemon carries a VMM's session (docs/restart.md): only a
 * connection at rest -- no request unanswered, no message half-read, no
 * answer queued -- is carried, so that the socket alone holds the rest.
 * The next process makes a connection on the same socket with the same
 * offer and resumes it with what the VMM had acked: -EPROTO for a set that
 * SET_PROTOCOL_FEATURES would have refused (nothing changed then).
 */
bool vhub_vmm_conn_at_rest(const struct vhub_vmm_conn *c);
/*
 * A crash may carry a session busy with requests the face took and has not
 * answered (docs/restart.md, "A crash with VMM requests in flight"): nothing
 * half-read, nothing queued or held to go out, exactly `awaited` answers
 * owed -- the socket and those requests hold the rest.
 */
bool vhub_vmm_conn_quiet(const struct vhub_vmm_conn *c, unsigned awaited);
/*
 * A request the earlier process had taken from this connection and not
 * answered, carried in its snapshot: handled again as if just read
 * (validated, an answer id issued if one is owed, ops->on_request).  m keeps
 * its fds (it should carry none).  Never from inside ops->on_request; the
 * connection may be freed from inside it, as from a read (use nothing of
 * it after, but through the owner's pointer).
 */
void vhub_vmm_conn_redo(struct vhub_vmm_conn *c, struct vhu_msg *m);
int vhub_vmm_conn_resume(struct vhub_vmm_conn *c, uint64_t acked);
/* What the VMM acked with SET_PROTOCOL_FEATURES (0 before it did). */
uint64_t vhub_vmm_conn_protocol_features(const struct vhub_vmm_conn *c);

enum vhub_vmm_answer_kind vhub_vmm_conn_answer_kind(const struct vhub_vmm_conn *c, uint64_t answer_id);
/*
 * Answer with the request's own reply: size bytes of payload and n_fds fds
 * (borrowed: dup'd, the caller keeps its own).  The reply is validated as
 * the VMM's front-end would (vhu_validate_reply): -EINVAL for one it would
 * refuse, and the request stays unanswered.  -ENOENT for an unknown id or
 * one that wants an ack; -ENOTCONN once lost; -ENOMEM/-EMFILE.
 */
int vhub_vmm_conn_reply(struct vhub_vmm_conn *c, uint64_t answer_id, const void *payload,
                        uint32_t size, const int *fds, unsigned n_fds);
int vhub_vmm_conn_reply_u64(struct vhub_vmm_conn *c, uint64_t answer_id, uint64_t value);
/* Answer with a REPLY_ACK: 0 for success, anything else is a failure for
 * the VMM (QEMU reads a non-zero u64 as -EIO).  Same returns. */
int vhub_vmm_conn_ack(struct vhub_vmm_conn *c, uint64_t answer_id, uint64_t status);

/* The face's own back-pressure: while paused nothing more is read (the VMM
 * waits; nothing is dropped), whatever max_pending says. */
void vhub_vmm_conn_pause(struct vhub_vmm_conn *c, bool paused);

/* Close the connection now (e.g. a request the face cannot answer honestly);
 * on_lost follows from the loop with reason. */
void vhub_vmm_conn_fail(struct vhub_vmm_conn *c, const char *reason);
bool vhub_vmm_conn_is_lost(const struct vhub_vmm_conn *c);
/* Requests whose answers have not gone out yet (unanswered, or held behind one). */
unsigned vhub_vmm_conn_pending(const struct vhub_vmm_conn *c);
/* Every fd it holds, for its owner's inventory: the socket (what NULL),
 * a partial message's ("in"), answers queued to go ("out") and answers
 * held behind earlier ones ("held"; vhu_fd_fn of vhu-socket.h). */
int vhub_vmm_conn_fd(const struct vhub_vmm_conn *c);
void vhub_vmm_conn_foreach_fd(const struct vhub_vmm_conn *c, vhu_fd_fn fn, void *userdata);
