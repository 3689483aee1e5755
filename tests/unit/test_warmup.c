/*
 * warmup: plans from the config file (schedule by day, groups by MX
 * pattern, scale and per-group schedules, bad values), the day's counts
 * (take until spent, the next day starts afresh), counts kept across a
 * restart (the state file) and a reload, exact counting under two
 * threads, and a day's allowance shared by two instances through a real
 * redis-server.
 *
 * Time: each test puts the plans' clock at 12:00 UTC of the real day
 * (warmup_clock_shift), so that no test runs across a midnight; the
 * keeper thread counts at the real clock plus that shift too.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "common/clock.h"
#include "engine/config.h"
#include "engine/warmup.h"
#include "engine/warmup_conf.h"
#include "tests/support/redis_server.h"

#define DAY_MS 86400000LL

static char dir[64];

static void
make_dir(void)
{
    snprintf(dir, sizeof(dir), "/tmp/sluice-warmup-XXXXXX");
    assert_non_null(mkdtemp(dir));
}

static void
remove_dir(void)
{
    char p[128];
    snprintf(p, sizeof(p), "%s/warmup.state", dir);
    unlink(p);
    snprintf(p, sizeof(p), "%s/warmup.state.tmp", dir);
    unlink(p);
    snprintf(p, sizeof(p), "%s/spool.conf", dir);
    unlink(p);
    rmdir(dir);
}

/* The config of text (with [queue] path = dir put first, and start
 * replaced by the date days_ago days before today, UTC). */
static struct config *
load_cfg(const char *text, int days_ago, char **errs_out)
{
    char date[16];
    warmup_conf_format_date((int64_t)(clock_unix_ms() / DAY_MS) - days_ago, date, sizeof(date));
    char *body = NULL;
    size_t blen = 0;
    FILE *b = open_memstream(&body, &blen);
    fprintf(b, "[queue]\npath = %s\n", dir);
    for (const char *s = text; *s != '\0'; s++) {
        if (strncmp(s, "START", 5) == 0) {
            fputs(date, b);
            s += 4;
        } else {
            fputc(*s, b);
        }
    }
    fclose(b);
    char path[128];
    snprintf(path, sizeof(path), "%s/spool.conf", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(body, f);
    fclose(f);
    free(body);
    char *ebuf = NULL;
    size_t elen = 0;
    FILE *errs = open_memstream(&ebuf, &elen);
    struct config *cfg = NULL;
    config_load(path, &cfg, errs);
    fclose(errs);
    if (errs_out != NULL)
        *errs_out = ebuf;
    else {
        if (cfg == NULL)
            fail_msg("config errors:\n%s", ebuf);
        free(ebuf);
    }
    return cfg;
}

static struct warmup *
open_w(const struct config *cfg)
{
    struct warmup *w = NULL;
    char err[256];
    int rc = warmup_open(cfg, &w, err, sizeof(err));
    if (rc != 0)
        fail_msg("warmup_open: %s", err);
    /* 12:00 UTC today */
    uint64_t now = clock_unix_ms();
    warmup_clock_shift(w, (int64_t)(now / DAY_MS * DAY_MS + DAY_MS / 2) - (int64_t)now);
    return w;
}

#define PLAN                                                                                       \
    "[warmup new]\n"                                                                               \
    "schedule = 5, 10, 20\n"                                                                       \
    "group corp = mx.corp.example, *.corp.net\n"                                                   \
    "scale gmail = 0.5\n"                                                                          \
    "schedule yahoo = 2\n"                                                                         \
    "[source 127.0.0.2]\n"                                                                         \
    "warmup = new\n"                                                                               \
    "warmup_start = START\n"                                                                       \
    "[source 127.0.0.3]\n"

static const char *GMAIL = "gmail-smtp-in.l.google.com";
static const char *OTHER = "mx.example.org";

static void
test_schedule_by_day(void **state)
{
    (void)state;
    make_dir();
    for (int d = 0; d < 4; d++) { /* day 1 (started today) .. day 4 (past the end) */
        struct config *cfg = load_cfg(PLAN, d, NULL);
        struct warmup *w = open_w(cfg);
        uint64_t now = clock_unix_ms();
        static const uint64_t other[] = {5, 10, 20, UINT64_MAX};
        static const uint64_t gmail[] = {2, 5, 10, UINT64_MAX};
        static const uint64_t yahoo[] = {2, UINT64_MAX, UINT64_MAX, UINT64_MAX};
        assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), other[d]);
        assert_int_equal(warmup_left(w, "127.0.0.2", GMAIL, now), gmail[d]);
        assert_int_equal(warmup_left(w, "127.0.0.2", "mta7.am0.yahoodns.net", now), yahoo[d]);
        assert_int_equal(warmup_left(w, "127.0.0.2", "x.corp.net", now), other[d]);
        /* no plan, unknown source */
        assert_int_equal(warmup_left(w, "127.0.0.3", OTHER, now), UINT64_MAX);
        assert_int_equal(warmup_left(w, "192.0.2.1", OTHER, now), UINT64_MAX);
        assert_true(warmup_take(w, "127.0.0.3", OTHER, now));
        assert_int_equal(warmup_next_day_ms(w, "127.0.0.3", OTHER, now), 0);
        struct warmup_row rows[8];
        size_t n = warmup_report(w, now, rows, 8);
        assert_int_equal(n, 5); /* corp, gmail, microsoft, yahoo, other */
        assert_int_equal(rows[0].day, d + 1);
        warmup_close(w);
        config_free(cfg);
    }
    /* A plan that starts in two days: day 1's allowance until then. */
    struct config *cfg = load_cfg(PLAN, -2, NULL);
    struct warmup *w = open_w(cfg);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, clock_unix_ms()), 5);
    warmup_close(w);
    config_free(cfg);
    remove_dir();
}

