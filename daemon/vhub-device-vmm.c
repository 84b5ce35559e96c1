/* SPDX-License-Identifier: MIT */
/*
 * A front-door device's VMM session (docs/front-door.md): opening the
 * device's socket through the front door, the VMM coming and going, the
 * records a restore replays, and the deadline that bounds how long a VMM
 * request may wait on a lost or hung back-end.  The requests themselves are
 * ops (vhub-op-passthrough.c); replaying and stopping the rings are
 * vhub-op-vmm-restore.c.
 */
#include <errno.h>
#include <event2/event.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-device-vmm-internal.h"
#include "vhub-fd-track.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

/* ---- the front door and the device ---- */

void vhub_context_set_vmm_door(struct vhub_context *ctx, const struct vhub_vmm_door *door) {
        ctx->vmm_door = door;
}

const char *vhub_device_name(const struct vhub_device *d) {
        return d->name;
}

const char *vhub_device_vm_name(const struct vhub_device *d) {
        return d->vm->name;
}

uint64_t vhub_device_id(const struct vhub_device *d) {
        return d->id;
}

uid_t vhub_device_uid(const struct vhub_device *d) {
        return d->vm->uid;
}

unsigned vhub_device_backend_timeout_ms(const struct vhub_device *d) {
        return d->vm->ctx->config->backend_timeout_ms;
}

/*
 * Never offered to the VMM although the back-end has them (docs/front-door.md):
 * PAGEFAULT (postcopy through the front door is not designed), XEN_MMAP
 * (supported nowhere here), SHARED_OBJECT (the daemon serves shared objects
 * from the VM's table itself), GPA_ADDRESSES (never acked).
 */
#define VMM_MASKED_PROTOCOL_FEATURES                                                  \
        (VHU_PF_BIT(VHU_PF_PAGEFAULT) | VHU_PF_BIT(VHU_PF_XEN_MMAP) |                 \
         VHU_PF_BIT(VHU_PF_SHARED_OBJECT) | VHU_PF_BIT(VHU_PF_GPA_ADDRESSES))

uint64_t vhub_device_vmm_protocol_features(const struct vhub_device *d) {
        if (!dev_protocol_features_on(d))
                return 0;
        return vhu_protocol_features_consistent(d->protocol_features & ~VMM_MASKED_PROTOCOL_FEATURES);
}

static void vmm_deadline_cb(evutil_socket_t fd, short what, void *userdata);
static void vmm_reopen_cb(evutil_socket_t fd, short what, void *userdata);
static void vmm_emit(struct vhub_device *d, enum vhub_event_type type);

static int session_alloc(struct vhub_device *d) {
        struct vhub_device_vmm *s = calloc(1, sizeof(*s));

        if (!s)
                return -ENOMEM;
        s->d = d;
        s->log_fd = -1;
        vhub_mem_table_init(&s->mem);
        s->ev_deadline = evtimer_new(d->vm->ctx->base, vmm_deadline_cb, d);
        s->ev_reopen = evtimer_new(d->vm->ctx->base, vmm_reopen_cb, d);
        if (!s->ev_deadline || !s->ev_reopen) {
                vhub_event_freep(&s->ev_deadline);
                vhub_event_freep(&s->ev_reopen);
                free(s);
                return -ENOMEM;
        }
        d->vmm = s;
        return 0;
}

/* The session's ring records, once the device's queue count is known. */
static int rings_alloc(struct vhub_device *d) {
        struct vhub_device_vmm *s = d->vmm;

        if (s->rings)
                return 0;
        s->rings = calloc(d->queues ? d->queues : 1, sizeof(*s->rings));
        if (!s->rings)
                return -ENOMEM;
        for (unsigned i = 0; i < d->queues; i++)
                s->rings[i].kick_fd = s->rings[i].call_fd = s->rings[i].err_fd = -1;
        return 0;
}

int vmm_session_new(struct vhub_device *d, struct vhub_error *err) {
        if (!d->vm->ctx->vmm_door)
                return vhub_error_set(err, VHUB_ERR_UNSUPPORTED, "this daemon has no front door (vmm_socket)");
        /* contract: a front-door device's memory comes from its VMM */
        if (d->vm->mem.n > 0)
                return vhub_error_set(err, VHUB_ERR_STATE,
                                      "VM %s has memory regions from vm.memory.add: a front-door device takes "
                                      "its memory from its VMM",
                                      d->vm->name);
        if (session_alloc(d) < 0)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        return 0;
}

