/* SPDX-License-Identifier: MIT */
/* vhubctl: device commands (add, list, start/stop, config, net, state, back-end replies). */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "vhubctl.h"

#define MAX_CONFIG_BYTES 4096   /* the daemon enforces the protocol's own, smaller bound */
#define MAX_VRINGS 64

static json_t *device_params(const struct ctl *ctl, const struct ctl_args *a) {
        return json_pack("{s:s, s:s}", "vm", a->pos[0], "device", a->pos[1]);
}

/* METHOD on the device with one number: the third argument (WHAT in a usage
 * error), at most max, sent as member key. */
static int device_call_number(struct ctl *ctl, const struct ctl_args *a, const char *method,
                              const char *what, uint64_t max, const char *key) {
        json_t *params;
        uint64_t v;
        int r;

        if ((r = ctl_get_u64(ctl, what, a->pos[2], max, &v)) != 0)
                return r;
        params = device_params(ctl, a);
        json_object_set_new(params, key, json_integer((json_int_t)v));
        return ctl_call_simple(ctl, method, params, NULL, 0);
}

/* ---- add / remove / list ---- */

int cmd_device_add(struct ctl *ctl, const struct ctl_args *a) {
        const char *type = ctl_arg(a, "type"), *mode = ctl_arg(a, "mode"), *s;
        char *socket_path = NULL, cwd[4096], features[1200];
        uint64_t v;
        json_t *params, *res = NULL;
        int r;

        /* the daemon resolves paths in its own working directory, not ours */
        if (a->pos[2][0] != '/') {
                if (!getcwd(cwd, sizeof(cwd)))
                        return ctl_fail(CTL_EXIT_LOCAL, "getcwd: %s", strerror(errno));
                if (asprintf(&socket_path, "%s/%s", cwd, a->pos[2]) < 0)
                        return ctl_fail(CTL_EXIT_LOCAL, "out of memory");
        } else if (!(socket_path = strdup(a->pos[2]))) {
                return ctl_fail(CTL_EXIT_LOCAL, "out of memory");
        }
        params = json_pack("{s:s, s:s, s:s}", "vm", a->pos[0], "device", a->pos[1], "socket", socket_path);
        free(socket_path);
        if (type)
                json_object_set_new(params, "type", json_string(type));
        if (mode) {
                if (strcmp(mode, "client") != 0 && strcmp(mode, "server") != 0) {
                        json_decref(params);
                        return ctl_usage_error(ctl, "--mode is client or server, not '%s'", mode);
                }
                json_object_set_new(params, "mode", json_string(mode));
        }
        if ((s = ctl_arg(a, "queues"))) {
                if ((r = ctl_get_u64(ctl, "--queues", s, 65535, &v)) != 0) {
                        json_decref(params);
                        return r;
                }
                json_object_set_new(params, "queues", json_integer((json_int_t)v));
        }
        if ((s = ctl_arg(a, "reconnect-ms"))) {
                if ((r = ctl_get_u64(ctl, "--reconnect-ms", s, 3600000, &v)) != 0) {
                        json_decref(params);
                        return r;
                }
                json_object_set_new(params, "reconnect_ms", json_integer((json_int_t)v));
        }
        if (ctl_flag(a, "vmm-socket"))
                json_object_set_new(params, "vmm_socket", json_true());
        r = ctl_query(ctl, "device.add", params, true, &res);
        if (r != CTL_EXIT_OK || !res)
                return r; /* an error, or --json already printed it */
        ctl_fmt_features_line(json_object_get(res, "features"), false, type, features, sizeof(features));
        printf("features           %s\n", features);
        ctl_fmt_features_line(json_object_get(res, "protocol_features"), true, NULL, features, sizeof(features));
        printf("protocol features  %s\n", features);
        printf("queues             %" JSON_INTEGER_FORMAT "\n", json_integer_value(json_object_get(res, "queues")));
        printf("max mem slots      %" JSON_INTEGER_FORMAT "\n",
               json_integer_value(json_object_get(res, "max_mem_slots")));
        if ((s = json_string_value(json_object_get(res, "vmm_socket"))))
                printf("vmm socket         %s\n", s);
        json_decref(res);
        return CTL_EXIT_OK;
}

int cmd_device_remove(struct ctl *ctl, const struct ctl_args *a) {
        return ctl_call_simple(ctl, "device.remove", device_params(ctl, a), NULL, 0);
}

