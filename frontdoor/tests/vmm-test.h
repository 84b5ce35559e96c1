/* SPDX-License-Identifier: MIT */
/*
 * What the front-door transport tests share: driving a libevent loop until
 * something happened (bounded, so a bug hangs nothing), and a fake VMM on
 * the other end of a socketpair that sends requests -- well-formed or not,
 * with real fds -- and reads its answers.
 */
#pragma once

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "vhu-message.h"
#include "vhu-scm.h"
#include "vhu-socket.h"
#include "vhub-check.h"

/* Upper bound for anything a test waits for: a hang fails, it never passes. */
#define TEST_WAIT_MS 10000

static inline uint64_t test_now_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* One turn of the loop: whatever is ready runs, or ~2 ms pass. */
static inline void test_loop_step(struct event_base *base) {
        struct timeval tv = { 0, 2000 };

        event_base_loopexit(base, &tv);
        event_base_loop(base, EVLOOP_ONCE);
}

/* Turn the loop for ms: to let whatever would happen, happen. */
static inline void test_loop_for(struct event_base *base, unsigned ms) {
        uint64_t end = test_now_ms() + ms;

        while (test_now_ms() < end)
                test_loop_step(base);
}

#define LOOP_UNTIL(base, cond)                                                        \
        do {                                                                          \
                uint64_t _end = test_now_ms() + TEST_WAIT_MS;                         \
                while (!(cond)) {                                                     \
                        if (test_now_ms() > _end) {                                   \
                                fprintf(stderr, "%s:%d: gave up waiting for %s\n",    \
                                        __FILE__, __LINE__, #cond);                   \
                                abort();                                              \
                        }                                                             \
                        test_loop_step(base);                                         \
                }                                                                     \
        } while (0)

/* What an fd is, from /proc: "eventfd", "memfd", "socket", or "other". */
static inline const char *test_fd_kind(int fd) {
        char link[64], target[256];
        ssize_t n;

        snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
        n = readlink(link, target, sizeof(target) - 1);
        if (n < 0)
                return "closed";
        target[n] = '\0';
        if (strcmp(target, "anon_inode:[eventfd]") == 0)
                return "eventfd";
        if (strncmp(target, "/memfd:", 7) == 0)
                return "memfd";
        if (strncmp(target, "socket:", 7) == 0)
                return "socket";
        return "other";
}

static inline int test_memfd(size_t size) {
        int fd = memfd_create("vmm-test", MFD_CLOEXEC);

        CHECK(fd >= 0);
        CHECK(ftruncate(fd, (off_t)size) == 0);
        return fd;
}

static inline int test_eventfd(void) {
        int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

        CHECK(fd >= 0);
        return fd;
}

/* The fake VMM: raw bytes with fds on their first byte, no checks at all. */
static inline void vmm_send_raw(int fd, const void *bytes, size_t len, const int *fds, unsigned n_fds) {
        VHU_SCM_BUF(control, 16);
        struct iovec iov = { .iov_base = (void *)bytes, .iov_len = len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

        CHECK(n_fds <= 16);
        vhu_scm_attach(&mh, control.buf, sizeof(control.buf), fds, n_fds);
        CHECK(sendmsg(fd, &mh, MSG_NOSIGNAL) == (ssize_t)len);
}

/* A request as a front-end sends it (or a malformed one: nothing is checked). */
static inline void vmm_send(int fd, uint32_t request, uint32_t flags, const void *payload, uint32_t size,
                            const int *fds, unsigned n_fds) {
        uint8_t buf[VHU_HEADER_SIZE + VHU_MAX_PAYLOAD];
        struct vhu_header hdr = { .request = request, .flags = flags, .size = size };

        CHECK(size <= VHU_MAX_PAYLOAD);
        memcpy(buf, &hdr, sizeof(hdr));
        if (size)
                memcpy(buf + VHU_HEADER_SIZE, payload, size);
        vmm_send_raw(fd, buf, VHU_HEADER_SIZE + size, fds, n_fds);
}

static inline void vmm_send_u64(int fd, uint32_t request, uint32_t flags, uint64_t v) {
        vmm_send(fd, request, flags, &v, sizeof(v), NULL, 0);
}

static inline void vmm_send_state(int fd, uint32_t request, uint32_t flags, uint32_t index, uint32_t num) {
        struct vhu_vring_state s = { .index = index, .num = num };

        vmm_send(fd, request, flags, &s, sizeof(s), NULL, 0);
}

/* The next answer, within TEST_WAIT_MS; its fds are the caller's. */
static inline void vmm_recv(int fd, struct vhu_msg *m) {
        vhu_msg_init(m);
        CHECK_EQ(vhu_recv_msg_blocking(fd, m, TEST_WAIT_MS), 1);
}

/* Nothing waits to be read on fd right now. */
static inline bool vmm_nothing_to_read(int fd) {
        struct pollfd p = { .fd = fd, .events = POLLIN };

        return poll(&p, 1, 0) == 0;
}

/* The peer closed: EOF, or ECONNRESET when it closed with our bytes
 * unread (any bytes before it are read and dropped). */
static inline bool vmm_sees_eof(int fd) {
        char buf[256];
        ssize_t n;

        while ((n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT)) > 0)
                ;
        return n == 0 || (n < 0 && errno == ECONNRESET);
}
