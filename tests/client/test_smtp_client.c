/*
 * Tests of engine/smtp_client.c and smtp_client_txn.c: scripted
 * sessions. A script is a C function of steps: IN (reply bytes fed, the
 * events they must raise), OUT (the exact bytes the client must have
 * written, then reported sent), and the caller's calls (txn, body,
 * tls_done, eof, timeout, quit), with the outcomes checked at the end.
 * Every script runs with each IN fed whole, split in two at every offset,
 * and byte by byte, and must pass the same checks each time.
 *
 * Threading: single-threaded test program.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/smtp_client.h"

#define L(s) s, sizeof(s) - 1

#define EV_TIMER SMTP_CLIENT_EV_TIMER
#define EV_TLS   SMTP_CLIENT_EV_STARTTLS
#define EV_BODY  SMTP_CLIENT_EV_SEND_BODY
#define EV_END   SMTP_CLIENT_EV_BODY_END
#define EV_DONE  SMTP_CLIENT_EV_TXN_DONE
#define EV_READY SMTP_CLIENT_EV_READY
#define EV_CLOSE SMTP_CLIENT_EV_CLOSE
#define NAME     "client.example"
#define MAXR     300

enum mode { WHOLE, SPLIT, BYTES };

static struct rig {
    enum mode mode;
    size_t split;  /* SPLIT: the first read of each IN is this long */
    size_t max_in; /* longest IN of the script (WHOLE run) */
    unsigned long inputs;
    unsigned traced;
    enum smtp_client_state last_from, last_to;
    struct smtp_client c;
    struct smtp_client_buf buf, buf2; /* lent in turn: see swap_buf() */
    unsigned long swaps;
    struct smtp_client_txn t;
    struct smtp_client_rcpt rc[MAXR];
    char addr[MAXR][300];
} R;

/* Events that matter to a script; EV_TIMER is checked on its own. */
static int
mask(int ev)
{
    ev &= ~EV_TIMER;
    if (ev & EV_CLOSE)
        ev &= EV_DONE | EV_CLOSE;
    return ev;
}

static void
want_ev(int got, int want, const char *what)
{
    if (got < 0)
        fail_msg("%s: error %d (%s)", what, got, smtp_client_strerror(got));
    if (mask(got) != want)
        fail_msg("%s: events 0x%x, want 0x%x (mode %d split %zu, state %s)", what, mask(got), want,
                 R.mode, R.split, smtp_client_state_str(smtp_client_state(&R.c)));
}

static void
on_trace(void *arg, enum smtp_client_state from, enum smtp_client_state to)
{
    (void)arg;
    assert_int_not_equal(from, to);
    R.traced++;
    R.last_from = from;
    R.last_to = to;
}

static void
start_opts(const struct smtp_client_opts *o)
{
    assert_int_equal(smtp_client_init(&R.c, o), 0);
    assert_int_equal(smtp_client_attach(&R.c, &R.buf), 0);
    R.traced = 0;
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_GREETING);
    assert_int_equal(smtp_client_deadline_ms(&R.c), 5 * 60 * 1000);
}

static void
start(enum smtp_client_tls_policy tls)
{
    struct smtp_client_opts o = {.name = NAME, .tls = tls, .trace = on_trace};

    start_opts(&o);
}

/* As a connection does between reads: take the buffer back when the
 * machine lets go of it, scribble on it, and lend the other one. The
 * session must not notice (SPLIT and BYTES runs cut replies anywhere, so
 * this also checks that a half reply keeps its buffer). */
static void
swap_buf(void)
{
    struct smtp_client_buf *b = smtp_client_detach(&R.c);

    if (b == NULL) {
        assert_non_null(R.c.buf);
        return;
    }
    memset(b, 0xa5, sizeof *b);
    assert_int_equal(smtp_client_attach(&R.c, b == &R.buf ? &R.buf2 : &R.buf), 0);
    R.swaps++;
}

/* Feed reply bytes the way the mode says; the union of the events must be
 * want. All is consumed unless the session closed. */
static void
in_(const char *s, size_t len, int want)
{
    size_t off = 0, k = 0;
    int got = 0;

    if (len > R.max_in)
        R.max_in = len;
    while (off < len) {
        size_t n = len - off, used = 12345;
        int ev;

        if (R.mode == BYTES)
            n = 1;
        else if (R.mode == SPLIT && k++ == 0 && R.split < len)
            n = R.split;
        if (R.mode != WHOLE)
            swap_buf();
        ev = smtp_client_input(&R.c, s + off, n, &used);
        R.inputs++;
        assert_true(ev >= 0);
        assert_true(used <= n);
        got |= ev;
        if (ev & EV_CLOSE)
            break;
        assert_int_equal(used, n);
        off += n;
    }
    want_ev(got, want, "input");
}
#define IN(s, ev) in_(L(s), ev)

/* The output must be exactly s; then it is reported sent. */
static void
out_ev(const char *s, size_t len, int want)
{
    size_t n;
    const char *o = smtp_client_output(&R.c, &n);

    if (n != len || memcmp(o, s, len) != 0)
        fail_msg("output \"%.*s\" (%zu), want \"%.*s\" (%zu)", (int)(n > 400 ? 400 : n), o, n,
                 (int)(len > 400 ? 400 : len), s, len);
    want_ev(smtp_client_sent(&R.c, n), want, "sent");
}
#define OUT(s)        out_ev(L(s), 0)
#define OUT_EV(s, ev) out_ev(L(s), ev)

static void
nothing_out(void)
{
    size_t n;

    (void)smtp_client_output(&R.c, &n);
    assert_int_equal(n, 0);
}

static void
txn_(unsigned n, const char *from, const char *const *to)
{
    memset(&R.t, 0, sizeof R.t);
    R.t.from.ptr = from;
    R.t.from.len = strlen(from);
    for (unsigned i = 0; i < n; i++) {
        memset(&R.rc[i], 0, sizeof R.rc[i]);
        R.rc[i].addr.ptr = to[i];
        R.rc[i].addr.len = strlen(to[i]);
    }
    R.t.rcpt = R.rc;
    R.t.nrcpt = n;
}
#define TXN(...)                                                                                   \
    do {                                                                                           \
        static const char *const to_[] = {__VA_ARGS__};                                            \
        txn_(sizeof to_ / sizeof to_[0], "a@x.example", to_);                                      \
    } while (0)

static void
go(int want)
{
    want_ev(smtp_client_txn(&R.c, &R.t), want, "txn");
}

static void
body(const char *s, size_t len, bool last, int want)
{
    size_t used = 0;

    want_ev(smtp_client_body(&R.c, s, len, last, &used), want, "body");
    assert_int_equal(used, len);
}
#define BODY(s, last, ev) body(L(s), last, ev)

static void
want_out(const struct smtp_outcome *o, enum smtp_status status, enum smtp_scope scope,
         enum smtp_reason reason, unsigned code, const char *enh)
{
    char e[32];

    snprintf(e, sizeof e, "%u.%u.%u", o->enh.cls, o->enh.subject, o->enh.detail);
    if (o->status != status || o->scope != scope || o->reason != reason || o->code != code ||
        (enh != NULL && strcmp(e, enh) != 0))
        fail_msg("outcome %s/%s/%s %u %s \"%s\", want %s/%s/%s %u %s (mode %d split %zu)",
                 smtp_status_str(o->status), smtp_scope_str(o->scope), smtp_reason_str(o->reason),
                 o->code, e, o->text, smtp_status_str(status), smtp_scope_str(scope),
                 smtp_reason_str(reason), code, enh ? enh : "-", R.mode, R.split);
    assert_true(memchr(o->text, '\0', sizeof o->text) != NULL);
}

static void
counts(unsigned delivered, unsigned tempfail, unsigned permfail)
{
    assert_int_equal(R.t.delivered, delivered);
    assert_int_equal(R.t.tempfail, tempfail);
    assert_int_equal(R.t.permfail, permfail);
}

static void
no_reuse(void)
{
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_CLOSED);
    assert_false(smtp_client_reusable(&R.c));
    assert_int_equal(smtp_client_deadline_ms(&R.c), 0);
}

#define EHLO_FULL                                                                                  \
    "250-mx.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 1000000\r\n250-DSN\r\n"          \
    "250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
#define EHLO_PLAIN "250-mx.example\r\n250 8BITMIME\r\n"

static void
hello(const char *ehlo, size_t len)
{
    IN("220 mx.example ESMTP\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    in_(ehlo, len, EV_READY);
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_IDLE);
    assert_true(smtp_client_reusable(&R.c));
}
#define HELLO(s) hello(L(s))

