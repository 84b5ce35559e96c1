/* SPDX-License-Identifier: MIT */
/*
 * vhubctl: global options, finding the command, help, and the one call
 * path every command goes through (ctl_call).  The commands themselves are
 * in vhubctl-commands.c.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-version.h"
#include "vhubctl.h"

#define DEFAULT_TIMEOUT_MS 60000

static void print_usage(FILE *f) {
        fprintf(f,
                "Usage: vhubctl [OPTIONS] COMMAND [ARGS]\n"
                "Operate vhubd, the vhost-user front-end, over its control socket.\n\n"
                "Options (anywhere on the command line):\n"
                "  --socket PATH   control socket (default: $VHUB_SOCKET, /run/vhub/control.sock as\n"
                "                  root, else $XDG_RUNTIME_DIR/vhub/control.sock)\n"
                "  --json          print the daemon's JSON result (one line) instead of a table\n"
                "  --uid N         (root) name a VM of another uid\n"
                "  --timeout MS    give up on an answer after MS milliseconds (default %d, 0: never)\n"
                "  -h, --help      this text; after a command, that command's help\n"
                "  --version\n\n"
                "Commands:\n",
                DEFAULT_TIMEOUT_MS);
        for (size_t i = 0; i < ctl_n_commands; i++)
                fprintf(f, "  %-22s %s\n", ctl_commands[i].words, ctl_commands[i].summary);
        fprintf(f, "\nExit status: 0 success, 1 the daemon answered with an error, 2 usage error,\n"
                   "3 cannot connect (or the connection was lost, or no answer in time), 4 local failure.\n"
                   "'vhubctl help COMMAND' (or 'vhubctl COMMAND --help') tells what a command does, with\n"
                   "every option and an example.  See vhubctl(1).\n");
}

/* "vhubctl: MESSAGE" on a line of its own on stderr */
static void print_message(const char *fmt, va_list ap) __attribute__((format(printf, 1, 0)));
static void print_message(const char *fmt, va_list ap) {
        fputs("vhubctl: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
}

int ctl_fail(int code, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        print_message(fmt, ap);
        va_end(ap);
        return code;
}

int ctl_usage_error(const struct ctl *ctl, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        print_message(fmt, ap);
        va_end(ap);
        if (ctl && ctl->cmd)
                ctl_print_command_usage(stderr, ctl->cmd);
        else
                fputs("Try 'vhubctl --help'.\n", stderr);
        return CTL_EXIT_USAGE;
}

/* ---- the connection ---- */

int ctl_connect(struct ctl *ctl) {
        char *path = NULL;
        int r;

        if (ctl->client)
                return CTL_EXIT_OK;
        if (ctl->socket_path)
                path = strdup(ctl->socket_path);
        else if (vhub_client_default_socket_path(&path) < 0)
                path = NULL;
        if (!path)
                return ctl_fail(CTL_EXIT_LOCAL, "out of memory");
        r = vhub_client_connect(path, &ctl->client);
        if (r < 0) {
                ctl_fail(CTL_EXIT_CONNECT, "cannot connect to %s: %s", path, strerror(-r));
                free(path);
                return CTL_EXIT_CONNECT;
        }
        free(path);
        return CTL_EXIT_OK;
}

json_t *ctl_vm_params(const struct ctl *ctl, const char *vm) {
        return json_pack("{s:s}", "vm", vm);
}

void ctl_print_error(const struct ctl *ctl, const char *method, const struct vhub_client_error *e) {
        const char *known = vhub_contract_error_message(e->code);
        /* the daemon always sends a message; an empty one is named from the code */
        const char *message = e->message[0] ? e->message : known ? known : "error";

        fprintf(stderr, "vhubctl: %s: error %d (%s)", method, e->code, message);
        if (e->detail[0])
                fprintf(stderr, ": %s", e->detail);
        if (e->device[0] || e->request[0])
                fprintf(stderr, " (device %s, request %s)", e->device[0] ? e->device : "-",
                        e->request[0] ? e->request : "-");
        fputc('\n', stderr);
        if (ctl->json) {
                json_t *data = json_object(), *err;

                if (e->detail[0])
                        json_object_set_new(data, "detail", json_string(e->detail));
                if (e->device[0])
                        json_object_set_new(data, "device", json_string(e->device));
                if (e->request[0])
                        json_object_set_new(data, "request", json_string(e->request));
                err = json_pack("{s:{s:i, s:s, s:o}}", "error", "code", e->code, "message", message,
                                "data", data);
                ctl_print_json(err);
                json_decref(err);
        }
}

int ctl_query(struct ctl *ctl, const char *method, json_t *params, bool add_uid, json_t **ret_result) {
        json_t *res = NULL;
        int r;

        *ret_result = NULL;
        r = ctl_call(ctl, method, params, add_uid, NULL, 0, &res, NULL, NULL);
        if (r != CTL_EXIT_OK)
                return r;
        if (ctl->json) {
                ctl_print_json(res);
                json_decref(res);
                return CTL_EXIT_OK;
        }
        *ret_result = res;
        return CTL_EXIT_OK;
}

int ctl_call_simple(struct ctl *ctl, const char *method, json_t *params, const int *fds, unsigned n_fds) {
        json_t *result = NULL;
        int r;

        r = ctl_call(ctl, method, params, true, fds, n_fds, &result, NULL, NULL);
        if (r == CTL_EXIT_OK && ctl->json)
                ctl_print_json(result);
        json_decref(result);
        return r;
}

int ctl_call(struct ctl *ctl, const char *method, json_t *params, bool add_uid, const int *fds,
             unsigned n_fds, json_t **ret_result, int **ret_fds, unsigned *ret_n_fds) {
        struct vhub_client_error e = { 0 };
        json_t *result = NULL;
        int *rfds = NULL;
        unsigned n_rfds = 0;
        int r;

        r = ctl_connect(ctl);
        if (r != CTL_EXIT_OK) {
                json_decref(params);
                return r;
        }
        if (add_uid && ctl->uid_set && params)
                json_object_set_new(params, "uid", json_integer(ctl->uid));
        r = vhub_client_call(ctl->client, method, params, fds, n_fds, ctl->timeout_ms, &result, &rfds,
                             &n_rfds, &e);
        if (r == -EREMOTEIO) {
                ctl_print_error(ctl, method, &e);
                return CTL_EXIT_DAEMON_ERROR;
        }
        if (r == -EPROTO) {
                ctl_print_error(ctl, method, &e);
                return ctl_fail(CTL_EXIT_CONNECT, "%s: the daemon closed the connection", method);
        }
        if (r == -ETIMEDOUT)
                return ctl_fail(CTL_EXIT_CONNECT, "%s: no answer within %d ms", method, ctl->timeout_ms);
        if (r < 0)
                return ctl_fail(CTL_EXIT_CONNECT, "%s: %s", method,
                                r == -ECONNRESET || r == -EPIPE ? "the daemon closed the connection"
                                                                : strerror(-r));
        if (ret_result)
                *ret_result = result;
        else
                json_decref(result);
        if (ret_fds) {
                *ret_fds = rfds;
                *ret_n_fds = n_rfds;
        } else {
                vhub_client_close_fds(rfds, n_rfds);
        }
        return CTL_EXIT_OK;
}

/* ---- global options ---- */

static int take_global(struct ctl *ctl, int *i, int argc, char **argv, bool *ret_taken, bool *ret_help,
                       bool *ret_version) {
        const char *a = argv[*i], *val = NULL;
        static const char *const with_arg[] = { "socket", "uid", "timeout" };
        uint64_t v;

        *ret_taken = false;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
                *ret_help = *ret_taken = true;
                return 0;
        }
        if (strcmp(a, "--version") == 0) {
                *ret_version = *ret_taken = true;
                return 0;
        }
        if (strcmp(a, "--json") == 0) {
                ctl->json = *ret_taken = true;
                return 0;
        }
        for (size_t k = 0; k < sizeof(with_arg) / sizeof(with_arg[0]); k++) {
                size_t n = strlen(with_arg[k]);

                if (strncmp(a, "--", 2) != 0 || strncmp(a + 2, with_arg[k], n) != 0)
                        continue;
                if (a[2 + n] == '=')
                        val = a + 3 + n;
                else if (a[2 + n] == '\0') {
                        if (*i + 1 >= argc)
                                return ctl_usage_error(NULL, "option --%s needs a value", with_arg[k]);
                        val = argv[++*i];
                } else
                        continue;
                *ret_taken = true;
                if (k == 0) {
                        ctl->socket_path = val;
                } else if (k == 1) {
                        if (ctl_parse_u64(val, &v) < 0 || v > UINT32_MAX - 1)
                                return ctl_usage_error(NULL, "--uid wants a uid, not '%s'", val);
                        ctl->uid = (uint32_t)v;
                        ctl->uid_set = true;
                } else {
                        if (ctl_parse_u64(val, &v) < 0 || v > INT32_MAX)
                                return ctl_usage_error(NULL, "--timeout wants milliseconds, not '%s'", val);
                        ctl->timeout_ms = v == 0 ? -1 : (int)v;
                }
                return 0;
        }
        return 0;
}

