/* SPDX-License-Identifier: MIT */
/*
 * What every vhost-user request may carry: payload sizes, fd counts, how it
 * is answered and the protocol feature it needs.  Sources: QEMU's
 * docs/interop/vhost-user.rst ("Front-end message types", "Back-end message
 * types") plus what real back-ends do (docs/protocol-coverage.md names
 * the back-ends each request is tested with).
 * Request-specific rules that a size range cannot express (nregions vs size,
 * "no fd" bits, config size) live in vhu-message.c.
 */
#include <stdbool.h>
#include <stddef.h>

#include "vhu-message.h"

#define NO_PF (-1)

/* Replies that are only a REPLY_ACK u64: 8 bytes, no fds. */
#define ACK VHU_REPLY_ACK_ONLY, 8, 8, 0

/* Expand ACK into its four fields before counting arguments. */
#define ENTRY(...) ENTRY_(__VA_ARGS__)
#define ENTRY_(_req, _name, _min, _max, _minfds, _maxfds, _kind, _rmin, _rmax, _rfds, _pf) \
        [_req] = {                                                      \
                .request = (_req),                                      \
                .name = (_name),                                        \
                .min_size = (_min),                                     \
                .max_size = (_max),                                     \
                .min_fds = (_minfds),                                   \
                .max_fds = (_maxfds),                                   \
                .reply = (_kind),                                       \
                .reply_min_size = (_rmin),                              \
                .reply_max_size = (_rmax),                              \
                .reply_max_fds = (_rfds),                               \
                .protocol_feature = (_pf),                              \
        }

#define U64   sizeof(uint64_t)
#define STATE sizeof(struct vhu_vring_state)
#define MEM_TABLE_MIN (8 + sizeof(struct vhu_mem_region))
#define MEM_TABLE_MAX sizeof(struct vhu_mem_table)
#define CONFIG_MIN VHU_CONFIG_HEADER_SIZE
#define CONFIG_MAX sizeof(struct vhu_config)

