/*
 * stats_metrics: the Prometheus text of the stats server's GET /metrics
 * (stats.h), a pure function of the figures handed in: the counters, the
 * busiest tenants, pools, sources and domains, warm-up and shaping, and
 * the event sinks; and text_printf(), the growable text buffer that
 * engine/stats.c writes its HTTP headers with too. The JSON answers are
 * engine/stats_render.c.
 *
 * Threading: any thread; nothing here is shared.
 */
#include "engine/stats.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/json.h"
#include "engine/stats_int.h"

/* struct json doubles as the growable text buffer: json_raw() appends
 * without any JSON punctuation. */
void
text_printf(struct json *t, const char *fmt, ...)
{
    char b[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b, sizeof(b), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof(b)) {
        json_raw(t, b, (size_t)n);
        return;
    }
    char *big = malloc((size_t)n + 1);
    if (big == NULL) {
        t->oom = true;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    json_raw(t, big, (size_t)n);
    free(big);
}

/* A label value per the text format: backslash, double quote and line
 * feed escaped; the value is otherwise any UTF-8. */
static void
text_label(struct json *t, const char *s, size_t cap)
{
    size_t n = strnlen(s, cap);
    for (size_t i = 0; i < n; i++) {
        switch (s[i]) {
        case '\\':
            json_raw(t, "\\\\", 2);
            break;
        case '"':
            json_raw(t, "\\\"", 2);
            break;
        case '\n':
            json_raw(t, "\\n", 2);
            break;
        default:
            json_raw(t, &s[i], 1);
            break;
        }
    }
}

static void
text_family(struct json *t, const char *name, const char *type, const char *help)
{
    text_printf(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void
text_double(struct json *t, double v)
{
    if (isnan(v))
        json_raw(t, "NaN", 3);
    else if (isinf(v))
        json_raw(t, v > 0 ? "+Inf" : "-Inf", 4);
    else
        text_printf(t, "%.17g", v);
}

struct metric {
    const char *name, *type, *help;
    size_t off; /* of a uint64_t in struct stats_counters */
};

#define CTR(f) offsetof(struct stats_counters, f)
static const struct metric metrics[] = {
    {"sluice_messages_received_total", "counter", "Messages accepted at submission.",
     CTR(received_msgs)},
    {"sluice_recipients_received_total", "counter", "Recipients accepted at submission.",
     CTR(received_rcpts)},
    {"sluice_recipients_delivered_total", "counter", "Recipients delivered (2xx).", CTR(delivered)},
    {"sluice_recipients_deferred_total", "counter", "Recipient attempts deferred (to retry).",
     CTR(deferred)},
    {"sluice_recipients_bounced_total", "counter", "Recipients bounced (5xx or policy).",
     CTR(bounced)},
    {"sluice_recipients_expired_total", "counter", "Recipients bounced after their maximum age.",
     CTR(expired)},
    {"sluice_recipients_delivered_tls_total", "counter", "Recipients delivered over TLS.",
     CTR(delivered_tls)},
    {"sluice_dsn_queued_total", "counter", "Delivery status notifications queued.",
     CTR(dsn_queued)},
    {"sluice_rcpt_suppressed_total", "counter",
     "Recipients refused at RCPT: on the suppression list.", CTR(rcpt_suppressed)},
    {"sluice_names_refused_total", "counter",
     "Lookups of a tenant, pool, campaign or source name that got no id (the name table's cap, "
     "memory, a name too long).",
     CTR(names_refused)},
    {"sluice_campaign_names_refused_total", "counter",
     "Lookups of a campaign name that got no id: past [server] campaign_names.",
     CTR(campaign_names_refused)},
    {"sluice_suppress_entries", "gauge", "Entries in the suppression list.",
     CTR(suppress_entries)},
    {"sluice_suppress_added_total", "counter",
     "Suppression entries written (operator, bounces, complaints, imports).",
     CTR(suppress_added)},
    {"sluice_suppress_feed_dropped_total", "counter",
     "Suppression entries that bounces and complaints asked for and that were lost (not made: "
     "an address the list cannot hold, no memory; or a damaged note skipped).",
     CTR(suppress_feed_dropped)},
    {"sluice_suppress_notes_pending", "gauge",
     "Suppression entries of bounces and complaints waiting in the spool to be copied to the "
     "list (it grows while the list cannot be written).",
     CTR(suppress_notes_pending)},
    {"sluice_dkim_signed_total", "counter", "Messages DKIM-signed at reception.",
     CTR(dkim_signed)},
    {"sluice_dkim_unsigned_total", "counter",
     "Messages sent unsigned although DKIM keys are configured (no key, no From:).",
     CTR(dkim_unsigned)},
    {"sluice_dkim_failed_total", "counter",
     "Messages refused with 451 because signing failed or its queue was full.",
     CTR(dkim_failed)},
    {"sluice_oob_messages_total", "counter",
     "Messages accepted at the bounce listener and parsed (never queued).", CTR(oob_messages)},
    {"sluice_oob_events_total", "counter",
     "oob_bounce and complaint events logged from the bounce listener.", CTR(oob_events)},
    {"sluice_oob_dropped_total", "counter",
     "Bounce listener messages that gave no event (auto-replies, no or forged token, ...).",
     CTR(oob_dropped)},
    {"sluice_oob_refused_total", "counter",
     "Recipients refused at the bounce listener (forged tokens, other addresses).",
     CTR(oob_refused)},
    {"sluice_connections_inbound_total", "counter", "Inbound SMTP connections accepted.",
     CTR(conn_in_total)},
    {"sluice_connections_outbound_total", "counter", "Outbound SMTP connections attempted.",
     CTR(conn_out_total)},
    {"sluice_connections_outbound_failed_total", "counter",
     "Outbound SMTP connections that failed before a greeting.", CTR(conn_out_failed)},
    {"sluice_connections_dane_authenticated_total", "counter",
     "Outbound TLS sessions authenticated by the MX host's DNSSEC-validated TLSA records.",
     CTR(dane_authenticated)},
    {"sluice_connections_dane_failed_total", "counter",
     "Outbound connections to DANE hosts given up: no STARTTLS, no TLSA match, TLSA lookup "
     "failed.",
     CTR(dane_failed)},
    {"sluice_connections_inbound_open", "gauge", "Inbound SMTP connections open.",
     CTR(conn_in_open)},
    {"sluice_connections_outbound_open", "gauge", "Outbound SMTP connections open.",
     CTR(conn_out_open)},
    {"sluice_transactions_total", "counter", "Outbound SMTP transactions.", CTR(transactions)},
    {"sluice_transactions_reused_total", "counter",
     "Outbound SMTP transactions on a connection that had one before.", CTR(reused_transactions)},
    {"sluice_transactions_reuse_lost_total", "counter",
     "Transactions on a reused connection that the receiver closed at their first command; "
     "the job went to another connection at once.",
     CTR(reuse_lost)},
    {"sluice_jobs_handed_over_total", "counter",
     "Delivery jobs handed to another worker with their domain (site affinity).", CTR(handed_over)},
    {"sluice_site_turns_total", "counter",
     "Outbound connections a domain with mail left gave to another domain of its site waiting "
     "for one (fair turns among the domains behind the same MX hosts).",
     CTR(site_turns)},
    {"sluice_host_refusals_total", "counter",
     "Outbound transactions an MX host refused before MAIL for a lack of its own (no 8BITMIME, "
     "a SIZE smaller than the message, no SMTPUTF8).",
     CTR(host_refused)},
    {"sluice_host_detours_total", "counter",
     "Of those, messages sent on to the domain's next MX host rather than bounced or deferred.",
     CTR(host_detoured)},
    {"sluice_queue_messages", "gauge", "Messages in the spool.", CTR(queue_msgs)},
    {"sluice_queue_recipients", "gauge", "Recipients in the spool.", CTR(queue_rcpts)},
    {"sluice_queue_recipients_deferred", "gauge", "Recipients in the spool waiting for a retry.",
     CTR(queue_deferred)},
    {"sluice_queue_due_paused", "gauge",
     "1 while deferred recipients that came due wait in the spool: [delivery] active_limit "
     "recipients are ready (suspended ones not counted).",
     CTR(due_paused)},
    {"sluice_delivery_enabled", "gauge",
     "0 when [delivery] enabled = no: mail is queued and not sent (a restart changes it).",
     CTR(delivery_on)},
    {"sluice_spool_bytes", "gauge", "Bytes of messages in the spool.", CTR(spool_bytes)},
    {"sluice_spool_map_size_bytes", "gauge", "Size of the spool's LMDB map.", CTR(map_size)},
    {"sluice_spool_map_used_bytes", "gauge", "Bytes of the spool's LMDB map in use.",
     CTR(map_used)},
    {"sluice_spool_corrupt_records_total", "counter",
     "Spool records skipped because they fail their checks (each logged with its key).",
     CTR(spool_corrupt)},
    {"sluice_spool_unconfirmed_removed_total", "counter",
     "Messages answered 451 because the sync that was to confirm them failed, then removed "
     "from the spool (their commit had landed).",
     CTR(spool_unconfirmed_removed)},
    {"sluice_spool_sync_failing_refused_total", "counter",
     "Messages refused with 451 while the spool could make nothing durable "
     "(queue=sync_failing).",
     CTR(spool_sync_failing_refused)},
    {"sluice_dns_lookups_total", "counter", "DNS lookups asked.", CTR(dns_lookups)},
    {"sluice_dns_cache_hits_total", "counter", "DNS lookups answered from the cache.",
     CTR(dns_cache_hits)},
    {"sluice_dns_cache_entries", "gauge", "Entries in the DNS cache.", CTR(dns_cache_entries)},
    {"sluice_dns_tlsa_queries_total", "counter",
     "TLSA queries for MX hosts of validated MX answers ([dns] dnssec = trust_ad).",
     CTR(dns_tlsa_queries)},
    {"sluice_dns_tlsa_secure_total", "counter", "MX hosts found with validated TLSA records.",
     CTR(dns_tlsa_secure)},
    {"sluice_dns_tlsa_failed_total", "counter",
     "TLSA lookups that failed (SERVFAIL, bogus, timeout): the host is not used.",
     CTR(dns_tlsa_failed)},
    {"sluice_config_generations_alive", "gauge",
     "Configs allocated: the one in force, those kept to the end, and those replaced by a "
     "reload that a thread may still read.",
     CTR(config_generations)},
    {"sluice_dns_edns_off_total", "counter",
     "Times c-ares turned EDNS off on a worker's resolver (a FORMERR answer without OPT).",
     CTR(dns_edns_off)},
    {"sluice_dns_lookups_inflight", "gauge", "MX lookups running on the workers' resolvers.",
     CTR(dns_inflight)},
    {"sluice_dns_lookups_queued", "gauge",
     "MX lookups waiting for a slot ([dns] max_inflight per worker).", CTR(dns_queued)},
    {"sluice_dns_timeouts_total", "counter", "DNS query tries that timed out.",
     CTR(dns_timeouts)},
    {"sluice_dns_failures_total", "counter",
     "DNS lookups that failed for now or gave nowhere to deliver (SERVFAIL, timeout, no MX "
     "host with an address).",
     CTR(dns_failures)},
    {"sluice_dlog_events_total", "counter", "Delivery log events written.", CTR(dlog_events)},
    {"sluice_dlog_write_errors_total", "counter", "Delivery log writes that failed.",
     CTR(dlog_write_errors)},
    {"sluice_dlog_dropped_total", "counter", "Delivery log events dropped.", CTR(dlog_dropped)},
    {"sluice_auth_ok_total", "counter", "AUTH attempts that succeeded.", CTR(auth_ok)},
    {"sluice_auth_failed_total", "counter", "AUTH attempts that failed.", CTR(auth_failed)},
    {"sluice_auth_refused_address_total", "counter",
     "AUTH refused: the client address failed too often.", CTR(auth_refused_address)},
    {"sluice_auth_refused_user_total", "counter", "AUTH refused: the user name failed too often.",
     CTR(auth_refused_user)},
    {"sluice_auth_busy_total", "counter", "AUTH answered 454: no room for another hash.",
     CTR(auth_busy)},
    {"sluice_auth_coalesced_total", "counter",
     "AUTH answered by the hash of the same credentials under way for another session.",
     CTR(auth_coalesced)},
    {"sluice_auth_hash_waiting", "gauge", "Password hashes waiting for a hashing thread.",
     CTR(auth_hash_waiting)},
    {"sluice_destinations", "gauge", "Destination domains known to the scheduler.",
     CTR(destinations)},
    {"sluice_jobs_inflight", "gauge", "Delivery jobs in flight.", CTR(jobs_inflight)},
    {"sluice_worker_turns_total", "counter", "Turns of the workers' loops.", CTR(turns)},
    {"sluice_worker_slow_turns_total", "counter",
     "Turns of a worker's loop busy 100 ms or more (nothing else of that worker ran meanwhile).",
     CTR(slow_turns)},
};

/* Per-domain gauges and counters that take one value each. */
struct domain_metric {
    const char *name, *type, *help;
    int field;
};
enum { DM_CONNECTIONS, DM_MAX_CONNECTIONS, DM_RATE, DM_DELIVERED, DM_BOUNCED, DM_SUSPENDED, DM_HELD };

static const struct domain_metric domain_metrics[] = {
    {"sluice_domain_connections", "gauge", "Outbound connections open to the domain.",
     DM_CONNECTIONS},
    {"sluice_domain_max_connections", "gauge", "Connection limit in force for the domain.",
     DM_MAX_CONNECTIONS},
    {"sluice_domain_message_rate_limit", "gauge",
     "Messages per second allowed to the domain, 0 when unlimited.", DM_RATE},
    {"sluice_domain_recipients_delivered_total", "counter", "Recipients delivered to the domain.",
     DM_DELIVERED},
    {"sluice_domain_recipients_bounced_total", "counter", "Recipients bounced by the domain.",
     DM_BOUNCED},
    {"sluice_domain_suspended", "gauge", "1 when deliveries to the domain are suspended.",
     DM_SUSPENDED},
    {"sluice_domain_held", "gauge",
     "1 while the domain is held (no new connection) after a 421 or failed MX addresses.",
     DM_HELD},
};

static double
domain_value(const struct stats_domain *d, int field)
{
    switch (field) {
    case DM_CONNECTIONS:
        return (double)d->connections;
    case DM_MAX_CONNECTIONS:
        return (double)d->max_connections;
    case DM_RATE:
        return d->rate_limit > 0 ? d->rate_limit : 0;
    case DM_DELIVERED:
        return (double)d->delivered;
    case DM_BOUNCED:
        return (double)d->bounced;
    case DM_SUSPENDED:
        return d->suspended ? 1 : 0;
    case DM_HELD:
        return d->held ? 1 : 0;
    }
    return NAN;
}

/* {domain="D" or {domain="D",pool="P": the caller closes the braces. */
static void
text_domain_label(struct json *t, const struct stats_domain *d)
{
    json_raw(t, "{domain=\"", 9);
    text_label(t, d->name, sizeof(d->name));
    json_raw(t, "\"", 1);
    if (d->pool[0] != '\0') {
        json_raw(t, ",pool=\"", 7);
        text_label(t, d->pool, sizeof(d->pool));
        json_raw(t, "\"", 1);
    }
}

/* y's figures added to x's, the row of the same domain and pool. */
static void
domain_add(struct stats_domain *x, const struct stats_domain *y)
{
    x->ready += y->ready;
    x->deferred += y->deferred;
    x->inflight += y->inflight;
    x->connections += y->connections;
    x->delivered += y->delivered;
    x->bounced += y->bounced;
    if (y->max_connections > x->max_connections)
        x->max_connections = y->max_connections;
    if (y->rate_limit > x->rate_limit)
        x->rate_limit = y->rate_limit;
    x->suspended = x->suspended || y->suspended;
    x->held = x->held || y->held;
    x->resolving = x->resolving || y->resolving;
    if (y->oldest_ms != 0 && (x->oldest_ms == 0 || y->oldest_ms < x->oldest_ms))
        x->oldest_ms = y->oldest_ms;
    for (unsigned k = 0; k < y->nclasses && k < STATS_DOMAIN_CLASSES; k++) {
        const struct stats_object *o = &y->deferred_by_class[k];
        unsigned i = 0;
        while (i < x->nclasses && i < STATS_DOMAIN_CLASSES &&
               strncmp(x->deferred_by_class[i].name, o->name, sizeof(o->name)) != 0)
            i++;
        if (i < x->nclasses)
            x->deferred_by_class[i].live += o->live;
        else if (x->nclasses < STATS_DOMAIN_CLASSES)
            x->deferred_by_class[x->nclasses++] = *o;
    }
}

/* d[0..n) into out, one row per series: a domain has a destination per
 * pool (its series carry a pool label) and one more for tls_relaxed mail
 * (outbound/scheduler.c), whose figures join its sibling's. Two samples
 * of one series are an error of the exposition, and Prometheus keeps
 * only the first. The first row of each, the busiest, gives its limit
 * reason. Returns the number of rows in out. */
static size_t
domains_merge(const struct stats_domain *d, size_t n, struct stats_domain *out)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k = 0;
        while (k < m && (strncmp(out[k].name, d[i].name, sizeof(d[i].name)) != 0 ||
                         strncmp(out[k].pool, d[i].pool, sizeof(d[i].pool)) != 0))
            k++;
        if (k < m)
            domain_add(&out[k], &d[i]);
        else
            out[m++] = d[i];
    }
    return m;
}

/* sluice_tenant_*{tenant="NAME"}: the busiest tenants. */
static void
render_tenant_metrics(struct json *t, const struct stats_counters *c)
{
    static const struct {
        const char *name, *help;
        size_t off;
    } fam[] = {
        {"sluice_tenant_messages_received_total",
         "Messages accepted at submission for the tenant (the busiest tenants only).",
         offsetof(struct stats_tenant, received_msgs)},
        {"sluice_tenant_recipients_received_total",
         "Recipients of the messages accepted for the tenant.",
         offsetof(struct stats_tenant, received_rcpts)},
        {"sluice_tenant_recipients_delivered_total", "Recipients of the tenant delivered.",
         offsetof(struct stats_tenant, delivered)},
        {"sluice_tenant_recipients_deferred_total",
         "Recipient attempts of the tenant deferred (a temporary failure).",
         offsetof(struct stats_tenant, deferred)},
        {"sluice_tenant_recipients_bounced_total",
         "Recipients of the tenant bounced (a permanent failure).",
         offsetof(struct stats_tenant, bounced)},
        {"sluice_tenant_recipients_expired_total",
         "Recipients of the tenant that expired (max_age) before delivery.",
         offsetof(struct stats_tenant, expired)},
    };
    unsigned n = c->ntenants < STATS_TENANTS_MAX ? c->ntenants : STATS_TENANTS_MAX;
    if (n == 0)
        return;
    for (size_t f = 0; f < sizeof(fam) / sizeof(fam[0]); f++) {
        text_family(t, fam[f].name, "counter", fam[f].help);
        for (unsigned i = 0; i < n; i++) {
            const struct stats_tenant *e = &c->tenants[i];
            uint64_t v;
            memcpy(&v, (const char *)e + fam[f].off, sizeof(v));
            text_printf(t, "%s{tenant=\"", fam[f].name);
            text_label(t, e->name, sizeof(e->name));
            text_printf(t, "\"} %llu\n", (unsigned long long)v);
        }
    }
}

/* sluice_warmup_*{source="ADDRESS",group="GROUP"}: warm-up progress. */
static void
render_warmup_metrics(struct json *t, const struct stats_counters *c)
{
    unsigned n = c->nwarmup < STATS_WARMUP_MAX ? c->nwarmup : STATS_WARMUP_MAX;
    if (n == 0)
        return;
    static const struct {
        const char *name, *help;
    } fam[] = {
        {"sluice_warmup_allowance",
         "Messages the source may send to the destination group today under its warm-up plan "
         "(+Inf past the schedule)."},
        {"sluice_warmup_taken", "Messages the source sent to the destination group today "
                                "(with Redis: every node's)."},
        {"sluice_warmup_day", "Day of the source's warm-up plan (1 on its start date)."},
    };
    for (size_t f = 0; f < sizeof(fam) / sizeof(fam[0]); f++) {
        text_family(t, fam[f].name, "gauge", fam[f].help);
        for (unsigned i = 0; i < n; i++) {
            const struct stats_warmup *r = &c->warmup[i];
            text_printf(t, "%s{source=\"", fam[f].name);
            text_label(t, r->source, sizeof(r->source));
            json_raw(t, "\",group=\"", 9);
            text_label(t, r->group, sizeof(r->group));
            json_raw(t, "\"} ", 3);
            if (f == 0 && r->allowance == UINT64_MAX)
                text_printf(t, "+Inf\n");
            else
                text_printf(t, "%llu\n",
                            f == 0   ? (unsigned long long)r->allowance
                            : f == 1 ? (unsigned long long)r->taken
                                     : (unsigned long long)(r->day > 0 ? r->day : 0));
        }
    }
}

/* sluice_{pool,source}_recipients_{delivered,deferred,bounced}_total
 * and sluice_source_connections_total: the busiest only (top_n). */
static void render_shaping_metrics(struct json *t, const struct stats_counters *c);

static void
render_owner_metrics(struct json *t, const struct stats_counters *c)
{
    static const char *const what[3] = {"delivered", "deferred", "bounced"};
    for (int f = 0; f < 3; f++) {
        char name[96];
        for (int k = 0; k < 2; k++) {
            const struct stats_owner *o = k == 0 ? c->pools : c->sources;
            unsigned n = k == 0 ? c->npools : c->nsources;
            if (n == 0)
                continue;
            const char *kind = k == 0 ? "pool" : "source";
            snprintf(name, sizeof(name), "sluice_%s_recipients_%s_total", kind, what[f]);
            text_family(t, name, "counter",
                        k == 0 ? "Recipients of the pool's mail, by outcome."
                               : "Recipients sent from the source, by outcome.");
            for (unsigned i = 0; i < n && i < STATS_OWNERS_MAX; i++) {
                text_printf(t, "%s{%s=\"", name, kind);
                text_label(t, o[i].name, sizeof(o[i].name));
                uint64_t v = f == 0 ? o[i].delivered : f == 1 ? o[i].deferred : o[i].bounced;
                text_printf(t, "\"} %llu\n", (unsigned long long)v);
            }
        }
    }
    if (c->nsources > 0) {
        text_family(t, "sluice_source_connections_total", "counter",
                    "Outbound connections opened from the source.");
        for (unsigned i = 0; i < c->nsources && i < STATS_OWNERS_MAX; i++) {
            text_printf(t, "sluice_source_connections_total{source=\"");
            text_label(t, c->sources[i].name, sizeof(c->sources[i].name));
            text_printf(t, "\"} %llu\n", (unsigned long long)c->sources[i].connections);
        }
    }
    text_family(t, "sluice_source_holds_total", "counter",
                "Times a pool's source was held at a site after a receiver pushed back, or "
                "because a connection from it could not be opened.");
    text_printf(t, "sluice_source_holds_total %llu\n", (unsigned long long)c->source_holds);
    render_shaping_metrics(t, c);
}

/* sluice_shaping_*: active actions by kind, actions started, ended and
 * ignored, rule hits (per rule: those that fired, the most first). */
static void
render_shaping_metrics(struct json *t, const struct stats_counters *c)
{
    static const char *const kinds[6] = {"suspend", "backoff", "cap", "count", "rate", "bounce"};
    if (!c->shaping_on)
        return;
    text_family(t, "sluice_shaping_active", "gauge",
                "Shaping actions in force now (every node's, as this node applies them).");
    for (unsigned k = 0; k < 6; k++)
        text_printf(t, "sluice_shaping_active{kind=\"%s\"} %llu\n", kinds[k],
                    (unsigned long long)c->shaping_active[k]);
    text_family(t, "sluice_shaping_actions_started_total", "counter",
                "Shaping actions that started on this node (its rules, other nodes', operators').");
    text_printf(t, "sluice_shaping_actions_started_total %llu\n",
                (unsigned long long)c->shaping_started);
    text_family(t, "sluice_shaping_actions_ended_total", "counter",
                "Shaping actions that ended (expired or cleared).");
    text_printf(t, "sluice_shaping_actions_ended_total %llu\n",
                (unsigned long long)c->shaping_ended);
    text_family(t, "sluice_shaping_rule_hits_total", "counter",
                "Receivers' replies that matched a shaping rule on this node.");
    text_printf(t, "sluice_shaping_rule_hits_total %llu\n", (unsigned long long)c->shaping_hits);
    if (c->nshaping_rule_hits > 0) {
        text_family(t, "sluice_shaping_rule_matches_total", "counter",
                    "Replies that matched each shaping rule on this node (the rules that fired).");
        for (unsigned i = 0; i < c->nshaping_rule_hits && i < STATS_OWNERS_MAX; i++) {
            text_printf(t, "sluice_shaping_rule_matches_total{rule=\"");
            text_label(t, c->shaping_rule_hits[i].name, sizeof(c->shaping_rule_hits[i].name));
            text_printf(t, "\"} %llu\n", (unsigned long long)c->shaping_rule_hits[i].hits);
        }
    }
    text_family(t, "sluice_shaping_connections_quit_total", "counter",
                "Outbound connections that said goodbye because a shaping action said so.");
    text_printf(t, "sluice_shaping_connections_quit_total %llu\n",
                (unsigned long long)c->shaping_quits);
    text_family(t, "sluice_shaping_actions_ignored_total", "counter",
                "Shaping actions read of a kind or scope this node does not know (a newer "
                "node's): ignored.");
    text_printf(t, "sluice_shaping_actions_ignored_total %llu\n",
                (unsigned long long)c->shaping_ignored);
    text_family(t, "sluice_shaping_outbox", "gauge",
                "Action changes of this node waiting to be published to Redis (one per "
                "action id).");
    text_printf(t, "sluice_shaping_outbox %llu\n", (unsigned long long)c->shaping_outbox);
    text_family(t, "sluice_shaping_outbox_dropped_total", "counter",
                "Action changes dropped unpublished: more action ids waited than the outbox "
                "holds while Redis was away.");
    text_printf(t, "sluice_shaping_outbox_dropped_total %llu\n",
                (unsigned long long)c->shaping_outbox_dropped);
}

/* sluice_events_*{sink="NAME"}: one series per [events NAME] sink. */
static void
render_event_sink_metrics(struct json *t, const struct stats_counters *c)
{
    static const struct {
        const char *name, *type, *help;
    } fam[] = {
        {"sluice_events_pending", "gauge", "Events committed, not yet acknowledged by the sink."},
        {"sluice_events_oldest_pending_seconds", "gauge",
         "Age of the oldest event the sink has not acknowledged."},
        {"sluice_events_sent_total", "counter", "Events the sink's endpoint acknowledged."},
        {"sluice_events_failed_attempts_total", "counter", "Failed attempts to send a batch."},
        {"sluice_events_dropped_total", "counter", "Events given up past the sink's max_backlog."},
        {"sluice_events_rejected_total", "counter",
         "Events the sink's endpoint refused alone (a webhook's 4xx, a Redis -ERR), "
         "dropped."},
        {"sluice_events_paused", "gauge", "1 while the sink is paused."},
    };
    unsigned n = c->nevent_sinks < STATS_EVENT_SINKS_MAX ? c->nevent_sinks : STATS_EVENT_SINKS_MAX;
    if (n == 0)
        return;
    for (size_t f = 0; f < sizeof(fam) / sizeof(fam[0]); f++) {
        text_family(t, fam[f].name, fam[f].type, fam[f].help);
        for (unsigned i = 0; i < n; i++) {
            const struct stats_event_sink *e = &c->event_sinks[i];
            text_printf(t, "%s{sink=\"", fam[f].name);
            text_label(t, e->name, sizeof(e->name));
            json_raw(t, "\"} ", 3);
            switch (f) {
            case 0:
                text_printf(t, "%llu\n", (unsigned long long)e->pending);
                break;
            case 1:
                text_printf(t, "%.3f\n", (double)e->oldest_age_ms / 1000.0);
                break;
            case 2:
                text_printf(t, "%llu\n", (unsigned long long)e->sent);
                break;
            case 3:
                text_printf(t, "%llu\n", (unsigned long long)e->failed);
                break;
            case 4:
                text_printf(t, "%llu\n", (unsigned long long)e->dropped);
                break;
            case 5:
                text_printf(t, "%llu\n", (unsigned long long)e->rejected);
                break;
            default:
                text_printf(t, "%d\n", e->paused ? 1 : 0);
                break;
            }
        }
    }
}

char *
stats_render_metrics(const struct stats_counters *c, const struct stats_domain *d, size_t n,
                     uint64_t now_ms)
{
    struct json t;
    json_init(&t);
    json_raw(&t, "", 0);

    text_family(&t, "sluice_build_info", "gauge", "Version of sluice, as a label.");
    text_printf(&t, "sluice_build_info{version=\"%s\"} 1\n", SLUICE_VERSION);
    text_family(&t, "sluice_uptime_seconds", "gauge", "Seconds since sluice started.");
    text_printf(&t, "sluice_uptime_seconds %.3f\n", (double)c->uptime_ms / 1000.0);
    text_family(&t, "sluice_workers", "gauge", "Worker threads.");
    text_printf(&t, "sluice_workers %u\n", c->workers);
    text_family(&t, "sluice_worker_longest_turn_seconds", "gauge",
                "The busiest turn of any worker's loop since start (nothing else of that "
                "worker ran meanwhile).");
    text_printf(&t, "sluice_worker_longest_turn_seconds %.6f\n",
                (double)c->longest_turn_us / 1000000.0);

    for (size_t i = 0; i < sizeof(metrics) / sizeof(metrics[0]); i++) {
        const struct metric *m = &metrics[i];
        uint64_t v;
        memcpy(&v, (const char *)c + m->off, sizeof(v));
        text_family(&t, m->name, m->type, m->help);
        text_printf(&t, "%s %llu\n", m->name, (unsigned long long)v);
    }

    text_family(&t, "sluice_redis_state", "gauge",
                "1 for the state of the connection to the shared Redis.");
    json_raw(&t, "sluice_redis_state{state=\"", 26);
    const char *rs = c->redis_state != NULL ? c->redis_state : "off";
    text_label(&t, rs, strlen(rs));
    json_raw(&t, "\"} 1\n", 5);

    render_event_sink_metrics(&t, c);
    render_tenant_metrics(&t, c);
    render_warmup_metrics(&t, c);
    render_owner_metrics(&t, c);

    /* Every class, zeros too: a series that exists from the start gives
     * rate() its first point. */
    static const struct {
        const char *name, *help;
        size_t off;
    } by_class[] = {
        {"sluice_recipients_deferred_by_class_total",
         "Recipient attempts deferred, by the class of the failure.",
         offsetof(struct stats_counters, deferred_by_class)},
        {"sluice_recipients_bounced_by_class_total",
         "Recipients bounced or expired, by the class of the failure.",
         offsetof(struct stats_counters, bounced_by_class)},
    };
    for (size_t f = 0; c->nclasses > 0 && f < sizeof(by_class) / sizeof(by_class[0]); f++) {
        const struct stats_object *o =
            (const struct stats_object *)(const void *)((const char *)c + by_class[f].off);
        text_family(&t, by_class[f].name, "counter", by_class[f].help);
        for (unsigned i = 0; i < c->nclasses && i < STATS_CLASSES_MAX; i++) {
            if (o[i].name[0] == '\0')
                continue;
            text_printf(&t, "%s{class=\"", by_class[f].name);
            text_label(&t, o[i].name, sizeof(o[i].name));
            text_printf(&t, "\"} %llu\n", (unsigned long long)o[i].live);
        }
    }

    bool any = false;
    for (unsigned i = 0; i < c->nobjects && i < STATS_OBJECTS_MAX; i++) {
        const struct stats_object *o = &c->objects[i];
        if (o->name[0] == '\0')
            continue;
        if (!any)
            text_family(&t, "sluice_objects", "gauge", "Live objects by type.");
        any = true;
        json_raw(&t, "sluice_objects{type=\"", 21);
        text_label(&t, o->name, sizeof(o->name));
        text_printf(&t, "\"} %llu\n", (unsigned long long)o->live);
    }

    any = false;
    for (unsigned i = 0; i < c->nauth_hashes && i < STATS_AUTH_SCHEMES_MAX; i++) {
        const struct stats_object *o = &c->auth_hashes[i];
        if (o->name[0] == '\0')
            continue;
        if (!any)
            text_family(&t, "sluice_auth_hashes_total", "counter",
                        "Password hashes run for AUTH, by scheme.");
        any = true;
        json_raw(&t, "sluice_auth_hashes_total{scheme=\"", 33);
        text_label(&t, o->name, sizeof(o->name));
        text_printf(&t, "\"} %llu\n", (unsigned long long)o->live);
    }

    struct stats_domain *merged = NULL; /* owned */
    if (n > 0) {
        if ((merged = malloc(n * sizeof(*merged))) == NULL) {
            json_fini(&t);
            return NULL;
        }
        n = domains_merge(d, n, merged);
        d = merged;
    }
    if (n > 0) {
        text_family(&t, "sluice_domain_queue_recipients", "gauge",
                    "Recipients queued for the domain, by state (the busiest domains only).");
        static const char *const states[] = {"ready", "deferred", "inflight"};
        for (size_t i = 0; i < n; i++) {
            const uint64_t v[] = {d[i].ready, d[i].deferred, d[i].inflight};
            for (size_t k = 0; k < 3; k++) {
                json_raw(&t, "sluice_domain_queue_recipients", 30);
                text_domain_label(&t, &d[i]);
                text_printf(&t, ",state=\"%s\"} %llu\n", states[k], (unsigned long long)v[k]);
            }
        }
        for (size_t k = 0; k < sizeof(domain_metrics) / sizeof(domain_metrics[0]); k++) {
            const struct domain_metric *m = &domain_metrics[k];
            text_family(&t, m->name, m->type, m->help);
            for (size_t i = 0; i < n; i++) {
                json_raw(&t, m->name, strlen(m->name));
                text_domain_label(&t, &d[i]);
                json_raw(&t, "} ", 2);
                text_double(&t, domain_value(&d[i], m->field));
                json_raw(&t, "\n", 1);
            }
        }
        /* Only the classes a domain met: at most STATS_DOMAIN_CLASSES
         * series per domain of the top_n. */
        text_family(&t, "sluice_domain_recipients_deferred_by_class_total", "counter",
                    "Recipient attempts deferred by the domain, by the class of the failure "
                    "(since the destination was last forgotten when idle).");
        for (size_t i = 0; i < n; i++)
            for (unsigned k = 0; k < d[i].nclasses && k < STATS_DOMAIN_CLASSES; k++) {
                const struct stats_object *o = &d[i].deferred_by_class[k];
                if (o->name[0] == '\0')
                    continue;
                json_raw(&t, "sluice_domain_recipients_deferred_by_class_total", 48);
                text_domain_label(&t, &d[i]);
                json_raw(&t, ",class=\"", 8);
                text_label(&t, o->name, sizeof(o->name));
                text_printf(&t, "\"} %llu\n", (unsigned long long)o->live);
            }
        text_family(&t, "sluice_domain_oldest_message_age_seconds", "gauge",
                    "Age of the oldest message waiting for the domain.");
        for (size_t i = 0; i < n; i++) {
            if (d[i].oldest_ms == 0)
                continue;
            uint64_t age = now_ms > d[i].oldest_ms ? now_ms - d[i].oldest_ms : 0;
            json_raw(&t, "sluice_domain_oldest_message_age_seconds", 40);
            text_domain_label(&t, &d[i]);
            text_printf(&t, "} %.3f\n", (double)age / 1000.0);
        }
        text_family(&t, "sluice_domain_limit_info", "gauge",
                    "Why the domain's limits in force are what they are, as a label.");
        for (size_t i = 0; i < n; i++) {
            json_raw(&t, "sluice_domain_limit_info", 24);
            text_domain_label(&t, &d[i]);
            json_raw(&t, ",reason=\"", 9);
            text_label(&t, d[i].limit_reason, sizeof(d[i].limit_reason));
            json_raw(&t, "\"} 1\n", 5);
        }
    }

    free(merged);
    if (json_failed(&t)) {
        json_fini(&t);
        return NULL;
    }
    return t.buf; /* json_fini not called: the caller owns the buffer now */
}