static void
test_groups(void **state)
{
    (void)state;
    make_dir();
    struct config *cfg = load_cfg("[warmup p]\n"
                                  "schedule = 1\n"
                                  "group corp = mx.corp.example, *.corp.net\n"
                                  "group gmail = *.gmail-test.example\n"
                                  "[source 127.0.0.2]\nwarmup = p\nwarmup_start = START\n",
                                  0, NULL);
    const struct warmup_plan_conf *pl = cfg->sources[0].warmup_plan;
    assert_non_null(pl);
    static const struct {
        const char *host, *group;
    } cases[] = {
        {"mx.corp.example", "corp"},
        {"MX.Corp.Example.", "corp"},
        {"a.b.corp.net", "corp"},
        {"corp.net", "other"},          /* *.suffix needs a label in front */
        {"x.mx.corp.example", "other"}, /* an exact host is only that host */
        {"aspmx.l.gmail-test.example", "gmail"},
        {"aspmx.l.google.com", "other"}, /* gmail was redefined */
        {"x-com.mail.protection.outlook.com", "microsoft"},
        {"mx1.hotmail.com", "microsoft"},
        {"mta6.am0.yahoodns.net", "yahoo"},
        {"", "other"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        unsigned g = warmup_conf_group(pl, cases[i].host);
        if (strcmp(pl->groups[g].name, cases[i].group) != 0)
            fail_msg("%s: group %s, expected %s", cases[i].host, pl->groups[g].name,
                     cases[i].group);
    }
    /* order: the section's, the built-ins not redefined, other */
    assert_int_equal(pl->ngroups, 5);
    assert_string_equal(pl->groups[0].name, "corp");
    assert_string_equal(pl->groups[1].name, "gmail");
    assert_string_equal(pl->groups[2].name, "microsoft");
    assert_string_equal(pl->groups[4].name, "other");
    config_free(cfg);
    remove_dir();
}

static void
test_dates(void **state)
{
    (void)state;
    int64_t d;
    char b[16];
    static const char *const good[] = {"1970-01-01", "2024-02-29", "2026-12-31", "2100-03-01"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        assert_int_equal(warmup_conf_parse_date(good[i], &d), 0);
        warmup_conf_format_date(d, b, sizeof(b));
        assert_string_equal(b, good[i]);
    }
    assert_int_equal(warmup_conf_parse_date("1970-01-02", &d), 0);
    assert_int_equal(d, 1);
    static const char *const bad[] = {"2023-02-29", "2026-04-31", "2026-13-01", "2026-00-10",
                                      "2026-1-01",  "2026-01-01x", "26-01-01",  "1969-12-31", ""};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (warmup_conf_parse_date(bad[i], &d) == 0)
            fail_msg("\"%s\" taken as a date", bad[i]);
}

static void
expect_err(const char *text, const char *what)
{
    char *errs = NULL;
    struct config *cfg = load_cfg(text, 0, &errs);
    assert_null(cfg);
    if (strstr(errs, what) == NULL)
        fail_msg("expected '%s' in:\n%s", what, errs);
    free(errs);
}

static void
test_config_errors(void **state)
{
    (void)state;
    make_dir();
    expect_err("[warmup p]\nschedule = 5, x\n", "expected messages per day");
    expect_err("[warmup p]\nschedule = 5, 0\n", "day 2: 0 is not 1..");
    expect_err("[warmup p]\nschedule = 5\nschedule = 6\n", "schedule: set twice");
    expect_err("[warmup p]\ngroup corp = x.example\n", "[warmup p]: schedule: not set");
    expect_err("[warmup p]\nschedule = 5\ngroup other = x.example\n", "\"other\" is every host");
    expect_err("[warmup p]\nschedule = 5\ngroup c = bad..host\n", "not a host name");
    expect_err("[warmup p]\nschedule = 5\nscale nope = 2\n", "no group nope");
    expect_err("[warmup p]\nschedule = 5\nscale gmail = 0\n", "expected a factor");
    expect_err("[warmup p]\nschedule = 5\nscale gmail = 2\nschedule gmail = 3\n",
               "both a schedule and a scale");
    expect_err("[warmup p]\nschedule = 5\nutc_offset = 25:00\n", "utc_offset: expected");
    expect_err("[warmup p]\nschedule = 5\nlimit = 3\n", "unknown key in [warmup p]");
    expect_err("[warmup bad name!]\nschedule = 5\n", "a plan name is");
    expect_err("[source 127.0.0.2]\nwarmup = nope\nwarmup_start = START\n",
               "warmup: no [warmup nope] section");
    expect_err("[warmup p]\nschedule = 5\n[source 127.0.0.2]\nwarmup = p\n",
               "needs warmup_start");
    expect_err("[warmup p]\nschedule = 5\n[source 127.0.0.2]\nwarmup = p\n"
               "warmup_start = 2026-02-30\n",
               "is not a date");
    expect_err("[source 127.0.0.2]\nwarmup_start = 2026-02-01\n", "set without warmup");
    remove_dir();
}

static void
test_take_until_spent_and_next_day(void **state)
{
    (void)state;
    make_dir();
    struct config *cfg = load_cfg(PLAN, 0, NULL);
    struct warmup *w = open_w(cfg);
    uint64_t now = clock_unix_ms();
    for (int i = 0; i < 5; i++)
        assert_true(warmup_take(w, "127.0.0.2", OTHER, now));
    assert_false(warmup_take(w, "127.0.0.2", OTHER, now));
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 0);
    assert_int_equal(warmup_left(w, "127.0.0.2", "mx.other.example", now), 0); /* one group */
    /* other groups have their own budget */
    assert_true(warmup_take(w, "127.0.0.2", GMAIL, now));
    assert_int_equal(warmup_left(w, "127.0.0.2", GMAIL, now), 1);
    /* the next day starts at the next midnight UTC (of the shifted clock) */
    uint64_t next = warmup_next_day_ms(w, "127.0.0.2", OTHER, now);
    assert_true(next > now && next - now == (uint64_t)DAY_MS / 2);
    struct warmup_stats st;
    warmup_stats(w, &st);
    assert_int_equal(st.refused, 1);
    assert_int_equal(st.sources, 1);
    /* day 2: 10, from nothing */
    warmup_clock_shift(w, DAY_MS);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 10);
    assert_int_equal(warmup_left(w, "127.0.0.2", GMAIL, now), 5);
    warmup_close(w);
    config_free(cfg);
    remove_dir();
}

