/* SPDX-License-Identifier: MIT */
/*
 * The model's side of the vhost-user front door (docs/front-door.md): what a
 * device added with vmm_socket holds of its VMM's session, and the calls the
 * front door (frontdoor/, a face) makes on it.
 *
 * The front door registers itself on the context (vhub_context_set_vmm_door)
 * and is asked to open a device's socket once the device's first handshake
 * succeeded; from then on the face owns the socket, the VMM's connection and
 * its back-end channel, and the model owns everything a restore needs: the
 * VMM's memory table, ring records (with dups of the eventfds), acked
 * features, status, the inflight region.
 *
 * Every VMM request goes through vhub_device_vmm_request(): it is queued in
 * order with the device's other ops (so a restore runs first), answered from
 * the device's own state where the daemon knows the answer (features, queue
 * count, ...), else forwarded to the back-end with the VMM's own addresses
 * and fds and the back-end's answer relayed.  During an outage a request
 * waits for the restore at most --backend-timeout-ms, then is answered from
 * the daemon's records -- or the answer says to close the VMM's connection
 * when no honest answer exists.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "vhub-call.h"
#include "vhub-cred.h"
#include "vhub-error.h"
#include "vhu-message.h"

struct vhub_context;
struct vhub_device;
struct vhub_fdstore_restore;
struct vhub_snap_rec;
struct vhub_snap_writer;

/* What the model asks of one device's front door (the face's object). */
struct vhub_vmm_face_ops {
        /*
         * Relay back-end request m (fds borrowed) to the VMM's back-end
         * channel.  1: sent, the VMM's answer is awaited -- the face calls
         * vhub_device_vmm_relay_answered(token) exactly once, with the VMM's
         * u64 or a failure; 0: sent, nothing comes back; < 0: not relayed (no
         * channel, or the VMM did not negotiate what it needs).
         */
        int (*relay)(void *face, const struct vhu_msg *m, uint64_t token);
        /* The device is being freed: close the socket and the VMM's
         * connection, forget the device.  The model calls nothing after. */
        void (*gone)(void *face);
        /* How many fds the face holds for the device (its socket, the VMM's
         * connection and channel, what they queue): the fd budget counts
         * them as the VM's uid's. */
        unsigned (*fds_held)(const void *face);
        /*
         * A restart of the daemon (docs/restart.md, "Front-door devices"):
         * whether the VMM's session can be carried whole -- nothing
         * half-read, nothing queued to go out, nothing awaited on its
         * channel, and every request of it answered, or in flight and one
         * the face carries to handle again ("A crash with VMM requests in
         * flight") -- and then save writes what the face needs to take it
         * back (its fds by key, what the VMM negotiated with it, those
         * requests) for vhub_vmm_door.adopt.
         */
        bool (*at_rest)(void *face);
        void (*save)(void *face, struct vhub_snap_writer *w);
};

/* The front door, as the composition root registers it. */
struct vhub_vmm_door {
        /*
         * Open d's socket (<vmm-dir>/<uid>/<vm>/<device>.sock, owned by
         * owner) and listen.  On success *ret_face / *ret_ops are the
         * device's front door and *ret_path (malloc'd) what a VMM connects
         * to; on failure err is filled (its contract code) and nothing is
         * left behind.
         */
        int (*open)(void *userdata, struct vhub_device *d, const struct vhub_cred *owner,
                    struct vhub_error *err, void **ret_face, const struct vhub_vmm_face_ops **ret_ops,
                    char **ret_path);
        /*
         * A restart carried d's VMM session: take back the socket, listener,
         * the VMM's connection and channel from the fd-store group f<device
         * id> in r, as rec (what face_ops.save wrote) names them, and go on
         * reading the VMM.  Same returns as open; on failure nothing of the
         * group is kept.
         */
        int (*adopt)(void *userdata, struct vhub_device *d, const struct vhub_cred *owner,
                     struct vhub_fdstore_restore *r, const struct vhub_snap_rec *rec, void **ret_face,
                     const struct vhub_vmm_face_ops **ret_ops, char **ret_path);
        void *userdata;
};

/* door is borrowed (NULL: no front door; device.add vmm_socket answers -32005). */
void vhub_context_set_vmm_door(struct vhub_context *ctx, const struct vhub_vmm_door *door);

/* What the face holds for d changed (its socket, the VMM's connection and
 * channel, what they queue): the fd budget counts d's VM again. */
void vhub_device_vmm_fds_changed(struct vhub_device *d);
/* The VMM's session may be at rest again (every request answered): d's VM
 * is written again, so that a crash can carry the session. */
void vhub_device_vmm_changed(struct vhub_device *d);
/* Write d's VM's snapshot now (the face is about to take bytes from the
 * VMM, and the last one says the session is at rest). */
void vhub_device_vmm_commit_now(struct vhub_device *d);
/* d's VM is written at the turn's commit, and w runs after it
 * (vhub_commit_after(); not queued twice).  false: no snapshots are kept. */
struct vhub_commit_wait;
bool vhub_device_vmm_commit_after(struct vhub_device *d, struct vhub_commit_wait *w);
/* d's VM's snapshot serializations are numbered: the one being written (or
 * last written), and the last whose write succeeded -- the fd store's copy;
 * older than the other when a write failed.  A face told the first as it is
 * asked at_rest() knows whether what it said is what a crash would find. */
uint64_t vhub_device_vmm_snapshot_serial(const struct vhub_device *d);
uint64_t vhub_device_vmm_snapshot_stored(const struct vhub_device *d);
/* A VMM connected to d's socket (a new session): device.vmm_connected. */
void vhub_device_vmm_connected(struct vhub_device *d);
/*
 * The VMM left: device.vmm_disconnected; its requests still queued are
 * dropped (their calls fail), the back-end's rings are stopped, the VMM's
 * memory leaves the back-end, and the session's records go.  The back-end
 * stays connected for the next VMM.
 */
void vhub_device_vmm_disconnected(struct vhub_device *d);
/*
 * One validated request of the VMM.  m's fds are taken (m is left without
 * any).  call->out.vmm_request gets the answer (for a request the VMM waits
 * for; the face ignores it otherwise); call fails only when the device or
 * the session is going.
 */
void vhub_device_vmm_request(struct vhub_device *d, struct vhu_msg *m, struct vhub_call *call);
/* The VMM answered the relayed back-end request token (value: its u64; 1 for none). */
void vhub_device_vmm_relay_answered(struct vhub_device *d, uint64_t token, uint64_t value);

/* What the device offers its VMM: the back-end's own offer, masked. */
uint64_t vhub_device_vmm_protocol_features(const struct vhub_device *d);
/* For the face's log lines, its fd names and fd-store group (the device's
 * id: vhub-fd-track.h), and the socket's owner. */
const char *vhub_device_name(const struct vhub_device *d);
uint64_t vhub_device_id(const struct vhub_device *d);
const char *vhub_device_vm_name(const struct vhub_device *d);
uid_t vhub_device_uid(const struct vhub_device *d);
unsigned vhub_device_backend_timeout_ms(const struct vhub_device *d);
