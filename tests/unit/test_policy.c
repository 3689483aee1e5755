/*
 * The outbound failure policy from scripted events: outcomes of a
 * recipient (delivered, 5xx, 4xx before and past expiry, rate-limited,
 * 421), transactions that end in a session failure (fail over or not,
 * or lost at the first command on a reused connection: another one),
 * connections that end (refused, greeting failed, 421, a 421 to an idle
 * connection, stopping, a failed handshake under opportunistic TLS), DNS
 * statuses, the retry schedule with jitter, and expiry; recipients
 * refused for the server's limit per transaction, sent next; a host's
 * refusal before MAIL (no 8BITMIME, a smaller SIZE): the next MX host,
 * a bounce once all refused, a deferral when the others were not heard.
 * No network.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "engine/classify.h"
#include "engine/config.h"
#include "engine/outbound/policy.h"

static struct smtp_outcome
outcome(enum smtp_status st, unsigned code, enum smtp_reason reason)
{
    struct smtp_outcome o;
    memset(&o, 0, sizeof(o));
    o.status = st;
    o.code = (uint16_t)code;
    o.reason = reason;
    o.scope = SMTP_SCOPE_RCPT;
    return o;
}

static struct smtp_outcome
refused(unsigned code, uint8_t cls, uint16_t subject, uint16_t detail, const char *text)
{
    struct smtp_outcome o = outcome(code >= 500 ? SMTP_STATUS_PERMFAIL : SMTP_STATUS_TEMPFAIL, code,
                                    SMTP_REASON_REPLY);
    o.enh = (struct smtp_enh){cls, subject, detail};
    snprintf(o.text, sizeof(o.text), "%s", text);
    return o;
}

static void
recipient_limit_goes_next(void **state)
{
    (void)state;
    struct smtp_outcome o = refused(452, 4, 5, 3, "4.5.3 too many recipients");
    assert_true(policy_rcpt_next_txn(&o, 2));
    assert_false(policy_rcpt_next_txn(&o, 0)); /* nothing delivered: a deferral */
    o = refused(552, 5, 5, 3, "5.5.3 too many recipients");
    assert_true(policy_rcpt_next_txn(&o, 1)); /* RFC 821's code */
    o = refused(552, 5, 0, 0, "Too many recipients");
    assert_true(policy_rcpt_next_txn(&o, 1)); /* no enhanced code: the text says it */
    o = refused(452, 4, 2, 2, "4.2.2 mailbox full");
    assert_false(policy_rcpt_next_txn(&o, 1)); /* the mailbox's, not the transaction's */
    o = refused(452, 4, 3, 1, "4.3.1 too many recipients"); /* an enhanced code that says else */
    assert_false(policy_rcpt_next_txn(&o, 1));
    o = refused(452, 4, 0, 0, "insufficient system storage");
    assert_false(policy_rcpt_next_txn(&o, 1));
    o = refused(550, 5, 5, 3, "5.5.3 too many recipients");
    assert_false(policy_rcpt_next_txn(&o, 1));
}

/* Greylisting is told by its text (no code of its own): 4xx, not 421. */
static void
greylisting(void **state)
{
    (void)state;
    struct smtp_outcome o = refused(450, 4, 2, 0,
                                    "4.2.0 <u@g.test>: Recipient address rejected: Greylisted, "
                                    "see http://postgrey.schweikert.ch/help/g.test.html");
    assert_true(policy_greylisted(&o)); /* Postgrey */
    o = refused(451, 4, 7, 1, "4.7.1 Greylisting in action, please come back in 00:05:00");
    assert_true(policy_greylisted(&o)); /* milter-greylist */
    o = refused(451, 0, 0, 0, "Gray-listed, try again in a few minutes");
    assert_true(policy_greylisted(&o));
    o = refused(421, 4, 7, 0, "4.7.0 greylisted: closing");
    assert_false(policy_greylisted(&o)); /* the connection's end: a 421 holds the site */
    o = refused(550, 5, 7, 1, "5.7.1 greylist: you never came back");
    assert_false(policy_greylisted(&o));
    o = refused(452, 4, 2, 2, "4.2.2 mailbox full");
    assert_false(policy_greylisted(&o));
    o = refused(451, 4, 3, 0, "4.3.0 Temporary lookup failure, try again later");
    assert_false(policy_greylisted(&o));
    o = refused(450, 4, 2, 0, "4.2.0 Greylisted");
    o.reason = SMTP_REASON_TLS; /* not the server's reply (words of our own) */
    assert_false(policy_greylisted(&o));
}