/* The command whose words are the longest prefix of words[]. */
static const struct ctl_command *find_command(char **words, int n_words, int *ret_used) {
        const struct ctl_command *best = NULL;
        int best_used = 0;

        for (size_t i = 0; i < ctl_n_commands; i++) {
                const char *w = ctl_commands[i].words;
                int used = 0;
                bool match = true;

                while (*w) {
                        size_t len = strcspn(w, " ");

                        if (used >= n_words || strlen(words[used]) != len || strncmp(words[used], w, len) != 0) {
                                match = false;
                                break;
                        }
                        used++;
                        w += len;
                        w += strspn(w, " ");
                }
                if (match && used > best_used) {
                        best = &ctl_commands[i];
                        best_used = used;
                }
        }
        *ret_used = best_used;
        return best;
}

/* "vm memory" alone: list the commands that follow it on f; 0 if it is no group. */
static unsigned group_usage(FILE *f, const char *header, char **words, int n_words) {
        unsigned n = 0;

        for (size_t i = 0; i < ctl_n_commands && n_words > 0; i++) {
                const struct ctl_command *c = &ctl_commands[i];
                size_t off = 0;
                int k;

                for (k = 0; k < n_words; k++) {
                        size_t len = strlen(words[k]);

                        if (strncmp(c->words + off, words[k], len) != 0 || c->words[off + len] != ' ')
                                break;
                        off += len + 1;
                }
                if (k < n_words)
                        continue;
                if (n++ == 0)
                        fputs(header, f);
                fprintf(f, "  vhubctl %s%s%s\n", c->words, c->synopsis[0] ? " " : "", c->synopsis);
        }
        return n;
}

