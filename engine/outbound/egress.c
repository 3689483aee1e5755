/*
 * egress: what stands between a destination and the network on the way
 * out, on one worker (see internal.h for the other files).
 *
 * - The [mx] and [source] limits: one limiter key per section in force
 *   ("mx:PATTERN", "src:ADDRESS"), made on first use and shared by every
 *   destination behind it (dest_mxkey, src_key), and the keys of shaping
 *   rates ("shape:SRC@GROUP", "shape:tenant:T@GROUP": sched_shape_key).
 *   A destination refused a token waits on the key (mx_wait) and runs
 *   again when the limiter has news. A connection with nothing more to
 *   send gives its slot to a site waiting for one that holds fewer of the
 *   key's connections, or after a moment idle to one holding as many
 *   (key_slot_wanted: the slots shared evenly between the sites); an
 *   idle one gives it when such a site starts waiting (key_idle_kick:
 *   each key lists its idle holders, conn_idle_push and _unlink). A cap
 *   is shared beyond the worker: with [redis] across the nodes, without
 *   it counted for the node's workers (engine/node_caps.h, through the
 *   limiter: a refusal there comes with a poll time). One idle on a slot
 *   of such a cap asks every 250 ms whether a worker or node elsewhere
 *   waits for one (sched_conn_wanted_elsewhere, limits_key_wanted) and
 *   gives it if so.
 * - Sources: which egress address of a destination's pool the next
 *   connection goes from (dest_source: per weight, one connection per
 *   source before a second from any, not a held, suspended or warmed-up
 *   one; where the site's counts cannot choose, the pool's smooth
 *   weighted round robin on the worker, source_rr_peek, its turn taken
 *   when the connection opens, source_pick_opened; for an hour after a
 *   receiver last greylisted the destination's mail, the source that met
 *   it, source_note_reply), whether a
 *   pool's connection may take another transaction (source_may_send:
 *   its source's weighted share per message), and the holds of one
 *   source at a site (source_hold_at: after a 421, a rate-limited reply,
 *   or a connection it could not open, source_open_failed).
 * - What the active shaping actions say (engine/shaping.h): a cap, a
 *   suspension, a rate or a bounce, for a new connection
 *   (shaping_may_open) and before each transaction (shaping_may_send).
 *
 * The scheduler asks these before it opens a connection
 * (outbound/scheduler.c) or hands a job to one (outbound/sched_conn.c); the decisions on failures stay in
 * outbound/policy.c.
 *
 * Threading: the worker's thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "common/clock.h"
#include "common/intern.h"
#include "common/log.h"
#include "engine/outbound/internal.h"
#include "engine/shaping.h"
#include "engine/warmup.h"

/* A rate split over parts: the same count over a period parts times as
 * long, so the parts add up to the rate however small it is (3/min over
 * two workers: 3 each per 2 min, where each took 1/min before). */
static struct conf_rate
rate_part(struct conf_rate r, unsigned parts)
{
    if (parts <= 1 || r.count == 0)
        return r;
    uint64_t per = (uint64_t)(r.per_ms ? r.per_ms : 1000) * parts;
    if (per <= UINT32_MAX) {
        r.per_ms = (uint32_t)per;
    } else {
        r.count = r.count / parts ? r.count / parts : 1; /* a period past 49 days */
    }
    return r;
}

void
mx_limit_conf(const struct delivery *d, const struct mx_policy *m, struct limit_conf *lc)
{
    memset(lc, 0, sizeof(*lc));
    if (m == NULL)
        return; /* a pattern gone after a reload: no limit */
    /* Without Redis each worker holds its part of the rates: the domains
     * behind one MX are spread over the workers. */
    unsigned share = d->cfg->redis.url == NULL ? d->nworkers : 1;
    unsigned me = d->w != NULL ? d->w->id : 0;
    lc->msg_rate = rate_part(m->max_message_rate, share);
    lc->msg_burst = limits_part(m->message_burst, share, me);
    lc->conn_rate = rate_part(m->max_connection_rate, share);
    lc->conn_burst = limits_part(m->connection_burst, share, me);
    /* The cap is whole on every worker: with Redis it counts the leases
     * of every node there, without it those of every worker of this node
     * (node_caps.h), so a domain alone behind the section (its mail goes
     * out from one worker) may use all of it. */
    lc->max_connections = m->max_connections;
    /* Every worker holds the key: with Redis, while it is away each keeps
     * its share of the node's share; without, the cap is counted for the
     * node (limits.h). */
    lc->spread = d->nworkers;
}

void
mx_on_wake(void *arg)
{
    struct mxkey *k = arg;
    if (k->parked_asking) {
        k->parked_asking = false;
        scope_rate_answer(k->d);
    }
    /* The list is newest first (key_slot_wanted looks at the latest
     * waiters); they run oldest first, so the first to have waited takes
     * what the news freed. */
    struct dest *w = NULL, *x = k->waiters;
    k->waiters = NULL;
    while (x != NULL) {
        struct dest *next = x->next_mxwait;
        x->next_mxwait = w;
        w = x;
        x = next;
    }
    while (w != NULL) {
        struct dest *next = w->next_mxwait;
        w->next_mxwait = NULL;
        w->mx_waiting = false;
        dest_run(w);
        w = next;
    }
}

