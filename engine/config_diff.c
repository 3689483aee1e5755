/*
 * config_diff: what a reload changed, for its log line
 * (event=config_reloaded changed="[delivery] initial_connections,
 * [mx *.google.com] max_connections, +[domain new.example]"): the keys of
 * the single sections whose values differ, and of the sections that
 * repeat ([domain], [mx], [source], [pool], [tenant]) each one added (+),
 * removed (-) or with a key changed. A [domain NAME] key that follows
 * [domain *] in both configs is not its own change (the [domain *] key
 * is said). [events NAME] sections are compared key by key, each
 * [warmup NAME] plan and [classify] as a whole, and the shaping rules by
 * what was read from their files (a rules file edited in place is a
 * change). Not compared here: [dkim DOMAIN SELECTOR] sections and the
 * keys under [dkim] key_dir (read again at every reload), the users file
 * and the TLS files: engine_reload adds those whose contents changed.
 *
 * Threading: any thread; reads both configs only.
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "engine/classify.h"
#include "engine/config.h"
#include "engine/config_int.h"
#include "engine/events.h"
#include "engine/shaping.h"
#include "engine/warmup_conf.h"

#define DIFF_SHOWN 12 /* changes named; the rest counted */

struct diff {
    char *out;
    size_t len, used;
    unsigned n;
};

