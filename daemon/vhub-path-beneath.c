/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/openat2.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vhub-path-beneath.h"
#include "vhu-fd.h"

/* Both ways refuse the same paths: absolute ones, "." and ".." components. */
static bool rel_valid(const char *rel) {
        const char *p = rel;

        if (rel[0] == '/' || strlen(rel) >= PATH_MAX)
                return false;
        while (*p) {
                size_t n = strcspn(p, "/");

                if ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
                        return false;
                p += n;
                p += strspn(p, "/");
        }
        return true;
}

/* O_PATH|O_NOFOLLOW opens a symlink as the last component itself. */
static int refuse_symlink(int fd) {
        struct stat st;
        int r = fstat(fd, &st) < 0 ? -errno : S_ISLNK(st.st_mode) ? -ELOOP : 0;

        if (r < 0) {
                vhu_safe_close(fd);
                return r;
        }
        return fd;
}

int vhub_open_beneath_walk(int dir_fd, const char *rel, int flags) {
        char copy[PATH_MAX];
        char *comp, *next, *save = NULL;
        int cur, fd, r;

        if (!rel_valid(rel))
                return -EINVAL;
        snprintf(copy, sizeof(copy), "%s", rel);
        comp = strtok_r(copy, "/", &save);
        if (!comp) {
                fd = openat(dir_fd, ".", flags | O_CLOEXEC);
                return fd < 0 ? -errno : fd;
        }
        cur = dir_fd;
        for (;;) {
                next = strtok_r(NULL, "/", &save);
                /* O_PATH|O_NOFOLLOW opens a symlink itself; O_DIRECTORY then
                 * refuses it (ENOTDIR), as it refuses anything but a directory */
                fd = openat(cur, comp, next ? O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
                                            : flags | O_NOFOLLOW | O_CLOEXEC);
                r = -errno;
                if (cur != dir_fd)
                        vhu_safe_close(cur);
                if (fd < 0)
                        return r;
                if (!next)
                        break;
                cur = fd;
                comp = next;
        }
        return refuse_symlink(fd);
}

int vhub_open_beneath(int dir_fd, const char *rel, int flags) {
        struct open_how how = {
                .flags = (unsigned)(flags | O_NOFOLLOW | O_CLOEXEC),
                .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
        };
        long fd;

        if (!rel_valid(rel))
                return -EINVAL;
#ifdef SYS_openat2
        fd = syscall(SYS_openat2, dir_fd, rel[0] ? rel : ".", &how, sizeof(how));
        if (fd >= 0)
                return refuse_symlink((int)fd);
        /* ENOSYS: an old kernel; EPERM: a seccomp filter that does not know
         * openat2 (the walk refuses everything openat2 refuses) */
        if (errno != ENOSYS && errno != EPERM)
                return -errno;
#else
        (void)how;
        (void)fd;
#endif
        return vhub_open_beneath_walk(dir_fd, rel, flags);
}
