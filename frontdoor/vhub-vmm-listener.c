/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-loop.h"
#include "vhub-vmm-listener.h"
#include "vhu-fd.h"

/* Connections accepted per wake-up: refusals cannot starve the loop. */
#define LISTENER_ACCEPT_BUDGET 8
/* How long accepting pauses when the process is out of fds. */
#define LISTENER_FD_PAUSE_MS 100

struct vhub_vmm_listener {
        int fd;
        uid_t owner_uid;
        struct event *ev_accept;
        struct event *ev_resume;     /* accepting again after EMFILE */
        bool busy;                   /* a VMM is attached */
        const struct vhub_vmm_listener_ops *ops;
        void *userdata;
        bool dispatching;
        bool free_requested;
};

static void listener_free_now(struct vhub_vmm_listener *l) {
        vhub_event_freep(&l->ev_accept);
        vhub_event_freep(&l->ev_resume);
        if (l->fd >= 0)
                l->fd = vhu_safe_close(l->fd);
        free(l);
}

static void listener_refuse(struct vhub_vmm_listener *l, int fd, enum vhub_vmm_refusal why, uid_t uid) {
        fd = vhu_safe_close(fd);
        if (l->ops->on_refused)
                l->ops->on_refused(l->userdata, why, uid);
}

/* One accepted connection: refused, or handed over (and the listener busy). */
static void listener_admit(struct vhub_vmm_listener *l, int fd) {
        struct ucred peer;
        socklen_t len = sizeof(peer);

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &len) < 0 ||
            (peer.uid != l->owner_uid && peer.uid != 0)) {
                listener_refuse(l, fd, VHUB_VMM_REFUSED_PEER, len == sizeof(peer) ? peer.uid : (uid_t)-1);
                return;
        }
        if (l->busy) {
                listener_refuse(l, fd, VHUB_VMM_REFUSED_BUSY, peer.uid);
                return;
        }
        l->busy = true;
        l->ops->on_connect(l->userdata, fd);
}

static void listener_accept_cb(evutil_socket_t sfd, short what, void *userdata) {
        struct vhub_vmm_listener *l = userdata;

        l->dispatching = true;
        for (int budget = LISTENER_ACCEPT_BUDGET; budget > 0 && !l->free_requested; budget--) {
                int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

                if (fd < 0) {
                        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                                struct timeval tv = { 0, LISTENER_FD_PAUSE_MS * 1000 };

                                event_del(l->ev_accept);
                                evtimer_add(l->ev_resume, &tv);
                        }
                        /* EAGAIN, ECONNABORTED, EINTR, ...: nothing to take now */
                        break;
                }
                listener_admit(l, fd);
        }
        l->dispatching = false;
        if (l->free_requested)
                listener_free_now(l);
}

static void listener_resume_cb(evutil_socket_t fd, short what, void *userdata) {
        struct vhub_vmm_listener *l = userdata;

        event_add(l->ev_accept, NULL);
}

int vhub_vmm_listener_new(struct event_base *base, int listen_fd, uid_t owner_uid,
                          const struct vhub_vmm_listener_ops *ops, void *userdata,
                          struct vhub_vmm_listener **ret) {
        struct vhub_vmm_listener *l;
        int r;

        r = vhu_set_nonblocking(listen_fd);
        if (r < 0) {
                listen_fd = vhu_safe_close(listen_fd);
                return r;
        }
        l = calloc(1, sizeof(*l));
        if (!l) {
                listen_fd = vhu_safe_close(listen_fd);
                return -ENOMEM;
        }
        l->fd = listen_fd;
        l->owner_uid = owner_uid;
        l->ops = ops;
        l->userdata = userdata;
        l->ev_accept = event_new(base, listen_fd, EV_READ | EV_PERSIST, listener_accept_cb, l);
        l->ev_resume = evtimer_new(base, listener_resume_cb, l);
        if (!l->ev_accept || !l->ev_resume || event_add(l->ev_accept, NULL) < 0) {
                listener_free_now(l);
                return -ENOMEM;
        }
        *ret = l;
        return 0;
}

struct vhub_vmm_listener *vhub_vmm_listener_free(struct vhub_vmm_listener *l) {
        if (!l)
                return NULL;
        if (l->dispatching) {
                l->free_requested = true;
                event_del(l->ev_accept);
                evtimer_del(l->ev_resume);
                return NULL;
        }
        listener_free_now(l);
        return NULL;
}

void vhub_vmm_listener_release(struct vhub_vmm_listener *l) {
        l->busy = false;
}

void vhub_vmm_listener_hold(struct vhub_vmm_listener *l) {
        l->busy = true;
}

bool vhub_vmm_listener_busy(const struct vhub_vmm_listener *l) {
        return l->busy;
}

int vhub_vmm_listener_fd(const struct vhub_vmm_listener *l) {
        return l->fd;
}