static void
recipients(void **state)
{
    (void)state;
    struct policy_rcpt p;
    struct smtp_outcome o = outcome(SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY);
    policy_rcpt(&o, BOUNCE_OTHER, CLASSIFY_CONNECT, 1000, 5000, 60, &p);
    assert_int_equal(p.kind, POLICY_DELIVERED);

    o = outcome(SMTP_STATUS_PERMFAIL, 550, SMTP_REASON_REPLY);
    policy_rcpt(&o, BOUNCE_INVALID_RECIPIENT, CLASSIFY_CONNECT, 1000, 5000, 60, &p);
    assert_int_equal(p.kind, POLICY_BOUNCE);
    assert_int_equal(p.src, CLASSIFY_REPLY);

    /* 4xx: deferred by the delay, never past the expiry. */
    o = outcome(SMTP_STATUS_TEMPFAIL, 451, SMTP_REASON_REPLY);
    policy_rcpt(&o, BOUNCE_OTHER, CLASSIFY_CONNECT, 1000, 5000, 60, &p);
    assert_int_equal(p.kind, POLICY_DEFER);
    assert_int_equal(p.due_ms, 1060);
    assert_false(p.backoff);
    policy_rcpt(&o, BOUNCE_OTHER, CLASSIFY_CONNECT, 1000, 5000, 60000, &p);
    assert_int_equal(p.due_ms, 5000);
    /* Past (or within the slack of) the expiry: expired. */
    policy_rcpt(&o, BOUNCE_OTHER, CLASSIFY_CONNECT, 4990, 5000, 60, &p);
    assert_int_equal(p.kind, POLICY_EXPIRE);
    assert_int_equal(p.src, CLASSIFY_EXPIRED);

    /* Rate limited slows the destination, but a 421 does that elsewhere. */
    o = outcome(SMTP_STATUS_TEMPFAIL, 450, SMTP_REASON_REPLY);
    policy_rcpt(&o, BOUNCE_RATE_LIMITED, CLASSIFY_CONNECT, 1000, 5000, 60, &p);
    assert_true(p.backoff);
    o.code = 421;
    policy_rcpt(&o, BOUNCE_RATE_LIMITED, CLASSIFY_CONNECT, 1000, 5000, 60, &p);
    assert_false(p.backoff);
    /* ... nor a limit of one mailbox (X.2.X) or of one transaction's
     * recipients (452 X.5.3): deferred, the domain's rates untouched */
    o = refused(450, 4, 2, 1, "4.2.1 The user you are trying to contact is receiving mail at a "
                              "rate that prevents additional messages from being delivered");
    policy_rcpt(&o, BOUNCE_RATE_LIMITED, CLASSIFY_CONNECT, 1000, 5000, 60, &p);
    assert_int_equal(p.kind, POLICY_DEFER);
    assert_false(p.backoff);
    o = refused(452, 4, 5, 3, "4.5.3 Too many recipients");
    policy_rcpt(&o, BOUNCE_RATE_LIMITED, CLASSIFY_CONNECT, 1000, 5000, 60, &p);
    assert_int_equal(p.kind, POLICY_DEFER);
    assert_false(p.backoff);
    o = refused(451, 4, 7, 28, "4.7.28 unusual rate of unsolicited mail from your IP");
    policy_rcpt(&o, BOUNCE_RATE_LIMITED, CLASSIFY_CONNECT, 1000, 5000, 60, &p);
    assert_true(p.backoff);

    /* Sources: a timeout is a connection matter, TLS a TLS one. */
    o = outcome(SMTP_STATUS_TEMPFAIL, 0, SMTP_REASON_TIMEOUT);
    assert_int_equal(policy_source(&o, CLASSIFY_REPLY), CLASSIFY_CONNECT);
    o.reason = SMTP_REASON_TLS_FAILED;
    assert_int_equal(policy_source(&o, CLASSIFY_CONNECT), CLASSIFY_TLS);
    o.reason = SMTP_REASON_TLS; /* broken after the handshake */
    assert_int_equal(policy_source(&o, CLASSIFY_CONNECT), CLASSIFY_TLS);
    o.reason = SMTP_REASON_NONE;
    assert_int_equal(policy_source(&o, CLASSIFY_DNS), CLASSIFY_DNS);
}

