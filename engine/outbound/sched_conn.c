/*
 * sched_conn: connections, as the scheduler sees them, on one worker (see
 * internal.h for the other files; outbound/scheduler.c opens them).
 *
 * A connection opened for a destination is counted as the domain's and
 * its site's (sched_conn_attach), and carries at most the lowest of the
 * caps on its transactions and recipients (sched_conn_max_msgs,
 * sched_conn_max_rcpt).
 *
 * A connection ready for a transaction asks sched_conn_next() for its job:
 * one of its domain, or else (none, or none its domain's message rate lets
 * go now) one of another domain of its site that waits (MX rollup), the
 * connection moving there with its lease; else it goes
 * idle on its site or says goodbye. A transaction takes a message token
 * of its domain's key, then of the connection's [mx], [source] and
 * shaping keys; when one refuses, those the keys before it gave go back
 * (limits_give_msgs), so a refusal costs no other key its rate, and so
 * do all four when the job does not go after all (parked, shaped, or its
 * source's warm-up allowance spent). A
 * domain with mail left gives the connection to a domain of the site
 * waiting in line when it holds more of the site's connections and that
 * one has had fewer of the site's turns, or as many with older mail
 * (site_share.c conn_give_turn; at once to one holding two fewer, and
 * with [redis] after SITE_TURN_MS to one holding one fewer), so one
 * domain's backlog does not keep the site's connections from the
 * others, and the site's mail goes in the order it came in where it
 * came in turn across its domains. A job that an MX
 * host refused for a lack of its own (policy_host) is passed over by the
 * connections to that host and carried by one opened to another
 * (detour_pass, detour_take). When a
 * transaction or a connection ends, the site's window and the destination's failover cursor learn of
 * it (sched_txn_done, sched_conn_event, sched_conn_detach) and whatever
 * waits for a slot runs. A transaction lost at its first command on a
 * reused connection (the receiver's idle close crossing it:
 * policy_reuse_lost) puts its job back first for another connection,
 * and the window and the destination learn nothing from it.
 *
 * Nothing here calls out through d->ops: tests/unit/test_scheduler.c
 * drives it, with scheduler.c, from scripted connection results.
 *
 * Threading: the worker's thread.
 */
#include <stdlib.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/netaddr.h"
#include "engine/outbound/internal.h"
#include "engine/warmup.h"

/* ---- what connections tell the scheduler ---- */

/* The site's window learns of a refusal, timeout, reset or 421, once per
 * connection. */
static void
sched_conn_congested(struct conn *c, const char *why)
{
    struct site *s = c->site;
    if (c->congested)
        return;
    c->congested = true;
    s->failures++;
    if (!site_window_on_failure(&s->win, c->epoch))
        return;
    s->shrinks++;
    log_msg(LOG_NOTICE, "conn=%llx event=site_window_down site=%s addr=%s reason=%s window=%u",
            (unsigned long long)c->id, s->key, c->addr_str, why, site_window_allowed(&s->win));
}

/* ---- connections, as the scheduler sees them ---- */

/* o is t's last failure, at c's MX host and address, under c's TLS. */
static void
conn_fail_keep(const struct conn *c, struct dest *t, const struct smtp_outcome *o)
{
    if (!policy_site_failure(o))
        t->own_failed = true; /* the domain's own TLS policy, not the host */
    dest_last_fail_set(t, o, c->mx, c->addr_str);
    if (t->last_fail != NULL)
        conn_fail_note(c, t->last_fail);
}

/* The smaller of two caps, 0 meaning none. */
static unsigned
lower(unsigned a, unsigned b)
{
    return a == 0 ? b : b == 0 ? a : a < b ? a : b;
}

unsigned
sched_conn_max_msgs(const struct conn *c)
{
    unsigned m = c->dest->pol->max_messages_per_connection;
    if (c->mxk != NULL && c->mxk->pol != NULL)
        m = lower(m, c->mxk->pol->max_messages_per_connection);
    if (c->srck != NULL && c->srck->pol != NULL)
        m = lower(m, c->srck->pol->max_messages_per_connection);
    /* The server's LIMITS MAILMAX (RFC 9422), learnt at EHLO: a
     * transaction past it is refused, and its recipients would be
     * deferred along the retry schedule for nothing. */
    const struct smtp_ehlo *caps = smtp_client_caps(&c->cli);
    if (caps != NULL)
        m = lower(m, caps->mail_max);
    return m;
}

unsigned
sched_conn_max_rcpt(const struct conn *c)
{
    return lower(c->dest->pol->max_rcpt_per_txn,
                 lower(c->mxk && c->mxk->pol ? c->mxk->pol->max_rcpt_per_txn : 0,
                       c->srck && c->srck->pol ? c->srck->pol->max_rcpt_per_txn : 0));
}

