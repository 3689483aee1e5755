/*
 * smtp_cmd: command line framing, the command parser, and MAIL/RCPT
 * formatting (see smtp_cmd.h). The grammar is RFC 5321 4.1 with the
 * SMTPUTF8 extensions of RFC 6531 3.3, the parameters of RFC 1870, 6152,
 * 3030, 3461 and 4954, and the leniencies of Postfix's smtpd that clients
 * count on: one space after FROM:/TO:, white space before the CRLF, a
 * path without its angle brackets.
 *
 * Threading: pure functions, no global state beyond constant tables.
 */
#include "engine/smtp_cmd.h"

#include <string.h>

/* Character classes of the ASCII range; bytes >= 0x80 are none of these
 * and are handled as UTF-8 where the grammar allows it. The table is
 * checked against the RFC definitions by tests/smtp/test_smtp_cmd.c. */
enum {
    C_ATEXT = 1 << 0,  /* RFC 5322 atext */
    C_LETDIG = 1 << 1, /* ALPHA / DIGIT */
    C_LDH = 1 << 2,    /* ALPHA / DIGIT / "-" (also esmtp-keyword) */
    C_QTEXT = 1 << 3,  /* qtextSMTP: 32-33, 35-91, 93-126 */
    C_DCONT = 1 << 4,  /* dcontent: 33-90, 94-126 */
    C_XCHAR = 1 << 5,  /* xtext xchar: 33-126 but "+" and "=" */
    C_VALUE = 1 << 6,  /* esmtp-value: 33-60, 62-126 */
    C_DIGIT = 1 << 7,
    C_B64 = 1 << 8,   /* base64 alphabet without the "=" pad */
    C_MECH = 1 << 9,  /* SASL mech-char (either case) */
    C_HEXU = 1 << 10, /* xtext hexchar digits: 0-9 A-F */
    C_CTL = 1 << 11,  /* controls but HT */
};

static const uint16_t cclass[256] = {
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

static inline unsigned
cc(const char *p)
{
    return cclass[(unsigned char)*p];
}

static inline bool
is8(const char *p)
{
    return (unsigned char)*p >= 0x80;
}

static inline int
lower(int c)
{
    return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

/* Case-insensitive compare of s[0..n) with a lowercase literal. */
static bool
eq_nocase(const char *s, size_t n, const char *lit)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (lit[i] == '\0' || lower((unsigned char)s[i]) != lit[i])
            return false;
    }
    return lit[n] == '\0';
}

static inline struct smtp_span
span(const char *b, const char *e)
{
    struct smtp_span s = {b, (size_t)(e - b)};
    return s;
}

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

/* ---- mailbox grammar ---- */

/* Well-formed UTF-8 (no overlongs, no surrogates, at most U+10FFFF). */
static bool
utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        unsigned c = s[i];
        size_t k;
        unsigned lo = 0x80, hi = 0xbf;

        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) {
            k = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            k = 2;
            if (c == 0xe0)
                lo = 0xa0;
            else if (c == 0xed)
                hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            k = 3;
            if (c == 0xf0)
                lo = 0x90;
            else if (c == 0xf4)
                hi = 0x8f;
        } else {
            return false;
        }
        if (n - i <= k)
            return false;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return false;
        for (size_t j = 2; j <= k; j++) {
            if (s[i + j] < 0x80 || s[i + j] > 0xbf)
                return false;
        }
        i += k + 1;
    }
    return true;
}

/* Snum "." Snum "." Snum "." Snum, each 1*3DIGIT up to 255. Returns the
 * end of the address or NULL. */
static const char *
parse_ipv4(const char *p, const char *end)
{
    for (int part = 0; part < 4; part++) {
        unsigned v = 0, n = 0;

        if (part > 0) {
            if (p == end || *p != '.')
                return NULL;
            p++;
        }
        while (p < end && (cc(p) & C_DIGIT) && n < 3) {
            v = v * 10 + (unsigned)(*p - '0');
            p++;
            n++;
        }
        if (n == 0 || v > 255)
            return NULL;
    }
    if (p < end && (cc(p) & C_DIGIT))
        return NULL;
    return p;
}

