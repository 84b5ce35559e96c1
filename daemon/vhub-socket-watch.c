/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdbool.h>
#include <event2/event.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "vhub-context.h"
#include "vhub-cred.h"
#include "vhub-device.h"
#include "vhub-socket-watch.h"
#include "vhub-vm.h"

struct vhub_dir_watch {
        int wd;
        unsigned refs;
};

struct vhub_socket_watcher {
        int fd;
        struct event *ev;
        bool dispatching;       /* inside watch_cb: free only after it */
        bool done_requested;
        struct vhub_dir_watch *watches;
        size_t n, cap;
};

/* Tell every disconnected device whose socket is name in directory wd. */
static void watch_notify(struct vhub_context *ctx, int wd, const char *name) {
        struct vhub_vm *vm;

        TAILQ_FOREACH(vm, &ctx->vms, link) {
                struct vhub_device *d, *next;

                for (d = TAILQ_FIRST(&vm->devices); d; d = next) {
                        char copy[PATH_MAX];

                        next = TAILQ_NEXT(d, link);
                        if (d->watch_wd != wd)
                                continue;
                        snprintf(copy, sizeof(copy), "%s", d->socket_path);
                        if (strcmp(basename(copy), name) == 0)
                                vhub_device_socket_appeared(d);
                }
        }
}

static void watch_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_context *ctx = userdata;
        struct vhub_socket_watcher *w = ctx->socket_watcher;
        char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
        ssize_t n;

        /* One read per wake-up, never "until it is empty": the watched
         * directories are the uids', and a uid can make events (a chmod
         * loop) faster than they are handled.  What is left wakes the loop
         * again after everything else had its turn. */
        w->dispatching = true;
        n = read(fd, buf, sizeof(buf));
        for (char *p = buf; n > 0 && p < buf + n && !w->done_requested;) {
                const struct inotify_event *ie = (const struct inotify_event *)p;

                if (ie->len > 0)
                        watch_notify(ctx, ie->wd, ie->name);
                p += sizeof(*ie) + ie->len;
        }
        w->dispatching = false;
        if (w->done_requested)
                vhub_socket_watch_done(ctx);
}

static struct vhub_socket_watcher *watcher_get(struct vhub_context *ctx) {
        struct vhub_socket_watcher *w = ctx->socket_watcher;

        if (w) {
                w->done_requested = false; /* wanted again before it went */
                return w;
        }
        w = calloc(1, sizeof(*w));
        if (!w)
                return NULL;
        w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (w->fd >= 0)
                w->ev = event_new(ctx->base, w->fd, EV_READ | EV_PERSIST, watch_cb, ctx);
        if (w->fd < 0 || !w->ev || event_add(w->ev, NULL) < 0) {
                if (w->ev)
                        event_free(w->ev);
                if (w->fd >= 0)
                        close(w->fd);
                free(w);
                return NULL;
        }
        ctx->socket_watcher = w;
        return w;
}

int vhub_socket_watch_add(struct vhub_context *ctx, const char *socket_path, const struct vhub_cred *cred) {
        struct vhub_socket_watcher *w = watcher_get(ctx);
        struct vhub_cred_scope scope;
        char dir[PATH_MAX];
        int wd, r;

        if (!w)
                return -ENOMEM;
        snprintf(dir, sizeof(dir), "%s", socket_path);
        /* the path is the uid's: resolved (and read permission checked)
         * with its identity, so that it cannot make the daemon watch what
         * it could not watch itself */
        r = vhub_cred_enter(cred, &scope);
        if (r < 0)
                return r;
        /* the same directory gives the same wd: count references */
        wd = inotify_add_watch(w->fd, dirname(dir), IN_CREATE | IN_MOVED_TO | IN_ATTRIB);
        r = wd < 0 ? -errno : 0;
        vhub_cred_leave(&scope);
        if (r < 0)
                return r;
        for (size_t i = 0; i < w->n; i++)
                if (w->watches[i].wd == wd) {
                        w->watches[i].refs++;
                        return wd;
                }
        if (w->n == w->cap) {
                size_t cap = w->cap ? w->cap * 2 : 8;
                struct vhub_dir_watch *v = reallocarray(w->watches, cap, sizeof(*v));

                if (!v) {
                        inotify_rm_watch(w->fd, wd);
                        return -ENOMEM;
                }
                w->watches = v;
                w->cap = cap;
        }
        w->watches[w->n++] = (struct vhub_dir_watch){ .wd = wd, .refs = 1 };
        return wd;
}

void vhub_socket_watch_remove(struct vhub_context *ctx, int wd) {
        struct vhub_socket_watcher *w = ctx->socket_watcher;

        if (!w || wd < 0)
                return;
        for (size_t i = 0; i < w->n; i++) {
                if (w->watches[i].wd != wd)
                        continue;
                if (--w->watches[i].refs == 0) {
                        inotify_rm_watch(w->fd, wd);
                        w->watches[i] = w->watches[--w->n];
                }
                /* nothing is down any more: hold no fd for it */
                if (w->n == 0)
                        vhub_socket_watch_done(ctx);
                return;
        }
}

void vhub_socket_watch_done(struct vhub_context *ctx) {
        struct vhub_socket_watcher *w = ctx->socket_watcher;

        if (!w)
                return;
        if (w->dispatching) {
                w->done_requested = true;
                return;
        }
        event_free(w->ev);
        close(w->fd);
        free(w->watches);
        free(w);
        ctx->socket_watcher = NULL;
}
