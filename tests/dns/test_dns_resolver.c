/*
 * test_dns_resolver: engine/resolver.c on a real worker ring against a
 * real dnsmasq. The test's thread runs worker_run(); the lookups start
 * from a mailbox message and go on from callbacks, in phases:
 *
 *  0. big.test (UDP, truncated, again over TCP, then A queries over UDP)
 *     and, on a second resolver, a server that never answers (the ring's
 *     timer drives c-ares's timeout; that resolver is closed from inside
 *     its own callback).
 *  1. started from big.test's callback (the silent server is still
 *     being waited for), while the TCP socket's poll is
 *     still being cancelled (c-ares closed both sockets when its last
 *     query ended, and the new UDP socket may get a recycled fd number):
 *     50 requests for a.test (one cancelled), c.test, nx.test and 300
 *     distinct domains.
 *  2. a cache hit, then five lookups; the first callback closes the
 *     resolver while queries are still out on its socket. The loop stops
 *     when both resolvers have freed themselves (every poll came back).
 *
 * Then, on a resolver of its own, polls that fail (the test hook turns
 * their results into -ENOMEM): the watch is re-armed after a backoff and
 * the lookup is answered, long before c-ares would time it out; and a
 * resolver closed while its watch waits out a backoff frees itself.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "engine/resolver.h"
#include "tests/dns/harness.h"

static struct dnsmasq dm;
static bool skipped;

enum { NW = 300, NA = 50 };

struct ctx {
    struct worker w;
    struct resolver *r, *rs;
    struct worker_msg start;
    struct timer guard;
    bool timed_out;
    int phase;
    unsigned pending; /* callbacks still due in this phase */
    unsigned closed;
    int silent_port;

    struct dns_mx_result *big, *silent, *c, *nx, *hit;
    struct dns_mx_result *a[NA];
    unsigned a_calls;
    unsigned late; /* phase 2 callbacks that ran before the close */
    struct dns_req *a_req[NA];
    struct dns_mx_result *wres[NW];
    struct resolver_stats after_big;
    bool hit_sync;
};

static struct ctx *g;

struct tag {
    struct dns_mx_result **out;
    unsigned *calls;
};

static void phase1(struct ctx *c);
static void phase2(struct ctx *c);

static void
on_closed(struct worker *w, void *arg)
{
    struct ctx *c = arg;
    c->closed++;
    if (c->closed == 2)
        w->stopping = true;
}

static void
phase_done(struct ctx *c)
{
    if (--c->pending == 0 && c->phase == 1)
        phase2(c);
}

static void
on_big(void *arg, struct dns_mx_result *res)
{
    struct ctx *c = arg;
    c->big = res;
    resolver_stats(c->r, &c->after_big);
    phase1(c);
}

static void
on_silent(void *arg, struct dns_mx_result *res)
{
    struct ctx *c = arg;
    c->silent = res;
    /* from inside the resolver's own callback: deferred until the dns
     * call that runs it returns */
    resolver_close(c->rs, on_closed, c);
    c->rs = NULL;
}

static void
on_one(void *arg, struct dns_mx_result *res)
{
    struct dns_mx_result **slot = arg;
    *slot = res;
    phase_done(g);
}

static void
on_a(void *arg, struct dns_mx_result *res)
{
    struct dns_mx_result **slot = arg;
    *slot = res;
    g->a_calls++;
    phase_done(g);
}

/* Start a lookup that must wait; phase 1's count its callbacks. */
static void
resolve(struct ctx *c, struct resolver *r, const char *domain, dns_mx_fn *cb, void *arg,
        struct dns_req **reqp)
{
    struct dns_mx_result *res;
    struct dns_req *req;
    int rc = resolver_mx_resolve(r, domain, cb, arg, &res, &req);
    if (rc != 0) {
        fprintf(stderr, "resolve %s: rc %d (expected to wait)\n", domain, rc);
        dns_mx_result_unref(res);
        c->w.stopping = true;
        return;
    }
    if (c->phase == 1)
        c->pending++;
    if (reqp != NULL)
        *reqp = req;
}

