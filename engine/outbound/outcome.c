/*
 * outcome: acting on what became of a job. For each recipient the
 * failure policy (outbound/policy.c) says delivered, bounced, expired or
 * deferred (and when); this file writes that to the spool in one batch
 * per job, logs it (the log line and the delivery log's record, with the
 * configured message headers), counts it, and hands the DSN it causes
 * (RFC 3464: a bounce, an expiry, or a success report when the server
 * that took it offered no DSN) to the spool in the same commit: one DSN
 * per message for its failures and successes to report, which wait held
 * in the spool while others of the message are in flight ("one DSN per
 * message" below). A delay warning is the message's too, once, after the
 * commit of an outcome past [bounce] delay_warning (outcome_delay.c). A
 * commit that fails is tried again, backing off, for as long as the
 * worker runs (one that happened though its sync was reported failed is
 * found stale when tried again: the spool applies no outcome, event or
 * DSN twice, queue.h); once durable, the DSN is logged and submitted for
 * delivery like any message. Until then the spool still lists the
 * recipients: every batch is on d->pending, and an operator's bounce
 * leaves out those whose final outcome is on its way
 * (outcome_pending_drop), so that each is told once.
 *
 * Told once, and only if applied. An outcome can be stale by the time
 * its commit runs: the envelope was read before another worker's commit
 * (an operator's bounce, say) removed the recipient. The spool ignores
 * it, and only the commit knows: so what tells an outcome waits for the
 * commit's completion, which says per outcome whether it applied
 * (queue_update_enqueue_events, applied): the counters (d->stats, per
 * tenant, pool and source, and the destination's for the domains view:
 * delivered, failed, deferrals by class), the log line (event=delivered
 * and the others), the delivery log's line (captured when the
 * outcome is decided, written to the file then; the event sinks' copy
 * is committed by the spool for applied outcomes only), its count per
 * class, and the suppression list. The DSN cannot wait (it is committed
 * with its outcomes): the commit refuses the whole batch (QUEUE_ESTALE)
 * when one of its outcomes is stale while others are not; the batch is
 * then made again without the stale outcomes, with a DSN that names the
 * others only (made again, the envelope read again, when it named a
 * stale one), and submitted. The decision of which applied is the
 * committer's, in one write transaction, so it holds across workers.
 * A destination with a batch not told yet is not evicted (t->untold).
 * What tells the attempt rather than the recipient's outcome stays in
 * job_finish: the destination's last reply, address failures, backoff
 * and shaping say what the server answered. After a try that failed, an
 * outcome found stale may have been applied by that try (its sync
 * failed, queue.h): it is told then, at least once, as after a crash.
 *
 * Threading: the worker's thread.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/clock.h"
#include "common/intern.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/dlog.h"
#include "engine/dsn.h"
#include "engine/msa.h"
#include "engine/shaping.h"
#include "engine/outbound/internal.h"
#include "engine/outbound/outcome_int.h"
#include "engine/suppress.h"
#include "queue/queue.h"

#define HDR_SCAN_MAX   (16 * 1024)  /* of a message searched for delivery-log headers */
/* An expiry's enhanced code, in its event, its log line and its DSN
 * alike (RFC 3463: delivery time expired), whatever the last attempt's. */
#define EXPIRED_STATUS "4.4.7"

/* The outcomes of one job, kept (replies copied) until their commit is
 * durable: a commit that fails (I/O, or a spool so full that even the
 * reserve for outcomes is gone) is tried again, backing off, for as long
 * as the worker runs. Without that the recipients would wait in the spool,
 * ready, with nobody to take them until a restart. */
struct outcome_batch {
    struct delivery *d;
    struct dest *t; /* borrowed: kept from eviction while t->untold counts b */
    struct outcome_batch *prev, *next; /* on d->retrying while waiting to retry */
    struct outcome_batch *pprev, *pnext; /* on d->pending until durable or given up */
    struct timer timer;
    unsigned tries;
    bool maybe_applied;  /* a try failed in the spool: its commit may have landed */
    bool recheck;        /* once durable, see whether the message's held failures can go */
    struct dsn_msg *dsn; /* owned: committed with the outcomes, or NULL */
    char *events;        /* into the allocation: their delivery log lines, or NULL */
    size_t events_len;
    unsigned *ev_lines;  /* into the allocation: n counts, o[i]'s lines of events (the
                          * spool writes them only if o[i] applies; the DSN's follow) */
    struct outcome_tell *tell; /* into the allocation: n */
    bool *applied;             /* into the allocation: n, set by the spool (queue.h) */
    struct outcome_info info;
    size_t n;
    struct queue_outcome o[]; /* then tell, ev_lines, applied, then the texts */
};

static void outcome_done(void *cookie, int rc);
static void outcome_failed(struct outcome_batch *b, int rc);

/* The id of b's message (a batch is one job's), for its log lines: that
 * of the message its DSN reports on when it has no outcome, else "-". */
static const char *
batch_qid(const struct outcome_batch *b, char qid[QUEUE_ID_STRLEN + 1])
{
    if (b->n > 0)
        queue_id_str(b->o[0].id, qid);
    else if (b->dsn != NULL)
        queue_id_str(b->dsn->orig, qid);
    else
        snprintf(qid, QUEUE_ID_STRLEN + 1, "-");
    return qid;
}
static void dsn_committed(struct delivery *d, const struct dsn_msg *m);

/* b is durable, or given up (the spool keeps its recipients for the
 * next start): off d->pending, freed with its DSN. */
static void
outcome_batch_free(struct outcome_batch *b)
{
    struct delivery *d = b->d;
    if (b->pprev)
        b->pprev->pnext = b->pnext;
    else if (d->pending == b)
        d->pending = b->pnext;
    if (b->pnext)
        b->pnext->pprev = b->pprev;
    b->t->untold--;
    dsn_msg_free(b->dsn);
    free(b);
}

/* Take out of j the recipients whose final outcome (delivered, bounced)
 * is on its way to the spool: submitted, or waiting to be tried again,
 * not durable yet. The spool's envelope still lists them, yet they are
 * done, and told already. One pass over d->pending (a batch is one job's:
 * one message). Returns how many were taken out. */
unsigned
outcome_pending_drop(const struct delivery *d, struct job *j)
{
    unsigned dropped = 0;
    for (const struct outcome_batch *b = d->pending; b != NULL && j->n > 0; b = b->pnext) {
        if (b->n == 0 || b->o[0].id != j->id)
            continue;
        for (size_t i = 0; i < b->n; i++) {
            if (b->o[i].kind != QUEUE_DELIVERED && b->o[i].kind != QUEUE_BOUNCED &&
                !b->tell[i].held)
                continue;
            unsigned m = 0;
            for (unsigned k = 0; k < j->n; k++)
                if (j->idx[k] != b->o[i].rcpt)
                    j->idx[m++] = j->idx[k];
            dropped += j->n - m;
            j->n = m;
        }
    }
    return dropped;
}

static void
outcome_submit(struct outcome_batch *b)
{
    struct delivery *d = b->d;
    struct queue_envelope denv;
    struct queue_rcpt drcpt;
    struct iovec dbody;
    if (b->dsn != NULL)
        dsn_msg_envelope(b->dsn, &denv, &drcpt, &dbody);
    /* the lines go in the commit for the event sinks (queue.h, "events") */
    bool sinks = d->events != NULL && b->events_len > 0;
    for (size_t i = 0; i < b->n; i++)
        b->applied[i] = false;
    int rc = queue_update_enqueue_events(d->queue, d->port, b->o, b->n, b->dsn ? &denv : NULL,
                                         &dbody, b->dsn ? 1 : 0, sinks ? b->events : NULL,
                                         sinks ? b->events_len : 0, sinks ? b->ev_lines : NULL,
                                         b->applied, outcome_done, b);
    if (rc < 0)
        outcome_failed(b, rc); /* refused before any commit */
}

