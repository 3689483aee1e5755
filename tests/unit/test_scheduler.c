/*
 * The outbound scheduler without a network: scripted events in (DNS
 * answers, connections that connect or fail, transactions that complete
 * or reset), its choices out (what it asks DNS, how many connections it
 * opens and to which address, which domain an idle connection takes next,
 * what fails and how). The seam is struct outbound_ops
 * (engine/outbound/internal.h): the test plays the resolver, the
 * connections and the outcome hand-off; the scheduler, the sites, the
 * policy and the local limiter are the real ones.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "dns/internal.h"
#include "engine/config.h"
#include "engine/engine.h"
#include "engine/limits.h"
#include "engine/node_caps.h"
#include "common/clock.h"
#include "common/hash.h"
#include "common/intern.h"
#include "engine/outbound/internal.h"
#include "queue/queue.h"

#define MAXC 64

/* What the scheduler did, as the test's stand-ins saw it. */
struct fx {
    struct worker w;
    struct engine e;
    struct config *cfg;
    struct delivery *d;
    char path[64];

    unsigned resolves;         /* lookups asked for */
    char resolved[8][64];      /* their names */
    unsigned cancels;
    struct conn *open[MAXC];   /* connections opened and not gone */
    unsigned nopen;
    unsigned opened;           /* connections opened in all */
    unsigned open_calls;       /* opens asked for, made or not */
    unsigned open_fails;       /* opens to fail before any succeeds ... */
    int open_err;              /* ... with this -errno (0: -ENOMEM) ... */
    char open_source[64];      /* ... and this source address ("" none) */
    char fail_from[64];        /* opens from this source fail with open_err ("" none) */
    char opened_to[MAXC][384]; /* "mx name addr" of each, in order */
    unsigned resumed;          /* idle connections handed a domain */
    unsigned quits;            /* idle connections told to say goodbye */
    struct conn *quit;         /* the last of them */
    unsigned failed;           /* recipients failed without a session */
    unsigned fail_keeps;       /* fails to refuse (a message unreadable just then) first */
    struct smtp_outcome last_fail;
    enum classify_source last_src;
    char last_fail_source[64]; /* where it was told from: the source ("" none) */
    char last_fail_mx[256];    /* ... and the MX host */
    unsigned finished;         /* jobs reported after a transaction */
    unsigned txts;             /* TXT lookups asked for (MTA-STS first checks) */
    char txt_name[128];        /* the last one's name */
    dns_txt_fn *txt_cb;        /* ... and its callback, for the test to answer */
    void *txt_arg;
    /* Site affinity: the route table as the test keeps it */
    char claimed[8][64];       /* domains claimed ... */
    unsigned claimed_by[8];    /* ... for these workers */
    unsigned nclaimed;
    unsigned handed;           /* jobs handed to another worker */
    unsigned handed_to;        /* the last hand-over's worker */
    char busy_host[64];        /* the last site marked busy, by MX host */
};

static struct fx *F;

static int
t_resolve(struct delivery *d, struct dest *t, const char *name, struct dns_mx_result **res,
          struct dns_req **req)
{
    (void)d;
    (void)res;
    snprintf(F->resolved[F->resolves++ % 8], sizeof(F->resolved[0]), "%s", name);
    *req = (struct dns_req *)t; /* a token: the answer comes from the test */
    return 0;
}

static void
t_cancel(struct delivery *d, struct dns_req *req)
{
    (void)d;
    (void)req;
    F->cancels++;
}

static struct conn *
t_open(struct dest *t, const struct dns_mx_host *h, const union dns_addr *a,
       const struct mx_policy *src, uint32_t src_id, struct open_fail *why)
{
    assert_true(F->nopen < MAXC);
    F->open_calls++;
    if (F->fail_from[0] != '\0' && src != NULL && strcmp(src->pattern, F->fail_from) == 0) {
        why->err = F->open_err;
        snprintf(why->source, sizeof(why->source), "%s", src->pattern);
        return NULL;
    }
    if (F->open_fails > 0) {
        F->open_fails--;
        why->err = F->open_err != 0 ? F->open_err : -ENOMEM;
        snprintf(why->source, sizeof(why->source), "%s", F->open_source);
        return NULL;
    }
    struct conn *c = calloc(1, sizeof(*c));
    assert_non_null(c);
    c->st.fd = -1;
    sched_conn_attach(c, t, h, a, src, src_id);
    snprintf(F->opened_to[F->opened % MAXC], sizeof(F->opened_to[0]), "%s %s%s%s", h->name,
             c->addr_str, src ? " from " : "", src ? src->pattern : "");
    F->opened++;
    F->open[F->nopen++] = c;
    return c;
}

static void conn_ready(struct conn *c, enum sched_next *what);

static void
t_resume(struct conn *c)
{
    F->resumed++;
    enum sched_next what;
    conn_ready(c, &what);
}

static void
t_quit(struct conn *c)
{
    F->quits++;
    F->quit = c;
}

static bool
t_fail(struct delivery *d, struct dest *t, struct job *j, const struct smtp_outcome *o,
       enum classify_source src)
{
    (void)d;
    if (F->fail_keeps > 0) {
        F->fail_keeps--;
        return false;
    }
    F->failed += j->n;
    F->last_fail = *o;
    F->last_src = src;
    /* as job_fail tells where */
    bool at = t->last_fail != NULL && o == &t->last_fail->o;
    snprintf(F->last_fail_source, sizeof(F->last_fail_source), "%s",
             at ? t->last_fail->source : "");
    snprintf(F->last_fail_mx, sizeof(F->last_fail_mx), "%s", at ? t->last_fail->mx : "");
    free(j);
    return true;
}

static const struct outbound_ops test_ops = {
    .resolve = t_resolve,
    .cancel = t_cancel,
    .open = t_open,
    .resume = t_resume,
    .quit = t_quit,
    .fail = t_fail,
};

static int
t_txt(struct delivery *d, const char *name, dns_txt_fn *cb, void *arg)
{
    (void)d;
    F->txts++;
    snprintf(F->txt_name, sizeof(F->txt_name), "%s", name);
    F->txt_cb = cb;
    F->txt_arg = arg;
    return 0;
}

/* With MTA-STS: the worker asks TXT records itself. */
static const struct outbound_ops test_ops_txt = {
    .resolve = t_resolve,
    .cancel = t_cancel,
    .open = t_open,
    .resume = t_resume,
    .quit = t_quit,
    .fail = t_fail,
    .txt = t_txt,
};

/* A TXT lookup c-ares fails at once (no socket under EMFILE, no
 * memory): its callback runs inside the call, as dns.h allows. */
static int
t_txt_now(struct delivery *d, const char *name, dns_txt_fn *cb, void *arg)
{
    (void)d;
    F->txts++;
    snprintf(F->txt_name, sizeof(F->txt_name), "%s", name);
    cb(arg, DNS_RETRY, "resolver error", NULL, 0, DNS_TTL_UNKNOWN);
    return 0;
}

static const struct outbound_ops test_ops_txt_now = {
    .resolve = t_resolve,
    .cancel = t_cancel,
    .open = t_open,
    .resume = t_resume,
    .quit = t_quit,
    .fail = t_fail,
    .txt = t_txt_now,
};

/* With two workers: the test keeps the route table (unclaimed domains
 * are this worker's). */
static unsigned
t_route(struct delivery *d, const char *domain)
{
    for (unsigned i = 0; i < F->nclaimed; i++)
        if (strcmp(F->claimed[i], domain) == 0)
            return F->claimed_by[i];
    return d->w->id;
}

static bool
t_claim(struct delivery *d, const char *domain, unsigned worker, const char *host)
{
    (void)d;
    if (host != NULL && strcmp(host, F->busy_host) == 0)
        return false;
    for (unsigned i = 0; i < F->nclaimed; i++)
        if (strcmp(F->claimed[i], domain) == 0)
            return false;
    assert_true(F->nclaimed < 8);
    snprintf(F->claimed[F->nclaimed], sizeof(F->claimed[0]), "%s", domain);
    F->claimed_by[F->nclaimed++] = worker;
    return true;
}

static void
t_unclaim(struct delivery *d, const char *domain)
{
    for (unsigned i = 0; i < F->nclaimed; i++)
        if (strcmp(F->claimed[i], domain) == 0 && F->claimed_by[i] == d->w->id) {
            F->nclaimed--;
            memmove(F->claimed[i], F->claimed[i + 1], (F->nclaimed - i) * sizeof(F->claimed[0]));
            memmove(&F->claimed_by[i], &F->claimed_by[i + 1],
                    (F->nclaimed - i) * sizeof(F->claimed_by[0]));
            return;
        }
}

static void
t_hand_over(struct dest *t, unsigned worker)
{
    struct job *j;
    while ((j = dest_pop(t)) != NULL) {
        F->handed++;
        free(j);
    }
    F->handed_to = worker;
}

static void
t_site_busy(struct delivery *d, const char *host)
{
    (void)d;
    snprintf(F->busy_host, sizeof(F->busy_host), "%s", host);
}

static const struct outbound_ops test_ops_aff = {
    .resolve = t_resolve,
    .cancel = t_cancel,
    .open = t_open,
    .resume = t_resume,
    .quit = t_quit,
    .fail = t_fail,
    .route = t_route,
    .claim = t_claim,
    .unclaim = t_unclaim,
    .hand_over = t_hand_over,
    .site_busy = t_site_busy,
};

/* ---- the fixture ---- */

/* [server] listen of the next fixture (a test that needs another sets it
 * and puts it back). */
static const char *fx_listen = "127.0.0.1:2587";

static void
setup_conf(struct fx *f, const char *extra)
{
    snprintf(f->path, sizeof(f->path), "/tmp/sluice-sched-XXXXXX");
    int fd = mkstemp(f->path);
    assert_true(fd >= 0);
    char text[2048];
    int n = snprintf(text, sizeof(text),
                     "[server]\nhostname = relay.test\nlisten = %s\n%s\n", fx_listen, extra);
    assert_int_equal(write(fd, text, (size_t)n), n);
    close(fd);
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    int rc = config_load(f->path, &f->cfg, errs);
    fclose(errs);
    if (rc != 0)
        fprintf(stderr, "%s", buf);
    free(buf);
    unlink(f->path);
    assert_int_equal(rc, 0);
}

static struct fx *
fx_new(const char *extra)
{
    struct fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    F = f;
    setup_conf(f, extra);
    /* No ring: the scheduler needs the worker's clock and timers only. */
    assert_int_equal(timer_heap_init(&f->w.timers, 64), 0);
    f->w.now = clock_mono_ns();
    f->e.cfg = f->cfg;
    f->e.campaign_names = f->cfg->server.campaign_names;
    f->e.nworkers = 1;
    struct delivery *d = calloc(1, sizeof(*d));
    assert_non_null(d);
    d->e = &f->e;
    d->w = &f->w;
    d->ops = &test_ops;
    d->res = NULL;
    char err[128];
    struct limits_opts lo = {0};
    assert_int_equal(limits_new(&f->w, &lo, &d->lim, err, sizeof(err)), 0);
    assert_int_equal(sched_init(d, NULL), 0);
    scope_init(d);
    f->e.names = intern_new();
    assert_non_null(f->e.names);
    delivery_env_take(d); /* the engine above: config, names */
    f->d = d;
    return f;
}

/* c is gone: as conn_free() does once its transport let go. */
static void
conn_gone(struct conn *c, const struct smtp_outcome *session)
{
    if (c->job != NULL) {
        dest_push(c->dest, c->job, true);
        c->job = NULL;
        c->dest->inflight--;
    }
    for (unsigned i = 0; i < F->nopen; i++)
        if (F->open[i] == c) {
            F->open[i] = F->open[--F->nopen];
            break;
        }
    sched_conn_detach(c, session);
}

static void
fx_free(struct fx *f)
{
    struct delivery *d = f->d;
    /* each [mx] or [source] key counts its idle holders right (mx_wait) */
    for (struct mxkey *k = d->mxkeys; k != NULL; k = k->next) {
        unsigned idle = 0;
        for (struct conn *c = d->all; c != NULL; c = c->next_all)
            idle += c->on_idle && (c->mxk == k || c->srck == k);
        assert_int_equal(k->idle, idle);
        /* and lists them, each once, idle ones holding it */
        unsigned listed = 0;
        for (struct conn *c = k->idle_holders; c != NULL && listed <= idle;
             c = c->key_idle_next[c->mxk == k ? 0 : 1]) {
            assert_true(c->on_idle && (c->mxk == k || c->srck == k));
            assert_ptr_equal(*c->key_idle_pprev[c->mxk == k ? 0 : 1], c);
            listed++;
        }
        assert_int_equal(listed, idle);
    }
    d->stopping = true;
    sched_stop(d);
    while (f->nopen > 0)
        conn_gone(f->open[f->nopen - 1], NULL);
    sched_release_leases(d);
    sched_free_dests(d);
    scope_fini(d);
    d->lim = limits_free(d->lim);
    sched_fini(d);
    free(d);
    intern_free(f->e.names);
    config_free(f->cfg);
    timer_heap_fini(&f->w.timers);
    free(f);
    F = NULL;
}

/* ---- scripted events ---- */

static uint64_t next_id = 1;

/* n recipients of a new message for domain, of pool (NULL: none). */
static void
submit_pool(const char *domain, unsigned n, const char *pool)
{
    struct job *j = job_new(domain, n);
    assert_non_null(j);
    j->id = next_id++;
    j->n = n;
    j->expire_ms = UINT64_MAX; /* known, and never: no spool to read it from */
    j->owner.pool = intern_id(F->e.names, pool);
    for (unsigned i = 0; i < n; i++)
        j->idx[i] = i;
    struct dest *t = dest_get_pool(F->d, domain, j->owner.pool);
    assert_non_null(t);
    dest_enqueue(t, j);
}

/* A connect refused, as the transport reports it. */
static struct smtp_outcome
refused_outcome(void)
{
    struct smtp_outcome o;
    memset(&o, 0, sizeof(o));
    o.status = SMTP_STATUS_TEMPFAIL;
    o.reason = SMTP_REASON_CONNECT_REFUSED;
    snprintf(o.text, sizeof(o.text), "Connection refused");
    return o;
}

/* A receiver's 421: it pushes back. */
static struct smtp_outcome
bye_421(void)
{
    struct smtp_outcome o;
    memset(&o, 0, sizeof(o));
    o.code = 421;
    o.status = SMTP_STATUS_TEMPFAIL;
    o.reason = SMTP_REASON_REPLY;
    snprintf(o.text, sizeof(o.text), "4.7.0 try later");
    return o;
}

static void
submit(const char *domain, unsigned n)
{
    submit_pool(domain, n, NULL);
}

/* An answer for domain: hosts[i] at 192.0.2.(i+1) (addr_base + i), or the
 * status alone. */
static void
answer(const char *domain, enum dns_status st, const char **hosts, const unsigned *pref,
       const uint8_t (*addrs)[16], unsigned n)
{
    struct result_host rh[8] = {0}; /* zeroed: with n 0 (a status alone), nothing is set */
    assert_true(n <= sizeof(rh) / sizeof(rh[0]));
    for (unsigned i = 0; i < n; i++)
        rh[i] = (struct result_host){.name = hosts[i], .preference = pref[i], .n4 = 1,
                                     .a4 = &addrs[i]};
    struct dns_mx_result *r = result_new(st, st == DNS_OK ? NULL : "scripted", domain, rh,
                                         st == DNS_OK ? n : 0, false);
    assert_non_null(r);
    r->expires = UINT64_MAX;
    struct dest *t = dest_get(F->d, domain);
    assert_non_null(t->req); /* the scheduler asked */
    dest_on_mx(t, r);
}

/* The same for domain's destination of pool. */
static void
answer_pool(const char *domain, const char *pool, const char **hosts, const uint8_t (*addrs)[16],
            unsigned n)
{
    struct result_host rh[8] = {0};
    assert_true(n <= sizeof(rh) / sizeof(rh[0]));
    for (unsigned i = 0; i < n; i++)
        rh[i] = (struct result_host){.name = hosts[i], .preference = 10, .n4 = 1, .a4 = &addrs[i]};
    struct dns_mx_result *r = result_new(DNS_OK, NULL, domain, rh, n, false);
    assert_non_null(r);
    r->expires = UINT64_MAX;
    struct dest *t = dest_get_pool(F->d, domain, intern_id(F->e.names, pool));
    assert_non_null(t->req);
    dest_on_mx(t, r);
}

/* The same, one IPv6 address (AAAA) per host. */
static void
answer6(const char *domain, const char **hosts, const uint8_t (*addrs)[16], unsigned n)
{
    struct result_host rh[8] = {0};
    assert_true(n <= sizeof(rh) / sizeof(rh[0]));
    for (unsigned i = 0; i < n; i++)
        rh[i] = (struct result_host){.name = hosts[i], .preference = 10, .n6 = 1, .a6 = &addrs[i]};
    struct dns_mx_result *r = result_new(DNS_OK, NULL, domain, rh, n, false);
    assert_non_null(r);
    r->expires = UINT64_MAX;
    struct dest *t = dest_get(F->d, domain);
    assert_non_null(t->req);
    dest_on_mx(t, r);
}

static const uint8_t A1[][16] = {{192, 0, 2, 1}, {192, 0, 2, 2}, {192, 0, 2, 3}};
static const char *MX1[] = {"mx1.hoster.test", "mx2.hoster.test", "mx3.hoster.test"};

/* The session reached READY: the job the scheduler hands it, as
 * connection.c's conn_next() takes it. */
static void
conn_ready(struct conn *c, enum sched_next *what)
{
    unsigned moves = 0;
    struct job *j = sched_conn_next(c, &moves, what);
    if (j != NULL) {
        c->job = j;
        c->dest->inflight++;
        if (c->dest->site == c->site)
            site_turn_taken(c->dest); /* as connection.c's conn_next */
    }
}

/* The transaction of c ended with the message outcome status (and
 * code), answering the command of state stage. */
static bool
txn_done_at(struct conn *c, enum smtp_status st, unsigned code, enum smtp_reason reason,
            enum smtp_scope scope, enum smtp_client_state stage)
{
    memset(&c->txn, 0, sizeof(c->txn));
    c->txn.msg.status = st;
    c->txn.msg.code = (uint16_t)code;
    c->txn.msg.reason = reason;
    c->txn.msg.scope = scope;
    c->txn.msg.stage = (uint8_t)stage;
    c->txn.delivered = st == SMTP_STATUS_DELIVERED ? c->job->n : 0;
    c->expire_ms = UINT64_MAX;
    struct job *j = c->job;
    c->job = NULL;
    c->nmsgs++;
    bool requeued = sched_txn_done(c, j);
    if (!requeued) {
        F->finished++;
        free(j);
    }
    return requeued;
}

static bool
txn_done(struct conn *c, enum smtp_status st, unsigned code, enum smtp_reason reason,
         enum smtp_scope scope)
{
    return txn_done_at(c, st, code, reason, scope, SMTP_CLIENT_S_RCPT);
}

/* Transactions of holder delivered on c, 1 ms apart, until c moves to
 * to (or max of them): how many it took. Each ends with c taking
 * another job. */
static unsigned
txns_until(struct conn *c, struct dest *holder, struct dest *to, unsigned max)
{
    enum sched_next what;
    unsigned k = 0;
    for (; k < max && c->dest != to; k++) {
        assert_ptr_equal(c->dest, holder);
        F->w.now += MS_TO_NS(1);
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
    }
    return k;
}

static unsigned
allowed(const char *domain)
{
    return site_window_allowed(&dest_get(F->d, domain)->site->win);
}

/* ---- tests ---- */

/* A new site opens initial_connections, then one more per transaction
 * that completes while the window is in use (slow start), and no more
 * than the jobs need. */
/* A connection that cannot be opened for want of memory just then
 * leaves t's job queued with a timer to try again: before, t waited for
 * another job of its domain, or a restart. */
static void
failed_open_tries_again(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 1\n");
    f->open_fails = 1; /* -ENOMEM */
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *t = dest_get(f->d, "a.test");
    assert_int_equal(f->opened, 0);
    assert_int_equal(f->failed, 0);
    assert_false(fairq_empty(&t->q));
    assert_true(timer_armed(&t->lim_timer));
    f->w.now += MS_TO_NS(HOLD_MIN_MS);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->opened, 1);
    fx_free(f);
}

/* A failure of a destination with a great deal waiting fails it some
 * thousands of recipients a turn (dest_fail_each's budget), each exactly
 * once, the rest on the next turns with the same outcome and where
 * (source, MX host): all of it in one turn stalled the worker for
 * seconds (300 messages of 1,000 recipients against a dead host). */
static void
failing_much_is_spread_over_turns(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 1\n");
    f->open_fails = 100;
    f->open_err = -EADDRNOTAVAIL;
    snprintf(f->open_source, sizeof(f->open_source), "192.0.2.9");
    for (unsigned i = 0; i < 25; i++)
        submit("a.test", 1000); /* 100 jobs of 100 each (max_rcpt_per_txn) */
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *t = dest_get(f->d, "a.test");
    assert_int_equal(f->open_calls, 1);
    assert_true(f->failed > 0 && f->failed <= 10000);
    assert_int_equal(f->failed + dest_queued(t) * 100, 25000);
    assert_non_null(t->fail_more);
    assert_true(timer_armed(&t->lim_timer));
    for (unsigned turn = 0; turn < 10 && dest_queued(t) > 0; turn++) {
        unsigned before = f->failed;
        f->w.now += MS_TO_NS(1);
        timer_run(&f->w.timers, f->w.now, NULL);
        assert_true(f->failed > before && f->failed - before <= 10000);
        assert_string_equal(f->last_fail_source, "192.0.2.9");
        assert_string_equal(f->last_fail.text,
                            "cannot open a connection from 192.0.2.9: Cannot assign requested "
                            "address");
    }
    assert_int_equal(f->failed, 25000);
    assert_int_equal(dest_queued(t), 0);
    assert_null(t->fail_more);
    assert_int_equal(f->open_calls, 1); /* none tried again meanwhile */
    fx_free(f);
}

/* A flush (delivery_lift_holds) meanwhile: what the failure left for
 * the next turns is tried now instead of deferred (it would have missed
 * the flush, deferred just after it). */
static void
failing_much_then_a_flush_tries_the_rest(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 1\n");
    f->open_fails = 1;
    f->open_err = -EADDRNOTAVAIL;
    snprintf(f->open_source, sizeof(f->open_source), "192.0.2.9");
    for (unsigned i = 0; i < 25; i++)
        submit("a.test", 1000);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *t = dest_get(f->d, "a.test");
    unsigned failed = f->failed;
    assert_true(failed > 0 && failed < 25000);
    assert_non_null(t->fail_more);
    assert_int_equal(delivery_lift_holds(f->d, true, NULL, 0), 1);
    assert_null(t->fail_more);
    assert_int_equal(f->opened, 1); /* the host is back: tried */
    f->w.now += MS_TO_NS(1);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->failed, failed);
    fx_free(f);
}

/* A connection that cannot be opened for a reason of this node (its
 * source address is not on this host: bind() says EADDRNOTAVAIL; no
 * socket: EMFILE) is a connection that failed: what waits is deferred
 * at once with the cause and the source named, as connection_failure,
 * and the destination rests, opening nothing (nor logging the failure
 * again) until the rest ends; its other addresses are not tried, each
 * would fail alike. Before, it tried again every second, for ever, its
 * mail never deferred, expired or bounced. */
static void
failed_open_of_this_node_defers_and_holds(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 1\n");
    f->open_fails = 100;
    f->open_err = -EADDRNOTAVAIL;
    snprintf(f->open_source, sizeof(f->open_source), "192.0.2.9");
    submit("a.test", 1);
    submit("a.test", 2);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    struct dest *t = dest_get(f->d, "a.test");
    assert_int_equal(f->open_calls, 1); /* not again at the second address */
    assert_int_equal(f->opened, 0);
    assert_int_equal(f->failed, 3);
    assert_int_equal(dest_queued(t), 0);
    assert_int_equal(f->last_fail.status, SMTP_STATUS_TEMPFAIL);
    assert_int_equal(f->last_fail.code, 451);
    assert_int_equal(f->last_fail.enh.cls, 4);
    assert_int_equal(f->last_fail.enh.subject, 4);
    assert_string_equal(f->last_fail.text,
                        "cannot open a connection from 192.0.2.9: Cannot assign requested address");
    assert_int_equal(f->last_src, CLASSIFY_CONNECT);
    assert_int_equal(classify(NULL, policy_source(&f->last_fail, f->last_src), f->last_fail.code,
                              &f->last_fail.enh, f->last_fail.text),
                     BOUNCE_CONNECTION_FAILURE);
    assert_string_equal(f->last_fail_source, "192.0.2.9");
    assert_string_equal(f->last_fail_mx, ""); /* no MX host is to blame */
    uint64_t hold_ms = policy_all_failed_hold(t->pol->site_hold);
    assert_true(t->hold_until >= f->w.now + MS_TO_NS(hold_ms));
    /* Mail that comes during the rest waits for its end: no open before
     * (its expiry known, the sweeps of the rest need no spool). */
    submit("a.test", 1);
    struct fairq_iter it;
    fairq_iter_init(&t->q, &it);
    job_of(fairq_iter_next(&it))->expire_ms = UINT64_MAX;
    for (uint64_t ms = 0; ms + HOLD_MIN_MS < hold_ms; ms += HOLD_MIN_MS) {
        f->w.now += MS_TO_NS(HOLD_MIN_MS);
        timer_run(&f->w.timers, f->w.now, NULL);
    }
    assert_true(f->w.now < t->hold_until);
    assert_int_equal(f->open_calls, 1);
    assert_int_equal(f->failed, 3);
    assert_int_equal(dest_queued(t), 1);
    f->w.now = t->hold_until;
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->open_calls, 2); /* tried again, failed again: deferred */
    assert_int_equal(f->failed, 4);
    assert_true(t->hold_until > f->w.now);
    /* No socket (EMFILE), no source bound: the text says the cause alone. */
    submit("b.test", 1);
    f->open_err = -EMFILE;
    f->open_source[0] = '\0';
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->open_calls, 3);
    assert_int_equal(f->failed, 5);
    assert_string_equal(f->last_fail.text, "cannot open a connection: Too many open files");
    assert_true(dest_get(f->d, "b.test")->hold_until > f->w.now);
    fx_free(f);
}

/* A bounce for every job of a domain (NXDOMAIN) that meets a message it
 * cannot read just then: that job stays queued, in its place, and is
 * failed when the destination runs again; the others go at once. */
static void
failure_of_an_unreadable_message_waits(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n");
    submit("nx.test", 1);
    submit("nx.test", 2);
    f->fail_keeps = 1;
    answer("nx.test", DNS_NOT_FOUND, NULL, NULL, NULL, 0);
    struct dest *t = dest_get(f->d, "nx.test");
    assert_int_equal(f->failed, 2); /* the second job's two */
    assert_int_equal(dest_queued(t), 1);
    assert_true(timer_armed(&t->lim_timer));
    f->w.now += MS_TO_NS(HOLD_MIN_MS);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->failed, 3);
    assert_int_equal(dest_queued(t), 0);
    fx_free(f);
}

