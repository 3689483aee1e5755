/*
 * test_dns: the resolver of dns/ against a real dnsmasq, driven by a
 * plain poll() loop. Each group starts its own dnsmasq on a port of its
 * own and stops it; queries are counted in dnsmasq's log.
 *
 * Groups: records (ordering, shuffle, implicit MX and how long it is
 * kept, null MX (also twice over), NXDOMAIN,
 * CNAME'd and IPv6-only hosts, address lookups of a name with MX
 * records, skipped targets, names, cache hits,
 * in-flight deduplication, MX host answers shared between domains,
 * cancel, eviction, TCP fallback, REFUSED, a
 * server that never answers); ttl (expiry after the TTL, expired answers
 * swept out of the cache); many (10,000
 * domains at once).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "tests/dns/harness.h"

static struct dnsmasq dm;
static bool skipped;

struct slot {
    unsigned done;
    struct dns_mx_result *res;
};

struct fx {
    struct dns_config cfg;
    struct ploop loop;
    struct dns *d;
};

static void
on_done(void *arg, struct dns_mx_result *res)
{
    struct slot *s = arg;
    dns_mx_result_unref(s->res);
    s->res = res;
    s->done++;
}

static void
fx_open(struct fx *f, int port, void (*tweak)(struct dns_config *))
{
    if (skipped)
        skip();
    harness_config(&f->cfg, port);
    if (tweak != NULL)
        tweak(&f->cfg);
    ploop_init(&f->loop);
    char err[256];
    int rc = dns_new(&f->cfg, ploop_sock, &f->loop, &f->d, err, sizeof(err));
    if (rc < 0)
        fail_msg("dns_new: %s: %s", dns_strerror(rc), err);
    f->loop.d = f->d;
}

static void
fx_close(struct fx *f)
{
    f->d = dns_free(f->d);
    assert_int_equal(f->loop.n, 0); /* every socket was handed back */
    conf_free(dns_conf_keys, &f->cfg);
}

/* Resolve (MX, or with addr the name's own addresses) and wait; *sync
 * says whether the answer came at once. */
static struct dns_mx_result *
resolve_kind(struct fx *f, const char *domain, bool addr, bool *sync)
{
    struct slot s = {0};
    struct dns_mx_result *res;
    struct dns_req *req;
    int rc = addr ? dns_addr_resolve(f->d, domain, on_done, &s, &res, &req)
                  : dns_mx_resolve(f->d, domain, on_done, &s, &res, &req);
    assert_true(rc == 0 || rc == 1);
    if (sync != NULL)
        *sync = rc == 1;
    if (rc == 1) {
        assert_null(req);
        return res;
    }
    assert_non_null(req);
    assert_int_equal(ploop_run(&f->loop, &s.done, 1, 10000), 0);
    assert_int_equal(s.done, 1);
    return s.res;
}

static struct dns_mx_result *
resolve(struct fx *f, const char *domain, bool *sync)
{
    return resolve_kind(f, domain, false, sync);
}

static const char *
addr_str(const union dns_addr *a, char *buf, size_t len)
{
    if (a->sa.sa_family == AF_INET)
        return inet_ntop(AF_INET, &a->sin.sin_addr, buf, (socklen_t)len);
    return inet_ntop(AF_INET6, &a->sin6.sin6_addr, buf, (socklen_t)len);
}

static void
assert_host(const struct dns_mx_host *h, const char *name, unsigned pref, const char *addrs)
{
    char all[512] = "", one[64];
    for (unsigned i = 0; i < h->naddrs; i++) {
        assert_int_equal(h->addrs[i].sin.sin_port, 0);
        strcat(all, i ? " " : "");
        strcat(all, addr_str(&h->addrs[i], one, sizeof(one)));
    }
    assert_string_equal(h->name, name);
    assert_int_equal(h->preference, pref);
    assert_string_equal(all, addrs);
}

static void
v4_only(struct dns_config *c)
{
    c->family = DNS_FAMILY_V4;
}

static void
both_nocache(struct dns_config *c)
{
    c->min_ttl = 0;
    c->max_ttl = 0;
}

static void
v4_nocache(struct dns_config *c)
{
    c->family = DNS_FAMILY_V4;
    c->min_ttl = 0;
    c->max_ttl = 0;
}

/* ---- group: records ---- */

static const char records[] = "mx-host=a.test,mx1.a.test,10\n"
                              "mx-host=a.test,mx3.a.test,10\n"
                              "mx-host=a.test,mx2.a.test,20\n"
                              "host-record=mx1.a.test,192.0.2.1\n"
                              "host-record=mx2.a.test,192.0.2.2,2001:db8::2\n"
                              "host-record=mx3.a.test,192.0.2.3\n"
                              "host-record=implicit.test,192.0.2.9,2001:db8::9\n"
                              "dns-rr=null.test,15,000000\n"
                              "txt-record=nodata.test,\"no mail here\"\n"
                              "mx-host=c.test,cn.a.test,5\n"
                              "cname=cn.a.test,mx1.a.test\n"
                              "mx-host=v6.test,mx6.v6.test,10\n"
                              "host-record=mx6.v6.test,2001:db8::6\n"
                              "mx-host=lit.test,192.0.2.77,10\n"
                              "mx-host=lit2.test,192.0.2.77,5\n"
                              "mx-host=lit2.test,mx1.a.test,10\n"
                              "dns-rr=null2.test,15,000000\n"
                              "dns-rr=null2.test,15,000000\n"
                              "dns-rr=nullmix.test,15,000000\n"
                              "mx-host=nullmix.test,mx2.a.test,10\n"
                              "mx-host=noaddr.test,ghost.noaddr.test,10\n"
                              "mx-host=ghost.test,ghost.ghost.test,5\n"
                              "mx-host=ghost.test,mx3.a.test,10\n"
                              "mx-host=hit.test,mx1.a.test,10\n"
                              "mx-host=dedup.test,mx1.a.test,10\n"
                              "mx-host=cancel.test,mx1.a.test,10\n"
                              "mx-host=xn--bcher-kva.test,mx1.a.test,10\n"
                              "mx-host=dup.test,mx1.a.test,30\n"
                              "mx-host=dup.test,mx1.a.test,10\n"
                              "mx-host=mta-sts.wmx.test,mx1.a.test,10\n"
                              "host-record=mta-sts.wmx.test,192.0.2.50,2001:db8::50\n";

