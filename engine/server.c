/*
 * server: the submission server of one worker (see server.h). This file
 * holds the sessions; their commands are in server_cmd.c (AUTH in
 * server_auth.c), the message they receive in server_msg.c, the
 * listeners, the worker's server and the stop's drain in server_worker.c
 * (server_int.h: what the five share).
 *
 * A session is one state machine (enum session_state, session_enter()
 * for every transition, session_run() to act on what has arrived). Input
 * is read into a fixed buffer; complete command lines are handled one by
 * one, their replies gathered in a fixed output buffer and sent in one
 * write when the input holds no further complete command (RFC 2920 reply
 * batching). The end of DATA hands the message to the spool and waits
 * (state COMMIT, no reading) until the commit holding it returned: only
 * then is 250 sent. A message body is held whole until then, within one
 * budget shared by every worker ([server] body_memory_limit, see "message
 * bodies" below). A commit that returns after the client left still hands
 * the message to delivery. A stop's drain waits for the sessions whose
 * message is being signed or stored and for last replies leaving
 * (server_worker_drain_seal): a message stored gets its 250 before the
 * loop ends; one whose content ends after the worker's drain is done is
 * refused 421, not stored. A last reply to a client that does not read
 * has what is left of the drain, at most. When drain_timeout runs out
 * first, the commits the spool still has are waited for after the loop
 * (server_worker_free, bounded): each lands logged queued, unanswered.
 *
 * A session can also run detached (server_session_feed(), for the fuzzer):
 * the same code, with the ring's reads and sends and the spool's commit
 * replaced by the caller's buffers and an immediate completion.
 *
 * When the message is to be DKIM-signed, its body hash is computed as the
 * content arrives, and the end of DATA first hands the header section to
 * the signing pool (state SIGN, no reading); the commit follows with the
 * DKIM-Signature fields in front. Detached sessions sign nothing.
 *
 * The socket is a stream (engine/stream.h) in room mode: plain reads
 * land in the input buffer directly; over TLS, session_run() has the
 * stream decrypt what it holds into the input buffer as the state machine
 * makes room, and only waits for the socket once nothing buffered is left
 * to read.
 *
 * AUTH hands the password to the hashing pool (auth_pool.h) and waits in
 * AUTH_HASH, reading nothing, until the answer comes back through the
 * worker's mailbox; another session with the same credentials waits for
 * that same hash.
 *
 * Lifetime (STYLE rule 7): a session counts its operations in flight
 * (recv, send, a pending spool commit, a password hash in the AUTH pool).
 * session_close() shuts the socket down so that a pending recv completes;
 * the last completion frees (the stream's reads and sends count in
 * stream_busy(), the others in inflight).
 *
 * What a session ends with is logged once: a client that closes or
 * resets the connection with a transaction open (its envelope given, its
 * content not ended), or a stop that finds one, logs event=connection_lost
 * note=transaction_dropped (a TLS close_notify there: event=tls_closed);
 * the disconnect line sums the commands per verb and names the first one
 * refused, with its reply. Every reply goes through reply(), which
 * closes the command read last (command_begin) with the first reply to
 * it that is not 3xx, wherever that is made: an AUTH's 535 after its
 * hash, a DATA's after the dot, a line refused before it was read; a
 * refusal that answers no command (a timeout between commands, a stop,
 * too many errors) is named on that line too.
 *
 * The bounce role: sessions accepted on [bounce] listen run the same
 * machine with other rules at MAIL, RCPT and the end of the data: no AUTH
 * and no trusted networks, any sender, recipients only at the bounce
 * domains (oob_rcpt_check: a VERP address whose token verifies, or one of
 * accept_local_parts; a forged token and everything else get 550 5.7.1,
 * never a relay), and an accepted message is parsed and logged there and
 * then (oob_message) instead of being signed and committed: nothing of
 * it is queued. The [server] limits (sizes, deadlines, connections per
 * address, errors) apply unchanged.
 *
 * Threading: everything here runs on the worker's thread.
 */
#include "engine/server_int.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/auth.h"
#include "engine/auth_limit.h"
#include "engine/auth_pool.h"
#include "engine/delivery.h"
#include "engine/dkim_pool.h"
#include "engine/dlog.h"
#include "engine/engine.h"
#include "engine/msa.h"
#include "engine/netaddr.h"
#include "engine/oob.h"
#include "engine/owner.h"
#include "engine/smtp_cmd.h"
#include "engine/smtp_data.h"
#include "engine/stream.h"
#include "engine/suppress.h"
#include "engine/worker.h"
#include "queue/queue.h"
#include "tls/tls.h"

static const char *const state_names[] = {
    "pregreet", "command", "auth",      "auth_hash", "auth_wait", "data", "bdat",
    "sign",     "commit",  "tls_start", "tls",       "closing",   "closed",
};

const char *
session_state_str(enum session_state s)
{
    return (unsigned)s < sizeof(state_names) / sizeof(state_names[0]) ? state_names[s] : "?";
}

static void session_close(struct session *s, const char *why);
static void session_on_peek(struct worker *w, struct op *op, int res, uint32_t flags);
static void session_on_timer(struct timer *t, void *ctx);

/* ---- state ---- */

/* States that hold a stop's drain open: a message whose content ended is
 * being signed or stored (its client waits for the 250 it is owed), or a
 * last reply is leaving (that 250, a 421 for the stop). Each ends on its
 * own in bounded time (the pools, the spool, the closing deadline);
 * drain_timeout bounds them all. A client still sending its message holds
 * nothing: the stop does not wait for it. */
