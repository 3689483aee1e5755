/*
 * msa: see msa.h.
 */
#include "engine/msa.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/conf.h"

static bool
field_is(const char *line, size_t len, const char *name)
{
    size_t n = strlen(name);
    if (len <= n || line[n] != ':')
        return false;
    return strncasecmp(line, name, n) == 0;
}

void
msa_scan(const char *msg, size_t len, struct msa_scan *out)
{
    memset(out, 0, sizeof(*out));
    size_t off = 0;
    while (off < len) {
        const char *line = msg + off;
        const char *lf = memchr(line, '\n', len - off);
        size_t llen = lf ? (size_t)(lf - line) : len - off; /* without LF */
        size_t content = llen > 0 && line[llen - 1] == '\r' ? llen - 1 : llen;
        if (content == 0)
            break; /* the empty line: end of the header section */
        if (off == 0 && (line[0] == ' ' || line[0] == '\t'))
            break; /* a continuation of nothing: the body */
        if (line[0] != ' ' && line[0] != '\t') {
            const char *colon = memchr(line, ':', content);
            if (colon == NULL)
                break; /* not a header field: the body began without an empty line */
            if (field_is(line, content, "Message-ID"))
                out->has_message_id = true;
            else if (field_is(line, content, "Date"))
                out->has_date = true;
        }
        off += lf ? llen + 1 : llen;
        out->header_len = off;
    }
    size_t h = out->header_len;
    out->no_separator = h < len && (len - h < 2 || msg[h] != '\r' || msg[h + 1] != '\n');
}

/* Copy s keeping what is safe inside a comment of a header field. */
static void
sanitize(const char *s, char *out, size_t cap)
{
    size_t o = 0;
    for (; s && *s && o + 1 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        out[o++] = (c > 32 && c < 127 && c != '(' && c != ')' && c != '\\') ? (char)c : '_';
    }
    out[o] = '\0';
}

size_t
msa_headers(const struct msa_trace *t, char *out, size_t cap)
{
    char helo[80], date[64], rcpt[300];
    struct tm tm;
    sanitize(t->helo, helo, sizeof(helo));
    gmtime_r(&t->now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
    rcpt[0] = '\0';
    if (t->rcpt != NULL) {
        char clean[260];
        size_t o = 0;
        for (const char *c = t->rcpt; *c && o + 1 < sizeof(clean); c++)
            clean[o++] = (*c == '\r' || *c == '\n' || *c == '<' || *c == '>') ? '_' : *c;
        clean[o] = '\0';
        snprintf(rcpt, sizeof(rcpt), "\r\n\tfor <%s>", clean);
    }
    int n = snprintf(out, cap,
                     "Received: from %s ([%s])\r\n"
                     "\tby %s (sluice) with %s%s%s%s id %s%s;\r\n"
                     "\t%s\r\n",
                     helo[0] ? helo : "unknown", t->client_ip, t->hostname, t->protocol,
                     t->tls ? " (" : "", t->tls ? t->tls : "", t->tls ? ")" : "", t->queue_id,
                     rcpt, date);
    if (n < 0 || (size_t)n >= cap)
        return 0;
    size_t len = (size_t)n;
    if (t->add_message_id) {
        n = snprintf(out + len, cap - len, "Message-ID: <%s.%lld@%s>\r\n", t->queue_id,
                     (long long)t->now, t->hostname);
        if (n > 0 && (size_t)n < cap - len)
            len += (size_t)n;
    }
    if (t->add_date) {
        n = snprintf(out + len, cap - len, "Date: %s\r\n", date);
        if (n > 0 && (size_t)n < cap - len)
            len += (size_t)n;
    }
    return len;
}

bool
msa_find_field(const char *msg, size_t hdr_len, const char *name, size_t *off, size_t *len,
               const char **val, size_t *vlen)
{
    size_t pos = 0;
    while (pos < hdr_len) {
        const char *line = msg + pos;
        const char *lf = memchr(line, '\n', hdr_len - pos);
        size_t llen = lf ? (size_t)(lf - line) + 1 : hdr_len - pos;
        size_t content = llen;
        while (content > 0 && (line[content - 1] == '\n' || line[content - 1] == '\r'))
            content--;
        if (line[0] != ' ' && line[0] != '\t' && field_is(line, content, name)) {
            size_t end = pos + llen;
            while (end < hdr_len && (msg[end] == ' ' || msg[end] == '\t')) {
                const char *nl = memchr(msg + end, '\n', hdr_len - end);
                end = nl ? (size_t)(nl - msg) + 1 : hdr_len;
            }
            const char *v = line + strlen(name) + 1;
            const char *ve = line + content;
            while (v < ve && (*v == ' ' || *v == '\t'))
                v++;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            *off = pos;
            *len = end - pos;
            *val = v;
            *vlen = (size_t)(ve - v);
            return true;
        }
        pos += llen;
    }
    return false;
}

size_t
msa_unfold(const char *v, size_t n, char *out, size_t cap)
{
    size_t w = 0;
    bool lead = true;
    for (size_t r = 0; r < n && w + 1 < cap; r++) {
        char ch = v[r];
        if (ch == '\r' || ch == '\n' || (lead && (ch == ' ' || ch == '\t')))
            continue;
        lead = false;
        out[w++] = ch;
    }
    while (w > 0 && (out[w - 1] == ' ' || out[w - 1] == '\t'))
        w--;
    out[w] = '\0';
    return w;
}

static int
days_from_civil(int y, unsigned m, unsigned d, int64_t *days)
{
    /* Howard Hinnant's algorithm: days since 1970-01-01. */
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    *days = era * 146097 + (int64_t)doe - 719468;
    return 0;
}

int
msa_parse_expiry(const char *val, size_t vlen, uint64_t now_ms, uint64_t *expire_ms)
{
    char buf[64];
    if (vlen == 0 || vlen >= sizeof(buf))
        return -EINVAL;
    memcpy(buf, val, vlen);
    buf[vlen] = '\0';
    int y;
    unsigned mo, d, h, mi, sec;
    char z;
    int n = 0;
    if (sscanf(buf, "%4d-%2u-%2uT%2u:%2u:%2u%c%n", &y, &mo, &d, &h, &mi, &sec, &z, &n) == 7) {
        if ((z != 'Z' && z != 'z') || buf[n] != '\0' || y < 1970 || mo < 1 || mo > 12 ||
            d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60)
            return -EINVAL;
        int64_t days;
        days_from_civil(y, mo, d, &days);
        *expire_ms = (uint64_t)((days * 86400 + h * 3600 + mi * 60 + sec) * 1000);
        return 0;
    }
    uint64_t ms;
    /* A duration whose end does not fit in 64-bit Unix ms is refused like
     * any other bad value: added, it would wrap to a time just before now,
     * and the message would expire unsent right after its 250. */
    if (conf_parse_duration(buf, &ms) < 0 || ms == 0 || ms > UINT64_MAX - now_ms)
        return -EINVAL;
    *expire_ms = now_ms + ms;
    return 0;
}
