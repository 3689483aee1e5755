/*
 * smtp_client: the outbound SMTP session as a pure state machine (see
 * smtp_client.h for the API and the rules).
 *
 * Shape. Every command written goes into a FIFO (c->u.pipe) as the state
 * that waits for its reply, so while a reply is awaited the state is the
 * kind of the FIFO head, and one function, smtp_client_on_reply(), handles
 * a reply in that state. Pipelining is nothing but a FIFO allowed to hold
 * more than one command; the transaction's commands are produced lazily
 * by txn_write() whenever the FIFO and the output have room, so neither
 * bounds the number of recipients. client_enter() is the one place a
 * state changes (trace, counter, deadline restart); client_close() the one
 * place a session ends, which is also where everything undecided in a
 * transaction gets its temporary outcome.
 *
 * Threading: pure functions over the caller's struct; no globals besides
 * constant tables, no allocation, no I/O, no clock.
 */
#include "engine/smtp_client.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static void
outcome_clear(struct smtp_outcome *o)
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

static bool
undecided(const struct smtp_outcome *o)
{
    return o->status == SMTP_STATUS_PENDING || o->status == SMTP_STATUS_ACCEPTED;
}

/* The server's reply as an outcome: 2xx DELIVERED, 4xx TEMPFAIL, 5xx
 * PERMFAIL (callers adjust). The text keeps any enhanced codes as sent. */
