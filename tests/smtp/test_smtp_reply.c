/*
 * Tests of engine/smtp_reply.c: a table of reply streams (valid and
 * malformed) checked whole, at every split into two reads and byte by
 * byte, which must all give the same replies and the same error; limits;
 * the sticky error; EHLO capabilities.
 *
 * Threading: single-threaded test program.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/smtp_reply.h"

#define L(s) s, sizeof(s) - 1
#define MAXR 4

/* What a stream of bytes gave: the replies in order, then any error. */
struct got {
    int n;
    int err;
    struct {
        unsigned code, nlines, cls, subject, detail, enh_len;
        bool truncated;
        size_t text_len;
        char text[SMTP_REPLY_TEXT_MAX + 1];
    } r[MAXR];
};

static struct smtp_reply_parser parser;

static void
record(struct got *g, const struct smtp_reply *r)
{
    assert_true(g->n < MAXR);
    g->r[g->n].code = r->code;
    g->r[g->n].nlines = r->nlines;
    g->r[g->n].cls = r->enh.cls;
    g->r[g->n].subject = r->enh.subject;
    g->r[g->n].detail = r->enh.detail;
    g->r[g->n].enh_len = r->enh_len;
    g->r[g->n].truncated = r->truncated;
    g->r[g->n].text_len = r->text_len;
    assert_true(r->text_len <= SMTP_REPLY_TEXT_MAX);
    assert_int_equal(r->text[r->text_len], '\0');
    memcpy(g->r[g->n].text, r->text, r->text_len + 1u);
    g->n++;
}

/* Feed one read; every DONE is recorded, MORE must consume it all. */
static void
feed(struct got *g, const char *buf, size_t len)
{
    size_t off = 0;

    while (off < len && g->err == 0) {
        size_t used = 12345;
        int rc = smtp_reply_parse(&parser, buf + off, len - off, &used);

        assert_true(used <= len - off);
        if (rc < 0) {
            g->err = rc;
            return;
        }
        off += used;
        if (rc == SMTP_REPLY_DONE)
            record(g, &parser.reply);
        else
            assert_int_equal(off, len);
    }
}

static void
same(const struct got *a, const struct got *b, const char *how, size_t at)
{
    if (a->n != b->n || a->err != b->err)
        fail_msg("%s %zu: %d replies err %d, whole: %d replies err %d", how, at, a->n, a->err, b->n,
                 b->err);
    for (int i = 0; i < a->n; i++) {
        if (a->r[i].code != b->r[i].code || a->r[i].nlines != b->r[i].nlines ||
            a->r[i].cls != b->r[i].cls || a->r[i].subject != b->r[i].subject ||
            a->r[i].detail != b->r[i].detail || a->r[i].enh_len != b->r[i].enh_len ||
            a->r[i].text_len != b->r[i].text_len || a->r[i].truncated != b->r[i].truncated ||
            memcmp(a->r[i].text, b->r[i].text, a->r[i].text_len) != 0)
            fail_msg("%s %zu: reply %d differs", how, at, i);
    }
}

static struct got whole, part;

/* Parse in whole, at every split into two reads, and byte by byte; all
 * must agree. Leaves the whole-input result in `whole`. */
static void
check_splits(const char *in, size_t len)
{
    memset(&whole, 0, sizeof whole);
    smtp_reply_parser_init(&parser);
    feed(&whole, in, len);
    for (size_t cut = 0; cut <= len; cut++) {
        memset(&part, 0, sizeof part);
        smtp_reply_parser_init(&parser);
        feed(&part, in, cut);
        feed(&part, in + cut, len - cut);
        same(&part, &whole, "split at", cut);
    }
    memset(&part, 0, sizeof part);
    smtp_reply_parser_init(&parser);
    for (size_t i = 0; i < len; i++)
        feed(&part, in + i, 1);
    same(&part, &whole, "byte by byte", 0);
}

