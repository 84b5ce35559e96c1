/* SPDX-License-Identifier: MIT */
/*
 * A device's link to its back-end, and the device's state machine.
 *
 * The link is one vhost-user connection (vhub_bconn) at a time: made by
 * connecting (client mode) or accepted on the device's own socket (server
 * mode).  When it is lost the device fails its queued ops and is restored on
 * a new connection: a full handshake, the memory table and, if it ran, a
 * START of every ring; in between it retries with a doubling delay.
 *
 * Every change of state goes through device_set_state(), which does the
 * side work of leaving the old state and entering the new one (the table in
 * docs/architecture.md, "The device state machine"):
 *
 *   connecting      the first handshake (device.add's); no restore
 *   ready, running, stopped
 *                   up: the ops that device.start/stop/reset queue move
 *                   between them
 *   disconnected    an outage: waiting to reconnect (client: a timer and a
 *                   watch on the socket's directory; server: the accept)
 *   restoring       an outage: connected again, the restore ops running
 *                   (device.list says "connecting")
 *   failed          given up: no connection, no retries
 *
 *   up -> disconnected          the loss: state_before_loss, the outage
 *                               begins, the loss counted (device.stats),
 *                               device.disconnected, the reconnect
 *                               scheduled (backoff from reconnect_ms again
 *                               if the last restore lasted)
 *   restoring -> disconnected   a failed attempt: counted, logged rate-limited,
 *                               the next attempt scheduled (backoff doubles)
 *   disconnected -> restoring   connected: the caller queues the restore
 *   restoring -> up             restored: counters, device.reconnected
 *   outage -> not an outage     the socket watch and the retry timer stop
 *   -> failed                   the connection dropped, device.failed
 *   connecting -> ready         device.added
 *   ready, stopped -> running   device.started
 *   running -> stopped, ready   device.stopped
 *   every change                logged "state a -> b (why)", the time of
 *                               the change (since_ms), counts (STATUS=)
 *
 * The file reads top to bottom: the state setter, connecting, loss,
 * reconnecting, restoring and giving up, server mode, start and stop.
 */
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-backend-channel.h"
#include "vhub-backend-conn.h"
#include "vhub-backend-path.h"
#include "vhub-context.h"
#include "vhub-device-vmm-internal.h"
#include "vhub-cred.h"
#include "vhub-device-internal.h"
#include "vhub-fdstore.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-socket-watch.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

static void device_on_lost(void *userdata, bool timeout, uint32_t request, const char *reason);
static void device_schedule_reconnect(struct vhub_device *d);
static void device_attempt_failed(struct vhub_device *d, const char *reason);
static void device_stop_watching(struct vhub_device *d);
static void device_listen_again(struct vhub_device *d);

static const struct vhub_bconn_ops device_bconn_ops = {
        .on_reply = device_on_reply,
        .on_lost = device_on_lost,
        .on_fds_changed = vhub_device_fds_changed,
};

/* ---- the state setter ---- */

/* What a change of state carries besides its reason: a restore's outcome. */
struct state_change {
        const char *why;
        const struct vhub_event_vring *vrings;
        unsigned n_vrings;
        bool exact;
};

static bool state_up(enum vhub_device_state s) {
        return s == VHUB_DEV_READY || s == VHUB_DEV_RUNNING || s == VHUB_DEV_STOPPED;
}

static bool state_outage(enum vhub_device_state s) {
        return s == VHUB_DEV_DISCONNECTED || s == VHUB_DEV_RESTORING;
}

static void device_emit(struct vhub_device *d, enum vhub_event_type type, const struct state_change *c) {
        struct vhub_event ev = {
                .type = type,
                .vm = d->vm,
                .device = d->name,
                .reason = c->why,
        };

        if (type == VHUB_EV_RECONNECTED) {
                ev.reconnects = d->reconnects;
                ev.exact = c->exact;
                ev.vrings = c->vrings;
                ev.n_vrings = c->n_vrings;
        }
        /* the same time as device.stats' last_loss */
        if (type == VHUB_EV_DISCONNECTED)
                ev.timestamp_usec = d->stats.last_loss_realtime_usec;
        /* the lifecycle events carry no reason */
        if (type != VHUB_EV_DISCONNECTED && type != VHUB_EV_FAILED)
                ev.reason = NULL;
        vhub_context_emit(d->vm->ctx, &ev);
}

