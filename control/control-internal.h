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
#include "vhub-event.h"
#include "vhub-fd-track.h"
#include "vhub-log.h"
#include "vhub-owner.h"
#include "vhub-snapshot.h"

/* A string id is kept by its call until the call is answered (a call may
 * wait on a back-end): longer ones are refused, not kept (-32600). */
#define CONTROL_MAX_ID_BYTES 256

struct event;
struct vhub_context;
struct vhub_vm;
struct control_batch;
struct batch_run;
struct vhub_fd_usage;

struct control_conn {
        TAILQ_ENTRY(control_conn) link;
        struct control_server *srv;
        struct rpc_conn *rpc;        /* NULL once closed */
        uint64_t id;
        char fd_group[VHUB_FD_GROUP_MAX]; /* "c<id>": its socket in the fd store */
        struct vhub_owner owner;     /* of the VMs it creates or attaches (vhub-owner.h) */
        uid_t uid;
        bool owns_entries;           /* its store entries count for uid (control_conn_own_entries) */
        pid_t pid;
        struct vhub_cred cred;       /* uid, gid, groups: what its VMs act with */
        unsigned refs;               /* 1 for the connection + 1 per pending call */
        unsigned pending;            /* calls waiting on the model */
        bool eof;                    /* the peer shut down its sending side */
        struct batch_run *run;       /* a batch being run in slices (input paused meanwhile) */
        const char *uncarried;       /* why the last snapshot left it out (control-carry.c),
                                      * NULL while it is carried */
        size_t carry_bytes;          /* its record's size in that snapshot */
        bool sub_all;                /* events of every VM of its uid (root: of every uid) */
        char **sub_vms;              /* events of these VMs (of sub_uid) */
        uid_t *sub_uids;
        size_t n_sub_vms;
        TAILQ_HEAD(control_call_list, control_call) calls; /* pending: their ids are in the
                                                            * restart snapshot (-32011) */
        TAILQ_HEAD(control_batch_list, control_batch) batches; /* not answered yet: the ids of
                                                                * their requests are in it
                                                                * instead (one -32011 array) */
        unsigned fds_counted;        /* its fds as last counted (control-fds.c) */
        bool fds_counting;           /* ... into the fd ledger */
        bool fds_marked;             /* ... to count again: in srv->fds_marked */
        TAILQ_ENTRY(control_conn) fds_link;
        struct vhub_snap_file snap;  /* its restart record "k<id>" (control-snapshot.c) */
        size_t carry_charged;        /* ... as srv->carry counts it */
        bool snap_dirty;             /* ... out of date: in srv->snap_dirty */
        uint64_t snap_serial;        /* ... writes of it tried */
        uint64_t snap_stored;        /* ... the last of them that was stored */
        bool snap_mid_line;          /* ... without its partial line, over the bound */
        size_t snap_input;           /* ... the input bytes it holds */
        TAILQ_ENTRY(control_conn) snap_link;
};

TAILQ_HEAD(control_conn_list, control_conn);

struct control_server {
        struct vhub_context *ctx;
        struct vhub_event_sink sink; /* the model's events, for the connections */
        bool sink_added;
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
        TAILQ_HEAD(, control_conn) snap_dirty; /* records to write (control_conn_changed()) */
        struct control_carry *carry; /* what their records carry (NULL without memory: no bound) */
        /* connections whose fds the fd ledger counts again (control-fds.c) */
        TAILQ_HEAD(, control_conn) fds_marked;
        struct vhub_log_ratelimit refusal_log; /* connections refused past a limit */
        uint64_t next_conn_id;
        struct control_server_options opts;
        json_t *discover;            /* rpc.discover's document, built on first use */
        bool paused;                 /* control_server_pause(): a planned restart accepts
                                      * and reads nothing more */
        bool carry_output;           /* a planned restart's last snapshot: output not
                                      * written goes into it (control-snapshot.c) */
        bool records_inline;         /* ... and the records are in the daemon's
                                      * snapshot, their files gone (a downgrade) */
        bool unfiled;                /* records carried inline may not have their
                                      * files in the manager's hands yet */
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
        TAILQ_ENTRY(control_call) link; /* in conn->calls */
        struct control_conn *conn;
        json_t *id;
        struct control_batch *batch;
        unsigned batch_index;
        uint64_t since;                /* conn->snap_serial when it was added */
        control_result_fn make_result; /* NULL: {} */
        void *data;                    /* for make_result */
        void (*free_data)(void *data);
        int *reply_fds;                /* make_result may attach fds: control_call_reply_fds() */
        unsigned n_reply_fds;          /* those attached (owned, closed after sending) */
};

