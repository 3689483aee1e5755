/*
 * ops: what the stats socket asks of the running engine (see ops.h):
 * this file runs functions on the workers (wcall) and answers the
 * commands on the engine's state (suspend, resume, events, warmup,
 * shaping, tlsrpt, reload, sites) and dispatches the others: the
 * commands on the spool's mail (message, queue, flush, bounce) are
 * engine/ops_queue.c's, the counters and the domains view
 * engine/ops_views.c's, the suppression list's command
 * engine/ops_suppress.c's (ops_int.h: what they share).
 *
 * The stats thread calls these. What a worker owns (its destinations, its
 * counters) is read or changed on that worker: wcall_run() posts a
 * message to each and waits for every answer, a short while at most. A
 * reload's answer waits for the main thread's outcome, or the drain or
 * the stop (engine_reload_wait); a command begun once the stop has begun
 * is not run.
 *
 * Threading: the stats thread (counters, domains) and its command thread
 * (ops_command, one command at a time), concurrently: what both reach is
 * locked (the config's read sections, wcalls, the deferred cache); the
 * *_on_worker functions on each worker.
 */
#include "engine/ops.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/conf.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/delivery.h"
#include "engine/dlog.h"
#include "engine/events.h"
#include "engine/engine.h"
#include "engine/mta_sts.h"
#include "engine/server.h"
#include "engine/shaping.h"
#include "engine/stats.h"
#include "engine/warmup.h"
#include "queue/queue.h"
#include "engine/ops_int.h"

/* ---- running a function on every worker ---- */


void
wcall_unref(struct wcall *c)
{
    pthread_mutex_lock(&c->lock);
    unsigned left = --c->refs;
    pthread_mutex_unlock(&c->lock);
    if (left != 0)
        return;
    if (c->res_free != NULL)
        c->res_free(c->res, c->n);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cv);
    free(c);
}

static void
wcall_on_worker(struct worker *w, struct worker_msg *m)
{
    struct wcall_msg *x = (struct wcall_msg *)m;
    struct wcall *c = x->c;
    (void)w;
    c->fn(c->e, x->w, c);
    log_flush(); /* what it logged, before its caller answers (log.h) */
    pthread_mutex_lock(&c->lock);
    if (--c->pending == 0)
        pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->lock);
    wcall_unref(c);
}

/* Under c->lock: the workers answer concurrently, and one that answers
 * late writes after its caller stopped waiting (wcall_run's -ETIMEDOUT)
 * and read the answer. */
void
wcall_fail(struct wcall *c, int rc)
{
    pthread_mutex_lock(&c->lock);
    c->rc = rc;
    pthread_mutex_unlock(&c->lock);
}

int
wcall_rc(struct wcall *c)
{
    pthread_mutex_lock(&c->lock);
    int rc = c->rc;
    pthread_mutex_unlock(&c->lock);
    return rc;
}

struct wcall *
wcall_new(struct engine *e, wcall_fn *fn)
{
    unsigned n = e->nworkers;
    struct wcall *c = calloc(1, sizeof(*c) + n * sizeof(struct wcall_msg));
    if (c == NULL)
        return NULL;
    pthread_mutex_init(&c->lock, NULL);
    clock_cond_init_mono(&c->cv);
    c->fn = fn;
    c->e = e;
    c->n = n;
    return c;
}

/* Run c->fn on worker only (or every worker when only is -1) and wait.
 * Returns 0, or -ETIMEDOUT when a worker did not answer in time (its
 * answer is then ignored; the call is freed by whoever lets go last). */
int
wcall_run(struct wcall *c, int only)
{
    unsigned first = only < 0 ? 0 : (unsigned)only, last = only < 0 ? c->n : first + 1;
    c->pending = last - first;
    c->refs = 1 + c->pending;
    for (unsigned i = first; i < last; i++) {
        c->msgs[i].m.fn = wcall_on_worker;
        c->msgs[i].c = c;
        c->msgs[i].w = i;
        worker_post(&c->e->workers[i], &c->msgs[i].m);
    }
    struct timespec until = clock_mono_deadline(WAIT_MS);
    int rc = 0;
    pthread_mutex_lock(&c->lock);
    while (c->pending > 0 && rc == 0)
        rc = pthread_cond_timedwait(&c->cv, &c->lock, &until);
    bool late = c->pending > 0;
    pthread_mutex_unlock(&c->lock);
    return late ? -ETIMEDOUT : 0;
}

/* ---- commands ---- */

static unsigned
owner_of(const struct engine *e, const char *domain)
{
    return delivery_worker_of(e, domain, 0);
}

/* On every worker: a domain's mail through a pool is on the worker its
 * name hashes to, its mail without one on its site's (site affinity). */
static void
suspend_on_worker(struct engine *e, unsigned w, struct wcall *c)
{
    int rc;
    if (c->kind == DELIVERY_SCOPE_DOMAIN && c->for_ms == 0 && w == owner_of(e, c->arg))
        rc = delivery_suspend(e->dlv[w], c->arg, c->flag); /* logs it */
    else
        rc = delivery_suspend_scope(e->dlv[w], (enum delivery_scope)c->kind, c->arg, c->flag,
                                    c->for_ms);
    if (rc < 0)
        wcall_fail(c, rc); /* any worker's failure is the answer's */
}

bool
domain_arg_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 253)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '-' || ch == '.' || ch == '_'))
            return false;
    }
    return true;
}

/* A scope of suspend and resume: "DOMAIN", or KIND=NAME with KIND one
 * of domain, tenant, campaign (the rest of the line: it may hold
 * blanks), pool, source. Returns the kind and *name into buf, or -1 with
 * err. */
