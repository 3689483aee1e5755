/*
 * delivery: see delivery.h. The public face of the outbound side, on each
 * worker: jobs handed over from any thread (delivery_submit) arrive here
 * and go to their destination's queue (outbound/dest.c), on the
 * worker the route table of site affinity names (engine/route.h); the
 * spool's port; start, stop, drain and reload; the views operators get
 * (domains, objects, stats) and their commands (suspend, bounce). The
 * spool's due recipients are polled and submitted by delivery_due.c.
 *
 * The rest of the outbound side, one file per concern (internal.h says
 * who does what): outbound/dest.c keeps the destinations,
 * outbound/scheduler.c decides what goes where and when,
 * outbound/site.c keeps the sites and their windows, outbound/connection.c
 * is the SMTP connection, outbound/outcome.c acts on outcomes (spool,
 * logs, DSNs), and outbound/policy.c takes every failure decision.
 *
 * This file and engine/delivery_due.c are the only files of the outbound
 * side that read struct engine: this one gives the others what they use
 * of it (delivery_env_take, and the calls under "between the engine and
 * the outbound side").
 *
 * Threading: the worker's thread, but delivery_submit() and the calls
 * delivery.h marks as any thread; delivery_trim's counters are every
 * worker's, atomic.
 */
#include "engine/delivery.h"

#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __GLIBC__ /* (defined by the headers above) */
#include <malloc.h>
#endif

#include "common/clock.h"
#include "common/idn.h"
#include "common/hash.h"
#include "common/intern.h"
#include "common/log.h"
#include "engine/dsn.h"
#include "engine/engine.h"
#include "engine/outbound/internal.h"
#include "engine/resolver.h"
#include "engine/route.h"
#include "engine/server.h"
#include "engine/shaping.h"
#include "engine/stats.h"
#include "queue/queue.h"
#include "tls/tls.h"

#define TRIM_MIN_BYTES ((size_t)1 << 20) /* freed since the last malloc_trim, for another */
#define TRIM_EVERY_MS  60000             /* ... at most this often while sweeps free */

/* ---- between the engine and the outbound side ---- */

void
delivery_env_take(struct delivery *d)
{
    const struct engine *e = d->e;
    d->cfg = e->cfg;
    d->names = e->names;
    d->queue = e->queue;
    d->dlog = e->dlogw != NULL ? e->dlogw[d->w->id] : NULL;
    d->events = e->events;
    d->suppress = e->suppress;
    d->warmup = e->warmup;
    d->shaping = e->shaping;
    d->gens = e->gens;
    d->nworkers = e->nworkers;
    d->started_ms = e->started_ms;
}

struct mta_sts *
delivery_mta_sts(const struct delivery *d)
{
    return d->e->mta_sts;
}

struct tls_ctx *
delivery_tls_client(struct delivery *d)
{
    return engine_tls_client(d->e);
}

bool
delivery_tls_on(const struct delivery *d)
{
    return d->e->tls_client != NULL;
}

void
delivery_submit_dsn(struct delivery *d, uint64_t id, const char *rcpt, const char *tenant,
                    const char *pool, const char *campaign)
{
    delivery_submit_local(d->e, id, rcpt, tenant, pool, campaign, false);
}

/* A sweep freed about bytes (its destinations' structs and its pooled
 * buffers; their names, answers and sites are not counted): the heap's
 * free pages go back to the system when the workers freed enough since
 * the last trim, and no sweep of any worker freed anything since the
 * last one looked (what churned has stopped: the count is as that sweep
 * left it), or the last trim is a minute old. The counter is taken whole
 * (compare-exchange) by the one sweep that trims; another's bytes added
 * meanwhile wait for the next. */
void
delivery_trim(struct delivery *d, size_t bytes, uint64_t now)
{
#ifdef __GLIBC__
    struct engine *e = d->e;
    size_t pending = atomic_fetch_add(&e->freed_untrimmed, bytes) + bytes;
    size_t seen = atomic_exchange(&e->freed_seen, pending);
    if (pending < TRIM_MIN_BYTES)
        return;
    bool quiet = bytes == 0 && seen == pending;
    uint64_t last = atomic_load(&e->trimmed_at);
    if (!quiet && last != 0 && now - last < MS_TO_NS(TRIM_EVERY_MS))
        return;
    if (!atomic_compare_exchange_strong(&e->freed_untrimmed, &pending, 0))
        return;
    atomic_store(&e->trimmed_at, now);
    uint64_t t0 = clock_mono_ns();
    malloc_trim(0);
    log_msg(LOG_INFO, "event=memory_trimmed freed_kb=%zu us=%llu", pending / 1024,
            (unsigned long long)((clock_mono_ns() - t0) / 1000));
#else
    (void)d, (void)bytes, (void)now;
#endif
}

/* ---- what the scheduler calls out to, on a running worker ---- */

static int
ops_resolve(struct delivery *d, struct dest *t, const char *name, struct dns_mx_result **res,
            struct dns_req **req)
{
    if (d->res == NULL)
        return -ENXIO;
    return resolver_mx_resolve(d->res, name, dest_on_mx, t, res, req);
}

static void
ops_cancel(struct delivery *d, struct dns_req *req)
{
    if (d->res != NULL)
        resolver_cancel(d->res, req);
}

static int
ops_txt(struct delivery *d, const char *name, dns_txt_fn *cb, void *arg)
{
    if (d->res == NULL)
        return -ENXIO;
    return resolver_txt_lookup(d->res, name, cb, arg);
}

uint32_t
delivery_domain_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)(*s | 0x20)) * 16777619u;
    return h;
}

/* ---- site affinity: the route table (engine/route.h) ---- */

unsigned
delivery_worker_of(const struct engine *e, const char *domain, uint32_t pool)
{
    uint32_t h = delivery_domain_hash(domain);
    if (pool == 0 && e->route != NULL) {
        int w = route_worker(e->route, h);
        if (w >= 0 && (unsigned)w < e->nworkers)
            return (unsigned)w;
    }
    return h % e->nworkers;
}

static unsigned
ops_route(struct delivery *d, const char *domain)
{
    return delivery_worker_of(d->e, domain, 0);
}

static uint32_t
route_now_s(const struct delivery *d)
{
    return (uint32_t)(d->w->now / 1000000000u) + 1; /* never 0 */
}

static void
ops_site_busy(struct delivery *d, const char *host)
{
    if (d->e->route == NULL)
        return;
    uint32_t now = route_now_s(d);
    if (route_busy_mark(d->e->route, delivery_domain_hash(host), now, now + SITE_BUSY_MS / 1000))
        log_msg(LOG_INFO, "event=site_busy mx=%s for_ms=%u note=domains_not_gathered", host,
                (unsigned)SITE_BUSY_MS);
}

