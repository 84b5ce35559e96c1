/* SPDX-License-Identifier: MIT */
/*
 * protocol/ message tests: the request table, a build -> encode -> decode ->
 * validate round trip of every front-end and back-end request and of its
 * reply, and malformed input of every kind the validators must reject.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vhu-message.h"
#include "test-util.h"

#define ALL_PF ((UINT64_C(1) << _VHU_PF_MAX) - 1)

static int test_fds[VHU_MAX_FDS + 1];

static const char *dir_name(enum vhu_direction dir) {
        return dir == VHU_DIR_FRONTEND ? "front-end" : "back-end";
}

static uint32_t max_request(enum vhu_direction dir) {
        return dir == VHU_DIR_FRONTEND ? _VHU_REQ_MAX - 1 : _VHU_BREQ_MAX - 1;
}

static const struct vhu_mem_region sample_region = {
        .gpa = 0x100000, .size = 0x200000, .uaddr = 0x7f0000000000, .mmap_offset = 0x1000,
};

static const uint8_t sample_uuid[16] = {
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0x4d, 0xef,
        0x81, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef,
};

/* Validate m as a front-end request with all features; expect rejection. */
#define CHECK_REJECTED(dir, pf, m)                                              \
        do {                                                                    \
                const char *_why = NULL;                                        \
                CHECK_EQ(vhu_validate_request((dir), (pf), (m), &_why), -EPROTO); \
                CHECK(_why != NULL);                                            \
        } while (0)

#define CHECK_REPLY_REJECTED(dir, req, flags, pf, m)                            \
        do {                                                                    \
                const char *_why = NULL;                                        \
                CHECK_EQ(vhu_validate_reply((dir), (req), (flags), (pf), (m), &_why), -EPROTO); \
                CHECK(_why != NULL);                                            \
        } while (0)

/* A valid request of every kind, built with the public builders. */
static int build_valid_request(enum vhu_direction dir, uint32_t req, bool need_reply,
                               struct vhu_msg *m) {
        if (dir == VHU_DIR_BACKEND) {
                struct vhu_iotlb iotlb = { .iova = 0x1000, .perm = 3, .type = VHU_IOTLB_MISS };
                struct vhu_vring_area area = { .u64 = 1, .size = 4096, .offset = 0 };
                struct vhu_vring_state state = { .index = 1, .num = 0 };
                struct vhu_shmem_map map = { .shmid = 0, .fd_offset = 0, .shm_offset = 4096,
                                             .len = 8192, .flags = VHU_SHMEM_MAP_F_WRITABLE };

                switch (req) {
                case VHU_BREQ_IOTLB_MSG:
                        return vhu_msg_build(m, dir, req, need_reply, &iotlb, sizeof(iotlb), NULL, 0);
                case VHU_BREQ_CONFIG_CHANGE_MSG:
                        return vhu_msg_build(m, dir, req, need_reply, NULL, 0, NULL, 0);
                case VHU_BREQ_VRING_HOST_NOTIFIER_MSG:
                        return vhu_msg_build(m, dir, req, need_reply, &area, sizeof(area), test_fds, 1);
                case VHU_BREQ_VRING_CALL:
                case VHU_BREQ_VRING_ERR:
                        return vhu_msg_build(m, dir, req, need_reply, &state, sizeof(state), NULL, 0);
                case VHU_BREQ_SHARED_OBJECT_ADD:
                case VHU_BREQ_SHARED_OBJECT_REMOVE:
                case VHU_BREQ_SHARED_OBJECT_LOOKUP:
                        return vhu_msg_build(m, dir, req, need_reply, sample_uuid, 16, NULL, 0);
                case VHU_BREQ_SHMEM_MAP:
                        return vhu_msg_build(m, dir, req, need_reply, &map, sizeof(map), test_fds, 1);
                case VHU_BREQ_SHMEM_UNMAP:
                        return vhu_msg_build(m, dir, req, need_reply, &map, sizeof(map), NULL, 0);
                default:
                        return -ENOENT;
                }
        }

        switch (req) {
        case VHU_REQ_GET_FEATURES:
        case VHU_REQ_SET_OWNER:
        case VHU_REQ_RESET_OWNER:
        case VHU_REQ_GET_PROTOCOL_FEATURES:
        case VHU_REQ_GET_QUEUE_NUM:
        case VHU_REQ_POSTCOPY_ADVISE:
        case VHU_REQ_POSTCOPY_LISTEN:
        case VHU_REQ_POSTCOPY_END:
        case VHU_REQ_RESET_DEVICE:
        case VHU_REQ_GET_MAX_MEM_SLOTS:
        case VHU_REQ_GET_STATUS:
        case VHU_REQ_CHECK_DEVICE_STATE:
        case VHU_REQ_GET_SHMEM_CONFIG:
                return vhu_msg_build_none(m, req, need_reply);
        case VHU_REQ_SET_FEATURES:
                return vhu_msg_build_u64(m, req, need_reply, 0x140000000);
        case VHU_REQ_SET_PROTOCOL_FEATURES:
                return vhu_msg_build_u64(m, req, need_reply, 0x8f2b);
        case VHU_REQ_SEND_RARP:
                return vhu_msg_build_u64(m, req, need_reply, 0x563412005452);
        case VHU_REQ_NET_SET_MTU:
                return vhu_msg_build_u64(m, req, need_reply, 1500);
        case VHU_REQ_CLOSE_CRYPTO_SESSION:
                return vhu_msg_build_u64(m, req, need_reply, 7);
        case VHU_REQ_SET_STATUS:
                return vhu_msg_build_u64(m, req, need_reply, 0x0f);
        case VHU_REQ_SET_MEM_TABLE: {
                struct vhu_mem_region regions[2] = { sample_region, sample_region };

                regions[1].gpa = 0x400000;
                return vhu_msg_build_mem_table(m, need_reply, regions, test_fds, 2);
        }
        case VHU_REQ_SET_LOG_BASE: {
                struct vhu_log log = { .mmap_size = 0x10000, .mmap_offset = 0 };

                return vhu_msg_build(m, VHU_DIR_FRONTEND, req, need_reply, &log, sizeof(log),
                                     test_fds, 1);
        }
        case VHU_REQ_SET_LOG_FD:
        case VHU_REQ_SET_BACKEND_REQ_FD:
        case VHU_REQ_GPU_SET_SOCKET:
                return vhu_msg_build(m, VHU_DIR_FRONTEND, req, need_reply, NULL, 0, test_fds, 1);
        case VHU_REQ_SET_VRING_NUM:
                return vhu_msg_build_state(m, req, need_reply, 0, 256);
        case VHU_REQ_SET_VRING_BASE:
        case VHU_REQ_GET_VRING_BASE:
        case VHU_REQ_GET_VRING_BASE_SKIP_DRAIN:
        case VHU_REQ_VRING_KICK:
                return vhu_msg_build_state(m, req, need_reply, 1, 0);
        case VHU_REQ_SET_VRING_ENABLE:
        case VHU_REQ_SET_VRING_ENDIAN:
                return vhu_msg_build_state(m, req, need_reply, 1, 1);
        case VHU_REQ_SET_VRING_ADDR: {
                struct vhu_vring_addr addr = { .index = 1, .flags = VHU_VRING_F_LOG,
                                               .desc = 0x1000, .used = 0x2000,
                                               .avail = 0x3000, .log = 0x2000 };

                return vhu_msg_build_vring_addr(m, need_reply, &addr);
        }
        case VHU_REQ_SET_VRING_KICK:
        case VHU_REQ_SET_VRING_CALL:
        case VHU_REQ_SET_VRING_ERR:
                return vhu_msg_build_vring_fd(m, req, need_reply, 3, test_fds[0]);
        case VHU_REQ_IOTLB_MSG: {
                struct vhu_iotlb iotlb = { .iova = 0x1000, .size = 0x1000, .uaddr = 0x7f0000001000,
                                           .perm = 3, .type = VHU_IOTLB_UPDATE };

                return vhu_msg_build(m, VHU_DIR_FRONTEND, req, need_reply, &iotlb, sizeof(iotlb),
                                     NULL, 0);
        }
        case VHU_REQ_GET_CONFIG:
                return vhu_msg_build_config(m, req, need_reply, 0, 60, 0, NULL);
        case VHU_REQ_SET_CONFIG: {
                uint8_t wce = 1;

                return vhu_msg_build_config(m, req, need_reply, 32, 1, VHU_CONFIG_FLAG_WRITABLE, &wce);
        }
        case VHU_REQ_CREATE_CRYPTO_SESSION: {
                uint8_t session[96];

                memset(session, 0xa5, sizeof(session));
                return vhu_msg_build(m, VHU_DIR_FRONTEND, req, need_reply, session, sizeof(session),
                                     NULL, 0);
        }
        case VHU_REQ_GET_INFLIGHT_FD:
        case VHU_REQ_SET_INFLIGHT_FD: {
                struct vhu_inflight inflight = { .mmap_size = req == VHU_REQ_SET_INFLIGHT_FD ? 8192 : 0,
                                                 .num_queues = 2, .queue_size = 128 };

                return vhu_msg_build(m, VHU_DIR_FRONTEND, req, need_reply, &inflight,
                                     sizeof(inflight), test_fds,
                                     req == VHU_REQ_SET_INFLIGHT_FD ? 1 : 0);
        }
        case VHU_REQ_ADD_MEM_REG:
                return vhu_msg_build_mem_single(m, req, need_reply, &sample_region, test_fds[0]);
        case VHU_REQ_REM_MEM_REG:
                return vhu_msg_build_mem_single(m, req, need_reply, &sample_region, -1);
        case VHU_REQ_GET_SHARED_OBJECT:
                return vhu_msg_build(m, VHU_DIR_FRONTEND, req, need_reply, sample_uuid, 16, NULL, 0);
        case VHU_REQ_SET_DEVICE_STATE_FD: {
                struct vhu_device_state ds = { .direction = VHU_TRANSFER_SAVE,
                                               .phase = VHU_TRANSFER_PHASE_STOPPED };

                return vhu_msg_build(m, VHU_DIR_FRONTEND, req, need_reply, &ds, sizeof(ds),
                                     test_fds, 1);
        }
        default:
                return -ENOENT;
        }
}

