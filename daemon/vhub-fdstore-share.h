/* SPDX-License-Identifier: MIT */
/*
 * Each uid's share of the service manager's fd store (docs/restart.md,
 * "Shares of the store"): the store holds at most FileDescriptorStoreMax=
 * entries for everyone, so one non-root uid may hold at most a quarter of
 * them and all non-root uids together all but that quarter, which root
 * always keeps (the same split as the fd budget and the connection limit).
 *
 * An owner object names the store entries it will make (a VM's groups and
 * snapshot file, a device's, a connection's) with the uid they count for
 * (own), and forgets them when it goes (disown).  The store counts an
 * entry for its owner while the manager holds it: the count follows what
 * is pushed and removed, whatever the layout of names, and an entry nobody
 * owns (the store's own, the listener) counts for no uid.
 */
#pragma once

#include <stdbool.h>
#include <sys/types.h>

#include "vhub-hash.h"

struct vhub_fdstore_share {
        struct vhub_hash owners;        /* name -> uid (struct share_owner) */
        struct vhub_hash uids;          /* uid -> stored entries (struct share_uid) */
        unsigned per_uid;               /* what one non-root uid may hold */
        unsigned non_root;              /* what all non-root uids together may hold */
        unsigned non_root_stored;
};

/* The split of a store of max entries.  -ENOMEM. */
int vhub_fdstore_share_init(struct vhub_fdstore_share *sh, unsigned max);
void vhub_fdstore_share_done(struct vhub_fdstore_share *sh);

/* Entries stored under name count for uid from now on (a second call
 * replaces the first).  -ENOMEM. */
int vhub_fdstore_share_own(struct vhub_fdstore_share *sh, const char *name, uid_t uid);
/* name is nobody's any more (an entry still stored keeps counting for the
 * uid it was counted for until it is removed). */
void vhub_fdstore_share_disown(struct vhub_fdstore_share *sh, const char *name);
/* Who owns name: false if nobody. */
bool vhub_fdstore_share_owner(const struct vhub_fdstore_share *sh, const char *name, uid_t *ret);

/* May uid's entries grow by n?  Root: always; a non-root uid: while it
 * stays within per_uid and the non-root uids within non_root.  0 or
 * -EDQUOT. */
int vhub_fdstore_share_room(const struct vhub_fdstore_share *sh, uid_t uid, unsigned n);
/* One of uid's entries was stored (+1) or removed (-1).  -ENOMEM when a
 * uid's count cannot be made (the entry then counts for nobody). */
int vhub_fdstore_share_count(struct vhub_fdstore_share *sh, uid_t uid, int delta);
/* How many of uid's entries are stored. */
unsigned vhub_fdstore_share_stored(const struct vhub_fdstore_share *sh, uid_t uid);
