/* SPDX-License-Identifier: MIT */
/*
 * The back-end allowlist (contract: "Identity and isolation"): a back-end
 * socket must resolve -- symlinks and ".." included -- to a path inside one
 * of the --backend-dir directories, and (client mode) be a socket owned by
 * the VM's uid or root.  Anything else is -32010 and nothing is connected.
 *
 * The daemon acts as root for every uid, so every check and every use is
 * done (1) with the requesting uid's own rights (struct vhub_cred: the
 * kernel decides what that uid may search, create, remove or connect to)
 * and (2) on the object that was checked: each --backend-dir is opened once;
 * realpath() only tells which one a path lies in; the rest is opened below
 * that directory's fd without following any symlink (vhub-path-beneath.h),
 * checked on the fd, and bound, connected or unlinked relative to it --
 * never looked up by name from "/" again.
 */
#pragma once

#include <stdint.h>

#include <stdbool.h>
#include <sys/types.h>

#include "vhub-config.h"
#include "vhub-cred.h"
#include "vhub-error.h"

/* The --backend-dir directories, each opened once (O_PATH). */
struct vhub_backend_dirs;

int vhub_backend_dirs_new(const struct vhub_config *cfg, struct vhub_backend_dirs **ret);
struct vhub_backend_dirs *vhub_backend_dirs_free(struct vhub_backend_dirs *dirs);
struct vhub_fd_visitor;
/* The directories' fds ("daemon/backend-dir/<i>", opened again at start:
 * not stored).  NULL-safe. */
void vhub_backend_dirs_foreach_fd(const struct vhub_backend_dirs *dirs, const struct vhub_fd_visitor *v);

/*
 * Client mode: resolve and check path with cred's rights and open the
 * socket O_PATH, so that the check and the connect see the same inode.
 * owner_uid: the VM's uid (the socket must be its or root's).  Returns the
 * O_PATH fd; -32010 in err otherwise.
 */
int vhub_backend_path_open(struct vhub_backend_dirs *dirs, const struct vhub_cred *cred,
                           uid_t owner_uid, const char *path, struct vhub_error *err);
/*
 * Connect a new non-blocking socket, with cred's rights, to the socket
 * behind an O_PATH fd.  Returns the socket or a negative errno (-EACCES:
 * cred's uid may not connect to it).
 */
int vhub_backend_path_connect(int path_fd, const struct vhub_cred *cred);

/* A server-mode socket the daemon created, to remove it (only it) later. */
struct vhub_backend_listener;

/*
 * Server mode: create a listening socket (non-blocking, CLOEXEC) at path
 * with cred's rights, owned by owner_uid.  The directory must resolve inside
 * a back-end directory and cred's uid must be allowed to create there.  An
 * existing entry is replaced only if it is a socket of owner_uid (or, for a
 * root caller, of root) that nobody listens on; anything else is left
 * exactly as it was.  Returns the listening fd; *ret_listener and
 * *ret_path (the resolved path, for display) are malloc'd.  Refusals are
 * -32010 in err; any other failure is a negative errno with err untouched
 * (the caller reports it).
 */
int vhub_backend_path_listen(struct vhub_backend_dirs *dirs, const struct vhub_cred *cred,
                             uid_t owner_uid, const char *path, struct vhub_error *err,
                             struct vhub_backend_listener **ret_listener, char **ret_path);
/*
 * Remove the socket, with cred's rights, if its name still holds the inode
 * bind() created (never someone's replacement), and free l.  NULL-safe;
 * returns NULL.
 */
struct vhub_backend_listener *vhub_backend_listener_free(struct vhub_backend_listener *l,
                                                         const struct vhub_cred *cred);
/*
 * For a fatal signal's handler: remove the socket the same way -- relative
 * to the directory fd, only if the name still holds the inode bind()
 * created -- with nothing but async-signal-safe calls (fstatat, unlinkat)
 * and the daemon's own rights (the name checked is in the directory that
 * was checked, so that is no more than the uid could do).  Never by its
 * path: the uid may have turned a directory on the way into a symlink.
 */
void vhub_backend_listener_remove_in_crash(const struct vhub_backend_listener *l);
/* Free l without removing its socket (a restore that gave up on it). */
struct vhub_backend_listener *vhub_backend_listener_forget(struct vhub_backend_listener *l);
/* What a restart snapshot keeps of a listener, to take it back. */
struct vhub_backend_listener_state {
        char name[108];         /* in its directory */
        uint64_t dev, ino;
        int64_t ctime_sec, ctime_nsec;
};
void vhub_backend_listener_get(const struct vhub_backend_listener *l, struct vhub_backend_listener_state *ret);
/* dir_fd (the directory's O_PATH fd) taken in every case; NULL on failure. */
struct vhub_backend_listener *vhub_backend_listener_adopt(int dir_fd, const struct vhub_backend_listener_state *st);
/* The O_PATH fd of the directory l's socket is in (l keeps it). */
int vhub_backend_listener_dir_fd(const struct vhub_backend_listener *l);