bool
session_state_holds_drain(enum session_state st)
{
    return st == SS_SIGN || st == SS_COMMIT || st == SS_CLOSING;
}

void
session_deadline(struct session *s, uint64_t ms)
{
    worker_timer_arm(s->sw->w, &s->timer, s->sw->w->now + MS_TO_NS(ms));
}

/* A session whose last reply does not leave is closed this long before
 * a stop's drain ends: its worker then reports the drain done in time
 * (engine_drain polls every 20 ms), and the stop is not logged as timed
 * out for a client that merely stopped reading. */
#define DRAIN_CLOSE_EARLY_MS 100

/* A last reply has one command's time to leave, and during a stop's
 * drain no more than what is left of it: a client that stopped reading
 * must not hold its session, and the drain, for timeout_command
 * (minutes). */
void
session_closing_deadline(struct session *s)
{
    struct server_worker *sw = s->sw;
    uint64_t ms = sw->cfg->timeout_command;
    uint64_t until = atomic_load_explicit(&sw->drain_until, memory_order_relaxed);
    if (atomic_load_explicit(&sw->draining, memory_order_relaxed) && until != UINT64_MAX) {
        uint64_t now = sw->w->now + MS_TO_NS(DRAIN_CLOSE_EARLY_MS);
        uint64_t left = until > now ? (until - now) / 1000000 : 0;
        ms = left < ms ? left : ms;
    }
    session_deadline(s, ms);
}

void
session_enter(struct session *s, enum session_state next)
{
    if (s->state == next)
        return;
    if (log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, "session=%016llx state=%s->%s", (unsigned long long)s->id,
                session_state_str(s->state), session_state_str(next));
    enum session_state prev = s->state;
    s->state = next;
    /* A drain waiting for this session looks again, once the handler that
     * moved it has returned (it may be about to tell the client 421). */
    struct server_worker *sw = s->sw;
    if (session_state_holds_drain(prev) && !session_state_holds_drain(next) && !sw->detached &&
        !sw->recheck_posted && atomic_load_explicit(&sw->draining, memory_order_relaxed)) {
        sw->recheck_posted = true;
        sw->recheck_msg.fn = server_on_drain_recheck;
        worker_post(sw->w, &sw->recheck_msg);
    }
    if (next == SS_CLOSING) {
        stream_end(&s->st); /* over TLS, close_notify after the last reply */
        /* The last reply has a deadline, however the session got here:
         * some ways in (a failed AUTH's delay or hash) have no deadline
         * running, and a client that stopped reading would hold the
         * session, and its connection slots, for good. */
        session_closing_deadline(s);
    }
}

/* ---- output ---- */

void
command_begin(struct session *s, unsigned v)
{
    s->cmds[v]++;
    s->answering = true;
    s->answer_verb = v;
}

/* The reply r[0..n) was queued: if it answers the command read last, that
 * command is done, refused when the reply is 4xx or 5xx. A deadline that
 * runs out inside a command (waiting for a SASL response, in DATA)
 * refuses that command, as Postfix counts it. A refusal that answers no
 * command (554 to an early talker, 421 over a connection limit, for a
 * timeout between commands, a stop, too many errors or junk commands, or
 * after a failed AUTH's 535) is the session's: counted under no verb, it
 * is the disconnect line's first_refused, as "- 421 ...", when nothing was
 * refused before it, else its closed_by (each of them closes the
 * session): why the session ended is on that line either way. The
 * greeting and the second line of a multiline reply pass unseen. */
static void
reply_seen(struct session *s, const char *r, size_t n)
{
    if (n == 0 || r[0] == '3')
        return;
    if (!s->answering) {
        if ((r[0] != '4' && r[0] != '5') || (n > 3 && r[3] == '-'))
            return;
        if (s->first_refused[0] == '\0')
            snprintf(s->first_refused, sizeof(s->first_refused), "- %.*s", (int)n, r);
        else
            snprintf(s->closed_by, sizeof(s->closed_by), "%.*s", (int)n, r);
        return;
    }
    s->answering = false;
    if (r[0] != '4' && r[0] != '5')
        return;
    unsigned v = s->answer_verb;
    s->cmds_refused[v]++;
    if (s->first_refused[0] == '\0')
        snprintf(s->first_refused, sizeof(s->first_refused), "%s %.*s",
                 v == SMTP_VERB_NONE ? "unknown" : smtp_verb_str(v), (int)n, r);
}

void __attribute__((format(printf, 2, 3)))
reply(struct session *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    size_t room = OUT_CAP - s->out_len;
    int n = vsnprintf(s->out + s->out_len, room, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n + 2 >= room) {
        /* Cannot happen while OUT_HIGH leaves room for the longest reply;
         * refuse to send a truncated one. */
        log_msg(LOG_ERR, "session=%016llx event=reply_overflow", (unsigned long long)s->id);
        session_close(s, "reply_overflow");
        return;
    }
    reply_seen(s, s->out + s->out_len, (size_t)n);
    s->out_len += (size_t)n;
    s->out[s->out_len++] = '\r';
    s->out[s->out_len++] = '\n';
}

static void
flush(struct session *s)
{
    if (s->state == SS_CLOSED || s->sw->detached)
        return; /* detached: server_session_feed() takes the replies */
    stream_send(&s->st);
}

static void tls_begin(struct session *s);

/* ---- the stream's callbacks ---- */

/* Plaintext lands in s->in, up to its end; nothing while the 220 to
 * STARTTLS goes out (what follows it is dropped unread). */
