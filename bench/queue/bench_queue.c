/*
 * bench_queue: durable enqueue and outcome throughput of the queue, with
 * group commit and with one commit per message (max_batch=1), beside the
 * ceiling of raw LMDB on the same disk.
 *
 * Each producer thread has its own port and keeps `window` messages in
 * flight, submitting the next one from the completion callback's drain
 * loop, as a server worker would after answering 250. Latency is from
 * submit to the callback. The spool lives on a real disk (fsync must be
 * honest): /var/tmp unless --dir says otherwise; tmpfs is refused.
 *
 * Threading: main thread runs the matrix; producers are threads of their
 * own, each with one port; the queue's committer is the only writer.
 */
#include <endian.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "queue/queue.h"

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

static int
rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void
rm_rf(const char *path)
{
    nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static const char *
fs_name(long type)
{
    switch ((unsigned long)type) {
    case 0xEF53:
        return "ext4";
    case 0x58465342:
        return "xfs";
    case 0x9123683E:
        return "btrfs";
    case 0x01021994:
        return "tmpfs";
    case 0x794c7630:
        return "overlayfs";
    case 0x2FC12FC1:
        return "zfs";
    }
    return "other";
}

/* ---- options ---- */

struct opts {
    char root[512];
    unsigned producers[8], nproducers;
    unsigned sizes[8], nsizes;
    unsigned rcpts[8], nrcpts;
    unsigned window;
    double seconds, single_seconds;
    bool single;   /* also max_batch=1 */
    bool enqueue;  /* run the enqueue matrix */
    bool outcomes; /* run the outcome benchmark */
    bool ceiling;  /* raw LMDB figures */
    unsigned outcome_batch;
    unsigned prefill;
    bool no_sync; /* unsafe_no_sync: the CPU side alone, NOT durable */
    unsigned max_batch;
};

static unsigned
parse_list(const char *s, unsigned *out, unsigned max)
{
    unsigned n = 0;
    while (*s != '\0' && n < max) {
        char *end;
        unsigned long v = strtoul(s, &end, 10);
        if (*end == 'K' || *end == 'k') {
            v *= 1024;
            end++;
        }
        out[n++] = (unsigned)v;
        s = *end == ',' ? end + 1 : end;
        if (end == s && *s != '\0')
            break;
    }
    return n;
}

static void
usage(void)
{
    fprintf(stderr,
            "usage: bench_queue [--dir DIR] [--producers 1,8,64] [--sizes 2K,80K] [--rcpts 1,100]\n"
            "                   [--window N] [--seconds S] [--no-single] [--no-enqueue]\n"
            "                   [--no-outcomes] [--no-ceiling] [--outcome-batch N] [--prefill N]\n"
            "                   [--max-batch N] [--unsafe-no-sync] [--quick]\n");
    exit(2);
}

static void
parse_opts(int argc, char **argv, struct opts *o)
{
    *o = (struct opts){.producers = {1, 8, 64},
                       .nproducers = 3,
                       .sizes = {2048, 80 * 1024},
                       .nsizes = 2,
                       .rcpts = {1, 100},
                       .nrcpts = 2,
                       .window = 1,
                       .seconds = 3,
                       .single_seconds = 1.5,
                       .single = true,
                       .enqueue = true,
                       .outcomes = true,
                       .ceiling = true,
                       .outcome_batch = 50,
                       .prefill = 200000,
                       .max_batch = 4096};
    snprintf(o->root, sizeof(o->root), "/var/tmp");
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--dir") == 0 && v) {
            snprintf(o->root, sizeof(o->root), "%s", v);
            i++;
        } else if (strcmp(a, "--producers") == 0 && v) {
            o->nproducers = parse_list(v, o->producers, 8);
            i++;
        } else if (strcmp(a, "--sizes") == 0 && v) {
            o->nsizes = parse_list(v, o->sizes, 8);
            i++;
        } else if (strcmp(a, "--rcpts") == 0 && v) {
            o->nrcpts = parse_list(v, o->rcpts, 8);
            i++;
        } else if (strcmp(a, "--window") == 0 && v) {
            o->window = (unsigned)atoi(v);
            i++;
        } else if (strcmp(a, "--seconds") == 0 && v) {
            o->seconds = atof(v);
            o->single_seconds = o->seconds / 2;
            i++;
        } else if (strcmp(a, "--outcome-batch") == 0 && v) {
            o->outcome_batch = (unsigned)atoi(v);
            i++;
        } else if (strcmp(a, "--prefill") == 0 && v) {
            o->prefill = (unsigned)atoi(v);
            i++;
        } else if (strcmp(a, "--no-single") == 0) {
            o->single = false;
        } else if (strcmp(a, "--no-enqueue") == 0) {
            o->enqueue = false;
        } else if (strcmp(a, "--no-outcomes") == 0) {
            o->outcomes = false;
        } else if (strcmp(a, "--no-ceiling") == 0) {
            o->ceiling = false;
        } else if (strcmp(a, "--max-batch") == 0 && v) {
            o->max_batch = (unsigned)atoi(v);
            i++;
        } else if (strcmp(a, "--unsafe-no-sync") == 0) {
            o->no_sync = true;
        } else if (strcmp(a, "--quick") == 0) {
            o->seconds = 1;
            o->single_seconds = 0.5;
            o->prefill = 50000;
        } else {
            usage();
        }
    }
    if (o->window == 0 || o->max_batch == 0 || o->nproducers == 0 || o->nsizes == 0 ||
        o->nrcpts == 0 || o->outcome_batch == 0)
        usage();
}

