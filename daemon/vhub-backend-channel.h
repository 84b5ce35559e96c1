/* SPDX-License-Identifier: MIT */
/*
 * The back-end's request channel (SET_BACKEND_REQ_FD), as a transport: the
 * daemon keeps its end of a socketpair, reads and validates every back-end
 * request, hands it to its owner (ops->on_request), and sends the one answer
 * each gets.  What a request does is the owner's business
 * (vhub-device-channel.c); this file knows no device, VM or event.
 *
 * Answers: vhub_backend_channel_answer() sends the request's own reply if
 * it has one (SHARED_OBJECT_LOOKUP: u64 and maybe an fd), else the
 * REPLY_ACK if the back-end asked for one, else nothing -- so every request
 * is answered the one way the protocol allows, exactly once.  An owner that
 * must wait for someone else (an exporter device, the VMM) defers the
 * answer: the channel then reads nothing more, so answers go back in order,
 * until the owner answers or the deadline passes, when the channel fails the
 * request towards the back-end itself.
 *
 * Back-pressure: before each request the channel asks ops->congested()
 * whether the receiver of what the back-end sends (the VM's owner) is
 * behind.  If so the channel stops reading, so a back-end that floods waits,
 * not the receiver; vhub_backend_channel_drained() lets it read again.  If
 * that takes longer than the deadline, the channel reads on and the owner
 * refuses the requests meant for the receiver
 * (vhub_backend_channel_refuse_stalled()) until it has caught up.
 *
 * A protocol violation, a flood, a write error or a back-end that does not
 * read its answers is reported with ops->on_lost(); the owner then treats
 * the back-end as lost and frees the channel.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "vhu-message.h"
#include "vhu-socket.h"

struct event_base;
struct vhub_backend_channel;

struct vhub_backend_channel_ops {
        /* A validated request: answer it once, now or (deferred) later.  The
         * callee may take fds from m; the rest are closed when it returns. */
        void (*on_request)(void *userdata, struct vhub_backend_channel *ch, struct vhu_msg *m);
        /* Optional: whether the receiver of the back-end's requests is behind. */
        bool (*congested)(void *userdata);
        /* Optional: the channel stopped (true) or resumed (false) reading for
         * back-pressure; also false from vhub_backend_channel_free() of a
         * paused channel. */
        void (*paused)(void *userdata, bool paused);
        /* The channel broke (reason: a sentence); called at most once per cause. */
        void (*on_lost)(void *userdata, const char *reason);
        /* Optional: the dups its queued answers hold changed
         * (vhub_backend_channel_queued_fds()); only take note. */
        void (*on_fds_changed)(void *userdata);
};

struct vhub_backend_channel_params {
        struct event_base *base;
        unsigned timeout_ms;          /* how long a deferred answer or a pause may last */
        uint64_t protocol_features;   /* negotiated: which requests are valid, whether acks are wanted */
        const char *vm, *device;      /* for log lines (borrowed: they outlive the channel) */
        uid_t uid;                    /* the VM's, for log lines */
};

/* Takes fd (the daemon's end) in every case. */
int vhub_backend_channel_new(const struct vhub_backend_channel_params *p, int fd,
                             const struct vhub_backend_channel_ops *ops, void *userdata,
                             struct vhub_backend_channel **ret);
struct vhub_backend_channel *vhub_backend_channel_free(struct vhub_backend_channel *ch);
/* The dups its queued answers hold (the fd budget counts them). */
unsigned vhub_backend_channel_queued_fds(const struct vhub_backend_channel *ch);

/* Answer req (the request on_request got): value, with fd (>= 0: a copy
 * is sent) if the request's own reply may carry one. */
void vhub_backend_channel_answer(struct vhub_backend_channel *ch, const struct vhu_msg *req,
                                 uint64_t value, int fd);
/* req is answered later, with vhub_backend_channel_answer_deferred(tag,
 * token): nothing more is read until then or the deadline. */
void vhub_backend_channel_defer(struct vhub_backend_channel *ch, const struct vhu_msg *req,
                                unsigned tag, uint64_t token);
/* 0, or -ENOENT if the channel waits for no such tag and token (unknown, or
 * failed at the deadline already).  fd is not taken. */
int vhub_backend_channel_answer_deferred(struct vhub_backend_channel *ch, unsigned tag, uint64_t token,
                                         uint64_t value, int fd);
/* req is for the receiver, which has been behind for longer than the
 * deadline: true when the channel refused it (answered 1) -- the owner does
 * nothing more with it. */
bool vhub_backend_channel_refuse_stalled(struct vhub_backend_channel *ch, const struct vhu_msg *req);
/* The receiver caught up on what it was sent (or changed): read again. */
void vhub_backend_channel_drained(struct vhub_backend_channel *ch);
/* A planned restart: read no new request (a request partly read is read
 * to its end and handled), for good -- what the back-end sends from now on
 * waits in the socket for the next process. */
void vhub_backend_channel_stop_reading(struct vhub_backend_channel *ch);
/* Whether the channel still has something to finish: a request partly
 * read, answers not yet written (a deferred answer: see below). */
bool vhub_backend_channel_busy(const struct vhub_backend_channel *ch);
/* The answer deferred, if one is: its tag, token and the request's header. */
bool vhub_backend_channel_deferred(const struct vhub_backend_channel *ch, unsigned *tag, uint64_t *token,
                                   struct vhu_header *hdr);
/* The daemon's end of the socketpair (the channel keeps it). */
int vhub_backend_channel_fd(const struct vhub_backend_channel *ch);
/* Every fd ch holds: its socket (what NULL), a partial request's ("in"),
 * the writer's dups ("out"). */
void vhub_backend_channel_foreach_fd(const struct vhub_backend_channel *ch, vhu_fd_fn fn, void *userdata);
