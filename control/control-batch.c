/* SPDX-License-Identifier: MIT */
/*
 * A batch (a JSON array of requests on one line) is answered with one
 * array once every element is answered.
 *
 * One line must not make the daemon build more than a connection may have
 * queued (the output bound): each answer is serialized when it comes and
 * counted, keeping room for a short -32008 for every element still to be
 * answered.  Once an answer would not fit, it and every element after it is
 * answered -32008 instead, and elements not run yet are not run.  A batch
 * whose -32008s alone could not fit is refused whole before anything runs.
 *
 * A notification's answer is counted as if it were sent (then dropped): a
 * batch of notifications makes the daemon do no more work than a batch of
 * calls whose answers fit, and past the bound notifications are not run
 * either.  The -32008s' sizes are computed, never built: a batch of half a
 * million elements costs a pass over its ids until the bound is passed.
 *
 * Until it is answered a batch is in its connection's list, with the ids
 * of its requests written out once: the restart snapshot names them, and
 * the next process answers the batch with one array of -32011s.  A batch
 * whose record could not be stored when that mattered (an element that
 * waits on back-ends, a slice after the first) runs nothing more: a crash
 * would leave it unanswered.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "control-internal.h"
#include "vhub-commit.h"
#include "vhub-log.h"

/* How answers are serialized (and sized). */
#define DUMP_FLAGS (JSON_COMPACT | JSON_ENCODE_ANY)

struct control_batch {
        TAILQ_ENTRY(control_batch) link; /* in conn->batches */
        struct control_conn *conn;
        unsigned n;
        unsigned remaining;        /* slots not answered yet, +1 while elements are run */
        char **answers;            /* slot i: element i's response line, or NULL (none) */
        size_t *lens;
        size_t *refusal_lens;      /* what slot i's -32008 takes */
        size_t bytes;              /* of the answers so far, with their commas */
        size_t refusals_left;      /* room kept for the slots not answered yet */
        size_t limit;
        bool over;
        char *ids;                 /* control_batch_ids() */
        size_t ids_len;
        uint64_t since;            /* conn->snap_serial when it came */
        bool unrecorded;           /* a record naming it could not be stored */
};

/* The -32008 an element gets once the batch's answers would pass the bound. */
static char *refusal_line(json_t *id, size_t limit, size_t *ret_len) {
        char detail[128];
        json_t *msg;
        char *s;

        snprintf(detail, sizeof(detail), "the batch's answers would pass the output bound of %zu bytes",
                 limit);
        msg = json_pack("{s:s, s:O, s:{s:i, s:s, s:{s:s}}}", "jsonrpc", "2.0", "id", id ? id : json_null(),
                        "error", "code", VHUB_ERR_LIMIT, "message", vhub_error_message(VHUB_ERR_LIMIT),
                        "data", "detail", detail);
        s = msg ? json_dumps(msg, DUMP_FLAGS) : NULL;
        json_decref(msg);
        *ret_len = s ? strlen(s) : 0;
        return s;
}

static json_t *element_id(json_t *e) {
        json_t *id = json_is_object(e) ? json_object_get(e, "id") : NULL;

        return id ? id : json_null();
}

/* What element e's -32008 takes, its comma included: the one with id null
 * (null_len) with e's id in place of the null. */
static size_t refusal_len(json_t *e, size_t null_len) {
        return null_len - strlen("null") + json_dumpb(element_id(e), NULL, 0, DUMP_FLAGS) + 1;
}

/* The requests' ids, one a line (ids that cannot be answered left out). */
static int batch_ids(json_t *elements, char **ret, size_t *ret_len) {
        size_t len = 0, i;
        json_t *e, *id;
        char *p;

        json_array_foreach(elements, i, e)
                if ((id = json_is_object(e) ? json_object_get(e, "id") : NULL) && control_id_valid(id))
                        len += json_dumpb(id, NULL, 0, DUMP_FLAGS) + 1;
        *ret = NULL;
        *ret_len = 0;
        if (len == 0)
                return 0;
        p = malloc(len);
        if (!p)
                return -ENOMEM;
        json_array_foreach(elements, i, e)
                if ((id = json_is_object(e) ? json_object_get(e, "id") : NULL) && control_id_valid(id)) {
                        *ret_len += json_dumpb(id, p + *ret_len, len - *ret_len, DUMP_FLAGS);
                        p[(*ret_len)++] = '\n';
                }
        *ret = p;
        return 0;
}

struct control_batch *control_batch_new(struct control_conn *c, json_t *elements, size_t limit,
                                        struct vhub_error *err) {
        struct control_batch *b = NULL;
        size_t n = json_array_size(elements), need = 2, null_len;
        char *null_refusal = refusal_line(NULL, limit, &null_len);

        if (!null_refusal || n > UINT_MAX - 1)
                goto oom;
        free(null_refusal);
        /* refused whole before anything is allocated for its elements */
        for (size_t i = 0; i < n; i++) {
                need += refusal_len(json_array_get(elements, i), null_len);
                if (need > limit) {
                        vhub_error_set(err, VHUB_ERR_LIMIT,
                                       "a batch of %zu calls could not be answered within the output bound of %zu bytes",
                                       n, limit);
                        return NULL;
                }
        }
        b = calloc(1, sizeof(*b));
        if (!b)
                goto oom;
        b->n = (unsigned)n;
        b->limit = limit;
        b->answers = calloc(n, sizeof(*b->answers));
        b->lens = calloc(n, sizeof(*b->lens));
        b->refusal_lens = calloc(n, sizeof(*b->refusal_lens));
        if (!b->answers || !b->lens || !b->refusal_lens || batch_ids(elements, &b->ids, &b->ids_len) < 0)
                goto oom;
        for (size_t i = 0; i < n; i++)
                b->refusal_lens[i] = refusal_len(json_array_get(elements, i), null_len);
        b->refusals_left = need - 2;
        b->bytes = 2;              /* [ ] */
        b->remaining = b->n + 1;
        b->conn = c;
        b->since = c->snap_serial;
        control_conn_ref(c);
        TAILQ_INSERT_TAIL(&c->batches, b, link);
        return b;

oom:
        control_batch_free(b);
        vhub_error_set(err, VHUB_ERR_INTERNAL, "out of memory");
        return NULL;
}

