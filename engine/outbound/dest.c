/*
 * dest: the destinations of one worker (see internal.h for the other
 * files): the table they are found in, by domain, pool and tls_relaxed
 * (dest_get_for, made on first use with their limiter key and policy),
 * their queue of jobs (dest_enqueue, dest_push, dest_pop: a fairq shared
 * by tenants by weight), what they learnt of their MX answer and of their
 * last failure, and their life: held ones have their waiting jobs swept
 * for expiry (dest_hold, dest_on_sweep; the operator's flush ends the
 * holds and their sites' rests: delivery_lift_holds), and ones idle for [delivery]
 * destination_idle_ttl are evicted, oldest first (dest_on_evict), so the
 * table holds the active domains only; one whose domain moved to another
 * worker (affinity.c) goes at the next sweep. The same sweep frees the
 * body and reply buffers the worker kept and nobody took since the last
 * one (conn_pool_decay), and hands the free pages of the heap back to the
 * system (delivery_trim in engine/delivery.c, as the engine's counters of
 * every worker's sweeps say: malloc_trim, since glibc keeps a freed page
 * that is not at the top of its heap, so without it RSS stays at the
 * busiest hour's) once the workers' sweeps freed a megabyte or more since
 * the last trim: at the first sweep after which no worker's sweep freed
 * anything (what churned has stopped), or at most once a minute while
 * they go on freeing. A trim walks every arena's free chunks, 3 to 15 ms
 * after a wave of tens of thousands of destinations, while this worker's
 * loop waits.
 *
 * What a destination does next (resolve, open, hand a job to a
 * connection, fail its jobs) is outbound/scheduler.c's: dest_run.
 *
 * Threading: the worker's thread.
 */
#include <limits.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/hash.h"
#include "common/idn.h"
#include "common/intern.h"
#include "common/log.h"
#include "engine/mta_sts.h"
#include "engine/outbound/internal.h"

#define EVICT_SWEEP_MS 5000 /* idle destinations looked for */
#define SWEEP_READS    256  /* expiries read from the spool per sweep of a destination
                             * whose connections take its jobs (dest_on_sweep) */
#define SWEEP_JOBS_PER_MS 10 /* ... and its waiting jobs per ms between its sweeps */

static void dest_on_hold(struct timer *t, void *ctx);
static void dest_on_sweep(struct timer *t, void *ctx);

void
dest_limit_conf(const struct domain_policy *pol, struct limit_conf *lc)
{
    memset(lc, 0, sizeof(*lc));
    lc->msg_rate = pol->max_message_rate;
    lc->msg_burst = pol->message_burst;
    lc->conn_rate = pol->max_connection_rate;
    lc->conn_burst = pol->connection_burst;
    lc->max_connections = pol->max_connections;
}

/* The limiter has news for t (a refill, a lease, a resume). */
static void
dest_on_wake(void *arg)
{
    dest_run(arg);
}

static void
dest_on_lim_timer(struct timer *tm, void *ctx)
{
    (void)ctx;
    dest_run((struct dest *)((char *)tm - offsetof(struct dest, lim_timer)));
}


/* What the destinations are found by: a domain and a pool. */
struct dest_ref {
    const char *name;
    uint32_t pool;
    bool tls_relaxed;
};

static bool
dest_eq(const struct hash_node *n, const void *key)
{
    const struct dest *t = (const struct dest *)n;
    const struct dest_ref *r = key;
    return t->pool == r->pool && t->tls_relaxed == r->tls_relaxed && strcmp(t->name, r->name) == 0;
}

/* The [pool] of t's pool id in the config in force, or NULL. */
static const struct pool_config *
dest_poolc(const struct delivery *d, uint32_t pool)
{
    const char *name = intern_name(d->names, pool);
    return name ? config_pool(d->cfg, name, strlen(name)) : NULL;
}

struct dest *
dest_get(struct delivery *d, const char *name)
{
    return dest_get_pool(d, name, 0);
}

