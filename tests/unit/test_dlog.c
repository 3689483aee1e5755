/*
 * test_dlog: the delivery log writes every event as exactly one line of
 * valid JSON, whatever bytes it is given, from several threads at once;
 * keeps each line whole across a rename + reopen; flushes on its
 * interval and at close, and at a crash or a stop given up (each line
 * once); counts write errors and drops instead of growing when the disk
 * fails.
 *
 * Lines are checked with a small strict JSON validator written here
 * (RFC 8259: structure, string escapes, no raw controls, valid UTF-8).
 * Waits are bounded polls of the file or the counters, never blind sleeps.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/json.h"
#include "common/log.h"
#include "engine/dlog.h"

/* ---- a strict JSON validator ---- */

struct jv {
    const unsigned char *p, *end;
    int depth;
};

static bool jv_value(struct jv *v);

static void
jv_ws(struct jv *v)
{
    while (v->p < v->end && (*v->p == ' ' || *v->p == '\t' || *v->p == '\n' || *v->p == '\r'))
        v->p++;
}

static bool
jv_lit(struct jv *v, const char *s)
{
    size_t n = strlen(s);
    if ((size_t)(v->end - v->p) < n || memcmp(v->p, s, n) != 0)
        return false;
    v->p += n;
    return true;
}

static bool
jv_utf8(struct jv *v)
{
    unsigned char c = *v->p;
    size_t len;
    uint32_t cp, min;
    if ((c & 0xe0) == 0xc0)
        len = 2, cp = c & 0x1f, min = 0x80;
    else if ((c & 0xf0) == 0xe0)
        len = 3, cp = c & 0x0f, min = 0x800;
    else if ((c & 0xf8) == 0xf0)
        len = 4, cp = c & 0x07, min = 0x10000;
    else
        return false;
    if ((size_t)(v->end - v->p) < len)
        return false;
    for (size_t i = 1; i < len; i++) {
        if ((v->p[i] & 0xc0) != 0x80)
            return false;
        cp = (cp << 6) | (v->p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return false;
    v->p += len;
    return true;
}

static bool
jv_string(struct jv *v)
{
    if (v->p >= v->end || *v->p != '"')
        return false;
    v->p++;
    while (v->p < v->end) {
        unsigned char c = *v->p;
        if (c == '"') {
            v->p++;
            return true;
        }
        if (c < 0x20)
            return false;
        if (c == '\\') {
            v->p++;
            if (v->p >= v->end)
                return false;
            c = *v->p++;
            if (c == 'u') {
                for (int i = 0; i < 4; i++, v->p++)
                    if (v->p >= v->end || !strchr("0123456789abcdefABCDEF", *v->p) || *v->p == 0)
                        return false;
            } else if (!strchr("\"\\/bfnrt", c) || c == 0) {
                return false;
            }
            continue;
        }
        if (c >= 0x80) {
            if (!jv_utf8(v))
                return false;
            continue;
        }
        v->p++;
    }
    return false;
}

static bool
jv_number(struct jv *v)
{
    const unsigned char *s = v->p;
    if (v->p < v->end && *v->p == '-')
        v->p++;
    if (v->p >= v->end)
        return false;
    if (*v->p == '0') {
        v->p++;
    } else if (*v->p >= '1' && *v->p <= '9') {
        while (v->p < v->end && *v->p >= '0' && *v->p <= '9')
            v->p++;
    } else {
        return false;
    }
    if (v->p < v->end && *v->p == '.') {
        v->p++;
        if (v->p >= v->end || *v->p < '0' || *v->p > '9')
            return false;
        while (v->p < v->end && *v->p >= '0' && *v->p <= '9')
            v->p++;
    }
    if (v->p < v->end && (*v->p == 'e' || *v->p == 'E')) {
        v->p++;
        if (v->p < v->end && (*v->p == '+' || *v->p == '-'))
            v->p++;
        if (v->p >= v->end || *v->p < '0' || *v->p > '9')
            return false;
        while (v->p < v->end && *v->p >= '0' && *v->p <= '9')
            v->p++;
    }
    return v->p > s;
}

static bool
jv_container(struct jv *v, char open, char close)
{
    if (++v->depth > 64)
        return false;
    v->p++; /* open */
    (void)open;
    jv_ws(v);
    if (v->p < v->end && *v->p == close) {
        v->p++;
        v->depth--;
        return true;
    }
    for (;;) {
        jv_ws(v);
        if (close == '}') {
            if (!jv_string(v))
                return false;
            jv_ws(v);
            if (v->p >= v->end || *v->p != ':')
                return false;
            v->p++;
            jv_ws(v);
        }
        if (!jv_value(v))
            return false;
        jv_ws(v);
        if (v->p >= v->end)
            return false;
        if (*v->p == ',') {
            v->p++;
            continue;
        }
        if (*v->p == close) {
            v->p++;
            v->depth--;
            return true;
        }
        return false;
    }
}

static bool
jv_value(struct jv *v)
{
    jv_ws(v);
    if (v->p >= v->end)
        return false;
    switch (*v->p) {
    case '{':
        return jv_container(v, '{', '}');
    case '[':
        return jv_container(v, '[', ']');
    case '"':
        return jv_string(v);
    case 't':
        return jv_lit(v, "true");
    case 'f':
        return jv_lit(v, "false");
    case 'n':
        return jv_lit(v, "null");
    default:
        return jv_number(v);
    }
}

/* True when s[0..n) is exactly one JSON object and nothing else. */
static bool
json_object_valid(const char *s, size_t n)
{
    struct jv v = {(const unsigned char *)s, (const unsigned char *)s + n, 0};
    jv_ws(&v);
    if (v.p >= v.end || *v.p != '{')
        return false;
    if (!jv_value(&v))
        return false;
    jv_ws(&v);
    return v.p == v.end;
}

static void
test_validator_rejects(void **state)
{
    (void)state;
    /* The validator must be able to fail, or the tests below prove nothing. */
    static const char *const bad[] = {
        "{",
        "{\"a\":}",
        "{\"a\":1,}",
        "{\"a\" 1}",
        "{\"a\":\"x\ny\"}",
        "{\"a\":\"\\x\"}",
        "{\"a\":\"\xff\"}",
        "{\"a\":\"\xc0\xaf\"}",
        "{\"a\":01}",
        "{\"a\":1}x",
        "[1]",
        "{\"a\":\"\\u12g4\"}",
        "{\"a\":tru}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_false(json_object_valid(bad[i], strlen(bad[i])));
    const char *good = "{\"a\":[1,-2.5e3,true,null,{}],\"b\":\"\\u00e9\xc3\xa9\\n\"}";
    assert_true(json_object_valid(good, strlen(good)));
}

/* ---- helpers ---- */

static char tmpdir[256];

static int
setup_dir(void **state)
{
    (void)state;
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof(tmpdir), "%s/test_dlog.XXXXXX", base != NULL ? base : "/tmp");
    return mkdtemp(tmpdir) == NULL ? -1 : 0;
}

static int
teardown_dir(void **state)
{
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void
tmp_path(char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", tmpdir, name);
}

/* The whole file, NUL-terminated; *len gets its length. NULL if absent. */
static char *
slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        *len = 0;
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    assert_non_null(buf);
    size_t r;
    while ((r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
            assert_non_null(buf);
        }
    }
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

static off_t
file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : -1;
}

static void
nap_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Poll until file_size(path) >= want, for at most ~10 s. */
static bool
wait_size(const char *path, off_t want)
{
    for (int i = 0; i < 2000; i++) {
        if (file_size(path) >= want)
            return true;
        nap_ms(5);
    }
    return false;
}

/* Calls fn(line, len, arg) for each line; asserts the file ends with '\n'. */
static size_t
for_each_line(const char *buf, size_t n, void (*fn)(const char *, size_t, void *), void *arg)
{
    size_t lines = 0, start = 0;
    for (size_t i = 0; i < n; i++) {
        if (buf[i] == '\n') {
            fn(buf + start, i - start, arg);
            lines++;
            start = i + 1;
        }
    }
    assert_int_equal(start, n); /* no partial line at the end */
    return lines;
}

/* The string value of "key" in line (simple: our values used here hold
 * no escapes), copied into out; false when absent. */
static bool
field(const char *line, size_t len, const char *key, char *out, size_t cap)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\":", key);
    const char *p = memmem(line, len, pat, strlen(pat));
    if (p == NULL)
        return false;
    p += strlen(pat);
    const char *end = line + len;
    size_t n = 0;
    if (p < end && *p == '"') {
        p++;
        while (p < end && *p != '"' && n + 1 < cap)
            out[n++] = *p++;
    } else {
        while (p < end && *p != ',' && *p != '}' && n + 1 < cap)
            out[n++] = *p++;
    }
    out[n] = '\0';
    return true;
}

