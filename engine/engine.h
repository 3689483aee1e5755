/*
 * engine: the running daemon: its config, the spool, the users table, the
 * workers and what each worker runs (the submission server for now). main.c
 * owns one engine and drives it from signals.
 *
 * Threading: engine_start/engine_stop run on the main thread; workers read
 * the engine through their ctx pointer. Fields shared by every worker are
 * either immutable while workers run or atomic/locked as marked.
 */
#ifndef SLUICE_ENGINE_ENGINE_H
#define SLUICE_ENGINE_ENGINE_H

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

#include "engine/auth.h"
#include "engine/config.h"
#include "engine/oob.h"
#include "engine/worker.h"
#include "queue/queue.h"
#include "tls/tls.h"

struct server_worker;
struct dkim_pool;
struct auth_pool;
struct auth_limit;
struct dlog;
struct events;
struct dlog_writer;
struct stats_server;
struct suppress;
struct shaping;
struct intern;

/* Connections per client address, shared by all workers (accepting is
 * not hot enough for anything finer than one lock). */
struct conn_table {
    pthread_mutex_t lock;
    struct conn_slot {
        uint8_t addr[16];
        uint8_t state;  /* empty, live, idle (see engine.c) */
        uint32_t count; /* connections now, when live */
    } *slots;           /* owned, open addressing */
    uint32_t cap;
    uint32_t used;      /* slots ever taken since the last grow */
};

struct route;
struct site_addrs;
struct node_caps;

