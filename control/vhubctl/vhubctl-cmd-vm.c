/* SPDX-License-Identifier: MIT */
/* vhubctl: daemon, VM, memory, dirty-log and shared-object commands. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vhubctl.h"

/* ---- daemon ---- */

int cmd_daemon_info(struct ctl *ctl, const struct ctl_args *a) {
        json_t *res = NULL, *cap;
        uint64_t up = 0;
        char features[1200], *caps = NULL;
        size_t len = 0, i;
        FILE *f;
        int r;

        r = ctl_query(ctl, "daemon.info", json_object(), false, &res);
        if (r != CTL_EXIT_OK || !res)
                return r; /* an error, or --json already printed it */
        (void)vhub_json_object_get_u64(res, "uptime_ms", &up);
        ctl_fmt_features_line(json_object_get(res, "protocol_features"), true, NULL, features, sizeof(features));
        f = open_memstream(&caps, &len);
        if (f) {
                json_array_foreach(json_object_get(res, "capabilities"), i, cap)
                        fprintf(f, "%s%s", i ? "," : "", json_string_value(cap) ?: "?");
                fclose(f);
        }
        printf("version            %s\n", json_string_value(json_object_get(res, "version")) ?: "?");
        printf("api version        %s\n", json_string_value(json_object_get(res, "api_version")) ?: "?");
        printf("pid                %" JSON_INTEGER_FORMAT "\n", json_integer_value(json_object_get(res, "pid")));
        printf("started at         %s\n", json_string_value(json_object_get(res, "started_at")) ?: "?");
        printf("uptime             %" PRIu64 ".%03" PRIu64 " s\n", up / 1000, up % 1000);
        printf("restarts           %" JSON_INTEGER_FORMAT "\n",
               json_integer_value(json_object_get(res, "restarts")));
        printf("vms                %" JSON_INTEGER_FORMAT "\n", json_integer_value(json_object_get(res, "vms")));
        printf("devices            %" JSON_INTEGER_FORMAT "\n",
               json_integer_value(json_object_get(res, "devices")));
        printf("capabilities       %s\n", caps && *caps ? caps : "-");
        printf("protocol features  %s\n", features);
        free(caps);
        json_decref(res);
        return CTL_EXIT_OK;
}

/* ---- VMs ---- */

/* --hold: keep the connection (and so the VM's ownership) until a signal. */
static int hold(struct ctl *ctl, const char *vm) {
        int sigfd, r;

        sigfd = ctl_signalfd();
        if (sigfd < 0)
                return ctl_fail(CTL_EXIT_LOCAL, "signalfd: %s", strerror(-sigfd));
        if (isatty(STDERR_FILENO))
                fprintf(stderr, "vhubctl: holding VM %s and printing its events; interrupt to let go\n", vm);
        r = ctl_follow_events(ctl, sigfd, 0);
        close(sigfd);
        return r;
}

int cmd_vm_create(struct ctl *ctl, const struct ctl_args *a) {
        const char *linger = ctl_arg(a, "linger-ms");
        json_t *params = ctl_vm_params(ctl, a->pos[0]);
        uint64_t ms;
        int r;

        if (linger) {
                if ((r = ctl_get_u64(ctl, "--linger-ms", linger, 7ull * 24 * 3600 * 1000, &ms)) != 0) {
                        json_decref(params);
                        return r;
                }
                json_object_set_new(params, "linger_ms", json_integer((json_int_t)ms));
        } else if (!ctl_flag(a, "hold")) {
                fprintf(stderr, "vhubctl: note: without --linger-ms the VM is destroyed when vhubctl exits\n");
        }
        r = ctl_call_simple(ctl, "vm.create", params, NULL, 0);
        if (r == CTL_EXIT_OK && ctl_flag(a, "hold"))
                r = hold(ctl, a->pos[0]);
        return r;
}

int cmd_vm_attach(struct ctl *ctl, const struct ctl_args *a) {
        int r = ctl_call_simple(ctl, "vm.attach", ctl_vm_params(ctl, a->pos[0]), NULL, 0);

        if (r == CTL_EXIT_OK && ctl_flag(a, "hold"))
                r = hold(ctl, a->pos[0]);
        return r;
}