/* ---- a spool per run ---- */

static struct queue *
spool_open(const struct opts *o, char *dir, size_t dirlen, unsigned max_batch)
{
    snprintf(dir, dirlen, "%s/sluice-bench-XXXXXX", o->root);
    if (mkdtemp(dir) == NULL) {
        fprintf(stderr, "bench_queue: mkdtemp %s: %s\n", dir, strerror(errno));
        exit(1);
    }
    struct queue_config cfg = {0};
    char err[512];
    conf_defaults(queue_conf_keys, &cfg, err, sizeof(err));
    free(cfg.path);
    cfg.path = strdup(dir);
    cfg.map_size = 32ULL << 30;
    cfg.max_batch = max_batch;
    cfg.unsafe_no_sync = o->no_sync;
    struct queue *q;
    int rc = queue_open(&cfg, &q, err, sizeof(err));
    conf_free(queue_conf_keys, &cfg);
    if (rc != 0) {
        fprintf(stderr, "bench_queue: %s\n", err);
        exit(1);
    }
    return q;
}

static void
spool_close(struct queue *q, const char *dir)
{
    queue_close(q);
    rm_rf(dir);
}

/* ---- enqueue producers ---- */

struct shared {
    struct queue *q;
    const char *body;
    size_t body_len;
    struct queue_rcpt *rcpt;
    unsigned nrcpt;
    unsigned window;
    atomic_bool stop;
    atomic_uint ready;
    bool record;       /* latencies */
    bool keep_ids;     /* for the outcome phase */
    uint64_t max_msgs; /* per producer, 0: until stop */
};

struct slot {
    struct producer *p;
    uint64_t t0;
};

struct producer {
    struct shared *s;
    pthread_t th;
    struct queue_port *port;
    unsigned inflight;
    uint64_t submitted, acked, failed;
    uint32_t *lat; /* microseconds */
    size_t nlat, cap;
    uint64_t *ids;
    size_t nids, idcap;
    struct slot *slots;
    uint64_t *slot_id;
};

static void
push_u32(uint32_t **v, size_t *n, size_t *cap, uint32_t x)
{
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 4096;
        *v = realloc(*v, *cap * sizeof(**v));
    }
    (*v)[(*n)++] = x;
}

static void
push_u64(uint64_t **v, size_t *n, size_t *cap, uint64_t x)
{
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 4096;
        *v = realloc(*v, *cap * sizeof(**v));
    }
    (*v)[(*n)++] = x;
}

static void
on_enqueued(void *cookie, int rc)
{
    struct slot *sl = cookie;
    struct producer *p = sl->p;
    p->inflight--;
    if (rc != 0) {
        p->failed++;
        return;
    }
    p->acked++;
    if (p->s->record) {
        uint64_t us = (clock_mono_ns() - sl->t0) / 1000;
        push_u32(&p->lat, &p->nlat, &p->cap, us > UINT32_MAX ? UINT32_MAX : (uint32_t)us);
    }
    if (p->s->keep_ids)
        push_u64(&p->ids, &p->nids, &p->idcap, p->slot_id[sl - p->slots]);
}

