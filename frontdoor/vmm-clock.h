/* SPDX-License-Identifier: MIT */
/*
 * Monotonic time for the VMM transport's deadlines.  The same two helpers as
 * the model's vhub-time.h, kept here because the transport is a leaf that
 * includes nothing of daemon/ (protocol/ and libevent only).
 */
#pragma once

#include <stdint.h>
#include <sys/time.h>
#include <time.h>

static inline uint64_t vmm_now_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* A libevent timeout that ends at deadline (already passed: now). */
static inline struct timeval vmm_timeval_until(uint64_t deadline) {
        uint64_t now = vmm_now_usec();
        uint64_t left = deadline > now ? deadline - now : 0;
        struct timeval tv = { .tv_sec = (time_t)(left / 1000000u),
                              .tv_usec = (suseconds_t)(left % 1000000u) };

        return tv;
}
