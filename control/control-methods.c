/* SPDX-License-Identifier: MIT */
/*
 * The contract's methods: each one validates its params strictly, resolves
 * the VM under the caller's identity, and calls the model; calls that wait
 * on back-ends answer from their completion.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control-internal.h"
#include "control-params.h"
#include "vhub-context.h"
#include "vhub-device.h"
#include "vhub-shared-object.h"
#include "vhub-time.h"
#include "vhub-version.h"
#include "vhub-vm.h"

#define MEMBERS(...) ((const char *const[]){ __VA_ARGS__, NULL })

static struct vhub_context *req_ctx(struct control_req *req) {
        return req->conn->srv->ctx;
}

/* Every method that names a VM accepts "uid" (root may name another uid's VM). */
int control_req_vm(struct control_req *req, struct vhub_vm **ret, struct vhub_error *err) {
        const char *name;
        uint64_t uid;
        struct vhub_vm *vm;
        int r;

        r = params_get_name(req->params, "vm", true, &name, err);
        if (r < 0)
                return r;
        r = params_get_u64(req->params, "uid", false, req->conn->uid, UINT32_MAX - 1, &uid, err);
        if (r < 0)
                return r;
        /* another uid's VM is indistinguishable from one that does not exist */
        if (req->conn->uid != 0 && uid != req->conn->uid)
                return vhub_error_set(err, VHUB_ERR_NO_VM, "no such VM: %s", name);
        vm = vhub_vm_find(req_ctx(req), (uid_t)uid, name);
        if (!vm || vm->destroying)
                return vhub_error_set(err, VHUB_ERR_NO_VM, "no such VM: %s", name);
        *ret = vm;
        return 0;
}

static int req_device(struct control_req *req, struct vhub_vm *vm, struct vhub_device **ret,
                      struct vhub_error *err) {
        const char *name;
        struct vhub_device *d;
        int r;

        r = params_get_name(req->params, "device", true, &name, err);
        if (r < 0)
                return r;
        d = vhub_vm_find_device(vm, name);
        if (!d || d->removing)
                return vhub_error_set(err, VHUB_ERR_NO_DEVICE, "no such device: %s", name);
        *ret = d;
        return 0;
}

/* The common prologue: only these members, then the VM they name. */
static int req_vm_params(struct control_req *req, const char *const *members, struct vhub_vm **ret_vm,
                         struct vhub_error *err) {
        int r = params_check_members(req->params, members, err);

        return r < 0 ? r : control_req_vm(req, ret_vm, err);
}

/* ... and the device of that VM. */
static int req_device_params(struct control_req *req, const char *const *members,
                             struct vhub_vm **ret_vm, struct vhub_device **ret_dev,
                             struct vhub_error *err) {
        int r = req_vm_params(req, members, ret_vm, err);

        return r < 0 ? r : req_device(req, *ret_vm, ret_dev, err);
}

static int req_check_pending(struct control_req *req, struct vhub_error *err) {
        if (req->conn->pending >= req->conn->srv->opts.max_pending)
                return vhub_error_set(err, VHUB_ERR_LIMIT,
                                      "this connection already has %u calls waiting on back-ends (the limit)",
                                      req->conn->pending);
        return 0;
}

static struct control_call *req_call(struct control_req *req, control_result_fn fn,
                                     struct vhub_error *err) {
        struct control_call *cc;

        if (req_check_pending(req, err) < 0)
                return NULL;
        cc = control_call_new(req, fn);
        if (!cc)
                vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        return cc;
}

/* ---- daemon ---- */

