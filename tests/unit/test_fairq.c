/*
 * A destination's fair queue (engine/outbound/fairq.h) alone: shares by
 * weight over many pops (each the job peeked just before), a new tenant served within one round behind any
 * backlog, priority order and FIFO within a priority, a job put back in
 * front, removal while walking (sub-queues freed as they empty), a walk
 * that skips to the next tenant, a
 * reload's new weight, counts per tenant, random operations checked
 * against a model (one tenant alone, two, back to one, empty: every
 * tenant's count and the hash checked after each), one tenant alone kept
 * out of the hash with an emptied sub-queue kept for the next, and pushes
 * whose allocation fails.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "engine/outbound/fairq.h"

/* The link wraps malloc and calloc (CMakeLists.txt): the next one fails
 * while its flag is set. */
void *__real_malloc(size_t n);
void *__wrap_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__wrap_calloc(size_t n, size_t size);
static bool fail_malloc, fail_calloc;

void *
__wrap_malloc(size_t n)
{
    if (fail_malloc) {
        fail_malloc = false;
        return NULL;
    }
    return __real_malloc(n);
}

void *
__wrap_calloc(size_t n, size_t size)
{
    if (fail_calloc) {
        fail_calloc = false;
        return NULL;
    }
    return __real_calloc(n, size);
}

struct item {
    struct fairq_node fq;
    uint32_t tenant;
    unsigned prio;
    unsigned seq;
};

static struct item *
item_of(struct fairq_node *x)
{
    return x != NULL ? (struct item *)((char *)x - offsetof(struct item, fq)) : NULL;
}

/* Weights by tenant id, changeable (a reload). */
static unsigned weights[8];

static unsigned
weight_of(void *ctx, uint32_t tenant)
{
    (void)ctx;
    return tenant < 8 ? weights[tenant] : 1;
}

static void
weights_reset(void)
{
    for (unsigned i = 0; i < 8; i++)
        weights[i] = 1;
}

static struct item *
push(struct fairq *q, uint32_t tenant, unsigned prio, unsigned seq, bool front)
{
    struct item *it = calloc(1, sizeof(*it));
    assert_non_null(it);
    it->tenant = tenant;
    it->prio = prio;
    it->seq = seq;
    assert_int_equal(fairq_push(q, &it->fq, tenant, prio, front), 0);
    return it;
}

static void
drain(struct fairq *q)
{
    struct fairq_node *x;
    while ((x = fairq_pop(q, NULL)) != NULL)
        free(item_of(x));
    assert_int_equal(fairq_count(q), 0);
    assert_int_equal(q->ntenants, 0);
    assert_null(q->cur);
    assert_null(fairq_peek(q));
    fairq_fini(q);
}

static void
weights_honoured(void **state)
{
    (void)state;
    weights_reset();
    weights[1] = 1;
    weights[2] = 3;
    weights[3] = 6;
    struct fairq q;
    fairq_init(&q, weight_of, NULL);
    for (unsigned i = 0; i < 20000; i++)
        for (uint32_t t = 1; t <= 3; t++)
            push(&q, t, 0, i, false);
    assert_int_equal(fairq_count(&q), 60000);
    /* Over 10,000 pops with all three waiting the shares are exactly the
     * weights' (a whole number of rounds of 10). */
    unsigned got[4] = {0};
    for (unsigned i = 0; i < 10000; i++) {
        uint32_t t = 99;
        struct fairq_node *next = fairq_peek(&q); /* what the pop takes, turns and all */
        struct item *it = item_of(fairq_pop(&q, &t));
        assert_non_null(it);
        assert_ptr_equal(&it->fq, next);
        assert_int_equal(t, it->tenant);
        got[t]++;
        free(it);
    }
    assert_int_equal(got[1], 1000);
    assert_int_equal(got[2], 3000);
    assert_int_equal(got[3], 6000);
    /* And within every window of one round (10 pops) too. */
    unsigned win[4] = {0};
    for (unsigned i = 0; i < 10; i++) {
        uint32_t t;
        free(item_of(fairq_pop(&q, &t)));
        win[t]++;
    }
    assert_int_equal(win[1], 1);
    assert_int_equal(win[2], 3);
    assert_int_equal(win[3], 6);
    assert_int_equal(fairq_tenant_count(&q, 1), 20000 - 1001);
    drain(&q);
}