/* The clock stepped back across midnight (an NTP step, a VM resumed):
 * what was taken on the later day still counts, before and after the
 * clock reaches that day again, and so does a state file written by a
 * node whose clock was ahead. A step back by more than a day is a clock
 * that was wrong: the count starts afresh. */
static void
test_clock_steps_back(void **state)
{
    (void)state;
    make_dir();
    struct config *cfg = load_cfg(PLAN, 0, NULL);
    struct warmup *w = open_w(cfg);
    uint64_t now = clock_unix_ms();
    warmup_clock_shift(w, DAY_MS / 2 + 30000); /* day 2, 00:00:30 */
    for (int i = 0; i < 10; i++)
        assert_true(warmup_take(w, "127.0.0.2", OTHER, now));
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 0);
    warmup_clock_shift(w, -60000); /* day 1, 23:59:30 */
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 0);
    assert_false(warmup_take(w, "127.0.0.2", OTHER, now));
    /* the day that ends next is still day 2, in a day and 30 s */
    assert_int_equal(warmup_next_day_ms(w, "127.0.0.2", OTHER, now) - now, DAY_MS + 30000);
    struct warmup_row rows[8];
    assert_int_equal(warmup_report(w, now, rows, 8), 5);
    assert_int_equal(rows[4].day, 2);
    assert_int_equal(rows[4].taken, 10);
    warmup_clock_shift(w, 60000); /* day 2 again */
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 0);
    assert_false(warmup_take(w, "127.0.0.2", OTHER, now));
    warmup_close(w);
    /* a restart with the clock behind: the state file's day 2 still counts */
    w = open_w(cfg);
    warmup_clock_shift(w, DAY_MS / 2 - 30000); /* day 1, 23:59:30 */
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 0);
    warmup_clock_shift(w, 60000);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 0);
    /* two days back: a clock that was wrong, day 1 from nothing */
    warmup_clock_shift(w, -2 * DAY_MS);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 5);
    warmup_close(w);
    config_free(cfg);
    remove_dir();
}

