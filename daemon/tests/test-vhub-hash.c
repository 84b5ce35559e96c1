/* SPDX-License-Identifier: MIT */
/*
 * The hash table (daemon/vhub-hash.c): SipHash-2-4 against the paper's
 * test vector, lookups through growth and shrinking against a plain array,
 * removal from the middle of a chain, colliding hashes (every candidate
 * walked, none lost), and per-table keys.
 *
 *   test-vhub-hash
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-check.h"
#include "vhub-hash.h"

struct item {
        struct vhub_hash_node node;
        char name[16];
        int live;
};

static uint64_t item_hash(const struct vhub_hash *h, const char *name) {
        return vhub_hash_bytes(h, name, strlen(name));
}

static struct item *find(const struct vhub_hash *h, const char *name) {
        uint64_t hash = item_hash(h, name);

        for (struct vhub_hash_node *n = vhub_hash_first(h, hash); n; n = vhub_hash_next(n, hash)) {
                struct item *it = vhub_hash_entry(n, struct item, node);

                if (strcmp(it->name, name) == 0)
                        return it;
        }
        return NULL;
}

/* SipHash paper, appendix A: key 00..0f, message 00..0e */
static void test_siphash_vector(void) {
        struct vhub_hash h = { 0 };
        uint8_t msg[15];

        h.key[0] = UINT64_C(0x0706050403020100);
        h.key[1] = UINT64_C(0x0f0e0d0c0b0a0908);
        for (unsigned i = 0; i < sizeof(msg); i++)
                msg[i] = (uint8_t)i;
        CHECK(vhub_hash_bytes(&h, msg, sizeof(msg)) == UINT64_C(0xa129ca6149be45e5));
        /* every length up to two blocks and more goes through the tail code */
        for (size_t len = 0; len < sizeof(msg); len++)
                CHECK(vhub_hash_bytes(&h, msg, len) != vhub_hash_bytes(&h, msg, len + 1));
}

static void test_grow_shrink(void) {
        enum { N = 20000 };
        struct item *items = calloc(N, sizeof(*items));
        struct vhub_hash h;
        size_t most;

        CHECK(items);
        CHECK(vhub_hash_init(&h) == 0);
        CHECK(find(&h, "nothing") == NULL);
        for (int i = 0; i < N; i++) {
                snprintf(items[i].name, sizeof(items[i].name), "dev%d", i);
                vhub_hash_insert(&h, &items[i].node, item_hash(&h, items[i].name));
                items[i].live = 1;
        }
        CHECK_EQ(h.n, N);
        most = h.n_buckets;
        CHECK(most >= N);                       /* grew: about a node per bucket */
        for (int i = 0; i < N; i++)
                CHECK(find(&h, items[i].name) == &items[i]);
        CHECK(find(&h, "dev20000") == NULL);
        /* remove all but every 100th, in an order unrelated to insertion */
        for (int k = 0; k < N; k++) {
                int i = (int)(((long long)k * 7919) % N);

                if (i % 100 == 0)
                        continue;
                vhub_hash_remove(&h, &items[i].node);
                items[i].live = 0;
        }
        CHECK_EQ(h.n, N / 100);
        CHECK(h.n_buckets < most / 8);          /* gave the array back */
        for (int i = 0; i < N; i++)
                CHECK(find(&h, items[i].name) == (items[i].live ? &items[i] : NULL));
        vhub_hash_done(&h);
        vhub_hash_done(&h);                     /* idempotent */
        free(items);
}

/* Same hash for every node (what an attacker who knew the key would aim
 * for): lookups still find each by its key, removal in any position. */
static void test_collisions(void) {
        struct item it[5];
        struct vhub_hash h;

        CHECK(vhub_hash_init(&h) == 0);
        for (int i = 0; i < 5; i++) {
                snprintf(it[i].name, sizeof(it[i].name), "same%d", i);
                vhub_hash_insert(&h, &it[i].node, 42);
        }
        for (int i = 0; i < 5; i++) {
                int seen = 0;

                for (struct vhub_hash_node *n = vhub_hash_first(&h, 42); n; n = vhub_hash_next(n, 42))
                        seen += vhub_hash_entry(n, struct item, node) == &it[i];
                CHECK_EQ(seen, 1);
        }
        vhub_hash_remove(&h, &it[2].node);      /* middle of the chain */
        vhub_hash_remove(&h, &it[4].node);      /* its head (inserted last) */
        vhub_hash_remove(&h, &it[0].node);      /* its tail */
        {
                int n_left = 0;

                for (struct vhub_hash_node *n = vhub_hash_first(&h, 42); n; n = vhub_hash_next(n, 42)) {
                        struct item *x = vhub_hash_entry(n, struct item, node);

                        CHECK(x == &it[1] || x == &it[3]);
                        n_left++;
                }
                CHECK_EQ(n_left, 2);
        }
        CHECK(vhub_hash_first(&h, 43) == NULL);
        vhub_hash_done(&h);
}

/* Two tables hash the same name differently (random keys). */
static void test_keys(void) {
        struct vhub_hash a, b;

        CHECK(vhub_hash_init(&a) == 0);
        CHECK(vhub_hash_init(&b) == 0);
        CHECK(a.key[0] != b.key[0] || a.key[1] != b.key[1]);
        CHECK(vhub_hash_bytes(&a, "vm0", 3) != vhub_hash_bytes(&b, "vm0", 3));
        CHECK(vhub_hash_bytes(&a, "vm0", 3) == vhub_hash_bytes(&a, "vm0", 3));
        vhub_hash_done(&a);
        vhub_hash_done(&b);
}

int main(void) {
        test_siphash_vector();
        test_grow_shrink();
        test_collisions();
        test_keys();
        printf("vhub-hash: ok\n");
        return 0;
}
