/*
 * dsn: builds the RFC 3464 report (see dsn.h), and the struct dsn_msg
 * that carries it into the spool with the outcomes that cause it. The parts are built first,
 * each in its own buffer, so that the boundary can be chosen knowing
 * everything it must not collide with; then the message is assembled.
 * Every string from outside goes through clean() before it reaches a
 * header or a report field, and every such line through fold(): those
 * two are what keep hostile reply text from adding headers or MIME parts.
 *
 * Threading: pure functions (no I/O, no globals).
 */
#include "engine/dsn.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#include "common/json.h"
#include "engine/smtp_cmd.h"
#include "queue/queue.h"

#define LINE_SOFT   78  /* fold fields here when a space allows */
#define LINE_HARD   990 /* cut here when none does: under RFC 5322's 998 */
#define HUMAN_WIDTH 76
#define ADDR_MAX    (QUEUE_MAX_ADDR + 2) /* an address with the quotes addr_form() adds */

/* A growable text; allocation failure is sticky. */
struct out {
    char *p; /* owned */
    size_t len, cap;
    bool oom;
};

static void
out_put(struct out *o, const char *s, size_t n)
{
    if (o->oom || n == 0)
        return;
    if (n > SIZE_MAX / 4 || o->len > SIZE_MAX / 4) {
        o->oom = true; /* cannot be; said to the compiler, whose -O3 feared a wrap */
        return;
    }
    if (o->len + n + 1 > o->cap) {
        size_t cap = o->cap ? o->cap : 1024;
        while (cap < o->len + n + 1)
            cap *= 2;
        char *p = realloc(o->p, cap);
        if (p == NULL) {
            o->oom = true;
            return;
        }
        o->p = p;
        o->cap = cap;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
    o->p[o->len] = '\0';
}

static void
out_str(struct out *o, const char *s)
{
    out_put(o, s, strlen(s));
}

static void out_fmt(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
out_fmt(struct out *o, const char *fmt, ...)
{
    char b[512]; /* only ever our own short text: numbers, dates, keywords */
    va_list ap;

    va_start(ap, fmt);
    int n = vsnprintf(b, sizeof(b), fmt, ap);
    va_end(ap);
    if (n > 0)
        out_put(o, b, (size_t)n < sizeof(b) ? (size_t)n : sizeof(b) - 1);
}

static void
out_free(struct out *o)
{
    free(o->p);
    o->p = NULL;
    o->len = o->cap = 0;
}

/* Quoted-printable (RFC 2045 6.7) of s[0..n), CRLF line breaks kept as
 * hard breaks, soft breaks before 76 columns: 7-bit text for a part of
 * a DSN that quotes UTF-8. */
static void
out_qp(struct out *o, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *u = (const unsigned char *)s;
    size_t col = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned c = u[i];
        if (c == '\r' && i + 1 < n && u[i + 1] == '\n') {
            out_put(o, "\r\n", 2);
            col = 0;
            i++;
            continue;
        }
        bool eol = i + 1 == n || (u[i + 1] == '\r' && i + 2 < n && u[i + 2] == '\n');
        bool lit = (c >= 33 && c <= 126 && c != '=') || ((c == ' ' || c == '\t') && !eol);
        size_t w = lit ? 1 : 3;
        if (col + w > 75) {
            out_put(o, "=\r\n", 3);
            col = 0;
        }
        if (lit) {
            char ch = (char)c;
            out_put(o, &ch, 1);
        } else {
            char e[3] = {'=', hex[c >> 4], hex[c & 15]};
            out_put(o, e, 3);
        }
        col += w;
    }
}

/* Base64 (RFC 2045 6.8) of s[0..n) in lines of 76: the returned message
 * of a DSN that quotes UTF-8, as message/global may be (RFC 6532 3.7). */
static void
out_base64(struct out *o, const char *s, size_t n)
{
    static const char b64[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n; i += 57) {
        size_t k = n - i < 57 ? n - i : 57;
        char line[80];
        size_t m = 0;
        for (size_t j = 0; j < k; j += 3) {
            unsigned v = (unsigned)u[i + j] << 16;
            if (j + 1 < k)
                v |= (unsigned)u[i + j + 1] << 8;
            if (j + 2 < k)
                v |= u[i + j + 2];
            line[m++] = b64[v >> 18];
            line[m++] = b64[(v >> 12) & 63];
            line[m++] = j + 1 < k ? b64[(v >> 6) & 63] : '=';
            line[m++] = j + 2 < k ? b64[v & 63] : '=';
        }
        line[m++] = '\r';
        line[m++] = '\n';
        out_put(o, line, m);
    }
}

/*
 * Append s[0..n) as one line of safe text: CR, LF, TAB and spaces become
 * one space between words and none at the ends (spaces kept as they are
 * when keep_sp: an address's, "john  doe"@ is not "john doe"@), other
 * controls '?', octets above 127 '?' unless utf8 and valid UTF-8. At
 * most max octets (whole characters), "..." marking a cut.
 */
static void
clean_sp(struct out *o, const char *s, size_t n, bool utf8, size_t max, bool keep_sp)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t start = o->len;
    bool space = false;

    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        if ((c == ' ' && !keep_sp) || c == '\t' || c == '\r' || c == '\n') {
            space = o->len > start;
            i++;
            continue;
        }
        char q = '?';
        const char *piece = &q;
        size_t len = 1, used = 1;
        if (c >= 0x21 && c <= 0x7e) {
            piece = s + i;
        } else if (c == ' ') {
            piece = " "; /* keep_sp */
        } else if (c >= 0x80 && utf8 && (len = json_utf8_len(u + i, n - i)) > 0) {
            piece = s + i;
            used = len;
        } else {
            len = 1;
        }
        if (o->len - start + space + len > max) {
            out_str(o, space ? " ..." : "...");
            return;
        }
        if (space)
            out_put(o, " ", 1);
        space = false;
        out_put(o, piece, len);
        i += used;
    }
}

