/* SPDX-License-Identifier: MIT */
#include "virtio-blk.h"
#include "virtq-clock.h"

#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define HDR_BYTES 16u
#define STATUS_POISON 0xffu

struct blk_hdr {
        uint32_t type;          /* le */
        uint32_t reserved;      /* le (ioprio in legacy) */
        uint64_t sector;        /* le */
};

struct vhub_blk_queue {
        struct vhub_guest_mem *mem;
        struct vhub_virtq *vq;
        unsigned n_slots;
        uint64_t hdr_gpa;       /* n_slots headers */
        uint64_t status_gpa;    /* n_slots status bytes */
        struct blk_hdr *hdr;
        uint8_t *status;
        unsigned *free_slots;   /* stack */
        unsigned n_free;
        uint64_t submitted, completed;
};

int vhub_blk_queue_new(struct vhub_guest_mem *mem, struct vhub_virtq *vq, struct vhub_blk_queue **ret) {
        struct vhub_blk_queue *q;
        int r;

        q = calloc(1, sizeof(*q));
        if (!q)
                return -ENOMEM;
        q->mem = mem;
        q->vq = vq;
        /* every request takes at least two descriptors */
        q->n_slots = vhub_virtq_size(vq) / 2 ? vhub_virtq_size(vq) / 2 : 1;

        r = vhub_guest_mem_alloc(mem, (uint64_t)HDR_BYTES * q->n_slots, 16, &q->hdr_gpa);
        if (r < 0)
                goto fail;
        r = vhub_guest_mem_alloc(mem, q->n_slots, 16, &q->status_gpa);
        if (r < 0)
                goto fail;
        q->hdr = vhub_guest_mem_at(mem, q->hdr_gpa, (uint64_t)HDR_BYTES * q->n_slots);
        q->status = vhub_guest_mem_at(mem, q->status_gpa, q->n_slots);
        q->free_slots = calloc(q->n_slots, sizeof(*q->free_slots));
        if (!q->free_slots) {
                r = -ENOMEM;
                goto fail;
        }
        for (unsigned i = 0; i < q->n_slots; i++)
                q->free_slots[i] = q->n_slots - 1 - i;
        q->n_free = q->n_slots;
        *ret = q;
        return 0;
fail:
        vhub_blk_queue_free(q);
        return r;
}

struct vhub_blk_queue *vhub_blk_queue_free(struct vhub_blk_queue *q) {
        if (!q)
                return NULL;
        free(q->free_slots);
        free(q);
        return NULL;
}

int vhub_blk_submit(struct vhub_blk_queue *q, struct vhub_blk_req *req) {
        struct vhub_virtq_buf bufs[3];
        unsigned n = 0, slot;
        int r;

        switch (req->type) {
        case VHUB_BLK_T_IN:
        case VHUB_BLK_T_OUT:
                if (req->data_len == 0 || req->data_len % VHUB_BLK_SECTOR_SIZE != 0)
                        return -EINVAL;
                break;
        case VHUB_BLK_T_GET_ID:
                if (req->data_len < VHUB_BLK_ID_BYTES)
                        return -EINVAL;
                break;
        case VHUB_BLK_T_FLUSH:
                if (req->data_len != 0)
                        return -EINVAL;
                break;
        default:
                break; /* any other type goes out as asked, e.g. to probe UNSUPP */
        }
        if (req->data_len > 0 && !vhub_guest_mem_at(q->mem, req->data_gpa, req->data_len))
                return -EFAULT;
        if (q->n_free == 0 || vhub_virtq_num_free(q->vq) < (req->data_len ? 3u : 2u))
                return -ENOSPC;

        slot = q->free_slots[q->n_free - 1];
        q->hdr[slot].type = htole32(req->type);
        q->hdr[slot].reserved = 0;
        q->hdr[slot].sector = htole64(req->type == VHUB_BLK_T_FLUSH || req->type == VHUB_BLK_T_GET_ID
                                              ? 0 : req->sector);
        q->status[slot] = STATUS_POISON;

        bufs[n++] = (struct vhub_virtq_buf){ q->hdr_gpa + (uint64_t)HDR_BYTES * slot, HDR_BYTES, false };
        if (req->data_len > 0)
                bufs[n++] = (struct vhub_virtq_buf){ req->data_gpa, req->data_len,
                                                     req->type != VHUB_BLK_T_OUT };
        bufs[n++] = (struct vhub_virtq_buf){ q->status_gpa + slot, 1, true };

        r = vhub_virtq_add(q->vq, bufs, n, req);
        if (r < 0)
                return r;
        q->n_free--;
        req->slot = slot;
        req->done = false;
        req->status = STATUS_POISON;
        req->used_len = 0;
        q->submitted++;
        return 0;
}

int vhub_blk_notify(struct vhub_blk_queue *q) {
        vhub_virtq_publish(q->vq);
        return vhub_virtq_kick(q->vq);
}

int vhub_blk_process_completions(struct vhub_blk_queue *q) {
        int done = 0;

        for (;;) {
                struct vhub_blk_req *req;
                void *cookie;
                uint32_t len;
                int r = vhub_virtq_reap(q->vq, &cookie, &len);

                if (r < 0)
                        return r;
                if (r == 0)
                        return done;
                req = cookie;
                req->status = __atomic_load_n(&q->status[req->slot], __ATOMIC_RELAXED);
                req->used_len = len;
                req->done = true;
                q->free_slots[q->n_free++] = req->slot;
                q->completed++;
                done++;
        }
}

int vhub_blk_wait_all(struct vhub_blk_queue *q, int timeout_ms) {
        int64_t deadline = timeout_ms < 0 ? -1 : virtq_now_ms() + timeout_ms;

        for (;;) {
                int r = vhub_blk_process_completions(q);
                int left = -1;

                if (r < 0)
                        return r;
                if (vhub_virtq_num_inflight(q->vq) == 0)
                        return 0;
                if (deadline >= 0) {
                        int64_t l = deadline - virtq_now_ms();

                        if (l <= 0)
                                return -ETIMEDOUT;
                        left = (int)l;
                }
                r = vhub_virtq_wait_used(q->vq, left);
                if (r < 0)
                        return r;
        }
}

unsigned vhub_blk_inflight(const struct vhub_blk_queue *q) {
        return q->n_slots - q->n_free;
}

uint64_t vhub_blk_submitted(const struct vhub_blk_queue *q) {
        return q->submitted;
}

uint64_t vhub_blk_completed(const struct vhub_blk_queue *q) {
        return q->completed;
}

const char *vhub_blk_type_name(uint32_t type) {
        switch (type) {
        case VHUB_BLK_T_IN: return "IN";
        case VHUB_BLK_T_OUT: return "OUT";
        case VHUB_BLK_T_FLUSH: return "FLUSH";
        case VHUB_BLK_T_GET_ID: return "GET_ID";
        default: return "?";
        }
}

const char *vhub_blk_status_name(uint8_t status) {
        switch (status) {
        case VHUB_BLK_S_OK: return "OK";
        case VHUB_BLK_S_IOERR: return "IOERR";
        case VHUB_BLK_S_UNSUPP: return "UNSUPP";
        case STATUS_POISON: return "(not written)";
        default: return "?";
        }
}
