/* SPDX-License-Identifier: MIT */
/*
 * The daemon's side of systemd's fd store (docs/restart.md): every fd the
 * daemon holds is pushed to the service manager under a stable name as it is
 * created (FDSTORE=1, FDNAME=, FDPOLL=0) and removed when it is closed
 * (FDSTOREREMOVE=1), so that the next process gets them back
 * (LISTEN_FDS/LISTEN_FDNAMES).  A leaf module: names are opaque strings.
 *
 * One connected, non-blocking datagram socket to $NOTIFY_SOCKET (a path, or
 * "@name" in the abstract namespace).  Nothing here ever blocks the loop: a
 * message the socket cannot take now (the manager's queue is full: EAGAIN)
 * waits in an ordered queue, holding its own dup of the fd, until the socket
 * is writable again.  A push that fails for good (over the budget, the
 * manager gone, ...) is logged and counted, the daemon keeps the fd and
 * keeps running, and the store is "degraded": that fd will not survive a
 * restart, which the snapshot can say.
 *
 * The service manager keeps one entry per open file: a second fd for a file
 * already stored (a dup, or the same fd passed twice over SCM_RIGHTS, e.g.
 * one memfd behind two guest regions) would be silently dropped by systemd
 * with its name.  The store detects that (kcmp) and records the name as an
 * alias of the stored one, in an alias table it keeps in its own snapshot
 * memfd ("fdstore/aliases"); after a restart take() hands out a dup for an
 * alias.  Removing a name whose file other names share moves the file to
 * one of them.
 *
 * Groups: the daemon's owners do not push their fds one by one.  Each owner
 * object (a device, a VM's regions, a control connection...) has a short
 * group name, and its fds travel together in a *stash*: a SOCK_SEQPACKET
 * socket whose receive queue holds them (sent with SCM_RIGHTS), stored as
 * one fd under the group's name.  LISTEN_FDNAMES, whose 128 KiB bound is
 * what limits a store (docs/restart.md), then counts groups rather than
 * fds, and since every stored fd is a fresh socket the manager never drops
 * one as "the same file" (an fd two owners share is in both stashes).  A
 * change is applied once per loop iteration: a new member is appended to
 * the stored stash through its writing end, kept while the group changes
 * (the manager hears nothing); a member that leaves stays in it as a dead
 * fd, unless it is a socket (then, within 250 ms of the stash's last
 * rebuild, until the sweep); a stash is compacted (rebuilt: the members
 * copied under VHUB_FDSTORE_GROUP_ALT, remove, push, the copy removed: the
 * manager holds them at every instant, a crash loses nothing)
 * when it holds too many dead fds or appended messages, shortly after a
 * removal, and whenever appending cannot be used (see vhub-fdstore-group.c).
 * After a restart vhub_fdstore_take_group() reads a stash back: the fds in
 * the order they were added, dead ones included, each with its identity
 * key: the owners claim theirs by key and the rest are closed
 * (vhub-fd-claim.h).
 *
 * Contract: an fd pushed under a name stays open under the same number until
 * the name is removed (remove before close); a group member until it left
 * its group (vhub_fdstore_group_remove() before close).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct event_base;
struct vhub_fdstore;
struct vhub_fdstore_restore;

#define VHUB_FDSTORE_NAME_MAX    255u
/* names under this prefix belong to the store itself */
#define VHUB_FDSTORE_RESERVED    "fdstore/"
#define VHUB_FDSTORE_ALIASES     "fdstore/aliases"
#define VHUB_FDSTORE_DEFAULT_MAX 16384u
#define VHUB_FDSTORE_DEFAULT_QUEUE 65536u
/* systemd passes the names back in one environment variable,
 * "LISTEN_FDNAMES=a:b:...", and the kernel refuses to exec a process with
 * any single environment string over MAX_ARG_STRLEN (128 KiB): past that
 * budget the next start would fail, so pushes past it fail here.  The
 * socket units' names (e.g. "control") share it: a margin is kept. */
#define VHUB_FDSTORE_NAMES_BUDGET (131072u - sizeof("LISTEN_FDNAMES=") - 1024u)

/* systemd's rule for FDNAME= (fdname_is_valid): printable ASCII but ':',
 * at most 255 characters; empty names are refused here too. */
bool vhub_fdstore_name_valid(const char *name);

struct vhub_fdstore_options {
        const char *notify_socket;      /* NULL: $NOTIFY_SOCKET */
        bool disabled;                  /* --no-fd-store */
        /* FileDescriptorStoreMax= of the unit: pushes past it fail here
         * (systemd would drop them without telling).  0: $FDSTORE (set by
         * systemd >= 254), else VHUB_FDSTORE_DEFAULT_MAX. */
        unsigned max_fds;
        size_t max_queue;               /* 0: VHUB_FDSTORE_DEFAULT_QUEUE */
};

