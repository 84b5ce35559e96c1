/* SPDX-License-Identifier: MIT */
/*
 * The socket watcher (daemon/vhub-socket-watch.c) against real inotify in a
 * temporary directory: a file created fires exactly the watches of its name
 * in its directory (two watches of one name both, another name or another
 * directory's same name none), a watch removed inside a dispatch does not
 * fire after, one added inside a dispatch fires from the next event on, the
 * instance holds its fd only while something is watched, and with thousands
 * of watches one event fires one callback.
 *
 *   test-vhub-socket-watch
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vhub-check.h"
#include "vhub-socket-watch.h"

#define MANY 3000

struct env {
        struct event_base *base;
        struct vhub_socket_watcher *w;
        char dir[64], dir2[80];
};

struct probe {
        struct env *e;
        struct vhub_socket_watch *watch;
        unsigned fired;
        /* what the callback does besides counting */
        struct probe *remove_other;
        struct probe *add_other;
        const char *add_path;
};

static void probe_cb(void *userdata) {
        struct probe *p = userdata;

        p->fired++;
        if (p->remove_other)
                p->remove_other->watch = vhub_socket_watch_remove(p->remove_other->watch);
        if (p->add_other) {
                CHECK_EQ(vhub_socket_watch_add(p->e->w, p->add_path, probe_cb, p->add_other,
                                               &p->add_other->watch), 0);
                p->add_other = NULL;
        }
}

static void watch(struct env *e, struct probe *p, const char *dir, const char *name) {
        char path[256];

        snprintf(path, sizeof(path), "%s/%s", dir, name);
        p->e = e;
        CHECK_EQ(vhub_socket_watch_add(e->w, path, probe_cb, p, &p->watch), 0);
}

/* Create dir/name (a plain file: inotify's IN_CREATE is the same) and let
 * the loop see it. */
static void create(struct env *e, const char *dir, const char *name) {
        char path[256];
        int fd;

        snprintf(path, sizeof(path), "%s/%s", dir, name);
        (void)unlink(path);
        fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        CHECK(fd >= 0);
        close(fd);
        CHECK_EQ(event_base_loop(e->base, EVLOOP_NONBLOCK), 0);
}

static void test_names(struct env *e) {
        struct probe a = { 0 }, a2 = { 0 }, b = { 0 }, other_dir = { 0 };

        watch(e, &a, e->dir, "a.sock");
        watch(e, &a2, e->dir, "a.sock");
        watch(e, &b, e->dir, "b.sock");
        watch(e, &other_dir, e->dir2, "a.sock");
        create(e, e->dir, "a.sock");
        CHECK_EQ(a.fired, 1);
        CHECK_EQ(a2.fired, 1);
        CHECK_EQ(b.fired, 0);
        CHECK_EQ(other_dir.fired, 0);
        create(e, e->dir, "a.sockx");           /* a longer name is another name */
        create(e, e->dir, "b.sock");
        CHECK_EQ(a.fired, 1);
        CHECK_EQ(b.fired, 1);
        create(e, e->dir2, "a.sock");
        CHECK_EQ(other_dir.fired, 1);
        CHECK_EQ(a.fired, 1);

        /* removed: fires no more; the others in the directory still do */
        a.watch = vhub_socket_watch_remove(a.watch);
        create(e, e->dir, "a.sock");
        CHECK_EQ(a.fired, 1);
        CHECK_EQ(a2.fired, 2);
        a2.watch = vhub_socket_watch_remove(a2.watch);
        b.watch = vhub_socket_watch_remove(b.watch);
        other_dir.watch = vhub_socket_watch_remove(other_dir.watch);
}

/* Inside a dispatch: two watches of one name that remove each other --
 * whichever runs first, the other must not; one that adds a watch of the
 * same name: the new one waits for the next event. */