static void
clean(struct out *o, const char *s, size_t n, bool utf8, size_t max)
{
    clean_sp(o, s, n, utf8, max, false);
}

static void
clean_str(struct out *o, const char *s, bool utf8, size_t max)
{
    if (s != NULL)
        clean(o, s, strlen(s), utf8, max);
}

static int
hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* RFC 3461 4: "+XX" is the octet XX. A '+' not followed by two hex
 * digits is kept as is: the text came from a client, and a report that
 * shows it beats one that drops it. */
static void
xtext_decode(struct out *o, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int h, l;
        if (s[i] == '+' && i + 2 < n && (h = hexval(s[i + 1])) >= 0 &&
            (l = hexval(s[i + 2])) >= 0) {
            char c = (char)(h * 16 + l);
            out_put(o, &c, 1);
            i += 2;
        } else {
            out_put(o, s + i, 1);
        }
    }
}

/* Write one logical line (already clean: no controls; single spaces but
 * in an address) folded at spaces near LINE_SOFT, cut at LINE_HARD where
 * there is none. No line is spaces only (RFC 5322 3.2.2): a run of an
 * address's spaces is folded after its first non-space. */
static void
fold(struct out *o, const char *s, size_t n)
{
    while (n > LINE_SOFT) {
        size_t cut = 0, lead = 0;
        while (lead < n && s[lead] == ' ')
            lead++;
        for (size_t i = LINE_SOFT; i >= 10 && i > lead; i--) {
            if (s[i] == ' ') {
                cut = i;
                break;
            }
        }
        for (size_t i = LINE_SOFT + 1; cut == 0 && i < n && i <= LINE_HARD; i++) {
            if (s[i] == ' ' && i > lead)
                cut = i;
        }
        if (cut == 0) {
            if (n <= LINE_HARD)
                break;
            cut = LINE_HARD;
            while (cut > 1 && ((unsigned char)s[cut] & 0xc0) == 0x80)
                cut--;
            out_put(o, s, cut);
            out_put(o, "\r\n ", 3); /* a space the unfolded value did not have */
        } else {
            out_put(o, s, cut);
            out_put(o, "\r\n", 2); /* the space at s[cut] starts the next line */
        }
        s += cut;
        n -= cut;
    }
    out_put(o, s, n);
    out_put(o, "\r\n", 2);
}

/* A field's line begun: "Name: <prefix>". */
static void
field_begin(struct out *line, const char *name, const char *prefix)
{
    out_str(line, name);
    out_put(line, ": ", 2);
    out_str(line, prefix);
}

/* The field's line ended by suffix, folded into o (o marked when out of
 * memory); line freed. */
static void
field_end(struct out *o, struct out *line, const char *suffix)
{
    out_str(line, suffix);
    if (line->oom)
        o->oom = true;
    else
        fold(o, line->p, line->len);
    out_free(line);
}

/* "Name: <prefix><raw made clean><suffix>", folded. */
static void
put_field_sfx(struct out *o, const char *name, const char *prefix, const char *raw, size_t rawlen,
              const char *suffix, bool utf8, size_t max)
{
    struct out line = {0};

    field_begin(&line, name, prefix);
    clean(&line, raw, rawlen, utf8, max);
    field_end(o, &line, suffix);
}

static void
put_field(struct out *o, const char *name, const char *prefix, const char *raw, size_t rawlen,
          bool utf8, size_t max)
{
    put_field_sfx(o, name, prefix, raw, rawlen, "", utf8, max);
}

/*
 * addr as RFC 5322 (3.4.1) and so RFC 3464 (rfc822 address type) want
 * it: a local part that is no dot-atom yet taken at MAIL and RCPT (a dot
 * leading, trailing or doubled: user.@docomo.ne.jp, as Postfix takes it)
 * in the quotes it is relayed in ("user."@docomo.ne.jp,
 * smtp_local_canon); any other as it is. Appended to a, not yet clean.
 */