static void
window_opens_and_grows(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 2\n"
                          "[domain *]\nmax_connections = 10\n");
    submit("a.test", 1);
    submit("a.test", 1);
    submit("a.test", 1);
    submit("a.test", 1);
    submit("a.test", 1);
    submit("a.test", 1);
    assert_int_equal(f->resolves, 1); /* one lookup, whatever the jobs */
    assert_string_equal(f->resolved[0], "a.test");
    assert_int_equal(f->opened, 0);   /* nothing before the answer */
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 2);
    assert_string_equal(f->opened_to[0], "mx1.hoster.test 192.0.2.1:25");
    struct dest *t = dest_get(f->d, "a.test");
    assert_true(t->want.on); /* waits for a slot of its site */

    enum sched_next what;
    struct conn *c0 = f->open[0];
    f->w.now += MS_TO_NS(1); /* the connections take 1 ms to open */
    conn_ready(c0, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    conn_ready(f->open[1], &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    /* Both in use, but the jobs waited 1 ms (less than SITE_WAIT_MIN_NS,
     * and no longer than twice the time a connection takes to open): a new
     * one would not have been sooner. */
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    assert_int_equal(allowed("a.test"), 2);
    assert_int_equal(f->opened, 2);
    /* The next job waited 111 ms: the completed transaction earns a third. */
    f->w.now += MS_TO_NS(110);
    conn_ready(c0, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    assert_int_equal(allowed("a.test"), 3);
    assert_int_equal(f->opened, 3);
    conn_ready(c0, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    assert_int_equal(allowed("a.test"), 4);
    /* Jobs left: 6 - 3 done - 1 in flight = 2, connections 1 opening, 2
     * in use: a fourth opens for the job nobody is opening for. */
    assert_int_equal(f->opened, 4);
    assert_int_equal(f->finished, 3);
    fx_free(f);
}

/* A reload that moves a domain's route to another port of the same host
 * retires its connections to the old port after their transaction; its
 * next connection goes to the new one. Before, only the host names were
 * compared: the connections to the old port carried its mail on until
 * they ended (max_messages_per_connection, or their idle timeout). */
static void
route_port_change_retires_old_connections(void **state)
{
    (void)state;
    static const char *relay[] = {"relay.test"};
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n"
                          "[domain r.test]\nroute = relay.test:2525\n");
    for (int i = 0; i < 10; i++)
        submit("r.test", 1);
    answer("r.test", DNS_OK, relay, (unsigned[]){0}, A1, 1);
    assert_int_equal(f->opened, 1);
    assert_string_equal(f->opened_to[0], "relay.test 192.0.2.1:2525");
    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);

    struct config *old = f->cfg;
    setup_conf(f, "[delivery]\ninitial_connections = 1\n"
                  "[domain r.test]\nroute = relay.test:587\n");
    f->e.cfg = f->cfg;
    delivery_reconfigure(f->d);
    config_free(old);
    answer("r.test", DNS_OK, relay, (unsigned[]){0}, A1, 1); /* asked again */

    /* The transaction on the old port ends: the connection goes. */
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT);
    assert_string_equal(c->quit_why, "mx_changed");
    conn_gone(c, NULL);
    assert_true(f->opened >= 2);
    assert_string_equal(f->opened_to[f->opened - 1], "relay.test 192.0.2.1:587");
    fx_free(f);
}

/* A reload that raises a domain's max_connections raises its site's
 * ceiling: the window grows past the old cap as transactions complete
 * while mail waits. Before the fix the ceiling was set only when a domain
 * joined a site, so a live site kept the old cap (a domain with a
 * backlog stayed at its old max_connections until its site was evicted
 * or the node restarted). */
