/*
 * test_redis_url: engine/redis_url.c's redis_url_split, table-driven, for
 * [redis] url (REDIS_URL_DB) and an events sink's url (REDIS_URL_STREAM):
 * userinfo holding '@', '/' and ':', percent-escapes, IPv6, ports, and
 * the errors of what is not a URL; and redis.c's redis_url_parse on top
 * (the database path, the AUTH it will send, a host resolved). No I/O but
 * the resolution of 127.0.0.1.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/redis.h"
#include "engine/redis_url.h"

struct ok_case {
    enum redis_url_kind kind;
    const char *url;
    const char *user, *password, *host;
    int port;
    const char *path;
};

static const struct ok_case ok_cases[] = {
    {REDIS_URL_DB, "redis://127.0.0.1", "", "", "127.0.0.1", 6379, ""},
    {REDIS_URL_DB, "127.0.0.1:6380", "", "", "127.0.0.1", 6380, ""},
    {REDIS_URL_DB, "REDIS://redis.example:6380/0", "", "", "redis.example", 6380, "0"},
    {REDIS_URL_DB, "redis://:secret@host", "", "secret", "host", 6379, ""},
    {REDIS_URL_DB, "redis://user:secret@host:1", "user", "secret", "host", 1, ""},
    {REDIS_URL_DB, "redis://secret@host", "", "secret", "host", 6379, ""}, /* redis-cli */
    /* the userinfo ends at the last '@' before the path */
    {REDIS_URL_DB, "redis://user:pa/ss@host:6379/2", "user", "pa/ss", "host", 6379, "2"},
    {REDIS_URL_DB, "redis://:p@ss@host/0", "", "p@ss", "host", 6379, "0"},
    {REDIS_URL_DB, "redis://:p/a@ss@host", "", "p/a@ss", "host", 6379, ""},
    {REDIS_URL_DB, "redis://u:a@b/c@d:e@host:7000", "u", "a@b/c@d:e", "host", 7000, ""},
    {REDIS_URL_DB, "redis://:a:b@host", "", "a:b", "host", 6379, ""},
    /* percent-escapes of the userinfo, decoded (redis-py, redis-cli) */
    {REDIS_URL_DB, "redis://:p%40ss%2Fx%25@host", "", "p@ss/x%", "host", 6379, ""},
    {REDIS_URL_DB, "redis://us%3Aer:p%3a%2f@host", "us:er", "p:/", "host", 6379, ""},
    {REDIS_URL_DB, "redis://:%E2%82%AC@host", "", "\xe2\x82\xac", "host", 6379, ""},
    {REDIS_URL_DB, "redis://[::1]:7000", "", "", "::1", 7000, ""},
    {REDIS_URL_DB, "redis://:p@[2001:db8::1]/0", "", "p", "2001:db8::1", 6379, "0"},
    {REDIS_URL_DB, "redis://:@host", "", "", "host", 6379, ""},
    {REDIS_URL_STREAM, "redis://host/s", "", "", "host", 6379, "s"},
    {REDIS_URL_STREAM, "redis://127.0.0.1:1234/sluice-events", "", "", "127.0.0.1", 1234,
     "sluice-events"},
    /* a stream's name may hold '@': an '@' with no '/' after it is the path's */
    {REDIS_URL_STREAM, "redis://ev:p/a@ss@127.0.0.1:1234/ev@s", "ev", "p/a@ss", "127.0.0.1", 1234,
     "ev@s"},
    {REDIS_URL_STREAM, "redis://host/str@m", "", "", "host", 6379, "str@m"},
    {REDIS_URL_STREAM, "redis://:p%2F@[::1]/a/b", "", "p/", "::1", 6379, "a/b"},
};

static void
test_ok(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(ok_cases) / sizeof(ok_cases[0]); i++) {
        const struct ok_case *c = &ok_cases[i];
        struct redis_url u;
        char err[256] = "";
        if (redis_url_split(c->url, c->kind, &u, err, sizeof(err)) != 0)
            fail_msg("%s: refused: %s", c->url, err);
        if (strcmp(u.user, c->user) != 0 || strcmp(u.password, c->password) != 0 ||
            strcmp(u.host, c->host) != 0 || u.port != c->port || strcmp(u.path, c->path) != 0)
            fail_msg("%s: user '%s' password '%s' host '%s' port %d path '%s'", c->url, u.user,
                     u.password, u.host, u.port, u.path);
    }
}

struct bad_case {
    enum redis_url_kind kind;
    const char *url;
    const char *says; /* in the error */
};