static inline bool
is_hex(const char *p)
{
    return (cc(p) & C_DIGIT) || ((*p | 0x20) >= 'a' && (*p | 0x20) <= 'f');
}

/* RFC 5321 IPv6-addr over [p, end) exactly: eight groups, or at most six
 * around one "::", where a trailing IPv4 address counts as two groups. */
static bool
parse_ipv6(const char *p, const char *end)
{
    int groups = 0;
    bool gap = false;

    if (end - p >= 2 && p[0] == ':' && p[1] == ':') {
        gap = true;
        p += 2;
        if (p == end)
            return true;
    } else if (p < end && *p == ':') {
        return false;
    }
    for (;;) {
        const char *q = p;
        int n = 0;

        while (q < end && is_hex(q) && n < 5) {
            q++;
            n++;
        }
        if (q < end && *q == '.') {
            if (parse_ipv4(p, end) != end)
                return false;
            groups += 2;
            break;
        }
        if (n == 0 || n > 4)
            return false;
        groups++;
        p = q;
        if (p == end)
            break;
        if (*p != ':')
            return false;
        p++;
        if (p < end && *p == ':') {
            if (gap)
                return false;
            gap = true;
            p++;
            if (p == end)
                break;
        } else if (p == end) {
            return false;
        }
    }
    return gap ? groups <= 6 : groups == 8;
}

struct mbox {
    const char *local_end;
    const char *dom;
    const char *dom_end;
    uint32_t flags;
};

/* "[" ... "]" at p. Returns 0 and *next after "]" or an error code. */
static int
parse_literal(const char *p, const char *end, const char **next, uint32_t *flags)
{
    const char *close = memchr(p, ']', (size_t)(end - p));
    const char *b = p + 1, *q;

    *next = p;
    if (close == NULL)
        return SMTP_CMD_E_LITERAL_SYNTAX;
    if (b < close && (cc(b) & C_DIGIT) && parse_ipv4(b, close) == close) {
        *flags |= SMTP_PATH_LIT_IPV4;
    } else if (close - b > 5 && eq_nocase(b, 5, "ipv6:")) {
        if (!parse_ipv6(b + 5, close))
            return SMTP_CMD_E_LITERAL_SYNTAX;
        *flags |= SMTP_PATH_LIT_IPV6;
    } else {
        /* General-address-literal: Ldh-str ":" 1*dcontent */
        for (q = b; q < close && (cc(q) & C_LDH); q++)
            ;
        if (q == b || q == close || *q != ':' || !(cc(q - 1) & C_LETDIG) || q + 1 == close)
            return SMTP_CMD_E_LITERAL_SYNTAX;
        for (q++; q < close; q++) {
            if (!(cc(q) & C_DCONT))
                return SMTP_CMD_E_LITERAL_SYNTAX;
        }
        *flags |= SMTP_PATH_LIT_OTHER;
    }
    *next = close + 1;
    return 0;
}

/* Domain at p: sub-domain *("." sub-domain), where a sub-domain is a
 * letter-digit string with inner hyphens; non-ASCII octets count as
 * letters (U-labels, RFC 6531). Stops at the first octet that cannot
 * continue it. Returns 0 or an error, *next where it stopped. */
static int
parse_domain(const char *p, const char *end, const char **next, uint32_t *flags)
{
    const char *start = p;

    for (;;) {
        const char *label = p;

        if (p == end || !((cc(p) & C_LETDIG) || is8(p))) {
            *next = p;
            return SMTP_CMD_E_DOMAIN_SYNTAX;
        }
        for (; p < end && ((cc(p) & C_LDH) || is8(p)); p++) {
            if (is8(p))
                *flags |= SMTP_PATH_UTF8;
        }
        if (p[-1] == '-') {
            *next = p - 1;
            return SMTP_CMD_E_DOMAIN_SYNTAX;
        }
        if (p - label > SMTP_LABEL_MAX) {
            *next = label;
            return SMTP_CMD_E_LABEL_TOO_LONG;
        }
        if (p == end || *p != '.')
            break;
        p++;
    }
    *next = p;
    if (p - start > SMTP_DOMAIN_MAX) {
        *next = start;
        return SMTP_CMD_E_DOMAIN_TOO_LONG;
    }
    return 0;
}

