/*
 * bench_shaping: what traffic shaping (engine/shaping.h) costs, and how
 * fast an action travels.
 *
 *   bench_shaping [match|spread|all]
 *
 * match: shaping_rules_match() per reply with the shipped rules, and with
 *   1,000 rules (the shipped ones plus 977 of an operator's, over 16
 *   groups and the usual codes, each with a regex holding a fixed
 *   run), over a mix of 8 replies (large receivers' deferrals and blocks
 *   that match, ordinary deferrals and bounces that do not, from hosts in
 *   and out of the groups). Beside it, the ceiling it avoids: the same
 *   1,000 regexes each tried once per reply (regexec, no index). The
 *   budget is sluice's CPU per relayed message (bench/relay/bench_relay.py
 *   --shaping on this VM: about 220 us), and a message meets at most one
 *   non-2xx reply in the common case.
 * spread: the time from a triggering reply on instance A (shaping_on_reply)
 *   to the action applied on instance B (shaping_check says so), the two
 *   sharing a redis-server of the benchmark's own: 200 actions, one at a
 *   time, p50, p99, max.
 *
 * Figures are printed, never judged.
 */
#include <regex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/shaping.h"
#include "tests/support/redis_server.h"

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

static double
now_s(void)
{
    return (double)clock_mono_ns() / 1e9;
}

static const struct shaping_reply replies[] = {
    {421, 4, 7, 0,
     "[TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user "
     "complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
     "mta6.am0.yahoodns.net", "yahoo.com"},
    {550, 5, 7, 1,
     "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet "
     "service provider since part of their network is on our block list (S3150).",
     "example-com.mail.protection.outlook.com", "example.com"},
    {421, 4, 7, 28,
     "[192.0.2.1 15] Gmail has detected an unusual rate of unsolicited mail originating from "
     "your IP address.",
     "gmail-smtp-in.l.google.com", "gmail.com"},
    {450, 4, 2, 1, "mailbox temporarily unavailable", "mx.g7.test", "g7.test"},
    {550, 5, 1, 1, "<u@example.net>: Recipient address rejected: User unknown in virtual "
                   "mailbox table",
     "mx1.example.net", "example.net"},
    {451, 4, 3, 0, "Temporary local problem - please try later", "mx.g3.test", "g3.test"},
    {421, 4, 7, 0, "Too many connections from your host, slow down", "mx.g12.test", "g12.test"},
    {554, 5, 7, 1, "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
     "mx.other.example", "other.example"},
};
#define NREPLIES (sizeof(replies) / sizeof(replies[0]))

static const unsigned codes[] = {421, 450, 451, 452, 550, 552, 553, 554};

static char *
operator_rules(unsigned n)
{
    size_t cap = 256 * (n + 32), len = 0;
    char *t = malloc(cap);
    if (t == NULL)
        abort();
    for (unsigned g = 0; g < 16; g++)
        len += (size_t)snprintf(t + len, cap - len, "group g%u *.g%u.test\n", g, g);
    for (unsigned i = 0; i < n; i++)
        len += (size_t)snprintf(t + len, cap - len,
                                "rule op%u group=g%u code=%u match=\"err-%u [a-z]+ deferred\" "
                                "action=suspend scope=source for=1h\n",
                                i, i % 16, codes[i % 8], i);
    return t;
}

static struct shaping_rules *
rules(unsigned nop)
{
    char err[256];
    struct shaping_rules *r = shaping_rules_new();
    char *t = nop ? operator_rules(nop) : NULL;
    if (r == NULL || (t && shaping_rules_add_text(r, t, "bench", err, sizeof(err)) < 0) ||
        shaping_rules_add_text(r, shaping_builtin_rules, "builtin", err, sizeof(err)) < 0 ||
        shaping_rules_finish(r) < 0) {
        fprintf(stderr, "rules: %s\n", err);
        exit(1);
    }
    free(t);
    return r;
}