/* The key of an [mx] ("mx:") or [source] ("src:") section m, made on
 * first use: its name for the limiter is prefix + the section's name. */
/* The key named name, made on first use with the limits of m (NULL: none
 * yet; a shaping key gets its rate on each use). */
static struct mxkey *
mxkey_named(struct delivery *d, const char *name, const struct mx_policy *m)
{
    for (struct mxkey *k = d->mxkeys; k != NULL; k = k->next)
        if (strcmp(k->pattern, name) == 0)
            return k;
    struct mxkey *k = calloc(1, sizeof(*k));
    if (k == NULL)
        return NULL;
    k->d = d;
    k->pol = m;
    snprintf(k->pattern, sizeof(k->pattern), "%s", name);
    struct limit_conf lc;
    if (m != NULL)
        mx_limit_conf(d, m, &lc);
    else
        memset(&lc, 0, sizeof(lc));
    if (limits_key_init(d->lim, &k->lim, name, &lc, mx_on_wake, k) < 0) {
        free(k);
        return NULL;
    }
    k->next = d->mxkeys;
    d->mxkeys = k;
    return k;
}

static struct mxkey *
mxkey_get(struct delivery *d, const char *prefix, const struct mx_policy *m)
{
    char name[LIMIT_KEY_MAX];
    snprintf(name, sizeof(name), "%s%s", prefix, m->pattern);
    return mxkey_named(d, name, m);
}

/* The [mx] limits for t's preferred MX host, looked up once per answer. */
struct mxkey *
dest_mxkey(struct dest *t)
{
    struct delivery *d = t->d;
    if (t->mx != NULL && t->mxk_for == t->mx)
        return t->mxk;
    t->mxk_for = t->mx;
    t->mxk = NULL;
    if (t->mx == NULL || t->mx->nhosts == 0 || d->cfg->nmxs == 0)
        return NULL;
    const struct mx_policy *m = config_mx(d->cfg, t->mx->hosts[0].name);
    if (m == NULL)
        return NULL;
    return t->mxk = mxkey_get(d, "mx:", m);
}

/* The [source] limits of a connection from src (a pool's source), or,
 * src NULL, in family fam from [delivery] source_address; NULL: none. */
struct mxkey *
src_key(struct delivery *d, const struct mx_policy *src, int fam)
{
    if (src != NULL)
        return mxkey_get(d, "src:", src);
    const struct delivery_config *dc = &d->cfg->delivery;
    const struct sockaddr_storage *ss = fam == AF_INET6 ? &dc->source6 : &dc->source4;
    if (d->cfg->nsources == 0 || ss->ss_family == AF_UNSPEC)
        return NULL;
    const struct mx_policy *m = config_source(d->cfg, (const struct sockaddr *)ss);
    if (m == NULL)
        return NULL;
    return mxkey_get(d, "src:", m);
}

/* A shaping rate's key (internal.h): a source's ("shape:SRC@GROUP": its
 * mail to every MX host of the group draws on it, the other sources'
 * does not) or a tenant's ("shape:tenant:T@GROUP"). No [section] stands
 * behind it (pol NULL): sched_shape_rate gives it its rate on each use. */
struct mxkey *
sched_shape_key(struct delivery *d, const char *who, const char *group)
{
    char name[LIMIT_KEY_MAX];
    int n = snprintf(name, sizeof(name), "shape:%s@%s", who, group);
    if (n < 0 || (size_t)n >= sizeof(name) || strpbrk(name, "{}") != NULL)
        return NULL;
    return mxkey_named(d, name, NULL);
}

/* Which of c's links holds it on k's list of idle holders: 0 for its
 * [mx] key, 1 for its [source] key (the same key is linked once, as 0). */
static int
key_idle_slot(const struct conn *c, const struct mxkey *k)
{
    return c->mxk == k ? 0 : 1;
}

static void
key_idle_link(struct mxkey *k, struct conn *c, int i)
{
    k->idle++;
    c->key_idle_next[i] = k->idle_holders;
    c->key_idle_pprev[i] = &k->idle_holders;
    if (k->idle_holders != NULL)
        k->idle_holders->key_idle_pprev[key_idle_slot(k->idle_holders, k)] =
            &c->key_idle_next[i];
    k->idle_holders = c;
}

static void
key_idle_unlink(struct mxkey *k, struct conn *c, int i)
{
    k->idle--;
    struct conn *next = c->key_idle_next[i];
    *c->key_idle_pprev[i] = next;
    if (next != NULL)
        next->key_idle_pprev[key_idle_slot(next, k)] = c->key_idle_pprev[i];
    c->key_idle_next[i] = NULL;
    c->key_idle_pprev[i] = NULL;
}

void
conn_idle_push(struct conn *c)
{
    c->next_idle = c->site->idle;
    c->site->idle = c;
    c->on_idle = true;
    if (c->mxk != NULL)
        key_idle_link(c->mxk, c, 0);
    if (c->srck != NULL && c->srck != c->mxk)
        key_idle_link(c->srck, c, 1);
}

