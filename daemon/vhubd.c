/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <string.h>

#include "control-server.h"
#include "vhub-config.h"
#include "vhub-log.h"
#include "vhubd.h"

/* The JSON-RPC face's options, from the daemon's configuration. */
static void control_options(const struct vhub_config *config, const struct vhubd_options *o,
                            struct control_server_options *ret) {
        *ret = (struct control_server_options){
                .path = o->control_path,
                .listen_fd = o->control_listen_fd,
                .mode = config->control_mode,
                .gid = config->control_gid,
                .gid_set = config->control_gid_set,
                .max_connections = config->limits.connections,
                .max_connections_per_uid = config->limits.connections_per_uid,
                .max_pending = config->limits.pending_per_connection,
        };
        rpc_conn_limits_default(&ret->limits);
        ret->limits.max_line = config->limits.max_line;
        ret->limits.max_out_bytes = config->limits.max_output_bytes;
}

int vhubd_init(struct vhubd *v, struct event_base *base, struct vhub_config *config,
               const struct vhubd_options *o) {
        struct control_server_options co;
        int r;

        memset(v, 0, sizeof(*v));
        r = vhub_context_init(&v->ctx, base, config);
        if (r < 0) {
                log_error("cannot set up the daemon's state: %s", strerror(-r));
                return r;
        }
        v->ctx_ready = true;
        control_options(config, o, &co);
        r = control_server_new(&v->ctx, &co, &v->control);
        if (r < 0) {
                log_error("cannot set up the control socket %s: %s",
                          o->control_path ? o->control_path : "(inherited)", strerror(-r));
                return r;
        }
        return 0;
}

void vhubd_stop_faces(struct vhubd *v) {
        if (v->control)
                control_server_shutdown(v->control);
}

void vhubd_done(struct vhubd *v) {
        /* the model first: VMs freed complete their pending calls, which the
         * faces answer (or drop, their connections being closed) */
        if (v->ctx_ready)
                vhub_context_done(&v->ctx);
        v->ctx_ready = false;
        v->control = control_server_free(v->control);
}
