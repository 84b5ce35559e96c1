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
 */
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "control-internal.h"
#include "control-params.h"
#include "vhub-fd-budget.h"
#include "vhub-context.h"
#include "vhub-device.h"
#include "vhub-info.h"
#include "vhub-shared-object.h"
#include "vhub-time.h"
#include "vhub-version.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

/* "uid" left out: the caller's own (outside the range a request may give). */
#define UID_CALLER UINT64_MAX
#define MAX_LINGER_MS (7ull * 24 * 3600 * 1000)
#define MAX_RECONNECT_MS 3600000u
/* a unix socket path: sun_path less its NUL */
#define MAX_SOCKET_PATH 107

/* Every method's params; each descriptor says where its members go. */
struct method_params {
        /* the VM and device a method names (METHOD_VM, METHOD_DEVICE; device.add's new one) */
        const char *vm;
        uint64_t uid;
        const char *device;
        union {
                struct {
                        uint64_t linger_ms;
                } vm_create;
                struct {
                        struct vhub_region region;
                        bool uaddr_given;
                } memory_add;
                struct {
                        uint64_t gpa;
                } memory_remove;
                struct {
                        const char *socket, *type;
                        unsigned mode;
                        uint32_t queues, reconnect_ms;
                        bool vmm_socket;
                } device_add;
                struct {
                        uint32_t offset, size;
                } config_get;
                struct {
                        uint32_t offset;
                        struct params_bytes data;
                } config_set;
                struct {
                        uint64_t features;
                        struct params_array vrings; /* of struct vhub_vring_params */
                } start;
                struct {
                        bool drain;
                } stop;
                struct {
                        uint32_t index;
                } kick;
                struct {
                        uint8_t mac[6];
                } rarp;
                struct {
                        uint32_t mtu;
                } mtu;
                struct {
                        int fd;
                } state_fd;
                struct {
                        uint8_t uuid[16];
                        int fd;
                } shared;
                struct {
                        uint64_t token, result;
                } backend_reply;
                struct {
                        struct vhu_crypto_session s; /* its u32 members read in place */
                        uint32_t direction, op_type, hash_mode, alg_chain_order; /* u8 on the wire */
                        struct params_bytes cipher_key, auth_key;
                } crypto_create;
                struct {
                        uint64_t session_id;
                } crypto_close;
                struct {
                        int fd;
                } gpu;
                struct {
                        uint64_t iova, size, uaddr;
                        unsigned perm;
                } iotlb;
                struct {
                        bool backend_regions;
                } postcopy_listen;
        };
};

#define AT(field) offsetof(struct method_params, field)

/* What a method's function gets. */
struct method_call {
        struct control_req *req;
        struct method_params p;
        struct vhub_vm *vm;          /* METHOD_VM: the VM named (METHOD_VM_OPTIONAL: NULL if none) */
        struct vhub_device *dev;     /* METHOD_DEVICE: the device named */
        struct control_call *cc;     /* METHOD_WAITS: hand &cc->call to the model, which answers */
        json_t *result;              /* otherwise the answer; NULL: {} */
};

static struct vhub_context *call_ctx(const struct method_call *m) {
        return m->req->conn->srv->ctx;
}

/* A result built with json_pack: NULL only when memory ran out. */
static int call_answer(struct method_call *m, json_t *result, struct vhub_error *err) {
        m->result = result;
        return result ? 0 : vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
}

/* A list method's result, {key: [one object per item]}, from a snapshot of
 * the model (vhub-info.h: r is what taking it returned); frees the items. */
static int call_answer_list(struct method_call *m, int r, const char *key, void *items, size_t n,
                            size_t size, json_t *(*item_json)(const void *item), struct vhub_error *err) {
        json_t *list;

        if (r < 0)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        list = json_array();
        for (size_t i = 0; i < n; i++)
                json_array_append_new(list, item_json((const char *)items + i * size));
        free(items);
        return call_answer(m, json_pack("{s:o}", key, list), err);
}

/* ---- members every method that names a VM or device has ---- */

#define P_VM(required_)                                                                          \
        { .name = "vm", .kind = PARAM_NAME, .required = (required_), .offset = AT(vm),         \
          .description = "the VM's name (names are per uid)" }
#define P_UID                                                                                    \
        { .name = "uid", .kind = PARAM_U64, .max = UINT32_MAX - 1, .def = UID_CALLER,           \
          .offset = AT(uid), .description = "root only: the uid the VM belongs to (default: the caller's)" }
#define P_DEVICE(description_)                                                                   \
        { .name = "device", .kind = PARAM_NAME, .required = true, .offset = AT(device),         \
          .description = (description_) }

/* "fd", an fd the request carries: the one such member of most methods */
#define P_FD(field_, description_)                                                               \
        { .name = "fd", .kind = PARAM_FD, .required = true, .offset = AT(field_),               \
          .description = (description_) }

static const struct param vm_target[] = { P_VM(true), P_UID, { 0 } };
static const struct param vm_target_optional[] = { P_VM(false), P_UID, { 0 } };
static const struct param device_target[] = { P_DEVICE("the device's name, unique within its VM"), { 0 } };

/* Result members, for rpc.discover (the functions below build them). */
#define R(name_, kind_, description_) { .name = (name_), .kind = (kind_), .required = true, .description = (description_) }
#define R_U64(name_, description_)                                                                 \
        { .name = (name_), .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .description = (description_) }
#define R_OBJECT(...) { .kind = PARAM_OBJECT, .members = (const struct param[]){ __VA_ARGS__, { 0 } } }
#define R_ARRAY_OF(name_, description_, ...)                                                       \
        { .name = (name_), .kind = PARAM_ARRAY, .required = true, .max = UINT64_MAX,             \
          .items = &(const struct param)R_OBJECT(__VA_ARGS__), .description = (description_) }
#define R_NAMES(name_, description_)                                                               \
        { .name = (name_), .kind = PARAM_ARRAY, .required = true, .max = UINT64_MAX,             \
          .items = &(const struct param){ .kind = PARAM_NAME }, .description = (description_) }

#define ERRORS(...) ((const int[]){ __VA_ARGS__, 0 })

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

static int m_daemon_info(struct method_call *m, struct vhub_error *err) {
        char started_at[VHUB_RFC3339_LEN];
        struct vhub_daemon_info info;
        json_t *caps = json_array();

        vhub_info_daemon(call_ctx(m), m->req->conn->uid, &info);
        for (size_t i = 0; capabilities[i]; i++)
                json_array_append_new(caps, json_string(capabilities[i]));
        /* its state is carried across restarts (the service manager's fd store) */
        if (info.fd_store)
                json_array_append_new(caps, json_string("fd-store"));
        vhub_format_rfc3339(info.started_realtime_usec, started_at);
        return call_answer(m, json_pack("{s:s, s:s, s:i, s:o, s:s, s:i, s:i, s:i, s:o, s:o}", "version",
                                        VHUB_VERSION, "api_version", VHUB_API_VERSION, "pid", (int)getpid(),
                                        "uptime_ms", vhub_json_u64(info.uptime_usec / 1000),
                                        "started_at", started_at,
                                        "restarts", (int)info.restarts, "vms", info.vms, "devices", info.devices,
                                        "protocol_features", vhub_json_u64(info.protocol_features),
                                        "capabilities", caps),
                           err);
}

