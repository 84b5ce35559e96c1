/* SPDX-License-Identifier: MIT */
/*
 * The control socket: one JSON object per line in each direction.  Each
 * request gets exactly one answer, {"ok":true,...} or {"ok":false,"error":..},
 * in order; a command that waits for the front-end (a back-end channel
 * request with a reply) holds back that client's next commands until its
 * answer is in.  See README.md for the commands.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uuid/uuid.h>

#include "backend.h"

struct tb_client {
        int fd;
        uint64_t gen;           /* tells a reused slot from the client that asked */
        char *in;
        size_t in_len;
        char *out;
        size_t out_len;
        bool waiting;           /* a deferred answer is due */
        bool closing;           /* close once out is flushed */
};

struct tb_control {
        int listen_fd;
        char *path;
        struct tb_client clients[TB_MAX_CONTROL_CLIENTS];
        uint64_t next_gen;
        int slots[1 + TB_MAX_CONTROL_CLIENTS];  /* pollfd index -> client, -1 listen */
        size_t n_slots;
};

static struct tb_control ctl_storage;

int tb_control_open(const char *path) {
        struct tb_control *ctl = &ctl_storage;
        int fd = tb_listen_unix(path, 8);

        if (fd < 0)
                return fd;
        memset(ctl, 0, sizeof(*ctl));
        ctl->listen_fd = fd;
        ctl->path = strdup(path);
        for (unsigned i = 0; i < TB_MAX_CONTROL_CLIENTS; i++)
                ctl->clients[i].fd = -1;
        tb.control = ctl;
        return 0;
}

static void client_close(struct tb_client *cl) {
        if (cl->fd >= 0)
                close(cl->fd);
        free(cl->in);
        free(cl->out);
        *cl = (struct tb_client) { .fd = -1 };
}

void tb_control_close(void) {
        struct tb_control *ctl = tb.control;
        if (!ctl)
                return;
        for (unsigned i = 0; i < TB_MAX_CONTROL_CLIENTS; i++)
                client_close(&ctl->clients[i]);
        close(ctl->listen_fd);
        unlink(ctl->path);
        free(ctl->path);
        tb.control = NULL;
}

static void client_flush(struct tb_client *cl) {
        while (cl->out_len > 0) {
                ssize_t n = send(cl->fd, cl->out, cl->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno == EAGAIN)
                        return;
                if (n <= 0) {
                        client_close(cl);
                        return;
                }
                memmove(cl->out, cl->out + n, cl->out_len - (size_t) n);
                cl->out_len -= (size_t) n;
        }
        if (cl->closing)
                client_close(cl);
}

/* Queue one answer line; steals answer. */
static void client_send(struct tb_client *cl, json_t *answer) {
        char *s = answer ? json_dumps(answer, JSON_COMPACT) : NULL;
        json_decref(answer);
        if (!s) {
                s = strdup("{\"ok\":false,\"error\":\"out of memory\"}");
                if (!s)
                        return;
        }
        size_t len = strlen(s);
        char *n = realloc(cl->out, cl->out_len + len + 1);
        if (!n) {
                free(s);
                client_close(cl);
                return;
        }
        cl->out = n;
        memcpy(cl->out + cl->out_len, s, len);
        cl->out[cl->out_len + len] = '\n';
        cl->out_len += len + 1;
        free(s);
        client_flush(cl);
}

void tb_control_answer(int client, uint64_t gen, json_t *answer) {
        struct tb_control *ctl = tb.control;
        if (!ctl || client < 0 || client >= TB_MAX_CONTROL_CLIENTS ||
            ctl->clients[client].fd < 0 || ctl->clients[client].gen != gen) {
                json_decref(answer);
                return;
        }
        ctl->clients[client].waiting = false;
        client_send(&ctl->clients[client], answer);
}

/* ---- JSON helpers ---- */

json_t *tb_error_answer(const char *fmt, ...) {
        char buf[256];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        return json_pack("{s:b,s:s}", "ok", 0, "error", buf);
}

static json_t *ok(void) {
        return json_pack("{s:b}", "ok", 1);
}

/* An unsigned field: a JSON integer or a "0x..." string; def if absent. */
static int get_u64(json_t *req, const char *key, uint64_t def, uint64_t *ret) {
        json_t *v = json_object_get(req, key);
        if (!v) {
                *ret = def;
                return 0;
        }
        if (json_is_integer(v) && json_integer_value(v) >= 0) {
                *ret = (uint64_t) json_integer_value(v);
                return 0;
        }
        if (json_is_string(v)) {
                char *end;
                errno = 0;
                unsigned long long x = strtoull(json_string_value(v), &end, 0);
                if (!errno && *end == 0 && end != json_string_value(v)) {
                        *ret = x;
                        return 0;
                }
        }
        return -EINVAL;
}

