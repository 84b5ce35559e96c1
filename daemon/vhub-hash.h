/* SPDX-License-Identifier: MIT */
/*
 * A small hash table for finding the model's objects by name: VMs by
 * (uid, name), devices by name within their VM, uids' usage by uid.
 *
 * Intrusive: the objects embed a struct vhub_hash_node and stay the
 * caller's; the table holds only the bucket array.  The caller computes
 * each object's hash with vhub_hash_bytes() and compares the keys of the
 * candidates a lookup walks (nodes of the same hash), so the table knows
 * nothing about keys.
 *
 * Names come from clients: the hash is SipHash-2-4 keyed with random bytes
 * per table, so a client cannot pick names that all land in one chain.
 * The bucket array doubles when the table holds more nodes than buckets and
 * halves when it holds fewer than an eighth; a failed resize keeps the old
 * array (longer chains, nothing lost), so inserting never fails.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

struct vhub_hash_node {
        struct vhub_hash_node *next;
        uint64_t hash;
};

struct vhub_hash {
        struct vhub_hash_node **buckets;
        size_t n_buckets;               /* a power of two */
        size_t n;
        uint64_t key[2];
};

/* -ENOMEM. */
int vhub_hash_init(struct vhub_hash *h);
/* Free the bucket array (the nodes are the caller's).  NULL-safe, idempotent. */
void vhub_hash_done(struct vhub_hash *h);

/* The table's keyed hash of len bytes. */
uint64_t vhub_hash_bytes(const struct vhub_hash *h, const void *data, size_t len);

/* node must not be in a table; hash is the one lookups will use. */
void vhub_hash_insert(struct vhub_hash *h, struct vhub_hash_node *node, uint64_t hash);
/* node must be in h. */
void vhub_hash_remove(struct vhub_hash *h, struct vhub_hash_node *node);

/* The nodes with this hash, one after another (NULL at the end):
 *   for (n = vhub_hash_first(h, hash); n; n = vhub_hash_next(n, hash)) */
struct vhub_hash_node *vhub_hash_first(const struct vhub_hash *h, uint64_t hash);
struct vhub_hash_node *vhub_hash_next(const struct vhub_hash_node *node, uint64_t hash);

/* The object a node is embedded in. */
#define vhub_hash_entry(node, type, member) \
        ((type *)(void *)((char *)(node) - offsetof(type, member)))