struct dest *
dest_get_pool(struct delivery *d, const char *name, uint32_t pool)
{
    return dest_get_for(d, name, pool, false);
}

struct dest *
dest_get_for(struct delivery *d, const char *name, uint32_t pool, bool tls_relaxed)
{
    struct dest_ref ref = {name, pool, tls_relaxed};
    uint64_t h = hash_str_nocase(name) ^ ((uint64_t)pool * 0x9e3779b97f4a7c15ULL) ^ tls_relaxed;
    struct dest *t = (struct dest *)hash_find(&d->dests, h, &ref);
    if (t != NULL)
        return t;
    size_t nl = strnlen(name, 255);
    t = calloc(1, sizeof(*t) + nl + 1);
    if (t == NULL)
        return NULL;
    t->d = d;
    memcpy(t->name, name, nl); /* NUL: calloc */
    t->pool = pool;
    t->tls_relaxed = tls_relaxed;
    t->poolc = pool ? dest_poolc(d, pool) : NULL;
    t->pol = config_domain(d->cfg, name);
    fairq_init(&t->q, dest_tenant_weight, d);
    timer_init(&t->hold_timer, dest_on_hold);
    timer_init(&t->sweep_timer, dest_on_sweep);
    timer_init(&t->lim_timer, dest_on_lim_timer);
    struct limit_conf lc;
    dest_limit_conf(t->pol, &lc);
    /* The domain's limits hold per destination: each pool (its own
     * sending addresses) has them whole, as receivers count per address. */
    char lname[LIMIT_KEY_MAX];
    const char *pname = pool ? intern_name(d->names, pool) : NULL;
    if (pname == NULL)
        snprintf(lname, sizeof(lname), "%s", name);
    else if ((size_t)snprintf(lname, sizeof(lname), "%s|%s", name, pname) >= sizeof(lname))
        snprintf(lname, sizeof(lname), "%.200s|#%x", name, (unsigned)pool);
    if (limits_key_init(d->lim, &t->lim, lname, &lc, dest_on_wake, t) < 0) {
        /* a name the limiter refuses ('{' '}'): no domain has one */
        free(t);
        return NULL;
    }
    t->node.hash = h;
    if (hash_insert(&d->dests, &t->node) < 0) {
        limits_key_fini(d->lim, &t->lim);
        free(t);
        return NULL;
    }
    t->touched = d->w->now;
    lru_touch(&d->dest_lru, &t->lru);
    t->suspended = d->nsusp != 0 && scope_domain_suspended(d, t->name, d->w->now);
    return t;
}

struct dest *
dest_next(const struct delivery *d, struct dest_iter *it)
{
    return (struct dest *)hash_next(&d->dests, &it->bucket, &it->cur);
}

void
dest_last_fail_set(struct dest *t, const struct smtp_outcome *o, const char *mx,
                   const char *addr)
{
    if (t->last_fail == NULL && (t->last_fail = malloc(sizeof(*t->last_fail))) == NULL)
        return;
    t->last_fail->o = *o;
    snprintf(t->last_fail->mx, sizeof(t->last_fail->mx), "%s", mx ? mx : "");
    snprintf(t->last_fail->addr, sizeof(t->last_fail->addr), "%s", addr ? addr : "");
    t->last_fail->source[0] = '\0';
    t->last_fail->tls_policy = t->last_fail->tls_proto = t->last_fail->tls_cipher = NULL;
    t->last_fail->tls_verify[0] = '\0';
    t->last_fail->untried = false;
}

void
dest_last_fail_clear(struct dest *t)
{
    free(t->last_fail);
    t->last_fail = NULL;
}

