/* SPDX-License-Identifier: MIT */
/*
 * Signalling a peer's eventfd without blocking (daemon/vhub-eventfd.c): a
 * blocking eventfd (O_NONBLOCK cleared, as a VMM sharing the description can
 * do) with its counter at 2^64-2 is refused at once with -EAGAIN and left
 * untouched; a peer that fills the counter between the daemon's poll() and
 * its write() (simulated here: poll() is wrapped at link time, and the
 * wrapper plays the peer) cannot hold the write either, thanks to the guard
 * timer; no stray SIGALRM or fd is left behind.  A hang here is the defect
 * (meson's timeout fails the test).
 *
 *   test-vhub-eventfd
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "vhub-check.h"
#include "vhub-eventfd.h"

#define FULL UINT64_C(0xfffffffffffffffe)

/* The peer: fills this eventfd right after the daemon's poll() said it was
 * writable (-1: behave). */
static int fill_after_poll = -1;

int __real_poll(struct pollfd *fds, nfds_t n, int timeout);
int __wrap_poll(struct pollfd *fds, nfds_t n, int timeout);

/* The counter, read (so reset) without blocking: 0 when empty. */
static uint64_t counter(int fd) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        eventfd_t v = 0;

        CHECK(__real_poll(&p, 1, 0) >= 0);
        if (p.revents & POLLIN)
                CHECK_EQ(eventfd_read(fd, &v), 0);
        return v;
}

int __wrap_poll(struct pollfd *fds, nfds_t n, int timeout) {
        int r = __real_poll(fds, n, timeout);

        if (fill_after_poll >= 0) {
                /* it was writable a moment ago; now it is full */
                (void)counter(fill_after_poll);
                CHECK_EQ(eventfd_write(fill_after_poll, FULL), 0);
        }
        return r;
}

static void check_basics(int fd) {
        CHECK_EQ(vhub_eventfd_signal(fd), 0);
        CHECK_EQ(counter(fd), 1);
        for (int i = 0; i < 1000; i++)
                CHECK_EQ(vhub_eventfd_signal(fd), 0);
        CHECK_EQ(counter(fd), 1000);

        /* full and blocking: refused at once, nothing added */
        CHECK_EQ(eventfd_write(fd, FULL), 0);
        CHECK_EQ(vhub_eventfd_signal(fd), -EAGAIN);
        CHECK(counter(fd) == FULL);
        /* one below full: the write fits */
        CHECK_EQ(eventfd_write(fd, FULL - 1), 0);
        CHECK_EQ(vhub_eventfd_signal(fd), 0);
        CHECK(counter(fd) == FULL);
}

int main(void) {
        int fds_before = vhub_count_open_fds();
        struct timespec pause = { .tv_sec = 0, .tv_nsec = 30 * 1000 * 1000 };
        int fd = eventfd(0, EFD_CLOEXEC); /* blocking, as a hostile VMM leaves it */
        int closed;

        CHECK(fd >= 0);
        /* without the guard: the poll() check alone */
        check_basics(fd);

        CHECK_EQ(vhub_eventfd_guard_setup(), 0);
        check_basics(fd);

        /* the peer fills it between poll() and write(): interrupted, -EAGAIN */
        for (int i = 0; i < 20; i++) {
                fill_after_poll = fd;
                CHECK_EQ(vhub_eventfd_signal(fd), -EAGAIN);
                fill_after_poll = -1;
                CHECK(counter(fd) == FULL);
        }
        /* the guard timer is gone: nothing interrupts a later sleep */
        CHECK_EQ(nanosleep(&pause, NULL), 0);
        CHECK_EQ(vhub_eventfd_signal(fd), 0);
        CHECK_EQ(counter(fd), 1);

        /* an fd that is not open */
        closed = dup(fd);
        CHECK(closed >= 0);
        close(closed);
        CHECK_EQ(vhub_eventfd_signal(closed), -EBADF);

        close(fd);
        CHECK_EQ(vhub_count_open_fds(), fds_before);
        printf("ok\n");
        return 0;
}
