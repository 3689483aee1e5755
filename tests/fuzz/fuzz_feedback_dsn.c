/*
 * libFuzzer target: feedback_parse() (feedback/feedback.c) on whole
 * messages as they arrive at the bounce listener: DSNs, non-standard
 * bounces, anything. Seeds: the bounce fixtures. Whatever the bytes, the
 * parser returns 0, reads nothing outside the input (ASan), and its
 * answer is bounded: every string NUL-terminated in its buffer, at most
 * FEEDBACK_RCPT_MAX recipients, a DSN has at least one, and a VERP local
 * part found starts with the prefix asked for. What it found is then fed
 * to verp_parse() (the listener does), which must refuse it or agree.
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdlib.h>

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

/* fuzz_feedback_check.c */
void fuzz_feedback_check(const struct feedback_result *r);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct feedback_result *r = malloc(sizeof(*r));
    if (r == NULL)
        return 0;
    if (feedback_parse((const char *)data, size, "bounce-", r) != 0)
        abort();
    fuzz_feedback_check(r);
    free(r);
    return 0;
}
