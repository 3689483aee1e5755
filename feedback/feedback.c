/*
 * feedback: bounce, complaint and auto-reply recognition (see feedback.h).
 *
 * The message is never copied: spans point into it. One walk over the
 * MIME tree (bounded depth and part count) notes the delivery-status and
 * feedback-report parts, the original message's header section, and the
 * decoded text of the text parts (bounded); the kind is decided after the
 * walk: a report part wins, then the texts of non-standard bounces, then
 * the signs of an automatic reply.
 *
 * Threading: pure functions; any thread.
 */
#include "feedback/feedback.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/base64.h"

struct span {
    const char *p;
    size_t n;
};

struct walk {
    struct feedback_result *r;
    const char *verp_prefix;
    size_t verp_prefix_len;
    bool have_dsn, have_arf, have_orig;
    char report_type[32];
    char *text; /* owned: decoded text parts, FEEDBACK_TEXT_MAX */
    size_t text_len;
};

const char *
feedback_kind_str(enum feedback_kind k)
{
    static const char *const names[] = {"unknown", "dsn", "bounce", "arf", "autoreply"};
    return (unsigned)k < sizeof(names) / sizeof(names[0]) ? names[k] : "unknown";
}

const char *
feedback_action_str(enum feedback_action a)
{
    static const char *const names[] = {"", "failed", "delayed", "delivered", "relayed",
                                        "expanded"};
    return (unsigned)a < sizeof(names) / sizeof(names[0]) ? names[a] : "";
}

/* ---- small text helpers ---- */

static void
copy_cut(char *out, size_t cap, const char *p, size_t n)
{
    if (cap == 0)
        return;
    if (n >= cap)
        n = cap - 1;
    memcpy(out, p, n);
    out[n] = '\0';
}

static void
lower(char *s)
{
    for (; *s; s++)
        *s = (char)tolower((unsigned char)*s);
}

/* Case-insensitive search of needle in hay[0..n). */
static const char *
find_ci(const char *hay, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    if (k == 0 || k > n)
        return NULL;
    int first = tolower((unsigned char)needle[0]);
    for (size_t i = 0; i + k <= n; i++) {
        if (tolower((unsigned char)hay[i]) != first)
            continue;
        if (strncasecmp(hay + i, needle, k) == 0)
            return hay + i;
    }
    return NULL;
}

static bool
prefix_ci(const char *s, const char *prefix)
{
    return strncasecmp(s, prefix, strlen(prefix)) == 0;
}

/* The end of the line starting at p (the octet after its LF, or end). */
static const char *
line_end(const char *p, const char *end)
{
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    return nl ? nl + 1 : end;
}

/* Length of a line without its CRLF or LF. */
static size_t
line_len(const char *p, const char *next)
{
    size_t n = (size_t)(next - p);
    if (n > 0 && p[n - 1] == '\n')
        n--;
    if (n > 0 && p[n - 1] == '\r')
        n--;
    return n;
}

static bool
blank_line(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != ' ' && p[i] != '\t')
            return false;
    return true;
}

/* Split at the first empty line: the header section and the body. A
 * message with no empty line is all header (text/rfc822-headers). */
static void
split(struct span m, struct span *hdr, struct span *body)
{
    const char *p = m.p, *end = m.p + m.n;
    while (p < end) {
        const char *next = line_end(p, end);
        if (line_len(p, next) == 0) {
            *hdr = (struct span){m.p, (size_t)(p - m.p)};
            *body = (struct span){next, (size_t)(end - next)};
            return;
        }
        p = next;
    }
    *hdr = m;
    *body = (struct span){end, 0};
}

long
feedback_header(const char *hdr, size_t len, const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    const char *p = hdr, *end = hdr + len;
    while (p < end) {
        const char *next = line_end(p, end);
        size_t ll = line_len(p, next);
        if (ll > nl && p[nl] == ':' && strncasecmp(p, name, nl) == 0) {
            /* the value, with its continuation lines, unfolded */
            size_t o = 0;
            const char *v = p + nl + 1;
            size_t vl = ll - nl - 1;
            for (;;) {
                for (size_t i = 0; i < vl && o + 1 < cap; i++)
                    out[o++] = v[i] == '\t' ? ' ' : v[i];
                p = next;
                if (p >= end || (*p != ' ' && *p != '\t'))
                    break;
                next = line_end(p, end);
                v = p;
                vl = line_len(p, next);
            }
            if (cap == 0)
                return 0;
            out[o] = '\0';
            size_t s = 0;
            while (out[s] == ' ')
                s++;
            while (o > s && out[o - 1] == ' ')
                o--;
            memmove(out, out + s, o - s);
            out[o - s] = '\0';
            return (long)(o - s);
        }
        p = next;
    }
    if (cap > 0)
        out[0] = '\0';
    return -1;
}