/* Whose files the socket and its directories are: the VM's uid.  A VM root
 * made for another uid has root's credentials: that uid with its primary
 * group then (the directories are 0700 and the socket 0600, so the group
 * grants nothing). */
int vmm_owner(const struct vhub_vm *vm, struct vhub_cred *ret) {
        struct passwd pw, *found = NULL;
        char buf[1024];

        if (vm->cred.uid == vm->uid)
                return vhub_cred_copy(&vm->cred, ret);
        *ret = (struct vhub_cred){ .uid = vm->uid, .gid = (gid_t)vm->uid };
        if (getpwuid_r(vm->uid, &pw, buf, sizeof(buf), &found) == 0 && found)
                ret->gid = pw.pw_gid;
        return 0;
}

int vmm_open(struct vhub_device *d, struct vhub_error *err) {
        const struct vhub_vmm_door *door = d->vm->ctx->vmm_door;
        struct vhub_device_vmm *s = d->vmm;
        struct vhub_cred owner;
        int r;

        if (rings_alloc(d) < 0)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        if (!door)
                return vhub_error_set(err, VHUB_ERR_UNSUPPORTED, "this daemon has no front door (vmm_socket)");
        if (vmm_owner(d->vm, &owner) < 0)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        r = door->open(door->userdata, d, &owner, err, &s->face, &s->face_ops, &s->socket_path);
        vhub_cred_done(&owner);
        if (r < 0)
                return r;
        device_log(d, LOG_INFO, NULL, "front door open: a VMM connects to %s", s->socket_path);
        return 0;
}

/*
 * The records' fds are the device's (its fd-store group d<id>, named
 * dev/<uid>/<vm>/<dev>/vmm/...): a restore replays them, so a restart of
 * the daemon must keep them too (docs/architecture.md, "fd names and
 * groups").  Every change goes through these.
 */
static const char *const ring_fd_names[] = { "kick", "call", "err" };

static int *ring_fd_slot(struct vhub_vmm_ring *r, enum vmm_ring_fd which) {
        return which == VMM_RING_KICK ? &r->kick_fd : which == VMM_RING_CALL ? &r->call_fd : &r->err_fd;
}

void vmm_ring_set_fd(struct vhub_device *d, uint32_t index, enum vmm_ring_fd which, int fd) {
        int *slot = ring_fd_slot(&d->vmm->rings[index], which);

        device_fd_untrack(d, *slot, "vmm/ring%u.%s", index, ring_fd_names[which]);
        vhu_safe_close(*slot);
        *slot = fd;
        device_fd_track(d, *slot, "vmm/ring%u.%s", index, ring_fd_names[which]);
}

void vmm_ring_close_fds(struct vhub_device *d, uint32_t index) {
        for (enum vmm_ring_fd w = VMM_RING_KICK; w <= VMM_RING_ERR; w++)
                vmm_ring_set_fd(d, index, w, -1);
}

void vmm_log_fd_set(struct vhub_device *d, int fd) {
        struct vhub_device_vmm *s = d->vmm;

        device_fd_untrack(d, s->log_fd, "vmm/log");
        vhu_safe_close(s->log_fd);
        s->log_fd = fd;
        device_fd_track(d, s->log_fd, "vmm/log");
}

void vmm_mem_replace(struct vhub_device *d, struct vhub_mem_table *t) {
        struct vhub_device_vmm *s = d->vmm;

        for (size_t i = 0; i < s->mem.n; i++)
                device_fd_untrack(d, s->mem.regions[i].fd, "vmm/region/%llu",
                                  (unsigned long long)s->mem.regions[i].id);
        vhub_mem_table_done(&s->mem);
        if (t) {
                s->mem = *t;
                vhub_mem_table_init(t); /* taken */
        }
        for (size_t i = 0; i < s->mem.n; i++)
                device_fd_track(d, s->mem.regions[i].fd, "vmm/region/%llu",
                                (unsigned long long)s->mem.regions[i].id);
}

