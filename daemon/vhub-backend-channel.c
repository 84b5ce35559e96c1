/* SPDX-License-Identifier: MIT */
/*
 * Reads the back-end's requests on its channel, validates each strictly,
 * acts on it and answers NEED_REPLY exactly once.  A back-end that sends
 * garbage here is treated as lost, like on its main socket.
 */
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
#include "vhub-vm.h"
#include "vhu-socket.h"

/* A back-end may not queue more unanswered output than this. */
#define CHANNEL_MAX_QUEUED_REPLIES 256

struct vhub_backend_channel {
        struct vhub_device *dev;
        int fd;
        struct event *ev_read;
        struct event *ev_write;
        struct vhu_reader reader;
        struct vhu_writer writer;
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

static void channel_reply_u64(struct vhub_backend_channel *ch, const struct vhu_msg *req,
                              uint64_t value) {
        struct vhu_msg r;

        if (!(req->hdr.flags & VHU_FLAG_NEED_REPLY) || !dev_has_pf(ch->dev, VHU_PF_REPLY_ACK))
                return;
        if (ch->writer.n_items >= CHANNEL_MAX_QUEUED_REPLIES) {
                device_mark_lost(ch->dev, "back-end does not read its channel");
                return;
        }
        vhu_msg_build_reply_u64(&r, req, value);
        if (vhu_writer_queue(&ch->writer, &r) < 0) {
                device_mark_lost(ch->dev, "cannot queue a back-end channel reply");
                return;
        }
        channel_flush(ch);
}

static void channel_signal(int fd) {
        uint64_t one = 1;

        if (fd >= 0 && write(fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
                return;
}

static void channel_handle(struct vhub_backend_channel *ch, struct vhu_msg *m) {
        struct vhub_device *d = ch->dev;
        const char *name = vhu_request_name(VHU_DIR_BACKEND, m->hdr.request);
        struct vhub_event ev = { 0 };

        device_log(d, LOG_DEBUG, name, "back-end request %s", name);
        switch (m->hdr.request) {
        case VHU_BREQ_CONFIG_CHANGE_MSG:
                ev.type = VHUB_EV_CONFIG_CHANGED;
                ev.vm = d->vm;
                ev.device = d->name;
                vhub_context_emit(d->vm->ctx, &ev);
                channel_reply_u64(ch, m, 0);
                break;
        case VHU_BREQ_VRING_CALL:
        case VHU_BREQ_VRING_ERR: {
                uint32_t i = m->payload.state.index;
                bool ok = i < d->queues && d->vrings && d->vrings[i].configured;

                if (ok)
                        channel_signal(m->hdr.request == VHU_BREQ_VRING_CALL ? d->vrings[i].call_fd
                                                                             : d->vrings[i].err_fd);
                channel_reply_u64(ch, m, ok ? 0 : 1);
                break;
        }
        default:
                /* not handled (yet): refuse, so the back-end never waits forever */
                device_log(d, LOG_INFO, name, "refusing back-end request %s", name);
                channel_reply_u64(ch, m, 1);
                break;
        }
}

static void channel_read_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_backend_channel *ch = userdata;
        struct vhub_device *d = ch->dev;
        struct vhu_msg m;
        int r;

        vhu_msg_init(&m);
        /* bounded per wake-up so one chatty back-end cannot starve the loop */
        for (int budget = 64; budget > 0; budget--) {
                const char *why = NULL;

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
                if (vhu_validate_request(VHU_DIR_BACKEND, d->protocol_features, &m, &why) < 0) {
                        char reason[200];

                        snprintf(reason, sizeof(reason), "bad back-end request %u: %s",
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
        ch->ev_read = event_new(dev->vm->ctx->base, fd, EV_READ | EV_PERSIST, channel_read_cb, ch);
        ch->ev_write = event_new(dev->vm->ctx->base, fd, EV_WRITE | EV_PERSIST, channel_write_cb, ch);
        if (!ch->ev_read || !ch->ev_write || event_add(ch->ev_read, NULL) < 0) {
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
        vhu_reader_reset(&ch->reader);
        vhu_writer_clear(&ch->writer);
        if (ch->fd >= 0)
                close(ch->fd);
        free(ch);
        return NULL;
}
