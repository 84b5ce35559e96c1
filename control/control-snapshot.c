/* SPDX-License-Identifier: MIT */
/*
 * The control face across a restart (docs/restart.md): each connection's
 * record in the daemon's snapshot, and the connections taken back by the
 * next process.  A connection is its socket (claimed from its fd-store
 * group c<id>: its peer's credentials come with it, SO_PEERCRED being the
 * socket's), its id (which owns VMs), its subscriptions, the ids of the
 * requests it has in flight, and the bytes it sent that were read and not
 * yet handled.  Its output is written out before a planned restart exits
 * (a connection that does not read loses what was queued, as it would at
 * the output bound); fds received with input not yet handled are not kept:
 * a carried request that declares fds is answered -32011.  A batch not
 * answered yet (running in slices, or waiting for some of its calls) is
 * recorded as the ids of its requests: the next process answers it with
 * one array of -32011s.  A planned restart waits for both (control_server_busy()).
 */
#include <errno.h>
#include <event2/event.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "control-internal.h"
#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-fd-claim.h"
#include "vhub-log.h"
#include "vhub-snapshot.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

enum { S_NEXT_CONN_ID = 1, S_CONN };
enum {
        C_ID = 1, C_SOCK, C_SUB_ALL, C_SUB, C_PENDING, C_INPUT, C_EOF,
        /* added within format 1 (an older reader skips them) */
        C_BATCH,                /* bytes: a batch's ids (control_batch_ids()) */
        C_OUTPUT,               /* bytes: output not written at a planned restart */
        C_MID_LINE,             /* bool: a partial line is left out of C_INPUT */
        _C_TAG_NEXT
};

enum { SUB_UID = 1, SUB_VM };

/* A partial line longer than this is in a record only at a planned
 * restart: a record is rewritten after each read, and a client feeding a
 * long line a few bytes at a time would otherwise have the whole line so
 * far copied at each (quadratic work on the loop everyone shares).  A
 * request of ordinary size fits; a crash-restart closes a connection whose
 * last record says it was further into a line (the front door's "at rest"
 * rule, docs/restart.md). */
#define CONN_PARTIAL_RECORDED   4096u

void control_server_pause(struct control_server *s) {
        struct control_conn *c;

        s->paused = true;
        if (s->ev_accept)
                event_del(s->ev_accept);
        if (s->ev_accept_retry)
                evtimer_del(s->ev_accept_retry);
        TAILQ_FOREACH(c, &s->conns, link)
                if (c->rpc)
                        rpc_conn_stop_reading(c->rpc);
}

bool control_server_busy(const struct control_server *s) {
        const struct control_conn *c;

        /* a batch running in slices is requests in flight too: it
         * finishes (its answer is written before the process exits) */
        TAILQ_FOREACH(c, &s->conns, link)
                if (c->pending > 0 || c->run)
                        return true;
        return false;
}

void control_server_carry_output(struct control_server *s) {
        s->carry_output = true;
}

bool control_server_flush_now(struct control_server *s) {
        struct control_conn *c;
        bool all = true;

        TAILQ_FOREACH(c, &s->conns, link)
                if (c->rpc && rpc_conn_flush_now(c->rpc) == 1)
                        all = false;
        return all;
}

/* The output c has not written, into the snapshot (a planned restart's
 * last one; its size counts in the connection's record, control-carry.c);
 * said in the log once (quiet: the same bytes again, inline). */
static void conn_serialize_output(const struct control_conn *c, struct vhub_snap_writer *w, bool quiet) {
        char *out = NULL;
        ssize_t n = rpc_conn_unsent_output(c->rpc, &out);

        if (n > 0) {
                vhub_snap_put_bytes(w, C_OUTPUT, out, (size_t)n);
                if (!quiet)
                        vhub_log_full(LOG_INFO, NULL, NULL, NULL,
                                      "control connection %llu: %zd bytes of output it has not read yet are "
                                      "carried across the restart", (unsigned long long)c->id, n);
        } else if (n != 0 && !quiet) {
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "control connection %llu: its output not yet written is lost with the restart (%s)",
                              (unsigned long long)c->id, n == -EBUSY ? "it carries fds" : strerror((int)-n));
        }
        free(out);
}

