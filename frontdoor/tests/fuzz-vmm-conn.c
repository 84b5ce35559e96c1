/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target: a hostile VMM on the front door.  The input is written,
 * chunk by chunk with real fds, into a socketpair whose other end is a
 * vhub_vmm_conn on a libevent loop (frontdoor/vhub-vmm-conn.c), the same
 * transport vhubd puts in front of every VMM; a face answers what it is
 * handed (at once, or late and in reverse order), opens the VMM's back-end
 * channel on whatever fd SET_BACKEND_REQ_FD brings, and sends a request
 * there; chunks can also go to that channel as the VMM's "replies".
 *
 * Input layout:
 *   bytes 0..7  protocol features the face offers (host byte order)
 *   byte 8      mode: bit 0 answer late, in reverse order; bit 1 at most 2
 *               requests pending; bit 2 acks say failure (1)
 *   then chunks: ctl, length (2 bytes, little endian), bytes
 *     ctl bits 0..3: fds attached to the chunk's first byte (eventfds and
 *                    memfds in turn; more than 8 is a violation)
 *     ctl bit 4:     the chunk goes to the back-end channel instead (the
 *                    newest socket the VMM sent)
 *     ctl bit 5:     the VMM shuts its writing side after the chunk
 *     ctl bit 6:     the loop runs until idle before the next chunk
 *     ctl bit 7:     the fds are sockets (the VMM keeps their peers)
 *
 * Invariants (abort on violation): every request handed over is valid for
 * the protocol features acked so far, never beyond the offer; it carries an
 * answer id exactly when vhu_request_expects_reply() says the VMM waits,
 * of the kind the request wants; every reply the VMM reads is VERSION|REPLY
 * and answers the next answered request in arrival order; the daemon side
 * never blocks; and when everything is freed, every fd the input brought
 * or the face made is closed.
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <dirent.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhu-scm.h"
#include "vhu-socket.h"
#include "vhub-vmm-channel.h"
#include "vhub-vmm-conn.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MODE_LATE        0x1
#define MODE_TIGHT       0x2
#define MODE_ACK_FAILURE 0x4
#define CTL_FDS          0x0f
#define CTL_CHANNEL      0x10
#define CTL_SHUT         0x20
#define CTL_SETTLE       0x40
#define CTL_SOCKETS      0x80
#define MAX_DEFERRED     64
#define MAX_PEERS        16           /* socketpair ends the input's fds left with the VMM */
#define ORDER_CAP        1024

struct fuzz_face {
        struct event_base *base;
        struct vhub_vmm_conn *conn;
        struct vhub_vmm_channel *channel;
        uint64_t offer;
        unsigned mode;
        bool lost;
        uint64_t deferred[MAX_DEFERRED];
        struct vhu_msg *deferred_req[MAX_DEFERRED];
        unsigned n_deferred;
        /* request numbers that got an answer id, in arrival order: the
         * order their replies must come in */
        uint32_t order[ORDER_CAP];
        unsigned order_head, order_count;
        struct vhu_reader vmm_reader;     /* the VMM's: a reply may arrive in parts */
};

static int count_open_fds(void) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;
        int n = 0;

        if (!d)
                abort();
        while ((de = readdir(d)))
                if (de->d_name[0] != '.')
                        n++;
        closedir(d);
        return n - 1;
}

