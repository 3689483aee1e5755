/*
 * Sites without a network: the concurrency window from scripted events
 * (transactions that complete, head latencies, failures of connections
 * opened in a given epoch) to the connections it allows; site keys from MX answers; the
 * per-address table (a v4-mapped address counted as its IPv4 one; its
 * cap held for the node across workers, and under threads taking slots
 * at once); the hash table of common/ under inserts and removals.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <cmocka.h>

#include "common/hash.h"
#include "engine/outbound/site.h"

static void
window_slow_start_then_additive(void **state)
{
    (void)state;
    struct site_window w;
    site_window_init(&w, 4, 20);
    assert_int_equal(site_window_allowed(&w), 4);
    /* Connections take 20 ms to open; a job that waited 50 ms would have
     * gone sooner on a new one. */
    site_window_on_ready(&w, 20000000);
    /* An unused window earns nothing. */
    site_window_on_wait(&w, 150000000);
    site_window_on_success(&w, 1);
    assert_int_equal(site_window_allowed(&w), 4);
    /* Used: one more per transaction (slow start) up to the ceiling. */
    for (unsigned i = 0; i < 30; i++) {
        site_window_on_wait(&w, 150000000);
        site_window_on_success(&w, site_window_allowed(&w));
    }
    assert_int_equal(site_window_allowed(&w), 20);
    /* A failure halves, once per epoch. */
    unsigned epoch = w.epoch;
    assert_true(site_window_on_failure(&w, epoch));
    assert_int_equal(site_window_allowed(&w), 10);
    assert_false(site_window_on_failure(&w, epoch)); /* same round: no more */
    assert_int_equal(site_window_allowed(&w), 10);
    /* Above the threshold: one connection per window of transactions. */
    for (unsigned i = 0; i < 9; i++) {
        site_window_on_wait(&w, 150000000);
        site_window_on_success(&w, 10);
    }
    assert_int_equal(site_window_allowed(&w), 10);
    site_window_on_wait(&w, 150000000);
    site_window_on_success(&w, 10);
    site_window_on_wait(&w, 150000000);
    site_window_on_success(&w, 10);
    assert_int_equal(site_window_allowed(&w), 11);
    /* Failures in a row, each of a new round: down to one, never zero. */
    for (unsigned i = 0; i < 10; i++)
        site_window_on_failure(&w, w.epoch);
    assert_int_equal(site_window_allowed(&w), 1);
    /* A lower ceiling holds at once. */
    site_window_init(&w, 8, 100);
    site_window_set_ceiling(&w, 3);
    assert_int_equal(site_window_allowed(&w), 3);
}

/* A higher ceiling (a reload raising max_connections, or a domain with a
 * higher one joining the site) keeps a window that never failed in slow
 * start up to it; one that failed stays additive. Before, the threshold
 * stayed at the old ceiling: 20 connections more took some 500
 * transactions where they take 20. */
static void
window_raised_ceiling_keeps_slow_start(void **state)
{
    (void)state;
    struct site_window w;
    site_window_init(&w, 4, 20);
    site_window_on_ready(&w, 20000000);
    for (unsigned i = 0; i < 30; i++) {
        site_window_on_wait(&w, 150000000);
        site_window_on_success(&w, site_window_allowed(&w));
    }
    assert_int_equal(site_window_allowed(&w), 20);
    site_window_set_ceiling(&w, 40);
    for (unsigned i = 0; i < 20; i++) {
        site_window_on_wait(&w, 150000000);
        site_window_on_success(&w, site_window_allowed(&w));
    }
    assert_int_equal(site_window_allowed(&w), 40);
    /* After a failure the threshold is the failure's, whatever the ceiling. */
    assert_true(site_window_on_failure(&w, w.epoch));
    assert_int_equal(site_window_allowed(&w), 20);
    site_window_set_ceiling(&w, 80);
    for (unsigned i = 0; i < 20; i++) {
        site_window_on_wait(&w, 150000000);
        site_window_on_success(&w, site_window_allowed(&w));
    }
    assert_true(site_window_allowed(&w) <= 21); /* additive: about one per window */
}

/* While the connections queue by the head latency (MAIL sent to the go
 * for the body: Vegas's test), mail that waits earns no connection: on a
 * machine loaded by other work every job waited, and sites of 100 MX
 * hosts grew to their cap of 20 connections each at a third of the rate.
 * The wait stays noted: growth goes on once the latency is back. */
