/*
 * delivery_due: the deferred recipients that come due, taken from the
 * spool's time index (queue_due_take) and submitted to their workers, and
 * [delivery] active_limit, which holds them in the spool while the
 * workers hold its count of ready recipients that can go (due_room: the
 * spool's ready count less every worker's parked recipients and those at
 * its suspended destinations). A take
 * that does not fit a full spool is tried smaller at once; event=due_paused
 * and event=due_resumed say when the limit holds due mail back.
 *
 * Threading: worker 0's thread (its due_timer, its spool port); the
 * other workers' counts of those are read atomically.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/delivery.h"
#include "engine/engine.h"
#include "engine/outbound/internal.h"
#include "queue/queue.h"

#define DUE_POLL_MS    1000
#define DUE_BATCH      10000
#define DUE_PAUSED_MS  100 /* the next look while active_limit holds takes back: the ready
                            * mail of a fast drain goes in well under the second of a poll */

/* One take of due recipients from the spool (queue_due_take) in flight. */
struct due_take {
    struct delivery *d; /* borrowed: waits for its port's requests */
    unsigned taken;
    unsigned batch; /* asked for */
    struct delivery_batch b;
};

/* A recipient the spool took for us: ready now, and ours to deliver; when
 * stopping, the start-up walk of the next run finds it. */
static int
due_on_taken(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct due_take *dt = arg;
    dt->taken++;
    return dt->d->stopping ? 0 : delivery_batch_add(&dt->b, id, r);
}

/* Ready recipients in the spool that cannot go before an operator (or a
 * shaping action) lets them: every worker's. */
struct due_stuck {
    uint64_t parked;    /* of parked jobs: a suspended tenant or campaign, shaping */
    uint64_t suspended; /* waiting at destinations whose domain or pool is suspended */
};

static void due_set_paused(struct delivery *d, bool paused, const struct queue_counts *c,
                           const struct due_stuck *st, uint64_t limit);
static struct due_stuck due_stuck(const struct delivery *d);

static void
due_on_done(void *cookie, int rc)
{
    struct due_take *dt = cookie;
    struct delivery *d = dt->d;
    bool space = queue_error_is_space(rc);
    if (rc != 0 && (!space || dt->batch == 1)) /* the smaller tries at once: not each said */
        log_msg(LOG_ERR, "event=due_poll_failed err=\"%s\" batch=%u", queue_strerror(rc),
                dt->batch);
    /* A take that did not fit the spool (full: deferrals took its last
     * pages) is tried smaller, down to one recipient, at once: the
     * deliveries it makes possible are what frees room. The same size
     * every second never fitted, and nothing was delivered again, even
     * after a restart. Back up to DUE_BATCH as takes succeed. */
    if (space)
        d->due_batch = d->due_batch > 4 ? d->due_batch / 4 : 1;
    else if (rc == 0 && d->due_batch < DUE_BATCH)
        d->due_batch = d->due_batch * 2 < DUE_BATCH ? d->due_batch * 2 : DUE_BATCH;
    /* fewer due than the limit let it take: none is held back now */
    if (rc == 0 && dt->taken < dt->batch && d->stats.due_paused != 0) {
        struct queue_counts c;
        uint64_t limit = d->e->cfg->delivery.active_limit;
        struct due_stuck st = due_stuck(d);
        due_set_paused(d, false, queue_counts(d->e->queue, &c, NULL, NULL) == 0 ? &c : NULL,
                       &st, limit);
    }
    /* a full batch: more are due, ask again at once */
    uint64_t next = (rc == 0 && dt->taken >= dt->batch) || (space && dt->batch > 1) ? 0
                                                                                   : DUE_POLL_MS;
    if (!d->stopping) {
        delivery_batch_flush(&dt->b);
        worker_timer_arm(d->w, &d->due_timer, d->w->now + MS_TO_NS(next));
    }
    free(dt);
}

/* [delivery] active_limit holds due recipients back (paused) or not. The
 * state spans a drain at the limit: from the first take the limit cuts
 * or stops to the take that found fewer due than it could make ready (or
 * one the limit no longer cuts), so that it is logged once each way;
 * flipped at each take, a drain at the limit logged a pair every 100 ms
 * (each delivery made room for one more). */
static void
due_set_paused(struct delivery *d, bool paused, const struct queue_counts *c,
               const struct due_stuck *st, uint64_t limit)
{
    if (paused == (d->stats.due_paused != 0))
        return;
    d->stats.due_paused = paused;
    if (c != NULL)
        log_msg(LOG_NOTICE,
                "event=%s ready=%llu parked=%llu suspended=%llu deferred=%llu active_limit=%llu",
                paused ? "due_paused" : "due_resumed", (unsigned long long)c->ready,
                (unsigned long long)st->parked, (unsigned long long)st->suspended,
                (unsigned long long)c->deferred, (unsigned long long)limit);
    else /* no limit now (a reload), or no count */
        log_msg(LOG_NOTICE, "event=%s active_limit=%llu", paused ? "due_paused" : "due_resumed",
                (unsigned long long)limit);
}

