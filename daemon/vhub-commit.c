/* SPDX-License-Identifier: MIT */
/* Writing the restart snapshots as the model changes: see vhub-commit.h. */
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <string.h>

#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-fdstore.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-model-snapshot.h"
#include "vhub-snapshot.h"
#include "vhub-vm.h"

bool vhub_commit_enabled(const struct vhub_context *ctx) {
        return ctx->ev_commit != NULL;
}

/* The turn's commit; then what waited for it (queued before it began). */
static void commit_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_context *ctx = userdata;
        uint64_t turn = ctx->commit_turn++;
        struct vhub_commit_wait *w;

        vhub_commit_now(ctx);
        while ((w = TAILQ_FIRST(&ctx->commit_waits)) && w->turn <= turn) {
                TAILQ_REMOVE(&ctx->commit_waits, w, link);
                w->ctx = NULL;
                w->run(w);
        }
        /* (vhub_commit_now() left it active for them) */
        if (TAILQ_EMPTY(&ctx->commit_waits) && TAILQ_EMPTY(&ctx->snap_dirty) && !ctx->snap_daemon_dirty &&
            !ctx->snap_faces_dirty)
                event_del(ctx->ev_commit);
}

void vhub_commit_after(struct vhub_context *ctx, struct vhub_commit_wait *w) {
        w->ctx = ctx;
        w->turn = ctx->commit_turn;
        TAILQ_INSERT_TAIL(&ctx->commit_waits, w, link);
        event_active(ctx->ev_commit, EV_TIMEOUT, 0);
}

void vhub_commit_wait_cancel(struct vhub_commit_wait *w) {
        if (!vhub_commit_waiting(w))
                return;
        TAILQ_REMOVE(&w->ctx->commit_waits, w, link);
        w->ctx = NULL;
}

int vhub_commit_setup(struct vhub_context *ctx) {
        TAILQ_INIT(&ctx->snap_dirty);
        TAILQ_INIT(&ctx->commit_waits);
        if (!vhub_fdstore_enabled(ctx->fdstore) || ctx->ev_commit)
                return 0;
        ctx->ev_commit = event_new(ctx->base, -1, 0, commit_cb, ctx);
        if (!ctx->ev_commit)
                return -ENOMEM;
        vhub_snap_writer_init(&ctx->snap_writer);
        return 0;
}

void vhub_commit_done(struct vhub_context *ctx) {
        struct vhub_commit_wait *w;

        if (!ctx->ev_commit)
                return;
        while ((w = TAILQ_FIRST(&ctx->commit_waits)))
                vhub_commit_wait_cancel(w);
        vhub_event_freep(&ctx->ev_commit);
        vhub_snap_writer_done(&ctx->snap_writer);
}

void vhub_changed(struct vhub_context *ctx, struct vhub_vm *vm) {
        if (!ctx || !ctx->ev_commit || ctx->shutting_down)
                return;
        if (!vm)
                ctx->snap_daemon_dirty = true;
        else if (!vm->snap_dirty && !vm->freeing) {
                vm->snap_dirty = true;
                TAILQ_INSERT_TAIL(&ctx->snap_dirty, vm, snap_link);
        }
        event_active(ctx->ev_commit, EV_TIMEOUT, 0);
}

void vhub_changed_face(struct vhub_context *ctx) {
        if (!ctx || !ctx->ev_commit || ctx->shutting_down)
                return;
        ctx->snap_faces_dirty = true;
        event_active(ctx->ev_commit, EV_TIMEOUT, 0);
}

struct vhub_snap_writer *vhub_commit_writer(struct vhub_context *ctx) {
        vhub_snap_writer_reset(&ctx->snap_writer);
        return &ctx->snap_writer;
}

