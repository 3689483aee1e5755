/*
 * lru: one intrusive least-recently-used list for the whole tree. The
 * caller embeds a struct lru_node in its object; lru_touch() moves it to
 * the recent end (inserting it if new), lru_age() to the other end,
 * lru_oldest() gives that end, where eviction starts; lru_insert_before()
 * puts a node at a place of the caller's choosing. No allocation.
 *
 * Threading: none; one list belongs to one thread.
 */
#ifndef SLUICE_COMMON_LRU_H
#define SLUICE_COMMON_LRU_H

#include <stdbool.h>
#include <stddef.h>

struct lru_node {
    struct lru_node *prev, *next; /* borrowed; both NULL while not on a list */
    bool on;
};

struct lru {
    struct lru_node *oldest, *newest; /* borrowed */
    size_t n;
};

static inline void
lru_init(struct lru *l)
{
    l->oldest = l->newest = NULL;
    l->n = 0;
}

static inline void
lru_remove(struct lru *l, struct lru_node *x)
{
    if (!x->on)
        return;
    if (x->prev)
        x->prev->next = x->next;
    else
        l->oldest = x->next;
    if (x->next)
        x->next->prev = x->prev;
    else
        l->newest = x->prev;
    x->prev = x->next = NULL;
    x->on = false;
    l->n--;
}

/* x becomes the most recent. */
static inline void
lru_touch(struct lru *l, struct lru_node *x)
{
    if (x->on && l->newest == x)
        return;
    lru_remove(l, x);
    x->prev = l->newest;
    x->next = NULL;
    if (l->newest)
        l->newest->next = x;
    else
        l->oldest = x;
    l->newest = x;
    x->on = true;
    l->n++;
}

/* x becomes the oldest: the next to be looked at for eviction. */
static inline void
lru_age(struct lru *l, struct lru_node *x)
{
    if (x->on && l->oldest == x)
        return;
    lru_remove(l, x);
    x->prev = NULL;
    x->next = l->oldest;
    if (l->oldest)
        l->oldest->prev = x;
    else
        l->newest = x;
    l->oldest = x;
    x->on = true;
    l->n++;
}

/* x goes just before y, nearer the oldest end; y must be on l (x may
 * be on it already: it moves). */
static inline void
lru_insert_before(struct lru *l, struct lru_node *x, struct lru_node *y)
{
    if (x == y)
        return;
    lru_remove(l, x);
    x->next = y;
    x->prev = y->prev;
    if (y->prev)
        y->prev->next = x;
    else
        l->oldest = x;
    y->prev = x;
    x->on = true;
    l->n++;
}

static inline struct lru_node *
lru_oldest(const struct lru *l)
{
    return l->oldest;
}

#endif
