/* SPDX-License-Identifier: MIT */
/*
 * Interop: vhub-client against the daemon's own framing layer (control/
 * rpc-conn.c on libevent) in a server thread.  The fake server echoes every
 * request's fds back twice — once on an event, once on the response — and
 * answers "slow" requests only after the next request, out of order.
 */
#include "rpc-conn.h"
#include <vhub/vhub-client.h>

#include <errno.h>
#include <event2/event.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "test-tagged-fd.h"
#include "vhub-check.h"

/* ---- server: rpc-conn in its own event loop ---- */

struct server {
        struct event_base *base;
        struct rpc_conn *conn;
        json_t *slow_id;        /* a held-back request's id */
};

static void send_result(struct rpc_conn *c, json_t *id, json_t *result, const struct rpc_fds *fds) {
        json_t *m = json_pack("{s:s, s:O, s:o}", "jsonrpc", "2.0", "id", id, "result", result);

        CHECK(m);
        if (fds && fds->n)
                json_object_set_new(m, "fds", json_integer(fds->n));
        CHECK_EQ(rpc_conn_send(c, m, fds ? fds->fds : NULL, fds ? fds->n : 0), 0);
        json_decref(m);
}

static void on_message(struct rpc_conn *c, json_t *msg, struct rpc_fds *fds, void *userdata) {
        struct server *s = userdata;
        const char *method = json_string_value(json_object_get(msg, "method"));
        json_t *id = json_object_get(msg, "id");

        CHECK(method && id);
        if (strcmp(method, "quit") == 0) {
                send_result(c, id, json_object(), NULL);
                rpc_conn_close_after_flush(c, "quit");
        } else if (strcmp(method, "slow") == 0) {
                CHECK(!s->slow_id);
                s->slow_id = json_incref(id);
        } else {
                json_t *params = json_object_get(msg, "params");
                json_t *ev = json_pack("{s:s, s:s, s:{s:s, s:s, s:i}}", "jsonrpc", "2.0", "method", "event",
                                       "params", "event", "echo", "vm", "x", "n", (int)fds->n);

                if (fds->n)
                        json_object_set_new(ev, "fds", json_integer(fds->n));
                CHECK_EQ(rpc_conn_send(c, ev, fds->fds, fds->n), 0);
                json_decref(ev);
                send_result(c, id,
                            json_pack("{s:s, s:O, s:i}", "method", method, "params",
                                      params ? params : json_null(), "n", (int)fds->n),
                            fds);
                if (s->slow_id) {
                        send_result(c, s->slow_id, json_pack("{s:b}", "slow", 1), NULL);
                        json_decref(s->slow_id);
                        s->slow_id = NULL;
                }
        }
        rpc_fds_clear(fds);
        json_decref(msg);
}

static void on_close(struct rpc_conn *c, const char *reason, void *userdata) {
        struct server *s = userdata;

        event_base_loopbreak(s->base);
}

static void *server_thread(void *arg) {
        struct server *s = arg;

        event_base_dispatch(s->base);
        return NULL;
}