void
sched_conn_attach(struct conn *c, struct dest *t, const struct dns_mx_host *host,
                  const union dns_addr *addr, const struct mx_policy *src, uint32_t src_id)
{
    struct delivery *d = t->d;
    c->d = d;
    c->dest = t;
    c->src = src;
    c->src_id = src_id;
    c->id = ((uint64_t)d->w->id << 56) | ++d->conn_seq;
    dest_addr_port(t, addr, &c->addr);
    netaddr_str(&c->addr.sa, c->addr_str, sizeof(c->addr_str));
    /* host is of t's answer: a reference keeps its name for the logs
     * and TLS while the connection lives (it may move to other domains
     * of the site, and t may be resolved again meanwhile). */
    c->answer = dns_mx_result_ref(t->mx);
    c->mx = host->name;
    c->slot = d->slot_taken; /* taken by dest_address_room() */
    d->slot_taken = NULL;
    c->site = t->site;
    c->site->refs++;
    struct site_source *ss = src != NULL ? site_source(c->site, src_id) : NULL;
    if (ss != NULL)
        ss->conns++;
    source_count(d, src_id)->connections++;
    c->site->conns++;
    c->site->opened++;
    c->epoch = c->site->win.epoch;
    c->opened_ns = d->w->now;
    c->tls_pol = dest_tls_key(t, host->name);
    t->conns++;
    t->opening++;
    dest_sweep_arm(t); /* its waiting jobs expire on time while it opens */
    d->stats.open++;
    d->stats.connections++;
    c->next_all = d->all;
    if (d->all)
        d->all->prev_all = c;
    d->all = c;
}

/* Does this worker hold more connections of key k ([mx] or [source])
 * than its max_connections lets it keep (a reload lowered it), those
 * told to end already aside? Without [redis], what it may keep beside
 * the node's other workers (limits_key_over: past its floor while the
 * workers below theirs want more than the slots left, one fewer than it
 * holds; so its connections give their slots back one by one, each
 * after its transaction); with it the whole cap, against this worker's own
 * count only, or those Redis counts beyond it across the nodes
 * (limits_key_excess: opened on local shares during an outage); never
 * the smaller local share of a Redis outage, which refuses new
 * connections but ends none. */
static bool
key_over_cap(const struct mxkey *k, uint64_t now)
{
    return k != NULL && limits_key_over(&k->lim, k->quitting, now);
}

/* Jobs looked at past the ones c's MX host refused (detour_pass), or
 * for a detour's connection at the head of each tenant (detour_take). */
#define DETOUR_LOOK 4

/* Is a connection of t on its way for j, a job passed over: one that
 * ends to make room for a detour's, or a detour's to a host that did not
 * refuse j (the last one opened)? */
static bool
detour_coming(const struct dest *t, const struct job *j)
{
    if (t->detour_yield)
        return true;
    if (t->detour_conns == 0)
        return false;
    for (unsigned i = 0; i < j->nrefused; i++)
        if (j->refused_h[i] == t->detour_h)
            return false;
    return true;
}

/* j, popped from t for c (before any rate token is taken: none is spent
 * on a job passed over): a job that c's MX host refused in this attempt
 * for a lack of its own (policy_host) goes back first while
 * policy_host_pass() says so, and the next one is taken (a few at most);
 * t's next connection goes to another host (its cursor moved there until
 * it opens), t runs soon to open it, and resumes no idle connection to
 * c's host meanwhile (detour_wait). A pass counts against the job's
 * budget only while no connection is on its way for it (detour_coming):
 * not for the passes of t's other connections while one opens. When t
 * may open none (its max_connections, its site's window), c ends to
 * make room (*yield), one connection at a time. Once policy_host_pass()
 * says no more, the job goes to c, is refused again, and deferred
 * (policy_host). */
static struct job *
detour_pass(struct conn *c, struct dest *t, struct job *j, bool *yield)
{
    struct job *aside[DETOUR_LOOK];
    unsigned n = 0;
    *yield = false;
    while (j != NULL && job_refused_by(j, c->mx) &&
           policy_host_pass(j->detour_skips, t->failed_addrs != 0, dest_elsewhere_up(t, j))) {
        bool coming = detour_coming(t, j);
        if (!coming)
            j->detour_skips++; /* nothing on its way for it: counted */
        if (!t->detour_cursor && !coming)
            (void)dest_cursor_past(t, j); /* t's next connection goes where j may */
        aside[n++] = j;
        j = n < DETOUR_LOOK ? dest_pop(t) : NULL;
    }
    if (n > 0) {
        while (n > 0)
            dest_push(t, aside[--n], true);
        t->detour_wait = true;
        t->detour_not_h = job_host_h(c->mx);
        if (t->detour_conns == 0 && !t->detour_yield && detour_no_room(t)) {
            t->detour_yield = true;
            c->detour_yield = true;
            *yield = true;
        }
        dest_lim_wait(t, t->d->w->now);
    } else if (j != NULL && t->detour_wait) {
        /* a job of t that no host refused is taken (by a connection to
         * another host, or none waits at the head any more: it went,
         * expired, was bounced): the idle connections to the host passed
         * over carry t's backlog again (one that meets a waiting job
         * passes it over again, and says so again) */
        t->detour_wait = false;
        dest_lim_wait(t, t->d->w->now);
    }
    return j;
}

/* Tenants and jobs of each a detour's connection looks at (detour_take). */
#define DETOUR_TENANTS 64

/* A job for c, a connection opened for a detour: the first that another
 * MX host refused and c's did not, taken out where it waits, found by a
 * walk of t's queue in its serving order (DETOUR_LOOK jobs at the head of
 * each of DETOUR_TENANTS tenants at most, up to the last such job): none
 * is popped and put back, which would spend the turns of the tenants
 * before it (deficit round-robin) and, were it behind four of them, never
 * find it. NULL when none (c idles for the next: t's other mail is for
 * the MX host it prefers, not the one after it). One that c's host
 * refused too (a third MX host is left) is passed over as detour_pass
 * does, and *own says so: c ends then, for a connection to that host at
 * the cursor (resumed idle, it would keep t's run from opening one). */