static void
new_tenant_within_one_round(void **state)
{
    (void)state;
    weights_reset();
    weights[1] = 5;
    weights[2] = 2;
    struct fairq q;
    fairq_init(&q, weight_of, NULL);
    /* A's backlog of 200,000 and C's of 1000; a few pops into A's turn. */
    for (unsigned i = 0; i < 200000; i++)
        push(&q, 1, 0, i, false);
    for (unsigned i = 0; i < 1000; i++)
        push(&q, 2, 0, i, false);
    for (unsigned i = 0; i < 3; i++)
        free(item_of(fairq_pop(&q, NULL)));
    /* B's first job comes within one round: what is left of the turn
     * (2 of A's 5) and one turn of each other tenant (C's 2), not after
     * the backlog. */
    push(&q, 3, 0, 0, false);
    unsigned n = 0;
    for (;;) {
        uint32_t t;
        struct item *it = item_of(fairq_pop(&q, &t));
        assert_non_null(it);
        n++;
        free(it);
        if (t == 3)
            break;
        assert_true(n <= 5 + 2 + 1);
    }
    assert_int_equal(n, 2 + 2 + 1);
    /* Its sub-queue went with its last job. */
    assert_int_equal(fairq_tenant_count(&q, 3), 0);
    assert_int_equal(q.ntenants, 2);
    drain(&q);
}

static void
priority_then_fifo(void **state)
{
    (void)state;
    weights_reset();
    struct fairq q;
    fairq_init(&q, weight_of, NULL);
    /* A backlog of priority 0, then priority 9 and 5 sent after it; 12
     * is taken for 9. */
    for (unsigned i = 0; i < 100; i++)
        push(&q, 1, 0, i, false);
    for (unsigned i = 0; i < 10; i++)
        push(&q, 1, 5, 100 + i, false);
    for (unsigned i = 0; i < 10; i++)
        push(&q, 1, i % 2 ? 9 : 12, 200 + i, false);
    for (unsigned i = 0; i < 10; i++) {
        struct item *it = item_of(fairq_pop(&q, NULL));
        assert_int_equal(it->seq, 200 + i);
        free(it);
    }
    for (unsigned i = 0; i < 10; i++) {
        struct item *it = item_of(fairq_pop(&q, NULL));
        assert_int_equal(it->seq, 100 + i);
        free(it);
    }
    for (unsigned i = 0; i < 100; i++) {
        struct item *it = item_of(fairq_pop(&q, NULL));
        assert_int_equal(it->seq, i);
        assert_int_equal(it->prio, 0);
        free(it);
    }
    assert_null(fairq_pop(&q, NULL));
    /* Priority is within a tenant: another tenant's priority 0 still
     * gets its turn between a tenant's priority 9 jobs. */
    for (unsigned i = 0; i < 4; i++)
        push(&q, 1, 9, i, false);
    push(&q, 2, 0, 100, false);
    uint32_t order[5];
    for (unsigned i = 0; i < 5; i++) {
        struct item *it = item_of(fairq_pop(&q, &order[i]));
        free(it);
    }
    assert_int_equal(order[0], 1);
    assert_int_equal(order[1], 2);
    drain(&q);
}

