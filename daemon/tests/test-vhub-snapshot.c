/* SPDX-License-Identifier: MIT */
/*
 * The snapshot format (daemon/vhub-snapshot.c): a VM-shaped document written
 * and read back, unknown and critical records, the version rule, hostile
 * bytes (every truncation, every bit flip, malformed records under a valid
 * CRC), writer limits, and the two-slot memfd: torn writes, growth from
 * either slot, adoption after a restart.
 *
 *   test-vhub-snapshot [FIXTURE]      FIXTURE: a version-1 document kept in
 *                                     the tree, which every later reader
 *                                     must still read
 *   test-vhub-snapshot --write-fixture PATH
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vhub-check.h"
#include "vhub-snapshot.h"

/* a VM as the model will write it (the tags are this test's own) */
enum {
        T_VM = 1, T_VM_NAME = 1, T_VM_UID = 2, T_VM_LINGER = 3, T_REGION = 4, T_DEVICE = 5,
        T_REGION_GPA = 1, T_REGION_SIZE = 2, T_REGION_FD = 3,
        T_DEV_NAME = 1, T_DEV_FEATURES = 2, T_DEV_RUNNING = 3, T_DEV_RING = 4, T_DEV_CONFIG = 5,
        T_RING_INDEX = 1, T_RING_KICK = 2, T_RING_BASE = 3,
        T_FUTURE = 99,
};

static void write_vm(struct vhub_snap_writer *w, const char *vm, unsigned regions, unsigned devices,
                     unsigned rings) {
        char name[128];

        vhub_snap_begin(w, T_VM);
        vhub_snap_put_str(w, T_VM_NAME, vm);
        vhub_snap_put_u32(w, T_VM_UID, 1000);
        vhub_snap_put_i64(w, T_VM_LINGER, -1);
        for (unsigned r = 0; r < regions; r++) {
                vhub_snap_begin(w, T_REGION);
                vhub_snap_put_u64(w, T_REGION_GPA, (uint64_t) r << 30);
                vhub_snap_put_u64(w, T_REGION_SIZE, 1ull << 30);
                snprintf(name, sizeof(name), "vm/1000/%s/region/%u", vm, r);
                vhub_snap_put_fdname(w, T_REGION_FD, name);
                vhub_snap_end(w);
        }
        for (unsigned d = 0; d < devices; d++) {
                uint8_t config[60];

                memset(config, (int) d, sizeof(config));
                vhub_snap_begin(w, T_DEVICE);
                snprintf(name, sizeof(name), "blk%u", d);
                vhub_snap_put_str(w, T_DEV_NAME, name);
                vhub_snap_put_u64(w, T_DEV_FEATURES, 0x1300000000ull | d);
                vhub_snap_put_bool(w, T_DEV_RUNNING, d % 2 == 0);
                vhub_snap_put_bytes(w, T_DEV_CONFIG, config, sizeof(config));
                for (unsigned q = 0; q < rings; q++) {
                        vhub_snap_begin(w, T_DEV_RING);
                        vhub_snap_put_u32(w, T_RING_INDEX, q);
                        snprintf(name, sizeof(name), "dev/1000/%s/blk%u/ring%u.kick", vm, d, q);
                        vhub_snap_put_fdname(w, T_RING_KICK, name);
                        vhub_snap_put_u32(w, T_RING_BASE, 100 + q);
                        vhub_snap_end(w);
                }
                vhub_snap_end(w);
        }
        vhub_snap_end(w);
}

/* Read back what write_vm() wrote, checking every value; unknown tags are
 * handled as a reader must (skip, or refuse when critical). */
