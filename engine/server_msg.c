/*
 * server_msg: the message a submission session receives (see
 * server_int.h for the other files of the server): its body, held whole
 * from the first octet within [server] body_memory_limit (one budget for
 * every session of every worker), the transaction's state, the DKIM body
 * hash and the signing pool's hand-off, the spool commit that must
 * return before 250 is said, the reception event committed with the
 * message, the delivery log line and the hand-off to delivery. A commit
 * that lands is logged queued (and its reception event written) whether
 * or not its client can still be answered: gone, or the stop's loop
 * ended first (unanswered=stopping).
 *
 * Threading: the worker's thread; once its loop has ended, the thread
 * that frees the server (server_worker_free: the last commits' answers).
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/delivery.h"
#include "engine/dlog.h"
#include "engine/oob.h"
#include "engine/server_int.h"
#include "engine/suppress.h"
#include "tls/tls.h"

static void hand_to_delivery(struct session *s);
static void log_reception(struct session *s, const char *qid);
static void tenant_count(struct server_worker *sw, const char *name, unsigned nrcpt);

/* ---- message bodies ----
 *
 * A body is held whole in memory from its first octet until the commit
 * that stores it returns (the spool borrows it, no copy). Every worker's
 * sessions draw on one budget, e->body_bytes against [server]
 * body_memory_limit, counted by buffer capacity: what the daemon holds for
 * bodies, not what clients declared; the recipients of a transaction
 * draw on it too (cmd_rcpt, given back by txn_reset). A buffer that
 * cannot grow within it is dropped at once and the rest of the message is
 * read and discarded; the client gets 452 4.3.1 at the end of its data
 * and retries. Buffers from BODY_MMAP up are mappings of their own (grown
 * with mremap, which moves pages instead of copying them), so that a
 * large body's memory goes back to the system when it is released instead
 * of staying in the allocator's arenas.
 */

/* Take delta bytes of the body budget; false when they do not fit. */
bool
body_budget_take(struct engine *e, uint64_t delta, uint64_t limit)
{
    uint64_t used = atomic_load_explicit(&e->body_bytes, memory_order_relaxed);
    do {
        if (used > limit || delta > limit - used)
            return false;
    } while (!atomic_compare_exchange_weak_explicit(&e->body_bytes, &used, used + delta,
                                                    memory_order_relaxed,
                                                    memory_order_relaxed));
    return true;
}

void
body_budget_give(struct engine *e, uint64_t delta)
{
    atomic_fetch_sub_explicit(&e->body_bytes, delta, memory_order_relaxed);
}

static void
body_release(struct session *s)
{
    if (s->body != NULL) {
        if (s->body_cap >= BODY_MMAP)
            munmap(s->body, s->body_cap);
        else
            free(s->body);
        body_budget_give(s->sw->e, s->body_cap);
    }
    s->body = NULL;
    s->body_len = s->body_cap = 0;
}

/* Grow the buffer to hold at least want octets. Returns 0, -ENOBUFS when
 * the budget has no room, -ENOMEM. */
static int
body_grow(struct session *s, size_t want)
{
    size_t cap = s->body_cap;
    if (cap == 0) {
        /* The declared size, when there is one, is the first guess (room
         * for the pipelined commands after the data included): an honest
         * client's body takes one allocation. Up to BODY_STEP only: a
         * declaration costs a few octets, and must not let a trickling
         * client hold more of the budget than it sent. */
        uint64_t hint = s->size_hint < BODY_STEP ? s->size_hint : BODY_STEP;
        cap = BODY_START;
        if (hint + IN_CAP > cap)
            cap = (size_t)(hint + IN_CAP + 4095) & ~(size_t)4095;
    }
    while (cap < want) {
        if (cap < BODY_MMAP) {
            cap *= 2;
        } else {
            size_t step = cap / 8 > BODY_STEP ? cap / 8 : BODY_STEP;
            cap = (cap + step + 4095) & ~(size_t)4095;
        }
    }
    size_t delta = cap - s->body_cap;
    if (!body_budget_take(s->sw->e, delta, s->sw->cfg->body_memory_limit))
        return -ENOBUFS;
    char *b;
    if (cap < BODY_MMAP) {
        b = realloc(s->body, cap);
    } else if (s->body_cap >= BODY_MMAP) {
        b = mremap(s->body, s->body_cap, cap, MREMAP_MAYMOVE);
        b = b == MAP_FAILED ? NULL : b;
    } else {
        b = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (b == MAP_FAILED) {
            b = NULL;
        } else {
            if (s->body_len > 0)
                memcpy(b, s->body, s->body_len);
            free(s->body);
        }
    }
    if (b == NULL) {
        body_budget_give(s->sw->e, delta);
        return -ENOMEM;
    }
    s->body = b;
    s->body_cap = cap;
    return 0;
}

/* Make room for n more body octets; false when the message is already
 * known to be too large or its body cannot be held (then the content is
 * read and dropped, and the buffer is given back at once). n may count
 * octets past the end of the data (the next pipelined commands), so the
 * exact size is checked at the end. */
bool
body_reserve(struct session *s, size_t n)
{
    if (s->too_big || s->no_memory)
        return false;
    if (s->body_seen > s->sw->cfg->max_message_size) {
        s->too_big = true;
        body_release(s);
        return false;
    }
    if (s->body_len + n <= s->body_cap)
        return true;
    int rc = body_grow(s, s->body_len + n);
    if (rc < 0) {
        log_msg(LOG_WARN,
                "session=%016llx event=body_memory_full client=%s size=%llu held=%llu "
                "limit=%llu err=%s",
                (unsigned long long)s->id, s->peer_ip, (unsigned long long)s->body_seen,
                (unsigned long long)atomic_load(&s->sw->e->body_bytes),
                (unsigned long long)s->sw->cfg->body_memory_limit,
                rc == -ENOBUFS ? "body_memory_limit" : "no_memory");
        s->no_memory = true;
        body_release(s);
        return false;
    }
    return true;
}

