/*
 * outcome_held: one DSN per message ([bounce] dsn_wait). A recipient that
 * fails, asking a DSN, while others of its message are ready in the
 * spool (queued, or in flight) is held (job_finish, outcome.c): its
 * outcome is a deferral tagged DSN_HELD_TAG (queue.h: QUEUE_TAG_HELD, so
 * that no other outcome changes it), its DSN entry in front of its reply
 * (outcome_held_reply); it is told bounced (or expired) then, as any.
 * So is one delivered that asked for a success report (NOTIFY=SUCCESS, a
 * next hop without DSN: Action: relayed), told delivered, held in the
 * spool likewise (never sent again: found ready, it comes here), so that
 * a message on 10 such domains gives one report, not 10 (Postfix's
 * success notices go at the message's end too).
 * The DSN goes with the first commit after which no other recipient of
 * the message is ready: that of the job that finds so in its envelope
 * (job_finish), or the one the check after a commit makes
 * (outcome_held_recheck). That commit removes the held recipients (quiet
 * outcomes: told already) and stores one DSN naming them all. A held
 * failure is also due every HELD_CHECK_MS (outcome_held_due): then the
 * DSN goes if no other recipient is ready (a crash came between a
 * message's last commits and their check) or dsn_wait has passed since
 * its first held failure; else it is held again. The spool applies each
 * removal once: a commit that crosses another is refused whole and made
 * again without what the other did (outcome_again), so no recipient is
 * named twice. A crash leaves the held ones in the spool, deferred (or
 * ready once the due poll took them: delivery_batch_add sends those here,
 * not to a server), and their DSN goes after the restart.
 *
 * Threading: the worker's thread.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/classify.h"
#include "engine/dlog.h"
#include "engine/dsn.h"
#include "engine/outbound/internal.h"
#include "engine/outbound/outcome_int.h"
#include "queue/queue.h"

#define HELD_PREFIX "dsn-held "
/* The class word of a held success report (Action: relayed): no failure
 * class is named so. */
#define HELD_RELAYED "relayed"
/* A held failure comes due this often, at most, to see whether its DSN
 * can go: the longest a crash delays it (its message's last commits made,
 * their check not). */
#define HELD_CHECK_MS 30000

/* The reply kept with the held failure tl (text: the server's reply, or
 * our reason; at_ms: when it failed), into buf (cap octets): "dsn-held
 * STATUS CLASS MX|- r|- AT_MS " then text, cut at cap - 1 octets (r: the
 * reply's code is the DSN's Diagnostic-Code). Returns the octets before
 * text (outcome_log skips them). */
uint16_t
outcome_held_reply(char *buf, size_t cap, const struct outcome_tell *tl, const char *mx,
                   uint64_t at_ms, const char *text)
{
    if (mx == NULL || mx[0] == '\0' || strlen(mx) >= sizeof(((struct outcome_held_ent *)0)->mx) ||
        strpbrk(mx, " \t\r\n") != NULL)
        mx = "-";
    const char *cls = tl->action == DSN_ACTION_RELAYED
                          ? HELD_RELAYED
                          : bounce_class_str((enum bounce_class)tl->cls);
    int n = snprintf(buf, cap, HELD_PREFIX "%s %s %s %s %llu ", tl->status, cls, mx,
                     tl->dsn_code ? "r" : "-", (unsigned long long)at_ms);
    if (n < 0 || (size_t)n >= cap) {
        snprintf(buf, cap, "%s", text != NULL ? text : "");
        return 0;
    }
    snprintf(buf + n, cap - (size_t)n, "%s", text != NULL ? text : "");
    return (uint16_t)n;
}

/* "C.S.D", as dsn_build takes a Status: C any dsn_status_format writes
 * for a failure (2 too: a 550 whose enhanced code says 2.X.X). */
static bool
held_status_ok(const char *s)
{
    size_t l = strlen(s);
    if (l < 5 || l >= DSN_STATUS_MAX || (s[0] != '2' && s[0] != '4' && s[0] != '5') ||
        s[1] != '.')
        return false;
    unsigned dots = 0;
    for (size_t i = 2; i < l; i++) {
        if (s[i] == '.') {
            if (s[i - 1] == '.' || i + 1 == l)
                return false;
            dots++;
        } else if (s[i] < '0' || s[i] > '9') {
            return false;
        }
    }
    return dots == 1;
}

