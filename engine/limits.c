/*
 * limits: the per-worker limiter of limits.h.
 *
 * Local decisions are GCRA over the caller's clock in nanoseconds: one
 * theoretical arrival time (tat) per rate and key. A request for n takes
 * g = min(n, avail) where avail = floor((now + tau + T - max(tat, now)) / T)
 * and moves tat by g * T; when avail is 0 the answer is the time tat - tau
 * at which one token is due. No timers, no per-token work.
 *
 * Shared decisions run the same arithmetic in Redis (the script below, in
 * microseconds of Redis's TIME, since the nodes' monotonic clocks have
 * nothing in common). Requests to Redis are struct limit_req, one per
 * script call, on l->reqs until answered; a key points at its message and
 * connection requests in flight and limits_key_fini() cuts those links so
 * that a late answer finds no key (a lease granted to a finished key is
 * released at once).
 *
 * Message tokens are booked, not taken: a request books the next `want`
 * slots of the shared schedule (tat moves by want * T) as long as the
 * first of them is due within a horizon (one batch per expected node), and
 * the answer says when the first is due. The node hands slot i out no
 * earlier than first + i * T on its own clock, so the shared GCRA bound
 * holds across nodes however the batches interleave, and a node that
 * wants more than its share waits for its slots instead of asking again
 * and again: round trips stay at about one per half batch even when every
 * node pushes at the limit.
 *
 * Threading: the owning worker's thread only.
 */
#include "engine/limits.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "common/log.h"
#include "engine/redis.h"

#define FACTOR_ONE 1024u  /* backoff scale: 1024 = the configured rate */
#define FACTOR_MIN 32u    /* 1/32 of it at most */
#define FACTOR_STEP 256u  /* a quarter of it back per step */
#define HELD_MIN_NS MS_TO_NS(100)
#define CONN_POLL_MAX_NS MS_TO_NS(100) /* leases all taken: ask again within */
/* How long a refusal for a full cap marks the key wanted ("...:w", the
 * refused limiter's node id): longer than a waiter's poll, so that the
 * mark stands while one waits (limits_key_wanted). */
#define WANT_TTL_MS "1500"
#define WAIT_MAX_NS MS_TO_NS(60000)     /* a refusal's wait: at least this cap */
#define BAD_REPLY_LOCAL_NS MS_TO_NS(1000) /* a key decides locally after a bad reply */
#define SCRIPT_RETRY_NS MS_TO_NS(1000)    /* SCRIPT LOAD refused: ask again after */
#define NAME_MAX_PREFIX 64

/*
 * KEYS: message GCRA, connection GCRA, lease set, wanted mark (the node id
 * of a limiter refused a lease because every one was held; op wanted
 * claims it for one holder of another node). Times in microseconds of
 * Redis's clock; numbers go back to Redis through %.0f because Lua's own
 * number-to-string keeps 14 digits and a time has 16.
 */
