/*
 * libFuzzer target: feedback_parse() on RFC 5965 feedback reports. The
 * input is split at the first 0xFF octet: what comes before is the
 * message/feedback-report part's fields, what follows the original
 * message (message/rfc822), each put into a fixed multipart/report
 * skeleton so that the fuzzer spends its time in the report's fields and
 * the original's header section rather than in finding a boundary. The
 * answer must be an ARF report with the bounds fuzz_feedback_dsn checks.
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "feedback/feedback.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    return 0;
}

static const char head[] =
    "From: fbl@provider.example\r\nTo: fbl@fbl.example.com\r\nMIME-Version: 1.0\r\n"
    "Content-Type: multipart/report; report-type=feedback-report; boundary=\"==b==\"\r\n\r\n"
    "--==b==\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
    "--==b==\r\nContent-Type: message/feedback-report\r\n\r\n";
static const char mid[] = "\r\n--==b==\r\nContent-Type: message/rfc822\r\n\r\n";
static const char tail[] = "\r\n--==b==--\r\n";

/* fuzz_feedback_dsn.c's bounds, on this answer too */
void fuzz_feedback_check(const struct feedback_result *r);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *cut = memchr(data, 0xFF, size);
    size_t a = cut ? (size_t)(cut - data) : size;
    size_t b = cut ? size - a - 1 : 0;
    size_t len = sizeof(head) - 1 + a + sizeof(mid) - 1 + b + sizeof(tail) - 1;
    char *m = malloc(len);
    struct feedback_result *r = malloc(sizeof(*r));
    if (m == NULL || r == NULL) {
        free(m);
        free(r);
        return 0;
    }
    char *p = m;
    memcpy(p, head, sizeof(head) - 1);
    p += sizeof(head) - 1;
    memcpy(p, data, a);
    p += a;
    memcpy(p, mid, sizeof(mid) - 1);
    p += sizeof(mid) - 1;
    if (b > 0)
        memcpy(p, cut + 1, b);
    p += b;
    memcpy(p, tail, sizeof(tail) - 1);
    if (feedback_parse(m, len, "bounce-", r) != 0 || r->kind != FEEDBACK_ARF)
        abort();
    fuzz_feedback_check(r);
    free(r);
    free(m);
    return 0;
}
