/*
 * bench_smtp: micro-benchmarks of the SMTP protocol core's hot paths
 * (reply parser, command parser, dot-unstuffing, dot-stuffing), each
 * beside the ceiling of a memchr loop that finds every LF in the same
 * bytes. Inputs are generated here from a fixed seed: a 2 KB transactional
 * text message, an 80 KB quoted-printable HTML newsletter (76-column lines
 * ending in soft breaks) and an adversarial body whose every line starts
 * with a dot; pipelined replies; a mix of commands.
 *
 * Each figure is the best of several timed runs of ~15 ms. Numbers are
 * printed, never judged: this is not a test.
 *
 * Usage: bench_smtp [reply|cmd|unstuff|stuff]...   (default: all)
 *
 * Threading: single-threaded.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "engine/smtp_cmd.h"
#include "engine/smtp_data.h"
#include "engine/smtp_reply.h"

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

#define RUNS      7
#define RUN_NS    15000000ull /* per timed run */
#define MAX_INPUT (256 * 1024)

/* Results feed this so that the compiler cannot drop the work. */
static volatile uint64_t sink;

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t
rng(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static size_t
rnd(size_t n)
{
    return (size_t)(rng() % n);
}

/*
 * Time fn(arg) (one pass over the input, returning a value to sink):
 * calibrate a repeat count to ~RUN_NS, then keep the best of RUNS runs.
 * Returns nanoseconds per pass.
 */
static double
best_ns(uint64_t (*fn)(void *), void *arg)
{
    uint64_t reps = 1, t0, dt, best = UINT64_MAX;

    for (;;) {
        t0 = clock_mono_ns();
        for (uint64_t i = 0; i < reps; i++)
            sink += fn(arg);
        dt = clock_mono_ns() - t0;
        if (dt >= RUN_NS / 4)
            break;
        reps *= 2;
    }
    reps = reps * RUN_NS / (dt ? dt : 1) + 1;
    for (int r = 0; r < RUNS; r++) {
        t0 = clock_mono_ns();
        for (uint64_t i = 0; i < reps; i++)
            sink += fn(arg);
        dt = clock_mono_ns() - t0;
        if (dt < best)
            best = dt;
    }
    return (double)best / (double)reps;
}

/* ---- the memchr ceiling ---- */

struct bytes {
    const char *p;
    size_t n;
};

static uint64_t
memchr_pass(void *arg)
{
    const struct bytes *b = arg;
    const char *p = b->p, *end = b->p + b->n;
    uint64_t lines = 0;

    while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        p++;
        lines++;
    }
    return lines;
}

static void
report(const char *what, const char *input, size_t bytes, double items, double ns,
       const char *item_name, double ceiling_ns)
{
    double mbs = (double)bytes / ns * 1e3, cmbs = (double)bytes / ceiling_ns * 1e3;

    printf("%-14s %-26s %9.0f MB/s %12.0f %s/s   memchr %7.0f MB/s   %5.2fx of memchr\n", what,
           input, mbs, items / ns * 1e9, item_name, cmbs, mbs / cmbs);
}

/* ---- message bodies ---- */

static const char *const words[] = {
    "the",     "your",    "order",  "account",     "newsletter", "offer",   "today",
    "please",  "confirm", "update", "shipping",    "receipt",    "thanks",  "news",
    "weekly",  "digest",  "member", "exclusive",   "price",      "details", "view",
    "browser", "click",   "here",   "unsubscribe", "privacy",    "team",    "support",
};

static size_t
put_words(char *p, size_t len)
{
    size_t n = 0;

    while (n < len) {
        const char *w = words[rnd(sizeof words / sizeof words[0])];
        size_t wl = strlen(w);

        if (n + wl + 1 > len)
            break;
        memcpy(p + n, w, wl);
        n += wl;
        p[n++] = ' ';
    }
    while (n < len)
        p[n++] = 'x';
    return n;
}