static int read_vm(struct vhub_snap_iter *vm_it, const char *want_vm, unsigned regions, unsigned devices,
                   unsigned rings, unsigned *ret_unknown) {
        unsigned n_regions = 0, n_devices = 0, unknown = 0;
        struct vhub_snap_rec rec;
        char buf[256], want[256];
        int k;

        while ((k = vhub_snap_next(vm_it, &rec)) > 0) {
                struct vhub_snap_iter in;
                struct vhub_snap_rec f;
                uint64_t u64;
                int64_t i64;
                uint32_t u32;

                switch (rec.tag) {
                case T_VM_NAME:
                        CHECK_EQ(vhub_snap_get_str(&rec, buf, sizeof(buf)), 0);
                        CHECK(strcmp(buf, want_vm) == 0);
                        break;
                case T_VM_UID:
                        CHECK_EQ(vhub_snap_get_u32(&rec, &u32), 0);
                        CHECK_EQ(u32, 1000);
                        break;
                case T_VM_LINGER:
                        CHECK_EQ(vhub_snap_get_i64(&rec, &i64), 0);
                        CHECK_EQ(i64, -1);
                        break;
                case T_REGION:
                        CHECK_EQ(vhub_snap_enter(&rec, &in), 0);
                        while (vhub_snap_next(&in, &f) > 0) {
                                if (f.tag == T_REGION_GPA) {
                                        CHECK_EQ(vhub_snap_get_u64(&f, &u64), 0);
                                        CHECK_EQ(u64, (uint64_t) n_regions << 30);
                                } else if (f.tag == T_REGION_FD) {
                                        CHECK_EQ(vhub_snap_get_fdname(&f, buf, sizeof(buf)), 0);
                                        snprintf(want, sizeof(want), "vm/1000/%s/region/%u", want_vm, n_regions);
                                        CHECK(strcmp(buf, want) == 0);
                                }
                        }
                        n_regions++;
                        break;
                case T_DEVICE: {
                        unsigned n_rings = 0;
                        bool running;

                        CHECK_EQ(vhub_snap_enter(&rec, &in), 0);
                        while (vhub_snap_next(&in, &f) > 0) {
                                struct vhub_snap_iter rin;
                                struct vhub_snap_rec g;
                                const void *p;
                                size_t len;

                                switch (f.tag) {
                                case T_DEV_FEATURES:
                                        CHECK_EQ(vhub_snap_get_u64(&f, &u64), 0);
                                        CHECK_EQ(u64, 0x1300000000ull | n_devices);
                                        break;
                                case T_DEV_RUNNING:
                                        CHECK_EQ(vhub_snap_get_bool(&f, &running), 0);
                                        CHECK_EQ(running, n_devices % 2 == 0);
                                        break;
                                case T_DEV_CONFIG:
                                        CHECK_EQ(vhub_snap_get_bytes(&f, &p, &len), 0);
                                        CHECK_EQ(len, 60);
                                        CHECK_EQ(((const uint8_t *) p)[59], n_devices);
                                        break;
                                case T_DEV_RING:
                                        CHECK_EQ(vhub_snap_enter(&f, &rin), 0);
                                        while (vhub_snap_next(&rin, &g) > 0)
                                                if (g.tag == T_RING_BASE) {
                                                        CHECK_EQ(vhub_snap_get_u32(&g, &u32), 0);
                                                        CHECK_EQ(u32, 100 + n_rings);
                                                }
                                        n_rings++;
                                        break;
                                default:
                                        break;
                                }
                        }
                        CHECK_EQ(n_rings, rings);
                        n_devices++;
                        break;
                }
                default:
                        unknown++;
                        k = vhub_snap_unknown(&rec);
                        if (k < 0)
                                return k;
                }
        }
        CHECK_EQ(k, 0);
        CHECK_EQ(n_regions, regions);
        CHECK_EQ(n_devices, devices);
        if (ret_unknown)
                *ret_unknown = unknown;
        return 0;
}

static int read_doc(const void *buf, size_t len, unsigned *ret_unknown) {
        struct vhub_snap_doc doc;
        struct vhub_snap_iter it, vm;
        struct vhub_snap_rec rec;
        const char *why = NULL;
        int k;

        k = vhub_snap_parse(buf, len, &doc, &why);
        if (k < 0)
                return k;
        vhub_snap_doc_iter(&doc, &it);
        CHECK_EQ(vhub_snap_next(&it, &rec), 1);
        CHECK_EQ(rec.tag, T_VM);
        CHECK_EQ(vhub_snap_enter(&rec, &vm), 0);
        k = read_vm(&vm, "vm0", 8, 4, 2, ret_unknown);
        if (k < 0)
                return k;
        CHECK_EQ(vhub_snap_next(&it, &rec), 0);
        return 0;
}

/* Rewrite a document's version fields and CRC (as another writer would). */
static void restamp(uint8_t *doc, size_t len, unsigned version, unsigned compat) {
        uint32_t crc, payload;

        doc[8] = (uint8_t) version;
        doc[9] = (uint8_t) (version >> 8);
        doc[10] = (uint8_t) compat;
        doc[11] = (uint8_t) (compat >> 8);
        memcpy(&payload, doc + 24, 4);
        CHECK_EQ(payload, len - VHUB_SNAP_HEADER_SIZE);
        crc = vhub_snap_crc32c(0, doc, 28);
        crc = vhub_snap_crc32c(crc, doc + 32, payload);
        memcpy(doc + 28, &crc, 4);
}

/* A document from raw payload bytes, with a correct header and CRC. */
static size_t raw_doc(uint8_t *out, const void *payload, size_t n) {
        uint32_t len = (uint32_t) n, hs = VHUB_SNAP_HEADER_SIZE;
        uint64_t gen = 1;

        memcpy(out, VHUB_SNAP_MAGIC, 8);
        memcpy(out + 12, &hs, 4);
        memcpy(out + 16, &gen, 8);
        memcpy(out + 24, &len, 4);
        memcpy(out + 32, payload, n);
        restamp(out, 32 + n, 1, 1);
        return 32 + n;
}