static const char *const hdr_names[] = {"X-Campaign-ID", "X-Tenant-ID"};

static void
fill_delivery(struct dlog_event *ev, char *id, const char *rcpt, const char *const *hvals)
{
    memset(ev, 0, sizeof(*ev));
    ev->kind = DLOG_DELIVERY;
    ev->id = id;
    ev->rcpt = rcpt;
    ev->sender = "bounces@example.net";
    ev->domain = "example.com";
    ev->mx = "mx1.example.com";
    ev->mx_addr = "192.0.2.25";
    ev->source = "198.51.100.7";
    ev->code = 250;
    ev->enhanced = "2.0.0";
    ev->reply = "Ok: queued as 4XyZ";
    ev->attempt = 1;
    ev->classification = "delivered";
    ev->tls_protocol = "TLSv1.3";
    ev->tls_cipher = "TLS_AES_256_GCM_SHA384";
    ev->size = 2048;
    ev->arrival_ms = 1795401230000ULL;
    ev->time_ms = 1795401231123ULL;
    ev->hdr_names = hdr_names;
    ev->hdr_values = hvals;
    ev->nhdr = 2;
}

/* ---- formatting ---- */

static void
test_format_full(void **state)
{
    (void)state;
    struct json j;
    json_init(&j);
    struct dlog_event ev;
    const char *hv[] = {"spring-sale", "t42"};
    fill_delivery(&ev, "0001A2B3C4D5E", "alice@example.com", hv);
    assert_int_equal(dlog_format(&j, &ev, ev.time_ms), 0);
    assert_string_equal(
        j.buf,
        "{\"time\":\"2026-11-23T02:33:51.123Z\",\"event\":\"delivery\",\"id\":\"0001A2B3C4D5E\","
        "\"rcpt\":\"alice@example.com\",\"sender\":\"bounces@example.net\","
        "\"domain\":\"example.com\",\"mx\":\"mx1.example.com\",\"mx_addr\":\"192.0.2.25\","
        "\"source\":\"198.51.100.7\",\"code\":250,\"enhanced\":\"2.0.0\","
        "\"reply\":\"Ok: queued as 4XyZ\",\"attempt\":1,\"class\":\"delivered\","
        "\"tls_protocol\":\"TLSv1.3\",\"tls_cipher\":\"TLS_AES_256_GCM_SHA384\","
        "\"size\":2048,\"queue_time_ms\":1123,"
        "\"headers\":{\"X-Campaign-ID\":\"spring-sale\",\"X-Tenant-ID\":\"t42\"}}\n");
    assert_true(json_object_valid(j.buf, j.len - 1));

    /* A reception: its own fields; absent ones are left out, a NULL
     * header value drops its pair, the null sender stays "". */
    const char *hv2[] = {NULL, "t42"};
    struct dlog_event rx = {.kind = DLOG_RECEPTION,
                            .id = "0001A2B3C4D5E",
                            .sender = "",
                            .size = 512,
                            .rcpt_count = 3,
                            .client = "203.0.113.9",
                            .auth_user = "app1",
                            .hdr_names = hdr_names,
                            .hdr_values = hv2,
                            .nhdr = 2};
    assert_int_equal(dlog_format(&j, &rx, 0), 0);
    assert_string_equal(j.buf, "{\"time\":\"1970-01-01T00:00:00.000Z\",\"event\":\"reception\","
                               "\"id\":\"0001A2B3C4D5E\",\"sender\":\"\",\"size\":512,"
                               "\"rcpt_count\":3,\"client\":\"203.0.113.9\","
                               "\"auth_user\":\"app1\",\"headers\":{\"X-Tenant-ID\":\"t42\"}}\n");

    /* Nothing set but the kind; no header object when no pair is left;
     * an arrival after the event time gives 0, not a wrapped number; a
     * per-recipient outcome has its attempt count, 0 too. */
    const char *hv3[] = {NULL, NULL};
    struct dlog_event bare = {.kind = DLOG_EXPIRATION,
                              .arrival_ms = 5000,
                              .hdr_names = hdr_names,
                              .hdr_values = hv3,
                              .nhdr = 2};
    assert_int_equal(dlog_format(&j, &bare, 4000), 0);
    assert_string_equal(j.buf, "{\"time\":\"1970-01-01T00:00:04.000Z\",\"event\":\"expiration\","
                               "\"attempt\":0,\"queue_time_ms\":0}\n");

    /* A dsn event lists the recipients its DSN reports. */
    const struct dlog_dsn_rcpt dr[] = {{"a@x.example", "failed", "5.1.1"},
                                       {"b\"@x.example", "relayed", "2.0.0"}};
    struct dlog_event dsn = {.kind = DLOG_DSN,
                             .id = "0001A2B3C4D5E",
                             .dsn_id = "0001A2B3C4D5F",
                             .dsn_rcpt = dr,
                             .ndsn_rcpt = 2,
                             .size = 9};
    assert_int_equal(dlog_format(&j, &dsn, 4000), 0);
    assert_string_equal(j.buf, "{\"time\":\"1970-01-01T00:00:04.000Z\",\"event\":\"dsn\","
                               "\"id\":\"0001A2B3C4D5E\",\"dsn_id\":\"0001A2B3C4D5F\","
                               "\"recipients\":[{\"rcpt\":\"a@x.example\",\"action\":\"failed\","
                               "\"status\":\"5.1.1\"},{\"rcpt\":\"b\\\"@x.example\","
                               "\"action\":\"relayed\",\"status\":\"2.0.0\"}],\"size\":9}\n");
    json_fini(&j);

    assert_string_equal(dlog_kind_str(DLOG_TRANSIENT_FAILURE), "transient_failure");
    assert_string_equal(dlog_kind_str(DLOG_BOUNCE), "bounce");
    assert_string_equal(dlog_kind_str(DLOG_DSN), "dsn");
    assert_string_equal(dlog_kind_str((enum dlog_kind)99), "unknown");
}

