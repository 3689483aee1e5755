/*
 * test_limits: the limiter of engine/limits.h.
 *
 * Local cases drive simulated time (now_ns passed in; no ring, no sleep):
 * GCRA's window bound and long-run rate, the retry time it answers,
 * connection leases and their rate (both or neither), adaptive backoff and
 * its recovery, suspend and resume.
 *
 * Redis cases start their own redis-server on a free loopback port (they
 * skip when it is not installed) and run each "node" as a worker thread
 * with its own limiter: a shared message rate across two nodes (window
 * bound with the documented batch slack, round trips per 1,000 messages),
 * shared leases, leases of a vanished node expiring after the ttl, and an
 * outage: redis-server killed (local share, "unreachable") then restarted
 * on the same port ("connected" again). The test thread talks to a worker
 * only through worker_post() and a semaphore; conditions that depend on
 * Redis are re-checked on the worker from a 2 ms timer, each wait bounded.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <hiredis/hiredis.h>

#include "engine/limits.h"

#define SEC 1000000000ULL
#define MSEC 1000000ULL
#define BASE (1000 * SEC) /* simulated clocks start here */

/* --- local mode ------------------------------------------------------- */

static struct worker fake_worker; /* local limiters touch neither ring nor timers */

static struct limits *
local_new(const struct limits_opts *o)
{
    struct limits_opts def = {0};
    struct limits *l = NULL;
    char err[256];
    assert_int_equal(limits_new(&fake_worker, o ? o : &def, &l, err, sizeof(err)), 0);
    return l;
}

static struct limit_conf
conf_msgs(uint32_t count, uint32_t per_ms, unsigned burst)
{
    struct limit_conf c = {0};
    c.msg_rate.count = count;
    c.msg_rate.per_ms = per_ms;
    c.msg_burst = burst;
    return c;
}

/* Demand of up to 1000 every simulated millisecond for secs seconds;
 * per-ms grants into counts. Returns the total. */
static uint64_t
drive_ms(struct limits *l, struct limit_key *k, uint64_t start, unsigned ms, uint16_t *counts)
{
    uint64_t total = 0;
    for (unsigned i = 0; i < ms; i++) {
        uint64_t r;
        unsigned g = limits_take_msgs(l, k, 1000, start + i * MSEC, &r);
        if (g == 0)
            assert_true(r > start + i * MSEC);
        if (counts != NULL)
            counts[i] = (uint16_t)g;
        total += g;
    }
    return total;
}

static unsigned
max_window(const uint16_t *counts, unsigned n, unsigned w)
{
    unsigned sum = 0, best = 0;
    for (unsigned i = 0; i < n; i++) {
        sum += counts[i];
        if (i >= w)
            sum -= counts[i - w];
        if (sum > best)
            best = sum;
    }
    return best;
}

static void
test_gcra_window_and_rate(void **state)
{
    (void)state;
    struct limits *l = local_new(NULL);
    struct limit_key k;
    struct limit_conf c = conf_msgs(50, 1000, 5);
    assert_int_equal(limits_key_init(l, &k, "gmail.com", &c, NULL, NULL), 0);
    enum { MS = 100000 };
    uint16_t *counts = calloc(MS, sizeof(*counts));
    assert_non_null(counts);
    uint64_t total = drive_ms(l, &k, BASE, MS, counts);
    /* every half-open 1 s window: at most rate + burst, and the burst is
     * really there at the start */
    assert_int_equal(max_window(counts, MS, 1000), 55);
    assert_int_equal(counts[0], 6);
    /* long run: 100 s at 50/s */
    assert_true(total >= 4950);
    assert_true(total <= 5000 + 5 + 1);
    struct limits_stats st;
    limits_stats(l, &st);
    assert_string_equal(st.redis, "off");
    assert_int_equal(st.msgs_granted, total);
    free(counts);
    limits_key_fini(l, &k);
    limits_free(l);
}

