/* SPDX-License-Identifier: MIT */
#include "virtq.h"
#include "virtq-clock.h"

#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define RING_ALIGN 4096u
#define WAIT_SLICE_MS 50

struct vhub_virtq {
        uint16_t index;
        uint16_t size;

        uint64_t desc_gpa, avail_gpa, used_gpa;
        struct vhub_vring_desc *desc;
        struct vhub_vring_avail *avail;
        struct vhub_vring_used *used;

        int kick_fd, call_fd;

        /* Driver-private shadow state: the device can write the rings, so
         * nothing we rely on is read back from them except the used ring. */
        uint16_t *next;         /* free list and chain links, by descriptor */
        uint16_t *chain_len;    /* by head: descriptors in the chain, 0 = not in flight */
        void **cookie;          /* by head */
        uint16_t free_head;
        unsigned num_free;
        unsigned inflight;

        uint16_t avail_idx;     /* next avail idx to publish (shadow) */
        uint16_t last_used;     /* used idx reaped up to */
        uint64_t total_added;
        bool broken;
};

static uint64_t align_up(uint64_t v, uint64_t a) {
        return (v + a - 1) & ~(a - 1);
}

void vhub_virtq_layout(uint16_t size, struct vhub_virtq_layout *ret) {
        struct vhub_virtq_layout l;

        l.desc_offset = 0;
        l.desc_bytes = 16u * (uint64_t)size;
        l.avail_offset = l.desc_offset + l.desc_bytes;     /* 16-aligned, so 2-aligned */
        l.avail_bytes = 2u * (3u + (uint64_t)size);        /* flags, idx, ring, used_event */
        l.used_offset = align_up(l.avail_offset + l.avail_bytes, RING_ALIGN);
        l.used_bytes = 6u + 8u * (uint64_t)size;           /* flags, idx, ring, avail_event */
        l.total_bytes = l.used_offset + l.used_bytes;
        *ret = l;
}

int vhub_virtq_new(struct vhub_guest_mem *mem, uint16_t index, uint16_t size, uint16_t base,
                   struct vhub_virtq **ret) {
        struct vhub_virtq_layout l;
        struct vhub_virtq *vq;
        uint64_t gpa;
        int r;

        if (size == 0 || size > VHUB_VIRTQ_MAX_SIZE || (size & (size - 1)) != 0)
                return -EINVAL;
        vhub_virtq_layout(size, &l);

        vq = calloc(1, sizeof(*vq));
        if (!vq)
                return -ENOMEM;
        vq->kick_fd = vq->call_fd = -1;
        vq->index = index;
        vq->size = size;

        r = vhub_guest_mem_alloc(mem, l.total_bytes, RING_ALIGN, &gpa);
        if (r < 0)
                goto fail;
        vq->desc_gpa = gpa + l.desc_offset;
        vq->avail_gpa = gpa + l.avail_offset;
        vq->used_gpa = gpa + l.used_offset;
        vq->desc = vhub_guest_mem_at(mem, vq->desc_gpa, l.desc_bytes);
        vq->avail = vhub_guest_mem_at(mem, vq->avail_gpa, l.avail_bytes);
        vq->used = vhub_guest_mem_at(mem, vq->used_gpa, l.used_bytes);

        vq->next = calloc(size, sizeof(*vq->next));
        vq->chain_len = calloc(size, sizeof(*vq->chain_len));
        vq->cookie = calloc(size, sizeof(*vq->cookie));
        if (!vq->next || !vq->chain_len || !vq->cookie) {
                r = -ENOMEM;
                goto fail;
        }
        for (unsigned i = 0; i < size; i++)
                vq->next[i] = (uint16_t)((i + 1) % size);
        vq->free_head = 0;
        vq->num_free = size;

        /* spec: "The Virtqueue Available Ring" — the driver starts at base and
         * the device's used idx starts where its last_avail does. */
        vq->avail_idx = vq->last_used = base;
        vq->avail->flags = 0;
        vq->avail->idx = htole16(base);
        vq->used->flags = 0;
        vq->used->idx = htole16(base);

        vq->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        vq->call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (vq->kick_fd < 0 || vq->call_fd < 0) {
                r = -errno;
                goto fail;
        }
        *ret = vq;
        return 0;
fail:
        vhub_virtq_free(vq);
        return r;
}

