/*
 * test_dsn: DSNs parsed back in C. The MIME structure (boundary lines,
 * part headers), the report fields, CRLF only, lines <= 998, xtext
 * decoding of ORCPT and ENVID; hostile reply text cannot add a header or
 * a part; RET=FULL vs HDRS vs over full_max vs an original that cannot go
 * back unchanged; originals without a header/body separator; several
 * recipients; the delay warning; the success report (relayed); SMTPUTF8;
 * refused inputs.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cmocka.h>

#include "engine/dsn.h"
#include "queue/queue.h"

#define NOW     1795401231123ULL /* Mon, 23 Nov 2026 02:33:51 UTC */
#define ARRIVAL (NOW - 3 * 86400000ULL + 3600000ULL)

static const char orig_msg[] = "Received: from app (app [192.0.2.7])\r\n"
                               "\tby relay; Mon, 23 Nov 2026 02:00:00 +0000\r\n"
                               "From: Alice <alice@example.org>\r\n"
                               "To: bob@example.com\r\n"
                               "Subject: hello\r\n"
                               "Message-ID: <m1@example.org>\r\n"
                               "\r\n"
                               "Body line one.\r\n"
                               "\r\n"
                               "Body line three.\r\n";
#define ORIG_HDR_LEN 182 /* through the CRLF of the Message-ID line */

/* ---- a small MIME reader ---- */

struct part {
    const char *hdr; /* header section, each line with its CRLF */
    size_t hdr_len;
    const char *body;
    size_t body_len;
};

struct parsed {
    const char *top;
    size_t top_len;
    char boundary[128];
    struct part parts[8];
    unsigned nparts;
};

/* Every line ends with CRLF, no bare CR or LF, no NUL, no line over 998,
 * no control other than CR, LF and TAB; 8-bit octets only if allowed. */
static void
check_lines(const char *s, size_t n, bool allow_8bit)
{
    size_t col = 0;

    assert_true(n >= 2);
    assert_memory_equal(s + n - 2, "\r\n", 2);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\r') {
            assert_true(i + 1 < n);
            assert_int_equal(s[i + 1], '\n');
            i++;
            col = 0;
            continue;
        }
        assert_int_not_equal(c, '\n');
        assert_true(c >= 0x20 || c == '\t');
        assert_int_not_equal(c, 0x7f);
        if (!allow_8bit)
            assert_true(c < 0x80);
        col++;
        assert_true(col <= 998);
    }
}

/* The unfolded value of field name in a header section, or NULL
 * (malloc'd). */
static char *
hget(const char *sec, size_t len, const char *name)
{
    size_t nl = strlen(name);
    const char *end = sec + len;

    for (const char *p = sec; p < end;) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (eol == NULL)
            eol = end;
        if ((size_t)(eol - p) > nl && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            const char *v = p + nl + 1;
            while (v < eol && *v == ' ')
                v++;
            size_t cap = (size_t)(end - v) + 1, o = 0;
            char *out = malloc(cap);
            assert_non_null(out);
            memcpy(out, v, (size_t)(eol - v));
            o = (size_t)(eol - v);
            /* continuation lines: unfolding removes the CRLF only */
            while (eol + 2 < end && (eol[2] == ' ' || eol[2] == '\t')) {
                const char *c = eol + 2;
                const char *e2 = memmem(c, (size_t)(end - c), "\r\n", 2);
                if (e2 == NULL)
                    e2 = end;
                memcpy(out + o, c, (size_t)(e2 - c));
                o += (size_t)(e2 - c);
                eol = e2;
            }
            out[o] = '\0';
            return out;
        }
        p = eol + 2;
    }
    return NULL;
}

static void
expect_field(const char *sec, size_t len, const char *name, const char *want)
{
    char *v = hget(sec, len, name);
    if (v == NULL || strcmp(v, want) != 0)
        fprintf(stderr, "%s: got \"%s\", want \"%s\"\n", name, v ? v : "(none)", want);
    assert_non_null(v);
    assert_string_equal(v, want);
    free(v);
}

static unsigned
count(const char *s, size_t n, const char *needle)
{
    unsigned k = 0;
    size_t nl = strlen(needle);
    for (const char *p = s; (p = memmem(p, (size_t)(s + n - p), needle, nl)) != NULL; p += nl)
        k++;
    return k;
}

static void
parse(const char *s, size_t n, bool allow_8bit, struct parsed *m)
{
    memset(m, 0, sizeof(*m));
    check_lines(s, n, allow_8bit);
    const char *e = memmem(s, n, "\r\n\r\n", 4);
    assert_non_null(e);
    m->top = s;
    m->top_len = (size_t)(e - s) + 2;

    char *ct = hget(m->top, m->top_len, "Content-Type");
    assert_non_null(ct);
    assert_true(strncmp(ct, "multipart/report; report-type=delivery-status;", 46) == 0);
    const char *b = strstr(ct, "boundary=\"");
    assert_non_null(b);
    b += 10;
    const char *q = strchr(b, '"');
    assert_non_null(q);
    assert_true(q - b > 0 && q - b <= 70);
    memcpy(m->boundary, b, (size_t)(q - b));
    free(ct);

    char delim[140];
    snprintf(delim, sizeof(delim), "\r\n--%s", m->boundary);
    size_t dl = strlen(delim);
    const char *body = e + 4, *end = s + n;
    const char *d = memmem(body, (size_t)(end - body), delim, dl);
    assert_non_null(d);
    for (;;) {
        const char *after = d + dl;
        if (end - after >= 2 && memcmp(after, "--", 2) == 0) {
            /* close delimiter: only its CRLF may follow */
            assert_int_equal(end - after, 4);
            assert_memory_equal(after + 2, "\r\n", 2);
            break;
        }
        assert_true(end - after >= 2);
        assert_memory_equal(after, "\r\n", 2);
        const char *start = after + 2;
        const char *next = memmem(start, (size_t)(end - start), delim, dl);
        assert_non_null(next);
        assert_true(m->nparts < 8);
        struct part *p = &m->parts[m->nparts++];
        const char *he = memmem(start, (size_t)(next - start), "\r\n\r\n", 4);
        assert_non_null(he);
        p->hdr = start;
        p->hdr_len = (size_t)(he - start) + 2;
        p->body = he + 4;
        p->body_len = (size_t)(next - p->body); /* the CRLF before "--" is the delimiter's */
        d = next;
    }
    /* the boundary shows up nowhere but in its delimiters */
    assert_int_equal(count(s, n, m->boundary), m->nparts + 2); /* + the header */
}

/* The groups of a delivery-status body: [0] per message, then one per
 * recipient. */
static unsigned
groups(const struct part *p, struct part *g, unsigned max)
{
    unsigned k = 0;
    const char *s = p->body, *end = p->body + p->body_len;

    while (s < end && k < max) {
        const char *e = memmem(s, (size_t)(end - s), "\r\n\r\n", 4);
        size_t len = e ? (size_t)(e - s) + 2 : (size_t)(end - s);
        g[k].hdr = s;
        g[k].hdr_len = len;
        k++;
        s += len + (e ? 2 : 0);
    }
    return k;
}

/* ---- inputs ---- */

static struct dsn_rcpt
rcpt_failed(void)
{
    struct dsn_rcpt r = {
        .addr = "bob@example.com",
        .status = "5.1.1",
        .code = 550,
        .text = "5.1.1 The email account that you tried to reach does not exist.",
        .remote_mta = "mx1.example.com",
        .last_attempt_ms = NOW - 1000,
        .class_str = "invalid_recipient",
    };
    return r;
}

