/* SPDX-License-Identifier: MIT */
/*
 * Counting suspended requests in an inflight region (daemon/vhub-inflight.c)
 * as a hostile back-end may have written it: the spec's layout, the last
 * batch a back-end did not finish clearing, uninitialized, short and
 * garbled regions, and fds that are not memory files.
 *
 *   test-vhub-inflight
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhost-user.h"
#include "vhub-check.h"
#include "vhub-inflight.h"

#define QUEUES 2
#define QSIZE 8
#define PER_QUEUE (sizeof(struct vhu_inflight_queue_split) + QSIZE * sizeof(struct vhu_inflight_desc_split))
#define SIZE (QUEUES * PER_QUEUE)

static uint8_t region[SIZE];

static struct vhu_inflight_queue_split *queue(unsigned q) {
        return (struct vhu_inflight_queue_split *) (region + q * PER_QUEUE);
}

static int memfd_with(const void *data, size_t len) {
        int fd = memfd_create("test-vhub-inflight", MFD_CLOEXEC);

        CHECK(fd >= 0);
        CHECK(write(fd, data, len) == (ssize_t) len);
        return fd;
}

static int count(int fd, uint64_t size, uint16_t qsize, unsigned q, uint16_t used, unsigned *n) {
        *n = 12345;
        return vhub_inflight_count_split(fd, size, qsize, q, used, n);
}

int main(void) {
        int fds_before = vhub_count_open_fds();
        unsigned n;
        int fd, p[2];

        /* ring 1: heads 2, 5, 7 in flight (fetched in that order), used idx 10 */
        memset(region, 0, sizeof(region));
        for (unsigned q = 0; q < QUEUES; q++) {
                queue(q)->version = 1;
                queue(q)->desc_num = QSIZE;
        }
        queue(1)->used_idx = 10;
        queue(1)->desc[2] = (struct vhu_inflight_desc_split) { .inflight = 1, .counter = 7 };
        queue(1)->desc[5] = (struct vhu_inflight_desc_split) { .inflight = 1, .counter = 8 };
        queue(1)->desc[7] = (struct vhu_inflight_desc_split) { .inflight = 1, .counter = 9 };
        fd = memfd_with(region, sizeof(region));
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 10, &n), 0);
        CHECK_EQ(n, 3);
        CHECK_EQ(count(fd, SIZE, QSIZE, 0, 0, &n), 0);
        CHECK_EQ(n, 0);
        close(fd);

        /* spec "When reconnecting": the used ring is 2 ahead of used_idx, the
         * last batch is 5 -> 7: those two are done, only 2 is in flight */
        queue(1)->last_batch_head = 5;
        queue(1)->desc[5].next = 7;
        fd = memfd_with(region, sizeof(region));
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 12, &n), 0);
        CHECK_EQ(n, 1);
        /* a batch longer than the ring, a chain through garbage: bounded */
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 10 + 60000, &n), 0);
        CHECK(n <= 3);
        close(fd);
        queue(1)->desc[7].next = 0xffff;
        fd = memfd_with(region, sizeof(region));
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 12, &n), 0);
        CHECK_EQ(n, 1);
        close(fd);

        /* inflight values other than 1 are not "in flight" */
        queue(1)->desc[2].inflight = 2;
        fd = memfd_with(region, sizeof(region));
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 10, &n), 0);
        CHECK_EQ(n, 2);
        close(fd);
        queue(1)->desc[2].inflight = 1;

        /* version 0: an uninitialized region records nothing */
        queue(1)->version = 0;
        fd = memfd_with(region, sizeof(region));
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 10, &n), 0);
        CHECK_EQ(n, 0);
        close(fd);

        /* garbled headers: another version, desc_num 0 or beyond queue_size */
        queue(1)->version = 2;
        fd = memfd_with(region, sizeof(region));
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 10, &n), -EPROTO);
        CHECK_EQ(n, 12345);
        close(fd);
        queue(1)->version = 1;
        queue(1)->desc_num = 0;
        fd = memfd_with(region, sizeof(region));
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 10, &n), -EPROTO);
        close(fd);
        queue(1)->desc_num = QSIZE + 1;
        fd = memfd_with(region, sizeof(region));
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 10, &n), -EPROTO);
        /* desc_num smaller than queue_size: only those entries */
        queue(1)->desc_num = 4;
        close(fd);
        fd = memfd_with(region, sizeof(region));
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 10, &n), 0);
        CHECK_EQ(n, 1);

        /* the ring's part beyond the size the back-end gave, or beyond the fd */
        CHECK_EQ(count(fd, SIZE - 1, QSIZE, 1, 10, &n), -ERANGE);
        CHECK_EQ(count(fd, SIZE, QSIZE, 2, 10, &n), -ERANGE);
        CHECK_EQ(count(fd, SIZE, 0, 0, 10, &n), -ERANGE);
        CHECK_EQ(count(fd, UINT64_MAX, QSIZE, 5, 10, &n), -ERANGE);
        CHECK_EQ(n, 12345);
        close(fd);
        fd = memfd_with(region, PER_QUEUE + 8);  /* truncated by the back-end */
        CHECK_EQ(count(fd, SIZE, QSIZE, 1, 10, &n), -ERANGE);
        close(fd);

        /* not a memory file: never read (a pipe here; FUSE would block) */
        CHECK(pipe2(p, O_CLOEXEC) == 0);
        CHECK_EQ(count(p[0], SIZE, QSIZE, 0, 0, &n), -EBADFD);
        close(p[0]);
        close(p[1]);
        fd = open("/dev/zero", O_RDONLY | O_CLOEXEC);
        CHECK(fd >= 0);
        CHECK_EQ(count(fd, SIZE, QSIZE, 0, 0, &n), -EBADFD);
        close(fd);

        CHECK_EQ(vhub_count_open_fds(), fds_before);
        printf("test-vhub-inflight: ok\n");
        return 0;
}
