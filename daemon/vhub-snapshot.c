/* SPDX-License-Identifier: MIT */
/* The snapshot format: writer, strict reader, snapshot memfds.  See
 * vhub-snapshot.h and docs/restart.md ("The snapshot format"). */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vhub-fdstore.h"   /* VHUB_FDSTORE_NAME_MAX */
#include "vhub-snapshot.h"
#include "vhu-fd.h"

/* ---- CRC-32C: a byte table (reflected polynomial 0x82F63B78), and the
 * SSE4.2 instruction where the CPU has it: a VM's snapshot is a few KiB and
 * is checksummed at every commit. */

static const uint32_t crc32c_table[256] = {
        0x00000000, 0xf26b8303, 0xe13b70f7, 0x1350f3f4, 0xc79a971f, 0x35f1141c,
        0x26a1e7e8, 0xd4ca64eb, 0x8ad958cf, 0x78b2dbcc, 0x6be22838, 0x9989ab3b,
        0x4d43cfd0, 0xbf284cd3, 0xac78bf27, 0x5e133c24, 0x105ec76f, 0xe235446c,
        0xf165b798, 0x030e349b, 0xd7c45070, 0x25afd373, 0x36ff2087, 0xc494a384,
        0x9a879fa0, 0x68ec1ca3, 0x7bbcef57, 0x89d76c54, 0x5d1d08bf, 0xaf768bbc,
        0xbc267848, 0x4e4dfb4b, 0x20bd8ede, 0xd2d60ddd, 0xc186fe29, 0x33ed7d2a,
        0xe72719c1, 0x154c9ac2, 0x061c6936, 0xf477ea35, 0xaa64d611, 0x580f5512,
        0x4b5fa6e6, 0xb93425e5, 0x6dfe410e, 0x9f95c20d, 0x8cc531f9, 0x7eaeb2fa,
        0x30e349b1, 0xc288cab2, 0xd1d83946, 0x23b3ba45, 0xf779deae, 0x05125dad,
        0x1642ae59, 0xe4292d5a, 0xba3a117e, 0x4851927d, 0x5b016189, 0xa96ae28a,
        0x7da08661, 0x8fcb0562, 0x9c9bf696, 0x6ef07595, 0x417b1dbc, 0xb3109ebf,
        0xa0406d4b, 0x522bee48, 0x86e18aa3, 0x748a09a0, 0x67dafa54, 0x95b17957,
        0xcba24573, 0x39c9c670, 0x2a993584, 0xd8f2b687, 0x0c38d26c, 0xfe53516f,
        0xed03a29b, 0x1f682198, 0x5125dad3, 0xa34e59d0, 0xb01eaa24, 0x42752927,
        0x96bf4dcc, 0x64d4cecf, 0x77843d3b, 0x85efbe38, 0xdbfc821c, 0x2997011f,
        0x3ac7f2eb, 0xc8ac71e8, 0x1c661503, 0xee0d9600, 0xfd5d65f4, 0x0f36e6f7,
        0x61c69362, 0x93ad1061, 0x80fde395, 0x72966096, 0xa65c047d, 0x5437877e,
        0x4767748a, 0xb50cf789, 0xeb1fcbad, 0x197448ae, 0x0a24bb5a, 0xf84f3859,
        0x2c855cb2, 0xdeeedfb1, 0xcdbe2c45, 0x3fd5af46, 0x7198540d, 0x83f3d70e,
        0x90a324fa, 0x62c8a7f9, 0xb602c312, 0x44694011, 0x5739b3e5, 0xa55230e6,
        0xfb410cc2, 0x092a8fc1, 0x1a7a7c35, 0xe811ff36, 0x3cdb9bdd, 0xceb018de,
        0xdde0eb2a, 0x2f8b6829, 0x82f63b78, 0x709db87b, 0x63cd4b8f, 0x91a6c88c,
        0x456cac67, 0xb7072f64, 0xa457dc90, 0x563c5f93, 0x082f63b7, 0xfa44e0b4,
        0xe9141340, 0x1b7f9043, 0xcfb5f4a8, 0x3dde77ab, 0x2e8e845f, 0xdce5075c,
        0x92a8fc17, 0x60c37f14, 0x73938ce0, 0x81f80fe3, 0x55326b08, 0xa759e80b,
        0xb4091bff, 0x466298fc, 0x1871a4d8, 0xea1a27db, 0xf94ad42f, 0x0b21572c,
        0xdfeb33c7, 0x2d80b0c4, 0x3ed04330, 0xccbbc033, 0xa24bb5a6, 0x502036a5,
        0x4370c551, 0xb11b4652, 0x65d122b9, 0x97baa1ba, 0x84ea524e, 0x7681d14d,
        0x2892ed69, 0xdaf96e6a, 0xc9a99d9e, 0x3bc21e9d, 0xef087a76, 0x1d63f975,
        0x0e330a81, 0xfc588982, 0xb21572c9, 0x407ef1ca, 0x532e023e, 0xa145813d,
        0x758fe5d6, 0x87e466d5, 0x94b49521, 0x66df1622, 0x38cc2a06, 0xcaa7a905,
        0xd9f75af1, 0x2b9cd9f2, 0xff56bd19, 0x0d3d3e1a, 0x1e6dcdee, 0xec064eed,
        0xc38d26c4, 0x31e6a5c7, 0x22b65633, 0xd0ddd530, 0x0417b1db, 0xf67c32d8,
        0xe52cc12c, 0x1747422f, 0x49547e0b, 0xbb3ffd08, 0xa86f0efc, 0x5a048dff,
        0x8ecee914, 0x7ca56a17, 0x6ff599e3, 0x9d9e1ae0, 0xd3d3e1ab, 0x21b862a8,
        0x32e8915c, 0xc083125f, 0x144976b4, 0xe622f5b7, 0xf5720643, 0x07198540,
        0x590ab964, 0xab613a67, 0xb831c993, 0x4a5a4a90, 0x9e902e7b, 0x6cfbad78,
        0x7fab5e8c, 0x8dc0dd8f, 0xe330a81a, 0x115b2b19, 0x020bd8ed, 0xf0605bee,
        0x24aa3f05, 0xd6c1bc06, 0xc5914ff2, 0x37faccf1, 0x69e9f0d5, 0x9b8273d6,
        0x88d28022, 0x7ab90321, 0xae7367ca, 0x5c18e4c9, 0x4f48173d, 0xbd23943e,
        0xf36e6f75, 0x0105ec76, 0x12551f82, 0xe03e9c81, 0x34f4f86a, 0xc69f7b69,
        0xd5cf889d, 0x27a40b9e, 0x79b737ba, 0x8bdcb4b9, 0x988c474d, 0x6ae7c44e,
        0xbe2da0a5, 0x4c4623a6, 0x5f16d052, 0xad7d5351,
};