/* The reply a well-behaved peer sends when the request has its own reply. */
static int build_valid_own_reply(enum vhu_direction dir, const struct vhu_msg *req,
                                 struct vhu_msg *r) {
        uint32_t n = req->hdr.request;

        if (dir == VHU_DIR_BACKEND) {
                if (n == VHU_BREQ_SHARED_OBJECT_LOOKUP) {
                        uint64_t ok = 0;

                        return vhu_msg_build_reply(r, req, &ok, sizeof(ok), test_fds, 1);
                }
                return -ENOENT;
        }

        switch (n) {
        case VHU_REQ_GET_FEATURES:
                return vhu_msg_build_reply_u64(r, req, 0x175007e46);
        case VHU_REQ_GET_PROTOCOL_FEATURES:
                return vhu_msg_build_reply_u64(r, req, 0x8f2b);
        case VHU_REQ_GET_QUEUE_NUM:
                return vhu_msg_build_reply_u64(r, req, 2);
        case VHU_REQ_GET_MAX_MEM_SLOTS:
                return vhu_msg_build_reply_u64(r, req, 32);
        case VHU_REQ_GET_STATUS:
                return vhu_msg_build_reply_u64(r, req, 0x0f);
        case VHU_REQ_POSTCOPY_END:
        case VHU_REQ_CHECK_DEVICE_STATE:
        case VHU_REQ_SET_LOG_BASE:
                return vhu_msg_build_reply_u64(r, req, 0);
        case VHU_REQ_GET_VRING_BASE:
        case VHU_REQ_GET_VRING_BASE_SKIP_DRAIN: {
                struct vhu_vring_state state = { .index = 1, .num = 42 };

                return vhu_msg_build_reply(r, req, &state, sizeof(state), NULL, 0);
        }
        case VHU_REQ_GET_CONFIG: {
                struct vhu_config config = { .offset = 0, .size = 60, .flags = 0 };

                config.data[0] = 0x80;
                return vhu_msg_build_reply(r, req, &config, VHU_CONFIG_HEADER_SIZE + 60, NULL, 0);
        }
        case VHU_REQ_CREATE_CRYPTO_SESSION: {
                uint8_t session[96] = { 0 };

                return vhu_msg_build_reply(r, req, session, sizeof(session), NULL, 0);
        }
        case VHU_REQ_POSTCOPY_ADVISE:
                return vhu_msg_build_reply(r, req, NULL, 0, test_fds, 1);
        case VHU_REQ_GET_INFLIGHT_FD: {
                struct vhu_inflight inflight = { .mmap_size = 8192, .num_queues = 2,
                                                 .queue_size = 128 };

                return vhu_msg_build_reply(r, req, &inflight, sizeof(inflight), test_fds, 1);
        }
        case VHU_REQ_GET_SHARED_OBJECT:
                return vhu_msg_build_reply(r, req, sample_uuid, 16, test_fds, 1);
        case VHU_REQ_SET_DEVICE_STATE_FD:
                return vhu_msg_build_reply_u64(r, req, VHU_DEVICE_STATE_NOFD_MASK);
        case VHU_REQ_GET_SHMEM_CONFIG: {
                static struct vhu_shmem_config shmem = { .nregions = 2,
                                                         .memory_sizes = { 1 << 20, 1 << 21 } };

                return vhu_msg_build_reply(r, req, &shmem, sizeof(shmem), NULL, 0);
        }
        default:
                return -ENOENT;
        }
}

/* Encode m, decode it into ret (fds carried over as the socket would), compare. */
static void encode_decode(const struct vhu_msg *m, struct vhu_msg *ret) {
        static uint8_t buf[VHU_HEADER_SIZE + VHU_MAX_PAYLOAD];
        size_t n;

        n = vhu_msg_encode(m, buf, sizeof(buf));
        CHECK_EQ(n, vhu_msg_wire_size(m));
        CHECK_EQ(vhu_msg_encode(m, buf, n - 1), 0);
        vhu_msg_init(ret);
        CHECK_EQ(vhu_msg_decode(ret, buf, n - 1), -EAGAIN);
        CHECK_EQ(vhu_msg_decode(ret, buf, n), (int) n);
        CHECK(memcmp(&ret->hdr, &m->hdr, sizeof(m->hdr)) == 0);
        CHECK(memcmp(ret->payload.raw, m->payload.raw, m->hdr.size) == 0);
        memcpy(ret->fds, m->fds, sizeof(ret->fds));
        ret->n_fds = m->n_fds;
}