static void
phase0(struct worker *w, struct worker_msg *m)
{
    (void)w;
    struct ctx *c = (struct ctx *)((char *)m - offsetof(struct ctx, start));
    c->phase = 0;
    resolve(c, c->r, "big.test", on_big, c, NULL);
    resolve(c, c->rs, "a.test", on_silent, c, NULL);
}

static void
phase1(struct ctx *c)
{
    c->phase = 1;
    for (unsigned i = 0; i < NA; i++)
        resolve(c, c->r, "a.test", on_a, &c->a[i], &c->a_req[i]);
    resolver_cancel(c->r, c->a_req[7]);
    c->pending--;
    resolve(c, c->r, "c.test", on_one, &c->c, NULL);
    resolve(c, c->r, "nx.test", on_one, &c->nx, NULL);
    char name[32];
    for (unsigned i = 0; i < NW; i++) {
        snprintf(name, sizeof(name), "w%u.test", i);
        resolve(c, c->r, name, on_one, &c->wres[i], NULL);
    }
}

static void
on_late(void *arg, struct dns_mx_result *res)
{
    struct ctx *c = arg;
    c->late++;
    dns_mx_result_unref(res);
    if (c->r != NULL) {
        /* From a callback run by a poll completion, with queries still
         * out on the socket being handled: the close waits for the dns
         * call to return, then drops that socket's watch. */
        resolver_close(c->r, on_closed, c);
        c->r = NULL;
    }
}

static void
phase2(struct ctx *c)
{
    c->phase = 2;
    struct dns_req *req;
    c->hit_sync = resolver_mx_resolve(c->r, "c.test", on_one, &c->hit, &c->hit, &req) == 1;
    char name[32];
    for (unsigned i = 0; i < 5; i++) {
        snprintf(name, sizeof(name), "x%u.test", i);
        resolve(c, c->r, name, on_late, c, NULL);
    }
}

static void
on_guard(struct timer *t, void *ctx)
{
    (void)t;
    struct worker *w = ctx;
    g->timed_out = true;
    w->stopping = true;
}

static int
setup(void **state)
{
    (void)state;
    size_t cap = 8192 + NW * 80;
    char *text = malloc(cap);
    if (text == NULL)
        return -1;
    size_t len = (size_t)snprintf(text, cap,
                                  "mx-host=a.test,mx1.a.test,10\n"
                                  "mx-host=a.test,mx2.a.test,20\n"
                                  "host-record=mx1.a.test,192.0.2.1\n"
                                  "host-record=mx2.a.test,192.0.2.2,2001:db8::2\n"
                                  "mx-host=c.test,cn.a.test,5\n"
                                  "cname=cn.a.test,mx1.a.test\n"
                                  "mx-host=x0.test,mx1.a.test,1\nmx-host=x1.test,mx1.a.test,1\n"
                                  "mx-host=x2.test,mx1.a.test,1\nmx-host=x3.test,mx1.a.test,1\n"
                                  "mx-host=x4.test,mx1.a.test,1\n");
    for (int i = 0; i < 30; i++)
        len +=
            (size_t)snprintf(text + len, cap - len,
                             "mx-host=big.test,mx-%02d-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
                             "bbbbbbbbbbbbb.big.test,%d\n",
                             i, i + 1);
    len +=
        (size_t)snprintf(text + len, cap - len,
                         "host-record=mx-00-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
                         ".big.test,192.0.2.100\n");
    for (int i = 0; i < NW; i++)
        len +=
            (size_t)snprintf(text + len, cap - len,
                             "mx-host=w%d.test,m%d.w.test,10\nhost-record=m%d.w.test,10.1.%d.%d\n",
                             i, i, i, i >> 8, i & 255);
    int rc = dnsmasq_start(&dm, text, 300);
    free(text);
    skipped = rc == HARNESS_SKIP;
    return rc < 0 ? -1 : 0;
}

static int
teardown(void **state)
{
    (void)state;
    dnsmasq_stop(&dm);
    return 0;
}

static const char *
addr_str(const union dns_addr *a, char *buf, size_t len)
{
    if (a->sa.sa_family == AF_INET)
        return inet_ntop(AF_INET, &a->sin.sin_addr, buf, (socklen_t)len);
    return inet_ntop(AF_INET6, &a->sin6.sin6_addr, buf, (socklen_t)len);
}

