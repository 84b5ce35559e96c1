/* SPDX-License-Identifier: MIT */
/* vhubctl: tables, JSON lines, number formatting, and following events. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include "vhubctl.h"

/* ---- tables ---- */

static int table_grow(struct ctl_table *t) {
        char **cells;
        unsigned cap;

        if (t->n_rows < t->cap_rows)
                return 0;
        cap = t->cap_rows ? t->cap_rows * 2 : 16;
        cells = reallocarray(t->cells, (size_t)cap * t->n_cols, sizeof(*cells));
        if (!cells)
                return -ENOMEM;
        t->cells = cells;
        t->cap_rows = cap;
        return 0;
}

static int table_addv(struct ctl_table *t, va_list ap) {
        char **row;

        if (table_grow(t) < 0)
                return -ENOMEM;
        row = t->cells + (size_t)t->n_rows * t->n_cols;
        for (unsigned i = 0; i < t->n_cols; i++) {
                const char *s = va_arg(ap, const char *);

                row[i] = strdup(s ? s : "");
                if (!row[i]) {
                        while (i > 0)
                                free(row[--i]);
                        return -ENOMEM;
                }
        }
        t->n_rows++;
        return 0;
}

int ctl_table_init(struct ctl_table *t, unsigned n_cols, ...) {
        va_list ap;
        int r;

        *t = (struct ctl_table){ .n_cols = n_cols };
        va_start(ap, n_cols);
        r = table_addv(t, ap);
        va_end(ap);
        return r;
}

int ctl_table_add(struct ctl_table *t, ...) {
        va_list ap;
        int r;

        va_start(ap, t);
        r = table_addv(t, ap);
        va_end(ap);
        return r;
}

void ctl_table_print(const struct ctl_table *t) {
        size_t *w = calloc(t->n_cols ? t->n_cols : 1, sizeof(*w));

        if (!w)
                return;
        for (unsigned r = 0; r < t->n_rows; r++)
                for (unsigned c = 0; c < t->n_cols; c++) {
                        size_t len = strlen(t->cells[(size_t)r * t->n_cols + c]);

                        if (len > w[c])
                                w[c] = len;
                }
        for (unsigned r = 0; r < t->n_rows; r++) {
                for (unsigned c = 0; c < t->n_cols; c++) {
                        const char *s = t->cells[(size_t)r * t->n_cols + c];

                        if (c + 1 == t->n_cols)
                                fputs(s, stdout);       /* no trailing blanks */
                        else
                                printf("%-*s  ", (int)w[c], s);
                }
                putchar('\n');
        }
        free(w);
}

void ctl_table_done(struct ctl_table *t) {
        for (size_t i = 0; i < (size_t)t->n_rows * t->n_cols; i++)
                free(t->cells[i]);
        free(t->cells);
        *t = (struct ctl_table){ 0 };
}

/* ---- values ---- */

void ctl_print_json(const json_t *v) {
        char *s = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : strdup("{}");

        if (s) {
                puts(s);
                free(s);
        }
        fflush(stdout);
}

void ctl_fmt_u64(const json_t *v, char *buf, size_t len) {
        uint64_t x;

        if (vhub_json_get_u64(v, &x) < 0)
                snprintf(buf, len, "?");
        else
                snprintf(buf, len, "0x%" PRIx64, x);
}

void ctl_fmt_size(uint64_t size, char *buf, size_t len) {
        static const char *const units[] = { "KiB", "MiB", "GiB", "TiB" };
        int u = -1;

        while (u < 3 && size >= 1024 && size % 1024 == 0) {
                size /= 1024;
                u++;
        }
        if (u < 0)
                snprintf(buf, len, "%" PRIu64, size);
        else
                snprintf(buf, len, "%" PRIu64 " %s", size, units[u]);
}

int ctl_memfd(const char *name, uint64_t size) {
        char full[64];
        int fd;

        snprintf(full, sizeof(full), "vhubctl-%s", name);
        fd = memfd_create(full, MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (fd < 0)
                return -errno;
        if (ftruncate(fd, (off_t)size) < 0) {
                int r = -errno;

                close(fd);
                return r;
        }
        /* the daemon maps it; nobody may shrink it under the mapping */
        (void)fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK);
        return fd;
}

/* ---- events ---- */

