/*
 * ops: what the stats socket asks of the running engine (see ops.h):
 * this file runs functions on the workers and answers the commands; the
 * counters and the domains view are engine/ops_views.c's, the suppression
 * list's command engine/ops_suppress.c's (ops_int.h: what they share).
 *
 * The stats thread calls these. What a worker owns (its destinations, its
 * counters) is read or changed on that worker: ops_on_workers() posts a
 * message to each and waits for every answer, a short while at most. The
 * spool is read directly (its API is thread-safe); operator bounces are
 * posted to the workers that own their destinations, which commit them
 * as any outcome, and their answer waits until the spool shows them done
 * (or the stop begins: e->stopping, which a flush's wait observes too,
 * and a reload's, which the drain ends as well: engine_reload_wait).
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
#include "common/idn.h"
#include "common/conf.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/auth_limit.h"
#include "engine/auth_pool.h"
#include "engine/delivery.h"
#include "engine/dkim_pool.h"
#include "engine/dlog.h"
#include "engine/dsn.h"
#include "engine/events.h"
#include "engine/engine.h"
#include "engine/mta_sts.h"
#include "engine/resolver.h"
#include "engine/server.h"
#include "engine/shaping.h"
#include "engine/suppress.h"
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
        /* A source is an address of one node: a suspension that reaches
         * every node through Redis may be for another node's, which no
         * pool here has. Taken, and the answer says so. */
        bool others = false;
        if (cluster && kind == DELIVERY_SCOPE_SOURCE) {
            struct shaping_stats st;
            shaping_stats(e->shaping, &st);
            others = st.redis_on;
        }
        if (!others)
            return -1;
        note = "no pool of this node has this source: it holds back the nodes' whose pools have "
               "it as written";
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

struct walk_sel {
    const char *domain; /* NULL: every domain */
    /* by owner (the spool hands each recipient out with its message's):
     * NULL: any */
    const char *tenant, *campaign, *pool;
    bool deferred_only;
    bool skip_held;     /* leave out failures held for their message's DSN (bounced
                         * already: outbound/outcome.c) */
    uint64_t min_due;   /* deferred_only: those due after this */
    size_t due_soon;    /* deferred_only: those of the scope left out, due before min_due
                         * (the due poll takes them: nothing to flush) */
    struct engine *e;   /* borrowed: set to carry each recipient's owner (bounce) */
    struct sel_item {
        uint64_t id;
        unsigned idx;
        uint64_t last_ms; /* its last outcome when selected (0: none) */
        struct job_owner owner; /* when e is set: the destination (domain, pool) it waits in */
        char domain[256];
    } *v;               /* owned */
    size_t n, cap;
};

static int
walk_select(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct walk_sel *w = arg;
    if (w->domain != NULL && !idn_domain_is(w->domain, r->domain))
        return 0;
    if (w->deferred_only && r->state != QUEUE_RCPT_DEFERRED)
        return 0;
    if (w->skip_held && r->tag == DSN_HELD_TAG)
        return 0;
    if ((w->tenant != NULL && strcasecmp(w->tenant, r->owner.tenant) != 0) ||
        (w->campaign != NULL && strcmp(w->campaign, r->owner.campaign) != 0) ||
        (w->pool != NULL && strcasecmp(w->pool, r->owner.pool) != 0))
        return 0;
    if (w->deferred_only && r->due_ms <= w->min_due) {
        w->due_soon++;
        return 0;
    }
    if (w->n == w->cap) {
        size_t nc = w->cap ? w->cap * 2 : 256;
        struct sel_item *v = realloc(w->v, nc * sizeof(*v));
        if (v == NULL)
            return -ENOMEM;
        w->v = v;
        w->cap = nc;
    }
    struct sel_item *x = &w->v[w->n++];
    x->id = id;
    x->idx = r->index;
    x->last_ms = r->last_ms;
    if (w->e != NULL)
        delivery_owner_of(w->e, &r->owner, &x->owner); /* tls_relaxed: bounce_now's dest */
    else
        memset(&x->owner, 0, sizeof(x->owner));
    /* the destination's name: a domain in U-labels is its A-labels */
    size_t dl = strlen(r->domain);
    if (idn_is_ascii(r->domain, dl) ||
        idn_domain_ascii(r->domain, dl, x->domain, sizeof(x->domain), NULL) < 0)
        snprintf(x->domain, sizeof(x->domain), "%s", r->domain);
    return 0;
}