struct engine {
    /* Replaced whole by a reload while the workers are parked
     * (engine_reload). The first is borrowed (the caller's, kept to the
     * end); each one a reload brings is owned by gens, which frees it
     * once replaced and no thread can reach it any more (config_gen.h:
     * a pointer read a moment earlier stays valid until its reader
     * published that it moved on). */
    const struct config *_Atomic cfg;
    /* borrowed: the config the engine started on (pinned in gens: it
     * lives as long as the engine); what a reload cannot change (the
     * listeners, the workers' resolvers...) runs as it says */
    const struct config *cfg_start;
    /* [server] campaign_names of e->cfg, kept beside it: read by
     * delivery_owner() on any thread (the shaping keeper's bounces too),
     * which must not read a config a reload may free meanwhile. */
    _Atomic unsigned campaign_names;
    /* The workers' destination sweeps (outbound/dest.c, through
     * delivery_trim in delivery.c): octets they freed since the last
     * malloc_trim (an estimate), that count as the last sweep saw it, and
     * when the trim was (monotonic ns). */
    _Atomic size_t freed_untrimmed;
    _Atomic size_t freed_seen;
    _Atomic uint64_t trimmed_at;
    struct config_gens *gens;  /* owned: the configs alive (config_gen.h) */
    struct gens_msg {          /* owned array of nworkers: "say your hold", per worker */
        struct worker_msg m;
        atomic_bool posted;    /* in the worker's mailbox: not posted again */
    } *gens_msgs;
    const struct config *warmup_cfg; /* borrowed: the config warmup's plans point into
                                      * (main thread) */
    struct queue *queue;       /* owned */
    struct suppress *suppress; /* owned: the suppression list; NULL when [suppress] is off */
    struct warmup *warmup;     /* owned: the sources' warm-up plans (warmup.h) */
    struct shaping *shaping;   /* owned: active shaping actions (shaping.h); NULL when
                                * [shaping] is off */
    struct dlog_writer *dlogw_shaping; /* owned: shaping_started/ended events, under
                                        * shaping_dlog_lock; NULL when no delivery log */
    pthread_mutex_t shaping_dlog_lock;
    struct dlog_writer *dlogw_tlsrpt;  /* owned: the MTA-STS thread's, for the receptions of
                                        * TLS reports by mail; NULL when no delivery log */
    struct intern *names;      /* owned: ids of tenants, pools, campaigns and sources
                                * (common/intern.h), for jobs, stats and operations */
    bool warmup_test_hooks;    /* builds with test hooks, SLUICE_TEST_WARMUP_CLOCK set: the
                                * stats socket's "warmup clock" and "warmup take" */
    /* Owned references, replaced by a reload (new certificate, CAs,
     * protocols) under tls_lock while the workers are parked; take one
     * with engine_tls_server() / engine_tls_client(). Connections made
     * from a replaced ctx keep working on it. */
    struct tls_ctx *_Atomic tls_server; /* NULL: no STARTTLS, no implicit TLS */
    struct tls_ctx *_Atomic tls_client; /* NULL: outbound TLS unavailable */
    pthread_mutex_t tls_lock;
    struct auth_db *users;     /* owned reference; NULL: AUTH not offered. Under users_lock:
                                * a reload swaps it while sessions take references */
    pthread_mutex_t users_lock;
    struct auth_pool *auth_pool;   /* owned: the hashing threads of AUTH */
    struct auth_limit *auth_limit; /* owned: failed AUTH per address and user, all workers */
    struct worker *workers;    /* owned array of nworkers */
    struct server_worker **srv; /* owned: the submission server of each worker */
    struct delivery **dlv;     /* owned: the outbound side of each worker */
    struct dlog *dlog;         /* owned: the delivery log, NULL when off */
    struct events *events;     /* owned: event sinks and their journal, NULL when none */
    /* Owned: MTA-STS policies and TLS reports (mta_sts.h); NULL while
     * [delivery] mta_sts or delivery is off. Made at the start, or by the
     * reload that turns it on (stored once the object is whole; never
     * replaced or freed before the stop), so any thread may read it. */
    struct mta_sts *_Atomic mta_sts;
    struct dlog_writer **dlogw; /* owned: one writer per worker (NULL entries when off) */
    struct dlog_writer *dlogw_ops; /* owned: the stats thread's, for operator bounces */
    struct stats_server *stats; /* owned: the stats socket and /metrics, or NULL */
    struct dkim_pool *dkim_pool; /* owned: the DKIM signing threads */
    struct dkim_keyring *dkim_keys; /* owned reference; NULL: nothing signed. Under dkim_lock:
                                     * a reload swaps it while sessions take references */
    pthread_mutex_t dkim_lock;
    /* The last reload's outcome, for `sluicectl reload` (ops.c), which
     * raises SIGHUP and waits for the main thread to say (main.c): */
    pthread_mutex_t reload_lock;
    pthread_cond_t reload_cv;
    uint64_t reload_gen;       /* reloads finished, either way */
    bool reload_ok;
    char reload_why[512];      /* why the last one was refused */
    char reload_changed[1024]; /* what the last one that took changed (config_changes) */
    char reload_kept[512];     /* keys changed since the start that need a restart */
    char reload_users[512];    /* why the last one did not load the users file ("": it did) */
    /* Digests (fs_digest) of the files read again at every reload under
     * the same names, as last loaded: [tls] cert_file, key_file, ca_file,
     * [server] auth_users_file (engine_int.h's enum reread); 0: none. Read
     * and written by the thread that starts and reloads only. */
    uint64_t reread_digest[4];
    uint64_t started_ms;       /* Unix ms */
    unsigned nworkers;
    /* owned: site affinity's route table (route.h: which worker the mail
     * of a domain without a pool goes to); NULL with one worker */
    struct route *route;
    /* owned: connections per MX address, every worker's (outbound/site.h:
     * max_connections_per_address holds for the node) */
    struct site_addrs *site_addrs;
    /* owned: connections under each [mx] and [source] max_connections
     * without [redis], every worker's (node_caps.h) */
    struct node_caps *node_caps;
    _Atomic unsigned clients;  /* submission connections open, all workers */
    _Atomic unsigned bounce_clients; /* the bounce listener's, counted apart: a flood of
                                      * remote MXs there never takes submission's */
    _Atomic unsigned drained;  /* workers whose delivery finished draining */
    _Atomic uint64_t body_bytes; /* bytes of message-body buffers held by submission
                                  * sessions of every worker; bounded by [server]
                                  * body_memory_limit (server_msg.c takes and gives back) */
    _Atomic unsigned failed;   /* workers whose ring failed (the daemon stops) */
    atomic_bool stopping;      /* engine_stop began: an operator's command waiting for
                                * the spool gives up (ops_queue.c flush_wait, bounce_wait),
                                * and one waiting for a reload (engine_reload_wait);
                                * one begun after is not run (ops_command) */
    atomic_bool draining;      /* engine_drain began: the main thread does no reload
                                * from then on, so a command waiting for a reload gives
                                * up (engine_reload_wait); set under reload_lock */
    /* A SIGHUP in the drain or the stop reopens the logs each time but
     * is logged once a second at most (engine_reload.c, hup_ignored):
     * when the next line may go (CLOCK_MONOTONIC ms), and the SIGHUPs
     * taken since the last line and not logged, and whether the last
     * line said the log's reopen failed (one that says otherwise goes at
     * once). The main thread in the drain, the stop's taker of SIGHUP
     * after it: one at a time. */
    _Atomic uint64_t hup_log_next_ms;
    _Atomic unsigned hup_unlogged;
    atomic_bool hup_log_failed;
    bool stop_takes_hup;       /* engine_drain was given signals to wait for (its caller
                                * takes signals, SIGHUP blocked): engine_stop takes
                                * SIGHUP too, by a thread of its own (struct stop_hup,
                                * engine_int.h); main thread */
    uint64_t stop_commit_until; /* CLOCK_MONOTONIC ns: the end of the stop's wait for the
                                 * spool's last commits, one bound for every worker
                                 * (engine_stop sets it, server_worker_free waits); 0:
                                 * not stopping */
    bool stop_cut;              /* a wait of the stop for the spool's answers was cut
                                 * (server_worker_free, delivery_free: the spool did not
                                 * answer by stop_commit_until), or the events pump's
                                 * requests were left with it (events_free_busy);
                                 * main thread */
    bool stop_given_up;         /* ... and the spool did not close within
                                 * STOP_SPOOL_CLOSE_AFTER_CUT_MS either: left to the
                                 * exit, which is ENGINE_EXIT_FAILED */
    struct conn_table per_ip;
    /* The bounce listener's seam to the suppression list (oob.h): set
     * before engine_start (tests), read by the workers; zero: the list's
     * notes, committed with the report (server_msg.c bounce_finish), or
     * events only when [suppress] is off. */
    struct oob_hooks oob;
};

