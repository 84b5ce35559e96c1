/* SPDX-License-Identifier: MIT */
/*
 * The control API's framing, both directions, and nothing else: one compact
 * JSON value per '\n'-terminated line, fds as SCM_RIGHTS attached to the
 * first byte of the line that declares them ("fds": N), received fds in a
 * FIFO in arrival order ("Transport and framing" in docs/control-api.md).
 *
 * No event loop, no JSON-RPC, no policy beyond the bounds it is given: the
 * daemon's connections (rpc-conn.c, on libevent) and the client library
 * (control/client/, poll) both use it; its source is compiled into the
 * daemon and into libvhub-client, whose version script keeps it private.
 *
 * In: vhub_frame_in_read() does one non-blocking recvmsg(MSG_CMSG_CLOEXEC)
 * into the line buffer and queues the fds that came with it.
 * vhub_frame_in_next_line() hands out complete lines in order; for each
 * message the caller takes the fds it declares from the front of the FIFO
 * (vhub_frame_in_take_fds()).  vhub_frame_in_check() then says whether what
 * is left is legal.
 *
 * Out: each queued line holds dups of its fds (the caller keeps its own)
 * and a sequence number; vhub_frame_out_flush() writes what the socket
 * takes, a line's fds with its first byte, with MSG_NOSIGNAL (a gone peer
 * is -EPIPE, never SIGPIPE).
 */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#define VHUB_FRAME_MAX_FDS 253u /* per message: the kernel's SCM_MAX_FD */

struct vhub_frame_in {
        char *buf;
        size_t len, cap;
        size_t start;           /* first byte not yet handed out as a line */
        size_t scanned;         /* no '\n' in [start, scanned) */
        size_t max_line;        /* longest line accepted, '\n' not counted */
        int *fds;               /* the FIFO: fds[fd_head .. fd_head + n_fds) */
        unsigned fd_head, n_fds, fd_cap, max_fds;
};

/* Lines of at most max_line bytes, at most max_fds fds queued. */
void vhub_frame_in_init(struct vhub_frame_in *f, size_t max_line, unsigned max_fds);
/* Free the buffer, close the queued fds; f can be used again after init. */
void vhub_frame_in_done(struct vhub_frame_in *f);

/*
 * One recvmsg from sockfd.  Returns the bytes read (> 0), 0 at EOF, or:
 *   -EAGAIN    nothing to read now;
 *   -ENOBUFS   more fds arrived than the FIFO holds (the extra were closed);
 *   -EPROTO    the kernel dropped fds (MSG_CTRUNC: out of fd numbers);
 *   -EMSGSIZE  the buffer holds a partial line of max_line bytes already;
 *   -ENOMEM, -errno.
 * *ret_fds (may be NULL): how many fds were queued by this call (also on
 * -ENOBUFS / -EPROTO: they stay queued until dropped).
 */
ssize_t vhub_frame_in_read(struct vhub_frame_in *f, int sockfd, unsigned *ret_fds);

/* Bytes as if read (a restart hands back what an earlier process had read
 * and not yet handled): 0, -EMSGSIZE past max_line, -ENOMEM. */
int vhub_frame_in_push(struct vhub_frame_in *f, const void *p, size_t n);
/* The bytes received and not yet handed out (vhub_frame_in_pending_bytes() of them). */
const char *vhub_frame_in_pending(const struct vhub_frame_in *f);

/* The next complete line, without its '\n', valid until the next read: 1,
 * or 0 when no complete line is buffered. */
int vhub_frame_in_next_line(struct vhub_frame_in *f, const char **ret_line, size_t *ret_len);

/* Move the first n queued fds into *ret_fds (malloc()ed, the caller's; NULL
 * when n is 0).  -EBADMSG if fewer are queued, -ENOMEM. */
int vhub_frame_in_take_fds(struct vhub_frame_in *f, unsigned n, int **ret_fds);

/* After the complete lines were taken: -EBADMSG when fds are queued but no
 * partial line is pending (fds ride on their line's first byte: no message
 * can claim them), -EMSGSIZE when the partial line is over max_line, else 0. */