static void
outcome_on_retry(struct timer *tm, void *ctx)
{
    (void)ctx;
    struct outcome_batch *b = (struct outcome_batch *)((char *)tm - offsetof(struct outcome_batch, timer));
    struct delivery *d = b->d;
    if (b->prev)
        b->prev->next = b->next;
    else
        d->retrying = b->next;
    if (b->next)
        b->next->prev = b->prev;
    b->prev = b->next = NULL;
    outcome_submit(b);
}

/* The octets of the lines lines[0..n) tell, from off in text (one
 * outcome's lines each). */
static size_t
lines_len(const char *text, size_t len, size_t off, unsigned lines)
{
    size_t at = off;
    for (unsigned l = 0; l < lines && at < len; l++) {
        const char *nl = memchr(text + at, '\n', len - at);
        at = nl != NULL ? (size_t)(nl - text) + 1 : len;
    }
    return at - off;
}

/* Delivery log lines told: to the file; and to the event sinks' hook
 * unless the spool committed them for the sinks. */
static void
outcome_lines(struct delivery *d, const char *text, size_t len)
{
    struct dlog_writer *lw = d->dlog;
    if (len == 0 || lw == NULL)
        return;
    if (d->events != NULL)
        dlog_line(lw, text, len);
    else
        dlog_told(lw, text, len);
}

/* Count a recipient of a tenant, pool and source (each NULL: none). */
static void
owner_add(struct owner_count *a, struct owner_count *b, struct owner_count *c, unsigned dl,
          unsigned df, unsigned bo)
{
    struct owner_count *v[3] = {a, b, c};
    for (int i = 0; i < 3; i++)
        if (v[i] != NULL) {
            v[i]->delivered += dl;
            v[i]->deferred += df;
            v[i]->bounced += bo;
        }
}

/* The log line of b->o[i], told: what the server answered, and what
 * became of the recipient. */
static void
outcome_log(const struct outcome_batch *b, size_t i)
{
    const struct outcome_tell *tl = &b->tell[i];
    const struct queue_outcome *q = &b->o[i];
    enum dlog_kind kind = (enum dlog_kind)tl->kind;
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(q->id, qid);
    /* Code 0: no reply (a connect failure, a timeout; the reason says
     * which), never a code of its own. */
    char code[12] = "-";
    if (q->code != 0)
        snprintf(code, sizeof(code), "%u", q->code);
    const char *cls_str = kind == DLOG_DELIVERY ? NULL : bounce_class_str((enum bounce_class)tl->cls);
    log_msg(LOG_INFO,
            "id=%s event=%s rcpt=<%s> domain=%s mx=%s tls=\"%s\" tls_policy=%s "
            "tls_verify=\"%s\" code=%s enhanced=%s reason=%s class=%s reply=\"%s\"%s",
            qid, kind == DLOG_DELIVERY ? "delivered" : kind == DLOG_TRANSIENT_FAILURE ? "deferred"
                 : kind == DLOG_EXPIRATION ? "expired" : "bounced",
            tl->addr ? tl->addr : "?", b->t->name, b->info.mx[0] ? b->info.mx : "-",
            b->info.tls[0] ? b->info.tls : "none", b->info.tls_policy,
            tl->tls_verify[0] ? tl->tls_verify : "-", code, tl->enh[0] ? tl->enh : "-",
            smtp_reason_str(tl->reason), cls_str ? cls_str : "-",
            q->reply ? q->reply + tl->reply_skip : "", q->untried && !tl->held ? " tried=no" : "");
}

/* b's commit is durable: tell the outcomes it applied (the file's lines,
 * the counters, the suppression list), and the DSN's lines if dsn_told
 * (it was stored with them). */
static void
outcome_tell(struct outcome_batch *b, bool dsn_told)
{
    struct delivery *d = b->d;
    struct dlog_writer *lw = d->dlog;
    struct stats_tenant *ten =
        b->info.tenant[0] != '\0' ? stats_tenant_get(&d->tenants, b->info.tenant) : NULL;
    struct owner_count *oc_p = b->info.pool ? owner_count(d, SCOPE_POOL, b->info.pool) : NULL;
    struct owner_count *oc_s = b->info.src ? source_count(d, b->info.src) : NULL;
    size_t off = 0, dropped = 0;
    for (size_t i = 0; i < b->n; i++) {
        size_t len = lines_len(b->events, b->events_len, off, b->ev_lines[i]);
        const struct outcome_tell *tl = &b->tell[i];
        size_t from = off;
        off += len;
        if (!b->applied[i] && !b->maybe_applied)
            continue; /* stale: another commit told this recipient */
        if (tl->quiet)
            continue; /* told when it was held */
        if (len > 0) /* else events may be NULL: no delivery log */
            outcome_lines(d, b->events + from, len);
        outcome_log(b, i);
        dropped += tl->dsn_dropped;
        switch ((enum dlog_kind)tl->kind) {
        case DLOG_DELIVERY:
            b->t->delivered++;
            d->stats.delivered++;
            if (ten != NULL)
                ten->delivered++;
            owner_add(NULL, oc_p, oc_s, 1, 0, 0);
            if (tl->tls)
                d->stats.delivered_tls++;
            break;
        case DLOG_BOUNCE:
            b->t->failed++;
            d->stats.bounced++;
            if (ten != NULL)
                ten->bounced++;
            owner_add(NULL, oc_p, oc_s, 0, 0, 1);
            /* It did, as a note committed with the outcome (outcome_commit):
             * the list's writer copies it from the spool (suppress.h). */
            break;
        case DLOG_EXPIRATION:
            b->t->failed++;
            d->stats.expired++;
            if (ten != NULL)
                ten->expired++;
            owner_add(NULL, oc_p, oc_s, 0, 0, 1);
            break;
        default:
            b->t->deferred_by_class[tl->cls < BOUNCE_CLASS_COUNT ? tl->cls : BOUNCE_OTHER]++;
            d->stats.deferred++;
            if (ten != NULL)
                ten->deferred++;
            owner_add(NULL, oc_p, oc_s, 0, 1, 0);
            break;
        }
        dlog_count(lw, (enum dlog_kind)tl->kind, (enum bounce_class)tl->cls);
    }
    if (dsn_told && off < b->events_len)
        outcome_lines(d, b->events + off, b->events_len - off);
    if (dropped > 0) {
        /* Mail from <> (sluice's own DSNs among it) that failed: its
         * sender hears nothing, and the log says so once, not only by
         * the bounced line's empty sender. */
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(b->o[0].id, qid);
        log_msg(LOG_NOTICE, "id=%s event=dsn_dropped reason=null_sender recipients=%zu", qid,
                dropped);
    }
}

static int outcome_again(struct outcome_batch *b);

static void
outcome_done(void *cookie, int rc)
{
    struct outcome_batch *b = cookie;
    struct delivery *d = b->d;
    if (rc == 0) {
        /* Stored with the outcomes, unless all were stale (a try before
         * that failed may have stored it: its sync failed, queue.h). */
        bool any = b->maybe_applied;
        for (size_t i = 0; i < b->n; i++)
            any |= b->applied[i];
        outcome_tell(b, b->dsn != NULL && any);
        if (b->dsn != NULL && any)
            dsn_committed(d, b->dsn);
        if (b->recheck && !d->stopping && b->n > 0)
            outcome_held_recheck(d, b->t, b->o[0].id);
        /* stopping too (a commit of the drain's last transactions can be
         * durable after the stop has come): the warning a deferral carries
         * past delay_warning is committed as the deferral was (its DSN
         * waits in the spool for the next start), not left to a later
         * outcome that may be the message's delivery */
        if (b->info.delay_check && b->n > 0)
            outcome_delay_check(d, b->t, b->o[0].id, &b->info, b);
        outcome_batch_free(b);
        return;
    }
    if (rc == QUEUE_ESTALE) {
        if ((rc = outcome_again(b)) == 0)
            return;
    } else if (!queue_error_is_space(rc)) {
        b->maybe_applied = true;
    }
    outcome_failed(b, rc);
}

