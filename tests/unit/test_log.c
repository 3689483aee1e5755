/*
 * test_log: the key=value log of common/log.c with hostile values: text
 * a remote server chose (escape sequences, quotes, backslashes, CR/LF,
 * 8-bit octets, invalid UTF-8, C1 and bidirectional controls) stays on
 * one line, cannot end its quoted value or forge a key, and reads back to
 * the very octets that were logged. The printf conversions the code uses
 * still format as printf does, and an overlong line is cut on a whole
 * escape and marked. A batching thread's lines are written together, in
 * order, an error's at once; a crash writes what every thread kept, and
 * a line of its own, a stack overflowed too (on the alternate stack).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <regex.h>
#include <signal.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/fault.h"
#include "common/log.h"
#include "tests/support/fd_path.h"

struct fixture {
    char dir[64];
    char path[96];
};

static int
setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));
    snprintf(fx->dir, sizeof(fx->dir), "/tmp/sluice-log-XXXXXX");
    assert_non_null(mkdtemp(fx->dir));
    snprintf(fx->path, sizeof(fx->path), "%s/log", fx->dir);
    assert_int_equal(log_open(fx->path, LOG_DEBUG), 0);
    *state = fx;
    return 0;
}

static int
teardown(void **state)
{
    struct fixture *fx = *state;
    log_batch_end(); /* a test that failed while batching leaves none on */
    log_close();
    unlink(fx->path);
    rmdir(fx->dir);
    free(fx);
    return 0;
}

/* The whole log file (malloc'd, NUL-terminated; *len octets), emptied. */
static char *
slurp(struct fixture *fx, size_t *len)
{
    FILE *f = fopen(fx->path, "rb");
    assert_non_null(f);
    char *buf = malloc(1 << 16);
    size_t n = fread(buf, 1, (1 << 16) - 1, f);
    buf[n] = '\0';
    fclose(f);
    assert_int_equal(truncate(fx->path, 0), 0);
    *len = n;
    return buf;
}

/* The one line logged since the last call, without its newline. */
static char *
one_line(struct fixture *fx)
{
    size_t n;
    char *buf = slurp(fx, &n);
    assert_true(n > 0);
    assert_int_equal(buf[n - 1], '\n');
    buf[n - 1] = '\0';
    assert_null(memchr(buf, '\n', n - 1)); /* one line */
    assert_null(memchr(buf, '\r', n - 1));
    /* no space but U+0020, which a reader splitting on white space would
     * take for the end of a field */
    static const char *const spaces[] = {"\xc2\xa0", "\xe1\x9a\x80", "\xe2\x80\x80",
                                         "\xe2\x80\x83", "\xe2\x80\x8a", "\xe2\x80\xaf",
                                         "\xe2\x81\x9f", "\xe3\x80\x80"};
    for (size_t i = 0; i < sizeof(spaces) / sizeof(spaces[0]); i++)
        if (strstr(buf, spaces[i]) != NULL)
            fail_msg("a Unicode space (%zu) in: %s", i, buf);
    for (size_t i = 0; i < n - 1; i++) { /* no control octet at all */
        unsigned char c = (unsigned char)buf[i];
        if (c < 0x20 || c == 0x7f)
            fail_msg("control octet 0x%02x at %zu in: %s", c, i, buf);
    }
    return buf;
}

static int
hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Undo log_escape() on s up to the first unescaped '"' or, when
 * stop_at_space, space (or the end). Returns the octets in out, their
 * count in *outlen, and where the reading stopped. */
static const char *
unescape(const char *s, bool stop_at_space, char *out, size_t *outlen)
{
    size_t n = 0;
    while (*s != '\0' && *s != '"' && !(stop_at_space && *s == ' ')) {
        if (*s != '\\') {
            out[n++] = *s++;
            continue;
        }
        s++;
        switch (*s) {
        case '\\': out[n++] = '\\'; s++; break;
        case '"': out[n++] = '"'; s++; break;
        case 'n': out[n++] = '\n'; s++; break;
        case 'r': out[n++] = '\r'; s++; break;
        case 't': out[n++] = '\t'; s++; break;
        case 'x': {
            int hi = hexval(s[1]), lo = hexval(s[2]);
            if (hi < 0 || lo < 0)
                fail_msg("bad \\x escape at: %s", s - 1);
            out[n++] = (char)(hi * 16 + lo);
            s += 3;
            break;
        }
        default:
            fail_msg("unknown escape \\%c", *s);
        }
    }
    *outlen = n;
    return s;
}

/* The value of key in line: after " key=" (quoted or not), unescaped. */
static size_t
value_of(const char *line, const char *key, char *out)
{
    char pat[64];
    snprintf(pat, sizeof(pat), " %s=", key);
    const char *p = strstr(line, pat);
    if (p == NULL)
        fail_msg("no %s= in: %s", key, line);
    p += strlen(pat);
    size_t n;
    if (*p == '"') {
        const char *end = unescape(p + 1, false, out, &n);
        assert_int_equal(*end, '"');
        assert_true(end[1] == '\0' || end[1] == ' ');
    } else {
        const char *end = unescape(p, true, out, &n);
        assert_true(*end == '\0' || *end == ' ');
    }
    return n;
}

/* Every key of the line, in order, as "k1,k2,...": what a key=value
 * parser that honours quotes and backslashes sees. */