static bool
addr_char(unsigned char c)
{
    return isalnum(c) || (c != 0 && strchr("!#$%&'*+-/=?^_`{|}~.", c) != NULL) || c >= 0x80;
}

size_t
feedback_find_addr(const char *text, size_t len, char *out, size_t cap)
{
    for (size_t i = 0; i < len; i++) {
        if (text[i] != '@')
            continue;
        size_t s = i, e = i + 1;
        while (s > 0 && addr_char((unsigned char)text[s - 1]))
            s--;
        while (e < len && (isalnum((unsigned char)text[e]) || text[e] == '.' || text[e] == '-' ||
                           text[e] == '[' || text[e] == ']' || text[e] == ':'))
            e++;
        while (e > i + 1 && (text[e - 1] == '.' || text[e - 1] == ':'))
            e--; /* a sentence's full stop, "user@host:" */
        while (s < i && text[s] == '.')
            s++;
        if (s == i || e == i + 1 || cap == 0)
            continue;
        copy_cut(out, cap, text + s, e - s);
        return e - s < cap ? e - s : cap - 1;
    }
    if (cap > 0)
        out[0] = '\0';
    return 0;
}

/* "rfc822; user@example.com" or "<user@example.com>": the address. */
static void
typed_addr(const char *v, char *out, size_t cap)
{
    const char *semi = strchr(v, ';');
    const char *a = semi ? semi + 1 : v;
    while (*a == ' ')
        a++;
    size_t n = strlen(a);
    if (n > 0 && a[0] == '<') {
        a++;
        n--;
        const char *gt = memchr(a, '>', n);
        if (gt != NULL)
            n = (size_t)(gt - a);
    }
    while (n > 0 && a[n - 1] == ' ')
        n--;
    copy_cut(out, cap, a, n);
}

/* "5.1.1" at p (d.ddd.ddd, class 2, 4 or 5): its length, else 0. */
static size_t
enh_at(const char *p, const char *end)
{
    if (end - p < 5 || (p[0] != '2' && p[0] != '4' && p[0] != '5') || p[1] != '.')
        return 0;
    const char *q = p + 2;
    int d = 0;
    while (q < end && isdigit((unsigned char)*q) && d < 3)
        q++, d++;
    if (d == 0 || q >= end || *q != '.')
        return 0;
    q++;
    d = 0;
    while (q < end && isdigit((unsigned char)*q) && d < 3)
        q++, d++;
    if (d == 0 || (q < end && isdigit((unsigned char)*q)))
        return 0;
    return (size_t)(q - p);
}

/* The first enhanced status code in text, standing alone. */
static const char *
find_enh(const char *t, size_t n, size_t *len)
{
    const char *end = t + n;
    for (const char *p = t; p < end; p++) {
        if (p > t && (isalnum((unsigned char)p[-1]) || p[-1] == '.'))
            continue;
        size_t k = enh_at(p, end);
        if (k > 0) {
            *len = k;
            return p;
        }
    }
    return NULL;
}

/* The first SMTP reply code ([45]xx followed by a blank, '-' or end) in
 * text, standing alone: 0 when none. */
static unsigned
find_code(const char *t, size_t n, const char **at)
{
    for (size_t i = 0; i + 3 <= n; i++) {
        if (i > 0 && (isalnum((unsigned char)t[i - 1]) || t[i - 1] == '.'))
            continue;
        if ((t[i] == '4' || t[i] == '5') && isdigit((unsigned char)t[i + 1]) &&
            isdigit((unsigned char)t[i + 2]) &&
            (i + 3 == n || t[i + 3] == ' ' || t[i + 3] == '-' || t[i + 3] == '\r' ||
             t[i + 3] == '\n')) {
            if (at)
                *at = t + i;
            return (unsigned)(t[i] - '0') * 100 + (unsigned)(t[i + 1] - '0') * 10 +
                   (unsigned)(t[i + 2] - '0');
        }
    }
    return 0;
}