int vhub_frame_in_check(const struct vhub_frame_in *f);

unsigned vhub_frame_in_queued_fds(const struct vhub_frame_in *f);
/* Bytes received and not yet handed out as lines. */
size_t vhub_frame_in_pending_bytes(const struct vhub_frame_in *f);
/* Of those, the bytes after the last '\n' (a partial line). */
size_t vhub_frame_in_partial_bytes(const struct vhub_frame_in *f);
/* The buffer's allocated size. */
size_t vhub_frame_in_buffer_size(const struct vhub_frame_in *f);
/* Close every queued fd (nothing will claim them). */
void vhub_frame_in_drop_fds(struct vhub_frame_in *f);

/* For the owner's inventory of its fds: fn(fd, "in", userdata) for each
 * queued fd; vhub_frame_out_foreach_fd(): fn(fd, "out", userdata) for each
 * dup waiting to go. */
typedef void (*vhub_frame_fd_fn)(int fd, const char *what, void *userdata);
void vhub_frame_in_foreach_fd(const struct vhub_frame_in *f, vhub_frame_fd_fn fn, void *userdata);

struct vhub_frame_chunk;

struct vhub_frame_out {
        struct vhub_frame_chunk *head, *tail;
        size_t bytes;           /* queued, not yet written */
        unsigned n_fds;         /* dups waiting to go */
        uint64_t next_seq;      /* the next line's number (from 1) */
        uint64_t sent_seq;      /* every line up to this one is written */
        bool coalesce;          /* see vhub_frame_out_init() */
};

/* coalesce: small lines without fds share chunks (a server's many short
 * events); else every line has its own and can be taken back before it
 * starts (vhub_frame_out_drop()). */
void vhub_frame_out_init(struct vhub_frame_out *o, bool coalesce);
/* Free every queued line and close its fds. */
void vhub_frame_out_done(struct vhub_frame_out *o);

/* msg encoded compactly (no raw newline can occur), without the line's
 * '\n', into *ret_line (malloc()ed): 0, -EINVAL (not encodable), -ENOMEM. */
int vhub_frame_encode(const json_t *msg, char **ret_line, size_t *ret_len);

/*
 * Queue one line: the parts in order, then '\n', with dups of
 * fds[0..n_fds) attached to its first byte.  *ret_seq (may be NULL) gets
 * its number.  0, -EINVAL, -EBADF (a bad fd), -EMFILE, -ENOMEM; nothing is
 * queued on failure.
 */
int vhub_frame_out_queue(struct vhub_frame_out *o, const struct iovec *parts, unsigned n_parts,
                         const int *fds, unsigned n_fds, uint64_t *ret_seq);

/* Write what the socket takes now: 0 when everything queued is out, 1 when
 * some is left (the socket is full), -errno when the socket failed. */
int vhub_frame_out_flush(struct vhub_frame_out *o, int sockfd);

bool vhub_frame_out_pending(const struct vhub_frame_out *o);
void vhub_frame_out_foreach_fd(const struct vhub_frame_out *o, vhub_frame_fd_fn fn, void *userdata);

/* A restart (docs/restart.md): the bytes queued and not yet written, in
 * order (the rest of a line partly written first), copied into *ret
 * (malloc()ed; NULL when there are none): their number, -EBUSY when some
 * line carries fds (bytes alone cannot carry them), -ENOMEM. */
ssize_t vhub_frame_out_unsent(const struct vhub_frame_out *o, char **ret);
/* ... and the next process queues them as they are (no '\n' added): 0,
 * -EINVAL, -ENOMEM. */
int vhub_frame_out_queue_raw(struct vhub_frame_out *o, const void *p, size_t n);

/* Take back line seq if none of it was written: 0; -EBUSY if it is partly
 * written or shares its chunk; -ENOENT if it is out or unknown. */
int vhub_frame_out_drop(struct vhub_frame_out *o, uint64_t seq);