/* A try of b failed with rc: tried again later, backing off, or (the
 * worker stopping) left to the next start. On a full spool a DSN that
 * reports no failure (a delay warning, a success report) is dropped, so
 * that b commits within the half of the reserve kept for updates that
 * remove (queue/commit.c admit_msgs): a delivery that carried a success
 * report waited for room only deliveries would make, and held its
 * recipients meanwhile (the next hop has the message: a restart would
 * send it again). */
static void
outcome_failed(struct outcome_batch *b, int rc)
{
    struct delivery *d = b->d;
    b->tries++;
    if (queue_error_is_space(rc) && b->dsn != NULL && !b->dsn->failure) {
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(b->dsn->orig, qid);
        log_msg(LOG_WARN, "id=%s event=dsn_dropped reason=spool_full recipients=%zu", qid, b->n);
        b->dsn = dsn_msg_free(b->dsn);
        /* its delivery log lines (the dsn event) follow the outcomes' */
        size_t off = 0;
        for (size_t i = 0; i < b->n; i++)
            off += lines_len(b->events, b->events_len, off, b->ev_lines[i]);
        b->events_len = off;
    }
    if (d->stopping) {
        /* neither the outcomes nor their DSN are stored: the recipients
         * are tried again after the restart, and fail (and tell) again */
        char qid[QUEUE_ID_STRLEN + 1];
        log_msg(LOG_ERR,
                "id=%s event=outcome_commit_failed err=\"%s\" recipients=%zu dsn=%s "
                "note=retried_after_restart",
                batch_qid(b, qid), queue_strerror(rc), b->n, b->dsn ? "yes" : "no");
        outcome_batch_free(b);
        return;
    }
    unsigned shift = b->tries < 6 ? b->tries : 6;
    char qid[QUEUE_ID_STRLEN + 1];
    log_msg(b->tries == 1 ? LOG_ERR : LOG_WARN,
            "id=%s event=outcome_commit_failed err=\"%s\" recipients=%zu tries=%u "
            "retry_in_ms=%u",
            batch_qid(b, qid), queue_strerror(rc), b->n, b->tries, 500u << shift);
    b->next = d->retrying;
    if (b->next)
        b->next->prev = b;
    d->retrying = b;
    timer_init(&b->timer, outcome_on_retry);
    worker_timer_arm(d->w, &b->timer, d->w->now + MS_TO_NS(500u << shift));
}

static size_t
str_size(const char *p)
{
    return p != NULL ? strlen(p) + 1 : 0;
}

/* Copy p into *t (the allocation's texts), moving *t on; NULL stays NULL. */
static const char *
str_put(char **t, const char *p)
{
    if (p == NULL)
        return NULL;
    size_t l = strlen(p) + 1;
    memcpy(*t, p, l);
    const char *r = *t;
    *t += l;
    return r;
}

/* The suppression entry a bounce asks for, as a note (suppress.h) into
 * buf: its length, 0 none. An address that is gone goes on the list, as
 * the config says for its class: the global list (gone is gone, for
 * every tenant). A refusal of our MAIL FROM (or earlier) is about the
 * sender or the session, whatever its code says (Postfix's
 * reject_unlisted_sender: 550 5.1.0 "Sender address rejected: User
 * unknown"): it bounces every recipient of the transaction but says
 * nothing of them; so does such a refusal answered to RCPT (rcpt_named
 * false). Committed with the outcome, only if it applies (queue.h,
 * notes): a kill -9 after the commit cannot lose it. */
static bool
outcome_note_may(const struct delivery *d, const struct outcome_tell *tl)
{
    return d->suppress != NULL && tl->kind == DLOG_BOUNCE && tl->addr != NULL && tl->rcpt_named &&
           tl->cls == BOUNCE_INVALID_RECIPIENT;
}

static int
outcome_note(struct delivery *d, const struct queue_outcome *qo, const struct outcome_tell *tl,
             void *buf)
{
    if (!outcome_note_may(d, tl))
        return 0;
    /* a held failure's reply begins with its DSN entry (outcome_held_reply) */
    const char *text = qo->reply != NULL ? qo->reply + tl->reply_skip : NULL;
    int len =
        suppress_note_bounce(d->suppress, NULL, tl->addr, (enum bounce_class)tl->cls, text, buf);
    if (len < 0)
        log_msg(LOG_WARN, "event=suppress_feed_failed rcpt=<%s> err=\"%s\"", tl->addr,
                strerror(-len));
    return len > 0 ? len : 0;
}

/* Copy qo[0..n), their replies, what telling them takes (tl) and their
 * delivery log lines (ev[0..evlen): the first lines[0] lines tell qo[0],
 * and so on; the DSN's follow) into one batch and submit it, with the
 * DSN they cause (owned: taken over, but left to the caller when this
 * fails) or NULL. was:
 * the batch this one is made again from (outcome_again), or NULL. */
int
outcome_commit(struct delivery *d, struct dest *t, const struct queue_outcome *qo,
               const struct outcome_tell *tl, const unsigned *lines, size_t n, struct dsn_msg *dsn,
               const char *ev, size_t evlen, const struct outcome_info *info,
               const struct outcome_batch *was, bool recheck)
{
    size_t text = 0, notes = 0;
    for (size_t i = 0; i < n; i++) {
        text += str_size(qo[i].reply) + str_size(tl[i].addr) + str_size(tl[i].orcpt) +
                str_size(tl[i].mx);
        if (outcome_note_may(d, &tl[i]))
            notes += SUPPRESS_NOTE_BYTES; /* room for one: outcome_note */
    }
    struct outcome_batch *b = malloc(
        sizeof(*b) + n * (sizeof(b->o[0]) + sizeof(b->tell[0]) + sizeof(unsigned) + sizeof(bool)) +
        text + evlen + notes);
    if (b == NULL)
        return -ENOMEM;
    memset(b, 0, sizeof(*b));
    b->d = d;
    b->t = t;
    t->untold++;
    b->dsn = dsn;
    b->n = n;
    b->info = *info;
    b->recheck = recheck;
    if (was != NULL) {
        b->tries = was->tries;
        b->maybe_applied = was->maybe_applied;
        /* what crossed was may have left held failures of its message
         * alone (queue.h, QUEUE_TAG_HELD): see once this is durable */
        b->recheck = true;
    }
    b->tell = (struct outcome_tell *)&b->o[n];
    b->ev_lines = (unsigned *)&b->tell[n];
    b->applied = (bool *)&b->ev_lines[n];
    char *txt = (char *)&b->applied[n];
    for (size_t i = 0; i < n; i++) {
        b->ev_lines[i] = evlen > 0 ? lines[i] : 0;
        b->applied[i] = false;
        b->o[i] = qo[i];
        b->o[i].reply = str_put(&txt, qo[i].reply);
        b->tell[i] = tl[i];
        b->tell[i].addr = str_put(&txt, tl[i].addr);
        b->tell[i].orcpt = str_put(&txt, tl[i].orcpt);
        b->tell[i].mx = str_put(&txt, tl[i].mx);
    }
    if (evlen > 0) {
        memcpy(txt, ev, evlen);
        b->events = txt;
        b->events_len = evlen;
        txt += evlen;
    }
    for (size_t i = 0; i < n; i++) {
        b->o[i].note = NULL; /* qo may be a batch's made again: not its memory */
        b->o[i].note_len = 0;
        if (!outcome_note_may(d, &tl[i]))
            continue;
        int len = outcome_note(d, &qo[i], &tl[i], txt);
        if (len > 0) {
            b->o[i].note = txt;
            b->o[i].note_len = (size_t)len;
            txt += len;
        }
    }
    b->pnext = d->pending;
    if (b->pnext)
        b->pnext->pprev = b;
    d->pending = b;
    outcome_submit(b);
    return 0;
}

