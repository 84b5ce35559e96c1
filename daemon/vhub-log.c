/* SPDX-License-Identifier: MIT */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
/* the caller's CODE_FILE/LINE/FUNC are sent instead of this file's */
#define SD_JOURNAL_SUPPRESS_LOCATION
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

/* msg names request as a whole word (not as the start of a longer name). */
static bool names_request(const char *msg, const char *request) {
        size_t n = strlen(request);

        if (n == 0)
                return true;
        for (const char *p = strstr(msg, request); p; p = strstr(p + 1, request)) {
                bool word_start = p == msg || !(isalnum((unsigned char)p[-1]) || p[-1] == '_');
                bool word_end = !(isalnum((unsigned char)p[n]) || p[n] == '_');

                if (word_start && word_end)
                        return true;
        }
        return false;
}

char *vhub_log_format_message(const struct vhub_log_about *about, const char *msg, char *buf, size_t len) {
        const char *vm = about ? about->vm : NULL, *dev = about ? about->device : NULL;
        const char *req = about ? about->request : NULL;
        bool tag = req && !names_request(msg, req);

        if (vm && dev)
                snprintf(buf, len, "%s/%s: %s%s%s%s", vm, dev, msg, tag ? " [" : "", tag ? req : "", tag ? "]" : "");
        else if (vm || dev)
                snprintf(buf, len, "%s: %s%s%s%s", vm ? vm : dev, msg, tag ? " [" : "", tag ? req : "",
                         tag ? "]" : "");
        else
                snprintf(buf, len, "%s%s%s%s", msg, tag ? " [" : "", tag ? req : "", tag ? "]" : "");
        return buf;
}

/* "../daemon/vhub-device.c" (as the build directory sees it) -> "daemon/vhub-device.c" */
static const char *source_path(const char *file) {
        while (strncmp(file, "../", 3) == 0 || strncmp(file, "./", 2) == 0)
                file += file[0] == '.' && file[1] == '.' ? 3 : 2;
        return file;
}

static void log_to_journal(struct vhub_log_site site, int level, const struct vhub_log_about *about,
                           const char *msg) {
        char f_msg[1200], f_prio[16], f_file[256], f_line[32], f_func[128];
        char f_vm[96], f_uid[32], f_dev[96], f_req[96], text[1150];
        struct iovec iov[11];
        int n = 0;

        vhub_log_format_message(about, msg, text, sizeof(text));
        /* each field into its own buffer, truncated if need be */
#define FIELD(buf, ...) (snprintf((buf), sizeof(buf), __VA_ARGS__), iov[n++] = (struct iovec){ (buf), strlen(buf) })
        FIELD(f_msg, "MESSAGE=%s", text);
        FIELD(f_prio, "PRIORITY=%i", level);
        iov[n++] = (struct iovec){ (char *)"SYSLOG_IDENTIFIER=vhubd", strlen("SYSLOG_IDENTIFIER=vhubd") };
        FIELD(f_file, "CODE_FILE=%s", source_path(site.file));
        FIELD(f_line, "CODE_LINE=%d", site.line);
        FIELD(f_func, "CODE_FUNC=%s", site.func);
        if (about && about->vm)
                FIELD(f_vm, "VM=%s", about->vm);
        if (about && about->has_uid)
                FIELD(f_uid, "UID=%u", (unsigned)about->uid);
        if (about && about->device)
                FIELD(f_dev, "DEVICE=%s", about->device);
        if (about && about->request)
                FIELD(f_req, "VHOST_REQUEST=%s", about->request);
#undef FIELD
        sd_journal_sendv(iov, n);
}

static void log_to_stderr(int level, const struct vhub_log_about *about, const char *msg) {
        static const char *const prefix[] = {
                "<0>", "<1>", "<2>", "error", "warning", "notice", "info", "debug",
        };
        struct timespec ts;
        char ctx[240] = "";
        size_t n = 0;

        /* key=value context before the text, as scripts (and the tests) read it */
        if (about && about->vm)
                n += (size_t)snprintf(ctx + n, sizeof(ctx) - n, " vm=%s", about->vm);
        if (about && about->has_uid && n < sizeof(ctx))
                n += (size_t)snprintf(ctx + n, sizeof(ctx) - n, " uid=%u", (unsigned)about->uid);
        if (about && about->device && n < sizeof(ctx))
                n += (size_t)snprintf(ctx + n, sizeof(ctx) - n, " device=%s", about->device);
        if (about && about->request && n < sizeof(ctx))
                snprintf(ctx + n, sizeof(ctx) - n, " request=%s", about->request);
        clock_gettime(CLOCK_MONOTONIC, &ts);
        fprintf(stderr, "vhubd[%lld.%03ld] %s:%s %s\n", (long long)ts.tv_sec, ts.tv_nsec / 1000000,
                prefix[level & 7], ctx, msg);
}

/* Clients choose some of what is logged (a socket path may hold any byte
 * but NUL): a newline would start a line of theirs on stderr, an escape
 * sequence would drive the reader's terminal.  Control bytes become \xNN. */
static void escape_controls(const char *in, char *out, size_t len) {
        size_t o = 0;

        for (const unsigned char *p = (const unsigned char *)in; *p && o + 1 < len; p++) {
                if (*p >= 0x20 && *p != 0x7f) {
                        out[o++] = (char)*p;
                        continue;
                }
                if (len - o < 5)
                        break;
                snprintf(out + o, len - o, "\\x%02x", *p);
                o += 4;
        }
        out[o] = '\0';
}

void vhub_logv_at(struct vhub_log_site site, int level, const struct vhub_log_about *about,
                  const char *fmt, va_list ap) {
        char raw[1024], msg[1024];
        int saved = errno;

        if (level > log_settings.max_level)
                return;
        vsnprintf(raw, sizeof(raw), fmt, ap);
        escape_controls(raw, msg, sizeof(msg));
        if (log_settings.journal)
                log_to_journal(site, level, about, msg);
        else
                log_to_stderr(level, about, msg);
        errno = saved;
}

void vhub_log_at(struct vhub_log_site site, int level, const struct vhub_log_about *about,
                 const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vhub_logv_at(site, level, about, fmt, ap);
        va_end(ap);
}
