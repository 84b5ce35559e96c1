/* SPDX-License-Identifier: MIT */
/*
 * vhost-user messages: lifetime, builders, strict validation, and the
 * byte-level encode/decode used by the socket code and the fuzzers.
 *
 * Payloads are read with memcpy() so that validation works on any buffer
 * (a fuzzer's input is not aligned).  Validation only ever looks at the
 * first hdr.size bytes of a payload and the first n_fds entries of fds[].
 */
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#include "vhu-fd.h"
#include "vhu-message.h"

#define REQUEST_FLAGS_ALLOWED (VHU_FLAG_VERSION_MASK | VHU_FLAG_NEED_REPLY)
#define REPLY_FLAGS           (VHU_VERSION | VHU_FLAG_REPLY)
#define VRING_U64_ALLOWED     ((uint64_t) VHU_VRING_IDX_MASK | VHU_VRING_NOFD_MASK)

static uint32_t read_u32(const uint8_t *p, size_t off) {
        uint32_t v;

        memcpy(&v, p + off, sizeof(v));
        return v;
}

static uint64_t read_u64(const uint8_t *p, size_t off) {
        uint64_t v;

        memcpy(&v, p + off, sizeof(v));
        return v;
}

void vhu_msg_init(struct vhu_msg *m) {
        memset(m, 0, sizeof(*m));
        for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                m->fds[i] = -1;
}

void vhu_msg_clear(struct vhu_msg *m) {
        unsigned n = m->n_fds < VHU_MAX_FDS ? m->n_fds : VHU_MAX_FDS;

        if (!m->fds_borrowed)
                vhu_close_many(m->fds, n);
        vhu_msg_init(m);
}

int vhu_msg_take_fd(struct vhu_msg *m, unsigned idx) {
        if (idx >= m->n_fds || idx >= VHU_MAX_FDS || m->fds_borrowed)
                return -1;
        return VHU_TAKE_FD(m->fds[idx]);
}

void vhu_msg_forget_fds(struct vhu_msg *m) {
        for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                m->fds[i] = -1;
        m->n_fds = 0;
}

void vhu_msg_own_fds(struct vhu_msg *m) {
        m->fds_borrowed = false;
}

size_t vhu_msg_wire_size(const struct vhu_msg *m) {
        return VHU_HEADER_SIZE + (size_t) m->hdr.size;
}

/* spec: "Virtio device config space" -- size bytes follow the 12-byte header. */
static const char *check_config(const uint8_t *p, uint32_t size) {
        uint32_t config_size;

        if (size < VHU_CONFIG_HEADER_SIZE)
                return "config payload shorter than its header";
        config_size = read_u32(p, 4);
        if (config_size > VHU_MAX_CONFIG_SIZE)
                return "config size larger than 256";
        if (size != VHU_CONFIG_HEADER_SIZE + config_size)
                return "config payload size does not match its size field";
        return NULL;
}

/* spec: "IOMMU support" -- the front-end sends updates and invalidations,
 * the back-end misses and access failures. */
static const char *check_iotlb(enum vhu_direction dir, const uint8_t *p) {
        uint8_t perm = p[offsetof(struct vhu_iotlb, perm)];
        uint8_t type = p[offsetof(struct vhu_iotlb, type)];

        if (perm > 3)
                return "IOTLB permission not one of none/read/write/read-write";
        if (dir == VHU_DIR_FRONTEND && type != VHU_IOTLB_UPDATE && type != VHU_IOTLB_INVALIDATE)
                return "front-end IOTLB message is neither update nor invalidate";
        if (dir == VHU_DIR_BACKEND && type != VHU_IOTLB_MISS && type != VHU_IOTLB_ACCESS_FAIL)
                return "back-end IOTLB message is neither miss nor access failure";
        return NULL;
}

