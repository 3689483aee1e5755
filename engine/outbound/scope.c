/*
 * scope: operators' suspensions by scope on one worker, and the counters
 * per tenant, pool and source (with each pool's round robin between its
 * sources, pool_rr: egress.c's dest_source reads it).
 *
 * A suspension names a domain (every pool's destination of it), a
 * tenant, a campaign, a pool or a source, until resumed or for a while
 * (a timer ends it). Where it acts:
 *   - a domain: its destinations start no transaction (dest->suspended,
 *     inherited by a destination made later);
 *   - a pool: its destinations likewise (the scheduler asks
 *     scope_suspended);
 *   - a source: no new connection from it, and its connections say
 *     goodbye after their transaction (dest_source, source_may_send);
 *   - a tenant or campaign: its jobs are set aside ("parked") as they
 *     arrive and as they come up in a queue, the others of the same
 *     destination going on; on resume they go back to their queues. A
 *     parked job stays in the spool as any queued one: a restart
 *     delivers it unless the suspension is given again.
 * Suspensions live in memory, per worker (ops.c sends each to every
 * worker): like a domain's, they do not survive a restart. (With
 * shaping on, `sluicectl suspend` of a domain, tenant or source is a
 * shaping action instead, on every node: ops.c's suspend_cluster; these
 * are pools, campaigns and `--local`.) Jobs of a
 * tenant that a shaping action suspends at a destination group
 * (engine/shaping.h, scope=tenant) are parked the same way when they come
 * up for a connection to that group (scope_job_shaped), and looked at
 * again every second: the action is shaping's, kept and shared there. A
 * tenant's rate action parks each job that finds no token of the
 * tenant's key at the group (sched_shape_key) until the limiter's time
 * for it; a tenant's bounce action bounces its jobs as they come up, and
 * the parked ones at the next look.
 *
 * Threading: the worker's thread.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/intern.h"
#include "common/log.h"
#include "engine/outbound/internal.h"
#include "engine/shaping.h"

static const char *const scope_names[DELIVERY_SCOPE_COUNT] = {"domain", "tenant", "campaign",
                                                               "pool", "source"};

const char *
delivery_scope_str(enum delivery_scope k)
{
    return (unsigned)k < DELIVERY_SCOPE_COUNT ? scope_names[k] : "?";
}

static bool
count_eq(const struct hash_node *n, const void *key)
{
    return ((const struct owner_count *)n)->id == *(const uint32_t *)key;
}

static void scope_on_timer(struct timer *tm, void *ctx);

void
scope_init(struct delivery *d)
{
    for (unsigned k = 0; k < DELIVERY_SCOPE_COUNT; k++)
        hash_init(&d->counts[k], count_eq, 16);
    timer_init(&d->scope_timer, scope_on_timer);
}

void
scope_fini(struct delivery *d)
{
    while (d->parked != NULL) {
        struct job *j = d->parked;
        d->parked = j->next_parked;
        scope_unpark(d, j->n);
        free(j);
    }
    for (unsigned k = 0; k < DELIVERY_SCOPE_COUNT; k++) {
        size_t b = 0;
        struct hash_node *cur = NULL, *n;
        while ((n = hash_next(&d->counts[k], &b, &cur)) != NULL) {
            free(((struct owner_count *)n)->rr);
            free(n);
        }
        hash_fini(&d->counts[k]);
    }
    free(d->susp);
    d->susp = NULL;
    d->nsusp = 0;
}

/* The counters of (kind, id), made on first use; NULL without memory. */
static struct owner_count *
count_get(struct delivery *d, enum scope_kind kind, uint32_t id)
{
    uint64_t h = (uint64_t)id * 0x9e3779b97f4a7c15ULL;
    struct owner_count *c = (struct owner_count *)hash_find(&d->counts[kind], h, &id);
    if (c != NULL)
        return c;
    if ((c = calloc(1, sizeof(*c))) == NULL)
        return NULL;
    c->id = id;
    c->node.hash = h;
    if (hash_insert(&d->counts[kind], &c->node) < 0) {
        free(c);
        return NULL;
    }
    return c;
}

