/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhub-backend-channel.h"
#include "vhub-context.h"
#include "vhub-device-internal.h"
#include "vhub-log.h"
#include "vhub-shared-object.h"
#include "vhub-time.h"
#include "vhub-vm.h"
#include "vhu-socket.h"

/* Unanswered replies queued towards a back-end that does not read. */
#define CHANNEL_MAX_QUEUED_REPLIES 64
/* More requests than this per second is a flood: the back-end is lost. */
#define CHANNEL_MAX_RATE 2000

/* Whether requests for the VMM are read (see the header: back-pressure). */
enum channel_flow {
        FLOW_OPEN,
        FLOW_PAUSED,    /* the VM's owner is behind on its events: nothing is read */
        FLOW_REFUSING,  /* ... for longer than the deadline: what is for it is refused */
};

enum channel_wait {
        WAIT_NONE,
        WAIT_LOOKUP,    /* SHARED_OBJECT_LOOKUP: an exporter device's answer */
        WAIT_VMM,       /* a forwarded request: device.backend_reply */
};

struct vhub_backend_channel {
        struct vhub_device *dev;
        int fd;
        struct event *ev_read;
        struct event *ev_write;
        struct event *ev_deadline;
        struct vhu_reader reader;
        struct vhu_writer writer;

        enum channel_wait wait;
        uint64_t wait_token;
        struct vhu_msg wait_request;  /* header of the request being answered (no fds) */

        uint64_t rate_window_start;
        unsigned rate_count;

        enum channel_flow flow;
        struct event *ev_flow;        /* how long a pause may last */
        uint64_t refused;             /* requests refused in this FLOW_REFUSING spell */
};

static void channel_flush(struct vhub_backend_channel *ch) {
        int r = vhu_writer_flush(&ch->writer, ch->fd);

        if (r == 0)
                event_del(ch->ev_write);
        else if (r == -EAGAIN)
                event_add(ch->ev_write, NULL);
        else
                device_mark_lost(ch->dev, "back-end channel write failed");
}

static void channel_queue(struct vhub_backend_channel *ch, const struct vhu_msg *r) {
        if (ch->writer.n_items >= CHANNEL_MAX_QUEUED_REPLIES) {
                device_mark_lost(ch->dev, "back-end does not read its channel");
                return;
        }
        if (vhu_writer_queue(&ch->writer, r) < 0) {
                device_mark_lost(ch->dev, "cannot queue a back-end channel reply");
                return;
        }
        channel_flush(ch);
}

/* The REPLY_ACK for a request without a reply of its own, if asked for. */
static void channel_ack(struct vhub_backend_channel *ch, const struct vhu_msg *req, uint64_t value) {
        struct vhu_msg r;

        if (!(req->hdr.flags & VHU_FLAG_NEED_REPLY) || !dev_has_pf(ch->dev, VHU_PF_REPLY_ACK))
                return;
        vhu_msg_build_reply_u64(&r, req, value);
        channel_queue(ch, &r);
}

/* SHARED_OBJECT_LOOKUP's own reply: u64 result, the fd only on success. */
static void channel_lookup_reply(struct vhub_backend_channel *ch, const struct vhu_msg *req, int fd) {
        uint64_t value = fd >= 0 ? 0 : 1;
        struct vhu_msg r;

        vhu_msg_build_reply(&r, req, &value, sizeof(value), fd >= 0 ? &fd : NULL, fd >= 0 ? 1 : 0);
        channel_queue(ch, &r);
}

/* Read again (requests may already sit in the socket), unless a wait or
 * a pause still holds the channel. */
static void channel_read_again(struct vhub_backend_channel *ch) {
        if (ch->wait != WAIT_NONE || ch->flow == FLOW_PAUSED)
                return;
        event_add(ch->ev_read, NULL);
        event_active(ch->ev_read, EV_READ, 0);
}