bool
conn_idle_quit(struct conn *c, const char *why)
{
    if (!c->on_idle)
        return false;
    for (struct conn **pc = &c->site->idle; *pc != NULL; pc = &(*pc)->next_idle)
        if (*pc == c) {
            conn_idle_unlink(pc);
            c->quit_why = why;
            c->d->ops->quit(c);
            return true;
        }
    return false;
}

void
conn_idle_unlink(struct conn **pc)
{
    struct conn *c = *pc;
    *pc = c->next_idle;
    c->next_idle = NULL;
    c->on_idle = false;
    if ((c->mxk != NULL && c->mxk->idle == 0) ||
        (c->srck != NULL && c->srck != c->mxk && c->srck->idle == 0)) {
        log_msg(LOG_CRIT, "conn=%llx event=panic reason=key_idle_count_underflow",
                (unsigned long long)c->id);
        abort();
    }
    if (c->mxk != NULL)
        key_idle_unlink(c->mxk, c, 0);
    if (c->srck != NULL && c->srck != c->mxk)
        key_idle_unlink(c->srck, c, 1);
}

/* A domain of a site began to wait for a slot of k: an idle connection
 * of this worker that holds one for another site, owed to the waiting
 * one now (key_slot_wanted 2: its site holds more of k's connections),
 * says goodbye, as it would have had the domain waited when it went idle;
 * else it would keep the slot to the end of idle_timeout while the
 * domain waits. A waiting site that holds as many has connections of its
 * own, which carry the domain (its line). */
static void
key_idle_kick(struct delivery *d, struct mxkey *k)
{
    /* A walk that found none owed is not made again in the same loop
     * turn: with [redis] every answer for the key runs all its waiters
     * (mx_on_wake), and each comes back here. */
    if (k->idle == 0 || k->kick_none_at == d->w->now)
        return;
    for (struct conn *c = k->idle_holders; c != NULL; c = c->key_idle_next[key_idle_slot(c, k)]) {
        if (c->want_close || c->closed || key_slot_wanted(c, k) != 2)
            continue;
        if (conn_idle_quit(c, "limit_wanted"))
            return;
    }
    k->kick_none_at = d->w->now;
}

void
mx_wait(struct mxkey *k, struct dest *t, uint64_t retry_at, bool lease)
{
    bool full = retry_at == UINT64_MAX;
    if (retry_at != UINT64_MAX) {
        dest_lim_wait(t, retry_at);
        /* A time is a rate's (t's timer runs it), except, with [redis],
         * for a lease: then t waits on the key too. Redis's answer to
         * the question t's acquire sent runs it (the key's wake), not
         * t's timer a timeout later; and a full cap comes with a poll
         * time (limits_key_full), so this worker's idle holders see t
         * and a release here runs it. Likewise a message token refused
         * while the key asks Redis for more (limits_key_asking): the
         * time is the request's timeout, and the tokens its answer
         * books lapse long before it (a shaping rate's key, 5/s: one
         * token, gone 200 ms after its slot). Waiting for the timeout,
         * t found them gone and the key asked again, each second, for
         * ever: its connection, resumed and idle again each time,
         * never reached its idle_timeout either. A token booked but
         * not yet due (no request in flight) is t's timer's. */
        if (t->d->cfg->redis.url == NULL) {
            /* Without [redis], a cap counted for the node refused t with
             * a poll time (limits_key_node_wide): another worker holds
             * slots, whose ends wake nothing here. t also waits on the
             * key, so that one of this worker's ending runs it, and this
             * worker's idle holders see it as for a full cap. Not for a
             * refusal by the key's connection rate (limits_key_capped
             * false): t's timer is for that, and an idle holder that
             * quit for t would only leave its own site to wait for the
             * rate too. */
            if (!lease || !limits_key_node_wide(&k->lim) ||
                !limits_key_capped(&k->lim, t->d->w->now))
                return;
            full = true;
        } else if (lease)
            full = limits_key_full(&k->lim);
        else if (!limits_key_asking(&k->lim))
            return;
    }
    if (!t->mx_waiting) {
        t->mx_waiting = true;
        t->mx_wait_token = !lease;
        t->next_mxwait = k->waiters;
        k->waiters = t;
        if (full && lease && !fairq_empty(&t->q))
            key_idle_kick(t->d, k);
    }
}

/* Connections of site s holding a slot of c's key k: those of c's source
 * at s for its [source] key, else (the [mx] key of the site's preferred
 * host) all of s's. This worker's: its sites share out the slots it
 * holds; those of the other workers (node_caps.h) or nodes ([redis]) are
 * shared by their rules. */
static unsigned
key_conns(const struct site *s, const struct conn *c, const struct mxkey *k)
{
    if (s == NULL)
        return 0;
    if (k == c->srck && c->src != NULL) {
        struct site_source *ss = site_source((struct site *)s, c->src_id);
        return ss != NULL ? ss->conns : 0;
    }
    return s->conns;
}