struct owner_count *
owner_count(struct delivery *d, enum scope_kind kind, uint32_t id)
{
    static _Thread_local struct owner_count dummy;
    struct owner_count *c = count_get(d, kind, id);
    return c != NULL ? c : &dummy;
}

void
pool_rr_forget(struct delivery *d)
{
    size_t b = 0;
    struct hash_node *cur = NULL, *x;
    while ((x = hash_next(&d->counts[SCOPE_POOL], &b, &cur)) != NULL)
        ((struct owner_count *)x)->rr_for = NULL;
}

int64_t *
pool_rr(struct delivery *d, const struct dest *t)
{
    if (t->pool == 0 || t->poolc == NULL || t->poolc->nsources == 0)
        return NULL;
    struct owner_count *c = count_get(d, SCOPE_POOL, t->pool);
    if (c == NULL)
        return NULL;
    if (c->rr != NULL && c->rr_for == t->poolc)
        return c->rr;
    /* first use, or the [pool] was reloaded: every source starts even */
    free(c->rr);
    c->rr_for = NULL;
    if ((c->rr = calloc(t->poolc->nsources, sizeof(*c->rr))) != NULL)
        c->rr_for = t->poolc;
    return c->rr;
}

struct owner_count *
source_count(struct delivery *d, uint32_t id)
{
    static _Thread_local struct owner_count dummy;
    return id != 0 ? owner_count(d, SCOPE_SOURCE, id) : &dummy;
}

int
delivery_owner_stats(struct delivery *d, struct delivery_owner_stats **out, size_t *n,
                     size_t *cap)
{
    static const enum scope_kind kinds[] = {SCOPE_POOL, SCOPE_SOURCE};
    for (unsigned k = 0; k < 2; k++) {
        size_t b = 0;
        struct hash_node *cur = NULL, *x;
        while ((x = hash_next(&d->counts[kinds[k]], &b, &cur)) != NULL) {
            const struct owner_count *c = (const struct owner_count *)x;
            const char *name = intern_name(d->names, c->id);
            if (name == NULL)
                continue;
            if (*n == *cap) {
                size_t nc = *cap ? *cap * 2 : 32;
                struct delivery_owner_stats *v = realloc(*out, nc * sizeof(*v));
                if (v == NULL)
                    return -ENOMEM;
                *out = v;
                *cap = nc;
            }
            (*out)[(*n)++] = (struct delivery_owner_stats){(enum delivery_scope)kinds[k], name,
                                                           c->delivered, c->deferred, c->bounced,
                                                           c->connections};
        }
    }
    return 0;
}

bool
scope_suspended(const struct delivery *d, enum scope_kind kind, uint32_t id, uint64_t now)
{
    for (unsigned i = 0; i < d->nsusp; i++)
        if (d->susp[i].kind == kind && d->susp[i].id == id && now < d->susp[i].until)
            return true;
    return false;
}

bool
scope_domain_suspended(const struct delivery *d, const char *domain, uint64_t now)
{
    for (unsigned i = 0; i < d->nsusp; i++)
        if (d->susp[i].kind == SCOPE_DOMAIN && now < d->susp[i].until &&
            strcmp(d->susp[i].domain, domain) == 0)
            return true;
    return false;
}

static bool
job_suspended(const struct delivery *d, const struct job *j, uint64_t now)
{
    return (j->owner.tenant != 0 && scope_suspended(d, SCOPE_TENANT, j->owner.tenant, now)) ||
           (j->owner.campaign != 0 && scope_suspended(d, SCOPE_CAMPAIGN, j->owner.campaign, now));
}

