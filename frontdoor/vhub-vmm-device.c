/* SPDX-License-Identifier: MIT */
/*
 * One front-door device: the VMM's connection and back-end channel on one
 * side, the model's device on the other (docs/front-door.md, "The face").
 *
 * Every request the transport validated goes to vhub_device_vmm_request()
 * with a call of its own; the model completes it in order (the transport
 * sends answers in request order anyway) with the payload to answer, or
 * with "close": no honest answer exists, the VMM reconnects.  Two requests
 * touch the face itself: SET_BACKEND_REQ_FD opens the VMM's channel (not
 * forwarded: the back-end keeps the daemon's), SET_PROTOCOL_FEATURES tells
 * the channel what the VMM negotiated.  Back-end requests the model relays
 * go out on that channel; each awaited answer comes back with its token.
 *
 * Its fds -- the socket's (its directories, the inode bind() made, the
 * listener), the VMM's connection and channel -- are named
 * vmm/<uid>/<vm>/<device>/... and kept in the fd-store group f<device id>
 * (docs/architecture.md, "fd names and groups"): tracked as each is taken
 * and untracked before it is closed, here and only here.
 *
 * Re-entrancy: a model call may end in the device being freed (its gone()),
 * from inside one of this object's callbacks; `busy` defers the free to the
 * callback's end.  Calls outlive their session: one answered after the VMM
 * left (or after a new one came) is dropped.
 */
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <unistd.h>

#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-fd-claim.h"
#include "vhub-fd-track.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-snapshot.h"
#include "vhub-vmm-channel.h"
#include "vhub-vmm-conn.h"
#include "vhub-vmm-device.h"
#include "vhub-vmm-listener.h"
#include "vhu-fd.h"

/* "vmm/<uid>/<vm>/<device>": VM and device names are at most 64 characters. */
#define FD_NAME_PREFIX_MAX 160

/* Back-end requests relayed to the VMM and awaiting its answer. */
#define RELAY_MAX 16
/*
 * How long a session stays at rest before a snapshot says so.  Leaving rest
 * costs a VM snapshot write at once (vd_leave_rest()), coming back another:
 * a VMM answered one tiny request at a time had two written per request
 * (tests/bench/bench_trickle.py vmm: ~2 per GET_FEATURES, other VMs'
 * device.list 7 times slower).  Once it waits this long, a VMM that keeps
 * sending costs neither while it does, one that pauses between requests
 * two per pause; a crash within it falls back, as when not at rest.
 */
#define REST_SETTLE_USEC 20000
/*
 * Requests in flight a crash may carry (docs/restart.md, "A crash with VMM
 * requests in flight"): QEMU's device stop has its rings' SET_VRING_ENABLEs
 * and the first GET_VRING_BASE in flight at once.
 */
#define CARRY_MAX 8

struct vmm_call;
TAILQ_HEAD(vmm_call_list, vmm_call);

struct vhub_vmm_device {
        TAILQ_ENTRY(vhub_vmm_device) link;
        struct vhub_vmm_device_list *list;
        struct vhub_context *ctx;
        struct event_base *base;
        struct vhub_device *dev;
        char fd_group[VHUB_FD_GROUP_MAX];      /* f<device id> */
        char fd_prefix[FD_NAME_PREFIX_MAX];    /* the names' start: kept, the device may go first */
        struct vhub_vmm_device_limits limits;
        struct vhub_vmm_socket *sock;
        struct vhub_vmm_listener *listener;
        struct vhub_vmm_conn *conn;
        struct vhub_vmm_channel *channel;
        uint64_t session;             /* one per VMM connection */
        struct vmm_call_list calls;   /* requests the model has not answered */
        unsigned n_calls;
        unsigned n_carried;           /* of them, those a snapshot may carry (each call's copy) */
        unsigned n_owed;              /* of them, those owing the VMM an answer */
        uint64_t call_seq;            /* the last call's */
        uint64_t saved_seq;           /* the last call the last snapshot written knew of */
        struct vhu_msg *redo[CARRY_MAX];    /* adopted: carried requests, handled again from the loop */
        unsigned n_redo;
        struct event *ev_redo;
        bool paused;                  /* reading paused: too many requests in the model */
        bool frozen;                  /* reading stopped for good: a planned restart */
        uint64_t relay_tokens[RELAY_MAX];   /* awaited on the channel, in order */
        unsigned relay_head, relay_count;
        uint32_t relay_tag;
        unsigned busy;                /* inside a callback: gone() defers the free */
        bool dead;                    /* the model let go of it */
        bool rest_saved;              /* the last snapshot serialized carries the session */
        uint64_t rest_serial;         /* that one's serial (vhub_device_vmm_snapshot_serial()) */
        bool rest_older;              /* the fd store's copy before it carries the session */
        bool leaving_rest;            /* a snapshot saying it is not at rest is being written */
        struct event *ev_rest;        /* pending: at rest for less than REST_SETTLE_USEC */
        /* the turn's commit (vhub-commit.h): answers held until it dropped
         * their requests, a request it carries to log */
        struct vhub_commit_wait turn_wait;
        unsigned n_held;              /* of the calls, those answered by the model, held */
        uint64_t logged_seq;          /* the last call logged carried in flight */
};

struct vmm_call {
        struct vhub_call call;        /* completed by the model */
        TAILQ_ENTRY(vmm_call) link;
        struct vhub_vmm_device *vd;   /* NULL once the device went */
        uint64_t session;
        uint64_t answer_id;           /* 0: the VMM waits for nothing */
        uint32_t request;
        uint64_t seq;
        struct vhu_msg *carried;      /* the request as read (no fds): a crash may carry it */
        bool held;                    /* answered by the model: goes out after the turn's commit */
};

#define vd_log(vd, level, request, ...)                                                          \
        vhub_log_full((level), vhub_device_vm_name((vd)->dev), vhub_device_name((vd)->dev), (request), \
                      __VA_ARGS__)
#define REQ(r) vhu_request_name(VHU_DIR_FRONTEND, (r))

static void vd_free(struct vhub_vmm_device *vd);

/* ---- its fds: names and the fd store ---- */

/* What the face holds for its device changed: the fd budget counts the
 * device's VM again (vd_fds_held()). */
static void vd_fds_changed(void *userdata) {
        const struct vhub_vmm_device *vd = userdata;

        if (!vd->dead && vd->dev)
                vhub_device_vmm_fds_changed(vd->dev);
}

static void vd_fd_note(const struct vhub_vmm_device *vd, bool kept, int fd, const char *what) {
        vhub_fd_note(vd->ctx, kept, vd->fd_group, fd, "%s/%s", vd->fd_prefix, what);
        vd_fds_changed((void *)vd);
}