static int
parse_suspend_scope(const char *args, char *buf, size_t cap, const char **name, char *err,
                    size_t errlen)
{
    static const char *const kinds[DELIVERY_SCOPE_COUNT] = {"domain=", "tenant=", "campaign=",
                                                             "pool=", "source="};
    if (strlen(args) >= cap) {
        snprintf(err, errlen, "scope too long");
        return -1;
    }
    snprintf(buf, cap, "%s", args);
    int kind = DELIVERY_SCOPE_DOMAIN;
    *name = buf;
    for (int k = 0; k < DELIVERY_SCOPE_COUNT; k++)
        if (strncmp(buf, kinds[k], strlen(kinds[k])) == 0) {
            kind = k;
            *name = buf + strlen(kinds[k]);
        }
    bool ok;
    switch (kind) {
    case DELIVERY_SCOPE_DOMAIN:
        ok = domain_arg_ok(*name);
        break;
    case DELIVERY_SCOPE_TENANT:
    case DELIVERY_SCOPE_POOL:
        ok = config_name_valid(*name, strlen(*name));
        break;
    case DELIVERY_SCOPE_SOURCE: {
        unsigned char a[16];
        ok = inet_pton(AF_INET, *name, a) == 1 || inet_pton(AF_INET6, *name, a) == 1;
        break;
    }
    default:
        ok = (*name)[0] != '\0' && strlen(*name) <= QUEUE_MAX_TAG;
    }
    if (!ok) {
        snprintf(err, errlen, "not a %s: %.100s",
                 kind == DELIVERY_SCOPE_SOURCE ? "source address" : delivery_scope_str(kind),
                 *name);
        return -1;
    }
    return kind;
}

#define SUSPEND_CLUSTER_MS (365ULL * 86400000ULL) /* "until resumed": a year at most */

/* suspend/resume of a domain, a tenant or a source on every node: a
 * shaping action (engine/shaping.h) of kind suspend, rule "operator",
 * group "*" (every destination), shared through Redis and kept in the
 * spool's shaping.state like the rules' actions; the scheduler applies it
 * as it applies theirs (a domain's and a source's connections, a
 * tenant's jobs parked as they come up). */
static int
suspend_cluster(struct engine *e, int kind, const char *name, bool on, uint64_t for_ms,
                const char *note, struct json *out, char *err, size_t errlen)
{
    struct shaping_action a;
    memset(&a, 0, sizeof(a));
    a.kind = SHAPING_SUSPEND;
    if (kind == DELIVERY_SCOPE_DOMAIN) {
        a.scope = SHAPING_SCOPE_DOMAIN;
        for (size_t i = 0; name[i] != '\0' && i + 1 < sizeof(a.domain); i++)
            a.domain[i] = (char)tolower((unsigned char)name[i]);
    } else {
        a.scope = kind == DELIVERY_SCOPE_TENANT ? SHAPING_SCOPE_TENANT : SHAPING_SCOPE_SOURCE;
        snprintf(a.group, sizeof(a.group), "*");
        char *field = kind == DELIVERY_SCOPE_TENANT ? a.tenant : a.source;
        size_t len = strlen(name);
        _Static_assert(sizeof(a.tenant) == sizeof(a.source), "one bound for both");
        if (len >= sizeof(a.tenant)) {
            snprintf(err, errlen, "%s name too long (%zu octets, at most %zu)",
                     delivery_scope_str((enum delivery_scope)kind), len, sizeof(a.tenant) - 1);
            return -1;
        }
        memcpy(field, name, len + 1);
    }
    int n = 0;
    if (on) {
        a.until_ms = clock_unix_ms() + (for_ms != 0 ? for_ms : SUSPEND_CLUSTER_MS);
        snprintf(a.trigger, sizeof(a.trigger), "sluicectl suspend");
        if (shaping_add(e->shaping, &a) < 0) {
            snprintf(err, errlen, "too many shaping actions");
            return -1;
        }
    } else {
        n = shaping_remove(e->shaping, &a);
    }
    /* On every node only through Redis: without [redis] url the action
     * is this node's shaping table alone. */
    struct shaping_stats st;
    shaping_stats(e->shaping, &st);
    log_msg(LOG_NOTICE, "event=%s scope=%s name=\"%s\" for_ms=%llu cluster=%s",
            on ? "suspended" : "resumed", delivery_scope_str((enum delivery_scope)kind), name,
            (unsigned long long)for_ms, st.redis_on ? "yes" : "no");
    json_obj_begin(out);
    json_kstr(out, delivery_scope_str((enum delivery_scope)kind),
              kind == DELIVERY_SCOPE_DOMAIN ? a.domain : name);
    json_kbool(out, "suspended", on);
    json_kbool(out, "cluster", st.redis_on);
    if (for_ms != 0)
        json_ku64(out, "for_ms", for_ms);
    if (!on)
        json_ku64(out, "resumed", (uint64_t)n);
    if (note != NULL)
        json_kstr(out, "note", note);
    json_obj_end(out);
    return 0;
}

/* A tenant or pool that the config names, a source of one of its pools
 * as written there (the suspension matches that spelling): a suspension
 * of a name it does not (a typo, "acme" for "acme-tx", 2001:DB8::1 for
 * 2001:db8::1) holds no mail back and was answered as done. Domains and
 * campaigns are anyone's; a resume takes any name, to end a suspension
 * of a section a reload removed. False with err naming those there are. */
