/* SPDX-License-Identifier: MIT */
/*
 * Non-blocking vhost-user socket I/O with SCM_RIGHTS (see vhu-socket.h).
 *
 * A sender attaches a message's fds to its first byte.  On a SOCK_STREAM
 * AF_UNIX socket the kernel never hands out the fds of a later sendmsg()
 * together with bytes of an earlier one, but it will hand them out with the
 * first byte we read of the next message -- so the reader never asks for
 * more than the rest of the current header or payload.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "vhu-fd.h"
#include "vhu-socket.h"
#include "vhu-scm.h"

struct vhu_writer_item {
        struct vhu_writer_item *next;
        size_t len;        /* encoded bytes */
        size_t off;        /* bytes already sent */
        int fds[VHU_MAX_FDS];
        unsigned n_fds;    /* dup'd fds, closed once the item is sent or dropped */
        bool fds_sent;
        uint8_t data[];
};

void vhu_reader_init(struct vhu_reader *r) {
        vhu_msg_init(&r->msg);
        r->got = 0;
}

void vhu_reader_foreach_fd(const struct vhu_reader *r, vhu_fd_fn fn, void *userdata) {
        for (unsigned i = 0; i < r->msg.n_fds && i < VHU_MAX_FDS; i++)
                if (r->msg.fds[i] >= 0)
                        fn(r->msg.fds[i], "in", userdata);
}

void vhu_reader_reset(struct vhu_reader *r) {
        vhu_msg_clear(&r->msg);
        r->got = 0;
}

/* Move the finished message into ret and start the next one. */
static void reader_complete(struct vhu_reader *r, struct vhu_msg *ret) {
        ret->hdr = r->msg.hdr;
        memcpy(ret->payload.raw, r->msg.payload.raw, r->msg.hdr.size);
        memcpy(ret->fds, r->msg.fds, sizeof(ret->fds));
        ret->n_fds = r->msg.n_fds;
        ret->fds_borrowed = false; /* the caller's now */

        for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                r->msg.fds[i] = -1;
        r->msg.n_fds = 0;
        r->got = 0;
}

int vhu_reader_read_hint(struct vhu_reader *r, int sockfd, struct vhu_msg *ret, uint32_t min_payload) {
        int err;

        if (min_payload > VHU_MAX_PAYLOAD)
                min_payload = VHU_MAX_PAYLOAD;
        for (;;) {
                struct vhu_scm_received fds;
                struct iovec iov[2];
                size_t got_before = r->got, iovlen = 1;
                ssize_t n;

                if (r->got < VHU_HEADER_SIZE) {
                        iov[0].iov_base = (uint8_t *) &r->msg.hdr + r->got;
                        iov[0].iov_len = VHU_HEADER_SIZE - r->got;
                        /* a payload at least this long follows: take it in the
                         * same call without reaching into the next message */
                        if (min_payload > 0) {
                                iov[1].iov_base = r->msg.payload.raw;
                                iov[1].iov_len = min_payload;
                                iovlen = 2;
                        }
                } else {
                        size_t payload_got = r->got - VHU_HEADER_SIZE;

                        if (payload_got == r->msg.hdr.size) {
                                reader_complete(r, ret);
                                return 1;
                        }
                        iov[0].iov_base = r->msg.payload.raw + payload_got;
                        iov[0].iov_len = r->msg.hdr.size - payload_got;
                }

                /* spec: fds ride on a message's first byte, at most 8; any
                 * other fd is a protocol error (and closed by the helper) */
                n = vhu_scm_recv(sockfd, iov, iovlen, VHU_MAX_FDS, r->msg.fds + r->msg.n_fds,
                                 got_before == 0 ? VHU_MAX_FDS - r->msg.n_fds : 0, &fds);
                if (n == -EAGAIN)
                        return -EAGAIN;
                if (n < 0) {
                        err = (int) n;
                        goto fail;
                }
                r->msg.n_fds += fds.n_fds;
                if (fds.n_closed > 0 || fds.truncated) {
                        err = -EPROTO;
                        goto fail;
                }

                if (n == 0) {
                        if (r->got == 0)
                                return 0;
                        err = -ECONNRESET;
                        goto fail;
                }

                r->got += (size_t) n;
                if (got_before < VHU_HEADER_SIZE && r->got >= VHU_HEADER_SIZE &&
                    (r->msg.hdr.size > VHU_MAX_PAYLOAD ||
                     /* shorter than the caller promised: the read went past it */
                     r->got - VHU_HEADER_SIZE > r->msg.hdr.size)) {
                        err = -EPROTO;
                        goto fail;
                }
        }

fail:
        vhu_reader_reset(r);
        return err;
}

