/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-vmm-channel.h"
#include "vhu-socket.h"
#include "vmm-clock.h"

struct awaited_reply {
        uint32_t request;
        uint32_t flags;
        uint32_t tag;
        uint64_t deadline;
};

struct vhub_vmm_channel {
        int fd;
        struct event *ev_read;
        struct event *ev_write;
        struct event *ev_timer;
        struct event *ev_lost;
        struct vhu_reader reader;
        struct vhu_writer writer;
        uint64_t protocol_features;
        uint64_t timeout_usec;
        uint64_t write_deadline;     /* 0: the writer is not stalled */

        struct awaited_reply *awaited;  /* ring of max_pending */
        unsigned max_pending, head, count;

        const struct vhub_vmm_channel_ops *ops;
        void *userdata;

        bool lost;
        bool lost_timeout;
        char lost_reason[200];
        bool dispatching;            /* inside a callback */
        bool free_requested;
};

static void chan_lose(struct vhub_vmm_channel *ch, bool timeout, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

static void chan_lose(struct vhub_vmm_channel *ch, bool timeout, const char *fmt, ...) {
        va_list ap;

        if (ch->lost)
                return;
        ch->lost = true;
        ch->lost_timeout = timeout;
        va_start(ap, fmt);
        vsnprintf(ch->lost_reason, sizeof(ch->lost_reason), fmt, ap);
        va_end(ap);
        event_del(ch->ev_read);
        event_del(ch->ev_write);
        evtimer_del(ch->ev_timer);
        event_active(ch->ev_lost, 0, 0);
}

static void chan_free_now(struct vhub_vmm_channel *ch) {
        if (ch->ev_read)
                event_free(ch->ev_read);
        if (ch->ev_write)
                event_free(ch->ev_write);
        if (ch->ev_timer)
                event_free(ch->ev_timer);
        if (ch->ev_lost)
                event_free(ch->ev_lost);
        vhu_reader_reset(&ch->reader);
        vhu_writer_clear(&ch->writer);
        if (ch->fd >= 0)
                close(ch->fd);
        free(ch->awaited);
        free(ch);
}

static struct awaited_reply chan_pop(struct vhub_vmm_channel *ch) {
        struct awaited_reply a = ch->awaited[ch->head];

        ch->head = (ch->head + 1) % ch->max_pending;
        ch->count--;
        return a;
}

/* Every awaited request gets its on_answer(NULL), then the loss is told. */
static void chan_lost_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_channel *ch = userdata;

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
        ch->ops->on_lost(ch->userdata, ch->lost_timeout, ch->lost_reason);
}

static void chan_rearm_timer(struct vhub_vmm_channel *ch) {
        uint64_t deadline = ch->write_deadline;
        struct timeval tv;

        if (ch->lost)
                return;
        if (ch->count > 0 && (!deadline || ch->awaited[ch->head].deadline < deadline))
                deadline = ch->awaited[ch->head].deadline;
        if (!deadline) {
                evtimer_del(ch->ev_timer);
                return;
        }
        tv = vmm_timeval_until(deadline);
        evtimer_add(ch->ev_timer, &tv);
}

static void chan_timer_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_channel *ch = userdata;
        uint64_t now = vmm_now_usec();
        unsigned ms = (unsigned)(ch->timeout_usec / 1000u);

        if (ch->count > 0 && ch->awaited[ch->head].deadline <= now) {
                chan_lose(ch, true, "the VMM did not answer %s on its back-end channel within %u ms",
                          vhu_request_name(VHU_DIR_BACKEND, ch->awaited[ch->head].request), ms);
                return;
        }
        if (ch->write_deadline && ch->write_deadline <= now) {
                chan_lose(ch, true, "the VMM did not read its back-end channel for %u ms", ms);
                return;
        }
        chan_rearm_timer(ch);
}

static void chan_after_write(struct vhub_vmm_channel *ch, int r) {
        if (r == 0) {
                event_del(ch->ev_write);
                if (ch->write_deadline) {
                        ch->write_deadline = 0;
                        chan_rearm_timer(ch);
                }
        } else if (r == -EAGAIN) {
                event_add(ch->ev_write, NULL);
                if (!ch->write_deadline) {
                        ch->write_deadline = vmm_now_usec() + ch->timeout_usec;
                        chan_rearm_timer(ch);
                }
        } else {
                chan_lose(ch, false, "cannot write to the VMM's back-end channel: %s", strerror(-r));
        }
}

static void chan_write_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_channel *ch = userdata;

        if (!ch->lost)
                chan_after_write(ch, vhu_writer_flush(&ch->writer, ch->fd));
}

/* The smallest payload the awaited reply has: read with its header at once. */
static uint32_t chan_reply_min_payload(const struct vhub_vmm_channel *ch) {
        const struct vhu_request_info *info;

        if (ch->count == 0)
                return 0;
        info = vhu_request_info(VHU_DIR_BACKEND, ch->awaited[ch->head].request);
        return info ? info->reply_min_size : 0;
}

