/* SPDX-License-Identifier: MIT */
/*
 * One front-end connection: read requests without blocking, validate each
 * with the protocol library, apply any scripted misbehaviour, handle it, and
 * answer exactly as the spec and REPLY_ACK say (or, on purpose, not).
 *
 * Reply messages own their fds here (handlers dup what they keep,
 * vhu_msg_own_fds()); after the writer has dup'd them for sending,
 * vhu_msg_clear() closes ours.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "backend.h"
#include "vhu-scm.h"

/* A handler asks for the connection to be closed. */
#define TB_CLOSE (-ECONNABORTED)

bool tb_conn_has_pf(const struct tb_conn *c, unsigned bit) {
        return c->protocol_features & VHU_PF_BIT(bit);
}

struct tb_conn *tb_conn_new(struct tb_sock *s, int fd) {
        struct tb_conn *c = calloc(1, sizeof(*c));
        if (!c)
                return NULL;
        c->sock = s;
        c->fd = fd;
        vhu_reader_init(&c->reader);
        vhu_writer_init(&c->writer);
        vhu_reader_init(&c->chan_reader);
        vhu_writer_init(&c->chan_writer);
        tb_mem_init(&c->mem, tb.opt.mem_slots);
        for (unsigned i = 0; i < TB_MAX_QUEUES; i++)
                tb_vq_init(&c->vqs[i], i);
        c->chan_fd = -1;
        c->xfer_fd = -1;
        s->connections++;
        return c;
}

static struct vhu_msg *msg_free(struct vhu_msg *m) {
        if (m) {
                vhu_msg_clear(m);
                free(m);
        }
        return NULL;
}

static void xfer_reset(struct tb_conn *c) {
        if (c->xfer_fd >= 0)
                close(c->xfer_fd);
        c->xfer_fd = -1;
        c->xfer = TB_XFER_NONE;
        c->xfer_len = c->xfer_done = 0;
        c->xfer_result = 0;
        c->xfer_finished = false;
}

struct tb_conn *tb_conn_free(struct tb_conn *c) {
        if (!c)
                return NULL;
        for (unsigned i = 0; i < TB_MAX_QUEUES; i++)
                tb_vq_reset(&c->vqs[i]);
        tb_chan_close(c);
        tb_inflight_clear(c);
        tb_mem_clear(&c->mem);
        xfer_reset(c);
        c->held = msg_free(c->held);
        c->delayed = msg_free(c->delayed);
        vhu_reader_reset(&c->reader);
        vhu_writer_clear(&c->writer);
        if (c->fd >= 0)
                close(c->fd);
        free(c);
        return NULL;
}

void tb_conn_fail(struct tb_conn *c, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->sock->last_error, sizeof(c->sock->last_error), fmt, ap);
        va_end(ap);
        tb_warn("sock%u: closing connection: %s", c->sock->index, c->sock->last_error);
        c->dead = true;
}

void tb_conn_flush(struct tb_conn *c) {
        if (c->dead || !vhu_writer_pending(&c->writer))
                return;
        int r = vhu_writer_flush(&c->writer, c->fd);
        if (r < 0 && r != -EAGAIN)
                tb_conn_fail(c, "write to front-end: %s", strerror(-r));
}

static void conn_queue(struct tb_conn *c, struct vhu_msg *reply) {
        if (c->writer.n_bytes > TB_MAX_WRITER_BYTES) {
                tb_conn_fail(c, "front-end does not read its replies");
                return;
        }
        int r = vhu_writer_queue(&c->writer, reply);
        if (r < 0) {
                tb_conn_fail(c, "queue reply: %s", strerror(-r));
                return;
        }
        c->sock->replies++;
        tb_conn_flush(c);
}

