/* SPDX-License-Identifier: MIT */
/*
 * What the control connections make the daemon hold, for the fd budget
 * (vhub-fd-budget.h): each connection's socket, the fds it sent that are
 * not taken yet and the dups queued for its output, kept in the model's fd
 * ledger per uid and in all as they change (vhub_fd_ledger_face_set()) --
 * so that a check (every fd-carrying call) costs the same with one
 * connection or thousands.  A connection whose count may have changed is
 * marked (cheap, any number of times) and counted again at the next check
 * (O(1): rpc_conn_fds_held()); a change that was not marked is counted
 * right the next time it is: a miss is never cumulative.  At --log-level
 * debug every check also walks every connection and logs a difference, as
 * the ledger does for the VMs.
 */
#include <stdlib.h>

#include "control-internal.h"
#include "vhub-context.h"
#include "vhub-fd-budget.h"
#include "vhub-log.h"

void control_fds_init(struct control_server *s) {
        TAILQ_INIT(&s->fds_marked);
}

void control_conn_fds_changed(struct control_conn *c) {
        /* closed: counted at 0 by control_conn_fds_gone(), and freed with
         * its last reference -- an answer to its call completing later
         * (nothing is sent) must not mark it again */
        if (c->fds_marked || !c->rpc)
                return;
        c->fds_marked = true;
        TAILQ_INSERT_TAIL(&c->srv->fds_marked, c, fds_link);
}

/* Count c again (closed: counted at 0, and out of its uid's entry): false
 * (left marked) when its uid's entry cannot be made. */
static bool conn_recount(struct control_server *s, struct control_conn *c) {
        unsigned n = c->rpc ? rpc_conn_fds_held(c->rpc) : 0;
        int holders = !c->fds_counting ? 1 : !c->rpc ? -1 : 0;

        if (holders == 1 && !c->rpc)
                return true;    /* never counted */
        if (vhub_fd_ledger_face_set(s->ctx, c->uid, c->fds_counted, n, holders) < 0)
                return false;
        c->fds_counted = n;
        c->fds_counting = c->rpc != NULL;
        return true;
}

void control_conn_fds_gone(struct control_conn *c) {
        if (c->fds_marked) {
                TAILQ_REMOVE(&c->srv->fds_marked, c, fds_link);
                c->fds_marked = false;
        }
        (void)conn_recount(c->srv, c);  /* rpc is NULL: never fails */
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
        struct vhub_fd_usage walked = { .uid = uid }, kept = { .uid = uid };
        struct control_conn *c;

        TAILQ_FOREACH(c, &s->conns, link)
                vhub_fd_usage_add(&walked, c->uid, c->rpc ? rpc_conn_fds_held(c->rpc) : 0);
        vhub_fd_usage_add_faces(s->ctx, &kept);
        if (walked.total == kept.total && walked.non_root == kept.non_root && walked.by_uid == kept.by_uid)
                return;
        log_error("control connections' fd count out of step (a change was not marked): counted %u in all, "
                  "%u for non-root uids, %u for uid %u; kept %u, %u, %u", walked.total, walked.non_root,
                  walked.by_uid, (unsigned)uid, kept.total, kept.non_root, kept.by_uid);
        if (getenv("VHUB_FD_LEDGER_ABORT"))
                abort();
        TAILQ_FOREACH(c, &s->conns, link)
                control_conn_fds_changed(c);
        recount_marked(s);
}

void control_server_count_fds(void *userdata, struct vhub_fd_usage *u) {
        struct control_server *s = userdata;

        recount_marked(s);
        if (vhub_log_get_level() >= LOG_DEBUG)
                verify(s, u->uid);
        vhub_fd_usage_add_faces(s->ctx, u);
}
