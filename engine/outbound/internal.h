/*
 * outbound/internal.h: the objects the files of the outbound side share,
 * and the calls between those files. Not a public header: only
 * engine/delivery.c, engine/delivery_due.c, the files of engine/outbound/ and
 * the scheduler's unit test (tests/unit/test_scheduler.c) include it; everyone else goes through
 * engine/delivery.h.
 *
 * Who does what (one file per concern, as Postfix's smtp_connect.c,
 * smtp_proto.c, smtp_trouble.c and qmgr_*.c):
 *   engine/delivery.c      the public face: submission into the owning
 *                          worker, the spool port, start, stop, drain,
 *                          reload, operators' views;
 *   engine/delivery_due.c  deferred recipients that come due, taken
 *                          from the spool under [delivery] active_limit;
 *   outbound/dest.c        destinations (struct dest): their table,
 *                          queues, MX answer, holds and expiry sweeps,
 *                          eviction of idle ones;
 *   outbound/dest_fail.c   a destination's waiting jobs failed
 *                          together (an answer, a rested site, a
 *                          connection this node could not open);
 *   outbound/scheduler.c   what a destination does next: resolving,
 *                          idle connections of its site resumed for it,
 *                          opening connections within the caps;
 *   outbound/sched_conn.c  connections, as the scheduler sees them: the
 *                          job a ready connection takes next, jobs an MX
 *                          host refused sent to another, what the end of
 *                          a transaction or a connection means;
 *   outbound/site_share.c  a site's connections shared by its domains:
 *                          which site an answer names (MX rollup), the
 *                          line of domains waiting, moves and turns;
 *   outbound/mx_address.c  which MX address a new connection goes to,
 *                          its slot under the per-address cap, freed
 *                          slots handed on to any site's waiting domains;
 *   outbound/egress.c      the [mx] and [source] limit keys, which source
 *                          of a pool a connection goes from, and what the
 *                          shaping actions allow;
 *   outbound/fairq.c       a destination's queue: per-tenant sub-queues
 *                          served by weight, by priority within each
 *                          (a pure data structure: tests/unit/test_fairq.c);
 *   outbound/targets.c     where mail must not go (allow_networks, loops);
 *   outbound/affinity.c    which worker a domain's mail is sent from (site
 *                          affinity: claims in engine/route.h, hand-overs);
 *   outbound/site.c        sites, the adaptive window, the per-address table;
 *   outbound/connection.c  struct conn: connect, the client machine on
 *                          its stream (engine/stream.h: plain, or TLS
 *                          after STARTTLS), body streaming, reuse and
 *                          lifetime;
 *   outbound/outcome.c     acting on the outcome of a job: the failure
 *                          policy's verdict per recipient, the spool
 *                          update (retried while it fails), the logs,
 *                          the DSN hand-off;
 *   outbound/policy.c      every decision: defer, bounce, expire, next
 *                          address, hold, back off, fail over.
 *
 * The scheduler calls out (DNS, opening a connection, resuming an idle
 * one, failing jobs) only through struct outbound_ops, so that its unit
 * test feeds answers and connection results and watches its choices.
 * No file of engine/outbound/ reads struct engine (none includes
 * engine/engine.h): engine/delivery.c gives them what they use of it, as
 * fields of struct delivery (cfg to started_ms, taken again at a reload)
 * and as the calls under "between the engine and the outbound side".
 *
 * Threading: everything on the owning worker's thread.
 */
#ifndef SLUICE_ENGINE_OUTBOUND_INTERNAL_H
#define SLUICE_ENGINE_OUTBOUND_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dns/dns.h"
#include "engine/classify.h"
#include "engine/config.h"
#include "engine/delivery.h"
#include "engine/limits.h"
#include "engine/mta_sts.h"
#include "engine/outbound/fairq.h"
#include "engine/outbound/policy.h"
#include "engine/outbound/site.h"
#include "engine/smtp_client.h"
#include "engine/stats.h"
#include "engine/stream.h"
#include "engine/timer.h"
#include "engine/worker.h"
#include "common/hash.h"
#include "common/lru.h"
#include "queue/queue.h"

#define BODY_CHUNK     (64 * 1024) /* body read from the spool per step */
#define HOLD_MIN_MS    POLICY_HOLD_MIN_MS
#define SWEEP_MS       1000 /* expiry checks of the jobs waiting in a held destination,
                               * or one whose connections are all opening */
#define STS_ASK_MS     1000 /* a destination asks the MTA-STS store at most this often */
#define RATE_BOUND_NS  1000000000ULL /* a backlog held back by a rate this recently
                                      * earns its site no connection */
#define STS_WAIT_MS    50   /* ... and at least this often while its first check runs */
#define STS_WAIT_MIN_MS 2   /* ... at most this often (after half the time it has run) */
#define CONN_VERP_CAP  256  /* a VERP sender: 64 + '+' + token + '@' + 180 fits */
#define CONN_FROM_ASCII_CAP 256  /* a domain name (255) and its NUL */
/* Turns among the domains of a site (sched_conn_next, site_share.c
 * conn_give_turn). With [redis], how long a domain holding one
 * connection fewer than the carrying one waits before it is owed a turn;
 * the most turns a domain counts behind its site's clock when its next
 * transaction starts (site_turn_taken); the domains at the front of the
 * line looked at per transaction, and the most a domain going back in
 * line walks past from either end (want_place). */
#define SITE_TURN_MS     100
#define SITE_TURN_CREDIT 4
#define SITE_TURN_LOOK   32
/* An idle connection whose [mx] or [source] slot another site waits for
 * (not owed it: key_slot_owed) keeps it this long for its own site's next
 * message, then gives it (sched_conn_next). */
#define KEY_IDLE_GRACE_MS 100

struct dest;
struct delivery;
struct outcome_batch;

/* A job: recipients of one message at one domain, one transaction. It
 * is what a recipient due for delivery costs while it waits in memory:
 * for one recipient at a name of 15, 136 octets asked of malloc, a block
 * of 144 (the domain in the job's own allocation, not in a fixed array of
 * 256: 372 asked, a block of 384, before). Made by
 * job_new() and job_copy() only, freed with free(). */
struct job {
    struct worker_msg m; /* while it travels to the owner */
    struct fairq_node fq; /* on its destination's queue */
    struct job *next_parked; /* on d->parked while its tenant or campaign is suspended (scope.c) */
    uint64_t id;
    uint64_t expire_ms;  /* Unix ms, once known (a held destination asks); 0: not yet */
    uint64_t shaped_until; /* monotonic ns: parked by its tenant's shaping rate until
                            * then; 0: by a suspension */
    uint64_t queued_ns;  /* monotonic ns it was queued at its destination (put back
                          * first after a failure: kept) */
    const char *domain;  /* lowercased, U-labels as A-labels, at most 255 octets: in the
                          * job's allocation, after idx[cap] (job_new, job_copy) */
    struct job_owner owner; /* its message's tenant, pool, campaign, priority */
    unsigned failovers;  /* times a session failure moved it to the next address */
    unsigned reuse_lost; /* times it was lost on a reused connection and requeued at
                          * once (policy_reuse_lost) */
    unsigned n;          /* recipients in idx (at most the cap it was made with) */
    bool bounce;         /* the operator bounces these recipients */
    bool shaped;         /* parked for a shaping action on its tenant (scope.c) */
    bool shaped_asking;  /* with shaped: refused its tenant's rate token while the key
                          * asked Redis; the answer releases it (scope_rate_answer) */
    bool shaped_bounce;  /* with bounce: a shaping bounce's, only where it applies */
    bool dsn_flush;      /* failures held for their message's DSN came due: it goes now
                          * (outcome_held_due), naming every held one of the message */
    bool tls_retried;    /* it waited while a STARTTLS handshake failed under opportunistic
                          * TLS and had its plaintext retry (policy_conn_end): not again
                          * in this attempt */
    /* MX hosts (hashes of their names: job_host_h) that refused it in
     * this attempt for a lack of theirs (policy_host_refusal), nrefused
     * of them; it goes to the others (policy_host). The last refusal
     * policy_host allows is reported, never kept: one less. 32 bits: two
     * MX hosts of a domain alike in 16 (mx1.test, mx17249.test) made the
     * other one look refused too, and the job bounced; the job's block of
     * malloc is no larger for it */
    uint8_t nrefused;
    uint8_t detour_skips; /* times a connection to such a host passed it over while no
                           * connection of its domain to another could take it (detour_pass) */
    uint32_t refused_h[POLICY_HOSTS_REFUSED_MAX - 1];
    unsigned idx[];
};

/* A job for domain (lowercased here, cut to 255 octets) with room for
 * cap recipients, every other field zero (n too); NULL without memory. */
struct job *job_new(const char *domain, unsigned cap);

/* A copy of j's fields (n included: the caller sets it) with room for
 * cap recipients and a domain of its own: j may be freed first. NULL
 * without memory. */
struct job *job_copy(const struct job *j, unsigned cap);

static inline struct job *
job_of(struct fairq_node *x)
{
    return x != NULL ? (struct job *)((char *)x - offsetof(struct job, fq)) : NULL;
}

/* Whose job is (its tenant: an interned id, 0 for none) and how urgent
 * (0..9, higher first): the order of its destination's queue (fairq.h). */
static inline uint32_t
job_tenant(const struct job *j)
{
    return j->owner.tenant;
}

static inline unsigned
job_priority(const struct job *j)
{
    return j->owner.priority;
}