/* Misbehaving replies bypass the library's checks: raw bytes, raw fds. */
static void conn_send_raw(struct tb_conn *c, const struct vhu_header *hdr, const void *payload,
                          size_t len, const int *fds, unsigned n_fds) {
        uint8_t buf[VHU_HEADER_SIZE + VHU_MAX_PAYLOAD];
        VHU_SCM_BUF(cbuf, 16);
        struct iovec iov;
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        uint64_t deadline = tb_now_ms() + 1000;

        /* earlier replies first */
        while (!c->dead && vhu_writer_pending(&c->writer) && tb_now_ms() < deadline) {
                struct pollfd p = { .fd = c->fd, .events = POLLOUT };
                tb_conn_flush(c);
                if (vhu_writer_pending(&c->writer))
                        (void) poll(&p, 1, 50);
        }
        if (c->dead)
                return;
        if (len > VHU_MAX_PAYLOAD)
                len = VHU_MAX_PAYLOAD;
        memcpy(buf, hdr, VHU_HEADER_SIZE);
        memcpy(buf + VHU_HEADER_SIZE, payload, len);
        iov = (struct iovec) { .iov_base = buf, .iov_len = VHU_HEADER_SIZE + len };
        if (n_fds <= 16)
                vhu_scm_attach(&mh, cbuf.buf, sizeof(cbuf.buf), fds, n_fds);
        if (sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
                tb_conn_fail(c, "raw send: %m");
}

/* ---- handlers ---- */

static struct tb_vq *vq_by_index(struct tb_conn *c, uint64_t index) {
        return index < tb.opt.queues ? &c->vqs[index] : NULL;
}

static int reply_u64(struct vhu_msg *reply, const struct vhu_msg *m, uint64_t v) {
        return vhu_msg_build_reply_u64(reply, m, v);
}

static void stop_all_rings(struct tb_conn *c, bool reset) {
        for (unsigned i = 0; i < tb.opt.queues; i++) {
                tb_vq_stop(c, &c->vqs[i], TB_STOP_DRAIN);
                c->vqs[i].enabled = false;
                if (reset)
                        tb_vq_reset(&c->vqs[i]);
        }
}

static int handle_set_features(struct tb_conn *c, uint64_t v) {
        c->features = v & tb.opt.features;
        c->features_set = true;
        c->mem.logging = c->features & (UINT64_C(1) << VHU_VIRTIO_F_LOG_ALL);
        /* spec "Ring states": without PROTOCOL_FEATURES rings start enabled */
        if (!(c->features & (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES)))
                for (unsigned i = 0; i < tb.opt.queues; i++)
                        c->vqs[i].enabled = true;
        return v & ~tb.opt.features ? -EINVAL : 0;
}

static int handle_set_protocol_features(struct tb_conn *c, uint64_t v) {
        uint64_t bad = v & ~vhu_protocol_features_consistent(v);

        /* spec "In-band notifications": close if negotiated without both;
         * GET_VRING_BASE_INFLIGHT (and so GET_VRING_BASE_SKIP_DRAIN) "must
         * only be negotiated" with INFLIGHT_SHMFD: the same answer */
        if (bad) {
                unsigned bit = (unsigned) __builtin_ctzll(bad);
                uint64_t missing = vhu_protocol_feature_requires(bit) & ~v;
                char names[160] = "";

                for (unsigned b = 0; b < _VHU_PF_MAX; b++)
                        if (missing & VHU_PF_BIT(b))
                                snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%s",
                                         names[0] ? " and " : "", vhu_protocol_feature_name(b));
                tb_conn_fail(c, "%s without %s", vhu_protocol_feature_name(bit), names);
                return TB_CLOSE;
        }
        c->protocol_features = v & tb.opt.protocol_features;
        return v & ~tb.opt.protocol_features ? -EINVAL : 0;
}

static int handle_mem_table(struct tb_conn *c, struct vhu_msg *m) {
        const struct vhu_mem_table *t = &m->payload.mem_table;
        const char *why = NULL;

        tb_mem_clear_regions(&c->mem);
        for (unsigned i = 0; i < t->nregions; i++) {
                if (tb_mem_add(&c->mem, &t->regions[i], m->fds[i], &why) < 0) {
                        snprintf(c->sock->last_error, sizeof(c->sock->last_error),
                                 "SET_MEM_TABLE region %u: %s", i, why);
                        tb_mem_clear_regions(&c->mem);
                        return -EINVAL;
                }
        }
        return 0;
}

static int handle_add_mem_reg(struct tb_conn *c, struct vhu_msg *m) {
        const char *why = NULL;
        int r = tb_mem_add(&c->mem, &m->payload.mem_single.region, m->fds[0], &why);
        if (r < 0)
                snprintf(c->sock->last_error, sizeof(c->sock->last_error), "ADD_MEM_REG: %s", why);
        return r;
}