/* ---- the transaction ---- */

void
txn_reset(struct session *s)
{
    supp_flush(s, NULL); /* a transaction that ended before its tenant was known */
    free(s->sender);
    s->sender = NULL;
    free(s->envid);
    s->envid = NULL;
    for (unsigned i = 0; i < s->nrcpt; i++) {
        free(s->rcpts[i].addr);
        free(s->rcpts[i].orcpt);
    }
    s->nrcpt = 0;
    if (s->rcpt_cap > RCPT_KEEP) {
        /* a long list's array goes too: an idle session keeps little */
        free(s->rcpts);
        s->rcpts = NULL;
        s->rcpt_cap = 0;
    }
    body_budget_give(s->sw->e, s->rcpt_bytes);
    s->rcpt_bytes = 0;
    s->in_txn = false;
    s->ret = SMTP_RET_NONE;
    s->body_type = SMTP_BODY_NONE;
    s->smtputf8 = false;
    body_release(s);
    s->body_seen = 0;
    s->size_hint = 0;
    s->too_big = s->no_memory = false;
    s->bdat_flags = s->bdat_line = 0;
    s->bdat_cr = false;
    s->bdat = s->bdat_discard = s->bdat_last = false;
    s->bdat_left = 0;
    s->msg_id = 0;
    free(s->ev_line);
    s->ev_line = NULL;
    s->ev_len = 0;
    free(s->oob);
    s->oob = NULL;
    s->hdrs_len = 0;
    s->expire_ms = 0;
    memset(&s->owner, 0, sizeof(s->owner));
    s->ncuts = 0;
    s->sep = false;
    s->sep_at = 0;
    s->dkim_keys = dkim_keyring_unref(s->dkim_keys);
    s->dkim_job = dkim_job_free(s->dkim_job);
    s->dkim_skip = NULL;
}

char *
session_span_dup(struct smtp_span sp)
{
    char *p = malloc(sp.len + 1);
    if (p != NULL) {
        memcpy(p, sp.ptr, sp.len);
        p[sp.len] = '\0';
    }
    return p;
}

/* ---- the spool ---- */

static void oob_commit_done(struct session *s, int rc);

static void
commit_done(struct session *s, int rc)
{
    if (s->oob != NULL) {
        oob_commit_done(s, rc);
        return;
    }
    s->inflight--;
    s->committing = false;
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(s->msg_id, qid);
    /* Closing (a TLS failure while the spool had the message): the last
     * reply is on its way and no 250 can follow it; the session stays
     * closing, as a closed one stays closed. Stopping: the loop has ended
     * (a drain that timed out, server_worker_free), no reply can leave. */
    bool gone = s->state == SS_CLOSED || s->state == SS_CLOSING;
    bool stopping = s->sw->stopping;
    const char *unanswered = gone ? " client_gone=1" : stopping ? " unanswered=stopping" : "";
    if (rc == 0) {
        /* Stored: it is delivered and logged even when the client left
         * before its 250 or the stop came first (it may send it again: at
         * least once); the backend learns of it before any outcome. */
        s->sw->stats.messages++;
        s->sw->stats.recipients += s->nrcpt;
        if (s->owner.tenant != NULL)
            tenant_count(s->sw, s->owner.tenant->name, s->nrcpt);
        if (!s->sw->detached && !stopping) /* stopping: the next start's requeue */
            hand_to_delivery(s);
        if (s->ev_line != NULL) /* committed with the message: now the file */
            dlog_line(s->sw->e->dlogw[s->sw->w->id], s->ev_line, s->ev_len);
        else
            log_reception(s, qid);
        log_msg(LOG_INFO,
                "session=%016llx event=queued id=%s from=<%s> nrcpt=%u size=%zu body=%s "
                "user=%s client=%s tenant=%s pool=%s campaign=\"%s\" priority=%u%s",
                (unsigned long long)s->id, qid, s->sender, s->nrcpt, s->body_len + s->hdrs_len,
                s->body_type == SMTP_BODY_8BITMIME ? "8BITMIME" : "7BIT",
                s->user ? s->user->name : "-", s->peer_ip,
                s->owner.tenant ? s->owner.tenant->name : "-",
                s->owner.pool ? s->owner.pool->name : "-", s->owner.campaign, s->owner.priority,
                unanswered);
        if (*unanswered == '\0')
            reply(s, "250 2.0.0 Ok: queued as %s", qid);
    } else if (*unanswered != '\0') {
        log_msg(LOG_NOTICE, "session=%016llx event=commit_failed id=%s err=\"%s\"%s",
                (unsigned long long)s->id, qid, queue_strerror(rc), unanswered);
    } else if (queue_error_is_space(rc)) {
        /* One line a refused message, at notice: the spool's own warning
         * (queue=full, once, with what to do) is the alert; a full spool
         * logged a critical line for each of its 1,108 refusals. */
        log_msg(LOG_NOTICE, "session=%016llx event=spool_full id=%s err=\"%s\"",
                (unsigned long long)s->id, qid, queue_strerror(rc));
        reply(s, "452 4.3.1 Insufficient system storage");
    } else {
        log_msg(LOG_ERR, "session=%016llx event=spool_error id=%s err=\"%s\"",
                (unsigned long long)s->id, qid, queue_strerror(rc));
        reply(s, "451 4.3.0 Local error in processing");
    }
    if (*unanswered != '\0') {
        txn_reset(s); /* the body's memory goes back now, not at the close */
        session_maybe_free(s);
        return;
    }
    txn_reset(s);
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
    session_drain_check(s);
    session_run(s);
}

