/* SPDX-License-Identifier: MIT */
/* The fd store's indexes (vhub-fdstore-internal.h): every tracked name and
 * every group by name, and the STORED primaries by open file. */
#include <errno.h>
#include <linux/kcmp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vhub-fdstore-internal.h"
#include "vhub-log.h"

bool fds_name_reserved(const char *name) {
        return strncmp(name, VHUB_FDSTORE_RESERVED, strlen(VHUB_FDSTORE_RESERVED)) == 0;
}

uint32_t fds_name_hash(const char *name) {
        uint32_t h = 2166136261u;

        for (; *name; name++)
                h = (h ^ (uint8_t) *name) * 16777619u;
        return h;
}

/* ---- the name tables */

struct name_node *fds_name_table_find(const struct name_table *t, const char *name) {
        uint32_t h;

        if (!t->n_buckets)
                return NULL;
        h = fds_name_hash(name);
        for (struct name_node *n = t->buckets[h & (t->n_buckets - 1)]; n; n = n->hnext)
                if (n->hash == h && strcmp(n->name, name) == 0)
                        return n;
        return NULL;
}

/* Room for one more node (the table doubles at one node per bucket). */
static int name_table_reserve(struct name_table *t) {
        size_t n = t->n_buckets ? t->n_buckets * 2 : 256;
        struct name_node **b;

        if (t->n < t->n_buckets)
                return 0;
        b = calloc(n, sizeof(*b));
        if (!b)
                return -ENOMEM;
        NAME_TABLE_FOREACH(t, node) {
                node->hnext = b[node->hash & (n - 1)];
                b[node->hash & (n - 1)] = node;
        }
        free(t->buckets);
        t->buckets = b;
        t->n_buckets = n;
        return 0;
}

/* After name_table_reserve(). */
static void name_table_link(struct name_table *t, struct name_node *node, const char *name) {
        node->name = name;
        node->hash = fds_name_hash(name);
        node->hnext = t->buckets[node->hash & (t->n_buckets - 1)];
        t->buckets[node->hash & (t->n_buckets - 1)] = node;
        t->n++;
}

void fds_name_table_unlink(struct name_table *t, struct name_node *node) {
        for (struct name_node **pp = &t->buckets[node->hash & (t->n_buckets - 1)]; *pp; pp = &(*pp)->hnext)
                if (*pp == node) {
                        *pp = node->hnext;
                        t->n--;
                        return;
                }
}

/* A new container of `size` bytes whose name (a flexible array at
 * name_at) is name, zeroed and linked into t through its node at node_at;
 * NULL when out of memory. */
void *fds_name_table_new(struct name_table *t, size_t size, size_t node_at, size_t name_at,
                         const char *name) {
        size_t len = strlen(name);
        char *p;

        if (name_table_reserve(t) < 0 || !(p = calloc(1, size + len + 1)))
                return NULL;
        memcpy(p + name_at, name, len + 1);
        name_table_link(t, (struct name_node *)(p + node_at), p + name_at);
        return p;
}

struct fds_entry *fds_entry_of(struct name_node *node) {
        return node ? (struct fds_entry *)((char *)node - offsetof(struct fds_entry, node)) : NULL;
}

struct fds_entry *fds_entry_find(const struct vhub_fdstore *s, const char *name) {
        return fds_entry_of(fds_name_table_find(&s->names, name));
}

int fds_entry_new(struct vhub_fdstore *s, const char *name, int fd, struct fds_entry **ret) {
        struct fds_entry *e = fds_name_table_new(&s->names, sizeof(*e), offsetof(struct fds_entry, node),
                                                 offsetof(struct fds_entry, name), name);

        if (!e)
                return -ENOMEM;
        e->fd = fd;
        *ret = e;
        return 0;
}

void fds_entry_unlink_free(struct vhub_fdstore *s, struct fds_entry *e) {
        fds_name_table_unlink(&s->names, &e->node);
        free(e);
}

/* ---- the file index */

int fds_entry_inode(struct fds_entry *e) {
        struct stat st;

        if (e->have_inode)
                return 0;
        if (fstat(e->fd, &st) < 0)
                return -errno;
        e->dev = st.st_dev;
        e->ino = st.st_ino;
        e->have_inode = true;
        return 0;
}