static void socket_fd_track(int fd, const char *what, void *userdata) {
        vd_fd_note(userdata, true, fd, what);
}

static void socket_fd_untrack(int fd, const char *what, void *userdata) {
        vd_fd_note(userdata, false, fd, what);
}

/* Untracked, then freed or closed: each returns NULL for the member. */
static struct vhub_vmm_channel *vd_channel_free(struct vhub_vmm_device *vd) {
        if (vd->channel)
                vd_fd_note(vd, false, vhub_vmm_channel_fd(vd->channel), "chan");
        return vhub_vmm_channel_free(vd->channel);
}

static struct vhub_vmm_conn *vd_conn_free(struct vhub_vmm_device *vd) {
        if (vd->conn)
                vd_fd_note(vd, false, vhub_vmm_conn_fd(vd->conn), "conn");
        return vhub_vmm_conn_free(vd->conn);
}

static struct vhub_vmm_listener *vd_listener_free(struct vhub_vmm_device *vd) {
        if (vd->listener)
                vd_fd_note(vd, false, vhub_vmm_listener_fd(vd->listener), "listen");
        return vhub_vmm_listener_free(vd->listener);
}

/* An fd a restore claimed from the group (a member already) that the
 * object does not take: it leaves the group, then closes.  -1. */
static int claimed_close(struct vhub_vmm_device *vd, int fd, const char *what) {
        if (fd >= 0)
                vd_fd_note(vd, false, fd, what);
        return vhu_safe_close(fd);
}

/* Such an fd a constructor that failed closed: its number leaves the group
 * (a removal makes no system call, and nothing was opened since). */
static void claimed_gone(struct vhub_vmm_device *vd, int fd, const char *what) {
        vd_fd_note(vd, false, fd, what);
}

static struct vhub_vmm_socket *vd_socket_remove(struct vhub_vmm_device *vd) {
        struct vhub_vmm_socket *sock = vd->sock;

        if (!sock)
                return NULL;
        vd->sock = NULL;
        vhub_vmm_socket_foreach_fd(sock, socket_fd_untrack, vd);
        return vhub_vmm_socket_remove(sock);
}

struct fd_visit {
        const struct vhub_vmm_device *vd;
        const struct vhub_fd_visitor *v;
        const char *what;
};

/* A transport's socket is kept (its group); what it queues is held for a moment. */
static void transport_fd_visit(int fd, const char *part, void *userdata) {
        const struct fd_visit *fv = userdata;

        if (part)
                vhub_fd_visit(fv->v, fd, NULL, "%s/%s/%s", fv->vd->fd_prefix, fv->what, part);
        else
                vhub_fd_visit(fv->v, fd, fv->vd->fd_group, "%s/%s", fv->vd->fd_prefix, fv->what);
}

static void socket_fd_visit(int fd, const char *what, void *userdata) {
        const struct fd_visit *fv = userdata;

        vhub_fd_visit(fv->v, fd, fv->vd->fd_group, "%s/%s", fv->vd->fd_prefix, what);
}

void vhub_vmm_device_foreach_fd(const struct vhub_vmm_device *vd, const struct vhub_fd_visitor *v) {
        if (vd->sock)
                vhub_vmm_socket_foreach_fd(vd->sock, socket_fd_visit, &(struct fd_visit){ vd, v, NULL });
        if (vd->listener)
                vhub_fd_visit(v, vhub_vmm_listener_fd(vd->listener), vd->fd_group, "%s/listen", vd->fd_prefix);
        if (vd->conn)
                vhub_vmm_conn_foreach_fd(vd->conn, transport_fd_visit, &(struct fd_visit){ vd, v, "conn" });
        if (vd->channel)
                vhub_vmm_channel_foreach_fd(vd->channel, transport_fd_visit, &(struct fd_visit){ vd, v, "chan" });
}

void vhub_vmm_device_list_foreach_fd(const struct vhub_vmm_device_list *list, const struct vhub_fd_visitor *v) {
        const struct vhub_vmm_device *vd;

        TAILQ_FOREACH(vd, list, link)
                vhub_vmm_device_foreach_fd(vd, v);
}

static void count_fd(int fd, const char *what, void *userdata) {
        if (fd >= 0)
                (*(unsigned *)userdata)++;
}

/* vhub_vmm_face_ops.fds_held: what the fd budget counts as the VM's uid's.
 * The budget is checked often: counted, never named. */
static unsigned vd_fds_held(const void *face) {
        const struct vhub_vmm_device *vd = face;
        unsigned n = 0;

        if (vd->sock)
                vhub_vmm_socket_foreach_fd(vd->sock, count_fd, &n);
        if (vd->listener)
                count_fd(vhub_vmm_listener_fd(vd->listener), NULL, &n);
        if (vd->conn)
                vhub_vmm_conn_foreach_fd(vd->conn, count_fd, &n);
        if (vd->channel)
                vhub_vmm_channel_foreach_fd(vd->channel, count_fd, &n);
        return n;
}

static void vd_enter(struct vhub_vmm_device *vd) {
        vd->busy++;
}

/* false: vd is gone (freed here), the caller returns at once. */
static bool vd_leave(struct vhub_vmm_device *vd) {
        if (--vd->busy > 0 || !vd->dead)
                return !vd->dead;
        vd_free(vd);
        return false;
}

/* Nothing owed either way any more: at rest, once it stays so a moment. */
static void vd_settle(struct vhub_vmm_device *vd) {
        static const struct timeval settle = { 0, REST_SETTLE_USEC };

        if (!vd->dead && evtimer_add(vd->ev_rest, &settle) < 0)
                vhub_device_vmm_changed(vd->dev);       /* no timer: written now, as before */
}

static void rest_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_device *vd = userdata;

        if (!vd->dead)
                vhub_device_vmm_changed(vd->dev);       /* the snapshot says it is at rest */
}

/*
 * Whether the VM's snapshot a crash would find -- the last one written
 * whole -- carries the session: the last one serialized if its write
 * succeeded, else the copy before it.  One serialized after the last
 * at_rest() asked nothing of the face: it does not carry the session.
 */
static bool vd_rest_stored(const struct vhub_vmm_device *vd) {
        uint64_t stored = vhub_device_vmm_snapshot_stored(vd->dev);

        if (stored == vd->rest_serial)
                return vd->rest_saved;
        return stored < vd->rest_serial && vd->rest_older;
}

