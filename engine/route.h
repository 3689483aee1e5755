/*
 * route: site affinity's route table, shared by the workers (lock-free).
 * Which worker the mail of a domain without a pool goes to, once its MX
 * answer named its site (outbound/scheduler.c decides, delivery.c asks on
 * every hand-off), and which sites are busy (sent from every worker).
 *
 * Everything is by 32-bit hash (the caller's: delivery_domain_hash of the
 * domain, of the site's MX host). 2^18 slots of 32 bits (1 MiB, zero
 * pages until used) in buckets of 16, the bucket the hash's low bits. A
 * claimed slot holds the worker plus one (9 bits: [server] workers is at
 * most 256) under a tag made of all the hash's bits; a domain without a
 * slot of its tag has no route here (its hash's worker). A claim takes an
 * empty slot of its bucket, under the bucket's spin lock (16 KiB of
 * flags: claims of one bucket one at a time, so two claims of one domain
 * never both stand); the worker it names empties it (compare-and-swap,
 * no lock: an emptied slot makes no second claim). Why buckets: with one slot per hash, 4% of 10,000 domains
 * found their slot taken and stayed behind, and nearly every site of 100
 * domains had one domain on the other worker, with connections of its own
 * to the site's address. A full bucket (16 live claims) is a claim
 * refused. Two domains of one hash share a route (and each other's
 * claim): rare, and only a move more.
 *
 * After the slots, 1,024 words: until when the sites of each hash of an
 * MX host name are busy (seconds of the monotonic clock, plus one; 0:
 * never). A host that shares a hash with a busy one is not gathered
 * meanwhile either.
 *
 * Threading: any thread.
 */
#ifndef SLUICE_ENGINE_ROUTE_H
#define SLUICE_ENGINE_ROUTE_H

#include <stdbool.h>
#include <stdint.h>

struct route;

/* NULL without memory. */
struct route *route_new(void);
void route_free(struct route *r);
/* The worker claimed for the domain of hash h, or -1: none. */
int route_worker(const struct route *r, uint32_t h);
/* Claim the domain of hash h for worker (< 511): false when it has a
 * claim already (any worker's) or its bucket is full. */
bool route_claim(struct route *r, uint32_t h, unsigned worker);
/* Empty worker's claim for the domain of hash h, if there is one. */
void route_unclaim(struct route *r, uint32_t h, unsigned worker);
/* The sites of MX host hash hh are busy until until_s; true when they
 * were not at now_s (a new mark, worth a log line). */
bool route_busy_mark(struct route *r, uint32_t hh, uint32_t now_s, uint32_t until_s);
/* Are the sites of MX host hash hh busy at now_s? */
bool route_busy(const struct route *r, uint32_t hh, uint32_t now_s);

#endif
