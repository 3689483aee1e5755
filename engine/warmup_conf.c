/*
 * warmup_conf: parses and checks [warmup NAME] sections (warmup_conf.h)
 * and answers a finished plan's questions: a host's group, a day's
 * allowance, the plan's calendar day. Pure: no I/O, no global state.
 */
#include "engine/warmup_conf.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "engine/config.h"

static const struct {
    const char *name;
    const char *patterns[4];
} builtins[] = {
    {"gmail", {"*.google.com", "*.googlemail.com", NULL}},
    {"microsoft", {"*.outlook.com", "*.protection.outlook.com", "*.hotmail.com", NULL}},
    {"yahoo", {"*.yahoodns.net", NULL}},
};
#define NBUILTINS (sizeof(builtins) / sizeof(builtins[0]))

static bool
name_ok(const char *s, size_t n)
{
    if (n == 0 || n > WARMUP_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '.' && s[i] != '_' && s[i] != '-')
            return false;
    return true;
}

static bool
host_ok(const char *s)
{
    size_t len = strlen(s);
    if (len == 0 || len > 253 || s[0] == '.' || s[len - 1] == '.' || strstr(s, "..") != NULL)
        return false;
    for (const char *c = s; *c; c++)
        if (!isalnum((unsigned char)*c) && *c != '-' && *c != '_' && *c != '.')
            return false;
    return true;
}

/* "50, 100, 200": every entry 1..WARMUP_PER_DAY_MAX, at most WARMUP_DAYS_MAX. */
static int
parse_schedule(const char *value, uint64_t **out, unsigned *n, char *why, size_t whylen)
{
    uint64_t *v = NULL;
    unsigned cnt = 0;
    const char *s = value;
    for (;;) {
        while (*s == ' ' || *s == '\t')
            s++;
        if (*s == '\0' && cnt == 0)
            break;
        char *end;
        if (*s < '0' || *s > '9') {
            snprintf(why, whylen, "expected messages per day like \"50, 100, 200\", got \"%s\"",
                     value);
            goto fail;
        }
        errno = 0;
        unsigned long long x = strtoull(s, &end, 10);
        if (errno != 0 || x == 0 || x > WARMUP_PER_DAY_MAX) {
            snprintf(why, whylen, "day %u: %.*s is not 1..%llu messages", cnt + 1,
                     (int)strcspn(s, ", \t"), s, WARMUP_PER_DAY_MAX);
            goto fail;
        }
        if (cnt == WARMUP_DAYS_MAX) {
            snprintf(why, whylen, "more than %d days", WARMUP_DAYS_MAX);
            goto fail;
        }
        uint64_t *nv = realloc(v, (cnt + 1) * sizeof(*nv));
        if (nv == NULL) {
            snprintf(why, whylen, "out of memory");
            goto fail;
        }
        v = nv;
        v[cnt++] = x;
        s = end;
        while (*s == ' ' || *s == '\t')
            s++;
        if (*s == '\0')
            break;
        if (*s != ',') {
            snprintf(why, whylen, "expected messages per day like \"50, 100, 200\", got \"%s\"",
                     value);
            goto fail;
        }
        s++;
    }
    if (cnt == 0) {
        snprintf(why, whylen, "empty: at least one day's messages");
        goto fail;
    }
    *out = v;
    *n = cnt;
    return 0;
fail:
    free(v);
    return -1;
}

static struct warmup_group_conf *
find_group(struct warmup_plan_conf *pl, const char *name)
{
    for (unsigned i = 0; i < pl->ngroups; i++)
        if (strcasecmp(pl->groups[i].name, name) == 0)
            return &pl->groups[i];
    return NULL;
}

static struct warmup_pending *
pending_for(struct warmup_plan_conf *pl, const char *group)
{
    for (unsigned i = 0; i < pl->npending; i++)
        if (strcasecmp(pl->pending[i].group, group) == 0)
            return &pl->pending[i];
    struct warmup_pending *v = realloc(pl->pending, (pl->npending + 1) * sizeof(*v));
    if (v == NULL)
        return NULL;
    pl->pending = v;
    struct warmup_pending *p = &v[pl->npending++];
    memset(p, 0, sizeof(*p));
    snprintf(p->group, sizeof(p->group), "%s", group);
    return p;
}

