/*
 * ops_int.h: what the files of ops (the stats socket's requests of the
 * running engine, see ops.h) share. Not a public header.
 *
 *   engine/ops.c           running a function on every worker (wcall),
 *                          the commands (suspend, resume, events, warmup,
 *                          shaping, tlsrpt, reload, sites), the stats_ops
 *                          table;
 *   engine/ops_queue.c     the commands on the spool's mail: message,
 *                          queue, flush, bounce;
 *   engine/ops_views.c     the counters of "stats" and /metrics, and the
 *                          "domains" view (with the spool's deferred
 *                          counts);
 *   engine/ops_suppress.c  "suppress": add, remove, check, list, import,
 *                          export, purge.
 *
 * Threading: the stats thread (counters, domains) and the stats command
 * thread (commands, one at a time), concurrently (ops.c says what they
 * share); the *_on_worker functions on each worker.
 */
#ifndef SLUICE_ENGINE_OPS_INT_H
#define SLUICE_ENGINE_OPS_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/json.h"
#include "engine/engine.h"
#include "engine/stats.h"
#include "engine/worker.h"

#define WAIT_MS       2000    /* for the workers' answers */
#define QUEUE_LIST_MAX 10000 /* messages "queue" lists at most */
/* octets of messages "queue" answers at most: N caps messages, and a
 * message may have 1,000 recipients (10,000 of them were 2.5 GB of JSON,
 * built in the stats thread and parsed whole by sluicectl) */
#define QUEUE_LIST_BYTES (8u << 20)
#define RELOAD_WAIT_MS 8000   /* for a reload's outcome (sluicectl waits 10 s) */
#define BOUNCE_WAIT_MS 8000   /* for a bounce's commits, from the command's start */
#define BOUNCE_POLL_MS 20     /* between looks at the spool meanwhile, and at the stop */
#define DEFERRED_TTL  10000   /* ms: per-domain spool counts are reused this long */
#define DEFERRED_SETTLE 1000  /* ms: ... unless deferrals came this recently */
#define FLUSH_BATCH   1000    /* recipients per spool request */
#define FLUSH_WINDOW  4       /* requests in flight: the committer takes them in one commit */
#define FLUSH_STOP_GRACE_MS 1000 /* for the answers in flight once the stop began */

/* ---- running a function on every worker ---- */

struct wcall;
typedef void wcall_fn(struct engine *e, unsigned w, struct wcall *c);

struct wcall_msg {
    struct worker_msg m;
    struct wcall *c;
    unsigned w;
};

struct wcall {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    unsigned pending; /* workers that have not answered */
    unsigned refs;    /* the waiter and each message */
    wcall_fn *fn;
    struct engine *e;
    void *res;        /* owned: per call results, freed with the call */
    void (*res_free)(void *res, unsigned n);
    unsigned n;
    int rc;           /* a worker's failure, 0: none; under lock (wcall_fail, wcall_rc) */
    char arg[256];
    bool flag;
    int kind;         /* enum delivery_scope, for suspend */
    uint64_t for_ms;  /* suspend: 0 until resumed */
    uint64_t total;   /* summed by the workers' calls, under lock */
    struct wcall_msg msgs[];
};

/* ---- calls between the files ---- */

/* ops.c */
/* A call of fn on the workers, not yet run; NULL without memory. */
struct wcall *wcall_new(struct engine *e, wcall_fn *fn);
/* Run c->fn on worker only (every worker when only is -1) and wait.
 * 0, or -ETIMEDOUT when a worker did not answer in time (its answer is
 * then ignored; the call is freed by whoever lets go last). */
int wcall_run(struct wcall *c, int only);
/* Let go of c (its results are freed with the last reference). */
void wcall_unref(struct wcall *c);
/* On a worker, in c->fn: the call failed with rc (the last failure is
 * the answer's). */
void wcall_fail(struct wcall *c, int rc);
/* The workers' failure so far (0: none): after wcall_run, a late
 * worker's too. */
int wcall_rc(struct wcall *c);
/* Is s a domain an operator may name: 1 to 253 octets of letters,
 * digits, '-', '.' and '_'? */
bool domain_arg_ok(const char *s);

/* ops_queue.c: "flush [DOMAIN|scope]", "bounce ...", "queue [N]",
 * "message ID" (sluicectl(1) says what each takes and answers). */
int cmd_flush(struct engine *e, const char *domain, struct json *out, char *err, size_t errlen);
int cmd_bounce(struct engine *e, const char *what, struct json *out, char *err, size_t errlen);
int cmd_queue(struct engine *e, const char *args, struct json *out, char *err, size_t errlen);
int cmd_message(struct engine *e, const char *what, struct json *out, char *err, size_t errlen);

/* ops_suppress.c */
/* "suppress add|remove|check|list|import|export|purge ...". who: never
 * NULL; its fd, if any, is borrowed (the stats server closes it): the
 * file that "suppress import" reads and "export" writes. */
int cmd_suppress(struct engine *e, const char *args, const struct stats_caller *who,
                 struct json *out, char *err, size_t errlen);

/* ops_views.c */
/* The stats_ops callbacks of "stats" (and /metrics) and "domains". */
void ops_counters(void *arg, struct stats_counters *out);
size_t ops_domains(void *arg, struct stats_domain *out, size_t cap);
/* Forget the cached spool counts of "domains" (the engine stops). */
void ops_domains_forget(void);

#endif
