/* SPDX-License-Identifier: MIT */
/*
 * Unit test of the split-virtqueue driver and the virtio-blk layer: the test
 * plays the device side on the same guest memory (a memfd, as a back-end
 * would map it), in this thread or in a device thread.
 */
#include "guest-mem.h"
#include "virtio-blk.h"
#include "virtq.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhub-check.h"

#define GPA_BASE 0x100000u
#define MEM_SIZE (4u << 20)

/* ---- the device side ---- */

struct fake_dev {
        struct vhub_guest_mem *mem;
        struct vhub_virtq *vq;
        uint16_t size;
        uint16_t last_avail;
        uint16_t used_idx;
};

static void dev_init(struct fake_dev *d, struct vhub_guest_mem *mem, struct vhub_virtq *vq) {
        d->mem = mem;
        d->vq = vq;
        d->size = vhub_virtq_size(vq);
        /* a device starts from the ring's indexes in memory (SET_VRING_BASE) */
        d->last_avail = le16toh(vhub_virtq_avail(vq)->idx);
        d->used_idx = le16toh(vhub_virtq_used(vq)->idx);
}

static bool dev_pop(struct fake_dev *d, uint16_t *ret_head) {
        struct vhub_vring_avail *avail = vhub_virtq_avail(d->vq);
        uint16_t idx = le16toh(__atomic_load_n(&avail->idx, __ATOMIC_ACQUIRE));

        if (idx == d->last_avail)
                return false;
        *ret_head = le16toh(avail->ring[d->last_avail & (d->size - 1)]);
        d->last_avail++;
        CHECK(*ret_head < d->size);
        return true;
}

/* Walk a chain the way a device does, from the descriptor table only. */
static unsigned dev_chain(struct fake_dev *d, uint16_t head, struct vhub_virtq_buf *bufs, unsigned max) {
        struct vhub_vring_desc *desc = vhub_virtq_desc(d->vq);
        unsigned n = 0;
        uint16_t i = head;

        for (;;) {
                uint16_t flags = le16toh(desc[i].flags);

                CHECK(n < max);
                bufs[n].gpa = le64toh(desc[i].addr);
                bufs[n].len = le32toh(desc[i].len);
                bufs[n].device_writable = flags & VHUB_VRING_DESC_F_WRITE;
                n++;
                if (!(flags & VHUB_VRING_DESC_F_NEXT))
                        return n;
                i = le16toh(desc[i].next);
                CHECK(i < d->size);
        }
}

static void dev_push(struct fake_dev *d, uint16_t head, uint32_t len) {
        struct vhub_vring_used *used = vhub_virtq_used(d->vq);

        used->ring[d->used_idx & (d->size - 1)].id = htole32(head);
        used->ring[d->used_idx & (d->size - 1)].len = htole32(len);
        d->used_idx++;
        __atomic_store_n(&used->idx, htole16(d->used_idx), __ATOMIC_RELEASE);
}

static void dev_call(struct fake_dev *d) {
        uint64_t one = 1;

        CHECK(write(vhub_virtq_call_fd(d->vq), &one, sizeof(one)) == sizeof(one));
}

/* ---- 1: layout and alignment ---- */

