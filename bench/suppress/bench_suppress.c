/*
 * bench_suppress: the suppression list (engine/suppress.h) at size.
 *
 *   bench_suppress [ENTRIES (default 10000000)] [DIR (default /var/tmp)]
 *
 * 1. Import: a CSV of ENTRIES addresses (written first, not timed) read,
 *    sorted and committed by suppress_import_csv: entries/s; and the
 *    longest a stop of sluice would wait for it (the longest time between
 *    two looks at its stop, or from the last to its end).
 * 2. RCPT checks against that list: suppress_check of random addresses
 *    that are on it (hits) and that are not (misses: the address and its
 *    domain are both looked up; each missing address sorts beside a stored
 *    one, so that its lookup walks to a random leaf as a real miss does),
 *    from 1 and 2 threads, beside the ceiling: a bare LMDB read transaction
 *    (begin + abort) and one mdb_get of a random stored key.
 *
 * A list larger than the page cache keeps makes a lookup a disk read:
 * the figures then measure the disk, and say so by collapsing.
 *
 * Figures are printed, never judged. The list lives under DIR (a real
 * disk: the import syncs) and is removed at the end.
 */
#include <errno.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "engine/suppress.h"

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

#define CHECKS 2000000 /* per thread and kind */
#define THREADS_MAX 2  /* the runs use 1 and 2 threads */

static double
now_s(void)
{
    return (double)clock_mono_ns() / 1e9;
}

static uint64_t
rng(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

struct job {
    struct suppress *s;
    unsigned long entries;
    int kind; /* 0 hit, 1 miss */
    unsigned seed;
    double secs;
    unsigned long found;
};

static void *
check_main(void *arg)
{
    struct job *j = arg;
    uint64_t r = 0x9E3779B97F4A7C15ULL ^ j->seed;
    char a[96];
    double t0 = now_s();
    for (unsigned i = 0; i < CHECKS; i++) {
        unsigned long k = rng(&r) % j->entries;
        if (j->kind == 0)
            snprintf(a, sizeof(a), "user%lu@d%lu.example.com", k, k % 100000);
        else
            /* beside a stored key: the lookup walks to a random leaf, as a
             * real miss does (the domain lookup lands among 100,000 domains) */
            snprintf(a, sizeof(a), "user%lu@d%lu.example.org", k, k % 100000);
        j->found += suppress_check(j->s, NULL, a, NULL) == 1;
    }
    j->secs = now_s() - t0;
    return NULL;
}

/* The import's stop, never true: the longest time between two looks. */
struct stop_gap {
    double last, longest;
};

static bool
import_look(void *arg)
{
    struct stop_gap *g = arg;
    double t = now_s();
    if (t - g->last > g->longest)
        g->longest = t - g->last;
    g->last = t;
    return false;
}

/* The ceiling: what LMDB itself costs for a read of one key. */
struct raw {
    MDB_env *env;
    MDB_dbi dbi;
    unsigned long entries;
    int with_get;
    double secs;
};

static void *
raw_main(void *arg)
{
    struct raw *x = arg;
    uint64_t r = 12345;
    char k[128];
    double t0 = now_s();
    for (unsigned i = 0; i < CHECKS; i++) {
        MDB_txn *txn;
        mdb_txn_begin(x->env, NULL, MDB_RDONLY, &txn);
        if (x->with_get) {
            unsigned long n = rng(&r) % x->entries;
            int l = snprintf(k, sizeof(k), "global%cuser%lu@d%lu.example.com", 0, n, n % 100000);
            MDB_val kv = {(size_t)l, k}, v;
            mdb_get(txn, x->dbi, &kv, &v);
        }
        mdb_txn_abort(txn);
    }
    x->secs = now_s() - t0;
    return NULL;
}

/* 1..THREADS_MAX: the arrays of threads are that big (and so the
 * compiler sees the loops stay within them). */
static int
threads_bound(int threads)
{
    return threads < 1 ? 1 : threads > THREADS_MAX ? THREADS_MAX : threads;
}

static double
run_checks(struct suppress *s, unsigned long entries, int kind, int threads)
{
    pthread_t t[THREADS_MAX];
    struct job j[THREADS_MAX];
    threads = threads_bound(threads);
    for (int i = 0; i < threads; i++) {
        j[i] = (struct job){s, entries, kind, (unsigned)i * 7919u + 1, 0, 0};
        pthread_create(&t[i], NULL, check_main, &j[i]);
    }
    double worst = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        if (j[i].secs > worst)
            worst = j[i].secs;
        if ((kind == 0) != (j[i].found == CHECKS))
            printf("  (unexpected: %lu of %d found)\n", j[i].found, CHECKS);
    }
    return (double)CHECKS * threads / worst;
}

