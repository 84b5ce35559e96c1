/* SPDX-License-Identifier: MIT */
/*
 * The virtio-blk device: split virtqueues walked through the front-end's
 * memory, requests held and completed in a chosen order, and inflight I/O
 * tracking in the shared buffer of GET/SET_INFLIGHT_FD exactly as the spec's
 * "Inflight I/O tracking" (split virtqueue) section describes, so that a
 * SIGKILLed back-end restarted on the same buffer resubmits what was lost.
 *
 * The I/O of a request happens when it completes: killed before that, it is
 * simply done again after the restart (writes are idempotent).
 */
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"

/* virtio spec "Split Virtqueues". */
#define VRING_DESC_F_NEXT       1u
#define VRING_DESC_F_WRITE      2u
#define VRING_DESC_F_INDIRECT   4u
#define VRING_AVAIL_F_NO_INTERRUPT 1u

struct vring_desc_le {
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        uint16_t next;
};

struct blk_outhdr_le {
        uint32_t type;
        uint32_t reserved;
        uint64_t sector;
};

static size_t desc_bytes(uint32_t num) { return (size_t) num * 16; }
static size_t avail_bytes(uint32_t num) { return 4 + (size_t) num * 2; }
static size_t used_bytes(uint32_t num) { return 4 + (size_t) num * 8; }

/*
 * The ring's byte order: little-endian (virtio 1.x, and legacy devices
 * unless told otherwise), or big-endian after SET_VRING_ENDIAN 1 (spec: a
 * back-end that negotiated CROSS_ENDIAN "should handle both endiannesses";
 * a legacy device's request headers follow the same order).
 */
static uint16_t vq_16(const struct tb_vq *vq, uint16_t v) {
        return vq->big_endian ? be16toh(v) : le16toh(v);
}
static uint32_t vq_32(const struct tb_vq *vq, uint32_t v) {
        return vq->big_endian ? be32toh(v) : le32toh(v);
}
static uint64_t vq_64(const struct tb_vq *vq, uint64_t v) {
        return vq->big_endian ? be64toh(v) : le64toh(v);
}
static uint16_t vq_to16(const struct tb_vq *vq, uint16_t v) {
        return vq->big_endian ? htobe16(v) : htole16(v);
}
static uint32_t vq_to32(const struct tb_vq *vq, uint32_t v) {
        return vq->big_endian ? htobe32(v) : htole32(v);
}

/* Shared-memory accessors: the front-end writes these concurrently. */
static uint16_t avail_idx(const struct tb_vq *vq) {
        return vq_16(vq, __atomic_load_n((volatile uint16_t *) (vq->avail + 2), __ATOMIC_ACQUIRE));
}
static uint16_t avail_flags(const struct tb_vq *vq) {
        return vq_16(vq, __atomic_load_n((volatile uint16_t *) vq->avail, __ATOMIC_RELAXED));
}
static uint16_t avail_ring(const struct tb_vq *vq, uint16_t idx) {
        volatile uint16_t *ring = (volatile uint16_t *) (vq->avail + 4);
        return vq_16(vq, ring[idx % vq->num]);
}
static uint16_t used_idx_read(const struct tb_vq *vq) {
        return vq_16(vq, __atomic_load_n((volatile uint16_t *) (vq->used + 2), __ATOMIC_ACQUIRE));
}
static void used_idx_write(struct tb_vq *vq, uint16_t v) {
        __atomic_store_n((volatile uint16_t *) (vq->used + 2), vq_to16(vq, v), __ATOMIC_RELEASE);
}
static void used_elem_write(struct tb_vq *vq, uint16_t slot, uint32_t id, uint32_t len) {
        volatile uint32_t *e = (volatile uint32_t *) (vq->used + 4 + (size_t) (slot % vq->num) * 8);
        e[0] = vq_to32(vq, id);
        e[1] = vq_to32(vq, len);
}
static struct vring_desc_le desc_read(const struct tb_vq *vq, uint16_t i) {
        struct vring_desc_le d;
        /* One copy, then only the copy is checked and used. */
        memcpy(&d, (const void *) (vq->desc + (size_t) i * 16), sizeof(d));
        d.addr = vq_64(vq, d.addr);
        d.len = vq_32(vq, d.len);
        d.flags = vq_16(vq, d.flags);
        d.next = vq_16(vq, d.next);
        return d;
}

