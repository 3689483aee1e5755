/*
 * Tests of engine/smtp_cmd.c and smtp_cmd_args.c: line framing, the
 * command parser (a table of valid and invalid lines with their error
 * codes, then the fields of the parsed commands), the character classes
 * against their RFC definitions, and MAIL/RCPT formatting with a parse
 * round trip.
 *
 * Threading: single-threaded test program.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "engine/smtp_cmd.h"

#define L(s) s, sizeof(s) - 1

static bool
span_is(struct smtp_span s, const char *want)
{
    return s.len == strlen(want) && memcmp(s.ptr, want, s.len) == 0;
}

#define assert_span(s, want)                                                                       \
    do {                                                                                           \
        if (!span_is((s), (want)))                                                                 \
            fail_msg("span '%.*s' != '%s'", (int)(s).len, (s).ptr ? (s).ptr : "", (want));         \
    } while (0)

/* ---- line framing ---- */

static void
test_line_find(void **state)
{
    static const struct {
        const char *buf;
        size_t len, max;
        long rc;
        size_t err_off;
    } cases[] = {
        {L("NOOP\r\n"), 512, 6, 0},
        {L("\r\n"), 512, 2, 0},
        {L("NOOP\r\nQUIT\r\n"), 512, 6, 0},
        {L("NOOP"), 512, 0, 0},
        {L("NOOP\r"), 512, 0, 0},
        {L(""), 512, 0, 0},
        {L("NOOP\n"), 512, SMTP_CMD_E_BARE_LF, 4},
        {L("\n"), 512, SMTP_CMD_E_BARE_LF, 0},
        {L("NO\rOP\r\n"), 512, SMTP_CMD_E_BARE_CR, 2},
        {L("NO\rOP"), 512, SMTP_CMD_E_BARE_CR, 2},
        {L("\r\r\n"), 512, SMTP_CMD_E_BARE_CR, 0},
        {L("NOOP\n\r\n"), 512, SMTP_CMD_E_BARE_LF, 4},
        /* limits: max counts the CRLF */
        {L("123456\r\n"), 8, 8, 0},
        {L("1234567\r\n"), 8, SMTP_CMD_E_LINE_TOO_LONG, 8},
        {L("1234567\r"), 8, SMTP_CMD_E_LINE_TOO_LONG, 8},
        {L("12345678"), 8, SMTP_CMD_E_LINE_TOO_LONG, 8},
        {L("1234567"), 8, 0, 0},
        {L("123456\r\nmore than the limit"), 8, 8, 0},
    };

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t off = 9999;
        long rc = smtp_cmd_line_find(cases[i].buf, cases[i].len, cases[i].max, &off);

        if (rc != cases[i].rc)
            fail_msg("case %zu: rc %ld, want %ld", i, rc, cases[i].rc);
        if (rc < 0 && off != cases[i].err_off)
            fail_msg("case %zu: err_off %zu, want %zu", i, off, cases[i].err_off);
    }
    assert_int_equal(smtp_cmd_line_find(L("x\n"), 512, NULL), SMTP_CMD_E_BARE_LF);
}

/* ---- parser table ---- */

struct pcase {
    const char *line;
    size_t len;
    uint32_t flags;
    int rc;
    enum smtp_verb verb; /* checked when rc == 0 */
};

/* clang-format off */
#define OK(s, v)      {L(s), 0, 0, SMTP_VERB_##v}
#define OKF(s, f, v)  {L(s), f, 0, SMTP_VERB_##v}
#define BAD(s, e)     {L(s), 0, SMTP_CMD_E_##e, SMTP_VERB_NONE}
#define BADF(s, f, e) {L(s), f, SMTP_CMD_E_##e, SMTP_VERB_NONE}
/* clang-format on */
#define U8 SMTP_CMD_F_UTF8