static void
window_holds_while_connections_queue(void **state)
{
    (void)state;
    struct site_window w;
    uint64_t now = 1000000000ULL, ms = 1000000ULL;
    site_window_init(&w, 1, 20);
    site_window_on_ready(&w, 1 * ms);
    /* No head latency yet: the wait rule alone. */
    assert_false(site_window_queues(&w, 20));
    /* A base of 0.1 ms; transactions at the base: grows. */
    for (unsigned i = 0; i < 3; i++) {
        site_window_on_head(&w, ms / 10, now);
        site_window_on_wait(&w, 150 * ms);
        site_window_on_success(&w, site_window_allowed(&w));
    }
    assert_int_equal(site_window_allowed(&w), 4);
    /* The latency climbs to 10 ms: 4 * (10 - 0.1) / 10 = 3.96 queued, not
     * yet SITE_HEAD_QUEUED (4); at 5 connections it is. */
    for (unsigned i = 0; i < 200; i++)
        site_window_on_head(&w, 10 * ms, now);
    assert_false(site_window_queues(&w, 4));
    assert_true(site_window_queues(&w, 5));
    site_window_on_wait(&w, 150 * ms);
    site_window_on_success(&w, 4);
    assert_int_equal(site_window_allowed(&w), 5);
    for (unsigned i = 0; i < 20; i++) {
        site_window_on_wait(&w, 150 * ms);
        site_window_on_success(&w, site_window_allowed(&w));
    }
    assert_int_equal(site_window_allowed(&w), 5); /* held */
    /* Back at the base: the wait noted above grows it at once. */
    for (unsigned i = 0; i < 200; i++)
        site_window_on_head(&w, ms / 10, now);
    assert_false(site_window_queues(&w, 5));
    site_window_on_success(&w, 5);
    assert_int_equal(site_window_allowed(&w), 6);
}

/* The excess must also come to SITE_HEAD_SLACK_NS: a LAN's jitter of a
 * worker's turn is no queue, whatever its ratio. And the base is the
 * least of this period's and the last's: a path that got slower for good
 * (a longer route) is the new base two periods on. */
static void
window_head_slack_and_base_periods(void **state)
{
    (void)state;
    struct site_window w;
    uint64_t now = 1000000000ULL, us = 1000ULL, ms = 1000000ULL;
    site_window_init(&w, 1, 20);
    site_window_on_head(&w, 10 * us, now);
    for (unsigned i = 0; i < 200; i++)
        site_window_on_head(&w, 900 * us, now);
    assert_false(site_window_queues(&w, 20)); /* 0.89 ms over: under the slack */
    for (unsigned i = 0; i < 200; i++)
        site_window_on_head(&w, 30 * ms, now);
    assert_true(site_window_queues(&w, 20));
    /* 30 ms from now on: the 10 us of the first period is the base until
     * the period after next. */
    now += SITE_HEAD_PERIOD_NS;
    site_window_on_head(&w, 30 * ms, now);
    assert_true(site_window_queues(&w, 20));
    now += SITE_HEAD_PERIOD_NS;
    site_window_on_head(&w, 30 * ms, now);
    assert_false(site_window_queues(&w, 20));
}

/* A receiver whose answers vary (10 to 90 ms, about 50 on average: its
 * least a fifth of its average) is no queue at any count of connections:
 * the average must be SITE_HEAD_RATIO times the least. The test on the
 * least alone stopped such a site at 6 connections. */
static void
window_head_variance_is_no_queue(void **state)
{
    (void)state;
    struct site_window w;
    uint64_t now = 1000000000ULL, ms = 1000000ULL;
    site_window_init(&w, 1, 40);
    site_window_on_ready(&w, 30 * ms);
    for (unsigned i = 0; i < 400; i++)
        site_window_on_head(&w, (10 + (i * 37) % 81) * ms, now + i * ms);
    assert_true(w.head_avg_ns > 3.0 * 10 * ms && w.head_avg_ns < SITE_HEAD_RATIO * 10 * ms);
    assert_false(site_window_queues(&w, 40));
    for (unsigned i = 0; i < 60; i++) {
        site_window_on_wait(&w, 150 * ms);
        site_window_on_success(&w, site_window_allowed(&w));
    }
    assert_int_equal(site_window_allowed(&w), 40);
}

/* After a lull with no transaction (no sample for two periods or more),
 * the least head latency from before it is no base: what the path does
 * now is. A site that was fast at 1 ms, idle for a minute, then at 50 ms
 * steady does not count its connections as queued on a base of 1 ms. */
static void
window_head_base_forgets_a_lull(void **state)
{
    (void)state;
    struct site_window w;
    uint64_t now = 1000000000ULL, ms = 1000000ULL;
    site_window_init(&w, 1, 20);
    for (unsigned i = 0; i < 50; i++)
        site_window_on_head(&w, 1 * ms, now);
    now += 60 * 1000 * ms; /* a minute without mail for the site */
    for (unsigned i = 0; i < 50; i++)
        site_window_on_head(&w, 50 * ms, now + i * ms);
    assert_false(site_window_queues(&w, 6)); /* 50 ms on a base of 50 ms: none queued */
    /* One period's gap only: the last period's least still counts. */
    now += SITE_HEAD_PERIOD_NS;
    site_window_on_head(&w, 80 * ms, now);
    assert_int_equal(w.head_base_ns[1], 50 * ms);
}