/* A pipelined transaction of n recipients up to the 354. */
static void
to_body(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "c@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    IN("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
       EV_BODY);
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_BODY);
}

/* ... and on to the final dot. */
static void
to_dot(void)
{
    to_body();
    BODY("Subject: t\r\n\r\nhello\r\n", true, EV_END);
    OUT("Subject: t\r\n\r\nhello\r\n.\r\n");
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_DOT);
}

/* ---- scripts ---- */

static void
sc_happy_pipelined(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    assert_true(smtp_client_caps(&R.c)->ext & SMTP_EXT_PIPELINING);
    TXN("b@y.example", "c@y.example");
    R.t.params.seen = SMTP_PARAM_SIZE | SMTP_PARAM_BODY;
    R.t.params.size = 100;
    R.t.params.body = SMTP_BODY_8BITMIME;
    go(0);
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_MAIL);
    /* one write: MAIL, every RCPT, DATA */
    OUT("MAIL FROM:<a@x.example> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<b@y.example>\r\n"
        "RCPT TO:<c@y.example>\r\nDATA\r\n");
    IN("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n", EV_BODY);
    BODY("Subject: hi\r\n\r\n.dot\r\n", false, 0);
    BODY("end", true, EV_END);
    OUT("Subject: hi\r\n\r\n..dot\r\nend\r\n.\r\n");
    IN("250 2.0.0 Ok: queued as 4XyZ\r\n", EV_DONE | EV_READY);
    for (int i = 0; i < 2; i++) {
        want_out(&R.rc[i].out, SMTP_STATUS_DELIVERED, SMTP_SCOPE_MESSAGE, SMTP_REASON_REPLY, 250,
                 "2.0.0");
        assert_string_equal(R.rc[i].out.text, "2.0.0 Ok: queued as 4XyZ");
    }
    want_out(&R.t.msg, SMTP_STATUS_DELIVERED, SMTP_SCOPE_MESSAGE, SMTP_REASON_REPLY, 250, "2.0.0");
    counts(2, 0, 0);
    assert_true(smtp_client_reusable(&R.c));
    want_ev(smtp_client_quit(&R.c), EV_CLOSE, "quit");
    OUT("QUIT\r\n");
    assert_int_equal(smtp_client_session(&R.c)->reason, SMTP_REASON_QUIT);
    no_reuse();
    /* nothing more is read once closed */
    assert_int_equal(smtp_client_input(&R.c, L("221 bye\r\n"), &(size_t){0}), 0);
    assert_int_equal(smtp_client_eof(&R.c), 0);
}

static void
sc_happy_no_pipelining(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("b@y.example", "c@y.example");
    R.t.params.seen = SMTP_PARAM_SIZE | SMTP_PARAM_BODY;
    R.t.params.size = 100;
    R.t.params.body = SMTP_BODY_8BITMIME;
    go(0);
    /* no SIZE offered: no SIZE=; one command at a time */
    OUT("MAIL FROM:<a@x.example> BODY=8BITMIME\r\n");
    IN("250 ok\r\n", 0);
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_RCPT);
    OUT("RCPT TO:<b@y.example>\r\n");
    IN("250 ok\r\n", 0);
    OUT("RCPT TO:<c@y.example>\r\n");
    IN("250 ok\r\n", 0);
    OUT("DATA\r\n");
    IN("354 go\r\n", EV_BODY);
    BODY("x\r\n", true, EV_END);
    OUT("x\r\n.\r\n");
    IN("250 queued\r\n", EV_DONE | EV_READY);
    want_out(&R.rc[0].out, SMTP_STATUS_DELIVERED, SMTP_SCOPE_MESSAGE, SMTP_REASON_REPLY, 250,
             "2.0.0");
    counts(2, 0, 0);
}

static void
sc_pipelining_refused_by_opts(void)
{
    struct smtp_client_opts o = {.name = NAME, .no_pipelining = true};

    start_opts(&o);
    HELLO(EHLO_FULL);
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\n");
    IN("250 ok\r\n", 0);
    OUT("RCPT TO:<b@y.example>\r\n");
    IN("250 ok\r\n", 0);
    OUT("DATA\r\n");
    IN("354 go\r\n", EV_BODY);
}

static void
sc_mixed_rcpts(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "c@y.example", "d@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\n"
        "RCPT TO:<d@y.example>\r\nDATA\r\n");
    IN("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550-5.1.1 No such user\r\n550 5.1.1 here\r\n"
       "451 4.2.1 Try later\r\n354 go\r\n",
       EV_BODY);
    BODY("hi\r\n", true, EV_END);
    OUT("hi\r\n.\r\n");
    IN("250 2.0.0 Ok\r\n", EV_DONE | EV_READY);
    want_out(&R.rc[0].out, SMTP_STATUS_DELIVERED, SMTP_SCOPE_MESSAGE, SMTP_REASON_REPLY, 250,
             "2.0.0");
    want_out(&R.rc[1].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_REPLY, 550, "5.1.1");
    assert_string_equal(R.rc[1].out.text, "5.1.1 No such user 5.1.1 here");
    assert_int_equal(R.rc[1].out.stage, SMTP_CLIENT_S_RCPT);
    want_out(&R.rc[2].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_REPLY, 451, "4.2.1");
    counts(1, 1, 1);
    assert_true(smtp_client_reusable(&R.c));
}

static void
sc_all_refused_pipelined(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "c@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    /* the 554 to DATA is the expected one: no protocol error */
    IN("250 Ok\r\n550 5.1.1 no\r\n450 4.2.0 later\r\n554 5.5.1 No valid recipients\r\n",
       EV_DONE | EV_READY);
    want_out(&R.rc[0].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_REPLY, 550, "5.1.1");
    want_out(&R.rc[1].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_REPLY, 450, "4.2.0");
    want_out(&R.t.msg, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_NO_RCPT, 0, NULL);
    counts(0, 1, 1);
    assert_true(smtp_client_reusable(&R.c));
    /* the next transaction starts with RSET, in the same write */
    TXN("e@y.example");
    go(0);
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_RSET);
    OUT("RSET\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<e@y.example>\r\nDATA\r\n");
    IN("250 flushed\r\n250 Ok\r\n250 Ok\r\n354 go\r\n", EV_BODY);
    BODY("", true, EV_END);
    OUT(".\r\n");
    IN("250 Ok\r\n", EV_DONE | EV_READY);
    counts(1, 0, 0);
    /* and the one after that does not */
    TXN("f@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<f@y.example>\r\nDATA\r\n");
}

static void
sc_all_refused_no_pipelining(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\n");
    IN("250 Ok\r\n", 0);
    OUT("RCPT TO:<b@y.example>\r\n");
    /* no recipient: no DATA */
    IN("550 5.1.1 no\r\n", EV_DONE | EV_READY);
    nothing_out();
    want_out(&R.t.msg, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_NO_RCPT, 0, NULL);
    counts(0, 0, 1);
    TXN("c@y.example");
    go(0);
    OUT("RSET\r\n");
    IN("250 Ok\r\n", 0);
    OUT("MAIL FROM:<a@x.example>\r\n");
    IN("250 Ok\r\n", 0);
    OUT("RCPT TO:<c@y.example>\r\n");
}

static void
sc_mail_refused(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "c@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    /* the RCPT and DATA replies that follow change nothing */
    IN("553 5.1.8 Bad sender\r\n250 oddly\r\n503 5.5.1 sequence\r\n503 5.5.1 sequence\r\n",
       EV_DONE | EV_READY);
    for (int i = 0; i < 2; i++)
        want_out(&R.rc[i].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_REPLY, 553,
                 "5.1.8");
    want_out(&R.t.msg, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_REPLY, 553, "5.1.8");
    assert_int_equal(R.t.msg.stage, SMTP_CLIENT_S_MAIL);
    counts(0, 0, 2);
    /* nothing open on the server: no RSET */
    TXN("d@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<d@y.example>\r\nDATA\r\n");
}

static void
sc_mail_refused_no_pipelining(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\n");
    IN("451 4.3.0 later\r\n", EV_DONE | EV_READY);
    nothing_out();
    want_out(&R.rc[0].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_REPLY, 451,
             "4.3.0");
}

static void
sc_data_refused(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "c@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n550 no\r\n451 4.3.0 not now\r\n", EV_DONE | EV_READY);
    want_out(&R.rc[0].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_REPLY, 451,
             "4.3.0");
    want_out(&R.rc[1].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_REPLY, 550, "5.0.0");
    assert_int_equal(R.t.msg.stage, SMTP_CLIENT_S_DATA);
    TXN("d@y.example");
    go(0);
    OUT("RSET\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<d@y.example>\r\nDATA\r\n");
}

