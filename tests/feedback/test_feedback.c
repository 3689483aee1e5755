/*
 * test_feedback: feedback_parse() on real-looking bounces, complaints and
 * auto-replies (tests/fixtures/feedback), on every prefix of each (a cut
 * or malformed message gives a smaller answer, never a crash), on hostile
 * MIME (deep nesting, endless parts, missing boundaries); and VERP tokens:
 * round trip, case folding, every single-character alteration refused, a
 * token under another key refused.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <string.h>

#include <cmocka.h>

#include "feedback/feedback.h"
#include "feedback/verp.h"

static char *
load(const char *name, size_t *len)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", FIXTURES, name);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char *buf = malloc(1 << 20);
    assert_non_null(buf);
    *len = fread(buf, 1, 1 << 20, f);
    fclose(f);
    return buf;
}

static void
parse_fixture(const char *name, struct feedback_result *r)
{
    size_t len;
    char *m = load(name, &len);
    assert_int_equal(feedback_parse(m, len, "bounce-", r), 0);
    free(m);
}

static const char *const verp_local = "bounce-aeaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

static void
test_postfix_dsn(void **state)
{
    struct feedback_result r;
    parse_fixture("postfix-dsn.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_DSN);
    assert_int_equal(r.nrcpt, 2);
    assert_string_equal(r.reporting_mta, "mx.example.net");
    assert_string_equal(r.rcpt[0].addr, "nobody@example.net");
    assert_string_equal(r.rcpt[0].orig_addr, "nobody@example.net");
    assert_int_equal(r.rcpt[0].action, FEEDBACK_ACTION_FAILED);
    assert_string_equal(r.rcpt[0].status, "5.1.1");
    assert_int_equal(r.rcpt[0].code, 550);
    assert_non_null(strstr(r.rcpt[0].diag, "User unknown in local recipient table"));
    assert_string_equal(r.rcpt[0].remote_mta, "mail.example.net");
    assert_string_equal(r.rcpt[1].addr, "full@example.net");
    assert_int_equal(r.rcpt[1].action, FEEDBACK_ACTION_DELAYED);
    assert_string_equal(r.rcpt[1].status, "4.2.2");
    assert_string_equal(r.orig_message_id, "<0000018f2a6b1c00.sluice@relay.example.com>");
    assert_string_equal(r.verp_local, verp_local);
    assert_string_equal(r.verp_domain, "bounces.example.com");
}

static void
test_office365_ndr(void **state)
{
    struct feedback_result r;
    parse_fixture("office365-ndr.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_DSN);
    assert_int_equal(r.nrcpt, 1);
    assert_string_equal(r.rcpt[0].addr, "a.smith@contoso.com");
    assert_string_equal(r.rcpt[0].status, "5.1.10");
    assert_int_equal(r.rcpt[0].code, 550);
    assert_non_null(strstr(r.rcpt[0].diag, "RecipientNotFound"));
    assert_string_equal(r.orig_message_id, "<0000018f2a6b1c03.sluice@relay.example.com>");
    assert_string_equal(r.verp_local, verp_local);
}

static void
test_gmail_dsn(void **state)
{
    struct feedback_result r;
    parse_fixture("gmail-dsn.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_DSN);
    assert_int_equal(r.nrcpt, 1);
    assert_string_equal(r.rcpt[0].addr, "no.such.user.2026@gmail.com");
    assert_string_equal(r.rcpt[0].status, "5.1.1");
    assert_int_equal(r.rcpt[0].code, 550);
    assert_string_equal(r.orig_message_id, "<0000018f2a6b1c04.sluice@relay.example.com>");
    assert_string_equal(r.verp_local, verp_local);
    assert_true(r.mime_parts >= 6);
}

static void
test_exim_bounce(void **state)
{
    struct feedback_result r;
    parse_fixture("exim-bounce.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_BOUNCE);
    assert_int_equal(r.nrcpt, 1);
    assert_string_equal(r.rcpt[0].addr, "gone@example.org");
    assert_string_equal(r.rcpt[0].status, "5.1.1");
    assert_int_equal(r.rcpt[0].code, 550);
    assert_int_equal(r.rcpt[0].action, FEEDBACK_ACTION_FAILED);
    assert_non_null(strstr(r.rcpt[0].diag, "User unknown"));
    assert_string_equal(r.orig_message_id, "<0000018f2a6b1c01.sluice@relay.example.com>");
    assert_string_equal(r.verp_local, verp_local);
}

static void
test_exchange_ndr(void **state)
{
    struct feedback_result r;
    parse_fixture("exchange-ndr.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_BOUNCE);
    assert_int_equal(r.nrcpt, 1);
    assert_string_equal(r.rcpt[0].addr, "j.doe@corp.example.com");
    assert_string_equal(r.rcpt[0].status, "5.1.1");
    assert_int_equal(r.rcpt[0].code, 550);
    assert_non_null(strstr(r.rcpt[0].diag, "RecipNotFound"));
    assert_string_equal(r.orig_message_id, "<0000018f2a6b1c02.sluice@relay.example.com>");
    assert_string_equal(r.verp_local, verp_local);
}

static void
test_qmail_bounce(void **state)
{
    struct feedback_result r;
    parse_fixture("qmail-bounce.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_BOUNCE);
    assert_string_equal(r.rcpt[0].addr, "old.account@example.info");
    assert_string_equal(r.rcpt[0].status, "5.1.1");
    assert_int_equal(r.rcpt[0].action, FEEDBACK_ACTION_FAILED);
}

static void
test_arf_yahoo(void **state)
{
    struct feedback_result r;
    parse_fixture("arf-yahoo.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_ARF);
    assert_string_equal(r.feedback_type, "abuse");
    assert_string_equal(r.user_agent, "Yahoo!-Mail-Feedback/2.0");
    assert_string_equal(r.orig_rcpt_to, "happy.reader@yahoo.com");
    assert_string_equal(r.orig_to, "happy.reader@yahoo.com");
    assert_string_equal(r.source_ip, "198.51.100.7");
    assert_string_equal(r.orig_message_id, "<0000018f2a6b1c05.sluice@relay.example.com>");
    assert_string_equal(r.sluice_id, "0000018f2a6b1c05");
    assert_string_equal(r.sluice_tenant, "shop");
    assert_string_equal(r.sluice_campaign, "december-offers");
    assert_string_equal(r.verp_local, verp_local);
}

static void
test_arf_microsoft(void **state)
{
    struct feedback_result r;
    parse_fixture("arf-microsoft-jmrp.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_ARF);
    assert_string_equal(r.feedback_type, "abuse");
    assert_string_equal(r.orig_rcpt_to, "");
    assert_string_equal(r.orig_to, "reader@outlook.com");
    assert_string_equal(r.verp_local, verp_local);
}

static void
test_autoreplies(void **state)
{
    struct feedback_result r;
    parse_fixture("autoreply-vacation.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_AUTOREPLY);
    assert_string_equal(r.autoreply_why, "auto-submitted");
    parse_fixture("autoreply-outlook.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_AUTOREPLY);
    parse_fixture("plain-reply.eml", &r);
    assert_int_equal(r.kind, FEEDBACK_UNKNOWN);
    assert_int_equal(r.nrcpt, 0);
}

static const char *const fixtures[] = {
    "postfix-dsn.eml",      "office365-ndr.eml",     "gmail-dsn.eml",   "exim-bounce.eml",
    "exchange-ndr.eml",     "qmail-bounce.eml",      "arf-yahoo.eml",   "arf-microsoft-jmrp.eml",
    "autoreply-vacation.eml", "autoreply-outlook.eml", "plain-reply.eml",
};

/* Every prefix, and the whole with CRLF line ends: never a crash (ASan
 * watches), and the CRLF form parses as the LF form. */