static void
bench_match(void)
{
    struct shaping_rules *small = rules(0), *big = rules(977);
    unsigned iters = 400000;
    unsigned long sink = 0;
    for (int pass = 0; pass < 2; pass++) {
        struct shaping_rules *r = pass ? big : small;
        double best = 1e9;
        for (int run = 0; run < 5; run++) {
            double t0 = now_s();
            for (unsigned i = 0; i < iters; i++)
                sink += (unsigned long)(shaping_rules_match(r, &replies[i % NREPLIES]) + 1);
            double dt = (now_s() - t0) / iters;
            if (dt < best)
                best = dt;
        }
        printf("match, %4u rules: %7.0f ns/reply  (%.2f%% of sluice's 220 us of CPU per "
               "relayed message)\n",
               shaping_rules_count(r), best * 1e9, best * 1e9 / 2200.0);
    }
    /* the ceiling avoided: every rule's regex once per reply */
    unsigned n = shaping_rules_count(big);
    regex_t *re = calloc(n, sizeof(*re));
    char pat[128];
    for (unsigned i = 0; i < n; i++) {
        snprintf(pat, sizeof(pat), "err-%u [a-z]+ deferred", i);
        regcomp(&re[i], pat, REG_EXTENDED | REG_ICASE | REG_NOSUB);
    }
    unsigned it2 = 2000;
    double t0 = now_s();
    for (unsigned i = 0; i < it2; i++)
        for (unsigned k = 0; k < n; k++)
            sink += regexec(&re[k], replies[i % NREPLIES].text, 0, NULL, 0) == 0;
    double dt = (now_s() - t0) / it2;
    printf("ceiling avoided: %u regexec per reply: %9.0f ns/reply\n", n, dt * 1e9);
    for (unsigned i = 0; i < n; i++)
        regfree(&re[i]);
    free(re);
    printf("(sink %lu)\n", sink % 7);
    shaping_rules_unref(small);
    shaping_rules_unref(big);
}

static int
cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static struct shaping *
open_node(const char *dir, const char *node, int port)
{
    char path[512], url[64], err[256];
    snprintf(path, sizeof(path), "%s/%s.state", dir, node);
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", port);
    struct shaping_opts o = {.state_path = path, .node = node, .redis_url = url,
                             .key_prefix = "bench:", .redis_timeout_ms = 1000};
    struct shaping *s = NULL;
    if (shaping_open(&o, &s, err, sizeof(err)) < 0) {
        fprintf(stderr, "shaping_open: %s\n", err);
        exit(1);
    }
    return s;
}

static void
bench_spread(void)
{
    if (redis_server_path() == NULL) {
        printf("spread: skipped (no redis-server)\n");
        return;
    }
    char err[256];
    int port = redis_server_free_port();
    pid_t pid = redis_server_start(port, err, sizeof(err)); /* before any thread */
    if (pid < 0) {
        printf("spread: skipped (%s)\n", err);
        return;
    }
    char dir[] = "/tmp/bench-shaping-XXXXXX";
    if (mkdtemp(dir) == NULL)
        abort();
    struct shaping_rules *r = rules(0);
    struct shaping *a = open_node(dir, "a", port), *b = open_node(dir, "b", port);
    for (int i = 0; i < 500; i++) {
        struct shaping_stats sa, sb;
        shaping_stats(a, &sa);
        shaping_stats(b, &sb);
        if (sa.redis_up && sb.redis_up)
            break;
        usleep(10000);
    }
    enum { N = 200 };
    double lat[N];
    unsigned got = 0;
    for (unsigned i = 0; i < N; i++) {
        char dom[64], text[160];
        snprintf(dom, sizeof(dom), "d%u.example", i);
        snprintf(text, sizeof(text), "[TSS04] Messages from 192.0.2.%u temporarily deferred",
                 i % 250);
        struct shaping_reply rep = {421, 4, 7, 0, text, "mta6.am0.yahoodns.net", dom};
        char src[32];
        snprintf(src, sizeof(src), "10.%u.%u.1", i / 250, i % 250);
        double t0 = now_s();
        shaping_on_reply(a, r, &rep, src, NULL);
        struct shaping_verdict v;
        for (unsigned k = 0; k < 200000; k++) { /* at most ~20 s */
            if (shaping_check(b, r, src, "mta7.am0.yahoodns.net", dom, clock_unix_ms(), &v))
                break;
            usleep(100);
        }
        if (shaping_check(b, r, src, "mta7.am0.yahoodns.net", dom, clock_unix_ms(), &v))
            lat[got++] = now_s() - t0;
        /* a little apart, as replies come */
        usleep(3000 + (i * 7919) % 20000);
    }
    qsort(lat, got, sizeof(double), cmp_d);
    if (got > 0)
        printf("spread, reply on A to applied on B (%u of %u): p50 %.1f ms  p99 %.1f ms  "
               "max %.1f ms  (ceiling: 1000 ms, the issue's bound)\n",
               got, N, lat[got / 2] * 1e3, lat[(got * 99) / 100 < got ? (got * 99) / 100 : got - 1] * 1e3,
               lat[got - 1] * 1e3);
    shaping_close(b);
    shaping_close(a);
    shaping_rules_unref(r);
    redis_server_kill(pid);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
}

int
main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "all";
    log_set_level(LOG_ERR); /* one line per action started otherwise */
    printf("bench_shaping; build: %s\n", BENCH_BUILD);
    if (strcmp(what, "match") == 0 || strcmp(what, "all") == 0)
        bench_match();
    if (strcmp(what, "spread") == 0 || strcmp(what, "all") == 0)
        bench_spread();
    return 0;
}