static int
records_setup(void **state)
{
    (void)state;
    char *all = malloc(sizeof(records) + 30 * 100);
    if (all == NULL)
        return -1;
    strcpy(all, records);
    /* An answer too big for one datagram: c-ares goes on over TCP. */
    for (int i = 0; i < 30; i++)
        sprintf(all + strlen(all),
                "mx-host=big.test,mx-%02d-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                ".big.test,%d\n",
                i, i + 1);
    strcat(all, "host-record=mx-00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                ".big.test,192.0.2.100\n");
    int rc = dnsmasq_start(&dm, all, 300);
    free(all);
    skipped = rc == HARNESS_SKIP;
    return rc < 0 ? -1 : 0;
}

static int
group_teardown(void **state)
{
    (void)state;
    dnsmasq_stop(&dm);
    return 0;
}

static void
test_mx_order_and_shuffle(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, v4_nocache);
    int before = dnsmasq_count(&dm, "MX", "a.test");
    unsigned first_mx1 = 0, first_mx3 = 0;
    struct dns_mx_result *first = NULL;
    enum { N = 64 };
    for (int i = 0; i < N; i++) {
        bool sync;
        struct dns_mx_result *r = resolve(&f, "a.test", &sync);
        /* The same answer whatever the shuffle (for a refresh that
         * changes nothing: outbound/dest.c dest_mx_answer) */
        if (first == NULL)
            first = dns_mx_result_ref(r);
        assert_true(dns_mx_result_same(first, r));
        assert_true(dns_mx_result_same(r, first));
        assert_false(sync); /* max_ttl 0: nothing is kept */
        assert_int_equal(r->status, DNS_OK);
        assert_false(r->implicit_mx);
        assert_string_equal(r->domain, "a.test");
        assert_int_equal(r->nhosts, 3);
        assert_int_equal(r->hosts[0].preference, 10);
        assert_int_equal(r->hosts[1].preference, 10);
        if (strcmp(r->hosts[0].name, "mx1.a.test") == 0) {
            first_mx1++;
            assert_host(&r->hosts[0], "mx1.a.test", 10, "192.0.2.1");
            assert_host(&r->hosts[1], "mx3.a.test", 10, "192.0.2.3");
        } else {
            first_mx3++;
            assert_host(&r->hosts[0], "mx3.a.test", 10, "192.0.2.3");
            assert_host(&r->hosts[1], "mx1.a.test", 10, "192.0.2.1");
        }
        assert_host(&r->hosts[2], "mx2.a.test", 20, "192.0.2.2");
        dns_mx_result_unref(r);
    }
    /* Both orders over 64 lookups; all in one order has odds 2^-63. */
    assert_true(first_mx1 > 0);
    assert_true(first_mx3 > 0);
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.misses, N);
    assert_int_equal(st.hits, 0);
    /* The additional section gave every address: one query per lookup. */
    assert_int_equal(st.queries, N);
    assert_int_equal(dnsmasq_count(&dm, "MX", "a.test") - before, N);
    /* Another answer is not the same: fewer hosts, or other hosts. */
    struct dns_mx_result *other = resolve(&f, "hit.test", NULL);
    assert_false(dns_mx_result_same(first, other));
    assert_false(dns_mx_result_same(other, first));
    struct dns_mx_result *ghost = resolve(&f, "ghost.test", NULL); /* mx3 alone: ghost has none */
    assert_int_equal(ghost->nhosts, 1);
    assert_false(dns_mx_result_same(ghost, other));
    assert_true(dns_mx_result_same(other, other));
    dns_mx_result_unref(ghost);
    dns_mx_result_unref(other);
    dns_mx_result_unref(first);
    fx_close(&f);
}

static void
prefer_v6(struct dns_config *c)
{
    c->prefer = DNS_FAMILY_V6;
}

