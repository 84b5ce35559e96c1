/* SPDX-License-Identifier: MIT */
/*
 * Device lifecycle: connecting (client or server mode), the op queue, reply
 * dispatch, loss, reconnect and removal.  The stages of each op are in
 * vhub-op*.c, the calls the model offers in vhub-device-api.c.
 */
#include <errno.h>
#include <event2/event.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-backend-channel.h"
#include "vhub-backend-conn.h"
#include "vhub-backend-path.h"
#include "vhub-context.h"
#include "vhub-device-internal.h"
#include "vhub-log.h"
#include "vhub-socket-watch.h"
#include "vhub-time.h"
#include "vhub-vm.h"

static const char *const state_names[_VHUB_DEV_STATE_MAX] = {
        [VHUB_DEV_CONNECTING] = "connecting",
        [VHUB_DEV_READY] = "ready",
        [VHUB_DEV_RUNNING] = "running",
        [VHUB_DEV_STOPPED] = "stopped",
        [VHUB_DEV_DISCONNECTED] = "disconnected",
        [VHUB_DEV_FAILED] = "failed",
};

const char *vhub_device_state_to_string(enum vhub_device_state s) {
        return (unsigned)s < _VHUB_DEV_STATE_MAX ? state_names[s] : "unknown";
}

static void device_run_head(struct vhub_device *d);
static void device_on_lost(void *userdata, bool timeout, uint32_t request, const char *reason);
static void device_on_reply(void *userdata, uint32_t request, uint32_t tag, struct vhu_msg *reply);
static void device_schedule_reconnect(struct vhub_device *d);
static void device_attempt_failed(struct vhub_device *d, const char *reason);
static void device_reconnect_cb(evutil_socket_t fd, short what, void *userdata);
static void device_destroy(struct vhub_device *d);
static void device_fail_ops(struct vhub_device *d, const struct vhub_error *err);

static const struct vhub_bconn_ops device_bconn_ops = {
        .on_reply = device_on_reply,
        .on_lost = device_on_lost,
};

void device_log_at(struct vhub_log_site site, const struct vhub_device *d, int level, const char *request,
                   const char *fmt, ...) {
        const struct vhub_log_about about = {
                .vm = d->vm->name, .device = d->name, .request = request, .has_uid = true, .uid = d->vm->uid,
        };
        va_list ap;

        va_start(ap, fmt);
        vhub_logv_at(site, level, &about, fmt, ap);
        va_end(ap);
}

int device_op_error(struct vhub_op *op, int code, const char *request, const char *fmt, ...) {
        va_list ap;

        if (op->result < 0) /* keep the first failure */
                return op->result;
        va_start(ap, fmt);
        op->result = vhub_error_setv(&op->error, code, fmt, ap);
        va_end(ap);
        op->error.request = request;
        return op->result;
}

void device_set_state(struct vhub_device *d, enum vhub_device_state s) {
        bool retrying = d->handshaken &&
                        (d->state == VHUB_DEV_CONNECTING || d->state == VHUB_DEV_DISCONNECTED) &&
                        (s == VHUB_DEV_CONNECTING || s == VHUB_DEV_DISCONNECTED);

        if (d->state == s)
                return;
        /* the steps of every restore attempt: the outage's own lines tell */
        device_log(d, retrying ? LOG_DEBUG : LOG_INFO, NULL, "state %s -> %s",
                   vhub_device_state_to_string(d->state), vhub_device_state_to_string(s));
        d->state = s;
        vhub_context_counts_changed(d->vm->ctx);
}

bool device_need_reply(const struct vhub_device *d) {
        return dev_has_pf(d, VHU_PF_REPLY_ACK);
}

bool vhub_device_is_connected(const struct vhub_device *d) {
        return d->conn && !vhub_bconn_is_lost(d->conn);
}