int main(void) {
        static const struct rpc_conn_ops ops = { .on_message = on_message, .on_close = on_close };
        struct server srv = { 0 };
        struct vhub_client *c;
        pthread_t thread;
        json_t *r, *ev;
        int sp[2], *fds;
        unsigned n;

        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) == 0);
        srv.base = event_base_new();
        CHECK(srv.base);
        CHECK_EQ(rpc_conn_new(srv.base, sp[1], NULL, &ops, &srv, &srv.conn), 0);
        CHECK_EQ(vhub_client_new_from_fd(sp[0], &c), 0);
        CHECK(pthread_create(&thread, NULL, server_thread, &srv) == 0);

        /* fds out and back, on an event and on the response */
        {
                int in[3] = { tagged_fd("one"), tagged_fd("two"), tagged_fd("three") };

                CHECK_EQ(vhub_client_call(c, "echo", json_pack("{s:s, s:i}", "vm", "x", "fd", 2), in, 3, 5000,
                                          &r, &fds, &n, NULL),
                         0);
                for (int i = 0; i < 3; i++)
                        close(in[i]);
                CHECK_EQ(json_integer_value(json_object_get(r, "n")), 3);
                CHECK_EQ(json_integer_value(json_object_get(json_object_get(r, "params"), "fd")), 2);
                CHECK_EQ(n, 3);
                check_tag(fds[0], "one");
                check_tag(fds[1], "two");
                check_tag(fds[2], "three");
                vhub_client_close_fds(fds, n);
                json_decref(r);

                CHECK_EQ(vhub_client_next_event(c, 5000, &ev, &fds, &n), 1);
                CHECK_EQ(n, 3);
                check_tag(fds[0], "one");
                check_tag(fds[2], "three");
                vhub_client_close_fds(fds, n);
                json_decref(ev);
        }

        /* out of order: "slow" is answered after the request behind it */
        {
                uint64_t slow, fast;

                CHECK_EQ(vhub_client_send_request(c, "slow", json_object(), NULL, 0, &slow), 0);
                CHECK_EQ(vhub_client_send_request(c, "fast", json_object(), NULL, 0, &fast), 0);
                CHECK_EQ(vhub_client_wait_response(c, slow, 5000, &r, NULL, NULL, NULL), 0);
                CHECK(json_is_true(json_object_get(r, "slow")));
                json_decref(r);
                CHECK_EQ(vhub_client_wait_response(c, fast, 5000, &r, NULL, NULL, NULL), 0);
                CHECK(strcmp(json_string_value(json_object_get(r, "method")), "fast") == 0);
                json_decref(r);
                CHECK_EQ(vhub_client_next_event(c, 5000, &ev, NULL, NULL), 1);
                json_decref(ev);
        }

        /* many pipelined requests with one fd each, a large one among them */
        {
                enum { N = 200 };
                uint64_t ids[N];
                char *big = malloc(512 * 1024);

                CHECK(big);
                memset(big, 'y', 512 * 1024 - 1);
                big[512 * 1024 - 1] = '\0';
                for (int i = 0; i < N; i++) {
                        char tag[16];
                        int fd;

                        snprintf(tag, sizeof(tag), "p%d", i);
                        fd = tagged_fd(tag);
                        CHECK_EQ(vhub_client_send_request(c, "echo",
                                                          i == N / 2 ? json_pack("{s:s}", "blob", big)
                                                                     : json_pack("{s:i}", "i", i),
                                                          &fd, 1, &ids[i]),
                                 0);
                        close(fd);
                }
                free(big);
                for (int i = N - 1; i >= 0; i--) {
                        char tag[16];

                        snprintf(tag, sizeof(tag), "p%d", i);
                        CHECK_EQ(vhub_client_wait_response(c, ids[i], 5000, &r, &fds, &n, NULL), 0);
                        CHECK_EQ(n, 1);
                        check_tag(fds[0], tag);
                        vhub_client_close_fds(fds, n);
                        json_decref(r);
                }
                for (int i = 0; i < N; i++) {
                        char tag[16];

                        snprintf(tag, sizeof(tag), "p%d", i);
                        CHECK_EQ(vhub_client_next_event(c, 5000, &ev, &fds, &n), 1);
                        CHECK_EQ(n, 1);
                        check_tag(fds[0], tag);
                        vhub_client_close_fds(fds, n);
                        json_decref(ev);
                }
        }

        CHECK_EQ(vhub_client_call(c, "quit", NULL, NULL, 0, 5000, &r, NULL, NULL, NULL), 0);
        json_decref(r);
        CHECK(pthread_join(thread, NULL) == 0);
        /* the owner frees the closed connection; then the client sees EOF */
        rpc_conn_free(srv.conn);
        CHECK_EQ(vhub_client_next_event(c, 5000, &ev, NULL, NULL), -ECONNRESET);

        vhub_client_free(c);
        event_base_free(srv.base);
        printf("vhub-client <-> rpc-conn: all tests passed\n");
        return 0;
}
