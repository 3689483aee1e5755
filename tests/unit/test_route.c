/*
 * The route table of site affinity (engine/route.h): claims by hash, one
 * per domain, emptied by the worker they name only; a full bucket refuses;
 * a domain of another tag in the same bucket has no route; busy marks
 * last until their time; two threads claiming the same slots at once end
 * with one claim each, none lost; two claims of one domain never stand
 * at once, even while slots of their bucket are freed and taken.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "engine/route.h"

#define NBUCKETS (1u << 14) /* route.c's BUCKET_BITS */

static void
claim_route_unclaim(void **state)
{
    (void)state;
    struct route *r = route_new();
    assert_non_null(r);
    assert_int_equal(route_worker(r, 12345), -1);
    assert_true(route_claim(r, 12345, 3));
    assert_int_equal(route_worker(r, 12345), 3);
    assert_false(route_claim(r, 12345, 1)); /* one claim per domain */
    assert_int_equal(route_worker(r, 12345), 3);
    route_unclaim(r, 12345, 1); /* not worker 1's */
    assert_int_equal(route_worker(r, 12345), 3);
    route_unclaim(r, 12345, 3);
    assert_int_equal(route_worker(r, 12345), -1);
    assert_true(route_claim(r, 12345, 1));
    assert_int_equal(route_worker(r, 12345), 1);
    assert_false(route_claim(r, 999, 511)); /* a worker the slot cannot hold */
    route_free(r);
}

/* Hashes of one bucket: the same low bits, other high ones. */
static void
bucket_full_and_other_tags(void **state)
{
    (void)state;
    struct route *r = route_new();
    assert_non_null(r);
    uint32_t base = 77;
    for (uint32_t i = 0; i < 16; i++)
        assert_true(route_claim(r, base + (i + 1) * NBUCKETS, i % 2));
    for (uint32_t i = 0; i < 16; i++)
        assert_int_equal(route_worker(r, base + (i + 1) * NBUCKETS), (int)(i % 2));
    /* a 17th domain of the bucket: refused, and no route */
    assert_false(route_claim(r, base + 17 * NBUCKETS, 0));
    assert_int_equal(route_worker(r, base + 17 * NBUCKETS), -1);
    /* a slot freed is taken again */
    route_unclaim(r, base + 5 * NBUCKETS, 0);
    assert_true(route_claim(r, base + 17 * NBUCKETS, 1));
    assert_int_equal(route_worker(r, base + 17 * NBUCKETS), 1);
    assert_int_equal(route_worker(r, base + 5 * NBUCKETS), -1);
    route_free(r);
}

static void
busy_marks_expire(void **state)
{
    (void)state;
    struct route *r = route_new();
    assert_non_null(r);
    assert_false(route_busy(r, 42, 100));
    assert_true(route_busy_mark(r, 42, 100, 700)); /* new */
    assert_true(route_busy(r, 42, 100));
    assert_true(route_busy(r, 42, 699));
    assert_false(route_busy(r, 42, 700));
    assert_false(route_busy_mark(r, 42, 200, 800)); /* extended, not new */
    assert_true(route_busy(r, 42, 799));
    assert_true(route_busy_mark(r, 42, 900, 1500)); /* over, then new again */
    assert_false(route_busy(r, 43, 900));
    route_free(r);
}

struct racer {
    struct route *r;
    unsigned worker;
    unsigned won;
};

static void *
race(void *arg)
{
    struct racer *x = arg;
    for (uint32_t i = 0; i < 20000; i++)
        x->won += route_claim(x->r, i * 2654435761u, x->worker);
    return NULL;
}

/* Two workers claim the same 20,000 domains at once: each domain ends
 * with exactly one claim, the winner's. */
static void
concurrent_claims_one_each(void **state)
{
    (void)state;
    struct route *r = route_new();
    assert_non_null(r);
    struct racer a = {r, 0, 0}, b = {r, 1, 0};
    pthread_t ta, tb;
    assert_int_equal(pthread_create(&ta, NULL, race, &a), 0);
    assert_int_equal(pthread_create(&tb, NULL, race, &b), 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    unsigned routed = 0;
    for (uint32_t i = 0; i < 20000; i++) {
        int w = route_worker(r, i * 2654435761u);
        routed += w == 0 || w == 1;
    }
    assert_int_equal(routed, 20000);
    /* a domain claimed twice would show here: more wins than domains */
    assert_int_equal(a.won + b.won, 20000);
    route_free(r);
}

#define SPINS 2000000

struct spinner {
    struct route *r;
    unsigned worker;          /* 0, 1: claim the domain; 2: another domain of its bucket */
    _Atomic unsigned *owners; /* workers holding the domain's claim now */
    unsigned twice;           /* times this one found the other holding it too */
};

static void *
spin(void *arg)
{
    struct spinner *x = arg;
    const uint32_t dom = 5, blocker = 5 + NBUCKETS; /* one bucket */
    for (unsigned i = 0; i < SPINS; i++) {
        if (x->worker == 2) {
            if (route_claim(x->r, blocker, 2))
                route_unclaim(x->r, blocker, 2);
            continue;
        }
        if (!route_claim(x->r, dom, x->worker))
            continue;
        if (atomic_fetch_add(x->owners, 1) != 0)
            x->twice++;
        atomic_fetch_sub(x->owners, 1);
        route_unclaim(x->r, dom, x->worker);
    }
    return NULL;
}

/* Two workers claim and give up one domain over and over while a third
 * takes and frees the slot before theirs (another domain of the bucket):
 * a claim checked for its tag, then took a slot; another claim made
 * meanwhile in a slot freed before it stood beside it. Never two owners. */
static void
claims_with_slots_freed_meanwhile(void **state)
{
    (void)state;
    struct route *r = route_new();
    assert_non_null(r);
    _Atomic unsigned owners = 0;
    struct spinner x[3];
    pthread_t t[3];
    for (unsigned k = 0; k < 3; k++) {
        x[k] = (struct spinner){.r = r, .worker = k, .owners = &owners};
        assert_int_equal(pthread_create(&t[k], NULL, spin, &x[k]), 0);
    }
    for (unsigned k = 0; k < 3; k++)
        pthread_join(t[k], NULL);
    assert_int_equal(x[0].twice + x[1].twice, 0);
    assert_int_equal(route_worker(r, 5), -1);
    route_free(r);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(claim_route_unclaim),
        cmocka_unit_test(bucket_full_and_other_tags),
        cmocka_unit_test(busy_marks_expire),
        cmocka_unit_test(concurrent_claims_one_each),
        cmocka_unit_test(claims_with_slots_freed_meanwhile),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