/* Does a destination of another site, with mail, wait for a slot of
 * [mx] or [source] key k (mx_wait)? Of KEY_OWED_LOOK such waiters at
 * most (the list also holds c's own site's domains, which ride c:
 * conn_take_waiting, not counted; at most KEY_WAIT_WALK of those with
 * mail walked; domains served since leave the list as the walk passes).
 * 2: one whose site holds fewer of the key's connections than c's
 * does, owed c's slot now (the slots are shared out evenly between the
 * sites that want them, and where there are fewer than sites they take
 * turns); 1: only others, which c's slot goes to after KEY_IDLE_GRACE_MS
 * idle (c's domain may have more in a moment); 0: none. (Giving the slot
 * as it went idle whenever one waited, two busy sites under one [mx] cap
 * handed connections back and forth at every moment a queue ran empty.) */
#define KEY_OWED_LOOK 16
#define KEY_WAIT_WALK 64
int
key_slot_wanted(const struct conn *c, struct mxkey *k)
{
    unsigned looked = 0, walked = 0;
    int wanted = 0;
    unsigned mine = key_conns(c->site, c, k);
    struct dest **pw = k != NULL ? &k->waiters : NULL;
    while (pw != NULL && *pw != NULL && looked < KEY_OWED_LOOK && walked < KEY_WAIT_WALK) {
        struct dest *w = *pw;
        if (fairq_empty(&w->q)) {
            /* Served since (a domain of the site rode its connections):
             * off the list, which the walk would otherwise stop in before
             * an older waiter of another site. Mail that comes for it
             * runs it, and a refusal puts it back. Not counted: each
             * leaves once. */
            *pw = w->next_mxwait;
            w->next_mxwait = NULL;
            w->mx_waiting = false;
            continue;
        }
        walked++;
        pw = &w->next_mxwait;
        if (w->site == c->site || dest_paused(w) || w->mx_wait_token)
            continue; /* (one that waits for a token has its connection) */
        looked++;
        if (key_conns(w->site, c, k) < mine)
            return 2;
        wanted = 1;
    }
    return wanted;
}

/* Is k's cap shared beyond this worker: through Redis, or without it
 * counted for the node's workers (limits_key_node_wide)? */
static bool
key_shared_cap(const struct delivery *d, const struct mxkey *k)
{
    return k != NULL && k->lim.conf.max_connections != 0 &&
           (d->cfg->redis.url != NULL || limits_key_node_wide(&k->lim));
}

bool
sched_conn_key_polled(const struct conn *c)
{
    return key_shared_cap(c->d, c->mxk) || key_shared_cap(c->d, c->srck);
}

void
sched_conn_want_ask(struct conn *c)
{
    struct delivery *d = c->d;
    struct mxkey *keys[2] = {c->mxk, c->srck != c->mxk ? c->srck : NULL};
    for (int i = 0; i < 2; i++)
        if (key_shared_cap(d, keys[i]) && !limits_key_node_wide(&keys[i]->lim))
            (void)limits_key_wanted(d->lim, &keys[i]->lim, &keys[i]->want, d->w->now);
}

bool
sched_conn_wanted_elsewhere(struct conn *c)
{
    struct delivery *d = c->d;
    struct mxkey *keys[2] = {c->mxk, c->srck != c->mxk ? c->srck : NULL};
    for (int i = 0; i < 2; i++)
        if (key_shared_cap(d, keys[i]) &&
            limits_key_wanted(d->lim, &keys[i]->lim, &keys[i]->want, d->w->now)) {
            keys[i]->want.wanted = false; /* answered: one slot for one mark */
            return true;
        }
    return false;
}

bool
sched_conn_key_wanted(const struct conn *c)
{
    return key_slot_wanted(c, c->mxk) != 0 || key_slot_wanted(c, c->srck) != 0;
}

/* ---- sources: the egress addresses of a destination's pool ---- */

/* Transactions a source may be ahead of its weighted share at a site
 * before its connections give way to the others'. */
static uint64_t
share_slack(uint64_t total)
{
    return 32 + total / 64;
}

bool
source_better(const struct site_source *a, unsigned wa, const struct site_source *b, unsigned wb)
{
    /* A source with no connection at the site, not ahead of the other
     * per weight, first: a site opens one connection per source before a
     * second from any (with a window of a few, the heavier source took
     * every connection, and the others never sent or warmed up). */
    if (a->conns == 0 && b->conns != 0 && a->sent * wb <= b->sent * wa)
        return true;
    if (b->conns == 0 && a->conns != 0 && b->sent * wa <= a->sent * wb)
        return false;
    /* the least (transactions + connections + 1) per weight */
    uint64_t la = a->sent + a->conns + 1, lb = b->sent + b->conns + 1;
    return la * wb < lb * wa;
}

/* The name ids of t's pool's sources, in the pool's order (0 where the
 * name table is full), made once per [pool] in force; NULL without
 * memory. */
static const uint32_t *
dest_src_ids(struct dest *t)
{
    if (t->src_ids != NULL && t->src_ids_for == t->poolc)
        return t->src_ids;
    free(t->src_ids);
    t->src_ids = NULL;
    t->src_ids_for = NULL;
    if (t->poolc == NULL || t->poolc->nsources == 0)
        return NULL;
    uint32_t *ids = calloc(t->poolc->nsources, sizeof(*ids));
    if (ids == NULL)
        return NULL;
    for (unsigned i = 0; i < t->poolc->nsources; i++) {
        const struct pool_source *ps = &t->poolc->sources[i];
        ids[i] = ps->source != NULL ? intern_id(t->d->names, ps->source->pattern) : 0;
    }
    t->src_ids = ids;
    t->src_ids_for = t->poolc;
    return ids;
}