static void
sc_dot_refused(void)
{
    to_dot();
    IN("554 5.7.1 Spam\r\n", EV_DONE | EV_READY);
    for (int i = 0; i < 2; i++)
        want_out(&R.rc[i].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_REPLY, 554,
                 "5.7.1");
    counts(0, 0, 2);
    /* the dot closed the transaction: no RSET */
    TXN("d@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<d@y.example>\r\nDATA\r\n");
}

static void
sc_354_without_rcpt(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
    /* a broken server wants data for nobody: an empty message ends it */
    IN("250 ok\r\n550 no\r\n354 go\r\n", 0);
    OUT(".\r\n");
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_DOT);
    IN("250 queued for nobody\r\n", EV_DONE | EV_READY);
    want_out(&R.rc[0].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_REPLY, 550, NULL);
    counts(0, 0, 1);
    TXN("c@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
}

static void
sc_reuse(void)
{
    to_dot();
    IN("250 ok\r\n", EV_DONE | EV_READY);
    counts(2, 0, 0);
    for (int k = 0; k < 3; k++) {
        TXN("d@y.example");
        go(0);
        OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<d@y.example>\r\nDATA\r\n");
        IN("250 ok\r\n250 ok\r\n354 go\r\n", EV_BODY);
        BODY("m\r\n", true, EV_END);
        OUT("m\r\n.\r\n");
        IN("250 ok\r\n", EV_DONE | EV_READY);
        counts(1, 0, 0);
        assert_true(smtp_client_reusable(&R.c));
    }
}

static void
sc_helo_fallback(void)
{
    start(SMTP_CLIENT_TLS_OPTIONAL);
    IN("220 old.example\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    IN("500 5.5.1 what\r\n", 0);
    OUT("HELO " NAME "\r\n");
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_HELO);
    IN("250 old.example\r\n", EV_READY);
    assert_int_equal(smtp_client_caps(&R.c)->ext, 0);
    /* an 8-bit message: the caller decides (bounce or downgrade) */
    TXN("b@y.example");
    R.t.params.seen = SMTP_PARAM_BODY | SMTP_PARAM_SIZE;
    R.t.params.body = SMTP_BODY_8BITMIME;
    R.t.params.size = 10;
    go(EV_DONE | EV_READY);
    nothing_out();
    want_out(&R.rc[0].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_NEED_8BITMIME, 554,
             "5.6.3");
    want_out(&R.t.msg, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_NEED_8BITMIME, 554,
             "5.6.3");
    /* 7BIT goes, without BODY= (no 8BITMIME) and without SIZE= */
    R.t.params.body = SMTP_BODY_7BIT;
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\n");
    IN("250 ok\r\n", 0);
    OUT("RCPT TO:<b@y.example>\r\n");
}

static void
sc_smtputf8(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("j\xc3\xb6rg@y.example", "b\xc3\xa4r@y.example");
    go(EV_DONE | EV_READY);
    nothing_out();
    for (int i = 0; i < 2; i++)
        want_out(&R.rc[i].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_NEED_SMTPUTF8,
                 553, "5.6.7");
    counts(0, 0, 2);
    /* a UTF-8 local part beside an ASCII recipient: refused alone, the
     * other goes (both were refused) */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("b@y.example", "j\xc3\xb6rg@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\n");
    IN("250 ok\r\n", 0);
    OUT("RCPT TO:<b@y.example>\r\n");
    want_out(&R.rc[1].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_NEED_SMTPUTF8, 553,
             "5.6.7");
    /* a domain in U-labels with its A-labels given: to a server without
     * SMTPUTF8 the address goes with them when its local part is ASCII
     * (RFC 6530 7.1), the sender's too; a UTF-8 local part is refused */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("x@b\xc3\xbc" "cher.example", "j\xc3\xb6rg@b\xc3\xbc" "cher.example");
    static const char ace[] = "xn--bcher-kva.example";
    R.t.from = (struct smtp_span){"s@B\xc3\xbc" "cher.example", 17};
    R.t.from_domain_ascii = (struct smtp_span){ace, sizeof(ace) - 1};
    for (int i = 0; i < 2; i++)
        R.rc[i].domain_ascii = (struct smtp_span){ace, sizeof(ace) - 1};
    go(0);
    OUT("MAIL FROM:<s@xn--bcher-kva.example>\r\n");
    IN("250 ok\r\n", 0);
    OUT("RCPT TO:<x@xn--bcher-kva.example>\r\n");
    want_out(&R.rc[1].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_NEED_SMTPUTF8, 553,
             "5.6.7");
    /* ... and as received to a server with SMTPUTF8 */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("x@b\xc3\xbc" "cher.example");
    R.t.from = (struct smtp_span){"s@B\xc3\xbc" "cher.example", 17};
    R.t.from_domain_ascii = (struct smtp_span){ace, sizeof(ace) - 1};
    R.rc[0].domain_ascii = (struct smtp_span){ace, sizeof(ace) - 1};
    go(0);
    OUT("MAIL FROM:<s@B\xc3\xbc" "cher.example> SMTPUTF8\r\n"
        "RCPT TO:<x@b\xc3\xbc" "cher.example>\r\nDATA\r\n");
    /* a sender with a UTF-8 local part refuses the message */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("x@b\xc3\xbc" "cher.example");
    R.t.from = (struct smtp_span){"j\xc3\xb6rg@x.example", 15};
    R.rc[0].domain_ascii = (struct smtp_span){ace, sizeof(ace) - 1};
    go(EV_DONE | EV_READY);
    nothing_out();
    want_out(&R.rc[0].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_NEED_SMTPUTF8, 553,
             "5.6.7");
    /* offered: SMTPUTF8 on MAIL, UTF-8 allowed on RCPT */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "j\xc3\xb6rg@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example> SMTPUTF8\r\nRCPT TO:<b@y.example>\r\n"
        "RCPT TO:<j\xc3\xb6rg@y.example>\r\nDATA\r\n");
    /* declared SMTPUTF8, all ASCII (envelope and a 7-bit body): without
     * SMTPUTF8 where the server has none (it bounced, 5.6.7) ... */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("b@y.example");
    R.t.params.seen = SMTP_PARAM_SMTPUTF8 | SMTP_PARAM_BODY;
    R.t.params.body = SMTP_BODY_7BIT;
    go(0);
    OUT("MAIL FROM:<a@x.example> BODY=7BIT\r\n");
    /* ... and with it where the server has it */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example");
    R.t.params.seen = SMTP_PARAM_SMTPUTF8 | SMTP_PARAM_BODY;
    R.t.params.body = SMTP_BODY_7BIT;
    go(0);
    OUT("MAIL FROM:<a@x.example> BODY=7BIT SMTPUTF8\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
    /* declared SMTPUTF8 with 8-bit content (UTF-8 headers, maybe): still
     * refused where the server has no SMTPUTF8 */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("b@y.example");
    R.t.params.seen = SMTP_PARAM_SMTPUTF8 | SMTP_PARAM_BODY;
    R.t.params.body = SMTP_BODY_8BITMIME;
    go(EV_DONE | EV_READY);
    nothing_out();
    want_out(&R.rc[0].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_NEED_SMTPUTF8, 553,
             "5.6.7");
    assert_non_null(strstr(R.rc[0].out.text, "8-bit content"));
    /* ... with a UTF-8 local part beside an ASCII recipient: the content
     * refuses both, and the ASCII one's text says so, not "UTF-8
     * envelope" (its DSN blamed an envelope that could have gone) */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("b@y.example", "j\xc3\xb6rg@y.example");
    R.t.params.seen = SMTP_PARAM_SMTPUTF8 | SMTP_PARAM_BODY;
    R.t.params.body = SMTP_BODY_8BITMIME;
    go(EV_DONE | EV_READY);
    nothing_out();
    for (int i = 0; i < 2; i++) {
        want_out(&R.rc[i].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_NEED_SMTPUTF8,
                 553, "5.6.7");
        assert_non_null(strstr(R.rc[i].out.text, "8-bit content"));
    }
}

