/* SPDX-License-Identifier: MIT */
/*
 * The snapshot format (docs/restart.md, "The snapshot format"): what the
 * daemon writes into memfds kept in the service manager's fd store so that
 * the next process can rebuild its state.  A leaf module: it knows records,
 * not VMs or devices.
 *
 * A document is a 32-byte header followed by a tree of TLV records:
 *
 *   header   "VHUBSNAP" | u16 version | u16 compat | u32 header size (32) |
 *            u64 generation | u32 payload length | u32 CRC-32C
 *   record   u16 tag | u8 kind | u8 flags | u32 length | value
 *
 * All integers little-endian.  The CRC covers the header's first 28 bytes
 * and the payload.  `version` is the format this writer speaks, `compat`
 * the oldest reader version that can read it: a reader refuses a document
 * whose compat is newer than itself.  Within a version, a reader skips
 * records whose tag it does not know unless the record is flagged critical
 * (then it refuses, naming the tag).  A NEST record's value is a sequence of
 * records (a VM holding its regions and devices...).
 *
 * Writer: append-only into a growing buffer that is reused from one commit
 * to the next (no allocation in steady state); errors are sticky and
 * reported by vhub_snap_finish().  Reader: every length is checked once by
 * vhub_snap_parse() over the whole tree before anything is handed out, so
 * hostile bytes give -EBADMSG with a reason, never a crash.
 *
 * Snapshot files: a memfd holding two slots of the same power-of-two size
 * (the file is exactly two slots long).  Each commit writes the whole
 * document into the slot that does not hold the newest valid copy with one
 * pwrite(); a reader takes the valid slot (header + CRC) with the highest
 * generation.  A write cut short (a SIGKILL can stop a multi-page write
 * between pages) leaves a slot whose CRC fails, and the previous generation
 * is read instead.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define VHUB_SNAP_MAGIC         "VHUBSNAP"
/* 2: a control connection's record is a file of its own ("k<id>"), no
 * longer a record in the daemon's: a reader of version 1 would carry none
 * of them (their sockets closed, their VMs left ownerless) */
#define VHUB_SNAP_VERSION       2u      /* the format version this code writes and reads */
#define VHUB_SNAP_COMPAT        2u      /* the oldest reader that can read what it writes */
/* The compat of a document version 2 did not change (docs/restart.md,
 * "Versions"): a VM's, and the daemon's at a planned stop, which holds the
 * connections' records again as version 1 did, so that a restart into a
 * version-1 vhubd carries everything (a downgrade). */
#define VHUB_SNAP_COMPAT_V1     1u
#define VHUB_SNAP_HEADER_SIZE   32u
#define VHUB_SNAP_RECORD_HEADER 8u
#define VHUB_SNAP_MAX_SIZE      (64u << 20)     /* one document, header included */
#define VHUB_SNAP_MAX_DEPTH     16u             /* nesting of NEST records */
#define VHUB_SNAP_TAG_MAX       0xffffu
/* OR into a tag when writing: a reader that does not know the tag refuses
 * the document instead of skipping the record. */
#define VHUB_SNAP_CRITICAL      0x10000u

enum vhub_snap_kind {
        VHUB_SNAP_NEST = 1,     /* value: records */
        VHUB_SNAP_U64 = 2,      /* 8 bytes */
        VHUB_SNAP_U32 = 3,      /* 4 bytes */
        VHUB_SNAP_BOOL = 4,     /* 1 byte, 0 or 1 */
        VHUB_SNAP_STR = 5,      /* bytes without NUL, not terminated */
        VHUB_SNAP_BYTES = 6,    /* any bytes */
        VHUB_SNAP_FDNAME = 7,   /* a name in the fd store (vhub_fdstore_name_valid) */
        VHUB_SNAP_I64 = 8,      /* 8 bytes, two's complement */
};
#define VHUB_SNAP_FLAG_CRITICAL 0x01u

const char *vhub_snap_kind_to_string(unsigned kind);

/* CRC-32C (Castagnoli), as in the header; exposed for tests and tools. */
uint32_t vhub_snap_crc32c(uint32_t crc, const void *buf, size_t len);

/* ---- writer */

struct vhub_snap_writer {
        uint8_t *buf;
        size_t len, cap;
        size_t open[VHUB_SNAP_MAX_DEPTH];  /* offsets of the NEST records being written */
        unsigned depth;
        int error;                          /* sticky: first failure, or 0 */
        unsigned compat;                    /* this document's; 0 (reset): VHUB_SNAP_COMPAT */
};

void vhub_snap_writer_init(struct vhub_snap_writer *w);
void vhub_snap_writer_done(struct vhub_snap_writer *w);
/* Start a new document in the same buffer (compat back to the default). */
void vhub_snap_writer_reset(struct vhub_snap_writer *w);