/* The address family of a [source] section's address. */
static int
source_family(const struct mx_policy *src)
{
    return strchr(src->pattern, ':') != NULL ? AF_INET6 : AF_INET;
}

/* What the active shaping actions (shaping.h) say about source src_id
 * (0: the node's default source) sending to MX host mx for t: whether
 * any applies, and when to look again (monotonic ns) in *recheck. */
static bool
dest_shaping(struct dest *t, uint32_t src_id, const char *mx, struct shaping_verdict *v,
             uint64_t *recheck)
{
    struct delivery *d = t->d;
    memset(v, 0, sizeof(*v));
    if (d->shaping == NULL)
        return false;
    const char *src = src_id != 0 ? intern_name(d->names, src_id) : "";
    uint64_t now_ms = clock_unix_ms();
    if (!shaping_check(d->shaping, d->cfg->shaping_rules, src ? src : "", mx, t->name, now_ms, v))
        return false;
    *recheck = d->w->now + MS_TO_NS(v->recheck_ms > now_ms ? v->recheck_ms - now_ms : 1);
    return true;
}

/* A bounce action applies to t: what waits in its queue fails now, as
 * an operator's bounce (spool, delivery log, DSN); what comes up later
 * while the action lasts likewise. */
static void
shaping_bounce(struct dest *t, const char *mx)
{
    struct policy_fail f;
    policy_job(POLICY_OPERATOR_BOUNCE, &f);
    struct smtp_outcome o;
    char text[160];
    snprintf(text, sizeof(text), "bounced by a shaping action for %.100s", mx ? mx : t->name);
    job_outcome(&o, &f, text);
    /* A job whose message cannot be read just then stays, and is
     * bounced at t's next run (before, it was dropped from memory and
     * waited for a restart). */
    unsigned n = dest_queued(t);
    dest_fail_each(t, &o, f.src);
    if (n > 0)
        log_msg(LOG_NOTICE, "event=shaping_bounced domain=%s mx=%s jobs=%u", t->name,
                mx ? mx : "-", n);
}

bool
sched_shaping_bounces(struct dest *t, const struct job *j)
{
    struct delivery *d = t->d;
    if (d->shaping == NULL)
        return false;
    const char *mx = t->mx != NULL && t->mx->nhosts > 0 ? t->mx->hosts[0].name : NULL;
    uint64_t now_ms = clock_unix_ms();
    struct shaping_verdict v;
    if (shaping_check(d->shaping, d->cfg->shaping_rules, "", mx, t->name, now_ms, &v) && v.bounce)
        return true;
    struct shaping_tenant_verdict tv;
    return j->owner.tenant != 0 && mx != NULL &&
           shaping_tenant_check(d->shaping, d->cfg->shaping_rules,
                                intern_name(d->names, j->owner.tenant), mx, now_ms, &tv) &&
           tv.bounce;
}

/* May a new connection of t go from src_id to mx, as shaping says? */
static bool
shaping_may_open(struct dest *t, uint32_t src_id, const char *mx, uint64_t *wait)
{
    struct shaping_verdict v;
    uint64_t at = 0;
    if (!dest_shaping(t, src_id, mx, &v, &at))
        return true;
    if (v.bounce) {
        shaping_bounce(t, mx);
        if (at < *wait)
            *wait = at;
        return false;
    }
    if (!v.suspended && (v.cap == 0 || t->conns < v.cap))
        return true;
    if (at < *wait)
        *wait = at;
    return false;
}

/* Of the sources of t's pool at indexes idx (n > 1), the one the pool's
 * smooth weighted round robin on this worker gives next (nginx's: each
 * adds its weight to its count, the highest count goes and gives back
 * the sum of the weights; over a run of picks among the same sources
 * each goes in proportion to its weight, spread out, and the counts stay
 * within the sum of the weights, so a source away for a while is owed
 * little). Only looks: sets out->src, out->id and the turn
 * (out->rr_set, rr_n, rr_pick) that source_pick_opened takes. Leaves out
 * as it is without memory. */
static void
source_rr_peek(struct dest *t, const unsigned *idx, unsigned n, const uint32_t *ids,
               struct source_pick *out)
{
    const int64_t *rr = pool_rr(t->d, t);
    if (rr == NULL)
        return;
    unsigned pick = idx[0];
    for (unsigned k = 0; k < n; k++) {
        unsigned i = idx[k];
        out->rr_set[k] = (unsigned short)i;
        if (rr[i] + t->poolc->sources[i].weight > rr[pick] + t->poolc->sources[pick].weight)
            pick = i;
    }
    out->rr_n = n;
    out->rr_pick = pick;
    const struct mx_policy *src = t->poolc->sources[pick].source;
    out->src = src;
    out->id = ids != NULL ? ids[pick] : intern_id(t->d->names, src->pattern);
}

void
source_pick_opened(struct dest *t, const struct source_pick *pk)
{
    int64_t *rr = pk->rr_n > 1 ? pool_rr(t->d, t) : NULL;
    if (rr == NULL)
        return;
    int64_t sum = 0;
    for (unsigned k = 0; k < pk->rr_n; k++) {
        unsigned i = pk->rr_set[k];
        rr[i] += t->poolc->sources[i].weight;
        sum += t->poolc->sources[i].weight;
    }
    rr[pk->rr_pick] -= sum;
}

