/* SPDX-License-Identifier: MIT */
/* vhubctl: following events, and the raw `call` escape hatch. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vhubctl.h"

int cmd_events(struct ctl *ctl, const struct ctl_args *a) {
        const char *vm = ctl_arg(a, "vm"), *count = ctl_arg(a, "count");
        uint64_t max = 0;
        json_t *params;
        int sigfd, r;

        if (count && (r = ctl_get_u64(ctl, "--count", count, UINT32_MAX, &max)) != 0)
                return r;
        if (vm && ctl_flag(a, "all"))
                return ctl_usage_error(ctl, "--vm and --all exclude each other");
        sigfd = ctl_signalfd();
        if (sigfd < 0)
                return ctl_fail(CTL_EXIT_LOCAL, "signalfd: %s", strerror(-sigfd));
        /* without vm the daemon sends every VM the caller sees (root: every uid's) */
        params = vm ? ctl_vm_params(ctl, vm) : json_object();
        /* without --vm, --uid has no meaning for the daemon: it is not sent */
        r = ctl_call(ctl, "events.subscribe", params, vm != NULL, NULL, 0, NULL, NULL, NULL);
        if (r == CTL_EXIT_OK)
                r = ctl_follow_events(ctl, sigfd, max);
        close(sigfd);
        return r;
}

#define MAX_CALL_FDS 253

int cmd_call(struct ctl *ctl, const struct ctl_args *a) {
        int fds[MAX_CALL_FDS], *rfds = NULL;
        unsigned n_fds = 0, n_rfds = 0;
        json_t *params = NULL, *res = NULL;
        int r = CTL_EXIT_OK;

        if (a->n_pos == 2) {
                json_error_t jerr;
                const char *arg = a->pos[1];

                if (strcmp(arg, "-") == 0)
                        params = json_loadf(stdin, JSON_REJECT_DUPLICATES, &jerr);
                else if (arg[0] == '@')
                        params = json_load_file(arg + 1, JSON_REJECT_DUPLICATES, &jerr);
                else
                        params = json_loads(arg, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
                if (!params)
                        return ctl_usage_error(ctl, "PARAMS: line %d: %s", jerr.line, jerr.text);
        }
        /* the fds, in command-line order: fd index 0, 1, ... */
        for (unsigned i = 0; i < a->n_occ && r == CTL_EXIT_OK; i++) {
                const char *name = a->specs[a->occ[i].spec].name, *val = a->occ[i].value;
                uint64_t size;
                int fd = -1;

                if (n_fds >= MAX_CALL_FDS) {
                        r = ctl_usage_error(ctl, "at most %d fds per request", MAX_CALL_FDS);
                        break;
                }
                if (strcmp(name, "fd") == 0) {
                        fd = open(val, O_RDWR | O_CLOEXEC);
                        if (fd < 0 && (errno == EACCES || errno == EISDIR || errno == EROFS))
                                fd = open(val, O_RDONLY | O_CLOEXEC);
                        if (fd < 0)
                                r = ctl_fail(CTL_EXIT_LOCAL, "cannot open %s: %s", val, strerror(errno));
                } else if (strcmp(name, "memfd") == 0) {
                        if ((r = ctl_get_size(ctl, "--memfd", val, &size)) != 0)
                                break;
                        fd = ctl_memfd("call", size);
                        if (fd < 0)
                                r = ctl_fail(CTL_EXIT_LOCAL, "memfd: %s", strerror(-fd));
                } else {
                        fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
                        if (fd < 0)
                                r = ctl_fail(CTL_EXIT_LOCAL, "eventfd: %s", strerror(errno));
                }
                if (fd >= 0)
                        fds[n_fds++] = fd;
        }
        if (r == CTL_EXIT_OK)
                r = ctl_call(ctl, a->pos[0], params, false, fds, n_fds, &res, &rfds, &n_rfds);
        else
                json_decref(params);
        for (unsigned i = 0; i < n_fds; i++)
                close(fds[i]);
        if (r != CTL_EXIT_OK)
                return r;
        if (ctl->json) {
                ctl_print_json(res ? res : json_null());
        } else {
                char *s = json_dumps(res ? res : json_null(), JSON_INDENT(2) | JSON_ENCODE_ANY);

                if (s)
                        puts(s);
                free(s);
        }
        if (n_rfds)
                fprintf(stderr, "vhubctl: the answer carried %u fd%s (closed)\n", n_rfds, n_rfds == 1 ? "" : "s");
        vhub_client_close_fds(rfds, n_rfds);
        json_decref(res);
        return CTL_EXIT_OK;
}