static uint32_t crc32c_sw(uint32_t crc, const uint8_t *p, size_t len) {
        while (len--)
                crc = crc32c_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
        return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t len) {
        uint64_t c = crc;

        for (; len >= 8; p += 8, len -= 8) {
                uint64_t v;

                memcpy(&v, p, 8);
                c = __builtin_ia32_crc32di(c, v);
        }
        crc = (uint32_t) c;
        for (; len; p++, len--)
                crc = __builtin_ia32_crc32qi(crc, *p);
        return crc;
}

static bool crc32c_have_hw(void) {
        return __builtin_cpu_supports("sse4.2");
}
#else
static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t len) {
        return crc32c_sw(crc, p, len);
}

static bool crc32c_have_hw(void) {
        return false;
}
#endif

uint32_t vhub_snap_crc32c(uint32_t crc, const void *buf, size_t len) {
        crc = ~crc;
        crc = crc32c_have_hw() ? crc32c_hw(crc, buf, len) : crc32c_sw(crc, buf, len);
        return ~crc;
}

/* ---- little-endian fields */

static void put_le16(uint8_t *p, uint16_t v) {
        v = htole16(v);
        memcpy(p, &v, 2);
}

static void put_le32(uint8_t *p, uint32_t v) {
        v = htole32(v);
        memcpy(p, &v, 4);
}

static void put_le64(uint8_t *p, uint64_t v) {
        v = htole64(v);
        memcpy(p, &v, 8);
}

static uint16_t get_le16(const uint8_t *p) {
        uint16_t v;

        memcpy(&v, p, 2);
        return le16toh(v);
}

static uint32_t get_le32(const uint8_t *p) {
        uint32_t v;

        memcpy(&v, p, 4);
        return le32toh(v);
}

static uint64_t get_le64(const uint8_t *p) {
        uint64_t v;

        memcpy(&v, p, 8);
        return le64toh(v);
}

const char *vhub_snap_kind_to_string(unsigned kind) {
        static const char *const names[] = {
                [VHUB_SNAP_NEST] = "nest", [VHUB_SNAP_U64] = "u64", [VHUB_SNAP_U32] = "u32",
                [VHUB_SNAP_BOOL] = "bool", [VHUB_SNAP_STR] = "str", [VHUB_SNAP_BYTES] = "bytes",
                [VHUB_SNAP_FDNAME] = "fdname", [VHUB_SNAP_I64] = "i64",
        };

        return kind < sizeof(names) / sizeof(names[0]) && names[kind] ? names[kind] : "unknown";
}

/* ---- writer */

static int check_value(unsigned kind, const uint8_t *v, uint32_t len);