static struct dsn_input
input(const struct dsn_rcpt *r, unsigned n)
{
    struct dsn_input in = {
        .reporting_mta = "relay.sluice.test",
        .from_addr = "MAILER-DAEMON@relay.sluice.test",
        .to_addr = "alice@example.org",
        .message_id = "dsn.Q123@relay.sluice.test",
        .boundary_seed = "Q123",
        .queue_id = "Q123",
        .arrival_ms = ARRIVAL,
        .now_ms = NOW,
        .orig = orig_msg,
        .orig_len = sizeof(orig_msg) - 1,
        .rcpt = r,
        .nrcpt = n,
    };
    return in;
}

static char *
build(const struct dsn_input *in, size_t *len)
{
    char *out = NULL;
    int rc = dsn_build(in, &out, len);
    assert_int_equal(rc, 0);
    assert_non_null(out);
    assert_int_equal(strlen(out), *len);
    return out;
}

static bool
has_line_starting(const char *s, size_t n, const char *prefix)
{
    size_t pl = strlen(prefix);
    for (const char *p = s; p < s + n;) {
        if ((size_t)(s + n - p) >= pl && strncasecmp(p, prefix, pl) == 0)
            return true;
        const char *nl = memchr(p, '\n', (size_t)(s + n - p));
        if (nl == NULL)
            break;
        p = nl + 1;
    }
    return false;
}

/* ---- tests ---- */

static void
test_failed_headers(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_input in = input(&r, 1);
    size_t n;
    char *s = build(&in, &n);
    struct parsed m;
    parse(s, n, false, &m);

    expect_field(m.top, m.top_len, "From",
                 "Mail Delivery System <MAILER-DAEMON@relay.sluice.test>");
    expect_field(m.top, m.top_len, "To", "<alice@example.org>");
    expect_field(m.top, m.top_len, "Subject", "Undelivered Mail Returned to Sender");
    expect_field(m.top, m.top_len, "Date", "Mon, 23 Nov 2026 02:33:51 +0000");
    expect_field(m.top, m.top_len, "Message-ID", "<dsn.Q123@relay.sluice.test>");
    expect_field(m.top, m.top_len, "Auto-Submitted", "auto-replied");
    expect_field(m.top, m.top_len, "MIME-Version", "1.0");
    assert_null(hget(m.top, m.top_len, "Content-Transfer-Encoding"));

    assert_int_equal(m.nparts, 3);
    expect_field(m.parts[0].hdr, m.parts[0].hdr_len, "Content-Type",
                 "text/plain; charset=us-ascii");
    expect_field(m.parts[1].hdr, m.parts[1].hdr_len, "Content-Type", "message/delivery-status");
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "text/rfc822-headers");

    /* the human part names the recipient and quotes the server */
    const struct part *h = &m.parts[0];
    assert_non_null(memmem(h->body, h->body_len, "<bob@example.com>: delivery failed", 34));
    assert_non_null(memmem(h->body, h->body_len, "mx1.example.com said: 550 5.1.1", 31));
    assert_non_null(memmem(h->body, h->body_len, "(invalid_recipient)", 19));
    assert_non_null(memmem(h->body, h->body_len, "headers of the original message", 31));

    struct part g[8];
    assert_int_equal(groups(&m.parts[1], g, 8), 2);
    expect_field(g[0].hdr, g[0].hdr_len, "Reporting-MTA", "dns; relay.sluice.test");
    expect_field(g[0].hdr, g[0].hdr_len, "X-Sluice-Queue-ID", "Q123");
    expect_field(g[0].hdr, g[0].hdr_len, "Arrival-Date", "Fri, 20 Nov 2026 03:33:51 +0000");
    assert_null(hget(g[0].hdr, g[0].hdr_len, "Original-Envelope-Id"));
    expect_field(g[1].hdr, g[1].hdr_len, "Final-Recipient", "rfc822; bob@example.com");
    expect_field(g[1].hdr, g[1].hdr_len, "Action", "failed");
    expect_field(g[1].hdr, g[1].hdr_len, "Status", "5.1.1");
    expect_field(g[1].hdr, g[1].hdr_len, "Remote-MTA", "dns; mx1.example.com");
    /* unfolding gives the text back */
    expect_field(g[1].hdr, g[1].hdr_len, "Diagnostic-Code",
                 "smtp; 550 5.1.1 The email account that you tried to reach does not exist.");
    expect_field(g[1].hdr, g[1].hdr_len, "Last-Attempt-Date", "Mon, 23 Nov 2026 02:33:50 +0000");
    expect_field(g[1].hdr, g[1].hdr_len, "X-Sluice-Class", "invalid_recipient");
    assert_null(hget(g[1].hdr, g[1].hdr_len, "Original-Recipient"));
    assert_null(hget(g[1].hdr, g[1].hdr_len, "Will-Retry-Until"));

    /* headers only: exactly the original's header section */
    assert_int_equal(m.parts[2].body_len, ORIG_HDR_LEN);
    assert_memory_equal(m.parts[2].body, orig_msg, ORIG_HDR_LEN);
    assert_null(memmem(s, n, "Body line", 9));
    free(s);
}

static void
test_xtext(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    r.orcpt = "rfc822;bob+2Btag@example.com";
    struct dsn_input in = input(&r, 1);
    in.envid = "abc+2B123+3Dx+zz+4";
    size_t n;
    char *s = build(&in, &n);
    struct parsed m;
    parse(s, n, false, &m);
    struct part g[4];
    assert_int_equal(groups(&m.parts[1], g, 4), 2);
    /* malformed "+zz" and a '+' at the end stay as they were */
    expect_field(g[0].hdr, g[0].hdr_len, "Original-Envelope-Id", "abc+123=x+zz+4");
    expect_field(g[1].hdr, g[1].hdr_len, "Original-Recipient", "rfc822;bob+tag@example.com");
    /* Original-Recipient comes before Final-Recipient */
    assert_true(strncmp(g[1].hdr, "Original-Recipient:", 19) == 0);
    free(s);

    /* xtext that decodes to CR LF cannot add a field */
    r.orcpt = "rfc822;a+0D+0ABcc:+20evil@x.test+0D+0A+0D+0AX: y";
    in.envid = "id+0D+0AStatus:+202.0.0";
    s = build(&in, &n);
    parse(s, n, false, &m);
    assert_int_equal(groups(&m.parts[1], g, 4), 2);
    expect_field(g[1].hdr, g[1].hdr_len, "Original-Recipient", "rfc822;a Bcc: evil@x.test X: y");
    expect_field(g[0].hdr, g[0].hdr_len, "Original-Envelope-Id", "id Status: 2.0.0");
    expect_field(g[1].hdr, g[1].hdr_len, "Status", "5.1.1");
    assert_false(has_line_starting(s, n, "Bcc:"));
    assert_false(has_line_starting(s, n, "X: y"));
    assert_int_equal(count(m.parts[1].body, m.parts[1].body_len, "\nStatus:"), 1);
    free(s);

    /* a malformed ORCPT (no type) is left out rather than guessed */
    r.orcpt = "bob@example.com";
    s = build(&in, &n);
    parse(s, n, false, &m);
    assert_null(memmem(s, n, "Original-Recipient", 18));
    free(s);
}

