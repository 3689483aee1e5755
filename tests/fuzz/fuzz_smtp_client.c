/*
 * libFuzzer target: the outbound session machine. Three header octets
 * choose the options (TLS policy, pipelining, recipients, how the TLS
 * handshake ends, EOF, a TLS failure or a timeout at the end), the
 * server's capabilities, and the read size; the rest is what the server
 * sends. Unless the "raw" bit is set, a greeting and an EHLO reply come
 * first so that a transaction is in flight when the fuzzed bytes arrive. The harness acts
 * like the I/O layer: it sends all output, streams a body on SEND_BODY,
 * finishes TLS on STARTTLS, starts the next transaction on READY.
 *
 * Invariants: the output and the FIFO stay bounded; an independent
 * oracle (its own reply parser, matching each reply to the command lines
 * the machine wrote, in order) must have seen, for every recipient the
 * machine calls delivered, a 2xx to its RCPT, a 354 to DATA and then a
 * 2xx to the final dot; nothing is left undecided at EV_TXN_DONE; a
 * closed session stays closed. With TLS off, the stream fed whole and
 * fed in reads (the harness acting only once all is fed, so that both
 * see the same bytes in the same states) must give the same outcomes and
 * output.
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/smtp_client.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NRCPT_MAX 4
#define TXN_MAX   3
#define FIFO_MAX  1024

static void
check(int cond)
{
    if (!cond)
        abort();
}

enum cmd { C_GREETING, C_HELLO, C_STARTTLS, C_RSET, C_MAIL, C_RCPT, C_DATA, C_DOT, C_QUIT };

struct oracle {
    struct smtp_reply_parser rp;
    uint8_t kind[FIFO_MAX];
    int8_t rcpt[FIFO_MAX];
    unsigned head, len;
    const char *pend; /* input the machine consumed, not yet matched */
    size_t pend_len;
    bool rcpt_ok[NRCPT_MAX]; /* 2xx to this RCPT in the current transaction */
    bool data_354, dot_2xx;  /* ... 354 to DATA, then 2xx to the dot */
};

struct run {
    struct smtp_client c;
    struct smtp_client_buf buf[2]; /* lent in turn, as a connection's pool does */
    struct smtp_client_txn t;
    struct smtp_client_rcpt rc[NRCPT_MAX];
    struct oracle o;
    unsigned nrcpt, txns;
    uint8_t tls_result;
    bool closed;
    bool oracle; /* the oracle follows (off when reactions are deferred) */
    uint64_t hash;
};

static const char *const addrs[NRCPT_MAX] = {"r0@y.example", "r1@y.example", "r2@y.example",
                                             "r3@y.example"};
static const char body_text[] = "Subject: fuzz\r\n\r\n.dot line\r\nlast";

static void
mix(struct run *r, const void *p, size_t n)
{
    const unsigned char *s = p;

    for (size_t i = 0; i < n; i++)
        r->hash = (r->hash ^ s[i]) * 0x100000001b3ull;
}

static void oracle_match(struct oracle *o);

static void
oracle_push(struct oracle *o, enum cmd k, int rcpt)
{
    check(o->len < FIFO_MAX);
    o->kind[(o->head + o->len) % FIFO_MAX] = (uint8_t)k;
    o->rcpt[(o->head + o->len) % FIFO_MAX] = (int8_t)rcpt;
    o->len++;
    oracle_match(o);
}

static bool
starts(const char *s, size_t n, const char *p)
{
    size_t pl = strlen(p);

    return n >= pl && memcmp(s, p, pl) == 0;
}