static bool
ops_claim(struct delivery *d, const char *domain, unsigned worker, const char *host)
{
    if (d->e->route == NULL || worker >= d->e->nworkers)
        return false;
    if (host != NULL && route_busy(d->e->route, delivery_domain_hash(host), route_now_s(d)))
        return false; /* a site one worker does not carry: spread */
    return route_claim(d->e->route, delivery_domain_hash(domain), worker);
}

static void
ops_unclaim(struct delivery *d, const char *domain)
{
    if (d->e->route != NULL)
        route_unclaim(d->e->route, delivery_domain_hash(domain), d->w->id);
}

static void delivery_on_job(struct worker *w, struct worker_msg *m);

/* A domain's MX answer, ahead of its jobs, to the worker it moved to: a
 * second lookup there would cost what the first did. */
struct handover {
    struct worker_msg m;
    struct dns_mx_result *mx; /* one reference */
    bool tls_relaxed;
    char name[];
};

static void
handover_on_arrive(struct worker *w, struct worker_msg *m)
{
    struct engine *e = w->ctx;
    struct delivery *d = e->dlv[w->id];
    struct handover *h = (struct handover *)m;
    struct dest *t = d != NULL && !d->stopping ? dest_get_for(d, h->name, 0, h->tls_relaxed)
                                                : NULL;
    /* A destination left here by an earlier move has an older answer: the
     * new one, unless connections still use the old. */
    if (t != NULL && (t->mx == NULL || (t->conns == 0 && h->mx->expires > t->mx->expires))) {
        if (t->req != NULL) { /* a job that overtook the answer asked already */
            d->ops->cancel(d, t->req);
            t->req = NULL;
        }
        dest_set_mx(t, h->mx);
        h->mx = NULL;
        if (!fairq_empty(&t->q))
            dest_run(t);
    }
    dns_mx_result_unref(h->mx);
    free(h);
}

/* t's domain now belongs to worker `worker`: its answer, then its
 * waiting jobs, in order, one post. */
static void
ops_hand_over(struct dest *t, unsigned worker)
{
    struct delivery *d = t->d;
    struct worker_msg *first = NULL, *last = NULL;
    size_t nl = strlen(t->name);
    struct handover *h = NULL;
    if (t->mx != NULL && t->mx->status == DNS_OK && (h = malloc(sizeof(*h) + nl + 1)) != NULL) {
        h->m.fn = handover_on_arrive;
        h->mx = dns_mx_result_ref(t->mx);
        h->tls_relaxed = t->tls_relaxed;
        memcpy(h->name, t->name, nl + 1);
        first = last = &h->m;
    }
    struct job *j;
    while ((j = dest_pop(t)) != NULL) {
        j->m.fn = delivery_on_job;
        if (last != NULL)
            last->next = &j->m;
        else
            first = &j->m;
        last = &j->m;
        d->stats.handed_over++;
    }
    if (first != NULL)
        worker_post_chain(&d->e->workers[worker], first, last);
}

static const struct outbound_ops delivery_ops = {
    .resolve = ops_resolve,
    .cancel = ops_cancel,
    .open = conn_open,
    .resume = conn_resume,
    .quit = conn_quit,
    .fail = job_fail,
    .txt = ops_txt,
    .route = ops_route,
    .claim = ops_claim,
    .unclaim = ops_unclaim,
    .hand_over = ops_hand_over,
    .site_busy = ops_site_busy,
};

/* ---- jobs between workers ---- */

/* A campaign's id. Campaign names come from clients (X-Sluice-Campaign)
 * and ids are never freed (common/intern.h: a queued job may hold one,
 * and names are read without a lock), so the names a node makes are
 * bounded by [server] campaign_names: past it a new name gets no id. The
 * message keeps its campaign (the spool, logs and DSNs carry the name);
 * only suspend campaign=, which matches ids, does not hold it. Logged
 * at the first refusal and at every power of two after it. */
static uint32_t
owner_campaign_id(struct engine *e, const char *campaign)
{
    if (campaign == NULL || campaign[0] == '\0')
        return 0;
    /* not e->cfg: any thread calls this, outside the config's read
     * sections (engine.h campaign_names) */
    unsigned limit = atomic_load(&e->campaign_names);
    uint64_t over = 0;
    uint32_t id = intern_id_bounded(e->names, campaign, limit, &over);
    if (over != 0 && (over & (over - 1)) == 0)
        log_msg(LOG_WARN,
                "event=campaign_names_full campaign=\"%s\" limit=%u refused=%llu "
                "note=no_campaign_id_suspend_by_campaign_does_not_hold_it",
                campaign, limit, (unsigned long long)over);
    return id;
}

void
delivery_owner(struct engine *e, const char *tenant, const char *pool, const char *campaign,
               unsigned priority, struct job_owner *out)
{
    out->tenant = intern_id(e->names, tenant);
    out->pool = intern_id(e->names, pool);
    out->campaign = owner_campaign_id(e, campaign);
    out->priority = (uint8_t)(priority <= QUEUE_MAX_PRIORITY ? priority : QUEUE_MAX_PRIORITY);
    out->tls_relaxed = false;
}

void
delivery_owner_of(struct engine *e, const struct queue_owner *o, struct job_owner *out)
{
    delivery_owner(e, o->tenant, o->pool, o->campaign, o->priority, out);
    out->tls_relaxed = o->tls_relaxed;
}

static void
submit_job(struct engine *e, uint64_t id, const char *domain, const unsigned *idx, unsigned n,
           bool bounce, bool shaped, bool dsn_flush, const struct job_owner *owner)
{
    if (n == 0 || e->nworkers == 0 || (!bounce && !dsn_flush && !e->cfg->delivery.enabled))
        return; /* stays in the spool */
    struct job *j = job_new(domain, n);
    if (j == NULL) {
        /* Still in the spool: a restart delivers it. Say so. */
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(id, qid);
        log_msg(LOG_ERR, "id=%s event=job_lost_until_restart domain=%s recipients=%u "
                "reason=out_of_memory", qid, domain, n);
        return;
    }
    j->m.fn = delivery_on_job;
    j->id = id;
    j->bounce = bounce;
    j->shaped_bounce = shaped;
    j->dsn_flush = dsn_flush;
    j->owner = owner ? *owner : (struct job_owner){0};
    j->n = n;
    memcpy(j->idx, idx, n * sizeof(unsigned));
    /* A bounce goes by way of the worker the domain's name hashes to,
     * which passes it on (delivery_on_job) behind whatever it still holds
     * of the domain (a job posted before the domain moved, or its
     * hand-over). It can still cross a job of its recipient posted to
     * another worker meanwhile: that job then finds the recipient gone
     * from the spool when its transaction starts (connection.c reads the
     * live recipients) and drops it. Only a transaction that started
     * before the bounce was committed delivers a recipient its bounce
     * also reports, as Postfix's postsuper -d does to a message in
     * its active queue. */
    unsigned to = bounce ? delivery_domain_hash(j->domain) % e->nworkers
                         : delivery_worker_of(e, j->domain, j->owner.pool);
    worker_post(&e->workers[to], &j->m);
}

