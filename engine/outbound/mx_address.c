/*
 * mx_address: which MX address a destination's new connection goes to,
 * and its slot there, on one worker.
 *
 * The address at the destination's failover cursor, in MX order, passing
 * over targets mail must not go to (targets.c), hosts its MTA-STS policy
 * does not name, and addresses that refused another domain of its site
 * lately (dest_address). Its slot in the node's per-address table
 * (site_addrs.c): when max_connections_per_address (its pool's) is full
 * there, the least busy address of an MX host of the same preference that
 * has room; when none has, an idle connection of another site of this
 * worker at that address is told to say goodbye (addr_idle_quit). A slot
 * freed by a closing connection runs the destinations, of any site, that
 * found an address full, oldest first (addr_wake). The scheduler calls
 * these from dest_run (scheduler.c) and sched_conn_detach (sched_conn.c).
 *
 * Threading: the worker's thread.
 */
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>

#include "common/hash.h"
#include "engine/netaddr.h"
#include "engine/outbound/internal.h"

/* Addresses dest_addr_cap tells apart; past them each counts. */
#define ADDR_CAP_SEEN 32

/* The address of t's answer at its failover cursor (of total), in MX
 * order; false when there is none. */
static bool
dest_address_nth(const struct dest *t, unsigned total, const struct dns_mx_host **host,
                 const union dns_addr **addr)
{
    unsigned k = t->next_addr % total;
    for (unsigned h = 0; h < t->mx->nhosts; h++)
        for (unsigned i = 0; i < t->mx->hosts[h].naddrs; i++) {
            if (target_refused(t->d, &t->mx->hosts[h].addrs[i], dest_port(t)) != NULL ||
                !dest_mx_allowed(t, t->mx->hosts[h].name))
                continue;
            if (k-- == 0) {
                *host = &t->mx->hosts[h];
                *addr = &t->mx->hosts[h].addrs[i];
                return true;
            }
        }
    return false;
}

/* Pick the next address of the answer, in MX order, failover cursor
 * included. Returns false when every address has failed in a row. */
bool
dest_address(struct dest *t, const struct dns_mx_host **host, const union dns_addr **addr)
{
    unsigned total = t->targets_for == t->mx ? t->ntargets : 0;
    for (;;) {
        if (total == 0 || t->failed_addrs >= total || !dest_address_nth(t, total, host, addr))
            return false;
        /* An address that refused another domain of the site lately
         * (site_addr_down) is passed over as if it had failed here too,
         * unless it is the last one left to try. */
        if (t->site == NULL || t->failed_addrs + 1 >= total ||
            !site_addr_is_down(t->site, *addr, t->d->w->now))
            return true;
        t->next_addr++;
        t->failed_addrs++;
    }
}

uint32_t
job_host_h(const char *host)
{
    uint64_t h = hash_str_nocase(host);
    return (uint32_t)(h ^ (h >> 32));
}

bool
job_refused_by(const struct job *j, const char *host)
{
    if (j->nrefused == 0 || host == NULL)
        return false;
    uint32_t h = job_host_h(host);
    for (unsigned i = 0; i < j->nrefused; i++)
        if (j->refused_h[i] == h)
            return true;
    return false;
}

unsigned
dest_hosts(struct dest *t)
{
    unsigned n = 0;
    if (t->mx == NULL)
        return 0;
    for (unsigned h = 0; h < t->mx->nhosts; h++) {
        if (!dest_mx_allowed(t, t->mx->hosts[h].name))
            continue;
        for (unsigned i = 0; i < t->mx->hosts[h].naddrs; i++)
            if (target_refused(t->d, &t->mx->hosts[h].addrs[i], dest_port(t)) == NULL) {
                n++;
                break;
            }
    }
    return n;
}

/* Is the address at t's failover cursor one of a host that did not
 * refuse j (where t's next connection goes)? */
static bool
dest_cursor_elsewhere(struct dest *t, const struct job *j)
{
    unsigned total = t->targets_for == t->mx ? t->ntargets : 0;
    const struct dns_mx_host *h;
    const union dns_addr *a;
    return total != 0 && dest_address_nth(t, total, &h, &a) && !job_refused_by(j, h->name);
}