static uint32_t crc32c_bitwise(const uint8_t *p, size_t n) {
        uint32_t crc = 0xffffffffu;

        while (n--) {
                crc ^= *p++;
                for (int k = 0; k < 8; k++)
                        crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1)));
        }
        return ~crc;
}

static void test_crc(void) {
        uint8_t buf[1000];

        CHECK_EQ(vhub_snap_crc32c(0, "123456789", 9), 0xe3069283u);
        for (size_t i = 0; i < sizeof(buf); i++)
                buf[i] = (uint8_t) (i * 7 + 3);
        for (size_t n = 0; n < sizeof(buf); n += 37)
                CHECK_EQ(vhub_snap_crc32c(0, buf, n), crc32c_bitwise(buf, n));
        /* chaining equals one pass */
        CHECK_EQ(vhub_snap_crc32c(vhub_snap_crc32c(0, buf, 300), buf + 300, 700), vhub_snap_crc32c(0, buf, 1000));
        printf("ok: CRC-32C matches the bitwise definition\n");
}

static void test_round_trip(void) {
        struct vhub_snap_writer w;
        struct vhub_snap_doc doc;
        const void *buf;
        size_t len;
        unsigned unknown = 99;

        vhub_snap_writer_init(&w);
        write_vm(&w, "vm0", 8, 4, 2);
        CHECK_EQ(vhub_snap_finish(&w, 42, &buf, &len), 0);
        CHECK_EQ(vhub_snap_parse(buf, len, &doc, NULL), 0);
        CHECK_EQ(doc.generation, 42);
        CHECK_EQ(doc.version, VHUB_SNAP_VERSION);
        CHECK_EQ(read_doc(buf, len, &unknown), 0);
        CHECK_EQ(unknown, 0);
        printf("ok: a VM with 8 regions and 4 devices x 2 rings reads back (%zu bytes)\n", len);

        /* the same writer, reset, writes the next document in place */
        vhub_snap_writer_reset(&w);
        CHECK_EQ(vhub_snap_finish(&w, 43, &buf, &len), 0);
        CHECK_EQ(len, VHUB_SNAP_HEADER_SIZE);
        CHECK_EQ(vhub_snap_parse(buf, len, &doc, NULL), 0);
        CHECK_EQ(doc.payload_len, 0);
        vhub_snap_writer_done(&w);

        /* a fresh writer's empty document */
        vhub_snap_writer_init(&w);
        CHECK_EQ(vhub_snap_finish(&w, 1, &buf, &len), 0);
        CHECK_EQ(vhub_snap_parse(buf, len, &doc, NULL), 0);
        vhub_snap_writer_done(&w);
        printf("ok: empty documents\n");
}

/* A newer writer adds records: skipped unless flagged critical. */
static void test_unknown_and_versions(void) {
        struct vhub_snap_writer w;
        const void *buf;
        const char *why = NULL;
        struct vhub_snap_doc doc;
        uint8_t *copy;
        size_t len;
        unsigned unknown = 0;

        vhub_snap_writer_init(&w);
        vhub_snap_begin(&w, T_VM);
        vhub_snap_put_u64(&w, T_FUTURE, 7);
        vhub_snap_begin(&w, T_FUTURE + 1);
        vhub_snap_put_str(&w, 1, "whatever a newer daemon keeps");
        vhub_snap_end(&w);
        vhub_snap_end(&w);
        CHECK_EQ(vhub_snap_finish(&w, 1, &buf, &len), 0);
        {
                struct vhub_snap_iter it, vm;
                struct vhub_snap_rec rec;

                CHECK_EQ(vhub_snap_parse(buf, len, &doc, NULL), 0);
                vhub_snap_doc_iter(&doc, &it);
                CHECK_EQ(vhub_snap_next(&it, &rec), 1);
                CHECK_EQ(vhub_snap_enter(&rec, &vm), 0);
                CHECK_EQ(read_vm(&vm, "", 0, 0, 0, &unknown), 0);
                CHECK_EQ(unknown, 2);
        }
        printf("ok: unknown records are skipped\n");

        vhub_snap_writer_reset(&w);
        vhub_snap_begin(&w, T_VM);
        vhub_snap_put_u64(&w, T_FUTURE | VHUB_SNAP_CRITICAL, 7);
        vhub_snap_end(&w);
        CHECK_EQ(vhub_snap_finish(&w, 1, &buf, &len), 0);
        {
                struct vhub_snap_iter it, vm;
                struct vhub_snap_rec rec;

                CHECK_EQ(vhub_snap_parse(buf, len, &doc, NULL), 0);
                vhub_snap_doc_iter(&doc, &it);
                CHECK_EQ(vhub_snap_next(&it, &rec), 1);
                CHECK_EQ(vhub_snap_enter(&rec, &vm), 0);
                CHECK_EQ(vhub_snap_next(&vm, &rec), 1);
                CHECK(rec.critical);
                CHECK_EQ(rec.tag, T_FUTURE);
                CHECK_EQ(vhub_snap_unknown(&rec), -EPROTONOSUPPORT);
        }
        printf("ok: an unknown critical record is refused\n");

        /* the version rule: a newer writer whose compat this reader meets is
         * read; one that needs a newer reader is refused, with a reason */
        vhub_snap_writer_reset(&w);
        write_vm(&w, "vm0", 8, 4, 2);
        CHECK_EQ(vhub_snap_finish(&w, 5, &buf, &len), 0);
        copy = malloc(len);
        CHECK(copy);
        memcpy(copy, buf, len);
        restamp(copy, len, VHUB_SNAP_VERSION + 1, VHUB_SNAP_VERSION);
        CHECK_EQ(read_doc(copy, len, NULL), 0);
        restamp(copy, len, VHUB_SNAP_VERSION + 1, VHUB_SNAP_VERSION + 1);
        CHECK_EQ(vhub_snap_parse(copy, len, &doc, &why), -EPROTONOSUPPORT);
        CHECK(why && strstr(why, "newer"));
        CHECK_EQ(doc.compat, VHUB_SNAP_VERSION + 1);    /* for the log line */
        printf("ok: compat <= %u read, compat %u refused: %s\n", VHUB_SNAP_VERSION, VHUB_SNAP_VERSION + 1, why);
        restamp(copy, len, 3, 4);       /* compat above version: not a real writer */
        CHECK_EQ(vhub_snap_parse(copy, len, &doc, &why), -EBADMSG);
        free(copy);
        vhub_snap_writer_done(&w);
}