static void
test_hostile_text(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_input in = input(&r, 1);
    size_t n;

    /* first, learn the boundary the seed gives */
    char *s = build(&in, &n);
    struct parsed m;
    parse(s, n, false, &m);
    char b0[128];
    strcpy(b0, m.boundary);
    free(s);

    /* a reply that tries every trick: CRLFs, the boundary itself, a new
     * part, headers, controls, 8-bit octets, a 5000-octet word */
    char text[8000];
    int k = snprintf(text, sizeof(text),
                     "5.7.1 blocked\r\n\r\n--%s\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n"
                     "--%s--\r\nBcc: evil@x.test\n\rX-Injected: 1\x01\x1b[31m\x7f\xff\xc3\xa9 ",
                     b0, b0);
    assert_true(k > 0);
    memset(text + k, 'W', 5000);
    text[k + 5000] = '\0';
    r.text = text;
    r.remote_mta = "mx\r\nX-Evil: 1";
    r.class_str = "policy\r\nX-Evil: 2";
    in.to_addr = "alice@example.org>\r\nBcc: <evil@x.test";
    s = build(&in, &n);
    parse(s, n, false, &m);
    assert_int_equal(m.nparts, 3);
    assert_string_not_equal(m.boundary, b0);
    assert_false(has_line_starting(s, n, "Content-Type: text/html"));
    assert_false(has_line_starting(s, n, "Bcc:"));
    assert_false(has_line_starting(s, n, "X-Injected"));
    assert_false(has_line_starting(s, n, "X-Evil"));
    /* one recipient group, whatever the text held */
    struct part g[8];
    assert_int_equal(groups(&m.parts[1], g, 8), 2);
    char *dc = hget(g[1].hdr, g[1].hdr_len, "Diagnostic-Code");
    assert_non_null(dc);
    assert_true(strncmp(dc, "smtp; 550 5.7.1 blocked --", 26) == 0);
    assert_non_null(strstr(dc, "X-Injected: 1?"));
    assert_true(strlen(dc) <= DSN_TEXT_MAX + 40);
    free(dc);
    expect_field(g[1].hdr, g[1].hdr_len, "Remote-MTA", "dns; mx X-Evil: 1");
    expect_field(m.top, m.top_len, "To", "<alice@example.org> Bcc: <evil@x.test>");
    free(s);
}

/* The body of a quoted-printable part, decoded (malloc'd, *n its length). */
static char *
qp_decode(const char *s, size_t len, size_t *n)
{
    char *out = malloc(len + 1);
    assert_non_null(out);
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '=' && i + 2 < len && s[i + 1] == '\r' && s[i + 2] == '\n') {
            i += 2; /* a soft break */
        } else if (s[i] == '=' && i + 2 < len) {
            unsigned v;
            assert_int_equal(sscanf(s + i + 1, "%2X", &v), 1);
            out[o++] = (char)v;
            i += 2;
        } else {
            out[o++] = s[i];
        }
    }
    out[o] = '\0';
    *n = o;
    return out;
}

static void
test_ret_modes(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_input in = input(&r, 1);
    size_t n;
    struct parsed m;

    /* RET=FULL: the message as stored */
    in.ret_full = true;
    char *s = build(&in, &n);
    parse(s, n, false, &m);
    assert_int_equal(m.nparts, 3);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "message/rfc822");
    assert_int_equal(m.parts[2].body_len, sizeof(orig_msg) - 1);
    assert_memory_equal(m.parts[2].body, orig_msg, sizeof(orig_msg) - 1);
    assert_non_null(
        memmem(m.parts[0].body, m.parts[0].body_len, "original message is attached", 28));
    free(s);

    /* RET=FULL, but over full_max: headers, and the human part says why */
    in.full_max = 100;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "text/rfc822-headers");
    assert_int_equal(m.parts[2].body_len, ORIG_HDR_LEN);
    assert_non_null(memmem(m.parts[0].body, m.parts[0].body_len, "larger than 100 octets", 22));
    free(s);

    /* exactly full_max still goes whole; 0 means no limit */
    in.full_max = sizeof(orig_msg) - 1;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "message/rfc822");
    free(s);
    in.full_max = 0;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "message/rfc822");
    free(s);

    /* only its start at hand (the spool read the headers of one over
     * full_max): headers, and the human part says why */
    in.full_max = 100;
    in.orig_size = 5000;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "text/rfc822-headers");
    assert_int_equal(m.parts[2].body_len, ORIG_HDR_LEN);
    assert_non_null(memmem(m.parts[0].body, m.parts[0].body_len, "larger than 100 octets", 22));
    free(s);
    in.orig_size = 0;
    in.full_max = 0;

    /* a message that cannot travel unchanged (bare LF, long line): headers */
    char bad[3000];
    int k = snprintf(bad, sizeof(bad), "Subject: x\r\n\r\nbare\nlf\r\n");
    memset(bad + k, 'L', 1200);
    memcpy(bad + k + 1200, "\r\n", 3);
    in.orig = bad;
    in.orig_len = strlen(bad);
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "text/rfc822-headers");
    assert_int_equal(m.parts[2].body_len, 12);
    assert_memory_equal(m.parts[2].body, "Subject: x\r\n", 12);
    assert_non_null(memmem(m.parts[0].body, m.parts[0].body_len, "could not be attached", 21));
    free(s);

    /* An 8-bit original is not returned whole (message/rfc822 may not be
     * encoded, and an 8-bit DSN bounces at an MX without 8BITMIME, then
     * is dropped): its headers, quoted-printable when 8-bit, and the
     * human part says why; the DSN is 7-bit. */
    static const char o8[] = "Subject: caf\xc3\xa9\r\n\r\nna\xc3\xafve\r\n";
    in.orig = o8;
    in.orig_len = sizeof(o8) - 1;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "text/rfc822-headers");
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Transfer-Encoding",
                 "quoted-printable");
    assert_null(hget(m.top, m.top_len, "Content-Transfer-Encoding"));
    assert_null(hget(m.parts[0].hdr, m.parts[0].hdr_len, "Content-Transfer-Encoding"));
    size_t dn;
    char *dec = qp_decode(m.parts[2].body, m.parts[2].body_len, &dn);
    assert_int_equal(dn, 16);
    assert_memory_equal(dec, "Subject: caf\xc3\xa9\r\n", 16);
    free(dec);
    assert_non_null(memmem(m.parts[0].body, m.parts[0].body_len, "has 8-bit content", 17));
    free(s);
    /* 8-bit in the body only: headers as they are */
    static const char b8[] = "Subject: cafe\r\n\r\nna\xc3\xafve\r\n";
    in.orig = b8;
    in.orig_len = sizeof(b8) - 1;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "text/rfc822-headers");
    assert_null(hget(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Transfer-Encoding"));
    assert_int_equal(m.parts[2].body_len, 15);
    assert_memory_equal(m.parts[2].body, "Subject: cafe\r\n", 15);
    free(s);

    /* no original: two parts */
    in.orig = NULL;
    in.orig_len = 0;
    s = build(&in, &n);
    parse(s, n, false, &m);
    assert_int_equal(m.nparts, 2);
    free(s);
}

static void
test_orig_shapes(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_input in = input(&r, 1);
    size_t n;
    struct parsed m;

    /* no separator, no final CRLF: all of it, ending in CRLF */
    static const char o1[] = "Subject: a\r\nFrom: b@c";
    in.orig = o1;
    in.orig_len = sizeof(o1) - 1;
    char *s = build(&in, &n);
    parse(s, n, false, &m);
    assert_int_equal(m.parts[2].body_len, sizeof(o1) + 1);
    assert_memory_equal(m.parts[2].body, "Subject: a\r\nFrom: b@c\r\n", sizeof(o1) + 1);
    free(s);

    /* the same with RET=FULL */
    in.ret_full = true;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "message/rfc822");
    assert_memory_equal(m.parts[2].body, "Subject: a\r\nFrom: b@c\r\n", sizeof(o1) + 1);
    free(s);
    in.ret_full = false;

    /* bare LF line ends, NUL, a 2500-octet header: made safe */
    char o2[4000];
    int k = snprintf(o2, sizeof(o2), "A: 1\nB: 2\rC: x");
    o2[k++] = '\0';
    k += snprintf(o2 + k, sizeof(o2) - (size_t)k, "y\r\nD: ");
    memset(o2 + k, 'd', 2500);
    k += 2500;
    memcpy(o2 + k, "\r\n\n\r\nbody\r\n", 11);
    k += 10;
    in.orig = o2;
    in.orig_len = (size_t)k;
    s = build(&in, &n);
    parse(s, n, false, &m);
    const struct part *p = &m.parts[2];
    assert_true(p->body_len > 2500);
    assert_memory_equal(p->body, "A: 1\r\nB: 2\r\nC: x?y\r\nD: ", 23);
    assert_null(memmem(p->body, p->body_len, "body", 4));
    char *d = hget(p->body, p->body_len, "D");
    assert_non_null(d);
    assert_int_equal(strlen(d), 2502); /* 2503 octets: two folds, each adds a space */
    free(d);
    free(s);

    /* an original that opens with the empty line has no headers */
    static const char o3[] = "\r\nonly a body\r\n";
    in.orig = o3;
    in.orig_len = sizeof(o3) - 1;
    s = build(&in, &n);
    parse(s, n, false, &m);
    assert_int_equal(m.nparts, 3);
    assert_null(memmem(s, n, "only a body", 11));
    free(s);
}