static void
failover(void **state)
{
    (void)state;
    struct smtp_outcome m = outcome(SMTP_STATUS_TEMPFAIL, 0, SMTP_REASON_EOF);
    m.scope = SMTP_SCOPE_SESSION;
    m.stage = SMTP_CLIENT_S_RCPT;
    struct policy_txn t = {.msg = &m, .txns_on_conn = 1, .have_answer = true,
                           .now_ms = 1000, .expire_ms = 100000};
    assert_true(policy_failover(&t));
    t.failovers = POLICY_FAILOVER_MAX;
    assert_false(policy_failover(&t)); /* enough moves: deferred */
    t.failovers = 0;
    t.delivered = 1;
    assert_false(policy_failover(&t)); /* the server took some: its outcome stands */
    t.delivered = 0;
    t.txns_on_conn = 2;
    assert_false(policy_failover(&t)); /* the connection worked before */
    t.txns_on_conn = 1;
    m.stage = SMTP_CLIENT_S_DOT;
    assert_false(policy_failover(&t)); /* after the dot: maybe delivered */
    m.stage = SMTP_CLIENT_S_RCPT;
    m.code = 421;
    assert_false(policy_failover(&t)); /* pushed back: hold, not elsewhere */
    m.code = 0;
    t.now_ms = t.expire_ms;
    assert_false(policy_failover(&t)); /* expired */
    t.now_ms = 1000;
    m.scope = SMTP_SCOPE_RCPT;
    assert_false(policy_failover(&t));
}

/* A host's refusal decided before MAIL (no 8BITMIME, a smaller SIZE,
 * no SMTPUTF8): the next MX host while one that has not refused is left,
 * the bounce (this reply) once every host of the domain refused, a
 * deferral when the job came back to a host that refused it (the others
 * were not heard). A server's own reply, or a recipient's refusal, is
 * reported as it is. */
static struct smtp_outcome
host_refusal(enum smtp_reason reason, unsigned code, uint16_t subject, uint16_t detail)
{
    struct smtp_outcome o = outcome(SMTP_STATUS_PERMFAIL, code, reason);
    o.scope = SMTP_SCOPE_MESSAGE;
    o.stage = SMTP_CLIENT_S_MAIL;
    o.enh = (struct smtp_enh){5, subject, detail};
    return o;
}

static void
host_refusals(void **state)
{
    (void)state;
    const enum smtp_reason reasons[] = {SMTP_REASON_NEED_8BITMIME, SMTP_REASON_SIZE,
                                        SMTP_REASON_NEED_SMTPUTF8};
    for (size_t i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++) {
        struct smtp_outcome m = host_refusal(reasons[i], 554, 6, 3);
        assert_true(policy_host_refusal(&m));
        struct policy_host h = {.msg = &m, .hosts = 2};
        assert_int_equal(policy_host(&h), POLICY_HOST_NEXT); /* MX 20 is left */
        h.refused = 1;
        assert_int_equal(policy_host(&h), POLICY_HOST_REPORT); /* both refused: bounce */
        h.hosts = 3;
        assert_int_equal(policy_host(&h), POLICY_HOST_NEXT);
        h.hosts = 1;
        h.refused = 0;
        assert_int_equal(policy_host(&h), POLICY_HOST_REPORT); /* the only host */
        h.hosts = 10;
        h.refused = POLICY_HOSTS_REFUSED_MAX - 1;
        assert_int_equal(policy_host(&h), POLICY_HOST_REPORT); /* bounded */
        h.refused = 1;
        h.again = true;
        assert_int_equal(policy_host(&h), POLICY_HOST_DEFER); /* the others not heard */
        h.hosts = 1;
        assert_int_equal(policy_host(&h), POLICY_HOST_DEFER);
    }
    /* the server's own 552 5.3.4 to MAIL SIZE=: the message's, reported */
    struct smtp_outcome m = refused(552, 5, 3, 4, "5.3.4 message too big");
    m.scope = SMTP_SCOPE_MESSAGE;
    m.stage = SMTP_CLIENT_S_MAIL;
    struct policy_host h = {.msg = &m, .hosts = 2};
    assert_false(policy_host_refusal(&m));
    assert_int_equal(policy_host(&h), POLICY_HOST_REPORT);
    /* a UTF-8 local part refused alone while others go: the recipient's */
    m = host_refusal(SMTP_REASON_NEED_SMTPUTF8, 553, 6, 7);
    m.scope = SMTP_SCOPE_RCPT;
    m.stage = SMTP_CLIENT_S_RCPT;
    assert_int_equal(policy_host(&h), POLICY_HOST_REPORT);
    /* an address that cannot be sent is the message's anywhere */
    m = host_refusal(SMTP_REASON_ADDRESS, 553, 1, 7);
    assert_int_equal(policy_host(&h), POLICY_HOST_REPORT);
    /* delivered, or a session failure: not this rule's */
    m = outcome(SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY);
    assert_int_equal(policy_host(&h), POLICY_HOST_REPORT);
    m = outcome(SMTP_STATUS_TEMPFAIL, 0, SMTP_REASON_TLS_UNAVAILABLE);
    m.scope = SMTP_SCOPE_SESSION;
    assert_int_equal(policy_host(&h), POLICY_HOST_REPORT);

    /* passed over at the host that refused it while another may come */
    assert_true(policy_host_pass(0, false, true));
    assert_false(policy_host_pass(0, false, false)); /* the others are down */
    assert_false(policy_host_pass(0, true, true));   /* the detour's connect failed */
    assert_true(policy_host_pass(POLICY_HOST_PASS_MAX - 1, false, true));
    assert_false(policy_host_pass(POLICY_HOST_PASS_MAX, false, true)); /* bounded */

    /* deferred: temporary, code and class alike, and so per policy_rcpt */
    m = host_refusal(SMTP_REASON_NEED_8BITMIME, 554, 6, 3);
    policy_host_defer(&m);
    assert_int_equal(m.status, SMTP_STATUS_TEMPFAIL);
    assert_int_equal(m.code, 454);
    assert_int_equal(m.enh.cls, 4);
    assert_int_equal(m.enh.subject, 6);
    assert_int_equal(m.enh.detail, 3);
    assert_false(policy_host_refusal(&m)); /* made temporary: no longer one */
    struct policy_rcpt pr;
    policy_rcpt(&m, BOUNCE_OTHER, CLASSIFY_REPLY, 1000, 100000, 5000, &pr);
    assert_int_equal(pr.kind, POLICY_DEFER);
    assert_int_equal(pr.due_ms, 6000);
    m = outcome(SMTP_STATUS_DELIVERED, 250, SMTP_REASON_REPLY);
    policy_host_defer(&m);
    assert_int_equal(m.status, SMTP_STATUS_DELIVERED); /* only a refusal changes */
    assert_int_equal(m.code, 250);
}