/* Every truncation and every single-bit flip of a valid document is
 * refused, and nothing reads outside the buffer (ASan build). */
static void test_corruption(void) {
        struct vhub_snap_writer w;
        struct vhub_snap_doc doc;
        const void *buf;
        uint8_t *copy;
        size_t len;
        unsigned refused = 0;

        vhub_snap_writer_init(&w);
        write_vm(&w, "vm0", 8, 4, 2);
        CHECK_EQ(vhub_snap_finish(&w, 9, &buf, &len), 0);
        for (size_t n = 0; n < len; n++) {
                copy = malloc(n ? n : 1);
                CHECK(copy);
                memcpy(copy, buf, n);
                CHECK(vhub_snap_parse(copy, n, &doc, NULL) < 0);
                free(copy);
        }
        copy = malloc(len);
        CHECK(copy);
        for (size_t i = 0; i < len; i++)
                for (int bit = 0; bit < 8; bit++) {
                        memcpy(copy, buf, len);
                        copy[i] ^= (uint8_t) (1u << bit);
                        if (vhub_snap_parse(copy, len, &doc, NULL) < 0)
                                refused++;
                }
        CHECK_EQ(refused, len * 8);
        free(copy);
        vhub_snap_writer_done(&w);
        printf("ok: all %zu truncations and %zu bit flips refused\n", len, len * 8);
}

/* Malformed trees under a correct CRC: what a bug or a hostile store could
 * hand the reader. */
