/* SPDX-License-Identifier: MIT */
/* Shared by the control server's connection handling and its methods. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/types.h>

#include "control-server.h"
#include "rpc-conn.h"
#include "vhub-call.h"
#include "vhub-cred.h"
#include "vhub-error.h"

struct event;
struct vhub_context;
struct vhub_vm;
struct control_batch;

struct control_conn {
        TAILQ_ENTRY(control_conn) link;
        struct control_server *srv;
        struct rpc_conn *rpc;        /* NULL once closed */
        uint64_t id;                 /* owner id of the VMs it creates */
        uid_t uid;
        pid_t pid;
        struct vhub_cred cred;       /* uid, gid, groups: what its VMs act with */
        unsigned refs;               /* 1 for the connection + 1 per pending call */
        unsigned pending;            /* calls waiting on the model */
        bool eof;                    /* the peer shut down its sending side */
        bool sub_all;                /* events of every VM of its uid */
        char **sub_vms;              /* events of these VMs (of sub_uid) */
        uid_t *sub_uids;
        size_t n_sub_vms;
};

TAILQ_HEAD(control_conn_list, control_conn);

struct control_server {
        struct vhub_context *ctx;
        int listen_fd;
        char *path;                  /* created by us; unlinked at free */
        struct event *ev_accept;
        /* Out of fds, accept() fails and the listening socket stays
         * readable: accepting pauses until a connection closes or the retry
         * timer fires.  The spare fd is given up for a moment to accept a
         * connection just to tell it why it is refused. */
        struct event *ev_accept_retry;
        bool accept_paused;
        bool out_of_fds;             /* logged once per episode */
        int spare_fd;
        struct event *ev_trim;       /* malloc_trim() after a spike, coalesced */
        struct control_conn_list conns;
        unsigned n_conns;
        uint64_t next_conn_id;
        struct control_server_options opts;
};

/* One request being handled (a batch element or a lone request). */
struct control_req {
        struct control_conn *conn;
        json_t *id;                  /* NULL: a notification, nothing is answered */
        json_t *params;
        struct rpc_fds *fds;
        struct control_batch *batch;
        unsigned batch_index;
};

struct control_call;
typedef json_t *(*control_result_fn)(struct control_call *cc);

/* A request waiting on the model: owns references to its connection. */
struct control_call {
        struct vhub_call call;
        struct control_conn *conn;
        json_t *id;
        struct control_batch *batch;
        unsigned batch_index;
        control_result_fn make_result; /* NULL: {} */
        void *data;                    /* for make_result */
        void (*free_data)(void *data);
        int reply_fds[RPC_MAX_FDS_PER_MESSAGE]; /* make_result may attach fds (owned, closed after) */
        unsigned n_reply_fds;
};

void control_conn_ref(struct control_conn *c);
void control_conn_unref(struct control_conn *c);

/* Answer a request: result (stolen) or error. */
void control_req_result(struct control_req *req, json_t *result);
void control_req_error(struct control_req *req, const struct vhub_error *err);
void control_req_result_fds(struct control_req *req, json_t *result, const int *fds, unsigned n);

/* Batches (control-batch.c).  control_batch_new() refuses (err) a batch
 * whose answers could not fit limit even as -32008s.  Every slot is
 * answered exactly once: control_batch_slot() takes the response (NULL for
 * a notification), control_batch_refuse() answers -32008 without running
 * the element; index n (past the end) drops the hold kept while the
 * elements are run.  The last one sends the array and frees the batch. */
struct control_batch *control_batch_new(struct control_conn *c, json_t *elements, size_t limit,
                                        struct vhub_error *err);
void control_batch_free(struct control_batch *b);
void control_batch_slot(struct control_batch *b, unsigned index, json_t *response);
void control_batch_refuse(struct control_batch *b, unsigned index, json_t *element);
/* The answers reached the output bound: the rest are refused. */
bool control_batch_over(const struct control_batch *b);

/* Memory went up by `bytes` for a moment: hand it back to the system soon. */
void control_server_note_spike(struct control_server *s, size_t bytes);

/* For calls into the model: allocate, then pass &cc->call; done answers. */
struct control_call *control_call_new(struct control_req *req, control_result_fn make_result);

/* The method table (control-methods.c). */
void control_dispatch(struct control_req *req, const char *method, size_t method_len);
/* The methods of control-methods-proto.c: true if it was one of them (answered). */
bool control_proto_dispatch(struct control_req *req, const char *method, size_t method_len);

/* One method: its name and handler (an error filled in err when < 0). */
struct control_method {
        const char *name;
        int (*handler)(struct control_req *req, struct vhub_error *err);
};
/* Crypto, GPU, IOTLB and postcopy (control-methods-real.c); ends with a NULL name. */
extern const struct control_method control_methods_real[];

/* May the requesting uid make the daemon hold n more fds (the fd budget,
 * vhub-fd-budget.h)?  0, or -32008 in err. */
int control_req_check_fds(struct control_req *req, unsigned n, struct vhub_error *err);

/* Resolve the VM a request names (vm + optional uid), honouring isolation. */
int control_req_vm(struct control_req *req, struct vhub_vm **ret, struct vhub_error *err);