/* `vhubctl help [WORDS]` and `vhubctl WORDS --help`: the command's help, a
 * group's commands, or (no words) the general usage; unknown words are a
 * usage error. */
static int help(char **words, int n_words) {
        const struct ctl_command *cmd;
        int used;

        if (n_words == 0) {
                print_usage(stdout);
                return CTL_EXIT_OK;
        }
        cmd = find_command(words, n_words, &used);
        if (cmd) {
                ctl_print_command_help(stdout, cmd);
                return CTL_EXIT_OK;
        }
        if (group_usage(stdout, "Commands:\n", words, n_words) > 0)
                return CTL_EXIT_OK;
        return ctl_usage_error(NULL, "no command '%s'", words[0]);
}

int main(int argc, char **argv) {
        struct ctl ctl = { .timeout_ms = DEFAULT_TIMEOUT_MS };
        const struct ctl_command *cmd;
        struct ctl_args args;
        bool help_flag = false, version = false, after_dashdash = false;
        char **rest;
        int n_rest = 0, used, r;
        char err[256];

        /* global options may appear anywhere before "--" */
        rest = calloc((size_t)argc + 1, sizeof(*rest));
        if (!rest)
                return ctl_fail(CTL_EXIT_LOCAL, "out of memory");
        for (int i = 1; i < argc; i++) {
                bool taken = false;

                if (!after_dashdash && strcmp(argv[i], "--") == 0) {
                        /* the first "--" ends the global options; a second one is the command's */
                        after_dashdash = true;
                        continue;
                }
                if (!after_dashdash) {
                        r = take_global(&ctl, &i, argc, argv, &taken, &help_flag, &version);
                        if (r != 0) {
                                free(rest);
                                return r;
                        }
                }
                if (!taken)
                        rest[n_rest++] = argv[i];
        }
        if (version) {
                printf("vhubctl %s\n", VHUB_VERSION);
                free(rest);
                return CTL_EXIT_OK;
        }
        cmd = find_command(rest, n_rest, &used);
        if (help_flag) {
                /* the command's words (its arguments may follow: they are not words) */
                r = help(rest, n_rest);
                free(rest);
                return r;
        }
        if (n_rest == 0) {
                print_usage(stderr);
                free(rest);
                return CTL_EXIT_USAGE;
        }
        if (strcmp(rest[0], "help") == 0) {
                r = help(rest + 1, n_rest - 1);
                free(rest);
                return r;
        }
        if (!cmd) {
                /* a known group without its last word, or something unknown */
                for (int k = n_rest; k > 0; k--)
                        if (group_usage(stderr, "vhubctl: incomplete command; one of:\n", rest, k) > 0) {
                                free(rest);
                                return CTL_EXIT_USAGE;
                        }
                r = ctl_usage_error(NULL, "unknown command '%s'", rest[0]);
                free(rest);
                return r;
        }
        ctl.cmd = cmd;
        if (ctl_args_parse(cmd, n_rest - used, rest + used, &args, err, sizeof(err)) < 0) {
                r = ctl_usage_error(&ctl, "%s", err);
                free(rest);
                return r;
        }
        r = cmd->run(&ctl, &args);
        ctl.client = vhub_client_free(ctl.client);
        free(rest);
        return r;
}
