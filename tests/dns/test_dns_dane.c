/*
 * test_dns_dane: the TLSA base domain of an MX host that is an alias
 * (RFC 7672 2.2.2), against a scripted server that sets the AD bit per
 * answer as a validating resolver would ([dns] dnssec = trust_ad).
 *
 *   a.test  MX host a CNAME, chain validated, TLSA at the target and at
 *           the MX name: the target's records win
 *   c.test  chain validated, validated denial at the target: the MX
 *           name's records
 *   d.test  chain not validated: the target is never asked, the MX
 *           name's records
 *   e.test  chain validated, the target's TLSA lookup fails: the host is
 *           not usable now, whatever the MX name holds
 *   p.test  a host that is no alias: one TLSA query, as before
 *   u.test  an unsigned domain naming a.test's MX host: its lookup (no
 *           DANE) fills the host cache, and a.test's lookup after it
 *           still sees the chain
 *
 * and the ids of the queries, which dns/ makes itself in this mode.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "tests/dns/harness.h"

#define T_A     1
#define T_CNAME 5
#define T_MX    15
#define T_TLSA  52

#define TARGET_KEY "3 1 1 aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define MXNAME_KEY "3 1 1 bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"

static const struct script_answer table[] = {
    /* a.test: validated chain, records at both names */
    {"a.test", T_MX, 0, true, {{"a.test", T_MX, "10 mx.a.test"}}},
    {"mx.a.test", T_A, 0, true,
     {{"mx.a.test", T_CNAME, "t1.b.test"}, {"t1.b.test", T_A, "127.0.0.10"}}},
    {"_25._tcp.t1.b.test", T_TLSA, 0, true, {{"_25._tcp.t1.b.test", T_TLSA, TARGET_KEY}}},
    {"_25._tcp.mx.a.test", T_TLSA, 0, true, {{"_25._tcp.mx.a.test", T_TLSA, MXNAME_KEY}}},
    /* c.test: validated chain, NXDOMAIN (validated) at the target */
    {"c.test", T_MX, 0, true, {{"c.test", T_MX, "10 mx.c.test"}}},
    {"mx.c.test", T_A, 0, true,
     {{"mx.c.test", T_CNAME, "t2.b.test"}, {"t2.b.test", T_A, "127.0.0.11"}}},
    {"_25._tcp.t2.b.test", T_TLSA, 3, true, {{0}}},
    {"_25._tcp.mx.c.test", T_TLSA, 0, true, {{"_25._tcp.mx.c.test", T_TLSA, MXNAME_KEY}}},
    /* d.test: the chain's answer is not validated */
    {"d.test", T_MX, 0, true, {{"d.test", T_MX, "10 mx.d.test"}}},
    {"mx.d.test", T_A, 0, false,
     {{"mx.d.test", T_CNAME, "t3.b.test"}, {"t3.b.test", T_A, "127.0.0.12"}}},
    {"_25._tcp.t3.b.test", T_TLSA, 0, true, {{"_25._tcp.t3.b.test", T_TLSA, TARGET_KEY}}},
    {"_25._tcp.mx.d.test", T_TLSA, 0, true, {{"_25._tcp.mx.d.test", T_TLSA, MXNAME_KEY}}},
    /* e.test: validated chain, SERVFAIL (bogus) at the target */
    {"e.test", T_MX, 0, true, {{"e.test", T_MX, "10 mx.e.test"}}},
    {"mx.e.test", T_A, 0, true,
     {{"mx.e.test", T_CNAME, "t4.b.test"}, {"t4.b.test", T_A, "127.0.0.13"}}},
    {"_25._tcp.t4.b.test", T_TLSA, 2, false, {{0}}},
    {"_25._tcp.mx.e.test", T_TLSA, 0, true, {{"_25._tcp.mx.e.test", T_TLSA, MXNAME_KEY}}},
    /* p.test: no alias */
    {"p.test", T_MX, 0, true, {{"p.test", T_MX, "10 mx.p.test"}}},
    {"mx.p.test", T_A, 0, true, {{"mx.p.test", T_A, "127.0.0.14"}}},
    {"_25._tcp.mx.p.test", T_TLSA, 0, true, {{"_25._tcp.mx.p.test", T_TLSA, MXNAME_KEY}}},
    /* u.test: unsigned, names a.test's MX host */
    {"u.test", T_MX, 0, false, {{"u.test", T_MX, "10 mx.a.test"}}},
};
#define NTABLE (sizeof(table) / sizeof(table[0]))

