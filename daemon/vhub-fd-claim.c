/* SPDX-License-Identifier: MIT */
/* Claiming a restored group's fds by identity key: see vhub-fd-claim.h. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-fd-claim.h"
#include "vhub-log.h"
#include "vhub-snapshot.h"
#include "vhu-fd.h"

void vhub_fd_claim_open(struct vhub_fdstore_restore *r, struct vhub_fdstore *s, const char *group,
                        struct vhub_fd_claim *ret) {
        int k;

        *ret = (struct vhub_fd_claim){ .store = s };
        snprintf(ret->group, sizeof(ret->group), "%s", group);
        k = r ? vhub_fdstore_take_group(r, group, &ret->m, &ret->n) : -ENOENT;
        if (k < 0 && k != -ENOENT)
                log_warning("fd store: group %s cannot be read back: %s", group, strerror(-k));
        if (k < 0) {
                ret->m = NULL;
                ret->n = 0;
        }
}

static bool key_set(const struct vhub_fd_key *k) {
        return k->dev != 0 || k->ino != 0;
}

int vhub_fd_claim(struct vhub_fd_claim *c, const struct vhub_fd_key *key) {
        if (!key_set(key))
                return -ENOENT;
        for (size_t i = 0; i < c->n; i++) {
                struct vhub_fdstore_member *m = &c->m[i];

                if (m->fd >= 0 && m->key.dev == key->dev && m->key.ino == key->ino &&
                    m->key.eventfd_id == key->eventfd_id)
                        return VHU_TAKE_FD(m->fd);
        }
        return -ENOENT;
}

void vhub_fd_claim_gone(struct vhub_fd_claim *c, int fd) {
        if (fd >= 0)
                (void)vhub_fdstore_group_remove(c->store, c->group, fd);
}

int vhub_fd_claim_drop(struct vhub_fd_claim *c, int fd) {
        vhub_fd_claim_gone(c, fd);
        return vhu_safe_close(fd);
}

size_t vhub_fd_claim_close(struct vhub_fd_claim *c) {
        size_t n = 0;

        for (size_t i = 0; i < c->n; i++) {
                if (c->m[i].fd < 0)
                        continue;
                c->m[i].fd = vhub_fd_claim_drop(c, c->m[i].fd);
                n++;
        }
        if (n > 0)
                log_info("fd store: %zu fds of group %s that no snapshot names were closed", n, c->group);
        free(c->m);
        c->m = NULL;
        c->n = 0;
        return n;
}

static void put_le64(uint8_t *p, uint64_t v) {
        for (int i = 0; i < 8; i++)
                p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le64(const uint8_t *p) {
        uint64_t v = 0;

        for (int i = 7; i >= 0; i--)
                v = (v << 8) | p[i];
        return v;
}

int vhub_snap_put_key(struct vhub_snap_writer *w, uint32_t tag, const struct vhub_fd_key *key) {
        uint8_t b[24];

        put_le64(b, key->dev);
        put_le64(b + 8, key->ino);
        put_le64(b + 16, key->eventfd_id);
        return vhub_snap_put_bytes(w, tag, b, sizeof(b));
}

int vhub_snap_get_key(const struct vhub_snap_rec *rec, struct vhub_fd_key *ret) {
        const void *p;
        size_t n;
        int r = vhub_snap_get_bytes(rec, &p, &n);

        if (r < 0)
                return r;
        if (n != 24)
                return -EBADMSG;
        *ret = (struct vhub_fd_key){ .dev = get_le64(p), .ino = get_le64((const uint8_t *)p + 8),
                                     .eventfd_id = get_le64((const uint8_t *)p + 16) };
        return 0;
}

int vhub_snap_put_fd(struct vhub_snap_writer *w, uint32_t tag, const struct vhub_fdstore *s,
                     const char *group, int fd) {
        struct vhub_fd_key key;

        if (fd < 0 || vhub_fdstore_group_key(s, group, fd, &key) < 0)
                return w->error;
        return vhub_snap_put_key(w, tag, &key);
}
