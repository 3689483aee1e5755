/*
 * route: see route.h.
 */
#include "engine/route.h"

#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>

#define BUCKET_BITS 14
#define BUCKET      16
#define WBITS       9
#define SLOTS       ((size_t)BUCKET << BUCKET_BITS)
#define BUSY        1024

struct route {
    _Atomic uint32_t w[SLOTS + BUSY];
    atomic_flag lock[(size_t)1 << BUCKET_BITS]; /* held by a claim of the bucket */
};

static uint32_t
tag_of(uint32_t h)
{
    return (h * 2654435761u) >> WBITS; /* 23 bits, all of h mixed in */
}

static _Atomic uint32_t *
bucket_of(struct route *r, uint32_t h)
{
    return &r->w[(size_t)(h & ((1u << BUCKET_BITS) - 1)) * BUCKET];
}

struct route *
route_new(void)
{
    struct route *r = calloc(1, sizeof(struct route));
    for (size_t i = 0; r != NULL && i < (size_t)1 << BUCKET_BITS; i++)
        atomic_flag_clear(&r->lock[i]);
    return r;
}

void
route_free(struct route *r)
{
    free(r);
}

int
route_worker(const struct route *r, uint32_t h)
{
    const _Atomic uint32_t *b = bucket_of((struct route *)r, h);
    uint32_t tag = tag_of(h);
    for (unsigned i = 0; i < BUCKET; i++) {
        uint32_t v = atomic_load_explicit(&b[i], memory_order_relaxed);
        if (v != 0 && v >> WBITS == tag)
            return (int)(v & ((1u << WBITS) - 1)) - 1;
    }
    return -1;
}

bool
route_claim(struct route *r, uint32_t h, unsigned worker)
{
    if (worker + 1 >= 1u << WBITS)
        return false;
    size_t bi = h & ((1u << BUCKET_BITS) - 1);
    _Atomic uint32_t *b = bucket_of(r, h);
    uint32_t tag = tag_of(h), v = tag << WBITS | (worker + 1);
    /* Claims of a bucket one at a time: a claim that checked for its tag
     * and then took a slot could otherwise stand beside another one made
     * meanwhile in a slot it had passed (freed by an unclaim in between).
     * Claims are rare (a domain's move), the wait a few loads. */
    while (atomic_flag_test_and_set_explicit(&r->lock[bi], memory_order_acquire))
        ;
    bool claimed = false;
    if (route_worker(r, h) < 0) {
        for (unsigned i = 0; i < BUCKET && !claimed; i++) {
            uint32_t none = 0;
            claimed = atomic_compare_exchange_strong(&b[i], &none, v);
        }
    }
    atomic_flag_clear_explicit(&r->lock[bi], memory_order_release);
    return claimed; /* false: claimed already, or the bucket is full */
}

void
route_unclaim(struct route *r, uint32_t h, unsigned worker)
{
    _Atomic uint32_t *b = bucket_of(r, h);
    for (unsigned i = 0; i < BUCKET; i++) {
        uint32_t mine = tag_of(h) << WBITS | (worker + 1);
        if (atomic_compare_exchange_strong(&b[i], &mine, 0))
            return;
    }
}

bool
route_busy_mark(struct route *r, uint32_t hh, uint32_t now_s, uint32_t until_s)
{
    _Atomic uint32_t *b = &r->w[SLOTS + hh % BUSY];
    uint32_t was = atomic_load_explicit(b, memory_order_relaxed);
    if (was != until_s)
        atomic_store_explicit(b, until_s, memory_order_relaxed);
    return was <= now_s;
}

bool
route_busy(const struct route *r, uint32_t hh, uint32_t now_s)
{
    return atomic_load_explicit(&r->w[SLOTS + hh % BUSY], memory_order_relaxed) > now_s;
}
