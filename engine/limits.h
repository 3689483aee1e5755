/*
 * limits: per-key sending limits of one worker: a message rate with a
 * burst, a connection rate, and a cap on concurrent connections (leases).
 * A key is whatever the caller limits: a destination domain ("gmail.com"),
 * an MX host pattern ("*.google.com"), a source address. The caller owns
 * one struct limit_key per key (embedded in its destination) and hands it
 * to every call; the limiter owns nothing per key but its Redis requests.
 *
 * Local mode (no Redis): one GCRA per rate, in memory, exact and O(1).
 * GCRA with emission interval T = period / count and tolerance burst * T
 * lets through at most burst + W / T events in any half-open window of
 * length W, and sustains exactly count per period.
 *
 * Shared mode (Redis): the same GCRA lives in Redis, run by one Lua script
 * (EVALSHA; loaded at connect, reloaded on NOSCRIPT, and asked for again
 * every second while SCRIPT LOAD is refused, e.g. -LOADING after a
 * restart: shared once it loads) on Redis's own clock,
 * so every node sharing the Redis draws on one budget per key. A node
 * books message tokens in batches (up to token_batch, and about a tenth of
 * a second's worth): a batch is the next slots of the shared schedule, and
 * the node hands each out no earlier than its slot. It books the next
 * batch in the background when half is spent, so a message costs no round
 * trip in the common case. A token not used within a batch's time (at
 * least 100 ms) after its slot lapses.
 * Slack: in any window W the nodes together send at most
 *     rate * W + burst + 1 + nodes * batch
 * (a node may use, late, at most one batch of slots that fell before the
 * window; with steady demand the count stays at rate * W + burst + 1).
 * Connections are leases in a sorted set per key (member node-id:lease-id,
 * score = expiry); the script drops expired members and grants a lease and
 * a connection-rate token together or neither; held leases are refreshed
 * every ttl/3 and removed on release, so a node killed with SIGKILL loses
 * its leases after ttl. A lease refused because every one is held marks
 * the key wanted for a moment (limits_key_wanted): holders elsewhere with
 * nothing to send learn of it and give theirs back. Redis keys:
 * "<prefix>{<key>}:m|c|l|w" (one hash tag, so a Redis Cluster keeps a
 * key's four in one slot).
 *
 * Redis unreachable or slow (a command timeout): decisions stay local at a
 * conservative share: rates, bursts and max connections divided by the
 * expected node count, and by a key's spread (the limiters of one node
 * that hold the same key: one per worker for an [mx] limit), so that the
 * node as a whole keeps 1/nodes; a cap's or burst's part per limiter
 * with the remainder to the lowest workers (limits_part), a cap at least
 * one. Logged once per transition (event=redis_down,
 * event=redis_up) and reported by limits_stats(); reconnects with backoff.
 *
 * Replies are checked where they are parsed: a granted count above the
 * request is cut to the request (and a lease is one lease), a slot or a
 * wait further ahead than the request allows is brought back to that
 * bound (a wait to at most max(60 s, horizon + burst + 2 intervals)), and
 * a reply of the wrong shape (not an array of integers, a negative count)
 * or an error reply makes the key decide locally, at the local share, for
 * a second before it asks again. The first such reply is logged
 * (event=redis_bad_reply), every one is counted (redis_bad_replies); of
 * error replies (-OOM, -READONLY, -BUSY, ...) the first of each
 * connection is logged (event=redis_script_error), every one counted
 * (redis_errors).
 *
 * Adaptive backoff: limits_backoff() (on a 421 or a "rate limited" reply)
 * halves the key's message and connection rates (again on each further
 * call, down to 1/32) for backoff_ms, then raises them by a quarter of the
 * configured rate every backoff_step_ms until they are whole again. In
 * shared mode a node in backoff draws on the shared budget at its reduced
 * rate, so each of its tokens costs the cluster more.
 *
 * Message tokens taken and not used (another key of the transaction
 * refused) are given back (limits_give_msgs): to the local GCRA, to the
 * node's part they came from, or to the tokens booked from Redis (not to
 * Redis), never so that a key goes past its rate.
 *
 * Time: now_ns is CLOCK_MONOTONIC (clock_mono_ns()); local-only limiters may
 * be driven with simulated time. A *retry_at_ns of UINT64_MAX means "no
 * time: the key's waker will be called" (suspended, or every lease held).
 *
 * Threading: a limiter and its keys belong to one worker; no locks.
 */