void
dest_last_reply_at(struct dest *t, const char *mx, const char *addr)
{
    if (addr == NULL)
        addr = "";
    char *at = t->last_reply_at;
    if (mx != NULL && mx[0] != '\0' && at != NULL && strcmp(at, mx) == 0 &&
        strcmp(at + strlen(at) + 1, addr) == 0)
        return; /* the same host again: the common case, no allocation */
    free(at);
    t->last_reply_at = NULL;
    if (mx == NULL || mx[0] == '\0')
        return;
    size_t lm = strlen(mx) + 1, la = strlen(addr) + 1;
    if ((at = malloc(lm + la)) == NULL)
        return;
    memcpy(at, mx, lm);
    memcpy(at + lm, addr, la);
    t->last_reply_at = at;
}

/* Forget t and what waits in it (the spool keeps the recipients). live:
 * the loop turns, so timers, the lookup and the limiter are let go of
 * too; else they went with the loop. */
static void
dest_free(struct dest *t, bool live)
{
    struct delivery *d = t->d;
    struct job *j;
    while ((j = dest_pop(t)) != NULL)
        free(j);
    fairq_fini(&t->q);
    /* Always: at a stop, a job that came after sched_stop (or a
     * connection closing) may have armed one again, and the heap outlives
     * t (worker_fini walks it). */
    worker_timer_cancel(d->w, &t->hold_timer);
    worker_timer_cancel(d->w, &t->sweep_timer);
    worker_timer_cancel(d->w, &t->lim_timer);
    if (live) {
        if (t->req != NULL)
            d->ops->cancel(d, t->req);
        if (t->lim.l != NULL)
            limits_key_fini(d->lim, &t->lim);
    }
    dns_mx_result_unref(t->mx);
    free(t->src_ids);
    dest_last_fail_clear(t);
    free(t->fail_more);
    dest_last_reply_at(t, NULL, NULL);
    mta_sts_policy_unref(t->sts);
    dest_sts_forget(t);
    dest_want_remove(t);
    lru_remove(&d->addr_wait, &t->addr_want);
    site_unref(&d->sites, t->site);
    hash_remove(&d->dests, &t->node);
    lru_remove(&d->dest_lru, &t->lru);
    free(t);
}

bool
dest_evictable(const struct dest *t, uint64_t now)
{
    return fairq_empty(&t->q) && t->inflight == 0 && t->conns == 0 && !t->suspended &&
           t->req == NULL && t->sts_ask == NULL && !t->mx_waiting && !t->running &&
           now >= t->hold_until && now >= t->grey_until &&
           t->lim.nleases == 0 && t->untold == 0;
}

/* Every EVICT_SWEEP_MS: drop the destinations idle for
 * [delivery] destination_idle_ttl, oldest first, and before them the
 * husks of domains that moved to another worker (dest_moved: the oldest
 * end); busy ones met on the way go to the recent end. Their sites go
 * with their last reference. */
static void
dest_on_evict(struct timer *tm, void *ctx)
{
    (void)ctx;
    struct delivery *d = (struct delivery *)((char *)tm - offsetof(struct delivery, evict_timer));
    if (d->stopping)
        return;
    uint64_t now = d->w->now, ttl = MS_TO_NS(d->cfg->delivery.destination_idle_ttl);
    size_t budget = d->dest_lru.n, freed = 0;
    struct lru_node *x;
    /* Husks not evictable yet (a TXT lookup still out): looked at again
     * at the next sweep, not after the idle time. */
    struct dest *again[64];
    unsigned nagain = 0;
    while (budget-- > 0 && (x = lru_oldest(&d->dest_lru)) != NULL) {
        struct dest *t = (struct dest *)((char *)x - offsetof(struct dest, lru));
        if (!t->moved && now - t->touched < ttl)
            break;
        if (!dest_evictable(t, now)) {
            if (t->moved && nagain < sizeof(again) / sizeof(again[0])) {
                lru_remove(&d->dest_lru, &t->lru);
                again[nagain++] = t;
                continue;
            }
            t->touched = now;
            t->moved = false;
            lru_touch(&d->dest_lru, &t->lru);
            continue;
        }
        if (t->pool == 0 && !t->tls_relaxed && d->ops->unclaim != NULL)
            d->ops->unclaim(d, t->name); /* its next mail starts over */
        dest_free(t, true);
        d->evicted++;
        freed++;
    }
    while (nagain > 0)
        lru_age(&d->dest_lru, &again[--nagain]->lru);
    hash_compact(&d->dests);
    size_t bytes = freed * sizeof(struct dest) +
                   conn_pool_decay(&d->chunk_pool) * d->chunk_pool.size +
                   conn_pool_decay(&d->cli_pool) * d->cli_pool.size;
    delivery_trim(d, bytes, now);
    scope_count_paused(d);
    if (!d->stopping)
        worker_timer_arm(d->w, &d->evict_timer, now + MS_TO_NS(EVICT_SWEEP_MS));
}