/* The input c's record holds (all of it at a planned restart's last
 * commit; else without a partial line over CONN_PARTIAL_RECORDED); notes
 * what it left out in c->snap_mid_line, and its length in c->snap_input. */
static size_t conn_recorded_input(struct control_conn *c, const char **ret) {
        size_t n = rpc_conn_unhandled_input(c->rpc, ret), partial = rpc_conn_partial_input(c->rpc);

        c->snap_mid_line = !c->srv->carry_output && partial > CONN_PARTIAL_RECORDED;
        if (c->snap_mid_line)
                n -= partial;
        c->snap_input = n;
        return n;
}

bool control_conn_input_recorded(const struct control_conn *c) {
        const char *in;
        size_t partial;

        if (!c->snap_mid_line || !c->rpc)
                return false;
        partial = rpc_conn_partial_input(c->rpc);
        return partial > CONN_PARTIAL_RECORDED && rpc_conn_unhandled_input(c->rpc, &in) - partial == c->snap_input;
}

static void conn_serialize(struct control_conn *c, struct vhub_snap_writer *w) {
        const struct control_batch *b;
        const struct control_call *cc;
        const char *in;
        size_t n;

        vhub_snap_put_u64(w, C_ID, c->id);
        vhub_snap_put_fd(w, C_SOCK, vhub_context_fdstore(c->srv->ctx), c->fd_group, rpc_conn_fd(c->rpc));
        vhub_snap_put_bool(w, C_SUB_ALL, c->sub_all);
        for (size_t i = 0; i < c->n_sub_vms; i++) {
                vhub_snap_begin(w, C_SUB);
                vhub_snap_put_u32(w, SUB_UID, (uint32_t)c->sub_uids[i]);
                vhub_snap_put_str(w, SUB_VM, c->sub_vms[i]);
                vhub_snap_end(w);
        }
        TAILQ_FOREACH(cc, &c->calls, link) {
                char *id;

                if (!cc->id || cc->batch)
                        continue;       /* a notification: nothing to answer; a batch's: below */
                id = json_dumps(cc->id, JSON_COMPACT | JSON_ENCODE_ANY);
                if (!id) {
                        w->error = w->error ? w->error : -ENOMEM;
                        continue;
                }
                vhub_snap_put_str(w, C_PENDING, id);
                free(id);
        }
        for (b = control_batch_next(c, NULL); b; b = control_batch_next(c, b)) {
                const char *ids = control_batch_ids(b, &n);

                if (n > 0)
                        vhub_snap_put_bytes(w, C_BATCH, ids, n);
        }
        n = conn_recorded_input(c, &in);
        if (n > 0)
                vhub_snap_put_bytes(w, C_INPUT, in, n);
        if (c->snap_mid_line)
                vhub_snap_put_bool(w, C_MID_LINE, true);
        vhub_snap_put_bool(w, C_EOF, c->eof);
}

/* What c's record holds at least: its input and its batches' ids. */
static size_t conn_least_bytes(struct control_conn *c) {
        const struct control_batch *b;
        const char *in;
        size_t n = conn_recorded_input(c, &in), ids;

        for (b = control_batch_next(c, NULL); b; b = control_batch_next(c, b)) {
                (void)control_batch_ids(b, &ids);
                n += ids;
        }
        return n;
}

/* c's record written (from mark on) or taken back out, as the budget says
 * (why: refused before it was written, n its least size). */
static void conn_carry(struct control_conn *c, struct control_carry *b, struct vhub_snap_writer *w,
                       size_t mark, unsigned depth, const char *why, size_t n) {
        if (!why && w->error == -E2BIG) {
                why = "over what a restart carries of all connections";
        } else if (!why && w->error) {
                return;         /* the document fails anyway: logged by its writer */
        } else if (!why && b) {
                n = w->len - mark;
                why = control_carry_admit(b, c->uid, n);
        }
        if (why) {
                /* the writer's state as it was before the record (the
                 * buffer keeps what it grew to, for the next commit) */
                w->len = mark;
                w->depth = depth;
                w->error = 0;
                if (!c->uncarried)
                        vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                                      "control connection %llu (uid %u pid %d): its state (%zu bytes or more) is %s: "
                                      "a restart now would close it", (unsigned long long)c->id, (unsigned)c->uid,
                                      (int)c->pid, n, why);
        } else if (c->uncarried) {
                vhub_log_full(LOG_INFO, NULL, NULL, NULL,
                              "control connection %llu (uid %u pid %d): its state fits what a restart carries again",
                              (unsigned long long)c->id, (unsigned)c->uid, (int)c->pid);
        }
        c->uncarried = why;
        c->carry_bytes = n;
}

