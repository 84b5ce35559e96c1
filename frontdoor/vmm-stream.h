/* SPDX-License-Identifier: MIT */
/*
 * What the VMM's connection and its back-end channel share: a non-blocking
 * vhost-user socket on libevent with protocol/'s reader and writer, a
 * bound on queued bytes and a deadline on a stalled write, one timer for
 * the owner's deadlines too, and a loss recorded once and reported from
 * the loop (never inside the caller's stack).  Private to frontdoor/.
 *
 * The owner embeds a struct vmm_stream, reads in ops->on_readable, checks
 * its own deadlines in ops->on_timer and hears of the loss in ops->on_lost;
 * freeing itself from inside its callbacks is the owner's business.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vhu-socket.h"

struct event;
struct event_base;

struct vmm_stream_ops {
        void (*on_readable)(void *owner);
        /* The timer fired and the write deadline had not passed: the owner
         * checks its own (and rearms with vmm_stream_rearm). */
        void (*on_timer)(void *owner, uint64_t now);
        void (*on_lost)(void *owner);
        /* Optional: the fds the reader (a message half-read) or the writer
         * (dups waiting to go) holds changed; only take note. */
        void (*on_fds_changed)(void *owner);
};

struct vmm_stream {
        int fd;
        const char *what;            /* "the VMM's connection", for messages */
        struct event *ev_read;
        struct event *ev_write;
        struct event *ev_timer;
        struct event *ev_lost;
        struct vhu_reader reader;
        struct vhu_writer writer;
        size_t max_queued_bytes;
        uint64_t write_timeout_usec;
        uint64_t write_deadline;     /* 0: the writer is not stalled */
        uint64_t owner_deadline;     /* the owner's next one; 0: none */
        bool reading;
        bool lost;
        bool lost_timeout;
        char lost_reason[256];
        const struct vmm_stream_ops *ops;
        void *owner;
};

/*
 * The setup the VMM's connection and its channel share: an owner of size
 * bytes, zeroed, whose first member is its stream, started on fd: a
 * connected AF_UNIX stream socket, made non-blocking here, taken in every
 * case (closed on failure); reading starts at once.  Returns the owner, or
 * NULL with *error set (nothing left to undo).  The owner fills in the rest
 * before it returns to the loop: no callback runs before that.
 */
void *vmm_stream_new_owner(size_t size, struct event_base *base, int fd, const char *what,
                           size_t max_queued_bytes, unsigned write_timeout_ms,
                           const struct vmm_stream_ops *ops, int *error);
/* Events freed, reader and writer dropped (their fds closed), socket closed. */
void vmm_stream_done(struct vmm_stream *s);

/* Record the loss (the first one wins) and report it from the loop. */
void vmm_stream_lose(struct vmm_stream *s, bool timeout, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));
/* Stop reading and writing without a report (the owner is going away). */
void vmm_stream_silence(struct vmm_stream *s);
/* The same, and lost: the owner is going from inside one of its callbacks
 * and frees itself when that returns; meanwhile nothing more is sent. */
void vmm_stream_abandon(struct vmm_stream *s);

/* Send m (fds borrowed; dup'd if it has to wait); failures lose the stream.
 * Returns vhu_writer's -ENOMEM/-EMFILE/-EINVAL (nothing sent), else 0. */
int vmm_stream_send(struct vmm_stream *s, const struct vhu_msg *m);
void vmm_stream_set_reading(struct vmm_stream *s, bool on);
/* The owner's next deadline (0: none): the timer fires at the earlier of
 * it and the write deadline. */
void vmm_stream_rearm(struct vmm_stream *s, uint64_t owner_deadline);
/* Nothing half-read, nothing queued to send, not lost: the socket alone
 * holds the session (a restart of the daemon can carry it). */
bool vmm_stream_at_rest(const struct vmm_stream *s);
/* Its socket (what NULL), a partial message's fds ("in"), the writer's
 * dups waiting to go ("out"): vhu_conn_foreach_fd(). */
void vmm_stream_foreach_fd(const struct vmm_stream *s, vhu_fd_fn fn, void *userdata);