/*
 * The session is about to leave its rest (bytes taken from the VMM, a
 * request relayed that it will answer, the answer to a request a snapshot
 * carries): a snapshot that carries it must not stay the one a crash would
 * find, or the next process would resume the VMM's stream in the wrong
 * place, or answer a request again.  So that one is replaced first, at
 * once.  false: it could not be (the write failed: ENOSPC, EFBIG...): the
 * VMM's connection is closed instead, nothing more happens on it, and a
 * crash now hands the next process either the requests still unanswered
 * or a connection already closed.
 */
static bool vd_leave_rest(struct vhub_vmm_device *vd) {
        if (vd->dead || !vd_rest_stored(vd))
                return true;
        vd->leaving_rest = true;
        vhub_device_vmm_commit_now(vd->dev);
        vd->leaving_rest = false;
        if (!vd_rest_stored(vd))
                return true;
        vd_log(vd, LOG_WARNING, NULL, "closing the VMM's connection: the VM's snapshot that carries its session "
               "could not be replaced");
        if (vd->conn)
                vhub_vmm_conn_fail(vd->conn, "the VM's snapshot that carries the session could not be replaced");
        return false;
}

/* Carried requests not handled again yet: dropped with their session. */
static void vd_redo_drop(struct vhub_vmm_device *vd) {
        while (vd->n_redo > 0) {
                vd->n_redo--;
                free(vd->redo[vd->n_redo]);
                vd->redo[vd->n_redo] = NULL;
        }
}

/* ---- the VMM's back-end channel ---- */

/* Every relayed request still awaited gets a failure: the VMM will not answer. */
static void relay_fail_all(struct vhub_vmm_device *vd) {
        while (vd->relay_count > 0) {
                uint64_t token = vd->relay_tokens[vd->relay_head];

                vd->relay_head = (vd->relay_head + 1) % RELAY_MAX;
                vd->relay_count--;
                if (!vd->dead)
                        vhub_device_vmm_relay_answered(vd->dev, token, 1);
                if (vd->relay_count == 0)
                        vd_settle(vd);
        }
}

static void channel_on_answer(void *userdata, uint32_t tag, uint32_t request, struct vhu_msg *reply) {
        struct vhub_vmm_device *vd = userdata;
        uint64_t token;

        if (vd->relay_count == 0)
                return;
        token = vd->relay_tokens[vd->relay_head];
        vd->relay_head = (vd->relay_head + 1) % RELAY_MAX;
        vd->relay_count--;
        vd_enter(vd);
        /* a u64: 0 is success; none (a closed or silent channel) is a failure */
        vhub_device_vmm_relay_answered(vd->dev, token,
                                       reply && reply->hdr.size == sizeof(uint64_t) ? reply->payload.u64 : 1);
        if (vd->relay_count == 0)
                vd_settle(vd);
        vd_leave(vd);
}

static void channel_on_lost(void *userdata, bool timeout, const char *reason) {
        struct vhub_vmm_device *vd = userdata;

        vd_log(vd, LOG_WARNING, NULL, "the VMM's back-end channel is gone: %s", reason);
        vd->channel = vd_channel_free(vd);
        vd_enter(vd);
        relay_fail_all(vd);
        vd_leave(vd);
}

static const struct vhub_vmm_channel_ops channel_ops = {
        .on_answer = channel_on_answer,
        .on_lost = channel_on_lost,
        .on_fds_changed = vd_fds_changed,
};

static int vd_relay(void *face, const struct vhu_msg *m, uint64_t token) {
        struct vhub_vmm_device *vd = face;
        struct vhu_msg out;
        int r;

        if (!vd->conn || !vd->channel || vhub_vmm_channel_is_lost(vd->channel))
                return -ENOTCONN;
        out = *m;
        /* an answer is asked for only where the VMM negotiated acks */
        if (!(vhub_vmm_conn_protocol_features(vd->conn) & VHU_PF_BIT(VHU_PF_REPLY_ACK)))
                out.hdr.flags &= ~VHU_FLAG_NEED_REPLY;
        if ((out.hdr.flags & VHU_FLAG_NEED_REPLY) && vd->relay_count == RELAY_MAX)
                return -ENOBUFS;
        /* an answer will be owed to this process */
        if ((out.hdr.flags & VHU_FLAG_NEED_REPLY) && !vd_leave_rest(vd))
                return -ENOTCONN;
        r = vhub_vmm_channel_send(vd->channel, &out, ++vd->relay_tag);
        if (r > 0) {
                vd->relay_tokens[(vd->relay_head + vd->relay_count) % RELAY_MAX] = token;
                vd->relay_count++;
        } else if (r == 0 && !vhub_vmm_channel_at_rest(vd->channel)) {
                /* not all written (the VMM does not read its channel): what
                 * waits in the writer would be lost with a crash that
                 * carries the session; nothing else may write the snapshot
                 * soon (a relay's token costs none) */
                vd_leave_rest(vd);
        }
        return r;
}

/* SET_BACKEND_REQ_FD: the VMM's channel replaces any earlier one. */
static int channel_open(struct vhub_vmm_device *vd, struct vhu_msg *m) {
        int fd = vhu_msg_take_fd(m, 0), r;

        if (vd->channel) {
                vd->channel = vd_channel_free(vd);
                relay_fail_all(vd);
        }
        r = vhub_vmm_channel_new(vd->base, fd, vd->limits.backend_timeout_ms, RELAY_MAX, &channel_ops, vd,
                                 &vd->channel);
        if (r < 0)
                return r;
        vd_fd_note(vd, true, vhub_vmm_channel_fd(vd->channel), "chan");
        vhub_vmm_channel_set_protocol_features(vd->channel, vhub_vmm_conn_protocol_features(vd->conn));
        return 0;
}

/* ---- the VMM's requests ---- */

static void call_forget(struct vmm_call *c) {
        struct vhub_vmm_device *vd = c->vd;

        if (vd) {
                TAILQ_REMOVE(&vd->calls, c, link);
                vd->n_calls--;
                vd->n_carried -= c->carried != NULL;
                vd->n_owed -= c->answer_id != 0;
                /* perhaps at rest again: written so that a crash carries it */
                if (vd->n_calls == 0)
                        vd_settle(vd);
                /* reading resumes once half the backlog is answered */
                if (vd->paused && !vd->frozen && vd->conn && vd->n_calls <= vd->limits.max_requests / 2) {
                        vd->paused = false;
                        vhub_vmm_conn_pause(vd->conn, false);
                }
        }
        vhub_vmm_answer_done(&c->call.out.vmm_request);
        free(c->carried);
        free(c);
}