static void test_layout(void) {
        static const uint16_t sizes[] = { 1, 2, 8, 128, 256, 1024, 32768 };
        struct vhub_guest_mem *mem;
        struct vhub_virtq *vq;

        CHECK_EQ(vhub_guest_mem_new("test", GPA_BASE, 8u << 20, &mem), 0);
        CHECK((fcntl(vhub_guest_mem_fd(mem), F_GETFD) & FD_CLOEXEC) != 0);
        CHECK((fcntl(vhub_guest_mem_fd(mem), F_GET_SEALS) & (F_SEAL_SHRINK | F_SEAL_GROW)) ==
              (F_SEAL_SHRINK | F_SEAL_GROW));

        for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
                struct vhub_virtq_layout l;
                uint16_t n = sizes[i];

                vhub_virtq_layout(n, &l);
                CHECK_EQ(l.desc_bytes, 16u * n);
                CHECK_EQ(l.avail_bytes, 4u + 2u * n + 2u);
                CHECK_EQ(l.used_bytes, 4u + 8u * n + 2u);
                CHECK_EQ(l.desc_offset % 16, 0);
                CHECK_EQ(l.avail_offset % 2, 0);
                CHECK_EQ(l.used_offset % 4096, 0);
                CHECK(l.avail_offset >= l.desc_offset + l.desc_bytes);
                CHECK(l.used_offset >= l.avail_offset + l.avail_bytes);

                CHECK_EQ(vhub_virtq_new(mem, 0, n, 0, &vq), 0);
                CHECK_EQ(vhub_virtq_desc_gpa(vq) % 16, 0);
                CHECK_EQ(vhub_virtq_avail_gpa(vq) % 2, 0);
                CHECK_EQ(vhub_virtq_used_gpa(vq) % 4, 0);
                CHECK_EQ(vhub_virtq_used_gpa(vq) - vhub_virtq_desc_gpa(vq), l.used_offset);
                CHECK(vhub_virtq_desc_gpa(vq) >= GPA_BASE);
                CHECK((void *)vhub_virtq_desc(vq) == vhub_guest_mem_at(mem, vhub_virtq_desc_gpa(vq), 16));
                CHECK((void *)vhub_virtq_used(vq) == vhub_guest_mem_at(mem, vhub_virtq_used_gpa(vq), 4));
                CHECK_EQ(vhub_virtq_num_free(vq), n);
                vq = vhub_virtq_free(vq);
        }
        CHECK_EQ(vhub_virtq_new(mem, 0, 0, 0, &vq), -EINVAL);
        CHECK_EQ(vhub_virtq_new(mem, 0, 6, 0, &vq), -EINVAL);

        /* gpa <-> pointer */
        {
                uint64_t gpa;
                void *p = vhub_guest_mem_at(mem, GPA_BASE + 100, 10);

                CHECK(p);
                CHECK_EQ(vhub_guest_mem_to_gpa(mem, p, 10, &gpa), 0);
                CHECK_EQ(gpa, GPA_BASE + 100);
                CHECK(vhub_guest_mem_at(mem, GPA_BASE - 1, 1) == NULL);
                CHECK(vhub_guest_mem_at(mem, GPA_BASE + (8u << 20) - 4, 8) == NULL);
                CHECK(vhub_guest_mem_at(mem, UINT64_MAX, 2) == NULL);
                CHECK_EQ(vhub_guest_mem_to_gpa(mem, (char *)p - 200, 1, &gpa), -EFAULT);
                CHECK_EQ(vhub_guest_mem_alloc(mem, 16u << 20, 8, &gpa), -ENOMEM);
                CHECK_EQ(vhub_guest_mem_alloc(mem, 10, 3, &gpa), -EINVAL);
                CHECK_EQ(vhub_guest_mem_alloc(mem, 10, 64, &gpa), 0);
                CHECK_EQ(gpa % 64, 0);
        }
        vhub_guest_mem_free(mem);
}

/* ---- 2: index wraparound at 65536, chains, out-of-order completion ---- */

struct chain {
        struct vhub_virtq_buf bufs[3];
        unsigned n;
        int head;
        bool outstanding;
        uint32_t used_len;
};

enum { WRAP_SIZE = 8, WRAP_ROUNDS = 200 };

/* The driver's chains and the device's view of them, round after round. */
struct wrap_test {
        struct vhub_virtq *vq;
        struct fake_dev dev;
        struct chain chains[WRAP_ROUNDS * 4];
        struct chain *by_head[WRAP_SIZE];
        uint16_t popped[WRAP_SIZE];        /* taken by the device, not completed */
        unsigned n_chains, n_popped, completed;
        unsigned seed;
};