static const struct pcase pcases[] = {
    /* verbs */
    OK("HELO mx.example.com", HELO),
    OK("helo mx.example.com", HELO),
    OK("EHLO [192.0.2.1]", EHLO),
    OK("EhLo client_host", EHLO),
    BAD("EHLO", ARG_MISSING),
    BAD("EHLO ", ARG_MISSING),
    BAD("EHLO a\x01", BAD_CHAR),
    BAD("HELO a\0b", BAD_CHAR),
    OK("DATA", DATA),
    OK("data", DATA),
    BAD("DATA x", ARG_UNEXPECTED),
    OK("DATA ", DATA),
    OK("DATA \t ", DATA),
    BAD("DATA  x", ARG_UNEXPECTED),
    BAD("DATAX", UNKNOWN),
    OK("RSET", RSET),
    BAD("RSET now", ARG_UNEXPECTED),
    OK("RSET ", RSET),
    OK("QUIT ", QUIT),
    OK("STARTTLS ", STARTTLS),
    OK("QUIT", QUIT),
    OK("NOOP", NOOP),
    OK("NOOP anything goes here", NOOP),
    BAD("NOOP \x7f", BAD_CHAR),
    OK("HELP", HELP),
    OK("HELP MAIL", HELP),
    OK("STARTTLS", STARTTLS),
    OK("starttls", STARTTLS),
    BAD("STARTTLS x", ARG_UNEXPECTED),
    BAD("STARTTLSX", UNKNOWN),
    BAD("STARTLS", UNKNOWN),
    BAD("STAR", UNKNOWN),
    OK("VRFY user", VRFY),
    BAD("VRFY", ARG_MISSING),
    BAD("VRFY ", ARG_MISSING),
    OK("EXPN list@example.com", EXPN),
    BAD("EXPN", ARG_MISSING),
    OK("BDAT 1000", BDAT),
    OK("BDAT 1000 LAST", BDAT),
    OK("bdat 0 last", BDAT),
    OK("BDAT 18446744073709551615", BDAT),
    BAD("BDAT 18446744073709551616", ARG_SYNTAX),
    BAD("BDAT", ARG_MISSING),
    BAD("BDAT x", ARG_SYNTAX),
    BAD("BDAT -1", ARG_SYNTAX),
    BAD("BDAT  10", ARG_SYNTAX),
    BAD("BDAT 10 FIRST", ARG_SYNTAX),
    OK("BDAT 10 LAST ", BDAT),
    OK("BDAT 10 ", BDAT),
    BAD("BDAT 10  LAST", ARG_SYNTAX),
    OK("AUTH PLAIN", AUTH),
    OK("AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=", AUTH),
    OK("AUTH PLAIN AHRlc3QAdGVzdA==", AUTH),
    OK("AUTH LOGIN =", AUTH),
    OK("auth cram-md5", AUTH),
    OK("AUTH X-UNKNOWN_MECH", AUTH),
    BAD("AUTH", ARG_MISSING),
    BAD("AUTH ", ARG_MISSING),
    BAD("AUTH PLAIN abc", ARG_SYNTAX),
    BAD("AUTH PLAIN a=bc", ARG_SYNTAX),
    BAD("AUTH PLAIN ====", ARG_SYNTAX),
    OK("AUTH PLAIN ", AUTH),
    OK("AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q= ", AUTH),
    BAD("AUTH PLAIN  dGVzdAB0ZXN0AHRlc3Q=", ARG_SYNTAX),
    BAD("AUTH PL@IN", ARG_SYNTAX),
    BAD("AUTH ABCDEFGHIJKLMNOPQRSTU", ARG_SYNTAX),
    BAD("", EMPTY),
    BAD("FOO", UNKNOWN),
    BAD("MAI", UNKNOWN),
    BAD("TURN", UNKNOWN),
    BAD(" MAIL FROM:<>", UNKNOWN),
    BAD("MAIL\tFROM:<>", UNKNOWN),
    BAD("MAIL:FROM:<>", UNKNOWN),

    /* MAIL, RCPT: keywords and brackets */
    OK("MAIL FROM:<a@b.c>", MAIL),
    OK("mail from:<a@b.c>", MAIL),
    OK("MAIL FROM: <a@b.c>", MAIL),
    OK("MAIL FROM:<>", MAIL),
    OK("MAIL FROM: <>", MAIL),
    BAD("MAIL", FROM_TO),
    BAD("MAIL ", FROM_TO),
    BAD("MAIL FROM", FROM_TO),
    BAD("MAIL TO:<a@b.c>", FROM_TO),
    BAD("MAIL FROM :<a@b.c>", FROM_TO),
    BAD("MAIL  FROM:<a@b.c>", FROM_TO),
    BAD("MAIL FROM:  <a@b.c>", PATH_SYNTAX),
    BAD("MAIL FROM:\t<a@b.c>", PATH_SYNTAX),
    /* without brackets, as Postfix takes it (strict_rfc821_envelopes = no) */
    OK("MAIL FROM:a@b.c", MAIL),
    OK("MAIL FROM: a@b.c", MAIL),
    OK("MAIL FROM:a@b.c SIZE=100", MAIL),
    OK("MAIL FROM:a@b.c ", MAIL),
    OK("MAIL FROM:\"a b\"@b.c", MAIL),
    BAD("MAIL FROM:a@b.c>", DOMAIN_SYNTAX),
    BAD("MAIL FROM:a@b.c<", DOMAIN_SYNTAX),
    BAD("MAIL FROM:a", NO_DOMAIN),
    BAD("MAIL FROM:a b@c.d", LOCAL_SYNTAX),
    BAD("MAIL FROM:@r.s:a@b.c", PATH_SYNTAX),
    BAD("MAIL FROM:a@b.c SIZE=x", PARAM_VALUE),
    BAD("MAIL FROM:", PATH_SYNTAX),
    BAD("MAIL FROM:<a@b.c", PATH_SYNTAX),
    BAD("MAIL FROM:<a@b.c >", PATH_SYNTAX),
    BAD("MAIL FROM:<<a@b.c>>", LOCAL_SYNTAX),
    OK("MAIL FROM:<a@b.c> ", MAIL),
    OK("MAIL FROM:<a@b.c> \t ", MAIL),
    OK("MAIL FROM:<> ", MAIL),
    OK("MAIL FROM:<a@b.c> SIZE=1 ", MAIL),
    OK("MAIL FROM:<a@b.c> SIZE=1\t", MAIL),
    OK("RCPT TO:<a@b.c> ", RCPT),
    OK("RCPT TO:<a@b.c> NOTIFY=NEVER  ", RCPT),
    BAD("MAIL FROM: ", PATH_SYNTAX),
    BAD("MAIL FROM:<a@b.c> x ", PARAM_UNKNOWN),
    BAD("MAIL FROM:<a@b.c> =x ", PARAM_SYNTAX),
    BAD("MAIL FROM:<a@b.c>\tSIZE=1", PARAM_SYNTAX),
    BAD("MAIL FROM:<a@b.c> \x01", BAD_CHAR),
    BAD("MAIL FROM:<a@b.c> \r", BAD_CHAR),
    BAD("MAIL FROM:<a@b.c>  SIZE=1", PARAM_SYNTAX),
    BAD("MAIL FROM:<a@b.c>SIZE=1", PARAM_SYNTAX),
    BAD("MAIL FROM:<a@b.c>x", PARAM_SYNTAX),
    OK("RCPT TO:<a@b.c>", RCPT),
    OK("rcpt to:<a@b.c>", RCPT),
    OK("RCPT TO: <a@b.c>", RCPT),
    BAD("RCPT", FROM_TO),
    BAD("RCPT FROM:<a@b.c>", FROM_TO),
    OK("RCPT TO:a@b.c", RCPT),
    OK("RCPT TO:postmaster", RCPT),
    OK("RCPT TO:a@b.c NOTIFY=NEVER", RCPT),
    BAD("RCPT TO:a@b.c@d", DOMAIN_SYNTAX),
    BAD("RCPT TO:<>", NULL_RCPT),
    OK("RCPT TO:<Postmaster>", RCPT),
    OK("RCPT TO:<postmaster>", RCPT),
    BAD("MAIL FROM:<Postmaster>", NO_DOMAIN),
    BAD("RCPT TO:<user>", NO_DOMAIN),
    BAD("RCPT TO:<\"postmaster\">", NO_DOMAIN),

    /* source routes: accepted, ignored */
    OK("RCPT TO:<@a.com,@b.com:user@c.com>", RCPT),
    OK("MAIL FROM:<@a.com:user@c.com>", MAIL),
    OK("RCPT TO:<@[1.2.3.4]:user@c.com>", RCPT),
    BAD("RCPT TO:<@a.com user@c.com>", ROUTE_SYNTAX),
    BAD("RCPT TO:<@:user@c.com>", ROUTE_SYNTAX),
    BAD("RCPT TO:<@a.com,b.com:user@c.com>", ROUTE_SYNTAX),
    BAD("RCPT TO:<@a.com,:user@c.com>", ROUTE_SYNTAX),

    /* local parts */
    OK("RCPT TO:<first.last@example.com>", RCPT),
    OK("RCPT TO:<a!#$%&'*+-/=?^_`{|}~z@example.com>", RCPT),
    OK("RCPT TO:<\"john doe\"@example.com>", RCPT),
    OK("RCPT TO:<\"a\\\"b\"@example.com>", RCPT),
    OK("RCPT TO:<\"a>b\"@example.com>", RCPT),
    OK("RCPT TO:<\"\"@example.com>", RCPT),
    BAD("RCPT TO:<\"a\\\x01\"@example.com>", LOCAL_SYNTAX),
    BAD("RCPT TO:<\"a\x01\"@example.com>", LOCAL_SYNTAX),
    BAD("RCPT TO:<\"unterminated@example.com>", LOCAL_SYNTAX),
    /* no Dot-string, but taken as Postfix takes them (sent quoted) */
    OK("RCPT TO:<a..b@example.com>", RCPT),
    OK("RCPT TO:<.a@example.com>", RCPT),
    OK("RCPT TO:<a.@docomo.ne.jp>", RCPT),
    OK("RCPT TO:a.@docomo.ne.jp", RCPT),
    OK("RCPT TO:.a@docomo.ne.jp", RCPT),
    OK("RCPT TO:<aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.@x.jp>", RCPT),
    BAD("RCPT TO:<aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.@x.jp>",
        LOCAL_TOO_LONG),
    BAD("RCPT TO:<.@example.com>", LOCAL_SYNTAX),
    BAD("RCPT TO:<..@example.com>", LOCAL_SYNTAX),
    BAD("RCPT TO:<a.\x01@example.com>", LOCAL_SYNTAX),
    BAD("RCPT TO:<a b@example.com>", LOCAL_SYNTAX),
    BAD("RCPT TO:<a(b)@example.com>", LOCAL_SYNTAX),
    BAD("RCPT TO:<@example.com>", ROUTE_SYNTAX),
    BAD("RCPT TO:<a\x01@example.com>", LOCAL_SYNTAX),

    /* domains and literals */
    OK("RCPT TO:<a@example>", RCPT),
    OK("RCPT TO:<a@x-1.example-2.com>", RCPT),
    OK("RCPT TO:<a@123.example>", RCPT),
    BAD("RCPT TO:<a@example..com>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@-example.com>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@example-.com>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@.example.com>", DOMAIN_SYNTAX),
    /* one trailing dot, the root, as Postfix takes it (test_root_dot) */
    OK("RCPT TO:<a@example.com.>", RCPT),
    OK("MAIL FROM:<a@example.org.>", MAIL),
    OK("RCPT TO:<a@example.>", RCPT),
    OK("RCPT TO:a@example.com.", RCPT),
    OK("MAIL FROM:a@example.org. SIZE=1", MAIL),
    OK("RCPT TO:<@a.example:a@example.com.>", RCPT),
    BAD("RCPT TO:<a@example.com..>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@.>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@..>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@.example.com.>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@example-.>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@example.com.!>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@example.com.->", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@[192.0.2.1].>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@example.com. >", PATH_SYNTAX),
    BAD("RCPT TO:a@example.com..", DOMAIN_SYNTAX),
    BAD("RCPT TO:<@a.example.:a@example.com>", ROUTE_SYNTAX),
    OK("RCPT TO:<a@exa_mple.com>", RCPT),
    OK("RCPT TO:<a@_dmarc.example.com>", RCPT),
    BAD("RCPT TO:<a@exa~mple.com>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@exa_mple-.com>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@>", DOMAIN_SYNTAX),
    BAD("RCPT TO:<a@b@c>", DOMAIN_SYNTAX),
    OK("RCPT TO:<a@[1.2.3.4]>", RCPT),
    OK("RCPT TO:<a@[255.255.255.255]>", RCPT),
    OK("RCPT TO:<a@[001.02.3.4]>", RCPT),
    BAD("RCPT TO:<a@[256.1.1.1]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[1.2.3]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[1.2.3.4.5]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[1.2.3.1234]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[1.2.3.4>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[1.2.3.4]x>", DOMAIN_SYNTAX),
    OK("RCPT TO:<a@[IPv6:2001:db8::1]>", RCPT),
    OK("RCPT TO:<a@[ipv6:::1]>", RCPT),
    OK("RCPT TO:<a@[IPv6:::]>", RCPT),
    OK("RCPT TO:<a@[IPv6:1::]>", RCPT),
    OK("RCPT TO:<a@[IPv6:1:2:3:4:5:6:7:8]>", RCPT),
    OK("RCPT TO:<a@[IPv6:1:2:3::6:7:8]>", RCPT),
    OK("RCPT TO:<a@[IPv6:::ffff:192.0.2.1]>", RCPT),
    OK("RCPT TO:<a@[IPv6:1:2:3:4:5:6:192.0.2.1]>", RCPT),
    OK("RCPT TO:<a@[IPv6:1:2:3:4::192.0.2.1]>", RCPT),
    BAD("RCPT TO:<a@[IPv6:1:2:3:4:5::192.0.2.1]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6:1:2:3:4:5:192.0.2.1]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6:1:2:3:4:5:6:7]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6:1:2:3:4:5:6:7:8:9]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6:1:2:3:4:5:6:7::]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6:1::2::3]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6:12345::]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6::1:2]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6:1:]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6:g::1]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6:]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[IPv6:::1.2.3]>", LITERAL_SYNTAX),
    OK("RCPT TO:<a@[x-tag:any-content]>", RCPT),
    BAD("RCPT TO:<a@[x-tag:]>", LITERAL_SYNTAX),
    OK("RCPT TO:<a@[-tag:x]>", RCPT), /* Ldh-str may start with "-" */
    BAD("RCPT TO:<a@[tag-:x]>", LITERAL_SYNTAX),
    BAD("RCPT TO:<a@[tag:a\\b]>", LITERAL_SYNTAX),

    /* UTF-8 */
    BAD("RCPT TO:<\xd0\xbf\xd1\x80@example.com>", UTF8_NOT_ALLOWED),
    OKF("RCPT TO:<\xd0\xbf\xd1\x80@example.com>", U8, RCPT),
    OKF("RCPT TO:<a@b\xc3\xbc.example>", U8, RCPT),
    OKF("RCPT TO:<\"\xc3\xbc\"@example.com>", U8, RCPT),
    BAD("RCPT TO:<a@b\xc3\xbc.example>", UTF8_NOT_ALLOWED),
    OK("MAIL FROM:<\xc3\xbc@example.com> SMTPUTF8", MAIL),
    OK("MAIL FROM:<\xc3\xbc@example.com> SIZE=10 SMTPUTF8", MAIL),
    BAD("MAIL FROM:<\xc3\xbc@example.com>", UTF8_NOT_ALLOWED),
    BAD("MAIL FROM:<\xc3\xbc@example.com> SIZE=10", UTF8_NOT_ALLOWED),
    BADF("MAIL FROM:<\xc3\xbc@example.com>", U8, UTF8_NOT_ALLOWED),
    BADF("RCPT TO:<\xff@example.com>", U8, UTF8_INVALID),
    BADF("RCPT TO:<\xc3@example.com>", U8, UTF8_INVALID),
    BADF("RCPT TO:<\xc0\xaf@example.com>", U8, UTF8_INVALID),
    BADF("RCPT TO:<\xed\xa0\x80@example.com>", U8, UTF8_INVALID),
    BADF("RCPT TO:<\xf4\x90\x80\x80@example.com>", U8, UTF8_INVALID),
    BADF("RCPT TO:<a@\xe2\x82.example>", U8, UTF8_INVALID),
    OKF("RCPT TO:<\xf0\x9f\x98\x80@example.com>", U8, RCPT),
    BADF("RCPT TO:<@b\xc3\xbc.example:a@b.c>", U8, ROUTE_SYNTAX),

    /* MAIL parameters */
    OK("MAIL FROM:<> SIZE=100", MAIL),
    OK("MAIL FROM:<a@b.c> SIZE=12345 BODY=8BITMIME", MAIL),
    OK("MAIL FROM:<a@b.c> size=0", MAIL),
    OK("MAIL FROM:<a@b.c> SIZE=99999999999999999999", MAIL),
    BAD("MAIL FROM:<a@b.c> SIZE=123456789012345678901", PARAM_VALUE),
    BAD("MAIL FROM:<a@b.c> SIZE=", PARAM_SYNTAX),
    BAD("MAIL FROM:<a@b.c> SIZE", PARAM_VALUE),
    BAD("MAIL FROM:<a@b.c> SIZE=12a", PARAM_VALUE),
    BAD("MAIL FROM:<a@b.c> SIZE=-1", PARAM_VALUE),
    BAD("MAIL FROM:<a@b.c> SIZE=1 SIZE=2", PARAM_DUP),
    BAD("MAIL FROM:<a@b.c> size=1 SIZE=1", PARAM_DUP),
    BAD("MAIL FROM:<a@b.c> SIZE=1=2", PARAM_SYNTAX),
    BAD("MAIL FROM:<a@b.c> SIZE=\x01", BAD_CHAR),
    OK("MAIL FROM:<a@b.c> BODY=7BIT", MAIL),
    OK("MAIL FROM:<a@b.c> BODY=binarymime", MAIL),
    BAD("MAIL FROM:<a@b.c> BODY=8BIT", PARAM_VALUE),
    BAD("MAIL FROM:<a@b.c> BODY", PARAM_VALUE),
    BAD("MAIL FROM:<a@b.c> BODY=7BIT BODY=7BIT", PARAM_DUP),
    OK("MAIL FROM:<a@b.c> SMTPUTF8", MAIL),
    BAD("MAIL FROM:<a@b.c> SMTPUTF8=yes", PARAM_VALUE),
    BAD("MAIL FROM:<a@b.c> SMTPUTF8 SMTPUTF8", PARAM_DUP),
    OK("MAIL FROM:<a@b.c> RET=FULL", MAIL),
    OK("MAIL FROM:<a@b.c> RET=hdrs", MAIL),
    BAD("MAIL FROM:<a@b.c> RET=ALL", PARAM_VALUE),
    OK("MAIL FROM:<a@b.c> ENVID=QQ314159", MAIL),
    OK("MAIL FROM:<a@b.c> ENVID=a+2Bb", MAIL),
    BAD("MAIL FROM:<a@b.c> ENVID=a+2bb", PARAM_VALUE),
    BAD("MAIL FROM:<a@b.c> ENVID=a+2", PARAM_VALUE),
    BAD("MAIL FROM:<a@b.c> ENVID=a+", PARAM_VALUE),
    BAD("MAIL FROM:<a@b.c> ENVID=\xc3\xbc", PARAM_VALUE),
    OK("MAIL FROM:<a@b.c> AUTH=<>", MAIL),
    OK("MAIL FROM:<a@b.c> AUTH=e+3Dmc2@example.com", MAIL),
    BAD("MAIL FROM:<a@b.c> AUTH=", PARAM_SYNTAX),
    BAD("MAIL FROM:<a@b.c> NOTIFY=NEVER", PARAM_UNKNOWN),
    BAD("MAIL FROM:<a@b.c> ORCPT=rfc822;a@b.c", PARAM_UNKNOWN),
    BAD("MAIL FROM:<a@b.c> FOO=bar", PARAM_UNKNOWN),
    BAD("MAIL FROM:<a@b.c> X-FOO", PARAM_UNKNOWN),
    BAD("MAIL FROM:<a@b.c> SIZ=1", PARAM_UNKNOWN),
    BAD("MAIL FROM:<a@b.c> SIZES=1", PARAM_UNKNOWN),
    BAD("MAIL FROM:<a@b.c> -X", PARAM_SYNTAX),
    BAD("MAIL FROM:<a@b.c> =1", PARAM_SYNTAX),
    BAD("MAIL FROM:<a@b.c> S_ZE=1", PARAM_SYNTAX),
    /* the first bad parameter wins, left to right */
    BAD("MAIL FROM:<a@b.c> FOO SIZE=x", PARAM_UNKNOWN),
    BAD("MAIL FROM:<a@b.c> SIZE=x FOO", PARAM_VALUE),

    /* RCPT parameters */
    OK("RCPT TO:<a@b.c> NOTIFY=SUCCESS,FAILURE", RCPT),
    OK("RCPT TO:<a@b.c> NOTIFY=delay", RCPT),
    OK("RCPT TO:<a@b.c> NOTIFY=NEVER", RCPT),
    OK("RCPT TO:<a@b.c> NOTIFY=SUCCESS,FAILURE,DELAY", RCPT),
    BAD("RCPT TO:<a@b.c> NOTIFY=NEVER,SUCCESS", PARAM_VALUE),
    BAD("RCPT TO:<a@b.c> NOTIFY=SUCCESS,SUCCESS", PARAM_VALUE),
    BAD("RCPT TO:<a@b.c> NOTIFY=SUCCESS,", PARAM_VALUE),
    BAD("RCPT TO:<a@b.c> NOTIFY=ALWAYS", PARAM_VALUE),
    BAD("RCPT TO:<a@b.c> NOTIFY=", PARAM_SYNTAX),
    BAD("RCPT TO:<a@b.c> NOTIFY", PARAM_VALUE),
    OK("RCPT TO:<a@b.c> ORCPT=rfc822;a@b.c", RCPT),
    OK("RCPT TO:<a@b.c> ORCPT=RFC822;a+40b.c", RCPT),
    OK("RCPT TO:<a@b.c> NOTIFY=FAILURE ORCPT=rfc822;a@b.c", RCPT),
    BAD("RCPT TO:<a@b.c> ORCPT=rfc822", PARAM_VALUE),
    BAD("RCPT TO:<a@b.c> ORCPT=;x", PARAM_VALUE),
    BAD("RCPT TO:<a@b.c> ORCPT=rfc822;", PARAM_VALUE),
    BAD("RCPT TO:<a@b.c> ORCPT=rfc822;a+4", PARAM_VALUE),
    BAD("RCPT TO:<a@b.c> ORCPT=rfc822;a@b.c ORCPT=rfc822;a@b.c", PARAM_DUP),
    OKF("RCPT TO:<a@b.c> ORCPT=utf-8;\xc3\xbc@b.c", U8, RCPT),
    BAD("RCPT TO:<a@b.c> ORCPT=utf-8;\xc3\xbc@b.c", PARAM_VALUE),
    BAD("RCPT TO:<a@b.c> SIZE=1", PARAM_UNKNOWN),
    BAD("RCPT TO:<a@b.c> SMTPUTF8", PARAM_UNKNOWN),
};

static void
test_parse_table(void **state)
{
    for (size_t i = 0; i < sizeof pcases / sizeof pcases[0]; i++) {
        const struct pcase *c = &pcases[i];
        struct smtp_cmd cmd;
        int rc = smtp_cmd_parse(c->line, c->len, c->flags, &cmd);

        if (rc != c->rc)
            fail_msg("'%s': rc %d (%s), want %d (%s)", c->line, rc, smtp_cmd_err_str(rc), c->rc,
                     smtp_cmd_err_str(c->rc));
        if (rc == 0 && cmd.verb != c->verb)
            fail_msg("'%s': verb %s, want %s", c->line, smtp_verb_str(cmd.verb),
                     smtp_verb_str(c->verb));
        if (rc < 0 && cmd.err_off > c->len)
            fail_msg("'%s': err_off %zu beyond the line", c->line, cmd.err_off);
    }
}

/* ---- fields of parsed commands ---- */

static void
test_mail_fields(void **state)
{
    struct smtp_cmd c;
    const char *line = "MAIL FROM:<bounce+123@mail.example.com> SIZE=12345 BODY=8BITMIME "
                       "RET=HDRS ENVID=QQ+2B1 AUTH=<> SMTPUTF8";

    assert_int_equal(smtp_cmd_parse(line, strlen(line), 0, &c), 0);
    assert_int_equal(c.verb, SMTP_VERB_MAIL);
    assert_span(c.path.mailbox, "bounce+123@mail.example.com");
    assert_span(c.path.local, "bounce+123");
    assert_span(c.path.domain, "mail.example.com");
    assert_int_equal(c.path.flags, 0);
    assert_int_equal(c.params.seen, SMTP_PARAM_SIZE | SMTP_PARAM_BODY | SMTP_PARAM_RET |
                                        SMTP_PARAM_ENVID | SMTP_PARAM_AUTH | SMTP_PARAM_SMTPUTF8);
    assert_int_equal(c.params.size, 12345);
    assert_int_equal(c.params.body, SMTP_BODY_8BITMIME);
    assert_int_equal(c.params.ret, SMTP_RET_HDRS);
    assert_span(c.params.envid, "QQ+2B1");
    assert_span(c.params.auth, "<>");

    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<>"), 0, &c), 0);
    assert_int_equal(c.path.flags, SMTP_PATH_NULL);
    assert_int_equal(c.path.mailbox.len, 0);
    assert_int_equal(c.params.seen, 0);

    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@b.c> SIZE=99999999999999999999"), 0, &c), 0);
    assert_true(c.params.size == UINT64_MAX);
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@b.c> SIZE=18446744073709551615"), 0, &c), 0);
    assert_true(c.params.size == UINT64_MAX);
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@b.c> SIZE=18446744073709551614"), 0, &c), 0);
    assert_true(c.params.size == UINT64_MAX - 1);

    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<\xc3\xbc@example.com> SMTPUTF8"), 0, &c), 0);
    assert_int_equal(c.path.flags, SMTP_PATH_UTF8);
}

static void
test_rcpt_fields(void **state)
{
    struct smtp_cmd c;

    assert_int_equal(
        smtp_cmd_parse(L("RCPT TO:<\"john doe\"@[IPv6:2001:db8::1]> NOTIFY=SUCCESS,DELAY "
                         "ORCPT=rfc822;john+20doe@example.com"),
                       0, &c),
        0);
    assert_span(c.path.local, "\"john doe\"");
    assert_span(c.path.domain, "[IPv6:2001:db8::1]");
    assert_span(c.path.mailbox, "\"john doe\"@[IPv6:2001:db8::1]");
    assert_int_equal(c.path.flags, SMTP_PATH_QUOTED | SMTP_PATH_LIT_IPV6);
    assert_int_equal(c.params.notify, SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_DELAY);
    assert_span(c.params.orcpt_type, "rfc822");
    assert_span(c.params.orcpt_addr, "john+20doe@example.com");

    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<@a.example,@b.example:u@c.example>"), 0, &c), 0);
    assert_span(c.path.route, "@a.example,@b.example");
    assert_span(c.path.mailbox, "u@c.example");
    assert_int_equal(c.path.flags, SMTP_PATH_ROUTE);

    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<PostMaster>"), 0, &c), 0);
    assert_int_equal(c.path.flags, SMTP_PATH_POSTMASTER);
    assert_span(c.path.local, "PostMaster");
    assert_int_equal(c.path.domain.len, 0);

    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<a@[192.0.2.1]>"), 0, &c), 0);
    assert_int_equal(c.path.flags, SMTP_PATH_LIT_IPV4);
    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<a@[x-tag:y]>"), 0, &c), 0);
    assert_int_equal(c.path.flags, SMTP_PATH_LIT_OTHER);

    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<a@b.c> NOTIFY=NEVER"), 0, &c), 0);
    assert_int_equal(c.params.notify, SMTP_NOTIFY_NEVER);
    assert_int_equal(c.params.seen, SMTP_PARAM_NOTIFY);
}

static void
test_other_fields(void **state)
{
    struct smtp_cmd c;

    assert_int_equal(smtp_cmd_parse(L("EHLO mx.example.com"), 0, &c), 0);
    assert_span(c.arg, "mx.example.com");
    assert_true(c.helo_valid);
    assert_false(c.helo_literal);
    assert_int_equal(smtp_cmd_parse(L("EHLO [192.0.2.1]"), 0, &c), 0);
    assert_true(c.helo_valid);
    assert_true(c.helo_literal);
    assert_int_equal(smtp_cmd_parse(L("EHLO [192.0.2.300]"), 0, &c), 0);
    assert_false(c.helo_valid);
    assert_int_equal(smtp_cmd_parse(L("HELO my_host"), 0, &c), 0);
    assert_true(c.helo_valid);
    assert_int_equal(smtp_cmd_parse(L("HELO my!host"), 0, &c), 0);
    assert_false(c.helo_valid);
    assert_int_equal(smtp_cmd_parse(L("HELO two words"), 0, &c), 0);
    assert_false(c.helo_valid);
    assert_span(c.arg, "two words");

    assert_int_equal(smtp_cmd_parse(L("BDAT 4096 LAST"), 0, &c), 0);
    assert_int_equal(c.bdat_size, 4096);
    assert_true(c.bdat_last);
    assert_int_equal(smtp_cmd_parse(L("BDAT 0"), 0, &c), 0);
    assert_int_equal(c.bdat_size, 0);
    assert_false(c.bdat_last);

    assert_int_equal(smtp_cmd_parse(L("AUTH plain dGVzdAB0ZXN0AHRlc3Q="), 0, &c), 0);
    assert_int_equal(c.auth_mech, SMTP_AUTH_PLAIN);
    assert_span(c.auth_name, "plain");
    assert_span(c.auth_ir, "dGVzdAB0ZXN0AHRlc3Q=");
    assert_int_equal(smtp_cmd_parse(L("AUTH LOGIN"), 0, &c), 0);
    assert_int_equal(c.auth_mech, SMTP_AUTH_LOGIN);
    assert_int_equal(c.auth_ir.len, 0);
    assert_int_equal(smtp_cmd_parse(L("AUTH XOAUTH2 ="), 0, &c), 0);
    assert_int_equal(c.auth_mech, SMTP_AUTH_XOAUTH2);
    assert_span(c.auth_ir, "=");
    assert_int_equal(smtp_cmd_parse(L("AUTH SCRAM-SHA-256"), 0, &c), 0);
    assert_int_equal(c.auth_mech, SMTP_AUTH_SCRAM_SHA_256);
    assert_int_equal(smtp_cmd_parse(L("AUTH X-OTHER"), 0, &c), 0);
    assert_int_equal(c.auth_mech, 0);

    assert_int_equal(smtp_cmd_parse(L("VRFY <someone>"), 0, &c), 0);
    assert_span(c.arg, "<someone>");
    assert_int_equal(smtp_cmd_parse(L("NOOP"), 0, &c), 0);
    assert_int_equal(c.arg.len, 0);
}

/* A domain's one trailing dot: out of the mailbox and the domain, so
 * that the relay rules, suppression, the spool and the RCPT sent on see
 * example.com; ORCPT stays as the client wrote it. */
static void
test_root_dot(void **state)
{
    struct smtp_cmd c;

    assert_int_equal(
        smtp_cmd_parse(L("RCPT TO:<User@Example.COM.> ORCPT=rfc822;User@Example.COM."), 0, &c), 0);
    assert_span(c.path.mailbox, "User@Example.COM");
    assert_span(c.path.local, "User");
    assert_span(c.path.domain, "Example.COM");
    assert_int_equal(c.path.flags, SMTP_PATH_ROOT_DOT);
    assert_span(c.params.orcpt_addr, "User@Example.COM.");

    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:b@example.org. SIZE=10"), 0, &c), 0);
    assert_span(c.path.mailbox, "b@example.org");
    assert_span(c.path.domain, "example.org");
    assert_int_equal(c.params.size, 10);

    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<\"user.\"@x.example.>"), 0, &c), 0);
    assert_span(c.path.mailbox, "\"user.\"@x.example");
    assert_int_equal(c.path.flags, SMTP_PATH_QUOTED | SMTP_PATH_ROOT_DOT);
    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<a@\xc3\xbc.example.>"), SMTP_CMD_F_UTF8, &c), 0);
    assert_span(c.path.domain, "\xc3\xbc.example");
    assert_int_equal(c.path.flags, SMTP_PATH_UTF8 | SMTP_PATH_ROOT_DOT);

    /* the second dot is the fault, as before */
    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<a@example.com..>"), 0, &c),
                     SMTP_CMD_E_DOMAIN_SYNTAX);
    assert_int_equal(c.err_off, 23);

    /* a mailbox as stored or formatted has no trailing dot */
    assert_int_equal(smtp_mailbox_check(L("a@example.com."), false), SMTP_CMD_E_DOMAIN_SYNTAX);
    char out[64];
    assert_int_equal(smtp_fmt_rcpt(out, sizeof out, L("a@example.com."), NULL, false),
                     SMTP_CMD_E_DOMAIN_SYNTAX);
    assert_int_equal(smtp_fmt_rcpt(out, sizeof out, L("a@example.com"), NULL, false), 25);
}

