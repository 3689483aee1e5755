/*
 * site_share: a site's connections shared by its domains, on one worker.
 *
 * Which site a domain's answer names (dest_site: its MX hosts and port,
 * its pool, and the pattern of an [mx PATTERN] section with rollup = yes
 * standing for the hosts it matches); which of a site's connections may
 * carry a domain's mail (conn_may_carry: the TLS the connection was
 * opened under, an MX host the domain's MTA-STS policy and answer name);
 * the line of the site's domains waiting for a connection (want_push: in
 * the order of their turn tags, then of the age of their next mail, as
 * far as want_place's bounded walks find it); a connection moving to
 * another domain of its site (conn_move: the domain's connection lease
 * moves with it, but no token of its connection rate), taken up by a
 * waiting domain when its own has nothing to send (conn_take_waiting) or
 * given to one after a transaction (conn_give_turn: start-time fair
 * queuing over the site's transactions, site_turn_taken and
 * site_turn_join keeping the tags, and connections shared out evenly);
 * and room at the site waking the domains in line (site_wake). The
 * scheduler calls these from dest_run (scheduler.c) and sched_conn_next
 * (sched_conn.c).
 *
 * Threading: the worker's thread.
 */
#include <arpa/inet.h>
#include <stddef.h>
#include <string.h>
#include <strings.h>

#include "common/intern.h"
#include "common/log.h"
#include "engine/outbound/internal.h"

/* The pattern of the [mx] section with rollup = yes that matches MX host
 * name (the first [mx] section that matches it decides); NULL: none. */
static const char *
rollup_pattern(const struct config *cfg, const char *name)
{
    if (cfg->nmxs == 0)
        return NULL;
    const struct mx_policy *m = config_mx(cfg, name);
    return m != NULL && m->rollup ? m->pattern : NULL;
}

/* Whether host h of an answer may be rolled up: not when it has
 * validated TLSA records (its mail goes to it alone, verified so), nor
 * when their lookup failed (RFC 7672 2.2: the host is not used, and its
 * mail must not go elsewhere without DANE instead). */
static bool
rollup_may(const struct dns_mx_host *h)
{
    return h->dane != DNS_DANE_SECURE && h->dane != DNS_DANE_TEMPFAIL;
}

/* site_key's alias: the rollup pattern standing for host h in the key. */
static const char *
rollup_alias(const void *arg, const struct dns_mx_host *h)
{
    return rollup_may(h) ? rollup_pattern(arg, h->name) : NULL;
}

const char *
site_rollup_name(const struct config *cfg, const struct dns_mx_host *h)
{
    return rollup_alias(cfg, h);
}

/* The domain whose node on its site's want list x is. */
static inline struct dest *
dest_of_want(struct lru_node *x)
{
    return (struct dest *)((char *)x - offsetof(struct dest, want));
}

/* The message id of t's next job; UINT64_MAX when none. */
static uint64_t
dest_next_id(const struct dest *t)
{
    const struct job *j = job_of(fairq_peek(&t->q));
    return j != NULL ? j->id : UINT64_MAX;
}

void
dest_want_remove(struct dest *t)
{
    if (t->site != NULL)
        lru_remove(&t->site->want, &t->want);
}

/* Whether a domain with turn tag atag and next message aid goes before
 * one with btag and bid in its site's line: fewer of the site's turns
 * had, then older mail. */
static bool
turn_before(uint64_t atag, uint64_t aid, uint64_t btag, uint64_t bid)
{
    return atag < btag || (atag == btag && aid < bid);
}

/* t goes in its site's line in the order of turn_before: by walking back
 * from the end, past at most SITE_TURN_LOOK domains (the usual place of
 * one that just had a turn), then forward from the front as far (one
 * whose mail is older than all but a few); past more both ways, it goes
 * just ahead of those it walked back past. */
static void
want_place(struct dest *t)
{
    struct site *s = t->site;
    uint64_t id = dest_next_id(t);
    struct lru_node *x = s->want.newest;
    unsigned looked = 0;
    for (; x != NULL && looked < SITE_TURN_LOOK; looked++, x = x->prev) {
        struct dest *y = dest_of_want(x);
        if (!turn_before(t->turn_tag, id, y->turn_tag, dest_next_id(y)))
            break;
    }
    if (x != NULL && looked == SITE_TURN_LOOK) {
        /* x is the first node not compared: from the front, up to x */
        struct lru_node *f = s->want.oldest;
        for (unsigned ahead = 0; f != NULL && ahead < SITE_TURN_LOOK; ahead++, f = f->next) {
            struct dest *y = dest_of_want(f);
            if (turn_before(t->turn_tag, id, y->turn_tag, dest_next_id(y))) {
                lru_insert_before(&s->want, &t->want, f);
                return;
            }
            if (f == x)
                break;
        }
    }
    if (x == NULL)
        lru_age(&s->want, &t->want);
    else if (x->next == NULL)
        lru_touch(&s->want, &t->want);
    else
        lru_insert_before(&s->want, &t->want, x->next);
}