void
source_note_reply(struct conn *c, const struct smtp_outcome *o)
{
    struct dest *t = c->dest;
    if (c->src == NULL || t == NULL || t->poolc == NULL || !policy_greylisted(o))
        return;
    if (t->grey_src != c->src_id || t->grey_until <= c->d->w->now)
        log_msg(LOG_INFO, "conn=%llx event=greylisted domain=%s mx=%s source=%s for_ms=%u "
                "reply=\"%u %s\"", (unsigned long long)c->id, t->name, c->mx,
                c->src->pattern, (unsigned)POLICY_GREYLIST_STICK_MS, o->code, o->text);
    t->grey_src = c->src_id;
    t->grey_until = c->d->w->now + MS_TO_NS(POLICY_GREYLIST_STICK_MS);
}

int
dest_source(struct dest *t, const char *mx, int family, struct source_pick *out)
{
    struct delivery *d = t->d;
    memset(out, 0, sizeof(*out));
    if (t->poolc == NULL || t->site == NULL) {
        /* the node's default source, unless shaping holds it */
        uint64_t wait = UINT64_MAX;
        if (shaping_may_open(t, 0, mx, &wait))
            return 1;
        out->until = wait;
        return 0;
    }
    const uint32_t *ids = dest_src_ids(t);
    uint64_t now = d->w->now, now_ms = clock_unix_ms(), wait = UINT64_MAX;
    long best = -1; /* an index: site_source() may move the entries */
    unsigned bw = 0, held = 0, usable = 0;
    /* The sources that may go (cand) and those of them the site's counts
     * cannot tell from best (tied), by their index in the pool; fresh:
     * none of the candidates has sent or connected at this site yet. */
    unsigned cand[SITE_SOURCES_MAX], tied[SITE_SOURCES_MAX], ncand = 0, ntied = 0;
    bool fresh = true;
    for (unsigned i = 0; i < t->poolc->nsources; i++) {
        const struct pool_source *ps = &t->poolc->sources[i];
        if (ps->weight == 0 || ps->source == NULL)
            continue;
        if (family != AF_UNSPEC && source_family(ps->source) != family) {
            out->other_family = true;
            continue;
        }
        uint32_t id = ids != NULL ? ids[i] : intern_id(d->names, ps->source->pattern);
        if (id == 0 || scope_suspended(d, SCOPE_SOURCE, id, now))
            continue;
        if (!shaping_may_open(t, id, mx, &wait))
            continue; /* suspended or capped at this destination by shaping */
        struct site_source *ss = site_source(t->site, id);
        if (ss == NULL)
            continue;
        usable++;
        if (ss->hold_until > now) {
            held++;
            wait = ss->hold_until < wait ? ss->hold_until : wait;
            continue;
        }
        if (ss->shaped_until > now && ss->conns > 0)
            continue; /* slowed by a shaping rate: one connection carries it, the
                       * others go from sources that may go at full rate */
        if (warmup_left(d->warmup, ps->source->pattern, mx, now_ms) == 0) {
            uint64_t next = warmup_next_day_ms(d->warmup, ps->source->pattern, mx, now_ms);
            uint64_t at = now + MS_TO_NS(next > now_ms ? next - now_ms : HOLD_MIN_MS);
            wait = at < wait ? at : wait;
            continue;
        }
        if (ncand == SITE_SOURCES_MAX)
            continue; /* (a site keeps no more: site_source gave NULL above) */
        cand[ncand++] = i;
        fresh = fresh && ss->sent == 0 && ss->conns == 0;
        if (best < 0 || source_better(ss, ps->weight, &t->site->src[best], bw)) {
            best = ss - t->site->src;
            bw = ps->weight;
            out->src = ps->source;
            out->id = id;
            tied[0] = i;
            ntied = 1;
        } else if (!source_better(&t->site->src[best], bw, ss, ps->weight)) {
            tied[ntied++] = i;
        }
    }
    if (best >= 0 && t->grey_until > now) {
        /* A receiver greylisted mail from grey_src: its retry goes from
         * there while that source may go (else it is greylisted again). */
        for (unsigned k = 0; k < ncand; k++) {
            const struct pool_source *ps = &t->poolc->sources[cand[k]];
            uint32_t id = ids != NULL ? ids[cand[k]] : intern_id(d->names, ps->source->pattern);
            if (id == t->grey_src) {
                out->src = ps->source;
                out->id = id;
                return 1;
            }
        }
    }
    if (best >= 0) {
        /* Where the site cannot choose, the pool's weights do, over all
         * its sites: at a site none has used yet (the long tail of a
         * newsletter: a site for each small domain, one connection each),
         * or between sources the site's counts find even. */
        if (fresh && ncand > 1)
            source_rr_peek(t, cand, ncand, ids, out);
        else if (ntied > 1)
            source_rr_peek(t, tied, ntied, ids, out);
        return 1;
    }
    out->src = NULL;
    out->id = 0;
    out->until = wait == UINT64_MAX ? now + MS_TO_NS(HOLD_MIN_MS) : wait;
    out->all_held = usable > 0 && held == usable;
    out->other_family = out->other_family && usable == 0;
    return 0;
}