static void
submit_one(struct producer *p, unsigned slot)
{
    struct shared *s = p->s;
    struct queue_envelope env = {
        .id = queue_id_next(s->q),
        .sender = "bounces+12345@news.example.com",
        .body_type = QUEUE_BODY_8BITMIME,
        .auth_user = "newsletter",
        .client_addr = "192.0.2.10",
        .nrcpt = s->nrcpt,
        .rcpt = s->rcpt,
    };
    struct iovec iov = {(void *)s->body, s->body_len};
    p->slots[slot].t0 = clock_mono_ns();
    p->slot_id[slot] = env.id;
    int rc = queue_enqueue(s->q, p->port, &env, &iov, 1, on_enqueued, &p->slots[slot]);
    if (rc != 0) {
        fprintf(stderr, "bench_queue: enqueue: %s\n", queue_strerror(rc));
        exit(1);
    }
    p->inflight++;
    p->submitted++;
}

static void *
producer_main(void *arg)
{
    struct producer *p = arg;
    struct shared *s = p->s;
    atomic_fetch_add(&s->ready, 1);
    /* slots are reused in turn: a slot is free once its callback ran */
    unsigned w = s->window;
    for (unsigned i = 0; i < w; i++)
        submit_one(p, i);
    unsigned next = 0;
    while (p->inflight > 0) {
        unsigned before = p->inflight;
        queue_port_wait(p->port, 1000);
        unsigned freed = before - p->inflight;
        /* completions come back in submission order per port, so the
         * freed slots are the oldest ones, in turn */
        for (unsigned i = 0; i < freed; i++) {
            unsigned slot = next;
            next = (next + 1) % w;
            if (atomic_load_explicit(&s->stop, memory_order_relaxed) ||
                (s->max_msgs && p->submitted >= s->max_msgs))
                continue;
            submit_one(p, slot);
        }
    }
    return NULL;
}

struct result {
    double secs;
    uint64_t acked, failed, commits;
    double per_commit;
    double commit_ms; /* average time inside a commit (apply, write, sync) */
    double p50_ms, p99_ms, max_ms;
};

static int
cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static struct producer *
producers_start(struct shared *s, unsigned n)
{
    struct producer *ps = calloc(n, sizeof(*ps));
    for (unsigned i = 0; i < n; i++) {
        ps[i].s = s;
        ps[i].port = queue_port_new();
        ps[i].slots = calloc(s->window, sizeof(struct slot));
        ps[i].slot_id = calloc(s->window, sizeof(uint64_t));
        for (unsigned j = 0; j < s->window; j++)
            ps[i].slots[j].p = &ps[i];
    }
    for (unsigned i = 0; i < n; i++)
        pthread_create(&ps[i].th, NULL, producer_main, &ps[i]);
    return ps;
}

static void
producers_free(struct producer *ps, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        queue_port_free(ps[i].port);
        free(ps[i].lat);
        free(ps[i].ids);
        free(ps[i].slots);
        free(ps[i].slot_id);
    }
    free(ps);
}

static struct queue_rcpt *
make_rcpts(unsigned n)
{
    static const char *const domains[] = {"gmail.com",  "yahoo.com", "outlook.com", "example.org",
                                          "icloud.com", "gmx.de",    "orange.fr",   "web.de"};
    struct queue_rcpt *r = calloc(n, sizeof(*r));
    for (unsigned i = 0; i < n; i++) {
        char *a = malloc(64);
        snprintf(a, 64, "subscriber.%06u@%s", i * 7919 % 1000000, domains[i % 8]);
        r[i].addr = a;
    }
    return r;
}

static void
free_rcpts(struct queue_rcpt *r, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        free((char *)r[i].addr);
    free(r);
}

static char *
make_body(size_t len)
{
    char *b = malloc(len);
    uint64_t x = 0x2545F4914F6CDD1DULL;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b[i] = (char)('a' + x % 26);
        if (i % 76 == 74)
            b[i] = '\r';
        if (i % 76 == 75)
            b[i] = '\n';
    }
    return b;
}