static void
test_error_details(void **state)
{
    struct smtp_cmd c;

    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@b.c> SIZE=1 X-PRIO=5"), 0, &c),
                     SMTP_CMD_E_PARAM_UNKNOWN);
    assert_int_equal(c.verb, SMTP_VERB_MAIL);
    assert_span(c.err_param, "X-PRIO");
    assert_int_equal(c.err_off, 25);
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@b.c> BODY=9BIT"), 0, &c),
                     SMTP_CMD_E_PARAM_VALUE);
    assert_span(c.err_param, "BODY");
    assert_int_equal(c.err_off, 23);
    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<a@exa~mple.com>"), 0, &c),
                     SMTP_CMD_E_DOMAIN_SYNTAX);
    assert_int_equal(c.verb, SMTP_VERB_RCPT);
    assert_int_equal(c.err_off, 14);
    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<a b@c>"), 0, &c), SMTP_CMD_E_LOCAL_SYNTAX);
    assert_int_equal(c.err_off, 10);
    assert_int_equal(smtp_cmd_parse(L("FOO"), 0, &c), SMTP_CMD_E_UNKNOWN);
    assert_int_equal(c.verb, SMTP_VERB_NONE);

    /* after HELO (SMTP_CMD_F_NO_PARAMS): any parameter is refused as such,
     * its value unread: a bad value, a duplicate, an unknown keyword */
    const uint32_t np = SMTP_CMD_F_NO_PARAMS;
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@b.c>"), np, &c), 0);
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@b.c> SIZE=abc"), np, &c),
                     SMTP_CMD_E_PARAM_UNOFFERED);
    assert_int_equal(c.verb, SMTP_VERB_MAIL);
    assert_int_equal(c.params.seen, SMTP_PARAM_SIZE);
    assert_int_equal(c.params.size, 0);
    assert_int_equal(c.err_param.len, 0);
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@b.c> BODY=9BIT body=7BIT"), np, &c),
                     SMTP_CMD_E_PARAM_UNOFFERED);
    assert_int_equal(c.params.seen, SMTP_PARAM_BODY);
    assert_int_equal(smtp_cmd_parse(L("RCPT TO:<a@b.c> NOTIFY=bogus X-FOO=1 ORCPT=x Y"), np, &c),
                     SMTP_CMD_E_PARAM_UNOFFERED);
    assert_int_equal(c.verb, SMTP_VERB_RCPT);
    assert_int_equal(c.params.seen, SMTP_PARAM_NOTIFY | SMTP_PARAM_ORCPT);
    assert_span(c.err_param, "X-FOO");
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<j\xc3\xb6rg@b.c> SMTPUTF8=x"), np, &c),
                     SMTP_CMD_E_PARAM_UNOFFERED);
    /* the list's syntax and the path as always */
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@b.c>  SIZE=1"), np, &c),
                     SMTP_CMD_E_PARAM_SYNTAX);
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@b.c> SIZE=1\x01"), np, &c),
                     SMTP_CMD_E_BAD_CHAR);
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<a@exa~mple.com> SIZE=1"), np, &c),
                     SMTP_CMD_E_DOMAIN_SYNTAX);
    assert_int_equal(smtp_cmd_parse(L("MAIL FROM:<j\xc3\xb6rg@b.c>"), np, &c),
                     SMTP_CMD_E_UTF8_NOT_ALLOWED);
    assert_string_equal(smtp_cmd_err_reply(SMTP_CMD_E_PARAM_UNOFFERED, SMTP_VERB_MAIL),
                        "555 5.5.4 Unsupported option after HELO");

    /* replies: by error and by verb */
    assert_string_equal(smtp_cmd_err_reply(SMTP_CMD_E_DOMAIN_SYNTAX, SMTP_VERB_RCPT),
                        "553 5.1.3 Bad recipient address syntax");
    assert_string_equal(smtp_cmd_err_reply(SMTP_CMD_E_DOMAIN_SYNTAX, SMTP_VERB_MAIL),
                        "553 5.1.7 Bad sender address syntax");
    assert_string_equal(smtp_cmd_err_reply(SMTP_CMD_E_PARAM_UNKNOWN, SMTP_VERB_MAIL),
                        "555 5.5.4 Unsupported parameter");
    assert_string_equal(smtp_cmd_err_reply(SMTP_CMD_E_UTF8_NOT_ALLOWED, SMTP_VERB_RCPT),
                        "553 5.6.7 Non-ASCII address requires SMTPUTF8");
    assert_memory_equal(smtp_cmd_err_reply(SMTP_CMD_E_LINE_TOO_LONG, SMTP_VERB_NONE), "500 ", 4);
    /* every code has its own text and a reply of the right shape */
    for (int e = SMTP_CMD_E_FIRST; e <= SMTP_CMD_E_LAST; e++) {
        const char *r = smtp_cmd_err_reply(e, SMTP_VERB_MAIL);

        assert_string_not_equal(smtp_cmd_err_str(e), "unknown error");
        for (int f = e + 1; f <= SMTP_CMD_E_LAST; f++)
            assert_string_not_equal(smtp_cmd_err_str(e), smtp_cmd_err_str(f));
        assert_true(strlen(r) > 10 && r[3] == ' ' && r[5] == '.');
        assert_int_equal(r[0], r[4]);
    }
    assert_string_equal(smtp_cmd_err_str(-1), "unknown error");
}

