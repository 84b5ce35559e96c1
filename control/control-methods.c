/* SPDX-License-Identifier: MIT */
/*
 * The contract's methods.  Each is a descriptor of its params, one function
 * and one row of the table at the end.  control_dispatch() does what every
 * method needs, once and in this order: read the params (control-params.c;
 * so -32602 is decided from the params alone, before anything is looked up,
 * exactly as rpc.discover's schemas say), refuse methods that answer with fds
 * inside a batch, resolve the VM and device under the caller's uid, take a
 * pending slot for calls that wait on back-ends.  Then the function runs: it
 * calls the model and, unless it waits, sets the result.
 *
 * Here: the table, what the functions share and the dispatch; the
 * functions live by job in control-methods-daemon.c, -vm.c, -memory.c,
 * -device.c and -device-features.c (control-methods-internal.h).
 */
#include <stdlib.h>
#include <string.h>

#include "control-methods-internal.h"

struct vhub_context *cm_call_ctx(const struct method_call *m) {
        return m->req->conn->srv->ctx;
}

/* A result built with json_pack: NULL only when memory ran out. */
int cm_call_answer(struct method_call *m, json_t *result, struct vhub_error *err) {
        m->result = result;
        return result ? 0 : vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
}

/* A list method's result, {key: [one object per item]}, from a snapshot of
 * the model (vhub-info.h: r is what taking it returned); frees the items. */
int cm_call_answer_list(struct method_call *m, int r, const char *key, void *items, size_t n,
                        size_t size, json_t *(*item_json)(const void *item), struct vhub_error *err) {
        json_t *list;

        if (r < 0)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        list = json_array();
        for (size_t i = 0; i < n; i++)
                json_array_append_new(list, item_json((const char *)items + i * size));
        free(items);
        return cm_call_answer(m, json_pack("{s:o}", key, list), err);
}

static const struct param vm_target[] = { P_VM(true), P_UID, { 0 } };
static const struct param vm_target_optional[] = { P_VM(false), P_UID, { 0 } };
static const struct param device_target[] = { P_DEVICE("the device's name, unique within its VM"), { 0 } };

#define ERRORS(...) ((const int[]){ __VA_ARGS__, 0 })

/* ---- the table ---- */

/* back-end trouble, for every call that talks to back-ends */
#define BACKEND_ERRORS VHUB_ERR_BACKEND, VHUB_ERR_TIMEOUT
/* a request to one device's back-end: most device.* methods */
#define DEVICE_CALL (METHOD_VM | METHOD_DEVICE | METHOD_WAITS)
/* ... which answers -32004 or -32005 before it is sent, or the back-end's trouble */
#define DEVICE_ERRORS VHUB_ERR_STATE, VHUB_ERR_UNSUPPORTED, BACKEND_ERRORS
/* a step on every device: one may go away or refuse on the way */
#define POSTCOPY_ERRORS DEVICE_ERRORS, VHUB_ERR_NO_DEVICE, VHUB_ERR_LIMIT