static void
submit(struct engine *e, uint64_t id, const char *domain, const unsigned *idx, unsigned n,
       bool bounce, bool shaped, const struct job_owner *owner)
{
    submit_job(e, id, domain, idx, n, bounce, shaped, false, owner);
}

void
delivery_submit(struct engine *e, uint64_t id, const char *domain, const unsigned *idx,
                unsigned n, const struct job_owner *owner)
{
    submit(e, id, domain, idx, n, false, false, owner);
}

void
delivery_submit_local(struct engine *e, uint64_t id, const char *rcpt, const char *tenant,
                      const char *pool, const char *campaign, bool tls_relaxed)
{
    const char *at = strrchr(rcpt, '@');
    unsigned idx = 0;
    struct job_owner own;
    delivery_owner(e, tenant, pool, campaign, 0, &own);
    own.tls_relaxed = tls_relaxed;
    submit(e, id, at != NULL ? at + 1 : "", &idx, 1, false, false, &own);
}

void
delivery_submit_bounce(struct engine *e, uint64_t id, const char *domain, const unsigned *idx,
                       unsigned n, const struct job_owner *owner)
{
    submit(e, id, domain, idx, n, true, false, owner);
}

/* ---- a shaping bounce action: what waits in the spool for its scope ---- */

/* Deferred recipients due sooner than this are left to the due poll: they
 * come up for a connection, where the scheduler bounces them (a recipient
 * taken by the poll while its bounce travelled would be both). */
#define SHAPED_BOUNCE_DUE_MARGIN_MS 5000

struct shaped_walk {
    const struct shaping_action *a; /* borrowed for the walk */
    uint64_t min_due;
    struct delivery_batch b;
};

static int
shaped_walk_add(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct shaped_walk *w = arg;
    const struct shaping_action *a = w->a;
    if (r->state != QUEUE_RCPT_DEFERRED || r->due_ms <= w->min_due || r->tag == DSN_HELD_TAG)
        return 0; /* a held failure (outcome.c) is bounced already */
    if (a->scope == SHAPING_SCOPE_DOMAIN && !idn_domain_is(a->domain, r->domain))
        return 0;
    if (a->scope == SHAPING_SCOPE_TENANT &&
        strcasecmp(a->tenant, r->owner.tenant != NULL ? r->owner.tenant : "") != 0)
        return 0;
    return delivery_batch_add(&w->b, id, r);
}

void
delivery_shaping_bounce(void *arg, const struct shaping_action *a)
{
    struct engine *e = arg;
    if (a->kind != SHAPING_BOUNCE)
        return;
    struct shaped_walk w = {.a = a, .min_due = clock_unix_ms() + SHAPED_BOUNCE_DUE_MARGIN_MS};
    w.b.e = e;
    w.b.bounce = true; /* submitted as the action's bounce */
    int rc = queue_walk(e->queue, shaped_walk_add, &w);
    delivery_batch_flush(&w.b);
    log_msg(rc < 0 ? LOG_ERR : LOG_NOTICE,
            "event=shaping_bounce_deferred id=%s scope=%s group=%s domain=%s tenant=%s "
            "recipients=%llu error=\"%s\"",
            a->id, shaping_scope_str(a->scope), a->group[0] ? a->group : "-",
            a->domain[0] ? a->domain : "-", a->tenant[0] ? a->tenant : "-",
            (unsigned long long)w.b.recipients, rc < 0 ? queue_strerror(rc) : "-");
}

/* An operator bounce on the owning worker. A recipient on a connection now
 * is left alone (its transaction decides: bouncing it could contradict a
 * 250 a moment later), and so is one whose final outcome is not durable
 * yet (outcome_pending_drop: a 250 a moment earlier, a bounce that
 * crossed this one); one waiting here is taken out of its job. */
static void
bounce_now(struct delivery *d, struct dest *t, struct job *j)
{
    unsigned n = 0, busy = 0;
    unsigned done = outcome_pending_drop(d, j);
    for (unsigned i = 0; i < j->n; i++) {
        bool flight = false;
        for (struct conn *c = d->all; c != NULL && !flight; c = c->next_all)
            if (c->dest == t && c->job != NULL && c->job->id == j->id)
                for (unsigned k = 0; k < c->job->n; k++)
                    flight |= c->job->idx[k] == j->idx[i];
        if (flight) {
            busy++;
            continue;
        }
        struct fairq_iter it;
        fairq_iter_init(&t->q, &it);
        for (struct job *q; (q = job_of(fairq_iter_next(&it))) != NULL;) {
            if (q->id == j->id) {
                unsigned m = 0;
                for (unsigned k = 0; k < q->n; k++)
                    if (q->idx[k] != j->idx[i])
                        q->idx[m++] = q->idx[k];
                dest_unqueued(t, q->n - m);
                q->n = m;
            }
            if (q->n == 0) {
                fairq_iter_remove(&it);
                dest_refused_gone(t, q);
                free(q);
            }
        }
        /* ... and of a job parked by a suspension (outbound/scope.c):
         * left there, it went back to the queue at the resume and could
         * reach a connection before this bounce's commit had marked the
         * recipient done in the spool: bounced and delivered. */
        for (struct job **pp = &d->parked; *pp != NULL;) {
            struct job *q = *pp;
            if (q->id == j->id && q->owner.pool == t->pool && strcmp(q->domain, t->name) == 0) {
                unsigned m = 0;
                for (unsigned k = 0; k < q->n; k++)
                    if (q->idx[k] != j->idx[i])
                        q->idx[m++] = q->idx[k];
                scope_unpark(d, q->n - m);
                q->n = m;
            }
            if (q->n == 0) {
                *pp = q->next_parked;
                d->stats.parked--;
                free(q);
                continue;
            }
            pp = &q->next_parked;
        }
        j->idx[n++] = j->idx[i];
    }
    j->n = n;
    if (busy > 0 || done > 0) {
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(j->id, qid);
        log_msg(LOG_NOTICE,
                "id=%s event=operator_bounce_skipped domain=%s in_flight=%u outcome_pending=%u",
                qid, t->name, busy, done);
    }
    if (n == 0) {
        free(j);
        return;
    }
    struct policy_fail f;
    policy_job(POLICY_OPERATOR_BOUNCE, &f);
    struct smtp_outcome o;
    job_outcome(&o, &f, NULL);
    /* with the last reply its recipients were deferred with, as an
     * expiry says it: the sender learns why the mail was stuck (read
     * again by job_fail: a bounce by hand is rare) */
    struct queue_envelope *env = NULL;
    if (queue_envelope_get(d->e->queue, j->id, &env) != 0)
        env = NULL;
    job_last_attempt_text(&o, j->shaped_bounce ? "bounced by a shaping action" : f.text, env, j);
    queue_envelope_free(env);
    job_fail(d, t, j, &o, f.src);
}