void vmm_foreach_fd(const struct vhub_device *d, const struct vhub_fd_visitor *v) {
        const struct vhub_device_vmm *s = d->vmm;

        for (unsigned i = 0; s->rings && i < d->queues; i++) {
                device_fd_visit(d, v, s->rings[i].kick_fd, d->fd_group, "vmm/ring%u.kick", i);
                device_fd_visit(d, v, s->rings[i].call_fd, d->fd_group, "vmm/ring%u.call", i);
                device_fd_visit(d, v, s->rings[i].err_fd, d->fd_group, "vmm/ring%u.err", i);
        }
        for (size_t i = 0; i < s->mem.n; i++)
                device_fd_visit(d, v, s->mem.regions[i].fd, d->fd_group, "vmm/region/%llu",
                                (unsigned long long)s->mem.regions[i].id);
        device_fd_visit(d, v, s->log_fd, d->fd_group, "vmm/log");
}

void vmm_records_clear(struct vhub_device *d) {
        struct vhub_device_vmm *s = d->vmm;

        for (unsigned i = 0; s->rings && i < d->queues; i++) {
                vmm_ring_close_fds(d, i);
                s->rings[i] = (struct vhub_vmm_ring){ .kick_fd = -1, .call_fd = -1, .err_fd = -1 };
        }
        vmm_mem_replace(d, NULL);
        vmm_log_fd_set(d, -1);
        s->log_set = s->features_set = s->status_set = s->mtu_set = s->inflight_set = false;
        s->n_config = s->next_config = 0;
        d->acked_features = 0;
}

void vmm_session_free(struct vhub_device *d) {
        struct vhub_device_vmm *s = d->vmm;

        if (!s)
                return;
        if (s->connected)
                vhub_vm_vmm_release(d->vm);
        if (s->face_ops)
                s->face_ops->gone(s->face);
        vmm_records_clear(d);
        vhub_event_freep(&s->ev_deadline);
        vhub_event_freep(&s->ev_reopen);
        free(s->rings);
        free(s->socket_path);
        free(s);
        d->vmm = NULL;
}

unsigned vmm_fds_held(const struct vhub_device *d) {
        const struct vhub_device_vmm *s = d->vmm;
        unsigned n = 0;

        if (!s)
                return 0;
        for (unsigned i = 0; s->rings && i < d->queues; i++)
                n += (s->rings[i].kick_fd >= 0) + (s->rings[i].call_fd >= 0) + (s->rings[i].err_fd >= 0);
        /* and the face's for the device: its socket, the VMM's connection and channel */
        if (s->face_ops && s->face_ops->fds_held)
                n += s->face_ops->fds_held(s->face);
        return n + (unsigned)s->mem.n + (s->log_fd >= 0);
}

/* ---- a restart of the daemon ---- */

int vmm_session_restore(struct vhub_device *d, bool had_vmm) {
        if ((!d->vmm && session_alloc(d) < 0) || rings_alloc(d) < 0)
                return -ENOMEM; /* the session (if any) goes with the device */
        /* a session carried whole (vmm_carry_adopt()) is no VMM that left */
        d->vmm->had_vmm = had_vmm && !d->vmm->face;
        return 0;
}

/* The stale fds of the last run are closed by now (vhubd_init()), and the
 * earlier run's socket removed where a failed adoption knew it (its inode);
 * a listener the manager still holds (its stash not dropped yet) leaves the
 * name in use a moment: tried again until reopen_until_usec. */
static void vmm_reopen_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_device *d = userdata;
        struct vhub_error err = { 0 };
        char reason[400];
        int r;

        if (d->removing || d->vmm->face || d->state == VHUB_DEV_FAILED)
                return;
        r = vmm_open(d, &err);
        if (r == -EADDRINUSE && vhub_now_usec() < d->vmm->reopen_until_usec) {
                struct timeval later = { 0, DEVICE_NAME_RETRY_MS * 1000 };

                device_log(d, LOG_DEBUG, NULL, "front-door socket: %s (the earlier run's listener, not "
                           "dropped by the service manager yet?): tried again", err.detail);
                evtimer_add(d->vmm->ev_reopen, &later);
                return;
        }
        if (r < 0) {
                snprintf(reason, sizeof(reason), "its front-door socket could not be made again: %s", err.detail);
                device_give_up(d, reason);
        }
}

