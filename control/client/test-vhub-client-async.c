/* SPDX-License-Identifier: MIT */
/*
 * Unit test of vhub-client's event-loop mode (vhub_client_call_async,
 * vhub_client_dispatch, the event handler) against a scripted peer on the
 * other end of a socketpair: fds in and out (callbacks take some, the
 * library closes the rest), answers in any order, mixed with blocking
 * calls, error responses, per-call timeouts (late answers and their fds
 * dropped), a request larger than the socket buffer written from dispatch
 * (POLLOUT), a peer that closes, and no fd leaked anywhere.
 */
#include <vhub/vhub-client.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "test-peer.h"
#include "test-tagged-fd.h"
#include "vhub-check.h"

/* ---- the peer (test-peer.h): blocking reads of whole lines, raw writes ---- */

static void peer_send(struct peer *p, const int *fds, unsigned n, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));
static void peer_send(struct peer *p, const int *fds, unsigned n, const char *fmt, ...) {
        char line[1024];
        va_list ap;
        int len;

        va_start(ap, fmt);
        len = vsnprintf(line, sizeof(line), fmt, ap);
        va_end(ap);
        CHECK(len > 0 && (size_t)len < sizeof(line));
        peer_send_raw(p, line, (size_t)len, fds, n, 0);
}

static struct vhub_client *start(struct peer *p) {
        struct vhub_client *c = NULL;
        int sp[2];

        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) == 0);
        *p = (struct peer){ .fd = sp[1] };
        CHECK_EQ(vhub_client_new_from_fd(sp[0], &c), 0);
        return c;
}

/* Dispatch until at least `want` callbacks ran in total (bounded). */
static void dispatch_until(struct vhub_client *c, int *ran, int want) {
        for (int i = 0; i < 100000 && *ran < want; i++) {
                struct pollfd pf = { .fd = vhub_client_get_fd(c), .events = vhub_client_get_events(c) };
                int r;

                (void)poll(&pf, 1, vhub_client_get_timeout_ms(c) < 0 ? 10 : vhub_client_get_timeout_ms(c));
                r = vhub_client_dispatch(c);
                CHECK(r >= 0);
        }
        CHECK(*ran >= want);
}

/* ---- what the callbacks saw ---- */

struct seen {
        int ran;
        int status[8];
        uint64_t id[8];
        json_t *result[8];
        int code[8];
        char detail[8][512];
        int kept_fd;            /* an fd a callback took */
        int closed_fd;          /* an fd a callback left to the library */
        const char *method[8];
};

static void on_reply(struct vhub_client *c, struct vhub_client_reply *r, void *userdata) {
        struct seen *s = userdata;
        int i = s->ran++;

        CHECK(i < 8);
        s->status[i] = r->status;
        s->id[i] = r->id;
        s->method[i] = strcmp(r->method, "vm.memory.add") == 0 ? "vm.memory.add" : "other";
        s->result[i] = r->result ? json_incref(r->result) : NULL;
        if (r->error) {
                s->code[i] = r->error->code;
                snprintf(s->detail[i], sizeof(s->detail[i]), "%s", r->error->detail);
        }
        if (r->n_fds == 2) {
                check_tag(r->fds[0], "gamma");
                check_tag(r->fds[1], "delta");
                s->kept_fd = r->fds[0];
                r->fds[0] = -1;         /* ours now */
                s->closed_fd = r->fds[1];
        }
}

static void seen_clear(struct seen *s) {
        for (int i = 0; i < s->ran; i++)
                json_decref(s->result[i]);
        memset(s, 0, sizeof(*s));
}

/* ---- 1: fds both ways, answers out of order, a blocking call between ---- */