static void
front_push_goes_first_of_its_tenant(void **state)
{
    (void)state;
    weights_reset();
    struct fairq q;
    fairq_init(&q, weight_of, NULL);
    for (unsigned i = 0; i < 5; i++)
        push(&q, 1, 3, i, false);
    struct item *first = item_of(fairq_pop(&q, NULL));
    assert_int_equal(first->seq, 0);
    /* Put back after a failure: first again, before 1..4. */
    assert_int_equal(fairq_push(&q, &first->fq, first->tenant, first->prio, true), 0);
    struct item *again = item_of(fairq_pop(&q, NULL));
    assert_ptr_equal(again, first);
    free(again);
    /* Put back into an empty tenant (its sub-queue was freed): it comes
     * back, and the tail is right for pushes after it. */
    struct fairq q2;
    fairq_init(&q2, weight_of, NULL);
    push(&q2, 4, 0, 1, false);
    struct item *only = item_of(fairq_pop(&q2, NULL));
    assert_int_equal(q2.ntenants, 0);
    assert_int_equal(fairq_push(&q2, &only->fq, 4, 0, true), 0);
    push(&q2, 4, 0, 2, false);
    assert_int_equal(item_of(fairq_pop(&q2, NULL))->seq, 1);
    free(only);
    struct item *second = item_of(fairq_pop(&q2, NULL));
    assert_int_equal(second->seq, 2);
    free(second);
    drain(&q2);
    drain(&q);
}

static void
remove_while_walking(void **state)
{
    (void)state;
    weights_reset();
    struct fairq q;
    fairq_init(&q, weight_of, NULL);
    /* Tenants 1..4, priorities 0 and 7; every job of tenant 2 (which
     * empties it: its sub-queue goes during the walk) and every odd seq
     * are taken out. */
    unsigned total = 0;
    for (uint32_t t = 1; t <= 4; t++)
        for (unsigned i = 0; i < 50; i++, total++)
            push(&q, t, i % 3 == 0 ? 7 : 0, i, false);
    struct fairq_iter it;
    fairq_iter_init(&q, &it);
    unsigned seen = 0, removed = 0;
    for (struct fairq_node *x; (x = fairq_iter_next(&it)) != NULL;) {
        struct item *i = item_of(x);
        assert_int_equal(it.tenant, i->tenant);
        seen++;
        if (i->tenant == 2 || i->seq % 2 == 1) {
            fairq_iter_remove(&it);
            free(i);
            removed++;
        }
    }
    assert_int_equal(seen, total);
    assert_int_equal(fairq_count(&q), total - removed);
    assert_int_equal(fairq_tenant_count(&q, 2), 0);
    assert_int_equal(q.ntenants, 3);
    /* The rest is intact, in order, and the tails are right: pushes after
     * the walk come after what is left. */
    for (uint32_t t = 1; t <= 4; t++)
        if (t != 2)
            push(&q, t, 0, 1000, false);
    unsigned last[5] = {0}, n = 0;
    bool seen7[5] = {false};
    uint32_t t;
    for (struct fairq_node *x; (x = fairq_pop(&q, &t)) != NULL; n++) {
        struct item *i = item_of(x);
        assert_int_not_equal(t, 2);
        assert_int_equal(i->seq % 2 == 1 && i->seq != 1000, 0);
        if (i->prio == 7) {
            seen7[t] = true;
        } else {
            assert_true(i->seq >= last[t]);
            last[t] = i->seq;
        }
        free(i);
    }
    assert_int_equal(n, total - removed + 3);
    assert_int_equal(last[1], 1000);
    assert_true(seen7[1] && seen7[3] && seen7[4]);
    /* Removing everything walks to the end and leaves nothing allocated. */
    for (unsigned i = 0; i < 10; i++)
        push(&q, i % 3, i % 10, i, false);
    fairq_iter_init(&q, &it);
    for (struct fairq_node *x; (x = fairq_iter_next(&it)) != NULL;) {
        fairq_iter_remove(&it);
        free(item_of(x));
    }
    assert_int_equal(fairq_count(&q), 0);
    assert_null(q.cur);
    drain(&q);
}