static bool
source_name_known(const struct config *cfg, const char *name, char *err, size_t errlen)
{
    for (unsigned i = 0; i < cfg->npools; i++)
        for (unsigned j = 0; j < cfg->pools[i].nsources; j++)
            if (strcmp(cfg->pools[i].sources[j].source->pattern, name) == 0)
                return true;
    size_t o = 0;
    unsigned listed = 0;
    int w = snprintf(err, errlen, "unknown source \"%.64s\": %s", name,
                     cfg->npools == 0 ? "the config has no [pool] section (a source is suspended "
                                        "as one of a pool's)"
                                      : "the pools' sources are");
    for (unsigned i = 0; i < cfg->npools; i++)
        for (unsigned j = 0; j < cfg->pools[i].nsources && listed < 8; j++) {
            const char *s = cfg->pools[i].sources[j].source->pattern;
            bool seen = false; /* a source in two pools is listed once */
            for (unsigned k = 0; k <= i && !seen; k++)
                for (unsigned m = 0; m < (k < i ? cfg->pools[k].nsources : j) && !seen; m++)
                    seen = strcmp(cfg->pools[k].sources[m].source->pattern, s) == 0;
            if (seen || w < 0 || (o += (size_t)w) >= errlen)
                continue;
            w = snprintf(err + o, errlen - o, "%s %s", listed++ > 0 ? "," : "", s);
        }
    return false;
}

static bool
scope_name_known(const struct config *cfg, int kind, const char *name, char *err, size_t errlen)
{
    if (kind == DELIVERY_SCOPE_SOURCE)
        return source_name_known(cfg, name, err, errlen);
    if (kind != DELIVERY_SCOPE_TENANT && kind != DELIVERY_SCOPE_POOL)
        return true;
    bool tenant = kind == DELIVERY_SCOPE_TENANT;
    if (tenant ? config_tenant(cfg, name, strlen(name)) != NULL
               : config_pool(cfg, name, strlen(name)) != NULL)
        return true;
    unsigned n = tenant ? cfg->ntenants : cfg->npools;
    size_t o = 0;
    int w = snprintf(err, errlen, "unknown %s \"%.64s\": %s", tenant ? "tenant" : "pool", name,
                     n == 0 ? (tenant ? "the config has no [tenant] section"
                                      : "the config has no [pool] section")
                            : "the config's are");
    for (unsigned i = 0; i < n && i < 8 && w >= 0 && (o += (size_t)w) < errlen; i++)
        w = snprintf(err + o, errlen - o, "%s %s", i > 0 ? "," : "",
                     tenant ? cfg->tenants[i].name : cfg->pools[i].name);
    if (n > 8 && w >= 0 && (o += (size_t)w) < errlen)
        snprintf(err + o, errlen - o, ", and %u more", n - 8);
    return false;
}

/* suspend SCOPE [for=DURATION] | resume SCOPE: with shaping on, a domain,
 * tenant or source on every node (suspend_cluster); else, and with
 * "local" first, a domain on the worker that owns it, the other scopes
 * on every worker of this node. */
static int
cmd_suspend(struct engine *e, const char *args, bool on, struct json *out, char *err,
            size_t errlen)
{
    char buf[512];
    uint64_t for_ms = 0;
    snprintf(buf, sizeof(buf), "%s", args);
    char *last = strrchr(buf, ' ');
    if (last != NULL && strncmp(last + 1, "for=", 4) == 0) {
        if (!on || conf_parse_duration(last + 5, &for_ms) != 0 || for_ms == 0) {
            snprintf(err, errlen,
                     on ? "for=%.50s (--for): not a duration above 0, such as 90s, 30m or 2h"
                        : "resume takes no for=",
                     last + 5);
            return -1;
        }
        *last = '\0';
        while (last > buf && last[-1] == ' ')
            *--last = '\0';
    }
    char scope[512];
    const char *name;
    bool local = strncmp(buf, "local ", 6) == 0;
    int kind = parse_suspend_scope(local ? buf + 6 : buf, scope, sizeof(scope), &name, err, errlen);
    if (kind < 0)
        return -1;
    bool cluster = !local && e->shaping != NULL &&
                   (kind == DELIVERY_SCOPE_DOMAIN || kind == DELIVERY_SCOPE_TENANT ||
                    kind == DELIVERY_SCOPE_SOURCE);
    const char *note = NULL;
    if (on && !scope_name_known(e->cfg, kind, name, err, errlen)) {
        /* A source is an address of one node, and a tenant may be in
         * another node's config alone (a node added with a new tenant): a
         * suspension that reaches every node through Redis may be for
         * another node's, which this config does not name. Taken, and the
         * answer says so. A pool's suspension is this node's alone (no
         * shaping action has a pool scope): an unknown pool stays refused. */
        bool others = false;
        if (cluster && (kind == DELIVERY_SCOPE_SOURCE || kind == DELIVERY_SCOPE_TENANT)) {
            struct shaping_stats st;
            shaping_stats(e->shaping, &st);
            others = st.redis_on;
        }
        if (!others)
            return -1;
        note = kind == DELIVERY_SCOPE_SOURCE
                   ? "no pool of this node has this source: it holds back the nodes' whose pools "
                     "have it as written"
                   : "this node's config has no such tenant: it holds back the nodes' whose "
                     "configs have it";
        err[0] = '\0';
    }
    if (cluster)
        return suspend_cluster(e, kind, name, on, for_ms, note, out, err, errlen);
    struct wcall *c = wcall_new(e, suspend_on_worker);
    if (c == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; name[i] != '\0' && i + 1 < sizeof(c->arg); i++)
        c->arg[i] = kind == DELIVERY_SCOPE_DOMAIN && name[i] >= 'A' && name[i] <= 'Z'
                        ? (char)(name[i] + 32)
                        : name[i];
    c->flag = on;
    c->kind = kind;
    c->for_ms = for_ms;
    int rc = wcall_run(c, -1);
    int wrc = wcall_rc(c);
    if (rc == 0 && wrc == 0)
        log_msg(LOG_NOTICE, "event=%s scope=%s name=\"%s\" for_ms=%llu",
                on ? "suspended" : "resumed", delivery_scope_str((enum delivery_scope)kind),
                c->arg, (unsigned long long)for_ms);
    json_obj_begin(out);
    json_kstr(out, delivery_scope_str((enum delivery_scope)kind), c->arg);
    json_kbool(out, "suspended", on);
    json_kbool(out, "cluster", false);
    if (for_ms != 0)
        json_ku64(out, "for_ms", for_ms);
    json_obj_end(out);
    wcall_unref(c);
    if (rc < 0 || wrc < 0) {
        snprintf(err, errlen, "%s", rc < 0 ? "a worker did not answer"
                                  : wrc == -ENOSPC ? "too many suspensions"
                                                   : "out of memory");
        return -1;
    }
    return 0;
}

