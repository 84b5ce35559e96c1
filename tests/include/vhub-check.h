/* SPDX-License-Identifier: MIT */
/*
 * Assertions for the C unit tests outside protocol/ (which has its own,
 * counting, helper): a failed check prints where and aborts.
 */
#pragma once

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
