/* SPDX-License-Identifier: MIT */
/* A device's optional features: device.crypto.session.*,
 * device.gpu.set_socket, device.iotlb.*.  Their rows are in
 * control-methods.c's table (control-methods-internal.h). */
#include <string.h>
#include <sys/stat.h>

#include "control-methods-internal.h"
#include "vhu-fd.h"

/* ---- crypto sessions, the GPU socket, IOTLB ---- */

#define CRYPTO(field) AT(crypto_create.field)
/* a virtio-crypto number of the same name (virtio spec, "Crypto Device") */
#define P_CRYPTO_U32(name_, field_, required_, max_, description_)                                    \
        { .name = (name_), .kind = PARAM_U32, .required = (required_), .max = (max_),                \
          .offset = CRYPTO(field_), .description = (description_) }

const struct param cm_crypto_session_create_params[] = {
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

const struct param cm_crypto_session_close_params[] = {
        { .name = "session_id", .kind = PARAM_U64, .required = true, .max = INT64_MAX,
          .offset = AT(crypto_close.session_id), .description = "what device.crypto.session.create answered" },
        { 0 },
};

json_t *cm_result_crypto_session(struct control_call *cc) {
        return json_pack("{s:o}", "session_id", vhub_json_u64(cc->call.out.crypto_session.session_id));
}

const struct param cm_crypto_session_result = R_OBJECT(
        R_U64("session_id", "the back-end's id of the new session, for device.crypto.session.close"));

int cm_device_crypto_session_create(struct method_call *m, struct vhub_error *err) {
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

int cm_device_crypto_session_close(struct method_call *m, struct vhub_error *err) {
        vhub_device_crypto_close(m->dev, m->p.crypto_close.session_id, &m->cc->call);
        return 0;
}

const struct param cm_gpu_set_socket_params[] = {
        P_FD(gpu.fd, "fd index: the back-end's end of a socketpair; the VMM speaks vhost-user-gpu on the other"),
        { 0 },
};

int cm_device_gpu_set_socket(struct method_call *m, struct vhub_error *err) {
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

const struct param cm_iotlb_update_params[] = {
        P_IOTLB_RANGE("the I/O virtual address the range starts at"),
        { .name = "uaddr", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = AT(iotlb.uaddr),
          .description = "where it lies in the VM's memory, as the VMM's addresses of vm.memory.add" },
        { .name = "perm", .kind = PARAM_ENUM, .required = true, .values = iotlb_perms, .offset = AT(iotlb.perm),
          .description = "the access the device gets: read-only, write-only or both" },
        { 0 },
};

const struct param cm_iotlb_invalidate_params[] = {
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

int cm_device_iotlb_update(struct method_call *m, struct vhub_error *err) {
        return device_iotlb(m, VHU_IOTLB_UPDATE, err);
}

int cm_device_iotlb_invalidate(struct method_call *m, struct vhub_error *err) {
        return device_iotlb(m, VHU_IOTLB_INVALIDATE, err);
}
