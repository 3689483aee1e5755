/*
 * smtp_client: the outbound SMTP session as a pure state machine (see
 * smtp_client.h for the API and the rules).
 *
 * Shape. Every command written goes into a FIFO (c->u.pipe) as the state
 * that waits for its reply, so while a reply is awaited the state is the
 * kind of the FIFO head, and one function, smtp_client_on_reply(), handles
 * a reply in that state. Pipelining is nothing but a FIFO allowed to hold
 * more than one command; the transaction's commands are produced lazily
 * by smtp_client_txn_write() whenever the FIFO and the output have room,
 * so neither bounds the number of recipients. smtp_client_enter() is the
 * one place a state changes (trace, counter, deadline restart);
 * smtp_client_close() the one place a session ends, which is also where
 * everything undecided in a transaction gets its temporary outcome.
 *
 * This file is the session: outcomes, the plumbing (transitions, the
 * FIFO, the output), the end of a session, the greeting, EHLO/HELO and
 * STARTTLS, the reply in the current state, and the API but for a
 * transaction. A transaction (its commands, their replies, the body:
 * smtp_client_txn() and smtp_client_body()) is smtp_client_txn.c's;
 * smtp_client_int.h declares what the two call across.
 *
 * Threading: pure functions over the caller's struct; no globals besides
 * constant tables, no allocation, no I/O, no clock.
 */
#include "engine/smtp_client.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/smtp_client_int.h"

#define MIN5  (5u * 60u * 1000u)
#define MIN2  (2u * 60u * 1000u)
#define MIN3  (3u * 60u * 1000u)
#define MIN10 (10u * 60u * 1000u)

/* Octets of a senseless reply quoted in the protocol error it causes. */
#define SMTP_CLIENT_QUOTE_MAX 120

const uint32_t smtp_client_default_timeout_ms[SMTP_CLIENT_S_COUNT] = {
    [SMTP_CLIENT_S_GREETING] = MIN5, [SMTP_CLIENT_S_EHLO] = MIN5, [SMTP_CLIENT_S_HELO] = MIN5,
    [SMTP_CLIENT_S_STARTTLS] = MIN5, [SMTP_CLIENT_S_TLS] = MIN5,  [SMTP_CLIENT_S_IDLE] = 0,
    [SMTP_CLIENT_S_RSET] = MIN5,     [SMTP_CLIENT_S_MAIL] = MIN5, [SMTP_CLIENT_S_RCPT] = MIN5,
    [SMTP_CLIENT_S_DATA] = MIN2,     [SMTP_CLIENT_S_BODY] = MIN3, [SMTP_CLIENT_S_DOT] = MIN10,
    [SMTP_CLIENT_S_CLOSED] = 0,
};

static const char *const state_names[SMTP_CLIENT_S_COUNT] = {
    [SMTP_CLIENT_S_GREETING] = "greeting", [SMTP_CLIENT_S_EHLO] = "ehlo",
    [SMTP_CLIENT_S_HELO] = "helo",         [SMTP_CLIENT_S_STARTTLS] = "starttls",
    [SMTP_CLIENT_S_TLS] = "tls",           [SMTP_CLIENT_S_IDLE] = "idle",
    [SMTP_CLIENT_S_RSET] = "rset",         [SMTP_CLIENT_S_MAIL] = "mail",
    [SMTP_CLIENT_S_RCPT] = "rcpt",         [SMTP_CLIENT_S_DATA] = "data",
    [SMTP_CLIENT_S_BODY] = "body",         [SMTP_CLIENT_S_DOT] = "dot",
    [SMTP_CLIENT_S_CLOSED] = "closed",
};

const char *
smtp_client_state_str(enum smtp_client_state s)
{
    return (unsigned)s < SMTP_CLIENT_S_COUNT ? state_names[s] : "?";
}

/* ---- outcomes ---- */

