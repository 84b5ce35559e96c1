/* SPDX-License-Identifier: MIT */
/*
 * Guest RAM as a VMM owns it: one memfd, mapped MAP_SHARED, placed at a
 * guest-physical address.  The fd is what vm.memory.add hands to vhubd;
 * vhubd and the back-ends map the same pages, so whatever the driver writes
 * here the device sees.
 *
 * A bump allocator hands out zeroed, aligned ranges (rings, request headers,
 * data buffers); nothing is ever given back before the whole region goes.
 */
#pragma once

#include <stdint.h>

struct vhub_guest_mem;

/* memfd_create(name, MFD_CLOEXEC) of size bytes (a multiple of the page
 * size), sealed against shrinking and growing, mapped at gpa. */
int vhub_guest_mem_new(const char *name, uint64_t gpa, uint64_t size, struct vhub_guest_mem **ret);
/* Unmaps and closes the memfd.  NULL-safe; returns NULL. */
struct vhub_guest_mem *vhub_guest_mem_free(struct vhub_guest_mem *m);

int vhub_guest_mem_fd(const struct vhub_guest_mem *m);
uint64_t vhub_guest_mem_gpa(const struct vhub_guest_mem *m);
uint64_t vhub_guest_mem_size(const struct vhub_guest_mem *m);

/* Pointer to [gpa, gpa+len) if it lies entirely inside the region, else NULL. */
void *vhub_guest_mem_at(const struct vhub_guest_mem *m, uint64_t gpa, uint64_t len);
/* Guest-physical address of [p, p+len): 0 or -EFAULT if outside the region. */
int vhub_guest_mem_to_gpa(const struct vhub_guest_mem *m, const void *p, uint64_t len,
                          uint64_t *ret_gpa);

/* Allocate size bytes aligned to align (a power of two), zeroed: 0 and
 * *ret_gpa, or -ENOMEM when the region is used up, -EINVAL on bad args. */
int vhub_guest_mem_alloc(struct vhub_guest_mem *m, uint64_t size, uint64_t align, uint64_t *ret_gpa);
/* Bytes still free for vhub_guest_mem_alloc() (ignoring alignment). */
uint64_t vhub_guest_mem_free_bytes(const struct vhub_guest_mem *m);