struct want {
    unsigned code, nlines;
    const char *text;
    unsigned cls, subject, detail, enh_len;
};

struct rcase {
    const char *in;
    size_t len;
    int err;
    int n;
    struct want r[3];
};

#define E(x) SMTP_REPLY_E_##x

static const struct rcase rcases[] = {
    {L("250 OK\r\n"), 0, 1, {{250, 1, "OK", 0, 0, 0, 0}}},
    {L("250 2.0.0 Ok: queued as ABC\r\n"), 0, 1, {{250, 1, "2.0.0 Ok: queued as ABC", 2, 0, 0, 6}}},
    {L("250\r\n"), 0, 1, {{250, 1, "", 0, 0, 0, 0}}},
    {L("250 \r\n"), 0, 1, {{250, 1, "", 0, 0, 0, 0}}},
    {L("250-mx.example.com\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"),
     0,
     1,
     {{250, 3, "mx.example.com\nPIPELINING\nSIZE 1000", 0, 0, 0, 0}}},
    {L("250-\r\n250 \r\n"), 0, 1, {{250, 2, "\n", 0, 0, 0, 0}}},
    {L("250-a\r\n250\r\n"), 0, 1, {{250, 2, "a\n", 0, 0, 0, 0}}},
    {L("550-5.1.1 No such user\r\n550 5.1.1 See https://example.com/x\r\n"),
     0,
     1,
     {{550, 2, "5.1.1 No such user\n5.1.1 See https://example.com/x", 5, 1, 1, 6}}},
    {L("550 2.1.1 mismatched class\r\n"), 0, 1, {{550, 1, "2.1.1 mismatched class", 0, 0, 0, 0}}},
    {L("451 4.7.1\r\n"), 0, 1, {{451, 1, "4.7.1", 4, 7, 1, 5}}},
    {L("452 4.5.3 Too many recipients\r\n"),
     0,
     1,
     {{452, 1, "4.5.3 Too many recipients", 4, 5, 3, 6}}},
    {L("554 5.123.456 x\r\n"), 0, 1, {{554, 1, "5.123.456 x", 5, 123, 456, 10}}},
    {L("250 2.0.0.1 x\r\n"), 0, 1, {{250, 1, "2.0.0.1 x", 0, 0, 0, 0}}},
    {L("250 2.1000.0 x\r\n"), 0, 1, {{250, 1, "2.1000.0 x", 0, 0, 0, 0}}},
    {L("250 2.0.0x\r\n"), 0, 1, {{250, 1, "2.0.0x", 0, 0, 0, 0}}},
    {L("250 2..0 x\r\n"), 0, 1, {{250, 1, "2..0 x", 0, 0, 0, 0}}},
    {L("354 Start mail input; end with <CRLF>.<CRLF>\r\n"),
     0,
     1,
     {{354, 1, "Start mail input; end with <CRLF>.<CRLF>", 0, 0, 0, 0}}},
    {L("354 3.0.0 go ahead\r\n"), 0, 1, {{354, 1, "3.0.0 go ahead", 0, 0, 0, 0}}},
    {L("250 OK\r\n221 2.0.0 Bye\r\n"),
     0,
     2,
     {{250, 1, "OK", 0, 0, 0, 0}, {221, 1, "2.0.0 Bye", 2, 0, 0, 6}}},
    {L("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"),
     0,
     3,
     {{250, 1, "2.1.0 Ok", 2, 1, 0, 6},
      {250, 1, "2.1.5 Ok", 2, 1, 5, 6},
      {354, 1, "End data with <CR><LF>.<CR><LF>", 0, 0, 0, 0}}},
    {L("220-first\r\n220 second\r\n"), 0, 1, {{220, 2, "first\nsecond", 0, 0, 0, 0}}},
    {L("250 caf\xc3\xa9\tok\x01\r\n"), 0, 1, {{250, 1, "caf\xc3\xa9\tok\x01", 0, 0, 0, 0}}},
    /* a partial reply is not a reply */
    {L("250-a\r\n250 b"), 0, 0, {{0}}},
    {L("250 OK\r"), 0, 0, {{0}}},

    /* malformed */
    {L("25O OK\r\n"), E(CODE), 0, {{0}}},
    {L("600 x\r\n"), E(CODE), 0, {{0}}},
    {L("199 x\r\n"), E(CODE), 0, {{0}}},
    {L("260 x\r\n"), E(CODE), 0, {{0}}},
    {L("-250 x\r\n"), E(CODE), 0, {{0}}},
    {L(" 250 x\r\n"), E(CODE), 0, {{0}}},
    {L("25\r\n"), E(CODE), 0, {{0}}},
    {L("\r\n"), E(CODE), 0, {{0}}},
    {L("2500 x\r\n"), E(SEPARATOR), 0, {{0}}},
    {L("250_x\r\n"), E(SEPARATOR), 0, {{0}}},
    {L("250\tx\r\n"), E(SEPARATOR), 0, {{0}}},
    {L("250-a\r\n251 b\r\n"), E(CODE_CHANGED), 0, {{0}}},
    {L("250-a\r\n550-b\r\n"), E(CODE_CHANGED), 0, {{0}}},
    {L("250 OK\n"), E(BARE_LF), 0, {{0}}},
    {L("250-OK\n250 OK\r\n"), E(BARE_LF), 0, {{0}}},
    {L("\n"), E(BARE_LF), 0, {{0}}},
    {L("250 O\rK\r\n"), E(BARE_CR), 0, {{0}}},
    {L("250 OK\r\r\n"), E(BARE_CR), 0, {{0}}},
    {L("25\r0 OK\r\n"), E(BARE_CR), 0, {{0}}},
    {L("250 O\0K\r\n"), E(NUL), 0, {{0}}},
    {L("2\0"
       "50 OK\r\n"),
     E(NUL),
     0,
     {{0}}},
    {L("250 OK\r\0"), E(BARE_CR), 0, {{0}}},
    /* a good reply, then a bad one: the first is delivered */
    {L("250 OK\r\nxyz\r\n"), E(CODE), 1, {{250, 1, "OK", 0, 0, 0, 0}}},
    {L("250 OK\r\n250 OK\n"), E(BARE_LF), 1, {{250, 1, "OK", 0, 0, 0, 0}}},
};

