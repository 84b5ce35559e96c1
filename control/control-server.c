/* SPDX-License-Identifier: MIT */
/*
 * The control server: its connections, their requests and answers, calls
 * waiting on the model, memory given back, the listening socket.  The rest
 * by job, sharing control-server-internal.h: control-server-batch.c
 * (batches run in slices), control-server-accept.c (accepting),
 * control-server-events.c (events out).
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "control-internal.h"
#include "control-listen.h"
#include "control-params.h"
#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

#include "control-server-internal.h"

void control_conn_ref(struct control_conn *c) {
        c->refs++;
}

struct control_conn *control_conn_alloc(struct control_server *s, uint64_t id) {
        struct control_conn *c = calloc(1, sizeof(*c));

        if (!c)
                return NULL;
        c->srv = s;
        c->refs = 1;
        c->id = id;
        TAILQ_INIT(&c->calls);
        TAILQ_INIT(&c->batches);
        c->snap.fd = -1;
        c->snap.newest = -1;
        c->owner = (struct vhub_owner){ .face = VHUB_FACE_JSON_RPC, .id = c->id, .ops = &control_conn_owner_ops };
        vhub_fd_group(c->fd_group, VHUB_FD_GROUP_CONNECTION, c->id);
        return c;
}

void control_conn_own_entries(struct control_conn *c, bool own) {
        vhub_fd_group_own(c->srv->ctx, VHUB_FD_GROUP_CONNECTION, c->id, c->uid, own);
        vhub_fd_group_own(c->srv->ctx, VHUB_SNAP_GROUP_CONN, c->id, c->uid, own);
        c->owns_entries = own;
}

void control_conn_join(struct control_conn *c) {
        struct control_server *s = c->srv;

        c->uid = rpc_conn_peer_uid(c->rpc);
        c->pid = rpc_conn_peer_pid(c->rpc);
        control_conn_own_entries(c, true);
        vhub_fd_track(s->ctx, c->fd_group, rpc_conn_fd(c->rpc), "ctl/conn/%llu", (unsigned long long)c->id);
        TAILQ_INSERT_TAIL(&s->conns, c, link);
        s->n_conns++;
        control_conn_fds_changed(c);    /* its socket */
}

void control_conn_unref(struct control_conn *c) {
        if (--c->refs > 0)
                return;
        if (c->owns_entries)
                control_conn_own_entries(c, false);
        for (size_t i = 0; i < c->n_sub_vms; i++)
                free(c->sub_vms[i]);
        free(c->sub_vms);
        free(c->sub_uids);
        vhub_cred_done(&c->cred);
        vhub_snap_file_close(&c->snap);
        free(c);
}

void cs_conn_send(struct control_conn *c, json_t *msg, const int *fds, unsigned n_fds) {
        if (c->rpc)
                (void)rpc_conn_send(c->rpc, msg, fds, n_fds);
        if (n_fds > 0)
                control_conn_fds_changed(c);    /* their dups queued */
}

/* A half-closed connection closes once every request it sent is answered. */
void cs_conn_finish_if_answered(struct control_conn *c) {
        if (c->eof && c->pending == 0 && !c->run && c->rpc)
                rpc_conn_close_after_flush(c->rpc, "peer closed");
}

/* ---- the fd budget (vhub-fd-budget.h) ---- */

int cs_server_check_fds(struct control_server *s, uid_t uid, unsigned n, unsigned slack,
                            struct vhub_error *err) {
        return vhub_context_check_fds(s->ctx, uid, n, slack, err);
}

int control_req_check_fds(struct control_req *req, unsigned n, struct vhub_error *err) {
        return cs_server_check_fds(req->conn->srv, req->conn->uid, n, 0, err);
}

/* How far fds that already arrived, or a new connection, may pass the
 * budget: the request they belong to is answered -32008 and closes them.
 * Root may use half of the reserve for that, others a quarter of it; the
 * rest stays for the daemon itself. */
unsigned cs_fd_slack(const struct control_server *s, uid_t uid) {
        const struct vhub_fd_budget *b = vhub_context_fd_budget(s->ctx);

        return uid == 0 ? b->reserve / 2 : b->reserve / 4;
}

