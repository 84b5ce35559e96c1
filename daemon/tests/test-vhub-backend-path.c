/* SPDX-License-Identifier: MIT */
/*
 * Back-end paths (daemon/vhub-path-beneath.c, vhub-backend-path.c,
 * vhub-cred.c) without the daemon: opening below a directory fd refuses
 * symlinks, ".." and absolute paths in both ways (openat2 and the O_NOFOLLOW
 * walk) alike; server-mode sockets are replaced only when stale and removed
 * only while they are still the daemon's inode; client mode checks type and
 * owner; and, as root, acting for another uid takes that uid's rights and
 * gives them back (fsuid, groups, effective capabilities).  No fd leaks.
 *
 *   test-vhub-backend-path
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "vhub-backend-path.h"
#include "vhub-check.h"
#include "vhub-config.h"
#include "vhub-cred.h"
#include "vhub-path-beneath.h"

static char top[256];

static const char *at(const char *rel) {
        static char buf[4][PATH_MAX];
        static unsigned i;
        char *p = buf[i++ % 4];

        snprintf(p, PATH_MAX, "%s/%s", top, rel);
        return p;
}

/* A socket at path: listening (returned) or stale (closed, -1). */
static int make_socket(const char *path, bool listening) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

        CHECK(fd >= 0);
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
        CHECK(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
        if (listening) {
                CHECK(listen(fd, 8) == 0);
                return fd;
        }
        close(fd);
        return -1;
}

static ino_t inode_of(const char *path) {
        struct stat st;

        return lstat(path, &st) == 0 ? st.st_ino : 0;
}

static void test_open_beneath(void) {
        int (*const ways[])(int, const char *, int) = { vhub_open_beneath, vhub_open_beneath_walk };
        int base, fds_before = vhub_count_open_fds();
        struct stat st, bst;

        base = open(at("base"), O_PATH | O_DIRECTORY | O_CLOEXEC);
        CHECK(base >= 0);
        CHECK(fstat(base, &bst) == 0);
        for (size_t w = 0; w < 2; w++) {
                int (*open_beneath)(int, const char *, int) = ways[w];
                int fd;

                fd = open_beneath(base, "a/b", O_PATH | O_DIRECTORY);
                CHECK(fd >= 0);
                close(fd);
                fd = open_beneath(base, "a//b/", O_PATH | O_DIRECTORY);
                CHECK(fd >= 0);
                close(fd);
                fd = open_beneath(base, "a/s.sock", O_PATH);
                CHECK(fd >= 0 && fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode));
                close(fd);
                fd = open_beneath(base, "", O_PATH | O_DIRECTORY);
                CHECK(fd >= 0 && fstat(fd, &st) == 0 && st.st_ino == bst.st_ino);
                close(fd);
                /* symlinks anywhere, inside or out, are refused */
                CHECK(open_beneath(base, "link", O_PATH | O_DIRECTORY) < 0);
                CHECK(open_beneath(base, "link", O_PATH) < 0);
                CHECK(open_beneath(base, "link/x", O_PATH) < 0);
                CHECK(open_beneath(base, "a/flink", O_PATH) < 0);
                CHECK(open_beneath(base, "inlink/b", O_PATH) < 0);
                /* and so are "..", "." and absolute paths */
                CHECK_EQ(open_beneath(base, "../outside/x", O_PATH), -EINVAL);
                CHECK_EQ(open_beneath(base, "a/../a/b", O_PATH), -EINVAL);
                CHECK_EQ(open_beneath(base, "a/./b", O_PATH), -EINVAL);
                CHECK_EQ(open_beneath(base, "/etc", O_PATH), -EINVAL);
                CHECK_EQ(open_beneath(base, "a/nothing", O_PATH), -ENOENT);
                CHECK(open_beneath(base, "a/s.sock/x", O_PATH) < 0);
        }
        close(base);
        CHECK_EQ(vhub_count_open_fds(), fds_before);
}

