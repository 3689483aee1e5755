/*
 * bench_feedback: how many bounce messages per second feedback_parse()
 * recognises and takes apart, per kind (Postfix, Gmail and Office 365
 * DSNs; Exim and Exchange texts; a Yahoo ARF report; an auto-reply), each
 * beside the ceiling of a memchr loop that finds every LF in the same
 * bytes; and VERP tokens made and checked per second (one HMAC-SHA256 per
 * RCPT at the bounce listener, two per report checked).
 *
 * Each figure is the best of several timed runs of ~20 ms. Numbers are
 * printed, never judged: this is not a test.
 *
 * Usage: bench_feedback [fixtures-dir]
 *
 * Threading: single-threaded.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "feedback/feedback.h"
#include "feedback/verp.h"

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

#define RUNS   7
#define RUN_NS 20000000ull

static volatile uint64_t sink;

/* Best items/s over RUNS runs of fn. */
static double
best_rate(void (*fn)(const char *, size_t), const char *m, size_t len)
{
    double best = 0;
    for (int r = 0; r < RUNS; r++) {
        uint64_t n = 0, t0 = clock_mono_ns(), t;
        do {
            fn(m, len);
            n++;
        } while ((t = clock_mono_ns()) - t0 < RUN_NS);
        double rate = (double)n * 1e9 / (double)(t - t0);
        if (rate > best)
            best = rate;
    }
    return best;
}

static struct feedback_result res;

static void
do_parse(const char *m, size_t len)
{
    feedback_parse(m, len, "bounce-", &res);
    sink += res.kind + res.nrcpt;
}

static void
do_memchr(const char *m, size_t len)
{
    const char *p = m, *end = m + len;
    uint64_t lines = 0;
    while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        p++;
        lines++;
    }
    sink += lines;
}

static const uint8_t key[] = "0123456789abcdef0123456789abcdef";
static char tok[VERP_TOKEN_MAX + 1];
static int tok_len;

static void
do_verp_make(const char *m, size_t len)
{
    struct verp_ref ref = {.msg_id = sink, .rcpt_index = 3};
    sink += (uint64_t)verp_token(key, 32, &ref, "reader@example.com", tok, sizeof(tok));
}

static void
do_verp_check(const char *m, size_t len)
{
    struct verp_ref ref;
    sink += (uint64_t)verp_parse(key, 32, tok, (size_t)tok_len, &ref) + ref.rcpt_index;
}

int
main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : FIXTURES;
    static const struct {
        const char *file, *what;
    } inputs[] = {
        {"postfix-dsn.eml", "Postfix DSN (2 rcpt)"},
        {"gmail-dsn.eml", "Gmail DSN (nested MIME)"},
        {"office365-ndr.eml", "Office 365 NDR (DSN)"},
        {"exim-bounce.eml", "Exim text bounce"},
        {"exchange-ndr.eml", "Exchange text NDR (QP)"},
        {"arf-yahoo.eml", "Yahoo ARF report"},
        {"autoreply-vacation.eml", "vacation auto-reply"},
    };
    printf("bench_feedback: build %s\n\n", BENCH_BUILD);
    printf("| input | octets | kind | messages/s | MB/s | memchr MB/s |\n");
    printf("| --- | --- | --- | --- | --- | --- |\n");
    for (size_t i = 0; i < sizeof(inputs) / sizeof(inputs[0]); i++) {
        char path[1024];
        snprintf(path, sizeof(path), "%s/%s", dir, inputs[i].file);
        FILE *f = fopen(path, "rb");
        if (f == NULL) {
            perror(path);
            return 1;
        }
        char *raw = malloc(1 << 16), *m = malloc(1 << 17);
        size_t n = fread(raw, 1, 1 << 16, f), len = 0;
        fclose(f);
        for (size_t k = 0; k < n; k++) { /* CRLF, as it arrives */
            if (raw[k] == '\n')
                m[len++] = '\r';
            m[len++] = raw[k];
        }
        free(raw);
        double rate = best_rate(do_parse, m, len);
        double ceil = best_rate(do_memchr, m, len);
        printf("| %s | %zu | %s | %.0f | %.0f | %.0f |\n", inputs[i].what, len,
               feedback_kind_str(res.kind), rate, rate * (double)len / 1e6,
               ceil * (double)len / 1e6);
        free(m);
    }
    /* The worst a client can hand the parser per message: a header
     * section of FEEDBACK_PARSE_MAX octets (every lookup scans it), and a
     * multipart of that size in 64-octet parts. */
    static const char *const hostile[] = {"2 MB header section", "2 MB of tiny MIME parts"};
    for (int h = 0; h < 2; h++) {
        size_t len = FEEDBACK_PARSE_MAX;
        char *m = malloc(len);
        size_t o = 0;
        if (h == 0) {
            while (o + 80 < len)
                o += (size_t)sprintf(m + o, "X-Filler-%06zu: %060d\r\n", o % 999999, 0);
        } else {
            o += (size_t)sprintf(m, "Content-Type: multipart/mixed; boundary=b\r\n\r\n");
            while (o + 80 < len)
                o += (size_t)sprintf(m + o, "--b\r\nContent-Type: text/plain\r\n\r\nx\r\n");
        }
        double rate = best_rate(do_parse, m, o);
        double ceil = best_rate(do_memchr, m, o);
        printf("| hostile: %s | %zu | %s | %.0f | %.0f | %.0f |\n", hostile[h], o,
               feedback_kind_str(res.kind), rate, rate * (double)o / 1e6,
               ceil * (double)o / 1e6);
        free(m);
    }
    tok_len = verp_token(key, 32, &(struct verp_ref){.msg_id = 1}, "reader@example.com", tok,
                         sizeof(tok));
    printf("\n| VERP | per second |\n| --- | --- |\n");
    printf("| token made (2 HMAC-SHA256) | %.0f |\n", best_rate(do_verp_make, NULL, 0));
    printf("| token checked (1 HMAC-SHA256) | %.0f |\n", best_rate(do_verp_check, NULL, 0));
    return 0;
}