static void
run_enqueue(const struct opts *o, unsigned producers, unsigned size, unsigned nrcpt,
            unsigned max_batch, double seconds, struct result *res)
{
    char dir[600];
    struct queue *q = spool_open(o, dir, sizeof(dir), max_batch);
    char *body = make_body(size);
    struct shared s = {.q = q,
                       .body = body,
                       .body_len = size,
                       .rcpt = make_rcpts(nrcpt),
                       .nrcpt = nrcpt,
                       .window = o->window,
                       .record = true};
    struct queue_stats st0, st1;
    queue_stats(q, &st0);
    uint64_t t0 = clock_mono_ns();
    struct producer *ps = producers_start(&s, producers);
    struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    nanosleep(&ts, NULL);
    atomic_store(&s.stop, true);
    for (unsigned i = 0; i < producers; i++)
        pthread_join(ps[i].th, NULL);
    uint64_t t1 = clock_mono_ns();
    queue_stats(q, &st1);

    size_t nlat = 0;
    *res = (struct result){0};
    for (unsigned i = 0; i < producers; i++) {
        res->acked += ps[i].acked;
        res->failed += ps[i].failed;
        nlat += ps[i].nlat;
    }
    uint32_t *all = malloc((nlat + 1) * sizeof(uint32_t));
    size_t k = 0;
    for (unsigned i = 0; i < producers; i++) {
        memcpy(all + k, ps[i].lat, ps[i].nlat * sizeof(uint32_t));
        k += ps[i].nlat;
    }
    qsort(all, nlat, sizeof(uint32_t), cmp_u32);
    res->secs = (double)(t1 - t0) / 1e9;
    res->commits = st1.commits - st0.commits;
    res->per_commit = res->commits ? (double)(st1.enqueued - st0.enqueued) / res->commits : 0;
    res->commit_ms = res->commits
                         ? (double)(st1.commit_us_total - st0.commit_us_total) / res->commits / 1000
                         : 0;
    if (nlat > 0) {
        res->p50_ms = all[nlat / 2] / 1000.0;
        res->p99_ms = all[nlat * 99 / 100] / 1000.0;
        res->max_ms = all[nlat - 1] / 1000.0;
    }
    free(all);
    producers_free(ps, producers);
    free_rcpts(s.rcpt, nrcpt);
    free(body);
    spool_close(q, dir);
}

/* ---- outcomes ---- */

struct upd_shared {
    struct queue *q;
    atomic_bool stop;
    unsigned batch;
    unsigned nrcpt;
    enum queue_outcome_kind kind;
};

struct updater {
    struct upd_shared *s;
    pthread_t th;
    struct queue_port *port;
    const uint64_t *ids; /* borrowed: this updater's slice */
    size_t nids;
    uint64_t outcomes, failed;
    unsigned inflight;
};

static void
on_updated(void *cookie, int rc)
{
    struct updater *u = cookie;
    u->inflight--;
    if (rc != 0)
        u->failed++;
}

static void *
updater_main(void *arg)
{
    struct updater *u = arg;
    struct upd_shared *s = u->s;
    unsigned per = s->batch;
    struct queue_outcome *o = calloc(per, sizeof(*o));
    uint64_t due = (uint64_t)time(NULL) * 1000 + 3600000;
    size_t msg = 0;
    unsigned rcpt = 0;
    const unsigned window = 2;
    for (;;) {
        while (u->inflight < window && msg < u->nids &&
               !atomic_load_explicit(&s->stop, memory_order_relaxed)) {
            unsigned n = 0;
            while (n < per && msg < u->nids) {
                o[n++] = (struct queue_outcome){u->ids[msg], rcpt, s->kind, due, 250, "2.0.0 Ok",
                                                0, false, NULL, 0};
                if (++rcpt == s->nrcpt) {
                    rcpt = 0;
                    msg++;
                }
            }
            int rc = queue_update(s->q, u->port, o, n, on_updated, u);
            if (rc != 0) {
                fprintf(stderr, "bench_queue: update: %s\n", queue_strerror(rc));
                exit(1);
            }
            u->inflight++;
            u->outcomes += n;
        }
        if (u->inflight == 0)
            break;
        queue_port_wait(u->port, 1000);
    }
    free(o);
    return NULL;
}