void vhub_snap_writer_init(struct vhub_snap_writer *w) {
        *w = (struct vhub_snap_writer) { 0 };
        vhub_snap_writer_reset(w);
}

void vhub_snap_writer_done(struct vhub_snap_writer *w) {
        free(w->buf);
        *w = (struct vhub_snap_writer) { 0 };
}

void vhub_snap_writer_reset(struct vhub_snap_writer *w) {
        w->len = VHUB_SNAP_HEADER_SIZE;     /* the header is filled in by finish */
        w->depth = 0;
        w->error = 0;
        w->compat = 0;
}

static uint8_t *writer_grow(struct vhub_snap_writer *w, size_t n) {
        size_t need;

        /* the common case: room left in the buffer of the previous commit */
        if (__builtin_expect(!w->error && w->buf && n <= w->cap - w->len, 1)) {
                w->len += n;
                return w->buf + w->len - n;
        }
        if (w->error)
                return NULL;
        if (n > VHUB_SNAP_MAX_SIZE || w->len + n > VHUB_SNAP_MAX_SIZE) {
                w->error = -E2BIG;
                return NULL;
        }
        need = w->len + n;
        if (need > w->cap) {
                size_t cap = w->cap ? w->cap : 4096;
                uint8_t *b;

                while (cap < need)
                        cap *= 2;
                b = realloc(w->buf, cap);
                if (!b) {
                        w->error = -ENOMEM;
                        return NULL;
                }
                if (!w->buf)
                        memset(b, 0, VHUB_SNAP_HEADER_SIZE);
                w->buf = b;
                w->cap = cap;
        }
        w->len = need;
        return w->buf + need - n;
}

static uint8_t *writer_record(struct vhub_snap_writer *w, uint32_t tag, unsigned kind, size_t len) {
        uint8_t *p;

        if (w->error)
                return NULL;
        if ((tag & ~VHUB_SNAP_CRITICAL) > VHUB_SNAP_TAG_MAX || len > UINT32_MAX) {
                w->error = -EINVAL;
                return NULL;
        }
        p = writer_grow(w, VHUB_SNAP_RECORD_HEADER + len);
        if (!p)
                return NULL;
        put_le16(p, (uint16_t) tag);
        p[2] = (uint8_t) kind;
        p[3] = (tag & VHUB_SNAP_CRITICAL) ? VHUB_SNAP_FLAG_CRITICAL : 0;
        put_le32(p + 4, (uint32_t) len);
        return p + VHUB_SNAP_RECORD_HEADER;
}

int vhub_snap_begin(struct vhub_snap_writer *w, uint32_t tag) {
        if (!w->error && w->depth >= VHUB_SNAP_MAX_DEPTH)
                w->error = -ELOOP;
        if (writer_record(w, tag, VHUB_SNAP_NEST, 0))
                w->open[w->depth++] = w->len - VHUB_SNAP_RECORD_HEADER;
        return w->error;
}

int vhub_snap_end(struct vhub_snap_writer *w) {
        size_t at, len;

        if (w->error)
                return w->error;
        if (w->depth == 0)
                return w->error = -EINVAL;
        at = w->open[--w->depth];
        len = w->len - at - VHUB_SNAP_RECORD_HEADER;
        if (len > UINT32_MAX)
                return w->error = -E2BIG;
        put_le32(w->buf + at + 4, (uint32_t) len);
        return 0;
}

/* A scalar record: its size bytes of v, little-endian. */
static int writer_put_scalar(struct vhub_snap_writer *w, uint32_t tag, unsigned kind, size_t size,
                             uint64_t v) {
        uint8_t *p = writer_record(w, tag, kind, size);

        for (size_t i = 0; p && i < size; i++)
                p[i] = (uint8_t) (v >> (8 * i));
        return w->error;
}

int vhub_snap_put_u64(struct vhub_snap_writer *w, uint32_t tag, uint64_t v) {
        return writer_put_scalar(w, tag, VHUB_SNAP_U64, 8, v);
}

int vhub_snap_put_i64(struct vhub_snap_writer *w, uint32_t tag, int64_t v) {
        return writer_put_scalar(w, tag, VHUB_SNAP_I64, 8, (uint64_t) v);
}

int vhub_snap_put_u32(struct vhub_snap_writer *w, uint32_t tag, uint32_t v) {
        return writer_put_scalar(w, tag, VHUB_SNAP_U32, 4, v);
}

int vhub_snap_put_bool(struct vhub_snap_writer *w, uint32_t tag, bool v) {
        return writer_put_scalar(w, tag, VHUB_SNAP_BOOL, 1, v ? 1 : 0);
}

int vhub_snap_put_str(struct vhub_snap_writer *w, uint32_t tag, const char *s) {
        size_t n = s ? strlen(s) : 0;
        uint8_t *p = writer_record(w, tag, VHUB_SNAP_STR, n);

        if (p && n)
                memcpy(p, s, n);
        return w->error;
}

