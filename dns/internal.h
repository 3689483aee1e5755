/*
 * internal: what the files of dns/ share and nobody else sees: the
 * resolver, its cache entries, requests and lookups.
 *
 * Shapes:
 *  - struct entry: one domain in the cache (common/hash.h, keyed by the
 *    normalised name and the kind of lookup: MX, or the name's own
 *    addresses for dns_addr_resolve). QUEUED (waiting for a slot under max_inflight),
 *    INFLIGHT (its struct lookup talks to c-ares) or DONE (holds a result
 *    until it expires or is evicted). Only DONE entries are on the LRU
 *    list (common/lru.h), so only they are ever evicted: the oldest when
 *    cache_size is reached, and every expired one by the sweep that
 *    dns_timeout() schedules, so that the cache holds the domains mail
 *    went to within their TTL, not every domain ever seen.
 *  - struct dns_req: one caller waiting. On its entry's waiter list while
 *    the lookup runs; then, holding its own reference to the result, on
 *    the resolver's ready list until dns_process_* runs its callback. So
 *    a callback never runs inside dns_mx_resolve, and an entry may be
 *    looked up again while its old waiters are still being called.
 *
 * Threading: the owner thread of the struct dns only.
 */
#ifndef SLUICE_DNS_INTERNAL_H
#define SLUICE_DNS_INTERNAL_H

#include <ares.h>
#include <stdatomic.h>

#include "common/clock.h"
#include "common/hash.h"
#include "common/lru.h"
#include "dns/dns.h"
#include "dns/wire.h"

enum entry_state { ENTRY_QUEUED, ENTRY_INFLIGHT, ENTRY_DONE };

struct dns_req {
    struct dns_req *prev, *next; /* on entry->waiters or dns->ready */
    struct entry *entry;         /* borrowed: while waiting; NULL once ready */
    struct dns_mx_result *res;   /* owned: once ready */
    dns_mx_fn *cb;
    void *arg;
};

struct req_list {
    struct dns_req *head, *tail;
};

struct lookup;

struct entry {
    struct hash_node hn;         /* in dns->cache (first member: see entry_of) */
    struct lru_node ln;          /* on dns->lru while DONE; on dns->slots while INFLIGHT
                                  * and holding a slot (not yet slow) */
    struct entry *qnext;         /* FIFO of QUEUED entries */
    uint64_t started;            /* INFLIGHT: CLOCK_MONOTONIC ns its lookup began */
    struct req_list waiters;     /* QUEUED and INFLIGHT */
    struct lookup *lookup;       /* owned: INFLIGHT */
    struct dns_mx_result *res;   /* owned reference: DONE */
    uint64_t expires;            /* DONE: CLOCK_MONOTONIC ns */
    uint8_t state; /* enum entry_state */
    bool addr;     /* the name's own addresses (dns_addr_resolve), not its MX */
    char name[];   /* normalised domain */
};

struct dns {
    struct dns_config cfg; /* owned copy */
    ares_channel channel;
    bool destroying; /* inside dns_free: c-ares calls back to cancel */
    bool starting;   /* inside start_queued: no recursion */
    bool draining;   /* inside drain: callbacks run */
    dns_sock_fn *sock;
    void *sock_arg; /* borrowed: the host's, lives longer than d */
    uint64_t rng;   /* xorshift state for the shuffles */
    uint64_t qid_rng; /* xorshift state for query ids (trust_ad: ares_send), seeded apart */

    struct hash cache;      /* of owned struct entry, by name */
    struct hash hosts;      /* of owned struct hentry (hosts.c), by MX host name and family */
    struct lru hosts_lru;   /* borrowed: every entry of hosts */
    size_t hosts_sweep_bucket;
    struct lru lru;         /* borrowed: the DONE entries of cache */
    uint64_t next_sweep;    /* CLOCK_MONOTONIC ns of the next expiry sweep */
    size_t sweep_bucket;    /* where the sweep in progress goes on */
    struct entry *queue_head, *queue_tail;
    /* Lookups in flight under max_inflight, oldest first. One still in
     * flight a whole try's timeout after it began (its server silent: a
     * dead domain's) gives its slot up (slow): max_inflight bounds the
     * burst a DNS server sees, and a dead domain's retries are none;
     * holding the slot for every try, a flood of dead domains kept every
     * other lookup queued for timeout * (2^tries - 1) each. */
    struct lru slots;       /* borrowed: those INFLIGHT entries, by when they began */
    unsigned inflight, slow, queued, nreqs; /* inflight: holding a slot */