/* What the rings looked like when the back-end went away (for device.reconnected). */
static void device_snapshot_rings(struct vhub_device *d) {
        if (dev_is_front_door(d)) {
                vmm_snapshot_rings(d);
                return;
        }
        for (unsigned i = 0; i < d->queues; i++) {
                struct vhub_vring *v = &d->vrings[i];

                /* with an IOMMU the ring addresses are IOVAs, and a packed
                 * ring has no indexes there (no restore then) */
                v->loss_read = v->configured && !features_iommu(d->acked_features) &&
                               !features_packed(d->acked_features) &&
                               vhub_mem_table_read(&d->vm->mem, v->used + 2, &v->loss_used, 2) == 0 &&
                               vhub_mem_table_read(&d->vm->mem, v->avail + 2, &v->loss_avail, 2) == 0;
        }
}

/* up -> disconnected: an outage begins. */
static void device_outage_begins(struct vhub_device *d, enum vhub_device_state from,
                                 const struct state_change *c) {
        if (from == VHUB_DEV_RUNNING)
                device_snapshot_rings(d);
        d->state_before_loss = from;
        d->outage_usec = vhub_now_usec();
        d->outage_failures = 0;
        d->stats.losses++;
        d->stats.lost = true;
        d->stats.last_loss_realtime_usec = vhub_realtime_usec();
        snprintf(d->stats.last_loss_reason, sizeof(d->stats.last_loss_reason), "%s", c->why ? c->why : "");
        vhub_log_ratelimit_reset(&d->reconnect_log);
        /* Only a restore that lasted starts the backoff over from
         * reconnect_ms: a back-end that dies again right after each restore
         * keeps backing off. */
        if (vhub_now_usec() - d->restored_usec >= DEVICE_RESTORE_STABLE_USEC)
                d->reconnect_delay_ms = 0;
        device_emit(d, VHUB_EV_DISCONNECTED, c);
}

/* restoring -> up: the outage is over. */
static void device_outage_ends(struct vhub_device *d, const struct state_change *c) {
        device_log(d, LOG_INFO, NULL, "back-end restored after %u failed attempts in %.1f s",
                   d->outage_failures, (double)(vhub_now_usec() - d->outage_usec) / 1e6);
        d->outage_failures = 0;
        vhub_log_ratelimit_reset(&d->reconnect_log);
        d->reconnects++;
        d->restored_usec = vhub_now_usec();
        d->stats.restore_usec = d->restored_usec - d->outage_usec;
        d->stats.restored = true;
        d->reconnect_fast = 0;
        device_emit(d, VHUB_EV_RECONNECTED, c);
}

static void device_change_state(struct vhub_device *d, enum vhub_device_state to,
                                const struct state_change *c) {
        enum vhub_device_state from = d->state;

        if (from == to)
                return;
        /* the steps of every restore attempt: the outage's own lines tell */
        device_log(d, state_outage(from) && state_outage(to) ? LOG_DEBUG : LOG_INFO, NULL,
                   "state %s -> %s%s%s%s", vhub_device_state_to_string(from), vhub_device_state_to_string(to),
                   c->why ? " (" : "", c->why ? c->why : "", c->why ? ")" : "");
        d->state = to;
        d->stats.state_since_usec = vhub_now_usec();
        vhub_changed(d->vm->ctx, d->vm);

        if (state_outage(from) && !state_outage(to)) {
                device_stop_watching(d);
                evtimer_del(d->ev_reconnect);
        }
        if (to == VHUB_DEV_DISCONNECTED) {
                if (from == VHUB_DEV_RESTORING) {
                        device_schedule_reconnect(d);
                        device_attempt_failed(d, c->why);
                } else {
                        if (state_up(from))
                                device_outage_begins(d, from, c);
                        device_schedule_reconnect(d);
                }
        } else if (to == VHUB_DEV_FAILED) {
                device_log(d, LOG_ERR, NULL, "device failed: %s", c->why);
                device_drop_connection(d);
                device_emit(d, VHUB_EV_FAILED, c);
        } else if (from == VHUB_DEV_RESTORING && state_up(to)) {
                device_outage_ends(d, c);
        } else if (from == VHUB_DEV_CONNECTING && to == VHUB_DEV_READY) {
                device_emit(d, VHUB_EV_DEVICE_ADDED, c);
        } else if (to == VHUB_DEV_RUNNING) {
                device_emit(d, VHUB_EV_DEVICE_STARTED, c);
        } else if (from == VHUB_DEV_RUNNING) {
                /* device.stop, or device.reset of a running device */
                device_emit(d, VHUB_EV_DEVICE_STOPPED, c);
        }
        if (dev_is_front_door(d))
                vmm_state_changed(d, from, to);
        vhub_context_counts_changed(d->vm->ctx);
}