/* Every byte 0x01..0xff, quotes, backslashes, CR/LF, invalid UTF-8. */
static void
hostile_text(char *buf, size_t cap)
{
    size_t n = 0;
    const char pre[] =
        "550 \"no\" \\ such\r\nuser\x01\x1f\x7f \xc3\x28 \xed\xa0\x80 \xf4\x90\x80\x80 "
        "\xe2\x82 ";
    memcpy(buf, pre, sizeof(pre) - 1);
    n = sizeof(pre) - 1;
    for (int c = 1; c < 256 && n + 1 < cap; c++)
        buf[n++] = (char)c;
    buf[n] = '\0';
}

static void
test_format_hostile(void **state)
{
    (void)state;
    char bad[512];
    hostile_text(bad, sizeof(bad));
    const char *hv[] = {bad, "\"}{\n"};
    const char *hn[] = {"X-\"Evil\nName", "X-Tenant-ID"};
    struct dlog_event ev = {.kind = DLOG_BOUNCE,
                            .id = bad,
                            .rcpt = bad,
                            .sender = bad,
                            .domain = bad,
                            .mx = bad,
                            .mx_addr = bad,
                            .source = bad,
                            .code = 550,
                            .enhanced = bad,
                            .reply = bad,
                            .classification = bad,
                            .tls_protocol = bad,
                            .tls_cipher = bad,
                            .client = bad,
                            .auth_user = bad,
                            .hdr_names = hn,
                            .hdr_values = hv,
                            .nhdr = 2};
    struct json j;
    json_init(&j);
    assert_int_equal(dlog_format(&j, &ev, 1795401231123ULL), 0);
    assert_true(j.len > 1);
    assert_int_equal(j.buf[j.len - 1], '\n');
    assert_null(memchr(j.buf, '\n', j.len - 1));
    assert_null(memchr(j.buf, '\r', j.len));
    assert_true(json_object_valid(j.buf, j.len - 1));

    /* A field longer than DLOG_FIELD_MAX is cut, and still valid even
     * when the cut falls inside a UTF-8 sequence. */
    size_t big = DLOG_FIELD_MAX * 3;
    char *huge = malloc(big + 1);
    assert_non_null(huge);
    for (size_t i = 0; i < big; i += 2)
        memcpy(huge + i, "\xc3\xa9", 2);
    huge[DLOG_FIELD_MAX - 1] = '\xc3'; /* the last octet kept opens a sequence */
    huge[big] = '\0';
    struct dlog_event ev2 = {.kind = DLOG_BOUNCE, .reply = huge};
    assert_int_equal(dlog_format(&j, &ev2, 1), 0);
    assert_true(json_object_valid(j.buf, j.len - 1));
    assert_true(j.len < DLOG_FIELD_MAX + 200);
    free(huge);
    json_fini(&j);
}

