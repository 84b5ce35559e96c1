/* SPDX-License-Identifier: MIT */
/*
 * vhub-client in the caller's event loop: asynchronous calls with
 * callbacks, events to a handler, and one non-blocking dispatch.  Responses
 * and events are received exactly as for the blocking calls (into the
 * client's queues); vhub_client_dispatch() hands them to their callbacks.
 */
#include "vhub-client-internal.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct client_async_call *client_async_find(const struct vhub_client *c, uint64_t id) {
        for (struct client_async_call *a = c->calls; a; a = a->next)
                if (a->id == id)
                        return a;
        return NULL;
}

struct client_async_call *client_async_free(struct client_async_call *a) {
        if (!a)
                return NULL;
        client_msg_free(a->reply);
        free(a);
        return NULL;
}

struct client_async_call *client_async_take(struct vhub_client *c, uint64_t id) {
        struct client_async_call **p;

        for (p = &c->calls; *p; p = &(*p)->next) {
                struct client_async_call *a = *p;

                if (a->id != id)
                        continue;
                *p = a->next;
                a->next = NULL;
                c->n_calls--;
                return a;
        }
        return NULL;
}

void client_async_free_all(struct vhub_client *c) {
        while (c->calls) {
                struct client_async_call *a = c->calls;

                c->calls = a->next;
                client_async_free(a);
        }
        c->n_calls = 0;
}

int vhub_client_call_async(struct vhub_client *c, const char *method, json_t *params,
                           const int *fds, unsigned n_fds, int timeout_ms,
                           vhub_client_reply_fn cb, void *userdata, uint64_t *ret_id) {
        struct client_async_call *a, **tail;
        uint64_t id, seq;
        int r;

        if (!cb || !method) {
                json_decref(params);
                return -EINVAL;
        }
        if (c->n_calls >= VHUB_CLIENT_MAX_PENDING_CALLS) {
                json_decref(params);
                return -ENOBUFS;
        }
        a = calloc(1, sizeof(*a) + strlen(method) + 1);
        if (!a) {
                json_decref(params);
                return -ENOMEM;
        }
        r = client_queue_request(c, method, params, fds, n_fds, &id, &seq);
        if (r < 0) {
                free(a);
                return r;
        }
        a->id = id;
        a->deadline = timeout_ms < 0 ? -1 : client_now_ms() + timeout_ms;
        a->cb = cb;
        a->userdata = userdata;
        strcpy(a->method, method);
        for (tail = &c->calls; *tail; tail = &(*tail)->next)
                ;
        *tail = a;
        c->n_calls++;

        if (ret_id)
                *ret_id = id;
        /* Start writing now; what the socket does not take goes out from
         * vhub_client_dispatch() (vhub_client_get_events() says POLLOUT).
         * Should the connection break here, the callback reports it at the
         * next dispatch. */
        (void)client_flush(c);
        return 0;
}

void vhub_client_set_event_handler(struct vhub_client *c, vhub_client_event_fn fn, void *userdata) {
        c->event_fn = fn;
        c->event_userdata = userdata;
}

short vhub_client_get_events(const struct vhub_client *c) {
        return (short)(POLLIN | (vhub_frame_out_pending(&c->out) ? POLLOUT : 0));
}

/* Whether dispatch has work without reading anything: answers a blocking
 * call read into the queue, events for the handler, a broken connection's
 * calls to fail.  The socket will not say so, so the timeout must. */
static bool async_work_queued(const struct vhub_client *c) {
        if (c->event_fn && c->events.n > 0)
                return true;
        if (c->calls && c->error)
                return true;
        for (const struct client_async_call *a = c->calls; a; a = a->next)
                if (a->reply)
                        return true;
        return false;
}

int vhub_client_get_timeout_ms(const struct vhub_client *c) {
        int64_t first = -1, now, left;

        if (async_work_queued(c))
                return 0;
        for (const struct client_async_call *a = c->calls; a; a = a->next)
                if (a->deadline >= 0 && (first < 0 || a->deadline < first))
                        first = a->deadline;
        if (first < 0)
                return -1;
        now = client_now_ms();
        left = first - now;
        if (left <= 0)
                return 0;
        return left > INT32_MAX ? INT32_MAX : (int)left;
}

/* Run a's callback with its reply (none: the call failed with status). */
static void async_complete(struct vhub_client *c, struct client_async_call *a, int status) {
        struct client_msg *m = a->reply;
        struct vhub_client_error err;
        struct vhub_client_reply reply = {
                .id = a->id,
                .method = a->method,
                .status = status,
        };

        if (m) {
                const json_t *error = json_object_get(m->msg, "error");

                reply.result = json_object_get(m->msg, "result");
                if (error) {
                        client_error_from_json(error, &err);
                        reply.error = &err;
                        reply.status = -EREMOTEIO;
                        reply.result = NULL;
                } else if (!reply.result)
                        reply.status = -EBADMSG;
                reply.fds = m->fds;
                reply.n_fds = m->n_fds;
        } else if (status == -EPROTO && c->has_proto_err)
                reply.error = &c->proto_err;
        a->cb(c, &reply, a->userdata);
        client_async_free(a); /* closes the fds the callback did not take */
}

/* The calls that are answered, overdue or (broken) will never be answered,
 * unlinked in the order they were made; the callbacks run after this, so
 * that they may make new calls. */
static struct client_async_call *async_collect_done(struct vhub_client *c, int64_t now) {
        struct client_async_call *done = NULL, **done_tail = &done, **p = &c->calls;

        while (*p) {
                struct client_async_call *a = *p;

                if (!a->reply && !c->error && (a->deadline < 0 || a->deadline > now)) {
                        p = &a->next;
                        continue;
                }
                *p = a->next;
                c->n_calls--;
                a->next = NULL;
                *done_tail = a;
                done_tail = &a->next;
        }
        return done;
}

static int async_run_callbacks(struct vhub_client *c) {
        struct client_async_call *done = async_collect_done(c, client_now_ms());
        int n = 0;

        while (done) {
                struct client_async_call *a = done;

                uint64_t id = a->id;

                done = a->next;
                a->next = NULL;
                if (a->reply)
                        async_complete(c, a, 0);
                else
                        async_complete(c, a, c->error ? c->error : -ETIMEDOUT);
                /* done with: a late (overdue) or second answer is dropped
                 * on arrival */
                vhub_client_abandon(c, id);
                n++;
        }
        return n;
}

static int async_deliver_events(struct vhub_client *c) {
        int n = 0;

        while (c->event_fn) {
                struct client_msg *m = client_msg_queue_take(&c->events, false, 0);
                struct vhub_client_event ev;

                if (!m)
                        break;
                ev = (struct vhub_client_event){
                        .params = json_object_get(m->msg, "params"),
                        .fds = m->fds,
                        .n_fds = m->n_fds,
                };
                ev.name = json_string_value(json_object_get(ev.params, "event"));
                if (!ev.name)
                        ev.name = "";
                c->event_fn(c, &ev, c->event_userdata);
                client_msg_free(m);
                n++;
        }
        return n;
}

int vhub_client_dispatch(struct vhub_client *c) {
        int n = 0, r;

        if (!c->error) {
                r = client_flush(c);
                /* a full socket is fine; a broken one is reported below */
                (void)r;
        }
        while (!c->error && client_read_once(c) > 0)
                ;
        n += async_deliver_events(c);
        n += async_run_callbacks(c);
        n += async_deliver_events(c); /* whatever arrived for the callbacks' sake */
        if (c->error)
                return c->error;
        return n;
}