static const struct param daemon_info_result = R_OBJECT(
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
static int m_rpc_discover(struct method_call *m, struct vhub_error *err) {
        struct control_server *s = m->req->conn->srv;

        if (!s->discover)
                s->discover = control_discover_build();
        return call_answer(m, s->discover ? json_incref(s->discover) : NULL, err);
}

static const struct param rpc_discover_result = { .kind = PARAM_OBJECT, .open = true,
                                                   .description = "an OpenRPC 1.2 document" };

/* ---- VMs ---- */

static const struct param vm_create_params[] = {
        P_VM(true),
        { .name = "linger_ms", .kind = PARAM_U64, .max = MAX_LINGER_MS, .offset = AT(vm_create.linger_ms),
          .description = "how long the VM outlives its connection, waiting for vm.attach (default 0)" },
        P_UID,
        { 0 },
};

static int m_vm_create(struct method_call *m, struct vhub_error *err) {
        struct control_conn *c = m->req->conn;
        uid_t uid = m->p.uid == UID_CALLER ? c->uid : (uid_t)m->p.uid;
        struct vhub_vm *vm;
        int r;

        if (!vhub_uid_sees(c->uid, uid))
                return vhub_error_set(err, VHUB_ERR_NO_VM, "only root may create a VM for another uid");
        /* the VM acts with its creator's credentials (back-end paths) */
        r = vhub_vm_create(call_ctx(m), uid, m->p.vm, m->p.vm_create.linger_ms, &c->owner, &c->cred, err,
                           &vm);
        return r < 0 ? r : 0;
}

static int m_vm_attach(struct method_call *m, struct vhub_error *err) {
        /* the new owner's credentials replace the creator's */
        int r = vhub_vm_attach(m->vm, &m->req->conn->owner, &m->req->conn->cred, err);

        return r < 0 ? r : 0;
}

static int m_vm_destroy(struct method_call *m, struct vhub_error *err) {
        vhub_vm_destroy(m->vm, &m->cc->call);
        return 0;
}

/* The names of the VM's devices, for vm.list. */
static json_t *vm_device_names(const struct vhub_vm *vm) {
        struct vhub_device_info *devs;
        json_t *names;
        size_t n;

        if (vhub_info_devices(vm, &devs, &n) < 0)
                return NULL;
        names = json_array();
        for (size_t i = 0; i < n; i++)
                json_array_append_new(names, json_string(devs[i].name));
        free(devs);
        return names;
}

static json_t *vm_json(const void *item) {
        const struct vhub_vm_info *vm = item;
        json_t *o = json_pack("{s:s, s:i, s:o*, s:i}", "vm", vm->name, "uid", (int)vm->uid, "devices",
                              vm_device_names(vm->vm), "regions", (int)vm->n_regions);

        if (o && vm->lingering)  /* an extension (docs/control-api.md) */
                json_object_set_new(o, "linger_remaining_ms", vhub_json_u64(vm->linger_remaining_ms));
        return o;
}

static int m_vm_list(struct method_call *m, struct vhub_error *err) {
        struct vhub_vm_info *vms = NULL;
        size_t n = 0;
        int r = vhub_info_vms(call_ctx(m), m->req->conn->uid, &vms, &n);

        return call_answer_list(m, r, "vms", vms, n, sizeof(*vms), vm_json, err);
}

static const struct param vm_list_result = R_OBJECT(
        R_ARRAY_OF("vms", "the VMs the caller may see",
                   R("vm", PARAM_NAME, "its name"),
                   R_U64("uid", "the uid it belongs to"),
                   R_NAMES("devices", "its devices"),
                   R_U64("regions", "how many memory regions it has"),
                   { .name = "linger_remaining_ms", .kind = PARAM_U64, .max = UINT64_MAX,
                     .description = "an extension: a VM without an owner, how long it lingers still" }));

static const struct param vm_memory_add_params[] = {
        { .name = "gpa", .kind = PARAM_U64, .required = true, .max = UINT64_MAX,
          .offset = AT(memory_add.region.gpa), .description = "guest-physical address of the region" },
        { .name = "size", .kind = PARAM_U64, .required = true, .max = UINT64_MAX,
          .offset = AT(memory_add.region.size), .description = "its size in bytes" },
        { .name = "offset", .kind = PARAM_U64, .max = UINT64_MAX, .offset = AT(memory_add.region.offset),
          .description = "where it starts in the fd (default 0)" },
        { .name = "uaddr", .kind = PARAM_U64, .max = UINT64_MAX, .offset = AT(memory_add.region.uaddr),
          .given = PARAM_GIVEN(struct method_params, memory_add.uaddr_given),
          .description = "the VMM's address for it (default: gpa)" },
        P_FD(memory_add.region.fd, "fd index: a memfd or a shared file backing the region"),
        { 0 },
};

static int m_vm_memory_add(struct method_call *m, struct vhub_error *err) {
        struct vhub_region *region = &m->p.memory_add.region;

        if (!m->p.memory_add.uaddr_given)
                region->uaddr = region->gpa;
        vhub_vm_memory_add(m->vm, region, &m->cc->call); /* takes region->fd */
        return 0;
}

static const struct param vm_memory_remove_params[] = {
        { .name = "gpa", .kind = PARAM_U64, .required = true, .max = UINT64_MAX,
          .offset = AT(memory_remove.gpa), .description = "where the region to remove starts" },
        { 0 },
};

static int m_vm_memory_remove(struct method_call *m, struct vhub_error *err) {
        vhub_vm_memory_remove(m->vm, m->p.memory_remove.gpa, &m->cc->call);
        return 0;
}

static json_t *region_json(const void *item) {
        const struct vhub_region_info *g = item;

        return json_pack("{s:o, s:o, s:o, s:o}", "gpa", vhub_json_u64(g->gpa), "size", vhub_json_u64(g->size),
                         "offset", vhub_json_u64(g->offset), "uaddr", vhub_json_u64(g->uaddr));
}

static int m_vm_memory_list(struct method_call *m, struct vhub_error *err) {
        struct vhub_region_info *regions = NULL;
        size_t n = 0;
        int r = vhub_info_regions(m->vm, &regions, &n);

        return call_answer_list(m, r, "regions", regions, n, sizeof(*regions), region_json, err);
}

static const struct param vm_memory_list_result = R_OBJECT(
        R_ARRAY_OF("regions", "the VM's memory regions",
                   R_U64("gpa", "guest-physical address"),
                   R_U64("size", "size in bytes"),
                   R_U64("offset", "offset into the fd"),
                   R_U64("uaddr", "the VMM's address")));

static json_t *result_dirty_log(struct control_call *cc) {
        if (control_call_reply_fds(cc, 1) < 0) {
                cc->call.out.dirty_log.fd = vhu_safe_close(cc->call.out.dirty_log.fd);
                return NULL;
        }
        cc->reply_fds[cc->n_reply_fds++] = VHU_TAKE_FD(cc->call.out.dirty_log.fd);
        return json_pack("{s:i, s:o}", "fd", 0, "size", vhub_json_u64(cc->call.out.dirty_log.size));
}

static const struct param dirty_log_result = R_OBJECT(
        R("fd", PARAM_FD, "fd index in this response: the log memfd, one bit per 4 KiB page"),
        R_U64("size", "the log's size in bytes"));

static int m_vm_dirty_log_start(struct method_call *m, struct vhub_error *err) {
        int r = control_req_check_fds(m->req, 1, err); /* the log memfd */

        if (r < 0)
                return r;
        vhub_vm_dirty_log_start(m->vm, &m->cc->call);
        return 0;
}

static int m_vm_dirty_log_stop(struct method_call *m, struct vhub_error *err) {
        vhub_vm_dirty_log_stop(m->vm, &m->cc->call);
        return 0;
}

/* ---- postcopy ---- */

static void free_postcopy_out(void *data) {
        vhub_postcopy_out_free(data);
}

/* The outputs the model leaves behind (fds, regions) go with the call, whatever it answers. */
static void vm_postcopy(struct method_call *m, enum vhub_postcopy_step step) {
        m->cc->data = &m->cc->call;
        m->cc->free_data = free_postcopy_out;
        vhub_vm_postcopy(m->vm, step, &m->cc->call);
}

static json_t *result_postcopy_advise(struct control_call *cc) {
        json_t *devs = json_array();
        unsigned n = 0;

        for (unsigned i = 0; i < cc->call.out.postcopy.n_devices; i++)
                n += cc->call.out.postcopy.devices[i].ufd >= 0;
        /* the fds left out stay in out.postcopy, closed by free_postcopy_out() */
        if (n > RPC_MAX_FDS_PER_MESSAGE)
                n = RPC_MAX_FDS_PER_MESSAGE;
        if (control_call_reply_fds(cc, n) < 0) {
                json_decref(devs);
                return NULL;
        }
        for (unsigned i = 0; i < cc->call.out.postcopy.n_devices && cc->n_reply_fds < n; i++) {
                struct vhub_postcopy_device *pd = &cc->call.out.postcopy.devices[i];

                if (pd->ufd < 0)
                        continue;
                json_array_append_new(devs, json_pack("{s:s, s:i}", "device", pd->device, "fd",
                                                      (int)cc->n_reply_fds));
                /* the fd moves to the reply; closed after sending */
                cc->reply_fds[cc->n_reply_fds++] = VHU_TAKE_FD(pd->ufd);
        }
        return json_pack("{s:o}", "devices", devs);
}

static const struct param postcopy_advise_result = R_OBJECT(
        R_ARRAY_OF("devices", "every device of the VM",
                   R("device", PARAM_NAME, "the device"),
                   R("fd", PARAM_FD, "fd index in this response: its back-end's userfaultfd")));

static int m_vm_postcopy_advise(struct method_call *m, struct vhub_error *err) {
        vm_postcopy(m, VHUB_POSTCOPY_ADVISE);
        return 0;
}

static const struct param postcopy_listen_params[] = {
        { .name = "backend_regions", .kind = PARAM_BOOL, .offset = AT(postcopy_listen.backend_regions),
          .description = "an extension: also answer where each back-end mapped each region (default false: {})" },
        { 0 },
};

/* Where each back-end mapped each region: its userfaultfd reports faults at those addresses. */
static json_t *result_postcopy_regions(struct control_call *cc) {
        json_t *devs = json_array();

        for (unsigned i = 0; i < cc->call.out.postcopy.n_devices; i++) {
                const struct vhub_postcopy_device *pd = &cc->call.out.postcopy.devices[i];
                json_t *regions = json_array();

                for (unsigned k = 0; k < pd->n_regions; k++)
                        json_array_append_new(regions, json_pack("{s:o, s:o, s:o}", "gpa",
                                                                 vhub_json_u64(pd->regions[k].gpa), "size",
                                                                 vhub_json_u64(pd->regions[k].size),
                                                                 "backend_uaddr",
                                                                 vhub_json_u64(pd->regions[k].backend_uaddr)));
                json_array_append_new(devs, json_pack("{s:s, s:o}", "device", pd->device, "regions", regions));
        }
        return json_pack("{s:o}", "devices", devs);
}

static const struct param postcopy_listen_result = R_OBJECT(
        { .name = "devices", .kind = PARAM_ARRAY, .max = UINT64_MAX,
          .items = &(const struct param)R_OBJECT(
                  R("device", PARAM_NAME, "the device"),
                  R_ARRAY_OF("regions", "the VM's regions as its back-end mapped them",
                             R_U64("gpa", "guest-physical address"),
                             R_U64("size", "size in bytes"),
                             R_U64("backend_uaddr", "where the back-end mapped it: faults come at "
                                                    "backend_uaddr + (address - gpa)"))),
          .description = "with backend_regions: true only: every device of the VM" });

static int m_vm_postcopy_listen(struct method_call *m, struct vhub_error *err) {
        /* the contract's result is {}: the regions only when asked for */
        if (m->p.postcopy_listen.backend_regions)
                m->cc->make_result = result_postcopy_regions;
        vm_postcopy(m, VHUB_POSTCOPY_LISTEN);
        return 0;
}

static int m_vm_postcopy_end(struct method_call *m, struct vhub_error *err) {
        vm_postcopy(m, VHUB_POSTCOPY_END);
        return 0;
}

/* ---- devices ---- */

static const char *const device_modes[] = { "client", "server", NULL };
static const enum vhub_device_mode device_mode_values[] = { VHUB_DEV_MODE_CLIENT, VHUB_DEV_MODE_SERVER };

static const struct param device_add_params[] = {
        P_DEVICE("the new device's name, unique within its VM"),
        { .name = "socket", .kind = PARAM_STRING, .required = true, .max = MAX_SOCKET_PATH,
          .offset = AT(device_add.socket),
          .description = "the back-end's unix socket, inside a --backend-dir (at most 107 bytes)" },
        { .name = "type", .kind = PARAM_NAME, .max = 31, .offset = AT(device_add.type),
          .description = "the virtio device type (blk, net, fs, ...), informational" },
        { .name = "mode", .kind = PARAM_ENUM, .values = device_modes, .offset = AT(device_add.mode),
          .description = "connect to the socket (client, the default) or listen on it (server)" },
        { .name = "queues", .kind = PARAM_U32, .min = 1, .max = VHUB_MAX_QUEUES, .offset = AT(device_add.queues),
          .description = "how many virtqueues the VMM uses (default: what the back-end reports, else 1)" },
        { .name = "reconnect_ms", .kind = PARAM_U32, .max = MAX_RECONNECT_MS, .def = 100,
          .offset = AT(device_add.reconnect_ms),
          .description = "delay before the first reconnect after a loss (default 100; 0: never, the device fails)" },
        { .name = "vmm_socket", .kind = PARAM_BOOL, .offset = AT(device_add.vmm_socket),
          .description = "a front-door device: the daemon also listens on a socket of its own, where an "
                         "unmodified VMM connects as if to the back-end (default false)" },
        { 0 },
};

static json_t *result_device_add(struct control_call *cc) {
        json_t *res = json_pack("{s:o, s:o, s:i, s:i}", "features",
                                vhub_json_u64(cc->call.out.device_add.features), "protocol_features",
                                vhub_json_u64(cc->call.out.device_add.protocol_features), "queues",
                                (int)cc->call.out.device_add.queues, "max_mem_slots",
                                (int)cc->call.out.device_add.max_mem_slots);
        json_t *sizes;

        if (res && cc->call.out.device_add.vmm_socket[0])
                json_object_set_new(res, "vmm_socket", json_string(cc->call.out.device_add.vmm_socket));
        /* contract: `shmem` only where SHMEM is negotiated (GET_SHMEM_CONFIG) */
        if (!res || !cc->call.out.device_add.has_shmem)
                return res;
        sizes = json_array();
        for (unsigned i = 0; i < cc->call.out.device_add.n_shmem; i++)
                json_array_append_new(sizes, vhub_json_u64(cc->call.out.device_add.shmem_sizes[i]));
        json_object_set_new(res, "shmem", sizes);
        return res;
}

static const struct param device_add_result = R_OBJECT(
        R_U64("features", "the virtio features the back-end offered"),
        R_U64("protocol_features", "the protocol features negotiated"),
        R_U64("queues", "the queue count"),
        R_U64("max_mem_slots", "how many memory regions the back-end takes"),
        { .name = "shmem", .kind = PARAM_ARRAY, .max = VHU_MAX_SHMEM_REGIONS,
          .items = &(const struct param){ .kind = PARAM_U64, .max = UINT64_MAX },
          .description = "where SHMEM is negotiated: the back-end's shared-memory region sizes (GET_SHMEM_CONFIG)" },
        { .name = "vmm_socket", .kind = PARAM_STRING,
          .description = "with vmm_socket: true, the socket the VMM connects to" });

static int m_device_add(struct method_call *m, struct vhub_error *err) {
        struct vhub_device_add_params p = {
                .name = m->p.device,
                .socket_path = m->p.device_add.socket,
                .type = m->p.device_add.type,
                .mode = device_mode_values[m->p.device_add.mode],
                .queues = m->p.device_add.queues,
                .reconnect_ms = m->p.device_add.reconnect_ms,
                .face = VHUB_FACE_JSON_RPC,
                .vmm_socket = m->p.device_add.vmm_socket,
                /* the asker's rights, never the VM creator's: root may have
                 * created the VM for this uid */
                .cred = &m->req->conn->cred,
        };
        /* its socket, channel, inflight fd... */
        int r = control_req_check_fds(m->req, VHUB_DEVICE_OWN_FDS, err);

        if (r < 0)
                return r;
        vhub_device_add(m->vm, &p, &m->cc->call);
        return 0;
}

static int m_device_remove(struct method_call *m, struct vhub_error *err) {
        vhub_device_remove(m->dev, &m->cc->call);
        return 0;
}

static json_t *device_json(const void *item) {
        const struct vhub_device_info *d = item;

        json_t *o = json_pack("{s:s, s:s, s:s, s:o, s:o, s:o, s:i, s:i}", "device", d->name, "state",
                              vhub_device_state_to_string(d->state), "socket", d->socket, "features",
                              vhub_json_u64(d->features), "acked_features", vhub_json_u64(d->acked_features),
                              "protocol_features", vhub_json_u64(d->protocol_features), "queues",
                              (int)d->queues, "reconnects", (int)d->reconnects);

        if (o && d->type[0])    /* an extension (docs/control-api.md) */
                json_object_set_new(o, "type", json_string(d->type));
        /* contract: front-door devices carry vmm_socket and vmm */
        if (o && d->front_door) {
                json_object_set_new(o, "vmm_socket", json_string(d->vmm_socket));
                json_object_set_new(o, "vmm", json_string(d->vmm_connected ? "connected" : "waiting"));
        }
        return o;
}

static int m_device_list(struct method_call *m, struct vhub_error *err) {
        struct vhub_device_info *devs = NULL;
        size_t n = 0;
        int r = vhub_info_devices(m->vm, &devs, &n);

        return call_answer_list(m, r, "devices", devs, n, sizeof(*devs), device_json, err);
}

static const char *const vmm_states[] = { "connected", "waiting", NULL };
static const char *const device_states[] = { "connecting", "ready", "running", "stopped",
                                             "disconnected", "failed", NULL };

static const struct param device_list_result = R_OBJECT(
        R_ARRAY_OF("devices", "the VM's devices",
                   R("device", PARAM_NAME, "its name"),
                   { .name = "state", .kind = PARAM_ENUM, .required = true, .values = device_states,
                     .description = "where it is in its life" },
                   R("socket", PARAM_STRING, "its back-end socket"),
                   R_U64("features", "the virtio features the back-end offers"),
                   R_U64("acked_features", "what the last device.start acked"),
                   R_U64("protocol_features", "the protocol features negotiated"),
                   R_U64("queues", "the queue count"),
                   R_U64("reconnects", "how many times it was restored after a loss"),
                   { .name = "type", .kind = PARAM_NAME, .max = 31,
                     .description = "an extension: the type device.add was given, if any" },
                   { .name = "vmm_socket", .kind = PARAM_STRING,
                     .description = "a front-door device: the socket its VMM connects to" },
                   { .name = "vmm", .kind = PARAM_ENUM, .values = vmm_states,
                     .description = "a front-door device: whether a VMM is connected" }));

static int m_device_stats(struct method_call *m, struct vhub_error *err) {
        struct vhub_device_stats_info st;
        const struct vhub_device_stats *c = &st.counters;
        json_t *res;

        vhub_info_device_stats(m->dev, &st);
        res = json_pack("{s:s, s:o, s:o, s:o, s:o, s:o, s:I, s:o, s:o, s:o}", "state",
                        vhub_device_state_to_string(st.state), "since_ms", vhub_json_u64(st.since_usec / 1000),
                        "requests", vhub_json_u64(c->requests), "replies", vhub_json_u64(c->replies),
                        "timeouts", vhub_json_u64(c->timeouts), "losses", vhub_json_u64(c->losses),
                        "reconnects", (json_int_t)st.reconnects, "backend_requests",
                        vhub_json_u64(c->backend_requests), "handshake_us", vhub_json_u64(c->handshake_usec),
                        /* an extension (docs/control-api.md) */
                        "eventfd_skipped", vhub_json_u64(c->eventfd_skipped));
        if (res && c->lost) {
                char timestamp[VHUB_RFC3339_LEN];

                vhub_format_rfc3339(c->last_loss_realtime_usec, timestamp);
                json_object_set_new(res, "last_loss", json_pack("{s:s, s:s}", "reason", c->last_loss_reason,
                                                                "timestamp", timestamp));
        }
        if (res && c->restored)
                json_object_set_new(res, "restore_us", vhub_json_u64(c->restore_usec));
        return call_answer(m, res, err);
}

static const struct param device_stats_result = R_OBJECT(
        { .name = "state", .kind = PARAM_ENUM, .required = true, .values = device_states,
          .description = "where it is in its life, as device.list says" },
        R_U64("since_ms", "milliseconds in that state"),
        R_U64("requests", "vhost-user requests sent to its back-end, every connection since device.add"),
        R_U64("replies", "replies received from the back-end"),
        R_U64("timeouts", "replies that missed --backend-timeout-ms (each a loss or a failed restore attempt)"),
        R_U64("losses", "times the back-end was lost while the device was up"),
        R_U64("reconnects", "times it was restored after a loss (device.list's reconnects)"),
        { .name = "last_loss", .kind = PARAM_OBJECT,
          .members = (const struct param[]){
                  R("reason", PARAM_STRING, "why, as device.disconnected said"),
                  R("timestamp", PARAM_TIMESTAMP, "when: device.disconnected's timestamp"),
                  { 0 } },
          .description = "the last loss, once there was one" },
        R_U64("backend_requests", "requests the back-end sent on its channel (BACKEND_REQ)"),
        R_U64("handshake_us", "the last successful handshake's duration (device.add's or a restore's); 0 before"),
        { .name = "restore_us", .kind = PARAM_U64, .max = UINT64_MAX,
          .description = "the last restore's duration, from the loss to device.reconnected, once there was one" },
        R_U64("eventfd_skipped", "an extension: writes to the VMM's kick/call/err eventfds not done (counter "
                                 "full and unread, or a broken fd)"));

/* config space: offset + length at most VHU_MAX_CONFIG_SIZE (checked by the functions) */
#define P_CONFIG_OFFSET(field_)                                                                    \
        { .name = "offset", .kind = PARAM_U32, .required = true, .max = VHU_MAX_CONFIG_SIZE,    \
          .offset = AT(field_), .description = "where to start in the config space" }

static const struct param device_config_get_params[] = {
        P_CONFIG_OFFSET(config_get.offset),
        { .name = "size", .kind = PARAM_U32, .required = true, .min = 1, .max = VHU_MAX_CONFIG_SIZE,
          .offset = AT(config_get.size), .description = "how many bytes (offset + size at most 256)" },
        { 0 },
};

static json_t *result_config_get(struct control_call *cc) {
        char *b64 = NULL;
        json_t *res;

        if (vhub_base64_encode(cc->call.out.config_get.data, cc->call.out.config_get.size, &b64) < 0)
                return NULL;
        res = json_pack("{s:s}", "data", b64);
        free(b64);
        return res;
}

static const struct param config_get_result = R_OBJECT(
        { .name = "data", .kind = PARAM_BASE64, .required = true, .min = 1, .max = VHU_MAX_CONFIG_SIZE,
          .description = "the bytes read" });

static int m_device_config_get(struct method_call *m, struct vhub_error *err) {
        uint32_t offset = m->p.config_get.offset, size = m->p.config_get.size;

        if (offset + size > VHU_MAX_CONFIG_SIZE)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'size' must be 1..%d and offset+size at most %d",
                                      VHU_MAX_CONFIG_SIZE, VHU_MAX_CONFIG_SIZE);
        vhub_device_config_get(m->dev, offset, size, &m->cc->call);
        return 0;
}

