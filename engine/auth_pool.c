/*
 * auth_pool: see auth_pool.h. The queue and its threads are a workq
 * (common/workq.h) at nice +5; each thread has its own crypt(3) scratch.
 */
#include "engine/auth_pool.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define HASH_NICE 5

struct auth_pool {
    struct workq *q; /* owned */
    _Atomic uint64_t hashes[AUTH_SCHEME_COUNT];
};

static struct auth_job *
job_of(struct workq_item *it)
{
    return (struct auth_job *)((char *)it - offsetof(struct auth_job, q));
}

static void *
hash_thread_init(void *ctx)
{
    (void)ctx;
    return auth_crypt_scratch_new();
}

static void
hash_thread_fini(void *ctx, void *scratch)
{
    (void)ctx;
    free(scratch);
}

static void
hash_run(void *ctx, struct workq_item *it, void *scratch)
{
    struct auth_pool *p = ctx;
    struct auth_job *j = job_of(it);
    atomic_fetch_add_explicit(&p->hashes[j->a.scheme < AUTH_SCHEME_COUNT ? j->a.scheme
                                                                          : AUTH_SCHEME_OTHER],
                              1, memory_order_relaxed);
    auth_attempt_hash(&j->a, scratch);
    worker_post(j->w, &j->m);
}

/* Jobs never started: their owners are being freed; wipe the passwords. */
static void
hash_drop(void *ctx, struct workq_item *it)
{
    (void)ctx;
    struct auth_job *j = job_of(it);
    OPENSSL_cleanse(j->a.pass, sizeof(j->a.pass));
}

static const struct workq_ops hash_ops = {
    .thread_name = "hash",
    .nice = HASH_NICE, /* lower than the loops */
    .thread_init = hash_thread_init,
    .thread_fini = hash_thread_fini,
    .run = hash_run,
    .drop = hash_drop,
};

int
auth_pool_new(unsigned threads, unsigned queue_max, struct auth_pool **out)
{
    *out = NULL;
    struct auth_pool *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return -ENOMEM;
    int rc = workq_new(&hash_ops, p, threads, queue_max, &p->q);
    if (rc < 0) {
        free(p);
        return rc;
    }
    *out = p;
    return 0;
}

struct auth_pool *
auth_pool_free(struct auth_pool *p)
{
    if (p == NULL)
        return NULL;
    workq_free(p->q);
    free(p);
    return NULL;
}

int
auth_pool_submit(struct auth_pool *p, struct auth_job *j, struct worker *w)
{
    j->w = w;
    int rc = workq_submit(p->q, &j->q);
    return rc == -ESHUTDOWN ? -EAGAIN : rc;
}

void
auth_pool_stats(struct auth_pool *p, struct auth_pool_stats *out)
{
    for (unsigned i = 0; i < AUTH_SCHEME_COUNT; i++)
        out->hashes[i] = atomic_load_explicit(&p->hashes[i], memory_order_relaxed);
    struct workq_stats qs;
    workq_stats(p->q, &qs);
    out->refused = qs.refused;
    out->waiting = qs.waiting;
    out->threads = qs.threads;
}