void
smtp_outcome_clear(struct smtp_outcome *o)
{
    o->code = 0;
    o->enh.cls = 0;
    o->enh.subject = 0;
    o->enh.detail = 0;
    o->status = SMTP_STATUS_PENDING;
    o->scope = SMTP_SCOPE_NONE;
    o->reason = SMTP_REASON_NONE;
    o->stage = 0;
    o->text[0] = '\0';
}

bool
smtp_outcome_undecided(const struct smtp_outcome *o)
{
    return o->status == SMTP_STATUS_PENDING || o->status == SMTP_STATUS_ACCEPTED;
}

/* The server's reply as an outcome: 2xx DELIVERED, 4xx TEMPFAIL, 5xx
 * PERMFAIL (callers adjust). The text keeps any enhanced codes as sent. */
void
smtp_outcome_reply(struct smtp_outcome *o, const struct smtp_reply *r, enum smtp_scope scope,
                   enum smtp_client_state stage)
{
    unsigned cls = r->code / 100u;
    size_t n = r->text_len < sizeof o->text - 1 ? r->text_len : sizeof o->text - 1;

    o->code = r->code;
    if (r->enh.cls != 0) {
        o->enh = r->enh;
    } else {
        o->enh.cls = (uint8_t)cls;
        o->enh.subject = 0;
        o->enh.detail = 0;
    }
    o->status = cls == 2   ? SMTP_STATUS_DELIVERED
                : cls == 4 ? SMTP_STATUS_TEMPFAIL
                : cls == 5 ? SMTP_STATUS_PERMFAIL
                           : SMTP_STATUS_PENDING;
    o->scope = (uint8_t)scope;
    o->reason = SMTP_REASON_REPLY;
    o->stage = (uint8_t)stage;
    for (size_t i = 0; i < n; i++)
        o->text[i] = r->text[i] == '\n' ? ' ' : r->text[i];
    o->text[n] = '\0';
}

/* An outcome of ours; text is a printf format. */
void
smtp_outcome_local(struct smtp_outcome *o, enum smtp_status status, enum smtp_scope scope,
                   enum smtp_reason reason, enum smtp_client_state stage, unsigned code,
                   unsigned cls, unsigned subject, unsigned detail, const char *fmt, ...)
{
    va_list ap;

    o->code = (uint16_t)code;
    o->enh.cls = (uint8_t)cls;
    o->enh.subject = (uint16_t)subject;
    o->enh.detail = (uint16_t)detail;
    o->status = (uint8_t)status;
    o->scope = (uint8_t)scope;
    o->reason = (uint8_t)reason;
    o->stage = (uint8_t)stage;
    va_start(ap, fmt);
    vsnprintf(o->text, sizeof o->text, fmt, ap);
    va_end(ap);
}

/* ---- plumbing: transitions, FIFO, output ---- */

void
smtp_client_enter(struct smtp_client *c, enum smtp_client_state next)
{
    enum smtp_client_state old = c->state;

    /* Entering the same state again (the next RCPT reply) still restarts
     * the deadline; only a change is traced. */
    c->ev |= SMTP_CLIENT_EV_TIMER;
    if (old == next)
        return;
    c->state = next;
    c->transitions++;
    if (c->opts.trace != NULL)
        c->opts.trace(c->opts.trace_arg, old, next);
}

unsigned
smtp_client_pipe_cap(const struct smtp_client *c)
{
    return c->pipelining ? SMTP_CLIENT_PIPE_MAX : 1;
}

void
smtp_client_pipe_push(struct smtp_client *c, enum smtp_client_state s, uint32_t rcpt)
{
    struct smtp_client_cmd *e;

    if (c->pipe_len >= SMTP_CLIENT_PIPE_MAX)
        abort(); /* callers check smtp_client_pipe_cap() first */
    e = &c->u.pipe[(c->pipe_head + c->pipe_len) % SMTP_CLIENT_PIPE_MAX];
    e->state = (uint8_t)s;
    e->rcpt = (uint16_t)rcpt; /* < max_rcpt <= SMTP_CLIENT_RCPT_MAX */
    c->pipe_len++;
}

