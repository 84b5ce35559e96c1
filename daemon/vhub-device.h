/* SPDX-License-Identifier: MIT */
/*
 * A device: one back-end connection driven by a non-blocking state machine.
 *
 * Public states (the contract's device.list "state") are in
 * enum vhub_device_state.  Work on a device is a FIFO of operations
 * (struct vhub_op, private to the engine); one runs at a time, in stages; each stage queues its
 * vhost-user requests at once (pipelined) and the next stage starts when
 * every awaited reply has arrived.  Every awaited reply has a deadline
 * (--backend-timeout-ms).  All of it lives in the device and its ops --
 * nothing is held in closures or stack frames across the event loop.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

#include "vhub-call.h"
#include "vhub-config.h"
#include "vhub-cred.h"
#include "vhub-error.h"
#include "vhub-event.h"
#include "vhub-hash.h"
#include "vhub-fd-track.h"
#include "vhub-log.h"
#include "vhub-memory.h"
#include "vhub-owner.h"

struct event;
struct vhub_bconn;
struct vhub_backend_channel;
struct vhub_device_vmm;
struct vhub_socket_watch;
struct vhub_mem_op;
struct vhub_vm;
struct vhub_vm_batch;

/* The protocol features the daemon implements as a front-end: what every
 * handshake ANDs with the back-end's offer, and daemon.info's protocol_features. */
#define VHUB_SUPPORTED_PROTOCOL_FEATURES                                            \
        (VHU_PF_BIT(VHU_PF_MQ) | VHU_PF_BIT(VHU_PF_LOG_SHMFD) | VHU_PF_BIT(VHU_PF_RARP) | \
         VHU_PF_BIT(VHU_PF_REPLY_ACK) | VHU_PF_BIT(VHU_PF_NET_MTU) |                  \
         VHU_PF_BIT(VHU_PF_BACKEND_REQ) | VHU_PF_BIT(VHU_PF_CONFIG) |                 \
         VHU_PF_BIT(VHU_PF_BACKEND_SEND_FD) | VHU_PF_BIT(VHU_PF_HOST_NOTIFIER) |      \
         VHU_PF_BIT(VHU_PF_INFLIGHT_SHMFD) | VHU_PF_BIT(VHU_PF_RESET_DEVICE) |        \
         VHU_PF_BIT(VHU_PF_INBAND_NOTIFICATIONS) |                                    \
         VHU_PF_BIT(VHU_PF_CONFIGURE_MEM_SLOTS) | VHU_PF_BIT(VHU_PF_STATUS) |         \
         VHU_PF_BIT(VHU_PF_SHARED_OBJECT) | VHU_PF_BIT(VHU_PF_DEVICE_STATE) |         \
         VHU_PF_BIT(VHU_PF_CROSS_ENDIAN) | VHU_PF_BIT(VHU_PF_GET_VRING_BASE_INFLIGHT) | \
         VHU_PF_BIT(VHU_PF_SHMEM) | VHU_PF_BIT(VHU_PF_GET_VRING_BASE_SKIP_DRAIN) |     \
         VHU_PF_BIT(VHU_PF_CRYPTO_SESSION) | VHU_PF_BIT(VHU_PF_PAGEFAULT))
/* Never GPA_ADDRESSES (21): the daemon sends user addresses, and rust-vmm
 * vhost <= 0.16 back-ends set bit 21 meaning SHMEM. */
_Static_assert(!(VHUB_SUPPORTED_PROTOCOL_FEATURES & VHU_PF_BIT(VHU_PF_GPA_ADDRESSES)),
               "bit 21 is never acked");

/* The device state machine: vhub-device-link.c, docs/architecture.md. */
enum vhub_device_state {
        VHUB_DEV_CONNECTING,          /* the first handshake (device.add) */
        VHUB_DEV_READY,
        VHUB_DEV_RUNNING,
        VHUB_DEV_STOPPED,
        VHUB_DEV_DISCONNECTED,        /* an outage: waiting to reconnect */
        VHUB_DEV_RESTORING,           /* an outage: connected, restoring ("connecting") */
        VHUB_DEV_FAILED,
        _VHUB_DEV_STATE_MAX,
};

