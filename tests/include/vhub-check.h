/* SPDX-License-Identifier: MIT */
/*
 * Assertions for the C unit tests outside protocol/ (which has its own,
 * counting, helper): a failed check prints where and aborts.  And the fd
 * count those tests compare before and after, to catch leaks.
 */
#pragma once

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                                  \
        do {                                                                         \
                if (!(cond)) {                                                       \
                        fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,       \
                                __LINE__, #cond);                                    \
                        abort();                                                     \
                }                                                                    \
        } while (0)

#define CHECK_EQ(a, b)                                                               \
        do {                                                                         \
                long long _a = (long long)(a), _b = (long long)(b);                  \
                if (_a != _b) {                                                      \
                        fprintf(stderr, "%s:%d: %s == %lld, expected %s == %lld\n",  \
                                __FILE__, __LINE__, #a, _a, #b, _b);                 \
                        abort();                                                     \
                }                                                                    \
        } while (0)

/* How many fds this process has open (from /proc/self/fd). */
static inline int vhub_count_open_fds(void) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;
        int n = 0;

        CHECK(d);
        while ((de = readdir(d)))
                if (de->d_name[0] != '.')
                        n++;
        closedir(d);
        return n - 1;   /* the DIR's own fd */
}