static struct smtp_client_cmd
pipe_pop(struct smtp_client *c)
{
    struct smtp_client_cmd e = c->u.pipe[c->pipe_head];

    c->pipe_head = (uint16_t)((c->pipe_head + 1u) % SMTP_CLIENT_PIPE_MAX);
    c->pipe_len--;
    return e;
}

enum smtp_client_state
smtp_client_pipe_head_state(const struct smtp_client *c)
{
    return (enum smtp_client_state)c->u.pipe[c->pipe_head].state;
}

bool
smtp_client_out_put(struct smtp_client *c, const char *s, size_t n)
{
    if (SMTP_CLIENT_OUT_CAP - c->buf->out_len < n)
        return false;
    memcpy(c->buf->out + c->buf->out_len, s, n);
    c->buf->out_len += n;
    return true;
}

/* The events of this call. EV_CLOSE overrides everything that asks the
 * caller to go on with the session. */
int
smtp_client_events(struct smtp_client *c)
{
    uint32_t ev = c->ev;

    c->ev = 0;
    if (ev & SMTP_CLIENT_EV_CLOSE)
        ev &= SMTP_CLIENT_EV_TXN_DONE | SMTP_CLIENT_EV_CLOSE;
    return (int)ev;
}

/* ---- ending a session ---- */

/*
 * The one way out. why says it (session scope); quit writes QUIT first
 * when the conversation is in step and the server deserves one. An open
 * transaction fails temporarily in whatever it had not decided.
 */
void
smtp_client_close(struct smtp_client *c, const struct smtp_outcome *why, bool quit)
{
    if (c->state == SMTP_CLIENT_S_CLOSED)
        return;
    c->broken = true;
    if (quit)
        (void)smtp_client_out_put(c, "QUIT\r\n", 6); /* a courtesy: skipped if the output is full */
    if (c->txn != NULL) {
        struct smtp_client_txn *t = c->txn;

        if (t->msg.status == SMTP_STATUS_PENDING) {
            t->msg = *why;
            t->msg.status = SMTP_STATUS_TEMPFAIL;
        }
        smtp_client_txn_settle(c, why, true);
        smtp_client_txn_finish(c);
    }
    /* The FIFO is over for good: its memory takes the session's outcome
     * (why is never in it: callers pass their own). */
    c->pipe_len = 0;
    c->u.session = *why;
    smtp_client_enter(c, SMTP_CLIENT_S_CLOSED);
    c->ev |= SMTP_CLIENT_EV_CLOSE;
}

static void
client_protocol(struct smtp_client *c, const char *what)
{
    struct smtp_outcome o;

    smtp_outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_PROTOCOL, c->state,
                       0, 4, 5, 0, "protocol error in state %s: %s",
                       smtp_client_state_str(c->state), what);
    smtp_client_close(c, &o, false);
}

/* A reply that has no place here ends the session as client_protocol();
 * the outcome quotes it (its code and first words), so that the log and
 * the DSN show what the server said, not only that it made no sense: a
 * desynchronised pipeline and a second greeting read alike otherwise.
 * Still our verdict (code 0, reason protocol): never classified or
 * shaped by the quoted words. */
void
smtp_client_protocol_reply(struct smtp_client *c, const char *what, const struct smtp_reply *r)
{
    struct smtp_outcome o;
    char said[SMTP_CLIENT_QUOTE_MAX + 1];
    size_t n = r->text_len < SMTP_CLIENT_QUOTE_MAX ? r->text_len : SMTP_CLIENT_QUOTE_MAX;

    for (size_t i = 0; i < n; i++)
        said[i] = r->text[i] == '\n' ? ' ' : r->text[i];
    said[n] = '\0';
    smtp_outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_PROTOCOL, c->state,
                       0, 4, 5, 0, "protocol error in state %s: %s (server said: %03u%s%s%s)",
                       smtp_client_state_str(c->state), what, r->code, n ? " " : "", said,
                       r->text_len > n ? "..." : "");
    smtp_client_close(c, &o, false);
}