static int m_daemon_info(struct control_req *req, struct vhub_error *err) {
        struct vhub_context *ctx = req_ctx(req);
        unsigned vms = 0, devices = 0;
        struct vhub_vm *vm;
        int r;

        r = params_check_members(req->params, MEMBERS(NULL), err);
        if (r < 0)
                return r;
        TAILQ_FOREACH(vm, &ctx->vms, link)
                /* a VM being destroyed is already gone for every method (-32001) */
                if (!vm->destroying && (req->conn->uid == 0 || vm->uid == req->conn->uid)) {
                        vms++;
                        devices += vm->n_devices;
                }
        control_req_result(req, json_pack("{s:s, s:i, s:o, s:i, s:i, s:o}", "version", VHUB_VERSION,
                                          "pid", (int)getpid(), "uptime_ms",
                                          vhub_json_u64((vhub_now_usec() - ctx->start_usec) / 1000), "vms",
                                          vms, "devices", devices, "protocol_features",
                                          vhub_json_u64(VHUB_SUPPORTED_PROTOCOL_FEATURES)));
        return 0;
}

/* ---- VMs ---- */

static int m_vm_create(struct control_req *req, struct vhub_error *err) {
        const char *name;
        uint64_t linger, uid;
        struct vhub_vm *vm;
        int r;

        if ((r = params_check_members(req->params, MEMBERS("vm", "linger_ms", "uid"), err)) < 0 ||
            (r = params_get_name(req->params, "vm", true, &name, err)) < 0 ||
            (r = params_get_u64(req->params, "linger_ms", false, 0, 7ull * 24 * 3600 * 1000, &linger, err)) < 0 ||
            (r = params_get_u64(req->params, "uid", false, req->conn->uid, UINT32_MAX - 1, &uid, err)) < 0)
                return r;
        if (req->conn->uid != 0 && uid != req->conn->uid)
                return vhub_error_set(err, VHUB_ERR_NO_VM, "only root may create a VM for another uid");
        r = vhub_vm_create(req_ctx(req), (uid_t)uid, name, linger, req->conn->id, err, &vm);
        if (r < 0)
                return r;
        control_req_result(req, json_object());
        return 0;
}

static int m_vm_attach(struct control_req *req, struct vhub_error *err) {
        struct vhub_vm *vm;
        int r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid"), &vm, err)) < 0)
                return r;
        r = vhub_vm_attach(vm, req->conn->id, err);
        if (r < 0)
                return r;
        control_req_result(req, json_object());
        return 0;
}

/* A VM method that waits on the model and answers {}. */
static int m_vm_simple(struct control_req *req, struct vhub_error *err,
                       void (*fn)(struct vhub_vm *, struct vhub_call *)) {
        struct control_call *cc;
        struct vhub_vm *vm;
        int r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid"), &vm, err)) < 0)
                return r;
        if (!(cc = req_call(req, NULL, err)))
                return -ENOMEM;
        fn(vm, &cc->call);
        return 0;
}

static int m_vm_destroy(struct control_req *req, struct vhub_error *err) {
        return m_vm_simple(req, err, vhub_vm_destroy);
}

static int m_vm_list(struct control_req *req, struct vhub_error *err) {
        json_t *vms = json_array();
        struct vhub_vm *vm;
        int r;

        r = params_check_members(req->params, MEMBERS(NULL), err);
        if (r < 0) {
                json_decref(vms);
                return r;
        }
        TAILQ_FOREACH(vm, &req_ctx(req)->vms, link) {
                json_t *devs = json_array();
                struct vhub_device *d;

                if (vm->destroying || (req->conn->uid != 0 && vm->uid != req->conn->uid)) {
                        json_decref(devs);
                        continue;
                }
                TAILQ_FOREACH(d, &vm->devices, link)
                        json_array_append_new(devs, json_string(d->name));
                json_array_append_new(vms, json_pack("{s:s, s:i, s:o, s:i}", "vm", vm->name, "uid",
                                                     (int)vm->uid, "devices", devs, "regions",
                                                     (int)vm->mem.n));
        }
        control_req_result(req, json_pack("{s:o}", "vms", vms));
        return 0;
}

