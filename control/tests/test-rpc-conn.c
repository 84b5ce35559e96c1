/* SPDX-License-Identifier: MIT */
/*
 * rpc-conn framing tests: a socketpair, a real event_base driven with
 * EVLOOP_NONBLOCK, the test playing the peer on the other end.
 *
 *   test-rpc-conn SCENARIO
 */
#include "rpc-conn.h"
#include "vhu-scm.h"
#include "vhub-check.h"

#include <dirent.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_RECORDED 512

enum on_message_mode {
        MODE_RECORD,            /* keep msg and fds for the test to look at */
        MODE_ECHO,              /* record, and answer {"id":<id>,"result":"ok"} */
        MODE_FREE,              /* record, then rpc_conn_free() the connection */
        MODE_CLOSE,             /* record, answer, then rpc_conn_close_after_flush() */
};

struct recorded {
        json_t *msg;
        struct rpc_fds fds;
};

struct fixture {
        struct event_base *base;
        struct rpc_conn *conn;
        int peer;
        enum on_message_mode mode;

        struct recorded msgs[MAX_RECORDED];
        unsigned n_msgs;

        unsigned n_close;
        char reason[256];
        bool in_message;

        /* peer side input */
        char pin[1 << 16];
        size_t pin_len;
        int pfds[512];
        unsigned n_pfds;

        int fd_count_start;

        unsigned slow_usec;     /* each message takes this long */
        json_int_t pause_id;    /* rpc_conn_pause_input() at the message with this id */

        /* the optional ops */
        unsigned n_eof;
        unsigned n_drained;
        unsigned admit_limit;   /* admit_fds refuses past this many held */
        unsigned n_fds_lost;
        json_int_t fds_lost_id; /* of the last message on_fds_lost got */
};

/* ---- helpers ---------------------------------------------------------- */

/* How many of our fds refer to this inode. */
static int count_fds_with_ino(ino_t ino) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;
        int n = 0;

        CHECK(d);
        while ((de = readdir(d))) {
                struct stat st;
                int fd;

                if (de->d_name[0] == '.')
                        continue;
                fd = atoi(de->d_name);
                if (fd == dirfd(d))
                        continue;
                if (fstat(fd, &st) == 0 && st.st_ino == ino)
                        n++;
        }
        closedir(d);
        return n;
}

static ino_t fd_ino(int fd) {
        struct stat st;

        CHECK(fstat(fd, &st) == 0);
        return st.st_ino;
}

static int make_memfd(const char *content) {
        int fd = memfd_create("rpc-test", MFD_CLOEXEC);

        CHECK(fd >= 0);
        CHECK(write(fd, content, strlen(content)) == (ssize_t) strlen(content));
        return fd;
}

static void check_memfd(int fd, const char *content) {
        char buf[256];
        ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);

        CHECK(n >= 0);
        buf[n] = 0;
        CHECK(strcmp(buf, content) == 0);
}

static void on_message(struct rpc_conn *c, json_t *msg, struct rpc_fds *fds, void *userdata) {
        struct fixture *f = userdata;
        struct recorded *r;

        CHECK(!f->in_message);
        CHECK(f->n_close == 0);
        CHECK(f->n_msgs < MAX_RECORDED);
        f->in_message = true;
        r = &f->msgs[f->n_msgs++];
        r->msg = msg;
        r->fds = *fds;      /* moved to us */
        *fds = (struct rpc_fds) { NULL, 0 };
        if (f->slow_usec)
                usleep(f->slow_usec);
        if (f->pause_id && json_integer_value(json_object_get(msg, "id")) == f->pause_id)
                rpc_conn_pause_input(c);

        if (f->mode == MODE_ECHO || f->mode == MODE_CLOSE) {
                json_t *reply = json_pack("{s:s, s:O, s:s}", "jsonrpc", "2.0", "id",
                                          json_object_get(msg, "id") ?: json_null(),
                                          "result", "ok");

                CHECK(reply);
                CHECK(rpc_conn_send(c, reply, NULL, 0) == 0);
                json_decref(reply);
        }
        if (f->mode == MODE_CLOSE)
                rpc_conn_close_after_flush(c, "bye");
        if (f->mode == MODE_FREE) {
                CHECK(rpc_conn_free(c) == NULL);
                f->conn = NULL;
        }
        /* on_close must not have run from inside us */
        CHECK(f->n_close == 0);
        f->in_message = false;
}

static void on_close(struct rpc_conn *c, const char *reason, void *userdata) {
        struct fixture *f = userdata;

        CHECK(!f->in_message);
        CHECK(c == f->conn);
        f->n_close++;
        CHECK(f->n_close == 1);
        snprintf(f->reason, sizeof(f->reason), "%s", reason);
        /* the usual owner: free right here */
        f->conn = rpc_conn_free(c);
}

static const struct rpc_conn_ops test_ops = {
        .on_message = on_message,
        .on_close = on_close,
};

static void fx_init_ops(struct fixture *f, const struct rpc_conn_limits *limits,
                        const struct rpc_conn_ops *ops) {
        int sv[2];

        memset(f, 0, sizeof(*f));
        f->fd_count_start = vhub_count_open_fds();
        f->base = event_base_new();
        CHECK(f->base);
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        CHECK(rpc_conn_new(f->base, sv[0], limits, ops, f, &f->conn) == 0);
        CHECK(f->conn);
        f->peer = sv[1];
        CHECK(fcntl(f->peer, F_SETFL, O_NONBLOCK) == 0);
}

static void fx_init(struct fixture *f, const struct rpc_conn_limits *limits) {
        fx_init_ops(f, limits, &test_ops);
}

static void fx_fini(struct fixture *f) {
        f->conn = rpc_conn_free(f->conn);
        for (unsigned i = 0; i < f->n_msgs; i++) {
                json_decref(f->msgs[i].msg);
                rpc_fds_clear(&f->msgs[i].fds);
        }
        for (unsigned i = 0; i < f->n_pfds; i++)
                close(f->pfds[i]);
        close(f->peer);
        event_base_free(f->base);
        CHECK(vhub_count_open_fds() == f->fd_count_start);
}

static void pump(struct fixture *f) {
        for (int i = 0; i < 8; i++)
                event_base_loop(f->base, EVLOOP_NONBLOCK);
}

/* Blocking-ish send from the peer: pumps the loop while the socket is full. */
static void peer_send(struct fixture *f, const void *data, size_t len, const int *fds,
                      unsigned n_fds) {
        VHU_SCM_BUF(control, RPC_MAX_FDS_PER_MESSAGE);
        size_t off = 0;

        CHECK(len > 0);
        while (off < len) {
                struct iovec iov = { (char *) data + off, len - off };
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
                ssize_t n;

                if (off == 0)
                        vhu_scm_attach(&mh, control.buf, sizeof(control.buf), fds, n_fds);
                n = sendmsg(f->peer, &mh, MSG_NOSIGNAL);
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                        pump(f);
                        continue;
                }
                if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
                        return;         /* the connection gave up on us */
                CHECK(n > 0);
                off += (size_t) n;
        }
}

