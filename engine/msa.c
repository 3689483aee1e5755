/*
 * msa: see msa.h.
 */
#include "engine/msa.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

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
