/* SPDX-License-Identifier: MIT */
/*
 * The model's objects write themselves into their VM's restart snapshot
 * and are rebuilt from it (docs/restart.md, "What a snapshot holds").  Each
 * object's record is written and read next to the object: the VM and its
 * regions, dirty log and shared objects in vhub-vm-snapshot.c, a device
 * with its link, rings and inflight fd in vhub-device-snapshot.c.  Tags
 * are meaningful within their parent record.  Model-internal.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "vhub-cred.h"
#include "vhub-snapshot.h"

struct vhub_context;
struct vhub_device;
struct vhub_fdstore_restore;
struct vhub_vm;

/* Credentials (vhub-cred-snapshot.c): a VM's groups as one record of its
 * own, a device's whole credentials as a nest.  A reader fails a record
 * that lacks the uid or the gid rather than leave root's zeros in place. */
#define VHUB_SNAP_MAX_GROUPS 64
void vhub_snap_put_groups(struct vhub_snap_writer *w, uint32_t tag, const struct vhub_cred *c);
int vhub_snap_get_groups(const struct vhub_snap_rec *rec, struct vhub_cred *c);
void vhub_snap_put_cred(struct vhub_snap_writer *w, uint32_t tag, const struct vhub_cred *c);
int vhub_snap_get_cred(const struct vhub_snap_rec *rec, struct vhub_cred *ret);

/* A memory region as a nest record (the VM's regions, a front-door VMM's:
 * vhub-vm-snapshot.c): its fd by its key in group.  The reader fills *ret,
 * its fd claimed from claim (-ENOENT there when it did not come back: the
 * caller decides); -EBADMSG for a region without id or size. */
struct vhub_fd_claim;
struct vhub_fdstore;
struct vhub_region;
void vhub_snap_put_region(struct vhub_snap_writer *w, uint32_t tag, const struct vhub_fdstore *s,
                          const char *group, const struct vhub_region *r);
int vhub_snap_get_region(const struct vhub_snap_rec *rec, struct vhub_fd_claim *claim, struct vhub_region *ret);

int vhub_vm_serialize(const struct vhub_vm *vm, struct vhub_snap_writer *w);
/* Rebuild the VM of doc (read from its snapshot file, whose fd snap_fd is
 * taken in every case), claiming its fds from r.  No back-end hears of
 * it.  -EBADMSG with *why for a document that does not make a VM. */
int vhub_vm_restore(struct vhub_context *ctx, struct vhub_fdstore_restore *r, const struct vhub_snap_doc *doc,
                    int snap_fd, struct vhub_vm **ret, const char **why);

/* Once every face took its connections back (vhub_context_owner_restored()):
 * its devices finish (vhub_device_restore_finish()), a VM whose owner did
 * not come back lingers or goes, a lingering one's timer runs on with what
 * was left, a vm.destroy in flight runs again.  vm may be freed. */
void vhub_vm_restore_finish(struct vhub_vm *vm);

int vhub_device_serialize(const struct vhub_device *d, struct vhub_snap_writer *w);
/* A device of vm from its record (the iterator inside it), its fds claimed
 * from its own group (taken from r) or, where its record says its fds are
 * in its VM's group, from vm_claim (that group's, open).  0 and *ret
 * (NULL: the device was in the middle of being added or removed and is
 * gone: its fds closed), or -errno with *why. */
int vhub_device_restore(struct vhub_vm *vm, struct vhub_fdstore_restore *r, struct vhub_fd_claim *vm_claim,
                        struct vhub_snap_iter *it, struct vhub_device **ret, const char **why);
/* A planned stop writes the oldest format that can express its state
 * (docs/restart.md, "Versions"): the devices whose fds are in their VM's
 * fd-store group (every one added since the last start) move them into
 * groups of their own, as a format-1 vhubd looks for them -- a push per
 * device, which the stop can afford and a device.add could not.  The fds
 * leave their VMs' groups only once the manager took the new ones (a
 * blocking flush, at most VHUB_OWN_GROUPS_FLUSH_MS); else they all stay
 * (their VMs' snapshots then refuse a format-1 reader).  Their VMs are
 * marked changed. */
#define VHUB_OWN_GROUPS_FLUSH_MS 5000
void vhub_devices_own_groups(struct vhub_context *ctx);
/* The rest of a device's restore, once every VM and face is back: a device
 * that had a request in flight is lost now (the reconnect path restores it,
 * with its events); an outage goes on with its remaining backoff. */
void vhub_device_restore_finish(struct vhub_device *d);