static void peer_send_str(struct fixture *f, const char *s) {
        peer_send(f, s, strlen(s), NULL, 0);
}

/* One recvmsg of at most max bytes; fds go to f->pfds.  Returns bytes, 0 on
 * EOF, -EAGAIN when nothing is there. */
static ssize_t peer_recv_some(struct fixture *f, size_t max) {
        VHU_SCM_BUF(control, RPC_MAX_FDS_PER_MESSAGE);
        struct iovec iov = { f->pin + f->pin_len, sizeof(f->pin) - f->pin_len };
        struct msghdr mh = {
                .msg_iov = &iov, .msg_iovlen = 1,
                .msg_control = control.buf, .msg_controllen = sizeof(control.buf),
        };
        ssize_t n;

        if (iov.iov_len > max)
                iov.iov_len = max;
        CHECK(iov.iov_len > 0);
        n = recvmsg(f->peer, &mh, MSG_CMSG_CLOEXEC);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                return -EAGAIN;
        if (n < 0 && errno == ECONNRESET)
                return 0;
        CHECK(n >= 0);
        CHECK(!(mh.msg_flags & MSG_CTRUNC));
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
                unsigned k = (unsigned) ((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));

                CHECK(cm->cmsg_type == SCM_RIGHTS);
                CHECK(f->n_pfds + k <= sizeof(f->pfds) / sizeof(f->pfds[0]));
                memcpy(f->pfds + f->n_pfds, CMSG_DATA(cm), k * sizeof(int));
                f->n_pfds += k;
        }
        f->pin_len += (size_t) n;
        return n;
}

/* Next line from the connection, parsed; pumps the loop until it is there. */
static json_t *peer_read_msg(struct fixture *f) {
        for (int tries = 0; tries < 1000; tries++) {
                char *nl = memchr(f->pin, '\n', f->pin_len);
                ssize_t n;

                if (nl) {
                        size_t len = (size_t) (nl - f->pin);
                        json_error_t err;
                        json_t *msg = json_loadb(f->pin, len, 0, &err);

                        CHECK(msg);
                        memmove(f->pin, nl + 1, f->pin_len - len - 1);
                        f->pin_len -= len + 1;
                        return msg;
                }
                n = peer_recv_some(f, sizeof(f->pin));
                if (n == -EAGAIN)
                        pump(f);
                else
                        CHECK(n > 0);
        }
        CHECK(!"no message from the connection");
        return NULL;
}

static void peer_expect_eof(struct fixture *f) {
        for (int tries = 0; tries < 1000; tries++) {
                ssize_t n = peer_recv_some(f, sizeof(f->pin));

                if (n == 0) {
                        CHECK(f->pin_len == 0);
                        return;
                }
                CHECK(n == -EAGAIN);    /* no stray bytes */
                pump(f);
        }
        CHECK(!"connection not closed");
}

static void check_error(json_t *msg, int code, bool id_null) {
        json_t *err = json_object_get(msg, "error");

        CHECK(json_is_string(json_object_get(msg, "jsonrpc")));
        CHECK(strcmp(json_string_value(json_object_get(msg, "jsonrpc")), "2.0") == 0);
        CHECK(json_is_object(err));
        CHECK(json_integer_value(json_object_get(err, "code")) == code);
        CHECK(json_is_string(json_object_get(err, "message")));
        CHECK(json_is_string(json_object_get(json_object_get(err, "data"), "detail")));
        if (id_null)
                CHECK(json_is_null(json_object_get(msg, "id")));
}

static void expect_error_then_close(struct fixture *f, int code) {
        json_t *m = peer_read_msg(f);

        check_error(m, code, true);
        json_decref(m);
        peer_expect_eof(f);
        pump(f);
        CHECK(f->n_close == 1);
        CHECK(f->conn == NULL);
}

static json_int_t msg_id(const struct recorded *r) {
        return json_integer_value(json_object_get(r->msg, "id"));
}

/* ---- scenarios -------------------------------------------------------- */

static void test_split(void) {
        struct fixture f;
        const char *req = "{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"daemon.info\"}\n";

        fx_init(&f, NULL);
        for (size_t i = 0; req[i]; i++) {
                peer_send(&f, req + i, 1, NULL, 0);
                pump(&f);
                CHECK(f.n_msgs == (req[i + 1] ? 0u : 1u));
        }
        CHECK(msg_id(&f.msgs[0]) == 7);
        CHECK(f.msgs[0].fds.n == 0);
        CHECK(strcmp(json_string_value(json_object_get(f.msgs[0].msg, "method")),
                     "daemon.info") == 0);
        CHECK(f.n_close == 0);
        fx_fini(&f);
}

static void test_many(void) {
        struct fixture f;
        char buf[200 * 64];
        size_t len = 0;

        fx_init(&f, NULL);
        for (int i = 0; i < 200; i++)
                len += (size_t) snprintf(buf + len, sizeof(buf) - len,
                                         "{\"jsonrpc\":\"2.0\",\"id\":%d,\"method\":\"m\"}\n%s",
                                         i, i % 7 == 0 ? "\n \r\n" : "");
        peer_send(&f, buf, len, NULL, 0);
        pump(&f);
        CHECK(f.n_msgs == 200);
        for (unsigned i = 0; i < 200; i++)
                CHECK(msg_id(&f.msgs[i]) == i);
        CHECK(f.n_close == 0);
        fx_fini(&f);
}

static void test_fds_in(void) {
        struct fixture f;
        int a = make_memfd("alpha"), b = make_memfd("bravo"), c = make_memfd("charlie");
        const char *l1 = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\",\"fds\":1}\n";
        const char *l2 = "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"m\",\"fds\":2}\n";
        const char *l3 = "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"m\",\"fds\":0}\n";
        int two[2] = { b, c };

        fx_init(&f, NULL);
        f.fd_count_start -= 3;  /* closed before fx_fini */
        peer_send(&f, l1, strlen(l1), &a, 1);
        peer_send(&f, l2, strlen(l2), two, 2);
        peer_send_str(&f, l3);
        pump(&f);
        CHECK(f.n_msgs == 3);
        CHECK(f.msgs[0].fds.n == 1 && f.msgs[1].fds.n == 2 && f.msgs[2].fds.n == 0);
        CHECK(fd_ino(f.msgs[0].fds.fds[0]) == fd_ino(a));
        CHECK(fd_ino(f.msgs[1].fds.fds[0]) == fd_ino(b));
        CHECK(fd_ino(f.msgs[1].fds.fds[1]) == fd_ino(c));
        check_memfd(f.msgs[0].fds.fds[0], "alpha");
        check_memfd(f.msgs[1].fds.fds[0], "bravo");
        check_memfd(f.msgs[1].fds.fds[1], "charlie");
        /* received fds are close-on-exec */
        CHECK(fcntl(f.msgs[0].fds.fds[0], F_GETFD) & FD_CLOEXEC);
        CHECK(f.n_close == 0);
        close(a);
        close(b);
        close(c);
        fx_fini(&f);
}