static int m_vm_memory_add(struct control_req *req, struct vhub_error *err) {
        struct vhub_region region = { .fd = -1 };
        struct control_call *cc;
        struct vhub_vm *vm;
        int r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid", "gpa", "size", "fd", "offset", "uaddr"), &vm, err)) < 0 ||
            (r = params_get_u64(req->params, "gpa", true, 0, UINT64_MAX, &region.gpa, err)) < 0 ||
            (r = params_get_u64(req->params, "size", true, 0, UINT64_MAX, &region.size, err)) < 0 ||
            (r = params_get_u64(req->params, "offset", false, 0, UINT64_MAX, &region.offset, err)) < 0 ||
            (r = params_get_u64(req->params, "uaddr", false, region.gpa, UINT64_MAX, &region.uaddr, err)) < 0 ||
            (r = params_take_fd(req->params, "fd", true, req->fds, &region.fd, err)) < 0)
                return r;
        if (!(cc = req_call(req, NULL, err))) {
                close(region.fd);
                return -ENOMEM;
        }
        vhub_vm_memory_add(vm, &region, &cc->call);
        return 0;
}

static int m_vm_memory_remove(struct control_req *req, struct vhub_error *err) {
        struct control_call *cc;
        struct vhub_vm *vm;
        uint64_t gpa;
        int r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid", "gpa"), &vm, err)) < 0 ||
            (r = params_get_u64(req->params, "gpa", true, 0, UINT64_MAX, &gpa, err)) < 0)
                return r;
        if (!(cc = req_call(req, NULL, err)))
                return -ENOMEM;
        vhub_vm_memory_remove(vm, gpa, &cc->call);
        return 0;
}

static int m_vm_memory_list(struct control_req *req, struct vhub_error *err) {
        json_t *regions;
        struct vhub_vm *vm;
        int r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid"), &vm, err)) < 0)
                return r;
        regions = json_array();
        for (size_t i = 0; i < vm->mem.n; i++) {
                const struct vhub_region *g = &vm->mem.regions[i];

                json_array_append_new(regions, json_pack("{s:o, s:o, s:o, s:o}", "gpa", vhub_json_u64(g->gpa),
                                                         "size", vhub_json_u64(g->size), "offset",
                                                         vhub_json_u64(g->offset), "uaddr", vhub_json_u64(g->uaddr)));
        }
        control_req_result(req, json_pack("{s:o}", "regions", regions));
        return 0;
}

/* ---- devices ---- */

static json_t *result_device_add(struct control_call *cc) {
        return json_pack("{s:o, s:o, s:i, s:i}", "features", vhub_json_u64(cc->call.out.device_add.features),
                         "protocol_features", vhub_json_u64(cc->call.out.device_add.protocol_features),
                         "queues", (int)cc->call.out.device_add.queues, "max_mem_slots",
                         (int)cc->call.out.device_add.max_mem_slots);
}

static int m_device_add(struct control_req *req, struct vhub_error *err) {
        struct vhub_device_add_params p = { 0 };
        const char *mode = NULL;
        struct control_call *cc;
        struct vhub_vm *vm;
        uint32_t queues, reconnect_ms;
        int r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid", "device", "socket", "type", "mode", "queues", "reconnect_ms"), &vm, err)) < 0 ||
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
        if (!(cc = req_call(req, result_device_add, err)))
                return -ENOMEM;
        vhub_device_add(vm, &p, &cc->call);
        return 0;
}

/* A device method that waits on the model; make_result NULL answers {}. */
static int m_device_simple(struct control_req *req, struct vhub_error *err,
                           void (*fn)(struct vhub_device *, struct vhub_call *),
                           control_result_fn make_result) {
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        int r;

        if ((r = req_device_params(req, MEMBERS("vm", "uid", "device"), &vm, &d, err)) < 0)
                return r;
        if (!(cc = req_call(req, make_result, err)))
                return -ENOMEM;
        fn(d, &cc->call);
        return 0;
}

static int m_device_remove(struct control_req *req, struct vhub_error *err) {
        return m_device_simple(req, err, vhub_device_remove, NULL);
}

