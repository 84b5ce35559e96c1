/* SPDX-License-Identifier: MIT */
/*
 * vhub-client: blocking JSON-RPC client for vhubd's control socket.
 * See vhub-client.h for the API; framing follows control-api.md
 * "Transport and framing".
 */
#include "vhub-client.h"
#include "vhu-scm.h"

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

#define READ_CHUNK (64u * 1024)
#define ABANDONED_MAX 256u

/* One received message with the fds it took from the fd queue. */
struct client_msg {
        struct client_msg *next;
        json_t *msg;
        int *fds;
        unsigned n_fds;
        uint64_t id;            /* responses only */
};

struct msg_queue {
        struct client_msg *head, *tail;
        unsigned n;
};

struct vhub_client {
        int fd;
        int error;              /* sticky -errno once broken */
        uint64_t next_id;

        char *in;               /* unparsed input: at most one partial line after parsing */
        size_t in_len, in_size, scanned;

        int fdq[VHUB_CLIENT_MAX_QUEUED_FDS]; /* received fds, arrival order */
        unsigned fdq_len;

        struct msg_queue responses, events;

        bool has_proto_err;     /* an "id": null error broke the connection */
        struct vhub_client_error proto_err;

        uint64_t abandoned[ABANDONED_MAX];
        unsigned n_abandoned;
};

/* ---- small helpers ---- */