static const struct param device_config_set_params[] = {
        P_CONFIG_OFFSET(config_set.offset),
        { .name = "data", .kind = PARAM_BASE64, .required = true, .min = 1, .max = VHU_MAX_CONFIG_SIZE,
          .offset = AT(config_set.data), .description = "the bytes to write (offset + length at most 256)" },
        { 0 },
};

static int m_device_config_set(struct method_call *m, struct vhub_error *err) {
        const struct params_bytes *data = &m->p.config_set.data;

        if (m->p.config_set.offset + data->len > VHU_MAX_CONFIG_SIZE)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "offset + data length exceeds %d", VHU_MAX_CONFIG_SIZE);
        vhub_device_config_set(m->dev, m->p.config_set.offset, data->data, (uint32_t)data->len, &m->cc->call);
        return 0;
}

#define VRING(field) offsetof(struct vhub_vring_params, field)

static const struct param vring_members[] = {
        { .name = "index", .kind = PARAM_U32, .required = true, .max = VHUB_MAX_QUEUES - 1,
          .offset = VRING(index), .description = "the ring's index" },
        { .name = "size", .kind = PARAM_U32, .required = true, .max = 32768, .offset = VRING(size),
          .description = "its size (a power of 2)" },
        /* a packed ring's position is a u32: spec "Vring descriptor indices for
         * packed virtqueues" (what device.stop answers for it) */
        { .name = "base", .kind = PARAM_U32, .max = UINT32_MAX, .offset = VRING(base),
          .given = PARAM_GIVEN(struct vhub_vring_params, base_given),
          .description = "the next avail index (default 0); split rings: at most 65535; packed rings: "
                         "bits 0-14 the next avail index, bit 15 its wrap counter, bits 16-30 the next used "
                         "index, bit 31 its wrap counter (default 0x80008000: index 0, wrap counters 1)" },
        { .name = "desc", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = VRING(desc),
          .description = "guest-physical address of the descriptor table" },
        { .name = "avail", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = VRING(avail),
          .description = "guest-physical address of the available ring" },
        { .name = "used", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = VRING(used),
          .description = "guest-physical address of the used ring" },
        { .name = "kick", .kind = PARAM_FD, .offset = VRING(kick_fd),
          .description = "fd index: the kick eventfd; left out, the VMM kicks with device.kick "
                         "(INBAND_NOTIFICATIONS)" },
        { .name = "call", .kind = PARAM_FD, .required = true, .offset = VRING(call_fd),
          .description = "fd index: the call eventfd" },
        { .name = "err", .kind = PARAM_FD, .offset = VRING(err_fd), .description = "fd index: the error eventfd" },
        { 0 },
};

