/* SPDX-License-Identifier: MIT */
/*
 * Unit test of vhub-client against a scripted fake daemon: a thread on the
 * other end of a socketpair that reads and writes raw lines and SCM_RIGHTS,
 * so the framing is checked from outside the library.
 */
#include <vhub/vhub-client.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "test-peer.h"
#include "test-tagged-fd.h"
#include "vhub-check.h"

/* ---- the fake daemon's side: a struct peer (test-peer.h) ---- */

/* Read a large request, draining without parsing it in one buffer. */
static size_t srv_read_big_line(struct peer *s) {
        size_t total = 0;

        for (;;) {
                char *nl;
                ssize_t n;

                if (s->len == 0) {
                        peer_reserve(s);
                        n = read(s->fd, s->buf, s->size);
                        CHECK(n > 0);
                        s->len = (size_t)n;
                }
                nl = memchr(s->buf, '\n', s->len);
                if (nl) {
                        size_t l = (size_t)(nl - s->buf) + 1;

                        total += l;
                        memmove(s->buf, s->buf + l, s->len - l);
                        s->len -= l;
                        return total;
                }
                total += s->len;
                s->len = 0;
        }
}

static void srv_send(struct peer *s, const char *line, const int *fds, unsigned n) {
        peer_send_raw(s, line, strlen(line), fds, n, 0);
}

/* Send a formatted line, closing the fds passed afterwards (sent copies live on). */
static void srv_sendf(struct peer *s, const int *fds, unsigned n, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));
static void srv_sendf(struct peer *s, const int *fds, unsigned n, const char *fmt, ...) {
        char line[4096];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(line, sizeof(line), fmt, ap);
        va_end(ap);
        srv_send(s, line, fds, n);
        for (unsigned i = 0; i < n; i++)
                close(fds[i]);
}

static const char *msg_method(const json_t *m) {
        return json_string_value(json_object_get(m, "method"));
}

/* ---- scenario plumbing ---- */

typedef void (*srv_script)(struct peer *s);

struct scenario {
        pthread_t thread;
        struct peer *srv;
        srv_script script;
};

static void *srv_thread(void *arg) {
        struct scenario *sc = arg;

        sc->script(sc->srv);
        return NULL;
}

static struct vhub_client *scenario_start(struct scenario *sc, srv_script script) {
        struct vhub_client *c = NULL;
        int sp[2];

        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) == 0);
        sc->srv = calloc(1, sizeof(*sc->srv));
        CHECK(sc->srv);
        sc->srv->fd = sp[1];
        sc->script = script;
        CHECK(vhub_client_new_from_fd(sp[0], &c) == 0);
        CHECK(pthread_create(&sc->thread, NULL, srv_thread, sc) == 0);
        return c;
}

static void scenario_finish(struct scenario *sc) {
        CHECK(pthread_join(sc->thread, NULL) == 0);
        peer_free(sc->srv);
        free(sc->srv);
}

/* ---- 1: fds both ways on one call ---- */

static void script_fds(struct peer *s) {
        int fds[8], out[2];
        unsigned n;
        json_t *m = peer_read(s, fds, &n);

        CHECK(strcmp(msg_method(m), "vm.memory.add") == 0);
        CHECK_EQ(json_integer_value(json_object_get(m, "fds")), 2);
        CHECK(strcmp(json_string_value(json_object_get(m, "jsonrpc")), "2.0") == 0);
        CHECK_EQ(json_integer_value(json_object_get(json_object_get(m, "params"), "fd")), 1);
        CHECK_EQ(n, 2);
        check_tag(fds[0], "alpha");
        check_tag(fds[1], "beta");
        close(fds[0]);
        close(fds[1]);

        out[0] = tagged_fd("gamma");
        out[1] = tagged_fd("delta");
        srv_sendf(s, out, 2, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"fds\":2,\"result\":{\"fd\":1}}\n",
                  (long long)msg_id(m));
        json_decref(m);

        /* a request without fds carries no "fds" member and no params */
        m = peer_read(s, fds, &n);
        CHECK_EQ(n, 0);
        CHECK(!json_object_get(m, "fds"));
        CHECK(!json_object_get(m, "params"));
        srv_sendf(s, NULL, 0, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"result\":{\"version\":\"x\"}}\n",
                  (long long)msg_id(m));
        json_decref(m);
}