/* May c (of a pool's source) take another transaction at its site? Not
 * while its source is held, nor while its destination sticks to another
 * source that may go (greylisting: t->grey_src), nor while it is ahead of
 * its weighted share
 * of the transactions of the sources that may send now: then it says
 * goodbye, and the next connection goes from a source behind its share
 * (dest_source). So the weights hold per message, not only per
 * connection, whatever the connections' speed and lifetime. */
bool
source_may_send(struct conn *c)
{
    struct delivery *d = c->d;
    struct dest *t = c->dest;
    if (c->src == NULL || c->site == NULL || t->poolc == NULL)
        return true;
    uint64_t now = d->w->now;
    if (scope_suspended(d, SCOPE_SOURCE, c->src_id, now))
        return false;
    struct site_source *mine = site_source(c->site, c->src_id);
    if (mine == NULL)
        return true;
    if (mine->hold_until > now)
        return false;
    if (t->grey_until > now) {
        /* A receiver greylists here: the source that met it carries the
         * destination's mail, whatever its share, while it may go (the
         * retries come from the address the receiver saw); the others'
         * connections end after their transaction. */
        if (c->src_id == t->grey_src)
            return true;
        struct source_pick pk;
        if (dest_source(t, c->mx, c->addr.sa.sa_family, &pk) == 1 && pk.id == t->grey_src)
            return false;
        if ((mine = site_source(c->site, c->src_id)) == NULL)
            return true; /* (dest_source's site_source calls may move the entries) */
    }
    uint64_t total = 0, wsum = 0, mine_sent = mine->sent;
    unsigned mine_w = 0, others = 0;
    const uint32_t *ids = dest_src_ids(t);
    for (unsigned i = 0; i < t->poolc->nsources; i++) {
        const struct pool_source *ps = &t->poolc->sources[i];
        if (ps->weight == 0 || ps->source == NULL)
            continue;
        uint32_t id = ids != NULL ? ids[i] : intern_id(d->names, ps->source->pattern);
        struct site_source *ss = NULL;
        for (unsigned k = 0; k < c->site->nsrc; k++)
            if (c->site->src[k].id == id)
                ss = &c->site->src[k];
        if (id == c->src_id)
            mine_w = ps->weight;
        else if (ss == NULL || ss->hold_until > now || ss->shaped_until > now ||
                 scope_suspended(d, SCOPE_SOURCE, id, now))
            continue; /* it cannot carry its share now (held, slowed by shaping) */
        else
            others++;
        total += ss ? ss->sent : 0;
        wsum += ps->weight;
    }
    /* Not (or no longer: a reload took it out or set its weight to 0) a
     * sending source of the destination's pool: it carries none of the
     * pool's mail, even while no other source has a connection here (a
     * source new to the pool has none yet, and would never get one while
     * this connection kept the mail flowing). */
    if (mine_w == 0)
        return false;
    if (others == 0 || wsum == 0)
        return true;
    /* mine_sent / total against mine_w / wsum, with some slack */
    return mine_sent * wsum <= total * mine_w + share_slack(total) * wsum;
}

void
sched_shape_rate(struct delivery *d, struct mxkey *k, const struct dest *t, unsigned permille,
                 uint64_t interval_ns)
{
    const struct limit_conf *dc = &t->lim.conf;
    /* With Redis every worker's key draws on one budget; while Redis is
     * away each keeps its share of the node's share. */
    unsigned spread = d->cfg->redis.url != NULL ? d->nworkers : 1;
    if (k->lim.conf.msg_rate.count != dc->msg_rate.count ||
        k->lim.conf.msg_rate.per_ms != dc->msg_rate.per_ms ||
        k->lim.conf.msg_burst != dc->msg_burst || k->lim.conf.spread != spread) {
        struct limit_conf lc;
        memset(&lc, 0, sizeof(lc));
        lc.msg_rate = dc->msg_rate;
        lc.msg_burst = dc->msg_burst;
        lc.spread = spread;
        limits_key_set(d->lim, &k->lim, &lc);
    }
    unsigned share = d->cfg->redis.url == NULL ? d->nworkers : 1;
    limits_key_shape(d->lim, &k->lim, permille, interval_ns * (share ? share : 1));
}

/* A source's rate action (scope=source) slows that source only: its
 * transactions to the hosts of the action's group draw on a key of their
 * own (shape_key), the destination's and the other sources' are
 * untouched. A fraction is of the message rate configured for c's
 * destination. Without Redis each worker has its own key, so an absolute
 * rate is split between the workers, as the [mx] rates are. While it
 * holds, the source cannot carry its weighted share at the site
 * (shaped_until): the other sources' connections do not give way to it. */