static void
reload_changes_a_weight(void **state)
{
    (void)state;
    weights_reset();
    struct fairq q;
    fairq_init(&q, weight_of, NULL);
    for (unsigned i = 0; i < 1000; i++) {
        push(&q, 1, 0, i, false);
        push(&q, 2, 0, i, false);
    }
    unsigned got[3] = {0};
    for (unsigned i = 0; i < 100; i++) {
        uint32_t t;
        free(item_of(fairq_pop(&q, &t)));
        got[t]++;
    }
    assert_int_equal(got[1], 50);
    assert_int_equal(got[2], 50);
    /* A reload: tenant 2 weighs 4 now, from its next turn. */
    weights[2] = 4;
    got[1] = got[2] = 0;
    for (unsigned i = 0; i < 500; i++) {
        uint32_t t;
        free(item_of(fairq_pop(&q, &t)));
        got[t]++;
    }
    assert_int_equal(got[1], 100);
    assert_int_equal(got[2], 400);
    /* A weight of 0 (no such tenant any more) counts as 1. */
    weights[2] = 0;
    got[1] = got[2] = 0;
    for (unsigned i = 0; i < 100; i++) {
        uint32_t t;
        free(item_of(fairq_pop(&q, &t)));
        got[t]++;
    }
    assert_int_equal(got[1], 50);
    assert_int_equal(got[2], 50);
    drain(&q);
}

struct each_state {
    uint32_t ids[4];
    unsigned counts[4];
    unsigned n;
};

static void
each_add(void *arg, uint32_t tenant, unsigned n)
{
    struct each_state *es = arg;
    if (es->n < 4) {
        es->ids[es->n] = tenant;
        es->counts[es->n] = n;
    }
    es->n++;
}

static void
counts_per_tenant(void **state)
{
    (void)state;
    weights_reset();
    struct fairq q;
    fairq_init(&q, NULL, NULL); /* no weights: every tenant weighs 1 */
    for (unsigned i = 0; i < 7; i++)
        push(&q, 0, 0, i, false); /* untenanted */
    for (unsigned i = 0; i < 3; i++)
        push(&q, 42, 9, i, false);
    uint32_t ids[4];
    unsigned counts[4];
    assert_int_equal(fairq_tenants(&q, ids, counts, 4), 2);
    assert_int_equal(ids[0], 0);
    assert_int_equal(counts[0], 7);
    assert_int_equal(ids[1], 42);
    assert_int_equal(counts[1], 3);
    assert_int_equal(fairq_tenants(&q, ids, counts, 1), 2);
    /* The same by callback. */
    struct each_state es = {0};
    fairq_tenants_each(&q, each_add, &es);
    assert_int_equal(es.n, 2);
    assert_int_equal(es.ids[0], 0);
    assert_int_equal(es.counts[0], 7);
    assert_int_equal(es.ids[1], 42);
    assert_int_equal(es.counts[1], 3);
    assert_int_equal(fairq_tenant_count(&q, 42), 3);
    assert_int_equal(fairq_tenant_count(&q, 7), 0);
    /* Alternating with equal weights. */
    uint32_t t;
    free(item_of(fairq_pop(&q, &t)));
    assert_int_equal(t, 0);
    free(item_of(fairq_pop(&q, &t)));
    assert_int_equal(t, 42);
    free(item_of(fairq_pop(&q, &t)));
    assert_int_equal(t, 0);
    /* Many tenants: each is found (the hash table), and all go when empty. */
    for (uint32_t k = 100; k < 1100; k++)
        push(&q, k, k % 10, k, false);
    for (uint32_t k = 100; k < 1100; k++)
        assert_int_equal(fairq_tenant_count(&q, k), 1);
    drain(&q);
}

/* Random pushes (back and front), pops and walks that take jobs out,
 * against a model of each tenant's lists per priority: every pop is the
 * first job of the highest priority of its tenant, every walk sees each
 * job once, counts agree, and nothing is left allocated. Fixed seed. */
#define MT 6       /* tenants */
#define MCAP 4096  /* jobs in the model at most */

struct model {
    struct item *q[MT][FAIRQ_PRIORITIES][MCAP]; /* each list in order */
    unsigned n[MT][FAIRQ_PRIORITIES];
    unsigned total;
};

static uint64_t rng = 88172645463325252ull;

static unsigned
rnd(unsigned n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (unsigned)(rng % n);
}

static void
model_take(struct model *m, struct item *it)
{
    unsigned t = it->tenant, p = it->prio;
    for (unsigned i = 0; i < m->n[t][p]; i++)
        if (m->q[t][p][i] == it) {
            memmove(&m->q[t][p][i], &m->q[t][p][i + 1], (m->n[t][p] - i - 1) * sizeof(it));
            m->n[t][p]--;
            m->total--;
            return;
        }
    fail_msg("job %u of tenant %u not in the model", it->seq, t);
}