/* t waits for a connection of its site: a slot when one closes or the
 * window grows, or an idle one of another domain (want_place). A domain
 * already waiting keeps its place. */
void
want_push(struct dest *t)
{
    if (t->site == NULL || t->want.on)
        return;
    t->want_since = t->d->w->now;
    want_place(t);
}

/* A transaction of t starts: t has had one more of its site's turns, and
 * the site's clock is the most any of its domains has had. One that fell
 * further than SITE_TURN_CREDIT behind the clock (its rate, a hold, or
 * connections that could not carry it kept it waiting in line) counts
 * from there: what it missed is not made up in a run of turns that would
 * keep the others waiting as long. */
void
site_turn_taken(struct dest *t)
{
    struct site *s = t->site;
    if (s != NULL && t->turn_tag + SITE_TURN_CREDIT < s->turn_clock)
        t->turn_tag = s->turn_clock - SITE_TURN_CREDIT;
    t->turn_tag++;
    if (s == NULL)
        return;
    if (s->turn_clock < t->turn_tag)
        s->turn_clock = t->turn_tag;
    if (t->want.on) {
        /* (in line for more connections while it carries: its place
         * follows its tag and next mail, its time in line stays) */
        lru_remove(&s->want, &t->want);
        want_place(t);
    }
}

/* t's turn tag back to tag, its place in line with it: its queue was
 * emptied and filled again at once (scope_park_all), which site_turn_join
 * took for mail after none. */
void
site_turn_restore(struct dest *t, uint64_t tag)
{
    if (t->turn_tag == tag)
        return;
    t->turn_tag = tag;
    if (t->site != NULL && t->want.on) {
        lru_remove(&t->site->want, &t->want);
        want_place(t);
    }
}

/* t, which had nothing queued, has mail again (or joined its site): it
 * starts at its site's clock, with no turns saved up while it had none
 * to take. */
void
site_turn_join(struct dest *t)
{
    struct site *s = t->site;
    if (s == NULL || t->turn_tag >= s->turn_clock)
        return;
    t->turn_tag = s->turn_clock;
    if (t->want.on) {
        /* (in line with nothing queued while it carried: placed anew) */
        lru_remove(&s->want, &t->want);
        want_place(t);
    }
}

static struct dest *
want_pop(struct site *s)
{
    struct lru_node *x = lru_oldest(&s->want);
    if (x == NULL)
        return NULL;
    lru_remove(&s->want, x);
    return dest_of_want(x);
}

/* The site of t's answer, joined when the answer is new; its window's
 * ceiling raised to t's max_connections then, and after a reload
 * (delivery_reconfigure asks again, having set each site's ceiling to
 * the highest max_connections of its domains: lowered too). */
void
dest_site(struct dest *t)
{
    struct delivery *d = t->d;
    if (t->mx == NULL || t->mx->status != DNS_OK || t->site_for == t->mx)
        return;
    const struct delivery_config *dc = &d->cfg->delivery;
    char key[SITE_KEY_MAX];
    const char *pname = t->pool ? intern_name(d->names, t->pool) : NULL;
    size_t pl = 0;
    if (pname != NULL) {
        /* A pool's connections are its sources': sites of their own,
         * "POOL@" before the hosts (spelt, or hashed, in the room left). */
        pl = strlen(pname);
        if (pl > 64)
            pl = 64; /* pool names are at most CONFIG_NAME_MAX */
        memcpy(key, pname, pl);
        key[pl++] = '@';
    }
    site_key(t->mx, dest_port(t), key + pl, sizeof(key) - pl, rollup_alias, d->cfg);
    /* A pool's site starts with a connection per source at least: each
     * carries its share (and its warm-up allowance) from the start. */
    unsigned initial = dc->initial_connections;
    if (t->poolc != NULL && t->poolc->nsources > initial)
        initial = t->poolc->nsources;
    struct site *s = site_get(&d->sites, key, initial, t->pol->max_connections);
    if (s == NULL)
        return; /* no memory: keep the old one, ask again with the next answer */
    t->site_for = t->mx;
    if (s == t->site) {
        site_unref(&d->sites, s);
    } else {
        dest_want_remove(t);
        site_unref(&d->sites, t->site);
        t->site = s;
        t->turn_tag = s->turn_clock; /* turns of another site count for nothing here */
    }
    /* the highest max_connections of the site's domains */
    if (s->win.ceiling < t->pol->max_connections)
        site_window_set_ceiling(&s->win, t->pol->max_connections);
}

