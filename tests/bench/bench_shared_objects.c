/* SPDX-License-Identifier: MIT */
/*
 * The C side of the shared-object benchmark (bench_shared_objects.py drives it).
 *
 *   bench-shared-objects pingpong HOPS N BURST PERIOD_MS
 *       The raw baseline: a 28-byte request (a SHARED_OBJECT_LOOKUP's header and
 *       UUID) over a socketpair to a forked peer that answers 20 bytes (header
 *       and u64) with a memfd attached.  HOPS 2 puts a relay in between that
 *       asks a second peer (28 bytes out, 28 bytes + fd back, as GET_SHARED_OBJECT)
 *       and forwards the fd: the shape of a device-exported lookup.
 *
 *   bench-shared-objects backend SOCKET
 *       A vhost-user back-end (just enough for vhubd's handshake: REPLY_ACK,
 *       BACKEND_REQ, BACKEND_SEND_FD, SHARED_OBJECT) listening on SOCKET.
 *       Commands on stdin, one answer line (JSON) each on stdout:
 *         export UUID                      SHARED_OBJECT_ADD of a 4 KiB memfd
 *         lookup UUID N BURST PERIOD_MS    N lookups on the channel
 *         quit
 *
 * Both timed loops use the same code (rt_send/rt_recv: one sendmsg, one
 * recvmsg per message), so the only difference is what sits on the other
 * end.  Lookups run in bursts of BURST back to back, a burst starting every
 * PERIOD_MS: vhubd treats more than 2000 channel requests per second as a
 * flood, so a burst stays under that and the pause lets the window pass.
 * Output: {"n", "min_ns", "median_ns", "p99_ns", "mean_ns", "rate"} where rate
 * is lookups per second while a burst runs (one lookup in flight).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vhost-user.h"
#include "vhu-message.h"
#include "vhu-scm.h"
#include "vhu-socket.h"

#define REQ_SIZE   (VHU_HEADER_SIZE + 16)
#define REPLY_SIZE (VHU_HEADER_SIZE + 8)
#define MAX_EXPORTS 16
#define OFFERED_PF                                                                         \
        (VHU_PF_BIT(VHU_PF_REPLY_ACK) | VHU_PF_BIT(VHU_PF_BACKEND_REQ) |                  \
         VHU_PF_BIT(VHU_PF_BACKEND_SEND_FD) | VHU_PF_BIT(VHU_PF_SHARED_OBJECT))

static uint64_t now_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
        fprintf(stderr, "bench-shared-objects: %s: %s\n", what, strerror(errno));
        exit(1);
}

static int memfd_4k(void) {
        int fd = memfd_create("bench-shared-object", MFD_CLOEXEC);

        if (fd < 0 || ftruncate(fd, 4096) < 0)
                die("memfd");
        return fd;
}

/* ---- the timed I/O: one sendmsg / recvmsg per message ---- */

static int rt_send(int sock, const void *buf, size_t len, int fd) {
        VHU_SCM_BUF(u, 1);
        struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        ssize_t n;

        if (fd >= 0)
                vhu_scm_attach(&mh, u.buf, sizeof(u.buf), &fd, 1);
        do
                n = sendmsg(sock, &mh, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        return n == (ssize_t)len ? 0 : -1;
}

/* Exactly len bytes; the first fd that comes with them in *ret_fd (or -1).
 * 0 on success, 1 on EOF before anything, -1 on error. */
static int rt_recv(int sock, void *buf, size_t len, int *ret_fd) {
        size_t got = 0;

        if (ret_fd)
                *ret_fd = -1;
        while (got < len) {
                VHU_SCM_BUF(u, VHU_MAX_FDS);
                struct iovec iov = { .iov_base = (char *)buf + got, .iov_len = len - got };
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                                     .msg_controllen = sizeof(u.buf) };
                ssize_t n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return n == 0 && got == 0 ? 1 : -1;
                for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                                continue;
                        int nfd = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                        for (int i = 0; i < nfd; i++) {
                                int fd;

                                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                                if (ret_fd && *ret_fd < 0)
                                        *ret_fd = fd;
                                else
                                        close(fd);
                        }
                }
                got += (size_t)n;
        }
        return 0;
}

/* ---- the measured loop (the importer's side of both) ---- */

static int cmp_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

        return x < y ? -1 : x > y;
}

/* One lookup: 0, or -1 (a failed reply or I/O). */
static int lookup_once(int sock, const uint8_t req[REQ_SIZE]) {
        uint8_t reply[REPLY_SIZE];
        struct vhu_header h;
        uint64_t value;
        int fd;

        if (rt_send(sock, req, REQ_SIZE, -1) < 0 || rt_recv(sock, reply, REPLY_SIZE, &fd) != 0)
                return -1;
        memcpy(&h, reply, sizeof(h));
        memcpy(&value, reply + VHU_HEADER_SIZE, sizeof(value));
        if (fd >= 0)
                close(fd);
        if (h.request != VHU_BREQ_SHARED_OBJECT_LOOKUP || h.flags != (VHU_VERSION | VHU_FLAG_REPLY) ||
            h.size != 8 || value != 0 || fd < 0)
                return -1;
        return 0;
}

