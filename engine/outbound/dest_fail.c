/*
 * dest_fail: a destination's waiting jobs failed together: with one
 * outcome (dest_fail_each), as a verdict of the failure policy says
 * (dest_fail_all), told where the failure was (dest_fail_where: MX
 * host, address, source, TLS), with the failure that rested their site
 * (dest_fail_as_site), and when this node could not open a connection
 * (dest_open_failed). Whether a job is deferred or bounced is the
 * failure policy's (policy.c) and the spool's (ops->fail: outcome.c);
 * when the scheduler fails them is scheduler.c's (dest_run).
 *
 * Threading: the worker's thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "engine/outbound/internal.h"

/* Recipients dest_fail_each fails in one turn of the worker. Each costs
 * a log line, a delivery-log record and its part of a commit (some 3 us,
 * ten times that under ASan): a destination's every waiting job failed
 * in one turn, and 300 messages of 1,000 recipients behind a dead host
 * made a turn of nearly two seconds, in which the worker's submission
 * sessions got no reply. The rest fail on the next turns. */
#define FAIL_TURN_RCPTS 10000u

/* The jobs left at t fail with o on the next turn: a copy of o kept in
 * t->fail_more (where too, when o is t->last_fail's). False: no memory
 * for it. */
static bool
fail_more_set(struct dest *t, const struct smtp_outcome *o, enum classify_source src)
{
    struct dest_fail *f = t->fail_more;
    if (f == NULL && (f = malloc(sizeof(*f))) == NULL)
        return false;
    bool where = t->last_fail != NULL && o == &t->last_fail->o;
    if (where)
        *f = *t->last_fail;
    else {
        memset(f, 0, sizeof(*f));
        f->o = *o;
    }
    t->fail_more = f;
    t->fail_more_where = where;
    t->fail_more_src = (uint8_t)src;
    dest_lim_wait(t, t->d->w->now + MS_TO_NS(1));
    return true;
}

/* (internal.h) */
void
dest_fail_each(struct dest *t, const struct smtp_outcome *o, enum classify_source src)
{
    struct delivery *d = t->d;
    struct job *kept = NULL, *j;
    bool budget = true;
    if (d->fail_turn != d->w->now) {
        d->fail_turn = d->w->now; /* a new turn */
        d->fail_in_turn = 0;
    }
    /* A message's jobs (split to max_rcpt_per_txn) read its envelope,
     * every recipient of it, once (ops->fail: job_fail), not once each:
     * a flush of 1,000-recipient messages against a dead host read each
     * envelope ten times in one turn. */
    t->d->fail_env_keep = true;
    while (!fairq_empty(&t->q)) {
        if (budget && d->fail_in_turn >= FAIL_TURN_RCPTS) {
            if (fail_more_set(t, o, src))
                break;
            budget = false; /* no memory to keep o: all now, as before */
        }
        if ((j = dest_pop(t)) == NULL)
            break;
        unsigned n = j->n;
        if (!t->d->ops->fail(t->d, t, j, o, src)) {
            j->next_parked = kept; /* a link while it is on no list */
            kept = j;
        } else
            d->fail_in_turn += n;
    }
    job_fail_pass_end(t->d);
    if (fairq_empty(&t->q)) {
        /* nothing left for a failure kept from an earlier call */
        free(t->fail_more);
        t->fail_more = NULL;
    }
    if (kept == NULL)
        return;
    while ((j = kept) != NULL) {
        kept = j->next_parked;
        j->next_parked = NULL;
        dest_push(t, j, true); /* the last kept first: back in order */
    }
    dest_lim_wait(t, t->d->w->now + MS_TO_NS(HOLD_MIN_MS));
}

/* (internal.h) */
void
dest_fail_more(struct dest *t)
{
    struct dest_fail *f = t->fail_more, *own = t->last_fail;
    if (f == NULL)
        return;
    /* f is this call's: dest_fail_each keeps a copy of its own when it
     * leaves jobs again */
    t->fail_more = NULL;
    if (t->fail_more_where)
        t->last_fail = f; /* job_fail tells where from it, as dest_fail_where */
    dest_fail_each(t, &f->o, (enum classify_source)t->fail_more_src);
    t->last_fail = own;
    free(f);
}

/* Every waiting job of t fails as f says, with text as the reply (f's
 * own when NULL). */
void
dest_fail_all(struct dest *t, const struct policy_fail *f, const char *text)
{
    struct smtp_outcome o;
    job_outcome(&o, f, text);
    dest_fail_each(t, &o, f->src);
}

/* Every waiting job of t fails with f's outcome, told where f says
 * (MX host, address, source, TLS), untried or not; t's own last failure
 * stays. False: no memory for it, nothing failed. */
bool
dest_fail_where(struct dest *t, const struct dest_fail *f, bool untried)
{
    struct dest_fail *own = t->last_fail, *copy = malloc(sizeof(*copy));
    if (copy == NULL)
        return false;
    *copy = *f;
    copy->untried = untried;
    /* job_fail tells where from t->last_fail (o == &t->last_fail->o):
     * the copy stands there while the jobs fail, t->running keeping any
     * other run of t out, and t's own comes back after. */
    t->last_fail = copy;
    dest_fail_each(t, &copy->o, CLASSIFY_CONNECT);
    free(t->last_fail);
    t->last_fail = own;
    return true;
}

/* t's site rests because every address failed for another of its
 * domains (f, how the last one did): t's waiting mail is deferred with
 * that failure, as the failing domain's was (a transient_failure event
 * for each recipient, the retry schedule), rather than wait in memory
 * through rest after rest, unseen by the sender, while one domain at a
 * time meets the dead host (Postfix defers mail for a destination it
 * marked dead the same way). A 421's rest keeps it waiting: the receiver
 * pushed back for a while. */
void
dest_fail_as_site(struct dest *t, const struct dest_fail *f)
{
    /* t's mail was not tried: its attempts stay. Without memory for the
     * copy it waits, checked for expiry, as before. */
    (void)dest_fail_where(t, f, true);
}

/* t could not open a connection for a reason of this node (why; what
 * follows is policy_open_failed's): with none of t open, its waiting
 * jobs are deferred with the cause, named with the source address (a
 * transient_failure for each recipient, the retry schedule); with some
 * open, they wait for those. Either way t opens nothing more until its
 * hold ends, which also keeps conn_open's error line to one per hold
 * (it was every second, per destination). */
void
dest_open_failed(struct dest *t, const struct open_fail *why)
{
    uint64_t ms = policy_all_failed_hold(t->pol->site_hold);
    if (t->conns == 0) {
        struct policy_fail pf;
        policy_job(POLICY_OPEN_FAILED, &pf);
        /* Where: the source it would have left from, no MX host (none
         * was reached, none is to blame). */
        struct dest_fail f;
        memset(&f, 0, sizeof(f));
        snprintf(f.source, sizeof(f.source), "%s", why->source);
        char text[sizeof(f.o.text)];
        if (why->source[0] != '\0')
            snprintf(text, sizeof(text), "%s from %s: %s", pf.text, why->source,
                     strerror(-why->err));
        else
            snprintf(text, sizeof(text), "%s: %s", pf.text, strerror(-why->err));
        job_outcome(&f.o, &pf, text);
        if (!dest_fail_where(t, &f, false))
            dest_fail_all(t, &pf, text);
    }
    log_msg(LOG_NOTICE, "event=destination_held domain=%s for_ms=%llu reason=open_failed", t->name,
            (unsigned long long)ms);
    dest_hold(t, ms);
}

