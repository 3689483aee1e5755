/*
 * workq: see workq.h. One mutex and one condition variable guard the
 * FIFO and the counters.
 */
#include "common/workq.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/log.h"

struct workq {
    const struct workq_ops *ops; /* borrowed */
    void *ctx;                   /* borrowed */
    pthread_mutex_t lock;
    pthread_cond_t cv;
    struct workq_item *head, **tail; /* borrowed items, FIFO */
    unsigned waiting, max;
    bool stopping;
    uint64_t refused;
    pthread_t *threads; /* owned */
    unsigned nthreads;
};

static void *
workq_thread(void *arg)
{
    struct workq *q = arg;
    log_altstack_init();
    log_set_thread_name(q->ops->thread_name);
    /* Linux applies nice to the calling thread alone. */
    if (q->ops->nice != 0 && setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), q->ops->nice) < 0)
        log_msg(LOG_DEBUG, "event=thread_nice_failed thread=%s", q->ops->thread_name);
    void *scratch = NULL;
    if (q->ops->thread_init != NULL && (scratch = q->ops->thread_init(q->ctx)) == NULL) {
        log_msg(LOG_CRIT, "event=panic reason=%s_thread_out_of_memory", q->ops->thread_name);
        abort();
    }
    pthread_mutex_lock(&q->lock);
    for (;;) {
        while (q->head == NULL && !q->stopping)
            pthread_cond_wait(&q->cv, &q->lock);
        if (q->stopping)
            break; /* what is left is dropped by workq_free */
        struct workq_item *it = q->head;
        q->head = it->next;
        if (q->head == NULL)
            q->tail = &q->head;
        q->waiting--;
        pthread_mutex_unlock(&q->lock);
        q->ops->run(q->ctx, it, scratch);
        pthread_mutex_lock(&q->lock);
    }
    pthread_mutex_unlock(&q->lock);
    if (q->ops->thread_fini != NULL)
        q->ops->thread_fini(q->ctx, scratch);
    return NULL;
}

int
workq_new(const struct workq_ops *ops, void *ctx, unsigned threads, unsigned max,
          struct workq **out)
{
    *out = NULL;
    if (threads == 0)
        threads = 1;
    struct workq *q = calloc(1, sizeof(*q));
    if (q == NULL || (q->threads = calloc(threads, sizeof(*q->threads))) == NULL) {
        free(q);
        return -ENOMEM;
    }
    q->ops = ops;
    q->ctx = ctx;
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->cv, NULL);
    q->tail = &q->head;
    q->max = max ? max : 1;
    for (unsigned i = 0; i < threads; i++) {
        int rc = pthread_create(&q->threads[i], NULL, workq_thread, q);
        if (rc != 0) {
            workq_free(q);
            return -rc;
        }
        q->nthreads++;
    }
    *out = q;
    return 0;
}

struct workq *
workq_free(struct workq *q)
{
    if (q == NULL)
        return NULL;
    pthread_mutex_lock(&q->lock);
    q->stopping = true;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->lock);
    for (unsigned i = 0; i < q->nthreads; i++)
        pthread_join(q->threads[i], NULL);
    for (struct workq_item *it = q->head, *next; it != NULL; it = next) {
        next = it->next;
        q->ops->drop(q->ctx, it);
    }
    pthread_mutex_destroy(&q->lock);
    pthread_cond_destroy(&q->cv);
    free(q->threads);
    free(q);
    return NULL;
}

int
workq_submit(struct workq *q, struct workq_item *it)
{
    it->next = NULL;
    pthread_mutex_lock(&q->lock);
    int rc = q->stopping ? -ESHUTDOWN : q->waiting >= q->max ? -EAGAIN : 0;
    if (rc < 0) {
        q->refused++;
        pthread_mutex_unlock(&q->lock);
        return rc;
    }
    *q->tail = it;
    q->tail = &it->next;
    q->waiting++;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->lock);
    return 0;
}

void
workq_stats(struct workq *q, struct workq_stats *out)
{
    pthread_mutex_lock(&q->lock);
    out->waiting = q->waiting;
    out->refused = q->refused;
    out->threads = q->nthreads;
    pthread_mutex_unlock(&q->lock);
}
