/* SPDX-License-Identifier: MIT */
/*
 * A restore claims its fds back from the groups the fd store passed
 * (docs/restart.md): an owner's group is taken once, and each fd its
 * snapshot names is claimed by the identity key the snapshot recorded
 * (vhub_fd_key).  What nobody claims (a change the snapshot did not record
 * yet) leaves the group and is closed when the claim is closed.  Claimed
 * fds stay members of the group, as their owners keep them.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "vhub-fdstore.h"
#include "vhub-fd-track.h"

struct vhub_snap_writer;
struct vhub_snap_rec;

struct vhub_fd_claim {
        char group[VHUB_FD_GROUP_MAX];
        struct vhub_fdstore *store;
        struct vhub_fdstore_member *m;  /* fd -1 once claimed */
        size_t n;
};

/* Take group from r (none passed: an empty claim, every claim fails). */
void vhub_fd_claim_open(struct vhub_fdstore_restore *r, struct vhub_fdstore *s, const char *group,
                        struct vhub_fd_claim *ret);
/* The member whose key is key, now the caller's: the fd, or -ENOENT. */
int vhub_fd_claim(struct vhub_fd_claim *c, const struct vhub_fd_key *key);
/* A claimed fd its owner does not keep (fd < 0: nothing): it leaves the
 * group, then it is closed -- the group must never hold a closed member
 * (its stash could not be rebuilt, and a later fd of the same number would
 * be stored under it).  Also after vhub_fd_claim_close().  Returns -1. */
int vhub_fd_claim_drop(struct vhub_fd_claim *c, int fd);
/* Such an fd a constructor that failed has closed already (taken in every
 * case): its number leaves the group (a removal makes no system call). */
void vhub_fd_claim_gone(struct vhub_fd_claim *c, int fd);
/* Every member not claimed leaves the group and is closed; returns how many. */
size_t vhub_fd_claim_close(struct vhub_fd_claim *c);

/* A key in a snapshot: 24 bytes, little-endian dev, ino, eventfd id. */
int vhub_snap_put_key(struct vhub_snap_writer *w, uint32_t tag, const struct vhub_fd_key *key);
int vhub_snap_get_key(const struct vhub_snap_rec *rec, struct vhub_fd_key *ret);
/* The key of fd, a member of group, as the store recorded it when it joined
 * (so: no system call); written only when it is a member. */
int vhub_snap_put_fd(struct vhub_snap_writer *w, uint32_t tag, const struct vhub_fdstore *s,
                     const char *group, int fd);