static int handle_vring_fd(struct tb_conn *c, struct vhu_msg *m) {
        struct tb_vq *vq = vq_by_index(c, m->payload.u64 & VHU_VRING_IDX_MASK);
        bool nofd = m->payload.u64 & VHU_VRING_NOFD_MASK;
        int fd = nofd ? -1 : vhu_msg_take_fd(m, 0);
        int *slot;

        if (!vq) {
                if (fd >= 0)
                        close(fd);
                return -EINVAL;
        }
        switch (m->hdr.request) {
        case VHU_REQ_SET_VRING_KICK: slot = &vq->kick_fd; break;
        case VHU_REQ_SET_VRING_CALL: slot = &vq->call_fd; break;
        default:                     slot = &vq->err_fd; break;
        }
        if (*slot >= 0)
                close(*slot);
        *slot = fd;
        if (fd >= 0)
                (void) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        if (m->hdr.request == VHU_REQ_SET_VRING_KICK) {
                /* spec "Ring states": a ring starts on SET_VRING_KICK; no fd
                 * means the back-end polls, or (INBAND_NOTIFICATIONS, as
                 * libvhost-user) waits for in-band VRING_KICKs */
                vq->polling = nofd && (vq->kick_ignored || !tb_conn_has_pf(c, VHU_PF_INBAND_NOTIFICATIONS));
                vq->kick_ignored = false;
                tb_vq_start(c, vq);
        }
        return 0;
}

/* spec SET_VRING_ENDIAN: legacy devices only, "before the front-end
 * starts the VQ"; 0 little-endian, 1 big-endian (validated). */
static int handle_set_vring_endian(struct tb_conn *c, const struct vhu_vring_state *st) {
        struct tb_vq *vq = vq_by_index(c, st->index);

        if (!vq || (c->features & (UINT64_C(1) << VHU_VIRTIO_F_VERSION_1)))
                return -EINVAL;
        if (vq->started)
                return -EBUSY;
        vq->endian_set = true;
        vq->big_endian = st->num == 1;
        return 0;
}

/* spec GET_SHMEM_CONFIG: the sizes by shmid (--shmem; not checked here, so
 * a test can make the front-end see a bad one). */
static int handle_get_shmem_config(const struct vhu_msg *m, struct vhu_msg *reply) {
        struct vhu_shmem_config cfg = { .nregions = tb.opt.n_shmem };

        memcpy(cfg.memory_sizes, tb.opt.shmem_sizes, tb.opt.n_shmem * sizeof(uint64_t));
        return vhu_msg_build_reply(reply, m, &cfg, sizeof(cfg), NULL, 0);
}

static int handle_get_config(struct tb_conn *c, struct vhu_msg *m, struct vhu_msg *reply) {
        const struct vhu_config *req = &m->payload.config;
        struct vhu_config out;

        /* spec: the reply size must match the request; empty means error */
        if (req->offset > TB_CONFIG_SIZE || req->size > TB_CONFIG_SIZE - req->offset ||
            req->size != m->hdr.size - VHU_CONFIG_HEADER_SIZE)
                return vhu_msg_build_reply(reply, m, NULL, 0, NULL, 0);
        out = (struct vhu_config) { .offset = req->offset, .size = req->size, .flags = req->flags };
        memcpy(out.data, tb.config + req->offset, req->size);
        return vhu_msg_build_reply(reply, m, &out, VHU_CONFIG_HEADER_SIZE + req->size, NULL, 0);
}

static int handle_set_config(struct tb_conn *c, struct vhu_msg *m) {
        const struct vhu_config *req = &m->payload.config;
        if (req->offset > TB_CONFIG_SIZE || req->size > TB_CONFIG_SIZE - req->offset ||
            req->size != m->hdr.size - VHU_CONFIG_HEADER_SIZE)
                return -EINVAL;
        /* spec: read-only fields only with the migration flag; the only
         * writable field of virtio_blk_config is "writeback" (offset 32) */
        if (req->flags != VHU_CONFIG_FLAG_MIGRATION &&
            !(req->offset == 32 && req->size == 1))
                return -EPERM;
        memcpy(tb.config + req->offset, req->data, req->size);
        return 0;
}

static int handle_get_inflight(struct tb_conn *c, struct vhu_msg *m, struct vhu_msg *reply) {
        struct vhu_inflight out = { 0 };
        int fd = -1;
        int r = tb_inflight_create(c, &m->payload.inflight, &out, &fd);
        if (r < 0) {
                snprintf(c->sock->last_error, sizeof(c->sock->last_error),
                         "GET_INFLIGHT_FD: %s", strerror(-r));
                return vhu_msg_build_reply(reply, m, &out, sizeof(out), NULL, 0);
        }
        r = vhu_msg_build_reply(reply, m, &out, sizeof(out), &fd, 1);
        if (r < 0)
                close(fd);
        else
                vhu_msg_own_fds(reply);
        return r;
}

static int handle_get_shared_object(struct tb_conn *c, struct vhu_msg *m, struct vhu_msg *reply) {
        struct tb_shared *o = tb_shared_find(c->sock, m->payload.shared.uuid);
        int fd = -1;

        /* libvhost-user's answer: the UUID echoed, the object's fd attached */
        if (o) {
                fd = fcntl(o->fd, F_DUPFD_CLOEXEC, 3);
                o->lookups++;
        }
        int r = vhu_msg_build_reply(reply, m, &m->payload.shared, sizeof(m->payload.shared),
                                    &fd, fd >= 0 ? 1 : 0);
        if (r < 0 && fd >= 0)
                close(fd);
        else if (r >= 0)
                vhu_msg_own_fds(reply);
        return r;
}

