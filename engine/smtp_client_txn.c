/*
 * smtp_client_txn: a transaction of the outbound SMTP session (see
 * smtp_client.c for the session's shape, smtp_client.h for the API and
 * the rules). smtp_client_txn() checks the message against what the
 * server offers and starts it; MAIL, the RCPTs and DATA are written as
 * the FIFO and the output have room (pipelined when the server offers
 * it), each address in the form the server takes (its domain's A-labels
 * to a server without SMTPUTF8); the replies to them and to the final dot
 * decide the message's and each recipient's outcome; smtp_client_body()
 * stuffs the body into the output and writes the final dot; and when the
 * transaction ends nothing is left undecided (smtp_client_txn_finish).
 * smtp_client_int.h declares what this file and smtp_client.c call
 * across.
 *
 * Threading: pure functions over the caller's struct; no globals besides
 * constant tables, no allocation, no I/O, no clock.
 */
#include <string.h>

#include "engine/smtp_client.h"
#include "engine/smtp_client_int.h"

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

/* ---- transactions ---- */

/* Every recipient still undecided (or only accepted) takes o. Only an
 * accepted recipient may take a delivery; a session failure (force_temp)
 * is temporary whatever o says. */
void
smtp_client_txn_settle(struct smtp_client *c, const struct smtp_outcome *o, bool force_temp)
{
    struct smtp_client_txn *t = c->txn;

    for (unsigned i = 0; i < t->nrcpt; i++) {
        struct smtp_outcome *ro = &t->rcpt[i].out;
        bool accepted = ro->status == SMTP_STATUS_ACCEPTED;

        if (!smtp_outcome_undecided(ro))
            continue;
        *ro = *o;
        if (force_temp || smtp_outcome_undecided(ro) ||
            (ro->status == SMTP_STATUS_DELIVERED && !accepted))
            ro->status = SMTP_STATUS_TEMPFAIL;
    }
}

/* The transaction is over: nothing left undecided, counts, EV_TXN_DONE. */
void
smtp_client_txn_finish(struct smtp_client *c)
{
    struct smtp_client_txn *t = c->txn;
    bool all_perm = true;

    for (unsigned i = 0; i < t->nrcpt; i++)
        all_perm = all_perm && t->rcpt[i].out.status == SMTP_STATUS_PERMFAIL;
    if (t->msg.status == SMTP_STATUS_PENDING)
        smtp_outcome_local(&t->msg, all_perm ? SMTP_STATUS_PERMFAIL : SMTP_STATUS_TEMPFAIL,
                           SMTP_SCOPE_MESSAGE, SMTP_REASON_NO_RCPT, SMTP_CLIENT_S_RCPT, 0,
                           all_perm ? 5 : 4, 0, 0, "no recipient was accepted");
    /* Nothing should be left undecided here; if something is, it is not
     * delivered. */
    smtp_client_txn_settle(c, &t->msg, t->msg.status != SMTP_STATUS_PERMFAIL);
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
void
smtp_client_txn_write(struct smtp_client *c)
{
    struct smtp_client_txn *t = c->txn;
    struct smtp_client_run *x = &c->run;

    while (x->writing && c->pipe_len < smtp_client_pipe_cap(c)) {
        char *o = c->buf->out + c->buf->out_len;
        size_t room = SMTP_CLIENT_OUT_CAP - c->buf->out_len;
        int n;

        if (x->want_rset) {
            if (!smtp_client_out_put(c, "RSET\r\n", 6))
                return;
            smtp_client_pipe_push(c, SMTP_CLIENT_S_RSET, 0);
            x->want_rset = false;
        } else if (!x->mail_written) {
            /* Checked in smtp_client_txn(): only NOSPACE can fail here. */
            char path[SMTP_PATH_MAX + 1];
            struct smtp_span from = addr_sent(x, t->from, t->from_domain_ascii, path, sizeof(path));
            n = smtp_fmt_mail(o, room, from.ptr, from.len, &x->mail_params);
            if (n < 0)
                return;
            c->buf->out_len += (size_t)n;
            smtp_client_pipe_push(c, SMTP_CLIENT_S_MAIL, 0);
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
                smtp_outcome_local(&r->out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT,
                                   SMTP_REASON_ADDRESS, SMTP_CLIENT_S_RCPT, 553, 5, 1, 3,
                                   "recipient address or RCPT parameter cannot be sent: %s",
                                   smtp_cmd_err_str(n));
                x->next_rcpt++;
                continue;
            }
            c->buf->out_len += (size_t)n;
            smtp_client_pipe_push(c, SMTP_CLIENT_S_RCPT, x->next_rcpt);
            x->next_rcpt++;
            x->rcpt_wait++;
        } else if (!x->data_written && (x->accepted > 0 || x->rcpt_wait > 0)) {
            if (!smtp_client_out_put(c, "DATA\r\n", 6))
                return;
            smtp_client_pipe_push(c, SMTP_CLIENT_S_DATA, 0);
            x->data_written = true;
            x->writing = false;
        } else {
            x->writing = false;
        }
    }
}