static int m_device_list(struct control_req *req, struct vhub_error *err) {
        struct vhub_device *d;
        struct vhub_vm *vm;
        json_t *devs;
        int r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid"), &vm, err)) < 0)
                return r;
        devs = json_array();
        TAILQ_FOREACH(d, &vm->devices, link) {
                json_t *o = json_pack("{s:s, s:s, s:s, s:o, s:o, s:o, s:i, s:i}", "device", d->name,
                                      "state", vhub_device_state_to_string(d->state), "socket",
                                      d->socket_path, "features", vhub_json_u64(d->features),
                                      "acked_features", vhub_json_u64(d->acked_features),
                                      "protocol_features", vhub_json_u64(d->protocol_features), "queues",
                                      (int)d->queues, "reconnects", (int)d->reconnects);

                json_array_append_new(devs, o);
        }
        control_req_result(req, json_pack("{s:o}", "devices", devs));
        return 0;
}

static json_t *result_config_get(struct control_call *cc) {
        char *b64 = NULL;
        json_t *res;

        if (vhub_base64_encode(cc->call.out.config_get.data, cc->call.out.config_get.size, &b64) < 0)
                return NULL;
        res = json_pack("{s:s}", "data", b64);
        free(b64);
        return res;
}

static int m_device_config_get(struct control_req *req, struct vhub_error *err) {
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        uint32_t offset, size;
        int r;

        if ((r = req_device_params(req, MEMBERS("vm", "uid", "device", "offset", "size"), &vm, &d, err)) < 0 ||
            (r = params_get_u32(req->params, "offset", true, 0, VHU_MAX_CONFIG_SIZE, &offset, err)) < 0 ||
            (r = params_get_u32(req->params, "size", true, 0, VHU_MAX_CONFIG_SIZE, &size, err)) < 0)
                return r;
        if (size == 0 || offset + size > VHU_MAX_CONFIG_SIZE)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "'size' must be 1..%d and offset+size at most %d",
                                      VHU_MAX_CONFIG_SIZE, VHU_MAX_CONFIG_SIZE);
        if (!(cc = req_call(req, result_config_get, err)))
                return -ENOMEM;
        vhub_device_config_get(d, offset, size, &cc->call);
        return 0;
}

