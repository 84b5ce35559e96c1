/* SPDX-License-Identifier: MIT */
/*
 * The VMM's back-end channel: the socket the VMM passed with
 * SET_BACKEND_REQ_FD.  Here vhubd is the back-end side of the spec's
 * "Back-end communication": it sends back-end requests to the VMM
 * (CONFIG_CHANGE_MSG, VRING_HOST_NOTIFIER_MSG, IOTLB_MSG, ...) and reads
 * the VMM's replies.  A leaf like vhub-vmm-conn: protocol/ and libevent.
 *
 * Every request is validated before it goes out
 * (vhu_validate_request(VHU_DIR_BACKEND) against the protocol features the
 * VMM negotiated), so the VMM never gets a request or an fd it did not ask
 * for.  A request the VMM will answer (NEED_REPLY with REPLY_ACK, or one
 * with its own reply) is awaited in order with its own deadline, and gets
 * exactly one ops->on_answer: the validated reply, or NULL when no reply
 * will come (the deadline passed, the VMM closed the channel or broke the
 * protocol).  Then ops->on_lost reports the loss once, from the loop.  The
 * VMM's main connection is not touched: what a lost channel means is the
 * face's decision (QEMU itself just stops reading a broken channel).
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "vhu-message.h"
#include "vhu-socket.h"

struct event_base;
struct vhub_vmm_channel;

struct vhub_vmm_channel_ops {
        /* The answer to the request sent with tag: the VMM's reply (validated;
         * the callee may take its fds), or NULL if none will come. */
        void (*on_answer)(void *userdata, uint32_t tag, uint32_t request, struct vhu_msg *reply);
        /* The channel is lost (after the on_answer(NULL) of every awaited request). */
        void (*on_lost)(void *userdata, bool timeout, const char *reason);
        /* Optional: the fds it holds (a message half-read, dups of requests
         * waiting to go) changed; only take note. */
        void (*on_fds_changed)(void *userdata);
};

/*
 * fd: the VMM's end of its socketpair, taken in every case; anything but
 * an AF_UNIX stream socket is -ENOTSOCK (a VMM may send any fd).  timeout_ms
 * bounds every awaited reply and a stalled write; max_pending the requests
 * awaiting replies (and queued unsent ones).
 */
int vhub_vmm_channel_new(struct event_base *base, int fd, unsigned timeout_ms, unsigned max_pending,
                         const struct vhub_vmm_channel_ops *ops, void *userdata,
                         struct vhub_vmm_channel **ret);
/* Closes the channel; awaited replies are dropped without callbacks.
 * NULL-safe; may be called from inside a callback; returns NULL. */
struct vhub_vmm_channel *vhub_vmm_channel_free(struct vhub_vmm_channel *ch);

/* The protocol features the VMM negotiated on its main connection. */
void vhub_vmm_channel_set_protocol_features(struct vhub_vmm_channel *ch, uint64_t protocol_features);

/*
 * Send m (fds borrowed, dup'd).  Returns 1 if a reply is awaited under tag,
 * 0 if the VMM answers nothing, -EINVAL for a request the negotiated set
 * does not allow, or NEED_REPLY without REPLY_ACK (QEMU answers NEED_REPLY
 * even then; nothing is sent), -ENOBUFS past max_pending, -ENOTCONN once
 * lost.
 */
int vhub_vmm_channel_send(struct vhub_vmm_channel *ch, const struct vhu_msg *m, uint32_t tag);
/* No reply awaited, nothing half-read or queued: a restart can carry it. */
bool vhub_vmm_channel_at_rest(const struct vhub_vmm_channel *ch);
unsigned vhub_vmm_channel_awaiting(const struct vhub_vmm_channel *ch);
bool vhub_vmm_channel_is_lost(const struct vhub_vmm_channel *ch);
/* Every fd it holds: the socket (what NULL), "in", "out" (vmm-stream). */
int vhub_vmm_channel_fd(const struct vhub_vmm_channel *ch);
void vhub_vmm_channel_foreach_fd(const struct vhub_vmm_channel *ch, vhu_fd_fn fn, void *userdata);
