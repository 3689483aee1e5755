/*
 * conf: value parsers and the key-table operations of conf.h.
 * Every parser takes the whole string (surrounding blanks already
 * trimmed by the INI reader) and refuses trailing garbage.
 */
#include "common/conf.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const char *
skip_blank(const char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    return s;
}

int
conf_parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"yes", "true", "on", "1"};
    static const char *const no[] = {"no", "false", "off", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -EINVAL;
}

/* Digits then optional blanks; *end gets the first non-digit. */
static int
parse_digits(const char *s, uint64_t *out, const char **end)
{
    if (!isdigit((unsigned char)*s))
        return -EINVAL;
    uint64_t v = 0;
    while (isdigit((unsigned char)*s)) {
        unsigned d = (unsigned)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -ERANGE;
        v = v * 10 + d;
        s++;
    }
    *out = v;
    *end = skip_blank(s);
    return 0;
}

int
conf_parse_uint(const char *s, uint64_t *out)
{
    const char *end;
    int rc = parse_digits(s, out, &end);
    if (rc < 0)
        return rc;
    return *end == '\0' ? 0 : -EINVAL;
}

static int
mul_checked(uint64_t v, uint64_t m, uint64_t *out)
{
    if (m != 0 && v > UINT64_MAX / m)
        return -ERANGE;
    *out = v * m;
    return 0;
}

int
conf_parse_size(const char *s, uint64_t *out)
{
    const char *end;
    uint64_t v;
    int rc = parse_digits(s, &v, &end);
    if (rc < 0)
        return rc;
    uint64_t mult = 1;
    switch (toupper((unsigned char)*end)) {
    case '\0':
        break;
    case 'K':
        mult = 1ULL << 10;
        break;
    case 'M':
        mult = 1ULL << 20;
        break;
    case 'G':
        mult = 1ULL << 30;
        break;
    case 'T':
        mult = 1ULL << 40;
        break;
    case 'B':
        break;
    default:
        return -EINVAL;
    }
    if (*end != '\0') {
        end++;
        if (mult != 1 && (*end == 'B' || *end == 'b'))
            end++; /* "10MB" */
        if (*skip_blank(end) != '\0')
            return -EINVAL;
    }
    return mul_checked(v, mult, out);
}

int
conf_parse_duration(const char *s, uint64_t *ms)
{
    const char *end;
    uint64_t v;
    int rc = parse_digits(s, &v, &end);
    if (rc < 0)
        return rc;
    uint64_t mult;
    if (*end == '\0' || strcmp(end, "s") == 0 || strcmp(end, "sec") == 0)
        mult = 1000; /* a bare number is seconds, as in Postfix */
    else if (strcmp(end, "ms") == 0)
        mult = 1;
    else if (strcmp(end, "m") == 0 || strcmp(end, "min") == 0)
        mult = 60 * 1000;
    else if (strcmp(end, "h") == 0)
        mult = 3600 * 1000;
    else if (strcmp(end, "d") == 0)
        mult = 86400ULL * 1000;
    else if (strcmp(end, "w") == 0)
        mult = 7 * 86400ULL * 1000;
    else
        return -EINVAL;
    return mul_checked(v, mult, ms);
}

int
conf_parse_rate(const char *s, struct conf_rate *out)
{
    if (strcasecmp(s, "unlimited") == 0 || strcmp(s, "0") == 0) {
        out->count = 0;
        out->per_ms = 1000;
        return 0;
    }
    const char *end;
    uint64_t v;
    int rc = parse_digits(s, &v, &end);
    if (rc < 0)
        return rc;
    if (*end != '/')
        return -EINVAL;
    end = skip_blank(end + 1);
    uint64_t per;
    if (isdigit((unsigned char)*end)) {
        rc = conf_parse_duration(end, &per); /* "100/10s" */
        if (rc < 0)
            return rc;
    } else if (strcmp(end, "s") == 0 || strcmp(end, "sec") == 0 || strcmp(end, "second") == 0) {
        per = 1000;
    } else if (strcmp(end, "m") == 0 || strcmp(end, "min") == 0 || strcmp(end, "minute") == 0) {
        per = 60 * 1000;
    } else if (strcmp(end, "h") == 0 || strcmp(end, "hour") == 0) {
        per = 3600 * 1000;
    } else if (strcmp(end, "d") == 0 || strcmp(end, "day") == 0) {
        per = 86400 * 1000;
    } else {
        return -EINVAL;
    }
    if (v == 0 || v > UINT32_MAX || per == 0 || per > UINT32_MAX)
        return -ERANGE;
    out->count = (uint32_t)v;
    out->per_ms = (uint32_t)per;
    return 0;
}

