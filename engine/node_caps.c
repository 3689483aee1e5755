/*
 * node_caps: the node's count of connections under each capped limit key
 * without [redis], every worker's, with their floors; and the workers'
 * parts of the key's rates, each a GCRA state, lent while their worker
 * asks for none, and a message or connection token not used given back
 * to its part (node_caps.h says why and what the rules are).
 *
 * Threading: any worker's thread. The table's lock guards its hash (an
 * entry is found once per key set-up); each entry's lock its counts and
 * parts (per connection, and per message token request of a key).
 */
#include "engine/node_caps.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common/hash.h"
#include "engine/limits.h"

/* One worker's part of a rate. */
struct node_rate_part {
    uint64_t tat;      /* its GCRA state (limits_gcra) */
    uint64_t asked;    /* ns: when it last asked for a token; 0: never */
    uint64_t back_tat; /* tat before the last take (back_ok) */
    unsigned burst;    /* its burst (its worker's, as it last asked) */
    bool lent;         /* another worker took a token of it since its worker's last */
    bool back_lent;    /* lent before the last take (back_ok) */
    bool back_ok;      /* back_tat and back_lent are the last take's: no give
                        * or back of a take since */
};

/* One worker's part of an entry. */
struct node_cap_worker {
    unsigned conns;
    uint64_t wanted_until; /* ns: it was refused a slot; 0: no want */
    struct node_rate_part rate[2]; /* enum node_rate */
};

struct node_cap {
    struct hash_node node;
    pthread_mutex_t lock;
    unsigned workers;
    _Atomic unsigned conns;         /* every worker's; changed under the lock */
    _Atomic uint64_t want_until;    /* ns: the latest of the workers' wanted_until,
                                     * never lowered (read without the lock) */
    char *name;                     /* owned */
    struct node_cap_worker w[];     /* workers of them */
};

struct node_caps {
    unsigned workers;
    pthread_mutex_t lock;
    struct hash h; /* struct node_cap, by name */
};

static bool
cap_eq(const struct hash_node *n, const void *key)
{
    return strcmp(((const struct node_cap *)n)->name, key) == 0;
}

struct node_caps *
node_caps_new(unsigned workers)
{
    struct node_caps *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    t->workers = workers ? workers : 1;
    pthread_mutex_init(&t->lock, NULL);
    hash_init(&t->h, cap_eq, 8);
    return t;
}