struct conn {
    struct delivery *d;   /* borrowed: outlives its connections */
    struct dest *dest;    /* borrowed: a dest lives while it has connections */
    struct conn *next_idle;
    /* While on its site's idle list: on the list of idle holders of its
     * [mx] key (0) and of its [source] key (1, when another), mxkey's
     * idle_holders (conn_idle_push, conn_idle_unlink). Borrowed: a
     * connection leaves the lists before it is freed. */
    struct conn *key_idle_next[2];
    struct conn **key_idle_pprev[2];
    struct site *site;    /* owned reference: the site it was opened for */
    unsigned epoch;       /* its site's window epoch when it opened */
    int tls_pol;          /* enum domain_tls it was opened with, or -1 for DANE
                           * (site_share.c dest_tls_key): a domain it moves to
                           * must have the same */
    struct site_addr *slot; /* its slot in the node's per-address table (site.h);
                             * NULL: not counted (no memory for the entry) */
    bool slot_yielded;    /* told to give the slot back to another worker: counted
                           * there as yielding until site_addr_give */
    uint64_t id;          /* for the logs: conn=ID on each line */
    const char *quit_why; /* static: why the scheduler said goodbye (sched_conn_next),
                           * the reason of its conn_close line; NULL: "done" */
    bool closed, connected, want_close;
    struct stream st;     /* the socket, plain or TLS (lend mode: the worker's
                           * provided buffers); its ops count for the lifetime */
    struct timer timer;
    union dns_addr addr;
    char addr_str[64];
    const char *mx;       /* borrowed from answer: the MX host's name */
    struct dns_mx_result *answer; /* owned reference: the answer the MX host is of */
    unsigned nmsgs;       /* transactions finished on this connection */
    unsigned max_rcpt;    /* recipients per transaction, as the machine was told */
    bool txn_done_seen;
    bool txn_verp;         /* this transaction's sender is a VERP one: the next hop's DSNs
                            * come back to the bounce listener, which reads failures only */
    bool ready_once;      /* the session reached IDLE at least once */
    bool drain_cut;       /* closed by a drain before it was ready: an end of no
                           * meaning for the policy (as at a stop) */
    bool cut_untold;      /* closed by the stop at the dot with the send that holds
                           * it in flight: its transaction_cut line waits for that
                           * send's end (conn_stop_cut, told in conn_free) */
    bool idled;           /* it waited on its site's idle list since its last transaction
                           * (or before its first): cleared as each one ends */
    bool over_cap;        /* told to end after its transaction: over its domain's
                           * max_connections (dest.conns_quitting counts it) */
    bool over_mk, over_sk; /* ... over its [mx] or [source] key's max_connections
                            * (mxkey.quitting counts it) */
    bool over_site;        /* ... over its site's ceiling, the highest max_connections
                            * of its domains, which a reload lowered
                            * (site.conns_quitting counts it) */
    bool detour;          /* opened for a job another MX host refused (policy_host), the
                           * cursor put back behind it: its failure moves it not; it
                           * carries only such jobs of its domain (detour_take), never
                           * moves to another, and idles for the next one */
    bool detour_yield;    /* it ends to make room for a detour's (dest.detour_yield) */
    bool reuse_lost;      /* its last transaction was lost on reuse, its job requeued
                           * (policy_reuse_lost): its end holds nothing back */
    bool congested;       /* its site learned of a failure of it (sched_conn_congested):
                           * once per connection (a 421 in a transaction, then its end) */
    bool idle_short;      /* idle while another site waits for its [mx] or [source]
                           * slot: for KEY_IDLE_GRACE_MS, then goodbye (limit_wanted) */
    bool on_idle;         /* on its site's idle list (conn_idle_push, conn_idle_unlink) */
    bool idle_poll;       /* idle holding a slot of an [mx] or [source] cap shared
                           * through [redis] or by the node's workers: asks every
                           * LIMIT_WANT_POLL_MS whether a worker or node elsewhere
                           * waits for one (limit_wanted) */
    uint64_t idle_left_ms; /* ...and idles that much longer after this step */
    uint64_t opened_ns;   /* monotonic ns it was attached (its connect began) */
    uint64_t txn_ns;      /* worker clock: its transaction began (MAIL sent), until the
                           * body may go (0: none, or taken: site_window_on_head) */
    bool leased;          /* holds a connection lease of its destination */
    struct mxkey *mxk;    /* borrowed: holds a lease of it when not NULL */
    struct mxkey *srck;   /* borrowed: its source address's [source] lease, or NULL */
    struct mxkey *shk;    /* borrowed: the rate a shaping action gives its source at
                           * its MX host's group ("shape:"), or NULL; no lease */
    const struct mx_policy *src; /* borrowed: the [source] it binds, from its destination's
                                  * pool; NULL: the node's default source ([delivery]
                                  * source_address). Of cfg (below) */
    const struct config *cfg; /* borrowed: kept while c lives (cfg_gen, config_gen.h): the
                               * config of src, or the one in force when c opened without
                               * one; its client's EHLO name and timeout table are of it */
    uint64_t cfg_gen;     /* cfg's generation */
    uint32_t src_id;      /* the source's name id (d->names), 0: the default source */
    struct conn *prev_all, *next_all; /* every connection of the worker */

    struct job *job;      /* owned: the job in flight, or NULL */
    struct queue_envelope *env; /* owned: its envelope */
    struct smtp_client_txn txn;
    struct smtp_client_rcpt *rc; /* owned, job->n entries */
    char *verp;           /* owned, CONN_VERP_CAP, made at the first VERP transaction:
                           * the VERP sender (oob.h), a local part of at most 64, a
                           * verp_domain of at most 180 */
    char *from_ascii;     /* owned, CONN_FROM_ASCII_CAP, made at the first transaction
                           * whose sender's domain is in U-labels: its A-labels */
    uint64_t body_off;    /* octets of the body read from the spool */
    size_t chunk_len, chunk_pos;
    bool body_last;

    /* STARTTLS: the stream carries TLS from then on; the machine sees
     * plaintext. */
    bool tls_wanted;      /* EV_STARTTLS: handshake once the output is sent */
    const char *tls_proto, *tls_cipher; /* once the handshake completed: borrowed from
                           * OpenSSL's constant tables ("TLSv1.3", "TLS_AES_256_GCM_SHA384") */
    char tls_verify[96];  /* the certificate check once TLS was tried: "ok", or why not
                           * ("hostname mismatch", "certificate verify failed: ..."); "" before */
    bool tls_reported;    /* its TLS result was counted for TLS reporting (tlsrpt.h) */
    bool tls_fell_back;   /* its handshake failed and its address goes in plaintext now
                           * (policy_tls_fallback): its end asks for a plaintext retry */
    char src_str[64];     /* our address on this connection */
    uint64_t expire_ms;   /* Unix ms at which the job in flight expires, 0: none */
    int pending_ev;       /* events not acted on yet (see conn_handle) */
    bool handling;

    /* Memory only while it is used (a connection waiting for a reply,
     * thousands of them, holds none): the machine's buffer comes from
     * d->cli_pool, received octets from the ring's provided buffers. */
    struct smtp_client cli;
    char *chunk;          /* owned, from d->chunk_pool, only while a body is
                           * being sent */
};

/* A free list of equal buffers: connections borrow and return them many
 * times a second, so malloc is only met in bursts. */
struct pool {
    void *free;           /* owned: a list through each buffer's first word */
    unsigned nfree;
    unsigned low;         /* fewest free since the last conn_pool_decay() */
    size_t size;
    uint64_t out;         /* borrowed now */
};

/* The limits of one [mx PATTERN] on this worker, shared by the
 * destinations whose preferred MX host matches. */
struct mxkey {
    struct mxkey *next;       /* on d->mxkeys */
    struct delivery *d;       /* borrowed */
    const struct mx_policy *pol; /* borrowed from the config; NULL: gone after a reload */
    char pattern[LIMIT_KEY_MAX]; /* "mx:" or "src:" and the section's name */
    struct limit_key lim;
    struct dest *waiters;     /* borrowed: refused a lease (or a token) with no time to
                               * wait, or, with [redis], a lease at all (mx_wait): run on
                               * the key's news (mx_on_wake), oldest first; newest
                               * first on the list */
    unsigned idle;            /* connections of this worker holding it that are on their
                               * site's idle list (conn_idle_push, conn_idle_unlink) */
    struct conn *idle_holders; /* borrowed: those connections (conn.key_idle_next),
                                * walked by key_idle_kick */
    uint64_t kick_none_at;    /* the loop turn whose key_idle_kick walk found none owed */
    unsigned quitting;        /* connections holding it told to end over its lowered
                               * max_connections (conn.over_mk, over_sk) */
    struct limit_want want;   /* with [redis]: whether a limiter elsewhere waits for it
                               * (key_wanted_elsewhere) */
    bool parked_asking;       /* jobs were parked for a token of it while it asked Redis
                               * (a tenant's shaping rate): its news releases them */
};

/* Why a destination's last address failed, kept for the deferral of
 * what waits once every address failed: the outcome, and the MX host and
 * address it came from (empty when there was none: a refused target),
 * and the source address and TLS its connection had (conn_fail_note; ""
 * and NULL without a connection). */
struct dest_fail {
    struct smtp_outcome o;
    char mx[DNS_NAME_MAX + 1];
    char addr[64];
    char source[64]; /* the local address it left from (bound, or read once connected):
                      * "" when none was bound and it never connected */
    const char *tls_policy;             /* static ("dane", ...); NULL: the domain's */
    const char *tls_proto, *tls_cipher; /* OpenSSL's constants, once a handshake completed */
    char tls_verify[96];                /* as struct conn's */
    bool untried; /* told to a domain that did not try (its site rests after every
                   * address failed for another: dest_fail_as_site); its recipients'
                   * attempt counts stay as they are */
};