static size_t
headers(char *m)
{
    return (size_t)sprintf(m,
                           "Received: from app1.example.net (app1.example.net [192.0.2.10])\r\n"
                           "\tby relay.example.com (sluice) with ESMTPSA id 4F2A9C\r\n"
                           "From: \"Example Shop\" <orders@shop.example.com>\r\n"
                           "To: <customer%u@example.org>\r\n"
                           "Subject: Your order has shipped\r\n"
                           "Date: Mon, 3 Jun 2024 10:00:00 +0000\r\n"
                           "Message-ID: <20240603100000.%u@shop.example.com>\r\n"
                           "MIME-Version: 1.0\r\n",
                           (unsigned)rnd(100000), (unsigned)rnd(1000000));
}

/* ~2 KB of plain text, lines of 40..76. */
static size_t
gen_transactional(char *m)
{
    size_t n = headers(m);

    n += (size_t)sprintf(m + n, "Content-Type: text/plain; charset=utf-8\r\n\r\n");
    while (n < 2048 - 80) {
        n += put_words(m + n, 40 + rnd(37));
        m[n++] = '\r';
        m[n++] = '\n';
    }
    return n;
}

/* ~80 KB of quoted-printable HTML: 75 octets and a soft break "=". */
static size_t
gen_newsletter(char *m)
{
    static const char *const frags[] = {
        "<td style=3D\"padding:0 16px;font-family:Arial\">",
        "<a href=3D\"https://example.com/",
        "</td></tr><tr>",
        "<p class=3D\"lead\">",
        "=C3=A9",
        "=20",
        "</p>",
        "<br>",
    };
    size_t n = headers(m);

    n += (size_t)sprintf(m + n, "Content-Type: text/html; charset=utf-8\r\n"
                                "Content-Transfer-Encoding: quoted-printable\r\n\r\n");
    while (n < 80 * 1024 - 80) {
        size_t l = 0;
        char line[96];

        while (l < 75) {
            const char *f = rnd(3) == 0 ? frags[rnd(sizeof frags / sizeof frags[0])] : NULL;
            size_t fl = f ? strlen(f) : 0;

            if (f != NULL && l + fl <= 75) {
                memcpy(line + l, f, fl);
                l += fl;
            } else {
                line[l] = (char)('a' + rnd(26));
                l++;
            }
        }
        memcpy(m + n, line, 75);
        n += 75;
        memcpy(m + n, "=\r\n", 3);
        n += 3;
    }
    return n;
}

/* Every line starts with a dot: the worst case for both directions. */
static size_t
gen_dots(char *m)
{
    size_t n = 0;

    while (n < 80 * 1024 - 100) {
        m[n++] = '.';
        n += put_words(m + n, rnd(70));
        m[n++] = '\r';
        m[n++] = '\n';
    }
    return n;
}

/* ---- DATA ---- */

struct data_arg {
    const char *in;
    size_t n;
    char *out;
    size_t cap;
};

static uint64_t
unstuff_pass(void *arg)
{
    const struct data_arg *a = arg;
    struct smtp_unstuff u;
    size_t consumed, produced;

    smtp_unstuff_init(&u);
    if (smtp_unstuff(&u, a->in, a->n, a->out, &consumed, &produced) != SMTP_DATA_END)
        abort();
    return produced + u.flags;
}

static uint64_t
stuff_pass(void *arg)
{
    const struct data_arg *a = arg;
    struct smtp_stuff s;
    size_t consumed, produced, fin;

    smtp_stuff_init(&s);
    smtp_stuff(&s, a->in, a->n, a->out, a->cap, &consumed, &produced);
    if (consumed != a->n ||
        smtp_stuff_finish(&s, a->out + produced, a->cap - produced, &fin) != SMTP_DATA_END)
        abort();
    return produced + fin;
}

