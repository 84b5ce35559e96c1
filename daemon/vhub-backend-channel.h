/* SPDX-License-Identifier: MIT */
/*
 * The back-end's request channel (SET_BACKEND_REQ_FD): the daemon keeps its
 * end of a socketpair, reads and validates every back-end request, and
 * answers NEED_REPLY exactly once.
 */
#pragma once

#include <stdint.h>

struct vhub_device;
struct vhub_backend_channel;

/* Takes fd (the daemon's end). */
int vhub_backend_channel_new(struct vhub_device *dev, int fd, struct vhub_backend_channel **ret);
struct vhub_backend_channel *vhub_backend_channel_free(struct vhub_backend_channel *ch);