/*
 * Mailbox at p: Local-part "@" ( Domain / address-literal ). Stops at the
 * first octet after it (the caller checks for ">" or the end). When
 * postmaster is set, a bare "Postmaster" local part is accepted. Returns 0
 * or an error with *next at the fault.
 */
static int
parse_mailbox(const char *p, const char *end, bool postmaster, struct mbox *m, const char **next)
{
    const char *local = p;
    int rc;

    m->flags = 0;
    if (p < end && *p == '"') {
        m->flags |= SMTP_PATH_QUOTED;
        for (p++;; p++) {
            if (p == end) {
                *next = p;
                return SMTP_CMD_E_LOCAL_SYNTAX;
            }
            if (*p == '"')
                break;
            if (*p == '\\') {
                p++;
                if (p == end || *p < 32 || *p > 126) {
                    *next = p;
                    return SMTP_CMD_E_LOCAL_SYNTAX;
                }
            } else if (is8(p)) {
                m->flags |= SMTP_PATH_UTF8;
            } else if (!(cc(p) & C_QTEXT)) {
                *next = p;
                return SMTP_CMD_E_LOCAL_SYNTAX;
            }
        }
        p++;
    } else {
        for (;;) {
            const char *atom = p;

            for (; p < end && ((cc(p) & C_ATEXT) || is8(p)); p++) {
                if (is8(p))
                    m->flags |= SMTP_PATH_UTF8;
            }
            if (p == atom) {
                *next = p;
                return SMTP_CMD_E_LOCAL_SYNTAX;
            }
            if (p == end || *p != '.')
                break;
            p++;
        }
    }
    m->local_end = p;
    if (p - local > SMTP_LOCAL_MAX) {
        *next = local;
        return SMTP_CMD_E_LOCAL_TOO_LONG;
    }
    if (p == end || *p != '@') {
        if (postmaster && !(m->flags & SMTP_PATH_QUOTED) &&
            eq_nocase(local, (size_t)(p - local), "postmaster")) {
            m->flags |= SMTP_PATH_POSTMASTER;
            m->dom = m->dom_end = p;
            *next = p;
            return 0;
        }
        *next = p;
        if (p < end && (cc(p) & C_CTL))
            return SMTP_CMD_E_LOCAL_SYNTAX;
        return p == end || *p == '>' ? SMTP_CMD_E_NO_DOMAIN : SMTP_CMD_E_LOCAL_SYNTAX;
    }
    p++;
    m->dom = p;
    if (p < end && *p == '[')
        rc = parse_literal(p, end, next, &m->flags);
    else
        rc = parse_domain(p, end, next, &m->flags);
    m->dom_end = *next;
    if (rc == 0 && (m->flags & SMTP_PATH_UTF8) &&
        !utf8_valid((const unsigned char *)local, (size_t)(m->dom_end - local))) {
        *next = local;
        rc = SMTP_CMD_E_UTF8_INVALID;
    }
    return rc;
}

size_t
smtp_local_unquote(const char *local, size_t len, char *buf, const char **out)
{
    *out = local;
    if (len < 3 || local[0] != '"' || local[len - 1] != '"')
        return len;
    size_t o = 0;
    for (size_t i = 1; i + 1 < len; i++) {
        const char *c = local + i;
        if (*c == '\\') {
            if (i + 2 >= len)
                return len; /* the closing quote escaped: not a quoted string */
            c = local + ++i;
        }
        bool dot = *c == '.';
        if (o == SMTP_LOCAL_MAX || !((cc(c) & C_ATEXT) || is8(c) || dot) ||
            (dot && (o == 0 || buf[o - 1] == '.')))
            return len;
        buf[o++] = *c;
    }
    if (o == 0 || buf[o - 1] == '.')
        return len;
    *out = buf;
    return o;
}