struct dest {
    struct hash_node node;   /* on d->dests: first, the table's entries are dests */
    struct lru_node lru;     /* on d->dest_lru: eviction when idle */
    uint64_t touched;        /* monotonic ns of its last activity */
    struct delivery *d;
    /* A destination is (domain, pool): mail of one pool leaves only
     * through that pool's sources, on sites of its own. */
    uint32_t pool;           /* the pool's name id (d->names); 0: none, the default source */
    bool tls_relaxed;        /* and of messages delivered despite TLS failures (TLS
                              * reports, RFC 8460 3: job_owner.tls_relaxed), a destination
                              * of their own: opportunistic TLS (or off), never MTA-STS,
                              * DANE, required or verify */
    const struct pool_config *poolc; /* borrowed from the config: its sources; NULL when
                                      * pool is 0 or names no [pool] now */
    uint32_t *src_ids;       /* owned: the name ids of poolc's sources, in its order
                              * (asked per transaction: the name table takes a lock) */
    const struct pool_config *src_ids_for; /* compared only: the poolc src_ids are of */
    uint32_t grey_src;       /* the source that last met greylisting here (policy_greylisted) */
    uint64_t grey_until;     /* monotonic ns: till then its new connections go from grey_src,
                              * and it stays in memory (dest_evictable) */
    const struct domain_policy *pol; /* borrowed from the config */
    struct fairq q;          /* owned: the jobs waiting, by tenant and priority */
    uint64_t queued_rcpts;   /* their recipients (dest_push, dest_pop, dest_unqueued) */
    unsigned conns;          /* open or opening */
    unsigned conns_quitting; /* of them: told to end over max_connections (conn.over_cap) */
    unsigned opening;        /* not yet ready for a transaction */
    struct site *site;       /* owned reference: the site of its answer, or NULL */
    const struct dns_mx_result *site_for; /* borrowed, compared only: the answer site is of */
    const struct dns_mx_result *affinity_for; /* compared only: the answer dest_affinity saw */
    struct lru_node want;    /* on site->want: waits for a connection */
    uint64_t want_since;     /* monotonic ns it joined site->want (with [redis]: a turn
                              * is owed after SITE_TURN_MS, conn_give_turn) */
    uint64_t turn_tag;       /* its site's turns it has had (site_share.c
                              * site_turn_taken, site_turn_join): its place in the
                              * site's line and its claim to a turn */
    struct lru_node addr_want; /* on d->addr_wait: an MX address's slots were taken */
    uint64_t addr_want_h;    /* ... which: a hash of its owner and address (addr_taken) */
    const struct dns_mx_result *targets_for; /* borrowed, compared only: what ntargets counts */
    unsigned ntargets;       /* its addresses that may be delivered to */
    struct dns_mx_result *mx; /* owned reference */
    struct dns_req *req;      /* lookup in flight: of an answer, or a refresh of mx
                               * (expired, its connections open: dest_mx_answer) */
    uint64_t refresh_at;      /* monotonic ns: a refresh of mx that failed is not asked
                               * again before (policy_mx_refresh_keeps); 0: none */
    unsigned next_addr;      /* failover cursor over the answer's addresses */
    /* A job of t waits for a connection to another MX host than the one
     * (detour_not_h: job_host_h) that refused it (policy_host) and whose
     * connection passed it over: t's run resumes no idle connection to
     * that host, and opens one at the cursor, moved past it. Cleared once
     * a connection to another host takes a job of t, or t has none. */
    bool detour_wait;
    uint32_t detour_not_h;
    /* dest_cursor_past moved the cursor for such a job: where it was, put
     * back once that connection opens (one job's detour is no failure of
     * the host it left: t's other mail stays there) */
    bool detour_cursor;
    unsigned detour_from;
    /* Jobs queued that an MX host refused so (job.nrefused != 0), counted
     * by dest_push, and by dest_refused_gone as they leave the queue:
     * only while some wait are jobs passed over before a rate token is
     * taken, and an idle detour connection resumed. */
    unsigned refused_queued;
    /* t's connections opened for such a job (conn.detour), open or
     * opening: while one lives a job passed over is waiting for it, and
     * no pass counts against its budget (job.detour_skips). */
    unsigned detour_conns;
    uint32_t detour_h; /* the MX host of the last one opened (job_host_h) */
    /* One of t's connections to the host passed over ends (conn.detour_yield)
     * to make room for the detour's, t at its max_connections, its
     * site's window or its [mx] section's cap: one at a time. */
    bool detour_yield;
    unsigned failed_addrs;   /* consecutive connection failures */
    uint64_t hold_until;     /* monotonic ns: no new connection before */
    uint64_t usable_ns;      /* monotonic ns its answer (and policy) let its jobs wait
                              * for a connection of its site, or its message rate's
                              * next token came (dest_rate_wait); 0: not yet */
    uint64_t rate_until;     /* monotonic ns: the last wait for message tokens ended
                              * (or ends) then; 0: none */
    struct dest_fail *last_fail; /* owned: why the last address failed, for the
                              * deferral; NULL: none (some 850 octets only once one failed) */
    struct dest_fail *fail_more; /* owned: the failure the jobs still waiting fail with on
                              * the next turn (dest_fail_each's budget); NULL: none */
    bool fail_more_where;    /* fail_more says where (MX host, address, source, TLS) */
    uint8_t fail_more_src;   /* enum classify_source of fail_more */
    bool refused_self;       /* no target: because one is this node's own listener */
    bool own_failed;         /* one of the failed_addrs failed the domain's own policy
                              * or source (TLS, DANE, no source of the family), not
                              * the host: its site does not rest for that round */
    bool refused_sts;        /* no target: no MX host matches its MTA-STS enforce policy */
    /* MTA-STS (engine/mta_sts.h): the policy when last asked, asked again
     * at most every STS_ASK_MS; while the first check of the domain runs
     * it waits (dest_run_once asks again, every STS_WAIT_MIN_MS to
     * STS_WAIT_MS). */
    struct mta_sts_policy *sts; /* owned reference, or NULL: none (or not applied) */
    uint64_t sts_asked;      /* monotonic ns of the last answer; 0: none yet */
    uint64_t sts_wait_since; /* monotonic ns its mail began to wait for a first check;
                              * 0: it does not */
    struct sts_ask *sts_ask; /* borrowed: its first check's TXT lookup, in flight */
    struct timer hold_timer;
    struct timer sweep_timer; /* while held: expire what waits */
    bool suspended;          /* by the operator: no new transaction */
    bool running, rerun;     /* in dest_run; asked again meanwhile */
    bool moved;              /* its jobs went to another worker and nothing ran here
                              * since: evicted at the next sweep, not after the idle
                              * time (dest_moved) */
    struct mxkey *mxk;       /* borrowed: its MX host's [mx] limits, or NULL */
    const struct dns_mx_result *mxk_for; /* the answer mxk was chosen from */
    struct dest *next_mxwait; /* on mxk->waiters */
    bool mx_waiting;
    bool mx_wait_token;      /* on the list for a message token (Redis's answer), not
                              * for a connection slot: key_slot_wanted passes it over */
    struct limit_key lim;    /* rates and connection leases (limits.h) */
    struct timer lim_timer;  /* a refused token or lease: ask again then */
    unsigned inflight;       /* jobs on connections now */
    uint64_t flight_oldest_ms; /* delivery_domains' scratch: its oldest job in flight's
                                * message time (0 between views) */
    unsigned untold;         /* outcome batches of its jobs not told yet: it stays
                              * (outcome.c counts them on it) */
    uint64_t delivered, failed; /* recipients, since start: counted when told (outcome.c) */
    uint64_t host_refused;   /* transactions an MX host refused for a lack of its own, since
                              * t was made (policy_host_refusal) */
    uint64_t host_detoured;  /* of those, jobs sent on to another MX host */
    uint64_t last_ms;        /* Unix ms of the last outcome */
    char last_reply[156];    /* the text of the last outcome that was not a delivery */
    uint16_t last_code;      /* ... its code, 0: none; a server's only when last_reason
                              * says so (smtp_reason_server_code): a DNS failure's 451
                              * is the failure policy's */
    uint8_t last_reason;     /* ... enum smtp_reason */
    uint8_t last_cls;        /* ... enum bounce_class, as its delivery log event's class */
    char *last_reply_at;     /* owned: "host\0address\0", the MX host whose session gave
                              * last_reply (address "" unknown), kept for the expiries
                              * of a hold it caused (dest_on_sweep); NULL: none, or no
                              * MTA's (a refused connect, DNS). Its own allocation, made
                              * again only when the host changes: the pointer fills a
                              * hole */
    /* For the operators' views (delivery_domains): recipient deferrals
     * since the destination was made, by enum bounce_class (counted when
     * told, as delivered and failed), and the wall
     * clock's end of the hold (hold_until is monotonic). */
    uint32_t deferred_by_class[BOUNCE_CLASS_COUNT];
    uint64_t hold_until_ms;
    char tls_verify[96];     /* the last certificate check of its connections, for the
                              * deferral of a job that no session carried */
    char name[];             /* the domain, as long as it is (at most 255) */
};