static void channel_resume(struct vhub_backend_channel *ch) {
        ch->wait = WAIT_NONE;
        ch->wait_token = 0;
        evtimer_del(ch->ev_deadline);
        channel_read_again(ch);
}

static struct timeval channel_timeout(const struct vhub_backend_channel *ch) {
        unsigned ms = ch->dev->vm->ctx->config->backend_timeout_ms;

        return (struct timeval){ .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
}

/* The VM's owner is behind on its events: the back-end waits, not it. */
static void channel_pause(struct vhub_backend_channel *ch) {
        struct timeval tv = channel_timeout(ch);

        ch->flow = FLOW_PAUSED;
        ch->dev->vm->ctx->n_channels_paused++;
        event_del(ch->ev_read);
        evtimer_add(ch->ev_flow, &tv);
        device_log(ch->dev, LOG_DEBUG, NULL,
                   "the VMM is behind on its events; not reading the back-end channel until it catches up");
}

/* Paused for the whole deadline: the back-end's requests for the VMM are
 * failed from now on rather than left unanswered. */
static void channel_flow_deadline_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_backend_channel *ch = userdata;

        if (ch->flow != FLOW_PAUSED)
                return;
        ch->flow = FLOW_REFUSING;
        ch->refused = 0;
        device_log(ch->dev, LOG_WARNING, NULL,
                   "the VMM has not caught up on its events for %u ms; refusing the back-end's requests for it until it does",
                   ch->dev->vm->ctx->config->backend_timeout_ms);
        channel_read_again(ch);
}

void vhub_backend_channel_vmm_caught_up(struct vhub_backend_channel *ch) {
        if (ch->flow == FLOW_OPEN)
                return;
        if (ch->flow == FLOW_REFUSING)
                device_log(ch->dev, LOG_NOTICE, NULL,
                           "the VMM caught up on its events; %llu back-end requests for it were refused meanwhile",
                           (unsigned long long)ch->refused);
        ch->flow = FLOW_OPEN;
        ch->dev->vm->ctx->n_channels_paused--;
        evtimer_del(ch->ev_flow);
        /* what piled up while paused is read in a burst: not a flood */
        ch->rate_window_start = vhub_now_usec();
        ch->rate_count = 0;
        channel_read_again(ch);
}

/* A request for a VMM that does not read: failed if it wants an answer. */
static bool channel_refusing(struct vhub_backend_channel *ch, const struct vhu_msg *m) {
        if (ch->flow != FLOW_REFUSING)
                return false;
        ch->refused++;
        device_log(ch->dev, LOG_DEBUG, vhu_request_name(VHU_DIR_BACKEND, m->hdr.request),
                   "refused: the VMM is not reading its events");
        channel_ack(ch, m, 1);
        return true;
}

static void channel_wait_for(struct vhub_backend_channel *ch, enum channel_wait what, uint64_t token,
                             const struct vhu_msg *req) {
        struct timeval tv = channel_timeout(ch);

        ch->wait = what;
        ch->wait_token = token;
        vhu_msg_init(&ch->wait_request);
        ch->wait_request.hdr = req->hdr;
        event_del(ch->ev_read);
        evtimer_add(ch->ev_deadline, &tv);
}

static void channel_deadline_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_backend_channel *ch = userdata;
        const char *name = vhu_request_name(VHU_DIR_BACKEND, ch->wait_request.hdr.request);

        device_log(ch->dev, LOG_WARNING, name, "%s not answered in time; failing it towards the back-end",
                   name);
        if (ch->wait == WAIT_LOOKUP)
                channel_lookup_reply(ch, &ch->wait_request, -1);
        else if (ch->wait == WAIT_VMM)
                channel_ack(ch, &ch->wait_request, 1);
        channel_resume(ch);
}

