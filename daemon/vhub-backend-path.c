/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "vhub-backend-path.h"
#include "vhub-fd-track.h"
#include "vhub-log.h"
#include "vhub-path-beneath.h"
#include "vhu-fd.h"

#define SUN_PATH_SIZE sizeof(((struct sockaddr_un *)NULL)->sun_path)

struct vhub_backend_dirs {
        size_t n;
        char **paths;           /* canonical, as configured */
        int *fds;               /* O_PATH|O_DIRECTORY; -1 until the directory exists */
};

struct vhub_backend_listener {
        int dir_fd;             /* O_PATH: the directory the socket was bound in */
        char name[SUN_PATH_SIZE];
        dev_t dev;              /* the inode bind() created; with ctime, so that a */
        ino_t ino;              /* reused inode number is not taken for it */
        struct timespec ctime;
};

/* ---- the back-end directories ---- */

static int dir_open(const char *path) {
        int fd = open(path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

        return fd < 0 ? -errno : fd;
}

int vhub_backend_dirs_new(const struct vhub_config *cfg, struct vhub_backend_dirs **ret) {
        struct vhub_backend_dirs *dirs = calloc(1, sizeof(*dirs));

        if (!dirs)
                return -ENOMEM;
        dirs->paths = calloc(cfg->n_backend_dirs + 1, sizeof(*dirs->paths));
        dirs->fds = calloc(cfg->n_backend_dirs + 1, sizeof(*dirs->fds));
        if (!dirs->paths || !dirs->fds)
                goto fail;
        for (size_t i = 0; i < cfg->n_backend_dirs; i++) {
                dirs->paths[i] = strdup(cfg->backend_dirs[i]);
                if (!dirs->paths[i])
                        goto fail;
                dirs->n++;
                /* the default directory may appear later: opened at first use */
                dirs->fds[i] = dir_open(dirs->paths[i]);
                if (dirs->fds[i] < 0)
                        dirs->fds[i] = -1;
        }
        *ret = dirs;
        return 0;

fail:
        vhub_backend_dirs_free(dirs);
        return -ENOMEM;
}

void vhub_backend_dirs_foreach_fd(const struct vhub_backend_dirs *dirs, const struct vhub_fd_visitor *v) {
        for (size_t i = 0; dirs && i < dirs->n; i++)
                vhub_fd_visit(v, dirs->fds[i], NULL, "daemon/backend-dir/%zu", i);
}

struct vhub_backend_dirs *vhub_backend_dirs_free(struct vhub_backend_dirs *dirs) {
        if (!dirs)
                return NULL;
        for (size_t i = 0; i < dirs->n; i++) {
                free(dirs->paths[i]);
                dirs->fds[i] = vhu_safe_close(dirs->fds[i]);
        }
        free(dirs->paths);
        free(dirs->fds);
        free(dirs);
        return NULL;
}

/* With the daemon's own rights, before acting for anyone. */
static void dirs_open_missing(struct vhub_backend_dirs *dirs) {
        for (size_t i = 0; i < dirs->n; i++)
                if (dirs->fds[i] < 0) {
                        int fd = dir_open(dirs->paths[i]);

                        dirs->fds[i] = fd < 0 ? -1 : fd;
                }
}

static const char *path_below(const char *dir, const char *path) {
        size_t n = strlen(dir);

        if (strcmp(dir, "/") == 0)
                return path[0] == '/' && path[1] != '\0' ? path + 1 : NULL;
        if (strncmp(dir, path, n) == 0 && path[n] == '/' && path[n + 1] != '\0')
                return path + n + 1;
        return NULL;
}

/* Which back-end directory holds the canonical path, and the rest below it. */
static int dirs_locate(const struct vhub_backend_dirs *dirs, const char *resolved, int *ret_fd,
                       const char **ret_rel) {
        for (size_t i = 0; i < dirs->n; i++) {
                const char *rel = path_below(dirs->paths[i], resolved);

                if (rel && dirs->fds[i] >= 0) {
                        *ret_fd = dirs->fds[i];
                        *ret_rel = rel;
                        return 0;
                }
        }
        return -ENOENT;
}

/*
 * Why an absolute path does not resolve, found with the caller's rights (the
 * caller's fs identity is in force): the deepest part of it that resolves,
 * and the first name below that.  Only a name that would lie inside a
 * back-end directory is described; anything else gets the answer a path
 * outside them gets, so the reply says nothing about what exists there.
 */
enum unresolved {
        UNRESOLVED_OUTSIDE,             /* or not known to be inside */
        UNRESOLVED_INSIDE,              /* inside; it exists but does not resolve */
        UNRESOLVED_MISSING_INSIDE,      /* inside, and there is no such name */
};

static bool in_backend_dirs(const struct vhub_backend_dirs *dirs, const char *resolved) {
        for (size_t i = 0; i < dirs->n; i++)
                if (strcmp(dirs->paths[i], resolved) == 0 || path_below(dirs->paths[i], resolved))
                        return true;
        return false;
}

static enum unresolved classify_unresolved(const struct vhub_backend_dirs *dirs, const char *path) {
        char prefix[PATH_MAX], resolved[PATH_MAX], first[PATH_MAX];
        size_t len = strlen(path), name_len;
        const char *name;
        struct stat st;

        if (path[0] != '/' || len >= sizeof(prefix))
                return UNRESOLVED_OUTSIDE;
        memcpy(prefix, path, len + 1);
        for (;;) {
                char *slash = strrchr(prefix, '/');

                if (!slash)
                        return UNRESOLVED_OUTSIDE;
                *slash = '\0';
                name = path + (slash - prefix) + 1;
                if (prefix[0] == '\0') {
                        strcpy(resolved, "/");
                        break;
                }
                if (realpath(prefix, resolved))
                        break;
        }
        name_len = strcspn(name, "/");
        if (name_len == 0 || (name_len == 1 && name[0] == '.') || (name_len == 2 && strncmp(name, "..", 2) == 0))
                return UNRESOLVED_OUTSIDE;
        if ((size_t)snprintf(first, sizeof(first), "%s/%.*s", strcmp(resolved, "/") ? resolved : "",
                             (int)name_len, name) >= sizeof(first) ||
            !in_backend_dirs(dirs, first))
                return UNRESOLVED_OUTSIDE;
        if (lstat(first, &st) < 0 && errno == ENOENT)
                return UNRESOLVED_MISSING_INSIDE;
        return UNRESOLVED_INSIDE;
}

/* ---- sockets through fds ---- */

/* A new socket connected to the socket behind an O_PATH fd (with the
 * caller's current fs identity: the kernel checks write permission). */
static int socket_connect_fd(int path_fd) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_close_ int fd = -1;

        snprintf(sa.sun_path, sizeof(sa.sun_path), "/proc/self/fd/%d", path_fd);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
                return -errno;
        return VHU_TAKE_FD(fd);
}