/* A VERP local part (prefix, then base32) in text: into r. */
static bool
find_verp(struct walk *w, const char *t, size_t n)
{
    if (w->verp_prefix_len == 0 || w->r->verp_local[0] != '\0')
        return w->r->verp_local[0] != '\0';
    const char *end = t + n, *p = t;
    while (p < end) {
        const char *hit = find_ci(p, (size_t)(end - p), w->verp_prefix);
        if (hit == NULL)
            return false;
        p = hit + 1;
        if (hit > t && addr_char((unsigned char)hit[-1]))
            continue; /* "xbounce-": some other local part */
        const char *q = hit + w->verp_prefix_len;
        while (q < end && isalnum((unsigned char)*q))
            q++;
        if (q == hit + w->verp_prefix_len || q >= end || *q != '@')
            continue;
        const char *d = q + 1, *de = d;
        while (de < end && (isalnum((unsigned char)*de) || *de == '.' || *de == '-'))
            de++;
        if (de == d)
            continue;
        copy_cut(w->r->verp_local, sizeof(w->r->verp_local), hit, (size_t)(q - hit));
        copy_cut(w->r->verp_domain, sizeof(w->r->verp_domain), d, (size_t)(de - d));
        lower(w->r->verp_domain);
        return true;
    }
    return false;
}

/* ---- Content-Type ---- */

struct ctype {
    char type[64];       /* "multipart/report", lowercase */
    char boundary[72];   /* RFC 2046: at most 70 */
    char report_type[32];
    char cte[32];        /* Content-Transfer-Encoding, lowercase */
};

static void
param(const char *v, const char *name, char *out, size_t cap)
{
    out[0] = '\0';
    size_t nl = strlen(name);
    const char *p = v;
    while ((p = strchr(p, ';')) != NULL) {
        p++;
        while (*p == ' ')
            p++;
        if (strncasecmp(p, name, nl) != 0)
            continue;
        const char *q = p + nl;
        while (*q == ' ')
            q++;
        if (*q != '=')
            continue;
        q++;
        while (*q == ' ')
            q++;
        size_t o = 0;
        if (*q == '"') {
            q++;
            while (*q && *q != '"' && o + 1 < cap) {
                if (*q == '\\' && q[1] != '\0')
                    q++;
                out[o++] = *q++;
            }
        } else {
            while (*q && *q != ';' && *q != ' ' && o + 1 < cap)
                out[o++] = *q++;
        }
        out[o] = '\0';
        return;
    }
}

static void
ctype_of(struct span hdr, struct ctype *ct)
{
    char v[1024];
    memset(ct, 0, sizeof(*ct));
    if (feedback_header(hdr.p, hdr.n, "Content-Type", v, sizeof(v)) < 0) {
        strcpy(ct->type, "text/plain");
    } else {
        size_t n = strcspn(v, "; ");
        copy_cut(ct->type, sizeof(ct->type), v, n);
        lower(ct->type);
        param(v, "boundary", ct->boundary, sizeof(ct->boundary));
        param(v, "report-type", ct->report_type, sizeof(ct->report_type));
        lower(ct->report_type);
    }
    if (feedback_header(hdr.p, hdr.n, "Content-Transfer-Encoding", v, sizeof(v)) >= 0) {
        copy_cut(ct->cte, sizeof(ct->cte), v, strcspn(v, "; "));
        lower(ct->cte);
    }
}

/* ---- multipart ---- */

/* Is the line at p (length n) the delimiter "--boundary" (or its closing
 * form)? Returns 1 delimiter, 2 closing, 0 neither. */
static int
delimiter(const char *p, size_t n, const char *b, size_t bl)
{
    if (n < bl + 2 || p[0] != '-' || p[1] != '-' || memcmp(p + 2, b, bl) != 0)
        return 0;
    size_t i = bl + 2;
    int kind = 1;
    if (n >= i + 2 && p[i] == '-' && p[i + 1] == '-') {
        kind = 2;
        i += 2;
    }
    return blank_line(p + i, n - i) ? kind : 0; /* transport padding only */
}

static void walk_entity(struct walk *w, struct span ent, unsigned depth);

