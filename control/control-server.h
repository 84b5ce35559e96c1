/* SPDX-License-Identifier: MIT */
/*
 * The control socket: accepts VMM connections, identifies each by
 * SO_PEERCRED, turns JSON-RPC requests into calls on the daemon's model and
 * the model's events into notifications.  The model never sees JSON.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "rpc-conn.h"

struct vhub_context;
struct control_server;

struct control_server_options {
        const char *path;        /* socket to create (ignored if listen_fd >= 0) */
        int listen_fd;           /* from socket activation (taken in every case), or -1 */
        bool listen_fd_ours;     /* listen_fd is the one an earlier run made at path:
                                  * carried across a restart, removed at the end */
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
/* A restart (docs/restart.md).  Read nothing more from anyone; whether
 * any call is still waiting on the model; write what the connections'
 * sockets take now (true: every output queue is empty). */
void control_server_pause(struct control_server *s);
bool control_server_busy(const struct control_server *s);
bool control_server_flush_now(struct control_server *s);
/* The planned restart's last snapshot: what the connections have not
 * written yet goes into it, and the next process writes it first. */
void control_server_carry_output(struct control_server *s);
struct vhub_snap_writer;
struct vhub_snap_iter;
struct vhub_snap_doc;
struct vhub_fdstore_restore;
/* Its part of the daemon's snapshot: the connection counter.  Each
 * connection's record (its socket, whence its credentials; subscriptions,
 * the ids of requests in flight, the bytes read but not yet handled) is a
 * snapshot file of its own, "k<id>", so that a call on one connection
 * rewrites that record only. */
int control_server_serialize(const struct control_server *s, struct vhub_snap_writer *w);
/* The same part as version 1 wrote it, for a planned stop's last snapshot
 * (a restart into a version-1 vhubd carries every connection): the counter
 * and each carried connection's record (S_CONN), the bytes its file holds
 * since the last control_server_commit(). */
int control_server_serialize_inline(struct control_server *s, struct vhub_snap_writer *w);
/* Once the daemon's snapshot holds the records inline: their files leave
 * the store, and a change of a connection marks the daemon's snapshot. */
void control_server_records_inline(struct control_server *s);
/* Whether connections were carried from inline records since the last
 * control_server_filed(): their files are written, but until the manager
 * holds them the daemon's snapshot keeps the records too (a change of a
 * connection marks it meanwhile). */
bool control_server_unfiled(const struct control_server *s);
void control_server_filed(struct control_server *s);
/* ctx->commit_faces: write the records of the connections that changed
 * (all: of every connection).  A connection whose record is over what a
 * restart carries (control-carry.c) has none (its file removed) and is
 * marked. */
void control_server_commit(struct control_server *s, bool all);
/* A planned restart, after its last snapshot: the connections it left out
 * are told (-32008) and closed, so that their clients see it now. */
void control_server_close_uncarried(struct control_server *s);
/* Take the connections back (their sockets claimed from r); each gets
 * daemon.restarted {restarts, downtime_ms} first, then -32011 for every
 * request that was in flight, and owns its VMs again.  _restore() reads the
 * daemon snapshot's part (the counter; the connections themselves in
 * format version 1 and at a planned stop: those whose ids are in filed,
 * sorted, are left to their own files, which are as new or newer),
 * _restore_conn() one connection's record file (name,
 * read into doc; fd taken: written on, or out of the store when the
 * connection is not carried). */
int control_server_restore(struct control_server *s, struct vhub_fdstore_restore *r, struct vhub_snap_iter *it,
                           const uint64_t *filed, size_t n_filed, uint64_t restarts, uint64_t downtime_ms);
int control_server_restore_conn(struct control_server *s, struct vhub_fdstore_restore *r, const char *name,
                                const struct vhub_snap_doc *doc, int fd, uint64_t restarts, uint64_t downtime_ms);
/* The path of the socket this server created (NULL for an inherited one). */
const char *control_server_path(const struct control_server *s);