bool
scope_job_parked(struct delivery *d, struct job *j)
{
    if (d->nsusp == 0 || !job_suspended(d, j, d->w->now))
        return false;
    scope_park(d, j);
    return true;
}

void
scope_park(struct delivery *d, struct job *j)
{
    j->next_parked = d->parked;
    d->parked = j;
    d->stats.parked++;
    atomic_fetch_add_explicit(&d->parked_rcpts, j->n, memory_order_relaxed);
}

void
scope_unpark(struct delivery *d, unsigned n)
{
    atomic_fetch_sub_explicit(&d->parked_rcpts, n, memory_order_relaxed);
}

void
scope_count_paused(struct delivery *d)
{
    uint64_t n = 0;
    if (d->nsusp != 0) {
        struct dest_iter it = {0};
        for (struct dest *t; (t = dest_next(d, &it)) != NULL;)
            if (t->queued_rcpts != 0 && dest_paused(t))
                n += t->queued_rcpts;
    }
    atomic_store_explicit(&d->paused_rcpts, n, memory_order_relaxed);
}

int
scope_parked_cmp(const void *a, const void *b)
{
    const struct parked_run *x = a, *y = b;
    int k = strcmp(x->domain, y->domain);
    if (k != 0)
        return k;
    if (x->pool != y->pool)
        return x->pool < y->pool ? -1 : 1;
    return (int)x->tls_relaxed - (int)y->tls_relaxed;
}

void
scope_parked_runs(const struct delivery *d, struct parked_run **v, size_t *n)
{
    *v = NULL;
    *n = 0;
    size_t njobs = 0;
    for (const struct job *j = d->parked; j != NULL; j = j->next_parked)
        njobs++;
    struct parked_run *r = njobs > 0 ? malloc(njobs * sizeof(*r)) : NULL;
    if (r == NULL)
        return;
    size_t k = 0;
    for (const struct job *j = d->parked; j != NULL; j = j->next_parked)
        r[k++] = (struct parked_run){.domain = j->domain, .pool = j->owner.pool,
                                     .tls_relaxed = j->owner.tls_relaxed, .n = 1,
                                     .oldest_ms = queue_id_time_ms(j->id)};
    qsort(r, njobs, sizeof(*r), scope_parked_cmp);
    size_t out = 0; /* runs folded in place */
    for (size_t i = 0; i < njobs; i++) {
        if (out > 0 && scope_parked_cmp(&r[out - 1], &r[i]) == 0) {
            r[out - 1].n++;
            if (r[i].oldest_ms < r[out - 1].oldest_ms)
                r[out - 1].oldest_ms = r[i].oldest_ms;
        } else {
            r[out++] = r[i];
        }
    }
    *v = r;
    *n = out;
}

#define SHAPED_RECHECK_MS 1000
#define SHAPED_RATE_POLL_MS 50 /* a rate's token asked of Redis: look again then */

/* What shaping's tenant-scope actions say of j at mx (t's preferred MX
 * host when mx is NULL; t NULL: j's destination). */
static bool
job_shaping(struct delivery *d, struct dest *t, const struct job *j, const char *mx,
            struct shaping_tenant_verdict *v)
{
    memset(v, 0, sizeof(*v));
    if (d->shaping == NULL || j->owner.tenant == 0)
        return false;
    if (mx == NULL) {
        if (t == NULL)
            t = dest_of_job(d, j);
        mx = t != NULL && t->mx != NULL && t->mx->nhosts > 0 ? t->mx->hosts[0].name : NULL;
    }
    return mx != NULL &&
           shaping_tenant_check(d->shaping, d->cfg->shaping_rules,
                                intern_name(d->names, j->owner.tenant), mx, clock_unix_ms(), v);
}

static void
scope_timer_at(struct delivery *d, uint64_t at)
{
    if (!timer_armed(&d->scope_timer) || d->scope_timer.deadline > at)
        worker_timer_arm(d->w, &d->scope_timer, at);
}