static struct job *
detour_take(struct conn *c, struct dest *t, bool *own)
{
    *own = false;
    struct job *j = NULL;
    struct fairq_iter it;
    fairq_iter_init(&t->q, &it);
    bool any = false;
    uint32_t tenant = 0; /* whose jobs the walk is at */
    unsigned seen = 0, tenants = 0, k = 0;
    for (struct fairq_node *x; seen < t->refused_queued && (x = fairq_iter_next(&it)) != NULL;) {
        if (!any || it.tenant != tenant) {
            if (++tenants > DETOUR_TENANTS)
                break;
            any = true;
            tenant = it.tenant;
            k = 0;
        }
        if (k++ >= DETOUR_LOOK) {
            fairq_iter_next_tenant(&it);
            continue;
        }
        struct job *y = job_of(x);
        if (y->nrefused == 0)
            continue;
        seen++;
        if (job_refused_by(y, c->mx) &&
            policy_host_pass(y->detour_skips, t->failed_addrs != 0, dest_elsewhere_up(t, y))) {
            y->detour_skips++;
            if (!t->detour_cursor)
                (void)dest_cursor_past(t, y);
            *own = true;
            continue;
        }
        /* refused elsewhere, or here too and no more passes: refused
         * again here, and deferred (policy_host) */
        fairq_iter_remove(&it);
        dest_unqueued(t, y->n);
        dest_refused_gone(t, y);
        j = y;
        break;
    }
    if (j != NULL && t->refused_queued == 0 && t->detour_cursor) {
        /* none waits for another host now: t's next connection goes
         * where its cursor was (unless an address failed meanwhile) */
        t->detour_cursor = false;
        if (t->failed_addrs == 0)
            t->next_addr = t->detour_from;
    }
    return j;
}

/* The message tokens the first n of a transaction's keys granted (keys[i]
 * NULL: none), given back: another key refused its own, or the job did
 * not go after all. */
static void
give_back(struct delivery *d, struct limit_key *const keys[4], struct limit_grant g[4],
          unsigned n)
{
    /* Last taken first, as an undo goes: were two of the keys ever one
     * (their prefixes keep them apart today), each take is undone against
     * the state it left. */
    for (unsigned i = n; i-- > 0;)
        if (keys[i] != NULL)
            limits_give_msgs(d->lim, keys[i], &g[i], 1);
}