static uint64_t
rng_next(struct delivery *d)
{
    uint64_t x = d->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return d->rng = x;
}

/* The schedule's delay for a recipient deferred attempts times already,
 * lengthened by up to retry_jitter percent, by rnd: one draw per job, so
 * that the recipients of one transaction deferred together come due
 * together and go again in one transaction (a draw each scattered them
 * over many: the message sent once per recipient, a DSN each). */
static uint64_t
retry_delay_ms(struct delivery *d, const struct domain_policy *pol, unsigned attempts, uint64_t rnd)
{
    return policy_retry_delay(&pol->retry_schedule, attempts, d->cfg->delivery.retry_jitter, rnd);
}

/* When the recipients of id give up: max_age after arrival, or earlier
 * when the message carried its own expiry. */
uint64_t
job_expire_ms(const struct domain_policy *pol, const struct queue_envelope *env, uint64_t id)
{
    uint64_t arrival = env != NULL && env->arrival_ms != 0 ? env->arrival_ms : queue_id_time_ms(id);
    return policy_expiry(arrival, pol->max_age, env != NULL ? env->expire_ms : 0);
}

/* Values of the configured delivery-log headers in the message's header
 * section; vals[i] points into buf (NULL when absent). */
static void
job_headers(struct delivery *d, const struct config *cfg, uint64_t id, char *buf, size_t cap,
            const char **vals)
{
    const struct log_config *lc = &cfg->log;
    for (unsigned i = 0; i < lc->nheaders; i++)
        vals[i] = NULL;
    size_t len = 0;
    if (lc->nheaders == 0 || queue_body_read(d->queue, id, 0, buf, cap - 1, &len) != 0)
        return;
    buf[len] = '\0';
    for (char *line = buf; *line != '\0' && *line != '\r' && *line != '\n';) {
        char *eol = strstr(line, "\r\n");
        if (eol == NULL)
            break; /* cut by the scan's size */
        char *end = eol; /* the CRLF of the field's last line: past its continuations */
        for (char *more; (end[2] == ' ' || end[2] == '\t') && (more = strstr(end + 2, "\r\n"));)
            end = more;
        char *next = end + 2;
        char *colon = memchr(line, ':', (size_t)(eol - line));
        for (unsigned i = 0; colon != NULL && i < lc->nheaders; i++) {
            size_t n = strlen(lc->headers[i]);
            if (vals[i] == NULL && (size_t)(colon - line) == n &&
                strncasecmp(line, lc->headers[i], n) == 0) {
                /* unfolded in place (never longer), cut as the reception's */
                size_t room = (size_t)(end - colon) < DLOG_HEADER_MAX ? (size_t)(end - colon)
                                                                      : DLOG_HEADER_MAX;
                msa_unfold(colon + 1, (size_t)(end - colon - 1), colon + 1, room);
                vals[i] = colon + 1;
                break;
            }
        }
        line = next;
    }
}

/* The delivery log's dsn event, logged with the outcomes that cause the
 * DSN (so committed with them when events are on), naming r[0..n), the
 * recipients it reports (left out when no memory is left for the list). */
void
outcome_dsn_event(struct delivery *d, const struct dsn_msg *m, const struct dsn_rcpt *r, unsigned n)
{
    char qid[QUEUE_ID_STRLEN + 1], oqid[QUEUE_ID_STRLEN + 1];
    queue_id_str(m->id, qid);
    queue_id_str(m->orig, oqid);
    struct dlog_dsn_rcpt *dr = calloc(n ? n : 1, sizeof(*dr));
    for (unsigned i = 0; dr != NULL && i < n; i++)
        dr[i] = (struct dlog_dsn_rcpt){
            .rcpt = r[i].addr, .action = dsn_action_str(r[i].action), .status = r[i].status};
    struct dlog_event ev = {.kind = DLOG_DSN,
                            .id = oqid,
                            .reply = qid, /* what earlier versions wrote */
                            .dsn_id = qid,
                            .dsn_rcpt = dr,
                            .ndsn_rcpt = dr != NULL ? n : 0,
                            .size = m->len,
                            .tenant = m->tenant[0] ? m->tenant : NULL,
                            .campaign = m->campaign[0] ? m->campaign : NULL,
                            .pool = m->pool[0] ? m->pool : NULL};
    dlog_event(d->dlog, &ev);
    free(dr);
}

/* A DSN's commit (with its outcomes) is durable: count, log, deliver it. */
static void
dsn_committed(struct delivery *d, const struct dsn_msg *m)
{
    char qid[QUEUE_ID_STRLEN + 1], oqid[QUEUE_ID_STRLEN + 1];
    queue_id_str(m->id, qid);
    queue_id_str(m->orig, oqid);
    d->stats.dsn_queued++;
    log_msg(LOG_INFO, "id=%s event=dsn_queued dsn_id=%s", oqid, qid);
    /* Stopping (delivery_free drains the port after the loop ended and
     * the mailboxes were swept): no worker takes a job now. The DSN is
     * in the spool, ready: the next start's walk delivers it. */
    if (d->stopping)
        return;
    /* a DSN is its tenant's mail, through its pool, at no priority */
    delivery_submit_dsn(d, m->id, m->rcpt, m->tenant, m->pool, m->campaign);
}

/* The DSN for the recipients r[0..n) of env to its sender, to be
 * committed with their outcomes; NULL (logged) when it cannot be built. */
struct dsn_msg *
outcome_dsn_make(struct delivery *d, const struct queue_envelope *env, const struct dsn_rcpt *r,
         unsigned n)
{
    const struct config *cfg = d->cfg;
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(env->id, qid);
    /* RET=FULL is for a failure (dsn_build): a delay warning or a success
     * report reads no more than the headers need */
    bool failure = false;
    for (unsigned i = 0; i < n; i++)
        failure |= r[i].action == DSN_ACTION_FAILED;
    bool full = failure && env->ret == QUEUE_RET_FULL && env->body_len <= cfg->bounce.return_max;
    size_t want = full || env->body_len < DSN_HEADERS_READ ? env->body_len : DSN_HEADERS_READ;
    char *orig = malloc(want ? want : 1);
    size_t got = 0;
    if (orig == NULL || queue_body_read(d->queue, env->id, 0, orig, want, &got) != 0)
        got = 0;
    char from[300], msgid[400];
    snprintf(from, sizeof(from), "%s@%s", cfg->bounce.dsn_from, cfg->server.hostname);
    /* Unique across restarts too: the counter starts again with each
     * process, and a message can have DSNs from two (a bounce before a
     * restart, an expiry after); the start's time tells them apart. Two
     * DSNs with one Message-ID are one to a receiver that drops
     * duplicates. */
    snprintf(msgid, sizeof(msgid), "%s.dsn%llu.%llx.w%u@%s", qid, (unsigned long long)++d->dsn_seq,
             (unsigned long long)d->started_ms, d->w->id, cfg->server.hostname);
    struct dsn_input in = {
        .reporting_mta = cfg->server.hostname,
        .from_addr = from,
        .to_addr = env->sender,
        .message_id = msgid,
        .boundary_seed = msgid,
        .envid = env->envid,
        .queue_id = qid,
        .arrival_ms = env->arrival_ms,
        .now_ms = clock_unix_ms(),
        .orig = got ? orig : NULL,
        .orig_len = got,
        .orig_size = env->body_len,
        /* asked for, so that one over return_max says why it has headers
         * only (0: never whole) */
        .ret_full = failure && env->ret == QUEUE_RET_FULL && cfg->bounce.return_max != 0,
        .full_max = cfg->bounce.return_max,
        .smtputf8 = env->smtputf8,
        .rcpt = r,
        .nrcpt = n,
    };
    struct dsn_msg *m = NULL;
    int rc = dsn_msg_new(&in, env, queue_id_next(d->queue), &m);
    if (rc != 0)
        log_msg(LOG_ERR, "id=%s event=dsn_failed err=\"%s\"", qid,
                dsn_msg_strerror(rc, &in, env));
    free(orig);
    return m;
}