static void chan_read_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_channel *ch = userdata;
        const char *why = NULL;
        struct awaited_reply a;
        struct vhu_msg m;
        int r;

        if (ch->lost)
                return;
        vhu_msg_init(&m);
        r = vhu_reader_read_hint(&ch->reader, ch->fd, &m, chan_reply_min_payload(ch));
        if (r == -EAGAIN)
                return;
        if (r == 0) {
                chan_lose(ch, false, "the VMM closed its back-end channel");
                return;
        }
        if (r < 0) {
                chan_lose(ch, false, "%s on the VMM's back-end channel",
                          r == -EPROTO ? "protocol violation in message framing" : strerror(-r));
                return;
        }
        if (ch->count == 0) {
                chan_lose(ch, false, "unsolicited message %u on the VMM's back-end channel", m.hdr.request);
                vhu_msg_clear(&m);
                return;
        }
        a = ch->awaited[ch->head];
        if (vhu_validate_reply(VHU_DIR_BACKEND, a.request, a.flags, ch->protocol_features, &m, &why) < 0) {
                chan_lose(ch, false, "bad reply to %s on the VMM's back-end channel: %s",
                          vhu_request_name(VHU_DIR_BACKEND, a.request), why ? why : "invalid");
                vhu_msg_clear(&m);
                return;
        }
        chan_pop(ch);
        chan_rearm_timer(ch);
        ch->dispatching = true;
        ch->ops->on_answer(ch->userdata, a.tag, a.request, &m);
        ch->dispatching = false;
        vhu_msg_clear(&m);
        if (ch->free_requested)
                chan_free_now(ch);
}

int vhub_vmm_channel_new(struct event_base *base, int fd, unsigned timeout_ms, unsigned max_pending,
                         const struct vhub_vmm_channel_ops *ops, void *userdata,
                         struct vhub_vmm_channel **ret) {
        struct vhub_vmm_channel *ch;
        int fl, domain = 0, type = 0;
        socklen_t len = sizeof(int);

        /* the VMM may have sent anything: only a stream socket is a channel */
        if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) < 0 || domain != AF_UNIX ||
            getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0 || type != SOCK_STREAM) {
                close(fd);
                return -ENOTSOCK;
        }
        fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
                int r = -errno;

                close(fd);
                return r;
        }
        ch = calloc(1, sizeof(*ch));
        if (!ch) {
                close(fd);
                return -ENOMEM;
        }
        ch->fd = fd;
        ch->ops = ops;
        ch->userdata = userdata;
        ch->timeout_usec = (uint64_t)timeout_ms * 1000u;
        ch->max_pending = max_pending ? max_pending : 1;
        vhu_reader_init(&ch->reader);
        vhu_writer_init(&ch->writer);
        ch->awaited = calloc(ch->max_pending, sizeof(*ch->awaited));
        ch->ev_read = event_new(base, fd, EV_READ | EV_PERSIST, chan_read_cb, ch);
        ch->ev_write = event_new(base, fd, EV_WRITE | EV_PERSIST, chan_write_cb, ch);
        ch->ev_timer = evtimer_new(base, chan_timer_cb, ch);
        ch->ev_lost = event_new(base, -1, 0, chan_lost_cb, ch);
        if (!ch->awaited || !ch->ev_read || !ch->ev_write || !ch->ev_timer || !ch->ev_lost ||
            event_add(ch->ev_read, NULL) < 0) {
                chan_free_now(ch);
                return -ENOMEM;
        }
        *ret = ch;
        return 0;
}

struct vhub_vmm_channel *vhub_vmm_channel_free(struct vhub_vmm_channel *ch) {
        if (!ch)
                return NULL;
        if (ch->dispatching) {
                ch->free_requested = true;
                ch->lost = true;
                event_del(ch->ev_read);
                event_del(ch->ev_write);
                evtimer_del(ch->ev_timer);
                event_del(ch->ev_lost);
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

        if (ch->lost)
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
        if ((expects && ch->count == ch->max_pending) || ch->writer.n_items >= ch->max_pending)
                return -ENOBUFS;
        r = vhu_writer_send(&ch->writer, ch->fd, m);
        if (r == -ENOMEM || r == -EMFILE || r == -EINVAL)
                return r;
        if (expects) {
                ch->awaited[(ch->head + ch->count) % ch->max_pending] = (struct awaited_reply){
                        .request = m->hdr.request,
                        .flags = m->hdr.flags,
                        .tag = tag,
                        .deadline = vmm_now_usec() + ch->timeout_usec,
                };
                ch->count++;
                if (ch->count == 1)
                        chan_rearm_timer(ch);
        }
        chan_after_write(ch, r);
        return expects ? 1 : 0;
}

unsigned vhub_vmm_channel_awaiting(const struct vhub_vmm_channel *ch) {
        return ch->count;
}

bool vhub_vmm_channel_is_lost(const struct vhub_vmm_channel *ch) {
        return ch->lost;
}