/* The TLS a connection to MX host mx must have to carry t's mail: t's
 * policy, or DANE when t's own answer holds validated TLSA records for the
 * host (RFC 7672). Domains of one site may differ there: a signed domain
 * and an unsigned one naming the same MX host (DANE applies only through
 * a validated MX answer), so an opportunistic connection opened for the
 * one must not carry the other's mail. */
int
dest_tls_key(const struct dest *t, const char *mx)
{
    for (unsigned i = 0; t->mx != NULL && !t->tls_relaxed && i < t->mx->nhosts; i++)
        if (strcmp(t->mx->hosts[i].name, mx) == 0)
            return t->mx->hosts[i].dane == DNS_DANE_SECURE ? TLS_KEY_DANE : dest_tls(t);
    return dest_tls(t);
}

/* Does t's answer name c's MX host, at c's port? Not when a refresh of it
 * (dest_mx_refresh) moved the domain to other hosts, nor after a reload
 * moved its route to another port: a connection open to one of the old
 * finishes its transaction and takes no more of t's mail. By name, as
 * sites are: an address that changed under the same name is the new
 * connections' (a large provider's MX host answers one of many addresses
 * per query: one compared by address would retire every connection of
 * the domain at each refresh). Without an answer (being asked again),
 * as before: yes. Under an [mx] rollup, any host the pattern rolls up
 * into c's site names c's. */
bool
dest_names_mx(const struct dest *t, const struct conn *c)
{
    if (t->mx == NULL)
        return true;
    /* A reload moved t's route to another port of the same host. */
    if (ntohs(c->addr.sa.sa_family == AF_INET6 ? c->addr.sin6.sin6_port : c->addr.sin.sin_port) !=
        dest_port(t))
        return false;
    if (c->answer == t->mx)
        return true;
    for (unsigned i = 0; i < t->mx->nhosts; i++)
        if (strcasecmp(t->mx->hosts[i].name, c->mx) == 0)
            return true;
    /* An [mx] rollup: a host of t's answer that the same pattern rolls
     * up into c's site stands for c's, unless DANE keeps it apart
     * (rollup_may). */
    const struct config *cfg = t->d->cfg;
    const char *ra = c->site == t->site ? rollup_pattern(cfg, c->mx) : NULL;
    for (unsigned i = 0; ra != NULL && i < t->mx->nhosts; i++)
        if (rollup_may(&t->mx->hosts[i]) && rollup_pattern(cfg, t->mx->hosts[i].name) == ra)
            return true;
    return false;
}

/* May c carry t's mail as it was opened: t's site, the TLS c was opened
 * under, an MX host t's MTA-STS policy names and t's answer names (or
 * rolls up: dest_names_mx)? */
static bool
conn_may_carry(const struct conn *c, const struct dest *t)
{
    return t->site == c->site && dest_tls_key(t, c->mx) == c->tls_pol &&
           dest_mx_allowed(t, c->mx) && dest_names_mx(t, c);
}

/* Hand an idle (or finishing) connection c to domain t of its site: the
 * domain's connection lease moves with it. False when t's own limits
 * refuse or its TLS policy differs from the one c was opened with. */
bool
conn_move(struct conn *c, struct dest *t)
{
    struct delivery *d = c->d;
    struct dest *old = c->dest;
    if (old == t)
        return true;
    if (c->detour || !conn_may_carry(c, t))
        return false; /* a detour's carries its domain's refused mail only */
    /* A lease of t's max_connections, but no token of its connection
     * rate: the receiver sees no new connection. */
    uint64_t retry_at;
    if (!limits_lease_acquire(d->lim, &t->lim, d->w->now, &retry_at))
        return false; /* t has its max_connections: those serve it */
    if (c->leased)
        limits_conn_release(d->lim, &old->lim);
    c->leased = true;
    old->conns--;
    t->conns++;
    c->dest = t;
    if (log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, "conn=%llx event=conn_moved site=%s from=%s to=%s",
                (unsigned long long)c->id, c->site->key, old->name,
                t->name);
    return true;
}

/* c moved to t, a domain of its site just taken off the site's list of
 * those waiting; false when c cannot carry it now. */
