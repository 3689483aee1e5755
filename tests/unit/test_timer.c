/*
 * Timer heap alone (a fake clock) and timers on a real worker loop: 10,000
 * random deadlines fire in order, each once, never early; cancelled and
 * re-armed timers behave; a run goes on past a stale key armed during it;
 * random operations (callbacks that arm and cancel included) against a
 * model, the heap checked after each.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>

#include "engine/timer.h"
#include "engine/worker.h"

#define N 10000

struct tt {
    struct timer t;
    unsigned id;
    unsigned fired;
    uint64_t fired_at;
    bool cancelled;
};

struct run {
    struct tt *v;
    unsigned *order;
    unsigned nfired;
    uint64_t now;
    unsigned expect;
    struct worker *w;
};

static struct run *cur;

static uint64_t
rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void
on_fire(struct timer *t, void *ctx)
{
    (void)ctx;
    struct tt *x = (struct tt *)((char *)t - offsetof(struct tt, t));
    x->fired++;
    x->fired_at = cur->w ? clock_mono_ns() : cur->now;
    cur->order[cur->nfired++] = x->id;
    if (cur->w && cur->nfired == cur->expect)
        cur->w->stopping = true;
}

static void
check_order(struct run *r, unsigned expect)
{
    assert_int_equal(r->nfired, expect);
    for (unsigned i = 0; i < N; i++) {
        if (r->v[i].cancelled)
            assert_int_equal(r->v[i].fired, 0);
        else
            assert_int_equal(r->v[i].fired, 1);
    }
    for (unsigned i = 1; i < r->nfired; i++) {
        const struct tt *a = &r->v[r->order[i - 1]], *b = &r->v[r->order[i]];
        assert_true(a->t.deadline < b->t.deadline ||
                    (a->t.deadline == b->t.deadline && a->t.seq < b->t.seq));
    }
    for (unsigned i = 0; i < N; i++)
        if (!r->v[i].cancelled)
            assert_true(r->v[i].fired_at >= r->v[i].t.deadline);
}

static void
test_heap_fake_clock(void **state)
{
    (void)state;
    struct timer_heap h;
    assert_int_equal(timer_heap_init(&h, 4), 0); /* small: forces growth */
    struct run r = {.v = calloc(N, sizeof(struct tt)), .order = calloc(N, sizeof(unsigned))};
    cur = &r;
    uint64_t seed = 42;
    for (unsigned i = 0; i < N; i++) {
        r.v[i].id = i;
        timer_init(&r.v[i].t, on_fire);
        /* few distinct values: many ties */
        assert_int_equal(timer_arm(&h, &r.v[i].t, 1000 + rnd(&seed) % 5000), 0);
    }
    unsigned cancelled = 0;
    for (unsigned i = 0; i < N; i += 3) {
        timer_cancel(&h, &r.v[i].t);
        assert_false(timer_armed(&r.v[i].t));
        r.v[i].cancelled = true;
        cancelled++;
    }
    /* re-arm some: only the last deadline counts */
    for (unsigned i = 1; i < N; i += 7)
        if (!r.v[i].cancelled)
            assert_int_equal(timer_arm(&h, &r.v[i].t, 1000 + rnd(&seed) % 5000), 0);
    assert_int_equal(timer_next(&h) >= 1000, 1);
    /* advance the clock in random steps */
    while (r.now < 7000) {
        r.now += rnd(&seed) % 50;
        timer_run(&h, r.now, NULL);
        assert_true(timer_next(&h) > r.now);
    }
    check_order(&r, N - cancelled);
    assert_int_equal(timer_next(&h), UINT64_MAX);
    timer_heap_fini(&h);
    free(r.v);
    free(r.order);
}

/* Re-armed for later, a timer keeps its place in the heap (no removal
 * and insertion): the run at its old key moves it instead of firing it;
 * it fires at its new deadline, never early. Re-armed for sooner, it
 * moves at once. Ties keep the order of the last arms. */
