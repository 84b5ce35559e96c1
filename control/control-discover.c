/* SPDX-License-Identifier: MIT */
/*
 * rpc.discover: an OpenRPC 1.2 document generated from the method table and
 * the same parameter descriptors params_read() enforces, so the schemas say
 * exactly what the daemon accepts: a params object a schema rejects is one
 * the daemon answers with -32602 (x-vhub-params is the whole params object's
 * schema, unknown members refused).  Rules no schema can state are in the
 * descriptions: fd indexes must be below the message's fd count and used
 * once, and integers are written without fraction or exponent.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>

#include "control-internal.h"
#include "control-params.h"
#include "vhub-contract.h"
#include "vhub-version.h"

#define B64 "[A-Za-z0-9+/]"
#define HEX "[0-9a-fA-F]"

/* A regex being written; too long is a bug caught by the tests (empty pattern). */
struct pattern {
        char s[4096];
        size_t n;
        bool overflow;
};

static void __attribute__((format(printf, 2, 3))) pattern_add(struct pattern *p, const char *fmt, ...) {
        va_list ap;
        int k;

        va_start(ap, fmt);
        k = vsnprintf(p->s + p->n, sizeof(p->s) - p->n, fmt, ap);
        va_end(ap);
        if (k < 0 || (size_t)k >= sizeof(p->s) - p->n)
                p->overflow = true;
        else
                p->n += (size_t)k;
}

static json_t *pattern_json(const struct pattern *p) {
        return p->overflow ? json_string("") : json_string(p->s);
}

static void hex_digit_exact(struct pattern *p, unsigned v) {
        static const char lower[] = "0123456789abcdef", upper[] = "0123456789ABCDEF";

        if (v < 10)
                pattern_add(p, "%c", lower[v]);
        else
                pattern_add(p, "[%c%c]", lower[v], upper[v]);
}

/* lo..hi as a character class of ranges: [0-9a-fA-F] style */
static void hex_digit_class(struct pattern *p, unsigned lo, unsigned hi) {
        static const char lower[] = "0123456789abcdef", upper[] = "0123456789ABCDEF";

        pattern_add(p, "[");
        if (lo <= 9) {
                unsigned top = hi < 9 ? hi : 9;

                pattern_add(p, "%c", lower[lo]);
                if (top > lo)
                        pattern_add(p, "-%c", lower[top]);
        }
        if (hi >= 10) {
                unsigned bottom = lo > 10 ? lo : 10;

                pattern_add(p, "%c", lower[bottom]);
                if (hi > bottom)
                        pattern_add(p, "-%c", lower[hi]);
                pattern_add(p, "%c", upper[bottom]);
                if (hi > bottom)
                        pattern_add(p, "-%c", upper[hi]);
        }
        pattern_add(p, "]");
}

/*
 * "0x..." strings of 1-16 hex digits (either case, leading zeros allowed)
 * whose value is at most max: what vhub_json_get_u64() and a bound accept.
 */
static void hex_at_most(struct pattern *p, uint64_t max) {
        unsigned d[16], n = 0;
        const char *sep = "";

        if (max == UINT64_MAX) {
                pattern_add(p, "^0[xX]" HEX "{1,16}$");
                return;
        }
        pattern_add(p, "^0[xX](?=" HEX "{1,16}$)0*");
        if (max == 0) {
                pattern_add(p, "$");
                return;
        }
        for (uint64_t x = max; x; x >>= 4)
                n++;
        for (unsigned i = 0; i < n; i++)
                d[i] = (unsigned)(max >> (4 * (n - 1 - i))) & 0xf;
        pattern_add(p, "(?:");
        /* fewer digits than max */
        if (n >= 2) {
                pattern_add(p, "[1-9a-fA-F]" HEX "{0,%u}", n - 2);
                sep = "|";
        }
        /* as many digits: max's first i digits, then a smaller one, then any */
        for (unsigned i = 0; i < n; i++) {
                unsigned lo = i == 0 ? 1 : 0;

                if (d[i] == 0 || d[i] - 1 < lo)
                        continue;
                pattern_add(p, "%s", sep);
                for (unsigned j = 0; j < i; j++)
                        hex_digit_exact(p, d[j]);
                hex_digit_class(p, lo, d[i] - 1);
                if (n - 1 - i > 0)
                        pattern_add(p, HEX "{%u}", n - 1 - i);
                sep = "|";
        }
        /* max itself */
        pattern_add(p, "%s", sep);
        for (unsigned i = 0; i < n; i++)
                hex_digit_exact(p, d[i]);
        pattern_add(p, ")?$");
}

