/*
 * auth_limit: failed AUTH attempts per client address and per user name,
 * across connections and workers, so that reconnecting does not buy a
 * client more guesses.
 *
 * Each key holds a leaky bucket: a failure adds 1, and the level drains at
 * limit / window (10 per 10 minutes drains one every minute). A key is
 * over its limit while its level is above limit - 1: after `limit`
 * failures in a burst, the next attempt waits until one has drained; a
 * client that keeps failing gets limit per window, no more. Attempts
 * refused for the limit add nothing (they guess nothing).
 *
 * Attempts under way (a hash running) count too: one may begin only while
 * the level plus the attempts under way stays within the limit, so a
 * client that opens a hundred connections and sends AUTH on each at once
 * gets `limit` hashes, not a hundred. (The server hashes identical
 * credentials under way once, so that an application logging in on many
 * connections at once with a cold cache takes one place, not many.)
 *
 * IPv6 clients are counted by /64 (one host commonly holds a whole /64);
 * IPv4 by address. Names are counted whether or not the user exists (a
 * limit that only known names reached would tell which names exist).
 *
 * Memory is fixed at creation: a set-associative table (8 entries per set,
 * the set chosen by a keyed hash so that a client cannot aim at one). A new
 * key takes a free or drained entry of its set, else evicts the entry of
 * the set updated longest ago.
 *
 * Threading: any thread; one mutex (AUTH is not hot enough for finer).
 */
#ifndef SLUICE_ENGINE_AUTH_LIMIT_H
#define SLUICE_ENGINE_AUTH_LIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct auth_limit;

enum auth_limit_kind { AUTH_LIMIT_ADDRESS, AUTH_LIMIT_USER };

struct auth_limit_stats {
    uint64_t entries; /* entries in use (a drained one is reused in place) */
    uint64_t capacity;
    uint64_t evictions; /* keys dropped for room while still counting */
};

/* A table of about `entries` keys (rounded up to a power of two, at least
 * 64). Returns 0 or -ENOMEM. */
int auth_limit_new(unsigned entries, struct auth_limit **out);
struct auth_limit *auth_limit_free(struct auth_limit *l);

/* The key of a client address (IPv6: its /64) for the calls below; len is
 * set to the key's length. */
void auth_limit_addr_key(const struct sockaddr *sa, uint8_t key[16], size_t *len);

/* Is key over its limit now (now_ns: CLOCK_MONOTONIC)? It drains at the
 * rate of its last failure. limit 0: no limit. */
bool auth_limit_over(struct auth_limit *l, enum auth_limit_kind kind, const void *key, size_t len,
                     unsigned limit, uint64_t now_ns);
/* Begin an attempt of key (it may fail): returns 1 when it is now under
 * way (end it with auth_limit_end), 0 when limit is 0 (nothing tracked:
 * do not end it), -EBUSY when the failures so far plus the attempts under
 * way leave no room. */
int auth_limit_begin(struct auth_limit *l, enum auth_limit_kind kind, const void *key, size_t len,
                     unsigned limit, uint64_t now_ns);
/* End an attempt begun with 1; failed: count a failure. */
void auth_limit_end(struct auth_limit *l, enum auth_limit_kind kind, const void *key, size_t len,
                    bool failed, unsigned limit, uint64_t window_ms, uint64_t now_ns);
/* Count one failure of key, which drains at limit per window_ms from now
 * on. limit 0: nothing is counted. */
void auth_limit_fail(struct auth_limit *l, enum auth_limit_kind kind, const void *key, size_t len,
                     unsigned limit, uint64_t window_ms, uint64_t now_ns);
void auth_limit_stats(struct auth_limit *l, struct auth_limit_stats *out);

#endif