/* The contract's name (device.list "state"): restoring is "connecting". */
const char *vhub_device_state_to_string(enum vhub_device_state s);

enum vhub_device_mode {
        VHUB_DEV_MODE_CLIENT,
        VHUB_DEV_MODE_SERVER,
};

/* One vring as the VMM configured it in device.start. */
struct vhub_vring {
        bool configured;
        uint32_t index;
        uint32_t size;
        uint64_t desc, avail, used;   /* guest-physical */
        uint32_t base;                /* next avail index at start */
        int kick_fd, call_fd, err_fd; /* owned; -1 if none */
        uint16_t loss_avail, loss_used; /* read from guest memory when the back-end was lost */
        bool loss_read;
};

enum vhub_postcopy_step {
        VHUB_POSTCOPY_ADVISE,
        VHUB_POSTCOPY_LISTEN,
        VHUB_POSTCOPY_END,
};

/* Control-plane counters since the device was added (device.stats). */
struct vhub_device_stats {
        uint64_t requests;            /* front-end requests sent to its back-ends */
        uint64_t replies;             /* replies received from them */
        uint64_t timeouts;            /* replies that missed --backend-timeout-ms */
        uint64_t losses;              /* outages: back-end lost while up */
        uint64_t backend_requests;    /* requests read on the back-end channel */
        uint64_t eventfd_skipped;     /* VMM eventfds not signalled (counter full, or broken) */
        uint64_t handshake_usec;      /* the last successful handshake's duration */
        uint64_t restore_usec;        /* the last restore's: loss to device.reconnected */
        bool restored;                /* restore_usec is set */
        bool lost;                    /* last_loss_* are set */
        uint64_t last_loss_realtime_usec; /* CLOCK_REALTIME: device.disconnected's timestamp */
        char last_loss_reason[160];
        uint64_t state_since_usec;    /* CLOCK_MONOTONIC: when it entered its state */
};

/* The device's FIFO of operations; struct vhub_op is the engine's own
 * (vhub-device-internal.h). */
struct vhub_op;
TAILQ_HEAD(vhub_op_list, vhub_op);

struct vhub_device {
        TAILQ_ENTRY(vhub_device) link;
        struct vhub_hash_node by_name;  /* in vm->devices_by_name */
        struct vhub_vm *vm;
        uint64_t id;                  /* daemon-unique, never reused */
        char fd_group[VHUB_FD_GROUP_MAX]; /* the fd-store group of every fd it keeps: its VM's
                                           * ("v<vm id>") from its device.add, "d<id>" once a
                                           * planned stop moved it (vhub_devices_own_groups()) */
        char name[VHUB_NAME_MAX + 1];
        char *socket_path;
        char type[32];
        enum vhub_device_mode mode;
        enum vhub_face face;          /* who drives it: only recorded, for the faces */
        struct vhub_cred cred;        /* whose rights its back-end paths are used with:
                                       * its adder's (vhub_device_add_params.cred) */
        unsigned reconnect_ms;
        unsigned requested_queues;    /* 0: what the back-end reports */

        enum vhub_device_state state;
        enum vhub_device_state state_before_loss;
        bool removing;
        bool destroy_pending;         /* set by an op that ends the device */

        struct vhub_bconn *conn;
        int listen_fd;                /* server mode: our listening socket */
        struct vhub_backend_listener *listener; /* server mode: its name, removed with it */
        struct event *ev_listen;
        struct event *ev_reconnect;   /* also the first-accept deadline in server mode */
        unsigned reconnect_delay_ms;
        uint64_t reconnect_deadline_usec; /* CLOCK_MONOTONIC: the next attempt, while armed */
        unsigned reconnect_fast;      /* quick retries after the socket reappeared */
        struct vhub_socket_watch *watch; /* its socket, watched during an outage (client mode) */
        unsigned reconnects;          /* successful restores */
        struct vhub_device_stats stats;
        bool removed_announced;       /* device.removed was emitted */
        uint64_t restored_usec;       /* when the last restore finished */
        uint64_t outage_usec;         /* when the current outage began */
        unsigned outage_failures;     /* restore attempts failed in it */
        struct vhub_log_ratelimit reconnect_log;