struct fx {
    struct script_server srv;
    struct dns_config cfg;
    struct ploop loop;
    struct dns *d;
};

struct slot {
    unsigned done;
    struct dns_mx_result *res;
};

static void
on_done(void *arg, struct dns_mx_result *res)
{
    struct slot *s = arg;
    s->res = res;
    s->done++;
}

static int
setup(void **state)
{
    static struct fx f;
    memset(&f, 0, sizeof(f));
    if (script_start(&f.srv, table, NTABLE) < 0)
        return -1;
    harness_config(&f.cfg, f.srv.port);
    f.cfg.family = DNS_FAMILY_V4;
    f.cfg.dnssec = DNS_DNSSEC_TRUST_AD;
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

static struct dns_mx_result *
resolve(struct fx *f, const char *domain)
{
    struct slot s = {0};
    struct dns_mx_result *res = NULL;
    struct dns_req *req;
    int rc = dns_mx_resolve(f->d, domain, on_done, &s, &res, &req);
    if (rc == 0) {
        assert_int_equal(ploop_run(&f->loop, &s.done, 1, 10000), 0);
        res = s.res;
    }
    assert_non_null(res);
    assert_int_equal(res->status, DNS_OK);
    assert_int_equal(res->nhosts, 1);
    return res;
}

/* The host's one TLSA record is the one of key (its data bytes: 0xaa
 * at the target, 0xbb at the MX name). */
enum key { AT_TARGET = 0xaa, AT_MXNAME = 0xbb };
static void
assert_tlsa(const struct dns_mx_host *h, enum key key)
{
    assert_int_equal(h->dane, DNS_DANE_SECURE);
    assert_int_equal(h->ntlsa, 1);
    assert_int_equal(h->tlsa[0].usage, 3);
    assert_int_equal(h->tlsa[0].len, 32);
    assert_int_equal(h->tlsa[0].data[0], key);
}

static void
test_target_records_first(void **state)
{
    struct fx *f = *state;
    struct dns_mx_result *r = resolve(f, "a.test");
    const struct dns_mx_host *h = &r->hosts[0];
    assert_string_equal(h->name, "mx.a.test");
    assert_non_null(h->expanded);
    assert_string_equal(h->expanded, "t1.b.test");
    assert_tlsa(h, AT_TARGET);
    assert_ptr_equal(h->tlsa_base, h->expanded);
    assert_int_equal(script_hits(&f->srv, "_25._tcp.t1.b.test", T_TLSA), 1);
    dns_mx_result_unref(r);
}

static void
test_no_tlsa_at_target_falls_back(void **state)
{
    struct fx *f = *state;
    struct dns_mx_result *r = resolve(f, "c.test");
    const struct dns_mx_host *h = &r->hosts[0];
    assert_non_null(h->expanded);
    assert_string_equal(h->expanded, "t2.b.test");
    assert_tlsa(h, AT_MXNAME);
    assert_ptr_equal(h->tlsa_base, h->name);
    assert_int_equal(script_hits(&f->srv, "_25._tcp.t2.b.test", T_TLSA), 1);
    assert_int_equal(script_hits(&f->srv, "_25._tcp.mx.c.test", T_TLSA), 1);
    dns_mx_result_unref(r);
}

static void
test_unvalidated_chain_original_only(void **state)
{
    struct fx *f = *state;
    struct dns_mx_result *r = resolve(f, "d.test");
    const struct dns_mx_host *h = &r->hosts[0];
    assert_null(h->expanded);
    assert_tlsa(h, AT_MXNAME);
    assert_ptr_equal(h->tlsa_base, h->name);
    assert_int_equal(script_hits(&f->srv, "_25._tcp.t3.b.test", T_TLSA), 0);
    dns_mx_result_unref(r);
}

static void
test_target_failure_is_tempfail(void **state)
{
    struct fx *f = *state;
    struct dns_mx_result *r = resolve(f, "e.test");
    const struct dns_mx_host *h = &r->hosts[0];
    assert_int_equal(h->dane, DNS_DANE_TEMPFAIL);
    assert_int_equal(h->ntlsa, 0);
    assert_ptr_equal(h->tlsa_base, h->expanded);
    dns_mx_result_unref(r);
}

static void
test_plain_host_one_tlsa_query(void **state)
{
    struct fx *f = *state;
    struct dns_stats before, after;
    dns_stats(f->d, &before);
    struct dns_mx_result *r = resolve(f, "p.test");
    const struct dns_mx_host *h = &r->hosts[0];
    dns_stats(f->d, &after);
    assert_null(h->expanded);
    assert_tlsa(h, AT_MXNAME);
    assert_ptr_equal(h->tlsa_base, h->name);
    assert_int_equal(after.tlsa_queries - before.tlsa_queries, 1);
    dns_mx_result_unref(r);
}

static void
test_host_cache_does_not_hide_the_chain(void **state)
{
    struct fx *f = *state;
    dns_cache_clear(f->d);
    struct dns_mx_result *u = resolve(f, "u.test");
    assert_int_equal(u->hosts[0].dane, DNS_DANE_NONE);
    assert_null(u->hosts[0].tlsa_base);
    int before = script_hits(&f->srv, "mx.a.test", T_A);
    struct dns_mx_result *r = resolve(f, "a.test");
    const struct dns_mx_host *h = &r->hosts[0];
    assert_int_equal(script_hits(&f->srv, "mx.a.test", T_A), before + 1);
    assert_non_null(h->expanded);
    assert_tlsa(h, AT_TARGET);
    dns_mx_result_unref(u);
    dns_mx_result_unref(r);
}

/* With trust_ad the queries are made here and sent with ares_send(),
 * which (c-ares 1.18) sends the id it is given: each query needs an id of
 * its own, unpredictable, as ares_query() gives, not 0 for every one
 * (answers matched on the question alone, spoofing made easier, and all
 * queries in one of c-ares's id buckets). */
static void
test_query_ids_random(void **state)
{
    struct fx *f = *state;
    dns_cache_clear(f->d);
    dns_mx_result_unref(resolve(f, "p.test"));
    dns_mx_result_unref(resolve(f, "a.test"));
    uint16_t ids[SCRIPT_QIDS_MAX];
    unsigned n = script_qids(&f->srv, ids, SCRIPT_QIDS_MAX);
    assert_true(n >= 6);
    unsigned distinct = 0;
    for (unsigned i = 0; i < n; i++) {
        bool seen = false;
        for (unsigned k = 0; k < i && !seen; k++)
            seen = ids[k] == ids[i];
        distinct += !seen;
    }
    /* 16 random bits: a repeat or two among n is chance, not a rule */
    assert_true(distinct >= n - 2);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_target_records_first),
        cmocka_unit_test(test_no_tlsa_at_target_falls_back),
        cmocka_unit_test(test_unvalidated_chain_original_only),
        cmocka_unit_test(test_target_failure_is_tempfail),
        cmocka_unit_test(test_plain_host_one_tlsa_query),
        cmocka_unit_test(test_host_cache_does_not_hide_the_chain),
        cmocka_unit_test(test_query_ids_random),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
