/*
 * smtp_cmd: command line framing, the command parser, the names and
 * texts of verbs, parameters and errors, xtext, and MAIL/RCPT
 * formatting (see smtp_cmd.h). The grammar is RFC 5321 4.1 with the
 * SMTPUTF8 extensions of RFC 6531 3.3, the parameters of RFC 1870, 6152,
 * 3030, 3461 and 4954, and the leniencies of Postfix's smtpd that clients
 * count on: one space after FROM:/TO:, white space before the CRLF, a
 * path without its angle brackets. The grammar of the arguments (paths,
 * mailboxes, domains, address literals, ESMTP parameters) is
 * smtp_cmd_args.c's; the character classes both use, and what this file
 * calls there, are in smtp_cmd_int.h.
 *
 * Threading: pure functions, no global state beyond constant tables.
 */
#include "engine/smtp_cmd.h"

#include <string.h>

#include "engine/smtp_cmd_int.h"

/* The character classes (smtp_cmd_int.h) of each octet of the ASCII range. */
const uint16_t smtp_cclass[256] = {
    0x800, 0x800, 0x800, 0x800, 0x800, 0x800, 0x800, 0x800,
    0x800, 0x000, 0x800, 0x800, 0x800, 0x800, 0x800, 0x800, /* 0x00 */
    0x800, 0x800, 0x800, 0x800, 0x800, 0x800, 0x800, 0x800,
    0x800, 0x800, 0x800, 0x800, 0x800, 0x800, 0x800, 0x800, /* 0x10 */
    0x008, 0x079, 0x070, 0x079, 0x079, 0x079, 0x079, 0x079,
    0x078, 0x078, 0x079, 0x159, 0x078, 0x27d, 0x078, 0x179, /*  !"#$%&'()*+,-./ */
    0x7ff, 0x7ff, 0x7ff, 0x7ff, 0x7ff, 0x7ff, 0x7ff, 0x7ff,
    0x7ff, 0x7ff, 0x078, 0x078, 0x078, 0x019, 0x078, 0x079, /* 0123456789:;<=>? */
    0x078, 0x77f, 0x77f, 0x77f, 0x77f, 0x77f, 0x77f, 0x37f,
    0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, /* @ABCDEFGHIJKLMNO */
    0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f,
    0x37f, 0x37f, 0x37f, 0x068, 0x060, 0x068, 0x079, 0x279, /* PQRSTUVWXYZ[\]^_ */
    0x079, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f,
    0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, /* `abcdefghijklmno */
    0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f, 0x37f,
    0x37f, 0x37f, 0x37f, 0x079, 0x079, 0x079, 0x079, 0x800, /* pqrstuvwxyz{|}~  */
};

/* ---- line framing ---- */

long
smtp_cmd_line_find(const char *buf, size_t len, size_t max, size_t *err_off)
{
    size_t win = len < max ? len : max, scan, i;
    const char *lf, *cr;
    size_t dummy;

    if (err_off == NULL)
        err_off = &dummy;
    lf = memchr(buf, '\n', win);
    scan = lf ? (size_t)(lf - buf) : win;
    cr = memchr(buf, '\r', scan);
    if (cr != NULL) {
        i = (size_t)(cr - buf);
        if (lf != NULL && i + 1 == scan)
            return (long)scan + 1;
        if (i + 1 < scan) {
            *err_off = i;
            return SMTP_CMD_E_BARE_CR;
        }
        /* A CR last in the window: its LF has not arrived yet, or would
         * be one past the limit. */
    } else if (lf != NULL) {
        *err_off = scan;
        return SMTP_CMD_E_BARE_LF;
    }
    if (win == max) {
        *err_off = max;
        return SMTP_CMD_E_LINE_TOO_LONG;
    }
    return 0;
}

/* ---- commands ---- */

static int
fail(struct smtp_cmd *cmd, const char *line, const char *at, int err)
{
    cmd->err_off = (size_t)(at - line);
    return err;
}

