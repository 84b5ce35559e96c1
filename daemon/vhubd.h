/* SPDX-License-Identifier: MIT */
/*
 * The composition root: builds the daemon's object graph -- the model (one
 * struct vhub_context) and the faces that drive it (today the JSON-RPC
 * control server) -- and tears it down.  The only code besides main.c that
 * knows both daemon/'s model and control/; the model itself includes
 * nothing of a face.  A second face (the vhost-user front door) is wired
 * here too.
 */
#pragma once

#include <stdbool.h>

#include "vhub-context.h"

struct event_base;
struct control_server;
struct vhub_config;
struct vhub_fd_visitor;
struct vhub_fdstore;
struct vhub_frontdoor;

struct vhub_restart_state;

struct vhubd {
        struct vhub_context ctx;
        bool ctx_ready;                  /* vhub_context_init() succeeded */
        struct vhub_fdstore *fdstore;    /* systemd's fd store (the context borrows it) */
        struct control_server *control;  /* the JSON-RPC face */
        struct vhub_frontdoor *frontdoor; /* the vhost-user front door */
        struct vhub_snap_file snap;      /* the daemon's snapshot ("S"), fd -1 until written */
        struct vhub_restart_state *restart; /* vhub-restart.c's: what a start read, a planned
                                             * restart's progress */
        bool keep_store;                 /* a start that took state back failed: exit
                                          * without tearing anything down (the store
                                          * keeps it all for the next try) */
};

struct vhubd_options {
        const char *control_path;        /* the control socket to create (NULL: none), unless */
        int control_listen_fd;           /* a listening socket to use (taken; -1: socket
                                          * activation's, if the service manager passed one) */
};

/* Build the model and its faces on base with config (both borrowed, they
 * outlive v): the fd store (unless --no-fd-store; what it kept of an
 * earlier run is closed), the context, the front door, the control socket.  Logs what
 * failed; -errno then, and vhubd_done() cleans up -- unless v->keep_store:
 * then the process must end without it (_exit), since a teardown would
 * close what the earlier run left in the store. */
int vhubd_init(struct vhubd *v, struct event_base *base, struct vhub_config *config,
               const struct vhubd_options *o);
/* Stop taking requests: every face closes its listening sockets and its
 * connections (shutdown; the model's VMs are torn down separately). */
void vhubd_stop_faces(struct vhubd *v);
/* The control socket's path if the daemon made it (NULL: inherited). */
const char *vhubd_control_path(const struct vhubd *v);
/* Every fd the process holds for the model and its faces, named by its
 * owner (vhub-fd-track.h).  What is not here: stdin/out/err, libevent's
 * own (its epoll instance, its signal pipe) and, when logging to the
 * journal, libsystemd's journal socket -- none of them the daemon's to name. */
void vhubd_foreach_fd(const struct vhubd *v, const struct vhub_fd_visitor *visitor);
/* Tear down every VM (pending calls complete), then the faces.  Idempotent. */
void vhubd_done(struct vhubd *v);