/* The window grows only for mail that waited longer than twice the
 * time a connection of the site takes to open: the connections there are
 * served the rest as soon. */
static void
window_grows_only_when_mail_waits(void **state)
{
    (void)state;
    struct site_window w;
    site_window_init(&w, 2, 20);
    /* No connection ready yet: no measure of waiting. */
    site_window_on_wait(&w, 1000000000);
    site_window_on_success(&w, 2);
    assert_int_equal(site_window_allowed(&w), 2);
    /* Connections open in 2 ms (a moving average: 1 ms, then 5 ms
     * samples move it a quarter of the way each). */
    site_window_on_ready(&w, 2000000);
    assert_int_equal(w.setup_ns, 2000000);
    site_window_on_ready(&w, 6000000);
    assert_int_equal(w.setup_ns, 3000000);
    site_window_on_ready(&w, 0); /* on the same tick: counts as a nanosecond */
    assert_true(w.setup_ns > 2000000 && w.setup_ns < 3000000);
    site_window_init(&w, 2, 20);
    site_window_on_ready(&w, 60000000);
    /* Jobs that waited up to twice that: however many transactions. */
    for (unsigned i = 0; i < 50; i++) {
        site_window_on_wait(&w, 120000000);
        site_window_on_success(&w, 2);
    }
    assert_int_equal(site_window_allowed(&w), 2);
    /* One that waited longer: one connection more, once. */
    site_window_on_wait(&w, 120000001);
    site_window_on_success(&w, 2);
    assert_int_equal(site_window_allowed(&w), 3);
    site_window_on_success(&w, 3);
    assert_int_equal(site_window_allowed(&w), 3);
    /* Connections that open in 1 ms: a job must still wait at least
     * SITE_WAIT_MIN_NS. */
    struct site_window fast;
    site_window_init(&fast, 1, 20);
    site_window_on_ready(&fast, 1000000);
    site_window_on_wait(&fast, SITE_WAIT_MIN_NS);
    site_window_on_success(&fast, 1);
    assert_int_equal(site_window_allowed(&fast), 1);
    site_window_on_wait(&fast, SITE_WAIT_MIN_NS + 1);
    site_window_on_success(&fast, 1);
    assert_int_equal(site_window_allowed(&fast), 2);
    /* A wait seen while the window was not in use is kept for the next
     * transaction that finds it in use. */
    site_window_on_wait(&w, 150000000);
    site_window_on_success(&w, 1);
    assert_int_equal(site_window_allowed(&w), 3);
    site_window_on_success(&w, 3);
    assert_int_equal(site_window_allowed(&w), 4);
}

static struct dns_mx_result *
answer(const char **names, unsigned n)
{
    static struct dns_mx_host hosts[8];
    static union dns_addr addr;
    static struct dns_mx_result r;
    memset(&r, 0, sizeof(r));
    for (unsigned i = 0; i < n; i++)
        hosts[i] = (struct dns_mx_host){.name = names[i], .preference = 10 * i, .naddrs = 1,
                                        .addrs = &addr};
    r.status = DNS_OK;
    r.nhosts = n;
    r.hosts = hosts;
    return &r;
}

static void
keys_name_the_hosts(void **state)
{
    (void)state;
    char a[SITE_KEY_MAX], b[SITE_KEY_MAX];
    const char *x[] = {"MX2.example.net", "mx1.example.net"};
    const char *y[] = {"mx1.example.net", "mx2.example.net", "mx1.example.net"};
    site_key(answer(x, 2), 25, a, sizeof(a), NULL, NULL);
    site_key(answer(y, 3), 25, b, sizeof(b), NULL, NULL);
    assert_string_equal(a, "mx1.example.net,mx2.example.net:25");
    assert_string_equal(a, b);
    site_key(answer(y, 3), 2525, b, sizeof(b), NULL, NULL);
    assert_string_not_equal(a, b);
    /* Too many long names: a hash, still stable. */
    char big[8][200];
    const char *z[8];
    for (unsigned i = 0; i < 8; i++) {
        memset(big[i], 'a' + i, 199);
        big[i][199] = '\0';
        z[i] = big[i];
    }
    site_key(answer(z, 8), 25, a, sizeof(a), NULL, NULL);
    site_key(answer(z, 8), 25, b, sizeof(b), NULL, NULL);
    assert_true(a[0] == '#');
    assert_string_equal(a, b);
    /* Names that fill the key but for the port: the port is not cut, so
     * the same hosts on two ports are two sites (spelt, or hashed). */
    char fill[SITE_KEY_MAX];
    memset(fill, 'm', sizeof(fill));
    for (size_t cut = SITE_KEY_MAX - 8; cut < SITE_KEY_MAX; cut++) {
        fill[cut] = '\0';
        const char *one[] = {fill};
        site_key(answer(one, 1), 25, a, sizeof(a), NULL, NULL);
        site_key(answer(one, 1), 2525, b, sizeof(b), NULL, NULL);
        assert_string_not_equal(a, b);
        size_t la = strlen(a), lb = strlen(b);
        assert_true(la >= 3 && strcmp(a + la - 3, ":25") == 0);
        assert_true(lb >= 5 && strcmp(b + lb - 5, ":2525") == 0);
        fill[cut] = 'm';
    }
    /* In a smaller buffer (a pool's key: "POOL@" before it) likewise. */
    site_key(answer(x, 2), 25, a, 20, NULL, NULL);
    assert_true(a[0] == '#' && strcmp(a + strlen(a) - 3, ":25") == 0);
}

