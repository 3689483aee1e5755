/*
 * affinity: site affinity, the choice of the worker a destination
 * domain's mail is sent from (outbound/scheduler.c asks before it
 * resolves and before it joins a site; the route table the workers share
 * is engine/route.h, delivery.c's ops reach it).
 *
 * With several workers, a domain starts on the worker its name hashes to
 * (delivery_worker_of). Once its MX answer names its site, the domain
 * moves to the site's worker (a hash of the site's first MX host: the
 * least name of the best preference, or the pattern of the [mx] section
 * with rollup = yes that rolls that host up, site_host), so that every
 * domain of a site is sent from one worker and each MX address sees one
 * worker's connections, not one set per worker (over 100 MX hosts, two
 * workers held 200
 * connections where 100 carried the mail, and the receivers' cost of the
 * second set took the second core's gain: bench/relay/bench_sites.py).
 * The move is made when the answer comes, before the domain's first
 * connection (a reload decides again for every domain: an [mx] section
 * with rollup = yes it adds or removes changes the site's name, and the
 * domain may then move with connections open: they finish their
 * transactions): its claim in the
 * route table, then its answer and waiting jobs handed over in one
 * post. A later answer moves it again only when its site's worker
 * changed (dest_affinity); a domain idle long enough to be forgotten
 * empties its claim.
 *
 * Only for sites that one worker carries: a site whose connections on a
 * worker reach SITE_BUSY_CONNS is marked
 * busy in the route table, and the domains met after are left on the
 * worker their name hashes to, so that a site as big as a large mail
 * provider's is sent from every worker, as before affinity (gathered on
 * one, 10,000 domains on one MX host ran 6% slower, one core busy and the
 * other not). The mark lasts SITE_BUSY_MS after the site was last found
 * busy; the domains gathered before it stay.
 *
 * Not for mail through a pool: the route table holds one claim per
 * domain, its mail's without a pool, and a domain's pool mail stays on
 * the worker its name hashes to (delivery_worker_of); tls_relaxed mail
 * follows the domain's claim and makes none. The domains under an [mx] section and
 * mail from a default source a [source] section names are gathered like
 * any other: the limits the workers share are whole for one worker. The
 * cap per MX address is the node's, one count for every worker (site.h),
 * and so is an [mx] or [source] section's max_connections (node_caps.h;
 * with [redis], Redis's); the sections' rates are split between the
 * workers, but a worker may borrow the parts of those that ask for none
 * (node_cap_rate_take), so a site gathered on one worker gets the whole
 * rate. (Until the node counted them, the sections' limits were split,
 * and a site gathered on one worker got one worker's share: their
 * domains stayed on their hash's worker, and each worker opened its own
 * set of connections to the same MX hosts.) A site whose cap is full is
 * not busy for that (another worker would find it full too).
 *
 * Threading: the worker's thread.
 */
#include <stdbool.h>
#include <strings.h>

#include "common/hash.h"
#include "engine/outbound/internal.h"

/* The name of t's site for affinity: the least MX host name of the best
 * preference, whatever order the answer lists them in; or, when an [mx]
 * section with rollup = yes rolls that host up, the section's pattern,
 * so that the domains it makes one site (each with an MX host name of
 * its own, Microsoft 365's shape) are gathered on one worker too. */
static const char *
site_host(const struct dest *t)
{
    const struct dns_mx_result *mx = t->mx;
    const struct dns_mx_host *best = &mx->hosts[0];
    for (unsigned i = 1; i < mx->nhosts && mx->hosts[i].preference == mx->hosts[0].preference;
         i++)
        if (strcasecmp(mx->hosts[i].name, best->name) < 0)
            best = &mx->hosts[i];
    const char *rollup = site_rollup_name(t->d->cfg, best);
    return rollup != NULL ? rollup : best->name;
}

/* The worker of t's site, from its answer. */
static unsigned
site_worker(const struct dest *t, unsigned workers)
{
    return (unsigned)(hash_str_nocase(site_host(t)) % workers);
}

/* A site busier than one worker's share of it: its domains are no longer
 * gathered (see above). */
void
site_mark_busy(const struct dest *t)
{
    struct delivery *d = t->d;
    if (d->ops->site_busy != NULL && t->pool == 0 && t->mx != NULL && t->mx->nhosts > 0)
        d->ops->site_busy(d, site_host(t));
}

/* Is t's domain another worker's now? Then its waiting jobs go there. */
bool
dest_elsewhere(struct dest *t)
{
    struct delivery *d = t->d;
    if (d->ops->route == NULL || t->pool != 0)
        return false;
    unsigned w = d->ops->route(d, t->name);
    if (w == d->w->id)
        return false;
    d->ops->hand_over(t, w);
    dest_moved(t);
    return true;
}

/* t has a new answer: where its domain belongs. The first names its
 * site: the domain is claimed for the site's worker and, if that is
 * another, moves there (its jobs handed over). A later one moves it
 * again only if it changed the site's worker (its MX hosts changed):
 * this worker's claim goes, and a new one is made; an answer without
 * hosts sends the domain back to its hash's worker. True when t's jobs
 * moved. A pool's destination is where the domain's name hashes (pool
 * mail is not gathered); a tls_relaxed one follows the domain's claim
 * and makes none. */
bool
dest_affinity(struct dest *t)
{
    struct delivery *d = t->d;
    if (d->ops->claim == NULL || d->nworkers < 2 || t->affinity_for == t->mx)
        return false;
    t->affinity_for = t->mx;
    if (t->pool != 0 || t->tls_relaxed)
        return false;
    bool may = t->mx->nhosts > 0;
    const char *host = may ? site_host(t) : NULL;
    unsigned w = may ? site_worker(t, d->nworkers) : d->w->id;
    if (may && w == d->w->id)
        return false; /* its hash's worker, or claimed for this one already */
    d->ops->unclaim(d, t->name);
    if (!may)
        return dest_elsewhere(t);
    if (!d->ops->claim(d, t->name, w, host))
        return dest_elsewhere(t); /* a busy site, full slots, or another worker's
                                   * claim of the domain: its hash's worker */
    d->ops->hand_over(t, w);
    dest_moved(t);
    return true;
}

