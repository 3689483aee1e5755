/*
 * stats_render: the JSON of the stats server's answers (stats.h), pure
 * functions of the figures handed in: "stats" and "domains" (and the
 * status page's status.json from them), and the busiest tenants' table
 * they are taken from. The Prometheus text of GET /metrics is
 * engine/stats_metrics.c. engine/stats.c runs the socket, the HTTP
 * listener and the rates, and calls these; tests/unit/test_stats.c calls
 * them directly.
 *
 * Threading: any thread; nothing here is shared.
 */
#include "engine/stats.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/json.h"
#include "engine/stats_int.h"

/* ---- rendering: JSON ---- */

static double
share(uint64_t part, uint64_t whole)
{
    /* NaN renders as null: "no deliveries yet" is not "0 % over TLS". */
    return whole == 0 ? NAN : (double)part / (double)whole;
}

static void
kdouble(struct json *j, const char *key, double v)
{
    json_key(j, key);
    json_double(j, v);
}

static void
render_rates(struct json *j, const char *key, const struct stats_rates *r)
{
    json_key(j, key);
    if (r == NULL || !r->known) {
        json_null(j);
        return;
    }
    json_obj_begin(j);
    kdouble(j, "received", r->received);
    kdouble(j, "delivered", r->delivered);
    kdouble(j, "deferred", r->deferred);
    kdouble(j, "bounced", r->bounced);
    kdouble(j, "expired", r->expired);
    json_ku64(j, "window_ms", r->window_ms);
    json_obj_end(j);
}

/* A fixed-size name from the engine may lack its NUL. */
static void
kfixed(struct json *j, const char *key, const char *s, size_t cap)
{
    json_key(j, key);
    json_strn(j, s, strnlen(s, cap));
}

/* As kfixed, or null when s is empty. */
static void
kfixed_or_null(struct json *j, const char *key, const char *s, size_t cap)
{
    if (s[0] != '\0') {
        kfixed(j, key, s, cap);
    } else {
        json_key(j, key);
        json_null(j);
    }
}

/* "event_sinks": one object per [events NAME] sink. */
static void
render_event_sinks(struct json *j, const struct stats_counters *c)
{
    json_key(j, "event_sinks");
    json_arr_begin(j);
    for (unsigned i = 0; i < c->nevent_sinks && i < STATS_EVENT_SINKS_MAX; i++) {
        const struct stats_event_sink *e = &c->event_sinks[i];
        json_obj_begin(j);
        kfixed(j, "name", e->name, sizeof(e->name));
        kfixed(j, "kind", e->kind, sizeof(e->kind));
        json_ku64(j, "pending", e->pending);
        json_ku64(j, "oldest_pending_age_ms", e->oldest_age_ms);
        json_ku64(j, "sent", e->sent);
        json_ku64(j, "failed_attempts", e->failed);
        json_ku64(j, "dropped", e->dropped);
        json_ku64(j, "rejected", e->rejected);
        json_kbool(j, "paused", e->paused);
        kfixed(j, "last_error", e->last_error, sizeof(e->last_error));
        json_obj_end(j);
    }
    json_arr_end(j);
}

/* An allowance or what is left of it: a number, null for no limit. */
static void
kcount(struct json *j, const char *k, uint64_t v)
{
    if (v == UINT64_MAX) {
        json_key(j, k);
        json_null(j);
    } else {
        json_ku64(j, k, v);
    }
}

/* "shaping": active actions by kind, counters, the rules that fired. */
static void
render_shaping(struct json *j, const struct stats_counters *c)
{
    static const char *const kinds[6] = {"suspend", "backoff", "cap", "count", "rate", "bounce"};
    json_key(j, "shaping");
    json_obj_begin(j);
    json_kbool(j, "enabled", c->shaping_on);
    json_kstr(j, "redis", c->shaping_redis != NULL ? c->shaping_redis : "off");
    json_ku64(j, "rules", c->shaping_rules);
    json_key(j, "active");
    json_obj_begin(j);
    for (unsigned k = 0; k < 6; k++)
        json_ku64(j, kinds[k], c->shaping_active[k]);
    json_obj_end(j);
    json_ku64(j, "started", c->shaping_started);
    json_ku64(j, "ended", c->shaping_ended);
    json_ku64(j, "rule_hits", c->shaping_hits);
    json_ku64(j, "published", c->shaping_published);
    json_ku64(j, "received", c->shaping_received);
    json_ku64(j, "connections_quit", c->shaping_quits);
    json_ku64(j, "ignored", c->shaping_ignored);
    json_ku64(j, "outbox", c->shaping_outbox);
    json_ku64(j, "outbox_dropped", c->shaping_outbox_dropped);
    json_key(j, "by_rule");
    json_obj_begin(j);
    for (unsigned i = 0; i < c->nshaping_rule_hits && i < STATS_OWNERS_MAX; i++)
        json_ku64(j, c->shaping_rule_hits[i].name, c->shaping_rule_hits[i].hits);
    json_obj_end(j);
    json_obj_end(j);
}