/* The queue against the model after an operation: the count of every
 * tenant (and of one never seen), the tenants waiting and their order
 * from q->cur round the ring, and the hash: empty with no tenant or one,
 * every tenant in it with two or more. */
static void
model_check(const struct fairq *q, const struct model *m)
{
    assert_int_equal(fairq_count(q), m->total);
    unsigned waiting = 0;
    for (unsigned t = 0; t < MT; t++) {
        unsigned n = 0;
        for (unsigned p = 0; p < FAIRQ_PRIORITIES; p++)
            n += m->n[t][p];
        assert_int_equal(fairq_tenant_count(q, t), n);
        waiting += n > 0;
    }
    assert_int_equal(fairq_tenant_count(q, MT + 1000), 0);
    assert_int_equal(q->ntenants, waiting);
    uint32_t ids[MT];
    unsigned counts[MT];
    assert_int_equal(fairq_tenants(q, ids, counts, MT), waiting);
    for (unsigned i = 0; i < waiting; i++) {
        assert_true(ids[i] < MT);
        assert_int_equal(counts[i], fairq_tenant_count(q, ids[i]));
        for (unsigned k = 0; k < i; k++)
            assert_true(ids[k] != ids[i]);
    }
    if (waiting == 0)
        assert_null(q->cur);
    if (waiting >= 2)
        assert_int_equal(hash_count(&q->tenants), waiting);
    else
        assert_true(hash_count(&q->tenants) <= waiting);
}

static void
random_ops_against_a_model(void **state)
{
    (void)state;
    weights_reset();
    for (unsigned t = 0; t < MT; t++)
        weights[t] = 1 + t % 3;
    struct model *m = calloc(1, sizeof(*m));
    assert_non_null(m);
    struct fairq q;
    fairq_init(&q, weight_of, NULL);
    unsigned seq = 0;
    /* Phases: pushes for one tenant, two or all, more or fewer pushes
     * than pops, so that the queue goes from one tenant alone to two and
     * back, empties, and fills. */
    unsigned ntpick = MT, pushes = 55, tpick[MT];
    for (unsigned t = 0; t < MT; t++)
        tpick[t] = t;
    unsigned alone = 0, two = 0, back_to_one = 0, emptied = 0, prev = 0;
    for (unsigned round = 0; round < 40000; round++) {
        if (round % 400 == 0) {
            static const unsigned sizes[] = {1, 1, 2, 2, 3, MT};
            static const unsigned mix[] = {30, 45, 50, 55, 70};
            ntpick = sizes[rnd(6)];
            pushes = mix[rnd(5)];
            for (unsigned i = 0; i < ntpick; i++) {
                unsigned j = i + rnd(MT - i), x = tpick[i];
                tpick[i] = tpick[j];
                tpick[j] = x;
            }
        }
        unsigned op = rnd(100);
        if (op < pushes && m->total < MCAP - 1) {
            unsigned t = tpick[rnd(ntpick)], p = rnd(FAIRQ_PRIORITIES);
            bool front = rnd(8) == 0 && m->n[t][p] < MCAP;
            struct item *it = push(&q, t, p, seq++, front);
            if (front) {
                memmove(&m->q[t][p][1], &m->q[t][p][0], m->n[t][p] * sizeof(it));
                m->q[t][p][0] = it;
            } else {
                m->q[t][p][m->n[t][p]] = it;
            }
            m->n[t][p]++;
            m->total++;
        } else if (op < 97) {
            uint32_t t;
            struct item *it = item_of(fairq_pop(&q, &t));
            if (m->total == 0) {
                assert_null(it);
                model_check(&q, m);
                continue;
            }
            assert_non_null(it);
            assert_int_equal(t, it->tenant);
            unsigned hp = FAIRQ_PRIORITIES;
            while (hp > 0 && m->n[t][hp - 1] == 0)
                hp--;
            assert_true(hp > 0);
            assert_int_equal(it->prio, hp - 1);
            assert_ptr_equal(m->q[t][hp - 1][0], it);
            model_take(m, it);
            free(it);
        } else {
            /* A walk that sees everything once and takes some out (or
             * skips the rest of a tenant). */
            struct fairq_iter iter;
            fairq_iter_init(&q, &iter);
            unsigned seen = 0, total = m->total;
            bool skips = rnd(4) == 0;
            for (struct fairq_node *x; (x = fairq_iter_next(&iter)) != NULL;) {
                struct item *it = item_of(x);
                assert_int_equal(iter.tenant, it->tenant);
                seen++;
                if (rnd(3) == 0) {
                    fairq_iter_remove(&iter);
                    model_take(m, it);
                    free(it);
                } else if (skips && rnd(4) == 0) {
                    fairq_iter_next_tenant(&iter);
                }
            }
            assert_true(skips ? seen <= total : seen == total);
        }
        model_check(&q, m);
        unsigned now = q.ntenants;
        alone += now == 1 && prev == 0;
        two += now == 2 && prev == 1;
        back_to_one += now == 1 && prev == 2;
        emptied += now == 0 && prev > 0;
        prev = now;
    }
    print_message("alone %u, a second %u, back to one %u, emptied %u times\n", alone, two,
                  back_to_one, emptied);
    assert_true(alone > 100 && two > 100 && back_to_one > 100 && emptied > 100);
    drain(&q);
    free(m);
}

