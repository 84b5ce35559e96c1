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
 *
 * This file holds the object's life and its fds (names, the fd store, rest);
 * the rest of it by job, sharing vhub-vmm-device-internal.h:
 * vhub-vmm-device-relay.c (the VMM's back-end channel),
 * vhub-vmm-device-requests.c (the VMM's requests through the model) and
 * vhub-vmm-device-carry.c (what a restart of the daemon carries).
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

#include "vhub-vmm-device-internal.h"


/* ---- its fds: names and the fd store ---- */

/* What the face holds for its device changed: the fd budget counts the
 * device's VM again (vd_fds_held()). */
void vd_fds_changed(void *userdata) {
        const struct vhub_vmm_device *vd = userdata;

        if (!vd->dead && vd->dev)
                vhub_device_vmm_fds_changed(vd->dev);
}

void vd_fd_note(const struct vhub_vmm_device *vd, bool kept, int fd, const char *what) {
        vhub_fd_note(vd->ctx, kept, vd->fd_group, fd, "%s/%s", vd->fd_prefix, what);
        vd_fds_changed((void *)vd);
}

void vd_socket_fd_track(int fd, const char *what, void *userdata) {
        vd_fd_note(userdata, true, fd, what);
}

static void socket_fd_untrack(int fd, const char *what, void *userdata) {
        vd_fd_note(userdata, false, fd, what);
}

/* Untracked, then freed or closed: each returns NULL for the member. */
struct vhub_vmm_channel *vd_channel_free(struct vhub_vmm_device *vd) {
        if (vd->channel)
                vd_fd_note(vd, false, vhub_vmm_channel_fd(vd->channel), "chan");
        return vhub_vmm_channel_free(vd->channel);
}

struct vhub_vmm_conn *vd_conn_free(struct vhub_vmm_device *vd) {
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
int vd_claimed_close(struct vhub_vmm_device *vd, int fd, const char *what) {
        if (fd >= 0)
                vd_fd_note(vd, false, fd, what);
        return vhu_safe_close(fd);
}

/* Such an fd a constructor that failed closed: its number leaves the group
 * (a removal makes no system call, and nothing was opened since). */
void vd_claimed_gone(struct vhub_vmm_device *vd, int fd, const char *what) {
        vd_fd_note(vd, false, fd, what);
}

struct vhub_vmm_socket *vd_socket_remove(struct vhub_vmm_device *vd) {
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

void vd_enter(struct vhub_vmm_device *vd) {
        vd->busy++;
}

/* false: vd is gone (freed here), the caller returns at once. */
bool vd_leave(struct vhub_vmm_device *vd) {
        if (--vd->busy > 0 || !vd->dead)
                return !vd->dead;
        vd_free(vd);
        return false;
}

/* Nothing owed either way any more: at rest, once it stays so a moment. */
void vd_settle(struct vhub_vmm_device *vd) {
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
bool vd_rest_stored(const struct vhub_vmm_device *vd) {
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
bool vd_leave_rest(struct vhub_vmm_device *vd) {
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
void vd_redo_drop(struct vhub_vmm_device *vd) {
        while (vd->n_redo > 0) {
                vd->n_redo--;
                free(vd->redo[vd->n_redo]);
                vd->redo[vd->n_redo] = NULL;
        }
}

/* ---- the listener ---- */

static void listener_on_connect(void *userdata, int fd) {
        struct vhub_vmm_device *vd = userdata;
        struct vhub_vmm_conn_limits l;
        int r;

        vhub_vmm_conn_limits_default(&l);
        /* a safety net: the model answers within --backend-timeout-ms itself */
        l.answer_timeout_ms = 2 * vd->limits.backend_timeout_ms + 1000;
        r = vhub_vmm_conn_new(vd->base, fd, &l, &vd_conn_ops, vd, &vd->conn);
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

const struct vhub_vmm_listener_ops vd_listener_ops = {
        .on_connect = listener_on_connect,
        .on_refused = listener_on_refused,
};

/* ---- life ---- */

void vd_free(struct vhub_vmm_device *vd) {
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

const struct vhub_vmm_face_ops vd_face_ops = {
        .relay = vd_relay,
        .gone = vd_gone,
        .fds_held = vd_fds_held,
        .at_rest = vd_at_rest,
        .save = vd_save,
};

struct vhub_vmm_device *vd_alloc(struct vhub_context *ctx, struct vhub_device *dev,
                                        const struct vhub_vmm_device_limits *limits) {
        struct vhub_vmm_device *vd = calloc(1, sizeof(*vd));

        if (!vd)
                return NULL;
        vd->ctx = ctx;
        vd->base = vhub_context_base(ctx);
        vd->ev_rest = evtimer_new(vd->base, rest_cb, vd);
        vd->turn_wait.run = vd_turn_committed;
        vd->ev_redo = evtimer_new(vd->base, vd_redo_cb, vd);
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
        vhub_vmm_socket_foreach_fd(sock, vd_socket_fd_track, vd);
        r = vhub_vmm_listener_new(vd->base, listen_fd, owner_uid, &vd_listener_ops, vd, &vd->listener);
        if (r < 0) {
                vd_free(vd);
                return r;
        }
        vd_fd_note(vd, true, vhub_vmm_listener_fd(vd->listener), "listen");
        vd->list = list;
        TAILQ_INSERT_TAIL(list, vd, link);
        *ret = vd;
        *ret_ops = &vd_face_ops;
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