static void
outcome_reply(struct smtp_outcome *o, const struct smtp_reply *r, enum smtp_scope scope,
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
static void
outcome_local(struct smtp_outcome *o, enum smtp_status status, enum smtp_scope scope,
              enum smtp_reason reason, enum smtp_client_state stage, unsigned code, unsigned cls,
              unsigned subject, unsigned detail, const char *fmt, ...)
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

/* ---- addresses ---- */

static bool
ascii(struct smtp_span s)
{
    for (size_t i = 0; i < s.len; i++) {
        if ((unsigned char)s.ptr[i] >= 0x80)
            return false;
    }
    return true;
}

/* Whether addr may go to a server without SMTPUTF8 as its local part,
 * '@' and dom (its domain's A-labels): addr is not ASCII only in its
 * domain (RFC 6530 7.1: a UTF-8 local part has no ASCII form). */
static bool
ascii_form(struct smtp_span addr, struct smtp_span dom)
{
    if (dom.len == 0 || !ascii(dom) || ascii(addr))
        return false;
    size_t at = addr.len;
    while (at > 0 && addr.ptr[at - 1] != '@')
        at--;
    return at > 0 && ascii((struct smtp_span){addr.ptr, at - 1});
}

/* addr as it goes on this transaction's MAIL or RCPT: its ASCII form
 * (ascii_form()) written into buf[0..cap) when the server has no
 * SMTPUTF8, else addr. One that does not fit goes as addr (and fails
 * as an address that cannot be sent). */
static struct smtp_span
addr_sent(const struct smtp_client_run *x, struct smtp_span addr, struct smtp_span dom, char *buf,
          size_t cap)
{
    if (!x->ascii_domains || !ascii_form(addr, dom))
        return addr;
    size_t at = addr.len;
    while (addr.ptr[at - 1] != '@')
        at--;
    if (at + dom.len > cap)
        return addr;
    memcpy(buf, addr.ptr, at);
    memcpy(buf + at, dom.ptr, dom.len);
    return (struct smtp_span){buf, at + dom.len};
}

/* ---- plumbing: transitions, FIFO, output ---- */

static void
client_enter(struct smtp_client *c, enum smtp_client_state next)
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

static unsigned
pipe_cap(const struct smtp_client *c)
{
    return c->pipelining ? SMTP_CLIENT_PIPE_MAX : 1;
}

static void
pipe_push(struct smtp_client *c, enum smtp_client_state s, uint32_t rcpt)
{
    struct smtp_client_cmd *e;

    if (c->pipe_len >= SMTP_CLIENT_PIPE_MAX)
        abort(); /* callers check pipe_cap() first */
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

static enum smtp_client_state
pipe_head_state(const struct smtp_client *c)
{
    return (enum smtp_client_state)c->u.pipe[c->pipe_head].state;
}

static bool
out_put(struct smtp_client *c, const char *s, size_t n)
{
    if (SMTP_CLIENT_OUT_CAP - c->buf->out_len < n)
        return false;
    memcpy(c->buf->out + c->buf->out_len, s, n);
    c->buf->out_len += n;
    return true;
}

/* The events of this call. EV_CLOSE overrides everything that asks the
 * caller to go on with the session. */
static int
client_events(struct smtp_client *c)
{
    uint32_t ev = c->ev;

    c->ev = 0;
    if (ev & SMTP_CLIENT_EV_CLOSE)
        ev &= SMTP_CLIENT_EV_TXN_DONE | SMTP_CLIENT_EV_CLOSE;
    return (int)ev;
}

/* ---- transactions ---- */

/* Every recipient still undecided (or only accepted) takes o. Only an
 * accepted recipient may take a delivery; a session failure (force_temp)
 * is temporary whatever o says. */
static void
txn_settle(struct smtp_client *c, const struct smtp_outcome *o, bool force_temp)
{
    struct smtp_client_txn *t = c->txn;

    for (unsigned i = 0; i < t->nrcpt; i++) {
        struct smtp_outcome *ro = &t->rcpt[i].out;
        bool accepted = ro->status == SMTP_STATUS_ACCEPTED;

        if (!undecided(ro))
            continue;
        *ro = *o;
        if (force_temp || undecided(ro) || (ro->status == SMTP_STATUS_DELIVERED && !accepted))
            ro->status = SMTP_STATUS_TEMPFAIL;
    }
}

/* The transaction is over: nothing left undecided, counts, EV_TXN_DONE. */
static void
txn_finish(struct smtp_client *c)
{
    struct smtp_client_txn *t = c->txn;
    bool all_perm = true;

    for (unsigned i = 0; i < t->nrcpt; i++)
        all_perm = all_perm && t->rcpt[i].out.status == SMTP_STATUS_PERMFAIL;
    if (t->msg.status == SMTP_STATUS_PENDING)
        outcome_local(&t->msg, all_perm ? SMTP_STATUS_PERMFAIL : SMTP_STATUS_TEMPFAIL,
                      SMTP_SCOPE_MESSAGE, SMTP_REASON_NO_RCPT, SMTP_CLIENT_S_RCPT, 0,
                      all_perm ? 5 : 4, 0, 0, "no recipient was accepted");
    /* Nothing should be left undecided here; if something is, it is not
     * delivered. */
    txn_settle(c, &t->msg, t->msg.status != SMTP_STATUS_PERMFAIL);
    t->delivered = t->tempfail = t->permfail = 0;
    for (unsigned i = 0; i < t->nrcpt; i++) {
        switch (t->rcpt[i].out.status) {
        case SMTP_STATUS_DELIVERED:
            t->delivered++;
            break;
        case SMTP_STATUS_PERMFAIL:
            t->permfail++;
            break;
        default:
            t->tempfail++;
            break;
        }
    }
    c->txn = NULL;
    c->ev |= SMTP_CLIENT_EV_TXN_DONE;
}

/* Which command the transaction writes next (the state awaiting it). */
static enum smtp_client_state
txn_next(const struct smtp_client *c)
{
    const struct smtp_client_run *x = &c->run;

    if (x->want_rset)
        return SMTP_CLIENT_S_RSET;
    if (!x->mail_written)
        return SMTP_CLIENT_S_MAIL;
    if (x->next_rcpt < c->txn->nrcpt)
        return SMTP_CLIENT_S_RCPT;
    return SMTP_CLIENT_S_DATA;
}

/* Write what the transaction may write now: as many commands as the FIFO
 * (one without PIPELINING) and the output take. DATA follows the RCPTs
 * unless none can be accepted any more. */
static void
txn_write(struct smtp_client *c)
{
    struct smtp_client_txn *t = c->txn;
    struct smtp_client_run *x = &c->run;

    while (x->writing && c->pipe_len < pipe_cap(c)) {
        char *o = c->buf->out + c->buf->out_len;
        size_t room = SMTP_CLIENT_OUT_CAP - c->buf->out_len;
        int n;

        if (x->want_rset) {
            if (!out_put(c, "RSET\r\n", 6))
                return;
            pipe_push(c, SMTP_CLIENT_S_RSET, 0);
            x->want_rset = false;
        } else if (!x->mail_written) {
            /* Checked in smtp_client_txn(): only NOSPACE can fail here. */
            char path[SMTP_PATH_MAX + 1];
            struct smtp_span from = addr_sent(x, t->from, t->from_domain_ascii, path, sizeof(path));
            n = smtp_fmt_mail(o, room, from.ptr, from.len, &x->mail_params);
            if (n < 0)
                return;
            c->buf->out_len += (size_t)n;
            pipe_push(c, SMTP_CLIENT_S_MAIL, 0);
            x->mail_written = true;
        } else if (x->mail_refused) {
            x->writing = false;
        } else if (x->next_rcpt < t->nrcpt) {
            struct smtp_client_rcpt *r = &t->rcpt[x->next_rcpt];
            struct smtp_params p = r->params;

            if (r->out.status != SMTP_STATUS_PENDING) {
                x->next_rcpt++; /* decided before it was sent (RCPTMAX) */
                continue;
            }
            if (!(c->caps.ext & SMTP_EXT_DSN))
                p.seen &= ~(uint32_t)(SMTP_PARAM_NOTIFY | SMTP_PARAM_ORCPT);
            char path[SMTP_PATH_MAX + 1];
            struct smtp_span a = addr_sent(x, r->addr, r->domain_ascii, path, sizeof(path));
            n = smtp_fmt_rcpt(o, room, a.ptr, a.len, &p, x->utf8);
            if (n == SMTP_CMD_E_NOSPACE && c->buf->out_len > 0)
                return;
            if (n < 0) {
                outcome_local(&r->out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_ADDRESS,
                              SMTP_CLIENT_S_RCPT, 553, 5, 1, 3,
                              "recipient address or RCPT parameter cannot be sent: %s",
                              smtp_cmd_err_str(n));
                x->next_rcpt++;
                continue;
            }
            c->buf->out_len += (size_t)n;
            pipe_push(c, SMTP_CLIENT_S_RCPT, x->next_rcpt);
            x->next_rcpt++;
            x->rcpt_wait++;
        } else if (!x->data_written && (x->accepted > 0 || x->rcpt_wait > 0)) {
            if (!out_put(c, "DATA\r\n", 6))
                return;
            pipe_push(c, SMTP_CLIENT_S_DATA, 0);
            x->data_written = true;
            x->writing = false;
        } else {
            x->writing = false;
        }
    }
}

/* After a reply in a transaction: write more, then wait for the next
 * reply, or end the transaction when nothing is left. */
static void
txn_advance(struct smtp_client *c)
{
    txn_write(c);
    if (c->pipe_len > 0) {
        client_enter(c, pipe_head_state(c));
    } else if (c->run.writing) {
        client_enter(c, txn_next(c)); /* written as soon as the output has room */
    } else {
        txn_finish(c);
        client_enter(c, SMTP_CLIENT_S_IDLE);
        c->ev |= SMTP_CLIENT_EV_READY;
    }
}

/* The message cannot go to this server: nothing is sent. */
static void
txn_refuse(struct smtp_client *c, enum smtp_reason reason, unsigned code, unsigned subject,
           unsigned detail, const char *text, const char *why)
{
    outcome_local(&c->txn->msg, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, reason,
                  SMTP_CLIENT_S_MAIL, code, 5, subject, detail, "%s%s%s", text, why ? ": " : "",
                  why ? why : "");
    txn_settle(c, &c->txn->msg, false);
    txn_finish(c);
    c->ev |= SMTP_CLIENT_EV_READY;
}

/* ---- ending a session ---- */

/*
 * The one way out. why says it (session scope); quit writes QUIT first
 * when the conversation is in step and the server deserves one. An open
 * transaction fails temporarily in whatever it had not decided.
 */
static void
client_close(struct smtp_client *c, const struct smtp_outcome *why, bool quit)
{
    if (c->state == SMTP_CLIENT_S_CLOSED)
        return;
    c->broken = true;
    if (quit)
        (void)out_put(c, "QUIT\r\n", 6); /* a courtesy: skipped if the output is full */
    if (c->txn != NULL) {
        struct smtp_client_txn *t = c->txn;

        if (t->msg.status == SMTP_STATUS_PENDING) {
            t->msg = *why;
            t->msg.status = SMTP_STATUS_TEMPFAIL;
        }
        txn_settle(c, why, true);
        txn_finish(c);
    }
    /* The FIFO is over for good: its memory takes the session's outcome
     * (why is never in it: callers pass their own). */
    c->pipe_len = 0;
    c->u.session = *why;
    client_enter(c, SMTP_CLIENT_S_CLOSED);
    c->ev |= SMTP_CLIENT_EV_CLOSE;
}

static void
client_protocol(struct smtp_client *c, const char *what)
{
    struct smtp_outcome o;

    outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_PROTOCOL, c->state, 0,
                  4, 5, 0, "protocol error in state %s: %s", smtp_client_state_str(c->state), what);
    client_close(c, &o, false);
}

/* A reply that has no place here ends the session as client_protocol();
 * the outcome quotes it (its code and first words), so that the log and
 * the DSN show what the server said, not only that it made no sense: a
 * desynchronised pipeline and a second greeting read alike otherwise.
 * Still our verdict (code 0, reason protocol): never classified or
 * shaped by the quoted words. */
static void
client_protocol_reply(struct smtp_client *c, const char *what, const struct smtp_reply *r)
{
    struct smtp_outcome o;
    char said[SMTP_CLIENT_QUOTE_MAX + 1];
    size_t n = r->text_len < SMTP_CLIENT_QUOTE_MAX ? r->text_len : SMTP_CLIENT_QUOTE_MAX;

    for (size_t i = 0; i < n; i++)
        said[i] = r->text[i] == '\n' ? ' ' : r->text[i];
    said[n] = '\0';
    outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_PROTOCOL, c->state, 0,
                  4, 5, 0, "protocol error in state %s: %s (server said: %03u%s%s%s)",
                  smtp_client_state_str(c->state), what, r->code, n ? " " : "", said,
                  r->text_len > n ? "..." : "");
    client_close(c, &o, false);
}