/* Command lines the machine wrote, as the server would read them. */
static void
oracle_commands(struct oracle *o, const char *s, size_t n)
{
    while (n > 0) {
        const char *lf = memchr(s, '\n', n);
        size_t ll;

        check(lf != NULL && lf > s && lf[-1] == '\r'); /* whole CRLF lines only */
        ll = (size_t)(lf - s) + 1;
        if (starts(s, ll, "EHLO ") || starts(s, ll, "HELO "))
            oracle_push(o, C_HELLO, -1);
        else if (starts(s, ll, "STARTTLS\r\n"))
            oracle_push(o, C_STARTTLS, -1);
        else if (starts(s, ll, "RSET\r\n"))
            oracle_push(o, C_RSET, -1);
        else if (starts(s, ll, "MAIL FROM:<"))
            oracle_push(o, C_MAIL, -1);
        else if (starts(s, ll, "DATA\r\n"))
            oracle_push(o, C_DATA, -1);
        else if (starts(s, ll, ".\r\n"))
            oracle_push(o, C_DOT, -1);
        else if (starts(s, ll, "QUIT\r\n"))
            oracle_push(o, C_QUIT, -1);
        else if (starts(s, ll, "RCPT TO:<r") && ll > 10 && s[10] >= '0' && s[10] < '0' + NRCPT_MAX)
            oracle_push(o, C_RCPT, s[10] - '0');
        else
            check(0); /* nothing else is ever written outside a body */
        s += ll;
        n -= ll;
    }
}

/*
 * Match what the machine consumed to the commands it wrote, in order,
 * with a parser of the oracle's own. The machine writes some commands in
 * the middle of an input call (the next one without PIPELINING, EHLO
 * after the greeting): the oracle learns them only when they are sent, so
 * replies wait while it knows of no command they could answer. Replies
 * the machine found unsolicited stay unmatched: nothing follows them.
 */
static void
oracle_match(struct oracle *o)
{
    while (o->pend_len > 0 && o->len > 0) {
        size_t used = 0;
        int rc = smtp_reply_parse(&o->rp, o->pend, o->pend_len, &used);
        unsigned cls;
        enum cmd k;
        int ri;

        o->pend += used;
        o->pend_len -= used;
        if (rc <= 0) {
            if (rc < 0)
                o->pend_len = 0;
            return;
        }
        k = (enum cmd)o->kind[o->head];
        ri = o->rcpt[o->head];
        o->head = (o->head + 1) % FIFO_MAX;
        o->len--;
        cls = o->rp.reply.code / 100u;
        if (k == C_RCPT && cls == 2)
            o->rcpt_ok[ri] = true;
        else if (k == C_DATA && o->rp.reply.code == 354)
            o->data_354 = true;
        else if (k == C_DOT && cls == 2 && o->data_354)
            o->dot_2xx = true;
    }
}

static void
oracle_replies(struct oracle *o, const char *s, size_t n)
{
    if (o->pend_len == 0 || o->pend + o->pend_len != s) {
        o->pend = s; /* a new buffer: what was left of the last one is dropped */
        o->pend_len = 0;
    }
    o->pend_len += n;
    oracle_match(o);
}

/* Send everything the machine wrote; body bytes are not commands. A
 * send may let more of the same kind follow. */
static void
drain(struct run *r, bool body)
{
    for (;;) {
        size_t n;
        const char *p = smtp_client_output(&r->c, &n);
        int ev;

        check(n <= SMTP_CLIENT_OUT_CAP);
        check(r->c.pipe_len <= SMTP_CLIENT_PIPE_MAX);
        if (n == 0)
            return;
        if (!body && r->oracle)
            oracle_commands(&r->o, p, n);
        mix(r, p, n);
        ev = smtp_client_sent(&r->c, n);
        check(ev >= 0);
        /* only a body terminator can come of a send */
        check((ev & ~(SMTP_CLIENT_EV_TIMER | SMTP_CLIENT_EV_BODY_END)) == 0);
        if ((ev & SMTP_CLIENT_EV_BODY_END) && r->oracle)
            oracle_push(&r->o, C_DOT, -1);
    }
}