/* A disabled store (no $NOTIFY_SOCKET, or o->disabled) is a valid object on
 * which push/remove do nothing.  -EOPNOTSUPP: kcmp() is not available, so
 * fds the manager would merge cannot be told apart. */
int vhub_fdstore_new(struct event_base *base, const struct vhub_fdstore_options *o,
                     struct vhub_fdstore **ret);
struct vhub_fdstore *vhub_fdstore_free(struct vhub_fdstore *s);
bool vhub_fdstore_enabled(const struct vhub_fdstore *s);

/* 0: pushed (or queued, or tracked as failed: see degraded); 1: the fd's
 * file is already stored under another name, recorded as an alias.
 * -EINVAL bad or reserved name, -EEXIST name in use, -EBADF, -ENOMEM. */
int vhub_fdstore_push(struct vhub_fdstore *s, int fd, const char *name);
/* 0, or -ENOENT if the name was not pushed. */
int vhub_fdstore_remove(struct vhub_fdstore *s, const char *name);

/* ---- groups (see the head of this file) */

/* A rebuild of a group's stash stores the members under the group's name
 * and this suffix first, and removes that copy after the new stash: after
 * a crash in between, vhub_fdstore_take_group() takes the copy. */
#define VHUB_FDSTORE_GROUP_ALT "+"

/* fd (the owner's, borrowed: open until removed) joins group, whose stash
 * is rebuilt after the loop's current callback.  0 (also when disabled),
 * -EINVAL bad or reserved name, -EBADF, -EEXIST (already a member, or the
 * name of a single fd), -ENOMEM. */
int vhub_fdstore_group_add(struct vhub_fdstore *s, const char *group, int fd);
/* fd leaves group (an empty group is removed from the manager's store).
 * 0, or -ENOENT if it is not a member. */
int vhub_fdstore_group_remove(struct vhub_fdstore *s, const char *group, int fd);
/* As vhub_fdstore_group_remove(), for an fd its owner closes right after:
 * then a connected socket may stay in the stash dead too (no compaction,
 * so no message to the manager, for a device's connection that goes): it
 * is shut down here, both ways, so that its peer sees the end now, as at
 * the close, while the stash holds the open file until the next
 * compaction.  A listening socket still makes the stash compacted. */
int vhub_fdstore_group_close(struct vhub_fdstore *s, const char *group, int fd);
/* Members of group (0 when disabled or unknown). */
size_t vhub_fdstore_group_size(const struct vhub_fdstore *s, const char *group);
/* Rebuild every changed group's stash now (the loop does it on its own;
 * this is for a commit that must know its fds are stored, and for tests). */
void vhub_fdstore_sync(struct vhub_fdstore *s);
/* Sync, then every group's stash as one message of its members (those
 * appended to compacted), no writing end kept: a planned restart's last
 * step, so that the next start peeks every stash and pushes nothing. */
void vhub_fdstore_settle(struct vhub_fdstore *s);

/* What tells a group's fds apart after a restart: (st_dev, st_ino), unique
 * for sockets, memfds, pipes and directories; every eventfd shares one
 * anonymous inode, so theirs adds the kernel's eventfd id (+1; 0 where the
 * kernel does not show "eventfd-id:" in fdinfo -- a stash keeps its order,
 * which then tells them apart).  Two open files of one regular file (a
 * hugetlbfs file opened twice) share a key: interchangeable for mapping. */
struct vhub_fd_key {
        uint64_t dev, ino, eventfd_id;
};
int vhub_fd_key_of(int fd, struct vhub_fd_key *ret);
/* The key fd had when it joined group (computed then, once): 0, or
 * -ENOENT if it is not a member (or the store is disabled). */
int vhub_fdstore_group_key(const struct vhub_fdstore *s, const char *group, int fd,
                           struct vhub_fd_key *ret);
bool vhub_fdstore_contains(const struct vhub_fdstore *s, const char *name);
/* Whether the manager holds name: stored and its message sent (after a
 * flush: it reached the manager; false if its push failed or was refused). */
bool vhub_fdstore_held(const struct vhub_fdstore *s, const char *name);
/* How many more entries the store takes (max_fds less what is stored). */
unsigned vhub_fdstore_room(const struct vhub_fdstore *s);

/* ---- each uid's share of the store (vhub-fdstore-share.h) */

/* What is stored under name counts for uid's share (an owner object names
 * its groups and snapshot files as it is made, before anything is pushed).
 * 0 (also when disabled), -ENOMEM. */
int vhub_fdstore_own(struct vhub_fdstore *s, const char *name, uid_t uid);
/* The owner goes: name is nobody's (what is stored still counts until removed). */
void vhub_fdstore_disown(struct vhub_fdstore *s, const char *name);
/* May uid store n more entries?  0 (also when disabled, and for root), or
 * -EDQUOT: a push past it fails ("not stored"), so a call that would make
 * them is refused before it makes anything. */