static const struct vhu_request_info frontend_requests[_VHU_REQ_MAX] = {
        ENTRY(VHU_REQ_GET_FEATURES, "GET_FEATURES",
              0, 0, 0, 0, VHU_REPLY_ALWAYS, U64, U64, 0, NO_PF),
        ENTRY(VHU_REQ_SET_FEATURES, "SET_FEATURES",
              U64, U64, 0, 0, ACK, NO_PF),
        ENTRY(VHU_REQ_SET_OWNER, "SET_OWNER",
              0, 0, 0, 0, ACK, NO_PF),
        ENTRY(VHU_REQ_RESET_OWNER, "RESET_OWNER",
              0, 0, 0, 0, ACK, NO_PF),
        /* spec: in postcopy mode the back-end answers with the table of its
         * mappings instead of a u64, so the reply may be shaped like the
         * request (8 + 32 * n bytes). */
        ENTRY(VHU_REQ_SET_MEM_TABLE, "SET_MEM_TABLE",
              MEM_TABLE_MIN, MEM_TABLE_MAX, 1, VHU_MEM_TABLE_MAX_REGIONS,
              VHU_REPLY_ACK_ONLY, U64, MEM_TABLE_MAX, 0, NO_PF),
        /* The reply with LOG_SHMFD: libvhost-user sends a u64, DPDK an empty
         * payload; accept both. */
        ENTRY(VHU_REQ_SET_LOG_BASE, "SET_LOG_BASE",
              sizeof(struct vhu_log), sizeof(struct vhu_log), 0, 1,
              VHU_REPLY_IF_LOG_SHMFD, 0, U64, 0, NO_PF),
        ENTRY(VHU_REQ_SET_LOG_FD, "SET_LOG_FD",
              0, 0, 1, 1, ACK, NO_PF),
        ENTRY(VHU_REQ_SET_VRING_NUM, "SET_VRING_NUM",
              STATE, STATE, 0, 0, ACK, NO_PF),
        ENTRY(VHU_REQ_SET_VRING_ADDR, "SET_VRING_ADDR",
              sizeof(struct vhu_vring_addr), sizeof(struct vhu_vring_addr), 0, 0, ACK, NO_PF),
        ENTRY(VHU_REQ_SET_VRING_BASE, "SET_VRING_BASE",
              STATE, STATE, 0, 0, ACK, NO_PF),
        ENTRY(VHU_REQ_GET_VRING_BASE, "GET_VRING_BASE",
              STATE, STATE, 0, 0, VHU_REPLY_ALWAYS, STATE, STATE, 0, NO_PF),
        ENTRY(VHU_REQ_SET_VRING_KICK, "SET_VRING_KICK",
              U64, U64, 0, 1, ACK, NO_PF),
        ENTRY(VHU_REQ_SET_VRING_CALL, "SET_VRING_CALL",
              U64, U64, 0, 1, ACK, NO_PF),
        ENTRY(VHU_REQ_SET_VRING_ERR, "SET_VRING_ERR",
              U64, U64, 0, 1, ACK, NO_PF),
        /* Needs the virtio bit VHU_F_PROTOCOL_FEATURES, not a protocol feature. */
        ENTRY(VHU_REQ_GET_PROTOCOL_FEATURES, "GET_PROTOCOL_FEATURES",
              0, 0, 0, 0, VHU_REPLY_ALWAYS, U64, U64, 0, NO_PF),
        ENTRY(VHU_REQ_SET_PROTOCOL_FEATURES, "SET_PROTOCOL_FEATURES",
              U64, U64, 0, 0, ACK, NO_PF),
        ENTRY(VHU_REQ_GET_QUEUE_NUM, "GET_QUEUE_NUM",
              0, 0, 0, 0, VHU_REPLY_ALWAYS, U64, U64, 0, VHU_PF_MQ),
        ENTRY(VHU_REQ_SET_VRING_ENABLE, "SET_VRING_ENABLE",
              STATE, STATE, 0, 0, ACK, NO_PF),
        ENTRY(VHU_REQ_SEND_RARP, "SEND_RARP",
              U64, U64, 0, 0, ACK, VHU_PF_RARP),
        ENTRY(VHU_REQ_NET_SET_MTU, "NET_SET_MTU",
              U64, U64, 0, 0, ACK, VHU_PF_NET_MTU),
        ENTRY(VHU_REQ_SET_BACKEND_REQ_FD, "SET_BACKEND_REQ_FD",
              0, 0, 1, 1, ACK, VHU_PF_BACKEND_REQ),
        /* spec says the back-end "has to acknowledge" with a u64, but DPDK
         * only answers when NEED_REPLY is set (QEMU always sets it). */
        ENTRY(VHU_REQ_IOTLB_MSG, "IOTLB_MSG",
              sizeof(struct vhu_iotlb), sizeof(struct vhu_iotlb), 0, 0, ACK, NO_PF),
        ENTRY(VHU_REQ_SET_VRING_ENDIAN, "SET_VRING_ENDIAN",
              STATE, STATE, 0, 0, ACK, VHU_PF_CROSS_ENDIAN),
        /* spec: a zero-length reply payload means error. */
        ENTRY(VHU_REQ_GET_CONFIG, "GET_CONFIG",
              CONFIG_MIN, CONFIG_MAX, 0, 0, VHU_REPLY_ALWAYS, 0, CONFIG_MAX, 0, VHU_PF_CONFIG),
        ENTRY(VHU_REQ_SET_CONFIG, "SET_CONFIG",
              CONFIG_MIN, CONFIG_MAX, 0, 0, ACK, VHU_PF_CONFIG),
        /* The crypto session description changed size between QEMU and DPDK
         * versions; only bound it. */
        ENTRY(VHU_REQ_CREATE_CRYPTO_SESSION, "CREATE_CRYPTO_SESSION",
              U64, VHU_MAX_PAYLOAD, 0, 0, VHU_REPLY_ALWAYS, U64, VHU_MAX_PAYLOAD, 0,
              VHU_PF_CRYPTO_SESSION),
        ENTRY(VHU_REQ_CLOSE_CRYPTO_SESSION, "CLOSE_CRYPTO_SESSION",
              U64, U64, 0, 0, ACK, VHU_PF_CRYPTO_SESSION),
        /* Reply: no payload, the userfaultfd attached. */
        ENTRY(VHU_REQ_POSTCOPY_ADVISE, "POSTCOPY_ADVISE",
              0, 0, 0, 0, VHU_REPLY_ALWAYS, 0, 0, 1, VHU_PF_PAGEFAULT),
        ENTRY(VHU_REQ_POSTCOPY_LISTEN, "POSTCOPY_LISTEN",
              0, 0, 0, 0, ACK, VHU_PF_PAGEFAULT),
        ENTRY(VHU_REQ_POSTCOPY_END, "POSTCOPY_END",
              0, 0, 0, 0, VHU_REPLY_ALWAYS, U64, U64, 0, VHU_PF_PAGEFAULT),
        ENTRY(VHU_REQ_GET_INFLIGHT_FD, "GET_INFLIGHT_FD",
              sizeof(struct vhu_inflight), sizeof(struct vhu_inflight), 0, 0,
              VHU_REPLY_ALWAYS, sizeof(struct vhu_inflight), sizeof(struct vhu_inflight), 1,
              VHU_PF_INFLIGHT_SHMFD),
        ENTRY(VHU_REQ_SET_INFLIGHT_FD, "SET_INFLIGHT_FD",
              sizeof(struct vhu_inflight), sizeof(struct vhu_inflight), 1, 1, ACK,
              VHU_PF_INFLIGHT_SHMFD),
        ENTRY(VHU_REQ_GPU_SET_SOCKET, "GPU_SET_SOCKET",
              0, 0, 1, 1, ACK, NO_PF),
        ENTRY(VHU_REQ_RESET_DEVICE, "RESET_DEVICE",
              0, 0, 0, 0, ACK, VHU_PF_RESET_DEVICE),
        ENTRY(VHU_REQ_VRING_KICK, "VRING_KICK",
              STATE, STATE, 0, 0, ACK, VHU_PF_INBAND_NOTIFICATIONS),
        ENTRY(VHU_REQ_GET_MAX_MEM_SLOTS, "GET_MAX_MEM_SLOTS",
              0, 0, 0, 0, VHU_REPLY_ALWAYS, U64, U64, 0, VHU_PF_CONFIGURE_MEM_SLOTS),
        /* Postcopy: the reply may be the region itself (40 bytes). */
        ENTRY(VHU_REQ_ADD_MEM_REG, "ADD_MEM_REG",
              sizeof(struct vhu_mem_single), sizeof(struct vhu_mem_single), 1, 1,
              VHU_REPLY_ACK_ONLY, U64, sizeof(struct vhu_mem_single), 0,
              VHU_PF_CONFIGURE_MEM_SLOTS),
        /* spec: no fd SHOULD be sent; one MAY be accepted (and closed). */
        ENTRY(VHU_REQ_REM_MEM_REG, "REM_MEM_REG",
              sizeof(struct vhu_mem_single), sizeof(struct vhu_mem_single), 0, 1,
              VHU_REPLY_ACK_ONLY, U64, sizeof(struct vhu_mem_single), 0,
              VHU_PF_CONFIGURE_MEM_SLOTS),
        ENTRY(VHU_REQ_SET_STATUS, "SET_STATUS",
              U64, U64, 0, 0, ACK, VHU_PF_STATUS),
        ENTRY(VHU_REQ_GET_STATUS, "GET_STATUS",
              0, 0, 0, 0, VHU_REPLY_ALWAYS, U64, U64, 0, VHU_PF_STATUS),
        /* The spec names only the fd; libvhost-user echoes the UUID as the
         * payload, others send a u64. */
        ENTRY(VHU_REQ_GET_SHARED_OBJECT, "GET_SHARED_OBJECT",
              sizeof(struct vhu_shared), sizeof(struct vhu_shared), 0, 0,
              VHU_REPLY_ALWAYS, U64, sizeof(struct vhu_shared), 1, VHU_PF_SHARED_OBJECT),
        ENTRY(VHU_REQ_SET_DEVICE_STATE_FD, "SET_DEVICE_STATE_FD",
              sizeof(struct vhu_device_state), sizeof(struct vhu_device_state), 1, 1,
              VHU_REPLY_ALWAYS, U64, U64, 1, VHU_PF_DEVICE_STATE),
        ENTRY(VHU_REQ_CHECK_DEVICE_STATE, "CHECK_DEVICE_STATE",
              0, 0, 0, 0, VHU_REPLY_ALWAYS, U64, U64, 0, VHU_PF_DEVICE_STATE),
        ENTRY(VHU_REQ_GET_SHMEM_CONFIG, "GET_SHMEM_CONFIG",
              0, 0, 0, 0, VHU_REPLY_ALWAYS,
              sizeof(struct vhu_shmem_config), sizeof(struct vhu_shmem_config), 0,
              VHU_PF_SHMEM),
        /* GET_VRING_BASE's payload and reply; the feature's prerequisites
         * (GET_VRING_BASE_INFLIGHT, INFLIGHT_SHMFD) are in
         * vhu_protocol_feature_requires(). */
        ENTRY(VHU_REQ_GET_VRING_BASE_SKIP_DRAIN, "GET_VRING_BASE_SKIP_DRAIN",
              STATE, STATE, 0, 0, VHU_REPLY_ALWAYS, STATE, STATE, 0,
              VHU_PF_GET_VRING_BASE_SKIP_DRAIN),
};