static char *
session_room(struct stream *st, size_t *cap)
{
    struct session *s = SESSION_OF(st, st);
    if (s->state == SS_TLS_START || s->in_len >= IN_CAP) {
        *cap = 0;
        return NULL;
    }
    *cap = IN_CAP - s->in_len;
    return s->in + s->in_len;
}

static void
session_on_data(struct stream *st, const char *p, size_t len)
{
    struct session *s = SESSION_OF(st, st);
    (void)p; /* at s->in + s->in_len: session_room() said so */
    s->in_len += len;
}

static const char *
session_output(struct stream *st, size_t *len)
{
    struct session *s = SESSION_OF(st, st);
    *len = s->out_len - s->out_sent;
    return s->out + s->out_sent;
}

static void
session_on_sent(struct stream *st, size_t n)
{
    struct session *s = SESSION_OF(st, st);
    s->out_sent += n;
    if (s->out_sent == s->out_len)
        s->out_sent = s->out_len = 0;
}

static void tls_established(struct stream *st);
static void session_pregreet(struct session *s);

static void
session_on_readable(struct stream *st)
{
    session_run(SESSION_OF(st, st));
}

static void
session_on_writable(struct stream *st)
{
    struct session *s = SESSION_OF(st, st);
    if (s->state == SS_CLOSING)
        stream_send(&s->st); /* the rest, then close_notify once the last reply is in */
    if (stream_drained(&s->st)) {
        if (s->state == SS_CLOSING) {
            session_close(s, NULL);
            session_maybe_free(s);
            return;
        }
        if (s->state == SS_TLS_START)
            tls_begin(s);
        if (s->state == SS_CLOSED) {
            session_maybe_free(s);
            return;
        }
    }
    session_run(s);
}

/* Whether the client left a transaction unfinished: its envelope given,
 * its content not yet ended. After the end of the content (SS_SIGN,
 * SS_COMMIT) the message is stored whatever the client does, and its
 * event=queued says client_gone=1. */
bool
txn_unfinished(const struct session *s)
{
    switch (s->state) {
    case SS_DATA:
    case SS_BDAT:
        return true;
    case SS_COMMAND:
    case SS_AUTH:
    case SS_AUTH_HASH:
    case SS_AUTH_WAIT:
        return s->in_txn;
    default:
        return false;
    }
}

/* The connection ended under the session: the client closed it or reset
 * it, or a send failed. A transaction it left unfinished is dropped, and
 * the log says so with how far it got, as tls_on_eof() does for a TLS
 * close_notify (Postfix: "lost connection after DATA (N bytes)"): without
 * it the only trace of a message a client believes it sent would be a
 * "data=1" on the disconnect line. */
static void
session_on_eof(struct stream *st, int err, bool send)
{
    struct session *s = SESSION_OF(st, st);
    if (txn_unfinished(s)) {
        const char *how = "recv_error";
        if (send)
            how = "send_failed";
        else if (err == 0)
            how = "closed";
        else if (err == -ECONNRESET)
            how = "reset";
        log_msg(LOG_NOTICE,
                "session=%016llx event=connection_lost client=%s state=%s how=%s octets=%llu "
                "note=transaction_dropped",
                (unsigned long long)s->id, s->peer_ip, session_state_str(s->state), how,
                (unsigned long long)s->body_seen);
    }
    session_close(s, send ? (err == -EPIPE ? "send_zero" : "send_error")
                          : (err == 0 ? "client_closed" : "recv_error"));
    session_maybe_free(s);
}

static void
session_on_release(struct stream *st)
{
    session_maybe_free(SESSION_OF(st, st));
}

static const struct stream_ops session_stream_ops = {
    .room = session_room,
    .on_data = session_on_data,
    .on_handshake = tls_established,
    .output = session_output,
    .on_sent = session_on_sent,
    .on_readable = session_on_readable,
    .on_writable = session_on_writable,
    .on_eof = session_on_eof,
    .on_release = session_on_release,
};

/* Say it and hang up. */
void
reply_close(struct session *s, const char *text)
{
    reply(s, "%s", text);
    if (s->state != SS_CLOSED)
        session_enter(s, SS_CLOSING);
}

/* ---- input ---- */

static void
in_consume(struct session *s, size_t n)
{
    memmove(s->in, s->in + n, s->in_len - n);
    s->in_len -= n;
}

/* Commands: handle every complete line there is room to answer. Returns
 * false when nothing more can be done until more input arrives. */
