/*
 * workq: one bounded FIFO of work items served by a few threads, for the
 * work a worker loop must not do itself (AUTH's password hashes, RSA DKIM
 * signatures). The caller embeds a struct workq_item in its job and
 * gives the queue what to do with one (ops->run, on a queue thread) and
 * with one that never started when the queue is freed (ops->drop, on the
 * freeing thread); how a finished job gets back to its owner (a worker's
 * mailbox) is the caller's business.
 *
 * A full queue refuses at once (-EAGAIN) rather than letting work pile up;
 * a queue being freed refuses with -ESHUTDOWN. A thread holds the lock
 * only to pop an item, never while running it.
 *
 * Threading: workq_new and workq_free on one thread (the main one);
 * workq_submit and workq_stats from any thread.
 */
#ifndef SLUICE_COMMON_WORKQ_H
#define SLUICE_COMMON_WORKQ_H

#include <stdint.h>

struct workq;

struct workq_item {
    struct workq_item *next; /* borrowed: the next in the queue */
};

struct workq_ops {
    const char *thread_name; /* for the log's thread= field */
    int nice;                /* added to each thread's nice value; 0: as the caller's */
    /* Per-thread scratch, made on the thread before its first item and
     * given to every run; NULL functions: none. thread_init returning
     * NULL is fatal (the thread cannot work). */
    void *(*thread_init)(void *ctx);
    void (*thread_fini)(void *ctx, void *scratch);
    /* Do it, on a queue thread. From here the item is the callee's. */
    void (*run)(void *ctx, struct workq_item *it, void *scratch);
    /* Never started: the queue is being freed (workq_free's thread). */
    void (*drop)(void *ctx, struct workq_item *it);
};

struct workq_stats {
    uint64_t waiting; /* items queued now */
    uint64_t refused; /* submits refused: queue full or stopping */
    unsigned threads;
};

/* Start threads threads (at least one) over a queue of at most max
 * waiting items (at least one). ops is borrowed (static), ctx too: both
 * outlive the queue. Returns 0 or -errno. */
int workq_new(const struct workq_ops *ops, void *ctx, unsigned threads, unsigned max,
              struct workq **out);
/* Stop the threads (items under way finish), join them, and drop every
 * item never started, in queue order. NULL: nothing. Returns NULL. */
struct workq *workq_free(struct workq *q);
/* Queue it. Returns 0, -EAGAIN (full) or -ESHUTDOWN (being freed); on
 * refusal nothing happens to it. */
int workq_submit(struct workq *q, struct workq_item *it);
void workq_stats(struct workq *q, struct workq_stats *out);

#endif
