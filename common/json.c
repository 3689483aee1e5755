/*
 * json: see json.h.
 */
#include "common/json.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void
json_init(struct json *j)
{
    memset(j, 0, sizeof(*j));
    j->first = 1;
}

void
json_fini(struct json *j)
{
    free(j->buf);
    memset(j, 0, sizeof(*j));
}

void
json_reset(struct json *j)
{
    j->len = 0;
    j->oom = false;
    j->depth = 0;
    j->first = 1;
    if (j->cap > 0)
        j->buf[0] = '\0';
}

static bool
json_room(struct json *j, size_t n)
{
    if (j->oom)
        return false;
    if (j->cap - j->len > n)
        return true;
    size_t cap = j->cap ? j->cap : 256;
    while (cap - j->len <= n) {
        if (cap > SIZE_MAX / 2) {
            j->oom = true;
            return false;
        }
        cap *= 2;
    }
    char *p = realloc(j->buf, cap);
    if (p == NULL) {
        j->oom = true;
        return false;
    }
    j->buf = p;
    j->cap = cap;
    return true;
}

void
json_raw(struct json *j, const char *s, size_t n)
{
    if (!json_room(j, n))
        return;
    memcpy(j->buf + j->len, s, n);
    j->len += n;
    j->buf[j->len] = '\0';
}

static void
json_put(struct json *j, char c)
{
    json_raw(j, &c, 1);
}

/* Before a value or a key at the current depth: a comma unless first. */
static void
json_sep(struct json *j)
{
    uint32_t bit = 1u << (j->depth % 32);
    if (j->first & bit)
        j->first &= ~bit;
    else
        json_put(j, ',');
}

/* A value right after its key takes no comma: json_key cleared it. */
static bool key_pending(const struct json *j);

static void
json_value_sep(struct json *j)
{
    if (!key_pending(j))
        json_sep(j);
}

/* Bit 31 of first marks "a key was written, its value comes next"; the
 * depth never reaches 31 (JSON_DEPTH_MAX). */
#define KEY_PENDING (1u << 31)

static bool
key_pending(const struct json *j)
{
    return (j->first & KEY_PENDING) != 0;
}

static void
json_value_done(struct json *j)
{
    j->first &= ~KEY_PENDING;
}

static void
json_open(struct json *j, char c)
{
    json_value_sep(j);
    json_value_done(j);
    json_put(j, c);
    if (j->depth + 1 < JSON_DEPTH_MAX)
        j->depth++;
    j->first |= 1u << j->depth;
}

static void
json_close(struct json *j, char c)
{
    if (j->depth > 0)
        j->depth--;
    json_put(j, c);
}

void json_obj_begin(struct json *j) { json_open(j, '{'); }
void json_obj_end(struct json *j) { json_close(j, '}'); }
void json_arr_begin(struct json *j) { json_open(j, '['); }
void json_arr_end(struct json *j) { json_close(j, ']'); }

size_t
json_utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t min, cp;
    if (c < 0x80)
        return 1;
    if ((c & 0xe0) == 0xc0) {
        len = 2, min = 0x80, cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
        len = 3, min = 0x800, cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
        len = 4, min = 0x10000, cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

static void
json_escaped(struct json *j, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    json_put(j, '"');
    size_t run = 0; /* octets copied as they are, pending */
    for (size_t i = 0; i < n;) {
        unsigned char c = p[i];
        if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
            run++;
            i++;
            continue;
        }
        if (c >= 0x80) {
            size_t l = json_utf8_len(p + i, n - i);
            if (l > 0) {
                run += l;
                i += l;
                continue;
            }
        }
        json_raw(j, (const char *)p + i - run, run);
        run = 0;
        char e[8];
        size_t el = 2;
        e[0] = '\\';
        switch (c) {
        case '"': e[1] = '"'; break;
        case '\\': e[1] = '\\'; break;
        case '\n': e[1] = 'n'; break;
        case '\r': e[1] = 'r'; break;
        case '\t': e[1] = 't'; break;
        default:
            if (c < 0x20) {
                memcpy(e, "\\u00", 4);
                e[4] = hex[c >> 4];
                e[5] = hex[c & 15];
                el = 6;
            } else {
                memcpy(e, "\\ufffd", 6); /* not UTF-8 */
                el = 6;
            }
        }
        json_raw(j, e, el);
        i++;
    }
    json_raw(j, (const char *)p + n - run, run);
    json_put(j, '"');
}

void
json_key(struct json *j, const char *key)
{
    json_sep(j);
    json_escaped(j, key, strlen(key));
    json_put(j, ':');
    j->first |= KEY_PENDING;
}

void
json_strn(struct json *j, const char *s, size_t n)
{
    json_value_sep(j);
    json_value_done(j);
    json_escaped(j, s, n);
}

void
json_str(struct json *j, const char *s)
{
    if (s == NULL)
        json_null(j);
    else
        json_strn(j, s, strlen(s));
}

static void
json_lit(struct json *j, const char *s, size_t n)
{
    json_value_sep(j);
    json_value_done(j);
    json_raw(j, s, n);
}

void
json_u64(struct json *j, uint64_t v)
{
    char b[24];
    int n = snprintf(b, sizeof(b), "%llu", (unsigned long long)v);
    json_lit(j, b, (size_t)n);
}

void
json_i64(struct json *j, int64_t v)
{
    char b[24];
    int n = snprintf(b, sizeof(b), "%lld", (long long)v);
    json_lit(j, b, (size_t)n);
}

void
json_double(struct json *j, double v)
{
    if (!isfinite(v)) {
        json_null(j);
        return;
    }
    char b[40];
    int n = snprintf(b, sizeof(b), "%.6g", v);
    json_lit(j, b, (size_t)n);
}

void json_bool(struct json *j, bool v) { json_lit(j, v ? "true" : "false", v ? 4 : 5); }
void json_null(struct json *j) { json_lit(j, "null", 4); }

size_t
json_format_time(char *out, size_t outcap, uint64_t unix_ms)
{
    time_t t = (time_t)(unix_ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    int n = snprintf(out, outcap, "%04d-%02d-%02dT%02d:%02d:%02d.%03uZ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     (unsigned)(unix_ms % 1000));
    return n < 0 ? 0 : (size_t)n;
}

void
json_time_ms(struct json *j, uint64_t unix_ms)
{
    char b[40];
    size_t n = json_format_time(b, sizeof(b), unix_ms);
    json_strn(j, b, n);
}

void json_kstr(struct json *j, const char *key, const char *s) { json_key(j, key); json_str(j, s); }
void json_ku64(struct json *j, const char *key, uint64_t v) { json_key(j, key); json_u64(j, v); }
void json_kbool(struct json *j, const char *key, bool v) { json_key(j, key); json_bool(j, v); }
