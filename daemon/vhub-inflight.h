/* SPDX-License-Identifier: MIT */
/*
 * The inflight region a device keeps (INFLIGHT_SHMFD), read the way the
 * spec's "Inflight I/O tracking" (split virtqueues) describes it: how many
 * requests of a ring a stopped back-end left suspended there
 * (GET_VRING_BASE_INFLIGHT, GET_VRING_BASE_SKIP_DRAIN).
 */
#pragma once

#include <stdint.h>

/*
 * Count the heads of ring `queue` marked in flight, as the next back-end
 * would resubmit them: a last batch the used index has already passed
 * (ring_used_idx, read from guest memory) is not counted.  The region is
 * read with pread(), never mapped: it is the back-end's, and a hostile one
 * may be short or garbled, and it is read only if it is a memory file
 * (memfd or tmpfs: reading cannot block the loop), else -EBADFD.  0 with
 * *ret_count; -ERANGE if the ring's part lies beyond size or the fd,
 * -EPROTO for a malformed header, -errno.
 */
int vhub_inflight_count_split(int fd, uint64_t size, uint16_t queue_size, unsigned queue,
                              uint16_t ring_used_idx, unsigned *ret_count);
