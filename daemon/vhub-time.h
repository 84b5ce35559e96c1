/* SPDX-License-Identifier: MIT */
#pragma once

#include <stdint.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>

static inline uint64_t vhub_now_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Wall-clock time, for timestamps people read (never for deadlines). */
static inline uint64_t vhub_realtime_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* "2026-12-03T10:00:00.123456Z": RFC 3339, UTC, microseconds (the contract's timestamps). */
#define VHUB_RFC3339_LEN sizeof("YYYY-MM-DDTHH:MM:SS.uuuuuuZ")

static inline void vhub_format_rfc3339(uint64_t realtime_usec, char buf[VHUB_RFC3339_LEN]) {
        time_t t = (time_t)(realtime_usec / 1000000u);
        struct tm tm;

        /* anything but a four-digit year makes it longer than 19 */
        if (!gmtime_r(&t, &tm) || strftime(buf, VHUB_RFC3339_LEN, "%Y-%m-%dT%H:%M:%S", &tm) != 19) {
                snprintf(buf, VHUB_RFC3339_LEN, "1970-01-01T00:00:00.000000Z");
                return;
        }
        snprintf(buf + 19, VHUB_RFC3339_LEN - 19, ".%06uZ", (unsigned)(realtime_usec % 1000000u));
}

/* Every timer's timeval comes from one of these two. */
static inline struct timeval vhub_timeval_from_usec(uint64_t usec) {
        struct timeval tv = { .tv_sec = (time_t)(usec / 1000000u),
                              .tv_usec = (suseconds_t)(usec % 1000000u) };
        return tv;
}

static inline struct timeval vhub_timeval_from_ms(uint64_t ms) {
        return vhub_timeval_from_usec(ms * 1000u);
}
