/*
 * delivery: outbound SMTP on a worker's ring. Each destination domain
 * belongs to one worker (a hash of its name), which holds its queue of
 * jobs (recipients of one message at that domain), resolves its MX hosts
 * through the worker's resolver, and opens, reuses and closes connections
 * to them within the domain's policy. Outcomes go back to the spool as
 * data (delivered, bounced, deferred with the reply).
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

struct delivery_stats {
    uint64_t delivered, deferred, bounced; /* recipients */
    uint64_t expired;                      /* recipients past max_age (not counted in bounced) */
    uint64_t delivered_tls;                /* recipients delivered over TLS */
    uint64_t dsn_queued;                   /* DSNs committed to the spool */
    uint64_t connections;                  /* opened */
    uint64_t connect_failures;
    uint64_t transactions;
    uint64_t reused;                       /* transactions on a reused connection */
    uint64_t open;                         /* connections open now */
    uint64_t recv_nobufs;                  /* reads retried: provided buffers all taken */
    uint64_t bufs_out;                     /* session buffers lent now */
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
/* After the worker's loop ended. Returns NULL. */
struct delivery *delivery_free(struct delivery *d);
void delivery_stats(const struct delivery *d, struct delivery_stats *out);
/* After the loops ended: free m if it is a job that never arrived.
 * Returns whether it was one. */
struct worker_msg;
bool delivery_msg_free(struct worker_msg *m);

/* Hand the recipients idx[0..n) of message id, all at domain, to the
 * worker that owns domain. Any thread. */
void delivery_submit(struct engine *e, uint64_t id, const char *domain, const unsigned *idx,
                     unsigned n);

/* Gathers recipients met in (message id, index) order, as queue_walk()
 * and queue_due() give them, into one job per message and domain. */
struct delivery_batch {
    struct engine *e; /* borrowed */
    uint64_t id;
    char domain[256];
    unsigned idx[256];
    unsigned n;
    uint64_t recipients; /* submitted so far */
};
struct queue_rcpt;
/* A queue_rcpt_fn: add r (of message id) to the batch (arg). */
int delivery_batch_add(void *arg, uint64_t id, const struct queue_rcpt *r);
/* Submit what is gathered. */
void delivery_batch_flush(struct delivery_batch *b);

#endif
