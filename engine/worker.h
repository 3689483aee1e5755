/*
 * worker: one thread, one io_uring ring, one loop. Everything a worker
 * owns (sessions, connections, resolver, timers) is touched only by its
 * thread; other threads reach it through worker_post() (a mailbox drained
 * on the worker, woken through an eventfd read that stays armed on the
 * ring).
 *
 * Ops: every SQE's user_data points at a struct op embedded in its owner.
 * The loop's one dispatcher (worker.c) switches on op->kind; kinds owned by
 * other modules carry a completion callback. cqe->res < 0 is -errno. An
 * owner with ops in flight must not be freed until their completions came
 * back (STYLE rule 7: count them, cancel, free on the last completion).
 *
 * Each loop turn: fire due timers, submit everything queued, wait for at
 * least one completion or the next deadline, dispatch every completion
 * (none once the stopping flag is set, not even the rest of the batch).
 * A ring error ends the loop for good: see on_failed below.
 */
#ifndef SLUICE_ENGINE_WORKER_H
#define SLUICE_ENGINE_WORKER_H

#include <liburing.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/clock.h"
#include "engine/timer.h"

struct worker;
struct op;

enum op_kind {
    OP_NONE = 0,
    OP_WAKE,     /* the worker's own eventfd read: drain the mailbox */
    OP_DEADLINE, /* the worker's timeout op: the earliest timer is due */
    OP_CALLBACK, /* owned elsewhere: op->done handles the completion */
};

typedef void op_done_fn(struct worker *w, struct op *op, int res, uint32_t flags);

struct op {
    uint8_t kind;    /* enum op_kind */
    op_done_fn *done; /* OP_CALLBACK */
};

/* A message to a worker, embedded in whatever the sender hands over. fn
 * runs on the worker's thread and owns m from then on. */
struct worker_msg {
    struct worker_msg *next;
    void (*fn)(struct worker *w, struct worker_msg *m);
};

/* A turn is busy from the end of its wait to just before the next
 * (completions, mailbox messages, timers; not the write of its log lines
 * nor the submit, which come after, so that a slow turn's own line goes
 * out with it): while it lasts, nothing else of the worker runs, not its
 * submission sessions' replies either. One this long is slow (counted), and one longer than
 * WORKER_SLOW_LOG_MS is logged (event=slow_turn, at most once every
 * WORKER_SLOW_LOG_EVERY_MS a worker, with the slow turns since). */
#define WORKER_SLOW_TURN_MS      100u
#define WORKER_SLOW_LOG_MS       500u
#define WORKER_SLOW_LOG_EVERY_MS 10000u
/* Timers a turn fires for at most this long (and one more callback). */
#define WORKER_TIMER_SLICE_MS    20u

struct worker_stats {
    uint64_t loops;      /* loop turns */
    uint64_t cqes;       /* completions dispatched */
    uint64_t timers;     /* timers fired */
    uint64_t msgs;       /* mailbox messages handled */
    uint64_t slow_turns; /* turns busy at least WORKER_SLOW_TURN_MS */
    uint64_t longest_turn_ns; /* the busiest turn since start */
};

struct worker {
    struct io_uring ring;
    unsigned id;
    char name[16];          /* "w0", "w1", ... for logs */
    void *ctx;              /* borrowed: the daemon's context, lives longer than the worker */
    pthread_t thread;
    bool started;
    bool stopping;          /* loop exits at the end of this turn */
    uint64_t now;           /* CLOCK_MONOTONIC ns, refreshed each turn */
    struct timer_heap timers;
    struct op deadline_op;
    struct __kernel_timespec deadline_ts;
    uint64_t deadline_armed; /* deadline of the timeout op on the ring; UINT64_MAX: none */
    struct worker_stats stats;
    uint64_t slow_logged;    /* monotonic ns of the last slow_turn line; 0: none yet */
    uint64_t slow_logged_at; /* stats.slow_turns then */

    int wake_fd;            /* owned eventfd */
    uint64_t wake_buf;
    struct op wake_op;
    bool wake_armed;
    pthread_mutex_t mbox_lock;
    struct worker_msg *mbox_head, **mbox_tail; /* FIFO of borrowed messages */
    struct worker_msg stop_msg;

    /* Called on the worker's thread when its loop ends on a ring error:
     * nothing will complete on this ring again. NULL: none. */
    void (*on_failed)(struct worker *w, int err);
    bool failed;            /* the loop ended on a ring error */
    /* Tests (SLUICE_TEST_FAIL_RING, read by the engine): the loop fails as
     * on a ring error (-EIO) after this many turns; 0: never. */
    uint64_t fail_after;
};

/* Set up the ring (entries SQEs; the CQ is sized for thousands of
 * connections) and the mailbox. Returns 0 or -errno. */
int worker_init(struct worker *w, unsigned id, unsigned entries, void *ctx);
void worker_fini(struct worker *w);

/* Run the loop on the calling thread until worker_stop() (or the stopping
 * flag) ends it. Returns 0, or -errno when the ring failed (logged as
 * event=ring_failed; w->failed set, then w->on_failed called). */
int worker_run(struct worker *w);
/* Start a thread that runs worker_run(). Returns 0 or -errno. */
int worker_start(struct worker *w);
/* Ask the worker to stop at the end of its current turn; any thread. */
void worker_stop(struct worker *w);
/* Wait for the thread started by worker_start(). */
int worker_join(struct worker *w);

/* Hand m to w; fn runs on w's thread, in posting order. Any thread. */
void worker_post(struct worker *w, struct worker_msg *m);
/* As worker_post() for a chain of messages linked by next (the last's
 * next NULL), kept in order, under one lock and at most one wake-up. */
void worker_post_chain(struct worker *w, struct worker_msg *first, struct worker_msg *last);
/* Once the loop has ended and nothing posts any more: take every message
 * whose fn is fn out of the mailbox, unrun (its owner is about to free
 * it). Returns how many. */
unsigned worker_mbox_cancel(struct worker *w, void (*fn)(struct worker *, struct worker_msg *));

/* A free SQE, submitting queued ones first when the SQ is full. Never NULL
 * (panics if the ring is broken). user_data is set to op. */
struct io_uring_sqe *worker_sqe(struct worker *w, struct op *op);

static inline int
worker_timer_arm(struct worker *w, struct timer *t, uint64_t deadline)
{
    return timer_arm(&w->timers, t, deadline);
}

static inline void
worker_timer_cancel(struct worker *w, struct timer *t)
{
    timer_cancel(&w->timers, t);
}

#define MS_TO_NS(ms) ((uint64_t)(ms) * 1000000ULL)

#endif
