/*
 * site_addrs: the connections open per (owner, MX address) on this node,
 * one table for every worker (site.h says what it is for).
 *
 * Each worker used to count its own connections against an equal share
 * of max_connections_per_address, so that the cap held without any
 * exchange between them. But a site's domains are gathered on one
 * worker (site affinity), and a domain never leaves its worker: with two
 * workers a slow receiver capped at 6 got 3 connections, with sixteen a
 * large provider's one domain got 2 of the default 40. The count is now
 * the node's: a connection takes a slot (site_addr_take) before it is
 * opened, under the lock of the table's stripe its key hashes to, and
 * gives it back when it ends. Takes and gives are per connection, not
 * per message, and are spread over SITE_ADDR_STRIPES locks: the workers
 * hardly ever meet there.
 *
 * The share each worker used to hold (cap / workers, at least one) is
 * its floor: with no other worker wanting, one worker may hold the whole
 * cap; when another wants a slot (site_addr_want: a domain of it found
 * none) and holds fewer than its floor, the slots left are kept for it
 * (site_addr_take refuses them to a worker past its floor), and a
 * connection of a worker past its floor there gives its slot back after
 * its transaction (site_addr_yield, sched_conn.c), or at once when it has
 * nothing to send (site_addr_wanted), so a worker's domain waits for no
 * more than a transaction of the others, not their backlog. One slot
 * goes per wanting worker: no connection yields while the slots free and
 * those of connections already yielding (each entry counts them, until
 * their site_addr_give) cover the workers that want one. A want is for
 * one slot (a worker that needs more is refused again, and wants again),
 * and several connections that finish their transactions before the
 * first has gone would otherwise all yield: the slots beyond the one
 * wanted were then taken back by their own worker, connections closed
 * and opened again for nothing (four workers, a cap of 8: six ended for
 * two wanted). A worker at or below its floor keeps its slots: given to
 * a worker past its own, they would be wanted back at once.
 * A cap lowered by a reload holds at the take only: a connection that
 * finds its address over it, those already going counted, ends after its
 * transaction too (site_addr_over), counted as yielding until it has.
 * Each entry keeps every worker's count, yielding count and want; the
 * holders read them through their own entry with no lock (atomics: read
 * a little late, they cost one idle connection a little longer), and a
 * connection that should yield is asked again and counted under the
 * stripe's lock, where every count changes: two workers' connections
 * that read the same want at once would otherwise both go.
 *
 * Threading: any worker's thread; the stripes' locks.
 */
#include "engine/outbound/site.h"
#include "engine/netaddr.h"

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define SITE_ADDR_STRIPES 16

/* One worker's part of an address: its connections there and its want. */
struct site_addr_worker {
    _Atomic unsigned conns;            /* changed under the stripe's lock */
    _Atomic unsigned yielding;         /* of conns, told to give theirs back (site_addr_yield) */
    _Atomic uint64_t wanted_until;     /* ns: a domain of it found no room here ... */
    _Atomic(const void *) wanted_by;   /* ... of this site (compared, never followed) */
};

struct site_addr {
    struct hash_node node;
    uint32_t src;                      /* the owner: a pool's name id (0: no pool) */
    union dns_addr a;                  /* port included */
    _Atomic unsigned conns;            /* every worker's; changed under the stripe's lock */
    struct site_addr_worker w[];       /* the table's workers */
};

struct site_addrs {
    unsigned workers;
    struct {
        pthread_mutex_t lock;
        struct hash h; /* struct site_addr */
    } stripe[SITE_ADDR_STRIPES];
};

size_t
site_addr_key(const union dns_addr *a, unsigned char *out)
{
    struct sockaddr_in v4;
    if (netaddr_v4mapped(&a->sa, &v4)) {
        memcpy(out, &v4.sin_addr, 4);
        memcpy(out + 4, &v4.sin_port, 2);
        return 6;
    }
    if (a->sa.sa_family == AF_INET6) {
        memcpy(out, &a->sin6.sin6_addr, 16);
        memcpy(out + 16, &a->sin6.sin6_port, 2);
        return 18;
    }
    memcpy(out, &a->sin.sin_addr, 4);
    memcpy(out + 4, &a->sin.sin_port, 2);
    return 6;
}