/* The commit's answer reaches the session, at once or (a test hook,
 * SLUICE_TEST_COMMIT_DELAY: a spool slow to answer, as a loaded disk
 * makes it) test_commit_delay ms later, the message stored and the
 * session still waiting in COMMIT, its commit still counted in flight.
 * A held answer is a commit the spool still has: a stop waits for it as
 * for one (server_worker_free), it is never dropped. */
void
session_on_commit(void *cookie, int rc)
{
    struct session *s = cookie;
    struct server_worker *sw = s->sw;
    if (sw->test_commit_delay > 0) {
        /* after the loop ended the worker's clock no longer moves */
        uint64_t now = sw->stopping ? clock_mono_ns() : sw->w->now;
        s->commit_rc = rc;
        uint64_t at = now + MS_TO_NS(sw->test_commit_delay);
        if (worker_timer_arm(sw->w, &s->commit_timer, at) == 0) {
            log_msg(LOG_WARN, "session=%016llx event=commit_held ms=%llu note=test_hook",
                    (unsigned long long)s->id, (unsigned long long)sw->test_commit_delay);
            return;
        }
    }
    commit_done(s, rc);
}

void
session_on_commit_timer(struct timer *t, void *ctx)
{
    (void)ctx;
    commit_done(SESSION_OF(t, commit_timer), SESSION_OF(t, commit_timer)->commit_rc);
}

/* Count a message of tenant name. */
static void
tenant_count(struct server_worker *sw, const char *name, unsigned nrcpt)
{
    struct stats_tenant *t = stats_tenant_get(&sw->tenants, name);
    if (t != NULL) {
        t->received_msgs++;
        t->received_rcpts += nrcpt;
    }
}

unsigned
server_worker_tenants(const struct server_worker *sw, struct stats_tenant *out, unsigned cap)
{
    return stats_tenant_copy(&sw->tenants, out, cap);
}

/* The reception event of the delivery log, with the configured header
 * fields of the message. */
static void
log_reception(struct session *s, const char *qid)
{
    struct engine *e = s->sw->e;
    struct dlog_writer *lw = e->dlogw ? e->dlogw[s->sw->w->id] : NULL;
    if (lw == NULL)
        return;
    const struct log_config *lc = &e->cfg->log;
    char vals[DLOG_HEADERS_MAX][DLOG_HEADER_MAX];
    const char *hv[DLOG_HEADERS_MAX];
    if (lc->nheaders > 0) {
        struct msa_scan scan;
        msa_scan(s->body, s->body_len, &scan);
        for (unsigned i = 0; i < lc->nheaders; i++) {
            size_t off, len, vl;
            const char *v;
            hv[i] = NULL;
            if (msa_find_field(s->body, scan.header_len, lc->headers[i], &off, &len, &v, &vl)) {
                /* the whole value, folded or not, as the outcomes' events have it */
                msa_unfold(v, (size_t)(s->body + off + len - v), vals[i], sizeof(vals[i]));
                hv[i] = vals[i];
            }
        }
    }
    struct dlog_event ev = {
        .kind = DLOG_RECEPTION,
        .id = qid,
        .sender = s->sender,
        .tenant = s->owner.tenant ? s->owner.tenant->name : NULL,
        .campaign = s->owner.campaign[0] ? s->owner.campaign : NULL,
        .pool = s->owner.pool ? s->owner.pool->name : NULL,
        .priority = s->owner.priority,
        .size = s->body_len + s->hdrs_len,
        .rcpt_count = s->nrcpt,
        .client = s->peer_ip,
        .auth_user = s->user ? s->user->name : NULL,
        .hdr_names = (const char *const *)lc->headers,
        .hdr_values = hv,
        .nhdr = lc->nheaders,
        .dkim_unsigned = s->dkim_skip,
    };
    struct dlog_dkim sigs[DKIM_MAX_SIGNERS];
    for (unsigned i = 0; s->dkim_job != NULL && i < s->dkim_job->nsigners; i++) {
        const struct dkim_signer *sg = s->dkim_job->signers[i];
        sigs[i] = (struct dlog_dkim){sg->domain, sg->selector, dkim_alg_str(dkim_key_alg(sg->key))};
        ev.dkim = sigs;
        ev.ndkim = i + 1;
    }
    dlog_event(lw, &ev);
}

/* The message is safe in the spool: give its recipients, grouped by
 * domain, to the workers that own those domains. Recipient i of the
 * session is recipient i of the stored message. */
static void
hand_to_delivery(struct session *s)
{
    unsigned idx[256];
    bool *done = calloc(s->nrcpt, sizeof(*done));
    if (done == NULL) {
        /* in the spool: the next start delivers it */
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(s->msg_id, qid);
        log_msg(LOG_ERR, "id=%s event=job_lost_until_restart recipients=%u reason=out_of_memory",
                qid, s->nrcpt);
        return;
    }
    struct job_owner own;
    delivery_owner(s->sw->e, s->owner.tenant ? s->owner.tenant->name : NULL,
                   s->owner.pool ? s->owner.pool->name : NULL, s->owner.campaign,
                   s->owner.priority, &own);
    for (unsigned i = 0; i < s->nrcpt; i++) {
        if (done[i])
            continue;
        const char *dom = strrchr(s->rcpts[i].addr, '@');
        dom = dom ? dom + 1 : "";
        unsigned n = 0;
        for (unsigned k = i; k < s->nrcpt; k++) {
            const char *dk = strrchr(s->rcpts[k].addr, '@');
            dk = dk ? dk + 1 : "";
            if (done[k] || strcasecmp(dk, dom) != 0)
                continue;
            done[k] = true;
            idx[n++] = k;
            if (n == sizeof(idx) / sizeof(idx[0])) {
                delivery_submit(s->sw->e, s->msg_id, dom, idx, n, &own);
                n = 0;
            }
        }
        delivery_submit(s->sw->e, s->msg_id, dom, idx, n, &own);
    }
    free(done);
}

