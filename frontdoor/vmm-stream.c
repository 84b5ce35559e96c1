/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vmm-clock.h"
#include "vmm-stream.h"
#include "vhu-fd.h"
#include "vhub-loop.h"

/* A stream is only ever silenced once started: its events are all there. */
void vmm_stream_silence(struct vmm_stream *s) {
        event_del(s->ev_read);
        event_del(s->ev_write);
        evtimer_del(s->ev_timer);
        event_del(s->ev_lost); /* a loss not reported yet stays unreported */
        s->reading = false;
}

void vmm_stream_abandon(struct vmm_stream *s) {
        s->lost = true;
        vmm_stream_silence(s);
}

void vmm_stream_lose(struct vmm_stream *s, bool timeout, const char *fmt, ...) {
        va_list ap;

        if (s->lost)
                return;
        s->lost = true;
        s->lost_timeout = timeout;
        va_start(ap, fmt);
        vsnprintf(s->lost_reason, sizeof(s->lost_reason), fmt, ap);
        va_end(ap);
        vmm_stream_silence(s);
        event_active(s->ev_lost, 0, 0);
}

static void stream_lost_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vmm_stream *s = userdata;

        s->ops->on_lost(s->owner);
}

void vmm_stream_rearm(struct vmm_stream *s, uint64_t owner_deadline) {
        uint64_t deadline = s->write_deadline;
        struct timeval tv;

        s->owner_deadline = owner_deadline;
        if (s->lost)
                return;
        if (owner_deadline && (!deadline || owner_deadline < deadline))
                deadline = owner_deadline;
        if (!deadline) {
                evtimer_del(s->ev_timer);
                return;
        }
        tv = vmm_timeval_until(deadline);
        evtimer_add(s->ev_timer, &tv);
}

static void stream_timer_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vmm_stream *s = userdata;
        uint64_t now = vmm_now_usec();

        if (s->write_deadline && s->write_deadline <= now) {
                vmm_stream_lose(s, true, "the VMM read nothing on %s for %llu ms", s->what,
                                (unsigned long long)(s->write_timeout_usec / 1000u));
                return;
        }
        s->ops->on_timer(s->owner, now);
}

/* r: what vhu_writer_send()/vhu_writer_flush() returned. */
static void stream_after_write(struct vmm_stream *s, int r) {
        if (r == 0) {
                event_del(s->ev_write);
                if (s->write_deadline) {
                        s->write_deadline = 0;
                        vmm_stream_rearm(s, s->owner_deadline);
                }
                return;
        }
        if (r != -EAGAIN) {
                vmm_stream_lose(s, false, "cannot write to %s: %s", s->what, strerror(-r));
                return;
        }
        if (s->writer.n_bytes > s->max_queued_bytes) {
                vmm_stream_lose(s, false, "the VMM does not read %s (%zu bytes queued)", s->what,
                                s->writer.n_bytes);
                return;
        }
        event_add(s->ev_write, NULL);
        if (!s->write_deadline) {
                s->write_deadline = vmm_now_usec() + s->write_timeout_usec;
                vmm_stream_rearm(s, s->owner_deadline);
        }
}

static void stream_write_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vmm_stream *s = userdata;

        if (!s->lost)
                stream_after_write(s, vhu_writer_flush(&s->writer, s->fd));
}

static void stream_read_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vmm_stream *s = userdata;

        if (!s->lost)
                s->ops->on_readable(s->owner);
}

int vmm_stream_send(struct vmm_stream *s, const struct vhu_msg *m) {
        int r = vhu_writer_send(&s->writer, s->fd, m);

        if (r == -ENOMEM || r == -EMFILE || r == -EINVAL)
                return r;
        stream_after_write(s, r);
        return 0;
}

bool vmm_stream_at_rest(const struct vmm_stream *s) {
        return !s->lost && s->reader.got == 0 && !vhu_writer_pending(&s->writer);
}

void vmm_stream_foreach_fd(const struct vmm_stream *s, vhu_fd_fn fn, void *userdata) {
        vhu_conn_foreach_fd(s->fd, &s->reader, &s->writer, fn, userdata);
}

void vmm_stream_set_reading(struct vmm_stream *s, bool on) {
        if (s->lost || s->reading == on)
                return;
        s->reading = on;
        if (on)
                event_add(s->ev_read, NULL); /* level-triggered: what is buffered fires it */
        else
                event_del(s->ev_read);
}

/* fd taken in every case; on failure s holds nothing (vmm_stream_done()). */
static int stream_init(struct vmm_stream *s, struct event_base *base, int fd, const char *what,
                       size_t max_queued_bytes, unsigned write_timeout_ms,
                       const struct vmm_stream_ops *ops, void *owner) {
        int r;

        *s = (struct vmm_stream){
                .fd = fd,
                .what = what,
                .max_queued_bytes = max_queued_bytes,
                .write_timeout_usec = (uint64_t)write_timeout_ms * 1000u,
                .ops = ops,
                .owner = owner,
        };
        vhu_reader_init(&s->reader);
        vhu_writer_init(&s->writer);
        vhu_reader_set_fds_hook(&s->reader, ops->on_fds_changed, owner);
        vhu_writer_set_fds_hook(&s->writer, ops->on_fds_changed, owner);
        r = vhu_set_nonblocking(fd);
        if (r < 0) {
                vmm_stream_done(s);
                return r;
        }
        s->ev_read = event_new(base, fd, EV_READ | EV_PERSIST, stream_read_cb, s);
        s->ev_write = event_new(base, fd, EV_WRITE | EV_PERSIST, stream_write_cb, s);
        s->ev_timer = evtimer_new(base, stream_timer_cb, s);
        s->ev_lost = event_new(base, -1, 0, stream_lost_cb, s);
        if (!s->ev_read || !s->ev_write || !s->ev_timer || !s->ev_lost || event_add(s->ev_read, NULL) < 0) {
                vmm_stream_done(s);
                return -ENOMEM;
        }
        s->reading = true;
        return 0;
}

void *vmm_stream_new_owner(size_t size, struct event_base *base, int fd, const char *what,
                           size_t max_queued_bytes, unsigned write_timeout_ms,
                           const struct vmm_stream_ops *ops, int *error) {
        struct vmm_stream *s = calloc(1, size); /* the owner, its stream first */

        if (!s) {
                fd = vhu_safe_close(fd);
                *error = -ENOMEM;
                return NULL;
        }
        *error = stream_init(s, base, fd, what, max_queued_bytes, write_timeout_ms, ops, s);
        if (*error < 0) {
                free(s);
                return NULL;
        }
        return s;
}

void vmm_stream_done(struct vmm_stream *s) {
        vhub_event_freep(&s->ev_read);
        vhub_event_freep(&s->ev_write);
        vhub_event_freep(&s->ev_timer);
        vhub_event_freep(&s->ev_lost);
        /* its owner is going: it counts what it held itself */
        vhu_reader_set_fds_hook(&s->reader, NULL, NULL);
        vhu_writer_set_fds_hook(&s->writer, NULL, NULL);
        vhu_reader_reset(&s->reader);
        vhu_writer_clear(&s->writer);
        if (s->fd >= 0)
                s->fd = vhu_safe_close(s->fd);
        s->ev_read = s->ev_write = s->ev_timer = s->ev_lost = NULL;
        s->fd = -1;
}
