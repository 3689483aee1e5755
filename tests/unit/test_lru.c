/*
 * test_lru: common/lru.h: nodes in order from the oldest end after
 * touch, age, insert_before (at the oldest end, in the middle, a node
 * already on the list moved) and remove, the count kept, and a removed
 * node's links cleared (removing it again changes nothing).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include "common/lru.h"

#define N 5

/* The list from its oldest end as node numbers, checked both ways. */
static void
expect(const struct lru *l, struct lru_node *nodes, const unsigned *want, size_t n)
{
    assert_int_equal(l->n, n);
    size_t i = 0;
    const struct lru_node *prev = NULL;
    for (const struct lru_node *x = l->oldest; x != NULL; prev = x, x = x->next) {
        assert_true(i < n);
        assert_ptr_equal(x, &nodes[want[i]]);
        assert_ptr_equal(x->prev, prev);
        assert_true(x->on);
        i++;
    }
    assert_int_equal(i, n);
    assert_ptr_equal(l->newest, prev);
}

static void
order_after_each_operation(void **state)
{
    (void)state;
    struct lru l;
    struct lru_node nodes[N] = {0};
    lru_init(&l);
    for (unsigned i = 0; i < 3; i++)
        lru_touch(&l, &nodes[i]);
    expect(&l, nodes, (unsigned[]){0, 1, 2}, 3);
    lru_touch(&l, &nodes[0]); /* to the recent end */
    expect(&l, nodes, (unsigned[]){1, 2, 0}, 3);
    lru_age(&l, &nodes[0]); /* back to the oldest */
    expect(&l, nodes, (unsigned[]){0, 1, 2}, 3);
    lru_insert_before(&l, &nodes[3], &nodes[0]); /* a new oldest */
    expect(&l, nodes, (unsigned[]){3, 0, 1, 2}, 4);
    lru_insert_before(&l, &nodes[4], &nodes[2]); /* in the middle */
    expect(&l, nodes, (unsigned[]){3, 0, 1, 4, 2}, 5);
    lru_insert_before(&l, &nodes[2], &nodes[0]); /* on the list: moved */
    expect(&l, nodes, (unsigned[]){3, 2, 0, 1, 4}, 5);
    lru_insert_before(&l, &nodes[1], &nodes[1]); /* before itself: stays */
    expect(&l, nodes, (unsigned[]){3, 2, 0, 1, 4}, 5);
    lru_remove(&l, &nodes[4]); /* the newest */
    expect(&l, nodes, (unsigned[]){3, 2, 0, 1}, 4);
    assert_false(nodes[4].on);
    assert_null(nodes[4].prev);
    assert_null(nodes[4].next);
    lru_remove(&l, &nodes[4]); /* again: nothing */
    lru_remove(&l, &nodes[3]); /* the oldest */
    expect(&l, nodes, (unsigned[]){2, 0, 1}, 3);
    assert_ptr_equal(lru_oldest(&l), &nodes[2]);
    for (unsigned i = 0; i < 3; i++)
        lru_remove(&l, &nodes[i]);
    expect(&l, nodes, NULL, 0);
    assert_null(lru_oldest(&l));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(order_after_each_operation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