static void
sc_size(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example");
    R.t.params.seen = SMTP_PARAM_SIZE;
    R.t.params.size = 1000001;
    go(EV_DONE | EV_READY);
    want_out(&R.rc[0].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_SIZE, 552,
             "5.3.4");
    R.t.params.size = 1000000;
    go(0);
    OUT("MAIL FROM:<a@x.example> SIZE=1000000\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
}

static void
sc_dsn_params(void)
{
    static const char envid[] = "QQ314159", otype[] = "rfc822", oaddr[] = "b@y.example";

    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example");
    R.t.params.seen = SMTP_PARAM_RET | SMTP_PARAM_ENVID;
    R.t.params.ret = SMTP_RET_HDRS;
    R.t.params.envid.ptr = envid;
    R.t.params.envid.len = sizeof envid - 1;
    R.rc[0].params.seen = SMTP_PARAM_NOTIFY | SMTP_PARAM_ORCPT;
    R.rc[0].params.notify = SMTP_NOTIFY_FAILURE | SMTP_NOTIFY_DELAY;
    R.rc[0].params.orcpt_type.ptr = otype;
    R.rc[0].params.orcpt_type.len = sizeof otype - 1;
    R.rc[0].params.orcpt_addr.ptr = oaddr;
    R.rc[0].params.orcpt_addr.len = sizeof oaddr - 1;
    go(0);
    OUT("MAIL FROM:<a@x.example> RET=HDRS ENVID=QQ314159\r\n"
        "RCPT TO:<b@y.example> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@y.example\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n354 go\r\n", EV_BODY);
    /* without DSN they are left out */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\n");
    IN("250 ok\r\n", 0);
    OUT("RCPT TO:<b@y.example>\r\n");
}

static void
sc_bad_addresses(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "bad address@y.example", "c@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", EV_BODY);
    want_out(&R.rc[1].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_ADDRESS, 553,
             "5.1.3");
    BODY("x\r\n", true, EV_END);
    OUT("x\r\n.\r\n");
    IN("250 ok\r\n", EV_DONE | EV_READY);
    counts(2, 0, 1);
    want_out(&R.rc[1].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_ADDRESS, 553,
             "5.1.3");
    /* a sender that cannot be written: nothing is sent */
    txn_(1, "a\r\nRSET@x.example", (const char *const[]){"b@y.example"});
    go(EV_DONE | EV_READY);
    nothing_out();
    want_out(&R.rc[0].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_ADDRESS, 553,
             "5.1.7");
    /* every recipient unwritable: MAIL went, nothing else; RSET next */
    TXN("x y@z", "\"unterminated@z");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\n");
    IN("250 ok\r\n", EV_DONE | EV_READY);
    for (int i = 0; i < 2; i++)
        want_out(&R.rc[i].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_ADDRESS, 553,
                 "5.1.3");
    want_out(&R.t.msg, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_MESSAGE, SMTP_REASON_NO_RCPT, 0, NULL);
    TXN("b@y.example");
    go(0);
    OUT("RSET\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
}

static void
sc_rcptmax(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO("250-mx\r\n250-PIPELINING\r\n250 LIMITS RCPTMAX=2\r\n");
    TXN("b@y.example", "c@y.example", "d@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", EV_BODY);
    BODY("x\r\n", true, EV_END);
    OUT("x\r\n.\r\n");
    IN("250 ok\r\n", EV_DONE | EV_READY);
    counts(2, 1, 0);
    want_out(&R.rc[2].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_RCPT_LIMIT, 452,
             "4.5.3");
}

/* ---- STARTTLS ---- */

#define EHLO_TLS "250-mx.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n"

static void
tls_offered(enum smtp_client_tls_policy p)
{
    start(p);
    IN("220 mx.example ESMTP\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    IN(EHLO_TLS, 0);
    OUT("STARTTLS\r\n");
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_STARTTLS);
}

static void
tls_up(enum smtp_client_tls_policy p, enum smtp_client_tls_result res)
{
    bool verified = true;

    tls_offered(p);
    IN("220 2.0.0 Ready to start TLS\r\n", EV_TLS);
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_TLS);
    want_ev(smtp_client_tls_done(&R.c, res), 0, "tls_done");
    OUT("EHLO " NAME "\r\n");
    /* what was offered before TLS is forgotten */
    assert_int_equal(smtp_client_caps(&R.c)->ext, 0);
    IN("250-mx.example\r\n250 8BITMIME\r\n", EV_READY);
    assert_true(smtp_client_tls(&R.c, &verified));
    assert_int_equal(verified, res == SMTP_CLIENT_TLS_VERIFIED);
    assert_int_equal(smtp_client_caps(&R.c)->ext, SMTP_EXT_8BITMIME);
    /* no PIPELINING after TLS: one command at a time */
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\n");
}

static void
sc_tls_optional(void)
{
    tls_up(SMTP_CLIENT_TLS_OPTIONAL, SMTP_CLIENT_TLS_UNVERIFIED);
    tls_up(SMTP_CLIENT_TLS_REQUIRED, SMTP_CLIENT_TLS_UNVERIFIED);
    tls_up(SMTP_CLIENT_TLS_VERIFY, SMTP_CLIENT_TLS_VERIFIED);
    /* not offered: plaintext */
    start(SMTP_CLIENT_TLS_OPTIONAL);
    HELLO(EHLO_FULL);
    assert_false(smtp_client_tls(&R.c, NULL));
    /* refused: plaintext on the same connection, capabilities kept */
    tls_offered(SMTP_CLIENT_TLS_OPTIONAL);
    IN("454 4.7.0 TLS not available\r\n", EV_READY);
    assert_false(smtp_client_tls(&R.c, NULL));
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
    /* policy off: never STARTTLS */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_TLS);
}

static void
sc_tls_required_fails(void)
{
    /* not offered */
    for (int p = SMTP_CLIENT_TLS_REQUIRED; p <= SMTP_CLIENT_TLS_VERIFY; p++) {
        start(p);
        IN("220 mx\r\n", 0);
        OUT("EHLO " NAME "\r\n");
        IN(EHLO_FULL, EV_CLOSE);
        OUT("QUIT\r\n");
        want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_UNAVAILABLE, 0,
                 "4.7.4");
        no_reuse();
    }
    /* the policy that asked for TLS is named in the text (DANE) */
    {
        struct smtp_client_opts o = {.name = NAME, .tls = SMTP_CLIENT_TLS_VERIFY,
                                     .tls_label = "DANE", .trace = on_trace};
        start_opts(&o);
        IN("220 mx\r\n", 0);
        OUT("EHLO " NAME "\r\n");
        IN(EHLO_FULL, EV_CLOSE);
        OUT("QUIT\r\n");
        assert_string_equal(smtp_client_session(&R.c)->text,
                            "DANE: TLS required by policy but STARTTLS not offered");
    }
    /* EHLO refused: HELO could not do TLS either */
    start(SMTP_CLIENT_TLS_REQUIRED);
    IN("220 mx\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    IN("502 5.5.2 no\r\n", EV_CLOSE);
    OUT("QUIT\r\n");
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_UNAVAILABLE, 0, "4.7.4");
    /* refused */
    tls_offered(SMTP_CLIENT_TLS_REQUIRED);
    IN("454 4.7.0 TLS not available due to temporary reason\r\n", EV_CLOSE);
    OUT("QUIT\r\n");
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_REFUSED, 454, "4.7.0");
    tls_offered(SMTP_CLIENT_TLS_VERIFY);
    IN("502 5.5.1 no\r\n", EV_CLOSE);
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_REFUSED, 502, "5.5.1");
    /* a senseless reply to STARTTLS */
    tls_offered(SMTP_CLIENT_TLS_OPTIONAL);
    IN("250 ok\r\n", EV_CLOSE);
    nothing_out();
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_PROTOCOL, 0, "4.5.0");
    /* handshake failed: no QUIT (the connection is unusable) */
    for (int p = SMTP_CLIENT_TLS_OPTIONAL; p <= SMTP_CLIENT_TLS_VERIFY; p++) {
        tls_offered(p);
        IN("220 go\r\n", EV_TLS);
        want_ev(smtp_client_tls_done(&R.c, SMTP_CLIENT_TLS_FAILED), EV_CLOSE, "tls_done");
        nothing_out();
        want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_FAILED, 0, "4.7.5");
        assert_string_equal(smtp_client_session(&R.c)->text, "TLS handshake failed");
        no_reuse();
        /* with the TLS layer's words, which the text carries */
        tls_offered(p);
        IN("220 go\r\n", EV_TLS);
        want_ev(smtp_client_tls_failed(&R.c, "tlsv1 alert unknown ca"), EV_CLOSE, "tls_failed");
        nothing_out();
        want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION,
                 SMTP_REASON_TLS_FAILED, 0, "4.7.5");
        assert_string_equal(smtp_client_session(&R.c)->text,
                            "TLS handshake failed: tlsv1 alert unknown ca");
        no_reuse();
        assert_int_equal(smtp_client_tls_failed(&R.c, "again"), SMTP_CLIENT_E_STATE);
    }
    /* not verified under VERIFY */
    tls_offered(SMTP_CLIENT_TLS_VERIFY);
    IN("220 go\r\n", EV_TLS);
    want_ev(smtp_client_tls_done(&R.c, SMTP_CLIENT_TLS_UNVERIFIED), EV_CLOSE, "tls_done");
    OUT("QUIT\r\n");
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS_UNVERIFIED, 0, "4.7.5");
    /* implicit TLS: no STARTTLS, whatever the policy */
    {
        struct smtp_client_opts o = {
            .name = NAME, .tls = SMTP_CLIENT_TLS_REQUIRED, .tls_active = true};

        start_opts(&o);
        HELLO(EHLO_TLS);
        assert_true(smtp_client_tls(&R.c, NULL));
    }
}

