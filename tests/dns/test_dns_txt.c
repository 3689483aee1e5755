/*
 * test_dns_txt: TXT lookups (dns/txt.c, the MTA-STS and TLS reporting
 * records) against a scripted server: the records at the name asked, or
 * at the end of its CNAME chain, their strings joined; records of other
 * owners in the same answer are no answer to the question.
 *
 *   _mta-sts.a.test  its record, and one of another owner beside it
 *   _mta-sts.b.test  a CNAME to _mta-sts.c.test, whose record is split
 *                    in three strings; a record at the alias itself
 *                    (which a CNAME cannot have) is not the target's
 *   _mta-sts.d.test  only another owner's record: none
 *   _mta-sts.e.test  NXDOMAIN with an SOA of MINIMUM 45, f.test the
 *                    same without records (NODATA), g.test NXDOMAIN
 *                    without an SOA
 *   _mta-sts.h.test  a referral (NS, no SOA): retry; i.test NODATA with
 *                    the zone's NS beside its SOA: not found
 *   _mta-sts.s.test  SERVFAIL: retry, and the why says so
 *
 * Each answer comes with its TTL (300 for every record here): the
 * records', or a not-found answer's negative TTL, min(the SOA's TTL,
 * its MINIMUM) (RFC 2308 5); not known without an SOA.
 *
 * And against dnsmasq: every record of an answer comes back, however
 * many (RFC 8461 3.1's "exactly one STSv1 record" is judged on all of
 * them): 30 records at _mta-sts.many.test, two of them STSv1, one near
 * each end of the answer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/dns/harness.h"

#define T_NS    2
#define T_SOA   6
#define T_CNAME 5
#define T_TXT   16

static const struct script_answer table[] = {
    {"_mta-sts.a.test",
     T_TXT,
     0,
     false,
     {{"_mta-sts.a.test", T_TXT, "v=STSv1; id=1"}, {"_mta-sts.x.test", T_TXT, "v=STSv1; id=9"}}},
    {"_mta-sts.b.test",
     T_TXT,
     0,
     false,
     {{"_mta-sts.b.test", T_CNAME, "_mta-sts.c.test"},
      {"_mta-sts.b.test", T_TXT, "v=STSv1; id=8"},
      {"_mta-sts.c.test", T_TXT, "v=STSv1;| id=|2"}}},
    {"_mta-sts.d.test", T_TXT, 0, false, {{"_mta-sts.x.test", T_TXT, "v=STSv1; id=9"}}},
    {"_mta-sts.e.test",
     T_TXT,
     3, /* NXDOMAIN */
     false,
     {{"e.test", T_SOA, "ns.e.test host.e.test 1 3600 600 86400 45"}}},
    {"_mta-sts.f.test",
     T_TXT,
     0,
     false,
     {{"f.test", T_SOA, "ns.f.test host.f.test 1 3600 600 86400 45"}}},
    {"_mta-sts.g.test", T_TXT, 3, false, {{NULL, 0, NULL}}},
    /* a referral: NS without an SOA, what a server that does not recurse
     * answers; the zone's NS beside a NODATA's SOA is none */
    {"_mta-sts.h.test", T_TXT, 0, false, {{"h.test", T_NS, "ns.elsewhere.test"}}},
    {"_mta-sts.i.test",
     T_TXT,
     0,
     false,
     {{"i.test", T_NS, "ns.i.test"},
      {"i.test", T_SOA, "ns.i.test host.i.test 1 3600 600 86400 45"}}},
    {"_mta-sts.s.test", T_TXT, 2 /* SERVFAIL */, false, {{NULL, 0, NULL}}},
};
#define NTABLE (sizeof(table) / sizeof(table[0]))

struct fx {
    struct script_server srv;
    struct dns_config cfg;
    struct ploop loop;
    struct dns *d;
};