/* site_key's alias: hosts it names a pattern for are keyed by the
 * pattern (an [mx] rollup), the others by name; duplicates fold. */
static const char *
alias_prot(const void *arg, const struct dns_mx_host *h)
{
    size_t n = strlen(h->name), sl = strlen(".prot.test");
    return n > sl && strcmp(h->name + n - sl, ".prot.test") == 0 ? (const char *)arg : NULL;
}

static void
keys_with_an_alias(void **state)
{
    (void)state;
    char a[SITE_KEY_MAX], b[SITE_KEY_MAX];
    const char *x[] = {"contoso-com.prot.test"}, *y[] = {"fabrikam-com.prot.test"};
    const char *z[] = {"a-test.prot.test", "backup.example.net", "b-test.prot.test"};
    site_key(answer(x, 1), 25, a, sizeof(a), alias_prot, "*.prot.test");
    site_key(answer(y, 1), 25, b, sizeof(b), alias_prot, "*.prot.test");
    assert_string_equal(a, "*.prot.test:25");
    assert_string_equal(a, b);
    site_key(answer(z, 3), 25, a, sizeof(a), alias_prot, "*.prot.test");
    assert_string_equal(a, "*.prot.test,backup.example.net:25");
    site_key(answer(x, 1), 25, a, sizeof(a), NULL, NULL);
    assert_string_equal(a, "contoso-com.prot.test:25");
}

/* site_addr_take's slot, NULL when refused (errno: why). */
/* ip (IPv4), port 25. */
static union dns_addr
mx_addr(const char *ip)
{
    union dns_addr a;
    memset(&a, 0, sizeof(a));
    a.sin.sin_family = AF_INET;
    a.sin.sin_port = htons(25);
    inet_pton(AF_INET, ip, &a.sin.sin_addr);
    return a;
}

static struct site_addr *
take(const struct sites *s, uint32_t src, const union dns_addr *a, unsigned cap, uint64_t now)
{
    struct site_addr *x;
    int rc = site_addr_take(s, src, a, cap, now, &x);
    errno = rc < 0 ? -rc : 0;
    return x;
}

static void
sites_and_addresses(void **state)
{
    (void)state;
    struct sites s;
    assert_int_equal(sites_init(&s, NULL, 0), 0);
    struct site *p = site_get(&s, "mx.test:25", 4, 20);
    struct site *q = site_get(&s, "mx.test:25", 4, 20);
    assert_ptr_equal(p, q);
    assert_int_equal(s.live, 1);
    site_unref(&s, q);
    assert_int_equal(s.live, 1);
    site_unref(&s, p);
    assert_int_equal(s.live, 0);

    union dns_addr a1, a2;
    memset(&a1, 0, sizeof(a1));
    a1.sin.sin_family = AF_INET;
    a1.sin.sin_port = htons(25);
    inet_pton(AF_INET, "192.0.2.1", &a1.sin.sin_addr);
    a2 = a1;
    a2.sin.sin_port = htons(26);
    struct site_addr *x1[3], *x2, *x7;
    for (unsigned i = 0; i < 3; i++)
        assert_non_null(x1[i] = take(&s, 0, &a1, 3, 0));
    /* the cap: the fourth is refused, and counted nowhere */
    errno = 0;
    assert_null(take(&s, 0, &a1, 3, 0));
    assert_int_equal(errno, EBUSY);
    assert_non_null(x2 = take(&s, 0, &a2, 3, 0));
    assert_int_equal(site_addr_conns(&s, 0, &a1), 3);
    assert_int_equal(site_addr_conns(&s, 0, &a2), 1);
    /* per (source, address): another source's count is its own */
    assert_int_equal(site_addr_conns(&s, 7, &a1), 0);
    assert_non_null(x7 = take(&s, 7, &a1, 3, 0));
    assert_int_equal(site_addr_conns(&s, 7, &a1), 1);
    assert_int_equal(site_addr_conns(&s, 0, &a1), 3);
    site_addr_give(&s, x7, false);
    site_addr_give(&s, x2, false);
    assert_int_equal(site_addr_conns(&s, 0, &a2), 0);
    assert_int_equal(site_addrs_count(s.addrs), 1);
    /* no cap (0): always a slot */
    struct site_addr *x0 = take(&s, 0, &a1, 0, 0);
    assert_non_null(x0);
    assert_int_equal(site_addr_conns(&s, 0, &a1), 4);
    site_addr_give(&s, x0, false);
    for (unsigned i = 0; i < 3; i++)
        site_addr_give(&s, x1[i], false);
    assert_int_equal(site_addrs_count(s.addrs), 0);
    site_addr_give(&s, NULL, false); /* nothing */
    sites_fini(&s);
}