int
conf_parse_durations(const char *s, struct conf_durations *out)
{
    struct conf_durations d = {0};
    char item[64];
    const char *p = s;
    while (*p != '\0') {
        p = skip_blank(p);
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t'))
            len--;
        if (len == 0 || len >= sizeof(item) || d.n == CONF_MAX_DURATIONS)
            return -EINVAL;
        memcpy(item, p, len);
        item[len] = '\0';
        int rc = conf_parse_duration(item, &d.ms[d.n]);
        if (rc < 0)
            return rc;
        if (d.ms[d.n] == 0)
            return -ERANGE;
        d.n++;
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    if (d.n == 0)
        return -EINVAL;
    *out = d;
    return 0;
}

const char *
conf_type_str(enum conf_type type)
{
    switch (type) {
    case CONF_BOOL:
        return "bool";
    case CONF_UINT:
        return "number";
    case CONF_SIZE:
        return "size";
    case CONF_DURATION:
        return "duration";
    case CONF_RATE:
        return "rate";
    case CONF_STRING:
        return "string";
    case CONF_ENUM:
        return "choice";
    case CONF_DURATIONS:
        return "durations";
    }
    return "?";
}

const struct conf_key *
conf_find(const struct conf_key *keys, const char *name)
{
    for (const struct conf_key *k = keys; k->name != NULL; k++)
        if (strcmp(k->name, name) == 0)
            return k;
    return NULL;
}

#define SUGGEST_MAX 64 /* longer names are not compared */

/* Edit distance of a and b (lengths at most SUGGEST_MAX), case ignored:
 * insertions, deletions, substitutions and swaps of neighbours (optimal
 * string alignment). */
static unsigned
edit_distance(const char *a, size_t la, const char *b, size_t lb)
{
    unsigned d[SUGGEST_MAX + 1][SUGGEST_MAX + 1];
    for (size_t i = 0; i <= la; i++)
        d[i][0] = (unsigned)i;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = (unsigned)j;
    for (size_t i = 1; i <= la; i++)
        for (size_t j = 1; j <= lb; j++) {
            int ca = tolower((unsigned char)a[i - 1]), cb = tolower((unsigned char)b[j - 1]);
            unsigned v = d[i - 1][j - 1] + (ca != cb);
            if (d[i - 1][j] + 1 < v)
                v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v)
                v = d[i][j - 1] + 1;
            if (i > 1 && j > 1 && ca == tolower((unsigned char)b[j - 2]) &&
                tolower((unsigned char)a[i - 2]) == cb && d[i - 2][j - 2] + 1 < v)
                v = d[i - 2][j - 2] + 1;
            d[i][j] = v;
        }
    return d[la][lb];
}

const char *
conf_suggest_name(const char *name, const char *const *cand, size_t n)
{
    size_t ln = strlen(name);
    if (ln == 0 || ln > SUGGEST_MAX)
        return NULL;
    unsigned limit = ln <= 4 ? 1 : ln <= 8 ? 2 : 3;
    const char *best = NULL;
    unsigned bestd = limit + 1;
    for (size_t i = 0; i < n; i++) {
        size_t lc = strlen(cand[i]);
        if (lc > SUGGEST_MAX || (lc > ln ? lc - ln : ln - lc) > limit)
            continue;
        unsigned dist = edit_distance(name, ln, cand[i], lc);
        if (dist < bestd) {
            bestd = dist;
            best = cand[i];
        }
    }
    return best;
}

const char *
conf_suggest(const struct conf_key *keys, const char *name)
{
    const char *names[256];
    size_t n = 0;
    for (const struct conf_key *k = keys; k->name != NULL && n < 256; k++)
        names[n++] = k->name;
    return conf_suggest_name(name, names, n);
}

static void
fmt_size(uint64_t v, char *out, size_t len)
{
    static const char units[] = "KMGT";
    int u = -1;
    while (v != 0 && v % 1024 == 0 && u < 3) {
        v /= 1024;
        u++;
    }
    if (u < 0)
        snprintf(out, len, "%" PRIu64, v);
    else
        snprintf(out, len, "%" PRIu64 "%c", v, units[u]);
}