/* t is active now. */
void
dest_touch(struct dest *t)
{
    t->touched = t->d->w->now;
    t->moved = false;
    lru_touch(&t->d->dest_lru, &t->lru);
}

void
dest_moved(struct dest *t)
{
    if (t->conns > 0)
        return; /* its connections finish here first: idle eviction */
    t->moved = true;
    lru_age(&t->d->dest_lru, &t->lru);
}

unsigned
dest_tenant_weight(void *ctx, uint32_t tenant)
{
    struct delivery *d = ctx;
    if (tenant == 0)
        return 1;
    /* The config's look-up is a walk of its tenants: once per id. */
    struct tenant_weight *tw = &d->tweights[tenant % (sizeof(d->tweights) / sizeof(d->tweights[0]))];
    if (tw->id == tenant)
        return tw->weight;
    const char *name = intern_name(d->names, tenant);
    /* A tenant a reload removed keeps its mail flowing at weight 1. */
    const struct tenant_config *tc =
        name != NULL ? config_tenant(d->cfg, name, strlen(name)) : NULL;
    tw->id = tenant;
    tw->weight = tc != NULL && tc->weight > 0 ? tc->weight : 1;
    return tw->weight;
}

void
dest_push(struct dest *t, struct job *j, bool front)
{
    bool idle = !front && fairq_empty(&t->q);
    if (!front)
        j->queued_ns = t->d->w->now;
    if (fairq_push(&t->q, &j->fq, job_tenant(j), job_priority(j), front) == 0) {
        if (idle)
            site_turn_join(t); /* no turns saved up while it had none to take */
        t->queued_rcpts += j->n;
        if (j->nrefused != 0)
            t->refused_queued++; /* a host refused it: passed over there (detour_pass) */
        if (dest_paused(t))
            atomic_fetch_add_explicit(&t->d->paused_rcpts, j->n, memory_order_relaxed);
        dest_sweep_arm(t); /* it expires on time, whatever it waits for */
        return;
    }
    job_lost(j);
}

struct job *
job_new(const char *domain, unsigned cap)
{
    /* The one place a recipient's domain becomes a destination's name: one
     * in U-labels (SMTPUTF8) is its A-labels, which its DNS lookups (MX,
     * addresses, MTA-STS, TLSA), its site and the logs use; one that is
     * no valid IDN stays as it is, and the scheduler fails it
     * (POLICY_BAD_IDN) without a lookup. */
    char alabels[256];
    size_t dl = strlen(domain);
    if (!idn_is_ascii(domain, dl) &&
        idn_domain_ascii(domain, dl, alabels, sizeof(alabels), NULL) > 0) {
        domain = alabels;
        dl = strlen(domain);
    }
    if (dl > 255)
        dl = 255;
    /* (the fields' end, not sizeof: its tail padding would cost a larger
     * block of malloc) */
    struct job *j = calloc(1, offsetof(struct job, idx) + cap * sizeof(unsigned) + dl + 1);
    if (j == NULL)
        return NULL;
    char *name = (char *)(j->idx + cap);
    for (size_t i = 0; i < dl; i++)
        name[i] = (char)((domain[i] >= 'A' && domain[i] <= 'Z') ? domain[i] + 32 : domain[i]);
    name[dl] = '\0';
    j->domain = name;
    return j;
}

