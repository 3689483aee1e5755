/*
 * fairq: see fairq.h. Per-tenant sub-queues in a ring, each a list per
 * priority with a bit mask of the non-empty ones; deficit round-robin
 * over the ring.
 *
 * Threading: none.
 */
#include "engine/outbound/fairq.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct fairq_tenant {
    struct hash_node node;              /* on q->tenants: first */
    uint32_t id;
    unsigned deficit;                   /* jobs left in its turn; 0: its next turn refills */
    unsigned n;                         /* jobs waiting */
    unsigned mask;                      /* bit p: head[p] is not empty */
    bool hashed;                        /* on q->tenants */
    struct fairq_tenant *prev, *next;   /* the ring */
    struct fairq_node *head[FAIRQ_PRIORITIES];
    struct fairq_node **tail[FAIRQ_PRIORITIES];
};

static bool
tenant_eq(const struct hash_node *n, const void *key)
{
    return ((const struct fairq_tenant *)n)->id == *(const uint32_t *)key;
}

static uint64_t
tenant_hash(uint32_t id)
{
    return hash_bytes(&id, sizeof(id));
}

void
fairq_init(struct fairq *q, fairq_weight_fn *weight, void *ctx)
{
    hash_init(&q->tenants, tenant_eq, 0);
    q->cur = NULL;
    q->spare = NULL;
    q->ntenants = 0;
    q->n = 0;
    q->weight = weight;
    q->ctx = ctx;
}

static struct fairq_tenant *
tenant_find(const struct fairq *q, uint32_t id)
{
    /* One tenant is the common case: no hashing for it. Alone in the
     * ring, it is q->cur, hashed or not; with others, all are hashed. */
    if (q->cur != NULL && q->cur->id == id)
        return q->cur;
    if (q->tenants.n == 0)
        return NULL;
    return (struct fairq_tenant *)hash_find(&q->tenants, tenant_hash(id), &id);
}

/* t is empty: out of the ring and freed. */
static void
tenant_drop(struct fairq *q, struct fairq_tenant *t)
{
    if (t->next == t) {
        q->cur = NULL;
    } else {
        t->prev->next = t->next;
        t->next->prev = t->prev;
        if (q->cur == t)
            q->cur = t->next;
    }
    q->ntenants--;
    if (t->hashed) {
        hash_remove(&q->tenants, &t->node);
        hash_compact(&q->tenants); /* its buckets follow the tenants waiting */
    }
    if (q->spare == NULL)
        q->spare = t; /* for the next tenant to wait here */
    else
        free(t);
}

/* t in the hash (once a second tenant waits beside it). */
static int
tenant_hash_in(struct fairq *q, struct fairq_tenant *t)
{
    if (t->hashed)
        return 0;
    if (hash_insert(&q->tenants, &t->node) < 0)
        return -ENOMEM;
    t->hashed = true;
    return 0;
}

void
fairq_fini(struct fairq *q)
{
    while (q->cur != NULL)
        tenant_drop(q, q->cur);
    free(q->spare);
    q->spare = NULL;
    q->n = 0;
    hash_fini(&q->tenants);
}

int
fairq_push(struct fairq *q, struct fairq_node *x, uint32_t tenant, unsigned priority, bool front)
{
    unsigned p = priority < FAIRQ_PRIORITIES ? priority : FAIRQ_PRIORITIES - 1;
    struct fairq_tenant *t = tenant_find(q, tenant);
    if (t == NULL) {
        /* One emptied here, if kept: a destination whose queue
         * empties between its mails (many domains, a few mails each)
         * allocates nothing per mail. */
        t = q->spare;
        if (t != NULL)
            q->spare = NULL;
        else if ((t = malloc(sizeof(*t))) == NULL)
            return -ENOMEM;
        memset(t, 0, sizeof(*t));
        t->id = tenant;
        for (unsigned i = 0; i < FAIRQ_PRIORITIES; i++)
            t->tail[i] = &t->head[i];
        t->node.hash = tenant_hash(tenant);
        /* A second tenant: from now on both are looked up by hash. */
        if (q->cur != NULL &&
            (tenant_hash_in(q, q->cur) < 0 || tenant_hash_in(q, t) < 0)) {
            if (q->spare == NULL)
                q->spare = t;
            else
                free(t);
            return -ENOMEM;
        }
        /* At the end of the round: just before the one whose turn it is. */
        if (q->cur == NULL) {
            t->prev = t->next = t;
            q->cur = t;
        } else {
            t->next = q->cur;
            t->prev = q->cur->prev;
            t->prev->next = t;
            q->cur->prev = t;
        }
        q->ntenants++;
    }
    if (front) {
        x->next = t->head[p];
        if (x->next == NULL)
            t->tail[p] = &x->next;
        t->head[p] = x;
    } else {
        x->next = NULL;
        *t->tail[p] = x;
        t->tail[p] = &x->next;
    }
    t->mask |= 1u << p;
    t->n++;
    q->n++;
    return 0;
}

