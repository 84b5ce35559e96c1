/* SPDX-License-Identifier: MIT */
/* The daemon's own methods: daemon.info, rpc.discover, events.subscribe.
 * Their rows are in control-methods.c's table (control-methods-internal.h). */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control-methods-internal.h"
#include "vhub-info.h"
#include "vhub-time.h"
#include "vhub-version.h"
#include "vhu-fd.h"

/* ---- daemon ---- */

/* Optional parts this build has (daemon.info's capabilities): a VMM can ask
 * before relying on them.  Add a part's name here when it lands. */
static const char *const capabilities[] = {
        "reconnect",        /* back-ends restored after a loss (device.reconnected) */
        "server-mode",      /* device.add mode "server" */
        "dirty-log",        /* vm.dirty_log.* */
        "device-state",     /* device.state.* */
        "shared-objects",   /* shared_object.*, back-end shared-object lookups */
        "backend-requests", /* device.backend_request / device.backend_reply */
        "inband-kicks",     /* device.start without kick fds, device.kick */
        "stop-no-drain",    /* device.stop drain:false, inflight counts */
        "crypto-sessions",  /* device.crypto.session.* */
        "gpu-socket",       /* device.gpu.set_socket */
        "iotlb",            /* device.iotlb.*, rings at IOVAs */
        "postcopy",         /* vm.postcopy.* */
        "front-door",       /* device.add vmm_socket: unmodified VMMs through vhubd */
        NULL,
};

int cm_daemon_info(struct method_call *m, struct vhub_error *err) {
        char started_at[VHUB_RFC3339_LEN];
        struct vhub_daemon_info info;
        json_t *caps = json_array();

        vhub_info_daemon(cm_call_ctx(m), m->req->conn->uid, &info);
        for (size_t i = 0; capabilities[i]; i++)
                json_array_append_new(caps, json_string(capabilities[i]));
        /* its state is carried across restarts (the service manager's fd store) */
        if (info.fd_store)
                json_array_append_new(caps, json_string("fd-store"));
        vhub_format_rfc3339(info.started_realtime_usec, started_at);
        return cm_call_answer(m, json_pack("{s:s, s:s, s:i, s:o, s:s, s:i, s:i, s:i, s:o, s:o}", "version",
                                           VHUB_VERSION, "api_version", VHUB_API_VERSION, "pid", (int)getpid(),
                                           "uptime_ms", vhub_json_u64(info.uptime_usec / 1000),
                                           "started_at", started_at,
                                           "restarts", (int)info.restarts, "vms", info.vms, "devices", info.devices,
                                           "protocol_features", vhub_json_u64(info.protocol_features),
                                           "capabilities", caps),
                              err);
}

const struct param cm_daemon_info_result = R_OBJECT(
        R("version", PARAM_STRING, "the daemon's version"),
        R("api_version", PARAM_STRING, "the version of the contract it speaks"),
        R_U64("pid", "its process id"),
        R_U64("uptime_ms", "milliseconds since it started"),
        R("started_at", PARAM_TIMESTAMP, "when it started"),
        R_U64("restarts", "how many times its state was carried across a restart"),
        R_U64("vms", "VMs the caller may see"),
        R_U64("devices", "devices of those VMs"),
        R_U64("protocol_features", "the vhost-user protocol features it implements"),
        R_NAMES("capabilities", "optional parts this build has"));

/* The document is built once per server, on first use. */
int cm_rpc_discover(struct method_call *m, struct vhub_error *err) {
        struct control_server *s = m->req->conn->srv;

        if (!s->discover)
                s->discover = control_discover_build();
        return cm_call_answer(m, s->discover ? json_incref(s->discover) : NULL, err);
}

const struct param cm_rpc_discover_result = { .kind = PARAM_OBJECT, .open = true,
                                                      .description = "an OpenRPC 1.2 document" };

/* ---- events ---- */

static int subscribe_vm(struct control_conn *c, struct method_call *m, struct vhub_error *err) {
        char **names;
        uid_t *uids;

        if (c->n_sub_vms >= 1024)
                return vhub_error_set(err, VHUB_ERR_LIMIT, "too many subscriptions on this connection");
        names = reallocarray(c->sub_vms, c->n_sub_vms + 1, sizeof(*names));
        if (!names)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        c->sub_vms = names;
        uids = reallocarray(c->sub_uids, c->n_sub_vms + 1, sizeof(*uids));
        if (!uids)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        c->sub_uids = uids;
        names[c->n_sub_vms] = strdup(vhub_vm_name(m->vm));
        if (!names[c->n_sub_vms])
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        uids[c->n_sub_vms] = vhub_vm_uid(m->vm);
        c->n_sub_vms++;
        return 0;
}

int cm_events_subscribe(struct method_call *m, struct vhub_error *err) {
        struct control_conn *c = m->req->conn;
        uint64_t since = c->snap_serial;
        size_t n_sub_vms = c->n_sub_vms;
        bool sub_all = c->sub_all;
        int r = 0;

        control_conn_changed(c);        /* its record holds its subscriptions */
        if (m->vm)
                r = subscribe_vm(c, m, err);
        else
                c->sub_all = true;
        if (r < 0)
                return r;
        /* one a crash would lose is refused (and so are the rest of a
         * batch whose record could not be stored either) */
        if (control_conn_record(c, since) >= 0)
                return 0;
        if (m->req->batch)
                (void)control_batch_record(m->req->batch);
        c->sub_all = sub_all;
        while (c->n_sub_vms > n_sub_vms)
                free(c->sub_vms[--c->n_sub_vms]);
        control_conn_changed(c);
        return vhub_error_set(err, VHUB_ERR_INTERNAL, CONTROL_UNRECORDED);
}