static void
test_prefixes_and_crlf(void **state)
{
    for (size_t f = 0; f < sizeof(fixtures) / sizeof(fixtures[0]); f++) {
        size_t len;
        char *m = load(fixtures[f], &len);
        struct feedback_result r, r2;
        for (size_t n = 0; n <= len; n++) {
            /* a copy of exactly n octets, so that ASan sees a read past it */
            char *cut = malloc(n ? n : 1);
            memcpy(cut, m, n);
            assert_int_equal(feedback_parse(cut, n, "bounce-", &r), 0);
            free(cut);
        }
        char *crlf = malloc(2 * len);
        size_t k = 0;
        for (size_t i = 0; i < len; i++) {
            if (m[i] == '\n')
                crlf[k++] = '\r';
            crlf[k++] = m[i];
        }
        assert_int_equal(feedback_parse(m, len, "bounce-", &r), 0);
        assert_int_equal(feedback_parse(crlf, k, "bounce-", &r2), 0);
        assert_int_equal(r.kind, r2.kind);
        assert_int_equal(r.nrcpt, r2.nrcpt);
        for (unsigned i = 0; i < r.nrcpt; i++) {
            assert_string_equal(r.rcpt[i].addr, r2.rcpt[i].addr);
            assert_string_equal(r.rcpt[i].status, r2.rcpt[i].status);
        }
        assert_string_equal(r.verp_local, r2.verp_local);
        free(crlf);
        free(m);
    }
}