const char *
outcome_batch_deferred_mx(const struct outcome_batch *b, unsigned rcpt, unsigned code)
{
    if (b == NULL || b->info.mx[0] == '\0')
        return NULL;
    for (size_t i = 0; i < b->n; i++) {
        const struct queue_outcome *o = &b->o[i];
        if (o->rcpt == rcpt && b->applied[i] && o->kind == QUEUE_DEFERRED && !o->untried &&
            o->tag != DSN_HELD_TAG && o->code == code && b->tell[i].session)
            return b->info.mx;
    }
    return NULL;
}

/* The DSN's entry for the outcome told by tl (reply: its reply). */
void
outcome_dsn_rcpt_of(struct dsn_rcpt *x, const struct outcome_tell *tl, const char *reply,
            const struct outcome_info *info)
{
    memset(x, 0, sizeof(*x));
    x->addr = tl->addr;
    x->orcpt = tl->orcpt;
    x->action = (enum dsn_action)tl->action;
    x->status = tl->status;
    x->code = tl->dsn_code;
    x->text = reply != NULL && reply[0] != '\0' ? reply : NULL;
    /* no MTA reported anything when the connect failed (Postfix leaves
     * Remote-MTA out then too); a held failure's is its own */
    x->remote_mta = tl->quiet                               ? tl->mx
                    : tl->session && info->mx[0] != '\0' ? info->mx
                                                           : NULL;
    x->last_attempt_ms = tl->quiet && tl->at_ms != 0 ? tl->at_ms : info->now_ms;
    x->retry_until_ms = x->action == DSN_ACTION_DELAYED ? info->expire_ms : 0;
    x->class_str = x->action == DSN_ACTION_RELAYED ? NULL
                                                   : bounce_class_str((enum bounce_class)tl->cls);
}

/* b's commit was refused whole (QUEUE_ESTALE): its DSN names a recipient
 * that is done already (told by the commit that did it). Submit again
 * the outcomes that would have applied, with their lines and a DSN that
 * names those of them the old one named (the envelope read again: the
 * sender, the original); b is freed. Returns 0, or a code: b is kept and
 * tried again later (refused again, it is made again then). */
static int
outcome_again(struct outcome_batch *b)
{
    struct delivery *d = b->d;
    size_t n = 0;
    unsigned ndsn = 0;
    bool remake = false; /* the DSN names a stale outcome */
    for (size_t i = 0; i < b->n; i++) {
        if (b->applied[i]) {
            n++;
            ndsn += b->tell[i].dsn;
        }
        remake |= !b->applied[i] && b->tell[i].dsn;
    }
    struct queue_envelope *env = NULL;
    if (remake && ndsn > 0) {
        int erc = queue_envelope_get(d->queue, b->o[0].id, &env);
        if (erc != 0 && erc != QUEUE_ENOTFOUND)
            return erc;
        /* gone: every recipient is done now, the outcomes are stale */
    }
    struct queue_outcome *qo = calloc(n + 1, sizeof(*qo));
    struct outcome_tell *tl = calloc(n + 1, sizeof(*tl));
    unsigned *lines = calloc(n + 1, sizeof(*lines));
    struct dsn_rcpt *dr = calloc(ndsn + 1, sizeof(*dr));
    if (qo == NULL || tl == NULL || lines == NULL || dr == NULL) {
        free(qo);
        free(tl);
        free(lines);
        free(dr);
        queue_envelope_free(env);
        return -ENOMEM;
    }
    struct json ev;
    json_init(&ev);
    size_t off = 0, m = 0;
    unsigned nd = 0;
    for (size_t i = 0; i < b->n; i++) {
        size_t len = lines_len(b->events, b->events_len, off, b->ev_lines[i]);
        size_t from = off;
        off += len;
        if (!b->applied[i])
            continue;
        qo[m] = b->o[i];
        tl[m] = b->tell[i];
        lines[m] = b->ev_lines[i];
        if (len > 0)
            json_raw(&ev, b->events + from, len);
        if (tl[m].dsn && env != NULL)
            outcome_dsn_rcpt_of(&dr[nd++], &tl[m], qo[m].reply, &b->info);
        m++;
    }
    struct dsn_msg *dm = NULL;
    if (!remake) {
        /* the same DSN and its lines */
        dm = b->dsn;
        b->dsn = NULL;
        if (off < b->events_len)
            json_raw(&ev, b->events + off, b->events_len - off);
    } else if (nd > 0 && (dm = outcome_dsn_make(d, env, dr, nd)) != NULL) {
        struct dlog_writer *lw = d->dlog;
        dlog_capture(lw, &ev, false);
        outcome_dsn_event(d, dm, dr, nd);
        dlog_capture(lw, NULL, false);
    }
    for (size_t k = 0; k < m; k++)
        tl[k].dsn &= dm != NULL;
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(b->o[0].id, qid);
    log_msg(LOG_INFO, "id=%s event=outcome_stale_dropped recipients=%zu dsn_recipients=%u", qid,
            b->n - m, nd);
    if (m == 0)
        dm = dsn_msg_free(dm); /* nothing applies: nothing to tell */
    bool lost = json_failed(&ev);
    int rc = m == 0 ? 0
                    : outcome_commit(d, b->t, qo, tl, lines, m, dm, lost ? NULL : ev.buf,
                                     lost ? 0 : ev.len, &b->info, b, false);
    json_fini(&ev);
    queue_envelope_free(env);
    free(qo);
    free(tl);
    free(lines);
    free(dr);
    if (rc == 0)
        outcome_batch_free(b);
    else if (!remake)
        b->dsn = dm; /* kept for the next try */
    else
        dsn_msg_free(dm);
    return rc;
}

/* Did an MTA's session give o (an answer, a timeout, a lost connection),
 * not a connect that failed? Only then is its MX host the DSN's
 * Remote-MTA, and the one a hold's expiries name. */
static bool
mta_answered(const struct smtp_outcome *o)
{
    return o->reason != SMTP_REASON_CONNECT_REFUSED && o->reason != SMTP_REASON_CONNECT_TIMEOUT &&
           o->reason != SMTP_REASON_CONNECT_FAILED;
}

/* A receiver's reply that was not a delivery goes past the shaping rules
 * (shaping.h): one that fires starts an action for the source, the
 * destination group or the domain, on every node. */
void
outcome_shaping(struct delivery *d, struct dest *t, const char *mx, uint32_t src_id,
                uint32_t tenant, const struct smtp_outcome *o)
{
    const struct config *cfg = d->cfg;
    if (d->shaping == NULL || cfg->shaping_rules == NULL || o->code < 400 || o->code > 599)
        return;
    struct shaping_reply rep = {
        .code = o->code,
        .enh_cls = o->enh.cls,
        .enh_subject = o->enh.subject,
        .enh_detail = o->enh.detail,
        .text = o->text,
        .mx = mx,
        .domain = t->name,
    };
    const char *source = src_id != 0 ? intern_name(d->names, src_id) : "";
    const char *ten = tenant != 0 ? intern_name(d->names, tenant) : NULL;
    shaping_on_reply(d->shaping, cfg->shaping_rules, &rep, source ? source : "", ten);
}

/* Report the outcome of every recipient of job (from the transaction, or
 * one outcome for all when all is given) to the spool, the logs and the
 * sender (DSN). A temporary failure past the recipient's expiry is an
 * expiration; a deferral never reaches past it, so that a deferred
 * recipient comes due when it expires. */