static void
fill(char *p, char c, size_t n)
{
    memset(p, c, n);
}

/* A domain of exactly len octets: labels of 63 and a last one of 1+. */
static size_t
make_domain(char *p, size_t len)
{
    size_t n = 0;

    while (len - n > 63) {
        size_t label = len - n - 64 >= 1 ? 63 : 62;

        fill(p + n, 'd', label);
        n += label;
        p[n++] = '.';
    }
    fill(p + n, 'd', len - n);
    return len;
}

static void
test_limits(void **state)
{
    char line[13000];
    struct smtp_cmd c;
    size_t n;

    /* 512 octets with CRLF: 510 without */
    memcpy(line, "NOOP ", 5);
    fill(line + 5, 'x', 505);
    assert_int_equal(smtp_cmd_parse(line, 510, 0, &c), 0);
    fill(line + 5, 'x', 506);
    assert_int_equal(smtp_cmd_parse(line, 511, 0, &c), SMTP_CMD_E_LINE_TOO_LONG);
    fill(line, 'x', 511);
    assert_int_equal(smtp_cmd_parse(line, 511, 0, &c), SMTP_CMD_E_LINE_TOO_LONG);
    assert_int_equal(c.verb, SMTP_VERB_NONE);
    /* a BDAT line too long still says BDAT: its chunk's end is unknown */
    memcpy(line, "BDAT 10 ", 8);
    fill(line + 8, ' ', 503);
    assert_int_equal(smtp_cmd_parse(line, 511, 0, &c), SMTP_CMD_E_LINE_TOO_LONG);
    assert_int_equal(c.verb, SMTP_VERB_BDAT);
    memcpy(line, "BDATX", 5);
    assert_int_equal(smtp_cmd_parse(line, 511, 0, &c), SMTP_CMD_E_LINE_TOO_LONG);
    assert_int_equal(c.verb, SMTP_VERB_NONE);

    /* local part: 64 */
    n = (size_t)sprintf(line, "RCPT TO:<");
    fill(line + n, 'l', 64);
    n += 64;
    n += (size_t)sprintf(line + n, "@example.com>");
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), 0);
    assert_int_equal(c.path.local.len, 64);
    n = (size_t)sprintf(line, "RCPT TO:<");
    fill(line + n, 'l', 65);
    n += 65;
    n += (size_t)sprintf(line + n, "@example.com>");
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), SMTP_CMD_E_LOCAL_TOO_LONG);
    n = (size_t)sprintf(line, "RCPT TO:<\"");
    fill(line + n, 'l', 63);
    n += 63;
    n += (size_t)sprintf(line + n, "\"@example.com>");
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), SMTP_CMD_E_LOCAL_TOO_LONG);

    /* label: 63 */
    n = (size_t)sprintf(line, "RCPT TO:<a@");
    fill(line + n, 'd', 63);
    n += 63;
    n += (size_t)sprintf(line + n, ".com>");
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), 0);
    n = (size_t)sprintf(line, "RCPT TO:<a@");
    fill(line + n, 'd', 64);
    n += 64;
    n += (size_t)sprintf(line + n, ".com>");
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), SMTP_CMD_E_LABEL_TOO_LONG);

    /* domain: 255 passes the domain check (then fails the path's), 256 not */
    n = (size_t)sprintf(line, "RCPT TO:<a@");
    n += make_domain(line + n, 254);
    line[n++] = '>';
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), SMTP_CMD_E_PATH_TOO_LONG);
    assert_int_equal(smtp_mailbox_check(line + 9, n - 10, false), SMTP_CMD_E_PATH_TOO_LONG);
    n = (size_t)sprintf(line, "RCPT TO:<a@");
    n += make_domain(line + n, 255);
    line[n++] = '>';
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), SMTP_CMD_E_PATH_TOO_LONG);
    n = (size_t)sprintf(line, "RCPT TO:<a@");
    n += make_domain(line + n, 256);
    line[n++] = '>';
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), SMTP_CMD_E_DOMAIN_TOO_LONG);
    assert_int_equal(smtp_mailbox_check(line + 9, n - 10, false), SMTP_CMD_E_DOMAIN_TOO_LONG);
    /* path of exactly 256: "<" + 60 + "@" + 193 + ">" */
    n = (size_t)sprintf(line, "RCPT TO:<");
    fill(line + n, 'l', 60);
    n += 60;
    line[n++] = '@';
    for (int i = 0; i < 3; i++) {
        fill(line + n, 'd', 63);
        n += 63;
        line[n++] = '.';
    }
    line[n++] = 'x';
    line[n++] = '>';
    assert_int_equal(n - 8, 256);
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), 0);
    n -= 1;
    line[n++] = 'y';
    line[n++] = '>';
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), SMTP_CMD_E_PATH_TOO_LONG);

    /* MAIL may grow by ENVID and AUTH= (to 1112), RCPT by ORCPT (1012),
     * AUTH to 12288. */
    n = (size_t)sprintf(line, "MAIL FROM:<a@b.c> ENVID=");
    fill(line + n, 'e', 100);
    n += 100;
    n += (size_t)sprintf(line + n, " AUTH=");
    fill(line + n, 'u', 500);
    n += 500;
    assert_true(n > 510);
    assert_int_equal(smtp_cmd_parse(line, n, 0, &c), 0);
    fill(line + n, 'u', 1110 - n);
    assert_int_equal(smtp_cmd_parse(line, 1110, 0, &c), SMTP_CMD_E_PARAM_VALUE);
    assert_int_equal(smtp_cmd_parse(line, 1111, 0, &c), SMTP_CMD_E_LINE_TOO_LONG);
    n = (size_t)sprintf(line, "MAIL FROM:<a@b.c> ENVID=");
    fill(line + n, 'e', 101);
    assert_int_equal(smtp_cmd_parse(line, n + 101, 0, &c), SMTP_CMD_E_PARAM_VALUE);
    n = (size_t)sprintf(line, "RCPT TO:<a@b.c> ORCPT=rfc822;");
    fill(line + n, 'o', 500 - 7);
    assert_int_equal(smtp_cmd_parse(line, n + 493, 0, &c), 0);
    assert_int_equal(smtp_cmd_parse(line, n + 494, 0, &c), SMTP_CMD_E_PARAM_VALUE);
    n = (size_t)sprintf(line, "AUTH PLAIN ");
    fill(line + n, 'Q', 12272);
    assert_int_equal(smtp_cmd_parse(line, n + 12272, 0, &c), 0);
    assert_int_equal(c.auth_ir.len, 12272);
    fill(line + n, 'Q', 12276);
    assert_int_equal(smtp_cmd_parse(line, n + 12276, 0, &c), SMTP_CMD_E_LINE_TOO_LONG);
}

