/*
 * scheduler: the outbound side's decisions of "what goes where, now", on
 * one worker (see internal.h for the other files).
 *
 * A destination (struct dest) is a domain with its queue of jobs, its MX
 * answer (or its route's), its limiter key and its site (one per pool,
 * and one more for tls_relaxed mail: TLS reports, opportunistic TLS
 * whatever the domain's policy). The queue
 * (outbound/fairq.c) is shared between tenants by their [tenant] weight
 * and ordered by priority within a tenant: every connection of the
 * destination takes its next job from it, so the domain's connections
 * and message rate are shared by weight, and a job put back after a
 * failure goes first of its tenant. dest_run() is the
 * one decision point: resolve when there is no answer (or, when it
 * expired with connections open, in the background: dest_mx_refresh),
 * fail the jobs when
 * the answer says so (outbound/policy.c decides how, outbound/dest_fail.c
 * fails them), else hand jobs to
 * idle connections of the site (which it joins: outbound/site_share.c)
 * and open new ones within the domain's max_connections, the site's
 * window (outbound/site.c) and the node's cap per MX address (which
 * address: outbound/mx_address.c), and within the [mx] and [source]
 * limits (their keys, the choice of a pool's source and what shaping
 * allows: outbound/egress.c).
 * Targets that mail must not go to (outbound/targets.c) are never picked.
 * With several workers, a domain whose answer names a site moves to the
 * site's worker before its first connection (site affinity:
 * outbound/affinity.c).
 *
 * A connection ready for a transaction asks sched_conn_next() for its job:
 * one of its domain, or else (none, or none its domain's message rate lets
 * go now) one of another domain of its site that waits (MX rollup), the
 * connection moving there with its lease; else it goes
 * idle on its site or says goodbye. A domain with mail left gives the
 * connection to a domain of the site waiting behind it when it holds more
 * of the site's connections (site_share.c conn_give_turn: at once when
 * two more, after SITE_TURN_MS when one more), so one domain's backlog
 * does not keep the site's connections from the others. When a
 * transaction or a connection ends, the site's window and the destination's failover cursor learn of
 * it (sched_txn_done, sched_conn_event, sched_conn_detach) and whatever
 * waits for a slot runs. A transaction lost at its first command on a
 * reused connection (the receiver's idle close crossing it:
 * policy_reuse_lost) puts its job back first for another connection,
 * and the window and the destination learn nothing from it.
 *
 * The destinations themselves (their table, queue, hold and eviction)
 * are outbound/dest.c's.
 *
 * DNS, connections and the failing of jobs are reached through d->ops
 * (only the expiry sweep of held destinations reads the spool itself),
 * so tests/unit/test_scheduler.c drives this file with scripted answers
 * and connection results.
 *
 * Threading: the worker's thread.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include "common/clock.h"
#include "common/hash.h"
#include "common/idn.h"
#include "common/intern.h"
#include "common/log.h"
#include "engine/engine.h"
#include "engine/mta_sts.h"
#include "engine/netaddr.h"
#include "engine/outbound/internal.h"
#include "engine/tlsrpt.h"
#include "engine/warmup.h"

static void dest_run_once(struct dest *t);

/* ---- what holds a destination back ---- */

/* t's mail waits for message tokens (its rate, its MX host's, a
 * source's or shaping's) until retry_at: a wait more connections would
 * not shorten. The window's wait counts from then (usable_ns), and its
 * backlog earns nothing while the rate holds it (dest_rate_bound). */
static void
dest_rate_wait(struct dest *t, uint64_t retry_at)
{
    uint64_t until = retry_at != UINT64_MAX ? retry_at : t->d->w->now;
    if (until > t->usable_ns)
        t->usable_ns = until;
    t->rate_until = until;
}

/* Did a message rate hold t back within the last RATE_BOUND_NS? */
static bool
dest_rate_bound(const struct dest *t)
{
    return t->rate_until != 0 && t->d->w->now < t->rate_until + RATE_BOUND_NS;
}