static const struct param device_start_params[] = {
        { .name = "features", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = AT(start.features),
          .description = "the virtio features the driver acked (bit 30 is the daemon's and ignored)" },
        { .name = "vrings", .kind = PARAM_ARRAY, .required = true, .min = 1, .max = VHUB_MAX_QUEUES,
          .offset = AT(start.vrings),
          .items = &(const struct param){ .kind = PARAM_OBJECT, .members = vring_members,
                                          .size = sizeof(struct vhub_vring_params) },
          .description = "the rings to start" },
        { 0 },
};

static int m_device_start(struct method_call *m, struct vhub_error *err) {
        /* bit 30 is vhost-user's own: the daemon adds it itself */
        uint64_t features = m->p.start.features & ~(UINT64_C(1) << VHU_F_PROTOCOL_FEATURES);

        /* takes every ring's fds, in every case */
        vhub_device_start(m->dev, features, m->p.start.vrings.items, (unsigned)m->p.start.vrings.n, &m->cc->call);
        return 0;
}

static const struct param device_stop_params[] = {
        { .name = "drain", .kind = PARAM_BOOL, .def = true, .offset = AT(stop.drain),
          .description = "wait for in-flight requests (default); false: GET_VRING_BASE_SKIP_DRAIN, the "
                         "back-end suspends them into the inflight region" },
        { 0 },
};

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

