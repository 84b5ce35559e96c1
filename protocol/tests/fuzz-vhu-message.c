/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target for the vhost-user message parser, validators and the
 * non-blocking socket reader.
 *
 * Input layout (so the fuzzer also explores fd counts and negotiated
 * features, which travel outside the byte stream):
 *   byte 0      % 10: number of fds sent with each message (one more than a
 *               message may carry); / 10 = m: m & 1 sends each message in
 *               two halves, reading in between; m >> 1 is the reader's
 *               payload hint in units of 16 bytes (0: plain
 *               vhu_reader_read)
 *   bytes 1..8  negotiated protocol features (host byte order)
 *   bytes 9..   vhost-user wire bytes: as many messages as decode
 *
 * Every decoded message is validated as a request of both directions and as
 * a reply to every request.  Invariants checked (abort on violation):
 * decode -> encode gives the same bytes; a rejection always says why; a
 * request the validator accepts is one the builder also accepts, and
 * builds to the same bytes.
 *
 * Then the same bytes go through a socketpair, each message sent with that
 * many real fds on its first byte, and vhu_reader_read() must hand back
 * exactly what vhu_msg_decode() saw (or -EPROTO where the stream breaks the
 * rules), end the stream the way it ends, and close every fd it does not
 * hand over.  Sent in halves, a half message must read as -EAGAIN and the
 * rest complete it; fds on the second half of an odd-numbered message
 * (not its first byte) must be -EPROTO.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhu-message.h"
#include "vhu-scm.h"
#include "vhu-socket.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FAKE_FD_BASE 1000 /* never opened, never closed: validators only count fds */

static uint8_t encode_buf[VHU_HEADER_SIZE + VHU_MAX_PAYLOAD];
static struct vhu_msg msg, built;

static void check_request(enum vhu_direction dir, uint64_t pf, const struct vhu_msg *m,
                          const uint8_t *wire, size_t len) {
        const char *why = NULL;
        int r;

        r = vhu_validate_request(dir, pf, m, &why);
        if (r != 0 && (r != -EPROTO || !why))
                abort();
        if (!vhu_request_name(dir, m->hdr.request))
                abort();
        (void) vhu_request_expects_reply(dir, m->hdr.request, m->hdr.flags, pf);
        if (r != 0)
                return;

        /* Accepted: the builder must agree and produce the same bytes. */
        vhu_msg_init(&built);
        r = vhu_msg_build(&built, dir, m->hdr.request, m->hdr.flags & VHU_FLAG_NEED_REPLY,
                          m->payload.raw, m->hdr.size, m->fds, m->n_fds);
        if (r != 0)
                abort();
        if (vhu_msg_encode(&built, encode_buf, sizeof(encode_buf)) != len ||
            memcmp(encode_buf, wire, len) != 0)
                abort();
        vhu_msg_forget_fds(&built);
}

static void check_as_reply(enum vhu_direction dir, uint64_t pf, const struct vhu_msg *m) {
        uint32_t max = dir == VHU_DIR_FRONTEND ? _VHU_REQ_MAX : _VHU_BREQ_MAX;

        for (uint32_t req = 0; req <= max; req++)
                for (int need = 0; need < 2; need++) {
                        uint32_t flags = VHU_VERSION | (need ? VHU_FLAG_NEED_REPLY : 0);
                        const char *why = NULL;
                        int r;

                        r = vhu_validate_reply(dir, req, flags, pf, m, &why);
                        if (r == 0)
                                continue;
                        if (!why)
                                abort();
                        if (r == -EINVAL && vhu_request_info(dir, req) == NULL)
                                continue;
                        if (r != -EPROTO)
                                abort();
                }
}

/* The socket part sends at most this many messages (the socket buffer holds them all). */
#define SOCKET_MAX_MSGS 32

/* How the input's wire bytes cut into messages. */
struct stream_plan {
        size_t off[SOCKET_MAX_MSGS], len[SOCKET_MAX_MSGS];
        unsigned n;        /* whole messages (the first SOCKET_MAX_MSGS) */
        size_t tail_off, tail_len; /* what follows them: part of a message, or a bad header */
        int tail;          /* how the tail decodes: -EAGAIN or -EPROTO (tail_len 0: nothing) */
};

/* What the sender attaches: copies of one fd, so that sending costs no open(). */
static int fd_source(void) {
        static int fd = -1;

        if (fd < 0)
                fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                abort();
        return fd;
}