struct vhub_virtq *vhub_virtq_free(struct vhub_virtq *vq) {
        if (!vq)
                return NULL;
        if (vq->kick_fd >= 0)
                close(vq->kick_fd);
        if (vq->call_fd >= 0)
                close(vq->call_fd);
        free(vq->next);
        free(vq->chain_len);
        free(vq->cookie);
        free(vq);
        return NULL;
}

uint16_t vhub_virtq_index(const struct vhub_virtq *vq) { return vq->index; }
uint16_t vhub_virtq_size(const struct vhub_virtq *vq) { return vq->size; }
uint64_t vhub_virtq_desc_gpa(const struct vhub_virtq *vq) { return vq->desc_gpa; }
uint64_t vhub_virtq_avail_gpa(const struct vhub_virtq *vq) { return vq->avail_gpa; }
uint64_t vhub_virtq_used_gpa(const struct vhub_virtq *vq) { return vq->used_gpa; }
int vhub_virtq_kick_fd(const struct vhub_virtq *vq) { return vq->kick_fd; }
int vhub_virtq_call_fd(const struct vhub_virtq *vq) { return vq->call_fd; }
struct vhub_vring_desc *vhub_virtq_desc(const struct vhub_virtq *vq) { return vq->desc; }
struct vhub_vring_avail *vhub_virtq_avail(const struct vhub_virtq *vq) { return vq->avail; }
struct vhub_vring_used *vhub_virtq_used(const struct vhub_virtq *vq) { return vq->used; }
unsigned vhub_virtq_num_free(const struct vhub_virtq *vq) { return vq->num_free; }
unsigned vhub_virtq_num_inflight(const struct vhub_virtq *vq) { return vq->inflight; }
uint16_t vhub_virtq_next_avail(const struct vhub_virtq *vq) { return vq->avail_idx; }
uint16_t vhub_virtq_last_used(const struct vhub_virtq *vq) { return vq->last_used; }
uint64_t vhub_virtq_total_added(const struct vhub_virtq *vq) { return vq->total_added; }

void vhub_virtq_set_interrupts(struct vhub_virtq *vq, bool enabled) {
        __atomic_store_n(&vq->avail->flags, htole16(enabled ? 0 : VHUB_VRING_AVAIL_F_NO_INTERRUPT),
                         __ATOMIC_RELEASE);
}

int vhub_virtq_add(struct vhub_virtq *vq, const struct vhub_virtq_buf *bufs, unsigned n, void *cookie) {
        uint16_t head, d;

        if (n == 0 || !bufs)
                return -EINVAL;
        for (unsigned i = 0; i < n; i++)
                if (bufs[i].len == 0)
                        return -EINVAL;
        if (vq->broken)
                return -EPROTO;
        if (n > vq->num_free)
                return -ENOSPC;

        head = d = vq->free_head;
        for (unsigned i = 0; i < n; i++) {
                uint16_t flags = bufs[i].device_writable ? VHUB_VRING_DESC_F_WRITE : 0;

                if (i + 1 < n)
                        flags |= VHUB_VRING_DESC_F_NEXT;
                vq->desc[d].addr = htole64(bufs[i].gpa);
                vq->desc[d].len = htole32(bufs[i].len);
                vq->desc[d].flags = htole16(flags);
                vq->desc[d].next = htole16(i + 1 < n ? vq->next[d] : 0);
                if (i + 1 < n)
                        d = vq->next[d];
        }
        /* The chain keeps its links in next[]; the free list resumes after it. */
        vq->free_head = vq->next[d];
        vq->num_free -= n;
        vq->chain_len[head] = (uint16_t)n;
        vq->cookie[head] = cookie;
        vq->inflight++;
        vq->total_added++;

        vq->avail->ring[vq->avail_idx & (vq->size - 1)] = htole16(head);
        vq->avail_idx++;
        return head;
}