static int
add_group(struct warmup_plan_conf *pl, const char *name, const char *value, unsigned line,
          char *why, size_t whylen)
{
    if (strcasecmp(name, "other") == 0) {
        snprintf(why, whylen, "\"other\" is every host no group matches: it has no patterns");
        return -1;
    }
    if (find_group(pl, name) != NULL) {
        snprintf(why, whylen, "group %s: defined twice", name);
        return -1;
    }
    if (pl->ngroups + 1 >= WARMUP_GROUPS_MAX) { /* room kept for "other" */
        snprintf(why, whylen, "more than %d groups", WARMUP_GROUPS_MAX - 1);
        return -1;
    }
    struct warmup_group_conf *g = &pl->groups[pl->ngroups];
    memset(g, 0, sizeof(*g));
    snprintf(g->name, sizeof(g->name), "%s", name);
    g->scale = 1.0;
    g->line = line;
    for (const char *s = value; *s != '\0';) {
        while (*s == ' ' || *s == '\t' || *s == ',')
            s++;
        size_t n = strcspn(s, ", \t");
        if (n == 0)
            break;
        char pat[256];
        if (n >= sizeof(pat) || g->npatterns == WARMUP_PATTERNS_MAX) {
            snprintf(why, whylen, "group %s: a pattern too long, or more than %d", name,
                     WARMUP_PATTERNS_MAX);
            goto fail;
        }
        for (size_t i = 0; i < n; i++)
            pat[i] = (char)tolower((unsigned char)s[i]);
        pat[n] = '\0';
        if (n > 1 && pat[n - 1] == '.')
            pat[n - 1] = '\0';
        const char *host = strncmp(pat, "*.", 2) == 0 ? pat + 2 : pat;
        if (!host_ok(host)) {
            snprintf(why, whylen, "group %s: \"%s\" is not a host name or *.suffix pattern",
                     name, pat);
            goto fail;
        }
        if ((g->patterns[g->npatterns] = strdup(pat)) == NULL) {
            snprintf(why, whylen, "out of memory");
            goto fail;
        }
        g->npatterns++;
        s += n;
    }
    if (g->npatterns == 0) {
        snprintf(why, whylen, "group %s: no patterns (\"*.example.com, mx.example.net\")", name);
        goto fail;
    }
    pl->ngroups++;
    return 0;
fail:
    for (unsigned i = 0; i < g->npatterns; i++)
        free(g->patterns[i]);
    memset(g, 0, sizeof(*g));
    return -1;
}

static int
parse_offset(const char *v, int *min)
{
    int sign = 1;
    if (*v == '+' || *v == '-')
        sign = *v++ == '-' ? -1 : 1;
    unsigned h, m = 0;
    char tail;
    int n = sscanf(v, "%2u:%2u%c", &h, &m, &tail);
    if (n != 2 && !(n == 1 && strspn(v, "0123456789") == strlen(v) && strlen(v) <= 2))
        return -EINVAL;
    if (h > 14 || m > 59 || h * 60 + m > 14 * 60)
        return -EINVAL;
    *min = sign * (int)(h * 60 + m);
    return 0;
}

int
warmup_conf_key(struct warmup_plan_conf *pl, const char *name, const char *value, unsigned line,
                char *why, size_t whylen)
{
    char word[32], arg[WARMUP_NAME_MAX + 2], extra[2];
    int n = sscanf(name, "%31s %65s %1s", word, arg, extra);
    if (n == 1 && strcmp(word, "schedule") == 0) {
        if (pl->schedule_line != 0) {
            snprintf(why, whylen, "schedule: set twice (first at line %u)", pl->schedule_line);
            return -1;
        }
        if (parse_schedule(value, &pl->schedule, &pl->ndays, why, whylen) < 0)
            return -1;
        pl->schedule_line = line;
        return 0;
    }
    if (n == 1 && strcmp(word, "utc_offset") == 0) {
        if (parse_offset(value, &pl->utc_offset_min) < 0) {
            snprintf(why, whylen, "utc_offset: expected +HH:MM or -HH:MM within 14 hours, "
                                  "got \"%s\"",
                     value);
            return -1;
        }
        return 0;
    }
    if (n == 2 && (strcmp(word, "group") == 0 || strcmp(word, "schedule") == 0 ||
                   strcmp(word, "scale") == 0)) {
        if (!name_ok(arg, strlen(arg))) {
            snprintf(why, whylen, "%s %s: a group name is 1 to %d of A-Z a-z 0-9 . _ -", word,
                     arg, WARMUP_NAME_MAX);
            return -1;
        }
        if (word[1] == 'r') /* group */
            return add_group(pl, arg, value, line, why, whylen);
        struct warmup_pending *p = pending_for(pl, arg);
        if (p == NULL) {
            snprintf(why, whylen, "out of memory");
            return -1;
        }
        if (word[1] == 'c' && word[2] == 'h') { /* schedule GROUP */
            if (p->schedule != NULL) {
                snprintf(why, whylen, "schedule %s: set twice", arg);
                return -1;
            }
            if (parse_schedule(value, &p->schedule, &p->ndays, why, whylen) < 0)
                return -1;
        } else { /* scale GROUP */
            if (p->scale != 0) {
                snprintf(why, whylen, "scale %s: set twice", arg);
                return -1;
            }
            char *end;
            errno = 0;
            double f = strtod(value, &end);
            while (*end == ' ' || *end == '\t')
                end++;
            if (errno != 0 || end == value || *end != '\0' || !(f >= 0.01 && f <= 100)) {
                snprintf(why, whylen, "scale %s: expected a factor from 0.01 to 100, got \"%s\"",
                         arg, value);
                return -1;
            }
            p->scale = f;
        }
        if (p->line == 0)
            p->line = line;
        return 0;
    }
    snprintf(why, whylen,
             "unknown key in [warmup %s] (schedule, schedule GROUP, group GROUP, scale GROUP, "
             "utc_offset)",
             pl->name);
    return -1;
}