static void
txn_done(struct run *r)
{
    struct smtp_client_txn *t = &r->t;
    unsigned accepted = 0;

    check(t->delivered + t->tempfail + t->permfail == t->nrcpt);
    check(t->msg.status >= SMTP_STATUS_DELIVERED && t->msg.status <= SMTP_STATUS_PERMFAIL);
    for (unsigned i = 0; i < t->nrcpt; i++) {
        const struct smtp_outcome *o = &t->rcpt[i].out;

        check(o->status >= SMTP_STATUS_DELIVERED && o->status <= SMTP_STATUS_PERMFAIL);
        check(memchr(o->text, '\0', sizeof o->text) != NULL);
        if (o->status == SMTP_STATUS_DELIVERED) {
            check(!r->oracle || (r->o.rcpt_ok[i] && r->o.data_354 && r->o.dot_2xx));
            check(o->code / 100 == 2 && o->reason == SMTP_REASON_REPLY);
        }
        accepted += r->o.rcpt_ok[i];
        mix(r, &o->status, 1);
        mix(r, &o->reason, 1);
        mix(r, &o->code, sizeof o->code);
        mix(r, o->text, strlen(o->text));
    }
    check(t->delivered <= accepted || !r->oracle);
}

static void on_events(struct run *r, int ev);

static void
start_txn(struct run *r)
{
    memset(&r->t, 0, sizeof r->t);
    r->t.from.ptr = "s@x.example";
    r->t.from.len = 11;
    for (unsigned i = 0; i < r->nrcpt; i++) {
        memset(&r->rc[i], 0, sizeof r->rc[i]);
        r->rc[i].addr.ptr = addrs[i];
        r->rc[i].addr.len = strlen(addrs[i]);
        r->o.rcpt_ok[i] = false;
    }
    r->o.data_354 = r->o.dot_2xx = false;
    r->t.rcpt = r->rc;
    r->t.nrcpt = r->nrcpt;
    r->t.params.seen = SMTP_PARAM_SIZE;
    r->t.params.size = sizeof body_text - 1;
    r->txns++;
    on_events(r, smtp_client_txn(&r->c, &r->t));
}

static void
send_body(struct run *r)
{
    size_t off = 0;

    for (int guard = 0; guard < 64; guard++) {
        size_t used = 0;
        int ev = smtp_client_body(&r->c, body_text + off, sizeof body_text - 1 - off, true, &used);

        check(ev >= 0);
        off += used;
        drain(r, true);
        if (ev & SMTP_CLIENT_EV_BODY_END) {
            if (r->oracle)
                oracle_push(&r->o, C_DOT, -1);
            return;
        }
        if (smtp_client_state(&r->c) != SMTP_CLIENT_S_BODY)
            return; /* the terminator went out from smtp_client_sent() */
    }
    check(0);
}

static void
on_events(struct run *r, int ev)
{
    check(ev >= 0);
    drain(r, false);
    if (ev & SMTP_CLIENT_EV_CLOSE) {
        check((ev & ~(SMTP_CLIENT_EV_CLOSE | SMTP_CLIENT_EV_TXN_DONE)) == 0);
        check(smtp_client_state(&r->c) == SMTP_CLIENT_S_CLOSED && !smtp_client_reusable(&r->c));
        check(smtp_client_session(&r->c)->reason != SMTP_REASON_NONE);
        if (ev & SMTP_CLIENT_EV_TXN_DONE)
            txn_done(r);
        mix(r, smtp_client_session(&r->c)->text, strlen(smtp_client_session(&r->c)->text));
        r->closed = true;
        return;
    }
    if (ev & SMTP_CLIENT_EV_TXN_DONE)
        txn_done(r);
    if (ev & SMTP_CLIENT_EV_STARTTLS) {
        check(smtp_client_state(&r->c) == SMTP_CLIENT_S_TLS);
        on_events(r, smtp_client_tls_done(&r->c, (enum smtp_client_tls_result)r->tls_result));
        return;
    }
    if (ev & SMTP_CLIENT_EV_SEND_BODY) {
        check(smtp_client_state(&r->c) == SMTP_CLIENT_S_BODY);
        send_body(r);
        return;
    }
    if (ev & SMTP_CLIENT_EV_READY) {
        check(smtp_client_reusable(&r->c));
        if (r->txns < TXN_MAX)
            start_txn(r);
        else
            on_events(r, smtp_client_quit(&r->c));
    }
}

/* Feed in reads of step. react: act on the events of each read, as the
 * I/O layer does; otherwise only on all of them once everything is fed. */