static void test_fds_both_ways(void) {
        struct scenario sc;
        struct vhub_client *c = scenario_start(&sc, script_fds);
        int in[2] = { tagged_fd("alpha"), tagged_fd("beta") };
        int *fds = NULL;
        unsigned n = 0;
        json_t *result = NULL;
        struct vhub_client_error err;

        CHECK_EQ(vhub_client_call(c, "vm.memory.add", json_pack("{s:s,s:i}", "vm", "a", "fd", 1), in,
                                  2, 5000, &result, &fds, &n, &err), 0);
        close(in[0]);
        close(in[1]);
        CHECK_EQ(n, 2);
        CHECK_EQ(json_integer_value(json_object_get(result, "fd")), 1);
        check_tag(fds[0], "gamma");
        check_tag(fds[1], "delta");
        vhub_client_close_fds(fds, n);
        json_decref(result);

        result = NULL;
        CHECK_EQ(vhub_client_call(c, "daemon.info", NULL, NULL, 0, 5000, &result, NULL, NULL, &err), 0);
        CHECK(strcmp(json_string_value(json_object_get(result, "version")), "x") == 0);
        json_decref(result);

        scenario_finish(&sc);
        vhub_client_free(c);
}

/* ---- 2: pipelined requests answered out of order, events in between ---- */

static void script_out_of_order(struct peer *s) {
        json_int_t id[3];
        int fds[8], f[3];
        unsigned n;

        for (int i = 0; i < 3; i++) {
                json_t *m = peer_read(s, fds, &n);

                CHECK_EQ(n, 0);
                id[i] = msg_id(m);
                json_decref(m);
        }
        CHECK(id[0] != id[1] && id[1] != id[2]);

        f[0] = tagged_fd("r2");
        srv_sendf(s, f, 1, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"result\":{\"n\":2},\"fds\":1}\n",
                  (long long)id[2]);
        f[0] = tagged_fd("ev0");
        srv_sendf(s, f, 1,
                  "{\"jsonrpc\":\"2.0\",\"method\":\"event\",\"fds\":1,\"params\":"
                  "{\"event\":\"device.backend_request\",\"vm\":\"a\",\"fd\":0}}\n");
        /* two messages and their fds in a single write, then a line split
         * into one-byte writes with its fds on the first byte */
        {
                char line[512];
                int two[3] = { tagged_fd("r0a"), tagged_fd("r0b"), tagged_fd("ev1") };

                snprintf(line, sizeof(line),
                         "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"result\":{\"n\":0},\"fds\":2}\n"
                         "{\"jsonrpc\":\"2.0\",\"method\":\"event\",\"params\":{\"event\":"
                         "\"device.config_changed\",\"vm\":\"a\"}}\n",
                         (long long)id[0]);
                srv_send(s, line, two, 2);
                close(two[0]);
                close(two[1]);
                snprintf(line, sizeof(line),
                         "{\"jsonrpc\":\"2.0\",\"method\":\"event\",\"fds\":1,\"params\":"
                         "{\"event\":\"x\",\"vm\":\"a\"}}\n"
                         "\n"
                         "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"result\":{\"n\":1}}\n",
                         (long long)id[1]);
                peer_send_raw(s, line, strlen(line), &two[2], 1, 1);
                close(two[2]);
        }
}