/* driver: add up to `want` chains of 1-3 buffers while they fit */
static void wrap_driver_add(struct wrap_test *w, unsigned want) {
        for (unsigned k = 0; k < want; k++) {
                struct chain *c = &w->chains[w->n_chains];
                int head;

                w->seed = w->seed * 1103515245 + 12345;
                c->n = 1 + (w->seed >> 16) % 3;
                for (unsigned b = 0; b < c->n; b++) {
                        c->bufs[b].gpa = GPA_BASE + 0x10000 + (uint64_t)w->n_chains * 64 + b * 16;
                        c->bufs[b].len = 16 + b;
                        c->bufs[b].device_writable = b == c->n - 1 || (w->seed >> 20) % 2;
                }
                head = vhub_virtq_add(w->vq, c->bufs, c->n, c);
                if (head == -ENOSPC) {
                        CHECK(vhub_virtq_num_free(w->vq) < c->n);
                        break;
                }
                CHECK(head >= 0 && head < WRAP_SIZE);
                CHECK(w->by_head[head] == NULL); /* a head is never reused while in flight */
                c->head = head;
                c->outstanding = true;
                w->by_head[head] = c;
                w->n_chains++;
        }
}

/* device: take everything, check each chain as the driver built it */
static void wrap_device_take(struct wrap_test *w) {
        for (uint16_t head; dev_pop(&w->dev, &head);) {
                struct vhub_virtq_buf seen[WRAP_SIZE];
                unsigned n = dev_chain(&w->dev, head, seen, WRAP_SIZE);
                struct chain *c = w->by_head[head];

                CHECK(c && c->outstanding);
                CHECK_EQ(n, c->n);
                for (unsigned b = 0; b < n; b++) {
                        CHECK_EQ(seen[b].gpa, c->bufs[b].gpa);
                        CHECK_EQ(seen[b].len, c->bufs[b].len);
                        CHECK_EQ(seen[b].device_writable, c->bufs[b].device_writable);
                }
                w->popped[w->n_popped++] = head;
        }
}

/* device: complete all but `keep` of them, newest first (out of order) */
static void wrap_device_complete(struct wrap_test *w, unsigned keep) {
        while (w->n_popped > keep) {
                uint16_t head = w->popped[--w->n_popped];

                w->by_head[head]->used_len = 1000 + head;
                dev_push(&w->dev, head, w->by_head[head]->used_len);
        }
}

/* driver: reap by the used index; cookies name the chains */
static void wrap_driver_reap(struct wrap_test *w) {
        for (;;) {
                void *cookie;
                uint32_t len;
                int r = vhub_virtq_reap(w->vq, &cookie, &len);
                struct chain *c;

                CHECK(r >= 0);
                if (r == 0)
                        break;
                c = cookie;
                CHECK(c->outstanding);
                CHECK_EQ(len, c->used_len);
                c->outstanding = false;
                w->by_head[c->head] = NULL;
                w->completed++;
        }
}

