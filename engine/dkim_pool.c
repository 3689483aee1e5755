/*
 * dkim_pool: the signing threads (see dkim_pool.h), a workq
 * (common/workq.h). A job that sign_on_worker keeps on the worker is
 * signed in dkim_pool_submit itself and its completion posted to the same
 * worker: the caller sees the same contract either way.
 *
 * Threading: as in the header; the counters are under the pool's mutex.
 */
#include "engine/dkim_pool.h"

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"

struct dkim_pool {
    struct workq *q;      /* owned: jobs go back to their submitters */
    pthread_mutex_t lock; /* guards stats */
    int on_worker;        /* enum dkim_on_worker */
    struct dkim_pool_stats stats;
};

static void
job_on_done(struct worker *w, struct worker_msg *m)
{
    struct dkim_job *j = (struct dkim_job *)m;
    j->done(j);
}

struct dkim_job *
dkim_job_new(void)
{
    struct dkim_job *j = calloc(1, sizeof(*j));
    if (j != NULL)
        j->m.fn = job_on_done;
    return j;
}

struct dkim_job *
dkim_job_free(struct dkim_job *j)
{
    if (j == NULL)
        return NULL;
    dkim_keyring_unref(j->keys);
    free(j->hdr);
    free(j->sig);
    free(j);
    return NULL;
}

bool
dkim_pool_msg_free(struct worker_msg *m)
{
    if (m->fn != job_on_done)
        return false;
    dkim_job_free((struct dkim_job *)m);
    return true;
}

int
dkim_pool_sign_now(const struct dkim_signer *const *signers, unsigned n,
              const uint8_t bh[2][DKIM_HASH_LEN], uint64_t timestamp, const char *hdr,
              size_t hdr_len, char **sig, size_t *sig_len, const struct dkim_signer **failed)
{
    /* The fields' room, summed over the signers: a signature holds the
     * names of the fields it signs (h=), never the header text, so a 50 MB
     * header section of Received: lines costs a few KB here, not 100 MB
     * of address space per signer. */
    struct dkim_sig_params ps[DKIM_MAX_SIGNERS];
    size_t cap = 0, used = 0;
    if (n > DKIM_MAX_SIGNERS)
        return -EINVAL;
    for (unsigned i = 0; i < n; i++) {
        const struct dkim_signer *s = signers[i];
        ps[i] = (struct dkim_sig_params){
            .domain = s->domain,
            .selector = s->selector,
            .key = s->key,
            .hdr_canon = s->hdr_canon,
            .body_canon = s->body_canon,
            .headers = (const char *const *)s->headers,
            .nheaders = s->nheaders,
            .oversign = (const char *const *)s->oversign,
            .noversign = s->noversign,
            .timestamp = timestamp,
            .expire = s->expire_s,
        };
        cap += dkim_sig_room(&ps[i], hdr, hdr_len);
    }
    *sig = malloc(cap);
    if (*sig == NULL)
        return -ENOMEM;
    for (unsigned i = 0; i < n; i++) {
        const struct dkim_signer *s = signers[i];
        int rc = dkim_sign(&ps[i], hdr, hdr_len, bh[s->body_canon], *sig, cap, &used);
        if (rc < 0) {
            *failed = s;
            free(*sig);
            *sig = NULL;
            return rc;
        }
    }
    *sig_len = used;
    return 0;
}

/* Every signature of one message, appended in the signers' order. */
static void
job_run(struct dkim_job *j)
{
    j->rc = dkim_pool_sign_now(j->signers, j->nsigners, (const uint8_t(*)[DKIM_HASH_LEN])j->bh,
                          j->timestamp, j->hdr, j->hdr_len, &j->sig, &j->sig_len, &j->failed);
}

static struct dkim_job *
job_of(struct workq_item *it)
{
    return (struct dkim_job *)((char *)it - offsetof(struct dkim_job, q));
}

/* Sign j and hand it back to its worker, counting. */
static void
job_sign(struct dkim_pool *p, struct dkim_job *j, bool on_worker)
{
    uint64_t t0 = clock_mono_ns();
    job_run(j);
    uint64_t spent = clock_mono_ns() - t0;
    pthread_mutex_lock(&p->lock);
    p->stats.jobs++;
    if (on_worker)
        p->stats.on_worker++;
    p->stats.sign_ns += spent;
    if (j->rc == 0)
        p->stats.signatures += j->nsigners;
    else
        p->stats.failures++;
    pthread_mutex_unlock(&p->lock);
    worker_post(j->w, &j->m); /* j is the worker's from here on */
}

static void
sign_run(void *ctx, struct workq_item *it, void *scratch)
{
    (void)scratch;
    job_sign(ctx, job_of(it), false);
}

/* Never started: it goes back cancelled all the same. */
static void
sign_drop(void *ctx, struct workq_item *it)
{
    (void)ctx;
    struct dkim_job *j = job_of(it);
    j->rc = -ECANCELED;
    worker_post(j->w, &j->m);
}

static const struct workq_ops sign_ops = {
    .thread_name = "dkim",
    .run = sign_run,
    .drop = sign_drop,
};

int
dkim_pool_new(unsigned threads, unsigned queue_max, int on_worker, struct dkim_pool **out,
              char *err, size_t errlen)
{
    *out = NULL;
    if (threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        threads = n > 0 ? (unsigned)n : 1;
    }
    struct dkim_pool *p = calloc(1, sizeof(*p));
    if (p == NULL) {
        snprintf(err, errlen, "out of memory for the DKIM signing pool");
        return -ENOMEM;
    }
    pthread_mutex_init(&p->lock, NULL);
    p->on_worker = on_worker;
    int rc = workq_new(&sign_ops, p, threads, queue_max, &p->q);
    if (rc < 0) {
        snprintf(err, errlen, "cannot start the DKIM signing threads: %s", strerror(-rc));
        pthread_mutex_destroy(&p->lock);
        free(p);
        return rc;
    }
    *out = p;
    return 0;
}

struct dkim_pool *
dkim_pool_free(struct dkim_pool *p)
{
    if (p == NULL)
        return NULL;
    workq_free(p->q);
    pthread_mutex_destroy(&p->lock);
    free(p);
    return NULL;
}

/* Whether j is signed on the submitting worker, by [dkim] sign_on_worker. */
static bool
job_on_worker(const struct dkim_pool *p, const struct dkim_job *j)
{
    if (p->on_worker == DKIM_ON_WORKER_ALL)
        return true;
    if (p->on_worker != DKIM_ON_WORKER_ED25519)
        return false;
    for (unsigned i = 0; i < j->nsigners; i++)
        if (dkim_key_alg(j->signers[i]->key) != DKIM_ALG_ED25519_SHA256)
            return false;
    return true;
}

int
dkim_pool_submit(struct dkim_pool *p, struct dkim_job *j)
{
    if (job_on_worker(p, j)) {
        job_sign(p, j, true); /* done() on the next turn of the same loop */
        return 0;
    }
    int rc = workq_submit(p->q, &j->q);
    if (rc < 0) {
        pthread_mutex_lock(&p->lock);
        p->stats.refused++;
        pthread_mutex_unlock(&p->lock);
    }
    return rc;
}

void
dkim_pool_stats(struct dkim_pool *p, struct dkim_pool_stats *out)
{
    struct workq_stats qs;
    workq_stats(p->q, &qs);
    pthread_mutex_lock(&p->lock);
    *out = p->stats;
    pthread_mutex_unlock(&p->lock);
    out->queued = qs.waiting;
}