/* The session ends on the server's reply (greeting, EHLO, HELO, 421). */
static void
client_close_reply(struct smtp_client *c, const struct smtp_reply *r, bool quit)
{
    struct smtp_outcome o;

    outcome_reply(&o, r, SMTP_SCOPE_SESSION, c->state);
    client_close(c, &o, quit);
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
    pipe_push(c, s, 0);
    client_enter(c, s);
}

static void
client_tls_unavailable(struct smtp_client *c)
{
    struct smtp_outcome o;

    outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_UNAVAILABLE,
                  c->state, 0, 4, 7, 4, "%s%sTLS required by policy but STARTTLS not offered",
                  c->opts.tls_label ? c->opts.tls_label : "", c->opts.tls_label ? ": " : "");
    client_close(c, &o, true);
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
    client_enter(c, SMTP_CLIENT_S_IDLE);
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
        client_protocol_reply(c, "greeting not 220", r);
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
        client_protocol_reply(c, "EHLO reply not 250", r);
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
        client_protocol_reply(c, "HELO reply not 2xx", r);
    }
}

static void
on_starttls(struct smtp_client *c, const struct smtp_reply *r)
{
    if (r->code == 220) {
        client_enter(c, SMTP_CLIENT_S_TLS);
        c->ev |= SMTP_CLIENT_EV_STARTTLS;
    } else if (r->code >= 400) {
        if (c->opts.tls == SMTP_CLIENT_TLS_OPTIONAL) {
            /* Plaintext is what this policy accepts anyway. */
            client_enter(c, SMTP_CLIENT_S_IDLE);
            c->ev |= SMTP_CLIENT_EV_READY;
        } else {
            struct smtp_outcome o;

            outcome_reply(&o, r, SMTP_SCOPE_SESSION, c->state);
            o.reason = SMTP_REASON_TLS_REFUSED;
            o.status = SMTP_STATUS_TEMPFAIL;
            client_close(c, &o, true);
        }
    } else {
        client_protocol_reply(c, "STARTTLS reply not 220", r);
    }
}