int vhu_reader_read(struct vhu_reader *r, int sockfd, struct vhu_msg *ret) {
        return vhu_reader_read_hint(r, sockfd, ret, 0);
}

void vhu_writer_init(struct vhu_writer *w) {
        w->head = w->tail = NULL;
        w->n_items = 0;
        w->n_bytes = 0;
        w->n_fds = 0;
}

void vhu_conn_foreach_fd(int sockfd, const struct vhu_reader *r, const struct vhu_writer *w, vhu_fd_fn fn,
                         void *userdata) {
        if (sockfd >= 0)
                fn(sockfd, NULL, userdata);
        vhu_reader_foreach_fd(r, fn, userdata);
        vhu_writer_foreach_fd(w, fn, userdata);
}

static struct vhu_writer_item *writer_item_free(struct vhu_writer_item *item) {
        if (!item)
                return NULL;
        vhu_close_many(item->fds, item->n_fds);
        free(item);
        return NULL;
}

static void writer_pop(struct vhu_writer *w) {
        struct vhu_writer_item *item = w->head;

        w->head = item->next;
        if (!w->head)
                w->tail = NULL;
        w->n_items--;
        w->n_bytes -= item->len - item->off;
        w->n_fds -= item->n_fds;
        writer_item_free(item);
}

void vhu_writer_clear(struct vhu_writer *w) {
        while (w->head)
                writer_pop(w);
        vhu_writer_init(w);
}

bool vhu_writer_pending(const struct vhu_writer *w) {
        return w->head != NULL;
}

void vhu_writer_foreach_fd(const struct vhu_writer *w, vhu_fd_fn fn, void *userdata) {
        for (const struct vhu_writer_item *item = w->head; item; item = item->next)
                for (unsigned i = 0; i < item->n_fds; i++)
                        if (item->fds[i] >= 0)
                                fn(item->fds[i], "out", userdata);
}

/* A message the writer can put on the wire: in bounds, every fd valid. */
static int writer_check_msg(const struct vhu_msg *m) {
        if (m->hdr.size > VHU_MAX_PAYLOAD || m->n_fds > VHU_MAX_FDS)
                return -EINVAL;
        for (unsigned i = 0; i < m->n_fds; i++)
                if (m->fds[i] < 0)
                        return -EINVAL;
        return 0;
}

/* A new queue item of len bytes (contents unset), holding no fds. */
static struct vhu_writer_item *writer_item_new(size_t len) {
        struct vhu_writer_item *item = malloc(sizeof(*item) + len);

        if (!item)
                return NULL;
        *item = (struct vhu_writer_item) { .next = NULL, .len = len };
        for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                item->fds[i] = -1;
        return item;
}

/* Put item at the tail of the queue; the writer owns it from now on. */
static void writer_link(struct vhu_writer *w, struct vhu_writer_item *item) {
        if (w->tail)
                w->tail->next = item;
        else
                w->head = item;
        w->tail = item;
        w->n_items++;
        w->n_bytes += item->len;
        w->n_fds += item->n_fds;
}

int vhu_writer_queue(struct vhu_writer *w, const struct vhu_msg *m) {
        struct vhu_writer_item *item;
        size_t len;
        int r;

        if ((r = writer_check_msg(m)) < 0)
                return r;
        len = vhu_msg_wire_size(m);
        if (!(item = writer_item_new(len)))
                return -ENOMEM;
        if (vhu_msg_encode(m, item->data, len) != len) {
                r = -EINVAL;
                goto fail;
        }

        /* Dup now: the caller keeps its fds and may close them at once. */
        for (unsigned i = 0; i < m->n_fds; i++) {
                item->fds[i] = fcntl(m->fds[i], F_DUPFD_CLOEXEC, 3);
                if (item->fds[i] < 0) {
                        r = -errno;
                        goto fail;
                }
                item->n_fds = i + 1;
        }
        writer_link(w, item);
        return 0;

fail:
        writer_item_free(item);
        return r;
}

/* Queue bytes whose fds (if any) already went out. */
static int writer_append_raw(struct vhu_writer *w, const uint8_t *data, size_t len) {
        struct vhu_writer_item *item = writer_item_new(len);

        if (!item)
                return -ENOMEM;
        memcpy(item->data, data, len);
        writer_link(w, item);
        return 0;
}