/* Each character class, through the parser, against the RFC's words. */
static void
test_char_classes(void **state)
{
    const char *atext = "!#$%&'*+-/=?^_`{|}~";
    char line[64];
    struct smtp_cmd c;

    for (int ch = 0; ch < 128; ch++) {
        bool alpha = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
        bool digit = ch >= '0' && ch <= '9';
        bool is_atext = alpha || digit || (ch != 0 && strchr(atext, ch) != NULL);
        bool is_qtext = (ch >= 32 && ch <= 126 && ch != '"' && ch != '\\');
        bool is_dcontent = (ch >= 33 && ch <= 90) || (ch >= 94 && ch <= 126);
        bool is_xchar = ch >= 33 && ch <= 126 && ch != '+' && ch != '=';
        bool is_mech = alpha || digit || ch == '-' || ch == '_';
        int n;

        n = sprintf(line, "RCPT TO:<a%cb@x.example>", ch);
        assert_int_equal(smtp_cmd_parse(line, (size_t)n, 0, &c) == 0, is_atext || ch == '.');
        n = sprintf(line, "RCPT TO:<\"a%cb\"@x.example>", ch);
        /* a backslash there quotes the "b" after it */
        assert_int_equal(smtp_cmd_parse(line, (size_t)n, 0, &c) == 0, is_qtext || ch == '\\');
        n = sprintf(line, "RCPT TO:<\"a\\%cb\"@x.example>", ch);
        assert_int_equal(smtp_cmd_parse(line, (size_t)n, 0, &c) == 0, ch >= 32 && ch <= 126);
        n = sprintf(line, "RCPT TO:<a@x%cy.example>", ch);
        assert_int_equal(smtp_cmd_parse(line, (size_t)n, 0, &c) == 0,
                         alpha || digit || ch == '-' || ch == '.' || ch == '_');
        n = sprintf(line, "RCPT TO:<a@[x:a%cb]>", ch);
        assert_int_equal(smtp_cmd_parse(line, (size_t)n, 0, &c) == 0, is_dcontent);
        n = sprintf(line, "MAIL FROM:<> ENVID=a%cb", ch);
        assert_int_equal(smtp_cmd_parse(line, (size_t)n, 0, &c) == 0, is_xchar);
        n = sprintf(line, "AUTH A%cB", ch);
        assert_int_equal(smtp_cmd_parse(line, (size_t)n, 0, &c) == 0, is_mech);
    }
}

