/*
 * warmup: IP warm-up plans for egress sources. A source that carries a
 * plan ([source ADDRESS] warmup = NAME, [warmup NAME]: warmup_conf.h) may
 * send, each day, only the day's allowance of messages to each
 * destination group (Gmail, Microsoft, Yahoo, the rest: groups by MX host
 * pattern); the allowance rises day by day along the plan's schedule.
 *
 * The outbound side asks when it picks a source for a connection
 * (warmup_left) and counts each transaction it starts on one
 * (warmup_take); when no source of a pool has allowance it waits until
 * warmup_next_day_ms().
 *
 * Counts: one per (source, group, day), in memory under one mutex (a
 * take is a hash lookup, a pattern match and an increment: no I/O).
 * A keeper thread writes them to <spool>/warmup.state every second (and
 * warmup_close() once more), by write, fsync and rename: after a kill -9
 * a source may over-send by what it took in the last second before the
 * kill, at most that day's allowance. A state file from an earlier day
 * counts for nothing today. The day never goes back: after the clock
 * steps back by up to a day (over midnight), the later day's counts and
 * allowance hold until the clock is past that day; further back, the
 * clock was wrong and the counts start afresh.
 *
 * With [redis] url the day's budget is shared by every node. A node sends
 * only tokens it reserved: the keeper, every second, reserves for each
 * (source, group) in demand (asked for, or half its tokens spent) a
 * batch of (allowance - the cluster's reservations) / nodes ([redis]
 * nodes; at least 1) by INCRBY on "<prefix>warmup:{<source>}:<group>:
 * <YYYY-MM-DD>:reserved"; what the reply shows past the allowance is
 * given back (DECRBY) and not granted. Each INCRBY is atomic, so the
 * nodes' grants together never pass the allowance: no over-send across
 * nodes, at the cost of tokens a node reserved and did not use (at most
 * one batch per node a day). Each pass also adds the node's use to
 * "...:used" (reports: "taken" is every node's). Keys expire after 3
 * days. A node that ran out of tokens while the cluster has some left
 * waits for the next pass (warmup_next_day_ms answers then); nothing is
 * reserved before the first pass (a second after start). With Redis
 * unreachable a node keeps to a local share, allowance / nodes of its
 * own count (as limits.c does), or its reservation if larger, and
 * reconnects with backoff (1 s doubling to 30 s); the nodes may then
 * pass the allowance by what the others had reserved.
 *
 * Threading: every call from any thread (workers and the stats thread).
 */
#ifndef SLUICE_ENGINE_WARMUP_H
#define SLUICE_ENGINE_WARMUP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct config;
struct warmup;

/* The plans of cfg (its [source] sections; cfg is borrowed and must
 * outlive w, or the next warmup_reload()). Counts are read from
 * cfg->queue.path's warmup.state and kept there; Redis from cfg->redis.
 * Returns 0 and *out, or a negative errno with a reason in err. */
int warmup_open(const struct config *cfg, struct warmup **out, char *err, size_t errlen);
/* Write the counts a last time (and to Redis), stop the keeper, free w
 * (NULL: nothing). Returns NULL. */
struct warmup *warmup_close(struct warmup *w);
/* Run on cfg's plans from now on (SIGHUP); the counts of each (source,
 * group) that is still there are kept, whatever plan it now follows. The
 * state file and Redis stay those of warmup_open(). Returns 0 or -ENOMEM
 * (the previous plans kept). */
int warmup_reload(struct warmup *w, const struct config *cfg);

/* Messages source (an address as text, as in [source ADDRESS]) may still
 * send today to MX host mx_host (the host the message goes to: the
 * preferred one, or the one a failover moved it to), at
 * now_ms (Unix ms); UINT64_MAX when the source has no plan, is past its
 * schedule (or w is NULL). Counts nothing. */
uint64_t warmup_left(struct warmup *w, const char *source, const char *mx_host, uint64_t now_ms);
/* Count one message of source to mx_host's group at now_ms. Returns
 * whether it was within the day's allowance (true: go on; false: the
 * allowance was spent meanwhile, the caller sends it elsewhere or later,
 * and nothing is counted). Always true without a plan. */
bool warmup_take(struct warmup *w, const char *source, const char *mx_host, uint64_t now_ms);
/* Unix ms at which the allowance of source to mx_host's group next
 * grows: the next day's start, or with Redis, when this node's share is
 * spent but the cluster's is not, the keeper's next pass; 0 without a
 * plan. */
uint64_t warmup_next_day_ms(struct warmup *w, const char *source, const char *mx_host,
                            uint64_t now_ms);

/* One (source, group) for the stats socket, "stats" and /metrics. */
struct warmup_row {
    char source[46];
    char plan[65];
    char group[65];
    char date[11];         /* the plan's day "YYYY-MM-DD" */
    char start[11];        /* warmup_start */
    int64_t day;           /* of the plan: 1 on warmup_start (before it: below 1) */
    uint64_t allowance;    /* today's; UINT64_MAX: past the schedule, no limit */
    uint64_t taken;        /* today, this node's and (with Redis) the others' as last seen */
    uint64_t left;         /* what warmup_left answers (with Redis: this node's share) */
    uint64_t reserved;     /* with Redis: the day's reservations of every node, as this
                            * node last saw them in Redis (after a start, its own from
                            * the state file until the keeper's first pass); 0 without */
    uint64_t next_day_ms;  /* Unix ms of the next day's start */
};
/* Up to cap rows at now_ms, sources in config order, groups in plan
 * order. Returns how many there are (may exceed cap). */
size_t warmup_report(struct warmup *w, uint64_t now_ms, struct warmup_row *out, size_t cap);

struct warmup_stats {
    unsigned sources;          /* with a plan */
    const char *redis;         /* "off" | "connected" | "unreachable" (static) */
    uint64_t saves, save_failures;
    uint64_t syncs, sync_failures; /* keeper passes to Redis */
    uint64_t refused;          /* takes refused: the allowance was spent */
};
void warmup_stats(struct warmup *w, struct warmup_stats *out);

/* Run the keeper's pass now (Redis, then the state file), on the
 * caller's thread. Returns 0, or a negative errno of the first failure. */
int warmup_flush(struct warmup *w);

/* Tests only: move w's clock by delta_ms (now_ms + shift is the time its
 * days are counted at; warmup_next_day_ms answers in the callers' time).
 * The engine calls it only in builds with test hooks, when the operator's
 * environment asked (engine.c). */
void warmup_clock_shift(struct warmup *w, int64_t delta_ms);

#endif