struct job *
job_copy(const struct job *j, unsigned cap)
{
    size_t dl = strlen(j->domain);
    struct job *x = malloc(offsetof(struct job, idx) + cap * sizeof(unsigned) + dl + 1);
    if (x == NULL)
        return NULL;
    memcpy(x, j, offsetof(struct job, idx));
    char *name = (char *)(x->idx + cap);
    memcpy(name, j->domain, dl + 1);
    x->domain = name;
    return x;
}

void
job_lost(struct job *j)
{
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(j->id, qid);
    log_msg(LOG_ERR, "id=%s event=job_lost_until_restart domain=%s recipients=%u "
            "reason=out_of_memory", qid, j->domain, j->n);
    free(j);
}

struct job *
dest_pop(struct dest *t)
{
    struct job *j = job_of(fairq_pop(&t->q, NULL));
    if (j != NULL) {
        dest_unqueued(t, j->n);
        dest_refused_gone(t, j);
    }
    if (fairq_empty(&t->q))
        t->refused_queued = 0; /* (none can be left) */
    return j;
}

void
dest_unqueued(struct dest *t, unsigned n)
{
    n = t->queued_rcpts > n ? n : (unsigned)t->queued_rcpts;
    t->queued_rcpts -= n;
    /* scope_count_paused counts again at each suspension's start and end:
     * between, t's jobs count where they went in */
    if (n != 0 && dest_paused(t)) {
        uint64_t was = atomic_load_explicit(&t->d->paused_rcpts, memory_order_relaxed);
        atomic_store_explicit(&t->d->paused_rcpts, was > n ? was - n : 0, memory_order_relaxed);
    }
}

/* A job arrives (delivery.c's hand-off from the submitting thread):
 * split to the domain's recipients per transaction. */
void
dest_enqueue(struct dest *t, struct job *j)
{
    unsigned max = t->pol->max_rcpt_per_txn;
    while (j->n > max) {
        struct job *rest = job_copy(j, j->n - max);
        if (rest == NULL)
            break;
        rest->n = j->n - max;
        memcpy(rest->idx, j->idx + max, rest->n * sizeof(unsigned));
        j->n = max;
        dest_push(t, j, false);
        j = rest;
    }
    dest_push(t, j, false);
    dest_run(t);
}


unsigned
dest_port(const struct dest *t)
{
    return t->pol->route_port ? t->pol->route_port : t->d->cfg->delivery.remote_port;
}

void
dest_set_mx(struct dest *t, struct dns_mx_result *res)
{
    dns_mx_result_unref(t->mx);
    t->mx = res;
    t->usable_ns = 0;
    t->next_addr = 0;
    t->detour_cursor = false;
    t->failed_addrs = 0;
    t->own_failed = false;
    /* What was worked out from the old answer is asked again: a pointer
     * compared alone could match a new answer that took the freed one's
     * memory. */
    t->site_for = t->affinity_for = t->targets_for = t->mxk_for = NULL;
}

void
dest_mx_answer(struct dest *t, struct dns_mx_result *res)
{
    struct dns_mx_result *old = t->mx;
    uint64_t now = t->d->w->now;
    if (old == NULL) {
        dest_set_mx(t, res);
        return;
    }
    /* A refresh (scheduler.c dest_mx_refresh): t's connections use old. */
    uint64_t stale_ms = now > old->expires ? (now - old->expires) / 1000000 : 0;
    if (policy_mx_refresh_keeps(res->status, stale_ms)) {
        t->refresh_at = now + MS_TO_NS(POLICY_MX_REFRESH_RETRY_MS);
        log_msg(LOG_NOTICE, "event=mx_refresh_failed domain=%s status=%s why=\"%s\" retry_ms=%u",
                t->name, dns_status_str(res->status), res->why ? res->why : "",
                POLICY_MX_REFRESH_RETRY_MS);
        dns_mx_result_unref(res);
        return;
    }
    t->refresh_at = 0;
    if (dns_mx_result_same(old, res)) {
        /* Only its expiry changed: the site, the targets counted, the
         * claim and the failover cursor stand (the [mx] key is asked
         * again: it follows the first host, which a shuffle may change). */
        t->site_for = t->site_for == old ? res : NULL;
        t->affinity_for = t->affinity_for == old ? res : NULL;
        t->targets_for = t->targets_for == old ? res : NULL;
        t->mxk_for = NULL;
        t->mx = res;
        dns_mx_result_unref(old);
        return;
    }
    log_msg(LOG_INFO, "event=mx_changed domain=%s status=%s connections=%u", t->name,
            dns_status_str(res->status), t->conns);
    dest_set_mx(t, res);
}