bool vmm_restore_finish(struct vhub_device *d) {
        struct vhub_device_vmm *s = d->vmm;
        struct timeval now = { 0, 0 };

        /* its VMM's session came back whole: the device goes on as any
         * carried device (an outage or a loss then replays the records) */
        if (s->face)
                return false;
        s->reopen_until_usec = device_name_retry_until(d);
        evtimer_add(s->ev_reopen, &now);
        if (s->had_vmm) {
                s->had_vmm = false;
                device_log(d, LOG_INFO, NULL, "its VMM's connection did not survive the daemon's restart");
                vmm_emit(d, VHUB_EV_VMM_DISCONNECTED);
        }
        if (d->state != VHUB_DEV_READY && d->state != VHUB_DEV_RUNNING && d->state != VHUB_DEV_STOPPED)
                return false;   /* an outage or a failure goes on as for any device */
        /* the back-end's rings and memory are a VMM's that is gone: a clean
         * slate for the next, as when a VMM leaves (vmm_stop_complete()) */
        if (d->state != VHUB_DEV_READY)
                device_set_state(d, VHUB_DEV_READY, "its VMM's session did not survive the daemon's restart");
        if (!d->conn) {
                d->restore_lost = true; /* the device's own path: the loss is now */
                return false;
        }
        device_renew_link(d, "its VMM's session did not survive the daemon's restart: a new connection "
                             "for the next VMM");
        return true;
}

/* ---- the VMM comes and goes ---- */

static void vmm_emit(struct vhub_device *d, enum vhub_event_type type) {
        struct vhub_event ev = { .type = type, .vm = d->vm, .device = d->name };

        vhub_context_emit(d->vm->ctx, &ev);
}

void vhub_device_vmm_changed(struct vhub_device *d) {
        vhub_changed(d->vm->ctx, d->vm);
}

void vhub_device_vmm_commit_now(struct vhub_device *d) {
        vhub_changed(d->vm->ctx, d->vm);
        vhub_commit_now(d->vm->ctx);
}

bool vhub_device_vmm_commit_after(struct vhub_device *d, struct vhub_commit_wait *w) {
        struct vhub_context *ctx = d->vm->ctx;

        if (!vhub_commit_enabled(ctx) || ctx->shutting_down)
                return false;
        vhub_changed(ctx, d->vm);
        if (!vhub_commit_waiting(w))
                vhub_commit_after(ctx, w);
        return true;
}

uint64_t vhub_device_vmm_snapshot_serial(const struct vhub_device *d) {
        return d->vm->snap_serial;
}

uint64_t vhub_device_vmm_snapshot_stored(const struct vhub_device *d) {
        return d->vm->snap_stored;
}

void vhub_device_vmm_fds_changed(struct vhub_device *d) {
        vhub_device_fds_changed(d);
}

void vhub_device_vmm_connected(struct vhub_device *d) {
        struct vhub_device_vmm *s = d->vmm;

        if (!s || s->connected)
                return;
        s->connected = true;
        vhub_changed(d->vm->ctx, d->vm); /* the snapshot says a VMM was connected */
        vhub_fd_budget_vm_changed(d->vm);
        /* a connected VMM keeps a lingering VM (docs/front-door.md, "Lifetime") */
        vhub_vm_vmm_hold(d->vm);
        device_log(d, LOG_INFO, NULL, "VMM connected to %s", s->socket_path);
        vmm_emit(d, VHUB_EV_VMM_CONNECTED);
}

/* Drop the VMM's requests that have not run: nobody waits for them.  A
 * running one finishes (its replies stay matched), its answer unused. */
static void vmm_drop_queued(struct vhub_device *d) {
        struct vhub_op *op, *next;
        struct vhub_error err;

        vhub_error_set(&err, VHUB_ERR_STATE, "the VMM left");
        for (op = TAILQ_FIRST(&d->ops); op; op = next) {
                next = TAILQ_NEXT(op, link);
                if (op->kind != VHUB_OP_PASSTHROUGH || op->running)
                        continue;
                TAILQ_REMOVE(&d->ops, op, link);
                d->n_ops--;
                vhub_error_copy(&op->error, &err);
                op->result = -ENOTCONN;
                op_complete(d, op, op->result);
                op_free(op);
        }
}

