/*
 * bench_timer: the worker's timer heap (engine/timer.h) under the load of
 * a relay to many domains (not a test: prints figures, never fails on a
 * number).
 *
 * A heap holds N background timers (destinations' sweeps and holds,
 * spread over the next second) and 100 connections' timeouts; each
 * simulated message re-arms a connection's timeout six times, 300 s on
 * (what a transaction's steps do), while the clock moves 10 us a message
 * and the due background timers fire and re-arm a second on. Two ways
 * side by side, on the same heap and sequence of re-arms:
 *
 *   in place: timer_arm() as the engine calls it (a re-arm for later
 *             keeps the timer's place; the run moves it when its old
 *             key comes due);
 *   move:     timer_cancel() then timer_arm(), a removal and an
 *             insertion each time (what every re-arm cost before).
 *
 * Each line: ns per re-arm (the whole loop, firing included, divided by
 * the re-arms), for N = 0, 1,000, 10,000 and 100,000; the best of five
 * runs of each. Each background timer sits in an owner of OWNER_SIZE
 * octets (a struct dest's size), one after another, as a destination's
 * sweep does: a heap that reads its timers to compare them pays a cache
 * miss where the owners do not fit in the cache.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/clock.h"
#include "engine/timer.h"

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

#define CONNS    100
#define REARMS   6 /* per message */
#define MESSAGES 200000
#define STEP_NS  10000ULL /* the clock's move per message */
#define SEC_NS   1000000000ULL
#define OWNER_SIZE 1192 /* a background timer's owner, as a struct dest */

struct bg {
    struct timer t;
    uint64_t *now;
    struct timer_heap *h;
    char rest[OWNER_SIZE - sizeof(struct timer) - 2 * sizeof(void *)];
};

/* A background timer fires: a second on, as a sweep re-arms itself. */
static void
bg_fire(struct timer *t, void *ctx)
{
    struct bg *b = (struct bg *)t;
    (void)ctx;
    timer_arm(b->h, &b->t, *b->now + SEC_NS);
}

static void
conn_fire(struct timer *t, void *ctx)
{
    (void)t, (void)ctx; /* 300 s on: never within the run */
}

/* ns per re-arm of one run with n background timers. */
static double
run(size_t n, bool in_place)
{
    struct timer_heap h;
    if (timer_heap_init(&h, 1024) != 0) {
        fprintf(stderr, "bench_timer: out of memory\n");
        exit(1);
    }
    uint64_t now = SEC_NS;
    struct bg *bgs = calloc(n ? n : 1, sizeof(*bgs));
    struct timer conns[CONNS];
    if (bgs == NULL) {
        fprintf(stderr, "bench_timer: out of memory\n");
        exit(1);
    }
    unsigned seed = 7;
    for (size_t i = 0; i < n; i++) {
        timer_init(&bgs[i].t, bg_fire);
        bgs[i].now = &now;
        bgs[i].h = &h;
        timer_arm(&h, &bgs[i].t, now + (uint64_t)rand_r(&seed) % SEC_NS);
    }
    for (unsigned c = 0; c < CONNS; c++) {
        timer_init(&conns[c], conn_fire);
        timer_arm(&h, &conns[c], now + 300 * SEC_NS);
    }
    uint64_t t0 = clock_mono_ns();
    for (unsigned m = 0; m < MESSAGES; m++) {
        struct timer *c = &conns[m % CONNS];
        for (unsigned k = 0; k < REARMS; k++) {
            if (!in_place)
                timer_cancel(&h, c);
            timer_arm(&h, c, now + 300 * SEC_NS + k);
        }
        now += STEP_NS;
        timer_run_until(&h, now, NULL, NULL, UINT64_MAX);
    }
    uint64_t ns = clock_mono_ns() - t0;
    timer_heap_fini(&h);
    free(bgs);
    return (double)ns / ((double)MESSAGES * REARMS);
}

int
main(void)
{
    printf("bench_timer: %d connections, %d re-arms a message, %d messages; build: %s\n", CONNS,
           REARMS, MESSAGES, BENCH_BUILD);
    printf("%10s %14s %14s %8s\n", "background", "in place ns", "move ns", "ratio");
    static const size_t ns[] = {0, 1000, 10000, 100000};
    for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++) {
        double a = 0, b = 0;
        for (int r = 0; r < 5; r++) {
            double x = run(ns[i], true), y = run(ns[i], false);
            a = r == 0 || x < a ? x : a;
            b = r == 0 || y < b ? y : b;
        }
        printf("%10zu %14.1f %14.1f %7.2fx\n", ns[i], a, b, b / a);
    }
    return 0;
}