static int handle_set_device_state_fd(struct tb_conn *c, struct vhu_msg *m, struct vhu_msg *reply) {
        const struct vhu_device_state *ds = &m->payload.device_state;
        int err = 0;

        xfer_reset(c);
        if (ds->phase != VHU_TRANSFER_PHASE_STOPPED ||
            (ds->direction != VHU_TRANSFER_SAVE && ds->direction != VHU_TRANSFER_LOAD)) {
                err = EINVAL;
                goto out;
        }
        c->xfer_fd = vhu_msg_take_fd(m, 0);
        (void) fcntl(c->xfer_fd, F_SETFL, fcntl(c->xfer_fd, F_GETFL) | O_NONBLOCK);
        if (ds->direction == VHU_TRANSFER_SAVE) {
                c->xfer = TB_XFER_SAVE;
                c->xfer_len = tb_state_save(c, c->xfer_buf, sizeof(c->xfer_buf));
        } else
                c->xfer = TB_XFER_LOAD;
        tb_conn_xfer_io(c);
out:
        /* bit 8: we use the front-end's fd and return none of our own */
        return reply_u64(reply, m, VHU_DEVICE_STATE_NOFD_MASK | (uint64_t) (err & 0xff));
}

void tb_conn_xfer_io(struct tb_conn *c) {
        if (c->xfer == TB_XFER_NONE || c->xfer_finished)
                return;
        for (;;) {
                ssize_t n;
                if (c->xfer == TB_XFER_SAVE) {
                        if (c->xfer_done == c->xfer_len) {
                                c->xfer_result = 0;
                                break;
                        }
                        n = write(c->xfer_fd, c->xfer_buf + c->xfer_done, c->xfer_len - c->xfer_done);
                } else {
                        if (c->xfer_done == sizeof(c->xfer_buf)) {
                                c->xfer_result = -EFBIG;
                                break;
                        }
                        n = read(c->xfer_fd, c->xfer_buf + c->xfer_done,
                                 sizeof(c->xfer_buf) - c->xfer_done);
                        if (n == 0) {
                                c->xfer_result = tb_state_load(c, c->xfer_buf, c->xfer_done);
                                break;
                        }
                }
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno == EAGAIN)
                        return;
                if (n < 0) {
                        c->xfer_result = -errno;
                        break;
                }
                c->xfer_done += (size_t) n;
        }
        /* spec: the back-end closes its end when the transfer is done */
        c->xfer_finished = true;
        close(c->xfer_fd);
        c->xfer_fd = -1;
}

static int handle_check_device_state(struct tb_conn *c, struct vhu_msg *m, struct vhu_msg *reply) {
        uint64_t deadline = tb_now_ms() + 1000;
        int result;

        while (c->xfer != TB_XFER_NONE && !c->xfer_finished && tb_now_ms() < deadline) {
                struct pollfd p = { .fd = c->xfer_fd,
                                    .events = c->xfer == TB_XFER_SAVE ? POLLOUT : POLLIN };
                (void) poll(&p, 1, 50);
                tb_conn_xfer_io(c);
        }
        if (c->xfer == TB_XFER_NONE)
                result = -ENOENT;
        else if (!c->xfer_finished)
                result = -ETIMEDOUT;
        else
                result = c->xfer_result;
        xfer_reset(c);
        return reply_u64(reply, m, result == 0 ? 0 : 1);
}