/*
 * Back-end requests travel on the BACKEND_REQ channel; the fd counts here are
 * the most the request may carry, and vhu_validate_request() additionally
 * requires BACKEND_SEND_FD for any fd at all.
 */
static const struct vhu_request_info backend_requests[_VHU_BREQ_MAX] = {
        ENTRY(VHU_BREQ_IOTLB_MSG, "IOTLB_MSG",
              sizeof(struct vhu_iotlb), sizeof(struct vhu_iotlb), 0, 0, ACK, VHU_PF_BACKEND_REQ),
        ENTRY(VHU_BREQ_CONFIG_CHANGE_MSG, "CONFIG_CHANGE_MSG",
              0, 0, 0, 0, ACK, VHU_PF_CONFIG),
        ENTRY(VHU_BREQ_VRING_HOST_NOTIFIER_MSG, "VRING_HOST_NOTIFIER_MSG",
              sizeof(struct vhu_vring_area), sizeof(struct vhu_vring_area), 0, 1, ACK,
              VHU_PF_HOST_NOTIFIER),
        ENTRY(VHU_BREQ_VRING_CALL, "VRING_CALL",
              STATE, STATE, 0, 0, ACK, VHU_PF_INBAND_NOTIFICATIONS),
        ENTRY(VHU_BREQ_VRING_ERR, "VRING_ERR",
              STATE, STATE, 0, 0, ACK, VHU_PF_INBAND_NOTIFICATIONS),
        ENTRY(VHU_BREQ_SHARED_OBJECT_ADD, "SHARED_OBJECT_ADD",
              sizeof(struct vhu_shared), sizeof(struct vhu_shared), 0, 0, ACK,
              VHU_PF_SHARED_OBJECT),
        ENTRY(VHU_BREQ_SHARED_OBJECT_REMOVE, "SHARED_OBJECT_REMOVE",
              sizeof(struct vhu_shared), sizeof(struct vhu_shared), 0, 0, ACK,
              VHU_PF_SHARED_OBJECT),
        /* libvhost-user always sets NEED_REPLY and waits for u64 + fd. */
        ENTRY(VHU_BREQ_SHARED_OBJECT_LOOKUP, "SHARED_OBJECT_LOOKUP",
              sizeof(struct vhu_shared), sizeof(struct vhu_shared), 0, 0,
              VHU_REPLY_ALWAYS, U64, U64, 1, VHU_PF_SHARED_OBJECT),
        ENTRY(VHU_BREQ_SHMEM_MAP, "SHMEM_MAP",
              sizeof(struct vhu_shmem_map), sizeof(struct vhu_shmem_map), 1, 1, ACK,
              VHU_PF_SHMEM),
        ENTRY(VHU_BREQ_SHMEM_UNMAP, "SHMEM_UNMAP",
              sizeof(struct vhu_shmem_map), sizeof(struct vhu_shmem_map), 0, 0, ACK,
              VHU_PF_SHMEM),
};

