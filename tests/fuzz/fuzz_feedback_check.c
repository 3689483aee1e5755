/*
 * The bounds every answer of feedback_parse() keeps, for the feedback
 * fuzz targets (fuzz_feedback_dsn.c, fuzz_feedback_arf.c): abort() when
 * one is broken.
 *
 * Threading: single-threaded fuzz targets.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "feedback/feedback.h"
#include "feedback/verp.h"

#define BOUNDED(f) (memchr((f), '\0', sizeof(f)) != NULL)

void fuzz_feedback_check(const struct feedback_result *r);

void
fuzz_feedback_check(const struct feedback_result *r)
{
    if (r->nrcpt > FEEDBACK_RCPT_MAX || r->nrcpt > r->nrcpt_seen + (r->kind == FEEDBACK_BOUNCE))
        abort();
    if (r->kind == FEEDBACK_DSN && r->nrcpt == 0)
        abort();
    if (r->kind == FEEDBACK_ARF && r->nrcpt != 0)
        abort();
    for (unsigned i = 0; i < r->nrcpt; i++) {
        const struct feedback_rcpt *rc = &r->rcpt[i];
        if (!BOUNDED(rc->addr) || !BOUNDED(rc->orig_addr) || !BOUNDED(rc->status) ||
            !BOUNDED(rc->diag) || !BOUNDED(rc->remote_mta))
            abort();
        if (rc->code != 0 && (rc->code < 400 || rc->code > 599))
            abort();
    }
    if (!BOUNDED(r->verp_local) || !BOUNDED(r->verp_domain) || !BOUNDED(r->orig_message_id) ||
        !BOUNDED(r->feedback_type) || !BOUNDED(r->orig_rcpt_to) || !BOUNDED(r->orig_to) ||
        !BOUNDED(r->sluice_rcpt) || !BOUNDED(r->from) || !BOUNDED(r->subject))
        abort();
    if (r->verp_local[0] != '\0') {
        if (strncasecmp(r->verp_local, "bounce-", 7) != 0)
            abort();
        static const uint8_t key[] = "fuzz-key-fuzz-key-fuzz-key-0123";
        struct verp_ref ref;
        int rc = verp_parse(key, 31, r->verp_local + 7, strlen(r->verp_local) - 7, &ref);
        if (rc != 0 && rc != VERP_EFORMAT && rc != VERP_EMAC)
            abort();
    }
}