/* "warmup": the keeper's state and one row per (source, group). */
static void
render_warmup(struct json *j, const struct stats_counters *c)
{
    json_key(j, "warmup");
    json_obj_begin(j);
    json_ku64(j, "sources", c->warmup_sources);
    json_kstr(j, "redis", c->warmup_redis != NULL ? c->warmup_redis : "off");
    json_ku64(j, "refused", c->warmup_refused);
    json_ku64(j, "saves", c->warmup_saves);
    json_ku64(j, "save_failures", c->warmup_save_failures);
    json_ku64(j, "syncs", c->warmup_syncs);
    json_ku64(j, "sync_failures", c->warmup_sync_failures);
    json_key(j, "rows");
    json_arr_begin(j);
    for (unsigned i = 0; i < c->nwarmup && i < STATS_WARMUP_MAX; i++) {
        const struct stats_warmup *r = &c->warmup[i];
        json_obj_begin(j);
        json_kstr(j, "source", r->source);
        json_kstr(j, "plan", r->plan);
        json_kstr(j, "group", r->group);
        json_key(j, "day");
        json_i64(j, r->day);
        kcount(j, "allowance", r->allowance);
        json_ku64(j, "taken", r->taken);
        kcount(j, "left", r->left);
        json_obj_end(j);
    }
    json_arr_end(j);
    json_obj_end(j);
}

struct stats_tenant *
stats_tenant_get(struct stats_tenant_table *t, const char *name)
{
    for (unsigned i = 0; i < t->n; i++)
        if (strcmp(t->v[i].name, name) == 0)
            return &t->v[i];
    if (t->n >= STATS_TENANT_TABLE_MAX)
        return NULL;
    if (t->n == t->cap) {
        unsigned cap = t->cap ? t->cap * 2 : 8;
        struct stats_tenant *v = realloc(t->v, cap * sizeof(*v));
        if (v == NULL)
            return NULL;
        t->v = v;
        t->cap = cap;
    }
    struct stats_tenant *e = &t->v[t->n++];
    memset(e, 0, sizeof(*e));
    snprintf(e->name, sizeof(e->name), "%s", name);
    return e;
}

unsigned
stats_tenant_copy(const struct stats_tenant_table *t, struct stats_tenant *out, unsigned cap)
{
    unsigned n = t->n < cap ? t->n : cap;
    if (n > 0)
        memcpy(out, t->v, n * sizeof(*out));
    return n;
}

void
stats_tenant_fini(struct stats_tenant_table *t)
{
    free(t->v);
    memset(t, 0, sizeof(*t));
}

/* "tenants": {"NAME": {...}} for the busiest tenants. */
static void
render_tenants(struct json *j, const struct stats_counters *c)
{
    json_key(j, "tenants");
    json_obj_begin(j);
    for (unsigned i = 0; i < c->ntenants && i < STATS_TENANTS_MAX; i++) {
        const struct stats_tenant *t = &c->tenants[i];
        json_key(j, t->name);
        json_obj_begin(j);
        json_ku64(j, "received_msgs", t->received_msgs);
        json_ku64(j, "received_rcpts", t->received_rcpts);
        json_ku64(j, "delivered", t->delivered);
        json_ku64(j, "deferred", t->deferred);
        json_ku64(j, "bounced", t->bounced);
        json_ku64(j, "expired", t->expired);
        json_obj_end(j);
    }
    json_obj_end(j);
}

/* "pools" / "sources": {"NAME": {...}} for the busiest. */
static void
render_owners(struct json *j, const char *key, const struct stats_owner *o, unsigned n,
              bool conns)
{
    json_key(j, key);
    json_obj_begin(j);
    for (unsigned i = 0; i < n && i < STATS_OWNERS_MAX; i++) {
        json_key(j, o[i].name);
        json_obj_begin(j);
        json_ku64(j, "delivered", o[i].delivered);
        json_ku64(j, "deferred", o[i].deferred);
        json_ku64(j, "bounced", o[i].bounced);
        if (conns)
            json_ku64(j, "connections", o[i].connections);
        json_obj_end(j);
    }
    json_obj_end(j);
}