static void test_table(void) {
        test_set_context("request table");
        for (int d = 0; d < 2; d++) {
                enum vhu_direction dir = d;

                CHECK(vhu_request_info(dir, 0) == NULL);
                CHECK(vhu_request_info(dir, max_request(dir) + 1) == NULL);
                CHECK(strcmp(vhu_request_name(dir, max_request(dir) + 1), "UNKNOWN") == 0);
                CHECK(strcmp(vhu_request_name(dir, 0), "UNKNOWN") == 0);
                CHECK(vhu_request_info(dir, UINT32_MAX) == NULL);
                for (uint32_t n = 1; n <= max_request(dir); n++) {
                        const struct vhu_request_info *info = vhu_request_info(dir, n);

                        test_set_context("%s request %u", dir_name(dir), n);
                        CHECK(info != NULL);
                        if (!info)
                                continue;
                        CHECK_EQ(info->request, n);
                        CHECK(info->name && strcmp(vhu_request_name(dir, n), info->name) == 0);
                        CHECK(strncmp(info->name, "VHOST", 5) != 0);
                        CHECK(info->min_size <= info->max_size);
                        CHECK(info->max_size <= VHU_MAX_PAYLOAD);
                        CHECK(info->min_fds <= info->max_fds);
                        CHECK(info->max_fds <= VHU_MAX_FDS);
                        CHECK(info->reply_min_size <= info->reply_max_size);
                        CHECK(info->reply_max_size <= VHU_MAX_PAYLOAD);
                        CHECK(info->reply_max_fds <= VHU_MAX_FDS);
                        CHECK(info->protocol_feature >= -1 && info->protocol_feature < _VHU_PF_MAX);
                }
        }
        test_set_context("names");
        CHECK(strcmp(vhu_request_name(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES), "GET_FEATURES") == 0);
        CHECK(strcmp(vhu_request_name(VHU_DIR_FRONTEND, 21), "SET_BACKEND_REQ_FD") == 0);
        CHECK(strcmp(vhu_request_name(VHU_DIR_FRONTEND, 44), "GET_SHMEM_CONFIG") == 0);
        CHECK(strcmp(vhu_request_name(VHU_DIR_FRONTEND, 45), "GET_VRING_BASE_SKIP_DRAIN") == 0);
        CHECK_EQ(_VHU_REQ_MAX, 46);
        CHECK_EQ(_VHU_PF_MAX, 24);
        CHECK(strcmp(vhu_request_name(VHU_DIR_BACKEND, 8), "SHARED_OBJECT_LOOKUP") == 0);
        CHECK(strcmp(vhu_request_name(VHU_DIR_BACKEND, 3), "VRING_HOST_NOTIFIER_MSG") == 0);
        CHECK(strcmp(vhu_request_name(VHU_DIR_BACKEND, 10), "SHMEM_UNMAP") == 0);
        for (unsigned bit = 0; bit < _VHU_PF_MAX; bit++)
                CHECK(vhu_protocol_feature_name(bit) != NULL);
        CHECK(vhu_protocol_feature_name(_VHU_PF_MAX) == NULL);
        CHECK(vhu_protocol_feature_name(63) == NULL);
        CHECK(strcmp(vhu_protocol_feature_name(VHU_PF_REPLY_ACK), "REPLY_ACK") == 0);
        CHECK(strcmp(vhu_protocol_feature_name(VHU_PF_BACKEND_REQ), "BACKEND_REQ") == 0);
        CHECK(strcmp(vhu_protocol_feature_name(VHU_PF_GET_VRING_BASE_SKIP_DRAIN),
                     "GET_VRING_BASE_SKIP_DRAIN") == 0);
        /* Spot checks of what the table says. */
        CHECK_EQ(vhu_request_info(VHU_DIR_FRONTEND, VHU_REQ_GET_INFLIGHT_FD)->min_size, 24);
        CHECK_EQ(vhu_request_info(VHU_DIR_FRONTEND, VHU_REQ_GET_QUEUE_NUM)->protocol_feature,
                 VHU_PF_MQ);
        CHECK_EQ(vhu_request_info(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES)->protocol_feature, -1);
        CHECK_EQ(vhu_request_info(VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_BASE)->reply,
                 VHU_REPLY_IF_LOG_SHMFD);
        CHECK_EQ(vhu_request_info(VHU_DIR_BACKEND, VHU_BREQ_SHMEM_MAP)->min_fds, 1);
        {
                const struct vhu_request_info *skip =
                        vhu_request_info(VHU_DIR_FRONTEND, VHU_REQ_GET_VRING_BASE_SKIP_DRAIN);
                const struct vhu_request_info *get =
                        vhu_request_info(VHU_DIR_FRONTEND, VHU_REQ_GET_VRING_BASE);

                /* GET_VRING_BASE's payload and reply, gated on bit 23 */
                CHECK_EQ(skip->protocol_feature, VHU_PF_GET_VRING_BASE_SKIP_DRAIN);
                CHECK_EQ(skip->min_size, get->min_size);
                CHECK_EQ(skip->max_size, get->max_size);
                CHECK_EQ(skip->reply, VHU_REPLY_ALWAYS);
                CHECK_EQ(skip->reply_min_size, get->reply_min_size);
                CHECK_EQ(skip->reply_max_size, get->reply_max_size);
                CHECK_EQ(skip->max_fds + skip->reply_max_fds, 0);
        }
        /* bits 20-23 as the spec numbers them late 2026 */
        CHECK_EQ(VHU_PF_GET_VRING_BASE_INFLIGHT, 20);
        CHECK_EQ(VHU_PF_GPA_ADDRESSES, 21);
        CHECK_EQ(VHU_PF_SHMEM, 22);
        CHECK_EQ(VHU_PF_GET_VRING_BASE_SKIP_DRAIN, 23);
        CHECK(strcmp(vhu_protocol_feature_name(20), "GET_VRING_BASE_INFLIGHT") == 0);
        CHECK(strcmp(vhu_protocol_feature_name(21), "GPA_ADDRESSES") == 0);
        CHECK(strcmp(vhu_protocol_feature_name(22), "SHMEM") == 0);
}

/* Bits the spec allows only together with others, and the fix-up of a set. */
static void test_feature_prerequisites(void) {
        const uint64_t inflight = VHU_PF_BIT(VHU_PF_INFLIGHT_SHMFD);
        const uint64_t base_inflight = VHU_PF_BIT(VHU_PF_GET_VRING_BASE_INFLIGHT);
        const uint64_t skip = VHU_PF_BIT(VHU_PF_GET_VRING_BASE_SKIP_DRAIN);
        const uint64_t inband = VHU_PF_BIT(VHU_PF_INBAND_NOTIFICATIONS);
        const uint64_t chan = VHU_PF_BIT(VHU_PF_BACKEND_REQ) | VHU_PF_BIT(VHU_PF_REPLY_ACK);
        struct vhu_msg m;

        test_set_context("protocol feature prerequisites");
        CHECK_EQ(vhu_protocol_feature_requires(VHU_PF_GET_VRING_BASE_SKIP_DRAIN), base_inflight | inflight);
        CHECK_EQ(vhu_protocol_feature_requires(VHU_PF_GET_VRING_BASE_INFLIGHT), inflight);
        CHECK_EQ(vhu_protocol_feature_requires(VHU_PF_INBAND_NOTIFICATIONS), chan);
        CHECK_EQ(vhu_protocol_feature_requires(VHU_PF_SHMEM), 0);
        CHECK_EQ(vhu_protocol_feature_requires(VHU_PF_GPA_ADDRESSES), 0);
        CHECK_EQ(vhu_protocol_feature_requires(63), 0);
        CHECK_EQ(vhu_protocol_features_consistent(ALL_PF), ALL_PF);
        CHECK_EQ(vhu_protocol_features_consistent(0), 0);
        CHECK_EQ(vhu_protocol_features_consistent(skip | base_inflight | inflight),
                 skip | base_inflight | inflight);
        CHECK_EQ(vhu_protocol_features_consistent(skip | base_inflight), 0);  /* transitively */
        CHECK_EQ(vhu_protocol_features_consistent(skip | inflight), inflight);
        CHECK_EQ(vhu_protocol_features_consistent(base_inflight), 0);
        CHECK_EQ(vhu_protocol_features_consistent(inband | VHU_PF_BIT(VHU_PF_REPLY_ACK)),
                 VHU_PF_BIT(VHU_PF_REPLY_ACK));
        CHECK_EQ(vhu_protocol_features_consistent(inband | chan | VHU_PF_BIT(VHU_PF_GPA_ADDRESSES)),
                 inband | chan | VHU_PF_BIT(VHU_PF_GPA_ADDRESSES));

        test_set_context("GET_VRING_BASE_SKIP_DRAIN needs bits 23, 20 and 12");
        vhu_msg_init(&m);
        CHECK_EQ(vhu_msg_build_state(&m, VHU_REQ_GET_VRING_BASE_SKIP_DRAIN, false, 3, 0), 0);
        CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, skip | base_inflight | inflight, &m, NULL), 0);
        CHECK_REJECTED(VHU_DIR_FRONTEND, skip | base_inflight, &m);
        CHECK_REJECTED(VHU_DIR_FRONTEND, skip | inflight, &m);
        CHECK_REJECTED(VHU_DIR_FRONTEND, base_inflight | inflight, &m);
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF & ~inflight, &m);
        /* num is reserved, as in GET_VRING_BASE */
        CHECK_EQ(vhu_msg_build_state(&m, VHU_REQ_GET_VRING_BASE_SKIP_DRAIN, false, 3, 1), -EINVAL);
        m.payload.state.num = 7;
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);

        test_set_context("VRING_KICK needs INBAND_NOTIFICATIONS with its prerequisites");
        CHECK_EQ(vhu_msg_build_state(&m, VHU_REQ_VRING_KICK, false, 0, 0), 0);
        CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, inband | chan, &m, NULL), 0);
        CHECK_REJECTED(VHU_DIR_FRONTEND, inband, &m);
        CHECK_REJECTED(VHU_DIR_FRONTEND, inband | VHU_PF_BIT(VHU_PF_REPLY_ACK), &m);
}