/* "events": every sink; "events pause NAME", "events resume NAME". */
static int
cmd_events(struct engine *e, const char *args, struct json *out, char *err, size_t errlen)
{
    if (args[0] != '\0') {
        char verb[16], name[80];
        if (sscanf(args, "%15s %79s", verb, name) != 2 ||
            (strcmp(verb, "pause") != 0 && strcmp(verb, "resume") != 0)) {
            snprintf(err, errlen, "usage: events [pause|resume NAME]");
            return -1;
        }
        if (events_pause(e->events, name, verb[0] == 'p') < 0) {
            snprintf(err, errlen, "no event sink named %.79s", name);
            return -1;
        }
    }
    struct events_sink_stats es[EVENTS_SINKS_MAX];
    unsigned n = events_stats(e->events, es, EVENTS_SINKS_MAX);
    json_obj_begin(out);
    if (e->events != NULL)
        json_kstr(out, "node_id", events_node_id(e->events));
    json_key(out, "sinks");
    json_arr_begin(out);
    for (unsigned i = 0; i < n; i++) {
        json_obj_begin(out);
        json_kstr(out, "name", es[i].name);
        json_kstr(out, "kind", es[i].kind);
        json_ku64(out, "pending", es[i].pending);
        json_ku64(out, "oldest_pending_age_ms", es[i].oldest_age_ms);
        json_ku64(out, "sent", es[i].sent);
        json_ku64(out, "batches", es[i].batches);
        json_ku64(out, "failed_attempts", es[i].failed);
        json_ku64(out, "filtered", es[i].filtered);
        json_ku64(out, "dropped", es[i].dropped);
        json_ku64(out, "rejected", es[i].rejected);
        json_kbool(out, "paused", es[i].paused);
        json_kstr(out, "last_error", es[i].last_error);
        json_obj_end(out);
    }
    json_arr_end(out);
    json_obj_end(out);
    return 0;
}

/* "tlsrpt": MTA-STS and TLS reporting counters; "tlsrpt flush": send
 * every pending TLS report now, today's too (tests, and an operator who
 * will not wait for the day to end). */
static int
cmd_tlsrpt(struct engine *e, const char *args, struct json *out, char *err, size_t errlen)
{
    bool flush = strcmp(args, "flush") == 0;
    if (args[0] != '\0' && !flush) {
        snprintf(err, errlen, "usage: tlsrpt [flush]");
        return -1;
    }
    if (e->mta_sts == NULL) {
        snprintf(err, errlen, "MTA-STS is off ([delivery] mta_sts)");
        return -1;
    }
    if (flush && mta_sts_tlsrpt(e->mta_sts) == NULL) {
        snprintf(err, errlen, "TLS reporting is off ([mta_sts] tlsrpt)");
        return -1;
    }
    if (flush)
        mta_sts_tlsrpt_flush(e->mta_sts);
    struct mta_sts_stats st;
    mta_sts_stats(e->mta_sts, &st);
    json_obj_begin(out);
    if (flush)
        json_kstr(out, "flush", "requested");
    json_ku64(out, "domains", st.domains);
    json_ku64(out, "entry_bytes", st.entry_bytes);
    json_ku64(out, "policies", st.policies);
    json_ku64(out, "enforce", st.enforce);
    json_ku64(out, "checks", st.checks);
    json_ku64(out, "fetches", st.fetches);
    json_ku64(out, "fetched", st.fetched);
    json_ku64(out, "fetch_failed", st.fetch_failed);
    json_ku64(out, "refreshed", st.refreshed);
    json_ku64(out, "inflight", st.inflight);
    json_ku64(out, "queued", st.queued);
    json_ku64(out, "reports_sent", st.reports_sent);
    json_ku64(out, "reports_failed", st.reports_failed);
    json_obj_end(out);
    return 0;
}

/* ---- warm-up and shaping ---- */

/* "warmup": every (source, group) of a plan. With test hooks (engine.h:
 * warmup_test_hooks) also "warmup clock DAYS" (move the plans' clock)
 * and "warmup take SOURCE MX_HOST [N]" (count as the outbound side does). */