void tb_blk_config_init(void) {
        uint64_t capacity = htole64(tb.disk_size / TB_SECTOR_SIZE);
        uint32_t blk_size = htole32(TB_SECTOR_SIZE);
        uint16_t nq = htole16((uint16_t) tb.opt.queues);

        /* virtio spec "Device configuration layout" of virtio_blk_config. */
        memset(tb.config, 0, sizeof(tb.config));
        memcpy(tb.config + 0, &capacity, 8);
        memcpy(tb.config + 20, &blk_size, 4);
        memcpy(tb.config + 34, &nq, 2);
}

void tb_vq_init(struct tb_vq *vq, unsigned index) {
        memset(vq, 0, sizeof(*vq));
        vq->index = index;
        vq->kick_fd = vq->call_fd = vq->err_fd = vq->ignored_fd = -1;
}

static void req_release(struct tb_req *r) {
        free(r->segs);
        memset(r, 0, sizeof(*r));
}

static void vq_drop_requests(struct tb_vq *vq) {
        /* Dropped, not completed: the inflight buffer keeps them marked. */
        for (unsigned i = 0; i < vq->n_pending; i++)
                req_release(&vq->reqs[vq->pending[i]]);
        vq->n_pending = 0;
}

static void close_fd(int *fd) {
        if (*fd >= 0)
                close(*fd);
        *fd = -1;
}

void tb_vq_reset(struct tb_vq *vq) {
        if (vq->reqs)
                vq_drop_requests(vq);
        free(vq->reqs);
        free(vq->pending);
        close_fd(&vq->kick_fd);
        close_fd(&vq->call_fd);
        close_fd(&vq->err_fd);
        close_fd(&vq->ignored_fd);
        tb_vq_init(vq, vq->index);
}

int tb_vq_set_num(struct tb_vq *vq, uint32_t num) {
        if (num == 0 || num > TB_MAX_QUEUE_SIZE || (num & (num - 1)))
                return -EINVAL;
        if (vq->started)
                return -EBUSY;
        if (num != vq->num) {
                /* stopped: nothing is pending, the tables just change size */
                free(vq->reqs);
                free(vq->pending);
                vq->reqs = NULL;
                vq->pending = NULL;
                vq->n_pending = 0;
        }
        vq->num = num;
        vq->desc = vq->avail = vq->used = NULL;
        return 0;
}

static void vq_signal_fd(struct tb_conn *c, struct tb_vq *vq, int fd, uint32_t breq) {
        if (fd >= 0) {
                if (eventfd_write(fd, 1) < 0)
                        tb_debug("sock%u: vq%u: eventfd write: %m", c->sock->index, vq->index);
                return;
        }
        /* spec "In-band notifications": without an fd, tell the front-end in-band. */
        if (tb_conn_has_pf(c, VHU_PF_INBAND_NOTIFICATIONS) && c->chan_fd >= 0) {
                struct vhu_vring_state st = { .index = vq->index, .num = 0 };
                tb_chan_send(c, breq, false, &st, sizeof(st), NULL, 0, NULL);
        }
}

static void vq_break(struct tb_conn *c, struct tb_vq *vq, const char *why) {
        if (vq->broken[0])
                return;
        snprintf(vq->broken, sizeof(vq->broken), "%s", why);
        snprintf(c->sock->last_error, sizeof(c->sock->last_error), "vq%u: %s", vq->index, why);
        tb_warn("sock%u: vq%u broken: %s", c->sock->index, vq->index, why);
        vq_signal_fd(c, vq, vq->err_fd, VHU_BREQ_VRING_ERR);
}

static bool vq_translate(struct tb_conn *c, struct tb_vq *vq) {
        if (vq->desc && vq->mem_generation == c->mem.generation)
                return true;
        vq->desc = vq->avail = vq->used = NULL;
        if (!vq->addr_set || vq->num == 0)
                return false;
        vq->desc = tb_mem_uaddr(&c->mem, vq->addr.desc, desc_bytes(vq->num));
        vq->avail = tb_mem_uaddr(&c->mem, vq->addr.avail, avail_bytes(vq->num));
        vq->used = tb_mem_uaddr(&c->mem, vq->addr.used, used_bytes(vq->num));
        if (!vq->desc || !vq->avail || !vq->used) {
                vq->desc = vq->avail = vq->used = NULL;
                return false;
        }
        /* aligned user addresses can still land misaligned in our mapping
         * when a region's uaddr and mmap_offset disagree */
        if ((uintptr_t) vq->avail % 2 || (uintptr_t) vq->used % 4) {
                vq->desc = vq->avail = vq->used = NULL;
                vq_break(c, vq, "ring misaligned in the region's mapping");
                return false;
        }
        vq->mem_generation = c->mem.generation;
        return true;
}

