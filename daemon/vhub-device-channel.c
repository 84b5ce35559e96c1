/* SPDX-License-Identifier: MIT */
/*
 * The device's side of its back-end channel: what the daemon does with
 * each request a back-end sends (the channel itself, vhub-backend-channel.c,
 * only reads, validates, paces and answers).  One row per request in
 * breq_handlers[]; a handler returns the value to answer with, and
 * device_on_backend_request() sends that one answer -- unless the handler
 * answered itself or deferred the answer (BREQ_ANSWERED).
 *
 * Requests meant for the VM's owner (an event it must act on) are refused
 * while it has been behind on its events for too long (for_owner).
 *
 * To handle a new back-end request: a row, and a handler here.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "vhub-backend-channel.h"
#include "vhub-context.h"
#include "vhub-device-vmm-internal.h"
#include "vhub-log.h"
#include "vhub-shared-object.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

/* A handler answered or deferred the request itself. */
#define BREQ_ANSWERED (-1)
/* breq_relay()'s fail value: not relayed (no VMM channel, not negotiated);
 * distinct from BREQ_ANSWERED and from every answer value */
#define BREQ_NOT_RELAYED (-2)

/* What a deferred answer waits for (vhub_backend_channel_defer()'s tag). */
enum {
        DEFER_LOOKUP,   /* SHARED_OBJECT_LOOKUP: an exporter device's GET_SHARED_OBJECT */
        DEFER_OWNER,    /* a forwarded request: device.backend_reply */
};

#define BREQ_NAME(m) vhu_request_name(VHU_DIR_BACKEND, (m)->hdr.request)

/*
 * A front-door device's back-end request goes to its VMM's back-end channel
 * (docs/front-door.md): the VMM's answer comes back through
 * vhub_device_vmm_relay_answered() as a deferred one.  Returns the value to
 * answer with now, or BREQ_ANSWERED; fail: the value when it could not be
 * relayed (no channel, not negotiated by the VMM).
 */
static int breq_relay(struct vhub_device *d, struct vhub_backend_channel *ch, struct vhu_msg *m, int fail) {
        uint64_t token = vhub_vm_new_token(d->vm);
        int r = vmm_relay(d, m, token);

        if (r < 0)
                return fail;
        if (r == 0)
                return 0; /* sent; the VMM answers nothing */
        vhub_backend_channel_defer(ch, m, DEFER_OWNER, token);
        return BREQ_ANSWERED;
}

/* CONFIG_CHANGE_MSG: the VMM should raise a config interrupt. */
static int breq_config_change(struct vhub_device *d, struct vhub_backend_channel *ch, struct vhu_msg *m) {
        struct vhub_event ev = { .type = VHUB_EV_CONFIG_CHANGED, .vm = d->vm, .device = d->name };

        vhub_context_emit(d->vm->ctx, &ev);
        if (dev_is_front_door(d))
                return breq_relay(d, ch, m, 1);
        return 0;
}

/* In-band VRING_CALL / VRING_ERR of a front-door device: relayed if its VMM
 * negotiated in-band notifications, else its eventfd is signalled. */
static int breq_vmm_vring_signal(struct vhub_device *d, struct vhub_backend_channel *ch, struct vhu_msg *m) {
        uint32_t i = m->payload.state.index;
        bool call = m->hdr.request == VHU_BREQ_VRING_CALL;
        const struct vhub_vmm_ring *r = i < d->queues ? &d->vmm->rings[i] : NULL;
        int efd = r ? (call ? r->call_fd : r->err_fd) : -1;
        int v = breq_relay(d, ch, m, BREQ_NOT_RELAYED);

        /* relayed: the VMM's answer is the back-end's (never two answers) */
        if (v != BREQ_NOT_RELAYED)
                return v;
        if (efd < 0)
                return 1;
        v = vring_signal(d, i, efd, call ? "call" : "err");
        return v < 0 && v != -EAGAIN ? 1 : 0;
}

/* VRING_CALL / VRING_ERR: an in-band notification -- signal the VMM's
 * eventfd for that ring (never blocking; a full one is signalled already:
 * success). */
