/*
 * server_cmd: the commands of a submission session (see server_int.h for
 * the other files of the server): HELO and EHLO (the extensions offered),
 * STARTTLS, MAIL and RCPT (with their parameters: SIZE, BODY, SMTPUTF8,
 * DSN, AUTH, none of them after HELO; relay rules, suppression, the
 * bounce role's rules), DATA and BDAT (chunks read into the body; BDAT
 * only after EHLO), RSET, NOOP, VRFY, HELP and QUIT; AUTH (PLAIN, LOGIN;
 * the hashing pool and the failure limits) is engine/server_auth.c's,
 * called from here. Each handler answers through reply() and moves the
 * session with session_enter(); server.c reads the lines and calls them.
 *
 * Threading: the worker's thread.
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
#include "common/idn.h"
#include "common/log.h"
#include "engine/delivery.h"
#include "engine/dlog.h"
#include "engine/oob.h"
#include "engine/server_int.h"
#include "engine/suppress.h"
#include "tls/tls.h"

/* ---- commands ---- */

static void
cmd_ehlo(struct session *s, const struct smtp_cmd *c, bool ehlo)
{
    size_t n = c->arg.len < sizeof(s->helo) ? c->arg.len : sizeof(s->helo) - 1;
    memcpy(s->helo, c->arg.ptr, n);
    s->helo[n] = '\0';
    s->greeted = true;
    s->esmtp = ehlo;
    txn_reset(s);
    const char *host = s->sw->e->cfg->server.hostname;
    if (!ehlo) {
        reply(s, "250 %s", host);
        return;
    }
    reply(s, "250-%s", host);
    reply(s, "250-PIPELINING");
    if (s->sw->tls != NULL && !stream_tls(&s->st))
        reply(s, "250-STARTTLS");
    reply(s, "250-SIZE %llu", (unsigned long long)s->sw->cfg->max_message_size);
    if (s->users != NULL && auth_allowed_here(s))
        reply(s, "250-AUTH PLAIN LOGIN");
    reply(s, "250-ENHANCEDSTATUSCODES");
    reply(s, "250-8BITMIME");
    reply(s, "250-SMTPUTF8");
    reply(s, "250-DSN");
    reply(s, "250 CHUNKING");
}

/* A session greeted with HELO was shown no extension, and a client may
 * use only those the EHLO reply showed (RFC 5321 2.2.1, RFC 1869 4; RFC
 * 6531 3.4 for SMTPUTF8): MAIL and RCPT with parameters are refused, 555
 * as for parameters not known (RFC 5321 4.1.1.11), naming them, and move
 * nothing. The parser says so (SMTP_CMD_F_NO_PARAMS) before it reads a
 * value: one it would find bad gets this same answer, not its 501.
 * Postfix takes them after HELO as after EHLO; a parameter that changes
 * how the transaction is read (SMTPUTF8, BODY) must not come from a
 * client that never learned it was offered. */
static void
params_after_helo(struct session *s, const struct smtp_cmd *c)
{
    uint32_t seen = c->params.seen;
    char names[96];
    size_t o = 0;
    for (uint32_t bit = 1; bit != 0 && bit <= seen; bit <<= 1)
        if (seen & bit)
            o += (size_t)snprintf(names + o, sizeof(names) - o, "%s%s", o ? " " : "",
                                  smtp_param_str(bit));
    /* The first keyword the parser does not know, as written (letters,
     * digits and hyphens only), cut to what the reply has room for. */
    if (c->err_param.len > 0 && o < sizeof(names))
        snprintf(names + o, sizeof(names) - o, "%s%.*s", o ? " " : "",
                 (int)(c->err_param.len < 32 ? c->err_param.len : 32), c->err_param.ptr);
    reply(s, "555 5.5.4 Unsupported option after HELO: %s (ESMTP parameters need EHLO)", names);
}