static int m_device_config_set(struct control_req *req, struct vhub_error *err) {
        uint8_t data[VHU_MAX_CONFIG_SIZE];
        struct control_call *cc;
        struct vhub_device *d;
        const char *b64;
        struct vhub_vm *vm;
        uint32_t offset;
        size_t len;
        int r;

        if ((r = req_device_params(req, MEMBERS("vm", "uid", "device", "offset", "data"), &vm, &d, err)) < 0 ||
            (r = params_get_u32(req->params, "offset", true, 0, VHU_MAX_CONFIG_SIZE, &offset, err)) < 0 ||
            (r = params_get_string(req->params, "data", true, 4 * VHU_MAX_CONFIG_SIZE, &b64, err)) < 0)
                return r;
        {
                void *buf = NULL;

                r = vhub_base64_decode(b64, &buf, &len);
                if (r == 0 && len > 0 && len <= sizeof(data))
                        memcpy(data, buf, len);
                free(buf);
                if (r < 0 || len == 0 || len > sizeof(data))
                        return vhub_error_set(err, VHUB_ERR_PARAMS,
                                              "'data' must be base64 of 1..%d bytes", VHU_MAX_CONFIG_SIZE);
        }
        if (offset + len > VHU_MAX_CONFIG_SIZE)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "offset + data length exceeds %d",
                                      VHU_MAX_CONFIG_SIZE);
        if (!(cc = req_call(req, NULL, err)))
                return -ENOMEM;
        vhub_device_config_set(d, offset, data, (uint32_t)len, &cc->call);
        return 0;
}

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

        if ((r = req_device_params(req, MEMBERS("vm", "uid", "device", "features", "vrings"), &vm, &d, err)) < 0 ||
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
                if ((r = params_get_u64_in(v, where, "desc", true, 0, UINT64_MAX, &vp[i].desc, err)) < 0 ||
                    (r = params_get_u64_in(v, where, "avail", true, 0, UINT64_MAX, &vp[i].avail, err)) < 0 ||
                    (r = params_get_u64_in(v, where, "used", true, 0, UINT64_MAX, &vp[i].used, err)) < 0 ||
                    (r = params_take_fd_in(v, where, "kick", true, req->fds, &vp[i].kick_fd, err)) < 0 ||
                    (r = params_take_fd_in(v, where, "call", true, req->fds, &vp[i].call_fd, err)) < 0 ||
                    (r = params_take_fd_in(v, where, "err", false, req->fds, &vp[i].err_fd, err)) < 0)
                        goto fail;
        }
        if (!(cc = req_call(req, NULL, err))) {
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

static json_t *result_device_stop(struct control_call *cc) {
        json_t *v = json_array();

        for (unsigned i = 0; i < cc->call.out.device_stop.n_vrings; i++)
                json_array_append_new(v, json_pack("{s:i, s:i}", "index",
                                                   (int)cc->call.out.device_stop.vrings[i].index, "base",
                                                   (int)cc->call.out.device_stop.vrings[i].base));
        return json_pack("{s:o}", "vrings", v);
}

static int m_device_stop(struct control_req *req, struct vhub_error *err) {
        return m_device_simple(req, err, vhub_device_stop, result_device_stop);
}

static int m_device_reset(struct control_req *req, struct vhub_error *err) {
        return m_device_simple(req, err, vhub_device_reset, NULL);
}

static int m_device_state_check(struct control_req *req, struct vhub_error *err) {
        return m_device_simple(req, err, vhub_device_check_state, NULL);
}

static int parse_mac(const char *s, uint8_t mac[6]) {
        unsigned v[6];
        char tail;

        if (!s || strlen(s) != 17 ||
            sscanf(s, "%2x:%2x:%2x:%2x:%2x:%2x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &tail) != 6)
                return -EINVAL;
        for (int i = 0; i < 6; i++) {
                if (s[i * 3] == '-' || s[i * 3] == '+' || s[i * 3] == ' ')
                        return -EINVAL;
                mac[i] = (uint8_t)v[i];
        }
        return 0;
}

static int m_device_net_rarp(struct control_req *req, struct vhub_error *err) {
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        const char *mac_s;
        uint8_t mac[6];
        int r;

        if ((r = req_device_params(req, MEMBERS("vm", "uid", "device", "mac"), &vm, &d, err)) < 0 ||
            (r = params_get_string(req->params, "mac", true, 17, &mac_s, err)) < 0)
                return r;
        if (parse_mac(mac_s, mac) < 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'mac' must look like aa:bb:cc:dd:ee:ff");
        if (!(cc = req_call(req, NULL, err)))
                return -ENOMEM;
        vhub_device_send_rarp(d, mac, &cc->call);
        return 0;
}

static int m_device_net_mtu(struct control_req *req, struct vhub_error *err) {
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        uint32_t mtu;
        int r;

        if ((r = req_device_params(req, MEMBERS("vm", "uid", "device", "mtu"), &vm, &d, err)) < 0 ||
            (r = params_get_u32(req->params, "mtu", true, 0, 65535, &mtu, err)) < 0)
                return r;
        if (mtu < 68)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'mtu' must be 68..65535");
        if (!(cc = req_call(req, NULL, err)))
                return -ENOMEM;
        vhub_device_set_mtu(d, (uint16_t)mtu, &cc->call);
        return 0;
}

static json_t *result_state_fd(struct control_call *cc) {
        /* a back-end that offers its own transfer channel: the VMM must use it */
        if (cc->call.out.state_fd.fd >= 0) {
                cc->reply_fds[0] = cc->call.out.state_fd.fd;
                cc->n_reply_fds = 1;
                cc->call.out.state_fd.fd = -1;
                return json_pack("{s:i}", "fd", 0);
        }
        return json_object();
}

static int m_device_state_transfer(struct control_req *req, struct vhub_error *err, bool load) {
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        int fd = -1, r;

        if ((r = req_device_params(req, MEMBERS("vm", "uid", "device", "fd"), &vm, &d, err)) < 0 ||
            (r = params_take_fd(req->params, "fd", true, req->fds, &fd, err)) < 0)
                return r;
        if (req->batch) {
                close(fd);
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "%s may answer with an fd and cannot be used inside a batch",
                                      load ? "device.state.load" : "device.state.save");
        }
        if (!(cc = req_call(req, result_state_fd, err))) {
                close(fd);
                return -ENOMEM;
        }
        cc->call.out.state_fd.fd = -1;
        vhub_device_state_fd(d, load, fd, &cc->call);
        return 0;
}

static int m_device_state_save(struct control_req *req, struct vhub_error *err) {
        return m_device_state_transfer(req, err, false);
}

static int m_device_state_load(struct control_req *req, struct vhub_error *err) {
        return m_device_state_transfer(req, err, true);
}

static json_t *result_dirty_log(struct control_call *cc) {
        cc->reply_fds[0] = cc->call.out.dirty_log.fd;
        cc->n_reply_fds = 1;
        return json_pack("{s:i, s:o}", "fd", 0, "size", vhub_json_u64(cc->call.out.dirty_log.size));
}

static int m_vm_dirty_log_start(struct control_req *req, struct vhub_error *err) {
        struct control_call *cc;
        struct vhub_vm *vm;
        int r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid"), &vm, err)) < 0)
                return r;
        if (req->batch)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "vm.dirty_log.start answers with an fd and cannot be used inside a batch");
        if (!(cc = req_call(req, result_dirty_log, err)))
                return -ENOMEM;
        vhub_vm_dirty_log_start(vm, &cc->call);
        return 0;
}

static int m_vm_dirty_log_stop(struct control_req *req, struct vhub_error *err) {
        return m_vm_simple(req, err, vhub_vm_dirty_log_stop);
}

static int req_uuid(struct control_req *req, uint8_t uuid[16], struct vhub_error *err) {
        const char *s;
        int r = params_get_string(req->params, "uuid", true, 36, &s, err);

        if (r < 0)
                return r;
        if (vhub_uuid_parse(s, uuid) < 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "'uuid' must be a canonical 36-character UUID");
        return 0;
}

static int m_shared_object_add(struct control_req *req, struct vhub_error *err) {
        struct vhub_vm *vm;
        uint8_t uuid[16];
        int fd = -1, r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid", "uuid", "fd"), &vm, err)) < 0 || (r = req_uuid(req, uuid, err)) < 0 ||
            (r = params_take_fd(req->params, "fd", true, req->fds, &fd, err)) < 0)
                return r;
        r = vhub_vm_shared_add(vm, uuid, fd, err);
        if (r < 0)
                return r;
        control_req_result(req, json_object());
        return 0;
}

static int m_shared_object_remove(struct control_req *req, struct vhub_error *err) {
        struct vhub_vm *vm;
        uint8_t uuid[16];
        int r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid", "uuid"), &vm, err)) < 0 || (r = req_uuid(req, uuid, err)) < 0)
                return r;
        r = vhub_vm_shared_remove(vm, uuid, err);
        if (r < 0)
                return r;
        control_req_result(req, json_object());
        return 0;
}

static int m_shared_object_list(struct control_req *req, struct vhub_error *err) {
        struct vhub_vm *vm;
        json_t *objs;
        int r;

        if ((r = req_vm_params(req, MEMBERS("vm", "uid"), &vm, err)) < 0)
                return r;
        objs = json_array();
        for (size_t i = 0; i < vm->shared.n; i++) {
                const struct vhub_shared_object *o = &vm->shared.objects[i];
                char u[37];

                vhub_uuid_format(o->uuid, u);
                json_array_append_new(objs, json_pack("{s:s, s:s}", "uuid", u, "owner",
                                                      o->device ? o->device->name : "vmm"));
        }
        control_req_result(req, json_pack("{s:o}", "objects", objs));
        return 0;
}

static int m_device_backend_reply(struct control_req *req, struct vhub_error *err) {
        struct vhub_device *d;
        struct vhub_vm *vm;
        uint64_t token, result;
        int r;

        if ((r = req_device_params(req, MEMBERS("vm", "uid", "device", "token", "result"), &vm, &d, err)) < 0 ||
            (r = params_get_u64(req->params, "token", true, 0, UINT64_MAX, &token, err)) < 0 ||
            (r = params_get_u64(req->params, "result", true, 0, UINT64_MAX, &result, err)) < 0)
                return r;
        if (vhub_device_backend_reply(d, token, result) < 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "'token': %llu is not a back-end request waiting for an answer",
                                      (unsigned long long)token);
        control_req_result(req, json_object());
        return 0;
}

/* ---- events ---- */

static int m_events_subscribe(struct control_req *req, struct vhub_error *err) {
        struct control_conn *c = req->conn;
        struct vhub_vm *vm;
        char **names;
        uid_t *uids;
        int r;

        if ((r = params_check_members(req->params, MEMBERS("vm", "uid"), err)) < 0)
                return r;
        if (!json_object_get(req->params, "vm")) {
                c->sub_all = true;
                control_req_result(req, json_object());
                return 0;
        }
        if ((r = control_req_vm(req, &vm, err)) < 0)
                return r;
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
        names[c->n_sub_vms] = strdup(vm->name);
        if (!names[c->n_sub_vms])
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        uids[c->n_sub_vms] = vm->uid;
        c->n_sub_vms++;
        control_req_result(req, json_object());
        return 0;
}

/* ---- dispatch ---- */

struct method {
        const char *name;
        int (*handler)(struct control_req *req, struct vhub_error *err);
};

static const struct method methods[] = {
        { "daemon.info", m_daemon_info },
        { "vm.create", m_vm_create },
        { "vm.attach", m_vm_attach },
        { "vm.destroy", m_vm_destroy },
        { "vm.list", m_vm_list },
        { "vm.memory.add", m_vm_memory_add },
        { "vm.memory.remove", m_vm_memory_remove },
        { "vm.memory.list", m_vm_memory_list },
        { "device.add", m_device_add },
        { "device.remove", m_device_remove },
        { "device.list", m_device_list },
        { "device.config.get", m_device_config_get },
        { "device.config.set", m_device_config_set },
        { "device.start", m_device_start },
        { "device.stop", m_device_stop },
        { "device.reset", m_device_reset },
        { "device.net.rarp", m_device_net_rarp },
        { "device.net.mtu", m_device_net_mtu },
        { "vm.dirty_log.start", m_vm_dirty_log_start },
        { "vm.dirty_log.stop", m_vm_dirty_log_stop },
        { "device.state.save", m_device_state_save },
        { "device.state.load", m_device_state_load },
        { "device.state.check", m_device_state_check },
        { "shared_object.add", m_shared_object_add },
        { "shared_object.remove", m_shared_object_remove },
        { "shared_object.list", m_shared_object_list },
        { "device.backend_reply", m_device_backend_reply },
        { "events.subscribe", m_events_subscribe },
};

void control_dispatch(struct control_req *req, const char *method, size_t method_len) {
        struct vhub_error err = { 0 };

        for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++) {
                /* the length too: "daemon.info\u0000x" is not daemon.info */
                if (strlen(methods[i].name) != method_len || strcmp(methods[i].name, method) != 0)
                        continue;
                if (methods[i].handler(req, &err) < 0)
                        control_req_error(req, &err);
                return;
        }
        vhub_error_set(&err, VHUB_ERR_NO_METHOD, "unknown method %.64s%s", method,
                       strlen(method) != method_len ? " (with a NUL byte)" : "");
        control_req_error(req, &err);
}