/* Local parts taken at MAIL and RCPT though no dot-atom (a dot leading,
 * trailing or doubled: user.@docomo.ne.jp) are named quoted, as RFC 5322
 * and 3464 want an address: in To:, Final-Recipient and the text.
 * Others, a quoted one among them, as they are. */
static void
test_addr_quoted(void **state)
{
    (void)state;
    struct dsn_rcpt r[5] = {rcpt_failed(), rcpt_failed(), rcpt_failed(), rcpt_failed(),
                            rcpt_failed()};
    r[0].addr = "user.@docomo.ne.jp";
    r[1].addr = ".lead@example.com";
    r[2].addr = "a..b@example.com";
    r[3].addr = "\"x y\"@example.com";
    r[4].addr = "plain.dot@example.com";
    r[0].orcpt = "rfc822;user.@docomo.ne.jp"; /* as given: not ours to change */
    struct dsn_input in = input(r, 5);
    in.to_addr = "news.@example.com";
    size_t n;
    char *s = build(&in, &n);
    struct parsed m;
    parse(s, n, false, &m);
    expect_field(m.top, m.top_len, "To", "<\"news.\"@example.com>");
    struct part g[8];
    assert_int_equal(groups(&m.parts[1], g, 8), 6);
    static const char *const want[] = {
        "rfc822; \"user.\"@docomo.ne.jp", "rfc822; \".lead\"@example.com",
        "rfc822; \"a..b\"@example.com", "rfc822; \"x y\"@example.com",
        "rfc822; plain.dot@example.com"};
    for (int i = 0; i < 5; i++)
        expect_field(g[i + 1].hdr, g[i + 1].hdr_len, "Final-Recipient", want[i]);
    expect_field(g[1].hdr, g[1].hdr_len, "Original-Recipient", "rfc822;user.@docomo.ne.jp");
    const struct part *h = &m.parts[0];
    static const char w1[] = "<\"user.\"@docomo.ne.jp>: delivery failed";
    static const char w2[] = "<\"a..b\"@example.com>: delivery failed";
    assert_non_null(memmem(h->body, h->body_len, w1, sizeof(w1) - 1));
    assert_non_null(memmem(h->body, h->body_len, w2, sizeof(w2) - 1));
    assert_null(memmem(s, n, "<news.@", 7));
    free(s);

    /* a quoted local part's spaces are its own: "x  y" is not "x y", so
     * they are kept, and folding leaves no line of spaces only */
    static char far[300];
    /* (over 64 octets of local part, so not from MAIL or RCPT: the
     * builder's own guard) 20 spaces where the first fold falls */
    snprintf(far, sizeof(far), "\"%.52s                    \"@%.60s.%.60s.%.60s.example",
             "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk",
             "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
             "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
             "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff");
    struct dsn_rcpt sp[2] = {rcpt_failed(), rcpt_failed()};
    sp[0].addr = "\"john  doe\"@example.com";
    sp[1].addr = far;
    in = input(sp, 2);
    in.to_addr = "\"x  y\"@example.org";
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.top, m.top_len, "To", "<\"x  y\"@example.org>");
    assert_int_equal(groups(&m.parts[1], g, 8), 3);
    expect_field(g[1].hdr, g[1].hdr_len, "Final-Recipient", "rfc822; \"john  doe\"@example.com");
    char fwant[320];
    snprintf(fwant, sizeof(fwant), "rfc822; %s", far);
    expect_field(g[2].hdr, g[2].hdr_len, "Final-Recipient", fwant);
    for (const char *l = s; l < s + n;) {
        const char *e = memmem(l, (size_t)(s + n - l), "\r\n", 2);
        size_t k = 0;
        while (l + k < e && l[k] == ' ')
            k++;
        assert_true(k == 0 || l + k < e); /* no line of spaces only */
        l = e + 2;
    }
    free(s);

    /* SMTPUTF8: the utf-8 type (RFC 6533) takes a Mailbox, quoted alike */
    struct dsn_rcpt u = rcpt_failed();
    u.addr = "j\xc3\xb6rg.@example.de";
    in = input(&u, 1);
    in.smtputf8 = true;
    s = build(&in, &n);
    parse(s, n, true, &m);
    assert_int_equal(groups(&m.parts[1], g, 8), 2);
    /* the status part is quoted-printable then: look for the encoded form */
    static const char w3[] = "Final-Recipient: utf-8; \"j=C3=B6rg.\"@example.de";
    assert_non_null(memmem(m.parts[1].body, m.parts[1].body_len, w3, sizeof(w3) - 1));
    free(s);
}

/* Headers over DSN_HEADERS_MAX, as the caller reads them
 * (DSN_HEADERS_READ octets of the original): cut after the last whole
 * line, and the text says so; a header section of exactly
 * DSN_HEADERS_MAX, its empty line read, goes back whole. */
static void
test_headers_cut(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_input in = input(&r, 1);
    char *o = malloc(DSN_HEADERS_READ);
    assert_non_null(o);
    /* fields of 100 octets with CRLF: 262,144 is inside the 2,622nd */
    for (size_t i = 0; i < DSN_HEADERS_READ; i += 100) {
        size_t k = DSN_HEADERS_READ - i < 100 ? DSN_HEADERS_READ - i : 100;
        char f[101];
        snprintf(f, sizeof(f), "X-F%05zu: %0*d\r\n", i / 100, 88, 7);
        memcpy(o + i, f, k);
    }
    in.orig = o;
    in.orig_len = DSN_HEADERS_READ;
    size_t n;
    char *s = build(&in, &n);
    struct parsed m;
    parse(s, n, false, &m);
    const struct part *p = &m.parts[2];
    assert_int_equal(p->body_len, DSN_HEADERS_MAX / 100 * 100);
    assert_memory_equal(p->body, o, p->body_len);
    static const char note[] = "The headers were cut after 262144 octets.";
    assert_non_null(memmem(m.parts[0].body, m.parts[0].body_len, note, sizeof(note) - 1));
    free(s);

    /* exactly DSN_HEADERS_MAX octets of header, then the empty line */
    memset(o, 'h', DSN_HEADERS_MAX);
    memcpy(o, "X-A: ", 5);
    for (size_t i = 898; i < DSN_HEADERS_MAX - 4; i += 900)
        memcpy(o + i, "\r\nX", 3);
    memcpy(o + DSN_HEADERS_MAX - 2, "\r\n\r\n", 4);
    s = build(&in, &n);
    parse(s, n, false, &m);
    assert_int_equal(m.parts[2].body_len, DSN_HEADERS_MAX);
    assert_memory_equal(m.parts[2].body, o, DSN_HEADERS_MAX);
    assert_null(memmem(s, n, "were cut", 8));
    free(s);
    free(o);
}

