/* SPDX-License-Identifier: MIT */
/*
 * For the client library's unit tests: the scripted daemon's end of a
 * socketpair.  It reads whole lines and the fds each declares ("fds": N)
 * with raw recvmsg and writes raw bytes with SCM_RIGHTS, so that the
 * library's framing is checked from outside the library.
 */
#pragma once

#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-check.h"
#include "vhu-scm.h"

struct peer {
        int fd;
        char *buf;              /* bytes read, not yet taken as a line */
        size_t len, size;
        int fdq[512];           /* fds received, not yet taken by a line */
        unsigned nfdq;
};

/* Room for at least 64 KiB more in the buffer. */
static inline void peer_reserve(struct peer *p) {
        if (p->size - p->len >= 65536)
                return;
        p->size = p->size ? p->size * 2 : 1 << 17;
        p->buf = realloc(p->buf, p->size);
        CHECK(p->buf);
}

/* Read one line (blocking) and the fds it declares; returns the parsed
 * message.  fds NULL: the line's fds are closed. */
static inline json_t *peer_read(struct peer *p, int *fds, unsigned *n_fds) {
        for (;;) {
                char *nl = p->len ? memchr(p->buf, '\n', p->len) : NULL;

                if (nl) {
                        size_t linelen = (size_t)(nl - p->buf);
                        json_error_t jerr;
                        json_t *m = json_loadb(p->buf, linelen, 0, &jerr);
                        json_int_t n = json_integer_value(json_object_get(m, "fds"));

                        CHECK(m);
                        memmove(p->buf, nl + 1, p->len - linelen - 1);
                        p->len -= linelen + 1;
                        CHECK(n >= 0 && (unsigned)n <= p->nfdq);
                        if (fds)
                                memcpy(fds, p->fdq, sizeof(int) * (size_t)n);
                        else
                                for (json_int_t i = 0; i < n; i++)
                                        close(p->fdq[i]);
                        p->nfdq -= (unsigned)n;
                        memmove(p->fdq, p->fdq + n, sizeof(int) * p->nfdq);
                        if (n_fds)
                                *n_fds = (unsigned)n;
                        return m;
                }

                VHU_SCM_BUF(ctl, 253);
                struct iovec iov;
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                                     .msg_controllen = sizeof(ctl.buf) };
                ssize_t r;

                peer_reserve(p);
                iov = (struct iovec){ .iov_base = p->buf + p->len, .iov_len = p->size - p->len };
                r = recvmsg(p->fd, &mh, MSG_CMSG_CLOEXEC);
                CHECK(r > 0);
                CHECK(!(mh.msg_flags & MSG_CTRUNC));
                for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                        unsigned k = (unsigned)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));

                        CHECK(c->cmsg_type == SCM_RIGHTS);
                        /* fds ride on the first byte of their line */
                        CHECK(p->len == 0 || p->buf[p->len - 1] == '\n');
                        CHECK(p->nfdq + k <= sizeof(p->fdq) / sizeof(p->fdq[0]));
                        memcpy(p->fdq + p->nfdq, CMSG_DATA(c), k * sizeof(int));
                        p->nfdq += k;
                }
                p->len += (size_t)r;
        }
}

/* Send raw bytes, fds attached to the first byte; chunk > 0 splits the
 * bytes into writes of that size. */
static inline void peer_send_raw(struct peer *p, const char *line, size_t len, const int *fds, unsigned n,
                                 size_t chunk) {
        size_t off = 0;

        if (chunk == 0)
                chunk = len;
        while (off < len) {
                VHU_SCM_BUF(ctl, 253);
                size_t l = len - off < chunk ? len - off : chunk;
                struct iovec iov = { (char *)line + off, l };
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
                ssize_t w;

                if (off == 0)
                        vhu_scm_attach(&mh, ctl.buf, sizeof(ctl.buf), fds, n);
                w = sendmsg(p->fd, &mh, MSG_NOSIGNAL);
                CHECK(w > 0);
                off += (size_t)w;
        }
}

static inline json_int_t msg_id(const json_t *m) {
        return json_integer_value(json_object_get(m, "id"));
}

/* Closes the fds it still holds and its end of the socketpair. */
static inline void peer_free(struct peer *p) {
        for (unsigned i = 0; i < p->nfdq; i++)
                close(p->fdq[i]);
        if (p->fd >= 0)
                close(p->fd);
        free(p->buf);
}
