/*
 * test_mta_sts: the MTA-STS policy parser, the TXT record parser and the
 * mx pattern match (engine/mta_sts_policy.c), table-driven, plus every split of
 * a policy at each byte (a policy body is parsed whole: a cut one must
 * fail or parse to a prefix, never crash), the TLS-RPT result types
 * read from OpenSSL's words, and the TLS report by mail (tlsrpt_mail_build):
 * its fields, and no field that could end a header line early or forge
 * another one; the report's JSON with DANE sessions (policy type tlsa, its
 * TLSA records, its failures), an MTA-STS policy and a failed fetch side
 * by side, and the same after the state file is read back. The store
 * itself is driven only through a worker's TXT answer
 * (mta_sts_txt_answer): which sets of _mta-sts records mean a policy
 * (a record without "v=STSv1;" is discarded, and hides no valid one);
 * and its cache file read back, corrupt lines and all; its sweep, which
 * forgets the domains mail no longer goes to and keeps those it does;
 * what a domain without a policy costs (10,000 of them, in the heap in
 * use: at most 96 octets each), and that the table shrinks
 * back once the sweep forgot them;
 * a policy that ended is checked once, not at every mail; a check that
 * failed on DNS is asked again after [dns] error_ttl, not recheck; one
 * that found no policy, after its answer's TTL (at least a floor); the
 * thread reads the answers of every resolver socket, past 16; and a
 * policy fetch leaves nothing in libcurl once it ended (its
 * CURLOPT_RESOLVE entry), counted through curl_global_init_mem. And a
 * TLS-RPT record's rua list over 1 KB, answered by a UDP socket of the
 * test, is read whole: its last address gets the report by mail; and
 * only a field of its own is the rua list, not "rua=" inside another.
 *
 * The store decides on the wall clock (clock_unix_ms): the times these
 * tests hold it to ("not before error_ttl") are read on that clock too,
 * which this binary moves (tests/support/wall_clock.h) rather than wait
 * where the decision is taken at mta_sts_get, on the test's thread. Only
 * deadlines (a test that would hang) are monotonic.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <curl/curl.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/slab.h"
#include "dns/dns.h"
#include "engine/config.h"
#include "engine/mta_sts.h"
#include "engine/tlsrpt.h"
#include "tests/support/wall_clock.h"

static void
test_policy_table(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        int ok;
        int mode;
        unsigned nmx;
        uint64_t max_age;
    } cases[] = {
        {"version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n", 1,
         MTA_STS_ENFORCE, 1, 86400},
        {"version: STSv1\r\nmode: testing\r\nmx: *.example.net\r\nmx: mx1.example.com\r\n"
         "max_age: 604800\r\n",
         1, MTA_STS_TESTING, 2, 604800},
        {"version: STSv1\nmode: none\nmax_age: 10\n", 1, MTA_STS_NONE, 0, 10},
        {"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 99999999999\n", 0, 0, 0, 0},
        {"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n", 1,
         MTA_STS_ENFORCE, 1, MTA_STS_MAX_AGE},
        {"version: STSv1\nmode: enforce\nmax_age: 86400\n", 0, 0, 0, 0}, /* no mx */
        /* RFC 8461 3.2: any order; version need not come first */
        {"mode: enforce\nversion: STSv1\nmx: a.example\nmax_age: 1\n", 1, MTA_STS_ENFORCE, 1, 1},
        {"mx: a.example\nmax_age: 7\nmode: testing\nversion: STSv1\n", 1, MTA_STS_TESTING, 1, 7},
        {"future: x\r\nversion: STSv1\r\nmode: none\r\nmax_age: 5\r\n", 1, MTA_STS_NONE, 0, 5},
        /* ... and of a repeated non-mx field the first stands, the others
         * are ignored, whatever they hold */
        {"version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 9\nmax_age: 1\n", 1,
         MTA_STS_ENFORCE, 1, 9},
        {"version: STSv1\nversion: STSv2\nmode: testing\nmode: bogus\nmx: a.example\n"
         "max_age: 3\nmax_age: -1\n",
         1, MTA_STS_TESTING, 1, 3},
        {"version: STSv2\nversion: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n", 0, 0, 0, 0},
        {"mode: strict\nmode: enforce\nversion: STSv1\nmx: a.example\nmax_age: 1\n", 0, 0, 0, 0},
        {"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", 0, 0, 0, 0},
        {"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", 0, 0, 0, 0},
        {"version: STSv1\nmode: enforce\nmx: a.example\n", 0, 0, 0, 0},
        {"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", 0, 0, 0, 0},
        {"version: STSv1\nmode: enforce\nmx: mx*.example\nmax_age: 1\n", 0, 0, 0, 0},
        {"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n", 0, 0, 0, 0},
        {"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\nfuture: x\n", 1,
         MTA_STS_ENFORCE, 1, 1},
        {"<html>hello</html>", 0, 0, 0, 0},
        {"", 0, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct mta_sts_policy *p = NULL;
        const char *why = NULL;
        int rc = mta_sts_policy_parse(cases[i].text, strlen(cases[i].text), &p, &why);
        if (!cases[i].ok) {
            if (rc == 0)
                fail_msg("case %zu parsed: %s", i, cases[i].text);
            assert_null(p);
            assert_non_null(why);
            continue;
        }
        if (rc != 0)
            fail_msg("case %zu: %s", i, why);
        assert_int_equal(p->mode, cases[i].mode);
        assert_int_equal(p->nmx, cases[i].nmx);
        assert_int_equal(p->max_age, cases[i].max_age);
        mta_sts_policy_unref(p);
    }
}

static void
test_policy_every_split(void **state)
{
    (void)state;
    const char *text = "version: STSv1\r\nmode: enforce\r\nmx: *.example.net\r\nmax_age: 86400\r\n";
    size_t n = strlen(text);
    for (size_t cut = 0; cut <= n; cut++) {
        char *buf = malloc(cut + 1); /* exactly the cut: ASan sees a read past it */
        memcpy(buf, text, cut);
        struct mta_sts_policy *p = NULL;
        const char *why = NULL;
        int rc = mta_sts_policy_parse(buf, cut, &p, &why);
        if (rc == 0) {
            assert_true(cut >= strlen("version: STSv1\r\nmode: enforce\r\nmx: *.example.net\r\n"
                                      "max_age: 8"));
            mta_sts_policy_unref(p);
        }
        free(buf);
    }
}

/* More mx lines than are kept: the first MTA_STS_MAX_MX stand, the
 * parser goes on to the end (fuzz_mta_sts found it looping). */
static void
test_policy_many_mx(void **state)
{
    (void)state;
    char text[8192];
    size_t n = (size_t)snprintf(text, sizeof(text), "version: STSv1\nmode: enforce\n");
    for (int i = 0; i < MTA_STS_MAX_MX + 8; i++)
        n += (size_t)snprintf(text + n, sizeof(text) - n, "mx: mx%d.example.com\n", i);
    n += (size_t)snprintf(text + n, sizeof(text) - n, "max_age: 60\n");
    struct mta_sts_policy *p = NULL;
    const char *why = NULL;
    assert_int_equal(mta_sts_policy_parse(text, n, &p, &why), 0);
    assert_int_equal(p->nmx, MTA_STS_MAX_MX);
    assert_int_equal(p->max_age, 60);
    assert_true(mta_sts_match(p, "mx0.example.com"));
    mta_sts_policy_unref(p);
}

static void
test_match(void **state)
{
    (void)state;
    struct mta_sts_policy *p = NULL;
    const char *why;
    const char *text = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmx: *.Example.NET\n"
                       "max_age: 1\n";
    assert_int_equal(mta_sts_policy_parse(text, strlen(text), &p, &why), 0);
    assert_true(mta_sts_match(p, "mx.example.com"));
    assert_true(mta_sts_match(p, "MX.EXAMPLE.COM."));
    assert_true(mta_sts_match(p, "a.example.net"));
    assert_false(mta_sts_match(p, "example.net"));
    assert_false(mta_sts_match(p, "a.b.example.net"));
    assert_false(mta_sts_match(p, "mx.example.com.evil.test"));
    assert_false(mta_sts_match(p, "xmx.example.com"));
    assert_false(mta_sts_match(NULL, "mx.example.com"));
    mta_sts_policy_unref(p);
}

/* A policy takes the octets its patterns need: policies are kept for
 * their max_age whether used or not, one per policy domain ever met.
 * Room for 32 patterns of 255 octets each made every one 8 KB. */