/* A token or lease was refused: run again when the limiter says. */
void
dest_lim_wait(struct dest *t, uint64_t retry_at)
{
    if (retry_at == UINT64_MAX)
        return; /* the waker will run */
    if (!timer_armed(&t->lim_timer) || t->lim_timer.deadline > retry_at)
        worker_timer_arm(t->d->w, &t->lim_timer, retry_at);
}

/* Suspended by the operator: its domain, or its pool (outbound/scope.c). */
bool
dest_paused(const struct dest *t)
{
    return t->suspended ||
           (t->pool != 0 && t->d->nsusp != 0 && scope_suspended(t->d, SCOPE_POOL, t->pool, t->d->w->now));
}

/* ---- a site's rest, and the connections it allows a domain (outbound/site.h) ---- */

/* No new connection of site for ms (its domains' site_hold): every
 * address of it failed for one of its domains (failed: how the last one
 * did), or a receiver pushed back with a 421 (failed NULL). Each of the
 * site's domains then rests until it ends (in dest_run_once) instead of
 * trying the same hosts in turn: over a host that is down for a thousand
 * domains, a thousand connects every site_hold, where one now. */
static void
site_hold_set(struct delivery *d, struct site *site, uint64_t ms, const char *why,
              const struct dest_fail *failed)
{
    uint64_t until = d->w->now + MS_TO_NS(ms);
    if (site == NULL || ms == 0 || until <= site->hold_until)
        return; /* (site_hold = 0: no rest, and no line saying one) */
    site->hold_until = until;
    if (failed == NULL) {
        free(site->rest_fail);
        site->rest_fail = NULL;
    } else if (site->rest_fail != NULL ||
               (site->rest_fail = malloc(sizeof(*site->rest_fail))) != NULL) {
        *site->rest_fail = *failed;
    }
    log_msg(LOG_NOTICE, "event=site_held site=%s for_ms=%llu reason=%s", site->key,
            (unsigned long long)ms, why);
}

/* Connections t may have through its site now: the window, and the
 * domain's own max_connections. */
static unsigned
site_allowed(const struct dest *t)
{
    unsigned a = site_window_allowed(&t->site->win);
    return a < t->pol->max_connections ? a : t->pol->max_connections;
}

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

/* ---- the scheduler ---- */

/* The name whose MX answer is t's: a route's host stands for the
 * domain (a site like any other). */
static const char *
dest_mx_name(const struct dest *t)
{
    return t->pol->route_host[0] ? t->pol->route_host : t->name;
}

/* t's answer expired while connections of t are open (busy all day, as
 * a large provider's domain is on a bulk relay): it is asked again
 * without waiting for them to close, which a busy destination never
 * does, so that it follows its TTL as every MTA does (it kept an
 * answer past it for as long as it stayed busy, its mail going to old
 * hosts after an MX move). Nothing waits for the refresh: its mail goes
 * on over the old answer, and the open connections finish what they
 * do; the answer is taken by dest_mx_answer() (dest.c), now or from
 * dest_on_mx(). One refresh at a time per destination (t->req), and
 * none before refresh_at after one failed: their number is the expired
 * busy destinations', queued by the resolver beyond [dns] max_inflight
 * and joined per domain, as their first lookups were. (A destination
 * with nothing open drops its expired answer and waits for the new
 * one, as before: it has no connection its mail could go on over.) */
static void
dest_mx_refresh(struct dest *t)
{
    struct delivery *d = t->d;
    if (t->req != NULL || d->w->now < t->refresh_at)
        return;
    struct dns_mx_result *res = NULL;
    int rc = d->ops->resolve(d, t, dest_mx_name(t), &res, &t->req);
    if (rc == 1) {
        t->req = NULL;
        dest_mx_answer(t, res);
    } else if (rc < 0) {
        /* Not asked (no resolver here, no memory): the old answer
         * serves, asked again later. */
        t->req = NULL;
        t->refresh_at = d->w->now + MS_TO_NS(POLICY_MX_REFRESH_RETRY_MS);
    }
}