static const char script_text[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local function fmt(x) return string.format('%.0f', x) end\n"
    "local function gcra(key, T, tau)\n"
    "  local tat = tonumber(redis.call('GET', key)) or 0\n"
    "  if tat < now then tat = now end\n"
    "  if tat - tau > now then return 0, tat - tau - now end\n"
    "  tat = tat + T\n"
    "  redis.call('SET', key, fmt(tat), 'PX', fmt(math.ceil((tat - now) / 1000) + 1000))\n"
    "  return 1, 0\n"
    "end\n"
    "local op = ARGV[1]\n"
    "if op == 'take' then\n"
    "  local T, tau, want, horizon = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),"
    " tonumber(ARGV[5])\n"
    "  local tat = tonumber(redis.call('GET', KEYS[1])) or 0\n"
    "  if tat < now then tat = now end\n"
    "  local first = tat - tau\n"
    "  if first - now > horizon then return {0, first - now - horizon} end\n"
    "  tat = tat + want * T\n"
    "  redis.call('SET', KEYS[1], fmt(tat), 'PX', fmt(math.ceil((tat - now) / 1000) + 1000))\n"
    "  return {want, first - now}\n"
    "elseif op == 'conn' then\n"
    "  local T, max, ttl = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[6])\n"
    "  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', fmt(now))\n"
    "  if max > 0 and redis.call('ZCARD', KEYS[3]) >= max then\n"
    "    redis.call('SET', KEYS[4], ARGV[7], 'PX', " WANT_TTL_MS ")\n"
    "    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')\n"
    "    return {0, tonumber(first[2]) - now, 1}\n"
    "  end\n"
    "  if T > 0 then\n"
    "    local g, wait = gcra(KEYS[2], T, tonumber(ARGV[3]))\n"
    "    if g == 0 then return {0, wait, 2} end\n"
    "  end\n"
    "  redis.call('ZADD', KEYS[3], fmt(now + ttl), ARGV[5])\n"
    "  redis.call('PEXPIRE', KEYS[3], fmt(math.ceil(ttl / 1000) + 1000))\n"
    "  if redis.call('GET', KEYS[4]) == ARGV[7] then redis.call('DEL', KEYS[4]) end\n"
    "  return {1, 0, 0}\n"
    "elseif op == 'refresh' then\n"
    "  local ttl = tonumber(ARGV[2])\n"
    "  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', fmt(now))\n"
    "  for i = 3, #ARGV do redis.call('ZADD', KEYS[3], fmt(now + ttl), ARGV[i]) end\n"
    "  redis.call('PEXPIRE', KEYS[3], fmt(math.ceil(ttl / 1000) + 1000))\n"
    "  return #ARGV - 2\n"
    "elseif op == 'release' then\n"
    "  return redis.call('ZREM', KEYS[3], ARGV[2])\n"
    "elseif op == 'wanted' then\n"
    "  local v = redis.call('GET', KEYS[4])\n"
    "  if v and v ~= ARGV[2] then redis.call('DEL', KEYS[4]) return {1, 0} end\n"
    "  return {0, 0}\n"
    "end\n"
    "return redis.error_reply('ERR sluice limits: unknown op')\n";

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
    struct limit_key *keys; /* borrowed: attached keys */
    struct limit_req *reqs; /* owned: in flight */
    uint64_t next_lease;
    unsigned leases;
    struct timer refresh_timer;
    struct timer script_timer; /* SCRIPT LOAD again after a refusal */
    struct limits_stats st;
};

/* --- arithmetic ------------------------------------------------------- */

static uint64_t
sat_mul(uint64_t a, uint64_t b)
{
    if (a != 0 && b > UINT64_MAX / 4 / a)
        return UINT64_MAX / 4; /* far enough from overflow for now + tau + T */
    return a * b;
}

/* Emission interval of a rate in ns (rounded up: never faster than
 * configured); 0 when unlimited. */
static uint64_t
rate_interval(const struct conf_rate *r)
{
    if (r->count == 0)
        return 0;
    uint64_t period = MS_TO_NS(r->per_ms ? r->per_ms : 1000);
    return (period + r->count - 1) / r->count;
}

static uint32_t
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
static uint32_t
bo_factor(const struct limits *l, const struct limit_key *k, uint64_t now)
{
    uint32_t f = backoff_factor(l, k, now);
    return k->shape_factor != 0 && k->shape_factor < f ? k->shape_factor : f;
}

/* T scaled by backoff and by the local share. */
static uint64_t
eff_interval(uint64_t T, uint32_t factor, unsigned share)
{
    T = sat_mul(T, FACTOR_ONE) / factor;
    if (T == 0)
        T = 1;
    return sat_mul(T, share);
}