static void
reload_raises_the_sites_ceiling(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 2\n"
                          "[domain *]\nmax_connections = 2\n");
    for (int i = 0; i < 30; i++)
        submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 2);
    assert_int_equal(dest_get(f->d, "a.test")->site->win.ceiling, 2);

    struct config *old = f->cfg;
    setup_conf(f, "[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 2\n"
                  "[domain *]\nmax_connections = 10\n");
    f->e.cfg = f->cfg;
    delivery_reconfigure(f->d);
    config_free(old);

    enum sched_next what;
    struct conn *c0 = f->open[0];
    f->w.now += MS_TO_NS(1);
    conn_ready(c0, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    conn_ready(f->open[1], &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    /* Jobs that waited 31 ms each: the completed transactions earn a
     * third connection (slow start goes on past the old ceiling: no
     * failure ended it), a few rounds at most. */
    for (int round = 0; round < 5 && allowed("a.test") < 3; round++) {
        f->w.now += MS_TO_NS(30);
        conn_ready(c0, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
        assert_false(
            txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    }
    assert_int_equal(allowed("a.test"), 3);
    assert_int_equal(f->opened, 3);
    fx_free(f);
}

/* Three connections of a.test carry its mail under before's config; a
 * reload to after lowers a cap to one: after their transactions two end
 * (quit_why max_connections), not three (each saw three open until the
 * first's QUIT was answered), and none is opened in their place. */
static void
lowered_cap_ends_the_extra_ones(const char *before, const char *after)
{
    struct fx *f = fx_new(before);
    for (int i = 0; i < 12; i++)
        submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 3);
    enum sched_next what;
    for (unsigned i = 0; i < 3; i++) {
        conn_ready(f->open[i], &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
    }
    struct config *old = f->cfg;
    setup_conf(f, after);
    f->e.cfg = f->cfg;
    delivery_reconfigure(f->d);
    config_free(old);
    struct conn *c[3] = {f->open[0], f->open[1], f->open[2]}, *going[3];
    unsigned quits = 0, jobs = 0;
    for (unsigned i = 0; i < 3; i++) {
        assert_false(
            txn_done(c[i], SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c[i], &what);
        if (what == SCHED_NEXT_QUIT) {
            assert_string_equal(c[i]->quit_why, "max_connections");
            going[quits++] = c[i];
        } else {
            assert_int_equal(what, SCHED_NEXT_JOB);
            jobs++;
        }
    }
    assert_int_equal(quits, 2);
    assert_int_equal(jobs, 1);
    for (unsigned i = 0; i < quits; i++)
        conn_gone(going[i], NULL);
    assert_int_equal(dest_get(f->d, "a.test")->conns, 1);
    assert_int_equal(f->opened, 3);
    /* those told to end count as gone no more once gone */
    assert_int_equal(dest_get(f->d, "a.test")->conns_quitting, 0);
    for (struct mxkey *k = f->d->mxkeys; k != NULL; k = k->next)
        assert_int_equal(k->quitting, 0);
    fx_free(f);
}

/* A reload that lowers a domain's max_connections retires the
 * connections over it after their transaction, though mail waits for
 * them. Before, only new connections met the lower cap: while mail
 * flowed none went idle, and three stayed open under a cap of one. */
static void
reload_lowers_max_connections_on_open_ones(void **state)
{
    (void)state;
    lowered_cap_ends_the_extra_ones("[delivery]\nallow_networks = 127.0.0.0/8\n"
                                    "initial_connections = 3\n[domain *]\nmax_connections = 3\n",
                                    "[delivery]\nallow_networks = 127.0.0.0/8\n"
                                    "initial_connections = 3\n[domain *]\nmax_connections = 1\n");
}

/* The same for an [mx] section's max_connections: before, its
 * connections carried the mail on (three open under a cap of one until
 * the queue was empty). */
static void
reload_lowers_an_mx_sections_cap_on_open_ones(void **state)
{
    (void)state;
    lowered_cap_ends_the_extra_ones("[delivery]\nallow_networks = 127.0.0.0/8\n"
                                    "initial_connections = 3\n[domain *]\nmax_connections = 10\n"
                                    "[mx *.hoster.test]\nmax_connections = 3\n",
                                    "[delivery]\nallow_networks = 127.0.0.0/8\n"
                                    "initial_connections = 3\n[domain *]\nmax_connections = 10\n"
                                    "[mx *.hoster.test]\nmax_connections = 1\n");
}

/* Over 100 MX hosts and many domains, each host's mail comes a few jobs
 * at a time: jobs a busy connection takes within twice the time a new one
 * takes to open earn no connection, however many transactions complete. */
static void
window_holds_while_mail_is_served(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(2); /* it opens in 2 ms */
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    for (unsigned i = 0; i < 40; i++) {
        /* A job of another domain of the site comes while c is busy and
         * is taken 3 ms later: within twice the 2 ms, and SITE_WAIT_MIN_NS. */
        char dom[32];
        snprintf(dom, sizeof(dom), "d%u.test", i);
        submit(dom, 1);
        answer(dom, DNS_OK, MX1, (unsigned[]){10}, A1, 1);
        f->w.now += MS_TO_NS(3);
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
    }
    assert_int_equal(allowed("a.test"), 1);
    assert_int_equal(f->opened, 1);
    assert_int_equal(f->finished, 40);
    /* One that waits 110 ms: the site earns a second connection. */
    submit("late.test", 1);
    answer("late.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    f->w.now += MS_TO_NS(110);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    submit("late2.test", 1);
    answer("late2.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    assert_int_equal(allowed("a.test"), 2);
    assert_int_equal(f->opened, 2);
    fx_free(f);
}

/* A domain held to its message rate: its jobs wait for tokens, not for
 * a connection, and that wait earns its site no more connections. */
static void
window_ignores_waits_for_rate_tokens(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 1\n"
                          "[domain slow.test]\nmax_connections = 10\nmax_message_rate = 10/s\n");
    for (unsigned i = 0; i < 12; i++) /* a backlog too: 11 behind the first */
        submit("slow.test", 1);
    answer("slow.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(2);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    /* (The first job's backlog may earn one more: the rate is not known
     * to hold it yet.) */
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    unsigned w0 = allowed("slow.test");
    assert_true(w0 <= 2);
    for (unsigned i = 0; i < 4; i++) {
        /* The next token comes 100 ms later: c idles until then, and the
         * limiter's timer hands it the next job. */
        unsigned before = f->resumed;
        conn_ready(c, &what);
        assert_int_equal(what, SCHED_NEXT_IDLE);
        f->w.now += MS_TO_NS(100);
        timer_run(&f->w.timers, f->w.now, NULL);
        assert_int_equal(f->resumed, before + 1);
        assert_non_null(c->job);
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    }
    assert_int_equal(allowed("slow.test"), w0);
    assert_true(f->opened <= w0);
    fx_free(f);
}

/* Connect failures halve the window, once per round; the failover cursor
 * moves to the next MX host; when every address failed in a row, what
 * waits is deferred with the last failure and the destination rests. */
static void
failures_shrink_and_fail_over(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\n"
                          "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    for (unsigned i = 0; i < 8; i++)
        submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_int_equal(f->opened, 4);
    for (unsigned i = 0; i < 4; i++)
        assert_string_equal(f->opened_to[i], "mx1.hoster.test 192.0.2.1:25");
    struct smtp_outcome refused;
    memset(&refused, 0, sizeof(refused));
    refused.status = SMTP_STATUS_TEMPFAIL;
    refused.enh = (struct smtp_enh){4, 4, 1};
    snprintf(refused.text, sizeof(refused.text), "connect to mx1: Connection refused");
    struct conn *c = f->open[0];
    sched_conn_event(c, POLICY_CONNECT_FAILED, &refused);
    conn_gone(c, NULL);
    assert_int_equal(allowed("b.test"), 2);
    /* Another of the same round: no second halving. */
    c = f->open[0];
    sched_conn_event(c, POLICY_CONNECT_FAILED, &refused);
    conn_gone(c, NULL);
    assert_int_equal(allowed("b.test"), 2);
    assert_int_equal(f->opened, 4); /* 2 open, window 2: none new */
    fx_free(f);

    /* One connection at a time: the failover cursor moves to the backup
     * MX, then every address has failed in a row. */
    f = fx_new("[delivery]\ninitial_connections = 1\n"
               "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    for (unsigned i = 0; i < 8; i++)
        submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_int_equal(f->opened, 1);
    c = f->open[0];
    sched_conn_event(c, POLICY_CONNECT_FAILED, &refused);
    conn_gone(c, NULL);
    assert_int_equal(f->opened, 2);
    assert_string_equal(f->opened_to[1], "mx2.hoster.test 192.0.2.2:25");
    assert_int_equal(f->failed, 0);
    snprintf(refused.text, sizeof(refused.text), "connect to mx2: Connection refused");
    c = f->open[0];
    sched_conn_event(c, POLICY_CONNECT_FAILED, &refused);
    conn_gone(c, NULL);
    /* Every address failed in a row: deferred with the last reason, held. */
    assert_int_equal(f->opened, 2);
    assert_int_equal(f->failed, 8);
    assert_int_equal(f->last_fail.status, SMTP_STATUS_TEMPFAIL);
    assert_int_equal(f->last_src, CLASSIFY_CONNECT);
    assert_string_equal(f->last_fail.text, "connect to mx2: Connection refused");
    struct dest *t = dest_get(f->d, "b.test");
    assert_true(t->hold_until > f->w.now);
    unsigned before = f->opened;
    submit("b.test", 1);
    assert_int_equal(f->opened, before); /* held: nothing new */
    fx_free(f);
}

/* A site rests with the domain whose every address failed (the hosts'
 * failure, nothing of the site open): another domain of the same hosts
 * opens nothing until the rest ends, then tries again; a 421 rests the
 * site too. Before, each domain of a host that was down connected and
 * failed in turn, every site_hold. A TLS failure rests only its domain. */
static void
site_rests_with_a_failed_domain(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n"
                          "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    struct smtp_outcome refused = refused_outcome();
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    for (unsigned i = 0; i < 2; i++) { /* mx1, then mx2 */
        struct conn *c = f->open[0];
        sched_conn_event(c, POLICY_CONNECT_FAILED, &refused);
        conn_gone(c, NULL);
    }
    assert_int_equal(f->opened, 2);
    assert_int_equal(f->failed, 1); /* a.test's job deferred */
    struct site *site = dest_get(f->d, "a.test")->site;
    assert_true(site->hold_until > f->w.now);
    /* Same hosts, another domain: its site rests, nothing is opened, and
     * its mail is deferred with the site's failure, as a.test's was
     * (before, it waited in memory, told nothing, through each rest). */
    submit("b.test", 2);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    struct dest *b = dest_get(f->d, "b.test");
    assert_ptr_equal(b->site, site);
    assert_int_equal(f->opened, 2);
    assert_true(b->hold_until > f->w.now);
    assert_int_equal(dest_queued(b), 0);
    assert_int_equal(f->failed, 3); /* and b.test's two recipients */
    assert_int_equal(f->last_fail.reason, SMTP_REASON_CONNECT_REFUSED);
    assert_string_equal(f->last_fail.text, "Connection refused");
    assert_null(b->last_fail);
    /* Mail that comes for either while they are held is deferred at once
     * with the same failure (before, it waited in memory, untold, to the
     * end of the hold). */
    submit("a.test", 2);
    submit("b.test", 1);
    assert_int_equal(f->opened, 2);
    assert_int_equal(dest_queued(dest_get(f->d, "a.test")), 0);
    assert_int_equal(dest_queued(b), 0);
    assert_int_equal(f->failed, 6);
    assert_string_equal(f->last_fail.text, "Connection refused");
    /* The rest ends: b.test's mail, due again, tries again. */
    f->w.now += MS_TO_NS(31000);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->opened, 2);
    submit("b.test", 1);
    assert_int_equal(f->opened, 3);
    /* It is met with a 421: the site rests again. */
    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    struct smtp_outcome bye = bye_421();
    assert_false(txn_done(c, SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY, SMTP_SCOPE_SESSION));
    c->connected = true;
    conn_gone(c, &bye);
    assert_true(site->hold_until > f->w.now);
    assert_null(site->rest_fail);
    unsigned before = f->opened, failed = f->failed;
    submit("c.test", 1);
    answer("c.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_int_equal(f->opened, before);
    /* a 421's rest: the receiver pushed back for a while, the mail waits */
    assert_int_equal(dest_queued(dest_get(f->d, "c.test")), 1);
    assert_int_equal(f->failed, failed);
    fx_free(f);

    /* A TLS failure on every address: the domain rests, its site not. */
    f = fx_new("[delivery]\ninitial_connections = 1\n"
               "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    struct smtp_outcome tls = refused;
    tls.reason = SMTP_REASON_TLS_FAILED;
    snprintf(tls.text, sizeof(tls.text), "TLS handshake failed");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    for (unsigned i = 0; i < 2; i++) {
        struct conn *x = f->open[0];
        sched_conn_event(x, POLICY_CONNECT_FAILED, &tls);
        conn_gone(x, NULL);
    }
    assert_int_equal(f->failed, 1);
    assert_true(dest_get(f->d, "a.test")->site->hold_until <= f->w.now);
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_int_equal(f->opened, 3);
    fx_free(f);

    /* The first address failed a.test's own TLS, the second refused: not
     * every failure was the hosts', the site does not rest, and b.test
     * tries (before, it was deferred untried with "Connection refused"). */
    f = fx_new("[delivery]\ninitial_connections = 1\n"
               "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    struct conn *x = f->open[0];
    sched_conn_event(x, POLICY_CONNECT_FAILED, &tls);
    conn_gone(x, NULL);
    x = f->open[0];
    sched_conn_event(x, POLICY_CONNECT_FAILED, &refused);
    conn_gone(x, NULL);
    assert_int_equal(f->failed, 1);
    assert_true(dest_get(f->d, "a.test")->site->hold_until <= f->w.now);
    submit("b.test", 2);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_int_equal(f->opened, 3);
    assert_int_equal(f->failed, 1);
    fx_free(f);

    /* site_hold = 0: every address failed rests no site (the domain's own
     * hold keeps its 1 s floor), and the others try. */
    f = fx_new("[delivery]\ninitial_connections = 1\n"
               "[domain *]\nmax_connections = 10\nsite_hold = 0\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    for (unsigned i = 0; i < 2; i++) {
        x = f->open[0];
        sched_conn_event(x, POLICY_CONNECT_FAILED, &refused);
        conn_gone(x, NULL);
    }
    assert_int_equal(f->failed, 1);
    assert_int_equal(dest_get(f->d, "a.test")->site->hold_until, 0);
    submit("b.test", 2);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_int_equal(f->opened, 3);
    assert_int_equal(f->failed, 1);
    fx_free(f);

    /* site_hold = 0: a 421 rests nothing (before, it still set a rest of
     * 0 ms and logged event=site_held for_ms=0). */
    f = fx_new("[delivery]\ninitial_connections = 1\n"
               "[domain *]\nmax_connections = 10\nsite_hold = 0\n");
    submit("z.test", 2);
    answer("z.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    c = f->open[0];
    conn_ready(c, &what);
    assert_false(txn_done(c, SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY, SMTP_SCOPE_SESSION));
    c->connected = true;
    conn_gone(c, &bye);
    assert_int_equal(dest_get(f->d, "z.test")->site->hold_until, 0);
    fx_free(f);
}

/* A domain with site_hold = 0 shares hosts with one whose failure rests
 * the site: held after its own failure (the one-second floor), the mail
 * that comes for it waits for that hold, as site_hold = 0 asks, and is not
 * deferred with the other domain's failure. */
static void
site_hold_zero_keeps_its_mail_while_held(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n"
                          "[domain *]\nmax_connections = 10\nsite_hold = 30s\n"
                          "[domain b.test]\nsite_hold = 0\n");
    struct smtp_outcome refused = refused_outcome();
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct conn *c = f->open[0];
    sched_conn_event(c, POLICY_CONNECT_FAILED, &refused);
    conn_gone(c, NULL);
    struct site *site = dest_get(f->d, "a.test")->site;
    assert_true(site->hold_until > f->w.now);
    assert_non_null(site->rest_fail);
    /* b.test ignores the site's rest (site_hold 0), tries, fails: held
     * for the floor, its mail deferred with its own failure */
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 2);
    c = f->open[0];
    sched_conn_event(c, POLICY_CONNECT_FAILED, &refused);
    conn_gone(c, NULL);
    struct dest *b = dest_get(f->d, "b.test");
    assert_true(b->hold_until > f->w.now);
    unsigned failed = f->failed;
    submit("b.test", 1);
    assert_int_equal(dest_queued(b), 1);
    assert_int_equal(f->failed, failed);
    fx_free(f);
}

/* A flush of one domain ends its site's rest, and with it the holds of
 * the site's other domains that came during the rest (after a 421 their
 * mail waits in memory): they open at once too, not when the rest would
 * have ended. */
static void
lift_of_one_domain_frees_its_sites_other_domains(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n"
                          "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    struct smtp_outcome bye = bye_421();
    assert_false(txn_done(c, SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY, SMTP_SCOPE_SESSION));
    c->connected = true;
    conn_gone(c, &bye);
    struct site *site = dest_get(f->d, "a.test")->site;
    assert_true(site->hold_until > f->w.now);
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *b = dest_get(f->d, "b.test");
    assert_true(b->hold_until > f->w.now); /* held for the site's rest */
    assert_int_equal(dest_queued(b), 1);   /* a 421's rest: its mail waits */
    unsigned opened = f->opened;
    const char *names[] = {"a.test"};
    assert_int_equal(delivery_lift_holds(f->d, false, names, 1), 1);
    assert_true(site->hold_until <= f->w.now);
    assert_true(b->hold_until <= f->w.now);
    assert_true(f->opened > opened);
    bool b_opened = false;
    for (unsigned i = 0; i < f->nopen; i++)
        b_opened |= f->open[i]->dest == b;
    assert_true(b_opened || b->want.on); /* opened, or waits for the window */
    fx_free(f);
}

/* Many domains wait for a connection of their site (its window of one
 * is taken by the first domain's), and that connection fails on the only
 * address: the site rests, and every waiting domain's mail is deferred
 * with the failure, however many there are. Before, a wake ran at most 64
 * of them; the rest stayed waiting with nothing left to wake them (no
 * connection of the site to end, no timer), their mail untold and never
 * tried again: 2,259 recipients of 251 domains in an outage of 10,000
 * domains on one MX host (bench/relay/bench_backlog.py). */
static void
site_wake_runs_every_waiting_domain(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n"
                          "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    struct smtp_outcome refused = refused_outcome();
    enum { N = 200 };
    char name[32];
    for (unsigned i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "d%u.test", i);
        submit(name, 1);
        answer(name, DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    }
    assert_int_equal(f->opened, 1);
    struct site *site = dest_get(f->d, "d0.test")->site;
    assert_int_equal(site->want.n, N - 1);
    struct conn *c = f->open[0];
    sched_conn_event(c, POLICY_CONNECT_FAILED, &refused);
    conn_gone(c, NULL);
    assert_true(site->hold_until > f->w.now);
    assert_int_equal(f->opened, 1);
    assert_int_equal(site->want.n, 0);
    /* They run from their timers, due now (the loop fires them a slice
     * of a turn at a time), not all in the turn the site began to rest. */
    assert_int_equal(f->failed, 1);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->failed, N);
    for (unsigned i = 0; i < N; i++) {
        snprintf(name, sizeof(name), "d%u.test", i);
        struct dest *t = dest_get(f->d, name);
        assert_int_equal(dest_queued(t), 0);
        assert_true(t->hold_until > f->w.now); /* its hold's timer runs it again */
    }
    fx_free(f);
}

/* A site's wake (site_wake: a connection of the site ended, its window
 * grew, its rest ended) that meets, first on the site's list of domains
 * waiting for a connection, one blocked for a reason of its own: it
 * opens nothing for that one, and goes on to the site's next waiting
 * domain, which takes the room. Before the wake: a.test holds the site's
 * two connections, b.test and then c.test wait for one, and b.test is
 * blocked (how: enum wake_block). One of a.test's connections ends. */
enum wake_block {
    WAKE_HELD,      /* its own hold (dest_hold: its addresses failed) */
    WAKE_SUSPENDED, /* the operator's suspend of the domain */
    WAKE_RATE,      /* its max_connection_rate: no token for an hour */
    WAKE_CAP,       /* its max_connections (1), the site's connections at it: the site's
                     * window (2) has room for a domain with more */
};

static void
wake_past_a_blocked_domain(enum wake_block how)
{
    char conf[256];
    snprintf(conf, sizeof(conf),
             "[delivery]\ninitial_connections = 2\n"
             "[domain *]\nmax_connections = 10\nsite_hold = 30s\n[domain b.test]\n%s\n",
             how == WAKE_RATE  ? "max_connection_rate = 1/h"
             : how == WAKE_CAP ? "max_connections = 1"
                               : "");
    struct fx *f = fx_new(conf);
    submit("a.test", 1);
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 2);
    struct site *site = dest_get(f->d, "a.test")->site;
    assert_non_null(site);
    assert_int_equal(site_window_allowed(&site->win), 2);
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    submit("c.test", 1);
    answer("c.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *b = dest_get(f->d, "b.test"), *c = dest_get(f->d, "c.test");
    assert_ptr_equal(b->site, site);
    assert_ptr_equal(c->site, site);
    assert_int_equal(f->opened, 2); /* the site is full: both wait */
    assert_int_equal(site->want.n, 2);
    assert_ptr_equal(site->want.oldest, &b->want); /* b.test is woken first */

    uint64_t retry;
    switch (how) {
    case WAKE_HELD:
        dest_hold(b, 60000);
        break;
    case WAKE_SUSPENDED:
        assert_int_equal(delivery_suspend(f->d, "b.test", true), 0);
        break;
    case WAKE_CAP:
        break; /* one of the site's two left: at b.test's cap */
    case WAKE_RATE:
        /* its one connection of the hour: taken (and its lease given back) */
        assert_true(limits_conn_acquire(f->d->lim, &b->lim, f->w.now, &retry));
        limits_conn_release(f->d->lim, &b->lim);
        assert_false(limits_conn_acquire(f->d->lim, &b->lim, f->w.now, &retry));
        break;
    }

    /* One of a.test's connections ends after its transaction: room for one. */
    struct conn *x = f->open[0];
    enum sched_next what;
    conn_ready(x, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_ptr_equal(x->dest, dest_get(f->d, "a.test"));
    assert_false(txn_done(x, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_gone(x, NULL);

    /* Nothing opened for b.test ... */
    assert_int_equal(b->conns, 0);
    assert_int_equal(b->opening, 0);
    for (unsigned i = 0; i < f->nopen; i++)
        assert_ptr_not_equal(f->open[i]->dest, b);
    assert_int_equal(dest_queued(b), 1); /* its mail waits, untold */
    assert_int_equal(f->failed, 0);
    /* ... and c.test, behind it, took the room at once. */
    assert_int_equal(c->conns, 1);
    assert_int_equal(f->opened, 3);
    assert_string_equal(f->opened_to[2], "mx1.hoster.test 192.0.2.1:25");
    assert_int_equal(site->conns, 2);
    assert_false(c->want.on);
    if (how == WAKE_CAP) /* passed over where it waits, not run: first in line still */
        assert_ptr_equal(site->want.oldest, &b->want);
    fx_free(f);
}

static void
site_wake_goes_past_a_held_domain(void **state)
{
    (void)state;
    wake_past_a_blocked_domain(WAKE_HELD);
}

static void
site_wake_goes_past_a_suspended_domain(void **state)
{
    (void)state;
    wake_past_a_blocked_domain(WAKE_SUSPENDED);
}

static void
site_wake_goes_past_a_domain_out_of_connection_tokens(void **state)
{
    (void)state;
    wake_past_a_blocked_domain(WAKE_RATE);
}

/* Before the wake went on past a domain stopped by its own cap, c.test
 * waited until a.test's last connection ended. */
static void
site_wake_goes_past_a_domain_at_its_own_cap(void **state)
{
    (void)state;
    wake_past_a_blocked_domain(WAKE_CAP);
}

/* An address that refused a connect is passed over by the site's other
 * domains while it is fresh news: a new domain of the same hosts goes to
 * the backup MX at once instead of meeting the same refusal (or a whole
 * connect_timeout) first; once a connection to it works again, it is
 * tried in its turn. */
static void deliver_one_and_close(struct conn *c);

static void
site_passes_over_an_address_that_refused(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n"
                          "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    struct smtp_outcome refused = refused_outcome();
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    struct conn *c = f->open[0];
    assert_string_equal(f->opened_to[0], "mx1.hoster.test 192.0.2.1:25");
    sched_conn_event(c, POLICY_CONNECT_FAILED, &refused);
    conn_gone(c, NULL);
    assert_string_equal(f->opened_to[1], "mx2.hoster.test 192.0.2.2:25");
    deliver_one_and_close(f->open[0]);
    /* another domain of the same hosts: the backup first */
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_int_equal(f->opened, 3);
    assert_string_equal(f->opened_to[2], "mx2.hoster.test 192.0.2.2:25");
    deliver_one_and_close(f->open[0]);
    /* the news gets old: mx1 is tried in its turn again */
    f->w.now += MS_TO_NS(31000);
    submit("c.test", 1);
    answer("c.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_int_equal(f->opened, 4);
    assert_string_equal(f->opened_to[3], "mx1.hoster.test 192.0.2.1:25");
    fx_free(f);
}

/* A STARTTLS handshake that failed under opportunistic TLS (its address
 * goes in plaintext now: connection.c): the jobs that wait get a new
 * connection to the same address at once, not a failover and not a
 * deferral; once per job and attempt: another failed handshake (the
 * fallback forgotten meanwhile) is a failed address, which defers them
 * here; new jobs have their own retry. */
static void
tls_failure_retried_in_plaintext_at_once(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n"
                          "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    for (unsigned i = 0; i < 3; i++)
        submit("tls.test", 1);
    answer("tls.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct smtp_outcome hs;
    memset(&hs, 0, sizeof(hs));
    hs.status = SMTP_STATUS_TEMPFAIL;
    hs.scope = SMTP_SCOPE_SESSION;
    hs.reason = SMTP_REASON_TLS_FAILED;
    snprintf(hs.text, sizeof(hs.text), "TLS handshake failed");
    struct conn *c = f->open[0];
    c->connected = true;
    c->tls_fell_back = true;
    conn_gone(c, &hs);
    assert_int_equal(f->opened, 2);
    assert_string_equal(f->opened_to[1], "mx1.hoster.test 192.0.2.1:25");
    assert_int_equal(f->failed, 0);
    struct dest *t = dest_get(f->d, "tls.test");
    assert_int_equal(t->failed_addrs, 0);
    assert_true(t->hold_until <= f->w.now);
    /* The retry's handshake fails too: no second retry; the only address
     * has failed, what waits is deferred with the reason. */
    c = f->open[0];
    c->connected = true;
    c->tls_fell_back = true;
    conn_gone(c, &hs);
    assert_int_equal(f->opened, 2);
    assert_int_equal(f->failed, 3);
    assert_int_equal(f->last_src, CLASSIFY_CONNECT);
    assert_string_equal(f->last_fail.text, "TLS handshake failed");
    fx_free(f);
}

/* A job of a tls_relaxed message (a TLS report) of domain to its own
 * destination; its answer: one MX host at 192.0.2.1 whose DANE status
 * is dane. Returns the destination. */
static struct dest *
relaxed_job(const char *domain, bool relaxed, enum dns_dane dane)
{
    struct job *j = job_new(domain, 1);
    assert_non_null(j);
    j->id = next_id++;
    j->n = 1;
    j->expire_ms = UINT64_MAX; /* known, and never: no spool to read it from */
    j->owner.tls_relaxed = relaxed;
    struct dest *t = dest_of_job(F->d, j);
    assert_non_null(t);
    dest_enqueue(t, j);
    struct result_host rh = {.name = MX1[0], .preference = 10, .n4 = 1, .a4 = &A1[0],
                             .dane = dane};
    struct dns_mx_result *r = result_new(DNS_OK, NULL, domain, &rh, 1, false);
    assert_non_null(r);
    r->expires = UINT64_MAX;
    assert_non_null(t->req);
    dest_on_mx(t, r);
    return t;
}

/* RFC 8460 3: TLS reports are delivered despite TLS failures. Their
 * messages (tls_relaxed) have a destination of their own beside the
 * domain's: opportunistic TLS where the domain requires it, and DANE
 * neither enforced (a host with TLSA records) nor a reason to skip a host
 * (a failed TLSA lookup), while the domain's own mail keeps all three. */
static void
tls_relaxed_destination(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\n"
                          "[domain r.test]\ntls = required\n");
    struct dest *t = relaxed_job("r.test", false, DNS_DANE_SECURE);
    struct dest *x = relaxed_job("r.test", true, DNS_DANE_SECURE);
    assert_ptr_not_equal(t, x);
    assert_ptr_equal(x, dest_get_for(f->d, "r.test", 0, true));
    assert_ptr_equal(t, dest_get(f->d, "r.test"));
    assert_int_equal(dest_tls(t), DOMAIN_TLS_REQUIRED);
    assert_int_equal(dest_tls(x), DOMAIN_TLS_OPTIONAL);
    assert_string_equal(dest_tls_policy_str(x, dest_tls(x)), "relaxed");
    assert_int_equal(f->opened, 2);
    assert_int_equal(f->open[0]->tls_pol, -1); /* DANE */
    assert_int_equal(f->open[1]->tls_pol, DOMAIN_TLS_OPTIONAL);
    /* The TLSA lookup failed: the host is not used for the domain's mail
     * (deferred), it is for a report. */
    relaxed_job("tempfail.test", false, DNS_DANE_TEMPFAIL);
    assert_int_equal(f->opened, 2);
    assert_int_equal(f->failed, 1);
    relaxed_job("tempfail.test", true, DNS_DANE_TEMPFAIL);
    assert_int_equal(f->opened, 3);
    assert_int_equal(f->failed, 1);
    fx_free(f);
}

/* A recipient read back from the spool (a due take; the walk of an
 * operator's bounce in engine/ops_queue.c) keeps its message's tls_relaxed: its
 * job reaches the destination where the report's job waits, which is
 * where bounce_now() looks for it in flight and in the queue (else the
 * recipient was bounced and the waiting job delivered it after). */
static void
spool_owner_keeps_tls_relaxed(void **state)
{
    (void)state;
    struct fx *f = fx_new("");
    struct dest *x = relaxed_job("r.test", true, DNS_DANE_NONE);
    struct queue_owner qo = {"", "", "", 0, true};
    struct job *j = job_new("r.test", 1);
    assert_non_null(j);
    delivery_owner_of(&f->e, &qo, &j->owner);
    assert_true(j->owner.tls_relaxed);
    assert_ptr_equal(dest_of_job(f->d, j), x);
    qo.tls_relaxed = false;
    delivery_owner_of(&f->e, &qo, &j->owner);
    assert_false(j->owner.tls_relaxed);
    assert_ptr_not_equal(dest_of_job(f->d, j), x);
    free(j);
    fx_free(f);
}

/* MX rollup under a message rate: a domain whose rate gives its
 * connection no token now lends it to another domain of the site that
 * waits for one, as a domain with nothing queued does. Before the fix the
 * connection went idle and the other domain, on the site's want list with
 * the window full, heard of it from nobody: it waited for as long as the
 * first domain's rate-bound backlog lasted (hours for a campaign to one
 * large provider, its Workspace domains behind it), however idle the
 * connection sat between tokens. */
static void
rate_bound_domain_lends_its_connection(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 1\n"
                          "[domain one.test]\nmax_message_rate = 1/h\n");
    for (int i = 0; i < 3; i++)
        submit("one.test", 1);
    answer("one.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    struct dest *one = dest_get(f->d, "one.test");
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB); /* one's token of the hour */
    submit("two.test", 1);
    answer("two.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *two = dest_get(f->d, "two.test");
    assert_ptr_equal(one->site, two->site);
    assert_true(two->want.on); /* the window (1) is full: two waits */
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    /* one has mail but no token for an hour: c carries two's meanwhile */
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_ptr_equal(c->dest, two);
    assert_int_equal(dest_queued(one), 2);
    fx_free(f);
}

/* MX rollup: two domains on the same MX hosts share one site; an idle
 * connection of the site takes the next transaction of the other domain. */
static void
idle_connection_takes_other_domain(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 10\n");
    submit("one.test", 1);
    answer("one.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    submit("two.test", 1);
    submit("two.test", 1);
    answer("two.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *one = dest_get(f->d, "one.test"), *two = dest_get(f->d, "two.test");
    assert_ptr_equal(one->site, two->site);
    assert_int_equal(f->opened, 1); /* the site's window is full: two waits */
    assert_true(two->want.on);

    enum sched_next what;
    f->w.now += MS_TO_NS(1); /* c opens in 1 ms */
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_ptr_equal(c->dest, one);
    f->w.now += MS_TO_NS(110);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    /* No job has waited yet for a connection: no second one. */
    assert_int_equal(f->opened, 1);
    /* Nothing left for one: c moves to two, lease and all. */
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_ptr_equal(c->dest, two);
    assert_int_equal(one->conns, 0);
    assert_int_equal(two->conns, 1);
    /* two's job waited 111 ms, over twice the 1 ms a connection takes to
     * open and SITE_WAIT_MIN_NS: the window grows to 2 and two opens its
     * own. */
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    assert_int_equal(f->opened, 2);
    assert_int_equal(two->conns, 2);
    /* two's other job is the new connection's: c goes idle on the site. */
    struct conn *c2 = f->open[1];
    conn_ready(c2, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    assert_ptr_equal(c->site->idle, c);
    /* New mail for one: the idle connection is handed over, none opened. */
    unsigned before = f->opened;
    submit("one.test", 1);
    assert_int_equal(f->resumed, 1);
    assert_ptr_equal(c->dest, one);
    assert_non_null(c->job);
    assert_int_equal(f->opened, before);
    fx_free(f);
}

/* An idle connection whose session ended (our idle timeout's QUIT, or the
 * server's 421 or close) stays on its site's idle list until its last ops
 * complete: mail that comes meanwhile is not handed to it (its closed
 * machine would refuse the transaction), and goes on a new connection
 * once the ending one is gone. */
static void
ending_idle_connection_is_not_handed_a_job(void **state)
{
    (void)state;
    struct fx *f =
        fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 10\n");
    submit("one.test", 1);
    answer("one.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    assert_ptr_equal(c->site->idle, c);
    /* The session ends (EV_CLOSE: QUIT or close_notify on their way). */
    c->want_close = true;
    submit("one.test", 1);
    assert_int_equal(f->resumed, 0);
    assert_null(c->job);
    assert_null(c->site->idle);
    assert_int_equal(f->opened, 1); /* the site's one slot is c's until it is gone */
    struct smtp_outcome quit;
    memset(&quit, 0, sizeof(quit));
    quit.reason = SMTP_REASON_QUIT;
    quit.scope = SMTP_SCOPE_SESSION;
    quit.stage = SMTP_CLIENT_S_IDLE;
    conn_gone(c, &quit);
    assert_int_equal(f->opened, 2); /* the job waiting goes on a new connection */
    fx_free(f);
}

/* A backlog grows the window without waiting: more than
 * SITE_BACKLOG_PER_CONN jobs per connection behind the one taken. */
static void
window_grows_for_a_backlog(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    for (unsigned i = 0; i < SITE_BACKLOG_PER_CONN + 1; i++)
        submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what); /* SITE_BACKLOG_PER_CONN behind it: not more */
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    assert_int_equal(allowed("a.test"), 1);
    submit("a.test", 1);
    submit("a.test", 1);
    conn_ready(c, &what); /* 5 behind it, a millisecond old */
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    assert_int_equal(allowed("a.test"), 2);
    assert_int_equal(f->opened, 2);
    fx_free(f);
}

/* A site's window is full of an idle connection the next domain may not
 * ride (opened under another TLS policy): it says goodbye, and the domain
 * opens its own in its slot rather than wait out the idle time. */
static void
idle_connection_of_another_policy_yields(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 10\n"
                          "[domain strict.test]\ntls = verify\n");
    submit("plain.test", 1);
    answer("plain.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    submit("strict.test", 1);
    answer("strict.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *strict = dest_get(f->d, "strict.test");
    assert_ptr_equal(strict->site, c->site);
    assert_int_equal(f->resumed, 0); /* not handed the opportunistic one */
    assert_int_equal(f->quits, 1);
    assert_ptr_equal(f->quit, c);
    assert_null(c->site->idle);
    assert_int_equal(f->opened, 1);
    assert_true(strict->want.on);
    conn_gone(c, NULL); /* freed */
    assert_int_equal(f->opened, 2);
    assert_ptr_equal(f->open[0]->dest, strict);
    fx_free(f);
}

/* A domain waits for its site's only connection, which turns out to be
 * one it may not ride (opened under another TLS policy): when that one
 * is free, the domain leaves the list and still runs again by itself (it
 * has the connection said goodbye and opens its own). Before, it was
 * dropped from the list with nothing left to wake it: its mail waited
 * in memory until more came for it. */
static void
waiting_domain_refused_by_a_connection_runs_again(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 10\n"
                          "[domain strict.test]\ntls = verify\n");
    submit("plain.test", 1);
    answer("plain.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    submit("strict.test", 1);
    answer("strict.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *strict = dest_get(f->d, "strict.test");
    assert_true(strict->want.on);
    assert_int_equal(f->opened, 1);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    assert_false(strict->want.on);
    assert_int_equal(dest_queued(strict), 1);
    f->w.now += MS_TO_NS(1100);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->quits, 1); /* the one it may not ride says goodbye */
    assert_ptr_equal(f->quit, c);
    conn_gone(c, NULL);
    assert_int_equal(f->opened, 2);
    assert_ptr_equal(f->open[0]->dest, strict);
    fx_free(f);
}

/* The per-address cap holds whatever the window: new connections go to
 * the least busy address of the same preference, never to a backup MX
 * for want of room. */
static void
per_address_cap(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 8\nmax_connections_per_address = 2\n"
                          "[domain *]\nmax_connections = 20\n");
    for (unsigned i = 0; i < 8; i++)
        submit("cap.test", 1);
    /* mx1 preferred, mx2 a backup: only mx1's address, up to its cap. */
    answer("cap.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_int_equal(f->opened, 2);
    for (unsigned i = 0; i < f->opened; i++)
        assert_string_equal(f->opened_to[i], "mx1.hoster.test 192.0.2.1:25");
    /* Equal preferences: both addresses, two each. */
    for (unsigned i = 0; i < 8; i++)
        submit("even.test", 1);
    answer("even.test", DNS_OK, MX1 + 1, (unsigned[]){10, 10}, A1 + 1, 2);
    unsigned to2 = 0, to3 = 0;
    for (unsigned i = 2; i < f->opened; i++) {
        to2 += strcmp(f->opened_to[i], "mx2.hoster.test 192.0.2.2:25") == 0;
        to3 += strcmp(f->opened_to[i], "mx3.hoster.test 192.0.2.3:25") == 0;
    }
    assert_int_equal(to2, 2);
    assert_int_equal(to3, 2);
    assert_int_equal(f->opened, 6);
    fx_free(f);
}

/* Two sites share an address (mx1 is in both answers) whose cap is one
 * connection: the first site's connection, with nothing left for its own
 * domains, quits instead of idling on the slot the second site waits for
 * (before, it held it for idle_timeout); when only its own site found the
 * address full, it idles (reuse). */
static void
shared_address_slot_given_back(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    /* b's answer names mx1 first, mx2 as a backup: another site, and no
     * room at mx1 (never the backup for want of room). */
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_ptr_not_equal(dest_get(f->d, "a.test")->site, dest_get(f->d, "b.test")->site);
    assert_int_equal(f->opened, 1);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT);
    assert_null(c->site->idle);
    conn_gone(c, NULL);
    fx_free(f);

    /* Only its own site found the address full (two jobs, room for one
     * connection): once the site has nothing left, the connection idles,
     * for reuse. */
    f = fx_new("[delivery]\ninitial_connections = 4\nmax_connections_per_address = 1\n"
               "[domain *]\nmax_connections = 10\n");
    submit("a.test", 1);
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    c = f->open[0];
    conn_ready(c, &what);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    fx_free(f);
}

/* f counts its connections per address in shared, as worker id. */
static void
fx_share(struct fx *f, struct site_addrs *shared, unsigned id)
{
    f->w.id = id;
    sites_addrs_fini(&f->d->sites);
    assert_int_equal(sites_addrs_init(&f->d->sites, shared, id), 0);
}

/* The per-address cap is the node's: one worker may hold all of it
 * (before, each of two held half: a site gathered on one got 1 of 2).
 * When a domain on another worker finds no room there, the first
 * worker's connections past its floor (its old share, 1 of 2) give
 * their slots back instead of taking another transaction, the slot is
 * kept for the other worker, which opens once it tries again. */
static void
per_address_cap_across_workers(void **state)
{
    (void)state;
    struct site_addrs *shared = site_addrs_new(2); /* two workers: a floor of 1 each */
    assert_non_null(shared);
    const char *conf = "[delivery]\ninitial_connections = 8\nmax_connections_per_address = 2\n"
                       "[domain *]\nmax_connections = 20\n";
    struct fx *b = fx_new(conf);
    fx_share(b, shared, 1);
    struct fx *a = fx_new(conf); /* F: worker 0 */
    fx_share(a, shared, 0);
    submit("a.test", 1);
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(a->opened, 2); /* the whole cap */
    F = b;
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(b->opened, 0); /* no room: worker 0 holds it */
    struct dest *tb = dest_get(b->d, "b.test");
    assert_true(timer_armed(&tb->lim_timer));
    F = a;
    enum sched_next what;
    struct conn *c = a->open[0];
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT); /* 2 here, its floor 1, worker 1 wants */
    conn_gone(c, NULL);
    assert_int_equal(a->opened, 2); /* the slot is kept for worker 1 */
    c = a->open[0];
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB); /* at its floor: carries on */
    F = b;
    b->w.now += MS_TO_NS(HOLD_MIN_MS);
    timer_run(&b->w.timers, b->w.now, NULL);
    assert_int_equal(b->opened, 1);
    assert_string_equal(b->opened_to[0], "mx1.hoster.test 192.0.2.1:25");
    assert_int_equal(site_addrs_count(shared), 1);
    fx_free(b);
    F = a;
    fx_free(a);
    assert_int_equal(site_addrs_count(shared), 0); /* every slot given back */

    /* Busy, not idle: worker 0 has a backlog on both its connections.
     * Worker 1's want makes the one past worker 0's share (1 of 2) give
     * its slot back after its transaction, and that slot is not taken
     * again by worker 0's own domain: it goes to worker 1 (before, worker
     * 1 waited for worker 0's whole backlog). */
    b = fx_new(conf); /* (one worker as far as its affinity knows: b.test stays) */
    fx_share(b, shared, 1);
    a = fx_new(conf);
    fx_share(a, shared, 0);
    for (unsigned i = 0; i < 40; i++)
        submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(a->opened, 2);
    conn_ready(a->open[0], &what);
    conn_ready(a->open[1], &what);
    F = b;
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(b->opened, 0);
    F = a;
    c = a->open[0];
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT); /* 2 here, its floor 1: it yields */
    conn_gone(c, NULL);
    assert_int_equal(a->opened, 2); /* the freed slot is kept for worker 1 */
    F = b;
    b->w.now += MS_TO_NS(HOLD_MIN_MS);
    timer_run(&b->w.timers, b->w.now, NULL);
    assert_int_equal(b->opened, 1);
    /* worker 0's other connection, at its share, carries on */
    F = a;
    c = a->open[0];
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    F = b;
    fx_free(b);
    F = a;
    fx_free(a);
    assert_int_equal(site_addrs_count(shared), 0);
    site_addrs_free(shared);
}

/* DNS answers and targets decide as the policy says: NXDOMAIN and null
 * MX bounce, a failed lookup defers and is asked again, loopback is no
 * target unless allowed. */
static void
answers_that_fail(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 2\n");
    submit("nx.test", 3);
    answer("nx.test", DNS_NOT_FOUND, NULL, NULL, NULL, 0);
    assert_int_equal(f->failed, 3);
    assert_int_equal(f->last_fail.status, SMTP_STATUS_PERMFAIL);
    assert_int_equal(f->last_fail.code, 550);
    assert_int_equal(f->last_fail.enh.subject, 1);
    assert_int_equal(f->last_fail.enh.detail, 2);
    assert_int_equal(f->last_src, CLASSIFY_DNS);

    submit("null.test", 1);
    answer("null.test", DNS_NULL_MX, NULL, NULL, NULL, 0);
    assert_int_equal(f->last_fail.code, 556);
    assert_string_equal(f->last_fail.text, "domain accepts no mail (null MX, RFC 7505)");

    submit("servfail.test", 1);
    answer("servfail.test", DNS_RETRY, NULL, NULL, NULL, 0);
    assert_int_equal(f->last_fail.status, SMTP_STATUS_TEMPFAIL);
    assert_int_equal(f->last_fail.code, 451);
    unsigned asked = f->resolves;
    submit("servfail.test", 1);
    assert_int_equal(f->resolves, asked + 1); /* the answer was forgotten */

    static const uint8_t lo[][16] = {{127, 0, 0, 1}};
    submit("loop.test", 2);
    answer("loop.test", DNS_OK, MX1, (unsigned[]){10}, lo, 1);
    assert_int_equal(f->opened, 0);
    assert_int_equal(f->last_fail.status, SMTP_STATUS_PERMFAIL);
    assert_int_equal(f->last_fail.enh.detail, 4);
    assert_int_equal(f->last_src, CLASSIFY_TARGET);
    assert_non_null(strstr(f->last_fail.text, "allow_networks"));
    /* The next mail to it, the answer still good, says why too (before
     * the fix its bounce had an empty reply: the reason was worked out
     * once per answer and forgotten with the first bounce). */
    memset(&f->last_fail, 0, sizeof(f->last_fail));
    unsigned looked = f->resolves;
    submit("loop.test", 1);
    assert_int_equal(f->resolves, looked); /* the same answer */
    assert_int_equal(f->last_fail.status, SMTP_STATUS_PERMFAIL);
    assert_non_null(strstr(f->last_fail.text, "allow_networks"));

    /* The same loopback host in an answer that misses the other MX hosts
     * (their address lookups failed for now: partial): those may be
     * targets on the next try, so the mail is deferred, not bounced, and
     * the answer is asked again. */
    submit("partial.test", 2);
    {
        struct result_host rh = {.name = MX1[1], .preference = 20, .n4 = 1, .a4 = lo};
        struct dns_mx_result *r = result_new(DNS_OK, NULL, "partial.test", &rh, 1, false);
        assert_non_null(r);
        r->partial = true;
        r->expires = UINT64_MAX;
        struct dest *t = dest_get(F->d, "partial.test");
        assert_non_null(t->req);
        dest_on_mx(t, r);
    }
    assert_int_equal(f->opened, 0);
    assert_int_equal(f->last_fail.status, SMTP_STATUS_TEMPFAIL);
    assert_int_equal(f->last_fail.enh.cls, 4);
    asked = f->resolves;
    submit("partial.test", 1);
    assert_int_equal(f->resolves, asked + 1); /* the answer was forgotten */

    /* This node's own listener (127.0.0.1:2587 here) is a loop, even
     * when loopback is allowed. */
    fx_free(f);
    f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\nremote_port = 2587\n");
    submit("self.test", 1);
    answer("self.test", DNS_OK, MX1, (unsigned[]){10}, lo, 1);
    assert_int_equal(f->opened, 0);
    assert_int_equal(f->last_fail.enh.detail, 6);
    /* ... and so is that listener's address in an AAAA record, v4-mapped
     * (::ffff:127.0.0.1): a connect there reaches 127.0.0.1. */
    static const uint8_t lo_mapped[][16] = {{[10] = 0xff, [11] = 0xff, [12] = 127, [15] = 1}};
    submit("self6.test", 1);
    answer6("self6.test", MX1, lo_mapped, 1);
    assert_int_equal(f->opened, 0);
    assert_int_equal(f->last_fail.status, SMTP_STATUS_PERMFAIL);
    assert_int_equal(f->last_fail.enh.detail, 6);
    assert_non_null(strstr(f->last_fail.text, "loops back to myself"));
    fx_free(f);
}

/* This host's interface addresses as the test says they are now. */
static char fake_local[4][64];
static unsigned fake_nlocal, fake_reads;

static int
t_local_addrs(struct delivery *d, char (**out)[64], unsigned *n)
{
    (void)d;
    fake_reads++;
    *out = calloc(4, sizeof(**out));
    assert_non_null(*out);
    memcpy(*out, fake_local, sizeof(fake_local));
    *n = fake_nlocal;
    return 0;
}

static const struct outbound_ops test_ops_local = {
    .resolve = t_resolve,
    .cancel = t_cancel,
    .open = t_open,
    .resume = t_resume,
    .quit = t_quit,
    .fail = t_fail,
    .local_addrs = t_local_addrs,
};

/* A wildcard listener's loop check knows interface addresses added after
 * the start (DHCP, a new egress address): read again on a reload, and
 * when an address is not among them, at most every
 * TARGETS_LOCAL_REREAD_NS. */
static void
interface_addresses_read_again(void **state)
{
    (void)state;
    fx_listen = "127.0.0.1:2587, 0.0.0.0:2465"; /* a wildcard listener */
    struct fx *f = fx_new("[delivery]\nremote_port = 2465\n");
    fx_listen = "127.0.0.1:2587";
    f->d->ops = &test_ops_local;
    memset(fake_local, 0, sizeof(fake_local));
    snprintf(fake_local[0], sizeof(fake_local[0]), "10.0.0.1");
    fake_nlocal = 1;
    fake_reads = 0;
    targets_local_load(f->d);
    assert_int_equal(fake_reads, 1);

    /* 10.0.0.1 is a loop, 192.0.2.77 is not (yet) */
    static const uint8_t own[][16] = {{10, 0, 0, 1}};
    static const uint8_t added[][16] = {{192, 0, 2, 77}};
    static const uint8_t added2[][16] = {{192, 0, 2, 78}};
    submit("own.test", 1);
    answer("own.test", DNS_OK, MX1, (unsigned[]){10}, own, 1);
    assert_int_equal(f->opened, 0);
    assert_int_equal(f->last_fail.enh.detail, 6);
    submit("far.test", 1);
    answer("far.test", DNS_OK, MX1, (unsigned[]){10}, added, 1);
    assert_int_equal(f->opened, 1);
    assert_int_equal(fake_reads, 1); /* read moments ago: not again */

    /* 192.0.2.77 becomes this host's: once the interval has passed, the
     * first address not found has the list read again */
    snprintf(fake_local[1], sizeof(fake_local[1]), "192.0.2.77");
    fake_nlocal = 2;
    f->w.now += TARGETS_LOCAL_REREAD_NS;
    unsigned failed = f->failed;
    submit("late.test", 1);
    answer("late.test", DNS_OK, MX1, (unsigned[]){10}, added, 1);
    assert_int_equal(fake_reads, 2);
    assert_int_equal(f->opened, 1);
    assert_int_equal(f->failed, failed + 1);
    assert_int_equal(f->last_fail.enh.detail, 6);
    assert_non_null(strstr(f->last_fail.text, "loops back to myself"));
    /* ... and no more often than that */
    submit("far2.test", 1);
    answer("far2.test", DNS_OK, MX1 + 1, (unsigned[]){10}, (const uint8_t[][16]){{192, 0, 2, 99}}, 1);
    assert_int_equal(f->opened, 2);
    assert_int_equal(fake_reads, 2);

    /* A reload reads them at once */
    snprintf(fake_local[2], sizeof(fake_local[2]), "192.0.2.78");
    fake_nlocal = 3;
    delivery_reconfigure(f->d);
    assert_int_equal(fake_reads, 3);
    submit("reload.test", 1);
    answer("reload.test", DNS_OK, MX1, (unsigned[]){10}, added2, 1);
    assert_int_equal(f->opened, 2);
    /* reload.test's job, and far.test's (still waiting for its
     * connection to 192.0.2.77, now this host's): both loops */
    assert_int_equal(f->failed, failed + 3);
    assert_int_equal(f->last_fail.enh.detail, 6);
    assert_int_equal(dest_queued(dest_get(f->d, "far.test")), 0);
    fx_free(f);
}

/* A session failure before anything was delivered gives the job to the
 * next address (failover); a 421 shrinks the window and holds. */
static void
session_failures(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 10\n");
    submit("fo.test", 1);
    answer("fo.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    struct dest *t = c->dest;
    /* Reset after RCPT, before the dot: the job goes back, first. */
    assert_true(txn_done(c, SMTP_STATUS_TEMPFAIL, 0, SMTP_REASON_EOF, SMTP_SCOPE_SESSION));
    assert_int_equal(dest_queued(t), 1);
    struct fairq_iter it;
    fairq_iter_init(&t->q, &it);
    assert_int_equal(job_of(fairq_iter_next(&it))->failovers, 1);
    assert_int_equal(t->next_addr, 1);
    assert_int_equal(f->finished, 0);
    conn_gone(c, NULL);
    /* The next connection goes to the backup MX. */
    assert_string_equal(f->opened_to[f->opened - 1], "mx2.hoster.test 192.0.2.2:25");

    c = f->open[0];
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    /* A 421: reported (deferred), not failed over. */
    struct site *site = c->site;
    uint64_t failures = site->failures;
    assert_false(txn_done(c, SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY, SMTP_SCOPE_SESSION));
    assert_int_equal(f->finished, 1);
    struct smtp_outcome bye;
    memset(&bye, 0, sizeof(bye));
    bye.code = 421;
    bye.status = SMTP_STATUS_TEMPFAIL;
    snprintf(bye.text, sizeof(bye.text), "4.7.0 try later");
    c->connected = true;
    conn_gone(c, &bye);
    assert_true(t->hold_until > f->w.now);
    /* the 421 and the end it brought are one failure of one connection */
    assert_int_equal(t->site, site);
    assert_int_equal(site->failures, failures + 1);
    fx_free(f);
}

/* A 421 that crosses the first MAIL on a reused connection (the
 * receiver's idle timeout): the job goes back first in line and a new
 * connection takes it at once; nothing is reported (no deferral), the
 * destination is not held, the window does not come down, the failover
 * cursor does not move. The same on the fresh connection is a normal
 * failure: reported, and the destination held. */
static void
reuse_lost_goes_to_a_new_connection(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 1\n");
    submit("ru.test", 1);
    answer("ru.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    struct dest *t = c->dest;
    enum sched_next what;
    conn_ready(c, &what);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE); /* nothing more for now: it idles */
    submit("ru.test", 1);                     /* later mail: handed to it */
    assert_non_null(c->job);
    uint64_t id = c->job->id;
    unsigned window = allowed("ru.test"), failures = c->site->failures;
    assert_true(txn_done_at(c, SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY, SMTP_SCOPE_SESSION,
                            SMTP_CLIENT_S_MAIL));
    assert_int_equal(f->finished, 1); /* the first job only: nothing deferred */
    assert_int_equal(dest_queued(t), 1);
    struct fairq_iter it;
    fairq_iter_init(&t->q, &it);
    struct job *j = job_of(fairq_iter_next(&it));
    assert_int_equal(j->id, id);
    assert_int_equal(j->reuse_lost, 1);
    assert_int_equal(j->failovers, 0);
    assert_int_equal(t->next_addr, 0);
    assert_int_equal(allowed("ru.test"), window);
    assert_int_equal(c->site->failures, failures);
    struct smtp_outcome bye;
    memset(&bye, 0, sizeof(bye));
    bye.code = 421;
    bye.status = SMTP_STATUS_TEMPFAIL;
    bye.reason = SMTP_REASON_REPLY;
    bye.scope = SMTP_SCOPE_SESSION;
    bye.stage = SMTP_CLIENT_S_MAIL;
    snprintf(bye.text, sizeof(bye.text), "4.4.2 mx1 Error: timeout exceeded");
    c->connected = true;
    conn_gone(c, &bye);
    assert_true(t->hold_until <= f->w.now); /* not held */
    assert_int_equal(f->opened, 2);         /* a new connection at once, same address */
    assert_string_equal(f->opened_to[1], "mx1.hoster.test 192.0.2.1:25");
    assert_int_equal(allowed("ru.test"), window);

    /* The fresh connection meets the same: a normal failure now. */
    c = f->open[0];
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_int_equal(c->job->id, id);
    assert_false(txn_done_at(c, SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY, SMTP_SCOPE_SESSION,
                             SMTP_CLIENT_S_MAIL));
    assert_int_equal(f->finished, 2);
    c->connected = true;
    conn_gone(c, &bye);
    assert_true(t->hold_until > f->w.now);
    fx_free(f);
}

/* A 421 to the MAIL of a connection reused straight after a
 * transaction, without idling, is no idle close: the receiver pushes
 * back under load ("421 ... [TSS04]"). Reported, and the destination
 * held, as on a fresh connection. */
static void
reuse_421_without_idle_is_pushback(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 1\n");
    submit("rp.test", 1);
    submit("rp.test", 1);
    answer("rp.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    struct conn *c = f->open[0];
    struct dest *t = c->dest;
    enum sched_next what;
    conn_ready(c, &what);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB); /* straight to the next job */
    assert_false(txn_done_at(c, SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY, SMTP_SCOPE_SESSION,
                             SMTP_CLIENT_S_MAIL));
    assert_int_equal(f->finished, 2); /* reported */
    struct smtp_outcome bye;
    memset(&bye, 0, sizeof(bye));
    bye.code = 421;
    bye.status = SMTP_STATUS_TEMPFAIL;
    bye.reason = SMTP_REASON_REPLY;
    bye.scope = SMTP_SCOPE_SESSION;
    bye.stage = SMTP_CLIENT_S_MAIL;
    snprintf(bye.text, sizeof(bye.text), "4.7.0 [TSS04] Messages temporarily deferred");
    c->connected = true;
    conn_gone(c, &bye);
    assert_true(t->hold_until > f->w.now);
    assert_true(t->lim.bo_factor < 1024); /* throttled: its rates halve */
    fx_free(f);

    /* A 421 that says the receiver is going down (class other): held the
     * same, its rates left whole (before, halved as for throttling). */
    f = fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 1\n");
    submit("rd.test", 1);
    submit("rd.test", 1);
    answer("rd.test", DNS_OK, MX1, (unsigned[]){10, 20}, A1, 2);
    c = f->open[0];
    t = c->dest;
    conn_ready(c, &what);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_false(txn_done_at(c, SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY, SMTP_SCOPE_SESSION,
                             SMTP_CLIENT_S_MAIL));
    bye.enh = (struct smtp_enh){4, 3, 2};
    snprintf(bye.text, sizeof(bye.text), "4.3.2 Service shutting down, closing channel");
    c->connected = true;
    conn_gone(c, &bye);
    assert_true(t->hold_until > f->w.now);
    assert_int_equal(t->lim.bo_factor, 1024);
    fx_free(f);
}

/* A connection that sat idle before its first transaction is reused
 * too: a reset at its first command (RSET or MAIL) sends the job to
 * another connection, unreported. */
static void
reuse_lost_after_idle(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 2\n[domain *]\nmax_connections = 2\n");
    submit("ri.test", 1);
    submit("ri.test", 1);
    answer("ri.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 2);
    struct conn *c0 = f->open[0], *c1 = f->open[1];
    struct dest *t = c0->dest;
    enum sched_next what;
    conn_ready(c0, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c0, &what); /* takes the second job: c1 finds nothing */
    assert_int_equal(what, SCHED_NEXT_JOB);
    conn_ready(c1, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    assert_int_equal(c1->nmsgs, 0);
    unsigned resumed = f->resumed;
    submit("ri.test", 1); /* handed to the idle connection */
    assert_int_equal(f->resumed, resumed + 1);
    assert_non_null(c1->job);
    unsigned finished = f->finished;
    assert_true(txn_done_at(c1, SMTP_STATUS_TEMPFAIL, 0, SMTP_REASON_EOF, SMTP_SCOPE_SESSION,
                            SMTP_CLIENT_S_MAIL));
    assert_int_equal(f->finished, finished);
    assert_int_equal(dest_queued(t), 1);
    fx_free(f);
}

/* The body buffers a worker keeps for the next burst of connections:
 * a sweep gives back those nobody took since the one before (the fewest
 * the pool held free in between), so a burst's buffers stay while bursts
 * come and are gone two sweeps after they stop. */
static void
idle_buffers_given_back(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ndestination_idle_ttl = 1s\n");
    sched_start(f->d);
    struct pool *p = &f->d->chunk_pool;
    p->size = 4096; /* (delivery_new's; the fixture makes its own) */
    void *b[8];
    for (unsigned i = 0; i < 8; i++)
        assert_non_null(b[i] = conn_pool_get(p));
    for (unsigned i = 0; i < 8; i++)
        conn_pool_put(p, b[i]);
    assert_int_equal(p->nfree, 8);
    f->w.now += MS_TO_NS(5001); /* a sweep: all 8 were out since the start */
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(p->nfree, 8);
    for (unsigned i = 0; i < 3; i++) /* a burst of 3 */
        b[i] = conn_pool_get(p);
    for (unsigned i = 0; i < 3; i++)
        conn_pool_put(p, b[i]);
    f->w.now += MS_TO_NS(5001);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(p->nfree, 3);
    f->w.now += MS_TO_NS(5001); /* nobody since */
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(p->nfree, 0);
    assert_int_equal(p->out, 0);
    fx_free(f);
}

/* Memory follows the destinations in use: one idle for
 * destination_idle_ttl goes (with its site, at its last reference); one
 * with mail waiting stays. */
static void
idle_destinations_evicted(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\ndestination_idle_ttl = 1s\n");
    sched_start(f->d);
    submit("gone.test", 1);
    answer("gone.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    conn_gone(c, NULL); /* the idle time ran out */
    submit("stays.test", 1); /* asks DNS, never answered: busy */
    assert_int_equal(hash_count(&f->d->dests), 2);
    assert_int_equal(f->d->sites.live, 1);
    f->w.now += MS_TO_NS(7000); /* past the ttl and a sweep */
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->d->evicted, 1);
    assert_int_equal(hash_count(&f->d->dests), 1);
    assert_int_equal(f->d->sites.live, 0);
    assert_false(fairq_empty(&dest_get(f->d, "stays.test")->q));
    fx_free(f);
}

/* MTA-STS (engine/mta_sts.h): a domain never seen has its TXT record asked
 * on the worker, beside its MX lookup, and its mail waits for the answer;
 * no record lets it go at once, without the store's thread; a record
 * hands the check to the thread (the policy fetch), and the mail waits. */
static void
first_mta_sts_check_on_the_worker(void **state)
{
    (void)state;
    /* The store's own resolver asks a socket that never answers: its
     * fetch of b.test's policy cannot end before the test does. */
    int mute = socket(AF_INET, SOCK_DGRAM, 0);
    assert_true(mute >= 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(mute, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(mute, (struct sockaddr *)&sin, &sl), 0);
    char conf[256];
    snprintf(conf, sizeof(conf),
             "[delivery]\ninitial_connections = 1\n"
             "[dns]\nservers = 127.0.0.1:%u\ntimeout = 60s\ntries = 1\n"
             "[mta_sts]\ntlsrpt = no\nfetch_timeout = 60s\n",
             ntohs(sin.sin_port));
    struct fx *f = fx_new(conf);
    char dir[] = "/tmp/sluice-sched-sts-XXXXXX", cache[64], err[256];
    assert_non_null(mkdtemp(dir));
    snprintf(cache, sizeof(cache), "%s/mta-sts.cache", dir);
    struct mta_sts *m = NULL;
    assert_int_equal(mta_sts_new(f->cfg, cache, &m, err, sizeof(err)), 0);
    f->e.mta_sts = m;
    f->d->ops = &test_ops_txt;
    sched_start(f->d);

    submit("a.test", 1);
    assert_int_equal(f->resolves, 1);
    assert_int_equal(f->txts, 1);
    assert_string_equal(f->txt_name, "_mta-sts.a.test");
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 0); /* its policy is not known yet */
    struct dest *t = dest_get(f->d, "a.test");
    assert_non_null(t->sts_ask);
    assert_int_equal(f->d->nsts_asks, 1);
    f->txt_cb(f->txt_arg, DNS_NOT_FOUND, "no TXT record", NULL, 0, 300);
    assert_int_equal(f->d->nsts_asks, 0);
    assert_null(t->sts_ask);
    assert_int_equal(f->opened, 1); /* no policy: on its way */
    assert_null(t->sts);
    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    assert_non_null(c->job);

    submit("b.test", 1);
    assert_int_equal(f->txts, 2);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    const char *rec[] = {"v=STSv1; id=20261202"};
    f->txt_cb(f->txt_arg, DNS_OK, "ok", rec, 1, 300);
    /* A record: the thread fetches the policy; the mail waits for it
     * (the connection open for a.test does not take it). */
    struct mta_sts_policy *p = NULL;
    assert_int_equal(mta_sts_get(m, "b.test", true, &p), MTA_STS_WAIT);
    assert_int_equal(f->txts, 2); /* asked once */
    struct mta_sts_stats st;
    mta_sts_stats(m, &st);
    assert_int_equal(st.checks, 2);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_null(c->job);
    assert_int_equal(f->opened, 1);
    assert_false(fairq_empty(&dest_get(f->d, "b.test")->q));

    /* An answer for a domain nobody asked is dropped; one asked but never
     * answered is freed with the destinations. */
    mta_sts_txt_answer(m, "c.test", DNS_NOT_FOUND, "NXDOMAIN", NULL, 0, 300);
    assert_int_equal(mta_sts_get(m, "c.test", true, &p), MTA_STS_ASK);
    submit("d.test", 1);
    assert_int_equal(f->txts, 3);
    /* The store's thread reads the config fx_free() frees: it stops
     * first (the destinations left hold policies by reference only). */
    mta_sts_free(m);
    f->e.mta_sts = NULL;
    fx_free(f);
    close(mute);
    unlink(cache);
    rmdir(dir);
}

/* ---- pools and sources ---- */

static const char POOLS[] =
    "[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 8\n"
    "[domain *]\nmax_connections = 40\n"
    "[source 198.51.100.2]\nehlo = a.out.test\n"
    "[source 198.51.100.3]\nehlo = b.out.test\n"
    "[source 198.51.100.4]\nehlo = c.out.test\n"
    "[pool bulk]\nsources = 198.51.100.2:3, 198.51.100.3:1\n"
    "[pool tx]\nsources = 198.51.100.4\n";

/* An AAAA record of a v4-mapped address (::ffff:192.0.2.1) names the
 * IPv4 host: a pool whose sources are IPv4 sends there, from one of
 * them, to the IPv4 address (counted, keyed and logged so). */
static void
pool_sends_to_a_v4_mapped_address_over_ipv4(void **state)
{
    (void)state;
    struct fx *f = fx_new(POOLS);
    submit_pool("mapped.test", 1, "tx");
    static const uint8_t mapped[][16] = {{[10] = 0xff, [11] = 0xff, [12] = 192, [13] = 0,
                                          [14] = 2, [15] = 1}};
    struct result_host rh = {.name = MX1[0], .preference = 10, .n6 = 1, .a6 = mapped};
    struct dns_mx_result *r = result_new(DNS_OK, NULL, "mapped.test", &rh, 1, false);
    assert_non_null(r);
    r->expires = UINT64_MAX;
    struct dest *t = dest_get_pool(F->d, "mapped.test", intern_id(F->e.names, "tx"));
    assert_non_null(t->req);
    dest_on_mx(t, r);
    assert_int_equal(f->opened, 1);
    assert_int_equal(f->failed, 0);
    assert_string_equal(f->opened_to[0], "mx1.hoster.test 192.0.2.1:25 from 198.51.100.4");
    assert_int_equal(f->open[0]->addr.sa.sa_family, AF_INET);
    fx_free(f);
}

/* Connections opened from each source, from opened_to[0..n). */
static void
count_sources(unsigned n, unsigned *a, unsigned *b, unsigned *c)
{
    *a = *b = *c = 0;
    for (unsigned i = 0; i < n; i++) {
        *a += strstr(F->opened_to[i], "from 198.51.100.2") != NULL;
        *b += strstr(F->opened_to[i], "from 198.51.100.3") != NULL;
        *c += strstr(F->opened_to[i], "from 198.51.100.4") != NULL;
    }
}

/* A destination is (domain, pool): each pool's mail opens connections
 * from its own sources only, on sites of its own; without a pool, the
 * default source. Within a pool, connections follow the weights. */
static void
pools_keep_apart(void **state)
{
    (void)state;
    struct fx *f = fx_new(POOLS);
    for (int i = 0; i < 8; i++)
        submit_pool("a.test", 1, "bulk");
    for (int i = 0; i < 2; i++)
        submit_pool("a.test", 1, "tx");
    submit("a.test", 1);
    assert_int_equal(f->resolves, 3); /* three destinations, one lookup each */
    answer_pool("a.test", "bulk", MX1, A1, 1);
    unsigned a, b, c;
    count_sources(f->opened, &a, &b, &c);
    assert_int_equal(f->opened, 8);
    assert_int_equal(a, 6); /* 3:1 */
    assert_int_equal(b, 2);
    assert_int_equal(c, 0);
    answer_pool("a.test", "tx", MX1, A1, 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    count_sources(f->opened, &a, &b, &c);
    assert_int_equal(f->opened, 11);
    assert_int_equal(c, 2);
    assert_non_null(strstr(f->opened_to[10], "192.0.2.1:25"));
    assert_null(strstr(f->opened_to[10], "from")); /* no pool: the default source */
    struct dest *tb = dest_get_pool(f->d, "a.test", intern_id(f->e.names, "bulk"));
    struct dest *tt = dest_get_pool(f->d, "a.test", intern_id(f->e.names, "tx"));
    struct dest *t0 = dest_get(f->d, "a.test");
    assert_ptr_not_equal(tb->site, tt->site);
    assert_ptr_not_equal(tb->site, t0->site);
    /* a bulk connection goes idle: a tx job never takes it */
    enum sched_next what;
    struct conn *cb = NULL;
    for (unsigned i = 0; i < f->nopen; i++)
        if (f->open[i]->dest == tb)
            cb = f->open[i];
    conn_ready(cb, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(cb, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_NONE, SMTP_SCOPE_MESSAGE));
    submit_pool("a.test", 1, "tx");
    assert_ptr_equal(cb->dest, tb);
    fx_free(f);
}

/* Transactions follow the weights whatever the connections do: a
 * connection of a source ahead of its share says goodbye, and the next
 * connection goes from the one behind. */
static void
weights_per_transaction(void **state)
{
    (void)state;
    struct fx *f = fx_new(POOLS);
    for (int i = 0; i < 600; i++)
        submit_pool("w.test", 1, "bulk");
    answer_pool("w.test", "bulk", MX1, A1, 1);
    unsigned from_a = 0;
    /* Only connections from 198.51.100.2 ever get ready (the others'
     * sessions are slow): past the slack they stop taking jobs. */
    enum sched_next what = SCHED_NEXT_JOB;
    for (int round = 0; round < 600; round++) {
        struct conn *c = NULL;
        for (unsigned i = 0; i < f->nopen && c == NULL; i++)
            if (f->open[i]->src != NULL && strcmp(f->open[i]->src->pattern, "198.51.100.2") == 0)
                c = f->open[i];
        if (c == NULL)
            break;
        conn_ready(c, &what);
        if (what != SCHED_NEXT_JOB) {
            conn_gone(c, NULL);
            continue;
        }
        from_a++;
        txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_NONE, SMTP_SCOPE_MESSAGE);
    }
    /* its share (3/4 of what was sent) and the slack (32, and 1 per 64):
     * a <= 0.75 a + 32 + a / 64, so 136 */
    assert_true(from_a >= 128 && from_a <= 140);
    /* the connections opened since went to the source behind: it has
     * many more open (its sessions never get ready here) than at first */
    unsigned b_open = 0;
    for (unsigned i = 0; i < f->nopen; i++)
        b_open += strcmp(f->open[i]->src->pattern, "198.51.100.3") == 0;
    assert_true(b_open >= 8);
    fx_free(f);
}

/* n new sites of pool bulk (the long tail), each a domain with an MX host
 * and address of its own (192.0.2.first+1..): one connection each. */
static void
open_new_sites(unsigned first, unsigned n)
{
    for (unsigned i = first; i < first + n; i++) {
        char dom[32], host[40];
        snprintf(dom, sizeof(dom), "lt%u.test", i);
        snprintf(host, sizeof(host), "mx.%s", dom);
        submit_pool(dom, 1, "bulk");
        const char *hosts[] = {host};
        const uint8_t addr[][16] = {{192, 0, 2, (uint8_t)(i + 1)}};
        answer_pool(dom, "bulk", hosts, addr, 1);
    }
}

/* The long tail: 40 domains, each an MX host and address of its own (a
 * site each), one message each in pool bulk (3:1). No site's counts can
 * tell the sources apart, so the pool's round robin picks: 30 and 10,
 * spread out. */
static void
weights_hold_across_new_sites(void **state)
{
    (void)state;
    struct fx *f = fx_new(POOLS);
    open_new_sites(0, 40);
    assert_int_equal(f->opened, 40);
    unsigned a, b, c;
    count_sources(f->opened, &a, &b, &c);
    assert_int_equal(a, 30);
    assert_int_equal(b, 10);
    /* spread out, not in runs: in any 4 opened one after the other, one
     * from the lighter source */
    for (unsigned i = 0; i + 4 <= 40; i++) {
        unsigned lb = 0;
        for (unsigned k = i; k < i + 4; k++)
            lb += strstr(f->opened_to[k], "from 198.51.100.3") != NULL;
        assert_int_equal(lb, 1);
    }
    fx_free(f);
}

/* The round robin takes a turn only for a connection that opens: here
 * each domain's first pick is for the first MX host, whose one address is
 * full (max_connections_per_address = 1), and its connection goes to its
 * second host's address with a second pick. Had each pick turned the
 * round robin, every domain would take the same source from its second
 * (seen: 30 to 0 at 1:1). */
static void
round_robin_turns_per_connection_opened(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\n"
                          "max_connections_per_address = 1\n"
                          "[source 198.51.100.2]\n[source 198.51.100.3]\n"
                          "[pool bulk]\nsources = 198.51.100.2, 198.51.100.3\n");
    for (unsigned i = 0; i < 30; i++) {
        char dom[32], h1[48], h2[48];
        snprintf(dom, sizeof(dom), "two%u.test", i);
        snprintf(h1, sizeof(h1), "mxa.%s", dom);
        snprintf(h2, sizeof(h2), "mxb.%s", dom);
        submit_pool(dom, 1, "bulk");
        const char *hosts[] = {h1, h2};
        const uint8_t addr[][16] = {{192, 0, 2, 1}, {192, 0, 2, (uint8_t)(i + 2)}};
        answer_pool(dom, "bulk", hosts, addr, 2);
    }
    assert_int_equal(f->opened, 30);
    unsigned a, b, c;
    count_sources(f->opened, &a, &b, &c);
    assert_int_equal(a, 15);
    assert_int_equal(b, 15);
    fx_free(f);
}

/* c's transaction ends with its recipient greylisted: code, text. */
static void
greylisted(struct conn *c, unsigned code, const char *text)
{
    struct smtp_outcome o;
    memset(&o, 0, sizeof(o));
    o.status = SMTP_STATUS_TEMPFAIL;
    o.code = (uint16_t)code;
    o.reason = SMTP_REASON_REPLY;
    o.scope = SMTP_SCOPE_RCPT;
    snprintf(o.text, sizeof(o.text), "%s", text);
    source_note_reply(c, &o); /* as conn_txn_done does */
    assert_false(txn_done(c, SMTP_STATUS_TEMPFAIL, code, SMTP_REASON_REPLY, SMTP_SCOPE_RCPT));
}

/* A receiver greylists a recipient sent from 198.51.100.2: the retry's
 * connection goes from 198.51.100.2 again (its counts at the site say
 * 198.51.100.3, which the receiver has not seen: greylisted again), for
 * an hour; then the site's counts choose again. */
static void
greylisted_retry_goes_from_the_same_source(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\n"
                          "[source 198.51.100.2]\n[source 198.51.100.3]\n"
                          "[pool bulk]\nsources = 198.51.100.2, 198.51.100.3\n");
    submit_pool("g.test", 1, "bulk");
    answer_pool("g.test", "bulk", MX1, A1, 1);
    assert_int_equal(f->opened, 1);
    assert_non_null(strstr(f->opened_to[0], "from 198.51.100.2"));
    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    greylisted(c, 450, "4.2.0 <u@g.test>: Recipient address rejected: Greylisted");
    conn_gone(c, NULL);

    f->w.now += MS_TO_NS(5 * 60 * 1000); /* the retry */
    submit_pool("g.test", 1, "bulk");
    assert_int_equal(f->opened, 2);
    assert_non_null(strstr(f->opened_to[1], "from 198.51.100.2"));
    c = f->open[0];
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_NONE, SMTP_SCOPE_MESSAGE));
    conn_gone(c, NULL);

    f->w.now += MS_TO_NS(POLICY_GREYLIST_STICK_MS); /* past the hour */
    submit_pool("g.test", 1, "bulk");
    assert_int_equal(f->opened, 3);
    assert_non_null(strstr(f->opened_to[2], "from 198.51.100.3"));
    fx_free(f);
}

/* While a receiver greylists b.test's mail from 198.51.100.2, b.test's
 * connection from 198.51.100.3 ends after its transaction (the retries
 * must come from the address the receiver saw), the one from
 * 198.51.100.2 goes on, and the destination is not forgotten meanwhile
 * (its mail back in the spool, it would be evicted with its stickiness);
 * with 198.51.100.2 held at the site, 198.51.100.3 sends. */
static void
greylisting_keeps_the_destination_on_its_source(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 2\n"
                          "[source 198.51.100.2]\n[source 198.51.100.3]\n"
                          "[pool bulk]\nsources = 198.51.100.2, 198.51.100.3\n");
    for (int i = 0; i < 6; i++)
        submit_pool("b.test", 1, "bulk");
    answer_pool("b.test", "bulk", MX1, A1, 1);
    assert_int_equal(f->opened, 2);
    struct conn *c2 = NULL, *c3 = NULL;
    for (unsigned i = 0; i < f->nopen; i++) {
        if (strcmp(f->open[i]->src->pattern, "198.51.100.2") == 0)
            c2 = f->open[i];
        else
            c3 = f->open[i];
    }
    assert_non_null(c2);
    assert_non_null(c3);
    if (c2 == NULL || c3 == NULL)
        return; /* not reached; said for gcc -O3, whose -Warray-bounds saw a NULL c3 */
    enum sched_next what;
    conn_ready(c2, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    conn_ready(c3, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    greylisted(c2, 451, "4.7.1 Greylisting in action, please come back later");
    assert_false(txn_done(c3, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_NONE, SMTP_SCOPE_MESSAGE));
    conn_ready(c3, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT);
    assert_string_equal(c3->quit_why, "source_held");
    conn_ready(c2, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c2, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_NONE, SMTP_SCOPE_MESSAGE));
    conn_gone(c3, NULL);

    /* 198.51.100.2 held at the site (a 421 there): 198.51.100.3 may send */
    struct dest *t = dest_get_pool(f->d, "b.test", intern_id(f->e.names, "bulk"));
    struct site_source *ss = site_source(t->site, c2->src_id);
    assert_non_null(ss);
    ss->hold_until = f->w.now + MS_TO_NS(60 * 1000);
    conn_gone(c2, NULL);
    assert_true(f->opened >= 3);
    assert_non_null(strstr(f->opened_to[f->opened - 1], "from 198.51.100.3"));
    struct conn *c = f->open[f->nopen - 1];
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_NONE, SMTP_SCOPE_MESSAGE));

    /* with nothing left, b.test stays in memory until the hour ends */
    while (f->nopen > 0) {
        c = f->open[0];
        conn_ready(c, &what);
        if (what == SCHED_NEXT_JOB) {
            assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_NONE,
                                  SMTP_SCOPE_MESSAGE));
            continue;
        }
        conn_gone(c, NULL);
    }
    assert_true(fairq_empty(&t->q));
    assert_false(dest_evictable(t, f->w.now + MS_TO_NS(30 * 60 * 1000)));
    assert_true(dest_evictable(t, f->w.now + MS_TO_NS(POLICY_GREYLIST_STICK_MS + 1000)));
    fx_free(f);
}

/* A reload that gives the pool a third source: the round robin starts
 * again over the new pool (its state is per [pool] as loaded, forgotten
 * at each reload: a freed pool's address may be given to the new one),
 * and new sites share out by the new weights. */
static void
reload_gives_the_round_robin_a_new_source(void **state)
{
    (void)state;
    struct fx *f = fx_new(POOLS);
    open_new_sites(0, 8);
    unsigned a, b, c;
    count_sources(f->opened, &a, &b, &c);
    assert_int_equal(a, 6);
    assert_int_equal(b, 2);

    struct config *old = f->cfg;
    char conf[sizeof(POOLS) + 64];
    snprintf(conf, sizeof(conf), "%s", POOLS);
    char *at = strstr(conf, "198.51.100.2:3, 198.51.100.3:1");
    assert_non_null(at);
    snprintf(at, sizeof(conf) - (size_t)(at - conf),
             "198.51.100.2, 198.51.100.3, 198.51.100.4\n[pool tx]\nsources = 198.51.100.4\n");
    setup_conf(f, conf);
    f->e.cfg = f->cfg;
    delivery_reconfigure(f->d);
    config_free(old);

    unsigned before = f->opened;
    open_new_sites(8, 30);
    assert_int_equal(f->opened, before + 30);
    unsigned na = 0, nb = 0, nc = 0;
    for (unsigned i = before; i < f->opened; i++) {
        na += strstr(f->opened_to[i], "from 198.51.100.2") != NULL;
        nb += strstr(f->opened_to[i], "from 198.51.100.3") != NULL;
        nc += strstr(f->opened_to[i], "from 198.51.100.4") != NULL;
    }
    assert_int_equal(na, 10);
    assert_int_equal(nb, 10);
    assert_int_equal(nc, 10);
    fx_free(f);
}

/* A first MTA-STS check asked by a connection's next transaction
 * (sched_conn_next checks the policy per transaction, and a domain the
 * store forgot is a first contact again) and answered inside the call
 * (c-ares failed at once): the answer is read there and then. It does
 * not run the destination from inside sched_conn_next, which opened a
 * second connection for the very job the ready one then took; nor, from
 * dest_run, does it count as a check still running. */
static void
mta_sts_answer_at_once(void **state)
{
    (void)state;
    int mute = socket(AF_INET, SOCK_DGRAM, 0); /* the store's resolver: never answered */
    assert_true(mute >= 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(mute, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(mute, (struct sockaddr *)&sin, &sl), 0);
    char conf[384];
    snprintf(conf, sizeof(conf),
             "[delivery]\ninitial_connections = 2\n"
             "[dns]\nservers = 127.0.0.1:%u\ntimeout = 60s\ntries = 1\n"
             "[mta_sts]\ntlsrpt = no\nfetch_timeout = 60s\n",
             ntohs(sin.sin_port));
    struct fx *f = fx_new(conf);
    char dir[] = "/tmp/sluice-sched-sts-XXXXXX", cache[64], err[256];
    assert_non_null(mkdtemp(dir));
    snprintf(cache, sizeof(cache), "%s/mta-sts.cache", dir);
    struct mta_sts *m = NULL;
    /* The store forgets a domain 20 ms after its last use (ten minutes
     * without the test hook). */
    setenv("SLUICE_TEST_MTA_STS_FORGET", "20", 1);
    assert_int_equal(mta_sts_new(f->cfg, cache, &m, err, sizeof(err)), 0);
    unsetenv("SLUICE_TEST_MTA_STS_FORGET");
    f->e.mta_sts = m;
    f->d->ops = &test_ops_txt_now;
    sched_start(f->d);

    submit("a.test", 1);
    assert_int_equal(f->txts, 1);
    struct dest *t = dest_get(f->d, "a.test");
    assert_null(t->sts_ask);
    assert_int_equal(t->sts_asked, f->w.now); /* known at once: no policy */
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    assert_false(timer_armed(&t->lim_timer)); /* nothing to wait for */

    /* While its connection opens, the store forgets the domain, and the
     * destination's policy is due to be asked again. */
    struct mta_sts_stats st;
    for (int i = 0; i < 5000; i++) {
        mta_sts_stats(m, &st);
        if (st.domains == 0)
            break;
        usleep(1000);
    }
    assert_int_equal(st.domains, 0);
    f->w.now += MS_TO_NS(STS_ASK_MS);

    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    assert_int_equal(f->txts, 2);
    assert_string_equal(f->txt_name, "_mta-sts.a.test");
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_non_null(c->job);
    assert_int_equal(f->opened, 1); /* none for the job c took */
    assert_true(fairq_empty(&t->q));
    assert_null(t->sts_ask);
    assert_int_equal(f->d->nsts_asks, 0);
    assert_null(t->sts);
    assert_int_equal(t->sts_asked, f->w.now); /* the verdict was read */
    mta_sts_stats(m, &st);
    assert_int_equal(st.checks, 2);
    assert_int_equal(st.inflight, 0);

    mta_sts_free(m);
    f->e.mta_sts = NULL;
    fx_free(f);
    close(mute);
    unlink(cache);
    rmdir(dir);
}

/* A domain's first MTA-STS check asked by its open connection's next
 * transaction (the store forgot the domain): the mail waits for it there
 * too, as README says ("a destination whose first check runs waits"),
 * rather than leave under no policy while the check runs. The connection
 * idles, and the answer hands it the job. */
static void
first_mta_sts_check_holds_an_open_connection(void **state)
{
    (void)state;
    int mute = socket(AF_INET, SOCK_DGRAM, 0); /* the store's resolver: never answered */
    assert_true(mute >= 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sin);
    assert_int_equal(bind(mute, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(mute, (struct sockaddr *)&sin, &sl), 0);
    char conf[384];
    snprintf(conf, sizeof(conf),
             "[delivery]\ninitial_connections = 2\n"
             "[dns]\nservers = 127.0.0.1:%u\ntimeout = 60s\ntries = 1\n"
             "[mta_sts]\ntlsrpt = no\nfetch_timeout = 60s\n",
             ntohs(sin.sin_port));
    struct fx *f = fx_new(conf);
    char dir[] = "/tmp/sluice-sched-sts-XXXXXX", cache[64], err[256];
    assert_non_null(mkdtemp(dir));
    snprintf(cache, sizeof(cache), "%s/mta-sts.cache", dir);
    struct mta_sts *m = NULL;
    setenv("SLUICE_TEST_MTA_STS_FORGET", "20", 1);
    assert_int_equal(mta_sts_new(f->cfg, cache, &m, err, sizeof(err)), 0);
    unsetenv("SLUICE_TEST_MTA_STS_FORGET");
    f->e.mta_sts = m;
    f->d->ops = &test_ops_txt;
    sched_start(f->d);

    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->txts, 1);
    f->txt_cb(f->txt_arg, DNS_NOT_FOUND, "no TXT record", NULL, 0, 300);
    assert_int_equal(f->opened, 1);
    struct dest *t = dest_get(f->d, "a.test");

    struct mta_sts_stats st;
    for (int i = 0; i < 5000; i++) {
        mta_sts_stats(m, &st);
        if (st.domains == 0)
            break;
        usleep(1000);
    }
    assert_int_equal(st.domains, 0);
    f->w.now += MS_TO_NS(STS_ASK_MS);

    struct conn *c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    assert_int_equal(f->txts, 2);
    assert_non_null(t->sts_ask);
    assert_int_equal(what, SCHED_NEXT_IDLE); /* not under no policy */
    assert_null(c->job);
    assert_int_equal(dest_queued(t), 1);
    assert_int_equal(f->opened, 1);

    f->txt_cb(f->txt_arg, DNS_NOT_FOUND, "no TXT record", NULL, 0, 300);
    assert_int_equal(f->resumed, 1); /* the idle connection takes it */
    assert_non_null(c->job);
    assert_int_equal(dest_queued(t), 0);
    assert_int_equal(f->opened, 1);

    mta_sts_free(m);
    f->e.mta_sts = NULL;
    fx_free(f);
    close(mute);
    unlink(cache);
    rmdir(dir);
}

/* A receiver that answers every connection with a 421 greeting, rest
 * after rest: the first rest keeps the site's mail waiting (pushback for
 * a while); the next 421 greeting, no connection of the site ready in
 * between, defers what waits with that reply, as after every address
 * failed, and the mail that comes during the rest too. Before, an outage
 * answered 421 kept the whole queue in memory, never deferred, never told,
 * retried once per site_hold until max_age. A connection that gets ready
 * starts the count again. */
static void
greeting_421_again_defers(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n"
                          "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    struct smtp_outcome bye = bye_421();
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    c->connected = true;
    conn_gone(c, &bye); /* the greeting */
    struct site *site = dest_get(f->d, "a.test")->site;
    assert_true(site->hold_until > f->w.now);
    assert_null(site->rest_fail);
    /* the first rest: the mail waits, another domain's too */
    submit("b.test", 2);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *b = dest_get(f->d, "b.test");
    assert_ptr_equal(b->site, site);
    assert_int_equal(dest_queued(dest_get(f->d, "a.test")), 1);
    assert_int_equal(dest_queued(b), 1); /* one job of two */
    assert_int_equal(f->failed, 0);
    /* The rest ends; the next try meets a 421 greeting again. */
    f->w.now += MS_TO_NS(31000);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->opened, 2);
    c = f->open[0];
    c->connected = true;
    conn_gone(c, &bye);
    assert_true(site->hold_until > f->w.now);
    assert_non_null(site->rest_fail);
    /* what waited is deferred with the 421, both domains' */
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(dest_queued(dest_get(f->d, "a.test")), 0);
    assert_int_equal(dest_queued(b), 0);
    assert_int_equal(f->failed, 3);
    assert_int_equal(f->last_fail.code, 421);
    assert_string_equal(f->last_fail.text, "4.7.0 try later");
    /* and what comes during this rest */
    unsigned opened = f->opened;
    submit("c.test", 1);
    answer("c.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, opened);
    assert_int_equal(dest_queued(dest_get(f->d, "c.test")), 0);
    assert_int_equal(f->failed, 4);
    /* The receiver is back: a connection gets ready, the count starts
     * again; a later 421 greeting rests with the mail waiting. */
    f->w.now += MS_TO_NS(31000);
    timer_run(&f->w.timers, f->w.now, NULL);
    submit("a.test", 1);
    assert_int_equal(f->opened, opened + 1);
    c = f->open[0];
    enum sched_next what;
    conn_ready(c, &what);
    assert_int_equal(site->greeting_421s, 0);
    fx_free(f);
}

/* A receiver that takes so many connections from us and greets one more
 * with a 421 (a per-address limit): the connections it has go on
 * delivering. A transaction they deliver starts the count again, so the
 * extra connection's next 421 greeting, after the rest, is pushback
 * again (the mail waits for the connections that deliver), not "a host
 * that will not talk". Before, only a new connection getting ready reset
 * the count: that second 421 deferred the domain's waiting mail, every
 * recipient a transient_failure, while its site delivered. */
static void
greeting_421_count_starts_again_on_a_delivery(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 2\n"
                          "[domain *]\nmax_connections = 10\nsite_hold = 30s\n");
    struct smtp_outcome bye = bye_421();
    enum sched_next what;
    for (int i = 0; i < 8; i++)
        submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 2);
    struct conn *c1 = f->open[0];
    c1->connected = true;
    conn_ready(c1, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    /* the second is greeted with a 421 */
    struct conn *c2 = f->open[1];
    c2->connected = true;
    conn_gone(c2, &bye);
    struct site *site = dest_get(f->d, "a.test")->site;
    assert_int_equal(site->greeting_421s, 1);
    assert_true(site->hold_until > f->w.now);
    /* the first connection goes on delivering during the rest */
    assert_false(txn_done(c1, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    assert_int_equal(site->greeting_421s, 0);
    /* the rest ends; the extra connection meets a 421 greeting again */
    f->w.now += MS_TO_NS(31000);
    timer_run(&f->w.timers, f->w.now, NULL);
    /* deliveries that waited grow the window again: one more, at last */
    unsigned before = f->opened;
    for (int i = 0; i < 20 && f->opened == before; i++) {
        f->w.now += MS_TO_NS(40);
        conn_ready(c1, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
        assert_false(
            txn_done(c1, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    }
    assert_true(f->opened > before);
    struct conn *c3 = f->open[f->nopen - 1];
    assert_ptr_not_equal(c3, c1);
    c3->connected = true;
    conn_gone(c3, &bye);
    assert_true(site->hold_until > f->w.now);
    assert_null(site->rest_fail); /* a rest with the mail waiting */
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->failed, 0);
    assert_true(dest_queued(dest_get(f->d, "a.test")) > 0);
    fx_free(f);
}

/* A source a receiver answers 421 rests at that site on its own: new
 * connections go from the pool's other source; when both are held, the
 * destination holds. */
static void
source_held_alone(void **state)
{
    (void)state;
    struct fx *f = fx_new(POOLS);
    for (int i = 0; i < 4; i++)
        submit_pool("h.test", 1, "bulk");
    answer_pool("h.test", "bulk", MX1, A1, 1);
    struct dest *t = dest_get_pool(f->d, "h.test", intern_id(f->e.names, "bulk"));
    assert_int_equal(f->opened, 4);
    /* every connection from .2 meets a 421 greeting */
    struct smtp_outcome busy = {.code = 421, .status = SMTP_STATUS_TEMPFAIL,
                                .scope = SMTP_SCOPE_SESSION};
    for (unsigned i = f->nopen; i-- > 0;) {
        struct conn *c = f->open[i];
        if (strcmp(c->src->pattern, "198.51.100.2") == 0) {
            c->connected = true;
            conn_gone(c, &busy);
        }
    }
    assert_true(f->d->stats.source_holds >= 1);
    assert_true(f->d->w->now >= t->hold_until); /* the destination is not held */
    unsigned a, b, c;
    unsigned before = f->opened;
    count_sources(before, &a, &b, &c);
    /* what was opened since: from .3 only */
    for (unsigned i = 4; i < f->opened; i++)
        assert_non_null(strstr(f->opened_to[i], "from 198.51.100.3"));
    /* .3 meets a 421 too: both held, the destination holds */
    for (unsigned i = f->nopen; i-- > 0;) {
        struct conn *x = f->open[i];
        x->connected = true;
        conn_gone(x, &busy);
    }
    assert_true(f->d->w->now < t->hold_until);
    unsigned n = f->opened;
    submit_pool("h.test", 1, "bulk");
    assert_int_equal(f->opened, n); /* nothing opens while held */
    fx_free(f);
}

/* A pool's source whose address is not on this host (EADDRNOTAVAIL at
 * its bind): it rests at the site, alone, and the pool's other source
 * carries the mail, nothing deferred; when that one cannot open either,
 * every source is held: what waits is deferred with the cause and the
 * destination holds, as without a pool. Before, the first failure
 * deferred everything and held the whole destination. */
static void
source_open_failure_holds_the_source(void **state)
{
    (void)state;
    struct fx *f = fx_new(POOLS);
    f->open_err = -EADDRNOTAVAIL;
    snprintf(f->fail_from, sizeof(f->fail_from), "198.51.100.2");
    for (int i = 0; i < 4; i++)
        submit_pool("s.test", 1, "bulk");
    answer_pool("s.test", "bulk", MX1, A1, 1);
    struct dest *t = dest_get_pool(f->d, "s.test", intern_id(f->e.names, "bulk"));
    assert_int_equal(f->failed, 0);
    assert_true(f->opened >= 1);
    for (unsigned i = 0; i < f->opened; i++)
        assert_non_null(strstr(f->opened_to[i], "from 198.51.100.3"));
    assert_true(f->d->stats.source_holds >= 1);
    assert_true(f->w.now >= t->hold_until); /* the destination is not held */
    /* Another domain of the site, where .3 cannot open either (.2 rests
     * there already): every source held, what waits is deferred with
     * the cause, and the domain holds. */
    f->fail_from[0] = '\0';
    f->open_fails = 100;
    snprintf(f->open_source, sizeof(f->open_source), "198.51.100.3");
    submit_pool("z.test", 2, "bulk");
    answer_pool("z.test", "bulk", MX1, A1, 1);
    struct dest *z = dest_get_pool(f->d, "z.test", intern_id(f->e.names, "bulk"));
    assert_ptr_equal(z->site, t->site);
    assert_int_equal(f->failed, 2);
    assert_int_equal(f->last_fail.code, 451);
    assert_string_equal(f->last_fail.text,
                        "cannot open a connection from 198.51.100.3: Cannot assign requested address");
    assert_true(f->w.now < z->hold_until);
    /* No socket at all (EMFILE) is the node's, no source's: pool tx's
     * source is not held for it; the mail is deferred, the domain held. */
    uint64_t holds = f->d->stats.source_holds;
    f->open_err = -EMFILE;
    f->open_source[0] = '\0';
    submit_pool("y.test", 1, "tx");
    answer_pool("y.test", "tx", MX1, A1, 1);
    assert_int_equal(f->d->stats.source_holds, holds);
    assert_int_equal(f->failed, 3);
    assert_string_equal(f->last_fail.text, "cannot open a connection: Too many open files");
    assert_true(f->w.now < dest_get_pool(f->d, "y.test", intern_id(f->e.names, "tx"))->hold_until);
    fx_free(f);
}

/* A receiver that throttles a pool's source with a rate-limited reply
 * (a "451 4.7.650 ... rate limited" to the dot, not a 421) transaction
 * after transaction: each hold of the source is twice the last
 * (policy_source_hold), as after 421s. Before the fix the end of each
 * such transaction (sched_txn_done) counted as one that delivered and
 * started the holds over, so the throttle its deferral reports
 * (outcome.c's job_finish: sched_source_throttled) held the source for
 * site_hold every time, never longer. */
static void
source_throttled_again_holds_longer(void **state)
{
    (void)state;
    struct fx *f = fx_new(POOLS);
    for (int i = 0; i < 8; i++)
        submit_pool("r.test", 1, "bulk");
    answer_pool("r.test", "bulk", MX1, A1, 1);
    struct dest *t = dest_get_pool(f->d, "r.test", intern_id(f->e.names, "bulk"));
    struct conn *c = NULL;
    for (unsigned i = 0; i < f->nopen; i++)
        if (strcmp(f->open[i]->src->pattern, "198.51.100.2") == 0)
            c = f->open[i];
    assert_non_null(c);
    uint64_t base = MS_TO_NS(policy_source_hold(t->pol->site_hold, 1));
    for (unsigned round = 1; round <= 3; round++) {
        enum sched_next what;
        conn_ready(c, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
        assert_false(txn_done_at(c, SMTP_STATUS_TEMPFAIL, 451, SMTP_REASON_REPLY,
                                 SMTP_SCOPE_MESSAGE, SMTP_CLIENT_S_DOT));
        /* its recipients deferred as rate_limited (job_finish) */
        sched_source_throttled(t, c->src_id, c->mx, "rate_limited");
        struct site_source *ss = site_source(c->site, c->src_id);
        assert_non_null(ss);
        assert_int_equal(ss->holds, round);
        assert_true(ss->hold_until - f->w.now == base << (round - 1));
        f->w.now = ss->hold_until; /* the hold is over: the connection goes on */
    }
    fx_free(f);
}

/* The pick itself: the least (transactions + connections + 1) per weight. */
/* max_connections_per_address counts per pool: the sources of a pool
 * share the pool's cap at an MX address (the receiving host sees no more
 * from eight addresses than from one), while each pool, and mail without
 * one, has the cap whole (one customer's flood never takes another's
 * slots). Before, each source had a cap of its own: 8 here, not 4. */
static void
pool_shares_address_cap(void **state)
{
    (void)state;
    char conf[1024];
    snprintf(conf, sizeof(conf),
             "[delivery]\ninitial_connections = 8\nmax_connections_per_address = 4\n%s",
             strstr(POOLS, "[domain *]"));
    struct fx *f = fx_new(conf);
    for (int i = 0; i < 20; i++)
        submit_pool("cap.test", 1, "bulk");
    answer_pool("cap.test", "bulk", MX1, A1, 1);
    unsigned a, b, c;
    count_sources(f->opened, &a, &b, &c);
    assert_int_equal(f->opened, 4); /* the pool's 4, from both its sources */
    assert_int_equal(a, 3);
    assert_int_equal(b, 1);
    for (int i = 0; i < 20; i++)
        submit_pool("cap.test", 1, "tx");
    answer_pool("cap.test", "tx", MX1, A1, 1);
    for (int i = 0; i < 20; i++)
        submit("cap.test", 1);
    answer("cap.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    count_sources(f->opened, &a, &b, &c);
    assert_int_equal(c, 4);           /* pool tx: 4 of its own */
    assert_int_equal(f->opened, 12);  /* and mail without a pool 4 more */
    struct dest *tb = dest_get_pool(f->d, "cap.test", intern_id(f->e.names, "bulk"));
    assert_true(dest_queued(tb) > 0); /* the rest waits for the pool's slots */
    fx_free(f);
}

/* The address with room (dest_address_room: the first one's share of
 * max_connections_per_address is taken) may be another host's, of the
 * other family: the connection goes from a source of the pool of that
 * family, not from the one picked for the first address (an IPv6 source
 * cannot connect to an IPv4 address: conn_open refused it, and the
 * domain tried again every second while the first address was full). */
static void
pool_source_follows_the_address_with_room(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 8\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 40\n"
                          "[source 198.51.100.2]\nehlo = a.out.test\n"
                          "[source 2001:db8::5]\nehlo = b.out.test\n"
                          "[pool dual]\nsources = 198.51.100.2, 2001:db8::5\n");
    for (int i = 0; i < 4; i++)
        submit_pool("dual.test", 1, "dual");
    static const uint8_t v6[][16] = {{0x20, 0x01, 0x0d, 0xb8, [15] = 0x25}};
    static const uint8_t v4[][16] = {{192, 0, 2, 2}};
    struct result_host rh[2] = {
        {.name = MX1[0], .preference = 10, .n6 = 1, .a6 = v6},
        {.name = MX1[1], .preference = 10, .n4 = 1, .a4 = v4},
    };
    struct dns_mx_result *r = result_new(DNS_OK, NULL, "dual.test", rh, 2, false);
    assert_non_null(r);
    r->expires = UINT64_MAX;
    struct dest *t = dest_get_pool(F->d, "dual.test", intern_id(F->e.names, "dual"));
    assert_non_null(t->req);
    dest_on_mx(t, r);
    assert_int_equal(f->opened, 2); /* one per address: the cap */
    assert_string_equal(f->opened_to[0], "mx1.hoster.test [2001:db8::25]:25 from 2001:db8::5");
    assert_string_equal(f->opened_to[1], "mx2.hoster.test 192.0.2.2:25 from 198.51.100.2");
    fx_free(f);
}

static void
source_pick_order(void **state)
{
    (void)state;
    struct site_source a = {.sent = 30, .conns = 2}, b = {.sent = 8, .conns = 1};
    /* a: 33/3 = 11, b: 10/1 = 10 */
    assert_true(source_better(&b, 1, &a, 3));
    assert_false(source_better(&a, 3, &b, 1));
    b.sent = 11; /* 13/1 > 11 */
    assert_true(source_better(&a, 3, &b, 1));
    /* A source without a connection first, unless ahead per weight. */
    struct site_source none = {.sent = 0, .conns = 0}, busy = {.sent = 0, .conns = 1};
    assert_true(source_better(&none, 1, &busy, 3));
    assert_false(source_better(&busy, 3, &none, 1));
    none.sent = 20, busy.sent = 30; /* 20/1 > 30/3: ahead, the weights decide */
    assert_false(source_better(&none, 1, &busy, 3));
    assert_true(source_better(&busy, 3, &none, 1));
}

/* ---- site affinity ---- */

static struct fx *
fx_two_workers(const char *extra, unsigned id)
{
    struct fx *f = fx_new(extra);
    f->e.nworkers = 2;
    f->w.id = id;
    delivery_env_take(f->d);
    f->d->ops = &test_ops_aff;
    return f;
}

static unsigned
worker_of_host(const char *mx)
{
    return (unsigned)(hash_str_nocase(mx) % 2);
}

/* The k-th (k < 4) of the names mxN.hoster.test whose site is worker w's. */
static const char *
host_of_worker(unsigned w, unsigned k)
{
    static char names[2][4][32];
    unsigned found = 0;
    for (unsigned i = 0; i < 64; i++) {
        char name[32];
        snprintf(name, sizeof(name), "mx%u.hoster.test", i);
        if (worker_of_host(name) != w)
            continue;
        if (found == k) {
            snprintf(names[w][k], sizeof(names[w][k]), "%s", name);
            return names[w][k];
        }
        found++;
    }
    fail_msg("no name %u of worker %u", k, w);
    return NULL;
}

/* Without [redis] an [mx] section's rates and bursts are split between
 * the workers, and the parts add up to the section's: a burst of 5 is 3
 * and 2, a rate of 3/min is 3 per 2 min on each (1/min each before).
 * Its cap is whole on each, held by both (spread 2): the limiter counts
 * it for the node (node_caps.h), so a domain alone, whose mail goes from
 * one worker, may use all of it (a cap of 3 was 2 and 1: one domain got
 * 1 or 2). */
static void
mx_limits_split_between_the_workers_add_up(void **state)
{
    (void)state;
    struct mx_policy m;
    memset(&m, 0, sizeof(m));
    m.max_connections = 3;
    m.message_burst = 5;
    m.max_message_rate.count = 3;
    m.max_message_rate.per_ms = 60000;
    unsigned bursts = 0;
    for (unsigned id = 0; id < 2; id++) {
        struct fx *f = fx_two_workers("", id);
        struct limit_conf lc;
        mx_limit_conf(f->d, &m, &lc);
        assert_int_equal(lc.max_connections, 3);
        assert_int_equal(lc.spread, 2);
        assert_int_equal(lc.msg_burst, id == 0 ? 3 : 2);
        assert_int_equal(lc.msg_rate.count, 3);
        assert_int_equal(lc.msg_rate.per_ms, 120000);
        bursts += lc.msg_burst;
        fx_free(f);
    }
    assert_int_equal(bursts, 5);
}

/* c's one job is delivered, nothing more waits: it goes idle, then away. */
static void
deliver_one_and_close(struct conn *c)
{
    enum sched_next what;
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    conn_gone(c, NULL);
}

/* A domain whose answer names a site of the other worker moves there
 * before its first connection: its claim, its jobs handed over. One whose
 * site is the worker its name hashes to stays, and needs no claim. */
static void
affinity_moves_a_domain_to_its_sites_worker(void **state)
{
    (void)state;
    unsigned site_w = worker_of_host(MX1[0]);
    struct fx *f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n", 1 - site_w);
    submit("a.test", 1);
    submit("a.test", 2);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 0);
    assert_int_equal(f->handed, 2);
    assert_int_equal(f->handed_to, site_w);
    assert_int_equal(f->nclaimed, 1);
    assert_string_equal(f->claimed[0], "a.test");
    assert_int_equal(f->claimed_by[0], site_w);
    /* mail that comes later for it is passed on at once, unresolved */
    submit("a.test", 1);
    assert_int_equal(f->handed, 3);
    assert_int_equal(f->resolves, 1);
    fx_free(f);

    f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n", site_w);
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->handed, 0);
    assert_int_equal(f->opened, 1);
    assert_int_equal(f->nclaimed, 0);
    fx_free(f);
}

/* Under an [mx] section with rollup = yes, domains whose own MX host
 * names hash to either worker are one site: each is claimed for the
 * worker the section's pattern hashes to. Before, each went to its own
 * host's worker, and the rollup was a site on each worker, with its own
 * connections there. */
static void
affinity_gathers_a_rollup_on_its_patterns_worker(void **state)
{
    (void)state;
    unsigned pw = worker_of_host("*.hoster.test");
    for (unsigned hw = 0; hw < 2; hw++) {
        const char *host[] = {host_of_worker(hw, 0)};
        struct fx *f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n"
                                      "[mx *.hoster.test]\nrollup = yes\n",
                                      1 - pw);
        submit("a.test", 1);
        answer("a.test", DNS_OK, host, (unsigned[]){10}, A1, 1);
        assert_int_equal(f->nclaimed, 1);
        assert_int_equal(f->claimed_by[0], pw);
        assert_int_equal(f->handed, 1);
        assert_int_equal(f->opened, 0);
        fx_free(f);
    }
}

/* A reload that adds an [mx] section with rollup = yes names a domain's
 * site by the section's pattern: its next run claims it for the worker
 * the pattern hashes to, as its first answer would have been under that
 * config. Before, the reload kept the worker its own MX host had given it
 * (its answer was not looked at again), and the rollup stayed a site on
 * each worker until each domain's answer expired. */
static void
affinity_decided_again_when_a_reload_adds_a_rollup(void **state)
{
    (void)state;
    unsigned pw = worker_of_host("*.hoster.test");
    const char *host[] = {host_of_worker(1 - pw, 0)};
    struct fx *f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n", 1 - pw);
    submit("a.test", 1);
    answer("a.test", DNS_OK, host, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->nclaimed, 0); /* its own host's worker: stays */
    assert_int_equal(f->handed, 0);
    struct config *old = f->cfg;
    setup_conf(f, "[delivery]\nallow_networks = 127.0.0.0/8\n"
                  "[mx *.hoster.test]\nrollup = yes\n");
    f->e.cfg = f->cfg;
    delivery_reconfigure(f->d);
    config_free(old);
    submit("a.test", 1);
    assert_int_equal(f->nclaimed, 1);
    assert_string_equal(f->claimed[0], "a.test");
    assert_int_equal(f->claimed_by[0], pw);
    assert_true(f->handed >= 1);
    fx_free(f);
}

/* The destination a domain leaves behind when it moves holds nothing
 * but its answer: it goes at the next sweep, not after the idle time
 * (10 minutes by default), and the claim it made stays. Mail that still
 * comes here for the domain is passed on by a destination made for it,
 * which goes the same way. */
static void
affinity_husk_goes_at_the_next_sweep(void **state)
{
    (void)state;
    unsigned site_w = worker_of_host(MX1[0]);
    struct fx *f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n", 1 - site_w);
    sched_start(f->d);
    submit("stays.test", 1); /* its answer never comes: busy, and older */
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->handed, 1);
    assert_int_equal(hash_count(&f->d->dests), 2);
    /* still busy at its first sweep (as with its TXT lookup out): kept,
     * and looked at again at the next one */
    struct dest *husk = dest_get(f->d, "a.test");
    assert_true(husk->moved);
    husk->running = true;
    f->w.now += MS_TO_NS(5100); /* one sweep, far from the idle time */
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->d->evicted, 0);
    husk->running = false;
    f->w.now += MS_TO_NS(5100);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->d->evicted, 1);
    assert_int_equal(hash_count(&f->d->dests), 1); /* stays.test */
    assert_int_equal(f->nclaimed, 1); /* the site's worker's claim */
    assert_int_equal(f->claimed_by[0], site_w);
    submit("a.test", 1); /* late mail: passed on unresolved */
    assert_int_equal(f->handed, 2);
    assert_int_equal(f->resolves, 2); /* a.test once, stays.test once */
    f->w.now += MS_TO_NS(5100);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->d->evicted, 2);
    assert_int_equal(hash_count(&f->d->dests), 1);
    fx_free(f);
}

/* The site's worker is that of its first MX host by name among those of
 * the best preference, whatever order the answer lists them in. */
static void
affinity_site_worker_ignores_order(void **state)
{
    (void)state;
    /* two hosts of one preference whose workers differ */
    const char *h[2] = {NULL, NULL};
    static char names[64][32];
    for (unsigned i = 0; i < 64 && (h[0] == NULL || h[1] == NULL); i++) {
        snprintf(names[i], sizeof(names[i]), "mx%u.hoster.test", i);
        unsigned w = worker_of_host(names[i]);
        if (h[w] == NULL)
            h[w] = names[i];
    }
    assert_non_null(h[0]);
    assert_non_null(h[1]);
    const char *lo = strcmp(h[0], h[1]) < 0 ? h[0] : h[1];
    unsigned want = worker_of_host(lo);
    const char *fwd[2] = {h[0], h[1]}, *rev[2] = {h[1], h[0]};
    const char **orders[2] = {fwd, rev};
    for (unsigned k = 0; k < 2; k++) {
        struct fx *f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n", 1 - want);
        submit("a.test", 1);
        answer("a.test", DNS_OK, orders[k], (unsigned[]){10, 10}, A1, 2);
        assert_int_equal(f->nclaimed, 1);
        assert_int_equal(f->claimed_by[0], want);
        assert_int_equal(f->handed, 1);
        fx_free(f);
    }
}

/* Under an [mx] section, or from a default source a [source] section
 * names, a domain is gathered on its site's worker as any other: without
 * [redis] the section's cap is the node's and one worker may take its
 * whole rate (node_caps.h). (They stayed on their hash's worker while the
 * sections' limits were split, and each worker opened its own set of
 * connections to the same MX hosts.) Mail through a pool is not: the
 * route table claims a domain for its mail without a pool, and its pool
 * mail stays on its hash's worker and claims nothing. */
static void
affinity_under_mx_and_source_sections_not_for_pools(void **state)
{
    (void)state;
    unsigned site_w = worker_of_host(MX1[0]);
    static const char *const confs[] = {
        "[delivery]\nallow_networks = 127.0.0.0/8\n"
        "[mx *.hoster.test]\nmax_connections = 4\nmax_message_rate = 10/s\n",
        "[delivery]\nallow_networks = 127.0.0.0/8\nsource_address = 198.51.100.2\n"
        "[source 198.51.100.2]\nmax_connections = 4\nmax_message_rate = 10/s\n",
    };
    for (unsigned k = 0; k < 2; k++) {
        struct fx *f = fx_two_workers(confs[k], 1 - site_w);
        submit("a.test", 1);
        answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
        assert_int_equal(f->nclaimed, 1);
        assert_string_equal(f->claimed[0], "a.test");
        assert_int_equal(f->claimed_by[0], site_w);
        assert_int_equal(f->handed, 1);
        assert_int_equal(f->handed_to, site_w);
        assert_int_equal(f->opened, 0);
        fx_free(f);
    }

    struct fx *f = fx_two_workers(POOLS, 1 - site_w);
    submit_pool("a.test", 1, "bulk");
    answer_pool("a.test", "bulk", MX1, A1, 1);
    assert_int_equal(f->nclaimed, 0);
    assert_int_equal(f->handed, 0);
    assert_true(f->opened >= 1);
    fx_free(f);
}

/* A later answer that names hosts of another worker's site moves the
 * domain there: this worker's claim goes, the new one is made, and the
 * jobs follow. */
static void
affinity_follows_a_changed_answer(void **state)
{
    (void)state;
    unsigned site_w = worker_of_host(MX1[0]);
    const char *other = NULL;
    static char name[32];
    for (unsigned i = 0; i < 64 && other == NULL; i++) {
        snprintf(name, sizeof(name), "mx%u.elsewhere.test", i);
        if (worker_of_host(name) != site_w)
            other = name;
    }
    assert_non_null(other);
    struct fx *f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n", site_w);
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->nclaimed, 0); /* its hash's worker: no claim needed */
    deliver_one_and_close(f->open[0]);
    dest_get(f->d, "a.test")->mx->expires = 0; /* its TTL ran out */
    submit("a.test", 1);
    submit("a.test", 1);
    assert_int_equal(f->resolves, 2);
    answer("a.test", DNS_OK, (const char *[]){other}, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->handed, 2);
    assert_int_equal(f->handed_to, 1 - site_w);
    assert_int_equal(f->nclaimed, 1);
    assert_int_equal(f->claimed_by[0], 1 - site_w);
    assert_int_equal(f->opened, 1);
    fx_free(f);
}

/* A site with SITE_BUSY_CONNS connections on this worker is marked
 * busy: the domains met after it stay on their hash's worker (a large
 * provider's MX hosts are sent to from every worker); those gathered
 * before it stay gathered. One that fills its address's cap is not: the
 * cap is the node's, and it has all of it on this worker (before, each
 * of two workers had half, and a site gathered on one got 2 of 4). */
static void
affinity_not_for_a_busy_site(void **state)
{
    (void)state;
    unsigned site_w = worker_of_host(MX1[0]);
    struct fx *f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n"
                                  "max_connections_per_address = 4\ninitial_connections = 8\n",
                                  site_w);
    for (int i = 0; i < 6; i++)
        submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 4); /* the whole cap, on one worker */
    assert_string_equal(f->busy_host, "");
    fx_free(f);

    /* no cap per address: its SITE_BUSY_CONNS-th connection here */
    f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n"
                       "max_connections_per_address = 0\ninitial_connections = 30\n"
                       "[domain *]\nmax_connections = 30\n",
                       site_w);
    for (int i = 0; i < SITE_BUSY_CONNS - 2; i++)
        submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, SITE_BUSY_CONNS - 2);
    assert_string_equal(f->busy_host, "");
    submit("a.test", 1);
    assert_int_equal(f->opened, SITE_BUSY_CONNS - 1);
    assert_string_equal(f->busy_host, "");
    submit("a.test", 1);
    assert_int_equal(f->opened, SITE_BUSY_CONNS);
    assert_string_equal(f->busy_host, MX1[0]);
    fx_free(f);

    f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n", 1 - site_w);
    snprintf(f->busy_host, sizeof(f->busy_host), "%s", MX1[0]);
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->nclaimed, 0);
    assert_int_equal(f->handed, 0);
    assert_int_equal(f->opened, 1); /* sent from here */
    fx_free(f);
}

