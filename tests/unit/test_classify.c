/*
 * test_classify: real-looking replies from Gmail, Microsoft, Yahoo and
 * common MTAs get the class an operator would give them; non-reply
 * sources map straight; operator rules come first; bad rules are refused
 * with a reason; hostile text is harmless.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/classify.h"

struct reply_case {
    unsigned code;
    const char *enh; /* "5.1.1" or NULL */
    const char *text;
    enum bounce_class want;
};

static const struct reply_case cases[] = {
    /* Gmail */
    {550, "5.1.1",
     "5.1.1 The email account that you tried to reach does not exist. Please try\n5.1.1 "
     "double-checking the recipient's email address for typos",
     BOUNCE_INVALID_RECIPIENT},
    {550, "5.2.1", "5.2.1 The email account that you tried to reach is disabled.",
     BOUNCE_INVALID_RECIPIENT},
    {452, "4.2.2", "4.2.2 The email account that you tried to reach is over quota.",
     BOUNCE_MAILBOX_FULL},
    {552, "5.2.2", "5.2.2 The email account that you tried to reach is over quota.",
     BOUNCE_MAILBOX_FULL},
    {450, "4.2.1",
     "4.2.1 The user you are trying to contact is receiving mail at a rate that\n4.2.1 prevents "
     "additional messages from being delivered.",
     BOUNCE_RATE_LIMITED},
    {552, "5.3.4", "5.3.4 Your message exceeded Google's message size limits.",
     BOUNCE_MESSAGE_TOO_LARGE},
    {421, "4.7.28",
     "4.7.28 Our system has detected an unusual rate of unsolicited mail originating\n4.7.28 from "
     "your IP address. To protect our users from spam, mail sent from your IP\n4.7.28 address "
     "has been temporarily rate limited.",
     BOUNCE_RATE_LIMITED},
    {421, "4.7.0", "4.7.0 Try again later, closing connection. (EHLO)", BOUNCE_RATE_LIMITED},
    {421, "4.7.0",
     "4.7.0 [192.0.2.1] Our system has detected that this message is suspicious due\n4.7.0 to "
     "the nature of the content and/or the links within. To best protect our\n4.7.0 users from "
     "spam, the message has been blocked.",
     BOUNCE_POLICY},
    {421, "4.7.26",
     "4.7.26 This mail has been rate limited because it is unauthenticated. Gmail\n4.7.26 "
     "requires all senders to authenticate with either SPF or DKIM.",
     BOUNCE_POLICY},
    {550, "5.7.26",
     "5.7.26 Unauthenticated email from example.com is not accepted due to domain's\n5.7.26 "
     "DMARC policy.",
     BOUNCE_POLICY},
    {550, "5.7.1",
     "5.7.1 [192.0.2.1] Our system has detected an unusual rate of unsolicited\n5.7.1 mail "
     "originating from your IP address. To protect our users from spam,\n5.7.1 mail sent from "
     "your IP address has been blocked.",
     BOUNCE_POLICY},
    /* the enhanced code decides before the text */
    {550, "5.7.1", "5.7.1 Rate limited, slow down", BOUNCE_POLICY},
    /* Microsoft */
    {550, "5.1.10",
     "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
     BOUNCE_INVALID_RECIPIENT},
    {550, "5.4.1", "5.4.1 Recipient address rejected: Access denied. AS(201806281)",
     BOUNCE_INVALID_RECIPIENT},
    {550, "5.5.0", "5.5.0 Requested action not taken: mailbox unavailable (S2017062302)",
     BOUNCE_INVALID_RECIPIENT},
    {550, "5.7.1",
     "5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your "
     "Internet service provider since part of their network is on our block list (S3150).",
     BOUNCE_POLICY},
    {451, "4.7.500", "4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719)",
     BOUNCE_RATE_LIMITED},
    {451, "4.7.650",
     "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP "
     "reputation.",
     BOUNCE_RATE_LIMITED},
    {452, "4.5.3", "4.5.3 Too many recipients", BOUNCE_RATE_LIMITED},
    {554, "5.2.2", "5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException",
     BOUNCE_MAILBOX_FULL},
    {554, "5.4.4", "5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain", BOUNCE_DNS_FAILURE},
    {421, "4.3.2",
     "4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing "
     "transmission channel",
     BOUNCE_RATE_LIMITED},
    /* Yahoo */
    {554, NULL,
     "delivery error: dd This user doesn't have a yahoo.com account (x@yahoo.com) [0] - "
     "mta1234.mail.bf1.yahoo.com",
     BOUNCE_INVALID_RECIPIENT},
    {421, "4.7.0",
     "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or "
     "user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
     BOUNCE_RATE_LIMITED},
    {554, "5.7.9",
     "5.7.9 Message not accepted for policy reasons.  See "
     "https://postmaster.yahooinc.com/error-codes",
     BOUNCE_POLICY},
    {421, "4.7.1",
     "4.7.1 [TS03] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT "
     "succeed. See https://postmaster.yahooinc.com/error-codes",
     BOUNCE_POLICY},
    {451, NULL, "Message temporarily deferred - [160]", BOUNCE_RATE_LIMITED},
    /* Postfix, Exim, generic */
    {550, "5.1.1",
     "5.1.1 <bob@example.com>: Recipient address rejected: User unknown in virtual "
     "mailbox table",
     BOUNCE_INVALID_RECIPIENT},
    {550, NULL, "Requested action not taken: mailbox unavailable", BOUNCE_INVALID_RECIPIENT},
    {550, "5.0.0", "5.0.0 <bob@example.com>... User unknown", BOUNCE_INVALID_RECIPIENT},
    {554, "5.7.1",
     "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
     BOUNCE_POLICY},
    {554, NULL, "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
     BOUNCE_POLICY},
    {450, "4.7.1", "4.7.1 Client host rejected: cannot find your hostname, [192.0.2.1]",
     BOUNCE_POLICY},
    {552, "5.2.3", "5.2.3 Message size exceeds fixed maximum message size",
     BOUNCE_MESSAGE_TOO_LARGE},
    {552, NULL, "Message size exceeds fixed limit", BOUNCE_MESSAGE_TOO_LARGE},
    {452, "4.3.1", "4.3.1 Insufficient system storage", BOUNCE_MAILBOX_FULL},
    {452, NULL, "Too many recipients received this hour", BOUNCE_RATE_LIMITED},
    {421, NULL, "mx.example.com Too many concurrent SMTP connections; please try again later.",
     BOUNCE_RATE_LIMITED},
    {421, "4.4.2", "4.4.2 mx.example.com Error: timeout exceeded", BOUNCE_CONNECTION_FAILURE},
    {451, "4.4.0", "4.4.0 DNS query failed", BOUNCE_DNS_FAILURE},
    {554, "5.4.6", "5.4.6 Too many hops", BOUNCE_OTHER}, /* a loop, not throttling */
    {451, "4.4.9", "4.4.9 Something odd on the way", BOUNCE_CONNECTION_FAILURE},
    {550, "5.1.2", "5.1.2 Domain not found", BOUNCE_INVALID_RECIPIENT},
    {553, "5.1.8", "5.1.8 Sender address rejected: Domain not found", BOUNCE_POLICY},
    {421, NULL, "Service not available, closing transmission channel", BOUNCE_RATE_LIMITED},
    {451, "4.3.0", "4.3.0 Mail server temporarily rejected message.", BOUNCE_OTHER},
    {554, "5.6.0", "5.6.0 Corrupt message content", BOUNCE_OTHER},
    {550, NULL, "", BOUNCE_OTHER},
    {451, "4.4.7", "4.4.7 Message delayed", BOUNCE_EXPIRED},
    /* greylisting: neither an unknown user nor throttling */
    {450, "4.2.0",
     "4.2.0 <u@example.org>: Recipient address rejected: Greylisted, see "
     "http://postgrey.schweikert.ch/help/example.org.html",
     BOUNCE_OTHER},
    {451, "4.7.1", "4.7.1 Greylisting in action, please come back later", BOUNCE_OTHER},
    {451, NULL, "Temporary failure: greylisted, try again later", BOUNCE_OTHER},
    /* a receiver going down or in maintenance: not load, not rate_limited
     * (which would count it as throttling and, but for a 421, halve the
     * destination's rates); load in a 4.3.2's text still is */
    {421, "4.3.2", "4.3.2 Service shutting down: try again later", BOUNCE_OTHER}, /* sluice */
    {421, "4.3.2", "4.3.2 System not accepting network messages", BOUNCE_OTHER},
    {421, "4.3.2", "4.3.2 Service not available", BOUNCE_OTHER},
    {421, "4.3.2", "4.3.2 System under maintenance, closing transmission channel", BOUNCE_OTHER},
    {421, "4.3.0", "4.3.0 mx.example.com Server shutting down, please try again later",
     BOUNCE_OTHER},
    {421, NULL, "mx.example.com Service is restarting, try again later", BOUNCE_OTHER},
    {451, NULL, "Server going down for maintenance, try again later", BOUNCE_OTHER},
    {421, "4.3.2", "4.3.2 All server ports are busy", BOUNCE_RATE_LIMITED}, /* postscreen */
    {421, "4.3.2", "4.3.2 Connection rate limit exceeded.", BOUNCE_RATE_LIMITED},
    {421, "4.3.2", "4.3.2 Too many open connections.", BOUNCE_RATE_LIMITED},
    {421, "4.3.2", "4.3.2 System overloaded, try again later", BOUNCE_RATE_LIMITED},
    {421, "4.3.0", "4.3.0 Server closing connection", BOUNCE_RATE_LIMITED},
};