static const struct control_method methods[] = {
        { .name = "daemon.info", .fn = cm_daemon_info, .result = &cm_daemon_info_result,
          .summary = "What the daemon is: version, contract version, uptime, counts, capabilities." },
        { .name = "vm.create", .fn = cm_vm_create, .params = cm_vm_create_params,
          .errors = ERRORS(VHUB_ERR_NO_VM, VHUB_ERR_EXISTS, VHUB_ERR_LIMIT),
          .summary = "Create an empty VM owned by this connection." },
        { .name = "vm.attach", .fn = cm_vm_attach, .flags = METHOD_VM, .errors = ERRORS(VHUB_ERR_STATE),
          .summary = "Take over a lingering VM of the same uid." },
        { .name = "vm.destroy", .fn = cm_vm_destroy, .flags = METHOD_VM | METHOD_WAITS,
          .summary = "Stop and remove every device, then the VM." },
        { .name = "vm.list", .fn = cm_vm_list, .result = &cm_vm_list_result,
          .summary = "The VMs the caller may see." },
        { .name = "vm.memory.add", .fn = cm_vm_memory_add, .flags = METHOD_VM | METHOD_WAITS,
          .params = cm_vm_memory_add_params,
          .errors = ERRORS(VHUB_ERR_STATE, VHUB_ERR_REGION, BACKEND_ERRORS),
          .summary = "Add a guest RAM region; every device has it before the call answers." },
        { .name = "vm.memory.remove", .fn = cm_vm_memory_remove, .flags = METHOD_VM | METHOD_WAITS,
          .params = cm_vm_memory_remove_params, .errors = ERRORS(VHUB_ERR_STATE, VHUB_ERR_REGION, BACKEND_ERRORS),
          .summary = "Remove a region; every device has dropped it before the call answers." },
        { .name = "vm.memory.list", .fn = cm_vm_memory_list, .flags = METHOD_VM, .result = &cm_vm_memory_list_result,
          .summary = "The VM's memory regions." },
        { .name = "device.add", .fn = cm_device_add, .flags = METHOD_VM | METHOD_WAITS, .params = cm_device_add_params,
          .result = &cm_device_add_result, .make_result = cm_result_device_add,
          .errors = ERRORS(VHUB_ERR_EXISTS, VHUB_ERR_STATE, VHUB_ERR_UNSUPPORTED, VHUB_ERR_NOT_ALLOWED,
                           VHUB_ERR_LIMIT, BACKEND_ERRORS),
          .summary = "Connect a back-end, negotiate, set the owner and the memory table; with vmm_socket, "
                     "open the front door for an unmodified VMM." },
        { .name = "device.remove", .fn = cm_device_remove, .flags = DEVICE_CALL,
          .summary = "Stop a device if it runs, cancel reconnects, remove it." },
        { .name = "device.list", .fn = cm_device_list, .flags = METHOD_VM, .result = &cm_device_list_result,
          .summary = "The VM's devices." },
        { .name = "device.config.get", .fn = cm_device_config_get, .flags = DEVICE_CALL,
          .params = cm_device_config_get_params, .result = &cm_config_get_result, .make_result = cm_result_config_get,
          .errors = ERRORS(DEVICE_ERRORS), .summary = "GET_CONFIG: read the device's config space." },
        { .name = "device.config.set", .fn = cm_device_config_set, .flags = DEVICE_CALL,
          .params = cm_device_config_set_params, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "SET_CONFIG: write the device's config space." },
        { .name = "device.start", .fn = cm_device_start, .flags = DEVICE_CALL, .params = cm_device_start_params,
          .errors = ERRORS(DEVICE_ERRORS, VHUB_ERR_REGION),
          .summary = "Set the acked features and start the rings (from ready or stopped)." },
        { .name = "device.stop", .fn = cm_device_stop, .flags = DEVICE_CALL, .params = cm_device_stop_params,
          .result = &cm_device_stop_result, .make_result = cm_result_device_stop, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "Stop every ring (draining, or suspending in-flight requests); their bases." },
        { .name = "device.reset", .fn = cm_device_reset, .flags = DEVICE_CALL,
          .errors = ERRORS(VHUB_ERR_STATE, BACKEND_ERRORS), .summary = "Back to ready." },
        { .name = "device.net.rarp", .fn = cm_device_net_rarp, .flags = DEVICE_CALL,
          .params = cm_device_net_rarp_params, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "SEND_RARP: announce the guest's MAC after a migration." },
        { .name = "device.net.mtu", .fn = cm_device_net_mtu, .flags = DEVICE_CALL,
          .params = cm_device_net_mtu_params, .errors = ERRORS(DEVICE_ERRORS), .summary = "NET_SET_MTU." },
        { .name = "vm.dirty_log.start", .fn = cm_vm_dirty_log_start,
          .flags = METHOD_VM | METHOD_WAITS | METHOD_FDS_OUT, .result = &cm_dirty_log_result,
          .make_result = cm_result_dirty_log, .errors = ERRORS(DEVICE_ERRORS, VHUB_ERR_LIMIT),
          .summary = "Give every device a log memfd (SET_LOG_BASE) and return it." },
        { .name = "vm.dirty_log.stop", .fn = cm_vm_dirty_log_stop, .flags = METHOD_VM | METHOD_WAITS,
          .errors = ERRORS(VHUB_ERR_STATE, BACKEND_ERRORS), .summary = "Stop dirty logging." },
        { .name = "device.state.save", .fn = cm_device_state_save, .flags = DEVICE_CALL | METHOD_FDS_OUT,
          .params = cm_device_state_fd_params, .result = &cm_state_fd_result, .make_result = cm_result_state_fd,
          .errors = ERRORS(DEVICE_ERRORS),
          .summary = "SET_DEVICE_STATE_FD (save): the back-end writes its state into the pipe." },
        { .name = "device.state.load", .fn = cm_device_state_load, .flags = DEVICE_CALL | METHOD_FDS_OUT,
          .params = cm_device_state_fd_params, .result = &cm_state_fd_result, .make_result = cm_result_state_fd,
          .errors = ERRORS(DEVICE_ERRORS),
          .summary = "SET_DEVICE_STATE_FD (load): the back-end reads its state from the pipe." },
        { .name = "device.state.check", .fn = cm_device_state_check, .flags = DEVICE_CALL,
          .errors = ERRORS(DEVICE_ERRORS), .summary = "CHECK_DEVICE_STATE after a transfer." },
        { .name = "shared_object.add", .fn = cm_shared_object_add, .flags = METHOD_VM,
          .params = cm_shared_object_add_params, .errors = ERRORS(VHUB_ERR_EXISTS, VHUB_ERR_LIMIT),
          .summary = "Export an fd under a UUID to the VM's back-ends." },
        { .name = "shared_object.remove", .fn = cm_shared_object_remove, .flags = METHOD_VM,
          .params = cm_shared_object_remove_params, .summary = "Withdraw an exported object." },
        { .name = "shared_object.list", .fn = cm_shared_object_list, .flags = METHOD_VM,
          .result = &cm_shared_object_list_result, .summary = "The VM's shared objects." },
        { .name = "device.backend_reply", .fn = cm_device_backend_reply, .flags = METHOD_VM | METHOD_DEVICE,
          .params = cm_device_backend_reply_params, .summary = "Answer a forwarded device.backend_request." },
        { .name = "events.subscribe", .fn = cm_events_subscribe, .flags = METHOD_VM_OPTIONAL,
          .errors = ERRORS(VHUB_ERR_LIMIT),
          .summary = "Also receive the events of that VM (without vm: of every VM the caller may see; "
                     "root: of every uid)." },
        { .name = "rpc.discover", .fn = cm_rpc_discover, .result = &cm_rpc_discover_result,
          .summary = "This document." },
        { .name = "device.stats", .fn = cm_device_stats, .flags = METHOD_VM | METHOD_DEVICE,
          .result = &cm_device_stats_result,
          .summary = "The device's control-plane counters since device.add: requests, replies, losses, durations." },
        { .name = "device.crypto.session.create", .fn = cm_device_crypto_session_create, .flags = DEVICE_CALL,
          .params = cm_crypto_session_create_params, .result = &cm_crypto_session_result,
          .make_result = cm_result_crypto_session, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "CREATE_CRYPTO_SESSION (protocol feature CRYPTO_SESSION)." },
        { .name = "device.crypto.session.close", .fn = cm_device_crypto_session_close, .flags = DEVICE_CALL,
          .params = cm_crypto_session_close_params, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "CLOSE_CRYPTO_SESSION." },
        { .name = "device.gpu.set_socket", .fn = cm_device_gpu_set_socket, .flags = DEVICE_CALL,
          .params = cm_gpu_set_socket_params, .errors = ERRORS(VHUB_ERR_STATE, BACKEND_ERRORS),
          .summary = "GPU_SET_SOCKET: hand the back-end its vhost-user-gpu socket." },
        { .name = "device.iotlb.update", .fn = cm_device_iotlb_update, .flags = DEVICE_CALL,
          .params = cm_iotlb_update_params, .errors = ERRORS(DEVICE_ERRORS, VHUB_ERR_REGION),
          .summary = "IOTLB_MSG (update): map an I/O virtual address range." },
        { .name = "device.iotlb.invalidate", .fn = cm_device_iotlb_invalidate, .flags = DEVICE_CALL,
          .params = cm_iotlb_invalidate_params, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "IOTLB_MSG (invalidate): drop a range's translations." },
        { .name = "device.kick", .fn = cm_device_kick, .flags = DEVICE_CALL, .params = cm_device_kick_params,
          .errors = ERRORS(DEVICE_ERRORS), .summary = "VRING_KICK: an in-band kick (INBAND_NOTIFICATIONS)." },
        { .name = "vm.postcopy.advise", .fn = cm_vm_postcopy_advise,
          .flags = METHOD_VM | METHOD_WAITS | METHOD_FDS_OUT, .result = &cm_postcopy_advise_result,
          .make_result = cm_result_postcopy_advise, .errors = ERRORS(POSTCOPY_ERRORS),
          .summary = "POSTCOPY_ADVISE to every device; their userfaultfds." },
        { .name = "vm.postcopy.listen", .fn = cm_vm_postcopy_listen, .flags = METHOD_VM | METHOD_WAITS,
          .params = cm_postcopy_listen_params, .result = &cm_postcopy_listen_result, .errors = ERRORS(POSTCOPY_ERRORS),
          .summary = "POSTCOPY_LISTEN to every device, which maps the VM's memory again." },
        { .name = "vm.postcopy.end", .fn = cm_vm_postcopy_end, .flags = METHOD_VM | METHOD_WAITS,
          .errors = ERRORS(POSTCOPY_ERRORS), .summary = "POSTCOPY_END to every device." },
};