struct delivery {
    struct engine *e; /* borrowed: read by engine/delivery.c and delivery_due.c
                       * alone, which give the files of engine/outbound/ what
                       * they use of it (the fields below, and the calls
                       * "between the engine and the outbound side") */
    /* What the outbound side uses of the engine, taken by delivery_new,
     * again by delivery_start (every worker made: nworkers) and at each
     * reload (delivery_reconfigure, on this worker's thread in its park,
     * after the park read its view and before it publishes it: so cfg is
     * that view or newer, and a worker late for a park keeps reading the
     * config it had, never one swapped under it): delivery_env_take. */
    const struct config *cfg;  /* borrowed: kept by this worker's view in gens
                                * (config_holders.c) */
    struct intern *names;      /* borrowed: pools, sources and tenants by id */
    struct queue *queue;       /* borrowed: the spool */
    struct dlog_writer *dlog;  /* borrowed: this worker's writer of the delivery
                                * log and the events; NULL: neither */
    struct events *events;     /* borrowed; NULL: no event sinks */
    struct suppress *suppress; /* borrowed; NULL: no suppression list */
    struct warmup *warmup;     /* borrowed: warm-up plans */
    struct shaping *shaping;   /* borrowed; NULL: no traffic shaping */
    struct config_gens *gens;  /* borrowed: the configs in use (config_gen.h) */
    unsigned nworkers;
    uint64_t started_ms; /* the node's start, wall clock (DSN message ids) */
    unsigned lift_gen; /* delivery_lift_holds' calls, to mark the sites of one (site.h) */
    struct worker *w;  /* borrowed */
    struct tls_cache *tls_cache; /* owned: client sessions of this worker, per MX */
    struct resolver *res; /* owned */
    struct limits *lim;   /* owned: rate limits and leases of this worker's domains */
    struct queue_port *port; /* owned */
    struct op port_op;
    bool stopping;
    bool draining;           /* SIGTERM: finish what is in flight, start nothing */
    bool drained;            /* ... and it is done: told the engine */
    struct hash dests;       /* struct dest by name */
    struct lru dest_lru;     /* least recently active first */
    struct lru addr_wait;    /* destinations that found an MX address's slots taken
                              * (max_connections_per_address), oldest first: a
                              * connection of this worker that closes runs them
                              * (addr_wake) */
    uint64_t addr_idle_none_at; /* the loop turn (w->now) whose walk found no idle
                                 * connection to quit (addr_idle_quit) ... */
    uint32_t addr_idle_none_owner;         /* ... for this owner ... */
    unsigned char addr_idle_none_key[18];  /* ... and address (site_addr_key) */
    size_t addr_idle_none_len;
    struct timer evict_timer;
    uint64_t evicted;        /* destinations dropped when idle */
    struct timer due_timer; /* worker 0: take due recipients from the spool */
    unsigned due_batch;     /* ... at most this many a take (DUE_BATCH, less while full) */
    uint64_t due_trimmed;   /* worker ns of the last queue_map_trim (once a second) */
    struct delivery_stats stats;
    struct pool cli_pool;    /* struct smtp_client_buf */
    struct pool chunk_pool;  /* BODY_CHUNK */
    struct stream_bufs bufs; /* the ring's provided receive buffers (none on an old kernel) */
    struct conn *all;        /* every connection, for shutdown */
    uint64_t rng;            /* xorshift state: retry jitter */
    struct outcome_batch *retrying; /* owned: outcomes waiting to be committed again */
    struct delay_recheck *delay_rechecks; /* owned: delay warnings waiting for the
                                           * others of their message (outcome_delay.c) */
    struct hash delay_recheck_ids; /* the same by message id (eq NULL: not made yet) */
    struct outcome_batch *pending;  /* borrowed (each owned by its spool request or by
                                     * retrying): every outcome batch not durable yet, so
                                     * that a recipient is not told twice (outcome.c) */
    struct queue_envelope *fail_env; /* owned: the envelope job_fail read last, kept
                                      * while fail_env_keep, NULL: none */
    bool fail_env_keep; /* a pass of dest_fail_each: the jobs a message was split into
                         * (max_rcpt_per_txn) share one read of its envelope */
    uint64_t fail_turn;   /* w->now of the turn fail_in_turn counts */
    unsigned fail_in_turn; /* recipients dest_fail_each failed in that turn (its budget is
                            * the turn's, over every destination: a mailbox of a hundred
                            * jobs for a resting site is a hundred calls in one turn) */
    struct mxkey *mxkeys;    /* owned: [mx] limits met so far, [source] ones ("src:") and
                              * shaping's per source and group ("shape:") */
    struct sites sites;      /* sites and connections per MX address (outbound/site.h) */
    struct site_addr *slot_taken; /* taken for the connection being opened: its
                                   * sched_conn_attach() keeps it */
    uint64_t dsn_seq;        /* makes DSN Message-IDs unique */
    uint64_t conn_seq;       /* connection ids: worker id in the top byte */
    char (*local)[64];       /* owned: this host's interface addresses, as text */
    unsigned nlocal;
    uint64_t local_read_ns;  /* worker clock: when they were read (targets.c) */
    bool resolver_closed;
    struct sts_ask *sts_asks; /* owned: MTA-STS TXT lookups in flight (targets.c) */
    unsigned nsts_asks;
    struct worker_msg stop_msg;
    struct worker_msg drain_msg;
    const struct outbound_ops *ops; /* borrowed (static): what the scheduler calls out to */
    /* [tenant] weights by tenant id, direct-mapped (dest_tenant_weight
     * asks at each tenant's turn); emptied by delivery_reconfigure. */
    struct tenant_weight {
        uint32_t id;      /* 0: empty */
        unsigned weight;
    } tweights[64];
    /* MX addresses ("host@address:port") whose STARTTLS handshake failed
     * under opportunistic TLS: connections there go in plaintext until
     * then (policy_tls_fallback; connection.c). Direct-mapped by hash: a
     * collision forgets one (TLS is tried there again), never mixes two. */
    struct tls_fallback {
        uint64_t key;      /* 0: empty */
        uint64_t until_ns; /* worker clock */
    } tls_fallback[256];
    struct stats_tenant_table tenants; /* recipient outcomes per tenant (outcome.c) */
    /* outbound/scope.c: operators' suspensions by scope, parked jobs,
     * counters per tenant, pool and source */
    struct scope_susp *susp;  /* owned: nsusp entries */
    unsigned nsusp;
    struct timer scope_timer; /* the earliest timed suspension ends */
    struct job *parked;       /* owned: jobs of a suspended tenant or campaign */
    unsigned nshaped;         /* of them, parked for a shaping action on their tenant */
    _Atomic uint64_t parked_rcpts; /* their recipients: ready in the spool, but they cannot
                                    * go; worker 0's due poll reads it (due_room) */
    _Atomic uint64_t paused_rcpts; /* likewise, those waiting at destinations whose domain
                                    * or pool is suspended (scope_count_paused) */
    struct hash counts[DELIVERY_SCOPE_COUNT]; /* struct owner_count by id (TENANT, POOL, SOURCE) */
};

/* Where an outcome was met, for the log and the classification. */
struct outcome_where {
    const char *mx, *mx_addr, *source;
    uint32_t src_id;          /* the pool source's name id, 0: the default source */
    const char *tls_proto, *tls_cipher;
    const char *tls_verify;   /* "ok" or why the certificate did not verify, or "plaintext
                               * fallback: ..." (policy_tls_fallback); NULL: no TLS */
    const char *tls_policy;   /* the connection's ("dane", ...); NULL: the domain's */
    enum classify_source src; /* for outcomes that are not a server's reply */
    bool untried;             /* a deferral of mail not tried (struct dest_fail): no attempt */
    bool dsn_passed;          /* the server offered DSN (RFC 3461): it got NOTIFY and ORCPT,
                               * and a success is its to report, not ours */
};

/* Why an outbound_ops open made no connection. */
struct open_fail {
    int err;         /* -errno: -ENOMEM (no memory for it), -EMFILE or another of
                      * socket(), bind()'s (-EADDRNOTAVAIL: the source address is
                      * not on this host), -EAFNOSUPPORT (a pool's source is not
                      * of the address's family) */
    char source[64]; /* the source address that could not be bound or used, as
                      * text; "" when the failure is not the source's */
};

/* What the scheduler calls out to. engine/delivery.c wires the worker's
 * resolver, outbound/connection.c and outbound/outcome.c; the scheduler's
 * unit test wires scripts. */
/* Site affinity (outbound/affinity.c; marked from mx_address.c): a site
 * with this many connections on one worker is busy, and stays so this
 * long after the last time it was found so. */
#define SITE_BUSY_CONNS 20
#define SITE_BUSY_MS    600000

struct outbound_ops {
    /* As resolver_mx_resolve(): 1 with *res, 0 with *req (dest_on_mx()
     * runs later), or a negative code; -ENXIO: no resolver here. */
    int (*resolve)(struct delivery *d, struct dest *t, const char *name,
                   struct dns_mx_result **res, struct dns_req **req);
    void (*cancel)(struct delivery *d, struct dns_req *req);
    /* A new connection of t to a (of MX host h) from source src (NULL:
     * the default source; src_id its name id), attached with
     * sched_conn_attach(); NULL when none could be made now, and *why
     * says why (policy_open_failed() decides what follows). */
    struct conn *(*open)(struct dest *t, const struct dns_mx_host *h, const union dns_addr *a,
                         const struct mx_policy *src, uint32_t src_id, struct open_fail *why);
    /* An idle connection was handed to a domain with work: start its next
     * transaction (sched_conn_next() says which). */
    void (*resume)(struct conn *c);
    /* An idle connection (off its site's idle list) says goodbye now: its
     * slot comes back when it has gone (sched_conn_detach()). */
    void (*quit)(struct conn *c);
    /* Every recipient of j fails with o, without a session: true, and j
     * is freed; false when its message could not be read just then (not
     * gone: an I/O error, no reader slot), and j is the caller's still. */
    bool (*fail)(struct delivery *d, struct dest *t, struct job *j, const struct smtp_outcome *o,
                 enum classify_source src);
    /* As dns_txt_lookup() on this worker's resolver: 0 (cb runs exactly
     * once: later, or from inside this call when c-ares fails at once;
     * never once the resolver closed), or a negative code (-ENXIO: no
     * resolver here). NULL: MTA-STS first checks go to the store's
     * thread. */
    int (*txt)(struct delivery *d, const char *name, dns_txt_fn *cb, void *arg);
    /* This host's interface addresses as text (netaddr_ip_str), into *out
     * (malloc'd, the caller's: free()) and *n: 0 or a negative code.
     * NULL: getifaddrs(3). */
    int (*local_addrs)(struct delivery *d, char (**out)[64], unsigned *n);
    /* Site affinity (delivery.c's route table, shared by the workers; the
     * scheduler's rule is dest_affinity()). NULL: one worker's world,
     * every domain is this one's. route: the worker a domain's mail
     * without a pool belongs to now. claim: write worker as the domain's
     * (its site named by MX host), if a slot is free; false when it is
     * claimed already, its slots are taken, or the site is marked busy.
     * unclaim: empty the slot if this worker's claim for the domain is in
     * it. hand_over: post t's answer and its waiting jobs to worker (t is
     * left empty). site_busy: mark the site of MX host busy for
     * SITE_BUSY_MS from now. */
    unsigned (*route)(struct delivery *d, const char *domain);
    bool (*claim)(struct delivery *d, const char *domain, unsigned worker, const char *host);
    void (*unclaim)(struct delivery *d, const char *domain);
    void (*hand_over)(struct dest *t, unsigned worker);
    void (*site_busy)(struct delivery *d, const char *host);
};