static void
keys_of(const char *line, char *out, size_t cap)
{
    out[0] = '\0';
    const char *p = strchr(line, ' '); /* after the timestamp */
    assert_non_null(p);
    while (*p == ' ') {
        p++;
        const char *eq = strchr(p, '=');
        assert_non_null(eq);
        strncat(out, p, (size_t)(eq - p) < cap - strlen(out) - 2 ? (size_t)(eq - p) : 0);
        strcat(out, ",");
        p = eq + 1;
        if (*p == '"') {
            p++;
            while (*p != '"') {
                assert_true(*p != '\0');
                p += *p == '\\' ? 2 : 1;
            }
            p++;
        } else {
            while (*p != '\0' && *p != ' ')
                p += *p == '\\' ? 2 : 1;
        }
    }
    assert_int_equal(*p, '\0');
}

static const struct {
    const char *name;
    const char *text;
} hostile[] = {
    {"clear screen", "550 \x1b[2J\x1b[H mailbox unavailable"},
    {"quotes", "550 5.1.1 \"no\" such user\" fake=1"},
    {"backslashes", "451 a\\b\\\" c\\"},
    {"CR LF", "250 ok\r\n2026-01-01T00:00:00.000Z level=crit event=forged"},
    {"8-bit UTF-8", "550 Empf\xc3\xa4nger unbekannt \xe2\x9c\x93"},
    {"invalid UTF-8", "550 \xff\xfe\xc3 \xe2\x82 \xed\xa0\x80 \xc0\xaf end"},
    {"C1 CSI", "550 \xc2\x9b" "2J and raw \x9b" "2J"},
    {"line separator", "550 a\xe2\x80\xa8" "b\xe2\x80\xa9" "c"},
    {"bidi override", "550 \xe2\x80\xae" "txt.exe \xe2\x81\xa6" "x"},
    {"other controls", "550 \x01\x07\x08\x7f\t tab"},
    {"unicode spaces", "550 a\xc2\xa0user=x\xe1\x9a\x80" "b\xe2\x80\x80" "c\xe2\x80\x83"
                       "d\xe2\x80\x8a" "e\xe2\x80\xaf" "f\xe2\x81\x9f" "g\xe3\x80\x80" "h"},
};

static void
test_hostile_quoted_values(void **state)
{
    struct fixture *fx = *state;
    for (size_t i = 0; i < sizeof(hostile) / sizeof(hostile[0]); i++) {
        const char *t = hostile[i].text;
        log_msg(LOG_INFO, "id=abc event=deferred mx=mx.example code=550 reply=\"%s\" tail=%u",
                t, 7u);
        char *line = one_line(fx);
        char got[1024];
        size_t n = value_of(line, "reply", got);
        if (n != strlen(t) || memcmp(got, t, n) != 0)
            fail_msg("%s: does not read back: %s", hostile[i].name, line);
        char keys[256];
        keys_of(line, keys, sizeof(keys));
        if (strcmp(keys, "level,id,event,mx,code,reply,tail,") != 0)
            fail_msg("%s: keys %s in: %s", hostile[i].name, keys, line);
        /* the escaped form holds no terminal control */
        assert_null(strstr(line, "\x1b"));
        assert_null(strstr(line, "\xc2\x9b"));
        assert_null(strstr(line, "\xe2\x80\xae"));
        assert_null(strstr(line, "\xe2\x80\xa8"));
        free(line);
    }
    /* readable text stays readable */
    log_msg(LOG_INFO, "reply=\"%s\" err=%s", "550 Empf\xc3\xa4nger unbekannt",
            "Connection refused");
    char *line = one_line(fx);
    assert_non_null(strstr(line, "reply=\"550 Empf\xc3\xa4nger unbekannt\" "
                                 "err=\"Connection refused\""));
    free(line);
}

static void
test_hostile_unquoted_values(void **state)
{
    struct fixture *fx = *state;
    for (size_t i = 0; i < sizeof(hostile) / sizeof(hostile[0]); i++) {
        const char *t = hostile[i].text;
        log_msg(LOG_NOTICE, "event=tls_failed mx=%s rcpt=<%s> code=%d", t, t, -1);
        char *line = one_line(fx);
        char got[1024];
        size_t n = value_of(line, "mx", got);
        if (n != strlen(t) || memcmp(got, t, n) != 0)
            fail_msg("%s: mx does not read back: %s", hostile[i].name, line);
        /* inside <>: no space, no quote left as it is */
        const char *r = strstr(line, " rcpt=<");
        assert_non_null(r);
        const char *end = strstr(r, "> code=-1");
        assert_non_null(end);
        for (const char *c = r + 7; c < end; c++)
            assert_true(*c != ' ' && (*c != '"' || c[-1] == '\\'));
        char keys[256];
        keys_of(line, keys, sizeof(keys));
        if (strcmp(keys, "level,event,mx,rcpt,code,") != 0)
            fail_msg("%s: keys %s in: %s", hostile[i].name, keys, line);
        free(line);
    }
}

/* A '>' inside <>: a quoted local part may hold one ("a>b"@d, RFC 5321
 * qtextSMTP), and left as it is it would end the value early for a
 * reader that takes rcpt=<...> up to its '>', and make what follows
 * look like the rest of the line. It is \x3e there, read back whole;
 * elsewhere it stays as it is. */