const struct control_method *control_methods(size_t *ret_n) {
        *ret_n = sizeof(methods) / sizeof(methods[0]);
        return methods;
}

void control_method_param_lists(const struct control_method *m, const struct param *lists[4]) {
        size_t n = 0;

        if (m->flags & METHOD_VM)
                lists[n++] = vm_target;
        else if (m->flags & METHOD_VM_OPTIONAL)
                lists[n++] = vm_target_optional;
        if (m->flags & METHOD_DEVICE)
                lists[n++] = device_target;
        if (m->params)
                lists[n++] = m->params;
        lists[n] = NULL;
}

/* ---- dispatch ---- */

static const struct control_method *method_find(const char *name, size_t len) {
        for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++)
                /* the length too: "daemon.info\u0000x" is not daemon.info */
                if (strlen(methods[i].name) == len && strcmp(methods[i].name, name) == 0)
                        return &methods[i];
        return NULL;
}

/* The VM and device the params name, as the caller may see them. */
static int call_resolve(struct method_call *m, unsigned flags, struct vhub_error *err) {
        struct control_conn *c = m->req->conn;
        uid_t uid = m->p.uid == UID_CALLER ? c->uid : (uid_t)m->p.uid;

        if (!(flags & (METHOD_VM | METHOD_VM_OPTIONAL)) || !m->p.vm)
                return 0;
        /* another uid's VM is indistinguishable from one that does not exist */
        m->vm = vhub_vm_find(cm_call_ctx(m), uid, m->p.vm);
        if (!m->vm || !vhub_vm_visible_to(m->vm, c->uid))
                return vhub_error_set(err, VHUB_ERR_NO_VM, "no such VM: %s", m->p.vm);
        if (!(flags & METHOD_DEVICE))
                return 0;
        m->dev = vhub_vm_find_device(m->vm, m->p.device);
        if (!m->dev || vhub_device_is_removing(m->dev))
                return vhub_error_set(err, VHUB_ERR_NO_DEVICE, "no such device: %s", m->p.device);
        return 0;
}