/* MAIL FROM:<...> / RCPT TO:<...>; p is after the verb. */
static int
parse_mail_rcpt(const char *line, const char *p, const char *end, bool rcpt, uint32_t flags,
                struct smtp_cmd *cmd)
{
    const char *kw = rcpt ? " to:" : " from:";
    size_t kwlen = rcpt ? 4 : 6;
    const char *path_at;
    bool utf8;
    int rc;

    if ((size_t)(end - p) < kwlen || !eq_nocase(p, kwlen, kw))
        return fail(cmd, line, p, SMTP_CMD_E_FROM_TO);
    p += kwlen;
    /* "MAIL FROM: <a@b>": one space is a quirk common enough to allow. */
    if (p < end && *p == ' ')
        p++;
    if (p == end || (*p != '<' && *p != '"' && *p != '.' && !(cc(p) & C_ATEXT) && !is8(p)))
        return fail(cmd, line, p, SMTP_CMD_E_PATH_SYNTAX);
    path_at = p;
    if (*p != '<')
        rc = smtp_parse_bare_path(p, end, rcpt, &cmd->path, &p);
    else
        rc = smtp_parse_path(p, end, rcpt, &cmd->path, &p);
    if (rc < 0)
        return fail(cmd, line, p, rc);
    utf8 = rcpt && (flags & SMTP_CMD_F_UTF8);
    rc = smtp_parse_params(line, p, end, rcpt, utf8, (flags & SMTP_CMD_F_NO_PARAMS) != 0, cmd);
    if (rc < 0)
        return rc;
    if (!rcpt)
        utf8 = cmd->params.seen & SMTP_PARAM_SMTPUTF8;
    if ((cmd->path.flags & SMTP_PATH_UTF8) && !utf8)
        return fail(cmd, line, path_at, SMTP_CMD_E_UTF8_NOT_ALLOWED);
    return 0;
}

/* Free text (HELO/EHLO/VRFY/EXPN/HELP/NOOP): anything but controls. */
static int
check_text(struct smtp_cmd *cmd, const char *line, const char *p, const char *end)
{
    for (; p < end; p++) {
        if (cc(p) & C_CTL)
            return fail(cmd, line, p, SMTP_CMD_E_BAD_CHAR);
    }
    return 0;
}

static int
parse_helo(const char *line, const char *p, const char *end, struct smtp_cmd *cmd)
{
    const char *q;
    uint32_t f = 0;
    int rc;

    if (p == end)
        return fail(cmd, line, p, SMTP_CMD_E_ARG_MISSING);
    rc = check_text(cmd, line, p, end);
    if (rc < 0)
        return rc;
    if (*p == '[') {
        cmd->helo_literal = true;
        rc = smtp_parse_literal(p, end, &q, &f);
    } else {
        rc = smtp_parse_domain(p, end, &q, &f);
    }
    cmd->helo_valid = rc == 0 && q == end;
    return 0;
}

static int
parse_bdat(const char *line, const char *p, const char *end, struct smtp_cmd *cmd)
{
    const char *sp;

    if (p == end)
        return fail(cmd, line, p, SMTP_CMD_E_ARG_MISSING);
    sp = memchr(p, ' ', (size_t)(end - p));
    if (!smtp_parse_u64(p, sp ? sp : end, 20, false, &cmd->bdat_size))
        return fail(cmd, line, p, SMTP_CMD_E_ARG_SYNTAX);
    if (sp != NULL) {
        if (!eq_nocase(sp + 1, (size_t)(end - sp - 1), "last"))
            return fail(cmd, line, sp + 1, SMTP_CMD_E_ARG_SYNTAX);
        cmd->bdat_last = true;
    }
    return 0;
}

