/* SPDX-License-Identifier: MIT */
/*
 * The fd budget: one uid must not exhaust the fds every uid shares
 * (docs/control-api.md "Limits").
 *
 * At start the daemon raises its soft RLIMIT_NOFILE to the hard limit and
 * splits it:
 *
 *   reserve   never handed to any uid: the daemon's own fds, the copies it
 *             makes while sending, accepting a connection to answer it
 *   per_uid   what one non-root uid may make the daemon hold
 *             (--max-fds-per-uid; default a quarter of limit - reserve)
 *   non_root  what every non-root uid together may make it hold: the rest
 *             after root's share (limit - reserve - per_uid), so that root
 *             always has at least per_uid
 *
 * Root is not limited per uid, only by limit - reserve.
 *
 * What a uid "holds" is counted from the objects that hold fds, when it is
 * needed (an fd-carrying request, a new connection, fds arriving): its VMs'
 * regions, shared objects, dirty log, devices' sockets, ring eventfds and
 * inflight fds, fds ops own until they commit (vhub_fd_usage_add_model()),
 * and its control connections with the fds queued on them (the control
 * layer adds those).
 */
#pragma once

#include <stdbool.h>
#include <sys/types.h>

#include "vhub-error.h"

struct vhub_context;

/* What a device holds of its own once it runs: its socket, the back-end
 * channel, a server-mode listening socket and its directory's fd, the
 * inflight fd. */
#define VHUB_DEVICE_OWN_FDS 5

struct vhub_fd_budget {
        unsigned limit;
        unsigned reserve;
        unsigned per_uid;
        unsigned non_root;
};

/* What is held now: by one uid, by all non-root uids, by everyone. */
struct vhub_fd_usage {
        uid_t uid;
        unsigned by_uid;
        unsigned non_root;
        unsigned total;
};

/*
 * Raise the soft RLIMIT_NOFILE to the hard limit and derive the budget;
 * per_uid 0 takes the default.  A per_uid beyond what the limit allows is
 * lowered to that (the budget says so in vhub_fd_budget_describe()).
 */
void vhub_fd_budget_setup(struct vhub_fd_budget *b, unsigned per_uid);
/* The split itself, for a given limit. */
void vhub_fd_budget_split(struct vhub_fd_budget *b, unsigned limit, unsigned per_uid);
/* The split as one sentence, for the startup log. */
void vhub_fd_budget_describe(const struct vhub_fd_budget *b, char *buf, size_t len);

/* Count what the model holds into u (u->uid selects the uid; zero u first). */
void vhub_fd_usage_add_model(const struct vhub_context *ctx, struct vhub_fd_usage *u);
/* Count n fds held on behalf of holder_uid (a control connection's). */
void vhub_fd_usage_add(struct vhub_fd_usage *u, uid_t holder_uid, unsigned n);

/*
 * May u->uid make the daemon hold n more fds?  slack lets fds that have
 * already arrived pass above the budget by that much (they are answered
 * -32008 and closed when their request is dispatched).  0, or -32008 in
 * err naming the limit that stops it.
 */
int vhub_fd_budget_check(const struct vhub_fd_budget *b, const struct vhub_fd_usage *u, unsigned n,
                         unsigned slack, struct vhub_error *err);