static const char *check_frontend_shape(uint32_t request, const uint8_t *p, uint32_t size,
                                        unsigned n_fds) {
        uint32_t nregions;
        uint64_t v;

        switch (request) {
        case VHU_REQ_SET_MEM_TABLE:
                nregions = read_u32(p, 0);
                if (nregions < 1 || nregions > VHU_MEM_TABLE_MAX_REGIONS)
                        return "mem table nregions not in 1..8";
                if (size != 8 + nregions * sizeof(struct vhu_mem_region))
                        return "mem table payload size does not match nregions";
                if (n_fds != nregions)
                        return "mem table fd count does not match nregions";
                return NULL;

        case VHU_REQ_SET_VRING_KICK:
        case VHU_REQ_SET_VRING_CALL:
        case VHU_REQ_SET_VRING_ERR:
                /* spec: bits 0-7 the ring, bit 8 "invalid FD": no fd sent. */
                v = read_u64(p, 0);
                if (v & ~VRING_U64_ALLOWED)
                        return "vring fd u64 has bits beyond index and no-fd flag";
                if ((v & VHU_VRING_NOFD_MASK) && n_fds != 0)
                        return "vring fd message has an fd but the no-fd bit set";
                if (!(v & VHU_VRING_NOFD_MASK) && n_fds != 1)
                        return "vring fd message has no fd but the no-fd bit clear";
                return NULL;

        case VHU_REQ_GET_CONFIG:
        case VHU_REQ_SET_CONFIG:
                return check_config(p, size);

        case VHU_REQ_IOTLB_MSG:
                return check_iotlb(VHU_DIR_FRONTEND, p);

        case VHU_REQ_SET_VRING_ENDIAN:
                /* spec: 0 little-endian, 1 big-endian, "Other values are invalid". */
                if (read_u32(p, 4) > 1)
                        return "vring endianness not 0 or 1";
                return NULL;

        case VHU_REQ_VRING_KICK:
                /* spec: "The state.num field is currently reserved and must be set to 0." */
                if (read_u32(p, 4) != 0)
                        return "VRING_KICK num is reserved and must be 0";
                return NULL;

        case VHU_REQ_GET_VRING_BASE_SKIP_DRAIN:
                /* GET_VRING_BASE's payload: "num ... reserved and must be set to 0" */
                if (read_u32(p, 4) != 0)
                        return "GET_VRING_BASE_SKIP_DRAIN num is reserved and must be 0";
                return NULL;

        case VHU_REQ_SET_DEVICE_STATE_FD:
                if (read_u32(p, 0) > VHU_TRANSFER_LOAD)
                        return "device state transfer direction not save or load";
                if (read_u32(p, 4) != VHU_TRANSFER_PHASE_STOPPED)
                        return "device state transfer phase not stopped";
                return NULL;

        default:
                return NULL;
        }
}

static const char *check_backend_shape(uint32_t request, const uint8_t *p, unsigned n_fds) {
        uint64_t v;

        switch (request) {
        case VHU_BREQ_IOTLB_MSG:
                return check_iotlb(VHU_DIR_BACKEND, p);

        case VHU_BREQ_VRING_HOST_NOTIFIER_MSG:
                /* An fd registers a notifier; none (or the no-fd bit) removes it. */
                v = read_u64(p, 0);
                if (v & ~VRING_U64_ALLOWED)
                        return "host notifier u64 has bits beyond index and no-fd flag";
                if ((v & VHU_VRING_NOFD_MASK) && n_fds != 0)
                        return "host notifier has an fd but the no-fd bit set";
                return NULL;

        case VHU_BREQ_VRING_CALL:
        case VHU_BREQ_VRING_ERR:
                if (read_u32(p, 4) != 0)
                        return "in-band vring notification num is reserved and must be 0";
                return NULL;

        default:
                return NULL;
        }
}

/* Everything about a request that does not depend on negotiated features. */
static const char *check_request_shape(enum vhu_direction dir, const struct vhu_request_info *info,
                                       const uint8_t *p, uint32_t size, unsigned n_fds) {
        if (size < info->min_size || size > info->max_size)
                return "payload size not allowed for this request";
        if (n_fds < info->min_fds)
                return "request is missing its fd";
        if (n_fds > info->max_fds)
                return "request carries more fds than allowed";

        if (dir == VHU_DIR_FRONTEND)
                return check_frontend_shape(info->request, p, size, n_fds);
        return check_backend_shape(info->request, p, n_fds);
}

