/*
 * smtp_reply: incremental reply parser and EHLO capabilities (see
 * smtp_reply.h). A line is found with memchr, checked for NUL and stray CR
 * a word at a time, and its text copied straight into the reply as far as
 * the reply's bounds keep it (the rest is read, checked and dropped); the
 * same path serves a line that arrives whole and one split across reads,
 * so every read boundary gives the same result.
 *
 * Threading: pure functions; a parser belongs to one session at a time.
 */
#include "engine/smtp_reply.h"

#include <string.h>

void
smtp_reply_parser_init(struct smtp_reply_parser *p)
{
    p->err = 0;
    p->done = false;
    p->cr = false;
    p->lpos = 0;
    p->raw = 0;
    p->lkept = 0;
    p->ls = 0;
    p->reply.code = 0;
    p->reply.nlines = 0;
    p->reply.text_len = 0;
    p->reply.enh_len = 0;
    p->reply.truncated = false;
    memset(p->reply.cut, 0, sizeof p->reply.cut);
    p->reply.enh.cls = 0;
    p->reply.enh.subject = 0;
    p->reply.enh.detail = 0;
    p->reply.text[0] = '\0';
}

bool
smtp_reply_parser_idle(const struct smtp_reply_parser *p)
{
    return p->done || (p->lpos == 0 && p->reply.nlines == 0 && !p->cr);
}

#define ONES  0x0101010101010101ull
#define HIGHS 0x8080808080808080ull

/* Index of the first NUL or CR in s[0..n), or n. Eight octets per step:
 * (w - ONES) & ~w & HIGHS is non-zero exactly when w has a zero octet. */
static size_t
find_nul_cr(const char *s, size_t n)
{
    size_t i = 0;

    for (; i + 8 <= n; i += 8) {
        uint64_t w, x;

        memcpy(&w, s + i, 8);
        x = w ^ (ONES * '\r');
        if ((((w - ONES) & ~w) | ((x - ONES) & ~x)) & HIGHS)
            break;
    }
    for (; i < n; i++) {
        if (s[i] == '\0' || s[i] == '\r')
            return i;
    }
    return n;
}

/* Is the current line one the reply keeps? Not past the last line kept,
 * nor once the text is full. */
static bool
line_kept(const struct smtp_reply_parser *p)
{
    return p->reply.nlines < SMTP_REPLY_LINES_MAX && p->ls < SMTP_REPLY_TEXT_MAX;
}

/* Octets of the current line's text that may still be stored. */
static size_t
text_room(const struct smtp_reply_parser *p)
{
    size_t line = SMTP_REPLY_LINE_MAX - 6u, used = (size_t)p->ls + p->lkept;

    if (!line_kept(p) || p->lkept >= line || used >= SMTP_REPLY_TEXT_MAX)
        return 0;
    line -= p->lkept;
    return line < SMTP_REPLY_TEXT_MAX - used ? line : SMTP_REPLY_TEXT_MAX - used;
}

/* Octets of the current line that hold no LF. */
static int
feed(struct smtp_reply_parser *p, const char *s, size_t n)
{
    size_t k, t = 0;

    if (n == 0)
        return 0;
    if (p->cr)
        return SMTP_REPLY_E_BARE_CR;
    k = find_nul_cr(s, n);
    if (k < n) {
        if (s[k] == '\0')
            return SMTP_REPLY_E_NUL;
        if (k + 1 < n)
            return SMTP_REPLY_E_BARE_CR;
        p->cr = true;
    }
    while (p->lpos < 4 && t < n)
        p->head[p->lpos++] = s[t++];
    if (t < n) {
        size_t room = text_room(p), c = n - t < room ? n - t : room;

        /* A CR may land in text: end_line() counts the text without it. */
        memcpy(p->reply.text + p->ls + p->lkept, s + t, c);
        p->lkept = (uint16_t)(p->lkept + c);
        p->lpos += (uint32_t)(n - t);
    }
    return 0;
}

static inline unsigned
digits(const char *s, size_t n, size_t *len)
{
    unsigned v = 0;
    size_t i = 0;

    while (i < n && i < 3 && s[i] >= '0' && s[i] <= '9') {
        v = v * 10 + (unsigned)(s[i] - '0');
        i++;
    }
    *len = i;
    return v;
}

/* "X.Y.Z" then SP or the end, class matching the reply's first digit. */
static void
parse_enh(struct smtp_reply *r, const char *s, size_t n, char cls)
{
    size_t i = 2, k;
    unsigned subject, detail;

    if (n < 5 || s[0] != cls || s[1] != '.' || (cls != '2' && cls != '4' && cls != '5'))
        return;
    subject = digits(s + i, n - i, &k);
    if (k == 0 || (i += k) >= n || s[i] != '.')
        return;
    i++;
    detail = digits(s + i, n - i, &k);
    if (k == 0)
        return;
    i += k;
    if (i < n && s[i] != ' ')
        return;
    r->enh.cls = (uint8_t)(cls - '0');
    r->enh.subject = (uint16_t)subject;
    r->enh.detail = (uint16_t)detail;
    r->enh_len = (uint8_t)(i < n ? i + 1 : i);
}