void
job_finish(struct delivery *d, struct dest *t, struct job *j, const struct queue_envelope *env,
           const struct smtp_client_rcpt *rc, const struct smtp_outcome *all,
           const struct outcome_where *where)
{
    const struct config *cfg = d->cfg;
    /* The TLS policy the delivery was under (the delivery log's tls_policy). */
    const char *tls_policy =
        where->tls_policy != NULL ? where->tls_policy : dest_tls_policy_str(t, dest_tls(t));
    /* One DSN per message ([bounce] dsn_wait, "held" above): while other
     * recipients of it are ready, a failure of j (or a success to report)
     * is held; else the held ones go in this commit's DSN, with j's. */
    unsigned nheld = 0;
    uint64_t held_due = 0;
    bool hold = env != NULL && env->sender[0] != '\0' && cfg->bounce.dsn &&
                cfg->bounce.dsn_wait > 0 && outcome_held_scan(d, env, j, &nheld, &held_due);
    char *held_buf = hold ? calloc(j->n, QUEUE_MAX_REPLY + 1) : NULL; /* their replies */
    hold &= held_buf != NULL;
    unsigned extra = hold ? 0 : nheld; /* the held ones that go now */
    struct queue_outcome *qo = calloc(j->n + extra, sizeof(*qo));
    unsigned *qlines = calloc(j->n + extra, sizeof(*qlines)); /* qo[k]'s event lines */
    struct outcome_tell *qt = calloc(j->n + extra, sizeof(*qt)); /* what telling qo[k] takes */
    struct dsn_rcpt *dr = calloc(j->n + extra, sizeof(*dr));
    struct outcome_held_ent *he = calloc(extra ? extra : 1, sizeof(*he));
    if (qo == NULL || qlines == NULL || qt == NULL || dr == NULL || he == NULL) {
        log_msg(LOG_ERR, "event=outcome_lost_until_restart id=%016llx", (unsigned long long)j->id);
        free(qo);
        free(qlines);
        free(qt);
        free(dr);
        free(he);
        free(held_buf);
        return;
    }
    static const struct outcome_where nowhere = {.src = CLASSIFY_CONNECT};
    if (where == NULL)
        where = &nowhere;
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(j->id, qid);
    uint64_t now = clock_unix_ms();
    uint64_t expire = job_expire_ms(t->pol, env, j->id);
    struct dlog_writer *lw = d->dlog;
    const char *hvals[DLOG_HEADERS_MAX];
    char *hbuf = NULL;
    unsigned nhdr = lw != NULL ? cfg->log.nheaders : 0;
    if (nhdr > 0 && (hbuf = malloc(HDR_SCAN_MAX)) != NULL)
        job_headers(d, cfg, j->id, hbuf, HDR_SCAN_MAX, hvals);
    else
        nhdr = 0;
    /* The lines are told once the commit says which outcomes applied
     * (outcome_tell); with event sinks, they go in that commit too
     * (queue.h, "events"): durable together, numbered in order. */
    struct json evbuf;
    json_init(&evbuf);
    bool capture = lw != NULL;
    if (capture)
        dlog_capture(lw, &evbuf, false);
    unsigned ndsn = 0, nq = 0;
    /* Counted when told: one message, one tenant (none: not counted per
     * tenant), per pool and source (outbound/scope.c). */
    struct outcome_info info = {
        .pool = j->owner.pool, .src = where->src_id, .now_ms = now, .expire_ms = expire};
    if (env != NULL && env->tenant != NULL)
        snprintf(info.tenant, sizeof(info.tenant), "%s", env->tenant);
    if (where->mx != NULL)
        snprintf(info.mx, sizeof(info.mx), "%s", where->mx);
    if (where->tls_proto != NULL)
        snprintf(info.tls, sizeof(info.tls), "%s", where->tls_proto);
    snprintf(info.tls_policy, sizeof(info.tls_policy), "%s", tls_policy ? tls_policy : "-");
    bool shaped = false;
    bool backed_off = false; /* the rates halved (or the source held) for this job */
    bool delay_due = outcome_delay_due(d, env, now); /* its delay warning may go */
    uint64_t jitter = rng_next(d); /* the job's recipients' retry jitter (retry_delay_ms) */
    for (unsigned i = 0; i < j->n; i++) {
        const struct smtp_outcome *o = all ? all : &rc[i].out;
        const struct queue_rcpt *r = env != NULL ? queue_envelope_rcpt(env, j->idx[i]) : NULL;
        if (env != NULL && r == NULL)
            continue; /* no longer stored (done meanwhile): nothing to tell */
        if (r != NULL && r->tag == DSN_HELD_TAG)
            continue; /* failed already, its DSN held: not this job's (an operator's
                       * bounce that crossed the hold) */
        /* its event lines are told only if its outcome applies (it can
         * still be stale: done since env was read) */
        size_t ev_from = evbuf.len;
        unsigned *q_lines = &qlines[nq];
        struct outcome_tell *tl = &qt[nq];
        struct queue_outcome *q = &qo[nq++];
        q->id = j->id;
        q->rcpt = j->idx[i];
        q->code = o->code;
        q->reply = o->text;
        q->untried = false;
        enum dlog_kind kind;
        enum bounce_class cls = BOUNCE_OTHER;
        bool failed = false;
        /* The decision is the failure policy's (outbound/policy.h). */
        /* A TLS failure under an MTA-STS enforce policy is the policy's
         * refusal (class tls_policy), not a passing TLS problem; a session
         * that broke after a handshake the policy accepted is not. */
        enum classify_source osrc = policy_source(o, where->src);
        if (osrc == CLASSIFY_TLS && o->reason != SMTP_REASON_TLS && dest_sts_enforce(t))
            osrc = CLASSIFY_TLS_POLICY;
        enum bounce_class oc = o->status == SMTP_STATUS_DELIVERED
                                   ? BOUNCE_OTHER
                                   : classify(cfg->classify, osrc, o->code, &o->enh, o->text);
        /* Only a reply this job met: a deferral without a try (its site
         * resting) carries another domain's, which the rules already saw */
        if (o->status != SMTP_STATUS_DELIVERED && o->code >= 400 && !shaped &&
            !where->untried && policy_source(o, where->src) == CLASSIFY_REPLY) {
            shaped = true; /* one reply per job: its recipients share it, or nearly */
            outcome_shaping(d, t, where->mx, where->src_id, j->owner.tenant, o);
        }
        /* the schedule's delay for whatever the policy defers (a 552 for
         * too many recipients too, policy_rcpt) */
        unsigned step = r ? r->attempts : 0;
        if (where->untried && r != NULL && r->last_ms != 0 && now > r->last_ms)
            step = policy_retry_step_untried(&t->pol->retry_schedule, step, now - r->last_ms);
        uint64_t delay =
            o->status != SMTP_STATUS_DELIVERED ? retry_delay_ms(d, t->pol, step, jitter) : 0;
        struct policy_rcpt pr;
        policy_rcpt(o, oc, where->src, now, expire, delay, &pr);
        if (pr.kind == POLICY_DELIVERED) {
            q->kind = QUEUE_DELIVERED;
            kind = DLOG_DELIVERY;
            tl->tls = where->tls_proto != NULL;
        } else if (pr.kind == POLICY_BOUNCE) {
            q->kind = QUEUE_BOUNCED;
            kind = DLOG_BOUNCE;
            cls = oc;
            failed = true;
        } else if (pr.kind == POLICY_EXPIRE) {
            q->kind = QUEUE_BOUNCED;
            kind = DLOG_EXPIRATION;
            cls = BOUNCE_EXPIRED;
            failed = true;
        } else {
            q->kind = QUEUE_DEFERRED;
            q->due_ms = pr.due_ms;
            q->untried = where->untried;
            kind = DLOG_TRANSIENT_FAILURE;
            cls = oc;
            /* kept with the recipient: the domains view counts the waiting
             * recipients by class from the spool, across restarts */
            _Static_assert(BOUNCE_CLASS_COUNT < DSN_HELD_TAG, "a class + 1 is not the held tag");
            q->tag = (unsigned)cls < BOUNCE_CLASS_COUNT ? (unsigned)cls + 1 : 0;
            /* once per job: its recipients share the reply, or nearly, and
             * one reply is one sign of load (each halving the rates again,
             * a job of five took them to 1/32) */
            if (pr.backoff && !backed_off) {
                backed_off = true;
                if (where->src_id != 0 && t->poolc != NULL)
                    sched_source_throttled(t, where->src_id, where->mx, "rate_limited");
                else
                    limits_backoff(d->lim, &t->lim, d->w->now);
            }
        }
        tl->kind = (uint8_t)kind;
        tl->cls = (uint8_t)cls;
        tl->addr = r ? r->addr : NULL;
        /* A sender check answered at RCPT (Postfix's smtpd_delay_reject,
         * its default) names the sender, not the recipient; a verdict of
         * ours (an address or ORCPT we cannot send, reason ADDRESS) is
         * no server's word on it at all. */
        tl->rcpt_named = o->reason == SMTP_REASON_REPLY && o->stage >= SMTP_CLIENT_S_RCPT &&
                         o->stage <= SMTP_CLIENT_S_DOT &&
                         !(failed && classify_sender_refused(cfg->classify, &o->enh, o->text));
        /* An expiry is no news of the destination: its last reply stays,
         * with the MX host whose session gave it (the held destination's
         * expiries name both, dest_on_sweep). */
        bool answered = mta_answered(o);
        /* a deferral's too: its delay warning's Remote-MTA (outcome_delay_check) */
        tl->session = answered && !where->untried;
        if (kind != DLOG_DELIVERY && (o->code != 0 || where->src != CLASSIFY_EXPIRED)) {
            /* the code apart, with where it came from: the operators'
             * views show a server's code, never one of ours as if a
             * server had sent it (delivery_domains) */
            snprintf(t->last_reply, sizeof(t->last_reply), "%.150s", o->text);
            t->last_code = o->code;
            t->last_reason = o->reason;
            t->last_cls = (uint8_t)cls;
            dest_last_reply_at(t, answered ? where->mx : NULL, where->mx_addr);
        }
        t->last_ms = now;
        char enh[16] = "";
        if (kind == DLOG_EXPIRATION)
            /* The DSN's Status (below): the backend gets one answer per
             * recipient. The last attempt's code and reply stay its own. */
            snprintf(enh, sizeof(enh), "%s", EXPIRED_STATUS);
        else if (o->enh.cls != 0)
            snprintf(enh, sizeof(enh), "%u.%u.%u", o->enh.cls, o->enh.subject, o->enh.detail);
        const char *cls_str = kind == DLOG_DELIVERY ? NULL : bounce_class_str(cls);
        const char *reason = smtp_reason_str(o->reason);
        if (o->reason == SMTP_REASON_NONE || o->reason == SMTP_REASON_REPLY)
            reason = NULL; /* a server's reply, or a verdict of ours that its text says */
        const char *tls_verify = where->tls_verify;
        if (tls_verify == NULL && (osrc == CLASSIFY_TLS || osrc == CLASSIFY_TLS_POLICY) &&
            t->tls_verify[0] != '\0')
            tls_verify = t->tls_verify; /* the session that failed is gone */
        /* its log line is written when told (outcome_log) */
        tl->reason = o->reason;
        snprintf(tl->enh, sizeof(tl->enh), "%s", enh);
        snprintf(tl->tls_verify, sizeof(tl->tls_verify), "%s", tls_verify ? tls_verify : "");
        struct dlog_event ev = {
            .kind = kind,
            .time_ms = now,
            .id = qid,
            .rcpt = r ? r->addr : NULL,
            .sender = env ? env->sender : NULL,
            .domain = t->name,
            .mx = where->mx,
            .mx_addr = where->mx_addr,
            .source = where->source,
            .code = o->code,
            .enhanced = enh[0] ? enh : NULL,
            .reply = o->text[0] ? o->text : NULL,
            /* the tries so far and this one; a deferral of mail not tried
             * (where->untried) is none */
            .attempt = (r ? r->attempts : 0) + (where->untried ? 0 : 1),
            .untried = where->untried && kind == DLOG_TRANSIENT_FAILURE,
            .classification = cls_str,
            .reason = reason,
            .tls_protocol = where->tls_proto,
            .tls_cipher = where->tls_cipher,
            .tls_policy = tls_policy,
            .tls_verify = tls_verify,
            .size = env ? env->body_len : 0,
            .arrival_ms = env ? env->arrival_ms : queue_id_time_ms(j->id),
            .tenant = env && env->tenant && env->tenant[0] ? env->tenant : NULL,
            .campaign = env && env->campaign && env->campaign[0] ? env->campaign : NULL,
            .pool = env && env->pool && env->pool[0] ? env->pool : NULL,
            .priority = env ? env->priority : 0,
            .hdr_names = (const char *const *)cfg->log.headers,
            .hdr_values = hvals,
            .nhdr = nhdr,
        };
        dlog_event(lw, &ev); /* captured: told by outcome_tell */
        /* A delay warning is the message's, once (outcome_delay.c): an
         * outcome past delay_warning sees, once durable, whether it goes */
        info.delay_check |= r != NULL && delay_due;
        /* A success report (RFC 3461 5.2.2), for recipients that asked for
         * one (NOTIFY=SUCCESS), when the server that took the message did
         * not offer DSN: it got no NOTIFY, and will report nothing. One
         * that offered DSN got NOTIFY and ORCPT and reports itself. */
        bool relayed = kind == DLOG_DELIVERY && !where->dsn_passed;
        enum dsn_action act = failed ? DSN_ACTION_FAILED : DSN_ACTION_RELAYED;
        tl->dsn_dropped = failed && r != NULL && env != NULL && env->sender[0] == '\0' &&
                          cfg->bounce.dsn && dsn_wanted(r->notify, act);
        if ((failed || relayed) && r != NULL && env != NULL && env->sender[0] != '\0' &&
            cfg->bounce.dsn && dsn_wanted(r->notify, act)) {
            dsn_status_format(tl->status, sizeof(tl->status), &o->enh, o->code, act);
            if (kind == DLOG_EXPIRATION)
                snprintf(tl->status, sizeof(tl->status), "%s", EXPIRED_STATUS);
            tl->dsn = true;
            tl->action = (uint8_t)act;
            tl->orcpt = r->orcpt;
            tl->dsn_code = o->reason == SMTP_REASON_REPLY ? o->code : 0;
            tl->session = answered;
            if (hold) {
                /* held for the rest of its message (a failure, or a
                 * success report): a deferral, due when its DSN goes at
                 * the latest, its entry with its reply; told now */
                char *hb = held_buf + (size_t)(nq - 1) * (QUEUE_MAX_REPLY + 1);
                tl->reply_skip = outcome_held_reply(hb, QUEUE_MAX_REPLY + 1, tl,
                                                    answered ? where->mx : NULL, now, o->text);
                q->reply = hb;
                q->kind = QUEUE_DEFERRED;
                q->due_ms = held_due;
                q->tag = DSN_HELD_TAG;
                q->untried = false;
                tl->held = true;
                tl->dsn = false;
            } else {
                outcome_dsn_rcpt_of(&dr[ndsn++], tl, o->text, &info);
            }
        }
        for (size_t k = ev_from; capture && k < evbuf.len; k++)
            *q_lines += evbuf.buf[k] == '\n';
    }
    /* The held failures of the message go now, with j's: none of its
     * other recipients is ready */
    if (extra > 0 && nq > 0) {
        unsigned h = outcome_held_collect(env, &qo[nq], &qt[nq], &dr[ndsn], he, &info);
        nq += h;
        ndsn += h;
    }
    /* The DSN goes in the commit of the outcomes that cause it; the
     * spool refuses it if one it names is stale (outcome_again). */
    struct dsn_msg *dm = ndsn > 0 && nq > 0 ? outcome_dsn_make(d, env, dr, ndsn) : NULL;
    for (unsigned k = 0; k < nq; k++)
        qt[k].dsn &= dm != NULL;
    if (dm != NULL)
        outcome_dsn_event(d, dm, dr, ndsn);
    if (capture)
        dlog_capture(lw, NULL, false);
    bool lost = json_failed(&evbuf);
    if (lost)
        log_msg(LOG_ERR, "event=events_lost id=%s reason=out_of_memory", qid);
    int rc2 = nq == 0 ? 0
                      : outcome_commit(d, t, qo, qt, qlines, nq, dm, lost ? NULL : evbuf.buf,
                                       lost ? 0 : evbuf.len, &info, NULL, hold);
    json_fini(&evbuf);
    if (rc2 < 0) {
        dsn_msg_free(dm);
        log_msg(LOG_ERR, "event=outcome_submit_failed id=%s err=\"%s\"", qid,
                queue_strerror(rc2));
    }
    free(hbuf);
    free(qo);
    free(qlines);
    free(qt);
    free(dr);
    free(he);
    free(held_buf);
}