/* {"name": count, ...} of the named entries of a stats_object array. */
static void
render_named(struct json *j, const char *key, const struct stats_object *o, unsigned n,
             unsigned cap)
{
    json_key(j, key);
    json_obj_begin(j);
    for (unsigned i = 0; i < n && i < cap; i++) {
        size_t len = strnlen(o[i].name, sizeof(o[i].name));
        if (len == 0)
            continue;
        char name[sizeof(o[i].name) + 1];
        memcpy(name, o[i].name, len);
        name[len] = '\0';
        json_ku64(j, name, o[i].live);
    }
    json_obj_end(j);
}

void
stats_render_stats(struct json *j, const struct stats_counters *c, const struct stats_rates *r1s,
                   const struct stats_rates *r1m)
{
    json_obj_begin(j);
    json_kbool(j, "ok", true);
    json_kstr(j, "version", SLUICE_VERSION);
    json_ku64(j, "uptime_ms", c->uptime_ms);
    json_ku64(j, "workers", c->workers);
    json_kbool(j, "delivery_enabled", c->delivery_on != 0);
    json_key(j, "loop");
    json_obj_begin(j);
    json_ku64(j, "turns", c->turns);
    json_ku64(j, "slow_turns", c->slow_turns);
    kdouble(j, "longest_turn_ms", (double)c->longest_turn_us / 1000.0);
    json_obj_end(j);

    json_key(j, "counters");
    json_obj_begin(j);
    json_ku64(j, "received_msgs", c->received_msgs);
    json_ku64(j, "received_rcpts", c->received_rcpts);
    json_ku64(j, "delivered", c->delivered);
    json_ku64(j, "deferred", c->deferred);
    json_ku64(j, "bounced", c->bounced);
    json_ku64(j, "expired", c->expired);
    json_ku64(j, "dsn_queued", c->dsn_queued);
    json_ku64(j, "rcpt_suppressed", c->rcpt_suppressed);
    json_ku64(j, "names_refused", c->names_refused);
    json_ku64(j, "campaign_names_refused", c->campaign_names_refused);
    json_ku64(j, "delivered_tls", c->delivered_tls);
    json_ku64(j, "dkim_signed", c->dkim_signed);
    json_ku64(j, "dkim_unsigned", c->dkim_unsigned);
    json_ku64(j, "dkim_failed", c->dkim_failed);
    json_ku64(j, "oob_messages", c->oob_messages);
    json_ku64(j, "oob_events", c->oob_events);
    json_ku64(j, "oob_dropped", c->oob_dropped);
    json_ku64(j, "oob_refused", c->oob_refused);
    render_named(j, "deferred_by_class", c->deferred_by_class, c->nclasses, STATS_CLASSES_MAX);
    render_named(j, "bounced_by_class", c->bounced_by_class, c->nclasses, STATS_CLASSES_MAX);
    json_obj_end(j);

    json_key(j, "rates");
    json_obj_begin(j);
    render_rates(j, "1s", r1s);
    render_rates(j, "1m", r1m);
    json_obj_end(j);

    json_key(j, "connections");
    json_obj_begin(j);
    json_ku64(j, "inbound_open", c->conn_in_open);
    json_ku64(j, "outbound_open", c->conn_out_open);
    json_ku64(j, "inbound_total", c->conn_in_total);
    json_ku64(j, "outbound_total", c->conn_out_total);
    json_ku64(j, "outbound_failed", c->conn_out_failed);
    json_ku64(j, "dane_authenticated", c->dane_authenticated);
    json_ku64(j, "dane_failed", c->dane_failed);
    json_ku64(j, "transactions", c->transactions);
    json_ku64(j, "reused_transactions", c->reused_transactions);
    kdouble(j, "reuse_share", share(c->reused_transactions, c->transactions));
    json_ku64(j, "reuse_lost", c->reuse_lost);
    json_ku64(j, "handed_over", c->handed_over);
    json_ku64(j, "site_turns", c->site_turns);
    json_ku64(j, "host_refused", c->host_refused);
    json_ku64(j, "host_detoured", c->host_detoured);
    json_obj_end(j);

    kdouble(j, "tls_share", share(c->delivered_tls, c->delivered));

    json_key(j, "queue");
    json_obj_begin(j);
    json_ku64(j, "messages", c->queue_msgs);
    json_ku64(j, "recipients", c->queue_rcpts);
    json_ku64(j, "deferred", c->queue_deferred);
    json_key(j, "due_paused");
    json_bool(j, c->due_paused != 0);
    json_obj_end(j);

    json_key(j, "spool");
    json_obj_begin(j);
    json_ku64(j, "bytes", c->spool_bytes);
    json_ku64(j, "map_size", c->map_size);
    json_ku64(j, "map_used", c->map_used);
    kdouble(j, "map_used_share", share(c->map_used, c->map_size));
    json_ku64(j, "corrupt_records", c->spool_corrupt);
    json_ku64(j, "unconfirmed_removed", c->spool_unconfirmed_removed);
    json_ku64(j, "sync_failing_refused", c->spool_sync_failing_refused);
    json_obj_end(j);

    json_key(j, "dns");
    json_obj_begin(j);
    json_ku64(j, "lookups", c->dns_lookups);
    json_ku64(j, "cache_hits", c->dns_cache_hits);
    json_ku64(j, "cache_entries", c->dns_cache_entries);
    kdouble(j, "cache_hit_share", share(c->dns_cache_hits, c->dns_lookups));
    json_ku64(j, "tlsa_queries", c->dns_tlsa_queries);
    json_ku64(j, "tlsa_secure", c->dns_tlsa_secure);
    json_ku64(j, "tlsa_failed", c->dns_tlsa_failed);
    json_ku64(j, "edns_off", c->dns_edns_off);
    json_ku64(j, "inflight", c->dns_inflight);
    json_ku64(j, "queued", c->dns_queued);
    json_ku64(j, "timeouts", c->dns_timeouts);
    json_ku64(j, "failures", c->dns_failures);
    json_obj_end(j);

    json_key(j, "redis");
    json_obj_begin(j);
    json_kstr(j, "state", c->redis_state != NULL ? c->redis_state : "off");
    json_obj_end(j);

    json_key(j, "config");
    json_obj_begin(j);
    json_ku64(j, "generations_alive", c->config_generations);
    json_obj_end(j);

    json_key(j, "suppress");
    json_obj_begin(j);
    json_kbool(j, "enabled", c->suppress_on);
    json_ku64(j, "entries", c->suppress_entries);
    json_ku64(j, "checks", c->suppress_checks);
    json_ku64(j, "hits", c->suppress_hits);
    json_ku64(j, "added", c->suppress_added);
    json_ku64(j, "removed", c->suppress_removed);
    json_ku64(j, "feed_dropped", c->suppress_feed_dropped);
    json_ku64(j, "map_size", c->suppress_map_size);
    json_ku64(j, "map_used", c->suppress_map_used);
    json_ku64(j, "notes_pending", c->suppress_notes_pending);
    json_obj_end(j);

    json_key(j, "dlog");
    json_obj_begin(j);
    json_ku64(j, "events", c->dlog_events);
    json_ku64(j, "write_errors", c->dlog_write_errors);
    json_ku64(j, "dropped", c->dlog_dropped);
    json_obj_end(j);

    render_event_sinks(j, c);
    render_tenants(j, c);
    render_warmup(j, c);
    render_owners(j, "pools", c->pools, c->npools, false);
    render_owners(j, "sources", c->sources, c->nsources, true);
    json_ku64(j, "source_holds", c->source_holds);
    render_shaping(j, c);
    json_ku64(j, "parked", c->parked);
    json_key(j, "auth");
    json_obj_begin(j);
    json_ku64(j, "ok", c->auth_ok);
    json_ku64(j, "failed", c->auth_failed);
    json_ku64(j, "refused_address", c->auth_refused_address);
    json_ku64(j, "refused_user", c->auth_refused_user);
    json_ku64(j, "busy", c->auth_busy);
    json_ku64(j, "coalesced", c->auth_coalesced);
    json_ku64(j, "hash_waiting", c->auth_hash_waiting);
    json_ku64(j, "limit_entries", c->auth_limit_entries);
    json_ku64(j, "limit_evictions", c->auth_limit_evictions);
    json_key(j, "hashes");
    json_obj_begin(j);
    for (unsigned i = 0; i < c->nauth_hashes && i < STATS_AUTH_SCHEMES_MAX; i++) {
        const struct stats_object *o = &c->auth_hashes[i];
        size_t n = strnlen(o->name, sizeof(o->name));
        if (n == 0)
            continue;
        char name[sizeof(o->name) + 1];
        memcpy(name, o->name, n);
        name[n] = '\0';
        json_ku64(j, name, o->live);
    }
    json_obj_end(j);
    json_obj_end(j);

    json_key(j, "objects");
    json_obj_begin(j);
    json_ku64(j, "destinations", c->destinations);
    json_ku64(j, "jobs_inflight", c->jobs_inflight);
    for (unsigned i = 0; i < c->nobjects && i < STATS_OBJECTS_MAX; i++) {
        const struct stats_object *o = &c->objects[i];
        size_t n = strnlen(o->name, sizeof(o->name));
        if (n == 0)
            continue;
        char name[sizeof(o->name) + 1];
        memcpy(name, o->name, n);
        name[n] = '\0';
        json_ku64(j, name, o->live);
    }
    json_obj_end(j);
    json_obj_end(j);
}