static void
test_table(void **state)
{
    for (size_t i = 0; i < sizeof rcases / sizeof rcases[0]; i++) {
        const struct rcase *c = &rcases[i];

        check_splits(c->in, c->len);
        if (whole.err != c->err || whole.n != c->n)
            fail_msg("case %zu: err %d (%s) n %d, want err %d n %d", i, whole.err,
                     smtp_reply_err_str(whole.err), whole.n, c->err, c->n);
        for (int k = 0; k < c->n; k++) {
            const struct want *w = &c->r[k];

            if (whole.r[k].code != w->code || whole.r[k].nlines != w->nlines ||
                strcmp(whole.r[k].text, w->text) != 0)
                fail_msg("case %zu reply %d: %u/%u '%s'", i, k, whole.r[k].code, whole.r[k].nlines,
                         whole.r[k].text);
            if (whole.r[k].cls != w->cls || whole.r[k].subject != w->subject ||
                whole.r[k].detail != w->detail || whole.r[k].enh_len != w->enh_len)
                fail_msg("case %zu reply %d: enhanced %u.%u.%u len %u", i, k, whole.r[k].cls,
                         whole.r[k].subject, whole.r[k].detail, whole.r[k].enh_len);
        }
    }
}

/* Build "code-text" lines into buf; the last with a space. */
static size_t
build(char *buf, const char *code, int lines, size_t text_len)
{
    size_t n = 0;

    for (int i = 0; i < lines; i++) {
        memcpy(buf + n, code, 3);
        buf[n + 3] = i + 1 == lines ? ' ' : '-';
        n += 4;
        memset(buf + n, 'a' + i % 26, text_len);
        n += text_len;
        buf[n++] = '\r';
        buf[n++] = '\n';
    }
    return n;
}