/* The requests that set up, start, kick and stop one ring (by its index). */
static int process_ring(struct tb_conn *c, struct vhu_msg *m, struct vhu_msg *reply) {
        const struct vhu_vring_state *st = &m->payload.state;
        struct tb_vq *vq;

        switch (m->hdr.request) {
        case VHU_REQ_SET_VRING_NUM:
                vq = vq_by_index(c, st->index);
                return vq ? tb_vq_set_num(vq, st->num) : -EINVAL;
        case VHU_REQ_SET_VRING_ADDR: {
                const struct vhu_vring_addr *a = &m->payload.addr;
                vq = vq_by_index(c, a->index);
                /* virtio alignment of the split ring parts */
                if (!vq || a->desc % 16 || a->avail % 2 || a->used % 4)
                        return -EINVAL;
                vq->addr = *a;
                vq->addr_set = true;
                vq->desc = vq->avail = vq->used = NULL;
                return 0;
        }
        case VHU_REQ_SET_VRING_BASE:
                vq = vq_by_index(c, st->index);
                /* spec "Vring descriptor indices": a split ring's is 16
                 * bits; a packed ring's carries its indexes (below the
                 * ring's size) and wrap counters in bits 15 and 31 */
                if (!vq || (!(c->features & (UINT64_C(1) << VHU_VIRTIO_F_RING_PACKED)) && st->num > 0xffff) ||
                    ((c->features & (UINT64_C(1) << VHU_VIRTIO_F_RING_PACKED)) &&
                     ((st->num & 0x7fff) >= vq->num || ((st->num >> 16) & 0x7fff) >= vq->num)))
                        return -EINVAL;
                if (vq->started)
                        return -EBUSY;
                vq->set_base = st->num;
                vq->last_avail = (uint16_t) st->num;
                return 0;
        case VHU_REQ_GET_VRING_BASE:
        case VHU_REQ_GET_VRING_BASE_SKIP_DRAIN: {
                /* spec: with GET_VRING_BASE_INFLIGHT the back-end "may
                 * suspend" in-flight requests into the inflight region;
                 * SKIP_DRAIN suspends them at once */
                enum tb_stop how = m->hdr.request == VHU_REQ_GET_VRING_BASE_SKIP_DRAIN
                                           ? TB_STOP_SUSPEND_ALL
                                   : tb_conn_has_pf(c, VHU_PF_GET_VRING_BASE_INFLIGHT)
                                           ? TB_STOP_SUSPEND_UNREADY
                                           : TB_STOP_DRAIN;
                vq = vq_by_index(c, st->index);
                uint16_t base = vq ? tb_vq_stop(c, vq, how) : 0;
                return vhu_msg_build_reply(reply, m, &(struct vhu_vring_state) {
                                .index = st->index, .num = base }, sizeof(*st), NULL, 0);
        }
        case VHU_REQ_SET_VRING_ENABLE:
                vq = vq_by_index(c, st->index);
                if (!vq || st->num > 1)
                        return -EINVAL;
                vq->enabled = st->num;
                if (vq->enabled && vq->started)
                        tb_vq_kick(c, vq);
                return 0;
        case VHU_REQ_VRING_KICK:
                vq = vq_by_index(c, st->index);
                if (!vq)
                        return -EINVAL;
                if (!vq->started)
                        return tb_vq_start(c, vq);
                tb_vq_kick(c, vq);
                return 0;
        default:
                return -EOPNOTSUPP;
        }
}

/* Returns 0, -errno (a refusal), or TB_CLOSE; fills reply for requests
 * that always have their own answer. */