int vhu_writer_send(struct vhu_writer *w, int sockfd, const struct vhu_msg *m) {
        uint8_t buf[VHU_HEADER_SIZE + VHU_MAX_PAYLOAD];
        VHU_SCM_BUF(control, VHU_MAX_FDS);
        struct msghdr mh = { 0 };
        struct iovec iov;
        size_t len;
        ssize_t n;
        int r;

        /* behind queued bytes: keep the order */
        if (w->head) {
                r = vhu_writer_queue(w, m);
                return r < 0 ? r : vhu_writer_flush(w, sockfd);
        }
        if ((r = writer_check_msg(m)) < 0)
                return r;
        len = vhu_msg_wire_size(m);
        if (vhu_msg_encode(m, buf, sizeof(buf)) != len)
                return -EINVAL;
        iov = (struct iovec){ .iov_base = buf, .iov_len = len };
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        vhu_scm_attach(&mh, control.buf, sizeof(control.buf), m->fds, m->n_fds);
        do
                n = sendmsg(sockfd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n == (ssize_t)len)
                return 0; /* the common case: no copy, no dup */
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
                return -errno;
        if (n <= 0) {
                /* nothing went: queue it all (dups the fds) */
                r = vhu_writer_queue(w, m);
                return r < 0 ? r : -EAGAIN;
        }
        /* part went, with the fds on its first byte: queue the rest */
        r = writer_append_raw(w, buf + n, len - (size_t)n);
        return r < 0 ? r : -EAGAIN;
}

int vhu_writer_flush(struct vhu_writer *w, int sockfd) {
        while (w->head) {
                struct vhu_writer_item *item = w->head;
                VHU_SCM_BUF(control, VHU_MAX_FDS);
                struct msghdr mh = { 0 };
                struct iovec iov = {
                        .iov_base = item->data + item->off,
                        .iov_len = item->len - item->off,
                };
                bool with_fds = item->n_fds > 0 && !item->fds_sent;
                ssize_t n;

                mh.msg_iov = &iov;
                mh.msg_iovlen = 1;
                if (with_fds)
                        vhu_scm_attach(&mh, control.buf, sizeof(control.buf), item->fds, item->n_fds);

                n = sendmsg(sockfd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN || errno == EWOULDBLOCK)
                                return -EAGAIN;
                        return -errno;
                }
                if (n == 0)
                        return -EAGAIN; /* nothing taken: wait for writability */

                /* The fds went with the first byte of this chunk: the
                 * kernel holds its own copies from here on, the dups are
                 * not needed (nor counted) any more */
                if (with_fds) {
                        item->fds_sent = true;
                        vhu_close_many(item->fds, item->n_fds);
                        w->n_fds -= item->n_fds;
                        item->n_fds = 0;
                }
                item->off += (size_t) n;
                w->n_bytes -= (size_t) n;
                if (item->off == item->len)
                        writer_pop(w);
        }
        return 0;
}

static int64_t now_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for events on fd until deadline_ms (< 0: forever).  0, -ETIMEDOUT, -errno. */
static int wait_fd(int fd, short events, int64_t deadline_ms) {
        for (;;) {
                struct pollfd pfd = { .fd = fd, .events = events };
                int timeout = -1;
                int n;

                if (deadline_ms >= 0) {
                        int64_t left = deadline_ms - now_ms();

                        if (left <= 0)
                                return -ETIMEDOUT;
                        timeout = left > INT32_MAX ? INT32_MAX : (int) left;
                }
                n = poll(&pfd, 1, timeout);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n > 0)
                        return 0; /* readable, writable, or an error the next call reports */
        }
}

static int64_t deadline_from(int timeout_ms) {
        return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

int vhu_send_msg_blocking(int sockfd, const struct vhu_msg *m, int timeout_ms) {
        struct vhu_writer w;
        int64_t deadline = deadline_from(timeout_ms);
        int r;

        vhu_writer_init(&w);
        r = vhu_writer_queue(&w, m);
        if (r < 0)
                goto out;
        for (;;) {
                r = vhu_writer_flush(&w, sockfd);
                if (r != -EAGAIN)
                        break;
                r = wait_fd(sockfd, POLLOUT, deadline);
                if (r < 0)
                        break;
        }
out:
        vhu_writer_clear(&w);
        return r;
}

int vhu_recv_msg_blocking(int sockfd, struct vhu_msg *ret, int timeout_ms) {
        struct vhu_reader r;
        int64_t deadline = deadline_from(timeout_ms);
        int k;

        vhu_reader_init(&r);
        for (;;) {
                k = vhu_reader_read(&r, sockfd, ret);
                if (k != -EAGAIN)
                        break;
                k = wait_fd(sockfd, POLLIN, deadline);
                if (k < 0)
                        break;
        }
        /* A timeout mid-message drops what arrived (and closes its fds). */
        vhu_reader_reset(&r);
        return k;
}