/* After a reply in a transaction: write more, then wait for the next
 * reply, or end the transaction when nothing is left. */
void
smtp_client_txn_advance(struct smtp_client *c)
{
    smtp_client_txn_write(c);
    if (c->pipe_len > 0) {
        smtp_client_enter(c, smtp_client_pipe_head_state(c));
    } else if (c->run.writing) {
        smtp_client_enter(c, txn_next(c)); /* written as soon as the output has room */
    } else {
        smtp_client_txn_finish(c);
        smtp_client_enter(c, SMTP_CLIENT_S_IDLE);
        c->ev |= SMTP_CLIENT_EV_READY;
    }
}

/* The message cannot go to this server: nothing is sent. */
static void
txn_refuse(struct smtp_client *c, enum smtp_reason reason, unsigned code, unsigned subject,
           unsigned detail, const char *text, const char *why)
{
    smtp_outcome_local(&c->txn->msg, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, reason,
                       SMTP_CLIENT_S_MAIL, code, 5, subject, detail, "%s%s%s", text,
                       why ? ": " : "", why ? why : "");
    smtp_client_txn_settle(c, &c->txn->msg, false);
    smtp_client_txn_finish(c);
    c->ev |= SMTP_CLIENT_EV_READY;
}

/* ---- transaction replies ---- */

void
smtp_client_on_rset(struct smtp_client *c, const struct smtp_reply *r)
{
    if (r->code / 100 == 2) {
        c->need_rset = false;
        smtp_client_txn_advance(c);
    } else if (r->code >= 400) {
        /* A server that cannot reset is not one to go on with: what was
         * pipelined after the RSET would land in an unknown state. */
        struct smtp_outcome o;

        smtp_outcome_reply(&o, r, SMTP_SCOPE_SESSION, c->state);
        smtp_client_close(c, &o, false);
    } else {
        smtp_client_protocol_reply(c, "RSET reply not 2xx", r);
    }
}

void
smtp_client_on_mail(struct smtp_client *c, const struct smtp_reply *r)
{
    struct smtp_client_txn *t = c->txn;

    if (r->code / 100 == 2) {
        c->need_rset = true;
    } else if (r->code >= 400) {
        c->run.mail_refused = true;
        smtp_outcome_reply(&t->msg, r, SMTP_SCOPE_MESSAGE, SMTP_CLIENT_S_MAIL);
        smtp_client_txn_settle(c, &t->msg, false);
    } else {
        smtp_client_protocol_reply(c, "MAIL reply not 2xx, 4xx or 5xx", r);
        return;
    }
    smtp_client_txn_advance(c);
}

void
smtp_client_on_rcpt(struct smtp_client *c, const struct smtp_reply *r, uint32_t i)
{
    struct smtp_outcome *o = &c->txn->rcpt[i].out;

    if (r->code / 100 == 3) {
        smtp_client_protocol_reply(c, "RCPT reply not 2xx, 4xx or 5xx", r);
        return;
    }
    c->run.rcpt_wait--;
    /* After a refused MAIL the recipients have its outcome already. */
    if (!c->run.mail_refused && o->status == SMTP_STATUS_PENDING) {
        smtp_outcome_reply(o, r, SMTP_SCOPE_RCPT, SMTP_CLIENT_S_RCPT);
        if (r->code / 100 == 2) {
            o->status = SMTP_STATUS_ACCEPTED;
            c->run.accepted++;
        }
    }
    smtp_client_txn_advance(c);
}

/* Write the terminator (now or, when the output is full, from
 * smtp_client_sent()); then wait for the reply to it. */
void
smtp_client_body_finish(struct smtp_client *c)
{
    size_t room = SMTP_CLIENT_OUT_CAP - c->buf->out_len, n = 0;

    c->run.finishing = true;
    if (room == 0)
        return;
    if (smtp_stuff_finish(&c->stuff, c->buf->out + c->buf->out_len, room, &n) == SMTP_DATA_END) {
        c->buf->out_len += n;
        c->run.finishing = false;
        smtp_client_pipe_push(c, SMTP_CLIENT_S_DOT, 0);
        smtp_client_enter(c, SMTP_CLIENT_S_DOT);
        if (!c->run.dot_only)
            c->ev |= SMTP_CLIENT_EV_BODY_END;
        return;
    }
    c->buf->out_len += n;
}