/* fds arrive with the first half of a line; the line completes later. */
static void test_fds_partial(void) {
        struct fixture f;
        int a = make_memfd("alpha");
        const char *l = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\",\"fds\":1}\n";
        size_t half = strlen(l) / 2;

        fx_init(&f, NULL);
        f.fd_count_start -= 1;
        peer_send(&f, l, half, &a, 1);
        pump(&f);
        CHECK(f.n_msgs == 0 && f.n_close == 0);
        peer_send(&f, l + half, strlen(l) - half, NULL, 0);
        pump(&f);
        CHECK(f.n_msgs == 1 && f.n_close == 0);
        CHECK(f.msgs[0].fds.n == 1);
        CHECK(fd_ino(f.msgs[0].fds.fds[0]) == fd_ino(a));
        close(a);
        fx_fini(&f);
}

/* Many messages, some with fds, sent in random pieces; each piece carries
 * the fds of every line that starts in it.  Every message must arrive with
 * exactly its own fds. */
static void test_random_split(void) {
        for (unsigned seed = 1; seed <= 20; seed++) {
                enum { N = 150 };
                struct fixture f;
                char *buf = malloc(N * 128);
                size_t start[N + 1], len = 0, off = 0;
                unsigned nfds[N], next_fd_line = 0;
                int fds[N][3];

                CHECK(buf);
                srand(seed);
                fx_init(&f, NULL);
                for (unsigned i = 0; i < N; i++) {
                        nfds[i] = (unsigned) rand() % 4 == 0 ? (unsigned) rand() % 4 : 0;
                        start[i] = len;
                        len += (size_t) snprintf(buf + len, N * 128 - len,
                                                 "{\"jsonrpc\":\"2.0\",\"id\":%u,\"method\":\"m\","
                                                 "\"fds\":%u}\n%s",
                                                 i, nfds[i], rand() % 10 == 0 ? "\n" : "");
                        for (unsigned k = 0; k < nfds[i]; k++) {
                                char content[32];

                                snprintf(content, sizeof(content), "m%u-f%u", i, k);
                                fds[i][k] = make_memfd(content);
                        }
                }
                start[N] = len;
                while (off < len) {
                        size_t piece = 1 + (size_t) rand() % 300;
                        int batch[RPC_MAX_FDS_PER_MESSAGE];
                        unsigned n = 0;

                        if (piece > len - off)
                                piece = len - off;
                        for (; next_fd_line < N && start[next_fd_line] < off + piece;
                             next_fd_line++)
                                for (unsigned k = 0; k < nfds[next_fd_line]; k++)
                                        batch[n++] = fds[next_fd_line][k];
                        peer_send(&f, buf + off, piece, batch, n);
                        off += piece;
                        if (rand() % 3 == 0)
                                pump(&f);
                }
                pump(&f);
                CHECK(f.n_close == 0);
                CHECK(f.n_msgs == N);
                for (unsigned i = 0; i < N; i++) {
                        CHECK(msg_id(&f.msgs[i]) == i);
                        CHECK(f.msgs[i].fds.n == nfds[i]);
                        for (unsigned k = 0; k < nfds[i]; k++) {
                                char content[32];

                                snprintf(content, sizeof(content), "m%u-f%u", i, k);
                                check_memfd(f.msgs[i].fds.fds[k], content);
                                close(fds[i][k]);
                        }
                }
                free(buf);
                fx_fini(&f);
        }
}

static void test_fds_missing(void) {
        struct fixture f;
        int a = make_memfd("alpha"), b = make_memfd("bravo");
        const char *l1 = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\",\"fds\":1}\n"
                         "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"m\",\"fds\":2}";
        const char *l2 = "\n{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"m\"}\n";
        int two[2] = { a, b };

        fx_init(&f, NULL);
        f.fd_count_start -= 2;
        /* two fds queued; message 1 takes one, message 2 wants two */
        peer_send(&f, l1, strlen(l1), two, 2);
        pump(&f);
        CHECK(f.n_msgs == 1 && f.n_close == 0);
        peer_send_str(&f, l2);
        pump(&f);
        CHECK(f.n_msgs == 1);   /* neither message 2 nor what follows it */
        expect_error_then_close(&f, -32600);
        CHECK(strstr(f.reason, "fds"));
        /* b was queued in the connection: closed there; a is with message 1 */
        CHECK(count_fds_with_ino(fd_ino(b)) == 1);
        CHECK(count_fds_with_ino(fd_ino(a)) == 2);
        close(a);
        close(b);
        fx_fini(&f);
}

static void test_fds_unclaimed(void) {
        const char *lines[] = {
                "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\"}\n",     /* no "fds" */
                "\n",                                                   /* blank line */
                "{bad json\n",                                          /* unparseable */
        };

        for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
                struct fixture f;
                int a = make_memfd("alpha");
                json_t *m;

                fx_init(&f, NULL);
                f.fd_count_start -= 1;
                peer_send(&f, lines[i], strlen(lines[i]), &a, 1);
                pump(&f);
                CHECK(f.n_msgs == (i == 0 ? 1u : 0u));
                if (i == 2) {   /* the parse error comes first */
                        m = peer_read_msg(&f);
                        check_error(m, -32700, true);
                        json_decref(m);
                }
                expect_error_then_close(&f, -32600);
                CHECK(count_fds_with_ino(fd_ino(a)) == 1);
                close(a);
                fx_fini(&f);
        }
}

static void test_fds_bad(void) {
        const char *bad[] = { "-1", "254", "1.0", "\"1\"", "null", "true", "[1]",
                              "99999999999999999999" };

        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                struct fixture f;
                char line[200];

                fx_init(&f, NULL);
                snprintf(line, sizeof(line),
                         "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\",\"fds\":%s}\n", bad[i]);
                peer_send_str(&f, line);
                pump(&f);
                CHECK(f.n_msgs == 0);
                /* a too large integer is a parse error in jansson; either way: no message */
                if (strlen(bad[i]) > 10) {
                        json_t *m = peer_read_msg(&f);

                        check_error(m, -32700, true);
                        json_decref(m);
                        CHECK(f.n_close == 0);
                        fx_fini(&f);
                        continue;
                }
                expect_error_then_close(&f, -32600);
                fx_fini(&f);
        }
}

static void test_fds_queue_limit(void) {
        struct rpc_conn_limits l;
        struct fixture f;
        int fds[5];
        const char *partial = "{\"jsonrpc\":\"2.0\",";

        rpc_conn_limits_default(&l);
        l.max_fds_queued = 4;
        for (int i = 0; i < 5; i++)
                fds[i] = make_memfd("x");
        fx_init(&f, &l);
        f.fd_count_start -= 5;
        peer_send(&f, partial, strlen(partial), fds, 4);
        pump(&f);
        CHECK(f.n_close == 0);
        peer_send(&f, "\"id\":1,", 7, fds + 4, 1);
        pump(&f);
        expect_error_then_close(&f, -32600);
        for (int i = 0; i < 5; i++) {
                CHECK(count_fds_with_ino(fd_ino(fds[i])) == 1);
                close(fds[i]);
        }
        fx_fini(&f);
}