/* ---- formatting ---- */

static void
test_fmt(void **state)
{
    char out[1200];
    struct smtp_params p;
    struct smtp_cmd c;
    int n;

    n = smtp_fmt_mail(out, sizeof out, L(""), NULL);
    assert_int_equal(n, 14);
    assert_memory_equal(out, "MAIL FROM:<>\r\n", 14);

    memset(&p, 0, sizeof p);
    p.seen =
        SMTP_PARAM_SIZE | SMTP_PARAM_BODY | SMTP_PARAM_SMTPUTF8 | SMTP_PARAM_RET | SMTP_PARAM_ENVID;
    p.size = 12345;
    p.body = SMTP_BODY_8BITMIME;
    p.ret = SMTP_RET_HDRS;
    p.envid.ptr = "QQ+2B1";
    p.envid.len = 6;
    n = smtp_fmt_mail(out, sizeof out, L("b@example.com"), &p);
    assert_true(n > 0);
    assert_string_equal(
        (out[n] = '\0', out),
        "MAIL FROM:<b@example.com> SIZE=12345 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1\r\n");
    /* the round trip gives the same parameters */
    assert_int_equal(smtp_cmd_parse(out, (size_t)n - 2, 0, &c), 0);
    assert_int_equal(c.params.seen, p.seen);
    assert_int_equal(c.params.size, 12345);
    assert_int_equal(c.params.body, SMTP_BODY_8BITMIME);
    assert_int_equal(c.params.ret, SMTP_RET_HDRS);
    assert_span(c.params.envid, "QQ+2B1");

    /* every size of a too small buffer says so and never overruns */
    for (size_t cap = 0; cap < (size_t)n; cap++) {
        char small[128];

        memset(small, '#', sizeof small);
        assert_int_equal(smtp_fmt_mail(small, cap, L("b@example.com"), &p), SMTP_CMD_E_NOSPACE);
        for (size_t k = cap; k < sizeof small; k++)
            assert_int_equal(small[k], '#');
    }

    memset(&p, 0, sizeof p);
    p.seen = SMTP_PARAM_NOTIFY | SMTP_PARAM_ORCPT;
    p.notify = SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_FAILURE;
    p.orcpt_type.ptr = "rfc822";
    p.orcpt_type.len = 6;
    p.orcpt_addr.ptr = "u+2Bx@example.com";
    p.orcpt_addr.len = 17;
    n = smtp_fmt_rcpt(out, sizeof out, L("u+x@example.com"), &p, false);
    assert_true(n > 0);
    out[n] = '\0';
    assert_string_equal(
        out, "RCPT TO:<u+x@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+2Bx@example.com\r\n");
    assert_int_equal(smtp_cmd_parse(out, (size_t)n - 2, 0, &c), 0);
    assert_int_equal(c.params.notify, p.notify);
    p.notify = SMTP_NOTIFY_NEVER;
    p.seen = SMTP_PARAM_NOTIFY;
    n = smtp_fmt_rcpt(out, sizeof out, L("Postmaster"), &p, false);
    assert_true(n > 0);
    out[n] = '\0';
    assert_string_equal(out, "RCPT TO:<Postmaster> NOTIFY=NEVER\r\n");
    /* a local part that is no Dot-string goes out as a quoted string */
    static const struct {
        const char *in, *out;
    } dots[] = {
        {"user.@docomo.ne.jp", "RCPT TO:<\"user.\"@docomo.ne.jp>\r\n"},
        {".user@x.jp", "RCPT TO:<\".user\"@x.jp>\r\n"},
        {"a..b@x_y.jp", "RCPT TO:<\"a..b\"@x_y.jp>\r\n"},
        {"\"a..b\"@x.jp", "RCPT TO:<\"a..b\"@x.jp>\r\n"},
        {"a.b@x.jp", "RCPT TO:<a.b@x.jp>\r\n"},
    };
    for (size_t i = 0; i < sizeof dots / sizeof dots[0]; i++) {
        n = smtp_fmt_rcpt(out, sizeof out, dots[i].in, strlen(dots[i].in), NULL, false);
        assert_true(n > 0);
        out[n] = '\0';
        assert_string_equal(out, dots[i].out);
        assert_int_equal(smtp_cmd_parse(out, (size_t)n - 2, 0, &c), 0);
    }
    n = smtp_fmt_mail(out, sizeof out, L("news.@x.jp"), NULL);
    assert_true(n > 0);
    out[n] = '\0';
    assert_string_equal(out, "MAIL FROM:<\"news.\"@x.jp>\r\n");

    /* refusals: nothing from the queue may inject a command */
    assert_int_equal(smtp_fmt_rcpt(out, sizeof out, L(""), NULL, false), SMTP_CMD_E_NULL_RCPT);
    assert_int_equal(smtp_fmt_mail(out, sizeof out, L("a@b.c>\r\nRSET"), NULL),
                     SMTP_CMD_E_DOMAIN_SYNTAX);
    assert_int_equal(smtp_fmt_mail(out, sizeof out, L("a\r\n@b.c"), NULL), SMTP_CMD_E_LOCAL_SYNTAX);
    assert_int_equal(smtp_fmt_rcpt(out, sizeof out, L("\xc3\xbc@b.c"), NULL, false),
                     SMTP_CMD_E_UTF8_NOT_ALLOWED);
    assert_true(smtp_fmt_rcpt(out, sizeof out, L("\xc3\xbc@b.c"), NULL, true) > 0);
    memset(&p, 0, sizeof p);
    p.seen = SMTP_PARAM_ENVID;
    p.envid.ptr = "a b";
    p.envid.len = 3;
    assert_int_equal(smtp_fmt_mail(out, sizeof out, L("a@b.c"), &p), SMTP_CMD_E_FMT_VALUE);
    p.seen = SMTP_PARAM_NOTIFY;
    p.notify = SMTP_NOTIFY_NEVER | SMTP_NOTIFY_DELAY;
    assert_int_equal(smtp_fmt_rcpt(out, sizeof out, L("a@b.c"), &p, false), SMTP_CMD_E_FMT_VALUE);
    assert_int_equal(smtp_fmt_mail(out, sizeof out, L("a@b.c"), &p), SMTP_CMD_E_FMT_VALUE);
    p.seen = SMTP_PARAM_SIZE;
    assert_int_equal(smtp_fmt_rcpt(out, sizeof out, L("a@b.c"), &p, false), SMTP_CMD_E_FMT_VALUE);
    p.seen = SMTP_PARAM_ORCPT;
    p.orcpt_type.ptr = "rfc822";
    p.orcpt_type.len = 6;
    p.orcpt_addr.ptr = "a\r\nb";
    p.orcpt_addr.len = 4;
    assert_int_equal(smtp_fmt_rcpt(out, sizeof out, L("a@b.c"), &p, false), SMTP_CMD_E_FMT_VALUE);
}

