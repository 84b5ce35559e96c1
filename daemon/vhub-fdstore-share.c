/* SPDX-License-Identifier: MIT */
/* Each uid's share of the fd store: see vhub-fdstore-share.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-fdstore-share.h"

struct share_owner {
        struct vhub_hash_node node;
        uid_t uid;
        char name[];
};

struct share_uid {
        struct vhub_hash_node node;
        uid_t uid;
        unsigned stored;
};

int vhub_fdstore_share_init(struct vhub_fdstore_share *sh, unsigned max) {
        int r;

        memset(sh, 0, sizeof(*sh));
        r = vhub_hash_init(&sh->owners);
        if (r < 0)
                return r;
        r = vhub_hash_init(&sh->uids);
        if (r < 0) {
                vhub_hash_done(&sh->owners);
                return r;
        }
        sh->per_uid = max / 4 > 1 ? max / 4 : 1;
        sh->non_root = max > sh->per_uid ? max - sh->per_uid : 0;
        return 0;
}

/* Free every record, then the table (not vhub_hash_remove(): a removal
 * may shrink the bucket array under the walk). */
static void hash_free_all(struct vhub_hash *h) {
        for (size_t b = 0; b < h->n_buckets; b++)
                for (struct vhub_hash_node *n = h->buckets[b], *next; n; n = next) {
                        next = n->next;
                        free(n);        /* the node is each record's first member */
                }
        vhub_hash_done(h);
}

void vhub_fdstore_share_done(struct vhub_fdstore_share *sh) {
        hash_free_all(&sh->owners);
        hash_free_all(&sh->uids);
}

static struct share_owner *owner_find(const struct vhub_fdstore_share *sh, const char *name) {
        uint64_t h = vhub_hash_bytes(&sh->owners, name, strlen(name));

        for (struct vhub_hash_node *n = vhub_hash_first(&sh->owners, h); n; n = vhub_hash_next(n, h)) {
                struct share_owner *o = vhub_hash_entry(n, struct share_owner, node);

                if (strcmp(o->name, name) == 0)
                        return o;
        }
        return NULL;
}

static struct share_uid *uid_find(const struct vhub_fdstore_share *sh, uid_t uid) {
        uint64_t h = vhub_hash_bytes(&sh->uids, &uid, sizeof(uid));

        for (struct vhub_hash_node *n = vhub_hash_first(&sh->uids, h); n; n = vhub_hash_next(n, h)) {
                struct share_uid *u = vhub_hash_entry(n, struct share_uid, node);

                if (u->uid == uid)
                        return u;
        }
        return NULL;
}

int vhub_fdstore_share_own(struct vhub_fdstore_share *sh, const char *name, uid_t uid) {
        struct share_owner *o = owner_find(sh, name);
        size_t len = strlen(name);

        if (o) {
                o->uid = uid;
                return 0;
        }
        o = calloc(1, sizeof(*o) + len + 1);
        if (!o)
                return -ENOMEM;
        o->uid = uid;
        memcpy(o->name, name, len + 1);
        vhub_hash_insert(&sh->owners, &o->node, vhub_hash_bytes(&sh->owners, name, len));
        return 0;
}

void vhub_fdstore_share_disown(struct vhub_fdstore_share *sh, const char *name) {
        struct share_owner *o = owner_find(sh, name);

        if (!o)
                return;
        vhub_hash_remove(&sh->owners, &o->node);
        free(o);
}

bool vhub_fdstore_share_owner(const struct vhub_fdstore_share *sh, const char *name, uid_t *ret) {
        const struct share_owner *o = owner_find(sh, name);

        if (o)
                *ret = o->uid;
        return o != NULL;
}

unsigned vhub_fdstore_share_stored(const struct vhub_fdstore_share *sh, uid_t uid) {
        const struct share_uid *u = uid_find(sh, uid);

        return u ? u->stored : 0;
}

int vhub_fdstore_share_room(const struct vhub_fdstore_share *sh, uid_t uid, unsigned n) {
        if (uid == 0)
                return 0;
        if (vhub_fdstore_share_stored(sh, uid) + n > sh->per_uid || sh->non_root_stored + n > sh->non_root)
                return -EDQUOT;
        return 0;
}

int vhub_fdstore_share_count(struct vhub_fdstore_share *sh, uid_t uid, int delta) {
        struct share_uid *u = uid_find(sh, uid);

        if (delta > 0) {
                if (!u) {
                        u = calloc(1, sizeof(*u));
                        if (!u)
                                return -ENOMEM;
                        u->uid = uid;
                        vhub_hash_insert(&sh->uids, &u->node, vhub_hash_bytes(&sh->uids, &uid, sizeof(uid)));
                }
                u->stored++;
                sh->non_root_stored += uid != 0;
                return 0;
        }
        if (!u || u->stored == 0)
                return 0;
        u->stored--;
        sh->non_root_stored -= uid != 0;
        if (u->stored == 0) {
                vhub_hash_remove(&sh->uids, &u->node);
                free(u);
        }
        return 0;
}