/*
 * Walk a descriptor chain into guest-physical segments.  Everything the
 * front-end wrote is checked: indices, loops, address ranges, the virtio
 * rule that readable descriptors come before writable ones, and that a blk
 * request has a 16-byte header to read and a status byte to write.
 */
static int vq_parse_chain(struct tb_conn *c, struct tb_vq *vq, uint16_t head,
                          struct tb_req *req, const char **ret_why) {
        struct tb_seg *segs = NULL;
        unsigned n = 0, n_readable = 0, cap = 0;
        uint64_t total_r = 0, total_w = 0;
        bool seen_write = false;
        uint16_t i = head;
        const char *why = NULL;

        for (unsigned steps = 0;; steps++) {
                if (steps >= vq->num) {
                        why = "descriptor chain loops or is longer than the ring";
                        goto fail;
                }
                struct vring_desc_le d = desc_read(vq, i);
                if (d.flags & VRING_DESC_F_INDIRECT) {
                        why = "indirect descriptor, INDIRECT_DESC not offered";
                        goto fail;
                }
                if (d.flags & VRING_DESC_F_WRITE)
                        seen_write = true;
                else if (seen_write) {
                        why = "device-readable descriptor after a writable one";
                        goto fail;
                }
                if (d.len > 0) {
                        uint64_t end;
                        if (__builtin_add_overflow(d.addr, (uint64_t) d.len, &end) ||
                            !tb_mem_mapped(&c->mem, d.addr, d.len)) {
                                why = "descriptor address not in guest memory";
                                goto fail;
                        }
                        if (n == cap) {
                                cap = cap ? cap * 2 : 4;
                                struct tb_seg *ns = realloc(segs, cap * sizeof(*ns));
                                if (!ns) {
                                        why = "out of memory";
                                        goto fail;
                                }
                                segs = ns;
                        }
                        segs[n++] = (struct tb_seg) { .gpa = d.addr, .len = d.len };
                        if (seen_write)
                                total_w += d.len;
                        else {
                                total_r += d.len;
                                n_readable = n;
                        }
                        if (total_r + total_w > TB_MAX_REQ_DATA + 64) {
                                why = "request larger than the test back-end's limit";
                                goto fail;
                        }
                }
                if (!(d.flags & VRING_DESC_F_NEXT))
                        break;
                if (d.next >= vq->num) {
                        why = "descriptor next index beyond the ring";
                        goto fail;
                }
                i = d.next;
        }
        if (total_r < sizeof(struct blk_outhdr_le) || total_w < 1) {
                why = "blk request without a header or a status byte";
                goto fail;
        }
        req->segs = segs;
        req->n_segs = n;
        req->n_readable = n_readable;
        return 0;
fail:
        free(segs);
        *ret_why = why;
        return -EINVAL;
}

/* Copy at offset off of the concatenated segments [first, last), either way. */
static int sgl_copy(struct tb_conn *c, const struct tb_seg *segs, unsigned first, unsigned last,
                    uint64_t off, void *buf, uint64_t len, bool to_guest) {
        uint8_t *b = buf;
        for (unsigned k = first; k < last && len > 0; k++) {
                if (off >= segs[k].len) {
                        off -= segs[k].len;
                        continue;
                }
                uint64_t n = segs[k].len - off;
                if (n > len)
                        n = len;
                int r = to_guest ? tb_mem_write(&c->mem, segs[k].gpa + off, b, n)
                                 : tb_mem_read(&c->mem, segs[k].gpa + off, b, n);
                if (r < 0)
                        return r;
                b += n;
                len -= n;
                off = 0;
        }
        return len == 0 ? 0 : -EFAULT;
}

static int disk_io(bool write, void *buf, size_t len, uint64_t off) {
        uint8_t *b = buf;
        while (len > 0) {
                ssize_t n = write ? pwrite(tb.disk_fd, b, len, (off_t) off)
                                  : pread(tb.disk_fd, b, len, (off_t) off);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return n < 0 ? -errno : -EIO;
                b += n;
                len -= (size_t) n;
                off += (uint64_t) n;
        }
        return 0;
}

/* Perform a request; returns the used length, or -EFAULT when the front-end
 * took its memory away. */