static void
walk_multipart(struct walk *w, struct span body, const char *b, unsigned depth)
{
    size_t bl = strlen(b);
    if (bl == 0)
        return;
    const char *p = body.p, *end = body.p + body.n;
    const char *part = NULL; /* start of the current part's content */
    while (p < end) {
        const char *next = line_end(p, end);
        int d = delimiter(p, line_len(p, next), b, bl);
        if (d != 0) {
            if (part != NULL) {
                /* the CRLF before the delimiter belongs to it */
                const char *pe = p;
                if (pe > part && pe[-1] == '\n')
                    pe--;
                if (pe > part && pe[-1] == '\r')
                    pe--;
                if (w->r->mime_parts >= FEEDBACK_MIME_PARTS) {
                    w->r->truncated = 1;
                    return;
                }
                walk_entity(w, (struct span){part, (size_t)(pe - part)}, depth + 1);
            }
            if (d == 2)
                return;
            part = next;
        }
        p = next;
    }
    /* no closing delimiter: the last part runs to the end */
    if (part != NULL && part < end && w->r->mime_parts < FEEDBACK_MIME_PARTS)
        walk_entity(w, (struct span){part, (size_t)(end - part)}, depth + 1);
}

/* ---- decoding text parts into w->text ---- */

static void
text_put(struct walk *w, char c)
{
    if (w->text_len < FEEDBACK_TEXT_MAX)
        w->text[w->text_len++] = c;
    else
        w->r->truncated = 1;
}

static void
text_add(struct walk *w, struct span body, const char *cte)
{
    if (w->text_len > 0)
        text_put(w, '\n');
    if (strcmp(cte, "base64") == 0) {
        uint32_t acc = 0;
        int bits = 0;
        for (size_t i = 0; i < body.n && w->text_len < FEEDBACK_TEXT_MAX; i++) {
            int v = base64_value((unsigned char)body.p[i]);
            if (v < 0)
                continue; /* line ends, padding, junk */
            acc = (acc << 6) | (uint32_t)v;
            bits += 6;
            if (bits >= 8) {
                text_put(w, (char)(acc >> (bits - 8)));
                bits -= 8;
                acc &= (1u << bits) - 1;
            }
        }
    } else if (strcmp(cte, "quoted-printable") == 0) {
        for (size_t i = 0; i < body.n && w->text_len < FEEDBACK_TEXT_MAX; i++) {
            char c = body.p[i];
            if (c != '=') {
                text_put(w, c);
                continue;
            }
            if (i + 1 < body.n && body.p[i + 1] == '\n') {
                i++; /* soft line break */
            } else if (i + 2 < body.n && body.p[i + 1] == '\r' && body.p[i + 2] == '\n') {
                i += 2;
            } else if (i + 2 < body.n && isxdigit((unsigned char)body.p[i + 1]) &&
                       isxdigit((unsigned char)body.p[i + 2])) {
                char hx[3] = {body.p[i + 1], body.p[i + 2], 0};
                text_put(w, (char)strtol(hx, NULL, 16));
                i += 2;
            } else {
                text_put(w, c);
            }
        }
    } else {
        size_t n = body.n;
        if (n > FEEDBACK_TEXT_MAX - w->text_len) {
            n = FEEDBACK_TEXT_MAX - w->text_len;
            w->r->truncated = 1;
        }
        memcpy(w->text + w->text_len, body.p, n);
        w->text_len += n;
    }
}

/* ---- report parts ---- */

static enum feedback_action
action_parse(const char *v)
{
    if (prefix_ci(v, "failed"))
        return FEEDBACK_ACTION_FAILED;
    if (prefix_ci(v, "delayed"))
        return FEEDBACK_ACTION_DELAYED;
    if (prefix_ci(v, "delivered"))
        return FEEDBACK_ACTION_DELIVERED;
    if (prefix_ci(v, "relayed"))
        return FEEDBACK_ACTION_RELAYED;
    if (prefix_ci(v, "expanded"))
        return FEEDBACK_ACTION_EXPANDED;
    return FEEDBACK_ACTION_NONE;
}

/* Diagnostic text to code and text: "smtp; 550 5.1.1 <a@b>: ..." */
static void
diag_parse(const char *v, struct feedback_rcpt *rc)
{
    const char *semi = strchr(v, ';');
    const char *t = semi && (size_t)(semi - v) < 16 ? semi + 1 : v;
    while (*t == ' ')
        t++;
    copy_cut(rc->diag, sizeof(rc->diag), t, strlen(t));
    size_t tl = strlen(t);
    const char *at = NULL;
    unsigned code = find_code(t, tl < 16 ? tl : 16, &at);
    rc->code = code;
    if (rc->status[0] == '\0') {
        size_t el = 0;
        const char *e = find_enh(t, tl, &el);
        if (e != NULL)
            copy_cut(rc->status, sizeof(rc->status), e, el);
    }
}