int control_server_serialize(const struct control_server *s, struct vhub_snap_writer *w) {
        vhub_snap_put_u64(w, S_NEXT_CONN_ID, s->next_conn_id);
        return w->error;
}

int control_server_serialize_inline(struct control_server *s, struct vhub_snap_writer *w) {
        struct control_conn *c;

        vhub_snap_put_u64(w, S_NEXT_CONN_ID, s->next_conn_id);
        /* what conn_commit() wrote into each file a moment ago (the budget
         * admitted it there: the sum fits the document) */
        TAILQ_FOREACH(c, &s->conns, link) {
                if (!c->rpc || c->uncarried)
                        continue;
                vhub_snap_begin(w, S_CONN);
                conn_serialize(c, w);
                if (s->carry_output)
                        conn_serialize_output(c, w, true);
                vhub_snap_end(w);
        }
        return w->error;
}

bool control_server_unfiled(const struct control_server *s) {
        return s->unfiled;
}

void control_server_filed(struct control_server *s) {
        s->unfiled = false;
}

void control_server_records_inline(struct control_server *s) {
        struct control_conn *c;
        char name[VHUB_FD_GROUP_MAX];

        s->records_inline = true;
        TAILQ_FOREACH(c, &s->conns, link) {
                if (c->snap_dirty) {
                        TAILQ_REMOVE(&s->snap_dirty, c, snap_link);
                        c->snap_dirty = false;
                }
                vhub_commit_file_gone(s->ctx, &c->snap, vhub_fd_group(name, VHUB_SNAP_GROUP_CONN, c->id));
        }
}

void control_conn_changed(struct control_conn *c) {
        struct control_server *s = c->srv;

        if (s->records_inline || s->unfiled)
                vhub_changed(s->ctx, NULL);     /* its record is in the daemon's snapshot */
        if (s->records_inline)
                return;
        if (c->snap_dirty || !c->rpc || !vhub_commit_enabled(s->ctx))
                return;
        c->snap_dirty = true;
        TAILQ_INSERT_TAIL(&s->snap_dirty, c, snap_link);
        vhub_changed_face(s->ctx);
}

void control_conn_snapshot_gone(struct control_conn *c) {
        char name[VHUB_FD_GROUP_MAX];

        if (c->snap_dirty) {
                TAILQ_REMOVE(&c->srv->snap_dirty, c, snap_link);
                c->snap_dirty = false;
        }
        control_carry_release(c->srv->carry, c->uid, c->carry_charged);
        c->carry_charged = 0;
        vhub_commit_file_gone(c->srv->ctx, &c->snap, vhub_fd_group(name, VHUB_SNAP_GROUP_CONN, c->id));
        if (c->srv->records_inline)
                vhub_changed(c->srv->ctx, NULL);
}

/* c's record, budgeted (control-carry.c) as it is written: what it was
 * charged goes back first; a record over the budget is not written and its
 * file goes (a restart does not carry the connection: the next process
 * leaves its socket's group unclaimed; a planned restart closes it first,
 * control_server_close_uncarried()). */
static void conn_commit(struct control_conn *c) {
        struct control_server *s = c->srv;
        struct vhub_snap_writer *w = vhub_commit_writer(s->ctx);
        size_t least = conn_least_bytes(c);
        char name[VHUB_FD_GROUP_MAX];
        const char *why;
        int r;

        vhub_fd_group(name, VHUB_SNAP_GROUP_CONN, c->id);
        c->snap_serial++;
        control_carry_release(s->carry, c->uid, c->carry_charged);
        c->carry_charged = 0;
        /* a record sure not to fit is not written (a uid's hoard would
         * otherwise be copied at every commit) */
        why = s->carry ? control_carry_refuses(s->carry, c->uid, least) : NULL;
        if (!why) {
                conn_serialize(c, w);
                if (s->carry_output)
                        conn_serialize_output(c, w, false);
        }
        conn_carry(c, s->carry, w, 0, 0, why, least);
        if (c->uncarried) {
                /* as good as stored: a restart closes it, nothing waits */
                vhub_commit_file_gone(s->ctx, &c->snap, name);
                c->snap_stored = c->snap_serial;
                return;
        }
        if (s->carry && !w->error)
                c->carry_charged = w->len;      /* what control_carry_admit() counted */
        r = vhub_commit_file(s->ctx, &c->snap, name, false);
        if (r >= 0)
                c->snap_stored = c->snap_serial;
        else
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "control connection %llu: its restart record was not written: %s",
                              (unsigned long long)c->id, strerror(-r));
}