int ctl_signalfd(void) {
        sigset_t set;
        int fd;

        sigemptyset(&set);
        sigaddset(&set, SIGINT);
        sigaddset(&set, SIGTERM);
        sigaddset(&set, SIGHUP);
        if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
                return -errno;
        fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
        return fd < 0 ? -errno : fd;
}

/* The event's RFC 3339 timestamp ("2026-12-03T10:00:00.123456Z"); false if
 * it has none or another form. */
static bool event_time(const json_t *params, struct timespec *ret) {
        const char *s = json_string_value(json_object_get(params, "timestamp"));
        struct tm tm = { 0 };
        unsigned usec;
        char z;
        int n = 0;

        if (!s || !(s = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm)) ||
            sscanf(s, ".%6u%c%n", &usec, &z, &n) != 2 || z != 'Z' || s[n] != '\0')
                return false;
        ret->tv_sec = timegm(&tm);
        ret->tv_nsec = (long)usec * 1000;
        return ret->tv_sec != (time_t)-1;
}

/* "12:00:01.234 device.disconnected vm0/blk0 uid=0 reason=...": the time the
 * daemon stamped (ours for an event without one), in local time. */
static void print_event_line(const json_t *params, unsigned n_fds) {
        const char *event = json_string_value(json_object_get(params, "event"));
        const char *vm = json_string_value(json_object_get(params, "vm"));
        const char *dev = json_string_value(json_object_get(params, "device"));
        struct timespec ts;
        struct tm tm;
        const char *key;
        json_t *val;

        if (!event_time(params, &ts))
                clock_gettime(CLOCK_REALTIME, &ts);
        localtime_r(&ts.tv_sec, &tm);
        printf("%02d:%02d:%02d.%03ld %s %s%s%s", tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
               event ? event : "?", vm ? vm : "-", dev ? "/" : "", dev ? dev : "");
        json_object_foreach((json_t *)params, key, val) {
                char *s;

                if (strcmp(key, "event") == 0 || strcmp(key, "vm") == 0 || strcmp(key, "device") == 0 ||
                    strcmp(key, "timestamp") == 0)
                        continue;
                s = json_dumps(val, JSON_COMPACT | JSON_ENCODE_ANY);
                printf(" %s=%s", key, s ? s : "?");
                free(s);
        }
        if (n_fds)
                printf(" (%u fds, closed)", n_fds);
        putchar('\n');
        fflush(stdout);
}

int ctl_follow_events(struct ctl *ctl, int sigfd, uint64_t max_events) {
        uint64_t seen = 0;

        for (;;) {
                struct pollfd p[2] = {
                        { .fd = vhub_client_get_fd(ctl->client), .events = POLLIN },
                        { .fd = sigfd, .events = POLLIN },
                };
                json_t *ev = NULL;
                int *fds = NULL;
                unsigned n_fds = 0;
                int r;

                /* drain what is queued before sleeping */
                r = vhub_client_next_event(ctl->client, 0, &ev, &fds, &n_fds);
                if (r < 0)
                        return ctl_fail(CTL_EXIT_CONNECT, "the daemon closed the connection");
                if (r > 0) {
                        json_t *params = json_object_get(ev, "params");

                        if (ctl->json) {
                                json_t *line = json_is_object(params) ? json_deep_copy(params) : json_object();

                                if (n_fds)
                                        json_object_set_new(line, "fds", json_integer(n_fds));
                                ctl_print_json(line);
                                json_decref(line);
                        } else {
                                print_event_line(json_is_object(params) ? params : NULL, n_fds);
                        }
                        vhub_client_close_fds(fds, n_fds);
                        json_decref(ev);
                        if (max_events && ++seen >= max_events)
                                return CTL_EXIT_OK;
                        continue;
                }
                if (poll(p, 2, -1) < 0) {
                        if (errno == EINTR)
                                continue;
                        return ctl_fail(CTL_EXIT_LOCAL, "poll: %s", strerror(errno));
                }
                if (p[1].revents)
                        return CTL_EXIT_OK;     /* interrupted: the normal end */
                if (p[0].revents & (POLLHUP | POLLERR) && !(p[0].revents & POLLIN))
                        return ctl_fail(CTL_EXIT_CONNECT, "the daemon closed the connection");
        }
}
