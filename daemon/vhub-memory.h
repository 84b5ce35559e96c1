/* SPDX-License-Identifier: MIT */
/*
 * A VM's guest memory table: the one source of truth for which regions
 * exist.  Each region owns the fd the VMM passed.  Validation happens here,
 * before any message goes to any back-end.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "vhub-error.h"

struct vhub_region {
        uint64_t id;            /* unique in the daemon; identifies it in device shadows */
        uint64_t gpa;
        uint64_t size;
        uint64_t offset;        /* into fd */
        uint64_t uaddr;         /* the VMM's address for it (default gpa) */
        int fd;                 /* owned */
        uint64_t page_size;     /* of the backing: 4096 or the hugetlbfs page size */
};

struct vhub_mem_table {
        struct vhub_region *regions;
        size_t n;
        size_t cap;
};

void vhub_mem_table_init(struct vhub_mem_table *t);
/* Close every region fd and free the table. */
void vhub_mem_table_done(struct vhub_mem_table *t);

/*
 * Check the fd (memfd, hugetlbfs or regular file; offset+size within it;
 * page-aligned gpa/size/offset/uaddr) and that r overlaps no region of t in
 * guest-physical or user address space.  Fills r->page_size.  -32009 on any
 * problem.  Does not take r->fd.
 */
int vhub_mem_table_check_new(const struct vhub_mem_table *t, struct vhub_region *r,
                             struct vhub_error *err);
/* Append r.  r->fd is taken in every case (-1 afterwards; closed on
 * -ENOMEM). */
int vhub_mem_table_add(struct vhub_mem_table *t, struct vhub_region *r);
/* Remove the region starting at gpa; its fd moves to *ret_fd (or is closed if NULL). */
int vhub_mem_table_remove(struct vhub_mem_table *t, uint64_t gpa, int *ret_fd);
const struct vhub_region *vhub_mem_table_find_gpa(const struct vhub_mem_table *t, uint64_t gpa);
const struct vhub_region *vhub_mem_table_find_id(const struct vhub_mem_table *t, uint64_t id);
/* The region containing [gpa, gpa+len), or NULL. */
const struct vhub_region *vhub_mem_table_lookup(const struct vhub_mem_table *t, uint64_t gpa,
                                                uint64_t len);
/* gpa -> the VMM's user address, for [gpa, gpa+len) inside one region. */
int vhub_mem_table_gpa_to_uaddr(const struct vhub_mem_table *t, uint64_t gpa, uint64_t len,
                                uint64_t *ret_uaddr);
/* The highest guest-physical address covered + 1 (0 for an empty table). */
uint64_t vhub_mem_table_end(const struct vhub_mem_table *t);

/*
 * Map [gpa, gpa+len) read-only for a moment (used to read a ring's used
 * index).  The daemon never maps guest memory writable.
 */
int vhub_mem_table_read(const struct vhub_mem_table *t, uint64_t gpa, void *buf, size_t len);
