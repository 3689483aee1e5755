/*
 * warmup: the day's counts of each source on a warm-up plan (warmup.h),
 * under one mutex; the keeper thread that writes them to the state file
 * and shares them through Redis (a blocking hiredis context with a
 * timeout, on the keeper's own thread: no worker ever waits on it).
 *
 * Why not limits.c or redis.c: limits.c shares rates (a GCRA: a sliding
 * budget per second or hour), not a count per calendar day that must
 * survive restarts; redis.c is an async connection on a worker's ring,
 * and warmup_take() runs on any thread with no ring of its own, nor
 * should a day's count depend on which worker took it. The URL is taken
 * apart by redis.c's redis_url_parse(), and the fallback while Redis is
 * unreachable is limits.c's: a local share, allowance / [redis] nodes.
 */
#include "engine/warmup.h"

#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/fs.h"
#include "common/hash.h"
#include "common/log.h"
#include "engine/config.h"
#include "engine/redis.h"
#include "engine/warmup_conf.h"

#define KEEPER_INTERVAL_MS 1000
#define REDIS_TIMEOUT_MS   1000
#define REDIS_BACKOFF_MAX_MS 30000
#define REDIS_KEY_TTL_S    (3 * 86400)
#define STATE_MAGIC        "sluice-warmup 1"
#define STATE_FILE         "warmup.state" /* in the spool directory */

struct wcount {
    int64_t day;       /* the plan's day these counts are of */
    uint64_t mine;     /* taken by this node that day */
    /* Redis only */
    uint64_t reported; /* part of mine added to the day's "used" key */
    uint64_t others;   /* the other nodes' use, as last seen */
    uint64_t reserved; /* tokens of the day's budget granted to this node */
    uint64_t seen;     /* the cluster's reservations, as last seen */
    bool asked;        /* asked for since the last pass: reserve for it */
};

struct wsrc {
    struct hash_node node;
    char addr[46];
    const struct warmup_plan_conf *plan; /* borrowed: lives as long as the config (the
                                          * engine keeps the one warmup_reload last took) */
    int64_t start_day;
    struct wcount counts[WARMUP_GROUPS_MAX]; /* per group of plan, same order */
};

struct warmup {
    pthread_mutex_t lock;
    struct hash by_addr;       /* of struct wsrc, by addr */
    struct wsrc **srcs;        /* owned array of owned, config order */
    unsigned nsrcs;
    int64_t shift_ms;          /* tests: warmup_clock_shift() */
    bool dirty;                /* counts changed since the last save */
    char path[PATH_MAX];       /* the state file, dir/STATE_FILE; "" none */
    char dir[PATH_MAX];        /* the spool directory that holds it */
    /* Redis (keeper thread only, but for the flags read by stats) */
    bool redis_on;
    struct redis_endpoint ep;
    char prefix[128];
    unsigned nodes;
    redisContext *rc;          /* owned: keeper's */
    bool redis_up;
    bool redis_failed;         /* the last attempt failed: local shares (not while the
                                * first connect is under way) */
    uint64_t redis_next_try;   /* mono ms */
    uint64_t redis_backoff;    /* ms */
    /* the keeper */
    pthread_mutex_t pass_lock; /* one pass at a time (keeper, warmup_flush) */
    pthread_cond_t cv;
    pthread_t thread;
    bool thread_on, stop;
    struct warmup_stats st;
};

static bool
src_eq(const struct hash_node *n, const void *key)
{
    return strcmp(((const struct wsrc *)n)->addr, key) == 0;
}

static struct wsrc *
src_find(struct warmup *w, const char *addr)
{
    if (addr == NULL)
        return NULL;
    return (struct wsrc *)hash_find(&w->by_addr, hash_bytes(addr, strlen(addr)), addr);
}

/* What this node's count may reach: the allowance; with Redis what it
 * reserved, or while Redis is unreachable at least its local share. */
static uint64_t
limit_of(const struct warmup *w, const struct wcount *c, uint64_t allowance)
{
    if (!w->redis_on || allowance == WARMUP_UNLIMITED)
        return allowance;
    uint64_t lim = c->reserved;
    if (!w->redis_up && w->redis_failed) {
        /* A share of the day, less what the others are known to hold of
         * it already, used or reserved (one node may have taken more than
         * its share while Redis was there). */
        uint64_t share = allowance / (w->nodes ? w->nodes : 1);
        uint64_t theirs = c->seen > c->reserved ? c->seen - c->reserved : 0;
        if (theirs < c->others)
            theirs = c->others;
        uint64_t room = allowance > theirs ? allowance - theirs : 0;
        if (share > room)
            share = room;
        if (share > lim)
            lim = share;
    }
    return lim < allowance ? lim : allowance;
}