void
dest_on_mx(void *arg, struct dns_mx_result *res)
{
    struct dest *t = arg;
    t->req = NULL;
    dest_mx_answer(t, res);
    dest_run(t);
}

static void
dest_on_hold(struct timer *tm, void *ctx)
{
    struct dest *t = (struct dest *)((char *)tm - offsetof(struct dest, hold_timer));
    t->failed_addrs = 0;
    t->own_failed = false;
    t->next_addr = 0;
    t->detour_cursor = false;
    dest_run(t);
}

/* No new connection to t for ms; what waits keeps its place, and is
 * checked for expiry while it waits. */
void
dest_hold(struct dest *t, uint64_t ms)
{
    struct delivery *d = t->d;
    uint64_t until = d->w->now + MS_TO_NS(ms);
    if (until <= t->hold_until)
        return;
    t->hold_until = until;
    t->hold_until_ms = clock_unix_ms() + ms;
    worker_timer_arm(d->w, &t->hold_timer, until);
    worker_timer_arm(d->w, &t->sweep_timer, d->w->now + MS_TO_NS(SWEEP_MS));
}

/* Is name among the n sorted names of v (or are all)? */
static bool
lift_named(const char *name, bool all, const char *const *v, size_t n)
{
    if (all)
        return true;
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, v[mid]);
        if (c == 0)
            return true;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return false;
}

/* The operator's flush: "retry now" means now, also where a rest would
 * have kept the mail waiting (up to site_hold after the last failure: an
 * outage's flush otherwise waited out the rest its own first retry
 * began). Every rest the named domains' mail waits on ends: the
 * destination's hold, its site's rest, the site's addresses passed over
 * and its sources' holds; and, a site's rest being its domains' (each
 * that came during it was held for it: scheduler.c), the holds of the
 * site's other domains too. A receiver still down fails the next try,
 * and the rests begin again. */
