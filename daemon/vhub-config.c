/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-config.h"
#include "vhub-log.h"
#include "vhub-version.h"

void vhub_config_init(struct vhub_config *c) {
        memset(c, 0, sizeof(*c));
        c->control_mode = 0660;
        c->control_gid = (gid_t)-1;
        c->backend_timeout_ms = 5000;
        c->log_level = LOG_INFO;
        c->reconnect_max_ms = 2000;
        c->limits = (struct vhub_limits){
                .vms_per_uid = 64,
                .devices_per_vm = 64,
                .regions_per_vm = VHUB_DAEMON_MEM_SLOTS,
                .connections = 256,
                .pending_per_connection = 256,
                .max_line = 1024 * 1024,
                .max_output_bytes = 4 * 1024 * 1024,
                .shared_objects_per_vm = 1024,
                .backend_requests_pending = 64,
        };
}

void vhub_config_done(struct vhub_config *c) {
        for (size_t i = 0; i < c->n_backend_dirs; i++)
                free(c->backend_dirs[i]);
        free(c->backend_dirs);
        free(c->control_path);
        free(c->log_level_file);
        free(c->vmm_dir);
        memset(c, 0, sizeof(*c));
}

static int backend_dirs_append(struct vhub_config *c, const char *dir) {
        char **v = reallocarray(c->backend_dirs, c->n_backend_dirs + 1, sizeof(*v));

        if (!v)
                return -ENOMEM;
        c->backend_dirs = v;
        v[c->n_backend_dirs] = strdup(dir);
        if (!v[c->n_backend_dirs])
                return -ENOMEM;
        c->n_backend_dirs++;
        return 0;
}

int vhub_config_add_backend_dir(struct vhub_config *c, const char *dir) {
        char resolved[PATH_MAX];

        if (!realpath(dir, resolved))
                return -errno;
        return backend_dirs_append(c, resolved);
}

static int parse_unsigned(const char *s, unsigned long max, unsigned long *ret) {
        char *end;
        unsigned long v;

        errno = 0;
        v = strtoul(s, &end, 0);
        if (errno || end == s || *end || v > max || s[0] == '-')
                return -EINVAL;
        *ret = v;
        return 0;
}

static void usage(FILE *f) {
        fprintf(f,
                "Usage: vhubd [OPTIONS]\n"
                "vhost-user front-end for many back-ends, driven by VMMs over JSON-RPC.\n\n"
                "  --control PATH           control socket (default: $RUNTIME_DIRECTORY/control.sock,\n"
                "                           /run/vhub/control.sock as root, else $XDG_RUNTIME_DIR/vhub/control.sock)\n"
                "  --control-mode MODE      control socket mode, octal (default 0660)\n"
                "  --control-group GROUP    group owning the control socket\n"
                "  --backend-dir DIR        allowed back-end socket directory (repeatable;\n"
                "                           default /run/vhost-user)\n"
                "  --backend-timeout-ms N   deadline for every back-end request (default 5000)\n"
                "  --reconnect-max-ms N     cap of the reconnect backoff (default 2000)\n"
                "  --vmm-dir DIR            where front-door sockets are made (default:\n"
                "                           $RUNTIME_DIRECTORY/vmm, else /run/vhub/vmm)\n"
                "  --log-level LEVEL        err, warning, notice, info (default), debug\n"
                "  --log-level-file PATH    if it exists, its LEVEL overrides --log-level;\n"
                "                           read at start and on SIGHUP\n"
                "  --max-vms-per-uid N, --max-devices-per-vm N, --max-regions-per-vm N,\n"
                "  --max-connections N, --max-pending N, --max-line-bytes N\n"
                "                           resource limits\n"
                "  --max-connections-per-uid N\n"
                "                           control connections one non-root uid may hold\n"
                "                           (default: a quarter of --max-connections)\n"
                "  --max-fds-per-uid N      fds one non-root uid may make the daemon hold (default:\n"
                "                           a quarter of RLIMIT_NOFILE once an eighth is reserved)\n"
                "  --no-fd-store            keep no fd in the service manager's fd store\n"
                "                           (used when $NOTIFY_SOCKET is set)\n"
                "  -h, --help, --version\n");
}

/* An option's string: a copy replaces the one before. */
static int set_string(char **slot, const char *value) {
        char *copy = strdup(value);

        if (!copy)
                return -ENOMEM;
        free(*slot);
        *slot = copy;
        return 0;
}