int control_conn_record(struct control_conn *c, uint64_t since) {
        uint64_t tried = c->snap_serial;

        if (c->snap_stored > since)
                return 0;
        /* with what is dirty elsewhere, in the order a commit keeps */
        control_conn_changed(c);
        vhub_commit_now(c->srv->ctx);
        if (c->snap_serial == tried)
                return 0;       /* nothing writes its record (no fd store, inline) */
        return c->snap_stored > since ? 0 : -EIO;
}

void control_server_commit(struct control_server *s, bool all) {
        struct control_conn *c;

        if (s->records_inline)
                return;         /* the daemon's snapshot holds them */
        if (all)
                TAILQ_FOREACH(c, &s->conns, link)
                        control_conn_changed(c);
        while ((c = TAILQ_FIRST(&s->snap_dirty))) {
                TAILQ_REMOVE(&s->snap_dirty, c, snap_link);
                c->snap_dirty = false;
                if (c->rpc)
                        conn_commit(c);
        }
}

void control_server_close_uncarried(struct control_server *s) {
        struct control_conn *c;

        TAILQ_FOREACH(c, &s->conns, link) {
                json_t *data;
                int fd;

                if (!c->rpc || !c->uncarried || rpc_conn_is_closing(c->rpc))
                        continue;
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "control connection %llu (uid %u pid %d) closed before the restart: its state "
                              "(%zu bytes or more) is %s", (unsigned long long)c->id, (unsigned)c->uid, (int)c->pid,
                              c->carry_bytes, c->uncarried);
                data = json_pack("{s:s}", "detail", c->uncarried);
                (void)rpc_conn_send_error(c->rpc, NULL, VHUB_ERR_LIMIT, vhub_error_message(VHUB_ERR_LIMIT), data);
                json_decref(data);
                (void)rpc_conn_flush_now(c->rpc);
                /* the manager's copy of the socket is the same socket: its
                 * client sees the end now, not when the next process drops
                 * the group it does not claim */
                fd = rpc_conn_fd(c->rpc);
                (void)shutdown(fd, SHUT_RDWR);
                (void)vhub_fdstore_group_remove(vhub_context_fdstore(s->ctx), c->fd_group, fd);
        }
}

/* ---- restore ---- */

static void send_restarted(struct control_conn *c, uint64_t restarts, uint64_t downtime_ms) {
        char timestamp[VHUB_RFC3339_LEN];
        json_t *msg;

        vhub_format_rfc3339(vhub_realtime_usec(), timestamp);
        msg = json_pack("{s:s, s:s, s:{s:s, s:s, s:I, s:I}}", "jsonrpc", "2.0", "method", "event", "params",
                        "event", vhub_contract_event_name(VHUB_EV_DAEMON_RESTARTED), "timestamp", timestamp, "restarts", (json_int_t)restarts,
                        "downtime_ms", (json_int_t)downtime_ms);
        if (msg)
                (void)rpc_conn_send(c->rpc, msg, NULL, 0);
        json_decref(msg);
}

/* The -32011 response to id (not stolen).  A batch's are shorter than the
 * -32008 each element could have got (control-batch.c), which the batch was
 * admitted for: its answer fits in the output bound. */
static json_t *restarted_error(json_t *id, bool batch) {
        return json_pack("{s:s, s:O, s:{s:i, s:s, s:{s:s}}}", "jsonrpc", "2.0", "id", id, "error", "code",
                         VHUB_ERR_RESTARTED, "message", vhub_error_message(VHUB_ERR_RESTARTED), "data",
                         "detail", batch ? "it may or may not have taken effect"
                                         : "the daemon restarted while this request was in flight; "
                                           "it may or may not have taken effect");
}

