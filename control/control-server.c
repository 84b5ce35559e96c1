/* SPDX-License-Identifier: MIT */
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

static void conn_send(struct control_conn *c, json_t *msg, const int *fds, unsigned n_fds) {
        if (c->rpc)
                (void)rpc_conn_send(c->rpc, msg, fds, n_fds);
        if (n_fds > 0)
                control_conn_fds_changed(c);    /* their dups queued */
}

/* A half-closed connection closes once every request it sent is answered. */
static void conn_finish_if_answered(struct control_conn *c) {
        if (c->eof && c->pending == 0 && !c->run && c->rpc)
                rpc_conn_close_after_flush(c->rpc, "peer closed");
}

/* ---- the fd budget (vhub-fd-budget.h) ---- */

static int server_check_fds(struct control_server *s, uid_t uid, unsigned n, unsigned slack,
                            struct vhub_error *err) {
        return vhub_context_check_fds(s->ctx, uid, n, slack, err);
}

int control_req_check_fds(struct control_req *req, unsigned n, struct vhub_error *err) {
        return server_check_fds(req->conn->srv, req->conn->uid, n, 0, err);
}

/* How far fds that already arrived, or a new connection, may pass the
 * budget: the request they belong to is answered -32008 and closes them.
 * Root may use half of the reserve for that, others a quarter of it; the
 * rest stays for the daemon itself. */