/* A walk that skips to the next tenant after the first two jobs of each
 * (fairq_iter_next_tenant: a detour's connection looks at the heads only)
 * sees two of each tenant in the serving order, takes one out where it
 * is, and leaves the turns as they were: the pops after it go as before. */
static void
walk_skips_to_the_next_tenant(void **state)
{
    (void)state;
    weights_reset();
    struct fairq q;
    fairq_init(&q, weight_of, NULL);
    for (uint32_t t = 1; t <= 3; t++)
        for (unsigned i = 0; i < 5; i++)
            push(&q, t, 0, t * 10 + i, false);
    uint32_t t;
    struct item *first = item_of(fairq_pop(&q, &t)); /* tenant 1's turn: 2's next */
    assert_int_equal(first->seq, 10);
    free(first);
    struct fairq_iter it;
    fairq_iter_init(&q, &it);
    unsigned got[8], n = 0, k = 0;
    uint32_t at = 0;
    for (struct fairq_node *x; (x = fairq_iter_next(&it)) != NULL;) {
        if (it.tenant != at) {
            at = it.tenant;
            k = 0;
        }
        if (k++ >= 2) {
            fairq_iter_next_tenant(&it);
            continue;
        }
        assert_true(n < 8);
        got[n++] = item_of(x)->seq;
        if (item_of(x)->seq == 31) {
            fairq_iter_remove(&it);
            free(item_of(x));
        }
    }
    const unsigned want[] = {20, 21, 30, 31, 11, 12};
    assert_int_equal(n, 6);
    assert_memory_equal(got, want, sizeof(want));
    const unsigned pops[] = {20, 30, 11, 21, 32, 12};
    for (unsigned i = 0; i < 6; i++) {
        struct item *x = item_of(fairq_pop(&q, &t));
        assert_int_equal(x->seq, pops[i]);
        free(x);
    }
    drain(&q);
}

/* One tenant alone is kept out of the hash; a second puts both in; the
 * one left after the other empties is still found; an emptied sub-queue
 * is kept (one) and taken again by the next tenant to wait. */
