/*
 * limits: the per-worker limiter of limits.h: its local decisions and its
 * API. The shared decisions (Redis: the script, its requests, replies and
 * state) are limits_redis.c's; what both use is limits_internal.h.
 *
 * Local decisions are GCRA over the caller's clock in nanoseconds: one
 * theoretical arrival time (tat) per rate and key. A request for n takes
 * g = min(n, avail) where avail = floor((now + tau + T - max(tat, now)) / T)
 * and moves tat by g * T; when avail is 0 the answer is the time tat - tau
 * at which one token is due. No timers, no per-token work.
 *
 * While shared, a key hands out the message tokens Redis booked for it
 * (held, each no earlier than its slot) and asks for the next batch when
 * half is spent; a lease Redis granted waits in ready_lease for the next
 * acquire. When Redis will not take a request, the key decides locally,
 * at the local share.
 *
 * Without Redis, a key whose cap is the node's (limit_conf.spread > 1: an
 * [mx] or [source] section's) counts its leases in node_caps too, beside
 * the other workers' (node_caps.h): a lease is refused there when the
 * node holds the cap, or what is left is owed to a worker below its floor.
 * Its rates (this worker's part, as configured) take their tokens from
 * its part kept there, then from the part of a worker that asks for none
 * (node_cap_rate_take); a connection's token goes back to the part it
 * came from when its lease is refused or undone, the part as it was
 * (its lent mark too), while no other worker took of it since.
 *
 * Message tokens a transaction took and did not use (another of its keys
 * refused) are given back (limits_give_msgs) from the caller's record of
 * the grant (struct limit_grant; the key, embedded in every destination,
 * holds none): the local GCRA's tat back by their intervals, never before
 * it was; a node part's state as before, while no other worker took of it
 * since; Redis's booked tokens back to held at their slots.
 *
 * Threading: the owning worker's thread only (node_caps: its own locks).
 */
#include "engine/limits.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/limits_internal.h"
#include "engine/node_caps.h"
#include "engine/redis.h"

#define HELD_MIN_NS MS_TO_NS(100)

/* --- arithmetic ------------------------------------------------------- */

unsigned
limits_gcra(uint64_t *tat, uint64_t T, uint64_t tau, uint64_t now, unsigned want,
            uint64_t *retry_at)
{
    /* A caller back less than one interval after its slot (its timer
     * fired late, a loop turn went by) keeps its place on the schedule.
     * Restarting the schedule from now lost each wake-up's lateness: a key
     * paced at its rate without a burst got 1 / (T + lateness), 2,000 to
     * 2,750 of 4,000/s in bench_fair. Later than one interval, the key
     * was idle: the schedule starts again from now, and no burst builds up
     * beyond tau either way. */
    uint64_t t = *tat > now || now - *tat < T ? *tat : now;
    uint64_t lim = now + tau + T;
    uint64_t avail = lim > t ? (lim - t) / T : 0;
    if (avail == 0) {
        *retry_at = t - tau; /* > now: avail 0 means t >= now + tau + T */
        return 0;
    }
    unsigned g = avail < want ? (unsigned)avail : want;
    *tat = t + (uint64_t)g * T;
    return g;
}

/* The divisor of k's limits while they cannot be shared through Redis:
 * one per expected node, times the limiters of this node that hold the
 * same key (conf.spread). Without Redis the caller has split the rates
 * (a cap held by several is the node's: local_lease). */
static unsigned
local_share(const struct limits *l, const struct limit_key *k)
{
    if (l->r == NULL)
        return 1;
    uint64_t s = (uint64_t)l->nodes * (k->conf.spread ? k->conf.spread : 1);
    return s > 1000000u ? 1000000u : (unsigned)s;
}

/* This limiter's part of n (a cap, a burst) while Redis is away: the
 * node's (n / nodes), and of that this worker's among the spread
 * limiters holding the key (limits_part: the parts add up). */
static unsigned
local_part(const struct limits *l, const struct limit_key *k, unsigned n)
{
    unsigned spread = k->conf.spread ? k->conf.spread : 1;
    return limits_part(n / l->nodes, spread, l->w != NULL ? l->w->id : 0);
}

