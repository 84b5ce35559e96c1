/* SPDX-License-Identifier: MIT */
/*
 * The front-door socket directory (contract: "The vhost-user front door"):
 * <vmm-dir>/<uid>/<vm>/<device>.sock, directories 0700 and the socket 0600,
 * all owned by the VM's uid.
 *
 * vhubd runs as root and creates these inside directories their uid owns,
 * so nothing is ever looked up by name from "/" again (the same rules as
 * daemon/vhub-backend-path.h, with its helpers):
 *   - <vmm-dir> is opened once and must belong to the daemon, writable by
 *     nobody else;
 *   - <uid> is the only thing root creates itself, in <vmm-dir> where nobody
 *     else can write: mkdirat, then opened O_NOFOLLOW|O_DIRECTORY, checked,
 *     and handed over with fchown/fchmod on that fd;
 *   - everything below it is done with the owner's file-system identity
 *     (vhub_cred_enter(): fsuid/fsgid/groups), so a symlink, a rename or a
 *     planted file there can only ever affect what that uid itself may do:
 *     mkdirat, vhub_open_beneath() (no symlinks anywhere), bind() through
 *     /proc/self/fd/<vm dir>/<name> (bind has no *at variant), with a
 *     umask that makes the socket 0600 from the start (no chmod/chown
 *     window);
 *   - removal unlinks the name only while it still holds the inode bind()
 *     created -- held open (O_PATH) meanwhile, so that its number cannot
 *     be reused by a replacement -- then the VM's directory if it is empty.
 *
 * The listening fd is returned; what listens on it is vhub-vmm-listener.
 */
#pragma once

#include "vhub-cred.h"
#include "vhub-error.h"

/* --vmm-dir, opened once. */
struct vhub_vmm_dir;

/*
 * Open path (absolute), creating its last component (0755) if missing.  It
 * must be a directory owned by the daemon's euid and writable by nobody
 * else, else -EPERM with err filled.
 */
int vhub_vmm_dir_open(const char *path, struct vhub_error *err, struct vhub_vmm_dir **ret);
struct vhub_vmm_dir *vhub_vmm_dir_free(struct vhub_vmm_dir *d);
const char *vhub_vmm_dir_path(const struct vhub_vmm_dir *d);
/* Its O_PATH directory fd (for the owner's inventory). */
int vhub_vmm_dir_fd(const struct vhub_vmm_dir *d);

/* One front-door socket the daemon created, to remove it (only it) later. */
struct vhub_vmm_socket;

/*
 * Create <vmm-dir>/<owner uid>/<vm>/<device>.sock and listen on it
 * (non-blocking, CLOEXEC).  owner: whose files they are (uid, gid, groups
 * the files are created with; copied).  vm and device are names the caller
 * validated ([A-Za-z0-9._-], not "." or "..").  Returns the listening fd
 * and fills *ret_sock and *ret_path (malloc'd: what the VMM connects to).
 * Errors, with err filled (the contract code in err->code):
 *   -ENAMETOOLONG (-32602): the path would not fit a sockaddr_un, so no VMM
 *                 could connect;
 *   -EADDRINUSE, -EEXIST (-32003): a live socket, or something that is no
 *                 socket, holds the name;
 *   -EPERM (-32603): a directory on the way is a symlink, or not the
 *                 owner's; or the daemon may not act as the owner;
 *   other errnos (-32603): what the file system said.
 * Nothing is left behind on failure but directories that were missing.
 */
int vhub_vmm_socket_create(struct vhub_vmm_dir *d, const struct vhub_cred *owner, const char *vm,
                           const char *device, struct vhub_error *err,
                           struct vhub_vmm_socket **ret_sock, char **ret_path);
/*
 * A socket an earlier run of the daemon made (docs/restart.md, "Front-door
 * devices"), from the fds it held: the <uid> and <vm> directories and the
 * socket's O_PATH inode (taken on success; on failure still the caller's).  They
 * are checked as creation checks them (the owner's directories, a socket).
 * 0 with *ret_sock and *ret_path (malloc'd) filled, or -errno.
 */
int vhub_vmm_socket_adopt(struct vhub_vmm_dir *d, const struct vhub_cred *owner, const char *vm,
                          const char *device, int uid_dir_fd, int vm_dir_fd, int inode_fd,
                          struct vhub_vmm_socket **ret_sock, char **ret_path);
/*
 * Remove the socket's name if it still holds the socket created (never a
 * replacement), then the VM's directory if nothing else is left in it; all
 * with the owner's identity.  Frees s; NULL-safe; returns NULL.  The
 * listening fd is not touched.
 */
struct vhub_vmm_socket *vhub_vmm_socket_remove(struct vhub_vmm_socket *s);
/* What the socket's object holds open until it goes: fn(fd, what) with
 * "dir/uid", "dir/vm" (the directories it was made in, which its removal
 * uses) and "inode" (O_PATH, the inode bind() made). */
void vhub_vmm_socket_foreach_fd(const struct vhub_vmm_socket *s,
                                void (*fn)(int fd, const char *what, void *userdata), void *userdata);