void vring_close_fds(struct vhub_vring *v) {
        if (v->kick_fd >= 0)
                close(v->kick_fd);
        if (v->call_fd >= 0)
                close(v->call_fd);
        if (v->err_fd >= 0)
                close(v->err_fd);
        v->kick_fd = v->call_fd = v->err_fd = -1;
}

/* ---- memory shadow: what the back-end has mapped ---- */

bool vhub_device_shadow_has(const struct vhub_device *d, uint64_t id) {
        for (size_t i = 0; i < d->n_shadow; i++)
                if (d->shadow[i] == id)
                        return true;
        return false;
}

void shadow_add(struct vhub_device *d, uint64_t id) {
        if (vhub_device_shadow_has(d, id))
                return;
        if (d->n_shadow == d->cap_shadow) {
                size_t cap = d->cap_shadow ? d->cap_shadow * 2 : 8;
                uint64_t *n = reallocarray(d->shadow, cap, sizeof(*n));

                if (!n) {
                        /* The back-end has it and we cannot record it: treat the
                         * back-end as out of sync, which reconnect repairs. */
                        device_mark_lost(d, "out of memory tracking the back-end's memory table");
                        return;
                }
                d->shadow = n;
                d->cap_shadow = cap;
        }
        d->shadow[d->n_shadow++] = id;
}

void shadow_remove(struct vhub_device *d, uint64_t id) {
        for (size_t i = 0; i < d->n_shadow; i++)
                if (d->shadow[i] == id) {
                        d->shadow[i] = d->shadow[--d->n_shadow];
                        return;
                }
}

void shadow_clear(struct vhub_device *d) {
        d->n_shadow = 0;
}

bool vhub_device_rings_in(const struct vhub_device *d, uint64_t gpa, uint64_t size) {
        if (d->state != VHUB_DEV_RUNNING &&
            !(d->state == VHUB_DEV_DISCONNECTED && d->state_before_loss == VHUB_DEV_RUNNING))
                return false;
        for (unsigned i = 0; i < d->queues; i++) {
                const struct vhub_vring *v = &d->vrings[i];
                uint64_t addrs[3] = { v->desc, v->avail, v->used };

                if (!v->configured)
                        continue;
                for (int k = 0; k < 3; k++)
                        if (addrs[k] >= gpa && addrs[k] - gpa < size)
                                return true;
        }
        return false;
}

/* ---- ops ---- */

struct vhub_op *device_op_new(enum vhub_op_kind kind, struct vhub_call *call) {
        struct vhub_op *op = calloc(1, sizeof(*op));

        if (!op)
                return NULL;
        op->kind = kind;
        op->call = call;
        if (kind == VHUB_OP_SINGLE)
                op->u.single.fd = -1;
        return op;
}

void device_queue_op(struct vhub_device *d, struct vhub_op *op) {
        TAILQ_INSERT_TAIL(&d->ops, op, link);
        d->n_ops++;
        device_run_head(d);
}

static int device_send_msg(struct vhub_device *d, struct vhub_op *op, struct vhu_msg *m, uint32_t tag,
                           bool await) {
        int r;

        if (!d->conn)
                return device_op_error(op, VHUB_ERR_BACKEND,
                                       vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request),
                                       "device %s is not connected", d->name);
        /* A request with a reply of its own never carries NEED_REPLY:
         * libvhost-user echoes the flag in that reply, which would then not
         * be exactly VERSION|REPLY. */
        if (m->hdr.flags & VHU_FLAG_NEED_REPLY) {
                const struct vhu_request_info *info = vhu_request_info(VHU_DIR_FRONTEND, m->hdr.request);

                if (info && (info->reply == VHU_REPLY_ALWAYS ||
                             (info->reply == VHU_REPLY_IF_LOG_SHMFD && dev_has_pf(d, VHU_PF_LOG_SHMFD))))
                        m->hdr.flags &= ~VHU_FLAG_NEED_REPLY;
        }
        r = await ? vhub_bconn_send_awaiting(d->conn, m, tag) : vhub_bconn_send(d->conn, m, tag);
        if (r < 0)
                return device_op_error(op, VHUB_ERR_BACKEND,
                                       vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request),
                                       "cannot send %s: %s",
                                       vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request),
                                       strerror(-r));
        if (r > 0) {
                op->awaiting++;
                op->last_unconfirmed = false;
        } else {
                op->last_unconfirmed = true;
        }
        device_log(d, LOG_DEBUG, vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request), "sent %s%s",
                   vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request), r > 0 ? " (reply due)" : "");
        return 0;
}

