/* SPDX-License-Identifier: MIT */
/*
 * control/vhub-frame.c on its own, over real socketpairs: lines and the fd
 * FIFO in, the policy results (fds no message can claim, a line over the
 * limit, more fds than the FIFO holds), chunks, sequence numbers and
 * taking a line back out; no fd leaks.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-check.h"
#include "vhub-frame.h"
#include "vhu-scm.h"

static void pair(int sv[2]) {
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) == 0);
}

/* Send bytes with n fresh eventfds on their first byte (closed here after). */
static void send_with_fds(int fd, const char *bytes, unsigned n) {
        VHU_SCM_BUF(control, 16);
        struct iovec iov = { (void *)bytes, strlen(bytes) };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        int fds[16];

        CHECK(n <= 16);
        for (unsigned i = 0; i < n; i++)
                CHECK((fds[i] = eventfd(0, EFD_CLOEXEC)) >= 0);
        vhu_scm_attach(&mh, control.buf, sizeof(control.buf), fds, n);
        CHECK(sendmsg(fd, &mh, MSG_NOSIGNAL) == (ssize_t)strlen(bytes));
        for (unsigned i = 0; i < n; i++)
                close(fds[i]);
}

static void expect_line(struct vhub_frame_in *f, const char *want) {
        const char *line;
        size_t len;

        CHECK_EQ(vhub_frame_in_next_line(f, &line, &len), 1);
        CHECK_EQ(len, strlen(want));
        CHECK(memcmp(line, want, len) == 0);
}

static void test_in_lines_and_fds(void) {
        struct vhub_frame_in f;
        unsigned got;
        int sv[2], *fds;

        pair(sv);
        vhub_frame_in_init(&f, 64, 8);
        CHECK_EQ(vhub_frame_in_read(&f, sv[0], &got), -EAGAIN);
        send_with_fds(sv[1], "{\"a\":1}\n{\"fds\":2", 2);
        CHECK_EQ(vhub_frame_in_read(&f, sv[0], &got), 16);
        CHECK_EQ(got, 2);
        expect_line(&f, "{\"a\":1}");
        CHECK_EQ(vhub_frame_in_next_line(&f, &(const char *){ NULL }, &(size_t){ 0 }), 0);
        CHECK_EQ(vhub_frame_in_check(&f), 0); /* the fds belong to the partial line */
        send_with_fds(sv[1], "}\n", 0);
        CHECK(vhub_frame_in_read(&f, sv[0], NULL) == 2);
        expect_line(&f, "{\"fds\":2}");
        CHECK_EQ(vhub_frame_in_take_fds(&f, 3, &fds), -EBADMSG);
        CHECK_EQ(vhub_frame_in_take_fds(&f, 2, &fds), 0);
        CHECK(fcntl(fds[0], F_GETFD) >= 0 && fcntl(fds[1], F_GETFD) >= 0);
        close(fds[0]);
        close(fds[1]);
        free(fds);
        CHECK_EQ(vhub_frame_in_check(&f), 0);
        /* fds with a complete line and nothing after: no message can claim them */
        send_with_fds(sv[1], "{}\n", 1);
        CHECK(vhub_frame_in_read(&f, sv[0], NULL) == 3);
        expect_line(&f, "{}");
        CHECK_EQ(vhub_frame_in_check(&f), -EBADMSG);
        vhub_frame_in_drop_fds(&f);
        CHECK_EQ(vhub_frame_in_queued_fds(&f), 0);
        close(sv[1]);
        CHECK_EQ(vhub_frame_in_read(&f, sv[0], NULL), 0); /* EOF */
        vhub_frame_in_done(&f);
        close(sv[0]);
        printf("ok: lines and the fd FIFO\n");
}

/* A framer of these bounds reading from sv[0] of a new socketpair. */
static void bounds_open(struct vhub_frame_in *f, int sv[2], size_t max_line, unsigned max_fds) {
        pair(sv);
        vhub_frame_in_init(f, max_line, max_fds);
}

static void bounds_close(struct vhub_frame_in *f, int sv[2]) {
        vhub_frame_in_done(f);
        close(sv[0]);
        close(sv[1]);
}

static void test_in_bounds(void) {
        struct vhub_frame_in f;
        unsigned got = 0;
        int sv[2];

        /* more fds than the FIFO holds: those that fit stay queued, the rest closed */
        bounds_open(&f, sv, 64, 3);
        send_with_fds(sv[1], "x", 5);
        CHECK_EQ(vhub_frame_in_read(&f, sv[0], &got), -ENOBUFS);
        CHECK_EQ(got, 3);
        CHECK_EQ(vhub_frame_in_queued_fds(&f), 3);
        bounds_close(&f, sv);

        /* a line over the limit: check() says so, and a full buffer is refused */
        bounds_open(&f, sv, 8, 4);
        CHECK(write(sv[1], "0123456789abcdef", 16) == 16);
        CHECK(vhub_frame_in_read(&f, sv[0], NULL) == 9); /* max_line + 1 */
        CHECK_EQ(vhub_frame_in_next_line(&f, &(const char *){ NULL }, &(size_t){ 0 }), 0);
        CHECK_EQ(vhub_frame_in_check(&f), -EMSGSIZE);
        CHECK_EQ(vhub_frame_in_read(&f, sv[0], NULL), -EMSGSIZE);
        bounds_close(&f, sv);

        /* exactly max_line bytes and the newline: accepted */
        bounds_open(&f, sv, 8, 4);
        CHECK(write(sv[1], "01234567\n", 9) == 9);
        CHECK(vhub_frame_in_read(&f, sv[0], NULL) == 9);
        expect_line(&f, "01234567");
        CHECK_EQ(vhub_frame_in_check(&f), 0);
        bounds_close(&f, sv);
        printf("ok: bounds\n");
}