/* The implementation's limits, the same for requests and replies. */
static const char *check_limits(const struct vhu_msg *m) {
        if (m->hdr.size > VHU_MAX_PAYLOAD)
                return "payload larger than the implementation limit";
        if (m->n_fds > VHU_MAX_FDS)
                return "more fds than one message may carry";
        return NULL;
}

int vhu_validate_request(enum vhu_direction dir, uint64_t protocol_features,
                         const struct vhu_msg *m, const char **ret_why) {
        const struct vhu_request_info *info;
        const char *why;
        uint32_t flags = m->hdr.flags;

        info = vhu_request_info(dir, m->hdr.request);
        if (!info) {
                why = "unknown request";
                goto fail;
        }
        if ((flags & VHU_FLAG_VERSION_MASK) != VHU_VERSION) {
                why = "unsupported protocol version";
                goto fail;
        }
        if (flags & VHU_FLAG_REPLY) {
                why = "REPLY flag set on a request";
                goto fail;
        }
        if (flags & ~REQUEST_FLAGS_ALLOWED) {
                why = "unknown header flag bits";
                goto fail;
        }
        if ((why = check_limits(m)))
                goto fail;
        if (info->protocol_feature >= 0) {
                uint64_t need = VHU_PF_BIT(info->protocol_feature) |
                                vhu_protocol_feature_requires((unsigned) info->protocol_feature);

                if ((protocol_features & need) != need) {
                        why = "request needs a protocol feature that was not negotiated";
                        goto fail;
                }
        }

        why = check_request_shape(dir, info, m->payload.raw, m->hdr.size, m->n_fds);
        if (why)
                goto fail;

        /* spec: "Back-end communication" -- fds only with BACKEND_SEND_FD. */
        if (dir == VHU_DIR_BACKEND && m->n_fds > 0 &&
            !(protocol_features & VHU_PF_BIT(VHU_PF_BACKEND_SEND_FD))) {
                why = "back-end request carries fds but BACKEND_SEND_FD was not negotiated";
                goto fail;
        }
        /* spec: "Migration" -- with LOG_SHMFD the log memory fd is attached. */
        if (dir == VHU_DIR_FRONTEND && m->hdr.request == VHU_REQ_SET_LOG_BASE &&
            (protocol_features & VHU_PF_BIT(VHU_PF_LOG_SHMFD)) && m->n_fds != 1) {
                why = "SET_LOG_BASE with LOG_SHMFD needs exactly one fd";
                goto fail;
        }
        return 0;

fail:
        if (ret_why)
                *ret_why = why;
        return -EPROTO;
}

/* Whether the request is answered with its own payload rather than a REPLY_ACK. */
static bool has_own_reply(const struct vhu_request_info *info, uint64_t protocol_features) {
        return info->reply == VHU_REPLY_ALWAYS ||
               (info->reply == VHU_REPLY_IF_LOG_SHMFD &&
                (protocol_features & VHU_PF_BIT(VHU_PF_LOG_SHMFD)));
}

static bool acked(uint32_t request_flags, uint64_t protocol_features) {
        return (request_flags & VHU_FLAG_NEED_REPLY) &&
               (protocol_features & VHU_PF_BIT(VHU_PF_REPLY_ACK));
}

bool vhu_request_expects_reply(enum vhu_direction dir, uint32_t request, uint32_t flags,
                               uint64_t protocol_features) {
        const struct vhu_request_info *info = vhu_request_info(dir, request);

        if (!info)
                return false;
        return has_own_reply(info, protocol_features) || acked(flags, protocol_features);
}

/* spec GET_SHMEM_CONFIG: sizes indexed by shmid, nregions of them, each a
 * multiple of the page size (0: that shmid is unused). */
static const char *check_shmem_config(const uint8_t *p) {
        uint32_t nregions = read_u32(p, 0);

        if (nregions > VHU_MAX_SHMEM_REGIONS)
                return "shmem config nregions larger than 256";
        for (uint32_t i = 0; i < VHU_MAX_SHMEM_REGIONS; i++) {
                uint64_t size = read_u64(p, offsetof(struct vhu_shmem_config, memory_sizes) + 8 * i);

                if (i >= nregions && size != 0)
                        return "shmem config has a size beyond nregions";
                if (size % VHU_SHMEM_SIZE_ALIGN != 0)
                        return "shmem region size not a multiple of the page size";
        }
        return NULL;
}