/* The session ends on the server's reply (greeting, EHLO, HELO, 421). */
static void
client_close_reply(struct smtp_client *c, const struct smtp_reply *r, bool quit)
{
    struct smtp_outcome o;

    smtp_outcome_reply(&o, r, SMTP_SCOPE_SESSION, c->state);
    smtp_client_close(c, &o, quit);
}

/* ---- the greeting, EHLO/HELO, STARTTLS ---- */

static bool
tls_needed(const struct smtp_client *c)
{
    return c->opts.tls >= SMTP_CLIENT_TLS_REQUIRED && !c->tls;
}

/* EHLO/HELO with our name, or STARTTLS; then wait for its reply. */
static void
client_send(struct smtp_client *c, enum smtp_client_state s)
{
    const char *verb = s == SMTP_CLIENT_S_EHLO   ? "EHLO "
                       : s == SMTP_CLIENT_S_HELO ? "HELO "
                                                 : "STARTTLS";
    size_t vl = strlen(verb), nl = s == SMTP_CLIENT_S_STARTTLS ? 0 : strlen(c->opts.name);

    /* Only ever written with an almost empty output; full means broken. */
    if (SMTP_CLIENT_OUT_CAP - c->buf->out_len < vl + nl + 2) {
        client_protocol(c, "output buffer full");
        return;
    }
    memcpy(c->buf->out + c->buf->out_len, verb, vl);
    memcpy(c->buf->out + c->buf->out_len + vl, c->opts.name, nl);
    memcpy(c->buf->out + c->buf->out_len + vl + nl, "\r\n", 2);
    c->buf->out_len += vl + nl + 2;
    smtp_client_pipe_push(c, s, 0);
    smtp_client_enter(c, s);
}

static void
client_tls_unavailable(struct smtp_client *c)
{
    struct smtp_outcome o;

    smtp_outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_UNAVAILABLE,
                       c->state, 0, 4, 7, 4, "%s%sTLS required by policy but STARTTLS not offered",
                       c->opts.tls_label ? c->opts.tls_label : "", c->opts.tls_label ? ": " : "");
    smtp_client_close(c, &o, true);
}

/* EHLO or HELO accepted: STARTTLS if wanted, else ready. */
static void
client_hello_done(struct smtp_client *c)
{
    if (!c->tls && c->opts.tls != SMTP_CLIENT_TLS_OFF) {
        if (c->esmtp && (c->caps.ext & SMTP_EXT_STARTTLS)) {
            client_send(c, SMTP_CLIENT_S_STARTTLS);
            return;
        }
        if (tls_needed(c)) {
            client_tls_unavailable(c);
            return;
        }
    }
    smtp_client_enter(c, SMTP_CLIENT_S_IDLE);
    c->ev |= SMTP_CLIENT_EV_READY;
}

static void
on_greeting(struct smtp_client *c, const struct smtp_reply *r)
{
    if (r->code == 220)
        client_send(c, SMTP_CLIENT_S_EHLO);
    else if (r->code >= 400)
        client_close_reply(c, r, true);
    else
        smtp_client_protocol_reply(c, "greeting not 220", r);
}

static void
on_ehlo(struct smtp_client *c, const struct smtp_reply *r)
{
    if (r->code == 250) {
        (void)smtp_reply_ehlo(r, &c->caps);
        c->esmtp = true;
        c->pipelining = (c->caps.ext & SMTP_EXT_PIPELINING) && !c->opts.no_pipelining;
        client_hello_done(c);
    } else if (r->code >= 500) {
        if (tls_needed(c))
            client_tls_unavailable(c); /* HELO cannot STARTTLS */
        else
            client_send(c, SMTP_CLIENT_S_HELO);
    } else if (r->code >= 400) {
        client_close_reply(c, r, true);
    } else {
        smtp_client_protocol_reply(c, "EHLO reply not 250", r);
    }
}

