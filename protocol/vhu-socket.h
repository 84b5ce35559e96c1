/* SPDX-License-Identifier: MIT */
/*
 * Non-blocking vhost-user socket I/O with SCM_RIGHTS.
 *
 * The reader never reads past the end of the current message, so the fds of
 * the next message (attached to its first byte) are never taken early.  It
 * receives with MSG_CMSG_CLOEXEC; MSG_CTRUNC, more fds than VHU_MAX_FDS, fds
 * anywhere but the first byte, or a payload size beyond VHU_MAX_PAYLOAD is a
 * protocol error (-EPROTO), and every fd received is closed unless the caller
 * takes it from the finished message.
 *
 * The writer queues encoded messages, dups their fds (F_DUPFD_CLOEXEC) so
 * the caller keeps its own, sends them attached to the first byte with
 * MSG_NOSIGNAL|MSG_DONTWAIT (a dead peer gives -EPIPE, never SIGPIPE), and
 * resumes partial writes.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vhu-message.h"

struct vhu_reader {
        struct vhu_msg msg;  /* the message being assembled; owns its fds */
        size_t got;          /* bytes of header+payload received so far */
};

void vhu_reader_init(struct vhu_reader *r);
/* Close any partial message's fds and start over. */
void vhu_reader_reset(struct vhu_reader *r);
/* For an owner's inventory of its fds: fn(fd, what, userdata) with what
 * "in" for the fds of the message being assembled, "out" for the writer's
 * dups waiting to be sent. */
typedef void (*vhu_fd_fn)(int fd, const char *what, void *userdata);
void vhu_reader_foreach_fd(const struct vhu_reader *r, vhu_fd_fn fn, void *userdata);

/*
 * Read from sockfd without blocking.  Returns:
 *   1        a whole message was moved into *ret (caller owns its fds; *ret
 *            must have been vhu_msg_init()ed or cleared);
 *   -EAGAIN  nothing more to read now;
 *   0        orderly EOF between messages;
 *   -ECONNRESET  EOF inside a message;
 *   -EPROTO  protocol violation (see above);
 *   -errno   any other socket error.
 * Call again after 1: more messages may already be buffered.
 */
int vhu_reader_read(struct vhu_reader *r, int sockfd, struct vhu_msg *ret);

/*
 * The same, for a reader that knows the next message's payload is at least
 * min_payload bytes (a reply of a known kind): header and that much payload
 * come in one recvmsg(), never reaching past the message.  A message shorter
 * than promised is -EPROTO.
 */
int vhu_reader_read_hint(struct vhu_reader *r, int sockfd, struct vhu_msg *ret, uint32_t min_payload);

struct vhu_writer_item;

struct vhu_writer {
        struct vhu_writer_item *head, *tail;
        size_t n_items;
        size_t n_bytes;       /* bytes still to send */
        unsigned n_fds;       /* dup'd fds held until their message's first byte is sent */
};

void vhu_writer_init(struct vhu_writer *w);
/* Drop everything queued, closing the dup'd fds. */
void vhu_writer_clear(struct vhu_writer *w);
bool vhu_writer_pending(const struct vhu_writer *w);
void vhu_writer_foreach_fd(const struct vhu_writer *w, vhu_fd_fn fn, void *userdata);
/* A connection's: its socket (what NULL, if >= 0), then its reader's and
 * writer's as above. */
void vhu_conn_foreach_fd(int sockfd, const struct vhu_reader *r, const struct vhu_writer *w, vhu_fd_fn fn,
                         void *userdata);

/* Queue m (encoded now; its fds dup'd).  -ENOMEM, -EMFILE, -EINVAL. */
int vhu_writer_queue(struct vhu_writer *w, const struct vhu_msg *m);

/*
 * Send m now if nothing is queued (the fds go from the caller's own, no
 * dup, no copy); whatever the socket does not take is queued as by
 * vhu_writer_queue().  Same returns as vhu_writer_flush().
 */
int vhu_writer_send(struct vhu_writer *w, int sockfd, const struct vhu_msg *m);

/*
 * Send as much as the socket takes.  Returns 0 when the queue is empty,
 * -EAGAIN when bytes remain (wait for writability), -EPIPE/-ECONNRESET/...
 * when the peer is gone.
 */
int vhu_writer_flush(struct vhu_writer *w, int sockfd);

/*
 * Blocking helpers for simple tools and tests (the test back-end, fuzz
 * harnesses): send one message / receive one whole message, polling.
 * timeout_ms < 0 waits forever.  Same return conventions.
 */
int vhu_send_msg_blocking(int sockfd, const struct vhu_msg *m, int timeout_ms);
int vhu_recv_msg_blocking(int sockfd, struct vhu_msg *ret, int timeout_ms);