static void
test_policy_size(void **state)
{
    (void)state;
    struct mta_sts_policy *p = NULL;
    const char *why;
    const char *text = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\n"
                       "max_age: 86400\n";
    assert_int_equal(mta_sts_policy_parse(text, strlen(text), &p, &why), 0);
    size_t got = malloc_usable_size(p);
    assert_int_equal(p->nmx, 2);
    assert_string_equal(p->mx[0], "mx1.example.com");
    assert_string_equal(p->mx[1], "*.example.net");
    mta_sts_policy_unref(p);
    if (got > 1024)
        fail_msg("a policy of two mx patterns takes %zu octets", got);
    /* the most it holds still fits, each pattern whole */
    char big[MTA_STS_MAX_MX * 300 + 128];
    size_t n = (size_t)snprintf(big, sizeof(big), "version: STSv1\nmode: testing\nmax_age: 60\n");
    char label[64];
    memset(label, 'a', 63);
    label[63] = '\0';
    for (unsigned i = 0; i < MTA_STS_MAX_MX + 2; i++)
        n += (size_t)snprintf(big + n, sizeof(big) - n, "mx: m%02u.%s.%s.%s.example\n", i, label,
                              label, label);
    assert_int_equal(mta_sts_policy_parse(big, n, &p, &why), 0);
    assert_int_equal(p->nmx, MTA_STS_MAX_MX);
    for (unsigned i = 0; i < MTA_STS_MAX_MX; i++) {
        char want[300];
        snprintf(want, sizeof(want), "m%02u.%s.%s.%s.example", i, label, label, label);
        assert_string_equal(p->mx[i], want);
    }
    mta_sts_policy_unref(p);
}

/* An mx pattern written as a fully qualified name ("mx.example.com.")
 * is taken by the parser, so it must match the host it names: stored as
 * the host is compared (no trailing dot), not kept verbatim and matched
 * by nothing (enforce would then refuse every MX of the domain). A NUL
 * inside an mx line is no host name. */
static void
test_match_trailing_dot(void **state)
{
    (void)state;
    struct mta_sts_policy *p = NULL;
    const char *why;
    const char *text = "version: STSv1\nmode: enforce\nmx: MX.Example.COM.\nmx: *.example.org.\n"
                       "max_age: 60\n";
    assert_int_equal(mta_sts_policy_parse(text, strlen(text), &p, &why), 0);
    assert_int_equal(p->nmx, 2);
    assert_string_equal(p->mx[0], "mx.example.com");
    assert_string_equal(p->mx[1], "*.example.org");
    assert_true(mta_sts_match(p, "mx.example.com"));
    assert_true(mta_sts_match(p, "mx.example.com."));
    assert_true(mta_sts_match(p, "a.example.org"));
    assert_false(mta_sts_match(p, "example.org"));
    mta_sts_policy_unref(p);

    static const char nul[] = "version: STSv1\nmode: enforce\nmx: mx.example.com\0.evil\n"
                              "max_age: 60\n";
    p = NULL;
    assert_int_equal(mta_sts_policy_parse(nul, sizeof(nul) - 1, &p, &why), -EINVAL);
    assert_null(p);
}