/* At the LF of a line. Returns 0, SMTP_REPLY_DONE or an error. */
static int
end_line(struct smtp_reply_parser *p)
{
    struct smtp_reply *r = &p->reply;
    const char *h = p->head;
    size_t len, tl, end, kept = p->lkept;
    unsigned code;
    bool last;

    if (!p->cr)
        return SMTP_REPLY_E_BARE_LF;
    len = p->lpos - 1u;
    if (len < 3 || h[0] < '2' || h[0] > '5' || h[1] < '0' || h[1] > '5' || h[2] < '0' || h[2] > '9')
        return SMTP_REPLY_E_CODE;
    code = (unsigned)(h[0] - '0') * 100 + (unsigned)(h[1] - '0') * 10 + (unsigned)(h[2] - '0');
    if (len == 3)
        last = true;
    else if (h[3] == ' ')
        last = true;
    else if (h[3] == '-')
        last = false;
    else
        return SMTP_REPLY_E_SEPARATOR;
    if (r->nlines == 0)
        r->code = (uint16_t)code;
    else if (code != r->code)
        return SMTP_REPLY_E_CODE_CHANGED;
    p->lpos = 0;
    p->lkept = 0;
    p->cr = false;
    if (!line_kept(p)) {
        /* a line left out (never the first): the text ends with the
         * last line kept, whose '\n' is at ls - 1 */
        r->truncated = true;
        if (!last)
            return 0;
        end = p->ls - 1u;
    } else {
        tl = len > 4 ? len - 4 : 0;
        if (tl > kept) {
            tl = kept;
            r->truncated = true;
            r->cut[r->nlines / 8] |= (uint8_t)(1u << (r->nlines % 8));
        }
        end = p->ls + tl;
        r->line_off[r->nlines++] = p->ls;
        if (r->nlines == 1)
            parse_enh(r, r->text, tl, h[0]);
        if (!last) {
            r->text[end] = '\n';
            p->ls = (uint16_t)(end + 1);
            return 0;
        }
    }
    r->text_len = (uint16_t)end;
    r->text[end] = '\0';
    p->done = true;
    return SMTP_REPLY_DONE;
}

int
smtp_reply_parse(struct smtp_reply_parser *p, const char *buf, size_t len, size_t *used)
{
    size_t i = 0;
    int rc = 0;

    *used = 0;
    if (p->err != 0)
        return p->err;
    if (p->done) {
        struct smtp_reply *r = &p->reply;

        r->code = 0;
        r->nlines = 0;
        r->text_len = 0;
        r->enh_len = 0;
        r->truncated = false;
        memset(r->cut, 0, sizeof r->cut);
        r->enh.cls = 0;
        r->enh.subject = r->enh.detail = 0;
        p->ls = 0;
        p->raw = 0;
        p->done = false;
    }
    while (i < len) {
        size_t room = SMTP_REPLY_RAW_MAX - p->raw;
        size_t lim = len - i < room ? len - i : room;
        const char *lf = memchr(buf + i, '\n', lim);
        size_t n = lf ? (size_t)(lf - (buf + i)) : lim;

        rc = feed(p, buf + i, n);
        if (rc < 0)
            break;
        i += n;
        p->raw += (uint32_t)n;
        if (lf == NULL) {
            if (lim == room) {
                rc = SMTP_REPLY_E_TOO_LONG;
                break;
            }
            continue;
        }
        i++;
        p->raw++;
        rc = end_line(p);
        if (rc != 0)
            break;
    }
    *used = i;
    if (rc < 0)
        p->err = rc;
    return rc;
}

int
smtp_reply_line(const struct smtp_reply *r, unsigned i, struct smtp_span *text)
{
    size_t start, end;

    if (i >= r->nlines)
        return -1;
    start = r->line_off[i];
    end = i + 1 < r->nlines ? r->line_off[i + 1] - 1u : r->text_len;
    text->ptr = r->text + start;
    text->len = end - start;
    return 0;
}

bool
smtp_reply_line_cut(const struct smtp_reply *r, unsigned i)
{
    return i < r->nlines && (r->cut[i / 8] & (1u << (i % 8))) != 0;
}

