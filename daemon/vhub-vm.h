/* SPDX-License-Identifier: MIT */
/*
 * A VM: a name owned by a uid, its guest memory table (the one source of
 * truth every device's back-end is kept in line with), its devices, and
 * the serialized queue of memory changes that fan out to them.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/types.h>

#include "vhub-call.h"
#include "vhub-cred.h"
#include "vhub-error.h"
#include "vhub-hash.h"
#include "vhub-fd-track.h"
#include "vhub-memory.h"
#include "vhub-owner.h"
#include "vhub-shared-object.h"
#include "vhub-snapshot.h"

struct event;
struct vhub_call;
struct vhub_context;
struct vhub_device;
struct vhub_owner;

TAILQ_HEAD(vhub_device_list, vhub_device);

enum vhub_mem_op_kind {
        VHUB_MEM_OP_ADD,
        VHUB_MEM_OP_REMOVE,
};

enum vhub_mem_op_phase {
        VHUB_MEM_PHASE_QUEUED,
        VHUB_MEM_PHASE_APPLY,
        VHUB_MEM_PHASE_ROLLBACK,
};

/* One vm.memory.add/remove, fanned out to every connected device at once. */
struct vhub_mem_op {
        TAILQ_ENTRY(vhub_mem_op) link;
        enum vhub_mem_op_kind kind;
        enum vhub_mem_op_phase phase;
        struct vhub_region region;      /* add: the new region (owns its fd until commit);
                                         * remove: a copy of the region (fd not owned) */
        struct vhub_call *call;
        unsigned outstanding;           /* device syncs still running */
        bool failed;
        struct vhub_error error;        /* the first failure, naming its device */
};

TAILQ_HEAD(vhub_mem_op_list, vhub_mem_op);

enum vhub_vm_batch_kind {
        VHUB_BATCH_LOG_START,
        VHUB_BATCH_LOG_STOP,
        VHUB_BATCH_POSTCOPY,
};

/* A call that waits for one op on each of several devices (dirty log, postcopy). */
struct vhub_vm_batch {
        enum vhub_vm_batch_kind kind;
        struct vhub_call *call;
        unsigned outstanding;
        bool failed;
        struct vhub_error error;
        /* postcopy: the step, and each device's outcome for the VMM */
        unsigned postcopy_step;
        struct vhub_postcopy_device *postcopy;
        unsigned n_postcopy, cap_postcopy;
};

/* Where the VM is in a postcopy migration (it is the destination). */
enum vhub_vm_postcopy {
        VHUB_VM_POSTCOPY_OFF,
        VHUB_VM_POSTCOPY_ADVISED,     /* each back-end has handed out its userfaultfd */
        VHUB_VM_POSTCOPY_LISTENING,   /* back-ends fault on missing pages until end */
};

struct vhub_vm {
        TAILQ_ENTRY(vhub_vm) link;
        struct vhub_hash_node by_name;  /* in ctx->vms_by_name */
        struct vhub_context *ctx;
        uint64_t id;                    /* daemon-unique, never reused */
        char fd_group[VHUB_FD_GROUP_MAX];        /* "v<id>": regions, dirty log */
        char fd_group_shared[VHUB_FD_GROUP_MAX]; /* "o<id>": the VMM's shared objects */
        char name[VHUB_NAME_MAX + 1];
        uid_t uid;
        struct vhub_cred cred;          /* its creator's (root's, for a VM root made for
                                         * another uid) or its attacher's of the same uid:
                                         * for devices added without credentials of their
                                         * own (each device acts with its adder's) */
        const struct vhub_owner *owner; /* a face's connection (vhub-owner.h); NULL: none */
        uint64_t linger_ms;             /* 0: destroyed when its connection closes */
        uint64_t next_token;            /* back-end requests forwarded or deferred: the VM's
                                         * own count, so that no uid sees another's */
        uint64_t token_reserved;        /* no token goes past it: what its snapshot holds */
        struct event *linger_timer;
        uint64_t linger_deadline_usec;  /* CLOCK_MONOTONIC: when it fires, while armed */

        struct vhub_mem_table mem;      /* committed regions */
        struct vhub_mem_op_list mem_ops;/* head is the active one once started */
        unsigned handshake_syncs;       /* device handshakes syncing memory right now */

        struct vhub_device_list devices;
        unsigned n_devices;
        struct vhub_hash devices_by_name;

        /* the fd budget's ledger (vhub-fd-budget.h) */
        unsigned fds_counted;           /* what it held when last counted */
        bool fds_marked;                /* in ctx->fd_ledger.marked */
        TAILQ_ENTRY(vhub_vm) fds_link;

        struct vhub_shared_table shared;  /* UUID -> exporter */

