/*
 * test_slab: common/slab.h: objects of every size up to SLAB_MAX, apart
 * and aligned; sizes out of range refused; freed slots taken again
 * before a block is mapped; every block emptied is unmapped (the system
 * has its pages back: mincore says the address is no longer mapped),
 * except its class's last one; an object smaller than a pointer; slab_fini
 * with objects still in it.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/slab.h"

static bool
mapped(const void *p)
{
    long pg = sysconf(_SC_PAGESIZE);
    unsigned char v;
    void *page = (void *)((uintptr_t)p & ~(uintptr_t)(pg - 1));
    return mincore(page, (size_t)pg, &v) == 0 || errno != ENOMEM;
}

static void
test_sizes(void **state)
{
    (void)state;
    struct slab s;
    slab_init(&s);
    assert_null(slab_alloc(&s, 0));
    assert_null(slab_alloc(&s, SLAB_MAX + 1));
    char *objs[SLAB_MAX];
    for (size_t n = 1; n <= SLAB_MAX; n++) {
        objs[n - 1] = slab_alloc(&s, n);
        assert_non_null(objs[n - 1]);
        assert_int_equal((uintptr_t)objs[n - 1] % 16, 0);
        memset(objs[n - 1], (int)(n & 0xff), n);
    }
    assert_int_equal(s.objects, SLAB_MAX);
    assert_int_equal(s.blocks, SLAB_CLASSES);
    /* Sizes 1 and 2 share the first class: 32 octets apart. */
    assert_int_equal(objs[1] - objs[0], 32);
    /* Nobody wrote over anybody. */
    for (size_t n = 1; n <= SLAB_MAX; n++)
        for (size_t i = 0; i < n; i++)
            assert_int_equal((unsigned char)objs[n - 1][i], n & 0xff);
    for (size_t n = 1; n <= SLAB_MAX; n++)
        slab_free(&s, objs[n - 1]);
    slab_free(&s, NULL);
    assert_int_equal(s.objects, 0);
    assert_int_equal(s.blocks, SLAB_CLASSES); /* each class's last kept */
    slab_fini(&s);
    assert_int_equal(s.blocks, 0);
}

#define MANY 5000 /* of 64 octets: about five blocks */

static void
test_blocks_go_back(void **state)
{
    (void)state;
    struct slab s;
    slab_init(&s);
    void **p = calloc(MANY, sizeof(*p));
    assert_non_null(p);
    for (unsigned i = 0; i < MANY; i++) {
        p[i] = slab_alloc(&s, 50);
        assert_non_null(p[i]);
        memset(p[i], 0x5a, 50);
    }
    size_t full = s.blocks;
    assert_true(full >= 4);
    /* Every other one freed: no block is empty, none goes. */
    for (unsigned i = 0; i < MANY; i += 2)
        slab_free(&s, p[i]);
    assert_int_equal(s.blocks, full);
    assert_int_equal(s.objects, MANY / 2);
    /* The holes are taken before any block is mapped. */
    for (unsigned i = 0; i < MANY; i += 2) {
        p[i] = slab_alloc(&s, 60);
        assert_non_null(p[i]);
    }
    assert_int_equal(s.blocks, full);
    /* All freed: every block's pages are the system's again, but for the
     * one block kept. */
    uintptr_t base[16];
    size_t nbase = 0;
    for (unsigned i = 0; i < MANY; i++) {
        uintptr_t b = (uintptr_t)p[i] & ~(uintptr_t)(SLAB_BLOCK - 1);
        size_t k = 0;
        while (k < nbase && base[k] != b)
            k++;
        if (k == nbase) {
            assert_true(nbase < 16);
            base[nbase++] = b;
        }
    }
    assert_int_equal(nbase, full);
    for (size_t k = 0; k < nbase; k++)
        assert_true(mapped((void *)base[k]));
    for (unsigned i = 0; i < MANY; i++)
        slab_free(&s, p[i]);
    assert_int_equal(s.objects, 0);
    assert_int_equal(s.blocks, 1);
    size_t still = 0;
    for (size_t k = 0; k < nbase; k++)
        still += mapped((void *)base[k]);
    assert_int_equal(still, 1);
    /* The block kept serves the next object without a mapping. */
    void *again = slab_alloc(&s, 33);
    assert_non_null(again);
    assert_int_equal(s.blocks, 1);
    slab_free(&s, again);
    slab_fini(&s);
    free(p);
}

static void
test_fini_with_objects(void **state)
{
    (void)state;
    struct slab s;
    slab_init(&s);
    for (unsigned i = 0; i < 3000; i++)
        assert_non_null(slab_alloc(&s, 1 + i % SLAB_MAX));
    assert_int_equal(s.objects, 3000);
    slab_fini(&s);
    assert_int_equal(s.objects, 0);
    assert_int_equal(s.blocks, 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_blocks_go_back),
        cmocka_unit_test(test_fini_with_objects),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