/* ---- transaction replies ---- */

static void
on_rset(struct smtp_client *c, const struct smtp_reply *r)
{
    if (r->code / 100 == 2) {
        c->need_rset = false;
        txn_advance(c);
    } else if (r->code >= 400) {
        /* A server that cannot reset is not one to go on with: what was
         * pipelined after the RSET would land in an unknown state. */
        struct smtp_outcome o;

        outcome_reply(&o, r, SMTP_SCOPE_SESSION, c->state);
        client_close(c, &o, false);
    } else {
        client_protocol_reply(c, "RSET reply not 2xx", r);
    }
}

static void
on_mail(struct smtp_client *c, const struct smtp_reply *r)
{
    struct smtp_client_txn *t = c->txn;

    if (r->code / 100 == 2) {
        c->need_rset = true;
    } else if (r->code >= 400) {
        c->run.mail_refused = true;
        outcome_reply(&t->msg, r, SMTP_SCOPE_MESSAGE, SMTP_CLIENT_S_MAIL);
        txn_settle(c, &t->msg, false);
    } else {
        client_protocol_reply(c, "MAIL reply not 2xx, 4xx or 5xx", r);
        return;
    }
    txn_advance(c);
}

static void
on_rcpt(struct smtp_client *c, const struct smtp_reply *r, uint32_t i)
{
    struct smtp_outcome *o = &c->txn->rcpt[i].out;

    if (r->code / 100 == 3) {
        client_protocol_reply(c, "RCPT reply not 2xx, 4xx or 5xx", r);
        return;
    }
    c->run.rcpt_wait--;
    /* After a refused MAIL the recipients have its outcome already. */
    if (!c->run.mail_refused && o->status == SMTP_STATUS_PENDING) {
        outcome_reply(o, r, SMTP_SCOPE_RCPT, SMTP_CLIENT_S_RCPT);
        if (r->code / 100 == 2) {
            o->status = SMTP_STATUS_ACCEPTED;
            c->run.accepted++;
        }
    }
    txn_advance(c);
}