int cmd_vm_destroy(struct ctl *ctl, const struct ctl_args *a) {
        return ctl_call_simple(ctl, "vm.destroy", ctl_vm_params(ctl, a->pos[0]), NULL, 0);
}

int cmd_vm_list(struct ctl *ctl, const struct ctl_args *a) {
        struct ctl_table t;
        json_t *res = NULL, *vm;
        size_t i;
        int r;

        r = ctl_query(ctl, "vm.list", json_object(), false, &res);
        if (r != CTL_EXIT_OK || !res)
                return r; /* an error, or --json already printed it */
        if (ctl_table_init(&t, 5, "VM", "UID", "REGIONS", "LINGER", "DEVICES") < 0) {
                json_decref(res);
                return ctl_fail(CTL_EXIT_LOCAL, "out of memory");
        }
        json_array_foreach(json_object_get(res, "vms"), i, vm) {
                json_t *devs = json_object_get(vm, "devices"), *d;
                char uid[24], regions[24], linger[32], *list = NULL;
                uint64_t left;
                size_t len = 0, k;
                FILE *f;

                /* --uid N narrows root's list to that uid's VMs */
                if (ctl->uid_set && json_integer_value(json_object_get(vm, "uid")) != ctl->uid)
                        continue;
                f = open_memstream(&list, &len);
                json_array_foreach(devs, k, d)
                        if (f)
                                fprintf(f, "%s%s", k ? "," : "", json_string_value(d) ?: "?");
                if (f)
                        fclose(f);
                snprintf(uid, sizeof(uid), "%" JSON_INTEGER_FORMAT, json_integer_value(json_object_get(vm, "uid")));
                snprintf(regions, sizeof(regions), "%" JSON_INTEGER_FORMAT,
                         json_integer_value(json_object_get(vm, "regions")));
                /* linger_remaining_ms: only a VM without an owner has it (an extension) */
                if (vhub_json_object_get_u64(vm, "linger_remaining_ms", &left) == 0)
                        snprintf(linger, sizeof(linger), "%" PRIu64 ".%01" PRIu64 " s left", left / 1000,
                                 left % 1000 / 100);
                else
                        snprintf(linger, sizeof(linger), "-");
                ctl_table_add(&t, json_string_value(json_object_get(vm, "vm")), uid, regions, linger,
                              list && *list ? list : "-");
                free(list);
        }
        ctl_table_print(&t);
        ctl_table_done(&t);
        json_decref(res);
        return CTL_EXIT_OK;
}

/* ---- memory ---- */

int cmd_vm_memory_add(struct ctl *ctl, const struct ctl_args *a) {
        const char *memfd = ctl_arg(a, "memfd"), *s;
        uint64_t gpa, size = 0, offset = 0, uaddr;
        bool size_given = false;
        json_t *params;
        int fd = -1, r;

        if ((r = ctl_get_u64(ctl, "GPA", a->pos[1], UINT64_MAX, &gpa)) != 0)
                return r;
        if ((memfd != NULL) == (a->n_pos == 3))
                return ctl_usage_error(ctl, "give either FILE or --memfd SIZE");
        if ((s = ctl_arg(a, "size"))) {
                if ((r = ctl_get_size(ctl, "--size", s, &size)) != 0)
                        return r;
                size_given = true;
        }
        if ((s = ctl_arg(a, "offset")) && (r = ctl_get_size(ctl, "--offset", s, &offset)) != 0)
                return r;
        uaddr = gpa;
        if ((s = ctl_arg(a, "uaddr")) && (r = ctl_get_u64(ctl, "--uaddr", s, UINT64_MAX, &uaddr)) != 0)
                return r;

        if (memfd) {
                uint64_t len;

                if ((r = ctl_get_size(ctl, "--memfd", memfd, &len)) != 0)
                        return r;
                if (len == 0)
                        return ctl_usage_error(ctl, "--memfd wants a size above 0");
                fd = ctl_memfd("guest-ram", len);
                if (fd < 0)
                        return ctl_fail(CTL_EXIT_LOCAL, "memfd of %" PRIu64 " bytes: %s", len, strerror(-fd));
                if (!size_given)
                        size = len > offset ? len - offset : 0;
        } else {
                struct stat st;

                fd = open(a->pos[2], O_RDWR | O_CLOEXEC);
                if (fd < 0)
                        return ctl_fail(CTL_EXIT_LOCAL, "cannot open %s: %s", a->pos[2], strerror(errno));
                if (fstat(fd, &st) < 0) {
                        r = ctl_fail(CTL_EXIT_LOCAL, "cannot stat %s: %s", a->pos[2], strerror(errno));
                        close(fd);
                        return r;
                }
                if (!size_given)
                        size = (uint64_t)st.st_size > offset ? (uint64_t)st.st_size - offset : 0;
        }
        if (size == 0) {
                close(fd);
                return ctl_usage_error(ctl, "the region would be empty (--size, --offset and the file's size)");
        }
        params = json_pack("{s:s, s:o, s:o, s:i}", "vm", a->pos[0], "gpa", vhub_json_u64(gpa), "size",
                           vhub_json_u64(size), "fd", 0);
        if (offset)
                json_object_set_new(params, "offset", vhub_json_u64(offset));
        if (uaddr != gpa)
                json_object_set_new(params, "uaddr", vhub_json_u64(uaddr));
        /* the kernel gives the daemon its own copy; ours closes after the call */
        r = ctl_call_simple(ctl, "vm.memory.add", params, &fd, 1);
        close(fd);
        return r;
}