static int64_t blk_execute(struct tb_conn *c, const struct tb_vq *vq, const struct tb_req *req) {
        const struct tb_seg *s = req->segs;
        unsigned nr = req->n_readable, ns = req->n_segs;
        uint64_t total_r = 0, total_w = 0;
        struct blk_outhdr_le hdr;
        uint8_t status = TB_VIRTIO_BLK_S_OK;
        uint64_t written = 0;
        uint8_t *buf = NULL;
        int r;

        for (unsigned k = 0; k < ns; k++)
                *(k < nr ? &total_r : &total_w) += s[k].len;
        r = sgl_copy(c, s, 0, nr, 0, &hdr, sizeof(hdr), false);
        if (r < 0)
                return r;
        uint32_t type = vq_32(vq, hdr.type);
        uint64_t sector = vq_64(vq, hdr.sector);
        uint64_t data_len = 0;

        switch (type) {
        case TB_VIRTIO_BLK_T_IN:
        case TB_VIRTIO_BLK_T_OUT: {
                bool out = type == TB_VIRTIO_BLK_T_OUT;
                data_len = out ? total_r - sizeof(hdr) : total_w - 1;
                uint64_t sectors = data_len / TB_SECTOR_SIZE;
                if (data_len % TB_SECTOR_SIZE || sector > tb.disk_size / TB_SECTOR_SIZE ||
                    sectors > tb.disk_size / TB_SECTOR_SIZE - sector) {
                        status = TB_VIRTIO_BLK_S_IOERR;
                        break;
                }
                if (data_len == 0)
                        break;
                buf = malloc(data_len);
                if (!buf) {
                        status = TB_VIRTIO_BLK_S_IOERR;
                        break;
                }
                if (out) {
                        r = sgl_copy(c, s, 0, nr, sizeof(hdr), buf, data_len, false);
                        if (r < 0)
                                goto fault;
                        if (disk_io(true, buf, data_len, sector * TB_SECTOR_SIZE) < 0)
                                status = TB_VIRTIO_BLK_S_IOERR;
                } else {
                        if (disk_io(false, buf, data_len, sector * TB_SECTOR_SIZE) < 0) {
                                status = TB_VIRTIO_BLK_S_IOERR;
                                break;
                        }
                        r = sgl_copy(c, s, nr, ns, 0, buf, data_len, true);
                        if (r < 0)
                                goto fault;
                        written = data_len;
                }
                break;
        }
        case TB_VIRTIO_BLK_T_FLUSH:
                if (tb.disk_is_file && fdatasync(tb.disk_fd) < 0)
                        status = TB_VIRTIO_BLK_S_IOERR;
                break;
        case TB_VIRTIO_BLK_T_GET_ID: {
                char id[TB_VIRTIO_BLK_ID_BYTES] = { 0 };
                snprintf(id, sizeof(id), "vhub-tb-%u", c->sock->index);
                uint64_t n = total_w - 1 < sizeof(id) ? total_w - 1 : sizeof(id);
                r = sgl_copy(c, s, nr, ns, 0, id, n, true);
                if (r < 0)
                        goto fault;
                written = n;
                break;
        }
        default:
                status = TB_VIRTIO_BLK_S_UNSUPP;
                break;
        }
        free(buf);
        buf = NULL;
        r = sgl_copy(c, s, nr, ns, total_w - 1, &status, 1, true);
        if (r < 0)
                return r;
        return (int64_t) written + 1;
fault:
        free(buf);
        return r;
}

bool tb_vq_runnable(const struct tb_conn *c, const struct tb_vq *vq) {
        return vq->started && vq->enabled && !vq->broken[0] && vq->num > 0 && vq->addr_set;
}

static struct vhu_inflight_queue_split *inflight_queue(struct tb_conn *c, unsigned index) {
        if (!c->inflight_base || index >= c->inflight_queues)
                return NULL;
        size_t qsize = TB_INFLIGHT_QUEUE_HDR + (size_t) c->inflight_queue_size *
                       sizeof(struct vhu_inflight_desc_split);
        return (struct vhu_inflight_queue_split *) (c->inflight_base + qsize * index);
}

/* Remove the given heads from the pending list and release them. */
static void vq_forget(struct tb_vq *vq, const uint16_t *heads, unsigned n) {
        for (unsigned k = 0; k < n; k++)
                req_release(&vq->reqs[heads[k]]);
        unsigned j = 0;
        for (unsigned i = 0; i < vq->n_pending; i++)
                if (vq->reqs[vq->pending[i]].busy)
                        vq->pending[j++] = vq->pending[i];
        vq->n_pending = j;
}

/*
 * spec "Inflight I/O tracking", "When supplying used buffers to the driver":
 * link each head into the last batch, publish the used elements, bump the
 * used index once for the batch, clear inflight, then record used_idx.
 */