static void
addr_form(struct out *a, const char *addr)
{
    const char *at = strrchr(addr, '@');
    if (at == NULL || at == addr || addr[0] == '"') {
        out_str(a, addr);
        return;
    }
    char buf[SMTP_LOCAL_MAX];
    const char *local;
    size_t n = smtp_local_canon(addr, (size_t)(at - addr), buf, &local);
    out_put(a, local, n);
    out_str(a, at);
}

/* addr in addr_form(), made clean (its spaces kept), into o. */
static void
clean_addr(struct out *o, const char *addr, bool utf8)
{
    struct out a = {0};

    addr_form(&a, addr);
    if (a.oom)
        o->oom = true;
    else
        clean_sp(o, a.p, a.len, utf8, ADDR_MAX, true);
    out_free(&a);
}

/* "Name: <prefix><addr: clean_addr()><suffix>", folded. */
static void
put_addr(struct out *o, const char *name, const char *prefix, const char *addr,
         const char *suffix, bool utf8)
{
    struct out line = {0};

    field_begin(&line, name, prefix);
    clean_addr(&line, addr, utf8);
    field_end(o, &line, suffix);
}

/* Our own field whose value is already safe (a keyword, a date). */
static void
put_safe(struct out *o, const char *name, const char *value)
{
    put_field(o, name, "", value, strlen(value), false, SIZE_MAX);
}

/* Clean text as indented lines of a plain-text body. */
static void
put_wrapped(struct out *o, const char *indent, const char *s, size_t n)
{
    size_t width = HUMAN_WIDTH - strlen(indent);

    while (n > 0) {
        size_t take = n, skip = 0;
        if (n > width) {
            take = 0;
            for (size_t i = width; i > 0; i--) {
                if (s[i] == ' ') {
                    take = i;
                    break;
                }
            }
            for (size_t i = width + 1; take == 0 && i < n && i <= LINE_HARD; i++) {
                if (s[i] == ' ')
                    take = i;
            }
            if (take == 0) {
                take = n < LINE_HARD ? n : LINE_HARD;
                while (take < n && take > 1 && ((unsigned char)s[take] & 0xc0) == 0x80)
                    take--;
            } else {
                skip = 1;
            }
        }
        out_str(o, indent);
        out_put(o, s, take);
        out_put(o, "\r\n", 2);
        s += take + skip;
        n -= take + skip;
    }
}

/* RFC 5322 3.3 date in UTC, without locale: "Tue, 03 Mar 2026 12:00:00 +0000". */
static void
format_date(char *b, size_t cap, uint64_t ms)
{
    static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t t = (time_t)(ms / 1000);
    struct tm tm;

    if (gmtime_r(&t, &tm) == NULL || tm.tm_wday < 0 || tm.tm_wday > 6 || tm.tm_mon < 0 ||
        tm.tm_mon > 11) {
        snprintf(b, cap, "Thu, 01 Jan 1970 00:00:00 +0000");
        return;
    }
    snprintf(b, cap, "%s, %02d %s %04d %02d:%02d:%02d +0000", days[tm.tm_wday], tm.tm_mday,
             months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

static void
put_date(struct out *o, const char *name, uint64_t ms)
{
    char b[64];

    format_date(b, sizeof(b), ms);
    put_safe(o, name, b);
}

/* RFC 3463: class "." subject "." detail, 1-3 digits each. */
static bool
status_valid(const char *s)
{
    if (s == NULL || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.')
        return false;
    s += 2;
    for (int part = 0; part < 2; part++) {
        int n = 0;
        while (*s >= '0' && *s <= '9' && n < 4) {
            s++;
            n++;
        }
        if (n == 0 || n > 3)
            return false;
        if (part == 0 && *s++ != '.')
            return false;
    }
    return *s == '\0';
}

static bool
msgid_valid(const char *s)
{
    /* it goes on its header line as is (a Message-ID is not folded) */
    if (s == NULL || *s == '\0' || strlen(s) > DSN_MSGID_MAX)
        return false;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x21 || c > 0x7e || c == '<' || c == '>')
            return false;
    }
    return true;
}

static bool
empty(const char *s)
{
    return s == NULL || *s == '\0';
}

static bool
has_8bit(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)s[i] >= 0x80)
            return true;
    }
    return false;
}

/* Octets of the header section: up to the first empty line, that line's
 * own CRLF excluded; all of s when there is none. */
static size_t
header_len(const char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        if (s[i] == '\n' || (s[i] == '\r' && i + 1 < n && s[i + 1] == '\n'))
            return i;
        const char *nl = memchr(s + i, '\n', n - i);
        if (nl == NULL)
            return n;
        i = (size_t)(nl - s) + 1;
    }
    return n;
}