/* A transaction lost at its first command on a reused connection (a
 * 421 after it idled or naming a limit per connection, or the
 * connection lost, crossing RSET or MAIL): the job goes to
 * another connection at once, a bounded number of times; anything else
 * is a normal failure. The connection's end holds nothing back. */
static void
reuse_lost(void **state)
{
    (void)state;
    struct smtp_outcome m = outcome(SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY);
    m.scope = SMTP_SCOPE_SESSION;
    m.stage = SMTP_CLIENT_S_MAIL;
    snprintf(m.text, sizeof(m.text), "4.4.2 mx Error: timeout exceeded");
    struct policy_txn t = {.msg = &m, .txns_on_conn = 2, .have_answer = true,
                           .idled = true, .now_ms = 1000, .expire_ms = 100000};
    assert_true(policy_reuse_lost(&t));
    assert_false(policy_failover(&t)); /* a 421: never the next address */
    m.stage = SMTP_CLIENT_S_RSET;
    assert_true(policy_reuse_lost(&t));
    /* A 421 to a connection reused straight after a transaction, without
     * idling: the receiver pushing back, a normal failure. */
    t.idled = false;
    assert_false(policy_reuse_lost(&t));
    static const char *const pushback[] = {
        "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume",
        "4.3.2 The maximum number of concurrent connections has exceeded a limit",
        "4.7.0 Too many connections from your IP",
        "4.4.2 Timeout, closing this connection",
        "4.7.0 Too many errors on this connection",
        "Too many concurrent connections from this IP; closing this connection",
        "Rate limit exceeded, closing this session",
        "mx1.mail.example Error: too many connections; only one connection per IP",
    };
    for (size_t i = 0; i < sizeof(pushback) / sizeof(pushback[0]); i++) {
        snprintf(m.text, sizeof(m.text), "%s", pushback[i]);
        assert_false(policy_reuse_lost(&t));
    }
    /* ... unless it names the receiver's limit of messages on one
     * connection: that connection is full, the next one is not. */
    static const char *const full[] = {
        "4.7.0 Too many messages on this connection",
        "too many messages in one connection",
        "4.5.3 Maximum number of messages per session exceeded",
        "Message limit for this session reached",
        "Per-connection message limit reached; reconnect to continue",
        "Max messages per SMTP session exceeded",
        "Too many messages in the current session",
        "Connection message limit reached",
    };
    for (size_t i = 0; i < sizeof(full) / sizeof(full[0]); i++) {
        snprintf(m.text, sizeof(m.text), "%s", full[i]);
        assert_true(policy_reuse_lost(&t));
    }
    m.stage = SMTP_CLIENT_S_RCPT; /* only at the transaction's first command */
    assert_false(policy_reuse_lost(&t));
    m.stage = SMTP_CLIENT_S_RSET;
    m = outcome(SMTP_STATUS_TEMPFAIL, 0, SMTP_REASON_EOF); /* EOF, reset, failed send */
    m.scope = SMTP_SCOPE_SESSION;
    m.stage = SMTP_CLIENT_S_MAIL;
    assert_true(policy_reuse_lost(&t)); /* lost: idled or not */
    /* A fresh connection is not reused, unless it sat idle first. */
    t.txns_on_conn = 1;
    assert_false(policy_reuse_lost(&t));
    t.idled = true;
    assert_true(policy_reuse_lost(&t));
    t.idled = false;
    t.txns_on_conn = 5;
    /* Past the first command: the server answered this transaction. */
    m.stage = SMTP_CLIENT_S_RCPT;
    assert_false(policy_reuse_lost(&t));
    m.stage = SMTP_CLIENT_S_DATA;
    assert_false(policy_reuse_lost(&t));
    m.stage = SMTP_CLIENT_S_DOT;
    assert_false(policy_reuse_lost(&t));
    m.stage = SMTP_CLIENT_S_MAIL;
    /* A timeout or a protocol error is no race with an idle close. */
    m.reason = SMTP_REASON_TIMEOUT;
    assert_false(policy_reuse_lost(&t));
    m.reason = SMTP_REASON_PROTOCOL;
    assert_false(policy_reuse_lost(&t));
    /* TLS broken after the handshake is a connection lost, as before it
     * had a reason of its own. */
    m.reason = SMTP_REASON_TLS;
    assert_true(policy_reuse_lost(&t));
    m.reason = SMTP_REASON_EOF;
    /* A refused MAIL (451, 550) is the message's. */
    struct smtp_outcome r = refused(451, 4, 3, 0, "try later");
    r.scope = SMTP_SCOPE_MESSAGE;
    r.stage = SMTP_CLIENT_S_MAIL;
    t.msg = &r;
    assert_false(policy_reuse_lost(&t));
    t.msg = &m;
    /* Bounded per job, and never past expiry. */
    t.reuse_lost = POLICY_REUSE_LOST_MAX;
    assert_false(policy_reuse_lost(&t));
    t.reuse_lost = 0;
    t.now_ms = t.expire_ms;
    assert_false(policy_reuse_lost(&t));
    t.now_ms = 1000;
    assert_true(policy_reuse_lost(&t));

    /* The 421 that ends such a connection: no hold, no backoff, no
     * smaller window, no source held, no failed address. */
    struct smtp_outcome q = outcome(SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY);
    q.scope = SMTP_SCOPE_SESSION;
    q.stage = SMTP_CLIENT_S_MAIL;
    struct policy_conn_decision d;
    struct policy_conn_end e = {.connected = true, .ready_once = true, .session = &q,
                                .reuse_lost = true};
    policy_conn_end(&e, &d);
    assert_false(d.hold || d.backoff || d.congested || d.source_hold || d.next_addr || d.remember ||
                 d.retry_plain);
    e.reuse_lost = false;
    policy_conn_end(&e, &d);
    assert_true(d.hold && d.backoff && d.congested && d.source_hold);
}