#ifndef SLUICE_ENGINE_LIMITS_H
#define SLUICE_ENGINE_LIMITS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/conf.h"
#include "engine/node_caps.h"
#include "engine/worker.h"

struct limits;
struct limit_req;

struct limits_opts {
    const char *redis_url;      /* NULL: local only (see redis.h for the form) */
    const char *redis_password; /* NULL: none, or the URL's */
    const char *key_prefix;     /* NULL: "sluice:" */
    const char *node_id;        /* NULL: hostname-pid-worker-random; unique per limiter */
    unsigned nodes;             /* nodes expected to share the Redis; 0: 1 */
    uint64_t lease_ttl_ms;      /* 0: 30000 */
    unsigned token_batch;       /* most tokens fetched per round trip; 0: 10; 1: no batching */
    uint64_t backoff_ms;        /* 0: 60000 at the reduced rate after limits_backoff() */
    uint64_t backoff_step_ms;   /* 0: 30000 between steps back up */
    uint64_t redis_timeout_ms;  /* 0: 1000; a slower reply counts as Redis down */
    uint64_t reconnect_min_ms, reconnect_max_ms; /* 0: 100, 5000 */
    struct node_caps *node_caps; /* borrowed; the node's counts of the caps it shares
                                  * (node_caps.h); NULL: none */
};

/* What a key may do; count 0 in a rate or max_connections 0: unlimited. */
struct limit_conf {
    struct conf_rate msg_rate;
    unsigned msg_burst;       /* messages beyond the steady rate */
    struct conf_rate conn_rate;
    unsigned conn_burst;
    unsigned max_connections;
    unsigned spread;          /* limiters on this node holding this key (0: 1): the
                               * local share while Redis is away is 1/(nodes * spread)
                               * (a cap's and burst's parts: limits_part); without a
                               * redis_url, max_connections of a key held by more
                               * than one is the node's, counted for them all in
                               * limits_opts.node_caps (node_caps.h), and its rates
                               * (each limiter's part) are kept there, where a
                               * limiter may borrow the part of one asking for none */
};

#define LIMIT_KEY_MAX 256

typedef void limit_wake_fn(void *arg);

/* What limits_conn_unacquire() gives back. */
enum limit_undo {
    LIMIT_UNDO_NONE,  /* no acquire to undo */
    LIMIT_UNDO_LEASE, /* a lease alone (no rate, or a move's) */
    LIMIT_UNDO_TAT,   /* a lease and a local connection-rate token */
    LIMIT_UNDO_READY, /* the lease Redis granted (with its token, when ready_rated) */
    LIMIT_UNDO_NODE,  /* a lease and a token of a worker's part of the node's connection
                       * rate (undo_from; undo_tat: the part's tat after the take) */
};

/* What limits_key_wanted() knows of a key's wanted mark: the caller's,
 * beside the key, for the keys it asks of (an [mx] or [source] key; a
 * domain's key does not carry it). Zeroed before the first call. */
struct limit_want {
    struct limit_req *req; /* borrowed: the limiter's request in flight, NULL once
                            * answered, failed, or its key finished */
    uint64_t at;           /* asked then; 0: never */
    bool wanted;           /* the last answer */
};

/* Owned by the caller; set up with limits_key_init(). Fields are private
 * to limits.c and limits_redis.c except where noted. */
