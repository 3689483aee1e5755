/*
 * delivery: outbound SMTP on a worker's ring. Each destination domain
 * belongs to one worker (delivery_worker_of: the worker of its site, once
 * its MX answer named one; else a hash of its name), which holds its queue of
 * jobs (recipients of one message at that domain), resolves its MX hosts
 * (or its route) through the worker's resolver, and delivers them over the
 * connections of its site (the domains of the worker whose answers name
 * the same MX hosts), within the domain's policy, the site's adaptive
 * window and a cap per MX address. Outcomes go back to the spool as data
 * (delivered, bounced, deferred with the reply).
 *
 * Threading: delivery_submit() from any thread (it posts to the owning
 * worker); delivery_new/_free on the main thread while the worker is not
 * running; everything else on the worker's thread.
 */
#ifndef SLUICE_ENGINE_DELIVERY_H
#define SLUICE_ENGINE_DELIVERY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct engine;
struct worker;
struct delivery;
struct queue_owner;

struct delivery_stats {
    uint64_t delivered, deferred, bounced; /* recipients */
    uint64_t expired;                      /* recipients past max_age (not counted in bounced) */
    uint64_t delivered_tls;                /* recipients delivered over TLS */
    uint64_t dsn_queued;                   /* DSNs committed to the spool */
    uint64_t connections;                  /* opened */
    uint64_t connect_failures;
    uint64_t dane_authenticated;           /* TLS sessions authenticated by TLSA records */
    uint64_t dane_failed;                  /* DANE hosts not used: no STARTTLS, no match,
                                            * TLSA lookup failed */
    uint64_t transactions;
    uint64_t reused;                       /* transactions on a reused connection */
    uint64_t reuse_lost;                   /* of those, lost at their first command by a
                                            * receiver that closed (policy_reuse_lost):
                                            * the job went to another connection */
    uint64_t open;                         /* connections open now */
    uint64_t recv_nobufs;                  /* reads retried: provided buffers all taken */
    uint64_t bufs_out;                     /* session buffers lent now */
    uint64_t sites;                        /* sites now (MX host sets in use) */
    uint64_t dests_evicted;                /* idle destinations forgotten */
    uint64_t handed_over;                  /* jobs handed to another worker with their
                                            * domain (site affinity) */
    uint64_t host_refused;                 /* transactions an MX host refused before MAIL for a
                                            * lack of its own: no 8BITMIME, a smaller SIZE, no
                                            * SMTPUTF8 (policy_host_refusal) */
    uint64_t host_detoured;                /* of those, jobs sent on to the domain's next MX
                                            * host (event=host_refused next=yes) */
    uint64_t site_turns;                   /* connections given by a domain with mail left to
                                            * another domain of its site, its turn
                                            * (outbound/site_share.c conn_give_turn) */
    uint64_t source_holds;                 /* a pool's source held at a site (throttled, or
                                            * a connection from it could not be opened) */
    uint64_t shaping_quits;                /* connections that said goodbye as shaping said */
    uint64_t due_paused;                   /* 1 while due recipients wait in the spool:
                                            * [delivery] active_limit reached (worker 0) */
    uint64_t parked;                       /* jobs set aside now: their tenant or
                                            * campaign is suspended */
};

int delivery_new(struct engine *e, struct worker *w, struct delivery **out, char *err,
                 size_t errlen);
/* On the worker's thread: arm the spool port (and, on worker 0, the poll
 * for deferred recipients that came due). */
void delivery_start(struct delivery *d);
/* Any thread: ask the worker to drop its connections and close its
 * resolver; the worker's loop ends once that is done (this replaces
 * worker_stop() for a worker with a delivery). */
void delivery_stop(struct delivery *d);
/* After the worker's loop ended. Waits for the outcomes the spool still
 * has, up to the stop's bound (engine.h stop_commit_until); past it each
 * is logged (event=outcome_unanswered) and d is left to the exit.
 * Returns NULL. */
struct delivery *delivery_free(struct delivery *d);
void delivery_stats(const struct delivery *d, struct delivery_stats *out);
/* After the loops ended: free m if it is a job that never arrived.
 * Returns whether it was one. */
struct worker_msg;
bool delivery_msg_free(struct worker_msg *m);

/* ---- for operators (engine/ops.c), on the worker's thread ---- */

struct stats_domain;
struct stats_tenant;
/* Copy the worker's per-tenant recipient outcomes (up to cap) into out;
 * returns how many. */
#define DELIVERY_TENANTS_MAX 256 /* = STATS_TENANT_TABLE_MAX: tenants counted per worker */
unsigned delivery_tenants(const struct delivery *d, struct stats_tenant *out, unsigned cap);
/* Append the worker's destinations worth showing (waiting, in flight,
 * connected, suspended, or active in the last 10 minutes) to *out
 * (*n entries of *cap, grown with realloc). Returns 0 or -ENOMEM. */
int delivery_domains(struct delivery *d, struct stats_domain **out, size_t *n, size_t *cap);
/* One site of a worker (outbound/site.h: the MX hosts its domains'
 * answers name, or a route; a pool's sites are its own), as the "sites"
 * view shows it. */
