/* SPDX-License-Identifier: MIT */
/*
 * The daemon context: the one object holding all daemon state (config, the
 * event loop, every VM).  Nothing else in the daemon is global.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/types.h>

#include "vhub-config.h"
#include "vhub-event.h"
#include "vhub-fd-budget.h"

struct event_base;
struct event;
struct vhub_backend_dirs;
struct vhub_vm;
struct vhub_socket_watcher;

TAILQ_HEAD(vhub_vm_list, vhub_vm);

struct vhub_context {
        struct event_base *base;
        struct vhub_config *config;
        struct vhub_vm_list vms;
        unsigned n_vms;
        unsigned n_devices;
        uint64_t next_region_id;
        uint64_t next_token;
        uint64_t start_usec;              /* CLOCK_MONOTONIC: uptime */
        uint64_t start_realtime_usec;     /* CLOCK_REALTIME: daemon.info's started_at */
        struct vhub_event_sink events;
        struct vhub_fd_budget fd_budget;            /* from RLIMIT_NOFILE at init */
        struct vhub_socket_watcher *socket_watcher; /* see vhub-socket-watch.h */
        struct vhub_backend_dirs *backend_dirs;     /* see vhub-backend-path.h */
        unsigned n_channels_paused;  /* back-end channels waiting for a VMM to read */
        bool shutting_down;
        /* called when the model's counts change (systemd STATUS=) */
        void (*on_counts_changed)(void *userdata);
        void *counts_userdata;
};

/* Also raises the soft RLIMIT_NOFILE to the hard limit and derives the fd
 * budget from it (vhub-fd-budget.h). */
int vhub_context_init(struct vhub_context *ctx, struct event_base *base, struct vhub_config *config);
/* Tear down every VM (back-ends closed, fds released).  Completes pending calls. */
void vhub_context_done(struct vhub_context *ctx);
void vhub_context_emit(struct vhub_context *ctx, const struct vhub_event *ev);
/* Whether the VM's owner is behind on its events (events.congested). */
bool vhub_context_events_congested(struct vhub_context *ctx, const struct vhub_vm *vm);
/* The owner of vm caught up on its events, or vm has a new owner (or none):
 * its paused back-end channels read again. */
void vhub_context_events_drained(struct vhub_context *ctx, struct vhub_vm *vm);
void vhub_context_counts_changed(struct vhub_context *ctx);
/* Number of VMs owned by uid. */
unsigned vhub_context_count_vms(const struct vhub_context *ctx, uid_t uid);