/* -32011 to each of ids (an array; stolen): alone, or as a batch's answer
 * (nothing when none has an id: a batch of notifications). */
static void send_restarted_errors(struct control_conn *c, json_t *ids, bool batch) {
        json_t *answer = batch ? json_array() : NULL;
        json_t *id, *e;
        size_t i;

        json_array_foreach(ids, i, id) {
                e = restarted_error(id, batch);
                if (!batch) {
                        if (e)
                                (void)rpc_conn_send(c->rpc, e, NULL, 0);
                } else if (answer) {
                        json_array_append(answer, e);
                }
                json_decref(e);
        }
        if (answer && json_array_size(answer) > 0)
                (void)rpc_conn_send(c->rpc, answer, NULL, 0);
        json_decref(answer);
        json_decref(ids);
}

/* The ids written one a line (C_PENDING: one; C_BATCH: a batch's). */
static void send_restarted_text(struct control_conn *c, const char *text, size_t n, bool batch) {
        json_t *ids = json_array();
        const char *end = text + n, *nl;

        for (; ids && text < end; text = nl + 1) {
                nl = memchr(text, '\n', (size_t)(end - text));
                if (!nl)
                        nl = end;
                json_array_append_new(ids, json_loadb(text, (size_t)(nl - text), JSON_DECODE_ANY, NULL));
        }
        if (ids)
                send_restarted_errors(c, ids, batch);
}

void control_conn_fds_lost(struct rpc_conn *rpc, json_t *msg, void *userdata) {
        struct control_conn *c = userdata;
        json_t *ids = json_array(), *id, *e;
        size_t i;

        vhub_log_full(LOG_INFO, NULL, NULL, NULL,
                      "control connection %llu: a request read before the restart declares fds, which were not "
                      "carried: answered -32011", (unsigned long long)c->id);
        if (json_is_object(msg) && (id = json_object_get(msg, "id")) && control_id_valid(id))
                json_array_append(ids, id);
        json_array_foreach(json_is_array(msg) ? msg : NULL, i, e)
                if ((id = json_is_object(e) ? json_object_get(e, "id") : NULL) && control_id_valid(id))
                        json_array_append(ids, id);
        if (ids)
                send_restarted_errors(c, ids, json_is_array(msg));
        json_decref(msg);
        control_conn_changed(c);        /* the line is out of its input */
}

static int read_sub(struct control_conn *c, const struct vhub_snap_rec *rec) {
        char name[VHUB_NAME_MAX + 1] = "";
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        uint32_t uid = 0;
        char **names;
        uid_t *uids;
        int r = vhub_snap_enter(rec, &it);

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                if (x.tag == SUB_UID)
                        r = vhub_snap_get_u32(&x, &uid);
                else if (x.tag == SUB_VM)
                        r = vhub_snap_get_str(&x, name, sizeof(name));
                else
                        r = vhub_snap_unknown(&x);
        }
        if (r < 0 || !name[0])
                return r < 0 ? r : -EBADMSG;
        names = reallocarray(c->sub_vms, c->n_sub_vms + 1, sizeof(*names));
        if (!names)
                return -ENOMEM;
        c->sub_vms = names;
        uids = reallocarray(c->sub_uids, c->n_sub_vms + 1, sizeof(*uids));
        if (!uids)
                return -ENOMEM;
        c->sub_uids = uids;
        if (!(names[c->n_sub_vms] = strdup(name)))
                return -ENOMEM;
        uids[c->n_sub_vms++] = (uid_t)uid;
        return 0;
}

/* A connection's record: the records of start (a S_CONN nest of the
 * daemon's snapshot in format 1, a "k<id>" file's document since); the
 * file (snap: fd -1 in format 1) is the connection's once it is carried,
 * else out of the store. */