/* Open the spool, load the users, set up and start every worker with its
 * listeners. Returns 0, or a negative code with a message for the operator
 * in err. On failure nothing is left running. */
int engine_start(struct engine *e, const struct config *cfg, char *err, size_t errlen);
/* How a drain ended. */
enum engine_drain_end {
    ENGINE_DRAIN_DONE,      /* everything in flight finished */
    ENGINE_DRAIN_TIMED_OUT, /* timeout_ms ran out */
    ENGINE_DRAIN_CUT,       /* a signal of cut came (another SIGTERM): logged */
};
/* SIGTERM: stop accepting, let outbound transactions in flight finish and
 * start no new ones, for up to timeout_ms; what is left stays queued.
 * Then call engine_stop(). First it sets e->draining (the caller does
 * no reload from then on: engine_reload_draining). Main thread, with the
 * signals of cut (NULL: none) and SIGHUP blocked: one of cut sent by
 * another process ends the wait at once (one this process sends itself,
 * a failed worker's, does not); a SIGHUP (cut not NULL) reloads nothing
 * but reopens the log and the delivery log (a rotation's), logged
 * event=reload_ignored reason=draining, and the drain goes on; and the
 * engine_stop that follows takes SIGHUP the same way to its end
 * (reason=stopping; the delivery log until it closes it). */
enum engine_drain_end engine_drain(struct engine *e, uint64_t timeout_ms, const sigset_t *cut);
/* Stop every worker and wait for them; close the spool; free. Bounded:
 * past SERVER_STOP_COMMIT_WAIT_MS and 30 s more (a spool that answers
 * nothing: a dead disk) it writes what the log's threads kept and the
 * delivery log's lines not yet written (log_flush_all), logs
 * event=stop_stuck and exits the process with ENGINE_EXIT_FAILED. When a
 * wait for the spool's answers was cut already (stop_cut), the spool's
 * close waits STOP_SPOOL_CLOSE_AFTER_CUT_MS at most, not what is left of
 * that bound: past it the spool is left open (event=stop_spool_given_up),
 * the rest of the stop goes on, and stop_given_up says the exit must be
 * ENGINE_EXIT_FAILED. After engine_drain was given signals to wait for
 * (e->stop_takes_hup), a SIGHUP up to the stop's end is taken by a thread
 * of the stop: the log reopened, the delivery log too until the stop
 * closes it, logged event=reload_ignored reason=stopping. */
void engine_stop(struct engine *e);

/* A worker whose ring fails at run time cannot serve its sessions or its
 * listeners again. It logs event=worker_failed, shuts its listeners (the
 * kernel sends new clients to the other workers' sockets, none waits in
 * a backlog nobody serves) and sends the process SIGTERM: main drains the
 * other workers and exits with ENGINE_EXIT_FAILED, so that the supervisor
 * restarts it (Restart=on-failure). Nothing is lost: the spool is
 * durable, and what the failed worker had in flight is retried after the
 * restart. How many workers failed (any thread): */
unsigned engine_failed_workers(struct engine *e);
#define ENGINE_EXIT_FAILED 70 /* EX_SOFTWARE */

/* The configs alive now (config_gens_alive): the current one, the
 * pinned ones, and replaced ones some thread may still read. Any
 * thread. */