/* AUTH mech [SP initial-response]; the response is base64 or "=". */
static int
parse_auth(const char *line, const char *p, const char *end, struct smtp_cmd *cmd)
{
    const char *m = p, *r;
    size_t n, pad = 0;

    if (p == end)
        return fail(cmd, line, p, SMTP_CMD_E_ARG_MISSING);
    while (p < end && (cc(p) & C_MECH))
        p++;
    if (p == m || p - m > 20 || (p < end && *p != ' '))
        return fail(cmd, line, p, SMTP_CMD_E_ARG_SYNTAX);
    cmd->auth_name = span(m, p);
    cmd->auth_mech = smtp_auth_mech_parse(m, (size_t)(p - m));
    if (p == end)
        return 0;
    r = ++p;
    n = (size_t)(end - r);
    if (n == 1 && *r == '=') {
        cmd->auth_ir = span(r, end);
        return 0;
    }
    while (p < end && (cc(p) & C_B64))
        p++;
    while (p < end && *p == '=' && pad < 2) {
        p++;
        pad++;
    }
    if (n == 0 || p != end || n % 4 != 0)
        return fail(cmd, line, p, SMTP_CMD_E_ARG_SYNTAX);
    cmd->auth_ir = span(r, end);
    return 0;
}

static inline uint32_t
word4(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;

    return (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24;
}

#define W4(a, b, c, d)                                                                             \
    ((uint32_t)(a) | (uint32_t)(b) << 8 | (uint32_t)(c) << 16 | (uint32_t)(d) << 24)

static enum smtp_verb
verb_of(const char *line, size_t len, size_t *vlen)
{
    uint32_t w;

    *vlen = 4;
    if (len < 4)
        return SMTP_VERB_NONE;
    /* OR-ing 0x20 lowercases letters and maps nothing else onto a letter,
     * so comparing with lowercase words is an exact case-insensitive test. */
    w = word4(line) | 0x20202020u;
    switch (w) {
    case W4('h', 'e', 'l', 'o'):
        return SMTP_VERB_HELO;
    case W4('e', 'h', 'l', 'o'):
        return SMTP_VERB_EHLO;
    case W4('m', 'a', 'i', 'l'):
        return SMTP_VERB_MAIL;
    case W4('r', 'c', 'p', 't'):
        return SMTP_VERB_RCPT;
    case W4('d', 'a', 't', 'a'):
        return SMTP_VERB_DATA;
    case W4('b', 'd', 'a', 't'):
        return SMTP_VERB_BDAT;
    case W4('r', 's', 'e', 't'):
        return SMTP_VERB_RSET;
    case W4('n', 'o', 'o', 'p'):
        return SMTP_VERB_NOOP;
    case W4('q', 'u', 'i', 't'):
        return SMTP_VERB_QUIT;
    case W4('v', 'r', 'f', 'y'):
        return SMTP_VERB_VRFY;
    case W4('e', 'x', 'p', 'n'):
        return SMTP_VERB_EXPN;
    case W4('h', 'e', 'l', 'p'):
        return SMTP_VERB_HELP;
    case W4('a', 'u', 't', 'h'):
        return SMTP_VERB_AUTH;
    case W4('s', 't', 'a', 'r'):
        if (len >= 8 && (word4(line + 4) | 0x20202020u) == W4('t', 't', 'l', 's')) {
            *vlen = 8;
            return SMTP_VERB_STARTTLS;
        }
        return SMTP_VERB_NONE;
    default:
        return SMTP_VERB_NONE;
    }
}

static size_t
line_max(enum smtp_verb verb)
{
    switch (verb) {
    case SMTP_VERB_MAIL:
        return SMTP_CMD_LINE_MAX_MAIL;
    case SMTP_VERB_RCPT:
        return SMTP_CMD_LINE_MAX_RCPT;
    case SMTP_VERB_AUTH:
        return SMTP_CMD_LINE_MAX_AUTH;
    default:
        return SMTP_CMD_LINE_MAX;
    }
}

int
smtp_cmd_parse(const char *line, size_t len, uint32_t flags, struct smtp_cmd *cmd)
{
    const char *end = line + len, *p;
    enum smtp_verb verb;
    size_t vlen;

    memset(cmd, 0, sizeof *cmd);
    verb = verb_of(line, len, &vlen);
    if (len > vlen && line[vlen] != ' ')
        verb = SMTP_VERB_NONE;
    if (len + 2 > line_max(verb)) {
        /* The verb is said even so: a BDAT line that is too long leaves
         * the chunk's end unknown, and the caller must know that. */
        cmd->verb = verb;
        return fail(cmd, line, line + line_max(verb) - 2, SMTP_CMD_E_LINE_TOO_LONG);
    }
    if (len == 0)
        return SMTP_CMD_E_EMPTY;
    if (verb == SMTP_VERB_NONE)
        return SMTP_CMD_E_UNKNOWN;
    cmd->verb = verb;
    /* "MAIL FROM:<a@b> ", "DATA ": white space before the CRLF is sent by
     * clients in the field and taken by Postfix (its arguments are the
     * words of the line); it ends nothing, so it is dropped (white space
     * anywhere else is as the grammar says). */
    while (end > line + vlen && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    p = line + vlen;
    if (p < end)
        cmd->arg = span(p + 1, end);

    switch (verb) {
    case SMTP_VERB_MAIL:
    case SMTP_VERB_RCPT:
        return parse_mail_rcpt(line, p, end, verb == SMTP_VERB_RCPT, flags, cmd);
    case SMTP_VERB_DATA:
    case SMTP_VERB_RSET:
    case SMTP_VERB_QUIT:
    case SMTP_VERB_STARTTLS:
        return p == end ? 0 : fail(cmd, line, p, SMTP_CMD_E_ARG_UNEXPECTED);
    case SMTP_VERB_HELO:
    case SMTP_VERB_EHLO:
        return parse_helo(line, p == end ? p : p + 1, end, cmd);
    case SMTP_VERB_NOOP:
    case SMTP_VERB_HELP:
        return check_text(cmd, line, p, end);
    case SMTP_VERB_VRFY:
    case SMTP_VERB_EXPN:
        if (p == end || p + 1 == end)
            return fail(cmd, line, p, SMTP_CMD_E_ARG_MISSING);
        return check_text(cmd, line, p + 1, end);
    case SMTP_VERB_BDAT:
        return parse_bdat(line, p == end ? p : p + 1, end, cmd);
    case SMTP_VERB_AUTH:
        return parse_auth(line, p == end ? p : p + 1, end, cmd);
    default:
        return SMTP_CMD_E_UNKNOWN;
    }
}

/* ---- names and texts ---- */

static const struct {
    uint32_t bit;
    const char *name;
} auth_mechs[] = {
    {SMTP_AUTH_PLAIN, "PLAIN"},
    {SMTP_AUTH_LOGIN, "LOGIN"},
    {SMTP_AUTH_CRAM_MD5, "CRAM-MD5"},
    {SMTP_AUTH_DIGEST_MD5, "DIGEST-MD5"},
    {SMTP_AUTH_XOAUTH2, "XOAUTH2"},
    {SMTP_AUTH_OAUTHBEARER, "OAUTHBEARER"},
    {SMTP_AUTH_SCRAM_SHA_1, "SCRAM-SHA-1"},
    {SMTP_AUTH_SCRAM_SHA_256, "SCRAM-SHA-256"},
    {SMTP_AUTH_EXTERNAL, "EXTERNAL"},
    {SMTP_AUTH_GSSAPI, "GSSAPI"},
    {SMTP_AUTH_NTLM, "NTLM"},
    {SMTP_AUTH_ANONYMOUS, "ANONYMOUS"},
};

uint32_t
smtp_auth_mech_parse(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof auth_mechs / sizeof auth_mechs[0]; i++) {
        const char *m = auth_mechs[i].name;
        size_t j;

        for (j = 0; j < len && m[j] != '\0'; j++) {
            if (lower((unsigned char)name[j]) != lower((unsigned char)m[j]))
                break;
        }
        if (j == len && m[j] == '\0')
            return auth_mechs[i].bit;
    }
    return 0;
}

const char *
smtp_auth_mech_str(uint32_t mech)
{
    for (size_t i = 0; i < sizeof auth_mechs / sizeof auth_mechs[0]; i++) {
        if (auth_mechs[i].bit == mech)
            return auth_mechs[i].name;
    }
    return NULL;
}

const char *
smtp_verb_str(enum smtp_verb verb)
{
    static const char *const names[] = {
        "?",    "HELO", "EHLO", "MAIL", "RCPT", "DATA",     "BDAT", "RSET",
        "NOOP", "QUIT", "VRFY", "EXPN", "HELP", "STARTTLS", "AUTH",
    };

    if ((unsigned)verb >= sizeof names / sizeof names[0])
        return "?";
    return names[verb];
}

const char *
smtp_param_str(uint32_t param)
{
    static const char *const names[] = {
        "SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH", "NOTIFY", "ORCPT",
    };
    _Static_assert(SMTP_PARAM_ORCPT == 1u << 7, "a name for every enum smtp_param bit");

    for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (param == 1u << i)
            return names[i];
    }
    return "?";
}