static void
test_family_and_prefer(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, NULL); /* both, v4 first */
    struct dns_mx_result *r = resolve(&f, "a.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_host(&r->hosts[2], "mx2.a.test", 20, "192.0.2.2 2001:db8::2");
    dns_mx_result_unref(r);
    struct dns_stats st;
    dns_stats(f.d, &st);
    /* MX, then AAAA for mx1 and mx3 (the additional section had only
     * their A records). */
    assert_int_equal(st.queries, 3);
    fx_close(&f);

    fx_open(&f, dm.port, prefer_v6);
    r = resolve(&f, "implicit.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_host(&r->hosts[0], "implicit.test", 0, "2001:db8::9 192.0.2.9");
    dns_mx_result_unref(r);
    fx_close(&f);
}

/* Domains naming the same MX host share its answers: the AAAA query for
 * mx1.a.test (the MX answers carry only its A record) is asked for the
 * first domain only, the "no data" kept in the host cache; with max_ttl 0
 * nothing is kept and each domain asks again. */
static void
test_host_answers_shared(void **state)
{
    (void)state;
    struct fx f;
    struct dns_stats st;
    fx_open(&f, dm.port, NULL); /* both */
    int before = dnsmasq_count(&dm, "AAAA", "mx1.a.test");
    struct dns_mx_result *r = resolve(&f, "hit.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_host(&r->hosts[0], "mx1.a.test", 10, "192.0.2.1");
    dns_mx_result_unref(r);
    dns_stats(f.d, &st);
    assert_int_equal(st.queries, 2); /* MX, AAAA mx1.a.test */
    assert_int_equal(st.host_hits, 0);
    assert_int_equal(st.host_entries, 1);
    r = resolve(&f, "dedup.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_host(&r->hosts[0], "mx1.a.test", 10, "192.0.2.1");
    dns_mx_result_unref(r);
    r = resolve(&f, "cancel.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_host(&r->hosts[0], "mx1.a.test", 10, "192.0.2.1");
    dns_mx_result_unref(r);
    dns_stats(f.d, &st);
    assert_int_equal(st.queries, 2 + 2); /* an MX query each, no AAAA */
    assert_int_equal(st.host_hits, 2);
    assert_int_equal(dnsmasq_count(&dm, "AAAA", "mx1.a.test") - before, 1);
    /* Cleared with the cache: asked again. */
    dns_cache_clear(f.d);
    dns_stats(f.d, &st);
    assert_int_equal(st.host_entries, 0);
    r = resolve(&f, "hit.test", NULL);
    dns_mx_result_unref(r);
    dns_stats(f.d, &st);
    assert_int_equal(st.queries, 4 + 2);
    fx_close(&f);

    fx_open(&f, dm.port, both_nocache);
    r = resolve(&f, "hit.test", NULL);
    dns_mx_result_unref(r);
    r = resolve(&f, "dedup.test", NULL);
    dns_mx_result_unref(r);
    dns_stats(f.d, &st);
    assert_int_equal(st.queries, 2 + 2);
    assert_int_equal(st.host_hits, 0);
    assert_int_equal(st.host_entries, 0);
    fx_close(&f);
}

static void
test_implicit_mx(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, NULL);
    struct dns_mx_result *r = resolve(&f, "implicit.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_true(r->implicit_mx);
    assert_int_equal(r->nhosts, 1);
    assert_host(&r->hosts[0], "implicit.test", 0, "192.0.2.9 2001:db8::9");
    dns_mx_result_unref(r);
    fx_close(&f);
}

static void
neg_one_minute(struct dns_config *c)
{
    c->min_ttl = 0;
    c->negative_ttl = 60000;
}

/* An implicit MX rests on the denial of MX records as well as on the
 * domain's addresses (TTL 300 here): it is kept no longer than a
 * not-found answer, so that MX records or a null MX published later are
 * seen within negative_ttl, not after the address TTL (up to max_ttl). */
static void
test_implicit_mx_ttl(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, neg_one_minute);
    struct dns_mx_result *r = resolve(&f, "implicit.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_true(r->implicit_mx);
    assert_true(r->ttl <= 60);
    assert_true(r->expires <= clock_mono_ns() + 60 * 1000000000ULL);
    dns_mx_result_unref(r);
    /* A domain with MX records keeps its addresses' TTL. */
    r = resolve(&f, "hit.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_false(r->implicit_mx);
    assert_int_equal(r->ttl, 300);
    dns_mx_result_unref(r);
    fx_close(&f);
}

static void
test_null_mx(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, NULL);
    struct dns_mx_result *r = resolve(&f, "null.test", NULL);
    assert_int_equal(r->status, DNS_NULL_MX);
    assert_int_equal(r->nhosts, 0);
    assert_string_equal(dns_status_str(r->status), "null_mx");
    dns_mx_result_unref(r);
    /* The null MX record twice: still a null MX (it was a temporary
     * failure, "no MX target is a host name", until the mail expired). */
    r = resolve(&f, "null2.test", NULL);
    assert_int_equal(r->status, DNS_NULL_MX);
    dns_mx_result_unref(r);
    /* A "." among real MX records is no host: skipped, not a null MX. */
    r = resolve(&f, "nullmix.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->nhosts, 1);
    assert_host(&r->hosts[0], "mx2.a.test", 10, "192.0.2.2 2001:db8::2");
    dns_mx_result_unref(r);
    fx_close(&f);
}

static void
test_not_found(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, NULL);
    struct dns_mx_result *r = resolve(&f, "nx.test", NULL);
    assert_int_equal(r->status, DNS_NOT_FOUND);
    assert_string_equal(r->why, "NXDOMAIN");
    /* no SOA from dnsmasq: negative_ttl (5m) */
    assert_int_equal(r->ttl, 300);
    dns_mx_result_unref(r);
    /* The name exists, with neither MX nor addresses. */
    r = resolve(&f, "nodata.test", NULL);
    assert_int_equal(r->status, DNS_NOT_FOUND);
    assert_int_equal(r->nhosts, 0);
    dns_mx_result_unref(r);
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.queries, 1 + 3); /* MX; MX, A, AAAA */
    fx_close(&f);
}

static void
test_cname_host(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, NULL);
    struct dns_mx_result *r = resolve(&f, "c.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->nhosts, 1);
    /* Named as the MX names it, with its target's addresses. */
    assert_host(&r->hosts[0], "cn.a.test", 5, "192.0.2.1");
    dns_mx_result_unref(r);
    fx_close(&f);
}

/* A host reached by name (the MTA-STS policy host, RFC 8461 3.3) has
 * its own A/AAAA looked up, whatever MX records the name has (a wildcard
 * MX gives it some): no MX query, and the MX answer and the address
 * answer of one name are two cache entries that never stand for each
 * other. */
static void
test_addr_lookup(void **state)
{
    (void)state;
    struct fx f;
    struct dns_stats st;
    bool sync;
    fx_open(&f, dm.port, NULL);
    int mx_before = dnsmasq_count(&dm, "MX", "mta-sts.wmx.test");
    struct dns_mx_result *r = resolve_kind(&f, "MTA-STS.wmx.test.", true, &sync);
    assert_false(sync);
    assert_int_equal(r->status, DNS_OK);
    assert_false(r->implicit_mx);
    assert_string_equal(r->domain, "mta-sts.wmx.test");
    assert_int_equal(r->nhosts, 1);
    assert_host(&r->hosts[0], "mta-sts.wmx.test", 0, "192.0.2.50 2001:db8::50");
    assert_int_equal(r->hosts[0].dane, DNS_DANE_NONE);
    dns_mx_result_unref(r);
    assert_int_equal(dnsmasq_count(&dm, "MX", "mta-sts.wmx.test") - mx_before, 0);
    dns_stats(f.d, &st);
    assert_int_equal(st.queries, 2); /* A, AAAA */
    /* The same name's MX answer: its own entry, its own query. */
    r = resolve_kind(&f, "mta-sts.wmx.test", false, &sync);
    assert_false(sync);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->nhosts, 1);
    assert_host(&r->hosts[0], "mx1.a.test", 10, "192.0.2.1");
    dns_mx_result_unref(r);
    assert_int_equal(dnsmasq_count(&dm, "MX", "mta-sts.wmx.test") - mx_before, 1);
    /* Both kept, each answering for itself. */
    r = resolve_kind(&f, "mta-sts.wmx.test", true, &sync);
    assert_true(sync);
    assert_host(&r->hosts[0], "mta-sts.wmx.test", 0, "192.0.2.50 2001:db8::50");
    dns_mx_result_unref(r);
    r = resolve_kind(&f, "mta-sts.wmx.test", false, &sync);
    assert_true(sync);
    assert_host(&r->hosts[0], "mx1.a.test", 10, "192.0.2.1");
    dns_mx_result_unref(r);
    dns_stats(f.d, &st);
    assert_int_equal(st.entries, 2);
    assert_int_equal(st.hits, 2);
    /* A CNAME is followed; the answers of an MX host are shared. */
    r = resolve_kind(&f, "cn.a.test", true, NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_host(&r->hosts[0], "cn.a.test", 0, "192.0.2.1");
    dns_mx_result_unref(r);
    /* Not found: no such name, a name without addresses (it has a
     * TXT record), and a name whose MX records are all it has. */
    r = resolve_kind(&f, "nx.test", true, NULL);
    assert_int_equal(r->status, DNS_NOT_FOUND);
    dns_mx_result_unref(r);
    r = resolve_kind(&f, "nodata.test", true, NULL);
    assert_int_equal(r->status, DNS_NOT_FOUND);
    assert_string_equal(r->why, "no address records");
    assert_int_equal(r->nhosts, 0);
    dns_mx_result_unref(r);
    r = resolve_kind(&f, "a.test", true, NULL);
    assert_int_equal(r->status, DNS_NOT_FOUND);
    dns_mx_result_unref(r);
    /* An address literal is no host name here. */
    r = resolve_kind(&f, "[192.0.2.1]", true, &sync);
    assert_true(sync);
    assert_int_equal(r->status, DNS_FAIL);
    dns_mx_result_unref(r);
    fx_close(&f);
}

static void
test_ipv6_only(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, NULL);
    struct dns_mx_result *r = resolve(&f, "v6.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_host(&r->hosts[0], "mx6.v6.test", 10, "2001:db8::6");
    dns_mx_result_unref(r);
    fx_close(&f);
    /* With IPv4 only, the one MX host has no usable address. */
    fx_open(&f, dm.port, v4_only);
    r = resolve(&f, "v6.test", NULL);
    assert_int_equal(r->status, DNS_FAIL);
    assert_string_equal(r->why, "no MX host has an address");
    assert_false(r->bad_name); /* deferred, not bounced: the name is good */
    assert_false(r->mx_no_host);
    dns_mx_result_unref(r);
    fx_close(&f);
}

static void
test_skipped_targets(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, NULL);
    /* An address as MX target is no host name (RFC 5321 5.1). */
    struct dns_mx_result *r = resolve(&f, "lit.test", NULL);
    assert_int_equal(r->status, DNS_FAIL);
    assert_string_equal(r->why, "no MX target is a host name (an IP address or a malformed name)");
    assert_true(r->mx_no_host);
    dns_mx_result_unref(r);
    r = resolve(&f, "lit2.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->nhosts, 1);
    assert_host(&r->hosts[0], "mx1.a.test", 10, "192.0.2.1");
    dns_mx_result_unref(r);
    /* An MX host that does not exist is skipped... */
    r = resolve(&f, "ghost.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_false(r->partial);
    assert_int_equal(r->nhosts, 1);
    assert_host(&r->hosts[0], "mx3.a.test", 10, "192.0.2.3");
    dns_mx_result_unref(r);
    /* ...and when it was the only one, the domain fails. */
    r = resolve(&f, "noaddr.test", NULL);
    assert_int_equal(r->status, DNS_FAIL);
    dns_mx_result_unref(r);
    /* A host listed twice keeps its best preference. */
    r = resolve(&f, "dup.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->nhosts, 1);
    assert_host(&r->hosts[0], "mx1.a.test", 10, "192.0.2.1");
    dns_mx_result_unref(r);
    fx_close(&f);
}

static void
test_names(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, v4_only);
    bool sync;
    struct dns_mx_result *r = resolve(&f, "hit.test", &sync);
    assert_false(sync);
    dns_mx_result_unref(r);
    /* Case and a trailing dot do not make another domain. */
    r = resolve(&f, "HiT.TeSt.", &sync);
    assert_true(sync);
    assert_string_equal(r->domain, "hit.test");
    dns_mx_result_unref(r);
    /* IDN as A-labels. */
    r = resolve(&f, "XN--BCHER-KVA.test", &sync);
    assert_false(sync);
    assert_int_equal(r->status, DNS_OK);
    assert_string_equal(r->domain, "xn--bcher-kva.test");
    dns_mx_result_unref(r);
    static const char *const bad[] = {"b\xc3\xbc"
                                      "cher.test",
                                      "",
                                      ".",
                                      "a..test",
                                      "-a.test",
                                      "a-.test",
                                      "a b.test",
                                      "192.0.2.1",
                                      "user@a.test",
                                      "[192.0.2.300]",
                                      "[IPv6:zz::1]",
                                      "[]"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        r = resolve(&f, bad[i], &sync);
        assert_true(sync);
        assert_int_equal(r->status, DNS_FAIL);
        assert_true(r->bad_name); /* never asked again: it can exist nowhere */
        dns_mx_result_unref(r);
    }
    r = resolve(&f, "[192.0.2.5]", &sync);
    assert_true(sync);
    assert_int_equal(r->status, DNS_OK);
    assert_true(r->literal);
    assert_host(&r->hosts[0], "[192.0.2.5]", 0, "192.0.2.5");
    dns_mx_result_unref(r);
    r = resolve(&f, "[IPv6:2001:db8::5]", &sync);
    assert_true(sync);
    assert_host(&r->hosts[0], "[IPv6:2001:db8::5]", 0, "2001:db8::5");
    dns_mx_result_unref(r);
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.queries, 2); /* hit.test and the IDN */
    fx_close(&f);

    char out[DNS_NAME_MAX + 1];
    assert_int_equal(dns_name_normalize("Mail.Example.COM.", out), 16);
    assert_string_equal(out, "mail.example.com");
    char longname[300];
    memset(longname, 'a', sizeof(longname));
    longname[63] = '.';
    longname[64] = '\0';
    assert_int_equal(dns_name_normalize(longname, out), 63); /* a 63-char label and its dot */
    longname[63] = 'a';
    assert_int_equal(dns_name_normalize(longname, out), -EINVAL); /* 64 */
}

static void
test_cache_hit_makes_no_query(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, v4_only);
    int before = dnsmasq_count(&dm, "MX", "hit.test");
    bool sync;
    struct dns_mx_result *first = resolve(&f, "hit.test", &sync);
    assert_false(sync);
    assert_int_equal(first->status, DNS_OK);
    assert_int_equal(first->ttl, 300); /* --local-ttl */
    for (int i = 0; i < 100; i++) {
        struct dns_mx_result *r = resolve(&f, "hit.test", &sync);
        assert_true(sync);
        assert_ptr_equal(r, first); /* the same immutable answer, shared */
        dns_mx_result_unref(r);
    }
    dns_mx_result_unref(first);
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.misses, 1);
    assert_int_equal(st.hits, 100);
    assert_int_equal(st.queries, 1);
    assert_int_equal(dnsmasq_count(&dm, "MX", "hit.test") - before, 1);
    fx_close(&f);
}

static void
test_thousand_concurrent_one_query(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, v4_only);
    int before = dnsmasq_count(&dm, "MX", "dedup.test");
    enum { N = 1000 };
    static struct slot slots[N];
    unsigned done = 0;
    memset(slots, 0, sizeof(slots));
    for (int i = 0; i < N; i++) {
        struct dns_mx_result *res;
        struct dns_req *req;
        assert_int_equal(dns_mx_resolve(f.d, "dedup.test", on_done, &slots[i], &res, &req), 0);
    }
    /* run until all came back: count through a loop over the slots */
    uint64_t end = clock_mono_ns() + 10000000000ULL;
    while (done < N && clock_mono_ns() < end) {
        unsigned one = 0;
        ploop_run(&f.loop, &one, 1, 100);
        done = 0;
        for (int i = 0; i < N; i++)
            done += slots[i].done;
    }
    assert_int_equal(done, N);
    for (int i = 0; i < N; i++) {
        assert_int_equal(slots[i].done, 1);
        assert_ptr_equal(slots[i].res, slots[0].res);
        assert_int_equal(slots[i].res->status, DNS_OK);
    }
    for (int i = 0; i < N; i++)
        dns_mx_result_unref(slots[i].res);
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.misses, 1);
    assert_int_equal(st.joined, N - 1);
    assert_int_equal(st.queries, 1);
    assert_int_equal(st.requests, 0);
    assert_int_equal(dnsmasq_count(&dm, "MX", "dedup.test") - before, 1);
    fx_close(&f);
}