static void test_reentry(struct env *e) {
        struct probe x = { 0 }, y = { 0 }, adder = { 0 }, added = { 0 };
        char path[256];

        watch(e, &x, e->dir, "r.sock");
        watch(e, &y, e->dir, "r.sock");
        x.remove_other = &y;
        y.remove_other = &x;
        create(e, e->dir, "r.sock");
        CHECK_EQ(x.fired + y.fired, 1);
        (x.watch ? &x : &y)->watch = vhub_socket_watch_remove(x.watch ? x.watch : y.watch);
        CHECK(!x.watch && !y.watch);

        snprintf(path, sizeof(path), "%s/r.sock", e->dir);
        watch(e, &adder, e->dir, "r.sock");
        adder.add_other = &added;
        adder.add_path = path;
        added.e = e;
        create(e, e->dir, "r.sock");
        CHECK_EQ(adder.fired, 1);
        CHECK_EQ(added.fired, 0);
        CHECK(added.watch != NULL);
        create(e, e->dir, "r.sock");
        CHECK_EQ(adder.fired, 2);
        CHECK_EQ(added.fired, 1);
        adder.watch = vhub_socket_watch_remove(adder.watch);
        added.watch = vhub_socket_watch_remove(added.watch);
}

/* Thousands of sockets down in one directory: each event fires its own. */
static void test_many(struct env *e) {
        struct probe *p = calloc(MANY, sizeof(*p));
        char name[32];

        CHECK(p);
        for (unsigned i = 0; i < MANY; i++) {
                snprintf(name, sizeof(name), "m%u.sock", i);
                watch(e, &p[i], e->dir, name);
        }
        for (unsigned i = 0; i < MANY; i += 7) {
                snprintf(name, sizeof(name), "m%u.sock", i);
                create(e, e->dir, name);
        }
        for (unsigned i = 0; i < MANY; i++)
                CHECK_EQ(p[i].fired, i % 7 == 0 ? 1u : 0u);
        for (unsigned i = 0; i < MANY; i++)
                p[i].watch = vhub_socket_watch_remove(p[i].watch);
        free(p);
}

/* An fd only while something is watched; a directory that cannot be
 * watched is an error that leaves none behind. */
static void test_fds(struct env *e, int baseline) {
        struct probe a = { 0 };
        char path[256];

        CHECK_EQ(vhub_count_open_fds(), baseline);
        watch(e, &a, e->dir, "f.sock");
        CHECK_EQ(vhub_count_open_fds(), baseline + 1);
        a.watch = vhub_socket_watch_remove(a.watch);
        CHECK_EQ(vhub_count_open_fds(), baseline);

        snprintf(path, sizeof(path), "%s/missing/f.sock", e->dir);
        CHECK_EQ(vhub_socket_watch_add(e->w, path, probe_cb, &a, &a.watch), -ENOENT);
        CHECK_EQ(vhub_count_open_fds(), baseline);
}

static void rm_dir(const char *dir) {
        char cmd[128];

        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        CHECK_EQ(system(cmd), 0);
}

int main(void) {
        struct env e = { 0 };
        int baseline;

        snprintf(e.dir, sizeof(e.dir), "/tmp/test-socket-watch-XXXXXX");
        CHECK(mkdtemp(e.dir));
        snprintf(e.dir2, sizeof(e.dir2), "%s/sub", e.dir);
        CHECK_EQ(mkdir(e.dir2, 0700), 0);
        e.base = event_base_new();
        CHECK(e.base);
        baseline = vhub_count_open_fds();
        e.w = vhub_socket_watcher_new(e.base);
        CHECK(e.w);
        CHECK_EQ(vhub_count_open_fds(), baseline);

        test_names(&e);
        test_reentry(&e);
        test_many(&e);
        test_fds(&e, baseline);

        /* freed with watches left */
        {
                struct probe a = { 0 };

                watch(&e, &a, e.dir, "left.sock");
                e.w = vhub_socket_watcher_free(e.w);
                CHECK_EQ(vhub_count_open_fds(), baseline);
        }
        event_base_free(e.base);
        rm_dir(e.dir);
        return 0;
}
