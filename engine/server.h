/*
 * server: the SMTP submission server (RFC 5321 / 6409) on a worker's ring.
 * Each worker has its own SO_REUSEPORT listening socket per configured
 * address, its own sessions and its own completion port on the spool.
 *
 * Threading: server_worker_new/_free run on the main thread while the
 * worker is not running; server_worker_start runs on the worker's thread
 * (posted as a message); everything else happens on the worker's thread.
 */
#ifndef SLUICE_ENGINE_SERVER_H
#define SLUICE_ENGINE_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/stats.h"

struct config;
struct engine;
struct worker;
struct server_worker;

struct server_stats {
    uint64_t accepted;      /* connections */
    uint64_t refused;       /* connections over a limit */
    uint64_t sessions;      /* open now */
    uint64_t messages;      /* queued (250 sent) */
    uint64_t recipients;    /* of the messages queued */
    uint64_t rejected;      /* messages refused after DATA */
    uint64_t rcpt_suppressed; /* recipients refused at RCPT: on the suppression list */
    uint64_t auth_ok, auth_failed;
    uint64_t dkim_signed;   /* messages signed */
    uint64_t dkim_unsigned; /* with keys configured, sent unsigned: no key, no From:, ... */
    uint64_t dkim_failed;   /* refused with 451: signing failed or its queue was full */
    uint64_t auth_refused_address; /* AUTH refused: the address failed too often */
    uint64_t auth_refused_user;    /* AUTH refused: the name failed too often */
    uint64_t auth_busy;            /* AUTH answered 454: no room for another hash */
    uint64_t auth_coalesced;       /* AUTH answered by another session's hash (same
                                    * credentials under way on this worker) */
    /* the bounce listener ([bounce] listen, engine/oob.h) */
    uint64_t oob_messages;         /* messages accepted and parsed */
    uint64_t oob_events;           /* oob_bounce and complaint events logged */
    uint64_t oob_dropped;          /* messages that gave no event (auto-replies, ...) */
    uint64_t oob_refused;          /* recipients refused: forged tokens, not ours */
};

#define SERVER_TENANTS_MAX STATS_TENANT_TABLE_MAX /* tenants counted per worker */

/* Copy this worker's per-tenant counts (up to cap) into out; returns how
 * many. Worker thread. */
unsigned server_worker_tenants(const struct server_worker *sw, struct stats_tenant *out,
                               unsigned cap);

/* Before any worker's listeners: is every listen address of cfg
 * (submission, implicit TLS, bounce) free of other processes' listeners?
 * The workers bind with SO_REUSEPORT, which another process of the same
 * user may share unnoticed (a second sluice on the same port would take
 * half the clients); a probe bound without it fails where anyone listens.
 * A port in use is asked again for up to 2 s first: the listeners of a
 * sluice killed a moment ago live until the kernel has torn its io_uring
 * down, after the process is gone. Returns 0 or -EADDRINUSE (or -errno)
 * with err. */
int server_listen_check(const struct config *cfg, char *err, size_t errlen);
/* Make the worker's listening sockets (bound now, so that a port in use is
 * a start-up error) and its spool port. Returns 0 or -errno with err. */
int server_worker_new(struct engine *e, struct worker *w, struct server_worker **out, char *err,
                      size_t errlen);
/* Start accepting; on the worker's thread. */
void server_worker_start(struct server_worker *sw);
/* How long a stop waits, once the loops have ended, for the answers to
 * commits the spool already has (every server of the stop within one such
 * bound: engine.h stop_commit_until). Each comes within a sync: one that
 * has not come in this long is a disk that no longer answers, and the
 * stop goes on without it. */
#define SERVER_STOP_COMMIT_WAIT_MS 30000

/* After the worker's loop ended: wait for the commits the spool still
 * has (after a drain that timed out: each is logged queued with
 * unanswered=stopping, its client got no reply and may retry; the wait
 * is bounded, and cut it logs each message left with the spool and
 * leaves the server to the exit), close sessions and listeners, free.
 * Returns NULL. */
struct server_worker *server_worker_free(struct server_worker *sw);
/* After a reload: the new [server] settings (limits, timeouts, AUTH
 * policy) and the new TLS context (certificate, protocols) for sessions
 * from now on. Worker thread. */
void server_worker_reconfigure(struct server_worker *sw);
/* SIGTERM: stop accepting (the listeners are shut down); sessions open
 * go on until the engine stops. within_ms: what the drain has
 * (UINT64_MAX: not bounded); a last reply leaving (a session closing)
 * has no longer. Any thread. */
void server_worker_drain(struct server_worker *sw, uint64_t within_ms);
/* Draining: may the worker's drain be done as far as its sessions go?
 * Not while a message whose content ended is being signed or committed,
 * nor while a last reply (a 250 for such a message, a 421 for the stop)
 * is leaving: their clients are answered first, within drain_timeout.
 * True when none is. The server is sealed as soon as no message is
 * being signed or committed (last replies may still be leaving): from
 * then on a message whose content ends is refused (421: nothing is
 * stored that the loop's end could leave unanswered; logged once,
 * event=drain_sealed). When it says false, the server calls
 * delivery_drain_recheck() once the last of them is done. Worker
 * thread. */
bool server_worker_drain_seal(struct server_worker *sw);
void server_worker_stats(const struct server_worker *sw, struct server_stats *out);
struct owner;
/* Call fn with each session's message owner (owner.h; zeroed between
 * messages), for the configs they point into (config_holders.c). Worker
 * thread. */
void server_worker_each_owner(const struct server_worker *sw,
                              void (*fn)(const struct owner *o, void *arg), void *arg);

/*
 * Sessions without a socket, for harnesses (tests/fuzz/fuzz_session.c):
 * the same state machine, commands, DATA and BDAT handling, fed from a
 * buffer instead of the ring, its replies copied out instead of sent.
 * The worker needs only its timer heap (deadlines are armed, never
 * fired); the engine only its config, users lock and body budget: a
 * message's commit is not sent to any spool, its completion comes at once
 * with the harness's code, and nothing is handed to delivery.
 * Free the worker with server_worker_free().
 */
struct session;
struct server_worker *server_worker_new_detached(struct engine *e, struct worker *w);
/* A session from 127.0.0.1, greeted; NULL when out of memory. */
struct session *server_session_new_detached(struct server_worker *sw);
/* Hand in[0..len) to the session in reads of at most read_max octets (0:
 * as many as its buffer takes), completing each commit with commit_rc (0
 * or a queue error). Copies the replies into out (up to cap; the rest is
 * dropped) and returns their length. Sets *closed when the session ended:
 * it is freed then. */
size_t server_session_feed(struct session *s, const char *in, size_t len, size_t read_max,
                           int commit_rc, char *out, size_t cap, bool *closed);
/* Close and free a session that did not end. */
void server_session_end(struct session *s);

#endif