static int breq_vring_signal(struct vhub_device *d, struct vhub_backend_channel *ch, struct vhu_msg *m) {
        uint32_t i = m->payload.state.index;
        bool call = m->hdr.request == VHU_BREQ_VRING_CALL;
        bool ok = i < d->queues && d->vrings && d->vrings[i].configured;
        int efd = ok ? (call ? d->vrings[i].call_fd : d->vrings[i].err_fd) : -1;
        int r;

        if (dev_is_front_door(d))
                return breq_vmm_vring_signal(d, ch, m);
        if (efd >= 0 && (r = vring_signal(d, i, efd, call ? "call" : "err")) < 0 && r != -EAGAIN)
                ok = false;
        return ok && efd >= 0 ? 0 : 1;
}

static int breq_shared_add(struct vhub_device *d, struct vhub_backend_channel *ch, struct vhu_msg *m) {
        char u[37];
        int r;

        vhub_uuid_format(m->payload.shared.uuid, u);
        r = vhub_shared_table_add(&d->vm->shared, m->payload.shared.uuid, d, -1,
                                  d->vm->ctx->config->limits.shared_objects_per_vm);
        device_log(d, r < 0 ? LOG_WARNING : LOG_DEBUG, "SHARED_OBJECT_ADD", "export of %s: %s", u,
                   r < 0 ? strerror(-r) : "ok");
        return r < 0 ? 1 : 0;
}

/* Only the exporter removes its object: anyone else is refused. */
static int breq_shared_remove(struct vhub_device *d, struct vhub_backend_channel *ch, struct vhu_msg *m) {
        return vhub_shared_table_remove(&d->vm->shared, m->payload.shared.uuid, d) < 0 ? 1 : 0;
}

/* An answer that carries an fd is queued with a dup of it until the
 * back-end reads it: the VM's uid's to hold, within its fd budget. */
static bool answer_fd_fits(struct vhub_device *d) {
        struct vhub_error err = { 0 };

        if (vhub_context_check_fds(d->vm->ctx, d->vm->uid, 1, 0, &err) == 0)
                return true;
        device_log(d, LOG_DEBUG, "SHARED_OBJECT_LOOKUP", "answered as failed: %s", err.detail);
        return false;
}

static int breq_shared_lookup(struct vhub_device *d, struct vhub_backend_channel *ch, struct vhu_msg *m) {
        struct vhub_shared_object *o = vhub_shared_table_find(&d->vm->shared, m->payload.shared.uuid);
        uint64_t token;
        char u[37];

        if (!o) {
                vhub_uuid_format(m->payload.shared.uuid, u);
                device_log(d, LOG_DEBUG, "SHARED_OBJECT_LOOKUP", "lookup of unknown %s", u);
                return 1;
        }
        if (!o->device) {
                if (!answer_fd_fits(d))
                        return 1;
                vhub_backend_channel_answer(ch, m, 0, o->fd); /* the writer sends a copy */
                return BREQ_ANSWERED;
        }
        /* a device exports it: ask it now, answer when it does */
        token = vhub_vm_new_token(d->vm);
        if (vhub_device_queue_get_shared(o->device, o->uuid, d->name, token) < 0)
                return 1;
        vhub_backend_channel_defer(ch, m, DEFER_LOOKUP, token);
        return BREQ_ANSWERED;
}

void device_shared_lookup_done(struct vhub_device *d, uint64_t token, int fd) {
        /* too late (the deadline answered) or not: the writer sent its own copy */
        if (fd >= 0 && d->channel && !answer_fd_fits(d))
                fd = vhu_safe_close(fd);
        if (d->channel)
                (void)vhub_backend_channel_answer_deferred(d->channel, DEFER_LOOKUP, token, fd >= 0 ? 0 : 1, fd);
        vhu_safe_close(fd);
}

/* A request the VMM must act on: the device.backend_request event, with
 * the request's fds; answered by device.backend_reply. */
