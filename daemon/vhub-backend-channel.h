/* SPDX-License-Identifier: MIT */
/*
 * The back-end's request channel (SET_BACKEND_REQ_FD): the daemon keeps its
 * end of a socketpair, reads and validates every back-end request, acts on
 * it, and answers NEED_REPLY exactly once (a request with its own reply,
 * SHARED_OBJECT_LOOKUP, gets that reply and no extra ack).
 *
 * While a request waits for someone else -- an exporter device answering
 * GET_SHARED_OBJECT, or the VMM answering a forwarded request -- the channel
 * reads nothing more, so replies go back in order; a deadline bounds the
 * wait.  Everything else in the daemon keeps running meanwhile.
 *
 * Back-pressure: requests that become events for the VMM (CONFIG_CHANGE_MSG,
 * the forwarded ones, often carrying fds) must never make the daemon drop
 * the VMM's connection.  While the VM's owner is behind on its events
 * (vhub_context_events_congested()) the channel stops reading, so the
 * back-ends that flood wait, not the VMM; it reads again once the owner has
 * caught up.  If that takes longer than --backend-timeout-ms, the channel
 * reads on and refuses such requests (failing those that want a reply,
 * dropping the others, counted and logged) until the owner catches up.
 */
#pragma once

#include <stdint.h>

struct vhub_device;
struct vhub_backend_channel;

/* Takes fd (the daemon's end). */
int vhub_backend_channel_new(struct vhub_device *dev, int fd, struct vhub_backend_channel **ret);
struct vhub_backend_channel *vhub_backend_channel_free(struct vhub_backend_channel *ch);

/* The exporter answered a lookup this channel waits for (fd < 0: failed).
 * fd is taken. */
void vhub_backend_channel_lookup_done(struct vhub_backend_channel *ch, uint64_t token, int fd);
/* The VM's owner caught up on its events (or changed): read again. */
void vhub_backend_channel_vmm_caught_up(struct vhub_backend_channel *ch);
/* The VMM answered a forwarded request: 0, or -ENOENT (unknown or expired). */
int vhub_backend_channel_reply(struct vhub_backend_channel *ch, uint64_t token, uint64_t result);