static void
cmd_mail(struct session *s, const struct smtp_cmd *c)
{
    const struct server_config *cfg = s->sw->cfg;
    if (!s->greeted) {
        reply(s, "503 5.5.1 Send HELO or EHLO first");
        return;
    }
    if (s->in_txn) {
        reply(s, "503 5.5.1 Nested MAIL command");
        return;
    }
    if (s->user == NULL && !s->trusted && !s->bounce) {
        reply(s, "530 5.7.0 Authentication required");
        return;
    }
    const struct smtp_params *p = &c->params;
    if ((p->seen & SMTP_PARAM_SIZE) && p->size > cfg->max_message_size) {
        reply(s, "552 5.3.4 Message size exceeds fixed maximum message size");
        return;
    }
    /* Known now, said now: a declared size the body memory cannot hold at
     * the moment. Nothing is set aside for it (a client may declare more
     * than it sends); the data is held to the same budget as it comes. */
    uint64_t held = atomic_load_explicit(&s->sw->e->body_bytes, memory_order_relaxed);
    if ((p->seen & SMTP_PARAM_SIZE) &&
        (held > cfg->body_memory_limit || p->size > cfg->body_memory_limit - held)) {
        log_msg(LOG_NOTICE,
                "session=%016llx event=body_memory_full client=%s size=%llu held=%llu "
                "limit=%llu at=mail",
                (unsigned long long)s->id, s->peer_ip, (unsigned long long)p->size,
                (unsigned long long)held, (unsigned long long)cfg->body_memory_limit);
        reply(s, "452 4.3.1 Insufficient system resources for a message of this size now: "
                 "try again later");
        return;
    }
    if ((p->seen & SMTP_PARAM_BODY) && p->body == SMTP_BODY_BINARYMIME) {
        reply(s, "555 5.5.4 BODY=BINARYMIME is not offered here");
        return;
    }
    if (s->user != NULL && !(c->path.flags & SMTP_PATH_NULL) &&
        !auth_user_may_send_as(s->user, c->path.domain.ptr, c->path.domain.len)) {
        reply(s, "553 5.7.1 Sender address not owned by user %s", s->user->name);
        return;
    }
    if (s->user != NULL && (c->path.flags & SMTP_PATH_NULL) && !s->user->null_sender) {
        /* A bounce from a user tied to sender domains would carry no
         * domain of theirs: only where the users file says "<>". */
        reply(s, "553 5.7.1 Null sender not allowed for user %s", s->user->name);
        return;
    }
    s->sender = session_span_dup(c->path.mailbox);
    if ((p->seen & SMTP_PARAM_ENVID) && (s->envid = session_span_dup(p->envid)) == NULL)
        s->sender = (free(s->sender), NULL);
    if (s->sender == NULL) {
        reply(s, "451 4.3.0 Local error in processing");
        return;
    }
    s->size_hint = (p->seen & SMTP_PARAM_SIZE) ? p->size : 0;
    s->ret = p->ret;
    s->body_type = p->body;
    s->smtputf8 = (p->seen & SMTP_PARAM_SMTPUTF8) != 0;
    s->in_txn = true;
    reply(s, "250 2.1.0 Ok");
}

/* The bounce role's RCPT rule (oob.h); false when refused (said). */
static bool
bounce_rcpt_ok(struct session *s, const struct smtp_cmd *c)
{
    char addr[SMTP_CMD_LINE_MAX];
    size_t n = c->path.mailbox.len < sizeof(addr) - 1 ? c->path.mailbox.len : sizeof(addr) - 1;
    memcpy(addr, c->path.mailbox.ptr, n);
    addr[n] = '\0';
    struct verp_ref ref;
    enum oob_rcpt r = oob_rcpt_check(&s->sw->e->cfg->bounce, addr, &ref);
    if (r == OOB_RCPT_VERP || r == OOB_RCPT_LOCAL)
        return true;
    s->sw->stats.oob_refused++;
    /* An error toward max_errors, as Postfix's hard error limit counts a
     * refused RCPT: the listener is open to anyone, and a client trying
     * addresses or tokens one after another (each an HMAC and a log line)
     * is closed; a reporting MTA sends one VERP address per bounce. */
    s->errors++;
    log_msg(LOG_NOTICE, "session=%016llx event=oob_rcpt_refused client=%s rcpt=<%.*s> reason=%s",
            (unsigned long long)s->id, s->peer_ip, (int)(n < 200 ? n : 200), addr,
            r == OOB_RCPT_FORGED ? "forged_token" : "not_a_bounce_address");
    if (r == OOB_RCPT_FORGED)
        reply(s, "550 5.7.1 <%.*s>: bounce address not recognised", (int)(n < 200 ? n : 200),
              addr);
    else
        reply(s, "550 5.7.1 <%.*s>: relay access denied", (int)(n < 200 ? n : 200), addr);
    return false;
}

/* A suppressed or rejection event kept back (struct session's supp):
 * its strings in data, one allocation. */
struct supp_pending {
    enum dlog_kind kind; /* DLOG_SUPPRESSED or DLOG_REJECTION */
    const char *addr, *text, *scope;
    const char *reason; /* static */
    char data[];
};

/* The event of a recipient refused at RCPT: kind DLOG_SUPPRESSED (scope
 * its list) or DLOG_REJECTION (for its address: scope ""; its domain
 * left out, the address being what did not parse). */