/* Each returns the writer's sticky error (0 while all is well). */
int vhub_snap_begin(struct vhub_snap_writer *w, uint32_t tag);  /* a NEST record */
int vhub_snap_end(struct vhub_snap_writer *w);
int vhub_snap_put_u64(struct vhub_snap_writer *w, uint32_t tag, uint64_t v);
int vhub_snap_put_i64(struct vhub_snap_writer *w, uint32_t tag, int64_t v);
int vhub_snap_put_u32(struct vhub_snap_writer *w, uint32_t tag, uint32_t v);
int vhub_snap_put_bool(struct vhub_snap_writer *w, uint32_t tag, bool v);
int vhub_snap_put_str(struct vhub_snap_writer *w, uint32_t tag, const char *s);
int vhub_snap_put_bytes(struct vhub_snap_writer *w, uint32_t tag, const void *p, size_t n);
int vhub_snap_put_fdname(struct vhub_snap_writer *w, uint32_t tag, const char *name);

/* Fill in the header; the returned buffer and length stay valid until the
 * writer's next use.  -EINVAL if a NEST is still open, else the sticky error. */
int vhub_snap_finish(struct vhub_snap_writer *w, uint64_t generation,
                     const void **ret_buf, size_t *ret_len);

/* ---- reader */

struct vhub_snap_doc {
        unsigned version, compat;
        uint64_t generation;
        const uint8_t *payload;
        size_t payload_len;
};

struct vhub_snap_iter {
        const uint8_t *p, *end;
        unsigned depth;
};

struct vhub_snap_rec {
        uint32_t tag;           /* without VHUB_SNAP_CRITICAL */
        unsigned kind;
        bool critical;
        const uint8_t *value;
        uint32_t len;
        unsigned depth;
};

/* Check a whole document: header, version, CRC, and every record of the
 * tree (lengths, kinds, values, depth).  On failure *ret_why (if given)
 * names the reason: -EBADMSG (corrupt or truncated), -EPROTONOSUPPORT
 * (written for a newer reader: ret's version and compat are filled in for
 * the log line), -E2BIG (over VHUB_SNAP_MAX_SIZE). */
int vhub_snap_parse(const void *buf, size_t len, struct vhub_snap_doc *ret, const char **ret_why);
/* Only the header and CRC (what a snapshot file uses to pick a slot). */
int vhub_snap_check_header(const void *buf, size_t len, struct vhub_snap_doc *ret, const char **ret_why);

void vhub_snap_doc_iter(const struct vhub_snap_doc *doc, struct vhub_snap_iter *ret);
/* 1 and *ret filled, 0 at the end, -EBADMSG on a malformed record. */
int vhub_snap_next(struct vhub_snap_iter *it, struct vhub_snap_rec *ret);
/* What to do with a record whose tag the caller does not know: 0 (skip it)
 * or -EPROTONOSUPPORT when it is critical. */
int vhub_snap_unknown(const struct vhub_snap_rec *rec);

/* Typed access: -EBADMSG when the record is of another kind (a known tag
 * with the wrong kind is a document this reader must not trust). */
int vhub_snap_enter(const struct vhub_snap_rec *rec, struct vhub_snap_iter *ret);
int vhub_snap_get_u64(const struct vhub_snap_rec *rec, uint64_t *ret);
int vhub_snap_get_i64(const struct vhub_snap_rec *rec, int64_t *ret);
int vhub_snap_get_u32(const struct vhub_snap_rec *rec, uint32_t *ret);
int vhub_snap_get_bool(const struct vhub_snap_rec *rec, bool *ret);
/* Copies with a NUL; -ENAMETOOLONG if it does not fit in size bytes. */
int vhub_snap_get_str(const struct vhub_snap_rec *rec, char *buf, size_t size);
int vhub_snap_get_fdname(const struct vhub_snap_rec *rec, char *buf, size_t size);
int vhub_snap_get_bytes(const struct vhub_snap_rec *rec, const void **ret, size_t *ret_len);

/*
 * A record read into a field of an object by a table, so that a new
 * serialized field is one row.  A table is indexed by tag (its rows
 * designated: [D_ID] = VHUB_SNAP_FIELD(U64, struct vhub_device, id)); a tag
 * without a row is the caller's.  The row macro checks at compile time that
 * the member is as big as the type says.
 */
enum vhub_snap_field_type {
        VHUB_SNAP_FIELD_NONE = 0,       /* no row */
        VHUB_SNAP_FIELD_U64,            /* a U64 record into a uint64_t */
        VHUB_SNAP_FIELD_I64,            /* an I64 record into an int64_t */
        VHUB_SNAP_FIELD_U32,            /* a U32 record into a 4-byte unsigned or enum */
        VHUB_SNAP_FIELD_U16,            /* a U32 record up to UINT16_MAX into a uint16_t */
        VHUB_SNAP_FIELD_BOOL,           /* a BOOL record into a bool */
        VHUB_SNAP_FIELD_STR,            /* a STR record into a char array, NUL-terminated */
};

