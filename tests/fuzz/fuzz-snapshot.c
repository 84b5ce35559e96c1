/* SPDX-License-Identifier: MIT */
/*
 * Fuzz target for the snapshot reader (daemon/vhub-snapshot.c): what a
 * restarted daemon reads back from memfds in the fd store must never crash
 * it, whatever the bytes.  The first input byte picks what the rest is:
 *
 *   0  a whole document (header, CRC, records)
 *   1  a payload: wrapped in a correct header and CRC here, so the fuzzer
 *      reaches the record tree instead of stopping at the checksum
 *   2  a snapshot file: the bytes become a memfd of two 4 KiB slots
 *      (truncated or zero-padded), read and adopted as after a restart
 *
 * Every record of an accepted tree goes through every typed getter.  As an
 * ordinary test the committed corpus (tests/fuzz/corpus-snapshot) is
 * replayed by protocol/tests/fuzz-replay.c.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhub-snapshot.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Every record also goes through a field table (vhub_snap_get_field()) with
 * a row of each type, a bounded one and a seen flag, by its tag. */
struct fields { uint64_t u64; int64_t i64; uint32_t u32, bounded; uint16_t u16; bool b, seen; char str[16]; };

static const struct vhub_snap_field field_table[] = {
        [1] = VHUB_SNAP_FIELD(U64, struct fields, u64),   [2] = VHUB_SNAP_FIELD(I64, struct fields, i64),
        [3] = VHUB_SNAP_FIELD(U32, struct fields, u32),   [5] = VHUB_SNAP_FIELD(U16, struct fields, u16),
        [6] = VHUB_SNAP_FIELD(BOOL, struct fields, b),    [7] = VHUB_SNAP_FIELD(STR, struct fields, str),
        [4] = VHUB_SNAP_FIELD(U32, struct fields, bounded, VHUB_SNAP_UPTO(7), VHUB_SNAP_SEEN(struct fields, seen)),
};

static void walk(struct vhub_snap_iter *it, unsigned *budget) {
        struct vhub_snap_rec rec;

        while (*budget > 0 && vhub_snap_next(it, &rec) > 0) {
                char text[300];
                struct fields fields = { 0 };
                struct vhub_snap_iter in;
                const void *p;
                uint64_t u64;
                int64_t i64;
                uint32_t u32;
                size_t len;
                bool b;

                (*budget)--;
                (void) vhub_snap_unknown(&rec);
                (void) VHUB_SNAP_GET_FIELD(field_table, &rec, &fields);
                (void) vhub_snap_get_u64(&rec, &u64);
                (void) vhub_snap_get_i64(&rec, &i64);
                (void) vhub_snap_get_u32(&rec, &u32);
                (void) vhub_snap_get_bool(&rec, &b);
                (void) vhub_snap_get_str(&rec, text, sizeof(text));
                (void) vhub_snap_get_fdname(&rec, text, sizeof(text));
                if (vhub_snap_get_bytes(&rec, &p, &len) == 0 && len)
                        /* touch the whole value: ASan checks it lies in the input */
                        (void) vhub_snap_crc32c(0, p, len);
                if (vhub_snap_enter(&rec, &in) == 0)
                        walk(&in, budget);
        }
}

static void read_doc(const uint8_t *buf, size_t len) {
        struct vhub_snap_doc doc;
        struct vhub_snap_iter it;
        const char *why = NULL;
        unsigned budget = 100000;

        if (vhub_snap_parse(buf, len, &doc, &why) < 0)
                return;
        vhub_snap_doc_iter(&doc, &it);
        walk(&it, &budget);
}

static void read_payload(const uint8_t *payload, size_t n) {
        uint8_t *doc = malloc(VHUB_SNAP_HEADER_SIZE + n);
        uint32_t len = (uint32_t) n, hs = VHUB_SNAP_HEADER_SIZE, crc;
        uint16_t one = 1;
        uint64_t gen = 1;

        if (!doc)
                return;
        memcpy(doc, VHUB_SNAP_MAGIC, 8);
        memcpy(doc + 8, &one, 2);
        memcpy(doc + 10, &one, 2);
        memcpy(doc + 12, &hs, 4);
        memcpy(doc + 16, &gen, 8);
        memcpy(doc + 24, &len, 4);
        if (n)
                memcpy(doc + VHUB_SNAP_HEADER_SIZE, payload, n);
        crc = vhub_snap_crc32c(0, doc, 28);
        crc = vhub_snap_crc32c(crc, doc + VHUB_SNAP_HEADER_SIZE, n);
        memcpy(doc + 28, &crc, 4);
        read_doc(doc, VHUB_SNAP_HEADER_SIZE + n);
        free(doc);
}

static void read_file(const uint8_t *data, size_t n) {
        struct vhub_snap_file f;
        const char *why = NULL;
        void *buf = NULL;
        size_t len;
        int fd = memfd_create("fuzz-snapshot", MFD_CLOEXEC);

        if (fd < 0)
                return;
        if (n > 2 * VHUB_SNAP_SLOT_MIN)
                n = 2 * VHUB_SNAP_SLOT_MIN;
        if (ftruncate(fd, 2 * VHUB_SNAP_SLOT_MIN) == 0 && pwrite(fd, data, n, 0) == (ssize_t) n) {
                if (vhub_snap_file_read(fd, &buf, &len, &why) == 0) {
                        read_doc(buf, len);
                        free(buf);
                }
                /* fd is taken whatever the outcome */
                if (vhub_snap_file_adopt(fd, &f, &why) == 0) {
                        struct vhub_snap_writer w;

                        /* a restarted daemon writes on: that must work too */
                        vhub_snap_writer_init(&w);
                        vhub_snap_put_u64(&w, 1, 1);
                        (void) vhub_snap_file_commit(&f, &w);
                        vhub_snap_writer_done(&w);
                        vhub_snap_file_close(&f);
                }
                return;
        }
        close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (size == 0)
                return 0;
        switch (data[0]) {
        case 0:
                read_doc(data + 1, size - 1);
                break;
        case 1:
                read_payload(data + 1, size - 1);
                break;
        case 2:
                read_file(data + 1, size - 1);
                break;
        default:
                break;
        }
        return 0;
}