/* One device, its features by name (`device list VM DEVICE`). */
static void print_device(const json_t *d) {
        const char *type = json_string_value(json_object_get(d, "type"));
        char line[1200];

        printf("device             %s\n", json_string_value(json_object_get(d, "device")) ?: "?");
        printf("type               %s\n", type ? type : "-");
        printf("state              %s\n", json_string_value(json_object_get(d, "state")) ?: "?");
        printf("socket             %s\n", json_string_value(json_object_get(d, "socket")) ?: "?");
        if (json_object_get(d, "vmm_socket")) {
                printf("vmm socket         %s\n", json_string_value(json_object_get(d, "vmm_socket")) ?: "?");
                printf("vmm                %s\n", json_string_value(json_object_get(d, "vmm")) ?: "?");
        }
        printf("queues             %" JSON_INTEGER_FORMAT "\n", json_integer_value(json_object_get(d, "queues")));
        printf("reconnects         %" JSON_INTEGER_FORMAT "\n",
               json_integer_value(json_object_get(d, "reconnects")));
        ctl_fmt_features_line(json_object_get(d, "features"), false, type, line, sizeof(line));
        printf("features           %s\n", line);
        ctl_fmt_features_line(json_object_get(d, "acked_features"), false, type, line, sizeof(line));
        printf("acked features     %s\n", line);
        ctl_fmt_features_line(json_object_get(d, "protocol_features"), true, NULL, line, sizeof(line));
        printf("protocol features  %s\n", line);
}

/* `device list VM DEVICE`: that device alone (--json: the daemon's result
 * with that one entry); a device the VM does not have is -32002, as the
 * daemon answers for it. */
static int device_list_one(struct ctl *ctl, const char *vm, const char *name) {
        json_t *res = NULL, *d = NULL, *each, *one;
        size_t i;
        int r;

        r = ctl_call(ctl, "device.list", ctl_vm_params(ctl, vm), true, NULL, 0, &res, NULL, NULL);
        if (r != CTL_EXIT_OK)
                return r;
        json_array_foreach(json_object_get(res, "devices"), i, each)
                if (!d && strcmp(json_string_value(json_object_get(each, "device")) ?: "", name) == 0)
                        d = each;
        if (!d) {
                struct vhub_client_error e = { .code = VHUB_ERR_NO_DEVICE };

                snprintf(e.message, sizeof(e.message), "%s", vhub_contract_error_message(e.code));
                snprintf(e.detail, sizeof(e.detail), "no device %s in VM %s", name, vm);
                ctl_print_error(ctl, "device.list", &e);
                json_decref(res);
                return CTL_EXIT_DAEMON_ERROR;
        }
        if (ctl->json) {
                one = json_pack("{s:[O]}", "devices", d);
                ctl_print_json(one);
                json_decref(one);
        } else {
                print_device(d);
        }
        json_decref(res);
        return CTL_EXIT_OK;
}

int cmd_device_list(struct ctl *ctl, const struct ctl_args *a) {
        struct ctl_table t;
        json_t *res = NULL, *d;
        size_t i;
        int r;

        if (a->n_pos > 1)
                return device_list_one(ctl, a->pos[0], a->pos[1]);
        r = ctl_query(ctl, "device.list", ctl_vm_params(ctl, a->pos[0]), true, &res);
        if (r != CTL_EXIT_OK || !res)
                return r; /* an error, or --json already printed it */
        if (ctl_table_init(&t, 10, "DEVICE", "TYPE", "STATE", "VMM", "QUEUES", "RECONNECTS", "FEATURES",
                           "ACKED", "PROTOCOL", "SOCKET") < 0) {
                json_decref(res);
                return ctl_fail(CTL_EXIT_LOCAL, "out of memory");
        }
        json_array_foreach(json_object_get(res, "devices"), i, d) {
                const char *type = json_string_value(json_object_get(d, "type"));
                const char *vmm = json_string_value(json_object_get(d, "vmm"));
                char q[16], rc[16], f[24], af[24], pf[24];

                snprintf(q, sizeof(q), "%" JSON_INTEGER_FORMAT, json_integer_value(json_object_get(d, "queues")));
                snprintf(rc, sizeof(rc), "%" JSON_INTEGER_FORMAT,
                         json_integer_value(json_object_get(d, "reconnects")));
                ctl_fmt_u64(json_object_get(d, "features"), f, sizeof(f));
                ctl_fmt_u64(json_object_get(d, "acked_features"), af, sizeof(af));
                ctl_fmt_u64(json_object_get(d, "protocol_features"), pf, sizeof(pf));
                ctl_table_add(&t, json_string_value(json_object_get(d, "device")), type && *type ? type : "-",
                              json_string_value(json_object_get(d, "state")), vmm ? vmm : "-", q, rc, f, af,
                              pf, json_string_value(json_object_get(d, "socket")));
        }
        ctl_table_print(&t);
        ctl_table_done(&t);
        json_decref(res);
        return CTL_EXIT_OK;
}