/* Not run split: where the input is cut decides which of the two ways
 * the injection is caught. */
static void
sc_tls_injection(void)
{
    tls_offered(SMTP_CLIENT_TLS_OPTIONAL);
    IN("220 go\r\n250-injected\r\n250 PIPELINING\r\n", EV_CLOSE);
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION,
             SMTP_REASON_PROTOCOL, 0, "4.5.0");
    no_reuse();
    /* the 220 alone is fine; bytes before the handshake are not */
    tls_offered(SMTP_CLIENT_TLS_OPTIONAL);
    IN("220 go\r\n", EV_TLS);
    IN("250 x\r\n", EV_CLOSE);
    assert_int_equal(smtp_client_tls_done(&R.c, SMTP_CLIENT_TLS_VERIFIED), SMTP_CLIENT_E_STATE);
    /* *used ends at the 220 */
    {
        size_t used = 0;
        int ev;

        tls_offered(SMTP_CLIENT_TLS_OPTIONAL);
        ev = smtp_client_input(&R.c, L("220 go\r\n"), &used);
        assert_int_equal(mask(ev), EV_TLS);
        assert_int_equal(used, 8);
    }
}

/* ---- 421, EOF, timeouts ---- */

static void
session_421(unsigned code_stage)
{
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_REPLY,
             421, NULL);
    assert_int_equal(smtp_client_session(&R.c)->stage, code_stage);
    nothing_out();
    no_reuse();
}

static void
all_temp(enum smtp_reason reason, unsigned code)
{
    for (unsigned i = 0; i < R.t.nrcpt; i++)
        want_out(&R.rc[i].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, reason, code, NULL);
    assert_int_equal(R.t.msg.status, SMTP_STATUS_TEMPFAIL);
    assert_int_equal(R.t.delivered, 0);
}

static void
sc_421(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    IN("421 4.3.2 busy\r\n", EV_CLOSE);
    session_421(SMTP_CLIENT_S_GREETING);

    start(SMTP_CLIENT_TLS_OFF);
    IN("220 mx\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    IN("421 4.3.2 busy\r\n", EV_CLOSE);
    session_421(SMTP_CLIENT_S_EHLO);

    tls_offered(SMTP_CLIENT_TLS_REQUIRED);
    IN("421 4.3.2 busy\r\n", EV_CLOSE);
    session_421(SMTP_CLIENT_S_STARTTLS);

    /* idle, unasked: the server's idle timeout */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    IN("421 4.4.2 idle too long\r\n", EV_CLOSE);
    session_421(SMTP_CLIENT_S_IDLE);

    /* MAIL */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "c@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    IN("421 4.7.0 go away\r\n", EV_DONE | EV_CLOSE);
    all_temp(SMTP_REASON_REPLY, 421);
    session_421(SMTP_CLIENT_S_MAIL);

    /* RCPT: accepted and unanswered alike; a refusal before it stands */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "c@y.example", "d@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\n"
        "RCPT TO:<d@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n550 5.1.1 no\r\n421 4.7.0 bye\r\n", EV_DONE | EV_CLOSE);
    want_out(&R.rc[0].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_REPLY, 421,
             "4.7.0");
    want_out(&R.rc[1].out, SMTP_STATUS_PERMFAIL, SMTP_SCOPE_RCPT, SMTP_REASON_REPLY, 550, "5.1.1");
    want_out(&R.rc[2].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_REPLY, 421,
             "4.7.0");
    counts(0, 2, 1);
    session_421(SMTP_CLIENT_S_RCPT);

    /* DATA */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "c@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n250 ok\r\n421 4.3.0 bye\r\n", EV_DONE | EV_CLOSE);
    all_temp(SMTP_REASON_REPLY, 421);
    session_421(SMTP_CLIENT_S_DATA);

    /* while the body goes out */
    to_body();
    IN("421 4.3.0 bye\r\n", EV_DONE | EV_CLOSE);
    all_temp(SMTP_REASON_REPLY, 421);
    session_421(SMTP_CLIENT_S_BODY);
    assert_int_equal(smtp_client_body(&R.c, L("x"), true, &(size_t){0}), SMTP_CLIENT_E_STATE);

    /* after the final dot: never delivered */
    to_dot();
    IN("421 4.3.0 bye\r\n", EV_DONE | EV_CLOSE);
    all_temp(SMTP_REASON_REPLY, 421);
    session_421(SMTP_CLIENT_S_DOT);
}

static void
sc_greeting_refused(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    IN("554 5.7.1 go away\r\n", EV_CLOSE);
    OUT("QUIT\r\n");
    want_out(smtp_client_session(&R.c), SMTP_STATUS_PERMFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_REPLY,
             554, "5.7.1");
    no_reuse();
    start(SMTP_CLIENT_TLS_OFF);
    IN("450 later\r\n", EV_CLOSE);
    OUT("QUIT\r\n");
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_REPLY,
             450, "4.0.0");
    /* EHLO 4xx: temporary, no HELO */
    start(SMTP_CLIENT_TLS_OFF);
    IN("220 mx\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    IN("451 4.3.0 later\r\n", EV_CLOSE);
    OUT("QUIT\r\n");
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_REPLY,
             451, "4.3.0");
    /* HELO refused too */
    start(SMTP_CLIENT_TLS_OFF);
    IN("220 mx\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    IN("500 no\r\n", 0);
    OUT("HELO " NAME "\r\n");
    IN("550 no\r\n", EV_CLOSE);
    OUT("QUIT\r\n");
    want_out(smtp_client_session(&R.c), SMTP_STATUS_PERMFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_REPLY,
             550, "5.0.0");
    /* a greeting that is not 220 */
    start(SMTP_CLIENT_TLS_OFF);
    IN("250 hi\r\n", EV_CLOSE);
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION,
             SMTP_REASON_PROTOCOL, 0, NULL);
}

static void
sc_eof(void)
{
    /* after the final dot, before its reply: retried, never delivered */
    to_dot();
    want_ev(smtp_client_eof(&R.c), EV_DONE | EV_CLOSE, "eof");
    all_temp(SMTP_REASON_EOF, 0);
    assert_int_equal(R.rc[0].out.stage, SMTP_CLIENT_S_DOT);
    want_out(&R.rc[0].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_EOF, 0, "4.4.2");
    no_reuse();
    assert_int_equal(smtp_client_eof(&R.c), 0);
    assert_int_equal(smtp_client_timeout(&R.c), 0);
    assert_int_equal(smtp_client_quit(&R.c), 0);
    /* idle: the server hung up */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    want_ev(smtp_client_eof(&R.c), EV_CLOSE, "eof");
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_EOF,
             0, "4.4.2");
    /* half a reply then EOF */
    to_body();
    BODY("x", true, EV_END);
    OUT("x\r\n.\r\n");
    IN("250 2.0.0 O", 0);
    want_ev(smtp_client_eof(&R.c), EV_DONE | EV_CLOSE, "eof");
    all_temp(SMTP_REASON_EOF, 0);
}

/* The TLS layer broke the session after its handshake: the outcomes are
 * a TLS failure with its words, not a lost connection. */
static void
sc_tls_error(void)
{
    /* after the final dot, before its reply: retried, never delivered */
    to_dot();
    want_ev(smtp_client_tls_error(&R.c, "tlsv1 alert decrypt error"), EV_DONE | EV_CLOSE,
            "tls_error");
    all_temp(SMTP_REASON_TLS, 0);
    want_out(&R.rc[0].out, SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS, 0, "4.4.2");
    assert_int_equal(R.rc[0].out.stage, SMTP_CLIENT_S_DOT);
    assert_string_equal(R.rc[0].out.text, "TLS failed in state dot: tlsv1 alert decrypt error");
    assert_string_equal(R.t.msg.text, R.rc[0].out.text);
    assert_string_equal(smtp_reason_str(SMTP_REASON_TLS), "tls");
    no_reuse();
    assert_int_equal(smtp_client_tls_error(&R.c, "again"), 0);
    assert_int_equal(smtp_client_eof(&R.c), 0);
    /* idle, no words from the TLS layer */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    want_ev(smtp_client_tls_error(&R.c, NULL), EV_CLOSE, "tls_error");
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, SMTP_REASON_TLS,
             0, "4.4.2");
    assert_string_equal(smtp_client_session(&R.c)->text, "TLS failed in state idle");
    no_reuse();
}