static void test_malformed(void) {
        static const struct {
                const char *what;
                uint8_t payload[40];
                size_t n;
        } cases[] = {
                { "record header cut", { 1, 0, 2, 0 }, 4 },
                { "length past the end", { 1, 0, 2, 0, 9, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8 }, 16 },
                { "u64 of 4 bytes", { 1, 0, 2, 0, 4, 0, 0, 0, 1, 2, 3, 4 }, 12 },
                { "u32 of 8 bytes", { 1, 0, 3, 0, 8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8 }, 16 },
                { "bool 2", { 1, 0, 4, 0, 1, 0, 0, 0, 2 }, 9 },
                { "kind 0", { 1, 0, 0, 0, 0, 0, 0, 0 }, 8 },
                { "unknown flag", { 1, 0, 2, 0x80, 8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8 }, 16 },
                { "NUL in a string", { 1, 0, 5, 0, 3, 0, 0, 0, 'a', 0, 'b' }, 11 },
                { "':' in an fd name", { 1, 0, 7, 0, 3, 0, 0, 0, 'a', ':', 'b' }, 11 },
                { "empty fd name", { 1, 0, 7, 0, 0, 0, 0, 0 }, 8 },
                { "newline in an fd name", { 1, 0, 7, 0, 2, 0, 0, 0, 'a', '\n' }, 10 },
                { "nest longer than its parent", { 1, 0, 1, 0, 12, 0, 0, 0, 2, 0, 2, 0, 8, 0, 0, 0,
                                                   1, 2, 3, 4, 5, 6, 7, 8 }, 24 },
                { "bad record inside a nest", { 1, 0, 1, 0, 9, 0, 0, 0, 2, 0, 4, 0, 1, 0, 0, 0, 7 }, 17 },
        };
        uint8_t doc_buf[32 + 8 * (VHUB_SNAP_MAX_DEPTH + 2)];
        struct vhub_snap_doc doc;

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                const char *why = NULL;
                size_t len = raw_doc(doc_buf, cases[i].payload, cases[i].n);

                if (vhub_snap_parse(doc_buf, len, &doc, &why) != -EBADMSG) {
                        fprintf(stderr, "accepted: %s\n", cases[i].what);
                        abort();
                }
                CHECK(why);
        }
        /* a kind this reader does not know is structurally fine and skipped */
        {
                const uint8_t p[] = { 1, 0, 200, 0, 3, 0, 0, 0, 1, 2, 3 };
                struct vhub_snap_iter it;
                struct vhub_snap_rec rec;
                uint64_t v;
                size_t len = raw_doc(doc_buf, p, sizeof(p));

                CHECK_EQ(vhub_snap_parse(doc_buf, len, &doc, NULL), 0);
                vhub_snap_doc_iter(&doc, &it);
                CHECK_EQ(vhub_snap_next(&it, &rec), 1);
                CHECK_EQ(vhub_snap_unknown(&rec), 0);
                CHECK_EQ(vhub_snap_get_u64(&rec, &v), -EBADMSG);
        }
        /* nesting deeper than VHUB_SNAP_MAX_DEPTH */
        {
                uint8_t p[8 * (VHUB_SNAP_MAX_DEPTH + 2)];
                size_t n = sizeof(p), len;

                for (unsigned d = 0; d < VHUB_SNAP_MAX_DEPTH + 2; d++) {
                        uint32_t inner = (uint32_t) (n - 8 * (d + 1));

                        p[8 * d] = 1;
                        p[8 * d + 1] = 0;
                        p[8 * d + 2] = VHUB_SNAP_NEST;
                        p[8 * d + 3] = 0;
                        memcpy(p + 8 * d + 4, &inner, 4);
                }
                len = raw_doc(doc_buf, p, n);
                CHECK_EQ(vhub_snap_parse(doc_buf, len, &doc, NULL), -EBADMSG);
        }
        /* a typed getter on the wrong kind, a string that does not fit */
        {
                const uint8_t p[] = { 1, 0, 5, 0, 5, 0, 0, 0, 'h', 'e', 'l', 'l', 'o' };
                struct vhub_snap_iter it;
                struct vhub_snap_rec rec;
                char small[5];
                uint32_t v;
                bool b;
                size_t len = raw_doc(doc_buf, p, sizeof(p));

                CHECK_EQ(vhub_snap_parse(doc_buf, len, &doc, NULL), 0);
                vhub_snap_doc_iter(&doc, &it);
                CHECK_EQ(vhub_snap_next(&it, &rec), 1);
                CHECK_EQ(vhub_snap_get_u32(&rec, &v), -EBADMSG);
                CHECK_EQ(vhub_snap_get_bool(&rec, &b), -EBADMSG);
                CHECK_EQ(vhub_snap_get_fdname(&rec, small, sizeof(small)), -EBADMSG);
                CHECK_EQ(vhub_snap_enter(&rec, &it), -EBADMSG);
                CHECK_EQ(vhub_snap_get_str(&rec, small, sizeof(small)), -ENAMETOOLONG);
        }
        printf("ok: %zu malformed trees refused, unknown kinds skipped\n", sizeof(cases) / sizeof(cases[0]));
}

static void test_writer_errors(void) {
        struct vhub_snap_writer w;
        const void *buf;
        size_t len;

        vhub_snap_writer_init(&w);
        for (unsigned d = 0; d < VHUB_SNAP_MAX_DEPTH; d++)
                CHECK_EQ(vhub_snap_begin(&w, 1), 0);
        CHECK_EQ(vhub_snap_begin(&w, 1), -ELOOP);
        CHECK_EQ(vhub_snap_put_u64(&w, 2, 1), -ELOOP);        /* sticky */
        CHECK_EQ(vhub_snap_finish(&w, 1, &buf, &len), -ELOOP);

        vhub_snap_writer_reset(&w);
        CHECK_EQ(vhub_snap_end(&w), -EINVAL);
        vhub_snap_writer_reset(&w);
        vhub_snap_begin(&w, 1);
        CHECK_EQ(vhub_snap_finish(&w, 1, &buf, &len), -EINVAL);
        vhub_snap_writer_reset(&w);
        CHECK_EQ(vhub_snap_put_fdname(&w, 1, "a:b"), -EINVAL);
        vhub_snap_writer_reset(&w);
        CHECK_EQ(vhub_snap_put_fdname(&w, 1, ""), -EINVAL);
        vhub_snap_writer_reset(&w);
        CHECK_EQ(vhub_snap_put_u32(&w, 0x20000, 1), -EINVAL);       /* tags are 16 bits */
        vhub_snap_writer_reset(&w);
        {
                char *big = malloc(VHUB_SNAP_MAX_SIZE);

                CHECK(big);
                memset(big, 'x', VHUB_SNAP_MAX_SIZE - 1);
                big[VHUB_SNAP_MAX_SIZE - 1] = 0;
                CHECK_EQ(vhub_snap_put_str(&w, 1, big), -E2BIG);
                free(big);
        }
        vhub_snap_writer_done(&w);
        printf("ok: writer limits (depth, balance, fd names, tags, size)\n");
}

