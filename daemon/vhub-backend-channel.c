/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vhub-backend-channel.h"
#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-time.h"
#include "vhu-fd.h"
#include "vhu-socket.h"

/* Unanswered replies queued towards a back-end that does not read. */
#define CHANNEL_MAX_QUEUED_REPLIES 64
/* More requests than this per second is a flood: the back-end is lost. */
#define CHANNEL_MAX_RATE 2000

/* Whether requests are read (see the header: back-pressure). */
enum channel_flow {
        FLOW_OPEN,
        FLOW_PAUSED,    /* the receiver is behind: nothing is read */
        FLOW_REFUSING,  /* ... for longer than the deadline: what is for it is refused */
};

struct vhub_backend_channel {
        const struct vhub_backend_channel_ops *ops;
        void *userdata;
        const char *vm, *device;      /* for log lines */
        uid_t uid;
        uint64_t protocol_features;
        unsigned timeout_ms;
        int fd;
        struct event *ev_read;
        struct event *ev_write;
        struct event *ev_deadline;
        struct vhu_reader reader;
        struct vhu_writer writer;

        bool waiting;                 /* an answer is deferred: nothing is read */
        unsigned wait_tag;            /* the owner's: what it waits for */
        uint64_t wait_token;
        struct vhu_header wait_hdr;   /* the request being answered (a header is all a
                                       * reply needs; not a whole message: 4 KiB a device) */

        uint64_t rate_window_start;
        unsigned rate_count;

        enum channel_flow flow;
        struct event *ev_flow;        /* how long a pause may last */
        uint64_t refused;             /* requests refused in this FLOW_REFUSING spell */

        bool stopped;                 /* a planned restart: no new request is read */
};

#define chan_log(ch, level, request_, ...)                                                       \
        vhub_log_at(VHUB_LOG_SITE, (level),                                                     \
                    &(const struct vhub_log_about){ .vm = (ch)->vm, .device = (ch)->device,      \
                                                    .request = (request_), .has_uid = true,     \
                                                    .uid = (ch)->uid },                         \
                    __VA_ARGS__)

static void channel_lost(struct vhub_backend_channel *ch, const char *reason) {
        ch->ops->on_lost(ch->userdata, reason);
}

static bool channel_has_pf(const struct vhub_backend_channel *ch, unsigned bit) {
        return (ch->protocol_features & VHU_PF_BIT(bit)) != 0;
}

static void channel_flush(struct vhub_backend_channel *ch) {
        int r = vhu_writer_flush(&ch->writer, ch->fd);

        if (r == 0)
                event_del(ch->ev_write);
        else if (r == -EAGAIN)
                event_add(ch->ev_write, NULL);
        else
                channel_lost(ch, "back-end channel write failed");
}

static void channel_queue(struct vhub_backend_channel *ch, const struct vhu_msg *r) {
        if (ch->writer.n_items >= CHANNEL_MAX_QUEUED_REPLIES) {
                channel_lost(ch, "back-end does not read its channel");
                return;
        }
        if (vhu_writer_queue(&ch->writer, r) < 0) {
                channel_lost(ch, "cannot queue a back-end channel reply");
                return;
        }
        channel_flush(ch);
}

void vhub_backend_channel_answer(struct vhub_backend_channel *ch, const struct vhu_msg *req,
                                 uint64_t value, int fd) {
        const struct vhu_request_info *info = vhu_request_info(VHU_DIR_BACKEND, req->hdr.request);
        struct vhu_msg r;

        /* its own reply (SHARED_OBJECT_LOOKUP: u64, the fd only with success) */
        if (info && info->reply == VHU_REPLY_ALWAYS) {
                vhu_msg_build_reply(&r, req, &value, sizeof(value), fd >= 0 ? &fd : NULL, fd >= 0 ? 1 : 0);
                channel_queue(ch, &r);
                return;
        }
        /* the REPLY_ACK, if asked for */
        if (!(req->hdr.flags & VHU_FLAG_NEED_REPLY) || !channel_has_pf(ch, VHU_PF_REPLY_ACK))
                return;
        vhu_msg_build_reply_u64(&r, req, value);
        channel_queue(ch, &r);
}

/* Read again (requests may already sit in the socket), unless a wait or
 * a pause still holds the channel. */
static void channel_read_again(struct vhub_backend_channel *ch) {
        if (ch->waiting || ch->flow == FLOW_PAUSED || (ch->stopped && ch->reader.got == 0))
                return;
        event_add(ch->ev_read, NULL);
        event_active(ch->ev_read, EV_READ, 0);
}

