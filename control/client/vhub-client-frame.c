/* SPDX-License-Identifier: MIT */
/*
 * The client's "JSON line + fd FIFO" framing (see vhub-client-frame.h).
 */
#include "vhub-client-frame.h"
#include "vhu-scm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_CHUNK (64u * 1024)

static void close_fds(const int *fds, unsigned n) {
        for (unsigned i = 0; i < n; i++)
                if (fds[i] >= 0)
                        close(fds[i]);
}

/* ---- in ---- */

/* Move the unparsed tail to the front and make room for one more read. */
static int frame_in_make_room(struct client_frame_in *f) {
        if (f->start > 0) {
                memmove(f->buf, f->buf + f->start, f->len - f->start);
                f->len -= f->start;
                f->scanned -= f->start;
                f->start = 0;
        }
        if (f->size - f->len < READ_CHUNK) {
                size_t size = f->size ? f->size * 2 : 2 * READ_CHUNK;
                char *p;

                while (size - f->len < READ_CHUNK)
                        size *= 2;
                p = realloc(f->buf, size);
                if (!p)
                        return -ENOMEM;
                f->buf = p;
                f->size = size;
        }
        return 0;
}

int client_frame_in_read(struct client_frame_in *f, int fd) {
        VHU_SCM_BUF(control, CLIENT_FRAME_MAX_FDS);
        struct iovec iov;
        struct msghdr mh = {
                .msg_iov = &iov,
                .msg_iovlen = 1,
                .msg_control = control.buf,
                .msg_controllen = sizeof(control.buf),
        };
        bool overflow = false;
        ssize_t n;
        int r;

        r = frame_in_make_room(f);
        if (r < 0)
                return r;
        iov.iov_base = f->buf + f->len;
        iov.iov_len = f->size - f->len;

        do
                n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n < 0)
                return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;

        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
                const unsigned char *data;
                unsigned k;

                if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                        continue;
                k = (unsigned)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                data = CMSG_DATA(cm);
                for (unsigned i = 0; i < k; i++) {
                        int rfd;

                        memcpy(&rfd, data + i * sizeof(int), sizeof(rfd));
                        if (f->fdq_len < CLIENT_FRAME_MAX_QUEUED_FDS)
                                f->fdq[f->fdq_len++] = rfd;
                        else {
                                close(rfd);
                                overflow = true;
                        }
                }
        }
        if (overflow)
                return -ENOBUFS;
        if (mh.msg_flags & MSG_CTRUNC)
                return -EPROTO; /* some fds were lost on the way */
        if (n == 0)
                return -ECONNRESET;
        f->len += (size_t)n;
        return n > INT32_MAX ? INT32_MAX : (int)n;
}

int client_frame_in_next_line(struct client_frame_in *f, const char **ret_line, size_t *ret_len) {
        char *nl;

        if (f->scanned < f->start)
                f->scanned = f->start;
        nl = memchr(f->buf + f->scanned, '\n', f->len - f->scanned);
        if (!nl) {
                f->scanned = f->len;
                return 0;
        }
        *ret_line = f->buf + f->start;
        *ret_len = (size_t)(nl - (f->buf + f->start));
        f->start = (size_t)(nl - f->buf) + 1;
        f->scanned = f->start;
        return 1;
}

int client_frame_in_take_fds(struct client_frame_in *f, unsigned n, int **ret_fds) {
        int *fds;

        if (n > f->fdq_len)
                return -EBADMSG;
        if (n == 0) {
                *ret_fds = NULL;
                return 0;
        }
        fds = malloc(sizeof(int) * n);
        if (!fds)
                return -ENOMEM;
        memcpy(fds, f->fdq, sizeof(int) * n);
        f->fdq_len -= n;
        memmove(f->fdq, f->fdq + n, sizeof(int) * f->fdq_len);
        *ret_fds = fds;
        return 0;
}

int client_frame_in_check(struct client_frame_in *f) {
        size_t partial = f->len - f->start;

        if (partial > CLIENT_FRAME_MAX_LINE)
                return -EMSGSIZE;
        /* fds travel with the first byte of their line: fds left over with
         * no partial line pending belong to no message. */
        if (partial == 0 && f->fdq_len > 0)
                return -EBADMSG;
        return 0;
}

unsigned client_frame_in_queued_fds(const struct client_frame_in *f) {
        return f->fdq_len;
}

void client_frame_in_drop_fds(struct client_frame_in *f) {
        close_fds(f->fdq, f->fdq_len);
        f->fdq_len = 0;
}

