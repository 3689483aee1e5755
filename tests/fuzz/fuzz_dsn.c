/*
 * libFuzzer target: the DSN builder (engine/dsn.c) with hostile inputs.
 * The input is split at 0xFF octets into the fields a DSN is built from:
 * envelope fields (sender, ENVID, ORCPT, queue id), each recipient's
 * address, status, reply text and MX name, and the original message;
 * the first octet holds flags (RET=FULL, SMTPUTF8, actions, a small
 * full_max). Whatever the bytes, dsn_build() returns 0 or -EINVAL, and a
 * built DSN is a message that cannot be turned into another: CRLF lines
 * only, none over 998 octets, no NUL, only our own header fields, the
 * boundary on exactly the delimiter lines of its two or three parts, and
 * 7-bit unless SMTPUTF8 (an 8-bit original comes back as its headers,
 * quoted-printable: the DSN reaches an MX without 8BITMIME).
 *
 * Threading: single-threaded fuzz target.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "engine/dsn.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FIELDS   24
#define RCPT_MAX 4

static void
check_at(int cond, int line)
{
    if (!cond) {
        fprintf(stderr, "fuzz_dsn.c:%d: invariant broken\n", line);
        abort();
    }
}
#define check(cond) check_at((cond), __LINE__)

/* Field i of the input as a NUL-terminated string (a NUL inside ends it,
 * as it would in C strings from the spool), or def when absent. */
static const char *
field(char **f, unsigned n, unsigned i, const char *def)
{
    return i < n ? f[i] : def;
}

static bool
starts(const char *p, size_t n, const char *prefix)
{
    size_t l = strlen(prefix);
    return n >= l && strncasecmp(p, prefix, l) == 0;
}

/* Lines of out[0..len): CRLF only, at most 998 octets, no NUL. */
static void
check_lines(const char *out, size_t len)
{
    check(memchr(out, '\0', len) == NULL);
    size_t col = 0;
    for (size_t i = 0; i < len; i++) {
        if (out[i] == '\r') {
            check(i + 1 < len && out[i + 1] == '\n');
            i++;
            col = 0;
        } else {
            check(out[i] != '\n');
            check(++col <= 998);
        }
    }
    check(len >= 2 && out[len - 2] == '\r' && out[len - 1] == '\n');
}

/* The top header section holds only the fields dsn_build writes. */
static void
check_headers(const char *out, size_t len, char *boundary, size_t cap)
{
    static const char *const known[] = {"From:",         "To:",           "Subject:",
                                        "Date:",         "Message-ID:",   "Auto-Submitted:",
                                        "MIME-Version:", "Content-Type:", "Content-Transfer-Encoding:"};
    const char *end = strstr(out, "\r\n\r\n");
    check(end != NULL);
    boundary[0] = '\0';
    for (const char *p = out; p <= end;) {
        const char *eol = strstr(p, "\r\n");
        size_t n = (size_t)(eol - p);
        if (p[0] != ' ' && p[0] != '\t') {
            bool ok = false;
            for (size_t i = 0; i < sizeof(known) / sizeof(known[0]) && !ok; i++)
                ok = starts(p, n, known[i]);
            check(ok);
        }
        p = eol + 2;
    }
    /* the multipart/report field may be folded: its parameter is the one
     * boundary= of the section */
    const char *ct = strstr(out, "\r\nContent-Type: multipart/report;");
    check(ct != NULL && ct < end);
    const char *b = strstr(ct, "boundary=\"");
    check(b != NULL && b < end);
    b += 10;
    const char *q = memchr(b, '"', (size_t)(end - b));
    check(q != NULL && q > b && (size_t)(q - b) < cap);
    memcpy(boundary, b, (size_t)(q - b));
    boundary[q - b] = '\0';
}

/* In the body (a header value may hold anything: only body lines can
 * delimit), the boundary only on delimiter lines: parts + 1 of them, the
 * last the closing one. */