void device_set_state(struct vhub_device *d, enum vhub_device_state s, const char *why) {
        device_change_state(d, s, &(struct state_change){ .why = why });
}

/* ---- connecting ---- */

/* fd taken in every case. */
static int device_attach_connection(struct vhub_device *d, int fd) {
        int r;

        vhub_fd_budget_vm_changed(d->vm);
        r = vhub_bconn_new(d->vm->ctx->base, fd, d->vm->ctx->config->backend_timeout_ms,
                           /* the largest op: a START of every ring (7 replies each) */
                           VHUB_MAX_QUEUES * 8 + 64,
                           &device_bconn_ops, d, &d->conn);
        if (r < 0)
                return r;
        device_fd_track(d, vhub_bconn_fd(d->conn), "sock");
        return 0;
}

static int device_connect_client(struct vhub_device *d, struct vhub_error *err) {
        int pfd, fd;

        pfd = vhub_backend_path_open(d->vm->ctx->backend_dirs, &d->cred, d->vm->uid,
                                     d->socket_path, err);
        if (pfd < 0)
                return pfd;
        fd = vhub_backend_path_connect(pfd, &d->cred);
        vhu_safe_close(pfd);
        /* the VM's uid could not connect to it itself */
        if (fd == -EACCES || fd == -EPERM)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "uid %u may not connect to back-end socket %s",
                                      (unsigned)d->cred.uid, d->socket_path);
        if (fd < 0)
                return vhub_error_set_backend(err, VHUB_ERR_BACKEND, d->name, NULL,
                                              "cannot connect to back-end socket %s: %s",
                                              d->socket_path, strerror(-fd));
        return device_attach_connection(d, fd);
}

void device_drop_connection(struct vhub_device *d) {
        vhub_fd_budget_vm_changed(d->vm);
        if (d->conn)
                device_fd_untrack(d, vhub_bconn_fd(d->conn), "sock");
        d->conn = vhub_bconn_free(d->conn);
        device_channel_close(d);
        /* a lost exporter's objects are gone: lookups must not reach it */
        vhub_shared_table_drop_device(&d->vm->shared, d);
        shadow_clear(d);
        d->mem_synced = false;
}

/* ---- loss ---- */

void device_mark_lost(struct vhub_device *d, const char *reason) {
        if (d->conn)
                vhub_bconn_fail(d->conn, false, 0, reason);
}

void device_restore_failed(struct vhub_device *d, const struct vhub_op *op) {
        if (op->give_up)
                device_give_up(d, op->error.detail);
        else if (vhub_device_is_connected(d))
                device_mark_lost(d, op->error.detail); /* retried with backoff */
}

void device_renew_link(struct vhub_device *d, const char *reason) {
        /* not a failing back-end: no backoff, the first attempt at once */
        d->restored_usec = 0;
        d->reconnect_fast = 1;
        device_mark_lost(d, reason);
}

/* Reported once per connection, from the loop (vhub-backend-conn.h). */
static void device_on_lost(void *userdata, bool timeout, uint32_t request, const char *lost_reason) {
        struct vhub_device *d = userdata;
        const char *req = request ? REQ(request) : NULL;
        struct vhub_error err;
        char reason[200];

        /* the connection (which holds lost_reason) is freed below */
        snprintf(reason, sizeof(reason), "%s", lost_reason);
        /* a failed restore attempt is counted and logged rate-limited */
        if (d->state != VHUB_DEV_RESTORING || d->removing)
                device_log(d, LOG_WARNING, req, "back-end lost: %s", reason);
        if (timeout)
                d->stats.timeouts++;
        device_drop_connection(d);
        vhub_error_set_backend(&err, timeout ? VHUB_ERR_TIMEOUT : VHUB_ERR_BACKEND, d->name, req,
                               "device %s: %s", d->name, reason);
        if (!d->handshaken || d->removing) {
                /* device.add still pending, or being removed: no reconnect */
                device_ops_lost_for_good(d, &err);
                return;
        }
        device_fail_ops(d, &err);
        device_set_state(d, VHUB_DEV_DISCONNECTED, reason);
        device_give_up_if_lost(d);
}

