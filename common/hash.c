/*
 * hash: see hash.h.
 */
#include "common/hash.h"

#include <errno.h>
#include <stdlib.h>

uint64_t
hash_bytes(const void *p, size_t len)
{
    return hash_bytes_more(HASH_BYTES_START, p, len);
}

uint64_t
hash_bytes_more(uint64_t h, const void *p, size_t len)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < len; i++)
        h = (h ^ s[i]) * 1099511628211ULL;
    return h;
}

uint64_t
hash_str_nocase(const char *s)
{
    uint64_t h = 14695981039346656037ULL;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 'A' && c <= 'Z')
            c = (unsigned char)(c + 32);
        h = (h ^ c) * 1099511628211ULL;
    }
    return h;
}

void
hash_init(struct hash *h, hash_eq_fn *eq, size_t min_buckets)
{
    size_t m = 8;
    while (m < min_buckets)
        m *= 2;
    h->b = NULL;
    h->nb = 0;
    h->n = 0;
    h->min_nb = m;
    h->eq = eq;
}

void
hash_fini(struct hash *h)
{
    free(h->b);
    h->b = NULL;
    h->nb = h->n = 0;
}

static int
hash_resize(struct hash *h, size_t nb)
{
    struct hash_node **b = calloc(nb, sizeof(*b));
    if (b == NULL)
        return -ENOMEM;
    for (size_t i = 0; i < h->nb; i++) {
        struct hash_node *n = h->b[i];
        while (n != NULL) {
            struct hash_node *next = n->next;
            size_t k = (size_t)(n->hash & (nb - 1));
            n->next = b[k];
            b[k] = n;
            n = next;
        }
    }
    free(h->b);
    h->b = b;
    h->nb = nb;
    return 0;
}

struct hash_node *
hash_find(const struct hash *h, uint64_t hash, const void *key)
{
    if (h->nb == 0)
        return NULL;
    for (struct hash_node *n = h->b[hash & (h->nb - 1)]; n != NULL; n = n->next)
        if (n->hash == hash && h->eq(n, key))
            return n;
    return NULL;
}

int
hash_insert(struct hash *h, struct hash_node *n)
{
    if (h->nb == 0 && hash_resize(h, h->min_nb) < 0)
        return -ENOMEM;
    if (h->n >= h->nb)
        (void)hash_resize(h, h->nb * 2); /* a full table still works, slower */
    size_t k = (size_t)(n->hash & (h->nb - 1));
    n->next = h->b[k];
    h->b[k] = n;
    h->n++;
    return 0;
}

void
hash_remove(struct hash *h, struct hash_node *n)
{
    for (struct hash_node **p = &h->b[n->hash & (h->nb - 1)]; *p != NULL; p = &(*p)->next)
        if (*p == n) {
            *p = n->next;
            n->next = NULL;
            h->n--;
            return;
        }
}

struct hash_node *
hash_next(const struct hash *h, size_t *bucket, struct hash_node **cursor)
{
    struct hash_node *n = *cursor;
    while (n == NULL) {
        if (*bucket >= h->nb)
            return NULL;
        n = h->b[(*bucket)++];
    }
    *cursor = n->next;
    return n;
}

void
hash_compact(struct hash *h)
{
    if (h->nb > h->min_nb && h->n <= h->nb / 4)
        (void)hash_resize(h, h->nb / 2 > h->min_nb ? h->nb / 2 : h->min_nb);
    if (h->n == 0 && h->nb > 0 && h->nb == h->min_nb) {
        free(h->b);
        h->b = NULL;
        h->nb = 0;
    }
}