static void
connections(void **state)
{
    (void)state;
    struct policy_conn_decision d;
    /* Refused: the window comes down; the cursor moved on the refusal. */
    struct policy_conn_end e = {.connected = false};
    policy_conn_end(&e, &d);
    assert_true(d.congested);
    assert_false(d.next_addr);
    /* Greeting 554: next address, remembered as temporary. */
    struct smtp_outcome g = outcome(SMTP_STATUS_PERMFAIL, 554, SMTP_REASON_REPLY);
    e = (struct policy_conn_end){.connected = true, .session = &g};
    policy_conn_end(&e, &d);
    assert_true(d.next_addr && d.remember && d.congested);
    assert_false(d.hold);
    /* 421 after transactions: hold, back off, window down, same address. */
    struct smtp_outcome q = outcome(SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY);
    e = (struct policy_conn_end){.connected = true, .ready_once = true, .session = &q};
    policy_conn_end(&e, &d);
    assert_true(d.hold && d.backoff && d.congested);
    assert_false(d.next_addr);
    assert_true(d.source_hold);
    /* The same 421 saying the receiver goes down: held, rates and the
     * site's window whole, and no source rests alone. */
    e.going_down = true;
    policy_conn_end(&e, &d);
    assert_true(d.hold);
    assert_false(d.backoff || d.congested || d.source_hold);
    e.going_down = false;
    /* A clean QUIT: nothing. */
    struct smtp_outcome ok = outcome(SMTP_STATUS_DELIVERED, 221, SMTP_REASON_QUIT);
    e.session = &ok;
    policy_conn_end(&e, &d);
    assert_false(d.hold || d.backoff || d.congested || d.next_addr);
    /* Stopping: no decision. */
    e = (struct policy_conn_end){.connected = true, .session = &q, .stopping = true};
    policy_conn_end(&e, &d);
    assert_false(d.hold || d.congested);
    /* A STARTTLS handshake that failed under opportunistic TLS, with jobs
     * that have not had their retry: plaintext to the same address at
     * once; neither a failed address nor congestion. */
    struct smtp_outcome hs = outcome(SMTP_STATUS_TEMPFAIL, 0, SMTP_REASON_TLS_FAILED);
    e = (struct policy_conn_end){.connected = true, .session = &hs, .tls_fallback = true,
                                 .tls_retry_left = true};
    policy_conn_end(&e, &d);
    assert_true(d.retry_plain && d.remember);
    assert_false(d.next_addr || d.congested || d.hold);
    /* Every job waiting had its retry in this attempt: a failed address. */
    e.tls_retry_left = false;
    policy_conn_end(&e, &d);
    assert_false(d.retry_plain);
    assert_true(d.next_addr && d.congested);
    /* No fallback for the address (required, verify, MTA-STS, DANE). */
    e = (struct policy_conn_end){.connected = true, .session = &hs, .tls_retry_left = true};
    policy_conn_end(&e, &d);
    assert_false(d.retry_plain);
    assert_true(d.next_addr);
    e = (struct policy_conn_end){.connected = true, .session = &hs, .tls_fallback = true,
                                 .tls_retry_left = true, .stopping = true};
    policy_conn_end(&e, &d);
    assert_false(d.retry_plain);
}