static void
test_resolver_on_ring(void **state)
{
    (void)state;
    if (skipped)
        skip();
    struct ctx *c = calloc(1, sizeof(*c));
    assert_non_null(c);
    g = c;
    int rc = worker_init(&c->w, 0, 256, NULL);
    if (rc == -ENOSYS || rc == -EPERM) {
        free(c);
        skip(); /* no io_uring here */
    }
    assert_int_equal(rc, 0);

    struct dns_config cfg;
    char err[256];
    harness_config(&cfg, dm.port);
    cfg.max_mx_hosts = 3;
    assert_int_equal(resolver_new(&c->w, &cfg, &c->r, err, sizeof(err)), 0);
    conf_free(dns_conf_keys, &cfg);
    int silent = silent_server(&c->silent_port);
    assert_true(silent >= 0);
    harness_config(&cfg, c->silent_port);
    cfg.timeout = 200;
    cfg.tries = 1;
    assert_int_equal(resolver_new(&c->w, &cfg, &c->rs, err, sizeof(err)), 0);
    conf_free(dns_conf_keys, &cfg);

    c->start.fn = phase0;
    worker_post(&c->w, &c->start);
    timer_init(&c->guard, on_guard);
    assert_int_equal(worker_timer_arm(&c->w, &c->guard, clock_mono_ns() + MS_TO_NS(20000)), 0);
    assert_int_equal(worker_run(&c->w), 0);
    worker_timer_cancel(&c->w, &c->guard);
    bool timed_out = c->timed_out;
    unsigned closed = c->closed;
    worker_fini(&c->w);
    close(silent);
    assert_false(timed_out);
    assert_int_equal(closed, 2);
    assert_int_equal(c->phase, 2);

    /* phase 0 */
    assert_non_null(c->big);
    assert_int_equal(c->big->status, DNS_OK);
    assert_int_equal(c->big->nhosts, 1);
    char buf[64];
    assert_string_equal(addr_str(&c->big->hosts[0].addrs[0], buf, sizeof(buf)), "192.0.2.100");
    assert_non_null(c->silent);
    assert_int_equal(c->silent->status, DNS_RETRY);
    assert_string_equal(c->silent->why, "timeout");
    /* c-ares dropped both sockets when big.test's last query ended: no
     * socket is watched, and the TCP socket's poll was being cancelled */
    assert_int_equal(c->after_big.watches, 0);
    assert_true(c->after_big.polls >= 1);
    /* MX; AAAA for mx-00 (its A came in the additional section); A and
     * AAAA for mx-01 and mx-02 */
    assert_int_equal(c->after_big.dns.queries, 6);

    /* phase 1 */
    assert_int_equal(c->a_calls, NA - 1);
    assert_null(c->a[7]);
    for (unsigned i = 0; i < NA; i++) {
        if (i == 7)
            continue;
        assert_non_null(c->a[i]);
        assert_ptr_equal(c->a[i], c->a[0]);
        assert_int_equal(c->a[i]->status, DNS_OK);
        assert_int_equal(c->a[i]->nhosts, 2);
        assert_string_equal(c->a[i]->hosts[0].name, "mx1.a.test");
        assert_string_equal(c->a[i]->hosts[1].name, "mx2.a.test");
        assert_int_equal(c->a[i]->hosts[1].naddrs, 2);
    }
    assert_int_equal(c->c->status, DNS_OK);
    assert_string_equal(c->c->hosts[0].name, "cn.a.test");
    assert_string_equal(addr_str(&c->c->hosts[0].addrs[0], buf, sizeof(buf)), "192.0.2.1");
    assert_int_equal(c->nx->status, DNS_NOT_FOUND);
    for (unsigned i = 0; i < NW; i++) {
        char want[32], host[32];
        snprintf(want, sizeof(want), "10.1.%u.%u", i >> 8, i & 255);
        snprintf(host, sizeof(host), "m%u.w.test", i);
        assert_non_null(c->wres[i]);
        assert_int_equal(c->wres[i]->status, DNS_OK);
        assert_string_equal(c->wres[i]->hosts[0].name, host);
        assert_string_equal(addr_str(&c->wres[i]->hosts[0].addrs[0], buf, sizeof(buf)), want);
    }
    /* phase 2: the first callback closed the resolver; others due in
     * the same call may have run, the rest never do */
    assert_true(c->hit_sync);
    assert_ptr_equal(c->hit, c->c);
    assert_true(c->late >= 1 && c->late <= 5);

    dns_mx_result_unref(c->big);
    dns_mx_result_unref(c->silent);
    dns_mx_result_unref(c->c);
    dns_mx_result_unref(c->nx);
    dns_mx_result_unref(c->hit);
    for (unsigned i = 0; i < NA; i++)
        dns_mx_result_unref(c->a[i]);
    for (unsigned i = 0; i < NW; i++)
        dns_mx_result_unref(c->wres[i]);
    free(c);
}