static bool get_bool(json_t *req, const char *key, bool def) {
        json_t *v = json_object_get(req, key);
        return v ? json_is_true(v) : def;
}

static const char *get_str(json_t *req, const char *key) {
        json_t *v = json_object_get(req, key);
        return json_is_string(v) ? json_string_value(v) : NULL;
}

/* "abcd" -> {0xab, 0xcd}; NULL on bad hex. */
static uint8_t *parse_hex(const char *s, size_t *ret_len) {
        size_t n = strlen(s);
        if (n % 2)
                return NULL;
        uint8_t *b = malloc(n / 2 + 1);
        if (!b)
                return NULL;
        for (size_t i = 0; i < n / 2; i++) {
                unsigned v;
                if (sscanf(s + 2 * i, "%2x", &v) != 1) {
                        free(b);
                        return NULL;
                }
                b[i] = (uint8_t) v;
        }
        *ret_len = n / 2;
        return b;
}

static json_t *uuid_string(const uint8_t uuid[16]) {
        char s[37];
        uuid_unparse_lower(uuid, s);
        return json_string(s);
}

/* ---- reports ---- */

static json_t *regions_json(const struct tb_conn *c) {
        json_t *a = json_array();
        for (unsigned i = 0; c && i < c->mem.n; i++) {
                const struct tb_region *r = &c->mem.regions[i];
                json_array_append_new(a, json_pack("{s:I,s:I,s:I,s:I}",
                        "gpa", (json_int_t) r->gpa, "size", (json_int_t) r->size,
                        "uaddr", (json_int_t) r->uaddr, "mmap_offset", (json_int_t) r->mmap_offset));
        }
        return a;
}

static json_t *vrings_json(const struct tb_conn *c) {
        json_t *a = json_array();
        for (unsigned i = 0; c && i < tb.opt.queues; i++) {
                const struct tb_vq *vq = &c->vqs[i];
                json_t *o = json_pack("{s:i,s:i,s:b,s:b,s:b,s:b,s:i,s:i,s:i,s:I,s:I,s:I,s:I}",
                        "index", (int) i, "num", (int) vq->num,
                        "started", vq->started, "enabled", vq->enabled,
                        "activated", vq->activated, "polling", vq->polling,
                        "last_avail", (int) vq->last_avail, "used_idx", (int) vq->used_idx,
                        "in_flight", (int) vq->n_pending,
                        "fetched", (json_int_t) vq->fetched, "completed", (json_int_t) vq->completed,
                        "resubmitted", (json_int_t) vq->resubmitted, "calls", (json_int_t) vq->calls);
                json_object_set_new(o, "kick_fd", json_boolean(vq->kick_fd >= 0));
                json_object_set_new(o, "call_fd", json_boolean(vq->call_fd >= 0));
                json_object_set_new(o, "err_fd", json_boolean(vq->err_fd >= 0));
                json_object_set_new(o, "ignored_fd", json_boolean(vq->ignored_fd >= 0));
                json_object_set_new(o, "inflight", json_boolean(vq->inflight != NULL));
                json_object_set_new(o, "suspended", json_integer((json_int_t) vq->suspended));
                json_object_set_new(o, "set_base", json_integer((json_int_t) vq->set_base));
                json_object_set_new(o, "endian", !vq->endian_set ? json_null()
                                                 : json_string(vq->big_endian ? "big" : "little"));
                json_object_set_new(o, "broken", vq->broken[0] ? json_string(vq->broken) : json_null());
                if (vq->addr_set)
                        json_object_set_new(o, "addr", json_pack("{s:I,s:I,s:I,s:I,s:i}",
                                "desc", (json_int_t) vq->addr.desc, "avail", (json_int_t) vq->addr.avail,
                                "used", (json_int_t) vq->addr.used, "log", (json_int_t) vq->addr.log,
                                "flags", (int) vq->addr.flags));
                json_array_append_new(a, o);
        }
        return a;
}

static json_t *pf_names(uint64_t pf) {
        json_t *a = json_array();
        for (unsigned b = 0; b < 64; b++) {
                if (!(pf & (UINT64_C(1) << b)))
                        continue;
                const char *n = vhu_protocol_feature_name(b);
                json_array_append_new(a, n ? json_string(n) : json_integer(b));
        }
        return a;
}