void device_give_up_if_lost(struct vhub_device *d) {
        char why[200];

        if (d->state != VHUB_DEV_DISCONNECTED)
                return;
        if (d->reconnect_ms == 0)
                device_give_up(d, "back-end lost and reconnect is disabled (reconnect_ms 0)");
        /* A running device comes back running, its rings restarted where
         * they stopped: no use reconnecting if that cannot be known.  (A
         * front-door device's VMM may stop them meanwhile: its restore
         * decides, vhub-op-vmm-restore.c.) */
        else if (!dev_is_front_door(d) && d->state_before_loss == VHUB_DEV_RUNNING &&
                 !rings_restorable(d, why, sizeof(why)))
                device_give_up(d, why);
}

/* ---- reconnecting ---- */

/* Queue what restores the device after a new connection. */
static void device_queue_restore(struct vhub_device *d) {
        struct vhub_op *hs = op_new(VHUB_OP_HANDSHAKE, NULL);
        /* then the rings: a START of the last device.start's, or a front-door
         * device's VMM session replayed */
        bool rings = dev_is_front_door(d) ? vmm_has_rings_to_restore(d)
                                          : d->state_before_loss == VHUB_DEV_RUNNING;
        struct vhub_op *st = NULL;

        if (rings)
                st = op_new(dev_is_front_door(d) ? VHUB_OP_VMM_RESTORE : VHUB_OP_START, NULL);
        if (!hs || (rings && !st)) {
                op_free(hs);
                op_free(st);
                device_mark_lost(d, "out of memory restoring the device");
                return;
        }
        hs->restore = true;
        hs->restore_continues = st != NULL;
        if (st)
                st->restore = true;
        device_set_state(d, VHUB_DEV_RESTORING, "connected");
        TAILQ_INSERT_HEAD(&d->ops, hs, link);
        d->n_ops++;
        if (st) {
                TAILQ_INSERT_AFTER(&d->ops, hs, st, link);
                d->n_ops++;
        }
        device_run_head(d);
}

/* The reconnect timer; in server mode before the first handshake, the
 * deadline for the first back-end to connect. */
static void device_reconnect_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_device *d = userdata;
        struct vhub_error err = { 0 };

        if (!d->handshaken && d->mode == VHUB_DEV_MODE_SERVER && !d->conn) {
                /* device.add in server mode: nobody connected in time */
                vhub_error_set_backend(&err, VHUB_ERR_TIMEOUT, d->name, NULL,
                                       "no back-end connected to %s within %u ms", d->socket_path,
                                       d->vm->ctx->config->backend_timeout_ms);
                device_ops_lost_for_good(d, &err);
                return;
        }
        if (d->relisten_until_usec && !d->removing && !d->listener) {
                device_listen_again(d);
                return;
        }
        if (d->removing || d->state != VHUB_DEV_DISCONNECTED)
                return;
        if (d->mode == VHUB_DEV_MODE_SERVER)
                return; /* the back-end comes to us */
        if (device_connect_client(d, &err) < 0) {
                device_schedule_reconnect(d);
                device_attempt_failed(d, err.detail);
                return;
        }
        /* connected: quick retries are for a socket not yet listening, not
         * for a back-end that fails its handshake */
        d->reconnect_fast = 0;
        device_log(d, LOG_DEBUG, NULL, "connected to %s; restore attempt %u", d->socket_path,
                   d->outage_failures + 1);
        device_queue_restore(d);
}

/* The back-end's socket was (re)created: reconnect now if disconnected. */
static void device_socket_appeared(void *userdata) {
        struct vhub_device *d = userdata;

        if (d->state != VHUB_DEV_DISCONNECTED || d->removing || d->mode != VHUB_DEV_MODE_CLIENT)
                return;
        device_log(d, LOG_DEBUG, NULL, "%s reappeared; reconnecting now", d->socket_path);
        evtimer_del(d->ev_reconnect);
        /* the name appears at bind(), a moment before the back-end listens:
         * retry every millisecond for a while */
        d->reconnect_fast = 200;
        device_reconnect_cb(-1, 0, d);
}

