/* SPDX-License-Identifier: MIT */
/*
 * SCM_RIGHTS control data: how every fd-carrying socket in the tree (the
 * vhost-user wire, the control API's framing, its client library, their
 * tests) attaches fds to a sendmsg().  Header-only, so that the control
 * libraries share it without linking the vhost-user codec.
 */
#pragma once

#include <assert.h>
#include <string.h>
#include <sys/socket.h>

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