static struct smtp_enh
enh_of(const char *s)
{
    struct smtp_enh e = {0, 0, 0};
    unsigned c, sub, d;

    if (s != NULL && sscanf(s, "%u.%u.%u", &c, &sub, &d) == 3) {
        e.cls = (uint8_t)c;
        e.subject = (uint16_t)sub;
        e.detail = (uint16_t)d;
    }
    return e;
}

static void
test_replies(void **state)
{
    (void)state;
    struct classify *c = classify_new();
    assert_non_null(c);
    int bad = 0;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct smtp_enh e = enh_of(cases[i].enh);
        enum bounce_class got = classify(c, CLASSIFY_REPLY, cases[i].code, &e, cases[i].text);
        if (got != cases[i].want) {
            fprintf(stderr, "case %zu: %u %s \"%s\": got %s, want %s\n", i, cases[i].code,
                    cases[i].enh ? cases[i].enh : "-", cases[i].text, bounce_class_str(got),
                    bounce_class_str(cases[i].want));
            bad++;
        }
    }
    assert_int_equal(bad, 0);
    classify_free(c);
}

static void
test_sources(void **state)
{
    (void)state;
    struct classify *c = classify_new();
    struct smtp_enh e = enh_of("5.1.1");
    /* the source decides, whatever the reply fields say */
    assert_int_equal(classify(c, CLASSIFY_DNS, 550, &e, "user unknown"), BOUNCE_DNS_FAILURE);
    assert_int_equal(classify(c, CLASSIFY_TLS, 0, NULL, NULL), BOUNCE_TLS_FAILURE);
    assert_int_equal(classify(c, CLASSIFY_CONNECT, 0, NULL, "refused"), BOUNCE_CONNECTION_FAILURE);
    assert_int_equal(classify(c, CLASSIFY_EXPIRED, 450, &e, NULL), BOUNCE_EXPIRED);
    assert_int_equal(classify(c, CLASSIFY_PROTOCOL, 0, NULL, "garbage"), BOUNCE_OTHER);
    /* a reply with nothing in it */
    assert_int_equal(classify(c, CLASSIFY_REPLY, 0, NULL, NULL), BOUNCE_OTHER);
    /* no table: replies are other, other sources still map */
    assert_int_equal(classify(NULL, CLASSIFY_REPLY, 550, &e, "user unknown"), BOUNCE_OTHER);
    assert_int_equal(classify(NULL, CLASSIFY_DNS, 0, NULL, NULL), BOUNCE_DNS_FAILURE);
    classify_free(c);
}

