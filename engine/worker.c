/*
 * worker: the loop of worker.h.
 *
 * The ring is set up with SINGLE_ISSUER and DEFER_TASKRUN where the kernel
 * has them (6.1+): completions are then processed only when this thread
 * enters the kernel to wait, which is exactly once per turn. Older kernels
 * fall back to COOP_TASKRUN, then to no flags.
 *
 * The loop's log lines are batched (log.h): written in one write before
 * each submit, and before a post to another worker.
 *
 * Each turn's busy time (the end of one wait to the start of the next) is
 * measured with one more clock read a turn: the slow ones are counted and
 * the slowest logged (worker.h, WORKER_SLOW_TURN_MS), so that a handler
 * that holds its worker for a second (a site's ten thousand deferrals, a
 * spool read that waits on the disk) is seen, not guessed at.
 */
#include "engine/worker.h"

#include <errno.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/log.h"

static int
ring_setup(struct io_uring *ring, unsigned entries)
{
    /* R_DISABLED: SINGLE_ISSUER binds the ring to the task that enables
     * it, and that must be the worker's thread, not the one that set up. */
    static const unsigned flag_sets[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_R_DISABLED,
        IORING_SETUP_COOP_TASKRUN,
        0,
    };
    int rc = -EINVAL;
    for (size_t i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
        struct io_uring_params p;
        memset(&p, 0, sizeof(p));
        p.flags = flag_sets[i] | IORING_SETUP_CQSIZE;
        p.cq_entries = entries * 4;
        rc = io_uring_queue_init_params(entries, ring, &p);
        if (rc != -EINVAL)
            return rc;
    }
    return rc;
}

static void worker_on_stop(struct worker *w, struct worker_msg *m);

int
worker_init(struct worker *w, unsigned id, unsigned entries, void *ctx)
{
    memset(w, 0, sizeof(*w));
    w->id = id;
    w->ctx = ctx;
    w->wake_fd = -1;
    snprintf(w->name, sizeof(w->name), "w%u", id);
    w->mbox_tail = &w->mbox_head;
    w->stop_msg.fn = worker_on_stop;
    w->wake_op.kind = OP_WAKE;
    w->deadline_op.kind = OP_DEADLINE;
    w->deadline_armed = UINT64_MAX;
    int rc = pthread_mutex_init(&w->mbox_lock, NULL);
    if (rc != 0)
        return -rc;
    rc = timer_heap_init(&w->timers, 1024);
    if (rc < 0)
        goto fail_mutex;
    w->wake_fd = eventfd(0, EFD_CLOEXEC);
    if (w->wake_fd < 0) {
        rc = -errno;
        goto fail_timers;
    }
    rc = ring_setup(&w->ring, entries);
    if (rc < 0)
        goto fail_fd;
    w->now = clock_mono_ns();
    return 0;

fail_fd:
    close(w->wake_fd);
    w->wake_fd = -1;
fail_timers:
    timer_heap_fini(&w->timers);
fail_mutex:
    pthread_mutex_destroy(&w->mbox_lock);
    return rc;
}

void
worker_fini(struct worker *w)
{
    io_uring_queue_exit(&w->ring);
    if (w->wake_fd >= 0)
        close(w->wake_fd);
    w->wake_fd = -1;
    timer_heap_fini(&w->timers);
    pthread_mutex_destroy(&w->mbox_lock);
}

struct io_uring_sqe *
worker_sqe(struct worker *w, struct op *op)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&w->ring);
    if (sqe == NULL) {
        log_flush(); /* the lines before what this submit starts */
        int rc = io_uring_submit(&w->ring);
        sqe = io_uring_get_sqe(&w->ring);
        if (sqe == NULL) {
            log_msg(LOG_CRIT, "worker=%s event=panic reason=no_sqe submit=%d", w->name, rc);
            abort();
        }
    }
    io_uring_sqe_set_data(sqe, op);
    return sqe;
}

static void
wake_arm(struct worker *w)
{
    struct io_uring_sqe *sqe = worker_sqe(w, &w->wake_op);
    io_uring_prep_read(sqe, w->wake_fd, &w->wake_buf, sizeof(w->wake_buf), 0);
    w->wake_armed = true;
}

void
worker_post(struct worker *w, struct worker_msg *m)
{
    m->next = NULL;
    worker_post_chain(w, m, m);
}