int vhub_snap_put_bytes(struct vhub_snap_writer *w, uint32_t tag, const void *src, size_t n) {
        uint8_t *p = writer_record(w, tag, VHUB_SNAP_BYTES, n);

        if (p && n)
                memcpy(p, src, n);
        return w->error;
}

int vhub_snap_put_fdname(struct vhub_snap_writer *w, uint32_t tag, const char *name) {
        size_t n = name ? strlen(name) : 0;
        uint8_t *p;

        /* a name the fd store would refuse can never be found again */
        if (!w->error && (n == 0 || check_value(VHUB_SNAP_FDNAME, (const uint8_t *) name, (uint32_t) n) < 0))
                return w->error = -EINVAL;
        p = writer_record(w, tag, VHUB_SNAP_FDNAME, n);
        if (p)
                memcpy(p, name, n);
        return w->error;
}

static uint32_t doc_crc(const uint8_t *doc, size_t payload_len) {
        uint32_t crc = vhub_snap_crc32c(0, doc, VHUB_SNAP_HEADER_SIZE - 4);

        return vhub_snap_crc32c(crc, doc + VHUB_SNAP_HEADER_SIZE, payload_len);
}

int vhub_snap_finish(struct vhub_snap_writer *w, uint64_t generation,
                     const void **ret_buf, size_t *ret_len) {
        size_t payload;

        if (w->error)
                return w->error;
        if (w->depth)
                return -EINVAL;
        /* an empty document still needs its header's bytes */
        if (!w->buf && !writer_grow(w, 0))
                return w->error;
        payload = w->len - VHUB_SNAP_HEADER_SIZE;
        memcpy(w->buf, VHUB_SNAP_MAGIC, 8);
        put_le16(w->buf + 8, VHUB_SNAP_VERSION);
        put_le16(w->buf + 10, w->compat ? w->compat : VHUB_SNAP_COMPAT);
        put_le32(w->buf + 12, VHUB_SNAP_HEADER_SIZE);
        put_le64(w->buf + 16, generation);
        put_le32(w->buf + 24, (uint32_t) payload);
        put_le32(w->buf + 28, doc_crc(w->buf, payload));
        *ret_buf = w->buf;
        *ret_len = w->len;
        return 0;
}

/* ---- reader */

static int fail(const char **ret_why, const char *why, int r) {
        if (ret_why)
                *ret_why = why;
        return r;
}

int vhub_snap_check_header(const void *buf, size_t len, struct vhub_snap_doc *ret, const char **ret_why) {
        const uint8_t *b = buf;
        uint32_t payload, hsize;
        unsigned version, compat;

        if (len < VHUB_SNAP_HEADER_SIZE)
                return fail(ret_why, "shorter than a snapshot header", -EBADMSG);
        if (memcmp(b, VHUB_SNAP_MAGIC, 8) != 0)
                return fail(ret_why, "not a vhub snapshot (bad magic)", -EBADMSG);
        version = get_le16(b + 8);
        compat = get_le16(b + 10);
        hsize = get_le32(b + 12);
        payload = get_le32(b + 24);
        if (hsize != VHUB_SNAP_HEADER_SIZE || compat > version || version == 0)
                return fail(ret_why, "corrupt snapshot header", -EBADMSG);
        if (payload > len - VHUB_SNAP_HEADER_SIZE)
                return fail(ret_why, "snapshot truncated (payload longer than the data)", -EBADMSG);
        if (payload > VHUB_SNAP_MAX_SIZE - VHUB_SNAP_HEADER_SIZE)
                return fail(ret_why, "snapshot larger than this daemon accepts", -E2BIG);
        if (doc_crc(b, payload) != get_le32(b + 28))
                return fail(ret_why, "snapshot checksum mismatch (corrupt or torn write)", -EBADMSG);
        /* only now is the version trustworthy; the caller gets the numbers
         * even when refusing, to name them in its log line */
        if (ret)
                *ret = (struct vhub_snap_doc) {
                        .version = version,
                        .compat = compat,
                        .generation = get_le64(b + 16),
                };
        if (compat > VHUB_SNAP_VERSION)
                return fail(ret_why, "snapshot written by a newer daemon: its format needs a reader "
                            "newer than this one", -EPROTONOSUPPORT);
        if (ret)
                *ret = (struct vhub_snap_doc) {
                        .version = version,
                        .compat = compat,
                        .generation = get_le64(b + 16),
                        .payload = b + VHUB_SNAP_HEADER_SIZE,
                        .payload_len = payload,
                };
        return 0;
}