/* The answered retry time is exact: a token is there then, not 1 ns before. */
static void
test_gcra_retry_at(void **state)
{
    (void)state;
    struct limits *l = local_new(NULL);
    struct limit_key k;
    struct limit_conf c = conf_msgs(3000, 60000, 2); /* 50/s as per minute */
    assert_int_equal(limits_key_init(l, &k, "example.org", &c, NULL, NULL), 0);
    uint64_t now = BASE, r = 0;
    assert_int_equal(limits_take_msgs(l, &k, 10, now, &r), 3);
    assert_int_equal(limits_take_msgs(l, &k, 1, now, &r), 0);
    assert_int_equal(r, now + 20 * MSEC);
    unsigned sent = 0;
    for (int i = 0; i < 1000; i++) {
        uint64_t r2;
        assert_int_equal(limits_take_msgs(l, &k, 1, r - 1, &r2), 0);
        assert_int_equal(r2, r);
        now = r;
        assert_int_equal(limits_take_msgs(l, &k, 1, now, &r), 0 + 1);
        sent++;
        assert_int_equal(limits_take_msgs(l, &k, 1, now, &r), 0);
    }
    /* 1000 tokens at exactly 20 ms apart */
    assert_int_equal(now, BASE + 1000 * 20 * MSEC);
    assert_int_equal(sent, 1000);
    limits_key_fini(l, &k);
    limits_free(l);
}

static void
test_unlimited(void **state)
{
    (void)state;
    struct limits *l = local_new(NULL);
    struct limit_key k;
    struct limit_conf c = {0};
    assert_int_equal(limits_key_init(l, &k, "any", &c, NULL, NULL), 0);
    uint64_t r;
    assert_int_equal(limits_take_msgs(l, &k, 12345, BASE, &r), 12345);
    for (int i = 0; i < 1000; i++)
        assert_true(limits_conn_acquire(l, &k, BASE, &r));
    for (int i = 0; i < 1000; i++)
        limits_conn_release(l, &k);
    assert_int_equal(limits_key_init(l, &k, "bad{tag}", &c, NULL, NULL), -EINVAL);
    assert_int_equal(limits_key_init(l, &k, "", &c, NULL, NULL), -EINVAL);
    limits_free(l);
    limits_key_fini(NULL, &k); /* detached: frees its lease array only */
}

static void
test_conn_leases_local(void **state)
{
    (void)state;
    struct limits *l = local_new(NULL);
    struct limit_key k;
    struct limit_conf c = {0};
    c.max_connections = 3;
    assert_int_equal(limits_key_init(l, &k, "leases.local", &c, NULL, NULL), 0);
    uint64_t r, now = BASE;
    for (int i = 0; i < 3; i++)
        assert_true(limits_conn_acquire(l, &k, now, &r));
    assert_false(limits_conn_acquire(l, &k, now, &r));
    assert_int_equal(r, UINT64_MAX);
    struct limits_stats st;
    limits_stats(l, &st);
    assert_int_equal(st.leases, 3);
    limits_conn_release(l, &k);
    assert_true(limits_conn_acquire(l, &k, now, &r));
    assert_false(limits_conn_acquire(l, &k, now, &r));
    for (int i = 0; i < 3; i++)
        limits_conn_release(l, &k);
    limits_stats(l, &st);
    assert_int_equal(st.leases, 0);

    /* rate and lease: both or neither */
    c.max_connections = 1;
    c.conn_rate.count = 10;
    c.conn_rate.per_ms = 1000;
    limits_key_set(l, &k, &c);
    assert_true(limits_conn_acquire(l, &k, now, &r));
    /* lease full: refused, and no rate token spent */
    assert_false(limits_conn_acquire(l, &k, now + 200 * MSEC, &r));
    assert_int_equal(r, UINT64_MAX);
    limits_conn_release(l, &k);
    assert_true(limits_conn_acquire(l, &k, now + 200 * MSEC, &r));
    limits_conn_release(l, &k);
    /* rate: refused with the exact time, and no lease taken */
    assert_false(limits_conn_acquire(l, &k, now + 250 * MSEC, &r));
    assert_int_equal(r, now + 300 * MSEC);
    limits_stats(l, &st);
    assert_int_equal(st.leases, 0);
    assert_true(limits_conn_acquire(l, &k, now + 300 * MSEC, &r));
    limits_conn_release(l, &k);
    limits_key_fini(l, &k);
    limits_free(l);
}