static int64_t now_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t deadline_from_timeout(int timeout_ms) {
        return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

/* Milliseconds left for poll(): -1 forever, 0 expired. */
static int deadline_remaining(int64_t deadline) {
        int64_t left;

        if (deadline < 0)
                return -1;
        left = deadline - now_ms();
        if (left <= 0)
                return 0;
        return left > INT32_MAX ? INT32_MAX : (int)left;
}

static void close_fd_array(int *fds, unsigned n) {
        for (unsigned i = 0; i < n; i++)
                if (fds[i] >= 0)
                        close(fds[i]);
}

void vhub_client_close_fds(int *fds, unsigned n) {
        if (!fds)
                return;
        close_fd_array(fds, n);
        free(fds);
}

static void copy_str(char *dst, size_t size, const char *src) {
        snprintf(dst, size, "%s", src ? src : "");
}

static struct client_msg *client_msg_free(struct client_msg *m) {
        if (!m)
                return NULL;
        json_decref(m->msg);
        vhub_client_close_fds(m->fds, m->n_fds);
        free(m);
        return NULL;
}

static void msg_queue_push(struct msg_queue *q, struct client_msg *m) {
        m->next = NULL;
        if (q->tail)
                q->tail->next = m;
        else
                q->head = m;
        q->tail = m;
        q->n++;
}

/* Unlink and return the first message matching (any id if !by_id). */
static struct client_msg *msg_queue_take(struct msg_queue *q, bool by_id, uint64_t id) {
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

static void msg_queue_clear(struct msg_queue *q) {
        struct client_msg *m;

        while ((m = msg_queue_take(q, false, 0)))
                client_msg_free(m);
}

const char *vhub_client_error_code_name(int code) {
        return vhub_contract_error_message(code);
}

static void error_from_json(const json_t *error, struct vhub_client_error *ret) {
        const json_t *data;

        memset(ret, 0, sizeof(*ret));
        ret->code = (int)json_integer_value(json_object_get(error, "code"));
        copy_str(ret->message, sizeof(ret->message),
                 json_string_value(json_object_get(error, "message")));
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
        close_fd_array(c->fdq, c->fdq_len);
        msg_queue_clear(&c->responses);
        msg_queue_clear(&c->events);
        free(c->in);
        free(c);
        return NULL;
}

int vhub_client_fd(const struct vhub_client *c) {
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

/* The connection is unusable from now on: remember why, drop unclaimed fds
 * (nothing can claim them any more).  Queued messages stay fetchable. */
static int client_break(struct vhub_client *c, int error) {
        if (!c->error)
                c->error = error;
        close_fd_array(c->fdq, c->fdq_len);
        c->fdq_len = 0;
        return c->error;
}

/* ---- input: bytes and fds to messages ---- */

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
        struct client_msg *m = msg_queue_take(&c->responses, true, id);

        if (m) {
                client_msg_free(m);
                return;
        }
        if (id == 0 || id >= c->next_id || client_is_abandoned(c, id, false))
                return;
        /* Bounded: when full, the oldest abandoned id is forgotten and its
         * late response, if any, just stays queued. */
        if (c->n_abandoned == ABANDONED_MAX) {
                memmove(c->abandoned, c->abandoned + 1, sizeof(uint64_t) * (ABANDONED_MAX - 1));
                c->n_abandoned--;
        }
        c->abandoned[c->n_abandoned++] = id;
}

/* Take the fds that msg declares with "fds": N from the front of the queue. */
static int client_take_fds(struct vhub_client *c, const json_t *msg, int **ret_fds, unsigned *ret_n) {
        const json_t *v = json_is_object(msg) ? json_object_get(msg, "fds") : NULL;
        json_int_t n;
        int *fds;

        *ret_fds = NULL;
        *ret_n = 0;
        if (!v)
                return 0;
        if (!json_is_integer(v))
                return -EBADMSG;
        n = json_integer_value(v);
        if (n < 0 || n > VHUB_CLIENT_MAX_FDS_PER_MESSAGE || (unsigned)n > c->fdq_len)
                return -EBADMSG;
        if (n == 0)
                return 0;
        fds = malloc(sizeof(int) * (size_t)n);
        if (!fds)
                return -ENOMEM;
        memcpy(fds, c->fdq, sizeof(int) * (size_t)n);
        c->fdq_len -= (unsigned)n;
        memmove(c->fdq, c->fdq + n, sizeof(int) * c->fdq_len);
        *ret_fds = fds;
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
                error_from_json(json_object_get(msg, "error"), &c->proto_err);
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
        if (id && client_is_abandoned(c, (uint64_t)json_integer_value(id), true)) {
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
                m->id = (uint64_t)json_integer_value(id);
                msg_queue_push(&c->responses, m);
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

/* Parse every complete line in the input buffer. */
static int client_parse_input(struct vhub_client *c) {
        size_t start = 0;
        int r = 0;

        for (;;) {
                char *nl = memchr(c->in + c->scanned, '\n', c->in_len - c->scanned);

                if (!nl) {
                        c->scanned = c->in_len;
                        break;
                }
                r = client_dispatch_line(c, c->in + start, (size_t)(nl - (c->in + start)));
                start = (size_t)(nl - c->in) + 1;
                c->scanned = start;
                if (r < 0)
                        break;
        }
        if (start > 0) {
                memmove(c->in, c->in + start, c->in_len - start);
                c->in_len -= start;
                c->scanned -= start;
        }
        if (r < 0)
                return r;
        if (c->in_len > VHUB_CLIENT_MAX_LINE)
                return -EMSGSIZE;
        /* fds travel with the first byte of their line: fds left over with no
         * partial line pending belong to no message. */
        if (c->in_len == 0 && c->fdq_len > 0)
                return -EBADMSG;
        return 0;
}

/* One non-blocking recvmsg.  Returns bytes read (>0), 0 if nothing was
 * available, or the sticky error once broken (EOF included). */
static int client_read_once(struct vhub_client *c) {
        VHU_SCM_BUF(control, VHUB_CLIENT_MAX_FDS_PER_MESSAGE);
        struct iovec iov;
        struct msghdr mh = {
                .msg_iov = &iov,
                .msg_iovlen = 1,
                .msg_control = control.buf,
                .msg_controllen = sizeof(control.buf),
        };
        struct cmsghdr *cm;
        bool overflow = false;
        ssize_t n;
        int r;

        if (c->error)
                return c->error;

        if (c->in_size - c->in_len < READ_CHUNK) {
                size_t size = c->in_size ? c->in_size * 2 : 2 * READ_CHUNK;
                char *p;

                while (size - c->in_len < READ_CHUNK)
                        size *= 2;
                p = realloc(c->in, size);
                if (!p)
                        return client_break(c, -ENOMEM);
                c->in = p;
                c->in_size = size;
        }
        iov.iov_base = c->in + c->in_len;
        iov.iov_len = c->in_size - c->in_len;

        do
                n = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                        return 0;
                return client_break(c, -errno);
        }

        for (cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
                unsigned k;
                int *p;

                if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                        continue;
                k = (unsigned)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                p = (int *)(void *)CMSG_DATA(cm);
                for (unsigned i = 0; i < k; i++) {
                        int fd;

                        memcpy(&fd, p + i, sizeof(fd));
                        if (c->fdq_len < VHUB_CLIENT_MAX_QUEUED_FDS)
                                c->fdq[c->fdq_len++] = fd;
                        else {
                                close(fd);
                                overflow = true;
                        }
                }
        }
        if (overflow)
                return client_break(c, -ENOBUFS);
        if (mh.msg_flags & MSG_CTRUNC)
                return client_break(c, -EPROTO); /* some fds were lost on the way */

        if (n == 0)
                return client_break(c, -ECONNRESET);

        c->in_len += (size_t)n;
        r = client_parse_input(c);
        if (r < 0)
                return client_break(c, r);
        return (int)(n > INT32_MAX ? INT32_MAX : n);
}

/* Read everything the socket holds right now. */
static int client_read_available(struct vhub_client *c) {
        int r;

        while ((r = client_read_once(c)) > 0)
                ;
        return r;
}

/* Wait until the socket is readable or the deadline passes: 1, 0 or -errno. */
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

static int client_send_line(struct vhub_client *c, const char *buf, size_t len,
                            const int *fds, unsigned n_fds, int64_t deadline) {
        VHU_SCM_BUF(control, VHUB_CLIENT_MAX_FDS_PER_MESSAGE);
        size_t off = 0;

        while (off < len) {
                struct iovec iov = { .iov_base = (char *)buf + off, .iov_len = len - off };
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
                ssize_t n;

                if (c->error)
                        return c->error;
                if (off == 0)
                        vhu_scm_attach(&mh, control.buf, sizeof(control.buf), fds, n_fds);

                n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n >= 0) {
                        off += (size_t)n;
                        continue;
                }
                if (errno == EINTR)
                        continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                        short revents = 0;
                        int r;

                        r = client_poll(c, POLLIN | POLLOUT, deadline, &revents);
                        if (r < 0)
                                return client_break(c, r);
                        if (r == 0) {
                                /* Half a line on the wire can not be taken back. */
                                if (off > 0)
                                        return client_break(c, -ETIMEDOUT);
                                return -ETIMEDOUT;
                        }
                        /* Keep reading while we wait, so a daemon blocked on
                         * writing to us can go on reading from us. */
                        if (revents & (POLLIN | POLLHUP | POLLERR)) {
                                r = client_read_available(c);
                                if (r < 0)
                                        return r;
                        }
                        continue;
                }
                if (off > 0 || errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN)
                        return client_break(c, -errno);
                return -errno; /* nothing sent (e.g. a bad fd): still usable */
        }
        return 0;
}

static int client_send_request(struct vhub_client *c, const char *method, json_t *params,
                               const int *fds, unsigned n_fds, int64_t deadline, uint64_t *ret_id) {
        json_t *msg = NULL;
        char *buf = NULL;
        size_t len;
        uint64_t id;
        int r;

        if (!method || (n_fds > 0 && !fds) || n_fds > VHUB_CLIENT_MAX_FDS_PER_MESSAGE ||
            (params && !json_is_object(params) && !json_is_array(params))) {
                r = -EINVAL;
                goto out;
        }
        for (unsigned i = 0; i < n_fds; i++)
                if (fds[i] < 0) {
                        r = -EBADF;
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

        /* Compact encoding: no raw newline can appear inside the line. */
        len = json_dumpb(msg, NULL, 0, JSON_COMPACT);
        if (len == 0) {
                r = -EINVAL;
                goto out;
        }
        buf = malloc(len + 1);
        if (!buf) {
                r = -ENOMEM;
                goto out;
        }
        if (json_dumpb(msg, buf, len, JSON_COMPACT) != len) {
                r = -EINVAL;
                goto out;
        }
        buf[len] = '\n';

        c->next_id++;
        r = client_send_line(c, buf, len + 1, fds, n_fds, deadline);
        if (r < 0)
                goto out;
        if (ret_id)
                *ret_id = id;
        r = 0;
out:
        json_decref(params);
        json_decref(msg);
        free(buf);
        return r;
}

int vhub_client_send_request(struct vhub_client *c, const char *method, json_t *params,
                             const int *fds, unsigned n_fds, uint64_t *ret_id) {
        return client_send_request(c, method, params, fds, n_fds, -1, ret_id);
}

/* ---- waiting ---- */

static int client_deliver_response(struct client_msg *m, json_t **ret_result, int **ret_fds,
                                   unsigned *ret_n_fds, struct vhub_client_error *ret_err) {
        const json_t *error = json_object_get(m->msg, "error");
        json_t *result;

        if (error) {
                if (ret_err) {
                        error_from_json(error, ret_err);
                        if (!json_is_object(error))
                                copy_str(ret_err->message, sizeof(ret_err->message),
                                         "malformed error object");
                }
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
        if (ret_fds) {
                *ret_fds = m->fds;
                m->fds = NULL;
        }
        if (ret_n_fds)
                *ret_n_fds = ret_fds ? m->n_fds : 0;
        client_msg_free(m);
        return 0;
}

static int client_wait_response(struct vhub_client *c, uint64_t id, int64_t deadline,
                                json_t **ret_result, int **ret_fds, unsigned *ret_n_fds,
                                struct vhub_client_error *ret_err) {
        if (id == 0 || id >= c->next_id)
                return -EINVAL; /* never sent: nothing will ever answer it */
        for (;;) {
                struct client_msg *m = msg_queue_take(&c->responses, true, id);
                int r;

                if (m)
                        return client_deliver_response(m, ret_result, ret_fds, ret_n_fds, ret_err);
                if (c->error) {
                        if (c->has_proto_err && ret_err)
                                *ret_err = c->proto_err;
                        return c->error;
                }
                r = client_read_once(c);
                if (r > 0)
                        continue;
                if (r < 0)
                        continue; /* broken: the loop reports it after a last look */
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
                struct client_msg *m = msg_queue_take(&c->events, false, 0);
                int r;

                if (m) {
                        if (ret_event)
                                *ret_event = json_incref(m->msg);
                        if (ret_fds) {
                                *ret_fds = m->fds;
                                m->fds = NULL;
                        }
                        if (ret_n_fds)
                                *ret_n_fds = ret_fds ? m->n_fds : 0;
                        client_msg_free(m);
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

/* ---- u64 and base64 helpers ---- */