        /* negotiated */
        bool handshaken;              /* the first handshake succeeded */
        uint64_t features;            /* what the back-end offered */
        uint64_t protocol_features;   /* offer & daemon's */
        uint64_t acked_features;      /* the driver's, from device.start */
        unsigned backend_queue_num;   /* GET_QUEUE_NUM, 0 if not asked */
        unsigned queues;
        unsigned max_mem_slots;

        struct vhub_vring *vrings;    /* [queues] */
        uint64_t *shmem_sizes;        /* GET_SHMEM_CONFIG, by shmid; NULL without SHMEM */
        unsigned n_shmem;
        int inflight_fd;              /* kept across back-end restarts */
        uint64_t inflight_size;
        uint16_t inflight_queue_size;

        uint64_t *shadow;             /* region ids the back-end has mapped */
        size_t n_shadow, cap_shadow;
        bool mem_synced;              /* the handshake's memory sync finished */

        struct vhub_backend_channel *channel;
        /* the VMM's kick/call/err eventfds that could not be signalled */
        struct vhub_log_ratelimit eventfd_failures;

        struct vhub_op_list ops;
        unsigned n_ops;

        /* a restore, until vhub_device_restore_finish() */
        bool restore_lost;            /* a request was in flight: lost now */
        bool restore_reconnect_armed;
        uint64_t restore_reconnect_left_ms;
        bool restore_relisten;        /* server mode, no listener came back whole */
        uint64_t relisten_until_usec; /* then its socket is made again, tried until this
                                       * (CLOCK_MONOTONIC; 0: not trying) */

        /* a front-door device: its VMM's session (vhub-device-vmm.h); NULL otherwise */
        struct vhub_device_vmm *vmm;
};

struct vhub_device_add_params {
        const char *name;
        const char *socket_path;
        const char *type;             /* may be NULL */
        enum vhub_device_mode mode;
        enum vhub_face face;          /* the face that adds it drives it */
        unsigned queues;              /* 0: default */
        unsigned reconnect_ms;
        bool vmm_socket;              /* a front-door device: the front door drives it */
        /* Whose rights its back-end paths are used with, for its whole life
         * (connect, reconnects, bind, watch, removal): the peer that asks
         * for it -- the VM's own uid, or root naming another uid's VM.
         * Copied; NULL: the VM's (its creator's). */
        const struct vhub_cred *cred;
};

/* Creates the device in the VM and starts connecting; call completes after
 * the handshake with call->out.device_add, or fails (the device is gone). */
void vhub_device_add(struct vhub_vm *vm, const struct vhub_device_add_params *p,
                     struct vhub_call *call);
/* Stops a running device, cancels reconnects, frees it; call may be NULL. */
void vhub_device_remove(struct vhub_device *dev, struct vhub_call *call);
/* Frees at once (VM teardown of last resort / shutdown). */
void vhub_device_free(struct vhub_device *dev);

struct vhub_vring_params {
        uint32_t index, size;
        uint64_t desc, avail, used;
        uint32_t base;                /* split: <= 0xffff; packed: both indexes and wrap counters */
        bool base_given;              /* absent: index 0 (a packed ring's at its initial wrap counters) */
        int kick_fd, call_fd, err_fd; /* taken by vhub_device_start in every case; kick
                                       * may be -1 with INBAND_NOTIFICATIONS */
};

void vhub_device_start(struct vhub_device *dev, uint64_t features,
                       struct vhub_vring_params *vrings, unsigned n_vrings,
                       struct vhub_call *call);
/* drain false: GET_VRING_BASE_SKIP_DRAIN (in-flight requests are suspended
 * into the inflight region and completed after the next start). */
void vhub_device_stop(struct vhub_device *dev, bool drain, struct vhub_call *call);
/* VRING_KICK: an in-band kick of a running ring (INBAND_NOTIFICATIONS). */
void vhub_device_kick(struct vhub_device *dev, uint32_t index, struct vhub_call *call);
void vhub_device_config_get(struct vhub_device *dev, uint32_t offset, uint32_t size,
                            struct vhub_call *call);
void vhub_device_config_set(struct vhub_device *dev, uint32_t offset, const void *data,
                            uint32_t size, struct vhub_call *call);