/* ---- the whole path: threads, file ---- */

#define NTHREADS   4
#define PER_THREAD 20000

struct producer {
    struct dlog *log;
    int t;
    unsigned count; /* fixed count, or 0: until *stop */
    atomic_bool *stop;
    unsigned written;  /* out */
    const char *reply; /* optional */
};

static void *
produce(void *arg)
{
    struct producer *p = arg;
    struct dlog_writer *w = dlog_writer_new(p->log);
    assert_non_null(w);
    char id[32], rcpt[64], camp[32];
    const char *hv[] = {camp, "tenant-7"};
    struct dlog_event ev;
    for (unsigned i = 0; p->count != 0 ? i < p->count : !atomic_load(p->stop); i++) {
        snprintf(id, sizeof(id), "T%d-%07u", p->t, i);
        snprintf(rcpt, sizeof(rcpt), "user%u@example.com", i);
        snprintf(camp, sizeof(camp), "c%u", i % 17);
        fill_delivery(&ev, id, rcpt, hv);
        ev.time_ms = 0; /* now */
        ev.kind = (enum dlog_kind)(i % 6);
        if (p->reply != NULL)
            ev.reply = p->reply;
        dlog_event(w, &ev);
        p->written = i + 1;
    }
    dlog_writer_free(w);
    return NULL;
}

struct seen {
    unsigned char *bits[NTHREADS]; /* one per (thread, index) */
    unsigned max;
    long last[NTHREADS]; /* last index per thread in this file: order check */
    size_t lines;
    const char *reply; /* expected text of "reply", when set */
};

static void
check_line(const char *line, size_t len, void *arg)
{
    struct seen *s = arg;
    assert_true(json_object_valid(line, len));
    char v[256];
    assert_true(field(line, len, "time", v, sizeof(v)));
    assert_int_equal(strlen(v), 24);
    assert_int_equal(v[10], 'T');
    assert_int_equal(v[23], 'Z');
    assert_true(field(line, len, "event", v, sizeof(v)));
    assert_true(field(line, len, "rcpt", v, sizeof(v)));
    assert_true(field(line, len, "domain", v, sizeof(v)));
    assert_string_equal(v, "example.com");
    assert_true(field(line, len, "code", v, sizeof(v)));
    assert_string_equal(v, "250");
    assert_true(field(line, len, "X-Tenant-ID", v, sizeof(v)));
    assert_string_equal(v, "tenant-7");
    assert_true(field(line, len, "id", v, sizeof(v)));
    int t;
    unsigned i;
    assert_int_equal(sscanf(v, "T%d-%u", &t, &i), 2);
    assert_true(t >= 0 && t < NTHREADS);
    assert_true(i < s->max);
    assert_int_equal(s->bits[t][i], 0); /* never twice */
    s->bits[t][i] = 1;
    /* One writer's lines stay in the order they were logged. */
    assert_true((long)i > s->last[t]);
    s->last[t] = (long)i;
    s->lines++;
}