/* Nesting far past the depth limit, more parts than the limit, a
 * boundary that never comes: bounded answers. */
static void
test_hostile_mime(void **state)
{
    size_t cap = 1 << 20, n = 0;
    char *m = malloc(cap);
    n += (size_t)sprintf(m + n, "From: x@y\nContent-Type: multipart/mixed; boundary=b0\n\n");
    for (int d = 0; d < 200; d++)
        n += (size_t)sprintf(m + n, "--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n", d,
                             d + 1);
    struct feedback_result r;
    assert_int_equal(feedback_parse(m, n, "bounce-", &r), 0);
    assert_int_equal(r.kind, FEEDBACK_UNKNOWN);
    assert_true(r.truncated);
    assert_true(r.mime_parts <= FEEDBACK_MIME_DEPTH + 1);

    n = (size_t)sprintf(m, "Content-Type: multipart/report; report-type=delivery-status; "
                           "boundary=\"x\"\n\n");
    for (int i = 0; i < 5000; i++)
        n += (size_t)sprintf(m + n, "--x\nContent-Type: message/delivery-status\n\n"
                                    "Final-Recipient: rfc822; a%d@b\nAction: failed\n"
                                    "Status: 5.1.1\n\n",
                             i);
    assert_int_equal(feedback_parse(m, n, "bounce-", &r), 0);
    assert_int_equal(r.kind, FEEDBACK_DSN);
    assert_true(r.mime_parts <= FEEDBACK_MIME_PARTS + 1);
    assert_true(r.truncated);

    /* one delivery-status with more recipient blocks than kept */
    n = (size_t)sprintf(m, "Content-Type: multipart/report; boundary=x\n\n--x\n"
                           "Content-Type: message/delivery-status\n\nReporting-MTA: dns; a\n\n");
    for (int i = 0; i < 100; i++)
        n += (size_t)sprintf(m + n, "Final-Recipient: rfc822; a%d@b\nAction: failed\n"
                                    "Status: 5.1.1\n\n", i);
    assert_int_equal(feedback_parse(m, n, NULL, &r), 0);
    assert_int_equal(r.nrcpt, FEEDBACK_RCPT_MAX);
    assert_int_equal(r.nrcpt_seen, 100);
    assert_string_equal(r.verp_local, "");

    /* a DSN returning a large original: parsed on its first
     * FEEDBACK_PARSE_MAX octets, the report still found */
    free(m);
    size_t big = FEEDBACK_PARSE_MAX + (4u << 20);
    m = malloc(big);
    n = (size_t)sprintf(m, "Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\n"
                           "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; a"
                           "\r\n\r\nFinal-Recipient: rfc822; big@example.com\r\n"
                           "Action: failed\r\nStatus: 5.1.1\r\n\r\n--x\r\n"
                           "Content-Type: message/rfc822\r\n\r\n");
    memset(m + n, 'h', big - n); /* one endless header line */
    assert_int_equal(feedback_parse(m, big, "bounce-", &r), 0);
    assert_int_equal(r.kind, FEEDBACK_DSN);
    assert_string_equal(r.rcpt[0].addr, "big@example.com");
    assert_true(r.truncated);
    free(m);
    m = malloc(cap);

    /* a huge header value and no body */
    memset(m, 'a', cap);
    memcpy(m, "Subject: ", 9);
    assert_int_equal(feedback_parse(m, cap, "bounce-", &r), 0);
    assert_int_equal(r.kind, FEEDBACK_UNKNOWN);
    free(m);
}