static void vq_complete(struct tb_conn *c, struct tb_vq *vq, uint16_t *heads, unsigned n) {
        struct vhu_inflight_queue_split *q = vq->inflight;
        unsigned done = 0;

        for (; done < n; done++) {
                uint16_t h = heads[done];
                int64_t len = blk_execute(c, vq, &vq->reqs[h]);
                if (len < 0) {
                        vq_break(c, vq, "request buffers left guest memory before completion");
                        break;
                }
                if (q) {
                        q->desc[h].next = q->last_batch_head;
                        q->last_batch_head = h;
                }
                used_elem_write(vq, (uint16_t) (vq->used_idx + done), h, (uint32_t) len);
        }
        if (done == 0)
                return;
        if (vq->addr.flags & VHU_VRING_F_LOG)
                tb_mem_log_dirty(&c->mem, vq->addr.log, used_bytes(vq->num));
        __atomic_thread_fence(__ATOMIC_RELEASE);
        vq->used_idx = (uint16_t) (vq->used_idx + done);
        used_idx_write(vq, vq->used_idx);
        if (q) {
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                for (unsigned k = 0; k < done; k++)
                        __atomic_store_n(&q->desc[heads[k]].inflight, 0, __ATOMIC_RELAXED);
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                __atomic_store_n(&q->used_idx, vq->used_idx, __ATOMIC_RELEASE);
        }
        vq->completed += done;
        c->sock->completed += done;
        vq_forget(vq, heads, done);
        if (!(avail_flags(vq) & VRING_AVAIL_F_NO_INTERRUPT)) {
                vq->calls++;
                vq_signal_fd(c, vq, vq->call_fd, VHU_BREQ_VRING_CALL);
        }
}

/* Complete every pending request ready by now (all of them if force). */
static void vq_complete_ready(struct tb_conn *c, struct tb_vq *vq, uint64_t now, bool force) {
        uint16_t *ready;
        unsigned n = 0;

        if (vq->n_pending == 0 || !vq->used)
                return;
        ready = malloc(vq->n_pending * sizeof(*ready));
        if (!ready)
                return;
        for (unsigned i = 0; i < vq->n_pending; i++) {
                uint16_t h = vq->pending[i];
                if (force || vq->reqs[h].ready_ms <= now)
                        ready[n++] = h;
        }
        switch (tb.opt.order) {
        case TB_ORDER_FIFO:
                break;
        case TB_ORDER_REVERSE:
                for (unsigned i = 0; i < n / 2; i++) {
                        uint16_t t = ready[i];
                        ready[i] = ready[n - 1 - i];
                        ready[n - 1 - i] = t;
                }
                break;
        case TB_ORDER_RANDOM:
                for (unsigned i = n; i > 1; i--) {
                        unsigned j = (unsigned) (tb_random() % i);
                        uint16_t t = ready[i - 1];
                        ready[i - 1] = ready[j];
                        ready[j] = t;
                }
                break;
        default:
                break;
        }
        if (n > 0)
                vq_complete(c, vq, ready, n);
        free(ready);
}

static uint64_t req_ready_time(uint64_t now) {
        uint64_t d = tb.opt.delay_ms;
        /* random order: spread the holds so completions cross batches too */
        if (tb.opt.order == TB_ORDER_RANDOM && d > 0)
                d = d / 2 + tb_random() % (d + 1);
        return now + d;
}

static int vq_submit(struct tb_conn *c, struct tb_vq *vq, uint16_t head, uint64_t counter,
                     uint64_t now) {
        struct tb_req *req = &vq->reqs[head];
        const char *why = NULL;

        if (req->busy) {
                vq_break(c, vq, "avail ring offers a head that is already in flight");
                return -EINVAL;
        }
        if (vq_parse_chain(c, vq, head, req, &why) < 0) {
                vq_break(c, vq, why);
                return -EINVAL;
        }
        req->busy = true;
        req->counter = counter;
        req->ready_ms = req_ready_time(now);
        vq->pending[vq->n_pending++] = head;
        return 0;
}

/*
 * spec "Inflight I/O tracking", "When reconnecting": fix up the last batch
 * if used_idx lags the used ring, then resubmit every inflight head in
 * counter order, before anything new from the avail ring.
 */
