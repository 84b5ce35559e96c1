/* SPDX-License-Identifier: MIT */
/*
 * The contract's methods for the requests real back-ends beyond blk/net/fs
 * need: crypto sessions (DPDK vhost_crypto), the GPU socket
 * (vhost-user-gpu), IOTLB updates (VIRTIO_F_IOMMU_PLATFORM) and postcopy.
 * Same conventions as control-methods.c: strict params, the VM resolved
 * under the caller's identity, calls into the model answered from their
 * completion.  control_dispatch() falls back to this table.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "control-internal.h"
#include "control-params.h"
#include "vhub-device.h"
#include "vhub-vm.h"

#define MEMBERS(...) ((const char *const[]){ __VA_ARGS__, NULL })

/* Only these members; the VM they name; its device when with_device. */
static int real_prologue(struct control_req *req, const char *const *members, struct vhub_vm **ret_vm,
                         struct vhub_device **ret_dev, struct vhub_error *err) {
        const char *name;
        struct vhub_device *d;
        int r;

        if ((r = params_check_members(req->params, members, err)) < 0 ||
            (r = control_req_vm(req, ret_vm, err)) < 0)
                return r;
        if (!ret_dev)
                return 0;
        if ((r = params_get_name(req->params, "device", true, &name, err)) < 0)
                return r;
        d = vhub_vm_find_device(*ret_vm, name);
        if (!d || d->removing)
                return vhub_error_set(err, VHUB_ERR_NO_DEVICE, "no such device: %s", name);
        *ret_dev = d;
        return 0;
}