static int conn_admit_fds(struct rpc_conn *rpc, unsigned n, char *detail, size_t len,
                          void *userdata) {
        struct control_conn *c = userdata;
        struct vhub_error err = { 0 };
        int r;

        /* the n fds are queued on rpc already: counted in the usage */
        control_conn_fds_changed(c);
        r = cs_server_check_fds(c->srv, c->uid, 0, cs_fd_slack(c->srv, c->uid), &err);
        if (r < 0)
                snprintf(detail, len, "%u fds refused: %s", n, err.detail);
        return r;
}

static json_t *error_object(json_t *id, const struct vhub_error *err) {
        json_t *data = json_object();
        json_t *e;

        json_object_set_new(data, "detail", json_string(err->detail));
        /* the contract: {detail}, and for back-end errors {device, request} too */
        if ((err->code == VHUB_ERR_BACKEND || err->code == VHUB_ERR_TIMEOUT) && err->device[0]) {
                json_object_set_new(data, "device", json_string(err->device));
                json_object_set_new(data, "request", err->request ? json_string(err->request) : json_null());
        }
        e = json_pack("{s:i, s:s, s:o}", "code", err->code, "message", vhub_error_message(err->code),
                      "data", data);
        return json_pack("{s:s, s:O, s:o}", "jsonrpc", "2.0", "id", id ? id : json_null(), "error", e);
}

static void respond(struct control_conn *c, json_t *id, struct control_batch *b, unsigned index,
                    json_t *response, const int *fds, unsigned n_fds) {
        if (b) {
                /* fds cannot ride in a batch answer's slots; methods with fds
                 * in their result are refused inside batches beforehand */
                if (id)
                        control_batch_slot(b, index, response);
                else
                        control_batch_slot_unanswered(b, index, response);
                return;
        }
        if (id)
                cs_conn_send(c, response, fds, n_fds);
        json_decref(response);
}

void control_req_result_fds(struct control_req *req, json_t *result, const int *fds, unsigned n) {
        json_t *msg = json_pack("{s:s, s:O, s:o}", "jsonrpc", "2.0", "id",
                                req->id ? req->id : json_null(), "result", result);

        if (n > 0)
                json_object_set_new(msg, "fds", json_integer(n));
        respond(req->conn, req->id, req->batch, req->batch_index, msg, fds, n);
}

void control_req_result(struct control_req *req, json_t *result) {
        control_req_result_fds(req, result, NULL, 0);
}

void control_req_error(struct control_req *req, const struct vhub_error *err) {
        respond(req->conn, req->id, req->batch, req->batch_index, error_object(req->id, err), NULL, 0);
}

/* ---- calls waiting on the model ---- */

static void control_call_done(struct vhub_call *call) {
        struct control_call *cc = (struct control_call *)call;
        struct control_req req = {
                .conn = cc->conn, .id = cc->id, .batch = cc->batch, .batch_index = cc->batch_index,
        };

        if (call->result < 0) {
                control_req_error(&req, &call->error);
        } else if (cc->make_result) {
                json_t *res = cc->make_result(cc);

                if (!res) {
                        struct vhub_error e;

                        vhub_error_set(&e, VHUB_ERR_INTERNAL, "out of memory");
                        control_req_error(&req, &e);
                } else {
                        control_req_result_fds(&req, res, cc->reply_fds, cc->n_reply_fds);
                }
        } else {
                control_req_result(&req, json_object());
        }
        vhu_close_many(cc->reply_fds, cc->n_reply_fds); /* rpc_conn sent its own copies */
        free(cc->reply_fds);
        if (cc->free_data)
                cc->free_data(cc->data);
        TAILQ_REMOVE(&cc->conn->calls, cc, link);
        control_conn_changed(cc->conn);
        vhub_call_release(call);
        cc->conn->pending--;
        cs_conn_finish_if_answered(cc->conn);
        control_conn_unref(cc->conn);
        json_decref(cc->id);
        free(cc);
}

struct control_call *control_call_new(struct control_req *req, control_result_fn make_result) {
        struct control_call *cc = calloc(1, sizeof(*cc));

        if (!cc)
                return NULL;
        cc->call.done = control_call_done;
        cc->conn = req->conn;
        cc->id = req->id ? json_incref(req->id) : NULL;
        cc->batch = req->batch;
        cc->batch_index = req->batch_index;
        cc->make_result = make_result;
        control_conn_ref(req->conn);
        req->conn->pending++;
        /* in the snapshot before the model sends anything for it
         * (control_call_record()) */
        cc->since = req->conn->snap_serial;
        TAILQ_INSERT_TAIL(&req->conn->calls, cc, link);
        control_conn_changed(req->conn);
        return cc;
}