static void test_out_of_order(void) {
        struct scenario sc;
        struct vhub_client *c = scenario_start(&sc, script_out_of_order);
        uint64_t id[3];
        json_t *r, *ev;
        int *fds;
        unsigned n;

        for (int i = 0; i < 3; i++)
                CHECK_EQ(vhub_client_send_request(c, "device.list", json_pack("{s:s}", "vm", "a"),
                                                  NULL, 0, &id[i]),
                         0);

        /* the last one to arrive first */
        r = NULL;
        CHECK_EQ(vhub_client_wait_response(c, id[1], 5000, &r, &fds, &n, NULL), 0);
        CHECK_EQ(json_integer_value(json_object_get(r, "n")), 1);
        CHECK_EQ(n, 0);
        CHECK(fds == NULL);
        json_decref(r);
        CHECK_EQ(vhub_client_queued_responses(c), 2);
        CHECK_EQ(vhub_client_queued_events(c), 3);

        CHECK_EQ(vhub_client_wait_response(c, id[0], 0, &r, &fds, &n, NULL), 0);
        CHECK_EQ(json_integer_value(json_object_get(r, "n")), 0);
        CHECK_EQ(n, 2);
        check_tag(fds[0], "r0a");
        check_tag(fds[1], "r0b");
        vhub_client_close_fds(fds, n);
        json_decref(r);

        CHECK_EQ(vhub_client_wait_response(c, id[2], 0, &r, &fds, &n, NULL), 0);
        CHECK_EQ(json_integer_value(json_object_get(r, "n")), 2);
        CHECK_EQ(n, 1);
        check_tag(fds[0], "r2");
        vhub_client_close_fds(fds, n);
        json_decref(r);

        /* events in arrival order, each with its own fds */
        CHECK_EQ(vhub_client_next_event(c, 0, &ev, &fds, &n), 1);
        CHECK(strcmp(json_string_value(json_object_get(json_object_get(ev, "params"), "event")),
                     "device.backend_request") == 0);
        CHECK_EQ(n, 1);
        check_tag(fds[0], "ev0");
        vhub_client_close_fds(fds, n);
        json_decref(ev);

        CHECK_EQ(vhub_client_next_event(c, 0, &ev, &fds, &n), 1);
        CHECK(strcmp(json_string_value(json_object_get(json_object_get(ev, "params"), "event")),
                     "device.config_changed") == 0);
        CHECK_EQ(n, 0);
        json_decref(ev);

        /* fds not wanted: closed by the library */
        CHECK_EQ(vhub_client_next_event(c, 0, &ev, NULL, NULL), 1);
        CHECK(strcmp(json_string_value(json_object_get(json_object_get(ev, "params"), "event")), "x") == 0);
        json_decref(ev);

        ev = NULL;
        CHECK_EQ(vhub_client_next_event(c, 20, &ev, NULL, NULL), 0);
        CHECK(ev == NULL);

        scenario_finish(&sc);
        /* the fake daemon is gone: the connection reports it */
        CHECK_EQ(vhub_client_next_event(c, 1000, &ev, NULL, NULL), -ECONNRESET);
        vhub_client_free(c);
}

/* ---- 3: error objects, timeouts, abandoned ids ---- */

static void script_errors(struct peer *s) {
        int fds[8], f;
        unsigned n;
        json_t *m;

        m = peer_read(s, fds, &n);
        f = tagged_fd("unused");
        /* an error response may carry fds: the library closes them */
        srv_sendf(s, &f, 1,
                  "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"fds\":1,\"error\":{\"code\":-32006,"
                  "\"message\":\"back-end error\",\"data\":{\"detail\":\"GET_CONFIG failed\","
                  "\"device\":\"disk0\",\"request\":\"GET_CONFIG\"}}}\n",
                  (long long)msg_id(m));
        json_decref(m);

        /* timed out by the client, answered late, waited for again */
        m = peer_read(s, fds, &n);
        usleep(200 * 1000);
        srv_sendf(s, NULL, 0, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"result\":{\"late\":true}}\n",
                  (long long)msg_id(m));
        json_decref(m);

        /* vhub_client_call timed out: the late answer must be dropped */
        m = peer_read(s, fds, &n);
        usleep(200 * 1000);
        f = tagged_fd("dropped");
        srv_sendf(s, &f, 1, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"fds\":1,\"result\":{}}\n",
                  (long long)msg_id(m));
        json_decref(m);

        m = peer_read(s, fds, &n);
        srv_sendf(s, NULL, 0, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"error\":{\"code\":-32001,"
                              "\"message\":\"no such VM\"}}\n",
                  (long long)msg_id(m));
        json_decref(m);
}