/* Over the bounds kept, a reply keeps its code and loses text, never the
 * reply: a 250 to the final dot that said too much was a protocol error,
 * and the message went again at every retry. */
static void
test_limits(void **state)
{
    static char buf[96 * 1024];
    size_t n;

    /* 512 octets with CRLF: kept whole */
    n = build(buf, "250", 1, 506);
    assert_int_equal(n, 512);
    check_splits(buf, n);
    assert_int_equal(whole.err, 0);
    assert_int_equal(whole.r[0].text_len, 506);
    assert_false(whole.r[0].truncated);
    /* one octet over: the line is cut, the reply stands */
    n = build(buf, "250", 1, 507);
    check_splits(buf, n);
    assert_int_equal(whole.err, 0);
    assert_int_equal(whole.n, 1);
    assert_int_equal(whole.r[0].code, 250);
    assert_int_equal(whole.r[0].text_len, 506);
    assert_true(whole.r[0].truncated);
    assert_true(smtp_reply_line_cut(&parser.reply, 0));
    assert_false(smtp_reply_line_cut(&parser.reply, 1));
    /* a 550 whose only line runs to 600 octets keeps its code and
     * enhanced code (a bounce, not a protocol error) */
    memcpy(buf, "550 5.1.1 ", 10);
    memset(buf + 10, 'u', 600);
    memcpy(buf + 610, "\r\n", 2);
    check_splits(buf, 612);
    assert_int_equal(whole.err, 0);
    assert_int_equal(whole.r[0].code, 550);
    assert_int_equal(whole.r[0].cls, 5);
    assert_int_equal(whole.r[0].detail, 1);
    assert_true(whole.r[0].truncated);
    /* a line of 2000 octets with its CRLF late, then the next reply: both
     * come out, the first cut */
    memset(buf, 'x', 2000);
    memcpy(buf, "250-", 4);
    memcpy(buf + 2000, "\r\n250 end\r\n221 bye\r\n", 20);
    check_splits(buf, 2020);
    assert_int_equal(whole.err, 0);
    assert_int_equal(whole.n, 2);
    assert_int_equal(whole.r[0].nlines, 2);
    assert_string_equal(whole.r[0].text + 506, "\nend");
    assert_true(whole.r[0].truncated);
    assert_int_equal(whole.r[1].code, 221);
    assert_false(whole.r[1].truncated);
    /* a reply without an end is refused at SMTP_REPLY_RAW_MAX, not later */
    memset(buf, 'x', sizeof buf);
    memcpy(buf, "250 ", 4);
    smtp_reply_parser_init(&parser);
    {
        size_t used;

        assert_int_equal(smtp_reply_parse(&parser, buf, sizeof buf, &used), SMTP_REPLY_E_TOO_LONG);
        assert_true(used <= SMTP_REPLY_RAW_MAX);
    }
    smtp_reply_parser_init(&parser);
    {
        size_t used, off = 0;
        int rc = 0;

        /* endless continuation lines: the same bound */
        for (n = 0; n + 6 <= sizeof buf; n += 6)
            memcpy(buf + n, "250-\r\n", 6);
        while (off < n && (rc = smtp_reply_parse(&parser, buf + off, n - off, &used)) >= 0)
            off += used;
        assert_int_equal(rc, SMTP_REPLY_E_TOO_LONG);
        assert_true(off <= SMTP_REPLY_RAW_MAX);
    }

    /* lines: 100 kept; the 101st read, its code checked, left out */
    n = build(buf, "250", SMTP_REPLY_LINES_MAX, 3);
    check_splits(buf, n);
    assert_int_equal(whole.err, 0);
    assert_int_equal(whole.r[0].nlines, SMTP_REPLY_LINES_MAX);
    assert_false(whole.r[0].truncated);
    n = build(buf, "250", SMTP_REPLY_LINES_MAX + 50, 3);
    check_splits(buf, n);
    assert_int_equal(whole.err, 0);
    assert_int_equal(whole.r[0].nlines, SMTP_REPLY_LINES_MAX);
    assert_int_equal(whole.r[0].text_len, SMTP_REPLY_LINES_MAX * 4 - 1);
    assert_int_equal(whole.r[0].text[whole.r[0].text_len - 1],
                     'a' + (SMTP_REPLY_LINES_MAX - 1) % 26);
    assert_true(whole.r[0].truncated);
    memcpy(buf + n - 9, "251", 3); /* a line left out still may not change the code */
    check_splits(buf, n);
    assert_int_equal(whole.err, SMTP_REPLY_E_CODE_CHANGED);
    assert_int_equal(whole.n, 0);

    /* text: 4096 octets, separators included; a full line holds 506 */
    n = build(buf, "250", 8, 506);
    check_splits(buf, n);
    assert_int_equal(whole.err, 0);
    assert_int_equal(whole.r[0].text_len, 8 * 506 + 7);
    n = build(buf, "250", 12, 506);
    check_splits(buf, n);
    assert_int_equal(whole.err, 0);
    assert_int_equal(whole.r[0].nlines, 9);
    assert_int_equal(whole.r[0].text_len, SMTP_REPLY_TEXT_MAX);
    assert_true(whole.r[0].truncated);
    {
        /* exactly at the bound, then one over */
        size_t fill = SMTP_REPLY_TEXT_MAX - (8 * 506 + 8);

        n = build(buf, "250", 8, 506);
        buf[n - 2 - 506 - 1] = '-';
        n += build(buf + n, "250", 1, fill);
        check_splits(buf, n);
        assert_int_equal(whole.err, 0);
        assert_int_equal(whole.r[0].text_len, SMTP_REPLY_TEXT_MAX);
        assert_false(whole.r[0].truncated);
        n = build(buf, "250", 8, 506);
        buf[n - 2 - 506 - 1] = '-';
        n += build(buf + n, "250", 1, fill + 1);
        check_splits(buf, n);
        assert_int_equal(whole.err, 0);
        assert_int_equal(whole.r[0].text_len, SMTP_REPLY_TEXT_MAX);
        assert_true(whole.r[0].truncated);
        /* the text full, one more line: left out, after a '\n' taken back */
        n = build(buf, "250", 8, 506);
        buf[n - 2 - 506 - 1] = '-';
        n += build(buf + n, "250", 1, fill);
        buf[n - 2 - fill - 1] = '-';
        n += build(buf + n, "250", 1, 5);
        check_splits(buf, n);
        assert_int_equal(whole.err, 0);
        assert_int_equal(whole.r[0].nlines, 9);
        assert_int_equal(whole.r[0].text_len, SMTP_REPLY_TEXT_MAX);
        assert_int_equal(whole.r[0].text[SMTP_REPLY_TEXT_MAX - 1], 'a');
        assert_true(whole.r[0].truncated);
        assert_true(!smtp_reply_line_cut(&parser.reply, 8));
        /* the text ends one short of full: the next line is left out
         * all the same, no empty line kept at the very end */
        n = build(buf, "250", 8, 506);
        buf[n - 2 - 506 - 1] = '-';
        n += build(buf + n, "250", 1, fill - 1);
        buf[n - 2 - (fill - 1) - 1] = '-';
        n += build(buf + n, "250", 1, 5);
        check_splits(buf, n);
        assert_int_equal(whole.err, 0);
        assert_int_equal(whole.r[0].nlines, 9);
        assert_int_equal(whole.r[0].text_len, SMTP_REPLY_TEXT_MAX - 1);
        assert_true(whole.r[0].truncated);
        for (unsigned i = 0; i < 9; i++)
            assert_false(smtp_reply_line_cut(&parser.reply, i));
    }
}