int device_send(struct vhub_device *d, struct vhub_op *op, struct vhu_msg *m, uint32_t tag) {
        return device_send_msg(d, op, m, tag, false);
}

int device_send_awaiting(struct vhub_device *d, struct vhub_op *op, struct vhu_msg *m, uint32_t tag) {
        return device_send_msg(d, op, m, tag, true);
}

/* End op: take it off the queue, let it commit or undo, and go on. */
static void device_end_op(struct vhub_device *d, struct vhub_op *op, int r) {
        TAILQ_REMOVE(&d->ops, op, link);
        d->n_ops--;
        op_complete(d, op, r);
        op_free(op);
        if (d->destroy_pending) {
                device_destroy(d);
                return;
        }
        device_run_head(d);
}

static void op_run(struct vhub_device *d, struct vhub_op *op) {
        for (;;) {
                int r;

                op->awaiting = 0;
                op->last_unconfirmed = false;
                r = op_stage_send(d, op);
                if (r < 0 || op->result < 0) {
                        /* requests already queued in this stage are answered
                         * later; wait for them so replies stay matched */
                        if (op->awaiting > 0 && d->conn && !vhub_bconn_is_lost(d->conn))
                                return;
                        device_end_op(d, op, op->result < 0 ? op->result : r);
                        return;
                }
                if (r == OP_STAGE_DONE) {
                        device_end_op(d, op, 0);
                        return;
                }
                if (op->parked)
                        return;
                if (op->last_unconfirmed) {
                        /* No REPLY_ACK: a GET_FEATURES behind them proves the
                         * back-end processed what came before (in order). */
                        struct vhu_msg m;

                        vhu_msg_build_none(&m, VHU_REQ_GET_FEATURES, false);
                        if (device_send(d, op, &m, TAG(TAGK_BARRIER, 0)) < 0) {
                                device_end_op(d, op, op->result);
                                return;
                        }
                }
                if (op->awaiting > 0 || r == OP_STAGE_WAIT)
                        return;
                op->stage++;
        }
}

static void device_run_head(struct vhub_device *d) {
        struct vhub_op *op = TAILQ_FIRST(&d->ops);

        if (!op || op->running)
                return;
        if (!vhub_device_is_connected(d) && op->kind != VHUB_OP_REMOVE) {
                if (d->state == VHUB_DEV_CONNECTING && !d->handshaken)
                        return; /* the connection is still being set up */
                device_op_error(op, VHUB_ERR_BACKEND, NULL,
                                d->state == VHUB_DEV_FAILED
                                        ? "device %s has failed; remove and add it again"
                                        : "device %s is disconnected; its back-end is being reconnected",
                                d->name);
                snprintf(op->error.device, sizeof(op->error.device), "%s", d->name);
                op->running = true;
                device_end_op(d, op, op->result);
                return;
        }
        op->running = true;
        op_run(d, op);
}

bool vhub_device_is_parked(const struct vhub_device *d) {
        const struct vhub_op *op = TAILQ_FIRST(&d->ops);

        return op && op->running && op->parked;
}

void vhub_device_resume_parked(struct vhub_device *d) {
        struct vhub_op *op = TAILQ_FIRST(&d->ops);

        if (op && op->running && op->parked) {
                op->parked = false;
                op_run(d, op);
        }
}