static const struct param device_stop_result = R_OBJECT(
        R_ARRAY_OF("vrings", "every ring that was running",
                   R_U64("index", "the ring's index"),
                   { .name = "base", .kind = PARAM_U32, .required = true, .max = UINT32_MAX,
                     .description = "GET_VRING_BASE: where the ring stopped (packed rings: wrap counters in "
                                    "bits 15 and 31)" },
                   { .name = "inflight", .kind = PARAM_U32, .max = UINT32_MAX,
                     .description = "with GET_VRING_BASE_INFLIGHT: requests the back-end suspended, completed "
                                    "after the next device.start" }));

static int m_device_stop(struct method_call *m, struct vhub_error *err) {
        vhub_device_stop(m->dev, m->p.stop.drain, &m->cc->call);
        return 0;
}

static const struct param device_kick_params[] = {
        { .name = "index", .kind = PARAM_U32, .required = true, .max = VHUB_MAX_QUEUES - 1,
          .offset = AT(kick.index), .description = "the ring to kick (one that was started)" },
        { 0 },
};

static int m_device_kick(struct method_call *m, struct vhub_error *err) {
        vhub_device_kick(m->dev, m->p.kick.index, &m->cc->call);
        return 0;
}

static int m_device_reset(struct method_call *m, struct vhub_error *err) {
        vhub_device_reset(m->dev, &m->cc->call);
        return 0;
}

static const struct param device_net_rarp_params[] = {
        { .name = "mac", .kind = PARAM_MAC, .required = true, .offset = AT(rarp.mac),
          .description = "the guest's MAC address, aa:bb:cc:dd:ee:ff" },
        { 0 },
};

