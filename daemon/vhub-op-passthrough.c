/* SPDX-License-Identifier: MIT */
/*
 * PASSTHROUGH: one request of a front-door VMM (docs/front-door.md, "Every
 * front-end request").  Queued in order with the device's other ops, so a
 * restore runs first; at the head it is
 *   own      answered from the device's state (features, queue count, ...);
 *   memory   applied to the device's copy of the VMM's table, which the
 *            back-end is synced to (the memory sync of vhub-op-memory.c),
 *            committed when it acked;
 *   forward  sent to the back-end as it came -- the VMM's addresses, its
 *            eventfds and memory fds passed through -- and the back-end's
 *            reply or ack relayed; recorded on success for a restore.
 * The flags towards the back-end are the daemon's (NEED_REPLY where it
 * negotiated REPLY_ACK), not the VMM's.
 *
 * When the back-end cannot answer in time (an outage, a hung back-end) the
 * request is answered from the daemon's records instead
 * (passthrough_answer_from_state(), the design table's last column): set
 * requests are recorded and acked (the restore replays them), queries are
 * answered from the records or guest memory, and a request with no honest
 * answer closes the VMM's connection.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vhub-context.h"
#include "vhub-device-vmm-internal.h"
#include "vhub-eventfd.h"
#include "vhub-fd-budget.h"
#include "vhub-fd-track.h"
#include "vhub-log.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

enum vmm_kind {
        VMM_OWN,
        VMM_MEMORY,
        VMM_FORWARD,
};

static enum vmm_kind request_kind(uint32_t request) {
        switch (request) {
        case VHU_REQ_GET_FEATURES:
        case VHU_REQ_GET_PROTOCOL_FEATURES:
        case VHU_REQ_SET_PROTOCOL_FEATURES:   /* checked by the transport; not forwarded */
        case VHU_REQ_GET_QUEUE_NUM:
        case VHU_REQ_SET_OWNER:               /* the back-end has had its owner since device.add */
        case VHU_REQ_SET_BACKEND_REQ_FD:      /* the face opened the VMM's channel */
        case VHU_REQ_GET_MAX_MEM_SLOTS:
        case VHU_REQ_GET_SHMEM_CONFIG:
                return VMM_OWN;
        case VHU_REQ_SET_MEM_TABLE:
        case VHU_REQ_ADD_MEM_REG:
        case VHU_REQ_REM_MEM_REG:
                return VMM_MEMORY;
        default:
                return VMM_FORWARD;
        }
}

/* ---- answers ---- */