/* A held call's answer will not go out (its session ended): it goes. */
static void call_drop_held(struct vmm_call *c) {
        vhub_vmm_answer_done(&c->call.out.vmm_request);
        free(c->carried);
        free(c);
}

/* The calls leave vd: those the model still holds find no device when
 * done, the held ones go (their answers with them). */
static void vd_calls_let_go(struct vhub_vmm_device *vd) {
        struct vmm_call *c;

        while ((c = TAILQ_FIRST(&vd->calls))) {
                TAILQ_REMOVE(&vd->calls, c, link);
                if (c->held)
                        call_drop_held(c);
                else
                        c->vd = NULL;
        }
        vd->n_held = 0;
}

static void call_answer(struct vmm_call *c);
static void vd_turn_committed(struct vhub_commit_wait *w);

/* The model answered: the answer goes to the VMM, if the same VMM still waits. */
static void call_done(struct vhub_call *call) {
        struct vmm_call *c = (struct vmm_call *)((char *)call - offsetof(struct vmm_call, call));
        struct vhub_vmm_device *vd = c->vd;

        if (!vd || !vd->conn || c->session != vd->session || vhub_vmm_conn_is_lost(vd->conn)) {
                call_forget(c);
                return;
        }
        /* a snapshot carrying this request must not outlive its answer (a
         * crash would handle it again, and the VMM get two): one that drops
         * it is written first -- the turn's commit, which the other requests
         * read and answered in this wake-up share (vd_turn_committed());
         * an answer behind a held one waits with it (the VMM's order) */
        if (!vd->dead && (vd->n_held > 0 || (c->carried && c->answer_id != 0 && vd_rest_stored(vd))) &&
            vhub_device_vmm_commit_after(vd->dev, &vd->turn_wait)) {
                c->held = true;
                vd->n_held++;
                return;
        }
        /* (no snapshots to wait for: at once, as before) */
        if (c->carried && c->answer_id != 0 && !vd_leave_rest(vd)) {
                call_forget(c);
                return;
        }
        call_answer(c);
}

/* The answer the model gave goes to the VMM (or closes its connection). */
static void call_answer(struct vmm_call *c) {
        struct vhub_vmm_device *vd = c->vd;
        struct vhub_call *call = &c->call;
        const struct vhub_vmm_answer *a = &call->out.vmm_request;
        int r = 0;

        /* a request the VMM waits for nothing for can still close it */
        if (call->result < 0) {
                vd_log(vd, LOG_WARNING, REQ(c->request), "closing the VMM's connection: %s", call->error.detail);
                vhub_vmm_conn_fail(vd->conn, call->error.detail);
        } else if (a->close || !a->msg) {
                vd_log(vd, LOG_WARNING, REQ(c->request), "closing the VMM's connection: %s", a->why);
                vhub_vmm_conn_fail(vd->conn, a->why);
        } else if (c->answer_id == 0) {
                /* nothing to send */
        } else if (vhub_vmm_conn_answer_kind(vd->conn, c->answer_id) == VHUB_VMM_ANSWER_REPLY) {
                r = vhub_vmm_conn_reply(vd->conn, c->answer_id, a->msg->payload.raw, a->msg->hdr.size,
                                        a->msg->fds, a->msg->n_fds);
        } else {
                r = vhub_vmm_conn_ack(vd->conn, c->answer_id,
                                      a->msg->hdr.size == sizeof(uint64_t) ? a->msg->payload.u64 : 1);
        }
        if (r < 0) {
                char why[200];

                snprintf(why, sizeof(why), "cannot answer %s as the VMM expects it: %s", REQ(c->request),
                         strerror(-r));
                vd_log(vd, LOG_WARNING, REQ(c->request), "closing the VMM's connection: %s", why);
                vhub_vmm_conn_fail(vd->conn, why);
        }
        call_forget(c);
}

/*
 * The turn's commit ran (vhub-commit.h).  The answers held for it go out,
 * in order, if it replaced the snapshot carrying their requests; if that
 * write failed the VMM's connection is closed instead and they are
 * dropped, as in vd_leave_rest().  A request it carries in flight is
 * logged so.
 */
static void vd_turn_committed(struct vhub_commit_wait *w) {
        struct vhub_vmm_device *vd =
                (struct vhub_vmm_device *)((char *)w - offsetof(struct vhub_vmm_device, turn_wait));
        struct vmm_call *c, *last;

        if (vd->dead)
                return;         /* its device is gone: vd_free() drops what it holds */
        vd_enter(vd);
        if (vd->n_held > 0 && vd_rest_stored(vd) && vd->conn) {
                vd_log(vd, LOG_WARNING, NULL, "closing the VMM's connection: the VM's snapshot that carries its "
                       "session could not be replaced");
                vhub_vmm_conn_fail(vd->conn, "the VM's snapshot that carries the session could not be replaced");
        }
        while (vd->n_held > 0) {
                TAILQ_FOREACH(c, &vd->calls, link)
                        if (c->held)
                                break;
                if (!c)
                        break;
                c->held = false;
                vd->n_held--;
                if (vd->conn && !vhub_vmm_conn_is_lost(vd->conn))
                        call_answer(c);
                else
                        call_forget(c);
        }
        vd->n_held = 0;
        last = TAILQ_LAST(&vd->calls, vmm_call_list);
        if (last && last->carried && last->seq > vd->logged_seq && vd->saved_seq >= last->seq &&
            vd_rest_stored(vd)) {
                vd->logged_seq = last->seq;
                vd_log(vd, LOG_DEBUG, REQ(last->request), "%s in flight: the VM's snapshot carries it",
                       REQ(last->request));
        }
        vd_leave(vd);
}

/*
 * Requests a crash may carry and the next process handle again (docs/
 * restart.md, "A crash with VMM requests in flight"): read whole, no fds,
 * and handling one twice changes nothing -- set requests whose record is
 * the value they set, and queries answered from the back-end or the
 * records (GET_VRING_BASE records its ring stopped only with its answer,
 * in the same callback).  SET_CONFIG is not: its effect is the back-end's
 * own, which no record replays.
 */
static const uint32_t carriable[] = {
        VHU_REQ_SET_FEATURES,   VHU_REQ_SET_VRING_NUM,   VHU_REQ_SET_VRING_BASE, VHU_REQ_SET_VRING_ADDR,
        VHU_REQ_SET_VRING_ENDIAN, VHU_REQ_SET_VRING_ENABLE, VHU_REQ_SET_STATUS,  VHU_REQ_NET_SET_MTU,
        VHU_REQ_GET_VRING_BASE, VHU_REQ_GET_STATUS,      VHU_REQ_GET_CONFIG,     VHU_REQ_VRING_KICK,
};