/* ---- polls that fail ---- */

enum { FAILED_POLLS = 5 };

struct fctx {
    struct worker w;
    struct resolver *r;
    struct worker_msg start;
    struct timer guard;
    struct dns_mx_result *res;
    struct resolver_stats stats; /* when the answer came */
    uint64_t started, answered;
    bool timed_out, closed;
};

static void
f_on_closed(struct worker *w, void *arg)
{
    struct fctx *f = arg;
    f->closed = true;
    w->stopping = true;
}

static void
f_on_answer(void *arg, struct dns_mx_result *res)
{
    struct fctx *f = arg;
    f->res = res;
    f->answered = clock_mono_ns();
    resolver_stats(f->r, &f->stats);
    resolver_close(f->r, f_on_closed, f);
}

static void
f_start(struct worker *w, struct worker_msg *m)
{
    struct fctx *f = (struct fctx *)((char *)m - offsetof(struct fctx, start));
    struct dns_mx_result *res;
    struct dns_req *req;
    f->started = clock_mono_ns();
    if (resolver_mx_resolve(f->r, "a.test", f_on_answer, f, &res, &req) != 0) {
        dns_mx_result_unref(res);
        w->stopping = true;
    }
}

static void
f_on_guard(struct timer *t, void *ctx)
{
    struct fctx *f = (struct fctx *)((char *)t - offsetof(struct fctx, guard));
    (void)ctx;
    f->timed_out = true;
    f->w.stopping = true;
}

static void
test_resolver_poll_failure(void **state)
{
    (void)state;
    if (skipped)
        skip();
    struct fctx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    int rc = worker_init(&f->w, 0, 64, NULL);
    if (rc == -ENOSYS || rc == -EPERM) {
        free(f);
        skip();
    }
    assert_int_equal(rc, 0);
    struct dns_config cfg;
    char err[256];
    harness_config(&cfg, dm.port);
    /* One try of 4 s: a socket left unpolled would end the lookup as a
     * timeout, not an answer. */
    cfg.timeout = 4000;
    cfg.tries = 1;
    assert_int_equal(resolver_new(&f->w, &cfg, &f->r, err, sizeof(err)), 0);
    conf_free(dns_conf_keys, &cfg);
    resolver_test_fail_polls(f->r, FAILED_POLLS, -ENOMEM);

    f->start.fn = f_start;
    worker_post(&f->w, &f->start);
    timer_init(&f->guard, f_on_guard);
    assert_int_equal(worker_timer_arm(&f->w, &f->guard, clock_mono_ns() + MS_TO_NS(10000)), 0);
    assert_int_equal(worker_run(&f->w), 0);
    worker_timer_cancel(&f->w, &f->guard);
    uint64_t loops = f->w.stats.loops;
    bool closed = f->closed;
    worker_fini(&f->w);

    assert_false(f->timed_out);
    assert_true(closed);
    assert_non_null(f->res);
    assert_int_equal(f->res->status, DNS_OK);
    assert_int_equal(f->res->nhosts, 2);
    assert_string_equal(f->res->hosts[0].name, "mx1.a.test");
    assert_int_equal(f->stats.poll_failures, FAILED_POLLS);
    uint64_t ms = (f->answered - f->started) / 1000000ULL;
    /* Each failure waited out its backoff (10, 20, 40, 80, 160 ms) rather
     * than re-arming at once, and the answer came before c-ares's own
     * timeout could have resent anything. */
    assert_true(ms >= 310);
    assert_true(ms < 4000);
    assert_true(loops < 100);
    dns_mx_result_unref(f->res);
    free(f);
}