        bool logging;                   /* dirty logging on */
        int log_fd;                     /* the log memfd (owned), -1 when off */
        uint64_t log_size;
        struct vhub_vm_batch *log_batch;/* a start/stop in progress */

        enum vhub_vm_postcopy postcopy;
        struct vhub_vm_batch *postcopy_batch; /* a postcopy step in progress */

        unsigned vmm_holds;             /* front-door devices with their VMM connected:
                                         * the linger timer waits while any is */
        bool destroying;
        bool listed;                    /* in daemon.info's counts: linked, not being destroyed */
        const char *destroy_reason;     /* vm.destroyed's (VHUB_VM_DESTROYED_*): vm.destroy's
                                         * unless the owner's close or the linger timer ended it */
        bool freeing;                   /* vhub_vm_free() is running: start nothing */
        unsigned holds;                 /* a loop over the devices is running: the last
                                         * device going does not free the VM yet */
        struct vhub_call *destroy_call;

        /* its restart snapshot (vhub-commit.h) */
        struct vhub_snap_file snap;     /* fd -1 until the first write */
        bool snap_dirty;
        uint64_t snap_serial;           /* serializations begun (the last's number) */
        uint64_t snap_stored;           /* the last one written whole: the store's copy
                                         * (an older one's when a write failed) */
        TAILQ_ENTRY(vhub_vm) snap_link; /* on ctx->snap_dirty */
        /* a restore, until the faces have taken their connections back */
        bool restore_owned;             /* it had an owner: face and id */
        enum vhub_face restore_owner_face;
        uint64_t restore_owner_id;
        bool restore_linger;            /* its linger timer ran: this much was left */
        uint64_t restore_linger_left_ms;
};

/* owner: the creating connection (borrowed, see vhub-owner.h); cred: its
 * peer's credentials (copied). */
int vhub_vm_create(struct vhub_context *ctx, uid_t uid, const char *name, uint64_t linger_ms,
                   const struct vhub_owner *owner, const struct vhub_cred *cred,
                   struct vhub_error *err, struct vhub_vm **ret);
/* A VM not yet in the context (a restore's, or vhub_vm_create()'s): NULL
 * when out of memory. */
struct vhub_vm *vhub_vm_alloc(struct vhub_context *ctx, uint64_t id, uid_t uid, const char *name,
                              uint64_t linger_ms, const struct vhub_cred *cred);
/* It joins the context: the list, the lookup by name, the fd ledger and
 * daemon.info's counts (unless it is being destroyed).  0 or -ENOMEM. */
int vhub_vm_link(struct vhub_vm *vm);
/* A VM from vhub_vm_alloc() that never joined the context (or failed to). */
void vhub_vm_discard(struct vhub_vm *vm);
/* A VM being destroyed is not found: its name is free again. */
struct vhub_vm *vhub_vm_find(struct vhub_context *ctx, uid_t uid, const char *name);

/*
 * The isolation rule, written once: a uid sees the VMs of its own uid, root
 * those of every uid; another uid's VM is indistinguishable from one that
 * does not exist.  Every face applies it to methods and events alike.  (A VM
 * being destroyed no longer exists for lookups and lists -- vhub_vm_find(),
 * vhub-info.h -- but its last events still reach whoever sees it.)
 */
static inline bool vhub_uid_sees(uid_t uid, uid_t vm_uid) {
        return uid == 0 || uid == vm_uid;
}
bool vhub_vm_visible_to(const struct vhub_vm *vm, uid_t uid);

/* Every fd the VM holds, named "vm/<uid>/<vm>/...": in its groups the
 * regions' fds ("region/<id>"), the dirty log ("log") and the VMM's shared
 * objects ("shared/<uuid>"); without a group a region being added and the
 * userfaultfds of a postcopy step on their way to the VMM; then each
 * device's (vhub_device_foreach_fd()). */
void vhub_vm_foreach_fd(const struct vhub_vm *vm, const struct vhub_fd_visitor *v);

/* For the faces, which read no field of a VM. */
const char *vhub_vm_name(const struct vhub_vm *vm);
uid_t vhub_vm_uid(const struct vhub_vm *vm);
const struct vhub_owner *vhub_vm_owner(const struct vhub_vm *vm);
/* Stop and remove every device, then free the VM; call (may be NULL) completes then. */
void vhub_vm_destroy(struct vhub_vm *vm, struct vhub_call *call);
/* Free now, no back-end traffic (shutdown of last resort). */
void vhub_vm_free(struct vhub_vm *vm);

/* The owning connection closed: linger, or destroy asynchronously
 * (vhub_context_owner_gone() calls it for each VM of the owner). */