/* A scope by owner: "tenant=T", "campaign=C" (the rest of the line: a
 * campaign may hold blanks), or "tenant=T campaign=C". Returns 1 when args
 * is such a scope (set in *tenant / *campaign, NULL when not given; both
 * point into buf), 0 when it is not, -1 when it is malformed (err). */
static int
parse_scope(const char *args, char *buf, size_t cap, const char **tenant, const char **campaign,
            const char **pool, char *err, size_t errlen)
{
    *tenant = *campaign = *pool = NULL;
    if (strncmp(args, "pool=", 5) == 0) {
        if (strlen(args) >= cap || !config_name_valid(args + 5, strlen(args + 5))) {
            snprintf(err, errlen, "not a pool name: %.100s", args + 5);
            return -1;
        }
        snprintf(buf, cap, "%s", args + 5);
        *pool = buf;
        return 1;
    }
    if (strncmp(args, "tenant=", 7) != 0 && strncmp(args, "campaign=", 9) != 0)
        return 0;
    if (strlen(args) >= cap) {
        snprintf(err, errlen, "scope too long");
        return -1;
    }
    snprintf(buf, cap, "%s", args);
    char *p = buf;
    if (strncmp(p, "tenant=", 7) == 0) {
        *tenant = p + 7;
        size_t n = strcspn(p + 7, " \t");
        p += 7 + n;
        if (*p != '\0')
            *p++ = '\0';
        while (*p == ' ' || *p == '\t')
            p++;
        if (!config_name_valid(*tenant, strlen(*tenant))) {
            snprintf(err, errlen, "not a tenant name: %.100s", *tenant);
            return -1;
        }
    }
    if (strncmp(p, "campaign=", 9) == 0) {
        *campaign = p + 9;
        p += strlen(p);
        if ((*campaign)[0] == '\0') {
            snprintf(err, errlen, "campaign=: empty");
            return -1;
        }
    }
    if (*p != '\0') {
        snprintf(err, errlen, "expected tenant=NAME [campaign=NAME], got: %.100s", args);
        return -1;
    }
    return 1;
}

/* The domains whose rests a flush ends: every one (all), or n names,
 * lower case, sorted and unique (delivery_lift_holds). */
struct lift_list {
    bool all;
    size_t n;
    char **v; /* owned, each owned */
};

static void
lift_list_free(void *res, unsigned n)
{
    (void)n;
    struct lift_list *l = res;
    if (l == NULL)
        return;
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    free(l);
}

static int
cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The distinct domains of the n selected recipients, or of one domain;
 * NULL without memory. */
static struct lift_list *
lift_list_of(const char *domain, const struct sel_item *v, size_t n)
{
    struct lift_list *l = calloc(1, sizeof(*l));
    if (l == NULL)
        return NULL;
    size_t want = domain != NULL ? 1 : n;
    if (want == 0)
        return l;
    if ((l->v = calloc(want, sizeof(*l->v))) == NULL) {
        free(l);
        return NULL;
    }
    for (size_t i = 0; i < want; i++) {
        char *x = strdup(domain != NULL ? domain : v[i].domain);
        if (x == NULL) {
            lift_list_free(l, 0);
            return NULL;
        }
        for (char *p = x; *p != '\0'; p++)
            *p = (char)tolower((unsigned char)*p);
        l->v[l->n++] = x;
    }
    qsort(l->v, l->n, sizeof(*l->v), cmp_str);
    size_t k = 0;
    for (size_t i = 0; i < l->n; i++) {
        if (k > 0 && strcmp(l->v[k - 1], l->v[i]) == 0)
            free(l->v[i]);
        else
            l->v[k++] = l->v[i];
    }
    l->n = k;
    return l;
}