static void
bench_data(bool do_unstuff, bool do_stuff)
{
    static char msg[MAX_INPUT], wire[2 * MAX_INPUT], out[2 * MAX_INPUT];
    static const struct {
        const char *name;
        size_t (*gen)(char *);
    } bodies[] = {
        {"transactional 2 KB", gen_transactional},
        {"newsletter QP 80 KB", gen_newsletter},
        {"every line a dot 80 KB", gen_dots},
    };

    for (size_t b = 0; b < sizeof bodies / sizeof bodies[0]; b++) {
        size_t n = bodies[b].gen(msg), w, fin;
        struct smtp_stuff s;
        struct data_arg a;
        struct bytes raw = {msg, n}, stuffed;
        char name[64];

        smtp_stuff_init(&s);
        smtp_stuff(&s, msg, n, wire, sizeof wire, &a.n, &w);
        smtp_stuff_finish(&s, wire + w, sizeof wire - w, &fin);
        w += fin;
        stuffed.p = wire;
        stuffed.n = w;
        snprintf(name, sizeof name, "%s", bodies[b].name);
        if (do_stuff) {
            a.in = msg;
            a.n = n;
            a.out = out;
            a.cap = sizeof out;
            report("dot-stuff", name, n, 1, best_ns(stuff_pass, &a), "msg",
                   best_ns(memchr_pass, &raw));
        }
        if (do_unstuff) {
            a.in = wire;
            a.n = w;
            a.out = out;
            a.cap = sizeof out;
            report("dot-unstuff", name, w, 1, best_ns(unstuff_pass, &a), "msg",
                   best_ns(memchr_pass, &stuffed));
        }
    }
}

/* ---- replies ---- */

struct reply_arg {
    const char *in;
    size_t n;
    size_t read_size; /* bytes handed over per call, as recv() would */
    uint64_t replies;
};

static uint64_t
reply_pass(void *arg)
{
    struct reply_arg *a = arg;
    struct smtp_reply_parser p;
    uint64_t sum = 0, count = 0;

    smtp_reply_parser_init(&p);
    for (size_t off = 0; off < a->n;) {
        size_t chunk = a->n - off < a->read_size ? a->n - off : a->read_size, used = 0;

        for (size_t c = 0; c < chunk; c += used) {
            int rc = smtp_reply_parse(&p, a->in + off + c, chunk - c, &used);

            if (rc < 0)
                abort();
            if (rc == SMTP_REPLY_DONE) {
                sum += p.reply.code + p.reply.enh.detail + p.reply.text_len;
                count++;
            }
        }
        off += chunk;
    }
    a->replies = count;
    return sum;
}

/* Replies in buf[0..n), handed over in 4 KB reads. */
static void
run_replies(const char *name, const char *buf, size_t n)
{
    struct reply_arg a = {buf, n, 4096, 0};
    struct bytes b = {buf, n};

    reply_pass(&a);
    report("reply parse", name, n, (double)a.replies, best_ns(reply_pass, &a), "reply",
           best_ns(memchr_pass, &b));
}

static void
bench_reply(void)
{
    static char buf[MAX_INPUT];
    size_t n = 0;

    /* single-line replies as after DATA: "250 2.0.0 Ok: queued as X" */
    while (n < 64 * 1024 - 64)
        n += (size_t)sprintf(buf + n, "250 2.0.0 Ok: queued as %08" PRIX64 "\r\n",
                             rng() & 0xffffffffu);
    run_replies("250 single-line, 4K reads", buf, n);

    /* pipelined transactions: MAIL, RCPT x3, DATA, end of data */
    n = 0;
    while (n < 64 * 1024 - 256)
        n += (size_t)sprintf(buf + n,
                             "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                             "550 5.1.1 <u%u@example.org>: Recipient address rejected\r\n"
                             "354 End data with <CR><LF>.<CR><LF>\r\n"
                             "250 2.0.0 Ok: queued as %08" PRIX64 "\r\n",
                             (unsigned)rnd(100000), rng() & 0xffffffffu);
    run_replies("pipelined mix, 4K reads", buf, n);

    /* EHLO replies: ten lines each */
    n = 0;
    while (n < 64 * 1024 - 512)
        n += (size_t)sprintf(buf + n,
                             "250-mx%u.example.org Hello relay [192.0.2.1]\r\n"
                             "250-PIPELINING\r\n250-SIZE 52428800\r\n250-ETRN\r\n"
                             "250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n"
                             "250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n"
                             "250-DSN\r\n250 SMTPUTF8\r\n",
                             (unsigned)rnd(100));
    run_replies("EHLO 10 lines, 4K reads", buf, n);
}

/* ---- commands ---- */

#define NCMD 4096

struct cmd_arg {
    const char *buf;
    size_t n;
    struct smtp_span lines[NCMD];
    size_t count;
};