static void
seen_init(struct seen *s, unsigned max)
{
    memset(s, 0, sizeof(*s));
    s->max = max;
    for (int t = 0; t < NTHREADS; t++) {
        s->bits[t] = calloc(max, 1);
        assert_non_null(s->bits[t]);
        s->last[t] = -1;
    }
}

static void
seen_fini(struct seen *s)
{
    for (int t = 0; t < NTHREADS; t++)
        free(s->bits[t]);
}

static void
check_file(const char *path, struct seen *s)
{
    size_t n;
    char *buf = slurp(path, &n);
    assert_non_null(buf);
    for (int t = 0; t < NTHREADS; t++)
        s->last[t] = -1;
    for_each_line(buf, n, check_line, s);
    free(buf);
}

static void
test_threads(void **state)
{
    (void)state;
    char path[300], err[256];
    tmp_path(path, sizeof(path), "threads.jsonl");
    struct dlog *d;
    assert_int_equal(dlog_new(path, 50, &d, err, sizeof(err)), 0);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0640);

    pthread_t th[NTHREADS];
    struct producer p[NTHREADS];
    for (int t = 0; t < NTHREADS; t++) {
        p[t] = (struct producer){.log = d, .t = t, .count = PER_THREAD};
        assert_int_equal(pthread_create(&th[t], NULL, produce, &p[t]), 0);
    }
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(th[t], NULL);
    struct dlog_stats ds;
    dlog_stats(d, &ds);
    assert_int_equal(ds.events, NTHREADS * PER_THREAD);
    assert_int_equal(ds.dropped, 0);
    d = dlog_free(d);
    assert_null(d);

    struct seen s;
    seen_init(&s, PER_THREAD);
    check_file(path, &s);
    assert_int_equal(s.lines, NTHREADS * PER_THREAD);
    seen_fini(&s);
}

/* The full path keeps hostile text to one valid line, and a line larger
 * than a buffer (many big headers) arrives whole among small ones. */
static void
test_hostile_file(void **state)
{
    (void)state;
    char path[300], err[256];
    tmp_path(path, sizeof(path), "hostile.jsonl");
    struct dlog *d;
    assert_int_equal(dlog_new(path, 20, &d, err, sizeof(err)), 0);
    struct dlog_writer *w = dlog_writer_new(d);
    assert_non_null(w);

    char bad[512];
    hostile_text(bad, sizeof(bad));
    enum { NH = 24 };
    const char *names[NH], *values[NH];
    char nb[NH][16];
    char *val = malloc(DLOG_FIELD_MAX + 1);
    assert_non_null(val);
    memset(val, 'v', DLOG_FIELD_MAX);
    val[DLOG_FIELD_MAX] = '\0';
    for (int i = 0; i < NH; i++) {
        snprintf(nb[i], sizeof(nb[i]), "X-H%d", i);
        names[i] = nb[i];
        values[i] = val;
    }
    for (int k = 0; k < 30; k++) {
        struct dlog_event ev = {.kind = DLOG_TRANSIENT_FAILURE,
                                .id = "0001A2B3C4D5E",
                                .reply = bad,
                                .mx = bad,
                                .code = 451};
        if (k % 10 == 5) {
            ev.hdr_names = names; /* > DLOG_BUF_SIZE of headers */
            ev.hdr_values = values;
            ev.nhdr = NH;
        }
        dlog_event(w, &ev);
    }
    dlog_writer_free(w);
    dlog_free(d);
    free(val);

    size_t n;
    char *buf = slurp(path, &n);
    assert_non_null(buf);
    size_t lines = 0, big = 0, start = 0;
    for (size_t i = 0; i < n; i++) {
        if (buf[i] != '\n')
            continue;
        assert_true(json_object_valid(buf + start, i - start));
        if (i - start > DLOG_BUF_SIZE)
            big++;
        lines++;
        start = i + 1;
    }
    assert_int_equal(start, n);
    assert_int_equal(lines, 30);
    assert_int_equal(big, 3);
    free(buf);
}

static void
test_reopen(void **state)
{
    (void)state;
    char path[300], old[300], err[256];
    tmp_path(path, sizeof(path), "rot.jsonl");
    tmp_path(old, sizeof(old), "rot.jsonl.1");
    struct dlog *d;
    assert_int_equal(dlog_new(path, 10, &d, err, sizeof(err)), 0);

    atomic_bool stop;
    atomic_init(&stop, false);
    pthread_t th[NTHREADS];
    struct producer p[NTHREADS];
    for (int t = 0; t < NTHREADS; t++) {
        p[t] = (struct producer){.log = d, .t = t, .stop = &stop};
        assert_int_equal(pthread_create(&th[t], NULL, produce, &p[t]), 0);
    }
    /* Lines reach the first file, then rotate under the writers' feet. */
    assert_true(wait_size(path, 100000));
    assert_int_equal(rename(path, old), 0);
    dlog_reopen(d);
    assert_true(wait_size(path, 100000)); /* the new file fills */
    struct dlog_stats ds;
    dlog_stats(d, &ds);
    assert_int_equal(ds.reopens, 1);
    atomic_store(&stop, true);
    unsigned max = 0;
    for (int t = 0; t < NTHREADS; t++) {
        pthread_join(th[t], NULL);
        if (p[t].written > max)
            max = p[t].written;
    }
    d = dlog_free(d);

    struct seen s;
    seen_init(&s, max);
    check_file(old, &s);
    size_t in_old = s.lines;
    check_file(path, &s);
    assert_true(in_old > 0);
    assert_true(s.lines > in_old);
    /* Together: every line exactly once (check_line refuses twice). */
    size_t total = 0;
    for (int t = 0; t < NTHREADS; t++) {
        total += p[t].written;
        for (unsigned i = 0; i < p[t].written; i++)
            assert_int_equal(s.bits[t][i], 1);
    }
    assert_int_equal(s.lines, total);
    seen_fini(&s);
}