int control_call_record(struct control_call *cc) {
        if (cc->batch)
                return control_batch_record(cc->batch);
        if (!cc->id)
                return 0;       /* a notification: nobody waits for its answer */
        return control_conn_record(cc->conn, cc->since);
}

int control_call_reply_fds(struct control_call *cc, unsigned n) {
        /* once per call: make_result runs once */
        if (cc->reply_fds || n == 0)
                return 0;
        cc->reply_fds = calloc(n, sizeof(*cc->reply_fds));
        return cc->reply_fds ? 0 : -ENOMEM;
}

void control_call_drop(struct control_call *cc) {
        TAILQ_REMOVE(&cc->conn->calls, cc, link);
        control_conn_changed(cc->conn);
        vhub_call_release(&cc->call);
        cc->conn->pending--;
        control_conn_unref(cc->conn);
        json_decref(cc->id);
        free(cc);
}

/* ---- requests ---- */

bool control_id_valid(json_t *id) {
        if (json_is_string(id))
                return json_string_length(id) <= CONTROL_MAX_ID_BYTES;
        return json_is_integer(id) || json_is_real(id) || json_is_null(id);
}

void cs_handle_request(struct control_conn *c, json_t *msg, struct rpc_fds *fds,
                           struct control_batch *b, unsigned index) {
        static const char *const top[] = { "jsonrpc", "method", "params", "id", "fds", NULL };
        struct control_req req = { .conn = c, .fds = fds, .batch = b, .batch_index = index };
        struct vhub_error err = { 0 };
        json_t *id, *params, *method, *version;
        json_t *empty = NULL;

        if (!json_is_object(msg)) {
                vhub_error_set(&err, VHUB_ERR_INVALID_REQUEST, "a request must be a JSON object");
                req.id = json_null();
                control_req_error(&req, &err);
                return;
        }
        id = json_object_get(msg, "id");
        req.id = id;
        version = json_object_get(msg, "jsonrpc");
        method = json_object_get(msg, "method");
        params = json_object_get(msg, "params");
        if (id && !control_id_valid(id)) {
                req.id = json_null();
                vhub_error_set(&err, VHUB_ERR_INVALID_REQUEST,
                               "'id' must be a string of at most %d bytes, a number or null",
                               CONTROL_MAX_ID_BYTES);
                control_req_error(&req, &err);
                return;
        }
        if (!json_is_string(version) || strcmp(json_string_value(version), "2.0") != 0 ||
            !json_is_string(method) || params_check_members_in(msg, "", top, &err) < 0) {
                if (err.code == 0)
                        vhub_error_set(&err, VHUB_ERR_INVALID_REQUEST,
                                       "a request needs \"jsonrpc\": \"2.0\" and a string \"method\"");
                err.code = VHUB_ERR_INVALID_REQUEST;
                if (!req.id)
                        req.id = json_null(); /* answer even a broken notification */
                control_req_error(&req, &err);
                return;
        }
        if (params && !json_is_object(params)) {
                vhub_error_set(&err, VHUB_ERR_PARAMS, "'params' must be an object");
                control_req_error(&req, &err);
                return;
        }
        /* fds the request brought may not be kept past the uid's budget */
        if (fds && fds->n > 0 && control_req_check_fds(&req, fds->n, &err) < 0) {
                control_req_error(&req, &err);
                return;
        }
        if (!params)
                params = empty = json_object();
        req.params = params;
        control_dispatch(&req, json_string_value(method), json_string_length(method));
        json_decref(empty);
}

unsigned cs_element_fds(json_t *e) {
        json_t *n = json_is_object(e) ? json_object_get(e, "fds") : NULL;

        return json_is_integer(n) ? (unsigned)json_integer_value(n) : 0;
}


static void conn_close(struct control_conn *c, const char *reason) {
        struct control_server *s = c->srv;

        if (!c->rpc)
                return;
        vhub_log_full(LOG_INFO, NULL, NULL, NULL, "control connection %llu (uid %u pid %d) closed: %s",
                      (unsigned long long)c->id, (unsigned)c->uid, (int)c->pid, reason);
        control_server_note_spike(s, rpc_conn_take_peak_memory(c->rpc));
        vhub_fd_untrack(s->ctx, c->fd_group, rpc_conn_fd(c->rpc), "ctl/conn/%llu", (unsigned long long)c->id);
        c->rpc = rpc_conn_free(c->rpc);
        if (c->run)
                cs_batch_run_abort(c->run);
        TAILQ_REMOVE(&s->conns, c, link);
        s->n_conns--;
        control_conn_snapshot_gone(c);
        control_conn_fds_gone(c);
        cs_accept_resume(s);   /* an fd is free again */
        /* its VMs linger or go away; none of this waits for back-ends */
        vhub_context_owner_gone(s->ctx, &c->owner);
        control_conn_unref(c);
}