static void device_watch_socket(struct vhub_device *d) {
        struct vhub_cred_scope scope;
        int r;

        if (d->watch)
                return;
        /* the path is the uid's: resolved (and read permission checked)
         * with the device's identity, as every other operation on its
         * back-end paths, so that it cannot make the daemon watch what it
         * could not watch itself */
        r = vhub_cred_enter(&d->cred, &scope);
        if (r == 0) {
                r = vhub_socket_watch_add(d->vm->ctx->socket_watcher, d->socket_path, device_socket_appeared,
                                          d, &d->watch);
                vhub_cred_leave(&scope);
        }
        if (r < 0)
                device_log(d, LOG_DEBUG, NULL, "cannot watch the directory of %s (%s); timed retries only",
                           d->socket_path, strerror(-r));
}

static void device_stop_watching(struct vhub_device *d) {
        d->watch = vhub_socket_watch_remove(d->watch);
}

/* The next attempt: reconnect_ms after the loss, doubling after each
 * failed attempt up to --reconnect-max-ms; every millisecond for a while
 * after the socket reappeared. */
static void device_schedule_reconnect(struct vhub_device *d) {
        unsigned cap = d->vm->ctx->config->reconnect_max_ms;
        struct timeval tv;

        if (d->mode == VHUB_DEV_MODE_SERVER)
                return;
        device_watch_socket(d);
        if (d->reconnect_fast > 0) {
                d->reconnect_fast--;
                tv = vhub_timeval_from_ms(1);
                evtimer_add(d->ev_reconnect, &tv);
                return;
        }
        if (d->reconnect_delay_ms == 0)
                d->reconnect_delay_ms = d->reconnect_ms;
        else
                d->reconnect_delay_ms = d->reconnect_delay_ms * 2 > cap ? cap : d->reconnect_delay_ms * 2;
        if (d->reconnect_delay_ms > cap)
                d->reconnect_delay_ms = cap;
        tv = vhub_timeval_from_ms(d->reconnect_delay_ms);
        evtimer_add(d->ev_reconnect, &tv);
        d->reconnect_deadline_usec = vhub_now_usec() + (uint64_t)d->reconnect_delay_ms * 1000;
        vhub_changed(d->vm->ctx, d->vm);
}

/* A restore attempt failed (after device_schedule_reconnect(), so the next
 * delay is known).  A back-end can make this happen every few ms: the first
 * is logged, then a summary with the count at most every
 * VHUB_LOG_RATELIMIT_USEC. */
static void device_attempt_failed(struct vhub_device *d, const char *reason) {
        unsigned long long suppressed;
        char next[64] = "waiting for the back-end to connect";

        d->outage_failures++;
        if (!vhub_log_ratelimit(&d->reconnect_log, vhub_now_usec(), &suppressed))
                return;
        if (d->mode == VHUB_DEV_MODE_CLIENT)
                snprintf(next, sizeof(next), "next in %u ms",
                         d->reconnect_fast > 0 ? 1 : d->reconnect_delay_ms);
        if (d->outage_failures == 1)
                device_log(d, LOG_WARNING, NULL, "restore attempt 1 failed: %s; %s", reason, next);
        else
                device_log(d, LOG_WARNING, NULL,
                           "restore still failing: %u failed attempts in %.1f s (%llu not logged); "
                           "last: %s; %s", d->outage_failures,
                           (double)(vhub_now_usec() - d->outage_usec) / 1e6, suppressed, reason, next);
}

/* ---- restoring and giving up ---- */

/* The restore succeeded: back to the state before the loss. */
void device_restored(struct vhub_device *d, const struct vhub_event_vring *vrings, unsigned n,
                     bool exact) {
        device_change_state(d, d->state_before_loss,
                            &(struct state_change){ .why = "restored", .vrings = vrings, .n_vrings = n,
                                                    .exact = exact });
}

/* The back-end came back but refuses what it accepted before. */
void device_give_up(struct vhub_device *d, const char *reason) {
        device_set_state(d, VHUB_DEV_FAILED, reason);
}

void vhub_device_fail_now(struct vhub_device *d, const char *reason) {
        device_give_up(d, reason);
}

/* ---- server mode ---- */

