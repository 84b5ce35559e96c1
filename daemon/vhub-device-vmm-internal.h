/* SPDX-License-Identifier: MIT */
/*
 * A front-door device's session records, private to the model: shared by
 * vhub-device-vmm.c (the session, the answers from the daemon's own state,
 * the deadlines), vhub-op-passthrough.c (the VMM's requests as ops) and
 * vhub-op-vmm-restore.c (replaying the records after a back-end loss, and
 * stopping the back-end's rings when the VMM leaves).
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "vhub-device-internal.h"
#include "vhub-device-vmm.h"
#include "vhub-memory.h"

struct event;

/* What the VMM set up on one ring, as it sent it. */
struct vhub_vmm_ring {
        bool num_set, base_set, addr_set, endian_set, enable_set;
        bool kick_set, call_set, err_set;
        bool started;                 /* kicked (SET_VRING_KICK), not stopped since */
        bool base_from_state;         /* the daemon answered GET_VRING_BASE with base itself */
        uint32_t num, base, endian, enable;
        struct vhu_vring_addr addr;   /* the VMM's own addresses (or IOVAs), flags included */
        uint64_t kick_u64, call_u64, err_u64;   /* index and the "no fd" bit, as sent */
        int kick_fd, call_fd, err_fd; /* dups of the VMM's eventfds (owned), -1 if none */
        uint16_t loss_avail, loss_used;
        bool loss_read;               /* the indexes above were read when the back-end was lost */
};

/* One request of the VMM, as a PASSTHROUGH op holds it. */
struct vhub_vmm_request {
        struct vhu_msg msg;           /* as the VMM sent it; owns its fds */
        uint64_t deadline;            /* arrival + --backend-timeout-ms (CLOCK_MONOTONIC usec) */
        bool answered;                /* its call was answered already (from the daemon's state) */
        struct vhu_msg *reply;        /* the back-end's reply to relay (owned) */
        struct vhub_mem_table target; /* a memory request: the VMM's table once applied
                                       * (fds dup'd, owned), committed when the back-end took it */
        bool has_target;
        bool close;                   /* the VMM sent what no back-end should get */
        char close_why[320];
};

/* The last GET_CONFIG answers, kept for an outage. */
#define VMM_CONFIG_CACHE 4

struct vhub_device_vmm {
        struct vhub_device *d;
        char *socket_path;            /* what the VMM connects to */
        void *face;                   /* the front door's object for the device */
        const struct vhub_vmm_face_ops *face_ops;
        bool connected;               /* a VMM is attached */
        bool leaving;                 /* the VMM left: its records go when the stop is done */

        /* the session's records (what a restore replays) */
        bool features_set;            /* the acked features are d->acked_features */
        uint64_t features;            /* SET_FEATURES as sent (bit 30 included) */
        bool status_set;
        uint64_t status;
        bool mtu_set;
        uint64_t mtu;
        bool log_set;
        struct vhu_log log;
        int log_fd;                   /* dup of the VMM's log memfd, -1 if none */
        bool inflight_set;            /* SET_INFLIGHT_FD with d->inflight_fd */
        struct vhu_inflight inflight; /* its payload */
        struct vhub_mem_table mem;    /* the VMM's regions (fds are dups) */
        struct vhub_vmm_ring *rings;  /* [d->queues] */

        struct {
                uint32_t offset, size;
                uint8_t data[VHU_MAX_CONFIG_SIZE];
        } config[VMM_CONFIG_CACHE];
        unsigned n_config, next_config;

        struct event *ev_deadline;    /* the earliest deadline of the VMM's queued requests */
        struct event *ev_reopen;      /* after a restart: the socket made again from the loop */
        uint64_t reopen_until_usec;   /* until then a name still in use is tried again: the
                                       * manager may not have dropped the earlier run's
                                       * listener yet (its FDSTOREREMOVE is asynchronous) */
        bool had_vmm;                 /* restored: a VMM was connected when the daemon stopped */
        bool outage_expired;          /* a request waited out the deadline in this outage:
                                       * the rest are answered at once until it ends */
};

static inline bool dev_is_front_door(const struct vhub_device *d) {
        return d->vmm != NULL;
}

/* vhub-device-vmm.c */
int vmm_session_new(struct vhub_device *d, struct vhub_error *err);
/* The first handshake succeeded: ask the front door for the socket. */
int vmm_open(struct vhub_device *d, struct vhub_error *err);
void vmm_session_free(struct vhub_device *d);
/*
 * A daemon restart (docs/restart.md, "Front-door devices"): a session a
 * planned restart left at rest is carried whole (vmm_carry_restore(),
 * vmm_carry_adopt() below).  Any other -- every crash -- is not: its
 * connection, channel and socket (group f<id>) are closed as stale, and
 * the VMM (QEMU with reconnect=1) comes back.  Restore makes the session
 * (empty unless carried; had_vmm: a VMM was connected and is not carried);
 * restore_finish (from vhub_device_restore_finish()) then makes the socket
 * again from the loop, says the VMM left, and renews the back-end's link as
 * when a VMM leaves -- nothing for a carried session.  true: the link is
 * dealt with.
 */