static bool
run_commands(struct session *s)
{
    if (s->skip_line) {
        char *lf = memchr(s->in, '\n', s->in_len);
        if (lf == NULL) {
            s->in_len = 0; /* keep memory bounded: drop what we have */
            return false;
        }
        in_consume(s, (size_t)(lf - s->in) + 1);
        s->skip_line = false;
    }
    /* A TLS handshake record (type 22, version 3.x) where a command
     * should start: a client set to implicit TLS on a plaintext port. No
     * command starts with a control octet; answered at once, not after a
     * line end that its ClientHello may never hold. */
    if (s->in_len >= 2 && s->in[0] == 0x16 && s->in[1] == 0x03) {
        /* Refused before it is read as a line: an unknown command (in an
         * AUTH exchange, the AUTH's refusal). */
        if (!s->answering)
            command_begin(s, SMTP_VERB_NONE);
        log_msg(LOG_NOTICE,
                "session=%016llx event=tls_on_plaintext_port client=%s "
                "hint=\"the client starts with TLS: here it must say STARTTLS; implicit TLS is "
                "[server] listen_tls\"",
                (unsigned long long)s->id, s->peer_ip);
        reply_close(s, "500 5.5.2 TLS handshake on a plaintext port: use STARTTLS");
        return true;
    }
    if (s->state == SS_COMMAND && atomic_load_explicit(&s->sw->draining, memory_order_relaxed) &&
        s->in_len > 0 && session_drain_close(s))
        return true; /* a stop: nothing new begins */
    size_t off;
    long n = smtp_cmd_line_find(s->in, s->in_len, SMTP_CMD_LINE_MAX_AUTH, &off);
    if (n == 0)
        return false;
    if (n < 0 && !s->answering) /* as above */
        command_begin(s, n == SMTP_CMD_E_LINE_TOO_LONG && is_bdat_line(s->in, s->in_len)
                             ? SMTP_VERB_BDAT
                             : SMTP_VERB_NONE);
    if (n == SMTP_CMD_E_LINE_TOO_LONG) {
        if (is_bdat_line(s->in, s->in_len)) {
            s->errors++;
            bdat_unframed(s, "line_too_long");
            return true;
        }
        s->errors++;
        log_msg(LOG_INFO, "session=%016llx event=line_too_long client=%s",
                (unsigned long long)s->id, s->peer_ip);
        if (s->state == SS_AUTH) {
            /* RFC 4954 4: the AUTH fails; the line after this one is a
             * command again, not a name or password. */
            reply(s, "500 5.5.6 Authentication Exchange line is too long");
            session_enter(s, SS_COMMAND);
        } else {
            reply(s, "500 5.5.2 Line too long");
        }
        /* Drop the line: through its end when it is here (what follows is
         * the next command), else all we have, and the rest as it comes. */
        char *lf = memchr(s->in, '\n', s->in_len);
        if (lf != NULL) {
            in_consume(s, (size_t)(lf - s->in) + 1);
        } else {
            s->in_len = 0;
            s->skip_line = true;
        }
        return true;
    }
    if (n < 0) {
        /* A bare CR or LF in a command line: the client's idea of a line
         * differs from ours (RFC 5321 2.3.8); nothing it says can be
         * trusted any more. */
        log_msg(LOG_NOTICE, "session=%016llx event=bare_line_end client=%s",
                (unsigned long long)s->id, s->peer_ip);
        reply_close(s, "500 5.5.2 Bare CR or LF in a command line: closing");
        return true;
    }
    size_t len = (size_t)n;
    handle_line(s, s->in, len - 2, s->in_len - len);
    in_consume(s, len);
    if (s->state == SS_COMMAND || s->state == SS_AUTH)
        session_deadline(s, s->sw->cfg->timeout_command);
    if (s->errors >= s->sw->cfg->max_errors && s->state != SS_CLOSING) {
        log_msg(LOG_NOTICE, "session=%016llx event=too_many_errors client=%s errors=%u",
                (unsigned long long)s->id, s->peer_ip, s->errors);
        reply_close(s, "421 4.7.0 Too many errors: closing");
    } else if (s->junk > s->sw->cfg->max_junk_commands && s->state != SS_CLOSING) {
        log_msg(LOG_NOTICE, "session=%016llx event=too_many_junk_commands client=%s junk=%u",
                (unsigned long long)s->id, s->peer_ip, s->junk);
        reply_close(s, "421 4.7.0 Too many commands without mail: closing");
    }
    return true;
}

static bool
run_data(struct session *s)
{
    if (s->in_len == 0)
        return false;
    size_t consumed, produced;
    char *out;
    if (body_reserve(s, s->in_len))
        out = s->body + s->body_len;
    else
        out = s->in; /* over the limit: unstuff in place, keep nothing */
    int rc = smtp_unstuff(&s->unstuff, s->in, s->in_len, out, &consumed, &produced);
    if (out != s->in) {
        if (s->dkim_keys != NULL) /* hashed while still in the cache */
            dkim_body_feed(s->dkim_body, out, produced);
        s->body_len += produced;
    }
    s->body_seen += produced;
    in_consume(s, consumed);
    if (rc == SMTP_DATA_END) {
        message_finish(s, s->unstuff.flags);
        if (s->state == SS_COMMAND) /* refused: the client's next command */
            session_deadline(s, s->sw->cfg->timeout_command);
        return true;
    }
    return false; /* the unconsumed tail (". " or ".\r") waits for more */
}

static bool
run_bdat(struct session *s)
{
    if (s->bdat_left > 0) {
        if (s->in_len == 0)
            return false;
        size_t take = s->in_len < s->bdat_left ? s->in_len : (size_t)s->bdat_left;
        if (!s->bdat_discard) {
            if (body_reserve(s, take)) {
                memcpy(s->body + s->body_len, s->in, take);
                bdat_scan(s, s->body + s->body_len, take);
                if (s->dkim_keys != NULL)
                    dkim_body_feed(s->dkim_body, s->body + s->body_len, take);
                s->body_len += take;
            }
            s->body_seen += take;
        }
        in_consume(s, take);
        s->bdat_left -= take;
        if (s->bdat_left > 0)
            return false;
    }
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
    if (s->bdat_discard) {
        s->bdat_discard = false;
        return true; /* the refusal was already said */
    }
    if (s->body_seen > s->sw->cfg->max_message_size)
        s->too_big = true;
    if (!s->bdat_last && !s->too_big && !s->no_memory) {
        reply(s, "250 2.0.0 %llu octets received", (unsigned long long)s->body_seen);
        return true;
    }
    /* The last chunk, or one the message cannot take: the transaction ends
     * here either way (RFC 3030 2: after an error to a BDAT the client
     * sends no more chunks of it; any already pipelined find no
     * transaction, are refused with 503 and dropped). */
    message_finish(s, s->bdat_flags | (s->bdat_cr ? SMTP_DATA_F_BARE_CR : 0u));
    if (s->state == SS_COMMAND)
        session_deadline(s, s->sw->cfg->timeout_command);
    return true;
}