static int breq_forward(struct vhub_device *d, struct vhub_backend_channel *ch, struct vhu_msg *m) {
        bool need_reply = (m->hdr.flags & VHU_FLAG_NEED_REPLY) && dev_has_pf(d, VHU_PF_REPLY_ACK);
        struct vhub_event ev = {
                .type = VHUB_EV_BACKEND_REQUEST,
                .vm = d->vm,
                .device = d->name,
                .request = BREQ_NAME(m),
                .fds = m->fds,
                .n_fds = m->n_fds,
        };
        unsigned n = 0;

        /* the front door's VMM acts on it itself, through its channel */
        if (dev_is_front_door(d))
                return breq_relay(d, ch, m, 1);
        ev.token = vhub_vm_new_token(d->vm);

        switch (m->hdr.request) {
        case VHU_BREQ_VRING_HOST_NOTIFIER_MSG:
                ev.fields[n++] = (struct vhub_event_field){ "queue", m->payload.area.u64 & VHU_VRING_IDX_MASK };
                ev.fields[n++] = (struct vhub_event_field){ "size", m->payload.area.size };
                ev.fields[n++] = (struct vhub_event_field){ "offset", m->payload.area.offset };
                break;
        case VHU_BREQ_SHMEM_MAP:
        case VHU_BREQ_SHMEM_UNMAP:
                ev.fields[n++] = (struct vhub_event_field){ "shmid", m->payload.shmem_map.shmid };
                ev.fields[n++] = (struct vhub_event_field){ "shm_offset", m->payload.shmem_map.shm_offset };
                ev.fields[n++] = (struct vhub_event_field){ "len", m->payload.shmem_map.len };
                if (m->hdr.request == VHU_BREQ_SHMEM_MAP) {
                        ev.fields[n++] = (struct vhub_event_field){ "fd_offset", m->payload.shmem_map.fd_offset };
                        ev.fields[n++] = (struct vhub_event_field){ "flags", m->payload.shmem_map.flags };
                }
                break;
        case VHU_BREQ_IOTLB_MSG:
                ev.fields[n++] = (struct vhub_event_field){ "iova", m->payload.iotlb.iova };
                ev.fields[n++] = (struct vhub_event_field){ "size", m->payload.iotlb.size };
                ev.fields[n++] = (struct vhub_event_field){ "uaddr", m->payload.iotlb.uaddr };
                ev.fields[n++] = (struct vhub_event_field){ "perm", m->payload.iotlb.perm };
                ev.fields[n++] = (struct vhub_event_field){ "type", m->payload.iotlb.type };
                break;
        default:
                break;
        }
        /* whether device.backend_reply is awaited (DPDK sends IOTLB misses
         * without NEED_REPLY: the VMM only answers with device.iotlb.update) */
        ev.fields[n++] = (struct vhub_event_field){ "need_reply", need_reply };
        ev.n_fields = n;
        vhub_context_emit(d->vm->ctx, &ev);
        /* without NEED_REPLY the back-end waits for nothing; a wait is
         * in the device's record (the event marked nothing) */
        if (need_reply) {
                vhub_backend_channel_defer(ch, m, DEFER_OWNER, ev.token);
                vhub_changed(d->vm->ctx, d->vm);
        }
        return BREQ_ANSWERED;
}

int vhub_device_backend_reply(struct vhub_device *d, uint64_t token, uint64_t result) {
        if (!d->channel)
                return -ENOENT;
        return vhub_backend_channel_answer_deferred(d->channel, DEFER_OWNER, token, result, -1);
}

/* spec SHMEM_MAP: the range must lie in the VIRTIO Shared Memory Region
 * shmid, whose size GET_SHMEM_CONFIG gave; a hostile back-end's range is
 * refused here, not handed to the VMM. */
static int breq_shmem(struct vhub_device *d, struct vhub_backend_channel *ch, struct vhu_msg *m) {
        const struct vhu_shmem_map *map = &m->payload.shmem_map;
        uint64_t size = map->shmid < d->n_shmem ? d->shmem_sizes[map->shmid] : 0;
        uint64_t end;

        if (size > 0 && map->len > 0 && !__builtin_add_overflow(map->shm_offset, map->len, &end) &&
            end <= size)
                return breq_forward(d, ch, m);
        device_log(d, LOG_WARNING, BREQ_NAME(m),
                   "refused: shmid %u offset 0x%llx length 0x%llx is outside its shared memory region (0x%llx bytes)",
                   map->shmid, (unsigned long long)map->shm_offset, (unsigned long long)map->len,
                   (unsigned long long)size);
        return EINVAL;
}

struct breq_handler {
        /* an event for the VM's owner: refused while it is stalled (the
         * channel's back-pressure) */
        bool for_owner;
        /* the value to answer with (0: success), or BREQ_ANSWERED */
        int (*handle)(struct vhub_device *d, struct vhub_backend_channel *ch, struct vhu_msg *m);
};

