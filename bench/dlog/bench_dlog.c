/*
 * bench_dlog: the delivery log's cost. For realistic delivery events
 * (queue id, recipient, MX, TLS, reply, two injection headers), prints:
 *
 *   - format alone: dlog_format() into a reused buffer, from 1 and 2
 *     threads (it formats the time with gmtime_r per event, which glibc
 *     serializes with a process-wide lock; the writer path does not);
 *   - the whole path: dlog_event() from 1 and 2 threads into a file in
 *     /tmp (or $TMPDIR), timed until dlog_free() returned, so every line
 *     is on the file; beside it the cost the calling thread paid per
 *     event, which is what a worker loses;
 *   - the ceiling: write(2) of the same octets in 64 KB chunks.
 *
 * Numbers are printed, never judged: this is not a test.
 *
 * Usage: bench_dlog [events_per_thread]   (default 200000)
 *
 * Each figure is the best of RUNS runs; the load average is printed
 * because other work on the machine moves these numbers a lot.
 *
 * Threading: the timed runs start 1 or 2 threads of their own.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "engine/dlog.h"

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

#define NVAR 1024 /* distinct ids and recipients, cycled */
#define RUNS 5    /* each figure is the best of these */

static char ids[NVAR][16], rcpts[NVAR][48];
static const char *const hdr_names[] = {"X-Campaign-ID", "X-Tenant-ID"};
static const char *const hdr_values[] = {"spring-sale-2026", "tenant-0042"};
static char path[512];

static void
make_inputs(void)
{
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (unsigned i = 0; i < NVAR; i++) {
        x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
        snprintf(ids[i], sizeof(ids[i]), "%013" PRIX64,
                 (uint64_t)(x * 0x2545F4914F6CDD1Dull) >> 12);
        snprintf(rcpts[i], sizeof(rcpts[i]), "subscriber.%u@mail%u.example.com", i, i % 37);
    }
}

static void
event_at(struct dlog_event *ev, unsigned i)
{
    memset(ev, 0, sizeof(*ev));
    ev->kind = DLOG_DELIVERY;
    ev->id = ids[i % NVAR];
    ev->rcpt = rcpts[i % NVAR];
    ev->sender = "bounces+abc123@news.example.net";
    ev->domain = "mail7.example.com";
    ev->mx = "mx2.mail7.example.com";
    ev->mx_addr = "192.0.2.25";
    ev->source = "198.51.100.7";
    ev->code = 250;
    ev->enhanced = "2.0.0";
    ev->reply = "2.0.0 Ok: queued as 4Xy7Zq1b2c";
    ev->attempt = 1;
    ev->classification = "delivered";
    ev->tls_protocol = "TLSv1.3";
    ev->tls_cipher = "TLS_AES_256_GCM_SHA384";
    ev->size = 48213;
    ev->arrival_ms = 1795401230000ull;
    ev->hdr_names = hdr_names;
    ev->hdr_values = hdr_values;
    ev->nhdr = 2;
}

struct run {
    struct dlog *log;
    unsigned n;
    bool format_only;
    uint64_t ns;    /* out: time in the event calls */
    uint64_t bytes; /* out: format only: octets formatted */
};

static void *
run_thread(void *arg)
{
    struct run *r = arg;
    struct dlog_event ev;
    if (r->format_only) {
        struct json j;
        json_init(&j);
        uint64_t t0 = clock_mono_ns(), ms = 1795401231000ull;
        for (unsigned i = 0; i < r->n; i++) {
            event_at(&ev, i);
            dlog_format(&j, &ev, ms + i / 64);
            r->bytes += j.len;
        }
        r->ns = clock_mono_ns() - t0;
        json_fini(&j);
        return NULL;
    }
    struct dlog_writer *w = dlog_writer_new(r->log);
    uint64_t t0 = clock_mono_ns();
    for (unsigned i = 0; i < r->n; i++) {
        event_at(&ev, i);
        dlog_event(w, &ev);
    }
    r->ns = clock_mono_ns() - t0;
    dlog_writer_free(w);
    return NULL;
}

struct figure {
    double events_s, mb_s, caller_ns; /* best of the runs: max, max, min */
};

static void
figure_keep(struct figure *best, double events_s, double mb_s, double caller_ns)
{
    if (events_s > best->events_s)
        best->events_s = events_s;
    if (mb_s > best->mb_s)
        best->mb_s = mb_s;
    if (best->caller_ns == 0 || caller_ns < best->caller_ns)
        best->caller_ns = caller_ns;
}