/* The count of s's group g at the plan's day `today`: a new day starts
 * from nothing. A clock that stepped back by up to a day (an NTP step
 * over midnight, a VM resumed, a node restarted with its clock behind
 * the one that wrote the state file) keeps the later day's count: c->day
 * stays the day counted at, and callers take the allowance and the next
 * day of c->day, not of today. Starting yesterday afresh would hand out
 * its allowance a second time, and today's once more when the clock
 * gets back to it. Further back, the clock was wrong, not the date: the
 * count starts afresh. Under lock. */
static struct wcount *
count_at(struct warmup *w, struct wsrc *s, unsigned g, int64_t today)
{
    struct wcount *c = &s->counts[g];
    if (c->day != INT64_MIN && today < c->day && c->day - today <= 1)
        return c;
    if (c->day != today) {
        if (c->mine > 0 || c->reserved > 0)
            w->dirty = true;
        memset(c, 0, sizeof(*c));
        c->day = today;
    }
    return c;
}

static uint64_t
now_of(const struct warmup *w, uint64_t now_ms)
{
    int64_t t = (int64_t)now_ms + w->shift_ms;
    return t < 0 ? 0 : (uint64_t)t;
}

/* What s may still take in group g (UINT64_MAX: no limit). ask: a
 * sender asks (with Redis, the next pass reserves for it when it is short);
 * a report does not. Under lock. */
static uint64_t
left_of(struct warmup *w, struct wsrc *s, unsigned g, uint64_t t, struct wcount **cp, bool ask)
{
    struct wcount *c = count_at(w, s, g, warmup_conf_today(s->plan, t));
    *cp = c;
    uint64_t allowance = warmup_conf_allowance(s->plan, g, c->day - s->start_day + 1);
    if (allowance == WARMUP_UNLIMITED)
        return UINT64_MAX;
    uint64_t limit = limit_of(w, c, allowance);
    if (c->mine >= limit) {
        c->asked |= ask;
        return 0;
    }
    if ((limit - c->mine) * 2 <= limit)
        c->asked |= ask; /* half spent: the next pass reserves more */
    return limit - c->mine;
}

uint64_t
warmup_left(struct warmup *w, const char *source, const char *mx_host, uint64_t now_ms)
{
    if (w == NULL)
        return UINT64_MAX;
    pthread_mutex_lock(&w->lock);
    uint64_t left = UINT64_MAX;
    struct wsrc *s = src_find(w, source);
    if (s != NULL) {
        struct wcount *c;
        left = left_of(w, s, warmup_conf_group(s->plan, mx_host), now_of(w, now_ms), &c, true);
    }
    pthread_mutex_unlock(&w->lock);
    return left;
}

bool
warmup_take(struct warmup *w, const char *source, const char *mx_host, uint64_t now_ms)
{
    if (w == NULL)
        return true;
    pthread_mutex_lock(&w->lock);
    bool ok = true;
    struct wsrc *s = src_find(w, source);
    if (s != NULL) {
        struct wcount *c;
        uint64_t left =
            left_of(w, s, warmup_conf_group(s->plan, mx_host), now_of(w, now_ms), &c, true);
        if (left == 0) {
            ok = false;
            w->st.refused++;
        } else if (left != UINT64_MAX) {
            c->mine++;
            w->dirty = true;
        }
    }
    pthread_mutex_unlock(&w->lock);
    return ok;
}

uint64_t
warmup_next_day_ms(struct warmup *w, const char *source, const char *mx_host, uint64_t now_ms)
{
    if (w == NULL)
        return 0;
    pthread_mutex_lock(&w->lock);
    uint64_t at = 0;
    struct wsrc *s = src_find(w, source);
    if (s != NULL) {
        uint64_t t = now_of(w, now_ms);
        unsigned g = warmup_conf_group(s->plan, mx_host);
        struct wcount *c;
        uint64_t left = left_of(w, s, g, t, &c, true);
        int64_t today = c->day; /* the count's: later than the clock's after a step back */
        uint64_t allowance = warmup_conf_allowance(s->plan, g, today - s->start_day + 1);
        if (left == 0 && w->redis_on && c->seen < allowance) {
            at = now_ms + KEEPER_INTERVAL_MS; /* the share grows at the next pass */
        } else {
            int64_t next = (int64_t)warmup_conf_day_start_ms(s->plan, today + 1) - w->shift_ms;
            at = next < 0 ? 0 : (uint64_t)next;
        }
    }
    pthread_mutex_unlock(&w->lock);
    return at;
}