/* States that wait for the client's next bytes (others wait for a send,
 * a commit or a timer). */
static bool
want_input(const struct session *s)
{
    switch (s->state) {
    case SS_COMMAND:
    case SS_AUTH:
    case SS_DATA:
    case SS_BDAT:
    case SS_TLS:
        return true;
    case SS_PREGREET: /* over TLS, read on: what the client says is early */
        return s->tls_implicit;
    default:
        return false;
    }
}

static bool
want_recv(const struct session *s)
{
    return want_input(s) && s->out_len < OUT_HIGH && !stream_eof(&s->st);
}

/* An implicit-TLS client that speaks plaintext (EHLO first: the
 * handshake failed on its first octet) or waits in silence for a greeting
 * (swaks without --tlsc, a mail client set to STARTTLS on this port:
 * handshake_timeout passed with nothing from it) is told in the clear
 * why, rather than dropped without a word, as nginx answers HTTP on its
 * TLS port with a plaintext 400. No TLS client starts with a letter, and
 * one silent for handshake_timeout is broken anyway. False when the
 * stream cannot go back to plaintext: then it closes as before. */
static bool
tls_refuse_plaintext(struct session *s, bool silent)
{
    if (!s->tls_implicit || s->state != SS_TLS || stream_tls_drop(&s->st) != 0)
        return false;
    log_msg(LOG_NOTICE,
            "session=%016llx event=plaintext_on_tls_port client=%s said=%s "
            "hint=\"this port (listen_tls) is implicit TLS: the client must start TLS at once "
            "(swaks --tlsc); a plaintext client uses listen and STARTTLS\"",
            (unsigned long long)s->id, s->peer_ip, silent ? "nothing" : "plaintext");
    s->out_len = s->out_sent = 0;
    s->in_len = 0;
    reply_close(s, "554 5.7.0 TLS required on this port");
    flush(s);
    return true;
}

/* A TLS error: say why in the log, send the alert OpenSSL may have queued
 * (the client learns what failed instead of seeing a reset), then close.
 * Plaintext replies not yet encrypted are dropped: nothing can carry them. */
static void
tls_fail(struct session *s, int rc)
{
    if (stream_tls_plaintext(&s->st) && tls_refuse_plaintext(s, false))
        return;
    log_msg(LOG_NOTICE, "session=%016llx event=tls_failed client=%s state=%s err=\"%s\" "
                        "detail=\"%s\"",
            (unsigned long long)s->id, s->peer_ip, session_state_str(s->state),
            tls_strerror(rc), stream_tls_error(&s->st));
    s->out_len = s->out_sent = 0;
    session_enter(s, SS_CLOSING);
    flush(s);
    if (stream_drained(&s->st)) {
        session_close(s, "tls");
        session_maybe_free(s);
    }
}

/* The client sent close_notify and everything before it was handled: a
 * session waiting for input has nothing more to wait for. Replies queued
 * go out, then our close_notify, then the socket closes. */
static void
tls_on_eof(struct session *s)
{
    bool mid_txn = s->state == SS_DATA || s->state == SS_BDAT || s->in_txn;
    log_msg(mid_txn ? LOG_NOTICE : LOG_INFO,
            "session=%016llx event=tls_closed client=%s state=%s%s", (unsigned long long)s->id,
            s->peer_ip, session_state_str(s->state),
            mid_txn ? " note=transaction_dropped" : "");
    session_enter(s, SS_CLOSING);
    flush(s);
    if (stream_drained(&s->st)) {
        session_close(s, NULL);
        session_maybe_free(s);
    }
}

void
session_run(struct session *s)
{
    /* Until nothing moves: TLS may hold more plaintext than s->in took,
     * and no recv completion will come for bytes already received. */
    for (;;) {
        bool moved = false;
        if (s->state != SS_CLOSED && s->state != SS_CLOSING) {
            int rc = stream_read(&s->st);
            if (rc < 0) {
                tls_fail(s, rc);
                return;
            }
            moved = rc > 0;
        }
        for (;;) {
            if (s->out_len >= OUT_HIGH)
                break; /* answer what we have first: the send completion resumes */
            bool progress = false;
            switch (s->state) {
            case SS_COMMAND:
            case SS_AUTH:
                progress = run_commands(s);
                break;
            case SS_DATA:
                progress = run_data(s);
                break;
            case SS_BDAT:
                progress = run_bdat(s);
                break;
            case SS_PREGREET:
                if (s->in_len > 0)
                    session_pregreet(s);
                break;
            default:
                break;
            }
            if (!progress)
                break;
            moved = true;
        }
        if (!moved)
            break;
    }
    if (stream_eof(&s->st) && want_input(s) && s->out_len < OUT_HIGH) {
        tls_on_eof(s);
        return;
    }
    flush(s);
    if (want_recv(s) && !s->sw->detached)
        stream_recv(&s->st);
}

/* ---- greeting and TLS ---- */

static void
greet(struct session *s)
{
    reply(s, "220 %s ESMTP sluice", s->sw->e->cfg->server.hostname);
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
}

/* The 220 to STARTTLS has left (or an implicit-TLS client connected): from
 * here the socket carries TLS. Whatever plaintext the client pipelined
 * after STARTTLS is dropped unread (CVE-2011-0411). */