static void
test_rearm_later_in_place(void **state)
{
    (void)state;
    struct timer_heap h;
    assert_int_equal(timer_heap_init(&h, 4), 0);
    struct run r = {.v = calloc(3, sizeof(struct tt)), .order = calloc(3, sizeof(unsigned))};
    cur = &r;
    for (unsigned i = 0; i < 3; i++) {
        r.v[i].id = i;
        timer_init(&r.v[i].t, on_fire);
    }
    assert_int_equal(timer_arm(&h, &r.v[0].t, 100), 0);
    assert_int_equal(timer_arm(&h, &r.v[1].t, 300), 0);
    assert_int_equal(timer_arm(&h, &r.v[0].t, 300), 0); /* later: in place */
    assert_int_equal(timer_next(&h), 100);
    assert_int_equal(r.v[0].t.deadline, 300);
    r.now = 100;
    assert_int_equal(timer_run(&h, r.now, NULL), 0); /* moved, not fired */
    assert_int_equal(timer_next(&h), 300);
    assert_int_equal(timer_arm(&h, &r.v[2].t, 500), 0);
    assert_int_equal(timer_arm(&h, &r.v[2].t, 200), 0); /* sooner: moved at once */
    assert_int_equal(timer_next(&h), 200);
    r.now = 200;
    assert_int_equal(timer_run(&h, r.now, NULL), 1);
    r.now = 299;
    assert_int_equal(timer_run(&h, r.now, NULL), 0);
    r.now = 300;
    assert_int_equal(timer_run(&h, r.now, NULL), 2);
    assert_int_equal(r.nfired, 3);
    for (unsigned i = 0; i < 3; i++)
        assert_true(r.v[i].fired == 1 && r.v[i].fired_at >= r.v[i].t.deadline);
    /* 1 was armed for 300 before 0's re-arm for 300: it fires first */
    assert_int_equal(r.order[0], 2);
    assert_int_equal(r.order[1], 1);
    assert_int_equal(r.order[2], 0);
    assert_int_equal(timer_next(&h), UINT64_MAX);
    timer_heap_fini(&h);
    free(r.v);
    free(r.order);
}

struct self_rearm {
    struct timer_heap *h;
    struct timer t;
    unsigned count;
};

static void
rearm_self(struct timer *t, void *ctx)
{
    (void)ctx;
    struct self_rearm *x = (struct self_rearm *)((char *)t - offsetof(struct self_rearm, t));
    if (++x->count < 3)
        assert_int_equal(timer_arm(x->h, t, 0), 0);
}

static void
test_rearm_in_callback_terminates(void **state)
{
    (void)state;
    /* A timer that re-arms itself for "now" must not spin inside one run. */
    struct timer_heap h;
    assert_int_equal(timer_heap_init(&h, 0), 0);
    struct self_rearm x = {.h = &h};
    timer_init(&x.t, rearm_self);
    assert_int_equal(timer_arm(&h, &x.t, 0), 0);
    assert_int_equal(timer_run(&h, 10, NULL), 1);
    assert_int_equal(timer_run(&h, 10, NULL), 1);
    assert_int_equal(timer_run(&h, 10, NULL), 1);
    assert_int_equal(timer_run(&h, 10, NULL), 0);
    assert_int_equal(x.count, 3);
    timer_heap_fini(&h);
}

/* A callback arms a timer new for a deadline already due (it waits for
 * the next run), then re-arms it for later than another timer due in this
 * run: the first key in the heap is then one armed during the run, but a
 * stale one; the run moves it to its deadline and goes on to fire the
 * other, due and armed before the run (it used to stop at that key, the
 * other left due for the next run). */
struct stale_run {
    struct timer_heap *h;
    struct timer a, b, c;
    unsigned fired_a, fired_b, fired_c;
};

static struct stale_run *stale;

static void
stale_on_a(struct timer *t, void *ctx)
{
    (void)t;
    (void)ctx;
    stale->fired_a++;
    assert_int_equal(timer_arm(stale->h, &stale->c, 50), 0);  /* due: next run */
    assert_int_equal(timer_arm(stale->h, &stale->c, 250), 0); /* later: in place */
}

static void
stale_on_b(struct timer *t, void *ctx)
{
    (void)t;
    (void)ctx;
    stale->fired_b++;
}

static void
stale_on_c(struct timer *t, void *ctx)
{
    (void)t;
    (void)ctx;
    stale->fired_c++;
}

static void
test_run_goes_past_a_stale_key_armed_in_the_run(void **state)
{
    (void)state;
    struct timer_heap h;
    assert_int_equal(timer_heap_init(&h, 4), 0);
    struct stale_run x = {.h = &h};
    stale = &x;
    timer_init(&x.a, stale_on_a);
    timer_init(&x.b, stale_on_b);
    timer_init(&x.c, stale_on_c);
    assert_int_equal(timer_arm(&h, &x.a, 100), 0);
    assert_int_equal(timer_arm(&h, &x.b, 200), 0);
    assert_int_equal(timer_run(&h, 300, NULL), 2); /* a, then b */
    assert_int_equal(x.fired_b, 1);
    assert_int_equal(x.fired_c, 0);
    assert_int_equal(timer_next(&h), 250);
    assert_int_equal(timer_run(&h, 300, NULL), 1); /* c */
    assert_true(x.fired_a == 1 && x.fired_b == 1 && x.fired_c == 1);
    assert_int_equal(timer_next(&h), UINT64_MAX);
    timer_heap_fini(&h);
}