static void
scope_shaped_timer(struct delivery *d)
{
    if (d->nshaped > 0)
        scope_timer_at(d, d->w->now + MS_TO_NS(SHAPED_RECHECK_MS));
}

/* A tenant's bounce action: j fails now, as an operator's bounce (spool,
 * delivery log, DSN). */
static void shaped_park(struct delivery *d, struct job *j, const char *mx, uint64_t until,
                        const char *why);

static void
shaped_bounce(struct delivery *d, struct dest *t, struct job *j, const char *mx)
{
    struct policy_fail f;
    policy_job(POLICY_OPERATOR_BOUNCE, &f);
    struct smtp_outcome o;
    char text[240];
    snprintf(text, sizeof(text), "bounced by a shaping action for tenant %.64s at %.100s",
             intern_name(d->names, j->owner.tenant), mx ? mx : t->name);
    job_outcome(&o, &f, text);
    if (!job_fail(d, t, j, &o, f.src))
        /* Its message could not be read just then: parked, bounced when
         * the parked jobs are looked at again (before, it was dropped
         * from memory and waited for a restart). Not back in t's queue:
         * the transaction that met the action would take it again at
         * once. */
        shaped_park(d, j, mx, d->w->now + MS_TO_NS(HOLD_MIN_MS), "bounce");
}

/* May j go under its tenant's rate at mx (a token of the tenant's key at
 * the action's group)? When it may, *key and *g: that token, for a give-
 * back; when not, *until: monotonic ns to ask again. */
static bool
shaped_rate_take(struct delivery *d, const struct dest *t, const struct job *j,
                 const struct shaping_tenant_verdict *v, uint64_t *until, bool *asking,
                 struct limit_key **key, struct limit_grant *g)
{
    char who[80];
    snprintf(who, sizeof(who), "tenant:%s", intern_name(d->names, j->owner.tenant));
    struct mxkey *k = sched_shape_key(d, who, v->rate_group);
    if (k == NULL)
        return true; /* no memory: at the destination's rate */
    sched_shape_rate(d, k, t, v->rate_permille, v->rate_interval_ns);
    uint64_t retry_at = 0;
    if (limits_take_msgs_undo(d->lim, &k->lim, 1, d->w->now, &retry_at, g) == 1) {
        *key = &k->lim;
        return true;
    }
    *until = retry_at != UINT64_MAX ? retry_at : d->w->now + MS_TO_NS(SHAPED_RATE_POLL_MS);
    /* Asked of Redis: its answer (mx_on_wake) releases j, its time is
     * only the request's timeout (limits_key_asking). */
    *asking = limits_key_asking(&k->lim);
    if (*asking)
        k->parked_asking = true;
    return false;
}

void
scope_rate_answer(struct delivery *d)
{
    bool any = false;
    for (struct job *j = d->parked; j != NULL; j = j->next_parked)
        if (j->shaped && j->shaped_asking) {
            j->shaped_asking = false;
            j->shaped_until = d->w->now;
            any = true;
        }
    if (any)
        scope_timer_at(d, d->w->now);
}

static void
shaped_park(struct delivery *d, struct job *j, const char *mx, uint64_t until, const char *why)
{
    j->shaped = true;
    j->shaped_asking = false;
    j->shaped_until = until;
    scope_park(d, j);
    if (d->nshaped++ == 0)
        log_msg(LOG_INFO, "event=jobs_parked reason=shaping action=%s tenant=%s mx=%s", why,
                intern_name(d->names, j->owner.tenant), mx ? mx : "-");
    scope_shaped_timer(d);
    if (until != 0)
        scope_timer_at(d, until);
}