/* An AAAA answer of ::ffff:a.b.c.d names the IPv4 host a.b.c.d: its
 * connections count under a.b.c.d's cap, not beside it (twice the cap). */
static void
v4_mapped_counts_as_its_ipv4_address(void **state)
{
    (void)state;
    struct sites s;
    assert_int_equal(sites_init(&s, NULL, 0), 0);
    struct site *mine = site_get(&s, "mx.test:25", 1, 20);
    union dns_addr v4, mapped, other6;
    memset(&v4, 0, sizeof(v4));
    v4.sin.sin_family = AF_INET;
    v4.sin.sin_port = htons(25);
    inet_pton(AF_INET, "192.0.2.1", &v4.sin.sin_addr);
    memset(&mapped, 0, sizeof(mapped));
    mapped.sin6.sin6_family = AF_INET6;
    mapped.sin6.sin6_port = htons(25);
    mapped.sin6.sin6_flowinfo = htonl(7); /* noise */
    inet_pton(AF_INET6, "::ffff:192.0.2.1", &mapped.sin6.sin6_addr);
    other6 = mapped;
    inet_pton(AF_INET6, "2001:db8::c000:201", &other6.sin6.sin6_addr); /* same low bits */

    struct site_addr *xv4 = take(&s, 0, &v4, 2, 0);
    struct site_addr *xm = take(&s, 0, &mapped, 2, 0);
    assert_ptr_equal(xv4, xm);
    assert_null(take(&s, 0, &mapped, 2, 0)); /* one cap for both forms */
    assert_int_equal(site_addr_conns(&s, 0, &v4), 2);
    assert_int_equal(site_addr_conns(&s, 0, &mapped), 2);
    assert_int_equal(site_addrs_count(s.addrs), 1);
    /* a real IPv6 address is another host; another port another slot */
    assert_int_equal(site_addr_conns(&s, 0, &other6), 0);
    union dns_addr mapped26 = mapped;
    mapped26.sin6.sin6_port = htons(26);
    assert_int_equal(site_addr_conns(&s, 0, &mapped26), 0);
    /* a want made through one form is seen through the other's slot; a
     * site's own want on its worker is not */
    site_addr_want(&s, 0, &mapped, 100, mine);
    bool yielded = true;
    assert_true(site_addr_wanted(&s, xv4, 2, 50, NULL, &yielded));
    assert_false(yielded); /* a site of its own worker's: no other worker's due */
    assert_false(site_addr_wanted(&s, xv4, 2, 50, mine, &yielded));
    assert_false(site_addr_wanted(&s, xv4, 2, 100, NULL, &yielded)); /* over */
    site_addr_give(&s, xv4, false);
    assert_int_equal(site_addr_conns(&s, 0, &mapped), 1);
    site_addr_give(&s, xm, false);
    assert_int_equal(site_addrs_count(s.addrs), 0);
    site_unref(&s, mine);
    sites_fini(&s);
}

/* Two workers' sites over one table: the cap is the node's, not a share
 * each (a site gathered on one worker may use all of it), and a want of
 * the other worker counts even for the same site key: its domains cannot
 * ride this worker's connections. */