static void
test_multi_rcpt(void **state)
{
    (void)state;
    struct dsn_rcpt r[3] = {rcpt_failed(), rcpt_failed(), rcpt_failed()};
    r[1].addr = "carol@example.net";
    r[1].status = "4.4.7";
    r[1].code = 0;
    r[1].text = "delivery time expired: connection timed out";
    r[1].remote_mta = NULL;
    r[1].class_str = "expired";
    r[2].addr = "dave@example.com";
    r[2].action = DSN_ACTION_DELAYED;
    r[2].status = "4.2.2";
    r[2].code = 452;
    r[2].text = "4.2.2 The email account that you tried to reach is over quota.";
    r[2].retry_until_ms = NOW + 86400000ULL;
    r[2].orcpt = "rfc822;Dave@Example.com";
    struct dsn_input in = input(r, 3);
    in.ret_full = true;
    size_t n;
    char *s = build(&in, &n);
    struct parsed m;
    parse(s, n, false, &m);
    expect_field(m.top, m.top_len, "Subject", "Undelivered Mail Returned to Sender");
    struct part g[8];
    assert_int_equal(groups(&m.parts[1], g, 8), 4);
    static const char *const addr[] = {"rfc822; bob@example.com", "rfc822; carol@example.net",
                                       "rfc822; dave@example.com"};
    static const char *const st[] = {"5.1.1", "4.4.7", "4.2.2"};
    static const char *const act[] = {"failed", "failed", "delayed"};
    for (int i = 0; i < 3; i++) {
        expect_field(g[i + 1].hdr, g[i + 1].hdr_len, "Final-Recipient", addr[i]);
        expect_field(g[i + 1].hdr, g[i + 1].hdr_len, "Status", st[i]);
        expect_field(g[i + 1].hdr, g[i + 1].hdr_len, "Action", act[i]);
    }
    /* no reply code: our reason, not an smtp diagnostic; no Remote-MTA */
    expect_field(g[2].hdr, g[2].hdr_len, "Diagnostic-Code",
                 "X-Sluice; delivery time expired: connection timed out");
    assert_null(hget(g[2].hdr, g[2].hdr_len, "Remote-MTA"));
    expect_field(g[3].hdr, g[3].hdr_len, "Will-Retry-Until", "Tue, 24 Nov 2026 02:33:51 +0000");
    expect_field(g[3].hdr, g[3].hdr_len, "Original-Recipient", "rfc822;Dave@Example.com");
    assert_null(hget(g[1].hdr, g[1].hdr_len, "Will-Retry-Until"));
    /* a failure among them: RET=FULL applies */
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "message/rfc822");
    const struct part *h = &m.parts[0];
    assert_non_null(memmem(h->body, h->body_len, "<carol@example.net>: delivery failed", 36));
    assert_non_null(memmem(h->body, h->body_len, "Reason: delivery time expired", 29));
    assert_non_null(memmem(h->body, h->body_len, "<dave@example.com>: delivery delayed", 36));
    free(s);
}

/* A success report (RFC 3461 5.2.2): the next hop offered no DSN. */
static struct dsn_rcpt
rcpt_relayed(void)
{
    struct dsn_rcpt r = {
        .addr = "bob@example.com",
        .orcpt = "rfc822;Bob+2BSales@Example.com",
        .action = DSN_ACTION_RELAYED,
        .status = "2.0.0",
        .code = 250,
        .text = "2.0.0 Ok: queued as 4XyZ",
        .remote_mta = "mx1.example.com",
        .last_attempt_ms = NOW - 1000,
    };
    return r;
}

static void
test_relayed(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_relayed();
    struct dsn_input in = input(&r, 1);
    in.envid = "QQ+2B314";
    in.ret_full = true; /* RFC 3461 4.3: RET is for failures; a success gets headers */
    size_t n;
    char *s = build(&in, &n);
    struct parsed m;
    parse(s, n, false, &m);
    expect_field(m.top, m.top_len, "Subject", "Successful Mail Delivery Report");
    expect_field(m.top, m.top_len, "To", "<alice@example.org>");
    assert_int_equal(m.nparts, 3);
    struct part g[4];
    assert_int_equal(groups(&m.parts[1], g, 4), 2);
    expect_field(g[0].hdr, g[0].hdr_len, "Original-Envelope-Id", "QQ+314");
    expect_field(g[1].hdr, g[1].hdr_len, "Original-Recipient", "rfc822;Bob+Sales@Example.com");
    expect_field(g[1].hdr, g[1].hdr_len, "Final-Recipient", "rfc822; bob@example.com");
    expect_field(g[1].hdr, g[1].hdr_len, "Action", "relayed");
    expect_field(g[1].hdr, g[1].hdr_len, "Status", "2.0.0");
    expect_field(g[1].hdr, g[1].hdr_len, "Remote-MTA", "dns; mx1.example.com");
    expect_field(g[1].hdr, g[1].hdr_len, "Diagnostic-Code", "smtp; 250 2.0.0 Ok: queued as 4XyZ");
    assert_null(hget(g[1].hdr, g[1].hdr_len, "Will-Retry-Until"));
    assert_null(hget(g[1].hdr, g[1].hdr_len, "X-Sluice-Class"));
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "text/rfc822-headers");
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Description", "Message Headers");
    assert_int_equal(m.parts[2].body_len, ORIG_HDR_LEN);
    const struct part *h = &m.parts[0];
    assert_non_null(memmem(h->body, h->body_len, "<bob@example.com>: delivered to a server", 40));
    assert_non_null(memmem(h->body, h->body_len, "mx1.example.com said: 250 2.0.0 Ok", 34));
    assert_null(memmem(h->body, h->body_len, "could not be delivered", 22));
    assert_null(memmem(h->body, h->body_len, "still being retried", 19));
    free(s);

    /* one failed among them: a bounce (its subject, RET=FULL applies), the
     * success still reported as relayed */
    struct dsn_rcpt two[2] = {rcpt_relayed(), rcpt_failed()};
    two[1].addr = "carol@example.com";
    in = input(two, 2);
    in.ret_full = true;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.top, m.top_len, "Subject", "Undelivered Mail Returned to Sender");
    assert_int_equal(groups(&m.parts[1], g, 4), 3);
    expect_field(g[1].hdr, g[1].hdr_len, "Action", "relayed");
    expect_field(g[2].hdr, g[2].hdr_len, "Action", "failed");
    expect_field(g[2].hdr, g[2].hdr_len, "X-Sluice-Class", "invalid_recipient");
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "message/rfc822");
    free(s);

    /* with a delay: a delay warning's subject, headers only */
    two[1].action = DSN_ACTION_DELAYED;
    two[1].status = "4.2.2";
    in = input(two, 2);
    in.ret_full = true;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.top, m.top_len, "Subject", "Delayed Mail (still being retried)");
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "text/rfc822-headers");
    free(s);
}