/* The Received field's "with": RFC 3848's, and RFC 6531 3.7.3's for a
 * transaction that used SMTPUTF8. */
static const char *
protocol_name(const struct session *s)
{
    if (!s->esmtp)
        return "SMTP";
    bool u = s->smtputf8;
    if (stream_tls_ready(&s->st))
        return s->user ? (u ? "UTF8SMTPSA" : "ESMTPSA") : (u ? "UTF8SMTPS" : "ESMTPS");
    return s->user ? (u ? "UTF8SMTPA" : "ESMTPA") : (u ? "UTF8SMTP" : "ESMTP");
}

static void message_commit(struct session *s);
static bool dkim_sign_start(struct session *s, size_t header_len);

/* A report answered 250 (or about to be: tail says why not), told once:
 * its stats, the daemon log's line of its event and its own. */
static void
oob_told(struct session *s, const struct oob_outcome *o, const char *tail)
{
    struct server_worker *sw = s->sw;
    sw->stats.oob_messages++;
    sw->stats.oob_events += o->events;
    if (o->dropped != NULL)
        sw->stats.oob_dropped++;
    if (o->line[0] != '\0')
        log_msg(LOG_NOTICE, "%s%s", o->line, tail);
    log_msg(LOG_INFO, "session=%016llx event=oob_received client=%s from=<%s> nrcpt=%u "
            "size=%zu kind=%s events=%u suppressed=%u%s%s%s",
            (unsigned long long)s->id, s->peer_ip, s->sender, s->nrcpt, s->body_len, o->kind,
            o->events, o->suppressed, o->dropped ? " dropped=" : "", o->dropped ? o->dropped : "",
            tail);
}

/* The bounce listener's report is in the spool (or not: rc): its events
 * (with event sinks) and its suppression entry (a note, suppress.h). The
 * delivery log and the daemon log get its lines now, the reporter its
 * answer. A 451 has the reporting MTA send the report again: nothing of
 * it was stored, logged or suppressed, so the report sent again is told
 * once. */
static void
oob_commit_done(struct session *s, int rc)
{
    s->inflight--;
    s->committing = false;
    struct oob_outcome *o = s->oob;
    s->oob = NULL;
    bool gone = s->state == SS_CLOSED || s->state == SS_CLOSING;
    bool stopping = s->sw->stopping;
    const char *unanswered = gone ? " client_gone=1" : stopping ? " unanswered=stopping" : "";
    struct dlog_writer *lw = s->sw->e->dlogw ? s->sw->e->dlogw[s->sw->w->id] : NULL;
    const char *kind = o->kind;
    if (rc == 0) {
        if (lw != NULL && s->ev_line != NULL)
            dlog_line(lw, s->ev_line, s->ev_len);
        oob_told(s, o, unanswered);
    } else {
        log_msg(LOG_ERR, "session=%016llx event=oob_commit_failed kind=%s err=\"%s\"%s",
                (unsigned long long)s->id, kind, queue_strerror(rc), unanswered);
    }
    free(o);
    if (gone || stopping) {
        txn_reset(s);
        session_maybe_free(s);
        return;
    }
    if (rc == 0)
        reply(s, "250 2.0.0 Ok: %s recorded", kind);
    else
        reply(s, queue_error_is_space(rc) ? "452 4.3.1 Insufficient system storage"
                                          : "451 4.3.0 Local error in processing");
    txn_reset(s);
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
    session_drain_check(s);
    session_run(s);
}

/* The bounce listener's suppression seam (oob.h): the entry a verified
 * report asks for, made a note that the spool commits with the report
 * (suppress.h): a kill -9 after the 250 cannot lose it, a 451 makes none. */
struct oob_note {
    struct suppress *sup;       /* borrowed: the engine's */
    int len;                    /* of buf; 0: none */
    uint8_t buf[SUPPRESS_NOTE_BYTES];
};

static void
oob_note_take(void *ctx, const char *tenant, const char *addr, int kind)
{
    struct oob_note *n = ctx;
    int len = kind == OOB_SUPPRESS_HARD_BOUNCE
                  ? suppress_note_bounce(n->sup, NULL, addr, BOUNCE_INVALID_RECIPIENT,
                                         "out-of-band bounce", n->buf)
                  : suppress_note_complaint(n->sup, tenant, addr, n->buf);
    if (len < 0)
        log_msg(LOG_WARN, "event=suppress_feed_failed rcpt=<%s> err=\"%s\"", addr ? addr : "",
                strerror(-len));
    n->len = len > 0 ? len : 0;
}

/* The bounce role: the message is whole and clean; parse it and log what
 * it says (oob.h). What it stores (its events, with event sinks; its
 * suppression entry) is committed to the spool (queue_events_note_put)
 * before the 250, as a message is: a crash after the 250 loses none of
 * it, one before it has the reporting MTA send the report again (at
 * least once; the backend drops a repeat by what it says), and the
 * lines are logged once the commit returns. Without sinks nor an entry
 * the delivery log is the only reader and the 250 goes out once the
 * lines are in its buffer (a crash before its next write loses them: at
 * most once, as bounces by mail always were). */