static void test_errors(void) {
        struct scenario sc;
        struct vhub_client *c = scenario_start(&sc, script_errors);
        struct vhub_client_error err;
        json_t *r = (json_t *)0x1;
        uint64_t id;

        CHECK_EQ(vhub_client_call(c, "device.config.get", json_object(), NULL, 0, 5000, &r, NULL, NULL,
                                  &err),
                 -EREMOTEIO);
        CHECK(r == (json_t *)0x1); /* untouched on failure */
        CHECK_EQ(err.code, VHUB_ERR_BACKEND);
        CHECK(strcmp(err.message, "back-end error") == 0);
        CHECK(strcmp(err.detail, "GET_CONFIG failed") == 0);
        CHECK(strcmp(err.device, "disk0") == 0);
        CHECK(strcmp(err.request, "GET_CONFIG") == 0);
        CHECK(strcmp(vhub_client_error_code_name(err.code), "back-end error") == 0);

        CHECK_EQ(vhub_client_send_request(c, "vm.list", NULL, NULL, 0, &id), 0);
        CHECK_EQ(vhub_client_wait_response(c, id, 30, &r, NULL, NULL, NULL), -ETIMEDOUT);
        CHECK_EQ(vhub_client_wait_response(c, id, 5000, &r, NULL, NULL, NULL), 0);
        CHECK(json_is_true(json_object_get(r, "late")));
        json_decref(r);

        CHECK_EQ(vhub_client_call(c, "vm.list", NULL, NULL, 0, 30, &r, NULL, NULL, NULL), -ETIMEDOUT);
        CHECK_EQ(vhub_client_call(c, "vm.destroy", json_pack("{s:s}", "vm", "nope"), NULL, 0, 5000, &r,
                                  NULL, NULL, &err),
                 -EREMOTEIO);
        CHECK_EQ(err.code, VHUB_ERR_NO_VM);
        CHECK(err.detail[0] == '\0');
        CHECK_EQ(vhub_client_queued_responses(c), 0); /* the abandoned one was dropped */

        /* invalid arguments never reach the wire */
        CHECK_EQ(vhub_client_send_request(c, NULL, NULL, NULL, 0, NULL), -EINVAL);
        {
                int bad = -1;
                CHECK_EQ(vhub_client_send_request(c, "x", json_object(), &bad, 1, NULL), -EBADF);
        }
        CHECK_EQ(vhub_client_wait_response(c, 0, 0, &r, NULL, NULL, NULL), -EINVAL);
        CHECK_EQ(vhub_client_wait_response(c, 1000, 0, &r, NULL, NULL, NULL), -EINVAL);
        CHECK_EQ(vhub_client_get_error(c), 0);

        scenario_finish(&sc);
        vhub_client_free(c);
}

/* ---- 4: framing violations by the daemon break the connection ---- */

static void script_missing_fd(struct peer *s) {
        int fds[8];
        unsigned n;
        json_t *m = peer_read(s, fds, &n);

        /* declares an fd it never sends */
        srv_sendf(s, NULL, 0, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"fds\":1,\"result\":{}}\n",
                  (long long)msg_id(m));
        json_decref(m);
}

static void script_stray_fd(struct peer *s) {
        int fds[8], f = tagged_fd("stray");
        unsigned n;
        json_t *m = peer_read(s, fds, &n);

        /* a complete line carrying an fd it does not declare */
        srv_sendf(s, &f, 1, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"result\":{}}\n", (long long)msg_id(m));
        json_decref(m);
}

static void script_null_id(struct peer *s) {
        int fds[8];
        unsigned n;
        json_t *m = peer_read(s, fds, &n);

        srv_sendf(s, NULL, 0, "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32600,"
                              "\"message\":\"invalid request\",\"data\":{\"detail\":\"fds\"}}}\n");
        json_decref(m);
        shutdown(s->fd, SHUT_WR);
}

static void script_garbage(struct peer *s) {
        int fds[8];
        unsigned n;
        json_t *m = peer_read(s, fds, &n);

        srv_sendf(s, NULL, 0, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"result\":{}}\nnot json\n",
                  (long long)msg_id(m));
        json_decref(m);
}

static void test_violations(void) {
        struct scenario sc;
        struct vhub_client_error err;
        struct vhub_client *c;
        json_t *r;

        c = scenario_start(&sc, script_missing_fd);
        CHECK_EQ(vhub_client_call(c, "a", NULL, NULL, 0, 5000, &r, NULL, NULL, NULL), -EBADMSG);
        CHECK_EQ(vhub_client_call(c, "a", NULL, NULL, 0, 5000, &r, NULL, NULL, NULL), -EBADMSG);
        scenario_finish(&sc);
        vhub_client_free(c);

        /* the line itself is complete, so its response is delivered, but the
         * undeclared fd breaks the connection */
        c = scenario_start(&sc, script_stray_fd);
        CHECK_EQ(vhub_client_call(c, "a", NULL, NULL, 0, 5000, &r, NULL, NULL, NULL), 0);
        json_decref(r);
        CHECK_EQ(vhub_client_get_error(c), -EBADMSG);
        CHECK_EQ(vhub_client_call(c, "a", NULL, NULL, 0, 5000, &r, NULL, NULL, NULL), -EBADMSG);
        scenario_finish(&sc);
        vhub_client_free(c);

        c = scenario_start(&sc, script_null_id);
        memset(&err, 0, sizeof(err));
        CHECK_EQ(vhub_client_call(c, "a", NULL, NULL, 0, 5000, &r, NULL, NULL, &err), -EPROTO);
        CHECK_EQ(err.code, VHUB_ERR_INVALID_REQUEST);
        CHECK(strcmp(err.detail, "fds") == 0);
        scenario_finish(&sc);
        vhub_client_free(c);

        /* the good response before the garbage line is still delivered */
        c = scenario_start(&sc, script_garbage);
        {
                uint64_t id;

                CHECK_EQ(vhub_client_send_request(c, "a", NULL, NULL, 0, &id), 0);
                scenario_finish(&sc);
                /* everything is in the socket now; one read parses both lines */
                CHECK_EQ(vhub_client_wait_response(c, id, 5000, &r, NULL, NULL, NULL), 0);
                json_decref(r);
                CHECK_EQ(vhub_client_get_error(c), -EBADMSG);
        }
        vhub_client_free(c);
}