static void
lift_on_worker(struct engine *e, unsigned w, struct wcall *c)
{
    const struct lift_list *l = c->res;
    unsigned k = delivery_lift_holds(e->dlv[w], l->all, (const char *const *)l->v, l->n);
    pthread_mutex_lock(&c->lock);
    c->total += k;
    pthread_mutex_unlock(&c->lock);
}

/* Every worker ends the rests of l's domains (owned by the call from
 * here). Returns the destinations that were resting, or -1 when a worker
 * did not answer in time (its rests end all the same) or without memory. */
static long long
lift_holds(struct engine *e, struct lift_list *l)
{
    struct wcall *c = l != NULL ? wcall_new(e, lift_on_worker) : NULL;
    if (c == NULL) {
        lift_list_free(l, 0);
        return -1;
    }
    c->res = l;
    c->res_free = lift_list_free;
    int rc = wcall_run(c, -1);
    pthread_mutex_lock(&c->lock);
    long long total = (long long)c->total;
    pthread_mutex_unlock(&c->lock);
    wcall_unref(c);
    return rc < 0 ? -1 : total;
}

/* The retimes of a flush in flight: FLUSH_WINDOW requests of FLUSH_BATCH
 * through one port, so that a commit (and its sync) carries several; one
 * at a time, a flush of a million recipients waited for a thousand syncs
 * (40 s on a loaded machine). */
struct flush_run;
struct flush_slot {
    struct flush_run *run;
    size_t k; /* recipients in the request; 0: the slot is free */
};
struct flush_run {
    int rc;      /* the first failure */
    size_t done; /* recipients retimed */
    unsigned inflight;
    uint64_t cut_at; /* clock_mono_ms: the stop's grace for the answers in flight ends */
    struct flush_slot slot[FLUSH_WINDOW];
};

static void
flush_batch_done(void *cookie, int rc)
{
    struct flush_slot *s = cookie;
    if (rc == 0)
        s->run->done += s->k;
    else if (s->run->rc == 0)
        s->run->rc = rc;
    s->k = 0;
    s->run->inflight--;
}

/* Wait for port's next answers. Once the stop has begun (engine_stop)
 * the requests in flight have FLUSH_STOP_GRACE_MS more, counted once
 * from the first wait that saw it: a spool that answers does so in
 * milliseconds; one that does not (a dead disk) held the stop here, in
 * ops_stop (stage=stats), before any worker was told to stop, until the
 * stop's last bound gave it up. False when that grace ran out. */
static bool
flush_wait(struct engine *e, struct queue_port *port, struct flush_run *run)
{
    for (;;) {
        int ms = 1000;
        if (atomic_load(&e->stopping)) {
            uint64_t now = clock_mono_ms();
            if (run->cut_at == 0)
                run->cut_at = now + FLUSH_STOP_GRACE_MS;
            if (now >= run->cut_at)
                return false;
            ms = run->cut_at - now < 1000 ? (int)(run->cut_at - now) : 1000;
        }
        int rc = queue_port_wait(port, ms);
        if (rc > 0)
            return true;
        if (rc < 0 && rc != -EINTR && queue_port_pending(port) == 0) {
            if (run->rc == 0)
                run->rc = rc;
            return true;
        }
    }
}

/* Move the time of w's n recipients to due_ms; returns 0 or the first
 * failure, *done the recipients moved (those before the failure, and
 * any other request that went in). The stop beginning submits no more:
 * -ECANCELED once those in flight are answered; when the spool does not
 * answer them (flush_wait), the port is left to the exit (the spool's
 * answers would come to it; their callbacks, never run, point into this
 * frame). */