static void
on_helo(struct smtp_client *c, const struct smtp_reply *r)
{
    if (r->code / 100 == 2) {
        memset(&c->caps, 0, sizeof c->caps);
        c->esmtp = false;
        c->pipelining = false;
        client_hello_done(c);
    } else if (r->code >= 400) {
        client_close_reply(c, r, true);
    } else {
        smtp_client_protocol_reply(c, "HELO reply not 2xx", r);
    }
}

static void
on_starttls(struct smtp_client *c, const struct smtp_reply *r)
{
    if (r->code == 220) {
        smtp_client_enter(c, SMTP_CLIENT_S_TLS);
        c->ev |= SMTP_CLIENT_EV_STARTTLS;
    } else if (r->code >= 400) {
        if (c->opts.tls == SMTP_CLIENT_TLS_OPTIONAL) {
            /* Plaintext is what this policy accepts anyway. */
            smtp_client_enter(c, SMTP_CLIENT_S_IDLE);
            c->ev |= SMTP_CLIENT_EV_READY;
        } else {
            struct smtp_outcome o;

            smtp_outcome_reply(&o, r, SMTP_SCOPE_SESSION, c->state);
            o.reason = SMTP_REASON_TLS_REFUSED;
            o.status = SMTP_STATUS_TEMPFAIL;
            smtp_client_close(c, &o, true);
        }
    } else {
        smtp_client_protocol_reply(c, "STARTTLS reply not 220", r);
    }
}

/* One complete reply, in the current state. */
static void
smtp_client_on_reply(struct smtp_client *c, const struct smtp_reply *r)
{
    struct smtp_client_cmd cmd;

    /* 421 may come at any time, asked for or not: the server is going. */
    if (r->code == 421) {
        client_close_reply(c, r, false);
        return;
    }
    if (c->pipe_len == 0) {
        smtp_client_protocol_reply(c, "unsolicited reply", r);
        return;
    }
    cmd = pipe_pop(c);
    if (cmd.state != c->state)
        abort(); /* the state is the FIFO head's by construction */
    switch (c->state) {
    case SMTP_CLIENT_S_GREETING:
        on_greeting(c, r);
        break;
    case SMTP_CLIENT_S_EHLO:
        on_ehlo(c, r);
        break;
    case SMTP_CLIENT_S_HELO:
        on_helo(c, r);
        break;
    case SMTP_CLIENT_S_STARTTLS:
        on_starttls(c, r);
        break;
    case SMTP_CLIENT_S_RSET:
        smtp_client_on_rset(c, r);
        break;
    case SMTP_CLIENT_S_MAIL:
        smtp_client_on_mail(c, r);
        break;
    case SMTP_CLIENT_S_RCPT:
        smtp_client_on_rcpt(c, r, cmd.rcpt);
        break;
    case SMTP_CLIENT_S_DATA:
        smtp_client_on_data(c, r);
        break;
    case SMTP_CLIENT_S_DOT:
        smtp_client_on_dot(c, r);
        break;
    default:
        abort(); /* no command is outstanding in the other states */
    }
}

/* ---- the API ---- */

