/* SPDX-License-Identifier: MIT */
/*
 * virtio-blk requests over a vhub_virtq (virtio 1.x "Block Device").
 *
 * A request is a chain: the 16-byte header {le32 type, le32 reserved,
 * le64 sector} (device-readable), the data buffer (device-readable for OUT,
 * device-writable for IN and GET_ID, absent for FLUSH), and one
 * device-writable status byte.  Headers and status bytes live in guest
 * memory the queue allocates; data buffers are the caller's, in the same
 * guest memory.
 *
 * Submit any number (vhub_blk_submit()), then vhub_blk_notify() publishes
 * and kicks once; vhub_blk_wait_all() reaps until nothing is in flight,
 * whatever order the device completes in.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "guest-mem.h"
#include "virtq.h"

#define VHUB_BLK_T_IN 0u
#define VHUB_BLK_T_OUT 1u
#define VHUB_BLK_T_FLUSH 4u
#define VHUB_BLK_T_GET_ID 8u

#define VHUB_BLK_S_OK 0u
#define VHUB_BLK_S_IOERR 1u
#define VHUB_BLK_S_UNSUPP 2u

#define VHUB_BLK_SECTOR_SIZE 512u
#define VHUB_BLK_ID_BYTES 20u

/* virtio-blk feature bits the example cares about */
#define VHUB_BLK_F_SIZE_MAX 1
#define VHUB_BLK_F_SEG_MAX 2
#define VHUB_BLK_F_BLK_SIZE 6
#define VHUB_BLK_F_FLUSH 9
#define VHUB_BLK_F_MQ 12
#define VHUB_VIRTIO_F_VERSION_1 32

struct vhub_blk_req {
        /* in: what to do */
        uint32_t type;          /* VHUB_BLK_T_* */
        uint64_t sector;        /* in 512-byte units (IN/OUT) */
        uint64_t data_gpa;      /* IN/OUT: a multiple of 512 bytes; GET_ID: 20 */
        uint32_t data_len;      /* 0 for FLUSH */

        /* out: filled when it completes */
        bool done;
        uint8_t status;         /* VHUB_BLK_S_* */
        uint32_t used_len;      /* bytes the device says it wrote */

        /* private */
        unsigned slot;
};

struct vhub_blk_queue;

/* Header and status slots for as many requests as vq can hold, allocated
 * from mem; vq stays owned by the caller and must outlive the queue. */
int vhub_blk_queue_new(struct vhub_guest_mem *mem, struct vhub_virtq *vq, struct vhub_blk_queue **ret);
struct vhub_blk_queue *vhub_blk_queue_free(struct vhub_blk_queue *q);

/* Add one request to the ring (not yet published).  req must stay valid
 * until it is done.  -ENOSPC when the ring is full, -EINVAL on a bad req. */
int vhub_blk_submit(struct vhub_blk_queue *q, struct vhub_blk_req *req);
/* Publish everything submitted and kick the device once. */
int vhub_blk_notify(struct vhub_blk_queue *q);
/* Reap what is complete now: how many completed, or -EPROTO. */
int vhub_blk_process_completions(struct vhub_blk_queue *q);
/* Reap until no request is in flight: 0, -ETIMEDOUT or -EPROTO. */
int vhub_blk_wait_all(struct vhub_blk_queue *q, int timeout_ms);

unsigned vhub_blk_inflight(const struct vhub_blk_queue *q);
uint64_t vhub_blk_submitted(const struct vhub_blk_queue *q);
uint64_t vhub_blk_completed(const struct vhub_blk_queue *q);

const char *vhub_blk_type_name(uint32_t type);
const char *vhub_blk_status_name(uint8_t status);