const char *
smtp_reply_err_str(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case SMTP_REPLY_E_CODE:
        return "malformed reply code";
    case SMTP_REPLY_E_SEPARATOR:
        return "reply code not followed by '-' or ' '";
    case SMTP_REPLY_E_CODE_CHANGED:
        return "reply code changed inside a multiline reply";
    case SMTP_REPLY_E_TOO_LONG:
        return "reply over 64 KB";
    case SMTP_REPLY_E_BARE_LF:
        return "bare LF in reply";
    case SMTP_REPLY_E_BARE_CR:
        return "bare CR in reply";
    case SMTP_REPLY_E_NUL:
        return "NUL in reply";
    case SMTP_REPLY_E_NOT_EHLO:
        return "not a 250 reply to EHLO";
    default:
        return "unknown error";
    }
}

/* ---- EHLO ---- */

static bool
word_is(const char *s, size_t n, const char *upper)
{
    size_t i;

    for (i = 0; i < n; i++) {
        char c = s[i] >= 'a' && s[i] <= 'z' ? (char)(s[i] - 32) : s[i];

        if (upper[i] == '\0' || c != upper[i])
            return false;
    }
    return upper[i] == '\0';
}

/* Decimal with no sign and no overflow; false otherwise. */
static bool
number(const char *s, size_t n, uint64_t max, uint64_t *out)
{
    uint64_t v = 0;

    if (n == 0 || n > 20)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned d = (unsigned)(s[i] - '0');

        if (d > 9 || v > (max - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

static const struct {
    const char *kw;
    uint32_t bit;
} plain_exts[] = {
    {"PIPELINING", SMTP_EXT_PIPELINING},
    {"STARTTLS", SMTP_EXT_STARTTLS},
    {"8BITMIME", SMTP_EXT_8BITMIME},
    {"SMTPUTF8", SMTP_EXT_SMTPUTF8},
    {"CHUNKING", SMTP_EXT_CHUNKING},
    {"BINARYMIME", SMTP_EXT_BINARYMIME},
    {"ENHANCEDSTATUSCODES", SMTP_EXT_ENHANCEDSTATUSCODES},
    {"DSN", SMTP_EXT_DSN},
    {"REQUIRETLS", SMTP_EXT_REQUIRETLS},
};

/* The next space-separated word of [*p, end), or an empty span. */
static struct smtp_span
next_word(const char **p, const char *end)
{
    const char *s = *p, *e;
    struct smtp_span w;

    while (s < end && *s == ' ')
        s++;
    e = s;
    while (e < end && *e != ' ')
        e++;
    w.ptr = s;
    w.len = (size_t)(e - s);
    *p = e;
    return w;
}

static void
ehlo_line(const char *s, const char *end, struct smtp_ehlo *caps)
{
    const char *k = s, *p;
    struct smtp_span w;
    size_t kl;

    while (s < end && *s != ' ' && *s != '=')
        s++;
    kl = (size_t)(s - k);
    p = s < end ? s + 1 : s;
    if (s < end && *s == '=' && !word_is(k, kl, "AUTH"))
        return;
    for (size_t i = 0; i < sizeof plain_exts / sizeof plain_exts[0]; i++) {
        if (word_is(k, kl, plain_exts[i].kw)) {
            caps->ext |= plain_exts[i].bit;
            return;
        }
    }
    if (word_is(k, kl, "SIZE")) {
        uint64_t v = 0;

        w = next_word(&p, end);
        if (w.len != 0 && !number(w.ptr, w.len, UINT64_MAX, &v))
            return;
        caps->ext |= SMTP_EXT_SIZE;
        caps->size_max = v;
    } else if (word_is(k, kl, "AUTH")) {
        caps->ext |= SMTP_EXT_AUTH;
        while ((w = next_word(&p, end)).len != 0)
            caps->auth |= smtp_auth_mech_parse(w.ptr, w.len);
    } else if (word_is(k, kl, "LIMITS")) {
        caps->ext |= SMTP_EXT_LIMITS;
        while ((w = next_word(&p, end)).len != 0) {
            const char *eq = memchr(w.ptr, '=', w.len);
            uint64_t v;
            size_t nl;

            if (eq == NULL)
                continue;
            nl = (size_t)(eq - w.ptr);
            if (!number(eq + 1, w.len - nl - 1, UINT32_MAX, &v))
                continue;
            if (word_is(w.ptr, nl, "RCPTMAX"))
                caps->rcpt_max = (uint32_t)v;
            else if (word_is(w.ptr, nl, "MAILMAX"))
                caps->mail_max = (uint32_t)v;
        }
    }
}

int
smtp_reply_ehlo(const struct smtp_reply *r, struct smtp_ehlo *caps)
{
    memset(caps, 0, sizeof *caps);
    if (r->code != 250)
        return SMTP_REPLY_E_NOT_EHLO;
    for (unsigned i = 1; i < r->nlines; i++) {
        struct smtp_span t;

        if (smtp_reply_line_cut(r, i))
            continue;
        smtp_reply_line(r, i, &t);
        ehlo_line(t.ptr, t.ptr + t.len, caps);
    }
    return 0;
}