int
smtp_mailbox_check(const char *addr, size_t len, bool utf8)
{
    const char *end = addr + len, *next;
    struct mbox m;
    int rc;

    if (len == 0)
        return 0;
    rc = parse_mailbox(addr, end, false, &m, &next);
    if (rc < 0)
        return rc;
    if (next != end)
        return next < m.dom ? SMTP_CMD_E_LOCAL_SYNTAX : SMTP_CMD_E_DOMAIN_SYNTAX;
    if ((m.flags & SMTP_PATH_UTF8) && !utf8)
        return SMTP_CMD_E_UTF8_NOT_ALLOWED;
    if (len + 2 > SMTP_PATH_MAX)
        return SMTP_CMD_E_PATH_TOO_LONG;
    return 0;
}

/* A stray octet at q, right after the mailbox m: inside its domain or
 * local part, theirs is the error. */
static int
mailbox_stray(const char *q, const struct mbox *m)
{
    return q >= m->dom && m->dom != m->dom_end ? SMTP_CMD_E_DOMAIN_SYNTAX
                                               : SMTP_CMD_E_LOCAL_SYNTAX;
}

/* path's spans: the mailbox m, parsed from p to q. */
static void
path_fill(struct smtp_path *path, const char *p, const char *q, const struct mbox *m)
{
    path->flags |= m->flags;
    path->local = span(p, m->local_end);
    path->domain = span(m->dom, m->dom_end);
    path->mailbox = span(p, q);
}

/*
 * Path at p (which is "<"): "<>" (when allowed), or "<" [A-d-l ":"] Mailbox
 * ">". On return *next is after ">" or at the fault.
 */
static int
parse_path(const char *p, const char *end, bool rcpt, struct smtp_path *path, const char **next)
{
    const char *open = p, *q;
    struct mbox m;
    int rc;

    p++;
    if (p < end && *p == '>') {
        *next = p;
        if (rcpt)
            return SMTP_CMD_E_NULL_RCPT;
        path->flags = SMTP_PATH_NULL;
        path->mailbox = path->local = path->domain = span(p, p);
        *next = p + 1;
        return 0;
    }
    if (p < end && *p == '@') {
        /* A-d-l = At-domain *( "," At-domain ) */
        const char *r = p;
        uint32_t rflags = 0;

        for (;;) {
            if (p == end || *p != '@') {
                *next = p;
                return SMTP_CMD_E_ROUTE_SYNTAX;
            }
            p++;
            if (p < end && *p == '[')
                rc = parse_literal(p, end, &q, &rflags);
            else
                rc = parse_domain(p, end, &q, &rflags);
            if (rc < 0 || (rflags & SMTP_PATH_UTF8)) {
                *next = q;
                return SMTP_CMD_E_ROUTE_SYNTAX;
            }
            p = q;
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            break;
        }
        if (p == end || *p != ':') {
            *next = p;
            return SMTP_CMD_E_ROUTE_SYNTAX;
        }
        path->route = span(r, p);
        path->flags |= SMTP_PATH_ROUTE;
        p++;
    }
    rc = parse_mailbox(p, end, rcpt, &m, &q);
    if (rc < 0) {
        *next = q;
        return rc;
    }
    if (q == end || *q != '>') {
        *next = q;
        /* A stray octet inside the domain or local part is theirs. */
        if (q < end && *q != ' ')
            return mailbox_stray(q, &m);
        return SMTP_CMD_E_PATH_SYNTAX;
    }
    if (q + 1 - open > SMTP_PATH_MAX) {
        *next = open;
        return SMTP_CMD_E_PATH_TOO_LONG;
    }
    path_fill(path, p, q, &m);
    *next = q + 1;
    return 0;
}

/*
 * A mailbox without its angle brackets, "MAIL FROM:a@b" (RFC 5321 wants
 * them; Postfix takes it, strict_rfc821_envelopes = no, and so do the
 * applications' libraries that were only ever tried against it). It ends
 * at the end of the line or at a space (the parameters). No null path
 * (there is nothing to tell "MAIL FROM:" from a mistake) and no source
 * route. On return *next is after the mailbox or at the fault.
 */