static const char *const protocol_feature_names[_VHU_PF_MAX] = {
        [VHU_PF_MQ]                        = "MQ",
        [VHU_PF_LOG_SHMFD]                 = "LOG_SHMFD",
        [VHU_PF_RARP]                      = "RARP",
        [VHU_PF_REPLY_ACK]                 = "REPLY_ACK",
        [VHU_PF_NET_MTU]                   = "NET_MTU",
        [VHU_PF_BACKEND_REQ]               = "BACKEND_REQ",
        [VHU_PF_CROSS_ENDIAN]              = "CROSS_ENDIAN",
        [VHU_PF_CRYPTO_SESSION]            = "CRYPTO_SESSION",
        [VHU_PF_PAGEFAULT]                 = "PAGEFAULT",
        [VHU_PF_CONFIG]                    = "CONFIG",
        [VHU_PF_BACKEND_SEND_FD]           = "BACKEND_SEND_FD",
        [VHU_PF_HOST_NOTIFIER]             = "HOST_NOTIFIER",
        [VHU_PF_INFLIGHT_SHMFD]            = "INFLIGHT_SHMFD",
        [VHU_PF_RESET_DEVICE]              = "RESET_DEVICE",
        [VHU_PF_INBAND_NOTIFICATIONS]      = "INBAND_NOTIFICATIONS",
        [VHU_PF_CONFIGURE_MEM_SLOTS]       = "CONFIGURE_MEM_SLOTS",
        [VHU_PF_STATUS]                    = "STATUS",
        [VHU_PF_XEN_MMAP]                  = "XEN_MMAP",
        [VHU_PF_SHARED_OBJECT]             = "SHARED_OBJECT",
        [VHU_PF_DEVICE_STATE]              = "DEVICE_STATE",
        [VHU_PF_GET_VRING_BASE_INFLIGHT]   = "GET_VRING_BASE_INFLIGHT",
        [VHU_PF_GPA_ADDRESSES]             = "GPA_ADDRESSES",
        [VHU_PF_SHMEM]                     = "SHMEM",
        [VHU_PF_GET_VRING_BASE_SKIP_DRAIN] = "GET_VRING_BASE_SKIP_DRAIN",
};

