/*
 * dkim_pool: the signing threads (see dkim_pool.h). One mutex and one
 * condition variable guard the FIFO; a thread holds the mutex only to pop
 * a job, never while signing. A job that sign_on_worker keeps on the
 * worker is signed in dkim_pool_submit itself and its completion posted
 * to the same worker: the caller sees the same contract either way.
 *
 * Threading: as in the header; the counters are under the mutex.
 */
#include "engine/dkim_pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"

struct dkim_pool {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    struct dkim_job *head, **tail; /* borrowed jobs: their submitters get them back */
    unsigned len, max;
    bool stopping;
    pthread_t *threads; /* owned */
    unsigned nthreads;
    int on_worker; /* enum dkim_on_worker */
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

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Every signature of one message, appended in the signers' order. */
static void
job_run(struct dkim_job *j)
{
    /* h= names every signed field: never longer than the header section
     * (twice that leaves room for its folding and over-signed names). */
    size_t cap = ((size_t)DKIM_SIG_MAX + 2 * j->hdr_len) * j->nsigners, used = 0;
    j->sig = malloc(cap);
    if (j->sig == NULL) {
        j->rc = -ENOMEM;
        return;
    }
    for (unsigned i = 0; i < j->nsigners; i++) {
        const struct dkim_signer *s = j->signers[i];
        struct dkim_sig_params p = {
            .domain = s->domain,
            .selector = s->selector,
            .key = s->key,
            .hdr_canon = s->hdr_canon,
            .body_canon = s->body_canon,
            .headers = (const char *const *)s->headers,
            .nheaders = s->nheaders,
            .oversign = (const char *const *)s->oversign,
            .noversign = s->noversign,
            .timestamp = j->timestamp,
            .expire = s->expire_s,
        };
        int rc = dkim_sign(&p, j->hdr, j->hdr_len, j->bh[s->body_canon], j->sig, cap, &used);
        if (rc < 0) {
            j->rc = rc;
            j->failed = s;
            free(j->sig);
            j->sig = NULL;
            return;
        }
    }
    j->sig_len = used;
    j->rc = 0;
}

static void *
pool_thread(void *arg)
{
    struct dkim_pool *p = arg;
    log_set_thread_name("dkim");
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (p->head == NULL && !p->stopping)
            pthread_cond_wait(&p->cv, &p->lock);
        struct dkim_job *j = p->head;
        if (j == NULL)
            break; /* stopping, and nothing left */
        p->head = j->next;
        if (p->head == NULL)
            p->tail = &p->head;
        p->len--;
        bool cancel = p->stopping;
        pthread_mutex_unlock(&p->lock);
        uint64_t t0 = now_ns();
        if (cancel)
            j->rc = -ECANCELED;
        else
            job_run(j);
        uint64_t spent = now_ns() - t0;
        bool ok = j->rc == 0;
        unsigned nsig = j->nsigners;
        worker_post(j->w, &j->m); /* j is the worker's from here on */
        pthread_mutex_lock(&p->lock);
        p->stats.jobs++;
        p->stats.sign_ns += spent;
        if (ok)
            p->stats.signatures += nsig;
        else
            p->stats.failures++;
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

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
    if (p == NULL || (p->threads = calloc(threads, sizeof(*p->threads))) == NULL) {
        free(p);
        snprintf(err, errlen, "out of memory for the DKIM signing pool");
        return -ENOMEM;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->tail = &p->head;
    p->max = queue_max ? queue_max : 1;
    p->on_worker = on_worker;
    for (unsigned i = 0; i < threads; i++) {
        int rc = pthread_create(&p->threads[i], NULL, pool_thread, p);
        if (rc != 0) {
            snprintf(err, errlen, "cannot start DKIM signing thread: %s", strerror(rc));
            dkim_pool_free(p);
            return -rc;
        }
        p->nthreads++;
    }
    *out = p;
    return 0;
}

struct dkim_pool *
dkim_pool_free(struct dkim_pool *p)
{
    if (p == NULL)
        return NULL;
    pthread_mutex_lock(&p->lock);
    p->stopping = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->lock);
    for (unsigned i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    /* No thread started: what is queued goes back cancelled all the same. */
    for (struct dkim_job *j = p->head, *next; j != NULL; j = next) {
        next = j->next;
        j->rc = -ECANCELED;
        worker_post(j->w, &j->m);
    }
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
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
        uint64_t t0 = now_ns();
        job_run(j);
        uint64_t spent = now_ns() - t0;
        pthread_mutex_lock(&p->lock);
        p->stats.jobs++;
        p->stats.on_worker++;
        p->stats.sign_ns += spent;
        if (j->rc == 0)
            p->stats.signatures += j->nsigners;
        else
            p->stats.failures++;
        pthread_mutex_unlock(&p->lock);
        worker_post(j->w, &j->m); /* done() on the next turn of the same loop */
        return 0;
    }
    pthread_mutex_lock(&p->lock);
    int rc = 0;
    if (p->stopping)
        rc = -ESHUTDOWN;
    else if (p->len >= p->max)
        rc = -EAGAIN;
    if (rc < 0) {
        p->stats.refused++;
        pthread_mutex_unlock(&p->lock);
        return rc;
    }
    j->next = NULL;
    *p->tail = j;
    p->tail = &j->next;
    p->len++;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->lock);
    return 0;
}

void
dkim_pool_stats(struct dkim_pool *p, struct dkim_pool_stats *out)
{
    pthread_mutex_lock(&p->lock);
    *out = p->stats;
    out->queued = p->len;
    pthread_mutex_unlock(&p->lock);
}