/* Whether s can go back unchanged: CRLF only, no NUL, lines <= 998. */
static bool
text_clean(const char *s, size_t n)
{
    size_t col = 0;

    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '\r') {
            if (i + 1 >= n || s[i + 1] != '\n')
                return false;
            i++;
            col = 0;
        } else if (c == '\n' || c == '\0') {
            return false;
        } else if (++col > 998) {
            return false;
        }
    }
    return true;
}

/* Copy lines made safe: any CR, LF or CRLF ends a line with CRLF, NUL is
 * '?', a line over LINE_HARD is folded (CRLF SP). Ends with CRLF. Octet
 * by octet: it only runs for the headers of a message that bounced. */
static void
copy_lines(struct out *o, const char *s, size_t n)
{
    size_t col = 0;

    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '\r' || c == '\n') {
            if (c == '\r' && i + 1 < n && s[i + 1] == '\n')
                i++;
            out_put(o, "\r\n", 2);
            col = 0;
            continue;
        }
        if (col >= LINE_HARD) {
            out_put(o, "\r\n ", 3);
            col = 1;
        }
        out_put(o, c == '\0' ? "?" : &c, 1);
        col++;
    }
    if (col > 0)
        out_put(o, "\r\n", 2);
}

/* FNV-1a, only to vary boundaries between messages. */
static uint32_t
fnv1a(const char *s, uint32_t h)
{
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 16777619u;
    }
    return h;
}

/*
 * "=_sluice_<seed>_<hash>[.<attempt>]": at most 70 octets of bchars (RFC
 * 2046 5.1.1). Candidates differ by attempt, and content of n octets
 * holds fewer than n distinct ones, so the search ends.
 */
static void
make_boundary(char *b, size_t cap, const char *seed, unsigned attempt)
{
    char s[33];
    size_t n = 0;

    for (const char *p = seed ? seed : ""; *p && n < sizeof(s) - 1; p++) {
        char c = *p;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            c == '.' || c == '-' || c == '_')
            s[n++] = c;
    }
    s[n] = '\0';
    uint32_t h = fnv1a(seed ? seed : "", 2166136261u) ^ (attempt * 2654435761u);
    if (attempt == 0)
        snprintf(b, cap, "=_sluice_%s_%08x", s, (unsigned)h);
    else
        snprintf(b, cap, "=_sluice_%s_%08x.%u", s, (unsigned)h, attempt);
}

enum attach_why {
    WHY_NONE,      /* no original */
    WHY_FULL,      /* the whole message is attached */
    WHY_HDRS,      /* RET=HDRS or no RET */
    WHY_NO_FAIL,   /* a delay warning or a success report: headers only (RFC 3461 4.3) */
    WHY_TOO_BIG,   /* over full_max */
    WHY_NOT_CLEAN, /* could not go back unchanged */
    WHY_8BIT,      /* 8-bit, not SMTPUTF8: the whole would make the DSN 8-bit */
};

/* What the report as a whole is: failed when any recipient failed, else
 * delayed when any is, else a success report. */
static enum dsn_action
report_kind(const struct dsn_input *in)
{
    enum dsn_action k = DSN_ACTION_RELAYED;
    for (unsigned i = 0; i < in->nrcpt; i++) {
        if (in->rcpt[i].action == DSN_ACTION_FAILED)
            return DSN_ACTION_FAILED;
        if (in->rcpt[i].action == DSN_ACTION_DELAYED)
            k = DSN_ACTION_DELAYED;
    }
    return k;
}

