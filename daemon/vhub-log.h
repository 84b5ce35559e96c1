/* SPDX-License-Identifier: MIT */
/*
 * Logging: to stderr, or to the journal with structured fields when systemd
 * started us (JOURNAL_STREAM matches our stderr).  A line about a VM or a
 * device names them in its text ("vm0/blk0: back-end lost: ..."), so that a
 * plain `journalctl -u vhubd` tells which guest it concerns, and in fields
 * (VM=, UID=, DEVICE=, VHOST_REQUEST=) to filter on; CODE_FILE/LINE/FUNC are
 * the caller's, which is why every entry point is a macro.  The level and
 * sink are set at startup (the level again on SIGHUP); they are the only
 * process-wide settings outside the daemon context.
 */
#pragma once

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
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

/* Where a line is logged from: the journal's CODE_FILE, CODE_LINE, CODE_FUNC. */
struct vhub_log_site {
        const char *file;
        int line;
        const char *func;
};
#define VHUB_LOG_SITE ((struct vhub_log_site){ __FILE__, __LINE__, __func__ })

/* What a line is about; NULL members (and has_uid false) are left out. */
struct vhub_log_about {
        const char *vm;
        const char *device;
        const char *request;            /* a vhost-user request name */
        bool has_uid;
        uid_t uid;                      /* the VM's uid: names are per uid */
};

void vhub_log_at(struct vhub_log_site site, int level, const struct vhub_log_about *about,
                 const char *fmt, ...) __attribute__((format(printf, 4, 5)));
void vhub_logv_at(struct vhub_log_site site, int level, const struct vhub_log_about *about,
                  const char *fmt, va_list ap) __attribute__((format(printf, 4, 0)));

/* The text of a line as the journal's MESSAGE holds it: "vm0/blk0: " (or
 * "vm0: ") before msg, and " [REQUEST]" after it unless msg names the
 * request already.  Truncated to len; returns buf. */
char *vhub_log_format_message(const struct vhub_log_about *about, const char *msg, char *buf, size_t len);

/* Names without a VM object at hand: no UID= (prefer vhub_log_vm). */
#define vhub_log_full(level, vm_, device_, request_, ...)                                        \
        vhub_log_at(VHUB_LOG_SITE, (level),                                                     \
                    &(const struct vhub_log_about){ .vm = (vm_), .device = (device_),            \
                                                    .request = (request_) },                    \
                    __VA_ARGS__)
/* A line about a VM; vm_ is a struct vhub_vm * (its name and uid are read
 * where the macro is used, so this header needs no model type). */
#define vhub_log_vm(level, vm_, ...)                                                             \
        vhub_log_at(VHUB_LOG_SITE, (level),                                                     \
                    &(const struct vhub_log_about){ .vm = (vm_)->name, .has_uid = true,          \
                                                    .uid = (vm_)->uid },                        \
                    __VA_ARGS__)
/* A line about one of a VM's devices: vm_ as above, the device's name. */
#define vhub_log_vm_device(level, vm_, device_, ...)                                             \
        vhub_log_at(VHUB_LOG_SITE, (level),                                                     \
                    &(const struct vhub_log_about){ .vm = (vm_)->name, .device = (device_),      \
                                                    .has_uid = true, .uid = (vm_)->uid },       \
                    __VA_ARGS__)

#define log_full(level, ...) vhub_log_at(VHUB_LOG_SITE, (level), NULL, __VA_ARGS__)
#define log_error(...)   log_full(LOG_ERR, __VA_ARGS__)
#define log_warning(...) log_full(LOG_WARNING, __VA_ARGS__)
#define log_notice(...)  log_full(LOG_NOTICE, __VA_ARGS__)
#define log_info(...)    log_full(LOG_INFO, __VA_ARGS__)
#define log_debug(...)   log_full(LOG_DEBUG, __VA_ARGS__)