int
smtp_client_init(struct smtp_client *c, const struct smtp_client_opts *o)
{
    size_t nl;

    if (o == NULL || o->name == NULL || (unsigned)o->tls > SMTP_CLIENT_TLS_VERIFY ||
        o->max_rcpt > SMTP_CLIENT_RCPT_MAX)
        return SMTP_CLIENT_E_ARG;
    nl = strlen(o->name);
    if (nl == 0 || nl > SMTP_CLIENT_NAME_MAX)
        return SMTP_CLIENT_E_ARG;
    for (size_t i = 0; i < nl; i++) {
        unsigned char ch = (unsigned char)o->name[i];

        if (ch <= ' ' || ch >= 0x7f)
            return SMTP_CLIENT_E_ARG;
    }
    memset(c, 0, sizeof *c);
    c->opts = *o; /* the name is borrowed, not copied: 256 octets less per session */
    if (c->opts.max_rcpt == 0)
        c->opts.max_rcpt = SMTP_CLIENT_RCPT_DEFAULT;
    c->tls = o->tls_active;
    c->state = SMTP_CLIENT_S_GREETING;
    smtp_client_pipe_push(c, SMTP_CLIENT_S_GREETING, 0);
    return 0;
}

int
smtp_client_attach(struct smtp_client *c, struct smtp_client_buf *b)
{
    if (c->buf != NULL || b == NULL)
        return SMTP_CLIENT_E_STATE;
    b->out_len = 0;
    smtp_reply_parser_init(&b->rp);
    c->buf = b;
    return 0;
}

struct smtp_client_buf *
smtp_client_detach(struct smtp_client *c)
{
    struct smtp_client_buf *b = c->buf;

    if (b == NULL)
        return NULL;
    /* Unsent output stays even on a closed session: QUIT may still be on
     * its way out, and the caller's send may point into it. */
    if (b->out_len > 0 ||
        (c->state != SMTP_CLIENT_S_CLOSED && !smtp_reply_parser_idle(&b->rp)))
        return NULL;
    c->buf = NULL;
    return b;
}

int
smtp_client_input(struct smtp_client *c, const char *buf, size_t len, size_t *used)
{
    size_t off = 0;

    if (c->buf == NULL)
        return SMTP_CLIENT_E_STATE;

    *used = 0;
    c->ev = 0;
    if (c->state == SMTP_CLIENT_S_CLOSED || len == 0)
        return 0;
    if (c->state == SMTP_CLIENT_S_TLS) {
        client_protocol(c, "plaintext during the TLS handshake");
        return smtp_client_events(c);
    }
    while (off < len) {
        size_t u = 0;
        int rc = smtp_reply_parse(&c->buf->rp, buf + off, len - off, &u);

        off += u;
        if (rc < 0) {
            client_protocol(c, smtp_reply_err_str(rc));
            break;
        }
        if (rc == SMTP_REPLY_MORE)
            break;
        smtp_client_on_reply(c, &c->buf->rp.reply);
        if (c->state == SMTP_CLIENT_S_CLOSED)
            break;
        if (c->state == SMTP_CLIENT_S_TLS) {
            /* A server may not pipeline past its 220: whatever follows
             * was injected before the handshake (CVE-2011-0411). */
            if (off < len)
                client_protocol(c, "data after the 220 to STARTTLS");
            break;
        }
    }
    *used = off;
    return smtp_client_events(c);
}

const char *
smtp_client_output(const struct smtp_client *c, size_t *len)
{
    if (c->buf == NULL) {
        *len = 0;
        return "";
    }
    *len = c->buf->out_len;
    return c->buf->out;
}

int
smtp_client_sent(struct smtp_client *c, size_t n)
{

    if (c->buf == NULL)
        return SMTP_CLIENT_E_STATE;
    if (n > c->buf->out_len)
        return SMTP_CLIENT_E_ARG;
    c->ev = 0;
    if (n > 0) {
        memmove(c->buf->out, c->buf->out + n, c->buf->out_len - n);
        c->buf->out_len -= n;
    }
    if (c->state == SMTP_CLIENT_S_BODY) {
        if (n > 0)
            c->ev |= SMTP_CLIENT_EV_TIMER; /* the data block deadline runs per send */
        if (c->run.finishing)
            smtp_client_body_finish(c);
    } else if (c->txn != NULL && c->run.writing) {
        /* Appending leaves the FIFO head, and so the state, as it was;
         * with nothing outstanding the first command written (or the end
         * of the transaction) is a new state. */
        if (c->pipe_len > 0)
            smtp_client_txn_write(c);
        else
            smtp_client_txn_advance(c);
    }
    return smtp_client_events(c);
}