/* A 421 to an idle connection, between transactions, is the receiver's
 * idle timeout or shutdown: that connection ends and nothing else (no
 * hold, no backoff, no smaller window, no source held, no failed
 * address). At the greeting or in a transaction it pushes back still. */
static void
idle_421(void **state)
{
    (void)state;
    struct policy_conn_decision d;
    struct smtp_outcome q = outcome(SMTP_STATUS_TEMPFAIL, 421, SMTP_REASON_REPLY);
    q.scope = SMTP_SCOPE_SESSION;
    q.enh = (struct smtp_enh){4, 4, 2};
    snprintf(q.text, sizeof(q.text), "idle timeout exceeded");
    q.stage = SMTP_CLIENT_S_IDLE;
    struct policy_conn_end e = {.connected = true, .ready_once = true, .session = &q, .idle = true};
    policy_conn_end(&e, &d);
    assert_false(d.hold || d.backoff || d.congested || d.source_hold || d.next_addr || d.remember ||
                 d.retry_plain);
    /* The same 421 in a transaction: held, backed off, window and source. */
    q.stage = SMTP_CLIENT_S_RCPT;
    e.idle = false;
    policy_conn_end(&e, &d);
    assert_true(d.hold && d.backoff && d.congested && d.source_hold);
    assert_false(d.next_addr);
    /* At the greeting: held, and the next address. */
    q.stage = SMTP_CLIENT_S_GREETING;
    e = (struct policy_conn_end){.connected = true, .session = &q};
    policy_conn_end(&e, &d);
    assert_true(d.hold && d.backoff && d.congested && d.next_addr && d.remember);
}

/* Which TLS failures may go on in plaintext: opportunistic TLS only. */
static void
tls_fallback(void **state)
{
    (void)state;
    assert_true(policy_tls_fallback(DOMAIN_TLS_OPTIONAL, false));
    assert_false(policy_tls_fallback(DOMAIN_TLS_OPTIONAL, true)); /* DANE */
    assert_false(policy_tls_fallback(DOMAIN_TLS_REQUIRED, false));
    assert_false(policy_tls_fallback(DOMAIN_TLS_VERIFY, false)); /* and MTA-STS enforce */
    assert_false(policy_tls_fallback(DOMAIN_TLS_OFF, false));
}

