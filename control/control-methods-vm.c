/* SPDX-License-Identifier: MIT */
/* The VM methods: vm.create, attach, destroy, list; shared_object.*.
 * Their rows are in control-methods.c's table (control-methods-internal.h). */
#include <stdlib.h>

#include "control-methods-internal.h"
#include "vhub-info.h"
#include "vhub-shared-object.h"
#include "vhu-fd.h"

/* ---- VMs ---- */

const struct param cm_vm_create_params[] = {
        P_VM(true),
        { .name = "linger_ms", .kind = PARAM_U64, .max = MAX_LINGER_MS, .offset = AT(vm_create.linger_ms),
          .description = "how long the VM outlives its connection, waiting for vm.attach (default 0)" },
        P_UID,
        { 0 },
};

int cm_vm_create(struct method_call *m, struct vhub_error *err) {
        struct control_conn *c = m->req->conn;
        uid_t uid = m->p.uid == UID_CALLER ? c->uid : (uid_t)m->p.uid;
        struct vhub_vm *vm;
        int r;

        if (!vhub_uid_sees(c->uid, uid))
                return vhub_error_set(err, VHUB_ERR_NO_VM, "only root may create a VM for another uid");
        /* the VM acts with its creator's credentials (back-end paths) */
        r = vhub_vm_create(cm_call_ctx(m), uid, m->p.vm, m->p.vm_create.linger_ms, &c->owner, &c->cred, err,
                           &vm);
        return r < 0 ? r : 0;
}

int cm_vm_attach(struct method_call *m, struct vhub_error *err) {
        /* the new owner's credentials replace the creator's */
        int r = vhub_vm_attach(m->vm, &m->req->conn->owner, &m->req->conn->cred, err);

        return r < 0 ? r : 0;
}

int cm_vm_destroy(struct method_call *m, struct vhub_error *err) {
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

int cm_vm_list(struct method_call *m, struct vhub_error *err) {
        struct vhub_vm_info *vms = NULL;
        size_t n = 0;
        int r = vhub_info_vms(cm_call_ctx(m), m->req->conn->uid, &vms, &n);

        return cm_call_answer_list(m, r, "vms", vms, n, sizeof(*vms), vm_json, err);
}

const struct param cm_vm_list_result = R_OBJECT(
        R_ARRAY_OF("vms", "the VMs the caller may see",
                   R("vm", PARAM_NAME, "its name"),
                   R_U64("uid", "the uid it belongs to"),
                   R_NAMES("devices", "its devices"),
                   R_U64("regions", "how many memory regions it has"),
                   { .name = "linger_remaining_ms", .kind = PARAM_U64, .max = UINT64_MAX,
                     .description = "an extension: a VM without an owner, how long it lingers still" }));

/* ---- shared objects ---- */

const struct param cm_shared_object_add_params[] = {
        { .name = "uuid", .kind = PARAM_UUID, .required = true, .offset = AT(shared.uuid),
          .description = "the UUID back-ends look it up by" },
        P_FD(shared.fd, "fd index: the object (a dmabuf, or any fd)"),
        { 0 },
};

int cm_shared_object_add(struct method_call *m, struct vhub_error *err) {
        int r = vhub_vm_shared_add(m->vm, m->p.shared.uuid, VHU_TAKE_FD(m->p.shared.fd), err);

        return r < 0 ? r : 0;
}

const struct param cm_shared_object_remove_params[] = {
        { .name = "uuid", .kind = PARAM_UUID, .required = true, .offset = AT(shared.uuid),
          .description = "the UUID it was added under" },
        { 0 },
};

int cm_shared_object_remove(struct method_call *m, struct vhub_error *err) {
        int r = vhub_vm_shared_remove(m->vm, m->p.shared.uuid, err);

        return r < 0 ? r : 0;
}

static json_t *shared_object_json(const void *item) {
        const struct vhub_shared_object_info *o = item;
        char u[37];

        vhub_uuid_format(o->uuid, u);
        return json_pack("{s:s, s:s}", "uuid", u, "owner", o->exporter[0] ? o->exporter : "vmm");
}

int cm_shared_object_list(struct method_call *m, struct vhub_error *err) {
        struct vhub_shared_object_info *objs = NULL;
        size_t n = 0;
        int r = vhub_info_shared_objects(m->vm, &objs, &n);

        return cm_call_answer_list(m, r, "objects", objs, n, sizeof(*objs), shared_object_json, err);
}

const struct param cm_shared_object_list_result = R_OBJECT(
        R_ARRAY_OF("objects", "the VM's shared objects",
                   R("uuid", PARAM_UUID, "its UUID"),
                   R("owner", PARAM_NAME, "\"vmm\", or the device that exported it")));