/* The recipients that cannot go, every worker's (struct due_stuck). Read
 * without a lock: a count a moment old only moves the limit's cut by as
 * much. */
static struct due_stuck
due_stuck(const struct delivery *d)
{
    struct due_stuck st = {0, 0};
    for (unsigned i = 0; i < d->e->nworkers; i++) {
        const struct delivery *w = d->e->dlv[i];
        if (w == NULL)
            continue;
        st.parked += atomic_load_explicit(&w->parked_rcpts, memory_order_relaxed);
        st.suspended += atomic_load_explicit(&w->paused_rcpts, memory_order_relaxed);
    }
    return st;
}

static int
due_seen(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    (void)arg, (void)id, (void)r;
    return 0;
}

/* Is a deferred recipient due now? One read of the time index's first
 * entry: asked only while the limit holds and none was seen held back,
 * so that due_paused says what it says (new mail alone at the limit,
 * nothing deferred or nothing due yet, holds nothing back). */
static bool
due_any(struct delivery *d)
{
    struct queue_due_pos pos = {0};
    return queue_due(d->e->queue, &pos, clock_unix_ms(), 1, due_seen, NULL) != 0;
}

/* [delivery] active_limit: how many of batch the next take may make
 * ready, 0 while the spool holds the limit's count of ready recipients
 * that can go (those the workers hold: new mail, the start's, taken
 * ones; not those that wait for an operator, parked or at a suspended
 * destination: 2 million of a suspended campaign held every other
 * domain's retries back). The count is the spool's (its recipients less
 * its deferred ones, one read) less those the workers count, so nothing
 * here has to follow each job to its end. */
static unsigned
due_room(struct delivery *d, unsigned batch)
{
    uint64_t limit = d->e->cfg->delivery.active_limit;
    struct queue_counts c;
    if (limit == 0 || queue_counts(d->e->queue, &c, NULL, NULL) != 0) {
        /* no limit, or no count: take as without one */
        due_set_paused(d, false, NULL, NULL, limit);
        return batch;
    }
    struct due_stuck st = due_stuck(d);
    uint64_t stuck = st.parked + st.suspended;
    uint64_t ready = c.ready > stuck ? c.ready - stuck : 0;
    uint64_t room = ready < limit ? limit - ready : 0;
    if (room == 0) {
        if (d->stats.due_paused == 0 && c.deferred != 0 && due_any(d))
            due_set_paused(d, true, &c, &st, limit);
    } else if (room >= batch) {
        due_set_paused(d, false, &c, &st, limit); /* the take is not cut */
    }
    return room < batch ? (unsigned)room : batch;
}

static void
due_on_timer(struct timer *tm, void *ctx)
{
    struct delivery *d = (struct delivery *)((char *)tm - offsetof(struct delivery, due_timer));
    /* Once a second: the spool's pages read since (envelopes, bodies of
     * transactions now waiting for replies) leave the RSS. Not at each
     * take: takes come at once while full, or every DUE_PAUSED_MS. */
    if (d->w->now - d->due_trimmed >= MS_TO_NS(DUE_POLL_MS)) {
        queue_map_trim(d->e->queue);
        d->due_trimmed = d->w->now;
    }
    struct due_take *dt = calloc(1, sizeof(*dt));
    int rc = -ENOMEM;
    if (dt != NULL) {
        dt->d = d;
        dt->b.e = d->e;
        if (d->due_batch == 0 || d->due_batch > DUE_BATCH)
            d->due_batch = DUE_BATCH;
        dt->batch = due_room(d, d->due_batch);
        if (dt->batch == 0) { /* the limit's count is ready: look again soon */
            free(dt);
            worker_timer_arm(d->w, &d->due_timer, d->w->now + MS_TO_NS(DUE_PAUSED_MS));
            return;
        }
        rc = queue_due_take(d->e->queue, d->port, clock_unix_ms(), dt->batch, due_on_taken, dt,
                            due_on_done, dt);
    }
    if (rc == 0)
        return; /* due_on_done arms the timer again */
    free(dt);
    log_msg(LOG_ERR, "event=due_poll_failed err=\"%s\"", queue_strerror(rc));
    worker_timer_arm(d->w, &d->due_timer, d->w->now + MS_TO_NS(DUE_POLL_MS));
}

void
delivery_due_init(struct delivery *d)
{
    timer_init(&d->due_timer, due_on_timer);
}

void
delivery_due_start(struct delivery *d)
{
    worker_timer_arm(d->w, &d->due_timer, d->w->now + MS_TO_NS(DUE_POLL_MS));
}