static void
fmt_duration(uint64_t ms, char *out, size_t len)
{
    static const struct {
        uint64_t ms;
        const char *unit;
    } units[] = {{86400000, "d"}, {3600000, "h"}, {60000, "m"}, {1000, "s"}, {1, "ms"}};
    if (ms == 0) {
        snprintf(out, len, "0s");
        return;
    }
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++)
        if (ms % units[i].ms == 0) {
            snprintf(out, len, "%" PRIu64 "%s", ms / units[i].ms, units[i].unit);
            return;
        }
}

void
conf_format(const struct conf_key *key, const void *obj, char *out, size_t outlen)
{
    const char *p = (const char *)obj + key->offset;
    switch (key->type) {
    case CONF_BOOL:
        snprintf(out, outlen, "%s", *(const bool *)p ? "yes" : "no");
        break;
    case CONF_UINT:
        snprintf(out, outlen, "%u", *(const unsigned *)p);
        break;
    case CONF_SIZE:
        fmt_size(*(const uint64_t *)p, out, outlen);
        break;
    case CONF_DURATION:
        fmt_duration(*(const uint64_t *)p, out, outlen);
        break;
    case CONF_RATE: {
        const struct conf_rate *r = (const struct conf_rate *)p;
        if (r->count == 0) {
            snprintf(out, outlen, "unlimited");
        } else {
            char d[32];
            fmt_duration(r->per_ms, d, sizeof(d));
            snprintf(out, outlen, "%u/%s", r->count,
                     strcmp(d, "1s") == 0   ? "s"
                     : strcmp(d, "1m") == 0 ? "min"
                     : strcmp(d, "1h") == 0 ? "h"
                     : strcmp(d, "1d") == 0 ? "d"
                                            : d);
        }
        break;
    }
    case CONF_STRING: {
        const char *s = *(char *const *)p;
        snprintf(out, outlen, "%s", s ? s : "");
        break;
    }
    case CONF_ENUM:
        snprintf(out, outlen, "%s", key->choices[*(const int *)p]);
        break;
    case CONF_DURATIONS: {
        const struct conf_durations *d = (const struct conf_durations *)p;
        size_t off = 0;
        out[0] = '\0';
        for (uint32_t i = 0; i < d->n && off < outlen; i++) {
            char one[32];
            fmt_duration(d->ms[i], one, sizeof(one));
            int n = snprintf(out + off, outlen - off, "%s%s", i ? ", " : "", one);
            if (n < 0)
                break;
            off += (size_t)n;
        }
        break;
    }
    }
}

static void
fmt_bound(enum conf_type type, uint64_t v, char *out, size_t len)
{
    if (type == CONF_SIZE)
        fmt_size(v, out, len);
    else if (type == CONF_DURATION)
        fmt_duration(v, out, len);
    else
        snprintf(out, len, "%" PRIu64, v);
}

void
conf_format_range(const struct conf_key *k, char *out, size_t outlen)
{
    out[0] = '\0';
    if (k->type == CONF_UINT || k->type == CONF_SIZE || k->type == CONF_DURATION) {
        char lo[32], hi[32] = "";
        fmt_bound(k->type, k->min, lo, sizeof(lo));
        if (k->max != 0)
            fmt_bound(k->type, k->max, hi, sizeof(hi));
        snprintf(out, outlen, "%s..%s", lo, hi);
    } else if (k->type == CONF_STRING) {
        snprintf(out, outlen, "up to %llu characters",
                 (unsigned long long)(k->max ? k->max : 4096));
    } else if (k->type == CONF_ENUM) {
        size_t off = 0;
        for (int i = 0; k->choices[i] != NULL && off < outlen; i++)
            off += (size_t)snprintf(out + off, outlen - off, "%s%s", i ? ", " : "", k->choices[i]);
    }
}