static void
tls_begin(struct session *s)
{
    /* Its ClientHello sent with STARTTLS, before the 220: dropped with
     * the rest, and no second one comes (the client waits for our
     * ServerHello): the handshake would only wait out its deadline. */
    bool hello = s->in_len >= 2 && s->in[0] == 0x16 && s->in[1] == 0x03;
    if (s->in_len > 0) /* Postfix: "improper command pipelining after STARTTLS" */
        log_msg(LOG_NOTICE,
                "session=%016llx event=pipelined_after_starttls client=%s dropped=%zu%s",
                (unsigned long long)s->id, s->peer_ip, s->in_len,
                hello ? " note=tls_hello_dropped_closing" : "");
    s->in_len = 0;
    if (hello) {
        session_close(s, "tls_hello_pipelined");
        return;
    }
    s->skip_line = false;
    struct tls_conn *tls = NULL;
    int rc = tls_conn_new_server(s->sw->tls, &tls);
    if (rc == 0)
        rc = stream_start_tls(&s->st, tls);
    if (rc == 0 && s->tls_implicit)
        stream_tls_watch_plaintext(&s->st);
    if (rc < 0) {
        log_msg(LOG_ERR, "session=%016llx event=tls_setup_failed err=\"%s\"",
                (unsigned long long)s->id, tls_strerror(rc));
        session_close(s, "tls_setup");
        return;
    }
    session_enter(s, SS_TLS);
    /* One deadline for the whole handshake: a client that trickles it
     * byte by byte gains nothing. */
    session_deadline(s, s->sw->e->cfg->tls.handshake_timeout);
}

/* The handshake completed (from inside stream_read()). */
static void
tls_established(struct stream *st)
{
    struct session *s = SESSION_OF(st, st);
    struct tls_info info;
    if (stream_tls_info(&s->st, &info) == 0) {
        s->tls_proto = info.protocol;
        s->tls_cipher = info.cipher;
    }
    log_msg(LOG_INFO, "session=%016llx event=tls client=%s tls=\"%s %s\"",
            (unsigned long long)s->id, s->peer_ip, s->tls_proto ? s->tls_proto : "",
            s->tls_cipher ? s->tls_cipher : "");
    if (s->tls_refuse) {
        reply_close(s, "421 4.7.0 Too many connections: try again later");
        return;
    }
    if (s->tls_implicit) {
        if (s->sw->cfg->greet_pause > 0) {
            /* the pause starts once TLS is up: a client on this port
             * that talks first is as early as one on a plaintext port.
             * The reads go on meanwhile (want_input): a whole record is
             * refused as it comes, part of one when the pause ends, and
             * close_notify or a close is the client leaving. */
            session_enter(s, SS_PREGREET);
            session_deadline(s, s->sw->cfg->greet_pause);
            session_drain_check(s);
            return;
        }
        greet(s); /* queues the 220: the stream sends it */
        session_drain_check(s);
        return;
    }
    /* RFC 3207 4.2: forget what the client said before TLS. */
    s->greeted = s->esmtp = false;
    s->helo[0] = '\0';
    s->user = NULL;
    txn_reset(s);
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
    session_drain_check(s);
}

/* A client that did not wait for the greeting (RFC 5321 3.1). */
static void
session_pregreet(struct session *s)
{
    log_msg(LOG_NOTICE, "session=%016llx event=pregreet client=%s", (unsigned long long)s->id,
            s->peer_ip);
    reply_close(s, "554 5.5.1 Protocol error: client sent data before the greeting");
    flush(s);
}

/* After greet_pause (plaintext): anything already sent is a client that
 * did not wait for the greeting. */
static void
session_on_peek(struct worker *w, struct op *op, int res, uint32_t flags)
{
    struct session *s = SESSION_OF(op, peek_op);
    s->peek_busy = false;
    s->inflight--;
    if (s->state == SS_CLOSED) {
        session_maybe_free(s);
        return;
    }
    if (s->state != SS_PREGREET) /* a stop's 421 came first (session_drain_close) */
        return;
    if (res > 0) {
        session_pregreet(s);
        return;
    }
    if (res == 0) {
        session_close(s, "client_closed");
        session_maybe_free(s);
        return;
    }
    greet(s);
    session_run(s);
}

static void
session_on_timer(struct timer *t, void *ctx)
{
    struct session *s = (struct session *)((char *)t - offsetof(struct session, timer));
    switch (s->state) {
    case SS_PREGREET: {
        if (s->tls_implicit) {
            /* a whole record is refused as it comes (session_run): part
             * of one here is a client that began to talk all the same */
            if (s->in_len > 0 || stream_input_waiting(&s->st)) {
                session_pregreet(s);
                return;
            }
            greet(s);
            session_run(s);
            return;
        }
        struct io_uring_sqe *sqe = worker_sqe(s->sw->w, &s->peek_op);
        io_uring_prep_recv(sqe, stream_fd(&s->st), s->in, 1, MSG_PEEK | MSG_DONTWAIT);
        s->peek_busy = true;
        s->inflight++;
        return;
    }
    case SS_AUTH_WAIT:
        auth_fail_reply(s);
        session_run(s);
        return;
    case SS_TLS:
        if (!stream_tls_heard(&s->st) && tls_refuse_plaintext(s, true))
            return;
        log_msg(LOG_NOTICE, "session=%016llx event=tls_timeout client=%s implicit=%d "
                            "note=handshake_not_completed",
                (unsigned long long)s->id, s->peer_ip, s->tls_implicit);
        /* fall through */
    case SS_CLOSING:
    case SS_TLS_START:
        session_close(s, s->state == SS_CLOSING ? "send_timeout" : "tls_timeout");
        session_maybe_free(s);
        return;
    default:
        log_msg(LOG_NOTICE, "session=%016llx event=timeout client=%s state=%s",
                (unsigned long long)s->id, s->peer_ip, session_state_str(s->state));
        /* If the client does not read either, give up after one more period
         * (the deadline of SS_CLOSING). */
        reply_close(s, "421 4.4.2 Timeout: closing connection");
        flush(s);
        return;
    }
}