static unsigned fd_slack(const struct control_server *s, uid_t uid) {
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
        r = server_check_fds(c->srv, c->uid, 0, fd_slack(c->srv, c->uid), &err);
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
                conn_send(c, response, fds, n_fds);
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
        conn_finish_if_answered(cc->conn);
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

static void handle_request(struct control_conn *c, json_t *msg, struct rpc_fds *fds,
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

static unsigned element_fds(json_t *e) {
        json_t *n = json_is_object(e) ? json_object_get(e, "fds") : NULL;

        return json_is_integer(n) ? (unsigned)json_integer_value(n) : 0;
}

/* ---- batches, run in slices ---- */

/* A batch whose elements are being run: for at most RPC_SLICE_USEC at a
 * time, the connection's input paused in between, so that one line of
 * thousands of elements does not hold the loop (timers, the watchdog and
 * every other connection would wait). */
struct batch_run {
        struct control_conn *conn;   /* a reference */
        json_t *elements;            /* the array (a reference) */
        struct rpc_fds fds;          /* the fds of the elements not run yet */
        struct control_batch *b;
        size_t next;                 /* the next element to run */
        unsigned off;                /* where its fds start in fds */
        struct event *ev;            /* the next slice, from the loop */
};

static void batch_run_free(struct batch_run *r) {
        struct control_conn *c = r->conn;

        c->run = NULL;
        vhub_event_freep(&r->ev);
        rpc_fds_clear(&r->fds);
        json_decref(r->elements);
        free(r);
        if (c->rpc)
                rpc_conn_resume_input(c->rpc);
        conn_finish_if_answered(c);
        control_conn_unref(c);
}

/* Element i of a batch its connection's record could not name: -32603,
 * not run (a crash would answer neither it nor the batch). */
static void batch_refuse_unrecorded(struct batch_run *r, unsigned i, json_t *e) {
        json_t *id = json_is_object(e) ? json_object_get(e, "id") : json_null();
        struct control_req req = { .conn = r->conn, .batch = r->b, .batch_index = i };
        struct vhub_error err = { 0 };

        if (!id) {
                control_batch_slot(r->b, i, NULL);      /* a notification: not run */
                return;
        }
        req.id = control_id_valid(id) ? id : json_null();
        vhub_error_set(&err, VHUB_ERR_INTERNAL, CONTROL_UNRECORDED);
        control_req_error(&req, &err);
}

/* Element r->next: run, refused past the output bound or unrecorded, or
 * (connection gone) left unanswered. */
static void batch_run_one(struct batch_run *r) {
        unsigned i = (unsigned)r->next++;
        json_t *e = json_array_get(r->elements, i);
        /* element i's fds follow those of the elements before it */
        unsigned k = element_fds(e);
        struct rpc_fds sub = { .fds = NULL, .n = 0 };

        if (k > 0 && r->off + k <= r->fds.n) {
                sub.fds = calloc(k, sizeof(int));
                if (sub.fds) {
                        for (unsigned j = 0; j < k; j++)
                                sub.fds[j] = rpc_fds_take(&r->fds, r->off + j);
                        sub.n = k;
                }
        }
        r->off += k;
        if (!r->conn->rpc)
                control_batch_slot(r->b, i, NULL);
        /* past the output bound nothing more is run, notifications included */
        else if (control_batch_over(r->b) && json_object_get(e, "id"))
                control_batch_refuse(r->b, i, e);
        else if (control_batch_over(r->b))
                control_batch_slot(r->b, i, NULL);
        else if (control_batch_unrecorded(r->b))
                batch_refuse_unrecorded(r, i, e);
        else
                handle_request(r->conn, e, &sub, r->b, i);
        rpc_fds_clear(&sub);
}

static void batch_run_finish(struct batch_run *r) {
        control_batch_slot(r->b, (unsigned)json_array_size(r->elements), NULL); /* drops the hold */
        batch_run_free(r);
}

static void batch_run_slice(struct batch_run *r) {
        static const struct timeval now = { 0, 0 };
        uint64_t started = vhub_now_usec();
        size_t n = json_array_size(r->elements);

        while (r->next < n) {
                batch_run_one(r);
                if (r->next < n && r->conn->rpc && vhub_now_usec() - started >= RPC_SLICE_USEC) {
                        /* a zero timer: the loop polls and runs what is due first */
                        rpc_conn_pause_input(r->conn->rpc);
                        evtimer_add(r->ev, &now);
                        return;
                }
        }
        batch_run_finish(r);
}

static void batch_run_cb(evutil_socket_t fd, short what, void *userdata) {
        struct batch_run *r = userdata;

        /* it outlived a turn of the loop: a crash from here on must answer
         * it, so its ids are stored before more of it runs */
        if (r->conn->rpc)
                (void)control_batch_record(r->b);
        batch_run_slice(r);
}

/* The connection closed while its batch waited for its next slice: the
 * rest is not run (nobody would get the answer). */
static void batch_run_abort(struct batch_run *r) {
        event_del(r->ev);
        while (r->next < json_array_size(r->elements))
                control_batch_slot(r->b, (unsigned)r->next++, NULL);
        batch_run_finish(r);
}

static void batch_start(struct control_conn *c, json_t *msg, struct rpc_fds *fds) {
        struct control_req req = { .conn = c, .id = json_null() };
        struct vhub_error err = { 0 };
        struct batch_run *r;

        if (json_array_size(msg) == 0) {
                vhub_error_set(&err, VHUB_ERR_INVALID_REQUEST, "empty batch");
                control_req_error(&req, &err);
                return;
        }
        r = calloc(1, sizeof(*r));
        if (r)
                r->ev = evtimer_new(vhub_context_base(c->srv->ctx), batch_run_cb, r);
        if (!r || !r->ev) {
                free(r);
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                control_req_error(&req, &err);
                return;
        }
        r->b = control_batch_new(c, msg, c->srv->opts.limits.max_out_bytes, &err);
        if (!r->b) {
                vhub_event_freep(&r->ev);
                free(r);
                control_req_error(&req, &err);
                return;
        }
        r->conn = c;
        control_conn_ref(c);
        r->elements = json_incref(msg);
        r->fds = *fds;          /* moved: the elements take them as they run */
        *fds = (struct rpc_fds){ .fds = NULL, .n = 0 };
        c->run = r;
        batch_run_slice(r);
}

static void conn_on_message(struct rpc_conn *rpc, json_t *msg, struct rpc_fds *fds, void *userdata) {
        struct control_conn *c = userdata;
        uint64_t serial = c->snap_serial;

        control_conn_ref(c);
        control_conn_fds_changed(c);    /* its fds are the request's now, not its input's */
        if (json_is_array(msg))
                batch_start(c, msg, fds);
        else
                handle_request(c, msg, fds, NULL, 0);
        rpc_fds_clear(fds); /* what the request did not take */
        json_decref(msg);
        /* the line is out of its input (unless a record written while it
         * was handled says so already: a call that waits writes one, and
         * what changed since is dirty again) */
        if (c->snap_serial == serial)
                control_conn_changed(c);
        control_conn_unref(c);
}

static void accept_resume(struct control_server *s);

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
                batch_run_abort(c->run);
        TAILQ_REMOVE(&s->conns, c, link);
        s->n_conns--;
        control_conn_snapshot_gone(c);
        control_conn_fds_gone(c);
        accept_resume(s);   /* an fd is free again */
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
        conn_finish_if_answered(c);
}

const struct rpc_conn_ops control_conn_ops = {
        .on_message = conn_on_message,
        .on_close = conn_on_close,
        .on_eof = conn_on_eof,
        .admit_fds = conn_admit_fds,
        .on_drained = conn_on_drained,
        .on_fds_dropped = conn_on_fds_dropped,
        .on_input = conn_on_input,
        .on_fds_lost = control_conn_fds_lost,
};

static bool conn_congested(const struct vhub_owner *o);

/* What the model may ask of a connection as the owner of VMs. */
const struct vhub_owner_ops control_conn_owner_ops = {
        .congested = conn_congested,
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

/* ---- accepting ---- */

#define ACCEPT_RETRY_MS 200

/* Tell a connection we will not serve why, and close it (fd taken). */
static void refuse_connection(int fd, const char *detail) {
        json_t *msg = json_pack("{s:s, s:n, s:{s:i, s:s, s:{s:s}}}", "jsonrpc", "2.0", "id", "error",
                                "code", VHUB_ERR_LIMIT, "message", vhub_error_message(VHUB_ERR_LIMIT),
                                "data", "detail", detail);
        char *line = msg ? json_dumps(msg, JSON_COMPACT) : NULL;

        if (line) {
                size_t n = strlen(line);

                line[n] = '\n'; /* replaces the NUL: sent by length below */
                (void)send(fd, line, n + 1, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        free(line);
        json_decref(msg);
        vhu_safe_close(fd);
}

static void accept_retry_cb(evutil_socket_t fd, short what, void *userdata) {
        accept_resume(userdata);
}

/* Out of fds: stop watching the listening socket (it stays readable and
 * accept() keeps failing: a busy loop) until a connection closes or the
 * retry timer fires. */
static void accept_pause(struct control_server *s) {
        struct timeval tv = vhub_timeval_from_ms(ACCEPT_RETRY_MS);

        if (s->accept_paused)
                return;
        s->accept_paused = true;
        event_del(s->ev_accept);
        evtimer_add(s->ev_accept_retry, &tv);
}

static void accept_resume(struct control_server *s) {
        if (!s->accept_paused || s->paused || vhub_context_shutting_down(s->ctx))
                return;
        s->accept_paused = false;
        evtimer_del(s->ev_accept_retry);
        if (s->spare_fd < 0)
                s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        event_add(s->ev_accept, NULL);
}

/* accept() failed for want of fds: give up the spare for a moment to take
 * the connection and tell it so.  False if that did not work either. */
static bool accept_refuse_with_spare(struct control_server *s, int lfd) {
        char detail[128];
        int fd;

        if (s->spare_fd < 0)
                return false;
        s->spare_fd = vhu_safe_close(s->spare_fd);
        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd >= 0) {
                struct rlimit rl = { 0 };

                (void)getrlimit(RLIMIT_NOFILE, &rl);
                snprintf(detail, sizeof(detail), "the daemon is out of fds (fd limit %llu)",
                         (unsigned long long)rl.rlim_cur);
                refuse_connection(fd, detail);
        }
        s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        return fd >= 0;
}

/* Room for another connection of uid?  All together at most
 * max_connections, of which non-root uids may hold all but an eighth (root
 * can always connect), and one non-root uid at most its share (the others
 * can too).  False with a sentence in detail. */
static bool connection_admitted(const struct control_server *s, uid_t uid, char *detail, size_t len) {
        unsigned max = s->opts.max_connections;
        unsigned root_reserve = max > 1 ? (max / 8 > 1 ? max / 8 : 1) : 0;
        unsigned per_uid = s->opts.max_connections_per_uid ? s->opts.max_connections_per_uid
                                                            : (max / 4 > 1 ? max / 4 : 1);
        unsigned by_uid = 0, non_root = 0;
        const struct control_conn *c;
        struct vhub_error err = { 0 };

        if (s->n_conns >= max) {
                snprintf(detail, len, "too many control connections (%u, --max-connections)", max);
                return false;
        }
        if (uid == 0)
                return true;
        TAILQ_FOREACH(c, &s->conns, link) {
                non_root += c->uid != 0;
                by_uid += c->uid == uid;
        }
        if (by_uid >= per_uid) {
                snprintf(detail, len, "uid %u has %u control connections (--max-connections-per-uid)",
                         (unsigned)uid, by_uid);
                return false;
        }
        /* other uids' numbers stay out of the detail: no oracle on them */
        if (non_root >= max - root_reserve) {
                snprintf(detail, len, "the control connections non-root uids may hold are in use");
                return false;
        }
        /* what it stores (its group, its record) must fit uid's share of
         * the fd store: past it, it would not survive a restart */
        if (vhub_fd_store_check(s->ctx, uid, VHUB_CONNECTION_STORE_ENTRIES, &err) < 0) {
                snprintf(detail, len, "%s", err.detail);
                return false;
        }
        return true;
}

static void accept_cb(evutil_socket_t lfd, short what, void *userdata) {
        struct control_server *s = userdata;
        struct vhub_error err = { 0 };
        struct control_conn *c;
        char detail[256];
        struct ucred cred;
        socklen_t len = sizeof(cred);
        int fd, r;

        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
                int e = errno;

                if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
                        if (!s->out_of_fds)
                                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                                              "cannot accept control connections: %s", strerror(e));
                        s->out_of_fds = true;
                        if ((e != EMFILE && e != ENFILE) || !accept_refuse_with_spare(s, lfd))
                                accept_pause(s);
                }
                return;
        }
        if (s->out_of_fds) {
                s->out_of_fds = false;
                vhub_log_full(LOG_NOTICE, NULL, NULL, NULL, "accepting control connections again");
        }
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
                vhu_safe_close(fd);
                return;
        }
        if (!connection_admitted(s, cred.uid, detail, sizeof(detail))) {
                unsigned long long left_out;

                refuse_connection(fd, detail);
                /* a uid can make this happen at will: rate-limited */
                if (vhub_log_ratelimit(&s->refusal_log, vhub_now_usec(), &left_out))
                        vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                                      "refused a control connection of uid %u pid %d: %s (%llu refusals not logged)",
                                      (unsigned)cred.uid, (int)cred.pid, detail, left_out);
                return;
        }
        /* the connection is an fd of its uid's too */
        if (server_check_fds(s, cred.uid, 1, cred.uid == 0 ? fd_slack(s, 0) : 0, &err) < 0) {
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "refused a control connection of uid %u pid %d: %s", (unsigned)cred.uid,
                              (int)cred.pid, err.detail);
                refuse_connection(fd, err.detail);
                return;
        }
        c = control_conn_alloc(s, ++s->next_conn_id);
        if (!c) {
                vhu_safe_close(fd);
                return;
        }
        r = vhub_cred_from_socket(fd, &c->cred);
        if (r < 0) {
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "refused a control connection: its credentials: %s", strerror(-r));
                vhu_safe_close(fd);
                free(c);
                return;
        }
        r = rpc_conn_new(vhub_context_base(s->ctx), fd, &s->opts.limits, &control_conn_ops, c, &c->rpc);
        if (r < 0) { /* rpc_conn_new closed fd */
                vhub_cred_done(&c->cred);
                free(c);
                return;
        }
        c->uid = rpc_conn_peer_uid(c->rpc);
        c->pid = rpc_conn_peer_pid(c->rpc);
        control_conn_own_entries(c, true);
        vhub_fd_track(s->ctx, c->fd_group, rpc_conn_fd(c->rpc), "ctl/conn/%llu", (unsigned long long)c->id);
        TAILQ_INSERT_TAIL(&s->conns, c, link);
        s->n_conns++;
        control_conn_changed(c);        /* its record, before anything is read */
        control_conn_fds_changed(c);    /* its socket */
        vhub_changed(s->ctx, NULL);     /* the connection counter */
        vhub_log_full(LOG_DEBUG, NULL, NULL, NULL, "control connection %llu from uid %u pid %d",
                      (unsigned long long)c->id, (unsigned)c->uid, (int)c->pid);
}