static void device_on_reply(void *userdata, uint32_t request, uint32_t tag, struct vhu_msg *reply) {
        struct vhub_device *d = userdata;
        struct vhub_op *op = TAILQ_FIRST(&d->ops);

        if (!op || !op->running || op->awaiting == 0) {
                device_mark_lost(d, "reply from the back-end that nothing was waiting for");
                return;
        }
        device_log(d, LOG_DEBUG, vhu_request_name(VHU_DIR_FRONTEND, request), "reply to %s",
                   vhu_request_name(VHU_DIR_FRONTEND, request));
        if (TAG_KIND(tag) != TAGK_BARRIER)
                op_on_reply(d, op, request, tag, reply);
        if (--op->awaiting > 0)
                return;
        if (op->result < 0) {
                device_end_op(d, op, op->result);
                return;
        }
        op->stage++;
        op_run(d, op);
}

/* ---- loss, reconnect ---- */

void device_mark_lost(struct vhub_device *d, const char *reason) {
        if (d->conn)
                vhub_bconn_fail(d->conn, false, 0, reason);
}

static void device_drop_connection(struct vhub_device *d) {
        d->conn = vhub_bconn_free(d->conn);
        d->channel = vhub_backend_channel_free(d->channel);
        /* a lost exporter's objects are gone: lookups must not reach it */
        vhub_shared_table_drop_device(&d->vm->shared, d);
        shadow_clear(d);
        d->mem_synced = false;
}

/* Fail every op but REMOVE with err; ops keep their order. */
static void device_fail_ops(struct vhub_device *d, const struct vhub_error *err) {
        struct vhub_op *op, *next;

        for (op = TAILQ_FIRST(&d->ops); op; op = next) {
                next = TAILQ_NEXT(op, link);
                if (op->kind == VHUB_OP_REMOVE)
                        continue;
                if (op->result == 0) {
                        vhub_error_copy(&op->error, err);
                        op->result = vhub_error_errno(err->code);
                }
                TAILQ_REMOVE(&d->ops, op, link);
                d->n_ops--;
                op_complete(d, op, op->result);
                op_free(op);
        }
}

/* What the rings looked like when the back-end went away (for device.reconnected). */
static void device_snapshot_rings(struct vhub_device *d) {
        for (unsigned i = 0; i < d->queues; i++) {
                struct vhub_vring *v = &d->vrings[i];

                /* with an IOMMU the ring addresses are IOVAs (no restore then) */
                v->loss_read = v->configured && !features_iommu(d->acked_features) &&
                               vhub_mem_table_read(&d->vm->mem, v->used + 2, &v->loss_used, 2) == 0 &&
                               vhub_mem_table_read(&d->vm->mem, v->avail + 2, &v->loss_avail, 2) == 0;
        }
}

