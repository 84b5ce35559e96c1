/* SPDX-License-Identifier: MIT */
/*
 * Logging: to stderr, or to the journal with structured fields (VM=,
 * DEVICE=, VHOST_REQUEST=) when systemd started us (JOURNAL_STREAM matches
 * our stderr).  The level and sink are set once at startup; they are the
 * only process-wide settings outside the daemon context.
 */
#pragma once

#include <stdbool.h>
#include <syslog.h>

void vhub_log_setup(int max_level, bool use_journal);
int vhub_log_get_level(void);
/* "err", "warning", "notice", "info", "debug" (or 3..7) -> level, -EINVAL otherwise. */
int vhub_log_level_from_string(const char *s);
/* True if stderr is connected to the journal (JOURNAL_STREAM). */
bool vhub_log_stderr_is_journal(void);

void vhub_log_full(int level, const char *vm, const char *device, const char *request,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));

#define log_full(level, ...) vhub_log_full((level), NULL, NULL, NULL, __VA_ARGS__)
#define log_error(...)   log_full(LOG_ERR, __VA_ARGS__)
#define log_warning(...) log_full(LOG_WARNING, __VA_ARGS__)
#define log_notice(...)  log_full(LOG_NOTICE, __VA_ARGS__)
#define log_info(...)    log_full(LOG_INFO, __VA_ARGS__)
#define log_debug(...)   log_full(LOG_DEBUG, __VA_ARGS__)