/* Write the terminator (now or, when the output is full, from
 * smtp_client_sent()); then wait for the reply to it. */
static void
body_finish(struct smtp_client *c)
{
    size_t room = SMTP_CLIENT_OUT_CAP - c->buf->out_len, n = 0;

    c->run.finishing = true;
    if (room == 0)
        return;
    if (smtp_stuff_finish(&c->stuff, c->buf->out + c->buf->out_len, room, &n) == SMTP_DATA_END) {
        c->buf->out_len += n;
        c->run.finishing = false;
        pipe_push(c, SMTP_CLIENT_S_DOT, 0);
        client_enter(c, SMTP_CLIENT_S_DOT);
        if (!c->run.dot_only)
            c->ev |= SMTP_CLIENT_EV_BODY_END;
        return;
    }
    c->buf->out_len += n;
}

static void
on_data(struct smtp_client *c, const struct smtp_reply *r)
{
    struct smtp_client_txn *t = c->txn;

    if (r->code == 354) {
        smtp_stuff_init(&c->stuff);
        client_enter(c, SMTP_CLIENT_S_BODY);
        if (c->run.accepted > 0) {
            c->ev |= SMTP_CLIENT_EV_SEND_BODY;
        } else {
            /* Nobody to deliver to, yet the server wants the message:
             * an empty one ends the transaction (RFC 2920 3.1). */
            c->run.dot_only = true;
            body_finish(c);
        }
    } else if (r->code >= 400) {
        /* With no recipient accepted this refusal is the expected one. */
        if (c->run.accepted > 0) {
            outcome_reply(&t->msg, r, SMTP_SCOPE_MESSAGE, SMTP_CLIENT_S_DATA);
            txn_settle(c, &t->msg, false);
        }
        txn_advance(c);
    } else {
        client_protocol_reply(c, "DATA reply not 354, 4xx or 5xx", r);
    }
}

