/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "vhub-backend-path.h"

static bool path_inside(const char *dir, const char *path) {
        size_t n = strlen(dir);

        if (strcmp(dir, "/") == 0)
                return path[0] == '/';
        return strncmp(dir, path, n) == 0 && path[n] == '/' && path[n + 1] != '\0';
}

static bool path_allowed(const struct vhub_config *cfg, const char *resolved) {
        for (size_t i = 0; i < cfg->n_backend_dirs; i++)
                if (path_inside(cfg->backend_dirs[i], resolved))
                        return true;
        return false;
}

int vhub_backend_path_open(const struct vhub_config *cfg, uid_t uid, const char *path,
                           struct vhub_error *err) {
        char resolved[PATH_MAX];
        struct stat st;
        int fd;

        if (!path || path[0] != '/')
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket path must be absolute");
        if (!realpath(path, resolved))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket %s cannot be resolved: %s", path,
                                      strerror(errno));
        if (!path_allowed(cfg, resolved))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket %s is outside the back-end directories", path);
        fd = open(resolved, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "back-end socket %s: %s", path,
                                      strerror(errno));
        if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode)) {
                close(fd);
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "%s is not a socket", path);
        }
        if (st.st_uid != uid && st.st_uid != 0) {
                close(fd);
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket %s is owned by uid %u, not by the caller or root",
                                      path, (unsigned)st.st_uid);
        }
        return fd;
}

int vhub_backend_path_connect(int path_fd) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd;

        snprintf(sa.sun_path, sizeof(sa.sun_path), "/proc/self/fd/%d", path_fd);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
                int r = -errno;

                close(fd);
                return r;
        }
        return fd;
}

int vhub_backend_path_for_listen(const struct vhub_config *cfg, uid_t uid, const char *path,
                                 struct vhub_error *err, char **ret_path) {
        char dir_copy[PATH_MAX], base_copy[PATH_MAX], resolved_dir[PATH_MAX], full[PATH_MAX];
        const char *base;
        struct stat st;

        if (!path || path[0] != '/' || strlen(path) >= sizeof(dir_copy))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket path must be absolute");
        snprintf(dir_copy, sizeof(dir_copy), "%s", path);
        snprintf(base_copy, sizeof(base_copy), "%s", path);
        base = basename(base_copy);
        if (!*base || strcmp(base, ".") == 0 || strcmp(base, "..") == 0 || strcmp(base, "/") == 0)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "bad socket name in %s", path);
        if (!realpath(dirname(dir_copy), resolved_dir))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "directory of %s cannot be resolved: %s",
                                      path, strerror(errno));
        if ((size_t)snprintf(full, sizeof(full), "%s/%s", resolved_dir, base) >= sizeof(full))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "path too long");
        if (!path_allowed(cfg, full))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket %s is outside the back-end directories", path);
        if (strlen(full) >= sizeof(((struct sockaddr_un *)NULL)->sun_path))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "socket path too long for AF_UNIX");
        if (lstat(full, &st) == 0) {
                if (!S_ISSOCK(st.st_mode) || (st.st_uid != uid && st.st_uid != 0))
                        return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                              "%s exists and is not a socket of the caller or root", path);
        }
        *ret_path = strdup(full);
        if (!*ret_path)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        return 0;
}

int vhub_backend_path_listen(const char *resolved_path, uid_t uid) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd, r;

        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", resolved_path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        (void)unlink(resolved_path); /* a stale socket from an earlier listener */
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 4) < 0) {
                r = -errno;
                close(fd);
                return r;
        }
        /* the back-end runs as the VM's owner; let it connect */
        if (uid != 0 && chown(resolved_path, uid, (gid_t)-1) < 0) {
                r = -errno;
                close(fd);
                (void)unlink(resolved_path);
                return r;
        }
        return fd;
}