void vhub_backend_channel_lookup_done(struct vhub_backend_channel *ch, uint64_t token, int fd) {
        if (ch->wait != WAIT_LOOKUP || ch->wait_token != token) {
                if (fd >= 0)
                        close(fd); /* too late: the deadline already answered */
                return;
        }
        channel_lookup_reply(ch, &ch->wait_request, fd);
        if (fd >= 0)
                close(fd); /* the writer sent its own copy */
        channel_resume(ch);
}

int vhub_backend_channel_reply(struct vhub_backend_channel *ch, uint64_t token, uint64_t result) {
        if (ch->wait != WAIT_VMM || ch->wait_token != token)
                return -ENOENT;
        channel_ack(ch, &ch->wait_request, result);
        channel_resume(ch);
        return 0;
}

static void channel_lookup(struct vhub_backend_channel *ch, struct vhu_msg *m) {
        struct vhub_device *d = ch->dev;
        struct vhub_shared_object *o = vhub_shared_table_find(&d->vm->shared, m->payload.shared.uuid);
        char u[37];

        vhub_uuid_format(m->payload.shared.uuid, u);
        if (!o) {
                device_log(d, LOG_DEBUG, "SHARED_OBJECT_LOOKUP", "lookup of unknown %s", u);
                channel_lookup_reply(ch, m, -1);
                return;
        }
        if (!o->device) {
                channel_lookup_reply(ch, m, o->fd); /* the writer dups it */
                return;
        }
        /* a device exports it: ask it now, answer when it does */
        {
                uint64_t token = ++d->vm->ctx->next_token;

                if (vhub_device_queue_get_shared(o->device, o->uuid, d->name, token) < 0) {
                        channel_lookup_reply(ch, m, -1);
                        return;
                }
                channel_wait_for(ch, WAIT_LOOKUP, token, m);
        }
}

static void channel_shared_add(struct vhub_backend_channel *ch, struct vhu_msg *m) {
        struct vhub_device *d = ch->dev;
        char u[37];
        int r;

        vhub_uuid_format(m->payload.shared.uuid, u);
        r = vhub_shared_table_add(&d->vm->shared, m->payload.shared.uuid, d, -1,
                                  d->vm->ctx->config->limits.shared_objects_per_vm);
        device_log(d, r < 0 ? LOG_WARNING : LOG_DEBUG, "SHARED_OBJECT_ADD", "export of %s: %s", u,
                   r < 0 ? strerror(-r) : "ok");
        channel_ack(ch, m, r < 0 ? 1 : 0);
}

static void channel_shared_remove(struct vhub_backend_channel *ch, struct vhu_msg *m) {
        int r = vhub_shared_table_remove(&ch->dev->vm->shared, m->payload.shared.uuid, ch->dev);

        /* only the exporter removes its object: anyone else is ignored */
        channel_ack(ch, m, r < 0 ? 1 : 0);
}

/* Requests the VMM must act on: an event, answered by device.backend_reply. */
static void channel_forward(struct vhub_backend_channel *ch, struct vhu_msg *m) {
        struct vhub_device *d = ch->dev;
        struct vhub_event ev = { 0 };
        uint64_t token = ++d->vm->ctx->next_token;
        unsigned n = 0;

        ev.type = VHUB_EV_BACKEND_REQUEST;
        ev.vm = d->vm;
        ev.device = d->name;
        ev.request = vhu_request_name(VHU_DIR_BACKEND, m->hdr.request);
        ev.token = token;
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
        ev.fields[n++] = (struct vhub_event_field){
                "need_reply", (m->hdr.flags & VHU_FLAG_NEED_REPLY) && dev_has_pf(d, VHU_PF_REPLY_ACK)
        };
        ev.n_fields = n;
        ev.fds = m->fds;
        ev.n_fds = m->n_fds;
        vhub_context_emit(d->vm->ctx, &ev);
        /* without NEED_REPLY the back-end waits for nothing */
        if ((m->hdr.flags & VHU_FLAG_NEED_REPLY) && dev_has_pf(d, VHU_PF_REPLY_ACK))
                channel_wait_for(ch, WAIT_VMM, token, m);
}