/* An idle domain forgotten on its site's worker empties its claim: its
 * next mail starts where its name hashes, and asks again. (Moved here:
 * claimed for this worker.) */
static void
affinity_claim_goes_with_the_idle_domain(void **state)
{
    (void)state;
    unsigned site_w = worker_of_host(MX1[0]);
    struct fx *f = fx_two_workers("[delivery]\nallow_networks = 127.0.0.0/8\n"
                                  "destination_idle_ttl = 1s\n",
                                  site_w);
    sched_start(f->d);
    assert_true(t_claim(f->d, "a.test", site_w, NULL));
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->handed, 0);
    assert_int_equal(f->nclaimed, 1);
    deliver_one_and_close(f->open[0]);
    f->w.now += MS_TO_NS(7000); /* past the ttl and a sweep */
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->d->evicted, 1);
    assert_int_equal(f->nclaimed, 0);
    fx_free(f);
}

/* A job's domain lives in its own allocation (outbound/internal.h):
 * lowercased and cut to 255 octets when made, and a copy's survives
 * the original (its memory overwritten and freed first). */
static void
job_copy_has_a_domain_of_its_own(void **state)
{
    (void)state;
    struct job *j = job_new("Mixed.Case.TEST", 4);
    assert_non_null(j);
    assert_string_equal(j->domain, "mixed.case.test");
    assert_int_equal(j->n, 0);
    j->id = 7;
    j->n = 4;
    for (unsigned i = 0; i < 4; i++)
        j->idx[i] = 10 + i;
    struct job *c = job_copy(j, 1);
    assert_non_null(c);
    assert_ptr_not_equal(c->domain, j->domain);
    /* (its allocation ends at idx's end, not sizeof: job_new) */
    memset(j, 0xA5,
           offsetof(struct job, idx) + 4 * sizeof(unsigned) + strlen("mixed.case.test") + 1);
    free(j);
    assert_string_equal(c->domain, "mixed.case.test");
    assert_int_equal(c->id, 7);
    assert_int_equal(c->n, 4); /* the caller's to set */
    c->idx[0] = 13;
    assert_string_equal(c->domain, "mixed.case.test"); /* idx[cap] ends before it */
    free(c);

    char longname[400];
    memset(longname, 'a', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    struct job *l = job_new(longname, 1);
    assert_non_null(l);
    assert_int_equal(strlen(l->domain), 255);
    free(l);
}

/* ---- an answer that expires while its connections are open ---- */

/* a.test answered mx1 (192.0.2.1), its one connection in a transaction,
 * then its answer's TTL runs out and another job comes: returns the
 * connection. */
static struct conn *
busy_then_expired(struct fx *f)
{
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c0 = f->open[0];
    enum sched_next what;
    conn_ready(c0, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    dest_get(f->d, "a.test")->mx->expires = f->w.now; /* its TTL ran out */
    submit("a.test", 1);
    return c0;
}

/* A busy destination (a connection always open: a large provider's
 * domain on a bulk relay) whose answer expires asks again at once, the
 * connection staying, and its mail waits for nothing meanwhile. A new
 * answer naming another host takes the next new connection there; the
 * old connection ends its transaction normally and gets no more of the
 * domain's mail. Before, the answer was asked again only once no
 * connection was open: a busy domain kept it past its TTL for good, its
 * mail going to the old host after an MX move. */
static void
mx_refresh_while_busy_follows_new_hosts(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n");
    struct conn *c0 = busy_then_expired(f);
    struct dest *t = dest_get(f->d, "a.test");
    struct site *old_site = t->site;
    assert_int_equal(f->resolves, 2); /* asked again, c0 open */
    assert_string_equal(f->resolved[1], "a.test");
    assert_non_null(t->req);
    assert_int_equal(f->nopen, 1);
    assert_int_equal(f->quits, 0);
    assert_string_equal(t->mx->hosts[0].name, MX1[0]); /* the old one serves meanwhile */
    submit("a.test", 1);
    assert_int_equal(f->resolves, 2); /* one refresh at a time */
    static const uint8_t A9[][16] = {{192, 0, 2, 9}};
    answer("a.test", DNS_OK, (const char *[]){"mx9.new.test"}, (unsigned[]){10}, A9, 1);
    assert_ptr_not_equal(t->site, old_site);
    assert_int_equal(f->opened, 2);
    assert_string_equal(f->opened_to[1], "mx9.new.test 192.0.2.9:25");
    assert_int_equal(dest_queued(t), 2);
    /* c0's transaction ends as it would have; then it says goodbye */
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    enum sched_next what;
    conn_ready(c0, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT);
    assert_string_equal(c0->quit_why, "mx_changed");
    assert_null(c0->job);
    assert_int_equal(dest_queued(t), 2);
    conn_ready(f->open[1], &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_int_equal(dest_queued(t), 1);
    conn_gone(c0, NULL);
    assert_int_equal(t->conns, 1);
    assert_int_equal(f->failed, 0);
    fx_free(f);
}

/* A refresh that names the same hosts changes nothing but the expiry:
 * the same site, no new connection, the open one carries on. */
static void
mx_refresh_same_hosts_changes_nothing(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n");
    struct conn *c0 = busy_then_expired(f);
    struct dest *t = dest_get(f->d, "a.test");
    struct site *site = t->site;
    const struct dns_mx_result *old = t->mx;
    assert_int_equal(f->resolves, 2);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_ptr_not_equal(t->mx, old);
    assert_true(t->mx->expires > f->w.now);
    assert_ptr_equal(t->site, site);
    assert_ptr_equal(t->site_for, t->mx);
    assert_ptr_equal(t->targets_for, t->mx);
    assert_int_equal(f->opened, 1);
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    enum sched_next what;
    conn_ready(c0, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    submit("a.test", 1);
    assert_int_equal(f->resolves, 2); /* not expired now */
    fx_free(f);
}

/* A refresh that fails (SERVFAIL, timeout) keeps the old answer: the
 * mail goes on to the old host, nothing is deferred, and it is asked
 * again after POLICY_MX_REFRESH_RETRY_MS, not at every run. An NXDOMAIN
 * then is an answer: the waiting mail fails as a fresh lookup's would,
 * and the connection gets none of it. */
static void
mx_refresh_failure_keeps_the_old_answer(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n");
    struct conn *c0 = busy_then_expired(f);
    struct dest *t = dest_get(f->d, "a.test");
    const struct dns_mx_result *old = t->mx;
    assert_int_equal(f->resolves, 2);
    answer("a.test", DNS_RETRY, NULL, NULL, NULL, 0);
    assert_ptr_equal(t->mx, old);
    assert_int_equal(f->failed, 0);
    assert_int_equal(dest_queued(t), 1);
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    enum sched_next what;
    conn_ready(c0, &what);
    assert_int_equal(what, SCHED_NEXT_JOB); /* to the old host still */
    assert_int_equal(dest_queued(t), 0);
    submit("a.test", 1);
    assert_int_equal(f->resolves, 2); /* not before the retry interval */
    f->w.now += MS_TO_NS(POLICY_MX_REFRESH_RETRY_MS);
    submit("a.test", 1);
    assert_int_equal(f->resolves, 3);
    answer("a.test", DNS_NOT_FOUND, NULL, NULL, NULL, 0);
    assert_int_equal(f->failed, 2); /* the two waiting: bounced */
    assert_int_equal(f->last_fail.status, SMTP_STATUS_PERMFAIL);
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c0, &what);
    assert_int_not_equal(what, SCHED_NEXT_JOB);
    fx_free(f);
}

/* One site whose address takes one connection (max_connections_per_address
 * = 1): big.test's backlog holds it, and small.test's one message comes
 * behind it, starting level with big.test's turns. big.test's next
 * transaction goes first (its mail is older), then small.test's, however
 * little time passes, and big.test gets the connection back after it
 * (before 2026-12-04, small.test waited for big.test's whole queue; until
 * 2026-12-07, for SITE_TURN_MS). */
static void
site_turns_share_one_connection(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    for (unsigned i = 0; i < 20; i++)
        submit("big.test", 1);
    answer("big.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    struct dest *big = dest_get(f->d, "big.test");
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    submit("small.test", 1);
    answer("small.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *small = dest_get(f->d, "small.test");
    assert_ptr_equal(small->site, big->site);
    assert_int_equal(f->opened, 1); /* the address is full: small.test waits */
    assert_true(small->want.on);

    /* big.test's next transaction: as many turns, older mail. */
    f->w.now += MS_TO_NS(1);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_ptr_equal(c->dest, big);
    /* big.test has had one turn more: small.test's, and big.test waits in line. */
    f->w.now += MS_TO_NS(1);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_ptr_equal(c->dest, small);
    assert_int_equal(big->conns, 0);
    assert_int_equal(small->conns, 1);
    assert_true(big->want.on);
    assert_int_equal(f->d->stats.site_turns, 1);
    /* small.test's one message sent: back to big.test's backlog. */
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_ptr_equal(c->dest, big);
    assert_int_equal(dest_queued(big), 17);
    /* Alone with mail: no turn to give, however long. */
    f->w.now += MS_TO_NS(10 * SITE_TURN_MS);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_ptr_equal(c->dest, big);
    assert_int_equal(f->d->stats.site_turns, 1);
    assert_int_equal(f->opened, 1);
    fx_free(f);
}

/* Two domains of one site whose mail comes in turn, one connection
 * (max_connections_per_address = 1): the connection carries the mail in
 * the order it came, a turn after each transaction, without waiting
 * SITE_TURN_MS for it (before, a.test kept the connection for 100 ms, so
 * each domain's mail went in bursts, out of the order of the spool's
 * keys, and a commit's removals fell on many more pages). A domain
 * whose next message is newer than the carrying domain's waits, as in
 * site_turns_share_one_connection. */
static void
site_turns_follow_the_age_of_the_mail(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    uint64_t first = c->job->id;
    /* b a b a b, then two more of a.test's */
    for (unsigned i = 0; i < 5; i++)
        submit(i % 2 == 0 ? "b.test" : "a.test", 1);
    submit("a.test", 1);
    submit("a.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *a = dest_get(f->d, "a.test");
    struct dest *b = dest_get(f->d, "b.test");
    assert_ptr_equal(a->site, b->site);
    assert_int_equal(f->opened, 1); /* the address is full: b.test waits */
    assert_true(b->want.on);
    for (unsigned i = 1; i <= 7; i++) {
        f->w.now += MS_TO_NS(1); /* far less than SITE_TURN_MS */
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
        assert_int_equal(c->job->id, first + i); /* in the order it came */
        assert_ptr_equal(c->dest, i == 7 || i % 2 == 0 ? a : b);
    }
    /* five turns, a.test to b.test and back, then b.test had nothing
     * left: a.test's last two */
    assert_int_equal(f->d->stats.site_turns, 5);
    assert_int_equal(f->opened, 1);
    fx_free(f);
}

/* Whether site's line is in the order of turn tags, then of the age of
 * each one's next mail (none: last among its tag). */
static bool
line_in_order(const struct site *site)
{
    uint64_t tag = 0, id = 0;
    for (const struct lru_node *x = site->want.oldest; x != NULL; x = x->next) {
        const struct dest *y = (const struct dest *)((const char *)x - offsetof(struct dest, want));
        const struct job *j = job_of(fairq_peek(&y->q));
        uint64_t yid = j != NULL ? j->id : UINT64_MAX;
        if (y->turn_tag < tag || (y->turn_tag == tag && yid < id))
            return false;
        tag = y->turn_tag;
        id = yid;
    }
    return true;
}

/* n domains of one site, their mail in no order, one connection,
 * transactions of 10 ms and every seventh of 150; of the msgs messages,
 * the last late come one after each transaction, to a domain in no
 * order, some of them to a domain whose queue had emptied and whose tag
 * the site's clock had passed (it starts at the clock: counted, and
 * there must be some). After each transaction, the site's line is in
 * the order of its turn tags, then of the age of each one's next mail
 * (conn_give_turn takes from its front), and every message goes. */
static void
line_order_run(unsigned n, unsigned msgs, unsigned late)
{
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    char name[32];
    submit("d0.test", 1);
    answer("d0.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    uint32_t lcg = 1; /* the domains in a fixed pseudo-random order: runs of one, gaps */
    for (unsigned i = 1; i < msgs - late; i++) {
        lcg = lcg * 1103515245u + 12345u;
        snprintf(name, sizeof(name), "d%u.test", i < n ? i : (lcg >> 16) % n);
        submit(name, 1);
    }
    for (unsigned i = 1; i < n; i++) {
        snprintf(name, sizeof(name), "d%u.test", i);
        answer(name, DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    }
    struct site *site = dest_get(f->d, "d0.test")->site;
    unsigned sent = 1, turns_seen = 0, longest = 0, joins = 0;
    for (unsigned step = 0; step + 1 < msgs; step++) {
        f->w.now += MS_TO_NS(step % 7 == 6 ? 150 : 10);
        if (step < late) {
            lcg = lcg * 1103515245u + 12345u;
            snprintf(name, sizeof(name), "d%u.test", (lcg >> 16) % n);
            const struct dest *y = dest_get(f->d, name);
            joins += dest_queued(y) == 0 && y->turn_tag < site->turn_clock;
            submit(name, 1);
            assert_true(y->turn_tag >= site->turn_clock || dest_queued(y) > 1);
        }
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
        sent++;
        assert_true(line_in_order(site));
        longest = site->want.n > longest ? (unsigned)site->want.n : longest;
        turns_seen = (unsigned)f->d->stats.site_turns;
    }
    assert_int_equal(sent, msgs);
    assert_true(longest >= n / 2);
    assert_true(turns_seen > 10);
    assert_true(late == 0 || joins > 0);
    fx_free(f);
}

static void
site_line_stays_in_the_order_of_turns(void **state)
{
    (void)state;
    line_order_run(6, 60, 0);
}

/* More domains than a domain going back in line walks past from either
 * end (SITE_TURN_LOOK): the line stays in order all the same. */
static void
site_line_stays_in_order_past_the_look(void **state)
{
    (void)state;
    assert_true(SITE_TURN_LOOK < 40 && 40 < 2 * SITE_TURN_LOOK);
    line_order_run(40, 400, 0);
}

/* Mail that comes while the line runs, some to domains whose queues had
 * emptied behind the site's clock (they start at it): the line stays in
 * order. (In these runs no such domain is still in line when its mail
 * comes: site_turn_join_places_a_domain_in_line_anew has that case.) */
static void
site_line_stays_in_order_with_mail_coming(void **state)
{
    (void)state;
    line_order_run(40, 300, 200);
}

/* t.test takes one of big.test's two connections (two fewer) and stays in
 * line for more; that connection sends both of its messages, and t.test
 * waits in line with nothing queued while big.test's other connection
 * moves the site's clock on. Mail for t.test then: it starts at the
 * clock, and goes to its place in line for that tag (a review found it
 * left where it was, the line out of order: the line's front is what
 * want_pop, site_wake and the turn owed two connections fewer take). */
static void
site_turn_join_places_a_domain_in_line_anew(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 2\nmax_connections_per_address = 2\n"
                          "[domain *]\nmax_connections = 10\n");
    for (unsigned i = 0; i < 40; i++)
        submit("big.test", 1);
    answer("big.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 2);
    struct conn *c0 = f->open[0], *c1 = f->open[1];
    struct dest *big = dest_get(f->d, "big.test");
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c0, &what);
    conn_ready(c1, &what);
    submit("t.test", 1);
    submit("t.test", 1);
    answer("t.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *t = dest_get(f->d, "t.test");
    assert_true(t->want.on);
    /* c0: t.test's two messages */
    f->w.now += MS_TO_NS(1);
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c0, &what);
    assert_ptr_equal(c0->dest, t);
    f->w.now += MS_TO_NS(1);
    assert_false(txn_done(c0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c0, &what);
    assert_ptr_equal(c0->dest, t);
    assert_int_equal(dest_queued(t), 0);
    assert_true(t->want.on); /* in line, nothing queued, while c0 carries it */
    /* c1: big.test's, the clock past t.test's tag */
    for (unsigned i = 0; i < 6; i++) {
        f->w.now += MS_TO_NS(1);
        assert_false(
            txn_done(c1, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c1, &what);
        assert_ptr_equal(c1->dest, big);
    }
    assert_true(t->turn_tag < t->site->turn_clock);
    assert_true(t->want.on);
    submit("t.test", 1);
    assert_int_equal(t->turn_tag, t->site->turn_clock);
    assert_true(line_in_order(t->site));
    fx_free(f);
}

/* Forty domains of one site suspended while they wait in line, as many
 * turns had as small.test and older mail: small.test still gets big.test's
 * connection after big.test's next transactions. A turn takes a domain
 * that may not send now (suspended, held, held by its rate) off the
 * line, as conn_take does: left there, its tag (which only its turns
 * move) kept it at the front, and a front of such kept every domain
 * behind them from a turn (the first build of the turns by tag: a review
 * found small.test waiting for big.test's whole backlog). */
static void
site_turn_passes_a_front_of_suspended_domains(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 1\n");
    for (unsigned i = 0; i < 300; i++)
        submit("big.test", 1);
    answer("big.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    struct dest *big = dest_get(f->d, "big.test");
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    char name[32];
    for (unsigned i = 0; i < 40; i++) {
        snprintf(name, sizeof(name), "d%u.test", i);
        submit(name, 1);
        answer(name, DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    }
    for (unsigned i = 0; i < 40; i++) {
        snprintf(name, sizeof(name), "d%u.test", i);
        assert_true(dest_get(f->d, name)->want.on);
        assert_int_equal(delivery_suspend(f->d, name, true), 0);
    }
    submit("small.test", 1);
    answer("small.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *small = dest_get(f->d, "small.test");
    assert_true(small->want.on);
    unsigned k = txns_until(c, big, small, 4);
    assert_ptr_equal(c->dest, small);
    assert_true(k <= 2);
    fx_free(f);
}

/* Forty domains of one site that the connection may not carry (they
 * require TLS, it was opened without) wait at the front of the line,
 * with older mail than small.test's: small.test still gets big.test's
 * connection after big.test's next transactions. Those keep their place
 * for a connection that may carry them, but a turn does not count them
 * among the SITE_TURN_LOOK it looks at (a review found small.test
 * waiting behind big.test's backlog: their tags never move, so they
 * stayed at the front). */
static void
site_turn_passes_a_front_it_may_not_carry(void **state)
{
    (void)state;
    char conf[4096], name[32];
    int n = snprintf(conf, sizeof(conf),
                     "[delivery]\ninitial_connections = 1\nmax_connections_per_address = 1\n"
                     "[domain *]\nmax_connections = 1\n");
    for (unsigned i = 0; i < 40; i++)
        n += snprintf(conf + n, sizeof(conf) - (size_t)n, "[domain s%u.test]\ntls = required\n", i);
    assert_true(n > 0 && (size_t)n < sizeof(conf));
    struct fx *f = fx_new(conf);
    for (unsigned i = 0; i < 300; i++)
        submit("big.test", 1);
    answer("big.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    struct dest *big = dest_get(f->d, "big.test");
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    for (unsigned i = 0; i < 40; i++) {
        snprintf(name, sizeof(name), "s%u.test", i);
        submit(name, 1);
        answer(name, DNS_OK, MX1, (unsigned[]){10}, A1, 1);
        assert_true(dest_get(f->d, name)->want.on);
    }
    submit("small.test", 1);
    answer("small.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *small = dest_get(f->d, "small.test");
    assert_true(small->want.on);
    unsigned k = txns_until(c, big, small, 4);
    assert_ptr_equal(c->dest, small);
    assert_true(k <= 2);
    snprintf(name, sizeof(name), "s%u.test", 0);
    assert_true(dest_get(f->d, name)->want.on); /* still in line */
    fx_free(f);
}

/* A tenant suspended while b.test waits in line: its queue is emptied and
 * filled again at once with the jobs not parked (scope_park_all), which
 * is no mail after none. b.test keeps the turns it is owed, and its place
 * (a review found its tag raised to the site's clock: every domain of the
 * worker lost what it was owed at each suspension of a tenant). */
static void
site_turn_kept_across_a_tenant_suspended(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    for (unsigned i = 0; i < 20; i++)
        submit("big.test", 1);
    answer("big.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    for (unsigned i = 0; i < 5; i++) {
        f->w.now += MS_TO_NS(1);
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c, &what);
    }
    struct dest *big = dest_get(f->d, "big.test");
    submit("b.test", 1);
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *b = dest_get(f->d, "b.test");
    assert_true(b->want.on);
    /* b.test falls behind: its tag set back as if the site's clock had
     * run on without it (as a rate or a hold keeps a domain waiting) */
    b->turn_tag = big->turn_tag - 3;
    uint64_t tag = b->turn_tag;
    assert_int_equal(delivery_suspend_scope(f->d, DELIVERY_SCOPE_TENANT, "other", true, 0), 0);
    assert_int_equal(b->turn_tag, tag);
    assert_true(b->want.on);
    assert_int_equal(dest_queued(b), 2);
    fx_free(f);
}

/* m.test has had 30 of its site's turns (mx1's) when its answer moves it
 * to mx9's site, where y.test's backlog holds the one connection and has
 * had 3. m.test starts level with y.test there, its mail older: it gets
 * mx9's connection after y.test's transaction on the wire. (A review
 * found the 30 carried over: m.test would have waited for 28 of
 * y.test's.) */
static void
site_turn_of_a_moved_domain_starts_at_its_new_sites_clock(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    static const char *MX9[] = {"mx9.new.test"};
    static const uint8_t A9[][16] = {{192, 0, 2, 9}};
    for (unsigned i = 0; i < 40; i++)
        submit("m.test", 1);
    answer("m.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    for (unsigned i = 0; i < 40; i++)
        submit("y.test", 1);
    answer("y.test", DNS_OK, MX9, (unsigned[]){10}, A9, 1);
    assert_int_equal(f->opened, 2);
    struct conn *cm = f->open[0], *cy = f->open[1];
    struct dest *m = dest_get(f->d, "m.test"), *y = dest_get(f->d, "y.test");
    assert_ptr_not_equal(m->site, y->site);
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(cm, &what);
    conn_ready(cy, &what);
    for (unsigned i = 0; i < 29; i++) {
        f->w.now += MS_TO_NS(1);
        assert_false(
            txn_done(cm, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(cm, &what);
        if (i < 2) {
            assert_false(
                txn_done(cy, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
            conn_ready(cy, &what);
        }
    }
    assert_int_equal(m->turn_tag, 30);
    assert_int_equal(y->turn_tag, 3);
    /* m.test's answer runs out and names mx9 */
    m->mx->expires = f->w.now;
    submit("m.test", 1);
    answer("m.test", DNS_OK, MX9, (unsigned[]){10}, A9, 1);
    assert_ptr_equal(m->site, y->site);
    assert_true(m->turn_tag <= y->turn_tag);
    assert_false(txn_done(cm, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(cm, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT); /* mx_changed */
    conn_gone(cm, NULL);
    assert_int_equal(f->nopen, 1); /* mx9's address is full: m.test waits */
    assert_true(m->want.on);
    unsigned k = txns_until(cy, y, m, 30);
    assert_ptr_equal(cy->dest, m);
    assert_int_equal(k, 1);
    fx_free(f);
}

/* Fifty domains of one site whose mail came in turn (a message to each,
 * four times over: a campaign to the many domains one mailbox provider
 * hosts), four connections whose transactions end in no fixed order, 3
 * ms apart. Each transaction takes the oldest message not yet taken, as
 * one domain's would, however long the domains wait. Before, each had
 * waited past SITE_TURN_MS by its turn, so the turns went round in the
 * order they began to wait, and one given such a turn kept its
 * connection for SITE_TURN_MS: its messages in a burst, far apart in the
 * spool's keys (a commit's removals on as many pages). */
static void
site_many_domains_in_turn_go_in_the_order_they_came(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\nmax_connections_per_address = 4\n"
                          "[domain *]\nmax_connections = 10\n");
    char name[32];
    for (unsigned i = 0; i < 200; i++) {
        snprintf(name, sizeof(name), "d%u.test", i % 50);
        submit(name, 1);
        if (i < 50)
            answer(name, DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    }
    assert_int_equal(f->opened, 4); /* d0 to d3's, the rest in line */
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    uint64_t first = UINT64_MAX, taken = 0;
    for (unsigned i = 0; i < 4; i++) {
        conn_ready(f->open[i], &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
        first = f->open[i]->job->id < first ? f->open[i]->job->id : first;
    }
    for (unsigned i = 0; i < 4; i++)
        assert_true(f->open[i]->job->id < first + 4);
    taken = first + 3;
    uint32_t lcg = 7;
    for (unsigned n = 4; n < 200; n++) {
        lcg = lcg * 1103515245u + 12345u;
        struct conn *c = f->open[(lcg >> 16) % 4];
        f->w.now += MS_TO_NS(3);
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
        assert_int_equal(c->job->id, ++taken); /* the oldest not yet taken */
    }
    assert_int_equal(f->opened, 4);
    fx_free(f);
}

/* With [redis] a domain's connection leases are Redis's, and a turn by
 * tag each transaction would ask it for one each time: a.test keeps the
 * connection until b.test, one connection fewer, has waited
 * SITE_TURN_MS. (The url is set
 * on the loaded config: the limits here stay local, and the scheduler's
 * choice is what is checked.) */
static void
site_turns_by_tag_are_off_with_redis(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    char url[] = "redis://127.0.0.1:1";
    f->cfg->redis.url = url;
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    uint64_t first = c->job->id;
    submit("b.test", 1);
    submit("a.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *a = dest_get(f->d, "a.test");
    f->w.now += MS_TO_NS(1);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_ptr_equal(c->dest, a); /* b.test's older message waits its turn */
    assert_int_equal(c->job->id, first + 2);
    assert_int_equal(f->d->stats.site_turns, 0);
    f->cfg->redis.url = NULL; /* not the config's to free */
    fx_free(f);
}

/* More waiting domains (n) than a domain going back in line walks past
 * from its end (SITE_TURN_LOOK): a.test, which gives the connection to
 * b.test's older message, waits in line again before the n domains with
 * as many turns and newer mail (found from the front), not behind them,
 * where its older mail waited for every one. */
static void
giver_back_run(unsigned n)
{
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    uint64_t first = c->job->id;
    submit("b.test", 1);
    submit("a.test", 1);
    char name[32];
    for (unsigned i = 0; i < n; i++) {
        snprintf(name, sizeof(name), "d%u.test", i);
        submit(name, 1);
    }
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    for (unsigned i = 0; i < n; i++) {
        snprintf(name, sizeof(name), "d%u.test", i);
        answer(name, DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    }
    assert_int_equal(f->opened, 1);
    for (unsigned i = 1; i <= n + 2; i++) {
        f->w.now += MS_TO_NS(1);
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
        assert_int_equal(c->job->id, first + i); /* in the order it came */
    }
    assert_int_equal(f->d->stats.site_turns, 1); /* a.test to b.test; the rest had nothing left */
    fx_free(f);
}

static void
site_turn_puts_the_giver_back_by_the_age_of_its_mail(void **state)
{
    (void)state;
    assert_true(SITE_TURN_LOOK < 40);
    giver_back_run(40);
}

/* One more than the walk from the end passes: a.test's place is before
 * the one where that walk stopped, which the walk from the front must
 * compare (the first build of want_place did not, and put a.test one
 * place late: d0.test's message went before its older one). */
static void
site_turn_puts_the_giver_back_before_where_the_walk_stopped(void **state)
{
    (void)state;
    giver_back_run(SITE_TURN_LOOK + 1);
}

/* A turn moves the connection to small.test, whose max_connection_rate
 * is one an hour: the move opens no connection at the receiver, so it
 * takes no token of that rate. Before, the first turn took the hour's
 * token and the second could not move the connection (small.test's mail
 * waited behind big.test's backlog for the hour). */
static void
site_turn_takes_no_connection_rate_token(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n"
                          "[domain small.test]\nmax_connection_rate = 1/h\n");
    for (unsigned i = 0; i < 20; i++)
        submit("big.test", 1);
    answer("big.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    struct dest *big = dest_get(f->d, "big.test");
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    for (unsigned round = 0; round < 3; round++) {
        submit("small.test", 1);
        if (round == 0)
            answer("small.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
        struct dest *small = dest_get(f->d, "small.test");
        assert_true(small->want.on); /* the address is full */
        /* its turn, every time: after big.test's transaction on the
         * wire and one more (as many turns as small.test, older mail) */
        for (unsigned k = 0; k < 2; k++) {
            assert_ptr_equal(c->dest, big);
            f->w.now += MS_TO_NS(1);
            assert_false(
                txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
            conn_ready(c, &what);
            assert_int_equal(what, SCHED_NEXT_JOB);
        }
        assert_ptr_equal(c->dest, small);
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
        assert_ptr_equal(c->dest, big);
    }
    assert_int_equal(f->d->stats.site_turns, 3);
    assert_int_equal(f->opened, 1);
    /* Its token of the hour is still there for a connection of its own. */
    struct dest *small = dest_get(f->d, "small.test");
    uint64_t retry;
    assert_true(limits_conn_acquire(f->d->lim, &small->lim, f->w.now, &retry));
    limits_conn_release(f->d->lim, &small->lim);
    fx_free(f);
}

/* c's domain a has two messages queued, every key of c 1/h: refusing's
 * token is spent half an hour before a's first transaction, which
 * refusing refuses; an hour on, refusing has its token again and its
 * timer hands a's transaction to c at once, the other keys' tokens given
 * back at the refusal. (Every key idle for two hours first: a clock
 * starting under an hour would be read as a token taken at 0.) */
static void
refused_then_an_hour_on(struct fx *f, struct conn *c, struct dest *a, struct limit_key *refusing)
{
    f->w.now += MS_TO_NS(2 * 60 * 60 * 1000ULL);
    uint64_t r, start = f->w.now;
    assert_int_equal(limits_take_msgs(f->d->lim, refusing, 1, f->w.now, &r), 1);
    f->w.now += MS_TO_NS(30 * 60 * 1000ULL);
    enum sched_next what;
    conn_ready(c, &what);
    assert_int_not_equal(what, SCHED_NEXT_JOB); /* refusing's token is spent */
    assert_int_equal(dest_queued(a), 2);
    unsigned before = f->resumed;
    f->w.now = start + MS_TO_NS(60 * 60 * 1000ULL);
    timer_run(&f->w.timers, f->w.now, NULL);
    assert_int_equal(f->resumed, before + 1);
    assert_non_null(c->job);
    assert_ptr_equal(c->dest, a);
    assert_int_equal(dest_queued(a), 1);
}

/* A domain with a message rate behind an [mx] section with one: when the
 * [mx] key refuses a transaction, the token the domain's key gave for it
 * goes back (limits_give_msgs). Here both are 1/h, the [mx] key's token
 * spent half an hour before the domain's first transaction: the [mx]
 * key refuses it. When the [mx] key has its token again, an hour on, the
 * domain still has the one it had: its transaction goes then. Before,
 * its token was spent on the refusal and it waited another half hour;
 * two rates whose refusals took turns like that starved a domain. */
static void
mx_refusal_gives_the_domains_token_back(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 1\n"
                          "[domain a.test]\nmax_message_rate = 1/h\n"
                          "[mx *.hoster.test]\nmax_message_rate = 1/h\n");
    submit("a.test", 1);
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    struct dest *a = dest_get(f->d, "a.test");
    assert_non_null(c->mxk);
    refused_then_an_hour_on(f, c, a, &c->mxk->lim);
    fx_free(f);
}

/* Likewise for a [source] key that refuses: the tokens the domain's key
 * and the [mx] key gave go back, both. The source's token is spent half
 * an hour before the transaction; an hour on, all three keys have one
 * and the transaction goes. Before, the domain and the [mx] key had
 * spent theirs on the refusal and held it another half hour. */
static void
source_refusal_gives_the_domain_and_mx_tokens_back(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\nallow_networks = 127.0.0.0/8\ninitial_connections = 1\n"
                          "[domain *]\nmax_connections = 1\n"
                          "[domain a.test]\nmax_message_rate = 1/h\n"
                          "[mx *.hoster.test]\nmax_message_rate = 1/h\n"
                          "[source 198.51.100.2]\nmax_message_rate = 1/h\n"
                          "[pool bulk]\nsources = 198.51.100.2\n");
    submit_pool("a.test", 1, "bulk");
    submit_pool("a.test", 1, "bulk");
    answer_pool("a.test", "bulk", MX1, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    struct dest *a = c->dest;
    assert_non_null(c->mxk);
    assert_non_null(c->srck);
    refused_then_an_hour_on(f, c, a, &c->srck->lim);
    fx_free(f);
}

/* An [mx] cap that is full refuses a domain's new connection before the
 * domain's own connection-rate token is taken. Before, b.test (one
 * connection an hour) spent its token when it found the cap full, and
 * when a.test's connection ended it waited out the hour. */
static void
full_mx_cap_takes_no_connection_rate_token(void **state)
{
    (void)state;
    struct fx *f = fx_new("[domain *]\nmax_connections = 10\n"
                          "[domain b.test]\nmax_connection_rate = 1/h\n"
                          "[mx *.hoster.test]\nmax_connections = 1\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1 + 1, (unsigned[]){10}, A1 + 1, 1);
    struct dest *b = dest_get(f->d, "b.test");
    assert_ptr_not_equal(b->site, dest_get(f->d, "a.test")->site);
    assert_int_equal(f->opened, 1); /* the [mx] cap is full: b.test waits */
    /* a.test's connection delivers, and gives the cap's slot back */
    struct conn *x = f->open[0];
    enum sched_next what;
    conn_ready(x, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(x, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(x, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT);
    conn_gone(x, NULL);
    /* b.test opens at once, its token of the hour still there */
    assert_int_equal(f->opened, 2);
    assert_int_equal(b->conns, 1);
    fx_free(f);
}

/* The reverse: b.test's own connection rate refuses it (its token of the
 * hour spent) while the [mx] cap is full. It waits on its own timer, not
 * for the cap's slot, so a.test's connection with nothing more to send
 * goes idle rather than quitting (limit_wanted) for a domain that could
 * not take the slot. */
static void
rate_refused_domain_does_not_take_the_mx_caps_slot(void **state)
{
    (void)state;
    struct fx *f = fx_new("[domain *]\nmax_connections = 10\n"
                          "[domain b.test]\nmax_connection_rate = 1/h\n"
                          "[mx *.hoster.test]\nmax_connections = 1\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    submit("b.test", 1);
    struct dest *b = dest_get(f->d, "b.test");
    uint64_t retry;
    assert_true(limits_conn_acquire(f->d->lim, &b->lim, f->w.now, &retry));
    limits_conn_release(f->d->lim, &b->lim); /* its token of the hour: spent */
    answer("b.test", DNS_OK, MX1 + 1, (unsigned[]){10}, A1 + 1, 1);
    assert_int_equal(f->opened, 1);
    assert_false(b->mx_waiting);
    struct conn *x = f->open[0];
    enum sched_next what;
    conn_ready(x, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(x, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(x, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    fx_free(f);
}

/* Two backlogs at a site of one connection, transactions of 10 ms: each
 * domain gets half the transactions, the connection going back and forth
 * after each (turn tags level, the older mail first). Once, the domain
 * given a turn was handed back after one transaction (the other's place
 * in line dated from when it had taken the connection): 1 in 10. */
static void
site_turns_between_two_backlogs_are_even(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    for (unsigned i = 0; i < 200; i++)
        submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    for (unsigned i = 0; i < 200; i++)
        submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *a = dest_get(f->d, "a.test"), *b = dest_get(f->d, "b.test");
    unsigned na = 0, nb = 0;
    for (unsigned i = 0; i < 100; i++) {
        f->w.now += MS_TO_NS(10);
        na += c->dest == a;
        nb += c->dest == b;
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c, &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
    }
    assert_int_equal(na + nb, 100);
    assert_true(na >= 48 && nb >= 48);
    assert_int_equal(f->opened, 1);
    fx_free(f);
}

/* A waiting domain the connection may not carry (tls = required: the
 * connection was opened under big.test's optional TLS) is passed over
 * where it waits: it keeps its place on the site's list, for a
 * connection that may carry it (before, it was taken off the list and
 * set aside for a second after every transaction). */
static void
site_turn_passes_over_a_domain_it_may_not_carry(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n[domain strict.test]\ntls = required\n");
    for (unsigned i = 0; i < 20; i++)
        submit("big.test", 1);
    answer("big.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    submit("strict.test", 1);
    answer("strict.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *big = dest_get(f->d, "big.test"), *strict = dest_get(f->d, "strict.test");
    assert_ptr_equal(strict->site, big->site);
    assert_true(strict->want.on);
    f->w.now += MS_TO_NS(2 * SITE_TURN_MS);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_ptr_equal(c->dest, big);
    assert_true(strict->want.on); /* still in line */
    assert_int_equal(f->d->stats.site_turns, 0);
    fx_free(f);
}

/* big.test holds the site's four connections (the address's cap) with a
 * backlog; b.test, also with a backlog, comes behind it. The connections
 * are shared out at once, two each, as they finish their transactions,
 * and then stay where they are (no back and forth: neither holds more
 * than the other); a domain that waits with none gets one at once. */
static void
site_turns_even_out_connections(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 4\nmax_connections_per_address = 4\n"
                          "[domain *]\nmax_connections = 10\n");
    for (unsigned i = 0; i < 40; i++)
        submit("big.test", 1);
    answer("big.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 4);
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    for (unsigned i = 0; i < 4; i++)
        conn_ready(f->open[i], &what);
    for (unsigned i = 0; i < 40; i++)
        submit("b.test", 1);
    answer("b.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *big = dest_get(f->d, "big.test"), *b = dest_get(f->d, "b.test");
    assert_int_equal(f->opened, 4);
    assert_int_equal(big->conns, 4);
    assert_true(b->want.on);
    /* Three rounds of transactions, no time passing. */
    for (unsigned round = 0; round < 3; round++)
        for (unsigned i = 0; i < 4; i++) {
            struct conn *c = f->open[i];
            assert_false(
                txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
            conn_ready(c, &what);
            assert_int_equal(what, SCHED_NEXT_JOB);
        }
    assert_int_equal(big->conns, 2);
    assert_int_equal(b->conns, 2);
    assert_int_equal(f->d->stats.site_turns, 2);
    /* A third domain with one message: none of the four, two fewer than
     * either: the next transaction to end gives it its turn at once. */
    submit("c.test", 1);
    answer("c.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    struct dest *c3 = dest_get(f->d, "c.test");
    assert_true(c3->want.on);
    struct conn *c = f->open[0];
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_ptr_equal(c->dest, c3);
    assert_int_equal(f->d->stats.site_turns, 3);
    assert_int_equal(f->opened, 4);
    fx_free(f);
}

/* An [mx] section with rollup = yes: a.test and b.test each have an MX
 * host name of their own under *.prot.test (as Microsoft 365 gives each
 * domain), on the same server. They share one site, keyed by the
 * pattern, and a connection opened for a.test carries b.test's mail;
 * c.test, under *.other.test (no rollup), has a site of its own. */
static void
rollup_shares_a_site_across_host_names(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\n[domain *]\nmax_connections = 10\n"
                          "[mx *.prot.test]\nrollup = yes\n");
    static const char *HA[] = {"a-test.prot.test"}, *HB[] = {"b-test.prot.test"},
                      *HC[] = {"c-test.other.test"};
    submit("a.test", 1);
    answer("a.test", DNS_OK, HA, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    struct dest *a = dest_get(f->d, "a.test");
    assert_string_equal(a->site->key, "*.prot.test:25");
    submit("b.test", 1);
    submit("b.test", 1);
    answer("b.test", DNS_OK, HB, (unsigned[]){10}, A1, 1);
    struct dest *b = dest_get(f->d, "b.test");
    assert_ptr_equal(a->site, b->site);
    assert_int_equal(f->opened, 1); /* the site's window is full: b waits */
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_ptr_equal(c->dest, b); /* to a-test.prot.test, with b.test's mail */
    assert_string_equal(c->mx, "a-test.prot.test");
    submit("c.test", 1);
    answer("c.test", DNS_OK, HC, (unsigned[]){10}, A1, 1);
    struct dest *cd = dest_get(f->d, "c.test");
    assert_ptr_not_equal(cd->site, a->site);
    assert_string_equal(cd->site->key, "c-test.other.test:25");
    /* d.test's host under the pattern has validated TLSA records, e.test's
     * TLSA lookup failed: neither is rolled up (a site of its own), so
     * their mail never rides a connection to another host (it would go
     * without DANE). */
    static const struct {
        const char *domain, *host;
        enum dns_dane dane;
    } kept[] = {{"d.test", "d-test.prot.test", DNS_DANE_SECURE},
                {"e.test", "e-test.prot.test", DNS_DANE_TEMPFAIL}};
    struct dest *dd = NULL;
    for (unsigned i = 0; i < 2; i++) {
        submit(kept[i].domain, 1);
        struct result_host rh = {.name = kept[i].host, .preference = 10, .n4 = 1, .a4 = &A1[0],
                                 .dane = kept[i].dane};
        struct dns_mx_result *r = result_new(DNS_OK, NULL, kept[i].domain, &rh, 1, false);
        assert_non_null(r);
        r->expires = UINT64_MAX;
        dd = dest_get(f->d, kept[i].domain);
        dest_on_mx(dd, r);
        assert_ptr_not_equal(dd->site, a->site);
        char key[64];
        snprintf(key, sizeof(key), "%s:25", kept[i].host);
        assert_string_equal(dd->site->key, key);
    }
    dd = dest_get(f->d, "d.test");
    for (int i = 0; i < 2; i++) { /* b.test's two */
        assert_ptr_equal(c->dest, b);
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        conn_ready(c, &what);
    }
    assert_ptr_not_equal(c->dest, dd);
    assert_int_equal(dest_queued(dd), 1);
    fx_free(f);
}

/* Two domains with an MX host name each on one address (two sites, as
 * Microsoft 365 names a host per domain), its cap one connection:
 * b.test finds the address full and waits. When a.test's connection
 * closes, b.test opens at once (addr_wake); before, only the closing
 * connection's own site was woken, and b.test waited for its timer
 * (HOLD_MIN_MS) with the slot empty. */
static void
address_slot_freed_wakes_another_site(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    static const char *HA[] = {"a-test.prot.test"}, *HB[] = {"b-test.prot.test"};
    submit("a.test", 1);
    answer("a.test", DNS_OK, HA, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *c = f->open[0];
    submit("b.test", 1);
    answer("b.test", DNS_OK, HB, (unsigned[]){10}, A1, 1);
    struct dest *a = dest_get(f->d, "a.test"), *b = dest_get(f->d, "b.test");
    assert_ptr_not_equal(a->site, b->site);
    assert_int_equal(f->opened, 1); /* the address is full: b.test waits */
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT); /* another site wants the slot */
    conn_gone(c, NULL);
    assert_int_equal(f->opened, 2); /* b.test's, with no timer run */
    assert_ptr_equal(f->open[0]->dest, b);
    fx_free(f);
}

/* The same two sites, but a.test's connection went idle before b.test
 * came: b.test finding the address full tells it to say goodbye then
 * (addr_idle_quit), rather than wait for its idle_timeout. */
static void
address_full_quits_another_sites_idle_connection(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    static const char *HA[] = {"a-test.prot.test"}, *HB[] = {"b-test.prot.test"};
    submit("a.test", 1);
    answer("a.test", DNS_OK, HA, (unsigned[]){10}, A1, 1);
    struct conn *c = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(c, &what);
    assert_false(txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(c, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    assert_ptr_equal(c->site->idle, c);
    f->w.now += MS_TO_NS(1);
    submit("b.test", 1);
    answer("b.test", DNS_OK, HB, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->quits, 1); /* a.test's idle one, for b.test */
    assert_ptr_equal(f->quit, c);
    assert_null(c->site->idle);
    assert_int_equal(f->opened, 1);
    conn_gone(c, NULL);
    assert_int_equal(f->opened, 2);
    assert_ptr_equal(f->open[0]->dest, dest_get(f->d, "b.test"));
    fx_free(f);
}

/* Four domains with an MX host name each on one address of two slots: a
 * and b hold them, c and e wait. a's connection, done, gives its slot to
 * c; b's, done, gives its slot to e too: the want stays while a domain of
 * the worker still waits. Before, c's take cleared it, b's connection
 * went idle holding the slot, and e waited for its one-second timer
 * (1,000 such domains ran at a fifth of one domain's rate). */
static void
address_wanted_until_every_waiting_domain_has_a_slot(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\nmax_connections_per_address = 2\n"
                          "[domain *]\nmax_connections = 10\n");
    static const char *HA[] = {"a-test.prot.test"}, *HB[] = {"b-test.prot.test"},
                      *HC[] = {"c-test.prot.test"}, *HE[] = {"e-test.prot.test"};
    submit("a.test", 1);
    answer("a.test", DNS_OK, HA, (unsigned[]){10}, A1, 1);
    submit("b.test", 1);
    answer("b.test", DNS_OK, HB, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 2);
    struct conn *ca = f->open[0], *cb = f->open[1];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(ca, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    conn_ready(cb, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    submit("c.test", 1);
    answer("c.test", DNS_OK, HC, (unsigned[]){10}, A1, 1);
    submit("e.test", 1);
    answer("e.test", DNS_OK, HE, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 2); /* the address is full: both wait */

    f->w.now += MS_TO_NS(1);
    assert_false(txn_done(ca, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(ca, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT);
    assert_string_equal(ca->quit_why, "address_wanted");
    conn_gone(ca, NULL);
    assert_int_equal(f->opened, 3);
    assert_string_equal(f->opened_to[2], "c-test.prot.test 192.0.2.1:25");

    assert_false(txn_done(cb, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(cb, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT); /* not idle: e.test waits */
    assert_string_equal(cb->quit_why, "address_wanted");
    conn_gone(cb, NULL);
    assert_int_equal(f->opened, 4);
    assert_string_equal(f->opened_to[3], "e-test.prot.test 192.0.2.1:25");
    fx_free(f);
}

/* Two sites under one [mx] cap of 4 (mx1 and mx2 match *.hoster.test).
 * a.test's site holds 2, b.test's 2 and b.test waits for a third. a's
 * connection with nothing more to send keeps its slot for a moment
 * (idle, idle_short: KEY_IDLE_GRACE_MS) rather than giving it at once: a
 * new message of a.test rides it. When b's site holds 3 and a's 1, b's
 * connection with nothing more gives its slot at once. Before, every
 * connection gave its slot as it went idle whenever a site waited: two
 * busy sites handed connections back and forth. */
static void
mx_cap_slots_shared_evenly_between_sites(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 3\n"
                          "[domain *]\nmax_connections = 10\n"
                          "[mx *.hoster.test]\nmax_connections = 4\n");
    submit("a.test", 1);
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 2);
    for (int i = 0; i < 3; i++)
        submit("b.test", 1);
    answer("b.test", DNS_OK, MX1 + 1, (unsigned[]){10}, A1 + 1, 1);
    struct dest *a = dest_get(f->d, "a.test"), *b = dest_get(f->d, "b.test");
    assert_int_equal(f->opened, 4); /* the cap: b.test's third waits */
    assert_true(b->mx_waiting);
    struct conn *a0 = f->open[0], *a1 = f->open[1];
    assert_ptr_equal(a0->dest, a);
    enum sched_next what;
    for (unsigned i = 0; i < f->nopen; i++) {
        conn_ready(f->open[i], &what);
        assert_int_equal(what, SCHED_NEXT_JOB);
    }
    /* a's connection, done, even shares (2 and 2): idle, for a moment */
    assert_false(txn_done(a0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(a0, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    assert_true(a0->idle_short);
    /* a new message of a.test rides it */
    submit("a.test", 1);
    assert_int_equal(a->inflight, 2);
    assert_int_equal(f->opened, 4);
    /* a's other connection ends: b's site takes the slot (3 and 1) */
    assert_false(txn_done(a1, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(a1, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    conn_gone(a1, NULL);
    assert_int_equal(f->opened, 5);
    assert_int_equal(b->conns, 3);
    conn_ready(f->open[f->nopen - 1], &what); /* b's third takes b's third message */
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_int_equal(dest_queued(b), 0);
    /* a.test wants a second again; b's connection done gives its slot */
    submit("a.test", 1);
    assert_true(a->mx_waiting);
    struct conn *b0 = NULL;
    for (unsigned i = 0; i < f->nopen && b0 == NULL; i++)
        if (f->open[i]->dest == b && f->open[i]->job != NULL)
            b0 = f->open[i];
    if (b0 == NULL) {
        fail_msg("no connection of b.test with a job");
        return; /* not reached; GCC -O3 saw a NULL b0 below (-Warray-bounds) */
    }
    assert_false(txn_done(b0, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(b0, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT);
    assert_string_equal(b0->quit_why, "limit_wanted");
    fx_free(f);
}

/* The want that stays after a take is for the address taken, and only
 * while a domain waits for that address: z.test waits for 192.0.2.2, w.test
 * takes the slot of 192.0.2.1, and w's connection, done, idles on it (no
 * one waits there). A want for z's site at 192.0.2.1 would have made it
 * quit for nothing, and, with two workers, kept slots for this worker
 * that no domain of it wanted. */
static void
address_want_stays_for_its_own_address_only(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 1\nmax_connections_per_address = 1\n"
                          "[domain *]\nmax_connections = 10\n");
    static const char *HX[] = {"x-test.prot.test"}, *HY[] = {"y-test.prot.test"},
                      *HZ[] = {"z-test.prot.test"}, *HW[] = {"w-test.prot.test"};
    submit("x.test", 1);
    answer("x.test", DNS_OK, HX, (unsigned[]){10}, A1, 1);
    submit("y.test", 1);
    answer("y.test", DNS_OK, HY, (unsigned[]){10}, A1 + 1, 1);
    submit("z.test", 1);
    answer("z.test", DNS_OK, HZ, (unsigned[]){10}, A1 + 1, 1);
    assert_int_equal(f->opened, 2); /* z.test waits for 192.0.2.2 */
    struct conn *cx = f->open[0];
    enum sched_next what;
    f->w.now += MS_TO_NS(1);
    conn_ready(cx, &what);
    assert_false(txn_done(cx, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(cx, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE); /* nobody waits for 192.0.2.1 */
    submit("w.test", 1);
    answer("w.test", DNS_OK, HW, (unsigned[]){10}, A1, 1);
    assert_ptr_equal(f->quit, cx); /* x's idle one goes for w.test */
    conn_gone(cx, NULL);
    assert_int_equal(f->opened, 3);
    struct conn *cw = f->open[f->nopen - 1];
    assert_ptr_equal(cw->dest, dest_get(f->d, "w.test"));
    conn_ready(cw, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(cw, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(cw, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE); /* z.test waits for the other address */
    fx_free(f);
}

/* b.test (site mx2) and a1..a<n> (site mx1, under the [mx] cap of 2
 * with it) have mail, b.test after the a's when b_last, else before
 * them; a's two connections carry the a's, then give their slot to
 * b.test at once. */
static void
waiter_behind_the_sites_own(bool b_last, int n)
{
    struct fx *f = fx_new("[delivery]\ninitial_connections = 20\n"
                          "[domain *]\nmax_connections = 20\n"
                          "[mx *.hoster.test]\nmax_connections = 2\n");
    char name[32];
    for (int i = 1; i <= 2; i++) {
        snprintf(name, sizeof(name), "a%d.test", i);
        submit(name, 1);
        answer(name, DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    }
    assert_int_equal(f->opened, 2);
    if (!b_last) {
        submit("b.test", 1);
        answer("b.test", DNS_OK, MX1 + 1, (unsigned[]){10}, A1 + 1, 1);
    }
    for (int i = 3; i <= n; i++) {
        snprintf(name, sizeof(name), "a%d.test", i);
        submit(name, 1);
        answer(name, DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    }
    if (b_last) {
        submit("b.test", 1);
        answer("b.test", DNS_OK, MX1 + 1, (unsigned[]){10}, A1 + 1, 1);
    }
    assert_int_equal(f->opened, 2);
    struct dest *b = dest_get(f->d, "b.test");
    assert_true(b->mx_waiting);
    /* a's two connections carry a1..a<n> (its own waiting domains ride them) */
    struct conn *c0 = f->open[0], *c1 = f->open[1];
    enum sched_next what = SCHED_NEXT_JOB;
    int sent = 0;
    for (int round = 0; round < 2 * n && what == SCHED_NEXT_JOB; round++) {
        struct conn *c = round % 2 ? c1 : c0;
        if (c->job == NULL) {
            conn_ready(c, &what);
            continue;
        }
        assert_false(
            txn_done(c, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
        sent++;
        conn_ready(c, &what);
    }
    assert_true(sent >= n - 1);
    assert_int_equal(what, SCHED_NEXT_QUIT); /* for b.test, at once */
    fx_free(f);
}

/* A domain of another site waiting for an [mx] cap's slot is seen behind
 * many of the holding site's own domains (the site's own ride its
 * connections): b.test waits behind a3..a20 on the list, whichever came
 * first (tried both ways).
 * When a's site has no more, its connection gives its slot to b.test,
 * which holds none, at once. Counted among the waiters looked at, a's
 * own domains hid b.test: the connection idled and b.test waited. */
static void
mx_cap_waiter_of_another_site_is_seen_behind_the_sites_own(void **state)
{
    (void)state;
    for (int b_last = 0; b_last < 2; b_last++)
        waiter_behind_the_sites_own(b_last, 20);
    /* more of the site's own than the waiters walked (KEY_WAIT_WALK) */
    waiter_behind_the_sites_own(true, 80);
    waiter_behind_the_sites_own(false, 80);
}

/* A waiter that comes after the [mx] cap's holder went idle: a.test's
 * connection, done while nobody waited, idles on the cap's one slot;
 * b.test, of another site, then has mail and is refused by the cap. a's
 * idle connection says goodbye at once (its site holds one of the cap's
 * connections, b's none) and b.test's opens when it has gone. Before,
 * it held the slot to the end of idle_timeout: the last domains of a
 * campaign under a shared cap waited 5 s for nothing. */
static void
mx_cap_waiter_after_the_holder_went_idle_gets_the_slot(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 2\nidle_timeout = 5s\n"
                          "[domain *]\nmax_connections = 10\n"
                          "[mx *.hoster.test]\nmax_connections = 1\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *ca = f->open[0];
    enum sched_next what;
    conn_ready(ca, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(ca, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(ca, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE); /* nobody waits: idle for idle_timeout */
    assert_false(ca->idle_short);
    assert_int_equal(f->quits, 0);
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1 + 1, (unsigned[]){10}, A1 + 1, 1);
    struct dest *b = dest_get(f->d, "b.test");
    assert_true(b->mx_waiting);
    assert_int_equal(f->quits, 1); /* a's idle one goes for b.test */
    assert_ptr_equal(f->quit, ca);
    assert_string_equal(ca->quit_why, "limit_wanted");
    conn_gone(ca, NULL);
    assert_int_equal(f->opened, 2);
    struct conn *cb = f->open[f->nopen - 1];
    assert_ptr_equal(cb->dest, b);
    conn_ready(cb, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    /* a.test has mail again: b's connection, busy, keeps the slot, and
     * nothing idle is told to go */
    submit("a.test", 1);
    assert_int_equal(f->quits, 1);
    assert_true(dest_get(f->d, "a.test")->mx_waiting);
    fx_free(f);
}

/* A two-worker fixture whose limiter counts the caps held by both for
 * the node, as delivery_new's does (node_caps.h): the other worker's
 * part is played on the table directly. Freed after fx_free. */
static struct node_caps *
fx_node_caps(struct fx *f)
{
    struct node_caps *t = node_caps_new(f->e.nworkers);
    assert_non_null(t);
    f->d->lim = limits_free(f->d->lim);
    struct limits_opts lo = {.node_caps = t};
    char err[128];
    assert_int_equal(limits_new(&f->w, &lo, &f->d->lim, err, sizeof(err)), 0);
    f->e.node_caps = t;
    return t;
}

/* Without [redis], with two workers, an [mx] cap of 4 is the node's, and
 * the section's connection rate (1/h) is split, each worker's part lent
 * while its worker asks for none. a.test's connection, done, idles on
 * one slot; b.test, of another site, opens one on the other worker's
 * part; c.test, of a third, is refused a connection by the rate, not the
 * cap (2 slots free): it waits for its timer, and a's idle connection
 * stays (a.test's next message rides it). (The three sites are this
 * worker's: their domains are gathered here.) Taken for a full cap, the
 * refusal had it quit for c.test (limit_wanted), which could not open
 * one anyway: a.test's next mail waited for the rate too. */
static void
mx_node_cap_rate_refusal_kicks_no_idle_holder(void **state)
{
    (void)state;
    struct fx *f = fx_two_workers("[delivery]\ninitial_connections = 2\nidle_timeout = 5s\n"
                                  "[domain *]\nmax_connections = 10\n"
                                  "[mx *.hoster.test]\nmax_connections = 4\n"
                                  "max_connection_rate = 1/h\n",
                                  0);
    struct node_caps *nc = fx_node_caps(f);
    const char *h[3] = {host_of_worker(0, 0), host_of_worker(0, 1), host_of_worker(0, 2)};
    submit("a.test", 1);
    answer("a.test", DNS_OK, h, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *ca = f->open[0];
    assert_true(limits_key_node_wide(&ca->mxk->lim));
    enum sched_next what;
    conn_ready(ca, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    assert_false(txn_done(ca, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(ca, &what);
    assert_int_equal(what, SCHED_NEXT_IDLE);
    assert_true(ca->idle_poll); /* a slot of a cap counted for the node */
    submit("b.test", 1);
    answer("b.test", DNS_OK, h + 1, (unsigned[]){10}, A1 + 1, 1);
    assert_int_equal(f->opened, 2); /* the other worker's part, lent */
    submit("c.test", 1);
    answer("c.test", DNS_OK, h + 2, (unsigned[]){10}, A1 + 2, 1);
    struct dest *c = dest_get(f->d, "c.test");
    assert_int_equal(f->opened, 2); /* the rate's: both parts spent */
    assert_int_equal(node_cap_conns(node_cap_get(nc, "mx:*.hoster.test")), 2);
    assert_false(c->mx_waiting);
    assert_int_equal(f->quits, 0);
    submit("a.test", 1);
    assert_int_equal(dest_get(f->d, "a.test")->inflight, 1);
    fx_free(f);
    node_caps_free(nc);
}

/* The [mx] cap's one slot freed goes to the domain that waited first:
 * b.test (site mx2) waits, then c.test (site mx3); a.test's connection,
 * done, gives its slot up for them, and the connection that opens next
 * is b.test's. Before, mx_wait put the newest waiter first and the key's
 * news ran it first: c.test took the slot, and under a steady stream of
 * new domains the first could wait on. */
static void
mx_cap_slot_goes_to_the_oldest_waiter(void **state)
{
    (void)state;
    struct fx *f = fx_new("[delivery]\ninitial_connections = 2\n"
                          "[domain *]\nmax_connections = 10\n"
                          "[mx *.hoster.test]\nmax_connections = 1\n");
    submit("a.test", 1);
    answer("a.test", DNS_OK, MX1, (unsigned[]){10}, A1, 1);
    assert_int_equal(f->opened, 1);
    struct conn *ca = f->open[0];
    enum sched_next what;
    conn_ready(ca, &what);
    assert_int_equal(what, SCHED_NEXT_JOB);
    submit("b.test", 1);
    answer("b.test", DNS_OK, MX1 + 1, (unsigned[]){10}, A1 + 1, 1);
    f->w.now += MS_TO_NS(1);
    submit("c.test", 1);
    answer("c.test", DNS_OK, MX1 + 2, (unsigned[]){10}, A1 + 2, 1);
    assert_true(dest_get(f->d, "b.test")->mx_waiting);
    assert_true(dest_get(f->d, "c.test")->mx_waiting);
    assert_false(txn_done(ca, SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY, SMTP_SCOPE_MESSAGE));
    conn_ready(ca, &what);
    assert_int_equal(what, SCHED_NEXT_QUIT); /* its site holds the slot, theirs none */
    conn_gone(ca, NULL);
    assert_int_equal(f->opened, 2);
    assert_string_equal(f->opened_to[1], "mx2.hoster.test 192.0.2.2:25");
    assert_ptr_equal(f->open[f->nopen - 1]->dest, dest_get(f->d, "b.test"));
    fx_free(f);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(mx_refresh_while_busy_follows_new_hosts),
        cmocka_unit_test(mx_refresh_same_hosts_changes_nothing),
        cmocka_unit_test(mx_refresh_failure_keeps_the_old_answer),
        cmocka_unit_test(job_copy_has_a_domain_of_its_own),
        cmocka_unit_test(window_opens_and_grows),
        cmocka_unit_test(reload_raises_the_sites_ceiling),
        cmocka_unit_test(failed_open_tries_again),
        cmocka_unit_test(failed_open_of_this_node_defers_and_holds),
        cmocka_unit_test(failing_much_is_spread_over_turns),
        cmocka_unit_test(failing_much_then_a_flush_tries_the_rest),
        cmocka_unit_test(failure_of_an_unreadable_message_waits),
        cmocka_unit_test(window_holds_while_mail_is_served),
        cmocka_unit_test(window_grows_for_a_backlog),
        cmocka_unit_test(window_ignores_waits_for_rate_tokens),
        cmocka_unit_test(failures_shrink_and_fail_over),
        cmocka_unit_test(tls_failure_retried_in_plaintext_at_once),
        cmocka_unit_test(tls_relaxed_destination),
        cmocka_unit_test(spool_owner_keeps_tls_relaxed),
        cmocka_unit_test(idle_connection_takes_other_domain),
        cmocka_unit_test(rate_bound_domain_lends_its_connection),
        cmocka_unit_test(ending_idle_connection_is_not_handed_a_job),
        cmocka_unit_test(idle_connection_of_another_policy_yields),
        cmocka_unit_test(waiting_domain_refused_by_a_connection_runs_again),
        cmocka_unit_test(per_address_cap),
        cmocka_unit_test(per_address_cap_across_workers),
        cmocka_unit_test(shared_address_slot_given_back),
        cmocka_unit_test(answers_that_fail),
        cmocka_unit_test(session_failures),
        cmocka_unit_test(interface_addresses_read_again),
        cmocka_unit_test(idle_destinations_evicted),
        cmocka_unit_test(idle_buffers_given_back),
        cmocka_unit_test(first_mta_sts_check_on_the_worker),
        cmocka_unit_test(mta_sts_answer_at_once),
        cmocka_unit_test(first_mta_sts_check_holds_an_open_connection),
        cmocka_unit_test(pools_keep_apart),
        cmocka_unit_test(weights_per_transaction),
        cmocka_unit_test(weights_hold_across_new_sites),
        cmocka_unit_test(reload_gives_the_round_robin_a_new_source),
        cmocka_unit_test(reload_lowers_max_connections_on_open_ones),
        cmocka_unit_test(reload_lowers_an_mx_sections_cap_on_open_ones),
        cmocka_unit_test(round_robin_turns_per_connection_opened),
        cmocka_unit_test(greylisted_retry_goes_from_the_same_source),
        cmocka_unit_test(greylisting_keeps_the_destination_on_its_source),
        cmocka_unit_test(source_held_alone),
        cmocka_unit_test(source_open_failure_holds_the_source),
        cmocka_unit_test(source_throttled_again_holds_longer),
        cmocka_unit_test(source_pick_order),
        cmocka_unit_test(pool_shares_address_cap),
        cmocka_unit_test(pool_source_follows_the_address_with_room),
        cmocka_unit_test(pool_sends_to_a_v4_mapped_address_over_ipv4),
        cmocka_unit_test(mx_limits_split_between_the_workers_add_up),
        cmocka_unit_test(affinity_moves_a_domain_to_its_sites_worker),
        cmocka_unit_test(affinity_gathers_a_rollup_on_its_patterns_worker),
        cmocka_unit_test(affinity_decided_again_when_a_reload_adds_a_rollup),
        cmocka_unit_test(affinity_site_worker_ignores_order),
        cmocka_unit_test(affinity_under_mx_and_source_sections_not_for_pools),
        cmocka_unit_test(affinity_claim_goes_with_the_idle_domain),
        cmocka_unit_test(affinity_husk_goes_at_the_next_sweep),
        cmocka_unit_test(site_rests_with_a_failed_domain),
        cmocka_unit_test(site_wake_runs_every_waiting_domain),
        cmocka_unit_test(site_wake_goes_past_a_held_domain),
        cmocka_unit_test(site_wake_goes_past_a_suspended_domain),
        cmocka_unit_test(site_wake_goes_past_a_domain_out_of_connection_tokens),
        cmocka_unit_test(site_wake_goes_past_a_domain_at_its_own_cap),
        cmocka_unit_test(site_hold_zero_keeps_its_mail_while_held),
        cmocka_unit_test(lift_of_one_domain_frees_its_sites_other_domains),
        cmocka_unit_test(site_passes_over_an_address_that_refused),
        cmocka_unit_test(affinity_follows_a_changed_answer),
        cmocka_unit_test(affinity_not_for_a_busy_site),
        cmocka_unit_test(reuse_lost_goes_to_a_new_connection),
        cmocka_unit_test(reuse_lost_after_idle),
        cmocka_unit_test(reuse_421_without_idle_is_pushback),
        cmocka_unit_test(greeting_421_again_defers),
        cmocka_unit_test(greeting_421_count_starts_again_on_a_delivery),
        cmocka_unit_test(site_turns_share_one_connection),
        cmocka_unit_test(site_turns_follow_the_age_of_the_mail),
        cmocka_unit_test(site_turn_puts_the_giver_back_by_the_age_of_its_mail),
        cmocka_unit_test(site_turn_puts_the_giver_back_before_where_the_walk_stopped),
        cmocka_unit_test(site_turns_by_tag_are_off_with_redis),
        cmocka_unit_test(site_line_stays_in_the_order_of_turns),
        cmocka_unit_test(site_line_stays_in_order_past_the_look),
        cmocka_unit_test(site_line_stays_in_order_with_mail_coming),
        cmocka_unit_test(site_turn_join_places_a_domain_in_line_anew),
        cmocka_unit_test(site_turn_passes_a_front_of_suspended_domains),
        cmocka_unit_test(site_turn_passes_a_front_it_may_not_carry),
        cmocka_unit_test(site_turn_kept_across_a_tenant_suspended),
        cmocka_unit_test(site_turn_of_a_moved_domain_starts_at_its_new_sites_clock),
        cmocka_unit_test(site_many_domains_in_turn_go_in_the_order_they_came),
        cmocka_unit_test(site_turn_takes_no_connection_rate_token),
        cmocka_unit_test(route_port_change_retires_old_connections),
        cmocka_unit_test(mx_refusal_gives_the_domains_token_back),
        cmocka_unit_test(source_refusal_gives_the_domain_and_mx_tokens_back),
        cmocka_unit_test(full_mx_cap_takes_no_connection_rate_token),
        cmocka_unit_test(rate_refused_domain_does_not_take_the_mx_caps_slot),
        cmocka_unit_test(site_turns_even_out_connections),
        cmocka_unit_test(site_turns_between_two_backlogs_are_even),
        cmocka_unit_test(site_turn_passes_over_a_domain_it_may_not_carry),
        cmocka_unit_test(rollup_shares_a_site_across_host_names),
        cmocka_unit_test(address_slot_freed_wakes_another_site),
        cmocka_unit_test(address_full_quits_another_sites_idle_connection),
        cmocka_unit_test(address_wanted_until_every_waiting_domain_has_a_slot),
        cmocka_unit_test(mx_cap_slots_shared_evenly_between_sites),
        cmocka_unit_test(address_want_stays_for_its_own_address_only),
        cmocka_unit_test(mx_cap_waiter_of_another_site_is_seen_behind_the_sites_own),
        cmocka_unit_test(mx_cap_waiter_after_the_holder_went_idle_gets_the_slot),
        cmocka_unit_test(mx_node_cap_rate_refusal_kicks_no_idle_holder),
        cmocka_unit_test(mx_cap_slot_goes_to_the_oldest_waiter),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