/* ---- 5: a request larger than the socket buffers while the daemon floods
 *         us with events: the client must read while it writes ---- */

#define FLOOD_EVENTS 3000
#define BIG_PARAM (4u << 20)

static void script_flood(struct peer *s) {
        char line[256];
        int fds[8];
        unsigned n;
        size_t total;

        int fl = fcntl(s->fd, F_GETFL);
        CHECK(fcntl(s->fd, F_SETFL, fl | O_NONBLOCK) == 0);
        /* write events until our socket buffer is full ... */
        for (int i = 0; i < FLOOD_EVENTS; i++) {
                struct pollfd p = { .fd = s->fd, .events = POLLOUT };
                int len = snprintf(line, sizeof(line),
                                   "{\"jsonrpc\":\"2.0\",\"method\":\"event\",\"params\":{\"event\":"
                                   "\"flood\",\"vm\":\"a\",\"i\":%d,\"pad\":\"%0100d\"}}\n",
                                   i, 0);
                size_t off = 0;

                while (off < (size_t)len) {
                        ssize_t w = write(s->fd, line + off, (size_t)len - off);

                        if (w < 0) {
                                CHECK(errno == EAGAIN);
                                /* the client is not reading yet: read its
                                 * (big) request as it is being written */
                                CHECK(poll(&p, 1, 5000) == 1);
                                continue;
                        }
                        off += (size_t)w;
                }
        }
        CHECK(fcntl(s->fd, F_SETFL, fl) == 0);
        /* ... and only then read the big request */
        total = srv_read_big_line(s);
        CHECK(total > BIG_PARAM);
        snprintf(line, sizeof(line), "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"bytes\":%zu}}\n", total);
        srv_send(s, line, NULL, 0);
        (void)fds;
        (void)n;
}

static void test_flood(void) {
        struct scenario sc;
        struct vhub_client *c = scenario_start(&sc, script_flood);
        char *big = malloc(BIG_PARAM + 1);
        json_t *r;
        int events = 0;

        CHECK(big);
        memset(big, 'x', BIG_PARAM);
        big[BIG_PARAM] = '\0';
        CHECK_EQ(vhub_client_call(c, "big", json_pack("{s:s}", "blob", big), NULL, 0, 20000, &r, NULL,
                                  NULL, NULL),
                 0);
        free(big);
        CHECK(json_integer_value(json_object_get(r, "bytes")) > (json_int_t)BIG_PARAM);
        json_decref(r);
        for (;;) {
                json_t *ev;
                int k = vhub_client_next_event(c, 0, &ev, NULL, NULL);

                CHECK(k >= 0);
                if (k == 0)
                        break;
                CHECK_EQ(json_integer_value(json_object_get(json_object_get(ev, "params"), "i")), events);
                events++;
                json_decref(ev);
        }
        CHECK_EQ(events, FLOOD_EVENTS);
        scenario_finish(&sc);
        vhub_client_free(c);
}

/* ---- 6: helpers ---- */