static void
status_parse(const char *v, struct feedback_rcpt *rc)
{
    size_t n = strlen(v);
    size_t k = enh_at(v, v + n);
    if (k > 0)
        copy_cut(rc->status, sizeof(rc->status), v, k);
}

/* message/delivery-status: blocks of fields separated by empty lines. */
static void
dsn_fields(struct walk *w, struct span body)
{
    struct feedback_result *r = w->r;
    const char *p = body.p, *end = body.p + body.n;
    char v[1024];
    while (p < end) {
        /* skip empty lines, then the block runs to the next one */
        const char *next = line_end(p, end);
        if (blank_line(p, line_len(p, next))) {
            p = next;
            continue;
        }
        const char *bs = p;
        while (p < end) {
            next = line_end(p, end);
            if (blank_line(p, line_len(p, next)))
                break;
            p = next;
        }
        struct span blk = {bs, (size_t)(p - bs)};
        if (feedback_header(blk.p, blk.n, "Final-Recipient", v, sizeof(v)) < 0) {
            /* the per-message fields */
            if (feedback_header(blk.p, blk.n, "Reporting-MTA", v, sizeof(v)) >= 0 &&
                r->reporting_mta[0] == '\0')
                typed_addr(v, r->reporting_mta, sizeof(r->reporting_mta));
            if (feedback_header(blk.p, blk.n, "Original-Envelope-Id", v, sizeof(v)) >= 0 &&
                r->envid[0] == '\0')
                copy_cut(r->envid, sizeof(r->envid), v, strlen(v));
            continue;
        }
        r->nrcpt_seen++;
        if (r->nrcpt >= FEEDBACK_RCPT_MAX) {
            r->truncated = 1;
            continue;
        }
        struct feedback_rcpt *rc = &r->rcpt[r->nrcpt++];
        typed_addr(v, rc->addr, sizeof(rc->addr));
        if (feedback_header(blk.p, blk.n, "Original-Recipient", v, sizeof(v)) >= 0)
            typed_addr(v, rc->orig_addr, sizeof(rc->orig_addr));
        if (feedback_header(blk.p, blk.n, "Action", v, sizeof(v)) >= 0)
            rc->action = action_parse(v);
        if (feedback_header(blk.p, blk.n, "Status", v, sizeof(v)) >= 0)
            status_parse(v, rc);
        if (feedback_header(blk.p, blk.n, "Diagnostic-Code", v, sizeof(v)) >= 0)
            diag_parse(v, rc);
        if (feedback_header(blk.p, blk.n, "Remote-MTA", v, sizeof(v)) >= 0)
            typed_addr(v, rc->remote_mta, sizeof(rc->remote_mta));
    }
}

/* message/feedback-report: one block of fields. */
static void
arf_fields(struct walk *w, struct span body)
{
    struct feedback_result *r = w->r;
    char v[1024];
    if (feedback_header(body.p, body.n, "Feedback-Type", v, sizeof(v)) >= 0) {
        copy_cut(r->feedback_type, sizeof(r->feedback_type), v, strcspn(v, " ;"));
        lower(r->feedback_type);
    }
    if (feedback_header(body.p, body.n, "User-Agent", v, sizeof(v)) >= 0)
        copy_cut(r->user_agent, sizeof(r->user_agent), v, strlen(v));
    if (feedback_header(body.p, body.n, "Original-Mail-From", v, sizeof(v)) >= 0) {
        typed_addr(v, r->orig_mail_from, sizeof(r->orig_mail_from));
        find_verp(w, v, strlen(v));
    }
    if (feedback_header(body.p, body.n, "Original-Rcpt-To", v, sizeof(v)) >= 0)
        typed_addr(v, r->orig_rcpt_to, sizeof(r->orig_rcpt_to));
    if (feedback_header(body.p, body.n, "Source-IP", v, sizeof(v)) >= 0)
        copy_cut(r->source_ip, sizeof(r->source_ip), v, strcspn(v, " ;"));
    if (feedback_header(body.p, body.n, "Reported-Domain", v, sizeof(v)) >= 0)
        copy_cut(r->reported_domain, sizeof(r->reported_domain), v, strlen(v));
}

/* The original message's header section (message/rfc822's or
 * text/rfc822-headers'). */
