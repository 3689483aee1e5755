/*
 * test_workq: the thread pool queue of common/workq.h runs every item
 * once, in FIFO order on one thread, gives each thread its own scratch,
 * refuses past its bound, and drops what never started when freed.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/workq.h"

#define NITEMS 2000

struct item {
    struct workq_item q;
    unsigned n;
    _Atomic unsigned runs;
    _Atomic unsigned drops;
};

struct ctx {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    unsigned order[NITEMS];
    unsigned nrun;
    bool gate_open;      /* while false, run() waits: the queue fills up */
    _Atomic unsigned inits, finis;
    _Atomic unsigned scratch_mismatch;
};

static struct item *
item_of(struct workq_item *it)
{
    return (struct item *)((char *)it - offsetof(struct item, q));
}

static void *
t_init(void *c)
{
    struct ctx *x = c;
    atomic_fetch_add(&x->inits, 1);
    unsigned *s = malloc(sizeof(*s));
    *s = 0xfeed;
    return s;
}

static void
t_fini(void *c, void *scratch)
{
    struct ctx *x = c;
    atomic_fetch_add(&x->finis, 1);
    free(scratch);
}

static void
t_run(void *c, struct workq_item *wi, void *scratch)
{
    struct ctx *x = c;
    struct item *it = item_of(wi);
    if (scratch == NULL || *(unsigned *)scratch != 0xfeed)
        atomic_fetch_add(&x->scratch_mismatch, 1);
    pthread_mutex_lock(&x->lock);
    while (!x->gate_open)
        pthread_cond_wait(&x->cv, &x->lock);
    if (x->nrun < NITEMS)
        x->order[x->nrun] = it->n;
    x->nrun++;
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->lock);
    atomic_fetch_add(&it->runs, 1);
}

static void
t_drop(void *c, struct workq_item *wi)
{
    (void)c;
    atomic_fetch_add(&item_of(wi)->drops, 1);
}

static const struct workq_ops ops = {
    .thread_name = "test",
    .thread_init = t_init,
    .thread_fini = t_fini,
    .run = t_run,
    .drop = t_drop,
};

static void
ctx_init(struct ctx *x, bool open)
{
    memset(x, 0, sizeof(*x));
    pthread_mutex_init(&x->lock, NULL);
    pthread_cond_init(&x->cv, NULL);
    x->gate_open = open;
}

static void
wait_runs(struct ctx *x, unsigned n)
{
    pthread_mutex_lock(&x->lock);
    while (x->nrun < n)
        pthread_cond_wait(&x->cv, &x->lock);
    pthread_mutex_unlock(&x->lock);
}

static void
test_fifo_on_one_thread(void **state)
{
    (void)state;
    static struct item items[NITEMS];
    struct ctx x;
    ctx_init(&x, true);
    struct workq *q;
    assert_int_equal(workq_new(&ops, &x, 1, NITEMS, &q), 0);
    for (unsigned i = 0; i < NITEMS; i++) {
        memset(&items[i], 0, sizeof(items[i]));
        items[i].n = i;
        assert_int_equal(workq_submit(q, &items[i].q), 0);
    }
    wait_runs(&x, NITEMS);
    workq_free(q);
    for (unsigned i = 0; i < NITEMS; i++) {
        assert_int_equal(x.order[i], i);
        assert_int_equal(atomic_load(&items[i].runs), 1);
        assert_int_equal(atomic_load(&items[i].drops), 0);
    }
    assert_int_equal(atomic_load(&x.inits), 1);
    assert_int_equal(atomic_load(&x.finis), 1);
    assert_int_equal(atomic_load(&x.scratch_mismatch), 0);
}

static void
test_every_item_once_on_many_threads(void **state)
{
    (void)state;
    static struct item items[NITEMS];
    struct ctx x;
    ctx_init(&x, true);
    struct workq *q;
    assert_int_equal(workq_new(&ops, &x, 4, NITEMS, &q), 0);
    for (unsigned i = 0; i < NITEMS; i++) {
        memset(&items[i], 0, sizeof(items[i]));
        items[i].n = i;
        assert_int_equal(workq_submit(q, &items[i].q), 0);
    }
    wait_runs(&x, NITEMS);
    struct workq_stats st;
    workq_stats(q, &st);
    assert_int_equal(st.threads, 4);
    assert_int_equal(st.waiting, 0);
    workq_free(q);
    for (unsigned i = 0; i < NITEMS; i++)
        assert_int_equal(atomic_load(&items[i].runs), 1);
    assert_int_equal(atomic_load(&x.inits), 4);
    assert_int_equal(atomic_load(&x.finis), 4);
    assert_int_equal(atomic_load(&x.scratch_mismatch), 0);
}

/* One thread held in run(): the queue fills to its bound, then refuses;
 * freeing drops exactly the items never started, in order. */
static void
test_bound_and_drop(void **state)
{
    (void)state;
    static struct item items[6];
    struct ctx x;
    ctx_init(&x, false);
    struct workq *q;
    assert_int_equal(workq_new(&ops, &x, 1, 4, &q), 0);
    memset(items, 0, sizeof(items));
    assert_int_equal(workq_submit(q, &items[0].q), 0);
    /* Wait until the thread took item 0 (it waits at the gate). */
    for (unsigned spins = 0;; spins++) {
        assert_true(spins < 100000000u);
        struct workq_stats st;
        workq_stats(q, &st);
        if (st.waiting == 0)
            break;
        sched_yield();
    }
    for (unsigned i = 1; i <= 4; i++)
        assert_int_equal(workq_submit(q, &items[i].q), 0);
    assert_int_equal(workq_submit(q, &items[5].q), -EAGAIN);
    struct workq_stats st;
    workq_stats(q, &st);
    assert_int_equal(st.waiting, 4);
    assert_int_equal(st.refused, 1);
    /* Let item 0 finish while workq_free stops the thread. */
    pthread_mutex_lock(&x.lock);
    x.gate_open = true;
    pthread_cond_broadcast(&x.cv);
    pthread_mutex_unlock(&x.lock);
    wait_runs(&x, 1);
    workq_free(q);
    assert_int_equal(atomic_load(&items[0].runs), 1);
    unsigned ran = 0, dropped = 0;
    for (unsigned i = 1; i <= 4; i++) {
        ran += atomic_load(&items[i].runs);
        dropped += atomic_load(&items[i].drops);
        assert_int_equal(atomic_load(&items[i].runs) + atomic_load(&items[i].drops), 1);
    }
    assert_int_equal(ran + dropped, 4);
    assert_int_equal(atomic_load(&items[5].runs) + atomic_load(&items[5].drops), 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fifo_on_one_thread),
        cmocka_unit_test(test_every_item_once_on_many_threads),
        cmocka_unit_test(test_bound_and_drop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
