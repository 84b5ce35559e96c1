/* SPDX-License-Identifier: MIT */
/*
 * Logging: to stderr, or to the journal with structured fields (VM=,
 * DEVICE=, VHOST_REQUEST=) when systemd started us (JOURNAL_STREAM matches
 * our stderr).  The level and sink are set at startup (the level again on
 * SIGHUP); they are the only process-wide settings outside the daemon
 * context.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <syslog.h>

void vhub_log_setup(int max_level, bool use_journal);
/* The level alone (SIGHUP reloads it). */
void vhub_log_set_level(int max_level);
int vhub_log_get_level(void);
/* "err", "warning", "notice", "info", "debug" (or 3..7) -> level, -EINVAL otherwise. */
int vhub_log_level_from_string(const char *s);
/* The level's name ("info"), or its number for 0..2. */
const char *vhub_log_level_to_string(int level);
/* True if stderr is connected to the journal (JOURNAL_STREAM). */
bool vhub_log_stderr_is_journal(void);

/* A line that a peer can make the daemon repeat (a back-end that keeps
 * failing, a VMM's full eventfd) is logged the first time, then at most once
 * per interval, saying how many were left out since.  One per kind of line
 * and per object, in that object. */
#define VHUB_LOG_RATELIMIT_USEC (10 * 1000000ull)
struct vhub_log_ratelimit {
        uint64_t last_usec;              /* when a line was last logged */
        bool logged;                     /* a line was logged at all */
        unsigned long long suppressed;   /* events left out since that line */
        unsigned long long total;        /* every event counted */
};

/* Counts one event; true if its line is to be logged now, with
 * *ret_suppressed the number left out since the previous one. */
bool vhub_log_ratelimit(struct vhub_log_ratelimit *rl, uint64_t now_usec,
                        unsigned long long *ret_suppressed);
/* Forget the history: the next event is logged as a first one. */
void vhub_log_ratelimit_reset(struct vhub_log_ratelimit *rl);

void vhub_log_full(int level, const char *vm, const char *device, const char *request,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));

#define log_full(level, ...) vhub_log_full((level), NULL, NULL, NULL, __VA_ARGS__)
#define log_error(...)   log_full(LOG_ERR, __VA_ARGS__)
#define log_warning(...) log_full(LOG_WARNING, __VA_ARGS__)
#define log_notice(...)  log_full(LOG_NOTICE, __VA_ARGS__)
#define log_info(...)    log_full(LOG_INFO, __VA_ARGS__)
#define log_debug(...)   log_full(LOG_DEBUG, __VA_ARGS__)
