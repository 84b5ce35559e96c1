/* SPDX-License-Identifier: MIT */
/*
 * The vhost-user wire format: request numbers, feature bits, header flags and
 * payload layouts, as described by QEMU's docs/interop/vhost-user.rst
 * ("Message Specification", "Front-end message types", "Back-end message
 * types", "Protocol features").  Numbers travel in host byte order.
 *
 * This header has no dependency beyond libc: protocol/ knows nothing of the
 * daemon, of JSON or of any event loop.
 */
#pragma once

#include <stdint.h>

/* Header flags. */
#define VHU_FLAG_VERSION_MASK  0x3u
#define VHU_VERSION            0x1u
#define VHU_FLAG_REPLY         0x4u
#define VHU_FLAG_NEED_REPLY    0x8u

/* Front-end requests (front-end -> back-end), spec "Front-end message types". */
enum vhu_request {
        VHU_REQ_NONE                     = 0,
        VHU_REQ_GET_FEATURES             = 1,
        VHU_REQ_SET_FEATURES             = 2,
        VHU_REQ_SET_OWNER                = 3,
        VHU_REQ_RESET_OWNER              = 4,
        VHU_REQ_SET_MEM_TABLE            = 5,
        VHU_REQ_SET_LOG_BASE             = 6,
        VHU_REQ_SET_LOG_FD               = 7,
        VHU_REQ_SET_VRING_NUM            = 8,
        VHU_REQ_SET_VRING_ADDR           = 9,
        VHU_REQ_SET_VRING_BASE           = 10,
        VHU_REQ_GET_VRING_BASE           = 11,
        VHU_REQ_SET_VRING_KICK           = 12,
        VHU_REQ_SET_VRING_CALL           = 13,
        VHU_REQ_SET_VRING_ERR            = 14,
        VHU_REQ_GET_PROTOCOL_FEATURES    = 15,
        VHU_REQ_SET_PROTOCOL_FEATURES    = 16,
        VHU_REQ_GET_QUEUE_NUM            = 17,
        VHU_REQ_SET_VRING_ENABLE         = 18,
        VHU_REQ_SEND_RARP                = 19,
        VHU_REQ_NET_SET_MTU              = 20,
        VHU_REQ_SET_BACKEND_REQ_FD       = 21,
        VHU_REQ_IOTLB_MSG                = 22,
        VHU_REQ_SET_VRING_ENDIAN         = 23,
        VHU_REQ_GET_CONFIG               = 24,
        VHU_REQ_SET_CONFIG               = 25,
        VHU_REQ_CREATE_CRYPTO_SESSION    = 26,
        VHU_REQ_CLOSE_CRYPTO_SESSION     = 27,
        VHU_REQ_POSTCOPY_ADVISE          = 28,
        VHU_REQ_POSTCOPY_LISTEN          = 29,
        VHU_REQ_POSTCOPY_END             = 30,
        VHU_REQ_GET_INFLIGHT_FD          = 31,
        VHU_REQ_SET_INFLIGHT_FD          = 32,
        VHU_REQ_GPU_SET_SOCKET           = 33,
        VHU_REQ_RESET_DEVICE             = 34,
        VHU_REQ_VRING_KICK               = 35,
        VHU_REQ_GET_MAX_MEM_SLOTS        = 36,
        VHU_REQ_ADD_MEM_REG              = 37,
        VHU_REQ_REM_MEM_REG              = 38,
        VHU_REQ_SET_STATUS               = 39,
        VHU_REQ_GET_STATUS               = 40,
        VHU_REQ_GET_SHARED_OBJECT        = 41,
        VHU_REQ_SET_DEVICE_STATE_FD      = 42,
        VHU_REQ_CHECK_DEVICE_STATE       = 43,
        VHU_REQ_GET_SHMEM_CONFIG         = 44,
        /* Same payload as GET_VRING_BASE; the back-end suspends in-flight
         * requests into the inflight region instead of draining them. */
        VHU_REQ_GET_VRING_BASE_SKIP_DRAIN = 45, /* the last one assigned */
        _VHU_REQ_MAX,
};