void vhub_device_vmm_disconnected(struct vhub_device *d) {
        struct vhub_device_vmm *s = d->vmm;
        struct vhub_op *op;

        if (!s || !s->connected)
                return;
        s->connected = false;
        vhub_changed(d->vm->ctx, d->vm);
        vhub_fd_budget_vm_changed(d->vm);       /* the session's records go */
        device_log(d, LOG_INFO, NULL, "VMM left %s; stopping the back-end's rings", s->socket_path);
        vmm_emit(d, VHUB_EV_VMM_DISCONNECTED);
        vmm_drop_queued(d);
        vmm_rearm_deadline(d);
        vhub_vm_vmm_release(d->vm); /* may start the VM's linger timer */
        if (d->removing)
                return;
        /* the rings stop, the memory goes, then the records (vhub-op-vmm-restore.c) */
        s->leaving = true;
        op = op_new(VHUB_OP_VMM_STOP, NULL);
        if (!op) {
                vmm_records_clear(d);
                s->leaving = false;
                device_mark_lost(d, "out of memory stopping the rings the VMM left");
                return;
        }
        device_queue_op(d, op);
}

/* ---- the device's state, as the VMM's rings make it ---- */

void vmm_update_state(struct vhub_device *d, const char *why) {
        bool started = false;
        enum vhub_device_state want;

        for (unsigned i = 0; i < d->queues && !started; i++)
                started = d->vmm->rings[i].started;
        if (d->state == VHUB_DEV_DISCONNECTED || d->state == VHUB_DEV_RESTORING) {
                /* what the restore brings back */
                if (started)
                        d->state_before_loss = VHUB_DEV_RUNNING;
                else if (d->state_before_loss == VHUB_DEV_RUNNING)
                        d->state_before_loss = VHUB_DEV_STOPPED;
                return;
        }
        if (d->state != VHUB_DEV_READY && d->state != VHUB_DEV_RUNNING && d->state != VHUB_DEV_STOPPED)
                return;
        want = started ? VHUB_DEV_RUNNING : d->state == VHUB_DEV_RUNNING ? VHUB_DEV_STOPPED : d->state;
        device_set_state(d, want, why);
}

void vmm_snapshot_rings(struct vhub_device *d) {
        /* behind an IOMMU: IOVAs; packed: no indexes there */
        bool unreadable = features_iommu(d->acked_features) || features_packed(d->acked_features);

        for (unsigned i = 0; i < d->queues; i++) {
                struct vhub_vmm_ring *r = &d->vmm->rings[i];

                r->loss_read = r->started && !unreadable &&
                               vmm_read_guest(d, r->addr.used + 2, &r->loss_used, 2) == 0 &&
                               vmm_read_guest(d, r->addr.avail + 2, &r->loss_avail, 2) == 0;
        }
}

bool vmm_has_rings_to_restore(const struct vhub_device *d) {
        const struct vhub_device_vmm *s = d->vmm;

        if (s->features_set || s->status_set || s->inflight_set || s->log_set || s->mtu_set)
                return true;
        for (unsigned i = 0; i < d->queues; i++) {
                const struct vhub_vmm_ring *r = &s->rings[i];

                if (r->num_set || r->base_set || r->addr_set || r->kick_set || r->call_set ||
                    r->err_set || r->enable_set || r->endian_set)
                        return true;
        }
        return false;
}

/* The VMM's regions are in its own address space: the rings' addresses
 * are looked up by uaddr.  pread, never a mapping (vhub_mem_table_read). */
int vmm_read_guest(const struct vhub_device *d, uint64_t uaddr, void *buf, size_t len) {
        const struct vhub_mem_table *t = &d->vmm->mem;
        ssize_t n;

        for (size_t i = 0; i < t->n; i++) {
                const struct vhub_region *r = &t->regions[i];

                if (uaddr < r->uaddr || uaddr - r->uaddr >= r->size || len > r->size - (uaddr - r->uaddr))
                        continue;
                n = pread(r->fd, buf, len, (off_t)(r->offset + (uaddr - r->uaddr)));
                if (n < 0)
                        return -errno;
                return (size_t)n == len ? 0 : -EIO;
        }
        return -ERANGE;
}

