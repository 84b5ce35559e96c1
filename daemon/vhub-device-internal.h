/* SPDX-License-Identifier: MIT */
/*
 * The device engine's own header: shared by the device's lifecycle, its
 * link, the op engine and the op kinds (vhub-device*.c, vhub-op*.c).
 * Nothing outside the model includes it; a face sees only vhub-device.h.
 */
#pragma once

#include "vhub-commit.h"
#include "vhub-device.h"
#include "vhub-event.h"
#include "vhub-log.h"
#include "vhu-message.h"

struct vhub_backend_listener;
struct vhub_vm;
struct vhub_vmm_request;

enum vhub_op_kind {
        VHUB_OP_HANDSHAKE,
        VHUB_OP_START,
        VHUB_OP_STOP,
        VHUB_OP_CONFIG_GET,
        VHUB_OP_CONFIG_SET,
        VHUB_OP_MEM_SYNC,
        VHUB_OP_REMOVE,
        VHUB_OP_SINGLE,               /* one request, acked: RARP, MTU, ... */
        VHUB_OP_RESET,
        VHUB_OP_LOG,                  /* dirty logging on/off (a VM batch member) */
        VHUB_OP_GET_SHARED,           /* GET_SHARED_OBJECT for another device's lookup */
        VHUB_OP_POSTCOPY,             /* POSTCOPY_ADVISE/LISTEN/END (a VM batch member) */
        VHUB_OP_PASSTHROUGH,          /* one request of a front-door VMM (vhub-op-passthrough.c) */
        VHUB_OP_VMM_RESTORE,          /* a restore replays the VMM's rings (vhub-op-vmm-restore.c) */
        VHUB_OP_VMM_STOP,             /* the VMM left: its rings stopped, its memory gone */
        _VHUB_OP_MAX,
};

struct vhub_op {
        TAILQ_ENTRY(vhub_op) link;
        enum vhub_op_kind kind;
        unsigned stage;
        unsigned awaiting;            /* replies still due in this stage */
        bool last_unconfirmed;        /* a request without a reply ended the stage */
        bool running;
        bool on_wire;                 /* it sent a request: its VM's snapshot said "busy" first */
        /* a VMM's request waits for the turn's commit to say "busy" (op_wait_turn()) */
        struct vhub_commit_wait busy_wait;
        struct vhub_device *busy_dev;
        uint64_t busy_serial;         /* its VM's snapshot serial as it began to wait */
        uint64_t started_usec;        /* CLOCK_MONOTONIC: when it started running */
        bool parked;                  /* waiting for the VM's memory queue */
        bool restore;                 /* part of restoring after a reconnect */
        bool restore_continues;       /* a restore HANDSHAKE with a START or VMM_RESTORE behind it */
        struct vhub_call *call;       /* NULL for internal ops */
        struct vhub_mem_op *mem_op;   /* MEM_SYNC of a VM fan-out */
        int result;                   /* first failure in this op */
        struct vhub_error error;
        bool give_up;                 /* restore: the back-end refuses what it accepted */
        bool holds_handshake_sync;    /* counted in vm->handshake_syncs */
        uint64_t hs_features;         /* handshake: what the back-end offers now */
        uint64_t hs_pf_offer;
        struct vhub_vmm_request *vmm_req;   /* PASSTHROUGH: the VMM's request (owned) */
        struct vhub_event_vring *restored;  /* restore START: per-ring outcome */
        unsigned n_restored;
        bool restore_exact;
        union {
                struct {
                        uint64_t features;
                        unsigned n_vrings;
                        struct vhub_vring *vrings;   /* owned until committed */
                } start;
                struct {
                        bool skip_drain;             /* GET_VRING_BASE_SKIP_DRAIN */
                } stop;
                struct {
                        uint32_t offset, size, flags;
                        uint8_t data[VHU_MAX_CONFIG_SIZE];
                } config;
                struct {
                        /* computed when the op starts, from shadow vs target */
                        struct vhub_region *add;     /* copies; fds borrowed */
                        size_t n_add;
                        uint64_t *remove_ids;
                        struct vhub_region *remove;  /* copies of what the back-end has */
                        size_t n_remove;
                        bool whole_table;            /* SET_MEM_TABLE path */
                        uint64_t *target_ids;
                        size_t n_target;
                } mem;
                struct {
                        struct vhub_vm_batch *batch;
                        bool enable;
                } log;
                struct {
                        uint8_t uuid[16];
                        char requester[VHUB_NAME_MAX + 1];
                        uint64_t token;
                        int fd;                      /* the exporter's answer (owned) */
                } shared;
                struct {
                        uint32_t request;
                        uint64_t u64;                /* what the reply said (per request) */
                        uint8_t *payload;            /* owned; NULL when size is 0 */
                        uint32_t size;
                        int fd;                      /* owned, -1 if none */
                } single;
                struct {
                        struct vhub_vm_batch *batch;
                        enum vhub_postcopy_step step;
                        int ufd;                     /* ADVISE: the back-end's userfaultfd (owned) */
                        struct vhub_region *table;   /* LISTEN: copies of the VM's regions; fds borrowed */
                        size_t n_table;
                        uint64_t *backend_uaddr;     /* LISTEN: where the back-end mapped each */
                } postcopy;
        } u;
};


