/* SPDX-License-Identifier: MIT */
/*
 * The client's framing of the control API, and nothing else: "one JSON line
 * plus a FIFO of fds" in both directions ("Transport and framing" in
 * docs/control-api.md).  No JSON-RPC here (ids, events, errors are
 * vhub-client.c's), no waiting (callers poll), no event loop: the same job
 * as the daemon's control/rpc-conn.c framing, kept apart so that the two can
 * become one module.
 *
 * In: client_frame_in_read() does one non-blocking recvmsg (MSG_CMSG_CLOEXEC)
 * into the line buffer and queues the fds that came with it, in arrival
 * order.  client_frame_in_next_line() hands out complete lines; for each
 * message the caller takes the fds it declares ("fds": N) from the front
 * with client_frame_in_take_fds().  client_frame_in_check() then says
 * whether what is left is legal: fds queued with no partial line pending
 * belong to no message, and a line may not grow beyond the limit.
 *
 * Out: client_frame_out_queue() encodes one message as a compact line and
 * queues it with its own dup()s of the fds (the caller keeps its copies);
 * client_frame_out_flush() writes what the socket takes, the fds attached
 * to the first byte of their line.  Every queued line has a sequence
 * number, so a caller can tell when its own line is out.
 */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CLIENT_FRAME_MAX_FDS 253u               /* per message: the kernel's SCM_MAX_FD */
#define CLIENT_FRAME_MAX_LINE (64u * 1024 * 1024) /* one incoming line */
#define CLIENT_FRAME_MAX_QUEUED_FDS 1024u       /* received, not yet claimed */

struct client_frame_in {
        char *buf;
        size_t len, size;
        size_t start;           /* first byte not yet handed out as a line */
        size_t scanned;         /* no '\n' in [start, scanned) */
        int fdq[CLIENT_FRAME_MAX_QUEUED_FDS];
        unsigned fdq_len;
};

/* One recvmsg: bytes read (> 0), 0 if nothing was there (EAGAIN), -ECONNRESET
 * at EOF, -ENOBUFS if more fds arrived than the queue holds (they are
 * closed), -EPROTO if the kernel truncated the fds (MSG_CTRUNC), else -errno. */
int client_frame_in_read(struct client_frame_in *f, int fd);

/* The next complete line (without its '\n'), pointing into the buffer until
 * the next read: 1, or 0 if no complete line is buffered. */
int client_frame_in_next_line(struct client_frame_in *f, const char **ret_line, size_t *ret_len);

/* Take n fds from the front of the queue into *ret_fds (malloc()ed, yours;
 * NULL when n is 0).  -EBADMSG if fewer are queued. */
int client_frame_in_take_fds(struct client_frame_in *f, unsigned n, int **ret_fds);

/* After the lines were handed out: -EBADMSG for fds no message can claim,
 * -EMSGSIZE for a partial line over the limit, else 0. */
int client_frame_in_check(struct client_frame_in *f);

unsigned client_frame_in_queued_fds(const struct client_frame_in *f);

/* Close every queued fd (the connection is broken: nothing can claim them). */
void client_frame_in_drop_fds(struct client_frame_in *f);

/* Free the buffer and close the queued fds. */
void client_frame_in_done(struct client_frame_in *f);

struct client_frame_line;

struct client_frame_out {
        struct client_frame_line *head, *tail;
        uint64_t next_seq;      /* the next queued line's number (from 1) */
        uint64_t sent_seq;      /* every line up to this one is out */
};

/* Queue msg as one line ("fds" must already say n_fds when n_fds > 0) with
 * dups of fds.  *ret_seq (may be NULL) gets the line's number.  0 or -errno
 * (-EINVAL: not encodable; -EBADF: a bad fd; -ENOMEM). */
int client_frame_out_queue(struct client_frame_out *o, const json_t *msg, const int *fds,
                           unsigned n_fds, uint64_t *ret_seq);

/* Write what the socket takes now: 0 when everything queued is out, 1 when
 * some is left (the socket is full), -errno when the socket failed. */
int client_frame_out_flush(struct client_frame_out *o, int fd);

bool client_frame_out_pending(const struct client_frame_out *o);

/* Drop line seq if none of it was written yet: 0; -EBUSY if it is partly
 * written (a half line can not be taken back); -ENOENT if it is out. */
int client_frame_out_drop(struct client_frame_out *o, uint64_t seq);

/* Free every queued line and close its fds. */
void client_frame_out_done(struct client_frame_out *o);