static void
delivery_on_job(struct worker *w, struct worker_msg *m)
{
    struct engine *e = w->ctx;
    struct delivery *d = e->dlv[w->id];
    struct job *j = (struct job *)m;
    if (e->route != NULL) {
        /* Posted before its domain moved to its site's worker: on. */
        unsigned to = delivery_worker_of(e, j->domain, j->owner.pool);
        if (to != w->id && d != NULL && !d->stopping) {
            worker_post(&e->workers[to], m);
            return;
        }
    }
    /* A destination is (domain, pool): the pool's sources only. */
    struct dest *t = d ? dest_of_job(d, j) : NULL;
    if (t == NULL) {
        job_lost(j); /* no memory for its destination */
        return;
    }
    if (j->dsn_flush) {
        outcome_held_due(d, t, j);
        return;
    }
    if (j->bounce) {
        /* a shaping bounce's deferred recipients: only where the action
         * applies to t (its group is of t's MX hosts), else they wait */
        if (j->shaped_bounce && !sched_shaping_bounces(t, j)) {
            free(j);
            return;
        }
        bounce_now(d, t, j);
        return;
    }
    if (scope_job_parked(d, j))
        return; /* its tenant or campaign is suspended */
    dest_enqueue(t, j);
}

/* ---- the spool port, and the batches of recipients it hands out ---- */

static void
port_arm(struct delivery *d)
{
    struct io_uring_sqe *sqe = worker_sqe(d->w, &d->port_op);
    io_uring_prep_poll_add(sqe, queue_port_fd(d->port), POLLIN);
}

static void
port_on_ready(struct worker *w, struct op *op, int res, uint32_t flags)
{
    struct delivery *d = (struct delivery *)((char *)op - offsetof(struct delivery, port_op));
    queue_port_drain(d->port);
    if (!d->stopping)
        port_arm(d);
    drain_check(d); /* the spool's last answer may be what the drain waited for */
}

void
delivery_batch_flush(struct delivery_batch *b)
{
    if (b->n != 0)
        submit_job(b->e, b->id, b->domain, b->idx, b->n, b->bounce && !b->held, b->bounce,
                   b->held, &b->owner);
    b->recipients += b->n;
    b->n = 0;
}

int
delivery_batch_add(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct delivery_batch *b = arg;
    /* A failure held for its message's DSN (outcome.c) is sent nowhere:
     * found ready (the due poll took it, or a restart's walk), its DSN
     * goes (outcome_held_due) */
    bool held = r->tag == DSN_HELD_TAG;
    if (b->n != 0 && (b->id != id || strcmp(b->domain, r->domain) != 0 || b->held != held ||
                      b->n == sizeof(b->idx) / sizeof(b->idx[0])))
        delivery_batch_flush(b);
    b->held = held;
    if (b->n == 0) {
        delivery_owner_of(b->e, &r->owner, &b->owner);
        b->id = id;
        snprintf(b->domain, sizeof(b->domain), "%s", r->domain);
    }
    b->idx[b->n++] = r->index;
    return 0;
}

/* ---- stopping ---- */

void
delivery_check_done(struct delivery *d)
{
    if (d->resolver_closed && d->all == NULL)
        d->w->stopping = true; /* the loop ends with this turn */
}

static void
delivery_on_resolver_closed(struct worker *w, void *arg)
{
    struct delivery *d = arg;
    d->res = NULL;
    d->resolver_closed = true;
    delivery_check_done(d);
}

/* On the worker: drop the connections (their jobs stay in the spool),
 * close the resolver, and end the loop once both are done. */
static void
delivery_on_stop(struct worker *w, struct worker_msg *m)
{
    struct delivery *d = (struct delivery *)((char *)m - offsetof(struct delivery, stop_msg));
    d->stopping = true;
    worker_timer_cancel(w, &d->due_timer);
    worker_timer_cancel(w, &d->scope_timer);
    sched_stop(d);
    for (struct conn *c = d->all; c != NULL; c = c->next_all)
        conn_stop_cut(c);
    /* Leases go back now, not after their ttl (the loop still turns). */
    sched_release_leases(d);
    if (d->res != NULL)
        resolver_close(d->res, delivery_on_resolver_closed, d);
    else
        d->resolver_closed = true;
    delivery_check_done(d);
}

static void
delivery_on_drain(struct worker *w, struct worker_msg *m)
{
    struct delivery *d = (struct delivery *)((char *)m - offsetof(struct delivery, drain_msg));
    (void)w;
    d->draining = true;
    log_msg(LOG_NOTICE, "event=draining connections=%llu", (unsigned long long)d->stats.open);
    /* Ones still opening (connecting, waiting for a greeting, EHLO or
     * TLS) carry nothing: they end now. Before, each held the drain until
     * it got ready or timed out (greeting_timeout: a tarpit held every
     * stop for the whole drain_timeout, logged as drain_timed_out). */
    for (struct conn *c = d->all; c != NULL; c = c->next_all) {
        if (!c->ready_once && c->job == NULL) {
            c->drain_cut = true;
            conn_close(c, "draining");
        }
    }
    /* Idle ones say goodbye now; busy ones after their transaction. */
    size_t bucket = 0;
    struct hash_node *cur = NULL, *n;
    while ((n = hash_next(&d->sites.by_key, &bucket, &cur)) != NULL) {
        struct site *s = (struct site *)n;
        while (s->idle != NULL) {
            struct conn *c = s->idle;
            conn_idle_unlink(&s->idle);
            conn_quit(c);
        }
    }
    drain_check(d);
}

void
delivery_drain(struct delivery *d)
{
    worker_post(d->w, &d->drain_msg);
}

const char *
delivery_redis_state(const struct delivery *d)
{
    struct limits_stats ls;
    if (d->lim == NULL)
        return "off";
    limits_stats(d->lim, &ls);
    return ls.redis;
}

