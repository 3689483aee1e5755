/*
 * auth_pool: the threads that run crypt(3) for AUTH, so that a client
 * guessing passwords with a costly hash never stalls a worker loop (its
 * other sessions, its deliveries). A worker hands a job to the pool; one
 * of a few hashing threads runs it and posts it back to that worker's
 * mailbox (worker_post), where the job's function runs on the worker's
 * thread. The queue of waiting jobs is bounded: a full queue refuses at
 * once (the server answers 454 4.7.0) rather than letting work pile up.
 *
 * The hashing threads run at a lower priority (nice +5) than the worker
 * loops: under a flood of AUTH, sessions and deliveries keep the CPU they
 * need and the hashes take what is left.
 *
 * Lifetime: a job is embedded in its owner, which counts it as an op in
 * flight (STYLE rule 7) from auth_pool_submit() until the job's function
 * ran. auth_pool_free() joins the threads: jobs not started are dropped
 * unrun, jobs under way finish and are posted; an owner freed after that
 * takes its completions out of the mailbox (worker_mbox_cancel).
 *
 * Threading: auth_pool_new/_free on the main thread; submit and stats on
 * any thread.
 */
#ifndef SLUICE_ENGINE_AUTH_POOL_H
#define SLUICE_ENGINE_AUTH_POOL_H

#include <stdint.h>

#include "common/workq.h"
#include "engine/auth.h"
#include "engine/worker.h"

struct auth_pool;

struct auth_job {
    struct worker_msg m;   /* m.fn: the completion, run on w */
    struct worker *w;      /* borrowed: outlives the pool's threads */
    struct workq_item q;   /* in the pool's queue (common/workq.h) */
    struct auth_attempt a;
};

struct auth_pool_stats {
    uint64_t hashes[AUTH_SCHEME_COUNT]; /* hashes run, by scheme of the setting */
    uint64_t refused;                   /* submits refused: queue full */
    uint64_t waiting;                   /* jobs queued now */
    unsigned threads;
};

/* Start threads hashing threads with a queue of at most queue_max waiting
 * jobs. Returns 0 or -errno. */
int auth_pool_new(unsigned threads, unsigned queue_max, struct auth_pool **out);
/* Join the threads (see above). Returns NULL. */
struct auth_pool *auth_pool_free(struct auth_pool *p);
/* Queue j (j->m.fn and j->a set up, auth_attempt_start said HASH); when it
 * is done, j->m.fn runs on w. Returns 0, or -EAGAIN when the queue is full
 * (nothing happens to j). Any thread. */
int auth_pool_submit(struct auth_pool *p, struct auth_job *j, struct worker *w);
void auth_pool_stats(struct auth_pool *p, struct auth_pool_stats *out);

#endif