/* A single small line reaches the file on the interval, with the writer
 * still open and its buffer far from full. */
static void
test_interval_flush(void **state)
{
    (void)state;
    char path[300], err[256];
    tmp_path(path, sizeof(path), "interval.jsonl");
    struct dlog *d;
    assert_int_equal(dlog_new(path, 30, &d, err, sizeof(err)), 0);
    struct dlog_writer *w = dlog_writer_new(d);
    struct dlog_event ev = {.kind = DLOG_DSN, .id = "0001A2B3C4D5E", .sender = "a@b.example"};
    dlog_event(w, &ev);
    assert_true(wait_size(path, 10));
    size_t n;
    char *buf = slurp(path, &n);
    assert_non_null(buf);
    assert_true(n > 10 && buf[n - 1] == '\n');
    assert_true(json_object_valid(buf, n - 1));
    assert_non_null(strstr(buf, "\"event\":\"dsn\""));
    free(buf);
    struct dlog_stats ds;
    for (int i = 0; i < 2000; i++) { /* the counter follows the write */
        dlog_stats(d, &ds);
        if (ds.bytes == n)
            break;
        nap_ms(5);
    }
    assert_int_equal(ds.events, 1);
    assert_int_equal(ds.bytes, n);
    /* A second one, later, also comes without anything else happening. */
    dlog_event(w, &ev);
    assert_true(wait_size(path, (off_t)(2 * n)));
    dlog_writer_free(w);
    dlog_free(d);
}

/* With an interval far longer than the test, only dlog_free can have
 * written the lines. */
static void
test_free_flushes(void **state)
{
    (void)state;
    char path[300], err[256];
    tmp_path(path, sizeof(path), "close.jsonl");
    struct dlog *d;
    assert_int_equal(dlog_new(path, 3600 * 1000, &d, err, sizeof(err)), 0);
    struct dlog_writer *w = dlog_writer_new(d);
    struct dlog_event ev = {.kind = DLOG_EXPIRATION, .id = "0001A2B3C4D5E", .rcpt = "x@y.example"};
    for (int i = 0; i < 10; i++)
        dlog_event(w, &ev);
    assert_int_equal(file_size(path), 0);
    dlog_writer_free(w);
    dlog_free(d);
    size_t n;
    char *buf = slurp(path, &n);
    assert_non_null(buf);
    size_t lines = 0;
    for (size_t i = 0; i < n; i++)
        lines += buf[i] == '\n';
    assert_int_equal(lines, 10);
    free(buf);
}

/* /dev/full fails every write with ENOSPC: errors are counted, the
 * writers never block, and the buffered memory stops at the cap. */
static void
test_write_error(void **state)
{
    (void)state;
    char err[256];
    struct dlog *d;
    if (dlog_new("/dev/full", 10, &d, err, sizeof(err)) != 0) {
        print_message("skipped: %s\n", err);
        skip();
    }
    const size_t cap = 4 * DLOG_BUF_SIZE;
    dlog_set_max_buffered(d, cap);
    struct dlog_writer *w = dlog_writer_new(d);
    char reply[300];
    memset(reply, 'r', sizeof(reply) - 1);
    reply[sizeof(reply) - 1] = '\0';
    struct dlog_event ev = {.kind = DLOG_BOUNCE, .id = "0001A2B3C4D5E", .reply = reply};
    const unsigned total = 20000; /* ~7 MB of lines */
    for (unsigned i = 0; i < total; i++)
        dlog_event(w, &ev);
    struct dlog_stats ds;
    for (int i = 0; i < 2000; i++) {
        dlog_stats(d, &ds);
        if (ds.write_errors >= 2)
            break;
        nap_ms(5);
    }
    assert_true(ds.write_errors >= 2); /* retried, not given up */
    assert_int_equal(ds.bytes, 0);
    assert_int_equal(ds.events + ds.dropped, total);
    assert_true(ds.dropped > 0);
    /* Accepted lines fit in the cap (plus the buffer that hit it). */
    size_t line = 0;
    {
        struct json j;
        json_init(&j);
        dlog_format(&j, &ev, 1795401231123ULL);
        line = j.len;
        json_fini(&j);
    }
    assert_true(ds.events * line <= cap + DLOG_BUF_SIZE);
    dlog_writer_free(w);
    dlog_free(d);
}

