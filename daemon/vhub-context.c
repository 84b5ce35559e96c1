/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "vhub-backend-path.h"
#include "vhub-backend-channel.h"
#include "vhub-commit.h"
#include "vhub-model-snapshot.h"
#include "vhub-context.h"
#include "vhub-device.h"
#include "vhub-fd-track.h"
#include "vhub-fdstore.h"
#include "vhub-log.h"
#include "vhub-owner.h"
#include "vhub-socket-watch.h"
#include "vhub-time.h"
#include "vhub-vm.h"

int vhub_context_init(struct vhub_context *ctx, struct event_base *base, struct vhub_config *config) {
        char budget[160];
        int r;

        memset(ctx, 0, sizeof(*ctx));
        ctx->base = base;
        ctx->config = config;
        TAILQ_INIT(&ctx->vms);
        TAILQ_INIT(&ctx->sinks);
        ctx->start_usec = vhub_now_usec();
        vhub_fd_budget_setup(&ctx->fd_budget, config->limits.fds_per_uid);
        vhub_fd_budget_describe(&ctx->fd_budget, budget, sizeof(budget));
        if (config->limits.fds_per_uid && config->limits.fds_per_uid != ctx->fd_budget.per_uid)
                log_warning("--max-fds-per-uid %u does not fit the fd limit; using %u",
                            config->limits.fds_per_uid, ctx->fd_budget.per_uid);
        log_info("%s", budget);
        ctx->start_realtime_usec = vhub_realtime_usec();
        /* memset left both tables without buckets: done() on them is a no-op */
        if (vhub_fd_ledger_init(&ctx->fd_ledger) < 0 || vhub_hash_init(&ctx->vms_by_name) < 0) {
                r = -ENOMEM;
                goto fail;
        }
        ctx->socket_watcher = vhub_socket_watcher_new(base);
        if (!ctx->socket_watcher) {
                r = -ENOMEM;
                goto fail;
        }
        r = vhub_backend_dirs_new(config, &ctx->backend_dirs);
        if (r < 0)
                goto fail;
        return 0;

fail:
        ctx->socket_watcher = vhub_socket_watcher_free(ctx->socket_watcher);
        vhub_hash_done(&ctx->vms_by_name);
        vhub_fd_ledger_done(&ctx->fd_ledger);
        return r;
}

void vhub_context_done(struct vhub_context *ctx) {
        struct vhub_vm *vm;

        ctx->shutting_down = true;
        while ((vm = TAILQ_FIRST(&ctx->vms)))
                vhub_vm_free(vm);
        ctx->socket_watcher = vhub_socket_watcher_free(ctx->socket_watcher);
        ctx->backend_dirs = vhub_backend_dirs_free(ctx->backend_dirs);
        vhub_hash_done(&ctx->vms_by_name);
        vhub_fd_ledger_done(&ctx->fd_ledger);
}

void vhub_context_destroy_vms(struct vhub_context *ctx) {
        struct vhub_vm *vm, *next;

        for (vm = TAILQ_FIRST(&ctx->vms); vm; vm = next) {
                next = TAILQ_NEXT(vm, link);
                if (!vm->destroying)
                        vhub_vm_destroy(vm, NULL);
        }
}

void vhub_context_crash_unlink(const struct vhub_context *ctx) {
        const struct vhub_device *d;
        const struct vhub_vm *vm;

        /* a server-mode socket never by its path: the uid owns directories on it */
        TAILQ_FOREACH(vm, &ctx->vms, link)
                TAILQ_FOREACH(d, &vm->devices, link)
                        vhub_backend_listener_remove_in_crash(d->listener);
}