static const struct breq_handler breq_handlers[_VHU_BREQ_MAX] = {
        [VHU_BREQ_CONFIG_CHANGE_MSG] = { true, breq_config_change },
        [VHU_BREQ_VRING_HOST_NOTIFIER_MSG] = { true, breq_forward },
        [VHU_BREQ_IOTLB_MSG] = { true, breq_forward },
        /* checked against the shared memory region before it goes to the owner */
        [VHU_BREQ_SHMEM_MAP] = { false, breq_shmem },
        [VHU_BREQ_SHMEM_UNMAP] = { false, breq_shmem },
        [VHU_BREQ_VRING_CALL] = { false, breq_vring_signal },
        [VHU_BREQ_VRING_ERR] = { false, breq_vring_signal },
        [VHU_BREQ_SHARED_OBJECT_ADD] = { false, breq_shared_add },
        [VHU_BREQ_SHARED_OBJECT_REMOVE] = { false, breq_shared_remove },
        [VHU_BREQ_SHARED_OBJECT_LOOKUP] = { false, breq_shared_lookup },
};

static void device_on_backend_request(void *userdata, struct vhub_backend_channel *ch, struct vhu_msg *m) {
        const struct breq_handler *h = m->hdr.request < _VHU_BREQ_MAX ? &breq_handlers[m->hdr.request] : NULL;
        struct vhub_device *d = userdata;
        int value;

        d->stats.backend_requests++;
        device_log(d, LOG_DEBUG, BREQ_NAME(m), "back-end request %s", BREQ_NAME(m));
        if (!h || !h->handle) {
                vhub_backend_channel_answer(ch, m, 1, -1);
                return;
        }
        /* a front-door device's requests go to its VMM, not the VM's owner */
        if (h->for_owner && !dev_is_front_door(d) && vhub_backend_channel_refuse_stalled(ch, m))
                return;
        value = h->handle(d, ch, m);
        if (value != BREQ_ANSWERED)
                vhub_backend_channel_answer(ch, m, (uint64_t)value, -1);
}

static bool device_channel_congested(void *userdata) {
        struct vhub_device *d = userdata;

        return vhub_context_events_congested(d->vm->ctx, d->vm);
}

static void device_channel_paused(void *userdata, bool paused) {
        struct vhub_device *d = userdata;

        if (paused)
                d->vm->ctx->n_channels_paused++;
        else
                d->vm->ctx->n_channels_paused--;
}

static void device_channel_lost(void *userdata, const char *reason) {
        device_mark_lost(userdata, reason);
}

static const struct vhub_backend_channel_ops device_channel_ops = {
        .on_request = device_on_backend_request,
        .congested = device_channel_congested,
        .paused = device_channel_paused,
        .on_lost = device_channel_lost,
        .on_fds_changed = vhub_device_fds_changed,
};

int device_channel_open(struct vhub_device *d, int fd) {
        const struct vhub_backend_channel_params p = {
                .base = d->vm->ctx->base,
                .timeout_ms = d->vm->ctx->config->backend_timeout_ms,
                .protocol_features = d->protocol_features,
                .vm = d->vm->name,
                .device = d->name,
                .uid = d->vm->uid,
        };
        int r;

        device_channel_close(d);
        r = vhub_backend_channel_new(&p, fd, &device_channel_ops, d, &d->channel);
        if (r < 0)
                return r;
        device_fd_track(d, vhub_backend_channel_fd(d->channel), "chan");
        return 0;
}

bool vhub_device_channel_busy(const struct vhub_device *d) {
        struct vhu_header hdr;
        uint64_t token;
        unsigned tag;

        if (!d->channel)
                return false;
        /* a wait for the VMM is carried across a planned restart (the VMM
         * cannot answer while the control connections are not read); a
         * lookup waits for an exporter, which answers */
        return vhub_backend_channel_busy(d->channel) ||
               (vhub_backend_channel_deferred(d->channel, &tag, &token, &hdr) && tag != DEFER_OWNER);
}

bool device_channel_owner_wait(const struct vhub_device *d, uint64_t *token, struct vhu_header *hdr) {
        unsigned tag;

        return d->channel && vhub_backend_channel_deferred(d->channel, &tag, token, hdr) && tag == DEFER_OWNER;
}

void device_channel_restore_owner_wait(struct vhub_device *d, uint64_t token, const struct vhu_header *hdr) {
        struct vhu_msg m;

        if (!d->channel)
                return;
        vhu_msg_init(&m);
        m.hdr = *hdr;
        vhub_backend_channel_defer(d->channel, &m, DEFER_OWNER, token);
}

void device_channel_close(struct vhub_device *d) {
        if (d->channel)
                device_fd_untrack(d, vhub_backend_channel_fd(d->channel), "chan");
        d->channel = vhub_backend_channel_free(d->channel);
}