/* What the table is looked up by: an owner (a pool) and an MX address. */
struct addr_ref {
    uint32_t src;
    const union dns_addr *a;
};

static bool
addr_eq(const struct hash_node *n, const void *key)
{
    const struct site_addr *x = (const struct site_addr *)n;
    const struct addr_ref *r = key;
    unsigned char k1[18], k2[18];
    size_t l1 = site_addr_key(&x->a, k1), l2 = site_addr_key(r->a, k2);
    return x->src == r->src && l1 == l2 && memcmp(k1, k2, l1) == 0;
}

static uint64_t
addr_hash(const struct addr_ref *r)
{
    unsigned char k[22];
    size_t n = site_addr_key(r->a, k);
    memcpy(k + n, &r->src, 4);
    return hash_bytes(k, n + 4);
}

/* The table uses the hash's low bits for its buckets: the stripe takes
 * the high ones. */
static unsigned
stripe_of(uint64_t h)
{
    return (unsigned)(h >> 60) % SITE_ADDR_STRIPES;
}

struct site_addrs *
site_addrs_new(unsigned workers)
{
    struct site_addrs *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    t->workers = workers ? workers : 1;
    for (unsigned i = 0; i < SITE_ADDR_STRIPES; i++) {
        pthread_mutex_init(&t->stripe[i].lock, NULL);
        hash_init(&t->stripe[i].h, addr_eq, 8);
    }
    return t;
}

void
site_addrs_free(struct site_addrs *t)
{
    if (t == NULL)
        return;
    for (unsigned i = 0; i < SITE_ADDR_STRIPES; i++) {
        size_t b = 0;
        struct hash_node *cur = NULL, *n;
        while ((n = hash_next(&t->stripe[i].h, &b, &cur)) != NULL)
            free(n);
        hash_fini(&t->stripe[i].h);
        pthread_mutex_destroy(&t->stripe[i].lock);
    }
    free(t);
}

size_t
site_addrs_count(struct site_addrs *t)
{
    size_t n = 0;
    for (unsigned i = 0; i < SITE_ADDR_STRIPES; i++) {
        pthread_mutex_lock(&t->stripe[i].lock);
        n += hash_count(&t->stripe[i].h);
        pthread_mutex_unlock(&t->stripe[i].lock);
    }
    return n;
}

unsigned
site_addr_conns(const struct sites *s, uint32_t src, const union dns_addr *a)
{
    struct addr_ref r = {src, a};
    uint64_t h = addr_hash(&r);
    unsigned k = stripe_of(h);
    pthread_mutex_lock(&s->addrs->stripe[k].lock);
    const struct site_addr *x = (const struct site_addr *)hash_find(&s->addrs->stripe[k].h, h, &r);
    unsigned n = x ? atomic_load_explicit(&x->conns, memory_order_relaxed) : 0;
    pthread_mutex_unlock(&s->addrs->stripe[k].lock);
    return n;
}

/* s's worker's part of x. */
static unsigned
me(const struct sites *s)
{
    return s->worker % s->addrs->workers;
}

unsigned
site_addr_floor(const struct sites *s, unsigned cap)
{
    unsigned f = cap / s->addrs->workers;
    return f ? f : 1;
}

/* Slots owed at x, under its lock: to each other worker that wants one
 * now and holds fewer than its floor, the difference. */
static unsigned
owed(const struct sites *s, const struct site_addr *x, unsigned floor, uint64_t now)
{
    unsigned n = 0;
    for (unsigned v = 0; v < s->addrs->workers; v++) {
        unsigned has = atomic_load_explicit(&x->w[v].conns, memory_order_relaxed);
        if (v != me(s) && has < floor &&
            atomic_load_explicit(&x->w[v].wanted_until, memory_order_relaxed) > now)
            n += floor - has;
    }
    return n;
}