static void test_wraparound_out_of_order(void) {
        struct wrap_test w = { .seed = 12345 };
        const uint16_t base = 65530;
        struct vhub_guest_mem *mem;
        struct vhub_virtq *vq;

        CHECK_EQ(vhub_guest_mem_new("test", GPA_BASE, MEM_SIZE, &mem), 0);
        CHECK_EQ(vhub_virtq_new(mem, 3, WRAP_SIZE, base, &vq), 0);
        CHECK_EQ(vhub_virtq_index(vq), 3);
        CHECK_EQ(le16toh(vhub_virtq_avail(vq)->idx), base);
        CHECK_EQ(le16toh(vhub_virtq_used(vq)->idx), base);
        w.vq = vq;
        dev_init(&w.dev, mem, vq);

        for (unsigned round = 0; round < WRAP_ROUNDS; round++) {
                uint16_t head;

                wrap_driver_add(&w, 1 + round % 4);
                /* nothing is visible before publish */
                if (round == 0)
                        CHECK(!dev_pop(&w.dev, &head));
                vhub_virtq_publish(vq);
                CHECK_EQ(le16toh(vhub_virtq_avail(vq)->idx), vhub_virtq_next_avail(vq));
                wrap_device_take(&w);
                /* every third round leaves one behind for later */
                wrap_device_complete(&w, round % 3 == 0 && w.n_popped > 1 ? 1 : 0);
                wrap_driver_reap(&w);
                CHECK_EQ(vhub_virtq_num_inflight(vq), w.n_popped);
                CHECK_EQ((uint16_t)(vhub_virtq_last_used(vq) - base), w.completed % 65536);
        }

        /* drain */
        while (w.n_popped > 0)
                dev_push(&w.dev, w.popped[--w.n_popped], 0);
        while (vhub_virtq_reap(vq, NULL, NULL) == 1)
                w.completed++;

        CHECK_EQ(w.completed, w.n_chains);
        CHECK_EQ(vhub_virtq_total_added(vq), w.n_chains);
        CHECK(w.n_chains > WRAP_SIZE * 4);
        CHECK_EQ(vhub_virtq_num_free(vq), WRAP_SIZE);
        CHECK_EQ(vhub_virtq_num_inflight(vq), 0);
        /* the 16-bit indexes wrapped past 65535 */
        CHECK_EQ(vhub_virtq_next_avail(vq), (uint16_t)(base + w.n_chains));
        CHECK(vhub_virtq_next_avail(vq) < base);
        CHECK_EQ(vhub_virtq_last_used(vq), vhub_virtq_next_avail(vq));
        CHECK_EQ(w.dev.last_avail, vhub_virtq_next_avail(vq));

        vhub_virtq_free(vq);
        vhub_guest_mem_free(mem);
}

/* ---- 3: limits and a misbehaving device ---- */

static void test_limits_and_bad_device(void) {
        struct vhub_guest_mem *mem;
        struct vhub_virtq *vq;
        struct fake_dev dev;
        struct vhub_virtq_buf b[5] = {
                { GPA_BASE, 8, false }, { GPA_BASE + 8, 8, false }, { GPA_BASE + 16, 8, true },
                { GPA_BASE + 24, 8, true }, { GPA_BASE + 32, 8, true },
        };
        struct vhub_virtq_buf zero = { GPA_BASE, 0, false };
        uint16_t head;

        CHECK_EQ(vhub_guest_mem_new("test", GPA_BASE, MEM_SIZE, &mem), 0);
        CHECK_EQ(vhub_virtq_new(mem, 0, 4, 0, &vq), 0);
        dev_init(&dev, mem, vq);

        CHECK_EQ(vhub_virtq_add(vq, b, 0, NULL), -EINVAL);
        CHECK_EQ(vhub_virtq_add(vq, &zero, 1, NULL), -EINVAL);
        CHECK_EQ(vhub_virtq_add(vq, b, 5, NULL), -ENOSPC);
        CHECK(vhub_virtq_add(vq, b, 3, NULL) >= 0);
        CHECK_EQ(vhub_virtq_add(vq, b, 2, NULL), -ENOSPC);
        CHECK(vhub_virtq_add(vq, b, 1, NULL) >= 0);
        CHECK_EQ(vhub_virtq_num_free(vq), 0);
        vhub_virtq_publish(vq);

        /* nothing used yet; a call is not a completion */
        CHECK_EQ(vhub_virtq_reap(vq, NULL, NULL), 0);
        dev_call(&dev);
        CHECK_EQ(vhub_virtq_wait_used(vq, 120), -ETIMEDOUT);

        /* the device names a head that is not in flight */
        CHECK(dev_pop(&dev, &head));
        dev_push(&dev, (uint16_t)(head + 1), 0); /* head+1 is inside head's chain */
        CHECK_EQ(vhub_virtq_reap(vq, NULL, NULL), -EPROTO);
        CHECK_EQ(vhub_virtq_reap(vq, NULL, NULL), -EPROTO); /* sticky */
        CHECK_EQ(vhub_virtq_add(vq, b, 1, NULL), -EPROTO);
        vhub_virtq_free(vq);

        /* the device moves the used index past what is in flight */
        CHECK_EQ(vhub_virtq_new(mem, 0, 4, 0, &vq), 0);
        dev_init(&dev, mem, vq);
        CHECK(vhub_virtq_add(vq, b, 1, NULL) >= 0);
        vhub_virtq_publish(vq);
        CHECK(dev_pop(&dev, &head));
        dev_push(&dev, head, 0);
        dev_push(&dev, head, 0);
        CHECK_EQ(vhub_virtq_reap(vq, NULL, NULL), -EPROTO);
        vhub_virtq_free(vq);

        /* an id beyond the ring */
        CHECK_EQ(vhub_virtq_new(mem, 0, 4, 0, &vq), 0);
        dev_init(&dev, mem, vq);
        CHECK(vhub_virtq_add(vq, b, 1, NULL) >= 0);
        vhub_virtq_publish(vq);
        dev_push(&dev, 77, 0);
        CHECK_EQ(vhub_virtq_reap(vq, NULL, NULL), -EPROTO);
        vhub_virtq_free(vq);

        vhub_guest_mem_free(mem);
}