unsigned
delivery_lift_holds(struct delivery *d, bool all, const char *const *domains, size_t n)
{
    unsigned resting = 0;
    uint64_t now = d->w->now;
    unsigned gen = ++d->lift_gen;
    if (gen == 0)
        gen = ++d->lift_gen; /* 0 is "not marked" */
    /* The named destinations that rest, and the sites that rest under
     * them (marked). */
    struct dest_iter it = {0};
    for (struct dest *t; (t = dest_next(d, &it)) != NULL;) {
        if (!lift_named(t->name, all, domains, n))
            continue;
        bool rests = t->hold_until > now;
        if (t->site != NULL && t->site->hold_until > now) {
            t->site->lift_gen = gen;
            rests = true;
        }
        resting += rests;
    }
    if (resting == 0)
        return 0;
    struct dest_iter it2 = {0};
    for (struct dest *t; (t = dest_next(d, &it2)) != NULL;) {
        struct site *s = t->site;
        bool on_lifted = s != NULL && s->lift_gen == gen;
        if (!on_lifted && !lift_named(t->name, all, domains, n))
            continue;
        /* what a failure left to defer on the next turns (dest_fail_each's
         * budget) is tried now instead, as if deferred and flushed */
        free(t->fail_more);
        t->fail_more = NULL;
        if (t->hold_until > now) {
            t->hold_until = 0;
            t->hold_until_ms = 0;
            worker_timer_cancel(d->w, &t->hold_timer);
            t->failed_addrs = 0;
            t->own_failed = false;
            t->next_addr = 0;
            t->detour_cursor = false;
        }
        if (on_lifted && s->hold_until > now) {
            s->hold_until = 0;
            free(s->rest_fail);
            s->rest_fail = NULL;
            memset(s->down, 0, sizeof(s->down));
            for (unsigned i = 0; i < s->nsrc; i++)
                s->src[i].hold_until = 0;
        }
    }
    /* Run them once every rest is off (a site's first domain run would
     * otherwise see its site's rest still on for the others), then wake
     * each site once for the domains waiting on its list (a site of N
     * domains woken N times was N squared steps). */
    struct dest_iter it3 = {0};
    for (struct dest *t; (t = dest_next(d, &it3)) != NULL;)
        if (((t->site != NULL && t->site->lift_gen == gen) ||
             lift_named(t->name, all, domains, n)) &&
            !fairq_empty(&t->q))
            dest_run(t);
    struct dest_iter it4 = {0};
    for (struct dest *t; (t = dest_next(d, &it4)) != NULL;) {
        struct site *s = t->site;
        if (s == NULL || s->lift_gen != gen)
            continue;
        s->lift_gen = 0; /* woken once */
        if (s->want.n > 0)
            site_wake(d, s);
    }
    return resting;
}

/* Is t waiting on connection attempts alone (connecting, or waiting for
 * the greeting or the EHLO reply: none of its connections takes a job)? */
static bool
dest_only_opening(const struct dest *t)
{
    return t->opening > 0 && t->conns == t->opening;
}

void
dest_sweep_arm(struct dest *t)
{
    struct delivery *d = t->d;
    if (!timer_armed(&t->sweep_timer) && !fairq_empty(&t->q))
        worker_timer_arm(d->w, &t->sweep_timer, d->w->now + MS_TO_NS(SWEEP_MS));
}

/* While jobs wait at t: bounce those whose time is up (each job's expiry
 * is read from the spool once). Held, or its connections all still
 * opening, nothing moves for t meanwhile, so the walk costs no delivery.
 * Before, a recipient waiting on an attempt outlived max_age by as much
 * as the attempt took: a receiver that accepts and never greets held it
 * greeting_timeout (5m by default, for each address tried) past it. So
 * did one waiting behind busy connections at their cap, or for a rate's
 * tokens, until a connection took it: as long as the receiver took to
 * answer, or the backlog ahead of it to go. There, at most
 * SWEEP_READS expiries are read per walk (the rest are bounded by their
 * arrival and max_age), and a backlog over 10,000 jobs is walked less
 * often than each second, so that it costs its worker little.
 * An operator's suspension holds its jobs as they are: they expire when
 * it ends, at their next take. */