/* Every request of both directions, and its reply (own or REPLY_ACK). */
static void test_round_trip(void) {
        for (int d = 0; d < 2; d++) {
                enum vhu_direction dir = d;

                for (uint32_t n = 1; n <= max_request(dir); n++) {
                        struct vhu_msg m, got, reply, reply_got;
                        const char *why = NULL;
                        bool own;
                        int r;

                        test_set_context("%s %s", dir_name(dir), vhu_request_name(dir, n));
                        vhu_msg_init(&m);
                        r = build_valid_request(dir, n, false, &m);
                        CHECK_EQ(r, 0);
                        if (r < 0)
                                continue;
                        CHECK_EQ(m.hdr.request, n);
                        CHECK_EQ(m.hdr.flags, VHU_VERSION);

                        encode_decode(&m, &got);
                        r = vhu_validate_request(dir, ALL_PF, &got, &why);
                        CHECK_EQ(r, 0);
                        if (r < 0)
                                fprintf(stderr, "  why: %s\n", why);

                        /* The same with NEED_REPLY. */
                        vhu_msg_forget_fds(&m);
                        CHECK_EQ(build_valid_request(dir, n, true, &m), 0);
                        CHECK_EQ(m.hdr.flags, VHU_VERSION | VHU_FLAG_NEED_REPLY);
                        vhu_msg_forget_fds(&got);
                        encode_decode(&m, &got);
                        CHECK_EQ(vhu_validate_request(dir, ALL_PF, &got, NULL), 0);

                        /* Its reply. */
                        own = vhu_request_expects_reply(dir, n, VHU_VERSION, ALL_PF);
                        vhu_msg_init(&reply);
                        if (own) {
                                CHECK_EQ(build_valid_own_reply(dir, &m, &reply), 0);
                        } else {
                                /* Only a REPLY_ACK, and only when asked for and negotiated. */
                                CHECK(vhu_request_expects_reply(dir, n, VHU_VERSION | VHU_FLAG_NEED_REPLY,
                                                                ALL_PF));
                                CHECK(!vhu_request_expects_reply(dir, n, VHU_VERSION | VHU_FLAG_NEED_REPLY,
                                                                 ALL_PF & ~VHU_PF_BIT(VHU_PF_REPLY_ACK)));
                                CHECK_EQ(build_valid_own_reply(dir, &m, &reply), -ENOENT);
                                CHECK_EQ(vhu_msg_build_reply_u64(&reply, &m, 0), 0);
                        }
                        CHECK_EQ(reply.hdr.flags, VHU_VERSION | VHU_FLAG_REPLY);
                        CHECK_EQ(reply.hdr.request, n);
                        encode_decode(&reply, &reply_got);
                        why = NULL;
                        r = vhu_validate_reply(dir, n, m.hdr.flags, ALL_PF, &reply_got, &why);
                        CHECK_EQ(r, 0);
                        if (r < 0)
                                fprintf(stderr, "  why: %s\n", why);
                        if (!own) {
                                /* An ack nobody asked for is a protocol error. */
                                CHECK_EQ(vhu_validate_reply(dir, n, VHU_VERSION, ALL_PF, &reply_got, &why),
                                         -EPROTO);
                                CHECK_EQ(vhu_validate_reply(dir, n, m.hdr.flags,
                                                            ALL_PF & ~VHU_PF_BIT(VHU_PF_REPLY_ACK),
                                                            &reply_got, &why), -EPROTO);
                        }

                        vhu_msg_forget_fds(&m);
                        vhu_msg_forget_fds(&got);
                        vhu_msg_forget_fds(&reply);
                        vhu_msg_forget_fds(&reply_got);
                }
        }
}


static void test_decode_errors(void) {
        uint8_t buf[VHU_HEADER_SIZE + VHU_MAX_PAYLOAD + 16] = { 0 };
        struct vhu_header hdr = { .request = 1, .flags = 1, .size = 0 };
        struct vhu_msg m;

        test_set_context("decode");
        vhu_msg_init(&m);
        memcpy(buf, &hdr, sizeof(hdr));
        for (size_t len = 0; len < VHU_HEADER_SIZE; len++)
                CHECK_EQ(vhu_msg_decode(&m, buf, len), -EAGAIN);
        CHECK_EQ(m.hdr.request, 0); /* untouched on failure */
        CHECK_EQ(vhu_msg_decode(&m, buf, VHU_HEADER_SIZE), VHU_HEADER_SIZE);
        /* Trailing bytes belong to the next message. */
        CHECK_EQ(vhu_msg_decode(&m, buf, sizeof(buf)), VHU_HEADER_SIZE);

        hdr.size = 8;
        memcpy(buf, &hdr, sizeof(hdr));
        CHECK_EQ(vhu_msg_decode(&m, buf, VHU_HEADER_SIZE + 7), -EAGAIN);
        CHECK_EQ(vhu_msg_decode(&m, buf, VHU_HEADER_SIZE + 8), VHU_HEADER_SIZE + 8);

        hdr.size = VHU_MAX_PAYLOAD;
        memcpy(buf, &hdr, sizeof(hdr));
        CHECK_EQ(vhu_msg_decode(&m, buf, VHU_HEADER_SIZE + VHU_MAX_PAYLOAD),
                 VHU_HEADER_SIZE + VHU_MAX_PAYLOAD);
        hdr.size = VHU_MAX_PAYLOAD + 1;
        memcpy(buf, &hdr, sizeof(hdr));
        CHECK_EQ(vhu_msg_decode(&m, buf, sizeof(buf)), -EPROTO);
        CHECK_EQ(vhu_msg_decode(&m, buf, VHU_HEADER_SIZE), -EPROTO);
        hdr.size = UINT32_MAX;
        memcpy(buf, &hdr, sizeof(hdr));
        CHECK_EQ(vhu_msg_decode(&m, buf, sizeof(buf)), -EPROTO);

        /* Encode refuses a message whose size exceeds the payload buffer. */
        m.hdr.size = VHU_MAX_PAYLOAD + 1;
        CHECK_EQ(vhu_msg_encode(&m, buf, sizeof(buf)), 0);
}

static void test_header_flags(void) {
        static const uint32_t bad_request_flags[] = {
                0x0, 0x2, 0x3,                   /* version 0, 2, 3 */
                VHU_VERSION | VHU_FLAG_REPLY,    /* a reply where a request belongs */
                VHU_VERSION | VHU_FLAG_REPLY | VHU_FLAG_NEED_REPLY,
                VHU_VERSION | 0x10, VHU_VERSION | 0x80000000u, VHU_VERSION | 0x100,
        };
        static const uint32_t bad_reply_flags[] = {
                VHU_VERSION,                                        /* REPLY missing */
                VHU_VERSION | VHU_FLAG_REPLY | VHU_FLAG_NEED_REPLY, /* NEED_REPLY on a reply */
                0x2 | VHU_FLAG_REPLY,                               /* version 2 */
                VHU_FLAG_REPLY,                                     /* version 0 */
                VHU_VERSION | VHU_FLAG_REPLY | 0x20,                /* unknown bit */
                VHU_VERSION | VHU_FLAG_REPLY | 0x80000000u,
        };
        struct vhu_msg m, r;

        test_set_context("header flags");
        vhu_msg_init(&m);
        CHECK_EQ(vhu_msg_build_none(&m, VHU_REQ_GET_FEATURES, false), 0);
        CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, 0, &m, NULL), 0);
        for (size_t i = 0; i < sizeof(bad_request_flags) / sizeof(bad_request_flags[0]); i++) {
                m.hdr.flags = bad_request_flags[i];
                CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
                CHECK_REJECTED(VHU_DIR_BACKEND, ALL_PF, &m);
        }

        m.hdr.flags = VHU_VERSION;
        CHECK_EQ(vhu_msg_build_reply_u64(&r, &m, 0x175007e46), 0);
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES, VHU_VERSION, 0, &r, NULL), 0);
        for (size_t i = 0; i < sizeof(bad_reply_flags) / sizeof(bad_reply_flags[0]); i++) {
                r.hdr.flags = bad_reply_flags[i];
                CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES, VHU_VERSION, ALL_PF, &r);
        }

        /* A reply to a different request. */
        r.hdr.flags = VHU_VERSION | VHU_FLAG_REPLY;
        r.hdr.request = VHU_REQ_GET_PROTOCOL_FEATURES;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES, VHU_VERSION, ALL_PF, &r);
        r.hdr.request = VHU_REQ_GET_FEATURES;
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES, VHU_VERSION, 0, &r, NULL), 0);

        /* Validating against a request the table does not know is the caller's error. */
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, 0, VHU_VERSION, 0, &r, NULL), -EINVAL);
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, _VHU_REQ_MAX, VHU_VERSION, 0, &r, NULL), -EINVAL);
        CHECK_EQ(vhu_validate_reply(VHU_DIR_BACKEND, 11, VHU_VERSION, 0, &r, NULL), -EINVAL);

        /* Unknown request numbers. */
        m.hdr.request = 0;
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m.hdr.request = _VHU_REQ_MAX;
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m.hdr.request = 11;
        CHECK_REJECTED(VHU_DIR_BACKEND, ALL_PF, &m);
        m.hdr.request = UINT32_MAX;
        CHECK_REJECTED(VHU_DIR_BACKEND, ALL_PF, &m);
}