/* ---- lifetime ---- */

static void
session_close(struct session *s, const char *why)
{
    if (s->state == SS_CLOSED)
        return;
    if (why != NULL && log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, "session=%016llx event=close reason=%s", (unsigned long long)s->id,
                why);
    session_enter(s, SS_CLOSED);
    worker_timer_cancel(s->sw->w, &s->timer);
    /* Completes the pending recv (and fails a pending send) so that the
     * ops come back and the last one frees the session. */
    stream_close(&s->st);
}

void
session_free(struct session *s)
{
    struct server_worker *sw = s->sw;
    if (s->prev)
        s->prev->next = s->next;
    else
        sw->sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    /* "ehlo=1 mail=1 rcpt=2/3 data=1 quit=1 commands=6/7": per verb the
     * commands answered 2xx or 3xx (of all, where some were refused), as
     * Postfix's smtpd says at disconnect */
    char sum[512] = ""; /* empty for a session that said nothing */
    size_t o = 0;
    uint32_t all = 0, ok = 0;
    for (unsigned v = 1; v <= SMTP_VERB_AUTH + 1 && o < sizeof(sum) - 48; v++) {
        unsigned k = v <= SMTP_VERB_AUTH ? v : SMTP_VERB_NONE; /* unknown ones last */
        if (s->cmds[k] == 0)
            continue;
        uint32_t good = s->cmds[k] - s->cmds_refused[k];
        all += s->cmds[k];
        ok += good;
        char name[16];
        snprintf(name, sizeof(name), "%s", k == SMTP_VERB_NONE ? "unknown" : smtp_verb_str(k));
        for (char *p = name; *p; p++)
            *p = (char)tolower((unsigned char)*p);
        o += (size_t)(s->cmds_refused[k] ? snprintf(sum + o, sizeof(sum) - o, " %s=%u/%u", name,
                                                    good, s->cmds[k])
                                         : snprintf(sum + o, sizeof(sum) - o, " %s=%u", name,
                                                    good));
    }
    /* the keys in the format: log_msg() escapes what an argument writes */
    if (s->first_refused[0] == '\0')
        log_msg(LOG_INFO, "session=%016llx event=disconnect client=%s user=%s%s commands=%u/%u",
                (unsigned long long)s->id, s->peer_ip, s->user ? s->user->name : "-", sum, ok, all);
    else if (s->closed_by[0] == '\0')
        log_msg(LOG_INFO,
                "session=%016llx event=disconnect client=%s user=%s%s commands=%u/%u "
                "first_refused=\"%s\"",
                (unsigned long long)s->id, s->peer_ip, s->user ? s->user->name : "-", sum, ok, all,
                s->first_refused);
    else
        log_msg(LOG_INFO,
                "session=%016llx event=disconnect client=%s user=%s%s commands=%u/%u "
                "first_refused=\"%s\" closed_by=\"%s\"",
                (unsigned long long)s->id, s->peer_ip, s->user ? s->user->name : "-", sum, ok, all,
                s->first_refused, s->closed_by);
    session_hash_unlink(s);
    if (s->tls_refuse)
        sw->tls_refusing--;
    if (s->counted) {
        atomic_fetch_sub(s->bounce ? &sw->e->bounce_clients : &sw->e->clients, 1);
        conn_table_remove(&sw->e->per_ip, s->conn_key);
    }
    worker_timer_cancel(sw->w, &s->timer);
    worker_timer_cancel(sw->w, &s->commit_timer);
    stream_fini(&s->st);
    txn_reset(s);
    dkim_body_free(s->dkim_body);
    free(s->rcpts);
    auth_db_unref(s->users);
    sw->stats.sessions--;
    free(s);
}

void
session_maybe_free(struct session *s)
{
    if (s->state == SS_CLOSED && s->inflight == 0 && !stream_busy(&s->st))
        session_free(s);
}

/* A session on fd, in the worker's list; NULL when out of memory. */
static struct session *
session_alloc(struct server_worker *sw, int fd)
{
    struct session *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    s->sw = sw;
    stream_init(&s->st, sw->w, fd, &session_stream_ops, NULL);
    s->id = (uint64_t)sw->w->id << 56 | ++sw->seq;
    s->state = SS_PREGREET;
    s->peek_op = (struct op){OP_CALLBACK, session_on_peek};
    timer_init(&s->timer, session_on_timer);
    timer_init(&s->commit_timer, session_on_commit_timer);
    s->next = sw->sessions;
    if (s->next)
        s->next->prev = s;
    sw->sessions = s;
    sw->stats.sessions++;
    sw->stats.accepted++;
    return s;
}