void vhub_vm_owner_gone(struct vhub_vm *vm);
/* A new connection of the same uid takes over a lingering VM; a peer of the
 * VM's own uid also brings its current credentials (cred, copied), to the
 * VM and to the devices that act as that uid. */
int vhub_vm_attach(struct vhub_vm *vm, const struct vhub_owner *owner, const struct vhub_cred *cred,
                   struct vhub_error *err);

/* A back-end request token of vm's, never one it gave out before -- across
 * restarts and crashes too: its snapshot holds a count no token went past,
 * committed before anyone can see the token (after the current callback,
 * before the loop writes to a socket).  That count is reserved ahead, so
 * that the VM's snapshot is written once per VHUB_VM_TOKEN_RESERVE tokens,
 * not per token: a back-end sends requests at will (docs/restart.md). */
#define VHUB_VM_TOKEN_RESERVE 1024u
uint64_t vhub_vm_new_token(struct vhub_vm *vm);

/* region->fd is taken in every case (closed on failure). */
void vhub_vm_memory_add(struct vhub_vm *vm, struct vhub_region *region, struct vhub_call *call);
void vhub_vm_memory_remove(struct vhub_vm *vm, uint64_t gpa, struct vhub_call *call);

struct vhub_device *vhub_vm_find_device(struct vhub_vm *vm, const char *name);
/* A device joins the VM (its list, its name, the counts) / leaves it. */
void vhub_vm_link_device(struct vhub_vm *vm, struct vhub_device *dev);
void vhub_vm_unlink_device(struct vhub_vm *vm, struct vhub_device *dev);

/* Dirty logging: a log memfd covering the VM's memory, one bit per 4 KiB. */
void vhub_vm_dirty_log_start(struct vhub_vm *vm, struct vhub_call *call);
void vhub_vm_dirty_log_stop(struct vhub_vm *vm, struct vhub_call *call);
void vhub_vm_batch_device_done(struct vhub_vm *vm, struct vhub_vm_batch *b, struct vhub_device *dev,
                               int r, const struct vhub_error *err);

/* Postcopy (vhub-vm-postcopy.c): one step on every device of the VM.
 * advise: call->out.postcopy lists each device's userfaultfd; listen: each
 * device's regions as its back-end mapped them.  step: enum vhub_postcopy_step. */
void vhub_vm_postcopy(struct vhub_vm *vm, unsigned step, struct vhub_call *call);
/* A device's postcopy op ended; ufd and regions are taken (-1 / NULL if none). */
void vhub_vm_postcopy_device_done(struct vhub_vm *vm, struct vhub_vm_batch *b, struct vhub_device *dev,
                                  int r, const struct vhub_error *err, int ufd,
                                  struct vhub_postcopy_region *regions, unsigned n_regions);
void vhub_vm_batch_free(struct vhub_vm_batch *b);

/* Shared objects the VMM exports. fd taken in every case. */
int vhub_vm_shared_add(struct vhub_vm *vm, const uint8_t uuid[16], int fd, struct vhub_error *err);
int vhub_vm_shared_remove(struct vhub_vm *vm, const uint8_t uuid[16], struct vhub_error *err);

/*
 * The front door (vhub-device-vmm.c): a VMM connected to one of the VM's
 * devices holds a VM that has no owner connection -- its linger timer stops,
 * and starts over from linger_ms when the last VMM left (docs/front-door.md,
 * "Lifetime").
 */
void vhub_vm_vmm_hold(struct vhub_vm *vm);
void vhub_vm_vmm_release(struct vhub_vm *vm);
/* Whether a device of the VM is a front-door device (its memory is its VMM's:
 * vm.memory.*, dirty logging and postcopy answer -32004). */
int vhub_vm_check_no_front_door(const struct vhub_vm *vm, const char *what, struct vhub_error *err);

/* Callbacks from devices. */
void vhub_vm_device_synced(struct vhub_vm *vm, struct vhub_device *dev, int r,
                           const struct vhub_error *err);
void vhub_vm_handshake_sync_done(struct vhub_vm *vm);
/* A device of vm was freed: a VM being destroyed goes with its last one. */
void vhub_vm_device_gone(struct vhub_vm *vm);
/* The mem op a device sync belongs to is active (for a handshake: wait). */
bool vhub_vm_memory_busy(const struct vhub_vm *vm);
/* A region by id: committed, or the one the active op is adding. */
const struct vhub_region *vhub_vm_region_by_id(const struct vhub_vm *vm, uint64_t id);
/* The table a device must hold once the active op (if any) is applied. */
int vhub_vm_memory_target(const struct vhub_vm *vm, const struct vhub_region ***ret_regions,
                          size_t *ret_n);