static void device_accept_cb(evutil_socket_t lfd, short what, void *userdata) {
        struct vhub_device *d = userdata;
        int fd;

        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0)
                return;
        if (vhub_device_is_connected(d)) {
                /* one back-end at a time */
                vhu_safe_close(fd);
                return;
        }
        if (d->conn)
                device_drop_connection(d);
        if (device_attach_connection(d, fd) < 0)
                return;
        evtimer_del(d->ev_reconnect);
        device_log(d, LOG_INFO, NULL, "back-end connected to %s", d->socket_path);
        if (!d->handshaken) {
                device_run_head(d); /* the add's handshake waits for this */
                return;
        }
        if (d->state == VHUB_DEV_DISCONNECTED)
                device_queue_restore(d);
}

/* Listen on the device's socket (its fds tracked, accepting). */
static int device_listen_on(struct vhub_device *d, struct vhub_error *err) {
        struct vhub_vm *vm = d->vm;
        char *listen_path = NULL;
        int r;

        r = vhub_backend_path_listen(vm->ctx->backend_dirs, &d->cred, vm->uid, d->socket_path, err,
                                     &d->listener, &listen_path);
        if (r < 0) {
                if (!err->code)
                        vhub_error_set(err, VHUB_ERR_BACKEND, "cannot listen on %s: %s", d->socket_path,
                                       strerror(-r));
                return r;
        }
        d->listen_fd = r;
        free(d->socket_path);
        d->socket_path = listen_path;
        device_fd_track(d, d->listen_fd, "listen");
        device_fd_track(d, vhub_backend_listener_dir_fd(d->listener), "dirfd");
        d->ev_listen = event_new(vm->ctx->base, d->listen_fd, EV_READ | EV_PERSIST, device_accept_cb, d);
        if (!d->ev_listen || event_add(d->ev_listen, NULL) < 0)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        return 0;
}

/* Listen for the device's back-end; it must come within --backend-timeout-ms. */
static int device_listen(struct vhub_device *d, struct vhub_error *err) {
        struct timeval tv;
        int r = device_listen_on(d, err);

        if (r < 0)
                return r;
        tv = vhub_timeval_from_ms(d->vm->ctx->config->backend_timeout_ms);
        evtimer_add(d->ev_reconnect, &tv); /* the first back-end must come in time */
        return 0;
}

/* A restored server-mode device whose listener did not come back whole
 * (docs/restart.md, "A group missing a member"): its socket made again at
 * its path.  The earlier run's listener, out of the group, may be held by
 * the manager a moment yet (the stash's rebuild is asynchronous): the name
 * is then "in use", tried again until relisten_until_usec. */
static void device_listen_again(struct vhub_device *d) {
        struct timeval later = { 0, DEVICE_NAME_RETRY_MS * 1000 };
        struct vhub_error err = { 0 };

        if (device_listen_on(d, &err) >= 0) {
                d->relisten_until_usec = 0;
                device_log(d, LOG_INFO, NULL, "listens again on %s (its listener did not survive the restart)",
                           d->socket_path);
                return;
        }
        if (d->listen_fd < 0 && vhub_now_usec() < d->relisten_until_usec) {
                device_log(d, LOG_DEBUG, NULL, "its socket: %s: tried again", err.detail);
                evtimer_add(d->ev_reconnect, &later);
                return;
        }
        d->relisten_until_usec = 0;
        device_log(d, LOG_WARNING, NULL, "its socket could not be made again after the restart: %s: "
                   "no back-end can connect to it", err.detail);
}

uint64_t device_name_retry_until(const struct vhub_device *d) {
        return vhub_now_usec() + (uint64_t)d->vm->ctx->config->backend_timeout_ms * 1000u;
}

void device_link_relisten(struct vhub_device *d) {
        static const struct timeval now = { 0, 0 };

        d->relisten_until_usec = device_name_retry_until(d);
        evtimer_add(d->ev_reconnect, &now);
}

/* ---- start and stop ---- */

int device_link_start(struct vhub_device *d, struct vhub_error *err) {
        d->ev_reconnect = evtimer_new(d->vm->ctx->base, device_reconnect_cb, d);
        if (!d->ev_reconnect)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        if (d->mode == VHUB_DEV_MODE_CLIENT)
                return device_connect_client(d, err);
        return device_listen(d, err);
}

void device_link_stop_retrying(struct vhub_device *d) {
        if (d->ev_reconnect)
                evtimer_del(d->ev_reconnect);
        device_stop_watching(d);
}

/* ---- a restore (vhub-device-snapshot.c) ---- */

/* A restore's fds are members of the device's group already: one the
 * device does not keep leaves it before it is closed -- or, closed by a
 * constructor that failed (they take their fd in every case), right after
 * (a removal makes no system call). */