int cmd_vm_memory_remove(struct ctl *ctl, const struct ctl_args *a) {
        uint64_t gpa;
        json_t *params;
        int r;

        if ((r = ctl_get_u64(ctl, "GPA", a->pos[1], UINT64_MAX, &gpa)) != 0)
                return r;
        params = ctl_vm_params(ctl, a->pos[0]);
        json_object_set_new(params, "gpa", vhub_json_u64(gpa));
        return ctl_call_simple(ctl, "vm.memory.remove", params, NULL, 0);
}

int cmd_vm_memory_list(struct ctl *ctl, const struct ctl_args *a) {
        struct ctl_table t;
        json_t *res = NULL, *g;
        size_t i;
        int r;

        r = ctl_query(ctl, "vm.memory.list", ctl_vm_params(ctl, a->pos[0]), true, &res);
        if (r != CTL_EXIT_OK || !res)
                return r; /* an error, or --json already printed it */
        if (ctl_table_init(&t, 4, "GPA", "SIZE", "OFFSET", "UADDR") < 0) {
                json_decref(res);
                return ctl_fail(CTL_EXIT_LOCAL, "out of memory");
        }
        json_array_foreach(json_object_get(res, "regions"), i, g) {
                char gpa[24], size[32], off[24], uaddr[24];
                uint64_t sz = 0;

                ctl_fmt_u64(json_object_get(g, "gpa"), gpa, sizeof(gpa));
                if (vhub_json_object_get_u64(g, "size", &sz) == 0)
                        ctl_fmt_size(sz, size, sizeof(size));
                else
                        snprintf(size, sizeof(size), "?");
                ctl_fmt_u64(json_object_get(g, "offset"), off, sizeof(off));
                ctl_fmt_u64(json_object_get(g, "uaddr"), uaddr, sizeof(uaddr));
                ctl_table_add(&t, gpa, size, off, uaddr);
        }
        ctl_table_print(&t);
        ctl_table_done(&t);
        json_decref(res);
        return CTL_EXIT_OK;
}

/* ---- dirty log ---- */

static int save_fd_to_file(int fd, uint64_t size, const char *path) {
        char buf[65536];
        uint64_t off = 0;
        int out, r = CTL_EXIT_OK;

        out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (out < 0)
                return ctl_fail(CTL_EXIT_LOCAL, "cannot create %s: %s", path, strerror(errno));
        while (off < size) {
                size_t want = size - off < sizeof(buf) ? (size_t)(size - off) : sizeof(buf);
                ssize_t n = pread(fd, buf, want, (off_t)off);

                if (n <= 0) {
                        r = ctl_fail(CTL_EXIT_LOCAL, "reading the dirty log: %s", n < 0 ? strerror(errno) : "short");
                        break;
                }
                if (write(out, buf, (size_t)n) != n) {
                        r = ctl_fail(CTL_EXIT_LOCAL, "writing %s: %s", path, strerror(errno));
                        break;
                }
                off += (uint64_t)n;
        }
        if (close(out) < 0 && r == CTL_EXIT_OK)
                r = ctl_fail(CTL_EXIT_LOCAL, "writing %s: %s", path, strerror(errno));
        return r;
}

