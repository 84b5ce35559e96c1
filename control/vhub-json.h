/* SPDX-License-Identifier: MIT */
/*
 * The contract's JSON conventions, shared by the daemon's server and the
 * client library: u64 fields as integers below 2^53 or "0x..." strings,
 * binary data (config space) as base64.
 */
#pragma once

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Unsigned 64-bit values ("Numbers are JSON integers ... otherwise a
 * "0x…" hex string").  vhub_json_u64() returns a new integer when v < 2^53,
 * else a "0x…" string (NULL on ENOMEM).  vhub_json_get_u64() accepts a
 * non-negative integer or a "0x…"/"0X…" string of 1-16 hex digits: 0 or
 * -EINVAL.
 */
json_t *vhub_json_u64(uint64_t v);
int vhub_json_get_u64(const json_t *v, uint64_t *ret);
/* Member key of object as u64: -ENOENT if absent, -EINVAL if malformed. */
int vhub_json_object_get_u64(const json_t *object, const char *key, uint64_t *ret);

/*
 * Base64 (RFC 4648, with padding) for config space.  encode: *ret is a
 * malloc()ed NUL-terminated string.  decode: *ret is malloc()ed (never NULL,
 * even for empty input), *ret_len its length; -EINVAL on bad input.
 */
int vhub_base64_encode(const void *data, size_t len, char **ret);
int vhub_base64_decode(const char *s, void **ret, size_t *ret_len);
