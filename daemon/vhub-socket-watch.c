/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <libgen.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/queue.h>
#include <unistd.h>

#include "vhub-socket-watch.h"
#include "vhu-fd.h"

struct vhub_socket_watch {
        LIST_ENTRY(vhub_socket_watch) link;
        struct vhub_socket_watcher *w;
        int wd;                         /* its directory's (shared by the sockets in it) */
        char *name;                     /* the socket's file name in that directory */
        vhub_socket_appeared_fn fn;
        void *userdata;
        bool removed;                   /* removed during a dispatch: freed after it */
};

struct vhub_socket_watcher {
        struct event_base *base;
        int fd;                         /* -1 while nothing is watched */
        struct event *ev;
        bool dispatching;               /* inside watch_cb: removed watches wait */
        LIST_HEAD(, vhub_socket_watch) watches;
};

int vhub_socket_watcher_fd(const struct vhub_socket_watcher *w) {
        return w->fd;
}

/* Whether any watch that was not removed is in directory wd (wd < 0: in any). */
static bool watcher_uses(const struct vhub_socket_watcher *w, int wd) {
        const struct vhub_socket_watch *x;

        LIST_FOREACH(x, &w->watches, link)
                if (!x->removed && (wd < 0 || x->wd == wd))
                        return true;
        return false;
}

/* Nothing is watched any more: hold no fd for it. */
static void watcher_close(struct vhub_socket_watcher *w) {
        if (w->ev)
                event_free(w->ev);
        w->ev = NULL;
        w->fd = vhu_safe_close(w->fd);
}

static int watcher_open(struct vhub_socket_watcher *w, void (*cb)(evutil_socket_t, short, void *)) {
        if (w->fd >= 0)
                return 0;
        w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (w->fd < 0)
                return -errno;
        w->ev = event_new(w->base, w->fd, EV_READ | EV_PERSIST, cb, w);
        if (!w->ev || event_add(w->ev, NULL) < 0) {
                watcher_close(w);
                return -ENOMEM;
        }
        return 0;
}

static void watch_free(struct vhub_socket_watch *x) {
        struct vhub_socket_watcher *w = x->w;

        LIST_REMOVE(x, link);
        /* the directory's watch goes with the last socket in it */
        if (w->fd >= 0 && !watcher_uses(w, x->wd))
                (void)inotify_rm_watch(w->fd, x->wd);
        free(x->name);
        free(x);
}

/* Free what was removed during a dispatch; close the instance if idle. */
static void watcher_sweep(struct vhub_socket_watcher *w) {
        struct vhub_socket_watch *x, *next;

        for (x = LIST_FIRST(&w->watches); x; x = next) {
                next = LIST_NEXT(x, link);
                if (x->removed)
                        watch_free(x);
        }
        if (!watcher_uses(w, -1))
                watcher_close(w);
}

static void watch_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_socket_watcher *w = userdata;
        char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
        ssize_t n;

        /* One read per wake-up, never "until it is empty": the watched
         * directories are the uids', and a uid can make events (a chmod
         * loop) faster than they are handled.  What is left wakes the loop
         * again after everything else had its turn. */
        w->dispatching = true;
        n = read(fd, buf, sizeof(buf));
        for (char *p = buf; n > 0 && p < buf + n;) {
                const struct inotify_event *ie = (const struct inotify_event *)p;
                struct vhub_socket_watch *x;

                /* a callback may add watches (at the head) or remove any */
                LIST_FOREACH(x, &w->watches, link)
                        if (ie->len > 0 && !x->removed && x->wd == ie->wd && strcmp(x->name, ie->name) == 0)
                                x->fn(x->userdata);
                p += sizeof(*ie) + ie->len;
        }
        w->dispatching = false;
        watcher_sweep(w);
}

struct vhub_socket_watcher *vhub_socket_watcher_new(struct event_base *base) {
        struct vhub_socket_watcher *w = calloc(1, sizeof(*w));

        if (!w)
                return NULL;
        w->base = base;
        w->fd = -1;
        LIST_INIT(&w->watches);
        return w;
}

struct vhub_socket_watcher *vhub_socket_watcher_free(struct vhub_socket_watcher *w) {
        if (!w)
                return NULL;
        while (!LIST_EMPTY(&w->watches))
                watch_free(LIST_FIRST(&w->watches));
        watcher_close(w);
        free(w);
        return NULL;
}

int vhub_socket_watch_add(struct vhub_socket_watcher *w, const char *socket_path,
                          vhub_socket_appeared_fn fn, void *userdata, struct vhub_socket_watch **ret) {
        char dir[PATH_MAX], file[PATH_MAX];
        struct vhub_socket_watch *x;
        int r, wd;

        r = watcher_open(w, watch_cb);
        if (r < 0)
                return r;
        snprintf(dir, sizeof(dir), "%s", socket_path);
        snprintf(file, sizeof(file), "%s", socket_path);
        /* the same directory gives the same wd */
        wd = inotify_add_watch(w->fd, dirname(dir), IN_CREATE | IN_MOVED_TO | IN_ATTRIB);
        if (wd < 0) {
                r = -errno;
                goto fail;
        }
        x = calloc(1, sizeof(*x));
        if (!x || !(x->name = strdup(basename(file)))) {
                free(x);
                if (!watcher_uses(w, wd))
                        (void)inotify_rm_watch(w->fd, wd);
                r = -ENOMEM;
                goto fail;
        }
        x->w = w;
        x->wd = wd;
        x->fn = fn;
        x->userdata = userdata;
        LIST_INSERT_HEAD(&w->watches, x, link);
        *ret = x;
        return 0;

fail:
        if (!w->dispatching && !watcher_uses(w, -1))
                watcher_close(w);
        return r;
}

struct vhub_socket_watch *vhub_socket_watch_remove(struct vhub_socket_watch *x) {
        struct vhub_socket_watcher *w;

        if (!x)
                return NULL;
        w = x->w;
        if (w->dispatching) {
                x->removed = true;
                return NULL;
        }
        watch_free(x);
        if (!watcher_uses(w, -1))
                watcher_close(w);
        return NULL;
}
