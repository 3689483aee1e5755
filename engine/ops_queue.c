/*
 * ops_queue: the stats socket's commands on the mail in the spool (see
 * ops_int.h): "message" and "queue" read it; "flush" retimes deferred
 * recipients to now (and lifts the holds on their destinations, on the
 * workers), waiting for the spool's answers; "bounce" hands recipients
 * to the workers that own their destinations, which bounce them as any
 * outcome, and waits until the spool shows them done. Both waits end
 * when the stop begins (e->stopping), with an answer that says so.
 *
 * Threading: the stats command thread (one command at a time); the
 * *_on_worker functions on each worker. The spool is read directly (its
 * API is thread-safe).
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "common/clock.h"
#include "common/conf.h"
#include "common/idn.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/delivery.h"
#include "engine/dsn.h"
#include "engine/engine.h"
#include "engine/ops_int.h"
#include "queue/queue.h"

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
int
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
 * came with some left). One held there for its message's DSN (dsn_wait)
 * is done as one gone is. One still there with another last outcome than
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
                        /* held for its message's DSN (none was when
                         * selected, skip_held): failed, by this bounce or
                         * a transaction's, or relayed; done, not queued */
                        bool held = env->rcpt[r].tag == DSN_HELD_TAG;
                        same = !held && env->rcpt[r].last_ms == w->v[x].last_ms;
                        decided += !same && !held;
                        break;
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
int
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
            /* a held one's: the server's reply, not the DSN entry the
             * spool keeps in front of it */
            json_kstr(out, "last_reply",
                      r->tag == DSN_HELD_TAG ? delivery_held_reply(r) : r->last_reply);
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

int
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

int
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