static void channel_resume(struct vhub_backend_channel *ch) {
        ch->waiting = false;
        ch->wait_token = 0;
        evtimer_del(ch->ev_deadline);
        channel_read_again(ch);
}

static struct timeval channel_timeout(const struct vhub_backend_channel *ch) {
        return vhub_timeval_from_ms(ch->timeout_ms);
}

static void channel_paused(struct vhub_backend_channel *ch, bool paused) {
        if (ch->ops->paused)
                ch->ops->paused(ch->userdata, paused);
}

/* The receiver is behind on what it was sent: the back-end waits, not it. */
static void channel_pause(struct vhub_backend_channel *ch) {
        struct timeval tv = channel_timeout(ch);

        ch->flow = FLOW_PAUSED;
        channel_paused(ch, true);
        event_del(ch->ev_read);
        evtimer_add(ch->ev_flow, &tv);
        chan_log(ch, LOG_DEBUG, NULL,
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
        chan_log(ch, LOG_WARNING, NULL,
                 "the VMM has not caught up on its events for %u ms; refusing the back-end's requests for it until it does",
                 ch->timeout_ms);
        channel_read_again(ch);
}

void vhub_backend_channel_drained(struct vhub_backend_channel *ch) {
        if (ch->flow == FLOW_OPEN)
                return;
        if (ch->flow == FLOW_REFUSING)
                chan_log(ch, LOG_NOTICE, NULL,
                         "the VMM caught up on its events; %llu back-end requests for it were refused meanwhile",
                         (unsigned long long)ch->refused);
        ch->flow = FLOW_OPEN;
        channel_paused(ch, false);
        evtimer_del(ch->ev_flow);
        /* what piled up while paused is read in a burst: not a flood */
        ch->rate_window_start = vhub_now_usec();
        ch->rate_count = 0;
        channel_read_again(ch);
}

bool vhub_backend_channel_refuse_stalled(struct vhub_backend_channel *ch, const struct vhu_msg *req) {
        if (ch->flow != FLOW_REFUSING)
                return false;
        ch->refused++;
        chan_log(ch, LOG_DEBUG, vhu_request_name(VHU_DIR_BACKEND, req->hdr.request),
                 "refused: the VMM is not reading its events");
        vhub_backend_channel_answer(ch, req, 1, -1);
        return true;
}

void vhub_backend_channel_defer(struct vhub_backend_channel *ch, const struct vhu_msg *req,
                                unsigned tag, uint64_t token) {
        struct timeval tv = channel_timeout(ch);

        ch->waiting = true;
        ch->wait_tag = tag;
        ch->wait_token = token;
        ch->wait_hdr = req->hdr;
        event_del(ch->ev_read);
        evtimer_add(ch->ev_deadline, &tv);
}

/* The request being answered, as the reply builders take it. */
static void channel_waited_request(const struct vhub_backend_channel *ch, struct vhu_msg *ret) {
        vhu_msg_init(ret);
        ret->hdr = ch->wait_hdr;
}

static void channel_deadline_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_backend_channel *ch = userdata;
        const char *name = vhu_request_name(VHU_DIR_BACKEND, ch->wait_hdr.request);
        struct vhu_msg req;

        chan_log(ch, LOG_WARNING, name, "%s not answered in time; failing it towards the back-end", name);
        channel_waited_request(ch, &req);
        vhub_backend_channel_answer(ch, &req, 1, -1);
        channel_resume(ch);
}

int vhub_backend_channel_answer_deferred(struct vhub_backend_channel *ch, unsigned tag, uint64_t token,
                                         uint64_t value, int fd) {
        struct vhu_msg req;

        if (!ch->waiting || ch->wait_tag != tag || ch->wait_token != token)
                return -ENOENT;
        channel_waited_request(ch, &req);
        vhub_backend_channel_answer(ch, &req, value, fd);
        channel_resume(ch);
        return 0;
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
        struct vhu_msg m;
        int r;

        vhu_msg_init(&m);
        /* bounded per wake-up, so one chatty back-end cannot starve the loop */
        for (int budget = 64; budget > 0 && !ch->waiting; budget--) {
                const char *why = NULL;

                /* stopped: a request begun is read to its end, no other */
                if (ch->stopped && ch->reader.got == 0) {
                        event_del(ch->ev_read);
                        return;
                }

                /* checked before every request: each may be for the receiver */
                if (ch->flow == FLOW_OPEN && ch->ops->congested && ch->ops->congested(ch->userdata)) {
                        channel_pause(ch);
                        return;
                }

                r = vhu_reader_read(&ch->reader, ch->fd, &m);
                if (r == -EAGAIN)
                        return;
                if (r <= 0) {
                        if (r == 0)
                                chan_log(ch, LOG_DEBUG, NULL, "back-end closed its channel");
                        else
                                channel_lost(ch, r == -EPROTO ? "protocol violation on the back-end channel"
                                                              : "back-end channel error");
                        event_del(ch->ev_read);
                        return;
                }
                if (channel_flooding(ch)) {
                        vhu_msg_clear(&m);
                        channel_lost(ch, "back-end floods its channel");
                        event_del(ch->ev_read);
                        return;
                }
                if (vhu_validate_request(VHU_DIR_BACKEND, ch->protocol_features, &m, &why) < 0) {
                        char reason[200];

                        snprintf(reason, sizeof(reason), "bad back-end request %u on its channel: %s",
                                 m.hdr.request, why ? why : "invalid");
                        vhu_msg_clear(&m);
                        channel_lost(ch, reason);
                        event_del(ch->ev_read);
                        return;
                }
                ch->ops->on_request(ch->userdata, ch, &m);
                vhu_msg_clear(&m);
        }
}

