/* SPDX-License-Identifier: MIT */
/*
 * vhubctl: the operator's command-line client for vhubd's control API
 * (docs/control-api.md).  One subcommand per method; readable tables
 * by default, the daemon's JSON with --json.
 *
 * Every command returns an exit status (enum ctl_exit), never exits itself:
 * main() frees the connection and whatever fds were opened on every path.
 */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "vhub-client.h"

/* Exit status, as documented in vhubctl(1) "EXIT STATUS". */
enum ctl_exit {
        CTL_EXIT_OK = 0,
        CTL_EXIT_DAEMON_ERROR = 1,      /* the daemon answered with an error */
        CTL_EXIT_USAGE = 2,             /* bad command line */
        CTL_EXIT_CONNECT = 3,           /* cannot connect; connection lost; no answer in time */
        CTL_EXIT_LOCAL = 4,             /* a local failure: file, memfd, pipe, memory */
};

/* Global options and the (lazily opened) connection. */
struct ctl {
        const char *socket_path;        /* NULL: vhub_client_default_socket_path() */
        bool json;
        bool uid_set;
        uint32_t uid;
        int timeout_ms;                 /* per call; -1 = forever */
        struct vhub_client *client;
        const struct ctl_command *cmd;  /* the command being run, for usage errors */
};

/* ---- command-line arguments of one command ---- */

#define CTL_MAX_OPTS 16
#define CTL_MAX_POS 8
#define CTL_MAX_OCCURRENCES 64

struct ctl_opt_spec {
        const char *name;               /* long name without "--" */
        const char *arg;                /* its value as help names it ("N"); NULL: a flag */
        bool repeatable;
        const char *help;               /* what it does, for `vhubctl help COMMAND` */
};

struct ctl_args {
        const char *pos[CTL_MAX_POS];
        unsigned n_pos;
        /* every option occurrence in command-line order */
        struct {
                unsigned spec;
                const char *value;      /* NULL for flags */
        } occ[CTL_MAX_OCCURRENCES];
        unsigned n_occ;
        const struct ctl_opt_spec *specs;
};

struct ctl_command {
        const char *words;              /* "vm memory add" */
        const char *synopsis;           /* arguments, after the words */
        const char *summary;            /* one line for the command list */
        const char *description;        /* what `vhubctl help COMMAND` says it does */
        const char *example;            /* command lines, one per line */
        const struct ctl_opt_spec *opts;/* {NULL}-terminated, may be NULL */
        unsigned min_pos, max_pos;
        int (*run)(struct ctl *ctl, const struct ctl_args *a);
};

/* The command table (vhubctl-commands.c). */
extern const struct ctl_command ctl_commands[];
extern const size_t ctl_n_commands;
/* "Usage: vhubctl WORDS SYNOPSIS" alone (usage errors). */
void ctl_print_command_usage(FILE *f, const struct ctl_command *cmd);
/* Usage, description, every option with its help, an example. */
void ctl_print_command_help(FILE *f, const struct ctl_command *cmd);

int ctl_args_parse(const struct ctl_command *cmd, int argc, char **argv, struct ctl_args *ret,
                   char *errbuf, size_t errlen);
/* Last value of option name (NULL if absent); for flags, "" if present. */
const char *ctl_arg(const struct ctl_args *a, const char *name);
bool ctl_flag(const struct ctl_args *a, const char *name);

