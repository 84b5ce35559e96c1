/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control-params.h"

bool params_valid_name(const char *s) {
        size_t n = 0;

        if (!s)
                return false;
        for (; s[n]; n++) {
                char c = s[n];

                if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                      c == '.' || c == '_' || c == '-'))
                        return false;
        }
        return n >= 1 && n <= 64;
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

int params_check_members(json_t *params, const char *const *allowed, struct vhub_error *err) {
        return params_check_members_in(params, "", allowed, err);
}

static const char *field(char *buf, size_t n, const char *where, const char *key) {
        if (where && where[0])
                snprintf(buf, n, "%s.%s", where, key);
        else
                snprintf(buf, n, "%s", key);
        return buf;
}

int params_get_string(json_t *params, const char *key, bool required, size_t max_len,
                      const char **ret, struct vhub_error *err) {
        json_t *v = json_object_get(params, key);

        if (!v) {
                if (required)
                        return vhub_error_set(err, VHUB_ERR_PARAMS, "missing member '%s'", key);
                *ret = NULL;
                return 0;
        }
        if (!json_is_string(v))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be a string", key);
        if (json_string_length(v) > max_len || strlen(json_string_value(v)) != json_string_length(v))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' is too long or has a NUL byte", key);
        *ret = json_string_value(v);
        return 0;
}

int params_get_name(json_t *params, const char *key, bool required, const char **ret,
                    struct vhub_error *err) {
        const char *s;
        int r = params_get_string(params, key, required, 64, &s, err);

        if (r < 0)
                return r;
        if (s && !params_valid_name(s))
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "'%s' must be 1-64 characters of [A-Za-z0-9._-]", key);
        *ret = s;
        return 0;
}

int params_get_u64_in(json_t *obj, const char *where, const char *key, bool required, uint64_t def,
                      uint64_t max, uint64_t *ret, struct vhub_error *err) {
        json_t *v = json_object_get(obj, key);
        char name[128];
        uint64_t x;
        int r;

        if (!v) {
                if (required)
                        return vhub_error_set(err, VHUB_ERR_PARAMS, "missing member '%s'",
                                              field(name, sizeof(name), where, key));
                *ret = def;
                return 0;
        }
        r = vhub_json_get_u64(v, &x);
        if (r < 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "'%s' must be a non-negative integer or a \"0x...\" hex string",
                                      field(name, sizeof(name), where, key));
        if (x > max)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' is out of range (max %" PRIu64 ")",
                                      field(name, sizeof(name), where, key), max);
        *ret = x;
        return 0;
}

int params_get_u64(json_t *params, const char *key, bool required, uint64_t def, uint64_t max,
                   uint64_t *ret, struct vhub_error *err) {
        return params_get_u64_in(params, "", key, required, def, max, ret, err);
}

int params_get_u32(json_t *params, const char *key, bool required, uint32_t def, uint32_t max,
                   uint32_t *ret, struct vhub_error *err) {
        uint64_t v;
        int r = params_get_u64(params, key, required, def, max, &v, err);

        if (r < 0)
                return r;
        *ret = (uint32_t)v;
        return 0;
}

int params_take_fd_in(json_t *obj, const char *where, const char *key, bool required,
                      struct rpc_fds *fds, int *ret_fd, struct vhub_error *err) {
        json_t *v = json_object_get(obj, key);
        char name[128];
        json_int_t i;
        int fd;

        if (!v) {
                if (required)
                        return vhub_error_set(err, VHUB_ERR_PARAMS, "missing member '%s'",
                                              field(name, sizeof(name), where, key));
                *ret_fd = -1;
                return 0;
        }
        if (!json_is_integer(v))
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s' must be an fd index (integer)",
                                      field(name, sizeof(name), where, key));
        i = json_integer_value(v);
        if (i < 0 || (uint64_t)i >= fds->n)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "'%s' is fd index %lld, but the message carried %u fds",
                                      field(name, sizeof(name), where, key), (long long)i, fds->n);
        fd = rpc_fds_take(fds, (unsigned)i);
        if (fd < 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'%s': fd index %lld is used twice",
                                      field(name, sizeof(name), where, key), (long long)i);
        *ret_fd = fd;
        return 0;
}

int params_take_fd(json_t *params, const char *key, bool required, struct rpc_fds *fds, int *ret_fd,
                   struct vhub_error *err) {
        return params_take_fd_in(params, "", key, required, fds, ret_fd, err);
}