static void
run_outcomes(const struct opts *o, unsigned nrcpt, enum queue_outcome_kind kind, unsigned updaters)
{
    char dir[600];
    struct queue *q = spool_open(o, dir, sizeof(dir), 4096);
    /* prefill: many producers, a deep window, no latency kept */
    unsigned nmsg = o->prefill / nrcpt;
    unsigned fill = 32;
    char *body = make_body(2048);
    struct shared s = {.q = q,
                       .body = body,
                       .body_len = 2048,
                       .rcpt = make_rcpts(nrcpt),
                       .nrcpt = nrcpt,
                       .window = 8,
                       .keep_ids = true,
                       .max_msgs = (nmsg + fill - 1) / fill};
    uint64_t t0 = clock_mono_ns();
    struct producer *ps = producers_start(&s, fill);
    for (unsigned i = 0; i < fill; i++)
        pthread_join(ps[i].th, NULL);
    double fill_secs = (double)(clock_mono_ns() - t0) / 1e9;
    size_t total = 0;
    for (unsigned i = 0; i < fill; i++)
        total += ps[i].nids;

    struct upd_shared us = {.q = q, .batch = o->outcome_batch, .nrcpt = nrcpt, .kind = kind};
    struct updater *u = calloc(updaters, sizeof(*u));
    /* each updater takes the ids of some producers */
    for (unsigned i = 0; i < updaters; i++) {
        u[i].s = &us;
        u[i].port = queue_port_new();
    }
    uint64_t **slices = calloc(updaters, sizeof(*slices));
    for (unsigned i = 0; i < updaters; i++) {
        size_t n = 0, cap = 0;
        for (unsigned j = i; j < fill; j += updaters)
            for (size_t x = 0; x < ps[j].nids; x++)
                push_u64(&slices[i], &n, &cap, ps[j].ids[x]);
        u[i].ids = slices[i];
        u[i].nids = n;
    }
    struct queue_stats st0, st1;
    queue_stats(q, &st0);
    t0 = clock_mono_ns();
    for (unsigned i = 0; i < updaters; i++)
        pthread_create(&u[i].th, NULL, updater_main, &u[i]);
    for (unsigned i = 0; i < updaters; i++)
        pthread_join(u[i].th, NULL);
    double secs = (double)(clock_mono_ns() - t0) / 1e9;
    queue_stats(q, &st1);
    uint64_t outcomes = st1.outcomes - st0.outcomes, failed = 0;
    for (unsigned i = 0; i < updaters; i++)
        failed += u[i].failed;
    uint64_t commits = st1.commits - st0.commits;
    printf("  %-9s %5u rcpt/msg  prefill %7zu msgs (%6.0f msg/s)  %3u updaters x %3u/update: "
           "%9.0f outcomes/s  %6.0f commits/s  %6.0f outcomes/commit  removed %" PRIu64 "%s\n",
           kind == QUEUE_DELIVERED ? "delivered" : "deferred", nrcpt, total, total / fill_secs,
           updaters, o->outcome_batch, outcomes / secs, commits / secs,
           commits ? (double)outcomes / commits : 0, st1.removed - st0.removed,
           failed ? "  FAILURES" : "");
    fflush(stdout);
    for (unsigned i = 0; i < updaters; i++) {
        queue_port_free(u[i].port);
        free(slices[i]);
    }
    free(slices);
    free(u);
    producers_free(ps, fill);
    free_rcpts(s.rcpt, nrcpt);
    free(body);
    spool_close(q, dir);
}

/* ---- raw LMDB ceiling ---- */

static void
ceiling(const struct opts *o)
{
    char dir[600];
    snprintf(dir, sizeof(dir), "%s/sluice-bench-XXXXXX", o->root);
    if (mkdtemp(dir) == NULL)
        return;
    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *txn;
    mdb_env_create(&env);
    mdb_env_set_mapsize(env, 8ULL << 30);
    if (mdb_env_open(env, dir, 0, 0600) != 0) {
        mdb_env_close(env);
        rm_rf(dir);
        return;
    }
    mdb_txn_begin(env, NULL, 0, &txn);
    mdb_dbi_open(txn, NULL, 0, &dbi);
    mdb_txn_commit(txn);
    char *val = make_body(2048);
    uint64_t key = 0;
    /* durable commits of one small put: the sync ceiling */
    uint64_t t0 = clock_mono_ns(), n = 0;
    while (clock_mono_ns() - t0 < 1000000000ULL) {
        mdb_txn_begin(env, NULL, 0, &txn);
        uint64_t k = htobe64(++key);
        MDB_val kv = {8, &k}, dv = {8, &k};
        mdb_put(txn, dbi, &kv, &dv, 0);
        mdb_txn_commit(txn);
        n++;
    }
    double commits = n / ((double)(clock_mono_ns() - t0) / 1e9);
    unsigned per[] = {64, 100};
    printf("ceiling (raw LMDB on this disk, one thread, no queue):\n");
    printf("  durable commits of one 8-byte put:        %8.0f commits/s (%.2f ms each)\n", commits,
           1000 / commits);
    for (size_t i = 0; i < 2; i++) {
        t0 = clock_mono_ns();
        n = 0;
        uint64_t c = 0;
        while (clock_mono_ns() - t0 < 1000000000ULL) {
            mdb_txn_begin(env, NULL, 0, &txn);
            for (unsigned j = 0; j < per[i]; j++) {
                uint64_t k = htobe64(++key);
                MDB_val kv = {8, &k}, dv = {2048, val};
                mdb_put(txn, dbi, &kv, &dv, 0);
            }
            mdb_txn_commit(txn);
            n += per[i];
            c++;
        }
        double secs = (double)(clock_mono_ns() - t0) / 1e9;
        printf("  2 KB puts in %3u-put durable commits:     %8.0f puts/s (%.0f commits/s)\n",
               per[i], n / secs, c / secs);
    }
    free(val);
    mdb_env_close(env);
    rm_rf(dir);
}

