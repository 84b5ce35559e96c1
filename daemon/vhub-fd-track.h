/* SPDX-License-Identifier: MIT */
/*
 * Every fd the daemon holds has a name derived from its owner, computed by
 * the owner ("dev/1000/vm0/blk0/ring0.kick"), and every fd that must
 * survive a restart belongs to its owner object's fd-store group, a short
 * name ("d1a3") under which the fd store keeps that object's fds together
 * (docs/architecture.md, "fd names and groups"; docs/restart.md, "Groups").
 *
 * The hooks: an owner calls vhub_fd_track() as it takes an fd it keeps, and
 * vhub_fd_untrack() before it closes it (or hands it on).  The fd joins or
 * leaves its group in the fd store (when there is one), and a debug line
 * names it.  The visitors: each owner yields every fd it holds with its
 * name -- also those it holds only for a moment (an op's fds it has not
 * committed, a writer's dups, fds received and not yet claimed), which
 * have no group: they are not carried across a restart.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

struct vhub_context;
struct vhub_error;

/* A kind letter, up to 13 base-36 digits (2^64), NUL. */
#define VHUB_FD_GROUP_MAX 16
/* systemd's limit for an fd name (and so ours, for readable names too). */
#define VHUB_FD_NAME_MAX 256

/* The group kinds (docs/architecture.md): one letter each. */
#define VHUB_FD_GROUP_DEVICE     'd'    /* a device: socket, channel, listener, inflight, rings */
#define VHUB_FD_GROUP_VM         'v'    /* a VM: regions, dirty log */
#define VHUB_FD_GROUP_SHARED     'o'    /* a VM's shared objects (the VM's id) */
#define VHUB_FD_GROUP_CONNECTION 'c'    /* a control connection's socket */
#define VHUB_FD_GROUP_FRONTDOOR  'f'    /* a front-door device's socket, its VMM's connection
                                         * and channel (the device's id) */
#define VHUB_FD_GROUP_LISTENER   "L"    /* the control socket the daemon made */

/* What each owner object may store (its groups and snapshot file), charged
 * against its uid's share of the store before it is made. */
#define VHUB_VM_STORE_ENTRIES         3u        /* v, o, s (a device's fds join v) */
#define VHUB_FRONTDOOR_STORE_ENTRIES  1u        /* f */
#define VHUB_CONNECTION_STORE_ENTRIES 2u        /* c, k */

/* kind and id in base 36 into buf: "d1a3", "o7".  (A kind is a letter of
 * its own, never a suffix: "v1s" would also be VM 64's.) */
const char *vhub_fd_group(char buf[VHUB_FD_GROUP_MAX], char kind, uint64_t id);

/* The store entry named kind+id (a group, or a snapshot file) counts for
 * uid's share of the fd store from now on (own), or is nobody's (!own: its
 * owner object goes).  See vhub-fdstore-share.h. */
void vhub_fd_group_own(struct vhub_context *ctx, char kind, uint64_t id, uid_t uid, bool own);
/* Before making an object that will store n more entries for uid: 0, or
 * -32008 in err (uid's share of the fd store, or the non-root uids', is
 * used up: what it made would not survive a restart). */
int vhub_fd_store_check(struct vhub_context *ctx, uid_t uid, unsigned n, struct vhub_error *err);

/* What happens to an fd, for its group in the fd store. */
enum vhub_fd_change {
        VHUB_FD_LEAVES,         /* about to be closed or handed on: it leaves its group */
        VHUB_FD_KEPT,           /* kept by its owner: it joins its group */
        VHUB_FD_CLOSING,        /* leaves its group, closed right after (never handed on):
                                 * a connected socket may then stay in its stash, shut
                                 * down (vhub_fdstore_group_close()) */
};

/* fd (< 0: nothing), named by fmt, changes as how says. */
void vhub_fd_change(struct vhub_context *ctx, enum vhub_fd_change how, const char *group, int fd,
                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* kept true: it joins group; false: it leaves it. */
#define vhub_fd_note(ctx, kept, group, fd, ...)                                                  \
        vhub_fd_change((ctx), (kept) ? VHUB_FD_KEPT : VHUB_FD_LEAVES, (group), (fd), __VA_ARGS__)
#define vhub_fd_track(ctx, group, fd, ...) vhub_fd_change((ctx), VHUB_FD_KEPT, (group), (fd), __VA_ARGS__)
#define vhub_fd_untrack(ctx, group, fd, ...) vhub_fd_change((ctx), VHUB_FD_LEAVES, (group), (fd), __VA_ARGS__)
#define vhub_fd_untrack_closing(ctx, group, fd, ...)                                             \
        vhub_fd_change((ctx), VHUB_FD_CLOSING, (group), (fd), __VA_ARGS__)

/* One fd an owner holds: its name, and its group (NULL: not stored, the
 * owner holds it only for a moment or makes it again at start). */
struct vhub_fd_info {
        int fd;
        const char *name;
        const char *group;
};

struct vhub_fd_visitor {
        void (*visit)(const struct vhub_fd_info *info, void *userdata);
        void *userdata;
};

/* Name fd with fmt and hand it to v (fd < 0: nothing). */
void vhub_fd_visit(const struct vhub_fd_visitor *v, int fd, const char *group, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));