static void
test_names(void **state)
{
    (void)state;
    for (unsigned i = 0; i < BOUNCE_CLASS_COUNT; i++) {
        enum bounce_class b;
        const char *s = bounce_class_str((enum bounce_class)i);
        assert_int_equal(bounce_class_parse(s, &b), 0);
        assert_int_equal(b, i);
    }
    enum bounce_class b = BOUNCE_OTHER;
    assert_int_equal(bounce_class_parse("Rate_Limited", &b), 0);
    assert_int_equal(b, BOUNCE_RATE_LIMITED);
    assert_int_equal(bounce_class_parse("bogus", &b), -EINVAL);
    assert_int_equal(bounce_class_parse("", &b), -EINVAL);
    assert_int_equal(bounce_class_parse(NULL, &b), -EINVAL);
    assert_string_equal(bounce_class_str(BOUNCE_MESSAGE_TOO_LARGE), "message_too_large");
    assert_string_equal(bounce_class_str((enum bounce_class)99), "other");
}

static void
test_operator_rules(void **state)
{
    (void)state;
    struct classify *c = classify_new();
    char err[256];
    struct smtp_enh e571 = enh_of("5.7.1"), e511 = enh_of("5.1.1"), e470 = enh_of("4.7.0");
    const char *rl = "5.7.1 Rate limited, slow down";

    /* built-in: the code wins */
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e571, rl), BOUNCE_POLICY);
    assert_int_equal(classify_add_rule(c, "rate_limited", "text:rate.?limit", err, sizeof(err)), 0);
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e571, rl), BOUNCE_RATE_LIMITED);
    /* a 5.7.1 not saying so stays policy */
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e571, "5.7.1 blocked"), BOUNCE_POLICY);

    /* operator rules in the order added: the first added wins */
    assert_int_equal(classify_add_rule(c, "other", "enh:5.1.1", err, sizeof(err)), 0);
    assert_int_equal(classify_add_rule(c, "policy", "enh:5.1.*", err, sizeof(err)), 0);
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e511, "user unknown"), BOUNCE_OTHER);
    struct smtp_enh e513 = enh_of("5.1.3");
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e513, "bad syntax"), BOUNCE_POLICY);

    /* code rules, and a class wildcard */
    assert_int_equal(classify(c, CLASSIFY_REPLY, 421, &e470, "4.7.0 go away"), BOUNCE_RATE_LIMITED);
    assert_int_equal(classify_add_rule(c, "connection_failure", "code:421", err, sizeof(err)), 0);
    assert_int_equal(classify(c, CLASSIFY_REPLY, 421, &e470, "4.7.0 go away"),
                     BOUNCE_CONNECTION_FAILURE);
    assert_int_equal(classify_add_rule(c, "mailbox_full", "enh:*.9.*", err, sizeof(err)), 0);
    struct smtp_enh e494 = enh_of("4.9.4");
    assert_int_equal(classify(c, CLASSIFY_REPLY, 451, &e494, ""), BOUNCE_MAILBOX_FULL);

    /* a "*" subject never takes the generic X.0.0; an explicit 0 does */
    assert_int_equal(classify_add_rule(c, "tls_failure", "enh:5.*.*", err, sizeof(err)), 0);
    struct smtp_enh e500 = enh_of("5.0.0");
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e500, "no such user"),
                     BOUNCE_INVALID_RECIPIENT);
    struct smtp_enh e563 = enh_of("5.6.3");
    assert_int_equal(classify(c, CLASSIFY_REPLY, 554, &e563, ""), BOUNCE_TLS_FAILURE);
    assert_int_equal(classify_add_rule(c, "expired", "enh:5.0.0", err, sizeof(err)), 0);
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e500, "no such user"), BOUNCE_EXPIRED);

    /* the printed table starts with the operator rules, in order */
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    classify_print_rules(c, f);
    fclose(f);
    const char *r1 = strstr(buf, "| 1 | `text:rate.?limit` | rate_limited | operator rule |");
    const char *r2 = strstr(buf, "| 2 | `enh:5.1.1` | other | operator rule |");
    assert_non_null(r1);
    assert_non_null(r2);
    assert_true(r1 < r2);
    assert_non_null(strstr(buf, "`enh:5.7.*` | policy |"));
    free(buf);
    classify_free(c);
}