static void
human_part(struct out *o, const struct dsn_input *in, enum dsn_action kind, enum attach_why why,
           bool hdrs_cut)
{
    bool u8 = in->smtputf8;
    struct out t = {0};

    clean_str(&t, in->reporting_mta, u8, 255);
    out_str(o, "This is the mail system at host ");
    out_put(o, t.p, t.len);
    out_str(o, ".\r\n\r\n");
    out_free(&t);
    if (kind == DSN_ACTION_FAILED) {
        out_str(o, "Your message could not be delivered to one or more recipients.\r\n"
                   "The details are below.\r\n");
    } else if (kind == DSN_ACTION_DELAYED) {
        out_str(o, "Your message has not been delivered yet to one or more recipients.\r\n"
                   "Delivery is still being retried: you do not need to send it again.\r\n"
                   "You will be told if it finally fails.\r\n");
    } else {
        out_str(o, "Your message was delivered to the mail servers of the recipients below,\r\n"
                   "as you asked to be told. This is the last notification you will get\r\n"
                   "for them.\r\n");
    }
    if (why != WHY_NONE || !empty(in->queue_id))
        out_str(o, "\r\n");
    switch (why) {
    case WHY_NONE:
        break;
    case WHY_FULL:
        out_str(o, "The original message is attached.\r\n");
        break;
    case WHY_HDRS:
    case WHY_NO_FAIL:
        out_str(o, "The headers of the original message are attached.\r\n");
        break;
    case WHY_TOO_BIG:
        out_fmt(o,
                "The original message is larger than %zu octets, so only its headers\r\n"
                "are attached.\r\n",
                in->full_max);
        break;
    case WHY_NOT_CLEAN:
        out_str(o, "The original message could not be attached unchanged, so only its\r\n"
                   "headers are attached.\r\n");
        break;
    case WHY_8BIT:
        out_str(o, "The original message has 8-bit content, so only its headers are\r\n"
                   "attached: this report must reach mail servers that take 7-bit only.\r\n");
        break;
    }
    if (hdrs_cut)
        out_fmt(o, "The headers were cut after %u octets.\r\n", DSN_HEADERS_MAX);
    if (!empty(in->queue_id)) {
        clean_str(&t, in->queue_id, false, 128);
        out_str(o, "Queue ID: ");
        out_put(o, t.p, t.len);
        out_str(o, "\r\n");
        out_free(&t);
    }

    for (unsigned i = 0; i < in->nrcpt; i++) {
        const struct dsn_rcpt *r = &in->rcpt[i];
        char date[64];

        out_str(o, "\r\n");
        out_str(&t, "<");
        clean_addr(&t, r->addr, u8);
        out_str(&t, r->action == DSN_ACTION_DELAYED   ? ">: delivery delayed"
                    : r->action == DSN_ACTION_RELAYED ? ">: delivered to a server that sends "
                                                        "no notifications (relayed)"
                                                      : ">: delivery failed");
        if (!empty(r->class_str)) {
            out_str(&t, " (");
            clean_str(&t, r->class_str, false, 64);
            out_str(&t, ")");
        }
        out_str(&t, ", status ");
        out_str(&t, r->status);
        put_wrapped(o, "", t.p ? t.p : "", t.len);
        t.len = 0;

        if (!empty(r->text) || r->code != 0) {
            if (r->code != 0) {
                if (!empty(r->remote_mta))
                    clean_str(&t, r->remote_mta, u8, 255);
                else
                    out_str(&t, "The remote server");
                out_fmt(&t, " said: %u ", r->code);
            } else {
                out_str(&t, "Reason: ");
            }
            clean_str(&t, r->text, u8, DSN_TEXT_MAX);
            put_wrapped(o, "    ", t.p, t.len);
            t.len = 0;
        }
        if (r->action == DSN_ACTION_DELAYED && r->retry_until_ms != 0) {
            format_date(date, sizeof(date), r->retry_until_ms);
            out_str(&t, "Still trying until ");
            out_str(&t, date);
            out_str(&t, ".");
            put_wrapped(o, "    ", t.p, t.len);
            t.len = 0;
        }
    }
    if (t.oom)
        o->oom = true;
    out_free(&t);
}

const char *
dsn_action_str(enum dsn_action a)
{
    switch (a) {
    case DSN_ACTION_DELAYED:
        return "delayed";
    case DSN_ACTION_RELAYED:
        return "relayed";
    case DSN_ACTION_FAILED:
        break;
    }
    return "failed";
}

/* "rfc822;a+2Bb@c" -> "rfc822;a+b@c" made safe; nothing when malformed. */
static void
put_orcpt(struct out *o, const char *orcpt, bool u8)
{
    const char *semi = strchr(orcpt, ';');
    struct out dec = {0}, v = {0};

    if (semi == NULL || semi == orcpt)
        return;
    clean(&v, orcpt, (size_t)(semi - orcpt), false, 64);
    size_t tlen = v.len;
    out_put(&v, ";", 1);
    xtext_decode(&dec, semi + 1, strlen(semi + 1));
    if (dec.len > 0)
        clean(&v, dec.p, dec.len, u8, QUEUE_MAX_PARAM);
    if (dec.oom || v.oom)
        o->oom = true;
    else if (tlen > 0 && v.len > tlen + 1)
        put_field(o, "Original-Recipient", "", v.p, v.len, u8, SIZE_MAX);
    out_free(&dec);
    out_free(&v);
}