static void conn_on_close(struct rpc_conn *rpc, const char *reason, void *userdata) {
        conn_close(userdata, reason);
}

/* Its output queue emptied: back-end channels of its VMs that paused for
 * it read again. */
static void conn_on_drained(struct rpc_conn *rpc, void *userdata) {
        struct control_conn *c = userdata;

        control_server_note_spike(c->srv, rpc_conn_take_peak_memory(rpc));
        vhub_context_owner_drained(c->srv->ctx, &c->owner);
}

/* Its record holds the bytes read and not handled (a partial line of
 * ordinary size too): rewritten after each read, as after each message,
 * unless a long partial line only grew (left out of the record). */
static void conn_on_input(struct rpc_conn *rpc, void *userdata) {
        if (!control_conn_input_recorded(userdata))
                control_conn_changed(userdata);
}

static void conn_on_fds_dropped(struct rpc_conn *rpc, void *userdata) {
        control_conn_fds_changed(userdata);
}

static void conn_on_eof(struct rpc_conn *rpc, void *userdata) {
        struct control_conn *c = userdata;

        c->eof = true;
        control_conn_changed(c);
        cs_conn_finish_if_answered(c);
}

const struct rpc_conn_ops control_conn_ops = {
        .on_message = cs_conn_on_message,
        .on_close = conn_on_close,
        .on_eof = conn_on_eof,
        .admit_fds = conn_admit_fds,
        .on_drained = conn_on_drained,
        .on_fds_dropped = conn_on_fds_dropped,
        .on_input = conn_on_input,
        .on_fds_lost = control_conn_fds_lost,
};


/* What the model may ask of a connection as the owner of VMs. */
const struct vhub_owner_ops control_conn_owner_ops = {
        .congested = cs_conn_congested,
};

/* ---- giving memory back ---- */

/* A spike smaller than this is left to the allocator. */
#define TRIM_SPIKE_BYTES (256u * 1024u)

static void trim_cb(evutil_socket_t fd, short what, void *userdata) {
#ifdef __GLIBC__
        /* glibc keeps freed heap memory mapped unless it is at the top of
         * the heap; this returns every free page */
        malloc_trim(0);
#endif
}

void control_server_note_spike(struct control_server *s, size_t bytes) {
        struct timeval tv = vhub_timeval_from_ms(100);

        if (bytes >= TRIM_SPIKE_BYTES && s->ev_trim && !evtimer_pending(s->ev_trim, NULL))
                evtimer_add(s->ev_trim, &tv);
}

/* Allocations of this size or more get pages of their own that free()
 * returns at once: big input lines and batch answers do not stay in the
 * heap.  Setting it also turns off glibc's raising of the threshold after
 * such frees, which would put the next big buffers in the heap again. */
static void memory_policy_setup(void) {
#ifdef __GLIBC__
        (void)mallopt(M_MMAP_THRESHOLD, 128 * 1024);
        (void)mallopt(M_TRIM_THRESHOLD, 256 * 1024);
#endif
}

/* ---- listening socket ---- */