static void face_answer(struct fuzz_face *f, const struct vhu_msg *m, uint64_t id) {
        static const uint8_t zero[VHU_MAX_PAYLOAD];
        const struct vhu_request_info *info = vhu_request_info(VHU_DIR_FRONTEND, m->hdr.request);
        enum vhub_vmm_answer_kind kind = vhub_vmm_conn_answer_kind(f->conn, id);
        int fd = -1, r;

        if (kind == VHUB_VMM_ANSWER_NONE)
                return; /* lost meanwhile: nothing is owed any more */
        if (kind == VHUB_VMM_ANSWER_ACK) {
                r = vhub_vmm_conn_ack(f->conn, id, (f->mode & MODE_ACK_FAILURE) ? 1 : 0);
        } else if (m->hdr.request == VHU_REQ_GET_PROTOCOL_FEATURES) {
                r = vhub_vmm_conn_reply_u64(f->conn, id, f->offer);
        } else if (m->hdr.request == VHU_REQ_GET_CONFIG) {
                r = vhub_vmm_conn_reply(f->conn, id, m->payload.raw, m->hdr.size, NULL, 0);
        } else {
                /* the smallest reply the request allows; an fd where one is due */
                if (m->hdr.request == VHU_REQ_GET_INFLIGHT_FD || m->hdr.request == VHU_REQ_POSTCOPY_ADVISE)
                        fd = memfd_create("fuzz-reply", MFD_CLOEXEC);
                r = vhub_vmm_conn_reply(f->conn, id, zero, info->reply_min_size, &fd, fd >= 0 ? 1 : 0);
                if (fd >= 0)
                        close(fd);
                else if (m->hdr.request == VHU_REQ_GET_INFLIGHT_FD || m->hdr.request == VHU_REQ_POSTCOPY_ADVISE)
                        r = 0; /* out of fds: the harness's problem, not the transport's */
        }
        if (r != 0 && r != -ENOTCONN && r != -ENOMEM && r != -EMFILE)
                abort();
}

static void face_open_channel(struct fuzz_face *f, struct vhu_msg *m);

static void face_on_request(void *userdata, struct vhu_msg *m, uint64_t id) {
        struct fuzz_face *f = userdata;
        uint64_t pf = vhub_vmm_conn_protocol_features(f->conn);
        const char *why = NULL;
        bool expects;

        if (vhu_validate_request(VHU_DIR_FRONTEND, pf, m, &why) != 0 || (pf & ~f->offer))
                abort();
        expects = vhu_request_expects_reply(VHU_DIR_FRONTEND, m->hdr.request, m->hdr.flags, pf);
        if (expects != (id != 0))
                abort();
        if (id) {
                bool own = vhu_request_expects_reply(VHU_DIR_FRONTEND, m->hdr.request,
                                                     m->hdr.flags & ~VHU_FLAG_NEED_REPLY, pf);

                if (vhub_vmm_conn_answer_kind(f->conn, id) !=
                    (own ? VHUB_VMM_ANSWER_REPLY : VHUB_VMM_ANSWER_ACK))
                        abort();
                if (f->order_count == ORDER_CAP)
                        abort(); /* cannot happen: max_pending bounds it */
                f->order[(f->order_head + f->order_count++) % ORDER_CAP] = m->hdr.request;
        }
        if (m->hdr.request == VHU_REQ_SET_BACKEND_REQ_FD)
                face_open_channel(f, m);
        if (!id)
                return;
        if ((f->mode & MODE_LATE) && f->n_deferred < MAX_DEFERRED) {
                struct vhu_msg *copy = malloc(sizeof(*copy));

                if (!copy)
                        abort();
                *copy = *m;
                vhu_msg_forget_fds(copy); /* only its header and payload are needed */
                f->deferred[f->n_deferred] = id;
                f->deferred_req[f->n_deferred++] = copy;
                return;
        }
        face_answer(f, m, id);
}

static void face_on_lost(void *userdata, const char *reason) {
        struct fuzz_face *f = userdata;

        if (f->lost || !reason || !reason[0])
                abort();
        f->lost = true;
}

static void channel_on_answer(void *userdata, uint32_t tag, uint32_t request, struct vhu_msg *reply) {
        if (reply && (reply->hdr.flags != (VHU_VERSION | VHU_FLAG_REPLY) || reply->hdr.request != request))
                abort();
}

static void channel_on_lost(void *userdata, bool timeout, const char *reason) {
        struct fuzz_face *f = userdata;

        f->channel = vhub_vmm_channel_free(f->channel);
}

static const struct vhub_vmm_channel_ops channel_ops = {
        .on_answer = channel_on_answer,
        .on_lost = channel_on_lost,
};

