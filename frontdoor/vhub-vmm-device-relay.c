/* SPDX-License-Identifier: MIT */
/*
 * A front-door device's side of the VMM's back-end channel: opened by
 * SET_BACKEND_REQ_FD, back-end requests the model relays sent on it, each
 * awaited answer handed back with its token (vhub-vmm-device.c for the
 * object).
 */

#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <unistd.h>

#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-fd-claim.h"
#include "vhub-fd-track.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-snapshot.h"
#include "vhub-vmm-channel.h"
#include "vhub-vmm-conn.h"
#include "vhub-vmm-device.h"
#include "vhub-vmm-listener.h"
#include "vhu-fd.h"

#include "vhub-vmm-device-internal.h"

/* ---- the VMM's back-end channel ---- */

/* Every relayed request still awaited gets a failure: the VMM will not answer. */
void vd_relay_fail_all(struct vhub_vmm_device *vd) {
        while (vd->relay_count > 0) {
                uint64_t token = vd->relay_tokens[vd->relay_head];

                vd->relay_head = (vd->relay_head + 1) % RELAY_MAX;
                vd->relay_count--;
                if (!vd->dead)
                        vhub_device_vmm_relay_answered(vd->dev, token, 1);
                if (vd->relay_count == 0)
                        vd_settle(vd);
        }
}

static void channel_on_answer(void *userdata, uint32_t tag, uint32_t request, struct vhu_msg *reply) {
        struct vhub_vmm_device *vd = userdata;
        uint64_t token;

        if (vd->relay_count == 0)
                return;
        token = vd->relay_tokens[vd->relay_head];
        vd->relay_head = (vd->relay_head + 1) % RELAY_MAX;
        vd->relay_count--;
        vd_enter(vd);
        /* a u64: 0 is success; none (a closed or silent channel) is a failure */
        vhub_device_vmm_relay_answered(vd->dev, token,
                                       reply && reply->hdr.size == sizeof(uint64_t) ? reply->payload.u64 : 1);
        if (vd->relay_count == 0)
                vd_settle(vd);
        vd_leave(vd);
}

static void channel_on_lost(void *userdata, bool timeout, const char *reason) {
        struct vhub_vmm_device *vd = userdata;

        vd_log(vd, LOG_WARNING, NULL, "the VMM's back-end channel is gone: %s", reason);
        vd->channel = vd_channel_free(vd);
        vd_enter(vd);
        vd_relay_fail_all(vd);
        vd_leave(vd);
}

const struct vhub_vmm_channel_ops vd_channel_ops = {
        .on_answer = channel_on_answer,
        .on_lost = channel_on_lost,
        .on_fds_changed = vd_fds_changed,
};

int vd_relay(void *face, const struct vhu_msg *m, uint64_t token) {
        struct vhub_vmm_device *vd = face;
        struct vhu_msg out;
        int r;

        if (!vd->conn || !vd->channel || vhub_vmm_channel_is_lost(vd->channel))
                return -ENOTCONN;
        out = *m;
        /* an answer is asked for only where the VMM negotiated acks */
        if (!(vhub_vmm_conn_protocol_features(vd->conn) & VHU_PF_BIT(VHU_PF_REPLY_ACK)))
                out.hdr.flags &= ~VHU_FLAG_NEED_REPLY;
        if ((out.hdr.flags & VHU_FLAG_NEED_REPLY) && vd->relay_count == RELAY_MAX)
                return -ENOBUFS;
        /* an answer will be owed to this process */
        if ((out.hdr.flags & VHU_FLAG_NEED_REPLY) && !vd_leave_rest(vd))
                return -ENOTCONN;
        r = vhub_vmm_channel_send(vd->channel, &out, ++vd->relay_tag);
        if (r > 0) {
                vd->relay_tokens[(vd->relay_head + vd->relay_count) % RELAY_MAX] = token;
                vd->relay_count++;
        } else if (r == 0 && !vhub_vmm_channel_at_rest(vd->channel)) {
                /* not all written (the VMM does not read its channel): what
                 * waits in the writer would be lost with a crash that
                 * carries the session; nothing else may write the snapshot
                 * soon (a relay's token costs none) */
                vd_leave_rest(vd);
        }
        return r;
}

/* SET_BACKEND_REQ_FD: the VMM's channel replaces any earlier one. */
int vd_channel_open(struct vhub_vmm_device *vd, struct vhu_msg *m) {
        int fd = vhu_msg_take_fd(m, 0), r;

        if (vd->channel) {
                vd->channel = vd_channel_free(vd);
                vd_relay_fail_all(vd);
        }
        r = vhub_vmm_channel_new(vd->base, fd, vd->limits.backend_timeout_ms, RELAY_MAX, &vd_channel_ops, vd,
                                 &vd->channel);
        if (r < 0)
                return r;
        vd_fd_note(vd, true, vhub_vmm_channel_fd(vd->channel), "chan");
        vhub_vmm_channel_set_protocol_features(vd->channel, vhub_vmm_conn_protocol_features(vd->conn));
        return 0;
}