const char *
smtp_cmd_err_str(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case SMTP_CMD_E_LINE_TOO_LONG:
        return "line too long";
    case SMTP_CMD_E_BARE_LF:
        return "bare LF in command line";
    case SMTP_CMD_E_BARE_CR:
        return "bare CR in command line";
    case SMTP_CMD_E_EMPTY:
        return "empty command";
    case SMTP_CMD_E_UNKNOWN:
        return "unknown command";
    case SMTP_CMD_E_BAD_CHAR:
        return "control character in command";
    case SMTP_CMD_E_ARG_MISSING:
        return "argument missing";
    case SMTP_CMD_E_ARG_UNEXPECTED:
        return "command takes no argument";
    case SMTP_CMD_E_ARG_SYNTAX:
        return "argument syntax";
    case SMTP_CMD_E_FROM_TO:
        return "expected FROM: or TO:";
    case SMTP_CMD_E_PATH_SYNTAX:
        return "path syntax: expected <address>";
    case SMTP_CMD_E_ROUTE_SYNTAX:
        return "source route syntax";
    case SMTP_CMD_E_LOCAL_SYNTAX:
        return "local part syntax";
    case SMTP_CMD_E_NO_DOMAIN:
        return "address has no domain";
    case SMTP_CMD_E_DOMAIN_SYNTAX:
        return "domain syntax";
    case SMTP_CMD_E_LITERAL_SYNTAX:
        return "address literal syntax";
    case SMTP_CMD_E_LOCAL_TOO_LONG:
        return "local part over 64 octets";
    case SMTP_CMD_E_DOMAIN_TOO_LONG:
        return "domain over 255 octets";
    case SMTP_CMD_E_LABEL_TOO_LONG:
        return "domain label over 63 octets";
    case SMTP_CMD_E_PATH_TOO_LONG:
        return "path over 256 octets";
    case SMTP_CMD_E_NULL_RCPT:
        return "null recipient";
    case SMTP_CMD_E_UTF8_NOT_ALLOWED:
        return "non-ASCII address without SMTPUTF8";
    case SMTP_CMD_E_UTF8_INVALID:
        return "malformed UTF-8 in address";
    case SMTP_CMD_E_PARAM_SYNTAX:
        return "parameter syntax";
    case SMTP_CMD_E_PARAM_UNKNOWN:
        return "unknown parameter";
    case SMTP_CMD_E_PARAM_DUP:
        return "duplicate parameter";
    case SMTP_CMD_E_PARAM_VALUE:
        return "bad parameter value";
    case SMTP_CMD_E_NOSPACE:
        return "output buffer too small";
    case SMTP_CMD_E_FMT_VALUE:
        return "value refused for formatting";
    case SMTP_CMD_E_PARAM_UNOFFERED:
        return "parameter where none is offered";
    default:
        return "unknown error";
    }
}

