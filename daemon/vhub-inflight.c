/* SPDX-License-Identifier: MIT */
/* Reading a device's inflight region (see vhub-inflight.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

#include "vhost-user.h"
#include "vhub-inflight.h"

static int read_exact(int fd, void *buf, size_t len, uint64_t off) {
        uint8_t *b = buf;

        while (len > 0) {
                ssize_t n = pread(fd, b, len, (off_t) off);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        return -ERANGE; /* the fd ends before the region does */
                b += n;
                len -= (size_t) n;
                off += (uint64_t) n;
        }
        return 0;
}

int vhub_inflight_count_split(int fd, uint64_t size, uint16_t queue_size, unsigned queue,
                              uint16_t ring_used_idx, unsigned *ret_count) {
        struct vhu_inflight_queue_split hdr;
        struct vhu_inflight_desc_split *desc = NULL;
        uint64_t per_queue = sizeof(hdr) + (uint64_t) queue_size * sizeof(*desc);
        uint64_t off = (uint64_t) queue * per_queue;
        bool *in_last_batch = NULL;
        unsigned count = 0;
        int r;

        if (queue_size == 0 || off + per_queue > size)
                return -ERANGE;
        /* The loop must not block: only a memory file (memfd, tmpfs -- the
         * ones F_GET_SEALS works on) is read; the back-end chose the fd, and
         * a FUSE file or a pipe could stall every device. */
        if (fcntl(fd, F_GET_SEALS) < 0)
                return -EBADFD;
        r = read_exact(fd, &hdr, sizeof(hdr), off);
        if (r < 0)
                return r;
        /* spec: "Zero value indicates an uninitialized buffer": nothing recorded */
        if (hdr.version == 0) {
                *ret_count = 0;
                return 0;
        }
        if (hdr.version != 1 || hdr.desc_num == 0 || hdr.desc_num > queue_size)
                return -EPROTO;
        desc = calloc(hdr.desc_num, sizeof(*desc));
        in_last_batch = calloc(hdr.desc_num, sizeof(*in_last_batch));
        if (!desc || !in_last_batch) {
                r = -ENOMEM;
                goto out;
        }
        r = read_exact(fd, desc, (size_t) hdr.desc_num * sizeof(*desc), off + sizeof(hdr));
        if (r < 0)
                goto out;
        /* spec "When reconnecting": a batch already in the used ring whose
         * inflight flags were not cleared yet is done, not in flight */
        if (hdr.used_idx != ring_used_idx) {
                uint16_t batch = (uint16_t) (ring_used_idx - hdr.used_idx);
                uint16_t h = hdr.last_batch_head;

                for (unsigned k = 0; k < batch && k < hdr.desc_num && h < hdr.desc_num; k++) {
                        in_last_batch[h] = true;
                        h = desc[h].next;
                }
        }
        for (unsigned i = 0; i < hdr.desc_num; i++)
                if (desc[i].inflight == 1 && !in_last_batch[i])
                        count++;
        *ret_count = count;
        r = 0;
out:
        free(desc);
        free(in_last_batch);
        return r;
}