int
warmup_conf_finish(struct warmup_plan_conf *pl, unsigned *line, char *why, size_t whylen)
{
    *line = pl->line;
    if (pl->schedule == NULL) {
        snprintf(why, whylen, "[warmup %s]: schedule: not set (messages per day, day 1 first)",
                 pl->name);
        return -1;
    }
    for (size_t b = 0; b < NBUILTINS; b++) {
        if (find_group(pl, builtins[b].name) != NULL)
            continue; /* redefined */
        if (pl->ngroups + 1 >= WARMUP_GROUPS_MAX) {
            snprintf(why, whylen, "[warmup %s]: more than %d groups with the built-in ones",
                     pl->name, WARMUP_GROUPS_MAX - 1);
            return -1;
        }
        struct warmup_group_conf *g = &pl->groups[pl->ngroups];
        memset(g, 0, sizeof(*g));
        snprintf(g->name, sizeof(g->name), "%s", builtins[b].name);
        g->scale = 1.0;
        for (const char *const *p = builtins[b].patterns; *p != NULL; p++)
            if ((g->patterns[g->npatterns] = strdup(*p)) != NULL)
                g->npatterns++;
        pl->ngroups++;
    }
    struct warmup_group_conf *other = &pl->groups[pl->ngroups++];
    memset(other, 0, sizeof(*other));
    snprintf(other->name, sizeof(other->name), "other");
    other->scale = 1.0;
    for (unsigned i = 0; i < pl->npending; i++) {
        struct warmup_pending *p = &pl->pending[i];
        struct warmup_group_conf *g = find_group(pl, p->group);
        *line = p->line;
        if (g == NULL) {
            snprintf(why, whylen, "[warmup %s]: no group %s (groups: those of the section, "
                                  "gmail, microsoft, yahoo, other)",
                     pl->name, p->group);
            return -1;
        }
        if (p->schedule != NULL && p->scale != 0) {
            snprintf(why, whylen, "[warmup %s]: group %s has both a schedule and a scale "
                                  "(a scale applies to the plan's schedule)",
                     pl->name, p->group);
            return -1;
        }
        if (p->schedule != NULL) {
            g->schedule = p->schedule;
            g->ndays = p->ndays;
            p->schedule = NULL;
        }
        if (p->scale != 0)
            g->scale = p->scale;
    }
    *line = 0;
    return 0;
}

void
warmup_conf_free(struct warmup_plan_conf *pl)
{
    if (pl == NULL)
        return;
    free(pl->name);
    free(pl->schedule);
    for (unsigned i = 0; i < pl->ngroups; i++) {
        for (unsigned k = 0; k < pl->groups[i].npatterns; k++)
            free(pl->groups[i].patterns[k]);
        free(pl->groups[i].schedule);
    }
    for (unsigned i = 0; i < pl->npending; i++)
        free(pl->pending[i].schedule);
    free(pl->pending);
    memset(pl, 0, sizeof(*pl));
}

/* Dates go through libc's timegm and gmtime_r (UTC, no time zone
 * files): a date is a day number, whatever the plan's offset. */
int
warmup_conf_parse_date(const char *s, int64_t *day)
{
    unsigned y, m, d;
    char tail;
    if (strlen(s) != 10 || s[4] != '-' || s[7] != '-' ||
        sscanf(s, "%4u-%2u-%2u%c", &y, &m, &d, &tail) != 3 || y < 1970 || y > 9999 || m < 1 ||
        m > 12 || d < 1 || d > 31)
        return -EINVAL;
    struct tm tm = {.tm_year = (int)y - 1900, .tm_mon = (int)m - 1, .tm_mday = (int)d};
    time_t t = timegm(&tm);
    /* timegm normalises Feb 30 into March: such a date is refused */
    if (t == (time_t)-1 || tm.tm_mday != (int)d || tm.tm_mon != (int)m - 1)
        return -EINVAL;
    *day = (int64_t)t / 86400;
    return 0;
}