void vhub_snap_doc_iter(const struct vhub_snap_doc *doc, struct vhub_snap_iter *ret) {
        *ret = (struct vhub_snap_iter) {
                .p = doc->payload,
                .end = doc->payload + doc->payload_len,
                .depth = 0,
        };
}

static int check_value(unsigned kind, const uint8_t *v, uint32_t len) {
        switch (kind) {
        case VHUB_SNAP_NEST:
        case VHUB_SNAP_BYTES:
                return 0;
        case VHUB_SNAP_U64:
        case VHUB_SNAP_I64:
                return len == 8 ? 0 : -EBADMSG;
        case VHUB_SNAP_U32:
                return len == 4 ? 0 : -EBADMSG;
        case VHUB_SNAP_BOOL:
                return len == 1 && v[0] <= 1 ? 0 : -EBADMSG;
        case VHUB_SNAP_STR:
                return memchr(v, 0, len) ? -EBADMSG : 0;
        case VHUB_SNAP_FDNAME:
                if (len == 0 || len > VHUB_FDSTORE_NAME_MAX)
                        return -EBADMSG;
                for (uint32_t i = 0; i < len; i++)
                        if (v[i] < ' ' || v[i] >= 127 || v[i] == ':')
                                return -EBADMSG;
                return 0;
        default:
                /* a kind this reader does not know: its length is all it can check */
                return 0;
        }
}

int vhub_snap_next(struct vhub_snap_iter *it, struct vhub_snap_rec *ret) {
        size_t left = (size_t) (it->end - it->p);
        uint32_t len;
        unsigned kind;

        if (left == 0)
                return 0;
        if (left < VHUB_SNAP_RECORD_HEADER)
                return -EBADMSG;
        len = get_le32(it->p + 4);
        if (len > left - VHUB_SNAP_RECORD_HEADER)
                return -EBADMSG;
        kind = it->p[2];
        if (kind == 0 || (it->p[3] & ~VHUB_SNAP_FLAG_CRITICAL))
                return -EBADMSG;
        if (check_value(kind, it->p + VHUB_SNAP_RECORD_HEADER, len) < 0)
                return -EBADMSG;
        *ret = (struct vhub_snap_rec) {
                .tag = get_le16(it->p),
                .kind = kind,
                .critical = it->p[3] & VHUB_SNAP_FLAG_CRITICAL,
                .value = it->p + VHUB_SNAP_RECORD_HEADER,
                .len = len,
                .depth = it->depth,
        };
        it->p += VHUB_SNAP_RECORD_HEADER + len;
        return 1;
}

/* Walk the whole tree once, so that later iteration cannot meet a bad
 * record; a stack of iterators instead of recursion keeps it bounded. */
static int validate_tree(const struct vhub_snap_doc *doc, const char **ret_why) {
        struct vhub_snap_iter stack[VHUB_SNAP_MAX_DEPTH + 1];
        unsigned top = 0;

        vhub_snap_doc_iter(doc, &stack[0]);
        for (;;) {
                struct vhub_snap_rec rec;
                int r = vhub_snap_next(&stack[top], &rec);

                if (r < 0)
                        return fail(ret_why, "malformed record in snapshot", -EBADMSG);
                if (r == 0) {
                        if (top == 0)
                                return 0;
                        top--;
                        continue;
                }
                if (rec.kind == VHUB_SNAP_NEST) {
                        if (top + 1 > VHUB_SNAP_MAX_DEPTH)
                                return fail(ret_why, "snapshot records nested too deep", -EBADMSG);
                        top++;
                        stack[top] = (struct vhub_snap_iter) {
                                .p = rec.value, .end = rec.value + rec.len, .depth = top,
                        };
                }
        }
}

int vhub_snap_parse(const void *buf, size_t len, struct vhub_snap_doc *ret, const char **ret_why) {
        struct vhub_snap_doc doc = { 0 };
        int r;

        r = vhub_snap_check_header(buf, len, &doc, ret_why);
        if (r == -EPROTONOSUPPORT)
                *ret = doc;
        if (r < 0)
                return r;
        r = validate_tree(&doc, ret_why);
        if (r < 0)
                return r;
        *ret = doc;
        return 0;
}

int vhub_snap_unknown(const struct vhub_snap_rec *rec) {
        return rec->critical ? -EPROTONOSUPPORT : 0;
}

int vhub_snap_enter(const struct vhub_snap_rec *rec, struct vhub_snap_iter *ret) {
        if (rec->kind != VHUB_SNAP_NEST || rec->depth + 1 > VHUB_SNAP_MAX_DEPTH)
                return -EBADMSG;
        *ret = (struct vhub_snap_iter) {
                .p = rec->value, .end = rec->value + rec->len, .depth = rec->depth + 1,
        };
        return 0;
}

/* Records into fields (vhub_snap_get_field()'s rows; the typed getters are
 * rows of their own, at offset 0 of what they fill). */