static json_t *sock_json(const struct tb_sock *s) {
        const struct tb_conn *c = s->conn;
        json_t *o = json_pack("{s:i,s:s,s:s,s:b,s:I,s:I,s:I,s:I,s:I,s:I,s:I}",
                "index", (int) s->index, "path", s->path,
                "mode", s->connect_mode ? "connect" : "listen", "connected", c != NULL,
                "connections", (json_int_t) s->connections,
                "unknown_requests", (json_int_t) s->unknown_requests,
                "protocol_errors", (json_int_t) s->protocol_errors,
                "fetched", (json_int_t) s->fetched, "completed", (json_int_t) s->completed,
                "replies", (json_int_t) s->replies, "backend_requests", (json_int_t) s->backend_requests);
        json_object_set_new(o, "last_error", s->last_error[0] ? json_string(s->last_error) : json_null());

        json_t *reqs = json_object();
        for (unsigned i = 1; i < _VHU_REQ_MAX; i++)
                if (s->requests[i])
                        json_object_set_new(reqs, vhu_request_name(VHU_DIR_FRONTEND, i),
                                            json_integer((json_int_t) s->requests[i]));
        json_object_set_new(o, "requests", reqs);

        json_t *objs = json_array();
        for (unsigned i = 0; i < s->n_shared; i++)
                json_array_append_new(objs, json_pack("{s:o,s:I,s:I}",
                        "uuid", uuid_string(s->shared[i].uuid), "size", (json_int_t) s->shared[i].size,
                        "lookups", (json_int_t) s->shared[i].lookups));
        json_object_set_new(o, "shared_objects", objs);

        json_t *rules = json_array();
        for (unsigned i = 0; i < s->n_rules; i++)
                json_array_append_new(rules, json_pack("{s:s,s:s,s:I,s:I}",
                        "request", vhu_request_name(VHU_DIR_FRONTEND, s->rules[i].request),
                        "action", tb_action_name(s->rules[i].action),
                        "count", (json_int_t) s->rules[i].count, "arg", (json_int_t) s->rules[i].arg));
        json_object_set_new(o, "misbehave", rules);

        if (!c) {
                json_object_set_new(o, "conn", json_null());
                return o;
        }
        json_t *co = json_pack("{s:I,s:I,s:o,s:b,s:I,s:b,s:b,s:b}",
                "features", (json_int_t) c->features,
                "protocol_features", (json_int_t) c->protocol_features,
                "protocol_feature_names", pf_names(c->protocol_features),
                "features_set", c->features_set, "status", (json_int_t) c->status,
                "hung", c->hung, "paused", c->paused_until != 0,
                "backend_channel", c->chan_fd >= 0);
        json_object_set_new(co, "regions", regions_json(c));
        json_object_set_new(co, "vrings", vrings_json(c));
        json_object_set_new(co, "chan", json_pack("{s:I,s:I,s:I,s:i}",
                "sent", (json_int_t) c->chan_sent, "replies", (json_int_t) c->chan_replies,
                "unexpected", (json_int_t) c->chan_unexpected, "pending", (int) c->chan_n_pending));
        json_object_set_new(co, "inflight", c->inflight_base
                ? json_pack("{s:I,s:i,s:i}", "size", (json_int_t) c->inflight_size,
                            "queues", (int) c->inflight_queues, "queue_size", (int) c->inflight_queue_size)
                : json_null());
        json_object_set_new(co, "log", json_boolean(c->mem.log != NULL));
        json_object_set_new(o, "conn", co);
        return o;
}

/* ---- commands ---- */

struct cmd_ctx {
        struct tb_client *cl;
        int client;
        json_t *req;
        struct tb_sock *sock;
        struct tb_conn *conn;
};

static json_t *need_conn(struct cmd_ctx *x) {
        if (!x->conn || x->conn->dead)
                return tb_error_answer("socket %u has no front-end connection", x->sock->index);
        return NULL;
}

static json_t *need_chan(struct cmd_ctx *x) {
        json_t *e = need_conn(x);
        if (e)
                return e;
        if (x->conn->chan_fd < 0)
                return tb_error_answer("socket %u has no back-end channel (SET_BACKEND_REQ_FD)",
                                       x->sock->index);
        return NULL;
}