static void
timeout_in(enum smtp_client_state s, bool txn)
{
    assert_int_equal(smtp_client_state(&R.c), s);
    want_ev(smtp_client_timeout(&R.c), txn ? EV_DONE | EV_CLOSE : EV_CLOSE, "timeout");
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION,
             SMTP_REASON_TIMEOUT, 0, "4.4.2");
    assert_int_equal(smtp_client_session(&R.c)->stage, s);
    if (txn)
        all_temp(SMTP_REASON_TIMEOUT, 0);
    nothing_out();
    no_reuse();
}

static void
sc_timeouts(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    timeout_in(SMTP_CLIENT_S_GREETING, false);

    start(SMTP_CLIENT_TLS_OFF);
    IN("220 mx\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    timeout_in(SMTP_CLIENT_S_EHLO, false);

    start(SMTP_CLIENT_TLS_OFF);
    IN("220 mx\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    IN("500 no\r\n", 0);
    OUT("HELO " NAME "\r\n");
    timeout_in(SMTP_CLIENT_S_HELO, false);

    tls_offered(SMTP_CLIENT_TLS_OPTIONAL);
    timeout_in(SMTP_CLIENT_S_STARTTLS, false);

    tls_offered(SMTP_CLIENT_TLS_OPTIONAL);
    IN("220 go\r\n", EV_TLS);
    timeout_in(SMTP_CLIENT_S_TLS, false);

    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "c@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    timeout_in(SMTP_CLIENT_S_MAIL, true);

    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example", "c@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n", 0);
    timeout_in(SMTP_CLIENT_S_RCPT, true);

    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n", 0);
    timeout_in(SMTP_CLIENT_S_DATA, true);

    to_body();
    timeout_in(SMTP_CLIENT_S_BODY, true);

    to_dot();
    timeout_in(SMTP_CLIENT_S_DOT, true);

    /* RSET */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_PLAIN);
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\n");
    IN("250 ok\r\n", 0);
    OUT("RCPT TO:<b@y.example>\r\n");
    IN("550 no\r\n", EV_DONE | EV_READY);
    go(0);
    OUT("RSET\r\n");
    timeout_in(SMTP_CLIENT_S_RSET, true);

    /* idle: a quit */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    want_ev(smtp_client_timeout(&R.c), EV_CLOSE, "timeout");
    OUT("QUIT\r\n");
}

/* ---- hostile servers ---- */

static void
no_delivery(enum smtp_reason reason)
{
    all_temp(reason, 0);
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION, reason, 0,
             "4.5.0");
    no_reuse();
}

static void
sc_unsolicited(void)
{
    /* one reply more than the commands pipelined */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n", EV_DONE | EV_CLOSE);
    no_delivery(SMTP_REASON_PROTOCOL);
    /* idle */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    IN("250 hello again\r\n", EV_CLOSE);
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION,
             SMTP_REASON_PROTOCOL, 0, "4.5.0");
    /* after the final dot's reply: what was delivered stays delivered */
    to_dot();
    IN("250 ok\r\n250 ok\r\n", EV_DONE | EV_CLOSE);
    counts(2, 0, 0);
    want_out(smtp_client_session(&R.c), SMTP_STATUS_TEMPFAIL, SMTP_SCOPE_SESSION,
             SMTP_REASON_PROTOCOL, 0, "4.5.0");
    no_reuse();
    /* before the EHLO was even answered */
    start(SMTP_CLIENT_TLS_OFF);
    IN("220 mx\r\n220 mx\r\n250 x\r\n", EV_CLOSE);
}

static void
sc_senseless(void)
{
    static const struct {
        const char *reply;
        size_t len;
    } r[] = {
        {L("354 go\r\n")},                     /* to MAIL */
        {L("250 ok\r\n334 what\r\n")},         /* to RCPT */
        {L("250 ok\r\n250 ok\r\n250 ok\r\n")}, /* 250 to DATA */
    };

    for (size_t i = 0; i < sizeof r / sizeof r[0]; i++) {
        start(SMTP_CLIENT_TLS_OFF);
        HELLO(EHLO_FULL);
        TXN("b@y.example");
        go(0);
        OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
        in_(r[i].reply, r[i].len, EV_DONE | EV_CLOSE);
        no_delivery(SMTP_REASON_PROTOCOL);
    }
    /* 354 to the final dot */
    to_dot();
    IN("354 again\r\n", EV_DONE | EV_CLOSE);
    no_delivery(SMTP_REASON_PROTOCOL);
    /* EHLO answered 220 */
    start(SMTP_CLIENT_TLS_OFF);
    IN("220 mx\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    IN("220 mx\r\n", EV_CLOSE);
}

/* A senseless reply is quoted in the protocol error it causes (code and
 * first words, lines joined, long text cut with "..."): the log shows
 * what the server said. */
static void
want_said(const char *said)
{
    const struct smtp_outcome *o = smtp_client_session(&R.c);

    if (strstr(o->text, said) == NULL)
        fail_msg("outcome \"%s\" does not quote \"%s\" (mode %d split %zu)", o->text, said,
                 R.mode, R.split);
}

static void
sc_quoted(void)
{
    static char long_reply[400];
    size_t n;

    /* a second greeting after the EHLO */
    start(SMTP_CLIENT_TLS_OFF);
    IN("220 mx\r\n", 0);
    OUT("EHLO " NAME "\r\n");
    IN("220 mx again\r\n", EV_CLOSE);
    want_said("EHLO reply not 250 (server said: 220 mx again)");
    /* a reply to nothing, on an idle session */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    IN("250-2.1.0 one\r\n250 2.1.0 two\r\n", EV_CLOSE);
    want_said("unsolicited reply (server said: 250 2.1.0 one 2.1.0 two)");
    /* 250 to DATA, then a long text cut short */
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
    memcpy(long_reply, "250 ok\r\n250 ok\r\n250 ", 20);
    memset(long_reply + 20, 'w', 300);
    memcpy(long_reply + 320, "\r\n", 2);
    n = 322;
    in_(long_reply, n, EV_DONE | EV_CLOSE);
    no_delivery(SMTP_REASON_PROTOCOL);
    want_said("DATA reply not 354, 4xx or 5xx (server said: 250 wwww");
    want_said("www...)");
    assert_true(strlen(smtp_client_session(&R.c)->text) < 250);
}

static void
sc_malformed(void)
{
    static const struct {
        const char *reply;
        size_t len;
    } r[] = {
        {L("25O ok\r\n")},   {L("250 ok\n")},     {L("250-a\r\n550 b\r\n")},
        {L("250 o\rk\r\n")}, {L("250 o\0k\r\n")}, {L("2500\r\n")},
    };

    for (size_t i = 0; i < sizeof r / sizeof r[0]; i++) {
        to_dot();
        in_(r[i].reply, r[i].len, EV_DONE | EV_CLOSE);
        no_delivery(SMTP_REASON_PROTOCOL);
    }
}

static char big[1 << 20];

/* Not run split: the input is large. */
static void
sc_huge(void)
{
    size_t n;

    /* a 1 MB line */
    to_dot();
    memcpy(big, "250 ", 4);
    memset(big + 4, 'a', sizeof big - 6);
    memcpy(big + sizeof big - 2, "\r\n", 2);
    in_(big, sizeof big, EV_DONE | EV_CLOSE);
    no_delivery(SMTP_REASON_PROTOCOL);
    /* endless continuation lines */
    to_dot();
    for (n = 0; n + 7 <= sizeof big; n += 7)
        memcpy(big + n, "250-x\r\n", 7);
    in_(big, n, EV_DONE | EV_CLOSE);
    no_delivery(SMTP_REASON_PROTOCOL);
    /* long lines that stay in bounds until the text is too much */
    to_dot();
    for (n = 0; n + 500 <= sizeof big; n += 500) {
        memcpy(big + n, "250-", 4);
        memset(big + n + 4, 'b', 494);
        memcpy(big + n + 498, "\r\n", 2);
    }
    in_(big, n, EV_DONE | EV_CLOSE);
    no_delivery(SMTP_REASON_PROTOCOL);
}

/* ---- output bounds, body, misc ---- */

static void
sc_many_rcpts(void)
{
    struct smtp_client_opts o = {.name = NAME, .max_rcpt = MAXR};
    size_t n, total = 0, want_len = 0;
    const char *p;
    static char want[MAXR * 300 + 4096], got[sizeof want];

    start_opts(&o);
    HELLO(EHLO_FULL);
    memset(&R.t, 0, sizeof R.t);
    R.t.from.ptr = "a@x.example";
    R.t.from.len = 11;
    want_len = (size_t)snprintf(want, sizeof want, "MAIL FROM:<a@x.example>\r\n");
    for (unsigned i = 0; i < MAXR; i++) {
        /* 222 octets each: the pipeline is several outputs long */
        snprintf(R.addr[i], sizeof R.addr[i], "%03u%057d@%050d.%050d.%050d.example", i, 0, 0, 0, 0);
        memset(&R.rc[i], 0, sizeof R.rc[i]);
        R.rc[i].addr.ptr = R.addr[i];
        R.rc[i].addr.len = strlen(R.addr[i]);
        want_len += (size_t)snprintf(want + want_len, sizeof want - want_len, "RCPT TO:<%s>\r\n",
                                     R.addr[i]);
    }
    want_len += (size_t)snprintf(want + want_len, sizeof want - want_len, "DATA\r\n");
    R.t.rcpt = R.rc;
    R.t.nrcpt = MAXR;
    go(0);
    /* the output stays bounded and the FIFO too: send, answer, repeat */
    for (int rounds = 0; rounds < 1000 && smtp_client_state(&R.c) != SMTP_CLIENT_S_BODY; rounds++) {
        unsigned pending = R.c.pipe_len;

        p = smtp_client_output(&R.c, &n);
        assert_true(n <= SMTP_CLIENT_OUT_CAP);
        assert_true(pending <= SMTP_CLIENT_PIPE_MAX);
        assert_true(total + n <= sizeof got);
        memcpy(got + total, p, n);
        total += n;
        want_ev(smtp_client_sent(&R.c, n), 0, "sent");
        for (unsigned i = 0; i < pending; i++) {
            bool data = R.c.u.pipe[R.c.pipe_head].state == SMTP_CLIENT_S_DATA;
            size_t used;
            int ev = smtp_client_input(&R.c, data ? "354 go\r\n" : "250 ok\r\n", 8, &used);

            assert_true(ev >= 0);
            assert_false(ev & EV_CLOSE);
        }
    }
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_BODY);
    assert_int_equal(total, want_len);
    assert_memory_equal(got, want, want_len);
    BODY("x\r\n", true, EV_END);
    OUT("x\r\n.\r\n");
    IN("250 ok\r\n", EV_DONE | EV_READY);
    counts(MAXR, 0, 0);
}

