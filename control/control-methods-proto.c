/* SPDX-License-Identifier: MIT */
/*
 * The methods issue 12 added or changed (the whole vhost-user protocol):
 * device.add with `shmem`, device.start with rings kicked in-band,
 * device.stop with `drain`, and device.kick.  Each handler is
 * self-contained in the style of control-methods.c and listed in the table
 * at the end, which control_dispatch() consults first; they move into the
 * method table when it becomes declarative.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control-internal.h"
#include "control-params.h"
#include "vhub-fd-budget.h"
#include "vhub-device.h"
#include "vhub-vm.h"

#define MEMBERS(...) ((const char *const[]){ __VA_ARGS__, NULL })

/* Only these members, the VM (isolation applied) and its device. */
static int proto_device(struct control_req *req, const char *const *members, struct vhub_vm **ret_vm,
                        struct vhub_device **ret_dev, struct vhub_error *err) {
        struct vhub_device *d;
        const char *name;
        int r;

        if ((r = params_check_members(req->params, members, err)) < 0 ||
            (r = control_req_vm(req, ret_vm, err)) < 0 ||
            (r = params_get_name(req->params, "device", true, &name, err)) < 0)
                return r;
        d = vhub_vm_find_device(*ret_vm, name);
        if (!d || d->removing)
                return vhub_error_set(err, VHUB_ERR_NO_DEVICE, "no such device: %s", name);
        *ret_dev = d;
        return 0;
}

/* A call into the model, within the connection's limit of pending calls. */
static struct control_call *proto_call(struct control_req *req, control_result_fn fn,
                                       struct vhub_error *err) {
        struct control_call *cc;

        if (req->conn->pending >= req->conn->srv->opts.max_pending) {
                vhub_error_set(err, VHUB_ERR_LIMIT,
                               "this connection already has %u calls waiting on back-ends (the limit)",
                               req->conn->pending);
                return NULL;
        }
        cc = control_call_new(req, fn);
        if (!cc)
                vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        return cc;
}

/* ---- device.add ---- */

static json_t *result_device_add(struct control_call *cc) {
        json_t *res = json_pack("{s:o, s:o, s:i, s:i}", "features",
                                vhub_json_u64(cc->call.out.device_add.features), "protocol_features",
                                vhub_json_u64(cc->call.out.device_add.protocol_features), "queues",
                                (int)cc->call.out.device_add.queues, "max_mem_slots",
                                (int)cc->call.out.device_add.max_mem_slots);
        json_t *sizes;

        /* contract: `shmem` only where SHMEM is negotiated (GET_SHMEM_CONFIG) */
        if (!res || !cc->call.out.device_add.has_shmem)
                return res;
        sizes = json_array();
        for (unsigned i = 0; i < cc->call.out.device_add.n_shmem; i++)
                json_array_append_new(sizes, vhub_json_u64(cc->call.out.device_add.shmem_sizes[i]));
        json_object_set_new(res, "shmem", sizes);
        return res;
}

static int m_device_add(struct control_req *req, struct vhub_error *err) {
        struct vhub_device_add_params p = { 0 };
        const char *mode = NULL;
        struct control_call *cc;
        struct vhub_vm *vm;
        uint32_t queues, reconnect_ms;
        int r;

        if ((r = params_check_members(req->params, MEMBERS("vm", "uid", "device", "socket", "type", "mode", "queues", "reconnect_ms"), err)) < 0 ||
            (r = control_req_vm(req, &vm, err)) < 0 ||
            (r = params_get_name(req->params, "device", true, &p.name, err)) < 0 ||
            (r = params_get_string(req->params, "socket", true, 107, &p.socket_path, err)) < 0 ||
            (r = params_get_name(req->params, "type", false, &p.type, err)) < 0 ||
            (r = params_get_string(req->params, "mode", false, 16, &mode, err)) < 0 ||
            (r = params_get_u32(req->params, "queues", false, 0, VHUB_MAX_QUEUES, &queues, err)) < 0 ||
            (r = params_get_u32(req->params, "reconnect_ms", false, 100, 3600000, &reconnect_ms, err)) < 0)
                return r;
        if (p.type && strlen(p.type) > 31)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'type' is longer than 31 characters");
        if (!mode || strcmp(mode, "client") == 0)
                p.mode = VHUB_DEV_MODE_CLIENT;
        else if (strcmp(mode, "server") == 0)
                p.mode = VHUB_DEV_MODE_SERVER;
        else
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'mode' must be \"client\" or \"server\"");
        if (json_object_get(req->params, "queues") && queues == 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'queues' must be 1..%d", VHUB_MAX_QUEUES);
        p.queues = queues;
        p.reconnect_ms = reconnect_ms;
        if ((r = control_req_check_fds(req, VHUB_DEVICE_OWN_FDS, err)) < 0)
                return r;
        if (!(cc = proto_call(req, result_device_add, err)))
                return -ENOMEM;
        vhub_device_add(vm, &p, &cc->call);
        return 0;
}

/* ---- device.start ---- */