/* The DSN entry of the held recipient r (outcome_held_reply) into tl, its
 * Remote-MTA into e, its reply text into *text (into r). A reply not made
 * so (damaged) reads as a failure of its code's class, all of it text:
 * returns false. */
static bool
held_entry(const struct queue_rcpt *r, struct outcome_tell *tl, struct outcome_held_ent *e,
           const char **text)
{
    memset(tl, 0, sizeof(*tl));
    tl->addr = r->addr;
    tl->orcpt = r->orcpt != NULL && r->orcpt[0] != '\0' ? r->orcpt : NULL;
    tl->kind = DLOG_BOUNCE;
    tl->cls = BOUNCE_OTHER;
    tl->action = DSN_ACTION_FAILED;
    tl->dsn = true;
    tl->quiet = true;
    tl->at_ms = r->last_ms;
    e->mx[0] = '\0';
    const char *p = r->last_reply != NULL ? r->last_reply : "";
    *text = p;
    char tok[5][256];
    bool ok = strncmp(p, HELD_PREFIX, strlen(HELD_PREFIX)) == 0;
    if (ok)
        p += strlen(HELD_PREFIX);
    for (int k = 0; ok && k < 5; k++) {
        size_t l = strcspn(p, " ");
        ok = l > 0 && l < sizeof(tok[k]) && p[l] == ' ';
        if (ok) {
            memcpy(tok[k], p, l);
            tok[k][l] = '\0';
            p += l + 1;
        }
    }
    enum bounce_class cls = BOUNCE_OTHER;
    bool relayed = ok && strcmp(tok[1], HELD_RELAYED) == 0 && tok[0][0] == '2';
    ok = ok && held_status_ok(tok[0]) && (relayed || bounce_class_parse(tok[1], &cls) == 0) &&
         strspn(tok[4], "0123456789") == strlen(tok[4]);
    if (ok && relayed) {
        tl->kind = DLOG_DELIVERY;
        tl->action = DSN_ACTION_RELAYED;
    }
    if (ok) {
        uint64_t at = strtoull(tok[4], NULL, 10);
        if (at != 0)
            tl->at_ms = at;
        /* shorter than it (held_status_ok), bound for the compiler's sake */
        snprintf(tl->status, sizeof(tl->status), "%.*s", (int)sizeof(tl->status) - 1, tok[0]);
        tl->cls = (uint8_t)cls;
        if (strcmp(tok[2], "-") != 0)
            snprintf(e->mx, sizeof(e->mx), "%s", tok[2]);
        tl->dsn_code = tok[3][0] == 'r' ? r->last_code : 0;
        *text = p;
    } else {
        static const struct smtp_enh none;
        dsn_status_format(tl->status, sizeof(tl->status), &none, r->last_code, DSN_ACTION_FAILED);
        tl->dsn_code = r->last_code;
    }
    tl->mx = e->mx[0] != '\0' ? e->mx : NULL;
    return ok;
}

const char *
delivery_held_reply(const struct queue_rcpt *r)
{
    struct outcome_tell tl;
    struct outcome_held_ent e;
    const char *text;
    (void)held_entry(r, &tl, &e, &text);
    return text;
}

/* The held failures of env as quiet outcomes qo[0..) told by tl[0..),
 * their DSN entries dr[0..) (their strings in e[0..)). Returns how many. */
unsigned
outcome_held_collect(const struct queue_envelope *env, struct queue_outcome *qo,
                     struct outcome_tell *tl, struct dsn_rcpt *dr, struct outcome_held_ent *e,
                     const struct outcome_info *info)
{
    unsigned n = 0;
    for (unsigned k = 0; k < env->nrcpt; k++) {
        const struct queue_rcpt *r = &env->rcpt[k];
        if (r->tag != DSN_HELD_TAG)
            continue;
        const char *text;
        (void)held_entry(r, &tl[n], &e[n], &text);
        qo[n] = (struct queue_outcome){.id = env->id,
                                       .rcpt = r->index,
                                       .kind = QUEUE_BOUNCED,
                                       .tag = DSN_HELD_TAG, /* its hold's end (queue.h) */
                                       .code = r->last_code,
                                       .reply = text};
        outcome_dsn_rcpt_of(&dr[n], &tl[n], text, info);
        n++;
    }
    return n;
}