struct canceller {
    struct dns *d;
    struct dns_req *victim;
    unsigned done;
};

static void
on_done_cancel(void *arg, struct dns_mx_result *res)
{
    struct canceller *c = arg;
    dns_cancel(c->d, c->victim); /* already on the ready list */
    dns_mx_result_unref(res);
    c->done++;
}

static void
test_cancel(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, v4_only);
    struct slot a = {0}, b = {0}, c = {0};
    struct canceller k = {.d = f.d};
    struct dns_mx_result *res;
    struct dns_req *ra, *rb, *rk, *rc;
    assert_int_equal(dns_mx_resolve(f.d, "cancel.test", on_done, &a, &res, &ra), 0);
    assert_int_equal(dns_mx_resolve(f.d, "cancel.test", on_done, &b, &res, &rb), 0);
    assert_int_equal(dns_mx_resolve(f.d, "cancel.test", on_done_cancel, &k, &res, &rk), 0);
    assert_int_equal(dns_mx_resolve(f.d, "cancel.test", on_done, &c, &res, &rc), 0);
    k.victim = rc;
    dns_cancel(f.d, ra); /* while the lookup runs */
    assert_int_equal(ploop_run(&f.loop, &k.done, 1, 10000), 0);
    assert_int_equal(a.done, 0);
    assert_int_equal(b.done, 1);
    assert_int_equal(c.done, 0);
    assert_int_equal(b.res->status, DNS_OK);
    dns_mx_result_unref(b.res);
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.requests, 0);
    /* A pending request dropped by dns_free: its callback never runs. */
    assert_int_equal(dns_mx_resolve(f.d, "a.test", on_done, &a, &res, &ra), 0);
    fx_close(&f);
    assert_int_equal(a.done, 0);
}