static void
on_dot(struct smtp_client *c, const struct smtp_reply *r)
{
    struct smtp_client_txn *t = c->txn;

    if (r->code / 100 == 3) {
        client_protocol_reply(c, "reply to the final dot not 2xx, 4xx or 5xx", r);
        return;
    }
    if (!c->run.dot_only) {
        outcome_reply(&t->msg, r, SMTP_SCOPE_MESSAGE, SMTP_CLIENT_S_DOT);
        txn_settle(c, &t->msg, false);
    }
    c->need_rset = false;
    txn_advance(c);
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
        client_protocol_reply(c, "unsolicited reply", r);
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
        on_rset(c, r);
        break;
    case SMTP_CLIENT_S_MAIL:
        on_mail(c, r);
        break;
    case SMTP_CLIENT_S_RCPT:
        on_rcpt(c, r, cmd.rcpt);
        break;
    case SMTP_CLIENT_S_DATA:
        on_data(c, r);
        break;
    case SMTP_CLIENT_S_DOT:
        on_dot(c, r);
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
    pipe_push(c, SMTP_CLIENT_S_GREETING, 0);
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
        return client_events(c);
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
    return client_events(c);
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
            body_finish(c);
    } else if (c->txn != NULL && c->run.writing) {
        /* Appending leaves the FIFO head, and so the state, as it was;
         * with nothing outstanding the first command written (or the end
         * of the transaction) is a new state. */
        if (c->pipe_len > 0)
            txn_write(c);
        else
            txn_advance(c);
    }
    return client_events(c);
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
        outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_FAILED,
                      c->state, 0, 4, 7, 5, "%s%sTLS handshake failed%s%s",
                      c->opts.tls_label ? c->opts.tls_label : "", c->opts.tls_label ? ": " : "",
                      why != NULL && why[0] != '\0' ? ": " : "", why != NULL ? why : "");
        client_close(c, &o, false);
    } else if (res == SMTP_CLIENT_TLS_UNVERIFIED && c->opts.tls == SMTP_CLIENT_TLS_VERIFY) {
        outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_UNVERIFIED,
                      c->state, 0, 4, 7, 5, "%s%sserver certificate not verified",
                      c->opts.tls_label ? c->opts.tls_label : "", c->opts.tls_label ? ": " : "");
        client_close(c, &o, true);
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
    return client_events(c);
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
smtp_client_txn(struct smtp_client *c, struct smtp_client_txn *t)
{
    struct smtp_client_run *x = &c->run;
    const struct smtp_params *mp = &t->params;
    char line[SMTP_CMD_LINE_MAX_MAIL + 64];
    uint32_t keep = 0;
    bool utf8;
    int n;

    if (c->state != SMTP_CLIENT_S_IDLE || c->txn != NULL || c->buf == NULL)
        return SMTP_CLIENT_E_STATE;
    if (t->rcpt == NULL || t->nrcpt == 0 || t->nrcpt > c->opts.max_rcpt)
        return SMTP_CLIENT_E_ARG;
    if ((mp->seen & SMTP_PARAM_BODY) && mp->body == SMTP_BODY_BINARYMIME)
        return SMTP_CLIENT_E_ARG;
    c->ev = 0;
    outcome_clear(&t->msg);
    t->delivered = t->tempfail = t->permfail = 0;
    /* SMTPUTF8 is needed by a UTF-8 envelope, and by a message declared
     * SMTPUTF8 with 8-bit content (its header fields may be UTF-8, RFC
     * 6532). One declared so but all ASCII goes without it where the
     * server has none (RFC 6531 3.4 forbids only what would need it; it
     * bounced there), as Postfix sends it. So does an address whose
     * domain alone is UTF-8: with its A-labels (ascii_form(), RFC 6530
     * 7.1). A recipient whose local part is UTF-8 is refused alone when
     * others can go; the sender's, or every recipient's, refuses the
     * message. */
    bool declared = (mp->seen & SMTP_PARAM_SMTPUTF8) != 0;
    bool down = !(c->caps.ext & SMTP_EXT_SMTPUTF8);
    bool from_utf8 = !ascii(t->from) && !(down && ascii_form(t->from, t->from_domain_ascii));
    bool env_utf8 = from_utf8;
    unsigned can_go = 0;
    for (unsigned i = 0; i < t->nrcpt; i++) {
        struct smtp_client_rcpt *r = &t->rcpt[i];
        outcome_clear(&r->out);
        bool needs = !ascii(r->addr) && !(down && ascii_form(r->addr, r->domain_ascii));
        env_utf8 = env_utf8 || needs;
        can_go += !needs;
    }
    bool eight = !(mp->seen & SMTP_PARAM_BODY) || mp->body != SMTP_BODY_7BIT; /* unknown: 8-bit */
    memset(x, 0, sizeof *x);
    c->txn = t;

    if (down && (from_utf8 || can_go == 0 || (declared && eight))) {
        txn_refuse(c, SMTP_REASON_NEED_SMTPUTF8, 553, 6, 7,
                   env_utf8 ? "UTF-8 envelope and the server has no SMTPUTF8"
                            : "SMTPUTF8 message with 8-bit content and the server has no "
                              "SMTPUTF8",
                   NULL);
        return client_events(c);
    }
    if (down && env_utf8) {
        for (unsigned i = 0; i < t->nrcpt; i++)
            if (!ascii(t->rcpt[i].addr) && !ascii_form(t->rcpt[i].addr, t->rcpt[i].domain_ascii))
                outcome_local(&t->rcpt[i].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT,
                              SMTP_REASON_NEED_SMTPUTF8, SMTP_CLIENT_S_RCPT, 553, 5, 6, 7,
                              "UTF-8 address and the server has no SMTPUTF8");
    }
    utf8 = !down && (env_utf8 || declared);
    if ((mp->seen & SMTP_PARAM_BODY) && mp->body == SMTP_BODY_8BITMIME &&
        !(c->caps.ext & SMTP_EXT_8BITMIME)) {
        txn_refuse(c, SMTP_REASON_NEED_8BITMIME, 554, 6, 3,
                   "8-bit message and the server has no 8BITMIME", NULL);
        return client_events(c);
    }
    if ((mp->seen & SMTP_PARAM_SIZE) && (c->caps.ext & SMTP_EXT_SIZE) && c->caps.size_max != 0 &&
        mp->size > c->caps.size_max) {
        txn_refuse(c, SMTP_REASON_SIZE, 552, 3, 4, "message larger than the server's SIZE", NULL);
        return client_events(c);
    }

    /* Each parameter only with its extension; AUTH= never (we do not
     * authenticate to MX hosts). */
    if (c->caps.ext & SMTP_EXT_SIZE)
        keep |= SMTP_PARAM_SIZE;
    if (c->caps.ext & SMTP_EXT_8BITMIME)
        keep |= SMTP_PARAM_BODY;
    if (c->caps.ext & SMTP_EXT_DSN)
        keep |= SMTP_PARAM_RET | SMTP_PARAM_ENVID;
    x->mail_params = *mp;
    x->mail_params.seen = (mp->seen & keep) | (utf8 ? (uint32_t)SMTP_PARAM_SMTPUTF8 : 0u);
    x->utf8 = utf8;
    x->ascii_domains = down;
    char path[SMTP_PATH_MAX + 1];
    struct smtp_span from = addr_sent(x, t->from, t->from_domain_ascii, path, sizeof(path));
    n = smtp_fmt_mail(line, sizeof line, from.ptr, from.len, &x->mail_params);
    if (n < 0) {
        txn_refuse(c, SMTP_REASON_ADDRESS, 553, 1, 7,
                   "sender address or MAIL parameter cannot be sent", smtp_cmd_err_str(n));
        return client_events(c);
    }
    /* RFC 9422: no more RCPTs than the server takes; the rest wait for
     * the next transaction. */
    if (c->caps.rcpt_max != 0) {
        for (unsigned i = c->caps.rcpt_max; i < t->nrcpt; i++)
            outcome_local(&t->rcpt[i].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_RCPT,
                          SMTP_REASON_RCPT_LIMIT, SMTP_CLIENT_S_RCPT, 452, 4, 5, 3,
                          "over the server's RCPTMAX of %u", (unsigned)c->caps.rcpt_max);
    }
    x->want_rset = c->need_rset;
    x->writing = true;
    txn_advance(c);
    return client_events(c);
}

