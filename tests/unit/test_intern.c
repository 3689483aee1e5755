/*
 * test_intern: the engine's name table (common/intern.h): ids start at
 * 1, one id per name for the table's life, ids back to names, "none" for
 * empty and over-long names, concurrent interning from threads, and the
 * bound on names that clients choose (intern_id_bounded).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "common/intern.h"

static void
test_ids_and_names(void **state)
{
    (void)state;
    struct intern *t = intern_new();
    assert_non_null(t);
    assert_int_equal(intern_id(t, NULL), 0);
    assert_int_equal(intern_id(t, ""), 0);
    assert_null(intern_name(t, 0));
    assert_null(intern_name(t, 1));
    uint32_t a = intern_id(t, "acme"), b = intern_id(t, "bulk");
    assert_int_equal(a, 1);
    assert_int_equal(b, 2);
    assert_int_equal(intern_id(t, "acme"), a);
    assert_int_equal(intern_id(t, "Acme"), 3); /* exact names */
    assert_int_equal(intern_find(t, "acme"), a);
    assert_int_equal(intern_find(t, "nobody"), 0);
    assert_null(intern_name(t, 4)); /* find made nothing */
    assert_string_equal(intern_name(t, a), "acme");
    assert_string_equal(intern_name(t, b), "bulk");
    char longest[INTERN_NAME_MAX + 2];
    memset(longest, 'x', sizeof(longest));
    longest[INTERN_NAME_MAX] = '\0';
    uint32_t l = intern_id(t, longest);
    assert_int_equal(l, 4);
    assert_string_equal(intern_name(t, l), longest);
    longest[INTERN_NAME_MAX] = 'x';
    longest[INTERN_NAME_MAX + 1] = '\0';
    assert_int_equal(intern_id(t, longest), 0);
    uint64_t names, refused;
    intern_counts(t, &names, &refused);
    assert_int_equal(names, 4);
    assert_int_equal(refused, 1);
    /* across chunks: ids stay dense and their names stay put */
    char name[32];
    for (unsigned i = 0; i < 3 * INTERN_CHUNK; i++) {
        snprintf(name, sizeof(name), "campaign-%u", i);
        assert_int_equal(intern_id(t, name), 5 + i);
    }
    assert_string_equal(intern_name(t, 5 + 2 * INTERN_CHUNK), "campaign-2048");
    assert_string_equal(intern_name(t, a), "acme");
    intern_free(t);
}

struct racer {
    struct intern *t;
    uint32_t ids[500];
};

static void *
race(void *arg)
{
    struct racer *r = arg;
    char name[32];
    for (unsigned i = 0; i < 500; i++) {
        snprintf(name, sizeof(name), "tenant-%u", i);
        r->ids[i] = intern_id(r->t, name);
        const char *back = intern_name(r->t, r->ids[i]);
        if (back == NULL || strcmp(back, name) != 0)
            r->ids[i] = 0;
    }
    return NULL;
}

static void
test_threads(void **state)
{
    (void)state;
    struct intern *t = intern_new();
    struct racer r[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        r[i].t = t;
        assert_int_equal(pthread_create(&th[i], NULL, race, &r[i]), 0);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    for (unsigned k = 0; k < 500; k++) {
        assert_true(r[0].ids[k] != 0);
        for (int i = 1; i < 4; i++)
            assert_int_equal(r[i].ids[k], r[0].ids[k]);
    }
    uint64_t names, refused;
    intern_counts(t, &names, &refused);
    assert_int_equal(names, 500);
    intern_free(t);
}

/* Names of clients (intern_id_bounded): at most max of them are made;
 * past it a new one gets 0 and the refusals are counted; a name already
 * in the table, whoever made it, keeps its id; those of intern_id() do
 * not count against the bound. */
static void
test_bounded(void **state)
{
    (void)state;
    struct intern *t = intern_new();
    uint64_t over = 99;
    assert_int_equal(intern_id(t, "acme"), 1); /* a tenant, from the config */
    assert_int_equal(intern_id_bounded(t, "c1", 2, &over), 2);
    assert_int_equal(over, 0);
    assert_int_equal(intern_id_bounded(t, "acme", 2, &over), 1); /* not made: not counted */
    assert_int_equal(intern_id_bounded(t, "c2", 2, &over), 3);
    assert_int_equal(intern_id_bounded(t, "c3", 2, &over), 0);
    assert_int_equal(over, 1);
    assert_int_equal(intern_id_bounded(t, "c4", 2, &over), 0);
    assert_int_equal(over, 2);
    assert_int_equal(intern_id_bounded(t, "c1", 2, &over), 2); /* known names still resolve */
    assert_int_equal(over, 0);
    assert_int_equal(intern_id_bounded(t, "", 2, &over), 0);
    assert_int_equal(over, 0); /* "none" is not a refusal */
    assert_int_equal(intern_find(t, "c3"), 0);
    assert_int_equal(intern_id(t, "c3"), 4); /* an operator's pause may still name it */
    assert_int_equal(intern_id_bounded(t, "c3", 2, &over), 4);
    assert_int_equal(intern_id_bounded(t, "c5", 3, &over), 5); /* a larger bound (a reload) */
    uint64_t made, refused, names, nrefused;
    intern_bounded_counts(t, &made, &refused);
    assert_int_equal(made, 3);
    assert_int_equal(refused, 2);
    intern_counts(t, &names, &nrefused);
    assert_int_equal(names, 5);
    assert_int_equal(nrefused, 0); /* the table's own cap was not reached */
    intern_free(t);
}

struct bounded_racer {
    struct intern *t;
    unsigned base;
    unsigned got;
};

static void *
race_bounded(void *arg)
{
    struct bounded_racer *r = arg;
    char name[32];
    for (unsigned i = 0; i < 1000; i++) {
        uint64_t over;
        snprintf(name, sizeof(name), "c-%u-%u", r->base, i);
        r->got += intern_id_bounded(r->t, name, 1500, &over) != 0;
    }
    return NULL;
}

/* Four threads each offering 1000 new names against a bound of 1500:
 * exactly 1500 are made. */
static void
test_bounded_threads(void **state)
{
    (void)state;
    struct intern *t = intern_new();
    struct bounded_racer r[4];
    pthread_t th[4];
    for (unsigned i = 0; i < 4; i++) {
        r[i] = (struct bounded_racer){.t = t, .base = i};
        assert_int_equal(pthread_create(&th[i], NULL, race_bounded, &r[i]), 0);
    }
    unsigned got = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        got += r[i].got;
    }
    assert_int_equal(got, 1500);
    uint64_t made, refused;
    intern_bounded_counts(t, &made, &refused);
    assert_int_equal(made, 1500);
    assert_int_equal(refused, 2500);
    intern_free(t);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ids_and_names),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_bounded),
        cmocka_unit_test(test_bounded_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