/* Send a back-end request: answered now, or deferred until the reply. */
static json_t *chan_request(struct cmd_ctx *x, uint32_t request, const void *payload, uint32_t size,
                            const int *fds, unsigned n_fds, struct tb_chan_pending *how) {
        struct tb_chan_pending local = { 0 };
        uint64_t timeout;
        bool default_nr = tb_conn_has_pf(x->conn, VHU_PF_REPLY_ACK);
        bool need_reply = get_bool(x->req, "need_reply", default_nr);

        if (get_u64(x->req, "timeout_ms", 5000, &timeout) < 0 || timeout > 600000)
                return tb_error_answer("bad timeout_ms");
        if (!how)
                how = &local;
        how->client = x->client;
        how->client_gen = x->cl->gen;
        how->deadline_ms = tb_now_ms() + timeout;
        int r = tb_chan_send(x->conn, request, need_reply, payload, size, fds, n_fds, how);
        if (r < 0)
                return tb_error_answer("sending %s: %s", vhu_request_name(VHU_DIR_BACKEND, request),
                                       strerror(-r));
        if (r == 0)
                return json_pack("{s:b,s:s,s:b}", "ok", 1, "request",
                                 vhu_request_name(VHU_DIR_BACKEND, request), "sent", 1);
        x->cl->waiting = true;
        return NULL;
}

static json_t *cmd_misbehave(struct cmd_ctx *x) {
        const char *rname = get_str(x->req, "request"), *aname = get_str(x->req, "action");
        struct tb_rule rule = { .count = -1 };
        uint64_t v;
        int a;

        if (!rname || !aname)
                return tb_error_answer("misbehave needs \"request\" and \"action\"");
        if (tb_request_from_name(VHU_DIR_FRONTEND, rname, &rule.request) < 0)
                return tb_error_answer("unknown request %s", rname);
        if ((a = tb_action_from_name(aname)) < 0)
                return tb_error_answer("unknown action %s", aname);
        rule.action = (enum tb_action) a;
        json_t *cnt = json_object_get(x->req, "count");
        if (cnt) {
                if (!json_is_integer(cnt))
                        return tb_error_answer("bad count");
                rule.count = json_integer_value(cnt) < 0 ? -1 : json_integer_value(cnt);
        }
        static const char *const arg_keys[] = { "arg", "delay_ms", "value", "flags" };
        for (size_t i = 0; i < sizeof(arg_keys) / sizeof(arg_keys[0]); i++) {
                if (!json_object_get(x->req, arg_keys[i]))
                        continue;
                if (get_u64(x->req, arg_keys[i], 0, &v) < 0)
                        return tb_error_answer("bad %s", arg_keys[i]);
                rule.arg = v;
                rule.has_arg = true;
        }
        if (rule.action == TB_ACT_DELAY && (!rule.has_arg || rule.arg > 600000))
                return tb_error_answer("delay needs delay_ms (at most 600000)");
        if (rule.action == TB_ACT_WRONG_REQUEST && rule.has_arg && rule.arg > UINT32_MAX)
                return tb_error_answer("bad request number");
        int r = tb_rule_add(x->sock, &rule);
        if (r < 0)
                return tb_error_answer("too many rules");
        return ok();
}

static int get_uuid(struct cmd_ctx *x, uint8_t uuid[16], bool generate) {
        const char *s = get_str(x->req, "uuid");
        if (!s) {
                if (!generate)
                        return -EINVAL;
                uuid_generate(uuid);
                return 0;
        }
        return uuid_parse(s, uuid) < 0 ? -EINVAL : 0;
}

/* A shared-object request whose payload is the UUID alone; the answer
 * names the UUID too. */
static json_t *chan_request_uuid(struct cmd_ctx *x, uint32_t request, const uint8_t uuid[16]) {
        struct tb_chan_pending how = { .kind = TB_CHAN_PLAIN };
        uuid_unparse_lower(uuid, how.uuid);
        json_t *a = chan_request(x, request, uuid, 16, NULL, 0, &how);
        if (a)
                json_object_set_new(a, "uuid", uuid_string(uuid));
        return a;
}