static const char *check_frontend_reply(uint32_t request, const struct vhu_msg *r) {
        const uint8_t *p = r->payload.raw;
        uint32_t size = r->hdr.size;

        switch (request) {
        case VHU_REQ_GET_CONFIG:
                /* spec: a zero-length payload signals an error. */
                return size == 0 ? NULL : check_config(p, size);

        case VHU_REQ_SET_MEM_TABLE:
                /* A u64 ack, or (postcopy) the regions as the back-end mapped them. */
                if (size == sizeof(uint64_t))
                        return NULL;
                if ((size - 8) % sizeof(struct vhu_mem_region) != 0 ||
                    read_u32(p, 0) != (size - 8) / sizeof(struct vhu_mem_region))
                        return "postcopy mem table reply size does not match nregions";
                return NULL;

        case VHU_REQ_ADD_MEM_REG:
        case VHU_REQ_REM_MEM_REG:
                if (size != sizeof(uint64_t) && size != sizeof(struct vhu_mem_single))
                        return "mem region reply neither a u64 nor a region";
                return NULL;

        case VHU_REQ_GET_INFLIGHT_FD:
        case VHU_REQ_POSTCOPY_ADVISE:
                if (r->n_fds != 1)
                        return "reply must carry exactly one fd";
                return NULL;

        case VHU_REQ_GET_SHARED_OBJECT:
                if (size != sizeof(uint64_t) && size != sizeof(struct vhu_shared))
                        return "shared object reply neither a u64 nor a UUID";
                return NULL;

        case VHU_REQ_SET_DEVICE_STATE_FD:
                if ((read_u64(p, 0) & VHU_DEVICE_STATE_NOFD_MASK) && r->n_fds != 0)
                        return "device state reply has an fd but the no-fd bit set";
                return NULL;

        case VHU_REQ_GET_SHMEM_CONFIG:
                return check_shmem_config(p);

        default:
                return NULL;
        }
}

int vhu_validate_reply(enum vhu_direction dir, uint32_t request, uint32_t request_flags,
                       uint64_t protocol_features, const struct vhu_msg *reply,
                       const char **ret_why) {
        const struct vhu_request_info *info;
        uint32_t min_size, max_size;
        unsigned max_fds;
        const char *why;
        int r = -EPROTO;

        info = vhu_request_info(dir, request);
        if (!info) {
                r = -EINVAL;
                why = "reply validated against an unknown request";
                goto fail;
        }
        if (reply->hdr.flags != REPLY_FLAGS) {
                why = "reply flags are not exactly VERSION|REPLY";
                goto fail;
        }
        if (reply->hdr.request != request) {
                why = "reply answers a different request";
                goto fail;
        }
        if ((why = check_limits(reply)))
                goto fail;

        if (has_own_reply(info, protocol_features)) {
                min_size = info->reply_min_size;
                max_size = info->reply_max_size;
                max_fds = info->reply_max_fds;
        } else if (!acked(request_flags, protocol_features)) {
                why = "reply to a request that expects none";
                goto fail;
        } else if (info->reply == VHU_REPLY_ACK_ONLY) {
                min_size = info->reply_min_size;
                max_size = info->reply_max_size;
                max_fds = info->reply_max_fds;
        } else {
                /* SET_LOG_BASE without LOG_SHMFD: a plain REPLY_ACK. */
                min_size = max_size = sizeof(uint64_t);
                max_fds = 0;
        }

        if (reply->hdr.size < min_size || reply->hdr.size > max_size) {
                why = "reply payload size not allowed for this request";
                goto fail;
        }
        if (reply->n_fds > max_fds) {
                why = "reply carries more fds than allowed";
                goto fail;
        }
        if (dir == VHU_DIR_FRONTEND) {
                why = check_frontend_reply(request, reply);
                if (why)
                        goto fail;
        }
        return 0;

fail:
        if (ret_why)
                *ret_why = why;
        return r;
}