static bool same_inode(const struct stat *a, const struct stat *b) {
        return a->st_dev == b->st_dev && a->st_ino == b->st_ino &&
               a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

/* ---- client mode ---- */

static int open_checked(struct vhub_backend_dirs *dirs, uid_t owner_uid, const char *path,
                        struct vhub_error *err) {
        char resolved[PATH_MAX];
        const char *rel;
        struct stat st;
        _cleanup_close_ int fd = -1;
        int dir_fd;

        if (!realpath(path, resolved)) {
                int e = errno;

                switch (classify_unresolved(dirs, path)) {
                case UNRESOLVED_MISSING_INSIDE:
                        return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "no such socket: %s", path);
                case UNRESOLVED_INSIDE:
                        return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                              "back-end socket %s cannot be resolved: %s", path, strerror(e));
                case UNRESOLVED_OUTSIDE:
                        break;
                }
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket %s is outside the back-end directories", path);
        }
        if (dirs_locate(dirs, resolved, &dir_fd, &rel) < 0)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket %s is outside the back-end directories", path);
        fd = vhub_open_beneath(dir_fd, rel, O_PATH);
        if (fd < 0)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "back-end socket %s: %s", path,
                                      strerror(-fd));
        if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "%s is not a socket", path);
        if (st.st_uid != owner_uid && st.st_uid != 0)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket %s is owned by uid %u, not by the caller or root",
                                      path, (unsigned)st.st_uid);
        return VHU_TAKE_FD(fd);
}