static const struct bad_case bad_cases[] = {
    {REDIS_URL_DB, "rediss://host", "only redis://"},
    {REDIS_URL_DB, "unix:///tmp/redis.sock", "only redis://"},
    {REDIS_URL_DB, "http://host", "expected redis://"},
    {REDIS_URL_DB, "redis://", "no host"},
    {REDIS_URL_DB, "redis://:secret@", "after the last '@': no host"},
    {REDIS_URL_DB, "redis://:secret@/0", "no host"},
    {REDIS_URL_DB, "redis://:secret@host:0", "bad port"},
    {REDIS_URL_DB, "redis://:secret@host:65536", "bad port"},
    {REDIS_URL_DB, "redis://:secret@host:99999999999999999999", "bad port"},
    {REDIS_URL_DB, "redis://:secret@host:", "bad port"},
    {REDIS_URL_DB, "redis://:secret@host:63x9", "bad port"},
    {REDIS_URL_DB, "redis://:secret@ho st", "bad host"},
    {REDIS_URL_DB, "redis://:secret@[::1", "without its ']'"},
    {REDIS_URL_DB, "redis://:secret@[::1]x", "unexpected character"},
    /* no character quoted after an '@': it may be the password's */
    {REDIS_URL_DB, "redis://:se@cret@h!st", "bad host: a character"},
    {REDIS_URL_DB, "redis://:secret@[zz]", "bad IPv6"},
    {REDIS_URL_DB, "redis://:secret@[cafe]", "bad IPv6"},
    {REDIS_URL_DB, "redis://:se%4@host", "bad percent-escape in the password"},
    {REDIS_URL_DB, "redis://:secret%@host", "bad percent-escape in the password"},
    {REDIS_URL_DB, "redis://:se%zzcret@host", "bad percent-escape in the password"},
    {REDIS_URL_DB, "redis://:se%00cret@host", "bad percent-escape in the password"},
    {REDIS_URL_DB, "redis://u%g0:secret@host", "bad percent-escape in the user"},
    {REDIS_URL_STREAM, "host/s", "expected redis://"},
    {REDIS_URL_STREAM, "redis://host", "no /STREAM"},
    {REDIS_URL_STREAM, "redis://host/", "no /STREAM"},
    /* with a path required, a password with '/' and no stream is not one */
    {REDIS_URL_STREAM, "redis://:secret/x@host", "no /STREAM"},
};

static void
test_bad(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++) {
        const struct bad_case *c = &bad_cases[i];
        struct redis_url u;
        char err[256] = "";
        if (redis_url_split(c->url, c->kind, &u, err, sizeof(err)) != -EINVAL)
            fail_msg("%s: taken: host '%s'", c->url, u.host);
        if (strstr(err, c->says) == NULL)
            fail_msg("%s: error '%s' does not say '%s'", c->url, err, c->says);
        if (strstr(err, "secret") != NULL || strstr(err, "se%") != NULL ||
            strstr(err, "'!'") != NULL || strstr(err, "cret") != NULL)
            fail_msg("%s: error '%s' quotes the password", c->url, err);
    }
}

/* Parts longer than the 255 octets a sink holds: refused, not cut. */
static void
test_too_long(void **state)
{
    (void)state;
    char url[700], big[300];
    memset(big, 'a', 256);
    big[256] = '\0';
    struct redis_url u;
    char err[256];
    snprintf(url, sizeof(url), "redis://:%s@host", big);
    assert_int_equal(redis_url_split(url, REDIS_URL_DB, &u, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "password longer than 255"));
    snprintf(url, sizeof(url), "redis://%s", big);
    assert_int_equal(redis_url_split(url, REDIS_URL_DB, &u, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "host longer than 255"));
    snprintf(url, sizeof(url), "redis://host/%s", big);
    assert_int_equal(redis_url_split(url, REDIS_URL_STREAM, &u, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "path longer than 255"));
    /* 255 escaped octets: 765 characters, still 255 octets */
    big[255] = '\0';
    char esc[800] = "redis://:";
    for (int i = 0; i < 255; i++)
        strcat(esc, "%41");
    strcat(esc, "@host");
    assert_int_equal(redis_url_split(esc, REDIS_URL_DB, &u, err, sizeof(err)), 0);
    assert_int_equal(strlen(u.password), 255);
}

/* redis.c on top: database 0 only, the AUTH it sends, the host resolved. */
static void
test_endpoint(void **state)
{
    (void)state;
    struct redis_endpoint ep;
    char err[256];
    assert_int_equal(
        redis_url_parse("redis://us%40er:p/a@ss%25@127.0.0.1:6380/0", &ep, err, sizeof(err)), 0);
    assert_string_equal(ep.user, "us@er");
    assert_string_equal(ep.password, "p/a@ss%");
    assert_string_equal(ep.ip, "127.0.0.1");
    assert_int_equal(ep.port, 6380);
    free(ep.user);
    free(ep.password);
    /* a password alone; an empty one is none */
    assert_int_equal(redis_url_parse("redis://p@ss@127.0.0.1", &ep, err, sizeof(err)), 0);
    assert_null(ep.user);
    assert_string_equal(ep.password, "p@ss");
    free(ep.password);
    assert_int_equal(redis_url_parse("redis://:@127.0.0.1", &ep, err, sizeof(err)), 0);
    assert_null(ep.user);
    assert_null(ep.password);
    assert_int_equal(redis_url_parse("redis://user:pa/ss@127.0.0.1:6379/2", &ep, err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "database numbers other than 0"));
    assert_null(ep.user);
    assert_null(ep.password);
    assert_int_equal(redis_url_parse("redis://:secret@127.0.0.1:0", &ep, err, sizeof(err)),
                     -EINVAL);
    assert_non_null(strstr(err, "redis url: after the last '@': bad port"));
    assert_null(strstr(err, "secret"));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ok),
        cmocka_unit_test(test_bad),
        cmocka_unit_test(test_too_long),
        cmocka_unit_test(test_endpoint),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