static bool request_carriable(const struct vhu_msg *m) {
        for (size_t i = 0; m->n_fds == 0 && i < sizeof(carriable) / sizeof(carriable[0]); i++)
                if (carriable[i] == m->hdr.request)
                        return true;
        return false;
}

static bool vd_carriable(const struct vhub_vmm_device *vd);

static void conn_on_request(void *userdata, struct vhu_msg *m, uint64_t answer_id) {
        struct vhub_vmm_device *vd = userdata;
        struct vmm_call *c, *last;
        uint64_t seq;

        vd_log(vd, LOG_DEBUG, REQ(m->hdr.request), "VMM request %s%s", REQ(m->hdr.request),
               answer_id ? " (answer due)" : "");
        if (m->hdr.request == VHU_REQ_SET_PROTOCOL_FEATURES && vd->channel)
                vhub_vmm_channel_set_protocol_features(vd->channel, vhub_vmm_conn_protocol_features(vd->conn));
        if (m->hdr.request == VHU_REQ_SET_BACKEND_REQ_FD) {
                int r = channel_open(vd, m);

                if (r < 0) {
                        vd_log(vd, LOG_WARNING, REQ(m->hdr.request), "closing the VMM's connection: "
                               "its back-end channel: %s", strerror(-r));
                        vhub_vmm_conn_fail(vd->conn, "SET_BACKEND_REQ_FD with an fd that is no stream socket");
                        return;
                }
        }
        c = calloc(1, sizeof(*c));
        if (!c) {
                vhub_vmm_conn_fail(vd->conn, "out of memory");
                return;
        }
        c->call.done = call_done;
        c->vd = vd;
        c->session = vd->session;
        c->answer_id = answer_id;
        c->request = m->hdr.request;
        c->seq = seq = ++vd->call_seq;
        /* carried only behind requests all carried (their order is the VMM's) */
        if (vd->n_carried == vd->n_calls && vd->n_calls < CARRY_MAX && request_carriable(m) &&
            (c->carried = malloc(sizeof(*c->carried)))) {
                vhu_msg_init(c->carried);
                c->carried->hdr = m->hdr;
                memcpy(c->carried->payload.raw, m->payload.raw, m->hdr.size);
                vd->n_carried++;
        }
        vd->n_owed += answer_id != 0;
        TAILQ_INSERT_TAIL(&vd->calls, c, link);
        vd->n_calls++;
        if (!vd->paused && vd->n_calls >= vd->limits.max_requests) {
                /* the VMM waits (nothing is dropped) while the back-end catches up */
                vd->paused = true;
                vhub_vmm_conn_pause(vd->conn, true);
        }
        vd_enter(vd);
        vhub_device_vmm_request(vd->dev, m, &c->call); /* takes m's fds; may answer at once */
        if (!vd_leave(vd))
                return;
        /* still in flight and carried: the turn's commit says so, the one
         * its op waits for if it goes to the back-end (vhub-op-engine.c),
         * shared by every request read in this wake-up; a crash before it
         * falls back */
        last = TAILQ_LAST(&vd->calls, vmm_call_list);
        if (!last || last->seq != seq || !last->carried)
                return;
        if ((!vd->rest_saved || vd->saved_seq < seq) && vd_carriable(vd))
                vhub_device_vmm_commit_after(vd->dev, &vd->turn_wait);
}

/* The VMM's session is over: everything of it goes, the model is told. */
static void vd_end_session(struct vhub_vmm_device *vd) {
        vd->session++; /* answers still due are dropped */
        vd_calls_let_go(vd);
        vd->n_calls = vd->n_carried = vd->n_owed = 0;
        vd_redo_drop(vd);
        /* a snapshot carrying it names a connection closed, or unanswered
         * requests: nothing the next session must replace */
        vd->rest_saved = vd->rest_older = false;
        vd->paused = false;
        vd->channel = vd_channel_free(vd);
        relay_fail_all(vd);
        vd->conn = vd_conn_free(vd);
        if (vd->listener)
                vhub_vmm_listener_release(vd->listener);
        if (!vd->dead)
                vhub_device_vmm_disconnected(vd->dev);
}

static void conn_on_lost(void *userdata, const char *reason) {
        struct vhub_vmm_device *vd = userdata;

        vd_log(vd, LOG_INFO, NULL, "VMM connection closed: %s", reason);
        vd_enter(vd);
        vd_end_session(vd);
        vd_leave(vd);
}

static void conn_on_before_read(void *userdata) {
        vd_leave_rest(userdata);        /* false: the connection is lost, nothing is read */
}

static const struct vhub_vmm_conn_ops conn_ops = {
        .on_request = conn_on_request,
        .on_lost = conn_on_lost,
        .on_fds_changed = vd_fds_changed,
        .on_before_read = conn_on_before_read,
};

/*
 * An adopted session's requests in flight, handled again in the order the
 * VMM sent them, from the loop: after the restore has marked the device lost
 * (vhub_device_restore_finish()), so that they wait for its back-end's
 * restore as any request in an outage.  The VMM's connection is read again
 * only after them.
 */
static void redo_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_device *vd = userdata;

        vd_enter(vd);
        while (vd->n_redo > 0 && vd->conn && !vd->dead) {
                struct vhu_msg *m = vd->redo[0];

                vd->n_redo--;
                memmove(vd->redo, vd->redo + 1, vd->n_redo * sizeof(vd->redo[0]));
                vd->redo[vd->n_redo] = NULL;
                vd_log(vd, LOG_INFO, REQ(m->hdr.request), "%s from the VMM, in flight at the daemon's restart: "
                       "handled again", REQ(m->hdr.request));
                vhub_vmm_conn_redo(vd->conn, m);
                free(m);
        }
        vd_redo_drop(vd);
        if (vd->conn && !vd->paused && !vd->frozen)
                vhub_vmm_conn_pause(vd->conn, false);
        vd_leave(vd);
}

/* ---- the listener ---- */

static void listener_on_connect(void *userdata, int fd) {
        struct vhub_vmm_device *vd = userdata;
        struct vhub_vmm_conn_limits l;
        int r;

        vhub_vmm_conn_limits_default(&l);
        /* a safety net: the model answers within --backend-timeout-ms itself */
        l.answer_timeout_ms = 2 * vd->limits.backend_timeout_ms + 1000;
        r = vhub_vmm_conn_new(vd->base, fd, &l, &conn_ops, vd, &vd->conn);
        if (r < 0) {
                vd_log(vd, LOG_WARNING, NULL, "cannot take the VMM's connection: %s", strerror(-r));
                vhub_vmm_listener_release(vd->listener);
                return;
        }
        vd_fd_note(vd, true, vhub_vmm_conn_fd(vd->conn), "conn");
        if (vd->frozen)
                vhub_vmm_conn_pause(vd->conn, true);
        vhub_vmm_conn_offer_protocol_features(vd->conn, vhub_device_vmm_protocol_features(vd->dev));
        vd->session++;
        vd_enter(vd);
        vhub_device_vmm_connected(vd->dev);
        vd_leave(vd);
}