static void diff_add(struct diff *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
diff_add(struct diff *d, const char *fmt, ...)
{
    if (d->n++ >= DIFF_SHOWN || d->used >= d->len)
        return;
    if (d->used > 0)
        d->used += (size_t)snprintf(d->out + d->used, d->len - d->used, ", ");
    if (d->used >= d->len)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(d->out + d->used, d->len - d->used, fmt, ap);
    va_end(ap);
    if (n > 0)
        d->used += (size_t)n;
}

static bool
key_same(const struct conf_key *k, const void *a, const void *b)
{
    const char *pa = (const char *)a + k->offset, *pb = (const char *)b + k->offset;
    switch (k->type) {
    case CONF_BOOL:
        return *(const bool *)pa == *(const bool *)pb;
    case CONF_UINT:
        return *(const unsigned *)pa == *(const unsigned *)pb;
    case CONF_SIZE:
    case CONF_DURATION:
        return *(const uint64_t *)pa == *(const uint64_t *)pb;
    case CONF_RATE: {
        const struct conf_rate *x = (const void *)pa, *y = (const void *)pb;
        return x->count == y->count && (x->count == 0 || x->per_ms == y->per_ms);
    }
    case CONF_STRING: {
        const char *x = *(char *const *)pa, *y = *(char *const *)pb;
        return x == y || (x != NULL && y != NULL && strcmp(x, y) == 0);
    }
    case CONF_ENUM:
        return *(const int *)pa == *(const int *)pb;
    case CONF_DURATIONS: {
        const struct conf_durations *x = (const void *)pa, *y = (const void *)pb;
        return x->n == y->n && memcmp(x->ms, y->ms, x->n * sizeof(x->ms[0])) == 0;
    }
    }
    return true;
}

/* The keys of one section that differ between a and b, each as
 * "label key"; with defaults (da, db: [domain *] of each config), a key
 * that is its default's in both is left out. */
static void
diff_keys(struct diff *d, const char *label, const struct conf_key *keys, const void *a,
          const void *b, const void *da, const void *db)
{
    for (const struct conf_key *k = keys; k->name != NULL; k++) {
        if (key_same(k, a, b))
            continue;
        if (da != NULL && key_same(k, a, da) && key_same(k, b, db))
            continue;
        diff_add(d, "%s %s", label, k->name);
    }
}

/* A repeated section: n items of size sz from base, named by the string
 * at name_off. */
struct rep {
    const char *what; /* "domain", "mx", ... */
    const struct conf_key *keys;
    const char *a, *b;
    unsigned na, nb;
    size_t sz, name_off;
    const void *da, *db;
};

static const char *
rep_name(const struct rep *r, const char *base, unsigned i)
{
    const char *name = *(char *const *)(base + i * r->sz + r->name_off);
    return name != NULL ? name : "";
}

static void
diff_rep(struct diff *d, const struct rep *r)
{
    char label[300];
    for (unsigned j = 0; j < r->nb; j++) {
        const char *name = rep_name(r, r->b, j);
        unsigned i = 0;
        while (i < r->na && strcasecmp(rep_name(r, r->a, i), name) != 0)
            i++;
        if (i == r->na) {
            diff_add(d, "+[%s %s]", r->what, name);
            continue;
        }
        snprintf(label, sizeof(label), "[%s %s]", r->what, name);
        diff_keys(d, label, r->keys, r->a + i * r->sz, r->b + j * r->sz, r->da, r->db);
    }
    for (unsigned i = 0; i < r->na; i++) {
        const char *name = rep_name(r, r->a, i);
        unsigned j = 0;
        while (j < r->nb && strcasecmp(rep_name(r, r->b, j), name) != 0)
            j++;
        if (j == r->nb)
            diff_add(d, "-[%s %s]", r->what, name);
    }
}

static bool
schedule_same(const uint64_t *a, unsigned na, const uint64_t *b, unsigned nb)
{
    return na == nb && (na == 0 || memcmp(a, b, na * sizeof(*a)) == 0);
}

static bool
warmup_same(const struct warmup_plan_conf *a, const struct warmup_plan_conf *b)
{
    if (!schedule_same(a->schedule, a->ndays, b->schedule, b->ndays) ||
        a->utc_offset_min != b->utc_offset_min || a->ngroups != b->ngroups)
        return false;
    for (unsigned g = 0; g < a->ngroups; g++) {
        const struct warmup_group_conf *x = &a->groups[g], *y = &b->groups[g];
        if (strcmp(x->name, y->name) != 0 || x->npatterns != y->npatterns ||
            x->scale != y->scale || !schedule_same(x->schedule, x->ndays, y->schedule, y->ndays))
            return false;
        for (unsigned i = 0; i < x->npatterns; i++)
            if (strcmp(x->patterns[i], y->patterns[i]) != 0)
                return false;
    }
    return true;
}

/* [warmup NAME] plans: each added, removed, or changed in any way. */
static void
diff_warmups(struct diff *d, const struct config *a, const struct config *b)
{
    for (unsigned j = 0; j < b->nwarmups; j++) {
        const struct warmup_plan_conf *y = &b->warmups[j];
        unsigned i = 0;
        while (i < a->nwarmups && strcasecmp(a->warmups[i].name, y->name) != 0)
            i++;
        if (i == a->nwarmups)
            diff_add(d, "+[warmup %s]", y->name);
        else if (!warmup_same(&a->warmups[i], y))
            diff_add(d, "[warmup %s]", y->name);
    }
    for (unsigned i = 0; i < a->nwarmups; i++) {
        unsigned j = 0;
        while (j < b->nwarmups && strcasecmp(b->warmups[j].name, a->warmups[i].name) != 0)
            j++;
        if (j == b->nwarmups)
            diff_add(d, "-[warmup %s]", a->warmups[i].name);
    }
}

static bool
str_same(const char *x, const char *y)
{
    return x == y || (x != NULL && y != NULL && strcmp(x, y) == 0);
}

unsigned
config_changes(const struct config *a, const struct config *b, char *out, size_t len)
{
    struct diff d = {.out = out, .len = len};
    if (len > 0)
        out[0] = '\0';
    char label[64];
    for (unsigned s = 0; s < NSECTIONS; s++) {
        const struct section *sec = &config_sections[s];
        snprintf(label, sizeof(label), "[%s]", sec->name);
        diff_keys(&d, label, sec->keys, (const char *)a + sec->offset,
                  (const char *)b + sec->offset, NULL, NULL);
    }
    diff_keys(&d, "[domain *]", config_domain_keys, &a->default_domain, &b->default_domain, NULL,
              NULL);
    const struct rep reps[] = {
        {"domain", config_domain_keys, (const char *)a->domains, (const char *)b->domains,
         a->ndomains, b->ndomains, sizeof(*a->domains), offsetof(struct domain_policy, name),
         &a->default_domain, &b->default_domain},
        {"mx", config_mx_keys, (const char *)a->mxs, (const char *)b->mxs, a->nmxs, b->nmxs,
         sizeof(*a->mxs), offsetof(struct mx_policy, pattern), NULL, NULL},
        {"source", config_source_keys, (const char *)a->sources, (const char *)b->sources,
         a->nsources, b->nsources, sizeof(*a->sources), offsetof(struct mx_policy, pattern),
         NULL, NULL},
        {"pool", config_pool_keys, (const char *)a->pools, (const char *)b->pools, a->npools,
         b->npools, sizeof(*a->pools), offsetof(struct pool_config, name), NULL, NULL},
        {"tenant", config_tenant_keys, (const char *)a->tenants, (const char *)b->tenants,
         a->ntenants, b->ntenants, sizeof(*a->tenants), offsetof(struct tenant_config, name),
         NULL, NULL},
        {"events", events_sink_keys, (const char *)a->events, (const char *)b->events,
         a->nevents, b->nevents, sizeof(*a->events), offsetof(struct events_sink_config, name),
         NULL, NULL},
    };
    for (size_t i = 0; i < sizeof(reps) / sizeof(reps[0]); i++)
        diff_rep(&d, &reps[i]);
    diff_warmups(&d, a, b);
    if (!classify_same(a->classify, b->classify))
        diff_add(&d, "[classify]");
    /* The same files named (else "[shaping] rules" is said above), read
     * into other rules: a file edited in place. */
    if (a->shaping_rules != NULL && b->shaping_rules != NULL &&
        str_same(a->shaping.rules, b->shaping.rules) &&
        a->shaping.builtin_rules == b->shaping.builtin_rules &&
        !shaping_rules_same(a->shaping_rules, b->shaping_rules))
        diff_add(&d, "[shaping] rules (the file's contents)");
    if (d.n > DIFF_SHOWN && d.used < len)
        snprintf(out + d.used, len - d.used, ", and %u more", d.n - DIFF_SHOWN);
    return d.n;
}