int vmm_session_restore(struct vhub_device *d, bool had_vmm);
bool vmm_restore_finish(struct vhub_device *d);
/* Whose files the socket and its directories are (the VM's uid). */
int vmm_owner(const struct vhub_vm *vm, struct vhub_cred *ret);

/* vhub-device-vmm-snapshot.c: a VMM session carried across a planned
 * restart (docs/restart.md, "Front-door devices") */
struct vhub_fd_claim;
struct vhub_fdstore_restore;
struct vhub_snap_rec;
struct vhub_snap_writer;
/* Write the session as record tag when it can be carried whole (the face
 * says it is at rest); false: nothing written. */
bool vmm_carry_put(const struct vhub_device *d, struct vhub_snap_writer *w, uint32_t tag);
/* The records from rec, their fds claimed from the device's group (the
 * session exists, empty).  < 0: the records are cleared, not carried. */
int vmm_carry_restore(struct vhub_device *d, struct vhub_fd_claim *claim, const struct vhub_snap_rec *rec);
/* The face takes its socket and the VMM's connection back (vhub_vmm_door.adopt)
 * once the device is in its VM; the VMM is connected again.  < 0: the
 * records are cleared, and the VMM's connection closes as after a crash. */
int vmm_carry_adopt(struct vhub_device *d, struct vhub_fdstore_restore *r, const struct vhub_snap_rec *rec);
unsigned vmm_fds_held(const struct vhub_device *d);
/* The records' fds, each tracked as the device's (group d<id>, names
 * dev/<uid>/<vm>/<dev>/vmm/...): fd is taken (-1: none), the old one closed. */
enum vmm_ring_fd { VMM_RING_KICK, VMM_RING_CALL, VMM_RING_ERR };
void vmm_ring_set_fd(struct vhub_device *d, uint32_t index, enum vmm_ring_fd which, int fd);
void vmm_ring_close_fds(struct vhub_device *d, uint32_t index);
void vmm_log_fd_set(struct vhub_device *d, int fd);
/* The VMM's table becomes *t (taken: t is left empty); NULL: none. */
void vmm_mem_replace(struct vhub_device *d, struct vhub_mem_table *t);
/* Every fd of the records, named (vhub_device_foreach_fd()). */
void vmm_foreach_fd(const struct vhub_device *d, const struct vhub_fd_visitor *v);
/* Forget the VMM's session (rings, memory, features, status...), closing its fds. */
void vmm_records_clear(struct vhub_device *d);
/* The device changed state (device_change_state()). */
void vmm_state_changed(struct vhub_device *d, enum vhub_device_state from, enum vhub_device_state to);
/* The back-end was lost while rings ran: the rings' indexes, for device.reconnected. */
void vmm_snapshot_rings(struct vhub_device *d);
/* Whether a restore has records to replay after the handshake. */
bool vmm_has_rings_to_restore(const struct vhub_device *d);
/* A guest-memory read at the VMM's own address (its table). */
int vmm_read_guest(const struct vhub_device *d, uint64_t uaddr, void *buf, size_t len);
/* The next deadline of the queued requests (re)arms the timer. */
void vmm_rearm_deadline(struct vhub_device *d);
/* A back-end request for the VMM: relayed on its channel (the token comes back), or not. */
int vmm_relay(struct vhub_device *d, const struct vhu_msg *m, uint64_t token);
/* Whether a ring index is one of the device's. */
static inline bool vmm_ring_ok(const struct vhub_device *d, uint32_t index) {
        return index < d->queues;
}
/* Set the device's public state from the rings (running while one is started). */
void vmm_update_state(struct vhub_device *d, const char *why);

/* vhub-op-passthrough.c: the VMM's requests as ops (VHUB_OP_PASSTHROUGH) */
/* Answer op's call now from the daemon's own state (records updated as the
 * request would have), and mark it answered. */
void passthrough_answer_from_state(struct vhub_device *d, struct vhub_op *op);
/* The memory a front-door device's back-end must hold: the VMM's table, or
 * a memory request's new table while it runs. */
int vmm_memory_target(const struct vhub_device *d, const struct vhub_op *op,
                      const struct vhub_region ***ret_regions, size_t *ret_n);
const struct vhub_region *vmm_region_by_id(const struct vhub_device *d, uint64_t id);