/* Poll dlog_stats until pred holds, for at most ~10 s. */
static bool
wait_stats(struct dlog *d, struct dlog_stats *ds, bool (*pred)(const struct dlog_stats *))
{
    for (int i = 0; i < 2000; i++) {
        dlog_stats(d, ds);
        if (pred(ds))
            return true;
        nap_ms(5);
    }
    return false;
}

static bool
has_write_error(const struct dlog_stats *ds)
{
    return ds->write_errors >= 1;
}

static bool
has_reopen_error(const struct dlog_stats *ds)
{
    return ds->reopen_errors >= 1;
}

/* Lines held back by failing writes are retried and land, in order, once
 * the destination works again: here the path is a symlink to /dev/full,
 * replaced (logrotate style) by a real file and reopened. */
static void
test_write_error_recovers(void **state)
{
    (void)state;
    char path[300], err[256];
    tmp_path(path, sizeof(path), "flaky.jsonl");
    if (symlink("/dev/full", path) != 0) {
        print_message("skipped: symlink: %s\n", strerror(errno));
        skip();
    }
    struct dlog *d;
    if (dlog_new(path, 10, &d, err, sizeof(err)) != 0) {
        print_message("skipped: %s\n", err);
        unlink(path);
        skip();
    }
    struct dlog_writer *w = dlog_writer_new(d);
    char id[32];
    struct dlog_event ev = {.kind = DLOG_TRANSIENT_FAILURE, .id = id, .code = 421};
    for (int i = 0; i < 100; i++) {
        snprintf(id, sizeof(id), "T0-%07d", i);
        dlog_event(w, &ev);
    }
    struct dlog_stats ds;
    assert_true(wait_stats(d, &ds, has_write_error));
    assert_int_equal(ds.bytes, 0);
    assert_int_equal(unlink(path), 0);
    dlog_reopen(d);
    size_t one;
    {
        struct json j;
        json_init(&j);
        snprintf(id, sizeof(id), "T0-%07d", 0);
        dlog_format(&j, &ev, 1795401231123ULL);
        one = j.len;
        json_fini(&j);
    }
    assert_true(wait_size(path, (off_t)(100 * one)));
    dlog_stats(d, &ds);
    assert_int_equal(ds.reopens, 1);
    assert_int_equal(ds.dropped, 0);
    assert_int_equal(ds.bytes, 100 * one);
    dlog_writer_free(w);
    dlog_free(d);

    size_t n;
    char *buf = slurp(path, &n);
    assert_non_null(buf);
    assert_int_equal(n, 100 * one);
    for (int i = 0; i < 100; i++) {
        const char *line = buf + (size_t)i * one;
        assert_true(json_object_valid(line, one - 1));
        char v[64], want[32];
        assert_true(field(line, one, "id", v, sizeof(v)));
        snprintf(want, sizeof(want), "T0-%07d", i);
        assert_string_equal(v, want);
    }
    free(buf);
}

/* A reopen that cannot open the path keeps writing to the old file. */
static void
test_reopen_fails_keeps_old(void **state)
{
    (void)state;
    char dir[300], dir2[300], path[320], moved[320], err[256];
    tmp_path(dir, sizeof(dir), "gone");
    tmp_path(dir2, sizeof(dir2), "gone.moved");
    assert_int_equal(mkdir(dir, 0755), 0);
    snprintf(path, sizeof(path), "%s/x.jsonl", dir);
    snprintf(moved, sizeof(moved), "%s/x.jsonl", dir2);
    struct dlog *d;
    assert_int_equal(dlog_new(path, 10, &d, err, sizeof(err)), 0);
    struct dlog_writer *w = dlog_writer_new(d);
    struct dlog_event ev = {.kind = DLOG_DELIVERY, .id = "0001A2B3C4D5E", .code = 250};
    dlog_event(w, &ev);
    assert_int_equal(rename(dir, dir2), 0); /* the path no longer resolves */
    dlog_reopen(d);
    struct dlog_stats ds;
    assert_true(wait_stats(d, &ds, has_reopen_error));
    assert_int_equal(ds.reopens, 0);
    dlog_event(w, &ev);
    dlog_writer_free(w);
    dlog_free(d);
    size_t n;
    char *buf = slurp(moved, &n);
    assert_non_null(buf);
    size_t lines = 0;
    for (size_t i = 0; i < n; i++)
        lines += buf[i] == '\n';
    assert_int_equal(lines, 2);
    free(buf);
}

static void
test_off_and_errors(void **state)
{
    (void)state;
    /* NULL is "log off" everywhere. */
    assert_null(dlog_writer_new(NULL));
    struct dlog_event ev = {.kind = DLOG_DELIVERY, .rcpt = "a@b.example"};
    dlog_event(NULL, &ev);
    dlog_reopen(NULL);
    dlog_set_max_buffered(NULL, 1);
    struct dlog_stats ds;
    memset(&ds, 0xff, sizeof(ds));
    dlog_stats(NULL, &ds);
    assert_int_equal(ds.events, 0);
    assert_int_equal(ds.dropped, 0);
    assert_null(dlog_free(NULL));
    assert_null(dlog_writer_free(NULL));

    char path[300], err[256];
    struct dlog *d = (struct dlog *)&ev; /* must be reset to NULL */
    tmp_path(path, sizeof(path), "no/such/dir/x.jsonl");
    assert_int_equal(dlog_new(path, 0, &d, err, sizeof(err)), -ENOENT);
    assert_null(d);
    assert_non_null(strstr(err, path));
    assert_int_equal(dlog_new("", 0, &d, err, sizeof(err)), -EINVAL);
    assert_true(strlen(err) > 0);
}