void
job_outcome(struct smtp_outcome *o, const struct policy_fail *f, const char *text)
{
    memset(o, 0, sizeof(*o));
    o->code = (uint16_t)f->code;
    o->status = f->permanent ? SMTP_STATUS_PERMFAIL : SMTP_STATUS_TEMPFAIL;
    o->scope = SMTP_SCOPE_SESSION;
    o->reason = SMTP_REASON_NONE;
    o->enh = f->enh;
    snprintf(o->text, sizeof(o->text), "%s", text != NULL ? text : f->text);
}

void
job_last_attempt_text(struct smtp_outcome *o, const char *what, const struct queue_envelope *env,
                      const struct job *j)
{
    for (unsigned i = 0; env != NULL && i < j->n; i++)
        for (unsigned k = 0; k < env->nrcpt; k++) {
            const struct queue_rcpt *r = &env->rcpt[k];
            if (r->index != j->idx[i] || r->last_reply == NULL || r->last_reply[0] == '\0')
                continue;
            if (r->last_code != 0)
                snprintf(o->text, sizeof(o->text), "%.150s; last attempt: %u %.300s", what,
                         r->last_code, r->last_reply);
            else
                snprintf(o->text, sizeof(o->text), "%.150s; last attempt: %.300s", what,
                         r->last_reply);
            return;
        }
    snprintf(o->text, sizeof(o->text), "%s", what);
}