struct got {
    unsigned done;
    enum dns_status status;
    unsigned n;
    uint32_t ttl;
    char txt[4][64];
    char why[128];
};

static void
on_txt(void *arg, enum dns_status status, const char *why, const char *const *txt, unsigned n,
       uint32_t ttl)
{
    struct got *g = arg;
    snprintf(g->why, sizeof(g->why), "%s", why);
    g->status = status;
    g->n = n;
    g->ttl = ttl;
    for (unsigned i = 0; i < n && i < 4; i++)
        snprintf(g->txt[i], sizeof(g->txt[i]), "%s", txt[i]);
    g->done++;
}

static int
setup(void **state)
{
    static struct fx f;
    memset(&f, 0, sizeof(f));
    if (script_start(&f.srv, table, NTABLE) < 0)
        return -1;
    harness_config(&f.cfg, f.srv.port);
    ploop_init(&f.loop);
    char err[256];
    if (dns_new(&f.cfg, ploop_sock, &f.loop, &f.d, err, sizeof(err)) < 0) {
        fprintf(stderr, "dns_new: %s\n", err);
        script_stop(&f.srv);
        return -1;
    }
    f.loop.d = f.d;
    *state = &f;
    return 0;
}

static int
teardown(void **state)
{
    struct fx *f = *state;
    f->d = dns_free(f->d);
    conf_free(dns_conf_keys, &f->cfg);
    script_stop(&f->srv);
    return 0;
}

static void
lookup(struct fx *f, const char *name, struct got *g)
{
    memset(g, 0, sizeof(*g));
    assert_int_equal(dns_txt_lookup(f->d, name, on_txt, g), 0);
    assert_int_equal(ploop_run(&f->loop, &g->done, 1, 10000), 0);
    assert_int_equal(g->done, 1);
}

static void
test_other_owner_ignored(void **state)
{
    struct got g;
    lookup(*state, "_mta-sts.a.test", &g);
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(g.n, 1);
    assert_string_equal(g.txt[0], "v=STSv1; id=1");
    assert_int_equal(g.ttl, 300);
}

static void
test_chain_followed_strings_joined(void **state)
{
    struct got g;
    lookup(*state, "_mta-sts.b.test", &g);
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(g.n, 1);
    assert_string_equal(g.txt[0], "v=STSv1; id=2");
    assert_int_equal(g.ttl, 300);
}

static void
test_only_other_owner_is_none(void **state)
{
    struct got g;
    lookup(*state, "_mta-sts.d.test", &g);
    assert_int_equal(g.status, DNS_NOT_FOUND);
    assert_int_equal(g.n, 0);
    /* no SOA: how long the "no" holds is not said */
    assert_true(g.ttl == DNS_TTL_UNKNOWN);
}

/* A not-found answer's TTL is its negative TTL (RFC 2308 5): min(the
 * SOA's TTL, 300, and its MINIMUM, 45), for NXDOMAIN and NODATA alike;
 * without an SOA, not known. */
static void
test_negative_ttl(void **state)
{
    struct got g;
    lookup(*state, "_mta-sts.e.test", &g);
    assert_int_equal(g.status, DNS_NOT_FOUND);
    assert_int_equal(g.ttl, 45);
    lookup(*state, "_mta-sts.f.test", &g);
    assert_int_equal(g.status, DNS_NOT_FOUND);
    assert_int_equal(g.ttl, 45);
    lookup(*state, "_mta-sts.g.test", &g);
    assert_int_equal(g.status, DNS_NOT_FOUND);
    assert_true(g.ttl == DNS_TTL_UNKNOWN);
}

/* A referral is no answer: retry, not "no record" (an MTA-STS domain
 * whose resolver does not recurse would seem to have no policy). */
static void
test_referral_is_retry(void **state)
{
    struct got g;
    lookup(*state, "_mta-sts.h.test", &g);
    assert_int_equal(g.status, DNS_RETRY);
    assert_true(g.ttl == DNS_TTL_UNKNOWN);
    lookup(*state, "_mta-sts.i.test", &g);
    assert_int_equal(g.status, DNS_NOT_FOUND);
    assert_int_equal(g.ttl, 45);
}