static void
small_cache(struct dns_config *c)
{
    c->cache_size = 16;
}

static void
test_eviction(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, small_cache);
    char name[64];
    for (int i = 0; i < 20; i++) {
        snprintf(name, sizeof(name), "evict%d.test", i);
        dns_mx_result_unref(resolve(&f, name, NULL));
    }
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.entries, 16);
    assert_int_equal(st.evictions, 4);
    bool sync;
    dns_mx_result_unref(resolve(&f, "evict19.test", &sync)); /* recent: kept */
    assert_true(sync);
    dns_mx_result_unref(resolve(&f, "evict4.test", &sync)); /* oldest kept */
    assert_true(sync);
    dns_mx_result_unref(resolve(&f, "evict0.test", &sync)); /* evicted first */
    assert_false(sync);
    dns_stats(f.d, &st);
    assert_int_equal(st.entries, 16);
    assert_int_equal(st.evictions, 5);
    /* evict5 was least recently used (evict4 was just touched) */
    dns_mx_result_unref(resolve(&f, "evict5.test", &sync));
    assert_false(sync);
    dns_cache_clear(f.d);
    dns_stats(f.d, &st);
    assert_int_equal(st.entries, 0);
    fx_close(&f);
}

static void
three_hosts(struct dns_config *c)
{
    c->max_mx_hosts = 3;
    c->family = DNS_FAMILY_V4;
}