static int
parse_bare_path(const char *p, const char *end, bool rcpt, struct smtp_path *path,
                const char **next)
{
    struct mbox m;
    const char *q;
    int rc = parse_mailbox(p, end, rcpt, &m, &q);
    *next = q;
    if (rc < 0)
        return rc;
    if (q != end && *q != ' ')
        return mailbox_stray(q, &m);
    if (q + 2 - p > SMTP_PATH_MAX) { /* counted with the brackets it lacks */
        *next = p;
        return SMTP_CMD_E_PATH_TOO_LONG;
    }
    path_fill(path, p, q, &m);
    return 0;
}

/* ---- ESMTP parameters ---- */

static bool
xtext_valid(const char *p, const char *end)
{
    while (p < end) {
        if (*p == '+') {
            if (end - p < 3 || !(cc(p + 1) & C_HEXU) || !(cc(p + 2) & C_HEXU))
                return false;
            p += 3;
        } else if (cc(p) & C_XCHAR) {
            p++;
        } else {
            return false;
        }
    }
    return true;
}

/* NOTIFY=NEVER / NOTIFY=SUCCESS,FAILURE,DELAY (any subset, no repeats). */
static int
parse_notify(const char *p, const char *end, uint32_t *bits)
{
    uint32_t n = 0;

    for (;;) {
        const char *c = memchr(p, ',', (size_t)(end - p));
        const char *e = c ? c : end;
        uint32_t b;

        if (eq_nocase(p, (size_t)(e - p), "never"))
            b = SMTP_NOTIFY_NEVER;
        else if (eq_nocase(p, (size_t)(e - p), "success"))
            b = SMTP_NOTIFY_SUCCESS;
        else if (eq_nocase(p, (size_t)(e - p), "failure"))
            b = SMTP_NOTIFY_FAILURE;
        else if (eq_nocase(p, (size_t)(e - p), "delay"))
            b = SMTP_NOTIFY_DELAY;
        else
            return -1;
        if (n & b)
            return -1;
        n |= b;
        if (c == NULL)
            break;
        p = c + 1;
    }
    if ((n & SMTP_NOTIFY_NEVER) && n != SMTP_NOTIFY_NEVER)
        return -1;
    *bits = n;
    return 0;
}

/* ORCPT=addr-type;value: addr-type is an atom; rfc822 takes xtext, other
 * types (utf-8 of RFC 6533) printable octets and, when allowed, UTF-8. */
static int
check_orcpt(const char *p, const char *end, bool utf8, struct smtp_params *params)
{
    const char *semi = memchr(p, ';', (size_t)(end - p)), *q;

    if (end - p > SMTP_ORCPT_MAX || semi == NULL || semi == p || semi + 1 == end)
        return -1;
    for (q = p; q < semi; q++) {
        if (!(cc(q) & C_ATEXT))
            return -1;
    }
    params->orcpt_type = span(p, semi);
    params->orcpt_addr = span(semi + 1, end);
    if (eq_nocase(p, (size_t)(semi - p), "rfc822"))
        return xtext_valid(semi + 1, end) ? 0 : -1;
    for (q = semi + 1; q < end; q++) {
        if (is8(q)) {
            if (!utf8)
                return -1;
        } else if (!(cc(q) & C_VALUE)) {
            return -1;
        }
    }
    if (utf8 && !utf8_valid((const unsigned char *)semi + 1, (size_t)(end - semi - 1)))
        return -1;
    return 0;
}

static bool
parse_u64(const char *p, const char *end, size_t max_digits, bool saturate, uint64_t *out)
{
    uint64_t v = 0;

    if (p == end || (size_t)(end - p) > max_digits)
        return false;
    for (; p < end; p++) {
        unsigned d = (unsigned)(*p - '0');

        if (d > 9)
            return false;
        if (v > (UINT64_MAX - d) / 10) {
            if (!saturate)
                return false;
            v = UINT64_MAX;
        } else if (v != UINT64_MAX) {
            v = v * 10 + d;
        }
    }
    *out = v;
    return true;
}