static void run_loop(int sock, const uint8_t uuid[16], unsigned n, unsigned burst, unsigned period_ms,
                     bool report) {
        uint8_t req[REQ_SIZE];
        struct vhu_header h = { .request = VHU_BREQ_SHARED_OBJECT_LOOKUP,
                                .flags = VHU_VERSION | VHU_FLAG_NEED_REPLY, .size = 16 };
        uint64_t *lat = calloc(n ? n : 1, sizeof(*lat)), busy = 0, sum = 0;
        unsigned done = 0, failed = 0;

        if (!lat)
                die("calloc");
        memcpy(req, &h, sizeof(h));
        memcpy(req + VHU_HEADER_SIZE, uuid, 16);
        while (done < n && !failed) {
                uint64_t start = now_ns();
                unsigned k;

                for (k = 0; k < burst && done < n; k++) {
                        uint64_t t0 = now_ns();

                        if (lookup_once(sock, req) < 0) {
                                failed++;
                                break;
                        }
                        lat[done++] = now_ns() - t0;
                }
                busy += now_ns() - start;
                if (done < n && period_ms) {
                        uint64_t next = start + (uint64_t)period_ms * 1000000u, t = now_ns();

                        if (next > t) {
                                struct timespec ts = { .tv_sec = (time_t)((next - t) / 1000000000u),
                                                       .tv_nsec = (long)((next - t) % 1000000000u) };
                                nanosleep(&ts, NULL);
                        }
                }
        }
        if (!report) {
                free(lat);
                return;
        }
        if (failed || done == 0) {
                printf("{\"ok\":false,\"error\":\"lookup %u failed\"}\n", done);
                free(lat);
                return;
        }
        for (unsigned i = 0; i < done; i++)
                sum += lat[i];
        qsort(lat, done, sizeof(*lat), cmp_u64);
        printf("{\"ok\":true,\"n\":%u,\"min_ns\":%llu,\"median_ns\":%llu,\"p99_ns\":%llu,"
               "\"mean_ns\":%llu,\"rate\":%.0f}\n",
               done, (unsigned long long)lat[0], (unsigned long long)lat[done / 2],
               (unsigned long long)lat[(size_t)done * 99 / 100], (unsigned long long)(sum / done),
               (double)done * 1e9 / (double)busy);
        free(lat);
}

/* ---- pingpong: the raw baseline ---- */

static void echo_peer(int sock) {
        uint8_t req[REQ_SIZE], reply[REPLY_SIZE] = { 0 };
        struct vhu_header h = { .request = VHU_BREQ_SHARED_OBJECT_LOOKUP,
                                .flags = VHU_VERSION | VHU_FLAG_REPLY, .size = 8 };
        int mfd = memfd_4k();

        memcpy(reply, &h, sizeof(h));
        while (rt_recv(sock, req, sizeof(req), NULL) == 0)
                if (rt_send(sock, reply, sizeof(reply), mfd) < 0)
                        break;
        _exit(0);
}

/* the exporter's part of a two-hop baseline: 28 bytes in, 28 bytes + fd out */
static void exporter_peer(int sock) {
        uint8_t req[REQ_SIZE];
        int mfd = memfd_4k();

        while (rt_recv(sock, req, sizeof(req), NULL) == 0)
                if (rt_send(sock, req, sizeof(req), mfd) < 0)
                        break;
        _exit(0);
}

/* the front-end's part of a two-hop baseline: ask the exporter, forward its fd */
static void relay_peer(int up, int down) {
        uint8_t req[REQ_SIZE], ans[REQ_SIZE], reply[REPLY_SIZE] = { 0 };
        struct vhu_header h = { .request = VHU_BREQ_SHARED_OBJECT_LOOKUP,
                                .flags = VHU_VERSION | VHU_FLAG_REPLY, .size = 8 };
        int fd;

        memcpy(reply, &h, sizeof(h));
        while (rt_recv(up, req, sizeof(req), NULL) == 0) {
                if (rt_send(down, req, sizeof(req), -1) < 0 || rt_recv(down, ans, sizeof(ans), &fd) != 0)
                        break;
                if (rt_send(up, reply, sizeof(reply), fd) < 0)
                        break;
                close(fd);
        }
        _exit(0);
}

static pid_t fork_peer(void) {
        pid_t pid = fork();

        if (pid < 0)
                die("fork");
        if (pid == 0)
                prctl(PR_SET_PDEATHSIG, SIGKILL);
        return pid;
}

