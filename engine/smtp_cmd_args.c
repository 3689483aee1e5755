/*
 * smtp_cmd_args: the grammar of a command's arguments, for smtp_cmd.c's
 * parser and formatter (see smtp_cmd.h): the path of MAIL and RCPT with
 * its mailbox (a Dot-string or quoted local part, a domain or an address
 * literal, RFC 5321 4.1.2 and 4.1.3, UTF-8 under SMTPUTF8, RFC 6531 3.3;
 * a domain's one trailing dot taken and left out, as Postfix does),
 * the bare path some clients send, a local part in its canonical form
 * (smtp_local_canon), and the ESMTP parameters of MAIL and RCPT: SIZE,
 * BODY, SMTPUTF8, RET, ENVID, AUTH, NOTIFY and ORCPT (RFC 1870, 6152,
 * 3030, 3461, 4954), xtext included. What smtp_cmd.c calls here is
 * declared in smtp_cmd_int.h.
 *
 * Threading: pure functions, no global state beyond constant tables.
 */
#include <string.h>

#include "engine/smtp_cmd.h"
#include "engine/smtp_cmd_int.h"

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

/* "[" ... "]" at p. Returns 0 and *next after "]" or an error code. */
int
smtp_parse_literal(const char *p, const char *end, const char **next, uint32_t *flags)
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
 * letters (U-labels, RFC 6531), and so does "_", which RFC 5321 lacks but
 * DNS names carry and MTAs take (Postfix's valid_hostname). Stops at the
 * first octet that cannot continue it. Returns 0 or an error, *next where it stopped. */
int
smtp_parse_domain(const char *p, const char *end, const char **next, uint32_t *flags)
{
    const char *start = p;

    for (;;) {
        const char *label = p;

        if (p == end || !((cc(p) & C_LETDIG) || is8(p) || *p == '_')) {
            *next = p;
            return SMTP_CMD_E_DOMAIN_SYNTAX;
        }
        for (; p < end && ((cc(p) & C_LDH) || is8(p) || *p == '_'); p++) {
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
        /* A Dot-string, or what MTAs take beside it (Postfix with
         * strict_rfc821_envelopes = no): dots leading, trailing or doubled,
         * as in the user.@docomo.ne.jp that Japanese carriers issued by
         * the million. Such a local part goes out quoted ("user."),
         * fmt_path(), and counts with its quotes. */
        bool text = false;
        char prev = '.';

        for (; p < end && ((cc(p) & C_ATEXT) || is8(p) || *p == '.'); p++) {
            if (*p == '.' && prev == '.')
                m->flags |= SMTP_PATH_DOTS;
            else if (*p != '.')
                text = true;
            if (is8(p))
                m->flags |= SMTP_PATH_UTF8;
            prev = *p;
        }
        if (!text) {
            *next = local;
            return SMTP_CMD_E_LOCAL_SYNTAX;
        }
        if (prev == '.')
            m->flags |= SMTP_PATH_DOTS;
    }
    m->local_end = p;
    if (p - local + (m->flags & SMTP_PATH_DOTS ? 2 : 0) > SMTP_LOCAL_MAX) {
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
        rc = smtp_parse_literal(p, end, next, &m->flags);
    else
        rc = smtp_parse_domain(p, end, next, &m->flags);
    m->dom_end = *next;
    /* One dot after the domain, where the mailbox ends (example.com.>):
     * the root, the same domain, as Postfix's trivial-rewrite takes it
     * and backends moved from Postfix send it. It is left out of the
     * domain here, once, so that everything after the parser (relay
     * rules, IDN, suppression, the spool, routes, the RCPT sent) sees
     * example.com. A dot alone, two dots, a dot after a literal stay
     * refused. */
    if (rc == SMTP_CMD_E_DOMAIN_SYNTAX && *next > p && (*next)[-1] == '.' &&
        (*next == end || **next == '>' || **next == ' ')) {
        const char *dot = *next - 1, *q;
        rc = smtp_parse_domain(p, dot, &q, &m->flags);
        if (rc < 0) {
            *next = q;
            return rc;
        }
        m->dom_end = dot;
        m->flags |= SMTP_PATH_ROOT_DOT;
    }
    if (rc == 0 && (m->flags & SMTP_PATH_UTF8) &&
        !utf8_valid((const unsigned char *)local, (size_t)(m->dom_end - local))) {
        *next = local;
        rc = SMTP_CMD_E_UTF8_INVALID;
    }
    return rc;
}

/* An unquoted local part that is no Dot-string, in the quotes it is sent
 * in (fmt_path) written to buf; len otherwise (*out left as it is). */
static size_t
local_quote(const char *local, size_t len, char *buf, const char **out)
{
    bool dots = len > 0 && (local[0] == '.' || local[len - 1] == '.');

    if (len == 0 || len + 2 > SMTP_LOCAL_MAX)
        return len;
    for (size_t i = 0; i < len; i++) {
        const char *c = local + i;
        if (!((cc(c) & C_ATEXT) || is8(c) || *c == '.'))
            return len;
        if (i > 0 && *c == '.' && c[-1] == '.')
            dots = true;
    }
    if (!dots)
        return len;
    buf[0] = '"';
    memcpy(buf + 1, local, len);
    buf[len + 1] = '"';
    *out = buf;
    return len + 2;
}

size_t
smtp_local_canon(const char *local, size_t len, char *buf, const char **out)
{
    *out = local;
    if (len > 0 && local[0] != '"')
        return local_quote(local, len, buf, out);
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

/* smtp_mailbox_check(), with the parsed mailbox in *m. */
int
smtp_mbox_check(const char *addr, size_t len, bool utf8, struct mbox *m)
{
    const char *end = addr + len, *next;
    int rc;

    m->flags = 0;
    if (len == 0)
        return 0;
    rc = parse_mailbox(addr, end, false, m, &next);
    if (rc < 0)
        return rc;
    if (next != end)
        return next < m->dom ? SMTP_CMD_E_LOCAL_SYNTAX : SMTP_CMD_E_DOMAIN_SYNTAX;
    if (m->flags & SMTP_PATH_ROOT_DOT)
        return SMTP_CMD_E_DOMAIN_SYNTAX; /* a mailbox as stored or sent has none */
    if ((m->flags & SMTP_PATH_UTF8) && !utf8)
        return SMTP_CMD_E_UTF8_NOT_ALLOWED;
    if (len + 2 + (m->flags & SMTP_PATH_DOTS ? 2 : 0) > SMTP_PATH_MAX)
        return SMTP_CMD_E_PATH_TOO_LONG;
    return 0;
}

int
smtp_mailbox_check(const char *addr, size_t len, bool utf8)
{
    struct mbox m;

    return smtp_mbox_check(addr, len, utf8, &m);
}

/* A stray octet at q, right after the mailbox m: inside its domain or
 * local part, theirs is the error. */
static int
mailbox_stray(const char *q, const struct mbox *m)
{
    return q >= m->dom && m->dom != m->dom_end ? SMTP_CMD_E_DOMAIN_SYNTAX
                                               : SMTP_CMD_E_LOCAL_SYNTAX;
}

/* path's spans: the mailbox m, parsed from p (to its domain's end: a
 * trailing dot left out). */
static void
path_fill(struct smtp_path *path, const char *p, const struct mbox *m)
{
    path->flags |= m->flags;
    path->local = span(p, m->local_end);
    path->domain = span(m->dom, m->dom_end);
    path->mailbox = span(p, m->dom_end);
}

/*
 * Path at p (which is "<"): "<>" (when allowed), or "<" [A-d-l ":"] Mailbox
 * ">". On return *next is after ">" or at the fault.
 */
int
smtp_parse_path(const char *p, const char *end, bool rcpt, struct smtp_path *path,
                const char **next)
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
                rc = smtp_parse_literal(p, end, &q, &rflags);
            else
                rc = smtp_parse_domain(p, end, &q, &rflags);
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
    if (q + 1 - open + (m.flags & SMTP_PATH_DOTS ? 2 : 0) > SMTP_PATH_MAX) {
        *next = open;
        return SMTP_CMD_E_PATH_TOO_LONG;
    }
    path_fill(path, p, &m);
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
int
smtp_parse_bare_path(const char *p, const char *end, bool rcpt, struct smtp_path *path,
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
    /* counted with the brackets it lacks (and the quotes it will get) */
    if (q + 2 - p + (m.flags & SMTP_PATH_DOTS ? 2 : 0) > SMTP_PATH_MAX) {
        *next = p;
        return SMTP_CMD_E_PATH_TOO_LONG;
    }
    path_fill(path, p, &m);
    return 0;
}

/* ---- ESMTP parameters ---- */

bool
smtp_xtext_valid(const char *p, const char *end)
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
int
smtp_orcpt_check(const char *p, const char *end, bool utf8, struct smtp_params *params)
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
        return smtp_xtext_valid(semi + 1, end) ? 0 : -1;
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

bool
smtp_parse_u64(const char *p, const char *end, size_t max_digits, bool saturate, uint64_t *out)
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
        return smtp_parse_u64(v, end, 20, true, &params->size) ? 0 : -1;
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
        return n <= SMTP_ENVID_MAX && smtp_xtext_valid(v, end) ? 0 : -1;
    case SMTP_PARAM_AUTH:
        params->auth = span(v, end);
        return n <= 500 && smtp_xtext_valid(v, end) ? 0 : -1;
    case SMTP_PARAM_NOTIFY:
        return parse_notify(v, end, &params->notify);
    case SMTP_PARAM_ORCPT:
        return smtp_orcpt_check(v, end, utf8, params);
    default:
        return -1;
    }
}

/* [SP esmtp-param *(SP esmtp-param)] from p to end. none: no parameter is
 * offered (SMTP_CMD_F_NO_PARAMS): the keywords are noted, the values not
 * read, and any parameter is SMTP_CMD_E_PARAM_UNOFFERED. */
int
smtp_parse_params(const char *line, const char *p, const char *end, bool rcpt, bool utf8, bool none,
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