void
warmup_clock_shift(struct warmup *w, int64_t delta_ms)
{
    pthread_mutex_lock(&w->lock);
    w->shift_ms += delta_ms;
    pthread_mutex_unlock(&w->lock);
}

/* ---- sources ---- */

static void
srcs_free(struct wsrc **v, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

/* The sources of cfg that carry a plan, counts empty. Returns 0 or -ENOMEM. */
static int
srcs_build(const struct config *cfg, struct wsrc ***out, unsigned *n)
{
    struct wsrc **v = NULL;
    unsigned cnt = 0;
    for (unsigned i = 0; i < cfg->nsources; i++) {
        const struct mx_policy *m = &cfg->sources[i];
        if (m->warmup_plan == NULL)
            continue;
        struct wsrc **nv = realloc(v, (cnt + 1) * sizeof(*nv));
        struct wsrc *s = calloc(1, sizeof(*s));
        if (nv == NULL || s == NULL) {
            free(s);
            srcs_free(nv != NULL ? nv : v, cnt);
            return -ENOMEM;
        }
        v = nv;
        snprintf(s->addr, sizeof(s->addr), "%s", m->pattern);
        s->plan = m->warmup_plan;
        s->start_day = m->warmup_start_day;
        for (unsigned g = 0; g < WARMUP_GROUPS_MAX; g++)
            s->counts[g].day = INT64_MIN;
        s->node.hash = hash_bytes(s->addr, strlen(s->addr));
        v[cnt++] = s;
    }
    *out = v;
    *n = cnt;
    return 0;
}

static int
srcs_index(struct hash *h, struct wsrc **v, unsigned n)
{
    hash_init(h, src_eq, 16);
    for (unsigned i = 0; i < n; i++)
        if (hash_insert(h, &v[i]->node) < 0) {
            hash_fini(h);
            hash_init(h, src_eq, 16);
            return -ENOMEM;
        }
    return 0;
}

static int
group_index(const struct warmup_plan_conf *pl, const char *name)
{
    for (unsigned g = 0; g < pl->ngroups; g++)
        if (strcasecmp(pl->groups[g].name, name) == 0)
            return (int)g;
    return -1;
}

/* ---- the state file ---- */

/* Lines "SOURCE GROUP DAY MINE REPORTED RESERVED" after the magic line
 * (state_save); REPORTED and RESERVED count only with Redis. */
static void
state_load(struct warmup *w)
{
    FILE *f = fopen(w->path, "r");
    if (f == NULL) {
        if (errno != ENOENT)
            log_msg(LOG_WARN, "event=warmup_state_unreadable path=%s error=\"%s\"", w->path,
                    strerror(errno));
        return;
    }
    char line[512];
    unsigned n = 0, bad = 0;
    if (fgets(line, sizeof(line), f) == NULL || strncmp(line, STATE_MAGIC, strlen(STATE_MAGIC)) != 0) {
        log_msg(LOG_WARN, "event=warmup_state_unreadable path=%s error=\"not a warm-up state file\"",
                w->path);
        fclose(f);
        return;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        char addr[64], group[WARMUP_NAME_MAX + 1];
        long long day;
        unsigned long long mine, reported, reserved;
        if (sscanf(line, "%63s %64s %lld %llu %llu %llu", addr, group, &day, &mine, &reported,
                   &reserved) != 6 ||
            reported > mine) {
            bad++;
            continue;
        }
        struct wsrc *s = src_find(w, addr);
        int g = s != NULL ? group_index(s->plan, group) : -1;
        if (g < 0)
            continue; /* no longer on a plan, or no such group */
        struct wcount *c = &s->counts[g];
        memset(c, 0, sizeof(*c));
        c->day = day;
        c->mine = mine;
        if (w->redis_on) {
            c->reported = reported;
            c->reserved = reserved;
            c->seen = reserved;
        }
        n++;
    }
    fclose(f);
    log_msg(LOG_NOTICE, "event=warmup_state_loaded path=%s counts=%u bad_lines=%u", w->path, n,
            bad);
}

struct snap {
    char addr[46];
    char group[WARMUP_NAME_MAX + 1];
    int64_t day;
    uint64_t mine, reported, reserved;
    uint64_t allowance;
    /* a Redis pass */
    uint64_t delta;     /* mine - reported: added to "used" */
    uint64_t want;      /* tokens asked of "reserved"; 0: none */
    uint64_t used;      /* the reply: every node's use */
    uint64_t grant;     /* of want */
    uint64_t seen;      /* the cluster's reservations after it */
    uint64_t floor;     /* what the cluster had reserved at least, as this node knows */
    bool res;           /* "reserved" is asked (want may be 0: read it) */
    int64_t adjust;     /* added to "reserved" after the reply: a give-back, or what a
                         * Redis that lost the key no longer holds */
    bool ok;
};

/* Today's counts of every source and group. Under lock. */
static struct snap *
snapshot(struct warmup *w, uint64_t t, size_t *n, bool for_redis)
{
    size_t cnt = 0;
    for (unsigned i = 0; i < w->nsrcs; i++)
        cnt += w->srcs[i]->plan->ngroups;
    struct snap *v = calloc(cnt ? cnt : 1, sizeof(*v));
    if (v == NULL)
        return NULL;
    size_t k = 0;
    for (unsigned i = 0; i < w->nsrcs; i++) {
        struct wsrc *s = w->srcs[i];
        int64_t today = warmup_conf_today(s->plan, t);
        for (unsigned g = 0; g < s->plan->ngroups; g++) {
            struct wcount *c = count_at(w, s, g, today);
            struct snap *e = &v[k++];
            snprintf(e->addr, sizeof(e->addr), "%s", s->addr);
            snprintf(e->group, sizeof(e->group), "%s", s->plan->groups[g].name);
            e->day = c->day; /* the Redis keys and the file are of the count's day */
            e->mine = c->mine;
            e->reported = c->reported;
            e->reserved = c->reserved;
            e->allowance = warmup_conf_allowance(s->plan, g, c->day - s->start_day + 1);
            if (for_redis) {
                e->delta = c->mine - c->reported;
                /* The cluster's reservations are at least what this node
                 * saw of them (and what it took beyond its own, on its
                 * local share while Redis was away) and what it knows was
                 * used: a Redis that restarted empty (or lost its last
                 * writes) holds less. */
                uint64_t beyond = c->mine > c->reserved ? c->mine - c->reserved : 0;
                e->floor = c->seen + beyond > c->others + c->mine ? c->seen + beyond
                                                                  : c->others + c->mine;
                /* Reserve for demand only (an idle node holds nothing): half
                 * of what the cluster seems to have left, shared by the
                 * nodes, at least one. */
                uint64_t spare = c->reserved > c->mine ? c->reserved - c->mine : 0;
                if (c->asked && e->allowance != WARMUP_UNLIMITED && c->seen < e->allowance) {
                    uint64_t want = (e->allowance - c->seen) / (w->nodes ? w->nodes : 1);
                    if (want == 0)
                        want = 1;
                    if (spare * 2 <= want)
                        e->want = want;
                }
                /* Read "reserved" too where the day has begun here: what
                 * the others hold bounds this node's local share while
                 * Redis is away, and a key Redis lost is put back. */
                e->res = e->allowance != WARMUP_UNLIMITED && (e->want > 0 || e->floor > 0);
                c->asked = false;
            }
        }
    }
    *n = k;
    return v;
}

static int
state_save(struct warmup *w)
{
    pthread_mutex_lock(&w->lock);
    if (!w->dirty) {
        pthread_mutex_unlock(&w->lock);
        return 0;
    }
    size_t n;
    struct snap *v = snapshot(w, now_of(w, clock_unix_ms()), &n, false);
    if (v != NULL)
        w->dirty = false;
    pthread_mutex_unlock(&w->lock);
    if (v == NULL)
        return -ENOMEM;
    char *text = NULL;
    size_t len = 0;
    int rc = 0;
    FILE *f = open_memstream(&text, &len);
    if (f == NULL) {
        rc = -errno;
    } else {
        fprintf(f, "%s\n", STATE_MAGIC);
        for (size_t i = 0; i < n; i++)
            if (v[i].mine > 0 || v[i].reserved > 0)
                fprintf(f, "%s %s %lld %llu %llu %llu\n", v[i].addr, v[i].group,
                        (long long)v[i].day, (unsigned long long)v[i].mine,
                        (unsigned long long)v[i].reported, (unsigned long long)v[i].reserved);
        if (fclose(f) != 0)
            rc = -ENOMEM;
        else
            rc = fs_write_atomic(w->dir, STATE_FILE, text, len);
        free(text);
    }
    free(v);
    pthread_mutex_lock(&w->lock);
    if (rc < 0) {
        w->dirty = true; /* next pass tries again */
        if (w->st.save_failures++ == 0)
            log_msg(LOG_ERR, "event=warmup_state_write_failed path=%s error=\"%s\"", w->path,
                    strerror(-rc));
    } else {
        w->st.saves++;
    }
    pthread_mutex_unlock(&w->lock);
    return rc;
}

/* ---- Redis ---- */

static void
redis_drop(struct warmup *w, const char *reason)
{
    char why[128]; /* reason may be the context's errstr, freed here */
    snprintf(why, sizeof(why), "%s", reason);
    if (w->rc != NULL)
        redisFree(w->rc);
    w->rc = NULL;
    uint64_t now = clock_mono_ms();
    w->redis_backoff = w->redis_backoff ? w->redis_backoff * 2 : KEEPER_INTERVAL_MS;
    if (w->redis_backoff > REDIS_BACKOFF_MAX_MS)
        w->redis_backoff = REDIS_BACKOFF_MAX_MS;
    w->redis_next_try = now + w->redis_backoff;
    pthread_mutex_lock(&w->lock);
    bool was_up = w->redis_up;
    w->redis_up = false;
    w->redis_failed = true;
    pthread_mutex_unlock(&w->lock);
    if (was_up)
        log_msg(LOG_WARN, "event=warmup_redis_down redis=%s error=\"%s\" note=local_share",
                w->ep.addr, why);
}

static int
redis_connect(struct warmup *w)
{
    if (w->rc != NULL)
        return 0;
    if (clock_mono_ms() < w->redis_next_try)
        return -EAGAIN;
    struct timeval tv = {REDIS_TIMEOUT_MS / 1000, (REDIS_TIMEOUT_MS % 1000) * 1000};
    w->rc = redisConnectWithTimeout(w->ep.ip, w->ep.port, tv);
    if (w->rc == NULL || w->rc->err) {
        redis_drop(w, w->rc != NULL ? w->rc->errstr : "out of memory");
        return -ECONNREFUSED;
    }
    redisSetTimeout(w->rc, tv);
    if (w->ep.password != NULL) {
        redisReply *r = w->ep.user != NULL
                            ? redisCommand(w->rc, "AUTH %s %s", w->ep.user, w->ep.password)
                            : redisCommand(w->rc, "AUTH %s", w->ep.password);
        bool ok = r != NULL && r->type == REDIS_REPLY_STATUS;
        if (r != NULL)
            freeReplyObject(r);
        if (!ok) {
            redis_drop(w, "AUTH refused");
            return -EACCES;
        }
    }
    return 0;
}

static int
append(struct warmup *w, int argc, const char **argv)
{
    return redisAppendCommandArgv(w->rc, argc, argv, NULL) == REDIS_OK ? 0 : -EIO;
}

/* One reply: its integer in *v (when it is one). -EIO when none came. */
static int
reply_int(struct warmup *w, long long *v, bool *is_int)
{
    redisReply *r = NULL;
    if (redisGetReply(w->rc, (void **)&r) != REDIS_OK || r == NULL)
        return -EIO;
    *is_int = r->type == REDIS_REPLY_INTEGER && r->integer >= 0;
    if (*is_int)
        *v = r->integer;
    freeReplyObject(r);
    return 0;
}

/* A pass: every counter's use since the last one is added to its day's
 * "used" key (the cluster's use, for reports), and a counter in demand
 * reserves tokens of the day's budget: INCRBY "reserved" by what it wants,
 * and whatever the reply shows past the allowance is given back (DECRBY)
 * and not granted. Redis runs each INCRBY atomically, so the grants of
 * every node together never pass the allowance. Two round trips (the
 * give-backs only when some were cut), pipelined. */
static int
redis_pass(struct warmup *w)
{
    if (redis_connect(w) < 0) {
        pthread_mutex_lock(&w->lock);
        w->st.sync_failures++;
        pthread_mutex_unlock(&w->lock);
        return -EAGAIN;
    }
    pthread_mutex_lock(&w->lock);
    size_t n;
    struct snap *v = snapshot(w, now_of(w, clock_unix_ms()), &n, true);
    pthread_mutex_unlock(&w->lock);
    if (v == NULL)
        return -ENOMEM;
    int rc = 0;
    char key[512], rkey[512], date[16], num[24], ttl[16];
    snprintf(ttl, sizeof(ttl), "%d", REDIS_KEY_TTL_S);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        warmup_conf_format_date(v[i].day, date, sizeof(date));
        snprintf(key, sizeof(key), "%swarmup:{%s}:%s:%s:used", w->prefix, v[i].addr, v[i].group,
                 date);
        snprintf(num, sizeof(num), "%llu", (unsigned long long)v[i].delta);
        const char *a1[] = {"INCRBY", key, num};
        const char *a2[] = {"EXPIRE", key, ttl};
        rc = append(w, 3, a1);
        if (rc == 0)
            rc = append(w, 3, a2);
        if (rc == 0 && v[i].res) {
            snprintf(rkey, sizeof(rkey), "%swarmup:{%s}:%s:%s:reserved", w->prefix, v[i].addr,
                     v[i].group, date);
            snprintf(num, sizeof(num), "%llu", (unsigned long long)v[i].want);
            const char *a3[] = {"INCRBY", rkey, num};
            const char *a4[] = {"EXPIRE", rkey, ttl};
            rc = append(w, 3, a3);
            if (rc == 0)
                rc = append(w, 3, a4);
        }
    }
    unsigned giveback = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        long long x = 0, ignored;
        bool used_ok = false, res_ok = false, dummy;
        rc = reply_int(w, &x, &used_ok);
        if (rc == 0 && used_ok)
            v[i].used = (uint64_t)x;
        if (rc == 0)
            rc = reply_int(w, &ignored, &dummy); /* EXPIRE */
        if (rc == 0 && v[i].res) {
            rc = reply_int(w, &x, &res_ok);
            if (rc == 0)
                rc = reply_int(w, &ignored, &dummy); /* EXPIRE */
            if (rc == 0 && res_ok) {
                /* The reservations before this one: what the key held, or
                 * more when it lost some (a Redis restarted empty), put
                 * back so that no node is granted them a second time. */
                uint64_t total = (uint64_t)x;
                uint64_t before = total > v[i].want ? total - v[i].want : 0;
                uint64_t lost = v[i].floor > before ? v[i].floor - before : 0;
                uint64_t base = before + lost;
                uint64_t room = v[i].allowance > base ? v[i].allowance - base : 0;
                v[i].grant = v[i].want < room ? v[i].want : room;
                v[i].seen = base + v[i].grant;
                v[i].adjust = (int64_t)lost - (int64_t)(v[i].want - v[i].grant);
                if (v[i].adjust != 0) {
                    warmup_conf_format_date(v[i].day, date, sizeof(date));
                    snprintf(rkey, sizeof(rkey), "%swarmup:{%s}:%s:%s:reserved", w->prefix,
                             v[i].addr, v[i].group, date);
                    snprintf(num, sizeof(num), "%lld", (long long)v[i].adjust);
                    const char *a5[] = {"INCRBY", rkey, num};
                    if (append(w, 3, a5) == 0)
                        giveback++;
                }
            }
        }
        v[i].ok = rc == 0 && used_ok && (!v[i].res || res_ok);
    }
    /* A give-back lost (Redis gone meanwhile) only wastes that much of
     * the day's budget: nothing was granted from it. */
    for (unsigned i = 0; rc == 0 && i < giveback; i++) {
        long long x;
        bool dummy;
        if (reply_int(w, &x, &dummy) < 0)
            rc = -EIO;
    }
    char why[128];
    snprintf(why, sizeof(why), "%s", rc < 0 && w->rc != NULL ? w->rc->errstr : "");
    pthread_mutex_lock(&w->lock);
    for (size_t i = 0; i < n; i++) {
        struct wsrc *s = src_find(w, v[i].addr);
        int g = s != NULL ? group_index(s->plan, v[i].group) : -1;
        if (g < 0 || !v[i].ok)
            continue;
        struct wcount *c = &s->counts[g];
        if (c->day != v[i].day)
            continue; /* a new day began meanwhile */
        c->reported += v[i].delta;
        /* Both only grow within a day: a "used" or "reserved" key that
         * reads lower was lost by Redis, not given back. */
        uint64_t others = v[i].used > c->reported ? v[i].used - c->reported : 0;
        if (others > c->others)
            c->others = others;
        if (v[i].res) {
            c->reserved += v[i].grant;
            if (v[i].seen > c->seen)
                c->seen = v[i].seen;
        }
        w->dirty = true;
    }
    if (rc < 0)
        w->st.sync_failures++;
    else
        w->st.syncs++;
    pthread_mutex_unlock(&w->lock);
    free(v);
    if (rc < 0) {
        redis_drop(w, why[0] ? why : "I/O error");
        return rc;
    }
    pthread_mutex_lock(&w->lock);
    bool was_up = w->redis_up;
    w->redis_up = true;
    w->redis_failed = false;
    pthread_mutex_unlock(&w->lock);
    if (!was_up)
        log_msg(LOG_NOTICE, "event=warmup_redis_up redis=%s", w->ep.addr);
    w->redis_backoff = 0;
    return 0;
}