/* Back-end requests (back-end -> front-end, on the SET_BACKEND_REQ_FD channel). */
enum vhu_backend_request {
        VHU_BREQ_NONE                    = 0,
        VHU_BREQ_IOTLB_MSG               = 1,
        VHU_BREQ_CONFIG_CHANGE_MSG       = 2,
        VHU_BREQ_VRING_HOST_NOTIFIER_MSG = 3,
        VHU_BREQ_VRING_CALL              = 4,
        VHU_BREQ_VRING_ERR               = 5,
        VHU_BREQ_SHARED_OBJECT_ADD       = 6,
        VHU_BREQ_SHARED_OBJECT_REMOVE    = 7,
        VHU_BREQ_SHARED_OBJECT_LOOKUP    = 8,
        VHU_BREQ_SHMEM_MAP               = 9,
        VHU_BREQ_SHMEM_UNMAP             = 10,
        _VHU_BREQ_MAX,
};

/* Protocol feature bits (GET/SET_PROTOCOL_FEATURES), spec "Protocol features". */
enum vhu_protocol_feature {
        VHU_PF_MQ                        = 0,
        VHU_PF_LOG_SHMFD                 = 1,
        VHU_PF_RARP                      = 2,
        VHU_PF_REPLY_ACK                 = 3,
        VHU_PF_NET_MTU                   = 4,
        VHU_PF_BACKEND_REQ               = 5,
        VHU_PF_CROSS_ENDIAN              = 6,
        VHU_PF_CRYPTO_SESSION            = 7,
        VHU_PF_PAGEFAULT                 = 8,
        VHU_PF_CONFIG                    = 9,
        VHU_PF_BACKEND_SEND_FD           = 10,
        VHU_PF_HOST_NOTIFIER             = 11,
        VHU_PF_INFLIGHT_SHMFD            = 12,
        VHU_PF_RESET_DEVICE              = 13,
        VHU_PF_INBAND_NOTIFICATIONS      = 14,
        VHU_PF_CONFIGURE_MEM_SLOTS       = 15,
        VHU_PF_STATUS                    = 16,
        VHU_PF_XEN_MMAP                  = 17,
        VHU_PF_SHARED_OBJECT             = 18,
        VHU_PF_DEVICE_STATE              = 19,
        VHU_PF_GET_VRING_BASE_INFLIGHT   = 20,
        VHU_PF_GPA_ADDRESSES             = 21,
        VHU_PF_SHMEM                     = 22,
        VHU_PF_GET_VRING_BASE_SKIP_DRAIN = 23,
        _VHU_PF_MAX,
};

#define VHU_PF_BIT(f) (UINT64_C(1) << (f))

/* Virtio feature bits the front-end itself cares about. */
#define VHU_VIRTIO_F_NOTIFY_ON_EMPTY       24
#define VHU_VIRTIO_F_LOG_ALL               26 /* VHOST_F_LOG_ALL */
#define VHU_VIRTIO_F_INDIRECT_DESC         28
#define VHU_VIRTIO_F_EVENT_IDX             29
#define VHU_F_PROTOCOL_FEATURES            30 /* vhost-user's own bit */
#define VHU_VIRTIO_F_VERSION_1             32
#define VHU_VIRTIO_F_ACCESS_PLATFORM       33
#define VHU_VIRTIO_F_RING_PACKED           34
#define VHU_VIRTIO_F_IN_ORDER              35

/* Virtio device status bits (SET_STATUS). */
#define VHU_STATUS_ACKNOWLEDGE  0x01u
#define VHU_STATUS_DRIVER       0x02u
#define VHU_STATUS_DRIVER_OK    0x04u
#define VHU_STATUS_FEATURES_OK  0x08u