#define DELIVERY_SITE_KEY_MAX 256 /* = SITE_KEY_MAX */
struct delivery_site {
    char key[DELIVERY_SITE_KEY_MAX]; /* "[POOL@]host1,host2:PORT", or "route:host:port" */
    unsigned worker;
    unsigned conns;         /* open or opening */
    unsigned idle;          /* of those, idle on the site's list */
    unsigned window;        /* connections its adaptive window allows now */
    unsigned ceiling;       /* the window's ceiling: its domains' max_connections */
    unsigned addr_cap;      /* max_connections_per_address times its addresses (of its
                             * MX preference it is at: dest_addr_cap); 0: no cap */
    unsigned mx_cap;        /* its [mx] section's max_connections (counted for the node, or
                             * with [redis] for every node); 0: none */
    unsigned limit;         /* what it may have open now: the window, or a cap below it */
    const char *limited_by; /* static: "window", "address_cap" or "mx_cap" */
    unsigned domains;       /* destinations on it */
    unsigned domains_waiting; /* ... waiting for a connection of it */
    uint64_t ready;         /* jobs waiting in its destinations' queues */
    uint64_t inflight;      /* jobs on its connections */
    uint64_t opened;        /* connections opened since the site was made */
    uint64_t failures;      /* connect failures, greeting timeouts, 421s, resets */
    uint64_t shrinks;       /* times its window was halved */
    uint64_t head_us;       /* head latency, MAIL sent to the go for the body: a moving
                             * average (engine/outbound/site.h; 0: none yet) */
    uint64_t head_base_us;  /* ... its least of the last 10 to 20 seconds */
    bool queues;            /* the head latency says its connections queue: its window
                             * does not grow */
};
/* Append the worker's sites to *out (*n entries of *cap, grown with
 * realloc). Returns 0 or -ENOMEM. */
int delivery_sites(struct delivery *d, struct delivery_site **out, size_t *n, size_t *cap);
/* After a reload (engine_reload.c parks the workers while it swaps e->cfg):
 * take up the new domain policies and limits. Worker thread. */
void delivery_reconfigure(struct delivery *d);
/* Suspend or resume a destination (made if unknown, so that a suspension
 * holds for mail not yet arrived). In-flight transactions finish. */
int delivery_suspend(struct delivery *d, const char *domain, bool on);

/* The operator's flush, on this worker: end every rest (the hold of a
 * destination, its site's rest, the site's addresses passed over and its
 * sources' holds) that the destinations of the n domains (sorted by
 * strcmp, lower case), or of every domain when all, wait on, with the
 * holds of the other domains of a site whose rest ends, and run those
 * that have mail. Returns how many of the named destinations rested. */
unsigned delivery_lift_holds(struct delivery *d, bool all, const char *const *domains, size_t n);

/* What an operator suspends, resumes or looks at by. */
enum delivery_scope {
    DELIVERY_SCOPE_DOMAIN,   /* a recipient domain, in every pool */
    DELIVERY_SCOPE_TENANT,
    DELIVERY_SCOPE_CAMPAIGN,
    DELIVERY_SCOPE_POOL,
    DELIVERY_SCOPE_SOURCE,   /* a [source ADDRESS] of a pool, by its address */
    DELIVERY_SCOPE_COUNT
};
/* "domain", "tenant", ... (static). */
const char *delivery_scope_str(enum delivery_scope k);
/* Suspend mail of a scope on this worker, for for_ms (0: until resumed),
 * or resume it (on false). A suspended domain or pool starts no new
 * transaction; a suspended tenant's or campaign's jobs are set aside as
 * they come up and go back to their queues on resume; a suspended
 * source opens no connection and its connections say goodbye after
 * their transaction. In-flight transactions finish. Returns 0 or
 * -ENOMEM, -ENOSPC (too many suspensions: DELIVERY_SCOPES_MAX). */
#define DELIVERY_SCOPES_MAX 256
int delivery_suspend_scope(struct delivery *d, enum delivery_scope k, const char *name, bool on,
                           uint64_t for_ms);

/* Counters of one tenant, pool or source on a worker (recipients; for
 * a source also connections opened). */
struct delivery_owner_stats {
    enum delivery_scope kind; /* TENANT, POOL or SOURCE */
    const char *name;         /* borrowed: e->names, lives as long as the engine */
    uint64_t delivered, deferred, bounced, connections;
};
/* Append this worker's counters to *out (*n of *cap, grown with
 * realloc). Returns 0 or -ENOMEM. */
int delivery_owner_stats(struct delivery *d, struct delivery_owner_stats **out, size_t *n,
                         size_t *cap);
/* The hash of a domain, any case (FNV-1a of its lowercase form). */
uint32_t delivery_domain_hash(const char *domain);
/* Which worker a domain's mail through pool (a name id; 0: none) goes to
 * now: for mail without a pool, the worker its site claimed for it in the
 * route table (outbound/scheduler.c, dest_affinity); else, and for mail
 * through a pool, delivery_domain_hash % workers. Any thread. */