static unsigned
highest(unsigned mask)
{
    return 31u - (unsigned)__builtin_clz(mask);
}

/* Take the first node of t's priority p (not empty). */
static struct fairq_node *
tenant_take(struct fairq *q, struct fairq_tenant *t, unsigned p)
{
    struct fairq_node *x = t->head[p];
    t->head[p] = x->next;
    if (t->head[p] == NULL) {
        t->tail[p] = &t->head[p];
        t->mask &= ~(1u << p);
    }
    x->next = NULL;
    t->n--;
    q->n--;
    return x;
}

struct fairq_node *
fairq_pop(struct fairq *q, uint32_t *tenant)
{
    struct fairq_tenant *t = q->cur;
    if (t == NULL)
        return NULL;
    if (t->deficit == 0) { /* its turn starts */
        unsigned w = q->weight != NULL ? q->weight(q->ctx, t->id) : 1;
        t->deficit = w > 0 ? w : 1;
    }
    struct fairq_node *x = tenant_take(q, t, highest(t->mask));
    if (tenant != NULL)
        *tenant = t->id;
    t->deficit--;
    if (t->n == 0)
        tenant_drop(q, t);
    else if (t->deficit == 0)
        q->cur = t->next; /* its turn is over */
    return x;
}

struct fairq_node *
fairq_peek(const struct fairq *q)
{
    /* pop takes from cur's highest priority: a turn that ends moves cur
     * after its last job, never before the next */
    const struct fairq_tenant *t = q->cur;
    return t != NULL ? t->head[highest(t->mask)] : NULL;
}

unsigned
fairq_tenant_count(const struct fairq *q, uint32_t tenant)
{
    const struct fairq_tenant *t = tenant_find(q, tenant);
    return t != NULL ? t->n : 0;
}

unsigned
fairq_tenants(const struct fairq *q, uint32_t *ids, unsigned *counts, unsigned cap)
{
    const struct fairq_tenant *t = q->cur;
    for (unsigned i = 0; i < q->ntenants && i < cap; i++, t = t->next) {
        ids[i] = t->id;
        counts[i] = t->n;
    }
    return q->ntenants;
}

void
fairq_tenants_each(const struct fairq *q, void (*fn)(void *arg, uint32_t tenant, unsigned n),
                   void *arg)
{
    const struct fairq_tenant *t = q->cur;
    for (unsigned i = 0; i < q->ntenants; i++, t = t->next)
        fn(arg, t->id, t->n);
}

/* ---- walks ---- */

/* The iterator is at sub-queue t (NULL: the end), from its highest priority. */
static void
iter_at(struct fairq_iter *it, struct fairq_tenant *t)
{
    it->t = t;
    it->prio = FAIRQ_PRIORITIES - 1;
    it->pp = t != NULL ? &t->head[it->prio] : NULL;
    it->tenant = t != NULL ? t->id : 0;
}

void
fairq_iter_init(struct fairq *q, struct fairq_iter *it)
{
    it->q = q;
    it->cur = NULL;
    it->left = q->ntenants > 0 ? q->ntenants - 1 : 0;
    iter_at(it, q->cur);
}

struct fairq_node *
fairq_iter_next(struct fairq_iter *it)
{
    if (it->cur != NULL)
        it->pp = &it->cur->next; /* past it (a removal left pp at its successor) */
    it->cur = NULL;
    while (it->t != NULL) {
        if (*it->pp != NULL) {
            it->cur = *it->pp;
            return it->cur;
        }
        if (it->prio > 0) {
            it->prio--;
            it->pp = &it->t->head[it->prio];
        } else if (it->left > 0) {
            it->left--;
            iter_at(it, it->t->next);
        } else {
            iter_at(it, NULL);
        }
    }
    return NULL;
}

void
fairq_iter_next_tenant(struct fairq_iter *it)
{
    it->cur = NULL;
    if (it->t == NULL)
        return;
    if (it->left > 0) {
        it->left--;
        iter_at(it, it->t->next);
    } else {
        iter_at(it, NULL);
    }
}

void
fairq_iter_remove(struct fairq_iter *it)
{
    struct fairq_node *x = it->cur;
    struct fairq_tenant *t = it->t;
    if (x == NULL || t == NULL)
        return;
    unsigned p = (unsigned)it->prio;
    *it->pp = x->next;
    if (t->tail[p] == &x->next)
        t->tail[p] = it->pp;
    if (t->head[p] == NULL)
        t->mask &= ~(1u << p);
    x->next = NULL;
    it->cur = NULL;
    t->n--;
    it->q->n--;
    if (t->n == 0) {
        struct fairq_tenant *next = it->left > 0 ? t->next : NULL;
        if (it->left > 0)
            it->left--;
        tenant_drop(it->q, t);
        iter_at(it, next);
    }
}