/* Random operations against a model: timers armed new, re-armed later
 * (in place), re-armed sooner, cancelled, runs to a random now (some cut
 * short by the clock of timer_run_until), and fire callbacks that arm and
 * cancel timers (themselves included). The model holds each timer's
 * deadline and arming order; a run fires, one after another, the armed
 * timer first by deadline then arming order, as long as it is due and was
 * armed before the run began (what a callback arms waits for the next
 * run). After every operation, and inside every callback, the heap is
 * walked: each slot's key no later than its children's, the key the one
 * its timer holds, t->slot its index + 1, every armed timer in it once.
 * Fixed seed. */
#define MODEL_N   200
#define MODEL_OPS 20000

struct mt {
    struct timer t;
    unsigned id;
    bool armed;        /* the model's */
    uint64_t deadline; /* the model's, while armed */
    uint64_t seq;      /* the model's arming order, while armed */
};

struct model_run {
    struct timer_heap h;
    struct mt v[MODEL_N];
    uint64_t seq;      /* arms so far: the heap's sequence */
    uint64_t now;
    uint64_t rng;
    uint64_t run_seq;  /* seq when the run began */
    unsigned fired;    /* in this run */
    unsigned in_place, moved;
    bool quiet;        /* callbacks arm nothing */
};

static struct model_run *mr;

static unsigned
mrnd(unsigned n)
{
    return (unsigned)(rnd(&mr->rng) % n);
}

static void
heap_check(const struct model_run *m)
{
    const struct timer_heap *h = &m->h;
    assert_true(h->n <= h->cap);
    assert_int_equal(h->seq, m->seq);
    for (uint32_t i = 0; i < h->n; i++) {
        const struct timer_slot *s = &h->v[i];
        assert_non_null(s->t);
        assert_int_equal(s->t->slot, i + 1);
        assert_true(s->key == s->t->key && s->key_seq == s->t->key_seq);
        /* the key: the deadline, or earlier (a re-arm for later in place) */
        assert_true(s->key < s->t->deadline ||
                    (s->key == s->t->deadline && s->key_seq <= s->t->seq));
        for (uint32_t c = 2 * i + 1; c <= 2 * i + 2 && c < h->n; c++) {
            const struct timer_slot *k = &h->v[c];
            assert_true(s->key < k->key || (s->key == k->key && s->key_seq < k->key_seq));
        }
    }
    unsigned armed = 0;
    for (unsigned i = 0; i < MODEL_N; i++) {
        const struct mt *x = &m->v[i];
        assert_int_equal(timer_armed(&x->t), x->armed);
        if (!x->armed)
            continue;
        armed++;
        assert_true(x->t.slot <= h->n);
        assert_ptr_equal(h->v[x->t.slot - 1].t, &x->t);
        assert_int_equal(x->t.deadline, x->deadline);
        assert_int_equal(x->t.seq, x->seq);
    }
    assert_int_equal(armed, h->n);
    assert_int_equal(timer_next(h), h->n ? h->v[0].key : UINT64_MAX);
}

/* The model's next to fire in this run, or NULL: the first armed by
 * deadline then arming order, if due and armed before the run. */
static struct mt *
model_next(struct model_run *m)
{
    struct mt *best = NULL;
    for (unsigned i = 0; i < MODEL_N; i++) {
        struct mt *x = &m->v[i];
        if (x->armed && (best == NULL || x->deadline < best->deadline ||
                         (x->deadline == best->deadline && x->seq < best->seq)))
            best = x;
    }
    if (best == NULL || best->deadline > m->now || best->seq >= m->run_seq)
        return NULL;
    return best;
}

static void
model_arm(struct model_run *m, struct mt *x, uint64_t deadline)
{
    bool was = x->armed;
    uint64_t key = x->t.key;
    assert_int_equal(timer_arm(&m->h, &x->t, deadline), 0);
    if (was && deadline >= key)
        m->in_place++;
    else if (was)
        m->moved++;
    x->armed = true;
    x->deadline = deadline;
    x->seq = m->seq++;
}

static void
model_cancel(struct model_run *m, struct mt *x)
{
    timer_cancel(&m->h, &x->t);
    assert_false(timer_armed(&x->t));
    x->armed = false;
}

