/*
 * bench_warmup: the cost of the warm-up counters (engine/warmup.h) on the
 * workers' path, and of the keeper's write.
 *
 *   bench_warmup [SOURCES (default 64)]
 *
 * 1. warmup_take (a hash lookup of the source, the MX host's group, an
 *    increment, under the one mutex) from 1 and 2 threads, each thread on
 *    its own source and spread over 4 MX hosts (two groups), beside the
 *    ceiling: the same threads taking and giving back a bare mutex.
 * 2. warmup_flush: the keeper's pass (no Redis) writing SOURCES x 5 groups
 *    to the state file with fsync, in ms.
 *
 * Figures are printed, never judged. The spool directory is under
 * TMPDIR (or /tmp) and removed at the end.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "engine/config.h"
#include "engine/warmup.h"
#include "engine/warmup_conf.h"

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

#define TAKES 2000000 /* per thread */

static double
now_s(void)
{
    return (double)clock_mono_ns() / 1e9;
}

static const char *const hosts[] = {"gmail-smtp-in.l.google.com", "alt1.aspmx.l.google.com",
                                    "mx1.example.org", "mx2.example.net"};

struct job {
    struct warmup *w;
    pthread_mutex_t *m; /* NULL: warmup_take */
    char source[46];
    uint64_t now;
    unsigned long sink;
};

static void *
run(void *arg)
{
    struct job *j = arg;
    for (unsigned i = 0; i < TAKES; i++) {
        if (j->m != NULL) {
            pthread_mutex_lock(j->m);
            j->sink++;
            pthread_mutex_unlock(j->m);
        } else {
            j->sink += warmup_take(j->w, j->source, hosts[i & 3], j->now);
        }
    }
    return NULL;
}

static double
round_ns(struct warmup *w, pthread_mutex_t *m, unsigned nthreads)
{
    struct job jobs[2];
    pthread_t t[2];
    double t0 = now_s();
    for (unsigned i = 0; i < nthreads; i++) {
        jobs[i] = (struct job){w, m, "", clock_unix_ms(), 0};
        snprintf(jobs[i].source, sizeof(jobs[i].source), "10.0.0.%u", i + 1);
        pthread_create(&t[i], NULL, run, &jobs[i]);
    }
    for (unsigned i = 0; i < nthreads; i++)
        pthread_join(t[i], NULL);
    double el = now_s() - t0;
    return el * 1e9 / ((double)TAKES * nthreads);
}

int
main(int argc, char **argv)
{
    unsigned nsrc = argc > 1 ? (unsigned)atoi(argv[1]) : 64;
    if (nsrc < 2 || nsrc > 250) {
        fprintf(stderr, "usage: bench_warmup [SOURCES 2..250]\n");
        return 2;
    }
    const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    char dir[256], path[300];
    snprintf(dir, sizeof(dir), "%s/sluice-bench-warmup-XXXXXX", tmp);
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(path, sizeof(path), "%s/bench.conf", dir);
    FILE *f = fopen(path, "w");
    char date[16];
    warmup_conf_format_date((int64_t)(clock_unix_ms() / 86400000), date, sizeof(date));
    fprintf(f, "[queue]\npath = %s\n[warmup p]\nschedule = 1000000000\n", dir);
    for (unsigned i = 1; i <= nsrc; i++)
        fprintf(f, "[source 10.0.0.%u]\nwarmup = p\nwarmup_start = %s\n", i, date);
    fclose(f);
    struct config *cfg = NULL;
    if (config_load(path, &cfg, stderr) != 0)
        return 1;
    struct warmup *w = NULL;
    char err[256];
    if (warmup_open(cfg, &w, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    printf("bench_warmup: %u sources on a plan, %d takes per thread\nbuild: %s\n\n", nsrc,
           TAKES, BENCH_BUILD);
    printf("%-28s %10s %14s\n", "", "ns/take", "takes/s");
    for (unsigned n = 1; n <= 2; n++) {
        double c = round_ns(NULL, &m, n);
        double t = round_ns(w, NULL, n);
        printf("warmup_take, %u thread%s      %10.1f %14.0f\n", n, n > 1 ? "s" : " ", t,
               1e9 / t * n);
        printf("ceiling: bare mutex, %u thr %10.1f %14.0f\n", n, c, 1e9 / c * n);
    }
    double t0 = now_s();
    int rc = warmup_flush(w);
    printf("\nwarmup_flush (%u rows, fsync): %.2f ms (rc %d)\n", nsrc * 5,
           (now_s() - t0) * 1000, rc);
    warmup_close(w);
    config_free(cfg);
    unlink(path);
    snprintf(path, sizeof(path), "%s/warmup.state", dir);
    unlink(path);
    rmdir(dir);
    return 0;
}
