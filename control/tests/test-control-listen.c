/* SPDX-License-Identifier: MIT */
/*
 * control_listen_create() (control/control-listen.h): which directories
 * --control may be in, what happens to what is already at its name, the
 * mode and group set on the socket.  Needs root (directories of other
 * uids); skipped otherwise.
 */
#include "control-listen.h"
#include "vhub-check.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define OTHER_UID 65534
#define GROUP 4242

static char top[] = "/tmp/test-control-listen-XXXXXX";

static const char *at(const char *rel) {
        static char bufs[4][PATH_MAX];
        static unsigned k;
        char *b = bufs[k++ % 4];

        snprintf(b, PATH_MAX, "%s/%s", top, rel);
        return b;
}

static void mkdir_as(const char *rel, uid_t uid, mode_t mode) {
        CHECK(mkdir(at(rel), 0700) == 0);
        CHECK(chown(at(rel), uid, uid) == 0);
        CHECK(chmod(at(rel), mode) == 0);
}

static bool exists(const char *rel) {
        struct stat st;

        return lstat(at(rel), &st) == 0;
}

int main(void) {
        struct stat st;
        int fds_before, fd, fd2, f;

        if (geteuid() != 0) {
                fprintf(stderr, "needs root (directories of other uids): skipped\n");
                return 77;
        }
        fds_before = vhub_count_open_fds();
        CHECK(mkdtemp(top));
        CHECK(chmod(top, 0755) == 0);

        /* root's 0755 directory: bound with the mode and group asked for */
        mkdir_as("ok", 0, 0755);
        fd = control_listen_create(at("ok/c.sock"), 0660, GROUP, true);
        CHECK(fd >= 0);
        CHECK(lstat(at("ok/c.sock"), &st) == 0);
        CHECK(S_ISSOCK(st.st_mode));
        CHECK_EQ(st.st_mode & 07777, 0660);
        CHECK_EQ(st.st_gid, GROUP);
        CHECK_EQ(st.st_uid, 0);
        CHECK((fcntl(fd, F_GETFD) & FD_CLOEXEC) && (fcntl(fd, F_GETFL) & O_NONBLOCK));

        /* a live socket at the name stays */
        CHECK_EQ(control_listen_create(at("ok/c.sock"), 0660, 0, false), -EADDRINUSE);
        CHECK(lstat(at("ok/c.sock"), &st) == 0 && st.st_gid == GROUP);
        /* a stale one (nobody listens) is replaced */
        close(fd);
        fd2 = control_listen_create(at("ok/c.sock"), 0600, 0, false);
        CHECK(fd2 >= 0);
        CHECK(lstat(at("ok/c.sock"), &st) == 0 && (st.st_mode & 07777) == 0600);
        close(fd2);

        /* anything that is not a socket stays as it was */
        f = open(at("ok/file"), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        CHECK(f >= 0);
        close(f);
        CHECK_EQ(control_listen_create(at("ok/file"), 0666, GROUP, true), -EEXIST);
        CHECK(lstat(at("ok/file"), &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 07777) == 0600 &&
              st.st_gid == 0);
        CHECK(symlink(at("ok/file"), at("ok/link")) == 0);
        CHECK_EQ(control_listen_create(at("ok/link"), 0666, GROUP, true), -EEXIST);
        CHECK(lstat(at("ok/file"), &st) == 0 && (st.st_mode & 07777) == 0600 && st.st_gid == 0);

        /* a missing directory is created, 0755 */
        fd = control_listen_create(at("ok/new/c.sock"), 0660, 0, false);
        CHECK(fd >= 0);
        close(fd);
        CHECK(lstat(at("ok/new"), &st) == 0 && S_ISDIR(st.st_mode) && (st.st_mode & 07777) == 0755);

        /* directories others can change: refused, nothing created */
        mkdir_as("users", OTHER_UID, 0755);
        CHECK_EQ(control_listen_create(at("users/c.sock"), 0660, 0, false), -EPERM);
        CHECK(!exists("users/c.sock"));
        mkdir_as("group", 0, 0775);
        CHECK_EQ(control_listen_create(at("group/c.sock"), 0660, 0, false), -EPERM);
        CHECK(!exists("group/c.sock"));
        mkdir_as("world", 0, 0757);
        CHECK_EQ(control_listen_create(at("world/c.sock"), 0660, 0, false), -EPERM);
        mkdir_as("sticky", 0, 01777);
        CHECK_EQ(control_listen_create(at("sticky/c.sock"), 0660, 0, false), -EPERM);
        CHECK(!exists("sticky/c.sock"));

        /* ...and above it: a writable parent could move the directory away,
         * a sticky one could not */
        mkdir_as("open", 0, 0777);
        mkdir_as("open/d", 0, 0755);
        CHECK_EQ(control_listen_create(at("open/d/c.sock"), 0660, 0, false), -EPERM);
        CHECK(!exists("open/d/c.sock"));
        mkdir_as("sticky/d", 0, 0755);
        fd = control_listen_create(at("sticky/d/c.sock"), 0660, 0, false);
        CHECK(fd >= 0);
        close(fd);
        mkdir_as("users/d", 0, 0755);
        CHECK_EQ(control_listen_create(at("users/d/c.sock"), 0660, 0, false), -EPERM);

        /* a path no client could connect to */
        {
                char longname[200];

                memset(longname, 'x', sizeof(longname) - 1);
                longname[sizeof(longname) - 1] = '\0';
                CHECK_EQ(control_listen_create(at(longname), 0660, 0, false), -ENAMETOOLONG);
        }

        CHECK_EQ(vhub_count_open_fds(), fds_before);
        {
                char cmd[PATH_MAX + 16];

                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", top);
                CHECK(system(cmd) == 0);
        }
        return 0;
}