static void
supp_event(struct session *s, enum dlog_kind kind, const char *addr, const char *text,
           const char *reason, const char *scope, const char *tenant)
{
    struct engine *e = s->sw->e;
    struct dlog_writer *lw = e->dlogw ? e->dlogw[s->sw->w->id] : NULL;
    const char *at = kind == DLOG_SUPPRESSED ? strrchr(addr, '@') : NULL;
    struct dlog_event ev = {
        .kind = kind,
        .rcpt = addr,
        .sender = s->sender,
        .domain = at != NULL ? at + 1 : NULL,
        .code = (unsigned)atoi(text),
        .reply = text,
        .reason = reason,
        .scope = scope[0] != '\0' ? scope : NULL,
        .client = s->peer_ip,
        .auth_user = s->user ? s->user->name : NULL,
        .tenant = tenant,
    };
    dlog_event(lw, &ev);
}

/* Keep the event back until the transaction's tenant is known; false
 * when there is no room (max_recipients kept) or memory. */
static bool
supp_keep(struct session *s, enum dlog_kind kind, const char *addr, const char *text,
          const char *reason, const char *scope)
{
    if (s->supp == NULL) {
        unsigned max = s->sw->cfg->max_recipients;
        if ((s->supp = calloc(max, sizeof(*s->supp))) == NULL)
            return false;
        s->supp_cap = max;
    }
    if (s->nsupp >= s->supp_cap)
        return false;
    size_t la = strlen(addr) + 1, lt = strlen(text) + 1, ls = strlen(scope) + 1;
    struct supp_pending *p = malloc(sizeof(*p) + la + lt + ls);
    if (p == NULL)
        return false;
    p->kind = kind;
    p->addr = memcpy(p->data, addr, la);
    p->text = memcpy(p->data + la, text, lt);
    p->scope = memcpy(p->data + la + lt, scope, ls);
    p->reason = reason;
    s->supp[s->nsupp++] = p;
    return true;
}

void
supp_flush(struct session *s, const char *tenant)
{
    for (unsigned i = 0; i < s->nsupp; i++) {
        struct supp_pending *p = s->supp[i];
        supp_event(s, p->kind, p->addr, p->text, p->reason, p->scope, tenant);
        free(p);
    }
    free(s->supp);
    s->supp = NULL;
    s->nsupp = s->supp_cap = 0;
}

/* Check addr against the suppression list: the global list, then
 * tenant's own (NULL: none). Returns 1 when it is suppressed (the
 * event logged and counted, the reply to give in text), 0 when not, or a
 * negative errno when the list cannot be read (logged). With keep, the
 * event for the delivery log and the sinks waits for the transaction's
 * tenant (supp_flush). */
static int
suppress_one(struct session *s, const char *addr, const char *tenant, char *text, size_t tlen,
             bool keep)
{
    struct suppress_entry ent;
    int rc = suppress_check(s->sw->e->suppress, tenant, addr, &ent);
    if (rc == 0)
        return 0;
    if (rc < 0) {
        log_msg(LOG_ERR, "session=%016llx event=suppress_check_failed rcpt=<%s> err=\"%s\"",
                (unsigned long long)s->id, addr, strerror(-rc));
        return rc;
    }
    suppress_reply(s->sw->e->suppress, addr, &ent, text, tlen);
    s->sw->stats.rcpt_suppressed++;
    log_msg(LOG_INFO,
            "session=%016llx event=suppressed rcpt=<%s> from=<%s> reason=%s scope=%s entry=%s "
            "user=%s client=%s",
            (unsigned long long)s->id, addr, s->sender, suppress_reason_str(ent.reason), ent.scope,
            ent.addr, s->user ? s->user->name : "-", s->peer_ip);
    const char *reason = suppress_reason_str(ent.reason);
    if (!keep || !supp_keep(s, DLOG_SUPPRESSED, addr, text, reason, ent.scope))
        supp_event(s, DLOG_SUPPRESSED, addr, text, reason, ent.scope, tenant);
    return 1;
}

/* The tenant whose list RCPT checks: the AUTH user's tenant= under the
 * config's name for it, the one the message, its VERP token and so its
 * complaints carry (names compare without case, and so do list scopes:
 * suppress.c folds them). A tenant the config does not name is checked
 * as written (the message is refused after DATA anyway). A tenant named
 * by control header fields is known only after DATA
 * (suppress_after_data). e->cfg is read once (an atomic pointer): a
 * worker that did not park within a reload's 2 s may read it as it is
 * replaced, old or new, and the name returned stays valid either way
 * (main.c frees no replaced config before exit). */
static const char *
rcpt_tenant(const struct session *s)
{
    if (s->user == NULL || s->user->tenant == NULL)
        return NULL;
    const struct tenant_config *t =
        config_tenant(s->sw->e->cfg, s->user->tenant, strlen(s->user->tenant));
    return t != NULL ? t->name : s->user->tenant;
}