static void
status_part(struct out *o, const struct dsn_input *in)
{
    bool u8 = in->smtputf8;

    put_field(o, "Reporting-MTA", "dns; ", in->reporting_mta, strlen(in->reporting_mta), u8, 255);
    if (!empty(in->queue_id))
        put_field(o, "X-Sluice-Queue-ID", "", in->queue_id, strlen(in->queue_id), false, 128);
    if (!empty(in->envid)) {
        struct out dec = {0};
        xtext_decode(&dec, in->envid, strlen(in->envid));
        if (dec.oom)
            o->oom = true;
        else if (dec.len > 0)
            put_field(o, "Original-Envelope-Id", "", dec.p, dec.len, false, QUEUE_MAX_PARAM);
        out_free(&dec);
    }
    if (in->arrival_ms != 0)
        put_date(o, "Arrival-Date", in->arrival_ms);

    for (unsigned i = 0; i < in->nrcpt; i++) {
        const struct dsn_rcpt *r = &in->rcpt[i];

        out_str(o, "\r\n");
        if (!empty(r->orcpt))
            put_orcpt(o, r->orcpt, u8);
        /* RFC 6533 3: an address that is not ASCII has the type utf-8 */
        bool ascii = !has_8bit(r->addr, strlen(r->addr));
        put_addr(o, "Final-Recipient", u8 && !ascii ? "utf-8; " : "rfc822; ", r->addr, "", u8);
        put_safe(o, "Action", dsn_action_str(r->action));
        put_safe(o, "Status", r->status);
        if (!empty(r->remote_mta))
            put_field(o, "Remote-MTA", "dns; ", r->remote_mta, strlen(r->remote_mta), u8, 255);
        if (r->code != 0) {
            char pfx[32];
            snprintf(pfx, sizeof(pfx), "smtp; %u ", r->code);
            put_field(o, "Diagnostic-Code", pfx, r->text ? r->text : "",
                      r->text ? strlen(r->text) : 0, u8, DSN_TEXT_MAX);
        } else if (!empty(r->text)) {
            put_field(o, "Diagnostic-Code", "X-Sluice; ", r->text, strlen(r->text), u8,
                      DSN_TEXT_MAX);
        }
        if (r->last_attempt_ms != 0)
            put_date(o, "Last-Attempt-Date", r->last_attempt_ms);
        if (r->action == DSN_ACTION_DELAYED && r->retry_until_ms != 0)
            put_date(o, "Will-Retry-Until", r->retry_until_ms);
        if (!empty(r->class_str))
            put_field(o, "X-Sluice-Class", "", r->class_str, strlen(r->class_str), false, 64);
    }
}

/* Why dsn_build() refuses in (-EINVAL), or NULL. */
static const char *
input_why(const struct dsn_input *in)
{
    if (in == NULL)
        return "no input";
    if (empty(in->reporting_mta))
        return "no Reporting-MTA (the server hostname)";
    if (empty(in->from_addr))
        return "no From address";
    if (empty(in->to_addr))
        return "no sender to send it to";
    if (!msgid_valid(in->message_id))
        return "Message-ID malformed: empty, over 900 octets, or with a space, a control, "
               "an octet over 127, < or > (it ends with the server hostname)";
    if (in->rcpt == NULL || in->nrcpt == 0)
        return "no recipients to report";
    if (in->orig == NULL && in->orig_len != 0)
        return "an original length without the original";
    for (unsigned i = 0; i < in->nrcpt; i++) {
        if (empty(in->rcpt[i].addr))
            return "a recipient without an address";
        if (!status_valid(in->rcpt[i].status))
            return "a recipient's status is no RFC 3463 code";
    }
    return NULL;
}