unsigned delivery_worker_of(const struct engine *e, const char *domain, uint32_t pool);
/* "off", "connecting", "connected" or "unreachable" (a static string). */
const char *delivery_redis_state(const struct delivery *d);
struct resolver_stats;
/* The worker's DNS figures; -ENOENT without a resolver. */
int delivery_resolver_stats(const struct delivery *d, struct resolver_stats *out);
/* Live objects: destinations, jobs waiting, jobs in flight. */
void delivery_objects(const struct delivery *d, uint64_t *dests, uint64_t *waiting,
                      uint64_t *inflight);
/* SIGTERM: start nothing new, let transactions in flight finish, QUIT.
 * Any thread. delivery_idle() (worker thread) says when no connection is
 * left. */
void delivery_drain(struct delivery *d);
bool delivery_idle(const struct delivery *d);
/* The worker's submission server let go of the last session that held
 * its drain (server_worker_drain_seal): the drain is done now if no
 * connection is left either. Worker thread. */
void delivery_drain_recheck(struct delivery *d);

/* Who a job's message belongs to, as small ids of the engine's name
 * table (e->names, common/intern.h): stable for the process lifetime, 0
 * for none. The scheduler orders, shares and steers by them; logs and
 * stats turn them back into names. */
struct job_owner {
    uint32_t tenant, pool, campaign;
    uint8_t priority; /* 0..9, higher goes first */
    bool tls_relaxed; /* the message's queue_envelope.tls_relaxed (a TLS report):
                       * a destination of its own, opportunistic TLS only */
};

/* The owner of names (each NULL or "" for none), interned in e->names;
 * a campaign name new past [server] campaign_names gets no id (logged:
 * event=campaign_names_full). Any thread. */
void delivery_owner(struct engine *e, const char *tenant, const char *pool, const char *campaign,
                    unsigned priority, struct job_owner *out);
/* The owner of a recipient read from the spool (queue_rcpt.owner: a due
 * take, a walk): as delivery_owner, and its message's tls_relaxed, so
 * that its job reaches the destination where that message's other jobs
 * are (dest_of_job). Any thread. */
void delivery_owner_of(struct engine *e, const struct queue_owner *o, struct job_owner *out);

/* Hand the recipients idx[0..n) of message id, all at domain, to the
 * worker that owns domain, with the message's owner (NULL: none). Any
 * thread. */
void delivery_submit(struct engine *e, uint64_t id, const char *domain, const unsigned *idx,
                     unsigned n, const struct job_owner *owner);

/* A message this node wrote itself (a DSN, a TLS report), with its one
 * recipient rcpt (index 0), now durable in the spool: to the worker that
 * owns rcpt's domain, as the mail of tenant, pool and campaign (each NULL
 * or "" for none) at no priority; tls_relaxed as the message was stored
 * with (queue_envelope). Any thread. */
void delivery_submit_local(struct engine *e, uint64_t id, const char *rcpt, const char *tenant,
                           const char *pool, const char *campaign, bool tls_relaxed);

/* The same recipients fail now, as a bounce by the operator: spool,
 * logs and DSN as for any bounce. Any thread. */
void delivery_submit_bounce(struct engine *e, uint64_t id, const char *domain,
                            const unsigned *idx, unsigned n, const struct job_owner *owner);

struct shaping_action;
/* A shaping bounce action started (engine/shaping.h's bounce hook; arg:
 * the engine): the deferred recipients of its scope that are not due
 * within a few seconds (those come up for a connection, where they are
 * bounced) are read from the spool and handed to their workers, which
 * bounce them as an operator's bounce where the action applies to the
 * destination (a group's: one of its MX hosts is in the group; a
 * destination whose MX hosts are not known then keeps them until they
 * come up). A source's bounce bounces only what comes up. Blocking: the
 * shaping keeper's thread. */
void delivery_shaping_bounce(void *arg, const struct shaping_action *a);

/* Gathers recipients met in (message id, index) order, as queue_walk()
 * and queue_due() give them, into one job per message and domain. */
struct delivery_batch {
    struct engine *e; /* borrowed */
    uint64_t id;
    char domain[256];
    unsigned idx[256];
    unsigned n;
    struct job_owner owner; /* of message id */
    uint64_t recipients; /* submitted so far */
    uint64_t deferred;   /* seen waiting for their retry (the caller counts) */
    bool bounce;         /* submitted to be bounced (a shaping bounce action's) */
    bool held;           /* what is gathered are failures held for their DSN (outcome.c) */
};
struct queue_rcpt;
/* A queue_rcpt_fn: add r (of message id, with its owner) to the batch
 * (arg). */
int delivery_batch_add(void *arg, uint64_t id, const struct queue_rcpt *r);
/* The reply a recipient held for its message's DSN (DSN_HELD_TAG) got,
 * without the report entry the spool keeps in front of it ("dsn-held
 * STATUS CLASS ..."): the server's text, or our reason; the whole of
 * r->last_reply when it was not written so (outcome_held.c). */
const char *delivery_held_reply(const struct queue_rcpt *r);
/* Submit what is gathered. */
void delivery_batch_flush(struct delivery_batch *b);

#endif
