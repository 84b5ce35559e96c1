/* SPDX-License-Identifier: MIT */
/*
 * A device's life: add (the first handshake), remove, free, and what it
 * holds (rings, the memory shadow).  Its link to the back-end and its state
 * machine are in vhub-device-link.c, its op queue in vhub-op-engine.c, the
 * op kinds in vhub-op*.c, the calls the model offers in vhub-device-api.c.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhub-backend-channel.h"
#include "vhub-backend-conn.h"
#include "vhub-backend-path.h"
#include "vhub-context.h"
#include "vhub-device-vmm-internal.h"
#include "vhub-fdstore.h"
#include "vhub-log.h"
#include "vhub-model-snapshot.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

static const char *const state_names[_VHUB_DEV_STATE_MAX] = {
        [VHUB_DEV_CONNECTING] = "connecting",
        [VHUB_DEV_READY] = "ready",
        [VHUB_DEV_RUNNING] = "running",
        [VHUB_DEV_STOPPED] = "stopped",
        [VHUB_DEV_DISCONNECTED] = "disconnected",
        [VHUB_DEV_RESTORING] = "connecting",
        [VHUB_DEV_FAILED] = "failed",
};

const char *vhub_device_state_to_string(enum vhub_device_state s) {
        return (unsigned)s < _VHUB_DEV_STATE_MAX ? state_names[s] : "unknown";
}

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

bool vhub_device_is_removing(const struct vhub_device *d) {
        return d->removing;
}

bool vhub_device_is_connected(const struct vhub_device *d) {
        return d->conn && !vhub_bconn_is_lost(d->conn);
}

void vring_close_fds(struct vhub_vring *v) {
        v->kick_fd = vhu_safe_close(v->kick_fd);
        v->call_fd = vhu_safe_close(v->call_fd);
        v->err_fd = vhu_safe_close(v->err_fd);
}

void device_ring_close(struct vhub_device *d, unsigned i) {
        struct vhub_vring *v = &d->vrings[i];

        device_fd_untrack(d, v->kick_fd, "ring%u.kick", i);
        device_fd_untrack(d, v->call_fd, "ring%u.call", i);
        device_fd_untrack(d, v->err_fd, "ring%u.err", i);
        vring_close_fds(v);
        v->configured = false;
}

void device_ring_commit(struct vhub_device *d, struct vhub_vring *src) {
        struct vhub_vring *v = &d->vrings[src->index];

        device_ring_close(d, src->index);
        *v = *src;
        src->kick_fd = src->call_fd = src->err_fd = -1; /* moved */
        device_fd_track(d, v->kick_fd, "ring%u.kick", v->index);
        device_fd_track(d, v->call_fd, "ring%u.call", v->index);
        device_fd_track(d, v->err_fd, "ring%u.err", v->index);
}

void device_set_inflight(struct vhub_device *d, int fd) {
        device_fd_untrack(d, d->inflight_fd, "inflight");
        vhu_safe_close(d->inflight_fd);
        d->inflight_fd = fd;
        device_fd_track(d, d->inflight_fd, "inflight");
}

void vhub_device_foreach_fd(const struct vhub_device *d, const struct vhub_fd_visitor *v) {
        const struct vhub_op *op;

        device_link_foreach_fd(d, v);
        device_fd_visit(d, v, d->inflight_fd, d->fd_group, "inflight");
        for (unsigned i = 0; d->vrings && i < d->queues; i++) {
                const struct vhub_vring *r = &d->vrings[i];

                device_fd_visit(d, v, r->kick_fd, d->fd_group, "ring%u.kick", i);
                device_fd_visit(d, v, r->call_fd, d->fd_group, "ring%u.call", i);
                device_fd_visit(d, v, r->err_fd, d->fd_group, "ring%u.err", i);
        }
        if (d->vmm)
                vmm_foreach_fd(d, v);
        TAILQ_FOREACH(op, &d->ops, link)
                op_foreach_fd(d, op, v);
}

unsigned vring_fds_held(const struct vhub_vring *v) {
        return (v->kick_fd >= 0) + (v->call_fd >= 0) + (v->err_fd >= 0);
}

