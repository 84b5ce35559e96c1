/* SPDX-License-Identifier: MIT */
/*
 * vhub-client: the connection, JSON-RPC messages in and out, and the
 * blocking calls.  See vhub/vhub-client.h for the API; the framing itself
 * is control/vhub-frame.c's (the daemon's too), the event-loop mode
 * vhub-client-async.c's.
 */
#include "vhub-client-internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- small helpers ---- */

int64_t client_now_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t deadline_from_timeout(int timeout_ms) {
        return timeout_ms < 0 ? -1 : client_now_ms() + timeout_ms;
}

/* Milliseconds left for poll(): -1 forever, 0 expired. */
static int deadline_remaining(int64_t deadline) {
        int64_t left;

        if (deadline < 0)
                return -1;
        left = deadline - client_now_ms();
        if (left <= 0)
                return 0;
        return left > INT32_MAX ? INT32_MAX : (int)left;
}

void vhub_client_close_fds(int *fds, unsigned n) {
        if (!fds)
                return;
        for (unsigned i = 0; i < n; i++)
                if (fds[i] >= 0)
                        close(fds[i]);
        free(fds);
}

static void copy_str(char *dst, size_t size, const char *src) {
        snprintf(dst, size, "%s", src ? src : "");
}

struct client_msg *client_msg_free(struct client_msg *m) {
        if (!m)
                return NULL;
        json_decref(m->msg);
        vhub_client_close_fds(m->fds, m->n_fds);
        free(m);
        return NULL;
}

static void msg_queue_push(struct client_msg_queue *q, struct client_msg *m) {
        m->next = NULL;
        if (q->tail)
                q->tail->next = m;
        else
                q->head = m;
        q->tail = m;
        q->n++;
}

/* Unlink and return the first message matching (any id if !by_id). */
struct client_msg *client_msg_queue_take(struct client_msg_queue *q, bool by_id, uint64_t id) {
        struct client_msg *prev = NULL;

        for (struct client_msg *m = q->head; m; prev = m, m = m->next) {
                if (by_id && m->id != id)
                        continue;
                if (prev)
                        prev->next = m->next;
                else
                        q->head = m->next;
                if (q->tail == m)
                        q->tail = prev;
                q->n--;
                m->next = NULL;
                return m;
        }
        return NULL;
}

static void msg_queue_clear(struct client_msg_queue *q) {
        struct client_msg *m;

        while ((m = client_msg_queue_take(q, false, 0)))
                client_msg_free(m);
}

const char *vhub_client_error_code_name(int code) {
        return vhub_contract_error_message(code);
}

void client_error_from_json(const json_t *error, struct vhub_client_error *ret) {
        const json_t *data;

        memset(ret, 0, sizeof(*ret));
        ret->code = (int)json_integer_value(json_object_get(error, "code"));
        copy_str(ret->message, sizeof(ret->message),
                 json_is_object(error) ? json_string_value(json_object_get(error, "message"))
                                       : "malformed error object");
        data = json_object_get(error, "data");
        copy_str(ret->detail, sizeof(ret->detail), json_string_value(json_object_get(data, "detail")));
        copy_str(ret->device, sizeof(ret->device), json_string_value(json_object_get(data, "device")));
        copy_str(ret->request, sizeof(ret->request), json_string_value(json_object_get(data, "request")));
}

/* ---- connection setup ---- */

int vhub_client_default_socket_path(char **ret_path) {
        const char *env, *xdg;
        char *p;

        env = getenv("VHUB_SOCKET");
        if (env && *env)
                p = strdup(env);
        else if (geteuid() == 0 || !(xdg = getenv("XDG_RUNTIME_DIR")) || !*xdg)
                p = strdup("/run/vhub/control.sock");
        else if (asprintf(&p, "%s/vhub/control.sock", xdg) < 0)
                p = NULL;
        if (!p)
                return -ENOMEM;
        *ret_path = p;
        return 0;
}

int vhub_client_new_from_fd(int fd, struct vhub_client **ret) {
        struct vhub_client *c;
        int flags;

        if (fd < 0)
                return -EBADF;
        if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0 || (flags = fcntl(fd, F_GETFL)) < 0 ||
            fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        c = calloc(1, sizeof(*c));
        if (!c) {
                close(fd);
                return -ENOMEM;
        }
        c->fd = fd;
        c->next_id = 1;
        vhub_frame_in_init(&c->in, VHUB_CLIENT_MAX_LINE, VHUB_CLIENT_MAX_QUEUED_FDS);
        vhub_frame_out_init(&c->out, false);
        *ret = c;
        return 0;
}

