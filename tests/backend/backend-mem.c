/* SPDX-License-Identifier: MIT */
/*
 * Guest memory as the front-end shared it: a table of mmap()ed regions with
 * guest-physical and front-end user addresses, and translation of both.  The
 * front-end is not trusted: every region is checked against its fd's size and
 * against the others, and every access against the table.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"

void tb_mem_init(struct tb_mem *m, unsigned max) {
        memset(m, 0, sizeof(*m));
        m->max = max;
}

static void region_unmap(struct tb_region *r) {
        if (r->map)
                munmap(r->map, r->map_len);
        memset(r, 0, sizeof(*r));
}

void tb_mem_clear_regions(struct tb_mem *m) {
        for (unsigned i = 0; i < m->n; i++)
                region_unmap(&m->regions[i]);
        free(m->regions);
        m->regions = NULL;
        m->n = 0;
        m->generation++;
}

void tb_mem_clear(struct tb_mem *m) {
        tb_mem_clear_regions(m);
        if (m->log_map)
                munmap(m->log_map, m->log_map_len);
        unsigned max = m->max;
        uint64_t gen = m->generation;
        bool logging = m->logging;
        tb_mem_init(m, max);
        m->generation = gen + 1;
        m->logging = logging;
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
        return a < b + blen && b < a + alen;
}

int tb_mem_add(struct tb_mem *m, const struct vhu_mem_region *r, int fd, const char **ret_why) {
        const char *why = NULL;
        struct stat st;
        uint64_t end;

        if (m->n >= m->max) {
                why = "no free memory slot";
                goto fail;
        }
        if (r->size == 0 || __builtin_add_overflow(r->gpa, r->size, &end) ||
            __builtin_add_overflow(r->uaddr, r->size, &end) ||
            __builtin_add_overflow(r->mmap_offset, r->size, &end) ||
            end > (uint64_t) SIZE_MAX) {
                why = "region size or addresses overflow";
                goto fail;
        }
        /* A mapping past the end of the file would SIGBUS on access. */
        if (fstat(fd, &st) < 0 || (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode) &&
                                   !S_ISCHR(st.st_mode))) {
                why = "region fd is not mappable";
                goto fail;
        }
        if (S_ISREG(st.st_mode) && (uint64_t) st.st_size < end) {
                why = "region extends beyond the end of its fd";
                goto fail;
        }
        for (unsigned i = 0; i < m->n; i++) {
                const struct tb_region *o = &m->regions[i];
                if (ranges_overlap(o->gpa, o->size, r->gpa, r->size) ||
                    ranges_overlap(o->uaddr, o->size, r->uaddr, r->size)) {
                        why = "region overlaps an existing region";
                        goto fail;
                }
        }

        void *map = mmap(NULL, end, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
                why = "mmap of the region failed";
                goto fail;
        }
        if (m->n % 8 == 0) {
                struct tb_region *n = realloc(m->regions, (m->n + 8) * sizeof(*n));
                if (!n) {
                        munmap(map, end);
                        why = "out of memory";
                        goto fail;
                }
                m->regions = n;
        }
        m->regions[m->n++] = (struct tb_region) {
                .gpa = r->gpa, .size = r->size, .uaddr = r->uaddr,
                .mmap_offset = r->mmap_offset,
                .map = map, .map_len = end,
                .host = (uint8_t *) map + r->mmap_offset,
        };
        m->generation++;
        return 0;
fail:
        if (ret_why)
                *ret_why = why;
        return -EINVAL;
}

/* spec "REM_MEM_REG": identified by guest address, user address and size. */
int tb_mem_remove(struct tb_mem *m, const struct vhu_mem_region *r) {
        for (unsigned i = 0; i < m->n; i++) {
                struct tb_region *o = &m->regions[i];
                if (o->gpa != r->gpa || o->uaddr != r->uaddr || o->size != r->size)
                        continue;
                region_unmap(o);
                memmove(o, o + 1, (m->n - i - 1) * sizeof(*o));
                m->n--;
                m->generation++;
                return 0;
        }
        return -ENOENT;
}

