/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target for what a vhost-user *back-end* face decodes: requests
 * in the VHU_DIR_FRONTEND direction as they come from a VMM, validated
 * against the protocol features negotiated so far, acted on as far as
 * their shape goes, and answered.  Today this is the protocol/ code that
 * tests/backend uses; the daemon's VMM-facing "front door" will put its
 * decoder behind session_handle() and keep this corpus.
 *
 * Input layout:
 *   bytes 0..7  protocol features the back-end offers (host byte order)
 *   then, repeated: one byte (% 10: fds that come with the message, one
 *   more than a message may carry), then vhost-user wire bytes of one
 *   message
 *
 * Invariants (abort on violation): a rejection says why and ends the
 * session, as a back-end drops such a front-end; an accepted request has
 * the shape its consumer relies on (sizes, fd counts, region counts, the
 * no-fd bit); every reply the back-end builds for an accepted request is
 * one the front-end's reply validator accepts.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vhu-message.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FAKE_FD_BASE 1000 /* never opened, never closed: nothing here uses the fds */

struct session {
        uint64_t offered_pf;  /* what GET_PROTOCOL_FEATURES answers */
        uint64_t pf;          /* negotiated by SET_PROTOCOL_FEATURES */
        unsigned n_regions;   /* mapped with ADD_MEM_REG/SET_MEM_TABLE, as a count */
};

static struct vhu_msg msg, reply;

static uint64_t payload_u64(const struct vhu_msg *m) {
        uint64_t v;

        memcpy(&v, m->payload.raw, sizeof(v));
        return v;
}

/* What a consumer of an accepted request takes for granted. */
static void check_accepted_shape(const struct session *s, const struct vhu_msg *m) {
        const struct vhu_request_info *info = vhu_request_info(VHU_DIR_FRONTEND, m->hdr.request);
        uint32_t nregions, config_size;
        uint64_t v;

        if (!info || m->hdr.size < info->min_size || m->hdr.size > info->max_size ||
            m->n_fds < info->min_fds || m->n_fds > info->max_fds || m->n_fds > VHU_MAX_FDS)
                abort();
        if (info->protocol_feature >= 0 && !(s->pf & VHU_PF_BIT(info->protocol_feature)))
                abort();
        switch (m->hdr.request) {
        case VHU_REQ_SET_MEM_TABLE:
                memcpy(&nregions, m->payload.raw, sizeof(nregions));
                if (nregions < 1 || nregions > VHU_MEM_TABLE_MAX_REGIONS || m->n_fds != nregions ||
                    m->hdr.size != 8 + nregions * sizeof(struct vhu_mem_region))
                        abort();
                break;
        case VHU_REQ_SET_VRING_KICK:
        case VHU_REQ_SET_VRING_CALL:
        case VHU_REQ_SET_VRING_ERR:
                v = payload_u64(m);
                if ((v & ~(uint64_t) (VHU_VRING_IDX_MASK | VHU_VRING_NOFD_MASK)) != 0 ||
                    ((v & VHU_VRING_NOFD_MASK) != 0) != (m->n_fds == 0))
                        abort();
                break;
        case VHU_REQ_GET_CONFIG:
        case VHU_REQ_SET_CONFIG:
                memcpy(&config_size, m->payload.raw + 4, sizeof(config_size));
                if (config_size > VHU_MAX_CONFIG_SIZE ||
                    m->hdr.size != VHU_CONFIG_HEADER_SIZE + config_size)
                        abort();
                break;
        case VHU_REQ_ADD_MEM_REG:
                if (m->n_fds != 1)
                        abort();
                break;
        case VHU_REQ_SET_LOG_BASE:
                if ((s->pf & VHU_PF_BIT(VHU_PF_LOG_SHMFD)) && m->n_fds != 1)
                        abort();
                break;
        default:
                break;
        }
}

/* The reply a back-end gives: its own payload (the smallest allowed, a
 * config echoed, an fd where one is due) or a REPLY_ACK of 0. */
static int build_reply(const struct session *s, const struct vhu_msg *m, struct vhu_msg *r) {
        const struct vhu_request_info *info = vhu_request_info(VHU_DIR_FRONTEND, m->hdr.request);
        static const uint8_t zero[VHU_MAX_PAYLOAD];
        int fd = FAKE_FD_BASE;
        bool own = info->reply == VHU_REPLY_ALWAYS ||
                   (info->reply == VHU_REPLY_IF_LOG_SHMFD && (s->pf & VHU_PF_BIT(VHU_PF_LOG_SHMFD)));

        if (!own)
                return vhu_msg_build_reply_u64(r, m, 0);
        switch (m->hdr.request) {
        case VHU_REQ_GET_PROTOCOL_FEATURES:
                return vhu_msg_build_reply_u64(r, m, s->offered_pf);
        case VHU_REQ_GET_CONFIG:
                return vhu_msg_build_reply(r, m, m->payload.raw, m->hdr.size, NULL, 0);
        case VHU_REQ_GET_INFLIGHT_FD:
        case VHU_REQ_POSTCOPY_ADVISE:
                return vhu_msg_build_reply(r, m, zero, info->reply_min_size, &fd, 1);
        default:
                return vhu_msg_build_reply(r, m, zero, info->reply_min_size, NULL, 0);
        }
}

/* One request as the back-end face handles it; false ends the session. */
static bool session_handle(struct session *s, const struct vhu_msg *m) {
        const char *why = NULL;
        int r;

        r = vhu_validate_request(VHU_DIR_FRONTEND, s->pf, m, &why);
        if (r < 0) {
                if (r != -EPROTO || !why)
                        abort();
                return false;
        }
        check_accepted_shape(s, m);

        switch (m->hdr.request) {
        case VHU_REQ_SET_PROTOCOL_FEATURES:
                /* bits the back-end never offered are refused */
                if (payload_u64(m) & ~s->offered_pf)
                        return false;
                s->pf = payload_u64(m);
                break;
        case VHU_REQ_SET_MEM_TABLE:
                s->n_regions = m->n_fds;
                break;
        case VHU_REQ_ADD_MEM_REG:
                s->n_regions++;
                break;
        case VHU_REQ_REM_MEM_REG:
                if (s->n_regions > 0)
                        s->n_regions--;
                break;
        default:
                break;
        }

        if (!vhu_request_expects_reply(VHU_DIR_FRONTEND, m->hdr.request, m->hdr.flags, s->pf))
                return true;
        vhu_msg_init(&reply);
        if (build_reply(s, m, &reply) != 0)
                abort();
        why = NULL;
        if (vhu_validate_reply(VHU_DIR_FRONTEND, m->hdr.request, m->hdr.flags, s->pf, &reply,
                               &why) != 0)
                abort();
        vhu_msg_forget_fds(&reply);
        return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct session s = { 0 };

        if (size < 8)
                return 0;
        memcpy(&s.offered_pf, data, sizeof(s.offered_pf));
        data += 8;
        size -= 8;

        while (size > 1) {
                unsigned n_fds = data[0] % (VHU_MAX_FDS + 2);
                bool go_on;
                int k;

                vhu_msg_init(&msg);
                k = vhu_msg_decode(&msg, data + 1, size - 1);
                if (k < 0)
                        break;
                /* n_fds may exceed VHU_MAX_FDS: the validator must not look past fds[]. */
                for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                        msg.fds[i] = FAKE_FD_BASE + (int) i;
                msg.n_fds = n_fds;
                go_on = session_handle(&s, &msg);
                vhu_msg_forget_fds(&msg);
                if (!go_on)
                        break;
                data += 1 + (size_t) k;
                size -= 1 + (size_t) k;
        }
        return 0;
}