static void
test_tcp_fallback(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, three_hosts);
    struct dns_mx_result *r = resolve(&f, "big.test", NULL);
    assert_int_equal(r->status, DNS_OK);
    /* 30 MX in the answer (it came over TCP); the best 3 resolved, of
     * which one exists. */
    assert_int_equal(r->nhosts, 1);
    assert_host(&r->hosts[0],
                "mx-00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.big.test", 1,
                "192.0.2.100");
    dns_mx_result_unref(r);
    struct dns_stats st;
    dns_stats(f.d, &st);
    /* MX, then A for the two best hosts the additional section of the TCP
     * answer did not cover */
    assert_int_equal(st.queries, 1 + 2);
    /* more than one socket: UDP, then TCP */
    assert_true(f.loop.changes >= 3);
    fx_close(&f);
}

static void
test_refused_is_retry(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, NULL);
    /* dnsmasq has no upstream for names outside .test: REFUSED */
    struct dns_mx_result *r = resolve(&f, "example.org", NULL);
    assert_int_equal(r->status, DNS_RETRY);
    /* c-ares 1.18 tries the next server on SERVFAIL and REFUSED and then
     * reports neither */
    assert_string_equal(r->why, "server failure (SERVFAIL, REFUSED or unreachable)");
    assert_int_equal(r->ttl, 10); /* error_ttl */
    dns_mx_result_unref(r);
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.failures, 1);
    fx_close(&f);
}

static void
quick_timeout(struct dns_config *c)
{
    c->timeout = 200;
    c->tries = 1;
}