int vhub_client_connect(const char *path, struct vhub_client **ret) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char *def = NULL;
        int fd = -1, r;

        if (!path) {
                r = vhub_client_default_socket_path(&def);
                if (r < 0)
                        return r;
                path = def;
        }
        if (!*path || strlen(path) >= sizeof(sa.sun_path)) {
                r = *path ? -ENAMETOOLONG : -EINVAL;
                goto fail;
        }
        memcpy(sa.sun_path, path, strlen(path) + 1);

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) {
                r = -errno;
                goto fail;
        }
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
                r = -errno;
                goto fail;
        }
        free(def);
        return vhub_client_new_from_fd(fd, ret);

fail:
        if (fd >= 0)
                close(fd);
        free(def);
        return r;
}

struct vhub_client *vhub_client_free(struct vhub_client *c) {
        if (!c)
                return NULL;
        if (c->fd >= 0)
                close(c->fd);
        vhub_frame_in_done(&c->in);
        vhub_frame_out_done(&c->out);
        msg_queue_clear(&c->responses);
        msg_queue_clear(&c->events);
        client_async_free_all(c);
        free(c);
        return NULL;
}

int vhub_client_get_fd(const struct vhub_client *c) {
        return c->fd;
}

int vhub_client_get_error(const struct vhub_client *c) {
        return c->error;
}

unsigned vhub_client_queued_responses(const struct vhub_client *c) {
        return c->responses.n;
}

unsigned vhub_client_queued_events(const struct vhub_client *c) {
        return c->events.n;
}

int client_break(struct vhub_client *c, int error) {
        if (!c->error)
                c->error = error;
        vhub_frame_in_drop_fds(&c->in);
        vhub_frame_out_done(&c->out);
        return c->error;
}

/* ---- input: lines and fds to messages ---- */

static bool client_is_abandoned(struct vhub_client *c, uint64_t id, bool forget) {
        for (unsigned i = 0; i < c->n_abandoned; i++) {
                if (c->abandoned[i] != id)
                        continue;
                if (forget) {
                        memmove(c->abandoned + i, c->abandoned + i + 1,
                                sizeof(uint64_t) * (c->n_abandoned - i - 1));
                        c->n_abandoned--;
                }
                return true;
        }
        return false;
}

void vhub_client_abandon(struct vhub_client *c, uint64_t id) {
        struct client_msg *m = client_msg_queue_take(&c->responses, true, id);

        client_async_free(client_async_take(c, id));
        if (m) {
                client_msg_free(m);
                return;
        }
        if (id == 0 || id >= c->next_id || client_is_abandoned(c, id, false))
                return;
        /* Bounded: when full, the oldest abandoned id is forgotten and its
         * late response, if any, just stays queued. */
        if (c->n_abandoned == CLIENT_ABANDONED_MAX) {
                memmove(c->abandoned, c->abandoned + 1, sizeof(uint64_t) * (CLIENT_ABANDONED_MAX - 1));
                c->n_abandoned--;
        }
        c->abandoned[c->n_abandoned++] = id;
}

/* The fds msg declares with "fds": N, from the front of the queue. */
static int client_take_fds(struct vhub_client *c, const json_t *msg, int **ret_fds, unsigned *ret_n) {
        const json_t *v = json_is_object(msg) ? json_object_get(msg, "fds") : NULL;
        json_int_t n;
        int r;

        *ret_fds = NULL;
        *ret_n = 0;
        if (!v)
                return 0;
        if (!json_is_integer(v))
                return -EBADMSG;
        n = json_integer_value(v);
        if (n < 0 || n > VHUB_CLIENT_MAX_FDS_PER_MESSAGE)
                return -EBADMSG;
        r = vhub_frame_in_take_fds(&c->in, (unsigned)n, ret_fds);
        if (r < 0)
                return r;
        *ret_n = (unsigned)n;
        return 0;
}