static void
sc_big_body(void)
{
    size_t off = 0, total = 0, n, used;
    bool ended = false, in_body;
    int guard = 0;

    to_body();
    for (size_t i = 0; i < sizeof big; i++)
        big[i] = (i % 80 == 78) ? '\r' : (i % 80 == 79) ? '\n' : (i % 80 == 0) ? '.' : 'x';
    while (!ended && guard++ < 10000) {
        int ev = smtp_client_body(&R.c, big + off, sizeof big - off, true, &used);

        assert_true(ev >= 0);
        off += used;
        ended = ev & EV_END;
        (void)smtp_client_output(&R.c, &n);
        assert_true(n <= SMTP_CLIENT_OUT_CAP);
        total += n;
        in_body = smtp_client_state(&R.c) == SMTP_CLIENT_S_BODY;
        ev = smtp_client_sent(&R.c, n);
        assert_true(ev >= 0);
        assert_true(!in_body || n == 0 || (ev & EV_TIMER));
        ended = ended || (ev & EV_END);
        if (ended) {
            (void)smtp_client_output(&R.c, &n);
            total += n;
            smtp_client_sent(&R.c, n);
        }
    }
    assert_true(ended);
    assert_int_equal(off, sizeof big);
    /* every line gained a dot; the last one has no CRLF: CRLF . CRLF */
    assert_int_equal(total, sizeof big + (sizeof big + 79) / 80 + 5);
    IN("250 ok\r\n", EV_DONE | EV_READY);
    counts(2, 0, 0);
}

static void
sc_rset_refused(void)
{
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n550 no\r\n554 no valid recipients\r\n", EV_DONE | EV_READY);
    TXN("c@y.example", "d@y.example");
    go(0);
    OUT("RSET\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<c@y.example>\r\nRCPT TO:<d@y.example>\r\n"
        "DATA\r\n");
    /* what was pipelined after it would land who knows where */
    IN("500 5.5.1 no RSET here\r\n", EV_DONE | EV_CLOSE);
    all_temp(SMTP_REASON_REPLY, 500);
    no_reuse();
}

/* Replies may be read before the send of their commands completed: the
 * output is still full when the next transaction starts, and its MAIL
 * waits for room. */
static void
sc_output_full(void)
{
    static char msg[SMTP_CLIENT_OUT_CAP - 10];
    size_t n;

    memset(msg, 'm', sizeof msg);
    memcpy(msg + sizeof msg - 2, "\r\n", 2);
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    TXN("b@y.example");
    go(0);
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n354 go\r\n", EV_BODY);
    body(msg, sizeof msg, true, EV_END);
    IN("250 ok\r\n", EV_DONE | EV_READY);
    (void)smtp_client_output(&R.c, &n);
    assert_int_equal(n, sizeof msg + 3);
    TXN("c@y.example");
    go(0);
    assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_MAIL);
    (void)smtp_client_output(&R.c, &n);
    assert_int_equal(n, sizeof msg + 3);
    /* the MAIL goes once the output drains */
    want_ev(smtp_client_sent(&R.c, n), 0, "sent");
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    IN("250 ok\r\n250 ok\r\n354 go\r\n", EV_BODY);
}

static void
sc_quit_abort(void)
{
    to_body();
    want_ev(smtp_client_quit(&R.c), EV_DONE | EV_CLOSE, "quit");
    nothing_out();
    all_temp(SMTP_REASON_QUIT, 0);
    no_reuse();
}

static void
sc_api(void)
{
    struct smtp_client_opts o = {.name = NAME};
    size_t used;

    o.name = "";
    assert_int_equal(smtp_client_init(&R.c, &o), SMTP_CLIENT_E_ARG);
    o.name = "a b";
    assert_int_equal(smtp_client_init(&R.c, &o), SMTP_CLIENT_E_ARG);
    o.name = "a\r\nRSET";
    assert_int_equal(smtp_client_init(&R.c, &o), SMTP_CLIENT_E_ARG);
    o.name = NULL;
    assert_int_equal(smtp_client_init(&R.c, &o), SMTP_CLIENT_E_ARG);
    o.name = "[192.0.2.1]";
    o.tls = (enum smtp_client_tls_policy)9;
    assert_int_equal(smtp_client_init(&R.c, &o), SMTP_CLIENT_E_ARG);
    o.tls = SMTP_CLIENT_TLS_OFF;
    /* A recipient index lives in 16 bits of the pipelining FIFO. */
    o.max_rcpt = SMTP_CLIENT_RCPT_MAX + 1;
    assert_int_equal(smtp_client_init(&R.c, &o), SMTP_CLIENT_E_ARG);
    o.max_rcpt = SMTP_CLIENT_RCPT_MAX;
    assert_int_equal(smtp_client_init(&R.c, &o), 0);
    o.max_rcpt = 0;
    assert_int_equal(smtp_client_init(&R.c, &o), 0);
    /* No buffer lent: nothing may run. */
    assert_int_equal(smtp_client_sent(&R.c, 0), SMTP_CLIENT_E_STATE);
    assert_int_equal(smtp_client_input(&R.c, L("220 x\r\n"), &used), SMTP_CLIENT_E_STATE);
    assert_int_equal(smtp_client_attach(&R.c, &R.buf), 0);
    assert_int_equal(smtp_client_attach(&R.c, &R.buf), SMTP_CLIENT_E_STATE);

    TXN("b@y.example");
    assert_int_equal(smtp_client_txn(&R.c, &R.t), SMTP_CLIENT_E_STATE);
    assert_int_equal(smtp_client_body(&R.c, L("x"), true, &used), SMTP_CLIENT_E_STATE);
    assert_int_equal(smtp_client_tls_done(&R.c, SMTP_CLIENT_TLS_VERIFIED), SMTP_CLIENT_E_STATE);
    assert_int_equal(smtp_client_sent(&R.c, 1), SMTP_CLIENT_E_ARG);
    start(SMTP_CLIENT_TLS_OFF);
    HELLO(EHLO_FULL);
    R.t.nrcpt = 0;
    assert_int_equal(smtp_client_txn(&R.c, &R.t), SMTP_CLIENT_E_ARG);
    R.t.nrcpt = SMTP_CLIENT_RCPT_DEFAULT + 1;
    assert_int_equal(smtp_client_txn(&R.c, &R.t), SMTP_CLIENT_E_ARG);
    TXN("b@y.example");
    R.t.params.seen = SMTP_PARAM_BODY;
    R.t.params.body = SMTP_BODY_BINARYMIME;
    assert_int_equal(smtp_client_txn(&R.c, &R.t), SMTP_CLIENT_E_ARG);
    R.t.params.seen = 0;
    go(0);
    assert_int_equal(smtp_client_txn(&R.c, &R.t), SMTP_CLIENT_E_STATE);
    assert_string_equal(smtp_client_state_str(SMTP_CLIENT_S_DOT), "dot");
    assert_string_equal(smtp_client_state_str((enum smtp_client_state)99), "?");
    assert_string_equal(smtp_reason_str(SMTP_REASON_QUIT), "quit");
    assert_string_equal(smtp_client_strerror(SMTP_CLIENT_E_STATE),
                        "not allowed in this session state");
}