void *tb_mem_uaddr(const struct tb_mem *m, uint64_t uaddr, uint64_t len) {
        for (unsigned i = 0; i < m->n; i++) {
                const struct tb_region *r = &m->regions[i];
                if (uaddr >= r->uaddr && uaddr - r->uaddr <= r->size &&
                    len <= r->size - (uaddr - r->uaddr))
                        return r->host + (uaddr - r->uaddr);
        }
        return NULL;
}

/* The region holding gpa and how many bytes of it follow gpa there. */
static uint8_t *gpa_chunk(const struct tb_mem *m, uint64_t gpa, uint64_t *ret_avail) {
        for (unsigned i = 0; i < m->n; i++) {
                const struct tb_region *r = &m->regions[i];
                if (gpa >= r->gpa && gpa - r->gpa < r->size) {
                        *ret_avail = r->size - (gpa - r->gpa);
                        return r->host + (gpa - r->gpa);
                }
        }
        return NULL;
}

bool tb_mem_mapped(const struct tb_mem *m, uint64_t gpa, uint64_t len) {
        while (len > 0) {
                uint64_t avail;
                if (!gpa_chunk(m, gpa, &avail))
                        return false;
                if (avail >= len)
                        return true;
                gpa += avail;
                len -= avail;
        }
        return true;
}

/* Buffers may span adjacent regions: copy chunk by chunk, into guest
 * memory if to_guest (buf is then only read), else out of it. */
static int mem_copy(const struct tb_mem *m, uint64_t gpa, uint8_t *buf, size_t len, bool to_guest) {
        while (len > 0) {
                uint64_t avail;
                uint8_t *h = gpa_chunk(m, gpa, &avail);
                if (!h)
                        return -EFAULT;
                size_t n = len < avail ? len : avail;
                if (to_guest)
                        memcpy(h, buf, n);
                else
                        memcpy(buf, h, n);
                buf += n;
                gpa += n;
                len -= n;
        }
        return 0;
}

int tb_mem_read(const struct tb_mem *m, uint64_t gpa, void *dst, size_t len) {
        return mem_copy(m, gpa, dst, len, false);
}

int tb_mem_write(struct tb_mem *m, uint64_t gpa, const void *src, size_t len) {
        int r = mem_copy(m, gpa, (uint8_t *) src, len, true);
        if (r < 0)
                return r;
        tb_mem_log_dirty(m, gpa, len);
        return 0;
}

int tb_mem_set_log(struct tb_mem *m, int fd, uint64_t size, uint64_t offset) {
        struct stat st;
        uint64_t end;
        long page = sysconf(_SC_PAGESIZE);

        if (size == 0 || __builtin_add_overflow(size, offset, &end) || end > (uint64_t) SIZE_MAX)
                return -EINVAL;
        if (fstat(fd, &st) < 0 || (S_ISREG(st.st_mode) && (uint64_t) st.st_size < end))
                return -EINVAL;
        uint64_t map_off = offset & ~((uint64_t) page - 1);
        size_t map_len = end - map_off;
        void *map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t) map_off);
        if (map == MAP_FAILED)
                return -errno;
        if (m->log_map)
                munmap(m->log_map, m->log_map_len);
        m->log_map = map;
        m->log_map_len = map_len;
        m->log = (uint8_t *) map + (offset - map_off);
        m->log_size = size;
        return 0;
}

/* spec "Migration": page = addr / VHOST_LOG_PAGE; log[page / 8] |= 1 << page % 8. */
void tb_mem_log_dirty(struct tb_mem *m, uint64_t gpa, uint64_t len) {
        if (!m->logging || !m->log || len == 0)
                return;
        uint64_t first = gpa / VHU_LOG_PAGE, last = (gpa + len - 1) / VHU_LOG_PAGE;
        for (uint64_t p = first; p <= last; p++) {
                if (p / 8 >= m->log_size)
                        return;
                __atomic_fetch_or(&m->log[p / 8], (uint8_t) (1u << (p % 8)), __ATOMIC_RELAXED);
        }
}