static int process(struct tb_conn *c, struct vhu_msg *m, struct vhu_msg *reply) {
        const struct vhu_vring_state *st = &m->payload.state;
        const char *why = NULL;
        int r;

        switch (m->hdr.request) {
        case VHU_REQ_GET_FEATURES:
                return reply_u64(reply, m, tb.opt.features);
        case VHU_REQ_SET_FEATURES:
                return handle_set_features(c, m->payload.u64);
        case VHU_REQ_SET_OWNER:
                return 0;
        case VHU_REQ_RESET_OWNER:
                /* spec: deprecated; "disable all rings" */
                stop_all_rings(c, false);
                return 0;
        case VHU_REQ_GET_PROTOCOL_FEATURES:
                return reply_u64(reply, m, tb.opt.protocol_features);
        case VHU_REQ_SET_PROTOCOL_FEATURES:
                return handle_set_protocol_features(c, m->payload.u64);
        case VHU_REQ_SET_MEM_TABLE:
                return handle_mem_table(c, m);
        case VHU_REQ_ADD_MEM_REG:
                return handle_add_mem_reg(c, m);
        case VHU_REQ_REM_MEM_REG:
                return tb_mem_remove(&c->mem, &m->payload.mem_single.region);
        case VHU_REQ_SET_LOG_BASE:
                if (!tb_conn_has_pf(c, VHU_PF_LOG_SHMFD) || m->n_fds == 0)
                        return 0;
                return tb_mem_set_log(&c->mem, m->fds[0], m->payload.log.mmap_size,
                                      m->payload.log.mmap_offset);
        case VHU_REQ_SET_LOG_FD:
                return 0;       /* the fd closes with the message */
        case VHU_REQ_SET_VRING_NUM:
        case VHU_REQ_SET_VRING_ADDR:
        case VHU_REQ_SET_VRING_BASE:
        case VHU_REQ_GET_VRING_BASE:
        case VHU_REQ_GET_VRING_BASE_SKIP_DRAIN:
        case VHU_REQ_SET_VRING_ENABLE:
        case VHU_REQ_VRING_KICK:
                return process_ring(c, m, reply);
        case VHU_REQ_SET_VRING_ENDIAN:
                return handle_set_vring_endian(c, st);
        case VHU_REQ_GET_SHMEM_CONFIG:
                return handle_get_shmem_config(m, reply);
        case VHU_REQ_SET_VRING_KICK:
        case VHU_REQ_SET_VRING_CALL:
        case VHU_REQ_SET_VRING_ERR:
                return handle_vring_fd(c, m);
        case VHU_REQ_GET_QUEUE_NUM:
                return reply_u64(reply, m, tb.opt.queues);
        case VHU_REQ_SET_BACKEND_REQ_FD:
                tb_chan_set(c, vhu_msg_take_fd(m, 0));
                return 0;
        case VHU_REQ_GET_CONFIG:
                return handle_get_config(c, m, reply);
        case VHU_REQ_SET_CONFIG:
                return handle_set_config(c, m);
        case VHU_REQ_GET_INFLIGHT_FD:
                return handle_get_inflight(c, m, reply);
        case VHU_REQ_SET_INFLIGHT_FD:
                r = tb_inflight_set(c, &m->payload.inflight, m->fds[0], &why);
                if (r < 0)
                        snprintf(c->sock->last_error, sizeof(c->sock->last_error),
                                 "SET_INFLIGHT_FD: %s", why);
                return r;
        case VHU_REQ_RESET_DEVICE:
                /* spec: disable all rings, device state back to initial;
                 * ownership, memory and the back-end channel stay */
                stop_all_rings(c, true);
                c->status = 0;
                c->features = 0;
                c->features_set = false;
                return 0;
        case VHU_REQ_GET_MAX_MEM_SLOTS:
                return reply_u64(reply, m, tb.opt.mem_slots);
        case VHU_REQ_SET_STATUS:
                c->status = m->payload.u64 & 0xff;
                return 0;
        case VHU_REQ_GET_STATUS:
                return reply_u64(reply, m, c->status);
        case VHU_REQ_GET_SHARED_OBJECT:
                return handle_get_shared_object(c, m, reply);
        case VHU_REQ_SET_DEVICE_STATE_FD:
                return handle_set_device_state_fd(c, m, reply);
        case VHU_REQ_CHECK_DEVICE_STATE:
                return handle_check_device_state(c, m, reply);
        default:
                return -EOPNOTSUPP;
        }
}

/* A reply shaped right but saying no (misbehaviour "refuse", or a request
 * with its own reply that we do not implement). */
static int build_refusal(struct tb_conn *c, const struct vhu_msg *m, uint64_t value,
                         struct vhu_msg *reply) {
        const struct vhu_request_info *info = vhu_request_info(VHU_DIR_FRONTEND, m->hdr.request);
        uint8_t zero[VHU_MAX_PAYLOAD] = { 0 };

        if (!info || info->reply != VHU_REPLY_ALWAYS)
                return reply_u64(reply, m, value);
        if (m->hdr.request == VHU_REQ_GET_CONFIG)
                /* spec: an empty payload means error */
                return vhu_msg_build_reply(reply, m, NULL, 0, NULL, 0);
        if (m->hdr.request == VHU_REQ_GET_VRING_BASE ||
            m->hdr.request == VHU_REQ_GET_VRING_BASE_SKIP_DRAIN)
                return vhu_msg_build_reply(reply, m, &(struct vhu_vring_state) {
                                .index = m->payload.state.index, .num = (uint32_t) value },
                                sizeof(struct vhu_vring_state), NULL, 0);
        if (m->hdr.request == VHU_REQ_GET_SHARED_OBJECT)
                /* the UUID, but no fd */
                return vhu_msg_build_reply(reply, m, &m->payload.shared,
                                           sizeof(m->payload.shared), NULL, 0);
        if (info->reply_max_size == sizeof(uint64_t))
                return reply_u64(reply, m, value);
        /* e.g. GET_INFLIGHT_FD: zeroes and no fd */
        return vhu_msg_build_reply(reply, m, zero, info->reply_min_size, NULL, 0);
}