static void test_u64(void) {
        uint64_t v;
        json_t *j;

        j = vhub_json_u64((UINT64_C(1) << 53) - 1);
        CHECK(json_is_integer(j));
        CHECK_EQ(vhub_json_get_u64(j, &v), 0);
        CHECK(v == (UINT64_C(1) << 53) - 1);
        json_decref(j);

        j = vhub_json_u64(UINT64_C(1) << 53);
        CHECK(json_is_string(j));
        CHECK(strcmp(json_string_value(j), "0x20000000000000") == 0);
        json_decref(j);

        j = vhub_json_u64(UINT64_MAX);
        CHECK(strcmp(json_string_value(j), "0xffffffffffffffff") == 0);
        CHECK_EQ(vhub_json_get_u64(j, &v), 0);
        CHECK(v == UINT64_MAX);
        json_decref(j);

        j = json_string("0X175007E46");
        CHECK_EQ(vhub_json_get_u64(j, &v), 0);
        CHECK(v == UINT64_C(0x175007e46));
        json_decref(j);

        const char *bad[] = { "0x", "12", "0x1g", "0x10000000000000000", "x12", "" };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                j = json_string(bad[i]);
                CHECK_EQ(vhub_json_get_u64(j, &v), -EINVAL);
                json_decref(j);
        }
        j = json_integer(-1);
        CHECK_EQ(vhub_json_get_u64(j, &v), -EINVAL);
        json_decref(j);
        CHECK_EQ(vhub_json_get_u64(json_true(), &v), -EINVAL);

        j = json_pack("{s:s,s:i}", "a", "0x10", "b", 7);
        CHECK_EQ(vhub_json_object_get_u64(j, "a", &v), 0);
        CHECK(v == 16);
        CHECK_EQ(vhub_json_object_get_u64(j, "b", &v), 0);
        CHECK(v == 7);
        CHECK_EQ(vhub_json_object_get_u64(j, "c", &v), -ENOENT);
        json_decref(j);
}

static void test_base64(void) {
        const char *plain[] = { "", "f", "fo", "foo", "foob", "fooba", "foobar" };
        const char *enc[] = { "", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy" };
        uint8_t bin[60];

        for (size_t i = 0; i < 7; i++) {
                char *s;
                void *d;
                size_t l;

                CHECK_EQ(vhub_base64_encode(plain[i], strlen(plain[i]), &s), 0);
                CHECK(strcmp(s, enc[i]) == 0);
                free(s);
                CHECK_EQ(vhub_base64_decode(enc[i], &d, &l), 0);
                CHECK_EQ(l, strlen(plain[i]));
                CHECK(memcmp(d, plain[i], l) == 0);
                free(d);
        }
        for (size_t i = 0; i < sizeof(bin); i++)
                bin[i] = (uint8_t)(i * 37 + 250);
        {
                char *s;
                void *d;
                size_t l;

                CHECK_EQ(vhub_base64_encode(bin, sizeof(bin), &s), 0);
                CHECK_EQ(vhub_base64_decode(s, &d, &l), 0);
                CHECK_EQ(l, sizeof(bin));
                CHECK(memcmp(d, bin, l) == 0);
                free(s);
                free(d);
        }
        const char *bad[] = { "Zg=", "Z===", "Zg==Zg==", "Zm9*", "=Zm9" };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                void *d;
                size_t l;

                CHECK_EQ(vhub_base64_decode(bad[i], &d, &l), -EINVAL);
        }
}

static void test_default_path(void) {
        char *p;

        setenv("VHUB_SOCKET", "/tmp/x.sock", 1);
        CHECK_EQ(vhub_client_default_socket_path(&p), 0);
        CHECK(strcmp(p, "/tmp/x.sock") == 0);
        free(p);
        unsetenv("VHUB_SOCKET");
        setenv("XDG_RUNTIME_DIR", "/run/user/1234", 1);
        CHECK_EQ(vhub_client_default_socket_path(&p), 0);
        CHECK(strcmp(p, geteuid() == 0 ? "/run/vhub/control.sock" : "/run/user/1234/vhub/control.sock") == 0);
        free(p);

        /* connecting to nothing fails cleanly */
        struct vhub_client *c = NULL;
        CHECK_EQ(vhub_client_connect("/nonexistent/vhub.sock", &c), -ENOENT);
        CHECK(c == NULL);
}

int main(void) {
        int fds_at_start = vhub_count_open_fds();

        test_u64();
        test_base64();
        test_default_path();
        test_fds_both_ways();
        test_out_of_order();
        test_errors();
        test_violations();
        test_flood();
        /* every fd that crossed the socket was closed by someone */
        CHECK_EQ(vhub_count_open_fds(), fds_at_start);
        printf("vhub-client: all tests passed\n");
        return 0;
}
