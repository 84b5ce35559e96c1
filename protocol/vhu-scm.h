/* SPDX-License-Identifier: MIT */
/*
 * SCM_RIGHTS control data: how every fd-carrying socket in the tree (the
 * vhost-user wire, the control API's framing, its client library, their
 * tests) attaches fds to a sendmsg() and takes them from a recvmsg().
 * Header-only, so that the control libraries share it without linking the
 * vhost-user codec.
 */
#pragma once

#include <assert.h>
#include <errno.h>
#include <stdbool.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "vhu-fd.h"

/* The most fds one sendmsg() can carry (the kernel's SCM_MAX_FD). */
#define VHU_SCM_MAX_FDS 253u

/* Declares `name`, a control buffer for up to max_fds fds, aligned for struct cmsghdr. */
#define VHU_SCM_BUF(name, max_fds)                                              \
        union {                                                                 \
                struct cmsghdr align;                                           \
                char buf[CMSG_SPACE(sizeof(int) * (max_fds))];                  \
        } name

/*
 * Attach n fds to mh as one SCM_RIGHTS message in buf (buf_size bytes,
 * cmsghdr-aligned: a VHU_SCM_BUF's .buf).  n == 0 leaves mh without control
 * data.  The fds stay the caller's: the kernel duplicates them on send.
 */
static inline void vhu_scm_attach(struct msghdr *mh, void *buf, size_t buf_size,
                                  const int *fds, size_t n) {
        struct cmsghdr *c;

        if (n == 0)
                return;
        assert(CMSG_SPACE(sizeof(int) * n) <= buf_size);
        memset(buf, 0, CMSG_SPACE(sizeof(int) * n));
        mh->msg_control = buf;
        mh->msg_controllen = CMSG_SPACE(sizeof(int) * n);
        c = CMSG_FIRSTHDR(mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * n);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * n);
}

/* What one vhu_scm_recv() did with the fds that came. */
struct vhu_scm_received {
        unsigned n_fds;         /* stored in the caller's array, in arrival order */
        unsigned n_closed;      /* beyond the caller's room: closed */
        bool truncated;         /* MSG_CTRUNC: the kernel dropped some (more than
                                 * max_fds were sent, or no fd numbers were left) */
};

/*
 * One recvmsg(MSG_CMSG_CLOEXEC | MSG_DONTWAIT) into iov[0..iovlen), taking
 * at most max_fds fds (<= VHU_SCM_MAX_FDS: the kernel truncates the rest),
 * EINTR retried.  The first `room` fds go to fds[] and the rest are closed:
 * every fd the kernel installed is the caller's or closed, whatever the
 * outcome -- how many a path accepts is its own policy.  Returns the bytes
 * read (0 at EOF) or -errno (-EAGAIN: nothing to read now); *ret is set in
 * every case.
 */
static inline ssize_t vhu_scm_recv(int sockfd, struct iovec *iov, size_t iovlen, unsigned max_fds,
                                   int *fds, unsigned room, struct vhu_scm_received *ret) {
        VHU_SCM_BUF(control, VHU_SCM_MAX_FDS);
        struct msghdr mh = {
                .msg_iov = iov,
                .msg_iovlen = iovlen,
                .msg_control = control.buf,
                .msg_controllen = CMSG_SPACE(sizeof(int) * (max_fds < VHU_SCM_MAX_FDS ? max_fds : VHU_SCM_MAX_FDS)),
        };
        ssize_t n;

        *ret = (struct vhu_scm_received){ 0 };
        if (max_fds == 0) {
                mh.msg_control = NULL;
                mh.msg_controllen = 0;
        }
        do
                n = recvmsg(sockfd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n < 0)
                return errno == EWOULDBLOCK ? -EAGAIN : -errno;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                const unsigned char *data = CMSG_DATA(c);
                size_t k;

                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                        continue;
                k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < k; i++) {
                        int fd;

                        memcpy(&fd, data + i * sizeof(int), sizeof(fd));
                        if (ret->n_fds < room)
                                fds[ret->n_fds++] = fd;
                        else {
                                vhu_safe_close(fd);
                                ret->n_closed++;
                        }
                }
        }
        ret->truncated = (mh.msg_flags & MSG_CTRUNC) != 0;
        return n;
}
