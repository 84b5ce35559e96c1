/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "control-listen.h"
#include "vhu-fd.h"
#include "vhub-log.h"

/* Directories above --control's, at most (a loop guard). */
#define ANCESTORS_MAX 256

static bool same_inode(const struct stat *a, const struct stat *b) {
        return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

static bool owner_trusted(const struct stat *st) {
        return st->st_uid == 0 || st->st_uid == geteuid();
}

/* --control's directory: root's or ours, writable by nobody else; each
 * directory above it the same, or sticky. */
static int dir_check(int dfd, const char *dir) {
        struct stat st, up;
        int fd = dfd, r = 0;

        if (fstat(dfd, &st) < 0)
                return -errno;
        if (!owner_trusted(&st) || (st.st_mode & 022)) {
                log_error("--control: the directory %s (uid %u, mode %04o) can be changed by others than "
                          "uid %u: anybody who can rename in it could take the control socket's name",
                          dir, (unsigned)st.st_uid, (unsigned)(st.st_mode & 07777), (unsigned)geteuid());
                return -EPERM;
        }
        for (unsigned i = 0; i < ANCESTORS_MAX; i++) {
                int parent = openat(fd, "..", O_PATH | O_DIRECTORY | O_CLOEXEC);

                if (parent < 0) {
                        r = -errno;
                        break;
                }
                if (fd != dfd)
                        vhu_safe_close(fd);
                fd = parent;
                if (fstat(fd, &up) < 0) {
                        r = -errno;
                        break;
                }
                if (!owner_trusted(&up) || ((up.st_mode & 022) && !(up.st_mode & S_ISVTX))) {
                        log_error("--control: a directory above %s (uid %u, mode %04o) can be changed by "
                                  "others than uid %u: they could move %s away",
                                  dir, (unsigned)up.st_uid, (unsigned)(up.st_mode & 07777),
                                  (unsigned)geteuid(), dir);
                        r = -EPERM;
                        break;
                }
                if (same_inode(&up, &st))
                        break; /* "/" is its own parent */
                st = up;
        }
        if (fd != dfd)
                vhu_safe_close(fd);
        return r;
}

/* A new socket and the address of name in dfd for it,
 * "/proc/self/fd/<dfd>/<name>": bind and connect have no *at variant.
 * The socket, or -errno. */
static int at_socket(int dfd, const char *name, struct sockaddr_un *sa) {
        int fd;

        *sa = (struct sockaddr_un){ .sun_family = AF_UNIX };
        if ((size_t)snprintf(sa->sun_path, sizeof(sa->sun_path), "/proc/self/fd/%d/%s", dfd, name) >=
            sizeof(sa->sun_path))
                return -ENAMETOOLONG;
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        return fd < 0 ? -errno : fd;
}

/* A live daemon keeps its socket; a stale one (nobody listens) is removed;
 * anything that is not a socket stays and is refused. */
static int make_room(int dfd, const char *name, const char *path) {
        struct sockaddr_un sa;
        struct stat st;
        _cleanup_close_ int fd = -1;
        int r;

        if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                return errno == ENOENT ? 0 : -errno;
        if (!S_ISSOCK(st.st_mode)) {
                log_error("--control: %s exists and is not a socket", path);
                return -EEXIST;
        }
        fd = at_socket(dfd, name, &sa);
        if (fd < 0)
                return fd;
        r = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 || errno == EAGAIN ? -EADDRINUSE : 0;
        fd = vhu_safe_close(fd);
        if (r < 0)
                return r;
        if (unlinkat(dfd, name, 0) < 0 && errno != ENOENT)
                return -errno;
        return 0;
}

/* Mode and group on the inode bind() just made, never by name. */
static int set_mode_and_group(int dfd, const char *name, mode_t mode, gid_t gid, bool gid_set) {
        char proc[64];
        struct stat st;
        _cleanup_close_ int pfd = -1;

        pfd = openat(dfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (pfd < 0)
                return -errno;
        if (fstat(pfd, &st) < 0 || !S_ISSOCK(st.st_mode) || st.st_uid != geteuid())
                return -ESTALE;
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", pfd);
        if (chmod(proc, mode) < 0 || (gid_set && fchownat(pfd, "", (uid_t)-1, gid, AT_EMPTY_PATH) < 0))
                return -errno;
        return 0;
}

int control_listen_create(const char *path, mode_t mode, gid_t gid, bool gid_set) {
        char dir[PATH_MAX];
        struct sockaddr_un sa;
        const char *name, *slash = strrchr(path, '/');
        _cleanup_close_ int dfd = -1, fd = -1;
        mode_t old_umask;
        int r;

        if (!slash) {
                snprintf(dir, sizeof(dir), ".");
                name = path;
        } else {
                if ((size_t)(slash - path) >= sizeof(dir))
                        return -ENAMETOOLONG;
                snprintf(dir, sizeof(dir), "%.*s", slash == path ? 1 : (int)(slash - path), path);
                name = slash + 1;
        }
        if (!*name || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
                return -EINVAL;
        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG; /* no client could connect to it */
        /* 0755: clients traverse it; the socket's own mode guards access */
        if (mkdir(dir, 0755) < 0 && errno != EEXIST)
                return -errno;
        dfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0)
                return -errno;
        r = dir_check(dfd, dir);
        if (r < 0)
                return r;
        r = make_room(dfd, name, path);
        if (r < 0)
                return r;
        fd = at_socket(dfd, name, &sa);
        if (fd < 0)
                return fd;
        old_umask = umask(0177); /* never reachable by others, not even for a moment */
        r = bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ? -errno : 0;
        umask(old_umask);
        if (r < 0)
                return r;
        r = set_mode_and_group(dfd, name, mode, gid, gid_set);
        if (r == 0 && listen(fd, 64) < 0)
                r = -errno;
        if (r < 0) {
                (void)unlinkat(dfd, name, 0); /* ours: nobody else can change the directory */
                return r;
        }
        return VHU_TAKE_FD(fd);
}
