/*
 * test_json: the JSON writer places commas, escapes every string so that
 * it parses, and replaces bytes that are not UTF-8.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "common/json.h"

static void
test_nesting_and_commas(void **state)
{
    (void)state;
    struct json j;
    json_init(&j);
    json_obj_begin(&j);
    json_kstr(&j, "a", "x");
    json_ku64(&j, "b", 18446744073709551615ULL);
    json_key(&j, "c");
    json_arr_begin(&j);
    json_u64(&j, 1);
    json_obj_begin(&j);
    json_kbool(&j, "t", true);
    json_obj_end(&j);
    json_null(&j);
    json_arr_end(&j);
    json_key(&j, "d");
    json_obj_begin(&j);
    json_obj_end(&j);
    json_kstr(&j, "e", NULL);
    json_obj_end(&j);
    assert_false(json_failed(&j));
    assert_string_equal(j.buf,
                        "{\"a\":\"x\",\"b\":18446744073709551615,\"c\":[1,{\"t\":true},null],"
                        "\"d\":{},\"e\":null}");
    json_reset(&j);
    json_arr_begin(&j);
    json_i64(&j, -5);
    json_double(&j, 0.5);
    json_arr_end(&j);
    assert_string_equal(j.buf, "[-5,0.5]");
    json_fini(&j);
}

static void
test_escaping(void **state)
{
    (void)state;
    struct json j;
    json_init(&j);
    /* quote, backslash, controls, valid UTF-8, a lone continuation byte,
     * an overlong form, a surrogate, a truncated sequence at the end */
    const char in[] = "q\"b\\\n\r\t\x01 \xc3\xa9 \x80 \xc0\xaf \xed\xa0\x80 \xe2\x82";
    json_strn(&j, in, sizeof(in) - 1);
    assert_string_equal(j.buf, "\"q\\\"b\\\\\\n\\r\\t\\u0001 \xc3\xa9 \\ufffd \\ufffd\\ufffd "
                               "\\ufffd\\ufffd\\ufffd \\ufffd\\ufffd\"");
    json_fini(&j);
}

static void
test_time(void **state)
{
    (void)state;
    char b[40];
    assert_int_equal(json_format_time(b, sizeof(b), 1795401231123ULL), 24);
    assert_string_equal(b, "2026-11-23T02:33:51.123Z");
    assert_int_equal(json_format_time(b, sizeof(b), 0), 24);
    assert_string_equal(b, "1970-01-01T00:00:00.000Z");
}

static void
test_large(void **state)
{
    (void)state;
    struct json j;
    json_init(&j);
    json_arr_begin(&j);
    for (int i = 0; i < 100000; i++)
        json_str(&j, "0123456789");
    json_arr_end(&j);
    assert_false(json_failed(&j));
    assert_int_equal(j.len, 2 + 100000 * 13 - 1); /* "0123456789", */
    json_fini(&j);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nesting_and_commas),
        cmocka_unit_test(test_escaping),
        cmocka_unit_test(test_time),
        cmocka_unit_test(test_large),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