static void
cap_is_the_nodes_across_workers(void **state)
{
    (void)state;
    struct site_addrs *t = site_addrs_new(2); /* a floor of 2 of 4 each */
    assert_non_null(t);
    struct sites w0, w1;
    assert_int_equal(sites_init(&w0, t, 0), 0);
    assert_int_equal(sites_init(&w1, t, 1), 0);
    struct site *s0 = site_get(&w0, "mx.test:25", 1, 20);
    struct site *s1 = site_get(&w1, "mx.test:25", 1, 20);
    union dns_addr a = mx_addr("192.0.2.1");
    struct site_addr *x[4];
    for (unsigned i = 0; i < 4; i++)
        assert_non_null(x[i] = take(&w0, 0, &a, 4, 0)); /* all four on one worker */
    assert_null(take(&w1, 0, &a, 4, 0));
    assert_int_equal(site_addr_conns(&w1, 0, &a), 4);
    /* worker 1 wants it: worker 0's connection, of the same site key, quits */
    site_addr_want(&w1, 0, &a, 100, s1);
    bool y0 = false, yn = false;
    assert_true(site_addr_wanted(&w0, x[0], 4, 50, s0, &y0));
    assert_true(y0); /* for another worker: counted as yielding */
    /* one slot per wanting worker: worker 0's busy connections keep
     * theirs while x[0]'s is on its way */
    assert_false(site_addr_yield(&w0, x[1], 4, 50));
    site_addr_give(&w0, x[0], y0);
    /* the slot freed is kept for worker 1 (below its floor, and wanting):
     * worker 0, past its floor, does not take it back; it covers the
     * want, so no busy connection of worker 0 gives another */
    assert_null(take(&w0, 0, &a, 4, 50));
    assert_int_equal(errno, EBUSY);
    assert_false(site_addr_yield(&w0, x[1], 4, 50));
    struct site_addr *y = take(&w1, 0, &a, 4, 50);
    assert_non_null(y);
    assert_ptr_equal(y, x[1]); /* one entry for the node */
    /* worker 1 wants a second (refused: full), below its floor still:
     * one of worker 0's busy connections (3 of 4, floor 2) yields after
     * its transaction, and only one */
    assert_null(take(&w1, 0, &a, 4, 60));
    site_addr_want(&w1, 0, &a, 100, s1);
    assert_false(site_addr_yield(&w1, y, 4, 60)); /* not the wanting worker's own */
    assert_true(site_addr_yield(&w0, x[1], 4, 60));
    assert_false(site_addr_yield(&w0, x[2], 4, 60));
    site_addr_give(&w0, x[1], true);
    assert_false(site_addr_yield(&w0, x[2], 4, 60)); /* the free slot covers it */
    struct site_addr *y1 = take(&w1, 0, &a, 4, 60);
    assert_non_null(y1);
    assert_false(site_addr_yield(&w0, x[2], 4, 60)); /* worker 1's want ended with its take */
    /* worker 0's own want of that site does not make its own quit; nor
     * does it make worker 1's, at its floor (2 of 4): given, the slot
     * would be wanted back at once */
    site_addr_want(&w0, 0, &a, 200, s0);
    assert_false(site_addr_wanted(&w0, x[2], 4, 150, s0, &yn));
    assert_false(site_addr_wanted(&w1, y, 4, 150, s1, &yn));
    /* nor while worker 1 holds no more than its floor, worker 0 below its
     * own (1 each: two slots are free for worker 0 to take) */
    site_addr_give(&w0, x[2], false);
    site_addr_give(&w1, y1, false);
    assert_false(site_addr_wanted(&w1, y, 4, 150, s1, &yn));
    /* worker 1 past its floor (3 of 4, taken once worker 0's want ended),
     * worker 0 below its own and wanting: worker 1's idle one quits */
    struct site_addr *y2 = take(&w1, 0, &a, 4, 250), *y3 = take(&w1, 0, &a, 4, 250);
    assert_non_null(y2);
    assert_non_null(y3);
    site_addr_want(&w0, 0, &a, 400, s0);
    assert_false(site_addr_wanted(&w1, y, 4, 400, s1, &yn)); /* the want is over */
    assert_true(site_addr_wanted(&w1, y, 4, 300, s1, &yn));
    assert_true(yn);
    site_addr_give(&w1, y, yn);
    site_addr_give(&w1, y2, false);
    site_addr_give(&w1, y3, false);
    site_addr_give(&w0, x[3], false);
    assert_int_equal(site_addrs_count(t), 0);
    site_unref(&w0, s0);
    site_unref(&w1, s1);
    sites_fini(&w0);
    sites_fini(&w1);
    site_addrs_free(t);
}

/* Four workers, a cap of 8 (a floor of 2 each), all 8 held by worker 0:
 * each wanting worker gets one connection's slot, whatever number of
 * worker 0's connections finish a transaction before the first has gone.
 * Before the yielding count, each of them yielded while anyone was owed:
 * six connections ended for two wanted, and worker 0 took the four
 * slots nobody wanted back at once. */