/* ---- 4: kick and call eventfds ---- */

static void test_notifications(void) {
        struct vhub_guest_mem *mem;
        struct vhub_virtq *vq;
        struct fake_dev dev;
        struct vhub_virtq_buf b = { GPA_BASE, 8, true };
        uint64_t v;
        uint16_t head;
        void *cookie;

        CHECK_EQ(vhub_guest_mem_new("test", GPA_BASE, MEM_SIZE, &mem), 0);
        CHECK_EQ(vhub_virtq_new(mem, 0, 16, 100, &vq), 0);
        dev_init(&dev, mem, vq);
        CHECK((fcntl(vhub_virtq_kick_fd(vq), F_GETFD) & FD_CLOEXEC) != 0);
        CHECK((fcntl(vhub_virtq_call_fd(vq), F_GETFD) & FD_CLOEXEC) != 0);

        CHECK_EQ(vhub_virtq_add(vq, &b, 1, &dev), 0);
        vhub_virtq_publish(vq);
        CHECK_EQ(vhub_virtq_kick(vq), 0);
        CHECK_EQ(vhub_virtq_kick(vq), 0);
        CHECK(read(vhub_virtq_kick_fd(vq), &v, sizeof(v)) == sizeof(v));
        CHECK_EQ(v, 2);

        /* the device asks not to be notified */
        vhub_virtq_used(vq)->flags = htole16(VHUB_VRING_USED_F_NO_NOTIFY);
        CHECK_EQ(vhub_virtq_kick(vq), 0);
        CHECK(read(vhub_virtq_kick_fd(vq), &v, sizeof(v)) < 0 && errno == EAGAIN);
        vhub_virtq_used(vq)->flags = 0;

        vhub_virtq_set_interrupts(vq, false);
        CHECK_EQ(le16toh(vhub_virtq_avail(vq)->flags), VHUB_VRING_AVAIL_F_NO_INTERRUPT);
        vhub_virtq_set_interrupts(vq, true);
        CHECK_EQ(le16toh(vhub_virtq_avail(vq)->flags), 0);

        CHECK(dev_pop(&dev, &head));
        CHECK_EQ(head, 0);
        dev_push(&dev, head, 8);
        dev_call(&dev);
        CHECK_EQ(vhub_virtq_wait_used(vq, 1000), 1);
        CHECK_EQ(vhub_virtq_reap(vq, &cookie, NULL), 1);
        CHECK(cookie == &dev);
        /* the call was drained */
        CHECK(read(vhub_virtq_call_fd(vq), &v, sizeof(v)) < 0 && errno == EAGAIN);

        /* a completion without any call is still found by the used index */
        CHECK_EQ(vhub_virtq_add(vq, &b, 1, NULL), 0);
        vhub_virtq_publish(vq);
        CHECK(dev_pop(&dev, &head));
        dev_push(&dev, head, 8);
        CHECK_EQ(vhub_virtq_wait_used(vq, 1000), 1);
        CHECK_EQ(vhub_virtq_reap(vq, NULL, NULL), 1);

        vhub_virtq_free(vq);
        vhub_guest_mem_free(mem);
}