static void
test_angle_bracket_in_value(void **state)
{
    struct fixture *fx = *state;
    const char *forged = "\"v@victim.example> status=sent code=250 x=<\"@evil.example";
    log_msg(LOG_INFO, "id=1 event=bounced rcpt=<%s> from=<%s> reply=\"%s\" n=%d", forged,
            "a>b@c", "550 <x>", 2);
    char *line = one_line(fx);
    const char *r = strstr(line, " rcpt=<");
    assert_non_null(r);
    r += strlen(" rcpt=<");
    const char *gt = strchr(r, '>');
    assert_non_null(gt);
    if (strncmp(gt, "> from=<", 8) != 0)
        fail_msg("rcpt=<...> ends early: %s", line);
    char got[1024];
    size_t n;
    unescape(r, true, got, &n); /* through the format's '>' */
    assert_true(n > 0 && got[n - 1] == '>');
    got[n - 1] = '\0';
    assert_string_equal(got, forged);
    assert_non_null(strstr(line, " from=<a\\x3eb@c> reply=\"550 <x>\" n=2"));
    char keys[256];
    keys_of(line, keys, sizeof(keys));
    if (strcmp(keys, "level,id,event,rcpt,from,reply,n,") != 0)
        fail_msg("keys %s in: %s", keys, line);
    free(line);

    char out[32];
    assert_int_equal(log_escape(out, sizeof(out), "a>b", 3, LOG_ESC_VALUE), 6);
    assert_string_equal(out, "a\\x3eb");
    assert_int_equal(log_escape(out, sizeof(out), "a>b", 3, LOG_ESC_TEXT), 3);
    assert_string_equal(out, "a>b");
}

/* An optional key passed as an argument (oob.c's "reason=%s%s%s" with
 * " detail=" and a Message-ID a remote sender chose): its value is a
 * value like any other, quoted when it holds a space, so it cannot add
 * keys of its own. An empty value before the key leaves the key alone. */
static void
test_key_passed_as_argument(void **state)
{
    struct fixture *fx = *state;
    const char *forged = "<a@b> user=root event=auth_ok \"x\" y=";
    log_msg(LOG_NOTICE, "session=1 event=oob_dropped reason=%s%s%s from=\"%s\"", "no_token",
            " detail=", forged, "s@d.test");
    char *line = one_line(fx);
    char keys[256];
    keys_of(line, keys, sizeof(keys));
    if (strcmp(keys, "level,session,event,reason,detail,from,") != 0)
        fail_msg("keys %s in: %s", keys, line);
    char got[1024];
    size_t n = value_of(line, "detail", got);
    if (n != strlen(forged) || memcmp(got, forged, n) != 0)
        fail_msg("detail does not read back: %s", line);
    free(line);

    /* inside <> after an argument key: spaces as \x20 */
    log_msg(LOG_INFO, "event=x%s%s> code=%d", " rcpt=<", "a b=c@d", 5);
    line = one_line(fx);
    assert_non_null(strstr(line, " rcpt=<a\\x20b=c@d> code=5"));
    free(line);

    /* a value that ends in '=' is no key: the key after it is */
    log_msg(LOG_INFO, "event=x id=%s%s%s", "abc=", " reason=", "a b=c \"d=e\"");
    line = one_line(fx);
    keys_of(line, keys, sizeof(keys));
    if (strcmp(keys, "level,event,id,reason,") != 0)
        fail_msg("keys %s in: %s", keys, line);
    free(line);

    /* the value before the key is empty, numbers before it: key as it is */
    log_msg(LOG_INFO, "event=x reason=%s%s%s n=%u%s%s", "", " detail=", "a b", 3u, " more=",
            "c d");
    line = one_line(fx);
    assert_non_null(strstr(line, "event=x reason= detail=\"a b\" n=3 more=\"c d\""));
    free(line);
}

static void
test_conversions(void **state)
{
    struct fixture *fx = *state;
    log_msg(LOG_WARN,
            "a=%d b=%u c=%ld d=%llu e=%zu f=%016llx g=%x h=%.*s i=%c j=%% k=%5.1f l=%-4s| "
            "m=%*d n=%s%s o=%p",
            -42, 42u, -7L, 18446744073709551615ULL, (size_t)123, 0xabcULL, 255u, 3, "abcdef",
            'Z', 2.25, "ab", 6, 9, "", " p=q", (void *)0);
    char *line = one_line(fx);
    const char *body = strstr(line, " a=");
    assert_non_null(body);
    char want[256];
    snprintf(want, sizeof(want),
             " a=-42 b=42 c=-7 d=18446744073709551615 e=123 f=0000000000000abc g=ff h=abc i=Z "
             "j=%% k=  2.2 l=ab  | m=     9 n= p=q o=%p",
             (void *)0);
    assert_string_equal(body, want);
    free(line);
    /* a thread name is a value like any other */
    log_set_thread_name("w 0");
    log_msg(LOG_INFO, "event=x");
    line = one_line(fx);
    assert_non_null(strstr(line, " thread=\"w 0\" event=x"));
    free(line);
    log_set_thread_name(NULL);
}

static void
test_long_line_is_cut_on_a_whole_escape(void **state)
{
    struct fixture *fx = *state;
    char big[6000];
    for (size_t i = 0; i < sizeof(big) - 1; i++)
        big[i] = i % 3 == 0 ? '\x1b' : i % 3 == 1 ? '"' : 'a';
    big[sizeof(big) - 1] = '\0';
    log_msg(LOG_INFO, "event=big reply=\"%s\" after=1", big);
    char *line = one_line(fx);
    size_t n = strlen(line);
    assert_true(n < 2048);
    /* the cut falls after a whole escape: the pattern, then the mark */
    const char *t = strstr(line, " truncated=1");
    assert_non_null(t);
    assert_string_equal(t, " truncated=1");
    assert_true(t - line >= 4);
    bool whole = memcmp(t - 4, "\\x1b", 4) == 0 || memcmp(t - 2, "\\\"", 2) == 0 || t[-1] == 'a';
    assert_true(whole);
    assert_null(strstr(line, "after=1"));
    free(line);
}