/* Padded base64 (RFC 4648) of min..max bytes: n groups of 4, then 0-2 bytes more. */
static void base64_bytes(struct pattern *p, uint64_t min, uint64_t max) {
        static const char *const tail[3] = { "", B64 "{2}==", B64 "{3}=" };
        const char *sep = "";

        pattern_add(p, "^(?:");
        for (uint64_t t = 0; t < 3; t++) {
                uint64_t lo = min > t ? (min - t + 2) / 3 : 0, hi;

                if (max < t)
                        continue;
                hi = (max - t) / 3;
                if (lo > hi)
                        continue;
                pattern_add(p, "%s(?:" B64 "{4}){%" PRIu64 ",%" PRIu64 "}%s", sep, lo, hi, tail[t]);
                sep = "|";
        }
        pattern_add(p, ")$");
}

static json_t *u64_schema(const struct param *d) {
        /* jansson's integers are int64_t: above that only the hex form exists */
        uint64_t int_max = d->max > INT64_MAX ? INT64_MAX : d->max;
        struct pattern le = { .n = 0 };
        json_t *hex;

        hex_at_most(&le, d->max);
        hex = json_pack("{s:s, s:o}", "type", "string", "pattern", pattern_json(&le));
        if (d->min > 0) {
                struct pattern below = { .n = 0 };

                hex_at_most(&below, d->min - 1);
                json_object_set_new(hex, "not", json_pack("{s:o}", "pattern", pattern_json(&below)));
        }
        return json_pack("{s:[{s:s, s:I, s:I}, o]}", "anyOf", "type", "integer", "minimum", (json_int_t)d->min,
                         "maximum", (json_int_t)int_max, hex);
}

static json_t *schema_of(const struct param *d);

static json_t *object_schema(const struct param *const *lists, bool open) {
        json_t *props, *required;

        if (open)
                return json_pack("{s:s}", "type", "object");
        props = json_object();
        required = json_array();
        for (size_t l = 0; lists[l]; l++)
                for (const struct param *m = lists[l]; m->name; m++) {
                        json_t *s = schema_of(m);

                        if (s && m->description)
                                json_object_set_new(s, "description", json_string(m->description));
                        json_object_set_new(props, m->name, s);
                        if (m->required)
                                json_array_append_new(required, json_string(m->name));
                }
        return json_pack("{s:s, s:o, s:o, s:b}", "type", "object", "properties", props, "required", required,
                         "additionalProperties", 0);
}

static json_t *schema_of(const struct param *d) {
        struct pattern pat = { .n = 0 };
        json_t *s = NULL, *values;

        switch (d->kind) {
        case PARAM_NAME:
                pattern_add(&pat, "^[A-Za-z0-9._-]{1,%" PRIu64 "}$", d->max ? d->max : PARAM_NAME_MAX);
                s = json_pack("{s:s, s:o}", "type", "string", "pattern", pattern_json(&pat));
                break;
        case PARAM_STRING:
                s = json_pack("{s:s, s:s}", "type", "string", "pattern", "^[^\\x00]*$");
                /* maxLength counts characters, the daemon bytes: exact for ASCII */
                if (d->max)
                        json_object_set_new(s, "maxLength", json_integer((json_int_t)d->max));
                break;
        case PARAM_ENUM:
                values = json_array();
                for (size_t i = 0; d->values[i]; i++)
                        json_array_append_new(values, json_string(d->values[i]));
                s = json_pack("{s:s, s:o}", "type", "string", "enum", values);
                break;
        case PARAM_U64:
        case PARAM_U32:
                s = u64_schema(d);
                break;
        case PARAM_BOOL:
                s = json_pack("{s:s}", "type", "boolean");
                break;
        case PARAM_FD:
                s = json_pack("{s:s, s:i, s:i}", "type", "integer", "minimum", 0, "maximum", PARAM_FD_INDEX_MAX);
                break;
        case PARAM_BASE64:
                base64_bytes(&pat, d->min, d->max);
                s = json_pack("{s:s, s:o}", "type", "string", "pattern", pattern_json(&pat));
                break;
        case PARAM_UUID:
                s = json_pack("{s:s, s:s}", "type", "string", "pattern",
                              "^" HEX "{8}-" HEX "{4}-" HEX "{4}-" HEX "{4}-" HEX "{12}$");
                break;
        case PARAM_MAC:
                s = json_pack("{s:s, s:s}", "type", "string", "pattern", "^" HEX "{2}(:" HEX "{2}){5}$");
                break;
        case PARAM_TIMESTAMP:
                s = json_pack("{s:s, s:s, s:s}", "type", "string", "format", "date-time", "pattern",
                              "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z$");
                break;
        case PARAM_OBJECT:
                s = object_schema((const struct param *const[]){ d->members, NULL }, d->open);
                break;
        case PARAM_ARRAY:
                s = json_pack("{s:s, s:o, s:I}", "type", "array", "items", schema_of(d->items), "minItems",
                              (json_int_t)d->min);
                if (d->max != UINT64_MAX)
                        json_object_set_new(s, "maxItems", json_integer((json_int_t)d->max));
                break;
        }
        return s;
}