#define LIMIT_KEY_INLINE 48
struct limit_key {
    /* Readable: name_in when it fits (most domains), else an owned copy.
     * A destination holds one key: 48 octets, not LIMIT_KEY_MAX. */
    const char *name;
    char name_in[LIMIT_KEY_INLINE]; /* the name, cut to fit after limits_key_fini */
    struct limit_conf conf;    /* readable; change with limits_key_set() */
    limit_wake_fn *wake;       /* NULL: no wake-ups */
    void *wake_arg;            /* borrowed: the caller's */
    struct limits *l;          /* borrowed; NULL once finished */
    struct limit_key *prev, *next; /* on l's list */
    uint64_t msg_tat, conn_tat; /* local GCRA: theoretical arrival times */
    uint64_t undo_tat;         /* conn_tat before the last acquire (LIMIT_UNDO_TAT) */
    unsigned held;             /* shared: message tokens booked in Redis, unused */
    uint32_t bo_factor;        /* rate scale in 1/1024; 1024: no backoff */
    uint64_t held_slot;        /* ...the next one is due then */
    uint64_t held_T;           /* ...and each further one held_T later */
    uint64_t msg_retry_at, conn_retry_at; /* shared: Redis said not before */
    uint64_t local_until;      /* shared: a bad reply; decide locally until then */
    struct limit_req *msg_req, *conn_req; /* shared: in flight */
    struct limit_req *refresh_req; /* shared: the lease refresh in flight (one at a time) */
    struct limit_want *want;   /* borrowed: the caller's, once it asked limits_key_wanted */
    uint64_t *leases;          /* owned: ids of the leases held (connections open) */
    unsigned nleases, leases_cap;
    uint64_t ready_lease;      /* shared: granted, not yet handed out; 0: none */
    uint64_t ready_at;
    uint64_t bo_hold_until;
    uint32_t shape_factor;     /* a shaping action's scale in 1/1024; 0: none */
    unsigned node_held;        /* leases counted in node (node_cap_take; in the padding):
                                * a slot goes back when nleases falls below it, so one
                                * taken while the key was not counted (its cap 0) gives
                                * none back; those held when it becomes counted are
                                * counted then (limits_key_set) */
    uint64_t shape_T;          /* a shaping action's least message interval, ns; 0: none */
    bool suspended;
    bool want_wake;            /* a call was refused: wake on news */
    bool ready_rated;          /* ready_lease came with a connection-rate token */
    bool cap_full;             /* shared: Redis refused the last lease for the cap (every
                                * lease held), not for the rate */
    uint8_t undo;              /* what the last successful acquire took (enum limit_undo) */
    uint8_t undo_from;         /* LIMIT_UNDO_NODE: the worker whose part gave the token */
    uint16_t excess;           /* shared: leases of this limiter beyond the cap by Redis's
                                * last refresh (limits_key_excess; in the padding) */
    struct node_cap *node;     /* borrowed: the node's count of its cap and its rates'
                                * parts (conf.spread); NULL: none */
};

/* One GCRA step (limits.c's header): of want tokens at interval T with
 * tolerance tau, how many may go at now, moving *tat; 0 with *retry_at,
 * when one is due. */
unsigned limits_gcra(uint64_t *tat, uint64_t T, uint64_t tau, uint64_t now, unsigned want,
                     uint64_t *retry_at);

/* A limiter on w (borrowed: outlives it). With a redis_url the host is
 * resolved here (blocking: setup time) and connecting starts once w's loop
 * turns; until then decisions are local shares. Returns 0, or a negative
 * code with one line for the operator in err. */
int limits_new(struct worker *w, const struct limits_opts *o, struct limits **out, char *err,
               size_t errlen);
/* Free l at once. Leases still held are not released (they expire after
 * the ttl); call limits_key_fini() on every key first, while the loop
 * turns, to release them now. Keys still attached are detached. Not from
 * inside a wake callback. Returns NULL. */
struct limits *limits_free(struct limits *l);

/* Part me (0-based) of n split over parts: n / parts, and one more for
 * the first n % parts, so that the parts add up to n (3 over two
 * workers: 2 and 1). A cap, burst or count split between the workers or
 * limiters that hold one key. */
static inline unsigned
limits_part(unsigned n, unsigned parts, unsigned me)
{
    if (parts <= 1)
        return n;
    return n / parts + (me % parts < n % parts ? 1 : 0);
}

/* Attach k (name copied; no '{' or '}', < LIMIT_KEY_MAX bytes). Returns 0,
 * -EINVAL or -ENOMEM. k must not be moved while attached (k->name may
 * point into it). */
int limits_key_init(struct limits *l, struct limit_key *k, const char *name,
                    const struct limit_conf *c, limit_wake_fn *wake, void *wake_arg);
/* New limits for k (a config reload); state is kept. */
void limits_key_set(struct limits *l, struct limit_key *k, const struct limit_conf *c);
/* Release k's leases, drop its tokens, forget its requests in flight.
 * After this k may be freed. */
void limits_key_fini(struct limits *l, struct limit_key *k);

/* Message tokens: how many of n may go now (0..n). When 0, *retry_at_ns
 * is when asking again is worth it; in shared mode the waker also runs
 * when a refill (or a refusal with a time) comes from Redis. */
unsigned limits_take_msgs(struct limits *l, struct limit_key *k, unsigned n, uint64_t now_ns,
                          uint64_t *retry_at_ns);