static int m_device_start(struct control_req *req, struct vhub_error *err) {
        static const char *const vring_members[] = { "index", "size", "desc", "avail", "used",
                                                     "base", "kick", "call", "err", NULL };
        struct vhub_vring_params *vp = NULL;
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        uint64_t features;
        json_t *vrings, *v;
        size_t n = 0, i;
        int r;

        if ((r = proto_device(req, MEMBERS("vm", "uid", "device", "features", "vrings"), &vm, &d, err)) < 0 ||
            (r = params_get_u64(req->params, "features", true, 0, UINT64_MAX, &features, err)) < 0)
                return r;
        vrings = json_object_get(req->params, "vrings");
        if (!json_is_array(vrings) || json_array_size(vrings) == 0 ||
            json_array_size(vrings) > VHUB_MAX_QUEUES)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'vrings' must be an array of 1..%d rings",
                                      VHUB_MAX_QUEUES);
        vp = calloc(json_array_size(vrings), sizeof(*vp));
        if (!vp)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        json_array_foreach(vrings, i, v) {
                char where[32];
                uint64_t x;

                snprintf(where, sizeof(where), "vrings[%zu]", i);
                vp[i].kick_fd = vp[i].call_fd = vp[i].err_fd = -1;
                n = i + 1;
                if ((r = params_check_members_in(v, where, vring_members, err)) < 0 ||
                    (r = params_get_u64_in(v, where, "index", true, 0, VHUB_MAX_QUEUES - 1, &x, err)) < 0)
                        goto fail;
                vp[i].index = (uint32_t)x;
                if ((r = params_get_u64_in(v, where, "size", true, 0, 32768, &x, err)) < 0)
                        goto fail;
                vp[i].size = (uint32_t)x;
                if ((r = params_get_u64_in(v, where, "base", false, 0, 65535, &x, err)) < 0)
                        goto fail;
                vp[i].base = (uint32_t)x;
                /* `kick` may be left out where the back-end takes in-band
                 * kicks (device.kick); the model decides */
                if ((r = params_get_u64_in(v, where, "desc", true, 0, UINT64_MAX, &vp[i].desc, err)) < 0 ||
                    (r = params_get_u64_in(v, where, "avail", true, 0, UINT64_MAX, &vp[i].avail, err)) < 0 ||
                    (r = params_get_u64_in(v, where, "used", true, 0, UINT64_MAX, &vp[i].used, err)) < 0 ||
                    (r = params_take_fd_in(v, where, "kick", false, req->fds, &vp[i].kick_fd, err)) < 0 ||
                    (r = params_take_fd_in(v, where, "call", true, req->fds, &vp[i].call_fd, err)) < 0 ||
                    (r = params_take_fd_in(v, where, "err", false, req->fds, &vp[i].err_fd, err)) < 0)
                        goto fail;
        }
        if (!(cc = proto_call(req, NULL, err))) {
                r = -ENOMEM;
                goto fail;
        }
        /* bit 30 is vhost-user's own: the daemon adds it itself */
        features &= ~(UINT64_C(1) << VHU_F_PROTOCOL_FEATURES);
        vhub_device_start(d, features, vp, (unsigned)n, &cc->call);
        free(vp);
        return 0;

fail:
        for (i = 0; i < n; i++) {
                if (vp[i].kick_fd >= 0)
                        close(vp[i].kick_fd);
                if (vp[i].call_fd >= 0)
                        close(vp[i].call_fd);
                if (vp[i].err_fd >= 0)
                        close(vp[i].err_fd);
        }
        free(vp);
        return r;
}

/* ---- device.stop ---- */

static json_t *result_device_stop(struct control_call *cc) {
        json_t *v = json_array();

        for (unsigned i = 0; i < cc->call.out.device_stop.n_vrings; i++) {
                const struct vhub_vring_base *b = &cc->call.out.device_stop.vrings[i];
                /* base is a u32 (a packed ring's has wrap counters in bits 15 and 31) */
                json_t *ring = json_pack("{s:i, s:I}", "index", (int)b->index, "base", (json_int_t)b->base);

                /* GET_VRING_BASE_INFLIGHT: how many requests the back-end
                 * suspended into the inflight region (completed after the
                 * next device.start); absent if the region was unreadable */
                if (ring && b->inflight >= 0)
                        json_object_set_new(ring, "inflight", json_integer(b->inflight));
                json_array_append_new(v, ring);
        }
        return json_pack("{s:o}", "vrings", v);
}

static int m_device_stop(struct control_req *req, struct vhub_error *err) {
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        json_t *drain;
        int r;

        if ((r = proto_device(req, MEMBERS("vm", "uid", "device", "drain"), &vm, &d, err)) < 0)
                return r;
        drain = json_object_get(req->params, "drain");
        if (drain && !json_is_boolean(drain))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'drain' must be true or false");
        if (!(cc = proto_call(req, result_device_stop, err)))
                return -ENOMEM;
        vhub_device_stop(d, !drain || json_is_true(drain), &cc->call);
        return 0;
}

/* ---- device.kick ---- */

static int m_device_kick(struct control_req *req, struct vhub_error *err) {
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        uint32_t index;
        int r;

        if ((r = proto_device(req, MEMBERS("vm", "uid", "device", "index"), &vm, &d, err)) < 0 ||
            (r = params_get_u32(req->params, "index", true, 0, VHUB_MAX_QUEUES - 1, &index, err)) < 0)
                return r;
        if (!(cc = proto_call(req, NULL, err)))
                return -ENOMEM;
        vhub_device_kick(d, index, &cc->call);
        return 0;
}

/* ---- the table ---- */

static const struct {
        const char *name;
        int (*handler)(struct control_req *req, struct vhub_error *err);
} proto_methods[] = {
        { "device.add", m_device_add },
        { "device.start", m_device_start },
        { "device.stop", m_device_stop },
        { "device.kick", m_device_kick },
};

bool control_proto_dispatch(struct control_req *req, const char *method, size_t method_len) {
        struct vhub_error err = { 0 };

        for (size_t i = 0; i < sizeof(proto_methods) / sizeof(proto_methods[0]); i++) {
                /* the length too: "device.kick\u0000x" is not device.kick */
                if (strlen(proto_methods[i].name) != method_len ||
                    strcmp(proto_methods[i].name, method) != 0)
                        continue;
                if (proto_methods[i].handler(req, &err) < 0)
                        control_req_error(req, &err);
                return true;
        }
        return false;
}