bool
dest_elsewhere_up(struct dest *t, const struct job *j)
{
    if (t->mx == NULL)
        return false;
    for (unsigned h = 0; h < t->mx->nhosts; h++) {
        const struct dns_mx_host *mh = &t->mx->hosts[h];
        if (!dest_mx_allowed(t, mh->name) || job_refused_by(j, mh->name))
            continue;
        for (unsigned i = 0; i < mh->naddrs; i++)
            if (target_refused(t->d, &mh->addrs[i], dest_port(t)) == NULL &&
                (t->site == NULL || !site_addr_is_down(t->site, &mh->addrs[i], t->d->w->now)))
                return true;
    }
    return false;
}

bool
dest_cursor_past(struct dest *t, const struct job *j)
{
    unsigned total = t->targets_for == t->mx ? t->ntargets : 0;
    unsigned was = t->next_addr;
    for (unsigned k = 0; k < total; k++) {
        if (dest_cursor_elsewhere(t, j)) {
            if (t->next_addr != was && !t->detour_cursor) {
                t->detour_cursor = true;
                t->detour_from = was;
            }
            return true;
        }
        t->next_addr++;
    }
    t->next_addr = was;
    return false;
}

/* Where a connection to a goes: a itself, or for a v4-mapped address
 * (an AAAA record of ::ffff:a.b.c.d) the IPv4 address a.b.c.d, written
 * in *tmp. The connection is an IPv4 one: its source is picked and
 * bound in that family (a v6 socket bound to an IPv6 source cannot reach
 * a v4-mapped address: ENETUNREACH), and its address is counted, keyed
 * (the plaintext fallback, TLS sessions) and logged as IPv4. */
const union dns_addr *
dest_addr_unmapped(const union dns_addr *a, union dns_addr *tmp)
{
    struct sockaddr_in v4;
    if (!netaddr_v4mapped(&a->sa, &v4))
        return a; /* tmp itself, maybe: left as it is */
    memset(tmp, 0, sizeof(*tmp));
    tmp->sin = v4;
    return tmp;
}

/* a with t's port. */
void
dest_addr_port(const struct dest *t, const union dns_addr *a, union dns_addr *out)
{
    *out = *a;
    uint16_t port = htons((uint16_t)dest_port(t));
    if (out->sa.sa_family == AF_INET6)
        out->sin6.sin6_port = port;
    else
        out->sin.sin_port = port;
}

/* Whose count of connections to an MX address a connection of t takes
 * (site.h): its pool's (0: the node's default source). A pool's sources
 * share the pool's; each pool, and mail without one, has the cap whole. */
static uint32_t
dest_addr_owner(const struct dest *t)
{
    return t->pool;
}

/* An idle connection of this worker at MX address k (port included),
 * counted as owner's, of a site other than mine (whose domains would
 * ride it, not wait): it says goodbye, its end frees the slot for those
 * waiting (addr_wake). Before, an idle connection looked for such a want
 * only as it went idle: one that came later (another site of the many a
 * provider with an MX host name per domain makes) waited for its
 * idle_timeout, the address's cap full of idle connections, 76 messages
 * a second where one domain makes 8,700. True when one was told. A walk
 * of the worker's connections that found none for this owner and
 * address is not made again in the same turn of the loop (every waiting
 * domain run in it would walk them all for nothing). Only this worker's:
 * one idle on another worker gives its slot back as it goes idle, or at
 * its idle_timeout. */
static bool
addr_idle_quit(struct delivery *d, const struct site *mine, uint32_t owner,
               const union dns_addr *k)
{
    unsigned char kk[18], ck[18];
    size_t kl = site_addr_key(k, kk);
    if (d->addr_idle_none_at == d->w->now && d->addr_idle_none_owner == owner &&
        d->addr_idle_none_len == kl && memcmp(d->addr_idle_none_key, kk, kl) == 0)
        return false;
    for (struct conn *c = d->all; c != NULL; c = c->next_all) {
        if (!c->on_idle || c->site == NULL || c->site == mine || c->want_close || c->closed ||
            c->dest == NULL || dest_addr_owner(c->dest) != owner ||
            site_addr_key(&c->addr, ck) != kl || memcmp(ck, kk, kl) != 0)
            continue;
        if (conn_idle_quit(c, "address_wanted"))
            return true;
    }
    d->addr_idle_none_at = d->w->now;
    d->addr_idle_none_owner = owner;
    d->addr_idle_none_len = kl;
    memcpy(d->addr_idle_none_key, kk, kl);
    return false;
}