int vhub_commit_file(struct vhub_context *ctx, struct vhub_snap_file *f, const char *name, bool skip_empty) {
        struct vhub_snap_writer *w = &ctx->snap_writer;
        int r;

        if (w->error)
                return w->error;
        if (f->fd < 0) {
                if (skip_empty && w->len == 0)
                        return 0;
                r = vhub_snap_file_create(name, f);
                if (r < 0)
                        return r;
                /* in the store before anything is written into it (the
                 * manager's copy is the same open file: what is written
                 * later is in it) */
                r = vhub_fdstore_push(ctx->fdstore, f->fd, name);
                if (r < 0) {
                        vhub_snap_file_close(f);
                        return r;
                }
        }
        r = vhub_snap_file_commit(f, w);
        if (r >= 0 && vhub_log_get_level() >= LOG_DEBUG)
                log_debug("snapshot %s written: %zu bytes, generation %llu", name,
                          w->len, (unsigned long long)f->generation);
        return r;
}

void vhub_commit_file_gone(struct vhub_context *ctx, struct vhub_snap_file *f, const char *name) {
        if (f->fd < 0)
                return;
        (void)vhub_fdstore_remove(ctx->fdstore, name);
        vhub_snap_file_close(f);
}

static void vm_commit(struct vhub_vm *vm) {
        char name[VHUB_FD_GROUP_MAX];
        int r;

        vhub_fd_group(name, VHUB_SNAP_GROUP_VM, vm->id);
        vm->snap_serial++;
        r = vhub_vm_serialize(vm, vhub_commit_writer(vm->ctx));
        if (r >= 0)
                r = vhub_commit_file(vm->ctx, &vm->snap, name, false);
        if (r >= 0)
                vm->snap_stored = vm->snap_serial;
        else
                log_warning("VM %s: its restart snapshot was not written: %s", vm->name, strerror(-r));
}

void vhub_commit_now(struct vhub_context *ctx) {
        struct vhub_vm *vm;

        if (!ctx->ev_commit)
                return;
        event_del(ctx->ev_commit);
        /* what a snapshot names is in the store first */
        vhub_fdstore_sync(ctx->fdstore);
        while ((vm = TAILQ_FIRST(&ctx->snap_dirty))) {
                TAILQ_REMOVE(&ctx->snap_dirty, vm, snap_link);
                vm->snap_dirty = false;
                vm_commit(vm);
        }
        if (ctx->snap_daemon_dirty && ctx->commit_daemon) {
                ctx->snap_daemon_dirty = false;
                ctx->commit_daemon(ctx->commit_userdata);
        }
        if (ctx->snap_faces_dirty && ctx->commit_faces) {
                bool all = ctx->snap_faces_all;

                ctx->snap_faces_dirty = ctx->snap_faces_all = false;
                ctx->commit_faces(ctx->commit_userdata, all);
        }
        /* what waits for a commit runs from the loop (commit_cb()) */
        if (!TAILQ_EMPTY(&ctx->commit_waits))
                event_active(ctx->ev_commit, EV_TIMEOUT, 0);
}

void vhub_commit_all_later(struct vhub_context *ctx) {
        struct vhub_vm *vm;

        TAILQ_FOREACH(vm, &ctx->vms, link)
                vhub_changed(ctx, vm);
        vhub_changed(ctx, NULL);
        if (ctx->ev_commit && !ctx->shutting_down)
                ctx->snap_faces_all = true;
        vhub_changed_face(ctx);
}

void vhub_commit_all(struct vhub_context *ctx) {
        vhub_commit_all_later(ctx);
        vhub_commit_now(ctx);
}

void vhub_commit_vm_gone(struct vhub_vm *vm) {
        struct vhub_context *ctx = vm->ctx;
        char name[VHUB_FD_GROUP_MAX];

        if (vm->snap_dirty) {
                TAILQ_REMOVE(&ctx->snap_dirty, vm, snap_link);
                vm->snap_dirty = false;
        }
        if (vm->snap.fd < 0)
                return;
        vhub_fd_group(name, VHUB_SNAP_GROUP_VM, vm->id);
        vhub_commit_file_gone(ctx, &vm->snap, name);
        vhub_changed(ctx, NULL);
}