/* spec SHMEM_MAP: the range must lie in the VIRTIO Shared Memory Region
 * shmid, whose size GET_SHMEM_CONFIG gave; a hostile back-end's range is
 * refused here, not handed to the VMM. */
static bool channel_shmem_in_range(struct vhub_backend_channel *ch, const struct vhu_msg *m) {
        struct vhub_device *d = ch->dev;
        const struct vhu_shmem_map *map = &m->payload.shmem_map;
        uint64_t size = map->shmid < d->n_shmem ? d->shmem_sizes[map->shmid] : 0;
        uint64_t end;

        if (size > 0 && map->len > 0 && !__builtin_add_overflow(map->shm_offset, map->len, &end) &&
            end <= size)
                return true;
        device_log(d, LOG_WARNING, vhu_request_name(VHU_DIR_BACKEND, m->hdr.request),
                   "refused: shmid %u offset 0x%llx length 0x%llx is outside its shared memory region (0x%llx bytes)",
                   map->shmid, (unsigned long long)map->shm_offset, (unsigned long long)map->len,
                   (unsigned long long)size);
        return false;
}

static void channel_handle(struct vhub_backend_channel *ch, struct vhu_msg *m) {
        struct vhub_device *d = ch->dev;
        const char *name = vhu_request_name(VHU_DIR_BACKEND, m->hdr.request);
        struct vhub_event ev = { 0 };

        device_log(d, LOG_DEBUG, name, "back-end request %s", name);
        switch (m->hdr.request) {
        case VHU_BREQ_CONFIG_CHANGE_MSG:
                if (channel_refusing(ch, m))
                        break;
                ev.type = VHUB_EV_CONFIG_CHANGED;
                ev.vm = d->vm;
                ev.device = d->name;
                vhub_context_emit(d->vm->ctx, &ev);
                channel_ack(ch, m, 0);
                break;
        case VHU_BREQ_VRING_CALL:
        case VHU_BREQ_VRING_ERR: {
                uint32_t i = m->payload.state.index;
                bool ok = i < d->queues && d->vrings && d->vrings[i].configured;
                bool call = m->hdr.request == VHU_BREQ_VRING_CALL;
                int efd = ok ? (call ? d->vrings[i].call_fd : d->vrings[i].err_fd) : -1;
                int r;

                /* in-band notification: signal the VMM's eventfd for that ring
                 * (never blocking; a full one is signalled already: success) */
                if (efd >= 0 && (r = vring_signal(d, i, efd, call ? "call" : "err")) < 0 &&
                    r != -EAGAIN)
                        ok = false;
                channel_ack(ch, m, ok && efd >= 0 ? 0 : 1);
                break;
        }
        case VHU_BREQ_SHARED_OBJECT_ADD:
                channel_shared_add(ch, m);
                break;
        case VHU_BREQ_SHARED_OBJECT_REMOVE:
                channel_shared_remove(ch, m);
                break;
        case VHU_BREQ_SHARED_OBJECT_LOOKUP:
                channel_lookup(ch, m);
                break;
        case VHU_BREQ_SHMEM_MAP:
        case VHU_BREQ_SHMEM_UNMAP:
                if (!channel_shmem_in_range(ch, m)) {
                        channel_ack(ch, m, EINVAL);
                        break;
                }
                channel_forward(ch, m);
                break;
        case VHU_BREQ_VRING_HOST_NOTIFIER_MSG:
        case VHU_BREQ_IOTLB_MSG:
                if (!channel_refusing(ch, m))
                        channel_forward(ch, m);
                break;
        default:
                channel_ack(ch, m, 1);
                break;
        }
}

static bool channel_flooding(struct vhub_backend_channel *ch) {
        uint64_t now = vhub_now_usec();

        if (now - ch->rate_window_start >= 1000000) {
                ch->rate_window_start = now;
                ch->rate_count = 0;
        }
        return ++ch->rate_count > CHANNEL_MAX_RATE;
}