/* The time the first held failure of env failed, or now (none). */
static uint64_t
held_first(const struct queue_envelope *env, uint64_t now)
{
    uint64_t first = now;
    for (unsigned k = 0; k < env->nrcpt; k++) {
        if (env->rcpt[k].tag != DSN_HELD_TAG)
            continue;
        struct outcome_tell tl;
        struct outcome_held_ent e;
        const char *text;
        /* a damaged entry's last_ms moves at each hold again: its
         * message's arrival bounds its wait instead */
        uint64_t at = held_entry(&env->rcpt[k], &tl, &e, &text) ? tl.at_ms : env->arrival_ms;
        if (at != 0 && at < first)
            first = at;
    }
    return first;
}

/* When held failures of env are due next: in HELD_CHECK_MS, or when
 * dsn_wait since the first one ends, if sooner. */
static uint64_t
held_due_ms(const struct delivery *d, const struct queue_envelope *env, uint64_t now)
{
    uint64_t last = held_first(env, now) + d->cfg->bounce.dsn_wait;
    uint64_t next = now + HELD_CHECK_MS;
    return last > now && last < next ? last : next;
}

/* For job_finish: whether recipients of env not in j are ready (queued,
 * or in flight: j's failures are held for them); *nheld the held ones,
 * *due when j's held ones are due (held_due_ms). */
bool
outcome_held_scan(const struct delivery *d, const struct queue_envelope *env, const struct job *j,
                  unsigned *nheld, uint64_t *due)
{
    *nheld = 0;
    *due = held_due_ms(d, env, clock_unix_ms());
    bool *mine = calloc(env->nrcpt ? env->nrcpt : 1, sizeof(*mine));
    if (mine == NULL)
        return false; /* a DSN for j's failures now, as without dsn_wait */
    for (unsigned i = 0; i < j->n; i++) {
        const struct queue_rcpt *r = queue_envelope_rcpt(env, j->idx[i]);
        if (r != NULL)
            mine[r - env->rcpt] = true;
    }
    bool ready = false;
    for (unsigned k = 0; k < env->nrcpt; k++) {
        const struct queue_rcpt *r = &env->rcpt[k];
        if (r->tag == DSN_HELD_TAG)
            (*nheld)++;
        else if (!mine[k] && r->state == QUEUE_RCPT_READY) {
            ready = true;
        }
    }
    free(mine);
    return ready;
}

/* Commit the removal of env's held failures with their DSN, on t (whose
 * batch it is, counted for nothing: they were told when held). */
static void
held_flush(struct delivery *d, struct dest *t, const struct queue_envelope *env)
{
    unsigned n = 0;
    for (unsigned k = 0; k < env->nrcpt; k++)
        n += env->rcpt[k].tag == DSN_HELD_TAG;
    if (n == 0)
        return;
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(env->id, qid);
    struct queue_outcome *qo = calloc(n, sizeof(*qo));
    struct outcome_tell *tl = calloc(n, sizeof(*tl));
    unsigned *lines = calloc(n, sizeof(*lines));
    struct dsn_rcpt *dr = calloc(n, sizeof(*dr));
    struct outcome_held_ent *e = calloc(n, sizeof(*e));
    struct json ev;
    json_init(&ev);
    int rc = -ENOMEM;
    if (qo != NULL && tl != NULL && lines != NULL && dr != NULL && e != NULL) {
        struct outcome_info info = {.now_ms = clock_unix_ms()};
        snprintf(info.tls_policy, sizeof(info.tls_policy), "-");
        n = outcome_held_collect(env, qo, tl, dr, e, &info);
        struct dsn_msg *dm = d->cfg->bounce.dsn ? outcome_dsn_make(d, env, dr, n) : NULL;
        if (dm != NULL) {
            struct dlog_writer *lw = d->dlog;
            dlog_capture(lw, &ev, false);
            outcome_dsn_event(d, dm, dr, n);
            dlog_capture(lw, NULL, false);
        }
        for (unsigned k = 0; k < n; k++)
            tl[k].dsn &= dm != NULL;
        bool lost = json_failed(&ev);
        if (lost)
            log_msg(LOG_ERR, "event=events_lost id=%s reason=out_of_memory", qid);
        rc = outcome_commit(d, t, qo, tl, lines, n, dm, lost ? NULL : ev.buf, lost ? 0 : ev.len,
                            &info, NULL, false);
        if (rc < 0)
            dsn_msg_free(dm);
    }
    if (rc < 0) /* they stay held in the spool: the next start sends their DSN */
        log_msg(LOG_ERR, "event=outcome_submit_failed id=%s err=\"%s\" held=%u", qid,
                queue_strerror(rc), n);
    json_fini(&ev);
    free(qo);
    free(tl);
    free(lines);
    free(dr);
    free(e);
}