/* For every request: sizes outside its range, fds it may not carry, missing fds. */
static void test_sizes_and_fds(void) {
        for (int d = 0; d < 2; d++) {
                enum vhu_direction dir = d;

                for (uint32_t n = 1; n <= max_request(dir); n++) {
                        const struct vhu_request_info *info = vhu_request_info(dir, n);
                        struct vhu_msg m, saved;

                        test_set_context("%s %s", dir_name(dir), vhu_request_name(dir, n));
                        vhu_msg_init(&m);
                        if (build_valid_request(dir, n, false, &m) < 0)
                                continue;
                        saved = m;
                        CHECK_EQ(vhu_validate_request(dir, ALL_PF, &m, NULL), 0);

                        if (info->min_size > 0) {
                                m.hdr.size = info->min_size - 1;
                                CHECK_REJECTED(dir, ALL_PF, &m);
                                m.hdr.size = 0;
                                CHECK_REJECTED(dir, ALL_PF, &m);
                        }
                        m.hdr.size = info->max_size + 1;
                        CHECK_REJECTED(dir, ALL_PF, &m);
                        m.hdr.size = info->max_size + 8;
                        CHECK_REJECTED(dir, ALL_PF, &m);
                        m.hdr.size = UINT32_MAX;
                        CHECK_REJECTED(dir, ALL_PF, &m);
                        m = saved;

                        /* One fd more than allowed; nine is over any limit. */
                        if (info->max_fds < VHU_MAX_FDS) {
                                m.fds[m.n_fds] = test_fds[m.n_fds];
                                m.n_fds = info->max_fds + 1;
                                CHECK_REJECTED(dir, ALL_PF, &m);
                        }
                        m.n_fds = VHU_MAX_FDS + 1;
                        CHECK_REJECTED(dir, ALL_PF, &m);
                        m = saved;

                        if (info->min_fds > 0) {
                                m.n_fds = 0;
                                CHECK_REJECTED(dir, ALL_PF, &m);
                                m.n_fds = info->min_fds - 1;
                                CHECK_REJECTED(dir, ALL_PF, &m);
                        }

                        /* The protocol feature it needs, taken away. */
                        if (info->protocol_feature >= 0) {
                                m = saved;
                                CHECK_REJECTED(dir, ALL_PF & ~VHU_PF_BIT(info->protocol_feature), &m);
                        }

                        /* The builder refuses the same mistakes. */
                        if (info->min_size > 0)
                                CHECK_EQ(vhu_msg_build(&m, dir, n, false, saved.payload.raw,
                                                       info->min_size - 1, saved.fds, saved.n_fds),
                                         -EINVAL);
                        if (info->max_size < VHU_MAX_PAYLOAD)
                                CHECK_EQ(vhu_msg_build(&m, dir, n, false, saved.payload.raw,
                                                       info->max_size + 1, saved.fds, saved.n_fds),
                                         -EINVAL);
                        if (info->max_fds < VHU_MAX_FDS)
                                CHECK_EQ(vhu_msg_build(&m, dir, n, false, saved.payload.raw,
                                                       saved.hdr.size, test_fds, info->max_fds + 1),
                                         -EINVAL);
                        if (info->min_fds > 0)
                                CHECK_EQ(vhu_msg_build(&m, dir, n, false, saved.payload.raw,
                                                       saved.hdr.size, NULL, 0), -EINVAL);
                        CHECK_EQ(vhu_msg_build(&m, dir, n, false, saved.payload.raw,
                                               saved.hdr.size, test_fds, VHU_MAX_FDS + 1), -EINVAL);
                        vhu_msg_forget_fds(&m);
                }
        }
}

static void test_mem_table_rules(void) {
        struct vhu_mem_region regions[VHU_MEM_TABLE_MAX_REGIONS + 1];
        struct vhu_msg m, saved;

        for (unsigned i = 0; i <= VHU_MEM_TABLE_MAX_REGIONS; i++) {
                regions[i] = sample_region;
                regions[i].gpa = (uint64_t) i << 30;
        }
        vhu_msg_init(&m);

        test_set_context("SET_MEM_TABLE rules");
        for (unsigned n = 1; n <= VHU_MEM_TABLE_MAX_REGIONS; n++) {
                CHECK_EQ(vhu_msg_build_mem_table(&m, false, regions, test_fds, n), 0);
                CHECK_EQ(m.hdr.size, 8 + 32 * n);
                CHECK_EQ(m.n_fds, n);
                CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, 0, &m, NULL), 0);
        }
        CHECK_EQ(vhu_msg_build_mem_table(&m, false, regions, test_fds, 0), -EINVAL);
        CHECK_EQ(vhu_msg_build_mem_table(&m, false, regions, test_fds, 9), -EINVAL);
        CHECK_EQ(vhu_msg_build_mem_table(&m, false, NULL, test_fds, 1), -EINVAL);
        CHECK_EQ(vhu_msg_build_mem_table(&m, false, regions, test_fds, 2), 0);
        saved = m;
        m.payload.mem_table.nregions = 0;                      /* none */
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m.payload.mem_table.nregions = 9;                      /* too many */
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m.payload.mem_table.nregions = 3;                      /* size says 2 */
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m.hdr.size = 8 + 32 * 3;                               /* 3 regions, 2 fds */
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m.fds[2] = test_fds[2];
        m.n_fds = 3;
        CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, ALL_PF, &m, NULL), 0);
        m = saved;
        m.n_fds = 1;                                           /* 2 regions, 1 fd */
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m = saved;
        m.hdr.size = 8 + 32 * 2 + 4;                           /* ragged */
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m = saved;
        m.payload.mem_table.nregions = 1;                      /* 1 region, 2 fds, 2 sizes */
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        /* A builder failure leaves the message untouched. */
        m = saved;
        CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_MEM_TABLE, true,
                               saved.payload.raw, 8 + 32 * 2, test_fds, 1), -EINVAL);
        CHECK(memcmp(&m, &saved, sizeof(m)) == 0);
}

static void test_vring_fd_rules(void) {
        struct vhu_msg m;

        vhu_msg_init(&m);

        test_set_context("SET_VRING_KICK/CALL/ERR rules");
        for (uint32_t req = VHU_REQ_SET_VRING_KICK; req <= VHU_REQ_SET_VRING_ERR; req++) {
                CHECK_EQ(vhu_msg_build_vring_fd(&m, req, false, 255, -1), 0);
                CHECK_EQ(m.payload.u64, 255 | VHU_VRING_NOFD_MASK);
                CHECK_EQ(m.n_fds, 0);
                CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, 0, &m, NULL), 0);
                m.fds[0] = test_fds[0];
                m.n_fds = 1;                                   /* fd despite the no-fd bit */
                CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
                m.payload.u64 = 3;
                CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, 0, &m, NULL), 0);
                m.n_fds = 0;                                   /* no fd, no no-fd bit */
                CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
                m.payload.u64 = 3 | (UINT64_C(1) << 9);        /* unknown bit */
                m.n_fds = 1;
                CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
                CHECK_EQ(vhu_msg_build_vring_fd(&m, req, false, 256, test_fds[0]), -EINVAL);
        }
        CHECK_EQ(vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_NUM, false, 0, -1), -EINVAL);
        vhu_msg_forget_fds(&m);
}

static void test_config_rules(void) {
        struct vhu_msg m, saved;
        uint8_t data[VHU_MAX_CONFIG_SIZE + 1] = { 0 };

        vhu_msg_init(&m);

        test_set_context("GET_CONFIG/SET_CONFIG rules");
        CHECK_EQ(vhu_msg_build_config(&m, VHU_REQ_GET_CONFIG, false, 0, VHU_MAX_CONFIG_SIZE, 0, NULL), 0);
        CHECK_EQ(m.hdr.size, VHU_CONFIG_HEADER_SIZE + VHU_MAX_CONFIG_SIZE);
        CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, ALL_PF, &m, NULL), 0);
        CHECK_EQ(vhu_msg_build_config(&m, VHU_REQ_GET_CONFIG, false, 0, VHU_MAX_CONFIG_SIZE + 1, 0,
                                      NULL), -EINVAL);
        CHECK_EQ(vhu_msg_build_config(&m, VHU_REQ_SET_VRING_NUM, false, 0, 4, 0, NULL), -EINVAL);
        CHECK_EQ(vhu_msg_build_config(&m, VHU_REQ_SET_CONFIG, false, 0, 60, 1, data), 0);
        saved = m;
        m.hdr.size = VHU_CONFIG_HEADER_SIZE + 59;              /* payload shorter than size */
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m.hdr.size = VHU_CONFIG_HEADER_SIZE + 61;              /* longer */
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m = saved;
        m.payload.config.size = VHU_MAX_CONFIG_SIZE + 1;       /* beyond the limit */
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m.payload.config.size = UINT32_MAX - 11;               /* 12 + size wraps to 0 */
        m.hdr.size = VHU_CONFIG_HEADER_SIZE;
        CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
        m = saved;
        m.hdr.request = VHU_REQ_GET_CONFIG;
        CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, ALL_PF, &m, NULL), 0);
        /* Config replies: same shape, or empty for an error. */
        {
                struct vhu_msg r;

                CHECK_EQ(vhu_msg_build_reply(&r, &m, &m.payload.config, m.hdr.size, NULL, 0), 0);
                CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_GET_CONFIG, VHU_VERSION, ALL_PF,
                                            &r, NULL), 0);
                r.hdr.size--;
                CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_CONFIG, VHU_VERSION, ALL_PF, &r);
                r.hdr.size = 5;
                CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_CONFIG, VHU_VERSION, ALL_PF, &r);
                r.hdr.size = 0;
                CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_GET_CONFIG, VHU_VERSION, ALL_PF,
                                            &r, NULL), 0);
        }
}