const char *
smtp_cmd_err_reply(int err, enum smtp_verb verb)
{
    bool rcpt = verb == SMTP_VERB_RCPT;

    switch (err) {
    case SMTP_CMD_E_LINE_TOO_LONG:
        return "500 5.5.2 Line too long";
    case SMTP_CMD_E_BARE_LF:
        return "500 5.5.2 Bare LF is not allowed";
    case SMTP_CMD_E_BARE_CR:
        return "500 5.5.2 Bare CR is not allowed";
    case SMTP_CMD_E_EMPTY:
        return "500 5.5.2 Empty command";
    case SMTP_CMD_E_UNKNOWN:
        return "500 5.5.2 Command unrecognized";
    case SMTP_CMD_E_BAD_CHAR:
        return "501 5.5.2 Control character in command";
    case SMTP_CMD_E_ARG_MISSING:
        return "501 5.5.4 Argument required";
    case SMTP_CMD_E_ARG_UNEXPECTED:
        return "501 5.5.4 No arguments allowed";
    case SMTP_CMD_E_ARG_SYNTAX:
        return "501 5.5.4 Syntax error in argument";
    case SMTP_CMD_E_FROM_TO:
        return rcpt ? "501 5.5.4 Syntax: RCPT TO:<address>"
                    : "501 5.5.4 Syntax: MAIL FROM:<address>";
    case SMTP_CMD_E_PATH_SYNTAX:
        return rcpt ? "501 5.1.3 Bad recipient address syntax"
                    : "501 5.1.7 Bad sender address syntax";
    case SMTP_CMD_E_ROUTE_SYNTAX:
    case SMTP_CMD_E_LOCAL_SYNTAX:
    case SMTP_CMD_E_NO_DOMAIN:
    case SMTP_CMD_E_DOMAIN_SYNTAX:
    case SMTP_CMD_E_LITERAL_SYNTAX:
    case SMTP_CMD_E_UTF8_INVALID:
        return rcpt ? "553 5.1.3 Bad recipient address syntax"
                    : "553 5.1.7 Bad sender address syntax";
    case SMTP_CMD_E_LOCAL_TOO_LONG:
        return rcpt ? "553 5.1.3 Recipient local part too long"
                    : "553 5.1.7 Sender local part too long";
    case SMTP_CMD_E_DOMAIN_TOO_LONG:
    case SMTP_CMD_E_LABEL_TOO_LONG:
        return rcpt ? "553 5.1.3 Recipient domain too long" : "553 5.1.7 Sender domain too long";
    case SMTP_CMD_E_PATH_TOO_LONG:
        return rcpt ? "501 5.1.3 Path too long" : "501 5.1.7 Path too long";
    case SMTP_CMD_E_NULL_RCPT:
        return "501 5.1.3 Null recipient not allowed";
    case SMTP_CMD_E_UTF8_NOT_ALLOWED:
        return "553 5.6.7 Non-ASCII address requires SMTPUTF8";
    case SMTP_CMD_E_PARAM_SYNTAX:
        return "501 5.5.4 Syntax error in parameters";
    case SMTP_CMD_E_PARAM_UNKNOWN:
        return "555 5.5.4 Unsupported parameter";
    case SMTP_CMD_E_PARAM_DUP:
        return "501 5.5.4 Duplicate parameter";
    case SMTP_CMD_E_PARAM_VALUE:
        return "501 5.5.4 Invalid parameter value";
    case SMTP_CMD_E_PARAM_UNOFFERED:
        return "555 5.5.4 Unsupported option after HELO";
    default:
        return "451 4.3.0 Internal error";
    }
}