static int m_device_net_rarp(struct method_call *m, struct vhub_error *err) {
        vhub_device_send_rarp(m->dev, m->p.rarp.mac, &m->cc->call);
        return 0;
}

static const struct param device_net_mtu_params[] = {
        { .name = "mtu", .kind = PARAM_U32, .required = true, .min = 68, .max = 65535, .offset = AT(mtu.mtu),
          .description = "the MTU to set" },
        { 0 },
};

static int m_device_net_mtu(struct method_call *m, struct vhub_error *err) {
        vhub_device_set_mtu(m->dev, (uint16_t)m->p.mtu.mtu, &m->cc->call);
        return 0;
}

static const struct param device_state_fd_params[] = {
        P_FD(state_fd.fd, "fd index: the VMM's end of the pipe the state moves through"),
        { 0 },
};

static json_t *result_state_fd(struct control_call *cc) {
        /* a back-end that offers its own transfer channel: the VMM must use it */
        if (cc->call.out.state_fd.fd >= 0) {
                if (control_call_reply_fds(cc, 1) < 0) {
                        cc->call.out.state_fd.fd = vhu_safe_close(cc->call.out.state_fd.fd);
                        return NULL;
                }
                cc->reply_fds[cc->n_reply_fds++] = VHU_TAKE_FD(cc->call.out.state_fd.fd);
                return json_pack("{s:i}", "fd", 0);
        }
        return json_object();
}

static const struct param state_fd_result = R_OBJECT(
        { .name = "fd", .kind = PARAM_FD,
          .description = "fd index in this response: the back-end's own transfer channel, to use instead" });

static int device_state_transfer(struct method_call *m, bool load) {
        m->cc->call.out.state_fd.fd = -1;
        vhub_device_state_fd(m->dev, load, VHU_TAKE_FD(m->p.state_fd.fd), &m->cc->call);
        return 0;
}

static int m_device_state_save(struct method_call *m, struct vhub_error *err) {
        return device_state_transfer(m, false);
}

static int m_device_state_load(struct method_call *m, struct vhub_error *err) {
        return device_state_transfer(m, true);
}

static int m_device_state_check(struct method_call *m, struct vhub_error *err) {
        vhub_device_check_state(m->dev, &m->cc->call);
        return 0;
}

static const struct param device_backend_reply_params[] = {
        { .name = "token", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = AT(backend_reply.token),
          .description = "the token of the device.backend_request event" },
        { .name = "result", .kind = PARAM_U64, .required = true, .max = UINT64_MAX,
          .offset = AT(backend_reply.result), .description = "0 for success, else a positive errno" },
        { 0 },
};

static int m_device_backend_reply(struct method_call *m, struct vhub_error *err) {
        if (vhub_device_backend_reply(m->dev, m->p.backend_reply.token, m->p.backend_reply.result) < 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "'token': %llu is not a back-end request waiting for an answer",
                                      (unsigned long long)m->p.backend_reply.token);
        return 0;
}

/* ---- crypto sessions, the GPU socket, IOTLB ---- */

#define CRYPTO(field) AT(crypto_create.field)
/* a virtio-crypto number of the same name (virtio spec, "Crypto Device") */
#define P_CRYPTO_U32(name_, field_, required_, max_, description_)                                    \
        { .name = (name_), .kind = PARAM_U32, .required = (required_), .max = (max_),                \
          .offset = CRYPTO(field_), .description = (description_) }

static const struct param crypto_session_create_params[] = {
        P_CRYPTO_U32("op_code", s.op_code, true, UINT32_MAX, "the opcode (e.g. 2: CIPHER_CREATE_SESSION)"),
        P_CRYPTO_U32("cipher_alg", s.cipher_alg, true, UINT32_MAX, "the cipher algorithm (e.g. 3: AES_CBC)"),
        { .name = "cipher_key", .kind = PARAM_BASE64, .required = true, .max = VHU_CRYPTO_MAX_CIPHER_KEY,
          .offset = CRYPTO(cipher_key), .description = "the cipher key (at most 64 bytes)" },
        P_CRYPTO_U32("direction", direction, true, UINT8_MAX, "1: encrypt, 2: decrypt"),
        P_CRYPTO_U32("op_type", op_type, true, UINT8_MAX, "1: cipher, 2: algorithm chaining"),
        P_CRYPTO_U32("hash_alg", s.hash_alg, false, UINT32_MAX, "chaining: the hash algorithm (default 0)"),
        P_CRYPTO_U32("hash_result_len", s.hash_result_len, false, UINT32_MAX,
                     "chaining: the hash result's length (default 0)"),
        P_CRYPTO_U32("hash_mode", hash_mode, false, UINT8_MAX, "chaining: plain, auth or nested (default 0)"),
        P_CRYPTO_U32("alg_chain_order", alg_chain_order, false, UINT8_MAX,
                     "chaining: hash then cipher, or cipher then hash (default 0)"),
        P_CRYPTO_U32("aad_len", s.aad_len, false, UINT32_MAX, "chaining: the additional data's length (default 0)"),
        { .name = "auth_key", .kind = PARAM_BASE64, .max = VHU_CRYPTO_MAX_AUTH_KEY, .offset = CRYPTO(auth_key),
          .description = "chaining: the authentication key (at most 512 bytes; default none)" },
        { 0 },
};

static const struct param crypto_session_close_params[] = {
        { .name = "session_id", .kind = PARAM_U64, .required = true, .max = INT64_MAX,
          .offset = AT(crypto_close.session_id), .description = "what device.crypto.session.create answered" },
        { 0 },
};

static json_t *result_crypto_session(struct control_call *cc) {
        return json_pack("{s:o}", "session_id", vhub_json_u64(cc->call.out.crypto_session.session_id));
}

static const struct param crypto_session_result = R_OBJECT(
        R_U64("session_id", "the back-end's id of the new session, for device.crypto.session.close"));

static int m_device_crypto_session_create(struct method_call *m, struct vhub_error *err) {
        struct vhu_crypto_session *s = &m->p.crypto_create.s;
        const struct params_bytes *cipher_key = &m->p.crypto_create.cipher_key;
        const struct params_bytes *auth_key = &m->p.crypto_create.auth_key;

        /* the descriptors bound every value and key length */
        s->direction = (uint8_t)m->p.crypto_create.direction;
        s->op_type = (uint8_t)m->p.crypto_create.op_type;
        s->hash_mode = (uint8_t)m->p.crypto_create.hash_mode;
        s->alg_chain_order = (uint8_t)m->p.crypto_create.alg_chain_order;
        if (cipher_key->len)
                memcpy(s->cipher_key, cipher_key->data, cipher_key->len);
        s->cipher_key_len = (uint32_t)cipher_key->len;
        if (auth_key->len)
                memcpy(s->auth_key, auth_key->data, auth_key->len);
        s->auth_key_len = (uint32_t)auth_key->len;
        vhub_device_crypto_create(m->dev, s, &m->cc->call);
        return 0;
}

static int m_device_crypto_session_close(struct method_call *m, struct vhub_error *err) {
        vhub_device_crypto_close(m->dev, m->p.crypto_close.session_id, &m->cc->call);
        return 0;
}

static const struct param gpu_set_socket_params[] = {
        P_FD(gpu.fd, "fd index: the back-end's end of a socketpair; the VMM speaks vhost-user-gpu on the other"),
        { 0 },
};