static void test_inflight_rules(void) {
        struct vhu_msg m;

        vhu_msg_init(&m);

        test_set_context("GET_INFLIGHT_FD / SET_INFLIGHT_FD: 24 bytes, not 20");
        {
                struct vhu_inflight inflight = { .num_queues = 2, .queue_size = 128 };

                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_GET_INFLIGHT_FD, false, &inflight,
                                       20, NULL, 0), -EINVAL);
                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_GET_INFLIGHT_FD, false, &inflight,
                                       24, NULL, 0), 0);
                m.hdr.size = 20;
                CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_INFLIGHT_FD, false, &inflight,
                                       24, test_fds, 1), 0);
                m.hdr.size = 20;
                CHECK_REJECTED(VHU_DIR_FRONTEND, ALL_PF, &m);
                vhu_msg_forget_fds(&m);
        }
}

static void test_log_base_rules(void) {
        struct vhu_msg m;

        vhu_msg_init(&m);

        test_set_context("SET_LOG_BASE and LOG_SHMFD");
        {
                struct vhu_log log = { .mmap_size = 4096 };
                struct vhu_msg r;

                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_BASE, false, &log,
                                       sizeof(log), NULL, 0), 0);
                CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, 0, &m, NULL), 0);
                CHECK_REJECTED(VHU_DIR_FRONTEND, VHU_PF_BIT(VHU_PF_LOG_SHMFD), &m);
                CHECK(!vhu_request_expects_reply(VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_BASE, VHU_VERSION, 0));
                CHECK(vhu_request_expects_reply(VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_BASE, VHU_VERSION,
                                                VHU_PF_BIT(VHU_PF_LOG_SHMFD)));
                /* DPDK answers with an empty payload, libvhost-user with a u64. */
                CHECK_EQ(vhu_msg_build_reply(&r, &m, NULL, 0, NULL, 0), 0);
                CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_BASE, VHU_VERSION,
                                            VHU_PF_BIT(VHU_PF_LOG_SHMFD), &r, NULL), 0);
                /* Without LOG_SHMFD it is a plain REPLY_ACK: a u64, and only if asked for. */
                CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_BASE,
                                     VHU_VERSION | VHU_FLAG_NEED_REPLY, VHU_PF_BIT(VHU_PF_REPLY_ACK), &r);
                CHECK_EQ(vhu_msg_build_reply_u64(&r, &m, 0), 0);
                CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_BASE,
                                            VHU_VERSION | VHU_FLAG_NEED_REPLY,
                                            VHU_PF_BIT(VHU_PF_REPLY_ACK), &r, NULL), 0);
                CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_BASE, VHU_VERSION,
                                     VHU_PF_BIT(VHU_PF_REPLY_ACK), &r);
        }
}

static void test_rem_mem_reg_rules(void) {
        struct vhu_msg m;

        vhu_msg_init(&m);

        test_set_context("REM_MEM_REG with a stray fd");
        CHECK_EQ(vhu_msg_build_mem_single(&m, VHU_REQ_REM_MEM_REG, false, &sample_region, test_fds[0]), 0);
        CHECK_EQ(m.n_fds, 1);
        CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, ALL_PF, &m, NULL), 0);
        CHECK_EQ(vhu_msg_build_mem_single(&m, VHU_REQ_ADD_MEM_REG, false, &sample_region, -1), -EINVAL);
        CHECK_EQ(vhu_msg_build_mem_single(&m, VHU_REQ_SET_MEM_TABLE, false, &sample_region, -1), -EINVAL);
        vhu_msg_forget_fds(&m);
}

static void test_small_request_rules(void) {
        struct vhu_msg m;

        vhu_msg_init(&m);

        test_set_context("small request-specific rules");
        CHECK_EQ(vhu_msg_build_state(&m, VHU_REQ_VRING_KICK, false, 0, 1), -EINVAL);
        CHECK_EQ(vhu_msg_build_state(&m, VHU_REQ_SET_VRING_ENDIAN, false, 0, 2), -EINVAL);
        {
                struct vhu_iotlb iotlb = { .perm = 3, .type = VHU_IOTLB_MISS };
                struct vhu_device_state ds = { .direction = 2 };

                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_IOTLB_MSG, false, &iotlb,
                                       sizeof(iotlb), NULL, 0), -EINVAL);
                iotlb.type = VHU_IOTLB_INVALIDATE;
                iotlb.perm = 4;
                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_IOTLB_MSG, false, &iotlb,
                                       sizeof(iotlb), NULL, 0), -EINVAL);
                iotlb.perm = 0;
                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_IOTLB_MSG, false, &iotlb,
                                       sizeof(iotlb), NULL, 0), 0);
                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_BACKEND, VHU_BREQ_IOTLB_MSG, false, &iotlb,
                                       sizeof(iotlb), NULL, 0), -EINVAL);
                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_DEVICE_STATE_FD, false, &ds,
                                       sizeof(ds), test_fds, 1), -EINVAL);
        }
}

static void test_builder_errors(void) {
        struct vhu_msg m, saved;
        uint8_t data[VHU_MAX_CONFIG_SIZE + 1] = { 0 };
        int fd_minus = -1;

        vhu_msg_init(&m);
        CHECK_EQ(vhu_msg_build_config(&saved, VHU_REQ_SET_CONFIG, false, 0, 60, 1, data), 0);

        test_set_context("builder argument errors");
        CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, 0, false, NULL, 0, NULL, 0), -EOPNOTSUPP);
        CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, _VHU_REQ_MAX, false, NULL, 0, NULL, 0),
                 -EOPNOTSUPP);
        CHECK_EQ(vhu_msg_build(&m, VHU_DIR_BACKEND, 11, false, NULL, 0, NULL, 0), -EOPNOTSUPP);
        CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_FEATURES, false, NULL, 8, NULL, 0),
                 -EINVAL);
        CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_LOG_FD, false, NULL, 0, &fd_minus, 1),
                 -EINVAL);
        CHECK_EQ(vhu_msg_build_u64(&m, VHU_REQ_GET_FEATURES, false, 1), -EINVAL);
        CHECK_EQ(vhu_msg_build_none(&m, VHU_REQ_SET_FEATURES, false), -EINVAL);
        CHECK_EQ(vhu_msg_build_vring_addr(&m, false, NULL), -EINVAL);
        CHECK_EQ(vhu_msg_build_reply(&m, &saved, NULL, 8, NULL, 0), -EINVAL);
        CHECK_EQ(vhu_msg_build_reply(&m, &saved, data, VHU_MAX_PAYLOAD + 1, NULL, 0), -EINVAL);
        CHECK_EQ(vhu_msg_build_reply(&m, &saved, NULL, 0, &fd_minus, 1), -EINVAL);
}