/* A commit of message id is durable: when no recipient of it is ready
 * now, the DSN of its held failures goes. */
void
outcome_held_recheck(struct delivery *d, struct dest *t, uint64_t id)
{
    struct queue_envelope *env = NULL;
    if (queue_envelope_get(d->queue, id, &env) != 0)
        return; /* done, or unreadable: their due time sends them */
    bool held = false, ready = false;
    for (unsigned k = 0; k < env->nrcpt; k++) {
        if (env->rcpt[k].tag == DSN_HELD_TAG)
            held = true;
        else if (env->rcpt[k].state == QUEUE_RCPT_READY)
            ready = true;
    }
    if (held && !ready)
        held_flush(d, t, env);
    queue_envelope_free(env);
}

/* The held failures of env held again (a deferral of the same tag and
 * reply, due at due), told nothing. */
static void
held_again(struct delivery *d, struct dest *t, const struct queue_envelope *env, uint64_t due)
{
    unsigned n = 0;
    for (unsigned k = 0; k < env->nrcpt; k++)
        n += env->rcpt[k].tag == DSN_HELD_TAG;
    if (n == 0)
        return;
    struct queue_outcome *qo = calloc(n, sizeof(*qo));
    struct outcome_tell *tl = calloc(n, sizeof(*tl));
    unsigned *lines = calloc(n, sizeof(*lines));
    int rc = -ENOMEM;
    if (qo != NULL && tl != NULL && lines != NULL) {
        unsigned m = 0;
        for (unsigned k = 0; k < env->nrcpt; k++) {
            const struct queue_rcpt *r = &env->rcpt[k];
            if (r->tag != DSN_HELD_TAG)
                continue;
            qo[m] = (struct queue_outcome){.id = env->id,
                                           .rcpt = r->index,
                                           .kind = QUEUE_DEFERRED,
                                           .due_ms = due,
                                           .code = r->last_code,
                                           .reply = r->last_reply,
                                           .tag = DSN_HELD_TAG,
                                           .untried = true}; /* no attempt counted */
            tl[m] = (struct outcome_tell){.addr = r->addr, .quiet = true};
            m++;
        }
        struct outcome_info info = {.now_ms = clock_unix_ms()};
        snprintf(info.tls_policy, sizeof(info.tls_policy), "-");
        rc = outcome_commit(d, t, qo, tl, lines, m, NULL, NULL, 0, &info, NULL, false);
    }
    if (rc < 0) {
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(env->id, qid);
        log_msg(LOG_ERR, "event=outcome_submit_failed id=%s err=\"%s\" held=%u", qid,
                queue_strerror(rc), n);
    }
    free(qo);
    free(tl);
    free(lines);
}

void
outcome_held_due(struct delivery *d, struct dest *t, struct job *j)
{
    struct queue_envelope *env = NULL;
    int rc = d->stopping ? 0 : queue_envelope_get(d->queue, j->id, &env);
    if (rc == 0 && env != NULL) {
        bool ready = false, held = false;
        for (unsigned k = 0; k < env->nrcpt; k++) {
            if (env->rcpt[k].tag == DSN_HELD_TAG)
                held = true;
            else if (env->rcpt[k].state == QUEUE_RCPT_READY)
                ready = true;
        }
        uint64_t now = clock_unix_ms();
        /* none held: their DSN went meanwhile */
        if (held && ready && held_first(env, now) + d->cfg->bounce.dsn_wait > now)
            held_again(d, t, env, held_due_ms(d, env, now));
        else if (held)
            held_flush(d, t, env);
    } else if (rc != 0 && rc != QUEUE_ENOTFOUND) {
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(j->id, qid);
        log_msg(LOG_ERR,
                "id=%s event=envelope_read_failed domain=%s err=\"%s\" "
                "note=held_dsn_after_restart",
                qid, t->name, queue_strerror(rc));
    }
    queue_envelope_free(env);
    free(j);
}