/* The VMM's back-end channel, on whatever fd came; a request goes out. */
static void face_open_channel(struct fuzz_face *f, struct vhu_msg *m) {
        struct vhu_msg req;
        bool ack;
        int fd = vhu_msg_take_fd(m, 0);

        if (fd < 0)
                abort(); /* the validator lets SET_BACKEND_REQ_FD through only with its fd */
        f->channel = vhub_vmm_channel_free(f->channel);
        if (vhub_vmm_channel_new(f->base, fd, 1000, 4, &channel_ops, f, &f->channel) < 0)
                return;
        vhub_vmm_channel_set_protocol_features(f->channel, vhub_vmm_conn_protocol_features(f->conn));
        ack = vhub_vmm_conn_protocol_features(f->conn) & VHU_PF_BIT(VHU_PF_REPLY_ACK);
        vhu_msg_init(&req);
        req.hdr = (struct vhu_header){ VHU_BREQ_CONFIG_CHANGE_MSG,
                                       VHU_VERSION | (ack ? VHU_FLAG_NEED_REPLY : 0), 0 };
        (void)vhub_vmm_channel_send(f->channel, &req, 1);
}

static void face_answer_deferred(struct fuzz_face *f) {
        while (f->n_deferred > 0) {
                unsigned i = --f->n_deferred;

                if (f->conn)
                        face_answer(f, f->deferred_req[i], f->deferred[i]);
                free(f->deferred_req[i]);
        }
}

/* What the VMM reads: replies in the order their requests came. */
static void vmm_drain(struct fuzz_face *f, int vmm) {
        struct vhu_msg r;
        int k;

        for (;;) {
                vhu_msg_init(&r);
                k = vhu_reader_read(&f->vmm_reader, vmm, &r);

                if (k == -EPROTO)
                        abort(); /* the daemon side framed an answer wrongly */
                if (k != 1)
                        break;
                if (r.hdr.flags != (VHU_VERSION | VHU_FLAG_REPLY) || f->order_count == 0 ||
                    r.hdr.request != f->order[f->order_head])
                        abort();
                f->order_head = (f->order_head + 1) % ORDER_CAP;
                f->order_count--;
                vhu_msg_clear(&r);
        }
}

static int unread_bytes(int fd) {
        int n = 0;

        return ioctl(fd, FIONREAD, &n) < 0 ? 0 : n;
}

/* Run the loop until the daemon side has nothing more to do now. */
static void settle(struct fuzz_face *f, int conn_end, int vmm) {
        for (int round = 0; round < 64; round++) {
                int before = unread_bytes(conn_end);

                event_base_loop(f->base, EVLOOP_NONBLOCK);
                vmm_drain(f, vmm);
                if (f->lost || unread_bytes(conn_end) == 0 || unread_bytes(conn_end) == before)
                        break;
        }
        event_base_loop(f->base, EVLOOP_NONBLOCK);
        vmm_drain(f, vmm);
}

static int make_fd(bool sockets, unsigned turn, int *peers, unsigned *n_peers) {
        int sv[2];

        if (sockets && *n_peers < MAX_PEERS &&
            socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) == 0) {
                peers[(*n_peers)++] = sv[1];
                return sv[0];
        }
        if (turn % 2)
                return memfd_create("fuzz", MFD_CLOEXEC);
        return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