/* Deadlines: the table, an override, EV_TIMER at each new wait. */
static void
sc_deadlines(void)
{
    static uint32_t mine[SMTP_CLIENT_S_COUNT];
    struct smtp_client_opts o = {.name = NAME, .timeout_ms = mine, .trace = on_trace};
    size_t used;
    int ev;

    assert_int_equal(smtp_client_default_timeout_ms[SMTP_CLIENT_S_DATA], 120000);
    assert_int_equal(smtp_client_default_timeout_ms[SMTP_CLIENT_S_BODY], 180000);
    assert_int_equal(smtp_client_default_timeout_ms[SMTP_CLIENT_S_DOT], 600000);
    assert_int_equal(smtp_client_default_timeout_ms[SMTP_CLIENT_S_IDLE], 0);
    memcpy(mine, smtp_client_default_timeout_ms, sizeof mine);
    mine[SMTP_CLIENT_S_GREETING] = 1000;
    mine[SMTP_CLIENT_S_RCPT] = 7;
    assert_int_equal(smtp_client_init(&R.c, &o), 0);
    assert_int_equal(smtp_client_attach(&R.c, &R.buf), 0);
    R.traced = 0;
    assert_int_equal(smtp_client_deadline_ms(&R.c), 1000);
    ev = smtp_client_input(&R.c, L("220 mx\r\n"), &used);
    assert_true(ev & EV_TIMER);
    assert_int_equal(R.traced, 1);
    assert_int_equal(R.last_from, SMTP_CLIENT_S_GREETING);
    assert_int_equal(R.last_to, SMTP_CLIENT_S_EHLO);
    assert_int_equal(smtp_client_deadline_ms(&R.c), 300000);
    OUT("EHLO " NAME "\r\n");
    ev = smtp_client_input(&R.c, L(EHLO_FULL), &used);
    assert_true(ev & EV_TIMER);
    assert_int_equal(smtp_client_deadline_ms(&R.c), 0);
    /* half a reply restarts nothing */
    TXN("b@y.example", "c@y.example");
    go(0);
    /* a pipelined write not yet sent keeps the buffer */
    assert_null(smtp_client_detach(&R.c));
    OUT("MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n");
    assert_ptr_equal(smtp_client_detach(&R.c), &R.buf);
    assert_null(smtp_client_detach(&R.c));
    assert_int_equal(smtp_client_attach(&R.c, &R.buf2), 0);
    ev = smtp_client_input(&R.c, L("250 o"), &used);
    assert_int_equal(ev, 0);
    /* and so does half a reply */
    assert_null(smtp_client_detach(&R.c));
    ev = smtp_client_input(&R.c, L("k\r\n"), &used);
    assert_true(ev & EV_TIMER);
    assert_int_equal(smtp_client_deadline_ms(&R.c), 7);
    assert_ptr_equal(smtp_client_detach(&R.c), &R.buf2);
    assert_int_equal(smtp_client_attach(&R.c, &R.buf), 0);
    /* the next RCPT reply restarts it, with no state change traced */
    {
        unsigned before = R.traced;

        ev = smtp_client_input(&R.c, L("250 ok\r\n"), &used);
        assert_true(ev & EV_TIMER);
        assert_int_equal(R.traced, before);
        assert_int_equal(smtp_client_state(&R.c), SMTP_CLIENT_S_RCPT);
    }
    assert_true(smtp_client_transitions(&R.c) == R.traced);
}

/* ---- every split ---- */

typedef void (*script_fn)(void);

static void
run_all(script_fn f, bool split)
{
    size_t longest;

    memset(&R.c, 0, sizeof R.c);
    memset(&R.t, 0, sizeof R.t);
    R.mode = WHOLE;
    R.max_in = 0;
    f();
    if (!split)
        return;
    longest = R.max_in;
    for (size_t k = 1; k < longest; k++) {
        R.mode = SPLIT;
        R.split = k;
        f();
    }
    R.mode = BYTES;
    f();
}

#define SCRIPT(name, split)                                                                        \
    static void test_##name(void **state)                                                          \
    {                                                                                              \
        (void)state;                                                                               \
        run_all(sc_##name, split);                                                                 \
    }

SCRIPT(happy_pipelined, true)
SCRIPT(happy_no_pipelining, true)
SCRIPT(pipelining_refused_by_opts, true)
SCRIPT(mixed_rcpts, true)
SCRIPT(all_refused_pipelined, true)
SCRIPT(all_refused_no_pipelining, true)
SCRIPT(mail_refused, true)
SCRIPT(mail_refused_no_pipelining, true)
SCRIPT(data_refused, true)
SCRIPT(dot_refused, true)
SCRIPT(354_without_rcpt, true)
SCRIPT(reuse, true)
SCRIPT(helo_fallback, true)
SCRIPT(smtputf8, true)
SCRIPT(size, true)
SCRIPT(dsn_params, true)
SCRIPT(bad_addresses, true)
SCRIPT(rcptmax, true)
SCRIPT(tls_optional, true)
SCRIPT(tls_required_fails, true)
SCRIPT(tls_injection, false)
SCRIPT(421, true)
SCRIPT(greeting_refused, true)
SCRIPT(eof, true)
SCRIPT(tls_error, true)
SCRIPT(timeouts, true)
SCRIPT(unsolicited, true)
SCRIPT(senseless, true)
SCRIPT(quoted, true)
SCRIPT(malformed, true)
SCRIPT(huge, false)
SCRIPT(many_rcpts, false)
SCRIPT(big_body, false)
SCRIPT(rset_refused, true)
SCRIPT(output_full, true)
SCRIPT(quit_abort, true)
SCRIPT(api, false)
SCRIPT(deadlines, false)

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_happy_pipelined),
        cmocka_unit_test(test_happy_no_pipelining),
        cmocka_unit_test(test_pipelining_refused_by_opts),
        cmocka_unit_test(test_mixed_rcpts),
        cmocka_unit_test(test_all_refused_pipelined),
        cmocka_unit_test(test_all_refused_no_pipelining),
        cmocka_unit_test(test_mail_refused),
        cmocka_unit_test(test_mail_refused_no_pipelining),
        cmocka_unit_test(test_data_refused),
        cmocka_unit_test(test_dot_refused),
        cmocka_unit_test(test_354_without_rcpt),
        cmocka_unit_test(test_reuse),
        cmocka_unit_test(test_helo_fallback),
        cmocka_unit_test(test_smtputf8),
        cmocka_unit_test(test_size),
        cmocka_unit_test(test_dsn_params),
        cmocka_unit_test(test_bad_addresses),
        cmocka_unit_test(test_rcptmax),
        cmocka_unit_test(test_tls_optional),
        cmocka_unit_test(test_tls_required_fails),
        cmocka_unit_test(test_tls_injection),
        cmocka_unit_test(test_421),
        cmocka_unit_test(test_greeting_refused),
        cmocka_unit_test(test_eof),
        cmocka_unit_test(test_tls_error),
        cmocka_unit_test(test_timeouts),
        cmocka_unit_test(test_unsolicited),
        cmocka_unit_test(test_senseless),
        cmocka_unit_test(test_quoted),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_huge),
        cmocka_unit_test(test_many_rcpts),
        cmocka_unit_test(test_big_body),
        cmocka_unit_test(test_rset_refused),
        cmocka_unit_test(test_output_full),
        cmocka_unit_test(test_quit_abort),
        cmocka_unit_test(test_api),
        cmocka_unit_test(test_deadlines),
    };

    int rc = cmocka_run_group_tests(tests, NULL, NULL);

    printf("%lu inputs fed, buffers swapped %lu times\n", R.inputs, R.swaps);
    if (R.swaps == 0)
        rc = 1; /* the swap path never ran: the test is broken */
    return rc;
}