void
site_addr_want(const struct sites *s, uint32_t src, const union dns_addr *a, uint64_t until,
               const struct site *by)
{
    struct addr_ref r = {src, a};
    uint64_t h = addr_hash(&r);
    unsigned k = stripe_of(h);
    pthread_mutex_lock(&s->addrs->stripe[k].lock);
    struct site_addr *x = (struct site_addr *)hash_find(&s->addrs->stripe[k].h, h, &r);
    if (x != NULL) { /* none: no connection, so room */
        struct site_addr_worker *w = &x->w[me(s)];
        atomic_store_explicit(&w->wanted_by, (const void *)by, memory_order_relaxed);
        atomic_store_explicit(&w->wanted_until, until, memory_order_relaxed);
    }
    pthread_mutex_unlock(&s->addrs->stripe[k].lock);
}

bool
site_addr_wanted(const struct sites *s, struct site_addr *x, unsigned cap, uint64_t now,
                 const struct site *mine, bool *yielded)
{
    *yielded = false;
    if (x == NULL)
        return false;
    /* Another site's want on this worker (a site's own does not count:
     * site.h). */
    const struct site_addr_worker *w = &x->w[me(s)];
    if (atomic_load_explicit(&w->wanted_until, memory_order_relaxed) > now &&
        atomic_load_explicit(&w->wanted_by, memory_order_relaxed) != (const void *)mine)
        return true;
    /* Another worker's, as for a busy connection: while this worker
     * holds more than its floor and that one less (its domains cannot
     * ride this one's connections). Given at or below this worker's
     * floor, or to a worker that has its floor, the slot would be wanted
     * back at once: the workers would take turns closing and opening
     * connections to the address. */
    return *yielded = site_addr_yield(s, x, cap, now);
}

/* Whether a connection of s's worker holding x should yield (see
 * site_addr_yield): read without the lock or under it. */
static bool
yield_due(const struct sites *s, const struct site_addr *x, unsigned cap, uint64_t now)
{
    unsigned floor = site_addr_floor(s, cap);
    const struct site_addr_worker *w = &x->w[me(s)];
    unsigned mine = atomic_load_explicit(&w->conns, memory_order_relaxed);
    unsigned going = atomic_load_explicit(&w->yielding, memory_order_relaxed);
    if (mine <= floor + going)
        return false; /* at its floor once those told have gone */
    /* Workers below their floor that want a slot now, one each, against
     * the slots free and those on their way (every worker's yielding). */
    unsigned wanting = 0, coming = 0, all = atomic_load_explicit(&x->conns, memory_order_relaxed);
    for (unsigned v = 0; v < s->addrs->workers; v++) {
        coming += atomic_load_explicit(&x->w[v].yielding, memory_order_relaxed);
        if (v != me(s) && atomic_load_explicit(&x->w[v].conns, memory_order_relaxed) < floor &&
            atomic_load_explicit(&x->w[v].wanted_until, memory_order_relaxed) > now)
            wanting++;
    }
    coming += cap > all ? cap - all : 0;
    return wanting > coming;
}

bool
site_addr_yield(const struct sites *s, struct site_addr *x, unsigned cap, uint64_t now)
{
    if (x == NULL || cap == 0 || s->addrs->workers < 2)
        return false;
    /* Asked per transaction: the common answer, no, read without the
     * lock (a count a little stale costs one transaction's delay). */
    if (!yield_due(s, x, cap, now))
        return false;
    /* A yes is asked again under the stripe's lock, and counted there:
     * connections of two workers past their floor that both read the
     * want before either counted itself would both go, for one slot
     * wanted, and the other slot be taken back by its worker at once. */
    unsigned k = stripe_of(x->node.hash);
    pthread_mutex_lock(&s->addrs->stripe[k].lock);
    bool due = yield_due(s, x, cap, now);
    if (due)
        atomic_fetch_add_explicit(&x->w[me(s)].yielding, 1, memory_order_relaxed);
    pthread_mutex_unlock(&s->addrs->stripe[k].lock);
    return due;
}

/* Every worker's connections there told to end (yielding), read
 * without the lock. */
static unsigned
going_all(const struct sites *s, const struct site_addr *x)
{
    unsigned going = 0;
    for (unsigned v = 0; v < s->addrs->workers; v++)
        going += atomic_load_explicit(&x->w[v].yielding, memory_order_relaxed);
    return going;
}