/* ---- xtext ---- */

long
smtp_xtext_encode(const char *in, size_t len, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;

    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)in[i];

        if (cc(in + i) & C_XCHAR) {
            if (o + 1 > cap)
                return SMTP_CMD_E_NOSPACE;
            out[o++] = (char)c;
        } else {
            if (o + 3 > cap)
                return SMTP_CMD_E_NOSPACE;
            out[o++] = '+';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    return (long)o;
}

static inline unsigned
hexval(char c)
{
    return c <= '9' ? (unsigned)(c - '0') : (unsigned)(c - 'A' + 10);
}

long
smtp_xtext_decode(const char *in, size_t len, char *out, size_t cap)
{
    const char *end = in + len;
    size_t o = 0;

    if (!smtp_xtext_valid(in, end))
        return SMTP_CMD_E_PARAM_VALUE;
    for (const char *p = in; p < end; o++) {
        char c;

        if (*p == '+') {
            c = (char)(hexval(p[1]) << 4 | hexval(p[2]));
            p += 3;
        } else {
            c = *p++;
        }
        if (o >= cap)
            return SMTP_CMD_E_NOSPACE;
        /* out may equal in: the write index never passes the read index. */
        out[o] = c;
    }
    return (long)o;
}

/* ---- formatting ---- */

