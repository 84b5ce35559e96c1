/* SPDX-License-Identifier: MIT */
/*
 * A VM's shared objects (virtio-dmabuf UUIDs): UUID -> exporter, either the
 * VMM (holding an fd) or one of the VM's devices (asked with
 * GET_SHARED_OBJECT at lookup time).  One table per VM: a back-end can only
 * ever find objects of its own VM.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vhub_device;

struct vhub_shared_object {
        uint8_t uuid[16];
        struct vhub_device *device;  /* exporter device, or NULL for the VMM */
        int fd;                      /* the VMM's fd (owned), -1 for a device */
};

struct vhub_shared_table {
        struct vhub_shared_object *objects;
        size_t n, cap;
};

void vhub_shared_table_init(struct vhub_shared_table *t);
void vhub_shared_table_done(struct vhub_shared_table *t);
struct vhub_shared_object *vhub_shared_table_find(struct vhub_shared_table *t, const uint8_t uuid[16]);
/* fd (-1 for a device export) is taken in every case.  -EEXIST, -ENOSPC, -ENOMEM. */
int vhub_shared_table_add(struct vhub_shared_table *t, const uint8_t uuid[16],
                          struct vhub_device *device, int fd, size_t max);
/* Remove uuid if owner (device or NULL = VMM) matches: 0, -ENOENT, -EPERM. */
int vhub_shared_table_remove(struct vhub_shared_table *t, const uint8_t uuid[16],
                             const struct vhub_device *owner);
/* Drop every object a device exported. */
void vhub_shared_table_drop_device(struct vhub_shared_table *t, const struct vhub_device *device);

/* Canonical 36-character form; parse returns -EINVAL on anything else. */
void vhub_uuid_format(const uint8_t uuid[16], char out[37]);
int vhub_uuid_parse(const char *s, uint8_t out[16]);