static void device_on_lost(void *userdata, bool timeout, uint32_t request, const char *lost_reason) {
        struct vhub_device *d = userdata;
        char reason[200];
        struct vhub_error err;
        const char *req = request ? vhu_request_name(VHU_DIR_FRONTEND, request) : NULL;
        struct vhub_event ev = { 0 };
        enum vhub_device_state prev = d->state;
        /* connecting after the first handshake: a restore attempt */
        bool attempt = d->handshaken && !d->removing && prev == VHUB_DEV_CONNECTING;

        /* the connection (which holds lost_reason) is freed below */
        snprintf(reason, sizeof(reason), "%s", lost_reason);
        /* a failed restore attempt is counted and logged rate-limited below */
        if (!attempt)
                device_log(d, LOG_WARNING, req, "back-end lost: %s", reason);
        if (prev == VHUB_DEV_RUNNING)
                device_snapshot_rings(d);
        device_drop_connection(d);
        vhub_error_set_backend(&err, timeout ? VHUB_ERR_TIMEOUT : VHUB_ERR_BACKEND, d->name, req,
                               "device %s: %s", d->name, reason);
        if (prev == VHUB_DEV_READY || prev == VHUB_DEV_RUNNING || prev == VHUB_DEV_STOPPED)
                d->state_before_loss = prev;

        if (!d->handshaken || d->removing) {
                /* device.add still pending, or being removed: no reconnect */
                device_fail_ops(d, &err);
                if (d->destroy_pending || !d->removing) {
                        device_destroy(d);
                        return;
                }
                /* a REMOVE waiting for replies (GET_VRING_BASE) that died with
                 * the connection: it is done, else it waits forever */
                if (TAILQ_FIRST(&d->ops) && TAILQ_FIRST(&d->ops)->running &&
                    TAILQ_FIRST(&d->ops)->kind == VHUB_OP_REMOVE) {
                        device_end_op(d, TAILQ_FIRST(&d->ops), 0);
                        return;
                }
                device_run_head(d);
                return;
        }

        device_fail_ops(d, &err);
        ev.vm = d->vm;
        ev.device = d->name;
        ev.reason = reason;
        /* once per outage: a failed restore attempt is not a new loss */
        if (prev == VHUB_DEV_READY || prev == VHUB_DEV_RUNNING || prev == VHUB_DEV_STOPPED) {
                ev.type = VHUB_EV_DISCONNECTED;
                vhub_context_emit(d->vm->ctx, &ev);
        }
        /* Only a restore that lasted starts the backoff over from
         * reconnect_ms: a failed attempt (a handshake that fails, a back-end
         * that accepts and closes) and a back-end that dies again right
         * after each restore keep backing off. */
        if (!attempt && vhub_now_usec() - d->restored_usec >= DEVICE_RESTORE_STABLE_USEC)
                d->reconnect_delay_ms = 0;
        if (d->reconnect_ms == 0) {
                device_set_state(d, VHUB_DEV_FAILED);
                ev.type = VHUB_EV_FAILED;
                ev.reason = "back-end lost and reconnect is disabled (reconnect_ms 0)";
                vhub_context_emit(d->vm->ctx, &ev);
                return;
        }
        if (!attempt) {
                d->outage_usec = vhub_now_usec();
                d->outage_failures = 0;
                vhub_log_ratelimit_reset(&d->reconnect_log);
        }
        device_set_state(d, VHUB_DEV_DISCONNECTED);
        device_schedule_reconnect(d);
        if (attempt)
                device_attempt_failed(d, reason);
}

static int device_attach_connection(struct vhub_device *d, int fd) {
        int r = vhub_bconn_new(d->vm->ctx->base, fd, d->vm->ctx->config->backend_timeout_ms,
                               /* the largest op: a START of every ring (7 replies each) */
                               VHUB_MAX_QUEUES * 8 + 64,
                               &device_bconn_ops, d, &d->conn);
        if (r < 0) {
                close(fd);
                return r;
        }
        return 0;
}

static int device_connect_client(struct vhub_device *d, struct vhub_error *err) {
        int pfd, fd;

        pfd = vhub_backend_path_open(d->vm->ctx->backend_dirs, &d->vm->cred, d->vm->uid,
                                     d->socket_path, err);
        if (pfd < 0)
                return pfd;
        fd = vhub_backend_path_connect(pfd, &d->vm->cred);
        close(pfd);
        /* the VM's uid could not connect to it itself */
        if (fd == -EACCES || fd == -EPERM)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "uid %u may not connect to back-end socket %s",
                                      (unsigned)d->vm->cred.uid, d->socket_path);
        if (fd < 0)
                return vhub_error_set_backend(err, VHUB_ERR_BACKEND, d->name, NULL,
                                              "cannot connect to back-end socket %s: %s",
                                              d->socket_path, strerror(-fd));
        return device_attach_connection(d, fd);
}

