/* SPDX-License-Identifier: MIT */
/*
 * What the control connections make the daemon hold, for the fd budget
 * (vhub-fd-budget.h): each connection's socket, the fds it sent that are
 * not claimed yet and the dups queued for its output, counted per uid and
 * in all as they change -- so that a check (every fd-carrying call) costs
 * the same with one connection or thousands.  A connection whose count may
 * have changed is marked (cheap, any number of times) and counted again at
 * the next check (O(1): rpc_conn_fds_held()); a change that was not marked
 * is counted right the next time it is: a miss is never cumulative.  At
 * --log-level debug every check also walks every connection and logs a
 * difference, as the model's ledger does.
 */
#include <stdlib.h>

#include "control-internal.h"
#include "vhub-context.h"
#include "vhub-fd-budget.h"
#include "vhub-hash.h"
#include "vhub-log.h"

/* One uid's connections' fds: the entry lives while one of them is counted. */
struct control_fd_uid {
        struct vhub_hash_node node;
        uid_t uid;
        unsigned fds;
        unsigned conns;                 /* connections counted into it */
};

int control_fds_init(struct control_server *s) {
        TAILQ_INIT(&s->fds_marked);
        s->fds_total = s->fds_non_root = 0;
        return vhub_hash_init(&s->fd_uids);
}

void control_fds_done(struct control_server *s) {
        vhub_hash_done(&s->fd_uids);
}

static uint64_t uid_hash(const struct control_server *s, uid_t uid) {
        return vhub_hash_bytes(&s->fd_uids, &uid, sizeof(uid));
}

static struct control_fd_uid *uid_find(const struct control_server *s, uid_t uid) {
        uint64_t hash = uid_hash(s, uid);

        for (struct vhub_hash_node *n = vhub_hash_first(&s->fd_uids, hash); n; n = vhub_hash_next(n, hash)) {
                struct control_fd_uid *e = vhub_hash_entry(n, struct control_fd_uid, node);

                if (e->uid == uid)
                        return e;
        }
        return NULL;
}

void control_conn_fds_changed(struct control_conn *c) {
        if (c->fds_marked)
                return;
        c->fds_marked = true;
        TAILQ_INSERT_TAIL(&c->srv->fds_marked, c, fds_link);
}

/* Count c again: false (left marked) when its uid's entry cannot be made. */
static bool conn_recount(struct control_server *s, struct control_conn *c) {
        unsigned n = c->rpc ? rpc_conn_fds_held(c->rpc) : 0;
        struct control_fd_uid *e = c->fd_uid;

        if (!e && n > 0) {
                e = uid_find(s, c->uid);
                if (!e) {
                        e = calloc(1, sizeof(*e));
                        if (!e)
                                return false;
                        e->uid = c->uid;
                        vhub_hash_insert(&s->fd_uids, &e->node, uid_hash(s, c->uid));
                }
                e->conns++;
                c->fd_uid = e;
        }
        s->fds_total = s->fds_total - c->fds_counted + n;
        if (c->uid != 0)
                s->fds_non_root = s->fds_non_root - c->fds_counted + n;
        if (e) {
                e->fds = e->fds - c->fds_counted + n;
                if (!c->rpc && --e->conns == 0) {
                        vhub_hash_remove(&s->fd_uids, &e->node);
                        free(e);
                }
                if (!c->rpc)
                        c->fd_uid = NULL;
        }
        c->fds_counted = n;
        return true;
}

void control_conn_fds_gone(struct control_conn *c) {
        if (c->fds_marked) {
                TAILQ_REMOVE(&c->srv->fds_marked, c, fds_link);
                c->fds_marked = false;
        }
        /* closed (rpc NULL): counted at 0, out of its uid's entry */
        (void)conn_recount(c->srv, c);
}

static void recount_marked(struct control_server *s) {
        struct control_conn *c, *next;

        for (c = TAILQ_FIRST(&s->fds_marked); c; c = next) {
                next = TAILQ_NEXT(c, fds_link);
                if (!conn_recount(s, c))
                        continue;
                TAILQ_REMOVE(&s->fds_marked, c, fds_link);
                c->fds_marked = false;
        }
}

/* --log-level debug: count every connection and compare. */
static void verify(struct control_server *s, uid_t uid) {
        const struct control_fd_uid *e = uid_find(s, uid);
        unsigned total = 0, non_root = 0, by_uid = 0;
        struct control_conn *c;

        TAILQ_FOREACH(c, &s->conns, link) {
                unsigned n = c->rpc ? rpc_conn_fds_held(c->rpc) : 0;

                total += n;
                non_root += c->uid != 0 ? n : 0;
                by_uid += c->uid == uid ? n : 0;
        }
        if (total == s->fds_total && non_root == s->fds_non_root && by_uid == (e ? e->fds : 0))
                return;
        log_error("control connections' fd count out of step (a change was not marked): counted %u in all, "
                  "%u for non-root uids, %u for uid %u; kept %u, %u, %u", total, non_root, by_uid,
                  (unsigned)uid, s->fds_total, s->fds_non_root, e ? e->fds : 0);
        if (getenv("VHUB_FD_LEDGER_ABORT"))
                abort();
        TAILQ_FOREACH(c, &s->conns, link)
                control_conn_fds_changed(c);
        recount_marked(s);
}

void control_server_count_fds(void *userdata, struct vhub_fd_usage *u) {
        struct control_server *s = userdata;
        const struct control_fd_uid *e;

        recount_marked(s);
        if (vhub_log_get_level() >= LOG_DEBUG)
                verify(s, u->uid);
        e = uid_find(s, u->uid);
        u->total += s->fds_total;
        u->non_root += s->fds_non_root;
        u->by_uid += e ? e->fds : 0;
}