/* v into the field of type at at, in the host's order. */
static void field_store(void *at, uint8_t type, uint64_t v) {
        uint32_t u32 = (uint32_t) v;
        uint16_t u16 = (uint16_t) v;
        bool b = v != 0;

        switch (type) {
        case VHUB_SNAP_FIELD_U32: memcpy(at, &u32, sizeof(u32)); break;
        case VHUB_SNAP_FIELD_U16: memcpy(at, &u16, sizeof(u16)); break;
        case VHUB_SNAP_FIELD_BOOL: memcpy(at, &b, sizeof(b)); break;
        default: memcpy(at, &v, sizeof(v)); break;     /* U64, I64 */
        }
}

static int get_text(const struct vhub_snap_rec *rec, unsigned kind, char *buf, size_t size);

/* rec into the field f names in obj (its seen flag set): 0, or -EBADMSG
 * (another kind, over its bound), -ENAMETOOLONG, the field left as it was. */
static int field_read(const struct vhub_snap_field *f, const struct vhub_snap_rec *rec, void *obj) {
        static const unsigned kind_of[] = {
                [VHUB_SNAP_FIELD_U64] = VHUB_SNAP_U64,   [VHUB_SNAP_FIELD_I64] = VHUB_SNAP_I64,
                [VHUB_SNAP_FIELD_U32] = VHUB_SNAP_U32,   [VHUB_SNAP_FIELD_U16] = VHUB_SNAP_U32,
                [VHUB_SNAP_FIELD_BOOL] = VHUB_SNAP_BOOL,
        };
        char *at = (char *) obj + f->off;
        uint64_t v = 0;
        int r;

        if (f->type == VHUB_SNAP_FIELD_STR) {
                r = get_text(rec, VHUB_SNAP_STR, at, f->size);
                if (r < 0)
                        return r;
        } else {
                /* the parser checked the value's size, but a record a
                 * caller made up is not trusted either */
                if (rec->kind != kind_of[f->type] || check_value(rec->kind, rec->value, rec->len) < 0)
                        return -EBADMSG;
                for (uint32_t i = rec->len; i > 0; i--)
                        v = v << 8 | rec->value[i - 1];         /* little-endian */
                if ((f->bounded && v > f->max) || (f->type == VHUB_SNAP_FIELD_U16 && v > UINT16_MAX))
                        return -EBADMSG;
                field_store(at, f->type, v);
        }
        if (f->seen)
                *(bool *) ((char *) obj + f->seen - 1) = true;
        return 0;
}

int vhub_snap_get_field(const struct vhub_snap_field *t, size_t n, const struct vhub_snap_rec *rec, void *obj) {
        int r;

        if (rec->tag >= n || t[rec->tag].type == VHUB_SNAP_FIELD_NONE)
                return 0;
        r = field_read(&t[rec->tag], rec, obj);
        return r < 0 ? r : 1;
}

#define GETTER(type_) (&(const struct vhub_snap_field){ .type = VHUB_SNAP_FIELD_##type_ })

int vhub_snap_get_u64(const struct vhub_snap_rec *rec, uint64_t *ret) {
        return field_read(GETTER(U64), rec, ret);
}

int vhub_snap_get_i64(const struct vhub_snap_rec *rec, int64_t *ret) {
        return field_read(GETTER(I64), rec, ret);
}

int vhub_snap_get_u32(const struct vhub_snap_rec *rec, uint32_t *ret) {
        return field_read(GETTER(U32), rec, ret);
}

int vhub_snap_get_bool(const struct vhub_snap_rec *rec, bool *ret) {
        return field_read(GETTER(BOOL), rec, ret);
}

static int get_text(const struct vhub_snap_rec *rec, unsigned kind, char *buf, size_t size) {
        if (rec->kind != kind || check_value(kind, rec->value, rec->len) < 0)
                return -EBADMSG;
        if (size == 0 || rec->len > size - 1)
                return -ENAMETOOLONG;
        memcpy(buf, rec->value, rec->len);
        buf[rec->len] = 0;
        return 0;
}

int vhub_snap_get_str(const struct vhub_snap_rec *rec, char *buf, size_t size) {
        return get_text(rec, VHUB_SNAP_STR, buf, size);
}

int vhub_snap_get_fdname(const struct vhub_snap_rec *rec, char *buf, size_t size) {
        return get_text(rec, VHUB_SNAP_FDNAME, buf, size);
}

int vhub_snap_get_bytes(const struct vhub_snap_rec *rec, const void **ret, size_t *ret_len) {
        if (rec->kind != VHUB_SNAP_BYTES)
                return -EBADMSG;
        *ret = rec->value;
        *ret_len = rec->len;
        return 0;
}

/* ---- snapshot files */

