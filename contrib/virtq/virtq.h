/* SPDX-License-Identifier: MIT */
/*
 * A split virtqueue, driver side (virtio 1.x "Split Virtqueues"), over guest
 * memory the VMM owns.  All ring fields are little-endian in memory.
 *
 *   descriptor table  16 bytes x size, 16-byte aligned
 *   available ring    {le16 flags, le16 idx, le16 ring[size], le16 used_event}, 2-aligned
 *   used ring         {le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event}, 4-aligned
 *
 * vhub_virtq_new() lays the three parts out as the legacy layout does (used
 * ring on the next 4 KiB boundary), which satisfies both the modern and the
 * legacy alignment rules.
 *
 * Usage: vhub_virtq_add() a buffer chain (any number of times), then
 * vhub_virtq_publish() (one release barrier, then the avail index store),
 * vhub_virtq_kick().  Completion is judged only by the used index:
 * vhub_virtq_reap() reads it with acquire semantics.  The call eventfd is a
 * hint to wake up, never a completion (qemu-storage-daemon signals it once
 * when it receives SET_VRING_CALL).  The device may complete chains in any
 * order; each used element names its chain by head id.
 *
 * Not thread-safe; one driver per ring.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "guest-mem.h"

#define VHUB_VIRTQ_MAX_SIZE 32768u

#define VHUB_VRING_DESC_F_NEXT 1u
#define VHUB_VRING_DESC_F_WRITE 2u
#define VHUB_VRING_DESC_F_INDIRECT 4u
#define VHUB_VRING_AVAIL_F_NO_INTERRUPT 1u
#define VHUB_VRING_USED_F_NO_NOTIFY 1u

struct vhub_vring_desc {
        uint64_t addr;  /* le */
        uint32_t len;   /* le */
        uint16_t flags; /* le */
        uint16_t next;  /* le */
};

struct vhub_vring_avail {
        uint16_t flags;
        uint16_t idx;
        uint16_t ring[]; /* [size], then le16 used_event */
};

struct vhub_vring_used_elem {
        uint32_t id;
        uint32_t len;
};

struct vhub_vring_used {
        uint16_t flags;
        uint16_t idx;
        struct vhub_vring_used_elem ring[]; /* [size], then le16 avail_event */
};

/* Where the parts of a ring of `size` entries go, relative to its start. */
struct vhub_virtq_layout {
        uint64_t desc_offset, desc_bytes;
        uint64_t avail_offset, avail_bytes;
        uint64_t used_offset, used_bytes;
        uint64_t total_bytes;
};
void vhub_virtq_layout(uint16_t size, struct vhub_virtq_layout *ret);

/* One element of a buffer chain: guest-physical address, length, and
 * whether the device writes it (device-readable buffers come first). */
struct vhub_virtq_buf {
        uint64_t gpa;
        uint32_t len;
        bool device_writable;
};

struct vhub_virtq;

/*
 * A ring of `size` entries (a power of two, 1..32768) for virtqueue `index`,
 * its memory allocated from mem (which must outlive the ring), starting at
 * avail/used index `base` (what device.start's "base" says; both indexes in
 * guest memory are initialized to it).  Creates the kick and call eventfds
 * (EFD_CLOEXEC | EFD_NONBLOCK), owned by the ring.
 */
int vhub_virtq_new(struct vhub_guest_mem *mem, uint16_t index, uint16_t size, uint16_t base,
                   struct vhub_virtq **ret);
/* Closes the eventfds; the guest memory stays allocated.  NULL-safe. */
struct vhub_virtq *vhub_virtq_free(struct vhub_virtq *vq);

uint16_t vhub_virtq_index(const struct vhub_virtq *vq);
uint16_t vhub_virtq_size(const struct vhub_virtq *vq);
uint64_t vhub_virtq_desc_gpa(const struct vhub_virtq *vq);
uint64_t vhub_virtq_avail_gpa(const struct vhub_virtq *vq);
uint64_t vhub_virtq_used_gpa(const struct vhub_virtq *vq);
int vhub_virtq_kick_fd(const struct vhub_virtq *vq);
int vhub_virtq_call_fd(const struct vhub_virtq *vq);
/* The mapped parts, for a device played in a test. */
struct vhub_vring_desc *vhub_virtq_desc(const struct vhub_virtq *vq);
struct vhub_vring_avail *vhub_virtq_avail(const struct vhub_virtq *vq);
struct vhub_vring_used *vhub_virtq_used(const struct vhub_virtq *vq);

unsigned vhub_virtq_num_free(const struct vhub_virtq *vq);      /* free descriptors */
unsigned vhub_virtq_num_inflight(const struct vhub_virtq *vq);  /* chains added, not reaped */
uint16_t vhub_virtq_next_avail(const struct vhub_virtq *vq);    /* avail idx after publish */
uint16_t vhub_virtq_last_used(const struct vhub_virtq *vq);     /* used idx reaped up to */
uint64_t vhub_virtq_total_added(const struct vhub_virtq *vq);   /* chains added since new */

/* Suppress (or re-enable) used-buffer notifications: VRING_AVAIL_F_NO_INTERRUPT. */
void vhub_virtq_set_interrupts(struct vhub_virtq *vq, bool enabled);

/*
 * Put a chain of n buffers into the descriptor table and its head into the
 * next available slot (not yet visible to the device: vhub_virtq_publish()).
 * cookie comes back from vhub_virtq_reap().  Returns the head id (>= 0),
 * -ENOSPC if fewer than n descriptors are free, -EINVAL on n == 0 or a
 * zero-length buffer.
 */
int vhub_virtq_add(struct vhub_virtq *vq, const struct vhub_virtq_buf *bufs, unsigned n, void *cookie);

/* Make every added chain visible: release barrier, then store avail idx. */
void vhub_virtq_publish(struct vhub_virtq *vq);

/* Notify the device: a full barrier, then write 1 to the kick eventfd
 * (unless the device set VRING_USED_F_NO_NOTIFY).  0 or -errno. */
int vhub_virtq_kick(struct vhub_virtq *vq);

/*
 * Reap one completion: 1 with *ret_cookie and *ret_len (either may be NULL),
 * 0 if the used index shows nothing new, -EPROTO if the device named a head
 * that is not in flight (the ring is then unusable).
 */
int vhub_virtq_reap(struct vhub_virtq *vq, void **ret_cookie, uint32_t *ret_len);

/* How many used elements are ready to reap (acquire read of used idx). */
unsigned vhub_virtq_used_pending(struct vhub_virtq *vq);

/*
 * Wait until at least one used element is ready: returns how many (> 0),
 * or -ETIMEDOUT.  Sleeps on the call eventfd (draining it) but re-checks
 * the used index at least every 50 ms, so a spurious call is ignored and a
 * missed one only costs latency.
 */
int vhub_virtq_wait_used(struct vhub_virtq *vq, int timeout_ms);
