/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "control-params.h"
#include "vhub-shared-object.h"
#include "vhu-fd.h"

static bool valid_name(const char *s, size_t max) {
        size_t n = 0;

        for (; s[n]; n++) {
                char c = s[n];

                if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                      c == '.' || c == '_' || c == '-'))
                        return false;
        }
        return n >= 1 && n <= max;
}

int params_check_members_in(json_t *obj, const char *where, const char *const *allowed,
                            struct vhub_error *err) {
        const char *key;
        json_t *value;

        if (!json_is_object(obj))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "%s must be an object", where);
        json_object_foreach(obj, key, value) {
                bool ok = false;

                for (size_t i = 0; allowed[i] && !ok; i++)
                        ok = strcmp(key, allowed[i]) == 0;
                if (!ok)
                        return vhub_error_set(err, VHUB_ERR_PARAMS, "unknown member '%s%s%s'",
                                              where[0] ? where : "", where[0] ? "." : "", key);
        }
        return 0;
}

/* ---- one value ---- */

static void *at(void *base, size_t offset) {
        return (char *)base + offset;
}

/* A string without NUL bytes of at most max bytes. */
static int read_string(json_t *v, const char *name, size_t max, const char **ret, struct vhub_error *err) {
        if (!json_is_string(v))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be a string", name);
        if (json_string_length(v) > max || strlen(json_string_value(v)) != json_string_length(v))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' is too long or has a NUL byte", name);
        *ret = json_string_value(v);
        return 0;
}

static int read_u64(const struct param *p, json_t *v, const char *name, uint64_t *ret,
                    struct vhub_error *err) {
        uint64_t x;

        if (vhub_json_get_u64(v, &x) < 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "'%s' must be a non-negative integer or a \"0x...\" hex string", name);
        if (x > p->max)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' is out of range (max %" PRIu64 ")", name,
                                      p->max);
        if (x < p->min)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be %" PRIu64 "..%" PRIu64, name,
                                      p->min, p->max);
        *ret = x;
        return 0;
}

static int read_enum(const struct param *p, json_t *v, const char *name, unsigned *ret,
                     struct vhub_error *err) {
        char expected[128] = "";
        size_t n = 0;

        for (unsigned i = 0; json_is_string(v) && p->values[i]; i++)
                /* the length too: "client\u0000x" is not "client" */
                if (strlen(p->values[i]) == json_string_length(v) &&
                    strcmp(p->values[i], json_string_value(v)) == 0) {
                        *ret = i;
                        return 0;
                }
        for (unsigned i = 0; p->values[i]; i++) {
                const char *sep = i == 0 ? "" : p->values[i + 1] ? ", " : " or ";

                n += (size_t)snprintf(expected + n, n < sizeof(expected) ? sizeof(expected) - n : 0,
                                      "%s\"%s\"", sep, p->values[i]);
        }
        return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be %s", name, expected);
}

static int read_fd(json_t *v, const char *name, struct rpc_fds *fds, int *ret_fd, struct vhub_error *err) {
        json_int_t i;
        int fd;

        if (!json_is_integer(v))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be an fd index (integer)", name);
        i = json_integer_value(v);
        if (i < 0 || (uint64_t)i >= fds->n)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "'%s' is fd index %lld, but the message carried %u fds", name,
                                      (long long)i, fds->n);
        fd = rpc_fds_take(fds, (unsigned)i);
        if (fd < 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s': fd index %lld is used twice", name,
                                      (long long)i);
        *ret_fd = fd;
        return 0;
}

static int read_base64(const struct param *p, json_t *v, const char *name, struct params_bytes *ret,
                       struct vhub_error *err) {
        /* the longest encoding of max bytes: nothing longer is worth decoding */
        size_t max_chars = (size_t)(p->max + 2) / 3 * 4;
        void *buf = NULL;
        size_t len = 0;
        int r;

        if (!json_is_string(v))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be a string", name);
        r = -EINVAL;
        if (json_string_length(v) <= max_chars && strlen(json_string_value(v)) == json_string_length(v))
                r = vhub_base64_decode(json_string_value(v), &buf, &len);
        if (r < 0 || len < p->min || len > p->max) {
                free(buf);
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be base64 of %" PRIu64 "..%" PRIu64 " bytes",
                                      name, p->min, p->max);
        }
        ret->data = buf;
        ret->len = len;
        return 0;
}