void client_frame_in_done(struct client_frame_in *f) {
        client_frame_in_drop_fds(f);
        free(f->buf);
        f->buf = NULL;
        f->len = f->size = f->start = f->scanned = 0;
}

/* ---- out ---- */

struct client_frame_line {
        struct client_frame_line *next;
        uint64_t seq;
        char *buf;
        size_t len, off;
        int *fds;               /* our dups; closed once the first byte is out */
        unsigned n_fds;
};

static struct client_frame_line *frame_line_free(struct client_frame_line *l) {
        if (!l)
                return NULL;
        if (l->fds) {
                close_fds(l->fds, l->n_fds);
                free(l->fds);
        }
        free(l->buf);
        free(l);
        return NULL;
}

int client_frame_out_queue(struct client_frame_out *o, const json_t *msg, const int *fds,
                           unsigned n_fds, uint64_t *ret_seq) {
        struct client_frame_line *l;
        size_t len;
        int r;

        if (n_fds > CLIENT_FRAME_MAX_FDS || (n_fds > 0 && !fds))
                return -EINVAL;
        /* Compact encoding: no raw newline can appear inside the line. */
        len = json_dumpb(msg, NULL, 0, JSON_COMPACT);
        if (len == 0)
                return -EINVAL;
        l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        l->buf = malloc(len + 1);
        if (!l->buf) {
                r = -ENOMEM;
                goto fail;
        }
        if (json_dumpb(msg, l->buf, len, JSON_COMPACT) != len) {
                r = -EINVAL;
                goto fail;
        }
        l->buf[len] = '\n';
        l->len = len + 1;
        if (n_fds > 0) {
                l->fds = malloc(sizeof(int) * n_fds);
                if (!l->fds) {
                        r = -ENOMEM;
                        goto fail;
                }
                for (; l->n_fds < n_fds; l->n_fds++) {
                        /* Our own copy: the line may leave after the caller
                         * closed theirs. */
                        int d = fds[l->n_fds] < 0 ? -1 : fcntl(fds[l->n_fds], F_DUPFD_CLOEXEC, 3);

                        if (d < 0) {
                                r = fds[l->n_fds] < 0 || errno == EBADF ? -EBADF : -errno;
                                goto fail;
                        }
                        l->fds[l->n_fds] = d;
                }
        }
        if (o->next_seq == 0)
                o->next_seq = 1;
        l->seq = o->next_seq++;
        if (o->tail)
                o->tail->next = l;
        else
                o->head = l;
        o->tail = l;
        if (ret_seq)
                *ret_seq = l->seq;
        return 0;

fail:
        frame_line_free(l);
        return r;
}

int client_frame_out_flush(struct client_frame_out *o, int fd) {
        while (o->head) {
                VHU_SCM_BUF(control, CLIENT_FRAME_MAX_FDS);
                struct client_frame_line *l = o->head;
                struct iovec iov = { .iov_base = l->buf + l->off, .iov_len = l->len - l->off };
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
                ssize_t n;

                if (l->off == 0)
                        vhu_scm_attach(&mh, control.buf, sizeof(control.buf), l->fds, l->n_fds);
                n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN || errno == EWOULDBLOCK)
                                return 1;
                        return -errno;
                }
                if (l->fds) {
                        /* the kernel holds its copies from the first byte on */
                        close_fds(l->fds, l->n_fds);
                        free(l->fds);
                        l->fds = NULL;
                        l->n_fds = 0;
                }
                l->off += (size_t)n;
                if (l->off < l->len)
                        continue;
                o->head = l->next;
                if (!o->head)
                        o->tail = NULL;
                o->sent_seq = l->seq;
                frame_line_free(l);
        }
        return 0;
}

bool client_frame_out_pending(const struct client_frame_out *o) {
        return o->head != NULL;
}

int client_frame_out_drop(struct client_frame_out *o, uint64_t seq) {
        struct client_frame_line *prev = NULL;

        for (struct client_frame_line *l = o->head; l; prev = l, l = l->next) {
                if (l->seq != seq)
                        continue;
                if (l->off > 0)
                        return -EBUSY;
                if (prev)
                        prev->next = l->next;
                else
                        o->head = l->next;
                if (o->tail == l)
                        o->tail = prev;
                frame_line_free(l);
                return 0;
        }
        return -ENOENT;
}

void client_frame_out_done(struct client_frame_out *o) {
        while (o->head) {
                struct client_frame_line *l = o->head;

                o->head = l->next;
                frame_line_free(l);
        }
        o->tail = NULL;
}