static void test_calls(void) {
        struct peer p;
        struct vhub_client *c = start(&p);
        struct seen s = { 0 };
        int in[2] = { tagged_fd("alpha"), tagged_fd("beta") }, got[8], out[2];
        uint64_t id1 = 0, id2 = 0;
        unsigned n;
        json_t *m1, *m2, *m3, *res = NULL;

        CHECK_EQ(vhub_client_call_async(c, "vm.memory.add", json_pack("{s:i}", "fd", 1), in, 2, -1,
                                        on_reply, &s, &id1),
                 0);
        close(in[0]); /* the library sent (or holds) its own copies */
        close(in[1]);
        CHECK_EQ(vhub_client_call_async(c, "device.list", NULL, NULL, 0, 5000, on_reply, &s, &id2), 0);
        CHECK(id1 != id2);
        CHECK_EQ(vhub_client_get_events(c), POLLIN); /* everything is out */

        m1 = peer_read(&p, got, &n);
        CHECK_EQ(n, 2);
        CHECK_EQ(json_integer_value(json_object_get(m1, "fds")), 2);
        check_tag(got[0], "alpha");
        check_tag(got[1], "beta");
        close(got[0]);
        close(got[1]);
        m2 = peer_read(&p, NULL, NULL);

        /* A blocking call while two asynchronous ones wait: it gets its own
         * answer; the others' answers, sent first, wait for dispatch. */
        out[0] = tagged_fd("gamma");
        out[1] = tagged_fd("delta");
        peer_send(&p, NULL, 0, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"result\":{\"n\":2}}\n",
                  (long long)msg_id(m2));
        peer_send(&p, out, 2, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"fds\":2,\"result\":{\"fd\":0}}\n",
                  (long long)msg_id(m1));
        close(out[0]);
        close(out[1]);
        {
                uint64_t id3;

                CHECK_EQ(vhub_client_send_request(c, "daemon.info", NULL, NULL, 0, &id3), 0);
                m3 = peer_read(&p, NULL, NULL);
                peer_send(&p, NULL, 0, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"result\":{\"n\":3}}\n",
                          (long long)msg_id(m3));
                CHECK_EQ(vhub_client_wait_response(c, id3, 5000, &res, NULL, NULL, NULL), 0);
                CHECK_EQ(json_integer_value(json_object_get(res, "n")), 3);
                json_decref(res);
                CHECK_EQ(s.ran, 0); /* no callback ran inside a blocking call */
                /* the answers it read are queued: the socket is quiet, so the
                 * timeout says "dispatch now" */
                CHECK_EQ(vhub_client_get_timeout_ms(c), 0);
                /* an asynchronous call's id is not for blocking waits */
                CHECK_EQ(vhub_client_wait_response(c, id1, 0, NULL, NULL, NULL, NULL), -EINVAL);
        }
        dispatch_until(c, &s.ran, 2);
        CHECK_EQ(s.ran, 2);
        /* callbacks in the order the calls were made */
        CHECK(s.id[0] == id1 && s.status[0] == 0 && strcmp(s.method[0], "vm.memory.add") == 0);
        CHECK_EQ(json_integer_value(json_object_get(s.result[0], "fd")), 0);
        CHECK(s.id[1] == id2 && s.status[1] == 0);
        CHECK_EQ(json_integer_value(json_object_get(s.result[1], "n")), 2);
        check_tag(s.kept_fd, "gamma");
        CHECK(fcntl(s.closed_fd, F_GETFD) < 0 && errno == EBADF); /* the library closed it */
        close(s.kept_fd);

        json_decref(m1);
        json_decref(m2);
        json_decref(m3);
        seen_clear(&s);
        vhub_client_free(c);
        peer_free(&p);
}

/* ---- 2: errors, timeouts, abandon, events ---- */

struct evs {
        int n;
        char names[4][64];
        int tags_ok;
};

static void on_event(struct vhub_client *c, struct vhub_client_event *ev, void *userdata) {
        struct evs *e = userdata;

        CHECK(e->n < 4);
        snprintf(e->names[e->n++], sizeof(e->names[0]), "%s", ev->name);
        CHECK(json_is_object(ev->params));
        if (ev->n_fds == 1) {
                check_tag(ev->fds[0], "event-fd");
                e->tags_ok++;
        }
}