static void
test_xtext(void **state)
{
    char enc[64], dec[64];
    const char raw[] = "a+b=c d\xc3\xbc";
    long n, m;

    n = smtp_xtext_encode(raw, sizeof raw - 1, enc, sizeof enc);
    assert_int_equal(n, 19);
    assert_memory_equal(enc, "a+2Bb+3Dc+20d+C3+BC", 19);
    m = smtp_xtext_decode(enc, (size_t)n, dec, sizeof dec);
    assert_int_equal(m, (long)sizeof raw - 1);
    assert_memory_equal(dec, raw, sizeof raw - 1);
    /* in place */
    m = smtp_xtext_decode(enc, (size_t)n, enc, sizeof enc);
    assert_int_equal(m, (long)sizeof raw - 1);
    assert_memory_equal(enc, raw, sizeof raw - 1);
    assert_int_equal(smtp_xtext_encode(raw, sizeof raw - 1, enc, 5), SMTP_CMD_E_NOSPACE);
    assert_int_equal(smtp_xtext_decode(L("a+2"), dec, sizeof dec), SMTP_CMD_E_PARAM_VALUE);
    assert_int_equal(smtp_xtext_decode(L("a+zz"), dec, sizeof dec), SMTP_CMD_E_PARAM_VALUE);
    assert_int_equal(smtp_xtext_decode(L("a b"), dec, sizeof dec), SMTP_CMD_E_PARAM_VALUE);
    assert_int_equal(smtp_xtext_decode(L("abc"), dec, 2), SMTP_CMD_E_NOSPACE);
}

