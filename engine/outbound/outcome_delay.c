/*
 * outcome_delay: one delay warning per message ([bounce] delay_warning),
 * as Postfix's delay_warning_time sends: a message still waiting that
 * long after its arrival gives its sender one DSN (Action: delayed)
 * naming every recipient of it still waiting (deferred, or queued: its
 * domain suspended) that asked for one (NOTIFY=DELAY; Postfix also
 * warns for a recipient given without NOTIFY, sluice does not: a bulk
 * sender's bounce address would get one per slow message), not one per
 * delivery batch (a message to 50 slow
 * domains gave 50). The check runs once an outcome past delay_warning is
 * durable (outcome_done, outcome.c: info.delay_check): it reads the
 * envelope again and, unless the message is marked warned or others of
 * its recipients are still in flight or queued (for at most [bounce]
 * dsn_wait more: the last of them to be committed sends it, as Postfix's
 * goes when the message leaves the active queue), commits the mark
 * (QUEUE_WARNED) with the warning. The spool applies the mark once: of
 * two checks that cross, the second's commit is stale whole (its one
 * outcome), and its DSN is never stored. A kill -9 between an outcome's
 * commit and its check's leaves the message unmarked: the next outcome
 * of it sends the warning then, if a recipient is deferred still (a
 * message delivered or failed by then needs none). A check that waits
 * for others comes again at the end of that wait (struct delay_recheck).
 *
 * Threading: the worker's thread.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/classify.h"
#include "engine/config.h"
#include "engine/dlog.h"
#include "engine/dsn.h"
#include "engine/outbound/internal.h"
#include "engine/outbound/outcome_int.h"
#include "engine/outbound/policy.h"
#include "engine/worker.h"
#include "queue/queue.h"

/* A message's warning waiting for the others of its recipients in flight
 * or queued, at most [bounce] dsn_wait: the check again then, so that a
 * recipient that stays queued (its domain suspended) holds it no longer,
 * whenever the message's next outcome comes. In memory: after a restart
 * the message's next outcome sends it. */
struct delay_recheck {
    struct hash_node hn; /* in d->delay_recheck_ids, by id */
    struct timer timer;
    struct delivery *d;
    struct delay_recheck *prev, *next; /* on d->delay_rechecks */
    uint64_t id;
    char tenant[QUEUE_MAX_TAG + 1];
    char domain[256]; /* the destination the check commits on */
};

static bool
recheck_eq(const struct hash_node *n, const void *key)
{
    return ((const struct delay_recheck *)n)->id == *(const uint64_t *)key;
}

static void
recheck_unlink(struct delay_recheck *x)
{
    struct delivery *d = x->d;
    hash_remove(&d->delay_recheck_ids, &x->hn);
    if (x->prev)
        x->prev->next = x->next;
    else
        d->delay_rechecks = x->next;
    if (x->next)
        x->next->prev = x->prev;
}

static void
recheck_on_timer(struct timer *tm, void *ctx)
{
    (void)ctx;
    struct delay_recheck *x =
        (struct delay_recheck *)((char *)tm - offsetof(struct delay_recheck, timer));
    struct delivery *d = x->d;
    recheck_unlink(x);
    struct dest *t = d->stopping ? NULL : dest_get(d, x->domain);
    if (t != NULL) {
        struct outcome_info info = {.now_ms = clock_unix_ms()};
        snprintf(info.tenant, sizeof(info.tenant), "%s", x->tenant);
        outcome_delay_check(d, t, x->id, &info, NULL);
    }
    free(x);
}

