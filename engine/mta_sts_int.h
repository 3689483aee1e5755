/*
 * mta_sts_int.h: what the files of the MTA-STS store share (not a public
 * header: engine/mta_sts.c and engine/mta_sts_check.c include it;
 * everyone else goes through engine/mta_sts.h).
 *
 *   engine/mta_sts.c        the store: its entries, what workers ask, the
 *                           cache file, the thread's loop (curl and the
 *                           resolver's sockets), the sweep and the
 *                           refreshes, start and stop;
 *   engine/mta_sts_check.c  a check of a domain on the thread: TXT, the
 *                           policy host's addresses, the HTTPS fetch;
 *   engine/mta_sts_policy.c policies as data (parse, match, the TXT record).
 *
 * Threading: as mta_sts.c says: the entries and the queue of checks under
 * m->lock, a started check's own fields on the thread only.
 */
#ifndef SLUICE_ENGINE_MTA_STS_INT_H
#define SLUICE_ENGINE_MTA_STS_INT_H

#include <curl/curl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/hash.h"
#include "common/slab.h"
#include "engine/mta_sts.h"
#include "engine/netaddr.h"

/* CHECK_IDLE: queued, not started. */
enum check_state { CHECK_IDLE, CHECK_TXT, CHECK_ADDR, CHECK_FETCH };

/* A domain asked: what mta_sts_get needs to answer, and no more. Most
 * domains a bulk sender meets have no policy and are kept so for an hour
 * after their last mail (recheck; see sweep()), a million an hour on a
 * busy node: what only a check uses lives in its struct sts_check, made
 * for the check and freed when it ends. Allocated in
 * offsetof(struct sts_entry, name) + the name's octets (no tail padding)
 * from m->entries (common/slab.h): 41 octets and the name, a 64-octet
 * object for "example.com".
 * Under m->lock, all of it (name: immutable). */
struct sts_entry {
    struct hash_node hn;          /* in m->domains (first) */
    struct mta_sts_policy *pol;   /* owned reference, or NULL */
    uint64_t checked_ms;          /* Unix ms of the last finished check; 0: never */
    uint64_t used_ms;             /* Unix ms of the last mta_sts_get */
    bool busy : 1;                /* a check is asked (MTA_STS_ASK), queued or in flight;
                                   * the sweep keeps the entry while it is */
    bool dns_failed : 1;          /* the last check ended on a temporary DNS failure
                                   * (its TXT record's or its policy host's): with no
                                   * policy in force, due again after sts_retry_after(),
                                   * not recheck */
    uint8_t again : 6;            /* the last check found no policy: due again this many
                                   * minutes after it (sts_no_policy_again); 0: after recheck */
    char name[];
};
_Static_assert(offsetof(struct sts_entry, name) == 41, "sts_entry grew: see its comment");
/* The names asked are destinations' (cut at 255 octets, dest.c) and the
 * cache file's (at most DNS_NAME_MAX): every one fits a slab object. A
 * longer one from elsewhere is refused by slab_alloc and answered as a
 * domain without a policy (no _mta-sts name could be asked for it). */
_Static_assert(offsetof(struct sts_entry, name) + 256 <= SLAB_MAX, "a name of 255 octets fits");

/* One check of a domain, queued (on m->qhead, under m->lock) and then
 * running on the thread (on m->running, the thread's), until check_done
 * frees it. A first check asked of a worker (MTA_STS_ASK) makes one only
 * when its TXT answer names an id to fetch: a domain without a record,
 * most of them, never has one. */
struct sts_check {
    struct sts_check *qnext;      /* on m->qhead, under m->lock */
    struct sts_check *prev, *next; /* on m->running, the thread's */
    struct sts_entry *e;          /* borrowed: busy, so kept, while the check lives */
    struct mta_sts *m;            /* borrowed: the store */
    bool refresh;                 /* to fetch the policy again (RFC 8461 3.3) */
    bool txt_known;               /* new_id is set: a worker asked the TXT record */
    uint8_t again;                /* its TXT answer said no policy: for the entry's
                                   * again (check_done); 0 otherwise */
    char new_id[33];              /* the id to fetch: by the thread, or by
                                   * mta_sts_txt_answer (under m->lock) before it
                                   * queues the check */
    /* The thread's only. */
    uint8_t st;                   /* enum check_state */
    struct dns_req *req;
    CURL *easy;                   /* owned while fetching */
    struct curl_slist *resolve;   /* owned while fetching */
    CURLSH *share;                /* owned while fetching: easy's DNS cache, which holds
                                   * the resolve entry (see fetch_start) */
    char *body;                   /* owned: the answer so far, MTA_STS_MAX_BYTES + 1 */
    size_t blen;
    bool too_big;
};

