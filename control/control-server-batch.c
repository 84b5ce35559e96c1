/* SPDX-License-Identifier: MIT */
/*
 * The control server's batches, run in slices between the connection's
 * reads (control-server.c for the server and its connections).
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
        cs_conn_finish_if_answered(c);
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
        unsigned k = cs_element_fds(e);
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
                cs_handle_request(r->conn, e, &sub, r->b, i);
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
void cs_batch_run_abort(struct batch_run *r) {
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

void cs_conn_on_message(struct rpc_conn *rpc, json_t *msg, struct rpc_fds *fds, void *userdata) {
        struct control_conn *c = userdata;
        uint64_t serial = c->snap_serial;

        control_conn_ref(c);
        control_conn_fds_changed(c);    /* its fds are the request's now, not its input's */
        if (json_is_array(msg))
                batch_start(c, msg, fds);
        else
                cs_handle_request(c, msg, fds, NULL, 0);
        rpc_fds_clear(fds); /* what the request did not take */
        json_decref(msg);
        /* the line is out of its input (unless a record written while it
         * was handled says so already: a call that waits writes one, and
         * what changed since is dirty again) */
        if (c->snap_serial == serial)
                control_conn_changed(c);
        control_conn_unref(c);
}