int control_server_new(struct vhub_context *ctx, const struct control_server_options *o,
                       struct control_server **ret) {
        struct control_server *s = calloc(1, sizeof(*s));
        int r;

        if (!s) {
                vhu_safe_close(o->listen_fd); /* taken in every case */
                return -ENOMEM;
        }
        memory_policy_setup();
        s->ctx = ctx;
        s->opts = *o;
        s->listen_fd = -1;
        s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        TAILQ_INIT(&s->conns);
        TAILQ_INIT(&s->snap_dirty);
        control_fds_init(s);
        s->carry = control_carry_new(s);        /* NULL: records are not bounded, as before the bound */
        if (o->listen_fd >= 0 && o->listen_fd_ours && o->path) {
                /* the daemon's own, carried across a restart (group L) */
                s->listen_fd = o->listen_fd;
                s->path = strdup(o->path);
                vhub_fd_track(ctx, VHUB_FD_GROUP_LISTENER, s->listen_fd, "ctl/listen");
        } else if (o->listen_fd >= 0) {
                s->listen_fd = o->listen_fd;
                r = fcntl(s->listen_fd, F_GETFL);
                if (r >= 0)
                        (void)fcntl(s->listen_fd, F_SETFL, r | O_NONBLOCK);
                (void)fcntl(s->listen_fd, F_SETFD, FD_CLOEXEC);
        } else {
                r = control_listen_create(o->path, o->mode, o->gid, o->gid_set);
                if (r < 0) {
                        vhu_safe_close(s->spare_fd);
                        control_carry_free(s->carry);
                        free(s);
                        return r;
                }
                s->listen_fd = r;
                s->path = strdup(o->path);
                /* an inherited one is the socket unit's to keep */
                vhub_fd_track(ctx, VHUB_FD_GROUP_LISTENER, s->listen_fd, "ctl/listen");
        }
        s->ev_accept = event_new(vhub_context_base(ctx), s->listen_fd, EV_READ | EV_PERSIST, cs_accept_cb, s);
        s->ev_accept_retry = evtimer_new(vhub_context_base(ctx), cs_accept_retry_cb, s);
        s->ev_trim = evtimer_new(vhub_context_base(ctx), trim_cb, s);
        if (!s->ev_accept || !s->ev_accept_retry || !s->ev_trim || event_add(s->ev_accept, NULL) < 0) {
                control_server_free(s);
                return -ENOMEM;
        }
        s->sink = (struct vhub_event_sink){ .emit = cs_server_emit, .count_fds = control_server_count_fds,
                                            .userdata = s };
        vhub_context_add_sink(ctx, &s->sink);
        s->sink_added = true;
        *ret = s;
        return 0;
}

void control_server_shutdown(struct control_server *s) {
        struct control_conn *c;

        if (s->ev_accept)
                event_del(s->ev_accept);
        if (s->ev_accept_retry)
                evtimer_del(s->ev_accept_retry);
        s->accept_paused = false;
        while ((c = TAILQ_FIRST(&s->conns)))
                conn_close(c, "daemon shutting down");
}

struct control_server *control_server_free(struct control_server *s) {
        if (!s)
                return NULL;
        control_server_shutdown(s);
        control_carry_free(s->carry);
        if (s->sink_added)
                vhub_context_remove_sink(s->ctx, &s->sink);
        vhub_event_freep(&s->ev_accept);
        vhub_event_freep(&s->ev_accept_retry);
        vhub_event_freep(&s->ev_trim);
        s->spare_fd = vhu_safe_close(s->spare_fd);
        json_decref(s->discover);
        if (s->path)
                vhub_fd_untrack(s->ctx, VHUB_FD_GROUP_LISTENER, s->listen_fd, "ctl/listen");
        s->listen_fd = vhu_safe_close(s->listen_fd);
        if (s->path) {
                (void)unlink(s->path);
                free(s->path);
        }
        free(s);
        return NULL;
}

struct conn_visit {
        const struct control_conn *c;
        const struct vhub_fd_visitor *v;
};

static void conn_fd(int fd, const char *what, void *userdata) {
        const struct conn_visit *cv = userdata;
        unsigned long long id = (unsigned long long)cv->c->id;

        if (what)
                vhub_fd_visit(cv->v, fd, NULL, "ctl/conn/%llu/%s", id, what);
        else
                vhub_fd_visit(cv->v, fd, cv->c->fd_group, "ctl/conn/%llu", id);
}

void control_server_foreach_fd(const struct control_server *s, const struct vhub_fd_visitor *v) {
        const struct control_conn *c;

        vhub_fd_visit(v, s->listen_fd, s->path ? VHUB_FD_GROUP_LISTENER : NULL, "ctl/listen");
        vhub_fd_visit(v, s->spare_fd, NULL, "ctl/spare");
        TAILQ_FOREACH(c, &s->conns, link) {
                char snap[VHUB_FD_GROUP_MAX];

                if (c->rpc)
                        rpc_conn_foreach_fd(c->rpc, conn_fd, &(struct conn_visit){ c, v });
                vhub_fd_visit(v, c->snap.fd, vhub_fd_group(snap, VHUB_SNAP_GROUP_CONN, c->id),
                              "ctl/conn/%llu/snapshot", (unsigned long long)c->id);
        }
}

unsigned control_server_n_connections(const struct control_server *s) {
        return s->n_conns;
}

const char *control_server_path(const struct control_server *s) {
        return s->path;
}
