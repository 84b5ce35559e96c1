/* SPDX-License-Identifier: MIT */
/*
 * Read-only snapshots of the model for its faces: what daemon.info and the
 * list methods report, copied out of the model.  A face reads no field of a
 * model struct; when it needs something new of the model, it gets a member
 * here (or an accessor beside the struct), so that what the model exposes
 * stays in one place.
 *
 * Lists are arrays the caller frees with free(); they hold copies, valid
 * after the model changes, except the vm handle of struct vhub_vm_info,
 * valid until control returns to the event loop.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "vhub-config.h"
#include "vhub-device.h"
#include "vhub-owner.h"

struct vhub_context;
struct vhub_vm;

struct vhub_daemon_info {
        uint64_t uptime_usec;
        uint64_t started_realtime_usec;  /* CLOCK_REALTIME, for people */
        unsigned vms, devices;           /* those the uid sees */
        uint64_t protocol_features;      /* what the daemon implements as a front-end */
        uint64_t restarts;               /* restarts its state was carried across */
        bool fd_store;                   /* it keeps its state in the fd store (restarts are safe) */
};

void vhub_info_daemon(const struct vhub_context *ctx, uid_t uid, struct vhub_daemon_info *ret);

struct vhub_vm_info {
        struct vhub_vm *vm;              /* to ask for more (see above) */
        char name[VHUB_NAME_MAX + 1];
        uid_t uid;
        size_t n_regions;
        unsigned n_devices;
        bool lingering;                  /* no owner: waits for vm.attach */
        uint64_t linger_remaining_ms;    /* when lingering */
};

/* The VMs uid sees (vhub_vm_visible_to()), none being destroyed, in
 * creation order.  0 or -ENOMEM. */
int vhub_info_vms(const struct vhub_context *ctx, uid_t uid, struct vhub_vm_info **ret, size_t *ret_n);

/* a unix socket path: sun_path */
#define VHUB_SOCKET_PATH_MAX 108

struct vhub_device_info {
        char name[VHUB_NAME_MAX + 1];
        enum vhub_device_state state;
        enum vhub_device_mode mode;
        enum vhub_face face;             /* who drives it */
        char socket[VHUB_SOCKET_PATH_MAX];
        uint64_t features;               /* what the back-end offered */
        uint64_t acked_features;         /* the driver's, from the last start */
        uint64_t protocol_features;      /* negotiated */
        unsigned queues;
        unsigned reconnects;
        char type[32];                   /* informational, "" if none given */
        bool front_door;                 /* added with vmm_socket: its VMM drives it */
        char vmm_socket[VHUB_SOCKET_PATH_MAX]; /* front door: where the VMM connects ("" before) */
        bool vmm_connected;              /* front door: a VMM is attached, else it waits for one */
};

/* The VM's devices, in the order they were added (one being removed too). */
int vhub_info_devices(const struct vhub_vm *vm, struct vhub_device_info **ret, size_t *ret_n);

/* device.stats: the device's counters (vhub-device.h) and where it is now. */
struct vhub_device_stats_info {
        enum vhub_device_state state;
        uint64_t since_usec;             /* in that state */
        unsigned reconnects;
        struct vhub_device_stats counters;
};

void vhub_info_device_stats(const struct vhub_device *dev, struct vhub_device_stats_info *ret);

struct vhub_region_info {
        uint64_t gpa, size, offset, uaddr;
};

/* The VM's committed memory regions, in the order they were added. */
int vhub_info_regions(const struct vhub_vm *vm, struct vhub_region_info **ret, size_t *ret_n);

struct vhub_shared_object_info {
        uint8_t uuid[16];
        char exporter[VHUB_NAME_MAX + 1];  /* the exporting device's name; "" for the VMM */
};

int vhub_info_shared_objects(const struct vhub_vm *vm, struct vhub_shared_object_info **ret,
                             size_t *ret_n);