/* --- the API ---------------------------------------------------------- */

int
limits_new(struct worker *w, const struct limits_opts *o, struct limits **out, char *err,
           size_t errlen)
{
    *out = NULL;
    struct limits *l = calloc(1, sizeof(*l));
    if (l == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    l->w = w;
    l->node_caps = o->node_caps;
    l->nodes = o->nodes ? o->nodes : 1;
    l->batch = o->token_batch ? o->token_batch : 10;
    l->ttl_ns = MS_TO_NS(o->lease_ttl_ms ? o->lease_ttl_ms : 30000);
    if (l->ttl_ns < MS_TO_NS(30))
        l->ttl_ns = MS_TO_NS(30);
    l->bo_ns = MS_TO_NS(o->backoff_ms ? o->backoff_ms : 60000);
    l->bo_step_ns = MS_TO_NS(o->backoff_step_ms ? o->backoff_step_ms : 30000);
    l->timeout_ns = MS_TO_NS(o->redis_timeout_ms ? o->redis_timeout_ms : 1000);
    const char *prefix = o->key_prefix ? o->key_prefix : "sluice:";
    if (strlen(prefix) >= sizeof(l->prefix) || strpbrk(prefix, "{}") != NULL) {
        snprintf(err, errlen, "limits: key prefix '%s' too long or has a brace", prefix);
        free(l);
        return -EINVAL;
    }
    memcpy(l->prefix, prefix, strlen(prefix) + 1);
    if (o->node_id != NULL) {
        if (strlen(o->node_id) >= sizeof(l->node) || strchr(o->node_id, ':') != NULL) {
            snprintf(err, errlen, "limits: node id '%s' too long or has a ':'", o->node_id);
            free(l);
            return -EINVAL;
        }
        memcpy(l->node, o->node_id, strlen(o->node_id) + 1);
    } else {
        char host[64] = "node";
        gethostname(host, sizeof(host) - 1);
        host[sizeof(host) - 1] = '\0';
        host[strcspn(host, ":.")] = '\0';
        uint64_t salt = clock_mono_ns() ^ (uint64_t)(uintptr_t)l;
        snprintf(l->node, sizeof(l->node), "%s-%d-w%u-%08llx", host, (int)getpid(),
                 w->id, (unsigned long long)(salt & 0xffffffffu));
    }
    if (o->redis_url != NULL) {
        int rc = limits_redis_start(l, o, err, errlen);
        if (rc < 0) {
            free(l);
            return rc;
        }
    }
    *out = l;
    return 0;
}

struct limits *
limits_free(struct limits *l)
{
    if (l == NULL)
        return NULL;
    if (l->r != NULL)
        limits_redis_stop(l);
    while (l->keys != NULL) {
        struct limit_key *k = l->keys;
        l->keys = k->next;
        k->prev = k->next = NULL;
        k->msg_req = k->conn_req = k->refresh_req = NULL;
        if (k->want != NULL)
            k->want->req = NULL; /* freed above */
        k->want = NULL;
        k->l = NULL;
        if (k->name != k->name_in) {
            /* its owner may free k without limits_key_fini() now */
            free((char *)k->name);
            k->name = k->name_in;
        }
    }
    free(l);
    return NULL;
}

/* This limiter's worker, for the node's counts. */
static unsigned
worker_id(const struct limits *l)
{
    return l->w != NULL ? l->w->id : 0;
}

/* Are k's limits the node's: held by several of its limiters, no Redis? */
static bool
node_shared(const struct limits *l, const struct limit_key *k)
{
    return k->conf.spread > 1 && l->r == NULL;
}

/* ...and its cap? */
static bool
node_wide(const struct limits *l, const struct limit_key *k)
{
    return node_shared(l, k) && k->conf.max_connections != 0;
}

/* k's node state, when its limits are the node's (a table given).
 * Without memory for the entry the key keeps its worker's part of the
 * cap (lease_cap), and its rates' parts to itself, as before. */
static void
node_attach(struct limits *l, struct limit_key *k)
{
    if (k->node == NULL && node_shared(l, k) && l->node_caps != NULL)
        k->node = node_cap_get(l->node_caps, k->name);
}

/* Do k's rates take their tokens from the node's parts? */
static bool
node_rated(const struct limits *l, const struct limit_key *k)
{
    return k->node != NULL && node_shared(l, k);
}

/* How long a worker's part of a rate at interval T must go unasked for
 * before another may borrow it: a worker whose domains wait for their
 * tokens asks about once an interval. */
static uint64_t
part_idle_ns(uint64_t T)
{
    uint64_t idle = sat_mul(T, 3);
    return idle > MS_TO_NS(50) ? idle : MS_TO_NS(50);
}

/* Is k's cap counted for the node now? */
static bool
node_counted(const struct limits *l, const struct limit_key *k)
{
    return k->node != NULL && node_wide(l, k);
}

/* Leases k held before its cap was counted for the node (a reload gave
 * its section max_connections): counted now, or the other workers would
 * take the whole cap beside them, and this one, its own count short of
 * them, would end none (limits_key_over). */
static void
node_count_held(struct limits *l, struct limit_key *k)
{
    if (k->l == NULL || !node_counted(l, k) || k->node_held >= k->nleases)
        return;
    node_cap_add(k->node, worker_id(l), k->nleases - k->node_held);
    k->node_held = k->nleases;
}

/* A lease just popped from k: a node slot back when k now holds fewer
 * leases than it counted (node_held), so those taken while the key was
 * not counted (its cap 0) give none back. */
static void
node_popped(struct limits *l, struct limit_key *k)
{
    if (k->node != NULL && k->node_held > k->nleases) {
        node_cap_give(k->node, worker_id(l));
        k->node_held--;
    }
}

int
limits_key_init(struct limits *l, struct limit_key *k, const char *name,
                const struct limit_conf *c, limit_wake_fn *wake, void *wake_arg)
{
    size_t n = strlen(name);
    if (n == 0 || n >= LIMIT_KEY_MAX || strpbrk(name, "{}") != NULL)
        return -EINVAL;
    char *own = NULL;
    if (n >= sizeof(k->name_in) && (own = strdup(name)) == NULL)
        return -ENOMEM;
    memset(k, 0, sizeof(*k));
    snprintf(k->name_in, sizeof(k->name_in), "%s", name);
    k->name = own != NULL ? own : k->name_in;
    k->conf = *c;
    k->wake = wake;
    k->wake_arg = wake_arg;
    k->bo_factor = FACTOR_ONE;
    k->l = l;
    node_attach(l, k);
    k->next = l->keys;
    if (l->keys != NULL)
        l->keys->prev = k;
    l->keys = k;
    l->st.keys++;
    return 0;
}

void
limits_key_set(struct limits *l, struct limit_key *k, const struct limit_conf *c)
{
    k->conf = *c;
    node_attach(l, k);
    node_count_held(l, k);
}

void
limits_key_fini(struct limits *l, struct limit_key *k)
{
    (void)l;
    struct limits *owner = k->l;
    if (owner != NULL) {
        for (unsigned i = 0; i < k->nleases; i++)
            limits_redis_release(owner, k, k->leases[i]);
        if (k->ready_lease != 0)
            limits_redis_release(owner, k, k->ready_lease);
        owner->leases -= k->nleases;
        for (; k->node != NULL && k->node_held > 0; k->node_held--)
            node_cap_give(k->node, worker_id(owner));
        if (k->msg_req != NULL)
            k->msg_req->k = NULL;
        if (k->conn_req != NULL)
            k->conn_req->k = NULL;
        if (k->refresh_req != NULL)
            k->refresh_req->k = NULL;
        if (k->want != NULL && k->want->req != NULL) {
            k->want->req->k = NULL;
            k->want->req = NULL;
        }
        if (k->prev != NULL)
            k->prev->next = k->next;
        else
            owner->keys = k->next;
        if (k->next != NULL)
            k->next->prev = k->prev;
        owner->st.keys--;
    }
    free(k->leases);
    k->leases = NULL;
    k->nleases = k->leases_cap = 0;
    if (k->name != NULL && k->name != k->name_in)
        free((char *)k->name);
    k->name = k->name_in;
    k->ready_lease = 0;
    k->msg_req = k->conn_req = k->refresh_req = NULL;
    k->excess = 0;
    k->want = NULL;
    k->prev = k->next = NULL;
    k->l = NULL;
}

/* Booked tokens due by now: slot held_slot + i * held_T for i < held. */
static unsigned
held_due(const struct limit_key *k, uint64_t now)
{
    if (k->held == 0 || now < k->held_slot)
        return 0;
    uint64_t due = (now - k->held_slot) / k->held_T + 1;
    return due < k->held ? (unsigned)due : k->held;
}

/* A token not used within a batch's time (at least HELD_MIN_NS) after its
 * slot lapses: late tokens must not pile up into a burst. */
static void
held_expire(struct limits *l, struct limit_key *k, unsigned b, uint64_t now)
{
    uint64_t late = sat_mul(k->held_T, b);
    if (late < HELD_MIN_NS)
        late = HELD_MIN_NS;
    if (k->held == 0 || now < k->held_slot + late)
        return;
    uint64_t d = (now - late - k->held_slot) / k->held_T + 1;
    unsigned drop = d < k->held ? (unsigned)d : k->held;
    k->held -= drop;
    k->held_slot += (uint64_t)drop * k->held_T;
    l->st.tokens_expired += drop;
}

unsigned
limits_take_msgs(struct limits *l, struct limit_key *k, unsigned n, uint64_t now_ns,
                 uint64_t *retry_at_ns)
{
    struct limit_grant g;
    return limits_take_msgs_undo(l, k, n, now_ns, retry_at_ns, &g);
}

unsigned
limits_take_msgs_undo(struct limits *l, struct limit_key *k, unsigned n, uint64_t now_ns,
                      uint64_t *retry_at_ns, struct limit_grant *grant)
{
    *retry_at_ns = now_ns;
    grant->how = LIMIT_MSG_UNDO_NONE;
    grant->n = 0;
    if (n == 0)
        return 0;
    if (k->suspended) {
        k->want_wake = true;
        *retry_at_ns = UINT64_MAX;
        return 0;
    }
    uint64_t T1 = msg_interval(l, k, now_ns);
    if (T1 == 0) {
        l->st.local_decisions++;
        l->st.msgs_granted += n;
        grant->how = LIMIT_MSG_UNDO_FREE;
        grant->n = n;
        return n;
    }
    if (l->shared && now_ns >= k->local_until) {
        unsigned b = batch_size(l, T1);
        held_expire(l, k, b, now_ns);
        unsigned g = held_due(k, now_ns);
        if (g > n)
            g = n;
        k->held -= g;
        k->held_slot += (uint64_t)g * k->held_T;
        bool asking = k->msg_req != NULL;
        if (!asking && k->held * 2 <= b && now_ns >= k->msg_retry_at)
            asking = limits_redis_take(l, k, now_ns) == 0;
        if (g > 0) {
            l->st.batch_decisions++;
            l->st.msgs_granted += g;
            grant->how = LIMIT_MSG_UNDO_HELD;
            grant->n = g;
            return g;
        }
        if (k->held > 0 || asking || now_ns < k->msg_retry_at) {
            uint64_t r = UINT64_MAX;
            if (k->held > 0)
                r = k->held_slot; /* booked, not yet due: no wake-up needed */
            if (asking) {
                k->want_wake = true;
                if (now_ns + l->timeout_ns < r)
                    r = now_ns + l->timeout_ns;
            } else if (k->held == 0) {
                k->want_wake = true;
                r = k->msg_retry_at;
            }
            *retry_at_ns = r;
            return 0;
        }
        /* Redis would not take the request: decide locally this time. */
    }
    unsigned share = local_share(l, k);
    uint64_t T = sat_mul(T1, share);
    uint64_t tau = sat_mul(T, share == 1 ? k->conf.msg_burst : local_part(l, k, k->conf.msg_burst));
    uint64_t tat = k->msg_tat;
    bool node = node_rated(l, k);
    unsigned g =
        node ? node_cap_rate_take(k->node, NODE_RATE_MSG, worker_id(l), T, k->conf.msg_burst,
                                  part_idle_ns(T), now_ns, n, retry_at_ns, &grant->part)
             : limits_gcra(&k->msg_tat, T, tau, now_ns, n, retry_at_ns);
    l->st.local_decisions++;
    l->st.msgs_granted += g;
    if (g > 0) {
        grant->how = node ? LIMIT_MSG_UNDO_NODE : LIMIT_MSG_UNDO_TAT;
        grant->n = node ? grant->part.n : g;
        grant->tat = tat;
        grant->T = T;
    }
    return g;
}

unsigned
limits_give_msgs(struct limits *l, struct limit_key *k, struct limit_grant *g, unsigned n)
{
    if (n > g->n)
        n = g->n;
    if (n == 0 || g->how == LIMIT_MSG_UNDO_NONE)
        return 0;
    switch (g->how) {
    case LIMIT_MSG_UNDO_TAT: {
        /* Back n intervals, never before where the take found it: a
         * schedule the take started again from now (the key was idle)
         * goes back to now, which lets the same through as the old. */
        uint64_t back = sat_mul(n, g->T);
        k->msg_tat = k->msg_tat - g->tat > back ? k->msg_tat - back : g->tat;
        break;
    }
    case LIMIT_MSG_UNDO_NODE:
        n = k->node != NULL ? node_cap_rate_give(k->node, NODE_RATE_MSG, &g->part, n, g->T) : 0;
        break;
    case LIMIT_MSG_UNDO_HELD:
        /* Before the tokens still held, at the slots they had: handed out
         * again no earlier, and lapsing as they would have. */
        k->held += n;
        k->held_slot -= (uint64_t)n * k->held_T;
        break;
    default: /* LIMIT_MSG_UNDO_FREE: no rate, nothing taken */
        break;
    }
    g->how = LIMIT_MSG_UNDO_NONE; /* once: the rest of the grant stays spent */
    g->n = 0;
    l->st.msgs_granted -= n;
    return n;
}

static bool
lease_push(struct limits *l, struct limit_key *k, uint64_t id)
{
    if (k->nleases == k->leases_cap) {
        unsigned cap = k->leases_cap ? k->leases_cap * 2 : 4;
        uint64_t *v = realloc(k->leases, cap * sizeof(*v));
        if (v == NULL)
            return false;
        k->leases = v;
        k->leases_cap = cap;
    }
    k->leases[k->nleases++] = id;
    l->leases++;
    l->st.conns_granted++;
    return true;
}

/* k's max_connections for this limiter (at least one); 0: none. Shared
 * through Redis, or without it, the whole cap (a node-wide one is also
 * counted for the node: local_lease); else local_part's (at least one for
 * the node, and for the worker): a cap of 3 over two workers is 2 and 1
 * (each took 1 before, 2 in all). A node-wide cap without its count (no
 * memory for it) is split between the node's workers (conf.spread). */
static unsigned
lease_cap(const struct limits *l, const struct limit_key *k, bool shared)
{
    unsigned max = k->conf.max_connections;
    if (node_wide(l, k) && k->node == NULL) {
        unsigned part = limits_part(max, k->conf.spread, worker_id(l));
        return part ? part : 1;
    }
    if (max == 0 || shared || l->r == NULL)
        return max;
    unsigned part = local_part(l, k, max);
    return part ? part : 1;
}

/* A lease of k decided here: its slot of the node's count first, when
 * its cap is counted there (refused: false, *retry_at_ns a poll time,
 * for a connection of another worker that ends wakes nothing here). */
static bool
local_lease(struct limits *l, struct limit_key *k, uint64_t now_ns, uint64_t *retry_at_ns)
{
    bool counted = node_counted(l, k);
    if (counted && node_cap_take(k->node, worker_id(l), k->conf.max_connections, now_ns) < 0) {
        k->want_wake = true;
        *retry_at_ns = now_ns + MS_TO_NS(NODE_CAP_POLL_MS);
        return false;
    }
    if (!lease_push(l, k, ++l->next_lease)) {
        if (counted)
            node_cap_give(k->node, worker_id(l));
        return false;
    }
    if (counted)
        k->node_held++;
    return true;
}

/* A lease of k, and a connection-rate token when rated: both or neither. */
static bool
conn_acquire(struct limits *l, struct limit_key *k, uint64_t now_ns, uint64_t *retry_at_ns,
             bool rated)
{
    *retry_at_ns = now_ns;
    k->undo = LIMIT_UNDO_NONE;
    if (k->suspended) {
        k->want_wake = true;
        *retry_at_ns = UINT64_MAX;
        l->st.conns_refused++;
        return false;
    }
    if (k->ready_lease != 0 && rated && !k->ready_rated &&
        rate_interval(&k->conf.conn_rate) != 0) {
        /* Granted for a move (limits_lease_acquire), without the token a
         * new connection takes: given back, and one with it asked for.
         * (Without a connection rate there is no token: it serves.) */
        limits_redis_release(l, k, k->ready_lease);
        k->ready_lease = 0;
    }
    if (k->ready_lease != 0) {
        /* Under the cap as it stands now: a reload may have lowered it,
         * or the key decides locally at its share since the grant. */
        bool shared_now = l->shared && now_ns >= k->local_until;
        unsigned cap_now = lease_cap(l, k, shared_now);
        if (cap_now != 0 && k->nleases >= cap_now) {
            limits_redis_release(l, k, k->ready_lease);
            k->ready_lease = 0;
            k->want_wake = true;
            *retry_at_ns = UINT64_MAX;
            l->st.conns_refused++;
            return false;
        }
    }
    if (k->ready_lease != 0) {
        /* Granted by Redis for this key: a lease (and a rate token, which
         * a move that takes it wastes). */
        if (!lease_push(l, k, k->ready_lease)) {
            l->st.conns_refused++;
            return false;
        }
        k->ready_lease = 0; /* (ready_rated stays: limits_conn_unacquire's) */
        k->undo = LIMIT_UNDO_READY;
        l->st.batch_decisions++;
        return true;
    }
    bool shared = l->shared && now_ns >= k->local_until;
    unsigned share = shared ? 1 : local_share(l, k);
    unsigned max = lease_cap(l, k, shared);
    if (max != 0 && k->nleases >= max) {
        k->want_wake = true;
        *retry_at_ns = UINT64_MAX;
        l->st.conns_refused++;
        return false;
    }
    if (shared) {
        bool asking = k->conn_req != NULL;
        if (!asking && now_ns >= k->conn_retry_at)
            asking = limits_redis_lease(l, k, now_ns, rated) == 0;
        if (asking || now_ns < k->conn_retry_at) {
            k->want_wake = true;
            *retry_at_ns = asking ? now_ns + l->timeout_ns : k->conn_retry_at;
            l->st.conns_refused++;
            return false;
        }
        /* Redis would not take the request: decide locally this time,
         * the cap included (above it was checked with the shared one). */
        share = local_share(l, k);
        max = lease_cap(l, k, false);
        if (max != 0 && k->nleases >= max) {
            k->want_wake = true;
            *retry_at_ns = UINT64_MAX;
            l->st.conns_refused++;
            return false;
        }
    }
    l->st.local_decisions++;
    uint64_t T0 = rated ? rate_interval(&k->conf.conn_rate) : 0;
    if (T0 != 0) {
        uint64_t T = eff_interval(T0, bo_factor(l, k, now_ns), share);
        uint64_t tau =
            sat_mul(T, share == 1 ? k->conf.conn_burst : local_part(l, k, k->conf.conn_burst));
        if (node_rated(l, k)) {
            /* a token of this worker's part, or of an idle one's */
            struct node_rate_undo u = {.from = worker_id(l)};
            if (node_cap_rate_take(k->node, NODE_RATE_CONN, worker_id(l), T, k->conf.conn_burst,
                                   part_idle_ns(T), now_ns, 1, retry_at_ns, &u) == 0) {
                l->st.conns_refused++;
                return false;
            }
            if (!local_lease(l, k, now_ns, retry_at_ns)) {
                node_cap_rate_give(k->node, NODE_RATE_CONN, &u, 1, T);
                l->st.conns_refused++;
                return false;
            }
            k->undo_tat = u.tat_after;
            k->undo_from = (uint8_t)u.from;
            k->undo = LIMIT_UNDO_NODE;
            return true;
        }
        uint64_t tat = k->conn_tat;
        if (limits_gcra(&tat, T, tau, now_ns, 1, retry_at_ns) == 0) {
            l->st.conns_refused++;
            return false;
        }
        if (!local_lease(l, k, now_ns, retry_at_ns)) {
            l->st.conns_refused++;
            return false;
        }
        k->undo_tat = k->conn_tat;
        k->undo = LIMIT_UNDO_TAT;
        k->conn_tat = tat; /* both or neither */
        return true;
    }
    if (!local_lease(l, k, now_ns, retry_at_ns)) {
        l->st.conns_refused++;
        return false;
    }
    k->undo = LIMIT_UNDO_LEASE;
    return true;
}

bool
limits_conn_acquire(struct limits *l, struct limit_key *k, uint64_t now_ns, uint64_t *retry_at_ns)
{
    return conn_acquire(l, k, now_ns, retry_at_ns, true);
}

bool
limits_lease_acquire(struct limits *l, struct limit_key *k, uint64_t now_ns, uint64_t *retry_at_ns)
{
    return conn_acquire(l, k, now_ns, retry_at_ns, false);
}

void
limits_conn_unacquire(struct limits *l, struct limit_key *k, uint64_t now_ns)
{
    if (k->undo == LIMIT_UNDO_NONE || k->nleases == 0) {
        log_msg(LOG_ERR, "event=limits_bug key=%s reason=unacquire_without_acquire", k->name);
        return;
    }
    uint64_t id = k->leases[--k->nleases];
    node_popped(l, k);
    l->leases--;
    l->st.conns_granted--;
    if (k->undo == LIMIT_UNDO_READY && k->ready_lease == 0) {
        /* Redis's grant, its token taken there: kept for the next. */
        k->ready_lease = id;
        k->ready_at = now_ns;
    } else {
        limits_redis_release(l, k, id);
        if (k->undo == LIMIT_UNDO_TAT)
            k->conn_tat = k->undo_tat;
        else if (k->undo == LIMIT_UNDO_NODE && k->node != NULL)
            node_cap_rate_back(k->node, NODE_RATE_CONN, k->undo_from, k->undo_tat);
    }
    k->undo = LIMIT_UNDO_NONE;
}

void
limits_conn_release(struct limits *l, struct limit_key *k)
{
    if (k->nleases == 0) {
        log_msg(LOG_ERR, "event=limits_bug key=%s reason=release_without_lease", k->name);
        return;
    }
    uint64_t id = k->leases[--k->nleases];
    node_popped(l, k);
    l->leases--;
    limits_redis_release(l, k, id);
    /* Shared: the next acquire asks Redis at once, not at the end of a
     * refusal's poll wait (up to limits_redis.c's CONN_POLL_MAX_NS): the release goes
     * ahead of it on the one connection, so a domain of this worker
     * waiting for the cap gets the lease this connection held. */
    k->conn_retry_at = 0;
}

bool
limits_node_wanted(struct limits *l, struct limit_key *k, uint64_t now_ns)
{
    return node_counted(l, k) &&
           node_cap_claim(k->node, worker_id(l), k->conf.max_connections, now_ns);
}

bool
limits_key_node_wide(const struct limit_key *k)
{
    return k->l != NULL && node_counted(k->l, k);
}

bool
limits_key_over(const struct limit_key *k, unsigned quitting, uint64_t now_ns)
{
    unsigned cap = k->conf.max_connections;
    if (cap == 0)
        return false;
    if (limits_key_node_wide(k))
        cap = node_cap_allow(k->node, worker_id(k->l), cap, now_ns);
    return k->nleases > quitting + cap || limits_key_excess(k) > 0;
}

bool
limits_key_capped(const struct limit_key *k, uint64_t now_ns)
{
    unsigned cap = k->conf.max_connections;
    if (cap == 0)
        return false;
    if (k->nleases >= cap || limits_key_full(k))
        return true;
    return limits_key_node_wide(k) && node_cap_full(k->node, worker_id(k->l), cap, now_ns);
}

bool
limits_key_full(const struct limit_key *k)
{
    return k->l != NULL && k->l->shared && k->cap_full;
}

unsigned
limits_key_excess(const struct limit_key *k)
{
    return k->l != NULL && k->l->shared ? k->excess : 0;
}

void
limits_key_excess_taken(struct limit_key *k)
{
    if (k->excess > 0)
        k->excess--;
}

bool
limits_key_asking(const struct limit_key *k)
{
    return k->l != NULL && k->l->shared && k->msg_req != NULL && k->want_wake;
}

void
limits_backoff(struct limits *l, struct limit_key *k, uint64_t now_ns)
{
    uint32_t f = backoff_factor(l, k, now_ns) / 2;
    if (f < FACTOR_MIN)
        f = FACTOR_MIN;
    k->bo_factor = f;
    k->bo_hold_until = now_ns + l->bo_ns;
    /* Tokens fetched at the old rate would keep it up for a batch. */
    if (k->held > 0) {
        l->st.tokens_expired += k->held;
        k->held = 0;
    }
    log_msg(LOG_INFO, "event=limits_backoff key=%s rate_pct=%u hold_ms=%llu", k->name,
            f * 100u / FACTOR_ONE, (unsigned long long)(l->bo_ns / 1000000ULL));
}

unsigned
limits_key_rate_pct(const struct limit_key *k, uint64_t now_ns)
{
    if (k->l == NULL)
        return 100;
    return bo_factor(k->l, k, now_ns) * 100u / FACTOR_ONE;
}

void
limits_key_shape(struct limits *l, struct limit_key *k, unsigned permille, uint64_t interval_ns)
{
    uint32_t f = permille == 0 || permille >= 1000 ? 0 : (uint32_t)(permille * FACTOR_ONE / 1000u);
    if (permille != 0 && permille < 1000 && f < FACTOR_MIN)
        f = FACTOR_MIN;
    if (f == k->shape_factor && interval_ns == k->shape_T)
        return;
    bool slower = (f != 0 && (k->shape_factor == 0 || f < k->shape_factor)) ||
                  interval_ns > k->shape_T;
    k->shape_factor = f;
    k->shape_T = interval_ns;
    /* Tokens fetched at the old rate would keep it up for a batch. */
    if (slower && k->held > 0) {
        l->st.tokens_expired += k->held;
        k->held = 0;
    }
    log_msg(LOG_DEBUG, "event=limits_shaped key=%s rate_permille=%u min_interval_us=%llu", k->name,
            permille, (unsigned long long)(interval_ns / 1000));
    if (!slower) {
        k->want_wake = true;
        key_wake(k);
    }
}

void
limits_suspend(struct limits *l, struct limit_key *k, bool on)
{
    (void)l;
    if (k->suspended == on)
        return;
    k->suspended = on;
    if (!on) {
        k->want_wake = true;
        key_wake(k);
    }
}

void
limits_stats(const struct limits *l, struct limits_stats *out)
{
    *out = l->st;
    out->leases = l->leases;
    if (l->r == NULL)
        out->redis = "off";
    else if (l->shared)
        out->redis = "connected";
    else if (redis_state(l->r) == REDIS_STATE_DOWN)
        out->redis = "unreachable";
    else
        out->redis = "connecting";
}