static void
test_long_plain_value_fills_the_line(void **state)
{
    struct fixture *fx = *state;
    char big[5000];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    log_msg(LOG_INFO, "event=big reply=\"%s\" after=1", big);
    char *line = one_line(fx);
    assert_true(strlen(line) > 2000);
    assert_non_null(strstr(line, "xxxxxxxxxx truncated=1"));
    free(line);
}

static void
test_escape_function(void **state)
{
    (void)state;
    char out[64];
    assert_int_equal(log_escape(out, sizeof(out), "a b\"c\\", 6, LOG_ESC_TEXT), 8);
    assert_string_equal(out, "a b\\\"c\\\\");
    assert_int_equal(log_escape(out, sizeof(out), "a b", 3, LOG_ESC_VALUE), 6);
    assert_string_equal(out, "a\\x20b");
    /* a NUL inside the length is an octet like any other */
    assert_int_equal(log_escape(out, sizeof(out), "a\0b", 3, LOG_ESC_TEXT), 6);
    assert_string_equal(out, "a\\x00b");
    /* too small: the whole length is returned, the prefix ends on an escape */
    assert_int_equal(log_escape(out, 4, "\x1b\x1b", 2, LOG_ESC_TEXT), 8);
    assert_string_equal(out, "");
    assert_int_equal(log_escape(out, 6, "\x1b\x1b", 2, LOG_ESC_TEXT), 8);
    assert_string_equal(out, "\\x1b");
    assert_int_equal(log_escape(NULL, 0, "\xff", 1, LOG_ESC_TEXT), 4);
    /* plain text is cut to what fits, between characters */
    assert_int_equal(log_escape(out, 5, "abcdef", 6, LOG_ESC_TEXT), 6);
    assert_string_equal(out, "abcd");
    assert_int_equal(log_escape(out, 5, "ab\xc3\xa4\xc3\xa4", 6, LOG_ESC_TEXT), 6);
    assert_string_equal(out, "ab\xc3\xa4");
    assert_int_equal(log_escape(out, 4, "ab\xc3\xa4\xc3\xa4", 6, LOG_ESC_TEXT), 6);
    assert_string_equal(out, "ab");
}

/* Every line starts with its UTC time to the millisecond and its level;
 * the part up to the second is made once a second and must not go stale
 * (two lines a second apart differ in it). */
static void
test_header(void **state)
{
    struct fixture *fx = *state;
    regex_t re;
    assert_int_equal(regcomp(&re,
                             "^[0-9]{4}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9]"
                             "\\.[0-9]{3}Z level=(info|warn) event=x$",
                             REG_EXTENDED | REG_NOSUB),
                     0);
    log_msg(LOG_INFO, "event=x");
    char *a = one_line(fx);
    assert_int_equal(regexec(&re, a, 0, NULL, 0), 0);
    struct timespec pause = {1, 100000000};
    nanosleep(&pause, NULL); /* the clock itself is what is tested */
    log_msg(LOG_WARN, "event=x");
    char *b = one_line(fx);
    assert_int_equal(regexec(&re, b, 0, NULL, 0), 0);
    assert_memory_not_equal(a, b, 19); /* up to the seconds */
    regfree(&re);
    free(a);
    free(b);
}

/* The descriptors open in this process, as a sorted list in buf. */
static size_t
open_fds(int *fds, size_t cap)
{
    DIR *d = opendir("/proc/self/fd");
    assert_non_null(d);
    size_t n = 0;
    int skip = dirfd(d);
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.' || atoi(e->d_name) == skip)
            continue;
        assert_true(n < cap);
        fds[n++] = atoi(e->d_name);
    }
    closedir(d);
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && fds[j - 1] > fds[j]; j--) {
            int t = fds[j];
            fds[j] = fds[j - 1];
            fds[j - 1] = t;
        }
    return n;
}

/* A reopen (SIGHUP, after logrotate's rename) writes on to the new file
 * through the same descriptor number: no number is closed, so none can be
 * taken by a socket meanwhile and receive a line a thread was writing
 * through it (before, the old number was closed after the swap). */
static void
test_reopen_keeps_the_descriptor(void **state)
{
    struct fixture *fx = *state;
    log_msg(LOG_INFO, "event=before_rotate");
    char rotated[128];
    snprintf(rotated, sizeof(rotated), "%s.1", fx->path);
    assert_int_equal(rename(fx->path, rotated), 0);
    int before[256], after[256];
    size_t nb = open_fds(before, 256);
    assert_int_equal(log_reopen(), 0);
    size_t na = open_fds(after, 256);
    assert_int_equal(na, nb);
    assert_memory_equal(before, after, nb * sizeof(int));
    log_msg(LOG_INFO, "event=after_rotate");
    char *line = one_line(fx);
    assert_non_null(strstr(line, "event=after_rotate"));
    free(line);
    FILE *f = fopen(rotated, "rb");
    assert_non_null(f);
    char buf[4096];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    assert_non_null(strstr(buf, "event=before_rotate"));
    assert_null(strstr(buf, "event=after_rotate"));
    /* the descriptor now on the new file is not inherited by a child */
    int fds[256], found = 0;
    size_t k = open_fds(fds, 256);
    for (size_t i = 0; i < k; i++) {
        char target[256];
        if (fd_path_read(fds[i], target, sizeof(target)) > 0 && strcmp(target, fx->path) == 0) {
            assert_true((fcntl(fds[i], F_GETFD) & FD_CLOEXEC) != 0);
            found++;
        }
    }
    assert_int_equal(found, 1);
    unlink(rotated);
}

