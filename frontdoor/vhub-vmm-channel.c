/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-vmm-channel.h"
#include "vmm-clock.h"
#include "vmm-stream.h"
#include "vhu-fd.h"

/* Bytes of requests queued towards a VMM that does not read its channel:
 * back-end requests are small, this is many of them. */
#define CHANNEL_MAX_QUEUED_BYTES (64u << 10)

struct awaited_reply {
        uint32_t request;
        uint32_t flags;
        uint32_t tag;
        uint64_t deadline;
};

struct vhub_vmm_channel {
        struct vmm_stream stream;       /* first: vmm_stream_new_owner() */
        uint64_t protocol_features;
        uint64_t timeout_usec;

        unsigned max_pending, head, count;

        const struct vhub_vmm_channel_ops *ops;
        void *userdata;

        bool dispatching;            /* inside a callback */
        bool free_requested;

        struct awaited_reply awaited[];  /* ring of max_pending */
};

_Static_assert(offsetof(struct vhub_vmm_channel, stream) == 0, "the stream comes first");

static void chan_free_now(struct vhub_vmm_channel *ch) {
        vmm_stream_done(&ch->stream);
        free(ch);
}

static struct awaited_reply chan_pop(struct vhub_vmm_channel *ch) {
        struct awaited_reply a = ch->awaited[ch->head];

        ch->head = (ch->head + 1) % ch->max_pending;
        ch->count--;
        return a;
}

static void chan_rearm(struct vhub_vmm_channel *ch) {
        vmm_stream_rearm(&ch->stream, ch->count > 0 ? ch->awaited[ch->head].deadline : 0);
}

/* Every awaited request gets its on_answer(NULL), then the loss is told. */
static void chan_on_lost(void *owner) {
        struct vhub_vmm_channel *ch = owner;

        ch->dispatching = true;
        while (ch->count > 0 && !ch->free_requested) {
                struct awaited_reply a = chan_pop(ch);

                ch->ops->on_answer(ch->userdata, a.tag, a.request, NULL);
        }
        ch->dispatching = false;
        if (ch->free_requested) {
                chan_free_now(ch);
                return;
        }
        ch->ops->on_lost(ch->userdata, ch->stream.lost_timeout, ch->stream.lost_reason);
}

static void chan_on_timer(void *owner, uint64_t now) {
        struct vhub_vmm_channel *ch = owner;

        if (ch->count > 0 && ch->awaited[ch->head].deadline <= now) {
                vmm_stream_lose(&ch->stream, true,
                                "the VMM did not answer %s on its back-end channel within %llu ms",
                                vhu_request_name(VHU_DIR_BACKEND, ch->awaited[ch->head].request),
                                (unsigned long long)(ch->timeout_usec / 1000u));
                return;
        }
        chan_rearm(ch);
}

/* The smallest payload the awaited reply has: read with its header at once. */
static uint32_t chan_reply_min_payload(const struct vhub_vmm_channel *ch) {
        const struct vhu_request_info *info;

        if (ch->count == 0)
                return 0;
        info = vhu_request_info(VHU_DIR_BACKEND, ch->awaited[ch->head].request);
        return info ? info->reply_min_size : 0;
}

/* One reply per wake-up (level-triggered: more fire it again). */
static void chan_on_readable(void *owner) {
        struct vhub_vmm_channel *ch = owner;
        struct vmm_stream *s = &ch->stream;
        const char *why = NULL;
        struct awaited_reply a;
        struct vhu_msg m;
        int r;

        vhu_msg_init(&m);
        r = vhu_reader_read_hint(&s->reader, s->fd, &m, chan_reply_min_payload(ch));
        if (r == -EAGAIN)
                return;
        if (r == 0) {
                vmm_stream_lose(s, false, "the VMM closed its back-end channel");
                return;
        }
        if (r < 0) {
                vmm_stream_lose(s, false, "%s on the VMM's back-end channel",
                                r == -EPROTO ? "protocol violation in message framing" : strerror(-r));
                return;
        }
        if (ch->count == 0) {
                vmm_stream_lose(s, false, "unsolicited message %u on the VMM's back-end channel", m.hdr.request);
                vhu_msg_clear(&m);
                return;
        }
        a = ch->awaited[ch->head];
        if (vhu_validate_reply(VHU_DIR_BACKEND, a.request, a.flags, ch->protocol_features, &m, &why) < 0) {
                vmm_stream_lose(s, false, "bad reply to %s on the VMM's back-end channel: %s",
                                vhu_request_name(VHU_DIR_BACKEND, a.request), why ? why : "invalid");
                vhu_msg_clear(&m);
                return;
        }
        chan_pop(ch);
        chan_rearm(ch);
        ch->dispatching = true;
        ch->ops->on_answer(ch->userdata, a.tag, a.request, &m);
        ch->dispatching = false;
        vhu_msg_clear(&m);
        if (ch->free_requested)
                chan_free_now(ch);
}