static bool has_code(const int *codes, size_t n, int code) {
        for (size_t i = 0; i < n; i++)
                if (codes[i] == code)
                        return true;
        return false;
}

/* The errors a method may answer: those its flags imply and its own, in the contract's order. */
static json_t *errors_of(const struct control_method *m) {
        json_t *errors = json_array();
        int codes[32];
        size_t n = 0;

        codes[n++] = VHUB_ERR_PARAMS;
        codes[n++] = VHUB_ERR_INTERNAL;
        /* any call can be in flight at a crash-restart: one that waits on
         * back-ends or carries fds on its own, any other inside a batch
         * still running (control-snapshot.c answers them -32011) */
        codes[n++] = VHUB_ERR_RESTARTED;
        if (m->flags & (METHOD_VM | METHOD_VM_OPTIONAL))
                codes[n++] = VHUB_ERR_NO_VM;
        if (m->flags & METHOD_DEVICE)
                codes[n++] = VHUB_ERR_NO_DEVICE;
        if (m->flags & METHOD_WAITS)
                codes[n++] = VHUB_ERR_LIMIT;
        for (const int *e = m->errors; e && *e && n < sizeof(codes) / sizeof(codes[0]); e++)
                codes[n++] = *e;
#define ERROR_ENTRY(name, code, message)                                                                  \
        if (has_code(codes, n, code))                                                                     \
                json_array_append_new(errors, json_pack("{s:i, s:s}", "code", code, "message", message));
        VHUB_CONTRACT_ERRORS(ERROR_ENTRY)
#undef ERROR_ENTRY
        return errors;
}

static json_t *method_of(const struct control_method *m) {
        const struct param *lists[4];
        json_t *params = json_array(), *o;

        control_method_param_lists(m, lists);
        for (size_t l = 0; lists[l]; l++)
                for (const struct param *d = lists[l]; d->name; d++)
                        json_array_append_new(params, json_pack("{s:s, s:s, s:b, s:o}", "name", d->name, "description",
                                                                d->description ? d->description : "", "required",
                                                                d->required, "schema", schema_of(d)));
        o = json_pack("{s:s, s:s, s:s, s:o, s:{s:s, s:o}, s:o, s:o}", "name", m->name, "summary", m->summary,
                      "paramStructure", "by-name", "params", params, "result", "name", "result", "schema",
                      m->result ? schema_of(m->result) : object_schema((const struct param *const[]){ NULL }, false),
                      "errors", errors_of(m), "x-vhub-params", object_schema(lists, false));
        if (o && (m->flags & METHOD_WAITS))
                json_object_set_new(o, "x-vhub-waits-on-backends", json_true());
        if (o && (m->flags & METHOD_FDS_OUT))
                json_object_set_new(o, "x-vhub-answers-with-fds", json_true());
        return o;
}

json_t *control_discover_build(void) {
        const struct control_method *table;
        json_t *methods = json_array();
        size_t n;

        table = control_methods(&n);
        for (size_t i = 0; i < n; i++)
                json_array_append_new(methods, method_of(&table[i]));
        return json_pack(
                "{s:s, s:{s:s, s:s, s:s, s:s}, s:o}", "openrpc", "1.2.6", "info", "title", "vhubd control API",
                "version", VHUB_API_VERSION, "x-vhub-daemon-version", VHUB_VERSION, "description",
                "JSON-RPC 2.0 over a unix socket, one JSON value per line, fds as SCM_RIGHTS named by index "
                "(\"fds\": N). u64 members are integers (at most 2^63-1, without fraction or exponent) or "
                "\"0x...\" hex strings. An fd index must be below the message's fd count and used once. "
                "Unknown members are refused (x-vhub-params: the whole params object). A method with "
                "x-vhub-answers-with-fds is refused inside a batch.",
                "methods", methods);
}