/* ---- events ---- */

static bool conn_wants(const struct control_conn *c, const struct vhub_vm *vm) {
        uid_t uid = vhub_vm_uid(vm);

        if (vhub_vm_owner(vm) == &c->owner)
                return true;
        if (!vhub_vm_visible_to(vm, c->uid))
                return false;
        /* every VM it may see: its uid's, root's every uid's */
        if (c->sub_all)
                return true;
        for (size_t i = 0; i < c->n_sub_vms; i++)
                if (c->sub_uids[i] == uid && strcmp(c->sub_vms[i], vhub_vm_name(vm)) == 0)
                        return true;
        return false;
}

static json_t *event_params(const struct vhub_event *ev) {
        char timestamp[VHUB_RFC3339_LEN];
        json_t *p;

        /* the model's time, not ours: every face says the same */
        vhub_format_rfc3339(ev->timestamp_usec, timestamp);
        p = json_pack("{s:s, s:s, s:I, s:s}", "event", vhub_event_type_to_string(ev->type), "timestamp",
                      timestamp, "uid", (json_int_t)ev->uid, "vm", vhub_vm_name(ev->vm));
        if (!p)
                return NULL;
        if (ev->device)
                json_object_set_new(p, "device", json_string(ev->device));
        switch (ev->type) {
        case VHUB_EV_DISCONNECTED:
        case VHUB_EV_FAILED:
        case VHUB_EV_VM_DESTROYED:
                json_object_set_new(p, "reason", json_string(ev->reason ? ev->reason : ""));
                break;
        case VHUB_EV_RECONNECTED: {
                json_t *v = json_array();

                for (unsigned i = 0; i < ev->n_vrings; i++)
                        json_array_append_new(v, json_pack("{s:I, s:I, s:I}", "index",
                                                           (json_int_t)ev->vrings[i].index, "base",
                                                           (json_int_t)ev->vrings[i].base, "outstanding",
                                                           (json_int_t)ev->vrings[i].outstanding));
                json_object_set_new(p, "reconnects", json_integer(ev->reconnects));
                json_object_set_new(p, "exact", json_boolean(ev->exact));
                json_object_set_new(p, "vrings", v);
                break;
        }
        case VHUB_EV_LINGERING:
                json_object_set_new(p, "linger_ms", vhub_json_u64(ev->linger_ms));
                break;
        case VHUB_EV_BACKEND_REQUEST:
                json_object_set_new(p, "request", json_string(ev->request ? ev->request : ""));
                json_object_set_new(p, "token", vhub_json_u64(ev->token));
                for (unsigned i = 0; i < ev->n_fields; i++)
                        json_object_set_new(p, ev->fields[i].key, vhub_json_u64(ev->fields[i].value));
                if (ev->n_fds == 1)
                        json_object_set_new(p, "fd", json_integer(0));
                else if (ev->n_fds > 1) {
                        json_t *a = json_array();

                        for (unsigned i = 0; i < ev->n_fds; i++)
                                json_array_append_new(a, json_integer(i));
                        json_object_set_new(p, "fds_index", a);
                }
                break;
        default:
                break;
        }
        return p;
}