struct mta_sts {
    const struct config *cfg;     /* borrowed */
    const struct mta_sts_config *sc; /* borrowed: &cfg->mta_sts */
    char dir[PATH_MAX], file[128]; /* the cache */
    pthread_mutex_t lock;
    /* under lock: [delivery] allow_networks and deny_networks of the
     * config in force (a reload's: mta_sts_set_allow), not cfg's of the
     * start */
    struct cidr allow[NETADDR_MAX_LIST], deny[NETADDR_MAX_LIST];
    int nallow, ndeny;
    struct hash domains;          /* owned struct sts_entry, by name */
    struct slab entries;          /* where they live: apart from the workers' heaps, which
                                   * an hour's entries would pin page by page */
    struct sts_check *qhead, *qtail; /* owned: checks waiting for the thread */
    bool stop;
    bool dirty;                   /* the cache file is behind */
    bool flush_reports;           /* the operator asked */
    struct mta_sts_stats st;

    /* The thread's. */
    pthread_t thread;
    bool started;
    CURLM *multi;
    struct dns *dns;
    struct pollfd *dfds;          /* owned: the resolver's sockets, room for dcap */
    unsigned ndfds, dcap;
    struct curl_waitfd *wfds;     /* owned: dfds as curl_multi_poll takes them, room for
                                   * wcap; grown only between polls (on_dns_sock runs
                                   * while the last poll's are read) */
    unsigned wcap;
    unsigned inflight;
    struct sts_check *running;    /* owned: the checks started (m->inflight of them) */
    uint64_t saved_ms;
    uint64_t swept_ms;            /* monotonic ms of the last sweep */
    uint64_t sweep_every_ms;      /* SWEEP_MS, or a test hook's */
    uint64_t forget_ms;           /* 0: FORGET_MS and at least recheck; else a test hook's */
    uint64_t ttl_unit_ms;         /* 0: NO_POLICY_UNIT_MS; else a test hook's */
    uint64_t refresh_ms;          /* monotonic ms of the last refresh scan */
    struct tlsrpt *rpt;           /* owned, or NULL */
};

/* mta_sts.c: the store */
/* Is p in the last tenth of its max_age (at least REFRESH_MIN_MS), when
 * it is fetched again before it ends? */
bool sts_refresh_due(const struct mta_sts_policy *p, uint64_t now);
/* How long after a check that failed on DNS a domain without a policy in
 * force is due again (ms): [dns] error_ttl, within RETRY_MIN_MS and
 * recheck. */
uint64_t sts_retry_after(const struct mta_sts *m);
/* How long after a check that found no policy, its TXT answer's TTL
 * being ttl (s; DNS_TTL_UNKNOWN: not known), the domain is due again,
 * as sts_entry's again (minutes); 0: after recheck. */
uint8_t sts_no_policy_again(const struct mta_sts *m, uint32_t ttl);

/* mta_sts_check.c: checks, on the thread */
/* Frees c and what it holds, off m->running. Returns NULL. */
struct sts_check *sts_check_free(struct mta_sts *m, struct sts_check *c);
/* curl finished c's fetch (res: how): the policy parsed and stored, or
 * the failure reported; c ends. */
void sts_fetch_done(struct mta_sts *m, struct sts_check *c, CURLcode res);
/* What a TXT answer for _mta-sts.DOMAIN says: 1 with the policy's id
 * (exactly one valid STSv1 record), or 0 with the result and reason of a
 * check that ends there. */
int sts_txt_verdict(enum dns_status status, const char *dwhy, const char *const *txt, unsigned n,
                    char id[33], const char **result, const char **why);
/* Start the checks queued, up to max_fetches in flight. */
void sts_check_next(struct mta_sts *m);

#endif
