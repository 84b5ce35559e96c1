/* SPDX-License-Identifier: MIT */
/*
 * The control socket: accepts VMM connections, identifies each by
 * SO_PEERCRED, turns JSON-RPC requests into calls on the daemon's model and
 * the model's events into notifications.  The model never sees JSON.
 */
#pragma once

#include <stdbool.h>
#include <sys/types.h>

#include "rpc-conn.h"

struct vhub_context;
struct control_server;

struct control_server_options {
        const char *path;        /* socket to create (ignored if listen_fd >= 0) */
        int listen_fd;           /* from socket activation (taken in every case), or -1 */
        mode_t mode;
        gid_t gid;
        bool gid_set;
        unsigned max_connections;          /* all together; an eighth is kept for root */
        unsigned max_connections_per_uid;  /* one non-root uid; 0: a quarter of max_connections */
        unsigned max_pending;    /* calls waiting on back-ends, per connection */
        struct rpc_conn_limits limits;
};

int control_server_new(struct vhub_context *ctx, const struct control_server_options *o,
                       struct control_server **ret);
struct control_server *control_server_free(struct control_server *s);
/* Stop accepting and drop every connection (shutdown). */
void control_server_shutdown(struct control_server *s);
unsigned control_server_n_connections(const struct control_server *s);
struct vhub_fd_visitor;
/* Every fd the face holds: "ctl/listen" (in group "L" when the server made
 * it; a socket unit keeps an inherited one), each connection's socket
 * "ctl/conn/<id>" (group "c<id>") with what its framing holds for a moment
 * (".../in", ".../out"), and the spare "ctl/spare". */
void control_server_foreach_fd(const struct control_server *s, const struct vhub_fd_visitor *v);
/* The path of the socket this server created (NULL for an inherited one). */
const char *control_server_path(const struct control_server *s);