static void
test_header_and_addr(void **state)
{
    const char h[] = "To: a@b\r\nSubject: one\r\n\ttwo\r\n  three\r\nX: y\r\n";
    char v[64];
    assert_int_equal(feedback_header(h, sizeof(h) - 1, "subject", v, sizeof(v)), 14);
    assert_string_equal(v, "one two  three");
    assert_int_equal(feedback_header(h, sizeof(h) - 1, "Cc", v, sizeof(v)), -1);
    assert_int_equal(feedback_header(h, sizeof(h) - 1, "subject", v, 5), 3);
    assert_string_equal(v, "one");
    char a[64];
    const char t[] = "delivery to <some.one+tag@Example.COM>: failed.";
    assert_int_equal(feedback_find_addr(t, sizeof(t) - 1, a, sizeof(a)), 24);
    assert_string_equal(a, "some.one+tag@Example.COM");
    assert_int_equal(feedback_find_addr("no address @ here", 17, a, sizeof(a)), 0);
}

/* ---- VERP ---- */

static const uint8_t key[] = "0123456789abcdef0123456789abcdef";

static void
test_verp_round_trip(void **state)
{
    struct verp_ref in = {.msg_id = 0x0123456789abcdefull, .rcpt_index = 513}, out;
    strcpy(in.tenant, "shop-eu1");
    char tok[VERP_TOKEN_MAX + 1];
    int n = verp_token(key, 32, &in, "Some.One@Example.com", tok, sizeof(tok));
    assert_true(n > 0 && n <= VERP_TOKEN_MAX);
    assert_int_equal(verp_parse(key, 32, tok, (size_t)n, &out), 0);
    assert_true(out.msg_id == in.msg_id);
    assert_int_equal(out.rcpt_index, 513);
    assert_string_equal(out.tenant, "shop-eu1");
    assert_true(verp_rcpt_matches(key, 32, &out, "some.one@example.COM"));
    assert_false(verp_rcpt_matches(key, 32, &out, "someone.else@example.com"));
    assert_false(verp_rcpt_matches(key, 32, &out, ""));
    /* folded to upper case by some MTA on the way */
    char up[VERP_TOKEN_MAX + 1];
    for (int i = 0; i <= n; i++)
        up[i] = (char)(tok[i] >= 'a' && tok[i] <= 'z' ? tok[i] - 32 : tok[i]);
    assert_int_equal(verp_parse(key, 32, up, (size_t)n, &out), 0);
    /* every single-character change is refused */
    const char alpha[] = "abcdefghijklmnopqrstuvwxyz234567";
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < 32; k++) {
            if (alpha[k] == tok[i])
                continue;
            char t2[VERP_TOKEN_MAX + 1];
            memcpy(t2, tok, (size_t)n + 1);
            t2[i] = alpha[k];
            int rc = verp_parse(key, 32, t2, (size_t)n, &out);
            assert_true(rc == VERP_EMAC || rc == VERP_EFORMAT);
        }
    }
    /* cut, lengthened, another key, junk */
    assert_int_not_equal(verp_parse(key, 32, tok, (size_t)n - 1, &out), 0);
    char longer[VERP_TOKEN_MAX + 8];
    snprintf(longer, sizeof(longer), "%sa", tok);
    assert_int_not_equal(verp_parse(key, 32, longer, (size_t)n + 1, &out), 0);
    static const uint8_t other[] = "fedcba9876543210fedcba9876543210";
    assert_int_equal(verp_parse(other, 32, tok, (size_t)n, &out), VERP_EMAC);
    assert_int_equal(verp_parse(key, 32, "hello-world", 11, &out), VERP_EFORMAT);
    assert_int_equal(verp_parse(key, 32, "", 0, &out), VERP_EFORMAT);
    assert_int_equal(verp_parse(key, 8, tok, (size_t)n, &out), -EINVAL);
}