static uint64_t
cmd_pass(void *arg)
{
    const struct cmd_arg *a = arg;
    struct smtp_cmd c;
    uint64_t sum = 0;

    for (size_t i = 0; i < a->count; i++) {
        int rc = smtp_cmd_parse(a->lines[i].ptr, a->lines[i].len, 0, &c);

        if (rc != 0)
            abort();
        sum += (uint64_t)c.verb + c.path.mailbox.len + c.params.size;
    }
    return sum;
}

/* Framing included: find each CRLF in the receive buffer, then parse. */
static uint64_t
cmd_framed_pass(void *arg)
{
    const struct cmd_arg *a = arg;
    struct smtp_cmd c;
    uint64_t sum = 0;

    for (size_t off = 0; off < a->n;) {
        long len = smtp_cmd_line_find(a->buf + off, a->n - off, SMTP_CMD_LINE_MAX_AUTH, NULL);

        if (len <= 0 || smtp_cmd_parse(a->buf + off, (size_t)len - 2, 0, &c) != 0)
            abort();
        sum += (uint64_t)c.verb + c.path.mailbox.len;
        off += (size_t)len;
    }
    return sum;
}

static void
bench_cmd(void)
{
    static char buf[NCMD * 128];
    static struct cmd_arg a;
    struct bytes b;
    size_t n = 0;

    a.count = 0;
    /* transactions as a submission client pipelines them */
    while (a.count + 12 <= NCMD) {
        const char *lines[12];
        char tmp[12][160];
        int k = 0;

        snprintf(tmp[k], sizeof tmp[k], "EHLO app%u.example.net", (unsigned)rnd(50));
        lines[k] = tmp[k];
        k++;
        snprintf(tmp[k], sizeof tmp[k],
                 "MAIL FROM:<bounce-%u-%u@mail.shop.example.com> SIZE=%u BODY=8BITMIME",
                 (unsigned)rnd(1000000), (unsigned)rnd(1000), (unsigned)(2000 + rnd(80000)));
        lines[k] = tmp[k];
        k++;
        for (int r = 0; r < 6; r++, k++) {
            snprintf(tmp[k], sizeof tmp[k], "RCPT TO:<%s.%u@%s>",
                     words[rnd(sizeof words / sizeof words[0])], (unsigned)rnd(100000),
                     rnd(2) ? "gmail.com" : "mail.example.org");
            lines[k] = tmp[k];
        }
        lines[k++] = "DATA";
        lines[k++] = "RSET";
        lines[k++] = "NOOP";
        lines[k++] = "QUIT";
        for (int i = 0; i < k; i++) {
            size_t l = strlen(lines[i]);

            memcpy(buf + n, lines[i], l);
            a.lines[a.count].ptr = buf + n;
            a.lines[a.count].len = l;
            a.count++;
            n += l;
            memcpy(buf + n, "\r\n", 2);
            n += 2;
        }
    }
    a.buf = buf;
    a.n = n;
    b = (struct bytes){buf, n};
    report("command parse", "pipelined mix", n, (double)a.count, best_ns(cmd_pass, &a), "cmd",
           best_ns(memchr_pass, &b));
    report("command parse", "mix, with line framing", n, (double)a.count,
           best_ns(cmd_framed_pass, &a), "cmd", best_ns(memchr_pass, &b));
}

int
main(int argc, char **argv)
{
    bool all = argc < 2, want[4] = {all, all, all, all};
    static const char *const names[] = {"reply", "cmd", "unstuff", "stuff"};

    for (int i = 1; i < argc; i++) {
        bool found = false;

        for (int k = 0; k < 4; k++) {
            if (strcmp(argv[i], names[k]) == 0)
                want[k] = found = true;
        }
        if (!found) {
            fprintf(stderr, "usage: %s [reply|cmd|unstuff|stuff]...\n", argv[0]);
            return 2;
        }
    }
    printf("bench_smtp: build %s\n", BENCH_BUILD);
    printf("best of %d runs of ~%llu ms; MB = 10^6 bytes\n", RUNS,
           (unsigned long long)(RUN_NS / 1000000));
    if (want[0])
        bench_reply();
    if (want[1])
        bench_cmd();
    if (want[2] || want[3])
        bench_data(want[2], want[3]);
    return 0;
}