int vmm_relay(struct vhub_device *d, const struct vhu_msg *m, uint64_t token) {
        struct vhub_device_vmm *s = d->vmm;

        if (!s->connected || !s->face_ops)
                return -ENOTCONN;
        return s->face_ops->relay(s->face, m, token);
}

void vhub_device_vmm_relay_answered(struct vhub_device *d, uint64_t token, uint64_t value) {
        (void)vhub_device_backend_reply(d, token, value);
}

/* ---- deadlines ---- */

static bool state_outage(enum vhub_device_state s) {
        return s == VHUB_DEV_DISCONNECTED || s == VHUB_DEV_RESTORING;
}

void vmm_rearm_deadline(struct vhub_device *d) {
        struct vhub_device_vmm *s = d->vmm;
        const struct vhub_op *op;
        uint64_t first = 0, now;

        TAILQ_FOREACH(op, &d->ops, link)
                if (op->kind == VHUB_OP_PASSTHROUGH && !op->vmm_req->answered &&
                    (first == 0 || op->vmm_req->deadline < first))
                        first = op->vmm_req->deadline;
        if (first == 0) {
                evtimer_del(s->ev_deadline);
                return;
        }
        now = vhub_now_usec();
        {
                struct timeval tv = vhub_timeval_from_usec(first > now ? first - now : 0);

                evtimer_add(s->ev_deadline, &tv);
        }
}

/*
 * A request of the VMM waited out its deadline: it is answered from the
 * daemon's records, now.  One that has not run is dropped (its effect is
 * in the records, which the restore replays); one on the wire finishes,
 * its reply unused.  Either way a back-end that made the VMM wait this long
 * is treated as lost -- a restore attempt under way too, so that the next
 * one replays what was just recorded.
 */
static void vmm_deadline_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_device *d = userdata;
        struct vhub_device_vmm *s = d->vmm;
        uint64_t now = vhub_now_usec();
        struct vhub_op *op, *next;
        bool expired = false;

        for (op = TAILQ_FIRST(&d->ops); op; op = next) {
                next = TAILQ_NEXT(op, link);
                if (op->kind != VHUB_OP_PASSTHROUGH)
                        continue;
                if (op->vmm_req->answered && !op->running) {
                        /* answered already (the device failed): nothing more to do */
                        TAILQ_REMOVE(&d->ops, op, link);
                        d->n_ops--;
                        op_free(op);
                        continue;
                }
                if (op->vmm_req->answered || op->vmm_req->deadline > now)
                        continue;
                expired = true;
                device_log(d, LOG_WARNING, REQ(op->vmm_req->msg.hdr.request),
                           "%s from the VMM waited %u ms for the back-end: answered from the daemon's state",
                           REQ(op->vmm_req->msg.hdr.request), d->vm->ctx->config->backend_timeout_ms);
                passthrough_answer_from_state(d, op);
                if (op->running)
                        continue;
                TAILQ_REMOVE(&d->ops, op, link);
                d->n_ops--;
                op_free(op);
        }
        if (expired && d->state != VHUB_DEV_FAILED) {
                /* this outage (or the one the loss below begins) has shown the
                 * back-end will not answer soon: the VMM's next requests are
                 * answered at once until it is over */
                s->outage_expired = true;
                if (vhub_device_is_connected(d))
                        device_mark_lost(d, "a request of the VMM waited out the deadline");
        }
        vmm_rearm_deadline(d);
        device_run_head(d);
}

void vmm_state_changed(struct vhub_device *d, enum vhub_device_state from, enum vhub_device_state to) {
        struct vhub_device_vmm *s = d->vmm;
        struct vhub_op *op;

        if (state_outage(from) && !state_outage(to))
                s->outage_expired = false;
        if (to != VHUB_DEV_FAILED)
                return;
        /* Nothing will come back: the VMM's requests get the daemon's answers
         * now.  They leave the queue from the loop (the deadline's sweep):
         * the caller may be walking it. */
        TAILQ_FOREACH(op, &d->ops, link)
                if (op->kind == VHUB_OP_PASSTHROUGH && !op->vmm_req->answered)
                        passthrough_answer_from_state(d, op);
        event_active(s->ev_deadline, EV_TIMEOUT, 0);
}