static void
test_txt(void **state)
{
    (void)state;
    char id[33];
    assert_int_equal(mta_sts_txt_parse("v=STSv1; id=20160831085700Z;", id), 0);
    assert_string_equal(id, "20160831085700Z");
    assert_int_equal(mta_sts_txt_parse("v=STSv1;id=abc", id), 0);
    assert_string_equal(id, "abc");
    assert_int_equal(mta_sts_txt_parse("v=STSv1; ext=1; id=x1 ", id), 0);
    assert_string_equal(id, "x1");
    assert_int_equal(mta_sts_txt_parse("v=spf1 -all", id), -ENOENT);
    assert_int_equal(mta_sts_txt_parse("v=STSv10; id=1", id), -ENOENT);
    assert_int_equal(mta_sts_txt_parse("v=STSv1;", id), -EINVAL);
    assert_int_equal(mta_sts_txt_parse("v=STSv1; id=a-b", id), -EINVAL);
    assert_int_equal(mta_sts_txt_parse("v=STSv1; id=123456789012345678901234567890123", id),
                     -EINVAL);
    /* RFC 8461 3.1's grammar: fields come after ";" (sts-field-delim =
     * *WSP ";" *WSP); a record that does not begin with the version
     * and a ";" is no STSv1 record, one that does and breaks the
     * grammar after it is broken. */
    static const struct {
        const char *txt;
        int rc;
        const char *id;
    } cases[] = {
        {"v=STSv1 ; id=a1", 0, "a1"},
        {"v=STSv1;\tid=a1\t;\t", 0, "a1"},
        {"v=STSv1; id=a1; ext_1.x-y=v:a/l", 0, "a1"},
        {"v=STSv1; id=a1; id=b2", 0, "b2"}, /* the grammar lets a field repeat */
        {"v=STSv1 id=x", -ENOENT, NULL},
        {"v=STSv1 is not a policy", -ENOENT, NULL},
        {"v=STSv1", -ENOENT, NULL},
        {" v=STSv1; id=a1", -ENOENT, NULL},
        {"V=STSv1; id=a1", -ENOENT, NULL},
        {"v=STSv1; id=a1 id=b2", -EINVAL, NULL},
        {"v=STSv1; id=a1 junk", -EINVAL, NULL},
        {"v=STSv1;; id=a1", -EINVAL, NULL},
        {"v=STSv1; id=a1; ext", -EINVAL, NULL},
        {"v=STSv1; id=a1; ext=", -EINVAL, NULL},
        {"v=STSv1; id=a1; =v", -EINVAL, NULL},
        {"v=STSv1; id=a1; _x=v", -EINVAL, NULL},
        {"v=STSv1; id=a1; x=a=b", -EINVAL, NULL},
        {"v=STSv1; id=a1; x=\x7f", -EINVAL, NULL},
        {"v=STSv1; ID=a1", -EINVAL, NULL},
        {"v=STSv1; id =a1", -EINVAL, NULL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int rc = mta_sts_txt_parse(cases[i].txt, id);
        if (rc != cases[i].rc)
            fail_msg("\"%s\": %d, not %d", cases[i].txt, rc, cases[i].rc);
        if (rc == 0 && strcmp(id, cases[i].id) != 0)
            fail_msg("\"%s\": id %s, not %s", cases[i].txt, id, cases[i].id);
    }
}

/* A store whose resolver asks a socket that never answers (nothing but
 * the test moves a domain), its cache file in a directory of its own,
 * that file written first from cache_text when it is not NULL. */
struct store {
    int mute;
    char dir[64], conf[128], cache[128];
    struct config *cfg;
    struct mta_sts *m;
};

/* As store_new, with the resolver's timeout (one try) given: queries to
 * the mute socket fail after it; dns_extra: more [dns] lines ("" none);
 * servers: [dns] servers (NULL: the mute socket); tail: more [mta_sts]
 * lines, and sections after it ("" none). */
static void
store_new_conf(struct store *s, const char *cache_text, const char *dns_timeout,
               const char *dns_extra, const char *servers, const char *tail)
{
    wall_clock_ahead_ms = 0; /* a test that failed half-way left it moved */
    s->mute = socket(AF_INET, SOCK_DGRAM, 0);
    assert_true(s->mute >= 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(s->mute, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(s->mute, (struct sockaddr *)&sin, &sl), 0);
    snprintf(s->dir, sizeof(s->dir), "/tmp/sluice-mta-sts-XXXXXX");
    assert_non_null(mkdtemp(s->dir));
    snprintf(s->conf, sizeof(s->conf), "%s/sluice.conf", s->dir);
    snprintf(s->cache, sizeof(s->cache), "%s/mta-sts.cache", s->dir);
    char text[2048], err[256], mute[32];
    snprintf(mute, sizeof(mute), "127.0.0.1:%u", ntohs(sin.sin_port));
    int n = snprintf(text, sizeof(text),
                     "[server]\nhostname = relay.test\n"
                     "[dns]\nservers = %s\ntimeout = %s\ntries = 1\n%s"
                     "[mta_sts]\ntlsrpt = no\nfetch_timeout = 60s\n%s",
                     servers != NULL ? servers : mute, dns_timeout, dns_extra, tail);
    assert_true(n > 0 && (size_t)n < sizeof(text));
    FILE *f = fopen(s->conf, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    if (cache_text != NULL) {
        f = fopen(s->cache, "w");
        assert_non_null(f);
        assert_int_equal(fputs(cache_text, f) >= 0, 1);
        fclose(f);
    }
    s->cfg = NULL;
    assert_int_equal(config_load(s->conf, &s->cfg, stderr), 0);
    s->m = NULL;
    if (mta_sts_new(s->cfg, s->cache, &s->m, err, sizeof(err)) != 0)
        fail_msg("mta_sts_new: %s", err);
}

static void
store_new_dns(struct store *s, const char *cache_text, const char *dns_timeout,
              const char *dns_extra, const char *servers)
{
    store_new_conf(s, cache_text, dns_timeout, dns_extra, servers, "");
}

static void
store_new_timeout(struct store *s, const char *cache_text, const char *dns_timeout)
{
    store_new_dns(s, cache_text, dns_timeout, "", NULL);
}

static void
store_new(struct store *s, const char *cache_text)
{
    store_new_timeout(s, cache_text, "60s");
}

static void
store_free(struct store *s)
{
    wall_clock_ahead_ms = 0;
    s->m = mta_sts_free(s->m);
    s->cfg = config_free(s->cfg);
    close(s->mute);
    unlink(s->cache);
    unlink(s->conf);
    rmdir(s->dir);
}

/* RFC 8461 3.1: beside a valid STSv1 record, a second one that is
 * broken (an id that is not 1..32 alphanumerics) leaves the domain
 * without a policy, as two valid ones do: the number of STSv1 records is
 * not one. Driven through mta_sts_txt_answer (a worker's TXT answer):
 * with no policy the check ends there (READY, none); with one the thread
 * would fetch it (WAIT). */
static void
test_txt_answer_broken_second_record(void **state)
{
    (void)state;
    struct store s;
    store_new(&s, NULL);
    struct mta_sts *m = s.m;

    struct mta_sts_policy *p = NULL;
    const char *one_bad[] = {"v=STSv1; id=20261202", "v=STSv1; id=not-an-id"};
    assert_int_equal(mta_sts_get(m, "mixed.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "mixed.test", DNS_OK, "ok", one_bad, 2, 3600);
    assert_int_equal(mta_sts_get(m, "mixed.test", true, &p), MTA_STS_READY);
    assert_null(p);

    const char *two[] = {"v=STSv1; id=1", "v=STSv1; id=2"};
    assert_int_equal(mta_sts_get(m, "two.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "two.test", DNS_OK, "ok", two, 2, 3600);
    assert_int_equal(mta_sts_get(m, "two.test", true, &p), MTA_STS_READY);
    assert_null(p);

    /* One valid record among others that are not STSv1: fetched. */
    const char *other[] = {"v=spf1 -all", "v=STSv1; id=1"};
    assert_int_equal(mta_sts_get(m, "one.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "one.test", DNS_OK, "ok", other, 2, 3600);
    assert_int_equal(mta_sts_get(m, "one.test", true, &p), MTA_STS_WAIT);

    /* RFC 8461 3.1: records that do not begin with "v=STSv1;" are
     * discarded; such a one beside the real record does not hide it. */
    const char *decoy[] = {"v=STSv1 is not a policy", "v=STSv1; id=1"};
    assert_int_equal(mta_sts_get(m, "decoy.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "decoy.test", DNS_OK, "ok", decoy, 2, 3600);
    assert_int_equal(mta_sts_get(m, "decoy.test", true, &p), MTA_STS_WAIT);

    /* And alone, a record without the ";" is no policy. */
    const char *nodelim[] = {"v=STSv1 id=1"};
    assert_int_equal(mta_sts_get(m, "nodelim.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "nodelim.test", DNS_OK, "ok", nodelim, 1, 3600);
    assert_int_equal(mta_sts_get(m, "nodelim.test", true, &p), MTA_STS_READY);
    assert_null(p);

    struct mta_sts_stats st;
    mta_sts_stats(m, &st);
    assert_int_equal(st.checks, 5);
    store_free(&s);
}

/* The sweep forgets the domains without a policy that mail has not used
 * for a while, not those whose last check is old: used.test, checked
 * once and then used all along, stays known (its mail never waits for a
 * first check again) while idle.test, checked at the same time and not
 * used since, goes. SLUICE_TEST_MTA_STS_FORGET shortens "a while" (ten
 * minutes, at least recheck: an hour here) to 2 s: used.test's mail comes
 * every 20 ms, and a pause of the test longer than "a while" (a loaded
 * machine stalls it) would leave it unused that long. "Not before its
 * time" is read on the store's clock (the wall clock): on the monotonic
 * one, a step of the wall clock would fail a right store. The clock is
 * not moved here: the sweep runs every 1 s of the monotonic clock
 * (a while / 2), and a wall clock run faster would let a sweep that
 * forgets too early pass. */
static void
test_sweep_keeps_domains_in_use(void **state)
{
    (void)state;
    assert_int_equal(setenv("SLUICE_TEST_MTA_STS_FORGET", "2000", 1), 0);
    struct store s;
    store_new(&s, NULL);
    unsetenv("SLUICE_TEST_MTA_STS_FORGET");
    struct mta_sts *m = s.m;
    struct mta_sts_policy *p = NULL;
    const char *names[] = {"used.test", "idle.test"};
    uint64_t start = clock_unix_ms(); /* before idle.test's check: "a while" is from that */
    for (int i = 0; i < 2; i++) {
        assert_int_equal(mta_sts_get(m, names[i], true, &p), MTA_STS_ASK);
        mta_sts_txt_answer(m, names[i], DNS_NOT_FOUND, "NXDOMAIN", NULL, 0, 3600);
    }
    struct mta_sts_stats st;
    mta_sts_stats(m, &st);
    assert_int_equal(st.domains, 2);
    /* Mail for used.test every 20 ms until the sweep took idle.test. */
    uint64_t deadline = clock_mono_ms() + 20000;
    unsigned uses = 0;
    do {
        enum mta_sts_answer a = mta_sts_get(m, "used.test", false, &p);
        if (a != MTA_STS_READY)
            fail_msg("used.test forgotten after %llu ms (%u uses): answer %d",
                     (unsigned long long)(clock_unix_ms() - start), uses, (int)a);
        assert_null(p);
        uses++;
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
        mta_sts_stats(m, &st);
    } while (st.domains == 2 && clock_mono_ms() < deadline);
    assert_int_equal(st.domains, 1);
    uint64_t took = clock_unix_ms() - start;
    if (took < 2000) /* not before its time */
        fail_msg("idle.test forgotten %llu ms after its check, before 2000",
                 (unsigned long long)took);
    /* used.test is the one left: known, no first check; idle.test is new. */
    assert_int_equal(mta_sts_get(m, "used.test", true, &p), MTA_STS_READY);
    assert_int_equal(mta_sts_get(m, "idle.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "idle.test", DNS_NOT_FOUND, "NXDOMAIN", NULL, 0, 3600);
    store_free(&s);
}

#if defined(__SANITIZE_ADDRESS__)
/* ASan's, from <sanitizer/allocator_interface.h> (not installed with
 * every compiler): the octets its malloc handed out and not freed. */
size_t __sanitizer_get_current_allocated_bytes(void);
#endif

/* The heap in use now, in octets: glibc's (mallinfo2: the arenas' chunks
 * in use and the mmapped ones), or ASan's when it replaces malloc. */
static size_t
heap_in_use(void)
{
#if defined(__SANITIZE_ADDRESS__)
    return __sanitizer_get_current_allocated_bytes();
#else
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
#endif
}

/* A domain without a policy is remembered for an hour after its last
 * use (recheck), so a bulk sender's store holds every new domain of the
 * last hour: each must cost what answering mta_sts_get needs (its name,
 * its place in the table, its last check and verdict), not a check's
 * state (curl handle, body, addresses, the id to fetch) that only a
 * domain being checked uses. 10,000 first contacts answered "no record"
 * by the worker (the common case) hold at most 96 octets each, the
 * table's buckets (malloc's heap) and the entries' blocks (the store's
 * slab, entry_bytes) included; with the check's fields in every entry
 * they held about 220. */
static void
test_no_policy_domain_is_small(void **state)
{
    (void)state;
    struct store s;
    store_new(&s, NULL);
    struct mta_sts *m = s.m;
    struct mta_sts_policy *p = NULL;
    enum { N = 10000 };
    char name[64];
    size_t before = heap_in_use();
    for (unsigned i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "d%05u.example", i); /* 13 octets, as "example.com" */
        assert_int_equal(mta_sts_get(m, name, true, &p), MTA_STS_ASK);
        mta_sts_txt_answer(m, name, DNS_NOT_FOUND, "NXDOMAIN", NULL, 0, 3600);
    }
    size_t after = heap_in_use();
    struct mta_sts_stats st;
    mta_sts_stats(m, &st);
    assert_int_equal(st.domains, N);
    assert_int_equal(st.inflight, 0);
    /* The entries are in the slab: 64-octet objects, blocks filled in turn. */
    assert_true(st.entry_bytes >= (uint64_t)N * 64);
    assert_true(st.entry_bytes <= ((uint64_t)N * 64 / (SLAB_BLOCK - 64) + 2) * SLAB_BLOCK);
    /* Known, without a policy, and not asked again. */
    for (unsigned i = 0; i < N; i += 997) {
        snprintf(name, sizeof(name), "d%05u.example", i);
        assert_int_equal(mta_sts_get(m, name, true, &p), MTA_STS_READY);
        assert_null(p);
    }
    size_t per = (after > before ? after - before : 0) / N + st.entry_bytes / N;
    print_message("no-policy domain: %zu octets each (%zu of heap and %llu of slab for %u)\n",
                  per, after - before, (unsigned long long)st.entry_bytes, (unsigned)N);
    if (per > 96)
        fail_msg("a domain without a policy costs %zu octets", per);
    store_free(&s);
}

/* Once the sweep forgot a burst of new domains, the table they were in
 * shrinks too: 10,000 domains grew it to 16,384 buckets (128 KB), which
 * stayed for good when only the entries went. With the sweep shortened
 * to 300 ms (SLUICE_TEST_MTA_STS_FORGET), the heap in use comes back to
 * within 32 KB of where it was before the burst, and the entries' slab
 * to one block. */
static void
test_sweep_shrinks_table(void **state)
{
    (void)state;
    assert_int_equal(setenv("SLUICE_TEST_MTA_STS_FORGET", "300", 1), 0);
    struct store s;
    store_new(&s, NULL);
    unsetenv("SLUICE_TEST_MTA_STS_FORGET");
    struct mta_sts *m = s.m;
    struct mta_sts_policy *p = NULL;
    char name[64];
    size_t before = heap_in_use();
    for (unsigned i = 0; i < 10000; i++) {
        snprintf(name, sizeof(name), "d%05u.example", i);
        assert_int_equal(mta_sts_get(m, name, true, &p), MTA_STS_ASK);
        mta_sts_txt_answer(m, name, DNS_NOT_FOUND, "NXDOMAIN", NULL, 0, 3600);
    }
    size_t full = heap_in_use();
    struct mta_sts_stats st;
    mta_sts_stats(m, &st); /* (the sweep may have begun forgetting) */
    assert_true(st.domains > 0);
    assert_true(st.entry_bytes >= st.domains * 64); /* in the slab */
    /* The sweep removes and compacts under the lock the count is read
     * under: at 0 domains, the table has shrunk if it ever will. */
    uint64_t deadline = clock_mono_ms() + 10000;
    do {
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
        mta_sts_stats(m, &st);
    } while (st.domains != 0 && clock_mono_ms() < deadline);
    assert_int_equal(st.domains, 0);
    size_t after = heap_in_use();
    print_message("heap: %zu before, %zu with 10,000 domains, %zu once forgotten\n", before,
                  full, after);
    if (after > before + 32 * 1024)
        fail_msg("%zu octets more in use after the domains were forgotten", after - before);
    /* The entries' blocks went back to the system: one kept at most. */
    assert_true(st.entry_bytes <= SLAB_BLOCK);
    store_free(&s);
}

/* Once a policy ended, one check follows at the next mail, and then
 * the domain is asked again after recheck (an hour here), or after
 * [dns] error_ttl (10 s, the default) when that check failed on DNS as
 * here, not at every mail while its checks fail (a policy server that is
 * down, a policy of max_age 0): the resolver answers nothing and gives up
 * after 100 ms, so each check ends quickly. The policy is used until
 * its end and not after, on the store's clock, which the test moves on
 * (100 ms at each mail, 20 ms apart) instead of waiting for the end. */
static void
test_ended_policy_checked_once(void **state)
{
    (void)state;
    wall_clock_ahead_ms = 0;
    unsigned long long now = clock_unix_ms();
    char text[256];
    /* a policy that ends two seconds from now (to the ms: one fetched at
     * the start of the current second with a max_age of 1 could end
     * before a busy machine loaded it) */
    snprintf(text, sizeof(text), "sluice-mta-sts 1\nend.test 1 enforce 2 %llu mx.end.test\n", now);
    struct store s;
    store_new_timeout(&s, text, "100ms");
    struct mta_sts *m = s.m;
    struct mta_sts_stats st;
    mta_sts_stats(m, &st);
    assert_int_equal(st.policies, 1);
    struct mta_sts_policy *p = NULL;
    uint64_t deadline = clock_mono_ms() + 10000;
    /* Mail every 20 ms: under the policy, then (it ended) without it:
     * the store read its clock between the test's two readings. */
    for (;;) {
        uint64_t before = clock_unix_ms();
        assert_int_equal(mta_sts_get(m, "end.test", false, &p), MTA_STS_READY);
        uint64_t after = clock_unix_ms();
        if (p == NULL) {
            if (after < now + 2000)
                fail_msg("the policy left %llu ms after its fetch, before its max_age (2 s)",
                         (unsigned long long)(after - now));
            break;
        }
        if (before >= now + 2000)
            fail_msg("the policy still used %llu ms after its fetch, past its max_age (2 s)",
                     (unsigned long long)(before - now));
        p = mta_sts_policy_unref(p);
        assert_true(clock_mono_ms() < deadline);
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
        wall_clock_ahead_ms += 100;
    }
    /* The checks so far (the first mail's, a loaded policy being due
     * for one, and the one the end calls for) end: they fail. */
    do {
        assert_true(clock_mono_ms() < deadline);
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
        mta_sts_stats(m, &st);
    } while (st.checks < 1 || st.inflight > 0 || st.queued > 0);
    uint64_t checks = st.checks;
    assert_true(checks <= 2);
    /* Five seconds of mail after them on the store's clock (fifty
     * resolver timeouts; less than error_ttl even if they were seen to
     * end up to 5 s late), 80 ms at each mail: no other check. */
    uint64_t until = clock_unix_ms() + 5000;
    while (clock_unix_ms() < until) {
        assert_int_equal(mta_sts_get(m, "end.test", false, &p), MTA_STS_READY);
        assert_null(p);
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
        wall_clock_ahead_ms += 80;
    }
    do { /* a check queued by the last mail is counted when it starts */
        assert_true(clock_mono_ms() < deadline + 10000);
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
        mta_sts_stats(m, &st);
    } while (st.inflight > 0 || st.queued > 0);
    assert_int_equal(st.checks, checks);
    store_free(&s);
}

/* A first check that met a DNS failure (a timeout, SERVFAIL) is asked
 * again after [dns] error_ttl (1.5 s here: above its 1 s floor, so that
 * the floor alone does not pass for it), not after recheck (an hour):
 * an enforce domain is not left to opportunistic TLS for an hour by one
 * timeout. And not sooner, nor more often: with a resolver that never
 * answers (the mute socket, 100 ms a try), mail every 20 ms costs one
 * check per error_ttl and timeout, not one per mail. A domain whose
 * cached policy is in force keeps it through a DNS failure and is asked
 * again only after recheck. The times are the store's (the wall clock),
 * which the test moves on rather than wait: 1 s at once, then 20 ms at
 * each mail, 20 ms apart. */
static void
test_dns_failure_retried_after_error_ttl(void **state)
{
    (void)state;
    wall_clock_ahead_ms = 0;
    unsigned long long now = clock_unix_ms();
    char text[256];
    /* a policy in force for a day */
    snprintf(text, sizeof(text), "sluice-mta-sts 1\nkept.test 1 enforce 86400 %llu mx.kept.test\n",
             now);
    struct store s;
    store_new_dns(&s, text, "100ms", "error_ttl = 1500ms\n", NULL);
    struct mta_sts *m = s.m;
    struct mta_sts_policy *p = NULL;
    struct mta_sts_stats st;

    /* kept.test: loaded, so due for a check at first use; it fails. */
    assert_int_equal(mta_sts_get(m, "kept.test", false, &p), MTA_STS_READY);
    assert_non_null(p);
    p = mta_sts_policy_unref(p);
    uint64_t deadline = clock_mono_ms() + 10000;
    do {
        assert_true(clock_mono_ms() < deadline);
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
        mta_sts_stats(m, &st);
    } while (st.checks < 1 || st.inflight > 0 || st.queued > 0);
    assert_int_equal(st.checks, 1);

    /* fail.test: its first check (a worker's TXT lookup) times out.
     * start is read on the store's clock before the answer error_ttl
     * counts from, so that a time measured from it is never shorter than
     * the store's: "not before 1.5 s" holds of a right store however
     * late the test runs. */
    uint64_t start = clock_unix_ms();
    assert_int_equal(mta_sts_get(m, "fail.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "fail.test", DNS_RETRY, "timeout", NULL, 0, DNS_TTL_UNKNOWN);
    mta_sts_stats(m, &st);
    assert_int_equal(st.checks, 2);
    /* 1 s passes at once: a store that kept to error_ttl's floor (1 s)
     * and not to error_ttl asks at the next mail, seen before 1.5 s. */
    wall_clock_ahead_ms += 1000;
    /* Mail for both every 20 ms until 2.5 s passed on the store's clock,
     * and on until fail.test was asked again (due at 1.5 s: the thread
     * that asks may come late on a loaded machine; 20 s of the monotonic
     * clock, 41 of the store's, is an hour's recheck ruled out). again:
     * when the third check was first seen (read after the count, so not
     * earlier than it). */
    deadline = clock_mono_ms() + 20000;
    uint64_t again = 0;
    for (;;) {
        assert_int_equal(mta_sts_get(m, "fail.test", true, &p), MTA_STS_READY);
        assert_null(p);
        assert_int_equal(mta_sts_get(m, "kept.test", true, &p), MTA_STS_READY);
        assert_non_null(p);
        p = mta_sts_policy_unref(p);
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
        mta_sts_stats(m, &st);
        uint64_t e = clock_unix_ms() - start;
        if (st.checks >= 3 && again == 0)
            again = e;
        if (clock_mono_ms() >= deadline || (e >= 2500 && st.checks >= 3))
            break;
        wall_clock_ahead_ms += 20;
    }
    mta_sts_stats(m, &st);
    uint64_t elapsed = clock_unix_ms() - start; /* after the count: an upper bound on its time */
    print_message("%llu checks in %llu ms, the third seen at %llu ms\n",
                  (unsigned long long)st.checks, (unsigned long long)elapsed,
                  (unsigned long long)again);
    /* Asked again: at least once more, not before error_ttl (the same
     * clock as the store's, read the same way), and at most once per
     * error_ttl since (each after a 100 ms timeout and 1.5 s more). */
    if (st.checks < 3 || again < 1500 || st.checks > 2 + elapsed / 1500)
        fail_msg("%llu checks in %llu ms, the third seen at %llu ms", (unsigned long long)st.checks,
                 (unsigned long long)elapsed, (unsigned long long)again);
    store_free(&s);
}

/* A wall clock that steps back after a check: mta_sts_get computed
 * now - checked_ms unsigned, which wrapped to a huge time since the
 * check, and the domain was checked again at once, at every step back
 * (the sweep already keeps such an entry: now <= last). Now it is as a
 * check that just ended: not due at the step, and due again after its
 * wait (error_ttl, 2 s here, after a DNS failure) counted from the
 * step, not only once the clock is back past the check's stamp (10 s
 * later here). The store's clock is moved, not waited for. */
static void
test_clock_stepped_back_is_just_checked(void **state)
{
    (void)state;
    struct store s;
    store_new_dns(&s, NULL, "100ms", "error_ttl = 2s\n", NULL);
    struct mta_sts *m = s.m;
    struct mta_sts_policy *p = NULL;
    struct mta_sts_stats st;
    assert_int_equal(mta_sts_get(m, "back.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "back.test", DNS_RETRY, "timeout", NULL, 0, DNS_TTL_UNKNOWN);
    mta_sts_stats(m, &st);
    assert_int_equal(st.checks, 1);
    /* 10 s back: mail for it, and for a second no check (queued at the
     * mail, in flight for the 100 ms of the mute resolver, or counted) */
    wall_clock_ahead_ms = -10000;
    assert_int_equal(mta_sts_get(m, "back.test", true, &p), MTA_STS_READY);
    assert_null(p);
    uint64_t until = clock_mono_ms() + 1000;
    do {
        mta_sts_stats(m, &st);
        if (st.checks != 1 || st.queued != 0 || st.inflight != 0)
            fail_msg("checked again at once after the clock stepped back 10 s: checks %llu "
                     "queued %llu in flight %llu",
                     (unsigned long long)st.checks, (unsigned long long)st.queued,
                     (unsigned long long)st.inflight);
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    } while (clock_mono_ms() < until);
    /* 2.5 s after the step (still 7.5 s before the check's stamp): due */
    wall_clock_ahead_ms = -10000 + 2500;
    assert_int_equal(mta_sts_get(m, "back.test", true, &p), MTA_STS_READY);
    assert_null(p);
    uint64_t deadline = clock_mono_ms() + 10000;
    do {
        assert_true(clock_mono_ms() < deadline);
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
        mta_sts_stats(m, &st);
    } while (st.checks < 2 || st.inflight > 0 || st.queued > 0);
    assert_int_equal(st.checks, 2);
    store_free(&s);
}

/* A domain whose TXT answer said "no policy" for a short time (its TTL,
 * or its SOA's negative TTL) is asked again once that ran out, not only
 * after recheck (an hour): one that starts publishing a policy is seen
 * then. Its mail does not wait: the check runs on the thread (against
 * the mute socket here: it times out after 100 ms). TTLs count in whole
 * minutes (2 s here, SLUICE_TEST_MTA_STS_TTL_UNIT), at least one: a TTL
 * of 0 does not ask at every mail (every 20 ms here); a TTL longer than
 * recheck, or none known, leaves recheck. The times are the store's (the
 * wall clock), which the test moves on rather than wait: 1.5 s at once,
 * then 20 ms at each mail, 20 ms apart. */
static void
test_no_policy_asked_again_after_ttl(void **state)
{
    (void)state;
    assert_int_equal(setenv("SLUICE_TEST_MTA_STS_TTL_UNIT", "2000", 1), 0);
    struct store s;
    store_new_timeout(&s, NULL, "100ms");
    unsetenv("SLUICE_TEST_MTA_STS_TTL_UNIT");
    struct mta_sts *m = s.m;
    struct mta_sts_policy *p = NULL;
    struct mta_sts_stats st;
    uint64_t start = clock_unix_ms(); /* the store's clock, before the answer its TTL counts from */
    assert_int_equal(mta_sts_get(m, "short.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "short.test", DNS_NOT_FOUND, "NXDOMAIN", NULL, 0, 0);
    assert_int_equal(mta_sts_get(m, "long.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "long.test", DNS_NOT_FOUND, "NXDOMAIN", NULL, 0, 7200);
    assert_int_equal(mta_sts_get(m, "unknown.test", true, &p), MTA_STS_ASK);
    mta_sts_txt_answer(m, "unknown.test", DNS_NOT_FOUND, "no TXT record", NULL, 0,
                       DNS_TTL_UNKNOWN);
    mta_sts_stats(m, &st);
    assert_int_equal(st.checks, 3);
    /* 1.5 s passes at once: a store that asked before the TTL's unit
     * does so at the next mail, seen before 2 s. */
    wall_clock_ahead_ms += 1500;
    /* Mail for all three every 20 ms until 2.6 s passed on the store's
     * clock: short.test's "no" ends at 2 s, its check (queued then)
     * times out 100 ms of the monotonic clock later, and the next is due
     * [dns] error_ttl (10 s, the default) after that: one check. The
     * thread may ask late on a loaded machine: then the mail goes on
     * until the check is seen (20 s of the monotonic clock at most, 41 of
     * the store's: not recheck's hour). */
    uint64_t deadline = clock_mono_ms() + 20000;
    uint64_t first = 0;
    for (;;) {
        uint64_t e = clock_unix_ms() - start;
        if (clock_mono_ms() >= deadline || (e >= 2600 && first != 0))
            break;
        const char *names[] = {"short.test", "long.test", "unknown.test"};
        for (int i = 0; i < 3; i++) {
            assert_int_equal(mta_sts_get(m, names[i], true, &p), MTA_STS_READY);
            assert_null(p);
        }
        mta_sts_stats(m, &st);
        if (st.checks > 3 && first == 0)
            first = clock_unix_ms() - start;
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
        wall_clock_ahead_ms += 20;
    }
    mta_sts_stats(m, &st);
    if (st.checks != 4)
        fail_msg("%llu checks (3 first ones): short.test asked again %s",
                 (unsigned long long)st.checks, st.checks < 4 ? "never" : "more than once");
    /* (start was read before the answer the TTL counts from, first after
     * the count that saw the check, both on the store's clock: a right
     * store's check is never seen sooner than 2 s) */
    print_message("short.test asked again after %llu ms\n", (unsigned long long)first);
    if (first < 2000)
        fail_msg("short.test asked again after %llu ms, before its TTL's floor (a unit, 2 s)",
                 (unsigned long long)first);
    store_free(&s);
}

/* A UDP socket on ::1, on a port of four digits from *port on (config
 * lines are short: 17 servers fit only so), its port in *port; -1 when
 * IPv6 has no loopback here. */
static int
udp6_socket(unsigned *port)
{
    int fd = socket(AF_INET6, SOCK_DGRAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in6 sin = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    for (; *port <= 9999; (*port)++) {
        sin.sin6_port = htons((uint16_t)*port);
        if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) == 0)
            return fd;
        if (errno != EADDRINUSE && errno != EACCES)
            break;
    }
    close(fd);
    return -1;
}

/* The thread watches every socket of its resolver, however many servers
 * [dns] servers lists: 16 servers that never answer, then one that
 * answers NXDOMAIN, each asked in turn (tries = 1, 250 ms each: the
 * test's answer must come within a try, and a loaded machine may take
 * more than 50 ms to read the query and answer it). The
 * resolver's socket to the last is its 17th: its answer must be read
 * (the check ends no_record), not left unread until the query times out
 * (dns_failed), as when only 16 sockets were watched. On ::1 (a config
 * line holds 198 characters: 17 IPv4 servers do not fit). */
static void
test_many_dns_sockets_watched(void **state)
{
    (void)state;
    enum { MUTE = 16 };
    int mute[MUTE + 1];
    char servers[1024];
    size_t o = 0;
    unsigned port = 2000 + (unsigned)(getpid() % 4000);
    for (int i = 0; i <= MUTE; i++) {
        mute[i] = udp6_socket(&port);
        if (mute[i] < 0) {
            while (i-- > 0)
                close(mute[i]);
            skip(); /* no IPv6 loopback, or no port free */
        }
        o += (size_t)snprintf(servers + o, sizeof(servers) - o, "%s[::1]:%u", i > 0 ? "," : "",
                              port++);
    }
    int ans = mute[MUTE];
    char logpath[] = "/tmp/sluice-mta-sts-log-XXXXXX";
    int lfd = mkstemp(logpath);
    assert_true(lfd >= 0);
    close(lfd);
    enum log_level level = log_get_level();
    assert_int_equal(log_open(logpath, LOG_DEBUG), 0);
    struct store s;
    store_new_dns(&s, NULL, "250ms", "", servers);
    struct mta_sts *m = s.m;
    struct mta_sts_policy *p = NULL;

    /* Not asked by a worker: the thread asks; answer as the 17th server
     * until the check ended. */
    unsigned answered = 0;
    uint64_t deadline = clock_mono_ms() + 20000;
    while (mta_sts_get(m, "many.test", false, &p) == MTA_STS_WAIT) {
        assert_true(clock_mono_ms() < deadline);
        struct pollfd pfd = {.fd = ans, .events = POLLIN};
        if (poll(&pfd, 1, 20) != 1)
            continue;
        uint8_t q[512];
        struct sockaddr_in6 from;
        socklen_t fl = sizeof(from);
        ssize_t n = recvfrom(ans, q, sizeof(q), 0, (struct sockaddr *)&from, &fl);
        size_t end = 12;
        while (n > 12 && end < (size_t)n && q[end] != 0)
            end += 1 + q[end];
        end += 5; /* the root label, type and class */
        if (n < 12 || end > (size_t)n)
            continue;
        q[2] = (uint8_t)(0x80 | (q[2] & 0x79)); /* a response, RD kept */
        q[3] = 0x80 | 3;                         /* RA, NXDOMAIN */
        memset(q + 6, 0, 6);                     /* the question alone */
        assert_int_equal(sendto(ans, q, end, 0, (struct sockaddr *)&from, fl), (ssize_t)end);
        answered++;
    }
    assert_null(p);
    store_free(&s);
    log_open("stderr", level);

    FILE *f = fopen(logpath, "r");
    assert_non_null(f);
    char line[1024], result[1024] = "none";
    while (fgets(line, sizeof(line), f) != NULL)
        if (strstr(line, "event=mta_sts_checked domain=many.test ") != NULL)
            snprintf(result, sizeof(result), "%s", line);
    fclose(f);
    unlink(logpath);
    for (int i = 0; i <= MUTE; i++)
        close(mute[i]);
    if (answered == 0 || strstr(result, " result=no_record ") == NULL)
        fail_msg("%u answers; the check: %s", answered, result);
}

/* libcurl's allocations alive now: libcurl allocates through these
 * (curl_global_init_mem in main, before anything starts libcurl), so the
 * test sees what the thread's handles hold. */
static atomic_long curl_blocks;

static void *
cm_malloc(size_t n)
{
    void *p = malloc(n);
    if (p != NULL)
        atomic_fetch_add(&curl_blocks, 1);
    return p;
}

static void
cm_free(void *p)
{
    if (p != NULL)
        atomic_fetch_sub(&curl_blocks, 1);
    free(p);
}

static void *
cm_realloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (p == NULL && q != NULL)
        atomic_fetch_add(&curl_blocks, 1);
    else if (p != NULL && n == 0 && q == NULL)
        atomic_fetch_sub(&curl_blocks, 1);
    return q;
}

static char *
cm_strdup(const char *s)
{
    char *p = strdup(s);
    if (p != NULL)
        atomic_fetch_add(&curl_blocks, 1);
    return p;
}

static void *
cm_calloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (p != NULL)
        atomic_fetch_add(&curl_blocks, 1);
    return p;
}

/* Answer one query on fd, if one came within wait_ms: A with
 * 127.0.0.1, any other type with no data. Returns true when one came. */
static bool
answer_a_loopback(int fd, int wait_ms)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    if (poll(&pfd, 1, wait_ms) != 1)
        return false;
    uint8_t q[512 + 16];
    struct sockaddr_in from;
    socklen_t fl = sizeof(from);
    ssize_t n = recvfrom(fd, q, 512, 0, (struct sockaddr *)&from, &fl);
    size_t end = 12;
    while (n > 12 && end < (size_t)n && q[end] != 0)
        end += 1 + q[end];
    end += 5; /* the root label, type and class */
    if (n < 12 || end > (size_t)n)
        return true;
    bool a = q[end - 4] == 0 && q[end - 3] == 1;
    q[2] = (uint8_t)(0x80 | (q[2] & 0x79)); /* a response, RD kept */
    q[3] = 0x80;                             /* RA, NOERROR */
    memset(q + 6, 0, 6);                     /* the question, and ... */
    if (a) {
        static const uint8_t rr[] = {0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1};
        q[7] = 1; /* ... one answer */
        memcpy(q + end, rr, sizeof(rr));
        end += sizeof(rr);
    }
    assert_int_equal(sendto(fd, q, end, 0, (struct sockaddr *)&from, fl), (ssize_t)end);
    return true;
}

/* Fetch the policies of domain i..i+n-1 (dN.test), each found by a
 * worker's TXT answer, until every fetch ended (it fails: nothing
 * listens on the policy port), answering the thread's address queries
 * meanwhile. */
static void
fetch_many(struct store *s, int dns, unsigned i, unsigned n)
{
    struct mta_sts_stats st;
    mta_sts_stats(s->m, &st);
    uint64_t failed = st.fetch_failed + n;
    const char *rec[] = {"v=STSv1; id=1"};
    for (unsigned k = i; k < i + n; k++) {
        char name[32];
        struct mta_sts_policy *p = NULL;
        snprintf(name, sizeof(name), "d%u.test", k);
        assert_int_equal(mta_sts_get(s->m, name, true, &p), MTA_STS_ASK);
        mta_sts_txt_answer(s->m, name, DNS_OK, "ok", rec, 1, 3600);
    }
    uint64_t deadline = clock_mono_ms() + 30000;
    do {
        assert_true(clock_mono_ms() < deadline);
        if (answer_a_loopback(dns, 20))
            while (answer_a_loopback(dns, 0)) /* every query waiting */
                ;
        mta_sts_stats(s->m, &st);
    } while (st.fetch_failed < failed || st.inflight > 0 || st.queued > 0);
    assert_int_equal(st.fetch_failed, failed);
    assert_int_equal(st.fetches, failed);
}

/* What a policy fetch gives libcurl (its CURLOPT_RESOLVE entry,
 * "mta-sts.DOMAIN:PORT:ADDR") is gone when the fetch ends: after 10
 * fetches, 100 more for other domains leave libcurl holding no more than
 * before. In the multi handle's DNS cache, such an entry stayed for
 * good (it never expires), one per domain ever fetched: memory that
 * grew with every new domain. Nothing listens on the policy port, so
 * each fetch fails at connect, after curl took the entry. */
static void
test_fetch_leaves_nothing_in_curl(void **state)
{
    (void)state;
    int dns = socket(AF_INET, SOCK_DGRAM, 0);
    int closed = socket(AF_INET, SOCK_STREAM, 0); /* bound, never listening: refused */
    assert_true(dns >= 0 && closed >= 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(dns, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(dns, (struct sockaddr *)&sin, &sl), 0);
    char servers[32], tail[160];
    snprintf(servers, sizeof(servers), "127.0.0.1:%u", ntohs(sin.sin_port));
    sin.sin_port = 0;
    sl = sizeof(sin);
    assert_int_equal(bind(closed, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(closed, (struct sockaddr *)&sin, &sl), 0);
    snprintf(tail, sizeof(tail), "fetch_port = %u\n[delivery]\nallow_networks = 127.0.0.0/8\n",
             ntohs(sin.sin_port));
    struct store s;
    store_new_conf(&s, NULL, "30s", "", servers, tail); /* a busy machine: no query times out */

    fetch_many(&s, dns, 0, 10);
    long before = atomic_load(&curl_blocks);
    fetch_many(&s, dns, 10, 100);
    long after = atomic_load(&curl_blocks);
    /* A few blocks of slack (libcurl's tables grow in steps), not one
     * per domain. */
    if (after - before > 10)
        fail_msg("libcurl holds %ld more blocks after 100 more fetches (%ld before)",
                 after - before, before);
    store_free(&s);
    close(dns);
    close(closed);
}

/* The TXT record one query asks for: answer it on fd (which got it
 * within 20 ms, or nothing is done) with one TXT record of text, in
 * strings of 255 octets at most. Returns true when it answered. */
static bool
answer_txt(int fd, const char *text)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    if (poll(&pfd, 1, 20) != 1)
        return false;
    uint8_t q[4096];
    struct sockaddr_in from;
    socklen_t fl = sizeof(from);
    ssize_t n = recvfrom(fd, q, 512, 0, (struct sockaddr *)&from, &fl);
    size_t end = 12;
    while (n > 12 && end < (size_t)n && q[end] != 0)
        end += 1 + q[end];
    end += 5; /* the root label, type and class */
    if (n < 12 || end > (size_t)n)
        return false;
    q[2] = (uint8_t)(0x80 | (q[2] & 0x79)); /* a response, RD kept */
    q[3] = 0x80;                             /* RA, NOERROR */
    memset(q + 6, 0, 6);
    q[7] = 1; /* one answer */
    size_t len = strlen(text), rdlen = len + (len + 254) / 255;
    uint8_t rr[] = {0xc0, 12, 0, 16, 0, 1, 0, 0, 0, 60, (uint8_t)(rdlen >> 8), (uint8_t)rdlen};
    assert_true(end + sizeof(rr) + rdlen <= sizeof(q));
    memcpy(q + end, rr, sizeof(rr));
    end += sizeof(rr);
    for (size_t o = 0; o < len; o += 255) {
        size_t l = len - o < 255 ? len - o : 255;
        q[end++] = (uint8_t)l;
        memcpy(q + end, text + o, l);
        end += l;
    }
    assert_int_equal(sendto(fd, q, end, 0, (struct sockaddr *)&from, fl), (ssize_t)end);
    return true;
}

struct rua_fx {
    int dns_fd; /* the resolver's socket (one server: one socket) */
    char rcpt[512];
    unsigned mailed;
};

static void
rua_sock(void *arg, int fd, bool readable, bool writable)
{
    struct rua_fx *f = arg;
    f->dns_fd = readable || writable ? fd : -1;
}

static int
rua_mail(void *arg, const char *from, const char *rcpt, const char *text, size_t len)
{
    (void)from;
    (void)text;
    (void)len;
    struct rua_fx *f = arg;
    snprintf(f->rcpt, sizeof(f->rcpt), "%s", rcpt);
    f->mailed++;
    return 0;
}

/* Report long.example's day (one failed fetch) with rec as its
 * _smtp._tls TXT record, answered from a UDP socket of the test; the
 * address the report was mailed to into rcpt ("" none). */
static void
rua_mailed_to(const char *rec, char *rcpt, size_t cap)
{
    struct store s;
    store_new(&s, NULL); /* for its config and directory */
    int srv = socket(AF_INET, SOCK_DGRAM, 0);
    assert_true(srv >= 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(srv, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(srv, (struct sockaddr *)&sin, &sl), 0);
    struct dns_config dc = s.cfg->dns;
    char server[32];
    snprintf(server, sizeof(server), "127.0.0.1:%u", ntohs(sin.sin_port));
    dc.servers = server;

    struct rua_fx f = {.dns_fd = -1};
    char err[256];
    struct dns *d = NULL;
    if (dns_new(&dc, rua_sock, &f, &d, err, sizeof(err)) < 0)
        fail_msg("dns_new: %s", err);
    struct tlsrpt *r = NULL;
    assert_int_equal(tlsrpt_new(s.cfg, s.dir, &r, err, sizeof(err)), 0);
    tlsrpt_set_mailer(r, rua_mail, &f);
    tlsrpt_record(r, "long.example", NULL, TLSRPT_STS_POLICY_FETCH_ERROR, NULL, NULL);
    tlsrpt_tick(r, d, NULL, true); /* asks _smtp._tls.long.example */
    uint64_t deadline = clock_mono_ms() + 10000;
    unsigned answered = 0;
    /* Until the day is done: sent (an address took it) or not. */
    while (tlsrpt_sent(r) + tlsrpt_failed(r) == 0 && clock_mono_ms() < deadline) {
        answered += answer_txt(srv, rec);
        if (f.dns_fd >= 0) {
            struct pollfd pfd = {.fd = f.dns_fd, .events = POLLIN};
            if (poll(&pfd, 1, 0) == 1)
                dns_process_fd(d, f.dns_fd, true, false);
        }
        uint64_t now = clock_mono_ms() * 1000000ULL;
        if (dns_timeout(d, now) <= now)
            dns_process_timeouts(d);
    }
    uint64_t done = tlsrpt_sent(r) + tlsrpt_failed(r);
    tlsrpt_set_mailer(r, NULL, NULL);
    r = tlsrpt_free(r, NULL);
    d = dns_free(d);
    close(srv);
    char path[sizeof(s.dir) + 32];
    snprintf(path, sizeof(path), "%s/tlsrpt.state", s.dir);
    unlink(path);
    store_free(&s);
    assert_int_equal(answered, 1);
    assert_int_equal(done, 1);
    assert_true(f.mailed <= 1);
    snprintf(rcpt, cap, "%s", f.mailed > 0 ? f.rcpt : "");
}

/* A TLS-RPT record whose rua list is over 1 KB: its last address gets
 * the report as written. The list was copied into 1024 octets, and this
 * one, cut there, ended in mailto:tlsrpt@reports.example.co: a
 * truncated URI that still parses, so the report went to another
 * domain. The first address (not https: nor mailto:) is skipped. */
static void
test_tlsrpt_long_rua_whole(void **state)
{
    (void)state;
    static const char last[] = "mailto:tlsrpt@reports.example.com";
    char rec[1200], rcpt[512];
    int n = snprintf(rec, sizeof(rec), "v=TLSRPTv1; rua=ftp://pad/");
    /* the list (after "rua=") 1024 octets long: cut to 1023, it loses
     * the last "m" */
    while ((size_t)n < 16 + 1024 - (sizeof(last) - 1) - 1)
        rec[n++] = 'x';
    snprintf(rec + n, sizeof(rec) - (size_t)n, ",%s", last);
    assert_int_equal(strlen(rec), 16 + 1024);
    rua_mailed_to(rec, rcpt, sizeof(rcpt));
    assert_string_equal(rcpt, "tlsrpt@reports.example.com");
}

/* RFC 8460 3: rua is a field of its own (after a ";"); "rua=" inside an
 * extension field (xrua=..., a valid tlsrpt-ext-name) is no address: it
 * was taken for the rua list, the first "rua=" in the record. */
static void
test_tlsrpt_rua_field_only(void **state)
{
    (void)state;
    char rcpt[512];
    rua_mailed_to("v=TLSRPTv1; xrua=mailto:other@elsewhere.example;rua=mailto:r@long.example",
                  rcpt, sizeof(rcpt));
    assert_string_equal(rcpt, "r@long.example");
    rua_mailed_to("v=TLSRPTv1;xrua=mailto:other@elsewhere.example", rcpt, sizeof(rcpt));
    assert_string_equal(rcpt, "");
}

/* The cache file is read back as the fetch left it: a corrupt line (a
 * max_age past a year, a fetch in the future, an unknown mode, enforce
 * without mx, a number with a sign) is skipped, not kept as a policy for
 * ages; a domain on two lines is one policy (the last), counted once. */
static void
test_cache_corrupt_lines(void **state)
{
    (void)state;
    unsigned long long now = (unsigned long long)time(NULL) * 1000;
    char text[2048];
    snprintf(text, sizeof(text),
             "sluice-mta-sts 1\n"
             "dup.test 1 enforce 86400 %llu mx.dup.test\n"
             "dup.test 2 testing 86400 %llu mx.dup.test\n"
             "forever.test 1 enforce 99999999999 %llu mx.forever.test\n"
             "future.test 1 enforce 86400 %llu mx.future.test\n"
             "weird.test 1 strict 86400 %llu mx.weird.test\n"
             "nomx.test 1 enforce 86400 %llu\n"
             "signed.test 1 enforce -86400 %llu mx.signed.test\n"
             "ok.test 1 enforce 86400 %llu *.ok.test\n",
             now, now, now, now + 10ULL * 365 * 86400000, now, now, now, now);
    struct store s;
    store_new(&s, text);
    struct mta_sts_stats st;
    mta_sts_stats(s.m, &st);
    assert_int_equal(st.policies, 2); /* dup.test (testing), ok.test */
    assert_int_equal(st.enforce, 1);
    assert_int_equal(st.domains, 2);
    store_free(&s);
}

static void
test_tlsrpt_results(void **state)
{
    (void)state;
    assert_int_equal(tlsrpt_result_of_verify("hostname mismatch"),
                     TLSRPT_CERTIFICATE_HOST_MISMATCH);
    assert_int_equal(tlsrpt_result_of_verify("certificate verify failed: self-signed certificate"),
                     TLSRPT_CERTIFICATE_NOT_TRUSTED);
    assert_int_equal(tlsrpt_result_of_verify("certificate has expired"),
                     TLSRPT_CERTIFICATE_EXPIRED);
    assert_int_equal(tlsrpt_result_of_verify("unable to get local issuer certificate"),
                     TLSRPT_CERTIFICATE_NOT_TRUSTED);
    assert_int_equal(tlsrpt_result_of_verify("wrong version number"), TLSRPT_VALIDATION_FAILURE);
    assert_string_equal(tlsrpt_result_str(TLSRPT_STS_WEBPKI_INVALID), "sts-webpki-invalid");
}

static void
test_tlsrpt_mail(void **state)
{
    (void)state;
    static const char gz[200] = {0x1f, (char)0x8b, 8};
    struct tlsrpt_mail_input in = {
        .from = "postmaster@sender.example",
        .to = "tlsrpt@reports.example",
        .domain = "example.com",
        .submitter = "sender.example",
        .org = "Sender Org",
        .report_id = "20000.1.example.com@sender.example",
        .start = 20000LL * 86400,
        .end = 20000LL * 86400 + 86399,
        .gz = gz,
        .gzlen = sizeof(gz),
        .now_ms = 20000ULL * 86400000 + 3600000,
    };
    char *m = NULL;
    size_t len = 0;
    assert_int_equal(tlsrpt_mail_build(&in, &m, &len), 0);
    assert_int_equal(strlen(m), len);
    assert_non_null(strstr(m, "\r\nSubject: Report Domain: example.com Submitter: sender.example "
                              "Report-ID: <20000.1.example.com@sender.example>\r\n"));
    assert_non_null(strstr(m, "\r\nTLS-Report-Domain: example.com\r\n"));
    assert_non_null(strstr(m, "\r\nTLS-Report-Submitter: sender.example\r\n"));
    assert_non_null(strstr(m, "Content-Type: multipart/report; report-type=\"tlsrpt\""));
    assert_non_null(strstr(m, "Content-Type: application/tlsrpt+gzip"));
    assert_non_null(strstr(m, "filename=\"sender.example!example.com!1728000000!1728086399!"
                              "200001examplecom.json.gz\""));
    /* CRLF only, no line over 78 + CRLF in the body, ends with the close. */
    for (size_t i = 0; i < len; i++)
        if (m[i] == '\n')
            assert_true(i > 0 && m[i - 1] == '\r');
    assert_true(len > 4 && memcmp(m + len - 4, "--\r\n", 4) == 0);
    free(m);

    /* A field that would forge a header line or break out of <> or "". */
    struct tlsrpt_mail_input bad[6];
    for (int i = 0; i < 6; i++)
        bad[i] = in;
    bad[0].to = "a@b.example\r\nBcc: x@evil.example";
    bad[1].from = "a@b.example>, <c@d.example";
    bad[2].domain = "example.com\r\nX: y";
    bad[3].org = "Org\nX: y";
    bad[4].report_id = "no-at-sign";
    bad[5].to = "no-at-sign";
    for (int i = 0; i < 6; i++) {
        m = NULL;
        assert_int_equal(tlsrpt_mail_build(&bad[i], &m, &len), -EINVAL);
        assert_null(m);
    }
    /* Bounded: a report too big for mail is refused, not cut. */
    static char big[TLSRPT_MAIL_MAX];
    struct tlsrpt_mail_input huge = in;
    huge.gz = big;
    huge.gzlen = sizeof(big);
    assert_int_equal(tlsrpt_mail_build(&huge, &m, &len), -EFBIG);
}

static void
test_tlsrpt_json_dane(void **state)
{
    (void)state;
    char dir[] = "/tmp/sluice-tlsrpt-XXXXXX";
    assert_non_null(mkdtemp(dir));
    struct config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.server.hostname = "sender.example";
    cfg.mta_sts.tlsrpt = true;
    char err[256];
    struct tlsrpt *r = NULL;
    assert_int_equal(tlsrpt_new(&cfg, dir, &r, err, sizeof(err)), 0);

    static const uint8_t h1[32] = {0xab, 0xcd, 0x01}, h2[2] = {0x12, 0x34};
    const struct dns_tlsa tlsa[2] = {{3, 1, 1, sizeof(h1), h1}, {2, 0, 1, sizeof(h2), h2}};
    tlsrpt_record_tlsa(r, "dane.example", "mx1.dane.example", tlsa, 2, TLSRPT_SUCCESS, "192.0.2.1",
                       NULL);
    tlsrpt_record_tlsa(r, "dane.example", "mx1.dane.example", tlsa, 2, TLSRPT_SUCCESS, "192.0.2.1",
                       "mx1.dane.example");
    tlsrpt_record_tlsa(r, "dane.example", "mx1.dane.example", tlsa, 2, TLSRPT_VALIDATION_FAILURE,
                       "192.0.2.1", NULL);
    tlsrpt_record_tlsa(r, "dane.example", "mx2.dane.example", NULL, 0, TLSRPT_DNSSEC_INVALID,
                       "192.0.2.2", NULL);
    /* mx3 a CNAME to mx.hoster.example, whose records decided: the policy
     * is the base domain's, the failure row names the MX host. */
    tlsrpt_record_tlsa(r, "dane.example", "mx3.dane.example", tlsa, 1, TLSRPT_VALIDATION_FAILURE,
                       "192.0.2.3", "mx.hoster.example");
    struct mta_sts_policy *p = NULL;
    const char *why = NULL;
    const char *pol = "version: STSv1\nmode: enforce\nmx: mx1.dane.example\nmax_age: 600\n";
    assert_int_equal(mta_sts_policy_parse(pol, strlen(pol), &p, &why), 0);
    tlsrpt_record(r, "dane.example", p, TLSRPT_SUCCESS, "mx1.dane.example", "192.0.2.1");
    tlsrpt_record(r, "other.example", NULL, TLSRPT_STS_POLICY_FETCH_ERROR, NULL, NULL);
    mta_sts_policy_unref(p);

    int64_t day = (int64_t)(time(NULL) / 86400);
    char *js = NULL;
    size_t len = 0;
    assert_int_equal(tlsrpt_report_json(r, "dane.example", day, "1.dane.example@sender.example",
                                        &js, &len),
                     0);
    /* The DANE policy of mx1: its records, 2 successes, 1 failure. */
    assert_non_null(strstr(js, "{\"policy\":{\"policy-type\":\"tlsa\",\"policy-string\":["
                               "\"3 1 1 ABCD01"));
    assert_non_null(strstr(js, "00\",\"2 0 1 1234\"],\"policy-domain\":\"dane.example\","
                               "\"mx-host\":[\"mx1.dane.example\"]},\"summary\":{"
                               "\"total-successful-session-count\":2,"
                               "\"total-failure-session-count\":1},\"failure-details\":[{"
                               "\"result-type\":\"validation-failure\",\"receiving-ip\":"
                               "\"192.0.2.1\",\"receiving-mx-hostname\":\"mx1.dane.example\","
                               "\"failed-session-count\":1}]}"));
    /* mx2: a TLSA lookup that did not validate. */
    assert_non_null(strstr(js, "\"policy-type\":\"tlsa\",\"policy-string\":[],"
                               "\"policy-domain\":\"dane.example\",\"mx-host\":"
                               "[\"mx2.dane.example\"]}"));
    assert_non_null(strstr(js, "\"result-type\":\"dnssec-invalid\""));
    /* mx3: named by its base domain, the failure by the MX record's name. */
    assert_non_null(strstr(js, "\"policy-domain\":\"dane.example\",\"mx-host\":"
                               "[\"mx.hoster.example\"]},\"summary\":{"
                               "\"total-successful-session-count\":0,"
                               "\"total-failure-session-count\":1},\"failure-details\":[{"
                               "\"result-type\":\"validation-failure\",\"receiving-ip\":"
                               "\"192.0.2.3\",\"receiving-mx-hostname\":\"mx3.dane.example\","));
    assert_null(strstr(js, "\"mx-host\":[\"mx3.dane.example\"]"));
    /* The MTA-STS policy beside them, with its own count. */
    assert_non_null(strstr(js, "\"policy-type\":\"sts\",\"policy-string\":[\"version: STSv1\","
                               "\"mode: enforce\",\"mx: mx1.dane.example\",\"max_age: 600\"]"));
    assert_non_null(strstr(js, "\"total-successful-session-count\":1,"
                               "\"total-failure-session-count\":0"));
    char *other = NULL;
    assert_int_equal(tlsrpt_report_json(r, "other.example", day, "2.other.example@sender.example",
                                        &other, &len),
                     0);
    assert_non_null(strstr(other, "\"policy-type\":\"no-policy-found\""));
    assert_non_null(strstr(other, "\"result-type\":\"sts-policy-fetch-error\""));
    assert_null(strstr(other, "tlsa"));
    char *none = NULL;
    assert_int_equal(tlsrpt_report_json(r, "nothing.example", day, "3@x", &none, &len), -ENOENT);

    /* Written out and read back: the same report. */
    r = tlsrpt_free(r, NULL);
    assert_int_equal(tlsrpt_new(&cfg, dir, &r, err, sizeof(err)), 0);
    char *again = NULL;
    assert_int_equal(tlsrpt_report_json(r, "dane.example", day, "1.dane.example@sender.example",
                                        &again, &len),
                     0);
    assert_string_equal(again, js);
    r = tlsrpt_free(r, NULL);
    free(js);
    free(other);
    free(again);
    char path[sizeof(dir) + 32];
    snprintf(path, sizeof(path), "%s/tlsrpt.state", dir);
    unlink(path);
    rmdir(dir);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_policy_table), cmocka_unit_test(test_policy_every_split),
        cmocka_unit_test(test_policy_many_mx),
        cmocka_unit_test(test_match),
        cmocka_unit_test(test_policy_size),
        cmocka_unit_test(test_match_trailing_dot),
        cmocka_unit_test(test_txt), cmocka_unit_test(test_txt_answer_broken_second_record),
        cmocka_unit_test(test_no_policy_asked_again_after_ttl),
        cmocka_unit_test(test_cache_corrupt_lines),
        cmocka_unit_test(test_sweep_keeps_domains_in_use),
        cmocka_unit_test(test_no_policy_domain_is_small),
        cmocka_unit_test(test_sweep_shrinks_table),
        cmocka_unit_test(test_ended_policy_checked_once),
        cmocka_unit_test(test_dns_failure_retried_after_error_ttl),
        cmocka_unit_test(test_clock_stepped_back_is_just_checked),
        cmocka_unit_test(test_many_dns_sockets_watched),
        cmocka_unit_test(test_fetch_leaves_nothing_in_curl),
        cmocka_unit_test(test_tlsrpt_results), cmocka_unit_test(test_tlsrpt_mail),
        cmocka_unit_test(test_tlsrpt_json_dane),
        cmocka_unit_test(test_tlsrpt_long_rua_whole),
        cmocka_unit_test(test_tlsrpt_rua_field_only),
    };
    /* Before anything starts libcurl: its allocations are counted. */
    if (curl_global_init_mem(CURL_GLOBAL_DEFAULT, cm_malloc, cm_free, cm_realloc, cm_strdup,
                             cm_calloc) != CURLE_OK)
        return 1;
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
