/*
 * timer: the heap of timer.h. Index arithmetic is 0-based; t->slot is the
 * index plus one so that a zeroed timer reads as disarmed.
 */
#include "engine/timer.h"

#include <errno.h>
#include <stdlib.h>

static inline bool
before(const struct timer *a, const struct timer *b)
{
    return a->key < b->key || (a->key == b->key && a->key_seq < b->key_seq);
}

static inline void
place(struct timer_heap *h, uint32_t i, struct timer *t)
{
    h->v[i] = t;
    t->slot = i + 1;
}

static void
sift_up(struct timer_heap *h, uint32_t i)
{
    struct timer *t = h->v[i];
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (!before(t, h->v[parent]))
            break;
        place(h, i, h->v[parent]);
        i = parent;
    }
    place(h, i, t);
}

static void
sift_down(struct timer_heap *h, uint32_t i)
{
    struct timer *t = h->v[i];
    for (;;) {
        uint32_t child = 2 * i + 1;
        if (child >= h->n)
            break;
        if (child + 1 < h->n && before(h->v[child + 1], h->v[child]))
            child++;
        if (!before(h->v[child], t))
            break;
        place(h, i, h->v[child]);
        i = child;
    }
    place(h, i, t);
}

int
timer_heap_init(struct timer_heap *h, uint32_t cap)
{
    h->n = 0;
    h->seq = 0;
    h->cap = cap ? cap : 64;
    h->v = malloc(sizeof(*h->v) * h->cap);
    return h->v ? 0 : -ENOMEM;
}

void
timer_heap_fini(struct timer_heap *h)
{
    for (uint32_t i = 0; i < h->n; i++)
        h->v[i]->slot = 0;
    free(h->v);
    h->v = NULL;
    h->n = h->cap = 0;
}

static void
remove_at(struct timer_heap *h, uint32_t i)
{
    struct timer *t = h->v[i];
    t->slot = 0;
    h->n--;
    if (i == h->n)
        return;
    h->v[i] = h->v[h->n];
    h->v[i]->slot = i + 1;
    if (i > 0 && before(h->v[i], h->v[(i - 1) / 2]))
        sift_up(h, i);
    else
        sift_down(h, i);
}

int
timer_arm(struct timer_heap *h, struct timer *t, uint64_t deadline)
{
    if (t->slot != 0 && deadline >= t->key) {
        /* in place: its key comes due first, and the run moves it */
        t->deadline = deadline;
        t->seq = h->seq++;
        return 0;
    }
    if (t->slot != 0)
        remove_at(h, t->slot - 1);
    if (h->n == h->cap) {
        uint32_t cap = h->cap * 2;
        struct timer **v = realloc(h->v, sizeof(*v) * cap);
        if (v == NULL)
            return -ENOMEM;
        h->v = v;
        h->cap = cap;
    }
    t->deadline = t->key = deadline;
    t->seq = t->key_seq = h->seq++;
    h->v[h->n] = t;
    h->n++;
    sift_up(h, h->n - 1);
    return 0;
}

void
timer_cancel(struct timer_heap *h, struct timer *t)
{
    if (t->slot != 0)
        remove_at(h, t->slot - 1);
}

uint64_t
timer_next(const struct timer_heap *h)
{
    return h->n ? h->v[0]->key : UINT64_MAX;
}

unsigned
timer_run_until(struct timer_heap *h, uint64_t now, void *ctx, uint64_t (*clock)(void),
                uint64_t stop)
{
    /* A callback that re-arms for a deadline already past waits for the
     * next turn, so that one run always ends. */
    uint64_t seq_end = h->seq;
    unsigned fired = 0;
    while (h->n != 0 && h->v[0]->key <= now && h->v[0]->key_seq < seq_end) {
        struct timer *t = h->v[0];
        if (t->key != t->deadline || t->key_seq != t->seq) {
            /* re-armed in place: to its deadline (later; at most once a
             * re-arm, so the run ends) */
            t->key = t->deadline;
            t->key_seq = t->seq;
            sift_down(h, 0);
            continue;
        }
        remove_at(h, 0);
        fired++;
        t->fire(t, ctx);
        if (clock != NULL && clock() >= stop)
            break;
    }
    return fired;
}

unsigned
timer_run(struct timer_heap *h, uint64_t now, void *ctx)
{
    return timer_run_until(h, now, ctx, NULL, 0);
}