static void
test_sticky_error(void **state)
{
    size_t used;

    smtp_reply_parser_init(&parser);
    assert_int_equal(smtp_reply_parse(&parser, L("250 OK\n"), &used), SMTP_REPLY_E_BARE_LF);
    assert_int_equal(smtp_reply_parse(&parser, L("250 OK\r\n"), &used), SMTP_REPLY_E_BARE_LF);
    assert_int_equal(used, 0);
    smtp_reply_parser_init(&parser);
    assert_int_equal(smtp_reply_parse(&parser, L("250 OK\r\n"), &used), SMTP_REPLY_DONE);
    assert_int_equal(used, 8);
    assert_int_equal(parser.reply.code, 250);
    /* nothing given: nothing happens */
    assert_int_equal(smtp_reply_parse(&parser, "", 0, &used), SMTP_REPLY_MORE);
    assert_int_equal(used, 0);
    assert_int_equal(parser.reply.nlines, 0);
}

static void
test_lines(void **state)
{
    struct smtp_span t;
    size_t used;

    smtp_reply_parser_init(&parser);
    assert_int_equal(smtp_reply_parse(&parser, L("250-one\r\n250-\r\n250 three\r\n"), &used),
                     SMTP_REPLY_DONE);
    assert_int_equal(smtp_reply_line(&parser.reply, 0, &t), 0);
    assert_int_equal(t.len, 3);
    assert_memory_equal(t.ptr, "one", 3);
    assert_int_equal(smtp_reply_line(&parser.reply, 1, &t), 0);
    assert_int_equal(t.len, 0);
    assert_int_equal(smtp_reply_line(&parser.reply, 2, &t), 0);
    assert_int_equal(t.len, 5);
    assert_memory_equal(t.ptr, "three", 5);
    assert_int_equal(smtp_reply_line(&parser.reply, 3, &t), -1);
    for (int e = SMTP_REPLY_E_NOT_EHLO; e <= SMTP_REPLY_E_CODE; e++)
        assert_string_not_equal(smtp_reply_err_str(e), "unknown error");
}