static int vq_resubmit_inflight(struct tb_conn *c, struct tb_vq *vq, uint64_t now) {
        struct vhu_inflight_queue_split *q = vq->inflight;
        uint16_t ring_used = vq->used_idx;
        unsigned inuse = 0;

        if (c->inflight_queue_size != vq->num) {
                vq_break(c, vq, "inflight queue_size does not match the ring size");
                return -EINVAL;
        }
        if (q->version == 0) {
                /* spec: zero means an uninitialized buffer */
                memset(q->desc, 0, (size_t) vq->num * sizeof(q->desc[0]));
                q->features = 0;
                q->desc_num = (uint16_t) vq->num;
                q->last_batch_head = 0;
                q->used_idx = ring_used;
                q->version = 1;
        }
        /* desc_num is front-end memory: the bound is the queue_size the area
         * was mapped with, which must be the ring's size too */
        if (q->version != 1 || q->desc_num != vq->num) {
                vq_break(c, vq, "inflight region version or desc_num does not match the ring");
                return -EINVAL;
        }
        if (q->used_idx != ring_used) {
                uint16_t batch = (uint16_t) (ring_used - q->used_idx);
                uint16_t h = q->last_batch_head;
                for (unsigned k = 0; k < batch && h < vq->num; k++) {
                        q->desc[h].inflight = 0;
                        h = q->desc[h].next;
                }
                q->used_idx = ring_used;
        }

        uint16_t *heads = malloc(vq->num * sizeof(*heads));
        if (!heads)
                return -ENOMEM;
        for (unsigned i = 0; i < vq->num; i++)
                if (q->desc[i].inflight == 1)
                        heads[inuse++] = (uint16_t) i;
        /* insertion sort by counter: inuse is at most the ring size */
        for (unsigned i = 1; i < inuse; i++) {
                uint16_t h = heads[i];
                unsigned j = i;
                while (j > 0 && q->desc[heads[j - 1]].counter > q->desc[h].counter) {
                        heads[j] = heads[j - 1];
                        j--;
                }
                heads[j] = h;
        }
        /* Everything before used + inuse was fetched by the previous life. */
        vq->last_avail = (uint16_t) (ring_used + inuse);
        for (unsigned i = 0; i < inuse; i++) {
                uint64_t counter = q->desc[heads[i]].counter;
                if (vq_submit(c, vq, heads[i], counter, now) < 0)
                        break;
                if (counter >= c->inflight_counter)
                        c->inflight_counter = counter + 1;
                vq->resubmitted++;
        }
        if (inuse)
                tb_info("sock%u: vq%u: resubmitted %u inflight requests (used idx %u)",
                        c->sock->index, vq->index, inuse, ring_used);
        free(heads);
        return 0;
}

/* First processing after a start: translate, read the used index, resubmit. */
static bool vq_activate(struct tb_conn *c, struct tb_vq *vq, uint64_t now) {
        if (vq->activated)
                return vq_translate(c, vq);
        if (!vq_translate(c, vq))
                return false;
        if (!vq->reqs) {
                vq->reqs = calloc(vq->num, sizeof(*vq->reqs));
                vq->pending = calloc(vq->num, sizeof(*vq->pending));
                if (!vq->reqs || !vq->pending) {
                        vq_break(c, vq, "out of memory");
                        return false;
                }
        }
        vq->used_idx = used_idx_read(vq);
        vq->inflight = inflight_queue(c, vq->index);
        vq->activated = true;
        if (vq->inflight && vq_resubmit_inflight(c, vq, now) < 0)
                return false;
        return true;
}

static void vq_process(struct tb_conn *c, struct tb_vq *vq) {
        uint64_t now = tb_now_ms();

        if (!tb_vq_runnable(c, vq) || !vq_activate(c, vq, now))
                return;
        uint16_t aidx = avail_idx(vq);
        if ((uint16_t) (aidx - vq->last_avail) > vq->num) {
                vq_break(c, vq, "avail index moved by more than the ring size");
                return;
        }
        while (vq->last_avail != aidx && !vq->broken[0]) {
                uint16_t head = avail_ring(vq, vq->last_avail);
                if (head >= vq->num) {
                        vq_break(c, vq, "avail ring head beyond the ring");
                        return;
                }
                uint64_t counter = c->inflight_counter++;
                if (vq_submit(c, vq, head, counter, now) < 0)
                        return;
                if (vq->inflight) {
                        /* spec: counter first, then inflight = 1 */
                        vq->inflight->desc[head].counter = counter;
                        __atomic_thread_fence(__ATOMIC_RELEASE);
                        __atomic_store_n(&vq->inflight->desc[head].inflight, 1, __ATOMIC_RELEASE);
                }
                vq->last_avail++;
                vq->fetched++;
                c->sock->fetched++;
        }
        vq_complete_ready(c, vq, now, false);
}

int tb_vq_start(struct tb_conn *c, struct tb_vq *vq) {
        vq->started = true;
        vq_process(c, vq);
        return 0;
}

