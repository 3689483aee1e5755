/*
 * hash: one intrusive chained hash table for the whole tree. The caller
 * embeds a struct hash_node in its object, computes the key's hash
 * (hash_str(), hash_bytes()) and says how keys compare; the table grows by
 * doubling when it holds more entries than buckets and shrinks when a
 * quarter full, so its memory follows the live entries. It allocates only
 * its bucket array; entries are the caller's.
 *
 * Threading: none; one table belongs to one thread.
 */
#ifndef SLUICE_COMMON_HASH_H
#define SLUICE_COMMON_HASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct hash_node {
    struct hash_node *next; /* borrowed: the next entry of the bucket */
    uint64_t hash;
};

/* Does node n hold key? */
typedef bool hash_eq_fn(const struct hash_node *n, const void *key);

struct hash {
    struct hash_node **b; /* owned: nb buckets, or NULL while empty */
    size_t nb, n;
    size_t min_nb;        /* never fewer buckets once grown */
    hash_eq_fn *eq;       /* borrowed */
};

/* FNV-1a, 64 bits; hash_str() folds ASCII case. hash_bytes_more() goes
 * on from h, the value of the octets before p (for input in pieces):
 * hash_bytes(p, n) is hash_bytes_more(HASH_BYTES_START, p, n). */
#define HASH_BYTES_START 14695981039346656037ULL
uint64_t hash_bytes(const void *p, size_t len);
uint64_t hash_bytes_more(uint64_t h, const void *p, size_t len);
uint64_t hash_str_nocase(const char *s);

void hash_init(struct hash *h, hash_eq_fn *eq, size_t min_buckets);
/* Frees the buckets; the entries are the caller's (take them out first or
 * walk with hash_next()). */
void hash_fini(struct hash *h);
struct hash_node *hash_find(const struct hash *h, uint64_t hash, const void *key);
/* n->hash must be set. Returns 0 or -ENOMEM (the entry is then not in). */
int hash_insert(struct hash *h, struct hash_node *n);
/* n must be in h. */
void hash_remove(struct hash *h, struct hash_node *n);
/* Iteration: *pos starts at 0; returns NULL at the end. Removing the
 * returned entry during a walk is allowed (the walk may then skip
 * nothing: removal never shrinks the table during a walk; call
 * hash_compact() after). */
struct hash_node *hash_next(const struct hash *h, size_t *bucket, struct hash_node **cursor);
/* Shrink when a quarter full or less. */
void hash_compact(struct hash *h);
static inline size_t
hash_count(const struct hash *h)
{
    return h->n;
}

#endif