/* The partial line's length, before and after the complete lines were
 * taken, and with lines held back (as a paused connection's are). */
static void test_in_partial(void) {
        struct vhub_frame_in f;

        vhub_frame_in_init(&f, 64, 4);
        CHECK_EQ(vhub_frame_in_partial_bytes(&f), 0);
        CHECK_EQ(vhub_frame_in_push(&f, "abc", 3), 0);
        CHECK_EQ(vhub_frame_in_partial_bytes(&f), 3);
        CHECK_EQ(vhub_frame_in_push(&f, "\nde\nfgh", 7), 0);
        CHECK_EQ(vhub_frame_in_pending_bytes(&f), 10);
        CHECK_EQ(vhub_frame_in_partial_bytes(&f), 3);   /* lines held: only "fgh" */
        expect_line(&f, "abc");
        CHECK_EQ(vhub_frame_in_partial_bytes(&f), 3);
        expect_line(&f, "de");
        CHECK_EQ(vhub_frame_in_next_line(&f, &(const char *){ NULL }, &(size_t){ 0 }), 0);
        CHECK_EQ(vhub_frame_in_partial_bytes(&f), 3);
        CHECK_EQ(vhub_frame_in_push(&f, "ij", 2), 0);
        CHECK_EQ(vhub_frame_in_partial_bytes(&f), 5);   /* scanned already: not searched again */
        CHECK_EQ(vhub_frame_in_push(&f, "\n", 1), 0);
        CHECK_EQ(vhub_frame_in_partial_bytes(&f), 0);
        expect_line(&f, "fghij");
        CHECK_EQ(vhub_frame_in_pending_bytes(&f), 0);
        CHECK_EQ(vhub_frame_in_partial_bytes(&f), 0);
        vhub_frame_in_done(&f);
        printf("ok: partial\n");
}

static void queue_json(struct vhub_frame_out *o, const char *text, const int *fds, unsigned n,
                       uint64_t *ret_seq) {
        json_t *msg = json_loads(text, 0, NULL);
        struct iovec line;
        char *p;

        CHECK(msg);
        CHECK_EQ(vhub_frame_encode(msg, &p, &line.iov_len), 0);
        line.iov_base = p;
        CHECK_EQ(vhub_frame_out_queue(o, &line, 1, fds, n, ret_seq), 0);
        free(p);
        json_decref(msg);
}

static void read_all(int fd, char *buf, size_t size, int *ret_fd) {
        struct vhu_scm_received got;
        struct iovec iov = { buf, size - 1 };
        ssize_t n = vhu_scm_recv(fd, &iov, 1, 4, ret_fd, ret_fd ? 1 : 0, &got);

        CHECK(n > 0);
        buf[n] = '\0';
        if (ret_fd)
                CHECK_EQ(got.n_fds, 1);
}