int
delivery_resolver_stats(const struct delivery *d, struct resolver_stats *out)
{
    if (d->res == NULL)
        return -ENOENT;
    resolver_stats(d->res, out);
    return 0;
}

bool
delivery_idle(const struct delivery *d)
{
    return d->all == NULL;
}

/* Draining, no connection left, nothing of this worker's delivery with
 * the spool (an outcome being committed: until its answer it may not be
 * stored, and the drain is not done; port_on_ready looks again), no
 * outcome not durable yet (d->pending: one whose commit failed waits on
 * d->retrying for its next try, the port empty meanwhile; that try's
 * answer comes to port_on_ready) and nothing held by the worker's
 * submission server (a message being stored, its answer leaving): tell
 * the engine, once. The server calls delivery_drain_recheck() when it
 * lets go. */
void
drain_check(struct delivery *d)
{
    if (d == NULL || !d->draining || d->drained || d->all != NULL || d->pending != NULL ||
        (d->port != NULL && queue_port_pending(d->port) > 0))
        return;
    struct server_worker *sw = d->e->srv != NULL ? d->e->srv[d->w->id] : NULL;
    if (sw != NULL && !server_worker_drain_seal(sw))
        return;
    d->drained = true;
    log_msg(LOG_NOTICE, "event=drained");
    log_flush(); /* before main, which counts it, logs the stop's next lines */
    atomic_fetch_add(&d->e->drained, 1);
}

void
delivery_drain_recheck(struct delivery *d)
{
    drain_check(d);
}

/* The most queued tenants of a destination, kept sorted (most first). */
struct top_tenants {
    uint32_t id[STATS_DOMAIN_TENANTS];
    unsigned n[STATS_DOMAIN_TENANTS];
    unsigned k, all;
};

static void
top_tenants_add(void *arg, uint32_t tenant, unsigned n)
{
    struct top_tenants *tt = arg;
    tt->all++;
    unsigned i = tt->k < STATS_DOMAIN_TENANTS ? tt->k++ : STATS_DOMAIN_TENANTS;
    if (i == STATS_DOMAIN_TENANTS) {
        if (n <= tt->n[STATS_DOMAIN_TENANTS - 1])
            return;
        i = STATS_DOMAIN_TENANTS - 1;
    }
    for (; i > 0 && tt->n[i - 1] < n; i--) {
        tt->id[i] = tt->id[i - 1];
        tt->n[i] = tt->n[i - 1];
    }
    tt->id[i] = tenant;
    tt->n[i] = n;
}

/* t's most frequent deferral classes into x, most first (a few of
 * BOUNCE_CLASS_COUNT: a selection, not a sort). */
static void
dest_top_classes(const struct dest *t, struct stats_domain *x)
{
    bool taken[BOUNCE_CLASS_COUNT] = {false};
    x->nclasses = 0;
    while (x->nclasses < STATS_DOMAIN_CLASSES) {
        unsigned best = BOUNCE_CLASS_COUNT;
        for (unsigned k = 0; k < BOUNCE_CLASS_COUNT; k++)
            if (!taken[k] && t->deferred_by_class[k] != 0 &&
                (best == BOUNCE_CLASS_COUNT || t->deferred_by_class[k] > t->deferred_by_class[best]))
                best = k;
        if (best == BOUNCE_CLASS_COUNT)
            return;
        taken[best] = true;
        struct stats_object *o = &x->deferred_by_class[x->nclasses++];
        snprintf(o->name, sizeof(o->name), "%s", bounce_class_str((enum bounce_class)best));
        o->live = t->deferred_by_class[best];
    }
}

/* The jobs in flight, on d's connections: each destination's oldest
 * one's message time in its flight_oldest_ms (set: true), or back to 0
 * (set: false), one pass for all (a destination's own pass over the
 * connections would be one per destination). */
static void
flight_oldest(struct delivery *d, bool set)
{
    for (struct conn *c = d->all; c != NULL; c = c->next_all) {
        if (c->dest == NULL || c->job == NULL)
            continue;
        uint64_t a = queue_id_time_ms(c->job->id);
        if (!set)
            c->dest->flight_oldest_ms = 0;
        else if (c->dest->flight_oldest_ms == 0 || a < c->dest->flight_oldest_ms)
            c->dest->flight_oldest_ms = a;
    }
}

/* A zeroed row at the end of *out (grown as needed); NULL without memory. */
static struct stats_domain *
domain_row_new(struct stats_domain **out, size_t *n, size_t *cap)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 64;
        struct stats_domain *a = realloc(*out, nc * sizeof(*a));
        if (a == NULL)
            return NULL;
        *out = a;
        *cap = nc;
    }
    struct stats_domain *x = &(*out)[(*n)++];
    memset(x, 0, sizeof(*x));
    return x;
}