/* A connection is behind on its events when its output queue holds a
 * quarter of the bound (bytes or fds): back-end channels of the VMs it owns
 * pause there, far from the bound at which the connection would be dropped. */
static bool conn_congested(const struct vhub_owner *o) {
        const struct control_conn *c =
                (const struct control_conn *)((const char *)o - offsetof(struct control_conn, owner));
        const struct rpc_conn_limits *l;

        if (!c->rpc)
                return false;
        l = rpc_conn_limits(c->rpc);
        return rpc_conn_queued_bytes(c->rpc) >= l->max_out_bytes / 4 ||
               rpc_conn_queued_fds(c->rpc) >= l->max_out_fds / 4;
}

/* An event's fds are queued to each connection that gets it, as dups held
 * until it reads them: its uid's, within its fd budget.  The owner's are
 * fds received on its behalf and may pass the budget as far as other
 * received fds may (its VM's back-end channels pause long before, while it
 * is behind); a subscriber that would pass it is dropped at once, its
 * queue with it -- it does not read, and its uid must not eat into what
 * the others share. */
static bool conn_may_take_fds(struct control_server *s, struct control_conn *c,
                              const struct vhub_event *ev) {
        bool owner = vhub_vm_owner(ev->vm) == &c->owner;
        struct vhub_error err = { 0 };
        char reason[sizeof(err.detail) + 64];

        if (server_check_fds(s, c->uid, ev->n_fds, owner ? fd_slack(s, c->uid) : 0, &err) == 0)
                return true;
        snprintf(reason, sizeof(reason), "an event's fds would pass the fd budget: %s", err.detail);
        rpc_conn_abort(c->rpc, reason);
        return false;
}

