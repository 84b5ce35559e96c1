/* SPDX-License-Identifier: MIT */
/*
 * The control server's events out: who wants which, their JSON, the
 * connections too congested to take them (control-server.c for the server).
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "control-internal.h"
#include "control-listen.h"
#include "control-params.h"
#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

#include "control-server-internal.h"

/* ---- events ---- */

static bool conn_wants(const struct control_conn *c, const struct vhub_vm *vm) {
        uid_t uid = vhub_vm_uid(vm);

        if (vhub_vm_owner(vm) == &c->owner)
                return true;
        if (!vhub_vm_visible_to(vm, c->uid))
                return false;
        /* every VM it may see: its uid's, root's every uid's */
        if (c->sub_all)
                return true;
        for (size_t i = 0; i < c->n_sub_vms; i++)
                if (c->sub_uids[i] == uid && strcmp(c->sub_vms[i], vhub_vm_name(vm)) == 0)
                        return true;
        return false;
}

static json_t *event_params(const struct vhub_event *ev) {
        char timestamp[VHUB_RFC3339_LEN];
        json_t *p;

        /* the model's time, not ours: every face says the same */
        vhub_format_rfc3339(ev->timestamp_usec, timestamp);
        p = json_pack("{s:s, s:s, s:I, s:s}", "event", vhub_event_type_to_string(ev->type), "timestamp",
                      timestamp, "uid", (json_int_t)ev->uid, "vm", vhub_vm_name(ev->vm));
        if (!p)
                return NULL;
        if (ev->device)
                json_object_set_new(p, "device", json_string(ev->device));
        switch (ev->type) {
        case VHUB_EV_DISCONNECTED:
        case VHUB_EV_FAILED:
        case VHUB_EV_VM_DESTROYED:
                json_object_set_new(p, "reason", json_string(ev->reason ? ev->reason : ""));
                break;
        case VHUB_EV_RECONNECTED: {
                json_t *v = json_array();

                for (unsigned i = 0; i < ev->n_vrings; i++)
                        json_array_append_new(v, json_pack("{s:I, s:I, s:I}", "index",
                                                           (json_int_t)ev->vrings[i].index, "base",
                                                           (json_int_t)ev->vrings[i].base, "outstanding",
                                                           (json_int_t)ev->vrings[i].outstanding));
                json_object_set_new(p, "reconnects", json_integer(ev->reconnects));
                json_object_set_new(p, "exact", json_boolean(ev->exact));
                json_object_set_new(p, "vrings", v);
                break;
        }
        case VHUB_EV_LINGERING:
                json_object_set_new(p, "linger_ms", vhub_json_u64(ev->linger_ms));
                break;
        case VHUB_EV_BACKEND_REQUEST:
                json_object_set_new(p, "request", json_string(ev->request ? ev->request : ""));
                json_object_set_new(p, "token", vhub_json_u64(ev->token));
                for (unsigned i = 0; i < ev->n_fields; i++)
                        json_object_set_new(p, ev->fields[i].key, vhub_json_u64(ev->fields[i].value));
                if (ev->n_fds == 1)
                        json_object_set_new(p, "fd", json_integer(0));
                else if (ev->n_fds > 1) {
                        json_t *a = json_array();

                        for (unsigned i = 0; i < ev->n_fds; i++)
                                json_array_append_new(a, json_integer(i));
                        json_object_set_new(p, "fds_index", a);
                }
                break;
        default:
                break;
        }
        return p;
}

/* A connection is behind on its events when its output queue holds a
 * quarter of the bound (bytes or fds): back-end channels of the VMs it owns
 * pause there, far from the bound at which the connection would be dropped. */
bool cs_conn_congested(const struct vhub_owner *o) {
        const struct control_conn *c =
                (const struct control_conn *)((const char *)o - offsetof(struct control_conn, owner));
        const struct rpc_conn_limits *l;

        if (!c->rpc)
                return false;
        l = rpc_conn_limits(c->rpc);
        return rpc_conn_queued_bytes(c->rpc) >= l->max_out_bytes / 4 ||
               rpc_conn_queued_fds(c->rpc) >= l->max_out_fds / 4;
}

/* An event's fds are queued to each connection that gets it, as dups held
 * until it reads them: its uid's, within its fd budget.  The owner's are
 * fds received on its behalf and may pass the budget as far as other
 * received fds may (its VM's back-end channels pause long before, while it
 * is behind); a subscriber that would pass it is dropped at once, its
 * queue with it -- it does not read, and its uid must not eat into what
 * the others share. */
static bool conn_may_take_fds(struct control_server *s, struct control_conn *c,
                              const struct vhub_event *ev) {
        bool owner = vhub_vm_owner(ev->vm) == &c->owner;
        struct vhub_error err = { 0 };
        char reason[sizeof(err.detail) + 64];

        if (cs_server_check_fds(s, c->uid, ev->n_fds, owner ? cs_fd_slack(s, c->uid) : 0, &err) == 0)
                return true;
        snprintf(reason, sizeof(reason), "an event's fds would pass the fd budget: %s", err.detail);
        rpc_conn_abort(c->rpc, reason);
        return false;
}

void cs_server_emit(void *userdata, const struct vhub_event *ev) {
        struct control_server *s = userdata;
        struct control_conn *c, *next;
        json_t *msg = NULL;

        for (c = TAILQ_FIRST(&s->conns); c; c = next) {
                next = TAILQ_NEXT(c, link);
                if (!c->rpc || !conn_wants(c, ev->vm))
                        continue;
                if (!msg) {
                        msg = json_pack("{s:s, s:s, s:o}", "jsonrpc", "2.0", "method", "event", "params",
                                        event_params(ev));
                        if (!msg)
                                return; /* out of memory: nobody gets this one */
                        if (ev->n_fds > 0)
                                json_object_set_new(msg, "fds", json_integer(ev->n_fds));
                }
                /* a client that does not read is dropped by rpc_conn's bound,
                 * never allowed to block the daemon or grow without limit */
                if (ev->n_fds > 0 && !conn_may_take_fds(s, c, ev))
                        continue;
                cs_conn_send(c, msg, ev->fds, ev->n_fds);
        }
        json_decref(msg);
}