static int conn_restore(struct control_server *s, struct vhub_fdstore_restore *r, const struct vhub_snap_iter *start,
                        struct vhub_snap_file *snap, const char *snap_name, uint64_t restarts,
                        uint64_t downtime_ms) {
        struct vhub_fd_key key = { 0 };
        struct vhub_fd_claim claim;
        struct vhub_snap_iter it = *start;
        struct vhub_snap_rec x;
        struct control_conn *c;
        const void *input = NULL, *output = NULL;
        size_t n_input = 0, n_output = 0;
        bool mid_line = false;
        uint64_t id = 0;
        int k = 0, fd;

        while (k >= 0 && (k = vhub_snap_next(&it, &x)) > 0) {
                if (x.tag == C_ID)
                        k = vhub_snap_get_u64(&x, &id);
                else if (x.tag == C_SOCK)
                        k = vhub_snap_get_key(&x, &key);
                else if (x.tag == C_INPUT)
                        k = vhub_snap_get_bytes(&x, &input, &n_input);
                else if (x.tag == C_OUTPUT)
                        k = vhub_snap_get_bytes(&x, &output, &n_output);
                else if (x.tag == C_MID_LINE)
                        k = vhub_snap_get_bool(&x, &mid_line);
                else if (x.tag >= _C_TAG_NEXT)
                        k = vhub_snap_unknown(&x);
        }
        if (k < 0 || id == 0)
                return k < 0 ? k : -EBADMSG;
        if (s->next_conn_id < id)
                s->next_conn_id = id;
        if (mid_line) {
                /* the rest of its line cannot be told from its start: its
                 * socket is left unclaimed (closed with the store's leftovers) */
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "control connection %llu did not survive the restart: it was more than %u bytes into "
                              "a line, which only a planned restart carries", (unsigned long long)id,
                              CONN_PARTIAL_RECORDED);
                return 0;
        }
        c = control_conn_alloc(s, id);
        if (!c)
                return -ENOMEM;
        vhub_fd_claim_open(r, vhub_context_fdstore(s->ctx), c->fd_group, &claim);
        fd = vhub_fd_claim(&claim, &key);
        vhub_fd_claim_close(&claim);
        if (fd < 0) {
                vhub_log_full(LOG_INFO, NULL, NULL, NULL,
                              "control connection %llu did not survive the restart (its socket was not passed back)",
                              (unsigned long long)id);
                free(c);
                return 0;
        }
        /* its record goes on in the same file (stored already) */
        c->snap = *snap;
        *snap = (struct vhub_snap_file){ .fd = -1, .newest = -1 };
        k = vhub_cred_from_socket(fd, &c->cred);
        if (k < 0) {
                (void)vhub_fdstore_group_remove(vhub_context_fdstore(s->ctx), c->fd_group, fd);
                vhu_safe_close(fd);
                vhub_commit_file_gone(s->ctx, &c->snap, snap_name);
                free(c);
                return 0;
        }
        k = rpc_conn_new(vhub_context_base(s->ctx), fd, &s->opts.limits, &control_conn_ops, c, &c->rpc);
        if (k < 0) {
                /* rpc_conn_new closed it: out of the group too */
                (void)vhub_fdstore_group_remove(vhub_context_fdstore(s->ctx), c->fd_group, fd);
                vhub_cred_done(&c->cred);
                vhub_commit_file_gone(s->ctx, &c->snap, snap_name);
                free(c);
                return k;
        }
        control_conn_join(c);

        /* what the earlier process had not written goes out first (the rest
         * of a line partly written among it), then daemon.restarted, then
         * what was in flight */
        if (n_output > 0 && rpc_conn_restore_output(c->rpc, output, n_output) < 0)
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "control connection %llu: the %zu bytes of output carried across the restart are lost",
                              (unsigned long long)id, n_output);
        send_restarted(c, restarts, downtime_ms);
        it = *start;
        while (k >= 0 && (k = vhub_snap_next(&it, &x)) > 0) {
                /* an id is at most CONTROL_MAX_ID_BYTES, each written as
                 * \uXXXX at worst, in quotes */
                char idtext[CONTROL_MAX_ID_BYTES * 6 + 3];
                const void *text;
                size_t n;

                if (x.tag == C_SUB_ALL)
                        k = vhub_snap_get_bool(&x, &c->sub_all);
                else if (x.tag == C_SUB)
                        k = read_sub(c, &x);
                else if (x.tag == C_EOF)
                        k = vhub_snap_get_bool(&x, &c->eof);
                else if (x.tag == C_PENDING && vhub_snap_get_str(&x, idtext, sizeof(idtext)) >= 0)
                        send_restarted_text(c, idtext, strlen(idtext), false);
                else if (x.tag == C_BATCH && vhub_snap_get_bytes(&x, &text, &n) >= 0)
                        send_restarted_text(c, text, n, true);
        }
        if (n_input > 0 && rpc_conn_restore_input(c->rpc, input, n_input) < 0)
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "control connection %llu: the %zu bytes it had sent and were not handled are lost",
                              (unsigned long long)id, n_input);
        else if (n_input > 0)
                vhub_log_full(LOG_INFO, NULL, NULL, NULL,
                              "control connection %llu: the %zu bytes it had sent and were not handled are carried",
                              (unsigned long long)id, n_input);
        if (c->eof)
                rpc_conn_close_after_flush(c->rpc, "peer closed");
        /* carried from the daemon's snapshot (format 1, or a planned stop's):
         * its own file is written before a daemon's snapshot that no longer
         * holds it (vhub_restart_commit_daemon()) */
        if (c->snap.fd < 0) {
                s->unfiled = true;
                control_conn_changed(c);
        }
        vhub_context_owner_restored(s->ctx, &c->owner);
        vhub_log_full(LOG_INFO, NULL, NULL, NULL, "control connection %llu (uid %u pid %d) carried across the restart",
                      (unsigned long long)c->id, (unsigned)c->uid, (int)c->pid);
        return k < 0 ? k : 0;
}