static void listener_on_refused(void *userdata, enum vhub_vmm_refusal why, uid_t peer_uid) {
        struct vhub_vmm_device *vd = userdata;

        vd_log(vd, LOG_INFO, NULL, "refused a connection from uid %d: %s", (int)peer_uid,
               why == VHUB_VMM_REFUSED_BUSY ? "a VMM is attached already" : "not the VM's uid");
}

static const struct vhub_vmm_listener_ops listener_ops = {
        .on_connect = listener_on_connect,
        .on_refused = listener_on_refused,
};

/* ---- life ---- */

static void vd_free(struct vhub_vmm_device *vd) {
        vhub_commit_wait_cancel(&vd->turn_wait);
        vd_calls_let_go(vd);
        vd->channel = vd_channel_free(vd);
        vd->conn = vd_conn_free(vd);
        vd->listener = vd_listener_free(vd);
        vd->sock = vd_socket_remove(vd);
        if (vd->list)
                TAILQ_REMOVE(vd->list, vd, link);
        vhub_event_freep(&vd->ev_rest);
        vhub_event_freep(&vd->ev_redo);
        vd_redo_drop(vd);
        vhub_fd_group_own(vd->ctx, VHUB_FD_GROUP_FRONTDOOR, vhub_device_id(vd->dev), 0, false);
        free(vd);
}

/* The model frees the device: nothing of it is called again. */
static void vd_gone(void *face) {
        struct vhub_vmm_device *vd = face;

        vd->dead = true;
        vd->relay_count = 0; /* the back-end's channel goes with the device */
        if (vd->busy == 0)
                vd_free(vd);
}

/* ---- a restart of the daemon carries the VMM's session ---- */

/* The face's record in the device's carried session (vhub_vmm_face_ops.save):
 * its fds by key in group f<device id>, what the VMM acked. */
enum {
        F_LISTEN = 1,
        F_CONN,
        F_CHAN,
        F_UID_DIR,
        F_VM_DIR,
        F_INODE,
        F_PROTOCOL_FEATURES,
        F_REQUEST,      /* bytes: a request in flight, header and payload, in order */
};

/* What the VMM sent is all answered and gone, nothing half-read, nothing
 * awaited on its channel: the sockets alone hold the session.  Or it is busy
 * only with requests it carries (docs/restart.md, "A crash with VMM requests
 * in flight"): each read whole, without fds, handled again by the next
 * process; the connection owes their answers and nothing else.  Asked as
 * its VM's snapshot is written, which then carries the session or not. */
static bool vd_carriable(const struct vhub_vmm_device *vd) {
        return !vd->leaving_rest && !vd->dead && vd->n_held == 0 && vd->n_carried == vd->n_calls &&
               vd->n_calls + vd->n_redo <= CARRY_MAX && vd->relay_count == 0 && vd->conn && vd->listener &&
               vd->sock && vhub_vmm_conn_quiet(vd->conn, vd->n_owed) &&
               (!vd->channel || vhub_vmm_channel_at_rest(vd->channel)) &&
               /* settled; a planned restart's last snapshot does not wait,
                * nor do requests in flight (their op's start writes one
                * anyway: QEMU's stop asks for each ring's base in turn) */
               (vd->frozen || vd->n_calls + vd->n_redo > 0 || !evtimer_pending(vd->ev_rest, NULL));
}

static bool vd_at_rest(void *face) {
        struct vhub_vmm_device *vd = face;
        bool was = vd->rest_saved;

        vd->rest_older = vd_rest_stored(vd);
        vd->rest_serial = vhub_device_vmm_snapshot_serial(vd->dev);
        vd->rest_saved = vd_carriable(vd);
        if (vd->rest_saved && !was)
                vd_log(vd, LOG_DEBUG, NULL, "the VM's snapshot carries the VMM's session (%s)",
                       vd->n_calls + vd->n_redo ? "requests in flight" : "at rest");
        return vd->rest_saved;
}

static void put_request(struct vhub_snap_writer *w, const struct vhu_msg *m) {
        uint8_t b[sizeof(m->hdr) + VHU_MAX_PAYLOAD];

        memcpy(b, &m->hdr, sizeof(m->hdr));
        memcpy(b + sizeof(m->hdr), m->payload.raw, m->hdr.size);
        vhub_snap_put_bytes(w, F_REQUEST, b, sizeof(m->hdr) + m->hdr.size);
}

struct socket_save {
        const struct vhub_vmm_device *vd;
        struct vhub_snap_writer *w;
};

static void socket_fd_save(int fd, const char *what, void *userdata) {
        const struct socket_save *ss = userdata;
        uint32_t tag = strcmp(what, "dir/uid") == 0 ? F_UID_DIR : strcmp(what, "dir/vm") == 0 ? F_VM_DIR : F_INODE;

        vhub_snap_put_fd(ss->w, tag, vhub_context_fdstore(ss->vd->ctx), ss->vd->fd_group, fd);
}

static void vd_save(void *face, struct vhub_snap_writer *w) {
        struct vhub_vmm_device *vd = face;
        const struct vhub_fdstore *st = vhub_context_fdstore(vd->ctx);
        const struct vmm_call *c;

        vhub_snap_put_fd(w, F_LISTEN, st, vd->fd_group, vhub_vmm_listener_fd(vd->listener));
        vhub_snap_put_fd(w, F_CONN, st, vd->fd_group, vhub_vmm_conn_fd(vd->conn));
        if (vd->channel)
                vhub_snap_put_fd(w, F_CHAN, st, vd->fd_group, vhub_vmm_channel_fd(vd->channel));
        vhub_vmm_socket_foreach_fd(vd->sock, socket_fd_save, &(struct socket_save){ vd, w });
        vhub_snap_put_u64(w, F_PROTOCOL_FEATURES, vhub_vmm_conn_protocol_features(vd->conn));
        /* in the VMM's order: those not handled again yet came last */
        TAILQ_FOREACH(c, &vd->calls, link)
                put_request(w, c->carried);
        for (unsigned i = 0; i < vd->n_redo; i++)
                put_request(w, vd->redo[i]);
        vd->saved_seq = vd->call_seq;
}