/* One JSON-RPC object (not a batch).  Takes a reference on msg. */
static int client_dispatch_one(struct vhub_client *c, json_t *msg) {
        struct client_msg *m;
        const json_t *id;
        int *fds = NULL;
        unsigned n_fds = 0;
        int r;

        if (!json_is_object(msg))
                return -EBADMSG;
        r = client_take_fds(c, msg, &fds, &n_fds);
        if (r < 0)
                return r;

        id = json_object_get(msg, "id");
        if (id && json_is_null(id)) {
                /* The daemon refused our framing ("id": null): nothing to
                 * match it with, and the daemon closes after -32600. */
                vhub_client_close_fds(fds, n_fds);
                if (!json_is_object(json_object_get(msg, "error")))
                        return -EBADMSG;
                client_error_from_json(json_object_get(msg, "error"), &c->proto_err);
                c->has_proto_err = true;
                return -EPROTO;
        }
        if (id && (!json_is_integer(id) || json_integer_value(id) <= 0 ||
                   json_object_get(msg, "method"))) {
                /* Not an id we ever sent, or a request to us: nothing here
                 * serves requests, so drop it. */
                vhub_client_close_fds(fds, n_fds);
                return 0;
        }
        if (!id && !json_is_string(json_object_get(msg, "method"))) {
                vhub_client_close_fds(fds, n_fds);
                return -EBADMSG;
        }
        if (id && ((uint64_t)json_integer_value(id) >= c->next_id ||
                   client_is_abandoned(c, (uint64_t)json_integer_value(id), true))) {
                /* never sent, or forgotten: nobody will claim it */
                vhub_client_close_fds(fds, n_fds);
                return 0;
        }
        if (c->responses.n + c->events.n >= VHUB_CLIENT_MAX_QUEUED_MESSAGES) {
                vhub_client_close_fds(fds, n_fds);
                return -ENOBUFS;
        }

        m = calloc(1, sizeof(*m));
        if (!m) {
                vhub_client_close_fds(fds, n_fds);
                return -ENOMEM;
        }
        m->msg = json_incref(msg);
        m->fds = fds;
        m->n_fds = n_fds;
        if (id) {
                struct client_async_call *a;

                m->id = (uint64_t)json_integer_value(id);
                a = client_async_find(c, m->id);
                if (!a)
                        msg_queue_push(&c->responses, m);
                else if (!a->reply)
                        a->reply = m;   /* its callback runs at the next dispatch */
                else
                        client_msg_free(m); /* answered twice: the first answer counts */
        } else
                msg_queue_push(&c->events, m);
        return 0;
}

static int client_dispatch_line(struct vhub_client *c, const char *line, size_t len) {
        json_error_t jerr;
        json_t *msg;
        int r = 0;

        /* Blank lines carry nothing. */
        while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == ' ' || line[len - 1] == '\t'))
                len--;
        if (len == 0)
                return 0;

        msg = json_loadb(line, len, 0, &jerr);
        if (!msg)
                return -EBADMSG;
        if (json_is_array(msg)) {
                /* A batch answer: its members are handled one by one. */
                size_t i;
                json_t *e;

                json_array_foreach(msg, i, e) {
                        r = client_dispatch_one(c, e);
                        if (r < 0)
                                break;
                }
        } else
                r = client_dispatch_one(c, msg);
        json_decref(msg);
        return r;
}

int client_read_once(struct vhub_client *c) {
        const char *line;
        size_t len;
        ssize_t n;
        int r;

        if (c->error)
                return c->error;
        n = vhub_frame_in_read(&c->in, c->fd, NULL);
        if (n == -EAGAIN)
                return 0;
        if (n == 0)
                n = -ECONNRESET;
        if (n < 0)
                return client_break(c, (int)n);
        /* Every line is handed over, in order, before anything is judged:
         * messages before a violation are still delivered. */
        while (vhub_frame_in_next_line(&c->in, &line, &len) > 0) {
                r = client_dispatch_line(c, line, len);
                if (r < 0)
                        return client_break(c, r);
        }
        r = vhub_frame_in_check(&c->in);
        if (r < 0)
                return client_break(c, r);
        return n > INT32_MAX ? INT32_MAX : (int)n;
}

/* Read everything the socket holds right now. */
static int client_read_available(struct vhub_client *c) {
        int r;

        while ((r = client_read_once(c)) > 0)
                ;
        return r;
}