/* Identify a keyword for this verb: the enum smtp_param bit, or 0. */
static uint32_t
param_kind(const char *k, size_t n, bool rcpt)
{
    if (rcpt) {
        if (eq_nocase(k, n, "notify"))
            return SMTP_PARAM_NOTIFY;
        if (eq_nocase(k, n, "orcpt"))
            return SMTP_PARAM_ORCPT;
        return 0;
    }
    switch (n) {
    case 3:
        return eq_nocase(k, n, "ret") ? SMTP_PARAM_RET : 0;
    case 4:
        if (eq_nocase(k, n, "size"))
            return SMTP_PARAM_SIZE;
        if (eq_nocase(k, n, "body"))
            return SMTP_PARAM_BODY;
        return eq_nocase(k, n, "auth") ? SMTP_PARAM_AUTH : 0;
    case 5:
        return eq_nocase(k, n, "envid") ? SMTP_PARAM_ENVID : 0;
    case 8:
        return eq_nocase(k, n, "smtputf8") ? SMTP_PARAM_SMTPUTF8 : 0;
    default:
        return 0;
    }
}

/* Check one value for its kind and store it. Returns 0 or -1. */
static int
param_value(uint32_t kind, const char *v, const char *end, bool has_value, bool utf8,
            struct smtp_params *params)
{
    size_t n = (size_t)(end - v);

    if (kind == SMTP_PARAM_SMTPUTF8)
        return has_value ? -1 : 0;
    if (!has_value)
        return -1;
    switch (kind) {
    case SMTP_PARAM_SIZE:
        return parse_u64(v, end, 20, true, &params->size) ? 0 : -1;
    case SMTP_PARAM_BODY:
        if (eq_nocase(v, n, "8bitmime"))
            params->body = SMTP_BODY_8BITMIME;
        else if (eq_nocase(v, n, "7bit"))
            params->body = SMTP_BODY_7BIT;
        else if (eq_nocase(v, n, "binarymime"))
            params->body = SMTP_BODY_BINARYMIME;
        else
            return -1;
        return 0;
    case SMTP_PARAM_RET:
        if (eq_nocase(v, n, "full"))
            params->ret = SMTP_RET_FULL;
        else if (eq_nocase(v, n, "hdrs"))
            params->ret = SMTP_RET_HDRS;
        else
            return -1;
        return 0;
    case SMTP_PARAM_ENVID:
        params->envid = span(v, end);
        return n <= SMTP_ENVID_MAX && xtext_valid(v, end) ? 0 : -1;
    case SMTP_PARAM_AUTH:
        params->auth = span(v, end);
        return n <= 500 && xtext_valid(v, end) ? 0 : -1;
    case SMTP_PARAM_NOTIFY:
        return parse_notify(v, end, &params->notify);
    case SMTP_PARAM_ORCPT:
        return check_orcpt(v, end, utf8, params);
    default:
        return -1;
    }
}

/* [SP esmtp-param *(SP esmtp-param)] from p to end. none: no parameter is
 * offered (SMTP_CMD_F_NO_PARAMS): the keywords are noted, the values not
 * read, and any parameter is SMTP_CMD_E_PARAM_UNOFFERED. */
static int
parse_params(const char *line, const char *p, const char *end, bool rcpt, bool utf8, bool none,
             struct smtp_cmd *cmd)
{
    struct smtp_params *params = &cmd->params;
    struct smtp_span unknown = span(NULL, NULL);