void vhub_virtq_publish(struct vhub_virtq *vq) {
        /* spec: "Updating idx" — descriptors and ring entries before the index. */
        __atomic_store_n(&vq->avail->idx, htole16(vq->avail_idx), __ATOMIC_RELEASE);
}

int vhub_virtq_kick(struct vhub_virtq *vq) {
        uint64_t one = 1;
        uint16_t flags;

        /* spec: "Notifying The Device" — the idx store must be visible before
         * we read the device's suppression flag. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        flags = le16toh(__atomic_load_n(&vq->used->flags, __ATOMIC_RELAXED));
        if (flags & VHUB_VRING_USED_F_NO_NOTIFY)
                return 0;
        for (;;) {
                if (write(vq->kick_fd, &one, sizeof(one)) == sizeof(one))
                        return 0;
                if (errno == EINTR)
                        continue;
                /* EAGAIN: the counter is saturated, a kick is pending anyway */
                return errno == EAGAIN ? 0 : -errno;
        }
}

unsigned vhub_virtq_used_pending(struct vhub_virtq *vq) {
        uint16_t used_idx = le16toh(__atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE));

        return (uint16_t)(used_idx - vq->last_used);
}

int vhub_virtq_reap(struct vhub_virtq *vq, void **ret_cookie, uint32_t *ret_len) {
        struct vhub_vring_used_elem e;
        uint16_t head, d, n;

        if (vq->broken)
                return -EPROTO;
        if (vhub_virtq_used_pending(vq) == 0)
                return 0;
        if (vhub_virtq_used_pending(vq) > vq->inflight) {
                vq->broken = true; /* the device claims more than we gave it */
                return -EPROTO;
        }

        /* The acquire load of idx above orders this read after it. */
        memcpy(&e, &vq->used->ring[vq->last_used & (vq->size - 1)], sizeof(e));
        e.id = le32toh(e.id);
        e.len = le32toh(e.len);
        if (e.id >= vq->size || vq->chain_len[e.id] == 0) {
                vq->broken = true;
                return -EPROTO;
        }
        head = (uint16_t)e.id;
        n = vq->chain_len[head];

        /* Give the chain back: it is still linked through next[]. */
        d = head;
        for (unsigned i = 1; i < n; i++)
                d = vq->next[d];
        vq->next[d] = vq->free_head;
        vq->free_head = head;
        vq->num_free += n;
        vq->chain_len[head] = 0;
        vq->inflight--;
        vq->last_used++;

        if (ret_cookie)
                *ret_cookie = vq->cookie[head];
        if (ret_len)
                *ret_len = e.len;
        vq->cookie[head] = NULL;
        return 1;
}

int vhub_virtq_wait_used(struct vhub_virtq *vq, int timeout_ms) {
        int64_t deadline = timeout_ms < 0 ? -1 : virtq_now_ms() + timeout_ms;

        for (;;) {
                struct pollfd p = { .fd = vq->call_fd, .events = POLLIN };
                unsigned pending = vhub_virtq_used_pending(vq);
                int slice = WAIT_SLICE_MS;
                uint64_t count;

                if (pending > 0) {
                        /* Calls up to here are accounted for by the index we
                         * just read; later completions move it again. */
                        (void)!read(vq->call_fd, &count, sizeof(count));
                        return (int)pending;
                }
                if (deadline >= 0) {
                        int64_t left = deadline - virtq_now_ms();

                        if (left <= 0)
                                return -ETIMEDOUT;
                        if (left < slice)
                                slice = (int)left;
                }
                if (poll(&p, 1, slice) < 0 && errno != EINTR)
                        return -errno;
                /* Drain the call: it only says "look at the used index". */
                if (p.revents & POLLIN)
                        (void)!read(vq->call_fd, &count, sizeof(count));
        }
}
