/* SPDX-License-Identifier: MIT */
/* A VM's memory: vm.memory.*, vm.dirty_log.*, vm.postcopy.*.
 * Their rows are in control-methods.c's table (control-methods-internal.h). */
#include "control-methods-internal.h"
#include "vhub-info.h"
#include "vhu-fd.h"

const struct param cm_vm_memory_add_params[] = {
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

int cm_vm_memory_add(struct method_call *m, struct vhub_error *err) {
        struct vhub_region *region = &m->p.memory_add.region;

        if (!m->p.memory_add.uaddr_given)
                region->uaddr = region->gpa;
        vhub_vm_memory_add(m->vm, region, &m->cc->call); /* takes region->fd */
        return 0;
}

const struct param cm_vm_memory_remove_params[] = {
        { .name = "gpa", .kind = PARAM_U64, .required = true, .max = UINT64_MAX,
          .offset = AT(memory_remove.gpa), .description = "where the region to remove starts" },
        { 0 },
};

int cm_vm_memory_remove(struct method_call *m, struct vhub_error *err) {
        vhub_vm_memory_remove(m->vm, m->p.memory_remove.gpa, &m->cc->call);
        return 0;
}

static json_t *region_json(const void *item) {
        const struct vhub_region_info *g = item;

        return json_pack("{s:o, s:o, s:o, s:o}", "gpa", vhub_json_u64(g->gpa), "size", vhub_json_u64(g->size),
                         "offset", vhub_json_u64(g->offset), "uaddr", vhub_json_u64(g->uaddr));
}

int cm_vm_memory_list(struct method_call *m, struct vhub_error *err) {
        struct vhub_region_info *regions = NULL;
        size_t n = 0;
        int r = vhub_info_regions(m->vm, &regions, &n);

        return cm_call_answer_list(m, r, "regions", regions, n, sizeof(*regions), region_json, err);
}

const struct param cm_vm_memory_list_result = R_OBJECT(
        R_ARRAY_OF("regions", "the VM's memory regions",
                   R_U64("gpa", "guest-physical address"),
                   R_U64("size", "size in bytes"),
                   R_U64("offset", "offset into the fd"),
                   R_U64("uaddr", "the VMM's address")));

json_t *cm_result_dirty_log(struct control_call *cc) {
        if (control_call_reply_fds(cc, 1) < 0) {
                cc->call.out.dirty_log.fd = vhu_safe_close(cc->call.out.dirty_log.fd);
                return NULL;
        }
        cc->reply_fds[cc->n_reply_fds++] = VHU_TAKE_FD(cc->call.out.dirty_log.fd);
        return json_pack("{s:i, s:o}", "fd", 0, "size", vhub_json_u64(cc->call.out.dirty_log.size));
}

const struct param cm_dirty_log_result = R_OBJECT(
        R("fd", PARAM_FD, "fd index in this response: the log memfd, one bit per 4 KiB page"),
        R_U64("size", "the log's size in bytes"));

int cm_vm_dirty_log_start(struct method_call *m, struct vhub_error *err) {
        int r = control_req_check_fds(m->req, 1, err); /* the log memfd */

        if (r < 0)
                return r;
        vhub_vm_dirty_log_start(m->vm, &m->cc->call);
        return 0;
}

int cm_vm_dirty_log_stop(struct method_call *m, struct vhub_error *err) {
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

json_t *cm_result_postcopy_advise(struct control_call *cc) {
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

const struct param cm_postcopy_advise_result = R_OBJECT(
        R_ARRAY_OF("devices", "every device of the VM",
                   R("device", PARAM_NAME, "the device"),
                   R("fd", PARAM_FD, "fd index in this response: its back-end's userfaultfd")));

int cm_vm_postcopy_advise(struct method_call *m, struct vhub_error *err) {
        vm_postcopy(m, VHUB_POSTCOPY_ADVISE);
        return 0;
}

const struct param cm_postcopy_listen_params[] = {
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

const struct param cm_postcopy_listen_result = R_OBJECT(
        { .name = "devices", .kind = PARAM_ARRAY, .max = UINT64_MAX,
          .items = &(const struct param)R_OBJECT(
                  R("device", PARAM_NAME, "the device"),
                  R_ARRAY_OF("regions", "the VM's regions as its back-end mapped them",
                             R_U64("gpa", "guest-physical address"),
                             R_U64("size", "size in bytes"),
                             R_U64("backend_uaddr", "where the back-end mapped it: faults come at "
                                                    "backend_uaddr + (address - gpa)"))),
          .description = "with backend_regions: true only: every device of the VM" });

int cm_vm_postcopy_listen(struct method_call *m, struct vhub_error *err) {
        /* the contract's result is {}: the regions only when asked for */
        if (m->p.postcopy_listen.backend_regions)
                m->cc->make_result = result_postcopy_regions;
        vm_postcopy(m, VHUB_POSTCOPY_LISTEN);
        return 0;
}

int cm_vm_postcopy_end(struct method_call *m, struct vhub_error *err) {
        vm_postcopy(m, VHUB_POSTCOPY_END);
        return 0;
}