static int
set_value(const struct conf_key *k, void *obj, const char *value, char *err, size_t errlen)
{
    char *p = (char *)obj + k->offset;
    uint64_t v = 0;
    int rc = 0;
    const char *expect = "";
    switch (k->type) {
    case CONF_BOOL:
        rc = conf_parse_bool(value, (bool *)p);
        expect = "yes or no";
        break;
    case CONF_UINT:
        rc = conf_parse_uint(value, &v);
        expect = "a whole number";
        break;
    case CONF_SIZE:
        rc = conf_parse_size(value, &v);
        expect = "a size like 512K, 10M or 2G";
        break;
    case CONF_DURATION:
        rc = conf_parse_duration(value, &v);
        expect = "a duration like 250ms, 30s, 5m, 2h or 3d";
        break;
    case CONF_RATE:
        rc = conf_parse_rate(value, (struct conf_rate *)p);
        expect = "a rate like 50/s, 3000/min, 100/h, 20000/d, 100/10s, or unlimited";
        break;
    case CONF_DURATIONS:
        rc = conf_parse_durations(value, (struct conf_durations *)p);
        expect = "a list of durations like 5m, 10m, 1h";
        break;
    case CONF_STRING: {
        size_t max = k->max ? k->max : 4096;
        size_t len = strlen(value);
        if (len > max) {
            snprintf(err, errlen, "longer than %zu characters", max);
            return -EINVAL;
        }
        if (len < k->min) {
            snprintf(err, errlen, "must not be empty");
            return -EINVAL;
        }
        char *copy = strdup(value);
        if (copy == NULL) {
            snprintf(err, errlen, "out of memory");
            return -ENOMEM;
        }
        free(*(char **)p);
        *(char **)p = copy;
        return 0;
    }
    case CONF_ENUM:
        for (int i = 0; k->choices[i] != NULL; i++)
            if (strcasecmp(value, k->choices[i]) == 0) {
                *(int *)p = i;
                return 0;
            }
        {
            size_t off = (size_t)snprintf(err, errlen, "expected one of");
            for (int i = 0; k->choices[i] != NULL && off < errlen; i++)
                off += (size_t)snprintf(err + off, errlen - off, "%s %s", i ? "," : "",
                                        k->choices[i]);
            if (off < errlen)
                snprintf(err + off, errlen - off, "; got '%s'", value);
        }
        return -EINVAL;
    }
    if (rc < 0) {
        if (rc == -ERANGE)
            snprintf(err, errlen, "out of range: '%s'", value);
        else
            snprintf(err, errlen, "expected %s, got '%s'", expect, value);
        return -EINVAL;
    }
    if (k->type == CONF_UINT || k->type == CONF_SIZE || k->type == CONF_DURATION) {
        if (v < k->min || (k->max != 0 && v > k->max)) {
            char range[160];
            conf_format_range(k, range, sizeof(range));
            snprintf(err, errlen, "'%s' is out of range %s", value, range);
            return -EINVAL;
        }
        if (k->type == CONF_UINT)
            *(unsigned *)p = (unsigned)v;
        else
            *(uint64_t *)p = v;
    }
    return 0;
}

int
conf_set(const struct conf_key *keys, void *obj, const char *name, const char *value, char *err,
         size_t errlen)
{
    const struct conf_key *k = conf_find(keys, name);
    if (k == NULL)
        return -ENOENT;
    return set_value(k, obj, value, err, errlen);
}

int
conf_defaults(const struct conf_key *keys, void *obj, char *err, size_t errlen)
{
    for (const struct conf_key *k = keys; k->name != NULL; k++) {
        if (k->def == NULL)
            continue;
        char why[256];
        if (set_value(k, obj, k->def, why, sizeof(why)) < 0) {
            snprintf(err, errlen, "default of %s: %s", k->name, why);
            return -EINVAL;
        }
    }
    return 0;
}

void
conf_free(const struct conf_key *keys, void *obj)
{
    for (const struct conf_key *k = keys; k->name != NULL; k++) {
        if (k->type != CONF_STRING)
            continue;
        char **p = (char **)((char *)obj + k->offset);
        free(*p);
        *p = NULL;
    }
}

int
conf_copy(const struct conf_key *keys, void *dst, const void *src, size_t size)
{
    memcpy(dst, src, size);
    for (const struct conf_key *k = keys; k->name != NULL; k++) {
        if (k->type != CONF_STRING)
            continue;
        char **p = (char **)((char *)dst + k->offset);
        if (*p != NULL && (*p = strdup(*p)) == NULL) {
            /* Leave dst freeable: null the strings not yet copied. */
            for (const struct conf_key *r = k; r->name != NULL; r++)
                if (r->type == CONF_STRING)
                    *(char **)((char *)dst + r->offset) = NULL;
            conf_free(keys, dst);
            return -ENOMEM;
        }
    }
    return 0;
}
