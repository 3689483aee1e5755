/*
 * dkim_pool: DKIM signing off the worker loops. A few threads take jobs
 * from one bounded FIFO; a job holds the header section of one message
 * (copied: the session may be closed meanwhile), its body hashes (made on
 * the worker as the body arrived) and the signers to use; a thread hashes
 * the headers, does the private-key operations and posts the job back to
 * its worker's mailbox (worker_post), where done() runs. A burst of RSA
 * signatures therefore waits in the FIFO, never on a worker's loop.
 * Jobs that [dkim] sign_on_worker names (by default those whose every key
 * is Ed25519: a signature costs less than the trip to a thread and back)
 * are signed in dkim_pool_submit on the caller's worker instead, and
 * done() still runs later from that worker's mailbox.
 *
 * Threading: dkim_pool_new/_free on the main thread, with no worker
 * running by the time of _free; dkim_pool_submit from any worker; done()
 * on the submitting job's worker.
 */
#ifndef SLUICE_ENGINE_DKIM_POOL_H
#define SLUICE_ENGINE_DKIM_POOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/workq.h"
#include "dkim/dkim.h"
#include "engine/worker.h"

struct dkim_pool;

struct dkim_job {
    struct worker_msg m;              /* the completion, posted to w */
    struct workq_item q;              /* in the pool's queue (common/workq.h) */
    struct worker *w;                 /* borrowed: where done() runs */
    void (*done)(struct dkim_job *j); /* owns j from then on */
    void *cookie;                     /* borrowed: the submitter's */
    struct dkim_keyring *keys;        /* owned reference: the signers live in it */
    const struct dkim_signer *signers[DKIM_MAX_SIGNERS]; /* borrowed from keys */
    unsigned nsigners;
    uint8_t bh[2][DKIM_HASH_LEN];     /* body hash per enum dkim_canon */
    uint64_t timestamp;               /* t=, Unix seconds */
    char *hdr;                        /* owned: the header section as it will be stored */
    size_t hdr_len;
    /* results */
    int rc;                           /* 0, -ECANCELED (pool stopping) or a dkim code */
    const struct dkim_signer *failed; /* borrowed: the signer that failed */
    char *sig;                        /* owned: the DKIM-Signature fields, when rc == 0 */
    size_t sig_len;
};

struct dkim_pool_stats {
    uint64_t jobs;        /* completed */
    uint64_t signatures;  /* made */
    uint64_t failures;    /* jobs that failed */
    uint64_t refused;     /* submissions refused: FIFO full or stopping */
    uint64_t queued;      /* waiting now */
    uint64_t on_worker;   /* jobs signed on their worker (sign_on_worker) */
    uint64_t sign_ns;     /* time spent signing, all threads */
};

/* Start threads (0: one per core) with a FIFO of queue_max jobs; jobs
 * that on_worker (enum dkim_on_worker) names are signed by their
 * submitter. Returns 0 or -errno with a message in err. */
int dkim_pool_new(unsigned threads, unsigned queue_max, int on_worker, struct dkim_pool **out,
                  char *err, size_t errlen);
/* Finish the jobs waiting (they come back with -ECANCELED, unsigned),
 * join the threads, free. The completions are left in the workers'
 * mailboxes: free them with dkim_pool_msg_free(). Returns NULL. */
struct dkim_pool *dkim_pool_free(struct dkim_pool *p);
/* A new job (zeroed, m.fn set) or NULL. */
struct dkim_job *dkim_job_new(void);
/* Free a job and what it owns. Returns NULL. */
struct dkim_job *dkim_job_free(struct dkim_job *j);
/* Queue j, or sign it here when sign_on_worker says so (then 0, and done()
 * comes from j->w's mailbox all the same). Returns 0, -EAGAIN when the
 * FIFO is full, -ESHUTDOWN when the pool is stopping (j stays the
 * caller's then). Call it on j->w's thread. */
int dkim_pool_submit(struct dkim_pool *p, struct dkim_job *j);
/* A mailbox message left after the loop ended: free it if it is a job's
 * completion. Returns whether it was. */
bool dkim_pool_msg_free(struct worker_msg *m);
void dkim_pool_stats(struct dkim_pool *p, struct dkim_pool_stats *out);

/* Sign on the calling thread, as a job is signed: the signatures of
 * signers[0..n) over the header section hdr[0..hdr_len) (as it will be
 * stored) and the body hashes bh (per enum dkim_canon), appended in
 * order. For messages this node writes itself, off the workers (TLS
 * reports). Returns 0 with *sig (malloc'd, the caller frees it) and
 * *sig_len, or a negative code with the signer at fault in *failed. */
int dkim_pool_sign_now(const struct dkim_signer *const *signers, unsigned n,
                  const uint8_t bh[2][DKIM_HASH_LEN], uint64_t timestamp, const char *hdr,
                  size_t hdr_len, char **sig, size_t *sig_len, const struct dkim_signer **failed);

#endif
