/* SPDX-License-Identifier: MIT */
/*
 * Strict reading of JSON-RPC params: unknown members, wrong types, bad
 * names and out-of-range values all answer -32602 with a detail that names
 * the field.  u64 fields accept an integer or a "0x..." hex string.
 */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "rpc-conn.h"
#include "vhub-json.h"
#include "vhub-error.h"

/* NULL-terminated list of the members a method accepts. */
int params_check_members(json_t *params, const char *const *allowed, struct vhub_error *err);
/* A VM or device name: 1-64 of [A-Za-z0-9._-]. */
int params_get_name(json_t *params, const char *key, bool required, const char **ret,
                    struct vhub_error *err);
int params_get_string(json_t *params, const char *key, bool required, size_t max_len,
                      const char **ret, struct vhub_error *err);
int params_get_u64(json_t *params, const char *key, bool required, uint64_t def, uint64_t max,
                   uint64_t *ret, struct vhub_error *err);
int params_get_u32(json_t *params, const char *key, bool required, uint32_t def, uint32_t max,
                   uint32_t *ret, struct vhub_error *err);
/* An fd index into this message's fds; the fd is taken (-1 if absent and optional). */
int params_take_fd(json_t *params, const char *key, bool required, struct rpc_fds *fds, int *ret_fd,
                   struct vhub_error *err);
/* Same for a member of a nested object, named "outer[i].key" in errors. */
int params_get_u64_in(json_t *obj, const char *where, const char *key, bool required, uint64_t def,
                      uint64_t max, uint64_t *ret, struct vhub_error *err);
int params_take_fd_in(json_t *obj, const char *where, const char *key, bool required,
                      struct rpc_fds *fds, int *ret_fd, struct vhub_error *err);
int params_check_members_in(json_t *obj, const char *where, const char *const *allowed,
                            struct vhub_error *err);

bool params_valid_name(const char *s);
