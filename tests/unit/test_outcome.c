/*
 * The outcome hand-off (engine/outbound/outcome.c) without a network:
 * operators' bounces (delivery_submit_bounce, run from the worker's
 * mailbox as its loop runs them) and a transaction's outcomes against a
 * real spool in a temporary directory, the delivery log's lines caught
 * by its hook. Each recipient must end in exactly one final outcome,
 * told once: a bounce of a recipient that is already done, or whose
 * final outcome is not durable yet, tells nothing. And the wall clock
 * these tests move (tests/support/wall_clock.c) set behind the kernel's
 * gives a time in range.
 */
#include <errno.h>
#include <ftw.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/intern.h"
#include "common/log.h"
#include "engine/config.h"
#include "engine/dlog.h"
#include "engine/dsn.h"
#include "engine/engine.h"
#include "engine/outbound/internal.h"
#include "engine/outbound/outcome_int.h"
#include "engine/suppress.h"
#include "queue/queue.h"
#include "tests/support/wall_clock.h"

/* A test whose subject is wall time passing (a held failure's dsn_wait,
 * counted from the time stored with it) moves the binary's wall clock
 * forward (wall_pass, tests/support/wall_clock.h) instead of sleeping.
 * Each fixture starts it at 0 (fx_new): a test that failed half-way
 * leaves the next the real clock. */
static void
wall_pass(long long ms)
{
    wall_clock_ahead_ms += ms;
}

struct fx {
    char dir[256];
    struct worker w;
    struct engine e;
    struct config *cfg;
    struct delivery *d;
    struct dlog *dlog;
    struct dlog_writer *writers[1];
    struct delivery *dlv[1];
    unsigned lines, bounces; /* delivery log lines, and of them bounce events */
};

static void
on_line(void *arg, const char *line, size_t len)
{
    struct fx *f = arg;
    f->lines++;
    if (memmem(line, len, "\"event\":\"bounce\"", 16) != NULL)
        f->bounces++;
}

static int
rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static struct fx *
fx_new(void)
{
    wall_clock_ahead_ms = 0;
    struct fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof(f->dir), "%s/sluice-outcome-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    assert_non_null(mkdtemp(f->dir));

    char path[300];
    snprintf(path, sizeof(path), "%s/sluice.conf", f->dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fprintf(fp, "[server]\nhostname = relay.test\nlisten = 127.0.0.1:2587\n");
    fclose(fp);
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    int rc = config_load(path, &f->cfg, errs);
    fclose(errs);
    if (rc != 0)
        fprintf(stderr, "%s", buf);
    free(buf);
    assert_int_equal(rc, 0);

    struct queue_config qc = {0};
    char err[512];
    assert_int_equal(conf_defaults(queue_conf_keys, &qc, err, sizeof(err)), 0);
    free(qc.path);
    snprintf(path, sizeof(path), "%s/spool", f->dir);
    qc.path = strdup(path);
    qc.map_size = 64ULL << 20;
    rc = queue_open(&qc, &f->e.queue, err, sizeof(err));
    free(qc.path);
    if (rc != 0)
        fail_msg("queue_open: %s", err);

    /* The delivery log without a file: its lines reach the hook. */
    assert_int_equal(dlog_new(NULL, 0, &f->dlog, err, sizeof(err)), 0);
    dlog_set_hook(f->dlog, on_line, f);
    f->writers[0] = dlog_writer_new(f->dlog);
    assert_non_null(f->writers[0]);
    f->e.dlogw = f->writers;

    /* No ring: the outcome hand-off needs the worker's clock, timers and
     * the spool port only. */
    assert_int_equal(timer_heap_init(&f->w.timers, 64), 0);
    f->w.now = clock_mono_ns();
    f->e.cfg = f->cfg;
    f->e.campaign_names = f->cfg->server.campaign_names;
    f->e.nworkers = 1;
    /* Its mailbox, which the test empties (mbox_run): operators' bounces
     * arrive there. */
    pthread_mutex_init(&f->w.mbox_lock, NULL);
    f->w.mbox_tail = &f->w.mbox_head;
    f->w.wake_fd = -1;
    f->w.ctx = &f->e;
    f->e.workers = &f->w;
    f->e.dlv = f->dlv;
    f->e.names = intern_new();
    assert_non_null(f->e.names);
    struct delivery *d = calloc(1, sizeof(*d));
    assert_non_null(d);
    d->e = &f->e;
    d->w = &f->w;
    d->rng = 1;
    delivery_env_take(d); /* the engine above: spool, log writers, names, config */
    d->port = queue_port_new();
    assert_non_null(d->port);
    char lerr[128];
    struct limits_opts lo = {0};
    assert_int_equal(limits_new(&f->w, &lo, &d->lim, lerr, sizeof(lerr)), 0);
    assert_int_equal(sched_init(d, NULL), 0);
    scope_init(d);
    f->d = d;
    f->dlv[0] = d;
    return f;
}

static void
fx_free(struct fx *f)
{
    struct delivery *d = f->d;
    if (d == NULL) /* freed by the test (delivery_free) */
        goto rest;
    d->stopping = true;
    while (queue_port_pending(d->port) > 0)
        queue_port_wait(d->port, 1000);
    outcome_retrying_cancel(d);
    outcome_retrying_free(d);
    outcome_delay_cancel(d);
    outcome_delay_free(d);
    sched_stop(d);
    sched_release_leases(d);
    sched_free_dests(d);
    scope_fini(d);
    d->lim = limits_free(d->lim);
    sched_fini(d);
    queue_port_free(d->port);
    stats_tenant_fini(&d->tenants);
    free(d);
rest:
    dlog_writer_free(f->writers[0]);
    dlog_free(f->dlog);
    queue_close(f->e.queue);
    intern_free(f->e.names);
    config_free(f->cfg);
    timer_heap_fini(&f->w.timers);
    pthread_mutex_destroy(&f->w.mbox_lock);
    nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
}

/* A message from sender to n recipients at domain. */
static uint64_t
store_from(struct fx *f, const char *sender, const char *domain, unsigned n)
{
    char addr[8][64];
    struct queue_rcpt r[8];
    assert_true(n <= 8);
    memset(r, 0, sizeof(r));
    for (unsigned i = 0; i < n; i++) {
        snprintf(addr[i], sizeof(addr[i]), "user%u@%s", i, domain);
        r[i].addr = addr[i];
    }
    struct queue_envelope env = {
        .id = queue_id_next(f->e.queue),
        .sender = sender,
        .nrcpt = n,
        .rcpt = r,
    };
    static const char body[] = "Subject: test\r\n\r\nhello\r\n";
    struct iovec iov = {(void *)body, sizeof(body) - 1};
    assert_int_equal(queue_enqueue_wait(f->e.queue, &env, &iov, 1), 0);
    return env.id;
}

/* ... from the null sender: no DSN. */
static uint64_t
store(struct fx *f, const char *domain, unsigned n)
{
    return store_from(f, "", domain, n);
}

/* A job of recipients idx[0..n) of message id at domain. */
static struct job *
test_job(uint64_t id, const char *domain, const unsigned *idx, unsigned n)
{
    struct job *j = job_new(domain, n);
    assert_non_null(j);
    j->id = id;
    j->n = n;
    memcpy(j->idx, idx, n * sizeof(unsigned));
    return j;
}

/* The messages posted to the worker, run as its loop runs them. */
static void
mbox_run(struct fx *f)
{
    struct worker_msg *m = f->w.mbox_head;
    f->w.mbox_head = NULL;
    f->w.mbox_tail = &f->w.mbox_head;
    while (m != NULL) {
        struct worker_msg *next = m->next;
        m->fn(&f->w, m);
        m = next;
    }
}

/* `sluicectl bounce`: recipients idx[0..n) of message id at domain, as
 * the stats thread hands them to the worker. */
static void
bounce(struct fx *f, uint64_t id, const char *domain, const unsigned *idx, unsigned n)
{
    struct job_owner own = {0};
    delivery_submit_bounce(&f->e, id, domain, idx, n, &own);
    mbox_run(f);
}

/* Every outcome submitted is durable (or failed). */
static void
settle(struct fx *f)
{
    while (queue_port_pending(f->d->port) > 0)
        assert_true(queue_port_wait(f->d->port, 5000) >= 0);
}

/* Two bounces of the same recipient cross (two operators, or an
 * operator's and a shaping action's): the first fails it and removes its
 * message, the second finds the message gone and tells nothing. Before
 * the fix the second was logged and counted as one more bounce (rcpt
 * "?", no address in the delivery log's line). */
static void
bounce_of_a_gone_message_tells_nothing(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    const unsigned idx[] = {0};
    uint64_t id = store(f, "example.test", 1);

    bounce(f, id, "example.test", idx, 1);
    settle(f);
    assert_int_equal(f->d->stats.bounced, 1);
    assert_int_equal(f->bounces, 1);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), QUEUE_ENOTFOUND);

    bounce(f, id, "example.test", idx, 1);
    settle(f);
    assert_int_equal(f->d->stats.bounced, 1);
    assert_int_equal(f->bounces, 1);
    assert_int_equal(f->lines, 1);
    assert_int_equal(dest_get(f->d, "example.test")->failed, 1);
    fx_free(f);
}