static void
test_bad_rules(void **state)
{
    (void)state;
    struct classify *c = classify_new();
    static const struct {
        const char *cat, *matcher, *reason;
    } bad[] = {
        {"bogus", "enh:5.1.1", "unknown category"},
        {"", "enh:5.1.1", "unknown category"},
        {NULL, "enh:5.1.1", "unknown category"},
        {"policy", "", "empty matcher"},
        {"policy", NULL, "empty matcher"},
        {"policy", "text:", "empty regex"},
        {"policy", "text:(unclosed", "bad regex"},
        {"policy", "text:a{2,1}", "bad regex"},
        {"policy", "regex:spam", "bad matcher"},
        {"policy", "5.7.1", "bad matcher"},
        {"policy", "enh:5.7", "bad enhanced code"},
        {"policy", "enh:5.7.1.2", "bad enhanced code"},
        {"policy", "enh:3.7.1", "bad enhanced code"},
        {"policy", "enh:5.x.1", "bad enhanced code"},
        {"policy", "enh:5.7.1000", "bad enhanced code"},
        {"policy", "enh:5..1", "bad enhanced code"},
        {"policy", "enh:5.7.1 ", "bad enhanced code"},
        {"policy", "enh:", "bad enhanced code"},
        {"policy", "code:42", "bad reply code"},
        {"policy", "code:4211", "bad reply code"},
        {"policy", "code:621", "bad reply code"},
        {"policy", "code:4x1", "bad reply code"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char err[256] = "";
        int rc = classify_add_rule(c, bad[i].cat, bad[i].matcher, err, sizeof(err));
        if (rc != -EINVAL || strstr(err, bad[i].reason) == NULL || strchr(err, '\n') != NULL)
            fprintf(stderr, "bad[%zu]: rc %d err \"%s\"\n", i, rc, err);
        assert_int_equal(rc, -EINVAL);
        assert_non_null(strstr(err, bad[i].reason));
    }
    /* err may be NULL; a tiny err is cut, not overrun */
    assert_int_equal(classify_add_rule(c, "policy", "enh:9", NULL, 0), -EINVAL);
    char tiny[8];
    assert_int_equal(classify_add_rule(c, "policy", "enh:9", tiny, sizeof(tiny)), -EINVAL);
    assert_int_equal(strlen(tiny), sizeof(tiny) - 1);
    /* nothing was added: the built-ins still decide */
    struct smtp_enh e = enh_of("5.1.1");
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e, ""), BOUNCE_INVALID_RECIPIENT);
    /* good forms */
    char err[256];
    assert_int_equal(classify_add_rule(c, "POLICY", "enh:*.7.*", err, sizeof(err)), 0);
    assert_int_equal(classify_add_rule(c, "policy", "enh:2.0.0", err, sizeof(err)), 0);
    assert_int_equal(classify_add_rule(c, "other", "code:250", err, sizeof(err)), 0);
    assert_int_equal(classify_add_rule(c, "other", "text:^x$", err, sizeof(err)), 0);
    assert_int_equal(classify_add_rule(NULL, "other", "code:250", err, sizeof(err)), -EINVAL);
    classify_free(c);
    assert_null(classify_free(NULL));
}