void vhub_context_emit(struct vhub_context *ctx, const struct vhub_event *ev) {
        struct vhub_event_sink *sink, *next;
        struct vhub_event stamped;

        if (ctx->shutting_down)
                return;
        /* stamped here, when it happens: every face sends the same time */
        stamped = *ev;
        if (!stamped.timestamp_usec)
                stamped.timestamp_usec = vhub_realtime_usec();
        if (ev->vm) {
                stamped.uid = ev->vm->uid;
                /* what an event tells changed its VM (the context's own:
                 * events carry it const for the sinks) -- but a back-end's
                 * requests, which it sends at will (one VM snapshot per
                 * message, on the loop every VM shares) and which change
                 * nothing a snapshot records: a config change, a request
                 * forwarded to the owner (an awaited one's token and wait
                 * mark the VM themselves, vhub_vm_new_token()) */
                if (ev->type != VHUB_EV_CONFIG_CHANGED && ev->type != VHUB_EV_BACKEND_REQUEST)
                        vhub_changed(ctx, (struct vhub_vm *)ev->vm);
        }
        for (sink = TAILQ_FIRST(&ctx->sinks); sink; sink = next) {
                next = TAILQ_NEXT(sink, link);
                sink->emit(sink->userdata, &stamped);
        }
}

void vhub_context_add_sink(struct vhub_context *ctx, struct vhub_event_sink *sink) {
        TAILQ_INSERT_TAIL(&ctx->sinks, sink, link);
}

void vhub_context_remove_sink(struct vhub_context *ctx, struct vhub_event_sink *sink) {
        TAILQ_REMOVE(&ctx->sinks, sink, link);
}

bool vhub_context_events_congested(struct vhub_context *ctx, const struct vhub_vm *vm) {
        const struct vhub_owner *o = vm->owner;

        return o && o->ops && o->ops->congested && o->ops->congested(o);
}

void vhub_context_events_drained(struct vhub_context *ctx, struct vhub_vm *vm) {
        struct vhub_device *d;

        if (ctx->n_channels_paused == 0)
                return;
        TAILQ_FOREACH(d, &vm->devices, link)
                if (d->channel)
                        vhub_backend_channel_drained(d->channel);
}

void vhub_context_owner_drained(struct vhub_context *ctx, const struct vhub_owner *owner) {
        struct vhub_vm *vm;

        if (ctx->n_channels_paused == 0)
                return;
        TAILQ_FOREACH(vm, &ctx->vms, link)
                if (vm->owner == owner)
                        vhub_context_events_drained(ctx, vm);
}

void vhub_context_owner_gone(struct vhub_context *ctx, const struct vhub_owner *owner) {
        struct vhub_vm *vm, *next;

        for (vm = TAILQ_FIRST(&ctx->vms); vm; vm = next) {
                next = TAILQ_NEXT(vm, link);
                if (vm->owner != owner)
                        continue;
                /* nobody will be behind on its events: channels read again
                 * (from the loop, once the owner is gone) */
                vhub_context_events_drained(ctx, vm);
                vhub_vm_owner_gone(vm);
        }
}

void vhub_context_owner_restored(struct vhub_context *ctx, const struct vhub_owner *owner) {
        struct vhub_vm *vm;

        TAILQ_FOREACH(vm, &ctx->vms, link)
                if (vm->restore_owned && vm->restore_owner_face == owner->face &&
                    vm->restore_owner_id == owner->id) {
                        vm->owner = owner;
                        vm->restore_owned = false;
                }
}

void vhub_context_restore_finish(struct vhub_context *ctx) {
        struct vhub_vm *vm, *next;

        ctx->restoring = false;
        for (vm = TAILQ_FIRST(&ctx->vms); vm; vm = next) {
                next = TAILQ_NEXT(vm, link);
                vhub_vm_restore_finish(vm);
        }
        vhub_context_counts_changed(ctx);
}