static void
test_verp_address(void **state)
{
    struct verp_ref in = {.msg_id = 42, .rcpt_index = 0};
    memcpy(in.tenant, "a-tenant", 9);
    char a[128];
    int n = verp_address(key, 32, "bounce-", "bounces.example.com", &in, "x@y", a, sizeof(a));
    assert_true(n > 0);
    const char *at = strchr(a, '@');
    assert_non_null(at);
    assert_true(at - a <= 64); /* RFC 5321 4.5.3.1.1 */
    assert_string_equal(at, "@bounces.example.com");
    struct verp_ref out;
    assert_int_equal(verp_parse(key, 32, a + 7, (size_t)(at - a - 7), &out), 0);
    assert_string_equal(out.tenant, "a-tenant");
    /* a tenant with octets outside the set is left out */
    strcpy(in.tenant, "a b");
    n = verp_address(key, 32, "bounce-", "b.example", &in, "x@y", a, sizeof(a));
    at = strchr(a, '@');
    assert_int_equal(verp_parse(key, 32, a + 7, (size_t)(at - a - 7), &out), 0);
    assert_string_equal(out.tenant, "");
    assert_true(out.msg_id == 42);
    assert_int_equal(verp_address(key, 32, "bounce-", "b.example", &in, "x@y", a, 10), -ENOSPC);
    /* a longer tenant goes as its tag, within the 64 octets all the same */
    memset(&in, 0, sizeof(in));
    in.msg_id = 43;
    in.tenant_tag = verp_tenant_tag(key, 32, "Customer-123456789");
    assert_true(in.tenant_tag == verp_tenant_tag(key, 32, "customer-123456789"));
    assert_true(in.tenant_tag != verp_tenant_tag(key, 32, "customer-123456788"));
    n = verp_address(key, 32, "bounce-", "bounces.example.com", &in, "x@y", a, sizeof(a));
    assert_true(n > 0);
    at = strchr(a, '@');
    assert_true(at - a <= 64);
    assert_int_equal(verp_parse(key, 32, a + 7, (size_t)(at - a - 7), &out), 0);
    assert_string_equal(out.tenant, "");
    assert_true(out.tenant_tag == in.tenant_tag && out.msg_id == 43);
    /* the tag is under the MAC too */
    char forged[128];
    snprintf(forged, sizeof(forged), "%.*s", (int)(at - a - 7), a + 7);
    forged[31] = forged[31] == 'a' ? 'b' : 'a';
    assert_int_equal(verp_parse(key, 32, forged, strlen(forged), &out), VERP_EMAC);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_postfix_dsn),     cmocka_unit_test(test_office365_ndr),
        cmocka_unit_test(test_gmail_dsn),       cmocka_unit_test(test_exim_bounce),
        cmocka_unit_test(test_exchange_ndr),    cmocka_unit_test(test_qmail_bounce),
        cmocka_unit_test(test_arf_yahoo),       cmocka_unit_test(test_arf_microsoft),
        cmocka_unit_test(test_autoreplies),     cmocka_unit_test(test_prefixes_and_crlf),
        cmocka_unit_test(test_hostile_mime),    cmocka_unit_test(test_header_and_addr),
        cmocka_unit_test(test_verp_round_trip), cmocka_unit_test(test_verp_address),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
