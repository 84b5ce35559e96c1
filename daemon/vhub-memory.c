/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "vhub-memory.h"
#include "vhu-fd.h"

void vhub_mem_table_init(struct vhub_mem_table *t) {
        memset(t, 0, sizeof(*t));
}

void vhub_mem_table_done(struct vhub_mem_table *t) {
        for (size_t i = 0; i < t->n; i++)
                t->regions[i].fd = vhu_safe_close(t->regions[i].fd);
        free(t->regions);
        vhub_mem_table_init(t);
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
        /* both ranges are non-empty and do not wrap (checked by the caller) */
        return a < b + blen && b < a + alen;
}

static int check_backing(struct vhub_region *r, struct vhub_error *err) {
        struct statfs sfs;
        struct stat st;
        int fl;

        if (r->fd < 0)
                return vhub_error_set(err, VHUB_ERR_REGION, "no memory fd");
        fl = fcntl(r->fd, F_GETFL);
        if (fl < 0)
                return vhub_error_set(err, VHUB_ERR_REGION, "memory fd is not an open file");
        if ((fl & O_ACCMODE) != O_RDWR)
                return vhub_error_set(err, VHUB_ERR_REGION,
                                      "memory fd must be open read-write (back-ends map it shared)");
        if (fstat(r->fd, &st) < 0)
                return vhub_error_set(err, VHUB_ERR_REGION, "fstat of the memory fd failed: %s",
                                      strerror(errno));
        if (!S_ISREG(st.st_mode))
                return vhub_error_set(err, VHUB_ERR_REGION,
                                      "memory fd is not a memfd, hugetlbfs or regular file");
        if (fstatfs(r->fd, &sfs) < 0)
                return vhub_error_set(err, VHUB_ERR_REGION, "fstatfs of the memory fd failed: %s",
                                      strerror(errno));
        /* The daemon reads ring indexes from guest memory with pread(): a file
         * on a FUSE or network filesystem could stall its loop on that read
         * (and its back-ends on every access).  Guest RAM lives on memfd,
         * tmpfs, hugetlbfs or a local disk filesystem. */
        switch ((unsigned long)sfs.f_type) {
        case 0x65735546UL: /* FUSE_SUPER_MAGIC */
        case 0x6969UL:     /* NFS_SUPER_MAGIC */
        case 0x517bUL:     /* SMB_SUPER_MAGIC */
        case 0xff534d42UL: /* CIFS_SUPER_MAGIC */
        case 0xfe534d42UL: /* SMB2_SUPER_MAGIC */
        case 0x00c36400UL: /* CEPH_SUPER_MAGIC */
        case 0x01021997UL: /* V9FS_MAGIC */
                return vhub_error_set(err, VHUB_ERR_REGION,
                                      "memory fd is on a FUSE or network filesystem (0x%lx); use a memfd, tmpfs, hugetlbfs or a local file",
                                      (unsigned long)sfs.f_type);
        default:
                break;
        }
        r->page_size = 4096;
        if ((unsigned long)sfs.f_type == (unsigned long)HUGETLBFS_MAGIC && sfs.f_bsize > 0)
                r->page_size = (uint64_t)sfs.f_bsize;
        if (st.st_size < 0 || r->offset > (uint64_t)st.st_size ||
            r->size > (uint64_t)st.st_size - r->offset)
                return vhub_error_set(err, VHUB_ERR_REGION,
                                      "offset 0x%llx + size 0x%llx is beyond the end of the fd (0x%llx bytes)",
                                      (unsigned long long)r->offset, (unsigned long long)r->size,
                                      (unsigned long long)st.st_size);
        return 0;
}