int vhub_fdstore_share_check(const struct vhub_fdstore *s, uid_t uid, unsigned n);
/* How many entries stored now count for uid. */
unsigned vhub_fdstore_stored_by(const struct vhub_fdstore *s, uid_t uid);
/* The split: what one non-root uid, and all of them, may hold. */
void vhub_fdstore_share_limits(const struct vhub_fdstore *s, unsigned *per_uid, unsigned *non_root);
/* True if some live fd is not in the manager's store (it will not survive
 * a restart). */
bool vhub_fdstore_degraded(const struct vhub_fdstore *s);

struct vhub_fdstore_stats {
        size_t names;           /* tracked names (aliases included) */
        size_t names_bytes;     /* of LISTEN_FDNAMES at the next start */
        size_t stored;          /* entries the manager holds or will hold (queued) */
        size_t aliases;
        size_t failed;          /* names whose fd the manager does not hold */
        size_t queued;          /* messages waiting for the socket */
        size_t groups;          /* groups with members (each one stored fd: its stash) */
        size_t group_members;   /* fds in them */
        uint64_t pushes, removes, send_retries, push_failures, remove_failures;
};
void vhub_fdstore_get_stats(const struct vhub_fdstore *s, struct vhub_fdstore_stats *ret);

/* The fds the store itself holds, for the daemon's inventory: what ("notify",
 * "queued", "aliases") and the name it is stored under (NULL: none). */
void vhub_fdstore_foreach_fd(const struct vhub_fdstore *s,
                             void (*fn)(int fd, const char *what, const char *stored_as, void *userdata),
                             void *userdata);

/* Send what is queued, waiting at most timeout_ms for the socket (planned
 * shutdown only: this blocks).  0, or -ETIMEDOUT with messages left. */
int vhub_fdstore_flush(struct vhub_fdstore *s, int timeout_ms);

/* ---- restore: the fds the manager passed at start, by name */

/* From LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES (sd_listen_fds_with_names;
 * the variables are unset).  An empty map when none were passed.  s may be
 * NULL or disabled (then nothing is sent to the manager).  On error nothing
 * was closed. */
int vhub_fdstore_restore_from_env(struct vhub_fdstore *s, struct vhub_fdstore_restore **ret);
/* The same from explicit arrays (fds owned by the map on success). */
int vhub_fdstore_restore_from(struct vhub_fdstore *s, const int *fds, char *const *names, size_t n,
                              struct vhub_fdstore_restore **ret);
/* Fds still in the map (neither taken nor the store's own). */
size_t vhub_fdstore_restore_count(const struct vhub_fdstore_restore *r);
/* The i-th name passed (0 <= i < total), or NULL past the end. */
const char *vhub_fdstore_restore_name(const struct vhub_fdstore_restore *r, size_t i);
/* The fd stored under name, now owned by the caller (and tracked by the
 * store under the same name, as if pushed).  -ENOENT if absent or taken. */
int vhub_fdstore_take(struct vhub_fdstore_restore *r, const char *name);
/* A group's fds, in the order they were added, now the caller's (and the
 * group is stored again at once with them as members: reading the stash
 * emptied it).  *ret (malloc()ed, the caller frees it) and *ret_n; -ENOENT
 * if the name was not passed, or taken. */
struct vhub_fdstore_member {
        int fd;
        struct vhub_fd_key key;
};
int vhub_fdstore_take_group(struct vhub_fdstore_restore *r, const char *group,
                            struct vhub_fdstore_member **ret, size_t *ret_n);
/* How many groups take_group() could not take for want of fd numbers
 * (EMFILE/ENFILE: their stashes are left as they were), and the first's
 * name in *ret_first (NULL: none). */
unsigned vhub_fdstore_restore_short_of_fds(const struct vhub_fdstore_restore *r, const char **ret_first);
/* A group nobody restores: its fds closed now (what they hold -- a
 * listening socket, a back-end's connection -- goes at once, not whenever
 * the manager gets to the removal) and its name removed from the store.
 * 0, or -ENOENT if the name was not passed, or taken. */
int vhub_fdstore_drop_group(struct vhub_fdstore_restore *r, const char *group);
/* Close every fd nobody took and remove it from the manager's store (stale
 * names); frees r.  Returns how many were stale. */
int vhub_fdstore_restore_finish(struct vhub_fdstore_restore *r);
/* Give up (a snapshot the daemon cannot read): frees r, tells the manager
 * nothing, so the stored fds stay for a daemon that can.  Taken fds stay
 * with their takers. */
void vhub_fdstore_restore_abort(struct vhub_fdstore_restore *r);
/* Give up after part of the state was taken back (the process then ends
 * without a teardown): as abort, and what the takers changed in their
 * groups is not stored; only the stashes take_group() had to read (and so
 * empty) go back to the manager, within timeout_ms. */
int vhub_fdstore_restore_give_up(struct vhub_fdstore_restore *r, int timeout_ms);