/* ---- 5: virtio-blk against a RAM disk device in its own thread ---- */

#define DISK_SECTORS 256u

struct blk_dev {
        struct fake_dev d;
        uint8_t disk[DISK_SECTORS * 512];
        bool stop;
        unsigned flushes, get_ids, processed;
        pthread_t thread;
};

static uint8_t blk_dev_do(struct blk_dev *bd, uint16_t head, uint32_t *ret_written) {
        struct vhub_virtq_buf bufs[8];
        unsigned n = dev_chain(&bd->d, head, bufs, 8);
        const uint8_t *hdr;
        uint32_t type;
        uint64_t sector;
        uint8_t *data = NULL;
        uint32_t len = 0;
        uint8_t st = VHUB_BLK_S_OK;

        CHECK(n == 2 || n == 3);
        CHECK_EQ(bufs[0].len, 16);
        CHECK(!bufs[0].device_writable);
        CHECK_EQ(bufs[n - 1].len, 1);
        CHECK(bufs[n - 1].device_writable);
        hdr = vhub_guest_mem_at(bd->d.mem, bufs[0].gpa, 16);
        CHECK(hdr);
        memcpy(&type, hdr, 4);
        memcpy(&sector, hdr + 8, 8);
        type = le32toh(type);
        sector = le64toh(sector);
        if (n == 3) {
                data = vhub_guest_mem_at(bd->d.mem, bufs[1].gpa, bufs[1].len);
                len = bufs[1].len;
                CHECK(data);
        }
        *ret_written = 1;
        switch (type) {
        case VHUB_BLK_T_IN:
                CHECK(bufs[1].device_writable);
                CHECK(sector * 512 + len <= sizeof(bd->disk));
                memcpy(data, bd->disk + sector * 512, len);
                *ret_written += len;
                break;
        case VHUB_BLK_T_OUT:
                CHECK(!bufs[1].device_writable);
                CHECK(sector * 512 + len <= sizeof(bd->disk));
                memcpy(bd->disk + sector * 512, data, len);
                break;
        case VHUB_BLK_T_FLUSH:
                CHECK_EQ(n, 2);
                bd->flushes++;
                break;
        case VHUB_BLK_T_GET_ID:
                CHECK(bufs[1].device_writable);
                memset(data, 0, len);
                memcpy(data, "fake-ram-disk", 13);
                *ret_written += len;
                bd->get_ids++;
                break;
        default:
                st = VHUB_BLK_S_UNSUPP;
        }
        return st;
}

static void *blk_dev_thread(void *arg) {
        struct blk_dev *bd = arg;
        struct vhub_virtq *vq = bd->d.vq;

        while (!__atomic_load_n(&bd->stop, __ATOMIC_ACQUIRE)) {
                struct pollfd p = { .fd = vhub_virtq_kick_fd(vq), .events = POLLIN };
                uint16_t heads[64];
                unsigned n = 0;
                uint64_t v;

                if (poll(&p, 1, 20) > 0)
                        (void)!read(p.fd, &v, sizeof(v));
                while (n < 64 && dev_pop(&bd->d, &heads[n]))
                        n++;
                /* complete newest first, in two halves with a call each */
                for (unsigned i = n; i > 0; i--) {
                        uint32_t written;
                        uint8_t st = blk_dev_do(bd, heads[i - 1], &written);
                        struct vhub_virtq_buf bufs[8];
                        unsigned k = dev_chain(&bd->d, heads[i - 1], bufs, 8);
                        uint8_t *status = vhub_guest_mem_at(bd->d.mem, bufs[k - 1].gpa, 1);

                        *status = st;
                        dev_push(&bd->d, heads[i - 1], written);
                        bd->processed++;
                        if (i == n / 2 + 1 || i == 1)
                                dev_call(&bd->d);
                }
        }
        return NULL;
}