static void
one_tenant_stays_out_of_the_hash(void **state)
{
    (void)state;
    weights_reset();
    struct fairq q;
    fairq_init(&q, weight_of, NULL);
    uint32_t t;
    for (unsigned round = 0; round < 3; round++) {
        struct item *a = push(&q, 1, 0, 1, false);
        assert_int_equal(q.tenants.n, 0);
        assert_null(q.spare); /* taken (or, first time, none yet) */
        assert_int_equal(fairq_tenant_count(&q, 1), 1);
        assert_int_equal(fairq_tenant_count(&q, 2), 0);
        assert_ptr_equal(item_of(fairq_pop(&q, &t)), a);
        free(a);
        assert_true(fairq_empty(&q));
        assert_non_null(q.spare);
    }
    struct item *a = push(&q, 1, 0, 1, false);
    struct item *b = push(&q, 2, 0, 2, false);
    assert_int_equal(q.tenants.n, 2);
    assert_int_equal(fairq_tenant_count(&q, 1), 1);
    assert_int_equal(fairq_tenant_count(&q, 2), 1);
    assert_ptr_equal(item_of(fairq_pop(&q, &t)), a); /* 1 empties: 2 left, hashed */
    free(a);
    assert_int_equal(fairq_tenant_count(&q, 2), 1);
    assert_int_equal(fairq_tenant_count(&q, 1), 0);
    struct item *c = push(&q, 3, 0, 3, false);
    struct item *b2 = push(&q, 2, 0, 4, false); /* 2 found again, not a new one */
    assert_int_equal(q.ntenants, 2);
    assert_int_equal(fairq_tenant_count(&q, 2), 2);
    assert_int_equal(fairq_tenant_count(&q, 3), 1);
    const struct item *want[] = {b, c, b2};
    for (unsigned i = 0; i < 3; i++) {
        struct item *x = item_of(fairq_pop(&q, &t));
        assert_ptr_equal(x, want[i]);
        free(x);
    }
    assert_int_equal(q.tenants.n, 0);
    drain(&q);
}

/* Allocations that fail: a first tenant's sub-queue (nothing kept), and
 * the hash's buckets when a second tenant comes (its sub-queue kept as
 * the spare, the first still found alone); the same pushes then go
 * through. Nothing leaks (ASan's build). */
static void
pushes_that_find_no_memory(void **state)
{
    (void)state;
    weights_reset();
    struct fairq q;
    fairq_init(&q, weight_of, NULL);
    struct item a = {.tenant = 1}, b = {.tenant = 2};
    fail_malloc = true;
    assert_int_equal(fairq_push(&q, &a.fq, 1, 0, false), -ENOMEM);
    assert_false(fail_malloc);
    assert_true(fairq_empty(&q));
    assert_null(q.cur);
    assert_null(q.spare);
    assert_int_equal(fairq_tenant_count(&q, 1), 0);
    assert_int_equal(fairq_push(&q, &a.fq, 1, 0, false), 0);
    fail_calloc = true;
    assert_int_equal(fairq_push(&q, &b.fq, 2, 0, false), -ENOMEM);
    assert_false(fail_calloc);
    assert_int_equal(q.ntenants, 1);
    assert_int_equal(hash_count(&q.tenants), 0);
    assert_non_null(q.spare);
    assert_int_equal(fairq_count(&q), 1);
    assert_int_equal(fairq_tenant_count(&q, 1), 1);
    assert_int_equal(fairq_tenant_count(&q, 2), 0);
    assert_int_equal(fairq_push(&q, &b.fq, 2, 0, false), 0);
    assert_null(q.spare);
    assert_int_equal(hash_count(&q.tenants), 2);
    assert_int_equal(fairq_tenant_count(&q, 1), 1);
    assert_int_equal(fairq_tenant_count(&q, 2), 1);
    uint32_t t;
    assert_ptr_equal(fairq_pop(&q, &t), &a.fq);
    assert_ptr_equal(fairq_pop(&q, &t), &b.fq);
    assert_null(fairq_pop(&q, &t));
    assert_int_equal(q.ntenants, 0);
    fairq_fini(&q);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(weights_honoured),
        cmocka_unit_test(new_tenant_within_one_round),
        cmocka_unit_test(priority_then_fifo),
        cmocka_unit_test(front_push_goes_first_of_its_tenant),
        cmocka_unit_test(remove_while_walking),
        cmocka_unit_test(walk_skips_to_the_next_tenant),
        cmocka_unit_test(reload_changes_a_weight),
        cmocka_unit_test(counts_per_tenant),
        cmocka_unit_test(random_ops_against_a_model),
        cmocka_unit_test(one_tenant_stays_out_of_the_hash),
        cmocka_unit_test(pushes_that_find_no_memory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
