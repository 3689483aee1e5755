/*
 * engine_int.h: what the files of the engine share (not a public header:
 * engine/engine.c and engine/engine_reload.c include it; everyone else
 * goes through engine/engine.h).
 *
 *   engine/engine.c        start, drain and stop; the users file and the
 *                          TLS contexts loaded; the references any thread
 *                          takes to what a reload replaces;
 *   engine/engine_reload.c a reload: the workers parked, the config
 *                          swapped, what changed and what is kept; the
 *                          configs a reload left alive, collected;
 *   engine/engine_conn.c   the connections per client address (engine.h).
 *
 * Threading: as engine.h says; the functions below run on the main
 * thread (the one that starts and reloads).
 */
#ifndef SLUICE_ENGINE_ENGINE_INT_H
#define SLUICE_ENGINE_ENGINE_INT_H

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"

/* The files read again at every reload even under the same names (a
 * certificate renewed, users added: the files are replaced in place),
 * whose contents config_changes cannot see: their keys as the reload's
 * changed list names them, and the path each has in a config. */
enum reread { RR_CERT, RR_KEY, RR_CA, RR_USERS, RR_COUNT };

/* engine.c */
/* Both TLS contexts of a [tls] section: the client's always, the
 * server's when a certificate is named. Returns 0, or an error with a
 * message for the operator in err (nothing is left made). */
int engine_tls_new(const struct tls_config *tc, struct tls_ctx **server, struct tls_ctx **client,
                   char *err, size_t errlen);
/* The users file loaded into e->users; *changed (may be NULL) says
 * whether it holds other contents than at the last load that took. */
int engine_load_users(struct engine *e, bool *changed, char *err, size_t errlen);
/* Complaints kept under a tenant's tag ("tag:XXXXXXXX") moved to the
 * list of the tenant cfg names (at start and after each reload). */
void engine_suppress_fold_tags(struct engine *e, const struct config *cfg);
/* A reload's MTA-STS: started when n turns it on; the allowed networks
 * of n; settings that need a restart logged as kept (then true). */
bool engine_mta_sts_reload(struct engine *e, const struct config *n);

/* engine_reload.c */
/* The digest of c's file i; 0: none named, or it cannot be read (the
 * load that follows says why). */
uint64_t engine_reread_digest(const struct config *c, enum reread i);
/* A SIGHUP once the drain has begun (engine_drain: reason "draining"):
 * no reload (a config swapped under a stop, for a process about to exit),
 * but the log and the delivery log are reopened, as logrotate's
 * postrotate asks (renamed, then SIGHUP): kept on the renamed file, the
 * drain's and the stop's lines would go where the rotation may have
 * compressed it already. Logged event=reload_ignored. Main thread. */
void engine_hup_draining(struct engine *e, const siginfo_t *si);

/* The stop's taker of SIGHUP: the main thread takes no signal while it
 * runs engine_stop, so a thread of its own does, from the stop's start
 * to its end (engine_stop, when e->stop_takes_hup), as the drain did:
 * the logs reopened (the delivery log until the stop closes it),
 * event=reload_ignored reason=stopping. A SIGTERM or SIGINT then is
 * taken too, and logged (event=signal_ignored reason=stopping): the stop
 * goes on. Owned by engine_stop, on its stack. */
struct stop_hup {
    struct engine *e;  /* borrowed: the one stopping */
    pthread_t th;
    pthread_mutex_t mu; /* guards dlog_closed, and e->dlog's reopen against its close */
    bool had_dlog;      /* there is a delivery log (set before the thread starts) */
    bool dlog_closed;   /* the stop came to the delivery log's close */
    atomic_bool done;   /* the stop came to its end: the wake-up is the last */
};
/* Start the taker; false when it could not start (logged: a SIGHUP then
 * stays pending to the exit, as before). Main thread. */
bool engine_stop_hup_start(struct stop_hup *h, struct engine *e);
/* The stop is about to close the delivery log (e->dlog): from now on a
 * SIGHUP reopens the log only. Main thread. */
void engine_stop_hup_dlog_closes(struct stop_hup *h);
/* The stop's end: the taker woken and joined, and a SIGHUP still
 * pending (come as it ended) taken and logged too. Main thread. */
void engine_stop_hup_end(struct stop_hup *h);

#endif