static int
client_tls_done(struct smtp_client *c, enum smtp_client_tls_result res, const char *why)
{
    struct smtp_outcome o;

    if (c->buf == NULL)
        return SMTP_CLIENT_E_STATE;

    if (c->state != SMTP_CLIENT_S_TLS)
        return SMTP_CLIENT_E_STATE;
    if ((unsigned)res > SMTP_CLIENT_TLS_VERIFIED)
        return SMTP_CLIENT_E_ARG;
    c->ev = 0;
    if (res == SMTP_CLIENT_TLS_FAILED) {
        smtp_outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_FAILED,
                           c->state, 0, 4, 7, 5, "%s%sTLS handshake failed%s%s",
                           c->opts.tls_label ? c->opts.tls_label : "",
                           c->opts.tls_label ? ": " : "", why != NULL && why[0] != '\0' ? ": " : "",
                           why != NULL ? why : "");
        smtp_client_close(c, &o, false);
    } else if (res == SMTP_CLIENT_TLS_UNVERIFIED && c->opts.tls == SMTP_CLIENT_TLS_VERIFY) {
        smtp_outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_UNVERIFIED,
                           c->state, 0, 4, 7, 5, "%s%sserver certificate not verified",
                           c->opts.tls_label ? c->opts.tls_label : "",
                           c->opts.tls_label ? ": " : "");
        smtp_client_close(c, &o, true);
    } else {
        /* RFC 3207 4.2: forget all that was learnt before TLS. */
        c->tls = true;
        c->tls_verified = res == SMTP_CLIENT_TLS_VERIFIED;
        memset(&c->caps, 0, sizeof c->caps);
        c->esmtp = false;
        c->pipelining = false;
        smtp_reply_parser_init(&c->buf->rp);
        client_send(c, SMTP_CLIENT_S_EHLO);
    }
    return smtp_client_events(c);
}

int
smtp_client_tls_done(struct smtp_client *c, enum smtp_client_tls_result res)
{
    return client_tls_done(c, res, NULL);
}

int
smtp_client_tls_failed(struct smtp_client *c, const char *why)
{
    return client_tls_done(c, SMTP_CLIENT_TLS_FAILED, why);
}

int
smtp_client_quit(struct smtp_client *c)
{
    struct smtp_outcome o;

    if (c->buf == NULL)
        return SMTP_CLIENT_E_STATE;

    c->ev = 0;
    if (c->state == SMTP_CLIENT_S_CLOSED)
        return 0;
    if (c->state == SMTP_CLIENT_S_IDLE) {
        smtp_outcome_local(&o, SMTP_STATUS_PENDING, SMTP_SCOPE_SESSION, SMTP_REASON_QUIT, c->state,
                           0, 0, 0, 0, "session closed by us");
        smtp_client_close(c, &o, true);
    } else {
        smtp_outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_QUIT, c->state,
                           0, 4, 0, 0, "session aborted by us in state %s",
                           smtp_client_state_str(c->state));
        smtp_client_close(c, &o, false);
    }
    return smtp_client_events(c);
}

int
smtp_client_timeout(struct smtp_client *c)
{
    struct smtp_outcome o;

    if (c->buf == NULL)
        return SMTP_CLIENT_E_STATE;

    if (c->state == SMTP_CLIENT_S_IDLE)
        return smtp_client_quit(c);
    c->ev = 0;
    if (c->state == SMTP_CLIENT_S_CLOSED)
        return 0;
    smtp_outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TIMEOUT, c->state,
                       0, 4, 4, 2, "conversation timed out in state %s",
                       smtp_client_state_str(c->state));
    smtp_client_close(c, &o, false);
    return smtp_client_events(c);
}

/* The session broke under c (the peer went, or TLS failed after its
 * handshake): 4.4.2 with reason, "<what> in state S[: why]". */
