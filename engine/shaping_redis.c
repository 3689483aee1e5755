/*
 * shaping_redis: the shaping actions shared through Redis (see shaping.c
 * for why a hash and a stream), on the keeper's own blocking connection
 * (hiredis sync API): the connect with backoff and the catch-up from the
 * hash (what this node changed while Redis was away merged in, what
 * ended elsewhere taken out), the changes this node made published to
 * the hash and the stream (shaping_redis_pass), and the stream read for
 * the other nodes' changes. The table, its state file and the keeper's
 * loop are shaping.c's (shaping_int.h: what the two share).
 *
 * Threading: the keeper thread only; the table under s->lock.
 */
#include "engine/shaping.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/redis.h"
#include "engine/shaping_int.h"

/* ---- Redis (the keeper) ---- */

static void
redis_drop(struct shaping *s, const char *why_in)
{
    char why[128]; /* why_in may be the context's errstr, freed below */
    snprintf(why, sizeof(why), "%s", why_in);
    if (s->rc != NULL)
        redisFree(s->rc);
    s->rc = NULL;
    s->backoff = s->backoff ? s->backoff * 2 : KEEPER_TICK_MS;
    if (s->backoff > REDIS_BACKOFF_MAX)
        s->backoff = REDIS_BACKOFF_MAX;
    s->next_try = clock_mono_ms() + s->backoff;
    pthread_mutex_lock(&s->lock);
    bool was = s->redis_up;
    s->redis_up = false;
    pthread_mutex_unlock(&s->lock);
    if (was)
        log_msg(LOG_WARN, "event=shaping_redis_down redis=%s error=\"%s\" note=local_only",
                s->ep.addr, why);
}