static unsigned
gcra_take(uint64_t *tat, uint64_t T, uint64_t tau, uint64_t now, unsigned want,
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
 * same key (conf.spread). Without Redis the caller has split them. */
static unsigned
local_share(const struct limits *l, const struct limit_key *k)
{
    if (l->r == NULL)
        return 1;
    uint64_t s = (uint64_t)l->nodes * (k->conf.spread ? k->conf.spread : 1);
    return s > 1000000u ? 1000000u : (unsigned)s;
}

/* The message interval of k now (ns, before the local share; 0:
 * unlimited): the configured rate scaled (backoff, a shaping fraction),
 * and never shorter than a shaping action's absolute rate asks. */
static uint64_t
msg_interval(const struct limits *l, const struct limit_key *k, uint64_t now)
{
    uint64_t T0 = rate_interval(&k->conf.msg_rate);
    uint64_t T = T0 != 0 ? eff_interval(T0, bo_factor(l, k, now), 1) : 0;
    return k->shape_T > T ? k->shape_T : T;
}

/* Tokens per request: token_batch, at most a tenth of a second's worth at
 * interval T. */
static unsigned
batch_size(const struct limits *l, uint64_t T)
{
    uint64_t per_tenth = T != 0 ? MS_TO_NS(100) / T : 0;
    uint64_t b = l->batch;
    if (per_tenth < b)
        b = per_tenth;
    return b == 0 ? 1 : (unsigned)b;
}

static void
key_wake(struct limit_key *k)
{
    if (!k->want_wake)
        return;
    k->want_wake = false;
    if (k->wake != NULL)
        k->wake(k->wake_arg);
}

/* --- Redis requests --------------------------------------------------- */

static void on_req_reply(struct redis *r, const struct redisReply *reply, void *arg);

static void
req_link(struct limits *l, struct limit_req *q)
{
    q->prev = NULL;
    q->next = l->reqs;
    if (l->reqs != NULL)
        l->reqs->prev = q;
    l->reqs = q;
}

static void
req_unlink(struct limits *l, struct limit_req *q)
{
    if (q->prev != NULL)
        q->prev->next = q->next;
    else
        l->reqs = q->next;
    if (q->next != NULL)
        q->next->prev = q->prev;
    q->prev = q->next = NULL;
}

static struct limit_req *
req_new(struct limits *l, struct limit_key *k, enum req_kind kind)
{
    struct limit_req *q = calloc(1, sizeof(*q));
    if (q == NULL)
        return NULL;
    q->l = l;
    q->k = k;
    q->kind = kind;
    snprintf(q->name, sizeof(q->name), "%s", k->name);
    return q;
}

static void
fmt_u64(char *buf, size_t len, uint64_t v)
{
    snprintf(buf, len, "%llu", (unsigned long long)v);
}

/* Build and queue the script call of q (EVALSHA, or EVAL when the script
 * is not known to be loaded). Links q on success. */
static int
req_send(struct limits *l, struct limit_req *q)
{
    enum { FIXED = 16 }; /* EVALSHA sha 4 keys[4] and the most an op sends: conn, 7 */
    char keys[4][NAME_MAX_PREFIX + LIMIT_KEY_MAX + 8];
    static const char suffix[4] = {'m', 'c', 'l', 'w'};
    for (int i = 0; i < 4; i++)
        snprintf(keys[i], sizeof(keys[i]), "%s{%s}:%c", l->prefix, q->name, suffix[i]);
    char num[5][24];
    char member[sizeof(l->node) + 24];
    const char *fixed[FIXED];
    const char **argv = fixed;
    size_t flens[FIXED];
    size_t *lens = flens;
    char *members = NULL;
    int argc = 0;
    unsigned extra = 0;
    const struct limit_key *k = q->k;
    if (q->kind == REQ_REFRESH) {
        if (k == NULL)
            return -ENOENT;
        extra = k->nleases + (k->ready_lease != 0);
        if (extra > 0) {
            argv = calloc(FIXED + extra, sizeof(*argv));
            lens = calloc(FIXED + extra, sizeof(*lens));
            members = malloc((size_t)extra * sizeof(member));
            if (argv == NULL || lens == NULL || members == NULL) {
                if (argv != fixed)
                    free(argv);
                if (lens != flens)
                    free(lens);
                free(members);
                return -ENOMEM;
            }
        }
    }
#define ARG(s, n) (argv[argc] = (s), lens[argc] = (n), argc++)
#define ARGS(s) ARG((s), strlen(s))
    if (l->sha_ok && !q->retried) {
        ARG("EVALSHA", 7);
        ARG(l->sha, 40);
    } else {
        ARG("EVAL", 4);
        ARG(script_text, sizeof(script_text) - 1);
    }
    ARG("4", 1);
    for (int i = 0; i < 4; i++)
        ARGS(keys[i]);
    switch (q->kind) {
    case REQ_TAKE:
        ARG("take", 4);
        fmt_u64(num[0], sizeof(num[0]), q->T_us);
        fmt_u64(num[1], sizeof(num[1]), q->tau_us);
        fmt_u64(num[2], sizeof(num[2]), q->want);
        fmt_u64(num[3], sizeof(num[3]), q->horizon_us);
        for (int i = 0; i < 4; i++)
            ARGS(num[i]);
        break;
    case REQ_CONN:
        ARG("conn", 4);
        fmt_u64(num[0], sizeof(num[0]), q->T_us);
        fmt_u64(num[1], sizeof(num[1]), q->tau_us);
        fmt_u64(num[2], sizeof(num[2]), q->max);
        snprintf(member, sizeof(member), "%s:%llu", l->node, (unsigned long long)q->lease);
        fmt_u64(num[3], sizeof(num[3]), l->ttl_ns / 1000);
        ARGS(num[0]);
        ARGS(num[1]);
        ARGS(num[2]);
        ARGS(member);
        ARGS(num[3]);
        ARGS(l->node); /* the wanted mark's value (op wanted) */
        break;
    case REQ_WANTED:
        ARG("wanted", 6);
        ARGS(l->node);
        break;
    case REQ_RELEASE:
        ARG("release", 7);
        snprintf(member, sizeof(member), "%s:%llu", l->node, (unsigned long long)q->lease);
        ARGS(member);
        break;
    case REQ_REFRESH:
        ARG("refresh", 7);
        fmt_u64(num[0], sizeof(num[0]), l->ttl_ns / 1000);
        ARGS(num[0]);
        for (unsigned i = 0; i < extra; i++) {
            char *m = members + (size_t)i * sizeof(member);
            uint64_t id = i < k->nleases ? k->leases[i] : k->ready_lease;
            snprintf(m, sizeof(member), "%s:%llu", l->node, (unsigned long long)id);
            ARGS(m);
        }
        break;
    }
#undef ARG
#undef ARGS
    int rc = redis_command(l->r, on_req_reply, q, argc, argv, lens);
    if (argv != fixed)
        free(argv);
    if (lens != flens)
        free(lens);
    free(members);
    if (rc == 0)
        req_link(l, q);
    return rc;
}

/* Queue q, or free it when Redis will not take it. */
static int
req_submit(struct limits *l, struct limit_req *q)
{
    int rc = req_send(l, q);
    if (rc < 0)
        free(q);
    return rc;
}

static void
send_release(struct limits *l, struct limit_key *k, uint64_t lease)
{
    if (!l->shared)
        return; /* it expires after the ttl */
    struct limit_req *q = req_new(l, k, REQ_RELEASE);
    if (q == NULL)
        return;
    q->k = NULL; /* the answer needs no key */
    q->lease = lease;
    req_submit(l, q);
}

static void
send_refresh(struct limits *l, struct limit_key *k)
{
    if (!l->shared || (k->nleases == 0 && k->ready_lease == 0))
        return;
    struct limit_req *q = req_new(l, k, REQ_REFRESH);
    if (q == NULL)
        return;
    if (req_send(l, q) < 0) {
        free(q);
        return;
    }
    q->k = NULL; /* the members are on the wire; the answer needs no key */
}

static void script_load(struct limits *l);

/* A reply that no script of ours returns: counted, the first one logged.
 * Anything on Redis's port could have sent it (a proxy, another
 * version's script, a bug), so it steers nothing beyond its bounds. */
static void
bad_reply(struct limits *l, const struct limit_req *q, const char *what, long long got,
          long long bound)
{
    l->st.redis_bad_replies++;
    if (l->bad_logged)
        return;
    l->bad_logged = true;
    log_msg(LOG_ERR,
            "event=redis_bad_reply redis=%s key=%s what=%s got=%lld bound=%lld "
            "note=clamped_or_decided_locally_further_ones_counted",
            redis_addr(l->r), q->name, what, got, bound);
}

/* The first n integers of an array reply into v; false when it is not
 * that shape. */
static bool
reply_ints(const struct redisReply *reply, size_t n, long long *v)
{
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements < n)
        return false;
    for (size_t i = 0; i < n; i++) {
        if (reply->element[i] == NULL || reply->element[i]->type != REDIS_REPLY_INTEGER)
            return false;
        v[i] = reply->element[i]->integer;
    }
    return true;
}