static void fill_pattern(uint8_t *p, size_t len, uint64_t sector) {
        for (size_t i = 0; i < len; i++)
                p[i] = (uint8_t)(sector * 31 + i * 7 + (i >> 9));
}

/* Submit reqs[*next..nreq) while the ring has room, notify, reap them all,
 * and again until none is left: more requests than the ring holds at once. */
static void blk_run_all(struct vhub_blk_queue *q, struct vhub_blk_req *reqs, unsigned *next, unsigned nreq) {
        while (*next < nreq) {
                int r;

                while (*next < nreq && (r = vhub_blk_submit(q, &reqs[*next])) == 0)
                        (*next)++;
                CHECK(r == 0 || r == -ENOSPC);
                CHECK_EQ(vhub_blk_notify(q), 0);
                CHECK_EQ(vhub_blk_wait_all(q, 5000), 0);
        }
}

static void test_blk(void) {
        enum { RING = 16, WRITES = 100 };
        struct vhub_guest_mem *mem;
        struct vhub_virtq *vq;
        struct vhub_blk_queue *q;
        struct blk_dev *bd = calloc(1, sizeof(*bd));
        static struct vhub_blk_req reqs[WRITES * 2 + 3];
        uint64_t wbuf, rbuf, idbuf;
        unsigned nreq = 0, next = 0;

        CHECK(bd);
        CHECK_EQ(vhub_guest_mem_new("test", GPA_BASE, MEM_SIZE, &mem), 0);
        CHECK_EQ(vhub_virtq_new(mem, 1, RING, 65500, &vq), 0);
        CHECK_EQ(vhub_blk_queue_new(mem, vq, &q), 0);
        CHECK_EQ(vhub_guest_mem_alloc(mem, WRITES * 1024, 4096, &wbuf), 0);
        CHECK_EQ(vhub_guest_mem_alloc(mem, WRITES * 1024, 4096, &rbuf), 0);
        CHECK_EQ(vhub_guest_mem_alloc(mem, 64, 64, &idbuf), 0);

        dev_init(&bd->d, mem, vq);
        CHECK(pthread_create(&bd->thread, NULL, blk_dev_thread, bd) == 0);

        /* bad requests never reach the ring */
        {
                struct vhub_blk_req bad = { .type = VHUB_BLK_T_OUT, .data_gpa = wbuf, .data_len = 100 };

                CHECK_EQ(vhub_blk_submit(q, &bad), -EINVAL);
                bad.data_len = 512;
                bad.data_gpa = 0; /* below the region */
                CHECK_EQ(vhub_blk_submit(q, &bad), -EFAULT);
                bad = (struct vhub_blk_req){ .type = VHUB_BLK_T_FLUSH, .data_gpa = wbuf, .data_len = 512 };
                CHECK_EQ(vhub_blk_submit(q, &bad), -EINVAL);
        }

        /* WRITES two-sector writes at scattered sectors, more than the ring
         * holds at once: submit while there is room, reap, go on */
        for (unsigned i = 0; i < WRITES; i++) {
                struct vhub_blk_req *r = &reqs[nreq++];
                uint64_t sector = (i * 37) % (DISK_SECTORS / 2) * 2;

                *r = (struct vhub_blk_req){ .type = VHUB_BLK_T_OUT, .sector = sector,
                                            .data_gpa = wbuf + i * 1024, .data_len = 1024 };
                fill_pattern(vhub_guest_mem_at(mem, r->data_gpa, 1024), 1024, sector + i * 1000);
        }
        /* 37 is odd, so the WRITES sectors are all distinct */
        blk_run_all(q, reqs, &next, nreq);
        for (unsigned i = 0; i < WRITES; i++) {
                CHECK(reqs[i].done);
                CHECK_EQ(reqs[i].status, VHUB_BLK_S_OK);
                CHECK_EQ(reqs[i].used_len, 1);
        }

        /* read back every sector that was written, into other buffers */
        {
                int last_writer[DISK_SECTORS];
                unsigned first_read = nreq;

                for (unsigned s = 0; s < DISK_SECTORS; s++)
                        last_writer[s] = -1;
                for (unsigned i = 0; i < WRITES; i++)
                        last_writer[reqs[i].sector] = (int)i;
                memset(vhub_guest_mem_at(mem, rbuf, WRITES * 1024), 0xaa, WRITES * 1024);
                for (unsigned s = 0; s < DISK_SECTORS; s += 2) {
                        struct vhub_blk_req *r;

                        if (last_writer[s] < 0)
                                continue;
                        r = &reqs[nreq];
                        *r = (struct vhub_blk_req){ .type = VHUB_BLK_T_IN, .sector = s,
                                                    .data_gpa = rbuf + (nreq - first_read) * 1024,
                                                    .data_len = 1024 };
                        nreq++;
                }
                blk_run_all(q, reqs, &next, nreq);
                for (unsigned i = first_read; i < nreq; i++) {
                        struct vhub_blk_req *rd = &reqs[i];
                        struct vhub_blk_req *wr = &reqs[last_writer[rd->sector]];

                        CHECK(rd->done);
                        CHECK_EQ(rd->status, VHUB_BLK_S_OK);
                        CHECK_EQ(rd->used_len, 1024 + 1);
                        CHECK(memcmp(vhub_guest_mem_at(mem, rd->data_gpa, 1024),
                                     vhub_guest_mem_at(mem, wr->data_gpa, 1024), 1024) == 0);
                }
        }

        /* FLUSH, GET_ID and an unknown type together */
        {
                struct vhub_blk_req *fl = &reqs[nreq++], *id = &reqs[nreq++], *un = &reqs[nreq++];

                *fl = (struct vhub_blk_req){ .type = VHUB_BLK_T_FLUSH };
                *id = (struct vhub_blk_req){ .type = VHUB_BLK_T_GET_ID, .data_gpa = idbuf,
                                             .data_len = VHUB_BLK_ID_BYTES };
                *un = (struct vhub_blk_req){ .type = 99 };
                CHECK_EQ(vhub_blk_submit(q, fl), 0);
                CHECK_EQ(vhub_blk_submit(q, id), 0);
                CHECK_EQ(vhub_blk_submit(q, un), 0);
                CHECK_EQ(vhub_blk_inflight(q), 3);
                CHECK_EQ(vhub_blk_notify(q), 0);
                CHECK_EQ(vhub_blk_wait_all(q, 5000), 0);
                CHECK_EQ(fl->status, VHUB_BLK_S_OK);
                CHECK_EQ(id->status, VHUB_BLK_S_OK);
                CHECK(memcmp(vhub_guest_mem_at(mem, idbuf, 13), "fake-ram-disk", 13) == 0);
                CHECK_EQ(un->status, VHUB_BLK_S_UNSUPP);
                CHECK(strcmp(vhub_blk_status_name(un->status), "UNSUPP") == 0);
        }

        __atomic_store_n(&bd->stop, true, __ATOMIC_RELEASE);
        CHECK(pthread_join(bd->thread, NULL) == 0);
        CHECK_EQ(bd->flushes, 1);
        CHECK_EQ(bd->get_ids, 1);
        CHECK_EQ(bd->processed, nreq);
        CHECK_EQ(vhub_blk_submitted(q), nreq);
        CHECK_EQ(vhub_blk_completed(q), nreq);
        CHECK_EQ(vhub_blk_inflight(q), 0);
        /* what device.stop's GET_VRING_BASE would report: base + requests */
        CHECK_EQ(bd->d.last_avail, (uint16_t)(65500 + nreq));
        CHECK(bd->d.last_avail < 65500);

        vhub_blk_queue_free(q);
        vhub_virtq_free(vq);
        vhub_guest_mem_free(mem);
        free(bd);
}

int main(void) {
        test_layout();
        test_wraparound_out_of_order();
        test_limits_and_bad_device();
        test_notifications();
        test_blk();
        printf("virtq: all tests passed\n");
        return 0;
}
