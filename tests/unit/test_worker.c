/*
 * Cross-thread messages: several threads post to one worker; every message
 * arrives exactly once, in posting order per sender, and worker_stop from
 * another thread ends the loop.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <cmocka.h>

#include "engine/worker.h"

#define SENDERS 4
#define PER_SENDER 50000

struct msg {
    struct worker_msg m;
    unsigned sender;
    unsigned seq;
};

struct state {
    struct worker w;
    struct msg *msgs; /* SENDERS * PER_SENDER */
    unsigned next_seq[SENDERS];
    unsigned received;
    unsigned out_of_order;
};

static struct state st;

static void
on_msg(struct worker *w, struct worker_msg *m)
{
    struct msg *x = (struct msg *)((char *)m - offsetof(struct msg, m));
    if (x->seq != st.next_seq[x->sender])
        st.out_of_order++;
    st.next_seq[x->sender] = x->seq + 1;
    if (++st.received == SENDERS * PER_SENDER)
        w->stopping = true;
}

static void *
sender(void *arg)
{
    unsigned id = (unsigned)(uintptr_t)arg;
    for (unsigned i = 0; i < PER_SENDER; i++) {
        struct msg *x = &st.msgs[id * PER_SENDER + i];
        x->m.fn = on_msg;
        x->sender = id;
        x->seq = i;
        worker_post(&st.w, &x->m);
    }
    return NULL;
}

static void
test_messages_all_arrive(void **state)
{
    (void)state;
    if (worker_init(&st.w, 0, 256, NULL) < 0)
        skip();
    st.msgs = calloc(SENDERS * PER_SENDER, sizeof(*st.msgs));
    assert_non_null(st.msgs);
    assert_int_equal(worker_start(&st.w), 0);
    pthread_t t[SENDERS];
    for (unsigned i = 0; i < SENDERS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, sender, (void *)(uintptr_t)i), 0);
    for (unsigned i = 0; i < SENDERS; i++)
        pthread_join(t[i], NULL);
    assert_int_equal(worker_join(&st.w), 0);
    assert_int_equal(st.received, SENDERS * PER_SENDER);
    assert_int_equal(st.out_of_order, 0);
    for (unsigned i = 0; i < SENDERS; i++)
        assert_int_equal(st.next_seq[i], PER_SENDER);
    /* many posts ride on one wake-up */
    assert_true(st.w.stats.msgs == SENDERS * PER_SENDER);
    worker_fini(&st.w);
    free(st.msgs);
}

static void
test_stop_from_other_thread(void **state)
{
    (void)state;
    struct worker w;
    if (worker_init(&w, 1, 64, NULL) < 0)
        skip();
    assert_int_equal(worker_start(&w), 0);
    worker_stop(&w);
    assert_int_equal(worker_join(&w), 0);
    assert_true(w.stopping);
    worker_fini(&w);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_messages_all_arrive),
        cmocka_unit_test(test_stop_from_other_thread),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
