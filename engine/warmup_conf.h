/*
 * warmup_conf: the [warmup NAME] sections of the config file (a warm-up
 * plan: a schedule of messages per day and destination group) and the
 * [source ADDRESS] warmup and warmup_start keys that put a source on one.
 * config.c hands each key of a [warmup] section here and calls
 * warmup_conf_finish() once the file is read; warmup.c asks a finished
 * plan for a host's group and a day's allowance.
 *
 *     [warmup new-ip]
 *     schedule = 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000
 *     group gmail = *.google.com, *.googlemail.com   ; redefines a built-in
 *     group corp = mx.corp.example                    ; a group of its own
 *     schedule yahoo = 20, 50, 100, 300, 1000         ; a group's own schedule
 *     scale microsoft = 0.5                           ; the plan's, halved
 *     utc_offset = -05:00                             ; the day starts at 05:00 UTC
 *
 * Groups, in the order a host is matched against them: those the section
 * defines (file order), then the built-ins it did not redefine (gmail:
 * *.google.com *.googlemail.com; microsoft: *.outlook.com
 * *.protection.outlook.com *.hotmail.com; yahoo: *.yahoodns.net), then
 * "other" (every other host). Each group has its own budget per day.
 *
 * Threading: a finished plan is immutable (part of an immutable config).
 */
#ifndef SLUICE_ENGINE_WARMUP_CONF_H
#define SLUICE_ENGINE_WARMUP_CONF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define WARMUP_NAME_MAX     64   /* plan and group names */
#define WARMUP_GROUPS_MAX   16   /* per plan, "other" included */
#define WARMUP_PATTERNS_MAX 16   /* per group */
#define WARMUP_DAYS_MAX     366  /* schedule entries */
#define WARMUP_PER_DAY_MAX  1000000000ULL
#define WARMUP_UNLIMITED    UINT64_MAX /* past the schedule's last day */

struct warmup_group_conf {
    char name[WARMUP_NAME_MAX + 1];
    char *patterns[WARMUP_PATTERNS_MAX]; /* owned: lowercase "*.suffix" or a host */
    unsigned npatterns;                  /* 0: "other" (matches every host) */
    uint64_t *schedule;                  /* owned: per day; NULL: the plan's times scale */
    unsigned ndays;
    double scale;                        /* of the plan's schedule; 1 by default */
    unsigned line;                       /* where it was defined; 0: built in */
};

struct warmup_plan_conf {
    char *name;            /* owned: as written (matched case-insensitively) */
    unsigned line;         /* of its section header */
    uint64_t *schedule;    /* owned: messages per day per group, day 1 first */
    unsigned ndays;
    unsigned schedule_line; /* 0: not set */
    int utc_offset_min;    /* the plan's day starts at 00:00 at this offset from UTC */
    struct warmup_group_conf groups[WARMUP_GROUPS_MAX];
    unsigned ngroups;      /* after finish: defined, built-ins, then "other" */
    /* parse only: per-group schedule and scale keys met before their group */
    struct warmup_pending {
        char group[WARMUP_NAME_MAX + 1];
        uint64_t *schedule; /* owned */
        unsigned ndays;
        double scale;       /* 0: not set */
        unsigned line;
    } *pending;            /* owned */
    unsigned npending;
};

/* One key of the [warmup NAME] section pl (line for messages). Returns 0,
 * or -1 with the reason in why. */
int warmup_conf_key(struct warmup_plan_conf *pl, const char *name, const char *value,
                    unsigned line, char *why, size_t whylen);
/* After the whole file: the built-in groups and "other", per-group keys
 * onto their groups, the checks. Returns 0, or -1 with the reason in why
 * and its line in *line. */
int warmup_conf_finish(struct warmup_plan_conf *pl, unsigned *line, char *why, size_t whylen);
void warmup_conf_free(struct warmup_plan_conf *pl);

/* "YYYY-MM-DD" as days since 1970-01-01. Returns 0, or -EINVAL. */
int warmup_conf_parse_date(const char *s, int64_t *day);
/* Days since 1970-01-01 as "YYYY-MM-DD". */
void warmup_conf_format_date(int64_t day, char *out, size_t outlen);
/* The plan's day (days since 1970-01-01 at its offset) at now_ms. */
int64_t warmup_conf_today(const struct warmup_plan_conf *pl, uint64_t now_ms);
/* Unix ms at which the plan's day `day` starts. */
uint64_t warmup_conf_day_start_ms(const struct warmup_plan_conf *pl, int64_t day);

/* The index of the first group of pl that mx_host matches (the last,
 * "other", matches everything). */
unsigned warmup_conf_group(const struct warmup_plan_conf *pl, const char *mx_host);
/* Messages group g may take on day n of the plan (1 is the first day; a
 * day before 1 counts as 1); WARMUP_UNLIMITED past the schedule. */
uint64_t warmup_conf_allowance(const struct warmup_plan_conf *pl, unsigned g, int64_t day);

/* The reference section of doc/config.md for [warmup NAME]. */
void warmup_conf_reference(FILE *out);

#endif