static void
test_utc_offset(void **state)
{
    (void)state;
    make_dir();
    /* At 12:00 UTC a plan at +14:00 is already in tomorrow (day 2), one
     * at -05:00 still today. */
    struct config *cfg = load_cfg("[warmup east]\nschedule = 5, 10\nutc_offset = +14:00\n"
                                  "[warmup west]\nschedule = 5, 10\nutc_offset = -05:00\n"
                                  "[source 127.0.0.2]\nwarmup = east\nwarmup_start = START\n"
                                  "[source 127.0.0.3]\nwarmup = west\nwarmup_start = START\n",
                                  0, NULL);
    struct warmup *w = open_w(cfg);
    uint64_t now = clock_unix_ms();
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 10);
    assert_int_equal(warmup_left(w, "127.0.0.3", OTHER, now), 5);
    /* west's day ends at 05:00 UTC tomorrow: 17 h from 12:00 UTC */
    uint64_t next = warmup_next_day_ms(w, "127.0.0.3", OTHER, now);
    assert_int_equal(next - now, 17 * 3600 * 1000ULL);
    warmup_close(w);
    config_free(cfg);
    remove_dir();
}

static void
test_restart_keeps_counts(void **state)
{
    (void)state;
    make_dir();
    struct config *cfg = load_cfg(PLAN, 0, NULL);
    struct warmup *w = open_w(cfg);
    uint64_t now = clock_unix_ms();
    for (int i = 0; i < 3; i++)
        assert_true(warmup_take(w, "127.0.0.2", OTHER, now));
    assert_true(warmup_take(w, "127.0.0.2", GMAIL, now));
    warmup_close(w); /* writes the state */
    w = open_w(cfg);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 2);
    assert_int_equal(warmup_left(w, "127.0.0.2", GMAIL, now), 1);
    /* written without a close too (what a kill -9 leaves): warmup_flush
     * is the keeper's pass */
    assert_true(warmup_take(w, "127.0.0.2", OTHER, now));
    assert_int_equal(warmup_flush(w), 0);
    struct warmup *w2 = open_w(cfg); /* reads the same file */
    assert_int_equal(warmup_left(w2, "127.0.0.2", OTHER, now), 1);
    warmup_close(w2);
    warmup_close(w);
    /* a damaged state file: its bad lines are skipped, the good kept */
    char sp[128];
    snprintf(sp, sizeof(sp), "%s/warmup.state", dir);
    FILE *f = fopen(sp, "w");
    assert_non_null(f);
    fprintf(f, "sluice-warmup 1\n127.0.0.2 other %lld 3 0 0\ngarbage\n"
               "127.0.0.2 other x 1 1 1\n127.0.0.2 nosuchgroup %lld 9 0 0\n"
               "127.0.0.9 other %lld 9 0 0\n127.0.0.2 gmail %lld 1 2 0\n",
            (long long)(clock_unix_ms() / DAY_MS), (long long)(clock_unix_ms() / DAY_MS),
            (long long)(clock_unix_ms() / DAY_MS), (long long)(clock_unix_ms() / DAY_MS));
    fclose(f);
    w = open_w(cfg);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 2);
    assert_int_equal(warmup_left(w, "127.0.0.2", GMAIL, now), 2); /* reported > mine: bad */
    warmup_close(w);
    f = fopen(sp, "w"); /* not a state file at all: nothing taken */
    assert_non_null(f);
    fprintf(f, "\x01\x02 binary\n");
    fclose(f);
    w = open_w(cfg);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 5);
    warmup_close(w);
    /* a state from another day counts for nothing today */
    w = open_w(cfg);
    warmup_clock_shift(w, DAY_MS);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 10);
    warmup_close(w);
    w = open_w(cfg); /* and the file now holds the new day, where nothing was taken */
    warmup_clock_shift(w, DAY_MS);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 10);
    warmup_close(w);
    config_free(cfg);
    remove_dir();
}