/* A failure for a whole job without a session: DNS, no address, an
 * operator's bounce. */
bool
job_fail(struct delivery *d, struct dest *t, struct job *j, const struct smtp_outcome *o,
         enum classify_source src)
{
    struct queue_envelope *env = NULL;
    int erc = 0;
    if (d->fail_env != NULL && d->fail_env->id == j->id)
        env = d->fail_env; /* read for another job of the message in this pass */
    else {
        queue_envelope_free(d->fail_env);
        erc = queue_envelope_get(d->queue, j->id, &env);
    }
    d->fail_env = NULL; /* env is this call's until it is kept again (below) */
    if (erc == QUEUE_ENOTFOUND) {
        /* Every recipient of the message is done (a bounce that crossed
         * another, an outcome committed meanwhile): each was told once
         * already, nothing to tell again (as conn_next and the sweep). */
        free(j);
        return true;
    }
    if (erc != 0) {
        /* Without its envelope there is no sender to tell (DSN) and no
         * address to log: kept for the next try, as conn_next keeps it. */
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(j->id, qid);
        log_msg(LOG_ERR, "id=%s event=envelope_read_failed domain=%s err=\"%s\" note=kept",
                qid, t->name, queue_strerror(erc));
        return false;
    }
    struct outcome_where where = {.src = src};
    if (t->last_fail != NULL && o == &t->last_fail->o) {
        /* every address failed: the last one tried is where, with the
         * source and TLS its connection had */
        const struct dest_fail *f = t->last_fail;
        where.mx = f->mx[0] ? f->mx : NULL;
        where.mx_addr = f->addr[0] ? f->addr : NULL;
        where.source = f->source[0] ? f->source : NULL;
        where.tls_policy = f->tls_policy;
        where.tls_proto = f->tls_proto;
        where.tls_cipher = f->tls_cipher;
        where.tls_verify = f->tls_verify[0] ? f->tls_verify : NULL;
        where.untried = f->untried;
    }
    job_finish(d, t, j, env, NULL, o, &where);
    if (d->fail_env_keep && d->fail_env == NULL)
        d->fail_env = env; /* for the message's next job, if it follows */
    else
        queue_envelope_free(env);
    free(j);
    return true;
}

void
job_fail_pass_end(struct delivery *d)
{
    d->fail_env_keep = false;
    d->fail_env = queue_envelope_free(d->fail_env);
}

void
outcome_retrying_cancel(struct delivery *d)
{
    for (struct outcome_batch *b = d->retrying; b != NULL; b = b->next)
        worker_timer_cancel(d->w, &b->timer);
}

void
outcome_retrying_free(struct delivery *d)
{
    while (d->retrying != NULL) {
        struct outcome_batch *b = d->retrying;
        d->retrying = b->next;
        char qid[QUEUE_ID_STRLEN + 1];
        log_msg(LOG_ERR,
                "id=%s event=outcome_commit_failed recipients=%zu dsn=%s "
                "note=retried_after_restart",
                batch_qid(b, qid), b->n, b->dsn ? "yes" : "no");
        outcome_batch_free(b);
    }
}

unsigned
outcome_pending_log(const struct delivery *d)
{
    unsigned n = 0;
    for (const struct outcome_batch *b = d->pending; b != NULL; b = b->pnext) {
        for (size_t i = 0; i < b->n; i++) {
            const struct outcome_tell *tl = &b->tell[i];
            enum dlog_kind kind = (enum dlog_kind)tl->kind;
            char qid[QUEUE_ID_STRLEN + 1];
            queue_id_str(b->o[i].id, qid);
            if (b->o[i].kind == QUEUE_WARNED) {
                /* no recipient's: the message's delay warning and its
                 * mark; not stored, the message's next outcome sends it */
                log_msg(LOG_CRIT,
                        "id=%s event=outcome_unanswered domain=%s outcome=delay_warning "
                        "note=stored_or_not_the_spool_says_not_stored_goes_with_a_later_outcome",
                        qid, b->t->name);
                n++;
                continue;
            }
            if (tl->quiet) {
                /* a held recipient (told when held): its DSN, or its hold
                 * again; not stored, it stays held, its DSN after the restart */
                log_msg(LOG_CRIT,
                        "id=%s event=outcome_unanswered rcpt=<%s> domain=%s outcome=dsn_held "
                        "note=stored_or_not_the_spool_says_not_stored_its_dsn_goes_after_restart",
                        qid, tl->addr ? tl->addr : "?", b->t->name);
                n++;
                continue;
            }
            /* Stored or not, only the spool knows (sluice-spool): one not
             * stored is tried again after the restart; delivered, it is
             * then sent twice (at least once, never lost). */
            log_msg(LOG_CRIT,
                    "id=%s event=outcome_unanswered rcpt=<%s> domain=%s outcome=%s "
                    "note=stored_or_not_the_spool_says_not_stored_is_tried_again",
                    qid, tl->addr ? tl->addr : "?", b->t->name,
                    kind == DLOG_DELIVERY            ? "delivered"
                    : kind == DLOG_TRANSIENT_FAILURE ? "deferred"
                    : kind == DLOG_EXPIRATION        ? "expired"
                                                     : "bounced");
            n++;
        }
    }
    return n;
}