int vhub_backend_path_open(struct vhub_backend_dirs *dirs, const struct vhub_cred *cred,
                           uid_t owner_uid, const char *path, struct vhub_error *err) {
        struct vhub_cred_scope scope;
        int r;

        if (!path || path[0] != '/')
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket path must be absolute");
        dirs_open_missing(dirs);
        r = vhub_cred_enter(cred, &scope);
        if (r < 0)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "cannot act as uid %u: %s",
                                      (unsigned)cred->uid, strerror(-r));
        r = open_checked(dirs, owner_uid, path, err);
        vhub_cred_leave(&scope);
        return r;
}

int vhub_backend_path_connect(int path_fd, const struct vhub_cred *cred) {
        struct vhub_cred_scope scope;
        int r;

        r = vhub_cred_enter(cred, &scope);
        if (r < 0)
                return r;
        r = socket_connect_fd(path_fd);
        vhub_cred_leave(&scope);
        return r;
}

/* ---- server mode ---- */

/*
 * An existing entry at name: only a socket of owner_uid (or root's, for a
 * root caller) that nobody listens on is removed; everything else stays
 * exactly as it was.  Whether anybody listens is asked the only way that
 * works across network namespaces: a connect() (a live back-end sees one
 * connection close at once).  0: the name is free.
 */
static int entry_make_room(int parent, const char *name, const struct vhub_cred *cred,
                           uid_t owner_uid, const char *path, struct vhub_error *err) {
        struct stat st, now;
        _cleanup_close_ int sfd = -1;
        int probe;

        if (fstatat(parent, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                return errno == ENOENT ? 0
                                       : vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "%s: %s", path,
                                                        strerror(errno));
        if (!S_ISSOCK(st.st_mode))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "%s exists and is not a socket", path);
        if (st.st_uid != owner_uid && !(cred->uid == 0 && st.st_uid == 0))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "%s is a socket of uid %u: only the caller's own stale socket is replaced",
                                      path, (unsigned)st.st_uid);
        sfd = openat(parent, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (sfd < 0)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "%s: %s", path, strerror(errno));
        if (fstat(sfd, &now) < 0 || !same_inode(&st, &now))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "%s changed while it was checked", path);
        probe = socket_connect_fd(sfd);
        sfd = vhu_safe_close(sfd);
        if (probe >= 0 || probe == -EAGAIN) {
                vhu_safe_close(probe);
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "a back-end listens on %s; it is not replaced", path);
        }
        if (probe != -ECONNREFUSED)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "cannot tell whether %s is in use: %s", path, strerror(-probe));
        if (fstatat(parent, name, &now, AT_SYMLINK_NOFOLLOW) < 0 || !same_inode(&st, &now))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "%s changed while it was checked", path);
        if (unlinkat(parent, name, 0) < 0 && errno != ENOENT)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "cannot remove the stale socket %s: %s",
                                      path, strerror(errno));
        return 0;
}

/* Remove name if it still is the inode *st describes. */
static void entry_remove_if_same(int parent, const char *name, const struct stat *st) {
        struct stat now;

        if (fstatat(parent, name, &now, AT_SYMLINK_NOFOLLOW) == 0 && same_inode(st, &now))
                (void)unlinkat(parent, name, 0);
}

/*
 * bind() and listen() at name in parent (through /proc/self/fd: bind has no
 * *at variant), with the current fs identity, then hand the socket to
 * owner_uid if that is not who created it.  Records the inode in *l.
 */