/* ---- MTA-STS, as the scheduler applies it (outbound/targets.c) ---- */

/* Is t under an MTA-STS policy in enforce mode now? */
static inline bool
dest_sts_enforce(const struct dest *t)
{
    return t->sts != NULL && t->sts->mode == MTA_STS_ENFORCE;
}
/* The TLS policy t's connections are opened with and shared under (enum
 * domain_tls): verify under an enforce policy, else the domain's; for
 * tls_relaxed mail opportunistic at most (its t->sts stays NULL). */
static inline int
dest_tls(const struct dest *t)
{
    if (t->tls_relaxed)
        return t->pol->tls == DOMAIN_TLS_OFF ? DOMAIN_TLS_OFF : DOMAIN_TLS_OPTIONAL;
    return dest_sts_enforce(t) ? DOMAIN_TLS_VERIFY : t->pol->tls;
}
/* May t's mail go to MX host name (its enforce policy's patterns)? */
static inline bool
dest_mx_allowed(const struct dest *t, const char *name)
{
    return !dest_sts_enforce(t) || mta_sts_match(t->sts, name);
}
/* The policy t's mail is under: true when known (t->sts set, or NULL),
 * false while its first check runs. A domain never seen has its TXT
 * record asked on this worker's resolver (struct sts_ask, while
 * t->sts_ask is set: the answer runs t again; one given inside the call,
 * when c-ares fails at once, is read here and runs nothing, as this is
 * called from sched_conn_next too); a check the store's
 * thread runs (a policy to fetch) is asked again in STS_WAIT_MIN_MS to
 * STS_WAIT_MS. */
bool dest_sts_ready(struct dest *t);
/* At the end: the TXT lookups still out (their answers never come). */
void dest_sts_asks_free(struct delivery *d);
/* t goes: its TXT lookup's answer (if one is out) still reaches the store. */
void dest_sts_forget(struct dest *t);
/* "none", "opportunistic", "mta-sts", "verify", "relaxed": the delivery log's
 * tls_policy for a delivery of t under TLS policy tls_pol (enum
 * domain_tls). */
const char *dest_tls_policy_str(const struct dest *t, int tls_pol);

/* ---- outbound/dest.c ---- */

/* The table, the LRU and the eviction timer (from sched_init); the
 * eviction sweep starts (from sched_start, on the worker's thread). */
void dests_init(struct delivery *d);
void dests_start(struct delivery *d);
/* After the loop ended, connections gone: every destination (what waits
 * stays in the spool). */
void sched_free_dests(struct delivery *d);
/* t is active now (the LRU of eviction). */
void dest_touch(struct dest *t);
/* t's jobs were handed to another worker: with no connection of its own
 * left, it is a husk here, evicted at the next sweep (the moved domain's
 * answer stays in this worker's resolver cache if it comes back). */
void dest_moved(struct dest *t);
/* The destination of domain name and pool (a name id, 0: none), made on
 * first use; NULL without memory. dest_get: pool 0. */
struct dest *dest_get_pool(struct delivery *d, const char *name, uint32_t pool);
struct dest *dest_get(struct delivery *d, const char *name);
/* ... of tls_relaxed mail too (struct dest tls_relaxed). */
struct dest *dest_get_for(struct delivery *d, const char *name, uint32_t pool, bool tls_relaxed);
/* The destination job j goes to. */
static inline struct dest *
dest_of_job(struct delivery *d, const struct job *j)
{
    return dest_get_for(d, j->domain, j->owner.pool, j->owner.tls_relaxed);
}
/* Iteration over the destinations of a worker. */
struct dest_iter {
    size_t bucket;
    struct hash_node *cur;
};
struct dest *dest_next(const struct delivery *d, struct dest_iter *it);
/* A job arrives at t (owned): split to the domain's recipients per
 * transaction, queued, and t run. */
void dest_enqueue(struct dest *t, struct job *j);
/* Queue j (owned) at t: last of its tenant's priority, or first with
 * front (put back after a failure). Without memory for a new tenant's
 * sub-queue j is dropped (logged; it stays in the spool for the next
 * start). */
void dest_push(struct dest *t, struct job *j, bool front);
/* Free j, dropped for want of memory (a destination or a queue entry
 * could not be made), with the log line that says so: its recipients
 * stay in the spool, and the next start delivers them. */
void job_lost(struct job *j);
/* The next job of t: the tenants' turns by weight, then priority. */
struct job *dest_pop(struct dest *t);
/* n recipients of t's queued jobs leave it other than by dest_pop (a
 * fairq_iter_remove, a job cut short): t->queued_rcpts follows. */
void dest_unqueued(struct dest *t, unsigned n);
/* j left t's queue (popped, expired, bounced): t's count of the jobs an
 * MX host refused that wait (dest.refused_queued) too. */
static inline void
dest_refused_gone(struct dest *t, const struct job *j)
{
    if (j->nrefused != 0 && t->refused_queued != 0)
        t->refused_queued--;
}
/* Nothing of t is going on at now (monotonic ns): the idle sweep may
 * forget it (what it knows, the MX answer, is in the resolver's cache).
 * A held or suspended destination stays, and one a receiver greylists
 * (t->grey_until): that is state an operator or a receiver set. */
bool dest_evictable(const struct dest *t, uint64_t now);

/* Jobs waiting at t. */
static inline unsigned
dest_queued(const struct dest *t)
{
    return (unsigned)fairq_count(&t->q);
}
/* The weight of tenant at d's destinations ([tenant NAME] weight; 1 for
 * none): a fairq_weight_fn with d as ctx. */
unsigned dest_tenant_weight(void *ctx, uint32_t tenant);
/* No new connection to t for ms. */
void dest_hold(struct dest *t, uint64_t ms);
/* Check t's waiting jobs for expiry every SWEEP_MS while it is held or
 * its connections are all opening (dest.c); armed when one opens. */
void dest_sweep_arm(struct dest *t);
/* Keep o as why t's last address failed, from MX host mx at address addr
 * (each NULL: none; nothing kept without memory: the deferral then gives
 * the generic reason); forget it. */
void dest_last_fail_set(struct dest *t, const struct smtp_outcome *o, const char *mx,
                        const char *addr);
void dest_last_fail_clear(struct dest *t);
/* t's last_reply came from MX host mx at address addr (mx NULL: from no
 * MTA's session; addr NULL: unknown): kept in t->last_reply_at, or
 * forgotten (as when there is no memory for it). */
void dest_last_reply_at(struct dest *t, const char *mx, const char *addr);
/* A lookup started by ops->resolve finished (res: a reference moved in). */
void dest_on_mx(void *arg, struct dns_mx_result *res);
/* res (a reference moved in) answers t's lookup: with no answer, it is
 * t's (dest_set_mx); as a refresh of the one in use, the old one stays
 * when the refresh failed (policy_mx_refresh_keeps), res takes its place
 * keeping what was worked out from it when it names the same hosts
 * (dns_mx_result_same: no churn of site, targets or claim), else it is
 * t's answer as a new one would be. */
void dest_mx_answer(struct dest *t, struct dns_mx_result *res);
/* t's answer is res now (a reference moved in; NULL: none, ask again);
 * the old one is let go, and what was worked out from it. */
void dest_set_mx(struct dest *t, struct dns_mx_result *res);
void dest_limit_conf(const struct domain_policy *pol, struct limit_conf *lc);
/* The port t delivers to: its route's, or [delivery] remote_port. */
unsigned dest_port(const struct dest *t);

/* ---- outbound/dest_fail.c: a destination's waiting jobs failed together ---- */

/* Every job waiting at t fails with o (ops->fail); one whose message could
 * not be read just then (ops->fail kept it) waits at t again, in its
 * place, and t runs again after HOLD_MIN_MS. At most FAIL_TURN_RCPTS
 * recipients fail in one turn of the worker: the jobs left fail with a
 * copy of o (and where, when o is t->last_fail's) on the next turn
 * (dest_fail_more). */
void dest_fail_each(struct dest *t, const struct smtp_outcome *o, enum classify_source src);
/* The jobs dest_fail_each left for this turn fail (t->fail_more). */
void dest_fail_more(struct dest *t);
/* Every waiting job of t fails as f says, with text as the reply (f's own
 * when NULL). */