int
warmup_flush(struct warmup *w)
{
    if (w == NULL)
        return 0;
    pthread_mutex_lock(&w->pass_lock);
    int rc = 0;
    if (w->redis_on && w->nsrcs > 0)
        rc = redis_pass(w);
    if (w->path[0] != '\0') {
        int r2 = state_save(w);
        if (rc == 0)
            rc = r2;
    }
    pthread_mutex_unlock(&w->pass_lock);
    return rc;
}

static void *
keeper(void *arg)
{
    struct warmup *w = arg;
    log_altstack_init();
    pthread_mutex_lock(&w->lock);
    while (!w->stop) {
        struct timespec until = clock_mono_deadline(KEEPER_INTERVAL_MS);
        while (!w->stop && pthread_cond_timedwait(&w->cv, &w->lock, &until) != ETIMEDOUT)
            ;
        if (w->stop)
            break;
        pthread_mutex_unlock(&w->lock);
        warmup_flush(w);
        pthread_mutex_lock(&w->lock);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

static int
keeper_start(struct warmup *w)
{
    if (w->thread_on || (w->path[0] == '\0' && !w->redis_on))
        return 0;
    int rc = pthread_create(&w->thread, NULL, keeper, w);
    if (rc != 0)
        return -rc;
    w->thread_on = true;
    return 0;
}

/* ---- open, reload, close ---- */

int
warmup_open(const struct config *cfg, struct warmup **out, char *err, size_t errlen)
{
    *out = NULL;
    struct warmup *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return -ENOMEM;
    pthread_mutex_init(&w->lock, NULL);
    pthread_mutex_init(&w->pass_lock, NULL);
    clock_cond_init_mono(&w->cv);
    int rc = srcs_build(cfg, &w->srcs, &w->nsrcs);
    if (rc == 0)
        rc = srcs_index(&w->by_addr, w->srcs, w->nsrcs);
    else
        hash_init(&w->by_addr, src_eq, 16);
    if (rc < 0) {
        snprintf(err, errlen, "warm-up plans: out of memory");
        warmup_close(w);
        return rc;
    }
    if (cfg->queue.path != NULL && cfg->queue.path[0] != '\0' &&
        ((size_t)snprintf(w->path, sizeof(w->path), "%s/%s", cfg->queue.path, STATE_FILE) >=
             sizeof(w->path) ||
         (size_t)snprintf(w->dir, sizeof(w->dir), "%s", cfg->queue.path) >= sizeof(w->dir)))
        w->path[0] = '\0';
    if (cfg->redis.url != NULL) {
        rc = redis_url_parse(cfg->redis.url, &w->ep, err, errlen);
        if (rc == 0 && cfg->redis.password != NULL) {
            free(w->ep.password);
            if ((w->ep.password = strdup(cfg->redis.password)) == NULL)
                rc = -ENOMEM;
        }
        if (rc < 0) {
            warmup_close(w);
            return rc;
        }
        w->redis_on = true;
        snprintf(w->prefix, sizeof(w->prefix), "%s",
                 cfg->redis.key_prefix != NULL ? cfg->redis.key_prefix : "sluice:");
        w->nodes = cfg->redis.nodes ? cfg->redis.nodes : 1;
    }
    if (w->path[0] != '\0' && w->nsrcs > 0)
        state_load(w);
    if (w->nsrcs > 0 && (rc = keeper_start(w)) < 0) {
        snprintf(err, errlen, "warm-up: cannot start the keeper thread: %s", strerror(-rc));
        warmup_close(w);
        return rc;
    }
    w->st.sources = w->nsrcs;
    *out = w;
    return 0;
}

int
warmup_reload(struct warmup *w, const struct config *cfg)
{
    struct wsrc **v;
    unsigned n;
    struct hash h;
    if (w == NULL)
        return 0;
    if (srcs_build(cfg, &v, &n) < 0)
        return -ENOMEM;
    if (srcs_index(&h, v, n) < 0) {
        srcs_free(v, n);
        return -ENOMEM;
    }
    pthread_mutex_lock(&w->lock);
    unsigned kept = 0;
    for (unsigned i = 0; i < n; i++) {
        struct wsrc *s = v[i];
        struct wsrc *o = src_find(w, s->addr);
        if (o == NULL)
            continue;
        for (unsigned g = 0; g < o->plan->ngroups; g++) {
            int ng = group_index(s->plan, o->plan->groups[g].name);
            if (ng < 0 || o->counts[g].day == INT64_MIN)
                continue;
            s->counts[ng] = o->counts[g];
            kept++;
        }
    }
    struct hash old_h = w->by_addr;
    struct wsrc **old_v = w->srcs;
    unsigned old_n = w->nsrcs;
    w->by_addr = h;
    w->srcs = v;
    w->nsrcs = n;
    w->st.sources = n;
    w->dirty = true;
    pthread_mutex_unlock(&w->lock);
    hash_fini(&old_h);
    srcs_free(old_v, old_n);
    log_msg(LOG_NOTICE, "event=warmup_reloaded sources=%u counts_kept=%u", n, kept);
    if (n > 0 && keeper_start(w) < 0)
        log_msg(LOG_ERR, "event=warmup_keeper_failed note=counts_not_saved");
    return 0;
}

struct warmup *
warmup_close(struct warmup *w)
{
    if (w == NULL)
        return NULL;
    if (w->thread_on) {
        pthread_mutex_lock(&w->lock);
        w->stop = true;
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->lock);
        pthread_join(w->thread, NULL);
        w->redis_next_try = 0; /* one last try, whatever the backoff */
        warmup_flush(w);
    }
    if (w->rc != NULL)
        redisFree(w->rc);
    free(w->ep.user);
    free(w->ep.password);
    hash_fini(&w->by_addr);
    srcs_free(w->srcs, w->nsrcs);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->pass_lock);
    pthread_mutex_destroy(&w->lock);
    free(w);
    return NULL;
}