static json_t *cmd_export(struct cmd_ctx *x) {
        uint8_t uuid[16], *fill = NULL;
        size_t fill_len = 0;
        uint64_t size;
        const char *fs = get_str(x->req, "fill");
        struct tb_shared *o;

        if (get_uuid(x, uuid, true) < 0)
                return tb_error_answer("bad uuid");
        if (get_u64(x->req, "size", 4096, &size) < 0)
                return tb_error_answer("bad size");
        if (fs && !(fill = parse_hex(fs, &fill_len)))
                return tb_error_answer("fill must be hex bytes");
        bool send = get_bool(x->req, "send", true);
        if (send) {
                json_t *e = need_chan(x);
                if (e) {
                        free(fill);
                        return e;
                }
        }
        int r = tb_shared_export(x->sock, uuid, size, fill, fill_len, &o);
        free(fill);
        if (r < 0)
                return tb_error_answer("export: %s", strerror(-r));
        if (!send) {
                json_t *a = ok();
                json_object_set_new(a, "uuid", uuid_string(uuid));
                return a;
        }
        return chan_request_uuid(x, VHU_BREQ_SHARED_OBJECT_ADD, uuid);
}

static json_t *cmd_remove(struct cmd_ctx *x) {
        uint8_t uuid[16];
        if (get_uuid(x, uuid, false) < 0)
                return tb_error_answer("bad or missing uuid");
        bool known = tb_shared_remove(x->sock, uuid) == 0;
        if (!get_bool(x->req, "send", true))
                return known ? ok() : tb_error_answer("no such object");
        json_t *e = need_chan(x);
        if (e)
                return e;
        /* an unknown UUID is still sent: the test may want exactly that */
        return chan_request_uuid(x, VHU_BREQ_SHARED_OBJECT_REMOVE, uuid);
}

static json_t *cmd_lookup(struct cmd_ctx *x) {
        struct tb_chan_pending how = { .kind = TB_CHAN_LOOKUP };
        uint8_t uuid[16];
        uint64_t read_len, off;
        const char *ws = get_str(x->req, "write");
        json_t *e = need_chan(x);

        if (e)
                return e;
        if (get_uuid(x, uuid, false) < 0)
                return tb_error_answer("bad or missing uuid");
        if (get_u64(x->req, "read", 16, &read_len) < 0 || read_len > 4096)
                return tb_error_answer("bad read (at most 4096)");
        if (get_u64(x->req, "offset", 0, &off) < 0)
                return tb_error_answer("bad offset");
        how.read_len = read_len;
        how.write_offset = off;
        uuid_unparse_lower(uuid, how.uuid);
        if (ws && !(how.write_data = parse_hex(ws, &how.write_len)))
                return tb_error_answer("write must be hex bytes");
        json_t *a = chan_request(x, VHU_BREQ_SHARED_OBJECT_LOOKUP, uuid, 16, NULL, 0, &how);
        free(how.write_data);
        return a;
}

static json_t *cmd_host_notifier(struct cmd_ctx *x) {
        struct vhu_vring_area area;
        uint64_t q, size, off;
        json_t *e = need_chan(x);

        if (e)
                return e;
        if (get_u64(x->req, "queue", 0, &q) < 0 || get_u64(x->req, "size", 4096, &size) < 0 ||
            get_u64(x->req, "offset", 0, &off) < 0 || size > (64u << 20))
                return tb_error_answer("bad queue, size or offset");
        bool with_fd = get_bool(x->req, "fd", true);
        /* spec: no fd in the message means "de-register" (bit 8 set) */
        area = (struct vhu_vring_area) {
                .u64 = (q & VHU_VRING_IDX_MASK) | (with_fd ? 0 : VHU_VRING_NOFD_MASK),
                .size = size, .offset = off,
        };
        int fd = -1;
        if (with_fd) {
                fd = tb_memfd_new("vhub-tb-notifier", size ? size : 4096);
                if (fd < 0)
                        return tb_error_answer("memfd: %s", strerror(-fd));
        }
        json_t *a = chan_request(x, VHU_BREQ_VRING_HOST_NOTIFIER_MSG, &area, sizeof(area),
                                 &fd, with_fd ? 1 : 0, NULL);
        if (fd >= 0)
                close(fd);
        return a;
}

static json_t *cmd_shmem(struct cmd_ctx *x, bool map) {
        struct vhu_shmem_map sm = { 0 };
        uint64_t shmid, fd_off, shm_off, len, flags;
        json_t *e = need_chan(x);

        if (e)
                return e;
        if (get_u64(x->req, "shmid", 0, &shmid) < 0 || shmid > 255 ||
            get_u64(x->req, "fd_offset", 0, &fd_off) < 0 ||
            get_u64(x->req, "shm_offset", 0, &shm_off) < 0 ||
            get_u64(x->req, "len", 4096, &len) < 0 ||
            get_u64(x->req, "flags", VHU_SHMEM_MAP_F_WRITABLE, &flags) < 0 ||
            len > (64u << 20) || fd_off > (64u << 20))
                return tb_error_answer("bad shmem parameters");
        sm = (struct vhu_shmem_map) { .shmid = (uint8_t) shmid, .fd_offset = fd_off,
                                      .shm_offset = shm_off, .len = len, .flags = flags };
        if (!map)
                return chan_request(x, VHU_BREQ_SHMEM_UNMAP, &sm, sizeof(sm), NULL, 0, NULL);
        int fd = tb_memfd_new("vhub-tb-shmem", fd_off + len);
        if (fd < 0)
                return tb_error_answer("memfd: %s", strerror(-fd));
        json_t *a = chan_request(x, VHU_BREQ_SHMEM_MAP, &sm, sizeof(sm), &fd, 1, NULL);
        close(fd);
        return a;
}