/* The size of the log file now, without emptying it. */
static size_t
file_size(struct fixture *fx)
{
    FILE *f = fopen(fx->path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    fclose(f);
    return (size_t)n;
}

/* A batching thread's lines wait for log_flush() and keep their order; a
 * line at LOG_ERR goes out at once, after the lines kept before it; a
 * full batch is written before the line that would not fit; the batch's
 * end writes what is left. */
static void
test_batch(void **state)
{
    struct fixture *fx = *state;
    log_batch_begin();
    log_msg(LOG_INFO, "event=one");
    log_msg(LOG_WARN, "event=two");
    assert_int_equal(file_size(fx), 0);
    log_flush();
    size_t n;
    char *buf = slurp(fx, &n);
    char *one = strstr(buf, "event=one\n"), *two = strstr(buf, "event=two\n");
    assert_non_null(one);
    assert_non_null(two);
    assert_true(one < two);
    assert_int_equal(buf[n - 1], '\n');
    free(buf);

    log_msg(LOG_INFO, "event=kept");
    log_msg(LOG_ERR, "event=failed");
    buf = slurp(fx, &n);
    char *kept = strstr(buf, "event=kept\n"), *failed = strstr(buf, "event=failed\n");
    assert_non_null(kept);
    assert_non_null(failed);
    assert_true(kept < failed);
    free(buf);

    /* 300 lines of about 150 octets: the batch (16 KB) fills several
     * times; each fill writes whole lines, and none is lost or split */
    char pad[80];
    memset(pad, 'x', sizeof(pad) - 1);
    pad[sizeof(pad) - 1] = '\0';
    for (int i = 0; i < 300; i++)
        log_msg(LOG_INFO, "event=fill n=%d pad=%s", i, pad);
    size_t written = file_size(fx);
    assert_true(written > 0);
    log_batch_end();
    buf = slurp(fx, &n);
    assert_true(n > written);
    int seen = 0;
    for (char *p = buf; (p = strstr(p, "event=fill n=")) != NULL; p++) {
        assert_int_equal(atoi(p + 13), seen);
        char *nl = strchr(p, '\n');
        assert_non_null(nl);
        assert_int_equal(nl - p, (long)strlen("event=fill n=") + snprintf(NULL, 0, "%d", seen) +
                                     (long)strlen(" pad=") + (long)strlen(pad));
        seen++;
    }
    assert_int_equal(seen, 300);
    free(buf);

    /* after the end, lines go out one by one again */
    size_t before = file_size(fx);
    log_msg(LOG_INFO, "event=after");
    assert_true(file_size(fx) > before);
}

/* A log that is not a regular file (stderr to a pipe): a batch is written
 * before it passes PIPE_BUF, so that the pipe takes each write whole, never
 * in pieces with another thread's line between them. */
static void
test_batch_to_a_pipe(void **state)
{
    (void)state;
    int p[2];
    assert_int_equal(pipe(p), 0);
    assert_int_equal(fcntl(p[0], F_SETFL, O_NONBLOCK), 0);
    int saved = dup(2);
    assert_true(saved >= 0);
    assert_int_equal(dup2(p[1], 2), 2);
    assert_int_equal(log_open("-", LOG_DEBUG), 0);
    log_batch_begin();
    char pad[100];
    memset(pad, 'y', sizeof(pad) - 1);
    pad[sizeof(pad) - 1] = '\0';
    int queued = 0, n = 0;
    size_t longest = 0;
    char buf[65536];
    for (int i = 0; i < 200; i++) {
        log_msg(LOG_INFO, "event=pipe n=%d pad=%s", i, pad);
        assert_int_equal(ioctl(p[0], FIONREAD, &queued), 0);
        if (queued > 0) {
            /* what the flush wrote: whole lines, no more than PIPE_BUF */
            ssize_t got = read(p[0], buf, sizeof(buf));
            assert_true(got > 0);
            assert_true((size_t)got <= PIPE_BUF);
            assert_int_equal(buf[got - 1], '\n');
            longest = (size_t)got > longest ? (size_t)got : longest;
            n++;
        }
    }
    log_batch_end();
    assert_true(n >= 5);                 /* 200 lines of ~150 octets: several writes */
    assert_true(longest > PIPE_BUF / 2); /* each about as much as a write may hold */
    while (read(p[0], buf, sizeof(buf)) > 0)
        ;
    assert_int_equal(dup2(saved, 2), 2);
    close(saved);
    close(p[0]);
    close(p[1]);
    log_close();
}

/* stderr sent to a new file as `2>file` does (no O_APPEND) and the log
 * opened on it ("-"): path (a mkstemp template) named, the file's
 * descriptor returned, the old stderr's copy in *saved. */
static int
stderr_to_file(char *path, int *saved)
{
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(fcntl(fd, F_GETFL) & O_APPEND, 0);
    *saved = dup(2);
    assert_true(*saved >= 0);
    assert_int_equal(dup2(fd, 2), 2);
    assert_int_equal(log_open("-", LOG_DEBUG), 0);
    return fd;
}

/* stderr_to_file() undone (stderr back, the log closed, the file
 * removed), what the file holds into buf (not empty), NUL-terminated. */
static void
stderr_file_read(const char *path, int fd, int saved, char *buf, size_t cap)
{
    assert_int_equal(dup2(saved, 2), 2);
    close(saved);
    log_close();
    ssize_t n = pread(fd, buf, cap - 1, 0);
    close(fd);
    unlink(path);
    assert_true(n > 0);
    buf[n] = '\0';
}

/* stderr sent to a file by `2>file` (no O_APPEND) and the file cut to
 * nothing under it (logrotate's copytruncate): the next line goes at
 * the start, not after a hole as long as what was cut (write(2) wrote at
 * the descriptor's old position). */
static void
test_stderr_file_cut_under_it(void **state)
{
    (void)state;
    char path[] = "/tmp/sluice-test-log-XXXXXX";
    int saved;
    int fd = stderr_to_file(path, &saved);
    log_msg(LOG_INFO, "event=before_cut pad=%0200d", 0);
    assert_int_equal(ftruncate(fd, 0), 0);
    log_msg(LOG_INFO, "event=after_cut");
    char buf[4096];
    stderr_file_read(path, fd, saved, buf, sizeof(buf));
    assert_int_not_equal(buf[0], '\0'); /* no hole */
    assert_non_null(strstr(buf, "event=after_cut"));
    assert_null(strstr(buf, "event=before_cut"));
}

/* stderr sent to a file by `2>file` (no O_APPEND), and another writer
 * on the same open file (assert(3)'s message, a sanitizer's report, the
 * shell's next command after sluice): its write goes after the log's
 * lines, not over the first of them. Appended without the descriptor's
 * position, the log's lines left it at 0, where the other write landed. */
static void
test_stderr_file_shared_with_another_writer(void **state)
{
    (void)state;
    char path[] = "/tmp/sluice-test-log-XXXXXX";
    int saved;
    int fd = stderr_to_file(path, &saved);
    log_msg(LOG_INFO, "event=first_line");
    static const char other[] = "another writer\n";
    assert_int_equal(write(2, other, sizeof(other) - 1), (ssize_t)sizeof(other) - 1);
    log_msg(LOG_INFO, "event=last_line");
    char buf[4096];
    stderr_file_read(path, fd, saved, buf, sizeof(buf));
    const char *first = strstr(buf, "event=first_line\n");
    const char *mid = strstr(buf, other);
    const char *last = strstr(buf, "event=last_line\n");
    assert_non_null(first);
    assert_non_null(mid);
    assert_non_null(last);
    assert_true(first < mid && mid < last);
}

/* pwritev2 refused with EPERM, as a seccomp profile that does not know
 * it refuses it (a container runtime's older default): the lines go out
 * by write(2), not nowhere. In a child, whose filter stays there. */
static void
test_pwritev2_refused_by_seccomp(void **state)
{
    (void)state;
    char path[] = "/tmp/sluice-test-log-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct sock_filter f[] = {
            {BPF_LD | BPF_W | BPF_ABS, 0, 0, offsetof(struct seccomp_data, nr)},
            {BPF_JMP | BPF_JEQ | BPF_K, 0, 1, __NR_pwritev2},
            {BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ERRNO | EPERM},
            {BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ALLOW},
        };
        struct sock_fprog prog = {(unsigned short)(sizeof(f) / sizeof(f[0])), f};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
            prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0)
            _exit(77);
        if (log_open(path, LOG_DEBUG) < 0)
            _exit(2);
        log_msg(LOG_INFO, "event=first_line");
        log_msg(LOG_INFO, "event=second_line");
        log_close();
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    char buf[4096];
    int rfd = open(path, O_RDONLY);
    assert_true(rfd >= 0);
    ssize_t n = read(rfd, buf, sizeof(buf) - 1);
    close(rfd);
    unlink(path);
    if (WEXITSTATUS(status) == 77) {
        skip(); /* no seccomp here */
        return;
    }
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_true(n > 0);
    buf[n] = '\0';
    assert_non_null(strstr(buf, "event=first_line"));
    assert_non_null(strstr(buf, "event=second_line"));
}