static int
flush_retime(struct engine *e, const struct walk_sel *w, uint64_t due_ms, size_t *done)
{
    struct flush_run run = {0};
    for (unsigned s = 0; s < FLUSH_WINDOW; s++)
        run.slot[s].run = &run;
    struct queue_outcome *qo = calloc(FLUSH_BATCH, sizeof(*qo));
    struct queue_port *port = qo != NULL ? queue_port_new() : NULL;
    if (port == NULL) {
        free(qo);
        *done = 0;
        return -ENOMEM;
    }
    bool stopped = false;
    for (size_t i = 0; i < w->n && run.rc == 0;) {
        while (run.inflight == FLUSH_WINDOW && run.rc == 0)
            if (!flush_wait(e, port, &run))
                goto cut;
        if (run.rc != 0)
            break;
        if (atomic_load(&e->stopping)) {
            stopped = true;
            break;
        }
        struct flush_slot *slot = NULL;
        for (unsigned s = 0; s < FLUSH_WINDOW && slot == NULL; s++)
            if (run.slot[s].k == 0)
                slot = &run.slot[s];
        size_t k = w->n - i < FLUSH_BATCH ? w->n - i : FLUSH_BATCH;
        for (size_t j = 0; j < k; j++)
            qo[j] = (struct queue_outcome){.id = w->v[i + j].id, .rcpt = w->v[i + j].idx,
                                           .kind = QUEUE_RETIME, .due_ms = due_ms};
        slot->k = k;
        run.inflight++;
        int rc = queue_update(e->queue, port, qo, k, flush_batch_done, slot);
        if (rc < 0) { /* not submitted: its callback never runs */
            slot->k = 0;
            run.inflight--;
            run.rc = rc;
            break;
        }
        i += k;
    }
    while (run.inflight > 0 && queue_port_pending(port) > 0) /* every callback, first */
        if (!flush_wait(e, port, &run))
            goto cut;
    queue_port_free(port);
    free(qo);
    *done = run.done;
    if (stopped && run.rc == 0) {
        log_msg(LOG_WARN, "event=flush_cut recipients=%zu retimed=%zu note=stopping", w->n,
                run.done);
        return -ECANCELED;
    }
    return run.rc;
cut:
    log_msg(LOG_WARN,
            "event=flush_cut recipients=%zu retimed=%zu requests=%u "
            "note=stopping_spool_not_answering",
            w->n, run.done, queue_port_pending(port));
    free(qo); /* copied by queue_update */
    *done = run.done;
    return -ECANCELED;
}

/* flush [DOMAIN]: first the rests the selected mail's destinations wait
 * on end (delivery_lift_holds): of every destination for a flush of all,
 * of the domain's, or of the selected recipients' domains for a tenant,
 * campaign or pool (their domains' other mail goes too, and a rest is a
 * site's: its other domains' as well); they end even when the spool then
 * refuses the retime. Then the deferred recipients are due now: their
 * time in the spool moves (QUEUE_RETIME: attempts and last reply kept)
 * and the due poll takes them within a second, as it takes any: nothing
 * is submitted from here, so nothing can be in flight twice (the poll
 * takes from the spool's time index only what is still in it). Those due
 * within two seconds are left as they are. */