int
delivery_domains(struct delivery *d, struct stats_domain **out, size_t *n, size_t *cap)
{
    uint64_t now = clock_unix_ms();
    struct dest_iter it3 = {0};
    flight_oldest(d, true);
    /* A suspended tenant's or campaign's jobs are parked, on no queue:
     * shown on their destination's row, or one of their own when it went
     * idle and was evicted (they are waiting mail all the same). */
    struct parked_run *runs, *run;
    size_t nruns;
    scope_parked_runs(d, &runs, &nruns);
    for (struct dest *t; (t = dest_next(d, &it3)) != NULL;) {
        struct parked_run key = {.domain = t->name, .pool = t->pool,
                                 .tls_relaxed = t->tls_relaxed};
        run = nruns > 0 ? bsearch(&key, runs, nruns, sizeof(*runs), scope_parked_cmp) : NULL;
        if (run == NULL && fairq_empty(&t->q) && t->inflight == 0 && t->conns == 0 &&
            !t->suspended && (t->last_ms == 0 || now - t->last_ms > 600000))
            continue;
        struct stats_domain *x = domain_row_new(out, n, cap);
        if (x == NULL) {
            flight_oldest(d, false);
            free(runs);
            return -ENOMEM;
        }
        snprintf(x->name, sizeof(x->name), "%s", t->name);
        if (t->pool != 0)
            snprintf(x->pool, sizeof(x->pool), "%s", intern_name(d->names, t->pool));
        x->ready = dest_queued(t);
        x->inflight = t->inflight;
        x->connections = t->conns;
        x->delivered = t->delivered;
        x->bounced = t->failed;
        x->host_refused = t->host_refused;
        x->host_detoured = t->host_detoured;
        x->max_connections = t->pol->max_connections;
        x->suspended = t->suspended;
        struct shaping_verdict sv;
        /* ... or by a domain-wide shaping suspend (an operator's on any node) */
        if (!x->suspended && shaping_check(d->shaping, d->cfg->shaping_rules, "", NULL, t->name,
                                           clock_unix_ms(), &sv))
            x->suspended = sv.suspended;
        if (t->last_reply[0] != '\0' || t->last_code != 0) {
            enum smtp_reason why = (enum smtp_reason)t->last_reason;
            x->last_code = smtp_reason_server_code(why) ? t->last_code : 0;
            if (x->last_code != 0)
                snprintf(x->last_reply, sizeof(x->last_reply), "%u %s", x->last_code,
                         t->last_reply);
            else
                snprintf(x->last_reply, sizeof(x->last_reply), "%s", t->last_reply);
            snprintf(x->last_class, sizeof(x->last_class), "%s",
                     bounce_class_str((enum bounce_class)t->last_cls));
            if (why != SMTP_REASON_NONE && why != SMTP_REASON_REPLY) /* as the delivery log */
                snprintf(x->last_reason, sizeof(x->last_reason), "%s", smtp_reason_str(why));
        }
        bool held = d->w->now < t->hold_until;
        x->held = held;
        x->held_until_ms = held ? t->hold_until_ms : 0;
        x->resolving = t->mx == NULL && (t->req != NULL || t->sts_ask != NULL);
        dest_top_classes(t, x);
        unsigned pct = limits_key_rate_pct(&t->lim, d->w->now);
        const struct conf_rate *mr = &t->pol->max_message_rate;
        if (mr->count != 0 && mr->per_ms != 0)
            x->rate_limit = (double)mr->count * 1000.0 / mr->per_ms * pct / 100.0;
        const char *redis = delivery_redis_state(d);
        if (x->suspended) /* on this node alone (--local) or a shaping action's */
            snprintf(x->limit_reason, sizeof(x->limit_reason), "suspended by the operator");
        else if (held)
            snprintf(x->limit_reason, sizeof(x->limit_reason),
                     "held after a 421 or failed MX addresses");
        else if (pct < 100)
            snprintf(x->limit_reason, sizeof(x->limit_reason),
                     "backoff: %u%% of the rates after rate limiting", pct);
        else if (strcmp(redis, "unreachable") == 0)
            snprintf(x->limit_reason, sizeof(x->limit_reason), "local share (Redis unreachable)");
        else
            snprintf(x->limit_reason, sizeof(x->limit_reason), "%s",
                     t->pol == &d->cfg->default_domain ? "[domain *]" : "[domain] section");
        uint64_t oldest = t->flight_oldest_ms; /* in flight, then ready */
        struct fairq_iter it;
        fairq_iter_init(&t->q, &it);
        for (struct job *j; (j = job_of(fairq_iter_next(&it))) != NULL;) {
            uint64_t a = queue_id_time_ms(j->id);
            if (oldest == 0 || a < oldest)
                oldest = a;
        }
        if (run != NULL) {
            run->seen = true;
            x->parked = run->n;
            if (oldest == 0 || run->oldest_ms < oldest)
                oldest = run->oldest_ms;
        }
        x->oldest_ms = oldest;
        struct top_tenants tt = {0};
        fairq_tenants_each(&t->q, top_tenants_add, &tt);
        x->tenants_waiting = tt.all;
        x->ntenants = tt.k;
        for (unsigned k = 0; k < tt.k; k++) {
            const char *tn = tt.id[k] != 0 ? intern_name(d->names, tt.id[k]) : NULL;
            snprintf(x->tenants[k].name, sizeof(x->tenants[k].name), "%s", tn ? tn : "");
            x->tenants[k].ready = tt.n[k];
        }
    }
    flight_oldest(d, false);
    for (size_t i = 0; i < nruns; i++) {
        if (runs[i].seen)
            continue;
        struct stats_domain *x = domain_row_new(out, n, cap);
        if (x == NULL) {
            free(runs);
            return -ENOMEM;
        }
        snprintf(x->name, sizeof(x->name), "%s", runs[i].domain);
        const char *pool = runs[i].pool != 0 ? intern_name(d->names, runs[i].pool) : NULL;
        snprintf(x->pool, sizeof(x->pool), "%s", pool != NULL ? pool : "");
        x->parked = runs[i].n;
        x->oldest_ms = runs[i].oldest_ms;
        x->max_connections = config_domain(d->cfg, runs[i].domain)->max_connections;
        snprintf(x->limit_reason, sizeof(x->limit_reason), "its tenant or campaign suspended");
    }
    free(runs);
    return 0;
}

_Static_assert(DELIVERY_SITE_KEY_MAX == SITE_KEY_MAX, "a site's key");

int
delivery_sites(struct delivery *d, struct delivery_site **out, size_t *n, size_t *cap)
{
    size_t first = *n, bucket = 0;
    struct hash_node *cur = NULL;
    for (struct hash_node *hn; (hn = hash_next(&d->sites.by_key, &bucket, &cur)) != NULL;) {
        struct site *s = (struct site *)hn;
        if (*n == *cap) {
            size_t nc = *cap ? *cap * 2 : 64;
            struct delivery_site *a = realloc(*out, nc * sizeof(*a));
            if (a == NULL)
                return -ENOMEM;
            *out = a;
            *cap = nc;
        }
        struct delivery_site *x = &(*out)[(*n)++];
        memset(x, 0, sizeof(*x));
        memcpy(x->key, s->key, sizeof(x->key));
        x->worker = d->w->id;
        x->conns = s->conns;
        for (const struct conn *c = s->idle; c != NULL; c = c->next_idle)
            x->idle++;
        x->window = site_window_allowed(&s->win);
        x->ceiling = s->win.ceiling;
        x->domains_waiting = (unsigned)s->want.n;
        x->opened = s->opened;
        x->failures = s->failures;
        x->shrinks = s->shrinks;
        x->head_us = (uint64_t)(s->win.head_avg_ns / 1000);
        uint64_t b0 = s->win.head_base_ns[0], b1 = s->win.head_base_ns[1];
        x->head_base_us = (b0 != 0 && (b1 == 0 || b0 < b1) ? b0 : b1) / 1000;
        x->queues = site_window_queues(&s->win, s->conns);
        s->view_row = *n - 1;
    }
    /* Each destination to its site's row (every site is in the table),
     * with the caps beside the window: its domains name the same hosts,
     * the first with an answer tells the addresses' (dest_addr_cap); the
     * [mx] key is the one its runs found (dest_mxkey), none made here. */
    struct dest_iter it = {0};
    for (struct dest *t; (t = dest_next(d, &it)) != NULL;) {
        if (t->site == NULL || t->site->view_row < first || t->site->view_row >= *n)
            continue;
        struct delivery_site *x = &(*out)[t->site->view_row];
        x->domains++;
        x->ready += dest_queued(t);
        x->inflight += t->inflight;
        if (x->addr_cap == 0)
            x->addr_cap = dest_addr_cap(t);
        const struct mxkey *mk = t->mx != NULL && t->mxk_for == t->mx ? t->mxk : NULL;
        if (mk != NULL && mk->lim.conf.max_connections > x->mx_cap)
            x->mx_cap = mk->lim.conf.max_connections;
    }
    for (size_t i = first; i < *n; i++) {
        struct delivery_site *x = &(*out)[i];
        x->limit = x->window;
        x->limited_by = "window";
        if (x->addr_cap != 0 && x->addr_cap < x->limit) {
            x->limit = x->addr_cap;
            x->limited_by = "address_cap";
        }
        if (x->mx_cap != 0 && x->mx_cap < x->limit) {
            x->limit = x->mx_cap;
            x->limited_by = "mx_cap";
        }
    }
    return 0;
}