/* The owner and address (port included) t waits for, as a hash. */
static uint64_t
addr_want_hash(uint32_t owner, const union dns_addr *k)
{
    unsigned char kk[24];
    memcpy(kk, &owner, sizeof(owner));
    size_t kl = site_addr_key(k, kk + sizeof(owner));
    return hash_bytes(kk, sizeof(owner) + kl);
}

/* t took a slot at address k (port included) of owner: it waits for an
 * address no more. The take cleared this worker's want there
 * (site_addr_take); when another destination of the worker still waits
 * for that address (of the oldest ADDR_WAIT_LOOK on d->addr_wait, one
 * with mail), the want stands again, for its site. Before, the first
 * domain served cleared it for all: 1,000 domains with an MX host name
 * each on one server waited for their one-second timers while the
 * connections there went idle, not asked for their slots (the machine a
 * third busy, 24% of one domain's rate). */
#define ADDR_WAIT_LOOK 16
static void
addr_taken(struct dest *t, uint32_t owner, const union dns_addr *k)
{
    struct delivery *d = t->d;
    lru_remove(&d->addr_wait, &t->addr_want);
    if (d->addr_wait.oldest == NULL)
        return;
    uint64_t h = addr_want_hash(owner, k);
    unsigned looked = 0;
    for (struct lru_node *x = d->addr_wait.oldest; x != NULL && looked++ < ADDR_WAIT_LOOK;
         x = x->next) {
        const struct dest *w =
            (const struct dest *)((const char *)x - offsetof(struct dest, addr_want));
        if (w->addr_want_h == h && !fairq_empty(&w->q) && !dest_paused(w)) {
            site_addr_want(&d->sites, owner, k, d->w->now + 2 * MS_TO_NS(HOLD_MIN_MS), w->site);
            return;
        }
    }
}

/* The address a new connection of t goes to, and its slot there: the
 * failover cursor's, unless max_connections_per_address (its pool's) are
 * open there from this node (any worker's, site.h); then the least busy
 * address of an MX host of the same preference with room (never a backup
 * MX for want of room). The slot taken is d->slot_taken, for the
 * connection's sched_conn_attach(), or to give back (slot_give_back)
 * when none opens (NULL: no memory for the entry; it opens uncounted).
 * False when no address has room. */
bool
dest_address_room(struct dest *t, const struct dns_mx_host **host, const union dns_addr **addr)
{
    struct delivery *d = t->d;
    uint32_t owner = dest_addr_owner(t);
    unsigned cap = d->cfg->delivery.max_connections_per_address;
    union dns_addr k;
    dest_addr_port(t, *addr, &k);
    if (t->site != NULL && t->site->conns + 1 >= SITE_BUSY_CONNS)
        site_mark_busy(t); /* this one would be its SITE_BUSY_CONNS-th here */
    int rc = site_addr_take(&d->sites, owner, &k, cap, d->w->now, &d->slot_taken);
    if (rc == 0)
        addr_taken(t, owner, &k);
    if (rc != -EBUSY)
        return true;
    /* Full: not a sign that the site needs another worker (affinity.c):
     * the cap is the node's, another worker would find it full too. A
     * connection that goes idle at this address gives its slot
     * back instead (sched_conn_next), until t tries again; one of
     * another site of this worker idle there already does now, when no
     * other address has room either (addr_idle_quit, below). */
    uint64_t until = d->w->now + 2 * MS_TO_NS(HOLD_MIN_MS);
    site_addr_want(&d->sites, owner, &k, until, t->site);
    union dns_addr first = k;
    t->addr_want_h = addr_want_hash(owner, &first); /* for addr_taken, if it waits */
    unsigned pref = (*host)->preference, best = cap;
    for (unsigned h = 0; h < t->mx->nhosts; h++) {
        const struct dns_mx_host *x = &t->mx->hosts[h];
        if (x->preference != pref || !dest_mx_allowed(t, x->name))
            continue;
        for (unsigned i = 0; i < x->naddrs; i++) {
            if (target_refused(d, &x->addrs[i], dest_port(t)) != NULL)
                continue;
            dest_addr_port(t, &x->addrs[i], &k);
            unsigned n = site_addr_conns(&d->sites, owner, &k);
            if (n >= cap)
                site_addr_want(&d->sites, owner, &k, until, t->site);
            if (n < best) {
                best = n;
                *host = x;
                *addr = &x->addrs[i];
            }
        }
    }
    if (best >= cap) {
        addr_idle_quit(d, t->site, owner, &first);
        return false;
    }
    /* Another worker may have taken the last slot meanwhile. */
    dest_addr_port(t, *addr, &k);
    rc = site_addr_take(&d->sites, owner, &k, cap, d->w->now, &d->slot_taken);
    if (rc == 0)
        addr_taken(t, owner, &k);
    return rc != -EBUSY;
}