static int m_device_gpu_set_socket(struct method_call *m, struct vhub_error *err) {
        struct stat st;

        /* the back-end speaks the vhost-user-gpu protocol on it */
        if (fstat(m->p.gpu.fd, &st) < 0 || !S_ISSOCK(st.st_mode))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'fd' must be a socket (the VMM's socketpair)");
        vhub_device_gpu_set_socket(m->dev, VHU_TAKE_FD(m->p.gpu.fd), &m->cc->call);
        return 0;
}

/* VHOST_ACCESS_RO / WO / RW are 1, 2, 3: the index + 1 */
static const char *const iotlb_perms[] = { "ro", "wo", "rw", NULL };

#define P_IOTLB_RANGE(iova_description_)                                                               \
        { .name = "iova", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = AT(iotlb.iova), \
          .description = (iova_description_) },                                                         \
        { .name = "size", .kind = PARAM_U64, .required = true, .min = 1, .max = UINT64_MAX,             \
          .offset = AT(iotlb.size), .description = "the range's size in bytes (iova + size must not wrap)" }

static const struct param iotlb_update_params[] = {
        P_IOTLB_RANGE("the I/O virtual address the range starts at"),
        { .name = "uaddr", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = AT(iotlb.uaddr),
          .description = "where it lies in the VM's memory, as the VMM's addresses of vm.memory.add" },
        { .name = "perm", .kind = PARAM_ENUM, .required = true, .values = iotlb_perms, .offset = AT(iotlb.perm),
          .description = "the access the device gets: read-only, write-only or both" },
        { 0 },
};

static const struct param iotlb_invalidate_params[] = {
        P_IOTLB_RANGE("the I/O virtual address the range to drop starts at"),
        { 0 },
};

static int device_iotlb(struct method_call *m, uint8_t type, struct vhub_error *err) {
        struct vhu_iotlb msg = {
                .iova = m->p.iotlb.iova,
                .size = m->p.iotlb.size,
                .uaddr = m->p.iotlb.uaddr,
                .perm = type == VHU_IOTLB_UPDATE ? (uint8_t)(m->p.iotlb.perm + 1) : 0,
                .type = type,
        };

        if (msg.iova + msg.size - 1 < msg.iova)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "iova + size must not wrap");
        vhub_device_iotlb(m->dev, &msg, &m->cc->call);
        return 0;
}

static int m_device_iotlb_update(struct method_call *m, struct vhub_error *err) {
        return device_iotlb(m, VHU_IOTLB_UPDATE, err);
}

static int m_device_iotlb_invalidate(struct method_call *m, struct vhub_error *err) {
        return device_iotlb(m, VHU_IOTLB_INVALIDATE, err);
}

/* ---- shared objects ---- */

static const struct param shared_object_add_params[] = {
        { .name = "uuid", .kind = PARAM_UUID, .required = true, .offset = AT(shared.uuid),
          .description = "the UUID back-ends look it up by" },
        P_FD(shared.fd, "fd index: the object (a dmabuf, or any fd)"),
        { 0 },
};

static int m_shared_object_add(struct method_call *m, struct vhub_error *err) {
        int r = vhub_vm_shared_add(m->vm, m->p.shared.uuid, VHU_TAKE_FD(m->p.shared.fd), err);

        return r < 0 ? r : 0;
}

static const struct param shared_object_remove_params[] = {
        { .name = "uuid", .kind = PARAM_UUID, .required = true, .offset = AT(shared.uuid),
          .description = "the UUID it was added under" },
        { 0 },
};

static int m_shared_object_remove(struct method_call *m, struct vhub_error *err) {
        int r = vhub_vm_shared_remove(m->vm, m->p.shared.uuid, err);

        return r < 0 ? r : 0;
}

static json_t *shared_object_json(const void *item) {
        const struct vhub_shared_object_info *o = item;
        char u[37];

        vhub_uuid_format(o->uuid, u);
        return json_pack("{s:s, s:s}", "uuid", u, "owner", o->exporter[0] ? o->exporter : "vmm");
}

static int m_shared_object_list(struct method_call *m, struct vhub_error *err) {
        struct vhub_shared_object_info *objs = NULL;
        size_t n = 0;
        int r = vhub_info_shared_objects(m->vm, &objs, &n);

        return call_answer_list(m, r, "objects", objs, n, sizeof(*objs), shared_object_json, err);
}

static const struct param shared_object_list_result = R_OBJECT(
        R_ARRAY_OF("objects", "the VM's shared objects",
                   R("uuid", PARAM_UUID, "its UUID"),
                   R("owner", PARAM_NAME, "\"vmm\", or the device that exported it")));

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