bool vhub_context_busy(const struct vhub_context *ctx) {
        const struct vhub_device *d;
        const struct vhub_vm *vm;

        /* a VMM's answer held for the turn's commit (vhub_commit_after()) */
        if (vhub_commit_enabled(ctx) && !TAILQ_EMPTY(&ctx->commit_waits))
                return true;
        TAILQ_FOREACH(vm, &ctx->vms, link) {
                if (!TAILQ_EMPTY(&vm->mem_ops) || vm->log_batch || vm->postcopy_batch)
                        return true;
                TAILQ_FOREACH(d, &vm->devices, link)
                        if (d->n_ops > 0 || vhub_device_channel_busy(d))
                                return true;
        }
        return false;
}

void vhub_context_pause_channels(struct vhub_context *ctx) {
        struct vhub_device *d;
        struct vhub_vm *vm;

        TAILQ_FOREACH(vm, &ctx->vms, link)
                TAILQ_FOREACH(d, &vm->devices, link)
                        if (d->channel)
                                vhub_backend_channel_stop_reading(d->channel);
}

void vhub_context_counts_changed(struct vhub_context *ctx) {
        if (ctx->on_counts_changed && !ctx->shutting_down)
                ctx->on_counts_changed(ctx->counts_userdata);
}

unsigned vhub_context_count_vms(const struct vhub_context *ctx, uid_t uid) {
        return vhub_fd_ledger_vms(&ctx->fd_ledger, uid);
}

struct event_base *vhub_context_base(const struct vhub_context *ctx) {
        return ctx->base;
}

struct vhub_fdstore *vhub_context_fdstore(const struct vhub_context *ctx) {
        return ctx ? ctx->fdstore : NULL;
}

struct fdstore_visit {
        const struct vhub_fd_visitor *v;
};

static void fdstore_fd(int fd, const char *what, const char *stored_as, void *userdata) {
        const struct fdstore_visit *fv = userdata;

        vhub_fd_visit(fv->v, fd, stored_as, "daemon/fd-store/%s", what);
}

void vhub_context_foreach_fd(const struct vhub_context *ctx, const struct vhub_fd_visitor *v) {
        const struct vhub_vm *vm;

        vhub_backend_dirs_foreach_fd(ctx->backend_dirs, v);
        if (ctx->socket_watcher)
                vhub_fd_visit(v, vhub_socket_watcher_fd(ctx->socket_watcher), NULL, "daemon/inotify");
        vhub_fdstore_foreach_fd(ctx->fdstore, fdstore_fd, &(struct fdstore_visit){ v });
        TAILQ_FOREACH(vm, &ctx->vms, link)
                vhub_vm_foreach_fd(vm, v);
}

const struct vhub_fd_budget *vhub_context_fd_budget(const struct vhub_context *ctx) {
        return &ctx->fd_budget;
}

void vhub_context_fd_usage(struct vhub_context *ctx, uid_t uid, struct vhub_fd_usage *u) {
        struct vhub_event_sink *sink;

        *u = (struct vhub_fd_usage){ .uid = uid };
        vhub_fd_usage_add_model(ctx, u);
        TAILQ_FOREACH(sink, &ctx->sinks, link)
                if (sink->count_fds)
                        sink->count_fds(sink->userdata, u);
}

int vhub_context_check_fds(struct vhub_context *ctx, uid_t uid, unsigned n, unsigned slack,
                           struct vhub_error *err) {
        struct vhub_fd_usage u;

        vhub_context_fd_usage(ctx, uid, &u);
        return vhub_fd_budget_check(&ctx->fd_budget, &u, n, slack, err);
}

bool vhub_context_shutting_down(const struct vhub_context *ctx) {
        return ctx->shutting_down;
}

const char *vhub_face_to_string(enum vhub_face f) {
        static const char *const names[_VHUB_FACE_MAX] = {
                [VHUB_FACE_JSON_RPC] = "json-rpc",
                [VHUB_FACE_FRONT_DOOR] = "front-door",
        };

        return (unsigned)f < _VHUB_FACE_MAX ? names[f] : "unknown";
}

const char *vhub_event_type_to_string(enum vhub_event_type t) {
        const char *name = vhub_contract_event_name((int)t);

        return name ? name : "unknown";
}