/* Print "vhubctl: <msg>" and the command's synopsis to stderr; CTL_EXIT_USAGE. */
int ctl_usage_error(const struct ctl *ctl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Print "vhubctl: <msg>" to stderr; returns code. */
int ctl_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Numbers: decimal or 0x hex; sizes also take K, M, G, T suffixes (binary). */
int ctl_parse_u64(const char *s, uint64_t *ret);
int ctl_parse_size(const char *s, uint64_t *ret);
/* Parse an option/argument or report a usage error naming it. */
int ctl_get_u64(const struct ctl *ctl, const char *what, const char *s, uint64_t max, uint64_t *ret);
int ctl_get_size(const struct ctl *ctl, const char *what, const char *s, uint64_t *ret);

/* ---- talking to the daemon ---- */

/*
 * One call: params stolen (NULL: none).  With add_uid, "uid" is added when
 * --uid was given (methods that name a VM).  On success 0, *ret_result (may
 * be NULL: dropped) and the fds the response carried (ret_fds NULL: closed).
 * On failure the error is printed and the exit status returned.
 */
int ctl_call(struct ctl *ctl, const char *method, json_t *params, bool add_uid, const int *fds,
             unsigned n_fds, json_t **ret_result, int **ret_fds, unsigned *ret_n_fds);
/*
 * ctl_call() without fds for a command that shows its result: with --json
 * the result is printed here and *ret_result is NULL; otherwise the caller
 * gets it to format.
 */
int ctl_query(struct ctl *ctl, const char *method, json_t *params, bool add_uid, json_t **ret_result);
/* ctl_call() (with the uid) for a command whose result is {}: prints nothing
 * on success, {} with --json. */
int ctl_call_simple(struct ctl *ctl, const char *method, json_t *params, const int *fds, unsigned n_fds);
/* Connect if not yet connected; prints and returns CTL_EXIT_CONNECT on failure. */
int ctl_connect(struct ctl *ctl);
/* Print a daemon error response to stderr (and, with --json, to stdout). */
void ctl_print_error(const struct ctl *ctl, const char *method, const struct vhub_client_error *e);
/* {"vm": name} plus "uid" when --uid was given. */
json_t *ctl_vm_params(const struct ctl *ctl, const char *vm);

/* ---- output ---- */

/* A table: rows of strings, columns padded to the widest cell. */
struct ctl_table {
        unsigned n_cols, n_rows, cap_rows;
        char **cells;                   /* n_rows * n_cols, row 0 is the header */
};

int ctl_table_init(struct ctl_table *t, unsigned n_cols, ...);   /* header names */
int ctl_table_add(struct ctl_table *t, ...);                     /* n_cols strings, copied */
void ctl_table_print(const struct ctl_table *t);
void ctl_table_done(struct ctl_table *t);

/* The result as one compact JSON line on stdout (--json); NULL prints {}. */
void ctl_print_json(const json_t *v);
/* "0x1f" for integers and "0x…" strings; "?" when malformed. */
void ctl_fmt_u64(const json_t *v, char *buf, size_t len);
/* "64 MiB" when exact, else bytes. */
void ctl_fmt_size(uint64_t size, char *buf, size_t len);
/* ---- feature names (vhubctl-features.c) ---- */

/* A virtio feature bit's name: a generic one, else type's own ("blk", "net",
 * ...; NULL: generic names only); NULL if it has none. */
const char *ctl_virtio_feature_name(const char *type, unsigned bit);
/* Names of the set bits, comma-separated ("bitN" for unnamed ones, "-" for none). */
void ctl_fmt_virtio_features(const char *type, uint64_t mask, char *buf, size_t len);
void ctl_fmt_protocol_features(uint64_t mask, char *buf, size_t len);
/* "0x1f (NAME,NAME)" from a u64 JSON value ("?" if malformed). */
void ctl_fmt_features_line(const json_t *v, bool protocol, const char *type, char *buf, size_t len);

/* ---- signals for the commands that wait (events, --hold) ---- */

/* Block SIGINT/SIGTERM and return a signalfd for them (-errno on failure). */
int ctl_signalfd(void);
/*
 * Print events (the connection's own and subscribed ones) until a signal
 * arrives on sigfd, the connection closes, or max_events (0: no limit) have
 * been printed.  Returns an exit status.
 */
int ctl_follow_events(struct ctl *ctl, int sigfd, uint64_t max_events);

/* ---- commands ---- */

int cmd_daemon_info(struct ctl *ctl, const struct ctl_args *a);
int cmd_vm_create(struct ctl *ctl, const struct ctl_args *a);
int cmd_vm_attach(struct ctl *ctl, const struct ctl_args *a);
int cmd_vm_destroy(struct ctl *ctl, const struct ctl_args *a);
int cmd_vm_list(struct ctl *ctl, const struct ctl_args *a);
int cmd_vm_memory_add(struct ctl *ctl, const struct ctl_args *a);
int cmd_vm_memory_remove(struct ctl *ctl, const struct ctl_args *a);
int cmd_vm_memory_list(struct ctl *ctl, const struct ctl_args *a);
int cmd_vm_dirty_log_start(struct ctl *ctl, const struct ctl_args *a);
int cmd_vm_dirty_log_stop(struct ctl *ctl, const struct ctl_args *a);
int cmd_shared_object_add(struct ctl *ctl, const struct ctl_args *a);
int cmd_shared_object_remove(struct ctl *ctl, const struct ctl_args *a);
int cmd_shared_object_list(struct ctl *ctl, const struct ctl_args *a);

int cmd_device_add(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_remove(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_list(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_stats(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_start(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_stop(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_reset(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_kick(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_config_get(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_config_set(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_net_rarp(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_net_mtu(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_state_save(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_state_load(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_state_check(struct ctl *ctl, const struct ctl_args *a);
int cmd_device_backend_reply(struct ctl *ctl, const struct ctl_args *a);

int cmd_events(struct ctl *ctl, const struct ctl_args *a);
int cmd_call(struct ctl *ctl, const struct ctl_args *a);

/* A memfd of size bytes, sealed against shrinking ("vhubctl" + name). */
int ctl_memfd(const char *name, uint64_t size);
