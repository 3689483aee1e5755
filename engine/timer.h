/*
 * timer: a binary min-heap of deadlines (each key kept in the heap's
 * array beside its timer), one per worker. Thousands of
 * per-connection deadlines are re-armed on every read, so arm and cancel
 * are O(log n) with the heap slot kept in the timer itself; the loop asks
 * timer_next() for how long it may sleep and timer_run() fires what is due.
 *
 * A re-arm of an armed timer for a later deadline (a connection's
 * timeout pushed on at each step of a transaction: several a message)
 * leaves the heap as it is: the timer keeps its place under the earlier
 * key, and when that key comes due the run moves it to its deadline
 * instead of firing it (one sift from the top, once per such key). With
 * thousands of destinations' timers in the heap, each such re-arm took a
 * removal and an insertion through it (the sites grid's 10,000-domain
 * lines).
 *
 * Ties fire in arming order (a sequence number), so equal deadlines are
 * deterministic. A timer is embedded in its owner; the heap only borrows it.
 *
 * Threading: a heap belongs to one thread (its worker).
 */
#ifndef SLUICE_ENGINE_TIMER_H
#define SLUICE_ENGINE_TIMER_H

#include <stdbool.h>
#include <stdint.h>

struct timer;
typedef void timer_fn(struct timer *t, void *ctx);

struct timer {
    uint64_t deadline; /* CLOCK_MONOTONIC nanoseconds: when it fires */
    uint64_t seq;      /* arming order, breaks ties */
    uint64_t key;      /* the heap's: the deadline, or an earlier one (a re-arm
                        * for later left it in place) */
    uint64_t key_seq;  /* the heap's tie-break for key */
    uint32_t slot;     /* heap index + 1; 0 when not armed */
    timer_fn *fire;    /* called once when due, after the timer was disarmed */
};

/* A place in the heap: its timer's key and tie-break kept beside it, so
 * that the heap's comparisons read the array alone. */
struct timer_slot {
    uint64_t key, key_seq;
    struct timer *t; /* borrowed */
};

struct timer_heap {
    struct timer_slot *v; /* owned array of borrowed timers */
    uint32_t n, cap;
    uint64_t seq;
};

static inline void
timer_init(struct timer *t, timer_fn *fire)
{
    t->deadline = t->key = 0;
    t->seq = t->key_seq = 0;
    t->slot = 0;
    t->fire = fire;
}

static inline bool
timer_armed(const struct timer *t)
{
    return t->slot != 0;
}

int timer_heap_init(struct timer_heap *h, uint32_t cap);
void timer_heap_fini(struct timer_heap *h);
/* Arm or re-arm t for deadline. Returns 0 or -ENOMEM (heap growth). */
int timer_arm(struct timer_heap *h, struct timer *t, uint64_t deadline);
/* Disarm t if armed; a cancelled timer never fires. */
void timer_cancel(struct timer_heap *h, struct timer *t);
/* The earliest key (a deadline, or earlier: a run then moves the timers
 * re-armed for later), or UINT64_MAX when none is armed. */
uint64_t timer_next(const struct timer_heap *h);
/* Fire every timer whose deadline <= now, earliest first; a fire callback
 * may arm or cancel any timer (including itself); a timer armed during
 * the run fires on the next run at the earliest. Returns how many fired. */
unsigned timer_run(struct timer_heap *h, uint64_t now, void *ctx);
/* As timer_run, but returns once clock() (the caller's, in the deadlines'
 * unit) reached stop after a timer fired; what is left stays due, for the
 * next run (clock NULL: never). The
 * loop's, so that thousands of timers due together (the holds of a
 * site's domains, ending with its rest) take several short turns with
 * the completions that came meanwhile served between them, not one long
 * turn (10,000 held destinations deferring 200,000 recipients: 2.4 s). */
unsigned timer_run_until(struct timer_heap *h, uint64_t now, void *ctx, uint64_t (*clock)(void),
                         uint64_t stop);

#endif