static void
test_reload_keeps_counts(void **state)
{
    (void)state;
    make_dir();
    struct config *cfg = load_cfg(PLAN, 0, NULL);
    struct warmup *w = open_w(cfg);
    uint64_t now = clock_unix_ms();
    for (int i = 0; i < 3; i++)
        assert_true(warmup_take(w, "127.0.0.2", OTHER, now));
    /* a new plan, bigger: the 3 taken today still count */
    struct config *cfg2 = load_cfg("[warmup big]\nschedule = 50\n"
                                   "[source 127.0.0.2]\nwarmup = big\nwarmup_start = START\n"
                                   "[source 127.0.0.4]\nwarmup = big\nwarmup_start = START\n",
                                   0, NULL);
    assert_int_equal(warmup_reload(w, cfg2), 0);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 47);
    assert_int_equal(warmup_left(w, "127.0.0.4", OTHER, now), 50);
    /* back to the first: still 3 taken */
    assert_int_equal(warmup_reload(w, cfg), 0);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, now), 2);
    assert_int_equal(warmup_left(w, "127.0.0.4", OTHER, now), UINT64_MAX);
    warmup_close(w);
    config_free(cfg2);
    config_free(cfg);
    remove_dir();
}

struct race {
    struct warmup *w;
    uint64_t now;
    unsigned ok;
};

static void *
racer(void *arg)
{
    struct race *r = arg;
    for (int i = 0; i < 20000; i++)
        if (warmup_take(r->w, "127.0.0.2", OTHER, r->now))
            r->ok++;
    return NULL;
}