/* Closed while its only watch waits out a backoff (no poll in flight):
 * the watch goes at once, the resolver frees itself and calls closed(),
 * the lookup's callback never runs, and the timer is no longer armed. */
struct cctx {
    struct worker w;
    struct resolver *r;
    struct worker_msg start;
    struct timer check, guard;
    struct resolver_stats at_close;
    unsigned answers;
    bool timed_out, closed;
};

static void
c_on_answer(void *arg, struct dns_mx_result *res)
{
    struct cctx *c = arg;
    c->answers++;
    dns_mx_result_unref(res);
}

static void
c_on_closed(struct worker *w, void *arg)
{
    struct cctx *c = arg;
    c->closed = true;
    w->stopping = true;
}

static void
c_start(struct worker *w, struct worker_msg *m)
{
    struct cctx *c = (struct cctx *)((char *)m - offsetof(struct cctx, start));
    struct dns_mx_result *res;
    struct dns_req *req;
    if (resolver_mx_resolve(c->r, "a.test", c_on_answer, c, &res, &req) != 0) {
        dns_mx_result_unref(res);
        w->stopping = true;
    }
}

/* Every 5 ms until the watch is seen backing off (a backoff lasts 40 ms
 * or more from the third failure on), then close. */
static void
c_on_check(struct timer *t, void *ctx)
{
    struct worker *w = ctx;
    struct cctx *c = (struct cctx *)((char *)t - offsetof(struct cctx, check));
    struct resolver_stats st;
    resolver_stats(c->r, &st);
    if (st.poll_failures >= 3 && st.polls == 0 && st.watches == 1) {
        c->at_close = st;
        resolver_close(c->r, c_on_closed, c);
        c->r = NULL;
        return;
    }
    worker_timer_arm(w, &c->check, w->now + MS_TO_NS(5));
}

static void
c_on_guard(struct timer *t, void *ctx)
{
    struct cctx *c = (struct cctx *)((char *)t - offsetof(struct cctx, guard));
    (void)ctx;
    c->timed_out = true;
    c->w.stopping = true;
}

static void
test_resolver_close_in_backoff(void **state)
{
    (void)state;
    if (skipped)
        skip();
    struct cctx *c = calloc(1, sizeof(*c));
    assert_non_null(c);
    int rc = worker_init(&c->w, 0, 64, NULL);
    if (rc == -ENOSYS || rc == -EPERM) {
        free(c);
        skip();
    }
    assert_int_equal(rc, 0);
    struct dns_config cfg;
    char err[256];
    harness_config(&cfg, dm.port);
    cfg.timeout = 4000;
    cfg.tries = 1;
    assert_int_equal(resolver_new(&c->w, &cfg, &c->r, err, sizeof(err)), 0);
    conf_free(dns_conf_keys, &cfg);
    resolver_test_fail_polls(c->r, 1000, -ENOMEM); /* every poll fails */

    c->start.fn = c_start;
    worker_post(&c->w, &c->start);
    timer_init(&c->check, c_on_check);
    timer_init(&c->guard, c_on_guard);
    assert_int_equal(worker_timer_arm(&c->w, &c->check, clock_mono_ns() + MS_TO_NS(5)), 0);
    assert_int_equal(worker_timer_arm(&c->w, &c->guard, clock_mono_ns() + MS_TO_NS(10000)), 0);
    assert_int_equal(worker_run(&c->w), 0);
    worker_timer_cancel(&c->w, &c->guard);
    worker_timer_cancel(&c->w, &c->check);
    unsigned timers = c->w.timers.n;
    worker_fini(&c->w);

    assert_false(c->timed_out);
    assert_true(c->closed);
    assert_int_equal(c->answers, 0);
    assert_in_range(c->at_close.poll_failures, 3, 8);
    assert_int_equal(timers, 0); /* the resolver's retry timer went with it */
    free(c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resolver_on_ring),
        cmocka_unit_test(test_resolver_poll_failure),
        cmocka_unit_test(test_resolver_close_in_backoff),
    };
    int failed = cmocka_run_group_tests_name("dns resolver", tests, setup, teardown);
    return skipped ? HARNESS_SKIP : failed;
}