int
dsn_build(const struct dsn_input *in, char **out, size_t *out_len)
{
    if (out == NULL || out_len == NULL)
        return -EINVAL;
    *out = NULL;
    *out_len = 0;
    if (input_why(in) != NULL)
        return -EINVAL;

    enum dsn_action kind = report_kind(in);

    /* part 3 first: what the human part says depends on it */
    struct out human = {0}, status = {0}, orig = {0}, msg = {0};
    enum attach_why why = WHY_NONE;
    bool hdrs_cut = false;
    if (in->orig != NULL && in->orig_len > 0) {
        if (kind != DSN_ACTION_FAILED)
            why = WHY_NO_FAIL;
        else if (!in->ret_full)
            why = WHY_HDRS;
        else if (in->orig_size > in->orig_len ||
                 (in->full_max != 0 && in->orig_len > in->full_max))
            why = WHY_TOO_BIG; /* orig its start only: read so for being over full_max */
        else if (!text_clean(in->orig, in->orig_len))
            why = WHY_NOT_CLEAN;
        else if (!in->smtputf8 && has_8bit(in->orig, in->orig_len))
            /* message/rfc822 may not be encoded (RFC 2046 5.2.1): 7-bit
             * whole only by rewriting its MIME parts, so headers */
            why = WHY_8BIT;
        else
            why = WHY_FULL;
        if (why == WHY_FULL) {
            out_put(&orig, in->orig, in->orig_len);
            if (in->orig_len < 2 || memcmp(in->orig + in->orig_len - 2, "\r\n", 2) != 0)
                out_put(&orig, "\r\n", 2);
        } else {
            size_t n = header_len(in->orig, in->orig_len);
            if (n > DSN_HEADERS_MAX) {
                const char *nl = memrchr(in->orig, '\n', DSN_HEADERS_MAX);
                n = nl ? (size_t)(nl - in->orig) + 1 : DSN_HEADERS_MAX;
                hdrs_cut = true;
            }
            copy_lines(&orig, in->orig, n);
        }
    }
    human_part(&human, in, kind, why, hdrs_cut);
    status_part(&status, in);

    int rc = -ENOMEM;
    if (human.oom || status.oom || orig.oom)
        goto done;

    char b[80];
    for (unsigned attempt = 0;; attempt++) {
        make_boundary(b, sizeof(b), in->boundary_seed, attempt);
        size_t bl = strlen(b);
        if (!memmem(human.p, human.len, b, bl) && !memmem(status.p, status.len, b, bl) &&
            (orig.len == 0 || !memmem(orig.p, orig.len, b, bl)))
            break;
    }

    bool u8 = in->smtputf8;
    bool human8 = human.len && has_8bit(human.p, human.len);
    bool status8 = status.len && has_8bit(status.p, status.len);
    bool orig8 = orig.len && has_8bit(orig.p, orig.len);
    /* Every part that holds 8-bit octets is encoded, so that the DSN is
     * 7-bit and reaches a sender whose MX has no SMTPUTF8 or no 8BITMIME
     * (it bounced there, and a DSN's bounce is dropped: the sender heard
     * nothing). A DSN of an SMTPUTF8 message quotes UTF-8 (addresses,
     * replies, the original): RFC 6532 3.5 and 3.7 and RFC 6533 allow
     * encoding the global types, base64 for a whole message/global. Any
     * other quotes 8-bit octets only in the original's headers (an 8-bit
     * whole goes back as its headers, WHY_8BIT): text/rfc822-headers,
     * quoted-printable (RFC 6522 4 allows it for headers that need it). */
    char date[64], ct[160];

    put_addr(&msg, "From", "Mail Delivery System <", in->from_addr, ">", u8);
    put_addr(&msg, "To", "<", in->to_addr, ">", u8);
    put_safe(&msg, "Subject",
             kind == DSN_ACTION_FAILED    ? "Undelivered Mail Returned to Sender"
             : kind == DSN_ACTION_DELAYED ? "Delayed Mail (still being retried)"
                                          : "Successful Mail Delivery Report");
    format_date(date, sizeof(date), in->now_ms);
    put_safe(&msg, "Date", date);
    out_str(&msg, "Message-ID: <");
    out_str(&msg, in->message_id);
    out_str(&msg, ">\r\n");
    put_safe(&msg, "Auto-Submitted", "auto-replied");
    put_safe(&msg, "MIME-Version", "1.0");
    snprintf(ct, sizeof(ct), "multipart/report; report-type=delivery-status; boundary=\"%s\"", b);
    put_safe(&msg, "Content-Type", ct);
    out_str(&msg, "\r\nThis is a MIME-encapsulated message.\r\n");

    out_fmt(&msg, "\r\n--%s\r\n", b);
    put_safe(&msg, "Content-Description", "Notification");
    put_safe(&msg, "Content-Type",
             u8 ? "text/plain; charset=utf-8" : "text/plain; charset=us-ascii");
    if (human8)
        put_safe(&msg, "Content-Transfer-Encoding", "quoted-printable");
    out_str(&msg, "\r\n");
    if (human8)
        out_qp(&msg, human.p, human.len);
    else
        out_put(&msg, human.p, human.len);

    out_fmt(&msg, "\r\n--%s\r\n", b);
    put_safe(&msg, "Content-Description", "Delivery report");
    put_safe(&msg, "Content-Type",
             u8 ? "message/global-delivery-status" : "message/delivery-status");
    if (status8)
        put_safe(&msg, "Content-Transfer-Encoding", "quoted-printable");
    out_str(&msg, "\r\n");
    if (status8)
        out_qp(&msg, status.p, status.len);
    else
        out_put(&msg, status.p, status.len);

    if (why != WHY_NONE) {
        out_fmt(&msg, "\r\n--%s\r\n", b);
        if (why == WHY_FULL) {
            put_safe(&msg, "Content-Description", "Undelivered Message");
            put_safe(&msg, "Content-Type", u8 ? "message/global" : "message/rfc822");
        } else {
            put_safe(&msg, "Content-Description", kind == DSN_ACTION_RELAYED
                                                      ? "Message Headers"
                                                      : "Undelivered Message Headers");
            put_safe(&msg, "Content-Type", u8 ? "message/global-headers" : "text/rfc822-headers");
        }
        if (orig8)
            put_safe(&msg, "Content-Transfer-Encoding",
                     why == WHY_FULL ? "base64" : "quoted-printable");
        out_str(&msg, "\r\n");
        if (orig8 && why == WHY_FULL)
            out_base64(&msg, orig.p, orig.len);
        else if (orig8)
            out_qp(&msg, orig.p, orig.len);
        else
            out_put(&msg, orig.p, orig.len);
    }
    out_fmt(&msg, "\r\n--%s--\r\n", b);

    if (msg.oom)
        goto done;
    *out = msg.p;
    *out_len = msg.len;
    msg.p = NULL;
    rc = 0;
done:
    out_free(&human);
    out_free(&status);
    out_free(&orig);
    out_free(&msg);
    return rc;
}