/* In the u64 of SET_VRING_KICK/CALL/ERR: ring index and "no fd" flag. */
#define VHU_VRING_IDX_MASK      0xffu
#define VHU_VRING_NOFD_MASK     (UINT64_C(1) << 8)

/* In the flags of SET_VRING_ADDR. */
#define VHU_VRING_F_LOG         0x1u

/* SET_MEM_TABLE holds at most this many regions (and fds). */
#define VHU_MEM_TABLE_MAX_REGIONS 8
/* At most this many fds travel with one message, either direction. */
#define VHU_MAX_FDS             8
/* GET_CONFIG / SET_CONFIG carry at most this much config space. */
#define VHU_MAX_CONFIG_SIZE     256
/* VIRTIO shared memory regions one GET_SHMEM_CONFIG reply can describe. */
#define VHU_MAX_SHMEM_REGIONS   256
/* spec: a region's size is a multiple of the page size; every Linux page
 * size is a multiple of this one. */
#define VHU_SHMEM_SIZE_ALIGN    4096u
/* The largest payload this implementation accepts in either direction. */
#define VHU_MAX_PAYLOAD         4096
#define VHU_HEADER_SIZE         12
/* Dirty log granularity (VHOST_LOG_PAGE). */
#define VHU_LOG_PAGE            4096u

/* SET_CONFIG flags. */
#define VHU_CONFIG_FLAG_WRITABLE      0u
#define VHU_CONFIG_FLAG_MIGRATION     1u

/* SET_DEVICE_STATE_FD direction / phase, and the "no fd" bit in its reply. */
#define VHU_TRANSFER_SAVE            0u
#define VHU_TRANSFER_LOAD            1u
#define VHU_TRANSFER_PHASE_STOPPED   0u
#define VHU_DEVICE_STATE_NOFD_MASK   (UINT64_C(1) << 8)

/* IOTLB message types and permissions. */
#define VHU_IOTLB_MISS          1u
#define VHU_IOTLB_UPDATE        2u
#define VHU_IOTLB_INVALIDATE    3u
#define VHU_IOTLB_ACCESS_FAIL   4u

/* SHMEM_MAP flags. */
#define VHU_SHMEM_MAP_F_WRITABLE (UINT64_C(1) << 0)

struct vhu_header {
        uint32_t request;
        uint32_t flags;
        uint32_t size;
} __attribute__((packed));

struct vhu_vring_state {
        uint32_t index;
        uint32_t num;
};

struct vhu_vring_addr {
        uint32_t index;
        uint32_t flags;
        uint64_t desc;
        uint64_t used;
        uint64_t avail;
        uint64_t log;
};

struct vhu_mem_region {
        uint64_t gpa;
        uint64_t size;
        uint64_t uaddr;
        uint64_t mmap_offset;
};

struct vhu_mem_table {
        uint32_t nregions;
        uint32_t padding;
        struct vhu_mem_region regions[VHU_MEM_TABLE_MAX_REGIONS];
};

/* ADD_MEM_REG / REM_MEM_REG: "Single memory region description". */
struct vhu_mem_single {
        uint64_t padding;
        struct vhu_mem_region region;
};

struct vhu_log {
        uint64_t mmap_size;
        uint64_t mmap_offset;
};

/* struct vhost_iotlb_msg: 8+8+8+1+1, padded to 32 on the wire. */
struct vhu_iotlb {
        uint64_t iova;
        uint64_t size;
        uint64_t uaddr;
        uint8_t perm;
        uint8_t type;
        uint8_t padding[6];
};

struct vhu_config {
        uint32_t offset;
        uint32_t size;
        uint32_t flags;
        uint8_t data[VHU_MAX_CONFIG_SIZE];
};
#define VHU_CONFIG_HEADER_SIZE 12

struct vhu_vring_area {
        uint64_t u64;
        uint64_t size;
        uint64_t offset;
};

/* "Inflight description": 20 bytes of fields, 24 on the wire (tail padding);
 * libvhost-user drops the connection on a 20-byte payload. */