struct job *
sched_conn_next(struct conn *c, unsigned *moves, enum sched_next *what)
{
    struct delivery *d = c->d;
    struct dest *t = c->dest;
    if (!c->ready_once) {
        c->ready_once = true;
        t->opening--;
        t->failed_addrs = 0; /* this address works */
        t->own_failed = false;
        if (c->site != NULL) {
            c->site->greeting_421s = 0;
            site_window_on_ready(&c->site->win, d->w->now - c->opened_ns);
            site_addr_up(c->site, &c->addr);
        }
    }
    /* An [mx] section that a reload added after c opened: c holds no
     * lease of its key, so neither its cap nor its rates saw c, which
     * carried mail past them for as long as it flowed. c takes a lease
     * now (no connection-rate token: it is open), or ends; with [redis]
     * the lease is asked for and c ends meanwhile (once). Not on a
     * idle list here: conn_idle_push links c to the key it has then. */
    if (c->mxk == NULL) {
        struct mxkey *mk = dest_mxkey(t);
        uint64_t retry_at;
        if (mk != NULL && !limits_lease_acquire(d->lim, &mk->lim, d->w->now, &retry_at)) {
            c->quit_why = "max_connections";
            *what = SCHED_NEXT_QUIT;
            return NULL;
        }
        c->mxk = mk;
    }
    /* Over the domain's max_connections (a reload lowered it): the extra
     * connections end after their transaction; while mail flowed none
     * went idle, and the lowered cap held for new ones only. Those told
     * so already count as gone, or every one would end before the first
     * had (each sees the count until its QUIT is answered). */
    static const char over_cap[] = "max_connections";
    bool over = t->conns > t->conns_quitting + t->pol->max_connections ||
                (!c->over_cap && limits_key_excess(&t->lim) > 0);
    /* So too over an [mx] or [source] section's (key_over_cap) */
    bool over_mk = !c->over_mk && key_over_cap(c->mxk, d->w->now);
    bool over_sk = !c->over_sk && c->srck != c->mxk && key_over_cap(c->srck, d->w->now);
    /* ... and over its site's ceiling: the domains of a site share its
     * connections, each under its own max_connections, so the site holds
     * as many as the highest of them allows; a reload that lowered
     * them all (delivery_reconfigure) leaves the site more than that */
    struct site *cs = c->site;
    bool over_site =
        !c->over_site && cs != NULL && cs->conns > cs->conns_quitting + cs->win.ceiling;
    const char *quit = c->nmsgs >= sched_conn_max_msgs(c)        ? "max_messages"
                       : d->stopping || d->draining              ? "stopping"
                       : over || over_mk || over_sk || over_site ? over_cap
                       : !source_may_send(c)                     ? "source_held"
                       : !shaping_may_send(c)                    ? "shaping"
                                                                 : NULL;
    if (quit != NULL) {
        if (quit == over_cap && over && !c->over_cap) {
            c->over_cap = true;
            t->conns_quitting++;
            limits_key_excess_taken(&t->lim);
        }
        if (quit == over_cap && over_mk) {
            c->over_mk = true;
            c->mxk->quitting++;
            limits_key_excess_taken(&c->mxk->lim);
        }
        if (quit == over_cap && over_sk) {
            c->over_sk = true;
            c->srck->quitting++;
            limits_key_excess_taken(&c->srck->lim);
        }
        if (quit == over_cap && over_site) {
            c->over_site = true;
            cs->conns_quitting++;
        }
        c->quit_why = quit;
        *what = SCHED_NEXT_QUIT;
        return NULL;
    }
    if (!c->slot_yielded &&
        site_addr_over(&d->sites, c->slot, d->cfg->delivery.max_connections_per_address)) {
        /* Over max_connections_per_address (a reload lowered it): as
         * over a domain's max_connections above, the extra connections
         * end after their transaction; while mail flowed they carried it
         * past the lowered cap for as long as it lasted. */
        c->slot_yielded = true; /* counted as going there until it ends */
        c->quit_why = "max_connections_per_address";
        *what = SCHED_NEXT_QUIT;
        return NULL;
    }
    if (!c->slot_yielded &&
        site_addr_yield(&d->sites, c->slot, d->cfg->delivery.max_connections_per_address,
                        d->w->now)) {
        c->slot_yielded = true; /* counted as yielding there until it ends */
        /* Another worker waits for a slot at this address, and this one
         * holds more than its share of the cap there: this connection
         * gives its slot back after its transaction (site_addr_take
         * keeps it for the waiting worker). */
        c->quit_why = "address_share";
        *what = SCHED_NEXT_QUIT;
        return NULL;
    }
    /* Checked per transaction: a policy that changed under c (a new
     * MTA-STS policy in enforce mode, or one whose patterns no longer
     * name c's MX host) ends it; the mail waits for a connection opened
     * under the policy in force. A first check that runs (a domain the
     * store forgot, or MTA-STS turned on by a reload) holds t's mail
     * here as in dest_run_once, not sent under no policy meanwhile: c
     * serves another domain of the site or idles, and t's run at the
     * check's end takes its idle connections first. */
    bool sts_ready = dest_sts_ready(t);
    if (!sts_ready && t->sts_ask == NULL)
        dest_lim_wait(t, d->w->now + MS_TO_NS(STS_WAIT_MIN_MS)); /* the store's thread
                                                                  * checks: t asks again */
    if (c->tls_pol != dest_tls_key(t, c->mx) || !dest_mx_allowed(t, c->mx)) {
        c->quit_why = "tls_policy";
        *what = SCHED_NEXT_QUIT;
        return NULL;
    }
    if (t->mx != NULL && t->mx->expires <= d->w->now && !fairq_empty(&t->q)) {
        /* Asked here too: a busy destination's connections may carry its
         * queue for long without a run of it (dest_mx_refresh). One
         * answered at once changes t here: t runs for it next. */
        const struct dns_mx_result *was = t->mx;
        dest_mx_refresh(t);
        if (t->mx != was)
            dest_lim_wait(t, d->w->now);
    }
    /* c's MX host is no longer t's (a refresh moved it): none of t's
     * mail, but another domain of the site that waits, or goodbye. */
    bool gone = !dest_names_mx(t, c);
    if (!gone && c->nmsgs != 0 && !c->idled && !fairq_empty(&t->q) && !c->detour) {
        /* (Not one just handed from the site's idle list to t: t's
         * run, site_wake's, asked for it.) */
        struct dest *w = conn_give_turn(c, t);
        if (w != NULL) {
            t = w;
            sts_ready = true; /* as for conn_take_waiting's below */
            (*moves)++;
        }
    }
    for (;;) {
        struct job *j = NULL;
        uint64_t retry_at;
        bool rate_held = false; /* t's own message rate gives no token now */
        if (!gone && sts_ready && !dest_paused(t) && !fairq_empty(&t->q)) {
            struct mxkey *mk = c->mxk, *sk = c->srck, *hk = c->shk;
            /* the tokens of t's, mk's, sk's and hk's keys, given back when
             * the transaction does not go (give_back) */
            struct limit_key *keys[4] = {&t->lim, mk ? &mk->lim : NULL, sk ? &sk->lim : NULL,
                                         hk ? &hk->lim : NULL};
            struct limit_grant g[4];
            /* Jobs an MX host refused wait (policy_host): the one c may
             * carry is found first, no rate token spent on those passed
             * over; a detour's connection carries only those. */
            struct job *ahead = NULL;
            bool passed = false, yield = false;
            if (c->detour || t->refused_queued != 0) {
                ahead =
                    c->detour ? detour_take(c, t, &yield) : detour_pass(c, t, dest_pop(t), &yield);
                passed = ahead == NULL;
                yield = yield && (!c->detour || passed);
            } else if (t->detour_wait) {
                t->detour_wait = false; /* the job that waited went: as in detour_pass */
                dest_lim_wait(t, d->w->now);
            }
            if (yield) {
                /* what waits goes to another host, and t may open no
                 * connection there while this one lives (or, a detour's
                 * connection, it would be resumed for it again) */
                if (ahead != NULL)
                    dest_push(t, ahead, true);
                c->quit_why = "host_refused";
                *what = SCHED_NEXT_QUIT;
                return NULL;
            }
            if (passed && c->detour && t->refused_queued == 0 && !fairq_empty(&t->q) &&
                detour_no_room(t)) {
                /* a detour's with no refused job left, t's other mail
                 * waiting for a connection to the host it prefers that
                 * this one's slot would let open */
                c->quit_why = "detour_done";
                *what = SCHED_NEXT_QUIT;
                return NULL;
            }
            if (passed) {
                /* nothing here c may carry: no token taken */
            } else if (limits_take_msgs_undo(d->lim, keys[0], 1, d->w->now, &retry_at, &g[0]) != 1) {
                dest_rate_wait(t, retry_at);
                dest_lim_wait(t, retry_at);
                rate_held = true;
            } else if (mk != NULL &&
                       limits_take_msgs_undo(d->lim, keys[1], 1, d->w->now, &retry_at, &g[1]) != 1) {
                /* The tokens the keys before it gave go back: spent for
                 * a message that did not go, they kept the domain under
                 * its own rate whenever the [mx] key refused, and starved
                 * it while the two rates took turns refusing. */
                give_back(d, keys, g, 1);
                dest_rate_wait(t, retry_at);
                mx_wait(mk, t, retry_at, false);
            } else if (sk != NULL &&
                       limits_take_msgs_undo(d->lim, keys[2], 1, d->w->now, &retry_at, &g[2]) != 1) {
                give_back(d, keys, g, 2); /* likewise */
                dest_rate_wait(t, retry_at);
                mx_wait(sk, t, retry_at, false);
            } else if (hk != NULL &&
                       limits_take_msgs_undo(d->lim, keys[3], 1, d->w->now, &retry_at, &g[3]) != 1) {
                give_back(d, keys, g, 3); /* likewise: its source's shaping rate */
                dest_rate_wait(t, retry_at);
                mx_wait(hk, t, retry_at, false);
            } else {
                j = ahead != NULL ? ahead : dest_pop(t);
                ahead = NULL;
            }
            if (ahead != NULL)
                dest_push(t, ahead, true); /* a rate held it: back where it was */
            /* A job that does not go after all gives its keys' tokens
             * back too. */
            if (j != NULL && scope_job_parked(d, j)) {
                give_back(d, keys, g, 4);
                continue; /* its tenant or campaign is suspended: parked */
            }
            struct limit_key *tk = NULL; /* its tenant's shaped rate, when it took a token */
            struct limit_grant tg;
            if (j != NULL && scope_job_shaped(d, t, j, c->mx, &tk, &tg)) {
                give_back(d, keys, g, 4);
                continue; /* its tenant is suspended, slowed (its tenant's rate
                           * refused) or bounced at this MX by shaping: parked
                           * for a while, or bounced */
            }
            /* (no plan in the config: nothing to count, and no lock to take
             * on each transaction) */
            if (j != NULL && c->src != NULL && d->cfg->nwarmups != 0 &&
                !warmup_take(d->warmup, c->src->pattern, c->mx, clock_unix_ms())) {
                /* the day's allowance went meanwhile: another source, or later */
                if (tk != NULL)
                    limits_give_msgs(d->lim, tk, &tg, 1);
                give_back(d, keys, g, 4);
                dest_push(t, j, true);
                c->quit_why = "warmup";
                *what = SCHED_NEXT_QUIT;
                return NULL;
            }
        }
        if (j == NULL &&
            (gone || fairq_empty(&t->q) || dest_paused(t) || !sts_ready || rate_held) &&
            *moves < 8 && !c->detour) {
            /* Nothing here, or nothing t's rate lets go now (its timer
             * runs it again: it takes an idle connection, or waits for
             * one): the next transaction of another domain of the site
             * (MX rollup; one that waits for a connection has its
             * policy). The [mx], source and shaping keys are c's: a
             * domain c moved to would meet them alike. */
            struct dest *w = conn_take_waiting(c);
            if (w != NULL) {
                t = w;
                sts_ready = true;
                gone = false; /* conn_move asked */
                (*moves)++;
                continue;
            }
        }
        if (j == NULL && gone) {
            c->quit_why = "mx_changed";
            *what = SCHED_NEXT_QUIT;
            return NULL;
        }
        if (j == NULL) {
            int kw = 0;
            if (fairq_empty(&t->q)) {
                int m = key_slot_wanted(c, c->mxk), s = key_slot_wanted(c, c->srck);
                kw = m > s ? m : s;
            }
            if (kw == 2) {
                /* Nothing more here while a site with fewer waits for a
                 * slot of this MX's or source's limit: give it back now
                 * rather than after idling. */
                c->quit_why = "limit_wanted";
                *what = SCHED_NEXT_QUIT;
                return NULL;
            }
            unsigned cap = d->cfg->delivery.max_connections_per_address;
            bool yielded = false;
            if (fairq_empty(&t->q) && !c->slot_yielded &&
                site_addr_wanted(&d->sites, c->slot, cap, d->w->now, c->site, &yielded)) {
                c->slot_yielded = yielded;
                /* A domain of another site, or on another worker, waits
                 * for this address's slot: give it back rather than hold
                 * it idle. */
                c->quit_why = "address_wanted";
                *what = SCHED_NEXT_QUIT;
                return NULL;
            }
            /* Idle: wait for work of any domain of the site (for a
             * moment only when another site waits for its key's slot,
             * here or, with [redis], on another worker or node; a slot
             * of a cap shared through Redis asks again while it idles). */
            c->idle_short = kw == 1;
            c->idle_poll = sched_conn_key_polled(c);
            if (c->idle_poll && d->cfg->redis.url == NULL && fairq_empty(&t->q) &&
                sched_conn_wanted_elsewhere(c)) {
                /* Another worker waits for a slot of a cap counted for
                 * the node: it gets this one now. (With [redis] the
                 * question goes out below, and its answer is acted on
                 * at the first idle step, as before node counts.) */
                c->quit_why = "limit_wanted";
                *what = SCHED_NEXT_QUIT;
                return NULL;
            }
            if (c->idle_poll)
                sched_conn_want_ask(c);
            c->idled = true;
            conn_idle_push(c);
            *what = SCHED_NEXT_IDLE;
            return NULL;
        }
        if (c->src != NULL) {
            struct site_source *ss = site_source(c->site, c->src_id);
            if (ss != NULL)
                site_source_sent(c->site, ss);
        }
        /* How long it waited for a connection: since it came, or since
         * its domain's answer and policy were known (the wait for DNS or
         * MTA-STS is not one more connections would have shortened). */
        uint64_t since = j->queued_ns > t->usable_ns ? j->queued_ns : t->usable_ns;
        if (c->site != NULL && since != 0 && d->w->now > since)
            site_window_on_wait(&c->site->win, d->w->now - since);
        /* A backlog that the site's connections will not drain soon: more
         * jobs behind this one than SITE_BACKLOG_PER_CONN per connection.
         * A burst of a domain's mail (a spool commit hands over tens at
         * once) waits only milliseconds on a LAN, under the shortest wait
         * above, yet is what more connections carry sooner. */
        if (c->site != NULL && dest_queued(t) > SITE_BACKLOG_PER_CONN * c->site->conns &&
            !dest_rate_bound(t))
            site_window_on_backlog(&c->site->win);
        *what = SCHED_NEXT_JOB;
        return j;
    }
}