struct vhub_snap_field {
        uint8_t type;                   /* enum vhub_snap_field_type */
        bool bounded;                   /* U32: a value above max is -EBADMSG */
        uint32_t max;
        size_t off, size;               /* the member (STR: the array) */
        size_t seen;                    /* 1 + the offset of a bool set when read; 0: none */
};

#define VHUB_SNAP_FIELD_SIZE_U64        8
#define VHUB_SNAP_FIELD_SIZE_I64        8
#define VHUB_SNAP_FIELD_SIZE_U32        4
#define VHUB_SNAP_FIELD_SIZE_U16        2
#define VHUB_SNAP_FIELD_SIZE_BOOL       sizeof(bool)
#define VHUB_SNAP_FIELD_SIZE_STR        0       /* any */
/* sizeof(member) of struct obj, which must be size (0: any) or not compile */
#define VHUB_SNAP_MEMBER_SIZE(obj, member, size)                                       \
        (sizeof(((obj *)0)->member) +                                                   \
         0 * sizeof(char[(size) == 0 || (size) == sizeof(((obj *)0)->member) ? 1 : -1]))
/* The row: a record of type_ into member of struct obj; then optionally
 * VHUB_SNAP_UPTO(max), VHUB_SNAP_SEEN(obj, flag). */
#define VHUB_SNAP_FIELD(type_, obj, member, ...)                                       \
        { .type = VHUB_SNAP_FIELD_##type_, .off = offsetof(obj, member),               \
          .size = VHUB_SNAP_MEMBER_SIZE(obj, member, VHUB_SNAP_FIELD_SIZE_##type_), __VA_ARGS__ }
#define VHUB_SNAP_UPTO(m)               .bounded = true, .max = (m)
#define VHUB_SNAP_SEEN(obj, flag)       .seen = 1 + offsetof(obj, flag) + 0 * VHUB_SNAP_MEMBER_SIZE(obj, flag, sizeof(bool))

/* rec into obj by table t of n rows: 1 (read; its seen flag set), 0 (no
 * row for its tag: obj untouched), -EBADMSG (another kind, over its bound),
 * -ENAMETOOLONG (a string longer than its array); on failure the field is
 * left as it was. */
int vhub_snap_get_field(const struct vhub_snap_field *t, size_t n, const struct vhub_snap_rec *rec, void *obj);
#define VHUB_SNAP_GET_FIELD(table, rec, obj) \
        vhub_snap_get_field(table, sizeof(table) / sizeof((table)[0]), rec, obj)

/* ---- snapshot files (memfds) */

struct vhub_snap_file {
        int fd;                 /* owned */
        size_t slot_size;       /* the file is 2 * slot_size bytes */
        int newest;             /* slot holding the newest valid copy, -1: none yet */
        uint64_t generation;    /* of that copy */
};

#define VHUB_SNAP_SLOT_MIN 4096u

/* memfd_create(name, MFD_CLOEXEC|MFD_ALLOW_SEALING), sealed against
 * shrinking, two empty slots. */
int vhub_snap_file_create(const char *name, struct vhub_snap_file *ret);
/* Take over a snapshot file passed back by the service manager: checks the
 * layout and finds the newest valid copy (a file with no valid copy is
 * adopted too: newest = -1).  fd is taken in every case (closed on failure). */
int vhub_snap_file_adopt(int fd, struct vhub_snap_file *ret, const char **ret_why);
void vhub_snap_file_close(struct vhub_snap_file *f);
/* The generation the next commit must carry. */
uint64_t vhub_snap_file_next_generation(const struct vhub_snap_file *f);
/* Write a finished document (its generation above the file's) into the
 * other slot: one pwrite(), plus an ftruncate() (and a copy when the newest
 * copy is in slot 1) the first time a document outgrows the slots. */
int vhub_snap_file_write(struct vhub_snap_file *f, const void *doc, size_t len);
/* vhub_snap_finish() with the file's next generation, then write. */
int vhub_snap_file_commit(struct vhub_snap_file *f, struct vhub_snap_writer *w);
/* Read the newest valid copy of the file behind fd into a malloc'ed buffer
 * (header included; parse it with vhub_snap_parse).  -ENOENT: no valid
 * copy; -EPROTONOSUPPORT: the newest copy needs a newer reader. */
int vhub_snap_file_read(int fd, void **ret_buf, size_t *ret_len, const char **ret_why);