static void channel_write_cb(evutil_socket_t fd, short what, void *userdata) {
        channel_flush(userdata);
}

int vhub_backend_channel_new(const struct vhub_backend_channel_params *p, int fd,
                             const struct vhub_backend_channel_ops *ops, void *userdata,
                             struct vhub_backend_channel **ret) {
        struct vhub_backend_channel *ch = calloc(1, sizeof(*ch));

        if (!ch) {
                vhu_safe_close(fd);
                return -ENOMEM;
        }
        ch->ops = ops;
        ch->userdata = userdata;
        ch->vm = p->vm;
        ch->device = p->device;
        ch->uid = p->uid;
        ch->protocol_features = p->protocol_features;
        ch->timeout_ms = p->timeout_ms;
        ch->fd = fd;
        vhu_reader_init(&ch->reader);
        vhu_writer_init(&ch->writer);
        vhu_writer_set_fds_hook(&ch->writer, ops->on_fds_changed, userdata);
        ch->rate_window_start = vhub_now_usec();
        ch->ev_read = event_new(p->base, fd, EV_READ | EV_PERSIST, channel_read_cb, ch);
        ch->ev_write = event_new(p->base, fd, EV_WRITE | EV_PERSIST, channel_write_cb, ch);
        ch->ev_deadline = evtimer_new(p->base, channel_deadline_cb, ch);
        ch->ev_flow = evtimer_new(p->base, channel_flow_deadline_cb, ch);
        if (!ch->ev_read || !ch->ev_write || !ch->ev_deadline || !ch->ev_flow ||
            event_add(ch->ev_read, NULL) < 0) {
                vhub_backend_channel_free(ch);
                return -ENOMEM;
        }
        *ret = ch;
        return 0;
}

unsigned vhub_backend_channel_queued_fds(const struct vhub_backend_channel *ch) {
        return ch->writer.n_fds;
}

struct vhub_backend_channel *vhub_backend_channel_free(struct vhub_backend_channel *ch) {
        if (!ch)
                return NULL;
        vhub_event_freep(&ch->ev_read);
        vhub_event_freep(&ch->ev_write);
        vhub_event_freep(&ch->ev_deadline);
        vhub_event_freep(&ch->ev_flow);
        if (ch->flow != FLOW_OPEN)
                channel_paused(ch, false);
        vhu_reader_reset(&ch->reader);
        vhu_writer_set_fds_hook(&ch->writer, NULL, NULL); /* its owner is going too */
        vhu_writer_clear(&ch->writer);
        ch->fd = vhu_safe_close(ch->fd);
        free(ch);
        return NULL;
}

void vhub_backend_channel_stop_reading(struct vhub_backend_channel *ch) {
        ch->stopped = true;
        if (ch->reader.got == 0)
                event_del(ch->ev_read);
}

bool vhub_backend_channel_busy(const struct vhub_backend_channel *ch) {
        return ch->writer.n_items > 0 || ch->reader.got > 0;
}

bool vhub_backend_channel_deferred(const struct vhub_backend_channel *ch, unsigned *tag, uint64_t *token,
                                   struct vhu_header *hdr) {
        if (!ch->waiting)
                return false;
        *tag = ch->wait_tag;
        *token = ch->wait_token;
        *hdr = ch->wait_hdr;
        return true;
}

int vhub_backend_channel_fd(const struct vhub_backend_channel *ch) {
        return ch->fd;
}

void vhub_backend_channel_foreach_fd(const struct vhub_backend_channel *ch, vhu_fd_fn fn, void *userdata) {
        vhu_conn_foreach_fd(ch->fd, &ch->reader, &ch->writer, fn, userdata);
}
