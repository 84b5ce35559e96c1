/* SPDX-License-Identifier: MIT */
/*
 * The op engine: a device's FIFO of ops.  One op runs at a time, in stages
 * (op_stage_send() runs the kind's stage, vhub-op.c); a stage queues all its
 * requests at once, and the op moves on when every awaited reply has come
 * (routed here by the back-end connection, in order).  Without REPLY_ACK a
 * GET_FEATURES barrier ends a stage whose last request has no reply of its
 * own.  An op that ends commits or undoes its effect (op_complete()), then
 * the next one runs.
 *
 * Re-entrancy: ending an op runs its completion, which answers a call (the
 * face's done() runs in this stack) and may end the device (destroy_pending,
 * acted on here, after the op is freed).
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "vhub-backend-conn.h"
#include "vhub-context.h"
#include "vhub-device-internal.h"
#include "vhub-fd-budget.h"
#include "vhub-log.h"
#include "vhub-time.h"
#include "vhub-vm.h"

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

bool device_need_reply(const struct vhub_device *d) {
        return dev_has_pf(d, VHU_PF_REPLY_ACK);
}

void device_queue_op(struct vhub_device *d, struct vhub_op *op) {
        vhub_fd_budget_vm_changed(d->vm);   /* an op may own fds (START's rings) */
        TAILQ_INSERT_TAIL(&d->ops, op, link);
        d->n_ops++;
        device_run_head(d);
}

static bool op_unrecorded(const struct vhub_op *op);

/*
 * The snapshot says "busy" before an op's first request is on the wire: a
 * crash from then on is a loss for this device.  Not before: an op that
 * sends nothing (the removal of a device that was never started, a stage
 * with nothing to do) changes nothing a back-end saw until it ends, and
 * its end is written as any change.  Nor for a device.add's handshake: a
 * crash before its answer removes the device whatever the snapshot says
 * (device_being_added()).  A VMM's request waits for the turn's commit
 * instead (op_wait_turn()).  -EIO: that write failed -- the stored snapshot
 * still says idle, and a crash would restore the device as if the back-end
 * had seen nothing -- so nothing is sent: the op fails instead.
 */
static int op_said_busy(struct vhub_device *d, const struct vhub_op *op) {
        struct vhub_vm *vm = d->vm;
        uint64_t serial = vm->snap_serial;

        if (op_unrecorded(op) || (op->kind == VHUB_OP_HANDSHAKE && device_being_added(d)))
                return 0;
        vhub_changed(vm->ctx, vm);
        vhub_commit_now(vm->ctx);
        /* written (no fd store: nothing is), and not stored */
        return vm->snap_serial != serial && vm->snap_stored != vm->snap_serial ? -EIO : 0;
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
        /* (not on the wire while that write fails: a later send tries again) */
        if (!op->on_wire) {
                if (op_said_busy(d, op) < 0)
                        return device_op_error(op, VHUB_ERR_INTERNAL,
                                               vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request),
                                               "the VM's restart snapshot could not be written to say the "
                                               "device is busy: nothing was sent to its back-end");
                op->on_wire = true;
        }
        /* Behind bytes the back-end has not read yet, the message waits
         * holding dups of its fds: they are the VM's uid's to hold, within
         * its fd budget (a back-end that stops reading would otherwise make
         * the daemon hold a dup of every region's fd, per device). */
        if (m->n_fds > 0 && vhub_bconn_write_pending(d->conn)) {
                struct vhub_error budget = { 0 };

                if (vhub_context_check_fds(d->vm->ctx, d->vm->uid, m->n_fds, 0, &budget) < 0)
                        return device_op_error(op, VHUB_ERR_LIMIT,
                                               vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request),
                                               "%s waits for a back-end that does not read: %s",
                                               vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request),
                                               budget.detail);
        }
        r = await ? vhub_bconn_send_awaiting(d->conn, m, tag) : vhub_bconn_send(d->conn, m, tag);
        if (r < 0)
                return device_op_error(op, VHUB_ERR_BACKEND,
                                       vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request),
                                       "cannot send %s: %s",
                                       vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request),
                                       strerror(-r));
        d->stats.requests++;
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

/*
 * A front-door VMM's request the daemon answers itself is not in the VM's
 * snapshot, running or done: it changes nothing a restart restores, and
 * one written at its start and end let a VMM have two snapshots of its VM
 * written per tiny request (tests/bench/bench_trickle.py vmm).  What the
 * face keeps of it (the acked protocol features, the channel) is written
 * once the session is at rest (frontdoor/vhub-vmm-device.c).
 */
static bool op_unrecorded(const struct vhub_op *op) {
        return op->kind == VHUB_OP_PASSTHROUGH && passthrough_is_own(op);
}