static void
test_timeout_is_retry(void **state)
{
    (void)state;
    int port;
    int silent = silent_server(&port);
    assert_true(silent >= 0);
    struct fx f;
    fx_open(&f, port, quick_timeout);
    uint64_t t0 = clock_mono_ns();
    bool sync;
    struct dns_mx_result *r = resolve(&f, "a.test", &sync);
    uint64_t ms = (clock_mono_ns() - t0) / 1000000;
    assert_false(sync);
    assert_int_equal(r->status, DNS_RETRY);
    assert_string_equal(r->why, "timeout");
    assert_true(ms >= 150 && ms < 3000);
    dns_mx_result_unref(r);
    /* Kept for error_ttl: a burst for the domain does not wait again. */
    r = resolve(&f, "a.test", &sync);
    assert_true(sync);
    assert_int_equal(r->status, DNS_RETRY);
    dns_mx_result_unref(r);
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.timeouts, 1);
    assert_int_equal(st.failures, 1);
    fx_close(&f);
    close(silent);
}

static void
test_config(void **state)
{
    (void)state;
    struct dns_config c;
    char err[256];
    const char *what;
    harness_config(&c, 53);
    static const char *const good[] = {"127.0.0.1", "127.0.0.1:5353, [::1]:53", "::1 192.0.2.1",
                                       "[2001:db8::1]"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        assert_int_equal(conf_set(dns_conf_keys, &c, "servers", good[i], err, sizeof(err)), 0);
        assert_int_equal(dns_config_check(&c, &what, err, sizeof(err)), 0);
    }
    static const char *const bad[] = {"localhost", "127.0.0.1:0",   "127.0.0.1:99999",
                                      "[::1",      "1.2.3.4:53:53", ","};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_int_equal(conf_set(dns_conf_keys, &c, "servers", bad[i], err, sizeof(err)), 0);
        assert_int_equal(dns_config_check(&c, &what, err, sizeof(err)), DNS_ESERVERS);
        assert_string_equal(what, "servers");
        struct dns *d;
        assert_int_equal(dns_new(&c, ploop_sock, NULL, &d, err, sizeof(err)), DNS_ESERVERS);
        assert_null(d);
    }
    assert_int_equal(conf_set(dns_conf_keys, &c, "family", "v5", err, sizeof(err)), -EINVAL);
    assert_int_equal(conf_set(dns_conf_keys, &c, "family", "v6", err, sizeof(err)), 0);
    assert_int_equal(c.family, DNS_FAMILY_V6);
    conf_free(dns_conf_keys, &c);
}

/* ---- group: ttl ---- */

static int
ttl_setup(void **state)
{
    (void)state;
    int rc = dnsmasq_start(&dm,
                           "mx-host=ttl.test,mx.ttl.test,10\n"
                           "host-record=mx.ttl.test,192.0.2.8\n"
                           "mx-host=sweep0.test,mx.ttl.test,10\n"
                           "mx-host=sweep1.test,mx.ttl.test,10\n"
                           "mx-host=sweep2.test,mx.ttl.test,10\n",
                           1);
    skipped = rc == HARNESS_SKIP;
    return rc < 0 ? -1 : 0;
}

static void
short_ttl(struct dns_config *c)
{
    c->family = DNS_FAMILY_V4;
    c->min_ttl = 0;
}

static void
test_expiry_after_ttl(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, short_ttl);
    bool sync;
    struct dns_mx_result *r = resolve(&f, "ttl.test", &sync);
    assert_false(sync);
    assert_int_equal(r->ttl, 1);
    uint64_t expires = r->expires;
    dns_mx_result_unref(r);
    dns_mx_result_unref(resolve(&f, "ttl.test", &sync));
    assert_true(sync);
    /* The one wait that is not synchronisation: the TTL must elapse. */
    while (clock_mono_ns() <= expires)
        usleep(20000);
    r = resolve(&f, "ttl.test", &sync);
    assert_false(sync);
    assert_int_equal(r->status, DNS_OK);
    dns_mx_result_unref(r);
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.misses, 2);
    assert_int_equal(st.hits, 1);
    assert_int_equal(dnsmasq_count(&dm, "MX", "ttl.test"), 2);
    fx_close(&f);
}

/* Expired answers leave the cache without being asked for again: a node
 * that sent to a domain once does not keep its answer for ever (issue 14,
 * bounded memory). The host loop only follows dns_timeout(), as a worker
 * does; once the cache is empty it asks for no more wake-ups. */
static void
test_expired_answers_swept(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, short_ttl); /* min_ttl 0: a sweep each second */
    struct dns_stats st;
    assert_int_equal(dns_timeout(f.d, clock_mono_ns()), UINT64_MAX); /* idle: no wake-up */
    uint64_t expires = 0;
    char name[32];
    for (int i = 0; i < 3; i++) {
        snprintf(name, sizeof(name), "sweep%d.test", i);
        struct dns_mx_result *r = resolve(&f, name, NULL);
        assert_int_equal(r->status, DNS_OK);
        assert_int_equal(r->ttl, 1);
        expires = r->expires > expires ? r->expires : expires;
        dns_mx_result_unref(r);
    }
    dns_stats(f.d, &st);
    assert_int_equal(st.entries, 3);
    /* A sweep is due within a second; the answers expire after one. */
    uint64_t now = clock_mono_ns();
    uint64_t t = dns_timeout(f.d, now);
    assert_true(t != UINT64_MAX && t <= now + 1000000000ULL);
    /* Drive the loop as a worker would, bounded: 5 s is twice the worst
     * case (TTL 1 s, then a sweep at most 1 s later). */
    uint64_t end = now + 5000000000ULL;
    unsigned never = 0;
    while (clock_mono_ns() < end) {
        (void)ploop_run(&f.loop, &never, 1, 100);
        dns_stats(f.d, &st);
        if (st.entries == 0)
            break;
    }
    assert_true(clock_mono_ns() >= expires); /* not before their time */
    dns_stats(f.d, &st);
    assert_int_equal(st.entries, 0);
    assert_int_equal(st.expired, 3);
    assert_int_equal(st.evictions, 0);
    assert_int_equal(dns_timeout(f.d, clock_mono_ns()), UINT64_MAX);
    /* Looked up again after the sweep: a fresh query, cached again. */
    bool sync;
    dns_mx_result_unref(resolve(&f, "sweep0.test", &sync));
    assert_false(sync);
    dns_mx_result_unref(resolve(&f, "sweep0.test", &sync));
    assert_true(sync);
    fx_close(&f);
}