bool
sched_txn_done(struct conn *c, struct job *j)
{
    struct dest *t = c->dest;
    t->inflight--;
    const struct smtp_outcome *mo = &c->txn.msg;
    struct policy_txn pt = {
        .msg = mo,
        .delivered = c->txn.delivered,
        .permfail = c->txn.permfail,
        .txns_on_conn = c->nmsgs,
        .failovers = j->failovers,
        .have_answer = t->mx != NULL,
        .idled = c->idled,
        .reuse_lost = j->reuse_lost,
        .now_ms = clock_unix_ms(),
        .expire_ms = c->expire_ms,
    };
    c->idled = false; /* the next transaction's: whether it idles before it */
    if (policy_reuse_lost(&pt)) {
        /* The receiver dropped a connection it thought idle as we reused
         * it: another connection takes the job now (the one this closes
         * makes room; dest_run() in sched_conn_detach), no deferral, and
         * neither the window nor the destination pays for it. */
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(j->id, qid);
        log_msg(LOG_NOTICE,
                "id=%s conn=%llx event=reuse_lost domain=%s mx=%s addr=%s stage=%s txns=%u "
                "idled=%s reply=\"%s\"",
                qid, (unsigned long long)c->id, t->name, c->mx, c->addr_str,
                smtp_client_state_str((enum smtp_client_state)mo->stage), c->nmsgs - 1,
                pt.idled ? "yes" : "no", mo->text);
        j->reuse_lost++;
        c->reuse_lost = true;
        c->d->stats.reuse_lost++;
        uint32_t tenant = j->owner.tenant;
        dest_push(t, j, true);
        /* The reply is not reported with the job, yet the shaping rules
         * see every reply (a receiver's "421 ... [TSS04]" to a reused
         * connection's MAIL is theirs to act on, as when reported). */
        outcome_shaping(c->d, t, c->mx, c->src_id, tenant, mo);
        return true;
    }
    if (policy_txn_congested(mo)) {
        const char *why = mo->code == 421                      ? "421"
                          : mo->reason == SMTP_REASON_TIMEOUT ? "timeout"
                          : mo->reason == SMTP_REASON_TLS     ? "tls"
                                                              : "reset";
        sched_conn_congested(c, why);
        if (c->src != NULL && t->poolc != NULL)
            source_hold(c, why);
    } else if (c->site != NULL) {
        struct site_source *ss = c->src != NULL ? site_source(c->site, c->src_id) : NULL;
        if (ss != NULL && c->txn.delivered > 0)
            ss->holds = 0; /* it delivers again: the next hold starts short (a
                            * rate-limited deferral is no delivery: its throttle,
                            * outcome.c, makes the next hold longer) */
        if (c->txn.delivered > 0)
            c->site->greeting_421s = 0; /* the host talks: a later 421 greeting (one
                                         * connection over its limit) is pushback */
        unsigned before = site_window_allowed(&c->site->win);
        site_window_on_success(&c->site->win, c->site->conns);
        if (site_window_allowed(&c->site->win) > before)
            site_wake(c->d, c->site); /* grew: room for a domain that waits */
    }
    /* A refusal of this MX host's, for a lack of its own (no 8BITMIME, a
     * smaller SIZE): the job goes to another MX host of the domain, this
     * connection stays for the rest (policy_host() says when). */
    /* (counted only for such a refusal: dest_hosts() walks every address
     * of the answer, not for each delivery) */
    bool refusal = policy_host_refusal(mo);
    bool again = refusal && job_refused_by(j, c->mx);
    struct policy_host ph = {
        .msg = mo,
        .hosts = refusal ? dest_hosts(t) : 0,
        .refused = j->nrefused - (again ? 1u : 0u),
        .again = again,
    };
    enum policy_host_verdict hv = policy_host(&ph);
    if (refusal) {
        c->d->stats.host_refused++;
        t->host_refused++;
    }
    if (hv == POLICY_HOST_NEXT && j->nrefused < POLICY_HOSTS_REFUSED_MAX - 1) {
        j->refused_h[j->nrefused++] = job_host_h(c->mx);
        j->detour_skips = 0;
        /* the addresses it may go to, counted for this answer (after a
         * refresh or a reload not yet: "no other host", a bounce) */
        (void)dest_targets(t);
        if (dest_cursor_past(t, j)) {
            char qid[QUEUE_ID_STRLEN + 1];
            queue_id_str(j->id, qid);
            log_msg(LOG_NOTICE,
                    "id=%s conn=%llx event=host_refused domain=%s mx=%s addr=%s next=yes "
                    "hosts_refused=%u reply=\"%u %u.%u.%u %s\"",
                    qid, (unsigned long long)c->id, t->name, c->mx, c->addr_str,
                    (unsigned)j->nrefused, (unsigned)mo->code, (unsigned)mo->enh.cls,
                    (unsigned)mo->enh.subject, (unsigned)mo->enh.detail, mo->text);
            c->d->stats.host_detoured++;
            t->host_detoured++;
            dest_push(t, j, true);
            return true;
        }
        /* no address of another host to go to (none may be delivered
         * to now): reported as it is */
    } else if (hv == POLICY_HOST_DEFER) {
        policy_host_defer(&c->txn.msg);
        for (unsigned i = 0; c->rc != NULL && i < j->n; i++)
            if (policy_host_refusal(&c->rc[i].out))
                policy_host_defer(&c->rc[i].out);
    }
    /* A session failure before this connection delivered anything is the
     * server's, not the message's: the job goes to the next MX address
     * (policy_failover() says when). */
    if (policy_failover(&pt)) {
        j->failovers++;
        conn_fail_keep(c, t, &c->txn.msg);
        t->failed_addrs++;
        if (!c->detour)
            t->next_addr++;
        dest_push(t, j, true);
        return true;
    }
    t->failed_addrs = 0;
    t->own_failed = false;
    return false;
}