static void
orig_headers(struct walk *w, struct span ent)
{
    struct feedback_result *r = w->r;
    struct span hdr, body;
    split(ent, &hdr, &body);
    w->have_orig = true;
    char v[1024];
    if (feedback_header(hdr.p, hdr.n, "Message-ID", v, sizeof(v)) >= 0)
        copy_cut(r->orig_message_id, sizeof(r->orig_message_id), v, strlen(v));
    if (feedback_header(hdr.p, hdr.n, "To", v, sizeof(v)) >= 0)
        feedback_find_addr(v, strlen(v), r->orig_to, sizeof(r->orig_to));
    if (feedback_header(hdr.p, hdr.n, "Subject", v, sizeof(v)) >= 0)
        copy_cut(r->orig_subject, sizeof(r->orig_subject), v, strlen(v));
    if (feedback_header(hdr.p, hdr.n, "X-Sluice-Id", v, sizeof(v)) >= 0)
        copy_cut(r->sluice_id, sizeof(r->sluice_id), v, strlen(v));
    if (feedback_header(hdr.p, hdr.n, "X-Sluice-Tenant", v, sizeof(v)) >= 0)
        copy_cut(r->sluice_tenant, sizeof(r->sluice_tenant), v, strlen(v));
    if (feedback_header(hdr.p, hdr.n, "X-Sluice-Campaign", v, sizeof(v)) >= 0)
        copy_cut(r->sluice_campaign, sizeof(r->sluice_campaign), v, strlen(v));
    if (feedback_header(hdr.p, hdr.n, "X-Sluice-Rcpt", v, sizeof(v)) >= 0)
        typed_addr(v, r->sluice_rcpt, sizeof(r->sluice_rcpt));
    /* The envelope sender shows in Return-Path (added at the final
     * delivery, so present in ARF reports); else anywhere in the section. */
    if (feedback_header(hdr.p, hdr.n, "Return-Path", v, sizeof(v)) >= 0)
        find_verp(w, v, strlen(v));
    find_verp(w, hdr.p, hdr.n);
}

static void
walk_entity(struct walk *w, struct span ent, unsigned depth)
{
    w->r->mime_parts++;
    struct span hdr, body;
    split(ent, &hdr, &body);
    struct ctype ct;
    ctype_of(hdr, &ct);
    if (strncmp(ct.type, "multipart/", 10) == 0) {
        if (depth >= FEEDBACK_MIME_DEPTH) {
            w->r->truncated = 1;
            return;
        }
        if (strcmp(ct.type, "multipart/report") == 0 && w->report_type[0] == '\0')
            copy_cut(w->report_type, sizeof(w->report_type), ct.report_type,
                     strlen(ct.report_type));
        walk_multipart(w, body, ct.boundary, depth);
    } else if (strcmp(ct.type, "message/delivery-status") == 0 ||
               strcmp(ct.type, "message/global-delivery-status") == 0) {
        if (!w->have_dsn) {
            w->have_dsn = true;
            dsn_fields(w, body);
        }
    } else if (strcmp(ct.type, "message/feedback-report") == 0) {
        if (!w->have_arf) {
            w->have_arf = true;
            arf_fields(w, body);
        }
    } else if (strcmp(ct.type, "message/rfc822") == 0 || strcmp(ct.type, "message/global") == 0 ||
               strcmp(ct.type, "text/rfc822-headers") == 0 ||
               strcmp(ct.type, "message/global-headers") == 0) {
        if (!w->have_orig)
            orig_headers(w, body);
    } else if (strcmp(ct.type, "text/plain") == 0 && depth > 0) {
        text_add(w, body, ct.cte);
    }
}

/* ---- non-standard bounces ---- */

static const char *const bounce_from[] = {"mailer-daemon", "postmaster", "mail delivery",
                                          "mail.delivery", "microsoftexchange", NULL};
static const char *const bounce_subject[] = {
    "undeliver",          "delivery status notification", "delivery failure",
    "failure notice",     "returned mail",                "mail delivery failed",
    "non-delivery",       "nondelivery",                  "could not be delivered",
    "delivery has failed", "delivery failed",             NULL};
static const char *const bounce_marker[] = {
    "created automatically by mail delivery software",
    "delivery has failed to these recipients",
    "wasn't able to deliver your message",
    "could not be delivered to one or more",
    "following address(es) failed",
    "following addresses had permanent fatal errors",
    "your message couldn't be delivered",
    "your message wasn't delivered",
    "message could not be delivered",
    "permanent error",
    "user unknown",
    NULL};
