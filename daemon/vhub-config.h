/* SPDX-License-Identifier: MIT */
/* The daemon's settings: command line, defaults and resource limits. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define VHUB_MAX_QUEUES 256           /* ring index travels in 8 bits */
#define VHUB_DAEMON_MEM_SLOTS 512     /* the daemon's own memory slot limit */

struct vhub_limits {
        unsigned vms_per_uid;
        unsigned devices_per_vm;
        unsigned regions_per_vm;
        unsigned connections;
        unsigned connections_per_uid;       /* one non-root uid's; 0: a quarter of connections */
        unsigned pending_per_connection;
        size_t max_line;
        size_t max_output_bytes;
        unsigned shared_objects_per_vm;
        unsigned backend_requests_pending;  /* forwarded back-end requests per device */
        unsigned fds_per_uid;               /* 0: derived from RLIMIT_NOFILE (vhub-fd-budget.h) */
};

struct vhub_config {
        char *control_path;          /* NULL: the contract's default */
        mode_t control_mode;
        gid_t control_gid;           /* (gid_t)-1: unchanged */
        bool control_gid_set;
        char **backend_dirs;         /* canonical (realpath) directories */
        size_t n_backend_dirs;
        unsigned backend_timeout_ms;
        int log_level;
        char *log_level_file;        /* NULL: none; else read at start and on SIGHUP */
        unsigned reconnect_max_ms;   /* backoff cap */
        char *vmm_dir;               /* --vmm-dir; NULL: the contract's default */
        bool no_fd_store;            /* --no-fd-store: keep nothing in systemd's fd store */
        struct vhub_limits limits;
};

void vhub_config_init(struct vhub_config *c);
void vhub_config_done(struct vhub_config *c);
/*
 * Parse argv.  Returns 0 to run, 1 when --help/--version was handled (exit
 * 0), -EINVAL with a message on stderr for bad usage.
 */
int vhub_config_parse_args(struct vhub_config *c, int argc, char **argv);
/* Add a back-end directory (resolved with realpath; it must exist). */
int vhub_config_add_backend_dir(struct vhub_config *c, const char *dir);