static void
one_slot_yielded_per_want(void **state)
{
    (void)state;
    struct site_addrs *t = site_addrs_new(4);
    assert_non_null(t);
    struct sites w[4];
    for (unsigned i = 0; i < 4; i++)
        assert_int_equal(sites_init(&w[i], t, i), 0);
    union dns_addr a = mx_addr("192.0.2.9");
    struct site_addr *x[8];
    bool told[8] = {false};
    for (unsigned i = 0; i < 8; i++)
        assert_non_null(x[i] = take(&w[0], 0, &a, 8, 0));
    assert_null(take(&w[1], 0, &a, 8, 10));
    site_addr_want(&w[1], 0, &a, 1000, NULL);
    unsigned yielded = 0;
    for (unsigned i = 0; i < 8; i++)
        if ((told[i] = site_addr_yield(&w[0], x[i], 8, 20)))
            yielded++;
    assert_int_equal(yielded, 1);
    /* a second worker wants one: one more */
    assert_null(take(&w[2], 0, &a, 8, 30));
    site_addr_want(&w[2], 0, &a, 1000, NULL);
    for (unsigned i = 0; i < 8; i++)
        if (!told[i] && (told[i] = site_addr_yield(&w[0], x[i], 8, 40)))
            yielded++;
    assert_int_equal(yielded, 2);
    /* the yielded go; each wanting worker takes its slot, and nobody else
     * is told to go */
    struct site_addr *got[2];
    for (unsigned i = 0, k = 0; i < 8; i++)
        if (told[i]) {
            site_addr_give(&w[0], x[i], true);
            x[i] = NULL;
            assert_non_null(got[k] = take(&w[1 + k], 0, &a, 8, 50));
            k++;
        }
    for (unsigned i = 0; i < 8; i++)
        assert_false(x[i] != NULL && site_addr_yield(&w[0], x[i], 8, 60));
    assert_int_equal(site_addr_conns(&w[0], 0, &a), 8);
    /* worker 0 at its floor yields to nobody: worker 3 below its own waits
     * for free slots (6 of worker 0's go first) */
    for (unsigned i = 0, n = 0; i < 8 && n < 4; i++)
        if (x[i] != NULL) {
            site_addr_give(&w[0], x[i], false);
            x[i] = NULL;
            n++;
        }
    struct site_addr *z[4];
    for (unsigned i = 0; i < 4; i++)
        assert_non_null(z[i] = take(&w[3], 0, &a, 8, 70));
    /* worker 3 past its floor (4 of 8), worker 2 below its own (1) wants
     * a second: one of worker 3's */
    assert_null(take(&w[2], 0, &a, 8, 80));
    site_addr_want(&w[2], 0, &a, 1000, NULL);
    bool z_told[4];
    unsigned nz = 0;
    for (unsigned i = 0; i < 4; i++)
        nz += (z_told[i] = site_addr_yield(&w[3], z[i], 8, 90));
    assert_int_equal(nz, 1);
    for (unsigned i = 0; i < 8; i++)
        if (x[i] != NULL)
            site_addr_give(&w[0], x[i], false);
    for (unsigned i = 0; i < 4; i++)
        site_addr_give(&w[3], z[i], z_told[i]);
    site_addr_give(&w[1], got[0], false);
    site_addr_give(&w[2], got[1], false);
    assert_int_equal(site_addrs_count(t), 0);
    for (unsigned i = 0; i < 4; i++)
        sites_fini(&w[i]);
    site_addrs_free(t);
}

/* A cap lowered under what is open (a reload): as many connections as
 * are over it are told to end, counted until they have, and no more;
 * once they have gone the address is at the cap and none is. */
static void
lowered_cap_ends_the_connections_over_it(void **state)
{
    (void)state;
    struct site_addrs *t = site_addrs_new(2);
    assert_non_null(t);
    struct sites w0, w1;
    assert_int_equal(sites_init(&w0, t, 0), 0);
    assert_int_equal(sites_init(&w1, t, 1), 0);
    union dns_addr a = mx_addr("192.0.2.7");
    struct site_addr *x[5];
    for (unsigned i = 0; i < 5; i++)
        assert_non_null(x[i] = take(i < 3 ? &w0 : &w1, 0, &a, 5, 0));
    assert_false(site_addr_over(&w0, x[0], 5));
    assert_false(site_addr_over(&w0, x[0], 0)); /* no cap */
    bool told[5];
    unsigned n = 0;
    for (unsigned i = 0; i < 5; i++)
        n += (told[i] = site_addr_over(i < 3 ? &w0 : &w1, x[i], 3));
    assert_int_equal(n, 2);
    for (unsigned i = 0; i < 5; i++)
        if (told[i]) {
            site_addr_give(i < 3 ? &w0 : &w1, x[i], true);
            x[i] = NULL;
        }
    assert_int_equal(site_addr_conns(&w0, 0, &a), 3);
    for (unsigned i = 0; i < 5; i++)
        if (x[i] != NULL) {
            assert_false(site_addr_over(i < 3 ? &w0 : &w1, x[i], 3));
            site_addr_give(i < 3 ? &w0 : &w1, x[i], false);
        }
    assert_int_equal(site_addrs_count(t), 0);
    sites_fini(&w0);
    sites_fini(&w1);
    site_addrs_free(t);
}

/* Threads taking and giving slots at once never hold more than the cap
 * between them, and every count comes back to zero. */