/* After these, the first address is the recipient. */
static const char *const rcpt_marker[] = {
    "address(es) failed:",         "to these recipients or groups:",
    "following addresses:",        "following addresses.",
    "following recipients:",
    "permanent fatal errors -----", "couldn't be delivered to",
    "wasn't delivered to",         "could not be delivered to",
    "original-recipient:",         "final-recipient:",
    NULL};

static bool
any_ci(const char *t, size_t n, const char *const *list)
{
    for (unsigned i = 0; list[i] != NULL; i++)
        if (find_ci(t, n, list[i]) != NULL)
            return true;
    return false;
}

static bool
nonstandard_bounce(struct walk *w)
{
    struct feedback_result *r = w->r;
    size_t fl = strlen(r->from), sl = strlen(r->subject);
    bool sender = any_ci(r->from, fl, bounce_from);
    bool subject = any_ci(r->subject, sl, bounce_subject);
    bool marker = any_ci(w->text, w->text_len, bounce_marker);
    if (!((sender && (subject || marker)) || (subject && marker)))
        return false;
    struct feedback_rcpt *rc = &r->rcpt[0];
    memset(rc, 0, sizeof(*rc));
    /* the recipient: the first address after a marker phrase */
    const char *t = w->text, *end = w->text + w->text_len;
    const char *from = NULL;
    for (unsigned i = 0; rcpt_marker[i] != NULL; i++) {
        const char *m = find_ci(t, w->text_len, rcpt_marker[i]);
        if (m != NULL && (from == NULL || m < from))
            from = m + strlen(rcpt_marker[i]);
    }
    if (from != NULL)
        feedback_find_addr(from, (size_t)(end - from), rc->addr, sizeof(rc->addr));
    if (rc->addr[0] == '\0' && r->orig_to[0] != '\0')
        copy_cut(rc->addr, sizeof(rc->addr), r->orig_to, strlen(r->orig_to));
    /* the status: the first SMTP reply (or enhanced code) after that */
    const char *scan = from ? from : t;
    size_t sn = (size_t)(end - scan);
    const char *at = NULL;
    size_t el = 0;
    const char *e = find_enh(scan, sn, &el);
    unsigned code = find_code(scan, sn, &at);
    if (e != NULL)
        copy_cut(rc->status, sizeof(rc->status), e, el);
    rc->code = code;
    const char *dl = at != NULL && (e == NULL || at < e) ? at : e;
    if (dl != NULL) {
        /* the diagnostic: that line, with its continuation lines (Exim
         * indents them) */
        const char *ls = dl;
        while (ls > t && ls[-1] != '\n')
            ls--;
        const char *le = line_end(dl, end);
        while (le < end && (*le == ' ' || *le == '\t')) {
            const char *n2 = line_end(le, end);
            if (blank_line(le, line_len(le, n2)))
                break;
            le = n2;
        }
        size_t o = 0;
        bool sp = false;
        for (const char *p = ls; p < le && o + 1 < sizeof(rc->diag); p++) {
            char c = *p;
            if (c == '\r' || c == '\n' || c == '\t' || c == ' ') {
                sp = o > 0;
                continue;
            }
            if (sp)
                rc->diag[o++] = ' ';
            sp = false;
            if (o + 1 < sizeof(rc->diag))
                rc->diag[o++] = c;
        }
        rc->diag[o] = '\0';
    }
    bool temporary = (rc->status[0] == '4') || (rc->status[0] == '\0' && code / 100 == 4) ||
                     find_ci(t, w->text_len, "will continue trying") != NULL ||
                     find_ci(t, w->text_len, "delayed") != NULL;
    bool permanent = rc->status[0] == '5' || code / 100 == 5 ||
                     find_ci(t, w->text_len, "permanent error") != NULL;
    rc->action = permanent ? FEEDBACK_ACTION_FAILED
                 : temporary ? FEEDBACK_ACTION_DELAYED
                             : FEEDBACK_ACTION_FAILED;
    r->nrcpt = r->nrcpt_seen = rc->addr[0] != '\0' || rc->status[0] != '\0' ? 1 : 0;
    return true;
}

/* ---- automatic replies ---- */

