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
 * A connection, once opened, is outbound/sched_conn.c's: the job it
 * takes when ready (of its domain, or of another domain of its site that
 * waits: MX rollup), jobs an MX host refused going to another host, and
 * what the end of a transaction or of the connection tells the site's
 * window and the destination. What both files use of a destination's
 * state (dest_rate_wait, dest_rate_bound, site_hold_set, dest_mx_refresh,
 * detour_no_room) is here.
 *
 * The destinations themselves (their table, queue, hold and eviction)
 * are outbound/dest.c's.
 *
 * DNS, connections and the failing of jobs are reached through d->ops
 * (only the expiry sweep of held destinations reads the spool itself),
 * so tests/unit/test_scheduler.c drives this file (and sched_conn.c)
 * with scripted answers and connection results.
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

#include "common/hash.h"
#include "common/idn.h"
#include "common/intern.h"
#include "common/log.h"
#include "engine/mta_sts.h"
#include "engine/netaddr.h"
#include "engine/outbound/internal.h"
#include "engine/tlsrpt.h"

static void dest_run_once(struct dest *t);

/* ---- what holds a destination back ---- */

/* t's mail waits for message tokens (its rate, its MX host's, a
 * source's or shaping's) until retry_at: a wait more connections would
 * not shorten. The window's wait counts from then (usable_ns), and its
 * backlog earns nothing while the rate holds it (dest_rate_bound). */
void
dest_rate_wait(struct dest *t, uint64_t retry_at)
{
    uint64_t until = retry_at != UINT64_MAX ? retry_at : t->d->w->now;
    if (until > t->usable_ns)
        t->usable_ns = until;
    t->rate_until = until;
}

/* Did a message rate hold t back within the last RATE_BOUND_NS? */
bool
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
void
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
void
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

/* May t open no connection for a job passed over now (or for its
 * other mail, while a detour's connection idles): at its
 * max_connections, its site's window full, or its [mx] section's cap
 * (the key of t's preferred host: t's connections to every one of its
 * hosts hold a slot of it)? */
bool
detour_no_room(struct dest *t)
{
    if (t->conns >= t->pol->max_connections ||
        (t->site != NULL && t->site->conns >= site_allowed(t)))
        return true;
    const struct mxkey *mk = dest_mxkey(t);
    return mk != NULL && limits_key_capped(&mk->lim, t->d->w->now);
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
    policy_dns(t->mx->status, t->mx->bad_name, t->mx->hosts_nx, t->mx->mx_no_host, &pf);
    if (pf.fail) {
        char text[SMTP_OUTCOME_TEXT_MAX];
        dest_fail_all(t, &pf, policy_dns_text(t->mx, text, sizeof(text)));
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
    bool detour_idle = false; /* a detour's went back idle: none of those again */
    if (fairq_empty(&t->q) || t->refused_queued == 0)
        t->detour_wait = false; /* nothing waits for another host */
    while (!fairq_empty(&t->q) && site->idle != NULL) {
        struct conn **pc = &site->idle;
        struct conn **pdetour = NULL; /* t's idle detour's, with nothing left for it */
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
            /* (Not one to the MX host a waiting job of t goes around,
             * policy_host: it would pass the job over again, and go back
             * to this list with no connection opened for it. Nor a
             * detour's, to the host after it, but for t's jobs refused
             * elsewhere: t's other mail is for the host it prefers.) */
            if (x->tls_pol == dest_tls_key(t, x->mx) && dest_mx_allowed(t, x->mx) &&
                dest_names_mx(t, x) && !(t->detour_wait && job_host_h(x->mx) == t->detour_not_h) &&
                (!x->detour || (!detour_idle && x->dest == t && t->refused_queued != 0)))
                break;
            if (x->detour && x->dest == t && t->refused_queued == 0)
                pdetour = pc;
            pc = &x->next_idle;
        }
        struct conn *c = *pc;
        if (c == NULL && pdetour != NULL && detour_no_room(t)) {
            /* None t may ride but its detour's, idle with no refused
             * job left, holding the room a connection to the host t
             * prefers needs (at t's max_connections, t's mail would
             * wait for its idle_timeout): it ends, and its end runs t */
            c = *pdetour;
            conn_idle_unlink(pdetour);
            c->quit_why = "detour_done";
            d->ops->quit(c);
            break;
        }
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
        if (site->idle == c && c->detour && !detour_idle) {
            /* The refused jobs are not at t's head (behind others, of
             * another tenant): the connections to the host they went
             * around carry t's mail again, and pass them over when they
             * meet them (detour_pass), which runs t for the detour's. */
            detour_idle = true;
            t->detour_wait = false;
            continue;
        }
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
            if (delivery_mta_sts(d) != NULL) { /* TLS reporting: a DANE failure (RFC 8460 4.3) */
                char ip[64];
                netaddr_ip_str(&a->sa, ip, sizeof(ip));
                tlsrpt_record_tlsa(mta_sts_tlsrpt(delivery_mta_sts(d)), t->name, h->name, NULL, 0,
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
        if (t->detour_cursor) {
            /* the connection a job refused by another host waits for:
             * the cursor goes back for t's other mail, unless an address
             * failed meanwhile (the cursor is the failover's then) */
            t->detour_cursor = false;
            if (t->failed_addrs == 0) {
                t->next_addr = t->detour_from;
                c->detour = true; /* not at the cursor: its failure is counted, the
                                   * cursor stays at the host that works */
                t->detour_conns++;
                t->detour_h = job_host_h(h->name);
            }
        }
        source_pick_opened(t, &pk);
        c->leased = true;
        c->mxk = mk;
        c->srck = sk;
    }
}

/* ---- the worker's scheduler ---- */

int
sched_init(struct delivery *d, struct site_addrs *shared)
{
    if (sites_init(&d->sites, shared, d->w->id) < 0)
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