/* ---- group: many ---- */

enum { MANY = 10000 };

static int
many_setup(void **state)
{
    (void)state;
    size_t cap = (size_t)MANY * 80;
    char *text = malloc(cap);
    if (text == NULL)
        return -1;
    size_t len = 0;
    for (int i = 0; i < MANY; i++)
        len += (size_t)snprintf(text + len, cap - len,
                                "mx-host=d%d.test,m%d.test,10\nhost-record=m%d.test,10.%d.%d.%d\n",
                                i, i, i, i >> 16, (i >> 8) & 255, i & 255);
    int rc = dnsmasq_start(&dm, text, 300);
    free(text);
    skipped = rc == HARNESS_SKIP;
    return rc < 0 ? -1 : 0;
}

struct many {
    unsigned done;
    struct dns_mx_result *res[MANY];
};

struct many_slot {
    struct many *m;
    unsigned i;
};

static void
on_many(void *arg, struct dns_mx_result *res)
{
    struct many_slot *s = arg;
    s->m->res[s->i] = res;
    s->m->done++;
}

static void
test_ten_thousand_domains(void **state)
{
    (void)state;
    struct fx f;
    fx_open(&f, dm.port, v4_only);
    struct many *m = calloc(1, sizeof(*m));
    struct many_slot *slots = calloc(MANY, sizeof(*slots));
    assert_non_null(m);
    assert_non_null(slots);
    char name[32];
    for (unsigned i = 0; i < MANY; i++) {
        slots[i].m = m;
        slots[i].i = i;
        snprintf(name, sizeof(name), "D%u.test", i);
        struct dns_mx_result *res;
        struct dns_req *req;
        assert_int_equal(dns_mx_resolve(f.d, name, on_many, &slots[i], &res, &req), 0);
    }
    struct dns_stats st;
    dns_stats(f.d, &st);
    assert_int_equal(st.inflight, 64); /* max_inflight, by default; the rest wait */
    assert_int_equal(st.queued, MANY - 64);
    assert_int_equal(ploop_run(&f.loop, &m->done, MANY, 40000), 0);
    for (unsigned i = 0; i < MANY; i++) {
        struct dns_mx_result *r = m->res[i];
        char host[32], addr[32];
        snprintf(host, sizeof(host), "m%u.test", i);
        snprintf(addr, sizeof(addr), "10.%u.%u.%u", i >> 16, (i >> 8) & 255, i & 255);
        assert_non_null(r);
        if (r->status != DNS_OK)
            fail_msg("%s: %s (%s)", r->domain, dns_status_str(r->status), r->why);
        assert_int_equal(r->nhosts, 1);
        assert_host(&r->hosts[0], host, 10, addr);
        dns_mx_result_unref(r);
    }
    dns_stats(f.d, &st);
    assert_int_equal(st.queries, MANY);
    assert_int_equal(st.failures, 0);
    assert_int_equal(st.entries, MANY);
    free(m);
    free(slots);
    fx_close(&f);
}

int
main(void)
{
    const struct CMUnitTest record_tests[] = {
        cmocka_unit_test(test_config),
        cmocka_unit_test(test_mx_order_and_shuffle),
        cmocka_unit_test(test_family_and_prefer),
        cmocka_unit_test(test_host_answers_shared),
        cmocka_unit_test(test_implicit_mx),
        cmocka_unit_test(test_implicit_mx_ttl),
        cmocka_unit_test(test_null_mx),
        cmocka_unit_test(test_not_found),
        cmocka_unit_test(test_cname_host),
        cmocka_unit_test(test_addr_lookup),
        cmocka_unit_test(test_ipv6_only),
        cmocka_unit_test(test_skipped_targets),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_cache_hit_makes_no_query),
        cmocka_unit_test(test_thousand_concurrent_one_query),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_eviction),
        cmocka_unit_test(test_tcp_fallback),
        cmocka_unit_test(test_refused_is_retry),
        cmocka_unit_test(test_timeout_is_retry),
    };
    const struct CMUnitTest ttl_tests[] = {
        cmocka_unit_test(test_expiry_after_ttl),
        cmocka_unit_test(test_expired_answers_swept),
    };
    const struct CMUnitTest many_tests[] = {
        cmocka_unit_test(test_ten_thousand_domains),
    };
    int failed =
        cmocka_run_group_tests_name("dns records", record_tests, records_setup, group_teardown);
    if (skipped)
        return HARNESS_SKIP;
    failed += cmocka_run_group_tests_name("dns ttl", ttl_tests, ttl_setup, group_teardown);
    failed += cmocka_run_group_tests_name("dns many", many_tests, many_setup, group_teardown);
    return failed ? 1 : 0;
}
