/* SPDX-License-Identifier: MIT */
/* vhubctl: one command's options and positional arguments; numbers and sizes. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vhubctl.h"

static int find_spec(const struct ctl_opt_spec *specs, const char *name, size_t len) {
        for (int i = 0; specs && specs[i].name; i++)
                if (strlen(specs[i].name) == len && strncmp(specs[i].name, name, len) == 0)
                        return i;
        return -1;
}

int ctl_args_parse(const struct ctl_command *cmd, int argc, char **argv, struct ctl_args *ret,
                   char *errbuf, size_t errlen) {
        struct ctl_args a = { .specs = cmd->opts };
        bool only_pos = false;

        for (int i = 0; i < argc; i++) {
                const char *s = argv[i], *eq, *val = NULL;
                int k;

                if (!only_pos && strcmp(s, "--") == 0) {
                        only_pos = true;
                        continue;
                }
                if (only_pos || s[0] != '-' || s[1] != '-' || s[2] == '\0') {
                        /* "-" alone is a positional (stdin) */
                        if (a.n_pos >= cmd->max_pos) {
                                snprintf(errbuf, errlen, "unexpected argument '%s'", s);
                                return -EINVAL;
                        }
                        a.pos[a.n_pos++] = s;
                        continue;
                }
                eq = strchr(s + 2, '=');
                k = find_spec(cmd->opts, s + 2, eq ? (size_t)(eq - s - 2) : strlen(s + 2));
                if (k < 0) {
                        snprintf(errbuf, errlen, "unknown option '%s'", s);
                        return -EINVAL;
                }
                if (cmd->opts[k].arg) {
                        if (eq)
                                val = eq + 1;
                        else if (i + 1 < argc)
                                val = argv[++i];
                        else {
                                snprintf(errbuf, errlen, "option --%s needs a value", cmd->opts[k].name);
                                return -EINVAL;
                        }
                } else if (eq) {
                        snprintf(errbuf, errlen, "option --%s takes no value", cmd->opts[k].name);
                        return -EINVAL;
                }
                if (!cmd->opts[k].repeatable)
                        for (unsigned j = 0; j < a.n_occ; j++)
                                if (a.occ[j].spec == (unsigned)k) {
                                        snprintf(errbuf, errlen, "option --%s given twice", cmd->opts[k].name);
                                        return -EINVAL;
                                }
                if (a.n_occ >= CTL_MAX_OCCURRENCES) {
                        snprintf(errbuf, errlen, "too many options (at most %d)", CTL_MAX_OCCURRENCES);
                        return -EINVAL;
                }
                a.occ[a.n_occ].spec = (unsigned)k;
                a.occ[a.n_occ].value = val;
                a.n_occ++;
        }
        if (a.n_pos < cmd->min_pos) {
                snprintf(errbuf, errlen, "missing arguments");
                return -EINVAL;
        }
        *ret = a;
        return 0;
}

const char *ctl_arg(const struct ctl_args *a, const char *name) {
        const char *v = NULL;

        for (unsigned i = 0; i < a->n_occ; i++)
                if (strcmp(a->specs[a->occ[i].spec].name, name) == 0)
                        v = a->occ[i].value ? a->occ[i].value : "";
        return v;
}

bool ctl_flag(const struct ctl_args *a, const char *name) {
        return ctl_arg(a, name) != NULL;
}

int ctl_parse_u64(const char *s, uint64_t *ret) {
        unsigned long long v;
        char *end;

        if (!s || !*s || s[0] == '-' || s[0] == '+' || s[0] == ' ')
                return -EINVAL;
        errno = 0;
        if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
                v = strtoull(s + 2, &end, 16);
        else
                v = strtoull(s, &end, 10);
        if (errno || *end || end == s || (s[0] == '0' && (s[1] == 'x' || s[1] == 'X') && end == s + 2))
                return -EINVAL;
        *ret = v;
        return 0;
}

int ctl_parse_size(const char *s, uint64_t *ret) {
        static const char units[] = "KMGT";
        char buf[64];
        size_t len;
        uint64_t v;
        unsigned shift = 0;
        const char *u;

        if (!s || (len = strlen(s)) == 0 || len >= sizeof(buf))
                return -EINVAL;
        memcpy(buf, s, len + 1);
        /* "64M", "64MiB", "64m" */
        if (len > 3 && strcmp(buf + len - 2, "iB") == 0) {
                len -= 2;
                buf[len] = '\0';
        }
        if (len > 1 && !(buf[0] == '0' && (buf[1] == 'x' || buf[1] == 'X')) &&
            (u = strchr(units, buf[len - 1] & ~0x20)) && buf[len - 1] != '\0') {
                shift = 10 * (unsigned)(u - units + 1);
                buf[--len] = '\0';
        }
        if (ctl_parse_u64(buf, &v) < 0)
                return -EINVAL;
        if (shift && v > (UINT64_MAX >> shift))
                return -ERANGE;
        *ret = v << shift;
        return 0;
}

int ctl_get_u64(const struct ctl *ctl, const char *what, const char *s, uint64_t max, uint64_t *ret) {
        uint64_t v;

        if (ctl_parse_u64(s, &v) < 0 || v > max)
                return ctl_usage_error(ctl, "%s wants a number up to %llu (decimal or 0x hex), not '%s'", what,
                                       (unsigned long long)max, s ? s : "");
        *ret = v;
        return 0;
}

int ctl_get_size(const struct ctl *ctl, const char *what, const char *s, uint64_t *ret) {
        uint64_t v;

        if (ctl_parse_size(s, &v) < 0)
                return ctl_usage_error(ctl, "%s wants a size (bytes, 0x hex, or with K/M/G/T), not '%s'", what,
                                       s ? s : "");
        *ret = v;
        return 0;
}