static void
test_delayed(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    r.action = DSN_ACTION_DELAYED;
    r.status = "4.7.0";
    r.code = 421;
    r.text = "4.7.0 Try again later, closing connection.";
    r.retry_until_ms = NOW + 4 * 86400000ULL;
    r.class_str = "rate_limited";
    struct dsn_input in = input(&r, 1);
    in.ret_full = true; /* a warning still carries headers only */
    size_t n;
    char *s = build(&in, &n);
    struct parsed m;
    parse(s, n, false, &m);
    expect_field(m.top, m.top_len, "Subject", "Delayed Mail (still being retried)");
    struct part g[4];
    assert_int_equal(groups(&m.parts[1], g, 4), 2);
    expect_field(g[1].hdr, g[1].hdr_len, "Action", "delayed");
    expect_field(g[1].hdr, g[1].hdr_len, "Status", "4.7.0");
    expect_field(g[1].hdr, g[1].hdr_len, "Will-Retry-Until", "Fri, 27 Nov 2026 02:33:51 +0000");
    expect_field(g[1].hdr, g[1].hdr_len, "Diagnostic-Code",
                 "smtp; 421 4.7.0 Try again later, closing connection.");
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "text/rfc822-headers");
    const struct part *h = &m.parts[0];
    assert_non_null(memmem(h->body, h->body_len, "still being retried", 19));
    assert_non_null(memmem(h->body, h->body_len, "Still trying until Fri, 27 Nov 2026", 35));
    assert_null(memmem(h->body, h->body_len, "could not be delivered", 22));
    free(s);
}

/* The body of a base64 part, decoded (malloc'd, *n its length). */
static char *
b64_decode(const char *s, size_t len, size_t *n)
{
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *out = malloc(len + 1);
    assert_non_null(out);
    size_t o = 0;
    unsigned acc = 0, bits = 0;
    for (size_t i = 0; i < len; i++) {
        const char *c = s[i] != '\0' ? strchr(b64, s[i]) : NULL;
        if (c == NULL)
            continue; /* CRLF, padding */
        acc = acc << 6 | (unsigned)(c - b64);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (char)(acc >> bits);
        }
    }
    out[o] = '\0';
    *n = o;
    return out;
}

/* A DSN of an SMTPUTF8 message: the global types of RFC 6533, UTF-8
 * addresses and replies kept, each part that quotes UTF-8 encoded
 * (quoted-printable; base64 for a whole message/global) so that the DSN
 * is 7-bit and reaches a sender whose MX has no SMTPUTF8. */
static void
test_smtputf8(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    r.addr = "j\xc3\xb6rg@b\xc3\xbc"
             "cher.example";
    r.text = "5.1.1 Benutzer unbekannt: j\xc3\xb6rg \xff";
    struct dsn_input in = input(&r, 1);
    in.smtputf8 = true;
    in.ret_full = true;
    size_t n;
    char *s = build(&in, &n);
    struct parsed m;
    parse(s, n, false, &m); /* 7-bit throughout */
    expect_field(m.parts[0].hdr, m.parts[0].hdr_len, "Content-Type", "text/plain; charset=utf-8");
    expect_field(m.parts[0].hdr, m.parts[0].hdr_len, "Content-Transfer-Encoding",
                 "quoted-printable");
    expect_field(m.parts[1].hdr, m.parts[1].hdr_len, "Content-Type",
                 "message/global-delivery-status");
    expect_field(m.parts[1].hdr, m.parts[1].hdr_len, "Content-Transfer-Encoding",
                 "quoted-printable");
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "message/global");
    assert_null(hget(m.top, m.top_len, "Content-Transfer-Encoding"));
    size_t dn;
    char *dec = qp_decode(m.parts[1].body, m.parts[1].body_len, &dn);
    struct part st = {m.parts[1].hdr, m.parts[1].hdr_len, dec, dn};
    struct part g[4];
    assert_int_equal(groups(&st, g, 4), 2);
    expect_field(g[1].hdr, g[1].hdr_len, "Final-Recipient",
                 "utf-8; j\xc3\xb6rg@b\xc3\xbc"
                 "cher.example");
    /* valid UTF-8 kept, an invalid octet replaced */
    expect_field(g[1].hdr, g[1].hdr_len, "Diagnostic-Code",
                 "smtp; 550 5.1.1 Benutzer unbekannt: j\xc3\xb6rg ?");
    free(dec);
    dec = qp_decode(m.parts[0].body, m.parts[0].body_len, &dn);
    assert_non_null(memmem(dec, dn, "j\xc3\xb6rg@b\xc3\xbc", 8));
    free(dec);
    free(s);

    /* an original with UTF-8 in it, returned whole: base64 */
    static const char u8msg[] = "From: J\xc3\xb6rg <j@example.org>\r\nSubject: Gr\xc3\xbc\xc3\x9f"
                                "e\r\n\r\nb\xc3\xb6" "dy =\r\n";
    in.orig = u8msg;
    in.orig_len = sizeof(u8msg) - 1;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Transfer-Encoding", "base64");
    dec = b64_decode(m.parts[2].body, m.parts[2].body_len, &dn);
    assert_true(dn >= sizeof(u8msg) - 1);
    assert_memory_equal(dec, u8msg, sizeof(u8msg) - 1);
    free(dec);
    free(s);
    /* ... or its headers: quoted-printable */
    in.ret_full = false;
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Type", "message/global-headers");
    expect_field(m.parts[2].hdr, m.parts[2].hdr_len, "Content-Transfer-Encoding",
                 "quoted-printable");
    dec = qp_decode(m.parts[2].body, m.parts[2].body_len, &dn);
    assert_non_null(memmem(dec, dn, "Subject: Gr\xc3\xbc\xc3\x9f" "e", 14));
    free(dec);
    free(s);
    in.orig = orig_msg;
    in.orig_len = sizeof(orig_msg) - 1;
    in.ret_full = true;

    /* not SMTPUTF8: the same text goes out 7-bit, types of RFC 3464 */
    in.smtputf8 = false;
    r.addr = "bob@example.com";
    s = build(&in, &n);
    parse(s, n, false, &m);
    expect_field(m.parts[1].hdr, m.parts[1].hdr_len, "Content-Type", "message/delivery-status");
    assert_int_equal(groups(&m.parts[1], g, 4), 2);
    expect_field(g[1].hdr, g[1].hdr_len, "Diagnostic-Code",
                 "smtp; 550 5.1.1 Benutzer unbekannt: j??rg ?");
    free(s);
}

static void
test_long_fields(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    /* words, then one long word: folded at spaces, cut where there is none */
    char text[1500];
    int k = snprintf(text, sizeof(text), "5.7.1 ");
    for (int i = 0; i < 40; i++)
        k += snprintf(text + k, sizeof(text) - (size_t)k, "word%02d ", i);
    memset(text + k, 'z', 1100);
    text[k + 1100] = '\0';
    r.text = text;
    char addr[1100];
    memset(addr, 'a', 1000);
    strcpy(addr + 1000, "@example.com");
    r.addr = addr;
    struct dsn_input in = input(&r, 1);
    size_t n;
    char *s = build(&in, &n);
    struct parsed m;
    parse(s, n, false, &m); /* checks every line <= 998 */
    struct part g[4];
    assert_int_equal(groups(&m.parts[1], g, 4), 2);
    char *dc = hget(g[1].hdr, g[1].hdr_len, "Diagnostic-Code");
    assert_non_null(dc);
    /* the words come back exactly; the long word once split with a space */
    assert_true(strncmp(dc + 10, text, (size_t)k) == 0);
    assert_int_equal(strlen(dc), 10 + strlen(text) + 1);
    free(dc);
    /* the human part wraps at 76 where it can */
    const struct part *h = &m.parts[0];
    const char *w = memmem(h->body, h->body_len, "    mx1.example.com said:", 25);
    assert_non_null(w);
    const char *eol = memmem(w, (size_t)(h->body + h->body_len - w), "\r\n", 2);
    assert_true(eol - w <= 76);
    free(s);
}