static int m_events_subscribe(struct method_call *m, struct vhub_error *err) {
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
        { .name = "daemon.info", .fn = m_daemon_info, .result = &daemon_info_result,
          .summary = "What the daemon is: version, contract version, uptime, counts, capabilities." },
        { .name = "vm.create", .fn = m_vm_create, .params = vm_create_params,
          .errors = ERRORS(VHUB_ERR_NO_VM, VHUB_ERR_EXISTS, VHUB_ERR_LIMIT),
          .summary = "Create an empty VM owned by this connection." },
        { .name = "vm.attach", .fn = m_vm_attach, .flags = METHOD_VM, .errors = ERRORS(VHUB_ERR_STATE),
          .summary = "Take over a lingering VM of the same uid." },
        { .name = "vm.destroy", .fn = m_vm_destroy, .flags = METHOD_VM | METHOD_WAITS,
          .summary = "Stop and remove every device, then the VM." },
        { .name = "vm.list", .fn = m_vm_list, .result = &vm_list_result,
          .summary = "The VMs the caller may see." },
        { .name = "vm.memory.add", .fn = m_vm_memory_add, .flags = METHOD_VM | METHOD_WAITS,
          .params = vm_memory_add_params,
          .errors = ERRORS(VHUB_ERR_STATE, VHUB_ERR_REGION, BACKEND_ERRORS),
          .summary = "Add a guest RAM region; every device has it before the call answers." },
        { .name = "vm.memory.remove", .fn = m_vm_memory_remove, .flags = METHOD_VM | METHOD_WAITS,
          .params = vm_memory_remove_params, .errors = ERRORS(VHUB_ERR_STATE, VHUB_ERR_REGION, BACKEND_ERRORS),
          .summary = "Remove a region; every device has dropped it before the call answers." },
        { .name = "vm.memory.list", .fn = m_vm_memory_list, .flags = METHOD_VM, .result = &vm_memory_list_result,
          .summary = "The VM's memory regions." },
        { .name = "device.add", .fn = m_device_add, .flags = METHOD_VM | METHOD_WAITS, .params = device_add_params,
          .result = &device_add_result, .make_result = result_device_add,
          .errors = ERRORS(VHUB_ERR_EXISTS, VHUB_ERR_STATE, VHUB_ERR_UNSUPPORTED, VHUB_ERR_NOT_ALLOWED,
                           VHUB_ERR_LIMIT, BACKEND_ERRORS),
          .summary = "Connect a back-end, negotiate, set the owner and the memory table; with vmm_socket, "
                     "open the front door for an unmodified VMM." },
        { .name = "device.remove", .fn = m_device_remove, .flags = DEVICE_CALL,
          .summary = "Stop a device if it runs, cancel reconnects, remove it." },
        { .name = "device.list", .fn = m_device_list, .flags = METHOD_VM, .result = &device_list_result,
          .summary = "The VM's devices." },
        { .name = "device.config.get", .fn = m_device_config_get, .flags = DEVICE_CALL,
          .params = device_config_get_params, .result = &config_get_result, .make_result = result_config_get,
          .errors = ERRORS(DEVICE_ERRORS), .summary = "GET_CONFIG: read the device's config space." },
        { .name = "device.config.set", .fn = m_device_config_set, .flags = DEVICE_CALL,
          .params = device_config_set_params, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "SET_CONFIG: write the device's config space." },
        { .name = "device.start", .fn = m_device_start, .flags = DEVICE_CALL, .params = device_start_params,
          .errors = ERRORS(DEVICE_ERRORS, VHUB_ERR_REGION),
          .summary = "Set the acked features and start the rings (from ready or stopped)." },
        { .name = "device.stop", .fn = m_device_stop, .flags = DEVICE_CALL, .params = device_stop_params,
          .result = &device_stop_result, .make_result = result_device_stop, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "Stop every ring (draining, or suspending in-flight requests); their bases." },
        { .name = "device.reset", .fn = m_device_reset, .flags = DEVICE_CALL,
          .errors = ERRORS(VHUB_ERR_STATE, BACKEND_ERRORS), .summary = "Back to ready." },
        { .name = "device.net.rarp", .fn = m_device_net_rarp, .flags = DEVICE_CALL,
          .params = device_net_rarp_params, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "SEND_RARP: announce the guest's MAC after a migration." },
        { .name = "device.net.mtu", .fn = m_device_net_mtu, .flags = DEVICE_CALL,
          .params = device_net_mtu_params, .errors = ERRORS(DEVICE_ERRORS), .summary = "NET_SET_MTU." },
        { .name = "vm.dirty_log.start", .fn = m_vm_dirty_log_start,
          .flags = METHOD_VM | METHOD_WAITS | METHOD_FDS_OUT, .result = &dirty_log_result,
          .make_result = result_dirty_log, .errors = ERRORS(DEVICE_ERRORS, VHUB_ERR_LIMIT),
          .summary = "Give every device a log memfd (SET_LOG_BASE) and return it." },
        { .name = "vm.dirty_log.stop", .fn = m_vm_dirty_log_stop, .flags = METHOD_VM | METHOD_WAITS,
          .errors = ERRORS(VHUB_ERR_STATE, BACKEND_ERRORS), .summary = "Stop dirty logging." },
        { .name = "device.state.save", .fn = m_device_state_save, .flags = DEVICE_CALL | METHOD_FDS_OUT,
          .params = device_state_fd_params, .result = &state_fd_result, .make_result = result_state_fd,
          .errors = ERRORS(DEVICE_ERRORS),
          .summary = "SET_DEVICE_STATE_FD (save): the back-end writes its state into the pipe." },
        { .name = "device.state.load", .fn = m_device_state_load, .flags = DEVICE_CALL | METHOD_FDS_OUT,
          .params = device_state_fd_params, .result = &state_fd_result, .make_result = result_state_fd,
          .errors = ERRORS(DEVICE_ERRORS),
          .summary = "SET_DEVICE_STATE_FD (load): the back-end reads its state from the pipe." },
        { .name = "device.state.check", .fn = m_device_state_check, .flags = DEVICE_CALL,
          .errors = ERRORS(DEVICE_ERRORS), .summary = "CHECK_DEVICE_STATE after a transfer." },
        { .name = "shared_object.add", .fn = m_shared_object_add, .flags = METHOD_VM,
          .params = shared_object_add_params, .errors = ERRORS(VHUB_ERR_EXISTS, VHUB_ERR_LIMIT),
          .summary = "Export an fd under a UUID to the VM's back-ends." },
        { .name = "shared_object.remove", .fn = m_shared_object_remove, .flags = METHOD_VM,
          .params = shared_object_remove_params, .summary = "Withdraw an exported object." },
        { .name = "shared_object.list", .fn = m_shared_object_list, .flags = METHOD_VM,
          .result = &shared_object_list_result, .summary = "The VM's shared objects." },
        { .name = "device.backend_reply", .fn = m_device_backend_reply, .flags = METHOD_VM | METHOD_DEVICE,
          .params = device_backend_reply_params, .summary = "Answer a forwarded device.backend_request." },
        { .name = "events.subscribe", .fn = m_events_subscribe, .flags = METHOD_VM_OPTIONAL,
          .errors = ERRORS(VHUB_ERR_LIMIT),
          .summary = "Also receive the events of that VM (without vm: of every VM the caller may see; "
                     "root: of every uid)." },
        { .name = "rpc.discover", .fn = m_rpc_discover, .result = &rpc_discover_result,
          .summary = "This document." },
        { .name = "device.stats", .fn = m_device_stats, .flags = METHOD_VM | METHOD_DEVICE,
          .result = &device_stats_result,
          .summary = "The device's control-plane counters since device.add: requests, replies, losses, durations." },
        { .name = "device.crypto.session.create", .fn = m_device_crypto_session_create, .flags = DEVICE_CALL,
          .params = crypto_session_create_params, .result = &crypto_session_result,
          .make_result = result_crypto_session, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "CREATE_CRYPTO_SESSION (protocol feature CRYPTO_SESSION)." },
        { .name = "device.crypto.session.close", .fn = m_device_crypto_session_close, .flags = DEVICE_CALL,
          .params = crypto_session_close_params, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "CLOSE_CRYPTO_SESSION." },
        { .name = "device.gpu.set_socket", .fn = m_device_gpu_set_socket, .flags = DEVICE_CALL,
          .params = gpu_set_socket_params, .errors = ERRORS(VHUB_ERR_STATE, BACKEND_ERRORS),
          .summary = "GPU_SET_SOCKET: hand the back-end its vhost-user-gpu socket." },
        { .name = "device.iotlb.update", .fn = m_device_iotlb_update, .flags = DEVICE_CALL,
          .params = iotlb_update_params, .errors = ERRORS(DEVICE_ERRORS, VHUB_ERR_REGION),
          .summary = "IOTLB_MSG (update): map an I/O virtual address range." },
        { .name = "device.iotlb.invalidate", .fn = m_device_iotlb_invalidate, .flags = DEVICE_CALL,
          .params = iotlb_invalidate_params, .errors = ERRORS(DEVICE_ERRORS),
          .summary = "IOTLB_MSG (invalidate): drop a range's translations." },
        { .name = "device.kick", .fn = m_device_kick, .flags = DEVICE_CALL, .params = device_kick_params,
          .errors = ERRORS(DEVICE_ERRORS), .summary = "VRING_KICK: an in-band kick (INBAND_NOTIFICATIONS)." },
        { .name = "vm.postcopy.advise", .fn = m_vm_postcopy_advise,
          .flags = METHOD_VM | METHOD_WAITS | METHOD_FDS_OUT, .result = &postcopy_advise_result,
          .make_result = result_postcopy_advise, .errors = ERRORS(POSTCOPY_ERRORS),
          .summary = "POSTCOPY_ADVISE to every device; their userfaultfds." },
        { .name = "vm.postcopy.listen", .fn = m_vm_postcopy_listen, .flags = METHOD_VM | METHOD_WAITS,
          .params = postcopy_listen_params, .result = &postcopy_listen_result, .errors = ERRORS(POSTCOPY_ERRORS),
          .summary = "POSTCOPY_LISTEN to every device, which maps the VM's memory again." },
        { .name = "vm.postcopy.end", .fn = m_vm_postcopy_end, .flags = METHOD_VM | METHOD_WAITS,
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
        m->vm = vhub_vm_find(call_ctx(m), uid, m->p.vm);
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