/* The slot dest_address_room() took, when no connection opens. */
void
slot_give_back(struct delivery *d)
{
    site_addr_give(&d->sites, d->slot_taken, false);
    d->slot_taken = NULL;
}

/* (internal.h) */
unsigned
dest_addr_cap(const struct dest *t)
{
    unsigned cap = t->d->cfg->delivery.max_connections_per_address;
    if (cap == 0 || t->mx == NULL || t->mx->nhosts == 0)
        return 0;
    /* The addresses of the failover cursor's preference that may be
     * delivered to, each once (two names may share one), as
     * dest_address_room chooses among them: another of them when one is
     * full, never a backup MX for room. */
    const struct dns_mx_host *at = &t->mx->hosts[0];
    const union dns_addr *a;
    unsigned total = t->targets_for == t->mx ? t->ntargets : 0;
    if (total != 0 && !dest_address_nth(t, total, &at, &a))
        at = &t->mx->hosts[0];
    unsigned char seen[ADDR_CAP_SEEN][18];
    size_t len[ADDR_CAP_SEEN];
    unsigned n = 0, pref = at->preference;
    for (unsigned h = 0; h < t->mx->nhosts; h++) {
        if (t->mx->hosts[h].preference != pref || !dest_mx_allowed(t, t->mx->hosts[h].name))
            continue;
        for (unsigned i = 0; i < t->mx->hosts[h].naddrs; i++) {
            if (target_refused(t->d, &t->mx->hosts[h].addrs[i], dest_port(t)) != NULL)
                continue;
            unsigned char k[18];
            size_t l = site_addr_key(&t->mx->hosts[h].addrs[i], k);
            bool dup = false;
            for (unsigned x = 0; x < n && x < ADDR_CAP_SEEN && !dup; x++)
                dup = len[x] == l && memcmp(seen[x], k, l) == 0;
            if (dup)
                continue;
            if (n < ADDR_CAP_SEEN) {
                memcpy(seen[n], k, l);
                len[n] = l;
            }
            n++;
        }
    }
    uint64_t all = (uint64_t)cap * n;
    return all < UINT_MAX ? (unsigned)all : UINT_MAX;
}

/* A connection of this worker closed, its MX address slot free: the
 * destinations that found an address full run again, oldest first, until
 * one opens a connection (the slot is taken again), at most
 * ADDR_WAKE_RUNS of them. Before, only those of the closing connection's
 * site were woken: 1,000 domains with an MX host name each on one server
 * (a site each, the per-address cap full) waited for their timers,
 * a second, with the freed slots empty meanwhile: 300 messages a second
 * where one domain makes 12,000. */
#define ADDR_WAKE_RUNS 8
void
addr_wake(struct delivery *d)
{
    for (unsigned k = 0; k < ADDR_WAKE_RUNS && d->addr_wait.oldest != NULL; k++) {
        struct dest *w = (struct dest *)((char *)d->addr_wait.oldest -
                                         offsetof(struct dest, addr_want));
        lru_remove(&d->addr_wait, &w->addr_want);
        uint64_t opened = d->stats.connections;
        dest_run(w);
        if (d->stats.connections != opened)
            break;
    }
}
