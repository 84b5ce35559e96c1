/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-json.h"

json_t *vhub_json_u64(uint64_t v) {
        char buf[2 + 16 + 1];

        if (v < (UINT64_C(1) << 53))
                return json_integer((json_int_t)v);
        snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
        return json_string(buf);
}

int vhub_json_get_u64(const json_t *v, uint64_t *ret) {
        const char *s;
        uint64_t x = 0;
        size_t n;

        if (json_is_integer(v)) {
                json_int_t i = json_integer_value(v);

                if (i < 0)
                        return -EINVAL;
                *ret = (uint64_t)i;
                return 0;
        }
        if (!json_is_string(v))
                return -EINVAL;
        s = json_string_value(v);
        n = json_string_length(v);
        if (n < 3 || n > 18 || s[0] != '0' || (s[1] != 'x' && s[1] != 'X'))
                return -EINVAL;
        for (size_t i = 2; i < n; i++) {
                char ch = s[i];
                unsigned d;

                if (ch >= '0' && ch <= '9')
                        d = (unsigned)(ch - '0');
                else if (ch >= 'a' && ch <= 'f')
                        d = (unsigned)(ch - 'a' + 10);
                else if (ch >= 'A' && ch <= 'F')
                        d = (unsigned)(ch - 'A' + 10);
                else
                        return -EINVAL;
                x = (x << 4) | d;
        }
        *ret = x;
        return 0;
}

int vhub_json_object_get_u64(const json_t *object, const char *key, uint64_t *ret) {
        const json_t *v = json_object_get(object, key);

        if (!v)
                return -ENOENT;
        return vhub_json_get_u64(v, ret);
}

static const char b64_alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int vhub_base64_encode(const void *data, size_t len, char **ret) {
        const uint8_t *p = data;
        char *out, *o;

        if (len > SIZE_MAX / 2)
                return -ENOMEM;
        out = malloc((len + 2) / 3 * 4 + 1);
        if (!out)
                return -ENOMEM;
        o = out;
        for (size_t i = 0; i < len; i += 3) {
                uint32_t v = (uint32_t)p[i] << 16;

                if (i + 1 < len)
                        v |= (uint32_t)p[i + 1] << 8;
                if (i + 2 < len)
                        v |= p[i + 2];
                *o++ = b64_alphabet[(v >> 18) & 63];
                *o++ = b64_alphabet[(v >> 12) & 63];
                *o++ = i + 1 < len ? b64_alphabet[(v >> 6) & 63] : '=';
                *o++ = i + 2 < len ? b64_alphabet[v & 63] : '=';
        }
        *o = '\0';
        *ret = out;
        return 0;
}

static int b64_value(char ch) {
        const char *p;

        if (ch == '\0')
                return -1;
        p = strchr(b64_alphabet, ch);
        return p ? (int)(p - b64_alphabet) : -1;
}

int vhub_base64_decode(const char *s, void **ret, size_t *ret_len) {
        size_t n = strlen(s), len = 0;
        uint8_t *out;

        if (n % 4 != 0)
                return -EINVAL;
        out = malloc(n / 4 * 3 + 1);
        if (!out)
                return -ENOMEM;
        for (size_t i = 0; i < n; i += 4) {
                bool last = i + 4 == n;
                int a = b64_value(s[i]), b = b64_value(s[i + 1]);
                int c3 = s[i + 2] == '=' && last ? -2 : b64_value(s[i + 2]);
                int d = s[i + 3] == '=' && last ? -2 : b64_value(s[i + 3]);
                uint32_t v;

                if (a < 0 || b < 0 || c3 == -1 || d == -1 || (c3 == -2 && d != -2))
                        goto bad;
                v = (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)(c3 < 0 ? 0 : c3) << 6 |
                    (uint32_t)(d < 0 ? 0 : d);
                out[len++] = (uint8_t)(v >> 16);
                if (c3 >= 0)
                        out[len++] = (uint8_t)(v >> 8);
                if (d >= 0)
                        out[len++] = (uint8_t)v;
        }
        *ret = out;
        *ret_len = len;
        return 0;
bad:
        free(out);
        return -EINVAL;
}