/* End op: take it off the queue, let it commit or undo, and go on. */
static void device_end_op(struct vhub_device *d, struct vhub_op *op, int r) {
        bool unrecorded = op_unrecorded(op) && r >= 0;

        vhub_fd_budget_vm_changed(d->vm);   /* its fds move into the device or close */
        TAILQ_REMOVE(&d->ops, op, link);
        d->n_ops--;
        op_complete(d, op, r);
        op_free(op);
        if (!unrecorded)
                vhub_changed(d->vm->ctx, d->vm);
        if (d->destroy_pending) {
                device_destroy(d);
                return;
        }
        device_run_head(d);
}

static void op_run(struct vhub_device *d, struct vhub_op *op) {
        vhub_fd_budget_vm_changed(d->vm);   /* a stage may open fds (the back-end channel) */
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

/* The turn's commit ran (vhub-commit.h): a snapshot stored since the op
 * began to wait says its device is busy; else (that write failed) its
 * first send tries again and fails the op as before (op_said_busy()). */
static void op_turn_committed(struct vhub_commit_wait *w) {
        struct vhub_op *op = (struct vhub_op *)((char *)w - offsetof(struct vhub_op, busy_wait));
        struct vhub_device *d = op->busy_dev;

        if (d->vm->snap_stored > op->busy_serial)
                op->on_wire = true;
        op_run(d, op);
}

/*
 * A VMM's request for the back-end waits for the turn's commit instead of
 * writing its VM's snapshot at its first send: every request read, and
 * every op started, in this wake-up -- other VMMs' of the same VM, a
 * VMM's next one behind an answer -- shares that one write.  Running from
 * here on, it says "busy" in any snapshot serialized.
 */
static bool op_wait_turn(struct vhub_device *d, struct vhub_op *op) {
        struct vhub_context *ctx = d->vm->ctx;

        if (op->kind != VHUB_OP_PASSTHROUGH || passthrough_is_own(op) || op->on_wire ||
            !vhub_commit_enabled(ctx) || ctx->shutting_down)
                return false;
        op->busy_dev = d;
        op->busy_serial = d->vm->snap_serial;
        op->busy_wait.run = op_turn_committed;
        vhub_changed(ctx, d->vm);
        vhub_commit_after(ctx, &op->busy_wait);
        return true;
}

void device_run_head(struct vhub_device *d) {
        struct vhub_op *op = TAILQ_FIRST(&d->ops);

        if (!op || op->running)
                return;
        if (!vhub_device_is_connected(d) && op->kind != VHUB_OP_REMOVE) {
                if (d->state == VHUB_DEV_CONNECTING)
                        return; /* the first connection is still being set up */
                /* a VMM's request waits for the restore (its deadline bounds that) */
                if (op->kind == VHUB_OP_PASSTHROUGH && d->state != VHUB_DEV_FAILED && !d->removing)
                        return;
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
        op->started_usec = vhub_now_usec();
        if (op_wait_turn(d, op))
                return;
        op_run(d, op);      /* the snapshot says "busy" at its first request (op_said_busy()) */
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

void device_on_reply(void *userdata, uint32_t request, uint32_t tag, struct vhu_msg *reply) {
        struct vhub_device *d = userdata;
        struct vhub_op *op = TAILQ_FIRST(&d->ops);

        d->stats.replies++;
        if (!op || !op->running || op->awaiting == 0) {
                device_mark_lost(d, "reply from the back-end that nothing was waiting for");
                return;
        }
        device_log(d, LOG_DEBUG, vhu_request_name(VHU_DIR_FRONTEND, request), "reply to %s",
                   vhu_request_name(VHU_DIR_FRONTEND, request));
        vhub_fd_budget_vm_changed(d->vm);   /* a reply may hand over an fd */
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

/* Fail every op but REMOVE with err; ops keep their order. */
void device_fail_ops(struct vhub_device *d, const struct vhub_error *err) {
        struct vhub_op *op, *next;

        vhub_fd_budget_vm_changed(d->vm);
        for (op = TAILQ_FIRST(&d->ops); op; op = next) {
                next = TAILQ_NEXT(op, link);
                if (op->kind == VHUB_OP_REMOVE)
                        continue;
                vhub_commit_wait_cancel(&op->busy_wait);
                /* a VMM's request runs again after the restore */
                if (op->kind == VHUB_OP_PASSTHROUGH && passthrough_requeue(d, op))
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

void device_ops_lost_for_good(struct vhub_device *d, const struct vhub_error *err) {
        struct vhub_op *op;

        device_fail_ops(d, err);
        if (d->destroy_pending || !d->removing) {
                device_destroy(d);
                return;
        }
        /* a REMOVE waiting for replies (GET_VRING_BASE) that died with the
         * connection: it is done, else it waits forever */
        op = TAILQ_FIRST(&d->ops);
        if (op && op->running && op->kind == VHUB_OP_REMOVE) {
                device_end_op(d, op, 0);
                return;
        }
        device_run_head(d);
}
