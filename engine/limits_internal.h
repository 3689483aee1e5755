/*
 * limits_internal: what the two halves of the limiter share. limits.c
 * decides locally and holds the API of limits.h; limits_redis.c runs the
 * shared decisions (the Lua script, its requests and their replies,
 * Redis's state). Both need the limiter itself, a request in flight and
 * the rate arithmetic; nothing else includes this file.
 *
 * Threading: the owning worker's thread only.
 */
#ifndef SLUICE_ENGINE_LIMITS_INTERNAL_H
#define SLUICE_ENGINE_LIMITS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/limits.h"

#define FACTOR_ONE 1024u  /* backoff scale: 1024 = the configured rate */
#define FACTOR_MIN 32u    /* 1/32 of it at most */
#define FACTOR_STEP 256u  /* a quarter of it back per step */
#define NAME_MAX_PREFIX 64

struct redis;

enum req_kind { REQ_TAKE, REQ_CONN, REQ_REFRESH, REQ_RELEASE, REQ_WANTED };

struct limit_req {
    struct limit_req *prev, *next; /* on l->reqs */
    struct limits *l;              /* borrowed: l frees its requests */
    struct limit_key *k;           /* borrowed; NULL once the key was finished */
    enum req_kind kind;
    bool retried;                  /* resent once after NOSCRIPT */
    bool rated;                    /* CONN: a connection-rate token asked with the lease */
    unsigned want, max;
    uint64_t horizon_us;            /* TAKE: book no slot further ahead */
    uint64_t T_ns;                  /* TAKE: the interval the slots are spaced by */
    uint64_t T_us, tau_us;
    uint64_t lease;                /* CONN: asked for; RELEASE: to drop */
    char name[LIMIT_KEY_MAX];
};

struct limits {
    struct worker *w;  /* borrowed: outlives l */
    struct redis *r;   /* owned; NULL: local only */
    char prefix[NAME_MAX_PREFIX];
    char node[128];
    unsigned nodes;
    unsigned batch;
    uint64_t ttl_ns, bo_ns, bo_step_ns, timeout_ns;
    char sha[41];
    bool sha_ok;       /* EVALSHA may be used */
    bool loading;      /* SCRIPT LOAD in flight */
    bool shared;       /* connected and the script loaded */
    bool down_logged;  /* event=redis_down said for this outage */
    bool bad_logged;   /* event=redis_bad_reply said (once per limiter) */
    bool load_logged;  /* event=redis_script_load_failed said since the last load */
    bool err_logged;   /* event=redis_script_error said on this connection */
    struct node_caps *node_caps; /* borrowed: limits_opts.node_caps */
    struct limit_key *keys; /* borrowed: attached keys */
    struct limit_req *reqs; /* owned: in flight */
    uint64_t next_lease;
    unsigned leases;
    struct timer refresh_timer;
    struct timer script_timer; /* SCRIPT LOAD again after a refusal */
    struct limits_stats st;
};

/* Without Redis: does another worker want a slot of k's cap counted for
 * the node (limits_key_wanted)? A yes takes its want. */
bool limits_node_wanted(struct limits *l, struct limit_key *k, uint64_t now_ns);

/* --- the rate arithmetic both halves run ------------------------------ */

static inline uint64_t
sat_mul(uint64_t a, uint64_t b)
{
    if (a != 0 && b > UINT64_MAX / 4 / a)
        return UINT64_MAX / 4; /* far enough from overflow for now + tau + T */
    return a * b;
}

/* Emission interval of a rate in ns (rounded up: never faster than
 * configured); 0 when unlimited. */
static inline uint64_t
rate_interval(const struct conf_rate *r)
{
    if (r->count == 0)
        return 0;
    uint64_t period = MS_TO_NS(r->per_ms ? r->per_ms : 1000);
    return (period + r->count - 1) / r->count;
}

static inline uint32_t
backoff_factor(const struct limits *l, const struct limit_key *k, uint64_t now)
{
    if (k->bo_factor >= FACTOR_ONE)
        return FACTOR_ONE;
    if (now < k->bo_hold_until)
        return k->bo_factor;
    uint64_t steps = (now - k->bo_hold_until) / l->bo_step_ns + 1;
    uint64_t f = k->bo_factor + steps * FACTOR_STEP;
    return f >= FACTOR_ONE ? FACTOR_ONE : (uint32_t)f;
}

/* The rate scale: the adaptive backoff's, or a shaping action's when
 * lower (limits_key_shape). */
static inline uint32_t
bo_factor(const struct limits *l, const struct limit_key *k, uint64_t now)
{
    uint32_t f = backoff_factor(l, k, now);
    return k->shape_factor != 0 && k->shape_factor < f ? k->shape_factor : f;
}

/* T scaled by backoff and by the local share. */
static inline uint64_t
eff_interval(uint64_t T, uint32_t factor, unsigned share)
{
    T = sat_mul(T, FACTOR_ONE) / factor;
    if (T == 0)
        T = 1;
    return sat_mul(T, share);
}

/* The message interval of k now (ns, before the local share; 0:
 * unlimited): the configured rate scaled (backoff, a shaping fraction),
 * and never shorter than a shaping action's absolute rate asks. */
static inline uint64_t
msg_interval(const struct limits *l, const struct limit_key *k, uint64_t now)
{
    uint64_t T0 = rate_interval(&k->conf.msg_rate);
    uint64_t T = T0 != 0 ? eff_interval(T0, bo_factor(l, k, now), 1) : 0;
    return k->shape_T > T ? k->shape_T : T;
}

/* Tokens per request: token_batch, at most a tenth of a second's worth at
 * interval T. */
static inline unsigned
batch_size(const struct limits *l, uint64_t T)
{
    uint64_t per_tenth = T != 0 ? MS_TO_NS(100) / T : 0;
    uint64_t b = l->batch;
    if (per_tenth < b)
        b = per_tenth;
    return b == 0 ? 1 : (unsigned)b;
}

static inline void
key_wake(struct limit_key *k)
{
    if (!k->want_wake)
        return;
    k->want_wake = false;
    if (k->wake != NULL)
        k->wake(k->wake_arg);
}

/* --- limits_redis.c: the shared decisions ------------------------------ */

/* Connect to o->redis_url (the script is loaded once it is up) and start
 * the lease refresh; 0, or -errno with err filled. */
int limits_redis_start(struct limits *l, const struct limits_opts *o, char *err, size_t errlen);

/* Stop the timers, close the connection (no callback runs) and free the
 * requests in flight, cutting their keys' links to them. */
void limits_redis_stop(struct limits *l);

/* Book the rest of k's message batch (k->msg_req while in flight);
 * 0, or -errno when Redis will not take the request. */
int limits_redis_take(struct limits *l, struct limit_key *k, uint64_t now);

/* Ask for a lease of k, with a connection-rate token when rated
 * (k->conn_req while in flight); 0, or -errno. */
int limits_redis_lease(struct limits *l, struct limit_key *k, uint64_t now, bool rated);

/* Give lease back to Redis (nothing while not shared: it expires after
 * the ttl). k is read for its name only. */
void limits_redis_release(struct limits *l, struct limit_key *k, uint64_t lease);

#endif