/* ---- counters ---- */

/* A duration in microseconds: "850 us", "12.345 ms", "1.234 s". */
static void fmt_usec(uint64_t us, char *buf, size_t len) {
        if (us < 1000)
                snprintf(buf, len, "%" PRIu64 " us", us);
        else if (us < 1000000)
                snprintf(buf, len, "%" PRIu64 ".%03" PRIu64 " ms", us / 1000, us % 1000);
        else
                snprintf(buf, len, "%" PRIu64 ".%03" PRIu64 " s", us / 1000000, us / 1000 % 1000);
}

static uint64_t stat_u64(const json_t *res, const char *key) {
        uint64_t v = 0;

        (void)vhub_json_object_get_u64(res, key, &v);
        return v;
}

int cmd_device_stats(struct ctl *ctl, const struct ctl_args *a) {
        const json_t *loss;
        json_t *res = NULL;
        char buf[64];
        int r;

        r = ctl_query(ctl, "device.stats", device_params(ctl, a), true, &res);
        if (r != CTL_EXIT_OK || !res)
                return r; /* an error, or --json already printed it */
        fmt_usec(stat_u64(res, "since_ms") * 1000, buf, sizeof(buf));
        printf("state              %s (for %s)\n", json_string_value(json_object_get(res, "state")) ?: "?", buf);
        printf("requests           %" PRIu64 "\n", stat_u64(res, "requests"));
        printf("replies            %" PRIu64 "\n", stat_u64(res, "replies"));
        printf("timeouts           %" PRIu64 "\n", stat_u64(res, "timeouts"));
        printf("losses             %" PRIu64 "\n", stat_u64(res, "losses"));
        printf("reconnects         %" PRIu64 "\n", stat_u64(res, "reconnects"));
        loss = json_object_get(res, "last_loss");
        if (json_is_object(loss))
                printf("last loss          %s: %s\n",
                       json_string_value(json_object_get(loss, "timestamp")) ?: "?",
                       json_string_value(json_object_get(loss, "reason")) ?: "?");
        else
                printf("last loss          -\n");
        printf("backend requests   %" PRIu64 "\n", stat_u64(res, "backend_requests"));
        fmt_usec(stat_u64(res, "handshake_us"), buf, sizeof(buf));
        printf("handshake          %s\n", buf);
        if (json_object_get(res, "restore_us"))
                fmt_usec(stat_u64(res, "restore_us"), buf, sizeof(buf));
        else
                snprintf(buf, sizeof(buf), "-");
        printf("restore            %s\n", buf);
        if (json_object_get(res, "eventfd_skipped"))
                printf("eventfd skipped    %" PRIu64 "\n", stat_u64(res, "eventfd_skipped"));
        json_decref(res);
        return CTL_EXIT_OK;
}

/* ---- start / stop / reset ---- */

/* JSON text from a literal, @FILE, or "-" (stdin). */
static json_t *load_json_arg(const char *arg, char *errbuf, size_t errlen) {
        json_error_t jerr;
        json_t *v;

        if (strcmp(arg, "-") == 0)
                v = json_loadf(stdin, JSON_REJECT_DUPLICATES, &jerr);
        else if (arg[0] == '@')
                v = json_load_file(arg + 1, JSON_REJECT_DUPLICATES, &jerr);
        else
                v = json_loads(arg, JSON_REJECT_DUPLICATES, &jerr);
        if (!v)
                snprintf(errbuf, errlen, "%s: line %d: %s", arg[0] == '@' ? arg + 1 : "JSON", jerr.line, jerr.text);
        return v;
}