static int parse_control_mode(struct vhub_config *c, const char *arg) {
        unsigned long v;

        if (parse_unsigned(arg, 07777, &v) < 0 || arg[0] != '0') {
                fprintf(stderr, "vhubd: --control-mode wants an octal mode like 0660\n");
                return -EINVAL;
        }
        c->control_mode = (mode_t)strtoul(arg, NULL, 8);
        return 0;
}

/* A group name, or a numeric gid. */
static int parse_control_group(struct vhub_config *c, const char *arg) {
        struct group *g = getgrnam(arg);
        unsigned long v;

        if (g)
                c->control_gid = g->gr_gid;
        else if (parse_unsigned(arg, UINT32_MAX - 1, &v) == 0)
                c->control_gid = (gid_t)v;
        else {
                fprintf(stderr, "vhubd: no such group: %s\n", arg);
                return -EINVAL;
        }
        c->control_gid_set = true;
        return 0;
}

/* --backend-timeout-ms, --reconnect-max-ms: 1 ms to an hour. */
static int parse_ms(const char *option, const char *arg, unsigned *ret) {
        unsigned long v;

        if (parse_unsigned(arg, 3600000, &v) < 0 || v == 0) {
                fprintf(stderr, "vhubd: --%s wants 1..3600000\n", option);
                return -EINVAL;
        }
        *ret = (unsigned)v;
        return 0;
}

static int parse_vmm_dir(struct vhub_config *c, const char *arg) {
        if (arg[0] != '/') {
                fprintf(stderr, "vhubd: --vmm-dir wants an absolute path\n");
                return -EINVAL;
        }
        return set_string(&c->vmm_dir, arg);
}

enum {
        OPT_CONTROL = 256, OPT_MODE, OPT_GROUP, OPT_BACKEND_DIR, OPT_TIMEOUT, OPT_LOG,
        OPT_RECONNECT_MAX, OPT_MAX_VMS, OPT_MAX_DEVICES, OPT_MAX_REGIONS, OPT_MAX_CONN,
        OPT_MAX_PENDING, OPT_MAX_LINE, OPT_MAX_FDS, OPT_VERSION, OPT_LOG_FILE, OPT_VMM_DIR,
        OPT_MAX_CONN_UID, OPT_NO_FD_STORE,
};

/* --max-*: the limit each sets (an unsigned of struct vhub_limits) and its ceiling. */
static const struct limit_option {
        int option;
        size_t offset;
        unsigned long max;
} limit_options[] = {
        { OPT_MAX_VMS, offsetof(struct vhub_limits, vms_per_uid), 1000000 },
        { OPT_MAX_DEVICES, offsetof(struct vhub_limits, devices_per_vm), 1000000 },
        { OPT_MAX_REGIONS, offsetof(struct vhub_limits, regions_per_vm), 1000000 },
        { OPT_MAX_CONN, offsetof(struct vhub_limits, connections), 1000000 },
        { OPT_MAX_CONN_UID, offsetof(struct vhub_limits, connections_per_uid), 1000000 },
        { OPT_MAX_PENDING, offsetof(struct vhub_limits, pending_per_connection), 1000000 },
        { OPT_MAX_FDS, offsetof(struct vhub_limits, fds_per_uid), 1ul << 30 },
};

/* A --max-* option: 1 up to its ceiling. */
static int parse_limit(struct vhub_limits *l, int o, const char *arg) {
        unsigned long max = 64ul << 20, v;      /* --max-line-bytes, a size_t */
        const struct limit_option *lo = NULL;

        for (size_t i = 0; i < sizeof(limit_options) / sizeof(limit_options[0]); i++)
                if (limit_options[i].option == o)
                        lo = &limit_options[i];
        if (lo)
                max = lo->max;
        if (parse_unsigned(arg, max, &v) < 0 || v == 0) {
                fprintf(stderr, "vhubd: bad value for a limit: %s\n", arg);
                return -EINVAL;
        }
        if (!lo)
                l->max_line = v;
        else
                *(unsigned *)((char *)l + lo->offset) = (unsigned)v;
        if (l->regions_per_vm > VHUB_DAEMON_MEM_SLOTS)
                l->regions_per_vm = VHUB_DAEMON_MEM_SLOTS;
        return 0;
}