static int
ehlo(const char *in, size_t len, struct smtp_ehlo *caps)
{
    size_t used;

    smtp_reply_parser_init(&parser);
    assert_int_equal(smtp_reply_parse(&parser, in, len, &used), SMTP_REPLY_DONE);
    assert_int_equal(used, len);
    return smtp_reply_ehlo(&parser.reply, caps);
}

static void
test_ehlo(void **state)
{
    struct smtp_ehlo c;
    static char big[8192];
    size_t n = 0;

    /* a SIZE line cut where the text filled (52428800 would read as
     * 5242880, and a 6 MB message bounce as too large): not read; the
     * PIPELINING after it was not kept */
    n += (size_t)snprintf(big + n, sizeof big - n, "250-mx.example greets you\r\n");
    for (int i = 0; i < 8; i++)
        n += (size_t)snprintf(big + n, sizeof big - n, "250-X-PAD %0494d\r\n", 0);
    n += (size_t)snprintf(big + n, sizeof big - n,
                          "250-X-PAD %047d\r\n250-SIZE 52428800\r\n250 PIPELINING\r\n", 0);
    assert_int_equal(ehlo(big, n, &c), 0);
    assert_true(parser.reply.truncated);
    assert_true(smtp_reply_line_cut(&parser.reply, 10));
    assert_int_equal(c.ext & (SMTP_EXT_SIZE | SMTP_EXT_PIPELINING), 0);
    assert_int_equal(c.size_max, 0);
    /* a line cut at its own bound: not read either; the next ones are */
    n = (size_t)snprintf(big, sizeof big, "250-mx\r\n250-SIZE 1000 %0600d\r\n250 PIPELINING\r\n",
                         0);
    assert_int_equal(ehlo(big, n, &c), 0);
    assert_int_equal(c.ext, SMTP_EXT_PIPELINING);

    assert_int_equal(ehlo(L("250-mx.example.com Hello client [192.0.2.1]\r\n"
                            "250-PIPELINING\r\n"
                            "250-SIZE 35882577\r\n"
                            "250-8BITMIME\r\n"
                            "250-STARTTLS\r\n"
                            "250-AUTH PLAIN LOGIN XOAUTH2\r\n"
                            "250-AUTH=PLAIN LOGIN CRAM-MD5\r\n"
                            "250-ENHANCEDSTATUSCODES\r\n"
                            "250-smtputf8\r\n"
                            "250-CHUNKING\r\n"
                            "250-BINARYMIME\r\n"
                            "250-DSN\r\n"
                            "250-LIMITS RCPTMAX=100 MAILMAX=50\r\n"
                            "250 X-UNKNOWN stuff\r\n"),
                          &c),
                     0);
    assert_int_equal(c.ext, SMTP_EXT_PIPELINING | SMTP_EXT_SIZE | SMTP_EXT_8BITMIME |
                                SMTP_EXT_STARTTLS | SMTP_EXT_AUTH | SMTP_EXT_ENHANCEDSTATUSCODES |
                                SMTP_EXT_SMTPUTF8 | SMTP_EXT_CHUNKING | SMTP_EXT_BINARYMIME |
                                SMTP_EXT_DSN | SMTP_EXT_LIMITS);
    assert_int_equal(c.size_max, 35882577);
    assert_int_equal(c.auth,
                     SMTP_AUTH_PLAIN | SMTP_AUTH_LOGIN | SMTP_AUTH_XOAUTH2 | SMTP_AUTH_CRAM_MD5);
    assert_int_equal(c.rcpt_max, 100);
    assert_int_equal(c.mail_max, 50);

    /* SIZE with no number: no limit given */
    assert_int_equal(ehlo(L("250-mx\r\n250 SIZE\r\n"), &c), 0);
    assert_int_equal(c.ext, SMTP_EXT_SIZE);
    assert_int_equal(c.size_max, 0);
    /* SIZE that does not parse: as if absent */
    assert_int_equal(ehlo(L("250-mx\r\n250-SIZE abc\r\n250 SIZE 99999999999999999999999\r\n"), &c),
                     0);
    assert_int_equal(c.ext, 0);
    /* the greeting line is not a keyword; an EHLO with none at all */
    assert_int_equal(ehlo(L("250-PIPELINING\r\n250 DSN\r\n"), &c), 0);
    assert_int_equal(c.ext, SMTP_EXT_DSN);
    assert_int_equal(ehlo(L("250 mx.example.com\r\n"), &c), 0);
    assert_int_equal(c.ext, 0);
    /* keywords are whole words */
    assert_int_equal(ehlo(L("250-mx\r\n250-PIPELININGX\r\n250-DSNX\r\n250 XDSN\r\n"), &c), 0);
    assert_int_equal(c.ext, 0);
    /* unknown mechanisms are skipped; LIMITS values that do not parse too */
    assert_int_equal(
        ehlo(L("250-mx\r\n250-AUTH FOO PLAIN\r\n250 LIMITS RCPTMAX=x MAILMAX=7\r\n"), &c), 0);
    assert_int_equal(c.auth, SMTP_AUTH_PLAIN);
    assert_int_equal(c.rcpt_max, 0);
    assert_int_equal(c.mail_max, 7);
    assert_int_equal(ehlo(L("502 5.5.1 no EHLO here\r\n"), &c), SMTP_REPLY_E_NOT_EHLO);
    assert_int_equal(c.ext, 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_sticky_error), cmocka_unit_test(test_lines),
        cmocka_unit_test(test_ehlo),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