/* Wait until the socket is ready or the deadline passes: 1, 0 or -errno. */
static int client_poll(struct vhub_client *c, short events, int64_t deadline, short *ret_revents) {
        struct pollfd p = { .fd = c->fd, .events = events };
        int r;

        for (;;) {
                r = poll(&p, 1, deadline_remaining(deadline));
                if (r >= 0)
                        break;
                if (errno != EINTR)
                        return -errno;
        }
        if (ret_revents)
                *ret_revents = p.revents;
        return r > 0;
}

/* ---- output ---- */

/* msg as one line with dups of fds; *ret_seq (may be NULL) its number. */
static int client_frame_queue(struct vhub_client *c, const json_t *msg, const int *fds, unsigned n_fds,
                              uint64_t *ret_seq) {
        struct iovec line;
        char *p;
        int r = vhub_frame_encode(msg, &p, &line.iov_len);

        if (r < 0)
                return r;
        line.iov_base = p;
        r = vhub_frame_out_queue(&c->out, &line, 1, fds, n_fds, ret_seq);
        free(p);
        return r;
}

int client_queue_request(struct vhub_client *c, const char *method, json_t *params,
                         const int *fds, unsigned n_fds, uint64_t *ret_id, uint64_t *ret_seq) {
        json_t *msg = NULL;
        uint64_t id;
        int r;

        if (!method || (n_fds > 0 && !fds) || n_fds > VHUB_CLIENT_MAX_FDS_PER_MESSAGE ||
            (params && !json_is_object(params) && !json_is_array(params))) {
                r = -EINVAL;
                goto out;
        }
        if (c->error) {
                r = c->error;
                goto out;
        }
        id = c->next_id;
        msg = json_pack("{s:s, s:I, s:s}", "jsonrpc", "2.0", "id", (json_int_t)id, "method", method);
        if (!msg) {
                r = -ENOMEM;
                goto out;
        }
        if (params) {
                r = json_object_set_new(msg, "params", params);
                params = NULL;
                if (r < 0) {
                        r = -ENOMEM;
                        goto out;
                }
        }
        if (n_fds > 0 && json_object_set_new(msg, "fds", json_integer(n_fds)) < 0) {
                r = -ENOMEM;
                goto out;
        }
        r = client_frame_queue(c, msg, fds, n_fds, ret_seq);
        if (r < 0)
                goto out;
        c->next_id++;
        *ret_id = id;
out:
        json_decref(params);
        json_decref(msg);
        return r;
}

int client_flush(struct vhub_client *c) {
        int r;

        if (c->error)
                return c->error;
        r = vhub_frame_out_flush(&c->out, c->fd);
        if (r < 0)
                return client_break(c, r);
        return r;
}

/* Block until line seq (and everything queued before it) is written,
 * reading meanwhile so that a daemon blocked on writing to us can go on
 * reading from us. */
static int client_send_wait(struct vhub_client *c, uint64_t seq, int64_t deadline) {
        for (;;) {
                short revents = 0;
                int r = client_flush(c);

                if (r < 0)
                        return r;
                if (c->out.sent_seq >= seq)
                        return 0;
                r = client_poll(c, POLLIN | POLLOUT, deadline, &revents);
                if (r < 0)
                        return client_break(c, r);
                if (r == 0) {
                        /* Half a line on the wire can not be taken back. */
                        if (vhub_frame_out_drop(&c->out, seq) == -EBUSY)
                                return client_break(c, -ETIMEDOUT);
                        return -ETIMEDOUT;
                }
                if (revents & (POLLIN | POLLHUP | POLLERR)) {
                        r = client_read_available(c);
                        if (r < 0)
                                return r;
                }
        }
}

static int client_send_request(struct vhub_client *c, const char *method, json_t *params,
                               const int *fds, unsigned n_fds, int64_t deadline, uint64_t *ret_id) {
        uint64_t id, seq;
        int r;

        r = client_queue_request(c, method, params, fds, n_fds, &id, &seq);
        if (r < 0)
                return r;
        r = client_send_wait(c, seq, deadline);
        if (r < 0)
                return r;
        if (ret_id)
                *ret_id = id;
        return 0;
}