static void
test_hostile_text(void **state)
{
    (void)state;
    struct classify *c = classify_new();
    size_t n = 100 * 1024;
    char *t = malloc(n + 1);
    assert_non_null(t);
    /* a long run that almost matches many rules, and bytes of every kind */
    static const char pat[] = "does not have a aaaa too \x01\xff\n\r(*[|\\";
    for (size_t i = 0; i < n; i++)
        t[i] = pat[i % (sizeof(pat) - 1)];
    t[n] = '\0';
    struct smtp_enh e = enh_of("5.0.0");
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e, t), BOUNCE_OTHER);

    /* a cause past CLASSIFY_TEXT_MAX is not seen */
    memset(t, 'x', n);
    memcpy(t + CLASSIFY_TEXT_MAX + 10, "user unknown", 12);
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e, t), BOUNCE_OTHER);
    memcpy(t + 10, "user unknown", 12);
    assert_int_equal(classify(c, CLASSIFY_REPLY, 550, &e, t), BOUNCE_INVALID_RECIPIENT);
    free(t);
    classify_free(c);
}

static void
test_print_builtins(void **state)
{
    (void)state;
    struct classify *c = classify_new();
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    classify_print_rules(c, f);
    fclose(f);
    assert_true(strncmp(buf, "| # | matcher | class | why |\n| --- |", 36) == 0);
    /* every row has exactly four unescaped cell separators plus the ends */
    unsigned rows = 0;
    for (char *line = buf; *line; rows++) {
        char *nl = strchr(line, '\n');
        assert_non_null(nl);
        unsigned bars = 0;
        for (char *p = line; p < nl; p++)
            if (*p == '|' && (p == line || p[-1] != '\\'))
                bars++;
        assert_int_equal(bars, 5);
        line = nl + 1;
    }
    assert_true(rows > 30);
    /* regex alternatives are escaped for the table */
    assert_non_null(strstr(buf, "user unknown\\|unknown user"));
    free(buf);
    classify_free(c);
}