static void
model_fire(struct timer *t, void *ctx)
{
    (void)ctx;
    struct model_run *m = mr;
    struct mt *x = (struct mt *)((char *)t - offsetof(struct mt, t));
    struct mt *want = model_next(m);
    if (want != x)
        fail_msg("timer %u fired (deadline %llu seq %llu), the model's next: %d", x->id,
                 (unsigned long long)x->t.deadline, (unsigned long long)x->t.seq,
                 want ? (int)want->id : -1);
    assert_false(timer_armed(t));
    assert_true(x->deadline <= m->now);
    x->armed = false;
    m->fired++;
    heap_check(m);
    /* A callback arms and cancels: itself, others, due now or later. */
    unsigned ops = m->quiet ? 0 : mrnd(4);
    for (unsigned k = 0; k < ops; k++) {
        struct mt *y = &m->v[mrnd(MODEL_N)];
        if (mrnd(5) == 0 && y->armed)
            model_cancel(m, y);
        else
            model_arm(m, mrnd(4) == 0 ? x : y, m->now - 20 + mrnd(60));
        heap_check(m);
    }
}

static uint64_t
fired_clock(void)
{
    return mr->fired;
}

static void
test_random_ops_against_a_model(void **state)
{
    (void)state;
    struct model_run *m = calloc(1, sizeof(*m));
    assert_non_null(m);
    mr = m;
    m->rng = 0x9e3779b97f4a7c15ull;
    m->now = 1000;
    assert_int_equal(timer_heap_init(&m->h, 2), 0); /* small: grows */
    for (unsigned i = 0; i < MODEL_N; i++) {
        m->v[i].id = i;
        timer_init(&m->v[i].t, model_fire);
    }
    unsigned runs = 0, fired = 0, cut = 0;
    for (unsigned op = 0; op < MODEL_OPS; op++) {
        struct mt *x = &m->v[mrnd(MODEL_N)];
        unsigned r = mrnd(100);
        if (r < 30) {
            /* few distinct deadlines: many ties */
            model_arm(m, x, m->now + mrnd(100));
        } else if (r < 45 && x->armed) {
            model_arm(m, x, x->deadline + mrnd(100)); /* later (or the same) */
        } else if (r < 55 && x->armed) {
            uint64_t d = x->t.key > 0 ? x->t.key - 1 - mrnd(50) : 0;
            model_arm(m, x, d); /* sooner than its key: moves */
        } else if (r < 70) {
            model_cancel(m, x);
        } else {
            if (mrnd(4) != 0)
                m->now += mrnd(40);
            m->run_seq = m->seq;
            m->fired = 0;
            unsigned n;
            bool until = mrnd(4) == 0;
            uint64_t stop = 1 + mrnd(5);
            if (until)
                n = timer_run_until(&m->h, m->now, NULL, fired_clock, stop);
            else
                n = timer_run(&m->h, m->now, NULL);
            assert_int_equal(n, m->fired);
            runs++;
            fired += n;
            if (until && n == stop) {
                cut++;
            } else {
                /* stopped where the model stops */
                struct mt *left = model_next(m);
                if (left != NULL)
                    fail_msg("run to %llu left timer %u (deadline %llu) due",
                             (unsigned long long)m->now, left->id,
                             (unsigned long long)left->deadline);
            }
        }
        heap_check(m);
    }
    print_message("%u ops: %u runs (%u cut short), %u fired, %u re-armed in place, "
                  "%u moved\n",
                  MODEL_OPS, runs, cut, fired, m->in_place, m->moved);
    assert_true(fired > 1000 && m->in_place > 1000 && m->moved > 1000 && cut > 100);
    /* Everything left fires, in the model's order. */
    m->now = UINT64_MAX - 1000;
    m->quiet = true;
    for (;;) {
        m->run_seq = m->seq;
        m->fired = 0;
        unsigned n = timer_run(&m->h, m->now, NULL);
        assert_int_equal(n, m->fired);
        heap_check(m);
        if (m->h.n == 0)
            break;
    }
    assert_int_equal(timer_next(&m->h), UINT64_MAX);
    timer_heap_fini(&m->h);
    free(m);
}