static const char *
autoreply(struct span hdr, const char *subject)
{
    char v[256];
    if (feedback_header(hdr.p, hdr.n, "Auto-Submitted", v, sizeof(v)) >= 0 && !prefix_ci(v, "no"))
        return "auto-submitted";
    if (feedback_header(hdr.p, hdr.n, "X-Autoreply", v, sizeof(v)) >= 0 ||
        feedback_header(hdr.p, hdr.n, "X-Autorespond", v, sizeof(v)) >= 0 ||
        feedback_header(hdr.p, hdr.n, "X-Autoresponder", v, sizeof(v)) >= 0)
        return "x-autoreply";
    if (feedback_header(hdr.p, hdr.n, "Precedence", v, sizeof(v)) >= 0 &&
        prefix_ci(v, "auto_reply"))
        return "precedence";
    if (feedback_header(hdr.p, hdr.n, "X-Auto-Response-Suppress", v, sizeof(v)) >= 0 &&
        feedback_header(hdr.p, hdr.n, "X-MS-Exchange-Inbox-Rules-Loop", v, sizeof(v)) >= 0)
        return "exchange-rule";
    static const char *const subj[] = {"auto:",          "automatic reply",  "autoreply",
                                       "auto-reply",     "auto reply",       "out of office",
                                       "out of the office", "vacation",      "abwesenheit",
                                       "away from",      NULL};
    size_t sl = strlen(subject);
    for (unsigned i = 0; subj[i] != NULL; i++) {
        const char *m = find_ci(subject, sl, subj[i]);
        /* at the start, or after "Re: " and the like */
        if (m != NULL && (size_t)(m - subject) <= 8)
            return "subject";
    }
    return NULL;
}

/* ---- the whole message ---- */

int
feedback_parse(const char *msg, size_t len, const char *verp_prefix, struct feedback_result *out)
{
    memset(out, 0, sizeof(*out));
    struct walk w = {.r = out, .verp_prefix = verp_prefix};
    w.verp_prefix_len = verp_prefix ? strlen(verp_prefix) : 0;
    w.text = malloc(FEEDBACK_TEXT_MAX);
    if (w.text == NULL)
        return -ENOMEM;
    if (len > FEEDBACK_PARSE_MAX) {
        len = FEEDBACK_PARSE_MAX;
        out->truncated = 1;
    }
    struct span m = {msg, len}, hdr, body;
    split(m, &hdr, &body);
    char v[1024];
    if (feedback_header(hdr.p, hdr.n, "From", v, sizeof(v)) >= 0)
        copy_cut(out->from, sizeof(out->from), v, strlen(v));
    if (feedback_header(hdr.p, hdr.n, "Subject", v, sizeof(v)) >= 0)
        copy_cut(out->subject, sizeof(out->subject), v, strlen(v));

    walk_entity(&w, m, 0);
    struct ctype ct;
    ctype_of(hdr, &ct);
    if (strncmp(ct.type, "multipart/", 10) != 0 && strncmp(ct.type, "text/", 5) == 0)
        text_add(&w, body, ct.cte); /* a single-part message: its body is the text */

    if (w.have_arf || strcmp(w.report_type, "feedback-report") == 0) {
        out->kind = FEEDBACK_ARF;
        out->nrcpt = 0; /* no recipient blocks in a feedback report */
    } else if (w.have_dsn && out->nrcpt_seen > 0) {
        out->kind = FEEDBACK_DSN;
    } else if (nonstandard_bounce(&w)) {
        out->kind = FEEDBACK_BOUNCE;
    } else {
        const char *why = autoreply(hdr, out->subject);
        if (why != NULL) {
            out->kind = FEEDBACK_AUTOREPLY;
            copy_cut(out->autoreply_why, sizeof(out->autoreply_why), why, strlen(why));
        }
    }
    /* the report's own recipient: where the original's sender pointed */
    if (feedback_header(hdr.p, hdr.n, "To", v, sizeof(v)) >= 0)
        find_verp(&w, v, strlen(v));
    /* a non-standard bounce may quote the original's headers inline */
    if (out->kind == FEEDBACK_BOUNCE) {
        find_verp(&w, w.text, w.text_len);
        if (out->orig_message_id[0] == '\0') {
            const char *mi = find_ci(w.text, w.text_len, "\nMessage-ID:");
            if (mi != NULL) {
                const char *e = line_end(mi + 1, w.text + w.text_len);
                const char *vs = mi + 12;
                while (vs < e && (*vs == ' ' || *vs == '\t'))
                    vs++;
                copy_cut(out->orig_message_id, sizeof(out->orig_message_id), vs,
                         line_len(vs, e));
            }
        }
    }
    free(w.text);
    return 0;
}