/* A vring's kick/call/err: an inherited fd number given in the JSON, or a new eventfd. */
static int vring_fd(json_t *ring, const char *key, bool create, int *fds, unsigned *n_fds, bool *owned,
                    char *errbuf, size_t errlen) {
        json_t *v = json_object_get(ring, key);
        int fd;

        if (v) {
                if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 65535 ||
                    fcntl((int)json_integer_value(v), F_GETFD) < 0) {
                        snprintf(errbuf, errlen, "vring '%s' must be an open fd of vhubctl (or absent)", key);
                        return -EINVAL;
                }
                fd = (int)json_integer_value(v);
                owned[*n_fds] = false;
        } else if (create) {
                fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
                if (fd < 0) {
                        snprintf(errbuf, errlen, "eventfd: %s", strerror(errno));
                        return -errno;
                }
                owned[*n_fds] = true;
        } else {
                return 0;
        }
        fds[*n_fds] = fd;
        json_object_set_new(ring, key, json_integer(*n_fds));
        (*n_fds)++;
        return 0;
}

int cmd_device_start(struct ctl *ctl, const struct ctl_args *a) {
        const char *features = ctl_arg(a, "features"), *vrings_arg = ctl_arg(a, "vrings");
        int fds[MAX_VRINGS * 3];
        bool owned[MAX_VRINGS * 3];
        unsigned n_fds = 0;
        json_t *vrings, *ring, *params;
        char err[512];
        uint64_t f;
        size_t i;
        int r;

        if (!features || !vrings_arg)
                return ctl_usage_error(ctl, "device start needs --features and --vrings");
        if ((r = ctl_get_u64(ctl, "--features", features, UINT64_MAX, &f)) != 0)
                return r;
        vrings = load_json_arg(vrings_arg, err, sizeof(err));
        if (!vrings)
                return ctl_usage_error(ctl, "--vrings: %s", err);
        if (json_is_object(vrings) && json_is_array(json_object_get(vrings, "vrings"))) {
                /* accept {"vrings": [...]} too, e.g. a saved request */
                json_t *inner = json_incref(json_object_get(vrings, "vrings"));

                json_decref(vrings);
                vrings = inner;
        }
        if (!json_is_array(vrings) || json_array_size(vrings) == 0 || json_array_size(vrings) > MAX_VRINGS) {
                json_decref(vrings);
                return ctl_usage_error(ctl, "--vrings wants a JSON array of 1..%d ring objects", MAX_VRINGS);
        }
        r = CTL_EXIT_OK;
        json_array_foreach(vrings, i, ring) {
                if (!json_is_object(ring)) {
                        r = ctl_usage_error(ctl, "--vrings: element %zu is not an object", i);
                        break;
                }
                if (vring_fd(ring, "kick", true, fds, &n_fds, owned, err, sizeof(err)) < 0 ||
                    vring_fd(ring, "call", true, fds, &n_fds, owned, err, sizeof(err)) < 0 ||
                    vring_fd(ring, "err", false, fds, &n_fds, owned, err, sizeof(err)) < 0) {
                        r = ctl_usage_error(ctl, "--vrings: element %zu: %s", i, err);
                        break;
                }
        }
        if (r == CTL_EXIT_OK) {
                params = json_pack("{s:s, s:s, s:o, s:O}", "vm", a->pos[0], "device", a->pos[1], "features",
                                   vhub_json_u64(f), "vrings", vrings);
                r = ctl_call_simple(ctl, "device.start", params, fds, n_fds);
        }
        /* the daemon holds its own copies; ours go (a CLI cannot serve the rings) */
        for (unsigned k = 0; k < n_fds; k++)
                if (owned[k])
                        close(fds[k]);
        json_decref(vrings);
        return r;
}

