/*
 * limits_redis: the shared half of the limiter of limits.h (limits.c
 * holds the local decisions and the API).
 *
 * Shared decisions run the local arithmetic in Redis (the script below, in
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
 * Leases are asked for one at a time (limits_redis_lease) and kept alive by
 * a refresh every ttl/3 (limits_on_refresh); a refusal because every lease
 * is held marks the key wanted, and limits_key_wanted() asks whether a
 * limiter elsewhere waits. Redis's state (up: load the script, then
 * shared; down: local share) comes through on_redis_state.
 *
 * Threading: the owning worker's thread only.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/limits_internal.h"
#include "engine/redis.h"

#define CONN_POLL_MAX_NS MS_TO_NS(100) /* leases all taken: ask again within */
/* How long a refusal for a full cap marks the key wanted ("...:w", the
 * refused limiter's node id): longer than a waiter's poll, so that the
 * mark stands while one waits (limits_key_wanted). */
#define WANT_TTL_MS "1500"
#define WAIT_MAX_NS MS_TO_NS(60000)     /* a refusal's wait: at least this cap */
#define BAD_REPLY_LOCAL_NS MS_TO_NS(1000) /* a key decides locally after a bad reply */
#define SCRIPT_RETRY_NS MS_TO_NS(1000)    /* SCRIPT LOAD refused: ask again after */

/*
 * A refresh of leases over the cap (after an outage, whose local shares
 * add up to more, or a cap lowered by a reload) answers how many of the
 * caller's members are beyond it in the set's order by name: the same
 * order for every caller, so the holders end as many as are over in all,
 * not each of them the whole excess.
 *
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
    "  local ttl, max = tonumber(ARGV[2]), tonumber(ARGV[3])\n"
    "  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', fmt(now))\n"
    "  for i = 4, #ARGV do redis.call('ZADD', KEYS[3], fmt(now + ttl), ARGV[i]) end\n"
    "  redis.call('PEXPIRE', KEYS[3], fmt(math.ceil(ttl / 1000) + 1000))\n"
    "  local beyond = 0\n"
    "  if max > 0 and redis.call('ZCARD', KEYS[3]) > max then\n"
    "    local all = redis.call('ZRANGE', KEYS[3], 0, -1)\n"
    "    table.sort(all)\n"
    "    local late = {}\n"
    "    for i = max + 1, #all do late[all[i]] = true end\n"
    "    for i = 4, #ARGV do if late[ARGV[i]] then beyond = beyond + 1 end end\n"
    "  end\n"
    "  return {#ARGV - 3, beyond}\n"
    "elseif op == 'release' then\n"
    "  return redis.call('ZREM', KEYS[3], ARGV[2])\n"
    "elseif op == 'wanted' then\n"
    "  local v = redis.call('GET', KEYS[4])\n"
    "  if v and v ~= ARGV[2] then redis.call('DEL', KEYS[4]) return {1, 0} end\n"
    "  return {0, 0}\n"
    "end\n"
    "return redis.error_reply('ERR sluice limits: unknown op')\n";

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
        fmt_u64(num[1], sizeof(num[1]), k->conf.max_connections);
        ARGS(num[1]);
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

void
limits_redis_release(struct limits *l, struct limit_key *k, uint64_t lease)
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

/* The answer says how many leases of k the nodes hold together (one
 * refresh of a key in flight at a time: a later one would carry the
 * same members, and k links to one). */
static void
send_refresh(struct limits *l, struct limit_key *k)
{
    if (!l->shared || (k->nleases == 0 && k->ready_lease == 0) || k->refresh_req != NULL)
        return;
    struct limit_req *q = req_new(l, k, REQ_REFRESH);
    if (q == NULL)
        return;
    if (req_send(l, q) < 0) {
        free(q);
        return;
    }
    k->refresh_req = q;
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
    uint64_t now = clock_mono_ns();
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
            else if (q->kind == REQ_REFRESH)
                k->refresh_req = NULL;
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
                limits_redis_release(l, &tmp, q->lease);
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
        if (k == NULL)
            break;
        k->refresh_req = NULL;
        /* This limiter's leases beyond the cap in Redis's count: taken
         * on local shares while Redis was away (or under a cap a reload
         * lowered since). Nothing else ends them: a connection carries
         * mail for as long as it flows, and Redis refuses new leases
         * only. */
        if (reply_ints(reply, 2, v) && v[1] >= 0) {
            long long over = v[1] > (long long)k->nleases ? (long long)k->nleases : v[1];
            k->excess = (uint16_t)(over > UINT16_MAX ? UINT16_MAX : over);
        }
        break;
    case REQ_RELEASE:
        break;
    }
    free(q);
}

/* Ask Redis for the rest of k's batch. */
int
limits_redis_take(struct limits *l, struct limit_key *k, uint64_t now)
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
int
limits_redis_lease(struct limits *l, struct limit_key *k, uint64_t now, bool rated)
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
        worker_timer_arm(l->w, &l->script_timer, clock_mono_ns() + SCRIPT_RETRY_NS);
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
    for (struct limit_key *k = l->keys; k != NULL; k = k->next) {
        k->cap_full = false; /* Redis's word, of a time it was there */
        k->excess = 0;
    }
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
    uint64_t now = clock_mono_ns();
    uint64_t period = l->ttl_ns / 3;
    for (struct limit_key *k = l->keys; k != NULL; k = k->next) {
        if (k->ready_lease != 0 && now - k->ready_at >= period) {
            /* Granted but nobody came for it: give the slot back. */
            limits_redis_release(l, k, k->ready_lease);
            k->ready_lease = 0;
            k->ready_rated = false;
        }
        send_refresh(l, k);
    }
    worker_timer_arm(l->w, &l->refresh_timer, now + period);
}

/* --- opening and closing ---------------------------------------------- */

int
limits_redis_start(struct limits *l, const struct limits_opts *o, char *err, size_t errlen)
{
    timer_init(&l->refresh_timer, limits_on_refresh);
    timer_init(&l->script_timer, limits_on_script_timer);
    struct redis_opts ro = {
        .url = o->redis_url,
        .password = o->redis_password,
        .cmd_timeout_ms = o->redis_timeout_ms,
        .reconnect_min_ms = o->reconnect_min_ms,
        .reconnect_max_ms = o->reconnect_max_ms,
    };
    int rc = redis_new(l->w, &ro, on_redis_state, l, &l->r, err, errlen);
    if (rc < 0)
        return rc;
    worker_timer_arm(l->w, &l->refresh_timer, clock_mono_ns() + l->ttl_ns / 3);
    return 0;
}

void
limits_redis_stop(struct limits *l)
{
    worker_timer_cancel(l->w, &l->refresh_timer);
    worker_timer_cancel(l->w, &l->script_timer);
    l->r = redis_free(l->r); /* runs no callback */
    while (l->reqs != NULL) {
        struct limit_req *q = l->reqs;
        req_unlink(l, q);
        free(q);
    }
}

/* --- a holder asks whether it is wanted -------------------------------- */

bool
limits_key_wanted(struct limits *l, struct limit_key *k, struct limit_want *w, uint64_t now_ns)
{
    if (l->r == NULL)
        return limits_node_wanted(l, k, now_ns);
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