static void
bounce_finish(struct session *s)
{
    struct server_worker *sw = s->sw;
    struct engine *e = sw->e;
    const char *rcpts[64];
    unsigned n = s->nrcpt < 64 ? s->nrcpt : 64;
    for (unsigned i = 0; i < n; i++)
        rcpts[i] = s->rcpts[i].addr;
    struct oob_outcome *o = malloc(sizeof(*o));
    struct oob_note *note = malloc(sizeof(*note));
    if (o == NULL || note == NULL) {
        free(o);
        free(note);
        reply(s, "451 4.3.0 Local error in processing");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    note->sup = e->suppress;
    note->len = 0;
    struct oob_hooks hooks = e->oob;
    if (hooks.suppress == NULL && e->suppress != NULL)
        hooks = (struct oob_hooks){oob_note_take, note};
    struct dlog_writer *lw = e->dlogw ? e->dlogw[sw->w->id] : NULL;
    bool sinks = e->events != NULL && lw != NULL;
    struct json line;
    json_init(&line);
    if (lw != NULL)
        dlog_capture(lw, &line, false);
    int rc = oob_message(&e->cfg->bounce, e->cfg->classify, &hooks, lw, s->id, s->peer_ip,
                         rcpts, n, s->body, s->body_len, o);
    if (lw != NULL)
        dlog_capture(lw, NULL, false);
    free(s->ev_line);
    s->ev_line = NULL;
    s->ev_len = 0;
    if (rc >= 0 && line.len > 0) {
        s->ev_line = json_failed(&line) ? NULL : malloc(line.len);
        if (s->ev_line != NULL) {
            memcpy(s->ev_line, line.buf, line.len);
            s->ev_len = line.len;
        } else {
            rc = -ENOMEM;
        }
    }
    json_fini(&line);
    bool commit = rc >= 0 && !sw->detached && ((sinks && s->ev_len > 0) || note->len > 0);
    if (commit) {
        rc = queue_events_note_put(e->queue, sw->port, sinks ? s->ev_line : NULL,
                                   sinks ? s->ev_len : 0, note->len > 0 ? note->buf : NULL,
                                   (size_t)note->len, session_on_commit, s);
        if (rc < 0)
            log_msg(LOG_ERR, "session=%016llx event=oob_commit_failed kind=%s err=\"%s\"",
                    (unsigned long long)s->id, o->kind, queue_strerror(rc));
    }
    free(note);
    if (rc < 0) {
        free(o);
        reply(s, "451 4.3.0 Local error in processing");
    } else if (commit) { /* the spool's answer replies: oob_commit_done */
        s->oob = o;
        s->inflight++;
        s->committing = true;
        worker_timer_cancel(sw->w, &s->timer);
        session_enter(s, SS_COMMIT);
        return;
    } else {
        if (lw != NULL && s->ev_line != NULL)
            dlog_line(lw, s->ev_line, s->ev_len);
        oob_told(s, o, "");
        reply(s, "250 2.0.0 Ok: %s %s", o->kind, o->dropped ? "dropped" : "recorded");
        free(o);
    }
    txn_reset(s);
    session_enter(s, SS_COMMAND);
}

/* Two recipients are one when their addresses are: the local part as it
 * is (only the receiving host may fold it, RFC 5321 2.4) but for quotes
 * that are not needed ("john" is john, RFC 5321 4.1.2) or that it is sent
 * in (john. is "john."), the domain without case. */
static int
rcpt_addr_cmp(const char *a, const char *b)
{
    const char *da = strrchr(a, '@'), *db = strrchr(b, '@');
    char ba[SMTP_LOCAL_MAX], bb[SMTP_LOCAL_MAX];
    const char *ua, *ub;
    size_t la = smtp_local_canon(a, da ? (size_t)(da - a) : strlen(a), ba, &ua);
    size_t lb = smtp_local_canon(b, db ? (size_t)(db - b) : strlen(b), bb, &ub);
    if (la != lb)
        return la < lb ? -1 : 1;
    int c = memcmp(ua, ub, la);
    return c != 0 ? c : strcasecmp(da ? da : "", db ? db : "");
}

struct rcpt_ref {
    const char *addr; /* borrowed: s->rcpts[i].addr */
    unsigned i;
};

static int
rcpt_ref_cmp(const void *a, const void *b)
{
    const struct rcpt_ref *x = a, *y = b;
    int c = rcpt_addr_cmp(x->addr, y->addr);
    return c != 0 ? c : x->i < y->i ? -1 : x->i > y->i;
}

/* A recipient given twice in the transaction is kept once, with what its
 * first RCPT said (as Postfix's cleanup drops duplicates): one copy goes
 * out, one outcome is logged. Sorted, not compared pairwise: a message
 * may have max_recipients of them. Without memory they all stay. */
static void
rcpts_dedup(struct session *s)
{
    if (s->nrcpt < 2)
        return;
    struct rcpt_ref *v = malloc(sizeof(*v) * s->nrcpt);
    bool *dup = calloc(s->nrcpt, sizeof(*dup));
    if (v == NULL || dup == NULL) {
        free(v);
        free(dup);
        return;
    }
    for (unsigned i = 0; i < s->nrcpt; i++)
        v[i] = (struct rcpt_ref){s->rcpts[i].addr, i};
    qsort(v, s->nrcpt, sizeof(*v), rcpt_ref_cmp);
    for (unsigned k = 1; k < s->nrcpt; k++)
        if (rcpt_addr_cmp(v[k - 1].addr, v[k].addr) == 0)
            dup[v[k].i] = true;
    unsigned kept = 0;
    for (unsigned i = 0; i < s->nrcpt; i++) {
        if (dup[i]) {
            free(s->rcpts[i].addr);
            free(s->rcpts[i].orcpt);
        } else {
            s->rcpts[kept++] = s->rcpts[i];
        }
    }
    s->nrcpt = kept;
    free(v);
    free(dup);
}

/* The whole message is in s->body: check it, add the MSA's fields and
 * hand it to the spool (after DKIM signing, when it is signed). */
void
message_finish(struct session *s, uint32_t data_flags)
{
    struct server_worker *sw = s->sw;
    if (s->body_seen > sw->cfg->max_message_size)
        s->too_big = true;
    /* "BDAT 0 LAST" as the only chunk: no octet came, so no buffer was
     * made. The empty message gets one, as after DATA and a lone dot:
     * what follows copies from s->body (the DKIM header copy, the spool's
     * iovecs, the bounce parser), and a copy from NULL is undefined even
     * for 0 octets. Without memory it is refused like any other body. */
    if (s->body == NULL)
        body_reserve(s, 1);
    if (s->too_big || s->no_memory) {
        sw->stats.rejected++;
        log_msg(LOG_NOTICE, "session=%016llx event=message_refused client=%s size=%llu reason=%s",
                (unsigned long long)s->id, s->peer_ip, (unsigned long long)s->body_seen,
                s->too_big ? "max_message_size" : "body_memory");
        reply(s, s->too_big ? "552 5.3.4 Message size exceeds fixed maximum message size"
                            : "452 4.3.1 Insufficient system resources: too many large messages "
                              "in progress, try again later");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    const char *why = NULL;
    if (data_flags & (SMTP_DATA_F_BARE_LF | SMTP_DATA_F_BARE_CR))
        why = "550 5.6.0 Message refused: bare CR or LF in the content (lines must end "
              "with CRLF)";
    else if (data_flags & SMTP_DATA_F_NUL)
        why = "550 5.6.0 Message refused: NUL octet in the content";
    else if (data_flags & SMTP_DATA_F_LONG_LINE)
        why = "550 5.6.0 Message refused: a line is longer than 998 octets (RFC 5322 2.1.1)";
    if (why != NULL) {
        sw->stats.rejected++;
        log_msg(LOG_NOTICE, "session=%016llx event=message_refused client=%s reason=\"%s\"",
                (unsigned long long)s->id, s->peer_ip, why + 10);
        reply(s, "%s", why);
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    /* What it is, whatever was declared: an 8-bit body under BODY=7BIT (or
     * none) is the client's error, and relaying it as 7BIT would hand 8-bit
     * octets to a server that never agreed to take them. As 8BITMIME it
     * goes out with BODY=8BITMIME, or bounces (5.6.3) where the next hop
     * has no 8BITMIME (smtp_client_txn.c). One declared BODY=8BITMIME with no
     * octet over 127 (clients that declare it for everything) is 7BIT:
     * it goes to a next hop without 8BITMIME too (RFC 6152 forbids only
     * the 8-bit data; it bounced there). */
    if (data_flags & SMTP_DATA_F_8BIT)
        s->body_type = SMTP_BODY_8BITMIME;
    else if (s->body_type == SMTP_BODY_8BITMIME)
        s->body_type = SMTP_BODY_7BIT;
    if (s->bounce) {
        bounce_finish(s);
        return;
    }
    if (sw->sealed) {
        /* A stop's drain is done on this worker: the loop may end before a
         * commit could be answered, and a message stored without its 250
         * is sent again (twice delivered). Not stored: the client retries
         * elsewhere or after the restart. */
        sw->stats.rejected++;
        log_msg(LOG_NOTICE, "session=%016llx event=message_refused client=%s reason=shutting_down",
                (unsigned long long)s->id, s->peer_ip);
        txn_reset(s);
        reply_close(s, "421 4.3.2 Service shutting down: message not stored, try again later");
        return;
    }
    rcpts_dedup(s);

    struct msa_scan scan;
    msa_scan(s->body, s->body_len, &scan);
    /* The control fields (owner.h) and the message's own expiry, fields
     * for us alone: they never leave. */
    struct owner_scan scanned, *sc = &scanned;
    enum owner_field bad;
    int rc = owner_scan(s->body, scan.header_len, sw->cfg->expire_header, sc, &bad);
    uint64_t expire_ms = 0;
    char refusal[300];
    refusal[0] = '\0';
    if (rc < 0 && bad == OWNER_F_EXPIRE)
        rc = -EINVAL;
    else if (rc < 0)
        snprintf(refusal, sizeof(refusal), "550 5.6.0 Message refused: %s %s",
                 owner_field_name(bad, NULL),
                 rc == OWNER_EDUP    ? "must appear once"
                 : rc == OWNER_ELONG ? "is too long (at most 128 characters)"
                 : bad == OWNER_F_PRIORITY ? "must be one digit, 0 to 9"
                 : bad == OWNER_F_CAMPAIGN ? "must be printable ASCII without quotes"
                                           : "must be a name of A-Z a-z 0-9 . _ -");
    if (rc == 0 && sc->present[OWNER_F_EXPIRE] &&
        msa_parse_expiry(sc->value[OWNER_F_EXPIRE], strlen(sc->value[OWNER_F_EXPIRE]),
                         clock_unix_ms(), &expire_ms) < 0)
        rc = -EINVAL;
    if (rc == -EINVAL)
        snprintf(refusal, sizeof(refusal),
                 "550 5.6.0 Message refused: %s must appear once, as a duration (90m, 2h) "
                 "or an RFC 3339 UTC time (2026-11-23T18:00:00Z)",
                 sw->cfg->expire_header);
    struct owner owner;
    if (rc == 0)
        rc = owner_resolve(sw->e->cfg, s->user, s->trusted, sc, &owner, refusal,
                           sizeof(refusal));
    if (rc == 0) {
        memcpy(s->cuts, sc->cuts, sizeof(s->cuts));
        s->ncuts = sc->ncuts;
    }
    if (rc == 0) {
        s->owner = owner;
        rc = suppress_after_data(s, refusal, sizeof(refusal));
    }
    if (rc < 0) {
        sw->stats.rejected++;
        log_msg(LOG_NOTICE, "session=%016llx event=message_refused client=%s user=%s reason=\"%s\"",
                (unsigned long long)s->id, s->peer_ip, s->user ? s->user->name : "-",
                refusal + 4);
        reply(s, "%s", refusal);
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(s->msg_id, qid);
    char tls_desc[96]; /* "TLSv1.3 TLS_AES_256_GCM_SHA384" */
    snprintf(tls_desc, sizeof(tls_desc), "%s %s", s->tls_proto ? s->tls_proto : "",
             s->tls_cipher ? s->tls_cipher : "");
    struct msa_trace t = {
        .hostname = sw->e->cfg->server.hostname,
        .helo = s->helo,
        .client_ip = s->peer_ip,
        .protocol = protocol_name(s),
        .tls = stream_tls_ready(&s->st) ? tls_desc : NULL,
        .queue_id = qid,
        .rcpt = s->nrcpt == 1 ? s->rcpts[0].addr : NULL,
        .now = time(NULL),
        .add_message_id = !scan.has_message_id,
        .add_date = !scan.has_date,
    };
    s->hdrs_len = msa_headers(&t, s->hdrs, sizeof(s->hdrs));
    s->sep = scan.no_separator;
    s->sep_at = scan.header_len;
    s->expire_ms = expire_ms;
    if (dkim_sign_start(s, scan.header_len))
        return; /* signing (SS_SIGN), or refused */
    message_commit(s);
}

/* Hand the message to the spool: the DKIM-Signature fields (if signed),
 * the MSA's fields, the message without its expiry field. */
static void
message_commit(struct session *s)
{
    struct server_worker *sw = s->sw;
    struct queue_rcpt *qr = calloc(s->nrcpt, sizeof(*qr));
    if (qr == NULL) {
        reply(s, "451 4.3.0 Local error in processing");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    for (unsigned i = 0; i < s->nrcpt; i++) {
        qr[i].addr = s->rcpts[i].addr;
        qr[i].orcpt = s->rcpts[i].orcpt;
        qr[i].notify = s->rcpts[i].notify; /* same bits as enum queue_notify */
    }
    struct queue_envelope env = {
        .id = s->msg_id,
        .sender = s->sender,
        .envid = s->envid,
        .ret = s->ret == SMTP_RET_FULL   ? QUEUE_RET_FULL
               : s->ret == SMTP_RET_HDRS ? QUEUE_RET_HDRS
                                         : QUEUE_RET_NONE,
        .body_type = s->body_type == SMTP_BODY_8BITMIME ? QUEUE_BODY_8BITMIME : QUEUE_BODY_7BIT,
        .smtputf8 = s->smtputf8,
        .auth_user = s->user ? s->user->name : NULL,
        .client_addr = s->peer_ip,
        .expire_ms = s->expire_ms,
        .tenant = s->owner.tenant ? s->owner.tenant->name : NULL,
        .campaign = s->owner.campaign,
        .pool = s->owner.pool ? s->owner.pool->name : NULL,
        .priority = s->owner.priority,
        .nrcpt = s->nrcpt,
        .rcpt = qr,
    };
    struct iovec iov[4 + OWNER_F_COUNT] = {
        {s->dkim_job ? s->dkim_job->sig : NULL, s->dkim_job ? s->dkim_job->sig_len : 0},
        {s->hdrs, s->hdrs_len},
    };
    unsigned niov = 2;
    size_t at = 0;
    for (unsigned i = 0; i < s->ncuts; i++) {
        iov[niov++] = (struct iovec){s->body + at, s->cuts[i].off - at};
        at = s->cuts[i].off + s->cuts[i].len;
    }
    /* The cuts are all in the header section, before sep_at. */
    if (s->sep) {
        iov[niov++] = (struct iovec){s->body + at, s->sep_at - at};
        iov[niov++] = (struct iovec){(char *)"\r\n", 2};
        at = s->sep_at;
    }
    iov[niov++] = (struct iovec){s->body + at, s->body_len - at};
    /* With event sinks, the reception event is committed with the
     * message (queue.h, "events"); the file gets it once that is done. */
    struct dlog_writer *lw = sw->e->dlogw ? sw->e->dlogw[sw->w->id] : NULL;
    if (sw->e->events != NULL && lw != NULL && !sw->detached) {
        char qid[QUEUE_ID_STRLEN + 1];
        struct json line;
        json_init(&line);
        queue_id_str(s->msg_id, qid);
        dlog_capture(lw, &line, false);
        log_reception(s, qid);
        dlog_capture(lw, NULL, false);
        if (!json_failed(&line) && line.len > 0 && (s->ev_line = malloc(line.len)) != NULL) {
            memcpy(s->ev_line, line.buf, line.len);
            s->ev_len = line.len;
        }
        json_fini(&line);
    }
    /* Detached, the commit is the harness's: server_session_feed(). */
    int rc = sw->detached ? 0
                          : queue_enqueue_events(sw->e->queue, sw->port, &env, iov, niov,
                                                 s->ev_line, s->ev_len, session_on_commit, s);
    free(qr);
    if (rc < 0) {
        log_msg(LOG_ERR, "session=%016llx event=enqueue_failed err=\"%s\"",
                (unsigned long long)s->id, queue_strerror(rc));
        reply(s, queue_error_is_space(rc) ? "452 4.3.1 Insufficient system storage"
                                          : "451 4.3.0 Local error in processing");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    s->inflight++;
    s->committing = true;
    worker_timer_cancel(sw->w, &s->timer); /* the spool's time is not the client's */
    session_enter(s, SS_COMMIT);
}

/* ---- DKIM (dkim/dkim.h, engine/dkim_pool.h) ---- */

/* DATA or BDAT begins: with keys configured, the body is hashed as it
 * arrives (the keyring is held to the end, so a reload meanwhile cannot
 * change which hashes the signers need). */
void
dkim_body_start(struct session *s)
{
    s->dkim_keys = dkim_keyring_unref(s->dkim_keys);
    s->dkim_skip = NULL;
    struct dkim_keyring *kr =
        s->sw->detached || s->bounce ? NULL : engine_dkim_keys(s->sw->e);
    if (kr == NULL)
        return;
    unsigned canons = dkim_keyring_body_canons(kr);
    if (s->dkim_body != NULL && s->dkim_canons == canons) {
        dkim_body_reset(s->dkim_body);
    } else {
        dkim_body_free(s->dkim_body);
        s->dkim_canons = canons;
        if ((s->dkim_body = dkim_body_new(canons)) == NULL) {
            s->no_memory = true; /* refused at the end: never sent unsigned */
            dkim_keyring_unref(kr);
            return;
        }
    }
    s->dkim_keys = kr;
}

static void session_on_signed(struct dkim_job *j);

/* The message is whole: when its signing domain has keys, hand its header
 * section and body hashes to the signing pool and wait (SS_SIGN). Returns
 * false when the message goes on unsigned (logged, and said in the
 * delivery log), true when signing or refused. */
static bool
dkim_sign_start(struct session *s, size_t header_len)
{
    struct dkim_keyring *kr = s->dkim_keys;
    if (kr == NULL)
        return false;
    struct server_worker *sw = s->sw;
    const char *b = s->body;
    char dom[256] = "";
    int rc = 0;
    struct dkim_job *j = NULL;
    if (s->sep) {
        /* The body began without an empty line: one is stored at sep_at
         * (message_commit). The streamed hash looked for an empty line
         * that is not there (or took a later one): hash the body again as
         * it will be stored, after the inserted one. */
        dkim_body_reset(s->dkim_body);
        dkim_body_feed(s->dkim_body, "\r\n", 2);
        dkim_body_feed(s->dkim_body, b + header_len, s->body_len - header_len);
    }
    if (dkim_keyring_signing_domain(kr) == DKIM_FROM_ENVELOPE) {
        rc = dkim_addr_domain(s->sender, dom, sizeof(dom));
        if (rc < 0)
            dom[0] = '\0';
    } else {
        rc = dkim_from_domain(b, header_len, dom, sizeof(dom));
    }
    if (rc == 0 && (j = dkim_job_new()) == NULL)
        rc = -ENOMEM;
    if (rc == 0 && (j->nsigners = dkim_keyring_lookup(kr, dom, j->signers, DKIM_MAX_SIGNERS)) == 0)
        rc = DKIM_ENOKEY;
    /* What will be stored in front of the body: our fields, then the
     * message's header section without the control fields. */
    size_t cut = 0;
    for (unsigned i = 0; i < s->ncuts; i++)
        cut += s->cuts[i].len;
    if (rc == 0 && (j->hdr = malloc(s->hdrs_len + header_len - cut + 1)) == NULL)
        rc = -ENOMEM;
    if (rc < 0) {
        dkim_job_free(j);
        if (rc == -ENOMEM) {
            sw->stats.rejected++;
            reply(s, "452 4.3.1 Insufficient system resources");
            txn_reset(s);
            session_enter(s, SS_COMMAND);
            return true;
        }
        s->dkim_skip = dkim_error_token(rc);
        sw->stats.dkim_unsigned++;
        log_msg(LOG_INFO, "session=%016llx event=dkim_unsigned reason=%s domain=%s error=\"%s\"",
                (unsigned long long)s->id, s->dkim_skip, dom[0] ? dom : "-", dkim_strerror(rc));
        return false;
    }
    memcpy(j->hdr, s->hdrs, s->hdrs_len);
    size_t hl = s->hdrs_len, at = 0;
    for (unsigned i = 0; i < s->ncuts; i++) {
        memcpy(j->hdr + hl, b + at, s->cuts[i].off - at);
        hl += s->cuts[i].off - at;
        at = s->cuts[i].off + s->cuts[i].len;
    }
    memcpy(j->hdr + hl, b + at, header_len - at);
    j->hdr_len = hl + header_len - at;
    for (int c = 0; c < 2; c++)
        if (s->dkim_canons & (1u << c))
            dkim_body_final(s->dkim_body, (enum dkim_canon)c, j->bh[c]);
    j->timestamp = (uint64_t)time(NULL);
    j->w = sw->w;
    j->done = session_on_signed;
    j->cookie = s;
    j->keys = dkim_keyring_ref(kr);
    rc = dkim_pool_submit(sw->e->dkim_pool, j);
    if (rc < 0) {
        dkim_job_free(j);
        sw->stats.rejected++;
        sw->stats.dkim_failed++;
        log_msg(LOG_WARN, "session=%016llx event=dkim_busy reason=%s",
                (unsigned long long)s->id, rc == -EAGAIN ? "queue_full" : "stopping");
        reply(s, "451 4.3.0 DKIM signing is busy: try again later");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return true;
    }
    s->inflight++;
    worker_timer_cancel(sw->w, &s->timer); /* the pool's time is not the client's */
    session_enter(s, SS_SIGN);
    return true;
}

/* Back from the signing pool, on the worker: commit, signature in front. */
static void
session_on_signed(struct dkim_job *j)
{
    struct session *s = j->cookie;
    s->inflight--;
    s->dkim_job = j;
    if (s->sw->stopping) {
        session_maybe_free(s);
        return;
    }
    if (s->state == SS_CLOSED || s->state == SS_CLOSING) {
        /* The client is gone, or going (a TLS failure meanwhile): nothing
         * is committed that no 250 could answer; closing stays closing. */
        txn_reset(s);
        session_maybe_free(s);
        return;
    }
    if (j->rc < 0) {
        /* Never sent unsigned when a key exists: the client retries. */
        s->sw->stats.rejected++;
        s->sw->stats.dkim_failed++;
        log_msg(LOG_ERR, "session=%016llx event=dkim_failed domain=%s selector=%s err=\"%s\"",
                (unsigned long long)s->id, j->failed ? j->failed->domain : "-",
                j->failed ? j->failed->selector : "-", dkim_strerror(j->rc));
        reply(s, "451 4.3.0 Local error in processing (DKIM signing)");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
    } else {
        s->sw->stats.dkim_signed++;
        message_commit(s);
    }
    if (s->state == SS_COMMAND)
        session_deadline(s, s->sw->cfg->timeout_command);
    session_run(s);
}