/* ---- a fatal signal (log_catch_fatal) ---- */

enum crash { CRASH_RAISE, CRASH_ABORT, CRASH_FAULT };

static int crash_ready[2]; /* the other thread's "kept my line" */
static volatile int *volatile crash_at = (volatile int *)(uintptr_t)8;

static void *
other_thread(void *arg)
{
    (void)arg;
    log_set_thread_name("other");
    log_batch_begin();
    log_msg(LOG_INFO, "event=other_kept");
    char c = 1;
    if (write(crash_ready[1], &c, 1) != 1)
        _exit(8); /* (no cmocka assert off the test's thread) */
    for (;;)
        pause(); /* until the process dies */
    return NULL;
}

/* In a child: two threads keep a line each in their batches, then the
 * child crashes as asked. */
static void
crash_child(enum crash how)
{
    struct rlimit none = {0, 0};
    setrlimit(RLIMIT_CORE, &none); /* no core file from the test */
    alarm(10);                     /* a handler that loops dies of SIGALRM */
    /* cmocka's handlers (they would carry on with the tests in here) off:
     * the actions log_catch_fatal finds are the defaults a daemon has */
    static const int sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
        signal(sigs[i], SIG_DFL);
    if (log_catch_fatal() < 0 || log_catch_fatal() < 0) /* twice: the second does nothing */
        _exit(3);
    if (pipe(crash_ready) < 0)
        _exit(4);
    pthread_t t;
    if (pthread_create(&t, NULL, other_thread, NULL) != 0)
        _exit(5);
    char c;
    if (read(crash_ready[0], &c, 1) != 1)
        _exit(6);
    log_set_thread_name("crasher");
    log_batch_begin();
    log_msg(LOG_INFO, "event=crasher_kept");
    switch (how) {
    case CRASH_RAISE:
        raise(SIGSEGV);
        break;
    case CRASH_ABORT:
        abort();
    case CRASH_FAULT:
        *crash_at = 1; /* an address never mapped */
        break;
    }
    _exit(7); /* not reached: the handler let the signal kill */
}