struct vhu_inflight {
        uint64_t mmap_size;
        uint64_t mmap_offset;
        uint16_t num_queues;
        uint16_t queue_size;
        uint32_t padding;
};

struct vhu_shared {
        uint8_t uuid[16];
};

struct vhu_device_state {
        uint32_t direction;
        uint32_t phase;
};

struct vhu_shmem_map {
        uint8_t shmid;
        uint8_t padding[7];
        uint64_t fd_offset;
        uint64_t shm_offset;
        uint64_t len;
        uint64_t flags;
};

struct vhu_shmem_config {
        uint32_t nregions;
        uint32_t padding;
        uint64_t memory_sizes[VHU_MAX_SHMEM_REGIONS];
};

/* Inflight I/O tracking, split rings (spec "Inflight I/O tracking"). */
/* CREATE_CRYPTO_SESSION's "Crypto session description": a symmetric
 * session's virtio-crypto setup data and its keys, laid out as QEMU (up to
 * 7.2) and DPDK 22.11's rte_vhost send and read it.  The two u64 after the
 * small fields were the sender's own key pointers; they travel as zero.
 * The back-end answers with the same structure, session_id filled in
 * (negative: a virtio-crypto error). */
#define VHU_CRYPTO_MAX_CIPHER_KEY 64
#define VHU_CRYPTO_MAX_AUTH_KEY   512
struct vhu_crypto_session {
        int64_t session_id;
        uint32_t op_code;
        uint32_t cipher_alg;
        uint32_t cipher_key_len;
        uint32_t hash_alg;
        uint32_t hash_result_len;
        uint32_t auth_key_len;
        uint32_t aad_len;
        uint8_t op_type;
        uint8_t direction;
        uint8_t hash_mode;
        uint8_t alg_chain_order;
        uint64_t key_pointers[2];
        uint8_t cipher_key[VHU_CRYPTO_MAX_CIPHER_KEY];
        uint8_t auth_key[VHU_CRYPTO_MAX_AUTH_KEY];
};

struct vhu_inflight_desc_split {
        uint8_t inflight;
        uint8_t padding[5];
        uint16_t next;
        uint64_t counter;
};

struct vhu_inflight_queue_split {
        uint64_t features;
        uint16_t version;
        uint16_t desc_num;
        uint16_t last_batch_head;
        uint16_t used_idx;
        struct vhu_inflight_desc_split desc[];
};

_Static_assert(sizeof(struct vhu_header) == 12, "header");
_Static_assert(sizeof(struct vhu_vring_state) == 8, "vring state");
_Static_assert(sizeof(struct vhu_vring_addr) == 40, "vring addr");
_Static_assert(sizeof(struct vhu_mem_region) == 32, "region");
_Static_assert(sizeof(struct vhu_mem_table) == 8 + 8 * 32, "mem table");
_Static_assert(sizeof(struct vhu_mem_single) == 40, "single region");
_Static_assert(sizeof(struct vhu_log) == 16, "log");
_Static_assert(sizeof(struct vhu_iotlb) == 32, "iotlb");
_Static_assert(sizeof(struct vhu_config) == 12 + VHU_MAX_CONFIG_SIZE, "config");
_Static_assert(sizeof(struct vhu_vring_area) == 24, "vring area");
_Static_assert(sizeof(struct vhu_inflight) == 24, "inflight");
_Static_assert(sizeof(struct vhu_shared) == 16, "shared");
_Static_assert(sizeof(struct vhu_device_state) == 8, "device state");
_Static_assert(sizeof(struct vhu_shmem_map) == 40, "shmem map");
_Static_assert(sizeof(struct vhu_shmem_config) == 8 + 8 * VHU_MAX_SHMEM_REGIONS, "shmem config");
_Static_assert(sizeof(struct vhu_crypto_session) == 632, "crypto session");
_Static_assert(sizeof(struct vhu_inflight_desc_split) == 16, "inflight desc");
_Static_assert(sizeof(struct vhu_inflight_queue_split) == 16, "inflight queue");
