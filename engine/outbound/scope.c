/*
 * scope: operators' suspensions by scope on one worker, and the counters
 * per tenant, pool and source.
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
 * again every second: the action is shaping's, kept and shared there.
 *
 * Threading: the worker's thread.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/intern.h"
#include "common/log.h"
#include "engine/engine.h"
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
        free(j);
    }
    for (unsigned k = 0; k < DELIVERY_SCOPE_COUNT; k++) {
        size_t b = 0;
        struct hash_node *cur = NULL, *n;
        while ((n = hash_next(&d->counts[k], &b, &cur)) != NULL)
            free(n);
        hash_fini(&d->counts[k]);
    }
    free(d->susp);
    d->susp = NULL;
    d->nsusp = 0;
}

struct owner_count *
owner_count(struct delivery *d, enum scope_kind kind, uint32_t id)
{
    static _Thread_local struct owner_count dummy;
    uint64_t h = (uint64_t)id * 0x9e3779b97f4a7c15ULL;
    struct owner_count *c = (struct owner_count *)hash_find(&d->counts[kind], h, &id);
    if (c != NULL)
        return c;
    if ((c = calloc(1, sizeof(*c))) == NULL)
        return &dummy;
    c->id = id;
    c->node.hash = h;
    if (hash_insert(&d->counts[kind], &c->node) < 0) {
        free(c);
        return &dummy;
    }
    return c;
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
            const char *name = intern_name(d->e->names, c->id);
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
    j->next_parked = d->parked;
    d->parked = j;
    d->stats.parked++;
    return true;
}

#define SHAPED_RECHECK_MS 1000

/* Is j's tenant suspended by shaping at mx (its destination's preferred
 * MX host when mx is NULL)? */
static bool
job_shaped(struct delivery *d, const struct job *j, const char *mx)
{
    struct engine *e = d->e;
    if (e->shaping == NULL || j->owner.tenant == 0)
        return false;
    if (mx == NULL) {
        struct dest *t = dest_get_pool(d, j->domain, j->owner.pool);
        mx = t != NULL && t->mx != NULL && t->mx->nhosts > 0 ? t->mx->hosts[0].name : NULL;
    }
    uint64_t recheck;
    return mx != NULL && shaping_tenant_held(e->shaping, e->cfg->shaping_rules,
                                             intern_name(e->names, j->owner.tenant), mx,
                                             clock_unix_ms(), &recheck);
}

static void
scope_shaped_timer(struct delivery *d)
{
    uint64_t at = d->w->now + MS_TO_NS(SHAPED_RECHECK_MS);
    if (d->nshaped > 0 && (!timer_armed(&d->scope_timer) || d->scope_timer.deadline > at))
        worker_timer_arm(d->w, &d->scope_timer, at);
}

bool
scope_job_shaped(struct delivery *d, struct job *j, const char *mx)
{
    if (!job_shaped(d, j, mx))
        return false;
    j->shaped = true;
    j->next_parked = d->parked;
    d->parked = j;
    d->stats.parked++;
    if (d->nshaped++ == 0)
        log_msg(LOG_INFO, "event=jobs_parked reason=shaping tenant=%s mx=%s",
                intern_name(d->e->names, j->owner.tenant), mx ? mx : "-");
    scope_shaped_timer(d);
    return true;
}

/* Park the waiting jobs of a suspended tenant or campaign, every
 * destination's, keeping the others' order. */
static void
scope_park_all(struct delivery *d)
{
    struct dest_iter it = {0};
    for (struct dest *t; (t = dest_next(d, &it)) != NULL;) {
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
    }
}

/* Jobs parked for suspensions that are over go back to their queues, and
 * every destination runs (a pool or source may send again). */
static void
scope_release(struct delivery *d)
{
    struct job *p = d->parked, *j;
    d->parked = NULL;
    uint64_t now = d->w->now;
    while ((j = p) != NULL) {
        p = j->next_parked;
        j->next_parked = NULL;
        if (job_suspended(d, j, now) || (j->shaped && job_shaped(d, j, NULL))) {
            j->next_parked = d->parked;
            d->parked = j;
            continue;
        }
        if (j->shaped) {
            j->shaped = false;
            d->nshaped--;
        }
        d->stats.parked--;
        struct dest *t = dest_get_pool(d, j->domain, j->owner.pool);
        if (t == NULL) {
            free(j); /* no memory: the spool still has it, a restart delivers it */
            continue;
        }
        dest_enqueue(t, j);
    }
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
                                                    : intern_name(d->e->names, d->susp[i].id));
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
    } else if ((id = intern_id(d->e->names, name)) == 0) {
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
        /* made if unknown: the suspension shows, and holds for mail to come */
        struct dest *t0 = dest_get(d, dom);
        if (t0 == NULL)
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
    return 0;
}