static uint64_t slot_generation(int fd, size_t slot_size, unsigned slot) {
        uint64_t g = 0;

        CHECK_EQ(pread(fd, &g, 8, (off_t) (slot * slot_size + 16)), 8);
        return g;
}

static void check_file_reads(int fd, uint64_t want_gen, unsigned want_devices) {
        struct vhub_snap_doc doc;
        const char *why = NULL;
        void *buf = NULL;
        size_t len;

        CHECK_EQ(vhub_snap_file_read(fd, &buf, &len, &why), 0);
        CHECK_EQ(vhub_snap_parse(buf, len, &doc, &why), 0);
        CHECK_EQ(doc.generation, want_gen);
        if (want_devices) {
                struct vhub_snap_iter it, vm;
                struct vhub_snap_rec rec;

                vhub_snap_doc_iter(&doc, &it);
                CHECK_EQ(vhub_snap_next(&it, &rec), 1);
                CHECK_EQ(vhub_snap_enter(&rec, &vm), 0);
                CHECK_EQ(read_vm(&vm, "vm0", 8, want_devices, 2, NULL), 0);
        }
        free(buf);
}

static void test_file(void) {
        struct vhub_snap_writer w;
        struct vhub_snap_file f, g;
        const char *why = NULL;
        void *buf = NULL;
        size_t len;
        int seals;

        vhub_snap_writer_init(&w);
        CHECK_EQ(vhub_snap_file_create("snap/test", &f), 0);
        CHECK(fcntl(f.fd, F_GETFD) & FD_CLOEXEC);
        seals = fcntl(f.fd, F_GET_SEALS);
        CHECK(seals >= 0 && (seals & F_SEAL_SHRINK));
        CHECK_EQ(lseek(f.fd, 0, SEEK_END), 2 * VHUB_SNAP_SLOT_MIN);
        CHECK_EQ(vhub_snap_file_read(f.fd, &buf, &len, &why), -ENOENT);

        /* commits alternate slots; the reader always finds the newest */
        for (unsigned i = 1; i <= 4; i++) {
                vhub_snap_writer_reset(&w);
                write_vm(&w, "vm0", 8, 1, 2);
                CHECK_EQ(vhub_snap_file_commit(&f, &w), 0);
                CHECK_EQ(f.generation, i);
                check_file_reads(f.fd, i, 1);
        }
        CHECK_EQ(slot_generation(f.fd, f.slot_size, 0), 3);
        CHECK_EQ(slot_generation(f.fd, f.slot_size, 1), 4);

        /* a torn write: the newest slot's tail is garbage -> the previous
         * generation is read */
        {
                uint8_t junk[64];

                memset(junk, 0xa5, sizeof(junk));
                CHECK_EQ(pwrite(f.fd, junk, sizeof(junk), (off_t) (f.slot_size + 200)), (ssize_t) sizeof(junk));
                check_file_reads(f.fd, 3, 1);
                /* adopting such a file resumes from generation 3 and writes
                 * over the torn slot */
                CHECK_EQ(vhub_snap_file_adopt(dup(f.fd), &g, &why), 0);
                CHECK_EQ(g.generation, 3);
                CHECK_EQ(g.newest, 0);
                vhub_snap_writer_reset(&w);
                write_vm(&w, "vm0", 8, 1, 2);
                CHECK_EQ(vhub_snap_file_commit(&g, &w), 0);
                check_file_reads(g.fd, 4, 1);
                vhub_snap_file_close(&g);
        }
        /* the stale writer (still at 4) must not go back */
        {
                const void *doc;

                vhub_snap_writer_reset(&w);
                CHECK_EQ(vhub_snap_finish(&w, 4, &doc, &len), 0);
                CHECK_EQ(vhub_snap_file_write(&f, doc, len), -ESTALE);
        }
        vhub_snap_file_close(&f);

        /* growth with the newest copy in slot 0, then in slot 1: at every
         * step the file reads as the last commit */
        for (unsigned start = 0; start < 2; start++) {
                CHECK_EQ(vhub_snap_file_create("snap/grow", &f), 0);
                for (unsigned i = 0; i <= start; i++) {
                        vhub_snap_writer_reset(&w);
                        write_vm(&w, "vm0", 8, 1, 2);
                        CHECK_EQ(vhub_snap_file_commit(&f, &w), 0);
                }
                CHECK_EQ(f.newest, (int) start);
                vhub_snap_writer_reset(&w);
                write_vm(&w, "vm0", 8, 40, 2);          /* > 4 KiB */
                CHECK_EQ(vhub_snap_file_commit(&f, &w), 0);
                CHECK(f.slot_size > VHUB_SNAP_SLOT_MIN);
                CHECK_EQ(lseek(f.fd, 0, SEEK_END), (off_t) (2 * f.slot_size));
                check_file_reads(f.fd, start + 2, 40);
                /* the older copy survived the move: tear the newest, read it */
                CHECK_EQ(pwrite(f.fd, "XXXX", 4, (off_t) (f.newest * f.slot_size + 100)), 4);
                check_file_reads(f.fd, start + 1, 1);
                vhub_snap_file_close(&f);
        }
        printf("ok: snapshot files: alternate slots, torn writes, growth from either slot, adoption\n");

        /* a file whose newest copy needs a newer reader is refused, not
         * silently read at an older generation */
        {
                uint8_t *copy;
                const void *doc;

                CHECK_EQ(vhub_snap_file_create("snap/newer", &f), 0);
                vhub_snap_writer_reset(&w);
                write_vm(&w, "vm0", 8, 1, 2);
                CHECK_EQ(vhub_snap_file_commit(&f, &w), 0);
                vhub_snap_writer_reset(&w);
                write_vm(&w, "vm0", 8, 1, 2);
                CHECK_EQ(vhub_snap_finish(&w, 2, &doc, &len), 0);
                copy = malloc(len);
                CHECK(copy);
                memcpy(copy, doc, len);
                restamp(copy, len, VHUB_SNAP_VERSION + 1, VHUB_SNAP_VERSION + 1);
                CHECK_EQ(pwrite(f.fd, copy, len, (off_t) f.slot_size), (ssize_t) len);
                CHECK_EQ(vhub_snap_file_read(f.fd, &buf, &len, &why), -EPROTONOSUPPORT);
                CHECK_EQ(vhub_snap_file_adopt(dup(f.fd), &g, &why), -EPROTONOSUPPORT);
                printf("ok: a newer copy is refused: %s\n", why);
                free(copy);
                vhub_snap_file_close(&f);
        }
        /* not a snapshot file at all */
        {
                int fd = memfd_create("odd", MFD_CLOEXEC);

                CHECK(fd >= 0);
                CHECK_EQ(ftruncate(fd, 3 * 4096), 0);
                CHECK_EQ(vhub_snap_file_read(fd, &buf, &len, &why), -EBADMSG);
                CHECK_EQ(vhub_snap_file_adopt(fd, &g, &why), -EBADMSG);
                CHECK(fcntl(fd, F_GETFD) < 0); /* taken in every case */
        }
        vhub_snap_writer_done(&w);
}