static int
cmd_warmup(struct engine *e, const char *args, struct json *out, char *err, size_t errlen)
{
    char sub[16] = "", a1[256] = "", a2[256] = "", a3[32] = "", extra[2];
    int n = sscanf(args, "%15s %255s %255s %31s %1s", sub, a1, a2, a3, extra);
    uint64_t now = clock_unix_ms();
    if (n > 0 && strcmp(sub, "clock") == 0 && e->warmup_test_hooks && n == 2) {
        char *end;
        long long days = strtoll(a1, &end, 10);
        if (*end != '\0' || days < -3650 || days > 3650) {
            snprintf(err, errlen, "usage: warmup clock DAYS (-3650..3650)");
            return -1;
        }
        warmup_clock_shift(e->warmup, days * 86400000LL);
        log_msg(LOG_WARN, "event=test_hook name=warmup_clock days=%lld", days);
        json_obj_begin(out);
        json_key(out, "clock_days");
        json_i64(out, days);
        json_obj_end(out);
        return 0;
    }
    if (n > 0 && strcmp(sub, "take") == 0 && e->warmup_test_hooks && (n == 3 || n == 4)) {
        unsigned long cnt = 1;
        if (n == 4) {
            char *end;
            cnt = strtoul(a3, &end, 10);
            if (*end != '\0' || cnt == 0 || cnt > 1000000) {
                snprintf(err, errlen, "usage: warmup take SOURCE MX_HOST [N (1..1000000)]");
                return -1;
            }
        }
        unsigned long took = 0;
        while (took < cnt && warmup_take(e->warmup, a1, a2, now))
            took++;
        json_obj_begin(out);
        json_ku64(out, "taken", took);
        json_ku64(out, "refused", cnt - took);
        json_obj_end(out);
        return 0;
    }
    if (n > 0) {
        snprintf(err, errlen, "usage: warmup");
        return -1;
    }
    struct warmup_row *rows = calloc(STATS_WARMUP_MAX, sizeof(*rows));
    if (rows == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    size_t total = warmup_report(e->warmup, now, rows, STATS_WARMUP_MAX);
    size_t shown = total < STATS_WARMUP_MAX ? total : STATS_WARMUP_MAX;
    struct warmup_stats ws;
    warmup_stats(e->warmup, &ws);
    json_obj_begin(out);
    json_ku64(out, "sources", ws.sources);
    json_kstr(out, "redis", ws.redis);
    json_ku64(out, "refused", ws.refused);
    json_ku64(out, "rows_total", total);
    json_key(out, "rows");
    json_arr_begin(out);
    for (size_t i = 0; i < shown; i++) {
        const struct warmup_row *r = &rows[i];
        json_obj_begin(out);
        json_kstr(out, "source", r->source);
        json_kstr(out, "plan", r->plan);
        json_kstr(out, "group", r->group);
        json_kstr(out, "start", r->start);
        json_kstr(out, "date", r->date);
        json_key(out, "day");
        json_i64(out, r->day);
        json_key(out, "allowance");
        if (r->allowance == UINT64_MAX)
            json_null(out);
        else
            json_u64(out, r->allowance);
        json_ku64(out, "taken", r->taken);
        json_ku64(out, "reserved", r->reserved);
        json_key(out, "left");
        if (r->left == UINT64_MAX)
            json_null(out);
        else
            json_u64(out, r->left);
        json_key(out, "next_day");
        json_time_ms(out, r->next_day_ms);
        json_obj_end(out);
    }
    json_arr_end(out);
    json_obj_end(out);
    free(rows);
    return 0;
}

static void
shaping_action_json(struct json *out, const struct shaping_action *a, uint64_t now)
{
    json_obj_begin(out);
    json_kstr(out, "id", a->id);
    json_kstr(out, "action", shaping_kind_str(a->kind));
    if (a->kind == SHAPING_CAP)
        json_ku64(out, "value", a->value);
    if (a->kind == SHAPING_RATE) {
        char rb[32];
        json_kstr(out, "rate", shaping_rate_str(a->value, a->per_ms, rb, sizeof(rb)));
    }
    json_kstr(out, "scope", shaping_scope_str(a->scope));
    if (a->scope == SHAPING_SCOPE_SOURCE)
        json_kstr(out, "source", a->source);
    if (a->group[0] != '\0')
        json_kstr(out, "group", a->group);
    if (a->domain[0] != '\0')
        json_kstr(out, "domain", a->domain);
    if (a->scope == SHAPING_SCOPE_TENANT)
        json_kstr(out, "tenant", a->tenant);
    json_kstr(out, "rule", a->rule);
    json_kstr(out, "trigger", a->trigger);
    json_kstr(out, "origin", a->origin);
    json_key(out, "started");
    json_time_ms(out, a->started_ms);
    json_key(out, "until");
    json_time_ms(out, a->until_ms);
    json_ku64(out, "remaining_ms", a->until_ms > now ? a->until_ms - now : 0);
    json_obj_end(out);
}

/* shaping [list] | shaping clear SEL | shaping KIND SCOPE... for=DURATION */
static int
cmd_shaping(struct engine *e, const char *args, struct json *out, char *err, size_t errlen)
{
    if (e->shaping == NULL) {
        snprintf(err, errlen, "shaping is off ([shaping] enabled = no)");
        return -1;
    }
    char buf[512];
    snprintf(buf, sizeof(buf), "%s", args);
    char *save = NULL, *w[8];
    unsigned n = 0;
    for (char *t = strtok_r(buf, " \t", &save); t != NULL && n < 8; t = strtok_r(NULL, " \t", &save))
        w[n++] = t;
    if (n == 0 || strcmp(w[0], "list") == 0) {
        struct shaping_action *v;
        size_t na;
        if (shaping_list(e->shaping, &v, &na) < 0) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        struct shaping_stats ss;
        shaping_stats(e->shaping, &ss);
        uint64_t now = clock_unix_ms();
        json_obj_begin(out);
        json_kstr(out, "redis", !ss.redis_on ? "off" : ss.redis_up ? "connected" : "unreachable");
        json_ku64(out, "rules", shaping_rules_count(e->cfg->shaping_rules));
        json_key(out, "actions");
        json_arr_begin(out);
        for (size_t i = 0; i < na; i++)
            shaping_action_json(out, &v[i], now);
        json_arr_end(out);
        json_obj_end(out);
        free(v);
        return 0;
    }
    if (strcmp(w[0], "clear") == 0) {
        if (n != 2) {
            snprintf(err, errlen, "usage: shaping clear ID|source=A|group=G|domain=D|rule=R|all");
            return -1;
        }
        int k = shaping_clear(e->shaping, w[1]);
        log_msg(LOG_NOTICE, "event=shaping_cleared by=operator selector=\"%s\" actions=%d", w[1], k);
        struct shaping_stats ss;
        shaping_stats(e->shaping, &ss);
        json_obj_begin(out);
        json_ku64(out, "cleared", (uint64_t)k);
        json_kbool(out, "cluster", ss.redis_on); /* every node only through Redis */
        json_obj_end(out);
        return 0;
    }
    /* an action by hand */
    struct shaping_action a;
    memset(&a, 0, sizeof(a));
    if (strcmp(w[0], "suspend") == 0) {
        a.kind = SHAPING_SUSPEND;
    } else if (strcmp(w[0], "backoff") == 0) {
        a.kind = SHAPING_BACKOFF;
    } else if (strncmp(w[0], "cap:", 4) == 0 && atoi(w[0] + 4) > 0) {
        a.kind = SHAPING_CAP;
        a.value = (unsigned)atoi(w[0] + 4);
    } else if (strncmp(w[0], "rate:", 5) == 0 &&
               shaping_rate_parse(w[0] + 5, &a.value, &a.per_ms) == 0) {
        a.kind = SHAPING_RATE;
    } else if (strcmp(w[0], "bounce") == 0) {
        a.kind = SHAPING_BOUNCE;
    } else {
        snprintf(err, errlen,
                 "shaping: list, clear, suspend, backoff, cap:N, rate:R or bounce, not %.40s",
                 w[0]);
        return -1;
    }
    uint64_t for_ms = 0;
    bool src = false, grp = false, dom = false, ten = false;
    for (unsigned i = 1; i < n; i++) {
        if (strncmp(w[i], "source=", 7) == 0) {
            unsigned char ab[16];
            if (inet_pton(AF_INET, w[i] + 7, ab) != 1 && inet_pton(AF_INET6, w[i] + 7, ab) != 1) {
                snprintf(err, errlen, "not a source address: %.60s", w[i] + 7);
                return -1;
            }
            snprintf(a.source, sizeof(a.source), "%s", w[i] + 7);
            src = true;
        } else if (strncmp(w[i], "tenant=", 7) == 0 && config_name_valid(w[i] + 7, strlen(w[i] + 7)) &&
                   strlen(w[i] + 7) < sizeof(a.tenant)) {
            snprintf(a.tenant, sizeof(a.tenant), "%s", w[i] + 7);
            ten = true;
        } else if (strncmp(w[i], "group=", 6) == 0 && w[i][6] != '\0') {
            snprintf(a.group, sizeof(a.group), "%s", w[i] + 6);
            grp = true;
        } else if (strncmp(w[i], "domain=", 7) == 0 && domain_arg_ok(w[i] + 7)) {
            for (size_t k = 0; w[i][7 + k] != '\0' && k + 1 < sizeof(a.domain); k++)
                a.domain[k] = (char)tolower((unsigned char)w[i][7 + k]);
            dom = true;
        } else if (strncmp(w[i], "for=", 4) == 0) {
            if (conf_parse_duration(w[i] + 4, &for_ms) != 0 || for_ms == 0) {
                snprintf(err, errlen, "for=%.50s: not a duration above 0, such as 90s, 30m or 2h",
                         w[i] + 4);
                return -1;
            }
        } else {
            snprintf(err, errlen, "shaping: unknown argument %.60s", w[i]);
            return -1;
        }
    }
    if (for_ms == 0 || !((src && grp && !dom && !ten) || (ten && grp && !dom && !src) ||
                         (grp && !src && !dom && !ten) || (dom && !src && !grp && !ten))) {
        snprintf(err, errlen, "usage: shaping %s source=A group=G | tenant=T group=G | group=G | "
                              "domain=D for=DURATION",
                 w[0]);
        return -1;
    }
    if (ten && (a.kind == SHAPING_BACKOFF || a.kind == SHAPING_CAP)) {
        snprintf(err, errlen, "a tenant's mail is suspended, slowed (rate:R) or bounced; "
                              "connections are not a tenant's (no %s)", w[0]);
        return -1;
    }
    if (grp && strncmp(a.group, "mx:", 3) != 0 &&
        shaping_rules_group_name(e->cfg->shaping_rules, 0) != NULL) {
        bool known = false;
        for (unsigned g = 0; g < shaping_rules_groups(e->cfg->shaping_rules); g++)
            known = known || strcasecmp(shaping_rules_group_name(e->cfg->shaping_rules, g),
                                        a.group) == 0;
        if (!known) {
            snprintf(err, errlen, "no group %.60s in the shaping rules (or mx:HOST)", a.group);
            return -1;
        }
    }
    a.scope = src   ? SHAPING_SCOPE_SOURCE
              : ten ? SHAPING_SCOPE_TENANT
              : grp ? SHAPING_SCOPE_GROUP
                    : SHAPING_SCOPE_DOMAIN;
    a.until_ms = clock_unix_ms() + for_ms;
    snprintf(a.trigger, sizeof(a.trigger), "by the operator");
    if (shaping_add(e->shaping, &a) < 0) {
        snprintf(err, errlen, "too many shaping actions");
        return -1;
    }
    struct shaping_action *v;
    size_t na;
    if (shaping_list(e->shaping, &v, &na) < 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    json_obj_begin(out);
    json_key(out, "action");
    size_t at = na;
    for (size_t i = 0; i < na && at == na; i++)
        if (strcmp(v[i].rule, "operator") == 0 && v[i].kind == a.kind && v[i].scope == a.scope &&
            strcmp(v[i].source, a.source) == 0 && strcmp(v[i].group, a.group) == 0 &&
            strcmp(v[i].domain, a.domain) == 0 && strcmp(v[i].tenant, a.tenant) == 0)
            at = i;
    if (at < na)
        shaping_action_json(out, &v[at], clock_unix_ms());
    else
        json_null(out); /* ended meanwhile (a clear from another node) */
    struct shaping_stats ss;
    shaping_stats(e->shaping, &ss);
    json_kbool(out, "cluster", ss.redis_on); /* every node only through Redis */
    json_obj_end(out);
    free(v);
    return 0;
}

/* ---- sites ---- */

struct slist {
    struct delivery_site *v; /* owned */
    size_t n, cap;
};

static void
sites_on_worker(struct engine *e, unsigned w, struct wcall *c)
{
    struct slist *l = &((struct slist *)c->res)[w];
    if (delivery_sites(e->dlv[w], &l->v, &l->n, &l->cap) < 0)
        wcall_fail(c, -ENOMEM);
}

static void
free_slists(void *res, unsigned n)
{
    struct slist *l = res;
    for (unsigned i = 0; l != NULL && i < n; i++)
        free(l[i].v);
    free(l);
}

static uint64_t
site_busyness(const struct delivery_site *s)
{
    return s->conns + s->ready + s->inflight;
}

static int
cmp_site(const void *a, const void *b)
{
    const struct delivery_site *x = a, *y = b;
    uint64_t bx = site_busyness(x), by = site_busyness(y);
    if (bx != by)
        return bx > by ? -1 : 1;
    int k = strcmp(x->key, y->key);
    return k != 0 ? k : x->worker < y->worker ? -1 : x->worker > y->worker;
}

/* "sites [N]": the N busiest sites of every worker (connections, waiting
 * and in-flight jobs), with their windows and counters. A site is a
 * worker's: the same hosts on two workers (a pool's domains, or domains
 * whose limits keep them on their own worker) are two rows. */
static int
cmd_sites(struct engine *e, const char *args, struct json *out, char *err, size_t errlen)
{
    unsigned long want;
    if (stats_parse_top(args, &want) < 0) {
        snprintf(err, errlen, "sites: N must be a number from 1 to %d", STATS_DOMAINS_MAX);
        return -1;
    }
    struct wcall *c = wcall_new(e, sites_on_worker);
    if (c == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    c->res = calloc(e->nworkers, sizeof(struct slist));
    c->res_free = free_slists;
    int rc = c->res != NULL ? wcall_run(c, -1) : 0;
    int wrc = c->res != NULL ? wcall_rc(c) : -ENOMEM;
    if (rc != 0 || wrc != 0) {
        snprintf(err, errlen, "%s", wrc != 0 ? "out of memory" : "a worker did not answer");
        wcall_unref(c);
        return -1;
    }
    struct slist all = {0};
    for (unsigned i = 0; i < e->nworkers; i++) {
        struct slist *l = &((struct slist *)c->res)[i];
        if (l->n == 0)
            continue;
        struct delivery_site *v = realloc(all.v, (all.n + l->n) * sizeof(*v));
        if (v == NULL) {
            free(all.v);
            wcall_unref(c);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        all.v = v;
        memcpy(all.v + all.n, l->v, l->n * sizeof(*v));
        all.n += l->n;
    }
    wcall_unref(c);
    if (all.n > 1)
        qsort(all.v, all.n, sizeof(*all.v), cmp_site);
    json_obj_begin(out);
    json_ku64(out, "sites_total", all.n);
    json_key(out, "sites");
    json_arr_begin(out);
    for (size_t i = 0; i < all.n && i < want; i++) {
        const struct delivery_site *s = &all.v[i];
        json_obj_begin(out);
        json_kstr(out, "site", s->key);
        json_ku64(out, "worker", s->worker);
        json_ku64(out, "connections", s->conns);
        json_ku64(out, "idle", s->idle);
        json_ku64(out, "window", s->window);
        json_ku64(out, "max_connections", s->ceiling);
        /* what it can open: the window, clamped by the caps (null: none) */
        json_ku64(out, "limit", s->limit);
        json_kstr(out, "limited_by", s->limited_by);
        json_key(out, "address_cap");
        if (s->addr_cap != 0)
            json_u64(out, s->addr_cap);
        else
            json_null(out);
        json_key(out, "mx_cap");
        if (s->mx_cap != 0)
            json_u64(out, s->mx_cap);
        else
            json_null(out);
        json_ku64(out, "domains", s->domains);
        json_ku64(out, "domains_waiting", s->domains_waiting);
        json_ku64(out, "ready", s->ready);
        json_ku64(out, "inflight", s->inflight);
        json_ku64(out, "opened", s->opened);
        json_ku64(out, "failures", s->failures);
        json_ku64(out, "window_halved", s->shrinks);
        json_ku64(out, "head_us", s->head_us);
        json_ku64(out, "head_base_us", s->head_base_us);
        json_kbool(out, "queues", s->queues);
        json_obj_end(out);
    }
    json_arr_end(out);
    json_obj_end(out);
    free(all.v);
    return 0;
}

static int
ops_command(void *arg, const char *verb, const char *args, const struct stats_caller *who,
            struct json *out, char *err, size_t errlen)
{
    struct engine *e = arg;
    static const struct stats_caller nobody = {.uid = STATS_UID_NONE, .fd = -1};
    if (who == NULL)
        who = &nobody;
    /* Begun once the stop has begun (engine_stop sets e->stopping, and
     * its first steps come before ops_stop stops this thread): one queued
     * behind a command the stop ended, or sent meanwhile. It is not run,
     * as those this thread never comes to are not (stats_cmd_stop): it
     * ran, between the stop's start and ops_stop, whenever the one before
     * it gave up first (a bounce, a flush). */
    if (atomic_load(&e->stopping)) {
        snprintf(err, errlen, "%s", STATS_CMD_NOT_RUN);
        return -1;
    }
    if (who->fd >= 0 && strcmp(verb, "suppress") != 0) {
        snprintf(err, errlen, "%s: a file descriptor came with it, and it takes none", verb);
        return -1;
    }
    if (strcmp(verb, "message") == 0)
        return cmd_message(e, args, out, err, errlen);
    if (strcmp(verb, "queue") == 0)
        return cmd_queue(e, args, out, err, errlen);
    if (strcmp(verb, "suspend") == 0 || strcmp(verb, "resume") == 0)
        return cmd_suspend(e, args, verb[0] == 's', out, err, errlen);
    if (strcmp(verb, "flush") == 0)
        return cmd_flush(e, args, out, err, errlen);
    if (strcmp(verb, "bounce") == 0)
        return cmd_bounce(e, args, out, err, errlen);
    if (strcmp(verb, "events") == 0)
        return cmd_events(e, args, out, err, errlen);
    if (strcmp(verb, "suppress") == 0)
        return cmd_suppress(e, args, who, out, err, errlen);
    if (strcmp(verb, "warmup") == 0)
        return cmd_warmup(e, args, out, err, errlen);
    if (strcmp(verb, "shaping") == 0)
        return cmd_shaping(e, args, out, err, errlen);
    if (strcmp(verb, "tlsrpt") == 0)
        return cmd_tlsrpt(e, args, out, err, errlen);
    if (strcmp(verb, "sites") == 0)
        return cmd_sites(e, args, out, err, errlen);
    if (strcmp(verb, "reload") == 0) {
        /* The main thread reloads on SIGHUP; this is the same, and waits
         * for its outcome (a SIGHUP from elsewhere meanwhile may answer
         * for this one: it read the same file), or for the drain or the
         * stop, after which it takes no SIGHUP. One raised before the
         * main thread took the TERM runs first (main.c: sigwaitinfo on
         * Linux gives the lowest-numbered pending signal first), unless
         * a reload was under way when the TERM came: then the TERM. */
        uint64_t gen = engine_reload_gen(e);
        /* once draining, the main thread would log the HUP as ignored,
         * with sluice's own pid as its sender: the wait answers alone */
        if (!atomic_load(&e->draining))
            kill(getpid(), SIGHUP);
        struct engine_reload_outcome *o = calloc(1, sizeof(*o));
        if (o == NULL) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        int rc = engine_reload_wait(e, gen, RELOAD_WAIT_MS, o);
        if (rc == -ECANCELED) {
            /* as flush's and bounce's "then sluice stopped" */
            snprintf(err, errlen,
                     "sluice is stopping: the reload was not done (the next start reads the file)");
            free(o);
            return -1;
        }
        if (rc == -ESHUTDOWN) {
            snprintf(err, errlen,
                     "sluice is draining: the reload was not done (the next start reads the file)");
            free(o);
            return -1;
        }
        if (rc == 0) {
            snprintf(err, errlen, "reload refused, the running config is kept: %s", o->why);
            free(o);
            return -1;
        }
        json_obj_begin(out);
        json_kstr(out, "reload", rc == 1 ? "done" : "requested");
        if (rc == 1) {
            json_kstr(out, "changed", o->changed);
            json_kstr(out, "needs_restart", o->kept);
            if (o->users[0] != '\0')
                json_kstr(out, "users_not_loaded", o->users);
        }
        if (rc < 0)
            json_kstr(out, "note", "not finished yet: see the log");
        json_obj_end(out);
        free(o);
        return 0;
    }
    snprintf(err, errlen, "unknown command: %.50s", verb);
    return -1;
}

/* The stats thread's ways in: each reads e->cfg (directly, or through
 * delivery_submit_bounce, shaping's rules, ...) only inside a read
 * section, so that a config replaced meanwhile is not freed under it
 * (config_gen.h). A command waiting for a reload holds back the freeing
 * of what it may still read, nothing more. */
static void
ops_counters_in(void *arg, struct stats_counters *out)
{
    uint64_t g = engine_config_enter(arg);
    ops_counters(arg, out);
    engine_config_leave(arg, g);
}

static size_t
ops_domains_in(void *arg, struct stats_domain *out, size_t cap)
{
    uint64_t g = engine_config_enter(arg);
    size_t n = ops_domains(arg, out, cap);
    engine_config_leave(arg, g);
    return n;
}

static int
ops_command_in(void *arg, const char *verb, const char *args, const struct stats_caller *who,
               struct json *out, char *err, size_t errlen)
{
    uint64_t g = engine_config_enter(arg);
    int rc = ops_command(arg, verb, args, who, out, err, errlen);
    engine_config_leave(arg, g);
    return rc;
}

int
ops_start(struct engine *e, char *err, size_t errlen)
{
    const struct stats_config *sc = &e->cfg->stats;
    if (sc->socket == NULL)
        return 0;
    static struct stats_ops ops;
    ops = (struct stats_ops){.arg = e,
                             .counters = ops_counters_in,
                             .domains = ops_domains_in,
                             .command = ops_command_in,
                             .delivery_off = e->cfg_start != NULL &&
                                             !e->cfg_start->delivery.enabled};
    if (e->dlog != NULL && (e->dlogw_ops = dlog_writer_new(e->dlog)) == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    return stats_server_new(sc->socket, sc->socket_mode, sc->http_listen, sc->top_n, &ops,
                            &e->stats, err, errlen);
}

void
ops_stop(struct engine *e)
{
    e->stats = stats_server_free(e->stats);
    e->dlogw_ops = dlog_writer_free(e->dlogw_ops);
    ops_domains_forget();
}