/* A restore that lasted this long counts as a recovery: the next loss
 * starts the reconnect backoff over from reconnect_ms. */
#define DEVICE_RESTORE_STABLE_USEC (5 * 1000000ull)

/* Reply tags: what a reply belongs to inside the running op. */
#define TAG_KIND(t)       ((t) >> 16)
#define TAG_INDEX(t)      ((t) & 0xffffu)
#define TAG(kind, index)  (((uint32_t)(kind) << 16) | ((uint32_t)(index) & 0xffffu))
enum {
        TAGK_PLAIN = 0,
        TAGK_MEM_ADD,
        TAGK_MEM_REMOVE,
        TAGK_MEM_TABLE,
        TAGK_BARRIER,
        TAGK_VRING,
};

/* Op returns from a stage: wait for replies / park / op complete. */
enum {
        OP_STAGE_NEXT = 0,   /* nothing awaited: go to the next stage */
        OP_STAGE_WAIT = 1,   /* replies awaited (or parked) */
        OP_STAGE_DONE = 2,   /* the op is complete */
};

static inline bool dev_has_pf(const struct vhub_device *d, unsigned bit) {
        return (d->protocol_features & VHU_PF_BIT(bit)) != 0;
}

static inline bool dev_protocol_features_on(const struct vhub_device *d) {
        return (d->features & (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES)) != 0;
}

/*
 * A device.add whose handshake is not decided yet (connected, never
 * handshaken): its VM's snapshot does not follow its steps.  A crash before
 * the answer removes it whatever the last snapshot says of it -- a restore
 * removes a device that never finished its handshake (the call is answered
 * -32011), and closes what a snapshot does not name -- so the VM's document
 * is written once, when the handshake's result is decided (the state
 * change to ready marks it, before the answer is queued), not at the op's
 * start, nor at each fd the handshake adds.  A server-mode device waiting
 * for its back-end is not connected: its listener is written at once (a
 * restore removes its socket file).
 */
static inline bool device_being_added(const struct vhub_device *d) {
        return !d->handshaken && d->conn != NULL;
}

/* What the device changed is written with its VM's snapshot (unless it is
 * being added: above). */
void device_changed(struct vhub_device *d);

/* The device's fds: each joins the device's fd-store group as the device
 * takes it and leaves it before it is closed (vhub-fd-track.h).  fmt names
 * it below "dev/<uid>/<vm>/<device>/". */