/* The check of message id again at unix ms at, on t (one per message). */
static void
recheck_arm(struct delivery *d, struct dest *t, uint64_t id, const char *tenant, uint64_t at,
            uint64_t now)
{
    /* One a message, found by id: a walk of the list for each arm was
     * quadratic in the messages waiting (a backlog's, behind a suspended
     * domain, inside one dsn_wait). */
    if (d->delay_recheck_ids.eq == NULL)
        hash_init(&d->delay_recheck_ids, recheck_eq, 16);
    uint64_t h = hash_bytes(&id, sizeof(id));
    if (hash_find(&d->delay_recheck_ids, h, &id) != NULL)
        return;
    struct delay_recheck *x = calloc(1, sizeof(*x));
    if (x == NULL)
        return; /* the message's next outcome checks again */
    x->hn.hash = h;
    if (hash_insert(&d->delay_recheck_ids, &x->hn) != 0) {
        free(x);
        return;
    }
    x->d = d;
    x->id = id;
    snprintf(x->tenant, sizeof(x->tenant), "%s", tenant);
    snprintf(x->domain, sizeof(x->domain), "%s", t->name);
    x->next = d->delay_rechecks;
    if (x->next)
        x->next->prev = x;
    d->delay_rechecks = x;
    timer_init(&x->timer, recheck_on_timer);
    worker_timer_arm(d->w, &x->timer, d->w->now + MS_TO_NS(at > now ? at - now : 0) + 1);
}

void
outcome_delay_cancel(struct delivery *d)
{
    for (struct delay_recheck *x = d->delay_rechecks; x != NULL; x = x->next)
        worker_timer_cancel(d->w, &x->timer);
}

void
outcome_delay_free(struct delivery *d)
{
    while (d->delay_rechecks != NULL) {
        struct delay_recheck *x = d->delay_rechecks;
        d->delay_rechecks = x->next;
        hash_remove(&d->delay_recheck_ids, &x->hn);
        free(x);
    }
    if (d->delay_recheck_ids.eq != NULL)
        hash_fini(&d->delay_recheck_ids);
}

/* Does r ask for a delay warning, now or later (not a failure held)? */
static bool
delay_wanted(const struct queue_rcpt *r)
{
    return r->tag != DSN_HELD_TAG && dsn_wanted(r->notify, DSN_ACTION_DELAYED);
}

bool
outcome_delay_due(const struct delivery *d, const struct queue_envelope *env, uint64_t now)
{
    const struct config *cfg = d->cfg;
    if (env == NULL || env->delay_warned || env->sender[0] == '\0' || !cfg->bounce.dsn ||
        cfg->bounce.delay_warning == 0 || now < env->arrival_ms + cfg->bounce.delay_warning)
        return false;
    for (unsigned k = 0; k < env->nrcpt; k++)
        if (delay_wanted(&env->rcpt[k]))
            return true;
    return false;
}

/* The enhanced code opening text ("4.2.0 ..."), or cls 0. */
static struct smtp_enh
delay_enh(const char *text)
{
    struct smtp_enh e = {0};
    unsigned c, s, x;
    int n = 0;
    if (text == NULL || (text[0] != '4' && text[0] != '5') ||
        sscanf(text, "%1u.%3u.%3u%n", &c, &s, &x, &n) != 3 ||
        (text[n] != '\0' && text[n] != ' '))
        return e;
    e.cls = (uint8_t)c;
    e.subject = (uint16_t)s;
    e.detail = (uint16_t)x;
    return e;
}