static void test_server_and_client(struct vhub_backend_dirs *dirs, const struct vhub_cred *me) {
        struct vhub_backend_listener *l = NULL;
        struct vhub_error err = { 0 };
        char *path = NULL;
        int fd, pfd, c, live, fds_before = vhub_count_open_fds();
        uid_t uid = geteuid();
        ino_t ino;

        /* a new socket: listening, the client side connects to it */
        fd = vhub_backend_path_listen(dirs, me, uid, at("base/a/l.sock"), &err, &l, &path);
        CHECK(fd >= 0 && l && path);
        CHECK(strcmp(path, at("base/a/l.sock")) == 0);
        pfd = vhub_backend_path_open(dirs, me, uid, at("base/a/l.sock"), &err);
        CHECK(pfd >= 0);
        c = vhub_backend_path_connect(pfd, me);
        CHECK(c >= 0);
        close(c);
        close(pfd);
        /* through a symlink inside the directory: resolved, then opened beneath */
        pfd = vhub_backend_path_open(dirs, me, uid, at("base/inlink/l.sock"), &err);
        CHECK(pfd >= 0);
        close(pfd);
        /* a second listener over the live one is refused, the socket untouched */
        ino = inode_of(at("base/a/l.sock"));
        memset(&err, 0, sizeof(err));
        CHECK(vhub_backend_path_listen(dirs, me, uid, at("base/a/l.sock"), &err, &l, &path) < 0);
        CHECK_EQ(err.code, VHUB_ERR_NOT_ALLOWED);
        CHECK_EQ(inode_of(at("base/a/l.sock")), ino);
        /* someone replaces the daemon's socket: removing the listener leaves theirs */
        close(fd);
        CHECK(unlink(at("base/a/l.sock")) == 0);
        make_socket(at("base/a/l.sock"), false);
        ino = inode_of(at("base/a/l.sock"));
        l = vhub_backend_listener_free(l, me);
        CHECK(!l);
        CHECK_EQ(inode_of(at("base/a/l.sock")), ino);
        free(path);
        path = NULL;
        /* that stale socket of the caller's is replaced; this time the
         * listener's removal removes it */
        fd = vhub_backend_path_listen(dirs, me, uid, at("base/a/l.sock"), &err, &l, &path);
        CHECK(fd >= 0);
        CHECK(inode_of(at("base/a/l.sock")) != 0);
        close(fd);
        l = vhub_backend_listener_free(l, me);
        CHECK_EQ(inode_of(at("base/a/l.sock")), 0);
        free(path);
        path = NULL;

        /* refusals: outside, through a symlink out, not a socket, a live listener */
        live = make_socket(at("base/live.sock"), true);
        const char *refused_listen[] = { "outside/n.sock", "base/link/n.sock", "base/a/file",
                                         "base/live.sock", "base/a/", "base/..", "base/a/b/." };
        for (size_t i = 0; i < sizeof(refused_listen) / sizeof(refused_listen[0]); i++) {
                memset(&err, 0, sizeof(err));
                CHECK(vhub_backend_path_listen(dirs, me, uid, at(refused_listen[i]), &err, &l, &path) < 0);
                CHECK_EQ(err.code, VHUB_ERR_NOT_ALLOWED);
        }
        const char *refused_open[] = { "outside/x.sock", "base/link/x.sock", "base/a/file",
                                       "base/a/flink-out", "base/nothing.sock" };
        for (size_t i = 0; i < sizeof(refused_open) / sizeof(refused_open[0]); i++) {
                memset(&err, 0, sizeof(err));
                CHECK(vhub_backend_path_open(dirs, me, uid, at(refused_open[i]), &err) < 0);
                CHECK_EQ(err.code, VHUB_ERR_NOT_ALLOWED);
        }
        CHECK(vhub_backend_path_open(dirs, me, uid, "relative.sock", &err) < 0);
        CHECK(inode_of(at("base/live.sock")) != 0);
        close(live);
        CHECK(unlink(at("base/live.sock")) == 0);
        CHECK_EQ(vhub_count_open_fds(), fds_before);
}

/* The -32010 detail for a path that does not resolve: "no such socket"
 * only where the path lies inside a back-end directory; outside, the same
 * answer whether or not anything is there. */
static void check_detail(int r, const struct vhub_error *err, const char *before, const char *path,
                         const char *after) {
        char want[PATH_MAX + 128];

        CHECK(r < 0);
        CHECK_EQ(err->code, VHUB_ERR_NOT_ALLOWED);
        snprintf(want, sizeof(want), "%s%s%s", before, path, after);
        if (strcmp(err->detail, want) != 0) {
                fprintf(stderr, "detail '%s', expected '%s'\n", err->detail, want);
                CHECK(!"the expected detail");
        }
}