static void
test_invalid(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_input in;
    char *out = (char *)1;
    size_t n = 7;

    assert_int_equal(dsn_build(NULL, &out, &n), -EINVAL);
    assert_null(out);
    assert_int_equal(n, 0);
    in = input(&r, 1);
    assert_int_equal(dsn_build(&in, NULL, &n), -EINVAL);
    assert_int_equal(dsn_build(&in, &out, NULL), -EINVAL);

#define REFUSE(stmt)                                                                               \
    do {                                                                                           \
        struct dsn_rcpt rr = rcpt_failed();                                                        \
        in = input(&rr, 1);                                                                        \
        struct dsn_rcpt *rp = &rr;                                                                 \
        (void)rp;                                                                                  \
        stmt;                                                                                      \
        assert_int_equal(dsn_build(&in, &out, &n), -EINVAL);                                       \
        assert_null(out);                                                                          \
    } while (0)

    REFUSE(in.to_addr = "");
    REFUSE(in.to_addr = NULL);
    REFUSE(in.reporting_mta = "");
    REFUSE(in.from_addr = NULL);
    REFUSE(in.message_id = "<x@y>");
    REFUSE(in.message_id = "x y@z");
    REFUSE(in.message_id = "x\r\n@z");
    REFUSE(in.message_id = "");
    /* found by fuzz_dsn: a Message-ID is not folded, so a long one made a
     * line over 998 octets */
    static char long_id[DSN_MSGID_MAX + 2];
    memset(long_id, 'm', DSN_MSGID_MAX + 1);
    REFUSE(in.message_id = long_id);
    REFUSE(in.nrcpt = 0);
    REFUSE(in.rcpt = NULL);
    REFUSE(in.orig = NULL);
    REFUSE(rp->addr = "");
    REFUSE(rp->status = NULL);
    REFUSE(rp->status = "5.1");
    REFUSE(rp->status = "6.1.1");
    REFUSE(rp->status = "5.1.1 ");
    REFUSE(rp->status = "5.1.1\r\nX: y");
    REFUSE(rp->status = "5.1111.1");
    REFUSE(rp->status = "5..1");
#undef REFUSE

    /* the same input with nothing wrong builds */
    in = input(&r, 1);
    assert_int_equal(dsn_build(&in, &out, &n), 0);
    free(out);
    /* optional fields may be NULL */
    r.text = NULL;
    r.code = 0;
    r.remote_mta = NULL;
    r.class_str = NULL;
    in.boundary_seed = NULL;
    in.queue_id = NULL;
    in.arrival_ms = 0;
    assert_int_equal(dsn_build(&in, &out, &n), 0);
    struct parsed m;
    parse(out, n, false, &m);
    struct part g[4];
    assert_int_equal(groups(&m.parts[1], g, 4), 2);
    assert_null(hget(g[1].hdr, g[1].hdr_len, "Diagnostic-Code"));
    assert_null(hget(g[0].hdr, g[0].hdr_len, "Arrival-Date"));
    free(out);
}

static void
test_wanted(void **state)
{
    (void)state;
    assert_true(dsn_wanted(0, DSN_ACTION_FAILED));
    assert_false(dsn_wanted(0, DSN_ACTION_DELAYED));
    assert_false(dsn_wanted(QUEUE_NOTIFY_NEVER, DSN_ACTION_FAILED));
    assert_false(dsn_wanted(QUEUE_NOTIFY_NEVER, DSN_ACTION_DELAYED));
    assert_true(dsn_wanted(QUEUE_NOTIFY_FAILURE, DSN_ACTION_FAILED));
    assert_false(dsn_wanted(QUEUE_NOTIFY_FAILURE, DSN_ACTION_DELAYED));
    assert_false(dsn_wanted(QUEUE_NOTIFY_DELAY, DSN_ACTION_FAILED));
    assert_true(dsn_wanted(QUEUE_NOTIFY_DELAY, DSN_ACTION_DELAYED));
    assert_true(dsn_wanted(QUEUE_NOTIFY_FAILURE | QUEUE_NOTIFY_DELAY, DSN_ACTION_DELAYED));
    assert_false(dsn_wanted(QUEUE_NOTIFY_SUCCESS, DSN_ACTION_FAILED));
    assert_false(dsn_wanted(QUEUE_NOTIFY_SUCCESS, DSN_ACTION_DELAYED));
    /* a success report only for SUCCESS, never with NEVER */
    assert_true(dsn_wanted(QUEUE_NOTIFY_SUCCESS, DSN_ACTION_RELAYED));
    assert_true(dsn_wanted(QUEUE_NOTIFY_SUCCESS | QUEUE_NOTIFY_FAILURE, DSN_ACTION_RELAYED));
    assert_false(dsn_wanted(0, DSN_ACTION_RELAYED));
    assert_false(dsn_wanted(QUEUE_NOTIFY_FAILURE | QUEUE_NOTIFY_DELAY, DSN_ACTION_RELAYED));
    assert_false(dsn_wanted(QUEUE_NOTIFY_NEVER | QUEUE_NOTIFY_SUCCESS, DSN_ACTION_RELAYED));
}

static void
test_status_format(void **state)
{
    (void)state;
    char b[DSN_STATUS_MAX];
    struct smtp_enh e = {5, 1, 10}, none = {0, 0, 0};
    assert_int_equal(dsn_status_format(b, sizeof(b), &e, 550, DSN_ACTION_FAILED), 0);
    assert_string_equal(b, "5.1.10");
    assert_int_equal(dsn_status_format(b, sizeof(b), &none, 452, DSN_ACTION_DELAYED), 0);
    assert_string_equal(b, "4.0.0");
    assert_int_equal(dsn_status_format(b, sizeof(b), NULL, 554, DSN_ACTION_FAILED), 0);
    assert_string_equal(b, "5.0.0");
    assert_int_equal(dsn_status_format(b, sizeof(b), NULL, 0, DSN_ACTION_DELAYED), 0);
    assert_string_equal(b, "4.0.0");
    assert_int_equal(dsn_status_format(b, sizeof(b), NULL, 0, DSN_ACTION_FAILED), 0);
    assert_string_equal(b, "5.0.0");
    struct smtp_enh big = {5, 999, 999};
    assert_int_equal(dsn_status_format(b, sizeof(b), &big, 550, DSN_ACTION_FAILED), 0);
    assert_string_equal(b, "5.999.999");
    assert_int_equal(dsn_status_format(b, 4, &e, 550, DSN_ACTION_FAILED), -EINVAL);
    /* a success: its reply's 2.X.X, else 2.0.0, whatever else it had */
    struct smtp_enh ok = {2, 6, 0};
    assert_int_equal(dsn_status_format(b, sizeof(b), &ok, 250, DSN_ACTION_RELAYED), 0);
    assert_string_equal(b, "2.6.0");
    assert_int_equal(dsn_status_format(b, sizeof(b), &none, 250, DSN_ACTION_RELAYED), 0);
    assert_string_equal(b, "2.0.0");
    assert_int_equal(dsn_status_format(b, sizeof(b), &e, 250, DSN_ACTION_RELAYED), 0);
    assert_string_equal(b, "2.0.0");
    assert_int_equal(dsn_status_format(b, sizeof(b), NULL, 0, DSN_ACTION_RELAYED), 0);
    assert_string_equal(b, "2.0.0");
}