static json_t *cmd_iotlb(struct cmd_ctx *x) {
        uint64_t iova, size, uaddr, perm, type;
        json_t *e = need_chan(x);
        if (e)
                return e;
        if (get_u64(x->req, "iova", 0, &iova) < 0 || get_u64(x->req, "size", 0, &size) < 0 ||
            get_u64(x->req, "uaddr", 0, &uaddr) < 0 || get_u64(x->req, "perm", 1, &perm) < 0 ||
            get_u64(x->req, "type", VHU_IOTLB_MISS, &type) < 0 || perm > 255 || type > 255)
                return tb_error_answer("bad iotlb parameters");
        struct vhu_iotlb m = { .iova = iova, .size = size, .uaddr = uaddr,
                               .perm = (uint8_t) perm, .type = (uint8_t) type };
        return chan_request(x, VHU_BREQ_IOTLB_MSG, &m, sizeof(m), NULL, 0, NULL);
}

static json_t *cmd_vring_notify(struct cmd_ctx *x, uint32_t request) {
        uint64_t q;
        json_t *e = need_chan(x);
        if (e)
                return e;
        if (get_u64(x->req, "queue", 0, &q) < 0 || q > 255)
                return tb_error_answer("bad queue");
        struct vhu_vring_state st = { .index = (uint32_t) q, .num = 0 };
        return chan_request(x, request, &st, sizeof(st), NULL, 0, NULL);
}

static json_t *cmd_backend_request(struct cmd_ctx *x) {
        const char *rname = get_str(x->req, "request"), *ps = get_str(x->req, "payload");
        uint8_t *payload = NULL;
        size_t len = 0;
        uint32_t request;
        json_t *e = need_chan(x);

        if (e)
                return e;
        if (!rname || tb_request_from_name(VHU_DIR_BACKEND, rname, &request) < 0)
                return tb_error_answer("unknown back-end request %s", rname ? rname : "(none)");
        if (ps && !(payload = parse_hex(ps, &len)))
                return tb_error_answer("payload must be hex bytes");
        if (len > VHU_MAX_PAYLOAD) {
                free(payload);
                return tb_error_answer("payload too large");
        }
        json_t *a = chan_request(x, request, payload, (uint32_t) len, NULL, 0, NULL);
        free(payload);
        return a;
}

static json_t *cmd_flood(struct cmd_ctx *x) {
        const char *kind = get_str(x->req, "kind");
        uint64_t count, bytes = 0;
        json_t *e = need_chan(x);

        if (e)
                return e;
        if (get_u64(x->req, "count", 1000, &count) < 0 || count > 1000000)
                return tb_error_answer("bad count");
        bool garbage = kind && strcmp(kind, "garbage") == 0;
        if (kind && !garbage && strcmp(kind, "messages") != 0)
                return tb_error_answer("kind is \"garbage\" or \"messages\"");
        int r = tb_chan_flood(x->conn, garbage, (unsigned) count, &bytes);
        if (r < 0)
                return tb_error_answer("flood: %s", strerror(-r));
        return json_pack("{s:b,s:i,s:I}", "ok", 1, "sent", r, "bytes", (json_int_t) bytes);
}

static json_t *cmd_set_complete(struct cmd_ctx *x) {
        const char *o = get_str(x->req, "order");
        uint64_t d;
        if (o) {
                int r = tb_order_from_name(o);
                if (r < 0)
                        return tb_error_answer("order is fifo, reverse or random");
                tb.opt.order = (enum tb_order) r;
        }
        if (get_u64(x->req, "delay_ms", tb.opt.delay_ms, &d) < 0 || d > 600000)
                return tb_error_answer("bad delay_ms");
        tb.opt.delay_ms = (unsigned) d;
        return ok();
}