static int cmd_pingpong(unsigned hops, unsigned n, unsigned burst, unsigned period_ms) {
        uint8_t uuid[16] = { 0x5a };
        int sp[2], sp2[2];
        pid_t a, b = -1;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) < 0)
                die("socketpair");
        if (hops == 1) {
                if ((a = fork_peer()) == 0) {
                        close(sp[0]);
                        echo_peer(sp[1]);
                }
        } else {
                if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp2) < 0)
                        die("socketpair");
                if ((b = fork_peer()) == 0) {
                        close(sp[0]);
                        close(sp[1]);
                        close(sp2[0]);
                        exporter_peer(sp2[1]);
                }
                if ((a = fork_peer()) == 0) {
                        close(sp[0]);
                        close(sp2[1]);
                        relay_peer(sp[1], sp2[0]);
                }
                close(sp2[0]);
                close(sp2[1]);
        }
        close(sp[1]);
        run_loop(sp[0], uuid, 200, 200, 0, false); /* warm-up */
        run_loop(sp[0], uuid, n, burst, period_ms, true);
        close(sp[0]);
        waitpid(a, NULL, 0);
        if (b > 0)
                waitpid(b, NULL, 0);
        return 0;
}

/* ---- backend: a minimal vhost-user back-end ---- */

struct export {
        uint8_t uuid[16];
        int fd;
};

struct backend {
        int listen_fd, conn, chan;
        struct vhu_reader reader;
        uint64_t pf;
        struct export exports[MAX_EXPORTS];
        unsigned n_exports;
};

static int reply_u64(struct backend *b, const struct vhu_msg *req, uint64_t v) {
        struct vhu_msg r;

        vhu_msg_build_reply_u64(&r, req, v);
        return vhu_send_msg_blocking(b->conn, &r, 5000);
}

static void drop_conn(struct backend *b) {
        if (b->conn >= 0)
                close(b->conn);
        if (b->chan >= 0)
                close(b->chan);
        b->conn = b->chan = -1;
        vhu_reader_reset(&b->reader);
}

static int handle_frontend(struct backend *b, struct vhu_msg *m) {
        const struct vhu_request_info *info = vhu_request_info(VHU_DIR_FRONTEND, m->hdr.request);
        bool ack = (m->hdr.flags & VHU_FLAG_NEED_REPLY) && (b->pf & VHU_PF_BIT(VHU_PF_REPLY_ACK));

        switch (m->hdr.request) {
        case VHU_REQ_GET_FEATURES:
                return reply_u64(b, m, (UINT64_C(1) << 32) | (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES));
        case VHU_REQ_GET_PROTOCOL_FEATURES:
                return reply_u64(b, m, OFFERED_PF);
        case VHU_REQ_SET_PROTOCOL_FEATURES:
                b->pf = m->payload.u64 & OFFERED_PF;
                ack = (m->hdr.flags & VHU_FLAG_NEED_REPLY) && (b->pf & VHU_PF_BIT(VHU_PF_REPLY_ACK));
                break;
        case VHU_REQ_SET_BACKEND_REQ_FD:
                if (b->chan >= 0)
                        close(b->chan);
                b->chan = vhu_msg_take_fd(m, 0);
                if (b->chan >= 0)
                        (void)fcntl(b->chan, F_SETFL, fcntl(b->chan, F_GETFL) & ~O_NONBLOCK);
                break;
        case VHU_REQ_GET_SHARED_OBJECT: {
                struct vhu_msg r;
                int fd = -1;

                for (unsigned i = 0; i < b->n_exports; i++)
                        if (memcmp(b->exports[i].uuid, m->payload.shared.uuid, 16) == 0)
                                fd = b->exports[i].fd;
                /* as libvhost-user: the UUID echoed, the fd attached */
                vhu_msg_build_reply(&r, m, m->payload.shared.uuid, 16, fd >= 0 ? &fd : NULL, fd >= 0);
                return vhu_send_msg_blocking(b->conn, &r, 5000);
        }
        default:
                if (info && info->reply == VHU_REPLY_ALWAYS)
                        return reply_u64(b, m, 0);
                break;
        }
        return ack ? reply_u64(b, m, 0) : 0;
}

static void serve_conn(struct backend *b) {
        for (;;) {
                struct vhu_msg m;
                int r;

                vhu_msg_init(&m);
                r = vhu_reader_read(&b->reader, b->conn, &m);
                if (r == -EAGAIN)
                        return;
                if (r <= 0 || handle_frontend(b, &m) < 0) {
                        vhu_msg_clear(&m);
                        drop_conn(b);
                        return;
                }
                vhu_msg_clear(&m);
        }
}