void control_batch_free(struct control_batch *b) {
        if (!b)
                return;
        for (unsigned i = 0; b->answers && i < b->n; i++)
                free(b->answers[i]);
        free(b->answers);
        free(b->lens);
        free(b->refusal_lens);
        free(b->ids);
        if (b->conn) {
                /* answered (or nobody is left to answer): out of the snapshot */
                TAILQ_REMOVE(&b->conn->batches, b, link);
                control_conn_changed(b->conn);
                control_conn_unref(b->conn);
        }
        free(b);
}

const char *control_batch_ids(const struct control_batch *b, size_t *ret_len) {
        *ret_len = b->ids_len;
        return b->ids;
}

const struct control_batch *control_batch_next(const struct control_conn *c, const struct control_batch *b) {
        return b ? TAILQ_NEXT(b, link) : TAILQ_FIRST(&c->batches);
}

bool control_batch_over(const struct control_batch *b) {
        return b->over;
}

int control_batch_record(struct control_batch *b) {
        if (!b->unrecorded && (b->ids_len == 0 || control_conn_record(b->conn, b->since) >= 0))
                return 0;       /* (no ids: a batch of notifications, nobody waits) */
        if (!b->unrecorded)
                vhub_log_full(LOG_WARNING, NULL, NULL, NULL,
                              "control connection %llu: a batch of %u calls could not be recorded for a restart: "
                              "its calls not run yet are refused", (unsigned long long)b->conn->id, b->n);
        b->unrecorded = true;
        return -EIO;
}

bool control_batch_unrecorded(const struct control_batch *b) {
        return b->unrecorded;
}

static void batch_send(struct control_batch *b) {
        static char open[] = "[", comma[] = ",", close[] = "]";
        struct iovec *iov;
        unsigned k = 0;

        if (!b->conn->rpc)
                return;
        iov = calloc(2 * (size_t)b->n + 1, sizeof(*iov));
        if (!iov) {
                rpc_conn_close_after_flush(b->conn->rpc, "out of memory");
                return;
        }
        for (unsigned i = 0; i < b->n; i++) {
                if (!b->answers[i])
                        continue;
                iov[k] = (struct iovec){ k == 0 ? open : comma, 1 };
                iov[k + 1] = (struct iovec){ b->answers[i], b->lens[i] };
                k += 2;
        }
        if (k > 0) {
                iov[k++] = (struct iovec){ close, 1 };
                (void)rpc_conn_send_parts(b->conn->rpc, iov, k);
                control_server_note_spike(b->conn->srv, b->bytes);
        }
        free(iov);
}

/* Slot index takes response; answered: it is sent, else (a notification)
 * it is only counted. */
static void batch_take(struct control_batch *b, unsigned index, json_t *response, bool answered) {
        if (index < b->n) {
                b->refusals_left -= b->refusal_lens[index];
                if (response && !b->over) {
                        char *s = answered ? json_dumps(response, DUMP_FLAGS) : NULL;
                        size_t len = s ? strlen(s) : json_dumpb(response, NULL, 0, DUMP_FLAGS);

                        if ((s || !answered) && b->bytes + len + 1 + b->refusals_left <= b->limit) {
                                b->answers[index] = s;
                                b->lens[index] = len;
                                b->bytes += len + 1;
                        } else {
                                free(s);
                                b->over = true;
                                vhub_log_full(LOG_INFO, NULL, NULL, NULL,
                                              "control connection %llu: a batch of %u calls reached the output bound; the rest are answered -32008 (notifications: not run)",
                                              (unsigned long long)b->conn->id, b->n);
                        }
                }
                if (answered && response && !b->answers[index]) {
                        b->answers[index] = refusal_line(json_object_get(response, "id"), b->limit,
                                                         &b->lens[index]);
                        b->bytes += b->lens[index] + 1;
                }
        }
        json_decref(response);
        if (--b->remaining > 0)
                return;
        batch_send(b);
        control_batch_free(b);
}

void control_batch_slot(struct control_batch *b, unsigned index, json_t *response) {
        batch_take(b, index, response, true);
}

void control_batch_slot_unanswered(struct control_batch *b, unsigned index, json_t *response) {
        batch_take(b, index, response, false);
}

void control_batch_refuse(struct control_batch *b, unsigned index, json_t *element) {
        json_t *id = json_is_object(element) ? json_object_get(element, "id") : json_null();
        json_t *msg = NULL;

        /* a notification is not answered, not even refused */
        if (id) {
                msg = json_pack("{s:O}", "id", id);
                if (!msg) {
                        control_batch_slot(b, index, NULL);
                        return;
                }
        }
        /* over already: the slot gets the -32008 built from the id */
        control_batch_slot(b, index, msg);
}
