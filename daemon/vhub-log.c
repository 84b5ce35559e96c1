/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <systemd/sd-journal.h>
#include <time.h>
#include <unistd.h>

#include "vhub-log.h"

static struct {
        int max_level;
        bool journal;
} log_settings = { LOG_INFO, false };

void vhub_log_setup(int max_level, bool use_journal) {
        log_settings.max_level = max_level;
        log_settings.journal = use_journal;
}

void vhub_log_set_level(int max_level) {
        log_settings.max_level = max_level;
}

int vhub_log_get_level(void) {
        return log_settings.max_level;
}

static const char *const level_names[] = {
        [LOG_EMERG] = "0", [LOG_ALERT] = "1", [LOG_CRIT] = "2",
        [LOG_ERR] = "err", [LOG_WARNING] = "warning", [LOG_NOTICE] = "notice",
        [LOG_INFO] = "info", [LOG_DEBUG] = "debug",
};

const char *vhub_log_level_to_string(int level) {
        return level >= 0 && level <= LOG_DEBUG ? level_names[level] : "?";
}

int vhub_log_level_from_string(const char *s) {
        if (!s)
                return -EINVAL;
        for (int i = LOG_ERR; i <= LOG_DEBUG; i++)
                if (strcmp(s, level_names[i]) == 0)
                        return i;
        if (strcmp(s, "error") == 0)
                return LOG_ERR;
        if (strcmp(s, "warn") == 0)
                return LOG_WARNING;
        if (s[0] >= '0' && s[0] <= '7' && s[1] == '\0')
                return s[0] - '0';
        return -EINVAL;
}

bool vhub_log_ratelimit(struct vhub_log_ratelimit *rl, uint64_t now_usec,
                        unsigned long long *ret_suppressed) {
        rl->total++;
        if (rl->logged && now_usec - rl->last_usec < VHUB_LOG_RATELIMIT_USEC) {
                rl->suppressed++;
                return false;
        }
        *ret_suppressed = rl->suppressed;
        rl->suppressed = 0;
        rl->logged = true;
        rl->last_usec = now_usec;
        return true;
}

void vhub_log_ratelimit_reset(struct vhub_log_ratelimit *rl) {
        *rl = (struct vhub_log_ratelimit){ 0 };
}

bool vhub_log_stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
                return false;
        if (fstat(STDERR_FILENO, &st) < 0)
                return false;
        return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void vhub_log_full(int level, const char *vm, const char *device, const char *request,
                   const char *fmt, ...) {
        char msg[1024];
        va_list ap;
        int saved = errno;

        if (level > log_settings.max_level)
                return;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);

        if (log_settings.journal) {
                char f_msg[1100], f_prio[16], f_vm[96], f_dev[96], f_req[96];
                struct iovec iov[6];
                int n = 0;

                iov[n++] = (struct iovec){ f_msg, (size_t)snprintf(f_msg, sizeof(f_msg), "MESSAGE=%s", msg) };
                iov[n++] = (struct iovec){ f_prio, (size_t)snprintf(f_prio, sizeof(f_prio), "PRIORITY=%i", level) };
                iov[n++] = (struct iovec){ (char *)"SYSLOG_IDENTIFIER=vhubd", strlen("SYSLOG_IDENTIFIER=vhubd") };
                if (vm)
                        iov[n++] = (struct iovec){ f_vm, (size_t)snprintf(f_vm, sizeof(f_vm), "VM=%s", vm) };
                if (device)
                        iov[n++] = (struct iovec){ f_dev, (size_t)snprintf(f_dev, sizeof(f_dev), "DEVICE=%s", device) };
                if (request)
                        iov[n++] = (struct iovec){ f_req, (size_t)snprintf(f_req, sizeof(f_req), "VHOST_REQUEST=%s", request) };
                for (int i = 0; i < n; i++) /* snprintf may have truncated */
                        iov[i].iov_len = strlen(iov[i].iov_base);
                sd_journal_sendv(iov, n);
        } else {
                static const char *const prefix[] = {
                        "<0>", "<1>", "<2>", "error", "warning", "notice", "info", "debug",
                };
                struct timespec ts;
                char ctx[200] = "";
                int n = 0;

                if (vm)
                        n += snprintf(ctx + n, sizeof(ctx) - (size_t)n, " vm=%s", vm);
                if (device && n < (int)sizeof(ctx))
                        n += snprintf(ctx + n, sizeof(ctx) - (size_t)n, " device=%s", device);
                if (request && n < (int)sizeof(ctx))
                        snprintf(ctx + n, sizeof(ctx) - (size_t)n, " request=%s", request);
                clock_gettime(CLOCK_MONOTONIC, &ts);
                fprintf(stderr, "vhubd[%lld.%03ld] %s:%s %s\n", (long long)ts.tv_sec,
                        ts.tv_nsec / 1000000, prefix[level & 7], ctx, msg);
        }
        errno = saved;
}
