/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "vhub-log.h"
#include "vhub-loop.h"
#include "vhub-sd.h"
#include "vhub-time.h"

struct vhub_sd {
        struct event *ev_watchdog;
        uint64_t watchdog_usec;
        bool notifying;                 /* $NOTIFY_SOCKET was set at start */
};

static void watchdog_cb(evutil_socket_t fd, short what, void *userdata) {
        /* sent from the event loop: a stuck loop stops the pings */
        sd_notify(0, "WATCHDOG=1");
}

int vhub_sd_new(struct event_base *base, struct vhub_sd **ret) {
        struct vhub_sd *sd = calloc(1, sizeof(*sd));
        uint64_t usec = 0;

        if (!sd)
                return -ENOMEM;
        /* sd_notify() is called with unset_environment 0: it stays set */
        sd->notifying = getenv("NOTIFY_SOCKET") != NULL;
        if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
                struct timeval tv = vhub_timeval_from_usec(usec / 2);

                sd->watchdog_usec = usec;
                sd->ev_watchdog = event_new(base, -1, EV_PERSIST, watchdog_cb, sd);
                if (!sd->ev_watchdog || event_add(sd->ev_watchdog, &tv) < 0) {
                        vhub_sd_free(sd);
                        return -ENOMEM;
                }
                log_debug("watchdog every %llu us", (unsigned long long)(usec / 2));
        }
        *ret = sd;
        return 0;
}

struct vhub_sd *vhub_sd_free(struct vhub_sd *sd) {
        if (!sd)
                return NULL;
        vhub_event_freep(&sd->ev_watchdog);
        free(sd);
        return NULL;
}

void vhub_sd_ready(struct vhub_sd *sd, const char *status) {
        sd_notifyf(0, "READY=1\nSTATUS=%s", status);
}

void vhub_sd_status(struct vhub_sd *sd, const char *status) {
        if (sd->notifying)
                sd_notifyf(0, "STATUS=%s", status);
}

bool vhub_sd_notifying(const struct vhub_sd *sd) {
        return sd->notifying;
}

void vhub_sd_stopping(struct vhub_sd *sd) {
        sd_notify(0, "STOPPING=1\nSTATUS=shutting down");
}