static int hex_digit(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

/* Exactly six pairs of hex digits separated by ':' (the schema's pattern). */
static int parse_mac(const char *s, uint8_t mac[6]) {
        if (strlen(s) != 17)
                return -EINVAL;
        for (int i = 0; i < 6; i++) {
                int hi = hex_digit(s[i * 3]), lo = hex_digit(s[i * 3 + 1]);

                if (hi < 0 || lo < 0 || (i < 5 && s[i * 3 + 2] != ':'))
                        return -EINVAL;
                mac[i] = (uint8_t)(hi << 4 | lo);
        }
        return 0;
}

static int read_members(json_t *obj, const struct param *const *lists, const char *where, void *base,
                        struct rpc_fds *fds, struct vhub_error *err);
static void init_members(const struct param *members, void *base);

static int read_array(const struct param *p, json_t *v, const char *name, struct params_array *ret,
                      struct rpc_fds *fds, struct vhub_error *err) {
        size_t n = json_array_size(v);

        if (!json_is_array(v) || n < p->min || n > p->max)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be an array of %" PRIu64 "..%" PRIu64 " %s",
                                      name, p->min, p->max,
                                      p->items->kind == PARAM_OBJECT ? "objects" : "values");
        if (n == 0)
                return 0;
        ret->items = calloc(n, p->items->size);
        if (!ret->items)
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        ret->n = n;
        /* every element's fds at -1 first: params_clear() may see any of them */
        for (size_t i = 0; i < n; i++)
                if (p->items->kind == PARAM_OBJECT)
                        init_members(p->items->members, at(ret->items, i * p->items->size));
        for (size_t i = 0; i < n; i++) {
                void *elem = at(ret->items, i * p->items->size);
                char where[160];
                int r;

                snprintf(where, sizeof(where), "%s[%zu]", name, i);
                if (p->items->kind == PARAM_OBJECT)
                        r = read_members(json_array_get(v, i), (const struct param *const[]){ p->items->members, NULL },
                                         where, elem, fds, err);
                else
                        r = vhub_error_set(err, VHUB_ERR_INTERNAL, "'%s' cannot be read", where);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int read_value(const struct param *p, json_t *v, const char *name, void *base, struct rpc_fds *fds,
                      struct vhub_error *err) {
        void *dst = at(base, p->offset);
        const char *s;
        uint64_t x;
        int r;

        switch (p->kind) {
        case PARAM_NAME: {
                size_t max = p->max ? (size_t)p->max : PARAM_NAME_MAX;

                r = read_string(v, name, PARAM_NAME_MAX, &s, err);
                if (r < 0)
                        return r;
                if (!valid_name(s, max))
                        return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be 1-%zu characters of [A-Za-z0-9._-]",
                                              name, max);
                *(const char **)dst = s;
                return 0;
        }
        case PARAM_STRING:
                return read_string(v, name, (size_t)p->max, (const char **)dst, err);
        case PARAM_ENUM:
                return read_enum(p, v, name, dst, err);
        case PARAM_U64:
                return read_u64(p, v, name, dst, err);
        case PARAM_U32:
                r = read_u64(p, v, name, &x, err);
                if (r == 0)
                        *(uint32_t *)dst = (uint32_t)x;
                return r;
        case PARAM_BOOL:
                if (!json_is_boolean(v))
                        return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be true or false", name);
                *(bool *)dst = json_is_true(v);
                return 0;
        case PARAM_FD:
                return read_fd(v, name, fds, dst, err);
        case PARAM_BASE64:
                return read_base64(p, v, name, dst, err);
        case PARAM_UUID:
                r = read_string(v, name, 36, &s, err);
                if (r == 0 && vhub_uuid_parse(s, dst) < 0)
                        r = vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be a canonical 36-character UUID", name);
                return r;
        case PARAM_MAC:
                r = read_string(v, name, 17, &s, err);
                if (r == 0 && parse_mac(s, dst) < 0)
                        r = vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must look like aa:bb:cc:dd:ee:ff", name);
                return r;
        case PARAM_OBJECT:
                return read_members(v, (const struct param *const[]){ p->members, NULL }, name, dst, fds, err);
        case PARAM_ARRAY:
                return read_array(p, v, name, dst, fds, err);
        case PARAM_TIMESTAMP:
                break;
        }
        /* a descriptor that only describes results: a bug in the table */
        return vhub_error_set(err, VHUB_ERR_INTERNAL, "'%s' cannot be read", name);
}

static void set_default(const struct param *p, void *base) {
        void *dst = at(base, p->offset);

        switch (p->kind) {
        case PARAM_U64:
                *(uint64_t *)dst = p->def;
                break;
        case PARAM_U32:
                *(uint32_t *)dst = (uint32_t)p->def;
                break;
        case PARAM_ENUM:
                *(unsigned *)dst = (unsigned)p->def;
                break;
        case PARAM_BOOL:
                *(bool *)dst = p->def != 0;
                break;
        default:
                break; /* fds are -1 from params_init(), the rest zero */
        }
}

/* ---- members of an object ---- */

static const struct param *find_member(const struct param *const *lists, const char *key) {
        for (size_t l = 0; lists[l]; l++)
                for (const struct param *p = lists[l]; p->name; p++)
                        if (strcmp(p->name, key) == 0)
                                return p;
        return NULL;
}

static int read_members(json_t *obj, const struct param *const *lists, const char *where, void *base,
                        struct rpc_fds *fds, struct vhub_error *err) {
        const char *key;
        json_t *value;

        if (!json_is_object(obj))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "%s must be an object", where);
        json_object_foreach(obj, key, value)
                if (!find_member(lists, key))
                        return vhub_error_set(err, VHUB_ERR_PARAMS, "unknown member '%s%s%s'", where,
                                              where[0] ? "." : "", key);
        for (size_t l = 0; lists[l]; l++)
                for (const struct param *p = lists[l]; p->name; p++) {
                        json_t *v = json_object_get(obj, p->name);
                        char name[128];
                        int r;

                        snprintf(name, sizeof(name), "%s%s%s", where, where[0] ? "." : "", p->name);
                        if (!v) {
                                if (p->required)
                                        return vhub_error_set(err, VHUB_ERR_PARAMS, "missing member '%s'", name);
                                set_default(p, base);
                                continue;
                        }
                        if (p->given)
                                *(bool *)at(base, p->given - 1) = true;
                        r = read_value(p, v, name, base, fds, err);
                        if (r < 0)
                                return r;
                }
        return 0;
}