/* The spool's committer held: a commit of an event line whose hook
 * blocks the committer's thread until released, so that the commits
 * submitted meanwhile wait, not durable, deterministically. */
struct hold {
    sem_t entered, release;
    bool once;
    struct queue_port *port;
};

static void
hold_hook(void *arg)
{
    struct hold *h = arg;
    if (h->once)
        return;
    h->once = true;
    sem_post(&h->entered);
    sem_wait(&h->release);
}

static void
hold_done(void *cookie, int rc)
{
    (void)cookie;
    assert_int_equal(rc, 0);
}

static void
hold_start(struct fx *f, struct hold *h)
{
    memset(h, 0, sizeof(*h));
    sem_init(&h->entered, 0, 0);
    sem_init(&h->release, 0, 0);
    h->port = queue_port_new();
    assert_non_null(h->port);
    queue_events_set_hook(f->e.queue, hold_hook, h);
    assert_int_equal(queue_events_put(f->e.queue, h->port, "{}\n", 3, hold_done, NULL), 0);
    sem_wait(&h->entered);
}

static void
hold_end(struct fx *f, struct hold *h)
{
    sem_post(&h->release);
    while (queue_port_pending(h->port) > 0)
        assert_true(queue_port_wait(h->port, 5000) >= 0);
    queue_events_set_hook(f->e.queue, NULL, NULL);
    queue_port_free(h->port);
    sem_destroy(&h->entered);
    sem_destroy(&h->release);
}

/* Is recipient rcpt of message id still in the spool? */
static bool
stored(struct fx *f, uint64_t id, unsigned rcpt)
{
    struct queue_envelope *env = NULL;
    if (queue_envelope_get(f->e.queue, id, &env) != 0)
        return false;
    bool found = false;
    for (unsigned k = 0; k < env->nrcpt; k++)
        found |= env->rcpt[k].index == rcpt;
    queue_envelope_free(env);
    return found;
}

/* Two bounces of one recipient, the second before the first's commit is
 * durable (two `sluicectl bounce` in a row; a bounce whose commit is
 * tried again on a full spool and an operator's bounce of the domain):
 * the spool still lists the recipient, yet its final outcome is on its
 * way. Told once. */
static void
second_bounce_before_the_first_is_durable(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    const unsigned idx[] = {0, 1};
    uint64_t id = store(f, "example.test", 2);
    struct hold h;
    hold_start(f, &h);

    bounce(f, id, "example.test", idx, 1);
    assert_true(stored(f, id, 0)); /* not durable: the committer is held */
    bounce(f, id, "example.test", idx, 2); /* both recipients */
    assert_int_equal(f->d->stats.bounced, 0); /* told once durable */
    assert_int_equal(f->bounces, 0);

    hold_end(f, &h);
    settle(f);
    assert_int_equal(f->d->stats.bounced, 2);
    assert_int_equal(f->bounces, 2);
    assert_false(stored(f, id, 0));
    assert_false(stored(f, id, 1));
    assert_null(f->d->pending);
    fx_free(f);
}

/* An operator's bounce of a recipient delivered a moment ago, whose
 * delivery is not durable yet: the recipient was delivered, and is told
 * so once; the bounce tells nothing (and no DSN says it failed). */
static void
bounce_after_a_250_not_yet_durable(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    const unsigned idx[] = {0};
    uint64_t id = store(f, "example.test", 1);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    struct smtp_client_rcpt rc[1];
    memset(rc, 0, sizeof(rc));
    rc[0].out.status = SMTP_STATUS_DELIVERED;
    rc[0].out.code = 250;
    rc[0].out.reason = SMTP_REASON_REPLY;
    snprintf(rc[0].out.text, sizeof(rc[0].out.text), "2.0.0 queued as 1234");
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    struct hold h;
    hold_start(f, &h);

    struct job *j = test_job(id, "example.test", idx, 1);
    job_finish(f->d, t, j, env, rc, NULL, &where);
    free(j);
    queue_envelope_free(env);
    assert_true(stored(f, id, 0)); /* not durable: the committer is held */
    bounce(f, id, "example.test", idx, 1);
    assert_int_equal(f->d->stats.delivered, 0); /* told once durable */
    assert_int_equal(f->d->stats.bounced, 0);
    assert_int_equal(f->lines, 0);

    hold_end(f, &h);
    settle(f);
    assert_int_equal(f->d->stats.delivered, 1);
    assert_int_equal(f->d->stats.bounced, 0);
    assert_int_equal(f->bounces, 0);
    assert_int_equal(f->lines, 1);
    assert_false(stored(f, id, 0));
    fx_free(f);
}

static int
count_msgs(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    uint64_t *last = arg;
    (void)r;
    if (id != last[0]) {
        last[0] = id;
        last[1]++;
    }
    return 0;
}

/* A bounce whose commit (with its DSN) completes while the worker stops
 * (delivery_free drains the spool port after the loop ended, and after
 * the engine swept the workers' mailboxes, some of them finished): the
 * DSN is in the spool, and the next start delivers it; nothing is posted
 * to a worker that no longer runs (the job would be lost in a mailbox
 * nobody reads, or in one already torn down). */
static void
dsn_committed_while_stopping_waits_for_the_next_start(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    const unsigned idx[] = {0};
    uint64_t id = store_from(f, "sender@example.org", "example.test", 1);
    struct hold h;
    hold_start(f, &h);
    bounce(f, id, "example.test", idx, 1);
    f->d->stopping = true; /* delivery_on_stop; then the loop ends */
    hold_end(f, &h);
    settle(f);
    assert_int_equal(f->d->stats.bounced, 1);
    assert_int_equal(f->d->stats.dsn_queued, 1);
    assert_null(f->w.mbox_head); /* nothing posted */
    assert_false(stored(f, id, 0));
    uint64_t walk[2] = {0, 0}; /* the DSN, alone in the spool, for the next start */
    assert_true(queue_walk(f->e.queue, count_msgs, walk) >= 0);
    assert_int_equal(walk[1], 1);
    assert_true(walk[0] != id);
    fx_free(f);
}

static int
events_gather(void *arg, uint64_t seq, const char *text, size_t len)
{
    char *all = arg;
    (void)seq;
    size_t have = strlen(all);
    assert_true(have + len < 8192);
    memcpy(all + have, text, len);
    all[have + len] = '\0';
    return 0;
}

/* A transaction whose envelope was read before an operator's bounce of
 * one of its recipients was committed ends with both delivered: the
 * spool ignores the stale outcome, and its event line must not reach the
 * backend either (it would hear "bounce" and then "delivery" for the same
 * recipient); the other recipient's line is committed. */