static int
cmd_flush(struct engine *e, const char *domain, struct json *out, char *err, size_t errlen)
{
    char scope[512];
    const char *tenant, *campaign, *pool;
    int by_owner =
        parse_scope(domain, scope, sizeof(scope), &tenant, &campaign, &pool, err, errlen);
    if (by_owner < 0)
        return -1;
    if (by_owner)
        domain = "";
    if (domain[0] != '\0' && !domain_arg_ok(domain)) {
        snprintf(err, errlen, "not a domain name: %.100s", domain);
        return -1;
    }
    uint64_t now = clock_unix_ms();
    struct walk_sel w = {.domain = domain[0] ? domain : NULL, .deferred_only = true,
                         .skip_held = true, /* no retry: they failed */
                         .min_due = now + 2000, .tenant = tenant, .campaign = campaign,
                         .pool = pool};
    int rc = queue_walk(e->queue, walk_select, &w);
    if (rc < 0) {
        free(w.v);
        snprintf(err, errlen, "cannot read the spool: %s", queue_strerror(rc));
        return -1;
    }
    /* The rests end first, then the recipients come due: one the due
     * poll took while its destination still rested would be deferred
     * again at once, with the failure the rest keeps (scheduler.c), for
     * the next step of its schedule (two thirds of an outage's queue
     * were, and waited five more minutes). A scope that selects nobody
     * ends no rest. */
    bool all = !by_owner && domain[0] == '\0';
    long long lifted = 0;
    if (all || w.n > 0 || domain[0] != '\0') {
        struct lift_list *l =
            all ? calloc(1, sizeof(*l)) : lift_list_of(domain[0] ? domain : NULL, w.v, w.n);
        if (all && l != NULL)
            l->all = true;
        lifted = lift_holds(e, l);
    }
    size_t done = 0;
    rc = flush_retime(e, &w, now + 1, &done);
    free(w.v);
    log_msg(LOG_NOTICE,
            "event=flush domain=%s tenant=%s campaign=\"%s\" pool=%s recipients=%zu "
            "already_due=%zu rests_ended=%lld",
            domain[0] ? domain : "*", tenant ? tenant : "*", campaign ? campaign : "*",
            pool ? pool : "*", done, w.due_soon, lifted);
    if (rc == -ECANCELED) {
        snprintf(err, errlen, "flushed %zu of %zu, then sluice stopped: the rest stay deferred",
                 done, w.n);
        return -1;
    }
    if (rc != 0) {
        snprintf(err, errlen, "flushed %zu, then the spool refused: %s", done, queue_strerror(rc));
        return -1;
    }
    json_obj_begin(out);
    json_kstr(out, "domain", domain[0] ? domain : NULL);
    if (tenant != NULL)
        json_kstr(out, "tenant", tenant);
    if (campaign != NULL)
        json_kstr(out, "campaign", campaign);
    if (pool != NULL)
        json_kstr(out, "pool", pool);
    json_ku64(out, "recipients", done);
    json_ku64(out, "already_due", w.due_soon);
    if (lifted >= 0)
        json_ku64(out, "rests_ended", (uint64_t)lifted);
    json_obj_end(out);
    return 0;
}

/* Sleep ms, BOUNCE_POLL_MS at a time, until the stop begins: engine_stop
 * sets e->stopping and wakes no one, so it is looked at between the
 * steps (ops_stop, the stop's next step, waits for this command). */