int
smtp_client_body(struct smtp_client *c, const char *in, size_t len, bool last, size_t *consumed)
{
    size_t room, produced = 0;

    *consumed = 0;
    if (c->buf == NULL || c->state != SMTP_CLIENT_S_BODY || c->run.dot_only ||
        (c->run.finishing && len > 0))
        return SMTP_CLIENT_E_STATE;
    room = SMTP_CLIENT_OUT_CAP - c->buf->out_len;
    c->ev = 0;
    if (len > 0 && room >= 2) {
        smtp_stuff(&c->stuff, in, len, c->buf->out + c->buf->out_len, room, consumed, &produced);
        c->buf->out_len += produced;
    }
    if (last && *consumed == len)
        body_finish(c);
    return client_events(c);
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
        outcome_local(&o, SMTP_STATUS_PENDING, SMTP_SCOPE_SESSION, SMTP_REASON_QUIT, c->state, 0, 0,
                      0, 0, "session closed by us");
        client_close(c, &o, true);
    } else {
        outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_QUIT, c->state, 0,
                      4, 0, 0, "session aborted by us in state %s",
                      smtp_client_state_str(c->state));
        client_close(c, &o, false);
    }
    return client_events(c);
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
    outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TIMEOUT, c->state, 0, 4,
                  4, 2, "conversation timed out in state %s", smtp_client_state_str(c->state));
    client_close(c, &o, false);
    return client_events(c);
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
    outcome_local(&o, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, reason, c->state, 0, 4, 4, 2,
                  "%s in state %s%s%s", what, smtp_client_state_str(c->state),
                  why != NULL && why[0] != '\0' ? ": " : "", why != NULL ? why : "");
    client_close(c, &o, false);
    return client_events(c);
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