static void test_invalid_json(void) {
        const char *bad[] = {
                "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\n",
                "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\"} trailing\n",
                "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\"}{}\n",
                "\xff\xfe\n",
                "nul\0byte\n",
        };
        struct fixture f;

        fx_init(&f, NULL);
        f.mode = MODE_ECHO;
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                json_t *m;

                peer_send(&f, bad[i], i == 4 ? 9 : strlen(bad[i]), NULL, 0);
                peer_send_str(&f, "{\"jsonrpc\":\"2.0\",\"id\":42,\"method\":\"m\"}\n");
                m = peer_read_msg(&f);
                check_error(m, -32700, true);
                json_decref(m);
                m = peer_read_msg(&f);
                CHECK(json_integer_value(json_object_get(m, "id")) == 42);
                CHECK(strcmp(json_string_value(json_object_get(m, "result")), "ok") == 0);
                json_decref(m);
        }
        CHECK(f.n_msgs == sizeof(bad) / sizeof(bad[0]));
        CHECK(f.n_close == 0);
        fx_fini(&f);
}

/* Valid JSON that is no request: -32600, but no framing violation. */
static void test_not_object(void) {
        struct fixture f;
        json_t *m;

        fx_init(&f, NULL);
        f.mode = MODE_ECHO;
        peer_send_str(&f, "42\n\"x\"\n{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\"}\n");
        for (int i = 0; i < 2; i++) {
                m = peer_read_msg(&f);
                check_error(m, -32600, true);
                json_decref(m);
        }
        m = peer_read_msg(&f);
        CHECK(json_integer_value(json_object_get(m, "id")) == 1);
        json_decref(m);
        CHECK(f.n_close == 0);
        fx_fini(&f);
}

static char *make_line(size_t content_len) {
        const char *head = "{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"m\",\"pad\":\"";
        size_t hl = strlen(head);
        char *s = malloc(content_len + 2);

        CHECK(s && content_len > hl + 2);
        memcpy(s, head, hl);
        memset(s + hl, 'a', content_len - hl - 2);
        memcpy(s + content_len - 2, "\"}\n", 4);
        return s;
}

static void test_max_line_ok(void) {
        struct fixture f;
        char *s = make_line(1048576);

        fx_init(&f, NULL);
        CHECK(strlen(s) == 1048577);
        peer_send(&f, s, strlen(s), NULL, 0);
        pump(&f);
        CHECK(f.n_msgs == 1 && f.n_close == 0);
        CHECK(msg_id(&f.msgs[0]) == 5);
        free(s);
        fx_fini(&f);
}

static void test_oversize(void) {
        struct fixture f;
        char *s = make_line(1048577);   /* one byte over, '\n' never seen */

        fx_init(&f, NULL);
        peer_send(&f, s, strlen(s), NULL, 0);
        pump(&f);
        CHECK(f.n_msgs == 0);
        expect_error_then_close(&f, -32600);
        CHECK(strstr(f.reason, "longer"));
        free(s);
        fx_fini(&f);
}

/* Runs the loop for about ms milliseconds of real time (timers). */
static void pump_for(struct fixture *f, unsigned ms) {
        for (unsigned i = 0; i < ms / 5; i++) {
                pump(f);
                usleep(5000);
        }
        pump(f);
}

/* A partial line must be complete line_timeout_ms after its first byte: a
 * line finished in time restarts the clock for the next; one that is not
 * gets -32600 id null and the connection closes. */
static void test_line_timeout(void) {
        struct rpc_conn_limits l;
        struct fixture f;

        rpc_conn_limits_default(&l);
        CHECK(l.line_timeout_ms == 10000);
        l.line_timeout_ms = 300;
        fx_init(&f, &l);
        peer_send_str(&f, "{\"jsonrpc\":\"2.0\",");
        pump_for(&f, 150);
        peer_send_str(&f, "\"id\":1,\"method\":\"x\"}\n{\"jsonrpc\"");  /* the next line starts */
        pump_for(&f, 200);      /* 350 ms after the first byte, 200 after the second line's */
        CHECK(f.n_msgs == 1 && msg_id(&f.msgs[0]) == 1);
        CHECK(f.n_close == 0);
        peer_send_str(&f, ":\"2.0\",\"id\":2,\"method\":\"x\"}\n");
        pump_for(&f, 400);      /* nothing pending: no deadline */
        CHECK(f.n_msgs == 2 && f.n_close == 0);
        peer_send_str(&f, "{\"jsonrpc\":");
        pump_for(&f, 400);
        CHECK(f.n_msgs == 2);
        expect_error_then_close(&f, -32600);
        CHECK(strstr(f.reason, "not complete"));
        fx_fini(&f);
}

static void note_msgs_cb(evutil_socket_t fd, short what, void *userdata) {
        struct fixture *f = userdata;

        f->pin_len = f->n_msgs;  /* borrowed: how many were handed over when it ran */
}

/* One write of lines that take long to handle: a timer due meanwhile runs
 * before the rest of them (the lines of a read are handed over for at most
 * RPC_SLICE_USEC), and every line still arrives, in order. */
