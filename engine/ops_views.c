/*
 * ops_views: the figures the stats socket shows (see ops_int.h for the
 * other files of ops): the counters of "stats" and /metrics, gathered
 * from every worker (wcall) and from the modules that count on their
 * own threads (spool, suppression list, events, DKIM, AUTH, shaping,
 * warm-up, MTA-STS), and the "domains" view: every worker's destinations,
 * with the spool's deferred counts per domain (a scan, cached).
 *
 * Threading: the stats thread; the *_on_worker functions on each worker.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/conf.h"
#include "common/intern.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/auth_limit.h"
#include "engine/auth_pool.h"
#include "engine/delivery.h"
#include "engine/dkim_pool.h"
#include "engine/dlog.h"
#include "engine/dsn.h"
#include "engine/events.h"
#include "engine/mta_sts.h"
#include "engine/ops_int.h"
#include "engine/outbound/site.h"
#include "engine/resolver.h"
#include "engine/server.h"
#include "engine/shaping.h"
#include "engine/suppress.h"
#include "engine/warmup.h"
#include "queue/queue.h"

/* ---- counters ---- */

struct wstats {
    struct server_stats srv;
    struct delivery_stats dlv;
    struct resolver_stats dns;
    bool has_dns;
    const char *redis; /* static */
    uint64_t dests, waiting, inflight;
    struct worker_stats loop; /* the worker's loop: turns, the slow ones */
    struct stats_tenant tenants[SERVER_TENANTS_MAX];  /* received, per tenant */
    unsigned ntenants;
    struct stats_tenant dtenants[DELIVERY_TENANTS_MAX]; /* outcomes, per tenant */
    unsigned ndtenants;
    struct delivery_owner_stats *own; /* owned: per tenant, pool and source */
    size_t nown, capown;
};
_Static_assert(DELIVERY_TENANTS_MAX == STATS_TENANT_TABLE_MAX, "a worker's outcome tenants");

static void
counters_on_worker(struct engine *e, unsigned w, struct wcall *c)
{
    struct wstats *s = &((struct wstats *)c->res)[w];
    server_worker_stats(e->srv[w], &s->srv);
    s->loop = e->workers[w].stats;
    s->ntenants = server_worker_tenants(e->srv[w], s->tenants, SERVER_TENANTS_MAX);
    s->ndtenants = delivery_tenants(e->dlv[w], s->dtenants, DELIVERY_TENANTS_MAX);
    delivery_stats(e->dlv[w], &s->dlv);
    if (delivery_owner_stats(e->dlv[w], &s->own, &s->nown, &s->capown) < 0)
        s->nown = 0; /* no memory: the per-owner figures are left out this time */
    s->has_dns = delivery_resolver_stats(e->dlv[w], &s->dns) == 0;
    s->redis = delivery_redis_state(e->dlv[w]);
    delivery_objects(e->dlv[w], &s->dests, &s->waiting, &s->inflight);
}

static void
free_wstats(void *res, unsigned n)
{
    struct wstats *ws = res;
    for (unsigned i = 0; ws != NULL && i < n; i++)
        free(ws[i].own);
    free(res);
}