#define MAIL_PARAMS                                                                                \
    (uint32_t)(SMTP_PARAM_SIZE | SMTP_PARAM_BODY | SMTP_PARAM_SMTPUTF8 | SMTP_PARAM_RET |          \
               SMTP_PARAM_ENVID | SMTP_PARAM_AUTH)
#define RCPT_PARAMS (uint32_t)(SMTP_PARAM_NOTIFY | SMTP_PARAM_ORCPT)

struct wbuf {
    char *p;
    char *end;
    bool full;
};

static void
put(struct wbuf *w, const char *s, size_t n)
{
    if (w->full || (size_t)(w->end - w->p) < n) {
        w->full = true;
        return;
    }
    memcpy(w->p, s, n);
    w->p += n;
}

static void
puts_(struct wbuf *w, const char *s)
{
    put(w, s, strlen(s));
}

static void
put_u64(struct wbuf *w, uint64_t v)
{
    char tmp[20];
    size_t n = 0;

    do {
        tmp[sizeof tmp - ++n] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    put(w, tmp + sizeof tmp - n, n);
}

/* <addr>; a local part that is no Dot-string (user.@docomo.ne.jp) is
 * written as the quoted string RFC 5321 wants ("user."@docomo.ne.jp), as
 * Postfix's smtp_quote_rfc821_envelope does: atext and dots need no
 * backslash inside the quotes. */
static int
fmt_path(struct wbuf *w, const char *addr, size_t len, bool rcpt, bool utf8)
{
    struct mbox m;
    int rc;

    if (rcpt && len == 0)
        return SMTP_CMD_E_NULL_RCPT;
    rc = smtp_mbox_check(addr, len, utf8, &m);
    if (rc == SMTP_CMD_E_NO_DOMAIN && rcpt && eq_nocase(addr, len, "postmaster"))
        rc = m.flags = 0;
    if (rc < 0)
        return rc;
    put(w, "<", 1);
    if (m.flags & SMTP_PATH_DOTS) {
        put(w, "\"", 1);
        put(w, addr, (size_t)(m.local_end - addr));
        put(w, "\"", 1);
        put(w, m.local_end, (size_t)(addr + len - m.local_end));
    } else {
        put(w, addr, len);
    }
    put(w, ">", 1);
    return 0;
}

static int
finish(struct wbuf *w, char *out)
{
    put(w, "\r\n", 2);
    if (w->full)
        return SMTP_CMD_E_NOSPACE;
    return (int)(w->p - out);
}

int
smtp_fmt_mail(char *out, size_t cap, const char *addr, size_t addr_len, const struct smtp_params *p)
{
    static const char *const bodies[] = {NULL, "7BIT", "8BITMIME", "BINARYMIME"};
    struct wbuf w = {out, out + cap, false};
    uint32_t seen = p ? p->seen : 0;
    int rc;

    if (seen & ~MAIL_PARAMS)
        return SMTP_CMD_E_FMT_VALUE;
    puts_(&w, "MAIL FROM:");
    rc = fmt_path(&w, addr, addr_len, false, seen & SMTP_PARAM_SMTPUTF8);
    if (rc < 0)
        return rc;
    if (seen & SMTP_PARAM_SIZE) {
        puts_(&w, " SIZE=");
        put_u64(&w, p->size);
    }
    if (seen & SMTP_PARAM_BODY) {
        if (p->body <= SMTP_BODY_NONE || p->body > SMTP_BODY_BINARYMIME)
            return SMTP_CMD_E_FMT_VALUE;
        puts_(&w, " BODY=");
        puts_(&w, bodies[p->body]);
    }
    if (seen & SMTP_PARAM_SMTPUTF8)
        puts_(&w, " SMTPUTF8");
    if (seen & SMTP_PARAM_RET) {
        if (p->ret != SMTP_RET_FULL && p->ret != SMTP_RET_HDRS)
            return SMTP_CMD_E_FMT_VALUE;
        puts_(&w, p->ret == SMTP_RET_FULL ? " RET=FULL" : " RET=HDRS");
    }
    if (seen & SMTP_PARAM_ENVID) {
        const char *e = p->envid.ptr;

        if (p->envid.len == 0 || p->envid.len > SMTP_ENVID_MAX ||
            !smtp_xtext_valid(e, e + p->envid.len))
            return SMTP_CMD_E_FMT_VALUE;
        puts_(&w, " ENVID=");
        put(&w, e, p->envid.len);
    }
    if (seen & SMTP_PARAM_AUTH) {
        const char *a = p->auth.ptr;

        if (p->auth.len == 0 || p->auth.len > 500 || !smtp_xtext_valid(a, a + p->auth.len))
            return SMTP_CMD_E_FMT_VALUE;
        puts_(&w, " AUTH=");
        put(&w, a, p->auth.len);
    }
    return finish(&w, out);
}

int
smtp_fmt_rcpt(char *out, size_t cap, const char *addr, size_t addr_len, const struct smtp_params *p,
              bool utf8)
{
    static const char *const notify[] = {"SUCCESS", "FAILURE", "DELAY"};
    struct wbuf w = {out, out + cap, false};
    uint32_t seen = p ? p->seen : 0;
    int rc;

    if (seen & ~RCPT_PARAMS)
        return SMTP_CMD_E_FMT_VALUE;
    puts_(&w, "RCPT TO:");
    rc = fmt_path(&w, addr, addr_len, true, utf8);
    if (rc < 0)
        return rc;
    if (seen & SMTP_PARAM_NOTIFY) {
        uint32_t n = p->notify;
        bool first = true;

        if (n == 0 || n > 15 || ((n & SMTP_NOTIFY_NEVER) && n != SMTP_NOTIFY_NEVER))
            return SMTP_CMD_E_FMT_VALUE;
        puts_(&w, " NOTIFY=");
        if (n == SMTP_NOTIFY_NEVER)
            puts_(&w, "NEVER");
        for (int i = 0; i < 3; i++) {
            if (n & (SMTP_NOTIFY_SUCCESS << i)) {
                if (!first)
                    put(&w, ",", 1);
                puts_(&w, notify[i]);
                first = false;
            }
        }
    }
    if (seen & SMTP_PARAM_ORCPT) {
        struct smtp_params tmp;
        const char *t = p->orcpt_type.ptr, *a = p->orcpt_addr.ptr;
        char joined[SMTP_ORCPT_MAX];
        size_t tl = p->orcpt_type.len, al = p->orcpt_addr.len;

        /* Check type;value as the parser would, from one contiguous copy. */
        if (tl + 1 + al > sizeof joined || tl == 0 || al == 0)
            return SMTP_CMD_E_FMT_VALUE;
        memcpy(joined, t, tl);
        joined[tl] = ';';
        memcpy(joined + tl + 1, a, al);
        if (smtp_orcpt_check(joined, joined + tl + 1 + al, utf8, &tmp) < 0)
            return SMTP_CMD_E_FMT_VALUE;
        puts_(&w, " ORCPT=");
        put(&w, joined, tl + 1 + al);
    }
    return finish(&w, out);
}