static void test_backend_rules(void) {
        struct vhu_vring_area area = { .u64 = 2 | VHU_VRING_NOFD_MASK, .size = 4096 };
        uint64_t pf_no_send_fd = ALL_PF & ~VHU_PF_BIT(VHU_PF_BACKEND_SEND_FD);
        struct vhu_msg m;

        vhu_msg_init(&m);

        test_set_context("back-end fds need BACKEND_SEND_FD");
        CHECK_EQ(build_valid_request(VHU_DIR_BACKEND, VHU_BREQ_VRING_HOST_NOTIFIER_MSG, false, &m), 0);
        CHECK_EQ(vhu_validate_request(VHU_DIR_BACKEND, ALL_PF, &m, NULL), 0);
        CHECK_REJECTED(VHU_DIR_BACKEND, pf_no_send_fd, &m);
        CHECK_EQ(build_valid_request(VHU_DIR_BACKEND, VHU_BREQ_SHMEM_MAP, false, &m), 0);
        CHECK_REJECTED(VHU_DIR_BACKEND, pf_no_send_fd, &m);
        vhu_msg_forget_fds(&m);

        test_set_context("VRING_HOST_NOTIFIER_MSG fd rules");
        CHECK_EQ(vhu_msg_build(&m, VHU_DIR_BACKEND, VHU_BREQ_VRING_HOST_NOTIFIER_MSG, false, &area,
                               sizeof(area), NULL, 0), 0);
        CHECK_EQ(vhu_validate_request(VHU_DIR_BACKEND, pf_no_send_fd, &m, NULL), 0);
        m.fds[0] = test_fds[0];
        m.n_fds = 1;                                   /* fd with the no-fd bit */
        CHECK_REJECTED(VHU_DIR_BACKEND, ALL_PF, &m);
        m.payload.area.u64 = 2;                        /* fd, bit clear: register */
        CHECK_EQ(vhu_validate_request(VHU_DIR_BACKEND, ALL_PF, &m, NULL), 0);
        m.n_fds = 0;                                   /* no fd, bit clear: unregister */
        CHECK_EQ(vhu_validate_request(VHU_DIR_BACKEND, ALL_PF, &m, NULL), 0);
        m.payload.area.u64 = 2 | (UINT64_C(1) << 40);
        CHECK_REJECTED(VHU_DIR_BACKEND, ALL_PF, &m);

        test_set_context("back-end VRING_CALL num reserved");
        CHECK_EQ(build_valid_request(VHU_DIR_BACKEND, VHU_BREQ_VRING_CALL, false, &m), 0);
        m.payload.state.num = 1;
        CHECK_REJECTED(VHU_DIR_BACKEND, ALL_PF, &m);

        test_set_context("back-end IOTLB types");
        CHECK_EQ(build_valid_request(VHU_DIR_BACKEND, VHU_BREQ_IOTLB_MSG, false, &m), 0);
        m.payload.iotlb.type = VHU_IOTLB_UPDATE;
        CHECK_REJECTED(VHU_DIR_BACKEND, ALL_PF, &m);
        m.payload.iotlb.type = VHU_IOTLB_ACCESS_FAIL;
        CHECK_EQ(vhu_validate_request(VHU_DIR_BACKEND, ALL_PF, &m, NULL), 0);

        test_set_context("SHARED_OBJECT_LOOKUP reply");
        {
                struct vhu_msg r;

                CHECK_EQ(build_valid_request(VHU_DIR_BACKEND, VHU_BREQ_SHARED_OBJECT_LOOKUP, true, &m), 0);
                CHECK(vhu_request_expects_reply(VHU_DIR_BACKEND, VHU_BREQ_SHARED_OBJECT_LOOKUP,
                                                VHU_VERSION, 0));
                CHECK_EQ(vhu_msg_build_reply_u64(&r, &m, 0), 0);
                CHECK_EQ(vhu_validate_reply(VHU_DIR_BACKEND, VHU_BREQ_SHARED_OBJECT_LOOKUP,
                                            m.hdr.flags, ALL_PF, &r, NULL), 0);
                CHECK_EQ(vhu_msg_build_reply(&r, &m, sample_uuid, 16, NULL, 0), 0);
                CHECK_REPLY_REJECTED(VHU_DIR_BACKEND, VHU_BREQ_SHARED_OBJECT_LOOKUP, m.hdr.flags,
                                     ALL_PF, &r);
                CHECK_EQ(vhu_msg_build_reply(&r, &m, &area.size, 8, test_fds, 2), 0);
                CHECK_REPLY_REJECTED(VHU_DIR_BACKEND, VHU_BREQ_SHARED_OBJECT_LOOKUP, m.hdr.flags,
                                     ALL_PF, &r);
                /* An ack to a back-end request without its own reply. */
                CHECK_EQ(build_valid_request(VHU_DIR_BACKEND, VHU_BREQ_SHMEM_UNMAP, true, &m), 0);
                CHECK_EQ(vhu_msg_build_reply_u64(&r, &m, 0), 0);
                CHECK_EQ(vhu_validate_reply(VHU_DIR_BACKEND, VHU_BREQ_SHMEM_UNMAP, m.hdr.flags,
                                            ALL_PF, &r, NULL), 0);
                r.fds[0] = test_fds[0];
                r.n_fds = 1;
                CHECK_REPLY_REJECTED(VHU_DIR_BACKEND, VHU_BREQ_SHMEM_UNMAP, m.hdr.flags, ALL_PF, &r);
        }
        vhu_msg_forget_fds(&m);
}

static void reply_rules_shared_object(struct vhu_msg *r) {
        test_set_context("GET_SHARED_OBJECT reply: UUID or u64");
        r->hdr.request = VHU_REQ_GET_SHARED_OBJECT;
        for (uint32_t size = 0; size <= 24; size++) {
                r->hdr.size = size;
                if (size == 8 || size == 16)
                        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_GET_SHARED_OBJECT,
                                                    VHU_VERSION, ALL_PF, r, NULL), 0);
                else
                        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_SHARED_OBJECT, VHU_VERSION,
                                             ALL_PF, r);
        }
        r->hdr.size = 16;
        r->n_fds = 1;
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_GET_SHARED_OBJECT, VHU_VERSION, ALL_PF,
                                    r, NULL), 0);
        r->fds[1] = test_fds[1];
        r->n_fds = 2;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_SHARED_OBJECT, VHU_VERSION, ALL_PF, r);
}

static void reply_rules_device_state_fd(struct vhu_msg *r) {
        test_set_context("SET_DEVICE_STATE_FD reply");
        r->hdr.request = VHU_REQ_SET_DEVICE_STATE_FD;
        r->hdr.size = 8;
        r->payload.u64 = 0;
        r->n_fds = 1;
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_SET_DEVICE_STATE_FD, VHU_VERSION, ALL_PF,
                                    r, NULL), 0);
        r->payload.u64 = VHU_DEVICE_STATE_NOFD_MASK;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_SET_DEVICE_STATE_FD, VHU_VERSION, ALL_PF, r);
        r->n_fds = 0;
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_SET_DEVICE_STATE_FD, VHU_VERSION, ALL_PF,
                                    r, NULL), 0);
}

static void reply_rules_shmem_config(struct vhu_msg *r) {
        test_set_context("GET_SHMEM_CONFIG reply");
        r->hdr.request = VHU_REQ_GET_SHMEM_CONFIG;
        r->hdr.size = sizeof(struct vhu_shmem_config);
        memset(&r->payload.shmem_config, 0, sizeof(r->payload.shmem_config));
        r->payload.shmem_config.nregions = VHU_MAX_SHMEM_REGIONS;
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF,
                                    r, NULL), 0);
        r->payload.shmem_config.nregions = VHU_MAX_SHMEM_REGIONS + 1;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF, r);
        r->payload.shmem_config.nregions = 1;
        r->hdr.size = 16;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF, r);
        r->hdr.size = sizeof(struct vhu_shmem_config) + 8;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF, r);
        r->hdr.size = sizeof(struct vhu_shmem_config);
        /* sizes by shmid; 0 is an unused shmid below a used one */
        r->payload.shmem_config.nregions = 3;
        r->payload.shmem_config.memory_sizes[0] = UINT64_C(1) << 30;
        r->payload.shmem_config.memory_sizes[1] = 0;
        r->payload.shmem_config.memory_sizes[2] = VHU_SHMEM_SIZE_ALIGN;
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF,
                                    r, NULL), 0);
        r->payload.shmem_config.memory_sizes[2] = VHU_SHMEM_SIZE_ALIGN + 1;  /* not page-sized */
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF, r);
        r->payload.shmem_config.memory_sizes[2] = 512;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF, r);
        r->payload.shmem_config.memory_sizes[2] = VHU_SHMEM_SIZE_ALIGN;
        r->payload.shmem_config.memory_sizes[3] = VHU_SHMEM_SIZE_ALIGN;      /* beyond nregions */
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF, r);
        r->payload.shmem_config.memory_sizes[3] = 0;
        r->payload.shmem_config.memory_sizes[VHU_MAX_SHMEM_REGIONS - 1] = 1;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF, r);
        r->payload.shmem_config.memory_sizes[VHU_MAX_SHMEM_REGIONS - 1] = 0;
        r->payload.shmem_config.nregions = 0;                                /* none at all */
        memset(r->payload.shmem_config.memory_sizes, 0, sizeof(r->payload.shmem_config.memory_sizes));
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF,
                                    r, NULL), 0);
        r->n_fds = 1;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_SHMEM_CONFIG, VHU_VERSION, ALL_PF, r);
        r->n_fds = 0;
}

static void reply_rules_postcopy_mem_table(struct vhu_msg *r) {
        const uint32_t need = VHU_VERSION | VHU_FLAG_NEED_REPLY;

        test_set_context("postcopy mem table replies");
        r->hdr.request = VHU_REQ_SET_MEM_TABLE;
        r->hdr.size = 8 + 2 * 32;
        r->payload.mem_table.nregions = 2;
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_SET_MEM_TABLE, need, ALL_PF, r, NULL), 0);
        r->payload.mem_table.nregions = 3;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_SET_MEM_TABLE, need, ALL_PF, r);
        r->hdr.size = 8 + 2 * 32 + 1;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_SET_MEM_TABLE, need, ALL_PF, r);
        r->hdr.request = VHU_REQ_ADD_MEM_REG;
        r->hdr.size = 40;
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_ADD_MEM_REG, need, ALL_PF, r, NULL), 0);
        r->hdr.size = 16;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_ADD_MEM_REG, need, ALL_PF, r);
}