static void
test_names(void **state)
{
    assert_string_equal(smtp_verb_str(SMTP_VERB_STARTTLS), "STARTTLS");
    assert_string_equal(smtp_verb_str(SMTP_VERB_NONE), "?");
    assert_string_equal(smtp_verb_str((enum smtp_verb)99), "?");
    assert_string_equal(smtp_param_str(SMTP_PARAM_SIZE), "SIZE");
    assert_string_equal(smtp_param_str(SMTP_PARAM_SMTPUTF8), "SMTPUTF8");
    assert_string_equal(smtp_param_str(SMTP_PARAM_ORCPT), "ORCPT");
    assert_string_equal(smtp_param_str(SMTP_PARAM_SIZE | SMTP_PARAM_BODY), "?");
    assert_string_equal(smtp_param_str(0), "?");
    assert_int_equal(smtp_auth_mech_parse(L("cram-md5")), SMTP_AUTH_CRAM_MD5);
    assert_int_equal(smtp_auth_mech_parse(L("CRAM-MD")), 0);
    assert_int_equal(smtp_auth_mech_parse(L("CRAM-MD55")), 0);
    assert_int_equal(smtp_auth_mech_parse(L("PLAIN\x7f")), 0);
    assert_string_equal(smtp_auth_mech_str(SMTP_AUTH_OAUTHBEARER), "OAUTHBEARER");
    assert_null(smtp_auth_mech_str(SMTP_AUTH_PLAIN | SMTP_AUTH_LOGIN));
    for (uint32_t b = 1; b <= SMTP_AUTH_ANONYMOUS; b <<= 1) {
        const char *s = smtp_auth_mech_str(b);

        assert_non_null(s);
        assert_int_equal(smtp_auth_mech_parse(s, strlen(s)), b);
    }
}

/* A quoted local part is its dot-string when it needs no quotes, an
 * unquoted one that is no dot-string its quoted string; any other local
 * part is left as it is. */
static void
test_local_canon(void **state)
{
    (void)state;
    static const struct {
        const char *in, *out; /* out NULL: left as it is */
    } cases[] = {
        {"\"john\"", "john"},
        {"\"jo\\hn\"", "john"},
        {"\"j.o+n\"", "j.o+n"},
        {"\"\xc3\xa9t\xc3\xa9\"", "\xc3\xa9t\xc3\xa9"},
        {"john", NULL},
        {"\"j n\"", NULL},
        {"\"x@y\"", NULL},
        {"\".john\"", NULL},
        {"\"john.\"", NULL},
        {"john.", "\"john.\""},
        {".john", "\".john\""},
        {"jo..hn", "\"jo..hn\""},
        {"jo.hn", NULL},
        {".", "\".\""},
        {"jo hn.", NULL},
        {"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.", /* 62 + 2 */
         "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.\""},
        {"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.", NULL},
        {"\"jo..hn\"", NULL},
        {"\"\"", NULL},
        {"\"", NULL},
        {"\"john\\\"", NULL},
        {"\"a\\\"b\"", NULL},
        {"\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"",
         "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
        {"\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char buf[SMTP_LOCAL_MAX];
        const char *in = cases[i].in, *out = NULL;
        size_t n = smtp_local_canon(in, strlen(in), buf, &out);
        const char *want = cases[i].out ? cases[i].out : in;
        if (cases[i].out == NULL)
            assert_ptr_equal(out, in);
        assert_int_equal(n, strlen(want));
        assert_memory_equal(out, want, n);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_line_find),    cmocka_unit_test(test_parse_table),
        cmocka_unit_test(test_mail_fields),  cmocka_unit_test(test_rcpt_fields),
        cmocka_unit_test(test_other_fields), cmocka_unit_test(test_error_details),
        cmocka_unit_test(test_limits),       cmocka_unit_test(test_char_classes),
        cmocka_unit_test(test_fmt),          cmocka_unit_test(test_xtext),
        cmocka_unit_test(test_names),        cmocka_unit_test(test_local_canon),
        cmocka_unit_test(test_root_dot),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