/* The number the next fd would get: a leaked fd moves it. */
static int lowest_free_fd(void) {
        int fd = fcntl(fd_source(), F_DUPFD_CLOEXEC, 0);

        if (fd < 0)
                abort();
        close(fd);
        return fd;
}

/* Send all of buf with n_fds copies of fd_source() on its first byte; false if it did not all go. */
static bool send_whole(int sockfd, const uint8_t *buf, size_t len, unsigned n_fds) {
        VHU_SCM_BUF(cbuf, VHU_MAX_FDS + 1);
        struct iovec iov = { .iov_base = (void *) buf, .iov_len = len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        int fds[VHU_MAX_FDS + 1];

        for (unsigned i = 0; i < n_fds; i++)
                fds[i] = fd_source();
        vhu_scm_attach(&mh, cbuf.buf, sizeof(cbuf.buf), fds, n_fds);
        return sendmsg(sockfd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) == (ssize_t) len;
}

static bool same_message(const struct vhu_msg *got, const uint8_t *wire, size_t len,
                         unsigned n_fds) {
        if (vhu_msg_wire_size(got) != len || memcmp(&got->hdr, wire, VHU_HEADER_SIZE) != 0 ||
            memcmp(got->payload.raw, wire + VHU_HEADER_SIZE, len - VHU_HEADER_SIZE) != 0 ||
            got->n_fds != n_fds)
                return false;
        for (unsigned i = 0; i < n_fds; i++)
                if (got->fds[i] < 0 || fcntl(got->fds[i], F_GETFD) != FD_CLOEXEC)
                        return false;
        return true;
}

/*
 * Feed the planned stream through a real socket and read it back with the
 * reader.  hint > 0 reads with vhu_reader_read_hint(): a hint longer than
 * the message may read into the next one, which must be -EPROTO.
 */
static int reader_read(struct vhu_reader *r, int sockfd, struct vhu_msg *m, uint32_t hint) {
        return hint ? vhu_reader_read_hint(r, sockfd, m, hint) : vhu_reader_read(r, sockfd, m);
}

/*
 * Each message in two halves with a read after each: the first half is not
 * a message yet (-EAGAIN), the second completes it.  Odd-numbered messages
 * carry their fds on the second half, which is -EPROTO.  Returns how many
 * messages were read whole; *ended is set once the reader failed.
 */
static unsigned check_halves(const uint8_t *wire, const struct stream_plan *p, unsigned n_fds,
                             uint32_t hint, int sockfd, int peer, struct vhu_reader *reader,
                             bool *ended) {
        struct vhu_msg got;
        unsigned i;

        for (i = 0; i < p->n; i++) {
                size_t cut = p->len[i] / 2;
                bool late_fds = (i & 1) && n_fds > 0;
                int k;

                if (!send_whole(peer, wire + p->off[i], cut, late_fds ? 0 : n_fds))
                        break;
                vhu_msg_init(&got);
                k = reader_read(reader, sockfd, &got, hint);
                vhu_msg_clear(&got);
                if (!late_fds && n_fds > VHU_MAX_FDS) {
                        if (k != -EPROTO)
                                abort();
                        *ended = true;
                        return i;
                }
                if (k != -EAGAIN)
                        abort();
                if (!send_whole(peer, wire + p->off[i] + cut, p->len[i] - cut, late_fds ? n_fds : 0))
                        break;
                vhu_msg_init(&got);
                k = reader_read(reader, sockfd, &got, hint);
                if (late_fds) {
                        vhu_msg_clear(&got);
                        if (k != -EPROTO)
                                abort();
                        *ended = true;
                        return i;
                }
                if (k != 1 || !same_message(&got, wire + p->off[i], p->len[i], n_fds))
                        abort();
                vhu_msg_clear(&got);
        }
        return i;
}

static void check_socket(const uint8_t *wire, const struct stream_plan *p, unsigned n_fds,
                         uint32_t hint, bool halves) {
        int sv[2], sndbuf = 1 << 20, before = lowest_free_fd();
        struct vhu_reader reader;
        struct vhu_msg got;
        unsigned sent = 0;
        bool whole;
        int k = 1;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
                abort();
        (void) setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
        vhu_reader_init(&reader);
        if (halves) {
                bool ended = false;

                sent = check_halves(wire, p, n_fds, hint, sv[1], sv[0], &reader, &ended);
                if (ended)
                        k = 0;
                else if (sent == p->n)
                        k = 1;  /* all read: the end of the stream is checked below */
                else
                        k = 0;  /* the socket buffer is full: nothing more to check */
                whole = k == 1 &&
                        (p->tail_len == 0 || send_whole(sv[0], wire + p->tail_off, p->tail_len, 0));
                shutdown(sv[0], SHUT_WR);
                sent = 0;
        } else {
                while (sent < p->n && send_whole(sv[0], wire + p->off[sent], p->len[sent], n_fds))
                        sent++;
                whole = sent == p->n &&
                        (p->tail_len == 0 || send_whole(sv[0], wire + p->tail_off, p->tail_len, 0));
                shutdown(sv[0], SHUT_WR);
        }

        for (unsigned i = 0; i < sent && k == 1; i++) {
                bool more = i + 1 < sent || p->tail_len > 0;

                vhu_msg_init(&got);
                k = reader_read(&reader, sv[1], &got, hint);
                if (n_fds > VHU_MAX_FDS) {
                        if (k != -EPROTO)
                                abort();
                } else if (hint > p->len[i] - VHU_HEADER_SIZE && more) {
                        if (k != -EPROTO && (k != 1 || !same_message(&got, wire + p->off[i],
                                                                     p->len[i], n_fds)))
                                abort();
                } else if (k != 1 || !same_message(&got, wire + p->off[i], p->len[i], n_fds)) {
                        abort();
                }
                vhu_msg_clear(&got);
        }
        if (k == 1 && whole) {
                /* everything sent was read: the end of the stream decides */
                vhu_msg_init(&got);
                k = reader_read(&reader, sv[1], &got, hint);
                if (k != (p->tail_len == 0 ? 0 : p->tail == -EPROTO ? -EPROTO : -ECONNRESET))
                        abort();
                vhu_msg_clear(&got);
        }
        vhu_reader_reset(&reader);
        close(sv[0]);
        close(sv[1]);
        if (lowest_free_fd() != before)
                abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct stream_plan plan = { .tail = -EAGAIN };
        const uint8_t *wire;
        unsigned n_fds;
        uint32_t hint;
        bool halves;
        uint64_t pf;

        if (size < 9)
                return 0;
        n_fds = data[0] % (VHU_MAX_FDS + 2);
        halves = (data[0] / (VHU_MAX_FDS + 2)) & 1;
        hint = (uint32_t) (data[0] / (VHU_MAX_FDS + 2) / 2) * 16;
        memcpy(&pf, data + 1, sizeof(pf));
        data += 9;
        size -= 9;
        wire = data;

        while (size > 0) {
                int k;

                vhu_msg_init(&msg);
                k = vhu_msg_decode(&msg, data, size);
                if (k == -EAGAIN || k == -EPROTO) {
                        plan.tail = k;
                        break;
                }
                if (k < VHU_HEADER_SIZE || (size_t) k > size)
                        abort();
                if (vhu_msg_encode(&msg, encode_buf, sizeof(encode_buf)) != (size_t) k ||
                    memcmp(encode_buf, data, (size_t) k) != 0)
                        abort();

                /* n_fds may exceed VHU_MAX_FDS: validators must not look past fds[]. */
                for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                        msg.fds[i] = FAKE_FD_BASE + (int) i;
                msg.n_fds = n_fds;

                check_request(VHU_DIR_FRONTEND, pf, &msg, data, (size_t) k);
                check_request(VHU_DIR_BACKEND, pf, &msg, data, (size_t) k);
                check_as_reply(VHU_DIR_FRONTEND, pf, &msg);
                check_as_reply(VHU_DIR_BACKEND, pf, &msg);

                vhu_msg_forget_fds(&msg);
                if (plan.n < SOCKET_MAX_MSGS) {
                        plan.off[plan.n] = (size_t) (data - wire);
                        plan.len[plan.n++] = (size_t) k;
                }
                data += k;
                size -= (size_t) k;
        }
        /* past SOCKET_MAX_MSGS messages the socket part sends no tail: a clean end */
        if (plan.n < SOCKET_MAX_MSGS || size == 0) {
                plan.tail_off = (size_t) (data - wire);
                plan.tail_len = size;
        }
        check_socket(wire, &plan, n_fds, hint, halves);
        return 0;
}