void
worker_post_chain(struct worker *w, struct worker_msg *first, struct worker_msg *last)
{
    last->next = NULL;
    /* The poster's lines before what the message makes the other worker
     * do (and log). */
    log_flush();
    pthread_mutex_lock(&w->mbox_lock);
    bool was_empty = w->mbox_head == NULL;
    *w->mbox_tail = first;
    w->mbox_tail = &last->next;
    pthread_mutex_unlock(&w->mbox_lock);
    /* Only the post that makes the box non-empty wakes: the worker takes
     * the whole list at once, so later posts ride on the same wake-up. */
    if (was_empty) {
        uint64_t one = 1;
        while (write(w->wake_fd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
    }
}

unsigned
worker_mbox_cancel(struct worker *w, void (*fn)(struct worker *, struct worker_msg *))
{
    unsigned n = 0;
    pthread_mutex_lock(&w->mbox_lock);
    struct worker_msg **pp = &w->mbox_head;
    while (*pp != NULL) {
        if ((*pp)->fn == fn) {
            *pp = (*pp)->next;
            n++;
        } else {
            pp = &(*pp)->next;
        }
    }
    w->mbox_tail = pp;
    pthread_mutex_unlock(&w->mbox_lock);
    return n;
}

static void
mbox_drain(struct worker *w)
{
    pthread_mutex_lock(&w->mbox_lock);
    struct worker_msg *m = w->mbox_head;
    w->mbox_head = NULL;
    w->mbox_tail = &w->mbox_head;
    pthread_mutex_unlock(&w->mbox_lock);
    while (m != NULL) {
        struct worker_msg *next = m->next;
        w->stats.msgs++;
        m->fn(w, m);
        m = next;
    }
}

static void
worker_on_stop(struct worker *w, struct worker_msg *m)
{
    (void)m;
    w->stopping = true;
}

void
worker_stop(struct worker *w)
{
    worker_post(w, &w->stop_msg);
}

static void
dispatch(struct worker *w, struct io_uring_cqe *cqe)
{
    struct op *op = io_uring_cqe_get_data(cqe);
    if (op == NULL)
        return; /* a cancel or close whose result nobody wants */
    switch ((enum op_kind)op->kind) {
    case OP_WAKE:
        w->wake_armed = false;
        if (cqe->res < 0 && cqe->res != -EINTR && cqe->res != -ECANCELED)
            log_msg(LOG_ERR, "worker=%s event=wake_read_failed err=%s", w->name,
                    strerror(-cqe->res));
        mbox_drain(w);
        if (!w->stopping)
            wake_arm(w);
        break;
    case OP_DEADLINE:
        /* -ETIME: it fired; 0 or -ECANCELED: it was replaced or removed. */
        w->deadline_armed = UINT64_MAX;
        break;
    case OP_CALLBACK:
        op->done(w, op, cqe->res, cqe->flags);
        break;
    case OP_NONE:
    default:
        log_msg(LOG_CRIT, "worker=%s event=panic reason=bad_op kind=%u", w->name, op->kind);
        abort();
    }
}

/*
 * The loop sleeps until the earliest timer through one IORING_OP_TIMEOUT
 * (absolute, CLOCK_MONOTONIC) that is moved earlier with a timeout update
 * when a nearer deadline appears. A later deadline leaves it alone: it
 * fires early once, the turn finds nothing due and re-arms. (liburing
 * 2.3's io_uring_submit_and_wait_timeout() falls back to an untimed wait
 * after its first -ETIME, so the deadline lives on the ring instead.)
 */
static void
deadline_arm(struct worker *w, uint64_t next)
{
    if (next == UINT64_MAX || next >= w->deadline_armed)
        return;
    w->deadline_ts.tv_sec = (long long)(next / 1000000000ULL);
    w->deadline_ts.tv_nsec = (long long)(next % 1000000000ULL);
    if (w->deadline_armed == UINT64_MAX) {
        struct io_uring_sqe *sqe = worker_sqe(w, &w->deadline_op);
        io_uring_prep_timeout(sqe, &w->deadline_ts, 0, IORING_TIMEOUT_ABS);
    } else {
        struct io_uring_sqe *sqe = worker_sqe(w, NULL);
        io_uring_prep_timeout_update(sqe, &w->deadline_ts, (uint64_t)(uintptr_t)&w->deadline_op,
                                     IORING_TIMEOUT_ABS);
    }
    w->deadline_armed = next;
}

static int worker_loop(struct worker *w);

/* What a turn did, from its start: for the line of a slow one. */
struct turn_mark {
    uint64_t at; /* monotonic ns the turn began (its wait ended) */
    uint64_t cqes, timers, msgs;
};

static void
turn_begin(const struct worker *w, struct turn_mark *m, uint64_t now)
{
    *m = (struct turn_mark){.at = now, .cqes = w->stats.cqes, .timers = w->stats.timers,
                            .msgs = w->stats.msgs};
}

/* The turn that began at m ends at now (its wait begins). */
static void
turn_end(struct worker *w, const struct turn_mark *m, uint64_t now)
{
    uint64_t busy = now > m->at ? now - m->at : 0;
    if (busy > w->stats.longest_turn_ns)
        w->stats.longest_turn_ns = busy;
    if (busy < (uint64_t)WORKER_SLOW_TURN_MS * 1000000u)
        return;
    w->stats.slow_turns++;
    if (busy < (uint64_t)WORKER_SLOW_LOG_MS * 1000000u ||
        (w->slow_logged != 0 && now - w->slow_logged < (uint64_t)WORKER_SLOW_LOG_EVERY_MS * 1000000u))
        return;
    log_msg(LOG_NOTICE,
            "worker=%s event=slow_turn busy_ms=%llu cqes=%llu timers=%llu msgs=%llu "
            "slow_turns_since=%llu",
            w->name, (unsigned long long)(busy / 1000000u),
            (unsigned long long)(w->stats.cqes - m->cqes),
            (unsigned long long)(w->stats.timers - m->timers),
            (unsigned long long)(w->stats.msgs - m->msgs),
            (unsigned long long)(w->stats.slow_turns - w->slow_logged_at));
    w->slow_logged = now;
    w->slow_logged_at = w->stats.slow_turns;
}

int
worker_run(struct worker *w)
{
    log_set_thread_name(w->name);
    log_batch_begin();
    int rc = worker_loop(w);
    log_batch_end();
    return rc;
}

static int
worker_loop(struct worker *w)
{
    if (w->ring.flags & IORING_SETUP_R_DISABLED) {
        /* liburing 2.3 declares io_uring_enable_rings() but its shared
         * library does not export it: register directly. */
        int rc = io_uring_register(w->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
        if (rc < 0) {
            log_msg(LOG_CRIT, "worker=%s event=ring_enable_failed err=%s", w->name, strerror(-rc));
            return rc;
        }
    }
    wake_arm(w);
    /* A message posted before the loop started wrote the eventfd, so the
     * read armed above completes at once: nothing is missed. */
    struct turn_mark mark;
    turn_begin(w, &mark, clock_mono_ns());
    while (!w->stopping) {
        w->stats.loops++;
        w->now = clock_mono_ns();
        /* At most a slice of the turn: the rest of a storm of timers due
         * together fires next turn (the deadline below is then past, so
         * the wait returns at once), after the completions of this one. */
        w->stats.timers += timer_run_until(&w->timers, w->now, w, clock_mono_ns,
                                           w->now + MS_TO_NS(WORKER_TIMER_SLICE_MS));
        if (w->stopping)
            break;
        deadline_arm(w, timer_next(&w->timers));
        turn_end(w, &mark, clock_mono_ns()); /* its line goes out with the turn's */
        log_flush(); /* the turn's lines, before its sends and before the wait */
        int rc = io_uring_submit_and_wait(&w->ring, 1);
        bool injected = w->fail_after != 0 && w->stats.loops >= w->fail_after;
        if (injected)
            rc = -EIO;
        if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
            log_msg(LOG_CRIT, "worker=%s event=ring_failed err=%s%s", w->name, strerror(-rc),
                    injected ? " injected_by=SLUICE_TEST_FAIL_RING" : "");
            w->failed = true;
            if (w->on_failed != NULL)
                w->on_failed(w, rc);
            return rc;
        }
        /* The wait may have lasted minutes on an idle worker: a deadline
         * armed by a handler below counts from now, not from before it. */
        w->now = clock_mono_ns();
        turn_begin(w, &mark, w->now);
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        /* Once stopping, nothing more is dispatched, not even the rest of
         * this batch: an owner may free itself at once when the loop ends
         * (redis.c's links do), and a completion of this batch is no more
         * owed to it than one of the next turn, which never comes. */
        io_uring_for_each_cqe(&w->ring, head, cqe)
        {
            n++;
            if (!w->stopping)
                dispatch(w, cqe);
        }
        io_uring_cq_advance(&w->ring, n);
        w->stats.cqes += n;
        w->now = clock_mono_ns();
    }
    turn_end(w, &mark, clock_mono_ns()); /* the last turn, the one that stopped it */
    log_flush();
    return 0;
}

static void *
worker_thread(void *arg)
{
    struct worker *w = arg;
    log_altstack_init();
    intptr_t rc = worker_run(w);
    return (void *)rc;
}

int
worker_start(struct worker *w)
{
    int rc = pthread_create(&w->thread, NULL, worker_thread, w);
    if (rc != 0)
        return -rc;
    w->started = true;
    return 0;
}

int
worker_join(struct worker *w)
{
    if (!w->started)
        return 0;
    void *ret = NULL;
    int rc = pthread_join(w->thread, &ret);
    w->started = false;
    if (rc != 0)
        return -rc;
    return (int)(intptr_t)ret;
}