static long long
clamp_ll(long long v, long long lo, long long hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

static void
on_req_reply(struct redis *r, const struct redisReply *reply, void *arg)
{
    (void)r;
    struct limit_req *q = arg;
    struct limits *l = q->l;
    struct limit_key *k = q->k;
    req_unlink(l, q);
    uint64_t now = clock_now_ns();
    bool refused = false; /* answered, but nothing to go by: decide locally a while */
    if (reply != NULL && reply->type == REDIS_REPLY_ERROR) {
        if (!q->retried && reply->str != NULL && strncmp(reply->str, "NOSCRIPT", 8) == 0) {
            /* Redis lost the script (restart, SCRIPT FLUSH): send this one
             * with its body and load it again for the next ones. */
            l->sha_ok = false;
            script_load(l);
            q->retried = true;
            if (req_send(l, q) == 0)
                return;
        } else if (!l->err_logged) {
            /* Said once per connection: a Redis out of memory (-OOM), a
             * read-only replica (-READONLY) or one busy with a script
             * (-BUSY) refuses every key's requests, each key again every
             * second; redis_errors counts them. */
            l->err_logged = true;
            log_msg(LOG_ERR,
                    "event=redis_script_error redis=%s key=%s reply=\"%.*s\" "
                    "note=decided_locally_further_ones_counted",
                    redis_addr(l->r), q->name, (int)(reply->len > 200 ? 200 : reply->len),
                    reply->str ? reply->str : "");
        }
        reply = NULL;
        refused = true;
    }
    long long v[2] = {0, 0}; /* v[1] may be negative: slots in the past */
    bool ints = q->kind == REQ_TAKE || q->kind == REQ_CONN || q->kind == REQ_WANTED;
    if (reply != NULL && ints && (!reply_ints(reply, 2, v) || v[0] < 0)) {
        bad_reply(l, q, reply->type != REDIS_REPLY_ARRAY ? "reply_type" : "reply_shape",
                  reply->type == REDIS_REPLY_ARRAY ? (long long)reply->elements : reply->type,
                  2);
        reply = NULL;
        refused = true;
    }
    if (reply == NULL) {
        /* No answer: tokens and leases decide locally from now on (the
         * state change follows) or on the next call. A lease Redis may
         * have granted unseen expires after the ttl. */
        l->st.redis_errors++;
        if (k != NULL) {
            if (q->kind == REQ_TAKE)
                k->msg_req = NULL;
            else if (q->kind == REQ_CONN)
                k->conn_req = NULL;
            else if (q->kind == REQ_WANTED && k->want != NULL)
                k->want->req = NULL;
            if (refused)
                k->local_until = now + BAD_REPLY_LOCAL_NS;
            key_wake(k);
        }
        free(q);
        return;
    }
    l->st.redis_roundtrips++;
    switch (q->kind) {
    case REQ_TAKE: {
        if (k == NULL)
            break; /* granted to a finished key: let them lapse */
        k->msg_req = NULL;
        long long horizon = (long long)(q->horizon_us < INT64_MAX / 4 ? q->horizon_us
                                                                      : INT64_MAX / 4);
        long long tau = (long long)(q->tau_us < INT64_MAX / 4 ? q->tau_us : INT64_MAX / 4);
        if (v[0] > (long long)q->want) {
            bad_reply(l, q, "granted", v[0], q->want);
            v[0] = q->want;
        }
        if (v[0] > 0) {
            /* The first slot is at most the horizon ahead (the script books
             * nothing further) and at most tau behind (tat is never behind
             * Redis's now). */
            if (v[1] > horizon)
                bad_reply(l, q, "first_slot_us", v[1], horizon);
            v[1] = clamp_ll(v[1], -tau, horizon); /* earlier than -tau: later is safe */
            /* Slot i of the batch is first + i * T on Redis's clock; now on
             * ours is no earlier than Redis's now was, so mapping Redis's
             * now to ours only delays slots. Tokens still held go right
             * before the new ones (later than their own slots: safe). */
            int64_t off = (int64_t)v[1] * 1000;
            uint64_t first = off >= 0 ? now + (uint64_t)off
                                      : now - ((uint64_t)-off < now ? (uint64_t)-off : now);
            k->held_T = q->T_ns;
            k->held_slot = first - (uint64_t)k->held * q->T_ns;
            k->held += (unsigned)v[0];
            k->msg_retry_at = 0;
            l->st.tokens_fetched += (uint64_t)v[0];
        } else {
            /* A refusal: the wait is what the other nodes booked beyond
             * the horizon, at most a burst and a batch of intervals. */
            long long T = (long long)(q->T_us < INT64_MAX / 16 ? q->T_us : INT64_MAX / 16);
            long long cap = horizon + tau + 2 * T;
            if (cap < (long long)(WAIT_MAX_NS / 1000) || cap > INT64_MAX / 4)
                cap = (long long)(WAIT_MAX_NS / 1000);
            if (v[1] > cap) {
                bad_reply(l, q, "retry_after_us", v[1], cap);
                v[1] = cap;
            }
            k->msg_retry_at = now + (uint64_t)(v[1] > 0 ? v[1] : 0) * 1000u;
        }
        key_wake(k);
        break;
    }
    case REQ_CONN:
        if (v[0] > 1) {
            bad_reply(l, q, "leases_granted", v[0], 1);
            v[0] = 1;
        }
        if (k == NULL) {
            if (v[0] > 0) {
                struct limit_key tmp;
                tmp.name = q->name;
                send_release(l, &tmp, q->lease);
            }
            break;
        }
        k->conn_req = NULL;
        /* the third element: 1 when every lease of the cap is held, 2
         * when the connection rate refused (absent from older scripts) */
        k->cap_full = v[0] == 0 && reply->elements >= 3 && reply->element[2] != NULL &&
                      reply->element[2]->type == REDIS_REPLY_INTEGER &&
                      reply->element[2]->integer == 1;
        if (v[0] > 0) {
            k->ready_lease = q->lease;
            k->ready_rated = q->rated;
            k->ready_at = now;
            k->conn_retry_at = 0;
        } else {
            /* Leases are polled for (their expiry may come early through a
             * release): the wait is capped by design, not clamped. */
            long long us = clamp_ll(v[1], 0, (long long)(CONN_POLL_MAX_NS / 1000));
            k->conn_retry_at = now + (uint64_t)us * 1000u;
        }
        key_wake(k);
        break;
    case REQ_WANTED:
        if (k != NULL && k->want != NULL) {
            k->want->req = NULL;
            k->want->wanted = v[0] > 0;
        }
        break;
    case REQ_REFRESH:
    case REQ_RELEASE:
        break;
    }
    free(q);
}

/* Ask Redis for the rest of k's batch. */
static int
msg_request(struct limits *l, struct limit_key *k, uint64_t now)
{
    uint64_t T = msg_interval(l, k, now);
    unsigned b = batch_size(l, T);
    struct limit_req *q = req_new(l, k, REQ_TAKE);
    if (q == NULL)
        return -ENOMEM;
    q->T_us = (T + 999) / 1000;
    q->tau_us = sat_mul(q->T_us, k->conf.msg_burst);
    q->want = b > k->held ? b - k->held : 1;
    q->T_ns = q->T_us * 1000;
    /* each expected node may keep about one batch booked ahead */
    q->horizon_us = sat_mul(sat_mul(q->T_us, b), l->nodes);
    int rc = req_submit(l, q);
    if (rc == 0)
        k->msg_req = q;
    return rc;
}

/* Ask Redis for a lease of k, with a connection-rate token when rated
 * (T = 0 tells the script to take none). */
static int
conn_request(struct limits *l, struct limit_key *k, uint64_t now, bool rated)
{
    uint64_t T = rated ? rate_interval(&k->conf.conn_rate) : 0;
    struct limit_req *q = req_new(l, k, REQ_CONN);
    if (q == NULL)
        return -ENOMEM;
    q->rated = rated;
    if (T != 0) {
        T = eff_interval(T, bo_factor(l, k, now), 1);
        q->T_us = (T + 999) / 1000;
        q->tau_us = sat_mul(q->T_us, k->conf.conn_burst);
    }
    q->max = k->conf.max_connections;
    q->lease = ++l->next_lease;
    int rc = req_submit(l, q);
    if (rc == 0)
        k->conn_req = q;
    return rc;
}

/* --- Redis state ------------------------------------------------------ */

static void
wake_all(struct limits *l)
{
    /* A waker may finish its key: take the next one first. */
    struct limit_key *k = l->keys;
    while (k != NULL) {
        struct limit_key *next = k->next;
        key_wake(k);
        k = next;
    }
}

static void
on_script_loaded(struct redis *r, const struct redisReply *reply, void *arg)
{
    (void)r;
    struct limits *l = arg;
    l->loading = false;
    if (reply == NULL)
        return; /* the connection is dying: the next one loads it again */
    if (reply->type != REDIS_REPLY_STRING || reply->len != 40 ||
        strspn(reply->str, "0123456789abcdef") != 40) {
        /* A Redis still loading its dataset after a restart answers
         * -LOADING (AUTH passes meanwhile), one running a long script
         * -BUSY: nothing else would load the script again on this
         * connection, and the limits would stay at the local share. */
        if (reply->type != REDIS_REPLY_ERROR)
            l->st.redis_bad_replies++;
        if (!l->load_logged) {
            l->load_logged = true;
            log_msg(LOG_ERR,
                    "event=redis_script_load_failed node=%s reply=\"%.*s\" "
                    "note=retried_every_second",
                    l->node,
                    reply->type == REDIS_REPLY_ERROR ? (int)(reply->len > 200 ? 200 : reply->len)
                                                     : 0,
                    reply->type == REDIS_REPLY_ERROR ? reply->str : "");
        }
        worker_timer_arm(l->w, &l->script_timer, clock_now_ns() + SCRIPT_RETRY_NS);
        return;
    }
    memcpy(l->sha, reply->str, 40);
    l->sha[40] = '\0';
    l->sha_ok = true;
    l->load_logged = false;
    if (l->shared)
        return;
    l->shared = true;
    l->down_logged = false;
    log_msg(LOG_NOTICE, "event=redis_up redis=%s node=%s limits=shared", redis_addr(l->r),
            l->node);
    /* Leases taken while Redis was away (or whose entries expired there)
     * join the shared set again. */
    for (struct limit_key *k = l->keys; k != NULL; k = k->next)
        send_refresh(l, k);
    wake_all(l);
}

static void
script_load(struct limits *l)
{
    if (l->loading)
        return;
    const char *argv[] = {"SCRIPT", "LOAD", script_text};
    size_t lens[] = {6, 4, sizeof(script_text) - 1};
    if (redis_command(l->r, on_script_loaded, l, 3, argv, lens) == 0)
        l->loading = true;
}

static void
limits_on_script_timer(struct timer *t, void *ctx)
{
    (void)ctx;
    struct limits *l = (struct limits *)((char *)t - offsetof(struct limits, script_timer));
    if (!l->sha_ok && redis_state(l->r) == REDIS_STATE_UP)
        script_load(l); /* no-op while a load is in flight */
}

static void
on_redis_state(struct redis *r, enum redis_state st, void *arg)
{
    struct limits *l = arg;
    if (st == REDIS_STATE_UP) {
        l->sha_ok = false;
        l->err_logged = false;
        script_load(l);
        return;
    }
    if (st != REDIS_STATE_DOWN)
        return;
    bool was_shared = l->shared;
    l->shared = false;
    l->sha_ok = false;
    l->loading = false;
    for (struct limit_key *k = l->keys; k != NULL; k = k->next)
        k->cap_full = false; /* Redis's word, of a time it was there */
    if (!l->down_logged) {
        l->down_logged = true;
        l->st.redis_downs++;
        log_msg(LOG_WARN, "event=redis_down redis=%s node=%s limits=local_share share=1/%u", 
                redis_addr(r), l->node, l->nodes);
    }
    if (was_shared)
        wake_all(l);
}

static void
limits_on_refresh(struct timer *t, void *ctx)
{
    (void)ctx;
    struct limits *l = (struct limits *)((char *)t - offsetof(struct limits, refresh_timer));
    uint64_t now = clock_now_ns();
    uint64_t period = l->ttl_ns / 3;
    for (struct limit_key *k = l->keys; k != NULL; k = k->next) {
        if (k->ready_lease != 0 && now - k->ready_at >= period) {
            /* Granted but nobody came for it: give the slot back. */
            send_release(l, k, k->ready_lease);
            k->ready_lease = 0;
            k->ready_rated = false;
        }
        send_refresh(l, k);
    }
    worker_timer_arm(l->w, &l->refresh_timer, now + period);
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
        uint64_t salt = clock_now_ns() ^ (uint64_t)(uintptr_t)l;
        snprintf(l->node, sizeof(l->node), "%s-%d-w%u-%08llx", host, (int)getpid(),
                 w->id, (unsigned long long)(salt & 0xffffffffu));
    }
    timer_init(&l->refresh_timer, limits_on_refresh);
    timer_init(&l->script_timer, limits_on_script_timer);
    if (o->redis_url != NULL) {
        struct redis_opts ro = {
            .url = o->redis_url,
            .password = o->redis_password,
            .cmd_timeout_ms = o->redis_timeout_ms,
            .reconnect_min_ms = o->reconnect_min_ms,
            .reconnect_max_ms = o->reconnect_max_ms,
        };
        int rc = redis_new(w, &ro, on_redis_state, l, &l->r, err, errlen);
        if (rc < 0) {
            free(l);
            return rc;
        }
        worker_timer_arm(w, &l->refresh_timer, clock_now_ns() + l->ttl_ns / 3);
    }
    *out = l;
    return 0;
}