static void reply_rules_reply_ack(struct vhu_msg *r) {
        const uint32_t need = VHU_VERSION | VHU_FLAG_NEED_REPLY;

        test_set_context("REPLY_ACK replies must be a u64");
        r->hdr.request = VHU_REQ_SET_VRING_NUM;
        for (uint32_t size = 0; size <= 16; size++) {
                r->hdr.size = size;
                if (size == 8)
                        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_SET_VRING_NUM, need,
                                                    ALL_PF, r, NULL), 0);
                else
                        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_SET_VRING_NUM, need, ALL_PF, r);
        }
}

static void test_reply_rules(void) {
        struct vhu_msg m, r;

        vhu_msg_init(&m);
        vhu_msg_init(&r);

        test_set_context("GET_FEATURES reply");
        CHECK_EQ(vhu_msg_build_none(&m, VHU_REQ_GET_FEATURES, false), 0);
        CHECK_EQ(vhu_msg_build_reply(&r, &m, NULL, 0, NULL, 0), 0);
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES, VHU_VERSION, 0, &r);
        CHECK_EQ(vhu_msg_build_reply_u64(&r, &m, 1), 0);
        r.fds[0] = test_fds[0];
        r.n_fds = 1;                                   /* unexpected fd */
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES, VHU_VERSION, 0, &r);
        r.n_fds = VHU_MAX_FDS + 1;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES, VHU_VERSION, 0, &r);
        r.n_fds = 0;
        r.hdr.size = 16;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES, VHU_VERSION, 0, &r);
        r.hdr.size = VHU_MAX_PAYLOAD + 1;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_FEATURES, VHU_VERSION, 0, &r);

        test_set_context("replies that need exactly one fd");
        CHECK_EQ(vhu_msg_build_reply(&r, &m, &m.payload, 24, NULL, 0), 0);
        r.hdr.request = VHU_REQ_GET_INFLIGHT_FD;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_INFLIGHT_FD, VHU_VERSION, ALL_PF, &r);
        r.hdr.size = 20;
        r.fds[0] = test_fds[0];
        r.n_fds = 1;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_GET_INFLIGHT_FD, VHU_VERSION, ALL_PF, &r);
        r.hdr.size = 24;
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_GET_INFLIGHT_FD, VHU_VERSION, ALL_PF,
                                    &r, NULL), 0);
        r.hdr.request = VHU_REQ_POSTCOPY_ADVISE;
        r.hdr.size = 0;
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_POSTCOPY_ADVISE, VHU_VERSION, ALL_PF,
                                    &r, NULL), 0);
        r.n_fds = 0;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_POSTCOPY_ADVISE, VHU_VERSION, ALL_PF, &r);
        reply_rules_shared_object(&r);
        reply_rules_device_state_fd(&r);
        reply_rules_shmem_config(&r);
        reply_rules_postcopy_mem_table(&r);
        reply_rules_reply_ack(&r);
}

static void test_lifetime(void) {
        const struct vhu_mem_region regions[3] = { sample_region, sample_region, sample_region };
        struct vhu_msg m;
        int fds[3];

        test_set_context("fd ownership");
        for (int i = 0; i < 3; i++)
                fds[i] = eventfd(0, EFD_CLOEXEC);
        vhu_msg_init(&m);
        CHECK_EQ(m.n_fds, 0);
        CHECK_EQ(vhu_msg_take_fd(&m, 0), -1);
        CHECK(!m.fds_borrowed);                         /* a reader's message owns its fds */
        CHECK_EQ(vhu_msg_build_mem_table(&m, false, regions, fds, 3), 0);
        CHECK_EQ(vhu_msg_wire_size(&m), VHU_HEADER_SIZE + 8 + 3 * 32);
        /* built: the fds are borrowed, nothing to take, clear leaves them */
        CHECK(m.fds_borrowed);
        CHECK_EQ(vhu_msg_take_fd(&m, 1), -1);
        vhu_msg_clear(&m);
        CHECK(!m.fds_borrowed);
        for (int i = 0; i < 3; i++)
                CHECK(fcntl(fds[i], F_GETFD) >= 0);

        /* owned (as the reader hands them out): clear closes what was not taken */
        for (int i = 0; i < 3; i++)
                m.fds[i] = fds[i];
        m.n_fds = 3;
        CHECK_EQ(vhu_msg_take_fd(&m, 1), fds[1]);
        CHECK_EQ(vhu_msg_take_fd(&m, 1), -1);
        CHECK_EQ(vhu_msg_take_fd(&m, 3), -1);
        CHECK_EQ(vhu_msg_take_fd(&m, 100), -1);
        vhu_msg_clear(&m);                              /* closes fds[0] and fds[2] */
        CHECK_EQ(m.n_fds, 0);
        CHECK_EQ(m.hdr.size, 0);
        CHECK(fcntl(fds[0], F_GETFD) < 0 && errno == EBADF);
        CHECK(fcntl(fds[2], F_GETFD) < 0 && errno == EBADF);
        CHECK(fcntl(fds[1], F_GETFD) >= 0);             /* taken: still ours */
        close(fds[1]);
        vhu_msg_clear(&m);                              /* twice is fine */

        CHECK_EQ(vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_CALL, false, 0, test_fds[0]), 0);
        vhu_msg_clear(&m);
        CHECK(fcntl(test_fds[0], F_GETFD) >= 0);        /* borrowed fds survive */
}

/* spec "Postcopy": the front-end's u64 0 after the back-end's table reply,
 * and the table-shaped reply itself (what the daemon awaits). */
static void test_postcopy_mem_table(void) {
        struct vhu_msg m, r;
        uint64_t v;

        test_set_context("postcopy SET_MEM_TABLE confirmation");
        CHECK_EQ(vhu_msg_build_postcopy_mem_ack(&m, false), 0);
        CHECK_EQ(m.hdr.request, VHU_REQ_SET_MEM_TABLE);
        CHECK_EQ(m.hdr.flags, VHU_VERSION);
        CHECK_EQ(m.hdr.size, 8);
        CHECK_EQ(m.n_fds, 0);
        memcpy(&v, m.payload.raw, sizeof(v));
        CHECK_EQ(v, 0);
        CHECK_EQ(vhu_msg_build_postcopy_mem_ack(&m, true), 0);
        CHECK_EQ(m.hdr.flags, VHU_VERSION | VHU_FLAG_NEED_REPLY);

        test_set_context("postcopy SET_MEM_TABLE reply: the regions as mapped");
        vhu_msg_init(&r);
        r.hdr.request = VHU_REQ_SET_MEM_TABLE;
        r.hdr.flags = VHU_VERSION | VHU_FLAG_REPLY;
        r.hdr.size = 8 + 32;
        r.payload.mem_table.nregions = 1;
        /* awaited as if NEED_REPLY had been sent (vhub_bconn_send_awaiting) */
        CHECK_EQ(vhu_validate_reply(VHU_DIR_FRONTEND, VHU_REQ_SET_MEM_TABLE,
                                    VHU_VERSION | VHU_FLAG_NEED_REPLY, ALL_PF, &r, NULL), 0);
        r.payload.mem_table.nregions = 2;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_SET_MEM_TABLE, VHU_VERSION | VHU_FLAG_NEED_REPLY,
                             ALL_PF, &r);
        /* libvhost-user echoes NEED_REPLY into the reply's flags: refused */
        r.payload.mem_table.nregions = 1;
        r.hdr.flags = VHU_VERSION | VHU_FLAG_REPLY | VHU_FLAG_NEED_REPLY;
        CHECK_REPLY_REJECTED(VHU_DIR_FRONTEND, VHU_REQ_SET_MEM_TABLE, VHU_VERSION | VHU_FLAG_NEED_REPLY,
                             ALL_PF, &r);
        CHECK_EQ(sizeof(struct vhu_crypto_session), 632);
}

int main(void) {
        for (unsigned i = 0; i < VHU_MAX_FDS + 1; i++) {
                test_fds[i] = eventfd(0, EFD_CLOEXEC);
                if (test_fds[i] < 0) {
                        perror("eventfd");
                        return 1;
                }
        }

        test_table();
        test_feature_prerequisites();
        test_round_trip();
        test_decode_errors();
        test_header_flags();
        test_sizes_and_fds();
        test_mem_table_rules();
        test_vring_fd_rules();
        test_config_rules();
        test_inflight_rules();
        test_log_base_rules();
        test_rem_mem_reg_rules();
        test_small_request_rules();
        test_builder_errors();
        test_backend_rules();
        test_reply_rules();
        test_lifetime();
        test_postcopy_mem_table();

        for (unsigned i = 0; i < VHU_MAX_FDS + 1; i++)
                close(test_fds[i]);
        return test_finish("test-vhu-message");
}