/* Fill m; the caller has checked everything. */
static void fill_msg(struct vhu_msg *m, uint32_t request, uint32_t flags, const void *payload,
                     uint32_t size, const int *fds, unsigned n_fds) {
        m->hdr.request = request;
        m->hdr.flags = flags;
        m->hdr.size = size;
        memset(m->payload.raw, 0, sizeof(m->payload.raw));
        if (size > 0)
                memcpy(m->payload.raw, payload, size);
        for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                m->fds[i] = i < n_fds ? fds[i] : -1;
        m->n_fds = n_fds;
        m->fds_borrowed = true;
}

static int check_buffers(const void *payload, uint32_t size, const int *fds, unsigned n_fds) {
        if (size > VHU_MAX_PAYLOAD || n_fds > VHU_MAX_FDS)
                return -EINVAL;
        if ((size > 0 && !payload) || (n_fds > 0 && !fds))
                return -EINVAL;
        for (unsigned i = 0; i < n_fds; i++)
                if (fds[i] < 0)
                        return -EINVAL;
        return 0;
}

int vhu_msg_build(struct vhu_msg *m, enum vhu_direction dir, uint32_t request,
                  bool need_reply, const void *payload, uint32_t size,
                  const int *fds, unsigned n_fds) {
        const struct vhu_request_info *info;
        int r;

        info = vhu_request_info(dir, request);
        if (!info)
                return -EOPNOTSUPP;
        r = check_buffers(payload, size, fds, n_fds);
        if (r < 0)
                return r;
        if (check_request_shape(dir, info, payload, size, n_fds))
                return -EINVAL;

        fill_msg(m, request, VHU_VERSION | (need_reply ? VHU_FLAG_NEED_REPLY : 0),
                 payload, size, fds, n_fds);
        return 0;
}

int vhu_msg_build_u64(struct vhu_msg *m, uint32_t request, bool need_reply, uint64_t value) {
        return vhu_msg_build(m, VHU_DIR_FRONTEND, request, need_reply,
                             &value, sizeof(value), NULL, 0);
}

int vhu_msg_build_none(struct vhu_msg *m, uint32_t request, bool need_reply) {
        return vhu_msg_build(m, VHU_DIR_FRONTEND, request, need_reply, NULL, 0, NULL, 0);
}

int vhu_msg_build_state(struct vhu_msg *m, uint32_t request, bool need_reply,
                        uint32_t index, uint32_t num) {
        struct vhu_vring_state state = { .index = index, .num = num };

        return vhu_msg_build(m, VHU_DIR_FRONTEND, request, need_reply,
                             &state, sizeof(state), NULL, 0);
}

int vhu_msg_build_vring_fd(struct vhu_msg *m, uint32_t request, bool need_reply,
                           uint32_t index, int fd) {
        uint64_t value = index;

        if (request != VHU_REQ_SET_VRING_KICK && request != VHU_REQ_SET_VRING_CALL &&
            request != VHU_REQ_SET_VRING_ERR)
                return -EINVAL;
        if (index > VHU_VRING_IDX_MASK)
                return -EINVAL;
        if (fd < 0)
                value |= VHU_VRING_NOFD_MASK;
        return vhu_msg_build(m, VHU_DIR_FRONTEND, request, need_reply, &value, sizeof(value),
                             fd < 0 ? NULL : &fd, fd < 0 ? 0 : 1);
}

int vhu_msg_build_vring_addr(struct vhu_msg *m, bool need_reply, const struct vhu_vring_addr *addr) {
        if (!addr)
                return -EINVAL;
        return vhu_msg_build(m, VHU_DIR_FRONTEND, VHU_REQ_SET_VRING_ADDR, need_reply,
                             addr, sizeof(*addr), NULL, 0);
}