    struct req_list ready;    /* completed requests, callbacks not yet run */
    struct dns_req *req_free; /* owned free list (next links) */

    uint64_t deadline;   /* cached answer of dns_timeout */
    bool deadline_dirty; /* recompute with ares_timeout (linear in queries) */
    bool edns_off;       /* c-ares turned EDNS off on channel (dns.c's edns_check) */
    struct dns_stats stats;
};

/* ---- lookup.c ---- */

/* Start e's lookup (e is INFLIGHT, counted in inflight). It may finish
 * before returning (then e is DONE). */
void lookup_start(struct dns *d, struct entry *e);
/* A failed query's c-ares status as the log and the reply say it
 * ("SERVFAIL", "timeout", "REFUSED", ...). Static text. */
const char *dns_ares_why(int status);
/* Called by lookup.c when e's lookup ended with res (one reference moved
 * in). Defined in dns.c. */
void dns_lookup_done(struct dns *d, struct entry *e, struct dns_mx_result *res);

/* ---- hosts.c ---- */

/* A host's answer for one family, as kept. */
enum host_st { HOST_OK = 1, HOST_NODATA, HOST_NXDOMAIN };
struct host_addrs {
    uint8_t st;                 /* enum host_st */
    unsigned n;                 /* addresses, HOST_OK */
    const uint8_t (*addr)[16];  /* borrowed: until the next call into the resolver */
    uint32_t ttl;               /* s left */
};
void hosts_init(struct dns *d);
void hosts_fini(struct dns *d);
/* 1 with *out when name's answer for the family is kept and fresh, else 0. */
int hosts_find(struct dns *d, const char *name, bool v6, struct host_addrs *out);
/* Keep name's answer for ttl_ms (0: not kept). */
void hosts_put(struct dns *d, const char *name, bool v6, enum host_st st, const uint8_t (*addr)[16],
               unsigned n, uint64_t ttl_ms);
/* One turn of the expiry sweep: HOSTS_SWEEP_BATCH entries, and the rest
 * of the bucket's chain it stopped in, at most. */
#define HOSTS_SWEEP_BATCH 4096
void hosts_sweep(struct dns *d, uint64_t now);
bool hosts_any(const struct dns *d);

/* ---- result.c ---- */

struct result_host {
    const char *name; /* borrowed for the build */
    unsigned preference;
    unsigned n4, n6;
    const uint8_t (*a4)[16];
    const uint8_t (*a6)[16];
    enum dns_dane dane;
    unsigned ntlsa;                 /* DNS_DANE_SECURE */
    const struct wire_tlsa *tlsa;   /* borrowed for the build */
    const char *expanded;           /* borrowed for the build; NULL: none */
    const char *tlsa_base;          /* borrowed for the build: name, expanded or NULL */
};

/* A result in one allocation, one reference. NULL when out of memory. */
struct dns_mx_result *result_new(enum dns_status status, const char *why, const char *domain,
                                 const struct result_host *hosts, unsigned nhosts, bool prefer_v6);
/* The answer when even a result cannot be allocated: DNS_RETRY, expired,
 * static (its count never reaches zero). */
struct dns_mx_result *result_oom(void);

/* ---- config.c ---- */

/* Parse the servers list into c-ares nodes (one allocation: free the
 * first node). Returns 0 (*out NULL for an empty list) or DNS_ESERVERS
 * with the reason in err, or -ENOMEM. */
int servers_parse(const char *s, struct ares_addr_port_node **out, char *err, size_t errlen);

static inline uint64_t
dns_xorshift(uint64_t *state)
{
    /* xorshift64* */
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static inline uint64_t
dns_rand(struct dns *d)
{
    return dns_xorshift(&d->rng); /* the shuffles need spread, not secrecy */
}

/* A query id for ares_send(), which sends the one in the message (c-ares
 * 1.18; ares_query() draws its own): from a state of its own, seeded from
 * getrandom(), so that the shuffles, whose order a receiver sees, tell
 * nothing about it. Unpredictable to whoever cannot see the queries,
 * which is what an id is for (RFC 5452). */
static inline uint16_t
dns_qid(struct dns *d)
{
    return (uint16_t)(dns_xorshift(&d->qid_rng) >> 48);
}

#endif
