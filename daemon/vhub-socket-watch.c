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

#include "vhub-hash.h"
#include "vhub-loop.h"
#include "vhub-socket-watch.h"
#include "vhu-fd.h"

/* A watched directory: inotify gives one wd per directory, shared by the
 * sockets in it, and the wd goes with the last of them. */
struct watch_dir {
        struct vhub_hash_node node;     /* in w->dirs, by wd */
        int wd;
        unsigned n_watches;
};

struct vhub_socket_watch {
        struct vhub_hash_node node;     /* in w->by_name, by (wd, name), while not removed */
        LIST_ENTRY(vhub_socket_watch) link;  /* in w->watches, or w->removed */
        struct vhub_socket_watch *due;  /* next in a dispatch's list of callbacks to run */
        struct vhub_socket_watcher *w;
        struct watch_dir *dir;
        char *name;                     /* the socket's file name in that directory */
        vhub_socket_appeared_fn fn;
        void *userdata;
        bool removed;                   /* removed during a dispatch: freed after it */
};

LIST_HEAD(watch_list, vhub_socket_watch);

/*
 * An event finds its watches by (directory, name) in a hash table: a
 * back-end restarting with many sockets creates them one by one, and with
 * many devices down at once a walk over every watch per event made the
 * restore quadratic.
 */
struct vhub_socket_watcher {
        struct event_base *base;
        int fd;                         /* -1 while nothing is watched */
        struct event *ev;
        bool dispatching;               /* inside watch_cb: removed watches wait */
        unsigned n_watches;             /* not removed */
        struct watch_list watches;
        struct watch_list removed;      /* removed during a dispatch */
        struct vhub_hash by_name;       /* (wd, name) -> watch */
        struct vhub_hash dirs;          /* wd -> struct watch_dir */
};

int vhub_socket_watcher_fd(const struct vhub_socket_watcher *w) {
        return w->fd;
}

static uint64_t name_hash(const struct vhub_socket_watcher *w, int wd, const char *name) {
        /* a file name is at most NAME_MAX bytes; a longer one never appears
         * (hashing its prefix keeps the lookup right, strcmp decides) */
        char key[sizeof(int) + NAME_MAX];
        size_t len = strnlen(name, NAME_MAX);

        memcpy(key, &wd, sizeof(wd));
        memcpy(key + sizeof(wd), name, len);
        return vhub_hash_bytes(&w->by_name, key, sizeof(wd) + len);
}

static uint64_t dir_hash(const struct vhub_socket_watcher *w, int wd) {
        return vhub_hash_bytes(&w->dirs, &wd, sizeof(wd));
}

static struct watch_dir *dir_find(const struct vhub_socket_watcher *w, int wd) {
        uint64_t hash = dir_hash(w, wd);

        for (struct vhub_hash_node *n = vhub_hash_first(&w->dirs, hash); n; n = vhub_hash_next(n, hash)) {
                struct watch_dir *d = vhub_hash_entry(n, struct watch_dir, node);

                if (d->wd == wd)
                        return d;
        }
        return NULL;
}