unsigned engine_config_generations(struct engine *e);
/* Main thread, after a reload and then now and then while
 * engine_config_pending(): ask each worker for its hold (config_gen.h),
 * and free the configs nobody can reach. */
void engine_config_collect(struct engine *e);
bool engine_config_pending(struct engine *e);
/* A thread outside the workers reads e->cfg only between these
 * (config_gens_enter/_leave). */
uint64_t engine_config_enter(struct engine *e);
void engine_config_leave(struct engine *e, uint64_t token);

/* SIGHUP: reopen the delivery log, reload the users file, and, when ncfg
 * is given (a config read again and valid), run on it from now on: domain
 * policies and limits, TLS policies, [tls] (the server certificate and
 * key, read again even when their paths did not change, CAs, protocols,
 * ciphers: new TLS contexts for new connections), retry schedules,
 * classification, bounce settings, log level. What needs a restart
 * (listeners, workers, spool, [suppress], DNS, stats socket, Redis URL, log paths,
 * the session cache size) is logged as kept. A certificate, key or CA
 * that does not load refuses the whole config (logged; the running one
 * stays). When e->cfg is ncfg afterwards, the engine owns it (freed once
 * replaced and unreachable: engine_config_collect); else it is still the
 * caller's. Main thread. Returns 0, or a negative code when the
 * config or the users file was refused (the old one stays; the errors are
 * logged). */
int engine_reload(struct engine *e, const struct config *ncfg);
/* The main thread, after each SIGHUP: the reload took (ok), or why not
 * (NULL: what engine_reload itself refused for). Wakes engine_reload_wait. */
void engine_reload_done(struct engine *e, bool ok, const char *why);
/* The stop began (e->stopping set just before): wakes engine_reload_wait,
 * which gives up. Main thread. */
void engine_reload_stopping(struct engine *e);
/* The drain begins: sets e->draining and wakes engine_reload_wait, which
 * gives up. Main thread (engine_drain), which takes no SIGHUP from then
 * on. */
void engine_reload_draining(struct engine *e);
/* The reloads finished so far (a generation to wait past). */
uint64_t engine_reload_gen(struct engine *e);
/* A finished reload, as engine_reload_wait tells it. */
struct engine_reload_outcome {
    char why[512];      /* refused: why */
    char changed[1024]; /* it took: what changed, as event=config_reloaded says ("": nothing) */
    char kept[512];     /* it took: the keys that differ from the start's and need a restart
                         * ("server.workers, dns"; "": none) */
    char users[512];    /* it took but the users file did not load (the previous users are
                         * kept): its first error; "": loaded, or none */
};
/* Wait up to timeout_ms for a reload to finish after generation gen.
 * Returns 1 (it took), 0 (refused: out->why says), -ETIMEDOUT, or, when
 * it had not finished as the main thread stopped taking SIGHUP (it never
 * will): -ECANCELED, the stop began (e->stopping); -ESHUTDOWN, the drain
 * began (e->draining) and the stop not yet. A reload finished before
 * either began is told as it went (1 or 0). */
int engine_reload_wait(struct engine *e, uint64_t gen, unsigned timeout_ms,
                       struct engine_reload_outcome *out);
/* A reference to the current users table (NULL when AUTH is off); any
 * thread. Drop it with auth_db_unref(). */
struct auth_db *engine_users(struct engine *e);
/* A reference to the DKIM keys in force (NULL when nothing is signed);
 * any thread. Drop it with dkim_keyring_unref(). The engine holds its own
 * reference, so the caller of engine_reload may drop the one of the
 * config it replaced (config_drop_dkim_keys) and its keys are freed once
 * the last message signed with them is done. */
struct dkim_keyring *engine_dkim_keys(struct engine *e);
/* A reference to the current server / client TLS context (NULL when there
 * is none); any thread. Drop it with tls_ctx_unref(). */
struct tls_ctx *engine_tls_server(struct engine *e);
struct tls_ctx *engine_tls_client(struct engine *e);

/* The key sa counts under: an IPv4 address, or an IPv4-mapped IPv6
 * address as that IPv4 address, as itself; any other IPv6 address as its
 * first v6_prefix bits (a host may own a whole /64 and rotate through
 * it). A session keeps the key it was counted under, so that a reload
 * changing the prefix cannot make it uncount another. */
void conn_table_key(const struct sockaddr *sa, unsigned v6_prefix, uint8_t key[16]);
/* Count a connection under key against max; false when over it. */
bool conn_table_add(struct conn_table *t, const uint8_t key[16], unsigned max);
void conn_table_remove(struct conn_table *t, const uint8_t key[16]);

#endif
