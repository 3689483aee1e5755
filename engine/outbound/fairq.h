/*
 * fairq: one destination's queue of waiting jobs, shared between tenants
 * by weight and, within a tenant, ordered by priority.
 *
 * Each tenant with something waiting has its own sub-queue; the
 * sub-queues take turns (deficit round-robin, one job costs one): on its
 * turn a tenant of weight W hands out up to W jobs, then the next tenant's
 * turn comes. A tenant that starts waiting joins at the end of the current
 * round, so its first job goes out after at most one round (the sum of
 * the weights of the others, plus what is left of the current turn),
 * whatever their backlog. Within a tenant the highest priority (0..9)
 * goes first, first in first out within one priority. Untenanted mail
 * (tenant 0) is one more tenant. Push, pop and a tenant's look-up are
 * O(1); a sub-queue is freed as soon as it is empty, but one (emptied
 * while no other was kept) is kept for the next tenant, so memory
 * follows the tenants that wait (and that one), not those that ever
 * sent, and a queue that empties between its jobs allocates nothing per
 * job. One tenant alone is found without the hash (which holds the
 * tenants once two have waited at once).
 *
 * A tenant's weight is asked of the caller (weight_fn) at the start of
 * each of its turns, so a reload's new weights act from the next turn.
 *
 * The nodes are the caller's (intrusive: struct fairq_node in its job);
 * fairq never allocates or frees them.
 *
 * Threading: none; one queue belongs to one thread.
 */
#ifndef SLUICE_ENGINE_OUTBOUND_FAIRQ_H
#define SLUICE_ENGINE_OUTBOUND_FAIRQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/hash.h"

#define FAIRQ_PRIORITIES 10 /* 0..9, higher goes first */

struct fairq_node {
    struct fairq_node *next; /* borrowed: the next of its sub-queue */
};

/* The weight of tenant (1..; 0 is taken for 1). */
typedef unsigned fairq_weight_fn(void *ctx, uint32_t tenant);

struct fairq_tenant;

struct fairq {
    struct hash tenants;       /* struct fairq_tenant by id: those with jobs, when two or
                                  more are (one alone may be out of it) */
    struct fairq_tenant *cur;  /* owned ring of those tenants: whose turn it is; NULL: empty */
    struct fairq_tenant *spare; /* owned: an emptied one kept for the next; or NULL */
    unsigned ntenants;
    size_t n;                  /* jobs waiting */
    fairq_weight_fn *weight;   /* borrowed; NULL: every tenant weighs 1 */
    void *ctx;                 /* borrowed: weight's */
};

void fairq_init(struct fairq *q, fairq_weight_fn *weight, void *ctx);
/* Frees the sub-queues; the nodes still in are the caller's (pop them
 * first to free them). */
void fairq_fini(struct fairq *q);

/* Queue x for tenant at priority (above 9 counts as 9): at the end of
 * its priority, or first of it with front (a job put back after a
 * failure). Returns 0, or -ENOMEM (a new tenant's sub-queue; x is not
 * queued). */
int fairq_push(struct fairq *q, struct fairq_node *x, uint32_t tenant, unsigned priority,
               bool front);
/* The next job by the turns, or NULL when empty; *tenant (when not NULL)
 * says whose. */
struct fairq_node *fairq_pop(struct fairq *q, uint32_t *tenant);
/* The job fairq_pop() would return now, left in; NULL when empty. */
struct fairq_node *fairq_peek(const struct fairq *q);
static inline size_t
fairq_count(const struct fairq *q)
{
    return q->n;
}
static inline bool
fairq_empty(const struct fairq *q)
{
    return q->n == 0;
}

/* Jobs of tenant waiting. */
unsigned fairq_tenant_count(const struct fairq *q, uint32_t tenant);
/* The tenants waiting, from the one whose turn it is: up to cap ids and
 * their counts; returns how many tenants wait (may exceed cap). */
unsigned fairq_tenants(const struct fairq *q, uint32_t *ids, unsigned *counts, unsigned cap);

/* fn(arg, tenant, jobs waiting) for every tenant waiting, from the one
 * whose turn it is; fn must not change q. */
void fairq_tenants_each(const struct fairq *q, void (*fn)(void *arg, uint32_t tenant, unsigned n),
                        void *arg);

/* A walk over every waiting job (tenants from the one whose turn it is,
 * each in its serving order), which may take the job it is at out:
 *     struct fairq_iter it;
 *     fairq_iter_init(q, &it);
 *     for (struct fairq_node *x; (x = fairq_iter_next(&it)) != NULL;)
 *         if (...) fairq_iter_remove(&it);
 * Nothing else may change q during the walk. */
struct fairq_iter {
    struct fairq *q;           /* borrowed */
    struct fairq_tenant *t;    /* borrowed: the sub-queue walked, NULL at the end */
    unsigned left;             /* tenants after t still to walk */
    int prio;
    struct fairq_node **pp;    /* the link to the current node (or the next one) */
    struct fairq_node *cur;    /* returned last; NULL once removed */
    uint32_t tenant;           /* whose cur is */
};
void fairq_iter_init(struct fairq *q, struct fairq_iter *it);
struct fairq_node *fairq_iter_next(struct fairq_iter *it);
/* The walk goes on at the next tenant's sub-queue (its next call returns
 * that tenant's first job): what is left of this one is not walked. */
void fairq_iter_next_tenant(struct fairq_iter *it);
/* Take out the node fairq_iter_next() returned last (the caller owns it
 * again). */
void fairq_iter_remove(struct fairq_iter *it);

#endif