/* A recipient refused for its address (553 5.1.3, 5.1.2, 5.6.7) in a
 * transaction on the submission port: its reply said, a line in the log
 * and a rejection event for the delivery log and the sinks (as
 * KumoMTA's Rejection record), as a suppressed recipient has, so that a
 * backend that reads the events hears of every recipient it gave that
 * will get no outcome. addr is what the client wrote (len octets, any
 * octets: the log and the events escape them); why says what is wrong
 * with it. The event waits for the transaction's tenant as a suppressed
 * one does. */
static void
rcpt_rejected(struct session *s, const char *addr, size_t len, const char *text, const char *why)
{
    char a[SMTP_PATH_MAX + 1];
    if (len > SMTP_PATH_MAX)
        len = SMTP_PATH_MAX;
    memcpy(a, addr, len);
    a[len] = '\0';
    for (size_t i = 0; i < len; i++)
        if (a[i] == '\0')
            a[i] = '?'; /* the line framing lets no NUL through; one would cut it short */
    reply(s, "%s", text);
    log_msg(LOG_INFO,
            "session=%016llx event=rcpt_rejected rcpt=<%s> from=<%s> reason=\"%s\" reply=\"%s\" "
            "user=%s client=%s",
            (unsigned long long)s->id, a, s->sender, why, text, s->user ? s->user->name : "-",
            s->peer_ip);
    const char *tenant = rcpt_tenant(s);
    if (tenant != NULL || !supp_keep(s, DLOG_REJECTION, a, text, why, ""))
        supp_event(s, DLOG_REJECTION, a, text, why, "", tenant);
}

/* The address of an RCPT that did not parse, as the client wrote it: the
 * argument after "TO:" (and the space Postfix allows), without its angle
 * brackets and parameters. */
static struct smtp_span
rcpt_written(const struct smtp_cmd *c)
{
    const char *p = c->arg.ptr, *end = p + c->arg.len;
    if (end - p >= 3 && strncasecmp(p, "to:", 3) == 0)
        p += 3;
    if (p < end && *p == ' ')
        p++;
    const char *q = p;
    if (p < end && *p == '<') {
        p++;
        for (q = p; q < end && !(*q == '>' && (q + 1 == end || q[1] == ' ')); q++)
            ;
    } else {
        while (q < end && *q != ' ')
            q++;
    }
    return (struct smtp_span){p, (size_t)(q - p)};
}

/* The suppression list at RCPT: one read transaction. True when the
 * recipient was refused (the reply is said, the event logged). A list
 * that cannot be read defers the recipient: better late than to a
 * complainer. */
static bool
rcpt_suppressed(struct session *s, const struct smtp_cmd *c)
{
    char addr[1024];
    if (c->path.mailbox.len >= sizeof(addr))
        return false; /* the parser keeps paths far shorter */
    memcpy(addr, c->path.mailbox.ptr, c->path.mailbox.len);
    addr[c->path.mailbox.len] = '\0';
    char text[512];
    /* Without the AUTH user's tenant, the message may name one after
     * DATA (X-Sluice-Tenant): the event waits to carry it, so that a
     * sink filtered by tenant hears of its refused recipients. */
    const char *tenant = rcpt_tenant(s);
    int rc = suppress_one(s, addr, tenant, text, sizeof(text), tenant == NULL);
    if (rc == 0)
        return false;
    if (rc < 0)
        reply(s, "451 4.3.0 Local error in processing");
    else
        reply(s, "%s", text);
    return true;
}

/* After DATA, once the message's tenant is known: when it is not the one
 * RCPT checked (a tenant named by X-Sluice-Tenant from a trusted client),
 * each recipient is checked against that tenant's list too, and the ones
 * on it are dropped from the transaction (each with its suppressed event,
 * as at RCPT). Returns 0 with at least one recipient left, or a negative
 * value with the reply for the whole message in text: every recipient
 * suppressed (550) or the list unreadable (451). */
int
suppress_after_data(struct session *s, char *text, size_t tlen)
{
    const char *tenant = s->owner.tenant != NULL ? s->owner.tenant->name : NULL;
    const char *checked = rcpt_tenant(s);
    supp_flush(s, tenant); /* the RCPTs refused: now with the message's tenant */
    if (s->sw->e->suppress == NULL || tenant == NULL ||
        (checked != NULL && strcasecmp(checked, tenant) == 0))
        return 0;
    unsigned kept = 0;
    char one[512];
    for (unsigned i = 0; i < s->nrcpt; i++) {
        int rc = suppress_one(s, s->rcpts[i].addr, tenant, one, sizeof(one), false);
        if (rc < 0) {
            snprintf(text, tlen, "451 4.3.0 Local error in processing");
            /* What was dropped so far stays dropped: the message is refused. */
            for (unsigned k = i; k < s->nrcpt; k++)
                s->rcpts[kept++] = s->rcpts[k];
            s->nrcpt = kept;
            return rc;
        }
        if (rc == 1) {
            free(s->rcpts[i].addr);
            free(s->rcpts[i].orcpt);
            continue;
        }
        s->rcpts[kept++] = s->rcpts[i];
    }
    s->nrcpt = kept;
    if (kept == 0) {
        snprintf(text, tlen, "550 5.7.1 Every recipient is suppressed for tenant %s", tenant);
        return -EPERM;
    }
    return 0;
}

