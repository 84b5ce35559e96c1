/* SPDX-License-Identifier: MIT */
#include "guest-mem.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct vhub_guest_mem {
        int fd;
        uint8_t *base;
        uint64_t gpa;
        uint64_t size;
        uint64_t brk;   /* offset of the first byte not yet allocated */
};

int vhub_guest_mem_new(const char *name, uint64_t gpa, uint64_t size, struct vhub_guest_mem **ret) {
        long page = sysconf(_SC_PAGESIZE);
        struct vhub_guest_mem *m;
        int r;

        if (size == 0 || page <= 0 || size % (uint64_t)page != 0 || gpa % (uint64_t)page != 0 ||
            gpa + size < gpa || size > (uint64_t)SIZE_MAX)
                return -EINVAL;
        m = calloc(1, sizeof(*m));
        if (!m)
                return -ENOMEM;
        m->base = MAP_FAILED;
        m->gpa = gpa;
        m->size = size;

        m->fd = memfd_create(name ? name : "vhub-guest-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (m->fd < 0) {
                r = -errno;
                goto fail;
        }
        if (ftruncate(m->fd, (off_t)size) < 0) {
                r = -errno;
                goto fail;
        }
        /* The size is part of what vhubd checks the region against: pin it. */
        if (fcntl(m->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
                r = -errno;
                goto fail;
        }
        m->base = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, m->fd, 0);
        if (m->base == MAP_FAILED) {
                r = -errno;
                goto fail;
        }
        *ret = m;
        return 0;
fail:
        vhub_guest_mem_free(m);
        return r;
}

struct vhub_guest_mem *vhub_guest_mem_free(struct vhub_guest_mem *m) {
        if (!m)
                return NULL;
        if (m->base != MAP_FAILED)
                munmap(m->base, (size_t)m->size);
        if (m->fd >= 0)
                close(m->fd);
        free(m);
        return NULL;
}

int vhub_guest_mem_fd(const struct vhub_guest_mem *m) {
        return m->fd;
}

uint64_t vhub_guest_mem_gpa(const struct vhub_guest_mem *m) {
        return m->gpa;
}

uint64_t vhub_guest_mem_size(const struct vhub_guest_mem *m) {
        return m->size;
}

void *vhub_guest_mem_at(const struct vhub_guest_mem *m, uint64_t gpa, uint64_t len) {
        if (gpa < m->gpa || gpa - m->gpa > m->size || len > m->size - (gpa - m->gpa))
                return NULL;
        return m->base + (gpa - m->gpa);
}

int vhub_guest_mem_to_gpa(const struct vhub_guest_mem *m, const void *p, uint64_t len,
                          uint64_t *ret_gpa) {
        uintptr_t a = (uintptr_t)p, b = (uintptr_t)m->base;

        if (a < b || a - b > m->size || len > m->size - (a - b))
                return -EFAULT;
        *ret_gpa = m->gpa + (a - b);
        return 0;
}

int vhub_guest_mem_alloc(struct vhub_guest_mem *m, uint64_t size, uint64_t align, uint64_t *ret_gpa) {
        uint64_t off;

        if (size == 0 || align == 0 || (align & (align - 1)) != 0)
                return -EINVAL;
        /* Align the guest-physical address, not just the offset. */
        off = ((m->gpa + m->brk + align - 1) & ~(align - 1)) - m->gpa;
        if (off < m->brk || off > m->size || size > m->size - off)
                return -ENOMEM;
        memset(m->base + off, 0, (size_t)size);
        m->brk = off + size;
        *ret_gpa = m->gpa + off;
        return 0;
}

uint64_t vhub_guest_mem_free_bytes(const struct vhub_guest_mem *m) {
        return m->size - m->brk;
}