static void test_unresolved_details(struct vhub_backend_dirs *dirs, const struct vhub_cred *me) {
        static const char outside[] = " is outside the back-end directories";
        struct vhub_backend_listener *l = NULL;
        struct vhub_error err;
        char *path = NULL;
        uid_t uid = geteuid();
        int fds_before = vhub_count_open_fds();
        const char *p;

#define OPEN(p_) (memset(&err, 0, sizeof(err)), vhub_backend_path_open(dirs, me, uid, (p_), &err))
#define LISTEN(p_) (memset(&err, 0, sizeof(err)), vhub_backend_path_listen(dirs, me, uid, (p_), &err, &l, &path))
        p = at("base/nothing.sock");
        check_detail(OPEN(p), &err, "no such socket: ", p, "");
        p = at("base/nodir/x.sock");
        check_detail(OPEN(p), &err, "no such socket: ", p, "");
        p = at("base/a/b/../../nothing.sock");
        check_detail(OPEN(p), &err, "no such socket: ", p, "");
        /* outside: missing or there, the same words */
        p = at("outside/nothing.sock");
        check_detail(OPEN(p), &err, "back-end socket ", p, outside);
        p = at("outside/x.sock");
        check_detail(OPEN(p), &err, "back-end socket ", p, outside);
        p = at("base/link/nothing.sock");       /* a symlinked directory out */
        check_detail(OPEN(p), &err, "back-end socket ", p, outside);
        p = at("base/../outside/nothing.sock");
        check_detail(OPEN(p), &err, "back-end socket ", p, outside);
        check_detail(OPEN("/nonexistent-vhub-dir/x.sock"), &err, "back-end socket ", "/nonexistent-vhub-dir/x.sock", outside);
        /* a name that is there but does not resolve (a dangling symlink) */
        p = at("base/a/dangling");
        check_detail(OPEN(p), &err, "back-end socket ", p, " cannot be resolved: No such file or directory");

        /* server mode: the directory */
        p = at("base/nodir");
        check_detail(LISTEN(at("base/nodir/n.sock")), &err, "no such directory: ", p, "");
        p = at("outside/nodir/n.sock");
        check_detail(LISTEN(p), &err, "back-end socket ", p, outside);
        CHECK(!l && !path);
#undef OPEN
#undef LISTEN
        CHECK_EQ(vhub_count_open_fds(), fds_before);
}

static unsigned long long cap_eff(void) {
        char line[256];
        unsigned long long v = 0;
        FILE *f = fopen("/proc/self/status", "re");

        CHECK(f);
        while (fgets(line, sizeof(line), f))
                if (sscanf(line, "CapEff: %llx", &v) == 1)
                        break;
        fclose(f);
        return v;
}