void
cmd_rcpt(struct session *s, const struct smtp_cmd *c)
{
    if (!s->in_txn) {
        reply(s, "503 5.5.1 Need MAIL command");
        return;
    }
    if (s->bdat) {
        /* RFC 3030 2: the chunks follow all of MAIL and RCPT. A recipient
         * added between two chunks would change the envelope of a message
         * half received, and no client that means well sends one. */
        reply(s, "503 5.5.1 RCPT after BDAT in one transaction");
        return;
    }
    if ((c->path.flags & SMTP_PATH_POSTMASTER) && !s->bounce) {
        reply(s, "550 5.1.1 No local mailboxes here: give Postmaster a domain");
        return;
    }
    if (s->bounce && !(c->path.flags & SMTP_PATH_POSTMASTER) && !bounce_rcpt_ok(s, c))
        return;
    if (c->path.flags & SMTP_PATH_LIT_OTHER) {
        /* [tag:content]: no address sluice could connect to */
        rcpt_rejected(s, c->path.mailbox.ptr, c->path.mailbox.len,
                      "553 5.1.3 Address literals other than IPv4 and IPv6 cannot be delivered",
                      "address literal neither IPv4 nor IPv6");
        return;
    }
    if (s->nrcpt >= s->sw->cfg->max_recipients) {
        reply(s, "452 4.5.3 Too many recipients");
        return;
    }
    if (!idn_is_ascii(c->path.domain.ptr, c->path.domain.len)) {
        /* U-labels (SMTPUTF8): delivered to their A-labels (job_new); a
         * name that has none could only bounce later, so it is refused
         * now, with libidn2's reason */
        char a[256];
        const char *why = NULL;
        int rc = idn_domain_ascii(c->path.domain.ptr, c->path.domain.len, a, sizeof(a), &why);
        if (rc == -ENOMEM) {
            reply(s, "451 4.3.0 Local error in processing");
            return;
        }
        if (rc < 0) {
            char text[300];
            snprintf(text, sizeof(text), "553 5.1.2 Recipient domain is not a valid IDN: %s",
                     rc == -ENAMETOOLONG ? "too long"
                     : why != NULL       ? why
                                         : "not UTF-8");
            rcpt_rejected(s, c->path.mailbox.ptr, c->path.mailbox.len, text,
                          "domain not a valid IDN");
            return;
        }
    }
    if (!s->bounce && s->sw->e->suppress != NULL && rcpt_suppressed(s, c))
        return;
    /* A recipient's memory comes from the body budget until the
     * transaction ends: max_recipients of the longest addresses with an
     * ORCPT are about 0.8 MB a session, which max_clients sessions
     * would hold outside body_memory_limit. */
    uint64_t cost = sizeof(struct rcpt) + RCPT_ALLOC_OVERHEAD + c->path.mailbox.len + 1;
    if (c->params.seen & SMTP_PARAM_ORCPT)
        cost += RCPT_ALLOC_OVERHEAD + c->params.orcpt_type.len + c->params.orcpt_addr.len + 2;
    if (!body_budget_take(s->sw->e, cost, s->sw->cfg->body_memory_limit)) {
        log_msg(LOG_WARN,
                "session=%016llx event=body_memory_full client=%s nrcpt=%u held=%llu limit=%llu "
                "err=body_memory_limit",
                (unsigned long long)s->id, s->peer_ip, s->nrcpt,
                (unsigned long long)atomic_load(&s->sw->e->body_bytes),
                (unsigned long long)s->sw->cfg->body_memory_limit);
        reply(s, "452 4.3.1 Insufficient system resources");
        return;
    }
    s->rcpt_bytes += cost;
    if (s->nrcpt == s->rcpt_cap) {
        unsigned cap = s->rcpt_cap ? s->rcpt_cap * 2 : 8;
        struct rcpt *v = realloc(s->rcpts, sizeof(*v) * cap);
        if (v == NULL) {
            body_budget_give(s->sw->e, cost);
            s->rcpt_bytes -= cost;
            reply(s, "452 4.3.1 Insufficient system resources");
            return;
        }
        s->rcpts = v;
        s->rcpt_cap = cap;
    }
    struct rcpt *r = &s->rcpts[s->nrcpt];
    memset(r, 0, sizeof(*r));
    r->addr = session_span_dup(c->path.mailbox);
    r->notify = c->params.notify;
    if (c->params.seen & SMTP_PARAM_ORCPT) {
        size_t tl = c->params.orcpt_type.len, al = c->params.orcpt_addr.len;
        r->orcpt = malloc(tl + al + 2);
        if (r->orcpt != NULL) {
            memcpy(r->orcpt, c->params.orcpt_type.ptr, tl);
            r->orcpt[tl] = ';';
            memcpy(r->orcpt + tl + 1, c->params.orcpt_addr.ptr, al);
            r->orcpt[tl + al + 1] = '\0';
        }
    }
    if (r->addr == NULL || ((c->params.seen & SMTP_PARAM_ORCPT) && r->orcpt == NULL)) {
        free(r->addr);
        free(r->orcpt);
        body_budget_give(s->sw->e, cost);
        s->rcpt_bytes -= cost;
        reply(s, "452 4.3.1 Insufficient system resources");
        return;
    }
    s->nrcpt++;
    reply(s, "250 2.1.5 Ok");
}