static void
feed(struct run *r, const char *s, size_t n, size_t step, bool react)
{
    size_t off = 0;
    int acc = 0;

    while (off < n && !r->closed) {
        size_t take = n - off < step ? n - off : step, used = 0;
        struct smtp_client_buf *b = smtp_client_detach(&r->c);
        int ev;

        if (b != NULL) {
            /* The session must not depend on what a lent buffer held. */
            memset(b, 0x5a, sizeof *b);
            check(smtp_client_attach(&r->c, b == &r->buf[0] ? &r->buf[1] : &r->buf[0]) == 0);
        }
        ev = smtp_client_input(&r->c, s + off, take, &used);

        check(ev >= 0 && used <= take);
        check(used == take || (ev & SMTP_CLIENT_EV_CLOSE));
        if (r->oracle)
            oracle_replies(&r->o, s + off, used);
        off += take;
        if (react) {
            on_events(r, ev);
        } else {
            acc |= ev;
            if (ev & SMTP_CLIENT_EV_CLOSE)
                break;
        }
    }
    if (!react) {
        if (acc & SMTP_CLIENT_EV_CLOSE)
            acc &= SMTP_CLIENT_EV_CLOSE | SMTP_CLIENT_EV_TXN_DONE;
        on_events(r, acc);
    }
}

static uint32_t
run(struct run *r, const uint8_t *data, size_t size, size_t step, bool react)
{
    static const char *const caps[] = {
        "250-mx\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-DSN\r\n250 SIZE 100000\r\n",
        "250-mx\r\n250 8BITMIME\r\n",
        "250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n",
        "250-mx\r\n250-PIPELINING\r\n250 LIMITS RCPTMAX=2\r\n",
    };
    struct smtp_client_opts o = {.name = "client.example"};
    uint8_t h0 = data[0], h1 = data[1];

    memset(r, 0, sizeof *r);
    r->oracle = react;
    o.tls = (enum smtp_client_tls_policy)(h0 & 3);
    o.no_pipelining = h0 & 4;
    r->nrcpt = 1 + ((h0 >> 3) & 3);
    r->tls_result = (uint8_t)((h0 >> 6) % 3);
    check(smtp_client_init(&r->c, &o) == 0);
    check(smtp_client_attach(&r->c, &r->buf[0]) == 0);
    smtp_reply_parser_init(&r->o.rp);
    oracle_push(&r->o, C_GREETING, -1);
    if (!(h1 & 0x80)) {
        const char *cap = caps[h1 & 3];

        feed(r, "220 mx ESMTP\r\n", 14, 14, true);
        feed(r, cap, strlen(cap), strlen(cap), true);
    }
    feed(r, (const char *)data + 3, size - 3, step, react);
    if (!r->closed) {
        size_t n;

        on_events(r, !(h1 & 0x40)  ? smtp_client_timeout(&r->c)
                     : (h1 & 0x20) ? smtp_client_tls_error(&r->c, "tlsv1 alert decrypt error")
                                   : smtp_client_eof(&r->c));
        /* a timeout while idle is a QUIT */
        check(r->closed);
        (void)smtp_client_output(&r->c, &n);
        check(n == 0);
    }
    /* closed stays closed */
    {
        size_t used = 0;

        check(smtp_client_input(&r->c, "250 ok\r\n", 8, &used) == 0);
        check(smtp_client_eof(&r->c) == 0 && smtp_client_timeout(&r->c) == 0);
        check(smtp_client_tls_error(&r->c, NULL) == 0);
        check(smtp_client_quit(&r->c) == 0);
        check(smtp_client_txn(&r->c, &r->t) == SMTP_CLIENT_E_STATE);
    }
    return (uint32_t)r->hash;
}

static struct run r;

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t step;

    if (size < 3)
        return 0;
    step = 1 + data[2] % 64;
    (void)run(&r, data, size, step, true);
    if ((data[0] & 3) == SMTP_CLIENT_TLS_OFF)
        check(run(&r, data, size, size, false) == run(&r, data, size, step, false));
    return 0;
}