static void channel_read_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_backend_channel *ch = userdata;
        struct vhub_device *d = ch->dev;
        struct vhu_msg m;
        int r;

        vhu_msg_init(&m);
        /* bounded per wake-up, so one chatty back-end cannot starve the loop */
        for (int budget = 64; budget > 0 && ch->wait == WAIT_NONE; budget--) {
                const char *why = NULL;

                /* checked before every request: each may become an event */
                if (ch->flow == FLOW_OPEN && vhub_context_events_congested(d->vm->ctx, d->vm)) {
                        channel_pause(ch);
                        return;
                }

                r = vhu_reader_read(&ch->reader, ch->fd, &m);
                if (r == -EAGAIN)
                        return;
                if (r <= 0) {
                        if (r == 0)
                                device_log(d, LOG_DEBUG, NULL, "back-end closed its channel");
                        else
                                device_mark_lost(d, r == -EPROTO ? "protocol violation on the back-end channel"
                                                                 : "back-end channel error");
                        event_del(ch->ev_read);
                        return;
                }
                if (channel_flooding(ch)) {
                        vhu_msg_clear(&m);
                        device_mark_lost(d, "back-end floods its channel");
                        event_del(ch->ev_read);
                        return;
                }
                if (vhu_validate_request(VHU_DIR_BACKEND, d->protocol_features, &m, &why) < 0) {
                        char reason[200];

                        snprintf(reason, sizeof(reason), "bad back-end request %u on its channel: %s",
                                 m.hdr.request, why ? why : "invalid");
                        vhu_msg_clear(&m);
                        device_mark_lost(d, reason);
                        event_del(ch->ev_read);
                        return;
                }
                channel_handle(ch, &m);
                vhu_msg_clear(&m);
        }
}

static void channel_write_cb(evutil_socket_t fd, short what, void *userdata) {
        channel_flush(userdata);
}

int vhub_backend_channel_new(struct vhub_device *dev, int fd, struct vhub_backend_channel **ret) {
        struct vhub_backend_channel *ch = calloc(1, sizeof(*ch));

        if (!ch) {
                close(fd);
                return -ENOMEM;
        }
        ch->dev = dev;
        ch->fd = fd;
        vhu_reader_init(&ch->reader);
        vhu_writer_init(&ch->writer);
        ch->rate_window_start = vhub_now_usec();
        ch->ev_read = event_new(dev->vm->ctx->base, fd, EV_READ | EV_PERSIST, channel_read_cb, ch);
        ch->ev_write = event_new(dev->vm->ctx->base, fd, EV_WRITE | EV_PERSIST, channel_write_cb, ch);
        ch->ev_deadline = evtimer_new(dev->vm->ctx->base, channel_deadline_cb, ch);
        ch->ev_flow = evtimer_new(dev->vm->ctx->base, channel_flow_deadline_cb, ch);
        if (!ch->ev_read || !ch->ev_write || !ch->ev_deadline || !ch->ev_flow ||
            event_add(ch->ev_read, NULL) < 0) {
                vhub_backend_channel_free(ch);
                return -ENOMEM;
        }
        *ret = ch;
        return 0;
}

struct vhub_backend_channel *vhub_backend_channel_free(struct vhub_backend_channel *ch) {
        if (!ch)
                return NULL;
        if (ch->ev_read)
                event_free(ch->ev_read);
        if (ch->ev_write)
                event_free(ch->ev_write);
        if (ch->ev_deadline)
                event_free(ch->ev_deadline);
        if (ch->ev_flow)
                event_free(ch->ev_flow);
        if (ch->flow != FLOW_OPEN)
                ch->dev->vm->ctx->n_channels_paused--;
        vhu_reader_reset(&ch->reader);
        vhu_writer_clear(&ch->writer);
        if (ch->fd >= 0)
                close(ch->fd);
        free(ch);
        return NULL;
}