/* ---- reports ---- */

size_t
warmup_report(struct warmup *w, uint64_t now_ms, struct warmup_row *out, size_t cap)
{
    if (w == NULL)
        return 0;
    pthread_mutex_lock(&w->lock);
    uint64_t t = now_of(w, now_ms);
    size_t k = 0;
    for (unsigned i = 0; i < w->nsrcs; i++) {
        struct wsrc *s = w->srcs[i];
        for (unsigned g = 0; g < s->plan->ngroups; g++, k++) {
            if (k >= cap)
                continue;
            struct warmup_row *r = &out[k];
            memset(r, 0, sizeof(*r));
            struct wcount *c;
            r->left = left_of(w, s, g, t, &c, false);
            int64_t day = c->day; /* the count's: see count_at */
            snprintf(r->source, sizeof(r->source), "%s", s->addr);
            snprintf(r->plan, sizeof(r->plan), "%s", s->plan->name);
            snprintf(r->group, sizeof(r->group), "%s", s->plan->groups[g].name);
            warmup_conf_format_date(day, r->date, sizeof(r->date));
            warmup_conf_format_date(s->start_day, r->start, sizeof(r->start));
            r->day = day - s->start_day + 1;
            r->allowance = warmup_conf_allowance(s->plan, g, r->day);
            r->taken = c->mine + c->others;
            r->reserved = c->seen;
            int64_t next = (int64_t)warmup_conf_day_start_ms(s->plan, day + 1) - w->shift_ms;
            r->next_day_ms = next < 0 ? 0 : (uint64_t)next;
        }
    }
    pthread_mutex_unlock(&w->lock);
    return k;
}

void
warmup_stats(struct warmup *w, struct warmup_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->redis = "off";
    if (w == NULL)
        return;
    pthread_mutex_lock(&w->lock);
    *out = w->st;
    out->redis = !w->redis_on       ? "off"
                 : w->redis_up      ? "connected"
                 : w->redis_failed  ? "unreachable"
                                    : "connecting";
    pthread_mutex_unlock(&w->lock);
}