static double
run_raw(const char *path, unsigned long entries, int with_get, int threads)
{
    MDB_env *env;
    MDB_txn *txn;
    struct raw x[THREADS_MAX];
    pthread_t t[THREADS_MAX];
    threads = threads_bound(threads);
    mdb_env_create(&env);
    mdb_env_set_maxdbs(env, 2);
    mdb_env_set_mapsize(env, 8ULL << 30);
    if (mdb_env_open(env, path, MDB_RDONLY, 0600) != 0)
        return 0;
    MDB_dbi dbi;
    mdb_txn_begin(env, NULL, MDB_RDONLY, &txn);
    mdb_dbi_open(txn, "entries", 0, &dbi);
    mdb_txn_commit(txn);
    /* warm this mapping as the list's writer thread warms its own */
    MDB_cursor *cur;
    MDB_val k, v;
    mdb_txn_begin(env, NULL, MDB_RDONLY, &txn);
    mdb_cursor_open(txn, dbi, &cur);
    while (mdb_cursor_get(cur, &k, &v, MDB_NEXT) == 0)
        ;
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    for (int i = 0; i < threads; i++) {
        x[i] = (struct raw){env, dbi, entries, with_get, 0};
        pthread_create(&t[i], NULL, raw_main, &x[i]);
    }
    double worst = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(t[i], NULL);
        if (x[i].secs > worst)
            worst = x[i].secs;
    }
    mdb_env_close(env);
    return (double)CHECKS * threads / worst;
}

int
main(int argc, char **argv)
{
    unsigned long entries = argc > 1 ? strtoul(argv[1], NULL, 10) : 10000000UL;
    const char *base = argc > 2 ? argv[2] : "/var/tmp";
    char dir[256], csv[300], cmd[400];
    snprintf(dir, sizeof(dir), "%s/bench-suppress.XXXXXX", base);
    if (entries == 0 || mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    printf("bench_suppress: %lu entries, list under %s\nbuild: %s\n", entries, dir, BENCH_BUILD);

    /* the CSV (not timed) */
    snprintf(csv, sizeof(csv), "%s/in.csv", dir);
    FILE *f = fopen(csv, "w");
    if (f == NULL) {
        perror(csv);
        return 1;
    }
    fputs("address,scope,reason,added,expires,note\n", f);
    static const char *const reasons[] = {"hard_bounce", "complaint", "unsubscribe", "manual"};
    for (unsigned long i = 0; i < entries; i++)
        fprintf(f, "user%lu@d%lu.example.com,global,%s,1767225600,,\n", i, i % 100000,
                reasons[i % 4]);
    long csv_bytes = ftell(f);
    fclose(f);

    struct suppress_config cfg = {0};
    char err[256];
    conf_defaults(suppress_conf_keys, &cfg, err, sizeof(err));
    conf_set(suppress_conf_keys, &cfg, "map_size", "8G", err, sizeof(err));
    suppress_config_check(&cfg, dir, err, sizeof(err));
    struct suppress *s;
    if (suppress_open(&cfg, &s, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    /* the same RCPT check against the empty list */
    double empty1 = run_checks(s, entries, 1, 1);

    f = fopen(csv, "r");
    struct suppress_import_result r;
    double t0 = now_s();
    struct stop_gap gap = {t0, 0};
    int rc = suppress_import_csv(s, f, import_look, &gap, &r);
    double took = now_s() - t0;
    import_look(&gap); /* from the last look to the end */
    fclose(f);
    if (rc != 0) {
        fprintf(stderr, "import failed: %s\n", strerror(-rc));
        return 1;
    }
    suppress_sync(s); /* the writer thread's walk of the new entries (see suppress.c) */
    struct suppress_stats st;
    suppress_stats(s, &st);
    printf("\nimport: %lu entries (%.0f MB of CSV) in %.2f s: %.0f entries/s, %.1f MB/s; "
           "list %.0f MB on disk\n",
           (unsigned long)r.imported, csv_bytes / 1e6, took, r.imported / took,
           csv_bytes / 1e6 / took, st.map_used / 1e6);
    printf("  a stop's longest wait: %.0f ms (between two looks at it, a transaction of "
           "250,000 entries or 65,536 lines read or records sorted)\n",
           gap.longest * 1e3);

    printf("\nRCPT checks (suppress_check, %d per thread), list of %lu:\n", CHECKS, entries);
    printf("  %-44s %14s\n", "", "checks/s");
    printf("  %-44s %14.0f\n", "empty list, miss, 1 thread", empty1);
    for (int th = 1; th <= 2; th++) {
        char lbl[64];
        snprintf(lbl, sizeof(lbl), "hit (address), %d thread%s", th, th > 1 ? "s" : "");
        printf("  %-44s %14.0f\n", lbl, run_checks(s, entries, 0, th));
        snprintf(lbl, sizeof(lbl), "miss (address + domain), %d thread%s", th, th > 1 ? "s" : "");
        printf("  %-44s %14.0f\n", lbl, run_checks(s, entries, 1, th));
    }
    suppress_close(s);
    conf_free(suppress_conf_keys, &cfg);

    char path[300];
    snprintf(path, sizeof(path), "%s/suppress", dir);
    printf("  ceiling: bare LMDB read txn (begin+abort), 1 thread  %10.0f\n",
           run_raw(path, entries, 0, 1));
    printf("  ceiling: LMDB read txn + one mdb_get, 1 thread        %10.0f\n",
           run_raw(path, entries, 1, 1));
    printf("  ceiling: LMDB read txn + one mdb_get, 2 threads       %10.0f\n",
           run_raw(path, entries, 1, 2));
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : 1;
}