void
smtp_client_on_data(struct smtp_client *c, const struct smtp_reply *r)
{
    struct smtp_client_txn *t = c->txn;

    if (r->code == 354) {
        smtp_stuff_init(&c->stuff);
        smtp_client_enter(c, SMTP_CLIENT_S_BODY);
        if (c->run.accepted > 0) {
            c->ev |= SMTP_CLIENT_EV_SEND_BODY;
        } else {
            /* Nobody to deliver to, yet the server wants the message:
             * an empty one ends the transaction (RFC 2920 3.1). */
            c->run.dot_only = true;
            smtp_client_body_finish(c);
        }
    } else if (r->code >= 400) {
        /* With no recipient accepted this refusal is the expected one. */
        if (c->run.accepted > 0) {
            smtp_outcome_reply(&t->msg, r, SMTP_SCOPE_MESSAGE, SMTP_CLIENT_S_DATA);
            smtp_client_txn_settle(c, &t->msg, false);
        }
        smtp_client_txn_advance(c);
    } else {
        smtp_client_protocol_reply(c, "DATA reply not 354, 4xx or 5xx", r);
    }
}

void
smtp_client_on_dot(struct smtp_client *c, const struct smtp_reply *r)
{
    struct smtp_client_txn *t = c->txn;

    if (r->code / 100 == 3) {
        smtp_client_protocol_reply(c, "reply to the final dot not 2xx, 4xx or 5xx", r);
        return;
    }
    if (!c->run.dot_only) {
        smtp_outcome_reply(&t->msg, r, SMTP_SCOPE_MESSAGE, SMTP_CLIENT_S_DOT);
        smtp_client_txn_settle(c, &t->msg, false);
    }
    c->need_rset = false;
    smtp_client_txn_advance(c);
}

/* ---- the API: a transaction and its body ---- */

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
    smtp_outcome_clear(&t->msg);
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
        smtp_outcome_clear(&r->out);
        bool needs = !ascii(r->addr) && !(down && ascii_form(r->addr, r->domain_ascii));
        env_utf8 = env_utf8 || needs;
        can_go += !needs;
    }
    bool eight = !(mp->seen & SMTP_PARAM_BODY) || mp->body != SMTP_BODY_7BIT; /* unknown: 8-bit */
    memset(x, 0, sizeof *x);
    c->txn = t;

    if (down && (from_utf8 || can_go == 0 || (declared && eight))) {
        /* the envelope only when it alone refuses every recipient: one
         * that could go is refused by the content, and its DSN says so */
        txn_refuse(c, SMTP_REASON_NEED_SMTPUTF8, 553, 6, 7,
                   from_utf8 || can_go == 0
                       ? "UTF-8 envelope and the server has no SMTPUTF8"
                       : "SMTPUTF8 message with 8-bit content and the server has no SMTPUTF8",
                   NULL);
        return smtp_client_events(c);
    }
    if (down && env_utf8) {
        for (unsigned i = 0; i < t->nrcpt; i++)
            if (!ascii(t->rcpt[i].addr) && !ascii_form(t->rcpt[i].addr, t->rcpt[i].domain_ascii))
                smtp_outcome_local(&t->rcpt[i].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT,
                                   SMTP_REASON_NEED_SMTPUTF8, SMTP_CLIENT_S_RCPT, 553, 5, 6, 7,
                                   "UTF-8 address and the server has no SMTPUTF8");
    }
    utf8 = !down && (env_utf8 || declared);
    if ((mp->seen & SMTP_PARAM_BODY) && mp->body == SMTP_BODY_8BITMIME &&
        !(c->caps.ext & SMTP_EXT_8BITMIME)) {
        txn_refuse(c, SMTP_REASON_NEED_8BITMIME, 554, 6, 3,
                   "8-bit message and the server has no 8BITMIME", NULL);
        return smtp_client_events(c);
    }
    if ((mp->seen & SMTP_PARAM_SIZE) && (c->caps.ext & SMTP_EXT_SIZE) && c->caps.size_max != 0 &&
        mp->size > c->caps.size_max) {
        txn_refuse(c, SMTP_REASON_SIZE, 552, 3, 4, "message larger than the server's SIZE", NULL);
        return smtp_client_events(c);
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
        return smtp_client_events(c);
    }
    /* RFC 9422: no more RCPTs than the server takes; the rest wait for
     * the next transaction. */
    if (c->caps.rcpt_max != 0) {
        for (unsigned i = c->caps.rcpt_max; i < t->nrcpt; i++)
            smtp_outcome_local(&t->rcpt[i].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_RCPT,
                               SMTP_REASON_RCPT_LIMIT, SMTP_CLIENT_S_RCPT, 452, 4, 5, 3,
                               "over the server's RCPTMAX of %u", (unsigned)c->caps.rcpt_max);
    }
    x->want_rset = c->need_rset;
    x->writing = true;
    smtp_client_txn_advance(c);
    return smtp_client_events(c);
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
        smtp_client_body_finish(c);
    return smtp_client_events(c);
}