/* The scheduler's one decision point, never re-entered for the same
 * destination: a limiter's wake-up or a connection's events inside a run
 * ask for another pass, made when this one ends. */
void
dest_run(struct dest *t)
{
    dest_touch(t);
    if (t->running) {
        t->rerun = true;
        return;
    }
    t->running = true;
    for (unsigned pass = 0; pass < 8; pass++) {
        t->rerun = false;
        dest_run_once(t);
        if (!t->rerun)
            break;
    }
    t->running = false;
    if (t->rerun) /* still asked: on the next turn, not in a loop here */
        worker_timer_arm(t->d->w, &t->lim_timer, t->d->w->now + MS_TO_NS(1));
}

static void
dest_run_once(struct dest *t)
{
    struct delivery *d = t->d;
    if (t->fail_more != NULL && !d->stopping && !d->draining) {
        /* What a failure left for this turn fails with it first (at once
         * but for dest_fail_each's budget), not tried again */
        dest_fail_more(t);
        if (t->fail_more != NULL)
            return;
    }
    if (fairq_empty(&t->q) || d->stopping || d->draining || dest_paused(t))
        return;
    if (dest_elsewhere(t))
        return;
    if (!idn_is_ascii(t->name, strlen(t->name))) {
        /* No A-labels (job_new): nothing to look up, ever. */
        struct policy_fail nf;
        policy_job(POLICY_BAD_IDN, &nf);
        dest_fail_all(t, &nf, NULL);
        return;
    }
    /* Asked first, so that a new domain's MTA-STS check (its TXT lookup,
     * maybe a policy fetch) runs beside its MX lookup, not after it. */
    bool sts_ready = dest_sts_ready(t);
    if (t->mx != NULL && t->mx->expires <= d->w->now) {
        if (t->conns == 0)
            dest_set_mx(t, NULL); /* nothing uses it: asked again below, as at first */
        else
            dest_mx_refresh(t); /* asked in the background; its mail goes on */
    }
    if (t->mx == NULL) {
        if (t->req != NULL)
            return;
        struct dns_mx_result *res = NULL;
        int rc = d->ops->resolve(d, t, dest_mx_name(t), &res, &t->req);
        if (rc == -ENXIO) {
            t->req = NULL;
            struct policy_fail nf;
            policy_job(POLICY_NO_RESOLVER, &nf);
            dest_fail_all(t, &nf, NULL);
            return;
        }
        if (rc == 1) {
            t->req = NULL;
            dest_set_mx(t, res);
        } else {
            if (rc < 0) {
                /* Not asked (no memory): nothing would run t again but
                 * another job for it. */
                t->req = NULL;
                dest_lim_wait(t, d->w->now + MS_TO_NS(HOLD_MIN_MS));
            }
            return;
        }
    }
    if (!sts_ready && t->sts_ask != NULL)
        return; /* its TXT lookup's answer runs it again */
    if (!sts_ready) {
        /* Its first MTA-STS check runs on the store's thread (bounded by [mta_sts]
         * fetch_timeout): nothing leaves before its policy is known. Asked
         * again after half the time it has run, from STS_WAIT_MIN_MS up to
         * STS_WAIT_MS: a check answered from a near resolver in a
         * millisecond or two holds its mail that long, not a whole 50 ms
         * (the last domains of a campaign to new domains ended it that
         * much later), and one that fetches a policy over the Internet is
         * asked a handful of times. */
        if (t->sts_wait_since == 0)
            t->sts_wait_since = d->w->now;
        uint64_t next = (d->w->now - t->sts_wait_since) / 2;
        if (next < MS_TO_NS(STS_WAIT_MIN_MS))
            next = MS_TO_NS(STS_WAIT_MIN_MS);
        if (next > MS_TO_NS(STS_WAIT_MS))
            next = MS_TO_NS(STS_WAIT_MS);
        dest_lim_wait(t, d->w->now + next);
        return;
    }
    t->sts_wait_since = 0;
    struct policy_fail pf;
    policy_dns(t->mx->status, t->mx->bad_name, t->mx->hosts_nx, &pf);
    if (pf.fail) {
        dest_fail_all(t, &pf, t->mx->status == DNS_NULL_MX ? NULL : t->mx->why);
        if (pf.forget_answer)
            dest_set_mx(t, NULL); /* ask again next time */
        return;
    }
    if (dest_targets(t) == 0) {
        /* Every address is one mail must not go to (of those looked up:
         * a partial answer misses hosts whose lookups failed for now). */
        struct policy_fail nf;
        policy_job(t->refused_sts    ? POLICY_TLS_POLICY_NO_MX
                   : t->mx->partial  ? POLICY_NO_TARGET_PARTIAL
                   : t->refused_self ? POLICY_NO_TARGET_SELF
                                     : POLICY_NO_TARGET,
                   &nf);
        dest_fail_all(t, &nf,
                      nf.forget_answer       ? NULL
                      : t->last_fail != NULL ? t->last_fail->o.text
                                             : NULL);
        dest_last_fail_clear(t);
        /* The targets are counted again at the next run, which works out
         * why again for the mail that comes then (the reason went with
         * this failure); under MTA-STS, the policy and the MX are asked
         * again after the hold. */
        t->targets_for = NULL;
        if (nf.forget_answer) {
            dest_set_mx(t, NULL); /* ask again next time */
            return;
        }
        if (t->refused_sts)
            dest_hold(t, policy_all_failed_hold(t->pol->site_hold)); /* deferred */
        return;
    }
    if (dest_affinity(t))
        return;
    dest_site(t);
    struct site *site = t->site;
    if (site == NULL) {
        dest_lim_wait(t, d->w->now + MS_TO_NS(HOLD_MIN_MS)); /* no memory now */
        return;
    }
    if (t->usable_ns == 0)
        t->usable_ns = d->w->now; /* its jobs wait for connections from now */
    /* Idle connections of the site first, whichever domain they served
     * last: reuse. One that goes back to the idle list found no token
     * (the message rate): the others would not either. */
    bool idle_other = false; /* idle connections are left that t may not ride */
    while (!fairq_empty(&t->q) && site->idle != NULL) {
        struct conn **pc = &site->idle;
        while (*pc != NULL) {
            struct conn *x = *pc;
            if (x->want_close || x->closed) {
                /* Its session ended while idle (our idle timeout's QUIT,
                 * the server's 421 or close) and its last ops are in
                 * flight: it leaves the list; handed a job, its closed
                 * machine would refuse it (a client_misuse and a rest of
                 * the destination). Its end (sched_conn_detach) wakes the
                 * site. */
                conn_idle_unlink(pc);
                continue;
            }
            if (x->tls_pol == dest_tls_key(t, x->mx) && dest_mx_allowed(t, x->mx) &&
                dest_names_mx(t, x))
                break;
            pc = &x->next_idle;
        }
        struct conn *c = *pc;
        if (c == NULL) {
            idle_other = true;
            break;
        }
        conn_idle_unlink(pc);
        if (!shaping_may_move(c, t) || !conn_move(c, t)) {
            conn_idle_push(c);
            break; /* t has its own max_connections already */
        }
        d->ops->resume(c);
        if (site->idle == c)
            return;
    }
    if (fairq_empty(&t->q))
        return;
    if (d->w->now < t->hold_until) {
        /* Held, its site resting because its hosts failed, nothing of it
         * open: mail that came meanwhile is deferred with that failure at
         * once, as the mail waiting when the rest began was (Postfix's
         * dead destination), not kept in memory, untold, to the end of
         * the hold (an outage's campaign: 19,000 of 20,000 recipients
         * waited a minute before the sender heard of them). */
        if (site->rest_fail != NULL && d->w->now < site->hold_until && site->conns == 0 &&
            t->conns == 0 && t->pol->site_hold > 0)
            dest_fail_as_site(t, site->rest_fail);
        return;
    }
    if (d->w->now < site->hold_until && t->pol->site_hold > 0) {
        /* Its site rests (site_hold_set): no new connection. With none
         * of the site open, t rests as if its own had failed (what waits
         * is checked for expiry meanwhile); else it waits for one of them
         * to go idle, or for the end of the rest. */
        uint64_t ms = (site->hold_until - d->w->now + 999999) / 1000000;
        if (site->conns == 0 && t->conns == 0) {
            log_msg(LOG_INFO,
                    "event=destination_held domain=%s site=%s for_ms=%llu reason=site_held",
                    t->name, site->key, (unsigned long long)ms);
            if (site->rest_fail != NULL)
                dest_fail_as_site(t, site->rest_fail);
            dest_hold(t, ms);
        } else {
            want_push(t);
            dest_lim_wait(t, site->hold_until);
        }
        return;
    }
    /* New connections: one per job waiting beyond those being opened,
     * within the domain's max_connections and the site's window. */
    while (dest_queued(t) > t->opening && t->conns < t->pol->max_connections) {
        const struct dns_mx_host *h;
        const union dns_addr *a;
        union dns_addr unmapped;
        if (site->conns >= site_allowed(t)) {
            if (idle_other && site->idle != NULL) {
                /* The idle connections left are ones t may not ride
                 * (opened under another TLS policy, to an MX host its
                 * MTA-STS policy does not name): one says goodbye rather
                 * than hold the slot t waits for until its idle time
                 * ends. Its end wakes the site. */
                struct conn *c = site->idle;
                conn_idle_unlink(&site->idle);
                d->ops->quit(c);
            }
            want_push(t); /* a slot, or an idle connection, will come */
            return;
        }
        if (dest_address(t, &h, &a))
            a = dest_addr_unmapped(a, &unmapped);
        else {
            /* Every address failed in a row: defer what waits, and hold;
             * the site too, when nothing of it is open and the failure
             * was the hosts' (policy_site_failure). */
            if (t->conns == 0) {
                /* The site rests only when every address failed for the
                 * hosts' reasons: one that failed the domain's own policy
                 * (its TLS, DANE) may serve the site's other domains. */
                bool site_down = site->conns == 0 && !t->own_failed &&
                                 t->pol->site_hold > 0 &&
                                 policy_site_failure(t->last_fail ? &t->last_fail->o : NULL);
                bool why = t->last_fail != NULL && t->last_fail->o.text[0] != '\0';
                if (site_down)
                    site_hold_set(d, site, policy_all_failed_hold(t->pol->site_hold),
                                  "every_address_failed", why ? t->last_fail : NULL);
                if (why) {
                    /* deferred with why the last address failed */
                    dest_fail_each(t, &t->last_fail->o, CLASSIFY_CONNECT);
                } else {
                    struct policy_fail nf;
                    policy_job(POLICY_NO_MX_ANSWERED, &nf);
                    dest_fail_all(t, &nf, NULL);
                }
                dest_last_fail_clear(t);
                dest_hold(t, policy_all_failed_hold(t->pol->site_hold));
            }
            return;
        }
        if (h->dane == DNS_DANE_TEMPFAIL && !t->tls_relaxed) {
            /* RFC 7672 2.2: the TLSA lookup of a validated MX name failed
             * (SERVFAIL: what a validating resolver says of a bogus
             * answer, or a timeout), which may be an attacker hiding the
             * records: this host is not used. As an address that failed:
             * the next one, and why, for the deferral when none is left. */
            d->stats.dane_failed++;
            log_msg(LOG_NOTICE, "event=dane_tempfail domain=%s mx=%s", t->name, h->name);
            if (d->e->mta_sts != NULL) { /* TLS reporting: a DANE failure (RFC 8460 4.3) */
                char ip[64];
                netaddr_ip_str(&a->sa, ip, sizeof(ip));
                tlsrpt_record_tlsa(mta_sts_tlsrpt(d->e->mta_sts), t->name, h->name, NULL, 0,
                                   TLSRPT_DNSSEC_INVALID, ip, h->tlsa_base);
            }
            struct smtp_outcome why;
            memset(&why, 0, sizeof(why));
            why.status = SMTP_STATUS_TEMPFAIL;
            why.scope = SMTP_SCOPE_SESSION;
            why.reason = SMTP_REASON_TLS_UNAVAILABLE;
            why.enh = (struct smtp_enh){4, 7, 5};
            snprintf(why.text, sizeof(why.text),
                     "DANE: TLSA lookup for _25._tcp.%s failed (SERVFAIL or bogus): host not used",
                     h->tlsa_base != NULL ? h->tlsa_base : h->name);
            dest_last_fail_set(t, &why, h->name, NULL);
            t->next_addr++;
            t->failed_addrs++;
            t->own_failed = true;
            continue;
        }
        struct source_pick pk;
        if (dest_source(t, h->name, a->sa.sa_family, &pk) == 0) {
            if (pk.other_family) {
                /* The pool has no source of this address's family: as
                 * an address that failed, the next one. */
                t->next_addr++;
                t->failed_addrs++;
                t->own_failed = true;
                continue;
            }
            /* No source of the pool may send now: held at this site, out
             * of the day's warm-up allowance, or suspended. */
            if (pk.all_held && t->conns == 0)
                dest_hold(t, (pk.until - d->w->now + 999999) / 1000000);
            else
                dest_lim_wait(t, pk.until);
            return;
        }
        const struct dns_mx_host *picked_h = h;
        int picked_family = a->sa.sa_family;
        if (!dest_address_room(t, &h, &a)) {
            /* The address's slots are taken: a connection of this worker
             * that closes wakes t (addr_wake: of its site or of another,
             * such as the many sites of a provider that gives each domain
             * an MX host name of its own on shared servers); one of
             * another worker does not, hence the timer. */
            want_push(t);
            lru_touch(&d->addr_wait, &t->addr_want);
            dest_lim_wait(t, d->w->now + MS_TO_NS(HOLD_MIN_MS));
            return;
        }
        a = dest_addr_unmapped(a, &unmapped); /* another address may have room */
        if ((h != picked_h || a->sa.sa_family != picked_family) &&
            dest_source(t, h->name, a->sa.sa_family, &pk) == 0) {
            /* The address with room is another host's or of the other
             * family: the source was picked for the first (a pool's IPv6
             * source cannot connect to an IPv4 address), so it is picked
             * again; none may go there now: as when no address has room. */
            slot_give_back(d);
            want_push(t);
            dest_lim_wait(t, pk.until);
            return;
        }
        struct mxkey *mk = dest_mxkey(t);
        struct mxkey *sk = src_key(d, pk.src, a->sa.sa_family); /* a: the address it takes */
        /* Each key's lease and connection-rate token, or none: one that
         * refuses gives back what the keys before it took
         * (limits_conn_unacquire), tokens included (t's connection rate
         * spent on a connection an [mx] cap then refused held t back
         * after the slot came free: an hour, at 1/h). */
        uint64_t retry_at;
        if (!limits_conn_acquire(d->lim, &t->lim, d->w->now, &retry_at)) {
            slot_give_back(d);
            dest_lim_wait(t, retry_at);
            return;
        }
        /* Refused by an [mx] or [source] limit: t waits for its slot, and
         * in its site's line, for a connection of the site with nothing
         * more to send (conn_take_waiting: one idle does not quit for a
         * domain of its own site). */
        if (mk != NULL && !limits_conn_acquire(d->lim, &mk->lim, d->w->now, &retry_at)) {
            slot_give_back(d);
            limits_conn_unacquire(d->lim, &t->lim, d->w->now);
            mx_wait(mk, t, retry_at, true);
            want_push(t);
            return;
        }
        if (sk != NULL && !limits_conn_acquire(d->lim, &sk->lim, d->w->now, &retry_at)) {
            slot_give_back(d);
            limits_conn_unacquire(d->lim, &t->lim, d->w->now);
            if (mk != NULL)
                limits_conn_unacquire(d->lim, &mk->lim, d->w->now);
            mx_wait(sk, t, retry_at, true);
            want_push(t);
            return;
        }
        struct open_fail why = {0}; /* err 0 if open says nothing: tried again */
        struct conn *c = d->ops->open(t, h, a, pk.src, pk.id, &why);
        if (c == NULL) {
            slot_give_back(d); /* none if it was attached before it failed */
            limits_conn_unacquire(d->lim, &t->lim, d->w->now); /* no connection: */
            if (mk != NULL)                                     /* tokens back too */
                limits_conn_unacquire(d->lim, &mk->lim, d->w->now);
            if (sk != NULL)
                limits_conn_unacquire(d->lim, &sk->lim, d->w->now);
            if (!policy_open_failed(why.err)) {
                /* no memory now: try again shortly, or nothing would run t
                 * again but another job for it */
                dest_lim_wait(t, d->w->now + MS_TO_NS(HOLD_MIN_MS));
                return;
            }
            /* No socket, no source address. A pool's source whose own
             * failure it was (its address, why.source) rests alone while
             * another of the pool may go: the next one now (one more
             * source held each time round, so this ends). No socket at
             * all is the node's, not a source's: as without a pool. */
            if (pk.src != NULL && why.source[0] != '\0' &&
                source_open_failed(t, pk.id, h->name, a->sa.sa_family))
                continue;
            dest_open_failed(t, &why);
            return;
        }
        source_pick_opened(t, &pk);
        c->leased = true;
        c->mxk = mk;
        c->srck = sk;
    }
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
 * than its max_connections (a reload lowered it), those told to end
 * already aside? The configured cap: without [redis] this worker's part
 * of it (mx_limit_conf), with it the whole, against this worker's own
 * count only, or those Redis counts beyond it across the nodes
 * (limits_key_excess: opened on local shares during an outage); never
 * the smaller local share of a Redis outage, which refuses new
 * connections but ends none. */
static bool
key_over_cap(const struct mxkey *k)
{
    if (k == NULL)
        return false;
    unsigned cap = k->lim.conf.max_connections;
    return cap != 0 && (k->lim.nleases > k->quitting + cap || limits_key_excess(&k->lim) > 0);
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
    /* So too over an [mx] or [source] section's (this worker's part) */
    bool over_mk = !c->over_mk && key_over_cap(c->mxk);
    bool over_sk = !c->over_sk && c->srck != c->mxk && key_over_cap(c->srck);
    const char *quit = c->nmsgs >= sched_conn_max_msgs(c)  ? "max_messages"
                       : d->stopping || d->draining        ? "stopping"
                       : over || over_mk || over_sk        ? over_cap
                       : !source_may_send(c)               ? "source_held"
                       : !shaping_may_send(c)              ? "shaping"
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
        c->quit_why = quit;
        *what = SCHED_NEXT_QUIT;
        return NULL;
    }
    if (site_addr_yield(&d->sites, c->slot, d->e->cfg->delivery.max_connections_per_address,
                        d->w->now)) {
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
    if (!gone && c->nmsgs != 0 && !c->idled && !fairq_empty(&t->q)) {
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
            if (limits_take_msgs(d->lim, &t->lim, 1, d->w->now, &retry_at) != 1) {
                dest_rate_wait(t, retry_at);
                dest_lim_wait(t, retry_at);
                rate_held = true;
            } else if (mk != NULL &&
                       limits_take_msgs(d->lim, &mk->lim, 1, d->w->now, &retry_at) != 1) {
                dest_rate_wait(t, retry_at);
                mx_wait(mk, t, retry_at, false); /* the domain's token is spent: a small loss */
            } else if (sk != NULL &&
                       limits_take_msgs(d->lim, &sk->lim, 1, d->w->now, &retry_at) != 1) {
                dest_rate_wait(t, retry_at);
                mx_wait(sk, t, retry_at, false); /* likewise */
            } else if (hk != NULL &&
                       limits_take_msgs(d->lim, &hk->lim, 1, d->w->now, &retry_at) != 1) {
                dest_rate_wait(t, retry_at);
                mx_wait(hk, t, retry_at, false); /* likewise: its source's shaping rate */
            } else {
                j = dest_pop(t);
            }
            if (j != NULL && scope_job_parked(d, j)) {
                continue; /* its tenant or campaign is suspended: parked */
            }
            if (j != NULL && scope_job_shaped(d, t, j, c->mx))
                continue; /* its tenant is suspended, slowed or bounced at this MX by
                           * shaping: parked for a while, or bounced */
            /* (no plan in the config: nothing to count, and no lock to take
             * on each transaction) */
            if (j != NULL && c->src != NULL && d->e->cfg->nwarmups != 0 &&
                !warmup_take(d->e->warmup, c->src->pattern, c->mx, clock_unix_ms())) {
                /* the day's allowance went meanwhile: another source, or later */
                dest_push(t, j, true);
                c->quit_why = "warmup";
                *what = SCHED_NEXT_QUIT;
                return NULL;
            }
        }
        if (j == NULL &&
            (gone || fairq_empty(&t->q) || dest_paused(t) || !sts_ready || rate_held) &&
            *moves < 8) {
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
            unsigned cap = d->e->cfg->delivery.max_connections_per_address;
            if (fairq_empty(&t->q) &&
                site_addr_wanted(&d->sites, c->slot, cap, d->w->now, c->site)) {
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
    /* A session failure before this connection delivered anything is the
     * server's, not the message's: the job goes to the next MX address
     * (policy_failover() says when). */
    if (policy_failover(&pt)) {
        j->failovers++;
        conn_fail_keep(c, t, &c->txn.msg);
        t->failed_addrs++;
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
        t->next_addr++;
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
                      classify(d->e->cfg->classify, CLASSIFY_REPLY, so->code, &so->enh, so->text) ==
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
        t->next_addr++;
    }
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
    if (site != NULL)
        site->conns--;
    site_addr_give(&d->sites, c->slot);
    c->slot = NULL;
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

/* ---- the worker's scheduler ---- */

int
sched_init(struct delivery *d)
{
    if (sites_init(&d->sites, d->e->site_addrs, d->w->id) < 0)
        return -ENOMEM;
    dests_init(d);
    return 0;
}

void
sched_start(struct delivery *d)
{
    dests_start(d);
}

void
sched_stop(struct delivery *d)
{
    struct worker *w = d->w;
    worker_timer_cancel(w, &d->evict_timer);
    struct dest_iter it = {0};
    for (struct dest *t; (t = dest_next(d, &it)) != NULL;) {
        worker_timer_cancel(w, &t->hold_timer);
        worker_timer_cancel(w, &t->sweep_timer);
        if (t->req != NULL)
            d->ops->cancel(d, t->req);
        t->req = NULL;
    }
}

void
sched_release_leases(struct delivery *d)
{
    struct dest_iter it = {0};
    for (struct dest *t; (t = dest_next(d, &it)) != NULL;) {
        worker_timer_cancel(d->w, &t->lim_timer);
        limits_key_fini(d->lim, &t->lim);
    }
    for (struct mxkey *k = d->mxkeys; k != NULL; k = k->next)
        limits_key_fini(d->lim, &k->lim);
}

void
sched_fini(struct delivery *d)
{
    while (d->mxkeys != NULL) {
        struct mxkey *k = d->mxkeys;
        d->mxkeys = k->next;
        free(k);
    }
    sites_fini(&d->sites);
    free(d->local);
    d->local = NULL;
}
