/* SPDX-License-Identifier: MIT */
/*
 * Parameter descriptors and their interpreter, after systemd's
 * sd_json_dispatch_field tables: a method's params are a table of members
 * (name, kind, required, bounds, where the value goes in the method's C
 * struct, one line of description).
 *
 * params_read() is the only code that reads params: unknown members, wrong
 * types, bad names and out-of-range values all answer -32602 with a detail
 * that names the member ("vrings[0].kick" inside arrays).  u64 members take
 * an integer or a "0x..." hex string.  control-discover.c turns the same
 * tables into rpc.discover's JSON Schemas, so what is published is what is
 * enforced.
 */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rpc-conn.h"
#include "vhub-error.h"
#include "vhub-json.h"

enum param_kind {
        PARAM_NAME,      /* const char *: 1..max (0: 64) characters of [A-Za-z0-9._-] */
        PARAM_STRING,    /* const char *: at most max bytes, no NUL */
        PARAM_ENUM,      /* unsigned: the index of one of .values */
        PARAM_U64,       /* uint64_t: an integer or a "0x..." string, min..max */
        PARAM_U32,       /* uint32_t: the same (max at most UINT32_MAX) */
        PARAM_BOOL,      /* bool */
        PARAM_FD,        /* int: an index into the message's fds; the fd is taken (-1: absent) */
        PARAM_BASE64,    /* struct params_bytes: base64 (RFC 4648, padded) of min..max bytes */
        PARAM_UUID,      /* uint8_t[16]: the canonical 36-character form */
        PARAM_MAC,       /* uint8_t[6]: aa:bb:cc:dd:ee:ff */
        PARAM_TIMESTAMP, /* results only: RFC 3339 UTC with microseconds */
        PARAM_OBJECT,    /* the members listed in .members, nothing else (.open: anything) */
        PARAM_ARRAY,     /* struct params_array: min..max elements, each as .items says */
};

/* The longest name a PARAM_NAME takes (a VM or device name). */
#define PARAM_NAME_MAX 64
/* fd indexes: at most this many fds ride with one message. */
#define PARAM_FD_INDEX_MAX (RPC_MAX_FDS_PER_MESSAGE - 1)

struct param {
        const char *name;            /* NULL ends a list */
        enum param_kind kind;
        bool required;               /* in results: always present */
        uint64_t min, max;           /* U64/U32: value; NAME/STRING: length; BASE64: bytes; ARRAY: elements */
        uint64_t def;                /* U64/U32/ENUM/BOOL: the value when absent */
        size_t offset;               /* where the value goes in the struct being filled */
        size_t given;                /* PARAM_GIVEN(): a bool set when present; 0: not recorded */
        const char *const *values;   /* ENUM: NULL-terminated */
        const struct param *members; /* OBJECT: NULL-name-terminated list */
        bool open;                   /* OBJECT without members: any object (results only) */
        const struct param *items;   /* ARRAY: one element, described at offset 0 ... */
        size_t size;                 /* ... of this many bytes in C */
        const char *description;     /* one line, for rpc.discover */
};

/* .given for a bool member of the params struct; +1 keeps 0 for "none". */
#define PARAM_GIVEN(type, field) (offsetof(type, field) + 1)

struct params_array {
        void *items; /* calloc()ed, n elements of the descriptor's .size */
        size_t n;
};

struct params_bytes {
        uint8_t *data; /* malloc()ed */
        size_t len;
};

/*
 * Read params (an object) into base with the members of every list in lists
 * (NULL-terminated, in order: that is the order members are checked in).
 * Members not in any list are refused.  Absent optional members get .def (fds
 * -1, strings NULL).  On failure err says which member; whatever was read
 * (fds taken, arrays) is released by params_clear() in every case.  base must
 * be zeroed and passed through params_init() first.
 */
void params_init(const struct param *const *lists, void *base);
int params_read(json_t *params, const struct param *const *lists, void *base, struct rpc_fds *fds,
                struct vhub_error *err);
/* Close the fds still held (not moved out by the method), free arrays and bytes. */
void params_clear(const struct param *const *lists, void *base);

/* A method takes an fd out of its params with VHU_TAKE_FD(m->p.x.fd)
 * (vhu-fd.h): the fd is the method's, params_clear() skips it. */

/* Check the members of a JSON-RPC envelope (names only, no values). */
int params_check_members_in(json_t *obj, const char *where, const char *const *allowed,
                            struct vhub_error *err);
