/* SPDX-License-Identifier: MIT */
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "vhub-hash.h"

#define INITIAL_BUCKETS 8u

/* ---- SipHash-2-4 (Aumasson, Bernstein: "SipHash: a fast short-input PRF") ---- */

static inline uint64_t rotl64(uint64_t x, unsigned b) {
        return (x << b) | (x >> (64 - b));
}

#define SIP_ROUND(v0, v1, v2, v3)                                                       \
        do {                                                                            \
                v0 += v1; v1 = rotl64(v1, 13); v1 ^= v0; v0 = rotl64(v0, 32);           \
                v2 += v3; v3 = rotl64(v3, 16); v3 ^= v2;                                \
                v0 += v3; v3 = rotl64(v3, 21); v3 ^= v0;                                \
                v2 += v1; v1 = rotl64(v1, 17); v1 ^= v2; v2 = rotl64(v2, 32);           \
        } while (0)

uint64_t vhub_hash_bytes(const struct vhub_hash *h, const void *data, size_t len) {
        const uint8_t *p = data;
        uint64_t v0 = h->key[0] ^ UINT64_C(0x736f6d6570736575);
        uint64_t v1 = h->key[1] ^ UINT64_C(0x646f72616e646f6d);
        uint64_t v2 = h->key[0] ^ UINT64_C(0x6c7967656e657261);
        uint64_t v3 = h->key[1] ^ UINT64_C(0x7465646279746573);
        uint64_t m, last = (uint64_t)(len & 0xff) << 56;
        size_t left = len;

        for (; left >= 8; p += 8, left -= 8) {
                memcpy(&m, p, 8);
                m = le64toh(m);
                v3 ^= m;
                SIP_ROUND(v0, v1, v2, v3);
                SIP_ROUND(v0, v1, v2, v3);
                v0 ^= m;
        }
        for (size_t i = 0; i < left; i++)
                last |= (uint64_t)p[i] << (8 * i);
        v3 ^= last;
        SIP_ROUND(v0, v1, v2, v3);
        SIP_ROUND(v0, v1, v2, v3);
        v0 ^= last;
        v2 ^= 0xff;
        for (int i = 0; i < 4; i++)
                SIP_ROUND(v0, v1, v2, v3);
        return v0 ^ v1 ^ v2 ^ v3;
}

/* ---- the table ---- */

int vhub_hash_init(struct vhub_hash *h) {
        memset(h, 0, sizeof(*h));
        h->buckets = calloc(INITIAL_BUCKETS, sizeof(*h->buckets));
        if (!h->buckets)
                return -ENOMEM;
        h->n_buckets = INITIAL_BUCKETS;
        if (getrandom(h->key, sizeof(h->key), GRND_NONBLOCK) != (ssize_t)sizeof(h->key)) {
                /* no entropy yet (early boot): still different per table and run */
                struct timespec ts;

                clock_gettime(CLOCK_MONOTONIC, &ts);
                h->key[0] = (uint64_t)ts.tv_nsec * UINT64_C(0x9e3779b97f4a7c15) ^ (uint64_t)(uintptr_t)h;
                h->key[1] = (uint64_t)ts.tv_sec ^ rotl64(h->key[0], 29);
        }
        return 0;
}

void vhub_hash_done(struct vhub_hash *h) {
        free(h->buckets);
        h->buckets = NULL;
        h->n_buckets = 0;
        h->n = 0;
}

static size_t bucket_of(size_t n_buckets, uint64_t hash) {
        return (size_t)hash & (n_buckets - 1);
}

/* Move every node into n_buckets new buckets; on ENOMEM keep the old ones. */
static void rehash(struct vhub_hash *h, size_t n_buckets) {
        struct vhub_hash_node **b = calloc(n_buckets, sizeof(*b));

        if (!b)
                return;
        for (size_t i = 0; i < h->n_buckets; i++) {
                struct vhub_hash_node *node = h->buckets[i], *next;

                for (; node; node = next) {
                        size_t k = bucket_of(n_buckets, node->hash);

                        next = node->next;
                        node->next = b[k];
                        b[k] = node;
                }
        }
        free(h->buckets);
        h->buckets = b;
        h->n_buckets = n_buckets;
}

void vhub_hash_insert(struct vhub_hash *h, struct vhub_hash_node *node, uint64_t hash) {
        size_t k;

        if (h->n >= h->n_buckets && h->n_buckets <= SIZE_MAX / 2 / sizeof(*h->buckets))
                rehash(h, h->n_buckets * 2);
        k = bucket_of(h->n_buckets, hash);
        node->hash = hash;
        node->next = h->buckets[k];
        h->buckets[k] = node;
        h->n++;
}

void vhub_hash_remove(struct vhub_hash *h, struct vhub_hash_node *node) {
        struct vhub_hash_node **p = &h->buckets[bucket_of(h->n_buckets, node->hash)];

        for (; *p; p = &(*p)->next)
                if (*p == node) {
                        *p = node->next;
                        node->next = NULL;
                        h->n--;
                        break;
                }
        /* give memory back after a spike (10,000 devices gone) */
        if (h->n_buckets > INITIAL_BUCKETS && h->n < h->n_buckets / 8)
                rehash(h, h->n_buckets / 2);
}

struct vhub_hash_node *vhub_hash_next(const struct vhub_hash_node *node, uint64_t hash) {
        for (node = node->next; node; node = node->next)
                if (node->hash == hash)
                        return (struct vhub_hash_node *)node;
        return NULL;
}

struct vhub_hash_node *vhub_hash_first(const struct vhub_hash *h, uint64_t hash) {
        struct vhub_hash_node *node;

        if (!h->buckets)
                return NULL;
        node = h->buckets[bucket_of(h->n_buckets, hash)];
        if (!node || node->hash == hash)
                return node;
        return vhub_hash_next(node, hash);
}