/* What limits_take_msgs_undo() granted and how, for limits_give_msgs():
 * the caller's (a transaction's, on its stack), not the key's, which a
 * destination embeds. */
enum limit_msg_undo {
    LIMIT_MSG_UNDO_NONE, /* nothing to give back (none granted, or given back) */
    LIMIT_MSG_UNDO_FREE, /* no rate: nothing was taken */
    LIMIT_MSG_UNDO_TAT,  /* the local GCRA (tat: msg_tat before) */
    LIMIT_MSG_UNDO_NODE, /* a worker's part of the node's message rate (part) */
    LIMIT_MSG_UNDO_HELD, /* tokens Redis booked, handed out of held */
};
struct limit_grant {
    uint8_t how;                /* enum limit_msg_undo */
    unsigned n;                 /* tokens that may go back */
    uint64_t tat;               /* LIMIT_MSG_UNDO_TAT: the key's msg_tat before the take */
    uint64_t T;                 /* ...TAT and NODE: the interval they were taken at */
    struct node_rate_undo part; /* LIMIT_MSG_UNDO_NODE: what the take did to its part */
};
/* limits_take_msgs(), and in *g what it granted and how. */
unsigned limits_take_msgs_undo(struct limits *l, struct limit_key *k, unsigned n, uint64_t now_ns,
                               uint64_t *retry_at_ns, struct limit_grant *g);
/* n of the message tokens limits_take_msgs_undo() just granted on k (g,
 * its grant), given back unused: another key of the same transaction
 * refused its token. At most g's n (a node-wide rate: those of the part
 * that gave the last of them). Local: the GCRA's schedule goes back by n
 * intervals, never before it was before the take. A worker's part of
 * the node's rate: back to the part they came from, with its state
 * before the take, unless another worker took of that part since (then
 * they stay spent: giving them back under that take could let the part
 * go past its rate). Shared: back to the tokens Redis booked for k
 * (held), at their slots, for k's next take; nothing goes to Redis. So a
 * key never gives more than its rate, and a token given back is not
 * lost. Once (g is cleared), right after that take, before any other
 * call on k (calls on other keys may come between); the rest of the
 * grant stays taken. Returns how many went back. */
unsigned limits_give_msgs(struct limits *l, struct limit_key *k, struct limit_grant *g, unsigned n);
/* A new connection: a connection-rate token and a lease, both or neither.
 * Every true is matched by one limits_conn_release(). */
bool limits_conn_acquire(struct limits *l, struct limit_key *k, uint64_t now_ns,
                         uint64_t *retry_at_ns);
/* An open connection coming to k from another key (a site's connection
 * moving to another of its domains): a lease only. The receiver sees no
 * new connection, so no connection-rate token is taken. Released with
 * limits_conn_release() like the others. */
bool limits_lease_acquire(struct limits *l, struct limit_key *k, uint64_t now_ns,
                          uint64_t *retry_at_ns);
/* The lease and token k's last successful acquire just took, given back:
 * the connection did not open after all (another of its keys refused, or
 * the open failed). Local: the token is returned to the rate. Shared: a
 * lease Redis granted with its token stays ready for k's next acquire
 * (the refresh timer gives it back after ttl/3 unused). Only right after
 * that acquire, before any other call on k. */
void limits_conn_unacquire(struct limits *l, struct limit_key *k, uint64_t now_ns);
void limits_conn_release(struct limits *l, struct limit_key *k);
/* Shared mode: was k's last lease refused because every lease of its cap
 * is held (anywhere), as opposed to its connection rate? Such a refusal
 * comes with a poll time (*retry_at_ns), not UINT64_MAX; the caller may
 * also wait for a local release. False in local mode (a full cap there
 * answers UINT64_MAX). */
bool limits_key_full(const struct limit_key *k);
/* Shared mode: how many of the leases k holds here should end: Redis's
 * last refresh of them found more leases of k across the nodes than its
 * max_connections (after an outage, whose local shares add up to more
 * than the cap, or a cap lowered by a reload), at most those held here.
 * The caller ends that many connections after their transaction, telling
 * each to limits_key_excess_taken(); a later refresh says it again if the
 * set is still over. 0 in local mode. */
