/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "vhub-log.h"
#include "vhub-path-beneath.h"
#include "vhub-vmm-socket-dir.h"
#include "vhu-fd.h"

#define SUN_PATH_SIZE sizeof(((struct sockaddr_un *)NULL)->sun_path)
#define SOCKET_SUFFIX ".sock"
/* Connections a front-door socket queues before accept(): one VMM, plus
 * the ones about to be refused. */
#define VMM_SOCKET_BACKLOG 8

struct vhub_vmm_dir {
        char *path;
        int fd;                         /* O_PATH|O_DIRECTORY */
};

struct vhub_vmm_socket {
        struct vhub_cred owner;
        int uid_dir_fd;                 /* <vmm-dir>/<uid> */
        int vm_dir_fd;                  /* <vmm-dir>/<uid>/<vm> */
        char vm[VHUB_NAME_MAX + 1];
        char name[VHUB_NAME_MAX + sizeof(SOCKET_SUFFIX)];
        int inode_fd;                   /* O_PATH: the inode bind() created, held so
                                         * that its number cannot be reused */
};

/* Only for inodes one of them holds open (a number is not reused meanwhile),
 * or with the ctime as a second check. */
static bool same_inode(const struct stat *a, const struct stat *b) {
        return a->st_dev == b->st_dev && a->st_ino == b->st_ino &&
               a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

/* err filled with code and a sentence; returns -e (an errno that says what
 * happened, which the contract code alone would not). */
static int dir_fail(struct vhub_error *err, int code, int e, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

static int dir_fail(struct vhub_error *err, int code, int e, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vhub_error_setv(err, code, fmt, ap);
        va_end(ap);
        return -e;
}

/* ---- <vmm-dir> ---- */

int vhub_vmm_dir_open(const char *path, struct vhub_error *err, struct vhub_vmm_dir **ret) {
        struct vhub_vmm_dir *d;
        struct stat st;
        int fd;

        if (!path || path[0] != '/')
                return dir_fail(err, VHUB_ERR_INTERNAL, EINVAL, "--vmm-dir must be an absolute path");
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
                return dir_fail(err, VHUB_ERR_INTERNAL, errno, "cannot create %s: %s", path, strerror(errno));
        fd = open(path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
                return dir_fail(err, VHUB_ERR_INTERNAL, errno, "cannot open %s: %s", path, strerror(errno));
        /* root creates the per-uid directories here: nobody else may write */
        if (fstat(fd, &st) < 0 || st.st_uid != geteuid() || (st.st_mode & 022)) {
                fd = vhu_safe_close(fd);
                return dir_fail(err, VHUB_ERR_INTERNAL, EPERM,
                                "%s must be a directory of uid %u that only it can write", path,
                                (unsigned)geteuid());
        }
        d = calloc(1, sizeof(*d));
        if (!d || !(d->path = strdup(path))) {
                free(d);
                fd = vhu_safe_close(fd);
                return -ENOMEM;
        }
        d->fd = fd;
        *ret = d;
        return 0;
}

struct vhub_vmm_dir *vhub_vmm_dir_free(struct vhub_vmm_dir *d) {
        if (!d)
                return NULL;
        d->fd = vhu_safe_close(d->fd);
        free(d->path);
        free(d);
        return NULL;
}

const char *vhub_vmm_dir_path(const struct vhub_vmm_dir *d) {
        return d->path;
}

int vhub_vmm_dir_fd(const struct vhub_vmm_dir *d) {
        return d->fd;
}

/* ---- <uid>: created and handed over by the daemon itself ---- */

static int uid_dir_open(struct vhub_vmm_dir *d, const struct vhub_cred *owner, struct vhub_error *err) {
        char name[16];
        struct stat st;
        int fd;

        snprintf(name, sizeof(name), "%u", (unsigned)owner->uid);
        if (mkdirat(d->fd, name, 0700) < 0 && errno != EEXIST)
                return dir_fail(err, VHUB_ERR_INTERNAL, errno, "cannot create %s/%s: %s", d->path, name,
                                strerror(errno));
        fd = openat(d->fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
                return dir_fail(err, VHUB_ERR_INTERNAL, errno == ELOOP || errno == ENOTDIR ? EPERM : errno,
                                "%s/%s: %s", d->path, name, strerror(errno));
        if (fstat(fd, &st) < 0) {
                int r = dir_fail(err, VHUB_ERR_INTERNAL, errno, "%s/%s: %s", d->path, name, strerror(errno));

                fd = vhu_safe_close(fd);
                return r;
        }
        /* the owner's, or ours not handed over yet (a crash right after mkdirat) */
        if (st.st_uid != owner->uid && st.st_uid != geteuid()) {
                fd = vhu_safe_close(fd);
                return dir_fail(err, VHUB_ERR_INTERNAL, EPERM, "%s/%s belongs to uid %u, not to uid %u",
                                d->path, name, (unsigned)st.st_uid, (unsigned)owner->uid);
        }
        /* on the fd: the object checked is the object changed */
        if ((st.st_uid != owner->uid || st.st_gid != owner->gid) &&
            fchown(fd, owner->uid, owner->gid) < 0) {
                int r = dir_fail(err, VHUB_ERR_INTERNAL, errno, "cannot hand %s/%s to uid %u: %s", d->path,
                                 name, (unsigned)owner->uid, strerror(errno));

                fd = vhu_safe_close(fd);
                return r;
        }
        if ((st.st_mode & 07777) != 0700 && fchmod(fd, 0700) < 0) {
                int r = dir_fail(err, VHUB_ERR_INTERNAL, errno, "cannot make %s/%s private: %s", d->path,
                                 name, strerror(errno));

                fd = vhu_safe_close(fd);
                return r;
        }
        return fd;
}

/* ---- below <uid>: with the owner's identity ---- */

/* A new socket connected to the socket behind an O_PATH fd. */
static int socket_probe(int path_fd) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd, r = 0;

        snprintf(sa.sun_path, sizeof(sa.sun_path), "/proc/self/fd/%d", path_fd);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
                r = -errno;
        fd = vhu_safe_close(fd);
        return r;
}

/*
 * Make room for the socket: nothing there, or a socket nobody listens on
 * (left by a daemon that died) is removed.  A live socket or anything else
 * stays exactly as it is.
 */
static int entry_make_room(int dir_fd, const char *name, const char *path, struct vhub_error *err) {
        struct stat st, now;
        int pfd, r;

        if (fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                return errno == ENOENT ? 0 : dir_fail(err, VHUB_ERR_INTERNAL, errno, "%s: %s", path, strerror(errno));
        if (!S_ISSOCK(st.st_mode)) {
                return dir_fail(err, VHUB_ERR_EXISTS, EEXIST, "%s exists and is not a socket", path);
        }
        pfd = openat(dir_fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (pfd < 0)
                return dir_fail(err, VHUB_ERR_INTERNAL, errno, "%s: %s", path, strerror(errno));
        r = fstat(pfd, &now) < 0 || !same_inode(&st, &now) ? -ESTALE : socket_probe(pfd);
        pfd = vhu_safe_close(pfd);
        if (r == 0 || r == -EAGAIN) {
                return dir_fail(err, VHUB_ERR_EXISTS, EADDRINUSE, "a socket that is in use holds %s", path);
        }
        if (r != -ECONNREFUSED)
                return dir_fail(err, VHUB_ERR_INTERNAL, -r, "cannot tell whether %s is in use: %s", path,
                                strerror(-r));
        if (fstatat(dir_fd, name, &now, AT_SYMLINK_NOFOLLOW) < 0 || !same_inode(&st, &now))
                return dir_fail(err, VHUB_ERR_INTERNAL, ESTALE, "%s changed while it was checked", path);
        if (unlinkat(dir_fd, name, 0) < 0 && errno != ENOENT)
                return dir_fail(err, VHUB_ERR_INTERNAL, errno, "cannot remove the stale socket %s: %s", path,
                                strerror(errno));
        return 0;
}

/* bind() and listen() at name in dir_fd; the umask makes it 0600 at birth. */
static int bind_listen(struct vhub_vmm_socket *s, const char *path, struct vhub_error *err) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct stat st;
        mode_t mask;
        int fd, r;

        snprintf(sa.sun_path, sizeof(sa.sun_path), "/proc/self/fd/%d/%s", s->vm_dir_fd, s->name);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return dir_fail(err, VHUB_ERR_INTERNAL, errno, "socket: %s", strerror(errno));
        mask = umask(0177);
        r = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
        umask(mask);
        if (r < 0 || listen(fd, VMM_SOCKET_BACKLOG) < 0) {
                r = dir_fail(err, VHUB_ERR_INTERNAL, errno, "cannot listen on %s: %s", path, strerror(errno));
                fd = vhu_safe_close(fd);
                return r;
        }
        s->inode_fd = openat(s->vm_dir_fd, s->name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (s->inode_fd < 0 || fstat(s->inode_fd, &st) < 0 || !S_ISSOCK(st.st_mode)) {
                r = dir_fail(err, VHUB_ERR_INTERNAL, ESTALE, "%s vanished right after bind", path);
                s->inode_fd = vhu_safe_close(s->inode_fd);
                fd = vhu_safe_close(fd);
                return r;
        }
        return fd;
}

static int vm_dir_open(struct vhub_vmm_socket *s, const char *path, struct vhub_error *err) {
        struct stat st;
        int fd;

        if (mkdirat(s->uid_dir_fd, s->vm, 0700) < 0 && errno != EEXIST)
                return dir_fail(err, VHUB_ERR_INTERNAL, errno, "cannot create the directory of %s: %s", path,
                                strerror(errno));
        fd = vhub_open_beneath(s->uid_dir_fd, s->vm, O_RDONLY | O_DIRECTORY);
        if (fd < 0) {
                /* a symlink (ELOOP), or no directory (ENOTDIR): planted */
                return dir_fail(err, VHUB_ERR_INTERNAL, fd == -ELOOP || fd == -ENOTDIR ? EPERM : -fd,
                                "the directory of %s: %s", path, strerror(-fd));
        }
        if (fstat(fd, &st) < 0 || st.st_uid != s->owner.uid) {
                fd = vhu_safe_close(fd);
                return dir_fail(err, VHUB_ERR_INTERNAL, EPERM, "the directory of %s does not belong to uid %u",
                                path, (unsigned)s->owner.uid);
        }
        if ((st.st_mode & 07777) != 0700 && fchmod(fd, 0700) < 0) {
                int r = dir_fail(err, VHUB_ERR_INTERNAL, errno, "cannot make the directory of %s private: %s",
                                 path, strerror(errno));

                fd = vhu_safe_close(fd);
                return r;
        }
        return fd;
}

static int create_below(struct vhub_vmm_socket *s, const char *path, struct vhub_error *err) {
        mode_t mask = umask(0077);
        int r;

        r = s->vm_dir_fd = vm_dir_open(s, path, err);
        if (r >= 0)
                r = entry_make_room(s->vm_dir_fd, s->name, path, err);
        if (r >= 0)
                r = bind_listen(s, path, err);
        umask(mask);
        return r;
}

static struct vhub_vmm_socket *socket_free(struct vhub_vmm_socket *s) {
        if (!s)
                return NULL;
        s->inode_fd = vhu_safe_close(s->inode_fd);
        s->vm_dir_fd = vhu_safe_close(s->vm_dir_fd);
        s->uid_dir_fd = vhu_safe_close(s->uid_dir_fd);
        vhub_cred_done(&s->owner);
        free(s);
        return NULL;
}

int vhub_vmm_socket_create(struct vhub_vmm_dir *d, const struct vhub_cred *owner, const char *vm,
                           const char *device, struct vhub_error *err,
                           struct vhub_vmm_socket **ret_sock, char **ret_path) {
        struct vhub_cred_scope scope;
        struct vhub_vmm_socket *s;
        char path[SUN_PATH_SIZE];
        int fd, r;

        if (strlen(vm) > VHUB_NAME_MAX || strlen(device) > VHUB_NAME_MAX)
                return dir_fail(err, VHUB_ERR_PARAMS, ENAMETOOLONG, "VM or device name too long");
        /* what the VMM connects to must fit a sockaddr_un */
        if ((size_t)snprintf(path, sizeof(path), "%s/%u/%s/%s" SOCKET_SUFFIX, d->path, (unsigned)owner->uid,
                             vm, device) >= sizeof(path)) {
                return dir_fail(err, VHUB_ERR_PARAMS, ENAMETOOLONG,
                                "the front-door socket %s/%u/%s/%s" SOCKET_SUFFIX " would be longer than %zu bytes",
                                d->path, (unsigned)owner->uid, vm, device, SUN_PATH_SIZE - 1);
        }
        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->uid_dir_fd = s->vm_dir_fd = s->inode_fd = -1;
        snprintf(s->vm, sizeof(s->vm), "%s", vm);
        snprintf(s->name, sizeof(s->name), "%s" SOCKET_SUFFIX, device);
        if (vhub_cred_copy(owner, &s->owner) < 0) {
                free(s);
                return -ENOMEM;
        }
        r = s->uid_dir_fd = uid_dir_open(d, owner, err);
        if (r < 0)
                goto fail;
        r = vhub_cred_enter(&s->owner, &scope);
        if (r < 0) {
                dir_fail(err, VHUB_ERR_INTERNAL, -r, "cannot act as uid %u: %s", (unsigned)owner->uid,
                         strerror(-r));
                goto fail;
        }
        fd = create_below(s, path, err);
        vhub_cred_leave(&scope);
        if (fd < 0) {
                r = fd;
                goto fail;
        }
        *ret_path = strdup(path);
        if (!*ret_path) {
                fd = vhu_safe_close(fd);
                vhub_vmm_socket_remove(s);
                return -ENOMEM;
        }
        *ret_sock = s;
        return fd;

fail:
        socket_free(s);
        return r;
}

/* A socket adopt() could not take: its fds stay the caller's. */
static int adopt_fail(struct vhub_vmm_socket *s, int r) {
        s->uid_dir_fd = s->vm_dir_fd = s->inode_fd = -1;
        socket_free(s);
        return r;
}

int vhub_vmm_socket_adopt(struct vhub_vmm_dir *d, const struct vhub_cred *owner, const char *vm,
                          const char *device, int uid_dir_fd, int vm_dir_fd, int inode_fd,
                          struct vhub_vmm_socket **ret_sock, char **ret_path) {
        struct vhub_vmm_socket *s = calloc(1, sizeof(*s));
        char path[SUN_PATH_SIZE];
        struct stat st;

        if (!s)
                return -ENOMEM;
        s->uid_dir_fd = uid_dir_fd;
        s->vm_dir_fd = vm_dir_fd;
        s->inode_fd = inode_fd;
        if (strlen(vm) > VHUB_NAME_MAX || strlen(device) > VHUB_NAME_MAX ||
            (size_t)snprintf(path, sizeof(path), "%s/%u/%s/%s" SOCKET_SUFFIX, d->path, (unsigned)owner->uid, vm,
                             device) >= sizeof(path))
                return adopt_fail(s, -EINVAL);
        snprintf(s->vm, sizeof(s->vm), "%s", vm);
        snprintf(s->name, sizeof(s->name), "%s" SOCKET_SUFFIX, device);
        /* what the earlier run held, checked as it made them: two directories
         * of the owner's and the socket's inode */
        if (fstat(vm_dir_fd, &st) < 0 || !S_ISDIR(st.st_mode) || st.st_uid != owner->uid ||
            fstat(uid_dir_fd, &st) < 0 || !S_ISDIR(st.st_mode) || st.st_uid != owner->uid ||
            fstat(inode_fd, &st) < 0 || !S_ISSOCK(st.st_mode))
                return adopt_fail(s, -ESTALE);
        if (vhub_cred_copy(owner, &s->owner) < 0)
                return adopt_fail(s, -ENOMEM);
        if (!(*ret_path = strdup(path)))
                return adopt_fail(s, -ENOMEM);
        /* the object's from here: socket_free() closes them */
        *ret_sock = s;
        return 0;
}

void vhub_vmm_socket_foreach_fd(const struct vhub_vmm_socket *s,
                                void (*fn)(int fd, const char *what, void *userdata), void *userdata) {
        fn(s->uid_dir_fd, "dir/uid", userdata);
        fn(s->vm_dir_fd, "dir/vm", userdata);
        fn(s->inode_fd, "inode", userdata);
}

struct vhub_vmm_socket *vhub_vmm_socket_remove(struct vhub_vmm_socket *s) {
        struct vhub_cred_scope scope;
        struct stat ours, now;
        int r;

        if (!s)
                return NULL;
        r = vhub_cred_enter(&s->owner, &scope);
        if (r < 0) {
                vhub_log_full(LOG_WARNING, s->vm, NULL, NULL, "cannot act as uid %u to remove %s: %s",
                              (unsigned)s->owner.uid, s->name, strerror(-r));
                return socket_free(s);
        }
        if (s->inode_fd >= 0 && fstat(s->inode_fd, &ours) == 0 &&
            fstatat(s->vm_dir_fd, s->name, &now, AT_SYMLINK_NOFOLLOW) == 0 && same_inode(&ours, &now))
                (void)unlinkat(s->vm_dir_fd, s->name, 0);
        /* other devices' sockets keep the VM's directory: ENOTEMPTY is fine */
        (void)unlinkat(s->uid_dir_fd, s->vm, AT_REMOVEDIR);
        vhub_cred_leave(&scope);
        return socket_free(s);
}