bool
site_addr_over(const struct sites *s, struct site_addr *x, unsigned cap)
{
    if (x == NULL || cap == 0)
        return false;
    /* the common case, with no lock: under the cap */
    if (atomic_load_explicit(&x->conns, memory_order_relaxed) <= cap + going_all(s, x))
        return false;
    /* Over it: decided under the stripe's lock, so that connections of
     * two workers finishing their transactions together do not both go
     * for one connection too many. */
    unsigned k = stripe_of(x->node.hash);
    pthread_mutex_lock(&s->addrs->stripe[k].lock);
    bool over = atomic_load_explicit(&x->conns, memory_order_relaxed) > cap + going_all(s, x);
    if (over)
        atomic_fetch_add_explicit(&x->w[me(s)].yielding, 1, memory_order_relaxed);
    pthread_mutex_unlock(&s->addrs->stripe[k].lock);
    return over;
}

int
site_addr_take(const struct sites *s, uint32_t src, const union dns_addr *a, unsigned cap,
               uint64_t now, struct site_addr **out)
{
    struct addr_ref r = {src, a};
    uint64_t h = addr_hash(&r);
    unsigned k = stripe_of(h);
    *out = NULL;
    pthread_mutex_lock(&s->addrs->stripe[k].lock);
    struct site_addr *x = (struct site_addr *)hash_find(&s->addrs->stripe[k].h, h, &r);
    if (x != NULL && cap != 0) {
        unsigned floor = site_addr_floor(s, cap);
        /* Full; or past this worker's floor, with the slots left owed
         * to other workers that want theirs. */
        unsigned all = atomic_load_explicit(&x->conns, memory_order_relaxed);
        if (all >= cap ||
            (atomic_load_explicit(&x->w[me(s)].conns, memory_order_relaxed) >= floor &&
             cap - all <= owed(s, x, floor, now))) {
            pthread_mutex_unlock(&s->addrs->stripe[k].lock);
            return -EBUSY;
        }
    }
    if (x == NULL) {
        size_t n = sizeof(*x) + s->addrs->workers * sizeof(x->w[0]);
        if ((x = calloc(1, n)) == NULL) {
            pthread_mutex_unlock(&s->addrs->stripe[k].lock);
            return -ENOMEM;
        }
        x->src = src;
        x->a = *a;
        x->node.hash = h;
        if (hash_insert(&s->addrs->stripe[k].h, &x->node) < 0) {
            pthread_mutex_unlock(&s->addrs->stripe[k].lock);
            free(x);
            return -ENOMEM;
        }
    }
    atomic_fetch_add_explicit(&x->conns, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&x->w[me(s)].conns, 1, memory_order_relaxed);
    atomic_store_explicit(&x->w[me(s)].wanted_until, 0, memory_order_relaxed); /* had one */
    pthread_mutex_unlock(&s->addrs->stripe[k].lock);
    *out = x;
    return 0;
}

void
site_addr_give(const struct sites *s, struct site_addr *x, bool yielded)
{
    if (x == NULL)
        return;
    unsigned k = stripe_of(x->node.hash);
    pthread_mutex_lock(&s->addrs->stripe[k].lock);
    atomic_fetch_sub_explicit(&x->w[me(s)].conns, 1, memory_order_relaxed);
    if (yielded)
        atomic_fetch_sub_explicit(&x->w[me(s)].yielding, 1, memory_order_relaxed);
    if (atomic_fetch_sub_explicit(&x->conns, 1, memory_order_relaxed) == 1) {
        hash_remove(&s->addrs->stripe[k].h, &x->node);
        /* shrunk after a burst, but its last buckets kept: a connection
         * that opens and closes alone costs no allocation under the lock */
        if (hash_count(&s->addrs->stripe[k].h) > 0)
            hash_compact(&s->addrs->stripe[k].h);
        free(x);
    }
    pthread_mutex_unlock(&s->addrs->stripe[k].lock);
}

int
sites_addrs_init(struct sites *s, struct site_addrs *shared, unsigned worker)
{
    s->worker = worker;
    s->own_addrs = shared == NULL;
    s->addrs = shared != NULL ? shared : site_addrs_new(worker + 1);
    return s->addrs != NULL ? 0 : -ENOMEM;
}

void
sites_addrs_fini(struct sites *s)
{
    if (s->own_addrs)
        site_addrs_free(s->addrs);
    s->addrs = NULL;
}