static json_t *cmd_status(struct cmd_ctx *x) {
        json_t *a = json_pack("{s:b,s:i,s:I,s:s,s:i,s:I,s:I,s:i,s:i}", "ok", 1, "pid", (int) getpid(),
                              "disk_size", (json_int_t) tb.disk_size, "order", tb_order_name(tb.opt.order),
                              "delay_ms", (int) tb.opt.delay_ms,
                              "features", (json_int_t) tb.opt.features,
                              "protocol_features", (json_int_t) tb.opt.protocol_features,
                              "queues", (int) tb.opt.queues, "mem_slots", (int) tb.opt.mem_slots);
        json_object_set_new(a, "sigbus", json_integer((json_int_t) tb_sigbus_count()));
        json_t *socks = json_array();
        for (unsigned i = 0; i < tb.n_socks; i++)
                json_array_append_new(socks, sock_json(&tb.socks[i]));
        json_object_set_new(a, "sockets", socks);
        return a;
}

static json_t *run_command(struct cmd_ctx *x) {
        const char *cmd = get_str(x->req, "cmd");
        uint64_t si;

        if (!cmd)
                return tb_error_answer("missing \"cmd\"");
        if (strcmp(cmd, "ping") == 0)
                return ok();
        if (strcmp(cmd, "status") == 0)
                return cmd_status(x);
        if (strcmp(cmd, "quit") == 0) {
                tb.quit = true;
                return ok();
        }
        if (strcmp(cmd, "set-complete") == 0)
                return cmd_set_complete(x);

        if (get_u64(x->req, "socket", 0, &si) < 0 || si >= tb.n_socks)
                return tb_error_answer("bad socket index");
        x->sock = &tb.socks[si];
        x->conn = x->sock->conn;

        if (strcmp(cmd, "socket") == 0) {
                json_t *a = ok();
                json_object_set_new(a, "socket", sock_json(x->sock));
                return a;
        }
        if (strcmp(cmd, "regions") == 0 || strcmp(cmd, "vrings") == 0) {
                json_t *a = ok();
                json_object_set_new(a, cmd, cmd[0] == 'r' ? regions_json(x->conn) : vrings_json(x->conn));
                return a;
        }
        if (strcmp(cmd, "misbehave") == 0)
                return cmd_misbehave(x);
        if (strcmp(cmd, "clear-misbehave") == 0) {
                const char *rn = get_str(x->req, "request");
                uint32_t r = 0;
                if (rn && tb_request_from_name(VHU_DIR_FRONTEND, rn, &r) < 0)
                        return tb_error_answer("unknown request %s", rn);
                tb_rules_clear(x->sock, r);
                return ok();
        }
        if (strcmp(cmd, "hang") == 0 || strcmp(cmd, "resume") == 0) {
                json_t *e = need_conn(x);
                if (e)
                        return e;
                if (cmd[0] == 'h')
                        x->conn->hung = true;
                else
                        tb_conn_resume(x->conn);
                return ok();
        }
        if (strcmp(cmd, "disconnect") == 0) {
                json_t *e = need_conn(x);
                if (e)
                        return e;
                x->conn->dead = true;
                snprintf(x->sock->last_error, sizeof(x->sock->last_error), "disconnect command");
                return ok();
        }
        if (strcmp(cmd, "export") == 0)
                return cmd_export(x);
        if (strcmp(cmd, "remove") == 0)
                return cmd_remove(x);
        if (strcmp(cmd, "lookup") == 0)
                return cmd_lookup(x);
        if (strcmp(cmd, "config-change") == 0) {
                json_t *e = need_chan(x);
                return e ? e : chan_request(x, VHU_BREQ_CONFIG_CHANGE_MSG, NULL, 0, NULL, 0, NULL);
        }
        if (strcmp(cmd, "host-notifier") == 0)
                return cmd_host_notifier(x);
        if (strcmp(cmd, "shmem-map") == 0 || strcmp(cmd, "shmem-unmap") == 0)
                return cmd_shmem(x, strcmp(cmd, "shmem-map") == 0);
        if (strcmp(cmd, "iotlb") == 0)
                return cmd_iotlb(x);
        if (strcmp(cmd, "vring-call") == 0)
                return cmd_vring_notify(x, VHU_BREQ_VRING_CALL);
        if (strcmp(cmd, "vring-err") == 0)
                return cmd_vring_notify(x, VHU_BREQ_VRING_ERR);
        if (strcmp(cmd, "backend-request") == 0)
                return cmd_backend_request(x);
        if (strcmp(cmd, "flood") == 0)
                return cmd_flood(x);
        return tb_error_answer("unknown command %s", cmd);
}