struct limits *
limits_free(struct limits *l)
{
    if (l == NULL)
        return NULL;
    worker_timer_cancel(l->w, &l->refresh_timer);
    worker_timer_cancel(l->w, &l->script_timer);
    l->r = redis_free(l->r); /* runs no callback */
    while (l->reqs != NULL) {
        struct limit_req *q = l->reqs;
        req_unlink(l, q);
        free(q);
    }
    while (l->keys != NULL) {
        struct limit_key *k = l->keys;
        l->keys = k->next;
        k->prev = k->next = NULL;
        k->msg_req = k->conn_req = NULL;
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
    (void)l;
    k->conf = *c;
}

void
limits_key_fini(struct limits *l, struct limit_key *k)
{
    (void)l;
    struct limits *owner = k->l;
    if (owner != NULL) {
        for (unsigned i = 0; i < k->nleases; i++)
            send_release(owner, k, k->leases[i]);
        if (k->ready_lease != 0)
            send_release(owner, k, k->ready_lease);
        owner->leases -= k->nleases;
        if (k->msg_req != NULL)
            k->msg_req->k = NULL;
        if (k->conn_req != NULL)
            k->conn_req->k = NULL;
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
    k->msg_req = k->conn_req = NULL;
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
    *retry_at_ns = now_ns;
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
            asking = msg_request(l, k, now_ns) == 0;
        if (g > 0) {
            l->st.batch_decisions++;
            l->st.msgs_granted += g;
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
    uint64_t tau = sat_mul(T, k->conf.msg_burst / share);
    unsigned g = gcra_take(&k->msg_tat, T, tau, now_ns, n, retry_at_ns);
    l->st.local_decisions++;
    l->st.msgs_granted += g;
    return g;
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

/* k's max_connections for this node at share (at least one); 0: none. */
static unsigned
lease_cap(const struct limit_key *k, unsigned share)
{
    unsigned max = k->conf.max_connections;
    if (max == 0)
        return 0;
    max /= share;
    return max ? max : 1;
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
    if (k->ready_lease != 0 && rated && !k->ready_rated) {
        /* Granted for a move (limits_lease_acquire), without the token a
         * new connection takes: given back, and one with it asked for. */
        send_release(l, k, k->ready_lease);
        k->ready_lease = 0;
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
    unsigned max = lease_cap(k, share);
    if (max != 0 && k->nleases >= max) {
        k->want_wake = true;
        *retry_at_ns = UINT64_MAX;
        l->st.conns_refused++;
        return false;
    }
    if (shared) {
        bool asking = k->conn_req != NULL;
        if (!asking && now_ns >= k->conn_retry_at)
            asking = conn_request(l, k, now_ns, rated) == 0;
        if (asking || now_ns < k->conn_retry_at) {
            k->want_wake = true;
            *retry_at_ns = asking ? now_ns + l->timeout_ns : k->conn_retry_at;
            l->st.conns_refused++;
            return false;
        }
        /* Redis would not take the request: decide locally this time,
         * the cap included (above it was checked with the shared one). */
        share = local_share(l, k);
        max = lease_cap(k, share);
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
        uint64_t tau = sat_mul(T, k->conf.conn_burst / share);
        uint64_t tat = k->conn_tat;
        if (gcra_take(&tat, T, tau, now_ns, 1, retry_at_ns) == 0) {
            l->st.conns_refused++;
            return false;
        }
        if (!lease_push(l, k, ++l->next_lease)) {
            l->st.conns_refused++;
            return false;
        }
        k->undo_tat = k->conn_tat;
        k->undo = LIMIT_UNDO_TAT;
        k->conn_tat = tat; /* both or neither */
        return true;
    }
    if (!lease_push(l, k, ++l->next_lease)) {
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
    l->leases--;
    l->st.conns_granted--;
    if (k->undo == LIMIT_UNDO_READY && k->ready_lease == 0) {
        /* Redis's grant, its token taken there: kept for the next. */
        k->ready_lease = id;
        k->ready_at = now_ns;
    } else {
        send_release(l, k, id);
        if (k->undo == LIMIT_UNDO_TAT)
            k->conn_tat = k->undo_tat;
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
    l->leases--;
    send_release(l, k, id);
    /* Shared: the next acquire asks Redis at once, not at the end of a
     * refusal's poll wait (up to CONN_POLL_MAX_NS): the release goes
     * ahead of it on the one connection, so a domain of this worker
     * waiting for the cap gets the lease this connection held. */
    k->conn_retry_at = 0;
}

bool
limits_key_full(const struct limit_key *k)
{
    return k->l != NULL && k->l->shared && k->cap_full;
}

bool
limits_key_wanted(struct limits *l, struct limit_key *k, struct limit_want *w, uint64_t now_ns)
{
    if (!l->shared || k->conf.max_connections == 0 || now_ns < k->local_until)
        return false;
    k->want = w;
    uint64_t poll = MS_TO_NS(LIMIT_WANT_POLL_MS);
    if (w->at != 0 && now_ns - w->at >= 2 * poll && w->req == NULL)
        w->wanted = false; /* not asked for a while: what it said is stale */
    if (w->req == NULL && (w->at == 0 || now_ns - w->at >= poll)) {
        struct limit_req *q = req_new(l, k, REQ_WANTED);
        if (q != NULL && req_submit(l, q) == 0) {
            w->req = q;
            w->at = now_ns;
        }
    }
    return w->wanted;
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