static bool slot_size_valid(size_t s) {
        return s >= VHUB_SNAP_SLOT_MIN && s <= VHUB_SNAP_MAX_SIZE && (s & (s - 1)) == 0;
}

int vhub_snap_file_create(const char *name, struct vhub_snap_file *ret) {
        int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);

        if (fd < 0)
                return -errno;
        /* only ever grows: a reader sizing the slots from the file's length
         * must never see it shrink under a valid copy */
        if (ftruncate(fd, 2 * VHUB_SNAP_SLOT_MIN) < 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) < 0) {
                int r = -errno;

                vhu_safe_close(fd);
                return r;
        }
        *ret = (struct vhub_snap_file) {
                .fd = fd,
                .slot_size = VHUB_SNAP_SLOT_MIN,
                .newest = -1,
                .generation = 0,
        };
        return 0;
}

void vhub_snap_file_close(struct vhub_snap_file *f) {
        f->fd = vhu_safe_close(f->fd);
        f->newest = -1;
}

uint64_t vhub_snap_file_next_generation(const struct vhub_snap_file *f) {
        return f->generation + 1;
}

/* All len bytes at off, read into rbuf or written from wbuf (the other is
 * NULL); EINTR is retried, and a file that ends midway is -EIO. */
static int pio_all(int fd, void *rbuf, const void *wbuf, size_t len, off_t off) {
        size_t done = 0;

        while (done < len) {
                ssize_t n = rbuf ? pread(fd, (uint8_t *) rbuf + done, len - done, off)
                                 : pwrite(fd, (const uint8_t *) wbuf + done, len - done, off);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0)
                        return -EIO;
                done += (size_t) n;
                off += n;
        }
        return 0;
}

static int pwrite_all(int fd, const void *buf, size_t len, off_t off) {
        return pio_all(fd, NULL, buf, len, off);
}

static int pread_all(int fd, void *buf, size_t len, off_t off) {
        return pio_all(fd, buf, NULL, len, off);
}

/* The file's slot size from its length, or -EBADMSG. */
static int file_slot_size(int fd, size_t *ret) {
        struct stat st;

        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode) || st.st_size <= 0 || st.st_size % 2 ||
            !slot_size_valid((size_t) st.st_size / 2))
                return -EBADMSG;
        *ret = (size_t) st.st_size / 2;
        return 0;
}

/* Read slot i's header and, if it is valid, its whole document (into
 * *ret_buf when given).  0 with *ret_doc filled, or a negative errno. */
static int slot_load(int fd, size_t slot_size, unsigned i, struct vhub_snap_doc *ret_doc,
                     void **ret_buf, size_t *ret_len, const char **ret_why) {
        uint8_t head[VHUB_SNAP_HEADER_SIZE];
        off_t off = (off_t) (i * slot_size);
        uint32_t payload;
        size_t len;
        uint8_t *buf;
        int r;

        r = pread_all(fd, head, sizeof(head), off);
        if (r < 0)
                return r;
        if (memcmp(head, VHUB_SNAP_MAGIC, 8) != 0)
                return fail(ret_why, "empty slot", -ENOENT);
        payload = get_le32(head + 24);
        if (payload > slot_size - VHUB_SNAP_HEADER_SIZE)
                return fail(ret_why, "snapshot longer than its slot", -EBADMSG);
        len = VHUB_SNAP_HEADER_SIZE + payload;
        buf = malloc(len ? len : 1);
        if (!buf)
                return -ENOMEM;
        r = pread_all(fd, buf, len, off);
        if (r >= 0)
                r = vhub_snap_check_header(buf, len, ret_doc, ret_why);
        if (r < 0 || !ret_buf) {
                free(buf);
                return r;
        }
        *ret_buf = buf;
        *ret_len = len;
        return 0;
}

/* Which slot holds the newest copy: sets *ret_slot (-1: none) and
 * *ret_generation.  A slot that needs a newer reader is not skipped in
 * favour of an older one: that would silently lose state. */
static int file_find_newest(int fd, size_t slot_size, int *ret_slot, uint64_t *ret_generation,
                            const char **ret_why) {
        int newest = -1, refused = 0;
        const char *why_refused = NULL;
        uint64_t gen = 0, gen_refused = 0;

        for (unsigned i = 0; i < 2; i++) {
                struct vhub_snap_doc doc;
                const char *why = NULL;
                int r = slot_load(fd, slot_size, i, &doc, NULL, NULL, &why);

                if (r == -EPROTONOSUPPORT) {
                        /* the header's generation is covered by the CRC already checked */
                        uint8_t head[VHUB_SNAP_HEADER_SIZE];

                        if (pread_all(fd, head, sizeof(head), (off_t) (i * slot_size)) == 0 &&
                            (!refused || get_le64(head + 16) > gen_refused)) {
                                refused = 1;
                                gen_refused = get_le64(head + 16);
                                why_refused = why;
                        }
                        continue;
                }
                if (r == -ENOMEM)
                        return r;
                if (r < 0)
                        continue;
                if (newest < 0 || doc.generation > gen) {
                        newest = (int) i;
                        gen = doc.generation;
                }
        }
        if (refused && (newest < 0 || gen_refused > gen))
                return fail(ret_why, why_refused, -EPROTONOSUPPORT);
        *ret_slot = newest;
        *ret_generation = newest < 0 ? 0 : gen;
        return 0;
}