/* A SERVFAIL is named in the why (the log's reason): it was "resolver
 * error", which says nothing of what the server answered. */
static void
test_servfail_is_named(void **state)
{
    struct got g;
    lookup(*state, "_mta-sts.s.test", &g);
    assert_int_equal(g.status, DNS_RETRY);
    assert_non_null(strstr(g.why, "SERVFAIL"));
    lookup(*state, "_mta-sts.a.test", &g);
    assert_string_equal(g.why, "ok");
}

static struct dnsmasq dm;
static bool dm_skipped;

/* 30 records at _mta-sts.many.test: two STSv1 ones (the 2nd and the
 * 29th), the others not. */
static int
dm_setup(void **state)
{
    (void)state;
    char conf[30 * 80];
    size_t o = 0;
    for (int i = 1; i <= 30; i++)
        o += (size_t)snprintf(conf + o, sizeof(conf) - o,
                              "txt-record=_mta-sts.many.test,\"%s%d\"\n",
                              i == 2 || i == 29 ? "v=STSv1; id=" : "other record ", i);
    int rc = dnsmasq_start(&dm, conf, 300);
    dm_skipped = rc == HARNESS_SKIP;
    return rc < 0 ? -1 : 0;
}

static int
dm_teardown(void **state)
{
    (void)state;
    if (!dm_skipped)
        dnsmasq_stop(&dm);
    return 0;
}

struct all {
    unsigned done;
    enum dns_status status;
    unsigned n, sts;
};

static void
on_all(void *arg, enum dns_status status, const char *why, const char *const *txt, unsigned n,
       uint32_t ttl)
{
    (void)why;
    (void)ttl;
    struct all *g = arg;
    g->status = status;
    g->n = n;
    for (unsigned i = 0; i < n; i++)
        g->sts += strncmp(txt[i], "v=STSv1;", 8) == 0;
    g->done++;
}

static void
dm_lookup(const char *name, struct all *g)
{
    if (dm_skipped)
        skip();
    struct dns_config cfg;
    struct ploop loop;
    struct dns *d;
    char err[256];
    harness_config(&cfg, dm.port);
    ploop_init(&loop);
    if (dns_new(&cfg, ploop_sock, &loop, &d, err, sizeof(err)) < 0)
        fail_msg("dns_new: %s", err);
    loop.d = d;
    memset(g, 0, sizeof(*g));
    assert_int_equal(dns_txt_lookup(d, name, on_all, g), 0);
    assert_int_equal(ploop_run(&loop, &g->done, 1, 10000), 0);
    assert_int_equal(g->done, 1);
    dns_free(d);
    conf_free(dns_conf_keys, &cfg);
}

/* All 30 records come back, both STSv1 ones among them: the domain has
 * two, hence no policy (RFC 8461 3.1), whichever came first. Cut to the
 * first 16 (as before) the answer could hold just one, a policy. */
static void
test_every_record(void **state)
{
    (void)state;
    struct all g;
    dm_lookup("_mta-sts.many.test", &g);
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(g.n, 30);
    assert_int_equal(g.sts, 2);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_other_owner_ignored),
        cmocka_unit_test(test_chain_followed_strings_joined),
        cmocka_unit_test(test_only_other_owner_is_none),
        cmocka_unit_test(test_negative_ttl),
        cmocka_unit_test(test_referral_is_retry),
        cmocka_unit_test(test_servfail_is_named),
    };
    const struct CMUnitTest dm_tests[] = {
        cmocka_unit_test(test_every_record),
    };
    int rc = cmocka_run_group_tests(tests, setup, teardown);
    return rc | cmocka_run_group_tests(dm_tests, dm_setup, dm_teardown);
}
