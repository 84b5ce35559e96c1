/* SPDX-License-Identifier: MIT */
/*
 * One vhost-user connection to a back-end, as a front-end: a queue of
 * outgoing requests, a FIFO of requests awaiting replies (back-ends answer
 * in order), one deadline per awaited reply, and strict reply validation.
 * It never blocks: the socket is non-blocking and driven by libevent.
 *
 * Loss (EOF, EPIPE, ECONNRESET, a protocol violation, a deadline passed)
 * is reported once through ops->on_lost, always from the event loop (never
 * from inside vhub_bconn_send), after which the connection sends nothing.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "vhu-message.h"
#include "vhu-socket.h"

struct event_base;
struct vhub_bconn;

struct vhub_bconn_ops {
        /* A validated reply to the request sent with tag.  The callee may take
         * fds from reply; the rest are closed when it returns. */
        void (*on_reply)(void *userdata, uint32_t request, uint32_t tag, struct vhu_msg *reply);
        /* The connection is lost.  timeout is true when a deadline passed;
         * request is the request whose reply was awaited (0 if none). */
        void (*on_lost)(void *userdata, bool timeout, uint32_t request, const char *reason);
};

/* Takes fd (connected, any blocking mode) in every case: closed on failure. */
int vhub_bconn_new(struct event_base *base, int fd, unsigned timeout_ms, unsigned max_pending,
                   const struct vhub_bconn_ops *ops, void *userdata, struct vhub_bconn **ret);
/* Closes the socket; pending replies are dropped silently. NULL-safe. */
struct vhub_bconn *vhub_bconn_free(struct vhub_bconn *c);

/* The negotiated protocol features decide which replies to expect. */
void vhub_bconn_set_protocol_features(struct vhub_bconn *c, uint64_t protocol_features);
uint64_t vhub_bconn_protocol_features(const struct vhub_bconn *c);

/*
 * Queue m (fds borrowed, dup'd for sending).  If a reply is expected (see
 * vhu_request_expects_reply), it is awaited under tag, with a deadline.
 * Returns 1 if a reply will come, 0 if not, -ENOBUFS past max_pending,
 * -ENOTCONN once lost.
 */
int vhub_bconn_send(struct vhub_bconn *c, const struct vhu_msg *m, uint32_t tag);
/*
 * The same, but a reply is awaited whatever the request's flags say: spec
 * "Postcopy" -- a back-end in postcopy mode answers SET_MEM_TABLE with its
 * own mappings without being asked (libvhost-user echoes NEED_REPLY into
 * that reply, so it cannot be asked).  The reply is validated as if
 * NEED_REPLY had been set.
 */
int vhub_bconn_send_awaiting(struct vhub_bconn *c, const struct vhu_msg *m, uint32_t tag);
unsigned vhub_bconn_awaiting(const struct vhub_bconn *c);
/* Bytes wait to be written: a message sent now waits behind them, holding
 * dups of its fds until its first byte goes. */
bool vhub_bconn_write_pending(const struct vhub_bconn *c);
/* The dups waiting messages hold (the fd budget counts them). */
unsigned vhub_bconn_queued_fds(const struct vhub_bconn *c);
bool vhub_bconn_is_lost(const struct vhub_bconn *c);
int vhub_bconn_fd(const struct vhub_bconn *c);
/* Every fd c holds: its socket (what NULL), a partial reply's ("in") and
 * the writer's dups ("out"). */
void vhub_bconn_foreach_fd(const struct vhub_bconn *c, vhu_fd_fn fn, void *userdata);
/* Declare the connection lost now (e.g. a semantic error in a reply). */
void vhub_bconn_fail(struct vhub_bconn *c, bool timeout, uint32_t request, const char *reason);