void
delivery_reconfigure(struct delivery *d)
{
    delivery_env_take(d); /* the config the main thread swapped in while we waited */
    /* [tenant] weights are asked of the new config from the next turn. */
    memset(d->tweights, 0, sizeof(d->tweights));
    /* An interface address added since (a loop if delivered to) is known
     * from now on; the targets are counted again below. */
    targets_local_load(d);
    pool_rr_forget(d);
    struct dest_iter it4 = {0};
    for (struct dest *t; (t = dest_next(d, &it4)) != NULL;) {
        const struct domain_policy *old = t->pol;
        t->pol = config_domain(d->cfg, t->name);
        const char *pname = t->pool ? intern_name(d->names, t->pool) : NULL;
        t->poolc = pname ? config_pool(d->cfg, pname, strlen(pname)) : NULL;
        /* Compared only, but the old pool may be freed and its address
         * given to another (config_gen.h): its ids are asked again. */
        t->src_ids_for = NULL;
        if (strcmp(old->route_host, t->pol->route_host) != 0 ||
            old->route_port != t->pol->route_port) {
            /* Another route: the next connection asks for its answer. */
            if (t->req != NULL)
                d->ops->cancel(d, t->req);
            t->req = NULL;
            dest_set_mx(t, NULL);
        }
        struct limit_conf lc;
        dest_limit_conf(t->pol, &lc);
        limits_key_set(d->lim, &t->lim, &lc);
        t->mxk_for = NULL; /* the [mx] sections may have changed */
        t->site_for = NULL;     /* ... and max_connections, its site's ceiling (dest_site) */
        t->affinity_for = NULL; /* ... and the rollups, whose pattern names a site's worker */
        t->mxk = NULL;
        if (t->site != NULL)
            t->site->reconf_ceiling = 0;
        /* allow_networks, deny_networks and the listeners may have changed: the usable
         * addresses are counted again (targets.c), so that a destination
         * left with none fails as at a start, saying why. */
        t->targets_for = NULL;
    }
    /* A site's ceiling is the highest max_connections of its domains
     * (dest_site raises it as they join): lowered, it is lowered, and the
     * connections over it end after their transaction (sched_conn_next),
     * as a start with the lower value would have had no more. */
    struct dest_iter itc = {0};
    for (struct dest *t; (t = dest_next(d, &itc)) != NULL;)
        if (t->site != NULL && t->site->reconf_ceiling < t->pol->max_connections)
            t->site->reconf_ceiling = t->pol->max_connections;
    struct dest_iter itc2 = {0};
    for (struct dest *t; (t = dest_next(d, &itc2)) != NULL;)
        if (t->site != NULL && t->site->reconf_ceiling != 0) {
            if (t->site->reconf_ceiling != t->site->win.ceiling)
                site_window_set_ceiling(&t->site->win, t->site->reconf_ceiling);
            t->site->reconf_ceiling = 0;
        }
    for (struct mxkey *k = d->mxkeys; k != NULL; k = k->next) {
        const struct mx_policy *m = NULL;
        bool src = strncmp(k->pattern, "src:", 4) == 0; /* else "mx:" */
        const struct mx_policy *v = src ? d->cfg->sources : d->cfg->mxs;
        unsigned nv = src ? d->cfg->nsources : d->cfg->nmxs;
        for (unsigned i = 0; i < nv && m == NULL; i++)
            if (strcmp(v[i].pattern, k->pattern + (src ? 4 : 3)) == 0)
                m = &v[i];
        struct limit_conf lc;
        mx_limit_conf(d, m, &lc);
        limits_key_set(d->lim, &k->lim, &lc);
        k->pol = m;
    }
    /* Connections keep the client options they started with; new ones
     * take the new policy. Let the new limits act on what waits. */
    struct dest_iter it5 = {0};
    for (struct dest *t; (t = dest_next(d, &it5)) != NULL;)
        dest_run(t);
}

int
delivery_suspend(struct delivery *d, const char *domain, bool on)
{
    int rc = delivery_suspend_scope(d, DELIVERY_SCOPE_DOMAIN, domain, on, 0);
    if (rc == 0)
        log_msg(LOG_NOTICE, "event=%s domain=%s", on ? "suspended" : "resumed", domain);
    return rc;
}

void
delivery_objects(const struct delivery *d, uint64_t *dests, uint64_t *waiting, uint64_t *inflight)
{
    *dests = *waiting = *inflight = 0;
    struct dest_iter it6 = {0};
    for (const struct dest *t; (t = dest_next(d, &it6)) != NULL;) {
        (*dests)++;
        *waiting += dest_queued(t);
        *inflight += t->inflight;
    }
}

void
delivery_stop(struct delivery *d)
{
    worker_post(d->w, &d->stop_msg);
}

/* ---- the worker's delivery ---- */