void dest_fail_all(struct dest *t, const struct policy_fail *f, const char *text);
/* Every waiting job of t fails with f's outcome, told where f says (MX
 * host, address, source, TLS), untried (its attempts stay) or not; t's
 * own last failure stays. False: no memory for it, nothing failed. */
bool dest_fail_where(struct dest *t, const struct dest_fail *f, bool untried);
/* t's site rests because every address failed for another of its
 * domains (f): t's waiting mail is deferred with that failure, untried. */
void dest_fail_as_site(struct dest *t, const struct dest_fail *f);
/* t could not open a connection for a reason of this node (why): with
 * none of t open its waiting jobs are deferred with the cause; either way
 * t is held (policy_all_failed_hold). */
void dest_open_failed(struct dest *t, const struct open_fail *why);

/* ---- outbound/scheduler.c ---- */

/* The worker's sites (counting per address in the node's table shared,
 * or in their own when NULL) and destinations; -ENOMEM. */
int sched_init(struct delivery *d, struct site_addrs *shared);
/* On the worker's thread: the eviction sweep starts. */
void sched_start(struct delivery *d);
/* The worker stops: timers and lookups of the destinations go now. */
void sched_stop(struct delivery *d);
/* ... and the leases, now rather than after their ttl (the loop turns). */
void sched_release_leases(struct delivery *d);
/* After the limiter was freed: the [mx] keys, the sites. */
void sched_fini(struct delivery *d);

/* The scheduler's one decision point (see scheduler.c). */
void dest_run(struct dest *t);
/* Is t suspended, by the operator or with its pool? */
bool dest_paused(const struct dest *t);
/* What sched_conn.c uses of a destination's state too: */
/* t's mail waits for message tokens until retry_at (UINT64_MAX: now), a
 * wait more connections would not shorten. */
void dest_rate_wait(struct dest *t, uint64_t retry_at);
/* Did a message rate hold t back within the last RATE_BOUND_NS? */
bool dest_rate_bound(const struct dest *t);
/* No new connection of site for ms: every address failed for one of its
 * domains (failed: how the last one did), or a 421 (failed NULL). */
void site_hold_set(struct delivery *d, struct site *site, uint64_t ms, const char *why,
                   const struct dest_fail *failed);
/* t's answer expired with connections of t open: asked again in the
 * background, its mail going on over the old one meanwhile. */
void dest_mx_refresh(struct dest *t);
/* May t open no connection now: at its max_connections, its site's
 * window full, or its [mx] section's cap? */
bool detour_no_room(struct dest *t);

/* ---- outbound/site_share.c: a site's connections shared by its domains ---- */

/* The pattern of the [mx] section with rollup = yes that stands for MX
 * host h in a site's key (site_share.c), NULL when none does. */
const char *site_rollup_name(const struct config *cfg, const struct dns_mx_host *h);
/* t joins the site its answer names (once per answer; MX rollup). */
void dest_site(struct dest *t);
/* The TLS a connection to MX host mx must be opened under to carry t's
 * mail: t's policy, or TLS_KEY_DANE for a host with validated TLSA. */
#define TLS_KEY_DANE (-1)
int dest_tls_key(const struct dest *t, const char *mx);
/* Does t's answer name c's MX host (or roll it up)? Not after a refresh
 * moved t to other hosts. */
bool dest_names_mx(const struct dest *t, const struct conn *c);
/* t waits for a connection of its site, in its line by turn tag, then
 * the age of its next mail. */
void want_push(struct dest *t);
/* A transaction of t starts: one more of its site's turns. */
void site_turn_taken(struct dest *t);
/* t had nothing queued and has mail again, or joined its site: its turn
 * tag catches up with the site's clock. */
void site_turn_join(struct dest *t);
/* t's turn tag back to tag (its queue emptied and filled again at once). */
void site_turn_restore(struct dest *t, uint64_t tag);
/* t leaves its site's list of destinations waiting for a connection. */
void dest_want_remove(struct dest *t);
/* Hand connection c to t, a domain of its site: false when c may not
 * carry t's mail or t's max_connections refuse the lease. */
bool conn_move(struct conn *c, struct dest *t);
/* A waiting domain of c's site, c moved to it; NULL: none can take it. */
struct dest *conn_take_waiting(struct conn *c);
/* After a transaction of t with more to send: the waiting domain of the
 * site t owes a turn, c moved to it; NULL: c stays with t. */
struct dest *conn_give_turn(struct conn *c, struct dest *t);
/* Room at site s, or its rest ended: the domains waiting for it run. */
void site_wake(struct delivery *d, struct site *s);

/* ---- outbound/mx_address.c: the address a new connection goes to ---- */

/* The next address of t's answer at its failover cursor; false when
 * every address has failed in a row. */
bool dest_address(struct dest *t, const struct dns_mx_host **host, const union dns_addr **addr);
/* A hash of an MX host's name, as a job remembers the hosts that refused
 * it (job.refused_h). */
uint32_t job_host_h(const char *host);
/* Did MX host refuse j in this attempt for a lack of its own
 * (policy_host_refusal)? */
bool job_refused_by(const struct job *j, const char *host);
/* The MX hosts of t's answer with an address mail may go to. */
unsigned dest_hosts(struct dest *t);
/* Has t's answer an address of a host that did not refuse j, not down
 * (site_addr_is_down: a connect to it failed lately)? Where j may go. */
bool dest_elsewhere_up(struct dest *t, const struct job *j);
/* t's failover cursor moved on to the next address of a host that did
 * not refuse j (no failure counted: the host that refused j works);
 * false, the cursor where it was, when there is none. */
bool dest_cursor_past(struct dest *t, const struct job *j);
/* a with t's port. */
void dest_addr_port(const struct dest *t, const union dns_addr *a, union dns_addr *out);
/* a, or for a v4-mapped address its IPv4 one written in *tmp. */
const union dns_addr *dest_addr_unmapped(const union dns_addr *a, union dns_addr *tmp);
/* The address's slot (d->slot_taken), or another address of the same
 * preference with room (*host, *addr changed); false when none has. */
bool dest_address_room(struct dest *t, const struct dns_mx_host **host,
                       const union dns_addr **addr);
/* The slot dest_address_room() took, when no connection opens. */
void slot_give_back(struct delivery *d);
/* The connections t's site may have open by max_connections_per_address
 * (its pool's, at each address): the cap times the addresses of the
 * preference t's failover cursor is at that may be delivered to (not
 * refused as targets, named by its MTA-STS policy); 0: no cap (none
 * configured, no answer, or no such address). At most: the cap is the
 * node's, shared with other sites and workers at the same address. */
unsigned dest_addr_cap(const struct dest *t);
/* A slot of this worker's freed: the destinations that found an address
 * full run, oldest first, until one opens. */
void addr_wake(struct delivery *d);

/* ---- site affinity (outbound/affinity.c) ---- */

/* Is t's domain another worker's now? Then its waiting jobs go there:
 * true. (Not for a pool's destination: pool mail goes by name hash.) */
bool dest_elsewhere(struct dest *t);
/* t has a usable answer: claim its domain for its site's worker, and hand
 * its jobs over if that is another (true), as affinity.c says. */
bool dest_affinity(struct dest *t);
/* t's site is busier than one worker should carry alone: mark it. */
void site_mark_busy(const struct dest *t);
/* A token or lease of t was refused: t runs again at retry_at (UINT64_MAX:
 * the limiter's waker will run it). */
void dest_lim_wait(struct dest *t, uint64_t retry_at);
void mx_limit_conf(const struct delivery *d, const struct mx_policy *m, struct limit_conf *lc);

/* ---- outbound/sched_conn.c: connections, as the scheduler sees them ---- */

/* Count c (zeroed but for what its transport set) as t's new connection
 * to a of host h, on t's site: ids, site, epoch, counters, the worker's
 * list. */
void sched_conn_attach(struct conn *c, struct dest *t, const struct dns_mx_host *h,
                       const union dns_addr *a, const struct mx_policy *src, uint32_t src_id);
enum sched_next {
    SCHED_NEXT_JOB,   /* a job to send, for c->dest (which may have changed) */
    SCHED_NEXT_IDLE,  /* nothing now: c is on its site's idle list */
    SCHED_NEXT_QUIT,  /* say goodbye: enough transactions, stopping, or an MX slot is wanted */
};
/* c is ready for a transaction: the job it sends next (of its domain, or
 * of another domain of its site that waits, then c moved there); moves
 * counts those moves across calls of one readiness. */
struct job *sched_conn_next(struct conn *c, unsigned *moves, enum sched_next *what);
/* c's transaction of j ended (c->txn holds its outcome): the site's
 * window learns, and true when j went back to the queue for the next MX
 * address (the policy's failover) rather than to be reported. */
bool sched_txn_done(struct conn *c, struct job *j);
/* c failed before its session (connect refused or timed out) or met a
 * fault of ours: act on the policy's decision. why: the deferral reason
 * to remember, or NULL. */
void sched_conn_event(struct conn *c, enum policy_conn_event ev, const struct smtp_outcome *why);
/* c is gone (its transport freed what it owns; c->job is back in the
 * queue): act on what its end means (session: the machine's outcome, or
 * NULL), release its counts and leases, free c, let what waits go. */
void sched_conn_detach(struct conn *c, const struct smtp_outcome *session);
/* Transactions on c before QUIT: its domain's, or its [mx] or [source]
 * section's, or the server's LIMITS MAILMAX, when lower. */
unsigned sched_conn_max_msgs(const struct conn *c);
/* Recipients per transaction on a new connection of c. */
unsigned sched_conn_max_rcpt(const struct conn *c);
/* (These four are egress.c's, with the [mx] and [source] keys.) */
/* Does a domain of another site of this worker still wait for a slot of
 * c's [mx] or [source] limit? (c idle_short: else it idles on for
 * idle_timeout.) */
