/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "vhub-eventfd.h"

/* The longest a write may wait when the peer fills the counter between our
 * poll() and our write(): the guard timer's signal interrupts it then. */
#define GUARD_NSEC (5 * 1000 * 1000)

static void guard_noop(int sig) {
        (void)sig;
}

int vhub_eventfd_guard_setup(void) {
        /* no SA_RESTART: an interrupted write returns EINTR instead of waiting on */
        struct sigaction sa = { .sa_handler = guard_noop };

        sigemptyset(&sa.sa_mask);
        return sigaction(SIGALRM, &sa, NULL) < 0 ? -errno : 0;
}

static bool guard_installed(void) {
        struct sigaction cur;

        return sigaction(SIGALRM, NULL, &cur) == 0 && cur.sa_handler == guard_noop &&
               !(cur.sa_flags & SA_RESTART);
}

/* A one-shot timer that sends SIGALRM to this thread (the one writing). */
static int guard_arm(timer_t *ret) {
        struct sigevent sev = { .sigev_notify = SIGEV_THREAD_ID, .sigev_signo = SIGALRM };
        struct itimerspec its = { .it_value = { .tv_sec = 0, .tv_nsec = GUARD_NSEC } };
        int r;

        /* older glibc has no sigev_notify_thread_id, only the union member */
        sev._sigev_un._tid = gettid();
        if (timer_create(CLOCK_MONOTONIC, &sev, ret) < 0)
                return -errno;
        if (timer_settime(*ret, 0, &its, NULL) < 0) {
                r = -errno;
                timer_delete(*ret);
                return r;
        }
        return 0;
}

int vhub_eventfd_signal(int fd) {
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        uint64_t one = 1;
        bool guarded;
        timer_t timer;
        ssize_t n;
        int r;

        /* An eventfd is writable while its counter is below 2^64-2: then a
         * write of 1 cannot block, whatever O_NONBLOCK says. */
        r = poll(&p, 1, 0);
        if (r < 0)
                return -errno;
        if (p.revents & POLLNVAL)
                return -EBADF;
        if (!(p.revents & POLLOUT))
                return -EAGAIN;
        /* The peer may write between poll() and write(): bound that race too. */
        guarded = guard_installed() && guard_arm(&timer) == 0;
        n = write(fd, &one, sizeof(one));
        r = n < 0 ? -errno : 0;
        if (guarded)
                timer_delete(timer);
        /* only a write that waited can be interrupted: the counter was full */
        return r == -EINTR ? -EAGAIN : r;
}