static void
data_start(struct session *s)
{
    s->msg_id = s->sw->detached ? s->sw->seq++ : queue_id_next(s->sw->e->queue);
    smtp_unstuff_init(&s->unstuff);
    s->body_len = 0;
    s->body_seen = 0;
    s->too_big = false;
    dkim_body_start(s);
}

static void
cmd_data(struct session *s, size_t rest)
{
    if (rest != 0) {
        /* RFC 2920 3.1: DATA ends a pipelined group; the client must wait
         * for its reply. Bytes already here were sent before it: treating
         * them as content or as commands would both be guesses, and when
         * the DATA is refused (no valid recipient, no MAIL) they are most
         * likely the content, whose lines must never run as commands. */
        log_msg(LOG_NOTICE, "session=%016llx event=early_data client=%s octets=%zu",
                (unsigned long long)s->id, s->peer_ip, rest);
        reply_close(s, "554 5.5.0 Message content sent before the 354 reply: closing");
        return;
    }
    if (!s->in_txn) {
        reply(s, "503 5.5.1 Need MAIL command");
        return;
    }
    if (s->nrcpt == 0) {
        reply(s, "554 5.5.1 No valid recipients");
        return;
    }
    if (s->bdat) {
        reply(s, "503 5.5.1 DATA after BDAT in one transaction");
        return;
    }
    data_start(s);
    reply(s, "354 End data with <CR><LF>.<CR><LF>");
    session_enter(s, SS_DATA);
    session_deadline(s, s->sw->cfg->timeout_data);
}

static void
cmd_bdat(struct session *s, const struct smtp_cmd *c)
{
    s->bdat_left = c->bdat_size;
    s->bdat_last = c->bdat_last;
    s->bdat_discard = false;
    const char *refuse = NULL;
    /* BDAT is CHUNKING's, shown only to EHLO (RFC 3030 2, RFC 1869 4):
     * refused after HELO as Exim does ("BDAT command used when CHUNKING
     * not advertised"; Postfix takes it), its chunk read and dropped like
     * any refused one's, so that its octets are never taken for commands. */
    if (!s->esmtp)
        refuse = "503 5.5.1 BDAT needs EHLO: CHUNKING is not offered after HELO";
    else if (!s->in_txn)
        refuse = "503 5.5.1 Need MAIL command";
    else if (s->nrcpt == 0)
        refuse = "554 5.5.1 No valid recipients";
    if (refuse != NULL) {
        /* The chunk follows the command whatever we say: read it, drop it. */
        s->bdat_discard = true;
        reply(s, "%s", refuse);
    } else if (!s->bdat) {
        s->bdat = true;
        data_start(s);
    }
    session_enter(s, SS_BDAT);
    session_deadline(s, s->sw->cfg->timeout_data);
}

/* A BDAT body has no terminator to protect, but it is stored and relayed
 * like any other: refuse what DATA would refuse. The octets of each chunk
 * are looked at as they are stored (while they are in cache), the state
 * carried across chunks. */
void
bdat_scan(struct session *s, const char *b, size_t len)
{
    uint32_t flags = s->bdat_flags, line = s->bdat_line;
    bool cr = s->bdat_cr;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)b[i];
        if (cr && c != '\n')
            flags |= SMTP_DATA_F_BARE_CR;
        cr = c == '\r';
        if (c == '\n') {
            if (i == 0 ? !s->bdat_cr : b[i - 1] != '\r')
                flags |= SMTP_DATA_F_BARE_LF;
            line = 0;
            continue;
        }
        if (c == '\0')
            flags |= SMTP_DATA_F_NUL;
        else if (c >= 0x80)
            flags |= SMTP_DATA_F_8BIT;
        if (c != '\r' && ++line > SMTP_DATA_LINE_MAX)
            flags |= SMTP_DATA_F_LONG_LINE;
    }
    s->bdat_flags = flags;
    s->bdat_line = line > SMTP_DATA_LINE_MAX ? SMTP_DATA_LINE_MAX + 1 : line;
    s->bdat_cr = cr;
}