uint64_t vhu_protocol_feature_requires(unsigned bit) {
        switch (bit) {
        case VHU_PF_INBAND_NOTIFICATIONS:
                /* spec "In-band notifications": "an error to negotiate this
                 * feature without" BACKEND_REQ and REPLY_ACK */
                return VHU_PF_BIT(VHU_PF_BACKEND_REQ) | VHU_PF_BIT(VHU_PF_REPLY_ACK);
        case VHU_PF_GET_VRING_BASE_INFLIGHT:
                /* spec GET_VRING_BASE: "must only be negotiated if
                 * INFLIGHT_SHMFD is also negotiated" */
                return VHU_PF_BIT(VHU_PF_INFLIGHT_SHMFD);
        case VHU_PF_GET_VRING_BASE_SKIP_DRAIN:
                /* suspended requests are recorded in the inflight region */
                return VHU_PF_BIT(VHU_PF_GET_VRING_BASE_INFLIGHT) |
                       VHU_PF_BIT(VHU_PF_INFLIGHT_SHMFD);
        default:
                return 0;
        }
}

uint64_t vhu_protocol_features_consistent(uint64_t pf) {
        bool changed = true;

        /* a dropped bit may be another's prerequisite: repeat until stable */
        while (changed) {
                changed = false;
                for (unsigned bit = 0; bit < 64; bit++) {
                        uint64_t need = vhu_protocol_feature_requires(bit);

                        if ((pf & VHU_PF_BIT(bit)) && (pf & need) != need) {
                                pf &= ~VHU_PF_BIT(bit);
                                changed = true;
                        }
                }
        }
        return pf;
}

const struct vhu_request_info *vhu_request_info(enum vhu_direction dir, uint32_t request) {
        const struct vhu_request_info *info = NULL;

        if (dir == VHU_DIR_FRONTEND && request < _VHU_REQ_MAX)
                info = &frontend_requests[request];
        else if (dir == VHU_DIR_BACKEND && request < _VHU_BREQ_MAX)
                info = &backend_requests[request];

        /* Holes (request 0) have no name. */
        if (info && !info->name)
                info = NULL;
        return info;
}

const char *vhu_request_name(enum vhu_direction dir, uint32_t request) {
        const struct vhu_request_info *info = vhu_request_info(dir, request);

        return info ? info->name : "UNKNOWN";
}

const char *vhu_protocol_feature_name(unsigned bit) {
        if (bit >= _VHU_PF_MAX)
                return NULL;
        return protocol_feature_names[bit];
}