bool sched_conn_key_wanted(const struct conn *c);
/* Does c hold a slot of an [mx] or [source] cap shared through [redis],
 * or, without it, counted for the node's workers (idle_poll: it asks
 * every LIMIT_WANT_POLL_MS while idle)? */
bool sched_conn_key_polled(const struct conn *c);
/* Did a limiter elsewhere wait for a slot of c's shared cap, unanswered:
 * with [redis] another worker or node (limits_key_wanted: asks Redis at
 * most every LIMIT_WANT_POLL_MS), without it another worker of this node
 * (its want, node_caps.h)? True once per such waiter: the caller gives
 * c's slot. */
bool sched_conn_wanted_elsewhere(struct conn *c);
/* Ask Redis now (an answer ready at c's first idle step), acting on
 * none; no question for a cap counted for the node (its answer is at
 * hand: sched_conn_wanted_elsewhere). */
void sched_conn_want_ask(struct conn *c);

/* ---- outbound/egress.c: [mx] and [source] limits, sources, shaping ---- */

/* The [mx] limits of t's preferred MX host, looked up once per answer
 * (NULL: none). */
struct mxkey *dest_mxkey(struct dest *t);
/* The [source] limits of a connection from src (a pool's source), or,
 * src NULL, in family fam from [delivery] source_address; NULL: none. */
struct mxkey *src_key(struct delivery *d, const struct mx_policy *src, int fam);
/* t was refused a token or (lease) a connection's lease of k: run again
 * at retry_at, or, at UINT64_MAX, when k has a slot free (mx_on_wake);
 * with [redis] a lease refused with a time waits on k too (Redis's
 * answer runs t), and so does a token refused while k asks Redis for
 * more (limits_key_asking). A lease refused because the cap is full makes an idle
 * connection of this worker owed to t's site give its slot
 * (key_idle_kick). */
void mx_wait(struct mxkey *k, struct dest *t, uint64_t retry_at, bool lease);
/* k has news (a slot, a refill): the destinations waiting on it run. */
void mx_on_wake(void *arg);
/* c goes on its site's idle list; *pc (== c) leaves it: the only places
 * the list changes, so each key c holds counts its idle holders
 * (struct mxkey idle) for mx_wait. */
void conn_idle_push(struct conn *c);
void conn_idle_unlink(struct conn **pc);
/* c, on its site's idle list, leaves it and says goodbye (quit_why why):
 * true; false when it is not on the list. */
bool conn_idle_quit(struct conn *c, const char *why);
/* Does a domain of another site, with mail, wait for a slot of c's key k?
 * 2: one whose site holds fewer of k's connections than c's (c's slot is
 * owed now); 1: only others (after KEY_IDLE_GRACE_MS idle); 0: none.
 * Waiters with no mail left that it passes leave k's list. */
int key_slot_wanted(const struct conn *c, struct mxkey *k);
/* May c (of a pool's source) take another transaction at its site? Not
 * while its source is held or suspended, nor while it is ahead of its
 * weighted share of the transactions of the sources that may send. */
bool source_may_send(struct conn *c);
/* May c take another transaction, as the shaping actions say (applying
 * their rates on the way)? */
bool shaping_may_send(struct conn *c);
/* May c carry t's mail now, as the shaping actions say of t, c's source
 * and c's MX host? When not, t runs again when they may have changed. */
bool shaping_may_move(struct conn *c, struct dest *t);
/* c's source rests at c's site (policy_source_hold); why: for the log. */
void source_hold(struct conn *c, const char *why);

/* The source a new connection of a destination takes. */
struct source_pick {
    const struct mx_policy *src; /* borrowed; NULL: the node's default source */
    uint32_t id;                 /* its name id; 0: the default */
    uint64_t until;              /* none may go: monotonic ns at which to look again */
    bool all_held;               /* ... because every source is held at the site */
    bool other_family;           /* ... because none is of the target's address family */
    /* When the pool's round robin chose (rr_n > 0): the sources it chose
     * among, by index in the pool, and the one it chose; its turn is
     * taken only once a connection opens from it (source_pick_opened). */
    unsigned short rr_set[SITE_SOURCES_MAX];
    unsigned rr_n, rr_pick;
};
/* Choose the source of t's next connection to MX host mx, at an address
 * of family (AF_UNSPEC: any): among its pool's sources of that family
 * with a weight, not suspended, not held at t's site, with warm-up
 * allowance (warmup_left), the one with the fewest transactions and
 * connections for its weight at t's site; where the site cannot tell
 * them apart (none has used it yet, or even counts), the next by the
 * pool's weighted round robin on this worker. Returns 1 with *out (src
 * NULL without a pool), or 0 when none may go now (out->until,
 * out->all_held). */
int dest_source(struct dest *t, const char *mx, int family, struct source_pick *out);
/* A connection of t opened from pk's source: the pool's round robin
 * takes the turn dest_source only looked at (none when it did not
 * choose). Only once per connection: every other call of dest_source
 * (a pick refused by a limit, a second pick for another address, a
 * probe) leaves the round robin as it was. */
void source_pick_opened(struct dest *t, const struct source_pick *pk);
/* Connection c met reply o (a recipient's, or its message's): greylisting
 * (policy_greylisted) makes c's source the one c's destination goes from
 * for POLICY_GREYLIST_STICK_MS (dest_source, source_may_send), so that
 * the retry comes from the address the receiver saw. One source per
 * destination: the last one greylisted. */
void source_note_reply(struct conn *c, const struct smtp_outcome *o);
/* A receiver throttled source src_id (a rate-limited reply) at t's site:
 * it rests there while the pool's others carry on (as a 421 would). */
void sched_source_throttled(struct dest *t, uint32_t src_id, const char *mx, const char *why);
/* A connection from source src_id of t's pool to MX host mx, at an
 * address of family, could not be opened (policy_open_failed: the
 * source's address not on this host, no socket): the source rests at
 * t's site as after a 421, and the pool's others carry on. True when one
 * of them may send there now; false when none may (every source held,
 * or src_id not one of t's site): the caller defers what waits and
 * holds t, as without a pool. */
bool source_open_failed(struct dest *t, uint32_t src_id, const char *mx, int family);
/* Is a (weight wa) a better pick than b (weight wb)? */
bool source_better(const struct site_source *a, unsigned wa, const struct site_source *b,
                   unsigned wb);

/* ---- outbound/scope.c ---- */

enum scope_kind {
    SCOPE_DOMAIN = DELIVERY_SCOPE_DOMAIN,
    SCOPE_TENANT = DELIVERY_SCOPE_TENANT,
    SCOPE_CAMPAIGN = DELIVERY_SCOPE_CAMPAIGN,
    SCOPE_POOL = DELIVERY_SCOPE_POOL,
    SCOPE_SOURCE = DELIVERY_SCOPE_SOURCE,
};

/* One suspension by an operator. */
struct scope_susp {
    enum scope_kind kind;
    uint32_t id;              /* the name's id; for a domain, 0 and domain set */
    char domain[256];
    uint64_t until;           /* monotonic ns; UINT64_MAX: until resumed */
};

/* Counters of one tenant, pool or source. */
struct owner_count {
    struct hash_node node;    /* first */
    uint32_t id;
    uint64_t delivered, deferred, bounced, connections;
    /* A pool's only (SCOPE_POOL): the smooth weighted round robin that
     * picks between its sources where a site's own counts cannot tell
     * them apart (dest_source, source_rr_peek, source_pick_opened). */
    int64_t *rr;                      /* owned: one per source of rr_for; NULL: none yet */
    const struct pool_config *rr_for; /* compared only: the [pool] rr is of; NULL
                                       * after a reload (pool_rr_forget) */
};

void scope_init(struct delivery *d);
void scope_fini(struct delivery *d); /* after the loop: parked jobs freed (the spool has them) */
/* Is id (of kind; not a domain) suspended at now (monotonic ns)? */
bool scope_suspended(const struct delivery *d, enum scope_kind kind, uint32_t id, uint64_t now);
/* Is the domain suspended, in every pool? */
bool scope_domain_suspended(const struct delivery *d, const char *domain, uint64_t now);
/* j (just taken from its queue, owned) belongs to a suspended tenant or
 * campaign: it is set aside (true, j no longer the caller's), or not. */
bool scope_job_parked(struct delivery *d, struct job *j);
/* j (just taken from t's queue for a connection to MX host mx, owned)
 * belongs to a tenant that a shaping action names at mx's group: it is
 * set aside (true) until a suspension ends or is cleared (looked at every
 * second) or until its tenant's rate lets it go, or bounced (true, as an
 * operator's bounce), or neither (false: it goes). When it goes on its
 * tenant's shaped rate, *key and *g say the token taken (for
 * limits_give_msgs, should it not go after all: a warm-up allowance
 * spent); else *key is NULL. */
bool scope_job_shaped(struct delivery *d, struct dest *t, struct job *j, const char *mx,
                      struct limit_key **key, struct limit_grant *g);
/* The parked jobs by destination, for delivery_domains (their jobs are on
 * no destination's queue): one run per (domain, pool, tls_relaxed), in
 * scope_parked_cmp's order, with its jobs' count and oldest message. *v:
 * malloc'ed, the caller frees; NULL and *n 0 when none or no memory. */
struct parked_run {
    const char *domain; /* borrowed: a parked job's, valid until the loop turns */
    uint32_t pool;
    bool tls_relaxed;
    bool seen;          /* the caller's: a destination showed it */
    unsigned n;
    uint64_t oldest_ms; /* Unix ms of its oldest message */
};
void scope_parked_runs(const struct delivery *d, struct parked_run **v, size_t *n);
/* j (owned) is set aside on d->parked, or n of a parked job's recipients
 * leave it (its taking off the list is the caller's): the count of
 * parked recipients follows. */