static int write_fixture(const char *path) {
        struct vhub_snap_writer w;
        const void *buf;
        size_t len;
        FILE *fp;

        vhub_snap_writer_init(&w);
        write_vm(&w, "vm0", 8, 4, 2);
        CHECK_EQ(vhub_snap_finish(&w, 7, &buf, &len), 0);
        fp = fopen(path, "wb");
        CHECK(fp);
        CHECK_EQ(fwrite(buf, 1, len, fp), len);
        CHECK_EQ(fclose(fp), 0);
        vhub_snap_writer_done(&w);
        return 0;
}

/* The document a version-1 writer produced, kept in the tree: every later
 * reader must read it (docs/restart.md, "Versions"). */
static void test_fixture(const char *path) {
        static uint8_t buf[1 << 16];
        struct vhub_snap_doc doc;
        FILE *fp = fopen(path, "rb");
        size_t len;

        CHECK(fp);
        len = fread(buf, 1, sizeof(buf), fp);
        fclose(fp);
        CHECK_EQ(vhub_snap_parse(buf, len, &doc, NULL), 0);
        CHECK_EQ(doc.version, 1);
        CHECK_EQ(doc.generation, 7);
        CHECK_EQ(read_doc(buf, len, NULL), 0);
        printf("ok: the version-1 fixture %s reads\n", path);
}

/* Records read into an object by a field table (vhub_snap_get_field()). */
struct fields {
        uint64_t u64;
        int64_t i64;
        uint32_t u32, bounded;
        enum { E_A, E_B, E_C } e;
        uint16_t u16;
        bool b, seen;
        char str[8];
};