int cmd_device_stop(struct ctl *ctl, const struct ctl_args *a) {
        json_t *params = device_params(ctl, a), *res = NULL, *v;
        struct ctl_table t;
        bool inflight;
        size_t i;
        int r;

        if (ctl_flag(a, "no-drain"))
                json_object_set_new(params, "drain", json_false());
        r = ctl_query(ctl, "device.stop", params, true, &res);
        if (r != CTL_EXIT_OK || !res)
                return r; /* an error, or --json already printed it */
        /* INFLIGHT (GET_VRING_BASE_INFLIGHT back-ends only): requests the
         * back-end suspended instead of completing them */
        inflight = json_object_get(json_array_get(json_object_get(res, "vrings"), 0), "inflight") != NULL;
        if ((inflight ? ctl_table_init(&t, 3, "INDEX", "BASE", "INFLIGHT")
                      : ctl_table_init(&t, 2, "INDEX", "BASE")) < 0) {
                json_decref(res);
                return ctl_fail(CTL_EXIT_LOCAL, "out of memory");
        }
        json_array_foreach(json_object_get(res, "vrings"), i, v) {
                char idx[16], base[16], susp[16];

                snprintf(idx, sizeof(idx), "%" JSON_INTEGER_FORMAT, json_integer_value(json_object_get(v, "index")));
                snprintf(base, sizeof(base), "%" JSON_INTEGER_FORMAT, json_integer_value(json_object_get(v, "base")));
                snprintf(susp, sizeof(susp), "%" JSON_INTEGER_FORMAT,
                         json_integer_value(json_object_get(v, "inflight")));
                if (inflight)
                        ctl_table_add(&t, idx, base, susp);
                else
                        ctl_table_add(&t, idx, base);
        }
        ctl_table_print(&t);
        ctl_table_done(&t);
        json_decref(res);
        return CTL_EXIT_OK;
}

int cmd_device_reset(struct ctl *ctl, const struct ctl_args *a) {
        return ctl_call_simple(ctl, "device.reset", device_params(ctl, a), NULL, 0);
}

int cmd_device_kick(struct ctl *ctl, const struct ctl_args *a) {
        return device_call_number(ctl, a, "device.kick", "INDEX", 255, "index");
}

/* ---- config space ---- */

static void hexdump(const uint8_t *p, size_t len, uint64_t base) {
        for (size_t off = 0; off < len; off += 16) {
                printf("%04" PRIx64 " ", base + off);
                for (size_t i = off; i < off + 16 && i < len; i++)
                        printf("%s%02x", i > off && (i - off) % 8 == 0 ? "  " : " ", p[i]);
                putchar('\n');
        }
}

int cmd_device_config_get(struct ctl *ctl, const struct ctl_args *a) {
        uint64_t offset, size;
        json_t *params, *res = NULL;
        const char *b64;
        void *data = NULL;
        size_t len = 0;
        int r;

        if ((r = ctl_get_u64(ctl, "OFFSET", a->pos[2], MAX_CONFIG_BYTES, &offset)) != 0 ||
            (r = ctl_get_u64(ctl, "SIZE", a->pos[3], MAX_CONFIG_BYTES, &size)) != 0)
                return r;
        if (ctl_flag(a, "base64") && ctl_flag(a, "raw"))
                return ctl_usage_error(ctl, "--base64 and --raw exclude each other");
        params = device_params(ctl, a);
        json_object_set_new(params, "offset", json_integer((json_int_t)offset));
        json_object_set_new(params, "size", json_integer((json_int_t)size));
        r = ctl_call(ctl, "device.config.get", params, true, NULL, 0, &res, NULL, NULL);
        if (r != CTL_EXIT_OK)
                return r;
        b64 = json_string_value(json_object_get(res, "data"));
        if (ctl->json) {
                ctl_print_json(res);
        } else if (ctl_flag(a, "base64")) {
                printf("%s\n", b64 ? b64 : "");
        } else if (!b64 || vhub_base64_decode(b64, &data, &len) < 0) {
                r = ctl_fail(CTL_EXIT_DAEMON_ERROR, "device.config.get: the answer's data is not base64");
        } else if (ctl_flag(a, "raw")) {
                if (fwrite(data, 1, len, stdout) != len)
                        r = ctl_fail(CTL_EXIT_LOCAL, "writing to stdout: %s", strerror(errno));
        } else {
                hexdump(data, len, offset);
        }
        free(data);
        json_decref(res);
        return r;
}

/* "0a0b", "0a:0b", "0a 0b", "0x0a0b" */
static int parse_hex_bytes(const char *s, uint8_t *buf, size_t cap, size_t *ret_len) {
        size_t n = 0;
        int hi = -1;

        if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
                s += 2;
        for (; *s; s++) {
                int v;

                if (*s == ':' || *s == ' ' || *s == '-' || *s == '_') {
                        if (hi >= 0)
                                return -EINVAL;
                        continue;
                }
                if (*s >= '0' && *s <= '9')
                        v = *s - '0';
                else if ((*s | 0x20) >= 'a' && (*s | 0x20) <= 'f')
                        v = (*s | 0x20) - 'a' + 10;
                else
                        return -EINVAL;
                if (hi < 0) {
                        hi = v;
                        continue;
                }
                if (n >= cap)
                        return -E2BIG;
                buf[n++] = (uint8_t)(hi << 4 | v);
                hi = -1;
        }
        if (hi >= 0 || n == 0)
                return -EINVAL;
        *ret_len = n;
        return 0;
}