/* As root: acting for uid 65534 is that uid's rights, and then root's again. */
static void test_act_for_other_uid(struct vhub_backend_dirs *dirs) {
        gid_t groups[] = { 4242 };
        struct vhub_cred nobody = { .uid = 65534, .gid = 65534, .groups = groups, .n_groups = 1 };
        struct vhub_backend_listener *l = NULL;
        struct vhub_cred_scope scope;
        struct vhub_error err = { 0 };
        unsigned long long caps = cap_eff();
        gid_t now[8];
        char *path = NULL;
        int fd, fds_before = vhub_count_open_fds();
        struct stat st;

        CHECK(vhub_cred_enter(&nobody, &scope) == 0);
        CHECK_EQ(setfsuid((uid_t)-1), 65534);
        CHECK_EQ(setfsgid((gid_t)-1), 65534);
        CHECK_EQ(getgroups(8, now), 1);
        CHECK_EQ(now[0], 4242);
        /* no CAP_DAC_OVERRIDE (access() would check the real uid) */
        CHECK(lstat(at("base/rootonly/f"), &st) < 0 && errno == EACCES);
        vhub_cred_leave(&scope);
        CHECK_EQ(setfsuid((uid_t)-1), 0);
        CHECK_EQ(cap_eff(), caps);
        CHECK(lstat(at("base/rootonly/f"), &st) == 0);

        /* server mode where only root may create: refused; in its own directory: its socket */
        CHECK(vhub_backend_path_listen(dirs, &nobody, 65534, at("base/rootonly/n.sock"), &err, &l,
                                       &path) < 0);
        CHECK_EQ(err.code, VHUB_ERR_NOT_ALLOWED);
        CHECK_EQ(inode_of(at("base/rootonly/n.sock")), 0);
        /* a name it cannot look up is not reported missing: it could not see that */
        memset(&err, 0, sizeof(err));
        CHECK(vhub_backend_path_open(dirs, &nobody, 65534, at("base/rootonly/none.sock"), &err) < 0);
        CHECK_EQ(err.code, VHUB_ERR_NOT_ALLOWED);
        CHECK(strstr(err.detail, "cannot be resolved: Permission denied"));
        memset(&err, 0, sizeof(err));
        CHECK(vhub_backend_path_listen(dirs, &nobody, 65534, at("base/rootonly/none/n.sock"), &err, &l,
                                       &path) < 0);
        CHECK(strstr(err.detail, "cannot be resolved: Permission denied"));
        fd = vhub_backend_path_listen(dirs, &nobody, 65534, at("base/mine/n.sock"), &err, &l, &path);
        CHECK(fd >= 0);
        CHECK(lstat(at("base/mine/n.sock"), &st) == 0 && st.st_uid == 65534 && st.st_gid == 65534);
        close(fd);
        l = vhub_backend_listener_free(l, &nobody);
        CHECK_EQ(inode_of(at("base/mine/n.sock")), 0);
        free(path);
        path = NULL;
        /* through its supplementary group */
        fd = vhub_backend_path_listen(dirs, &nobody, 65534, at("base/group/n.sock"), &err, &l, &path);
        CHECK(fd >= 0);
        close(fd);
        l = vhub_backend_listener_free(l, &nobody);
        free(path);
        CHECK_EQ(setfsuid((uid_t)-1), 0);
        CHECK_EQ(cap_eff(), caps);
        CHECK_EQ(vhub_count_open_fds(), fds_before);
}

int main(void) {
        struct vhub_backend_dirs *dirs = NULL;
        struct vhub_config cfg;
        struct vhub_cred me = { .uid = geteuid(), .gid = getegid() };
        const char *tmp = getenv("TMPDIR");
        char cmd[sizeof(top) + 16];

        snprintf(top, sizeof(top), "%s/test-vhub-backend-path-XXXXXX", tmp ? tmp : "/tmp");
        CHECK(strlen(top) < 200 && mkdtemp(top));
        CHECK(chmod(top, 0755) == 0);   /* another uid walks through it */
        CHECK(mkdir(at("base"), 0755) == 0 && mkdir(at("base/a"), 0755) == 0 &&
              mkdir(at("base/a/b"), 0755) == 0 && mkdir(at("outside"), 0755) == 0);
        make_socket(at("base/a/s.sock"), false);
        make_socket(at("outside/x.sock"), false);
        CHECK(close(open(at("base/a/file"), O_CREAT | O_WRONLY | O_CLOEXEC, 0600)) == 0);
        CHECK(symlink(at("outside"), at("base/link")) == 0);
        CHECK(symlink("a", at("base/inlink")) == 0);
        CHECK(symlink("s.sock", at("base/a/flink")) == 0);
        CHECK(symlink(at("outside/x.sock"), at("base/a/flink-out")) == 0);
        CHECK(symlink(at("outside/none"), at("base/a/dangling")) == 0);

        vhub_config_init(&cfg);
        CHECK(vhub_config_add_backend_dir(&cfg, at("base")) == 0);
        CHECK(vhub_backend_dirs_new(&cfg, &dirs) == 0);

        test_open_beneath();
        test_server_and_client(dirs, &me);
        test_unresolved_details(dirs, &me);
        if (geteuid() == 0) {
                CHECK(mkdir(at("base/rootonly"), 0700) == 0);
                CHECK(close(open(at("base/rootonly/f"), O_CREAT | O_WRONLY | O_CLOEXEC, 0600)) == 0);
                CHECK(mkdir(at("base/mine"), 0700) == 0 && chown(at("base/mine"), 65534, 65534) == 0);
                CHECK(mkdir(at("base/group"), 0770) == 0 && chown(at("base/group"), 0, 4242) == 0);
                CHECK(chmod(at("base/group"), 0770) == 0);
                test_act_for_other_uid(dirs);
        } else {
                printf("not root: acting for another uid not tested\n");
        }

        dirs = vhub_backend_dirs_free(dirs);
        vhub_config_done(&cfg);
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", top);
        CHECK(system(cmd) == 0);
        printf("ok\n");
        return 0;
}