int cmd_vm_dirty_log_start(struct ctl *ctl, const struct ctl_args *a) {
        const char *save = ctl_arg(a, "save");
        json_t *res = NULL;
        int *fds = NULL;
        unsigned n_fds = 0;
        uint64_t size = 0, idx = 0;
        char human[32];
        int r;

        r = ctl_call(ctl, "vm.dirty_log.start", ctl_vm_params(ctl, a->pos[0]), true, NULL, 0, &res, &fds, &n_fds);
        if (r != CTL_EXIT_OK)
                return r;
        (void)vhub_json_object_get_u64(res, "size", &size);
        if (save) {
                if (vhub_json_object_get_u64(res, "fd", &idx) < 0 || idx >= n_fds)
                        r = ctl_fail(CTL_EXIT_LOCAL, "the answer carries no log fd to save");
                else
                        r = save_fd_to_file(fds[idx], size, save);
        }
        if (ctl->json) {
                ctl_print_json(res);
        } else {
                ctl_fmt_size(size, human, sizeof(human));
                printf("dirty log: %s, one bit per 4 KiB page (the daemon keeps logging after vhubctl exits)\n",
                       human);
        }
        vhub_client_close_fds(fds, n_fds);
        json_decref(res);
        return r;
}

int cmd_vm_dirty_log_stop(struct ctl *ctl, const struct ctl_args *a) {
        return ctl_call_simple(ctl, "vm.dirty_log.stop", ctl_vm_params(ctl, a->pos[0]), NULL, 0);
}

/* ---- shared objects ---- */

int cmd_shared_object_add(struct ctl *ctl, const struct ctl_args *a) {
        const char *memfd = ctl_arg(a, "memfd");
        json_t *params;
        int fd, r;

        if ((memfd != NULL) == (a->n_pos == 3))
                return ctl_usage_error(ctl, "give either FILE or --memfd SIZE");
        if (memfd) {
                uint64_t len;

                if ((r = ctl_get_size(ctl, "--memfd", memfd, &len)) != 0)
                        return r;
                fd = ctl_memfd("shared-object", len);
                if (fd < 0)
                        return ctl_fail(CTL_EXIT_LOCAL, "memfd: %s", strerror(-fd));
        } else {
                fd = open(a->pos[2], O_RDWR | O_CLOEXEC);
                if (fd < 0 && (errno == EACCES || errno == EISDIR || errno == EROFS))
                        fd = open(a->pos[2], O_RDONLY | O_CLOEXEC);
                if (fd < 0)
                        return ctl_fail(CTL_EXIT_LOCAL, "cannot open %s: %s", a->pos[2], strerror(errno));
        }
        params = json_pack("{s:s, s:s, s:i}", "vm", a->pos[0], "uuid", a->pos[1], "fd", 0);
        r = ctl_call_simple(ctl, "shared_object.add", params, &fd, 1);
        close(fd);
        return r;
}

int cmd_shared_object_remove(struct ctl *ctl, const struct ctl_args *a) {
        json_t *params = ctl_vm_params(ctl, a->pos[0]);

        json_object_set_new(params, "uuid", json_string(a->pos[1]));
        return ctl_call_simple(ctl, "shared_object.remove", params, NULL, 0);
}

int cmd_shared_object_list(struct ctl *ctl, const struct ctl_args *a) {
        struct ctl_table t;
        json_t *res = NULL, *o;
        size_t i;
        int r;

        r = ctl_query(ctl, "shared_object.list", ctl_vm_params(ctl, a->pos[0]), true, &res);
        if (r != CTL_EXIT_OK || !res)
                return r; /* an error, or --json already printed it */
        if (ctl_table_init(&t, 2, "UUID", "OWNER") < 0) {
                json_decref(res);
                return ctl_fail(CTL_EXIT_LOCAL, "out of memory");
        }
        json_array_foreach(json_object_get(res, "objects"), i, o)
                ctl_table_add(&t, json_string_value(json_object_get(o, "uuid")),
                              json_string_value(json_object_get(o, "owner")));
        ctl_table_print(&t);
        ctl_table_done(&t);
        json_decref(res);
        return CTL_EXIT_OK;
}