int
main(int argc, char **argv)
{
    struct opts o;
    parse_opts(argc, argv, &o);
    struct statfs fs;
    if (statfs(o.root, &fs) != 0) {
        fprintf(stderr, "bench_queue: %s: %s\n", o.root, strerror(errno));
        return 1;
    }
    if ((unsigned long)fs.f_type == 0x01021994) {
        fprintf(stderr,
                "bench_queue: %s is tmpfs: fsync costs nothing there; use --dir on a disk\n",
                o.root);
        return 1;
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    printf("bench_queue: spool under %s (%s), %ld cpus, build %s\n", o.root,
           fs_name((long)fs.f_type), cpus, BENCH_BUILD);
    printf("%s, window %u per producer, %.1fs per group-commit run, %.1fs per max_batch=1 "
           "run\n\n",
           o.no_sync ? "NOT DURABLE (unsafe_no_sync: the CPU side alone)" : "durable", o.window,
           o.seconds, o.single_seconds);
    fflush(stdout);
    if (o.ceiling) {
        ceiling(&o);
        printf("\n");
    }
    if (o.enqueue) {
        printf("enqueue (group commit; then max_batch=1 and the ratio):\n");
        printf("  %4s %6s %4s | %9s %8s %7s %7s %7s %7s %7s | %9s %7s %7s | %6s\n", "prod", "body",
               "rcpt", "msgs/s", "commit/s", "msg/cmt", "cmt ms", "p50 ms", "p99 ms", "max ms",
               "msgs/s", "p50 ms", "p99 ms", "ratio");
        fflush(stdout);
        for (unsigned si = 0; si < o.nsizes; si++)
            for (unsigned ri = 0; ri < o.nrcpts; ri++)
                for (unsigned pi = 0; pi < o.nproducers; pi++) {
                    struct result g, one = {0};
                    run_enqueue(&o, o.producers[pi], o.sizes[si], o.rcpts[ri], o.max_batch,
                                o.seconds, &g);
                    if (o.single)
                        run_enqueue(&o, o.producers[pi], o.sizes[si], o.rcpts[ri], 1,
                                    o.single_seconds, &one);
                    double gr = g.acked / g.secs, sr = one.secs > 0 ? one.acked / one.secs : 0;
                    printf("  %4u %5uK %4u | %9.0f %8.0f %7.1f %7.2f %7.2f %7.2f %7.2f | ",
                           o.producers[pi], o.sizes[si] / 1024, o.rcpts[ri], gr, g.commits / g.secs,
                           g.per_commit, g.commit_ms, g.p50_ms, g.p99_ms, g.max_ms);
                    if (o.single)
                        printf("%9.0f %7.2f %7.2f | %5.1fx", sr, one.p50_ms, one.p99_ms,
                               sr > 0 ? gr / sr : 0);
                    else
                        printf("%9s %7s %7s | %6s", "-", "-", "-", "-");
                    if (g.failed || one.failed)
                        printf("  FAILED %" PRIu64, g.failed + one.failed);
                    printf("\n");
                    fflush(stdout);
                }
        printf("\n");
    }
    if (o.outcomes) {
        printf("outcome updates (%u outcomes per update request, 2 in flight per updater):\n",
               o.outcome_batch);
        run_outcomes(&o, 1, QUEUE_DELIVERED, 8);
        run_outcomes(&o, 100, QUEUE_DELIVERED, 8);
        run_outcomes(&o, 100, QUEUE_DEFERRED, 8);
    }
    return 0;
}