static void
check_boundary(const char *out, size_t len, const char *b, unsigned parts)
{
    size_t bl = strlen(b);
    unsigned seen = 0, closing = 0;
    const char *body = strstr(out, "\r\n\r\n") + 2;
    for (const char *p = body; (p = memmem(p, len - (size_t)(p - out), b, bl)) != NULL; p += bl) {
        check(p >= body + 4 && memcmp(p - 4, "\r\n--", 4) == 0);
        const char *after = p + bl;
        if (after[0] == '-' && after[1] == '-') {
            closing++;
            check(after + 4 == out + len && after[2] == '\r');
        } else {
            check(after[0] == '\r' && after[1] == '\n');
        }
        seen++;
    }
    check(closing == 1 && seen == parts + 1);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    unsigned flags = data[0];
    char *copy = malloc(size);
    if (copy == NULL)
        return 0;
    memcpy(copy, data + 1, size - 1);
    copy[size - 1] = '\0';
    char *f[FIELDS];
    unsigned nf = 0;
    size_t orig_len = 0;
    for (char *p = copy; nf < FIELDS;) {
        f[nf++] = p;
        char *sep = memchr(p, 0xff, (size_t)(copy + size - 1 - p));
        if (sep == NULL) {
            orig_len = strlen(p);
            break;
        }
        *sep = '\0';
        p = sep + 1;
    }
    /* The original is the last field, taken with any NULs it holds. */
    const char *orig = nf > 0 ? f[nf - 1] : NULL;
    orig_len = nf > 0 ? (size_t)(copy + size - 1 - f[nf - 1]) : 0;

    struct dsn_rcpt r[RCPT_MAX];
    unsigned nrcpt = 1 + (flags >> 6);
    char status[RCPT_MAX][DSN_STATUS_MAX];
    enum dsn_action act[RCPT_MAX];
    for (unsigned i = 0; i < nrcpt; i++) {
        unsigned base = 8 + 4 * i;
        /* with flag 4: the first delayed, the others relayed or failed by
         * their address's length (all relayed: a success report) */
        act[i] = !(flags & 4) ? DSN_ACTION_FAILED
                 : i == 0 && (flags & 0x10) ? DSN_ACTION_DELAYED
                 : strlen(field(f, nf, base, "rcpt@example.com")) % 2 ? DSN_ACTION_FAILED
                                                                     : DSN_ACTION_RELAYED;
        const char *st = field(f, nf, base + 1, "5.1.1");
        /* half the time a status from dsn_status_format, as the engine does */
        if (flags & 0x08) {
            unsigned char c = (unsigned char)st[0];
            struct smtp_enh enh = {.cls = (uint8_t)(c % 8), .subject = (uint16_t)(c * 5),
                                   .detail = (uint16_t)(c * 7)};
            check(dsn_status_format(status[i], sizeof(status[i]), &enh, c * 3u, act[i]) == 0);
            st = status[i];
        }
        r[i] = (struct dsn_rcpt){
            .addr = field(f, nf, base, "rcpt@example.com"),
            .orcpt = field(f, nf, 7, NULL),
            .action = act[i],
            .status = st,
            .code = (unsigned)(flags * 7 % 600),
            .text = field(f, nf, base + 2, NULL),
            .remote_mta = field(f, nf, base + 3, NULL),
            .last_attempt_ms = 1700000000000ULL,
            .retry_until_ms = (flags & 4) ? 1800000000000ULL : 0,
            .class_str = (flags & 0x10) ? field(f, nf, 6, "other") : NULL,
        };
    }
    struct dsn_input in = {
        .reporting_mta = field(f, nf, 0, "mx.example.net"),
        .from_addr = field(f, nf, 1, "MAILER-DAEMON@mx.example.net"),
        .to_addr = field(f, nf, 2, "sender@example.org"),
        .message_id = field(f, nf, 3, "abc.dsn1@mx.example.net"),
        .boundary_seed = field(f, nf, 4, "seed"),
        .envid = field(f, nf, 5, NULL),
        .queue_id = field(f, nf, 3, NULL),
        .arrival_ms = 1700000000000ULL,
        .now_ms = (uint64_t)flags * 86400000ULL * 365,
        .orig = (flags & 0x20) ? orig : NULL,
        .orig_len = (flags & 0x20) ? orig_len : 0,
        .ret_full = (flags & 1) != 0,
        .full_max = (flags & 0x80) ? 64 : 0,
        .smtputf8 = (flags & 2) != 0,
        .rcpt = r,
        .nrcpt = nrcpt,
    };

    char *out = NULL;
    size_t len = 0;
    int rc = dsn_build(&in, &out, &len);
    check(rc == 0 || rc == -EINVAL);
    if (rc == 0) {
        check(out != NULL && out[len] == '\0');
        check_lines(out, len);
        char b[128];
        check_headers(out, len, b, sizeof(b));
        check_boundary(out, len, b, in.orig != NULL && in.orig_len > 0 ? 3 : 2);
        if (!in.smtputf8)
            for (size_t i = 0; i < len; i++)
                check((unsigned char)out[i] < 0x80);
        free(out);
    } else {
        check(out == NULL && len == 0);
    }
    free(copy);
    return 0;
}