static void link_fd_gone(struct vhub_device *d, int fd) {
        if (fd >= 0)
                (void)vhub_fdstore_group_remove(vhub_context_fdstore(d->vm->ctx), d->fd_group, fd);
}

int device_link_restore(struct vhub_device *d, int sock_fd, int chan_fd, int listen_fd,
                        struct vhub_backend_listener *l) {
        int r = 0, fd;

        d->ev_reconnect = evtimer_new(d->vm->ctx->base, device_reconnect_cb, d);
        if (!d->ev_reconnect)
                r = -ENOMEM;
        if (r == 0 && sock_fd >= 0) {
                fd = VHU_TAKE_FD(sock_fd);
                r = device_attach_connection(d, fd);
                if (r == 0)
                        vhub_bconn_set_protocol_features(d->conn, d->protocol_features);
                else
                        link_fd_gone(d, fd);
        }
        if (r == 0 && chan_fd >= 0) {
                fd = VHU_TAKE_FD(chan_fd);
                r = device_channel_open(d, fd);
                if (r < 0)
                        link_fd_gone(d, fd);
        }
        if (listen_fd >= 0 && l) {
                d->listen_fd = VHU_TAKE_FD(listen_fd);
                d->listener = l;
                l = NULL;
                device_fd_track(d, d->listen_fd, "listen");
                device_fd_track(d, vhub_backend_listener_dir_fd(d->listener), "dirfd");
                d->ev_listen = event_new(d->vm->ctx->base, d->listen_fd, EV_READ | EV_PERSIST, device_accept_cb, d);
                if (!d->ev_listen || event_add(d->ev_listen, NULL) < 0)
                        r = r < 0 ? r : -ENOMEM;
        }
        link_fd_gone(d, sock_fd);
        vhu_safe_close(sock_fd);
        link_fd_gone(d, chan_fd);
        vhu_safe_close(chan_fd);
        link_fd_gone(d, listen_fd);
        vhu_safe_close(listen_fd);
        link_fd_gone(d, vhub_backend_listener_dir_fd(l));
        vhub_backend_listener_forget(l);
        return r;
}

void device_link_resume_outage(struct vhub_device *d, unsigned left_ms) {
        struct timeval tv = vhub_timeval_from_ms(left_ms);

        if (d->mode == VHUB_DEV_MODE_SERVER)
                return; /* the back-end comes to us */
        device_watch_socket(d);
        evtimer_add(d->ev_reconnect, &tv);
        d->reconnect_deadline_usec = vhub_now_usec() + (uint64_t)left_ms * 1000;
}

/* The device is being freed: nothing here is used again. */
void device_link_done(struct vhub_device *d) {
        device_drop_connection(d);
        vhub_event_freep(&d->ev_listen);
        vhub_event_freep(&d->ev_reconnect);
        device_stop_watching(d);
        device_fd_untrack(d, d->listen_fd, "listen");
        d->listen_fd = vhu_safe_close(d->listen_fd);
        device_fd_untrack(d, vhub_backend_listener_dir_fd(d->listener), "dirfd");
        d->listener = vhub_backend_listener_free(d->listener, &d->cred);
}

struct link_visit {
        const struct vhub_device *d;
        const struct vhub_fd_visitor *v;
        const char *what;       /* "sock", "chan" */
};

static void link_fd(int fd, const char *part, void *userdata) {
        const struct link_visit *lv = userdata;

        /* the connection's own fd is kept; what it holds for a moment is not */
        if (part)
                device_fd_visit(lv->d, lv->v, fd, NULL, "%s/%s", lv->what, part);
        else
                device_fd_visit(lv->d, lv->v, fd, lv->d->fd_group, "%s", lv->what);
}

void device_link_foreach_fd(const struct vhub_device *d, const struct vhub_fd_visitor *v) {
        if (d->conn)
                vhub_bconn_foreach_fd(d->conn, link_fd, &(struct link_visit){ d, v, "sock" });
        if (d->channel)
                vhub_backend_channel_foreach_fd(d->channel, link_fd, &(struct link_visit){ d, v, "chan" });
        device_fd_visit(d, v, d->listen_fd, d->fd_group, "listen");
        device_fd_visit(d, v, vhub_backend_listener_dir_fd(d->listener), d->fd_group, "dirfd");
}