static void
test_two_threads(void **state)
{
    (void)state;
    make_dir();
    struct config *cfg = load_cfg("[warmup p]\nschedule = 30000\n"
                                  "[source 127.0.0.2]\nwarmup = p\nwarmup_start = START\n",
                                  0, NULL);
    struct warmup *w = open_w(cfg);
    struct race a = {w, clock_unix_ms(), 0}, b = a;
    pthread_t ta, tb;
    assert_int_equal(pthread_create(&ta, NULL, racer, &a), 0);
    assert_int_equal(pthread_create(&tb, NULL, racer, &b), 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    assert_int_equal(a.ok + b.ok, 30000);
    assert_int_equal(warmup_left(w, "127.0.0.2", OTHER, a.now), 0);
    struct warmup_row rows[8];
    warmup_report(w, a.now, rows, 8);
    assert_int_equal(rows[3].taken, 30000); /* gmail, microsoft, yahoo, other */
    warmup_close(w);
    config_free(cfg);
    remove_dir();
}

static pid_t redis_pid = -1; /* killed by teardown when a test failed */

static int
teardown_redis(void **state)
{
    (void)state;
    if (redis_pid > 0)
        redis_server_kill(redis_pid);
    redis_pid = -1;
    return 0;
}

/* Two instances (two nodes, spools of their own) against one
 * redis-server share the day's allowance. */
static void
test_redis_shared(void **state)
{
    (void)state;
    if (redis_server_path() == NULL)
        skip();
    int port = redis_server_free_port();
    assert_true(port > 0);
    char err[256];
    pid_t pid = redis_server_start(port, err, sizeof(err));
    if (pid < 0)
        fail_msg("%s", err);
    redis_pid = pid;
    char text[512];
    snprintf(text, sizeof(text),
             "[redis]\nurl = redis://127.0.0.1:%d\nnodes = 2\nkey_prefix = t%d:\n"
             "[warmup p]\nschedule = 20\n"
             "[source 127.0.0.2]\nwarmup = p\nwarmup_start = START\n",
             port, (int)getpid());
    make_dir();
    char dir_a[64];
    snprintf(dir_a, sizeof(dir_a), "%s", dir);
    struct config *ca = load_cfg(text, 0, NULL);
    struct warmup *a = open_w(ca);
    make_dir();
    struct config *cb = load_cfg(text, 0, NULL);
    struct warmup *b = open_w(cb);
    uint64_t now = clock_unix_ms();
    /* nothing before the first pass has reserved tokens; then half of
     * the allowance, shared by 2 nodes */
    assert_int_equal(warmup_left(a, "127.0.0.2", OTHER, now), 0);
    assert_int_equal(warmup_flush(a), 0);
    assert_int_equal(warmup_left(a, "127.0.0.2", OTHER, now), 10);
    unsigned ta = 0, tb = 0;
    while (warmup_take(a, "127.0.0.2", OTHER, now))
        ta++;
    assert_int_equal(ta, 10);
    /* the share is spent, the cluster's is not: ask again at the next pass */
    uint64_t next = warmup_next_day_ms(a, "127.0.0.2", OTHER, now);
    assert_true(next > now && next - now <= 1000);
    assert_int_equal(warmup_flush(a), 0);
    assert_int_equal(warmup_flush(b), 0);
    struct warmup_row rows[8];
    warmup_report(b, now, rows, 8);
    assert_int_equal(rows[3].taken, 10); /* b sees a's 10 */
    /* both go on, passes between rounds, until the cluster's allowance is spent */
    for (int round = 0; round < 20; round++) {
        while (warmup_take(a, "127.0.0.2", OTHER, now))
            ta++;
        while (warmup_take(b, "127.0.0.2", OTHER, now))
            tb++;
        assert_int_equal(warmup_flush(a), 0);
        assert_int_equal(warmup_flush(b), 0);
    }
    assert_int_equal(ta + tb, 20);
    /* one node alone takes a whole day's budget, batch by batch, while
     * the other only reports (the stats thread does every second): a
     * report reserves nothing */
    unsigned tc = 0;
    for (int round = 0; round < 20; round++) {
        while (warmup_take(a, "127.0.0.2", GMAIL, now))
            tc++;
        warmup_report(b, now, rows, 8);
        assert_int_equal(warmup_flush(a), 0);
        assert_int_equal(warmup_flush(b), 0);
    }
    assert_int_equal(tc, 20);
    warmup_report(a, now, rows, 8);
    assert_int_equal(rows[3].taken, 20);
    struct warmup_stats st;
    warmup_stats(a, &st);
    assert_string_equal(st.redis, "connected");
    assert_true(st.syncs >= 20);
    /* Redis gone: a node goes on at its local share, 20 / 2, of which its
     * own count (10 or more) already took everything */
    redis_server_kill(pid);
    redis_pid = -1;
    assert_true(warmup_flush(a) < 0);
    warmup_stats(a, &st);
    assert_string_equal(st.redis, "unreachable");
    assert_false(warmup_take(a, "127.0.0.2", OTHER, now));
    warmup_close(b);
    warmup_close(a);
    config_free(cb);
    config_free(ca);
    remove_dir();
    snprintf(dir, sizeof(dir), "%s", dir_a);
    remove_dir();
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_schedule_by_day),
        cmocka_unit_test(test_groups),
        cmocka_unit_test(test_dates),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_take_until_spent_and_next_day),
        cmocka_unit_test(test_utc_offset),
        cmocka_unit_test(test_clock_steps_back),
        cmocka_unit_test(test_restart_keeps_counts),
        cmocka_unit_test(test_reload_keeps_counts),
        cmocka_unit_test(test_two_threads),
        cmocka_unit_test_teardown(test_redis_shared, teardown_redis),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