int vhub_mem_table_check_new(const struct vhub_mem_table *t, struct vhub_region *r,
                             struct vhub_error *err) {
        int k;

        if (r->size == 0)
                return vhub_error_set(err, VHUB_ERR_REGION, "region size is 0");
        if (r->gpa + r->size < r->gpa || r->uaddr + r->size < r->uaddr ||
            r->offset + r->size < r->offset)
                return vhub_error_set(err, VHUB_ERR_REGION, "region wraps around the address space");
        k = check_backing(r, err);
        if (k < 0)
                return k;
        if (r->gpa % r->page_size || r->size % r->page_size || r->offset % r->page_size ||
            r->uaddr % r->page_size)
                return vhub_error_set(err, VHUB_ERR_REGION,
                                      "gpa, size, offset and uaddr must be aligned to the backing page size (%llu)",
                                      (unsigned long long)r->page_size);
        for (size_t i = 0; i < t->n; i++) {
                const struct vhub_region *o = &t->regions[i];

                if (ranges_overlap(r->gpa, r->size, o->gpa, o->size))
                        return vhub_error_set(err, VHUB_ERR_REGION,
                                              "guest-physical range overlaps the region at gpa 0x%llx",
                                              (unsigned long long)o->gpa);
                if (ranges_overlap(r->uaddr, r->size, o->uaddr, o->size))
                        return vhub_error_set(err, VHUB_ERR_REGION,
                                              "user address range overlaps the region at gpa 0x%llx",
                                              (unsigned long long)o->gpa);
        }
        return 0;
}

int vhub_mem_table_add(struct vhub_mem_table *t, struct vhub_region *r) {
        if (t->n == t->cap) {
                size_t cap = t->cap ? t->cap * 2 : 8;
                struct vhub_region *n = reallocarray(t->regions, cap, sizeof(*n));

                if (!n) {
                        r->fd = vhu_safe_close(r->fd);
                        return -ENOMEM;
                }
                t->regions = n;
                t->cap = cap;
        }
        t->regions[t->n] = *r;
        t->regions[t->n++].fd = VHU_TAKE_FD(r->fd);
        return 0;
}

int vhub_mem_table_remove(struct vhub_mem_table *t, uint64_t gpa, int *ret_fd) {
        for (size_t i = 0; i < t->n; i++) {
                if (t->regions[i].gpa != gpa)
                        continue;
                if (ret_fd)
                        *ret_fd = VHU_TAKE_FD(t->regions[i].fd);
                else
                        vhu_safe_close(t->regions[i].fd);
                memmove(&t->regions[i], &t->regions[i + 1], (t->n - i - 1) * sizeof(t->regions[0]));
                t->n--;
                return 0;
        }
        return -ENOENT;
}

const struct vhub_region *vhub_mem_table_find_gpa(const struct vhub_mem_table *t, uint64_t gpa) {
        for (size_t i = 0; i < t->n; i++)
                if (t->regions[i].gpa == gpa)
                        return &t->regions[i];
        return NULL;
}

const struct vhub_region *vhub_mem_table_find_id(const struct vhub_mem_table *t, uint64_t id) {
        for (size_t i = 0; i < t->n; i++)
                if (t->regions[i].id == id)
                        return &t->regions[i];
        return NULL;
}

const struct vhub_region *vhub_mem_table_lookup(const struct vhub_mem_table *t, uint64_t gpa,
                                                uint64_t len) {
        if (len == 0 || gpa + len < gpa)
                return NULL;
        for (size_t i = 0; i < t->n; i++) {
                const struct vhub_region *r = &t->regions[i];

                if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
                        return r;
        }
        return NULL;
}

int vhub_mem_table_gpa_to_uaddr(const struct vhub_mem_table *t, uint64_t gpa, uint64_t len,
                                uint64_t *ret_uaddr) {
        const struct vhub_region *r = vhub_mem_table_lookup(t, gpa, len);

        if (!r)
                return -ERANGE;
        *ret_uaddr = r->uaddr + (gpa - r->gpa);
        return 0;
}

uint64_t vhub_mem_table_end(const struct vhub_mem_table *t) {
        uint64_t end = 0;

        for (size_t i = 0; i < t->n; i++)
                if (t->regions[i].gpa + t->regions[i].size > end)
                        end = t->regions[i].gpa + t->regions[i].size;
        return end;
}

int vhub_mem_table_read(const struct vhub_mem_table *t, uint64_t gpa, void *buf, size_t len) {
        const struct vhub_region *r = vhub_mem_table_lookup(t, gpa, len);
        ssize_t n;

        if (!r)
                return -ERANGE;
        /* pread, not a mapping: guest memory is never mapped writable here, and
         * not even readable for longer than this call. */
        n = pread(r->fd, buf, len, (off_t)(r->offset + (gpa - r->gpa)));
        if (n < 0)
                return -errno;
        if ((size_t)n != len)
                return -EIO;
        return 0;
}
