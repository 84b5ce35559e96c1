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

/* Paths are relative to it (the working directory), except where said. */
static char top[] = "/tmp/test-control-listen-XXXXXX";

static void mkdir_as(const char *path, uid_t uid, mode_t mode) {
        CHECK(mkdir(path, 0700) == 0);
        CHECK(chown(path, uid, uid) == 0);
        CHECK(chmod(path, mode) == 0);
}

static bool exists(const char *path) {
        struct stat st;

        return lstat(path, &st) == 0;
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
        CHECK(chdir(top) == 0);

        /* root's 0755 directory: bound with the mode and group asked for
         * (an absolute path, as --control usually is) */
        mkdir_as("ok", 0, 0755);
        {
                char abs[PATH_MAX];

                snprintf(abs, sizeof(abs), "%s/ok/c.sock", top);
                fd = control_listen_create(abs, 0660, GROUP, true);
        }
        CHECK(fd >= 0);
        CHECK(lstat("ok/c.sock", &st) == 0);
        CHECK(S_ISSOCK(st.st_mode));
        CHECK_EQ(st.st_mode & 07777, 0660);
        CHECK_EQ(st.st_gid, GROUP);
        CHECK_EQ(st.st_uid, 0);
        CHECK((fcntl(fd, F_GETFD) & FD_CLOEXEC) && (fcntl(fd, F_GETFL) & O_NONBLOCK));

        /* a live socket at the name stays */
        CHECK_EQ(control_listen_create("ok/c.sock", 0660, 0, false), -EADDRINUSE);
        CHECK(lstat("ok/c.sock", &st) == 0 && st.st_gid == GROUP);
        /* a stale one (nobody listens) is replaced */
        close(fd);
        fd2 = control_listen_create("ok/c.sock", 0600, 0, false);
        CHECK(fd2 >= 0);
        CHECK(lstat("ok/c.sock", &st) == 0 && (st.st_mode & 07777) == 0600);
        close(fd2);

        /* anything that is not a socket stays as it was */
        f = open("ok/file", O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        CHECK(f >= 0);
        close(f);
        CHECK_EQ(control_listen_create("ok/file", 0666, GROUP, true), -EEXIST);
        CHECK(lstat("ok/file", &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 07777) == 0600 &&
              st.st_gid == 0);
        CHECK(symlink("file", "ok/link") == 0);     /* to ok/file */
        CHECK_EQ(control_listen_create("ok/link", 0666, GROUP, true), -EEXIST);
        CHECK(lstat("ok/file", &st) == 0 && (st.st_mode & 07777) == 0600 && st.st_gid == 0);

        /* a missing directory is created, 0755 */
        fd = control_listen_create("ok/new/c.sock", 0660, 0, false);
        CHECK(fd >= 0);
        close(fd);
        CHECK(lstat("ok/new", &st) == 0 && S_ISDIR(st.st_mode) && (st.st_mode & 07777) == 0755);

        /* directories others can change: refused, nothing created */
        mkdir_as("users", OTHER_UID, 0755);
        CHECK_EQ(control_listen_create("users/c.sock", 0660, 0, false), -EPERM);
        CHECK(!exists("users/c.sock"));
        mkdir_as("group", 0, 0775);
        CHECK_EQ(control_listen_create("group/c.sock", 0660, 0, false), -EPERM);
        CHECK(!exists("group/c.sock"));
        mkdir_as("world", 0, 0757);
        CHECK_EQ(control_listen_create("world/c.sock", 0660, 0, false), -EPERM);
        mkdir_as("sticky", 0, 01777);
        CHECK_EQ(control_listen_create("sticky/c.sock", 0660, 0, false), -EPERM);
        CHECK(!exists("sticky/c.sock"));

        /* ...and above it: a writable parent could move the directory away,
         * a sticky one could not */
        mkdir_as("open", 0, 0777);
        mkdir_as("open/d", 0, 0755);
        CHECK_EQ(control_listen_create("open/d/c.sock", 0660, 0, false), -EPERM);
        CHECK(!exists("open/d/c.sock"));
        mkdir_as("sticky/d", 0, 0755);
        fd = control_listen_create("sticky/d/c.sock", 0660, 0, false);
        CHECK(fd >= 0);
        close(fd);
        mkdir_as("users/d", 0, 0755);
        CHECK_EQ(control_listen_create("users/d/c.sock", 0660, 0, false), -EPERM);

        /* a path no client could connect to */
        {
                char longname[200];

                memset(longname, 'x', sizeof(longname) - 1);
                longname[sizeof(longname) - 1] = '\0';
                CHECK_EQ(control_listen_create(longname, 0660, 0, false), -ENAMETOOLONG);
        }

        CHECK_EQ(vhub_count_open_fds(), fds_before);
        {
                char cmd[PATH_MAX + 16];

                CHECK(chdir("/") == 0);
                snprintf(cmd, sizeof(cmd), "rm -rf '%s'", top);
                CHECK(system(cmd) == 0);
        }
        return 0;
}