#define device_fd_track(d, fd, fmt, ...)                                                        \
        do {                                                                                    \
                vhub_fd_track((d)->vm->ctx, (d)->fd_group, (fd), "dev/%u/%s/%s/" fmt,            \
                              (unsigned)(d)->vm->uid, (d)->vm->name, (d)->name, ##__VA_ARGS__);  \
                device_changed(d);                                                              \
        } while (0)
/* (every fd a device untracks, it closes right after) */
#define device_fd_untrack(d, fd, fmt, ...)                                                      \
        do {                                                                                    \
                vhub_fd_untrack_closing((d)->vm->ctx, (d)->fd_group, (fd), "dev/%u/%s/%s/" fmt,  \
                                (unsigned)(d)->vm->uid, (d)->vm->name, (d)->name, ##__VA_ARGS__); \
                device_changed(d);                                                              \
        } while (0)
#define device_fd_visit(d, v, fd, group, fmt, ...)                                               \
        vhub_fd_visit((v), (fd), (group), "dev/%u/%s/%s/" fmt, (unsigned)(d)->vm->uid,            \
                      (d)->vm->name, (d)->name, ##__VA_ARGS__)

/* vhub-device.c: the device's life (add, remove, free) and what it holds */
/* A line about d (its VM, uid and name), logged as from the caller. */
#define device_log(d, level, request, ...) device_log_at(VHUB_LOG_SITE, (d), (level), (request), __VA_ARGS__)
void device_log_at(struct vhub_log_site site, const struct vhub_device *d, int level, const char *request,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Take the device out of its VM and free it (may free the VM: last). */
void device_destroy(struct vhub_device *d);
/* device.removed, once, for a device whose device.added was emitted. */
void device_announce_removed(struct vhub_device *d);
void shadow_add(struct vhub_device *d, uint64_t id);
void shadow_remove(struct vhub_device *d, uint64_t id);
void shadow_clear(struct vhub_device *d);
void vring_close_fds(struct vhub_vring *v);
unsigned vring_fds_held(const struct vhub_vring *v);
/* d's ring i: its fds leave the device's group and are closed; the ring is
 * not configured any more. */
void device_ring_close(struct vhub_device *d, unsigned i);
/* A START committed: ring src (taken from the op, whose fds are -1 after)
 * becomes d's, its fds in the device's group. */
void device_ring_commit(struct vhub_device *d, struct vhub_vring *src);
/* The inflight memfd the back-end gave (fd taken; -1: none any more); the
 * previous one leaves the group and is closed. */
void device_set_inflight(struct vhub_device *d, int fd);

/* vhub-device-link.c: the link to the back-end and the state machine */
/* The one writer of d->state; does each state's side work (the file's head). */
void device_set_state(struct vhub_device *d, enum vhub_device_state s, const char *why);
/* Connect (client mode) or listen (server mode) for a new device. */
int device_link_start(struct vhub_device *d, struct vhub_error *err);
/* device.remove: no more reconnects. */
void device_link_stop_retrying(struct vhub_device *d);
/* Everything the link holds, freed (vhub_device_free). */
void device_link_done(struct vhub_device *d);
void device_drop_connection(struct vhub_device *d);
/* The link's fds (socket, channel, listener and its directory). */
void device_link_foreach_fd(const struct vhub_device *d, const struct vhub_fd_visitor *v);
/* A restore: the link on the stored connection (sock_fd, chan_fd: -1 for
 * none; taken in every case), and server mode's listener back on its
 * socket (listen_fd taken; l taken).  Nothing is sent. */
/* After a restore that gave a server-mode device no listener: its socket
 * made again from the loop (tried until the back-end deadline). */
void device_link_relisten(struct vhub_device *d);
/* A restored device making its socket again (a server-mode back-end's, a
 * front door's): the earlier run's listener, out of the store's group, may
 * be held by the manager a moment yet (FDSTOREREMOVE is asynchronous), so a
 * name "in use" is tried again every DEVICE_NAME_RETRY_MS until the
 * back-end deadline, which this returns (from now). */
#define DEVICE_NAME_RETRY_MS 50
uint64_t device_name_retry_until(const struct vhub_device *d);
int device_link_restore(struct vhub_device *d, int sock_fd, int chan_fd, int listen_fd,
                        struct vhub_backend_listener *l);
/* A restored outage goes on: its socket watched, the next attempt in left_ms. */
void device_link_resume_outage(struct vhub_device *d, unsigned left_ms);
/* Declare the back-end lost now (reported from the loop). */
void device_mark_lost(struct vhub_device *d, const char *reason);
/* The same for a back-end that did nothing wrong but needs a new
 * connection (a front-door device whose VMM left): restored at once, not
 * after the backoff of earlier losses. */
void device_renew_link(struct vhub_device *d, const char *reason);
/* A restore op succeeded: back to the state before the loss. */
void device_restored(struct vhub_device *d, const struct vhub_event_vring *vrings, unsigned n,
                     bool exact);
/* The back-end came back but refuses what it accepted before. */
void device_give_up(struct vhub_device *d, const char *reason);
/* Just disconnected: fails the device now if no reconnect can bring it
 * back (reconnect_ms 0, running rings that cannot be restarted). */
void device_give_up_if_lost(struct vhub_device *d);

/* vhub-device-channel.c: what the back-end's requests do */
/* The back-end channel on the daemon's end of the socketpair (fd taken). */
int device_channel_open(struct vhub_device *d, int fd);
/* The channel goes (a loss, a new handshake): its fd leaves the group. */
void device_channel_close(struct vhub_device *d);
/* A request of the back-end waits for the VMM's device.backend_reply: its
 * token and header (what a planned restart carries). */
bool device_channel_owner_wait(const struct vhub_device *d, uint64_t *token, struct vhu_header *hdr);
/* ... and the next process waits for that reply again (full deadline). */
void device_channel_restore_owner_wait(struct vhub_device *d, uint64_t token, const struct vhu_header *hdr);
/* The exporter answered a lookup d's back-end waits for (fd < 0: failed); fd taken. */
void device_shared_lookup_done(struct vhub_device *d, uint64_t token, int fd);

/* vhub-op-engine.c: the op queue */
void device_queue_op(struct vhub_device *d, struct vhub_op *op);
void device_run_head(struct vhub_device *d);
int device_send(struct vhub_device *d, struct vhub_op *op, struct vhu_msg *m, uint32_t tag);
/* A reply is awaited whatever m's flags say (vhub_bconn_send_awaiting). */
int device_send_awaiting(struct vhub_device *d, struct vhub_op *op, struct vhu_msg *m, uint32_t tag);
bool device_need_reply(const struct vhub_device *d);
int device_op_error(struct vhub_op *op, int code, const char *request, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));
/* The connection's replies (vhub_bconn_ops.on_reply). */
void device_on_reply(void *userdata, uint32_t request, uint32_t tag, struct vhu_msg *reply);
/* Fail every op but REMOVE with err; ops keep their order. */
void device_fail_ops(struct vhub_device *d, const struct vhub_error *err);
/* The back-end is gone while the device is being added or removed: no
 * restore; the device goes (or its removal finishes). */
void device_ops_lost_for_good(struct vhub_device *d, const struct vhub_error *err);


/* A front-end request's name, for logs and errors. */
#define REQ(r) vhu_request_name(VHU_DIR_FRONTEND, (r))

/* vhub-op-rings.c: a ring's SET_VRING_ADDR (user addresses of its parts,
 * each inside one region); -ERANGE if a part lies outside the VM's memory.
 * With VIRTIO_F_IOMMU_PLATFORM in features the addresses are I/O virtual
 * addresses the back-end translates through its IOTLB: sent as given; with
 * RING_PACKED "avail"/"used" are the 4-byte event suppression areas. */
int vring_addr(const struct vhub_vm *vm, uint64_t features, uint32_t index, uint32_t size, uint64_t desc,
               uint64_t avail, uint64_t used, struct vhu_vring_addr *ret);

static inline bool features_iommu(uint64_t features) {
        return (features & (UINT64_C(1) << VHU_VIRTIO_F_ACCESS_PLATFORM)) != 0;
}

static inline bool features_packed(uint64_t features) {
        return (features & (UINT64_C(1) << VHU_VIRTIO_F_RING_PACKED)) != 0;
}

/*
 * vhub-op-rings.c: whether d's rings, as the driver acked them, can be
 * restarted after a loss at a position read from guest memory.  Not behind
 * an IOMMU (the addresses are IOVAs the daemon cannot resolve), nor packed
 * (spec "Vring descriptor indices for packed virtqueues": the position is
 * an index and a wrap counter the back-end keeps to itself; guest memory
 * holds descriptors flagged by wrap counters and event suppression areas,
 * no index).  false with why (the device.failed reason) filled.
 */
bool rings_restorable(const struct vhub_device *d, char *why, size_t len);

/* vhub-op-rings.c: adds 1 to one of ring index's eventfds (what: "kick",
 * "call", "err") without ever blocking.  A full counter (-EAGAIN) means the
 * eventfd is signalled already and its VMM does not read it: the VMM's
 * business, counted and logged rate-limited, like any other failure. */
int vring_signal(struct vhub_device *d, unsigned index, int fd, const char *what);

/* vhub-op.c: what an op is -- the table of kinds, making and freeing ops,
 * and the gate every model call on a device passes. */

/* A device state as a bit of an op kind's allowed set. */
#define DEV_STATE_BIT(s) (1u << (s))

/* A new op of kind, holding call (NULL for one the model queues itself);
 * a call on a device gets its op from device_submit() instead. */
struct vhub_op *op_new(enum vhub_op_kind kind, struct vhub_call *call);
/* Frees op and everything it still owns (the kind's free hook). */
void op_free(struct vhub_op *op);
/* fds op owns until it commits (the fd budget counts them). */
unsigned op_fds_held(const struct vhub_op *op);
/* Those fds, for d's inventory (not stored: an op in flight at a restart
 * is lost with them). */
void op_foreach_fd(const struct vhub_device *d, const struct vhub_op *op, const struct vhub_fd_visitor *v);
/*
 * Every model call on a device starts here: the device must not be being
 * removed (-32002), nor be in an outage (-32006 at once: nothing waits
 * behind a restore), and must be in a state op kind allows (-32004).
 * Returns the new op holding call, which the caller fills (what it takes
 * goes into the op at once, so op_free() releases it on every path) and
 * queues with device_queue_op() or refuses with op_refuse(); NULL when the
 * call has been failed.
 */
struct vhub_op *device_submit(struct vhub_device *d, enum vhub_op_kind kind, struct vhub_call *call);
/* A submitted op's own checks failed: fail its call with err, free it. */
void op_refuse(struct vhub_op *op, const struct vhub_error *err);
/* The same with a new error: code and a sentence. */
void op_refusef(struct vhub_op *op, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void op_check_ack(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                  const struct vhu_msg *reply);
void op_complete_call(struct vhub_device *d, struct vhub_op *op, int r);
/* A restore's record of its rings, empty, room for every ring; exact until
 * a ring says otherwise.  0, or op->result with its error set (out of memory). */
int op_restored_begin(const struct vhub_device *d, struct vhub_op *op);
/*
 * A restore rebased ring index to used_idx: appended to op->restored (which
 * has room for every ring) for device.reconnected.  Its outstanding requests
 * are those counted at the loss if they were read then (the driver may have
 * queued more since, which the restart picks up anyway), else avail_idx -
 * used_idx now; more than one without inflight tracking or IN_ORDER
 * (tracked false) makes the restore inexact.
 */
void op_restored_ring(struct vhub_op *op, uint32_t index, uint16_t used_idx, uint16_t avail_idx, bool loss_read,
                      uint16_t loss_avail, uint16_t loss_used, bool tracked);
/* A restore op failed: the device gives up, or the back-end (still
 * connected) is dropped and the next attempt comes with the backoff. */
void device_restore_failed(struct vhub_device *d, const struct vhub_op *op);

/* The op kinds (vhub-op-*.c): stage, reply, completion. */
int mem_sync_prepare(struct vhub_device *d, struct vhub_op *op);
int mem_sync_send(struct vhub_device *d, struct vhub_op *op);
void mem_sync_commit_unacked(struct vhub_device *d, struct vhub_op *op);
#define OP_KIND_FUNCS(kind)                                                                      \
        int kind##_stage(struct vhub_device *d, struct vhub_op *op);                             \
        void kind##_complete(struct vhub_device *d, struct vhub_op *op, int r)
#define OP_KIND_REPLY(kind)                                                                      \
        void kind##_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request,        \
                             uint32_t tag, struct vhu_msg *reply)
OP_KIND_FUNCS(handshake);
OP_KIND_REPLY(handshake);
OP_KIND_FUNCS(start);
OP_KIND_REPLY(start);
OP_KIND_FUNCS(stop);
OP_KIND_REPLY(stop);
OP_KIND_FUNCS(remove);
OP_KIND_FUNCS(reset);
OP_KIND_FUNCS(log);
OP_KIND_FUNCS(mem_sync);
OP_KIND_REPLY(mem_sync);
OP_KIND_REPLY(config);
int config_stage(struct vhub_device *d, struct vhub_op *op);
void config_get_complete(struct vhub_device *d, struct vhub_op *op, int r);
OP_KIND_FUNCS(single);
OP_KIND_REPLY(single);
OP_KIND_FUNCS(get_shared);
OP_KIND_REPLY(get_shared);
OP_KIND_FUNCS(postcopy);
OP_KIND_REPLY(postcopy);
OP_KIND_FUNCS(passthrough);
OP_KIND_REPLY(passthrough);
OP_KIND_FUNCS(vmm_restore);
OP_KIND_REPLY(vmm_restore);
OP_KIND_FUNCS(vmm_stop);
OP_KIND_REPLY(vmm_stop);

/* The op kinds' own functions that free what an op holds (vhub-op-*.c). */
void start_free(struct vhub_op *op);
unsigned start_fds(const struct vhub_op *op);
void start_foreach_fd(const struct vhub_device *d, const struct vhub_op *op, const struct vhub_fd_visitor *v);
void mem_sync_free(struct vhub_op *op);
void single_free(struct vhub_op *op);
void postcopy_free(struct vhub_op *op);
void passthrough_free(struct vhub_op *op);
unsigned passthrough_fds(const struct vhub_op *op);
void passthrough_foreach_fd(const struct vhub_device *d, const struct vhub_op *op,
                            const struct vhub_fd_visitor *v);
/* A loss took the back-end while op waited or ran: true if it stays queued
 * (reset, to run again after the restore), false if it is done with. */
bool passthrough_requeue(struct vhub_device *d, struct vhub_op *op);
/* A VMM's request the daemon answers itself (GET_FEATURES...): nothing of
 * it goes to the back-end or changes the model. */
bool passthrough_is_own(const struct vhub_op *op);

/* the dispatch (vhub-op.c) */
int op_stage_send(struct vhub_device *d, struct vhub_op *op);
void op_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                 struct vhu_msg *reply);
const char *vhub_op_kind_to_string(enum vhub_op_kind kind);
/* The op has ended (r < 0: failed); commit or undo its effects. */
void op_complete(struct vhub_device *d, struct vhub_op *op, int r);
