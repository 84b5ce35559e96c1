/* SPDX-License-Identifier: MIT */
/*
 * Private to frontdoor/vhub-vmm-device*.c: the front-door device's object,
 * its calls, and the functions its files share (vhub-vmm-device.c says
 * which file holds what).
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

#include <event2/util.h>

#include "vhub-commit.h"
#include "vhub-fd-claim.h"
#include "vhub-log.h"
#include "vhub-vmm-device.h"
#include "vhu-message.h"

struct vhub_snap_writer;
struct vhub_vmm_channel;
struct vhub_vmm_conn;

/* "vmm/<uid>/<vm>/<device>": VM and device names are at most 64 characters. */
#define FD_NAME_PREFIX_MAX 160

/* Back-end requests relayed to the VMM and awaiting its answer. */
#define RELAY_MAX 16
/*
 * How long a session stays at rest before a snapshot says so.  Leaving rest
 * costs a VM snapshot write at once (vd_leave_rest()), coming back another:
 * a VMM answered one tiny request at a time had two written per request
 * (tests/bench/bench_trickle.py vmm: ~2 per GET_FEATURES, other VMs'
 * device.list 7 times slower).  Once it waits this long, a VMM that keeps
 * sending costs neither while it does, one that pauses between requests
 * two per pause; a crash within it falls back, as when not at rest.
 */
#define REST_SETTLE_USEC 20000
/*
 * Requests in flight a crash may carry (docs/restart.md, "A crash with VMM
 * requests in flight"): QEMU's device stop has its rings' SET_VRING_ENABLEs
 * and the first GET_VRING_BASE in flight at once.
 */
#define CARRY_MAX 8

struct vmm_call;
TAILQ_HEAD(vmm_call_list, vmm_call);

struct vhub_vmm_device {
        TAILQ_ENTRY(vhub_vmm_device) link;
        struct vhub_vmm_device_list *list;
        struct vhub_context *ctx;
        struct event_base *base;
        struct vhub_device *dev;
        char fd_group[VHUB_FD_GROUP_MAX];      /* f<device id> */
        char fd_prefix[FD_NAME_PREFIX_MAX];    /* the names' start: kept, the device may go first */
        struct vhub_vmm_device_limits limits;
        struct vhub_vmm_socket *sock;
        struct vhub_vmm_listener *listener;
        struct vhub_vmm_conn *conn;
        struct vhub_vmm_channel *channel;
        uint64_t session;             /* one per VMM connection */
        struct vmm_call_list calls;   /* requests the model has not answered */
        unsigned n_calls;
        unsigned n_carried;           /* of them, those a snapshot may carry (each call's copy) */
        unsigned n_owed;              /* of them, those owing the VMM an answer */
        uint64_t call_seq;            /* the last call's */
        uint64_t saved_seq;           /* the last call the last snapshot written knew of */
        struct vhu_msg *redo[CARRY_MAX];    /* adopted: carried requests, handled again from the loop */
        unsigned n_redo;
        struct event *ev_redo;
        bool paused;                  /* reading paused: too many requests in the model */
        bool frozen;                  /* reading stopped for good: a planned restart */
        uint64_t relay_tokens[RELAY_MAX];   /* awaited on the channel, in order */
        unsigned relay_head, relay_count;
        uint32_t relay_tag;
        unsigned busy;                /* inside a callback: gone() defers the free */
        bool dead;                    /* the model let go of it */
        bool rest_saved;              /* the last snapshot serialized carries the session */
        uint64_t rest_serial;         /* that one's serial (vhub_device_vmm_snapshot_serial()) */
        bool rest_older;              /* the fd store's copy before it carries the session */
        bool leaving_rest;            /* a snapshot saying it is not at rest is being written */
        struct event *ev_rest;        /* pending: at rest for less than REST_SETTLE_USEC */
        /* the turn's commit (vhub-commit.h): answers held until it dropped
         * their requests, a request it carries to log */
        struct vhub_commit_wait turn_wait;
        unsigned n_held;              /* of the calls, those answered by the model, held */
        uint64_t logged_seq;          /* the last call logged carried in flight */
};

struct vmm_call {
        struct vhub_call call;        /* completed by the model */
        TAILQ_ENTRY(vmm_call) link;
        struct vhub_vmm_device *vd;   /* NULL once the device went */
        uint64_t session;
        uint64_t answer_id;           /* 0: the VMM waits for nothing */
        uint32_t request;
        uint64_t seq;
        struct vhu_msg *carried;      /* the request as read (no fds): a crash may carry it */
        bool held;                    /* answered by the model: goes out after the turn's commit */
};

#define vd_log(vd, level, request, ...)                                                          \
        vhub_log_full((level), vhub_device_vm_name((vd)->dev), vhub_device_name((vd)->dev), (request), \
                      __VA_ARGS__)
#define REQ(r) vhu_request_name(VHU_DIR_FRONTEND, (r))

/* vhub-vmm-device.c: its life and fds */
void vd_fds_changed(void *userdata);
void vd_fd_note(const struct vhub_vmm_device *vd, bool kept, int fd, const char *what);
void vd_socket_fd_track(int fd, const char *what, void *userdata);
struct vhub_vmm_channel *vd_channel_free(struct vhub_vmm_device *vd);
struct vhub_vmm_conn *vd_conn_free(struct vhub_vmm_device *vd);
int vd_claimed_close(struct vhub_vmm_device *vd, int fd, const char *what);
void vd_claimed_gone(struct vhub_vmm_device *vd, int fd, const char *what);
struct vhub_vmm_socket *vd_socket_remove(struct vhub_vmm_device *vd);
void vd_enter(struct vhub_vmm_device *vd);
bool vd_leave(struct vhub_vmm_device *vd);
void vd_settle(struct vhub_vmm_device *vd);
bool vd_rest_stored(const struct vhub_vmm_device *vd);
bool vd_leave_rest(struct vhub_vmm_device *vd);
void vd_redo_drop(struct vhub_vmm_device *vd);
extern const struct vhub_vmm_listener_ops vd_listener_ops;
void vd_free(struct vhub_vmm_device *vd);
extern const struct vhub_vmm_face_ops vd_face_ops;
struct vhub_vmm_device *vd_alloc(struct vhub_context *ctx, struct vhub_device *dev,
                                 const struct vhub_vmm_device_limits *limits);

/* vhub-vmm-device-relay.c: the VMM's back-end channel */
void vd_relay_fail_all(struct vhub_vmm_device *vd);
extern const struct vhub_vmm_channel_ops vd_channel_ops;
int vd_relay(void *face, const struct vhu_msg *m, uint64_t token);
int vd_channel_open(struct vhub_vmm_device *vd, struct vhu_msg *m);

/* vhub-vmm-device-requests.c: the VMM's requests */
void vd_calls_let_go(struct vhub_vmm_device *vd);
void vd_turn_committed(struct vhub_commit_wait *w);
void vd_end_session(struct vhub_vmm_device *vd);
extern const struct vhub_vmm_conn_ops vd_conn_ops;
void vd_redo_cb(evutil_socket_t fd, short what, void *userdata);

/* vhub-vmm-device-carry.c: a restart carries the session */
bool vd_request_carriable(const struct vhu_msg *m);
bool vd_carriable(const struct vhub_vmm_device *vd);
bool vd_at_rest(void *face);
void vd_save(void *face, struct vhub_snap_writer *w);