int cmd_device_config_set(struct ctl *ctl, const struct ctl_args *a) {
        const char *file = ctl_arg(a, "file");
        uint8_t buf[MAX_CONFIG_BYTES];
        char *b64 = NULL;
        size_t len = 0;
        uint64_t offset;
        json_t *params;
        int r;

        if ((r = ctl_get_u64(ctl, "OFFSET", a->pos[2], MAX_CONFIG_BYTES, &offset)) != 0)
                return r;
        if ((file != NULL) == (a->n_pos == 4))
                return ctl_usage_error(ctl, "give the data either as an argument or with --file");
        if (file) {
                FILE *f = strcmp(file, "-") == 0 ? stdin : fopen(file, "rbe");

                if (!f)
                        return ctl_fail(CTL_EXIT_LOCAL, "cannot open %s: %s", file, strerror(errno));
                len = fread(buf, 1, sizeof(buf), f);
                if (f != stdin)
                        fclose(f);
                if (len == 0)
                        return ctl_usage_error(ctl, "%s is empty", file);
        } else if (ctl_flag(a, "base64")) {
                void *data = NULL;
                bool ok = vhub_base64_decode(a->pos[3], &data, &len) == 0 && len > 0 && len <= sizeof(buf);

                if (ok)
                        memcpy(buf, data, len);
                free(data);
                if (!ok)
                        return ctl_usage_error(ctl, "DATA is not base64 of 1..%d bytes", MAX_CONFIG_BYTES);
        } else if (parse_hex_bytes(a->pos[3], buf, sizeof(buf), &len) < 0) {
                return ctl_usage_error(ctl, "DATA wants hex bytes like 0a0b0c or 0a:0b:0c");
        }
        if (vhub_base64_encode(buf, len, &b64) < 0)
                return ctl_fail(CTL_EXIT_LOCAL, "out of memory");
        params = device_params(ctl, a);
        json_object_set_new(params, "offset", json_integer((json_int_t)offset));
        json_object_set_new(params, "data", json_string(b64));
        free(b64);
        return ctl_call_simple(ctl, "device.config.set", params, NULL, 0);
}

/* ---- net ---- */

int cmd_device_net_rarp(struct ctl *ctl, const struct ctl_args *a) {
        json_t *params = device_params(ctl, a);

        json_object_set_new(params, "mac", json_string(a->pos[2]));
        return ctl_call_simple(ctl, "device.net.rarp", params, NULL, 0);
}

int cmd_device_net_mtu(struct ctl *ctl, const struct ctl_args *a) {
        return device_call_number(ctl, a, "device.net.mtu", "MTU", 65535, "mtu");
}

/* ---- device state ---- */

static int64_t mono_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * device.state.save/load: hand the daemon one end of a pipe and move the
 * state through the other end while waiting for the answer (the back-end may
 * start the transfer before the daemon answers, and a full pipe must never
 * block the answer).  --timeout bounds inactivity, not the whole transfer.
 */
struct state_xfer {
        struct ctl *ctl;
        const char *method;
        const char *path;
        bool save;
        int file;               /* the state file */
        int mine;               /* our end of the pipe; -1 once it is done */
        uint64_t id;            /* the request's */
        bool sent, answered;
        int64_t last;           /* mono_ms() of the last activity */
        uint64_t moved;         /* bytes through the pipe */
        char buf[65536];        /* load: read from the file, not yet into the pipe */
        size_t buf_len, buf_off;
        bool file_eof;
};

/* A step of the transfer: go on, or done (the answer came, the pipe is
 * finished); anything else is the command's exit code. */
#define XFER_GO_ON (-1)
#define XFER_DONE (-2)

static void xfer_close_pipe(struct state_xfer *x) {
        if (x->mine >= 0)
                close(x->mine);
        x->mine = -1;
}