/* What a connection's rpc_conn and its VMs call (control-server.c); a
 * restored connection uses them too (control-snapshot.c). */
extern const struct rpc_conn_ops control_conn_ops;
extern const struct vhub_owner_ops control_conn_owner_ops;

/* A connection of s with that id, not open yet (no rpc): its owner and
 * fd-store group named, one reference; NULL without memory. */
struct control_conn *control_conn_alloc(struct control_server *s, uint64_t id);
void control_conn_ref(struct control_conn *c);
void control_conn_unref(struct control_conn *c);
/* c's store entries (its group, its record) count for c->uid's share of
 * the fd store (own, once c->uid is known), or for nobody. */
void control_conn_own_entries(struct control_conn *c, bool own);
/* c, its rpc connection made (accepted, or taken back at a restart), joins
 * the server: its peer's uid and pid, its store entries, its socket in its
 * group, the list and the count. */
void control_conn_join(struct control_conn *c);
/* Whether a request's id may be kept and answered (a string of at most
 * CONTROL_MAX_ID_BYTES, a number or null). */
bool control_id_valid(json_t *id);
/* rpc_conn_ops.on_fds_lost (control-snapshot.c): a request an earlier
 * process had read but not handled, whose fds stayed behind, is answered
 * -32011 (each of a batch's requests, in one array). */
void control_conn_fds_lost(struct rpc_conn *rpc, json_t *msg, void *userdata);
/* The connections' fds for the budget (control-fds.c): a connection's
 * count may have changed (fds arrived, taken, queued for output, written
 * or dropped); it is closed (its count out); the sink's count_fds. */
void control_fds_init(struct control_server *s);
void control_conn_fds_changed(struct control_conn *c);
void control_conn_fds_gone(struct control_conn *c);
void control_server_count_fds(void *userdata, struct vhub_fd_usage *u);
/* c's restart record is out of date (a request read or answered, a batch
 * done...): written at the next commit, on its own (control-snapshot.c). */
void control_conn_changed(struct control_conn *c);
/* Whether c's last record holds its input as it is now (only a partial
 * line it leaves out grew since): no need to write it again. */
bool control_conn_input_recorded(const struct control_conn *c);
/* c is closed: its record out of the store. */
void control_conn_snapshot_gone(struct control_conn *c);
/* Whether a record of c written after its write number `since` is stored
 * (so: its calls, batches and subscriptions as they are now); if not, c's
 * record is written at once.  0 (also when no record is written: no fd
 * store, or the records are in the daemon's snapshot), or -EIO: that write
 * failed -- a crash would not answer or keep what it lacks, so the caller
 * refuses the request (CONTROL_UNRECORDED). */
int control_conn_record(struct control_conn *c, uint64_t since);
#define CONTROL_UNRECORDED "the daemon could not record this request for a restart"

/* What a restart may carry of the connections (control-carry.c): one
 * budget, kept as the connections' records are written (each its own
 * snapshot file).  control_carry_admit() counts a record of n bytes of a
 * connection of uid: NULL if it fits, else why not (a static sentence;
 * nothing counted); control_carry_release() gives back what a record of n
 * bytes was counted (b NULL: nothing). */
struct control_carry;
struct control_carry *control_carry_new(const struct control_server *s);
void control_carry_free(struct control_carry *b);
const char *control_carry_admit(struct control_carry *b, uid_t uid, size_t n);
/* The same question, nothing counted (a record that will be at least n
 * bytes: not worth writing if this refuses it). */
const char *control_carry_refuses(struct control_carry *b, uid_t uid, size_t n);
void control_carry_release(struct control_carry *b, uid_t uid, size_t n);
/* How many uids it keeps an entry for: those whose records use the pool
 * now (an entry goes when its uid's use drops to zero). */
