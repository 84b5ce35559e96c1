/* SPDX-License-Identifier: MIT */
/*
 * The clock of the library's waits (vhub_virtq_wait_used,
 * vhub_blk_wait_all): their deadlines are CLOCK_MONOTONIC milliseconds.
 * Internal: not installed, not part of the library's interface.
 */
#pragma once

#include <stdint.h>
#include <time.h>

static inline int64_t virtq_now_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