/* Open the file and the pipe, send the request with the back-end's end. */
static int xfer_start(struct state_xfer *x, const struct ctl_args *a) {
        int p[2], theirs, r;
        json_t *params;

        x->file = x->save ? open(x->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)
                          : open(x->path, O_RDONLY | O_CLOEXEC);
        if (x->file < 0)
                return ctl_fail(CTL_EXIT_LOCAL, "cannot open %s: %s", x->path, strerror(errno));
        if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
                return ctl_fail(CTL_EXIT_LOCAL, "pipe: %s", strerror(errno));
        /* save: the back-end writes into p[1], we read p[0]; load: the reverse */
        x->mine = x->save ? p[0] : p[1];
        theirs = x->save ? p[1] : p[0];
        params = device_params(x->ctl, a);
        json_object_set_new(params, "fd", json_integer(0));
        if (x->ctl->uid_set)
                json_object_set_new(params, "uid", json_integer(x->ctl->uid));
        r = vhub_client_send_request(x->ctl->client, x->method, params, &theirs, 1, &x->id);
        close(theirs);  /* only the back-end may hold that end, or EOF never comes */
        if (r < 0)
                return ctl_fail(CTL_EXIT_CONNECT, "%s: %s", x->method, strerror(-r));
        x->sent = true;
        x->last = mono_ms();
        return CTL_EXIT_OK;
}

/* Has the daemon answered?  Its error ends the transfer. */
static int xfer_check_answer(struct state_xfer *x) {
        struct vhub_client_error e = { 0 };
        int q;

        if (x->answered)
                return XFER_GO_ON;
        q = vhub_client_wait_response(x->ctl->client, x->id, 0, NULL, NULL, NULL, &e);
        if (q == 0) {
                x->answered = true;
                x->last = mono_ms();
        } else if (q == -EREMOTEIO) {
                ctl_print_error(x->ctl, x->method, &e);
                return CTL_EXIT_DAEMON_ERROR;
        } else if (q != -ETIMEDOUT) {
                return ctl_fail(CTL_EXIT_CONNECT, "%s: %s", x->method, strerror(-q));
        }
        return XFER_GO_ON;
}

/* load: refill the buffer from the file; at its end, EOF for the back-end. */
static int xfer_refill(struct state_xfer *x) {
        if (x->save || x->mine < 0)
                return XFER_GO_ON;
        if (x->buf_off == x->buf_len && !x->file_eof) {
                ssize_t k = read(x->file, x->buf, sizeof(x->buf));

                if (k < 0)
                        return ctl_fail(CTL_EXIT_LOCAL, "reading %s: %s", x->path, strerror(errno));
                x->buf_off = 0;
                x->buf_len = (size_t)k;
                x->file_eof = k == 0;
        }
        if (x->file_eof && x->buf_off == x->buf_len)
                xfer_close_pipe(x);     /* EOF for the back-end */
        return XFER_GO_ON;
}

/* Our end of the pipe is ready: save moves pipe to file, load buffer to pipe. */
static int xfer_move(struct state_xfer *x) {
        ssize_t k;

        x->last = mono_ms();
        if (x->save) {
                k = read(x->mine, x->buf, sizeof(x->buf));
                if (k == 0)
                        xfer_close_pipe(x);
                else if (k > 0 && write(x->file, x->buf, (size_t)k) != k)
                        return ctl_fail(CTL_EXIT_LOCAL, "writing %s: %s", x->path, strerror(errno));
                else if (k > 0)
                        x->moved += (uint64_t)k;
                return XFER_GO_ON;
        }
        k = write(x->mine, x->buf + x->buf_off, x->buf_len - x->buf_off);
        if (k < 0 && errno == EPIPE)
                return ctl_fail(CTL_EXIT_DAEMON_ERROR, "%s: the back-end closed its end after %" PRIu64 " bytes",
                                x->method, x->moved);
        if (k > 0) {
                x->buf_off += (size_t)k;
                x->moved += (uint64_t)k;
        }
        return XFER_GO_ON;
}