static void
test_backoff_and_recovery(void **state)
{
    (void)state;
    struct limits_opts o = {0};
    o.backoff_ms = 10000;
    o.backoff_step_ms = 5000;
    struct limits *l = local_new(&o);
    struct limit_key k;
    /* burst 1: steps of a simulated millisecond arrive up to 1 ms late,
     * which a tolerance of one interval absorbs (with none, GCRA loses the
     * lateness at 75/s) */
    struct limit_conf c = conf_msgs(100, 1000, 1);
    assert_int_equal(limits_key_init(l, &k, "backoff.test", &c, NULL, NULL), 0);
    uint64_t t = BASE;
    uint64_t n = drive_ms(l, &k, t, 10000, NULL);
    assert_true(n >= 999 && n <= 1003);
    assert_int_equal(limits_key_rate_pct(&k, t + 10 * SEC), 100);

    t += 10 * SEC;
    limits_backoff(l, &k, t); /* a 421 */
    assert_int_equal(limits_key_rate_pct(&k, t), 50);
    n = drive_ms(l, &k, t, 10000, NULL);
    assert_true(n >= 498 && n <= 503); /* 50/s for the hold time */
    t += 10 * SEC;
    assert_int_equal(limits_key_rate_pct(&k, t), 75); /* first step up */
    n = drive_ms(l, &k, t, 5000, NULL);
    assert_true(n >= 373 && n <= 378);

    t += 5 * SEC;
    assert_int_equal(limits_key_rate_pct(&k, t), 100); /* whole again */
    n = drive_ms(l, &k, t, 5000, NULL);
    assert_true(n >= 498 && n <= 503);

    /* repeated 421s halve again, down to a floor */
    t += 5 * SEC;
    limits_backoff(l, &k, t);
    limits_backoff(l, &k, t);
    assert_int_equal(limits_key_rate_pct(&k, t), 25);
    for (int i = 0; i < 10; i++)
        limits_backoff(l, &k, t);
    assert_int_equal(limits_key_rate_pct(&k, t), 3); /* 1/32 */
    limits_key_fini(l, &k);
    limits_free(l);
}

static void
conn_rate_backoff_case(void)
{
    /* the connection rate halves with the message rate */
    struct limits_opts o = {0};
    o.backoff_ms = 10000;
    o.backoff_step_ms = 5000;
    struct limits *l = local_new(&o);
    struct limit_key k;
    struct limit_conf c = {0};
    c.conn_rate.count = 10;
    c.conn_rate.per_ms = 1000;
    assert_int_equal(limits_key_init(l, &k, "backoff.conn", &c, NULL, NULL), 0);
    uint64_t r, t = BASE;
    assert_true(limits_conn_acquire(l, &k, t, &r));
    limits_conn_release(l, &k);
    limits_backoff(l, &k, t);
    /* the slot booked at the old rate stays; the ones after are 200 ms apart */
    assert_true(limits_conn_acquire(l, &k, t + 100 * MSEC, &r));
    limits_conn_release(l, &k);
    assert_false(limits_conn_acquire(l, &k, t + 200 * MSEC, &r));
    assert_int_equal(r, t + 300 * MSEC);
    assert_true(limits_conn_acquire(l, &k, r, &r));
    limits_conn_release(l, &k);
    limits_key_fini(l, &k);
    limits_free(l);
}

static void
test_backoff_conn_rate(void **state)
{
    (void)state;
    conn_rate_backoff_case();
}

static unsigned wakes;

static void
count_wake(void *arg)
{
    (void)arg;
    wakes++;
}

static void
test_suspend(void **state)
{
    (void)state;
    struct limits *l = local_new(NULL);
    struct limit_key k;
    struct limit_conf c = conf_msgs(10, 1000, 10);
    c.max_connections = 5;
    assert_int_equal(limits_key_init(l, &k, "suspend.test", &c, count_wake, NULL), 0);
    uint64_t r;
    wakes = 0;
    limits_suspend(l, &k, true);
    assert_int_equal(limits_take_msgs(l, &k, 5, BASE, &r), 0);
    assert_int_equal(r, UINT64_MAX);
    assert_false(limits_conn_acquire(l, &k, BASE, &r));
    assert_int_equal(r, UINT64_MAX);
    assert_int_equal(wakes, 0);
    limits_suspend(l, &k, false);
    assert_int_equal(wakes, 1);
    /* nothing was spent while suspended: the whole burst is there */
    assert_int_equal(limits_take_msgs(l, &k, 100, BASE + SEC, &r), 11);
    assert_true(limits_conn_acquire(l, &k, BASE, &r));
    limits_conn_release(l, &k);
    limits_key_fini(l, &k);
    limits_free(l);
}

