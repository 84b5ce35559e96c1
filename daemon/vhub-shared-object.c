/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uuid/uuid.h>

#include "vhub-shared-object.h"
#include "vhu-fd.h"

void vhub_shared_table_init(struct vhub_shared_table *t) {
        memset(t, 0, sizeof(*t));
}

void vhub_shared_table_done(struct vhub_shared_table *t) {
        for (size_t i = 0; i < t->n; i++)
                t->objects[i].fd = vhu_safe_close(t->objects[i].fd);
        free(t->objects);
        vhub_shared_table_init(t);
}

struct vhub_shared_object *vhub_shared_table_find(struct vhub_shared_table *t, const uint8_t uuid[16]) {
        for (size_t i = 0; i < t->n; i++)
                if (memcmp(t->objects[i].uuid, uuid, 16) == 0)
                        return &t->objects[i];
        return NULL;
}

int vhub_shared_table_add(struct vhub_shared_table *t, const uint8_t uuid[16],
                          struct vhub_device *device, int fd, size_t max) {
        int r = 0;

        if (vhub_shared_table_find(t, uuid))
                r = -EEXIST;
        else if (t->n >= max)
                r = -ENOSPC;
        else if (t->n == t->cap) {
                size_t cap = t->cap ? t->cap * 2 : 8;
                struct vhub_shared_object *n = reallocarray(t->objects, cap, sizeof(*n));

                if (n) {
                        t->objects = n;
                        t->cap = cap;
                } else
                        r = -ENOMEM;
        }
        if (r < 0) {
                vhu_safe_close(fd);
                return r;
        }
        memcpy(t->objects[t->n].uuid, uuid, 16);
        t->objects[t->n].device = device;
        t->objects[t->n].fd = fd;
        t->n++;
        return 0;
}

static void remove_at(struct vhub_shared_table *t, size_t i) {
        vhu_safe_close(t->objects[i].fd);
        t->objects[i] = t->objects[--t->n];
}

int vhub_shared_table_remove(struct vhub_shared_table *t, const uint8_t uuid[16],
                             const struct vhub_device *owner) {
        for (size_t i = 0; i < t->n; i++) {
                if (memcmp(t->objects[i].uuid, uuid, 16) != 0)
                        continue;
                if (t->objects[i].device != owner)
                        return -EPERM;
                remove_at(t, i);
                return 0;
        }
        return -ENOENT;
}

void vhub_shared_table_drop_device(struct vhub_shared_table *t, const struct vhub_device *device) {
        for (size_t i = 0; i < t->n;)
                if (t->objects[i].device == device)
                        remove_at(t, i);
                else
                        i++;
}

void vhub_uuid_format(const uint8_t uuid[16], char out[37]) {
        uuid_unparse_lower(uuid, out);
}

int vhub_uuid_parse(const char *s, uint8_t out[16]) {
        /* uuid_parse accepts exactly the 36-character form */
        if (!s || strlen(s) != 36 || uuid_parse(s, out) < 0)
                return -EINVAL;
        return 0;
}