void
warmup_conf_format_date(int64_t day, char *out, size_t outlen)
{
    time_t t = (time_t)(day * 86400);
    struct tm tm;
    if (gmtime_r(&t, &tm) == NULL)
        snprintf(out, outlen, "?");
    else
        snprintf(out, outlen, "%04d-%02d-%02d", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday);
}

int64_t
warmup_conf_today(const struct warmup_plan_conf *pl, uint64_t now_ms)
{
    int64_t local = (int64_t)now_ms + (int64_t)pl->utc_offset_min * 60000;
    int64_t day = local / 86400000;
    if (local < 0 && local % 86400000 != 0)
        day--;
    return day;
}

uint64_t
warmup_conf_day_start_ms(const struct warmup_plan_conf *pl, int64_t day)
{
    int64_t ms = day * 86400000 - (int64_t)pl->utc_offset_min * 60000;
    return ms < 0 ? 0 : (uint64_t)ms;
}

unsigned
warmup_conf_group(const struct warmup_plan_conf *pl, const char *mx_host)
{
    size_t hl = mx_host != NULL ? strlen(mx_host) : 0;
    if (hl > 0 && mx_host[hl - 1] == '.')
        hl--;
    for (unsigned i = 0; i + 1 < pl->ngroups; i++)
        for (unsigned k = 0; k < pl->groups[i].npatterns; k++)
            if (hl > 0 && config_host_matches(pl->groups[i].patterns[k], mx_host, hl))
                return i;
    return pl->ngroups - 1;
}

uint64_t
warmup_conf_allowance(const struct warmup_plan_conf *pl, unsigned gi, int64_t day)
{
    const struct warmup_group_conf *g = &pl->groups[gi];
    if (day < 1)
        day = 1;
    if (g->schedule != NULL)
        return (uint64_t)day > g->ndays ? WARMUP_UNLIMITED : g->schedule[day - 1];
    if ((uint64_t)day > pl->ndays)
        return WARMUP_UNLIMITED;
    uint64_t v = (uint64_t)((double)pl->schedule[day - 1] * g->scale); /* rounds down */
    return v < 1 ? 1 : v;
}

void
warmup_conf_reference(FILE *out)
{
    fprintf(out,
            "## [warmup NAME]: an IP warm-up plan\n\n"
            "A source that carries a plan (`[source ADDRESS] warmup = NAME`) may send each "
            "day only the day's allowance of messages to each destination group; the "
            "allowance rises day by day along the schedule, and past its last day there is "
            "no limit. Mail over a day's allowance goes to another source of its pool that "
            "has allowance left, or waits for the next day when none has. Each group has its "
            "own budget: a host is in the first group whose pattern it matches, in this "
            "order: the groups the section defines (file order), the built-in ones it does "
            "not redefine (gmail: `*.google.com, *.googlemail.com`; microsoft: "
            "`*.outlook.com, *.protection.outlook.com, *.hotmail.com`; yahoo: "
            "`*.yahoodns.net`), then `other` (every other host). The host is the MX "
            "host the message is sent to: the destination's preferred one, or the one a "
            "failover moved it to (the receiver that sees the source's mail). Counts are kept per source, group and day, "
            "under the spool directory (warmup.state, written every second and at stop), "
            "and with [redis] url in Redis, shared by every node. Names: 1 to 64 of A-Z a-z "
            "0-9 . _ -.\n\n"
            "| key | type | default | range | meaning |\n|---|---|---|---|---|\n"
            "| schedule | list | (required) | 1..%d entries of 1..%llu | messages per day to "
            "each group: day 1, day 2, ... (`50, 100, 200, 500, 1000`) |\n"
            "| group GROUP | list | none | up to %d patterns | the MX hosts of a group: "
            "`*.suffix` or a host name, comma-separated; redefines a built-in group of that "
            "name, or adds one (at most %d groups besides `other`) |\n"
            "| schedule GROUP | list | the plan's | as schedule | the group's own schedule |\n"
            "| scale GROUP | number | 1 | 0.01..100 | the group's allowance is the plan's "
            "times this (at least 1 a day); not with schedule GROUP |\n"
            "| utc_offset | offset | +00:00 | -14:00..+14:00 | the plan's days start at "
            "midnight at this offset from UTC |\n\n"
            "`[source ADDRESS]` carries a plan with `warmup = NAME` and `warmup_start = "
            "YYYY-MM-DD` (day 1 of the schedule, in the plan's offset; required with "
            "warmup; before it, the source gets day 1's allowance).\n\n",
            WARMUP_DAYS_MAX, WARMUP_PER_DAY_MAX, WARMUP_PATTERNS_MAX, WARMUP_GROUPS_MAX - 1);
}