int
delivery_new(struct engine *e, struct worker *w, struct delivery **out, char *err,
             size_t errlen)
{
    *out = NULL;
    struct delivery *d = calloc(1, sizeof(*d));
    if (d == NULL)
        return -ENOMEM;
    d->e = e;
    d->w = w;
    delivery_env_take(d);
    d->port_op = (struct op){OP_CALLBACK, port_on_ready};
    delivery_due_init(d);
    d->cli_pool.size = sizeof(struct smtp_client_buf);
    d->rng = (clock_mono_ns() ^ ((uint64_t)(w->id + 1) * 0x9e3779b97f4a7c15ULL)) | 1;
    d->chunk_pool.size = BODY_CHUNK;
    d->ops = &delivery_ops;
    if (sched_init(d, e->site_addrs) < 0) {
        free(d);
        return -ENOMEM;
    }
    scope_init(d);
    targets_local_load(d);
    d->stop_msg.fn = delivery_on_stop;
    {
        const struct config *cfg = e->cfg;
        struct limits_opts lo = {
            .redis_url = cfg->redis.url,
            .redis_password = cfg->redis.password,
            .key_prefix = cfg->redis.key_prefix,
            .nodes = cfg->redis.nodes,
            .lease_ttl_ms = cfg->redis.lease_ttl,
            .token_batch = cfg->redis.token_batch,
            .backoff_ms = cfg->delivery.backoff,
            .backoff_step_ms = cfg->delivery.backoff_step,
            .redis_timeout_ms = cfg->redis.timeout,
            .node_caps = e->node_caps,
        };
        int lrc = limits_new(w, &lo, &d->lim, err, errlen);
        if (lrc < 0) {
            delivery_free(d);
            return lrc;
        }
    }
    d->drain_msg.fn = delivery_on_drain;
    d->port = queue_port_new();
    if (d->port == NULL) {
        int rc = -errno;
        snprintf(err, errlen, "delivery spool port: %s", strerror(errno));
        delivery_free(d);
        return rc;
    }
    if (tls_cache_new(e->cfg->tls.session_cache_size, &d->tls_cache) < 0)
        d->tls_cache = NULL; /* no resumption: still correct */
    *out = d;
    return 0;
}

void
delivery_start(struct delivery *d)
{
    delivery_env_take(d); /* every worker made now: nworkers is theirs */
    char err[256];
    int rc = resolver_new(d->w, &d->cfg->dns, &d->res, err, sizeof(err));
    if (rc < 0) {
        log_msg(LOG_CRIT, "event=resolver_failed err=\"%s\" note=no_delivery_on_this_worker",
                err);
        d->res = NULL;
    }
    conn_bufs_init(d);
    port_arm(d);
    if (d->w->id == 0 && d->cfg->delivery.enabled)
        delivery_due_start(d);
    sched_start(d);
}

/* Stopping: wait for the outcomes the spool has, up to the stop's bound
 * for the spool's answers (engine.h stop_commit_until: the servers' wait
 * has the same, one for every worker), or SERVER_STOP_COMMIT_WAIT_MS when
 * freed outside a stop. Without it a spool that no longer answers (a
 * dead disk) held the stop here until its last bound gave it up: the
 * other workers' commits were never logged, nor which outcomes were cut.
 * True when all came back; false when the wait was cut: each outcome
 * still with the spool is logged (outcome_pending_log), and d stays
 * allocated (the spool's answer would come to its port, into its
 * batches) until the process exits. */
static bool
outcomes_wait(struct delivery *d)
{
    if (d->port == NULL || queue_port_pending(d->port) == 0)
        return true;
    uint64_t start = clock_mono_ns();
    uint64_t end = d->e->stop_commit_until != 0 ? d->e->stop_commit_until
                                                : start + MS_TO_NS(SERVER_STOP_COMMIT_WAIT_MS);
    while (queue_port_pending(d->port) > 0) {
        uint64_t now = clock_mono_ns();
        /* What came already is told, not cut: the bound is the stop's,
         * and another worker's wait may have taken it all while answers
         * to this one's waited in its port since its loop ended. */
        if (now >= end && queue_port_drain(d->port) >= 0 && queue_port_pending(d->port) == 0)
            return true;
        if (now >= end) {
            unsigned n = outcome_pending_log(d);
            log_msg(LOG_CRIT,
                    "event=stop_outcome_wait_cut pending=%u requests=%u waited_ms=%llu "
                    "note=spool_not_answering",
                    n, queue_port_pending(d->port), (unsigned long long)((now - start) / 1000000));
            d->e->stop_cut = true; /* the spool's close: not waited for as long again */
            return false;
        }
        uint64_t ms = (end - now + 999999) / 1000000;
        queue_port_wait(d->port, ms > 1000 ? 1000 : (int)ms);
    }
    return true;
}

struct delivery *
delivery_free(struct delivery *d)
{
    if (d == NULL)
        return NULL;
    d->stopping = true;
    /* After a failed ring delivery_on_stop never ran: take this worker's
     * own timers out of its heap before their memory goes (the heap is
     * freed after us and touches what it still holds). */
    worker_timer_cancel(d->w, &d->due_timer);
    worker_timer_cancel(d->w, &d->evict_timer);
    worker_timer_cancel(d->w, &d->scope_timer);
    outcome_retrying_cancel(d);
    outcome_delay_cancel(d);
    /* The loop has ended. Connections left (a start that failed half
     * way) are dropped; jobs not acknowledged stay in the spool. */
    while (d->all != NULL) {
        struct conn *c = d->all;
        c->closed = true;
        conn_free(c);
    }
    outcome_retrying_free(d); /* not with the spool: d->pending holds only those that are */
    /* the last outcomes count per destination, pool and source
     * (outcome.c): told before those go */
    if (!outcomes_wait(d))
        return NULL; /* the spool does not answer: left to the exit */
    outcome_delay_free(d); /* after the wait: a check of one may be with the spool */
    /* Before the destinations and MX keys go: limits_free walks and
     * writes the keys it still holds, and after a failed ring
     * delivery_on_stop, which takes them out (sched_release_leases),
     * never ran. */
    d->lim = limits_free(d->lim);
    sched_free_dests(d);
    scope_fini(d);
    queue_port_free(d->port);
    if (d->tls_cache != NULL)
        tls_cache_free(d->tls_cache);
    conn_bufs_fini(d);
    conn_pool_fini(&d->cli_pool);
    conn_pool_fini(&d->chunk_pool);
    sched_fini(d);
    stats_tenant_fini(&d->tenants);
    free(d);
    return NULL;
}

unsigned
delivery_tenants(const struct delivery *d, struct stats_tenant *out, unsigned cap)
{
    return stats_tenant_copy(&d->tenants, out, cap);
}

bool
delivery_msg_free(struct worker_msg *m)
{
    if (m->fn == handover_on_arrive) {
        dns_mx_result_unref(((struct handover *)m)->mx);
        free(m);
        return true;
    }
    if (m->fn != delivery_on_job)
        return false;
    free(m);
    return true;
}

void
delivery_stats(const struct delivery *d, struct delivery_stats *out)
{
    *out = d->stats;
    out->recv_nobufs = d->bufs.nobufs;
    out->bufs_out = d->cli_pool.out;
    out->sites = d->sites.live;
    out->dests_evicted = d->evicted;
}