static void
dns_and_schedule(void **state)
{
    (void)state;
    struct policy_fail f;
    policy_dns(DNS_OK, false, false, false, &f);
    assert_false(f.fail);
    policy_dns(DNS_NOT_FOUND, false, false, false, &f);
    assert_true(f.fail && f.permanent);
    assert_int_equal(f.enh.cls, 5);
    assert_int_equal(f.enh.subject, 1);
    assert_int_equal(f.enh.detail, 2);
    policy_dns(DNS_NULL_MX, false, false, false, &f);
    assert_int_equal(f.code, 556);
    policy_dns(DNS_RETRY, false, false, false, &f);
    assert_true(f.fail && !f.permanent && f.forget_answer);
    /* No MX host with an address: deferred; a name that can exist
     * nowhere: bounced as NXDOMAIN is. */
    policy_dns(DNS_FAIL, false, false, false, &f);
    assert_true(f.fail && !f.permanent);
    policy_dns(DNS_FAIL, true, false, false, &f);
    assert_true(f.fail && f.permanent && f.code == 550 && f.enh.detail == 2);
    /* Every MX host's name NXDOMAIN: bounced 5.4.4 */
    policy_dns(DNS_FAIL, false, true, false, &f);
    assert_true(f.fail && f.permanent && f.code == 550 && f.enh.subject == 4 &&
                f.enh.detail == 4);
    /* No MX record naming a host (MX 10 192.0.2.1): bounced 5.4.4 */
    policy_dns(DNS_FAIL, false, false, true, &f);
    assert_true(f.fail && f.permanent && f.code == 550 && f.enh.subject == 4 &&
                f.enh.detail == 4 && f.src == CLASSIFY_DNS);
    /* A name not found, said with the name asked; other answers by their why */
    char buf[SMTP_OUTCOME_TEXT_MAX];
    struct dns_mx_result mx = {.status = DNS_NOT_FOUND, .why = "NXDOMAIN", .domain = "nx.test"};
    assert_string_equal(policy_dns_text(&mx, buf, sizeof(buf)),
                        "Host or domain name not found. Name service error for name=nx.test "
                        "type=MX: Host not found (NXDOMAIN)");
    mx.why = "no MX and no address records";
    assert_string_equal(policy_dns_text(&mx, buf, sizeof(buf)),
                        "Host or domain name not found. Name service error for name=nx.test: "
                        "no MX and no address records");
    mx.status = DNS_RETRY;
    mx.why = "timeout";
    assert_string_equal(policy_dns_text(&mx, buf, sizeof(buf)), "timeout");
    mx.status = DNS_NULL_MX;
    assert_null(policy_dns_text(&mx, buf, sizeof(buf)));
    /* Jobs that fail without a session: the status is data, never text. */
    policy_job(POLICY_NO_TARGET, &f);
    assert_true(f.fail && f.permanent && f.code == 550 && f.src == CLASSIFY_TARGET);
    assert_int_equal(f.enh.detail, 4);
    policy_job(POLICY_NO_TARGET_SELF, &f);
    assert_int_equal(f.enh.detail, 6);
    policy_job(POLICY_NO_MX_ANSWERED, &f);
    assert_true(f.fail && !f.permanent && f.code == 451 && f.enh.cls == 4 && f.enh.detail == 1);
    policy_job(POLICY_NO_RESOLVER, &f);
    assert_true(!f.permanent && f.src == CLASSIFY_DNS);
    policy_job(POLICY_OPERATOR_BOUNCE, &f);
    assert_true(f.permanent && f.enh.cls == 5 && f.enh.subject == 0);
    /* No server's reply: its class is other whatever the last reply its
     * text quotes, and the shaping rules never see it (outcome.c passes
     * them what policy_source() calls a reply). */
    struct classify *cls = classify_new();
    assert_non_null(cls);
    struct smtp_outcome bo = {.code = (uint16_t)f.code, .status = SMTP_STATUS_PERMFAIL,
                              .scope = SMTP_SCOPE_SESSION, .enh = f.enh};
    snprintf(bo.text, sizeof(bo.text), "%s; last attempt: 452 4.2.2 Mailbox full", f.text);
    assert_int_equal(classify(cls, policy_source(&bo, f.src), bo.code, &bo.enh, bo.text),
                     BOUNCE_OTHER);
    snprintf(bo.text, sizeof(bo.text), "%s; last attempt: 450 4.1.1 User unknown", f.text);
    assert_int_equal(classify(cls, policy_source(&bo, f.src), bo.code, &bo.enh, bo.text),
                     BOUNCE_OTHER);
    assert_int_not_equal(policy_source(&bo, f.src), CLASSIFY_REPLY);
    classify_free(cls);
    /* No connection opened, for a reason of this node: deferred as a
     * connection failure; no memory, or none said, is tried again. */
    policy_job(POLICY_OPEN_FAILED, &f);
    assert_true(f.fail && !f.permanent && f.code == 451 && f.src == CLASSIFY_CONNECT);
    assert_true(f.enh.cls == 4 && f.enh.subject == 4 && f.enh.detail == 0);
    assert_true(policy_open_failed(-EADDRNOTAVAIL));
    assert_true(policy_open_failed(-EMFILE));
    assert_true(policy_open_failed(-EAFNOSUPPORT));
    assert_false(policy_open_failed(-ENOMEM));
    assert_false(policy_open_failed(0));
    /* Connection events: a failed connect moves on, a fault of ours rests. */
    struct policy_event_decision ed;
    policy_conn_event(POLICY_CONNECT_FAILED, &ed);
    assert_true(ed.next_addr && ed.rest_ms == 0);
    policy_conn_event(POLICY_CONNECT_TIMEOUT, &ed);
    assert_true(ed.next_addr);
    policy_conn_event(POLICY_SPOOL_UNREADABLE, &ed);
    assert_true(!ed.next_addr && ed.rest_ms == POLICY_HOLD_MIN_MS);
    policy_conn_event(POLICY_CLIENT_MISUSE, &ed);
    assert_true(ed.rest_ms == POLICY_HOLD_MIN_MS);
    /* Expiry of a waiting job, with the timers' slack. */
    assert_true(policy_expired(1000, 1000 + POLICY_EXPIRY_SLACK_MS));
    assert_false(policy_expired(1000, 1001 + POLICY_EXPIRY_SLACK_MS));
    /* The window comes down on resets, timeouts and 421s in the session. */
    struct smtp_outcome m;
    memset(&m, 0, sizeof(m));
    m.scope = SMTP_SCOPE_SESSION;
    m.reason = SMTP_REASON_EOF;
    assert_true(policy_txn_congested(&m));
    m.reason = SMTP_REASON_TLS;
    assert_true(policy_txn_congested(&m));
    m.reason = SMTP_REASON_REPLY;
    m.code = 421;
    assert_true(policy_txn_congested(&m));
    m.code = 451;
    assert_false(policy_txn_congested(&m));
    m.scope = SMTP_SCOPE_MESSAGE;
    m.code = 421;
    assert_false(policy_txn_congested(&m));
    assert_int_equal(policy_all_failed_hold(0), POLICY_HOLD_MIN_MS);
    assert_int_equal(policy_all_failed_hold(60000), 60000);
    /* the site rests with it for the hosts' failures, not for TLS */
    struct smtp_outcome sf;
    memset(&sf, 0, sizeof(sf));
    sf.status = SMTP_STATUS_TEMPFAIL;
    assert_true(policy_site_failure(NULL));
    sf.reason = SMTP_REASON_CONNECT_REFUSED;
    assert_true(policy_site_failure(&sf));
    sf.reason = SMTP_REASON_TIMEOUT;
    assert_true(policy_site_failure(&sf));
    sf.reason = SMTP_REASON_REPLY;
    sf.code = 421;
    assert_true(policy_site_failure(&sf));
    sf.code = 0;
    sf.reason = SMTP_REASON_TLS_FAILED;
    assert_false(policy_site_failure(&sf));
    sf.reason = SMTP_REASON_TLS_UNAVAILABLE; /* DANE, or STARTTLS required and missing */
    assert_false(policy_site_failure(&sf));

    uint64_t ms[] = {1000, 2000, 4000};
    struct conf_durations s = {.n = 3};
    memcpy(s.ms, ms, sizeof(ms));
    assert_int_equal(policy_retry_delay(&s, 0, 0, 12345), 1000);
    assert_int_equal(policy_retry_delay(&s, 7, 0, 12345), 4000); /* the last repeats */
    uint64_t lo = UINT64_MAX, hi = 0;
    for (uint64_t r = 0; r < 1000; r++) {
        uint64_t v = policy_retry_delay(&s, 1, 10, r * 7919);
        assert_true(v >= 2000 && v <= 2200); /* never earlier than the schedule */
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    assert_true(lo < 2020 && hi > 2180); /* spread over the whole span */
    /* Deferred without a try: the step after the longest delay waited,
     * never before the attempts' (a flush's short wait moves nothing). */
    assert_int_equal(policy_retry_step_untried(&s, 0, 0), 0);
    assert_int_equal(policy_retry_step_untried(&s, 1, 500), 1);
    assert_int_equal(policy_retry_step_untried(&s, 0, 1000), 1);
    assert_int_equal(policy_retry_step_untried(&s, 1, 2100), 2);
    /* a wait of the delay measured from its commit, a few ms late: waited
     * (before, 2 s again and again under load: integ_outcomes
     * test_deferrals_while_the_site_rests_back_off under ASan) */
    assert_int_equal(policy_retry_step_untried(&s, 1, 1990), 2);
    assert_int_equal(policy_retry_step_untried(&s, 1, 1700), 1); /* under 7/8 of 2 s */
    assert_int_equal(policy_retry_step_untried(&s, 2, 4400), 3);
    assert_int_equal(policy_retry_delay(&s, policy_retry_step_untried(&s, 2, 4400), 0, 1), 4000);
    assert_int_equal(policy_retry_step_untried(&s, 3, 1000), 3);
    assert_int_equal(policy_expiry(1000, 500, 0), 1500);
    assert_int_equal(policy_expiry(1000, 500, 1200), 1200);
    assert_int_equal(policy_expiry(1000, 500, 9000), 1500);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(recipients),
        cmocka_unit_test(greylisting),
        cmocka_unit_test(recipient_limit_goes_next),
        cmocka_unit_test(failover),
        cmocka_unit_test(host_refusals),
        cmocka_unit_test(reuse_lost),
        cmocka_unit_test(connections),
        cmocka_unit_test(idle_421),
        cmocka_unit_test(dns_and_schedule),
        cmocka_unit_test(tls_fallback),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