static void
stale_outcome_tells_the_backend_nothing(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    int sinks; /* event sinks on: only tested against NULL here */
    f->e.events = (struct events *)&sinks;
    delivery_env_take(f->d);
    const unsigned idx[] = {0, 1};
    uint64_t id = store(f, "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    assert_int_equal(env->nrcpt, 2);

    bounce(f, id, "example.test", idx, 1); /* recipient 0 */
    settle(f);
    assert_false(stored(f, id, 0));

    struct smtp_client_rcpt rc[2];
    memset(rc, 0, sizeof(rc));
    for (int i = 0; i < 2; i++) {
        rc[i].out.status = SMTP_STATUS_DELIVERED;
        rc[i].out.code = 250;
        rc[i].out.reason = SMTP_REASON_REPLY;
        snprintf(rc[i].out.text, sizeof(rc[i].out.text), "2.0.0 ok");
    }
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    struct job *j = test_job(id, "example.test", idx, 2);
    job_finish(f->d, t, j, env, rc, NULL, &where);
    free(j);
    queue_envelope_free(env);
    settle(f);
    assert_false(stored(f, id, 1));
    assert_int_equal(f->d->stats.bounced, 1);
    assert_int_equal(f->d->stats.delivered, 1); /* recipient 1's only */

    static char all[8192];
    all[0] = '\0';
    assert_true(queue_events_read(f->e.queue, 0, 1 << 20, events_gather, all) >= 0);
    const char *b0 = strstr(all, "\"event\":\"bounce\"");
    const char *d1 = strstr(all, "\"event\":\"delivery\"");
    assert_non_null(b0);
    assert_non_null(d1);
    assert_null(strstr(d1 + 1, "\"event\":\"delivery\"")); /* one delivery line */
    const char *eol = strchr(d1, '\n');
    assert_non_null(eol);
    char line[4096];
    assert_true((size_t)(eol - d1) < sizeof(line));
    memcpy(line, d1, (size_t)(eol - d1));
    line[eol - d1] = '\0';
    assert_non_null(strstr(line, "user1@example.test")); /* ... of recipient 1 */
    assert_int_equal(queue_events_durable(f->e.queue), 2);
    f->e.events = NULL;
    delivery_env_take(f->d);
    fx_free(f);
}

/* The DSNs in the spool (to sender), and how many of them name addr. */
struct dsn_scan {
    const char *sender;
    uint64_t ids[8];
    unsigned n;
};

static int
dsn_collect(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct dsn_scan *s = arg;
    if (strcmp(r->addr, s->sender) == 0 && s->n < 8)
        s->ids[s->n++] = id;
    return 0;
}

/* The DSNs to sender@example.org in the spool into *s: n of them. */
static void
dsns_expect(struct fx *f, struct dsn_scan *s, unsigned n)
{
    *s = (struct dsn_scan){.sender = "sender@example.org"};
    assert_true(queue_walk(f->e.queue, dsn_collect, s) >= 0);
    assert_int_equal(s->n, n);
}

static unsigned
dsns_naming(struct fx *f, struct dsn_scan *s, const char *addr)
{
    unsigned named = 0;
    static char body[65536];
    for (unsigned i = 0; i < s->n; i++) {
        size_t len = 0;
        assert_int_equal(queue_body_read(f->e.queue, s->ids[i], 0, body, sizeof(body) - 1, &len),
                         0);
        body[len] = '\0';
        named += strstr(body, addr) != NULL;
    }
    return named;
}

/* A job failed whole (an operator's bounce, a DNS failure) whose envelope
 * was read before another worker's delivery of one of its recipients was
 * committed: that outcome is stale. The spool ignored it, and nothing
 * else may tell it: no bounce counted, no delivery log line, and above
 * all no DSN that says the delivered recipient failed. The other
 * recipient's bounce is told, once, with a DSN that names it alone. */
static void
stale_outcome_in_no_dsn_and_no_counter(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    const unsigned idx[] = {0, 1};
    uint64_t id = store_from(f, "sender@example.org", "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    assert_int_equal(env->nrcpt, 2);

    /* recipient 0 delivered, and durable */
    struct smtp_client_rcpt rc[2];
    memset(rc, 0, sizeof(rc));
    rc[0].out.status = SMTP_STATUS_DELIVERED;
    rc[0].out.code = 250;
    rc[0].out.reason = SMTP_REASON_REPLY;
    snprintf(rc[0].out.text, sizeof(rc[0].out.text), "2.0.0 ok");
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    struct job *j = test_job(id, "example.test", idx, 1);
    job_finish(f->d, t, j, env, rc, NULL, &where);
    free(j);
    settle(f);
    assert_false(stored(f, id, 0));
    assert_int_equal(f->d->stats.delivered, 1);
    assert_int_equal(f->lines, 1);

    /* both failed, from the envelope read before */
    struct smtp_outcome fail;
    memset(&fail, 0, sizeof(fail));
    fail.status = SMTP_STATUS_PERMFAIL;
    fail.code = 550;
    fail.reason = SMTP_REASON_REPLY;
    fail.enh = (struct smtp_enh){5, 1, 1};
    snprintf(fail.text, sizeof(fail.text), "5.1.1 no such user");
    j = test_job(id, "example.test", idx, 2);
    job_finish(f->d, t, j, env, NULL, &fail, &where);
    free(j);
    queue_envelope_free(env);
    settle(f);
    assert_false(stored(f, id, 1));
    assert_null(f->d->pending);

    assert_int_equal(f->d->stats.delivered, 1);
    assert_int_equal(f->d->stats.bounced, 1); /* recipient 1 only */
    assert_int_equal(f->bounces, 1);
    assert_int_equal(f->d->stats.dsn_queued, 1);
    struct dsn_scan s;
    dsns_expect(f, &s, 1);
    assert_int_equal(dsns_naming(f, &s, "user1@example.test"), 1);
    assert_int_equal(dsns_naming(f, &s, "user0@example.test"), 0); /* delivered */
    struct dlog_stats ds;
    dlog_stats(f->dlog, &ds);
    uint64_t bounced = 0;
    for (unsigned c = 0; c < BOUNCE_CLASS_COUNT; c++)
        bounced += ds.outcomes[DLOG_OUT_BOUNCED][c];
    assert_int_equal(bounced, 1);
    /* the DSN's delivery, posted to the worker: not run here */
    for (struct worker_msg *m = f->w.mbox_head, *next; m != NULL; m = next) {
        next = m->next;
        assert_true(delivery_msg_free(m));
    }
    f->w.mbox_head = NULL;
    f->w.mbox_tail = &f->w.mbox_head;
    fx_free(f);
}

/* Two DSNs for one message, made by two processes (a bounce before a
 * restart, another after it): each process counts its DSNs from 1, and
 * the Message-IDs were the same (a receiver that drops duplicates kept
 * one). The start's time tells them apart. */
static void
dsns_of_two_processes_have_their_own_message_ids(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    f->cfg->bounce.dsn_wait = 0; /* a DSN each, not one for the message */
    uint64_t id = store_from(f, "sender@example.org", "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    struct smtp_outcome fail;
    memset(&fail, 0, sizeof(fail));
    fail.status = SMTP_STATUS_PERMFAIL;
    fail.code = 550;
    fail.reason = SMTP_REASON_REPLY;
    fail.enh = (struct smtp_enh){5, 1, 1};
    snprintf(fail.text, sizeof(fail.text), "5.1.1 no such user");
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    f->e.started_ms = 1700000000000ULL;
    delivery_env_take(f->d);
    for (unsigned i = 0; i < 2; i++) {
        struct queue_envelope *env = NULL;
        assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
        struct job *j = test_job(id, "example.test", &i, 1);
        job_finish(f->d, t, j, env, NULL, &fail, &where);
        free(j);
        queue_envelope_free(env);
        settle(f);
        /* a restart: a new process, its DSNs counted from 1 again */
        f->d->dsn_seq = 0;
        f->e.started_ms += 30000;
        delivery_env_take(f->d);
    }
    struct dsn_scan s;
    dsns_expect(f, &s, 2);
    char mid[2][256];
    static char body[65536];
    for (unsigned i = 0; i < 2; i++) {
        size_t len = 0;
        assert_int_equal(queue_body_read(f->e.queue, s.ids[i], 0, body, sizeof(body) - 1, &len),
                         0);
        body[len] = '\0';
        const char *m = strstr(body, "\r\nMessage-ID: <");
        assert_non_null(m);
        m += strlen("\r\nMessage-ID: <");
        size_t n = strcspn(m, ">");
        assert_true(n < sizeof(mid[i]));
        memcpy(mid[i], m, n);
        mid[i][n] = '\0';
    }
    assert_string_not_equal(mid[0], mid[1]);
    for (struct worker_msg *m = f->w.mbox_head, *next; m != NULL; m = next) {
        next = m->next;
        assert_true(delivery_msg_free(m));
    }
    f->w.mbox_head = NULL;
    f->w.mbox_tail = &f->w.mbox_head;
    fx_free(f);
}

/* The same with a DSN that names only recipients whose outcome applies:
 * recipient 0 bounced by an operator (its DSN), then a transaction from
 * the envelope read before: 250 for recipient 0 (stale), 550 for
 * recipient 1. The batch is refused for its stale outcome and goes again
 * with the same DSN, which names recipient 1 alone; recipient 0 is not
 * counted delivered. */
static void
stale_outcome_beside_a_dsn_keeps_the_dsn(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    f->cfg->bounce.dsn_wait = 0; /* recipient 0's DSN at once (held_... below: held) */
    const unsigned idx[] = {0, 1};
    uint64_t id = store_from(f, "sender@example.org", "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    bounce(f, id, "example.test", idx, 1); /* recipient 0 */
    settle(f);
    assert_false(stored(f, id, 0));

    struct smtp_client_rcpt rc[2];
    memset(rc, 0, sizeof(rc));
    rc[0].out.status = SMTP_STATUS_DELIVERED;
    rc[0].out.code = 250;
    rc[0].out.reason = SMTP_REASON_REPLY;
    snprintf(rc[0].out.text, sizeof(rc[0].out.text), "2.0.0 ok");
    rc[1].out.status = SMTP_STATUS_PERMFAIL;
    rc[1].out.code = 550;
    rc[1].out.reason = SMTP_REASON_REPLY;
    rc[1].out.enh = (struct smtp_enh){5, 1, 1};
    snprintf(rc[1].out.text, sizeof(rc[1].out.text), "5.1.1 no such user");
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    struct job *j = test_job(id, "example.test", idx, 2);
    job_finish(f->d, t, j, env, rc, NULL, &where);
    free(j);
    queue_envelope_free(env);
    settle(f);
    assert_false(stored(f, id, 1));
    assert_null(f->d->pending);

    assert_int_equal(f->d->stats.delivered, 0); /* recipient 0 was bounced */
    assert_int_equal(f->d->stats.bounced, 2);
    assert_int_equal(f->bounces, 2);
    assert_int_equal(f->lines, 4); /* two bounces, two DSNs */
    assert_int_equal(f->d->stats.dsn_queued, 2);
    struct dsn_scan s;
    dsns_expect(f, &s, 2);
    assert_int_equal(dsns_naming(f, &s, "user0@example.test"), 1);
    assert_int_equal(dsns_naming(f, &s, "user1@example.test"), 1);
    for (struct worker_msg *m = f->w.mbox_head, *next; m != NULL; m = next) {
        next = m->next;
        assert_true(delivery_msg_free(m));
    }
    f->w.mbox_head = NULL;
    f->w.mbox_tail = &f->w.mbox_head;
    fx_free(f);
}

/* Lines of the log file at path holding needle. */
static unsigned
log_lines_with(const char *path, const char *needle)
{
    FILE *fp = fopen(path, "r");
    assert_non_null(fp);
    char line[4096];
    unsigned n = 0;
    while (fgets(line, sizeof(line), fp) != NULL)
        n += strstr(line, needle) != NULL;
    fclose(fp);
    return n;
}

/* The domains view (a destination's delivered, failed and deferrals by
 * class) and the outcome's log line follow the same rule as the other
 * counters: an outcome the spool did not apply is not told. Recipient 0
 * bounced by an operator; then, from the envelope read before, a 250
 * for recipient 0 (stale) and 1, and, from a second read before, a 451
 * for both. Before the fix the destination counted 2 delivered and 2
 * deferred, and the log had two event=delivered lines. */
static void
stale_outcome_not_in_the_domains_view_nor_the_log(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    char logpath[320];
    snprintf(logpath, sizeof(logpath), "%s/log", f->dir);
    assert_int_equal(log_open(logpath, LOG_INFO), 0);
    const unsigned idx[] = {0, 1};
    uint64_t id = store(f, "example.test", 2);
    uint64_t id2 = store(f, "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    struct queue_envelope *env = NULL, *env2 = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    assert_int_equal(queue_envelope_get(f->e.queue, id2, &env2), 0);
    bounce(f, id, "example.test", idx, 1);  /* recipient 0 of each */
    bounce(f, id2, "example.test", idx, 1);
    settle(f);
    assert_int_equal(t->failed, 2);

    struct smtp_client_rcpt rc[2];
    memset(rc, 0, sizeof(rc));
    for (int i = 0; i < 2; i++) {
        rc[i].out.status = SMTP_STATUS_DELIVERED;
        rc[i].out.code = 250;
        rc[i].out.reason = SMTP_REASON_REPLY;
        snprintf(rc[i].out.text, sizeof(rc[i].out.text), "2.0.0 ok");
    }
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    struct job *j = test_job(id, "example.test", idx, 2);
    job_finish(f->d, t, j, env, rc, NULL, &where);
    free(j);
    settle(f);
    assert_false(stored(f, id, 1));

    struct smtp_outcome tmp;
    memset(&tmp, 0, sizeof(tmp));
    tmp.status = SMTP_STATUS_TEMPFAIL;
    tmp.code = 451;
    tmp.reason = SMTP_REASON_REPLY;
    tmp.enh = (struct smtp_enh){4, 3, 0};
    snprintf(tmp.text, sizeof(tmp.text), "4.3.0 try later");
    j = test_job(id2, "example.test", idx, 2);
    job_finish(f->d, t, j, env2, NULL, &tmp, &where);
    free(j);
    settle(f);
    assert_true(stored(f, id2, 1));
    assert_null(f->d->pending);
    queue_envelope_free(env);
    queue_envelope_free(env2);

    assert_int_equal(f->d->stats.delivered, 1);
    assert_int_equal(f->d->stats.deferred, 1);
    assert_int_equal(t->delivered, 1); /* recipient 1 of id only */
    assert_int_equal(t->failed, 2);    /* the operator's bounces */
    uint64_t deferred = 0;
    for (unsigned c = 0; c < BOUNCE_CLASS_COUNT; c++)
        deferred += t->deferred_by_class[c];
    assert_int_equal(deferred, 1); /* recipient 1 of id2 only */
    log_open(NULL, LOG_INFO);
    assert_int_equal(log_lines_with(logpath, "event=delivered rcpt=<user1@example.test>"), 1);
    assert_int_equal(log_lines_with(logpath, "event=delivered"), 1);
    assert_int_equal(log_lines_with(logpath, "event=deferred rcpt=<user1@example.test>"), 1);
    assert_int_equal(log_lines_with(logpath, "event=deferred"), 1);
    assert_int_equal(log_lines_with(logpath, "event=bounced"), 2);
    fx_free(f);
}

/* The suppression list on (in the fixture's directory), fed by
 * invalid_recipient bounces; suppress_off closes it. */
static void
suppress_on(struct fx *f, struct suppress_config *sc)
{
    char err[256], path[320];
    assert_int_equal(conf_defaults(suppress_conf_keys, sc, err, sizeof(err)), 0);
    assert_int_equal(conf_set(suppress_conf_keys, sc, "map_size", "16M", err, sizeof(err)), 0);
    assert_int_equal(
        conf_set(suppress_conf_keys, sc, "on_invalid_recipient", "30d", err, sizeof(err)), 0);
    snprintf(path, sizeof(path), "%s/suppress", f->dir);
    assert_int_equal(conf_set(suppress_conf_keys, sc, "path", path, err, sizeof(err)), 0);
    assert_int_equal(suppress_config_check(sc, f->dir, err, sizeof(err)), 0);
    assert_int_equal(suppress_open(sc, &f->e.suppress, err, sizeof(err)), 0);
    assert_int_equal(suppress_attach_queue(f->e.suppress, f->e.queue), 0);
    delivery_env_take(f->d);
}

static void
suppress_off(struct fx *f, struct suppress_config *sc)
{
    suppress_detach_queue(f->e.suppress);
    suppress_close(f->e.suppress);
    f->e.suppress = NULL;
    delivery_env_take(f->d);
    conf_free(suppress_conf_keys, sc);
}

/* A sender check answered at RCPT (Postfix's reject_unlisted_sender
 * under smtpd_delay_reject = yes, its default: "550 5.1.0 <sender>:
 * Sender address rejected: User unknown in local recipient table")
 * bounces the recipient as invalid_recipient, yet says nothing of it:
 * not suppressed. The recipient's own 550 5.1.1 at RCPT still is. Before
 * the fix both were. */
static void
sender_refused_at_rcpt_suppresses_nothing(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    struct suppress_config sc = {0};
    suppress_on(f, &sc);

    const unsigned idx[] = {0, 1};
    uint64_t id = store(f, "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    struct smtp_client_rcpt rc[2];
    memset(rc, 0, sizeof(rc));
    for (int i = 0; i < 2; i++) {
        rc[i].out.status = SMTP_STATUS_PERMFAIL;
        rc[i].out.code = 550;
        rc[i].out.reason = SMTP_REASON_REPLY;
        rc[i].out.stage = SMTP_CLIENT_S_RCPT;
    }
    rc[0].out.enh = (struct smtp_enh){5, 1, 0};
    snprintf(rc[0].out.text, sizeof(rc[0].out.text),
             "5.1.0 <news@shop.example>: Sender address rejected: User unknown in local "
             "recipient table");
    rc[1].out.enh = (struct smtp_enh){5, 1, 1};
    snprintf(rc[1].out.text, sizeof(rc[1].out.text),
             "5.1.1 <user1@example.test>: Recipient address rejected: User unknown in local "
             "recipient table");
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    struct job *j = test_job(id, "example.test", idx, 2);
    job_finish(f->d, t, j, env, rc, NULL, &where);
    free(j);
    queue_envelope_free(env);
    settle(f);
    assert_int_equal(f->d->stats.bounced, 2);
    suppress_sync(f->e.suppress);
    assert_int_equal(suppress_check(f->e.suppress, NULL, "user0@example.test", NULL), 0);
    assert_int_equal(suppress_check(f->e.suppress, NULL, "user1@example.test", NULL), 1);
    suppress_off(f, &sc);
    fx_free(f);
}

static void mbox_drop(struct fx *f);

static void fail_job(struct fx *f, struct dest *t, uint64_t id, const unsigned *idx,
                     unsigned n, const struct smtp_client_rcpt *rc,
                     const struct queue_envelope *old);

/* Recipient 0 of id refused at RCPT with a 550 of enh and text, as a
 * job of t's; the outcome committed (fail_job). */
static void
fail_rcpt0(struct fx *f, struct dest *t, uint64_t id, struct smtp_enh enh, const char *text)
{
    struct smtp_client_rcpt rc[1];
    memset(rc, 0, sizeof(rc));
    rc[0].out.status = SMTP_STATUS_PERMFAIL;
    rc[0].out.code = 550;
    rc[0].out.reason = SMTP_REASON_REPLY;
    rc[0].out.stage = SMTP_CLIENT_S_RCPT;
    rc[0].out.enh = enh;
    snprintf(rc[0].out.text, sizeof(rc[0].out.text), "%s", text);
    const unsigned i0 = 0;
    fail_job(f, t, id, &i0, 1, rc, NULL);
}

/* A held failure (its DSN waiting for the rest of its message) feeds the
 * suppression list with the server's reply, not with the DSN entry the
 * spool keeps in front of it ("dsn-held STATUS CLASS MX ..."). Before the
 * fix the entry's note began with that. */
static void
held_failure_suppression_note_has_the_reply(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    struct suppress_config sc = {0};
    suppress_on(f, &sc);
    uint64_t id = store_from(f, "sender@example.org", "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    fail_rcpt0(f, t, id, (struct smtp_enh){5, 1, 1}, "5.1.1 <user0@example.test>: no such user");
    assert_true(stored(f, id, 0)); /* held: recipient 1 is ready */
    suppress_sync(f->e.suppress);
    struct suppress_entry e;
    assert_int_equal(suppress_check(f->e.suppress, NULL, "user0@example.test", &e), 1);
    assert_string_equal(e.note, "bounce: 5.1.1 <user0@example.test>: no such user");
    suppress_off(f, &sc);
    mbox_drop(f);
    fx_free(f);
}

/* Our own refusal to send a RCPT (an ORCPT too long to format: the
 * client's local 553 5.1.3, smtp_client_txn.c) bounces the recipient as
 * invalid_recipient, but no server said anything of the address: not
 * suppressed. Before the fix it was, on the global list. */
static void
local_rcpt_error_suppresses_nothing(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    struct suppress_config sc = {0};
    suppress_on(f, &sc);
    const unsigned idx[] = {0};
    uint64_t id = store(f, "example.test", 1);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    struct smtp_client_rcpt rc[1];
    memset(rc, 0, sizeof(rc));
    /* as smtp_client_txn.c's smtp_client_txn_write makes it */
    rc[0].out.status = SMTP_STATUS_PERMFAIL;
    rc[0].out.scope = SMTP_SCOPE_RCPT;
    rc[0].out.reason = SMTP_REASON_ADDRESS;
    rc[0].out.stage = SMTP_CLIENT_S_RCPT;
    rc[0].out.code = 553;
    rc[0].out.enh = (struct smtp_enh){5, 1, 3};
    snprintf(rc[0].out.text, sizeof(rc[0].out.text),
             "recipient address or RCPT parameter cannot be sent: line too long");
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    struct job *j = test_job(id, "example.test", idx, 1);
    job_finish(f->d, t, j, env, rc, NULL, &where);
    free(j);
    queue_envelope_free(env);
    settle(f);
    assert_int_equal(f->d->stats.bounced, 1);
    suppress_sync(f->e.suppress);
    assert_int_equal(suppress_check(f->e.suppress, NULL, "user0@example.test", NULL), 0);
    suppress_off(f, &sc);
    fx_free(f);
}

/* RFC 821's code for the server's limit of recipients, "552 5.5.3 Too
 * many recipients", is temporary (RFC 5321 4.5.3.1.10: "clients SHOULD
 * treat a 552 code in this case as a temporary ... failure"), also in a
 * transaction that delivered nothing (a receiver that counts recipients
 * per session refuses every RCPT of a reused connection's transaction so;
 * or the dot failed for the others): the recipient is deferred along the
 * retry schedule, as after a 452 4.5.3, never bounced. Before the fix it
 * was bounced (a bounce event, a DSN to the sender). */
static void
rcpt_limit_552_is_deferred(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    const unsigned idx[] = {0, 1};
    uint64_t id = store(f, "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    struct smtp_client_rcpt rc[2];
    memset(rc, 0, sizeof(rc));
    /* the first accepted, then the dot answered 451 */
    rc[0].out.status = SMTP_STATUS_TEMPFAIL;
    rc[0].out.scope = SMTP_SCOPE_MESSAGE;
    rc[0].out.reason = SMTP_REASON_REPLY;
    rc[0].out.stage = SMTP_CLIENT_S_DOT;
    rc[0].out.code = 451;
    rc[0].out.enh = (struct smtp_enh){4, 3, 0};
    snprintf(rc[0].out.text, sizeof(rc[0].out.text), "4.3.0 local error, try again");
    /* the second refused for the server's limit, RFC 821's way */
    rc[1].out.status = SMTP_STATUS_PERMFAIL;
    rc[1].out.scope = SMTP_SCOPE_RCPT;
    rc[1].out.reason = SMTP_REASON_REPLY;
    rc[1].out.stage = SMTP_CLIENT_S_RCPT;
    rc[1].out.code = 552;
    rc[1].out.enh = (struct smtp_enh){5, 5, 3};
    snprintf(rc[1].out.text, sizeof(rc[1].out.text), "5.5.3 Too many recipients");
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    struct job *j = test_job(id, "example.test", idx, 2);
    uint64_t before = clock_unix_ms();
    job_finish(f->d, t, j, env, rc, NULL, &where);
    free(j);
    queue_envelope_free(env);
    settle(f);
    assert_int_equal(f->d->stats.bounced, 0);
    assert_int_equal(f->bounces, 0);
    assert_int_equal(f->d->stats.deferred, 2);
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    assert_int_equal(env->nrcpt, 2);
    for (unsigned k = 0; k < env->nrcpt; k++) {
        assert_int_equal(env->rcpt[k].state, QUEUE_RCPT_DEFERRED);
        assert_true(env->rcpt[k].due_ms > before); /* along the schedule, not at once */
    }
    queue_envelope_free(env);
    fx_free(f);
}

/* A rate-limited deferral of a transaction of several recipients (a
 * "451 4.7.650 ... temporarily rate limited" to the dot, every recipient
 * sharing it) is one sign of load: the destination's rates are halved
 * once, as for a transaction of one. Before the fix each recipient
 * halved them again: four recipients took them to 6%. */
static void
rate_limited_job_backs_off_once(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    const unsigned idx[] = {0, 1, 2, 3};
    uint64_t id = store(f, "example.test", 4);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    assert_int_equal(limits_key_rate_pct(&t->lim, f->w.now), 100);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    struct smtp_client_rcpt rc[4];
    memset(rc, 0, sizeof(rc));
    for (int i = 0; i < 4; i++) {
        rc[i].out.status = SMTP_STATUS_TEMPFAIL;
        rc[i].out.scope = SMTP_SCOPE_MESSAGE;
        rc[i].out.reason = SMTP_REASON_REPLY;
        rc[i].out.stage = SMTP_CLIENT_S_DOT;
        rc[i].out.code = 451;
        rc[i].out.enh = (struct smtp_enh){4, 7, 650};
        snprintf(rc[i].out.text, sizeof(rc[i].out.text),
                 "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited");
    }
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    struct job *j = test_job(id, "example.test", idx, 4);
    job_finish(f->d, t, j, env, rc, NULL, &where);
    free(j);
    queue_envelope_free(env);
    settle(f);
    assert_int_equal(f->d->stats.deferred, 4);
    assert_int_equal(limits_key_rate_pct(&t->lim, f->w.now), 50);
    fx_free(f);
}

static void
fail_job(struct fx *f, struct dest *t, uint64_t id, const unsigned *idx, unsigned n,
         const struct smtp_client_rcpt *rc, const struct queue_envelope *old)
{
    struct queue_envelope *env = NULL;
    if (old == NULL)
        assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    struct smtp_outcome fail;
    memset(&fail, 0, sizeof(fail));
    fail.status = SMTP_STATUS_PERMFAIL;
    fail.code = 550;
    fail.reason = SMTP_REASON_REPLY;
    fail.enh = (struct smtp_enh){5, 1, 1};
    snprintf(fail.text, sizeof(fail.text), "5.1.1 no such user");
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_CONNECT};
    struct job *j = test_job(id, "example.test", idx, n);
    job_finish(f->d, t, j, old != NULL ? old : env, rc, rc != NULL ? NULL : &fail, &where);
    free(j);
    queue_envelope_free(env);
    settle(f);
}

static void
mbox_drop(struct fx *f)
{
    for (struct worker_msg *m = f->w.mbox_head, *next; m != NULL; m = next) {
        next = m->next;
        assert_true(delivery_msg_free(m));
    }
    f->w.mbox_head = NULL;
    f->w.mbox_tail = &f->w.mbox_head;
}

/* The end of a test: nothing left waiting for the spool, the worker's
 * mailbox emptied, the fixture freed. */
static void
fx_end(struct fx *f)
{
    assert_null(f->d->pending);
    mbox_drop(f);
    fx_free(f);
}

/* Whether id's envelope carries its delay warning's mark. */
static void
assert_delay_warned(struct fx *f, uint64_t id, bool warned)
{
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    assert_int_equal(env->delay_warned, warned);
    queue_envelope_free(env);
}

/* Recipient idx of id's held failure come due (outcome_held_due, as a
 * due poll's DSN flush), settled. */
static void
held_due(struct fx *f, struct dest *t, uint64_t id, unsigned idx)
{
    struct job *j = test_job(id, "example.test", &idx, 1);
    j->dsn_flush = true;
    outcome_held_due(f->d, t, j); /* frees j */
    settle(f);
}

/* A message from sender@example.org to user0@one.test and user1@two.test,
 * both asking for delay warnings, that arrived ten minutes ago. */
static uint64_t
store_delayed(struct fx *f)
{
    struct queue_rcpt r[2];
    memset(r, 0, sizeof(r));
    r[0].addr = "user0@one.test";
    r[1].addr = "user1@two.test";
    r[0].notify = r[1].notify = QUEUE_NOTIFY_DELAY | QUEUE_NOTIFY_FAILURE;
    struct queue_envelope env = {
        .id = queue_id_next(f->e.queue),
        .sender = "sender@example.org",
        .arrival_ms = clock_unix_ms() - 600000,
        .nrcpt = 2,
        .rcpt = r,
    };
    static const char body[] = "Subject: test\r\n\r\nhello\r\n";
    struct iovec iov = {(void *)body, sizeof(body) - 1};
    assert_int_equal(queue_enqueue_wait(f->e.queue, &env, &iov, 1), 0);
    return env.id;
}

/* Recipient idx of id deferred (450) by a job of domain's, not settled. */
static void
defer_one(struct fx *f, uint64_t id, const char *domain, unsigned idx)
{
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    struct smtp_client_rcpt rc[1];
    memset(rc, 0, sizeof(rc));
    rc[0].out.status = SMTP_STATUS_TEMPFAIL;
    rc[0].out.code = 450;
    rc[0].out.reason = SMTP_REASON_REPLY;
    rc[0].out.stage = SMTP_CLIENT_S_RCPT;
    rc[0].out.enh = (struct smtp_enh){4, 2, 0};
    snprintf(rc[0].out.text, sizeof(rc[0].out.text), "4.2.0 try again later");
    struct dest *t = dest_get(f->d, domain);
    assert_non_null(t);
    struct outcome_where where = {.mx = "mx.example.test", .src = CLASSIFY_REPLY};
    struct job *j = test_job(id, domain, &idx, 1);
    job_finish(f->d, t, j, env, rc, NULL, &where);
    free(j);
    queue_envelope_free(env);
}

/* One delay warning per message ([bounce] delay_warning): two batches of
 * one message (two domains) deferred past it, their commits durable
 * together, give one warning naming both, and the message is marked;
 * two checks that cross (both read the envelope before either's commit)
 * store one. Before the fix each batch sent its own. */
static void
delay_warning_once_per_message(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    f->cfg->bounce.delay_warning = 60000;
    uint64_t id = store_delayed(f);
    struct hold h;
    hold_start(f, &h);
    defer_one(f, id, "one.test", 0);
    defer_one(f, id, "two.test", 1);
    hold_end(f, &h);
    settle(f);
    assert_int_equal(f->d->stats.deferred, 2);
    assert_int_equal(f->d->stats.dsn_queued, 1);
    struct dsn_scan s;
    dsns_expect(f, &s, 1);
    assert_int_equal(dsns_naming(f, &s, "user0@one.test"), 1);
    assert_int_equal(dsns_naming(f, &s, "user1@two.test"), 1);
    assert_int_equal(dsns_naming(f, &s, "Action: delayed"), 1);
    assert_delay_warned(f, id, true);
    /* deferred again: none more */
    defer_one(f, id, "one.test", 0);
    settle(f);
    assert_int_equal(f->d->stats.dsn_queued, 1);

    /* crossing checks, on a second message */
    uint64_t id2 = store_delayed(f);
    defer_one(f, id2, "one.test", 0);
    settle(f);
    assert_int_equal(f->d->stats.dsn_queued, 1); /* user1 still ready: it waits */
    assert_non_null(f->d->delay_rechecks);       /* for dsn_wait at most */
    defer_one(f, id2, "one.test", 0);            /* again: still one a message */
    settle(f);
    assert_int_equal(hash_count(&f->d->delay_recheck_ids), 1);
    f->cfg->bounce.dsn_wait = 0;                 /* ... at most this long */
    struct outcome_info info = {.now_ms = clock_unix_ms()};
    hold_start(f, &h);
    outcome_delay_check(f->d, dest_get(f->d, "one.test"), id2, &info, NULL);
    outcome_delay_check(f->d, dest_get(f->d, "two.test"), id2, &info, NULL);
    hold_end(f, &h);
    settle(f);
    assert_int_equal(f->d->stats.dsn_queued, 2);
    struct dsn_scan s2;
    dsns_expect(f, &s2, 2);
    fx_end(f);
}

/* The per-recipient fields of addr in the one DSN of s (its block of
 * the message/delivery-status part, up to the blank line), into out. */
static void
dsn_rcpt_fields(struct fx *f, struct dsn_scan *s, const char *addr, char *out, size_t cap)
{
    static char body[65536];
    size_t len = 0;
    assert_int_equal(s->n, 1);
    assert_int_equal(queue_body_read(f->e.queue, s->ids[0], 0, body, sizeof(body) - 1, &len), 0);
    body[len] = '\0';
    char want[300];
    snprintf(want, sizeof(want), "Final-Recipient: rfc822; %s\r\n", addr);
    const char *p = strstr(body, want);
    assert_non_null(p);
    const char *e = strstr(p, "\r\n\r\n");
    size_t n = e != NULL ? (size_t)(e - p) : strlen(p);
    assert_true(n < cap);
    memcpy(out, p, n);
    out[n] = '\0';
}

/* A recipient still queued, never tried (its domain suspended, or behind
 * a backlog), when its message's one delay warning goes (past dsn_wait
 * after delay_warning) is named in it: it is delayed as much as the
 * others, asked for a warning (NOTIFY=DELAY), and the message's mark
 * keeps every later one from it. Before the fix it was left out, so that
 * it never had a warning, where earlier versions warned it at its first
 * deferral past delay_warning. */
static void
delay_warning_names_a_recipient_still_queued(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    f->cfg->bounce.delay_warning = 60000;
    f->cfg->bounce.dsn_wait = 0; /* no wait for user1: it stays queued */
    uint64_t id = store_delayed(f);
    defer_one(f, id, "one.test", 0);
    settle(f);
    assert_int_equal(f->d->stats.dsn_queued, 1);
    struct dsn_scan s;
    dsns_expect(f, &s, 1);
    assert_int_equal(dsns_naming(f, &s, "Action: delayed"), 1);
    assert_int_equal(dsns_naming(f, &s, "user0@one.test"), 1);
    assert_int_equal(dsns_naming(f, &s, "user1@two.test"), 1);
    assert_delay_warned(f, id, true);
    /* the deferred one names its last attempt's MX and reply (RFC 3464
     * 2.3.5, 2.3.6), as Postfix's delay notices do; the one never tried
     * neither. Before the fix the warning named no Remote-MTA. */
    char fl[2048];
    dsn_rcpt_fields(f, &s, "user0@one.test", fl, sizeof(fl));
    assert_non_null(strstr(fl, "\r\nStatus: 4.2.0\r\n"));
    assert_non_null(strstr(fl, "\r\nRemote-MTA: dns; mx.example.test\r\n"));
    assert_non_null(strstr(fl, "\r\nDiagnostic-Code: smtp; 450 4.2.0 try again later\r\n"));
    dsn_rcpt_fields(f, &s, "user1@two.test", fl, sizeof(fl));
    assert_non_null(strstr(fl, "\r\nStatus: 4.0.0\r\n"));
    assert_null(strstr(fl, "Remote-MTA"));
    assert_null(strstr(fl, "Diagnostic-Code"));
    fx_end(f);
}

/* A deferral past delay_warning whose commit becomes durable once the
 * worker stops (the drain ends when the last connection closes, and the
 * stop can come before that connection's outcome is synced: a slow disk;
 * or answered as delivery_free waits for the spool) sends its
 * message's one warning as any: the commit works then (the DSN waits in
 * the spool for the next start's walk), and the next outcome of the
 * message may be its delivery, which warns nobody. Before the fix the
 * check was skipped while stopping: the warning went only with a later
 * deferral, and never if the message was delivered next, where earlier
 * versions committed it with that deferral. No recheck is armed then
 * (its timer would outlive the worker's heap). */
static void
delay_warning_of_a_deferral_in_the_stop(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    f->cfg->bounce.delay_warning = 60000;
    uint64_t id = store_delayed(f);
    uint64_t id2 = store_delayed(f);
    f->d->stopping = true;
    defer_one(f, id, "one.test", 0);
    defer_one(f, id, "two.test", 1);
    defer_one(f, id2, "one.test", 0); /* user1 ready: it would wait, no timer */
    settle(f);
    assert_null(f->d->delay_rechecks);
    struct dsn_scan s;
    dsns_expect(f, &s, 1);
    assert_int_equal(dsns_naming(f, &s, "Action: delayed"), 1);
    assert_delay_warned(f, id, true);
    assert_delay_warned(f, id2, false);
    fx_end(f);
}

/* A stop whose spool does not answer logs each outcome still with it
 * (outcome_pending_log, event=outcome_unanswered), so that the operator
 * knows what may go twice. A delay warning's mark (QUEUE_WARNED) is no
 * recipient's: before the fix it read "rcpt=<?> outcome=bounced" with
 * "not stored is tried again", as a failure of an unknown recipient. */
static void
pending_log_says_a_delay_warning(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    char logpath[320];
    snprintf(logpath, sizeof(logpath), "%s/log", f->dir);
    assert_int_equal(log_open(logpath, LOG_INFO), 0);
    f->cfg->bounce.delay_warning = 60000;
    f->cfg->bounce.dsn_wait = 0;
    uint64_t id = store_delayed(f);
    struct hold h;
    hold_start(f, &h);
    struct outcome_info info = {.now_ms = clock_unix_ms()};
    outcome_delay_check(f->d, dest_get(f->d, "one.test"), id, &info, NULL);
    assert_non_null(f->d->pending);
    assert_int_equal(outcome_pending_log(f->d), 1);
    hold_end(f, &h);
    settle(f);
    assert_int_equal(f->d->stats.dsn_queued, 1);
    log_open(NULL, LOG_INFO);
    assert_int_equal(log_lines_with(logpath, "event=outcome_unanswered"), 1);
    assert_int_equal(log_lines_with(logpath, "outcome=delay_warning"), 1);
    assert_int_equal(log_lines_with(logpath, "outcome=bounced"), 0);
    fx_end(f);
}

/* One DSN per message ([bounce] dsn_wait): recipient 0 fails while 1 and
 * 2 are ready (held: told bounced, kept in the spool, no DSN), 1 is
 * delivered (2 still ready: no DSN), 2 fails: one DSN naming 0 and 2. */
static void
failures_of_one_message_give_one_dsn(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    uint64_t id = store_from(f, "sender@example.org", "example.test", 3);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    const unsigned i0 = 0, i1 = 1, i2 = 2;
    fail_job(f, t, id, &i0, 1, NULL, NULL);
    assert_true(stored(f, id, 0)); /* held */
    assert_int_equal(f->d->stats.bounced, 1);
    assert_int_equal(f->d->stats.dsn_queued, 0);
    struct smtp_client_rcpt ok;
    memset(&ok, 0, sizeof(ok));
    ok.out.status = SMTP_STATUS_DELIVERED;
    ok.out.code = 250;
    ok.out.reason = SMTP_REASON_REPLY;
    snprintf(ok.out.text, sizeof(ok.out.text), "2.0.0 ok");
    fail_job(f, t, id, &i1, 1, &ok, NULL);
    assert_int_equal(f->d->stats.delivered, 1);
    assert_int_equal(f->d->stats.dsn_queued, 0);
    fail_job(f, t, id, &i2, 1, NULL, NULL);
    assert_false(stored(f, id, 0));
    assert_false(stored(f, id, 2));
    assert_int_equal(f->d->stats.bounced, 2);
    assert_int_equal(f->d->stats.dsn_queued, 1);
    struct dsn_scan s;
    dsns_expect(f, &s, 1);
    assert_int_equal(dsns_naming(f, &s, "user0@example.test"), 1);
    assert_int_equal(dsns_naming(f, &s, "user1@example.test"), 0);
    assert_int_equal(dsns_naming(f, &s, "user2@example.test"), 1);
    fx_end(f);
}

/* A held failure crossed by a transaction that started before it was
 * held (its envelope read then): that transaction's 250 for it is stale
 * (queue.h, QUEUE_TAG_HELD), not a delivery that removes it, so that its
 * DSN is not lost; it goes once nothing of the message is ready. */
static void
held_failure_crossed_by_a_delivery_keeps_its_dsn(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    uint64_t id = store_from(f, "sender@example.org", "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    struct queue_envelope *old = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &old), 0);
    const unsigned i0 = 0, both[] = {0, 1};
    fail_job(f, t, id, &i0, 1, NULL, NULL);
    assert_true(stored(f, id, 0)); /* held */
    struct smtp_client_rcpt rc[2];
    memset(rc, 0, sizeof(rc));
    rc[0].out.status = SMTP_STATUS_DELIVERED;
    rc[0].out.code = 250;
    rc[0].out.reason = SMTP_REASON_REPLY;
    snprintf(rc[0].out.text, sizeof(rc[0].out.text), "2.0.0 ok");
    rc[1].out.status = SMTP_STATUS_PERMFAIL;
    rc[1].out.code = 550;
    rc[1].out.reason = SMTP_REASON_REPLY;
    rc[1].out.enh = (struct smtp_enh){5, 1, 1};
    snprintf(rc[1].out.text, sizeof(rc[1].out.text), "5.1.1 no such user");
    fail_job(f, t, id, both, 2, rc, old);
    queue_envelope_free(old);
    assert_false(stored(f, id, 0));
    assert_false(stored(f, id, 1));
    assert_int_equal(f->d->stats.delivered, 0);
    assert_int_equal(f->d->stats.bounced, 2);
    struct dsn_scan s = {.sender = "sender@example.org"};
    assert_true(queue_walk(f->e.queue, dsn_collect, &s) >= 0);
    assert_int_equal(dsns_naming(f, &s, "user0@example.test"), 1);
    assert_int_equal(dsns_naming(f, &s, "user1@example.test"), 1);
    fx_end(f);
}

static int
take_none(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    (void)arg;
    (void)id;
    (void)r;
    return 0;
}

/* Every deferred recipient made ready, as the due poll does once due. */
static void
take_all(struct fx *f)
{
    assert_true(queue_due_take_wait(f->e.queue, UINT64_MAX / 2, 100, take_none, NULL) >= 0);
}

/* Recipient 0 of id refused with "550 2.0.0 ..." (a server that gets its
 * enhanced code wrong) while recipient 1 is ready: held. */
static void
fail_odd_status(struct fx *f, struct dest *t, uint64_t id)
{
    fail_rcpt0(f, t, id, (struct smtp_enh){2, 0, 0}, "2.0.0 refused all the same");
    assert_true(stored(f, id, 0)); /* held */
}

/* A held failure whose status is 2.X.X (a 550 with an enhanced code of
 * 2): its DSN entry is read back as it was stored, not as damaged. Before
 * the fix the DSN's Diagnostic-Code quoted the spool's "dsn-held ..."
 * entry, and each check that held it again (another recipient ready)
 * counted dsn_wait from then: while one stayed ready (a suspended
 * domain), its DSN never went. */
static void
held_failure_with_a_2xx_status_goes_after_dsn_wait(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    /* 20 s of a wall clock that passes 12 s at each step below: the
     * first step short of dsn_wait and the second past it, both by
     * seconds more than the real time the test takes between them */
    f->cfg->bounce.dsn_wait = 20000;
    uint64_t id = store_from(f, "sender@example.org", "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    fail_odd_status(f, t, id);
    const unsigned i0 = 0;
    wall_pass(12000); /* the time passing is what is tested */
    take_all(f); /* as the due poll takes it, 30 s after (dsn_wait 10m) */
    held_due(f, t, id, i0);
    assert_true(stored(f, id, 0)); /* held again: 1 is ready, dsn_wait not passed */
    wall_pass(12000);
    take_all(f);
    held_due(f, t, id, i0);
    assert_false(stored(f, id, 0)); /* 24 s since it failed: its DSN went */
    assert_true(stored(f, id, 1));
    assert_int_equal(f->d->stats.dsn_queued, 1);
    struct dsn_scan s;
    dsns_expect(f, &s, 1);
    assert_int_equal(dsns_naming(f, &s, "user0@example.test"), 1);
    assert_int_equal(dsns_naming(f, &s, "dsn-held"), 0);
    assert_int_equal(dsns_naming(f, &s, "2.0.0 refused all the same"), 1);
    mbox_drop(f);
    fx_free(f);
    wall_clock_ahead_ms = 0;
}

/* A held failure comes due (outcome_held_due): while another recipient
 * of its message is ready, and dsn_wait has not passed, it is held again
 * (no DSN); once none is (here a deferral committed behind the worker's
 * back, as when a crash came between a message's last commits and their
 * check), its DSN goes. */
static void
held_failure_due_waits_for_ready_ones_then_goes(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    uint64_t id = store_from(f, "sender@example.org", "example.test", 2);
    struct dest *t = dest_get(f->d, "example.test");
    assert_non_null(t);
    const unsigned i0 = 0;
    fail_job(f, t, id, &i0, 1, NULL, NULL);
    assert_true(stored(f, id, 0)); /* held: recipient 1 is ready */
    held_due(f, t, id, i0);
    assert_true(stored(f, id, 0)); /* held again */
    assert_int_equal(f->d->stats.dsn_queued, 0);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->e.queue, id, &env), 0);
    assert_int_equal(env->rcpt[0].tag, DSN_HELD_TAG);
    assert_true(env->rcpt[0].due_ms > clock_unix_ms());
    queue_envelope_free(env);
    struct queue_outcome later = {.id = id, .rcpt = 1, .kind = QUEUE_DEFERRED,
                                  .due_ms = clock_unix_ms() + 3600000, .code = 451,
                                  .reply = "4.3.0 later"};
    assert_int_equal(queue_update_wait(f->e.queue, &later, 1), 0);
    held_due(f, t, id, i0);
    assert_false(stored(f, id, 0));
    assert_true(stored(f, id, 1));
    assert_int_equal(f->d->stats.dsn_queued, 1);
    assert_int_equal(f->d->stats.bounced, 1); /* told once, when held */
    struct dsn_scan s;
    dsns_expect(f, &s, 1);
    assert_int_equal(dsns_naming(f, &s, "user0@example.test"), 1);
    assert_int_equal(dsns_naming(f, &s, "user1@example.test"), 0);
    fx_end(f);
}

/* A worker whose ring failed is freed without delivery_on_stop (its loop
 * ended before the stop's message), its destinations' limiter keys still
 * linked in the worker's limiter: delivery_free took them out of it
 * before freeing them. Before, limits_free walked and wrote the keys of
 * destinations already freed (ASan: heap-use-after-free in limits_free,
 * the stop of a daemon whose failed worker had delivered). */
static void
delivery_freed_without_its_stop_frees_its_keys_first(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    const unsigned idx[] = {0};
    uint64_t id = store(f, "example.test", 1);
    bounce(f, id, "example.test", idx, 1); /* a destination, with its key */
    settle(f);
    assert_int_equal(f->bounces, 1);
    struct delivery *d = f->d;
    f->d = f->dlv[0] = NULL;
    assert_null(delivery_free(d)); /* no delivery_on_stop: as after a failed ring */
    fx_free(f);
}

/* A stop whose bound for the spool's answers had run out before this
 * worker's delivery was freed (another worker's wait took it all, on a
 * spool that stalled after answering this one), the answer to one of its
 * outcomes come after its loop ended, not drained: delivery_free tells
 * it (stored: the bounce is out of the spool) and frees the delivery.
 * Before, the wait was cut without a look at the port: the outcome was
 * logged event=outcome_unanswered ("not stored, tried again after the
 * restart"), its delivery log line never written, and the delivery left
 * to the exit. */
static void
outcome_answered_before_the_bound_ran_out_is_told(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    const unsigned idx[] = {0};
    uint64_t id = store(f, "example.test", 1);
    bounce(f, id, "example.test", idx, 1);
    struct pollfd pfd = {.fd = queue_port_fd(f->d->port), .events = POLLIN};
    assert_int_equal(poll(&pfd, 1, 10000), 1); /* answered, not drained */
    assert_int_equal(queue_port_pending(f->d->port), 1);
    assert_int_equal(f->bounces, 0);
    assert_false(stored(f, id, 0));
    f->e.stop_commit_until = clock_mono_ns(); /* the stop's bound: over */
    struct delivery *d = f->d;
    f->d = f->dlv[0] = NULL;
    assert_null(delivery_free(d));
    assert_int_equal(f->bounces, 1); /* told */
    fx_free(f);
}

/* A drain whose connections are all gone while a delivery's outcome is
 * still with the spool (its disk slow, or stalled) is not done: before,
 * drain_check counted connections only, and the stop logged
 * event=drain_done note=nothing_in_flight with the outcome's commit
 * still waiting. Done once the spool answered. */
static void
drain_not_done_while_an_outcome_is_with_the_spool(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    const unsigned idx[] = {0};
    uint64_t id = store(f, "example.test", 1);
    struct hold h;
    hold_start(f, &h);
    f->d->draining = true;
    bounce(f, id, "example.test", idx, 1); /* its outcome: with the held spool */
    assert_null(f->d->all);
    assert_int_equal(queue_port_pending(f->d->port), 1);
    drain_check(f->d);
    assert_false(f->d->drained);
    assert_int_equal(atomic_load(&f->e.drained), 0);

    hold_end(f, &h);
    settle(f);
    assert_int_equal(f->bounces, 1);
    drain_check(f->d);
    assert_true(f->d->drained);
    assert_int_equal(atomic_load(&f->e.drained), 1);
    fx_free(f);
}

/* An outcome whose commit failed waits on d->retrying for its next try,
 * not with the spool (its port has nothing pending): the drain is not
 * done while it is not stored either (the README: the outcomes of the
 * transactions the drain let finish are stored). Before, drain_check
 * looked at the port alone, and the stop logged drain_done
 * note=nothing_in_flight, then freed the batch unstored
 * (outcome_commit_failed note=retried_after_restart). d->pending holds
 * every batch not durable yet, the retrying ones too: one stands for it
 * here (a commit that fails has no seam in this fixture). */
static void
drain_not_done_while_an_outcome_waits_to_be_tried_again(void **state)
{
    (void)state;
    struct fx *f = fx_new();
    f->d->draining = true;
    assert_null(f->d->all);
    assert_int_equal(queue_port_pending(f->d->port), 0);
    long stand_in;
    f->d->pending = (struct outcome_batch *)(void *)&stand_in;
    drain_check(f->d);
    assert_false(f->d->drained);
    assert_int_equal(atomic_load(&f->e.drained), 0);

    f->d->pending = NULL; /* its retry committed */
    drain_check(f->d);
    assert_true(f->d->drained);
    assert_int_equal(atomic_load(&f->e.drained), 1);
    fx_free(f);
}

/* The support clock itself (tests/support/wall_clock.c) behind the
 * kernel's, as a test stepping the wall clock back sets it: every
 * timespec it gives has tv_nsec in [0, 1e9) (a negative one, from a
 * remainder taken toward 0, is one no reader expects), and its time is
 * the kernel's less the offset: read between two readings of the kernel's
 * (a thread of the test's own, wall_clock_keep_real), to the ms. */
static void *
kernel_realtime(void *arg)
{
    wall_clock_keep_real();
    struct timespec *ts = arg;
    clock_gettime(CLOCK_REALTIME, ts);
    return NULL;
}

static long long
ts_ms(const struct timespec *ts)
{
    return (long long)ts->tv_sec * 1000 + ts->tv_nsec / 1000000;
}

static void
wall_clock_behind_keeps_tv_nsec_in_range(void **state)
{
    (void)state;
    static const long long offsets[] = {-1,    -999, -1000, -1001, -1500,
                                        -2999, 999,  1001,  1999,  -3600000};
    for (size_t i = 0; i < sizeof(offsets) / sizeof(offsets[0]); i++) {
        struct timespec before, at, after;
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, kernel_realtime, &before), 0);
        assert_int_equal(pthread_join(t, NULL), 0);
        wall_clock_ahead_ms = offsets[i];
        assert_int_equal(clock_gettime(CLOCK_REALTIME, &at), 0);
        wall_clock_ahead_ms = 0;
        assert_int_equal(pthread_create(&t, NULL, kernel_realtime, &after), 0);
        assert_int_equal(pthread_join(t, NULL), 0);
        if (at.tv_nsec < 0 || at.tv_nsec >= 1000000000L)
            fail_msg("offset %lld ms: tv_nsec %ld", offsets[i], at.tv_nsec);
        long long ms = ts_ms(&at) - offsets[i];
        if (ms < ts_ms(&before) || ms > ts_ms(&after))
            fail_msg("offset %lld ms: %lld ms, not within [%lld, %lld] less the offset", offsets[i],
                     ts_ms(&at), ts_ms(&before), ts_ms(&after));
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(wall_clock_behind_keeps_tv_nsec_in_range),
        cmocka_unit_test(bounce_of_a_gone_message_tells_nothing),
        cmocka_unit_test(second_bounce_before_the_first_is_durable),
        cmocka_unit_test(bounce_after_a_250_not_yet_durable),
        cmocka_unit_test(dsn_committed_while_stopping_waits_for_the_next_start),
        cmocka_unit_test(stale_outcome_tells_the_backend_nothing),
        cmocka_unit_test(stale_outcome_in_no_dsn_and_no_counter),
        cmocka_unit_test(dsns_of_two_processes_have_their_own_message_ids),
        cmocka_unit_test(stale_outcome_beside_a_dsn_keeps_the_dsn),
        cmocka_unit_test(failures_of_one_message_give_one_dsn),
        cmocka_unit_test(delay_warning_once_per_message),
        cmocka_unit_test(delay_warning_names_a_recipient_still_queued),
        cmocka_unit_test(pending_log_says_a_delay_warning),
        cmocka_unit_test(delay_warning_of_a_deferral_in_the_stop),
        cmocka_unit_test(held_failure_crossed_by_a_delivery_keeps_its_dsn),
        cmocka_unit_test(held_failure_due_waits_for_ready_ones_then_goes),
        cmocka_unit_test(held_failure_with_a_2xx_status_goes_after_dsn_wait),
        cmocka_unit_test(stale_outcome_not_in_the_domains_view_nor_the_log),
        cmocka_unit_test(sender_refused_at_rcpt_suppresses_nothing),
        cmocka_unit_test(local_rcpt_error_suppresses_nothing),
        cmocka_unit_test(held_failure_suppression_note_has_the_reply),
        cmocka_unit_test(rcpt_limit_552_is_deferred),
        cmocka_unit_test(rate_limited_job_backs_off_once),
        cmocka_unit_test(delivery_freed_without_its_stop_frees_its_keys_first),
        cmocka_unit_test(outcome_answered_before_the_bound_ran_out_is_told),
        cmocka_unit_test(drain_not_done_while_an_outcome_is_with_the_spool),
        cmocka_unit_test(drain_not_done_while_an_outcome_waits_to_be_tried_again),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