bool
scope_job_shaped(struct delivery *d, struct dest *t, struct job *j, const char *mx,
                 struct limit_key **key, struct limit_grant *g)
{
    *key = NULL;
    struct shaping_tenant_verdict v;
    if (!job_shaping(d, t, j, mx, &v))
        return false;
    if (v.bounce) {
        shaped_bounce(d, t, j, mx);
        return true;
    }
    if (v.held) {
        shaped_park(d, j, mx, 0, "suspend");
        return true;
    }
    uint64_t until = 0;
    bool asking = false;
    if ((v.rate_permille != 0 || v.rate_interval_ns != 0) &&
        !shaped_rate_take(d, t, j, &v, &until, &asking, key, g)) {
        shaped_park(d, j, mx, until, "rate");
        j->shaped_asking = asking;
        return true;
    }
    return false;
}

/* Park the waiting jobs of a suspended tenant or campaign, every
 * destination's, keeping the others' order and each destination's turns
 * at its site (the queue refilled at once is no mail after none). */
static void
scope_park_all(struct delivery *d)
{
    struct dest_iter it = {0};
    for (struct dest *t; (t = dest_next(d, &it)) != NULL;) {
        uint64_t tag = t->turn_tag;
        struct job *keep = NULL, **kt = &keep, *j;
        while ((j = dest_pop(t)) != NULL) {
            if (scope_job_parked(d, j))
                continue;
            *kt = j;
            kt = &j->next_parked;
        }
        *kt = NULL;
        while (keep != NULL) {
            j = keep;
            keep = j->next_parked;
            dest_push(t, j, false);
        }
        site_turn_restore(t, tag);
    }
}

/* Jobs parked for suspensions that are over go back to their queues, and
 * every destination runs (a pool or source may send again). */
static void
scope_release(struct delivery *d)
{
    struct job *p = d->parked, *j;
    d->parked = NULL;
    uint64_t now = d->w->now, rate_next = UINT64_MAX;
    while ((j = p) != NULL) {
        p = j->next_parked;
        j->next_parked = NULL;
        struct shaping_tenant_verdict v = {0};
        bool shaping = j->shaped && job_shaping(d, NULL, j, NULL, &v);
        bool bounce = shaping && v.bounce;
        /* a rate's job waits for its time (the token is asked again when
         * it comes up), unless its tenant's rate is over or it bounces */
        bool waits = j->shaped && j->shaped_until > now && shaping &&
                     (v.rate_permille != 0 || v.rate_interval_ns != 0);
        if (!bounce && (job_suspended(d, j, now) || waits || (shaping && v.held))) {
            if (waits && j->shaped_until < rate_next)
                rate_next = j->shaped_until;
            j->next_parked = d->parked;
            d->parked = j;
            continue;
        }
        if (j->shaped) {
            j->shaped = false;
            j->shaped_asking = false;
            j->shaped_until = 0;
            d->nshaped--;
        }
        d->stats.parked--;
        scope_unpark(d, j->n);
        struct dest *t = dest_of_job(d, j);
        if (t == NULL) {
            job_lost(j); /* no memory for its destination */
            continue;
        }
        if (bounce)
            shaped_bounce(d, t, j, NULL);
        else
            dest_enqueue(t, j);
    }
    if (rate_next != UINT64_MAX)
        scope_timer_at(d, rate_next);
    struct dest_iter it = {0};
    for (struct dest *t; (t = dest_next(d, &it)) != NULL;) {
        bool was = t->suspended;
        t->suspended = scope_domain_suspended(d, t->name, now);
        if (!fairq_empty(&t->q) && (was || !t->suspended))
            dest_run(t);
    }
}

/* Drop ended suspensions; arm the timer for the next that ends. Returns
 * whether one was dropped. */