static int parse_uuid(const char *s, uint8_t out[16]) {
        unsigned k = 0;

        for (const char *p = s; *p && k < 32; p++) {
                unsigned v;

                if (*p == '-')
                        continue;
                if (sscanf(p, "%1x", &v) != 1)
                        return -1;
                if (k % 2 == 0)
                        out[k / 2] = (uint8_t)(v << 4);
                else
                        out[k / 2] |= (uint8_t)v;
                k++;
        }
        return k == 32 ? 0 : -1;
}

static void cmd_line(struct backend *b, char *line) {
        char verb[16], us[64];
        unsigned n = 0, burst = 0, period = 0;
        uint8_t uuid[16];
        int k = sscanf(line, "%15s %63s %u %u %u", verb, us, &n, &burst, &period);

        if (k >= 1 && strcmp(verb, "quit") == 0)
                exit(0);
        if (k < 2 || parse_uuid(us, uuid) < 0) {
                printf("{\"ok\":false,\"error\":\"bad command\"}\n");
                return;
        }
        if (b->chan < 0) {
                printf("{\"ok\":false,\"error\":\"no back-end channel\"}\n");
                return;
        }
        if (strcmp(verb, "export") == 0 && b->n_exports < MAX_EXPORTS) {
                struct vhu_msg m, r;
                int rr;

                b->exports[b->n_exports].fd = memfd_4k();
                memcpy(b->exports[b->n_exports++].uuid, uuid, 16);
                vhu_msg_build(&m, VHU_DIR_BACKEND, VHU_BREQ_SHARED_OBJECT_ADD, true, uuid, 16, NULL, 0);
                vhu_msg_init(&r);
                rr = vhu_send_msg_blocking(b->chan, &m, 5000);
                if (rr >= 0)
                        rr = vhu_recv_msg_blocking(b->chan, &r, 5000);
                printf("{\"ok\":%s,\"reply\":%lld}\n", rr > 0 && r.payload.u64 == 0 ? "true" : "false",
                       rr > 0 ? (long long)r.payload.u64 : -1LL);
                vhu_msg_clear(&r);
        } else if (strcmp(verb, "lookup") == 0 && k == 5 && n > 0 && burst > 0) {
                run_loop(b->chan, uuid, n, burst, period, true);
        } else
                printf("{\"ok\":false,\"error\":\"bad command\"}\n");
}

static int cmd_backend(const char *path) {
        struct backend b = { .listen_fd = -1, .conn = -1, .chan = -1 };
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char line[256];
        size_t len = 0;

        if (strlen(path) >= sizeof(sa.sun_path)) {
                fprintf(stderr, "bench-shared-objects: socket path too long\n");
                return 2;
        }
        strcpy(sa.sun_path, path);
        unlink(path);
        b.listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (b.listen_fd < 0 || bind(b.listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
            listen(b.listen_fd, 4) < 0)
                die("listen");
        vhu_reader_init(&b.reader);
        setvbuf(stdout, NULL, _IOLBF, 0);
        for (;;) {
                struct pollfd p[2] = {
                        { .fd = b.conn >= 0 ? b.conn : b.listen_fd, .events = POLLIN },
                        { .fd = STDIN_FILENO, .events = POLLIN },
                };

                if (poll(p, 2, -1) < 0) {
                        if (errno == EINTR)
                                continue;
                        die("poll");
                }
                if (p[0].revents) {
                        if (b.conn < 0) {
                                b.conn = accept4(b.listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                                b.pf = 0;
                        } else
                                serve_conn(&b);
                }
                if (p[1].revents) {
                        ssize_t r = read(STDIN_FILENO, line + len, sizeof(line) - 1 - len);
                        char *nl;

                        if (r <= 0)
                                break;
                        len += (size_t)r;
                        line[len] = 0;
                        while ((nl = strchr(line, '\n'))) {
                                *nl = 0;
                                cmd_line(&b, line);
                                memmove(line, nl + 1, len - (size_t)(nl + 1 - line) + 1);
                                len -= (size_t)(nl + 1 - line);
                        }
                        if (len == sizeof(line) - 1)
                                len = 0; /* an overlong line: dropped */
                }
        }
        drop_conn(&b);
        unlink(path);
        return 0;
}

int main(int argc, char **argv) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (argc == 6 && strcmp(argv[1], "pingpong") == 0)
                return cmd_pingpong((unsigned)atoi(argv[2]) == 2 ? 2 : 1, (unsigned)atoi(argv[3]),
                                    (unsigned)atoi(argv[4]), (unsigned)atoi(argv[5]));
        if (argc == 3 && strcmp(argv[1], "backend") == 0)
                return cmd_backend(argv[2]);
        fprintf(stderr, "usage: %s pingpong HOPS N BURST PERIOD_MS | backend SOCKET\n", argv[0]);
        return 2;
}