static void
shaping_source_rate(struct conn *c, const struct shaping_verdict *v, uint64_t until)
{
    struct delivery *d = c->d;
    if (v->src_rate_permille == 0 && v->src_rate_interval_ns == 0) {
        if (c->shk != NULL) /* over (or cleared): the key goes back to no limit */
            limits_key_shape(d->lim, &c->shk->lim, 0, 0);
        c->shk = NULL;
        return;
    }
    const char *src = c->src_id != 0 ? intern_name(d->names, c->src_id) : NULL;
    struct mxkey *k = sched_shape_key(d, src != NULL ? src : "default", v->src_rate_group);
    if (k != c->shk && c->shk != NULL)
        limits_key_shape(d->lim, &c->shk->lim, 0, 0);
    c->shk = k;
    if (k == NULL)
        return; /* no memory: the source goes at the destination's rate */
    sched_shape_rate(d, k, c->dest, v->src_rate_permille, v->src_rate_interval_ns);
    struct site_source *ss = c->site != NULL && c->src != NULL ? site_source(c->site, c->src_id)
                                                                : NULL;
    if (ss != NULL)
        ss->shaped_until = until > d->w->now + MS_TO_NS(1000) ? until : d->w->now + MS_TO_NS(1000);
}

/* May c take another transaction, as shaping says? Not while its source
 * (or its destination group, or domain) is suspended, not a second one in
 * backoff mode, not while its destination has more connections than a
 * cap allows. */
bool
shaping_may_send(struct conn *c)
{
    struct shaping_verdict v;
    uint64_t at = 0;
    bool any = dest_shaping(c->dest, c->src_id, c->mx, &v, &at);
    /* a group's or domain's rate action lowers the destination's message
     * rate in the limiter (as an adaptive backoff does); lifted once none
     * applies */
    limits_key_shape(c->d->lim, &c->dest->lim, v.rate_permille, v.rate_interval_ns);
    shaping_source_rate(c, &v, at);
    if (!any)
        return true;
    if (v.bounce) {
        shaping_bounce(c->dest, c->mx);
        return false;
    }
    if (v.suspended || (v.one_txn && c->nmsgs >= 1) || (v.cap != 0 && c->dest->conns > v.cap)) {
        c->d->stats.shaping_quits++;
        return false;
    }
    return true;
}

/* May c carry t's mail now, as the shaping actions say of t, c's source
 * and c's MX host (what shaping_may_send() asks of a connection's own
 * domain at each transaction, asked before c moves to t)? When not, t
 * runs again when they may have changed. */
bool
shaping_may_move(struct conn *c, struct dest *t)
{
    struct shaping_verdict v;
    uint64_t at = 0;
    if (!dest_shaping(t, c->src_id, c->mx, &v, &at))
        return true;
    if (!v.bounce && !v.suspended && !(v.one_txn && c->nmsgs >= 1) &&
        (v.cap == 0 || t->conns < v.cap))
        return true;
    dest_lim_wait(t, at); /* a bounce: its own run bounces what waits */
    return false;
}

/* Source src_id rests at site (policy_source_hold) while the pool's
 * other sources carry on; when every source of t's pool is held there,
 * t holds as a destination without a pool would (unless hold_dest is
 * false: the caller decides). conn: for the log. */
static void
source_hold_at(struct dest *t, struct site *site, uint32_t src_id, const char *mx,
               unsigned long long conn, const char *why, bool hold_dest)
{
    struct delivery *d = t->d;
    struct site_source *ss = site ? site_source(site, src_id) : NULL;
    if (ss == NULL) {
        dest_hold(t, t->pol->site_hold);
        return;
    }
    if (ss->hold_until > d->w->now)
        return; /* held already (its other connections met the same): no longer */
    ss->holds++;
    uint64_t ms = policy_source_hold(t->pol->site_hold, ss->holds);
    uint64_t until = d->w->now + MS_TO_NS(ms);
    if (until > ss->hold_until)
        ss->hold_until = until;
    d->stats.source_holds++;
    log_msg(LOG_NOTICE,
            "conn=%llx event=source_held source=%s domain=%s site=%s for_ms=%llu holds=%u "
            "reason=%s",
            conn, intern_name(d->names, src_id), t->name, site->key, (unsigned long long)ms,
            ss->holds, why);
    struct source_pick pk;
    if (hold_dest && t->site == site && dest_source(t, mx, AF_UNSPEC, &pk) == 0 && pk.all_held &&
        pk.until > d->w->now) {
        uint64_t rest = (pk.until - d->w->now + 999999) / 1000000;
        log_msg(LOG_NOTICE,
                "conn=%llx event=destination_held domain=%s pool=%s for_ms=%llu "
                "reason=every_source_held",
                conn, t->name, intern_name(d->names, t->pool), (unsigned long long)rest);
        dest_hold(t, rest);
    }
}

void
source_hold(struct conn *c, const char *why)
{
    source_hold_at(c->dest, c->site, c->src_id, c->mx, (unsigned long long)c->id, why, true);
}

void
sched_source_throttled(struct dest *t, uint32_t src_id, const char *mx, const char *why)
{
    source_hold_at(t, t->site, src_id, mx ? mx : "", 0, why, true);
}

bool
source_open_failed(struct dest *t, uint32_t src_id, const char *mx, int family)
{
    if (t->site == NULL || src_id == 0 || site_source(t->site, src_id) == NULL)
        return false;
    source_hold_at(t, t->site, src_id, mx, 0, "open_failed", false);
    struct source_pick pk;
    return dest_source(t, mx, family, &pk) != 0;
}
