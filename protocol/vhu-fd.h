/* SPDX-License-Identifier: MIT */
/*
 * Owning file descriptors, header-only (protocol/, the daemon, the control
 * libraries and the client library share it).
 *
 * The rule everywhere: every fd has exactly one owner; a variable that owns
 * an fd holds it or -1.  Handing an fd on is VHU_TAKE_FD(x) (x becomes -1),
 * dropping it is x = vhu_safe_close(x).  A function that takes an fd takes
 * it in every case, success or failure: the caller never closes what it
 * passed, whatever the return value.
 */
#pragma once

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <unistd.h>

/* Close fd if it is one (>= 0), errno preserved (so that a failure path
 * can close and still return -errno).  Returns -1: x = vhu_safe_close(x). */
static inline int vhu_safe_close(int fd) {
        if (fd >= 0) {
                int saved = errno;

                /* Linux releases the fd even when close() reports an error
                 * (EINTR included): never retry, never look at the result */
                (void)close(fd);
                errno = saved;
        }
        return -1;
}

/* The fd held by variable x, which no longer holds it (set to -1): the
 * hand-over of ownership, written where it happens. */
#define VHU_TAKE_FD(x)                          \
        ({                                      \
                int *_vhu_p = &(x);             \
                int _vhu_fd = *_vhu_p;          \
                *_vhu_p = -1;                   \
                _vhu_fd;                        \
        })

/* Close fds[0..n) that are open and set each to -1. */
static inline void vhu_close_many(int *fds, size_t n) {
        for (size_t i = 0; i < n; i++)
                fds[i] = vhu_safe_close(fds[i]);
}

/* Make fd non-blocking.  The flag is on the open file description: whoever
 * shares it (a peer that passed it) sees the change.  Returns 0 or -errno. */
static inline int vhu_set_nonblocking(int fd) {
        int fl = fcntl(fd, F_GETFL);

        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
                return -errno;
        return 0;
}

static inline void vhu_closep(int *fd) {
        *fd = vhu_safe_close(*fd);
}

/* A local that owns an fd until it is handed on (VHU_TAKE_FD) or the scope
 * ends: `_cleanup_close_ int fd = open(...);`.  For long validation paths
 * where a goto ladder would only close. */
#define _cleanup_close_ __attribute__((cleanup(vhu_closep)))