static int
cmp_owner(const void *a, const void *b)
{
    const struct stats_owner *x = a, *y = b;
    uint64_t nx = x->delivered + x->deferred + x->bounced,
             ny = y->delivered + y->deferred + y->bounced;
    if (nx != ny)
        return nx > ny ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* The workers' counters per pool and source summed, the busiest first,
 * at most top_n of each. */
static void
merge_owners(struct engine *e, const struct wstats *ws, struct stats_counters *out)
{
    unsigned top = e->cfg->stats.top_n < STATS_OWNERS_MAX ? e->cfg->stats.top_n
                                                          : STATS_OWNERS_MAX;
    struct stats_owner *all[2] = {NULL, NULL};
    unsigned n[2] = {0, 0}, cap[2] = {0, 0};
    for (unsigned w = 0; w < e->nworkers; w++)
        for (size_t i = 0; i < ws[w].nown; i++) {
            const struct delivery_owner_stats *x = &ws[w].own[i];
            if (x->kind == DELIVERY_SCOPE_TENANT)
                continue; /* the tenants' outcomes come with delivery_tenants() */
            int s = x->kind == DELIVERY_SCOPE_POOL ? 0 : 1;
            unsigned k = 0;
            while (k < n[s] && strcmp(all[s][k].name, x->name) != 0)
                k++;
            if (k == n[s]) {
                if (n[s] == cap[s]) {
                    unsigned nc = cap[s] ? cap[s] * 2 : 16;
                    struct stats_owner *v = realloc(all[s], nc * sizeof(*v));
                    if (v == NULL)
                        continue;
                    all[s] = v;
                    cap[s] = nc;
                }
                memset(&all[s][k], 0, sizeof(all[s][k]));
                snprintf(all[s][k].name, sizeof(all[s][k].name), "%s", x->name);
                n[s]++;
            }
            all[s][k].delivered += x->delivered;
            all[s][k].deferred += x->deferred;
            all[s][k].bounced += x->bounced;
            all[s][k].connections += x->connections;
        }
    for (int s = 0; s < 2; s++) {
        if (n[s] > 1)
            qsort(all[s], n[s], sizeof(*all[s]), cmp_owner);
        unsigned m = n[s] < top ? n[s] : top;
        if (m > 0)
            memcpy(s == 0 ? out->pools : out->sources, all[s], m * sizeof(*all[s]));
        *(s == 0 ? &out->npools : &out->nsources) = m;
        free(all[s]);
    }
}

static int
cmp_tenant(const void *a, const void *b)
{
    const struct stats_tenant *x = a, *y = b;
    if (x->received_msgs != y->received_msgs)
        return x->received_msgs > y->received_msgs ? -1 : 1;
    /* what the spool held from before a restart: by what became of it */
    uint64_t ox = x->delivered + x->deferred + x->bounced + x->expired;
    uint64_t oy = y->delivered + y->deferred + y->bounced + y->expired;
    if (ox != oy)
        return ox > oy ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* The workers' per-tenant counts (of submission and of delivery: a
 * tenant's mail is received on one worker and delivered on others)
 * summed, the busiest first, at most [stats] top_n of them (and
 * STATS_TENANTS_MAX). */
static void
merge_tenants(struct engine *e, const struct wstats *ws, struct stats_counters *out)
{
    struct stats_tenant *all = NULL;
    unsigned n = 0, cap = 0;
    for (unsigned i = 0; i < 2 * e->nworkers; i++)
        for (unsigned k = 0; k < (i % 2 ? ws[i / 2].ndtenants : ws[i / 2].ntenants); k++) {
            const struct stats_tenant *t =
                i % 2 ? &ws[i / 2].dtenants[k] : &ws[i / 2].tenants[k];
            unsigned j = 0;
            while (j < n && strcmp(all[j].name, t->name) != 0)
                j++;
            if (j == n) {
                if (n == cap) {
                    unsigned nc = cap ? cap * 2 : 16;
                    struct stats_tenant *v = realloc(all, nc * sizeof(*v));
                    if (v == NULL)
                        continue;
                    all = v;
                    cap = nc;
                }
                memset(&all[n], 0, sizeof(all[n]));
                memcpy(all[n].name, t->name, sizeof(all[n].name));
                n++;
            }
            all[j].received_msgs += t->received_msgs;
            all[j].received_rcpts += t->received_rcpts;
            all[j].delivered += t->delivered;
            all[j].deferred += t->deferred;
            all[j].bounced += t->bounced;
            all[j].expired += t->expired;
        }
    if (n > 1)
        qsort(all, n, sizeof(*all), cmp_tenant);
    unsigned top = e->cfg->stats.top_n < STATS_TENANTS_MAX ? e->cfg->stats.top_n : STATS_TENANTS_MAX;
    out->ntenants = n < top ? n : top;
    if (out->ntenants > 0)
        memcpy(out->tenants, all, out->ntenants * sizeof(*all));
    free(all);
}

static int
cmp_rule_hits(const void *a, const void *b)
{
    const struct stats_shaping_rule *x = a, *y = b;
    return x->hits < y->hits ? 1 : x->hits > y->hits ? -1 : strcmp(x->name, y->name);
}

/* Shaping: active actions by kind, and the rules that fired most. */
static void
shaping_counters(struct engine *e, struct stats_counters *out)
{
    const struct config *cfg = e->cfg;
    if (e->shaping == NULL)
        return;
    struct shaping_stats ss;
    shaping_stats(e->shaping, &ss);
    out->shaping_on = true;
    out->shaping_redis = !ss.redis_on ? "off" : ss.redis_up ? "connected" : "unreachable";
    for (unsigned k = 0; k < SHAPING_KIND_COUNT && k < 6; k++)
        out->shaping_active[k] = ss.active[k];
    out->shaping_started = ss.started;
    out->shaping_ended = ss.ended;
    out->shaping_hits = ss.hits;
    out->shaping_published = ss.published;
    out->shaping_received = ss.received;
    out->shaping_ignored = ss.ignored;
    out->shaping_outbox = ss.outbox;
    out->shaping_outbox_dropped = ss.outbox_dropped;
    unsigned nr = shaping_rules_count(cfg->shaping_rules), n = 0;
    out->shaping_rules = nr;
    for (unsigned i = 0; i < nr; i++) {
        uint64_t h = shaping_rule_hit_count(cfg->shaping_rules, i);
        if (h == 0)
            continue;
        struct stats_shaping_rule x = {.hits = h};
        snprintf(x.name, sizeof(x.name), "%s", shaping_rule(cfg->shaping_rules, i)->name);
        if (n < STATS_OWNERS_MAX) {
            out->shaping_rule_hits[n++] = x;
        } else if (h > out->shaping_rule_hits[n - 1].hits) {
            out->shaping_rule_hits[n - 1] = x;
        } else {
            continue;
        }
        qsort(out->shaping_rule_hits, n, sizeof(x), cmp_rule_hits);
    }
    out->nshaping_rule_hits = n;
}

/* The warm-up plans' rows and the keeper's state. */
static void
warmup_counters(struct engine *e, struct stats_counters *out)
{
    struct warmup_stats ws;
    warmup_stats(e->warmup, &ws);
    out->warmup_sources = ws.sources;
    out->warmup_redis = ws.redis;
    out->warmup_refused = ws.refused;
    out->warmup_saves = ws.saves;
    out->warmup_save_failures = ws.save_failures;
    out->warmup_syncs = ws.syncs;
    out->warmup_sync_failures = ws.sync_failures;
    struct warmup_row *rows = calloc(STATS_WARMUP_MAX, sizeof(*rows));
    if (rows == NULL)
        return;
    size_t n = warmup_report(e->warmup, clock_unix_ms(), rows, STATS_WARMUP_MAX);
    out->nwarmup = n < STATS_WARMUP_MAX ? (unsigned)n : STATS_WARMUP_MAX;
    for (unsigned i = 0; i < out->nwarmup; i++) {
        struct stats_warmup *r = &out->warmup[i];
        memcpy(r->source, rows[i].source, sizeof(r->source));
        memcpy(r->plan, rows[i].plan, sizeof(r->plan));
        memcpy(r->group, rows[i].group, sizeof(r->group));
        r->day = rows[i].day;
        r->allowance = rows[i].allowance;
        r->taken = rows[i].taken;
        r->left = rows[i].left;
    }
    free(rows);
}

void
ops_counters(void *arg, struct stats_counters *out)
{
    struct engine *e = arg;
    out->config_generations = engine_config_generations(e);
    out->delivery_on = e->cfg_start == NULL || e->cfg_start->delivery.enabled;
    struct wcall *c = wcall_new(e, counters_on_worker);
    if (c == NULL)
        return;
    c->res = calloc(e->nworkers, sizeof(struct wstats));
    c->res_free = free_wstats;
    bool answered = c->res != NULL && wcall_run(c, -1) == 0;
    if (c->res != NULL && !answered)
        /* A late worker may still be writing its slot: read none of them. */
        log_msg(LOG_WARN, "event=stats_incomplete reason=worker_did_not_answer");
    if (answered) {
        merge_tenants(e, c->res, out);
        merge_owners(e, c->res, out);
        for (unsigned i = 0; i < e->nworkers; i++) {
            const struct wstats *s = &((struct wstats *)c->res)[i];
            out->received_msgs += s->srv.messages;
            out->received_rcpts += s->srv.recipients;
            out->conn_in_total += s->srv.accepted;
            out->conn_in_open += s->srv.sessions;
            out->rcpt_suppressed += s->srv.rcpt_suppressed;
            out->dkim_signed += s->srv.dkim_signed;
            out->dkim_unsigned += s->srv.dkim_unsigned;
            out->dkim_failed += s->srv.dkim_failed;
            out->auth_ok += s->srv.auth_ok;
            out->auth_failed += s->srv.auth_failed;
            out->auth_refused_address += s->srv.auth_refused_address;
            out->auth_refused_user += s->srv.auth_refused_user;
            out->auth_busy += s->srv.auth_busy;
            out->auth_coalesced += s->srv.auth_coalesced;
            out->oob_messages += s->srv.oob_messages;
            out->oob_events += s->srv.oob_events;
            out->oob_dropped += s->srv.oob_dropped;
            out->oob_refused += s->srv.oob_refused;
            out->delivered += s->dlv.delivered;
            out->source_holds += s->dlv.source_holds;
            out->shaping_quits += s->dlv.shaping_quits;
            out->parked += s->dlv.parked;
            out->due_paused += s->dlv.due_paused;
            out->deferred += s->dlv.deferred;
            out->bounced += s->dlv.bounced;
            out->expired += s->dlv.expired;
            out->dsn_queued += s->dlv.dsn_queued;
            out->delivered_tls += s->dlv.delivered_tls;
            out->conn_out_total += s->dlv.connections;
            out->conn_out_failed += s->dlv.connect_failures;
            out->dane_authenticated += s->dlv.dane_authenticated;
            out->dane_failed += s->dlv.dane_failed;
            out->conn_out_open += s->dlv.open;
            out->transactions += s->dlv.transactions;
            out->reused_transactions += s->dlv.reused;
            out->reuse_lost += s->dlv.reuse_lost;
            out->handed_over += s->dlv.handed_over;
            out->site_turns += s->dlv.site_turns;
            out->host_refused += s->dlv.host_refused;
            out->host_detoured += s->dlv.host_detoured;
            out->destinations += s->dests;
            out->jobs_inflight += s->inflight;
            out->turns += s->loop.loops;
            out->slow_turns += s->loop.slow_turns;
            if (s->loop.longest_turn_ns / 1000u > out->longest_turn_us)
                out->longest_turn_us = s->loop.longest_turn_ns / 1000u;
            if (s->has_dns) {
                out->dns_lookups += s->dns.dns.lookups;
                out->dns_cache_hits += s->dns.dns.hits;
                out->dns_cache_entries += s->dns.dns.entries;
                out->dns_tlsa_queries += s->dns.dns.tlsa_queries;
                out->dns_tlsa_secure += s->dns.dns.tlsa_secure;
                out->dns_tlsa_failed += s->dns.dns.tlsa_failed;
                out->dns_edns_off += s->dns.dns.edns_off;
                out->dns_inflight += s->dns.dns.inflight;
                out->dns_queued += s->dns.dns.queued;
                out->dns_timeouts += s->dns.dns.timeouts;
                out->dns_failures += s->dns.dns.failures;
            }
        }
        uint64_t waiting = 0, bufs = 0, sites = 0, addrs = 0;
        for (unsigned i = 0; i < e->nworkers; i++) {
            waiting += ((struct wstats *)c->res)[i].waiting;
            bufs += ((struct wstats *)c->res)[i].dlv.bufs_out;
            sites += ((struct wstats *)c->res)[i].dlv.sites;
        }
        struct stats_object *o = out->objects;
        snprintf(o[0].name, sizeof(o[0].name), "jobs_waiting");
        o[0].live = waiting;
        snprintf(o[1].name, sizeof(o[1].name), "session_buffers");
        o[1].live = bufs;
        snprintf(o[2].name, sizeof(o[2].name), "smtp_sessions");
        o[2].live = out->conn_in_open;
        snprintf(o[3].name, sizeof(o[3].name), "outbound_connections");
        o[3].live = out->conn_out_open;
        /* bytes, not objects: what message bodies and recipients in reception hold of
         * [server] body_memory_limit */
        snprintf(o[4].name, sizeof(o[4].name), "body_memory_bytes");
        o[4].live = atomic_load(&e->body_bytes);
        struct dkim_pool_stats ds;
        dkim_pool_stats(e->dkim_pool, &ds);
        snprintf(o[5].name, sizeof(o[5].name), "dkim_jobs_queued");
        o[5].live = ds.queued;
        snprintf(o[6].name, sizeof(o[6].name), "sites");
        o[6].live = sites;
        /* one table for the node (outbound/site.h) */
        if (e->site_addrs != NULL)
            addrs = site_addrs_count(e->site_addrs);
        snprintf(o[7].name, sizeof(o[7].name), "mx_addresses");
        o[7].live = addrs;
        /* ids given to names: never freed (common/intern.h) */
        uint64_t names = 0, made = 0;
        intern_counts(e->names, &names, &out->names_refused);
        intern_bounded_counts(e->names, &made, &out->campaign_names_refused);
        snprintf(o[8].name, sizeof(o[8].name), "names");
        o[8].live = names;
        /* of them campaigns', against [server] campaign_names */
        snprintf(o[9].name, sizeof(o[9].name), "campaign_names");
        o[9].live = made;
        out->nobjects = 10;
    }
    out->redis_state = "off";
    if (answered && e->cfg->redis.url != NULL) {
        /* The worst of the workers' views: one unreachable is news. */
        out->redis_state = "connected";
        for (unsigned i = 0; i < e->nworkers; i++) {
            const char *st = ((struct wstats *)c->res)[i].redis;
            if (st != NULL && strcmp(st, "connected") != 0)
                out->redis_state = st;
        }
    }
    wcall_unref(c);
    warmup_counters(e, out);
    shaping_counters(e, out);
    struct queue_counts qc;
    struct queue_stats qs;
    queue_stats(e->queue, &qs);
    out->map_size = qs.map_size;
    out->map_used = qs.map_used;
    /* the messages' pages: map_used is the highest page in use, and
     * keeps what a campaign took once it is delivered (LMDB keeps freed
     * pages for reuse, the map never shrinks) */
    out->spool_bytes = qs.map_used;
    if (queue_counts(e->queue, &qc, NULL, NULL) == 0) {
        out->queue_msgs = qc.messages;
        out->queue_rcpts = qc.ready + qc.deferred;
        out->queue_deferred = qc.deferred;
        out->spool_bytes = qc.bytes;
    }
    out->spool_corrupt = qs.corrupt;
    out->spool_unconfirmed_removed = qs.unconfirmed_removed;
    out->spool_sync_failing_refused = qs.sync_failing_refused;
    if (e->dlog != NULL) {
        struct dlog_stats ds;
        dlog_stats(e->dlog, &ds);
        out->dlog_events = ds.events;
        out->dlog_write_errors = ds.write_errors;
        out->dlog_dropped = ds.dropped;
        _Static_assert(BOUNCE_CLASS_COUNT <= STATS_CLASSES_MAX, "STATS_CLASSES_MAX too small");
        for (unsigned k = 0; k < BOUNCE_CLASS_COUNT; k++) {
            const char *name = bounce_class_str((enum bounce_class)k);
            snprintf(out->deferred_by_class[k].name, sizeof(out->deferred_by_class[k].name),
                     "%s", name);
            snprintf(out->bounced_by_class[k].name, sizeof(out->bounced_by_class[k].name), "%s",
                     name);
            out->deferred_by_class[k].live = ds.outcomes[DLOG_OUT_DEFERRED][k];
            out->bounced_by_class[k].live = ds.outcomes[DLOG_OUT_BOUNCED][k];
        }
        out->nclasses = BOUNCE_CLASS_COUNT;
    }
    if (e->events != NULL) {
        struct events_sink_stats es[STATS_EVENT_SINKS_MAX];
        unsigned n = events_stats(e->events, es, STATS_EVENT_SINKS_MAX);
        for (unsigned i = 0; i < n; i++) {
            struct stats_event_sink *o = &out->event_sinks[i];
            _Static_assert(sizeof(o->name) == sizeof(es[i].name) &&
                               sizeof(o->kind) == sizeof(es[i].kind) &&
                               sizeof(o->last_error) == sizeof(es[i].last_error),
                           "stats_event_sink and events_sink_stats differ");
            memcpy(o->name, es[i].name, sizeof(o->name));
            memcpy(o->kind, es[i].kind, sizeof(o->kind));
            o->pending = es[i].pending;
            o->oldest_age_ms = es[i].oldest_age_ms;
            o->sent = es[i].sent;
            o->failed = es[i].failed;
            o->dropped = es[i].dropped;
            o->rejected = es[i].rejected;
            o->paused = es[i].paused;
            memcpy(o->last_error, es[i].last_error, sizeof(o->last_error));
        }
        out->nevent_sinks = n;
    }
    if (e->auth_pool != NULL) {
        struct auth_pool_stats ps;
        auth_pool_stats(e->auth_pool, &ps);
        out->auth_hash_waiting = ps.waiting;
        for (unsigned i = 0; i < AUTH_SCHEME_COUNT && i < STATS_AUTH_SCHEMES_MAX; i++) {
            snprintf(out->auth_hashes[i].name, sizeof(out->auth_hashes[i].name), "%s",
                     auth_scheme_str((enum auth_scheme)i));
            out->auth_hashes[i].live = ps.hashes[i];
        }
        out->nauth_hashes = AUTH_SCHEME_COUNT < STATS_AUTH_SCHEMES_MAX ? AUTH_SCHEME_COUNT
                                                                       : STATS_AUTH_SCHEMES_MAX;
    }
    if (e->auth_limit != NULL) {
        struct auth_limit_stats ls;
        auth_limit_stats(e->auth_limit, &ls);
        out->auth_limit_entries = ls.entries;
        out->auth_limit_evictions = ls.evictions;
    }
    if (e->suppress != NULL) {
        struct suppress_stats ss;
        suppress_stats(e->suppress, &ss);
        out->suppress_on = true;
        out->suppress_entries = ss.entries;
        out->suppress_checks = ss.checks;
        out->suppress_hits = ss.hits;
        out->suppress_added = ss.added;
        out->suppress_removed = ss.removed;
        out->suppress_feed_dropped = ss.feed_dropped;
        out->suppress_map_size = ss.map_size;
        out->suppress_map_used = ss.map_used;
        out->suppress_notes_pending = qs.notes_kept;
    }
    out->workers = e->nworkers;
    out->uptime_ms = clock_unix_ms() - e->started_ms;
}

/* ---- domains ---- */

struct dlist {
    struct stats_domain *d; /* owned */
    size_t n, cap;
    uint64_t deferrals;     /* the worker's deferrals so far */
};

static void
domains_on_worker(struct engine *e, unsigned w, struct wcall *c)
{
    struct dlist *l = &((struct dlist *)c->res)[w];
    struct delivery_stats st;
    delivery_stats(e->dlv[w], &st);
    l->deferrals = st.deferred;
    if (delivery_domains(e->dlv[w], &l->d, &l->n, &l->cap) < 0)
        wcall_fail(c, -ENOMEM);
}

static void
free_dlists(void *res, unsigned n)
{
    struct dlist *l = res;
    for (unsigned i = 0; l != NULL && i < n; i++)
        free(l[i].d);
    free(l);
}

/* Per-domain deferred counts from the spool: a scan of every recipient,
 * so it is reused for DEFERRED_TTL. When the workers' deferral count has
 * moved, it is scanned again until a scan comes DEFERRED_SETTLE after the
 * move was seen (the workers count a deferral once its commit is durable,
 * so the two are never far apart), but no more often than ten times the
 * last scan's length nor once a second: a view left open on a queue of
 * millions costs at most a tenth of a thread. */
struct deferred_cache {
    pthread_mutex_t lock;
    uint64_t at_ms;
    uint64_t scan_ms;     /* how long the last scan took */
    uint64_t deferrals;   /* the workers' deferral count last seen */
    uint64_t moved_ms;    /* when it was last seen to move */
    struct dcount {
        char name[256];
        uint64_t deferred;
        uint64_t oldest_ms;                 /* its oldest recipient's, deferred or not */
        uint64_t by_tag[QUEUE_TAGS];        /* deferred, by class + 1 (outcome.c) */
    } *v;            /* owned */
    size_t n, cap;
};

static struct deferred_cache dcache = {.lock = PTHREAD_MUTEX_INITIALIZER};

static int
dcache_add(void *arg, const char *domain, const struct queue_counts *c)
{
    struct deferred_cache *dc = arg;
    if (c->deferred == 0)
        return 0;
    if (dc->n == dc->cap) {
        size_t nc = dc->cap ? dc->cap * 2 : 64;
        struct dcount *v = realloc(dc->v, nc * sizeof(*v));
        if (v == NULL)
            return 0;
        dc->v = v;
        dc->cap = nc;
    }
    struct dcount *x = &dc->v[dc->n++];
    snprintf(x->name, sizeof(x->name), "%s", domain);
    x->deferred = c->deferred;
    x->oldest_ms = c->oldest_ms;
    memcpy(x->by_tag, c->deferred_by_tag, sizeof(x->by_tag));
    return 0;
}

/* What the spool says of x's deferred recipients (dc): their count, the
 * oldest waiting recipient when older than the workers' ready ones (a
 * domain whose mail is all deferred has none of those), and their
 * classes, most first (a selection of a few of QUEUE_TAGS). */
static void
dcount_apply(const struct dcount *dc, struct stats_domain *x)
{
    /* failures held for their message's DSN (outbound/outcome.c) wait in
     * the spool as deferrals, yet no retry is coming for them */
    uint64_t held = dc->by_tag[DSN_HELD_TAG];
    x->deferred = dc->deferred > held ? dc->deferred - held : 0;
    if (dc->oldest_ms != 0 && (x->oldest_ms == 0 || dc->oldest_ms < x->oldest_ms))
        x->oldest_ms = dc->oldest_ms;
    bool taken[QUEUE_TAGS] = {false};
    x->nwaiting_classes = 0;
    while (x->nwaiting_classes < STATS_DOMAIN_CLASSES) {
        unsigned best = 0;
        for (unsigned k = 1; k < QUEUE_TAGS && k <= BOUNCE_CLASS_COUNT; k++)
            if (!taken[k] && dc->by_tag[k] != 0 && (best == 0 || dc->by_tag[k] > dc->by_tag[best]))
                best = k;
        if (best == 0)
            return; /* tag 0: stored before classes were, not counted */
        taken[best] = true;
        struct stats_object *o = &x->waiting_by_class[x->nwaiting_classes++];
        snprintf(o->name, sizeof(o->name), "%s", bounce_class_str((enum bounce_class)(best - 1)));
        o->live = dc->by_tag[best];
    }
}

static uint64_t
busyness(const struct stats_domain *d)
{
    return d->ready + d->deferred + d->inflight + d->parked;
}

static int
cmp_busy(const void *a, const void *b)
{
    uint64_t x = busyness(a), y = busyness(b);
    if (x != y)
        return x > y ? -1 : 1;
    return strcmp(((const struct stats_domain *)a)->name, ((const struct stats_domain *)b)->name);
}

/* By name, then pool: a domain's row without a pool first. */
static int
cmp_name_pool(const void *a, const void *b)
{
    const struct stats_domain *x = a, *y = b;
    int k = strcmp(x->name, y->name);
    return k != 0 ? k : strcmp(x->pool, y->pool);
}

/* The row of domain name among d[0..n) (sorted by cmp_name_pool): its row
 * without a pool when it has one, else its first pooled row; NULL. */
static struct stats_domain *
domain_row(struct stats_domain *d, size_t n, const char *name)
{
    size_t lo = 0, hi = n;
    while (lo < hi) { /* the first row whose name is not below name */
        size_t mid = lo + (hi - lo) / 2;
        if (strcmp(d[mid].name, name) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && strcmp(d[lo].name, name) == 0 ? &d[lo] : NULL;
}

size_t
ops_domains(void *arg, struct stats_domain *out, size_t cap)
{
    struct engine *e = arg;
    struct wcall *c = wcall_new(e, domains_on_worker);
    if (c == NULL)
        return 0;
    c->res = calloc(e->nworkers, sizeof(struct dlist));
    c->res_free = free_dlists;
    struct dlist all = {0};
    uint64_t deferrals = 0;
    bool answered = c->res != NULL && wcall_run(c, -1) == 0;
    if (answered) {
        for (unsigned i = 0; i < e->nworkers; i++) {
            struct dlist *l = &((struct dlist *)c->res)[i];
            deferrals += l->deferrals;
            for (size_t k = 0; k < l->n; k++) {
                if (all.n == all.cap) {
                    size_t nc = all.cap ? all.cap * 2 : 64;
                    struct stats_domain *v = realloc(all.d, nc * sizeof(*v));
                    if (v == NULL)
                        break;
                    all.d = v;
                    all.cap = nc;
                }
                all.d[all.n++] = l->d[k];
            }
        }
    }
    wcall_unref(c);
    /* Deferred recipients live in the spool only. */
    pthread_mutex_lock(&dcache.lock);
    uint64_t now = clock_unix_ms();
    if (answered && deferrals != dcache.deferrals) {
        dcache.deferrals = deferrals;
        dcache.moved_ms = now;
    }
    uint64_t min_age = dcache.scan_ms * 10 > 1000 ? dcache.scan_ms * 10 : 1000;
    bool settling = dcache.at_ms < dcache.moved_ms + DEFERRED_SETTLE;
    if (now - dcache.at_ms > DEFERRED_TTL || (settling && now - dcache.at_ms >= min_age)) {
        dcache.n = 0;
        struct queue_counts total;
        queue_counts(e->queue, &total, dcache_add, &dcache);
        dcache.at_ms = clock_unix_ms();
        dcache.scan_ms = dcache.at_ms - now;
    }
    /* The spool counts a domain's deferred recipients whatever their pool:
     * they go on its row without a pool, or its first pooled one. Found
     * by name in the workers' rows, sorted (tens of thousands of domains
     * on both sides are a status page's refresh, not a quadratic walk). */
    size_t known = all.n;
    if (known > 1)
        qsort(all.d, known, sizeof(*all.d), cmp_name_pool);
    for (size_t i = 0; i < dcache.n; i++) {
        struct stats_domain *row = domain_row(all.d, known, dcache.v[i].name);
        if (row != NULL) {
            dcount_apply(&dcache.v[i], row);
        } else { /* not known to any worker now: shown with its spool count */
            if (all.n == all.cap) {
                size_t nc = all.cap ? all.cap * 2 : 64;
                struct stats_domain *v = realloc(all.d, nc * sizeof(*v));
                if (v == NULL)
                    continue;
                all.d = v;
                all.cap = nc;
            }
            struct stats_domain *x = &all.d[all.n++];
            memset(x, 0, sizeof(*x));
            snprintf(x->name, sizeof(x->name), "%s", dcache.v[i].name);
            dcount_apply(&dcache.v[i], x);
            const struct domain_policy *pol = config_domain(e->cfg, x->name);
            x->max_connections = pol->max_connections;
            /* suspended (an operator's suspend is a shaping action, kept
             * with no destination in memory) as a worker's row says */
            struct shaping_verdict sv;
            x->suspended = shaping_check(e->shaping, e->cfg->shaping_rules, "", NULL, x->name,
                                         clock_unix_ms(), &sv) &&
                           sv.suspended;
            snprintf(x->limit_reason, sizeof(x->limit_reason), "%s",
                     x->suspended ? "suspended by the operator" : "waiting for its retry");
        }
    }
    pthread_mutex_unlock(&dcache.lock);
    if (all.n > 1)
        qsort(all.d, all.n, sizeof(*all.d), cmp_busy);
    size_t n = all.n < cap ? all.n : cap;
    if (n > 0)
        memcpy(out, all.d, n * sizeof(*out));
    free(all.d);
    return n;
}

void
ops_domains_forget(void)
{
    pthread_mutex_lock(&dcache.lock);
    free(dcache.v);
    dcache.v = NULL;
    dcache.n = dcache.cap = 0;
    dcache.at_ms = dcache.scan_ms = dcache.deferrals = dcache.moved_ms = 0;
    pthread_mutex_unlock(&dcache.lock);
}