static const struct vhub_vmm_face_ops face_ops = {
        .relay = vd_relay,
        .gone = vd_gone,
        .fds_held = vd_fds_held,
        .at_rest = vd_at_rest,
        .save = vd_save,
};

static struct vhub_vmm_device *vd_alloc(struct vhub_context *ctx, struct vhub_device *dev,
                                        const struct vhub_vmm_device_limits *limits) {
        struct vhub_vmm_device *vd = calloc(1, sizeof(*vd));

        if (!vd)
                return NULL;
        vd->ctx = ctx;
        vd->base = vhub_context_base(ctx);
        vd->ev_rest = evtimer_new(vd->base, rest_cb, vd);
        vd->turn_wait.run = vd_turn_committed;
        vd->ev_redo = evtimer_new(vd->base, redo_cb, vd);
        if (!vd->ev_rest || !vd->ev_redo) {
                vhub_event_freep(&vd->ev_rest);
                vhub_event_freep(&vd->ev_redo);
                free(vd);
                return NULL;
        }
        vd->dev = dev;
        vd->limits = *limits;
        if (vd->limits.max_requests == 0)
                vd->limits.max_requests = 256;
        vhub_fd_group(vd->fd_group, VHUB_FD_GROUP_FRONTDOOR, vhub_device_id(dev));
        /* its group counts for the VM's uid's share of the fd store */
        vhub_fd_group_own(ctx, VHUB_FD_GROUP_FRONTDOOR, vhub_device_id(dev), vhub_device_uid(dev), true);
        snprintf(vd->fd_prefix, sizeof(vd->fd_prefix), "vmm/%u/%s/%s", (unsigned)vhub_device_uid(dev),
                 vhub_device_vm_name(dev), vhub_device_name(dev));
        TAILQ_INIT(&vd->calls);
        return vd;
}

int vhub_vmm_device_new(struct vhub_context *ctx, struct vhub_vmm_device_list *list,
                        struct vhub_device *dev, int listen_fd, struct vhub_vmm_socket *sock, uid_t owner_uid,
                        const struct vhub_vmm_device_limits *limits, struct vhub_vmm_device **ret,
                        const struct vhub_vmm_face_ops **ret_ops) {
        struct vhub_vmm_device *vd = vd_alloc(ctx, dev, limits);
        int r;

        if (!vd) {
                vhu_safe_close(listen_fd);
                vhub_vmm_socket_remove(sock);
                return -ENOMEM;
        }
        vd->sock = sock;
        vhub_vmm_socket_foreach_fd(sock, socket_fd_track, vd);
        r = vhub_vmm_listener_new(vd->base, listen_fd, owner_uid, &listener_ops, vd, &vd->listener);
        if (r < 0) {
                vd_free(vd);
                return r;
        }
        vd_fd_note(vd, true, vhub_vmm_listener_fd(vd->listener), "listen");
        vd->list = list;
        TAILQ_INSERT_TAIL(list, vd, link);
        *ret = vd;
        *ret_ops = &face_ops;
        return 0;
}

bool vhub_vmm_device_list_has_group(const struct vhub_vmm_device_list *list, const char *group) {
        const struct vhub_vmm_device *vd;

        TAILQ_FOREACH(vd, list, link)
                if (strcmp(vd->fd_group, group) == 0)
                        return true;
        return false;
}

void vhub_vmm_device_list_pause(struct vhub_vmm_device_list *list) {
        struct vhub_vmm_device *vd;

        TAILQ_FOREACH(vd, list, link) {
                vd->frozen = vd->paused = true;
                if (vd->conn)
                        vhub_vmm_conn_pause(vd->conn, true);
        }
}

void vhub_vmm_device_list_close(struct vhub_vmm_device_list *list) {
        struct vhub_vmm_device *vd;

        TAILQ_FOREACH(vd, list, link) {
                vd->listener = vd_listener_free(vd);
                /* telling the model frees no device: a VMM_STOP is only queued */
                if (vd->conn)
                        vd_end_session(vd);
        }
}

void vhub_vmm_device_list_free(struct vhub_vmm_device_list *list) {
        struct vhub_vmm_device *vd;

        while ((vd = TAILQ_FIRST(list))) {
                vd->dead = true;
                vd_free(vd);
        }
}

/* The fds the face's record names, claimed from its group. */
struct carried_fds {
        int listen, conn, chan, uid_dir, vm_dir, inode;
        uint64_t protocol_features;
        struct vhu_msg *req[CARRY_MAX];     /* requests in flight, in order */
        unsigned n_req;
};

/* A request in flight as put_request() wrote it: a header, its payload whole. */
static int read_request(const struct vhub_snap_rec *x, struct carried_fds *c) {
        struct vhu_msg *m;
        const void *raw;
        size_t n;
        int r = vhub_snap_get_bytes(x, &raw, &n);

        if (r < 0)
                return r;
        if (c->n_req == CARRY_MAX || n < sizeof(m->hdr))
                return -EBADMSG;
        m = malloc(sizeof(*m));
        if (!m)
                return -ENOMEM;
        vhu_msg_init(m);
        memcpy(&m->hdr, raw, sizeof(m->hdr));
        if (m->hdr.size > VHU_MAX_PAYLOAD || n - sizeof(m->hdr) != m->hdr.size) {
                free(m);
                return -EBADMSG;
        }
        memcpy(m->payload.raw, (const uint8_t *)raw + sizeof(m->hdr), m->hdr.size);
        c->req[c->n_req++] = m;
        return 0;
}

static int read_carried(struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec, struct carried_fds *c) {
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        struct vhub_fd_key key;
        int r = vhub_snap_enter(rec, &it), *slot;

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                switch (x.tag) {
                case F_LISTEN: slot = &c->listen; break;
                case F_CONN: slot = &c->conn; break;
                case F_CHAN: slot = &c->chan; break;
                case F_UID_DIR: slot = &c->uid_dir; break;
                case F_VM_DIR: slot = &c->vm_dir; break;
                case F_INODE: slot = &c->inode; break;
                case F_PROTOCOL_FEATURES: r = vhub_snap_get_u64(&x, &c->protocol_features); continue;
                case F_REQUEST: r = read_request(&x, c); continue;
                default: r = vhub_snap_unknown(&x); continue;
                }
                r = vhub_snap_get_key(&x, &key);
                if (r >= 0 && *slot < 0 && (r = vhub_fd_claim(claim, &key)) >= 0)
                        *slot = r;
        }
        if (r >= 0 && (c->listen < 0 || c->conn < 0 || c->uid_dir < 0 || c->vm_dir < 0 || c->inode < 0))
                r = -ENOENT;
        return r;
}

