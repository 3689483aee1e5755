/*
 * auth_pool: see auth_pool.h. One mutex and one condition variable guard a
 * FIFO of jobs; each thread has its own crypt(3) scratch.
 */
#include "engine/auth_pool.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/log.h"

#define HASH_NICE 5

struct auth_pool {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    struct auth_job *head, **tail; /* borrowed jobs, FIFO */
    unsigned waiting, queue_max;
    bool stopping;
    pthread_t *threads; /* owned */
    unsigned nthreads;
    uint64_t hashes[AUTH_SCHEME_COUNT];
    uint64_t refused;
};

static void *
pool_thread(void *arg)
{
    struct auth_pool *p = arg;
    log_set_thread_name("hash");
    /* Linux applies nice to the calling thread alone: lower than the loops. */
    if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), HASH_NICE) < 0)
        log_msg(LOG_DEBUG, "event=hash_thread_nice_failed");
    void *scratch = auth_crypt_scratch_new();
    if (scratch == NULL) {
        log_msg(LOG_CRIT, "event=panic reason=hash_thread_out_of_memory");
        abort();
    }
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (p->head == NULL && !p->stopping)
            pthread_cond_wait(&p->cv, &p->lock);
        if (p->stopping)
            break;
        struct auth_job *j = p->head;
        p->head = j->next;
        if (p->head == NULL)
            p->tail = &p->head;
        p->waiting--;
        p->hashes[j->a.scheme < AUTH_SCHEME_COUNT ? j->a.scheme : AUTH_SCHEME_OTHER]++;
        pthread_mutex_unlock(&p->lock);
        auth_attempt_hash(&j->a, scratch);
        worker_post(j->w, &j->m);
        pthread_mutex_lock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    free(scratch);
    return NULL;
}

int
auth_pool_new(unsigned threads, unsigned queue_max, struct auth_pool **out)
{
    *out = NULL;
    struct auth_pool *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return -ENOMEM;
    p->threads = calloc(threads ? threads : 1, sizeof(*p->threads));
    if (p->threads == NULL) {
        free(p);
        return -ENOMEM;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->tail = &p->head;
    p->queue_max = queue_max;
    for (unsigned i = 0; i < threads; i++) {
        int rc = pthread_create(&p->threads[i], NULL, pool_thread, p);
        if (rc != 0) {
            auth_pool_free(p);
            return -rc;
        }
        p->nthreads++;
    }
    *out = p;
    return 0;
}

struct auth_pool *
auth_pool_free(struct auth_pool *p)
{
    if (p == NULL)
        return NULL;
    pthread_mutex_lock(&p->lock);
    p->stopping = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->lock);
    for (unsigned i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    /* Jobs never started: their owners are being freed; wipe the passwords. */
    for (struct auth_job *j = p->head; j != NULL; j = j->next)
        OPENSSL_cleanse(j->a.pass, sizeof(j->a.pass));
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
    return NULL;
}

int
auth_pool_submit(struct auth_pool *p, struct auth_job *j, struct worker *w)
{
    j->w = w;
    j->next = NULL;
    pthread_mutex_lock(&p->lock);
    if (p->waiting >= p->queue_max || p->stopping) {
        p->refused++;
        pthread_mutex_unlock(&p->lock);
        return -EAGAIN;
    }
    *p->tail = j;
    p->tail = &j->next;
    p->waiting++;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->lock);
    return 0;
}

void
auth_pool_stats(struct auth_pool *p, struct auth_pool_stats *out)
{
    pthread_mutex_lock(&p->lock);
    memcpy(out->hashes, p->hashes, sizeof(out->hashes));
    out->refused = p->refused;
    out->waiting = p->waiting;
    out->threads = p->nthreads;
    pthread_mutex_unlock(&p->lock);
}