/* Run complete lines while no answer is outstanding. */
static void client_process(int idx) {
        struct tb_client *cl = &tb.control->clients[idx];

        while (cl->fd >= 0 && !cl->waiting && !cl->closing) {
                char *nl = cl->in ? memchr(cl->in, '\n', cl->in_len) : NULL;
                if (!nl)
                        return;
                size_t len = (size_t) (nl - cl->in);
                json_error_t jerr;
                json_t *req = json_loadb(cl->in, len, 0, &jerr);
                memmove(cl->in, nl + 1, cl->in_len - len - 1);
                cl->in_len -= len + 1;
                if (len == 0 || (len == 1 && cl->in[0] == '\r')) {
                        json_decref(req);
                        continue;
                }
                json_t *answer;
                if (!json_is_object(req))
                        answer = tb_error_answer("not a JSON object: %s", jerr.text);
                else {
                        struct cmd_ctx x = { .cl = cl, .client = idx, .req = req };
                        answer = run_command(&x);
                }
                json_decref(req);
                if (answer)
                        client_send(cl, answer);
        }
}

static void client_read(int idx) {
        struct tb_client *cl = &tb.control->clients[idx];
        char buf[4096];

        for (;;) {
                ssize_t n = recv(cl->fd, buf, sizeof(buf), MSG_DONTWAIT);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno == EAGAIN)
                        break;
                if (n <= 0) {
                        client_close(cl);
                        return;
                }
                if (cl->in_len + (size_t) n > TB_MAX_CONTROL_LINE) {
                        client_send(cl, tb_error_answer("control line too long"));
                        cl->closing = true;
                        client_flush(cl);
                        return;
                }
                char *nb = realloc(cl->in, cl->in_len + (size_t) n);
                if (!nb) {
                        client_close(cl);
                        return;
                }
                cl->in = nb;
                memcpy(cl->in + cl->in_len, buf, (size_t) n);
                cl->in_len += (size_t) n;
        }
        client_process(idx);
}

static void control_accept(void) {
        struct tb_control *ctl = tb.control;
        int fd = accept4(ctl->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0)
                return;
        for (unsigned i = 0; i < TB_MAX_CONTROL_CLIENTS; i++) {
                if (ctl->clients[i].fd >= 0)
                        continue;
                ctl->clients[i] = (struct tb_client) { .fd = fd, .gen = ++ctl->next_gen };
                return;
        }
        /* limit reached */
        const char *msg = "{\"ok\":false,\"error\":\"too many control clients\"}\n";
        (void) send(fd, msg, strlen(msg), MSG_NOSIGNAL | MSG_DONTWAIT);
        close(fd);
}

size_t tb_control_pollfds(struct pollfd *p, size_t max) {
        struct tb_control *ctl = tb.control;
        size_t n = 0;

        if (!ctl || max < 1 + TB_MAX_CONTROL_CLIENTS)
                return 0;
        /* a safe point to run lines that waited for a deferred answer */
        for (int i = 0; i < TB_MAX_CONTROL_CLIENTS; i++)
                if (ctl->clients[i].fd >= 0 && !ctl->clients[i].waiting)
                        client_process(i);
        p[n] = (struct pollfd) { .fd = ctl->listen_fd, .events = POLLIN };
        ctl->slots[n++] = -1;
        for (int i = 0; i < TB_MAX_CONTROL_CLIENTS; i++) {
                struct tb_client *cl = &ctl->clients[i];
                if (cl->fd < 0)
                        continue;
                p[n] = (struct pollfd) { .fd = cl->fd, .events = POLLIN | (cl->out_len ? POLLOUT : 0) };
                ctl->slots[n++] = i;
        }
        ctl->n_slots = n;
        return n;
}

void tb_control_dispatch(const struct pollfd *p, size_t n) {
        struct tb_control *ctl = tb.control;
        if (!ctl)
                return;
        for (size_t k = 0; k < n && k < ctl->n_slots; k++) {
                if (!p[k].revents)
                        continue;
                int slot = ctl->slots[k];
                if (slot < 0) {
                        control_accept();
                        continue;
                }
                struct tb_client *cl = &ctl->clients[slot];
                if (cl->fd != p[k].fd)
                        continue;
                if (p[k].revents & POLLOUT)
                        client_flush(cl);
                if (cl->fd >= 0 && (p[k].revents & (POLLIN | POLLHUP | POLLERR)))
                        client_read(slot);
        }
}
