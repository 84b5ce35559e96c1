/* SPDX-License-Identifier: MIT */
#include <string.h>

#include "vhub-backend-path.h"
#include "vhub-backend-channel.h"
#include "vhub-context.h"
#include "vhub-device.h"
#include "vhub-log.h"
#include "vhub-socket-watch.h"
#include "vhub-time.h"
#include "vhub-vm.h"

int vhub_context_init(struct vhub_context *ctx, struct event_base *base, struct vhub_config *config) {
        char budget[160];

        memset(ctx, 0, sizeof(*ctx));
        ctx->base = base;
        ctx->config = config;
        TAILQ_INIT(&ctx->vms);
        ctx->start_usec = vhub_now_usec();
        vhub_fd_budget_setup(&ctx->fd_budget, config->limits.fds_per_uid);
        vhub_fd_budget_describe(&ctx->fd_budget, budget, sizeof(budget));
        if (config->limits.fds_per_uid && config->limits.fds_per_uid != ctx->fd_budget.per_uid)
                log_warning("--max-fds-per-uid %u does not fit the fd limit; using %u",
                            config->limits.fds_per_uid, ctx->fd_budget.per_uid);
        log_info("%s", budget);
        ctx->start_realtime_usec = vhub_realtime_usec();
        return vhub_backend_dirs_new(config, &ctx->backend_dirs);
}

void vhub_context_done(struct vhub_context *ctx) {
        struct vhub_vm *vm;

        ctx->shutting_down = true;
        while ((vm = TAILQ_FIRST(&ctx->vms)))
                vhub_vm_free(vm);
        vhub_socket_watch_done(ctx);
        ctx->backend_dirs = vhub_backend_dirs_free(ctx->backend_dirs);
}

void vhub_context_emit(struct vhub_context *ctx, const struct vhub_event *ev) {
        if (ctx->events.emit && !ctx->shutting_down)
                ctx->events.emit(ctx->events.userdata, ev);
}

bool vhub_context_events_congested(struct vhub_context *ctx, const struct vhub_vm *vm) {
        return ctx->events.congested && ctx->events.congested(ctx->events.userdata, vm);
}

void vhub_context_events_drained(struct vhub_context *ctx, struct vhub_vm *vm) {
        struct vhub_device *d;

        if (ctx->n_channels_paused == 0)
                return;
        TAILQ_FOREACH(d, &vm->devices, link)
                if (d->channel)
                        vhub_backend_channel_vmm_caught_up(d->channel);
}

void vhub_context_counts_changed(struct vhub_context *ctx) {
        if (ctx->on_counts_changed && !ctx->shutting_down)
                ctx->on_counts_changed(ctx->counts_userdata);
}

unsigned vhub_context_count_vms(const struct vhub_context *ctx, uid_t uid) {
        const struct vhub_vm *vm;
        unsigned n = 0;

        TAILQ_FOREACH(vm, &ctx->vms, link)
                if (vm->uid == uid)
                        n++;
        return n;
}

const char *vhub_event_type_to_string(enum vhub_event_type t) {
        const char *name = vhub_contract_event_name((int)t);

        return name ? name : "unknown";
}