    while (p < end) {
        const char *k, *ke, *v = NULL, *ve;
        uint32_t kind;

        if (*p != ' ' || p + 1 == end || p[1] == ' ') {
            cmd->err_off = (size_t)(p - line);
            return SMTP_CMD_E_PARAM_SYNTAX;
        }
        k = ++p;
        while (p < end && (cc(p) & C_LDH))
            p++;
        ke = p;
        if (ke == k || *k == '-' || (p < end && *p != '=' && *p != ' ')) {
            cmd->err_off = (size_t)(p - line);
            return p < end && (cc(p) & C_CTL) ? SMTP_CMD_E_BAD_CHAR : SMTP_CMD_E_PARAM_SYNTAX;
        }
        if (p < end && *p == '=') {
            v = ++p;
            while (p < end && ((cc(p) & C_VALUE) || is8(p)))
                p++;
            if (p == v || (p < end && *p != ' ')) {
                cmd->err_off = (size_t)(p - line);
                return p < end && (cc(p) & C_CTL) ? SMTP_CMD_E_BAD_CHAR : SMTP_CMD_E_PARAM_SYNTAX;
            }
        }
        ve = p;
        cmd->err_param = span(k, ke);
        cmd->err_off = (size_t)(k - line);
        kind = param_kind(k, (size_t)(ke - k), rcpt);
        if (none) {
            if (kind == 0 && unknown.ptr == NULL)
                unknown = span(k, ke);
            params->seen |= kind;
            continue;
        }
        if (kind == 0)
            return SMTP_CMD_E_PARAM_UNKNOWN;
        if (params->seen & kind)
            return SMTP_CMD_E_PARAM_DUP;
        if (param_value(kind, v ? v : ke, ve, v != NULL, utf8, params) < 0) {
            if (v != NULL)
                cmd->err_off = (size_t)(v - line);
            return SMTP_CMD_E_PARAM_VALUE;
        }
        params->seen |= kind;
    }
    if (none && (params->seen != 0 || unknown.ptr != NULL)) {
        cmd->err_param = unknown;
        cmd->err_off = (size_t)(end - line);
        return SMTP_CMD_E_PARAM_UNOFFERED;
    }
    cmd->err_param = span(NULL, NULL);
    cmd->err_off = 0;
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
    if (p == end || (*p != '<' && *p != '"' && !(cc(p) & C_ATEXT) && !is8(p)))
        return fail(cmd, line, p, SMTP_CMD_E_PATH_SYNTAX);
    path_at = p;
    if (*p != '<')
        rc = parse_bare_path(p, end, rcpt, &cmd->path, &p);
    else
        rc = parse_path(p, end, rcpt, &cmd->path, &p);
    if (rc < 0)
        return fail(cmd, line, p, rc);
    utf8 = rcpt && (flags & SMTP_CMD_F_UTF8);
    rc = parse_params(line, p, end, rcpt, utf8, (flags & SMTP_CMD_F_NO_PARAMS) != 0, cmd);
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
        rc = parse_literal(p, end, &q, &f);
    } else {
        rc = parse_domain(p, end, &q, &f);
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
    if (!parse_u64(p, sp ? sp : end, 20, false, &cmd->bdat_size))
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

    if (!xtext_valid(in, end))
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

static int
fmt_path(struct wbuf *w, const char *addr, size_t len, bool rcpt, bool utf8)
{
    int rc;

    if (rcpt && len == 0)
        return SMTP_CMD_E_NULL_RCPT;
    rc = smtp_mailbox_check(addr, len, utf8);
    if (rc == SMTP_CMD_E_NO_DOMAIN && rcpt && eq_nocase(addr, len, "postmaster"))
        rc = 0;
    if (rc < 0)
        return rc;
    put(w, "<", 1);
    put(w, addr, len);
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

        if (p->envid.len == 0 || p->envid.len > SMTP_ENVID_MAX || !xtext_valid(e, e + p->envid.len))
            return SMTP_CMD_E_FMT_VALUE;
        puts_(&w, " ENVID=");
        put(&w, e, p->envid.len);
    }
    if (seen & SMTP_PARAM_AUTH) {
        const char *a = p->auth.ptr;

        if (p->auth.len == 0 || p->auth.len > 500 || !xtext_valid(a, a + p->auth.len))
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
        if (check_orcpt(joined, joined + tl + 1 + al, utf8, &tmp) < 0)
            return SMTP_CMD_E_FMT_VALUE;
        puts_(&w, " ORCPT=");
        put(&w, joined, tl + 1 + al);
    }
    return finish(&w, out);
}
