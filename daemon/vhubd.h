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

struct vhubd {
        struct vhub_context ctx;
        bool ctx_ready;                  /* vhub_context_init() succeeded */
        struct control_server *control;  /* the JSON-RPC face */
};

struct vhubd_options {
        const char *control_path;        /* the control socket to create, or */
        int control_listen_fd;           /* a listening socket to use (taken; -1: none) */
};

/* Build the model and its faces on base with config (both borrowed, they
 * outlive v).  Logs what failed; -errno then, and vhubd_done() cleans up. */
int vhubd_init(struct vhubd *v, struct event_base *base, struct vhub_config *config,
               const struct vhubd_options *o);
/* Stop taking requests: every face closes its listening sockets and its
 * connections (shutdown; the model's VMs are torn down separately). */
void vhubd_stop_faces(struct vhubd *v);
/* Tear down every VM (pending calls complete), then the faces.  Idempotent. */
void vhubd_done(struct vhubd *v);