int vhub_vmm_device_adopt(struct vhub_context *ctx, struct vhub_vmm_device_list *list, struct vhub_device *dev,
                          struct vhub_vmm_dir *dir, const struct vhub_cred *owner,
                          struct vhub_fdstore_restore *fr, const struct vhub_snap_rec *rec,
                          const struct vhub_vmm_device_limits *limits, struct vhub_vmm_device **ret,
                          const struct vhub_vmm_face_ops **ret_ops, char **ret_path) {
        struct carried_fds c = { -1, -1, -1, -1, -1, -1, 0, { NULL }, 0 };
        struct vhub_vmm_conn_limits l;
        struct vhub_vmm_device *vd = vd_alloc(ctx, dev, limits);
        struct vhub_fd_claim claim;
        int r;

        *ret_path = NULL;
        if (!vd)
                return -ENOMEM;
        vhub_fd_claim_open(fr, vhub_context_fdstore(ctx), vd->fd_group, &claim);
        r = read_carried(&claim, rec, &c);
        vhub_fd_claim_close(&claim);    /* what the record does not name goes */
        if (r < 0) {
                /* what was claimed is a member of the group since the
                 * restore: it leaves it as it closes, or the group would
                 * keep the stale listener stored (and its name "in use") */
                vd->dead = true;
                c.listen = claimed_close(vd, c.listen, "listen");
                c.conn = claimed_close(vd, c.conn, "conn");
                c.chan = claimed_close(vd, c.chan, "chan");
                /* the socket the earlier run made goes too: the next VMM's
                 * is made at once, even while the manager still holds the
                 * old listener (the name is ours: the inode says so) */
                if (c.uid_dir >= 0 && c.vm_dir >= 0 && c.inode >= 0 &&
                    vhub_vmm_socket_adopt(dir, owner, vhub_device_vm_name(dev), vhub_device_name(dev),
                                          c.uid_dir, c.vm_dir, c.inode, &vd->sock, ret_path) >= 0) {
                        vd->sock = vd_socket_remove(vd);
                        free(*ret_path);
                        *ret_path = NULL;
                        c.uid_dir = c.vm_dir = c.inode = -1;
                }
                c.uid_dir = claimed_close(vd, c.uid_dir, "dir/uid");
                c.vm_dir = claimed_close(vd, c.vm_dir, "dir/vm");
                c.inode = claimed_close(vd, c.inode, "inode");
                for (unsigned i = 0; i < c.n_req; i++)
                        free(c.req[i]);
                vhub_event_freep(&vd->ev_rest);
                vhub_event_freep(&vd->ev_redo);
                vhub_fd_group_own(ctx, VHUB_FD_GROUP_FRONTDOOR, vhub_device_id(dev), 0, false);
                free(vd);
                return r;
        }
        /* the object's from here: vd_free() drops them */
        memcpy(vd->redo, c.req, sizeof(c.req));
        vd->n_redo = c.n_req;
        vd->list = list;
        TAILQ_INSERT_TAIL(list, vd, link);
        /* each part is the object's as soon as it exists: vd_free() undoes any prefix */
        r = vhub_vmm_socket_adopt(dir, owner, vhub_device_vm_name(dev), vhub_device_name(dev), c.uid_dir,
                                  c.vm_dir, c.inode, &vd->sock, ret_path);
        if (r >= 0) {
                vhub_vmm_socket_foreach_fd(vd->sock, socket_fd_track, vd);
                r = vhub_vmm_listener_new(vd->base, c.listen, owner->uid, &listener_ops, vd, &vd->listener);
                if (r < 0)
                        claimed_gone(vd, c.listen, "listen");
        } else {
                claimed_close(vd, c.uid_dir, "dir/uid");
                claimed_close(vd, c.vm_dir, "dir/vm");
                claimed_close(vd, c.inode, "inode");
                claimed_close(vd, c.listen, "listen");
        }
        if (r >= 0) {
                vd_fd_note(vd, true, vhub_vmm_listener_fd(vd->listener), "listen");
                vhub_vmm_listener_hold(vd->listener);   /* its VMM is attached */
                vhub_vmm_conn_limits_default(&l);
                l.answer_timeout_ms = 2 * vd->limits.backend_timeout_ms + 1000;
                r = vhub_vmm_conn_new(vd->base, c.conn, &l, &conn_ops, vd, &vd->conn);
                if (r < 0)
                        claimed_gone(vd, c.conn, "conn");
        } else {
                claimed_close(vd, c.conn, "conn");
        }
        if (r >= 0) {
                vd_fd_note(vd, true, vhub_vmm_conn_fd(vd->conn), "conn");
                vhub_vmm_conn_offer_protocol_features(vd->conn, vhub_device_vmm_protocol_features(dev));
                r = vhub_vmm_conn_resume(vd->conn, c.protocol_features);
        }
        if (r >= 0 && c.chan >= 0) {
                r = vhub_vmm_channel_new(vd->base, c.chan, vd->limits.backend_timeout_ms, RELAY_MAX, &channel_ops,
                                         vd, &vd->channel);
                if (r < 0)
                        claimed_gone(vd, c.chan, "chan");
                c.chan = -1;
                if (r >= 0) {
                        vd_fd_note(vd, true, vhub_vmm_channel_fd(vd->channel), "chan");
                        vhub_vmm_channel_set_protocol_features(vd->channel, c.protocol_features);
                }
        }
        claimed_close(vd, c.chan, "chan");
        if (r < 0) {
                vd->dead = true;
                vd_free(vd);
                if (*ret_path) {
                        free(*ret_path);
                        *ret_path = NULL;
                }
                return r;
        }
        vd->session++;
        /* the snapshot it came from carries the session */
        vd->rest_saved = true;
        vd->rest_serial = vhub_device_vmm_snapshot_stored(dev);
        if (vd->n_redo > 0) {
                static const struct timeval now = { 0, 0 };

                /* nothing of the VMM is read before them */
                vhub_vmm_conn_pause(vd->conn, true);
                if (evtimer_add(vd->ev_redo, &now) < 0)
                        redo_cb(-1, 0, vd);
                vd_log(vd, LOG_INFO, NULL, "%u request%s of the VMM in flight at the daemon's restart: "
                       "handled again once the device is restored", vd->n_redo, vd->n_redo == 1 ? "" : "s");
        }
        *ret = vd;
        *ret_ops = &face_ops;
        return 0;
}