static void send_misbehaving(struct tb_conn *c, const struct tb_rule *rule, struct vhu_msg *reply) {
        struct vhu_header hdr = reply->hdr;
        int fds[VHU_MAX_FDS + 3];
        unsigned n_fds = 0;
        size_t len = reply->hdr.size;

        for (unsigned i = 0; i < reply->n_fds; i++)
                fds[n_fds++] = reply->fds[i];
        switch (rule->action) {
        case TB_ACT_BAD_FLAGS:
                /* default: version 1 without the REPLY bit */
                hdr.flags = rule->has_arg ? (uint32_t) rule->arg : VHU_VERSION;
                break;
        case TB_ACT_WRONG_REQUEST:
                hdr.request = rule->has_arg ? (uint32_t) rule->arg : hdr.request + 1;
                break;
        case TB_ACT_OVERSIZED:
                hdr.size = rule->has_arg ? (uint32_t) rule->arg : VHU_MAX_PAYLOAD + 4096;
                break;
        case TB_ACT_EXTRA_FDS: {
                unsigned extra = rule->has_arg && rule->arg <= 3 ? (unsigned) rule->arg : 3;
                for (unsigned i = 0; i < extra; i++) {
                        int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                        if (fd >= 0)
                                fds[n_fds++] = fd;
                }
                break;
        }
        default:
                break;
        }
        conn_send_raw(c, &hdr, reply->payload.raw, len, fds, n_fds);
        c->sock->replies++;
        for (unsigned i = reply->n_fds; i < n_fds; i++)
                close(fds[i]);
}

/* Misbehaviour "ignore-fd": the ring's kick/call/err fd is held open but
 * never read or written, and the request is handled as if it carried none
 * (a kick is then polled) -- a back-end that does not drain its kick fd. */
static void ignore_vring_fd(struct tb_conn *c, struct vhu_msg *m) {
        struct tb_vq *vq;

        if ((m->hdr.request != VHU_REQ_SET_VRING_KICK && m->hdr.request != VHU_REQ_SET_VRING_CALL &&
             m->hdr.request != VHU_REQ_SET_VRING_ERR) || m->n_fds != 1)
                return;
        vq = vq_by_index(c, m->payload.u64 & VHU_VRING_IDX_MASK);
        if (!vq)
                return;
        if (vq->ignored_fd >= 0)
                close(vq->ignored_fd);
        vq->ignored_fd = vhu_msg_take_fd(m, 0);
        if (m->hdr.request == VHU_REQ_SET_VRING_KICK)
                vq->kick_ignored = true;
        m->payload.u64 |= VHU_VRING_NOFD_MASK;
}

/* Handle one validated request; consumes m's fds. */
static void conn_handle(struct tb_conn *c, struct vhu_msg *m, const struct tb_rule *rule) {
        struct vhu_msg *reply = calloc(1, sizeof(*reply));
        uint32_t req = m->hdr.request;
        bool first_features = req == VHU_REQ_GET_FEATURES && !c->handshake_failed_once;
        int r;

        if (!reply) {
                tb_conn_fail(c, "out of memory");
                return;
        }
        vhu_msg_init(reply);
        if (rule && rule->action == TB_ACT_IGNORE_FD)
                ignore_vring_fd(c, m);
        if (rule && rule->action == TB_ACT_REFUSE) {
                r = -EPERM;
                if (vhu_request_info(VHU_DIR_FRONTEND, req)->reply == VHU_REPLY_ALWAYS)
                        build_refusal(c, m, rule->has_arg ? rule->arg : 1, reply);
        } else
                r = process(c, m, reply);
        if (r == TB_CLOSE || c->dead)
                goto out;

        bool has_reply = reply->hdr.request != 0;
        if (!has_reply && vhu_request_info(VHU_DIR_FRONTEND, req)->reply == VHU_REPLY_ALWAYS) {
                build_refusal(c, m, 1, reply);
                has_reply = true;
        }
        if (!has_reply && vhu_request_expects_reply(VHU_DIR_FRONTEND, req, m->hdr.flags,
                                                    c->protocol_features)) {
                /* REPLY_ACK: zero for success, nonzero otherwise */
                uint64_t v = r == 0 ? 0 : rule && rule->action == TB_ACT_REFUSE && rule->has_arg
                             ? rule->arg : (uint64_t) -r;
                reply_u64(reply, m, v);
                has_reply = true;
        }
        if (rule) {
                switch (rule->action) {
                case TB_ACT_SILENCE:
                        goto out;
                case TB_ACT_DELAY:
                        c->paused_until = tb_now_ms() + rule->arg;
                        if (has_reply) {
                                c->delayed = reply;
                                reply = NULL;
                        }
                        goto out;
                case TB_ACT_BAD_FLAGS:
                case TB_ACT_WRONG_REQUEST:
                case TB_ACT_OVERSIZED:
                case TB_ACT_EXTRA_FDS:
                        /* a reply is forced even where none was due */
                        if (!has_reply)
                                reply_u64(reply, m, 0);
                        send_misbehaving(c, rule, reply);
                        goto out;
                default:
                        break;
                }
        }
        if (has_reply)
                conn_queue(c, reply);
        if (first_features && c->sock->fail_handshake_left > 0) {
                c->sock->fail_handshake_left--;
                c->handshake_failed_once = true;
                tb_conn_flush(c);
                tb_conn_fail(c, "--fail-handshake: closing after GET_FEATURES (%u more)",
                             c->sock->fail_handshake_left);
        }
out:
        reply = msg_free(reply);
        vhu_msg_clear(m);
}