static uint64_t
xorshift(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* Random octets (no NUL: the fields are C strings) in every field that
 * comes from outside: the structure always holds. */
static void
test_random_text(void **state)
{
    (void)state;
    uint64_t seed = 0x9e3779b97f4a7c15ULL;
    static char text[3001], mta[300], orcpt[300], envid[300];
    char *fields[] = {text, mta, orcpt, envid};
    size_t caps[] = {sizeof(text), sizeof(mta), sizeof(orcpt), sizeof(envid)};

    for (int iter = 0; iter < 300; iter++) {
        for (int f = 0; f < 4; f++) {
            size_t len = xorshift(&seed) % caps[f];
            for (size_t i = 0; i < len; i++) {
                uint64_t v = xorshift(&seed);
                /* mostly text-like, with CR, LF, '+', '-' and 8-bit mixed in */
                static const char pick[] = "\r\n+-- ;:aZ09";
                char c = (v & 3) ? pick[(v >> 8) % (sizeof(pick) - 1)] : (char)(1 + (v >> 8) % 255);
                fields[f][i] = c;
            }
            fields[f][len] = '\0';
        }
        memcpy(orcpt, "rfc822;", 7 < strlen(orcpt) ? 7 : 0);
        struct dsn_rcpt r = rcpt_failed();
        r.text = text;
        r.remote_mta = mta;
        r.orcpt = orcpt;
        struct dsn_input in = input(&r, 1);
        in.envid = envid;
        in.smtputf8 = (iter & 1) != 0;
        in.ret_full = (iter & 2) != 0;
        size_t n;
        char *s = build(&in, &n);
        struct parsed m;
        parse(s, n, in.smtputf8, &m);
        assert_int_equal(m.nparts, 3);
        struct part g[4];
        assert_int_equal(groups(&m.parts[1], g, 4), 2);
        expect_field(g[1].hdr, g[1].hdr_len, "Status", "5.1.1");
        expect_field(g[1].hdr, g[1].hdr_len, "Action", "failed");
        free(s);
    }
}

/* A DSN's body type is what its own text holds: one that quotes a UTF-8
 * address in its parts is 7BIT (they are encoded), one whose own header
 * names a UTF-8 sender is 8BITMIME though its original was stored 7BIT
 * (declared SMTPUTF8, all ASCII), else it went out as 7BIT, 8-bit octets
 * and all; one all ASCII is 7BIT though its original was 8-bit (headers
 * only returned, all ASCII), and so is one that returns an 8-bit
 * original with RET=FULL (its headers, encoded). */
/* dsn_msg_strerror: the log's text for a DSN that could not be made
 * says which input was refused, not a bare -22. */
static void
test_msg_strerror(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_input in = input(&r, 1);
    struct queue_envelope orig = {.id = 7, .sender = "alice@example.org"};
    struct dsn_msg *m = (struct dsn_msg *)1;

    in.message_id = "Q1.dsn1.w0@relay<1>.test";
    assert_int_equal(dsn_msg_new(&in, &orig, 8, &m), -EINVAL);
    assert_null(m);
    const char *why = dsn_msg_strerror(-EINVAL, &in, &orig);
    assert_non_null(strstr(why, "Message-ID malformed"));
    assert_non_null(strstr(why, "server hostname"));

    in = input(&r, 1);
    orig.sender = "";
    assert_int_equal(dsn_msg_new(&in, &orig, 8, &m), -EINVAL);
    assert_string_equal(dsn_msg_strerror(-EINVAL, &in, &orig), "the original has the null sender");
    static char big[QUEUE_MAX_ADDR + 8];
    memset(big, 'a', sizeof(big) - 1);
    orig.sender = big;
    assert_string_equal(dsn_msg_strerror(-EINVAL, &in, &orig), "the original's sender is too long");
    orig.sender = "alice@example.org";
    r.status = "5.1";
    assert_string_equal(dsn_msg_strerror(-EINVAL, &in, &orig),
                        "a recipient's status is no RFC 3463 code");
    in.nrcpt = 0;
    assert_string_equal(dsn_msg_strerror(-EINVAL, &in, &orig), "no recipients to report");
    r = rcpt_failed();
    in = input(&r, 1);
    /* an input that is fine: the code's own text */
    assert_string_equal(dsn_msg_strerror(-ENOMEM, &in, &orig), strerror(ENOMEM));
    assert_string_equal(dsn_msg_strerror(-EINVAL, &in, &orig), strerror(EINVAL));
}

static void
test_msg_body_type(void **state)
{
    (void)state;
    struct dsn_rcpt r = rcpt_failed();
    r.addr = "j\xc3\xb6rg@example.com";
    struct dsn_input in = input(&r, 1);
    in.smtputf8 = true;
    struct queue_envelope orig = {.id = 7, .sender = "alice@example.org",
                                  .body_type = QUEUE_BODY_7BIT, .smtputf8 = true};
    struct dsn_msg *m = NULL;
    assert_int_equal(dsn_msg_new(&in, &orig, 8, &m), 0);
    assert_int_equal(m->body_type, QUEUE_BODY_7BIT);
    assert_true(m->smtputf8);
    m = dsn_msg_free(m);
    in.to_addr = "j\xc3\xb6rg@example.org"; /* its To: field cannot be encoded */
    assert_int_equal(dsn_msg_new(&in, &orig, 8, &m), 0);
    assert_int_equal(m->body_type, QUEUE_BODY_8BITMIME);
    m = dsn_msg_free(m);
    r = rcpt_failed();
    in = input(&r, 1);
    orig.body_type = QUEUE_BODY_8BITMIME;
    orig.smtputf8 = false;
    assert_int_equal(dsn_msg_new(&in, &orig, 9, &m), 0);
    assert_int_equal(m->body_type, QUEUE_BODY_7BIT);
    m = dsn_msg_free(m);
    static const char o8[] = "Subject: caf\xc3\xa9\r\n\r\nna\xc3\xafve\r\n";
    in.orig = o8;
    in.orig_len = sizeof(o8) - 1;
    in.ret_full = true;
    assert_int_equal(dsn_msg_new(&in, &orig, 10, &m), 0);
    assert_int_equal(m->body_type, QUEUE_BODY_7BIT);
    m = dsn_msg_free(m);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_failed_headers), cmocka_unit_test(test_xtext),
        cmocka_unit_test(test_hostile_text),   cmocka_unit_test(test_ret_modes),
        cmocka_unit_test(test_orig_shapes),    cmocka_unit_test(test_multi_rcpt),
        cmocka_unit_test(test_addr_quoted),
        cmocka_unit_test(test_headers_cut),
        cmocka_unit_test(test_delayed),        cmocka_unit_test(test_relayed),
        cmocka_unit_test(test_smtputf8),       cmocka_unit_test(test_long_fields),
        cmocka_unit_test(test_invalid),
        cmocka_unit_test(test_wanted),         cmocka_unit_test(test_status_format),
        cmocka_unit_test(test_random_text),
        cmocka_unit_test(test_msg_body_type),
        cmocka_unit_test(test_msg_strerror),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