static void test_out(void) {
        struct vhub_frame_out o;
        uint64_t s1, s2, s3;
        char buf[256];
        int sv[2], efd, rfd = -1;

        pair(sv);
        /* a line per chunk: one not started can be taken back */
        vhub_frame_out_init(&o, false);
        queue_json(&o, "{\"n\":1}", NULL, 0, &s1);
        queue_json(&o, "{\"n\":2}", NULL, 0, &s2);
        queue_json(&o, "{\"n\":3}", NULL, 0, &s3);
        CHECK(s1 == 1 && s2 == 2 && s3 == 3);
        CHECK_EQ(o.bytes, 3 * 8);
        CHECK_EQ(vhub_frame_out_drop(&o, s2), 0);
        CHECK_EQ(vhub_frame_out_drop(&o, s2), -ENOENT);
        CHECK_EQ(o.bytes, 2 * 8);
        CHECK_EQ(vhub_frame_out_flush(&o, sv[0]), 0);
        CHECK(!vhub_frame_out_pending(&o));
        CHECK_EQ(o.sent_seq, 3);
        CHECK_EQ(o.bytes, 0);
        CHECK_EQ(vhub_frame_out_drop(&o, s1), -ENOENT);
        read_all(sv[1], buf, sizeof(buf), NULL);
        CHECK(strcmp(buf, "{\"n\":1}\n{\"n\":3}\n") == 0);

        /* fds ride on their line's first byte; the caller's copy may go at once */
        CHECK((efd = eventfd(0, EFD_CLOEXEC)) >= 0);
        queue_json(&o, "{\"fds\":1}", &efd, 1, NULL);
        close(efd);
        CHECK_EQ(o.n_fds, 1);
        CHECK_EQ(vhub_frame_out_flush(&o, sv[0]), 0);
        CHECK_EQ(o.n_fds, 0);
        read_all(sv[1], buf, sizeof(buf), &rfd);
        CHECK(strcmp(buf, "{\"fds\":1}\n") == 0);
        CHECK(rfd >= 0 && fcntl(rfd, F_GETFD) >= 0);
        close(rfd);
        CHECK_EQ(vhub_frame_out_queue(&o, NULL, 0, &(int){ -1 }, 1, NULL), -EBADF);
        vhub_frame_out_done(&o);

        /* coalesced: a line queued alone has an allocation of its size;
         * small lines behind it share a chunk, which cannot give one back */
        vhub_frame_out_init(&o, true);
        queue_json(&o, "[1]", NULL, 0, &s1);
        CHECK(o.head == o.tail);
        queue_json(&o, "[2]", NULL, 0, &s2);
        CHECK(o.head != o.tail);
        queue_json(&o, "[3]", NULL, 0, &s3);
        CHECK_EQ(vhub_frame_out_drop(&o, s3), -EBUSY); /* shares [2]'s chunk */
        CHECK_EQ(vhub_frame_out_flush(&o, sv[0]), 0);
        CHECK_EQ(o.sent_seq, s3);
        read_all(sv[1], buf, sizeof(buf), NULL);
        CHECK(strcmp(buf, "[1]\n[2]\n[3]\n") == 0);

        /* a peer gone: -EPIPE, never SIGPIPE */
        close(sv[1]);
        queue_json(&o, "[3]", NULL, 0, NULL);
        CHECK_EQ(vhub_frame_out_flush(&o, sv[0]), -EPIPE);
        vhub_frame_out_done(&o);
        close(sv[0]);
        printf("ok: output\n");
}

/* A planned restart carries what was not written: the rest of a line
 * partly written first, byte for byte, and the next process queues it
 * before its own lines; output with fds is not carried. */
static void test_out_carry(void) {
        enum { BIG = 300000 };
        const size_t total = BIG + 1 + 2 * 8;
        struct vhub_frame_out o, next;
        char *big = malloc(BIG), *got = malloc(total + 1), *unsent = NULL;
        struct iovec part = { big, BIG };
        size_t have = 0;
        int sv[2], efd, r;
        ssize_t n;

        CHECK(big && got);
        memset(big, 'a', BIG);
        pair(sv);
        vhub_frame_out_init(&o, true);
        CHECK_EQ(vhub_frame_out_unsent(&o, &unsent), 0);
        CHECK(unsent == NULL);
        CHECK_EQ(vhub_frame_out_queue(&o, &part, 1, NULL, 0, NULL), 0);
        queue_json(&o, "{\"n\":2}", NULL, 0, NULL);
        /* the socket takes part of the big line: the process stops here */
        CHECK_EQ(vhub_frame_out_flush(&o, sv[0]), 1);
        n = vhub_frame_out_unsent(&o, &unsent);
        CHECK(n > 8 && (size_t)n == o.bytes && (size_t)n < BIG + 1 + 8);
        vhub_frame_out_done(&o);
        /* the next process: the carried bytes, then its own line */
        vhub_frame_out_init(&next, true);
        CHECK_EQ(vhub_frame_out_queue_raw(&next, unsent, (size_t)n), 0);
        free(unsent);
        queue_json(&next, "{\"n\":3}", NULL, 0, NULL);
        do {
                ssize_t k;

                r = vhub_frame_out_flush(&next, sv[0]);
                CHECK(r >= 0);
                while ((k = recv(sv[1], got + have, total - have, MSG_DONTWAIT)) > 0)
                        have += (size_t)k;
        } while (r == 1 || have < total);
        CHECK_EQ(have, total);
        for (size_t i = 0; i < BIG; i++)
                CHECK(got[i] == 'a');
        got[total] = '\0';
        CHECK(strcmp(got + BIG, "\n{\"n\":2}\n{\"n\":3}\n") == 0);
        vhub_frame_out_done(&next);

        vhub_frame_out_init(&o, true);
        CHECK((efd = eventfd(0, EFD_CLOEXEC)) >= 0);
        queue_json(&o, "{\"fds\":1}", &efd, 1, NULL);
        close(efd);
        CHECK_EQ(vhub_frame_out_unsent(&o, &unsent), -EBUSY);
        CHECK(unsent == NULL);
        vhub_frame_out_done(&o);
        close(sv[0]);
        close(sv[1]);
        free(big);
        free(got);
        printf("ok: output carried across a restart (the rest of a line partly written first)\n");
}

int main(void) {
        void (*const tests[])(void) = { test_in_lines_and_fds, test_in_bounds, test_in_partial, test_out,
                                                test_out_carry };
        const int open_before = vhub_count_open_fds();

        for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++)
                tests[i]();
        CHECK_EQ(vhub_count_open_fds(), open_before); /* nothing leaked */
        printf("PASS: test-vhub-frame\n");
        return 0;
}
