/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vhub-eventfd.h"

/* The longest a write may wait when the peer fills the counter between our
 * poll() and our write(): the guard timer's signal interrupts it then. */
#define GUARD_NSEC (5 * 1000 * 1000)

static void guard_noop(int sig) {
        (void)sig;
}

/* Set once by vhub_eventfd_guard_setup(), like the SIGALRM disposition it
 * goes with: process-wide by nature. */
static struct {
        bool installed;
        timer_t timer;   /* one-shot, SIGALRM to the thread that set it up */
} guard;

int vhub_eventfd_guard_setup(void) {
        /* no SA_RESTART: an interrupted write returns EINTR instead of waiting on */
        struct sigaction sa = { .sa_handler = guard_noop };
        struct sigevent sev = { .sigev_notify = SIGEV_THREAD_ID, .sigev_signo = SIGALRM };

        if (guard.installed)
                return 0;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGALRM, &sa, NULL) < 0)
                return -errno;
        /* older glibc has no sigev_notify_thread_id, only the union member */
        sev._sigev_un._tid = gettid();
        if (timer_create(CLOCK_MONOTONIC, &sev, &guard.timer) < 0)
                return -errno;
        guard.installed = true;
        return 0;
}

/* Armed, it fires every nsec until disarmed (nsec 0): a write that starts
 * late after arming is still interrupted by the next tick. */
static int guard_set(long nsec) {
        struct itimerspec its = { .it_value = { .tv_sec = 0, .tv_nsec = nsec },
                                  .it_interval = { .tv_sec = 0, .tv_nsec = nsec } };

        return timer_settime(guard.timer, 0, &its, NULL) < 0 ? -errno : 0;
}

int vhub_eventfd_signal(int fd) {
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        uint64_t one = 1;
        bool guarded;
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
        guarded = guard.installed && guard_set(GUARD_NSEC) == 0;
        n = write(fd, &one, sizeof(one));
        r = n < 0 ? -errno : 0;
        if (guarded)
                (void)guard_set(0); /* disarmed: no SIGALRM later */
        /* only a write that waited can be interrupted: the counter was full */
        return r == -EINTR ? -EAGAIN : r;
}

bool vhub_fd_is_eventfd(int fd) {
        char path[64], target[64];
        ssize_t n;

        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        n = readlink(path, target, sizeof(target) - 1);
        if (n < 0)
                return false;
        target[n] = '\0';
        return strcmp(target, "anon_inode:[eventfd]") == 0;
}