static void
check_crash(struct fixture *fx, enum crash how, int sig, const char *name)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        crash_child(how);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    /* (the child put the defaults back: a sanitizer's handler is not
     * what it restores) */
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), sig);
    size_t n;
    char *buf = slurp(fx, &n);
    char *other = strstr(buf, "thread=other event=other_kept\n");
    char *mine = strstr(buf, "thread=crasher event=crasher_kept\n");
    char want[96];
    snprintf(want, sizeof(want), "level=crit thread=crasher event=fatal_signal signal=%s pid=%ld\n",
             name, (long)pid);
    char *fatal = strstr(buf, want);
    assert_non_null(other);
    assert_non_null(mine);
    assert_non_null(fatal);
    assert_true(other < fatal);
    assert_true(mine < fatal);
    /* the fatal line's stamp is log_vmsg's: 2026-12-04T12:34:56.789Z */
    regex_t re;
    assert_int_equal(regcomp(&re, "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z "
                                  "level=crit thread=crasher event=fatal_signal",
                             REG_EXTENDED | REG_NEWLINE),
                     0);
    regmatch_t m;
    assert_int_equal(regexec(&re, buf, 1, &m, 0), 0);
    regfree(&re);
    /* and it is the time now (the civil date computed right) */
    struct tm tm = {0};
    assert_int_equal(sscanf(buf + m.rm_so, "%4d-%2d-%2dT%2d:%2d:%2d", &tm.tm_year, &tm.tm_mon,
                            &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec),
                     6);
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t at = timegm(&tm), now = time(NULL);
    assert_true(at <= now && now - at < 60);
    free(buf);
}

/* A crash writes the lines every batching thread kept, then its own line
 * (with the time, the thread and the signal), and then dies of the
 * signal as it would have: a SEGV sent, an abort, a real fault. */
static void
test_fatal_signal(void **state)
{
    struct fixture *fx = *state;
    check_crash(fx, CRASH_RAISE, SIGSEGV, "SEGV");
    check_crash(fx, CRASH_ABORT, SIGABRT, "ABRT");
    check_crash(fx, CRASH_FAULT, SIGSEGV, "SEGV");

    /* A SIGABRT ignored before (a supervisor's, inherited) stays ignored:
     * one sent is no crash, and says nothing */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        alarm(10);
        signal(SIGABRT, SIG_IGN);
        if (log_catch_fatal() < 0)
            _exit(3);
        kill(getpid(), SIGABRT);
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    size_t n;
    char *buf = slurp(fx, &n);
    assert_null(strstr(buf, "event=fatal_signal"));
    free(buf);
}

/* log_catch_fatal after a fault guard was armed (its handler saved as
 * the action before), then a guard armed again (that puts the guard's
 * handler back over log_catch_fatal's): a fault no guard takes still
 * writes the fatal line and dies of its signal, not handed back and
 * forth between the two handlers for ever (each puts back the one it
 * replaced, and the fault comes again on return). */
static void
test_fatal_signal_after_a_guard(void **state)
{
    struct fixture *fx = *state;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct rlimit none = {0, 0};
        setrlimit(RLIMIT_CORE, &none);
        alarm(5); /* the loop dies of SIGALRM */
        signal(SIGSEGV, SIG_DFL);
        signal(SIGBUS, SIG_DFL);
        struct fault_guard g;
        struct fault_guard *prev = fault_guard_arm(&g);
        fault_guard_restore(prev);
        if (log_catch_fatal() < 0)
            _exit(3);
        prev = fault_guard_arm(&g);
        if (sigsetjmp(g.jb, 1) == 0) {
            *crash_at = 1; /* taken by the guard */
            _exit(4);
        }
        if (g.sig != SIGSEGV)
            _exit(5);
        fault_guard_restore(prev);
        log_set_thread_name("crasher");
        *crash_at = 1; /* no guard: the fatal line, then death */
        _exit(7);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    if (WIFEXITED(status))
        fail_msg("child exited %d", WEXITSTATUS(status));
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGSEGV);
    size_t n;
    char *buf = slurp(fx, &n);
    assert_non_null(strstr(buf, "thread=crasher event=fatal_signal signal=SEGV"));
    free(buf);
}

/* ---- a stack overflowed (log_altstack_init) ---- */

/* Each call keeps a frame of a kilobyte, written (volatile) and read
 * after the call returns: no tail call, no loop, no frame left out. The
 * bound is never reached (a 256 KB stack ends near 250 deep); it keeps
 * -Winfinite-recursion quiet. */
__attribute__((noinline)) static unsigned
overflow(unsigned n)
{
    volatile char pad[1024];
    pad[0] = (char)n;
    pad[sizeof(pad) - 1] = (char)n;
    if (n == UINT_MAX)
        return 0;
    return overflow(n + 1) + (unsigned char)pad[0] + (unsigned char)pad[sizeof(pad) - 1];
}