void
render_domain_array(struct json *j, const char *key, const struct stats_domain *d, size_t n,
                    uint64_t now_ms)
{
    json_key(j, key);
    json_arr_begin(j);
    for (size_t i = 0; i < n; i++) {
        const struct stats_domain *x = &d[i];
        json_obj_begin(j);
        kfixed(j, "name", x->name, sizeof(x->name));
        json_key(j, "pool");
        if (x->pool[0] != '\0')
            json_str(j, x->pool);
        else
            json_null(j);
        json_ku64(j, "ready", x->ready);
        json_ku64(j, "deferred", x->deferred);
        json_ku64(j, "inflight", x->inflight);
        json_ku64(j, "parked", x->parked);
        json_ku64(j, "connections", x->connections);
        json_ku64(j, "max_connections", x->max_connections);
        /* 0 means "no limit": null says so without a magic number. */
        kdouble(j, "rate_limit", x->rate_limit > 0 ? x->rate_limit : NAN);
        kfixed(j, "limit_reason", x->limit_reason, sizeof(x->limit_reason));
        json_ku64(j, "delivered", x->delivered);
        json_ku64(j, "bounced", x->bounced);
        json_ku64(j, "host_refused", x->host_refused);
        json_ku64(j, "host_detoured", x->host_detoured);
        json_key(j, "oldest");
        if (x->oldest_ms != 0)
            json_time_ms(j, x->oldest_ms);
        else
            json_null(j);
        json_key(j, "oldest_age_ms");
        if (x->oldest_ms != 0)
            json_u64(j, now_ms > x->oldest_ms ? now_ms - x->oldest_ms : 0);
        else
            json_null(j);
        json_kbool(j, "suspended", x->suspended);
        json_kbool(j, "held", x->held);
        json_key(j, "held_until");
        if (x->held && x->held_until_ms != 0)
            json_time_ms(j, x->held_until_ms);
        else
            json_null(j);
        json_kbool(j, "resolving", x->resolving);
        render_named(j, "deferred_by_class", x->deferred_by_class, x->nclasses,
                     STATS_DOMAIN_CLASSES);
        render_named(j, "waiting_by_class", x->waiting_by_class, x->nwaiting_classes,
                     STATS_DOMAIN_CLASSES);
        kfixed(j, "last_reply", x->last_reply, sizeof(x->last_reply));
        /* null: no server sent it, whatever code the failure policy gave */
        json_key(j, "last_code");
        if (x->last_code != 0)
            json_u64(j, x->last_code);
        else
            json_null(j);
        kfixed_or_null(j, "last_class", x->last_class, sizeof(x->last_class));
        kfixed_or_null(j, "last_reason", x->last_reason, sizeof(x->last_reason));
        json_ku64(j, "tenants_waiting", x->tenants_waiting);
        json_key(j, "tenants");
        json_arr_begin(j);
        for (unsigned k = 0; k < x->ntenants && k < STATS_DOMAIN_TENANTS; k++) {
            json_obj_begin(j);
            json_key(j, "tenant");
            if (x->tenants[k].name[0] != '\0')
                json_strn(j, x->tenants[k].name, strnlen(x->tenants[k].name,
                                                         sizeof(x->tenants[k].name)));
            else
                json_null(j);
            json_ku64(j, "ready", x->tenants[k].ready);
            json_obj_end(j);
        }
        json_arr_end(j);
        json_obj_end(j);
    }
    json_arr_end(j);
}

void
stats_render_domains(struct json *j, const struct stats_domain *d, size_t n, uint64_t now_ms)
{
    render_domain_array(j, "domains", d, n, now_ms);
}