int vhu_msg_build_mem_table(struct vhu_msg *m, bool need_reply,
                            const struct vhu_mem_region *regions, const int *fds, unsigned n) {
        struct vhu_mem_table table = { .nregions = n };

        if (n < 1 || n > VHU_MEM_TABLE_MAX_REGIONS || !regions || !fds)
                return -EINVAL;
        memcpy(table.regions, regions, n * sizeof(*regions));
        return vhu_msg_build(m, VHU_DIR_FRONTEND, VHU_REQ_SET_MEM_TABLE, need_reply,
                             &table, 8 + n * sizeof(*regions), fds, n);
}

int vhu_msg_build_mem_single(struct vhu_msg *m, uint32_t request, bool need_reply,
                             const struct vhu_mem_region *region, int fd) {
        struct vhu_mem_single single = { .padding = 0 };

        if (request != VHU_REQ_ADD_MEM_REG && request != VHU_REQ_REM_MEM_REG)
                return -EINVAL;
        if (!region)
                return -EINVAL;
        single.region = *region;
        return vhu_msg_build(m, VHU_DIR_FRONTEND, request, need_reply, &single, sizeof(single),
                             fd < 0 ? NULL : &fd, fd < 0 ? 0 : 1);
}

int vhu_msg_build_config(struct vhu_msg *m, uint32_t request, bool need_reply,
                         uint32_t offset, uint32_t size, uint32_t flags, const void *data) {
        struct vhu_config config = { .offset = offset, .size = size, .flags = flags };

        if (request != VHU_REQ_GET_CONFIG && request != VHU_REQ_SET_CONFIG)
                return -EINVAL;
        if (size > VHU_MAX_CONFIG_SIZE)
                return -EINVAL;
        if (data && size > 0)
                memcpy(config.data, data, size);
        return vhu_msg_build(m, VHU_DIR_FRONTEND, request, need_reply,
                             &config, VHU_CONFIG_HEADER_SIZE + size, NULL, 0);
}

int vhu_msg_build_postcopy_mem_ack(struct vhu_msg *m, bool need_reply) {
        uint64_t ok = 0;

        /* not a table: vhu_msg_build() would rightly refuse its shape */
        fill_msg(m, VHU_REQ_SET_MEM_TABLE, VHU_VERSION | (need_reply ? VHU_FLAG_NEED_REPLY : 0),
                 &ok, sizeof(ok), NULL, 0);
        return 0;
}

int vhu_msg_build_reply(struct vhu_msg *r, const struct vhu_msg *request,
                        const void *payload, uint32_t size, const int *fds, unsigned n_fds) {
        int ret;

        ret = check_buffers(payload, size, fds, n_fds);
        if (ret < 0)
                return ret;
        fill_msg(r, request->hdr.request, REPLY_FLAGS, payload, size, fds, n_fds);
        return 0;
}

int vhu_msg_build_reply_u64(struct vhu_msg *r, const struct vhu_msg *request, uint64_t value) {
        return vhu_msg_build_reply(r, request, &value, sizeof(value), NULL, 0);
}

int vhu_msg_decode(struct vhu_msg *m, const void *buf, size_t len) {
        struct vhu_header hdr;
        const uint8_t *bytes = buf;

        if (len < VHU_HEADER_SIZE)
                return -EAGAIN;
        memcpy(&hdr, bytes, sizeof(hdr));
        if (hdr.size > VHU_MAX_PAYLOAD)
                return -EPROTO;
        if (len - VHU_HEADER_SIZE < hdr.size)
                return -EAGAIN;

        /* fds travel out of band: the socket reader attaches them. */
        m->hdr = hdr;
        memset(m->payload.raw, 0, sizeof(m->payload.raw));
        memcpy(m->payload.raw, bytes + VHU_HEADER_SIZE, hdr.size);
        return (int) (VHU_HEADER_SIZE + hdr.size);
}

size_t vhu_msg_encode(const struct vhu_msg *m, void *buf, size_t len) {
        uint8_t *bytes = buf;
        size_t need;

        if (m->hdr.size > VHU_MAX_PAYLOAD)
                return 0;
        need = vhu_msg_wire_size(m);
        if (len < need)
                return 0;
        memcpy(bytes, &m->hdr, VHU_HEADER_SIZE);
        memcpy(bytes + VHU_HEADER_SIZE, m->payload.raw, m->hdr.size);
        return need;
}