static void conn_request(struct tb_conn *c, struct vhu_msg *m) {
        struct tb_sock *s = c->sock;
        const char *why = "invalid request";
        struct tb_rule rule;
        uint32_t req = m->hdr.request;

        if (req < _VHU_REQ_MAX && vhu_request_info(VHU_DIR_FRONTEND, req))
                s->requests[req]++;
        else
                s->unknown_requests++;
        tb_debug("sock%u: <- %s flags 0x%x size %u fds %u", s->index,
                 vhu_request_name(VHU_DIR_FRONTEND, req), m->hdr.flags, m->hdr.size, m->n_fds);

        if (vhu_validate_request(VHU_DIR_FRONTEND, c->protocol_features, m, &why) < 0) {
                s->protocol_errors++;
                tb_conn_fail(c, "%s (%u): %s", vhu_request_name(VHU_DIR_FRONTEND, req), req, why);
                vhu_msg_clear(m);
                return;
        }
        if (!tb_rule_take(s, req, &rule)) {
                conn_handle(c, m, NULL);
                return;
        }
        tb_info("sock%u: misbehaving on %s: %s", s->index,
                vhu_request_name(VHU_DIR_FRONTEND, req), tb_action_name(rule.action));
        switch (rule.action) {
        case TB_ACT_CLOSE:
                tb_conn_fail(c, "misbehave: close on %s", vhu_request_name(VHU_DIR_FRONTEND, req));
                vhu_msg_clear(m);
                return;
        case TB_ACT_HANG:
                /* keep the request (and its fds) until "resume" */
                c->hung = true;
                c->held = malloc(sizeof(*c->held));
                if (!c->held) {
                        tb_conn_fail(c, "out of memory");
                        vhu_msg_clear(m);
                        return;
                }
                memcpy(c->held, m, sizeof(*m));
                vhu_msg_init(m);
                return;
        default:
                conn_handle(c, m, &rule);
                return;
        }
}

void tb_conn_on_readable(struct tb_conn *c) {
        struct vhu_msg *m = malloc(sizeof(*m));
        if (!m) {
                tb_conn_fail(c, "out of memory");
                return;
        }
        vhu_msg_init(m);
        while (!c->dead && !c->hung && !c->delayed && c->paused_until <= tb_now_ms()) {
                int r = vhu_reader_read(&c->reader, c->fd, m);
                if (r == -EAGAIN)
                        break;
                if (r == 0) {
                        tb_info("sock%u: front-end closed the connection", c->sock->index);
                        c->dead = true;
                        break;
                }
                if (r < 0) {
                        if (r == -EPROTO)
                                c->sock->protocol_errors++;
                        tb_conn_fail(c, "read: %s", strerror(-r));
                        break;
                }
                conn_request(c, m);
                vhu_msg_init(m);
        }
        msg_free(m);
        tb_conn_flush(c);
}

void tb_conn_resume(struct tb_conn *c) {
        if (!c->hung)
                return;
        c->hung = false;
        if (c->held) {
                struct vhu_msg *m = c->held;
                c->held = NULL;
                conn_handle(c, m, NULL);
                free(m);
        }
        tb_conn_on_readable(c);
}

void tb_conn_on_timer(struct tb_conn *c, uint64_t now) {
        if (c->paused_until && c->paused_until <= now) {
                c->paused_until = 0;
                if (c->delayed) {
                        conn_queue(c, c->delayed);
                        c->delayed = msg_free(c->delayed);
                }
                tb_conn_on_readable(c);
        }
        for (unsigned i = 0; i < tb.opt.queues && !c->dead; i++)
                tb_vq_on_timer(c, &c->vqs[i], now);
        tb_chan_on_timer(c, now);
}

uint64_t tb_conn_next_deadline(const struct tb_conn *c) {
        uint64_t d = c->paused_until ? c->paused_until : UINT64_MAX;
        for (unsigned i = 0; i < tb.opt.queues; i++) {
                uint64_t v = tb_vq_next_deadline(&c->vqs[i]);
                if (v < d)
                        d = v;
        }
        uint64_t v = tb_chan_next_deadline(c);
        return v < d ? v : d;
}