static void
bounce_nap(struct engine *e, uint64_t ms)
{
    uint64_t end = clock_mono_ms() + ms;
    for (uint64_t now = clock_mono_ms(); now < end && !atomic_load(&e->stopping);
         now = clock_mono_ms()) {
        uint64_t step = end - now < BOUNCE_POLL_MS ? end - now : BOUNCE_POLL_MS;
        struct timespec ts = {0, (long)step * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* Wait until the bounced recipients of w (kept in w->v) have left the
 * spool, deadline_ms (Unix ms) passes or the stop begins (*stopped: it
 * came with some left). One still there with another last outcome than
 * when selected was decided by a transaction under way (bounce_now
 * leaves those alone: deferred, it waits on) and is not waited for. The
 * workers commit a bounce as any outcome, in their group commits, and
 * tell no one: the spool is what says it is done. Returns how many of
 * w's recipients are still in the spool (those not looked at before the
 * end included); w->v is reused. */
static size_t
bounce_wait(struct engine *e, struct walk_sel *w, uint64_t deadline_ms, bool *stopped)
{
    size_t left = w->n, decided = 0;
    *stopped = false;
    for (;;) {
        uint64_t round = clock_mono_ms();
        size_t m = 0;
        for (size_t i = 0; i < left;) {
            size_t k = i;
            while (k < left && w->v[k].id == w->v[i].id)
                k++;
            if (clock_unix_ms() >= deadline_ms || atomic_load(&e->stopping)) {
                /* not looked at in time: not known to be done */
                memmove(&w->v[m], &w->v[i], (left - i) * sizeof(w->v[0]));
                m += left - i;
                break;
            }
            struct queue_envelope *env = NULL;
            int rc = queue_envelope_get(e->queue, w->v[i].id, &env);
            for (size_t x = i; x < k; x++) {
                /* a read that failed: not known to be done */
                bool there = rc != QUEUE_ENOTFOUND, same = rc != 0;
                for (unsigned r = 0; rc == 0 && r < env->nrcpt && !same; r++)
                    if (env->rcpt[r].index == w->v[x].idx) {
                        same = env->rcpt[r].last_ms == w->v[x].last_ms;
                        decided += !same;
                    }
                there &= rc != 0 || same;
                if (there)
                    w->v[m++] = w->v[x];
            }
            queue_envelope_free(env);
            i = k;
        }
        left = m;
        uint64_t now = clock_unix_ms();
        bool stop = atomic_load(&e->stopping);
        if (left == 0 || now >= deadline_ms || stop) {
            *stopped = stop && left > 0;
            return left + decided;
        }
        /* as long as the look took, at least: a mass bounce's many
         * envelopes are read at most half the time, the commits go on */
        round = clock_mono_ms() - round;
        uint64_t ms = round > BOUNCE_POLL_MS ? round : BOUNCE_POLL_MS;
        if (ms > deadline_ms - now)
            ms = deadline_ms - now;
        bounce_nap(e, ms);
    }
}

/* bounce ID|DOMAIN: the recipients fail now, with an event each; the
 * answer waits for their commits (bounce_wait). A stop that cuts the
 * wait short is an error that counts those not known to be committed:
 * the workers may stop before they commit them, and those go out at the
 * next start as if never bounced (as flush's "then sluice stopped"). */
static int
cmd_bounce(struct engine *e, const char *what, struct json *out, char *err, size_t errlen)
{
    uint64_t id = 0;
    uint64_t deadline = clock_unix_ms() + BOUNCE_WAIT_MS;
    /* each recipient with its owner: the bounce must reach the queue of
     * its pool's destination, where it may wait */
    struct walk_sel w = {.e = e, .skip_held = true};
    char scope[512];
    const char *tenant, *campaign, *pool;
    int by_owner = parse_scope(what, scope, sizeof(scope), &tenant, &campaign, &pool, err, errlen);
    if (by_owner < 0)
        return -1;
    if (by_owner) {
        w.tenant = tenant;
        w.campaign = campaign;
        w.pool = pool;
        int rc = queue_walk(e->queue, walk_select, &w);
        if (rc < 0) {
            free(w.v);
            snprintf(err, errlen, "cannot read the spool: %s", queue_strerror(rc));
            return -1;
        }
    } else if (queue_id_parse(what, &id) == 0) {
        struct queue_envelope *env = NULL;
        int rc = queue_envelope_get(e->queue, id, &env);
        if (rc != 0) {
            snprintf(err, errlen, "no message %s in the spool", what);
            return -1;
        }
        for (unsigned i = 0; i < env->nrcpt; i++) {
            struct queue_rcpt r = env->rcpt[i];
            r.owner = (struct queue_owner){env->tenant ? env->tenant : "",
                                           env->campaign ? env->campaign : "",
                                           env->pool ? env->pool : "", env->priority,
                                           env->tls_relaxed};
            walk_select(&w, id, &r);
        }
        queue_envelope_free(env);
    } else if (domain_arg_ok(what)) {
        w.domain = what;
        int rc = queue_walk(e->queue, walk_select, &w);
        if (rc < 0) {
            free(w.v);
            snprintf(err, errlen, "cannot read the spool: %s", queue_strerror(rc));
            return -1;
        }
        if (w.n == 0 && strchr(what, '.') == NULL) {
            /* a mistyped queue id reads as a dotless domain: "0 bounced"
             * would tell the operator it was done */
            free(w.v);
            snprintf(err, errlen, "no queue id %.100s, and no mail queued for it as a domain",
                     what);
            return -1;
        }
    } else {
        snprintf(err, errlen, "neither a queue id, a domain nor tenant=/campaign=/pool=: %.100s",
                 what);
        return -1;
    }
    /* Each worker fails its domains' recipients as it fails any: spool,
     * logs, DSN to the sender. Grouped per message and domain. */
    size_t done = 0;
    for (size_t i = 0; i < w.n;) {
        unsigned idx[256], n = 0;
        size_t k = i;
        while (k < w.n && n < 256 && w.v[k].id == w.v[i].id &&
               strcmp(w.v[k].domain, w.v[i].domain) == 0)
            idx[n++] = w.v[k++].idx;
        delivery_submit_bounce(e, w.v[i].id, w.v[i].domain, idx, n, &w.v[i].owner);
        done += n;
        i = k;
    }
    bool stopped;
    size_t still = bounce_wait(e, &w, deadline, &stopped);
    log_msg(stopped ? LOG_WARN : LOG_NOTICE,
            "event=operator_bounce what=%s recipients=%zu still_queued=%zu%s", what, done, still,
            stopped ? " note=stopping" : "");
    free(w.v);
    if (stopped) {
        snprintf(err, errlen,
                 "bounced %zu, then sluice stopped: %zu of them still queued or not known "
                 "to be committed (any still queued at the next start: bounce again)",
                 done, still);
        return -1;
    }
    json_obj_begin(out);
    json_ku64(out, "recipients", done);
    json_ku64(out, "still_queued", still);
    json_obj_end(out);
    return 0;
}

/* dsn_held: failed, or delivered asking for a success report, its DSN
 * waiting for the rest of its message (it goes at next_attempt at the
 * latest) */
static const char *
state_str(const struct queue_rcpt *r)
{
    return r->tag == DSN_HELD_TAG ? "dsn_held"
           : r->state == QUEUE_RCPT_DEFERRED ? "deferred"
                                              : "ready";
}

/* One message of the spool and its recipients, as "message" and "queue"
 * show it. */
static void
message_json(struct json *out, const struct queue_envelope *env)
{
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(env->id, qid);
    json_obj_begin(out);
    json_kstr(out, "id", qid);
    json_kstr(out, "sender", env->sender);
    json_key(out, "arrival");
    json_time_ms(out, env->arrival_ms);
    uint64_t now_ms = clock_unix_ms(); /* a wall clock stepped back: age 0, not 2^64 - x */
    json_ku64(out, "age_ms", now_ms > env->arrival_ms ? now_ms - env->arrival_ms : 0);
    json_ku64(out, "size", env->body_len);
    if (env->expire_ms != 0) {
        json_key(out, "expires");
        json_time_ms(out, env->expire_ms);
    }
    json_kstr(out, "auth_user", env->auth_user);
    json_kstr(out, "client", env->client_addr);
    json_kstr(out, "tenant", env->tenant);
    json_kstr(out, "campaign", env->campaign);
    json_kstr(out, "pool", env->pool);
    json_ku64(out, "priority", env->priority);
    json_key(out, "recipients");
    json_arr_begin(out);
    for (unsigned i = 0; i < env->nrcpt; i++) {
        const struct queue_rcpt *r = &env->rcpt[i];
        json_obj_begin(out);
        json_kstr(out, "rcpt", r->addr);
        json_kstr(out, "domain", r->domain);
        json_kstr(out, "state", state_str(r));
        json_ku64(out, "attempts", r->attempts);
        if (r->due_ms != 0) {
            json_key(out, "next_attempt");
            json_time_ms(out, r->due_ms);
        }
        if (r->last_code != 0 || (r->last_reply && r->last_reply[0])) {
            /* code 0: no SMTP reply (connect refused, timeout, TLS); the
             * text is ours, and there is no code to show */
            json_key(out, "last_code");
            if (r->last_code != 0)
                json_u64(out, r->last_code);
            else
                json_null(out);
            json_kstr(out, "last_reply", r->last_reply);
        }
        json_obj_end(out);
    }
    json_arr_end(out);
    json_obj_end(out);
}

/* "queue [N] [DOMAIN]": the first N messages of the spool (oldest
 * first, by queue id; default 100, at most QUEUE_LIST_MAX), or the first
 * N with a recipient at DOMAIN, each with its recipients, as mailq lists
 * Postfix's queue. The walk stops at the Nth message; with a domain it
 * reads as far as it must. The answer stops at the first message that
 * starts past QUEUE_LIST_BYTES of them ("cut"). */
struct qlist {
    uint64_t *ids; /* owned */
    size_t n, cap;
    const char *domain; /* NULL: any */
};

static int
qlist_add(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct qlist *l = arg;
    if (l->n > 0 && l->ids[l->n - 1] == id)
        return 0;
    if (l->domain != NULL && !idn_domain_is(l->domain, r->domain))
        return 0;
    if (l->n == l->cap)
        return 1; /* enough */
    l->ids[l->n++] = id;
    return 0;
}

static int
cmd_queue(struct engine *e, const char *args, struct json *out, char *err, size_t errlen)
{
    /* one N and one DOMAIN at most, in either order: a second of either
     * was taken for the first, silently (queue 5 10 listed 10 messages,
     * queue a.example b.example those at b.example) */
    char a[3][256] = {"", "", ""};
    int na = sscanf(args, "%255s %255s %255s", a[0], a[1], a[2]);
    unsigned long n = 100;
    const char *domain = NULL;
    bool have_n = false;
    for (int k = 0; k < na; k++) {
        char *end;
        unsigned long v = strtoul(a[k], &end, 10);
        bool num = *end == '\0' && a[k][0] >= '0' && a[k][0] <= '9';
        if (k == 2 || (num && have_n) || (!num && domain != NULL)) {
            snprintf(err, errlen, "usage: queue [N] [DOMAIN]");
            return -1;
        }
        if (num) {
            n = v;
            have_n = true;
        } else if (!domain_arg_ok(a[k])) {
            snprintf(err, errlen, "queue: not a domain name: %.100s", a[k]);
            return -1;
        } else {
            domain = a[k];
        }
    }
    if (n == 0 || n > QUEUE_LIST_MAX) {
        snprintf(err, errlen, "queue: N from 1 to %u", QUEUE_LIST_MAX);
        return -1;
    }
    struct qlist l = {.ids = calloc(n, sizeof(uint64_t)), .cap = n, .domain = domain};
    if (l.ids == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int rc = queue_walk(e->queue, qlist_add, &l);
    if (rc < 0) {
        snprintf(err, errlen, "spool: %s", queue_strerror(rc));
        free(l.ids);
        return -1;
    }
    json_obj_begin(out);
    if (domain != NULL)
        json_kstr(out, "domain", domain);
    json_key(out, "messages");
    json_arr_begin(out);
    size_t start = out->len;
    bool cut = false;
    for (size_t i = 0; i < l.n; i++) {
        if (out->len - start >= QUEUE_LIST_BYTES) {
            cut = true; /* the answer's size cap: the rest stays unlisted */
            break;
        }
        struct queue_envelope *env = NULL;
        if (queue_envelope_get(e->queue, l.ids[i], &env) != 0)
            continue; /* delivered meanwhile */
        message_json(out, env);
        queue_envelope_free(env);
    }
    json_arr_end(out);
    json_kbool(out, "more", rc == 1 || cut);
    json_kbool(out, "cut", cut);
    json_obj_end(out);
    free(l.ids);
    return 0;
}

static int
cmd_message(struct engine *e, const char *what, struct json *out, char *err, size_t errlen)
{
    uint64_t id;
    if (queue_id_parse(what, &id) != 0) {
        snprintf(err, errlen, "not a queue id: %.100s", what);
        return -1;
    }
    struct queue_envelope *env = NULL;
    if (queue_envelope_get(e->queue, id, &env) != 0) {
        snprintf(err, errlen, "no message %s in the spool (delivered, bounced or never queued)",
                 what);
        return -1;
    }
    message_json(out, env);
    queue_envelope_free(env);
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
         * Linux gives the lowest-numbered pending signal first). */
        uint64_t gen = engine_reload_gen(e);
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
    ops = (struct stats_ops){.arg = e, .counters = ops_counters_in, .domains = ops_domains_in,
                             .command = ops_command_in};
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
