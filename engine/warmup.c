/*
 * warmup: see warmup.h. Today every source is without a plan: the set is
 * empty and every question answers "no limit".
 */
#include "engine/warmup.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>

struct warmup {
    unsigned nplans;
};

int
warmup_open(const struct config *cfg, struct warmup **out, char *err, size_t errlen)
{
    (void)cfg;
    (void)err;
    (void)errlen;
    struct warmup *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return -ENOMEM;
    *out = w;
    return 0;
}

struct warmup *
warmup_close(struct warmup *w)
{
    free(w);
    return NULL;
}

uint64_t
warmup_left(struct warmup *w, const char *source, const char *mx_host, uint64_t now_ms)
{
    (void)w;
    (void)source;
    (void)mx_host;
    (void)now_ms;
    return UINT64_MAX;
}

bool
warmup_take(struct warmup *w, const char *source, const char *mx_host, uint64_t now_ms)
{
    (void)w;
    (void)source;
    (void)mx_host;
    (void)now_ms;
    return true;
}

uint64_t
warmup_next_day_ms(struct warmup *w, const char *source, const char *mx_host, uint64_t now_ms)
{
    (void)w;
    (void)source;
    (void)mx_host;
    (void)now_ms;
    return 0;
}
