/* SPDX-License-Identifier: MIT */
#pragma once

#include <stdint.h>
#include <sys/time.h>
#include <time.h>

static inline uint64_t vhub_now_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static inline struct timeval vhub_timeval_from_usec(uint64_t usec) {
        struct timeval tv = { .tv_sec = (time_t)(usec / 1000000u),
                              .tv_usec = (suseconds_t)(usec % 1000000u) };
        return tv;
}