static int bind_listen(int parent, const char *name, uid_t creator, uid_t owner_uid,
                       const char *path, struct vhub_backend_listener *l, struct vhub_error *err) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct stat st;
        mode_t mask;
        int fd, sfd = -1, r;

        if ((size_t)snprintf(sa.sun_path, sizeof(sa.sun_path), "/proc/self/fd/%d/%s", parent, name) >=
            sizeof(sa.sun_path))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "socket name too long in %s", path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        /* 0700 whatever umask the daemon was started with: only its owner
         * (and root) may connect and be the VM's back-end */
        mask = umask(0077);
        r = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
        umask(mask);
        if (r < 0) {
                r = -errno;
                vhu_safe_close(fd);
                if (r == -EACCES || r == -EPERM)
                        return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "uid %u may not create %s: %s",
                                              (unsigned)creator, path, strerror(-r));
                if (r == -EADDRINUSE)
                        return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                              "%s was created by someone else meanwhile", path);
                return r;
        }
        /* what bind() made: if the name holds anything else by now, someone
         * replaced it -- leave theirs alone */
        sfd = openat(parent, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (sfd < 0 || fstat(sfd, &st) < 0 || !S_ISSOCK(st.st_mode) || st.st_uid != creator) {
                r = vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "%s was replaced while it was created", path);
                goto fail_keep;
        }
        if (owner_uid != creator) {
                /* root acting for another uid: the socket is that uid's */
                if (fchownat(sfd, "", owner_uid, (gid_t)-1, AT_EMPTY_PATH) < 0 || fstat(sfd, &st) < 0) {
                        r = -errno;
                        goto fail_remove;
                }
        }
        if (listen(fd, 4) < 0) {
                r = -errno;
                goto fail_remove;
        }
        vhu_safe_close(sfd);
        l->dev = st.st_dev;
        l->ino = st.st_ino;
        l->ctime = st.st_ctim;
        return fd;

fail_remove:
        entry_remove_if_same(parent, name, &st);
fail_keep:
        vhu_safe_close(sfd);
        vhu_safe_close(fd);
        return r;
}

/* Split an absolute path into its directory ("/" at least) and last name. */
static int path_split(const char *path, char dir[PATH_MAX], char name[SUN_PATH_SIZE]) {
        const char *slash = strrchr(path, '/');
        size_t dn = slash == path ? 1 : (size_t)(slash - path);

        if (!slash || strlen(slash + 1) >= SUN_PATH_SIZE || dn >= PATH_MAX)
                return -EINVAL;
        memcpy(dir, path, dn);
        dir[dn] = '\0';
        strcpy(name, slash + 1);
        if (!name[0] || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
                return -EINVAL;
        return 0;
}

static int listen_checked(struct vhub_backend_dirs *dirs, const struct vhub_cred *cred,
                          uid_t creator, uid_t owner_uid, const char *path, struct vhub_error *err,
                          struct vhub_backend_listener *l, char **ret_path) {
        char dir[PATH_MAX], resolved_dir[PATH_MAX], full[PATH_MAX], rel_dir[PATH_MAX];
        const char *rel, *slash;
        int dir_fd, fd, r;

        if (path_split(path, dir, l->name) < 0)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "bad socket name in %s", path);
        if (!realpath(dir, resolved_dir)) {
                int e = errno;

                switch (classify_unresolved(dirs, dir)) {
                case UNRESOLVED_MISSING_INSIDE:
                        return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "no such directory: %s", dir);
                case UNRESOLVED_INSIDE:
                        return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "directory of %s cannot be resolved: %s",
                                              path, strerror(e));
                case UNRESOLVED_OUTSIDE:
                        break;
                }
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket %s is outside the back-end directories", path);
        }
        if ((size_t)snprintf(full, sizeof(full), "%s/%s", strcmp(resolved_dir, "/") ? resolved_dir : "",
                             l->name) >= sizeof(full))
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "path too long");
        if (dirs_locate(dirs, full, &dir_fd, &rel) < 0)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket %s is outside the back-end directories", path);
        /* a back-end must be able to connect to the path it is given */
        if (strlen(full) >= SUN_PATH_SIZE)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "socket path too long for AF_UNIX");
        slash = strrchr(rel, '/');
        snprintf(rel_dir, sizeof(rel_dir), "%.*s", slash ? (int)(slash - rel) : 0, rel);
        l->dir_fd = vhub_open_beneath(dir_fd, rel_dir, O_PATH | O_DIRECTORY);
        if (l->dir_fd < 0)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "directory of %s: %s", path,
                                      strerror(-l->dir_fd));
        r = entry_make_room(l->dir_fd, l->name, cred, owner_uid, path, err);
        if (r < 0)
                return r;
        fd = bind_listen(l->dir_fd, l->name, creator, owner_uid, path, l, err);
        if (fd < 0)
                return fd;
        *ret_path = strdup(full);
        if (!*ret_path) {
                struct stat st = { .st_dev = l->dev, .st_ino = l->ino, .st_ctim = l->ctime };

                entry_remove_if_same(l->dir_fd, l->name, &st);
                vhu_safe_close(fd);
                return -ENOMEM;
        }
        return fd;
}