/* The C_ID of a connection's record (0: none). */
static uint64_t record_id(const struct vhub_snap_iter *start) {
        struct vhub_snap_iter it = *start;
        struct vhub_snap_rec x;
        uint64_t id = 0;

        while (vhub_snap_next(&it, &x) > 0)
                if (x.tag == C_ID && vhub_snap_get_u64(&x, &id) >= 0)
                        break;
        return id;
}

static int cmp_id(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

        return x < y ? -1 : x > y;
}

int control_server_restore(struct control_server *s, struct vhub_fdstore_restore *r, struct vhub_snap_iter *it,
                           const uint64_t *filed, size_t n_filed, uint64_t restarts, uint64_t downtime_ms) {
        struct vhub_snap_rec x;
        int k;

        while ((k = vhub_snap_next(it, &x)) > 0) {
                if (x.tag == S_NEXT_CONN_ID) {
                        uint64_t v = 0;

                        k = vhub_snap_get_u64(&x, &v);
                        if (k >= 0 && s->next_conn_id < v)
                                s->next_conn_id = v;
                } else if (x.tag == S_CONN) {
                        /* format 1: every connection in the daemon's snapshot */
                        struct vhub_snap_file none = { .fd = -1, .newest = -1 };
                        struct vhub_snap_iter cit;
                        uint64_t id;

                        k = vhub_snap_enter(&x, &cit);
                        if (k < 0)
                                break;
                        id = record_id(&cit);
                        if (n_filed > 0 && bsearch(&id, filed, n_filed, sizeof(*filed), cmp_id)) {
                                /* its file is as new as this record or newer
                                 * (docs/restart.md, "Versions") */
                                vhub_log_full(LOG_INFO, NULL, NULL, NULL,
                                              "control connection %llu: its own record file is read, not its "
                                              "copy in the daemon's snapshot", (unsigned long long)id);
                                continue;
                        }
                        k = conn_restore(s, r, &cit, &none, NULL, restarts, downtime_ms);
                } else {
                        k = vhub_snap_unknown(&x);
                }
                if (k < 0)
                        return k;
        }
        return k;
}

int control_server_restore_conn(struct control_server *s, struct vhub_fdstore_restore *r, const char *name,
                                const struct vhub_snap_doc *doc, int fd, uint64_t restarts, uint64_t downtime_ms) {
        struct vhub_snap_file snap = { .fd = -1, .newest = -1 };
        struct vhub_snap_iter it;
        const char *why = NULL;
        int k;

        k = vhub_snap_file_adopt(fd, &snap, &why);
        if (k < 0) {
                /* it was read a moment ago: a new file is made at the next commit */
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL, "snapshot %s cannot be written again (%s)", name,
                              why ? why : strerror(-k));
                (void)vhub_fdstore_remove(vhub_context_fdstore(s->ctx), name);
        }
        vhub_snap_doc_iter(doc, &it);
        k = conn_restore(s, r, &it, &snap, name, restarts, downtime_ms);
        /* not carried: its record goes */
        vhub_commit_file_gone(s->ctx, &snap, name);
        return k;
}