/* --- Redis: the server ------------------------------------------------ */

static pid_t redis_pid = -1;
static int redis_port;

static const char *
redis_server_path(void)
{
    static const char *const paths[] = {"/usr/bin/redis-server", "/usr/local/bin/redis-server"};
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
        if (access(paths[i], X_OK) == 0)
            return paths[i];
    return NULL;
}

static int
free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    socklen_t len = sizeof(a);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* Start redis-server on redis_port and wait (bounded) for its "Ready to
 * accept connections" line on the pipe of its standard output. */
static void
redis_start(void)
{
    const char *path = redis_server_path();
    assert_non_null(path);
    int p[2];
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    char port[16];
    snprintf(port, sizeof(port), "%d", redis_port);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(p[1], 1);
        execl(path, path, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly",
              "no", "--daemonize", "no", "--loglevel", "notice", (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    redis_pid = pid;
    char buf[8192];
    size_t have = 0;
    bool ready = false;
    uint64_t deadline = clock_now_ns() + 10 * SEC;
    while (!ready && clock_now_ns() < deadline) {
        struct pollfd pfd = {.fd = p[0], .events = POLLIN};
        if (poll(&pfd, 1, 200) <= 0)
            continue;
        ssize_t n = read(p[0], buf + have, sizeof(buf) - 1 - have);
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = '\0';
        ready = strstr(buf, "Ready to accept connections") != NULL;
        if (have > sizeof(buf) / 2) {
            memmove(buf, buf + have - 64, 64);
            have = 64;
        }
    }
    /* redis-server ignores SIGPIPE: closing our end only drops its logs */
    close(p[0]);
    assert_true(ready);
}

static void
redis_kill(void)
{
    if (redis_pid > 0) {
        kill(redis_pid, SIGKILL);
        waitpid(redis_pid, NULL, 0);
        redis_pid = -1;
    }
}

static int
redis_teardown(void **state)
{
    (void)state;
    redis_kill();
    return 0;
}

static bool
redis_setup_or_skip(void)
{
    if (redis_server_path() == NULL) {
        print_message("redis-server is not installed: skipping\n");
        return false;
    }
    redis_port = free_port();
    redis_start();
    return true;
}

/* A blocking look at Redis from the test thread. */
static long long
redis_zcard(const char *key)
{
    struct timeval tv = {2, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
    assert_non_null(c);
    assert_int_equal(c->err, 0);
    redisReply *rep = redisCommand(c, "ZCARD %s", key);
    assert_non_null(rep);
    assert_int_equal(rep->type, REDIS_REPLY_INTEGER);
    long long n = rep->integer;
    freeReplyObject(rep);
    redisFree(c);
    return n;
}

static void
redis_script_flush(void)
{
    struct timeval tv = {2, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
    assert_non_null(c);
    assert_int_equal(c->err, 0);
    redisReply *rep = redisCommand(c, "SCRIPT FLUSH");
    assert_non_null(rep);
    assert_int_equal(rep->type, REDIS_REPLY_STATUS);
    freeReplyObject(rep);
    redisFree(c);
}

/* --- Redis: nodes ----------------------------------------------------- */

struct grant {
    uint64_t t;
    unsigned n;
};

struct node {
    struct worker w;
    struct limits *l;
    struct limit_key k;
    bool running;
    /* demand */
    bool pumping;
    uint64_t pump_until;
    struct timer pump_timer;
    struct grant *grants;
    unsigned ngrants, grants_cap;
    uint64_t msgs;
    /* connections taken by until_acquired() */
    unsigned acquired;
    unsigned wakes;
};

struct call {
    struct worker_msg m;
    struct node *n;
    void (*fn)(struct node *n, void *arg);
    void *arg;
    sem_t done;
};

static void
call_run(struct worker *w, struct worker_msg *m)
{
    (void)w;
    struct call *c = (struct call *)((char *)m - offsetof(struct call, m));
    c->fn(c->n, c->arg);
    sem_post(&c->done);
}

static void
sem_wait_bounded(sem_t *s, unsigned secs)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += secs;
    int rc;
    while ((rc = sem_timedwait(s, &ts)) < 0 && errno == EINTR)
        ;
    assert_int_equal(rc, 0);
}

/* Run fn(n, arg) on n's worker and wait for it. */
static void
node_call(struct node *n, void (*fn)(struct node *n, void *arg), void *arg)
{
    struct call c;
    memset(&c, 0, sizeof(c));
    c.m.fn = call_run;
    c.n = n;
    c.fn = fn;
    c.arg = arg;
    sem_init(&c.done, 0, 0);
    worker_post(&n->w, &c.m);
    sem_wait_bounded(&c.done, 30);
    sem_destroy(&c.done);
}

struct until {
    struct timer t;
    struct node *n;
    bool (*pred)(struct node *n, void *arg);
    void *arg;
    uint64_t deadline;
    bool result;
    sem_t done;
};

static void
until_check(struct until *u)
{
    if (u->pred(u->n, u->arg)) {
        u->result = true;
        sem_post(&u->done);
    } else if (clock_now_ns() >= u->deadline) {
        u->result = false;
        sem_post(&u->done);
    } else {
        worker_timer_arm(&u->n->w, &u->t, clock_now_ns() + 2 * MSEC);
    }
}

static void
until_fire(struct timer *t, void *ctx)
{
    (void)ctx;
    until_check((struct until *)((char *)t - offsetof(struct until, t)));
}

static void
until_start(struct node *n, void *arg)
{
    (void)n;
    until_check(arg);
}

/* Re-check pred on n's worker every 2 ms until true or timeout_ms. */
static bool
node_until(struct node *n, bool (*pred)(struct node *n, void *arg), void *arg, unsigned timeout_ms)
{
    struct until u;
    memset(&u, 0, sizeof(u));
    timer_init(&u.t, until_fire);
    u.n = n;
    u.pred = pred;
    u.arg = arg;
    u.deadline = clock_now_ns() + timeout_ms * MSEC;
    sem_init(&u.done, 0, 0);
    node_call(n, until_start, &u);
    sem_wait_bounded(&u.done, timeout_ms / 1000 + 30);
    sem_destroy(&u.done);
    return u.result;
}

static void pump(struct node *n);

static void
node_wake(void *arg)
{
    struct node *n = arg;
    n->wakes++;
    if (n->pumping)
        pump(n);
}

static void
pump(struct node *n)
{
    uint64_t now = clock_now_ns();
    if (now >= n->pump_until) {
        n->pumping = false;
        worker_timer_cancel(&n->w, &n->pump_timer);
        return;
    }
    for (int i = 0; i < 1000; i++) {
        uint64_t r;
        unsigned g = limits_take_msgs(n->l, &n->k, 10, now, &r);
        if (g == 0) {
            uint64_t next = r < now + 50 * MSEC ? r : now + 50 * MSEC;
            worker_timer_arm(&n->w, &n->pump_timer, next);
            return;
        }
        if (n->ngrants < n->grants_cap)
            n->grants[n->ngrants++] = (struct grant){now, g};
        n->msgs += g;
    }
    worker_timer_arm(&n->w, &n->pump_timer, now + MSEC);
}

static void
pump_fire(struct timer *t, void *ctx)
{
    (void)ctx;
    pump((struct node *)((char *)t - offsetof(struct node, pump_timer)));
}

static void
start_pump(struct node *n, void *arg)
{
    n->pumping = true;
    n->pump_until = clock_now_ns() + *(uint64_t *)arg;
    pump(n);
}

static bool
pump_done(struct node *n, void *arg)
{
    (void)arg;
    return !n->pumping;
}

static bool
state_is(struct node *n, void *arg)
{
    struct limits_stats st;
    limits_stats(n->l, &st);
    return strcmp(st.redis, arg) == 0;
}

/* Acquire connections on n->k until n->acquired reaches *target. */
static bool
until_acquired(struct node *n, void *arg)
{
    unsigned target = *(unsigned *)arg;
    uint64_t r;
    while (n->acquired < target && limits_conn_acquire(n->l, &n->k, clock_now_ns(), &r))
        n->acquired++;
    return n->acquired >= target;
}

static void
release_one(struct node *n, void *arg)
{
    (void)arg;
    limits_conn_release(n->l, &n->k);
    n->acquired--;
}

static void
get_stats(struct node *n, void *arg)
{
    limits_stats(n->l, arg);
}

static void
node_start(struct node *n, unsigned id, const char *key, const struct limits_opts *o,
           const struct limit_conf *c)
{
    memset(n, 0, sizeof(*n));
    if (worker_init(&n->w, id, 256, n) < 0) {
        print_message("io_uring is not available: skipping\n");
        skip();
    }
    char err[256];
    assert_int_equal(limits_new(&n->w, o, &n->l, err, sizeof(err)), 0);
    assert_int_equal(limits_key_init(n->l, &n->k, key, c, node_wake, n), 0);
    timer_init(&n->pump_timer, pump_fire);
    n->grants_cap = 100000;
    n->grants = calloc(n->grants_cap, sizeof(*n->grants));
    assert_non_null(n->grants);
    assert_int_equal(worker_start(&n->w), 0);
    n->running = true;
}

static void
stop_fn(struct node *n, void *arg)
{
    bool release = *(bool *)arg;
    /* the loop ends with this turn: the limiter frees its link at once */
    n->w.stopping = true;
    worker_timer_cancel(&n->w, &n->pump_timer);
    if (release)
        limits_key_fini(n->l, &n->k);
    n->l = limits_free(n->l);
}

/* Stop n; with release false it vanishes like a node killed with SIGKILL:
 * nothing tells Redis, its leases stay until the ttl. */
static void
node_stop(struct node *n, bool release)
{
    if (!n->running)
        return;
    node_call(n, stop_fn, &release);
    assert_int_equal(worker_join(&n->w), 0);
    limits_key_fini(NULL, &n->k);
    worker_fini(&n->w);
    free(n->grants);
    n->running = false;
}

static struct limits_opts
shared_opts(unsigned nodes)
{
    static char url[64];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", redis_port);
    struct limits_opts o = {0};
    o.redis_url = url;
    o.nodes = nodes;
    o.token_batch = 10;
    o.lease_ttl_ms = 3000;
    o.redis_timeout_ms = 500;
    o.reconnect_min_ms = 50;
    o.reconnect_max_ms = 400;
    return o;
}

static int
cmp_grant(const void *a, const void *b)
{
    const struct grant *x = a, *y = b;
    return x->t < y->t ? -1 : x->t > y->t;
}

static void
test_shared_msg_rate(void **state)
{
    (void)state;
    if (!redis_setup_or_skip())
        skip();
    struct limits_opts o = shared_opts(2);
    struct limit_conf c = conf_msgs(200, 1000, 10);
    static struct node a, b;
    node_start(&a, 0, "rate.test", &o, &c);
    node_start(&b, 1, "rate.test", &o, &c);
    assert_true(node_until(&a, state_is, "connected", 5000));
    assert_true(node_until(&b, state_is, "connected", 5000));

    uint64_t run = 3 * SEC;
    node_call(&a, start_pump, &run);
    node_call(&b, start_pump, &run);
    assert_true(node_until(&a, pump_done, NULL, 10000));
    assert_true(node_until(&b, pump_done, NULL, 10000));
    struct limits_stats sa, sb;
    node_call(&a, get_stats, &sa);
    node_call(&b, get_stats, &sb);

    unsigned n = a.ngrants + b.ngrants;
    struct grant *all = calloc(n, sizeof(*all));
    assert_non_null(all);
    memcpy(all, a.grants, a.ngrants * sizeof(*all));
    memcpy(all + a.ngrants, b.grants, b.ngrants * sizeof(*all));
    qsort(all, n, sizeof(*all), cmp_grant);
    uint64_t worst = 0, sum = 0;
    for (unsigned i = 0, j = 0; i < n; i++) {
        sum += all[i].n;
        while (all[j].t + SEC <= all[i].t)
            sum -= all[j++].n;
        if (sum > worst)
            worst = sum;
    }
    uint64_t total = a.msgs + b.msgs;
    uint64_t rt = sa.redis_roundtrips + sb.redis_roundtrips;
    /* slack of limits.h: rate + burst + 1 + nodes * batch */
    uint64_t bound = 200 + 10 + 1 + 2 * 10;
    print_message("shared 200/s burst 10, 2 nodes, 3 s: %llu msgs (a %llu, b %llu), worst 1 s "
                  "window %llu (bound %llu), %llu round trips = %.0f per 1000 msgs, "
                  "expired %llu\n",
                  (unsigned long long)total, (unsigned long long)a.msgs,
                  (unsigned long long)b.msgs, (unsigned long long)worst,
                  (unsigned long long)bound, (unsigned long long)rt,
                  total ? rt * 1000.0 / (double)total : 0.0,
                  (unsigned long long)(sa.tokens_expired + sb.tokens_expired));
    assert_true(worst <= bound);
    assert_true(total >= 540);     /* 90% of 3 s at 200/s */
    assert_true(a.msgs >= 100 && b.msgs >= 100); /* both nodes got a share */
    assert_true(rt * 1000 / total < 400); /* batching: far below one per message */
    assert_int_equal(sa.local_decisions + sb.local_decisions, 0);
    assert_true(sa.batch_decisions > 0 && sb.batch_decisions > 0);
    free(all);
    node_stop(&a, true);
    node_stop(&b, true);
}

static void
test_shared_leases(void **state)
{
    (void)state;
    if (!redis_setup_or_skip())
        skip();
    struct limits_opts o = shared_opts(2);
    struct limit_conf c = {0};
    c.max_connections = 3;
    static struct node a, b;
    node_start(&a, 0, "leases.test", &o, &c);
    node_start(&b, 1, "leases.test", &o, &c);
    assert_true(node_until(&a, state_is, "connected", 5000));
    assert_true(node_until(&b, state_is, "connected", 5000));
    unsigned two = 2, three = 3;
    assert_true(node_until(&a, until_acquired, &two, 3000));
    /* b gets the one left, never a second */
    assert_false(node_until(&b, until_acquired, &three, 1000));
    assert_int_equal(a.acquired, 2);
    assert_int_equal(b.acquired, 1);
    assert_int_equal(redis_zcard("sluice:{leases.test}:l"), 3);
    /* a releases one: b may take it */
    node_call(&a, release_one, NULL);
    assert_true(node_until(&b, until_acquired, &two, 3000));
    assert_int_equal(redis_zcard("sluice:{leases.test}:l"), 3);
    struct limits_stats st;
    node_call(&b, get_stats, &st);
    assert_int_equal(st.leases, 2);
    assert_true(st.conns_refused > 0);
    node_stop(&a, true);
    node_stop(&b, true);
}

static void
test_vanished_node_leases_expire(void **state)
{
    (void)state;
    if (!redis_setup_or_skip())
        skip();
    struct limits_opts o = shared_opts(2);
    o.lease_ttl_ms = 900;
    struct limit_conf c = {0};
    c.max_connections = 3;
    static struct node a, b;
    node_start(&a, 0, "vanish.test", &o, &c);
    node_start(&b, 1, "vanish.test", &o, &c);
    assert_true(node_until(&a, state_is, "connected", 5000));
    assert_true(node_until(&b, state_is, "connected", 5000));
    unsigned three = 3, one = 1;
    assert_true(node_until(&a, until_acquired, &three, 3000));
    /* a is gone without a word */
    node_stop(&a, false);
    uint64_t gone = clock_now_ns();
    assert_int_equal(redis_zcard("sluice:{vanish.test}:l"), 3);
    assert_false(node_until(&b, until_acquired, &one, 300));
    assert_true(node_until(&b, until_acquired, &one, 3000));
    uint64_t waited = clock_now_ns() - gone;
    print_message("leases of a vanished node (ttl 900 ms) freed after %llu ms\n",
                  (unsigned long long)(waited / MSEC));
    /* a refreshed them at most ttl/3 before it vanished */
    assert_true(waited >= 600 * MSEC - 50 * MSEC);
    assert_true(waited <= 900 * MSEC + 1500 * MSEC);
    node_stop(&b, true);
}

struct share_probe {
    struct limit_key k;
    uint64_t total, worst;
    unsigned conns;
};

/* With Redis away: a fresh key decides at the local share, over simulated
 * time. */
static void
probe_share(struct node *n, void *arg)
{
    struct share_probe *p = arg;
    struct limit_conf c = conf_msgs(100, 1000, 4);
    c.max_connections = 4;
    assert_int_equal(limits_key_init(n->l, &p->k, "share.test", &c, NULL, NULL), 0);
    enum { MS = 3000 };
    static uint16_t counts[MS];
    p->total = drive_ms(n->l, &p->k, BASE, MS, counts);
    p->worst = max_window(counts, MS, 1000);
    uint64_t r;
    while (p->conns < 10 && limits_conn_acquire(n->l, &p->k, BASE, &r))
        p->conns++;
}

static void
probe_fini(struct node *n, void *arg)
{
    struct share_probe *p = arg;
    limits_key_fini(n->l, &p->k);
}

static bool
roundtrips_above(struct node *n, void *arg)
{
    struct limits_stats st;
    limits_stats(n->l, &st);
    return st.redis_roundtrips > *(uint64_t *)arg;
}

static void
test_redis_outage(void **state)
{
    (void)state;
    if (!redis_setup_or_skip())
        skip();
    struct limits_opts o = shared_opts(2);
    struct limit_conf c = conf_msgs(100, 1000, 4);
    c.max_connections = 4;
    static struct node a;
    node_start(&a, 0, "outage.test", &o, &c);
    assert_true(node_until(&a, state_is, "connected", 5000));
    /* shared: all 4 connections */
    unsigned four = 4;
    assert_true(node_until(&a, until_acquired, &four, 3000));
    for (int i = 0; i < 4; i++)
        node_call(&a, release_one, NULL);

    redis_kill();
    assert_true(node_until(&a, state_is, "unreachable", 5000));
    static struct share_probe p;
    memset(&p, 0, sizeof(p));
    node_call(&a, probe_share, &p);
    print_message("local share (100/s burst 4 over 2 nodes): %llu msgs in 3 s, worst 1 s "
                  "window %llu, %u connections of 4\n",
                  (unsigned long long)p.total, (unsigned long long)p.worst, p.conns);
    assert_true(p.worst <= 50 + 2);
    assert_true(p.total >= 148 && p.total <= 153);
    assert_int_equal(p.conns, 2);
    /* the key of the run keeps deciding too */
    uint64_t run = 300 * MSEC;
    a.msgs = 0;
    node_call(&a, start_pump, &run);
    assert_true(node_until(&a, pump_done, NULL, 5000));
    assert_true(a.msgs > 0);
    struct limits_stats st;
    node_call(&a, get_stats, &st);
    assert_string_equal(st.redis, "unreachable");
    assert_int_equal(st.redis_downs, 1);
    assert_true(st.local_decisions > 0);

    redis_start(); /* same port */
    assert_true(node_until(&a, state_is, "connected", 10000));
    /* leases taken during the outage join the shared set */
    uint64_t before = st.redis_roundtrips;
    assert_true(node_until(&a, roundtrips_above, &before, 3000));
    assert_int_equal(redis_zcard("sluice:{share.test}:l"), 2);
    /* and tokens come from Redis again, even after Redis forgot the
     * script (NOSCRIPT: the call is resent with EVAL, the script reloaded) */
    redis_script_flush();
    node_call(&a, get_stats, &st);
    uint64_t errors_before = st.redis_errors;
    uint64_t batch_before = st.batch_decisions;
    a.msgs = 0;
    node_call(&a, start_pump, &run);
    assert_true(node_until(&a, pump_done, NULL, 5000));
    node_call(&a, get_stats, &st);
    assert_true(st.batch_decisions > batch_before);
    assert_int_equal(st.redis_errors, errors_before);
    assert_int_equal(st.redis_downs, 1);
    assert_string_equal(st.redis, "connected");
    node_call(&a, probe_fini, &p);
    node_stop(&a, true);
}

int
main(void)
{
    signal(SIGPIPE, SIG_IGN); /* hiredis writes to a killed redis-server */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gcra_window_and_rate),
        cmocka_unit_test(test_gcra_retry_at),
        cmocka_unit_test(test_unlimited),
        cmocka_unit_test(test_conn_leases_local),
        cmocka_unit_test(test_backoff_and_recovery),
        cmocka_unit_test(test_backoff_conn_rate),
        cmocka_unit_test(test_suspend),
        cmocka_unit_test_teardown(test_shared_msg_rate, redis_teardown),
        cmocka_unit_test_teardown(test_shared_leases, redis_teardown),
        cmocka_unit_test_teardown(test_vanished_node_leases_expire, redis_teardown),
        cmocka_unit_test_teardown(test_redis_outage, redis_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