void
outcome_delay_check(struct delivery *d, struct dest *t, uint64_t id,
                    const struct outcome_info *info, const struct outcome_batch *b)
{
    const struct config *cfg = d->cfg;
    struct queue_envelope *env = NULL;
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(id, qid);
    int rc = queue_envelope_get(d->queue, id, &env);
    if (rc != 0) {
        /* gone: every recipient is done, nobody to warn; unreadable: the
         * next deferral of the message tries again */
        if (rc != QUEUE_ENOTFOUND)
            log_msg(LOG_ERR, "id=%s event=envelope_read_failed err=\"%s\" note=delay_warning_later",
                    qid, queue_strerror(rc));
        return;
    }
    uint64_t now = clock_unix_ms();
    bool ready = false;
    for (unsigned k = 0; k < env->nrcpt; k++)
        ready |= env->rcpt[k].tag != DSN_HELD_TAG && env->rcpt[k].state == QUEUE_RCPT_READY;
    /* Others in flight or queued: the commit of the last of them sends it,
     * naming them too if they are deferred (Postfix's, as the message
     * leaves the active queue); dsn_wait bounds that wait, as for the
     * failures' DSN */
    uint64_t last = env->arrival_ms + cfg->bounce.delay_warning + cfg->bounce.dsn_wait;
    if (!outcome_delay_due(d, env, now) || (ready && now < last)) {
        /* stopping: no timer outlives the worker (outcome_delay_cancel
         * may have run); the next start's outcomes check again */
        if (ready && now < last && !d->stopping && outcome_delay_due(d, env, now))
            recheck_arm(d, t, id, info->tenant, last, now);
        queue_envelope_free(env);
        return;
    }
    struct dsn_rcpt *dr = calloc(env->nrcpt, sizeof(*dr));
    char(*status)[DSN_STATUS_MAX] = calloc(env->nrcpt, sizeof(*status));
    unsigned n = 0;
    for (unsigned k = 0; dr != NULL && status != NULL && k < env->nrcpt; k++) {
        const struct queue_rcpt *r = &env->rcpt[k];
        /* deferred, or still queued: one never tried (its domain
         * suspended, a backlog) has waited since the arrival as much, and
         * the mark keeps any later warning from it */
        if (!delay_wanted(r))
            continue;
        struct smtp_enh enh = delay_enh(r->last_reply);
        dsn_status_format(status[n], sizeof(status[n]), &enh, r->last_code, DSN_ACTION_DELAYED);
        status[n][0] = '4'; /* a 5xx greeting, retried elsewhere: still a delay */
        const struct domain_policy *pol = config_domain(cfg, r->domain);
        unsigned tag = r->tag;
        dr[n] = (struct dsn_rcpt){
            .addr = r->addr,
            .orcpt = r->orcpt,
            .action = DSN_ACTION_DELAYED,
            .status = status[n],
            .code = r->last_code,
            .text = r->last_reply != NULL && r->last_reply[0] != '\0' ? r->last_reply : NULL,
            /* the MX whose session deferred it, known only to the batch that
             * did (the spool keeps none): none for one never tried */
            .remote_mta = outcome_batch_deferred_mx(b, r->index, r->last_code),
            .last_attempt_ms = r->last_ms,
            .retry_until_ms =
                policy_expiry(env->arrival_ms, pol != NULL ? pol->max_age : 0, env->expire_ms),
            .class_str = tag >= 1 && tag <= BOUNCE_CLASS_COUNT
                             ? bounce_class_str((enum bounce_class)(tag - 1))
                             : bounce_class_str(BOUNCE_OTHER),
        };
        n++;
    }
    struct dsn_msg *dm = n > 0 ? outcome_dsn_make(d, env, dr, n) : NULL;
    if (dm != NULL) {
        /* the mark and the warning, committed together (quiet: it tells no recipient) */
        struct queue_outcome qo = {.id = id, .kind = QUEUE_WARNED};
        struct outcome_tell tl = {.quiet = true};
        unsigned lines = 0;
        struct json ev;
        json_init(&ev);
        struct dlog_writer *lw = d->dlog;
        dlog_capture(lw, &ev, false);
        outcome_dsn_event(d, dm, dr, n);
        dlog_capture(lw, NULL, false);
        bool lost = json_failed(&ev);
        struct outcome_info mi = {.now_ms = now};
        snprintf(mi.tenant, sizeof(mi.tenant), "%s", info->tenant);
        snprintf(mi.tls_policy, sizeof(mi.tls_policy), "-");
        rc = outcome_commit(d, t, &qo, &tl, &lines, 1, dm, lost ? NULL : ev.buf,
                            lost ? 0 : ev.len, &mi, NULL, false);
        json_fini(&ev);
        if (rc < 0) {
            dsn_msg_free(dm);
            log_msg(LOG_ERR,
                    "id=%s event=outcome_submit_failed err=\"%s\" note=delay_warning_later", qid,
                    queue_strerror(rc));
        }
    }
    free(dr);
    free(status);
    queue_envelope_free(env);
}