/* Nothing is watched any more: hold no fd for it. */
static void watcher_close(struct vhub_socket_watcher *w) {
        vhub_event_freep(&w->ev);
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

/* One socket fewer in d's directory; the directory's watch goes with the last. */
static void dir_put(struct vhub_socket_watcher *w, struct watch_dir *d) {
        if (--d->n_watches > 0)
                return;
        if (w->fd >= 0)
                (void)inotify_rm_watch(w->fd, d->wd);
        vhub_hash_remove(&w->dirs, &d->node);
        free(d);
}

/* Stop x firing: out of the lookup and its directory's count. */
static void watch_unlink(struct vhub_socket_watch *x) {
        struct vhub_socket_watcher *w = x->w;

        vhub_hash_remove(&w->by_name, &x->node);
        dir_put(w, x->dir);
        x->dir = NULL;
        w->n_watches--;
        x->removed = true;
}

static void watch_free(struct vhub_socket_watch *x) {
        LIST_REMOVE(x, link);
        free(x->name);
        free(x);
}

/* Free what was removed during a dispatch; close the instance if idle. */
static void watcher_sweep(struct vhub_socket_watcher *w) {
        while (!LIST_EMPTY(&w->removed))
                watch_free(LIST_FIRST(&w->removed));
        if (w->n_watches == 0)
                watcher_close(w);
}

/* The watches this event is for, chained through ->due: collected before
 * any callback runs, since a callback may add or remove watches (the table
 * may grow or shrink under a walk). */
static struct vhub_socket_watch *watches_due(struct vhub_socket_watcher *w, const struct inotify_event *ie) {
        struct vhub_socket_watch *due = NULL, **tail = &due;
        uint64_t hash;

        if (ie->len == 0)
                return NULL;            /* about the directory itself */
        hash = name_hash(w, ie->wd, ie->name);
        for (struct vhub_hash_node *n = vhub_hash_first(&w->by_name, hash); n; n = vhub_hash_next(n, hash)) {
                struct vhub_socket_watch *x = vhub_hash_entry(n, struct vhub_socket_watch, node);

                if (x->dir->wd == ie->wd && strcmp(x->name, ie->name) == 0) {
                        x->due = NULL;
                        *tail = x;
                        tail = &x->due;
                }
        }
        return due;
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
        n = w->n_watches > 0 ? read(fd, buf, sizeof(buf)) : 0;
        for (char *p = buf; n > 0 && p < buf + n;) {
                const struct inotify_event *ie = (const struct inotify_event *)p;

                /* removed ones stay allocated until the sweep: the chain holds */
                for (struct vhub_socket_watch *x = watches_due(w, ie); x; x = x->due)
                        if (!x->removed)
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
        LIST_INIT(&w->removed);
        if (vhub_hash_init(&w->by_name) < 0 || vhub_hash_init(&w->dirs) < 0) {
                vhub_hash_done(&w->by_name);
                free(w);
                return NULL;
        }
        return w;
}

struct vhub_socket_watcher *vhub_socket_watcher_free(struct vhub_socket_watcher *w) {
        struct vhub_socket_watch *x;

        if (!w)
                return NULL;
        while ((x = LIST_FIRST(&w->watches))) {
                watch_unlink(x);
                watch_free(x);
        }
        watcher_sweep(w);
        vhub_hash_done(&w->by_name);
        vhub_hash_done(&w->dirs);
        free(w);
        return NULL;
}

int vhub_socket_watch_add(struct vhub_socket_watcher *w, const char *socket_path,
                          vhub_socket_appeared_fn fn, void *userdata, struct vhub_socket_watch **ret) {
        char dir[PATH_MAX], file[PATH_MAX];
        struct vhub_socket_watch *x = NULL;
        struct watch_dir *d;
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
        d = dir_find(w, wd);
        if (!d) {
                d = calloc(1, sizeof(*d));
                if (!d) {
                        (void)inotify_rm_watch(w->fd, wd);  /* no socket of ours is in it */
                        r = -ENOMEM;
                        goto fail;
                }
                d->wd = wd;
                vhub_hash_insert(&w->dirs, &d->node, dir_hash(w, wd));
        }
        d->n_watches++;
        x = calloc(1, sizeof(*x));
        if (!x || !(x->name = strdup(basename(file)))) {
                free(x);
                dir_put(w, d);
                r = -ENOMEM;
                goto fail;
        }
        x->w = w;
        x->dir = d;
        x->fn = fn;
        x->userdata = userdata;
        LIST_INSERT_HEAD(&w->watches, x, link);
        vhub_hash_insert(&w->by_name, &x->node, name_hash(w, wd, x->name));
        w->n_watches++;
        *ret = x;
        return 0;

fail:
        if (!w->dispatching && w->n_watches == 0)
                watcher_close(w);
        return r;
}

struct vhub_socket_watch *vhub_socket_watch_remove(struct vhub_socket_watch *x) {
        struct vhub_socket_watcher *w;

        if (!x || x->removed)
                return NULL;
        w = x->w;
        watch_unlink(x);
        if (w->dispatching) {
                /* the dispatch may still hold it in its due chain */
                LIST_REMOVE(x, link);
                LIST_INSERT_HEAD(&w->removed, x, link);
                return NULL;
        }
        watch_free(x);
        if (w->n_watches == 0)
                watcher_close(w);
        return NULL;
}