void
sched_conn_event(struct conn *c, enum policy_conn_event ev, const struct smtp_outcome *why)
{
    struct dest *t = c->dest;
    struct policy_event_decision pd;
    policy_conn_event(ev, &pd);
    if (why != NULL)
        conn_fail_keep(c, t, why);
    if (pd.next_addr) {
        t->failed_addrs++;
        if (!c->detour)
            t->next_addr++;
        t->detour_wait = false; /* the job that waits for another host may meet it down:
                                 * t's idle connections take it again (detour_pass) */
        if (c->site != NULL && (ev == POLICY_CONNECT_FAILED || ev == POLICY_CONNECT_TIMEOUT))
            site_addr_down(c->site, &c->addr,
                           c->d->w->now + MS_TO_NS(policy_all_failed_hold(t->pol->site_hold)));
    }
    if (pd.rest_ms != 0)
        dest_hold(t, pd.rest_ms);
}

/* The jobs waiting at t that have not had their plaintext retry after a
 * failed handshake in this attempt (job.tls_retried): are there any, or
 * (mark) they have had it now. */
static bool
dest_tls_retry(struct dest *t, bool mark)
{
    struct fairq_iter it;
    fairq_iter_init(&t->q, &it);
    for (struct fairq_node *x; (x = fairq_iter_next(&it)) != NULL;) {
        struct job *j = job_of(x);
        if (!mark && !j->tls_retried)
            return true;
        j->tls_retried = true;
    }
    return false;
}

