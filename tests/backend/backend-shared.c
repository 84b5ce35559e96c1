/* SPDX-License-Identifier: MIT */
/*
 * Shared objects (virtio-dmabuf) this back-end exports: a memfd filled with a
 * pattern under a UUID, per socket, answered on GET_SHARED_OBJECT.  The
 * objects outlive connections: the process is the device.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "backend.h"

struct tb_shared *tb_shared_find(struct tb_sock *s, const uint8_t uuid[16]) {
        for (unsigned i = 0; i < s->n_shared; i++)
                if (memcmp(s->shared[i].uuid, uuid, 16) == 0)
                        return &s->shared[i];
        return NULL;
}

int tb_shared_export(struct tb_sock *s, const uint8_t uuid[16], uint64_t size,
                     const uint8_t *fill, size_t fill_len, struct tb_shared **ret) {
        if (tb_shared_find(s, uuid))
                return -EEXIST;
        if (s->n_shared >= TB_MAX_SHARED)
                return -ENOSPC;
        if (size == 0 || size > TB_MAX_SHARED_SIZE)
                return -EINVAL;
        int fd = tb_memfd_new("vhub-tb-shared", size);
        if (fd < 0)
                return fd;
        if (fill_len > 0) {
                uint8_t *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                if (map == MAP_FAILED) {
                        int r = -errno;
                        close(fd);
                        return r;
                }
                for (uint64_t i = 0; i < size; i++)
                        map[i] = fill[i % fill_len];
                munmap(map, size);
        }
        struct tb_shared *o = &s->shared[s->n_shared++];
        *o = (struct tb_shared) { .fd = fd, .size = size };
        memcpy(o->uuid, uuid, 16);
        if (ret)
                *ret = o;
        return 0;
}

int tb_shared_remove(struct tb_sock *s, const uint8_t uuid[16]) {
        struct tb_shared *o = tb_shared_find(s, uuid);
        if (!o)
                return -ENOENT;
        close(o->fd);
        unsigned i = (unsigned) (o - s->shared);
        memmove(o, o + 1, (s->n_shared - i - 1) * sizeof(*o));
        s->n_shared--;
        return 0;
}

void tb_shared_clear(struct tb_sock *s) {
        for (unsigned i = 0; i < s->n_shared; i++)
                close(s->shared[i].fd);
        s->n_shared = 0;
}