void vhub_device_fds_changed(void *dev) {
        struct vhub_device *d = dev;

        vhub_fd_budget_vm_changed(d->vm);
}

unsigned vhub_device_fds_held(const struct vhub_device *d) {
        const struct vhub_op *op;
        unsigned n = 0;

        /* the sockets, and the dups their queued messages hold */
        n += d->conn ? 1 + vhub_bconn_queued_fds(d->conn) : 0;
        n += d->channel ? 1 + vhub_backend_channel_queued_fds(d->channel) : 0;
        /* server mode: the listening socket and the directory it is in */
        n += (d->listen_fd >= 0) + (vhub_backend_listener_dir_fd(d->listener) >= 0) + (d->inflight_fd >= 0);
        for (unsigned i = 0; d->vrings && i < d->queues; i++)
                n += vring_fds_held(&d->vrings[i]);
        TAILQ_FOREACH(op, &d->ops, link)
                n += op_fds_held(op);
        return n + vmm_fds_held(d);
}

/* ---- memory shadow: what the back-end has mapped ---- */

bool vhub_device_shadow_has(const struct vhub_device *d, uint64_t id) {
        for (size_t i = 0; i < d->n_shadow; i++)
                if (d->shadow[i] == id)
                        return true;
        return false;
}

bool vhub_device_shadow_is(const struct vhub_device *d, const struct vhub_mem_table *t) {
        if (d->n_shadow != t->n)
                return false;
        for (size_t i = 0; i < t->n; i++)
                if (!vhub_device_shadow_has(d, t->regions[i].id))
                        return false;
        return true;
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

/* ---- add / remove ---- */

void device_announce_removed(struct vhub_device *d) {
        struct vhub_event ev = { .type = VHUB_EV_DEVICE_REMOVED, .vm = d->vm, .device = d->name };

        /* a device.add that failed never announced the device */
        if (!d->handshaken || d->removed_announced)
                return;
        d->removed_announced = true;
        vhub_context_emit(d->vm->ctx, &ev);
}

void device_destroy(struct vhub_device *d) {
        struct vhub_vm *vm = d->vm;
        struct vhub_context *ctx = vm->ctx;

        device_announce_removed(d);
        vhub_vm_unlink_device(vm, d);
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
        /* the front door's socket and VMM go before the back-end */
        vmm_session_free(d);
        device_link_done(d);
        for (unsigned i = 0; d->vrings && i < d->queues; i++)
                device_ring_close(d, i);
        free(d->vrings);
        free(d->shmem_sizes);
        device_set_inflight(d, -1);
        free(d->shadow);
        free(d->socket_path);
        vhub_cred_done(&d->cred);
        if (d->id)
                vhub_fd_group_own(d->vm->ctx, VHUB_FD_GROUP_DEVICE, d->id, 0, false);
        free(d);
}

void vhub_device_add(struct vhub_vm *vm, const struct vhub_device_add_params *p,
                     struct vhub_call *call) {
        const struct vhub_config *cfg = vm->ctx->config;
        struct vhub_error err = { 0 };
        struct vhub_device *d = NULL;
        struct vhub_op *op = NULL;

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
        /* before anything is made: what it would store must fit its uid's
         * share (its fds join its VM's group, a new entry only if the VM
         * has none stored yet; a front door's group is one more) */
        if (vhub_fd_store_check(vm->ctx, vm->uid,
                                (vhub_fdstore_contains(vm->ctx->fdstore, vm->fd_group) ? 0 : 1) +
                                (p->vmm_socket ? VHUB_FRONTDOOR_STORE_ENTRIES : 0), &err) < 0)
                goto fail;
        d = calloc(1, sizeof(*d));
        op = op_new(VHUB_OP_HANDSHAKE, call);
        if (!d || !op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        TAILQ_INIT(&d->ops);
        d->vm = vm;
        d->id = ++vm->ctx->next_device_id;
        vhub_changed(vm->ctx, NULL);    /* the id counter (the daemon's snapshot) */
        /* its fds join its VM's stored group (appended to its stash): a
         * group of its own would cost a push to the manager, and its walk
         * over every stored fd, per device.add (docs/restart.md) */
        snprintf(d->fd_group, sizeof(d->fd_group), "%s", vm->fd_group);
        d->listen_fd = -1;
        d->inflight_fd = -1;
        snprintf(d->name, sizeof(d->name), "%s", p->name);
        snprintf(d->type, sizeof(d->type), "%s", p->type ? p->type : "");
        d->mode = p->mode;
        /* a front-door device is driven by its VMM, whoever added it */
        d->face = p->vmm_socket ? VHUB_FACE_FRONT_DOOR : p->face;
        d->reconnect_ms = p->reconnect_ms;
        d->requested_queues = p->queues;
        d->state = VHUB_DEV_CONNECTING;
        d->stats.state_since_usec = vhub_now_usec();
        d->socket_path = strdup(p->socket_path);
        if (!d->socket_path || vhub_cred_copy(p->cred ? p->cred : &vm->cred, &d->cred) < 0) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        if (p->vmm_socket && vmm_session_new(d, &err) < 0)
                goto fail;
        if (device_link_start(d, &err) < 0)
                goto fail;

        vhub_vm_link_device(vm, d);
        vhub_context_counts_changed(vm->ctx);
        device_log(d, LOG_INFO, NULL, "device added (%s mode, socket %s)",
                   p->mode == VHUB_DEV_MODE_SERVER ? "server" : "client", d->socket_path);
        device_queue_op(d, op);
        return;

fail:
        if (op) {
                op->call = NULL;
                op_free(op);
        }
        if (d)
                vhub_device_free(d);
        vhub_call_fail(call, &err);
}

struct group_fds {
        const char *group;
        int *fds;
        size_t n, cap;
        bool failed;
};

static void collect_group_fd(const struct vhub_fd_info *info, void *userdata) {
        struct group_fds *g = userdata;

        if (g->failed || !info->group || strcmp(info->group, g->group) != 0)
                return;
        if (g->n == g->cap) {
                size_t cap = g->cap ? g->cap * 2 : 16;
                int *p = reallocarray(g->fds, cap, sizeof(*p));

                if (!p) {
                        g->failed = true;
                        return;
                }
                g->fds = p;
                g->cap = cap;
        }
        g->fds[g->n++] = info->fd;
}

/* A device moving out of its VM's fd-store group (vhub_devices_own_groups()). */
struct device_move {
        struct vhub_device *d;
        struct group_fds g;
        char own[VHUB_FD_GROUP_MAX];
};

/* m's fds join the device's own group too (stored with the next sync),
 * which counts for its VM's uid; on failure none does. */
static int move_begin(struct vhub_fdstore *s, struct device_move *m) {
        size_t i;
        int r = 0;

        vhub_device_foreach_fd(m->d, &(struct vhub_fd_visitor){ .visit = collect_group_fd, .userdata = &m->g });
        if (m->g.failed)
                return -ENOMEM;
        vhub_fd_group(m->own, VHUB_FD_GROUP_DEVICE, m->d->id);
        vhub_fd_group_own(m->d->vm->ctx, VHUB_FD_GROUP_DEVICE, m->d->id, m->d->vm->uid, true);
        for (i = 0; i < m->g.n && r >= 0; i++)
                r = vhub_fdstore_group_add(s, m->own, m->g.fds[i]);
        if (r < 0) {
                for (size_t j = 0; j + 1 < i; j++)
                        (void)vhub_fdstore_group_remove(s, m->own, m->g.fds[j]);
                vhub_fd_group_own(m->d->vm->ctx, VHUB_FD_GROUP_DEVICE, m->d->id, 0, false);
        }
        return r;
}

/* Stored in its own group: out of its VM's, and its snapshot says so. */
static void move_end(struct vhub_fdstore *s, struct device_move *m) {
        for (size_t i = 0; i < m->g.n; i++)
                (void)vhub_fdstore_group_remove(s, m->d->fd_group, m->g.fds[i]);
        snprintf(m->d->fd_group, sizeof(m->d->fd_group), "%s", m->own);
        vhub_changed(m->d->vm->ctx, m->d->vm);
}

/* Its own group could not be stored in time: it stays in its VM's. */
static void move_undo(struct vhub_fdstore *s, struct device_move *m) {
        for (size_t i = 0; i < m->g.n; i++)
                (void)vhub_fdstore_group_remove(s, m->own, m->g.fds[i]);
        vhub_fd_group_own(m->d->vm->ctx, VHUB_FD_GROUP_DEVICE, m->d->id, 0, false);
}

/* Whether the store takes n more entries for vm's uid: its share and the
 * store's room (a push past either fails, and a device whose group failed
 * must stay in its VM's). */
static bool move_fits(struct vhub_fdstore *s, const struct vhub_vm *vm, unsigned n) {
        return vhub_fdstore_share_check(s, vm->uid, n) == 0 && vhub_fdstore_room(s) >= n;
}

void vhub_devices_own_groups(struct vhub_context *ctx) {
        struct vhub_fdstore *s = vhub_context_fdstore(ctx);
        struct device_move *moves = NULL, *p;
        size_t n = 0, cap = 0, moved = 0, kept = 0;
        struct vhub_device *d;
        struct vhub_vm *vm;
        int r;

        TAILQ_FOREACH(vm, &ctx->vms, link) {
                unsigned k = 0;

                TAILQ_FOREACH(d, &vm->devices, link)
                        k += strcmp(d->fd_group, vm->fd_group) == 0;
                /* the VM's devices move together or not at all: one that
                 * stays keeps the VM's snapshot compat 2 anyway */
                if (k == 0)
                        continue;
                if (!move_fits(s, vm, k)) {
                        kept += k;
                        continue;
                }
                TAILQ_FOREACH(d, &vm->devices, link) {
                        if (strcmp(d->fd_group, vm->fd_group) != 0)
                                continue;
                        if (n == cap) {
                                cap = cap ? cap * 2 : 16;
                                p = reallocarray(moves, cap, sizeof(*moves));
                                if (!p) {
                                        r = -ENOMEM;
                                        goto undo;
                                }
                                moves = p;
                        }
                        moves[n] = (struct device_move){ .d = d, .g.group = d->fd_group };
                        r = move_begin(s, &moves[n]);
                        if (r < 0) {
                                free(moves[n].g.fds);
                                goto undo;
                        }
                        n++;
                }
                /* stored (and counted for the uid) before the next VM's check */
                vhub_fdstore_sync(s);
        }
        if (kept > 0)
                log_warning("planned restart: %zu devices stay in their VMs' fd-store groups (their uids' share or "
                            "the store has no room for groups of their own): a vhubd of format 1 will not take "
                            "those VMs back", kept);
        if (n == 0)
                return;
        /* in both groups until the manager holds the new ones: never in
         * neither, whatever happens now */
        r = vhub_fdstore_flush(s, VHUB_OWN_GROUPS_FLUSH_MS);
        if (r < 0)
                goto undo;
        for (size_t i = 0; i < n; i++) {
                /* a push that failed or was refused: the device stays */
                if (vhub_fdstore_held(s, moves[i].own)) {
                        move_end(s, &moves[i]);
                        moved++;
                } else {
                        move_undo(s, &moves[i]);
                }
                free(moves[i].g.fds);
        }
        if (moved < n)
                log_warning("planned restart: %zu devices stay in their VMs' fd-store groups (the manager did not "
                            "take their own)", n - moved);
        if (moved > 0)
                log_info("planned restart: %zu devices in groups of their own, as a vhubd of format 1 has them",
                         moved);
        free(moves);
        return;
undo:
        for (size_t i = 0; i < n; i++) {
                move_undo(s, &moves[i]);
                free(moves[i].g.fds);
        }
        free(moves);
        log_warning("planned restart: %zu devices stay in their VMs' fd-store groups (%s): a vhubd of format 1 "
                    "will not take those VMs back (their snapshots say so)", n, strerror(-r));
}

void device_changed(struct vhub_device *d) {
        if (!device_being_added(d))
                vhub_changed(d->vm->ctx, d->vm);
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
        op = op_new(VHUB_OP_REMOVE, call);
        if (!op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                vhub_call_fail(call, &err);
                return;
        }
        d->removing = true;
        vhub_fd_budget_vm_changed(d->vm);   /* queued ops are cancelled below */
        device_link_stop_retrying(d);
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