static void test_slice(void) {
        static const struct timeval now = { 0, 0 };
        char buf[8192];
        struct event *t;
        struct fixture f;
        size_t len = 0;

        fx_init(&f, NULL);
        f.slow_usec = 1000;     /* 100 lines: 10 slices */
        for (int i = 1; i <= 100; i++)
                len += (size_t)snprintf(buf + len, sizeof(buf) - len,
                                        "{\"jsonrpc\":\"2.0\",\"id\":%d,\"method\":\"x\"}\n", i);
        peer_send(&f, buf, len, NULL, 0);
        t = evtimer_new(f.base, note_msgs_cb, &f);
        CHECK(t && evtimer_add(t, &now) == 0);
        for (int i = 0; i < 1000 && f.n_msgs < 100; i++)
                event_base_loop(f.base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        CHECK(f.n_msgs == 100);
        CHECK(f.pin_len > 0 && f.pin_len < 100);
        f.pin_len = 0;
        for (unsigned i = 0; i < f.n_msgs; i++)
                CHECK(msg_id(&f.msgs[i]) == (json_int_t)i + 1);
        event_free(t);
        fx_fini(&f);
}

/* The owner pauses input inside on_message: nothing more is handed over or
 * read, no partial line's deadline runs, until it resumes -- and then from
 * the loop, not from inside the call. */
static void test_pause(void) {
        struct rpc_conn_limits l;
        struct fixture f;

        rpc_conn_limits_default(&l);
        l.line_timeout_ms = 100;
        fx_init(&f, &l);
        f.pause_id = 2;
        peer_send_str(&f, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\"}\n"
                          "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"x\"}\n"
                          "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"x\"}\n");
        pump(&f);
        CHECK(f.n_msgs == 2);
        peer_send_str(&f, "{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"x\"}\n{\"jsonrpc\"");
        pump_for(&f, 300);
        CHECK(f.n_msgs == 2 && f.n_close == 0);
        rpc_conn_resume_input(f.conn);
        CHECK(f.n_msgs == 2);
        pump(&f);
        CHECK(f.n_msgs == 4 && msg_id(&f.msgs[2]) == 3 && msg_id(&f.msgs[3]) == 4);
        CHECK(f.n_close == 0);
        /* the partial line's deadline runs again */
        pump_for(&f, 300);
        CHECK(f.n_msgs == 4);
        expect_error_then_close(&f, -32600);
        fx_fini(&f);
}

/* A planned restart stops a connection for good: lines a slice held stay
 * held (the slice's resume timer was pending), an owner's resume (a batch
 * that ends) does not hand them over, a partial line's deadline does not
 * close it; what is left is the input the next process carries. */
static void test_stop_reading(void) {
        char buf[8192], rest[8192];
        struct rpc_conn_limits l;
        struct fixture f;
        const char *in;
        size_t len = 0, n;
        unsigned had;

        rpc_conn_limits_default(&l);
        l.line_timeout_ms = 100;
        fx_init(&f, &l);
        f.slow_usec = 1000;     /* 100 lines: 10 slices */
        for (int i = 1; i <= 100; i++)
                len += (size_t)snprintf(buf + len, sizeof(buf) - len,
                                        "{\"jsonrpc\":\"2.0\",\"id\":%d,\"method\":\"x\"}\n", i);
        len += (size_t)snprintf(buf + len, sizeof(buf) - len, "{\"jsonrpc\":");
        peer_send(&f, buf, len, NULL, 0);
        for (int i = 0; i < 1000 && f.n_msgs == 0; i++)
                event_base_loop(f.base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        had = f.n_msgs;
        CHECK(had > 0 && had < 100);
        rpc_conn_stop_reading(f.conn);
        pump_for(&f, 50);
        CHECK(f.n_msgs == had);
        rpc_conn_pause_input(f.conn);
        rpc_conn_resume_input(f.conn);  /* a batch that ends */
        pump_for(&f, 300);              /* past the partial line's deadline */
        CHECK(f.n_msgs == had && f.n_close == 0);
        peer_send_str(&f, "\"2.0\",\"id\":101,\"method\":\"x\"}\n"); /* not read */
        pump_for(&f, 50);
        CHECK(f.n_msgs == had && f.n_close == 0);
        /* the lines not handed over, then the partial one, as read */
        len = 0;
        for (unsigned i = had + 1; i <= 100; i++)
                len += (size_t)snprintf(rest + len, sizeof(rest) - len,
                                        "{\"jsonrpc\":\"2.0\",\"id\":%u,\"method\":\"x\"}\n", i);
        len += (size_t)snprintf(rest + len, sizeof(rest) - len, "{\"jsonrpc\":");
        n = rpc_conn_unhandled_input(f.conn, &in);
        CHECK(n == len && memcmp(in, rest, len) == 0);
        fx_fini(&f);

        /* a partial line whose deadline was running when it stopped */
        fx_init(&f, &l);
        peer_send_str(&f, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\"}\n{\"jsonrpc\":");
        pump(&f);
        CHECK(f.n_msgs == 1);
        rpc_conn_stop_reading(f.conn);
        pump_for(&f, 300);
        CHECK(f.n_msgs == 1 && f.n_close == 0);
        n = rpc_conn_unhandled_input(f.conn, &in);
        CHECK(n == strlen("{\"jsonrpc\":") && memcmp(in, "{\"jsonrpc\":", n) == 0);
        fx_fini(&f);
}

static void on_fds_lost(struct rpc_conn *c, json_t *msg, void *userdata) {
        struct fixture *f = userdata;

        CHECK(!f->in_message);
        f->n_fds_lost++;
        f->fds_lost_id = json_integer_value(json_object_get(msg, "id"));
        json_decref(msg);
}

static const struct rpc_conn_ops restore_ops = {
        .on_message = on_message,
        .on_close = on_close,
        .on_fds_lost = on_fds_lost,
};

/* The next process: the carried input's complete lines are handed over
 * from the loop (nothing new arrives to wake the connection up), never from
 * inside rpc_conn_restore_input(); one that declares fds, which were not
 * carried, goes to on_fds_lost and takes no fd that came later; the
 * partial line is completed by what the peer sends next. */
static void test_restore_input(void) {
        static const char carried[] =
                "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"x\"}\n"
                "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"x\",\"fds\":1}\n"
                "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"x\"}\n"
                "{\"jsonrpc\":\"2.0\",";
        struct fixture f;
        int fd;

        fx_init_ops(&f, NULL, &restore_ops);
        CHECK(rpc_conn_restore_input(f.conn, carried, strlen(carried)) == 0);
        CHECK(f.n_msgs == 0);
        pump(&f);
        CHECK(f.n_msgs == 2 && msg_id(&f.msgs[0]) == 1 && msg_id(&f.msgs[1]) == 3);
        CHECK(f.n_fds_lost == 1 && f.fds_lost_id == 2);
        CHECK(f.n_close == 0);
        fd = make_memfd("later");
        peer_send(&f, "\"id\":4,\"method\":\"x\"}\n{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"x\",\"fds\":1}\n",
                  strlen("\"id\":4,\"method\":\"x\"}\n{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"x\",\"fds\":1}\n"),
                  &fd, 1);
        close(fd);
        pump(&f);
        CHECK(f.n_msgs == 4 && msg_id(&f.msgs[2]) == 4 && msg_id(&f.msgs[3]) == 5);
        CHECK(f.msgs[2].fds.n == 0 && f.msgs[3].fds.n == 1);
        check_memfd(f.msgs[3].fds.fds[0], "later");
        CHECK(f.n_fds_lost == 1 && f.n_close == 0);
        fx_fini(&f);
}

/* The peer never reads: the queue hits its bound, the connection closes,
 * and on_close comes from the loop, not from rpc_conn_send(). */
static void test_out_bound(void) {
        struct rpc_conn_limits l;
        struct fixture f;
        char pad[1024];
        json_t *msg;
        int r = 0, sent = 0;

        memset(pad, 'p', sizeof(pad) - 1);
        pad[sizeof(pad) - 1] = 0;
        msg = json_pack("{s:s, s:s, s:{s:s}}", "jsonrpc", "2.0", "method", "event", "params",
                        "pad", pad);
        CHECK(msg);
        rpc_conn_limits_default(&l);
        fx_init(&f, &l);
        for (; sent < 100000; sent++) {
                r = rpc_conn_send(f.conn, msg, NULL, 0);
                if (r < 0)
                        break;
                CHECK(rpc_conn_queued_bytes(f.conn) <= l.max_out_bytes);
                if (sent % 16 == 0)
                        pump(&f);
        }
        CHECK(r == -ENOBUFS);
        CHECK(sent > (int) (l.max_out_bytes / 2 / sizeof(pad)));
        CHECK(f.n_close == 0);
        CHECK(rpc_conn_is_closing(f.conn));
        CHECK(rpc_conn_send(f.conn, msg, NULL, 0) == -ENOTCONN);
        pump(&f);
        CHECK(f.n_close == 1);
        CHECK(strstr(f.reason, "too slow"));
        json_decref(msg);
        fx_fini(&f);
}

/* Responses with fds: each fd batch arrives with its own line's first byte. */
static void test_fds_out(void) {
        struct fixture f;
        int a = make_memfd("alpha"), b = make_memfd("bravo"), c = make_memfd("charlie");
        json_t *m[4];
        size_t start[4], total = 0;
        unsigned fds_at[4] = { 0 };
        int two[2] = { a, b };
        int base_fds;

        fx_init(&f, NULL);
        f.fd_count_start -= 3;
        m[0] = json_pack("{s:s, s:i, s:s}", "jsonrpc", "2.0", "id", 0, "result", "zero");
        m[1] = json_pack("{s:s, s:i, s:{s:i, s:i}, s:i}", "jsonrpc", "2.0", "id", 1, "result",
                         "a", 0, "b", 1, "fds", 2);
        m[2] = json_pack("{s:s, s:i, s:s}", "jsonrpc", "2.0", "id", 2, "result", "two\nlines");
        m[3] = json_pack("{s:s, s:i, s:{s:i}, s:i}", "jsonrpc", "2.0", "id", 3, "result",
                         "c", 0, "fds", 1);
        for (int i = 0; i < 4; i++)
                CHECK(m[i]);
        base_fds = vhub_count_open_fds();
        /* "fds" must match what is passed */
        CHECK(rpc_conn_send(f.conn, m[1], two, 1) == -EINVAL);
        CHECK(rpc_conn_send(f.conn, m[0], two, 1) == -EINVAL);
        CHECK(rpc_conn_send(f.conn, m[0], NULL, 0) == 0);
        CHECK(rpc_conn_send(f.conn, m[1], two, 2) == 0);
        CHECK(rpc_conn_send(f.conn, m[2], NULL, 0) == 0);
        CHECK(rpc_conn_send(f.conn, m[3], &c, 1) == 0);
        CHECK(vhub_count_open_fds() == base_fds + 3);        /* the dups */
        for (int i = 0; i < 4; i++) {
                char *s = json_dumps(m[i], JSON_COMPACT);

                start[i] = total;
                total += strlen(s) + 1;
                free(s);
        }
        /* read in small pieces and note where fds showed up */
        while (f.pin_len < total) {
                unsigned before = f.n_pfds;
                size_t pos = f.pin_len;
                ssize_t n = peer_recv_some(&f, 5);

                if (n == -EAGAIN) {
                        pump(&f);
                        continue;
                }
                CHECK(n > 0);
                if (f.n_pfds > before) {
                        int which = -1;

                        for (int i = 0; i < 4; i++)
                                if (start[i] >= pos && start[i] < pos + (size_t) n)
                                        which = i;
                        CHECK(which == 1 || which == 3);
                        fds_at[which] = f.n_pfds - before;
                }
        }
        CHECK(f.pin_len == total);
        CHECK(fds_at[1] == 2 && fds_at[3] == 1);
        CHECK(f.n_pfds == 3);
        CHECK(fd_ino(f.pfds[0]) == fd_ino(a));
        CHECK(fd_ino(f.pfds[1]) == fd_ino(b));
        CHECK(fd_ino(f.pfds[2]) == fd_ino(c));
        check_memfd(f.pfds[2], "charlie");
        pump(&f);
        /* the dups are gone, ours are still open, the peer has its own */
        CHECK(vhub_count_open_fds() == base_fds + 3);
        CHECK(rpc_conn_queued_bytes(f.conn) == 0);
        for (int i = 0; i < 4; i++) {
                json_t *r = peer_read_msg(&f);

                CHECK(json_equal(r, m[i]));
                json_decref(r);
                json_decref(m[i]);
        }
        close(a);
        close(b);
        close(c);
        fx_fini(&f);
}

static void test_batch(void) {
        struct fixture f;
        int a = make_memfd("alpha"), b = make_memfd("bravo");
        int two[2] = { a, b };
        const char *batch =
                "[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\",\"fds\":1},"
                "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"m\"},"
                "7,"
                "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"m\",\"fds\":1}]\n"
                "[]\n";
        json_t *arr;

        fx_init(&f, NULL);
        f.fd_count_start -= 2;
        peer_send(&f, batch, strlen(batch), two, 2);
        pump(&f);
        CHECK(f.n_msgs == 2 && f.n_close == 0);
        arr = f.msgs[0].msg;
        CHECK(json_is_array(arr) && json_array_size(arr) == 4);
        CHECK(f.msgs[0].fds.n == 2);
        CHECK(fd_ino(f.msgs[0].fds.fds[0]) == fd_ino(a));
        CHECK(fd_ino(f.msgs[0].fds.fds[1]) == fd_ino(b));
        CHECK(json_is_array(f.msgs[1].msg) && json_array_size(f.msgs[1].msg) == 0);
        CHECK(f.msgs[1].fds.n == 0);
        close(a);
        close(b);
        fx_fini(&f);

        /* a bad "fds" in any element is a violation */
        fx_init(&f, NULL);
        peer_send_str(&f, "[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\"},"
                          "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"m\",\"fds\":-2}]\n");
        pump(&f);
        CHECK(f.n_msgs == 0);
        expect_error_then_close(&f, -32600);
        fx_fini(&f);
}

static void test_fds_take(void) {
        struct rpc_fds fds = { NULL, 0 };
        int start = vhub_count_open_fds();
        int fd;

        CHECK(rpc_fds_take(&fds, 0) == -1);
        CHECK(rpc_fds_take(NULL, 0) == -1);
        rpc_fds_clear(&fds);
        rpc_fds_clear(NULL);

        fds.fds = malloc(3 * sizeof(int));
        CHECK(fds.fds);
        fds.n = 3;
        for (int i = 0; i < 3; i++)
                fds.fds[i] = make_memfd("x");
        CHECK(rpc_fds_take(&fds, 3) == -1);
        CHECK(rpc_fds_take(&fds, 100) == -1);
        fd = rpc_fds_take(&fds, 1);
        CHECK(fd >= 0);
        CHECK(rpc_fds_take(&fds, 1) == -1);     /* already taken */
        rpc_fds_clear(&fds);
        CHECK(fds.fds == NULL && fds.n == 0);
        CHECK(vhub_count_open_fds() == start + 1);   /* only the taken one */
        close(fd);
        CHECK(vhub_count_open_fds() == start);
}

/* on_message frees its own connection: later lines of the same read must
 * not touch it (ASan would see the use after free). */
static void test_reentrant_free(void) {
        const char *two_lines = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\"}\n"
                                "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"m\",\"fds\":1}\n";
        struct fixture f;
        int a = make_memfd("alpha");

        fx_init(&f, NULL);
        f.fd_count_start -= 1;
        f.mode = MODE_FREE;
        peer_send(&f, two_lines, strlen(two_lines), &a, 1);
        pump(&f);
        CHECK(f.n_msgs == 1);
        CHECK(f.conn == NULL);
        CHECK(f.n_close == 0);  /* the owner freed it: no on_close */
        peer_expect_eof(&f);
        CHECK(count_fds_with_ino(fd_ino(a)) == 1);
        close(a);
        fx_fini(&f);
}

static void test_close_after_flush(void) {
        struct fixture f;
        json_t *m;

        fx_init(&f, NULL);
        f.mode = MODE_CLOSE;
        peer_send_str(&f, "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\"}\n"
                          "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"m\"}\n");
        pump(&f);
        CHECK(f.n_msgs == 1);
        m = peer_read_msg(&f);
        CHECK(json_integer_value(json_object_get(m, "id")) == 1);
        json_decref(m);
        peer_expect_eof(&f);
        CHECK(f.n_close == 1);
        CHECK(strcmp(f.reason, "bye") == 0);
        fx_fini(&f);
}

static void test_eof(void) {
        struct fixture f;
        json_t *m;

        /* half close: what was answered still gets out */
        fx_init(&f, NULL);
        f.mode = MODE_ECHO;
        peer_send_str(&f, "{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"m\"}\n{\"partial");
        CHECK(shutdown(f.peer, SHUT_WR) == 0);
        pump(&f);
        CHECK(f.n_msgs == 1);
        m = peer_read_msg(&f);
        CHECK(json_integer_value(json_object_get(m, "id")) == 9);
        json_decref(m);
        peer_expect_eof(&f);
        CHECK(f.n_close == 1);
        CHECK(strcmp(f.reason, "peer closed") == 0);
        fx_fini(&f);

        /* full close with answers queued */
        fx_init(&f, NULL);
        f.mode = MODE_ECHO;
        peer_send_str(&f, "{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":\"m\"}\n");
        pump(&f);
        CHECK(f.n_msgs == 1);
        close(f.peer);
        f.peer = -1;
        pump(&f);
        CHECK(f.n_close == 1);
        CHECK(strcmp(f.reason, "peer closed") == 0);
        fx_fini(&f);
}

static void test_peercred(void) {
        struct fixture f;

        fx_init(&f, NULL);
        CHECK(rpc_conn_peer_uid(f.conn) == getuid());
        CHECK(rpc_conn_peer_gid(f.conn) == getgid());
        CHECK(rpc_conn_peer_pid(f.conn) == getpid());
        CHECK(fcntl(f.peer, F_GETFL) & O_NONBLOCK);
        fx_fini(&f);
}

static void test_bad_socket(void) {
        int start = vhub_count_open_fds();
        struct event_base *base = event_base_new();
        struct rpc_conn *c = NULL;
        int p[2], sv[2];

        CHECK(base);
        CHECK(pipe2(p, O_CLOEXEC) == 0);
        CHECK(rpc_conn_new(base, p[0], NULL, &test_ops, NULL, &c) < 0);
        CHECK(c == NULL);
        close(p[1]);
        CHECK(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv) == 0);
        CHECK(rpc_conn_new(base, sv[0], NULL, &test_ops, NULL, &c) < 0);
        CHECK(c == NULL);
        close(sv[1]);
        event_base_free(base);
        CHECK(vhub_count_open_fds() == start);   /* rpc_conn_new closed what it was given */
}

static void test_send_errors(void) {
        struct fixture f;
        int fds[RPC_MAX_FDS_PER_MESSAGE + 1] = { 0 };
        json_t *msg = json_pack("{s:s, s:i, s:n}", "jsonrpc", "2.0", "id", 1, "result");
        json_t *id = json_integer(77), *data = json_pack("{s:s}", "detail", "why");
        json_t *m;

        CHECK(msg && id && data);
        fx_init(&f, NULL);
        CHECK(rpc_conn_send(f.conn, msg, fds, RPC_MAX_FDS_PER_MESSAGE + 1) == -EINVAL);
        CHECK(rpc_conn_send(f.conn, msg, NULL, 1) == -EINVAL);
        CHECK(json_object_set_new(msg, "fds", json_integer(1)) == 0);
        fds[0] = 9999;
        CHECK(rpc_conn_send(f.conn, msg, fds, 1) == -EBADF);
        CHECK(rpc_conn_queued_bytes(f.conn) == 0);

        CHECK(rpc_conn_send_error(f.conn, id, -32601, "Method not found", data) == 0);
        CHECK(rpc_conn_send_error(f.conn, NULL, -32603, "Internal error", NULL) == 0);
        CHECK(id->refcount == 1 && data->refcount == 1);       /* borrowed, not stolen */
        m = peer_read_msg(&f);
        check_error(m, -32601, false);
        CHECK(json_integer_value(json_object_get(m, "id")) == 77);
        CHECK(strcmp(json_string_value(json_object_get(json_object_get(json_object_get(m,
                     "error"), "data"), "detail")), "why") == 0);
        json_decref(m);
        m = peer_read_msg(&f);
        CHECK(json_is_null(json_object_get(m, "id")));
        CHECK(json_object_get(json_object_get(m, "error"), "data") == NULL);
        json_decref(m);

        rpc_conn_close_after_flush(f.conn, "done");
        CHECK(rpc_conn_is_closing(f.conn));
        CHECK(f.n_close == 0);
        pump(&f);
        CHECK(f.n_close == 1 && strcmp(f.reason, "done") == 0);
        fx_fini(&f);
        json_decref(msg);
        json_decref(id);
        json_decref(data);
}

/* ---- the optional ops: on_eof, admit_fds, on_drained ------------------ */

static void on_eof(struct rpc_conn *c, void *userdata) {
        struct fixture *f = userdata;

        CHECK(!f->in_message);
        f->n_eof++;
}

static int admit_fds(struct rpc_conn *c, unsigned n, char *detail, size_t len, void *userdata) {
        struct fixture *f = userdata;

        CHECK(n > 0);
        if (rpc_conn_fds_held(c) <= f->admit_limit)
                return 0;
        snprintf(detail, len, "%u fds over the test's budget", n);
        return -EMFILE;
}

static void on_drained(struct rpc_conn *c, void *userdata) {
        struct fixture *f = userdata;

        CHECK(rpc_conn_queued_bytes(c) == 0);
        f->n_drained++;
}

static const struct rpc_conn_ops ext_ops = {
        .on_message = on_message,
        .on_close = on_close,
        .on_eof = on_eof,
        .admit_fds = admit_fds,
        .on_drained = on_drained,
};

/* SHUT_WR from the peer: reading stops, the connection stays open for the
 * owner's late answer, and closes when the owner says so. */
static void test_half_close(void) {
        struct fixture f;
        json_t *m, *late;

        fx_init_ops(&f, NULL, &ext_ops);
        peer_send_str(&f, "{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"slow\"}\n{\"partial");
        CHECK(shutdown(f.peer, SHUT_WR) == 0);
        pump(&f);
        CHECK(f.n_msgs == 1 && f.n_eof == 1 && f.n_close == 0);
        CHECK(rpc_conn_read_closed(f.conn) && !rpc_conn_is_closing(f.conn));
        /* the answer comes later, from the owner */
        late = json_pack("{s:s, s:i, s:s}", "jsonrpc", "2.0", "id", 4, "result", "late");
        CHECK(late && rpc_conn_send(f.conn, late, NULL, 0) == 0);
        json_decref(late);
        m = peer_read_msg(&f);
        CHECK(strcmp(json_string_value(json_object_get(m, "result")), "late") == 0);
        json_decref(m);
        CHECK(f.n_close == 0);
        rpc_conn_close_after_flush(f.conn, "answered");
        peer_expect_eof(&f);
        CHECK(f.n_close == 1 && strcmp(f.reason, "answered") == 0);
        fx_fini(&f);

        /* a peer that closed outright is let go without waiting */
        fx_init_ops(&f, NULL, &ext_ops);
        peer_send_str(&f, "{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"slow\"}\n");
        close(f.peer);
        f.peer = -1;
        pump(&f);
        CHECK(f.n_eof == 0 && f.n_close == 1);
        fx_fini(&f);
}

/* admit_fds refuses: -32008 with its detail, every queued fd closed, closed. */
static void test_admit_fds(void) {
        const char *head = "{\"jsonrpc\":\"2.0\",", *more = "\"id\":1,";
        struct fixture f;
        int fds[4];
        json_t *m;

        fx_init_ops(&f, NULL, &ext_ops);
        for (int i = 0; i < 4; i++)
                fds[i] = make_memfd("x");
        f.admit_limit = 3;      /* the socket and two fds */
        peer_send(&f, head, strlen(head), fds, 2);
        pump(&f);
        CHECK(f.n_close == 0);
        peer_send(&f, more, strlen(more), fds + 2, 2);
        pump(&f);
        m = peer_read_msg(&f);
        check_error(m, -32008, true);
        CHECK(strstr(json_string_value(json_object_get(json_object_get(json_object_get(m, "error"),
                                                                       "data"), "detail")),
                     "over the test's budget"));
        json_decref(m);
        peer_expect_eof(&f);
        pump(&f);
        CHECK(f.n_close == 1 && f.conn == NULL);
        for (int i = 0; i < 4; i++)
                close(fds[i]);
        fx_fini(&f);   /* checks that no fd is left */
}

/* Small lines share chunks (memory close to the bytes queued), a line with
 * fds still carries them with its own first byte, send_parts assembles one
 * line, and on_drained follows the queue emptying. */
static void test_out_chunks(void) {
        struct fixture f;
        struct iovec parts[3] = { { (char *) "[1,", 3 }, { (char *) "2", 1 }, { (char *) ",3]", 3 } };
        int fd = make_memfd("chunk");
        json_t *small = json_pack("{s:s, s:s, s:{}}", "jsonrpc", "2.0", "method", "event", "params");
        json_t *withfd = json_pack("{s:s, s:s, s:{s:i}, s:i}", "jsonrpc", "2.0", "method", "event",
                                   "params", "fd", 0, "fds", 1);
        size_t peak, len_small, len_fd;
        char *dump;

        CHECK(small && withfd);
        dump = json_dumps(small, JSON_COMPACT);
        len_small = strlen(dump) + 1;
        free(dump);
        dump = json_dumps(withfd, JSON_COMPACT);
        len_fd = strlen(dump) + 1;
        free(dump);
        fx_init_ops(&f, NULL, &ext_ops);
        for (int i = 0; i < 2000; i++)
                CHECK(rpc_conn_send(f.conn, small, NULL, 0) == 0);
        CHECK(rpc_conn_send(f.conn, withfd, &fd, 1) == 0);
        CHECK(rpc_conn_send_parts(f.conn, parts, 3) == 0);
        CHECK(rpc_conn_send(f.conn, small, NULL, 0) == 0);
        peak = rpc_conn_take_peak_memory(f.conn);
        /* the queue holds the lines' bytes, not an allocation each */
        CHECK(rpc_conn_queued_bytes(f.conn) == 2001 * len_small + len_fd + 8);
        CHECK(peak >= rpc_conn_queued_bytes(f.conn) && peak < 2 * rpc_conn_queued_bytes(f.conn));
        CHECK(rpc_conn_queued_fds(f.conn) == 1);
        for (int i = 0; i < 2000; i++) {
                json_t *m = peer_read_msg(&f);

                CHECK(json_is_object(json_object_get(m, "params")));
                json_decref(m);
        }
        {
                json_t *m = peer_read_msg(&f);

                CHECK(json_integer_value(json_object_get(m, "fds")) == 1);
                CHECK(f.n_pfds == 1);
                check_memfd(f.pfds[0], "chunk");
                json_decref(m);
                m = peer_read_msg(&f);
                CHECK(json_is_array(m) && json_array_size(m) == 3);
                json_decref(m);
                m = peer_read_msg(&f);
                json_decref(m);
        }
        pump(&f);
        CHECK(rpc_conn_queued_bytes(f.conn) == 0 && f.n_drained >= 1);
        json_decref(small);
        json_decref(withfd);
        fx_fini(&f);
        close(fd);      /* made before the fixture counted its fds */
}

static const struct {
        const char *name;
        void (*run)(void);
} scenarios[] = {
        { "half-close", test_half_close },
        { "admit-fds", test_admit_fds },
        { "out-chunks", test_out_chunks },
        { "split", test_split },
        { "many", test_many },
        { "fds-in", test_fds_in },
        { "fds-partial", test_fds_partial },
        { "random-split", test_random_split },
        { "fds-missing", test_fds_missing },
        { "fds-unclaimed", test_fds_unclaimed },
        { "fds-bad", test_fds_bad },
        { "fds-queue-limit", test_fds_queue_limit },
        { "invalid-json", test_invalid_json },
        { "not-object", test_not_object },
        { "max-line-ok", test_max_line_ok },
        { "oversize", test_oversize },
        { "out-bound", test_out_bound },
        { "fds-out", test_fds_out },
        { "batch", test_batch },
        { "fds-take", test_fds_take },
        { "reentrant-free", test_reentrant_free },
        { "close-after-flush", test_close_after_flush },
        { "eof", test_eof },
        { "peercred", test_peercred },
        { "bad-socket", test_bad_socket },
        { "send-errors", test_send_errors },
        { "line-timeout", test_line_timeout },
        { "slice", test_slice },
        { "pause", test_pause },
        { "stop-reading", test_stop_reading },
        { "restore-input", test_restore_input },
};

int main(int argc, char **argv) {
        bool ran = false;

        for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++) {
                if (argc > 1 && strcmp(argv[1], scenarios[i].name) != 0)
                        continue;
                fprintf(stderr, "rpc-conn: %s\n", scenarios[i].name);
                scenarios[i].run();
                ran = true;
        }
        if (!ran) {
                fprintf(stderr, "unknown scenario %s\n", argc > 1 ? argv[1] : "");
                return 2;
        }
        return 0;
}