/* Without --backend-dir: /run/vhost-user, kept even before it exists. */
static int backend_dir_default(struct vhub_config *c) {
        int r = vhub_config_add_backend_dir(c, "/run/vhost-user");

        if (r == -ENOENT)
                r = backend_dirs_append(c, "/run/vhost-user");
        return r;
}

/* One option; 1 when the process is done (--help, --version). */
static int parse_option(struct vhub_config *c, int o, const char *arg) {
        int r;

        switch (o) {
        case OPT_CONTROL:
                return set_string(&c->control_path, arg);
        case OPT_MODE:
                return parse_control_mode(c, arg);
        case OPT_GROUP:
                return parse_control_group(c, arg);
        case OPT_BACKEND_DIR:
                r = vhub_config_add_backend_dir(c, arg);
                if (r < 0) {
                        fprintf(stderr, "vhubd: --backend-dir %s: %s\n", arg, strerror(-r));
                        return -EINVAL;
                }
                return 0;
        case OPT_TIMEOUT:
                return parse_ms("backend-timeout-ms", arg, &c->backend_timeout_ms);
        case OPT_RECONNECT_MAX:
                return parse_ms("reconnect-max-ms", arg, &c->reconnect_max_ms);
        case OPT_LOG:
                r = vhub_log_level_from_string(arg);
                if (r < 0) {
                        fprintf(stderr, "vhubd: bad --log-level %s\n", arg);
                        return -EINVAL;
                }
                c->log_level = r;
                return 0;
        case OPT_VMM_DIR:
                return parse_vmm_dir(c, arg);
        case OPT_LOG_FILE:
                return set_string(&c->log_level_file, arg);
        case OPT_MAX_VMS:
        case OPT_MAX_DEVICES:
        case OPT_MAX_REGIONS:
        case OPT_MAX_CONN:
        case OPT_MAX_CONN_UID:
        case OPT_MAX_PENDING:
        case OPT_MAX_LINE:
        case OPT_MAX_FDS:
                return parse_limit(&c->limits, o, arg);
        case OPT_NO_FD_STORE:
                c->no_fd_store = true;
                return 0;
        case 'h':
                usage(stdout);
                return 1;
        case OPT_VERSION:
                printf("vhubd %s\n", VHUB_VERSION);
                return 1;
        default:
                usage(stderr);
                return -EINVAL;
        }
}

int vhub_config_parse_args(struct vhub_config *c, int argc, char **argv) {
        static const struct option opts[] = {
                { "control", required_argument, NULL, OPT_CONTROL },
                { "control-mode", required_argument, NULL, OPT_MODE },
                { "control-group", required_argument, NULL, OPT_GROUP },
                { "backend-dir", required_argument, NULL, OPT_BACKEND_DIR },
                { "backend-timeout-ms", required_argument, NULL, OPT_TIMEOUT },
                { "reconnect-max-ms", required_argument, NULL, OPT_RECONNECT_MAX },
                { "log-level", required_argument, NULL, OPT_LOG },
                { "log-level-file", required_argument, NULL, OPT_LOG_FILE },
                { "vmm-dir", required_argument, NULL, OPT_VMM_DIR },
                { "max-vms-per-uid", required_argument, NULL, OPT_MAX_VMS },
                { "max-devices-per-vm", required_argument, NULL, OPT_MAX_DEVICES },
                { "max-regions-per-vm", required_argument, NULL, OPT_MAX_REGIONS },
                { "max-connections", required_argument, NULL, OPT_MAX_CONN },
                { "max-connections-per-uid", required_argument, NULL, OPT_MAX_CONN_UID },
                { "max-pending", required_argument, NULL, OPT_MAX_PENDING },
                { "max-line-bytes", required_argument, NULL, OPT_MAX_LINE },
                { "max-fds-per-uid", required_argument, NULL, OPT_MAX_FDS },
                { "no-fd-store", no_argument, NULL, OPT_NO_FD_STORE },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, OPT_VERSION },
                {}
        };
        bool dirs_given = false;
        int o, r;

        optind = 1;
        while ((o = getopt_long(argc, argv, "h", opts, NULL)) >= 0) {
                r = parse_option(c, o, optarg);
                if (r != 0)
                        return r;
                dirs_given |= o == OPT_BACKEND_DIR;
        }
        if (optind < argc) {
                fprintf(stderr, "vhubd: unexpected argument %s\n", argv[optind]);
                return -EINVAL;
        }
        return dirs_given ? 0 : backend_dir_default(c);
}