static bool
conn_take(struct conn *c, struct dest *t)
{
    struct delivery *d = c->d;
    if (fairq_empty(&t->q) || dest_paused(t) || d->w->now < t->hold_until)
        return false; /* nothing to send, or its resume or hold runs it */
    if (!shaping_may_move(c, t) || !conn_move(c, t)) {
        /* c may not carry it (another TLS policy, an MX host its MTA-STS
         * policy does not name, its limits): off the list, it would wait
         * for a wake no end of a connection gives it */
        dest_lim_wait(t, d->w->now + MS_TO_NS(HOLD_MIN_MS));
        return false;
    }
    if (dest_queued(t) > 1)
        want_push(t); /* more for other idle connections */
    return true;
}

/* A domain of c's site that waits for a connection, c moved to it; NULL
 * when none can take it. */
struct dest *
conn_take_waiting(struct conn *c)
{
    struct site *s = c->site;
    struct dest *t;
    while (s != NULL && (t = want_pop(s)) != NULL)
        if (conn_take(c, t))
            return t;
    return NULL;
}

/* Fair turns inside a site (MX rollup): a backlog of one domain must not
 * keep the site's connections while another domain of the site waits
 * behind it (a newsletter to one big mailbox provider's domain ahead of
 * a password reset to a small domain it hosts: before 2026-12-04, the
 * reset waited for the whole newsletter when the site was at its window
 * or its address cap). The rule is start-time fair queuing (Goyal, Vin
 * and Cheng, 1996) over transactions: each domain of a site has a turn
 * tag, the site's turns it has had (site_turn_taken: one a transaction),
 * and one that had nothing queued starts at the site's clock, the most
 * any of them has had (site_turn_join). After each transaction, c's
 * domain t gives c to the first of the SITE_TURN_LOOK domains at the
 * front of the line that holds two of the site's connections fewer than
 * t; else to the one among them holding fewer connections than t that
 * goes first by turn_before (fewer turns, then older mail), if it goes
 * before t. One c may not carry keeps its place; one that may not send
 * now (nothing queued, suspended, held, held by its rate) leaves the
 * line until mail, its resume, its hold or its rate runs it. t then
 * waits in line (want_push). Returns that domain, c moved to it, or
 * NULL (c stays with t).
 *
 * So two backlogs on one connection take one transaction each in turn;
 * behind one backlog, a small domain's message goes after at most one
 * more of the backlog's transactions; and where the site's mail came in
 * turn across its domains (1,000 domains behind one mailbox provider, a
 * message each in turn), deliveries in a row come from nearby messages
 * (a median of 105 to 125 ids apart on 1,000 domains, 991 under the
 * turns by age before), so a commit's removals fall on fewer pages
 * (bench/README.md, "Turns by tag"). They do not keep the order the mail
 * came: domains fed at unequal rates get equal turns, and with more than
 * 2 * SITE_TURN_LOOK domains waiting, want_place's places are
 * approximate and the line works as a round robin ("Why the line is not
 * in the order mail came"). Before, a domain was owed a turn
 * once it had waited SITE_TURN_MS, and one given such a turn held the
 * connection for as long: 1,000 domains each waiting more than that
 * went round in the order they began to wait, a burst each, and the
 * spool wrote five times the pages a message of one domain.
 *
 * With [redis] there are no turns by tag: a domain's connection leases
 * are Redis's, and a move each transaction would ask Redis for one each
 * time. There a domain holding one connection fewer than t is owed its
 * turn once it has waited SITE_TURN_MS (the first such of the front of
 * the line, which is in the order of the tags there too). */