static void test_errors_timeouts_events(void) {
        struct peer p;
        struct vhub_client *c = start(&p);
        struct seen s = { 0 };
        struct evs e = { 0 };
        uint64_t id_err, id_slow, id_gone;
        int fds_before, ef, late;
        json_t *m;

        /* error response */
        CHECK_EQ(vhub_client_call_async(c, "vm.create", json_pack("{s:s}", "vm", "a"), NULL, 0, -1,
                                        on_reply, &s, &id_err),
                 0);
        m = peer_read(&p, NULL, NULL);
        peer_send(&p, NULL, 0,
                  "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"error\":{\"code\":-32003,\"message\":\"already "
                  "exists\",\"data\":{\"detail\":\"VM a exists\"}}}\n",
                  (long long)msg_id(m));
        json_decref(m);
        dispatch_until(c, &s.ran, 1);
        CHECK(s.id[0] == id_err && s.status[0] == -EREMOTEIO && s.code[0] == VHUB_ERR_EXISTS);
        CHECK(strcmp(s.detail[0], "VM a exists") == 0 && !s.result[0]);
        CHECK(strcmp(vhub_client_error_code_name(s.code[0]), "already exists") == 0);

        /* a call with a timeout the peer misses; one that is abandoned */
        CHECK_EQ(vhub_client_call_async(c, "device.stop", NULL, NULL, 0, 100, on_reply, &s, &id_slow),
                 0);
        CHECK_EQ(vhub_client_call_async(c, "device.reset", NULL, NULL, 0, -1, on_reply, &s, &id_gone),
                 0);
        CHECK(vhub_client_get_timeout_ms(c) >= 0 && vhub_client_get_timeout_ms(c) <= 100);
        vhub_client_abandon(c, id_gone);
        dispatch_until(c, &s.ran, 2);
        CHECK(s.id[1] == id_slow && s.status[1] == -ETIMEDOUT && !s.result[1]);
        CHECK_EQ(vhub_client_get_timeout_ms(c), -1);

        /* both answered late, with fds: dropped, fds closed; then events
         * (one with an fd) reach the handler */
        fds_before = vhub_count_open_fds();
        m = peer_read(&p, NULL, NULL);
        late = tagged_fd("late");
        peer_send(&p, &late, 1, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"fds\":1,\"result\":{}}\n",
                  (long long)msg_id(m));
        json_decref(m);
        m = peer_read(&p, NULL, NULL);
        peer_send(&p, &late, 1, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"fds\":1,\"result\":{}}\n",
                  (long long)msg_id(m));
        json_decref(m);
        /* a hostile daemon: an answer to an id never sent, and a second
         * answer to a call already answered; both dropped with their fds */
        peer_send(&p, &late, 1, "{\"jsonrpc\":\"2.0\",\"id\":999999,\"fds\":1,\"result\":{}}\n");
        peer_send(&p, &late, 1, "{\"jsonrpc\":\"2.0\",\"id\":%llu,\"fds\":1,\"result\":{}}\n",
                  (unsigned long long)id_err);
        close(late);
        vhub_client_set_event_handler(c, on_event, &e);
        ef = tagged_fd("event-fd");
        peer_send(&p, &ef, 1, "{\"jsonrpc\":\"2.0\",\"method\":\"event\",\"fds\":1,\"params\":"
                              "{\"event\":\"device.backend_request\",\"vm\":\"a\"}}\n");
        close(ef);
        peer_send(&p, NULL, 0, "{\"jsonrpc\":\"2.0\",\"method\":\"event\",\"params\":"
                               "{\"event\":\"device.disconnected\",\"vm\":\"a\",\"reason\":\"x\"}}\n");
        {
                int r = 0;

                for (int i = 0; i < 100 && e.n < 2; i++) {
                        struct pollfd pf = { .fd = vhub_client_get_fd(c), .events = POLLIN };

                        (void)poll(&pf, 1, 50);
                        r = vhub_client_dispatch(c);
                        CHECK(r >= 0);
                }
        }
        CHECK_EQ(e.n, 2);
        CHECK(strcmp(e.names[0], "device.backend_request") == 0);
        CHECK(strcmp(e.names[1], "device.disconnected") == 0);
        CHECK_EQ(e.tags_ok, 1);
        CHECK_EQ(s.ran, 2); /* the abandoned call's callback never ran */
        CHECK_EQ(vhub_client_queued_responses(c), 0);
        CHECK_EQ(vhub_count_open_fds(), fds_before); /* late answers' and the event's fds closed */

        seen_clear(&s);
        vhub_client_free(c);
        peer_free(&p);
}