int params_read(json_t *params, const struct param *const *lists, void *base, struct rpc_fds *fds,
                struct vhub_error *err) {
        return read_members(params, lists, "", base, fds, err);
}

/* ---- init and clear ---- */

static void init_members(const struct param *members, void *base) {
        for (const struct param *p = members; p && p->name; p++) {
                if (p->kind == PARAM_FD)
                        *(int *)at(base, p->offset) = -1;
                else if (p->kind == PARAM_OBJECT)
                        init_members(p->members, at(base, p->offset));
        }
}

void params_init(const struct param *const *lists, void *base) {
        for (size_t l = 0; lists[l]; l++)
                init_members(lists[l], base);
}

static void clear_value(const struct param *p, void *base) {
        void *dst = at(base, p->offset);

        switch (p->kind) {
        case PARAM_FD:
                *(int *)dst = vhu_safe_close(*(int *)dst);
                break;
        case PARAM_BASE64: {
                struct params_bytes *b = dst;

                free(b->data);
                *b = (struct params_bytes){ 0 };
                break;
        }
        case PARAM_OBJECT:
                for (const struct param *m = p->members; m && m->name; m++)
                        clear_value(m, dst);
                break;
        case PARAM_ARRAY: {
                struct params_array *a = dst;

                for (size_t i = 0; i < a->n; i++)
                        clear_value(p->items, at(a->items, i * p->items->size));
                free(a->items);
                *a = (struct params_array){ 0 };
                break;
        }
        default:
                break;
        }
}

void params_clear(const struct param *const *lists, void *base) {
        for (size_t l = 0; lists[l]; l++)
                for (const struct param *p = lists[l]; p->name; p++)
                        clear_value(p, base);
}