/* Queue what restores the device after a new connection. */
static void device_queue_restore(struct vhub_device *d) {
        struct vhub_op *hs = device_op_new(VHUB_OP_HANDSHAKE, NULL);
        struct vhub_op *st = NULL;

        if (d->state_before_loss == VHUB_DEV_RUNNING)
                st = device_op_new(VHUB_OP_START, NULL);
        if (!hs || (d->state_before_loss == VHUB_DEV_RUNNING && !st)) {
                free(hs);
                free(st);
                device_mark_lost(d, "out of memory restoring the device");
                return;
        }
        hs->restore = true;
        if (st)
                st->restore = true;
        device_set_state(d, VHUB_DEV_CONNECTING);
        TAILQ_INSERT_HEAD(&d->ops, hs, link);
        d->n_ops++;
        if (st) {
                TAILQ_INSERT_AFTER(&d->ops, hs, st, link);
                d->n_ops++;
        }
        device_run_head(d);
}

static void device_reconnect_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_device *d = userdata;
        struct vhub_error err = { 0 };

        if (!d->handshaken && d->mode == VHUB_DEV_MODE_SERVER && !d->conn) {
                /* device.add in server mode: nobody connected in time */
                struct vhub_error e;

                vhub_error_set_backend(&e, VHUB_ERR_TIMEOUT, d->name, NULL,
                                       "no back-end connected to %s within %u ms", d->socket_path,
                                       d->vm->ctx->config->backend_timeout_ms);
                device_fail_ops(d, &e);
                if (d->destroy_pending)
                        device_destroy(d);
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

static void device_stop_watching(struct vhub_device *d) {
        if (d->watch_wd >= 0)
                vhub_socket_watch_remove(d->vm->ctx, d->watch_wd);
        d->watch_wd = -1;
}

void vhub_device_socket_appeared(struct vhub_device *d) {
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
        int wd;

        if (d->watch_wd >= 0)
                return;
        wd = vhub_socket_watch_add(d->vm->ctx, d->socket_path, &d->vm->cred);
        if (wd < 0) {
                device_log(d, LOG_DEBUG, NULL, "cannot watch the directory of %s (%s); timed retries only",
                           d->socket_path, strerror(-wd));
                return;
        }
        d->watch_wd = wd;
}

static void device_schedule_reconnect(struct vhub_device *d) {
        unsigned cap = d->vm->ctx->config->reconnect_max_ms;
        struct timeval tv;

        if (d->mode == VHUB_DEV_MODE_SERVER)
                return;
        device_watch_socket(d);
        if (d->reconnect_fast > 0) {
                d->reconnect_fast--;
                tv = (struct timeval){ .tv_sec = 0, .tv_usec = 1000 };
                evtimer_add(d->ev_reconnect, &tv);
                return;
        }
        if (d->reconnect_delay_ms == 0)
                d->reconnect_delay_ms = d->reconnect_ms;
        else
                d->reconnect_delay_ms = d->reconnect_delay_ms * 2 > cap ? cap : d->reconnect_delay_ms * 2;
        if (d->reconnect_delay_ms > cap)
                d->reconnect_delay_ms = cap;
        tv = (struct timeval){ .tv_sec = d->reconnect_delay_ms / 1000,
                               .tv_usec = (d->reconnect_delay_ms % 1000) * 1000 };
        evtimer_add(d->ev_reconnect, &tv);
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

/* The restore succeeded: back to the state before the loss. */
void device_restored(struct vhub_device *d, const struct vhub_event_vring *vrings, unsigned n,
                     bool exact) {
        struct vhub_event ev = { 0 };

        device_log(d, LOG_INFO, NULL, "back-end restored after %u failed attempts in %.1f s",
                   d->outage_failures, (double)(vhub_now_usec() - d->outage_usec) / 1e6);
        d->outage_failures = 0;
        vhub_log_ratelimit_reset(&d->reconnect_log);
        d->reconnects++;
        d->restored_usec = vhub_now_usec();
        d->reconnect_fast = 0;
        device_stop_watching(d);
        device_set_state(d, d->state_before_loss);
        ev.type = VHUB_EV_RECONNECTED;
        ev.vm = d->vm;
        ev.device = d->name;
        ev.reconnects = d->reconnects;
        ev.exact = exact;
        ev.vrings = vrings;
        ev.n_vrings = n;
        vhub_context_emit(d->vm->ctx, &ev);
}

/* The back-end came back but refuses what it accepted before. */
void device_give_up(struct vhub_device *d, const char *reason) {
        struct vhub_event ev = { 0 };

        device_log(d, LOG_ERR, NULL, "device failed: %s", reason);
        device_drop_connection(d);
        device_stop_watching(d);
        evtimer_del(d->ev_reconnect);
        device_set_state(d, VHUB_DEV_FAILED);
        ev.type = VHUB_EV_FAILED;
        ev.vm = d->vm;
        ev.device = d->name;
        ev.reason = reason;
        vhub_context_emit(d->vm->ctx, &ev);
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
                close(fd);
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

/* ---- add / remove ---- */

static void device_destroy(struct vhub_device *d) {
        struct vhub_vm *vm = d->vm;
        struct vhub_context *ctx = vm->ctx;

        TAILQ_REMOVE(&vm->devices, d, link);
        vm->n_devices--;
        ctx->n_devices--;
        device_log(d, LOG_INFO, NULL, "device removed");
        vhub_device_free(d);
        vhub_context_counts_changed(ctx);
        vhub_vm_device_gone(vm); /* may free the VM: last */
}

void vhub_device_free(struct vhub_device *d) {
        struct vhub_error err;
        struct vhub_op *op;

        if (!d)
                return;
        vhub_error_set_backend(&err, VHUB_ERR_NO_DEVICE, d->name, NULL, "device %s was removed",
                               d->name);
        while ((op = TAILQ_FIRST(&d->ops))) {
                TAILQ_REMOVE(&d->ops, op, link);
                if (op->result == 0) {
                        vhub_error_copy(&op->error, &err);
                        op->result = -ENOENT;
                }
                op_complete(d, op, op->result);
                op_free(op);
        }
        d->conn = vhub_bconn_free(d->conn);
        d->channel = vhub_backend_channel_free(d->channel);
        if (d->vm)
                vhub_shared_table_drop_device(&d->vm->shared, d);
        if (d->ev_listen)
                event_free(d->ev_listen);
        if (d->ev_reconnect)
                event_free(d->ev_reconnect);
        device_stop_watching(d);
        if (d->listen_fd >= 0)
                close(d->listen_fd);
        d->listener = vhub_backend_listener_free(d->listener, &d->vm->cred);
        for (unsigned i = 0; d->vrings && i < d->queues; i++)
                vring_close_fds(&d->vrings[i]);
        free(d->vrings);
        free(d->shmem_sizes);
        if (d->inflight_fd >= 0)
                close(d->inflight_fd);
        free(d->shadow);
        free(d->socket_path);
        free(d);
}

void vhub_device_add(struct vhub_vm *vm, const struct vhub_device_add_params *p,
                     struct vhub_call *call) {
        const struct vhub_config *cfg = vm->ctx->config;
        struct vhub_error err = { 0 };
        struct vhub_device *d = NULL;
        struct vhub_op *op = NULL;
        char *listen_path = NULL;
        int r;

        if (vhub_vm_find_device(vm, p->name)) {
                vhub_error_set(&err, VHUB_ERR_EXISTS, "device %s already exists in VM %s", p->name,
                               vm->name);
                goto fail;
        }
        if (vm->n_devices >= cfg->limits.devices_per_vm) {
                vhub_error_set(&err, VHUB_ERR_LIMIT, "VM %s already has %u devices (the limit)",
                               vm->name, vm->n_devices);
                goto fail;
        }
        if (vm->destroying) {
                vhub_error_set(&err, VHUB_ERR_STATE, "VM %s is being destroyed", vm->name);
                goto fail;
        }
        d = calloc(1, sizeof(*d));
        op = device_op_new(VHUB_OP_HANDSHAKE, call);
        if (!d || !op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        TAILQ_INIT(&d->ops);
        d->vm = vm;
        d->listen_fd = -1;
        d->inflight_fd = -1;
        d->watch_wd = -1;
        snprintf(d->name, sizeof(d->name), "%s", p->name);
        snprintf(d->type, sizeof(d->type), "%s", p->type ? p->type : "");
        d->mode = p->mode;
        d->reconnect_ms = p->reconnect_ms;
        d->requested_queues = p->queues;
        d->state = VHUB_DEV_CONNECTING;
        d->socket_path = strdup(p->socket_path);
        d->ev_reconnect = evtimer_new(vm->ctx->base, device_reconnect_cb, d);
        if (!d->socket_path || !d->ev_reconnect) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }

        if (p->mode == VHUB_DEV_MODE_CLIENT) {
                r = device_connect_client(d, &err);
                if (r < 0)
                        goto fail;
        } else {
                r = vhub_backend_path_listen(vm->ctx->backend_dirs, &vm->cred, vm->uid,
                                             p->socket_path, &err, &d->listener, &listen_path);
                if (r < 0) {
                        if (!err.code)
                                vhub_error_set(&err, VHUB_ERR_BACKEND, "cannot listen on %s: %s",
                                               p->socket_path, strerror(-r));
                        goto fail;
                }
                d->listen_fd = r;
                free(d->socket_path);
                d->socket_path = listen_path;
                listen_path = NULL;
                d->ev_listen = event_new(vm->ctx->base, d->listen_fd, EV_READ | EV_PERSIST,
                                         device_accept_cb, d);
                if (!d->ev_listen || event_add(d->ev_listen, NULL) < 0) {
                        vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                        goto fail;
                } else {
                        unsigned ms = cfg->backend_timeout_ms;
                        struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };

                        evtimer_add(d->ev_reconnect, &tv); /* the first back-end must come in time */
                }
        }

        TAILQ_INSERT_TAIL(&vm->devices, d, link);
        vm->n_devices++;
        vm->ctx->n_devices++;
        vhub_context_counts_changed(vm->ctx);
        device_log(d, LOG_INFO, NULL, "device added (%s mode, socket %s)",
                   p->mode == VHUB_DEV_MODE_SERVER ? "server" : "client", d->socket_path);
        device_queue_op(d, op);
        return;

fail:
        free(listen_path);
        if (op) {
                op->call = NULL;
                op_free(op);
        }
        if (d)
                vhub_device_free(d);
        vhub_call_fail(call, &err);
}

void vhub_device_remove(struct vhub_device *d, struct vhub_call *call) {
        struct vhub_op *op, *next;
        struct vhub_error err;

        if (d->removing) {
                vhub_error_set(&err, VHUB_ERR_NO_DEVICE, "device %s is already being removed",
                               d->name);
                vhub_call_fail(call, &err);
                return;
        }
        op = device_op_new(VHUB_OP_REMOVE, call);
        if (!op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                vhub_call_fail(call, &err);
                return;
        }
        d->removing = true;
        evtimer_del(d->ev_reconnect);
        device_stop_watching(d);
        /* cancel everything not yet running; a running op finishes (bounded
         * by the back-end timeout) so that replies stay matched */
        vhub_error_set_backend(&err, VHUB_ERR_NO_DEVICE, d->name, NULL,
                               "device %s is being removed", d->name);
        for (struct vhub_op *o = TAILQ_FIRST(&d->ops); o; o = next) {
                next = TAILQ_NEXT(o, link);
                if (o->running)
                        continue;
                vhub_error_copy(&o->error, &err);
                o->result = -ENOENT;
                TAILQ_REMOVE(&d->ops, o, link);
                d->n_ops--;
                op_complete(d, o, o->result);
                op_free(o);
        }
        device_queue_op(d, op);
}


int vhub_device_backend_reply(struct vhub_device *d, uint64_t token, uint64_t result) {
        if (!d->channel)
                return -ENOENT;
        return vhub_backend_channel_reply(d->channel, token, result);
}