static int
client_broken(struct smtp_client *c, enum smtp_reason reason, const char *what, const char *why)
{
    struct smtp_outcome o;

    if (c->buf == NULL)
        return SMTP_CLIENT_E_STATE;

    c->ev = 0;
    if (c->state == SMTP_CLIENT_S_CLOSED)
        return 0;
    smtp_outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, reason, c->state, 0, 4, 4, 2,
                       "%s in state %s%s%s", what, smtp_client_state_str(c->state),
                       why != NULL && why[0] != '\0' ? ": " : "", why != NULL ? why : "");
    smtp_client_close(c, &o, false);
    return smtp_client_events(c);
}

int
smtp_client_eof(struct smtp_client *c)
{
    return client_broken(c, SMTP_REASON_EOF, "lost connection", NULL);
}

int
smtp_client_tls_error(struct smtp_client *c, const char *why)
{
    /* 4.4.2 as for a lost connection: the session broke, not a check of
     * the certificate (those are the handshake's, 4.7.5). */
    return client_broken(c, SMTP_REASON_TLS, "TLS failed", why);
}

uint32_t
smtp_client_deadline_ms(const struct smtp_client *c)
{
    const uint32_t *t = c->opts.timeout_ms ? c->opts.timeout_ms : smtp_client_default_timeout_ms;

    return t[c->state];
}

enum smtp_client_state
smtp_client_state(const struct smtp_client *c)
{
    return c->state;
}

uint64_t
smtp_client_transitions(const struct smtp_client *c)
{
    return c->transitions;
}

const struct smtp_ehlo *
smtp_client_caps(const struct smtp_client *c)
{
    return &c->caps;
}

bool
smtp_client_tls(const struct smtp_client *c, bool *verified)
{
    if (verified != NULL)
        *verified = c->tls_verified;
    return c->tls;
}

bool
smtp_client_reusable(const struct smtp_client *c)
{
    return c->state == SMTP_CLIENT_S_IDLE && !c->broken;
}

const struct smtp_outcome *
smtp_client_session(const struct smtp_client *c)
{
    /* Until the session ends its FIFO holds the place of the outcome. */
    static const struct smtp_outcome running; /* reason NONE */

    return c->state == SMTP_CLIENT_S_CLOSED ? &c->u.session : &running;
}

const char *
smtp_status_str(enum smtp_status s)
{
    static const char *const names[] = {"pending", "accepted", "delivered", "tempfail", "permfail"};

    return (unsigned)s < sizeof names / sizeof names[0] ? names[s] : "?";
}

const char *
smtp_scope_str(enum smtp_scope s)
{
    static const char *const names[] = {"none", "rcpt", "message", "session"};

    return (unsigned)s < sizeof names / sizeof names[0] ? names[s] : "?";
}

const char *
smtp_reason_str(enum smtp_reason r)
{
    static const char *const names[] = {
        "none",           "reply",           "timeout",       "eof",
        "protocol",       "tls_unavailable", "tls_refused",   "tls_failed",
        "tls_unverified", "need_8bitmime",   "need_smtputf8", "size",
        "address",        "rcpt_limit",      "no_rcpt",       "quit",
        "connect_refused", "connect_timeout", "connect_failed", "tls",
    };
    _Static_assert(sizeof names / sizeof names[0] == SMTP_REASON_TLS + 1, "a name per reason");

    return (unsigned)r < sizeof names / sizeof names[0] ? names[r] : "?";
}

bool
smtp_reason_server_code(enum smtp_reason r)
{
    return r == SMTP_REASON_REPLY || r == SMTP_REASON_TLS_REFUSED;
}

const char *
smtp_client_strerror(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case SMTP_CLIENT_E_STATE:
        return "not allowed in this session state";
    case SMTP_CLIENT_E_ARG:
        return "bad argument";
    default:
        return "unknown error";
    }
}