#define RACE_THREADS 4
#define RACE_ROUNDS  20000
#define RACE_CAP     3

struct race {
    struct sites s;
    const union dns_addr *a;
    atomic_int *held;
    atomic_int *most;
};

static void *
race_run(void *arg)
{
    struct race *r = arg;
    for (unsigned i = 0; i < RACE_ROUNDS; i++) {
        struct site_addr *x;
        if (site_addr_take(&r->s, 0, r->a, RACE_CAP, 0, &x) < 0)
            continue;
        int n = atomic_fetch_add(r->held, 1) + 1;
        int m = atomic_load(r->most);
        while (n > m && !atomic_compare_exchange_weak(r->most, &m, n))
            ;
        atomic_fetch_sub(r->held, 1);
        site_addr_give(&r->s, x, false);
    }
    return NULL;
}

static void
cap_holds_under_threads(void **state)
{
    (void)state;
    struct site_addrs *t = site_addrs_new(RACE_THREADS);
    assert_non_null(t);
    union dns_addr a = mx_addr("192.0.2.1");
    atomic_int held = 0, most = 0;
    struct race r[RACE_THREADS];
    pthread_t th[RACE_THREADS];
    for (unsigned i = 0; i < RACE_THREADS; i++) {
        assert_int_equal(sites_init(&r[i].s, t, i), 0);
        r[i].a = &a;
        r[i].held = &held;
        r[i].most = &most;
        assert_int_equal(pthread_create(&th[i], NULL, race_run, &r[i]), 0);
    }
    for (unsigned i = 0; i < RACE_THREADS; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    assert_true(atomic_load(&most) >= 1);
    assert_true(atomic_load(&most) <= RACE_CAP);
    assert_int_equal(site_addrs_count(t), 0);
    for (unsigned i = 0; i < RACE_THREADS; i++)
        sites_fini(&r[i].s);
    site_addrs_free(t);
}

struct item {
    struct hash_node node;
    unsigned key;
};

static bool
item_eq(const struct hash_node *n, const void *key)
{
    return ((const struct item *)n)->key == *(const unsigned *)key;
}

static void
hash_grows_and_shrinks(void **state)
{
    (void)state;
    struct hash h;
    hash_init(&h, item_eq, 8);
    enum { N = 100000 };
    struct item *v = calloc(N, sizeof(*v));
    assert_non_null(v);
    for (unsigned i = 0; i < N; i++) {
        v[i].key = i;
        v[i].node.hash = hash_bytes(&i, sizeof(i));
        assert_int_equal(hash_insert(&h, &v[i].node), 0);
    }
    assert_int_equal(hash_count(&h), N);
    assert_true(h.nb >= N / 2);
    for (unsigned i = 0; i < N; i += 7) {
        struct hash_node *n = hash_find(&h, hash_bytes(&i, sizeof(i)), &i);
        assert_ptr_equal(n, &v[i].node);
    }
    /* Walk and remove every other one, then compact. */
    size_t b = 0;
    struct hash_node *cur = NULL, *n;
    unsigned seen = 0;
    while ((n = hash_next(&h, &b, &cur)) != NULL) {
        seen++;
        if (((struct item *)n)->key % 2)
            hash_remove(&h, n);
    }
    assert_int_equal(seen, N);
    hash_compact(&h);
    assert_int_equal(hash_count(&h), N / 2);
    for (unsigned i = 0; i < N; i += 2)
        hash_remove(&h, &v[i].node);
    for (unsigned k = 0; k < 20; k++)
        hash_compact(&h);
    assert_int_equal(hash_count(&h), 0);
    assert_true(h.nb <= 8);
    unsigned one = 1;
    assert_null(hash_find(&h, hash_bytes(&one, sizeof(one)), &one));
    hash_fini(&h);
    free(v);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(window_slow_start_then_additive),
        cmocka_unit_test(window_raised_ceiling_keeps_slow_start),
        cmocka_unit_test(window_grows_only_when_mail_waits),
        cmocka_unit_test(window_holds_while_connections_queue),
        cmocka_unit_test(window_head_slack_and_base_periods),
        cmocka_unit_test(window_head_variance_is_no_queue),
        cmocka_unit_test(window_head_base_forgets_a_lull),
        cmocka_unit_test(keys_name_the_hosts),
        cmocka_unit_test(keys_with_an_alias),
        cmocka_unit_test(sites_and_addresses),
        cmocka_unit_test(v4_mapped_counts_as_its_ipv4_address),
        cmocka_unit_test(cap_is_the_nodes_across_workers),
        cmocka_unit_test(one_slot_yielded_per_want),
        cmocka_unit_test(lowered_cap_ends_the_connections_over_it),
        cmocka_unit_test(cap_holds_under_threads),
        cmocka_unit_test(hash_grows_and_shrinks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