size_t control_carry_uids(const struct control_carry *b);

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
/* A notification's slot: its response counts against the bound as if it
 * were sent (stolen, dropped). */
void control_batch_slot_unanswered(struct control_batch *b, unsigned index, json_t *response);
void control_batch_refuse(struct control_batch *b, unsigned index, json_t *element);
/* The ids of its requests (notifications have none), each compact JSON
 * followed by '\n': answered -32011 by the next process if the daemon
 * restarts before the batch is answered.  NULL with *ret_len 0: none. */
const char *control_batch_ids(const struct control_batch *b, size_t *ret_len);
/* c's batches not answered yet, in order: the first after b (NULL: the first). */
const struct control_batch *control_batch_next(const struct control_conn *c, const struct control_batch *b);
/* The answers reached the output bound: the rest are refused (notifications
 * among them are not run). */
bool control_batch_over(const struct control_batch *b);
/* b's ids are in its connection's stored record (written now if not).  0,
 * or -EIO: b is unrecorded from then on -- its elements not run yet are
 * each refused -32603 (notifications: not run). */
int control_batch_record(struct control_batch *b);
bool control_batch_unrecorded(const struct control_batch *b);

/* Memory went up by `bytes` for a moment: hand it back to the system soon. */
void control_server_note_spike(struct control_server *s, size_t bytes);

/* For calls into the model: allocate, then pass &cc->call; done answers. */
struct control_call *control_call_new(struct control_req *req, control_result_fn make_result);
/* Before the model sees cc: its id is in its connection's stored record (a
 * batch element's: its batch's ids, control_batch_record()).  0, or -EIO:
 * not stored, cc is refused (-32603) and dropped. */
int control_call_record(struct control_call *cc);
/* A call that never reached the model (its method failed first): freed, nothing answered. */
void control_call_drop(struct control_call *cc);
/* For make_result: room for n fds in the answer, allocated for this call only.  The
 * caller then moves fds into reply_fds[n_reply_fds++] (at most n).  0, or -ENOMEM. */
int control_call_reply_fds(struct control_call *cc, unsigned n);

/* ---- the method table (control-methods.c) ---- */

struct param;
struct method_call;

/* What dispatch does for a method before its function runs. */
enum {
        METHOD_VM = 1u << 0,          /* names a VM ("vm", "uid"): resolved under the caller's uid */
        METHOD_VM_OPTIONAL = 1u << 1, /* the same, but "vm" may be left out */
        METHOD_DEVICE = 1u << 2,      /* also names a device of that VM ("device"): resolved */
        METHOD_WAITS = 1u << 3,       /* waits on back-ends: takes a pending slot, answers at completion */
        METHOD_FDS_OUT = 1u << 4,     /* may answer with fds: refused inside a batch */
};

struct control_method {
        const char *name;
        int (*fn)(struct method_call *m, struct vhub_error *err);
        unsigned flags;
        const struct param *params;     /* its own members, after "vm", "uid", "device" */
        const struct param *result;     /* a PARAM_OBJECT describing the result; NULL: {} */
        control_result_fn make_result;  /* METHOD_WAITS: builds the result at completion; NULL: {} */
        const int *errors;              /* codes beyond those its flags imply; 0-terminated */
        const char *summary;            /* one line, for rpc.discover */
};

/* May the requesting uid make the daemon hold n more fds (the fd budget,
 * vhub-fd-budget.h)?  0, or -32008 in err. */
int control_req_check_fds(struct control_req *req, unsigned n, struct vhub_error *err);

/* Every method, in the contract's order. */
const struct control_method *control_methods(size_t *ret_n);
/* The lists of members a method reads, in order ("vm" and "uid", "device", its own),
 * NULL-terminated: room for 4. */
void control_method_param_lists(const struct control_method *m, const struct param *lists[4]);
void control_dispatch(struct control_req *req, const char *method, size_t method_len);

/* rpc.discover's OpenRPC document (control-discover.c), generated from the table. */
json_t *control_discover_build(void);