void vhub_device_reset(struct vhub_device *dev, struct vhub_call *call);
void vhub_device_send_rarp(struct vhub_device *dev, const uint8_t mac[6], struct vhub_call *call);
void vhub_device_set_mtu(struct vhub_device *dev, uint16_t mtu, struct vhub_call *call);
/* SET_DEVICE_STATE_FD; fd taken.  call->out.state_fd.fd: the back-end's own fd, if any. */
void vhub_device_state_fd(struct vhub_device *dev, bool load, int fd, struct vhub_call *call);
void vhub_device_check_state(struct vhub_device *dev, struct vhub_call *call);
/* Answer a forwarded back-end request: 0, or -ENOENT for an unknown/expired token. */
int vhub_device_backend_reply(struct vhub_device *dev, uint64_t token, uint64_t result);
/* The back-end channel has a request to finish (a planned restart waits). */
bool vhub_device_channel_busy(const struct vhub_device *dev);
int vhub_device_queue_log(struct vhub_device *dev, struct vhub_vm_batch *batch, bool enable);
/* Ask this (exporting) device for a shared object on behalf of requester. */
int vhub_device_queue_get_shared(struct vhub_device *dev, const uint8_t uuid[16],
                                 const char *requester, uint64_t token);

/* CREATE_CRYPTO_SESSION: call->out.crypto_session.session_id on success. */
void vhub_device_crypto_create(struct vhub_device *dev, const struct vhu_crypto_session *s,
                               struct vhub_call *call);
void vhub_device_crypto_close(struct vhub_device *dev, uint64_t session_id, struct vhub_call *call);
/* GPU_SET_SOCKET; fd (the back-end's end of the VMM's socketpair) taken in every case. */
void vhub_device_gpu_set_socket(struct vhub_device *dev, int fd, struct vhub_call *call);
/* IOTLB_MSG, type update or invalidate. */
void vhub_device_iotlb(struct vhub_device *dev, const struct vhu_iotlb *msg, struct vhub_call *call);
/* One postcopy step on this device (a VM batch member). */
int vhub_device_queue_postcopy(struct vhub_device *dev, struct vhub_vm_batch *batch,
                               enum vhub_postcopy_step step);

/* Begin a memory sync (a VM fan-out member).  Returns 0 if queued. */
int vhub_device_queue_mem_sync(struct vhub_device *dev, struct vhub_mem_op *mem_op);
/* The VM's memory queue became free: resume a parked handshake.  The op may
 * end, and with it the device (a failed device.add). */
void vhub_device_resume_parked(struct vhub_device *dev);
bool vhub_device_is_parked(const struct vhub_device *dev);
/* Give up on the device now: FAILED, connection closed, event device.failed. */
void vhub_device_fail_now(struct vhub_device *dev, const char *reason);
/* A device being removed is gone for the faces (-32002). */
bool vhub_device_is_removing(const struct vhub_device *dev);
bool vhub_device_shadow_has(const struct vhub_device *dev, uint64_t region_id);
/* Whether the back-end has mapped exactly the regions of t. */
bool vhub_device_shadow_is(const struct vhub_device *dev, const struct vhub_mem_table *t);
bool vhub_device_is_connected(const struct vhub_device *dev);
/* The fds the device holds, its ops' and the dups of the messages queued
 * toward its back-end included (the fd budget counts them). */
unsigned vhub_device_fds_held(const struct vhub_device *dev);
/* What the device holds changed outside the model's own calls (a writer's
 * queued dups went out, a front door's connection received fds): the fd
 * budget counts its VM again.  dev is a struct vhub_device *, void for use
 * as a leaf's hook. */
void vhub_device_fds_changed(void *dev);
/* Every fd the device holds, named "dev/<uid>/<vm>/<device>/...": in its
 * group the back-end socket ("sock"), channel ("chan"), server-mode
 * listener ("listen") and its directory ("dirfd"), inflight memfd
 * ("inflight") and ring eventfds ("ring<i>.kick|call|err"); without a
 * group what it holds for a moment (its ops' fds, the transports' dups). */
void vhub_device_foreach_fd(const struct vhub_device *dev, const struct vhub_fd_visitor *v);
/* Whether any configured ring of a running device lies in [gpa, gpa+size). */
bool vhub_device_rings_in(const struct vhub_device *dev, uint64_t gpa, uint64_t size);