void
sched_conn_detach(struct conn *c, const struct smtp_outcome *so)
{
    struct delivery *d = c->d;
    struct dest *t = c->dest;
    struct site *site = c->site;
    for (struct conn **p = site ? &site->idle : NULL; p != NULL && *p != NULL; p = &(*p)->next_idle)
        if (*p == c) {
            conn_idle_unlink(p);
            break;
        }
    /* What the end of this connection means: the failure policy's call
     * (a reset in a transaction is seen in sched_txn_done). */
    struct policy_conn_end pe = {
        .connected = c->connected,
        .ready_once = c->ready_once,
        .session = so,
        .stopping = d->stopping || c->drain_cut,
        .tls_fallback = c->tls_fell_back,
        .tls_retry_left = c->tls_fell_back && dest_tls_retry(t, false),
        .idle = so != NULL && c->ready_once && so->stage == SMTP_CLIENT_S_IDLE,
        .reuse_lost = c->reuse_lost,
        .going_down = so != NULL && so->code == 421 &&
                      classify(d->cfg->classify, CLASSIFY_REPLY, so->code, &so->enh, so->text) ==
                          BOUNCE_OTHER,
    };
    struct policy_conn_decision pd;
    policy_conn_end(&pe, &pd);
    if (pd.retry_plain) {
        /* The address is in plaintext now (connection.c): dest_run()
         * below opens there for what waits, once per job and attempt. */
        dest_tls_retry(t, true);
        log_msg(LOG_INFO, "conn=%llx event=tls_plaintext_retry domain=%s mx=%s addr=%s jobs=%u",
                (unsigned long long)c->id, t->name, c->mx, c->addr_str, dest_queued(t));
    }
    /* A refusal before any transaction (a 421 or 554 greeting, EHLO
     * refused) reaches no job: the shaping rules see it here. Replies
     * within transactions are seen with their job (outcome.c). */
    if (so != NULL && c->connected && !c->ready_once && so->code >= 400 && !d->stopping &&
        !c->drain_cut)
        outcome_shaping(d, t, c->mx, c->src_id, c->job ? c->job->owner.tenant : 0, so);
    if (site != NULL && pd.congested && !d->draining)
        sched_conn_congested(c, so != NULL && so->code == 421 ? "421" : "not_ready");
    bool by_source = c->src != NULL && t->poolc != NULL && pd.source_hold && !d->stopping;
    if (by_source) {
        /* The receiver pushed back on this source: it rests, the pool's
         * others carry on (source_hold holds t when none is left). */
        source_hold(c, so != NULL && so->code == 421 ? "421" : "refused");
        pd.hold = pd.backoff = pd.next_addr = false;
    }
    if (pd.remember) {
        struct smtp_outcome o = *so;
        o.status = SMTP_STATUS_TEMPFAIL;
        conn_fail_keep(c, t, &o);
    }
    if (pd.hold && t->pol->site_hold > 0) {
        log_msg(LOG_NOTICE,
                "conn=%llx event=destination_held domain=%s mx=%s for_ms=%llu reply=\"%s\"",
                (unsigned long long)c->id, t->name, c->mx, (unsigned long long)t->pol->site_hold,
                so->text);
        dest_hold(t, t->pol->site_hold);
        /* A 421's rest keeps the site's mail waiting in memory: the
         * receiver pushed back for a while. A 421 greeting again at the
         * next try, no connection of the site ready since, is a host
         * that will not talk (Postfix defers at the first): this rest's
         * mail is deferred with it, as after every address failed (the
         * retry schedule, a transient_failure for each recipient).
         * Before, an outage answered 421 kept the whole queue in
         * memory, told nothing, retried each site_hold until max_age. */
        const struct dest_fail *down = NULL;
        if (site != NULL && !c->ready_once) {
            if (site->hold_until <= d->w->now)
                site->greeting_421s++; /* a rest begins (not another connection's in it) */
            if (site->greeting_421s > 1 && t->last_fail != NULL)
                down = t->last_fail;
        }
        site_hold_set(d, site, t->pol->site_hold, down != NULL ? "421_again" : "421", down);
    }
    if (pd.backoff)
        limits_backoff(d->lim, &t->lim, d->w->now);
    if (!c->ready_once)
        t->opening--;
    if (pd.next_addr) {
        t->failed_addrs++;
        if (!c->detour)
            t->next_addr++;
        t->detour_wait = false; /* as in sched_conn_event */
    }
    if (c->detour && t->detour_conns > 0)
        t->detour_conns--; /* (c moved to no other domain: conn_move) */
    if (c->detour_yield)
        t->detour_yield = false;
    if (c->prev_all)
        c->prev_all->next_all = c->next_all;
    else
        d->all = c->next_all;
    if (c->next_all)
        c->next_all->prev_all = c->prev_all;
    t->conns--;
    if (c->over_cap && t->conns_quitting > 0)
        t->conns_quitting--;
    d->stats.open--;
    if (site != NULL) {
        site->conns--;
        if (c->over_site && site->conns_quitting > 0)
            site->conns_quitting--;
    }
    site_addr_give(&d->sites, c->slot, c->slot_yielded);
    c->slot = NULL;
    c->slot_yielded = false;
    if (c->src != NULL && site != NULL) {
        struct site_source *ss = site_source(site, c->src_id);
        if (ss != NULL && ss->conns > 0)
            ss->conns--;
    }
    if (c->leased && !d->stopping)
        limits_conn_release(d->lim, &t->lim);
    struct mxkey *mk = c->mxk, *sk = c->srck;
    if (c->over_mk && mk != NULL && mk->quitting > 0)
        mk->quitting--;
    if (c->over_sk && sk != NULL && sk->quitting > 0)
        sk->quitting--;
    if (mk != NULL && !d->stopping)
        limits_conn_release(d->lim, &mk->lim);
    if (sk != NULL && !d->stopping)
        limits_conn_release(d->lim, &sk->lim);
    dns_mx_result_unref(c->answer);
    free(c);
    if (mk != NULL && !d->stopping)
        mx_on_wake(mk); /* a slot is free: the others behind this MX may go */
    if (sk != NULL && !d->stopping)
        mx_on_wake(sk);
    drain_check(d);
    if (!d->stopping) {
        dest_run(t);
        site_wake(d, site); /* a slot of the site, and of an address, is free */
        addr_wake(d);
    } else {
        delivery_check_done(d);
    }
    site_unref(&d->sites, site);
}