void
session_new(struct server_worker *sw, int fd, bool implicit_tls, bool bounce)
{
    struct session *s = session_alloc(sw, fd);
    if (s == NULL) {
        close(fd);
        return;
    }
    socklen_t len = sizeof(s->peer);
    if (getpeername(fd, (struct sockaddr *)&s->peer, &len) < 0) {
        s->peer.ss_family = AF_UNSPEC;
        snprintf(s->peer_ip, sizeof(s->peer_ip), "unknown");
    } else {
        netaddr_ip_str((struct sockaddr *)&s->peer, s->peer_ip, sizeof(s->peer_ip));
    }
    const struct server_config *cfg = sw->cfg;
    s->bounce = bounce;
    /* the bounce role: no relay by address, no AUTH */
    s->trusted = !bounce && cidr_match(cfg->trusted, cfg->ntrusted, (struct sockaddr *)&s->peer);
    s->loopback = netaddr_is_loopback((struct sockaddr *)&s->peer);
    auth_limit_addr_key((struct sockaddr *)&s->peer, s->addr_key, &s->addr_key_len);
    s->users = bounce ? NULL : engine_users(sw->e);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    _Atomic unsigned *open = bounce ? &sw->e->bounce_clients : &sw->e->clients;
    unsigned n = atomic_fetch_add(open, 1) + 1;
    bool ok = n <= (bounce ? sw->e->cfg->bounce.max_clients : cfg->max_clients);
    if (s->peer.ss_family != AF_INET && s->peer.ss_family != AF_INET6) {
        /* gone before we could ask who it was (a reset): nothing to serve */
        ok = false;
    } else if (ok) {
        conn_table_key((struct sockaddr *)&s->peer, cfg->max_clients_per_ip_v6_prefix, s->conn_key);
        unsigned per_ip = cfg->max_clients_per_ip;
        if (bounce && sw->e->cfg->bounce.max_clients_per_ip < per_ip)
            per_ip = sw->e->cfg->bounce.max_clients_per_ip;
        s->counted = conn_table_add(&sw->e->per_ip, s->conn_key, per_ip);
        ok = s->counted;
    }
    if (!s->counted)
        atomic_fetch_sub(open, 1);
    log_msg(LOG_INFO, "session=%016llx event=connect client=%s trusted=%d%s%s",
            (unsigned long long)s->id, s->peer_ip, s->trusted, bounce ? " role=bounce" : "",
            ok ? "" : " refused=limit");
    if (!ok && implicit_tls && sw->tls_refusing < TLS_REFUSE_MAX &&
        (s->peer.ss_family == AF_INET || s->peer.ss_family == AF_INET6)) {
        /* A plaintext 421 would be garbage to a client that starts with
         * its ClientHello. Postfix (smtpd_tls_wrappermode) completes the
         * handshake before its connection-count check and says 421
         * inside TLS: so does this, within TLS_REFUSE_MAX. */
        sw->stats.refused++;
        sw->tls_refusing++;
        s->tls_refuse = true;
    } else if (!ok) {
        sw->stats.refused++;
        if (implicit_tls) {
            session_close(s, "limit");
            session_maybe_free(s);
            return;
        }
        reply_close(s, "421 4.7.0 Too many connections: try again later");
        flush(s);
        return;
    }
    if (implicit_tls) {
        s->tls_implicit = true;
        tls_begin(s);
        if (s->state == SS_CLOSED) {
            session_maybe_free(s);
            return;
        }
        session_run(s);
        return;
    }
    if (cfg->greet_pause > 0) {
        session_deadline(s, cfg->greet_pause);
        return;
    }
    greet(s);
    session_run(s);
}

/* ---- sessions without a socket (server.h: for harnesses) ---- */

struct server_worker *
server_worker_new_detached(struct engine *e, struct worker *w)
{
    struct server_worker *sw = server_worker_alloc(e, w);
    if (sw != NULL)
        sw->detached = true;
    return sw;
}

struct session *
server_session_new_detached(struct server_worker *sw)
{
    struct session *s = session_alloc(sw, -1);
    if (s == NULL)
        return NULL;
    struct sockaddr_in *sin = (struct sockaddr_in *)&s->peer;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    snprintf(s->peer_ip, sizeof(s->peer_ip), "127.0.0.1");
    s->trusted = cidr_match(sw->cfg->trusted, sw->cfg->ntrusted, (struct sockaddr *)&s->peer);
    s->loopback = true;
    auth_limit_addr_key((struct sockaddr *)&s->peer, s->addr_key, &s->addr_key_len);
    s->users = engine_users(sw->e);
    greet(s);
    return s;
}

/* Move the replies said so far to out; what does not fit is dropped. */
static void
detached_take(struct session *s, char *out, size_t cap, size_t *got)
{
    size_t n = s->out_len - s->out_sent;
    size_t room = cap - *got;
    size_t k = n < room ? n : room;
    memcpy(out + *got, s->out + s->out_sent, k);
    *got += k;
    s->out_sent = s->out_len = 0;
}

size_t
server_session_feed(struct session *s, const char *in, size_t len, size_t read_max,
                    int commit_rc, char *out, size_t cap, bool *closed)
{
    size_t got = 0, off = 0;
    *closed = false;
    for (;;) {
        bool held = s->out_len >= OUT_HIGH; /* input left unhandled until a send drains */
        detached_take(s, out, cap, &got);
        if (s->state == SS_CLOSING)
            session_close(s, NULL);
        if (s->state == SS_CLOSED) {
            *closed = true;
            session_maybe_free(s);
            return got;
        }
        if (s->state == SS_COMMIT) {
            /* The spool's answer, at once; session_on_commit runs the
             * session on what is waiting, as after a real commit. */
            session_on_commit(s, commit_rc);
            continue;
        }
        if (held) {
            session_run(s);
            continue;
        }
        if (off < len && want_recv(s)) {
            size_t n = len - off;
            n = n < IN_CAP - s->in_len ? n : IN_CAP - s->in_len;
            n = read_max != 0 && n > read_max ? read_max : n;
            memcpy(s->in + s->in_len, in + off, n);
            s->in_len += n;
            off += n;
            session_run(s);
            continue;
        }
        return got;
    }
}

void
server_session_end(struct session *s)
{
    session_close(s, NULL);
    session_maybe_free(s);
}