static void
test_loop_timers(void **state)
{
    (void)state;
    struct worker w;
    int rc = worker_init(&w, 0, 256, NULL);
    if (rc < 0)
        skip(); /* io_uring not available here */
    struct run r = {.v = calloc(N, sizeof(struct tt)), .order = calloc(N, sizeof(unsigned)),
                    .w = &w};
    cur = &r;
    uint64_t seed = 7, base = clock_mono_ns();
    for (unsigned i = 0; i < N; i++) {
        r.v[i].id = i;
        timer_init(&r.v[i].t, on_fire);
        /* within 300 ms, at 100 us granularity: plenty of ties */
        assert_int_equal(worker_timer_arm(&w, &r.v[i].t, base + (rnd(&seed) % 3000) * 100000),
                         0);
    }
    unsigned cancelled = 0;
    for (unsigned i = 0; i < N; i += 4) {
        worker_timer_cancel(&w, &r.v[i].t);
        r.v[i].cancelled = true;
        cancelled++;
    }
    r.expect = N - cancelled;
    assert_int_equal(worker_run(&w), 0);
    check_order(&r, N - cancelled);
    worker_fini(&w);
    free(r.v);
    free(r.order);
}

/* Timers due together whose callbacks take long: each busy for 0.5 ms,
 * 400 of them, 200 ms of work. The loop fires them over several turns
 * (WORKER_TIMER_SLICE_MS each), in order, not in one turn of 200 ms with
 * nothing else of the worker served: 10,000 held destinations whose rest
 * ended together deferred 200,000 recipients in one turn of 2.4 s, the
 * worker's submission sessions waiting.
 *
 * What a turn fired is counted by the turn it ran in (stats.loops), not
 * read off the turn's length: a turn preempted on a loaded machine lasts
 * longer than its slice however few callbacks it ran, while a callback
 * lasts at least its 0.5 ms of the clock the slice is measured on, so a
 * slice holds at most WORKER_TIMER_SLICE_MS / 0.5 ms of them whatever the
 * load. */
#define BUSY_N         400
#define BUSY_PER_SLICE (WORKER_TIMER_SLICE_MS * 2u) /* 0.5 ms each */

static unsigned busy_fired;
static uint64_t busy_turn[BUSY_N]; /* the loop turn each callback ran in */

static void
on_busy(struct timer *t, void *ctx)
{
    struct worker *w = ctx;
    (void)t;
    busy_turn[busy_fired] = w->stats.loops;
    uint64_t until = clock_mono_ns() + 500000;
    while (clock_mono_ns() < until)
        ;
    if (++busy_fired == BUSY_N)
        w->stopping = true;
}

static void
test_loop_slices_a_storm_of_timers(void **state)
{
    (void)state;
    struct worker w;
    int rc = worker_init(&w, 0, 256, NULL);
    if (rc < 0)
        skip(); /* io_uring not available here */
    struct timer *v = calloc(BUSY_N, sizeof(*v));
    assert_non_null(v);
    busy_fired = 0;
    uint64_t at = clock_mono_ns() + 1000000;
    for (unsigned i = 0; i < BUSY_N; i++) {
        timer_init(&v[i], on_busy);
        assert_int_equal(worker_timer_arm(&w, &v[i], at), 0);
    }
    assert_int_equal(worker_run(&w), 0);
    assert_int_equal(busy_fired, BUSY_N);
    /* at most a slice's worth a turn, the turns in order, and so over
     * several turns */
    unsigned most = 0, in_turn = 0, turns = 0;
    for (unsigned i = 0; i < BUSY_N; i++) {
        if (i == 0 || busy_turn[i] != busy_turn[i - 1]) {
            assert_true(i == 0 || busy_turn[i] > busy_turn[i - 1]);
            in_turn = 0;
            turns++;
        }
        if (++in_turn > most)
            most = in_turn;
    }
    print_message("%u callbacks of 0.5 ms over %u turns, at most %u a turn (slice: %u), "
                  "longest turn %llu ms\n",
                  BUSY_N, turns, most, BUSY_PER_SLICE,
                  (unsigned long long)(w.stats.longest_turn_ns / 1000000));
    if (most > BUSY_PER_SLICE)
        fail_msg("%u callbacks of 0.5 ms in one turn: more than a slice of %u ms", most,
                 WORKER_TIMER_SLICE_MS);
    assert_true(turns >= BUSY_N / BUSY_PER_SLICE);
    worker_fini(&w);
    free(v);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_heap_fake_clock),
        cmocka_unit_test(test_rearm_later_in_place),
        cmocka_unit_test(test_rearm_in_callback_terminates),
        cmocka_unit_test(test_run_goes_past_a_stale_key_armed_in_the_run),
        cmocka_unit_test(test_random_ops_against_a_model),
        cmocka_unit_test(test_loop_timers),
        cmocka_unit_test(test_loop_slices_a_storm_of_timers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