int vhub_client_send_request(struct vhub_client *c, const char *method, json_t *params,
                             const int *fds, unsigned n_fds, uint64_t *ret_id) {
        return client_send_request(c, method, params, fds, n_fds, -1, ret_id);
}

/* ---- waiting ---- */

/* Free m, its fds going to the caller if ret_fds wants them (else they close
 * with m, and *ret_n_fds is 0). */
static void client_msg_free_giving_fds(struct client_msg *m, int **ret_fds, unsigned *ret_n_fds) {
        if (ret_fds) {
                *ret_fds = m->fds;
                m->fds = NULL;
        }
        if (ret_n_fds)
                *ret_n_fds = ret_fds ? m->n_fds : 0;
        client_msg_free(m);
}

static int client_deliver_response(struct client_msg *m, json_t **ret_result, int **ret_fds,
                                   unsigned *ret_n_fds, struct vhub_client_error *ret_err) {
        const json_t *error = json_object_get(m->msg, "error");
        json_t *result;

        if (error) {
                if (ret_err)
                        client_error_from_json(error, ret_err);
                client_msg_free(m);
                return -EREMOTEIO;
        }
        result = json_object_get(m->msg, "result");
        if (!result) {
                client_msg_free(m);
                return -EBADMSG;
        }
        if (ret_result)
                *ret_result = json_incref(result);
        client_msg_free_giving_fds(m, ret_fds, ret_n_fds);
        return 0;
}

static int client_wait_response(struct vhub_client *c, uint64_t id, int64_t deadline,
                                json_t **ret_result, int **ret_fds, unsigned *ret_n_fds,
                                struct vhub_client_error *ret_err) {
        if (id == 0 || id >= c->next_id || client_async_find(c, id))
                return -EINVAL; /* nothing will ever answer it here */
        for (;;) {
                struct client_msg *m = client_msg_queue_take(&c->responses, true, id);
                int r;

                if (m)
                        return client_deliver_response(m, ret_result, ret_fds, ret_n_fds, ret_err);
                if (c->error) {
                        if (c->has_proto_err && ret_err)
                                *ret_err = c->proto_err;
                        return c->error;
                }
                r = client_read_once(c);
                if (r != 0)
                        continue; /* data, or broken: the loop reports it after a last look */
                r = client_poll(c, POLLIN, deadline, NULL);
                if (r < 0)
                        return r;
                if (r == 0)
                        return -ETIMEDOUT;
        }
}

int vhub_client_wait_response(struct vhub_client *c, uint64_t id, int timeout_ms,
                              json_t **ret_result, int **ret_fds, unsigned *ret_n_fds,
                              struct vhub_client_error *ret_err) {
        return client_wait_response(c, id, deadline_from_timeout(timeout_ms), ret_result, ret_fds,
                                    ret_n_fds, ret_err);
}

int vhub_client_call(struct vhub_client *c, const char *method, json_t *params,
                     const int *fds, unsigned n_fds, int timeout_ms,
                     json_t **ret_result, int **ret_fds, unsigned *ret_n_fds,
                     struct vhub_client_error *ret_err) {
        int64_t deadline = deadline_from_timeout(timeout_ms);
        uint64_t id;
        int r;

        r = client_send_request(c, method, params, fds, n_fds, deadline, &id);
        if (r < 0)
                return r;
        r = client_wait_response(c, id, deadline, ret_result, ret_fds, ret_n_fds, ret_err);
        if (r == -ETIMEDOUT)
                vhub_client_abandon(c, id);
        return r;
}

int vhub_client_next_event(struct vhub_client *c, int timeout_ms, json_t **ret_event,
                           int **ret_fds, unsigned *ret_n_fds) {
        int64_t deadline = deadline_from_timeout(timeout_ms);

        for (;;) {
                struct client_msg *m = c->event_fn ? NULL : client_msg_queue_take(&c->events, false, 0);
                int r;

                if (m) {
                        if (ret_event)
                                *ret_event = json_incref(m->msg);
                        client_msg_free_giving_fds(m, ret_fds, ret_n_fds);
                        return 1;
                }
                if (c->error)
                        return c->error;
                r = client_read_once(c);
                if (r != 0)
                        continue;
                r = client_poll(c, POLLIN, deadline, NULL);
                if (r < 0)
                        return r;
                if (r == 0)
                        return 0;
        }
}