int
dsn_msg_new(const struct dsn_input *in, const struct queue_envelope *orig, uint64_t id,
            struct dsn_msg **out)
{
    *out = NULL;
    if (orig == NULL || empty(orig->sender) || strlen(orig->sender) > QUEUE_MAX_ADDR || id == 0)
        return -EINVAL;
    struct dsn_msg *m = calloc(1, sizeof(*m));
    if (m == NULL)
        return -ENOMEM;
    int rc = dsn_build(in, &m->text, &m->len);
    if (rc != 0) {
        free(m);
        return rc;
    }
    m->id = id;
    m->orig = orig->id;
    snprintf(m->rcpt, sizeof(m->rcpt), "%s", orig->sender);
    const char *at = strrchr(m->rcpt, '@');
    m->domain = at != NULL ? at + 1 : "";
    /* What the DSN holds, not what the original was: its To: field can
     * be a UTF-8 sender's address even when the original was stored 7BIT
     * (declared SMTPUTF8 but all ASCII); its parts are 7-bit. */
    m->body_type = has_8bit(m->text, m->len) ? QUEUE_BODY_8BITMIME : QUEUE_BODY_7BIT;
    m->smtputf8 = orig->smtputf8;
    for (unsigned i = 0; i < in->nrcpt; i++)
        m->failure |= in->rcpt[i].action == DSN_ACTION_FAILED;
    snprintf(m->tenant, sizeof(m->tenant), "%s", orig->tenant ? orig->tenant : "");
    snprintf(m->campaign, sizeof(m->campaign), "%s", orig->campaign ? orig->campaign : "");
    snprintf(m->pool, sizeof(m->pool), "%s", orig->pool ? orig->pool : "");
    *out = m;
    return 0;
}

const char *
dsn_msg_strerror(int rc, const struct dsn_input *in, const struct queue_envelope *orig)
{
    if (rc == -EINVAL) {
        if (orig == NULL || empty(orig->sender))
            return "the original has the null sender";
        if (strlen(orig->sender) > QUEUE_MAX_ADDR)
            return "the original's sender is too long";
        const char *why = input_why(in);
        if (why != NULL)
            return why;
    }
    return strerror(rc < 0 ? -rc : rc);
}

struct dsn_msg *
dsn_msg_free(struct dsn_msg *m)
{
    if (m != NULL)
        free(m->text);
    free(m);
    return NULL;
}

void
dsn_msg_envelope(const struct dsn_msg *m, struct queue_envelope *env, struct queue_rcpt *rcpt,
                 struct iovec *body)
{
    *rcpt = (struct queue_rcpt){.addr = m->rcpt};
    *env = (struct queue_envelope){
        .id = m->id,
        .sender = "",
        .ret = QUEUE_RET_NONE,
        .body_type = m->body_type,
        .smtputf8 = m->smtputf8,
        .tenant = m->tenant,
        .campaign = m->campaign,
        .pool = m->pool,
        .nrcpt = 1,
        .rcpt = rcpt,
    };
    *body = (struct iovec){m->text, m->len};
}

bool
dsn_wanted(unsigned notify_bits, enum dsn_action a)
{
    if (notify_bits & QUEUE_NOTIFY_NEVER)
        return false;
    switch (a) {
    case DSN_ACTION_FAILED:
        return notify_bits == 0 || (notify_bits & QUEUE_NOTIFY_FAILURE) != 0;
    case DSN_ACTION_DELAYED:
        return (notify_bits & QUEUE_NOTIFY_DELAY) != 0;
    case DSN_ACTION_RELAYED:
        return (notify_bits & QUEUE_NOTIFY_SUCCESS) != 0;
    }
    return false;
}

int
dsn_status_format(char *buf, size_t cap, const struct smtp_enh *enh, unsigned code,
                  enum dsn_action a)
{
    int n;

    if (buf == NULL || cap < DSN_STATUS_MAX)
        return -EINVAL;
    bool ok = enh != NULL && enh->subject < 1000 && enh->detail < 1000;
    if (a == DSN_ACTION_RELAYED)
        /* the reply was a 2xx: a success is nothing but 2.X.X */
        n = ok && enh->cls == 2 ? snprintf(buf, cap, "2.%u.%u", enh->subject, enh->detail)
                                : snprintf(buf, cap, "2.0.0");
    else if (ok && (enh->cls == 2 || enh->cls == 4 || enh->cls == 5))
        n = snprintf(buf, cap, "%u.%u.%u", enh->cls, enh->subject, enh->detail);
    else if (code >= 400 && code < 600)
        n = snprintf(buf, cap, "%u.0.0", code / 100);
    else
        n = snprintf(buf, cap, "%s", a == DSN_ACTION_DELAYED ? "4.0.0" : "5.0.0");
    return n > 0 ? 0 : -EINVAL;
}