static redisReply *
cmd(struct shaping *s, int argc, const char **argv)
{
    redisReply *r = redisCommandArgv(s->rc, argc, argv, NULL);
    if (r == NULL) {
        redis_drop(s, s->rc->errstr[0] ? s->rc->errstr : "no reply");
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        log_msg(LOG_WARN, "event=shaping_redis_error error=\"%s\"", r->str);
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

static void
key(struct shaping *s, char *out, size_t cap, const char *what)
{
    snprintf(out, cap, "%sshaping:%s", s->prefix, what);
}

/* HDEL the action id of the hash KEYS[1] only if the line there has ended
 * by ARGV[2] (Unix ms): not one another node extended meanwhile. The
 * trigger, the only free text, is the last field and holds no tab. */
static const char drop_stale_lua[] =
    "local v = redis.call('HGET', KEYS[1], ARGV[1]) "
    "if not v then return 0 end "
    "local u = tonumber(string.match(v, '\\tuntil=(%d+)')) "
    "if u and u <= tonumber(ARGV[2]) then return redis.call('HDEL', KEYS[1], ARGV[1]) end "
    "return 0";

/* Take action id out of the hash if it ended there by now. Returns 0, or
 * -EIO when the connection is gone. */
static int
redis_drop_stale(struct shaping *s, const char *hk, const char *id, uint64_t now)
{
    char num[24];
    snprintf(num, sizeof(num), "%llu", (unsigned long long)now);
    const char *argv[] = {"EVAL", drop_stale_lua, "1", hk, id, num};
    redisReply *r = cmd(s, 6, argv);
    if (r == NULL)
        return s->rc == NULL ? -EIO : 0;
    freeReplyObject(r);
    return 0;
}

/* Apply one action line from Redis. */
static void
apply_remote(struct shaping *s, const char *line, bool clear, const char *via)
{
    struct shaping_action a;
    int prc = shaping_action_parse(line, &a);
    if (prc == -ENOTSUP && !clear) {
        pthread_mutex_lock(&s->lock);
        shaping_note_unknown(s, line);
        pthread_mutex_unlock(&s->lock);
    }
    if (prc < 0)
        return;
    pthread_mutex_lock(&s->lock);
    s->st.received++;
    if (clear) {
        for (size_t i = 0; i < s->nact; i++)
            if (strcmp(s->act[i].id, a.id) == 0) {
                shaping_remove_at(s, i, "cleared_elsewhere");
                break;
            }
    } else if (a.until_ms > clock_unix_ms()) {
        struct shaping_action *old = shaping_find(s, a.id);
        if (old != NULL && strcmp(a.rule, "operator") == 0) {
            if (old->until_ms != a.until_ms || old->value != a.value ||
                old->per_ms != a.per_ms) { /* an operator sets the end and the value */
                old->until_ms = a.until_ms;
                old->value = a.value;
                old->per_ms = a.per_ms;
                s->dirty = true;
            }
        } else if (shaping_upsert(s, &a) == 1) {
            shaping_log_started(s, &a, via);
        }
    }
    pthread_mutex_unlock(&s->lock);
}

static int
redis_publish(struct shaping *s, const struct shaping_action *a, bool clear)
{
    char line[LINE_MAX_LEN], hk[128], sk[128], maxlen[16];
    if (shaping_action_format(a, line, sizeof(line)) < 0)
        return 0;
    key(s, hk, sizeof(hk), "active");
    key(s, sk, sizeof(sk), "log");
    snprintf(maxlen, sizeof(maxlen), "%u", s->stream_max);
    redisReply *r;
    if (clear) {
        const char *argv[] = {"HDEL", hk, a->id};
        r = cmd(s, 3, argv);
    } else {
        const char *argv[] = {"HSET", hk, a->id, line};
        r = cmd(s, 4, argv);
    }
    if (r == NULL)
        return s->rc == NULL ? -EIO : 0;
    freeReplyObject(r);
    const char *xa[] = {"XADD", sk, "MAXLEN", "~", maxlen, "*", "op", clear ? "clear" : "add",
                        "node", s->instance, "a", line};
    r = cmd(s, 12, xa);
    if (r == NULL)
        return s->rc == NULL ? -EIO : 0;
    freeReplyObject(r);
    pthread_mutex_lock(&s->lock);
    s->st.published++;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

/* Connected: the stream's last id first (what follows is read after),
 * then the hash (what is active), then ours that the hash lacks or holds
 * shorter (made while Redis was away, or lost with it). */
static int
redis_catch_up(struct shaping *s)
{
    char hk[128], sk[128];
    key(s, hk, sizeof(hk), "active");
    key(s, sk, sizeof(sk), "log");
    /* What waited in the outbox: clears go out first, so that the hash
     * read below does not bring back what this node cleared while Redis
     * was away; adds are in the table (published below when the hash
     * lacks them). */
    pthread_mutex_lock(&s->lock);
    struct outbox_item *o = shaping_outbox_take(s);
    pthread_mutex_unlock(&s->lock);
    int crc = 0;
    for (; o != NULL;) {
        struct outbox_item *nx = o->next;
        if ((o->clear || o->clear_first) && crc == 0)
            crc = redis_publish(s, &o->a, true);
        free(o);
        o = nx;
    }
    if (crc < 0)
        return crc;
    const char *xr[] = {"XREVRANGE", sk, "+", "-", "COUNT", "1"};
    redisReply *r = cmd(s, 6, xr);
    if (r == NULL)
        return -EIO;
    snprintf(s->last_id, sizeof(s->last_id), "0-0");
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 &&
        r->element[0]->type == REDIS_REPLY_ARRAY && r->element[0]->elements == 2 &&
        r->element[0]->element[0]->type == REDIS_REPLY_STRING)
        snprintf(s->last_id, sizeof(s->last_id), "%s", r->element[0]->element[0]->str);
    freeReplyObject(r);
    const char *hg[] = {"HGETALL", hk};
    if ((r = cmd(s, 2, hg)) == NULL)
        return -EIO;
    uint64_t now = clock_unix_ms();
    /* what the hash holds: (id, end), to compare ours with, and to take
     * out what ended */
    struct seen {
        char id[17];
        uint64_t until;
    } *seen = NULL;
    size_t nseen = 0;
    if (r->type == REDIS_REPLY_ARRAY && r->elements > 0)
        seen = calloc(r->elements / 2 + 1, sizeof(*seen));
    if (r->type == REDIS_REPLY_ARRAY)
        for (size_t i = 0; i + 1 < r->elements; i += 2) {
            const redisReply *v = r->element[i + 1];
            if (v->type != REDIS_REPLY_STRING)
                continue;
            struct shaping_action a;
            int prc = shaping_action_parse(v->str, &a);
            if (prc == -ENOTSUP) {
                pthread_mutex_lock(&s->lock);
                shaping_note_unknown(s, v->str);
                pthread_mutex_unlock(&s->lock);
            }
            if (prc < 0)
                continue;
            if (seen != NULL) {
                memcpy(seen[nseen].id, a.id, sizeof(a.id));
                seen[nseen++].until = a.until_ms;
            }
            if (a.until_ms > now)
                apply_remote(s, v->str, false, "redis_catch_up");
        }
    freeReplyObject(r);
    for (size_t i = 0; i < nseen; i++)
        if (seen[i].until <= now && redis_drop_stale(s, hk, seen[i].id, now) < 0) {
            free(seen);
            return -EIO;
        }
    pthread_mutex_lock(&s->lock);
    size_t n = s->nact;
    struct shaping_action *v = malloc((n ? n : 1) * sizeof(*v));
    if (v != NULL && n > 0)
        memcpy(v, s->act, n * sizeof(*v));
    pthread_mutex_unlock(&s->lock);
    int rc = 0;
    /* ours that the hash lacks or holds shorter (started, or lost with
     * Redis, while it was away): published as new, so that the nodes
     * already connected read them from the stream */
    for (size_t i = 0; rc == 0 && v != NULL && i < n; i++) {
        bool known = false;
        for (size_t k = 0; k < nseen && !known; k++)
            known = strcmp(seen[k].id, v[i].id) == 0 && seen[k].until >= v[i].until_ms;
        if (!known)
            rc = redis_publish(s, &v[i], false);
    }
    free(seen);
    free(v);
    return rc;
}

static int
redis_connect(struct shaping *s)
{
    if (s->rc != NULL)
        return 0;
    if (clock_mono_ms() < s->next_try)
        return -EAGAIN;
    struct timeval tv = {(time_t)(s->timeout_ms / 1000), (suseconds_t)(s->timeout_ms % 1000) * 1000};
    s->rc = redisConnectWithTimeout(s->ep.ip, s->ep.port, tv);
    if (s->rc == NULL || s->rc->err) {
        if (s->rc == NULL) {
            s->next_try = clock_mono_ms() + REDIS_BACKOFF_MAX;
            return -ENOMEM;
        }
        redis_drop(s, s->rc->errstr);
        return -ECONNREFUSED;
    }
    redisSetTimeout(s->rc, tv);
    if (s->ep.password != NULL) {
        const char *a1[] = {"AUTH", s->ep.password};
        const char *a2[] = {"AUTH", s->ep.user ? s->ep.user : "", s->ep.password};
        redisReply *r = s->ep.user ? cmd(s, 3, a2) : cmd(s, 2, a1);
        if (r == NULL) {
            if (s->rc != NULL)
                redis_drop(s, "AUTH refused");
            return -EACCES;
        }
        freeReplyObject(r);
    }
    if (redis_catch_up(s) < 0) {
        if (s->rc != NULL)
            redis_drop(s, "catch-up failed");
        return -EIO;
    }
    s->backoff = 0;
    pthread_mutex_lock(&s->lock);
    s->redis_up = true;
    pthread_mutex_unlock(&s->lock);
    log_msg(LOG_NOTICE, "event=shaping_redis_up redis=%s stream_from=%s", s->ep.addr, s->last_id);
    return 0;
}

/* Read what others published since last_id (no BLOCK: the keeper waits
 * on its condition variable instead, so that a change of this node is
 * published at once rather than after a blocked read ends, which Redis
 * times out only at its hz, 100 ms by default). */
static void
redis_read(struct shaping *s)
{
    char sk[128];
    key(s, sk, sizeof(sk), "log");
    const char *argv[] = {"XREAD", "COUNT", "256", "STREAMS", sk, s->last_id};
    redisReply *r = cmd(s, 6, argv);
    if (r == NULL)
        return;
    if (r->type == REDIS_REPLY_ARRAY && r->elements >= 1 &&
        r->element[0]->type == REDIS_REPLY_ARRAY && r->element[0]->elements == 2) {
        const redisReply *ents = r->element[0]->element[1];
        for (size_t i = 0; ents->type == REDIS_REPLY_ARRAY && i < ents->elements; i++) {
            const redisReply *e = ents->element[i];
            if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
                e->element[0]->type != REDIS_REPLY_STRING)
                continue;
            snprintf(s->last_id, sizeof(s->last_id), "%s", e->element[0]->str);
            const redisReply *f = e->element[1];
            const char *op = NULL, *node = NULL, *line = NULL;
            for (size_t k = 0; f->type == REDIS_REPLY_ARRAY && k + 1 < f->elements; k += 2) {
                if (f->element[k]->type != REDIS_REPLY_STRING ||
                    f->element[k + 1]->type != REDIS_REPLY_STRING)
                    continue;
                const char *fk = f->element[k]->str, *fv = f->element[k + 1]->str;
                if (strcmp(fk, "op") == 0)
                    op = fv;
                else if (strcmp(fk, "node") == 0)
                    node = fv;
                else if (strcmp(fk, "a") == 0)
                    line = fv;
            }
            if (op == NULL || line == NULL || (node != NULL && strcmp(node, s->instance) == 0))
                continue;
            apply_remote(s, line, strcmp(op, "clear") == 0, "redis");
        }
    }
    freeReplyObject(r);
}

void
shaping_redis_pass(struct shaping *s)
{
    if (redis_connect(s) < 0)
        return;
    pthread_mutex_lock(&s->lock);
    struct outbox_item *o = shaping_outbox_take(s);
    pthread_mutex_unlock(&s->lock);
    bool failed = false;
    while (o != NULL) {
        struct outbox_item *nx = o->next;
        if (!failed && o->clear_first && redis_publish(s, &o->a, true) < 0)
            failed = true;
        if (!failed && redis_publish(s, &o->a, o->clear) < 0)
            failed = true; /* the reconnect's catch-up rewrites the hash; clears are lost
                            * to the stream but not to the hash */
        free(o);
        o = nx;
    }
    /* what ended here leaves the hash if it ended there too (not what
     * another node extended meanwhile: redis_drop_stale compares) */
    pthread_mutex_lock(&s->lock);
    size_t ng = s->ngone;
    char(*gone)[17] = ng > 0 ? malloc(ng * sizeof(*gone)) : NULL;
    if (gone != NULL)
        memcpy(gone, s->gone, ng * sizeof(*gone));
    s->ngone = 0; /* without memory: the catch-up at the next connect takes them out */
    pthread_mutex_unlock(&s->lock);
    uint64_t now = clock_unix_ms();
    char hk[128];
    key(s, hk, sizeof(hk), "active");
    for (size_t i = 0; gone != NULL && i < ng && s->rc != NULL; i++)
        redis_drop_stale(s, hk, gone[i], now);
    free(gone);
    if (s->rc != NULL)
        redis_read(s);
}