static void
dest_on_sweep(struct timer *tm, void *ctx)
{
    struct dest *t = (struct dest *)((char *)tm - offsetof(struct dest, sweep_timer));
    struct delivery *d = t->d;
    bool held = d->w->now < t->hold_until;
    bool idle = !held && !dest_only_opening(t); /* its connections (if any) take its jobs */
    if (d->stopping || fairq_empty(&t->q))
        return;
    if (idle && dest_paused(t)) { /* looked at again: the suspension may end */
        worker_timer_arm(d->w, &t->sweep_timer, d->w->now + MS_TO_NS(SWEEP_MS));
        return;
    }
    unsigned reads = idle ? SWEEP_READS : UINT_MAX;
    uint64_t now = clock_unix_ms();
    struct fairq_iter it;
    fairq_iter_init(&t->q, &it);
    for (struct job *j; (j = job_of(fairq_iter_next(&it))) != NULL;) {
        struct queue_envelope *env = NULL;
        if (j->expire_ms == 0) {
            /* past the walk's reads: its max_age from its id's time
             * alone, read once that is up (or at a later walk) */
            if (reads == 0 && !policy_expired(now, job_expire_ms(t->pol, NULL, j->id)))
                continue;
            if (reads != 0 && reads != UINT_MAX)
                reads--;
            if (queue_envelope_get(d->queue, j->id, &env) != 0)
                continue; /* gone or unreadable: conn_next drops what is gone */
            j->expire_ms = job_expire_ms(t->pol, env, j->id);
        }
        if (!policy_expired(now, j->expire_ms)) {
            queue_envelope_free(env);
            continue;
        }
        int erc = env == NULL ? queue_envelope_get(d->queue, j->id, &env) : 0;
        if (erc != 0) {
            /* Gone: dropped. Unreadable now: kept for the next sweep, as
             * freeing it would leave its recipient to a restart. */
            if (erc == QUEUE_ENOTFOUND) {
                fairq_iter_remove(&it);
                dest_unqueued(t, j->n);
                dest_refused_gone(t, j);
                free(j);
            }
            continue;
        }
        fairq_iter_remove(&it);
        dest_unqueued(t, j->n);
        dest_refused_gone(t, j);
        struct smtp_outcome o;
        memset(&o, 0, sizeof(o));
        o.status = SMTP_STATUS_TEMPFAIL;
        o.scope = SMTP_SCOPE_MESSAGE;
        o.enh = (struct smtp_enh){4, 4, 7};
        /* The reply that held it is why (Postfix's "delivery temporarily
         * suspended: ..."): what the sender's DSN and the log should say. */
        if (!held)
            job_last_attempt_text(&o, "message expired in the queue", env, j);
        else if (t->last_code != 0)
            snprintf(o.text, sizeof(o.text), "message expired while %s was held: %u %s", t->name,
                     t->last_code, t->last_reply);
        else if (t->last_reply[0] != '\0')
            snprintf(o.text, sizeof(o.text), "message expired while %s was held: %s", t->name,
                     t->last_reply);
        else
            snprintf(o.text, sizeof(o.text), "message expired while %s was held", t->name);
        struct outcome_where where = {.src = CLASSIFY_EXPIRED};
        if (held && t->last_reply_at != NULL) {
            /* ... and the MX host that sent it (an expiry keeps both:
             * job_finish) */
            where.mx = t->last_reply_at;
            const char *addr = t->last_reply_at + strlen(t->last_reply_at) + 1;
            where.mx_addr = addr[0] != '\0' ? addr : NULL;
        }
        job_finish(d, t, j, env, NULL, &o, &where);
        queue_envelope_free(env);
        free(j);
    }
    /* While it delivers, a backlog's walk comes less often as it grows
     * (a million jobs took some 50 ms a walk: every 100 s, not each
     * second), its expiries as much late at most. */
    uint64_t every = idle ? fairq_count(&t->q) / SWEEP_JOBS_PER_MS : 0;
    if (!fairq_empty(&t->q))
        worker_timer_arm(d->w, &t->sweep_timer,
                         d->w->now + MS_TO_NS(every > SWEEP_MS ? every : SWEEP_MS));
}


/* ---- the table ---- */

void
dests_init(struct delivery *d)
{
    hash_init(&d->dests, dest_eq, 256);
    lru_init(&d->dest_lru);
    lru_init(&d->addr_wait);
    timer_init(&d->evict_timer, dest_on_evict);
}

void
dests_start(struct delivery *d)
{
    worker_timer_arm(d->w, &d->evict_timer, d->w->now + MS_TO_NS(EVICT_SWEEP_MS));
}

void
sched_free_dests(struct delivery *d)
{
    worker_timer_cancel(d->w, &d->evict_timer);
    struct dest_iter it = {0};
    for (struct dest *t; (t = dest_next(d, &it)) != NULL;)
        dest_free(t, false);
    hash_fini(&d->dests);
    dest_sts_asks_free(d);
}
