/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target for the vhost-user message parser and validators.
 *
 * Input layout (so the fuzzer also explores fd counts and negotiated
 * features, which travel outside the byte stream):
 *   byte 0      number of fds "received" with each message (mod 10, so one
 *               more than a message may carry)
 *   bytes 1..8  negotiated protocol features (host byte order)
 *   bytes 9..   vhost-user wire bytes: as many messages as decode
 *
 * Every decoded message is validated as a request of both directions and as
 * a reply to every request.  Invariants checked (abort on violation):
 * decode -> encode gives the same bytes; a rejection always says why; a
 * request the validator accepts is one the builder also accepts, and
 * builds to the same bytes.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vhu-message.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FAKE_FD_BASE 1000 /* never opened, never closed: validators only count fds */

static uint8_t encode_buf[VHU_HEADER_SIZE + VHU_MAX_PAYLOAD];
static struct vhu_msg msg, built;

static void check_request(enum vhu_direction dir, uint64_t pf, const struct vhu_msg *m,
                          const uint8_t *wire, size_t len) {
        const char *why = NULL;
        int r;

        r = vhu_validate_request(dir, pf, m, &why);
        if (r != 0 && (r != -EPROTO || !why))
                abort();
        if (!vhu_request_name(dir, m->hdr.request))
                abort();
        (void) vhu_request_expects_reply(dir, m->hdr.request, m->hdr.flags, pf);
        if (r != 0)
                return;

        /* Accepted: the builder must agree and produce the same bytes. */
        vhu_msg_init(&built);
        r = vhu_msg_build(&built, dir, m->hdr.request, m->hdr.flags & VHU_FLAG_NEED_REPLY,
                          m->payload.raw, m->hdr.size, m->fds, m->n_fds);
        if (r != 0)
                abort();
        if (vhu_msg_encode(&built, encode_buf, sizeof(encode_buf)) != len ||
            memcmp(encode_buf, wire, len) != 0)
                abort();
        vhu_msg_forget_fds(&built);
}

static void check_as_reply(enum vhu_direction dir, uint64_t pf, const struct vhu_msg *m) {
        uint32_t max = dir == VHU_DIR_FRONTEND ? _VHU_REQ_MAX : _VHU_BREQ_MAX;

        for (uint32_t req = 0; req <= max; req++)
                for (int need = 0; need < 2; need++) {
                        uint32_t flags = VHU_VERSION | (need ? VHU_FLAG_NEED_REPLY : 0);
                        const char *why = NULL;
                        int r;

                        r = vhu_validate_reply(dir, req, flags, pf, m, &why);
                        if (r == 0)
                                continue;
                        if (!why)
                                abort();
                        if (r == -EINVAL && vhu_request_info(dir, req) == NULL)
                                continue;
                        if (r != -EPROTO)
                                abort();
                }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        unsigned n_fds;
        uint64_t pf;

        if (size < 9)
                return 0;
        n_fds = data[0] % (VHU_MAX_FDS + 2);
        memcpy(&pf, data + 1, sizeof(pf));
        data += 9;
        size -= 9;

        while (size > 0) {
                int k;

                vhu_msg_init(&msg);
                k = vhu_msg_decode(&msg, data, size);
                if (k == -EAGAIN || k == -EPROTO)
                        break;
                if (k < VHU_HEADER_SIZE || (size_t) k > size)
                        abort();
                if (vhu_msg_encode(&msg, encode_buf, sizeof(encode_buf)) != (size_t) k ||
                    memcmp(encode_buf, data, (size_t) k) != 0)
                        abort();

                /* n_fds may exceed VHU_MAX_FDS: validators must not look past fds[]. */
                for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                        msg.fds[i] = FAKE_FD_BASE + (int) i;
                msg.n_fds = n_fds;

                check_request(VHU_DIR_FRONTEND, pf, &msg, data, (size_t) k);
                check_request(VHU_DIR_BACKEND, pf, &msg, data, (size_t) k);
                check_as_reply(VHU_DIR_FRONTEND, pf, &msg);
                check_as_reply(VHU_DIR_BACKEND, pf, &msg);

                vhu_msg_forget_fds(&msg);
                data += k;
                size -= (size_t) k;
        }
        return 0;
}