void tb_vq_kick(struct tb_conn *c, struct tb_vq *vq) {
        eventfd_t v;
        if (vq->kick_fd >= 0)
                (void) eventfd_read(vq->kick_fd, &v);
        vq_process(c, vq);
}

uint16_t tb_vq_stop(struct tb_conn *c, struct tb_vq *vq, enum tb_stop how) {
        /* a suspended request lives on in the inflight region only */
        if (how != TB_STOP_DRAIN && !vq->inflight && vq->n_pending > 0) {
                tb_warn("sock%u: vq%u: no inflight region to suspend requests into: draining",
                        c->sock->index, vq->index);
                how = TB_STOP_DRAIN;
        }
        if (vq->activated && vq->used && !vq->broken[0] && vq_translate(c, vq) &&
            how != TB_STOP_SUSPEND_ALL)
                /* GET_VRING_BASE_INFLIGHT: what is done anyway completes,
                 * the rest is suspended ("may") */
                vq_complete_ready(c, vq, tb_now_ms(), how == TB_STOP_DRAIN);
        if (vq->reqs) {
                if (how != TB_STOP_DRAIN && vq->n_pending > 0) {
                        tb_info("sock%u: vq%u: %u requests suspended in the inflight region",
                                c->sock->index, vq->index, vq->n_pending);
                        vq->suspended += vq->n_pending;
                }
                /* still marked in the inflight region: the next start resubmits them */
                vq_drop_requests(vq);
        }
        vq->started = false;
        vq->activated = false;
        vq->polling = false;
        vq->inflight = NULL;
        /* the next start is a fresh chance (the socket keeps last_error) */
        vq->broken[0] = 0;
        close_fd(&vq->kick_fd);
        return vq->last_avail;
}

void tb_vq_on_timer(struct tb_conn *c, struct tb_vq *vq, uint64_t now) {
        if (!vq->activated || vq->broken[0])
                return;
        if (vq->polling) {
                vq_process(c, vq);
                return;
        }
        if (!vq_translate(c, vq))
                return;
        vq_complete_ready(c, vq, now, false);
}

uint64_t tb_vq_next_deadline(const struct tb_vq *vq) {
        uint64_t d = UINT64_MAX;
        if (!vq->activated || vq->broken[0])
                return d;
        if (vq->polling)
                d = tb_now_ms() + 5;
        for (unsigned i = 0; i < vq->n_pending; i++)
                if (vq->reqs[vq->pending[i]].ready_ms < d)
                        d = vq->reqs[vq->pending[i]].ready_ms;
        return d;
}

/* ---- the inflight buffer ---- */

static uint64_t inflight_size(uint16_t queues, uint16_t queue_size) {
        return (uint64_t) queues * (TB_INFLIGHT_QUEUE_HDR +
                                    (uint64_t) queue_size * sizeof(struct vhu_inflight_desc_split));
}

static void inflight_repoint(struct tb_conn *c) {
        for (unsigned i = 0; i < tb.opt.queues; i++) {
                struct tb_vq *vq = &c->vqs[i];
                if (!vq->activated)
                        continue;
                struct vhu_inflight_queue_split *q = inflight_queue(c, i);
                vq->inflight = q && q->desc_num == vq->num && q->version == 1 &&
                               c->inflight_queue_size == vq->num ? q : NULL;
        }
}

void tb_inflight_clear(struct tb_conn *c) {
        if (c->inflight_map)
                munmap(c->inflight_map, c->inflight_map_len);
        c->inflight_map = NULL;
        c->inflight_map_len = 0;
        c->inflight_base = NULL;
        c->inflight_size = 0;
        c->inflight_queues = c->inflight_queue_size = 0;
        inflight_repoint(c);
}

static int inflight_check_dims(uint16_t queues, uint16_t queue_size) {
        if (queues == 0 || queues > TB_MAX_QUEUES || queue_size == 0 ||
            queue_size > TB_MAX_QUEUE_SIZE)
                return -EINVAL;
        return 0;
}