/* Refusals of our sender, told from refusals of the recipient. */
static void
test_sender_refused(void **state)
{
    (void)state;
    struct classify *c = classify_new();
    assert_non_null(c);
    static const struct {
        struct smtp_enh enh;
        const char *text;
        bool sender;
    } sc[] = {
        {{5, 1, 0}, "<a@b.example>: Sender address rejected: User unknown in local recipient table",
         true},
        {{5, 7, 1}, "<a@b.example>: Sender address rejected: Access denied", true},
        {{5, 1, 8}, "no text", true},
        {{4, 1, 7}, NULL, true},
        {{0, 0, 0}, "Sender verify failed", true},
        {{5, 1, 8}, "<a@b.example>: Domain of sender address a@b.example does not exist", true},
        {{5, 0, 0}, "host mx said: 550 denied (in reply to MAIL FROM command)", true},
        {{0, 0, 0}, "SMTP error from remote mail server after MAIL FROM:<a@b>: 550 no", true},
        {{5, 1, 1}, "<x@y.example>: Recipient address rejected: User unknown in local "
                    "recipient table", false},
        {{5, 1, 1}, "user unknown (in reply to RCPT TO command)", false},
        {{5, 7, 1}, "Message rejected as spam", false},
        {{0, 0, 0}, NULL, false},
    };
    for (size_t i = 0; i < sizeof(sc) / sizeof(sc[0]); i++) {
        if (classify_sender_refused(c, &sc[i].enh, sc[i].text) != sc[i].sender)
            fail_msg("case %zu: \"%s\"", i, sc[i].text ? sc[i].text : "(null)");
    }
    /* without a table, the code alone */
    assert_true(classify_sender_refused(NULL, &sc[2].enh, NULL));
    assert_false(classify_sender_refused(NULL, &sc[0].enh, sc[0].text));
    classify_free(c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_replies),        cmocka_unit_test(test_sources),
        cmocka_unit_test(test_names),          cmocka_unit_test(test_operator_rules),
        cmocka_unit_test(test_bad_rules),      cmocka_unit_test(test_hostile_text),
        cmocka_unit_test(test_print_builtins), cmocka_unit_test(test_sender_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