static void
bench_format(unsigned threads, unsigned n)
{
    struct figure best = {0};
    for (int run = 0; run < RUNS; run++) {
        pthread_t th[2];
        struct run r[2];
        uint64_t t0 = clock_mono_ns();
        for (unsigned t = 0; t < threads; t++) {
            r[t] = (struct run){.n = n, .format_only = true};
            pthread_create(&th[t], NULL, run_thread, &r[t]);
        }
        uint64_t bytes = 0, call_ns = 0;
        for (unsigned t = 0; t < threads; t++) {
            pthread_join(th[t], NULL);
            bytes += r[t].bytes;
            call_ns += r[t].ns;
        }
        double s = (double)(clock_mono_ns() - t0) / 1e9, ev = (double)n * threads;
        figure_keep(&best, ev / s, (double)bytes / s / 1e6, (double)call_ns / ev);
    }
    printf("%-26s %u thr %10.0f events/s %7.1f MB/s   %6.0f ns/event in caller\n",
           "format alone (dlog_format)", threads, best.events_s, best.mb_s, best.caller_ns);
}

/* One timed run of the whole path; false if the log cannot be opened. */
static bool
path_run(unsigned threads, unsigned n, struct figure *best)
{
    unlink(path);
    char err[256];
    struct dlog *d;
    if (dlog_new(path, 0, &d, err, sizeof(err)) != 0) {
        printf("whole path: %s\n", err);
        return false;
    }
    pthread_t th[2];
    struct run r[2];
    uint64_t t0 = clock_mono_ns();
    for (unsigned t = 0; t < threads; t++) {
        r[t] = (struct run){.log = d, .n = n};
        pthread_create(&th[t], NULL, run_thread, &r[t]);
    }
    uint64_t call_ns = 0;
    for (unsigned t = 0; t < threads; t++) {
        pthread_join(th[t], NULL);
        call_ns += r[t].ns;
    }
    dlog_free(d); /* returns once every line is written */
    double s = (double)(clock_mono_ns() - t0) / 1e9;
    off_t size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        size = lseek(fd, 0, SEEK_END);
        close(fd);
    }
    unlink(path);
    double ev = (double)n * threads;
    figure_keep(best, ev / s, (double)size / s / 1e6, (double)call_ns / ev);
    return true;
}

static void
bench_path(unsigned threads, unsigned n)
{
    struct figure best = {0};
    for (int run = 0; run < RUNS; run++)
        if (!path_run(threads, n, &best))
            return;
    printf("%-26s %u thr %10.0f events/s %7.1f MB/s   %6.0f ns/event in caller"
           "   (%.1f%% of a core at 50k events/s)\n",
           "dlog_event to file", threads, best.events_s, best.mb_s, best.caller_ns,
           best.caller_ns * 50000 / 1e9 * 100);
}

/* write(2) of the same octets in DLOG_BUF_SIZE chunks: the disk's ceiling. */
static void
bench_ceiling(unsigned n)
{
    struct json j;
    json_init(&j);
    struct dlog_event ev;
    event_at(&ev, 0);
    dlog_format(&j, &ev, 1795401231000ull);
    size_t line = j.len, per = DLOG_BUF_SIZE / line;
    char *chunk = malloc(per * line);
    if (chunk == NULL)
        return;
    for (size_t i = 0; i < per; i++)
        memcpy(chunk + i * line, j.buf, line);
    json_fini(&j);
    unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (fd < 0) {
        free(chunk);
        return;
    }
    uint64_t total = (uint64_t)n * line, done = 0, t0 = clock_mono_ns();
    while (done < total) {
        ssize_t w = write(fd, chunk, per * line);
        if (w <= 0)
            break;
        done += (uint64_t)w;
    }
    close(fd);
    double s = (double)(clock_mono_ns() - t0) / 1e9;
    printf("%-26s       %10.0f lines/s  %7.1f MB/s   (%zu-octet lines)\n",
           "write(2) ceiling, 64 KB", (double)done / (double)line / s, (double)done / s / 1e6,
           line);
    free(chunk);
    unlink(path);
}

int
main(int argc, char **argv)
{
    unsigned n = 200000;
    if (argc > 1) {
        char *end;
        unsigned long v = strtoul(argv[1], &end, 10);
        if (*end != '\0' || v == 0 || v > 100000000ul) {
            fprintf(stderr, "usage: %s [events_per_thread]\n", argv[0]);
            return 2;
        }
        n = (unsigned)v;
    }
    const char *dir = getenv("TMPDIR");
    snprintf(path, sizeof(path), "%s/bench_dlog.%ld.jsonl", dir != NULL ? dir : "/tmp",
             (long)getpid());
    make_inputs();

    printf("bench_dlog: build %s\n", BENCH_BUILD);
    double load[1] = {-1};
    getloadavg(load, 1);
    printf("%u events per thread, best of %d runs, file %s, flush every %u ms, "
           "load %.2f; MB = 10^6 bytes\n",
           n, RUNS, path, DLOG_FLUSH_MS_DEFAULT, load[0]);
    bench_format(1, n);
    bench_format(2, n);
    bench_path(1, n);
    bench_path(2, n);
    bench_ceiling(2 * n);
    return 0;
}