/* A pending call, within the connection's limit. */
static struct control_call *real_call(struct control_req *req, control_result_fn fn, struct vhub_error *err) {
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

/* A base64 member of at most max bytes into buf; absent and optional: 0 bytes. */
static int real_get_key(struct control_req *req, const char *key, bool required, uint8_t *buf, size_t max,
                        uint32_t *ret_len, struct vhub_error *err) {
        const char *b64 = NULL;
        void *data = NULL;
        size_t len = 0;
        int r;

        r = params_get_string(req->params, key, required, 4 * ((max + 2) / 3), &b64, err);
        if (r < 0)
                return r;
        if (!b64) {
                *ret_len = 0;
                return 0;
        }
        r = vhub_base64_decode(b64, &data, &len);
        if (r < 0 || len > max) {
                free(data);
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be base64 of at most %zu bytes", key, max);
        }
        if (len)
                memcpy(buf, data, len);
        free(data);
        *ret_len = (uint32_t)len;
        return 0;
}

/* ---- crypto sessions ---- */

static json_t *result_crypto_session(struct control_call *cc) {
        return json_pack("{s:o}", "session_id", vhub_json_u64(cc->call.out.crypto_session.session_id));
}

static int m_device_crypto_session_create(struct control_req *req, struct vhub_error *err) {
        struct vhu_crypto_session s = { 0 };
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        uint32_t v8[4];
        int r;

        if ((r = real_prologue(req,
                               MEMBERS("vm", "uid", "device", "op_code", "cipher_alg", "cipher_key", "direction",
                                       "op_type", "hash_alg", "hash_result_len", "hash_mode", "alg_chain_order",
                                       "aad_len", "auth_key"),
                               &vm, &d, err)) < 0 ||
            (r = params_get_u32(req->params, "op_code", true, 0, UINT32_MAX, &s.op_code, err)) < 0 ||
            (r = params_get_u32(req->params, "cipher_alg", true, 0, UINT32_MAX, &s.cipher_alg, err)) < 0 ||
            (r = real_get_key(req, "cipher_key", true, s.cipher_key, sizeof(s.cipher_key), &s.cipher_key_len,
                              err)) < 0 ||
            (r = params_get_u32(req->params, "direction", true, 0, UINT8_MAX, &v8[0], err)) < 0 ||
            (r = params_get_u32(req->params, "op_type", true, 0, UINT8_MAX, &v8[1], err)) < 0 ||
            (r = params_get_u32(req->params, "hash_alg", false, 0, UINT32_MAX, &s.hash_alg, err)) < 0 ||
            (r = params_get_u32(req->params, "hash_result_len", false, 0, UINT32_MAX, &s.hash_result_len,
                                err)) < 0 ||
            (r = params_get_u32(req->params, "hash_mode", false, 0, UINT8_MAX, &v8[2], err)) < 0 ||
            (r = params_get_u32(req->params, "alg_chain_order", false, 0, UINT8_MAX, &v8[3], err)) < 0 ||
            (r = params_get_u32(req->params, "aad_len", false, 0, UINT32_MAX, &s.aad_len, err)) < 0 ||
            (r = real_get_key(req, "auth_key", false, s.auth_key, sizeof(s.auth_key), &s.auth_key_len, err)) < 0)
                return r;
        s.direction = (uint8_t)v8[0];
        s.op_type = (uint8_t)v8[1];
        s.hash_mode = (uint8_t)v8[2];
        s.alg_chain_order = (uint8_t)v8[3];
        if (!(cc = real_call(req, result_crypto_session, err)))
                return -ENOMEM;
        vhub_device_crypto_create(d, &s, &cc->call);
        return 0;
}

static int m_device_crypto_session_close(struct control_req *req, struct vhub_error *err) {
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        uint64_t id;
        int r;

        if ((r = real_prologue(req, MEMBERS("vm", "uid", "device", "session_id"), &vm, &d, err)) < 0 ||
            (r = params_get_u64(req->params, "session_id", true, 0, INT64_MAX, &id, err)) < 0)
                return r;
        if (!(cc = real_call(req, NULL, err)))
                return -ENOMEM;
        vhub_device_crypto_close(d, id, &cc->call);
        return 0;
}

/* ---- GPU ---- */

static int m_device_gpu_set_socket(struct control_req *req, struct vhub_error *err) {
        struct control_call *cc;
        struct vhub_device *d;
        struct vhub_vm *vm;
        struct stat st;
        int fd = -1, r;

        if ((r = real_prologue(req, MEMBERS("vm", "uid", "device", "fd"), &vm, &d, err)) < 0 ||
            (r = params_take_fd(req->params, "fd", true, req->fds, &fd, err)) < 0)
                return r;
        /* the back-end speaks the vhost-user-gpu protocol on it */
        if (fstat(fd, &st) < 0 || !S_ISSOCK(st.st_mode)) {
                close(fd);
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'fd' must be a socket (the VMM's socketpair)");
        }
        if (!(cc = real_call(req, NULL, err))) {
                close(fd);
                return -ENOMEM;
        }
        vhub_device_gpu_set_socket(d, fd, &cc->call);
        return 0;
}

/* ---- IOTLB ---- */

static int m_device_iotlb(struct control_req *req, struct vhub_error *err, bool update) {
        struct vhu_iotlb msg = { .type = update ? VHU_IOTLB_UPDATE : VHU_IOTLB_INVALIDATE };
        struct control_call *cc;
        struct vhub_device *d;
        const char *perm = NULL;
        struct vhub_vm *vm;
        int r;

        r = update ? real_prologue(req, MEMBERS("vm", "uid", "device", "iova", "size", "uaddr", "perm"), &vm, &d, err)
                   : real_prologue(req, MEMBERS("vm", "uid", "device", "iova", "size"), &vm, &d, err);
        if (r < 0 ||
            (r = params_get_u64(req->params, "iova", true, 0, UINT64_MAX, &msg.iova, err)) < 0 ||
            (r = params_get_u64(req->params, "size", true, 0, UINT64_MAX, &msg.size, err)) < 0)
                return r;
        if (msg.size == 0 || msg.iova + msg.size - 1 < msg.iova)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'size' must be non-zero and iova + size must not wrap");
        if (update) {
                if ((r = params_get_u64(req->params, "uaddr", true, 0, UINT64_MAX, &msg.uaddr, err)) < 0 ||
                    (r = params_get_string(req->params, "perm", true, 2, &perm, err)) < 0)
                        return r;
                /* VHOST_ACCESS_RO / WO / RW */
                if (strcmp(perm, "ro") == 0)
                        msg.perm = 1;
                else if (strcmp(perm, "wo") == 0)
                        msg.perm = 2;
                else if (strcmp(perm, "rw") == 0)
                        msg.perm = 3;
                else
                        return vhub_error_set(err, VHUB_ERR_PARAMS, "'perm' must be \"ro\", \"wo\" or \"rw\"");
        }
        if (!(cc = real_call(req, NULL, err)))
                return -ENOMEM;
        vhub_device_iotlb(d, &msg, &cc->call);
        return 0;
}

static int m_device_iotlb_update(struct control_req *req, struct vhub_error *err) {
        return m_device_iotlb(req, err, true);
}

static int m_device_iotlb_invalidate(struct control_req *req, struct vhub_error *err) {
        return m_device_iotlb(req, err, false);
}

/* ---- postcopy ---- */

static void free_postcopy_out(void *data) {
        vhub_postcopy_out_free(data);
}

static json_t *result_postcopy_advise(struct control_call *cc) {
        json_t *devs = json_array();

        for (unsigned i = 0; i < cc->call.out.postcopy.n_devices; i++) {
                struct vhub_postcopy_device *pd = &cc->call.out.postcopy.devices[i];

                if (pd->ufd < 0 || cc->n_reply_fds >= RPC_MAX_FDS_PER_MESSAGE)
                        continue;
                /* the fd moves to the reply; closed after sending */
                cc->reply_fds[cc->n_reply_fds] = pd->ufd;
                pd->ufd = -1;
                json_array_append_new(devs, json_pack("{s:s, s:i}", "device", pd->device, "fd",
                                                      (int)cc->n_reply_fds));
                cc->n_reply_fds++;
        }
        return json_pack("{s:o}", "devices", devs);
}

/* Listen answers {} plus, per device, where its back-end mapped each region:
 * its userfaultfd reports faults at those addresses. */
static json_t *result_postcopy_listen(struct control_call *cc) {
        json_t *devs = json_array();

        for (unsigned i = 0; i < cc->call.out.postcopy.n_devices; i++) {
                struct vhub_postcopy_device *pd = &cc->call.out.postcopy.devices[i];
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

static int m_vm_postcopy(struct control_req *req, struct vhub_error *err, enum vhub_postcopy_step step) {
        static const control_result_fn results[] = {
                [VHUB_POSTCOPY_ADVISE] = result_postcopy_advise,
                [VHUB_POSTCOPY_LISTEN] = result_postcopy_listen,
                [VHUB_POSTCOPY_END] = NULL,
        };
        struct control_call *cc;
        struct vhub_vm *vm;
        int r;

        if ((r = real_prologue(req, MEMBERS("vm", "uid"), &vm, NULL, err)) < 0)
                return r;
        if (step == VHUB_POSTCOPY_ADVISE && req->batch)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "vm.postcopy.advise answers with fds and cannot be used inside a batch");
        if (!(cc = real_call(req, results[step], err)))
                return -ENOMEM;
        /* the outputs the model leaves behind go with the call */
        cc->data = &cc->call;
        cc->free_data = free_postcopy_out;
        vhub_vm_postcopy(vm, step, &cc->call);
        return 0;
}

static int m_vm_postcopy_advise(struct control_req *req, struct vhub_error *err) {
        return m_vm_postcopy(req, err, VHUB_POSTCOPY_ADVISE);
}

static int m_vm_postcopy_listen(struct control_req *req, struct vhub_error *err) {
        return m_vm_postcopy(req, err, VHUB_POSTCOPY_LISTEN);
}

static int m_vm_postcopy_end(struct control_req *req, struct vhub_error *err) {
        return m_vm_postcopy(req, err, VHUB_POSTCOPY_END);
}

const struct control_method control_methods_real[] = {
        { "device.crypto.session.create", m_device_crypto_session_create },
        { "device.crypto.session.close", m_device_crypto_session_close },
        { "device.gpu.set_socket", m_device_gpu_set_socket },
        { "device.iotlb.update", m_device_iotlb_update },
        { "device.iotlb.invalidate", m_device_iotlb_invalidate },
        { "vm.postcopy.advise", m_vm_postcopy_advise },
        { "vm.postcopy.listen", m_vm_postcopy_listen },
        { "vm.postcopy.end", m_vm_postcopy_end },
        { NULL, NULL },
};