/* ---- on the way to dying (log_catch_fatal, log_flush_all) ---- */

enum dying { DIE_SEGV, DIE_ABORT, DIE_STOP_STUCK };

/* T0: some 300 KB of lines on one writer: its full buffers go to the
 * writer thread at once (and race the end), its last is kept. T1: a
 * writer freed, its lines handed over as orphans. */
#define DYING_LINES   1500
#define DYING_ORPHANS 50

static void
dying_events(struct dlog_writer *w, int t, unsigned count)
{
    char id[32], rcpt[64], camp[32];
    const char *hv[] = {camp, "tenant-7"};
    struct dlog_event ev;
    for (unsigned i = 0; i < count; i++) {
        snprintf(id, sizeof(id), "T%d-%07u", t, i);
        snprintf(rcpt, sizeof(rcpt), "user%u@example.com", i);
        snprintf(camp, sizeof(camp), "c%u", i % 17);
        fill_delivery(&ev, id, rcpt, hv);
        dlog_event(w, &ev);
    }
}

/* In a child: lines logged with an interval of an hour, then the end. */
static void
dying_child(const char *path, const char *logpath, enum dying how)
{
    struct rlimit none = {0, 0};
    setrlimit(RLIMIT_CORE, &none); /* no core file from the test */
    alarm(20);
    signal(SIGSEGV, SIG_DFL); /* cmocka's off: a daemon's defaults */
    signal(SIGABRT, SIG_DFL);
    char err[256];
    struct dlog *d;
    if (log_open(logpath, LOG_INFO) < 0 || log_catch_fatal() < 0 ||
        dlog_new(path, 3600 * 1000, &d, err, sizeof(err)) < 0)
        _exit(3);
    struct dlog_writer *w0 = dlog_writer_new(d), *w1 = dlog_writer_new(d);
    if (w0 == NULL || w1 == NULL)
        _exit(4);
    dying_events(w1, 1, DYING_ORPHANS);
    dlog_writer_free(w1);
    dying_events(w0, 0, DYING_LINES);
    switch (how) {
    case DIE_SEGV:
        raise(SIGSEGV);
        break;
    case DIE_ABORT:
        abort();
    case DIE_STOP_STUCK:
        log_flush_all(); /* as engine.c's stop watch, before its _exit */
        /* The writer thread, woken (w0's buffer handed over), writes
         * nothing again: the file would hold w0's last lines twice. */
        dlog_writer_free(w0);
        nap_ms(200);
        _exit(70);
    }
    _exit(7); /* not reached */
}

static void
check_dying(enum dying how)
{
    char path[300], logpath[300];
    tmp_path(path, sizeof(path), "dying.jsonl");
    tmp_path(logpath, sizeof(logpath), "dying.log");
    unlink(path);
    unlink(logpath);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        dying_child(path, logpath, how);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    if (how == DIE_STOP_STUCK) {
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 70);
    } else {
        assert_true(WIFSIGNALED(status));
        assert_int_equal(WTERMSIG(status), how == DIE_SEGV ? SIGSEGV : SIGABRT);
        size_t n;
        char *log = slurp(logpath, &n);
        assert_non_null(log);
        assert_non_null(strstr(log, "event=fatal_signal"));
        free(log);
    }
    /* Every line once, whole, each writer's in order (check_line). */
    struct seen s;
    seen_init(&s, DYING_LINES);
    check_file(path, &s);
    for (unsigned i = 0; i < DYING_LINES; i++)
        assert_int_equal(s.bits[0][i], 1);
    for (unsigned i = 0; i < DYING_ORPHANS; i++)
        assert_int_equal(s.bits[1][i], 1);
    assert_int_equal(s.lines, DYING_LINES + DYING_ORPHANS);
    seen_fini(&s);
}

/* A crash (a SEGV, an abort) and a stop given up write the lines not yet
 * written, with the interval an hour away: those the writer thread had
 * not taken (a writer's last buffer), and none of those it wrote. */
static void
test_dying_writes_what_is_kept(void **state)
{
    (void)state;
    check_dying(DIE_SEGV);
    check_dying(DIE_ABORT);
    check_dying(DIE_STOP_STUCK);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_validator_rejects),
        cmocka_unit_test(test_format_full),
        cmocka_unit_test(test_format_hostile),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_hostile_file),
        cmocka_unit_test(test_reopen),
        cmocka_unit_test(test_interval_flush),
        cmocka_unit_test(test_free_flushes),
        cmocka_unit_test(test_write_error),
        cmocka_unit_test(test_write_error_recovers),
        cmocka_unit_test(test_reopen_fails_keeps_old),
        cmocka_unit_test(test_off_and_errors),
        cmocka_unit_test(test_dying_writes_what_is_kept),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