/* One chunk, all of it or as much as the daemon side takes. */
static bool send_chunk(struct fuzz_face *f, int to, int conn_end, int vmm, const uint8_t *p, size_t len,
                       const int *fds, unsigned n_fds) {
        VHU_SCM_BUF(control, 16);
        bool fds_sent = false;

        while (len > 0) {
                struct iovec iov = { .iov_base = (void *)p, .iov_len = len };
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
                ssize_t n;

                if (!fds_sent)
                        vhu_scm_attach(&mh, control.buf, sizeof(control.buf), fds, n_fds);
                n = sendmsg(to, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n > 0) {
                        fds_sent = true;
                        p += n;
                        len -= (size_t)n;
                        continue;
                }
                if (n < 0 && errno != EAGAIN)
                        return false;
                /* full: let the daemon side read, unless it stopped reading */
                {
                        int before = unread_bytes(conn_end);

                        settle(f, conn_end, vmm);
                        if (f->lost || unread_bytes(conn_end) == before)
                                return false;
                }
        }
        return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct vhub_vmm_conn_limits limits;
        struct fuzz_face f;
        int peers[MAX_PEERS];
        unsigned n_peers = 0, fd_turn = 0;
        int sv[2], baseline;
        bool vmm_shut = false;

        if (size < 9)
                return 0;
        baseline = count_open_fds();
        memset(&f, 0, sizeof(f));
        vhu_reader_init(&f.vmm_reader);
        memcpy(&f.offer, data, 8);
        f.mode = data[8];
        data += 9;
        size -= 9;
        f.base = event_base_new();
        if (!f.base || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                abort();
        if (fcntl(sv[1], F_SETFL, O_NONBLOCK) < 0)
                abort();
        vhub_vmm_conn_limits_default(&limits);
        if (f.mode & MODE_TIGHT)
                limits.max_pending = 2;
        {
                static const struct vhub_vmm_conn_ops ops = {
                        .on_request = face_on_request,
                        .on_lost = face_on_lost,
                };
                int conn_fd = fcntl(sv[0], F_DUPFD_CLOEXEC, 3);

                /* the harness keeps sv[0] to see what is left unread */
                if (conn_fd < 0 || vhub_vmm_conn_new(f.base, conn_fd, &limits, &ops, &f, &f.conn) < 0)
                        abort();
        }
        vhub_vmm_conn_offer_protocol_features(f.conn, f.offer);

        while (size >= 3 && !f.lost) {
                unsigned ctl = data[0], n_fds = ctl & CTL_FDS;
                size_t len = (size_t)data[1] | ((size_t)data[2] << 8);
                int fds[CTL_FDS];
                bool ok;
                int to;

                data += 3;
                size -= 3;
                if (len > size)
                        len = size;
                for (unsigned i = 0; i < n_fds; i++) {
                        fds[i] = make_fd(ctl & CTL_SOCKETS, fd_turn++, peers, &n_peers);
                        if (fds[i] < 0)
                                abort();
                }
                to = sv[1];
                if ((ctl & CTL_CHANNEL) && n_peers > 0)
                        to = peers[n_peers - 1]; /* the newest socket the VMM handed over */
                ok = !(to == sv[1] && vmm_shut) &&
                     send_chunk(&f, to, sv[0], sv[1], data, len, fds, n_fds);
                for (unsigned i = 0; i < n_fds; i++)
                        close(fds[i]); /* the kernel holds the sent copies */
                data += len;
                size -= len;
                if (ctl & CTL_SHUT) {
                        shutdown(to, SHUT_WR);
                        if (to == sv[1])
                                vmm_shut = true;
                }
                if (ctl & CTL_SETTLE || !ok) {
                        settle(&f, sv[0], sv[1]);
                        face_answer_deferred(&f);
                        settle(&f, sv[0], sv[1]);
                }
                if (!ok && to == sv[1])
                        break;
        }
        /* late answers let paused reading go on: until nothing is left */
        settle(&f, sv[0], sv[1]);
        for (int round = 0; round < 64 && f.n_deferred > 0; round++) {
                face_answer_deferred(&f);
                settle(&f, sv[0], sv[1]);
        }
        face_answer_deferred(&f);

        f.channel = vhub_vmm_channel_free(f.channel);
        f.conn = vhub_vmm_conn_free(f.conn);
        event_base_free(f.base);
        vhu_reader_reset(&f.vmm_reader);
        for (unsigned i = 0; i < n_peers; i++)
                close(peers[i]);
        close(sv[0]);
        close(sv[1]);
        if (count_open_fds() != baseline)
                abort(); /* an fd the input brought, or the face made, leaked */
        return 0;
}