#define F(type, member, ...) VHUB_SNAP_FIELD(type, struct fields, member, __VA_ARGS__)
static const struct vhub_snap_field field_table[] = {
        [1] = F(U64, u64), [2] = F(I64, i64), [3] = F(U32, u32),
        [4] = F(U32, bounded, VHUB_SNAP_UPTO(7), VHUB_SNAP_SEEN(struct fields, seen)),
        [5] = F(U32, e, VHUB_SNAP_UPTO(E_C)), [6] = F(U16, u16), [7] = F(BOOL, b), [8] = F(STR, str),
        /* [9]: no row; 10 is past the table */
};

/* Each record of a one-level document of w through the table into f: what
 * vhub_snap_get_field() returned, one after another, into ret[]. */
static void read_fields(struct vhub_snap_writer *w, struct fields *f, int *ret, size_t n) {
        struct vhub_snap_doc doc;
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        const void *buf;
        size_t len, i = 0;

        CHECK_EQ(vhub_snap_finish(w, 1, &buf, &len), 0);
        CHECK_EQ(vhub_snap_parse(buf, len, &doc, NULL), 0);
        vhub_snap_doc_iter(&doc, &it);
        while (vhub_snap_next(&it, &x) > 0) {
                CHECK(i < n);
                ret[i++] = VHUB_SNAP_GET_FIELD(field_table, &x, f);
        }
        CHECK_EQ(i, n);
        vhub_snap_writer_reset(w);
}

static void test_field_table(void) {
        struct vhub_snap_writer w;
        struct fields f = { .u16 = 5 }, was;
        int r[10];

        vhub_snap_writer_init(&w);
        vhub_snap_put_u64(&w, 1, UINT64_MAX - 1);
        vhub_snap_put_i64(&w, 2, -42);
        vhub_snap_put_u32(&w, 3, 0xdeadbeef);
        vhub_snap_put_u32(&w, 4, 7);
        vhub_snap_put_u32(&w, 5, E_C);
        vhub_snap_put_u32(&w, 6, UINT16_MAX);
        vhub_snap_put_bool(&w, 7, true);
        vhub_snap_put_str(&w, 8, "seven..");
        vhub_snap_put_u64(&w, 9, 1);
        vhub_snap_put_u64(&w, 10, 1);
        read_fields(&w, &f, r, 10);
        for (int i = 0; i < 8; i++)
                CHECK_EQ(r[i], 1);
        CHECK_EQ(r[8], 0);
        CHECK_EQ(r[9], 0);
        CHECK_EQ(f.u64, UINT64_MAX - 1);
        CHECK_EQ(f.i64, -42);
        CHECK_EQ(f.u32, 0xdeadbeef);
        CHECK_EQ(f.bounded, 7);
        CHECK(f.seen);
        CHECK_EQ(f.e, E_C);
        CHECK_EQ(f.u16, UINT16_MAX);
        CHECK(f.b);
        CHECK(strcmp(f.str, "seven..") == 0);
        printf("ok: a field table reads each type into its member\n");

        /* bad records: the field stays as it was, nothing seen */
        memset(&f, 0, sizeof(f));
        f.u16 = 5;
        f.bounded = 3;
        memcpy(&was, &f, sizeof(f));
        vhub_snap_put_u32(&w, 4, 8);            /* over its bound */
        vhub_snap_put_u32(&w, 5, E_C + 1);
        vhub_snap_put_u32(&w, 6, UINT16_MAX + 1u);
        vhub_snap_put_u64(&w, 3, 1);            /* another kind */
        vhub_snap_put_bool(&w, 1, true);
        vhub_snap_put_str(&w, 8, "eight...");   /* longer than its array */
        read_fields(&w, &f, r, 6);
        for (int i = 0; i < 5; i++)
                CHECK_EQ(r[i], -EBADMSG);
        CHECK_EQ(r[5], -ENAMETOOLONG);
        CHECK(memcmp(&f, &was, sizeof(f)) == 0);
        vhub_snap_writer_done(&w);
        printf("ok: a field table refuses another kind, a value over its bound, a long string\n");
}

int main(int argc, char **argv) {
        int fds_before = vhub_count_open_fds();

        if (argc == 3 && strcmp(argv[1], "--write-fixture") == 0)
                return write_fixture(argv[2]);
        test_crc();
        test_round_trip();
        test_unknown_and_versions();
        test_corruption();
        test_malformed();
        test_writer_errors();
        test_field_table();
        test_file();
        if (argc > 1)
                test_fixture(argv[1]);
        CHECK_EQ(vhub_count_open_fds(), fds_before);
        printf("ok: no fd leaked\n");
        return 0;
}
