/* Value parsers of common/conf.c: sizes, durations, rates, lists, bounds. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "common/conf.h"

static void
test_sizes(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        int rc;
        uint64_t v;
    } cases[] = {
        {"0", 0, 0},          {"512", 0, 512},           {"64K", 0, 65536},
        {"10M", 0, 10485760}, {"10MB", 0, 10485760},     {"2g", 0, 2147483648ULL},
        {"1T", 0, 1ULL << 40}, {"", -EINVAL, 0},         {"M", -EINVAL, 0},
        {"10X", -EINVAL, 0},  {"10 M", 0, 10485760},     {"-1", -EINVAL, 0},
        {"10M5", -EINVAL, 0}, {"99999999999999999999", -ERANGE, 0},
        {"20000000000T", -ERANGE, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint64_t v = 0;
        int rc = conf_parse_size(cases[i].in, &v);
        if (rc != cases[i].rc)
            fail_msg("size '%s': rc %d, want %d", cases[i].in, rc, cases[i].rc);
        if (rc == 0)
            assert_int_equal(v, cases[i].v);
    }
}

static void
test_durations(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        int rc;
        uint64_t ms;
    } cases[] = {
        {"30", 0, 30000},    {"30s", 0, 30000},  {"250ms", 0, 250}, {"5m", 0, 300000},
        {"2h", 0, 7200000},  {"3d", 0, 259200000}, {"1w", 0, 604800000},
        {"5min", 0, 300000}, {"s", -EINVAL, 0},  {"5 parsecs", -EINVAL, 0}, {"", -EINVAL, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint64_t v = 0;
        int rc = conf_parse_duration(cases[i].in, &v);
        if (rc != cases[i].rc)
            fail_msg("duration '%s': rc %d, want %d", cases[i].in, rc, cases[i].rc);
        if (rc == 0)
            assert_int_equal(v, cases[i].ms);
    }
}

static void
test_rates(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        int rc;
        uint32_t count, per_ms;
    } cases[] = {
        {"50/s", 0, 50, 1000},     {"3000/h", 0, 3000, 3600000}, {"100/min", 0, 100, 60000},
        {"100/m", 0, 100, 60000},  {"7/10s", 0, 7, 10000},       {"unlimited", 0, 0, 1000},
        {"0", 0, 0, 1000},         {"50", -EINVAL, 0, 0},         {"50/fortnight", -EINVAL, 0, 0},
        {"/s", -EINVAL, 0, 0},     {"0/s", -ERANGE, 0, 0},        {"5000000000/s", -ERANGE, 0, 0},
        {"50/s extra", -EINVAL, 0, 0}, {"5/second", 0, 5, 1000},   {"300/minute", 0, 300, 60000},
        {"2/hour", 0, 2, 3600000},     {"20000/d", 0, 20000, 86400000},
        {"9/day", 0, 9, 86400000},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct conf_rate r = {0, 0};
        int rc = conf_parse_rate(cases[i].in, &r);
        if (rc != cases[i].rc)
            fail_msg("rate '%s': rc %d, want %d", cases[i].in, rc, cases[i].rc);
        if (rc == 0) {
            assert_int_equal(r.count, cases[i].count);
            assert_int_equal(r.per_ms, cases[i].per_ms);
        }
    }
}

static void
test_duration_lists(void **state)
{
    (void)state;
    struct conf_durations d;
    assert_int_equal(conf_parse_durations("5m, 10m,1h ,4h", &d), 0);
    assert_int_equal(d.n, 4);
    assert_int_equal(d.ms[0], 300000);
    assert_int_equal(d.ms[3], 14400000);
    assert_int_equal(conf_parse_durations("5m,,1h", &d), -EINVAL);
    assert_int_equal(conf_parse_durations("", &d), -EINVAL);
    assert_int_equal(conf_parse_durations("0s", &d), -ERANGE);
    assert_int_equal(conf_parse_durations("1s,2s,3s,4s,5s,6s,7s,8s,9s,10s,11s,12s,13s,14s,15s,"
                                          "16s,17s",
                                          &d),
                     -EINVAL);
}

struct obj {
    unsigned n;
    uint64_t size;
    char *name;
    int color;
    bool flag;
};

static const char *const colors[] = {"red", "green", NULL};
static const struct conf_key keys[] = {
    {"n", CONF_UINT, offsetof(struct obj, n), 1, 10, "5", "", NULL},
    {"size", CONF_SIZE, offsetof(struct obj, size), 1024, 1 << 20, "64K", "", NULL},
    {"name", CONF_STRING, offsetof(struct obj, name), 1, 8, "abc", "", NULL},
    {"color", CONF_ENUM, offsetof(struct obj, color), 0, 0, "green", "", colors},
    {"flag", CONF_BOOL, offsetof(struct obj, flag), 0, 0, "yes", "", NULL},
    CONF_END,
};

static void
test_table(void **state)
{
    (void)state;
    struct obj o = {0};
    char err[256];
    assert_int_equal(conf_defaults(keys, &o, err, sizeof(err)), 0);
    assert_int_equal(o.n, 5);
    assert_int_equal(o.size, 65536);
    assert_string_equal(o.name, "abc");
    assert_int_equal(o.color, 1);
    assert_true(o.flag);

    assert_int_equal(conf_set(keys, &o, "nope", "1", err, sizeof(err)), -ENOENT);
    assert_int_equal(conf_set(keys, &o, "n", "11", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "out of range 1..10"));
    assert_int_equal(o.n, 5); /* unchanged on error */
    assert_int_equal(conf_set(keys, &o, "size", "2M", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "1K..1M"));
    assert_int_equal(conf_set(keys, &o, "size", "ten", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "expected a size"));
    assert_int_equal(conf_set(keys, &o, "name", "toolongname", err, sizeof(err)), -EINVAL);
    assert_int_equal(conf_set(keys, &o, "name", "", err, sizeof(err)), -EINVAL);
    assert_int_equal(conf_set(keys, &o, "name", "xyz", err, sizeof(err)), 0);
    assert_string_equal(o.name, "xyz");
    assert_int_equal(conf_set(keys, &o, "color", "blue", err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "red, green"));
    assert_int_equal(conf_set(keys, &o, "color", "RED", err, sizeof(err)), 0);
    assert_int_equal(o.color, 0);
    assert_int_equal(conf_set(keys, &o, "flag", "maybe", err, sizeof(err)), -EINVAL);

    struct obj copy;
    assert_int_equal(conf_copy(keys, &copy, &o, sizeof(o)), 0);
    assert_ptr_not_equal(copy.name, o.name);
    assert_string_equal(copy.name, "xyz");
    char out[64];
    conf_format(&keys[1], &o, out, sizeof(out));
    assert_string_equal(out, "64K");
    conf_free(keys, &copy);
    conf_free(keys, &o);
    assert_null(o.name);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizes),          cmocka_unit_test(test_durations),
        cmocka_unit_test(test_rates),          cmocka_unit_test(test_duration_lists),
        cmocka_unit_test(test_table),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
