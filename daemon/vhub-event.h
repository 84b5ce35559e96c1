/* SPDX-License-Identifier: MIT */
/*
 * Events the model raises (the contract's "Events").  The model describes
 * them in C; the control layer turns them into notifications for the VM's
 * owning connection and its subscribers.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/types.h>

#include "vhub-contract.h" /* enum vhub_event_type and the names */

struct vhub_fd_usage;
struct vhub_vm;

struct vhub_event_vring {
        uint32_t index;
        uint32_t base;
        uint32_t outstanding;
};

struct vhub_event_field {
        const char *key;
        uint64_t value;
};

#define VHUB_EVENT_MAX_FIELDS 8

struct vhub_event {
        enum vhub_event_type type;
        /* When it happened (CLOCK_REALTIME, us) and whose VM it is: stamped
         * by vhub_context_emit() unless the emitter set the time itself (a
         * loss's time is also device.stats' last_loss). */
        uint64_t timestamp_usec;
        uid_t uid;
        const struct vhub_vm *vm;
        const char *device;              /* NULL for VM events */
        const char *reason;              /* disconnected, failed, vm.destroyed */
        /* reconnected */
        unsigned reconnects;
        bool exact;
        unsigned n_vrings;
        const struct vhub_event_vring *vrings;
        /* lingering */
        uint64_t linger_ms;
        /* backend_request */
        const char *request;
        uint64_t token;
        unsigned n_fields;
        struct vhub_event_field fields[VHUB_EVENT_MAX_FIELDS];
        const int *fds;                  /* borrowed; the sink dups what it sends */
        unsigned n_fds;
};

/*
 * Where events go: each face that listens registers one sink with
 * vhub_context_add_sink() (embedded in the face's own object) and removes
 * it before it goes.  Every sink gets every event and decides itself who may
 * see it (vhub_vm_visible_to()).  A sink may remove itself from inside
 * emit(), no other sink.
 */
struct vhub_event_sink {
        TAILQ_ENTRY(vhub_event_sink) link;   /* the context's list */
        void (*emit)(void *userdata, const struct vhub_event *ev);
        /* Optional: add the fds the face holds on behalf of uids (its
         * connections and what is queued on them) to u with
         * vhub_fd_usage_add(), for the fd budget (vhub_context_fd_usage()). */
        void (*count_fds)(void *userdata, struct vhub_fd_usage *u);
        void *userdata;
};

TAILQ_HEAD(vhub_event_sink_list, vhub_event_sink);

const char *vhub_event_type_to_string(enum vhub_event_type t);