void scope_park(struct delivery *d, struct job *j);
void scope_unpark(struct delivery *d, unsigned n);
/* Count again the recipients waiting at destinations an operator
 * suspended (d->paused_rcpts; dest_push and dest_unqueued follow it
 * between): at each suspension's start and end, and at each sweep for
 * eviction. A walk of the destinations, only while a suspension holds. */
void scope_count_paused(struct delivery *d);
int scope_parked_cmp(const void *a, const void *b);
/* A tenant rate's key that jobs were parked for while it asked Redis has
 * news: those jobs are looked at again now, not at the request's
 * timeout, when the token its answer booked would have lapsed. */
void scope_rate_answer(struct delivery *d);
/* Does a shaping bounce action apply to j's recipients at t (a domain's,
 * a group's of t's preferred MX host, j's tenant's there)? */
bool sched_shaping_bounces(struct dest *t, const struct job *j);
/* The limiter key of a shaping rate on who ("SOURCE", "tenant:T") at
 * destination group ("shape:WHO@GROUP"), made on first use (NULL: no
 * memory or a name too long); given its rate by sched_shape_rate. */
struct mxkey *sched_shape_key(struct delivery *d, const char *who, const char *group);
/* k at permille of t's configured message rate and at most one message
 * per interval_ns (split between the workers without Redis); 0, 0 lifts it. */
void sched_shape_rate(struct delivery *d, struct mxkey *k, const struct dest *t,
                      unsigned permille, uint64_t interval_ns);
/* The counters of id in kind's table, made on first use; a static dummy
 * without memory (never NULL). */
struct owner_count *owner_count(struct delivery *d, enum scope_kind kind, uint32_t id);
/* The counters of source id (0: a dummy). */
struct owner_count *source_count(struct delivery *d, uint32_t id);
/* The round robin state of t's pool on this worker (owner_count.rr): one
 * count per source of t->poolc, in its order; NULL without a pool or
 * memory. Owned by the pool's owner_count: valid until the next pool_rr
 * for another [pool] of that name (a reload), which frees it. */
int64_t *pool_rr(struct delivery *d, const struct dest *t);
/* After a reload: every pool's round robin starts again at its next use
 * (rr_for is compared only, and a freed [pool]'s address may be given to
 * another, with more sources). */
void pool_rr_forget(struct delivery *d);

/* ---- outbound/targets.c ---- */

/* Read this host's interface addresses (again), for listeners on a
 * wildcard address (without them only the listeners' own addresses are
 * known): when the worker's delivery is made and on each reload; the
 * list read before stays when they cannot be read. */
void targets_local_load(struct delivery *d);
/* At most this often, an address not among them on a wildcard
 * listener's port has them read again (one added since: DHCP, a new
 * egress address). */
#define TARGETS_LOCAL_REREAD_NS 10000000000ULL
/* Why a (on port) is refused as a delivery target ("loopback", "this
 * node's own listener", ...), or NULL: it may be delivered to. */
const char *target_refused(struct delivery *d, const union dns_addr *a, unsigned port);
/* The addresses of t's answer that may be delivered to, counted once per
 * answer. With none, t->last_fail says why and t->refused_self whether it
 * is a loop. */
unsigned dest_targets(struct dest *t);

/* ---- outbound/connection.c ---- */

/* Open a connection (an outbound_ops open). */
struct conn *conn_open(struct dest *t, const struct dns_mx_host *host, const union dns_addr *addr,
                       const struct mx_policy *src, uint32_t src_id, struct open_fail *why);
/* An idle connection starts its next transaction (an outbound_ops resume). */
void conn_resume(struct conn *c);
void conn_close(struct conn *c, const char *why);
/* The stop: close c, and log event=transaction_cut when a job was in
 * flight on it (at the dot, once it is known whether the dot left). */
void conn_stop_cut(struct conn *c);
/* Keep in f (t's last failure, from c) the source address c left from
 * ("" when none was bound and it never connected) and the TLS c had: its policy, the protocol
 * and cipher of a completed handshake, the certificate check. */
void conn_fail_note(const struct conn *c, struct dest_fail *f);
/* Say goodbye (QUIT) after what is in flight. */
void conn_quit(struct conn *c);
/* After the loop ended: free c whatever is in flight. */
void conn_free(struct conn *c);
/* The worker's provided receive buffers (delivery_start / _free). */
void conn_bufs_init(struct delivery *d);
void conn_bufs_fini(struct delivery *d);
/* A free list of equal buffers (struct pool). */
void *conn_pool_get(struct pool *p);
void conn_pool_put(struct pool *p, void *b);
/* Free the buffers p kept that nobody took since the last call (the
 * fewest it held free in between): kept for a burst while bursts come,
 * given back within two calls once they stop. Returns how many. */
unsigned conn_pool_decay(struct pool *p);
void conn_pool_fini(struct pool *p);

/* ---- outbound/outcome.c ---- */

/* Report the outcome of every recipient of j (from the transaction rc, or
 * one outcome for all) to the spool, the logs and the sender (DSN). */
void job_finish(struct delivery *d, struct dest *t, struct job *j,
                const struct queue_envelope *env, const struct smtp_client_rcpt *rc,
                const struct smtp_outcome *all, const struct outcome_where *where);
/* A reply o (not a delivery) from MX host mx to source src_id (0: the
 * default) for t: the shaping rules may start an action (shaping.h). */
void outcome_shaping(struct delivery *d, struct dest *t, const char *mx, uint32_t src_id,
                     uint32_t tenant, const struct smtp_outcome *o);
/* Every recipient of j (owned: freed) fails with o, without a session
 * (an outbound_ops fail); none that is no longer in the spool (done
 * meanwhile: told once already). When o is t's last failure
 * (&t->last_fail->o), its MX host, address and TLS are the outcome's. */
bool job_fail(struct delivery *d, struct dest *t, struct job *j, const struct smtp_outcome *o,
              enum classify_source src);
/* The end of a pass of dest_fail_each: the envelope it kept is freed. */
void job_fail_pass_end(struct delivery *d);
/* An outcome for a whole job from a policy verdict, text the reply. */
void job_outcome(struct smtp_outcome *o, const struct policy_fail *f, const char *text);
/* o->text: what (why j ends without a try now: an expiry, an operator's
 * bounce), then the last reply its recipients were deferred with, if one
 * was (the first that has one in env, which may be NULL: a job's
 * recipients share a domain and mostly a reply), so that the DSN and the
 * log say why it never went. */
void job_last_attempt_text(struct smtp_outcome *o, const char *what,
                           const struct queue_envelope *env, const struct job *j);
/* When the recipients of id give up. */
uint64_t job_expire_ms(const struct domain_policy *pol, const struct queue_envelope *env,
                       uint64_t id);
/* Take out of j (one message's recipients) those whose final outcome
 * (delivered, bounced) is not durable yet: told already. Returns how
 * many. */
unsigned outcome_pending_drop(const struct delivery *d, struct job *j);
/* j (dsn_flush) came due: the DSN of its message's held failures ([bounce]
 * dsn_wait), committed with their removal; j is freed. */
void outcome_held_due(struct delivery *d, struct dest *t, struct job *j);
/* Outcome commits waiting to be tried again: their timers out of the
 * worker's heap (delivery_free), then the batches freed (logged). */
void outcome_retrying_cancel(struct delivery *d);
void outcome_retrying_free(struct delivery *d);
/* The stop's wait for the spool's answers was cut (delivery_free): each
 * outcome still with the spool logged, event=outcome_unanswered, by
 * message id and recipient. Returns how many. */
unsigned outcome_pending_log(const struct delivery *d);
/* Delay warnings waiting for a time (outcome_delay.c): their timers out
 * of the worker's heap, then freed (the next start's outcomes send them). */
void outcome_delay_cancel(struct delivery *d);
void outcome_delay_free(struct delivery *d);

/* ---- engine/delivery.c: between the engine and the outbound side ---- */

/* d's fields of what the outbound side uses of the engine (struct
 * delivery), taken from d->e now. */
void delivery_env_take(struct delivery *d);
/* The engine's MTA-STS store, NULL: off. Asked each time: a reload may
 * start it after the workers took the new config up. */
struct mta_sts *delivery_mta_sts(const struct delivery *d);
/* A reference to the engine's client TLS context (a reload may swap it:
 * its CAs), NULL: none; whether there is one. */
struct tls_ctx *delivery_tls_client(struct delivery *d);
bool delivery_tls_on(const struct delivery *d);
/* A DSN made here, durable in the spool: to the worker its recipient's
 * domain goes from (delivery_submit_local). */
void delivery_submit_dsn(struct delivery *d, uint64_t id, const char *rcpt, const char *tenant,
                         const char *pool, const char *campaign);
/* A sweep of d's destinations freed about bytes: the heap's free pages
 * go back to the system when the engine's counters of every worker's
 * sweeps say so (delivery.c). */
void delivery_trim(struct delivery *d, size_t bytes, uint64_t now);

/* ---- engine/delivery.c ---- */

/* Draining, no connection left and no request with the spool: tell the
 * engine, once. */
void drain_check(struct delivery *d);
/* Stopping, and the resolver and every connection are gone: end the loop. */
void delivery_check_done(struct delivery *d);

/* ---- engine/delivery_due.c ---- */

/* The due poll's timer, made (delivery_new), and armed for its first
 * look (delivery_start, worker 0); delivery.c cancels it. */
void delivery_due_init(struct delivery *d);
void delivery_due_start(struct delivery *d);

#endif