static void *
deep_thread(void *arg)
{
    if (*(const bool *)arg && log_altstack_init() != 0)
        _exit(9);
    if (*(const bool *)arg && log_altstack_init() != 0) /* a second call keeps the first */
        _exit(10);
    log_set_thread_name("deep");
    _exit((int)overflow(0) & 1); /* not reached: the overflow kills */
}

/* In a child: a thread of 256 KB (with an alternate stack or not)
 * recurses until its stack is exhausted. */
static int
overflow_child(bool altstack)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct rlimit none = {0, 0};
        setrlimit(RLIMIT_CORE, &none);
        alarm(10);
        signal(SIGSEGV, SIG_DFL); /* cmocka's off: a daemon's defaults */
        signal(SIGBUS, SIG_DFL);
        if (log_catch_fatal() < 0)
            _exit(3);
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 256 * 1024);
        pthread_t t;
        if (pthread_create(&t, &a, deep_thread, &altstack) != 0)
            _exit(5);
        pthread_join(t, NULL);
        _exit(7); /* not reached */
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    return status;
}

/* A stack overflowed leaves the fatal line when the thread has an
 * alternate signal stack, and still dies of its SIGSEGV: without one (or
 * without SA_ONSTACK), the kernel finds no room for the handler's frame
 * and kills at once, with no line. */
static void
test_stack_overflow(void **state)
{
    struct fixture *fx = *state;
#if defined(__SANITIZE_ADDRESS__)
    /* ASan gives every thread an alternate stack of its own, and its
     * handler, put back after ours, reports the overflow and ends the
     * process its way (exit 1, or an abort): neither the control below
     * (no line without ours) nor the SIGSEGV holds. That ours is kept
     * off (log_altstack_init leaves one alone) and the line written is
     * checked still. */
    bool asan = true;
#else
    bool asan = false;
#endif
    int status = overflow_child(true);
    if (asan)
        assert_true(WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) == 1));
    else
        assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV);
    size_t n;
    char *buf = slurp(fx, &n);
    assert_non_null(strstr(buf, "level=crit thread=deep event=fatal_signal signal=SEGV pid="));
    free(buf);
    if (asan)
        return;

    /* the control: the same overflow, no alternate stack, no line
     * (slurp emptied the file) */
    status = overflow_child(false);
    assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV);
    buf = slurp(fx, &n);
    assert_null(strstr(buf, "event=fatal_signal"));
    free(buf);
}

/* The stamp made without gmtime_r (a signal handler may not call it) is
 * gmtime_r's: at the days around leap days, centuries and the 32-bit
 * end, and at times spread over the years 1970 to 9999. */
static void
test_stamp_format(void **state)
{
    (void)state;
    static const struct {
        int64_t sec;
        unsigned ms;
        const char *want;
    } cases[] = {
        {0, 0, "1970-01-01T00:00:00.000Z"},
        {-5, 7, "1970-01-01T00:00:00.007Z"}, /* before 1970: its start */
        {951782400, 999, "2000-02-29T00:00:00.999Z"},
        {951868799, 1, "2000-02-29T23:59:59.001Z"},
        {4107542400, 0, "2100-03-01T00:00:00.000Z"},
        {4107456000, 0, "2100-02-28T00:00:00.000Z"},
        {2147483648, 0, "2038-01-19T03:14:08.000Z"},
        {1796387559, 379, "2026-12-04T12:32:39.379Z"},
        {253402300799, 999, "9999-12-31T23:59:59.999Z"},
    };
    char out[LOG_STAMP_LEN + 1];
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(log_stamp_format(out, cases[i].sec, cases[i].ms), LOG_STAMP_LEN);
        assert_string_equal(out, cases[i].want);
    }
    uint64_t x = 88172645463325252ULL;
    for (int i = 0; i < 200000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        time_t t = (time_t)(x % 253402300800ULL);
        if (i % 2 == 0)
            t = (time_t)(x % 4102444800ULL); /* half of them before 2100 */
        struct tm tm;
        assert_non_null(gmtime_r(&t, &tm));
        char want[64];
        snprintf(want, sizeof(want), "%04d-%02d-%02dT%02d:%02d:%02d.042Z", tm.tm_year + 1900,
                 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        log_stamp_format(out, (int64_t)t, 42);
        assert_string_equal(out, want);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_hostile_quoted_values, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hostile_unquoted_values, setup, teardown),
        cmocka_unit_test_setup_teardown(test_key_passed_as_argument, setup, teardown),
        cmocka_unit_test_setup_teardown(test_angle_bracket_in_value, setup, teardown),
        cmocka_unit_test_setup_teardown(test_conversions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_line_is_cut_on_a_whole_escape, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_plain_value_fills_the_line, setup, teardown),
        cmocka_unit_test(test_escape_function),
        cmocka_unit_test_setup_teardown(test_batch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_header, setup, teardown),
        cmocka_unit_test(test_batch_to_a_pipe),
        cmocka_unit_test(test_stderr_file_cut_under_it),
        cmocka_unit_test(test_stderr_file_shared_with_another_writer),
        cmocka_unit_test(test_pwritev2_refused_by_seccomp),
        cmocka_unit_test_setup_teardown(test_fatal_signal, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fatal_signal_after_a_guard, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stack_overflow, setup, teardown),
        cmocka_unit_test(test_stamp_format),
        cmocka_unit_test_setup_teardown(test_reopen_keeps_the_descriptor, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