/* A pending slot: the connection's calls waiting on back-ends are bounded. */
static int call_wait(struct method_call *m, control_result_fn make_result, struct vhub_error *err) {
        struct control_conn *c = m->req->conn;

        if (c->pending >= c->srv->opts.max_pending)
                return vhub_error_set(err, VHUB_ERR_LIMIT,
                                      "this connection already has %u calls waiting on back-ends (the limit)",
                                      c->pending);
        m->cc = control_call_new(m->req, make_result);
        if (!m->cc)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        /* a crash from now on answers it -32011 only if its record says so */
        if (control_call_record(m->cc) < 0)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, CONTROL_UNRECORDED);
        return 0;
}

void control_dispatch(struct control_req *req, const char *name, size_t name_len) {
        const struct control_method *method = method_find(name, name_len);
        const struct param *lists[4];
        struct vhub_error err = { 0 };
        struct method_call m;
        int r;

        /* all of it: the params union is only as zeroed as its largest member */
        memset(&m, 0, sizeof(m));
        m.req = req;
        if (!method) {
                vhub_error_set(&err, VHUB_ERR_NO_METHOD, "unknown method %.64s%s", name,
                               strlen(name) != name_len ? " (with a NUL byte)" : "");
                control_req_error(req, &err);
                return;
        }
        control_method_param_lists(method, lists);
        params_init(lists, &m.p);
        r = params_read(req->params, lists, &m.p, req->fds, &err);
        /* a batch's answer has no room for fds */
        if (r >= 0 && (method->flags & METHOD_FDS_OUT) && req->batch)
                r = vhub_error_set(&err, VHUB_ERR_PARAMS, "%s may answer with an fd and cannot be used inside a batch",
                                   method->name);
        if (r >= 0)
                r = call_resolve(&m, method->flags, &err);
        if (r >= 0 && (method->flags & METHOD_WAITS))
                r = call_wait(&m, method->make_result, &err);
        if (r >= 0)
                r = method->fn(&m, &err);
        if (r < 0) {
                /* a method fails before it hands its call to the model, never after */
                if (m.cc)
                        control_call_drop(m.cc);
                control_req_error(req, &err);
        } else if (!(method->flags & METHOD_WAITS)) {
                control_req_result(req, m.result ? m.result : json_object());
        }
        params_clear(lists, &m.p);
}
