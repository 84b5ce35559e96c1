/* SPDX-License-Identifier: MIT */
/*
 * What a restart may carry of the control connections (docs/restart.md,
 * "What a restart carries"): every connection's record (its unhandled
 * input, its batches' and calls' ids, its subscriptions and, at a planned
 * restart, its unwritten output) goes into the daemon's snapshot, one
 * document of at most VHUB_SNAP_MAX_SIZE.  Without a bound, one uid's
 * connections (each a line of up to --max-line-bytes, 4 MiB of output)
 * would make the document too big to write, and the next process would
 * take an older one back: everyone's carried state lost for one uid.
 *
 * So the records are budgeted as the daemon budgets connections and fds:
 *
 *   guaranteed  every connection's record up to CARRY_GUARANTEED bytes
 *               always fits (what an ordinary connection carries), so no
 *               uid can take that from another
 *   pool        what is left of CARRY_TOTAL, for records above that, of
 *               which one non-root uid may use a quarter and non-root uids
 *               together all but root's quarter
 *   per record  at most CARRY_CONN_MAX
 *
 * A record over its bound is left out of the snapshot: at a planned
 * restart its connection is closed before the process exits (its client
 * sees it end); at a crash the next process closes it (nothing claims its
 * socket).  Since each connection's record is a snapshot file of its own
 * (format 2), the budget is kept as records are written: a record gives
 * back what it was counted before it is counted again (first come, first
 * carried), and when its connection closes.  Each non-root uid whose
 * records use the pool has an entry, found by hash (a write costs the same
 * with one uid or thousands), and gone when its use drops to zero.
 */
#include <stdlib.h>
#include <string.h>

#include "control-internal.h"
#include "vhub-hash.h"
#include "vhub-snapshot.h"

/* Room for the rest of the daemon's document, which is small (counters). */
#define CARRY_TOTAL             (VHUB_SNAP_MAX_SIZE / 4 * 3)
/* Ids, subscriptions, a partial line of an ordinary request. */
#define CARRY_GUARANTEED        (64u << 10)
/* A line at the default bound and the whole output bound, with room. */
#define CARRY_CONN_MAX          (8u << 20)

/* A non-root uid's use of the pool: in the table while it is above zero. */
struct carry_uid {
        struct vhub_hash_node node;
        uid_t uid;
        size_t used;
};

struct control_carry {
        size_t guaranteed;      /* per record, always */
        size_t per_uid;         /* of the pool: one non-root uid */
        size_t non_root;        /* of the pool: every non-root uid */
        size_t pool;
        size_t used_root, used_non_root;
        struct vhub_hash uids;  /* uid -> struct carry_uid */
};

struct control_carry *control_carry_new(const struct control_server *s) {
        struct control_carry *b = calloc(1, sizeof(*b));
        size_t conns = s->opts.max_connections > s->n_conns ? s->opts.max_connections : s->n_conns;

        if (!b)
                return NULL;
        if (vhub_hash_init(&b->uids) < 0) {
                free(b);
                return NULL;
        }
        if (conns == 0)
                conns = 1;
        /* at most a third of the total is guaranteed, the rest pooled */
        b->guaranteed = CARRY_TOTAL / 3 / conns;
        if (b->guaranteed > CARRY_GUARANTEED)
                b->guaranteed = CARRY_GUARANTEED;
        b->pool = CARRY_TOTAL - b->guaranteed * conns;
        b->per_uid = b->pool / 4;
        b->non_root = b->pool - b->per_uid;
        return b;
}

void control_carry_free(struct control_carry *b) {
        if (!b)
                return;
        /* records still counted (the server closes every connection first) */
        for (size_t i = 0; i < b->uids.n_buckets; i++) {
                struct vhub_hash_node *node = b->uids.buckets[i], *next;

                for (; node; node = next) {
                        next = node->next;
                        free(vhub_hash_entry(node, struct carry_uid, node));
                }
        }
        vhub_hash_done(&b->uids);
        free(b);
}

size_t control_carry_uids(const struct control_carry *b) {
        return b ? b->uids.n : 0;
}

/* uid's use of the pool; NULL: none (it uses nothing of it). */
static struct carry_uid *uid_find(const struct control_carry *b, uid_t uid, uint64_t hash) {
        struct vhub_hash_node *node;

        for (node = vhub_hash_first(&b->uids, hash); node; node = vhub_hash_next(node, hash)) {
                struct carry_uid *u = vhub_hash_entry(node, struct carry_uid, node);

                if (u->uid == uid)
                        return u;
        }
        return NULL;
}

static uint64_t uid_hash(const struct control_carry *b, uid_t uid) {
        return vhub_hash_bytes(&b->uids, &uid, sizeof(uid));
}

/* Why a record of n bytes of uid's, extra of them from the pool, does not
 * fit (NULL: it does). */
static const char *carry_check(const struct control_carry *b, uid_t uid, size_t n, size_t extra) {
        const struct carry_uid *u;

        if (n > CARRY_CONN_MAX)
                return "over what a restart carries of one connection";
        if (extra == 0)
                return NULL;
        if (uid == 0)
                return b->used_root + b->used_non_root + extra > b->pool
                               ? "over what a restart carries of all connections" : NULL;
        u = uid_find(b, uid, uid_hash(b, uid));
        if ((u ? u->used : 0) + extra > b->per_uid)
                return "over what a restart carries of one uid's connections";
        if (b->used_non_root + extra > b->non_root || b->used_root + b->used_non_root + extra > b->pool)
                return "over what a restart carries of non-root uids' connections";
        return NULL;
}

const char *control_carry_refuses(struct control_carry *b, uid_t uid, size_t n) {
        return carry_check(b, uid, n, n > b->guaranteed ? n - b->guaranteed : 0);
}

void control_carry_release(struct control_carry *b, uid_t uid, size_t n) {
        struct carry_uid *u;
        size_t extra;

        if (!b || n <= b->guaranteed)
                return;
        extra = n - b->guaranteed;
        if (uid == 0) {
                b->used_root -= extra;
                return;
        }
        b->used_non_root -= extra;
        u = uid_find(b, uid, uid_hash(b, uid));        /* there: it was counted */
        if (u && (u->used -= extra) == 0) {
                vhub_hash_remove(&b->uids, &u->node);
                free(u);
        }
}

const char *control_carry_admit(struct control_carry *b, uid_t uid, size_t n) {
        size_t extra = n > b->guaranteed ? n - b->guaranteed : 0;
        const char *why = carry_check(b, uid, n, extra);
        struct carry_uid *u;
        uint64_t hash;

        if (why || extra == 0)
                return why;
        if (uid == 0) {
                b->used_root += extra;
                return NULL;
        }
        hash = uid_hash(b, uid);
        u = uid_find(b, uid, hash);
        if (!u) {
                u = calloc(1, sizeof(*u));
                if (!u)
                        return "over what a restart carries (out of memory counting it)";
                u->uid = uid;
                vhub_hash_insert(&b->uids, &u->node, hash);
        }
        u->used += extra;
        b->used_non_root += extra;
        return NULL;
}