int tb_inflight_create(struct tb_conn *c, const struct vhu_inflight *req,
                       struct vhu_inflight *ret, int *ret_fd) {
        int r = inflight_check_dims(req->num_queues, req->queue_size);
        if (r < 0)
                return r;
        uint64_t size = inflight_size(req->num_queues, req->queue_size);
        int fd = tb_memfd_new("vhub-tb-inflight", size);
        if (fd < 0)
                return fd;
        void *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
                r = -errno;
                close(fd);
                return r;
        }
        tb_inflight_clear(c);
        c->inflight_map = map;
        c->inflight_map_len = size;
        c->inflight_base = map;
        c->inflight_size = size;
        c->inflight_queues = req->num_queues;
        c->inflight_queue_size = req->queue_size;
        for (unsigned i = 0; i < req->num_queues; i++) {
                struct vhu_inflight_queue_split *q = inflight_queue(c, i);
                q->features = 0;
                q->desc_num = req->queue_size;
                q->version = 1;
        }
        inflight_repoint(c);
        *ret = (struct vhu_inflight) {
                .mmap_size = size, .mmap_offset = 0,
                .num_queues = req->num_queues, .queue_size = req->queue_size,
        };
        *ret_fd = fd;
        return 0;
}

int tb_inflight_set(struct tb_conn *c, const struct vhu_inflight *in, int fd, const char **ret_why) {
        struct stat st;
        uint64_t end;
        long page = sysconf(_SC_PAGESIZE);

        if (inflight_check_dims(in->num_queues, in->queue_size) < 0) {
                *ret_why = "inflight num_queues or queue_size out of range";
                return -EINVAL;
        }
        if (in->mmap_offset % 8) {
                *ret_why = "inflight mmap_offset not 8-byte aligned";
                return -EINVAL;
        }
        uint64_t need = inflight_size(in->num_queues, in->queue_size);
        if (in->mmap_size < need || __builtin_add_overflow(in->mmap_size, in->mmap_offset, &end) ||
            end > (uint64_t) SIZE_MAX) {
                *ret_why = "inflight mmap_size too small for its queues";
                return -EINVAL;
        }
        if (fstat(fd, &st) < 0 || (S_ISREG(st.st_mode) && (uint64_t) st.st_size < end)) {
                *ret_why = "inflight area beyond the end of its fd";
                return -EINVAL;
        }
        uint64_t map_off = in->mmap_offset & ~((uint64_t) page - 1);
        size_t map_len = end - map_off;
        void *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t) map_off);
        if (map == MAP_FAILED) {
                *ret_why = "mmap of the inflight area failed";
                return -errno;
        }
        tb_inflight_clear(c);
        c->inflight_map = map;
        c->inflight_map_len = map_len;
        c->inflight_base = (uint8_t *) map + (in->mmap_offset - map_off);
        c->inflight_size = in->mmap_size;
        c->inflight_queues = in->num_queues;
        c->inflight_queue_size = in->queue_size;
        inflight_repoint(c);
        return 0;
}

/* ---- device state (SET_DEVICE_STATE_FD) ---- */

#define TB_STATE_MAGIC 0x53425456u /* "VTBS" */

struct state_hdr {
        uint32_t magic, version, n_queues, reserved;
};
struct state_queue {
        uint32_t index, num;
        uint16_t last_avail, used_idx;
        uint32_t enabled;
};

size_t tb_state_save(const struct tb_conn *c, uint8_t *buf, size_t len) {
        struct state_hdr h = { .magic = TB_STATE_MAGIC, .version = 1, .n_queues = tb.opt.queues };
        size_t need = sizeof(h) + tb.opt.queues * sizeof(struct state_queue);
        if (need > len)
                return 0;
        memcpy(buf, &h, sizeof(h));
        for (unsigned i = 0; i < tb.opt.queues; i++) {
                const struct tb_vq *vq = &c->vqs[i];
                struct state_queue q = {
                        .index = i, .num = vq->num, .last_avail = vq->last_avail,
                        .used_idx = vq->used_idx, .enabled = vq->enabled,
                };
                memcpy(buf + sizeof(h) + i * sizeof(q), &q, sizeof(q));
        }
        return need;
}

int tb_state_load(struct tb_conn *c, const uint8_t *buf, size_t len) {
        struct state_hdr h;
        if (len < sizeof(h))
                return -EINVAL;
        memcpy(&h, buf, sizeof(h));
        if (h.magic != TB_STATE_MAGIC || h.version != 1 || h.n_queues > TB_MAX_QUEUES ||
            len != sizeof(h) + h.n_queues * sizeof(struct state_queue))
                return -EINVAL;
        for (unsigned i = 0; i < h.n_queues; i++) {
                struct state_queue q;
                memcpy(&q, buf + sizeof(h) + i * sizeof(q), sizeof(q));
                if (q.index >= tb.opt.queues)
                        return -EINVAL;
                struct tb_vq *vq = &c->vqs[q.index];
                if (!vq->started)
                        vq->last_avail = q.last_avail;
        }
        return 0;
}