unsigned limits_key_excess(const struct limit_key *k);
void limits_key_excess_taken(struct limit_key *k);
/* Does k hold more leases than its max_connections lets it keep now,
 * quitting of them counted as gone (told to end already)? Its cap; or,
 * counted for the node (limits_key_node_wide), what this worker may keep
 * beside the others (node_cap_allow: one fewer when it is past its floor
 * and the workers below theirs want more than the slots left); or,
 * shared, Redis's excess. */
bool limits_key_over(const struct limit_key *k, unsigned quitting, uint64_t now_ns);
/* Would a lease of k be refused now for its cap (not its rate)? */
bool limits_key_capped(const struct limit_key *k, uint64_t now_ns);
/* Is k's cap counted for the node (conf.spread > 1, no redis_url)? A
 * refusal by the node's count comes with a time (NODE_CAP_POLL_MS on):
 * a connection of another worker that ends wakes nothing here. */
bool limits_key_node_wide(const struct limit_key *k);
/* Shared mode: was k's last message token refused while a request for
 * its tokens is in flight to Redis? Its answer wakes k (the key's wake
 * function); the refusal's *retry_at_ns is only that request's timeout,
 * and the tokens it books lapse soon after their slots (a batch's time,
 * at least 100 ms), so a caller that waits for the timeout instead of the
 * wake finds them gone and asks again. False in local mode. */
bool limits_key_asking(const struct limit_key *k);
/* Shared mode, k with max_connections: did another limiter (another
 * worker, another node) find every lease of k held within the last 1.5 s
 * and wait for one (a mark in Redis, "<prefix>{<key>}:w", set by the
 * refusal and cleared by its grant)? What the last answer said (w, the
 * caller's: clear w->wanted once acted on); asks again, in the
 * background, when that is LIMIT_WANT_POLL_MS old, so a caller that asks
 * every LIMIT_WANT_POLL_MS knows within two of them. An answer of yes
 * takes the mark: one holder answers each refusal (the waiter marks
 * again at its next refusal). The holder of an idle connection asks,
 * and gives its lease back. Without Redis, for a cap counted for the
 * node (limits_key_node_wide): whether another worker of the node was
 * refused a slot and waits, now (node_cap_claim: a yes takes its want;
 * nothing asked, w unused). False otherwise in local mode and while
 * Redis is away. */
#define LIMIT_WANT_POLL_MS 250
bool limits_key_wanted(struct limits *l, struct limit_key *k, struct limit_want *w,
                       uint64_t now_ns);
/* A 421 or a "rate limited" reply: see above. */
void limits_backoff(struct limits *l, struct limit_key *k, uint64_t now_ns);
/* A shaping action (engine/shaping.h, action=rate) lowers k's message
 * rate for as long as it is given: to permille of the configured rate
 * (0: no fraction) and to at most one message per interval_ns (0: no
 * absolute rate; applies even where no rate is configured), whichever is
 * slower, on top of an adaptive backoff (the lower scale wins). Given
 * again on every transaction; 0, 0 lifts it (the waker runs). In shared
 * mode the slower interval is what the node books from the shared
 * schedule, so the nodes together keep to an absolute rate. */
void limits_key_shape(struct limits *l, struct limit_key *k, unsigned permille,
                      uint64_t interval_ns);
/* The rate scale now, in percent of the configured rates (100: none). */
unsigned limits_key_rate_pct(const struct limit_key *k, uint64_t now_ns);
/* Suspended: no tokens and no new connections (open ones keep their
 * leases); resuming runs the waker. */
void limits_suspend(struct limits *l, struct limit_key *k, bool on);

struct limits_stats {
    const char *redis;          /* "off", "connecting", "connected", "unreachable" */
    uint64_t redis_roundtrips;  /* script calls answered by Redis */
    uint64_t redis_errors;      /* error replies, lost replies (timeouts, disconnects) */
    uint64_t redis_bad_replies; /* replies clamped or refused (see above) */
    uint64_t redis_downs;       /* transitions to unreachable */
    uint64_t local_decisions;   /* answered in memory: local mode or local share */
    uint64_t batch_decisions;   /* answered from a batch of Redis tokens */
    uint64_t tokens_fetched;    /* message tokens granted by Redis */
    uint64_t tokens_expired;    /* ...and dropped unused */
    uint64_t msgs_granted;      /* message tokens handed out */
    uint64_t conns_granted, conns_refused;
    unsigned keys, leases;      /* attached keys, leases held now */
};
void limits_stats(const struct limits *l, struct limits_stats *out);

#endif