/* ---- 3: a request bigger than the socket buffer goes out from dispatch ---- */

#define BIG (2u << 20)

static void *big_reader(void *arg) {
        struct peer *p = arg;
        json_t *m = peer_read(p, NULL, NULL);

        CHECK_EQ(strlen(json_string_value(json_object_get(json_object_get(m, "params"), "blob"))), BIG);
        peer_send(p, NULL, 0, "{\"jsonrpc\":\"2.0\",\"id\":%lld,\"result\":{\"big\":true}}\n",
                  (long long)msg_id(m));
        json_decref(m);
        return NULL;
}

static void test_backpressure(void) {
        struct peer p;
        struct vhub_client *c = start(&p);
        struct seen s = { 0 };
        int small = 4096, fd = tagged_fd("with-big");
        char *blob = malloc(BIG + 1);
        pthread_t t;
        bool saw_pollout;

        CHECK(blob);
        memset(blob, 'b', BIG);
        blob[BIG] = '\0';
        CHECK(setsockopt(vhub_client_get_fd(c), SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)) == 0);
        CHECK_EQ(vhub_client_call_async(c, "big", json_pack("{s:s}", "blob", blob), &fd, 1, 10000, on_reply,
                                        &s, NULL),
                 0);
        free(blob);
        close(fd);
        saw_pollout = (vhub_client_get_events(c) & POLLOUT) != 0;
        CHECK(saw_pollout); /* it did not block: the rest waits for the loop */
        CHECK(pthread_create(&t, NULL, big_reader, &p) == 0);
        dispatch_until(c, &s.ran, 1);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK(s.status[0] == 0 && json_is_true(json_object_get(s.result[0], "big")));
        CHECK_EQ(vhub_client_get_events(c), POLLIN);
        seen_clear(&s);
        vhub_client_free(c);
        peer_free(&p);
}

/* ---- 4: the peer closes: every pending call fails through its callback ---- */

static void on_reply_chain(struct vhub_client *c, struct vhub_client_reply *r, void *userdata) {
        struct seen *s = userdata;

        on_reply(c, r, userdata);
        /* a callback may make another call; on a broken connection it fails
         * at once with the sticky error */
        if (s->ran == 1)
                CHECK_EQ(vhub_client_call_async(c, "again", NULL, NULL, 0, -1, on_reply, s, NULL),
                         r->status);
}

static void test_peer_closes(void) {
        struct peer p;
        struct vhub_client *c = start(&p);
        struct seen s = { 0 };
        int r;

        CHECK_EQ(vhub_client_call_async(c, "a", NULL, NULL, 0, -1, on_reply_chain, &s, NULL), 0);
        CHECK_EQ(vhub_client_call_async(c, "b", NULL, NULL, 0, -1, on_reply, &s, NULL), 0);
        close(p.fd);
        p.fd = -1;
        r = vhub_client_dispatch(c);
        CHECK(r == -ECONNRESET || r == -EPIPE);
        CHECK_EQ(s.ran, 2);
        CHECK(s.status[0] == r && s.status[1] == r);
        CHECK_EQ(vhub_client_dispatch(c), r); /* sticky, nothing more to run */
        CHECK_EQ(s.ran, 2);
        CHECK_EQ(vhub_client_call_async(c, "late", NULL, NULL, 0, -1, on_reply, &s, NULL), r);
        seen_clear(&s);
        vhub_client_free(c);
        peer_free(&p);
}

int main(void) {
        int fds_at_start = vhub_count_open_fds();

        test_calls();
        test_errors_timeouts_events();
        test_backpressure();
        test_peer_closes();
        CHECK_EQ(vhub_count_open_fds(), fds_at_start);
        printf("vhub-client async: all checks passed\n");
        return 0;
}
