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
    return calloc(1, sizeof(struct route));
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
    if (worker + 1 >= 1u << WBITS || route_worker(r, h) >= 0)
        return false;
    _Atomic uint32_t *b = bucket_of(r, h);
    uint32_t tag = tag_of(h), v = tag << WBITS | (worker + 1);
    for (unsigned i = 0; i < BUCKET; i++) {
        uint32_t none = 0;
        if (!atomic_compare_exchange_strong(&b[i], &none, v))
            continue;
        /* Another claim of the domain made meanwhile, in a slot before
         * this one: that one stands (route_worker finds it first). */
        for (unsigned k = 0; k < i; k++) {
            uint32_t x = atomic_load(&b[k]);
            if (x != 0 && x >> WBITS == tag) {
                atomic_store(&b[i], 0);
                return false;
            }
        }
        return true;
    }
    return false; /* full */
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