int vhub_snap_file_adopt(int fd, struct vhub_snap_file *ret, const char **ret_why) {
        size_t slot_size;
        uint64_t gen;
        int slot, r;

        r = file_slot_size(fd, &slot_size);
        if (r < 0) {
                vhu_safe_close(fd);
                return fail(ret_why, "not a snapshot file (size is not two power-of-two slots)", r);
        }
        r = file_find_newest(fd, slot_size, &slot, &gen, ret_why);
        if (r < 0) {
                vhu_safe_close(fd);
                return r;
        }
        *ret = (struct vhub_snap_file) {
                .fd = fd,
                .slot_size = slot_size,
                .newest = slot,
                .generation = gen,
        };
        return 0;
}

int vhub_snap_file_read(int fd, void **ret_buf, size_t *ret_len, const char **ret_why) {
        struct vhub_snap_doc doc;
        size_t slot_size;
        uint64_t gen;
        int slot, r;

        r = file_slot_size(fd, &slot_size);
        if (r < 0)
                return fail(ret_why, "not a snapshot file (size is not two power-of-two slots)", r);
        r = file_find_newest(fd, slot_size, &slot, &gen, ret_why);
        if (r < 0)
                return r;
        if (slot < 0)
                return fail(ret_why, "no valid snapshot in the file", -ENOENT);
        return slot_load(fd, slot_size, (unsigned) slot, &doc, ret_buf, ret_len, ret_why);
}

/* Make room for a document of len bytes: double the slots, keeping the
 * newest copy readable at every instant (the reader finds slots from the
 * file's length, so slot 1's copy moves to slot 0 before the file grows). */
static int file_grow(struct vhub_snap_file *f, size_t len) {
        size_t slot_size = f->slot_size;
        int r;

        while (slot_size < len)
                slot_size *= 2;
        if (!slot_size_valid(slot_size))
                return -E2BIG;
        if (f->newest == 1) {
                uint8_t head[VHUB_SNAP_HEADER_SIZE];
                size_t copy;
                void *buf;

                r = pread_all(f->fd, head, sizeof(head), (off_t) f->slot_size);
                if (r < 0)
                        return r;
                copy = VHUB_SNAP_HEADER_SIZE + get_le32(head + 24);
                if (copy > f->slot_size)
                        return -EBADMSG;
                buf = malloc(copy);
                if (!buf)
                        return -ENOMEM;
                r = pread_all(f->fd, buf, copy, (off_t) f->slot_size);
                if (r >= 0)
                        r = pwrite_all(f->fd, buf, copy, 0);
                free(buf);
                if (r < 0)
                        return r;
                f->newest = 0;
        }
        if (ftruncate(f->fd, (off_t) (2 * slot_size)) < 0)
                return -errno;
        f->slot_size = slot_size;
        return 0;
}

int vhub_snap_file_write(struct vhub_snap_file *f, const void *doc, size_t len) {
        const uint8_t *b = doc;
        uint64_t generation;
        unsigned target;
        int r;

        /* the writer's own output: the CRC was just computed, checking the
         * framing is enough (a commit must stay cheap) */
        if (len < VHUB_SNAP_HEADER_SIZE || memcmp(b, VHUB_SNAP_MAGIC, 8) != 0 ||
            get_le32(b + 24) != len - VHUB_SNAP_HEADER_SIZE)
                return -EINVAL;
        generation = get_le64(b + 16);
        if (f->newest >= 0 && generation <= f->generation)
                return -ESTALE;
        if (len > f->slot_size) {
                r = file_grow(f, len);
                if (r < 0)
                        return r;
        }
        target = f->newest == 0 ? 1 : 0;
        r = pwrite_all(f->fd, doc, len, (off_t) (target * f->slot_size));
        if (r < 0)
                return r;
        f->newest = (int) target;
        f->generation = generation;
        return 0;
}

int vhub_snap_file_commit(struct vhub_snap_file *f, struct vhub_snap_writer *w) {
        const void *doc;
        size_t len;
        int r;

        r = vhub_snap_finish(w, vhub_snap_file_next_generation(f), &doc, &len);
        if (r < 0)
                return r;
        return vhub_snap_file_write(f, doc, len);
}