static bool
scope_expire(struct delivery *d)
{
    uint64_t now = d->w->now, next = UINT64_MAX;
    unsigned k = 0;
    bool dropped = false;
    for (unsigned i = 0; i < d->nsusp; i++) {
        if (now >= d->susp[i].until) {
            log_msg(LOG_NOTICE, "event=resumed scope=%s name=%s reason=duration_over",
                    scope_names[d->susp[i].kind],
                    d->susp[i].kind == SCOPE_DOMAIN ? d->susp[i].domain
                                                    : intern_name(d->names, d->susp[i].id));
            dropped = true;
            continue;
        }
        if (d->susp[i].until < next)
            next = d->susp[i].until;
        d->susp[k++] = d->susp[i];
    }
    d->nsusp = k;
    if (next != UINT64_MAX)
        worker_timer_arm(d->w, &d->scope_timer, next);
    else
        worker_timer_cancel(d->w, &d->scope_timer);
    scope_shaped_timer(d); /* and jobs parked by shaping are looked at each second */
    return dropped;
}

static void
scope_on_timer(struct timer *tm, void *ctx)
{
    (void)ctx;
    struct delivery *d = (struct delivery *)((char *)tm - offsetof(struct delivery, scope_timer));
    if (d->stopping)
        return;
    if (scope_expire(d) || d->nshaped > 0)
        scope_release(d);
    scope_shaped_timer(d); /* scope_expire may have cancelled it */
    scope_count_paused(d);
}

int
delivery_suspend_scope(struct delivery *d, enum delivery_scope k, const char *name, bool on,
                       uint64_t for_ms)
{
    if ((unsigned)k >= DELIVERY_SCOPE_COUNT || name == NULL || name[0] == '\0')
        return -EINVAL;
    char dom[256] = "";
    uint32_t id = 0;
    if (k == DELIVERY_SCOPE_DOMAIN) {
        size_t i = 0;
        for (; name[i] != '\0' && i + 1 < sizeof(dom); i++)
            dom[i] = (char)((name[i] >= 'A' && name[i] <= 'Z') ? name[i] + 32 : name[i]);
        dom[i] = '\0';
    } else if ((id = intern_id(d->names, name)) == 0) {
        return -ENOMEM;
    }
    /* The entry of this scope, if any: replaced or removed. */
    unsigned at = d->nsusp;
    for (unsigned i = 0; i < d->nsusp; i++)
        if ((enum delivery_scope)d->susp[i].kind == k && d->susp[i].id == id &&
            strcmp(d->susp[i].domain, dom) == 0)
            at = i;
    if (on) {
        if (at == d->nsusp) {
            if (d->nsusp == DELIVERY_SCOPES_MAX)
                return -ENOSPC;
            struct scope_susp *v = realloc(d->susp, (d->nsusp + 1) * sizeof(*v));
            if (v == NULL)
                return -ENOMEM;
            d->susp = v;
            d->nsusp++;
        }
        struct scope_susp *x = &d->susp[at];
        memset(x, 0, sizeof(*x));
        x->kind = (enum scope_kind)k;
        x->id = id;
        memcpy(x->domain, dom, sizeof(dom));
        x->until = for_ms ? d->w->now + MS_TO_NS(for_ms) : UINT64_MAX;
    } else if (at < d->nsusp) {
        d->susp[at] = d->susp[--d->nsusp];
    }
    scope_expire(d); /* the timer for the next one that ends */
    if (on && k == DELIVERY_SCOPE_DOMAIN) {
        /* made if unknown, on the worker its mail without a pool goes to
         * (a pool's goes by its name's hash: ops.c asks every worker):
         * the suspension shows, and holds for mail to come */
        if ((d->ops->route == NULL || d->ops->route(d, dom) == d->w->id) && dest_get(d, dom) == NULL)
            return -ENOMEM;
        struct dest_iter it = {0};
        for (struct dest *t; (t = dest_next(d, &it)) != NULL;)
            if (strcmp(t->name, dom) == 0)
                t->suspended = true;
    } else if (on && (k == DELIVERY_SCOPE_TENANT || k == DELIVERY_SCOPE_CAMPAIGN)) {
        scope_park_all(d);
    } else if (!on) {
        scope_release(d);
    }
    scope_count_paused(d);
    return 0;
}