/* One turn: the answer, the file, then a wait for the daemon or the pipe. */
static int xfer_step(struct state_xfer *x) {
        struct pollfd pf[2] = {
                { .fd = vhub_client_get_fd(x->ctl->client), .events = POLLIN },
                { .fd = -1, .events = x->save ? POLLIN : POLLOUT },
        };
        int timeout_ms = x->ctl->timeout_ms, wait_ms, n, r;
        bool had_pipe = x->mine >= 0;

        r = xfer_check_answer(x);
        if (r != XFER_GO_ON)
                return r;
        if (x->answered && x->mine < 0)
                return XFER_DONE;
        r = xfer_refill(x);
        if (r != XFER_GO_ON || (had_pipe && x->mine < 0))
                return r;       /* load: the pipe just closed; look for the answer again */
        pf[1].fd = x->mine;
        wait_ms = timeout_ms < 0 ? -1 : (int)(x->last + timeout_ms - mono_ms());
        if (timeout_ms >= 0 && wait_ms <= 0)
                return ctl_fail(CTL_EXIT_CONNECT, "%s: nothing happened for %d ms", x->method, timeout_ms);
        n = poll(pf, 2, wait_ms);
        if (n < 0 && errno != EINTR)
                return ctl_fail(CTL_EXIT_LOCAL, "poll: %s", strerror(errno));
        if (n <= 0)
                return XFER_GO_ON;
        if (pf[0].revents)
                x->last = mono_ms();
        if (x->mine >= 0 && pf[1].revents)
                return xfer_move(x);
        return XFER_GO_ON;
}

/* Close what is open; a failed save leaves no half-written file behind. */
static int xfer_finish(struct state_xfer *x, int r) {
        xfer_close_pipe(x);
        if (x->sent && !x->answered)
                vhub_client_abandon(x->ctl->client, x->id);
        if (x->file >= 0 && close(x->file) < 0 && r == CTL_EXIT_OK)
                r = ctl_fail(CTL_EXIT_LOCAL, "writing %s: %s", x->path, strerror(errno));
        if (r != CTL_EXIT_OK && x->save && x->sent)
                (void)unlink(x->path);
        return r;
}

static int state_transfer(struct ctl *ctl, const struct ctl_args *a, bool save) {
        struct state_xfer x = {
                .ctl = ctl, .save = save, .path = a->pos[2], .file = -1, .mine = -1,
                .method = save ? "device.state.save" : "device.state.load",
        };
        int r;

        r = ctl_connect(ctl);
        if (r != CTL_EXIT_OK)
                return r;
        r = xfer_start(&x, a);
        if (r == CTL_EXIT_OK) {
                do
                        r = xfer_step(&x);
                while (r == XFER_GO_ON);
                if (r == XFER_DONE)
                        r = CTL_EXIT_OK;
        }
        r = xfer_finish(&x, r);
        if (r != CTL_EXIT_OK)
                return r;
        if (!ctl->json)
                printf("%s %" PRIu64 " bytes of device state\n", save ? "saved" : "loaded", x.moved);
        if (ctl_flag(a, "no-check")) {
                if (ctl->json)
                        ctl_print_json(NULL);
                return CTL_EXIT_OK;
        }
        /* spec: CHECK_DEVICE_STATE after the transfer, or the result is unknown */
        return ctl_call_simple(ctl, "device.state.check", device_params(ctl, a), NULL, 0);
}

int cmd_device_state_save(struct ctl *ctl, const struct ctl_args *a) {
        return state_transfer(ctl, a, true);
}

int cmd_device_state_load(struct ctl *ctl, const struct ctl_args *a) {
        /* a SIGPIPE must not kill us mid-transfer: EPIPE is reported instead */
        signal(SIGPIPE, SIG_IGN);
        return state_transfer(ctl, a, false);
}

int cmd_device_state_check(struct ctl *ctl, const struct ctl_args *a) {
        return ctl_call_simple(ctl, "device.state.check", device_params(ctl, a), NULL, 0);
}

/* ---- back-end requests ---- */

int cmd_device_backend_reply(struct ctl *ctl, const struct ctl_args *a) {
        uint64_t token, result;
        json_t *params;
        int r;

        if ((r = ctl_get_u64(ctl, "RESULT", a->pos[3], 4095, &result)) != 0)
                return r;
        params = device_params(ctl, a);
        /* the token goes back as the event carried it: a number if it is one */
        if (ctl_parse_u64(a->pos[2], &token) == 0)
                json_object_set_new(params, "token", vhub_json_u64(token));
        else
                json_object_set_new(params, "token", json_string(a->pos[2]));
        json_object_set_new(params, "result", json_integer((json_int_t)result));
        return ctl_call_simple(ctl, "device.backend_reply", params, NULL, 0);
}
