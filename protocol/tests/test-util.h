/* SPDX-License-Identifier: MIT */
/*
 * A tiny assertion helper for protocol/ tests: every CHECK is counted, a
 * failure prints where it happened (and the current context) and the test
 * goes on, so one run shows every broken case; test_finish() sets the exit
 * code.
 */
#pragma once

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static unsigned test_checks, test_failures;
static char test_context[256];

/* Say what the following CHECKs are about ("request SET_MEM_TABLE"). */
__attribute__((format(printf, 1, 2)))
static inline void test_set_context(const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(test_context, sizeof(test_context), fmt, ap);
        va_end(ap);
}

static inline void test_fail(const char *file, int line, const char *what) {
        test_failures++;
        fprintf(stderr, "%s:%d: CHECK failed: %s%s%s\n", file, line, what,
                test_context[0] ? " -- " : "", test_context);
}

#define CHECK(cond)                                                     \
        do {                                                            \
                test_checks++;                                          \
                if (!(cond))                                            \
                        test_fail(__FILE__, __LINE__, #cond);           \
        } while (0)

static inline void test_fail_eq(const char *file, int line, const char *a, const char *b,
                                long long va, long long vb) {
        test_failures++;
        fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%lld != %lld)%s%s\n", file, line, a, b,
                va, vb, test_context[0] ? " -- " : "", test_context);
}

/* Compare two integers and print both on failure. */
#define CHECK_EQ(a, b)                                                  \
        do {                                                            \
                long long _a = (long long) (a), _b = (long long) (b);   \
                test_checks++;                                          \
                if (_a != _b)                                           \
                        test_fail_eq(__FILE__, __LINE__, #a, #b, _a, _b); \
        } while (0)

static inline int test_finish(const char *name) {
        printf("%s: %u checks, %u failed\n", name, test_checks, test_failures);
        return test_failures ? 1 : 0;
}
