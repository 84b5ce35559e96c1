/* SPDX-License-Identifier: MIT */
/*
 * libevent helpers, header-only: the model, the faces and their leaf
 * transports (which include nothing of the model) share them.
 */
#pragma once

#include <event2/event.h>

/* Free the event *ev holds, if any, and forget it (*ev = NULL): the one way
 * an owner drops an event that may not have been made (event_free(NULL)
 * crashes), safe to run again.  vhub_event_freep(&c->ev_read). */
static inline void vhub_event_freep(struct event **ev) {
        if (*ev) {
                event_free(*ev);
                *ev = NULL;
        }
}