static void chan_on_fds_changed(void *owner) {
        struct vhub_vmm_channel *ch = owner;

        if (ch->ops->on_fds_changed)
                ch->ops->on_fds_changed(ch->userdata);
}

static const struct vmm_stream_ops chan_stream_ops = {
        .on_readable = chan_on_readable,
        .on_timer = chan_on_timer,
        .on_lost = chan_on_lost,
        .on_fds_changed = chan_on_fds_changed,
};

int vhub_vmm_channel_new(struct event_base *base, int fd, unsigned timeout_ms, unsigned max_pending,
                         const struct vhub_vmm_channel_ops *ops, void *userdata,
                         struct vhub_vmm_channel **ret) {
        struct vhub_vmm_channel *ch;
        int domain = 0, type = 0, r;
        socklen_t len = sizeof(int);

        /* the VMM may have sent anything: only a stream socket is a channel */
        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0 || domain != AF_UNIX ||
            getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_STREAM) {
                fd = vhu_safe_close(fd);
                return -ENOTSOCK;
        }
        if (max_pending == 0)
                max_pending = 1;
        /* the ring comes with the channel */
        ch = vmm_stream_new_owner(sizeof(*ch) + (size_t)max_pending * sizeof(ch->awaited[0]), base, fd,
                                  "its back-end channel", CHANNEL_MAX_QUEUED_BYTES, timeout_ms,
                                  &chan_stream_ops, &r);
        if (!ch)
                return r;
        ch->ops = ops;
        ch->userdata = userdata;
        ch->timeout_usec = (uint64_t)timeout_ms * 1000u;
        ch->max_pending = max_pending;
        *ret = ch;
        return 0;
}

struct vhub_vmm_channel *vhub_vmm_channel_free(struct vhub_vmm_channel *ch) {
        if (!ch)
                return NULL;
        if (ch->dispatching) {
                ch->free_requested = true;
                vmm_stream_abandon(&ch->stream);
                return NULL;
        }
        chan_free_now(ch);
        return NULL;
}

void vhub_vmm_channel_set_protocol_features(struct vhub_vmm_channel *ch, uint64_t protocol_features) {
        ch->protocol_features = protocol_features;
}

int vhub_vmm_channel_send(struct vhub_vmm_channel *ch, const struct vhu_msg *m, uint32_t tag) {
        const char *why = NULL;
        bool expects;
        int r;

        if (ch->stream.lost)
                return -ENOTCONN;
        /* only what the VMM negotiated: request, flags, sizes, fds */
        if (vhu_validate_request(VHU_DIR_BACKEND, ch->protocol_features, m, &why) < 0)
                return -EINVAL;
        /* QEMU answers NEED_REPLY whether or not REPLY_ACK was negotiated:
         * an answer nobody awaits would break the channel */
        if ((m->hdr.flags & VHU_FLAG_NEED_REPLY) &&
            !(ch->protocol_features & VHU_PF_BIT(VHU_PF_REPLY_ACK)))
                return -EINVAL;
        expects = vhu_request_expects_reply(VHU_DIR_BACKEND, m->hdr.request, m->hdr.flags,
                                            ch->protocol_features);
        if ((expects && ch->count == ch->max_pending) || ch->stream.writer.n_items >= ch->max_pending)
                return -ENOBUFS;
        if (expects) {
                ch->awaited[(ch->head + ch->count) % ch->max_pending] = (struct awaited_reply){
                        .request = m->hdr.request,
                        .flags = m->hdr.flags,
                        .tag = tag,
                        .deadline = vmm_now_usec() + ch->timeout_usec,
                };
                ch->count++;
        }
        r = vmm_stream_send(&ch->stream, m);
        if (r < 0) {
                if (expects)
                        ch->count--; /* nothing went out: nothing is awaited */
                return r;
        }
        if (expects && ch->count == 1)
                chan_rearm(ch);
        return expects ? 1 : 0;
}

bool vhub_vmm_channel_at_rest(const struct vhub_vmm_channel *ch) {
        return vmm_stream_at_rest(&ch->stream) && ch->count == 0 && !ch->free_requested;
}

unsigned vhub_vmm_channel_awaiting(const struct vhub_vmm_channel *ch) {
        return ch->count;
}

bool vhub_vmm_channel_is_lost(const struct vhub_vmm_channel *ch) {
        return ch->stream.lost;
}

int vhub_vmm_channel_fd(const struct vhub_vmm_channel *ch) {
        return ch->stream.fd;
}

void vhub_vmm_channel_foreach_fd(const struct vhub_vmm_channel *ch, vhu_fd_fn fn, void *userdata) {
        vmm_stream_foreach_fd(&ch->stream, fn, userdata);
}
