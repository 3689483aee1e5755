/*
 * redis_url: see redis_url.h. The userinfo is found by trying each '@',
 * the last first, and keeping the first whose remainder is a valid
 * HOST[:PORT][/PATH] for the kind of URL; then the URL without userinfo.
 * For [redis] url that is the last '@' (its path is a database number),
 * for a sink the last '@' with a '/' after it (its stream may hold '@').
 *
 * Threading: none of its own.
 */
#include "engine/redis_url.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static int
hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decode n octets at s into out (REDIS_URL_PART_MAX + 1). */
static int
decode(const char *s, size_t n, char *out, const char *what, char *err, size_t errlen)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            int hi = i + 2 < n ? hexval(s[i + 1]) : -1;
            int lo = i + 2 < n ? hexval(s[i + 2]) : -1;
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
                snprintf(err, errlen,
                         "bad percent-escape in the %s (%%XX with two hex digits, not %%00; "
                         "write a '%%' as %%25)",
                         what);
                return -EINVAL;
            }
            c = (char)(hi * 16 + lo);
            i += 2;
        }
        if (o == REDIS_URL_PART_MAX) {
            snprintf(err, errlen, "%s longer than %d octets", what, REDIS_URL_PART_MAX);
            return -EINVAL;
        }
        out[o++] = c;
    }
    out[o] = '\0';
    return 0;
}

static bool
host_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_';
}

/* HOST[:PORT][/PATH] at s (to the end of the string) into out. */
static int
split_hostpart(const char *s, enum redis_url_kind kind, struct redis_url *out, char *err,
               size_t errlen)
{
    const char *h = s, *hend;
    if (*s == '[') {
        h = s + 1;
        hend = strchr(h, ']');
        if (hend == NULL) {
            snprintf(err, errlen, "'[' of an IPv6 address without its ']'");
            return -EINVAL;
        }
        bool colon = memchr(h, ':', (size_t)(hend - h)) != NULL;
        for (const char *x = h; x < hend; x++)
            if (!colon || (hexval(*x) < 0 && *x != ':' && *x != '.' && *x != '%')) {
                snprintf(err, errlen, "bad IPv6 address in [brackets]");
                return -EINVAL;
            }
        s = hend + 1;
    } else {
        hend = s;
        while (host_char(*hend))
            hend++;
        s = hend;
        if (*s != '\0' && *s != ':' && *s != '/') {
            /* no character quoted: after an '@' it may be the password's */
            snprintf(err, errlen, "bad host: a character where a host name's characters, ':' "
                                  "or '/' go");
            return -EINVAL;
        }
    }
    size_t hn = (size_t)(hend - h);
    if (hn == 0) {
        snprintf(err, errlen, "no host");
        return -EINVAL;
    }
    if (hn > REDIS_URL_PART_MAX) {
        snprintf(err, errlen, "host longer than %d octets", REDIS_URL_PART_MAX);
        return -EINVAL;
    }
    memcpy(out->host, h, hn);
    out->host[hn] = '\0';
    out->port = 6379;
    if (*s == ':') {
        const char *p = ++s;
        long v = 0;
        while (*s >= '0' && *s <= '9' && v <= 65535)
            v = v * 10 + (*s++ - '0');
        if (s == p || v < 1 || v > 65535 || (*s != '\0' && *s != '/')) {
            snprintf(err, errlen, "bad port (1 to 65535)");
            return -EINVAL;
        }
        out->port = (int)v;
    } else if (*s != '\0' && *s != '/') {
        snprintf(err, errlen, "unexpected character after the host");
        return -EINVAL;
    }
    out->path[0] = '\0';
    if (*s == '/') {
        size_t pn = strlen(s + 1);
        if (pn > REDIS_URL_PART_MAX) {
            snprintf(err, errlen, "path longer than %d octets", REDIS_URL_PART_MAX);
            return -EINVAL;
        }
        memcpy(out->path, s + 1, pn + 1);
    }
    if (kind == REDIS_URL_STREAM && out->path[0] == '\0') {
        snprintf(err, errlen, "no /STREAM after the host");
        return -EINVAL;
    }
    return 0;
}

/* The userinfo of n octets at s into out. */
static int
split_userinfo(const char *s, size_t n, struct redis_url *out, char *err, size_t errlen)
{
    const char *colon = memchr(s, ':', n);
    if (colon == NULL)
        return decode(s, n, out->password, "password", err, errlen);
    int rc = decode(s, (size_t)(colon - s), out->user, "user", err, errlen);
    if (rc == 0)
        rc = decode(colon + 1, n - (size_t)(colon + 1 - s), out->password, "password", err, errlen);
    return rc;
}

int
redis_url_split(const char *url, enum redis_url_kind kind, struct redis_url *out, char *err,
                size_t errlen)
{
    memset(out, 0, sizeof(*out));
    const char *s = url;
    if (strncasecmp(s, "redis://", 8) == 0) {
        s += 8;
    } else if (strncasecmp(s, "rediss://", 9) == 0 || strncasecmp(s, "unix://", 7) == 0) {
        snprintf(err, errlen, "only redis:// is supported (not TLS, not a unix socket)");
        return -EINVAL;
    } else if (kind == REDIS_URL_STREAM || strstr(s, "://") != NULL) {
        snprintf(err, errlen, "expected redis://");
        return -EINVAL;
    }
    /* The last '@' first: the longest userinfo whose remainder is valid. */
    char first_err[200] = "";
    for (const char *at = strrchr(s, '@'); at != NULL;) {
        char e[200];
        struct redis_url u;
        memset(&u, 0, sizeof(u));
        if (split_hostpart(at + 1, kind, &u, e, sizeof(e)) == 0) {
            int rc = split_userinfo(s, (size_t)(at - s), &u, err, errlen);
            if (rc < 0)
                return rc;
            *out = u;
            return 0;
        }
        if (first_err[0] == '\0')
            snprintf(first_err, sizeof(first_err), "after the last '@': %.170s", e);
        const char *prev = NULL;
        for (const char *x = s; x < at; x++)
            if (*x == '@')
                prev = x;
        at = prev;
    }
    char e[200];
    if (split_hostpart(s, kind, out, e, sizeof(e)) == 0)
        return 0;
    snprintf(err, errlen, "%s", first_err[0] != '\0' ? first_err : e);
    memset(out, 0, sizeof(*out));
    return -EINVAL;
}