void
node_caps_free(struct node_caps *t)
{
    if (t == NULL)
        return;
    size_t b = 0;
    struct hash_node *cur = NULL, *n;
    while ((n = hash_next(&t->h, &b, &cur)) != NULL) {
        struct node_cap *x = (struct node_cap *)n;
        pthread_mutex_destroy(&x->lock);
        free(x->name);
        free(x);
    }
    hash_fini(&t->h);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

struct node_cap *
node_cap_get(struct node_caps *t, const char *name)
{
    uint64_t h = hash_bytes(name, strlen(name));
    pthread_mutex_lock(&t->lock);
    struct node_cap *x = (struct node_cap *)hash_find(&t->h, h, name);
    if (x == NULL) {
        x = calloc(1, sizeof(*x) + t->workers * sizeof(x->w[0]));
        char *own = strdup(name);
        if (x == NULL || own == NULL) {
            free(x);
            free(own);
            pthread_mutex_unlock(&t->lock);
            return NULL;
        }
        pthread_mutex_init(&x->lock, NULL);
        x->workers = t->workers;
        x->name = own;
        x->node.hash = h;
        if (hash_insert(&t->h, &x->node) < 0) {
            pthread_mutex_destroy(&x->lock);
            free(own);
            free(x);
            x = NULL;
        }
    }
    pthread_mutex_unlock(&t->lock);
    return x;
}

static unsigned
floor_of(const struct node_cap *x, unsigned cap)
{
    unsigned f = cap / x->workers;
    return f ? f : 1;
}

/* Slots owed, under x's lock: to each worker but w that wants one now
 * and holds fewer than its floor, the difference. */
static unsigned
owed(const struct node_cap *x, unsigned w, unsigned floor, uint64_t now)
{
    unsigned n = 0;
    for (unsigned v = 0; v < x->workers; v++)
        if (v != w && x->w[v].conns < floor && x->w[v].wanted_until > now)
            n += floor - x->w[v].conns;
    return n;
}

/* Under x's lock: would a take by w be refused? */
static bool
full(const struct node_cap *x, unsigned w, unsigned cap, uint64_t now)
{
    if (x->conns >= cap)
        return true;
    unsigned floor = floor_of(x, cap);
    return x->w[w].conns >= floor && cap - x->conns <= owed(x, w, floor, now);
}

int
node_cap_take(struct node_cap *x, unsigned w, unsigned cap, uint64_t now_ns)
{
    w %= x->workers;
    pthread_mutex_lock(&x->lock);
    if (cap != 0 && full(x, w, cap, now_ns)) {
        uint64_t until = now_ns + 2 * (uint64_t)NODE_CAP_POLL_MS * 1000000u;
        x->w[w].wanted_until = until;
        if (until > atomic_load_explicit(&x->want_until, memory_order_relaxed))
            atomic_store_explicit(&x->want_until, until, memory_order_relaxed);
        pthread_mutex_unlock(&x->lock);
        return -EBUSY;
    }
    x->conns++;
    x->w[w].conns++;
    x->w[w].wanted_until = 0; /* had one */
    pthread_mutex_unlock(&x->lock);
    return 0;
}

void
node_cap_give(struct node_cap *x, unsigned w)
{
    w %= x->workers;
    pthread_mutex_lock(&x->lock);
    if (x->w[w].conns > 0) {
        x->w[w].conns--;
        x->conns--;
    }
    pthread_mutex_unlock(&x->lock);
}

void
node_cap_add(struct node_cap *x, unsigned w, unsigned n)
{
    w %= x->workers;
    pthread_mutex_lock(&x->lock);
    x->conns += n;
    x->w[w].conns += n;
    pthread_mutex_unlock(&x->lock);
}

unsigned
node_cap_allow(struct node_cap *x, unsigned w, unsigned cap, uint64_t now_ns)
{
    w %= x->workers;
    /* Asked once per transaction of each connection under the key: with
     * nobody wanting a slot and the node within the cap (the common
     * case), the answer is the cap, read without the lock. A want made
     * meanwhile on another thread is seen at the next transaction. */
    if (cap == 0 ||
        (atomic_load_explicit(&x->want_until, memory_order_relaxed) <= now_ns &&
         atomic_load_explicit(&x->conns, memory_order_relaxed) <= cap))
        return cap;
    pthread_mutex_lock(&x->lock);
    unsigned mine = x->w[w].conns, others = x->conns - mine, allow = cap;
    if (cap != 0 && x->conns > cap) {
        /* Over the cap (lowered by a reload): each worker keeps its part
         * of it, or what the others leave, whichever is more, so the
         * workers together end no more than the excess. */
        unsigned part = cap / x->workers + (w < cap % x->workers ? 1 : 0);
        unsigned left = cap > others ? cap - others : 0;
        allow = part > left ? part : left;
    } else if (cap != 0) {
        /* Past its floor while the slots left do not cover what the
         * workers below theirs want: one back. Those told to end hold
         * theirs until they have gone, so no more end than are owed
         * (given down to the floor, the slots beyond what was owed
         * would be taken back once the want was met: connections
         * closed and opened again for nothing). */
        unsigned floor = floor_of(x, cap);
        if (mine > floor && owed(x, w, floor, now_ns) > cap - x->conns)
            allow = mine - 1;
    }
    pthread_mutex_unlock(&x->lock);
    return allow;
}

bool
node_cap_full(struct node_cap *x, unsigned w, unsigned cap, uint64_t now_ns)
{
    w %= x->workers;
    pthread_mutex_lock(&x->lock);
    bool f = cap != 0 && full(x, w, cap, now_ns);
    pthread_mutex_unlock(&x->lock);
    return f;
}

bool
node_cap_claim(struct node_cap *x, unsigned w, unsigned cap, uint64_t now_ns)
{
    w %= x->workers;
    bool found = false;
    pthread_mutex_lock(&x->lock);
    unsigned floor = floor_of(x, cap);
    for (unsigned v = 0; v < x->workers && !found; v++)
        if (v != w && x->w[v].wanted_until > now_ns &&
            (x->w[w].conns > floor || x->w[v].conns < floor)) {
            x->w[v].wanted_until = 0;
            found = true;
        }
    pthread_mutex_unlock(&x->lock);
    return found;
}

unsigned
node_cap_rate_take(struct node_cap *x, enum node_rate which, unsigned w, uint64_t T, unsigned burst,
                   uint64_t idle_ns, uint64_t now_ns, unsigned n, uint64_t *retry_at_ns,
                   struct node_rate_undo *undo)
{
    w %= x->workers;
    unsigned r = which == NODE_RATE_CONN ? 1 : 0, got = 0;
    uint64_t retry = UINT64_MAX, at;
    pthread_mutex_lock(&x->lock);
    x->w[w].rate[r].asked = now_ns;
    x->w[w].rate[r].burst = burst;
    for (unsigned i = 0; i < x->workers && got < n; i++) {
        unsigned v = (w + i) % x->workers;
        struct node_rate_part *p = &x->w[v].rate[r];
        /* another's part: while it asks for none (a worker whose domains
         * wait for their tokens asks once a period, T) */
        if (v != w && p->asked != 0 && (p->asked > now_ns || now_ns - p->asked < idle_ns))
            continue; /* (asked later than now: on another worker's clock) */
        /* each part at its own burst (the parts' add up to the whole;
         * the borrower's on every part lent gave the node more): none for
         * a part whose worker never asked, its burst unknown */
        uint64_t tau = p->burst == 0                ? 0
                       : T > UINT64_MAX / p->burst ? UINT64_MAX
                                                   : T * p->burst;
        /* Its worker back after a lending has the token the lending took
         * from it, one interval ahead of the part's schedule: lent while
         * it asked for none, the part was drained by the borrower as each
         * token fell due, so a worker asking less often than the part is
         * lent after (its domains' own rates) found none each time and
         * got nothing while the other was busy. The token is owed on the
         * part: no borrower takes another until the schedule is back
         * (tat within tau + T), so the part gives no more than one token
         * beyond its rate in any window. */
        if (v == w && p->lent && (p->tat > now_ns || now_ns - p->tat < T) &&
            tau <= UINT64_MAX - T)
            tau += T; /* (a schedule idle since starts again: nothing owed) */
        uint64_t before = p->tat;
        unsigned g = limits_gcra(&p->tat, T, tau, now_ns, n - got, &at);
        if (g == 0 && at < retry)
            retry = at;
        if (g > 0 && undo != NULL)
            *undo = (struct node_rate_undo){
                .tat = before, .tat_after = p->tat, .from = v, .n = g, .lent = p->lent};
        if (g > 0) {
            /* the part's state before, for a node_cap_rate_back of this
             * take (the caller keeps tat_after alone) */
            p->back_tat = before;
            p->back_lent = p->lent;
            p->back_ok = true;
            p->lent = v != w;
        }
        got += g;
    }
    pthread_mutex_unlock(&x->lock);
    if (got == 0)
        *retry_at_ns = retry;
    return got;
}

bool
node_cap_rate_back(struct node_cap *x, enum node_rate which, unsigned from, uint64_t tat_after)
{
    struct node_rate_part *p = &x->w[from % x->workers].rate[which == NODE_RATE_CONN ? 1 : 0];
    pthread_mutex_lock(&x->lock);
    /* A take moves tat on, and only a give or a back of a take moves it
     * back (to where that take found it, or later): tat where the take
     * left it, with no give or back since, is that take's, and nobody
     * took of the part after it. */
    bool back = p->back_ok && p->tat == tat_after;
    if (back) {
        p->tat = p->back_tat;
        p->lent = p->back_lent;
        p->back_ok = false;
    }
    pthread_mutex_unlock(&x->lock);
    return back;
}

unsigned
node_cap_rate_give(struct node_cap *x, enum node_rate which, const struct node_rate_undo *u,
                   unsigned n, uint64_t T)
{
    struct node_rate_part *p = &x->w[u->from % x->workers].rate[which == NODE_RATE_CONN ? 1 : 0];
    if (n > u->n)
        n = u->n;
    if (n == 0)
        return 0;
    pthread_mutex_lock(&x->lock);
    if (p->tat != u->tat_after) {
        n = 0; /* taken of since: see node_caps.h */
    } else {
        p->back_ok = false; /* tat moved back: a back of the last take finds it no more */
        if (n == u->n) {
            p->tat = u->tat;
            p->lent = u->lent;
        } else {
            uint64_t back = (uint64_t)n * T;
            p->tat = p->tat - u->tat > back ? p->tat - back : u->tat;
        }
    }
    pthread_mutex_unlock(&x->lock);
    return n;
}

unsigned
node_cap_conns(struct node_cap *x)
{
    pthread_mutex_lock(&x->lock);
    unsigned n = x->conns;
    pthread_mutex_unlock(&x->lock);
    return n;
}
