/*
 * bench_limits: the limiter of engine/limits.h (not a test: prints
 * figures, never fails on a number).
 *
 *   local: limits_take_msgs() decisions per second over 1,000 keys at
 *          50/s, simulated time, granted and refused mixed; and over one
 *          unlimited key (the floor of a call).
 *   redis: one worker, one key at 1,000,000/s (so Redis, not the limit,
 *          bounds the run) pushed for 2 s, with token_batch 10 and 1:
 *          messages/s and Redis round trips per 1,000 messages.
 *
 * Redis: SLUICE_BENCH_REDIS=host:port, or a redis-server of its own on a
 * free loopback port (--save '' --appendonly no), stopped by PID.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "engine/limits.h"
#include "tests/support/redis_server.h"

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

#define SEC 1000000000ULL

/* ---- local ---- */

static void
bench_local(void)
{
    static struct worker w; /* local limiters touch neither ring nor timers */
    struct limits *l;
    struct limits_opts o = {0};
    char err[256];
    if (limits_new(&w, &o, &l, err, sizeof(err)) < 0) {
        fprintf(stderr, "limits_new: %s\n", err);
        return;
    }
    enum { KEYS = 1000 };
    struct limit_key *k = calloc(KEYS, sizeof(*k));
    struct limit_conf c = {.msg_rate = {50, 1000}, .msg_burst = 5};
    for (unsigned i = 0; i < KEYS; i++) {
        char name[32];
        snprintf(name, sizeof(name), "d%u.example", i);
        limits_key_init(l, &k[i], name, &c, NULL, NULL);
    }
    /* 100 simulated µs per round over all keys: 1 key in 200 gets a token */
    const unsigned rounds = 20000;
    uint64_t granted = 0, t0 = clock_mono_ns(), now = 1000 * SEC;
    for (unsigned r = 0; r < rounds; r++, now += 100000) {
        for (unsigned i = 0; i < KEYS; i++) {
            uint64_t at;
            granted += limits_take_msgs(l, &k[i], 1, now, &at);
        }
    }
    double s = (double)(clock_mono_ns() - t0) / 1e9;
    double n = (double)rounds * KEYS;
    printf("local   gcra 1000 keys        %12.0f decisions/s  %6.1f ns/decision  (%.2f%% granted)\n",
           n / s, s * 1e9 / n, 100.0 * (double)granted / n);

    struct limit_key u;
    struct limit_conf unl = {0};
    limits_key_init(l, &u, "unlimited", &unl, NULL, NULL);
    t0 = clock_mono_ns();
    uint64_t sink = 0;
    for (unsigned i = 0; i < 20000000; i++) {
        uint64_t at;
        sink += limits_take_msgs(l, &u, 1, now, &at);
    }
    s = (double)(clock_mono_ns() - t0) / 1e9;
    printf("local   unlimited key         %12.0f decisions/s  %6.1f ns/decision  (%llu)\n",
           2e7 / s, s * 1e9 / 2e7, (unsigned long long)sink);
    limits_key_fini(l, &u);
    for (unsigned i = 0; i < KEYS; i++)
        limits_key_fini(l, &k[i]);
    free(k);
    limits_free(l);
}

/* ---- redis ---- */

struct run {
    struct worker w;
    struct limits *l;
    struct limit_key k;
    struct timer t;
    uint64_t start, until, deadline;
    uint64_t msgs;
    bool pushing;
};

static void push(struct run *r);

static void
on_wake(void *arg)
{
    struct run *r = arg;
    if (r->pushing)
        push(r);
}

static void
push(struct run *r)
{
    uint64_t now = clock_mono_ns();
    if (now >= r->until) {
        r->pushing = false;
        r->w.stopping = true;
        return;
    }
    for (int i = 0; i < 1000; i++) {
        uint64_t at;
        unsigned g = limits_take_msgs(r->l, &r->k, 100, now, &at);
        if (g == 0) {
            worker_timer_arm(&r->w, &r->t, at < r->until ? at : r->until);
            return;
        }
        r->msgs += g;
    }
    worker_timer_arm(&r->w, &r->t, now);
}

static void
on_timer(struct timer *t, void *ctx)
{
    (void)ctx;
    struct run *r = (struct run *)((char *)t - offsetof(struct run, t));
    struct limits_stats st;
    if (r->pushing) {
        push(r);
        return;
    }
    limits_stats(r->l, &st);
    uint64_t now = clock_mono_ns();
    if (strcmp(st.redis, "connected") == 0) {
        r->pushing = true;
        r->start = now;
        r->until = now + 2 * SEC;
        push(r);
    } else if (now > r->deadline) {
        fprintf(stderr, "redis: not connected after 5 s (%s)\n", st.redis);
        r->w.stopping = true;
    } else {
        worker_timer_arm(&r->w, &r->t, now + 1000000);
    }
}

static void
bench_redis_run(const char *url, unsigned batch)
{
    static struct run r;
    memset(&r, 0, sizeof(r));
    if (worker_init(&r.w, 0, 256, NULL) < 0) {
        fprintf(stderr, "io_uring unavailable\n");
        return;
    }
    struct limits_opts o = {.redis_url = url, .token_batch = batch, .nodes = 1};
    char err[256];
    if (limits_new(&r.w, &o, &r.l, err, sizeof(err)) < 0) {
        fprintf(stderr, "limits_new: %s\n", err);
        worker_fini(&r.w);
        return;
    }
    char name[32];
    snprintf(name, sizeof(name), "bench.batch%u", batch);
    struct limit_conf c = {.msg_rate = {1000000, 1000}, .msg_burst = 100};
    limits_key_init(r.l, &r.k, name, &c, on_wake, &r);
    timer_init(&r.t, on_timer);
    r.deadline = clock_mono_ns() + 5 * SEC;
    worker_timer_arm(&r.w, &r.t, 0);
    worker_run(&r.w);
    struct limits_stats st;
    limits_stats(r.l, &st);
    double s = (double)(clock_mono_ns() - r.start) / 1e9;
    if (r.msgs > 0)
        printf("redis   token_batch %-3u        %12.0f msgs/s       %8.1f round trips per 1000 msgs"
               "  (%llu msgs, %llu round trips)\n",
               batch, (double)r.msgs / s, (double)st.redis_roundtrips * 1000.0 / (double)r.msgs,
               (unsigned long long)r.msgs, (unsigned long long)st.redis_roundtrips);
    limits_key_fini(r.l, &r.k);
    r.l = limits_free(r.l);
    worker_fini(&r.w);
}

int
main(void)
{
    signal(SIGPIPE, SIG_IGN);
    printf("bench_limits  build: %s\n", BENCH_BUILD);
    bench_local();
    const char *env = getenv("SLUICE_BENCH_REDIS");
    char url[300];
    pid_t pid = -1;
    if (env != NULL && *env != '\0') {
        snprintf(url, sizeof(url), "redis://%s", env);
    } else {
        char err[200];
        int port = redis_server_free_port();
        pid = port > 0 ? redis_server_start(port, err, sizeof(err)) : -1;
        if (pid < 0) {
            printf("redis   skipped: no redis-server could be started: %s "
                   "(set SLUICE_BENCH_REDIS=host:port)\n", port > 0 ? err : "no free port");
            return 0;
        }
        snprintf(url, sizeof(url), "redis://127.0.0.1:%d", port);
    }
    printf("redis   %s, one worker, one key at 1000000/s for 2 s; ceiling: one round trip per "
           "message at token_batch 1\n", url);
    bench_redis_run(url, 10);
    bench_redis_run(url, 1);
    redis_server_kill(pid);
    return 0;
}
