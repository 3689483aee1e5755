/*
 * warmup: IP warm-up plans for egress sources. A source that carries a
 * plan may send, each day, only the day's allowance of messages to each
 * destination group (Gmail, Microsoft, Yahoo, the rest: groups by MX host
 * pattern); the allowance rises day by day along the plan's schedule.
 *
 * Today this is the interface only: warmup_open() returns a plan set that
 * allows everything. The outbound side asks it when it picks a source for
 * a connection (warmup_left) and counts each transaction it starts on one
 * (warmup_take); plans, the day's counters, persistence and Redis come in
 * behind this interface.
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

/* The plans of cfg (its [source] sections). Returns 0 and *out, or a
 * negative errno with a reason in err. */
int warmup_open(const struct config *cfg, struct warmup **out, char *err, size_t errlen);
/* Free w (NULL: nothing). Returns NULL. */
struct warmup *warmup_close(struct warmup *w);

/* Messages source (an address as text, as in [source ADDRESS]) may still
 * send today to a destination whose preferred MX host is mx_host, at
 * now_ms (Unix ms); UINT64_MAX when the source has no plan (or w is
 * NULL). Counts nothing. */
uint64_t warmup_left(struct warmup *w, const char *source, const char *mx_host, uint64_t now_ms);
/* Count one message of source to mx_host's group at now_ms. Returns
 * whether it was within the day's allowance (true: go on; false: the
 * allowance was spent meanwhile, the caller sends it elsewhere or later,
 * and the count is given back). Always true without a plan. */
bool warmup_take(struct warmup *w, const char *source, const char *mx_host, uint64_t now_ms);
/* Unix ms at which the allowance of source to mx_host's group next
 * grows (the next day's start); 0 without a plan. */
uint64_t warmup_next_day_ms(struct warmup *w, const char *source, const char *mx_host,
                            uint64_t now_ms);

#endif