int vhub_backend_path_listen(struct vhub_backend_dirs *dirs, const struct vhub_cred *cred,
                             uid_t owner_uid, const char *path, struct vhub_error *err,
                             struct vhub_backend_listener **ret_listener, char **ret_path) {
        struct vhub_backend_listener *l;
        struct vhub_cred_scope scope;
        char *resolved = NULL;
        int fd, r;

        if (!path || path[0] != '/' || strlen(path) >= PATH_MAX)
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED,
                                      "back-end socket path must be absolute");
        l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        l->dir_fd = -1;
        dirs_open_missing(dirs);
        r = vhub_cred_enter(cred, &scope);
        if (r < 0) {
                free(l);
                return vhub_error_set(err, VHUB_ERR_NOT_ALLOWED, "cannot act as uid %u: %s",
                                      (unsigned)cred->uid, strerror(-r));
        }
        fd = listen_checked(dirs, cred, scope.switched ? cred->uid : geteuid(), owner_uid, path,
                            err, l, &resolved);
        vhub_cred_leave(&scope);
        if (fd < 0) {
                vhu_safe_close(l->dir_fd);
                free(l);
                return fd;
        }
        *ret_listener = l;
        *ret_path = resolved;
        return fd;
}

void vhub_backend_listener_remove_in_crash(const struct vhub_backend_listener *l) {
        struct stat st;

        if (!l || l->dir_fd < 0)
                return;
        st = (struct stat){ .st_dev = l->dev, .st_ino = l->ino, .st_ctim = l->ctime };
        entry_remove_if_same(l->dir_fd, l->name, &st);
}

int vhub_backend_listener_dir_fd(const struct vhub_backend_listener *l) {
        return l ? l->dir_fd : -1;
}

struct vhub_backend_listener *vhub_backend_listener_forget(struct vhub_backend_listener *l) {
        if (!l)
                return NULL;
        vhu_safe_close(l->dir_fd);
        free(l);
        return NULL;
}

void vhub_backend_listener_get(const struct vhub_backend_listener *l, struct vhub_backend_listener_state *ret) {
        *ret = (struct vhub_backend_listener_state){
                .dev = (uint64_t)l->dev, .ino = (uint64_t)l->ino,
                .ctime_sec = (int64_t)l->ctime.tv_sec, .ctime_nsec = (int64_t)l->ctime.tv_nsec,
        };
        snprintf(ret->name, sizeof(ret->name), "%s", l->name);
}

struct vhub_backend_listener *vhub_backend_listener_adopt(int dir_fd, const struct vhub_backend_listener_state *st) {
        struct vhub_backend_listener *l;

        if (dir_fd < 0 || !st->name[0] || strchr(st->name, '/') || !(l = calloc(1, sizeof(*l)))) {
                vhu_safe_close(dir_fd);
                return NULL;
        }
        l->dir_fd = dir_fd;
        snprintf(l->name, sizeof(l->name), "%s", st->name);
        l->dev = (dev_t)st->dev;
        l->ino = (ino_t)st->ino;
        l->ctime.tv_sec = (time_t)st->ctime_sec;
        l->ctime.tv_nsec = (long)st->ctime_nsec;
        return l;
}

struct vhub_backend_listener *vhub_backend_listener_free(struct vhub_backend_listener *l,
                                                         const struct vhub_cred *cred) {
        struct vhub_cred_scope scope;
        struct stat st;
        int r;

        if (!l)
                return NULL;
        st = (struct stat){ .st_dev = l->dev, .st_ino = l->ino, .st_ctim = l->ctime };
        r = vhub_cred_enter(cred, &scope);
        if (r < 0)
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL, "cannot act as uid %u to remove socket %s: %s",
                              (unsigned)cred->uid, l->name, strerror(-r));
        else {
                entry_remove_if_same(l->dir_fd, l->name, &st);
                vhub_cred_leave(&scope);
        }
        vhu_safe_close(l->dir_fd);
        free(l);
        return NULL;
}