static void handle_verb(struct session *s, struct smtp_cmd *cp, size_t rest);

/* A BDAT command whose size could not be read: its chunk follows, and
 * where it ends is unknown. Reading on would take the client's octets
 * for commands (an RCPT or a MAIL hidden in a chunk would be acted on);
 * RFC 3030 leaves no other safe answer than to refuse and hang up. */
void
bdat_unframed(struct session *s, const char *why)
{
    log_msg(LOG_NOTICE, "session=%016llx event=bdat_unframed client=%s reason=%s",
            (unsigned long long)s->id, s->peer_ip, why);
    reply_close(s, "501 5.5.4 Syntax error in BDAT size; closing");
}

/* A line too long for the line finder that is a BDAT: "BDAT" and a space
 * at the start of buf. */
bool
is_bdat_line(const char *buf, size_t len)
{
    return len >= 5 && strncasecmp(buf, "bdat ", 5) == 0;
}

/* Whether a command that did not parse is a recipient refused for its
 * address (553 5.1.3, 553 5.6.7) in a transaction on the submission
 * port: a refused recipient, as a suppressed one, not a protocol error
 * toward max_errors. A bulk sender's list holds such addresses
 * (user@host-.example, a local part over 64 octets), and twenty of
 * them in one message's recipients closed the session and lost the
 * message. Outside a transaction (no MAIL accepted: no AUTH, say) and
 * at the bounce listener, which is open to anyone, they count. */
static bool
rcpt_address_refused(const struct session *s, const struct smtp_cmd *c, int rc)
{
    if (c->verb != SMTP_VERB_RCPT || !s->in_txn || s->bounce)
        return false;
    switch (rc) {
    case SMTP_CMD_E_ROUTE_SYNTAX:
    case SMTP_CMD_E_LOCAL_SYNTAX:
    case SMTP_CMD_E_NO_DOMAIN:
    case SMTP_CMD_E_DOMAIN_SYNTAX:
    case SMTP_CMD_E_LITERAL_SYNTAX:
    case SMTP_CMD_E_LOCAL_TOO_LONG:
    case SMTP_CMD_E_DOMAIN_TOO_LONG:
    case SMTP_CMD_E_LABEL_TOO_LONG:
    case SMTP_CMD_E_UTF8_INVALID:
    case SMTP_CMD_E_UTF8_NOT_ALLOWED:
        return true;
    default:
        return false;
    }
}