/* The call's answer: payload and fds (dup'd: the answer owns its copies). */
static void answer_send(struct vhub_device *d, struct vhub_op *op, const void *payload, uint32_t size,
                        const int *fds, unsigned n_fds) {
        struct vhub_vmm_request *q = op->vmm_req;
        struct vhub_call *call = op->call;
        struct vhu_msg *m;

        q->answered = true;
        if (!call)
                return;
        m = calloc(1, sizeof(*m));
        if (!m) {
                vhub_error_set(&op->error, VHUB_ERR_INTERNAL, "out of memory");
                op_complete_call(d, op, -ENOMEM);
                return;
        }
        vhu_msg_init(m);
        m->hdr.request = q->msg.hdr.request;
        m->hdr.flags = VHU_VERSION | VHU_FLAG_REPLY;
        m->hdr.size = size;
        if (size)
                memcpy(m->payload.raw, payload, size);
        for (unsigned i = 0; i < n_fds && i < VHU_MAX_FDS; i++) {
                m->fds[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
                if (m->fds[i] < 0) {
                        vhu_msg_clear(m);
                        free(m);
                        vhub_error_set(&op->error, VHUB_ERR_INTERNAL, "dup: %s", strerror(errno));
                        op_complete_call(d, op, -EMFILE);
                        return;
                }
                m->n_fds = i + 1;
        }
        call->out.vmm_request = (struct vhub_vmm_answer){ .msg = m };
        op_complete_call(d, op, 0);
}

static void answer_u64(struct vhub_device *d, struct vhub_op *op, uint64_t value) {
        answer_send(d, op, &value, sizeof(value), NULL, 0);
}

static void answer_close(struct vhub_device *d, struct vhub_op *op, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

static void answer_close(struct vhub_device *d, struct vhub_op *op, const char *fmt, ...) {
        struct vhub_call *call = op->call;
        va_list ap;

        op->vmm_req->answered = true;
        if (!call)
                return;
        call->out.vmm_request = (struct vhub_vmm_answer){ .close = true };
        va_start(ap, fmt);
        vsnprintf(call->out.vmm_request.why, sizeof(call->out.vmm_request.why), fmt, ap);
        va_end(ap);
        op_complete_call(d, op, 0);
}

/* What the daemon answers itself, from what the back-end told it at device.add. */
static void answer_own(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_shmem_config shmem = { .nregions = d->n_shmem };

        switch (op->vmm_req->msg.hdr.request) {
        case VHU_REQ_GET_FEATURES:
                answer_u64(d, op, d->features);
                break;
        case VHU_REQ_GET_PROTOCOL_FEATURES:
                answer_u64(d, op, vhub_device_vmm_protocol_features(d));
                break;
        case VHU_REQ_GET_QUEUE_NUM:
                answer_u64(d, op, d->backend_queue_num ? d->backend_queue_num : d->queues);
                break;
        case VHU_REQ_GET_MAX_MEM_SLOTS:
                answer_u64(d, op, d->max_mem_slots);
                break;
        case VHU_REQ_GET_SHMEM_CONFIG:
                if (d->n_shmem)
                        memcpy(shmem.memory_sizes, d->shmem_sizes, d->n_shmem * sizeof(uint64_t));
                answer_send(d, op, &shmem, sizeof(shmem), NULL, 0);
                break;
        default: /* SET_OWNER, SET_PROTOCOL_FEATURES, SET_BACKEND_REQ_FD: done */
                answer_u64(d, op, 0);
                break;
        }
}

/* ---- what the VMM may send ---- */

static uint32_t ring_index(const struct vhu_msg *m) {
        switch (m->hdr.request) {
        case VHU_REQ_SET_VRING_KICK:
        case VHU_REQ_SET_VRING_CALL:
        case VHU_REQ_SET_VRING_ERR:
                return (uint32_t)(m->payload.u64 & VHU_VRING_IDX_MASK);
        case VHU_REQ_SET_VRING_ADDR:
                return m->payload.addr.index;
        default:
                return m->payload.state.index;
        }
}

static bool is_ring_request(uint32_t request) {
        switch (request) {
        case VHU_REQ_SET_VRING_NUM:
        case VHU_REQ_SET_VRING_ADDR:
        case VHU_REQ_SET_VRING_BASE:
        case VHU_REQ_GET_VRING_BASE:
        case VHU_REQ_GET_VRING_BASE_SKIP_DRAIN:
        case VHU_REQ_SET_VRING_KICK:
        case VHU_REQ_SET_VRING_CALL:
        case VHU_REQ_SET_VRING_ERR:
        case VHU_REQ_SET_VRING_ENABLE:
        case VHU_REQ_SET_VRING_ENDIAN:
        case VHU_REQ_VRING_KICK:
                return true;
        default:
                return false;
        }
}

/* A memory file at least end bytes long (the inflight region, the log). */
static bool fd_is_memory_file(int fd, uint64_t end) {
        struct stat st;

        return fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size >= end;
}

/*
 * What the transport's validation cannot know: ring indexes are the
 * device's, eventfds are eventfds (the daemon writes to them: a full pipe
 * would stall it), the inflight region and the log are memory files large
 * enough.  A VMM that breaks these is closed: no back-end gets it.
 */
static void request_check(const struct vhub_device *d, struct vhub_vmm_request *q) {
        const struct vhu_msg *m = &q->msg;
        uint32_t r = m->hdr.request;

        if (is_ring_request(r) && !vmm_ring_ok(d, ring_index(m))) {
                q->close = true;
                snprintf(q->close_why, sizeof(q->close_why), "%s for ring %u; the device has %u queues",
                         REQ(r), ring_index(m), d->queues);
                return;
        }
        if ((r == VHU_REQ_SET_VRING_KICK || r == VHU_REQ_SET_VRING_CALL || r == VHU_REQ_SET_VRING_ERR) &&
            m->n_fds == 1 && !vhub_fd_is_eventfd(m->fds[0])) {
                q->close = true;
                snprintf(q->close_why, sizeof(q->close_why), "%s for ring %u with an fd that is no eventfd",
                         REQ(r), ring_index(m));
                return;
        }
        if (r == VHU_REQ_SET_VRING_NUM && (m->payload.state.num == 0 || m->payload.state.num > 32768)) {
                q->close = true;
                snprintf(q->close_why, sizeof(q->close_why), "SET_VRING_NUM %u for ring %u (1..32768)",
                         m->payload.state.num, m->payload.state.index);
                return;
        }
        if (r == VHU_REQ_SET_INFLIGHT_FD &&
            (m->payload.inflight.mmap_offset + m->payload.inflight.mmap_size < m->payload.inflight.mmap_size ||
             !fd_is_memory_file(m->fds[0], m->payload.inflight.mmap_offset + m->payload.inflight.mmap_size))) {
                q->close = true;
                snprintf(q->close_why, sizeof(q->close_why),
                         "SET_INFLIGHT_FD with an fd that is no memory file of the size it says");
                return;
        }
        if (r == VHU_REQ_SET_LOG_BASE && m->n_fds == 1 &&
            (m->payload.log.mmap_offset + m->payload.log.mmap_size < m->payload.log.mmap_size ||
             !fd_is_memory_file(m->fds[0], m->payload.log.mmap_offset + m->payload.log.mmap_size))) {
                q->close = true;
                snprintf(q->close_why, sizeof(q->close_why),
                         "SET_LOG_BASE with an fd that is no memory file of the size it says");
        }
}

/*
 * A ring's addresses are the VMM's own, translated through its memory table
 * (unless behind an IOMMU: IOVAs): each area must be in it when the ring is
 * set, or the back-end could not reach it (libvhost-user drops its
 * connection at once: "Invalid vring_addr message") and no restore could
 * read the ring.  QEMU 7.2 sends such addresses when it restarts a disk on
 * a connection it never set up again (docs/front-door.md, "Not done").
 * Checked as the request runs: the table is the one of the requests before.
 */
static void ring_addr_check(const struct vhub_device *d, struct vhub_vmm_request *q) {
        const struct vhu_vring_addr *a = &q->msg.payload.addr;
        uint8_t desc[16], area[4];

        if (q->close || q->msg.hdr.request != VHU_REQ_SET_VRING_ADDR || features_iommu(d->acked_features))
                return;
        /* a descriptor, and the flags and index of the driver and device
         * areas: what a restore reads (vmm_read_guest) */
        if (vmm_read_guest(d, a->desc, desc, sizeof(desc)) == 0 &&
            vmm_read_guest(d, a->avail, area, sizeof(area)) == 0 && vmm_read_guest(d, a->used, area, sizeof(area)) == 0)
                return;
        q->close = true;
        snprintf(q->close_why, sizeof(q->close_why), "SET_VRING_ADDR for ring %u outside the VMM's memory table",
                 a->index);
}

/* The daemon keeps a dup of what a VMM sends (regions, eventfds): like a
 * JSON-RPC client, a VMM may make it hold no more than its uid's budget
 * (vhub-fd-budget.h).  Past it the VMM is closed: nothing it sends next
 * could be kept either. */
static void fd_budget_check(const struct vhub_device *d, struct vhub_vmm_request *q) {
        struct vhub_fd_usage u = { .uid = d->vm->uid };
        struct vhub_error err = { 0 };

        vhub_fd_usage_add_model(d->vm->ctx, &u);
        if (vhub_fd_budget_check(&d->vm->ctx->fd_budget, &u, q->msg.n_fds, 0, &err) == 0)
                return;
        q->close = true;
        snprintf(q->close_why, sizeof(q->close_why), "%s: %s", REQ(q->msg.hdr.request), err.detail);
}

/* ---- memory: the VMM's table, the back-end synced to it ---- */

static bool same_file(int a, int b) {
        struct stat sa, sb;

        return fstat(a, &sa) == 0 && fstat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* One region of the VMM into the target table (fd dup'd); a region the
 * back-end already has keeps its id, so that a VMM re-sending the same
 * table (QEMU does at every start) makes no back-end traffic. */
static int target_add(struct vhub_device *d, struct vhub_vmm_request *q, const struct vhu_mem_region *w,
                      int fd) {
        const struct vhub_mem_table *committed = &d->vmm->mem;
        struct vhub_region r = {
                .gpa = w->gpa, .size = w->size, .uaddr = w->uaddr, .offset = w->mmap_offset,
        };
        struct vhub_error err = { 0 };

        r.fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (r.fd < 0) {
                snprintf(q->close_why, sizeof(q->close_why), "dup: %s", strerror(errno));
                return -errno;
        }
        if (vhub_mem_table_check_new(&q->target, &r, &err) < 0) {
                r.fd = vhu_safe_close(r.fd);
                snprintf(q->close_why, sizeof(q->close_why), "%s with a bad region: %s",
                         REQ(q->msg.hdr.request), err.detail);
                return -EINVAL;
        }
        for (size_t i = 0; i < committed->n && !r.id; i++) {
                const struct vhub_region *c = &committed->regions[i];

                if (c->gpa == r.gpa && c->size == r.size && c->uaddr == r.uaddr && c->offset == r.offset &&
                    same_file(c->fd, r.fd))
                        r.id = c->id;
        }
        if (!r.id) {
                r.id = ++d->vm->ctx->next_region_id;
                vhub_changed(d->vm->ctx, NULL); /* the id counter (the daemon's snapshot) */
        }
        if (vhub_mem_table_add(&q->target, &r) < 0) { /* takes r.fd in every case */
                snprintf(q->close_why, sizeof(q->close_why), "out of memory");
                return -ENOMEM;
        }
        return 0;
}

/* The table the VMM's memory request asks for (once per request). */
static int target_build(struct vhub_device *d, struct vhub_vmm_request *q) {
        const struct vhub_mem_table *committed = &d->vmm->mem;
        const struct vhu_msg *m = &q->msg;
        const struct vhu_mem_region *rm;
        bool found = false;
        int r = 0;

        if (q->has_target || q->close)
                return q->close ? -EINVAL : 0;
        vhub_mem_table_init(&q->target);
        switch (m->hdr.request) {
        case VHU_REQ_SET_MEM_TABLE:
                for (uint32_t i = 0; r == 0 && i < m->payload.mem_table.nregions; i++)
                        r = target_add(d, q, &m->payload.mem_table.regions[i], m->fds[i]);
                break;
        case VHU_REQ_ADD_MEM_REG:
                for (size_t i = 0; r == 0 && i < committed->n; i++) {
                        const struct vhub_region *c = &committed->regions[i];
                        struct vhu_mem_region w = { c->gpa, c->size, c->uaddr, c->offset };

                        r = target_add(d, q, &w, c->fd);
                }
                if (r == 0)
                        r = target_add(d, q, &m->payload.mem_single.region, m->fds[0]);
                break;
        case VHU_REQ_REM_MEM_REG:
                rm = &m->payload.mem_single.region;
                for (size_t i = 0; r == 0 && i < committed->n; i++) {
                        const struct vhub_region *c = &committed->regions[i];
                        struct vhu_mem_region w = { c->gpa, c->size, c->uaddr, c->offset };

                        /* spec REM_MEM_REG: identified by its guest address, size and user address */
                        if (!found && c->gpa == rm->gpa && c->size == rm->size && c->uaddr == rm->uaddr) {
                                found = true;
                                continue;
                        }
                        r = target_add(d, q, &w, c->fd);
                }
                if (r == 0 && !found) {
                        snprintf(q->close_why, sizeof(q->close_why),
                                 "REM_MEM_REG of gpa 0x%llx, a region it never added",
                                 (unsigned long long)rm->gpa);
                        r = -ENOENT;
                }
                break;
        }
        if (r == 0 && q->target.n > d->max_mem_slots) {
                snprintf(q->close_why, sizeof(q->close_why),
                         "%zu memory regions; the back-end takes %u", q->target.n, d->max_mem_slots);
                r = -ENOSPC;
        }
        if (r < 0) {
                vhub_mem_table_done(&q->target);
                q->close = true;
                return r;
        }
        q->has_target = true;
        return 0;
}

static void target_commit(struct vhub_device *d, struct vhub_vmm_request *q) {
        if (!q->has_target)
                return;
        vmm_mem_replace(d, &q->target);
        q->has_target = false;
}

int vmm_memory_target(const struct vhub_device *d, const struct vhub_op *op,
                      const struct vhub_region ***ret_regions, size_t *ret_n) {
        const struct vhub_mem_table *t = &d->vmm->mem;
        const struct vhub_region **v;
        size_t n;

        if (op->kind == VHUB_OP_VMM_STOP)
                t = NULL; /* the VMM left: its memory goes */
        else if (op->kind == VHUB_OP_PASSTHROUGH && op->vmm_req->has_target)
                t = &op->vmm_req->target;
        n = t ? t->n : 0;
        v = calloc(n + 1, sizeof(*v));
        if (!v)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++)
                v[i] = &t->regions[i];
        *ret_regions = v;
        *ret_n = n;
        return 0;
}

const struct vhub_region *vmm_region_by_id(const struct vhub_device *d, uint64_t id) {
        return vhub_mem_table_find_id(&d->vmm->mem, id);
}

/* ---- records: what a restore replays ---- */

static int dup_or_none(int fd) {
        return fd >= 0 ? fcntl(fd, F_DUPFD_CLOEXEC, 3) : -1;
}

static void ring_set_fd(struct vhub_device *d, uint32_t index, uint32_t request, uint64_t u64, int fd) {
        struct vhub_vmm_ring *r = &d->vmm->rings[index];

        vmm_ring_set_fd(d, index,
                        request == VHU_REQ_SET_VRING_KICK ? VMM_RING_KICK
                        : request == VHU_REQ_SET_VRING_CALL ? VMM_RING_CALL : VMM_RING_ERR,
                        dup_or_none(fd));
        switch (request) {
        case VHU_REQ_SET_VRING_KICK:
                r->kick_set = true;
                r->kick_u64 = u64;
                r->started = true; /* spec "Ring states": SET_VRING_KICK starts the ring */
                break;
        case VHU_REQ_SET_VRING_CALL:
                r->call_set = true;
                r->call_u64 = u64;
                break;
        default:
                r->err_set = true;
                r->err_u64 = u64;
                break;
        }
}

/* A reset (RESET_DEVICE, RESET_OWNER): rings, features, status and the
 * kept inflight region go; the memory stays (spec: the table is the
 * front-end's, not the device's). */
static void records_reset(struct vhub_device *d) {
        struct vhub_device_vmm *s = d->vmm;

        for (unsigned i = 0; i < d->queues; i++) {
                vmm_ring_close_fds(d, i);
                s->rings[i] = (struct vhub_vmm_ring){ .kick_fd = -1, .call_fd = -1, .err_fd = -1 };
        }
        s->features_set = s->status_set = s->inflight_set = false;
        d->acked_features = 0;
        device_set_inflight(d, -1);
        if (d->state == VHUB_DEV_RUNNING || d->state == VHUB_DEV_STOPPED)
                device_set_state(d, VHUB_DEV_READY, "reset by the VMM");
        else if (d->state == VHUB_DEV_DISCONNECTED || d->state == VHUB_DEV_RESTORING)
                d->state_before_loss = VHUB_DEV_READY;
}

static void config_cache_put(struct vhub_device_vmm *s, const struct vhu_msg *reply) {
        const struct vhu_config *c = &reply->payload.config;
        unsigned slot = s->next_config;

        if (reply->hdr.size != VHU_CONFIG_HEADER_SIZE + c->size || c->size == 0)
                return; /* the back-end's error: nothing to keep */
        for (unsigned i = 0; i < s->n_config; i++)
                if (s->config[i].offset == c->offset && s->config[i].size == c->size)
                        slot = i;
        if (slot == s->next_config) {
                s->next_config = (s->next_config + 1) % VMM_CONFIG_CACHE;
                if (s->n_config < VMM_CONFIG_CACHE)
                        s->n_config++;
        }
        s->config[slot].offset = c->offset;
        s->config[slot].size = c->size;
        memcpy(s->config[slot].data, c->data, c->size);
}

/* The ring stopped at base (GET_VRING_BASE). */
static void ring_stopped(struct vhub_device *d, uint32_t index, uint32_t base) {
        struct vhub_vmm_ring *r = &d->vmm->rings[index];

        r->started = false;
        r->base_from_state = false;
        r->base = base;
        r->base_set = true;
        vmm_update_state(d, "rings stopped by the VMM");
}

/* One of a ring's u32 records, as the VMM set it (what a restore replays). */
static void ring_record(bool *ret_set, uint32_t *ret_value, uint32_t value) {
        *ret_set = true;
        *ret_value = value;
}

/* Record the effect of a set request that the back-end took, or that the
 * daemon acks for a restore to replay (reply NULL then). */
static void record(struct vhub_device *d, struct vhub_op *op, const struct vhu_msg *reply) {
        struct vhub_device_vmm *s = d->vmm;
        const struct vhu_msg *m = &op->vmm_req->msg;
        struct vhub_vmm_ring *ring = is_ring_request(m->hdr.request) ? &s->rings[ring_index(m)] : NULL;

        switch (m->hdr.request) {
        case VHU_REQ_SET_FEATURES:
                s->features_set = true;
                s->features = m->payload.u64;
                d->acked_features = m->payload.u64;
                break;
        case VHU_REQ_SET_VRING_NUM:
                ring_record(&ring->num_set, &ring->num, m->payload.state.num);
                break;
        case VHU_REQ_SET_VRING_BASE:
                ring_record(&ring->base_set, &ring->base, m->payload.state.num);
                break;
        case VHU_REQ_SET_VRING_ADDR:
                ring->addr_set = true;
                ring->addr = m->payload.addr;
                break;
        case VHU_REQ_SET_VRING_ENDIAN:
                ring_record(&ring->endian_set, &ring->endian, m->payload.state.num);
                break;
        case VHU_REQ_SET_VRING_ENABLE:
                ring_record(&ring->enable_set, &ring->enable, m->payload.state.num);
                break;
        case VHU_REQ_SET_VRING_KICK:
        case VHU_REQ_SET_VRING_CALL:
        case VHU_REQ_SET_VRING_ERR:
                ring_set_fd(d, ring_index(m), m->hdr.request, m->payload.u64, m->n_fds == 1 ? m->fds[0] : -1);
                if (m->hdr.request == VHU_REQ_SET_VRING_KICK)
                        vmm_update_state(d, "the VMM started a ring");
                break;
        case VHU_REQ_SET_STATUS:
                s->status_set = true;
                s->status = m->payload.u64;
                break;
        case VHU_REQ_NET_SET_MTU:
                s->mtu_set = true;
                s->mtu = m->payload.u64;
                break;
        case VHU_REQ_SET_LOG_BASE:
                vmm_log_fd_set(d, dup_or_none(m->n_fds == 1 ? m->fds[0] : -1));
                s->log_set = s->log_fd >= 0;
                s->log = m->payload.log;
                break;
        case VHU_REQ_SET_INFLIGHT_FD:
                /* the region the VMM holds is the one the back-end and a restore use */
                if (d->inflight_fd < 0 || !same_file(d->inflight_fd, m->fds[0])) {
                        int fd = dup_or_none(m->fds[0]);

                        if (fd < 0)
                                break;
                        device_set_inflight(d, fd);
                }
                s->inflight_set = true;
                s->inflight = m->payload.inflight;
                d->inflight_size = m->payload.inflight.mmap_size;
                d->inflight_queue_size = m->payload.inflight.queue_size;
                break;
        case VHU_REQ_GET_INFLIGHT_FD:
                /* a fresh region from the back-end: the daemon keeps it (the VMM gets a copy) */
                if (reply && reply->n_fds == 1) {
                        int fd = dup_or_none(reply->fds[0]);

                        if (fd < 0)
                                break;
                        device_set_inflight(d, fd);
                        d->inflight_size = reply->payload.inflight.mmap_size;
                        d->inflight_queue_size = m->payload.inflight.queue_size;
                        s->inflight_set = false;
                }
                break;
        case VHU_REQ_GET_VRING_BASE:
        case VHU_REQ_GET_VRING_BASE_SKIP_DRAIN:
                if (reply)
                        ring_stopped(d, ring_index(m), reply->payload.state.num);
                break;
        case VHU_REQ_RESET_DEVICE:
        case VHU_REQ_RESET_OWNER:
                records_reset(d);
                break;
        case VHU_REQ_GET_CONFIG:
                if (reply)
                        config_cache_put(s, reply);
                break;
        default:
                break;
        }
}

/* An ack that refuses: the back-end did not take the request. */
static bool reply_refuses(const struct vhub_device *d, const struct vhu_msg *m, const struct vhu_msg *reply) {
        const struct vhu_request_info *info = vhu_request_info(VHU_DIR_FRONTEND, m->hdr.request);

        if (!reply || !info)
                return false;
        if (info->reply == VHU_REPLY_ALWAYS ||
            (info->reply == VHU_REPLY_IF_LOG_SHMFD && dev_has_pf(d, VHU_PF_LOG_SHMFD)))
                return false;
        return reply->hdr.size == sizeof(uint64_t) && reply->payload.u64 != 0;
}

/* ---- answers from the daemon's state (an outage, a hung back-end) ---- */

/* spec "Vring descriptor indices": a split ring stops where its used index
 * is -- what the restore would start it from (requests the driver made
 * available and the back-end did not complete are done again).  A packed
 * ring or one behind IOVAs cannot be read here. */
static void state_vring_base(struct vhub_device *d, struct vhub_op *op) {
        const struct vhu_msg *m = &op->vmm_req->msg;
        uint32_t index = ring_index(m);
        struct vhub_vmm_ring *r = &d->vmm->rings[index];
        struct vhu_vring_state st = { .index = index };
        uint16_t used;

        if (!r->started) {
                st.num = r->base_set ? r->base : 0;
                answer_send(d, op, &st, sizeof(st), NULL, 0);
                return;
        }
        if (features_iommu(d->acked_features) ||
            features_packed(d->acked_features)) {
                answer_close(d, op, "GET_VRING_BASE of ring %u without the back-end: %s rings cannot be read here",
                             index, features_iommu(d->acked_features) ? "IOMMU" : "packed");
                return;
        }
        if (!r->addr_set || vmm_read_guest(d, r->addr.used + 2, &used, sizeof(used)) < 0) {
                answer_close(d, op, "GET_VRING_BASE of ring %u without the back-end: its used index is not in the VMM's memory",
                             index);
                return;
        }
        ring_stopped(d, index, used);
        r->base_from_state = true;
        st.num = used;
        answer_send(d, op, &st, sizeof(st), NULL, 0);
}

static void state_config(struct vhub_device *d, struct vhub_op *op) {
        const struct vhu_config *want = &op->vmm_req->msg.payload.config;
        const struct vhub_device_vmm *s = d->vmm;
        struct vhu_config c = { .offset = want->offset, .size = want->size };

        for (unsigned i = 0; i < s->n_config; i++)
                if (s->config[i].offset == want->offset && s->config[i].size == want->size) {
                        memcpy(c.data, s->config[i].data, c.size);
                        answer_send(d, op, &c, VHU_CONFIG_HEADER_SIZE + c.size, NULL, 0);
                        return;
                }
        answer_send(d, op, NULL, 0, NULL, 0); /* spec GET_CONFIG: an empty payload is the error */
}

void passthrough_answer_from_state(struct vhub_device *d, struct vhub_op *op) {
        struct vhub_vmm_request *q = op->vmm_req;
        uint32_t request = q->msg.hdr.request;

        if (q->answered)
                return;
        ring_addr_check(d, q);
        if (q->close) {
                answer_close(d, op, "%s", q->close_why);
                return;
        }
        switch (request_kind(request)) {
        case VMM_OWN:
                answer_own(d, op);
                return;
        case VMM_MEMORY:
                /* the restore syncs the back-end to the table */
                if (target_build(d, q) < 0) {
                        answer_close(d, op, "%s", q->close_why);
                        return;
                }
                target_commit(d, q);
                answer_u64(d, op, 0);
                return;
        case VMM_FORWARD:
                break;
        }
        switch (request) {
        case VHU_REQ_SET_FEATURES:
        case VHU_REQ_SET_VRING_NUM:
        case VHU_REQ_SET_VRING_BASE:
        case VHU_REQ_SET_VRING_ADDR:
        case VHU_REQ_SET_VRING_ENDIAN:
        case VHU_REQ_SET_VRING_ENABLE:
        case VHU_REQ_SET_VRING_KICK:
        case VHU_REQ_SET_VRING_CALL:
        case VHU_REQ_SET_VRING_ERR:
        case VHU_REQ_SET_STATUS:
        case VHU_REQ_NET_SET_MTU:
        case VHU_REQ_SET_LOG_BASE:
        case VHU_REQ_SET_INFLIGHT_FD:
        case VHU_REQ_RESET_DEVICE:
        case VHU_REQ_RESET_OWNER:
                /* recorded: the restore sends it */
                record(d, op, NULL);
                answer_u64(d, op, 0);
                return;
        case VHU_REQ_GET_VRING_BASE:
        case VHU_REQ_GET_VRING_BASE_SKIP_DRAIN:
                state_vring_base(d, op);
                return;
        case VHU_REQ_GET_CONFIG:
                state_config(d, op);
                return;
        case VHU_REQ_GET_STATUS:
                answer_u64(d, op, d->vmm->status_set ? d->vmm->status : 0);
                return;
        case VHU_REQ_VRING_KICK:          /* the restore kicks every ring */
        case VHU_REQ_CLOSE_CRYPTO_SESSION: /* sessions die with the back-end */
                answer_u64(d, op, 0);
                return;
        case VHU_REQ_CREATE_CRYPTO_SESSION: {
                struct vhu_crypto_session cs;

                if (q->msg.hdr.size < sizeof(cs)) {
                        answer_send(d, op, q->msg.payload.raw, q->msg.hdr.size, NULL, 0);
                        return;
                }
                memcpy(&cs, q->msg.payload.raw, sizeof(cs));
                cs.session_id = -1; /* virtio-crypto's VIRTIO_CRYPTO_ERR */
                answer_send(d, op, &cs, sizeof(cs), NULL, 0);
                return;
        }
        case VHU_REQ_SET_DEVICE_STATE_FD: /* the state is the lost back-end's */
        case VHU_REQ_CHECK_DEVICE_STATE:
                answer_u64(d, op, 1);
                return;
        case VHU_REQ_GET_INFLIGHT_FD:
                answer_close(d, op, "GET_INFLIGHT_FD without the back-end (it makes the region)");
                return;
        case VHU_REQ_IOTLB_MSG:
                answer_close(d, op, "IOTLB_MSG without the back-end: rings behind IOVAs cannot be restored");
                return;
        default: /* SET_CONFIG, SEND_RARP, SET_LOG_FD, GPU_SET_SOCKET: the lost back-end's business */
                answer_u64(d, op, 1);
                return;
        }
}

/* ---- the op ---- */

/*
 * A ring whose GET_VRING_BASE the daemon answered from guest memory (the
 * back-end was lost or hung) comes back with that base.  A hung back-end
 * that woke up may have completed requests after it, into guest memory:
 * starting there would complete them twice.  The used index now is where
 * the back-end must start (everything before it is done).
 */
static void rebase_after_state_answer(struct vhub_device *d, struct vhu_msg *m) {
        struct vhub_vmm_ring *r = &d->vmm->rings[m->payload.state.index];
        uint16_t used;

        if (!r->base_from_state)
                return;
        r->base_from_state = false;
        if (m->payload.state.num != r->base || features_iommu(d->acked_features) ||
            features_packed(d->acked_features) || !r->addr_set ||
            vmm_read_guest(d, r->addr.used + 2, &used, sizeof(used)) < 0 || used == m->payload.state.num)
                return;
        device_log(d, LOG_WARNING, REQ(VHU_REQ_SET_VRING_BASE),
                   "ring %u: the back-end completed requests after the base the daemon answered (%u): "
                   "starting at the used index %u instead", m->payload.state.index, m->payload.state.num, used);
        m->payload.state.num = used;
}

static int forward(struct vhub_device *d, struct vhub_op *op) {
        const struct vhu_msg *src = &op->vmm_req->msg;
        struct vhu_msg m;

        vhu_msg_init(&m);
        m.hdr.request = src->hdr.request;
        m.hdr.size = src->hdr.size;
        /* the daemon's flags: NEED_REPLY where it negotiated REPLY_ACK */
        m.hdr.flags = VHU_VERSION | (device_need_reply(d) ? VHU_FLAG_NEED_REPLY : 0);
        memcpy(m.payload.raw, src->payload.raw, src->hdr.size);
        /* the VMM's fds, borrowed: the writer sends its own copies */
        memcpy(m.fds, src->fds, src->n_fds * sizeof(int));
        m.n_fds = src->n_fds;
        if (m.hdr.request == VHU_REQ_SET_VRING_BASE)
                rebase_after_state_answer(d, &m);
        return device_send(d, op, &m, 0);
}

int passthrough_stage(struct vhub_device *d, struct vhub_op *op) {
        struct vhub_vmm_request *q = op->vmm_req;
        int r;

        if (op->stage > 0 || q->close || q->answered)
                return OP_STAGE_DONE;
        switch (request_kind(q->msg.hdr.request)) {
        case VMM_OWN:
                return OP_STAGE_DONE;
        case VMM_MEMORY:
                if (target_build(d, q) < 0)
                        return OP_STAGE_DONE; /* answered with close */
                r = mem_sync_prepare(d, op);
                if (r == 0)
                        r = mem_sync_send(d, op);
                return r < 0 ? r : OP_STAGE_NEXT;
        case VMM_FORWARD:
                break;
        }
        ring_addr_check(d, q);
        if (q->close)
                return OP_STAGE_DONE; /* answered with close */
        return forward(d, op) < 0 ? op->result : OP_STAGE_NEXT;
}

void passthrough_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                          struct vhu_msg *reply) {
        struct vhub_vmm_request *q = op->vmm_req;

        if (request_kind(q->msg.hdr.request) == VMM_MEMORY) {
                mem_sync_on_reply(d, op, request, tag, reply);
                return;
        }
        if (q->reply)
                return;
        q->reply = malloc(sizeof(*q->reply));
        if (!q->reply) {
                device_op_error(op, VHUB_ERR_INTERNAL, REQ(request), "out of memory");
                return;
        }
        *q->reply = *reply;
        vhu_msg_forget_fds(reply); /* they are the copy's now */
}

/* GET_VRING_BASE's reply names the ring asked for, at a ring position. */
static bool vring_base_reply_ok(const struct vhub_device *d, const struct vhub_vmm_request *q) {
        const struct vhu_vring_state *st = &q->reply->payload.state;
        const struct vhub_vmm_ring *r = &d->vmm->rings[ring_index(&q->msg)];

        if (st->index != ring_index(&q->msg))
                return false;
        if (!features_packed(d->acked_features))
                return st->num <= 0xffff;
        return (st->num & 0x7fff) < r->num && ((st->num >> 16) & 0x7fff) < r->num;
}

bool passthrough_is_own(const struct vhub_op *op) {
        return request_kind(op->vmm_req->msg.hdr.request) == VMM_OWN;
}

void passthrough_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        struct vhub_vmm_request *q = op->vmm_req;
        enum vmm_kind kind = request_kind(q->msg.hdr.request);
        uint32_t request = q->msg.hdr.request;

        if (kind == VMM_MEMORY && r < 0 && vhub_device_is_connected(d) &&
            (!vhub_device_shadow_is(d, &d->vmm->mem) || (!device_need_reply(d) && op->last_unconfirmed)))
                /* the back-end holds part of a change (acked, or -- without
                 * REPLY_ACK -- sent and never confirmed: the shadow only
                 * learns it at the barrier): a restore syncs it whole again */
                device_mark_lost(d, "the back-end refused or was sent only part of a memory change of the VMM");
        if (q->answered)
                return;
        if (r < 0) {
                if (d->removing || !d->vmm->connected || op->error.code == VHUB_ERR_NO_DEVICE) {
                        op_complete_call(d, op, r); /* nobody waits any more */
                        return;
                }
                /* nothing went to a back-end still connected (the VM's
                 * snapshot could not say the device busy: op_said_busy();
                 * the fd budget kept the request's fds from waiting behind
                 * bytes the back-end does not read: device_send_msg()): an
                 * answer from the records would tell the VMM it has what
                 * no restore will replay -- the VMM's connection closes */
                if (vhub_device_is_connected(d) &&
                    ((!op->on_wire && op->error.code == VHUB_ERR_INTERNAL) || op->error.code == VHUB_ERR_LIMIT)) {
                        answer_close(d, op, "%s", op->error.detail);      /* logged as it closes */
                        return;
                }
                if (kind == VMM_MEMORY && op->error.code == VHUB_ERR_BACKEND && vhub_device_is_connected(d)) {
                        answer_u64(d, op, 1); /* the back-end refused the region */
                        return;
                }
                passthrough_answer_from_state(d, op);
                return;
        }
        if (q->close) {
                device_log(d, LOG_WARNING, REQ(request), "closing the VMM's connection: %s", q->close_why);
                answer_close(d, op, "%s", q->close_why);
                return;
        }
        switch (kind) {
        case VMM_OWN:
                answer_own(d, op);
                return;
        case VMM_MEMORY:
                mem_sync_commit_unacked(d, op);
                target_commit(d, q);
                answer_u64(d, op, 0);
                return;
        case VMM_FORWARD:
                break;
        }
        if ((request == VHU_REQ_GET_VRING_BASE || request == VHU_REQ_GET_VRING_BASE_SKIP_DRAIN) &&
            (!q->reply || !vring_base_reply_ok(d, q))) {
                device_mark_lost(d, "GET_VRING_BASE reply for another ring, or not a ring position (protocol violation)");
                passthrough_answer_from_state(d, op);
                return;
        }
        if (!reply_refuses(d, &q->msg, q->reply))
                record(d, op, q->reply);
        if (q->reply)
                answer_send(d, op, q->reply->payload.raw, q->reply->hdr.size, q->reply->fds, q->reply->n_fds);
        else
                answer_u64(d, op, 0); /* without REPLY_ACK: the barrier came back */
}

bool passthrough_requeue(struct vhub_device *d, struct vhub_op *op) {
        struct vhub_vmm_request *q = op->vmm_req;

        if (q->answered || q->close || d->removing)
                return false;
        if (q->reply) {
                vhu_msg_clear(q->reply);
                free(q->reply);
                q->reply = NULL;
        }
        mem_sync_free(op);
        memset(&op->u.mem, 0, sizeof(op->u.mem));
        op->running = false;
        op->parked = false;
        op->stage = 0;
        op->awaiting = 0;
        op->last_unconfirmed = false;
        op->result = 0;
        memset(&op->error, 0, sizeof(op->error));
        return true;
}

void passthrough_free(struct vhub_op *op) {
        struct vhub_vmm_request *q = op->vmm_req;

        mem_sync_free(op);
        if (!q)
                return;
        vhu_msg_clear(&q->msg);
        if (q->reply) {
                vhu_msg_clear(q->reply);
                free(q->reply);
        }
        vhub_mem_table_done(&q->target);
        free(q);
        op->vmm_req = NULL;
}

unsigned passthrough_fds(const struct vhub_op *op) {
        const struct vhub_vmm_request *q = op->vmm_req;

        if (!q)
                return 0;
        return q->msg.n_fds + (q->reply ? q->reply->n_fds : 0) + (unsigned)q->target.n;
}

/* What the op holds for a moment (lost with it at a restart): the
 * request's fds, the back-end's reply's, the memory table it would commit. */
void passthrough_foreach_fd(const struct vhub_device *d, const struct vhub_op *op,
                            const struct vhub_fd_visitor *v) {
        const struct vhub_vmm_request *q = op->vmm_req;

        if (!q)
                return;
        for (unsigned i = 0; i < q->msg.n_fds; i++)
                device_fd_visit(d, v, q->msg.fds[i], NULL, "op/vmm-request/in%u", i);
        for (unsigned i = 0; q->reply && i < q->reply->n_fds; i++)
                device_fd_visit(d, v, q->reply->fds[i], NULL, "op/vmm-request/reply%u", i);
        for (size_t i = 0; i < q->target.n; i++)
                device_fd_visit(d, v, q->target.regions[i].fd, NULL, "op/vmm-request/region/%llu",
                                (unsigned long long)q->target.regions[i].id);
}

/* ---- the call ---- */

static bool state_outage(enum vhub_device_state s) {
        return s == VHUB_DEV_DISCONNECTED || s == VHUB_DEV_RESTORING;
}

void vhub_device_vmm_request(struct vhub_device *d, struct vhu_msg *m, struct vhub_call *call) {
        struct vhub_device_vmm *s = d->vmm;
        struct vhub_vmm_request *q = NULL;
        struct vhub_error err = { 0 };
        struct vhub_op *op = NULL;

        vhub_fd_budget_vm_changed(d->vm);       /* m's fds are the model's now, or closed */
        if (!s || d->removing || !s->connected) {
                vhub_error_set(&err, d->removing ? VHUB_ERR_NO_DEVICE : VHUB_ERR_STATE,
                               "device %s has no VMM session", d->name);
                goto fail;
        }
        q = calloc(1, sizeof(*q));
        op = op_new(VHUB_OP_PASSTHROUGH, call);
        if (!q || !op) {
                vhub_error_set(&err, VHUB_ERR_INTERNAL, "out of memory");
                goto fail;
        }
        q->msg = *m;
        vhu_msg_forget_fds(m); /* the request's now */
        vhub_mem_table_init(&q->target);
        q->deadline = vhub_now_usec() + (uint64_t)d->vm->ctx->config->backend_timeout_ms * 1000u;
        op->vmm_req = q;
        request_check(d, q);
        if (!q->close && q->msg.n_fds > 0)
                fd_budget_check(d, q);
        /*
         * The daemon's own answers need no back-end: in an outage they are
         * given at once.  Everything else is answered at once only when the
         * device has failed, or when this outage already outlasted a
         * deadline (the back-end is known not to be coming back soon: the
         * VMM is not made to wait a deadline per request).
         */
        if ((state_outage(d->state) && request_kind(m->hdr.request) == VMM_OWN) ||
            d->state == VHUB_DEV_FAILED || (s->outage_expired && d->state == VHUB_DEV_DISCONNECTED)) {
                passthrough_answer_from_state(d, op);
                op_free(op);
                return;
        }
        device_queue_op(d, op);
        vmm_rearm_deadline(d);
        return;
fail:
        vhu_msg_clear(m);
        free(q);
        if (op) {
                op->call = NULL;
                op_free(op);
        }
        vhub_call_fail(call, &err);
}