static void server_emit(void *userdata, const struct vhub_event *ev) {
        struct control_server *s = userdata;
        struct control_conn *c, *next;
        json_t *msg = NULL;

        for (c = TAILQ_FIRST(&s->conns); c; c = next) {
                next = TAILQ_NEXT(c, link);
                if (!c->rpc || !conn_wants(c, ev->vm))
                        continue;
                if (!msg) {
                        msg = json_pack("{s:s, s:s, s:o}", "jsonrpc", "2.0", "method", "event", "params",
                                        event_params(ev));
                        if (!msg)
                                return; /* out of memory: nobody gets this one */
                        if (ev->n_fds > 0)
                                json_object_set_new(msg, "fds", json_integer(ev->n_fds));
                }
                /* a client that does not read is dropped by rpc_conn's bound,
                 * never allowed to block the daemon or grow without limit */
                if (ev->n_fds > 0 && !conn_may_take_fds(s, c, ev))
                        continue;
                conn_send(c, msg, ev->fds, ev->n_fds);
        }
        json_decref(msg);
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
        s->ev_accept = event_new(vhub_context_base(ctx), s->listen_fd, EV_READ | EV_PERSIST, accept_cb, s);
        s->ev_accept_retry = evtimer_new(vhub_context_base(ctx), accept_retry_cb, s);
        s->ev_trim = evtimer_new(vhub_context_base(ctx), trim_cb, s);
        if (!s->ev_accept || !s->ev_accept_retry || !s->ev_trim || event_add(s->ev_accept, NULL) < 0) {
                control_server_free(s);
                return -ENOMEM;
        }
        s->sink = (struct vhub_event_sink){ .emit = server_emit, .count_fds = control_server_count_fds,
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