struct dest *
conn_give_turn(struct conn *c, struct dest *t)
{
    struct site *s = c->site;
    struct delivery *d = c->d;
    uint64_t now = d->w->now;
    if (s == NULL || s->want.n == 0 || t->conns < 1)
        return NULL;
    bool by_tag = d->cfg->redis.url == NULL;
    /* t counts its turns on another site when a new answer moved it
     * there (still naming c's host): any domain of c's goes first */
    uint64_t best_tag = t->site == s ? t->turn_tag : UINT64_MAX, best_id = dest_next_id(t);
    struct dest *best = NULL, *w = NULL;
    /* SITE_TURN_LOOK domains looked at, and four times as many passed
     * at most: one c may not carry (another TLS policy, an MX host its
     * MTA-STS policy does not name, a DANE host) keeps its place but is
     * not counted, so a front of such (their tags do not move while they
     * wait) does not keep c from the domains behind them. The carry
     * check, the dearest, is made only of one that would get c. */
    unsigned looked = 0, passed = 0;
    struct lru_node *x = s->want.oldest;
    while (x != NULL && looked < SITE_TURN_LOOK && passed++ < 4 * SITE_TURN_LOOK) {
        struct dest *y = dest_of_want(x);
        x = x->next;
        if (y == t)
            continue;
        if (y->conns + 1 > t->conns) {
            looked++;
            continue;
        }
        bool owed =
            y->conns + 1 < t->conns || (!by_tag && now - y->want_since >= MS_TO_NS(SITE_TURN_MS));
        if (by_tag && (fairq_empty(&y->q) || dest_paused(y) || now < y->hold_until)) {
            /* Off the line, as conn_take takes it: mail, its resume or
             * its hold runs it. Left there, its tag (which only its
             * turns move) would keep it at the front, and a front of
             * such would keep every domain behind them from a turn. */
            lru_remove(&s->want, &y->want);
            continue;
        }
        if (by_tag && now < y->rate_until) {
            lru_remove(&s->want, &y->want);
            dest_lim_wait(y, y->rate_until); /* its run puts it back in line */
            continue;
        }
        if (owed) {
            if (!conn_may_carry(c, y))
                continue;
            lru_remove(&s->want, &y->want);
            if (conn_take(c, y)) {
                w = y;
                break;
            }
            looked++;
            continue;
        }
        if (!by_tag) {
            looked++;
            continue;
        }
        uint64_t id = dest_next_id(y);
        if (!turn_before(y->turn_tag, id, best_tag, best_id)) {
            looked++;
        } else if (conn_may_carry(c, y)) {
            looked++;
            best_tag = y->turn_tag;
            best_id = id;
            best = y;
        }
    }
    const char *why = "owed";
    if (w == NULL && best != NULL) {
        lru_remove(&s->want, &best->want);
        if (conn_take(c, best))
            w = best;
        why = "tag";
    }
    if (w == NULL)
        return NULL;
    /* Its backlog waits in line again, by its tag now: t may have been
     * on the list since it took a connection (conn_take pushes a domain
     * with more), in the place its tag had then. */
    dest_want_remove(t);
    want_push(t);
    if (log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, "conn=%llx event=site_turn site=%s from=%s to=%s why=%s",
                (unsigned long long)c->id, s->key, t->name, w->name, why);
    d->stats.site_turns++;
    return w;
}

/* Room at site s (a connection closed, the window grew, its rest ended):
 * let the domains waiting for it run, as many as it has room for. */
void
site_wake(struct delivery *d, struct site *s)
{
    if (s == NULL || d->stopping)
        return;
    if (s->hold_until > d->w->now && s->conns < site_window_allowed(&s->win)) {
        /* It rests: each waiting domain would only rest too, its mail
         * deferred when the rest has a failure (scheduler.c). They run
         * from their own timers, due now, which the loop fires a slice
         * of a turn at a time (worker.c), not all in this one: 10,000
         * domains deferring 200,000 recipients took a turn of 1 s. */
        while (s->want.oldest != NULL) {
            struct lru_node *x = s->want.oldest;
            lru_remove(&s->want, x);
            dest_lim_wait(dest_of_want(x), d->w->now);
        }
        return;
    }
    s->refs++; /* dest_run may drop the last other reference */
    /* Every waiting domain that finds room, with no cap on how many: one
     * left waiting has nothing else to wake it when no connection of the
     * site is left to end (a resting site whose only one failed: with a
     * cap of 64, the 65th domain on waited forever, its mail untold).
     * A domain at its own max_connections (the site's connections are
     * counted against it: site_allowed) is passed over where it waits,
     * not run: the next may have room under a cap of its own (before,
     * they waited for the site's last connection to end). The runs are
     * bounded by the domains waiting now, so it ends. */
    size_t runs = s->want.n;
    struct lru_node *x = s->want.oldest;
    while (runs > 0 && x != NULL && s->conns < site_window_allowed(&s->win)) {
        struct dest *t = dest_of_want(x);
        if (s->conns >= t->pol->max_connections) {
            x = x->next;
            continue;
        }
        lru_remove(&s->want, x);
        runs--;
        dest_run(t);
        /* Back on the list: the site could not open one (an address's
         * slots, a source), nor would it for the others. */
        if (t->site == s && t->want.on)
            break;
        x = s->want.oldest; /* the run may have changed the list */
    }
    if (s->conns == 0 && s->want.n > 0) {
        /* It could not for a reason of its own (its max_connections, the
         * address slots other workers hold, its source): with nothing of
         * the site open here, no end of a connection will wake the
         * others, so each runs again soon by itself. */
        for (struct lru_node *y = s->want.oldest; y != NULL; y = y->next)
            dest_lim_wait(dest_of_want(y),
                          d->w->now + MS_TO_NS(HOLD_MIN_MS));
    }
    site_unref(&d->sites, s);
}