/* Order of (fd's file) against b's: *ret < 0, 0 (the same open file), > 0. */
static int file_cmp(const struct vhub_fdstore *s, int fd, dev_t dev, ino_t ino,
                     const struct fds_entry *b, int *ret) {
        long r;

        if (dev != b->dev) {
                *ret = dev < b->dev ? -1 : 1;
                return 0;
        }
        if (ino != b->ino) {
                *ret = ino < b->ino ? -1 : 1;
                return 0;
        }
        /* same inode (all eventfds share one): only the kernel can tell
         * whether it is the same open file, as systemd's same_fd() asks */
        r = syscall(SYS_kcmp, s->pid, s->pid, KCMP_FILE, fd, b->fd);
        if (r < 0)
                return -errno;
        *ret = r == 0 ? 0 : r == 1 ? -1 : 1;
        return 0;
}

/* The first index whose file is not below fd's; *ret_same if it is fd's. */
int fds_files_search(const struct vhub_fdstore *s, int fd, dev_t dev, ino_t ino,
                     size_t *ret_pos, bool *ret_same) {
        size_t lo = 0, hi = s->n_files;
        bool same = false;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                int c = 0, r = file_cmp(s, fd, dev, ino, s->files[mid], &c);

                if (r < 0)
                        return r;
                if (c > 0)
                        lo = mid + 1;
                else {
                        hi = mid;
                        same = c == 0;
                }
        }
        *ret_pos = lo;
        *ret_same = same && lo < s->n_files;
        return 0;
}

static int files_reserve(struct vhub_fdstore *s, size_t n) {
        struct fds_entry **f;
        size_t cap;

        if (n <= s->cap_files)
                return 0;
        cap = s->cap_files ? s->cap_files : 64;
        while (cap < n)
                cap *= 2;
        f = realloc(s->files, cap * sizeof(*f));
        if (!f)
                return -ENOMEM;
        s->files = f;
        s->cap_files = cap;
        return 0;
}

static int files_merge(const struct vhub_fdstore *s, struct fds_entry **a, struct fds_entry **tmp,
                       size_t lo, size_t mid, size_t hi) {
        size_t i = lo, j = mid, k = lo;

        while (i < mid && j < hi) {
                int c = 0, r = file_cmp(s, a[i]->fd, a[i]->dev, a[i]->ino, a[j], &c);

                if (r < 0)
                        return r;
                tmp[k++] = c <= 0 ? a[i++] : a[j++];
        }
        while (i < mid)
                tmp[k++] = a[i++];
        while (j < hi)
                tmp[k++] = a[j++];
        memcpy(a + lo, tmp + lo, (hi - lo) * sizeof(*a));
        return 0;
}

/* Build the index from every STORED primary (after a restore registered
 * thousands at once: one sort instead of one insertion each). */
int fds_files_rebuild(struct vhub_fdstore *s) {
        struct fds_entry **tmp;
        size_t n = 0;
        int r;

        r = files_reserve(s, s->n_stored + 1);
        if (r < 0)
                return r;
        NAME_TABLE_FOREACH(&s->names, node) {
                        struct fds_entry *e = fds_entry_of(node);

                        if (e->state != ENTRY_STORED || e->stash)
                                continue;
                        r = fds_entry_inode(e);
                        if (r < 0) {
                                log_error("fd store: %s (fd %d): %s (closed before it was removed?)",
                                          e->name, e->fd, strerror(-r));
                                return r;
                        }
                        s->files[n++] = e;
                }
        tmp = malloc((n ? n : 1) * sizeof(*tmp));
        if (!tmp)
                return -ENOMEM;
        for (size_t width = 1; width < n; width *= 2)
                for (size_t lo = 0; lo + width < n; lo += 2 * width) {
                        size_t hi = lo + 2 * width < n ? lo + 2 * width : n;

                        r = files_merge(s, s->files, tmp, lo, lo + width, hi);
                        if (r < 0) {
                                free(tmp);
                                return r;
                        }
                }
        free(tmp);
        s->n_files = n;
        s->files_valid = true;
        return 0;
}

int fds_files_insert(struct vhub_fdstore *s, struct fds_entry *e, size_t pos) {
        int r = files_reserve(s, s->n_files + 1);

        if (r < 0)
                return r;
        memmove(s->files + pos + 1, s->files + pos, (s->n_files - pos) * sizeof(*s->files));
        s->files[pos] = e;
        s->n_files++;
        return 0;
}

void fds_files_remove(struct vhub_fdstore *s, struct fds_entry *e) {
        size_t pos = s->n_files;
        bool same = false;

        if (!s->files_valid || e->stash)
                return;
        if (fds_files_search(s, e->fd, e->dev, e->ino, &pos, &same) < 0 || !same || s->files[pos] != e)
                for (pos = 0; pos < s->n_files && s->files[pos] != e; pos++)
                        ;
        if (pos == s->n_files)
                return;
        memmove(s->files + pos, s->files + pos + 1, (s->n_files - pos - 1) * sizeof(*s->files));
        s->n_files--;
}