/* Handle one command line (without CRLF). rest: octets after it. */
void
handle_line(struct session *s, const char *line, size_t len, size_t rest)
{
    if (s->state == SS_AUTH) {
        auth_response(s, line, len);
        return;
    }
    struct smtp_cmd c;
    uint32_t flags = (s->smtputf8 ? SMTP_CMD_F_UTF8 : 0) |
                     (s->greeted && !s->esmtp ? SMTP_CMD_F_NO_PARAMS : 0);
    int rc = smtp_cmd_parse(line, len, flags, &c);
    unsigned v = (unsigned)c.verb <= SMTP_VERB_AUTH ? (unsigned)c.verb : SMTP_VERB_NONE;
    size_t at = s->out_len; /* where this command's reply starts */
    command_begin(s, v); /* its reply is counted by reply(), whenever it comes */
    if (rc < 0 && rc != SMTP_CMD_E_PARAM_UNOFFERED) {
        if (rcpt_address_refused(s, &c, rc)) {
            struct smtp_span a = rcpt_written(&c);
            rcpt_rejected(s, a.ptr, a.len, smtp_cmd_err_reply(rc, c.verb), smtp_cmd_err_str(rc));
            return;
        }
        s->errors++;
        if (c.verb == SMTP_VERB_BDAT)
            bdat_unframed(s, rc == SMTP_CMD_E_LINE_TOO_LONG ? "line_too_long" : "bad_size");
        else
            reply(s, "%s", smtp_cmd_err_reply(rc, c.verb));
        return;
    }
    bool in_txn = s->in_txn, greeted = s->greeted;
    if (rc == SMTP_CMD_E_PARAM_UNOFFERED)
        params_after_helo(s, &c); /* no protocol error (max_errors): an old client's habit */
    else
        handle_verb(s, &c, rest);
    bool refused = s->out_len > at && (s->out[at] == '4' || s->out[at] == '5');
    /* Commands that move no mail, counted since the last MAIL accepted;
     * past [server] max_junk_commands the session is closed (run_commands;
     * Postfix's smtpd_junk_command_limit). Not one: an RSET that ends a
     * transaction (smtplib's after every recipient was refused), a refused
     * RCPT (a bulk sender's suppressed recipients are refused by the
     * thousand), a MAIL refused for now (4xx: our own back-pressure). An
     * EHLO or HELO counts when the session was greeted already: the first
     * one, and the one after STARTTLS (tls_established forgets the
     * greeting), are the protocol's; one that resets between transactions
     * is followed by a MAIL that clears the count; a client that only
     * greets, for ever, is closed like one that only says NOOP. So is one
     * that repeats, for ever and with no protocol error, an AUTH or a
     * STARTTLS refused with 5xx (a mechanism or service not offered, a
     * second one; an AUTH cancelled, auth_response) or an RCPT, DATA or
     * BDAT outside a transaction; not the RCPTs, DATA and BDATs pipelined
     * behind a refused MAIL or BDAT chunk (RFC 2920 3.1, RFC 3030 2), up
     * to max_recipients + 1 of them. */
    bool out_of_txn = (v == SMTP_VERB_RCPT || v == SMTP_VERB_DATA || v == SMTP_VERB_BDAT) &&
                      refused && !in_txn;
    bool pipelined_rest = out_of_txn && s->pipelined_rest > 0;
    if (pipelined_rest)
        s->pipelined_rest--;
    else if (v == SMTP_VERB_MAIL || (v == SMTP_VERB_BDAT && in_txn))
        /* a chunk's refusal comes after its octets: any may be refused */
        s->pipelined_rest = v == SMTP_VERB_MAIL && !refused ? 0 : s->sw->cfg->max_recipients + 1;
    if (v == SMTP_VERB_MAIL && !refused)
        s->junk = 0;
    else if (v == SMTP_VERB_NOOP || v == SMTP_VERB_VRFY || v == SMTP_VERB_EXPN ||
             v == SMTP_VERB_HELP || (v == SMTP_VERB_RSET && !in_txn) ||
             ((v == SMTP_VERB_EHLO || v == SMTP_VERB_HELO) && greeted) ||
             (v == SMTP_VERB_MAIL && refused && s->out[at] == '5') ||
             ((v == SMTP_VERB_AUTH || v == SMTP_VERB_STARTTLS) && refused && s->out[at] == '5') ||
             (out_of_txn && !pipelined_rest))
        s->junk++;
}

static void
handle_verb(struct session *s, struct smtp_cmd *cp, size_t rest)
{
    struct smtp_cmd c = *cp;
    switch (c.verb) {
    case SMTP_VERB_EHLO:
        cmd_ehlo(s, &c, true);
        break;
    case SMTP_VERB_HELO:
        cmd_ehlo(s, &c, false);
        break;
    case SMTP_VERB_MAIL:
        cmd_mail(s, &c);
        break;
    case SMTP_VERB_RCPT:
        cmd_rcpt(s, &c);
        break;
    case SMTP_VERB_DATA:
        cmd_data(s, rest);
        break;
    case SMTP_VERB_BDAT:
        cmd_bdat(s, &c);
        break;
    case SMTP_VERB_RSET:
        txn_reset(s);
        reply(s, "250 2.0.0 Ok");
        break;
    case SMTP_VERB_NOOP:
        reply(s, "250 2.0.0 Ok");
        break;
    case SMTP_VERB_QUIT:
        reply_close(s, "221 2.0.0 Bye");
        break;
    case SMTP_VERB_VRFY:
        reply(s, "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery");
        break;
    case SMTP_VERB_EXPN:
        reply(s, "502 5.5.1 EXPN is not offered here");
        break;
    case SMTP_VERB_HELP:
        /* what this session may say now, as EHLO shows it */
        reply(s,
              "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP%s%s; "
              "see RFC 5321",
              s->sw->tls != NULL && !stream_tls(&s->st) ? " STARTTLS" : "",
              s->users != NULL && auth_allowed_here(s) ? " AUTH" : "");
        break;
    case SMTP_VERB_STARTTLS:
        /* After HELO too, as Postfix: refusing would only keep the client
         * in plaintext, and after the handshake it greets again (RFC 3207
         * 4.2), where EHLO shows it the extensions. */
        if (s->sw->tls == NULL) {
            reply(s, "502 5.5.1 STARTTLS is not offered here");
        } else if (stream_tls(&s->st)) {
            reply(s, "503 5.5.1 TLS is already active");
        } else if (s->in_txn) {
            reply(s, "503 5.5.1 STARTTLS not allowed during a mail transaction");
        } else {
            reply(s, "220 2.0.0 Ready to start TLS");
            session_enter(s, SS_TLS_START);
        }
        break;
    case SMTP_VERB_AUTH:
        cmd_auth(s, &c);
        break;
    case SMTP_VERB_NONE:
    default:
        s->errors++;
        reply(s, "500 5.5.2 Command unrecognized");
        break;
    }
}
