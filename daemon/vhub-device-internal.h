/* SPDX-License-Identifier: MIT */
/* Shared between the device's lifecycle code and its operations. */
#pragma once

#include "vhub-device.h"
#include "vhub-event.h"
#include "vhu-message.h"

struct vhub_vm;

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

/* vhub-device.c */
struct vhub_op *device_op_new(enum vhub_op_kind kind, struct vhub_call *call);
void device_queue_op(struct vhub_device *d, struct vhub_op *op);
int device_send(struct vhub_device *d, struct vhub_op *op, struct vhu_msg *m, uint32_t tag);
/* A reply is awaited whatever m's flags say (vhub_bconn_send_awaiting). */
int device_send_awaiting(struct vhub_device *d, struct vhub_op *op, struct vhu_msg *m, uint32_t tag);
bool device_need_reply(const struct vhub_device *d);
void device_set_state(struct vhub_device *d, enum vhub_device_state s);
void device_mark_lost(struct vhub_device *d, const char *reason);
int device_op_error(struct vhub_op *op, int code, const char *request, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));
/* A line about d (its VM, uid and name), logged as from the caller. */
#define device_log(d, level, request, ...) device_log_at(VHUB_LOG_SITE, (d), (level), (request), __VA_ARGS__)
void device_log_at(struct vhub_log_site site, const struct vhub_device *d, int level, const char *request,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
int device_open_backend_channel(struct vhub_device *d, int *ret_backend_end);
void shadow_add(struct vhub_device *d, uint64_t id);
void shadow_remove(struct vhub_device *d, uint64_t id);
void shadow_clear(struct vhub_device *d);
void vring_close_fds(struct vhub_vring *v);
void device_restored(struct vhub_device *d, const struct vhub_event_vring *vrings, unsigned n,
                     bool exact);
void device_give_up(struct vhub_device *d, const char *reason);


/* A front-end request's name, for logs and errors. */
#define REQ(r) vhu_request_name(VHU_DIR_FRONTEND, (r))

/* vhub-op-rings.c: a ring's SET_VRING_ADDR (user addresses of its parts,
 * each inside one region); -ERANGE if a part lies outside the VM's memory.
 * With iova (VIRTIO_F_IOMMU_PLATFORM acked) the addresses are I/O virtual
 * addresses the back-end translates through its IOTLB: sent as given. */
int vring_addr(const struct vhub_vm *vm, bool iova, uint32_t index, uint32_t size, uint64_t desc,
               uint64_t avail, uint64_t used, struct vhu_vring_addr *ret);

static inline bool features_iommu(uint64_t features) {
        return (features & (UINT64_C(1) << VHU_VIRTIO_F_ACCESS_PLATFORM)) != 0;
}

/* vhub-op-rings.c: adds 1 to one of ring index's eventfds (what: "kick",
 * "call", "err") without ever blocking.  A full counter (-EAGAIN) means the
 * eventfd is signalled already and its VMM does not read it: the VMM's
 * business, counted and logged rate-limited, like any other failure. */
int vring_signal(struct vhub_device *d, unsigned index, int fd, const char *what);

/* vhub-op.c */
void op_check_ack(struct vhub_device *d, struct vhub_op *op, uint32_t request,
                  const struct vhu_msg *reply);
void op_complete_call(struct vhub_device *d, struct vhub_op *op, int r);

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

/* the dispatch (vhub-op.c) */
int op_stage_send(struct vhub_device *d, struct vhub_op *op);
void op_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                 struct vhu_msg *reply);
const char *vhub_op_kind_to_string(enum vhub_op_kind kind);
/* The op has ended (r < 0: failed); commit or undo its effects. */
void op_complete(struct vhub_device *d, struct vhub_op *op, int r);
void op_free(struct vhub_op *op);
