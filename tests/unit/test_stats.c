/*
 * test_stats: a stats server on a socket in a temporary directory, driven
 * by fake engine callbacks whose counters the test changes: the answers
 * are valid JSON with the values put in, rates move (the last second's
 * over half a second at least, a sample taken late or not), commands reach the
 * engine, bad input gets {"ok":false}, a long line closes, /metrics is
 * accepted by promtool (when installed), the socket file has its mode
 * and goes away, and the built sluicectl answers with its exit codes. A
 * descriptor passed with a line reaches that line's command, with the
 * client's uid, and is closed by the server on every path.
 *
 * The JSON is read by a small strict parser below, so that this test
 * links with the engine alone.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "engine/stats.h"

extern char **environ;

/* ---- a strict little JSON reader ---- */

enum jt { JT_NULL, JT_BOOL, JT_NUM, JT_STR, JT_ARR, JT_OBJ };

struct jv {
    enum jt t;
    bool b;
    double num;
    char *str;        /* owned */
    struct jv **kids; /* owned */
    char **keys;      /* owned; objects only */
    size_t n;
};

static void
jfree(struct jv *v)
{
    if (v == NULL)
        return;
    for (size_t i = 0; i < v->n; i++) {
        jfree(v->kids[i]);
        if (v->keys != NULL)
            free(v->keys[i]);
    }
    free(v->kids);
    free(v->keys);
    free(v->str);
    free(v);
}

static void
jws(const char **p)
{
    while (**p == ' ' || **p == '\t' || **p == '\n' || **p == '\r')
        (*p)++;
}

static char *
jstring(const char **p)
{
    if (**p != '"')
        return NULL;
    (*p)++;
    size_t cap = 64, n = 0;
    char *s = malloc(cap);
    for (;;) {
        unsigned char c = (unsigned char)**p;
        if (n + 8 > cap)
            s = realloc(s, cap *= 2);
        if (c == '"') {
            (*p)++;
            s[n] = '\0';
            return s;
        }
        if (c < 0x20) { /* a raw control character (or the end) */
            free(s);
            return NULL;
        }
        (*p)++;
        if (c != '\\') {
            s[n++] = (char)c;
            continue;
        }
        char e = *(*p)++;
        switch (e) {
        case '"':
            s[n++] = '"';
            break;
        case '\\':
            s[n++] = '\\';
            break;
        case '/':
            s[n++] = '/';
            break;
        case 'b':
            s[n++] = '\b';
            break;
        case 'f':
            s[n++] = '\f';
            break;
        case 'n':
            s[n++] = '\n';
            break;
        case 'r':
            s[n++] = '\r';
            break;
        case 't':
            s[n++] = '\t';
            break;
        case 'u': {
            unsigned cp = 0;
            for (int i = 0; i < 4; i++) {
                char h = *(*p)++;
                unsigned d = h >= '0' && h <= '9'   ? (unsigned)(h - '0')
                             : h >= 'a' && h <= 'f' ? (unsigned)(h - 'a' + 10)
                             : h >= 'A' && h <= 'F' ? (unsigned)(h - 'A' + 10)
                                                    : 16;
                if (d == 16) {
                    free(s);
                    return NULL;
                }
                cp = cp * 16 + d;
            }
            s[n++] = cp < 0x80 ? (char)cp : '?'; /* enough for these tests */
            break;
        }
        default:
            free(s);
            return NULL;
        }
    }
}

static struct jv *jvalue(const char **p, int depth);

static struct jv *
jcontainer(const char **p, int depth, bool obj)
{
    struct jv *v = calloc(1, sizeof(*v));
    v->t = obj ? JT_OBJ : JT_ARR;
    (*p)++;
    jws(p);
    if (**p == (obj ? '}' : ']')) {
        (*p)++;
        return v;
    }
    for (;;) {
        char *key = NULL;
        jws(p);
        if (obj) {
            if ((key = jstring(p)) == NULL)
                goto bad;
            jws(p);
            if (*(*p)++ != ':') {
                free(key);
                goto bad;
            }
        }
        struct jv *k = jvalue(p, depth + 1);
        if (k == NULL) {
            free(key);
            goto bad;
        }
        v->kids = realloc(v->kids, (v->n + 1) * sizeof(*v->kids));
        if (obj)
            v->keys = realloc(v->keys, (v->n + 1) * sizeof(*v->keys));
        v->kids[v->n] = k;
        if (obj)
            v->keys[v->n] = key;
        v->n++;
        jws(p);
        char c = *(*p)++;
        if (c == ',')
            continue;
        if (c == (obj ? '}' : ']'))
            return v;
        goto bad;
    }
bad:
    jfree(v);
    return NULL;
}

static struct jv *
jvalue(const char **p, int depth)
{
    if (depth > 64)
        return NULL;
    jws(p);
    const char *s = *p;
    if (*s == '{' || *s == '[')
        return jcontainer(p, depth, *s == '{');
    struct jv *v = calloc(1, sizeof(*v));
    if (*s == '"') {
        v->t = JT_STR;
        if ((v->str = jstring(p)) == NULL)
            goto bad;
        return v;
    }
    static const char *const lits[] = {"null", "true", "false"};
    for (int i = 0; i < 3; i++) {
        size_t l = strlen(lits[i]);
        if (strncmp(s, lits[i], l) == 0) {
            v->t = i == 0 ? JT_NULL : JT_BOOL;
            v->b = i == 1;
            *p += l;
            return v;
        }
    }
    /* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
    const char *q = s;
    if (*q == '-')
        q++;
    if (*q == '0')
        q++;
    else if (*q >= '1' && *q <= '9')
        while (*q >= '0' && *q <= '9')
            q++;
    else
        goto bad;
    if (*q == '.') {
        q++;
        if (*q < '0' || *q > '9')
            goto bad;
        while (*q >= '0' && *q <= '9')
            q++;
    }
    if (*q == 'e' || *q == 'E') {
        q++;
        if (*q == '+' || *q == '-')
            q++;
        if (*q < '0' || *q > '9')
            goto bad;
        while (*q >= '0' && *q <= '9')
            q++;
    }
    v->t = JT_NUM;
    v->num = strtod(s, NULL);
    *p = q;
    return v;
bad:
    jfree(v);
    return NULL;
}

/* The whole text must be one value. */
static struct jv *
jparse(const char *text)
{
    const char *p = text;
    struct jv *v = jvalue(&p, 0);
    if (v == NULL)
        return NULL;
    jws(&p);
    if (*p != '\0') {
        jfree(v);
        return NULL;
    }
    return v;
}

/* "a.b.0.c": object members by key, array elements by index. */
static struct jv *
jget(struct jv *v, const char *path)
{
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", path);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ".", &save); tok != NULL && v != NULL;
         tok = strtok_r(NULL, ".", &save)) {
        struct jv *next = NULL;
        if (v->t == JT_OBJ) {
            for (size_t i = 0; i < v->n && next == NULL; i++)
                if (strcmp(v->keys[i], tok) == 0)
                    next = v->kids[i];
        } else if (v->t == JT_ARR) {
            size_t i = strtoul(tok, NULL, 10);
            next = i < v->n ? v->kids[i] : NULL;
        }
        v = next;
    }
    return v;
}

static double
jnum(struct jv *root, const char *path)
{
    struct jv *v = jget(root, path);
    if (v == NULL || v->t != JT_NUM) {
        fail_msg("%s: not a number", path);
    }
    return v->num;
}

static const char *
jstr(struct jv *root, const char *path)
{
    struct jv *v = jget(root, path);
    if (v == NULL || v->t != JT_STR) {
        fail_msg("%s: not a string", path);
    }
    return v->str;
}

static bool
jbool(struct jv *root, const char *path)
{
    struct jv *v = jget(root, path);
    if (v == NULL || v->t != JT_BOOL) {
        fail_msg("%s: not a boolean", path);
    }
    return v->b;
}

static bool
jnull(struct jv *root, const char *path)
{
    struct jv *v = jget(root, path);
    return v != NULL && v->t == JT_NULL;
}

/* Without libm (the test links the engine alone). */
static bool
near(double a, double b)
{
    return a - b < 1e-9 && b - a < 1e-9;
}

static void
test_reader(void **state)
{
    (void)state;
    struct jv *v = jparse("{\"a\":[1,-2.5e3,\"x\\n\"],\"b\":{\"c\":null,\"d\":true}}");
    assert_non_null(v);
    assert_true(jnum(v, "a.1") == -2500);
    assert_string_equal(jstr(v, "a.2"), "x\n");
    assert_true(jnull(v, "b.c"));
    assert_true(jbool(v, "b.d"));
    jfree(v);
    const char *bad[] = {"{", "{\"a\":}", "[1,]", "01", "\"a\nb\"", "{} x", "nul", "[1 2]"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_null(jparse(bad[i]));
}

/* ---- the fake engine ---- */

struct fake {
    pthread_mutex_t mu;
    struct stats_counters c;
    struct stats_domain d[4];
    size_t nd;
    unsigned commands;
    char last_verb[32], last_args[128];
    bool fd_seen, fd_cloexec; /* of the last command: a descriptor came with it */
    unsigned fds_seen;        /* commands that came with one */
    ino_t fd_ino;
    uid_t uid;
    unsigned counters_calls;
    unsigned stall_ms; /* the next counters call returns this much later */
    unsigned stalls;   /* calls that did */
};

static void
fake_counters(void *arg, struct stats_counters *out)
{
    struct fake *f = arg;
    pthread_mutex_lock(&f->mu);
    f->counters_calls++;
    *out = f->c;
    unsigned stall = f->stall_ms;
    f->stall_ms = 0;
    pthread_mutex_unlock(&f->mu);
    if (stall != 0) { /* outside the lock: the test reads on meanwhile */
        struct timespec ts = {.tv_sec = stall / 1000, .tv_nsec = (long)(stall % 1000) * 1000000};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&f->mu);
        f->stalls++;
        pthread_mutex_unlock(&f->mu);
    }
}

static size_t
fake_domains(void *arg, struct stats_domain *out, size_t cap)
{
    struct fake *f = arg;
    pthread_mutex_lock(&f->mu);
    size_t n = f->nd < cap ? f->nd : cap;
    memcpy(out, f->d, n * sizeof(*out));
    pthread_mutex_unlock(&f->mu);
    return n;
}

static int
fake_command(void *arg, const char *verb, const char *args, const struct stats_caller *who,
             struct json *out, char *err, size_t errlen)
{
    struct fake *f = arg;
    pthread_mutex_lock(&f->mu);
    f->commands++;
    struct stat st;
    f->fd_seen = who->fd >= 0 && fstat(who->fd, &st) == 0;
    f->fd_ino = f->fd_seen ? st.st_ino : 0;
    f->fds_seen += f->fd_seen;
    f->fd_cloexec = who->fd >= 0 && (fcntl(who->fd, F_GETFD) & FD_CLOEXEC) != 0;
    f->uid = who->uid;
    snprintf(f->last_verb, sizeof(f->last_verb), "%s", verb);
    snprintf(f->last_args, sizeof(f->last_args), "%s", args);
    pthread_mutex_unlock(&f->mu);
    if (strcmp(args, "missing") == 0 || strcmp(args, "nosuch.example") == 0) {
        snprintf(err, errlen, "%s: no such thing: %s", verb, args);
        return -1;
    }
    json_obj_begin(out);
    if (strcmp(verb, "message") == 0) {
        json_kstr(out, "id", args);
        json_ku64(out, "size", 123456);
        json_key(out, "recipients");
        json_arr_begin(out);
        json_obj_begin(out);
        json_kstr(out, "rcpt", "a@example.com");
        json_kstr(out, "state", "deferred");
        json_ku64(out, "attempts", 2);
        json_obj_end(out);
        json_arr_end(out);
    } else if (strcmp(verb, "suspend") == 0) {
        json_kstr(out, "domain", args);
        json_kbool(out, "suspended", true);
    }
    json_obj_end(out);
    return 0;
}

struct fixture {
    char dir[64];
    char path[100];
    struct fake f;
    struct stats_server *s;
};

static void
fake_domain(struct stats_domain *d, const char *name, uint64_t ready, bool suspended)
{
    memset(d, 0, sizeof(*d));
    snprintf(d->name, sizeof(d->name), "%s", name);
    d->ready = ready;
    d->deferred = 3;
    d->inflight = 2;
    d->connections = 4;
    d->max_connections = 20;
    d->delivered = 1000;
    d->bounced = 7;
    d->rate_limit = suspended ? 0 : 50;
    snprintf(d->limit_reason, sizeof(d->limit_reason), "%s", "backoff after 421");
    if (suspended) { /* a failure no server sent: no code */
        snprintf(d->last_reply, sizeof(d->last_reply), "%s", "DNS lookup failed: SERVFAIL");
        snprintf(d->last_class, sizeof(d->last_class), "%s", "dns_failure");
    } else {
        snprintf(d->last_reply, sizeof(d->last_reply), "%s", "421 4.7.0 try again later");
        d->last_code = 421;
        snprintf(d->last_class, sizeof(d->last_class), "%s", "rate_limited");
    }
    d->oldest_ms = suspended ? 0 : 1795401231123ULL;
    d->suspended = suspended;
}

static int
setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));
    snprintf(fx->dir, sizeof(fx->dir), "/tmp/test_stats.XXXXXX");
    assert_non_null(mkdtemp(fx->dir));
    snprintf(fx->path, sizeof(fx->path), "%s/stats.sock", fx->dir);
    pthread_mutex_init(&fx->f.mu, NULL);
    struct stats_counters *c = &fx->f.c;
    c->received_msgs = 10;
    c->received_rcpts = 20;
    c->delivered = 8;
    c->delivered_tls = 4;
    c->deferred = 1;
    c->conn_out_open = 5;
    c->conn_in_open = 2;
    c->transactions = 10;
    c->reused_transactions = 6;
    c->queue_rcpts = 12;
    c->spool_bytes = 3 << 20;
    c->map_size = 1ULL << 30;
    c->map_used = 1ULL << 28;
    c->spool_unconfirmed_removed = 2;
    c->spool_sync_failing_refused = 7;
    c->dns_cache_entries = 33;
    c->dns_queued = 5;
    c->dlog_dropped = 1;
    c->destinations = 3;
    c->nobjects = 1;
    snprintf(c->objects[0].name, sizeof(c->objects[0].name), "sessions_in");
    c->objects[0].live = 2;
    c->workers = 2;
    c->redis_state = "connected";
    c->uptime_ms = 90061000;
    c->delivery_on = 1;
    fake_domain(&fx->f.d[0], "gmail.com", 100, false);
    fake_domain(&fx->f.d[1], "example.org", 50, true);
    fake_domain(&fx->f.d[2], "we\"ird\\dom\nain", 1, false);
    fx->f.nd = 3;
    struct stats_ops ops = {
        .arg = &fx->f, .counters = fake_counters, .domains = fake_domains, .command = fake_command};
    char err[256];
    int rc = stats_server_new(fx->path, 0660, "127.0.0.1:0", 10, &ops, &fx->s, err, sizeof(err));
    if (rc != 0)
        fail_msg("stats_server_new: %s", err);
    *state = fx;
    return 0;
}

static int
teardown(void **state)
{
    struct fixture *fx = *state;
    fx->s = stats_server_free(fx->s);
    pthread_mutex_destroy(&fx->f.mu);
    char cmd[200];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", fx->dir);
    assert_int_equal(system(cmd), 0);
    free(fx);
    return 0;
}

/* ---- a client ---- */

struct conn {
    int fd;
    size_t len;
    char buf[1 << 20];
};

static struct conn *
conn_open(const char *path)
{
    struct conn *c = calloc(1, sizeof(*c));
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(c->fd >= 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    assert_int_equal(connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return c;
}

static void
conn_close(struct conn *c)
{
    close(c->fd);
    free(c);
}

static void
send_all(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        assert_true(w > 0);
        s += w;
        n -= (size_t)w;
    }
}

/* The next line on c (malloc'd, no newline), or NULL: its end (*err 0),
 * an error or the 10 s receive timeout (*err the errno). */
static char *
line_or_null(struct conn *c, int *err)
{
    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        if (nl != NULL) {
            size_t l = (size_t)(nl - c->buf);
            char *line = strndup(c->buf, l);
            c->len -= l + 1;
            memmove(c->buf, nl + 1, c->len);
            return line;
        }
        ssize_t n = c->len < sizeof(c->buf)
                        ? recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0)
                        : (errno = ENOBUFS, -1); /* a line longer than the buffer */
        if (n <= 0) {
            *err = n == 0 ? 0 : errno;
            return NULL;
        }
        c->len += (size_t)n;
    }
}

/* The next answer line (malloc'd, no newline), or NULL at EOF. */
static char *
conn_read_line(struct conn *c)
{
    int err;
    char *line = line_or_null(c, &err);
    if (line == NULL)
        assert_true(err == 0 || err == ECONNRESET);
    return line;
}

static struct jv *
conn_ask(struct conn *c, const char *line)
{
    send_all(c->fd, line, strlen(line));
    send_all(c->fd, "\n", 1);
    char *ans = conn_read_line(c);
    assert_non_null(ans);
    struct jv *v = jparse(ans);
    if (v == NULL)
        fail_msg("not JSON: %s", ans);
    free(ans);
    return v;
}

/* The peer closed: EOF (or a reset) within a bounded wait. */
static bool
conn_closed(struct conn *c)
{
    struct pollfd p = {.fd = c->fd, .events = POLLIN};
    for (int i = 0; i < 100; i++) {
        if (poll(&p, 1, 100) == 1) {
            char b[4096];
            ssize_t n = recv(c->fd, b, sizeof(b), MSG_DONTWAIT);
            if (n == 0 || (n < 0 && errno == ECONNRESET))
                return true;
        }
    }
    return false;
}

/* ---- the socket protocol ---- */

static void
test_stats_fields(void **state)
{
    struct fixture *fx = *state;
    struct conn *c = conn_open(fx->path);
    struct jv *v = conn_ask(c, "stats");
    assert_true(jbool(v, "ok"));
    assert_true(jnum(v, "counters.received_msgs") == 10);
    assert_true(jnum(v, "counters.delivered") == 8);
    assert_true(jnum(v, "connections.outbound_open") == 5);
    assert_true(jnum(v, "connections.inbound_open") == 2);
    assert_true(near(jnum(v, "connections.reuse_share"), 0.6));
    assert_true(near(jnum(v, "tls_share"), 0.5));
    assert_true(jnum(v, "queue.recipients") == 12);
    assert_true(jnum(v, "spool.bytes") == 3 << 20);
    assert_true(near(jnum(v, "spool.map_used_share"), 0.25));
    assert_true(jnum(v, "spool.unconfirmed_removed") == 2);
    assert_true(jnum(v, "spool.sync_failing_refused") == 7);
    assert_true(jnum(v, "dns.cache_entries") == 33);
    assert_true(jnum(v, "dns.queued") == 5);
    assert_true(jnull(v, "dns.cache_hit_share")); /* no lookups: no share */
    assert_string_equal(jstr(v, "redis.state"), "connected");
    assert_true(jnum(v, "dlog.dropped") == 1);
    assert_true(jnum(v, "objects.destinations") == 3);
    assert_true(jnum(v, "objects.sessions_in") == 2);
    assert_true(jnum(v, "uptime_ms") == 90061000);
    assert_non_null(jget(v, "rates.1s"));
    assert_non_null(jget(v, "rates.1m"));
    jfree(v);

    /* a verb in capitals, spaces around, a CR: the same command */
    v = conn_ask(c, "  STATS \r");
    assert_true(jbool(v, "ok"));
    jfree(v);
    v = conn_ask(c, "help");
    assert_true(jbool(v, "ok"));
    assert_string_equal(jstr(v, "commands.0.name"), "stats");
    jfree(v);
    conn_close(c);
}

static bool
rates_delivered(struct conn *c, const char *window, double *out)
{
    char path[64];
    snprintf(path, sizeof(path), "rates.%s.delivered", window);
    struct jv *v = conn_ask(c, "stats");
    struct jv *r = jget(v, path);
    bool known = r != NULL && r->t == JT_NUM;
    if (known)
        *out = r->num;
    jfree(v);
    return known;
}

static void
sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

static void
test_rates(void **state)
{
    struct fixture *fx = *state;
    struct conn *c = conn_open(fx->path);
    double r = 0;
    /* the thread samples every second: poll until the rate shows the
     * change (20 s: a loaded machine may run the thread late) */
    bool moved = false;
    for (int i = 0; i < 400 && !moved; i++) {
        pthread_mutex_lock(&fx->f.mu);
        fx->f.c.delivered += 10;
        fx->f.c.received_msgs += 3;
        pthread_mutex_unlock(&fx->f.mu);
        moved = rates_delivered(c, "1s", &r) && r > 0;
        if (!moved)
            sleep_ms(50);
    }
    assert_true(moved);
    double m = 0;
    assert_true(rates_delivered(c, "1m", &m));
    assert_true(m > 0);
    /* counters stand still: the last second's rate falls back to 0, the
     * minute's stays above it */
    bool fell = false;
    for (int i = 0; i < 400 && !fell; i++) {
        fell = rates_delivered(c, "1s", &r) && r == 0;
        if (!fell)
            sleep_ms(50);
    }
    assert_true(fell);
    assert_true(rates_delivered(c, "1m", &m));
    assert_true(m > 0);
    /* the span each is over: in the server's first minute the "1m" rates
     * are over the time since its start, and say so */
    struct jv *v = conn_ask(c, "stats");
    struct jv *w1 = jget(v, "rates.1s.window_ms"), *w60 = jget(v, "rates.1m.window_ms");
    assert_non_null(w1);
    assert_non_null(w60);
    /* The last second's: from the newest sample back to the newest one
     * at least half a period (500 ms) before it; how much more than that
     * is the machine's (a sample taken late), so no more is asked of it
     * than to be shorter than the minute's: the rate fell to 0 after it
     * moved, so the sample it starts from is past the oldest. The
     * minute's: since the start, which is at least one schedule's second
     * behind the newest (two samples at least: the rate moved). */
    print_message("windows: %.0f ms and %.0f ms\n", w1->num, w60->num);
    assert_true(w1->num >= 500 && w1->num < w60->num);
    assert_true(w60->num >= 1000 && w60->num < 59500);
    jfree(v);
    conn_close(c);
}

/* A sample the thread took late is followed by the next a moment after
 * (the samples keep their schedule): the last second's rate is then not
 * the one over that moment. The counters' callback holds the thread
 * 1.7 s at a sample (the next call after the rates are known is one: no
 * question is asked meanwhile), so the sample due 1 s after it is taken
 * 0.7 s late and the next 0.3 s after that, on time. Every answer for
 * 2.5 s after the hold has a window of half a period (500 ms) at least;
 * over the two samples 0.3 s apart it was 300 ms. A thread that the
 * machine holds past the next one's time too takes no sample 0.3 s
 * after another: the test then passes without having shown it. */
static void
test_rates_window_after_a_late_sample(void **state)
{
    struct fixture *fx = *state;
    struct conn *c = conn_open(fx->path);
    double r = 0;
    bool known = false;
    for (int i = 0; i < 400 && !known; i++) { /* two samples: 20 s at most */
        known = rates_delivered(c, "1s", &r);
        if (!known)
            sleep_ms(50);
    }
    assert_true(known);
    pthread_mutex_lock(&fx->f.mu);
    unsigned stalls = fx->f.stalls;
    fx->f.stall_ms = 1700;
    pthread_mutex_unlock(&fx->f.mu);
    bool held = false;
    for (int i = 0; i < 2000 && !held; i++) { /* the next sample: 20 s at most */
        sleep_ms(10);
        pthread_mutex_lock(&fx->f.mu);
        held = fx->f.stalls != stalls;
        pthread_mutex_unlock(&fx->f.mu);
    }
    assert_true(held);
    double shortest = 1e9;
    unsigned answers = 0;
    for (uint64_t until = clock_mono_ms() + 2500; clock_mono_ms() < until; answers++) {
        struct jv *v = conn_ask(c, "stats");
        struct jv *w1 = jget(v, "rates.1s.window_ms");
        assert_non_null(w1);
        if (w1->num < shortest)
            shortest = w1->num;
        jfree(v);
        sleep_ms(20);
    }
    print_message("shortest last-second window in %u answers after the hold: %.0f ms\n", answers,
                  shortest);
    assert_true(shortest >= 500);
    conn_close(c);
}

static void
test_domains(void **state)
{
    struct fixture *fx = *state;
    struct conn *c = conn_open(fx->path);
    struct jv *v = conn_ask(c, "domains");
    assert_true(jbool(v, "ok"));
    assert_int_equal(jget(v, "domains")->n, 3);
    assert_string_equal(jstr(v, "domains.0.name"), "gmail.com");
    assert_true(jnum(v, "domains.0.ready") == 100);
    assert_true(jnum(v, "domains.0.rate_limit") == 50);
    assert_string_equal(jstr(v, "domains.0.oldest"), "2026-11-23T02:33:51.123Z");
    assert_string_equal(jstr(v, "domains.0.limit_reason"), "backoff after 421");
    assert_false(jbool(v, "domains.0.suspended"));
    assert_true(jbool(v, "domains.1.suspended"));
    assert_true(jnull(v, "domains.1.rate_limit"));
    assert_true(jnull(v, "domains.1.oldest"));
    /* the last reply's code: a server's, or null (none sent it) */
    assert_true(jnum(v, "domains.0.last_code") == 421);
    assert_string_equal(jstr(v, "domains.0.last_class"), "rate_limited");
    assert_true(jnull(v, "domains.0.last_reason"));
    assert_true(jnull(v, "domains.1.last_code"));
    assert_string_equal(jstr(v, "domains.1.last_reply"), "DNS lookup failed: SERVFAIL");
    assert_string_equal(jstr(v, "domains.1.last_class"), "dns_failure");
    assert_string_equal(jstr(v, "domains.2.name"), "we\"ird\\dom\nain");
    assert_true(jbool(v, "delivery_enabled"));
    jfree(v);
    v = conn_ask(c, "domains 2");
    assert_int_equal(jget(v, "domains")->n, 2);
    jfree(v);
    /* domains gathers no counters (it did each time, for delivery_enabled:
     * every worker asked again): ten answers, and at most the rates'
     * samples meanwhile (one a second) */
    pthread_mutex_lock(&fx->f.mu);
    unsigned calls = fx->f.counters_calls;
    pthread_mutex_unlock(&fx->f.mu);
    for (int i = 0; i < 10; i++) {
        v = conn_ask(c, "domains");
        assert_true(jbool(v, "ok"));
        jfree(v);
    }
    pthread_mutex_lock(&fx->f.mu);
    calls = fx->f.counters_calls - calls;
    pthread_mutex_unlock(&fx->f.mu);
    assert_true(calls <= 2);
    const char *bad[] = {"domains 0", "domains x", "domains -1", "domains 1001", "domains 1 2"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        v = conn_ask(c, bad[i]);
        assert_false(jbool(v, "ok"));
        assert_non_null(jstr(v, "error"));
        jfree(v);
    }
    conn_close(c);
}

static void
test_commands(void **state)
{
    struct fixture *fx = *state;
    struct conn *c = conn_open(fx->path);
    struct jv *v = conn_ask(c, "frobnicate now");
    assert_false(jbool(v, "ok"));
    assert_non_null(strstr(jstr(v, "error"), "unknown command"));
    jfree(v);
    v = conn_ask(c, "");
    assert_false(jbool(v, "ok"));
    jfree(v);
    v = conn_ask(c, "suspend"); /* missing argument: the engine is not asked */
    assert_false(jbool(v, "ok"));
    assert_non_null(strstr(jstr(v, "error"), "usage: suspend SCOPE"));
    jfree(v);
    assert_int_equal(fx->f.commands, 0);

    v = conn_ask(c, "suspend   gmail.com  ");
    assert_true(jbool(v, "ok"));
    assert_string_equal(jstr(v, "domain"), "gmail.com");
    assert_true(jbool(v, "suspended"));
    jfree(v);
    assert_string_equal(fx->f.last_verb, "suspend");
    assert_string_equal(fx->f.last_args, "gmail.com");

    v = conn_ask(c, "Suspend nosuch.example");
    assert_false(jbool(v, "ok"));
    assert_string_equal(jstr(v, "error"), "suspend: no such thing: nosuch.example");
    jfree(v);

    v = conn_ask(c, "message 0123ABCD");
    assert_true(jbool(v, "ok"));
    assert_string_equal(jstr(v, "id"), "0123ABCD");
    assert_string_equal(jstr(v, "recipients.0.state"), "deferred");
    jfree(v);

    v = conn_ask(c, "reload");
    assert_true(jbool(v, "ok"));
    assert_int_equal(jget(v, "")->n, 1); /* {"ok":true} and nothing else */
    jfree(v);
    v = conn_ask(c, "flush");
    assert_true(jbool(v, "ok"));
    jfree(v);
    assert_string_equal(fx->f.last_args, "");

    v = conn_ask(c, "metrics");
    assert_true(jbool(v, "ok"));
    assert_non_null(strstr(jstr(v, "text"), "sluice_recipients_delivered_total 8\n"));
    jfree(v);

    /* A quoted word is one, whatever its blanks (a suppress import's
     * path as sluicectl quotes it: 64 words at most, and a file name
     * with more blanks was refused as "usage: suppress ..."). */
    char quoted[256];
    size_t qn = (size_t)snprintf(quoted, sizeof(quoted), "suppress import \"/tmp/a");
    for (int i = 0; i < 70; i++)
        qn += (size_t)snprintf(quoted + qn, sizeof(quoted) - qn, " b");
    snprintf(quoted + qn, sizeof(quoted) - qn, " \\\" c.csv\"");
    unsigned before_q = fx->f.commands;
    v = conn_ask(c, quoted);
    assert_true(jbool(v, "ok"));
    jfree(v);
    assert_int_equal(fx->f.commands, before_q + 1);
    assert_string_equal(fx->f.last_verb, "suppress");
    /* an unquoted one still counts each word */
    qn = (size_t)snprintf(quoted, sizeof(quoted), "suppress import /tmp/a");
    for (int i = 0; i < 70; i++)
        qn += (size_t)snprintf(quoted + qn, sizeof(quoted) - qn, " b");
    v = conn_ask(c, quoted);
    assert_false(jbool(v, "ok"));
    assert_non_null(strstr(jstr(v, "error"), "usage: suppress"));
    jfree(v);
    assert_int_equal(fx->f.commands, before_q + 1);

    /* many commands in one write: one answer each, in order */
    char many[64 * 10];
    size_t n = 0;
    for (int i = 0; i < 64; i++)
        n += (size_t)snprintf(many + n, sizeof(many) - n, i % 2 ? "help\n" : "stats\n");
    send_all(c->fd, many, n);
    for (int i = 0; i < 64; i++) {
        char *line = conn_read_line(c);
        assert_non_null(line);
        v = jparse(line);
        assert_non_null(v);
        assert_true(jbool(v, "ok"));
        assert_non_null(jget(v, i % 2 ? "commands" : "counters"));
        jfree(v);
        free(line);
    }
    conn_close(c);
}

static void
test_long_line(void **state)
{
    struct fixture *fx = *state;
    struct conn *c = conn_open(fx->path);
    char *big = malloc(10 * 1024 + 1);
    memset(big, 's', 10 * 1024);
    big[10 * 1024] = '\n';
    send_all(c->fd, big, 10 * 1024 + 1);
    free(big);
    char *line = conn_read_line(c);
    assert_non_null(line);
    struct jv *v = jparse(line);
    free(line);
    assert_non_null(v);
    assert_false(jbool(v, "ok"));
    assert_non_null(strstr(jstr(v, "error"), "too long"));
    jfree(v);
    assert_true(conn_closed(c));
    conn_close(c);

    /* a line of exactly the limit is fine */
    c = conn_open(fx->path);
    char exact[STATS_LINE_MAX + 1];
    memset(exact, ' ', STATS_LINE_MAX);
    memcpy(exact, "help", 4);
    exact[STATS_LINE_MAX] = '\0';
    v = conn_ask(c, exact);
    assert_true(jbool(v, "ok"));
    jfree(v);
    conn_close(c);
}

/* Send text with the descriptors fds[0..n) in one sendmsg, as sluicectl
 * sends a line with its file. */
static void
send_fds(int sock, const char *text, const int *fds, size_t n)
{
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(16 * sizeof(int))];
    } u;
    memset(&u, 0, sizeof(u));
    struct iovec iov = {.iov_base = (void *)text, .iov_len = strlen(text)};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    assert_true(n <= 16);
    if (n > 0) {
        m.msg_control = u.b;
        m.msg_controllen = CMSG_SPACE(n * sizeof(int));
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(n * sizeof(int));
        memcpy(CMSG_DATA(h), fds, n * sizeof(int));
    }
    assert_int_equal(sendmsg(sock, &m, MSG_NOSIGNAL), (ssize_t)strlen(text));
}

/* A pipe whose read end is to be passed: p[0] the read end, p[1] the
 * write end (kept here), *ino the pipe's. */
static void
pipe_for_passing(int p[2], ino_t *ino)
{
    assert_int_equal(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    struct stat st;
    assert_int_equal(fstat(p[0], &st), 0);
    *ino = st.st_ino;
}

/* Every copy of the read end is closed (the one passed too, in the
 * server): a write to the pipe fails with EPIPE. The server closes what
 * it received before it answers. */
static bool
reader_gone(int w)
{
    return write(w, "x", 1) < 0 && errno == EPIPE;
}

static void
test_passed_fds(void **state)
{
    struct fixture *fx = *state;
    signal(SIGPIPE, SIG_IGN);
    struct conn *c = conn_open(fx->path);
    int p[2];
    ino_t ino;

    /* one descriptor with an engine command: its job gets it, received
     * close-on-exec, with the client's uid; closed after the command */
    pipe_for_passing(p, &ino);
    send_fds(c->fd, "flush with.fd\n", p, 1);
    close(p[0]);
    char *line = conn_read_line(c);
    assert_non_null(line);
    struct jv *v = jparse(line);
    free(line);
    assert_true(jbool(v, "ok"));
    jfree(v);
    assert_string_equal(fx->f.last_args, "with.fd");
    assert_true(fx->f.fd_seen);
    assert_true(fx->f.fd_ino == ino);
    assert_true(fx->f.fd_cloexec);
    assert_true(fx->f.uid == getuid());
    assert_true(reader_gone(p[1]));
    close(p[1]);
    /* the next line, sent without one, has none */
    v = conn_ask(c, "flush without.fd");
    assert_true(jbool(v, "ok"));
    jfree(v);
    assert_false(fx->f.fd_seen);
    assert_true(fx->f.uid == getuid());

    /* the descriptor belongs to the line its octets end in: "stats"
     * before it in the same sendmsg gets none (nor an error) */
    pipe_for_passing(p, &ino);
    send_fds(c->fd, "stats\nflush second.line\n", p, 1);
    close(p[0]);
    for (int i = 0; i < 2; i++) {
        line = conn_read_line(c);
        assert_non_null(line);
        v = jparse(line);
        free(line);
        if (!jbool(v, "ok"))
            fail_msg("answer %d: %s", i, jstr(v, "error"));
        jfree(v);
    }
    assert_string_equal(fx->f.last_args, "second.line");
    assert_true(fx->f.fd_seen && fx->f.fd_ino == ino);
    assert_true(reader_gone(p[1]));
    close(p[1]);

    /* with a command the stats thread answers: refused, closed */
    unsigned before = fx->f.commands;
    pipe_for_passing(p, &ino);
    send_fds(c->fd, "stats\n", p, 1);
    close(p[0]);
    line = conn_read_line(c);
    assert_non_null(line);
    v = jparse(line);
    free(line);
    assert_false(jbool(v, "ok"));
    assert_non_null(strstr(jstr(v, "error"), "takes none"));
    jfree(v);
    assert_true(reader_gone(p[1]));
    close(p[1]);
    /* the connection goes on */
    v = conn_ask(c, "help");
    assert_true(jbool(v, "ok"));
    jfree(v);
    assert_int_equal(fx->f.commands, before);

    /* two at once: every one closed, the command not run, an error, and
     * the connection closed */
    int q[2];
    ino_t ino2;
    pipe_for_passing(p, &ino);
    pipe_for_passing(q, &ino2);
    int two[2] = {p[0], q[0]};
    send_fds(c->fd, "flush two.fds\n", two, 2);
    close(p[0]);
    close(q[0]);
    line = conn_read_line(c);
    assert_non_null(line);
    v = jparse(line);
    free(line);
    assert_false(jbool(v, "ok"));
    assert_non_null(strstr(jstr(v, "error"), "one file descriptor at most"));
    jfree(v);
    assert_true(conn_closed(c));
    conn_close(c);
    assert_true(reader_gone(p[1]) && reader_gone(q[1]));
    close(p[1]);
    close(q[1]);
    assert_int_equal(fx->f.commands, before);

    /* more than the server makes room for (a cut control message):
     * likewise */
    c = conn_open(fx->path);
    int many[16], w[16];
    for (int i = 0; i < 16; i++) {
        pipe_for_passing(p, &ino);
        many[i] = p[0];
        w[i] = p[1];
    }
    send_fds(c->fd, "flush many.fds\n", many, 16);
    for (int i = 0; i < 16; i++)
        close(many[i]);
    line = conn_read_line(c);
    assert_non_null(line);
    v = jparse(line);
    free(line);
    assert_false(jbool(v, "ok"));
    jfree(v);
    assert_true(conn_closed(c));
    conn_close(c);
    for (int i = 0; i < 16; i++) {
        assert_true(reader_gone(w[i]));
        close(w[i]);
    }
    assert_int_equal(fx->f.commands, before);

    /* a second one before the line of the first ended: likewise */
    c = conn_open(fx->path);
    pipe_for_passing(p, &ino);
    pipe_for_passing(q, &ino2);
    send_fds(c->fd, "flush ", p, 1);
    send_fds(c->fd, "split.line\n", q, 1);
    close(p[0]);
    close(q[0]);
    line = conn_read_line(c);
    assert_non_null(line);
    v = jparse(line);
    free(line);
    assert_false(jbool(v, "ok"));
    jfree(v);
    assert_true(conn_closed(c));
    conn_close(c);
    assert_true(reader_gone(p[1]) && reader_gone(q[1]));
    close(p[1]);
    close(q[1]);
    assert_int_equal(fx->f.commands, before);

    /* with a line too long: closed with it */
    c = conn_open(fx->path);
    pipe_for_passing(p, &ino);
    char big[STATS_LINE_MAX + 64];
    memset(big, 'x', sizeof(big) - 1);
    memcpy(big, "flush ", 6);
    big[sizeof(big) - 1] = '\0';
    send_fds(c->fd, big, p, 1);
    close(p[0]);
    line = conn_read_line(c);
    assert_non_null(line);
    v = jparse(line);
    free(line);
    assert_non_null(strstr(jstr(v, "error"), "too long"));
    jfree(v);
    assert_true(reader_gone(p[1]));
    close(p[1]);
    conn_close(c);
    assert_int_equal(fx->f.commands, before);
}

/* reader_gone, waited for up to 10 s (the server closes it in its own
 * time: no answer tells when). */
static bool
wait_until_gone(int w)
{
    for (int i = 0; i < 1000; i++) {
        if (reader_gone(w))
            return true;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return false;
}

/* One answer read, which must be ok. */
static void
read_ok(struct conn *c)
{
    char *line = conn_read_line(c);
    assert_non_null(line);
    struct jv *v = jparse(line);
    free(line);
    if (!jbool(v, "ok"))
        fail_msg("%s", jstr(v, "error"));
    jfree(v);
}

static void
test_passed_fd_edges(void **state)
{
    struct fixture *fx = *state;
    signal(SIGPIPE, SIG_IGN);
    struct conn *c = conn_open(fx->path);
    int p[2];
    ino_t ino;

    /* with the first octets of a line whose rest comes later: that
     * line's (the kernel reads no further than a message's descriptors) */
    pipe_for_passing(p, &ino);
    send_fds(c->fd, "flush spl", p, 1);
    close(p[0]);
    send_all(c->fd, "it.line\n", 8);
    read_ok(c);
    assert_string_equal(fx->f.last_args, "split.line");
    assert_true(fx->f.fd_seen && fx->f.fd_ino == ino);
    assert_true(reader_gone(p[1]));
    close(p[1]);

    /* sent with the line after a line sent without: the later one's */
    unsigned seen = fx->f.fds_seen;
    pipe_for_passing(p, &ino);
    send_all(c->fd, "flush no.fd\n", 12);
    send_fds(c->fd, "flush with.fd\n", p, 1);
    close(p[0]);
    read_ok(c);
    read_ok(c);
    assert_string_equal(fx->f.last_args, "with.fd");
    assert_true(fx->f.fd_seen && fx->f.fd_ino == ino);
    assert_int_equal(fx->f.fds_seen, seen + 1);
    assert_true(reader_gone(p[1]));
    close(p[1]);

    /* with the newline of a line sent before it: that line's, the
     * octets sent with it end in it */
    pipe_for_passing(p, &ino);
    send_all(c->fd, "flush newline.later", 19);
    send_fds(c->fd, "\n", p, 1);
    close(p[0]);
    read_ok(c);
    assert_string_equal(fx->f.last_args, "newline.later");
    assert_true(fx->f.fd_seen && fx->f.fd_ino == ino);
    assert_true(reader_gone(p[1]));
    close(p[1]);

    /* another kind of control message (SCM_CREDENTIALS: not asked for,
     * the server has no SO_PASSCRED) beside a descriptor, or alone:
     * the descriptor taken as ever, the credentials ignored */
    for (int with_fd = 0; with_fd < 2; with_fd++) {
        union {
            struct cmsghdr h;
            char b[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int))];
        } u;
        memset(&u, 0, sizeof(u));
        const char *text = with_fd ? "flush creds.fd\n" : "flush creds\n";
        struct iovec iov = {.iov_base = (void *)text, .iov_len = strlen(text)};
        struct msghdr m = {.msg_iov = &iov,
                           .msg_iovlen = 1,
                           .msg_control = u.b,
                           .msg_controllen =
                               with_fd ? sizeof(u.b) : CMSG_SPACE(sizeof(struct ucred))};
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        struct ucred cred = {.pid = getpid(), .uid = geteuid(), .gid = getegid()};
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_CREDENTIALS;
        h->cmsg_len = CMSG_LEN(sizeof(cred));
        memcpy(CMSG_DATA(h), &cred, sizeof(cred));
        if (with_fd) {
            pipe_for_passing(p, &ino);
            h = CMSG_NXTHDR(&m, h);
            h->cmsg_level = SOL_SOCKET;
            h->cmsg_type = SCM_RIGHTS;
            h->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(h), &p[0], sizeof(int));
        }
        assert_int_equal(sendmsg(c->fd, &m, MSG_NOSIGNAL), (ssize_t)strlen(text));
        if (with_fd)
            close(p[0]);
        read_ok(c);
        assert_string_equal(fx->f.last_args, with_fd ? "creds.fd" : "creds");
        assert_true(fx->f.fd_seen == (with_fd != 0));
        if (with_fd) {
            assert_true(fx->f.fd_ino == ino);
            assert_true(reader_gone(p[1]));
            close(p[1]);
        }
    }

    /* a last line cut by the client's shutdown, its descriptor with it:
     * run as a last line is, and its descriptor closed */
    pipe_for_passing(p, &ino);
    send_fds(c->fd, "flush last.line", p, 1);
    close(p[0]);
    shutdown(c->fd, SHUT_WR);
    read_ok(c);
    assert_string_equal(fx->f.last_args, "last.line");
    assert_true(fx->f.fd_seen && fx->f.fd_ino == ino);
    assert_true(reader_gone(p[1]));
    close(p[1]);
    conn_close(c);

    /* held for a line not ended yet, then the client leaves */
    c = conn_open(fx->path);
    pipe_for_passing(p, &ino);
    unsigned before = fx->f.commands;
    send_fds(c->fd, "flush never.ends", p, 1);
    close(p[0]);
    /* "help" on another connection answered: the server read the first */
    struct conn *c2 = conn_open(fx->path);
    struct jv *v = conn_ask(c2, "help");
    jfree(v);
    conn_close(c2);
    assert_false(reader_gone(p[1])); /* held for its line */
    conn_close(c);
    assert_true(wait_until_gone(p[1]));
    close(p[1]);
    /* the half line ran as a last line does (eof), with its descriptor;
     * the server closed it once the command returned */
    assert_int_equal(fx->f.commands - before, 1);
    assert_string_equal(fx->f.last_args, "never.ends");
}

static void
test_idle_and_limits(void **state)
{
    struct fixture *fx = *state;
    /* every socket slot taken (each answered, so each is accepted), then
     * one more: the client idle longest makes room, told why */
    struct conn *cs[STATS_CTL_CLIENTS_MAX];
    for (int i = 0; i < STATS_CTL_CLIENTS_MAX; i++) {
        cs[i] = conn_open(fx->path);
        struct jv *v = conn_ask(cs[i], "help");
        assert_true(jbool(v, "ok"));
        jfree(v);
    }
    struct conn *extra = conn_open(fx->path);
    struct jv *v = conn_ask(extra, "help");
    assert_true(jbool(v, "ok"));
    jfree(v);
    char *line = conn_read_line(cs[0]);
    assert_non_null(line);
    assert_non_null(strstr(line, "too many clients: closed for a newer one"));
    free(line);
    assert_true(conn_closed(cs[0]));
    conn_close(extra);
    for (int i = 0; i < STATS_CTL_CLIENTS_MAX; i++)
        conn_close(cs[i]);

    /* a client that says nothing is dropped */
    stats_server_set_idle_timeout(fx->s, 200);
    struct conn *c = conn_open(fx->path);
    assert_true(conn_closed(c));
    conn_close(c);
    stats_server_set_idle_timeout(fx->s, 0);
}

/* ---- HTTP ---- */

/* The whole answer to one request (malloc'd). */
static char *
http_get(struct fixture *fx, const char *req, size_t reqlen)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)stats_server_http_port(fx->s))};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    send_all(fd, req, reqlen);
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    for (;;) {
        if (n + 1 >= cap)
            b = realloc(b, cap *= 2);
        ssize_t r = recv(fd, b + n, cap - n - 1, 0);
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    b[n] = '\0';
    close(fd);
    return b;
}

static bool
have_promtool(void)
{
    return access("/usr/bin/promtool", X_OK) == 0 ||
           system("command -v promtool >/dev/null 2>&1") == 0;
}

/* promtool check metrics on text: its exit status. */
static int
promtool_check(struct fixture *fx, const char *text, bool quiet)
{
    char file[200], cmd[400];
    snprintf(file, sizeof(file), "%s/metrics.txt", fx->dir);
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    snprintf(cmd, sizeof(cmd), "promtool check metrics < '%s'%s", file,
             quiet ? " >/dev/null 2>&1" : "");
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void
test_http(void **state)
{
    struct fixture *fx = *state;
    assert_true(stats_server_http_port(fx->s) > 0);
    static const char get[] = "GET /metrics HTTP/1.0\r\n\r\n";
    char *r = http_get(fx, get, sizeof(get) - 1);
    assert_true(strncmp(r, "HTTP/1.0 200 OK\r\n", 17) == 0);
    assert_non_null(strstr(r, "\r\nContent-Type: text/plain; version=0.0.4"));
    char *body = strstr(r, "\r\n\r\n");
    assert_non_null(body);
    body += 4;
    char clen[64];
    snprintf(clen, sizeof(clen), "\r\nContent-Length: %zu\r\n", strlen(body));
    assert_non_null(strstr(r, clen));
    assert_non_null(strstr(body, "# TYPE sluice_messages_received_total counter\n"));
    assert_non_null(strstr(body, "\nsluice_recipients_delivered_total 8\n"));
    assert_non_null(strstr(body, "\nsluice_connections_outbound_open 5\n"));
    assert_non_null(strstr(body, "\nsluice_spool_bytes 3145728\n"));
    assert_non_null(strstr(body, "\nsluice_spool_unconfirmed_removed_total 2\n"));
    assert_non_null(strstr(body, "\nsluice_spool_sync_failing_refused_total 7\n"));
    assert_non_null(
        strstr(body, "sluice_domain_queue_recipients{domain=\"gmail.com\",state=\"ready\"} 100\n"));
    /* label values escaped per the format */
    assert_non_null(strstr(body, "{domain=\"we\\\"ird\\\\dom\\nain\",state=\"ready\"} 1\n"));
    assert_non_null(strstr(body, "sluice_redis_state{state=\"connected\"} 1\n"));
    assert_non_null(strstr(body, "sluice_domain_suspended{domain=\"example.org\"} 1\n"));
    if (have_promtool())
        assert_int_equal(promtool_check(fx, body, false), 0);
    else
        fprintf(stderr, "promtool not installed: the exposition is not checked by it\n");
    free(r);

    static const char get11[] =
        "GET /metrics?x=1 HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
    r = http_get(fx, get11, sizeof(get11) - 1);
    assert_true(strncmp(r, "HTTP/1.1 200 OK\r\n", 17) == 0);
    assert_non_null(strstr(r, "\r\nConnection: close\r\n"));
    free(r);

    static const char head[] = "HEAD /metrics HTTP/1.1\r\n\r\n";
    r = http_get(fx, head, sizeof(head) - 1);
    assert_true(strncmp(r, "HTTP/1.1 200 OK\r\n", 17) == 0);
    assert_string_equal(strstr(r, "\r\n\r\n"), "\r\n\r\n"); /* no body */
    free(r);

    /* The status page: self-contained HTML, nothing else may load. */
    static const char page[] = "GET / HTTP/1.1\r\n\r\n";
    r = http_get(fx, page, sizeof(page) - 1);
    assert_true(strncmp(r, "HTTP/1.1 200 OK\r\n", 17) == 0);
    assert_non_null(strstr(r, "\r\nContent-Type: text/html; charset=utf-8\r\n"));
    assert_non_null(strstr(r, "\r\nContent-Security-Policy: default-src 'none'; "));
    assert_non_null(strstr(r, "<title>sluice status</title>"));
    assert_non_null(strstr(r, "fetch(\"status.json\""));
    assert_null(strstr(r, "src=\"http"));
    assert_true(strlen(r) > 4000);
    free(r);
    static const char head_page[] = "HEAD /?refresh=5 HTTP/1.0\r\n\r\n";
    r = http_get(fx, head_page, sizeof(head_page) - 1);
    assert_true(strncmp(r, "HTTP/1.0 200 OK\r\n", 17) == 0);
    assert_string_equal(strstr(r, "\r\n\r\n"), "\r\n\r\n");
    free(r);

    /* What it reads: the stats document, the busiest domains and the
     * suspended ones. */
    static const char status[] = "GET /status.json HTTP/1.1\r\n\r\n";
    r = http_get(fx, status, sizeof(status) - 1);
    assert_true(strncmp(r, "HTTP/1.1 200 OK\r\n", 17) == 0);
    assert_non_null(strstr(r, "\r\nContent-Type: application/json\r\n"));
    body = strstr(r, "\r\n\r\n") + 4;
    static const char lead[] = "{\"stats\":{\"ok\":true,";
    assert_memory_equal(body, lead, sizeof(lead) - 1);
    assert_non_null(strstr(body, "\"domains\":[{\"name\":\"gmail.com\""));
    char *susp = strstr(body, "\"suspended\":[");
    assert_non_null(susp);
    static const char first[] = "\"suspended\":[{\"name\":\"example.org\"";
    assert_memory_equal(susp, first, sizeof(first) - 1);
    assert_null(strstr(susp, "gmail.com")); /* not suspended */
    assert_string_equal(body + strlen(body) - 2, "]}");
    free(r);

    static const struct {
        const char *req, *status;
    } cases[] = {
        {"GET /x HTTP/1.1\r\n\r\n", "HTTP/1.1 404 "},
        {"GET /status.jsonx HTTP/1.1\r\n\r\n", "HTTP/1.1 404 "},
        {"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 405 "},
        {"GET /metricsx HTTP/1.0\n\n", "HTTP/1.0 404 "},
        {"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 405 "},
        {"hello\r\n\r\n", "HTTP/1.1 400 "},
        {"GET /metrics\r\n\r\n", "HTTP/1.1 400 "},
        {"GET /metrics HTTP/2.0\r\n\r\n", "HTTP/1.1 505 "},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        r = http_get(fx, cases[i].req, strlen(cases[i].req));
        if (strncmp(r, cases[i].status, strlen(cases[i].status)) != 0)
            fail_msg("%s: got %.40s", cases[i].req, r);
        free(r);
    }

    /* a request larger than the bound: refused, not buffered */
    size_t big = 3 * STATS_HTTP_REQUEST_MAX;
    char *req = malloc(big);
    memset(req, 'a', big);
    memcpy(req, "GET /metrics HTTP/1.1\r\nX-Big: ", 30);
    r = http_get(fx, req, big);
    assert_true(strncmp(r, "HTTP/1.1 431 ", 13) == 0);
    free(r);
    free(req);
}

static void
test_metrics_render(void **state)
{
    struct fixture *fx = *state;
    struct stats_counters c;
    memset(&c, 0, sizeof(c));
    /* every family with no domain, and NULL redis state */
    char *t = stats_render_metrics(&c, NULL, 0, 0);
    assert_non_null(t);
    assert_non_null(strstr(t, "sluice_redis_state{state=\"off\"} 1\n"));
    assert_null(strstr(t, "sluice_domain_"));
    if (have_promtool())
        assert_int_equal(promtool_check(fx, t, false), 0);
    free(t);

    /* failures by class: every class a series, in JSON an object */
    snprintf(c.deferred_by_class[0].name, sizeof(c.deferred_by_class[0].name), "other");
    snprintf(c.deferred_by_class[1].name, sizeof(c.deferred_by_class[1].name), "rate_limited");
    snprintf(c.bounced_by_class[0].name, sizeof(c.bounced_by_class[0].name), "other");
    snprintf(c.bounced_by_class[1].name, sizeof(c.bounced_by_class[1].name), "rate_limited");
    c.deferred_by_class[1].live = 7;
    c.bounced_by_class[0].live = 2;
    c.nclasses = 2;
    c.names_refused = 5;
    c.campaign_names_refused = 3;
    t = stats_render_metrics(&c, NULL, 0, 0);
    assert_non_null(t);
    assert_non_null(strstr(t, "\nsluice_names_refused_total 5\n"));
    assert_non_null(strstr(t, "\nsluice_campaign_names_refused_total 3\n"));
    assert_non_null(strstr(t, "\nsluice_recipients_deferred_by_class_total{class=\"rate_limited\"} 7\n"));
    assert_non_null(strstr(t, "\nsluice_recipients_deferred_by_class_total{class=\"other\"} 0\n"));
    assert_non_null(strstr(t, "\nsluice_recipients_bounced_by_class_total{class=\"other\"} 2\n"));
    if (have_promtool())
        assert_int_equal(promtool_check(fx, t, false), 0);
    free(t);
    struct json j;
    json_init(&j);
    stats_render_stats(&j, &c, NULL, NULL);
    assert_false(json_failed(&j));
    assert_non_null(strstr(j.buf, "\"deferred_by_class\":{\"other\":0,\"rate_limited\":7}"));
    assert_non_null(strstr(j.buf, "\"bounced_by_class\":{\"other\":2,\"rate_limited\":0}"));
    assert_non_null(strstr(j.buf, "\"names_refused\":5,\"campaign_names_refused\":3"));
    json_fini(&j);

    /* a held destination and its deferral classes: in JSON, and as
     * series only for the classes it met */
    struct stats_domain dm[2];
    memset(dm, 0, sizeof(dm));
    snprintf(dm[0].name, sizeof(dm[0].name), "busy.test");
    dm[0].held = true;
    dm[0].held_until_ms = 1700000000123ull;
    snprintf(dm[0].deferred_by_class[0].name, sizeof(dm[0].deferred_by_class[0].name),
             "rate_limited");
    dm[0].deferred_by_class[0].live = 5;
    snprintf(dm[0].deferred_by_class[1].name, sizeof(dm[0].deferred_by_class[1].name), "other");
    dm[0].deferred_by_class[1].live = 1;
    dm[0].nclasses = 2;
    snprintf(dm[1].name, sizeof(dm[1].name), "calm.test");
    dm[1].resolving = true;
    t = stats_render_metrics(&c, dm, 2, 0);
    assert_non_null(t);
    assert_non_null(strstr(t, "\nsluice_domain_held{domain=\"busy.test\"} 1\n"));
    assert_non_null(strstr(t, "\nsluice_domain_held{domain=\"calm.test\"} 0\n"));
    assert_non_null(strstr(t, "\nsluice_domain_recipients_deferred_by_class_total{domain=\"busy.test\","
                              "class=\"rate_limited\"} 5\n"));
    assert_non_null(strstr(t, "\nsluice_domain_recipients_deferred_by_class_total{domain=\"busy.test\","
                              "class=\"other\"} 1\n"));
    assert_null(strstr(t, "deferred_by_class_total{domain=\"calm.test\""));
    if (have_promtool())
        assert_int_equal(promtool_check(fx, t, false), 0);
    free(t);
    json_init(&j);
    json_obj_begin(&j);
    stats_render_domains(&j, dm, 2, 0);
    json_obj_end(&j);
    assert_false(json_failed(&j));
    assert_non_null(strstr(j.buf, "\"held\":true,\"held_until\":\"2023-11-14T22:13:20.123Z\","
                                  "\"resolving\":false,"
                                  "\"deferred_by_class\":{\"rate_limited\":5,\"other\":1}"));
    assert_non_null(strstr(j.buf, "\"held\":false,\"held_until\":null,\"resolving\":true,"
                                  "\"deferred_by_class\":{}"));
    json_fini(&j);

    /* A domain has a destination per pool and one more for tls_relaxed
     * mail: one series each per domain and pool (a pool label), never two
     * samples of one series (Prometheus keeps the first, promtool does
     * not mind). */
    struct stats_domain pd[3];
    memset(pd, 0, sizeof(pd));
    for (int i = 0; i < 3; i++) {
        snprintf(pd[i].name, sizeof(pd[i].name), "pooled.test");
        pd[i].max_connections = 20;
    }
    snprintf(pd[1].pool, sizeof(pd[1].pool), "warm");
    pd[0].connections = 2, pd[0].delivered = 10, pd[0].ready = 7;
    pd[1].connections = 3, pd[1].delivered = 20;
    pd[2].connections = 1, pd[2].delivered = 4, pd[2].held = true; /* tls_relaxed */
    snprintf(pd[2].deferred_by_class[0].name, sizeof(pd[2].deferred_by_class[0].name), "other");
    pd[2].deferred_by_class[0].live = 2;
    pd[2].nclasses = 1;
    snprintf(pd[0].limit_reason, sizeof(pd[0].limit_reason), "config");
    t = stats_render_metrics(&c, pd, 3, 0);
    assert_non_null(t);
    assert_non_null(strstr(t, "\nsluice_domain_connections{domain=\"pooled.test\"} 3\n"));
    assert_non_null(strstr(t, "\nsluice_domain_connections{domain=\"pooled.test\",pool=\"warm\"} 3\n"));
    assert_non_null(strstr(t, "\nsluice_domain_recipients_delivered_total{domain=\"pooled.test\"} 14\n"));
    assert_non_null(strstr(t, "\nsluice_domain_held{domain=\"pooled.test\"} 1\n"));
    assert_non_null(strstr(t, "\nsluice_domain_max_connections{domain=\"pooled.test\"} 20\n"));
    assert_non_null(strstr(t, "\nsluice_domain_queue_recipients{domain=\"pooled.test\",pool=\"warm\","
                              "state=\"ready\"} 0\n"));
    assert_non_null(strstr(t, "\nsluice_domain_recipients_deferred_by_class_total{domain=\"pooled.test\","
                              "class=\"other\"} 2\n"));
    assert_non_null(strstr(t, "\nsluice_domain_limit_info{domain=\"pooled.test\",reason=\"config\"} 1\n"));
    /* every sample's name and labels once */
    size_t nkeys = 0;
    const char *keys[400];
    size_t klen[400];
    for (const char *line = t; *line != '\0';) {
        const char *eol = strchr(line, '\n');
        assert_non_null(eol);
        if (line[0] != '#') {
            const char *sp = eol;
            while (sp > line && *sp != ' ')
                sp--;
            for (size_t k = 0; k < nkeys; k++)
                if (klen[k] == (size_t)(sp - line) && memcmp(keys[k], line, klen[k]) == 0)
                    fail_msg("two samples of one series: %.*s", (int)klen[k], line);
            assert_true(nkeys < sizeof(keys) / sizeof(keys[0]));
            keys[nkeys] = line;
            klen[nkeys++] = (size_t)(sp - line);
        }
        line = eol + 1;
    }
    if (have_promtool())
        assert_int_equal(promtool_check(fx, t, false), 0);
    free(t);

    /* per tenant: what was received and what became of it, in both */
    struct stats_counters ct;
    memset(&ct, 0, sizeof(ct));
    snprintf(ct.tenants[0].name, sizeof(ct.tenants[0].name), "acme");
    ct.tenants[0].received_msgs = 4;
    ct.tenants[0].received_rcpts = 9;
    ct.tenants[0].delivered = 6;
    ct.tenants[0].deferred = 2;
    ct.tenants[0].bounced = 1;
    ct.tenants[0].expired = 3;
    ct.ntenants = 1;
    t = stats_render_metrics(&ct, NULL, 0, 0);
    assert_non_null(t);
    assert_non_null(strstr(t, "\nsluice_tenant_messages_received_total{tenant=\"acme\"} 4\n"));
    assert_non_null(strstr(t, "\nsluice_tenant_recipients_received_total{tenant=\"acme\"} 9\n"));
    assert_non_null(strstr(t, "\nsluice_tenant_recipients_delivered_total{tenant=\"acme\"} 6\n"));
    assert_non_null(strstr(t, "\nsluice_tenant_recipients_deferred_total{tenant=\"acme\"} 2\n"));
    assert_non_null(strstr(t, "\nsluice_tenant_recipients_bounced_total{tenant=\"acme\"} 1\n"));
    assert_non_null(strstr(t, "\nsluice_tenant_recipients_expired_total{tenant=\"acme\"} 3\n"));
    if (have_promtool())
        assert_int_equal(promtool_check(fx, t, false), 0);
    free(t);
    json_init(&j);
    stats_render_stats(&j, &ct, NULL, NULL);
    assert_false(json_failed(&j));
    assert_non_null(strstr(j.buf, "\"tenants\":{\"acme\":{\"received_msgs\":4,\"received_rcpts\":9,"
                                  "\"delivered\":6,\"deferred\":2,\"bounced\":1,\"expired\":3}}"));
    json_fini(&j);

    /* the table of one thread: first use makes an entry, a full one
     * counts no more tenants */
    struct stats_tenant_table tt = {0};
    struct stats_tenant *e1 = stats_tenant_get(&tt, "a");
    assert_non_null(e1);
    e1->delivered = 1;
    assert_ptr_equal(stats_tenant_get(&tt, "a"), &tt.v[0]);
    for (unsigned i = 1; i < STATS_TENANT_TABLE_MAX; i++) {
        char name[16];
        snprintf(name, sizeof(name), "t%u", i);
        assert_non_null(stats_tenant_get(&tt, name));
    }
    assert_null(stats_tenant_get(&tt, "one-too-many"));
    struct stats_tenant copy[2];
    assert_int_equal(stats_tenant_copy(&tt, copy, 2), 2);
    assert_string_equal(copy[0].name, "a");
    assert_int_equal(copy[0].delivered, 1);
    stats_tenant_fini(&tt);
    assert_null(tt.v);

    /* a broken exposition is refused by promtool: the check can fail */
    if (have_promtool())
        assert_int_not_equal(promtool_check(fx, "# TYPE x counter\nx{a=\"b} 1\n", true), 0);
}

/* ---- the socket file ---- */

static void
test_socket_file(void **state)
{
    struct fixture *fx = *state;
    struct stat st;
    assert_int_equal(stat(fx->path, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0660);

    struct stats_ops ops = {.arg = &fx->f, .counters = fake_counters};
    struct stats_server *s2 = NULL;
    char err[256] = "";
    /* a live sluice answers there: refused, its socket untouched */
    assert_int_equal(stats_server_new(fx->path, 0600, NULL, 10, &ops, &s2, err, sizeof(err)),
                     -EADDRINUSE);
    assert_null(s2);
    assert_non_null(strstr(err, "running"));
    assert_int_equal(stat(fx->path, &st), 0);

    fx->s = stats_server_free(fx->s);
    assert_int_equal(stat(fx->path, &st), -1);
    assert_int_equal(errno, ENOENT);

    /* a stale socket file (bound, nobody listening) is replaced */
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", fx->path);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    close(fd);
    assert_int_equal(stats_server_new(fx->path, 0600, NULL, 10, &ops, &fx->s, err, sizeof(err)), 0);
    assert_int_equal(stat(fx->path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(stats_server_http_port(fx->s), 0);
    struct conn *c = conn_open(fx->path);
    struct jv *v = conn_ask(c, "stats");
    assert_true(jbool(v, "ok"));
    jfree(v);
    v = conn_ask(c, "suspend gmail.com"); /* no command callback */
    assert_false(jbool(v, "ok"));
    jfree(v);
    conn_close(c);
    fx->s = stats_server_free(fx->s);

    /* a path that is not a socket is never removed */
    FILE *f = fopen(fx->path, "w");
    assert_non_null(f);
    fclose(f);
    assert_int_equal(stats_server_new(fx->path, 0600, NULL, 10, &ops, &s2, err, sizeof(err)),
                     -EEXIST);
    assert_int_equal(stat(fx->path, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    unlink(fx->path);

    /* a bad HTTP address is an error for the operator, and leaves no file */
    assert_true(stats_server_new(fx->path, 0600, "nonsense", 10, &ops, &s2, err, sizeof(err)) < 0);
    assert_non_null(strstr(err, "nonsense"));
    assert_int_equal(stat(fx->path, &st), -1);
}

/* The stop told a client that had connected but not yet written its
 * request that sluice stops, then closed it at once: the client's write
 * then failed (EPIPE) and it never read the answer waiting for it (the
 * integration test saw it as "no answer" now and then). Now a client so
 * told lingers until its end (bounded): its request is taken, the answer
 * read. And a client idle between requests that asks while the stop
 * lingers is told too, not left without an answer. (A client in the
 * listener's backlog is told the same way, stop_refuse_backlog; which of
 * the two these are depends on the stats thread, tests/integ's
 * test_drain_deadlines probes it.) Nothing is asserted until the stop
 * has ended: an assertion that failed with it under way would free the
 * fixture under it. */
static void *
free_server(void *arg)
{
    struct fixture *fx = arg;
    fx->s = stats_server_free(fx->s);
    return NULL;
}

static void
test_stop_answers_a_client_yet_to_ask(void **state)
{
    struct fixture *fx = *state;
    struct conn *idle = conn_open(fx->path);
    struct jv *v = conn_ask(idle, "stats"); /* accepted, between requests */
    assert_true(jbool(v, "ok"));
    jfree(v);
    struct conn *c = conn_open(fx->path);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, free_server, fx), 0);
    struct pollfd p = {.fd = c->fd, .events = POLLIN};
    int told = poll(&p, 1, 10000); /* told before it asked: the stop began */
    int err; /* (an assertion here would fire with the stop under way) */
    ssize_t asked_idle = send(idle->fd, "stats\n", 6, MSG_NOSIGNAL);
    char *idle_line = line_or_null(idle, &err);
    ssize_t asked = send(c->fd, "stats\n", 6, MSG_NOSIGNAL);
    char *line = line_or_null(c, &err);
    conn_close(c);
    char *idle_more = line_or_null(idle, &err); /* then its end */
    conn_close(idle);
    pthread_join(t, NULL);

    assert_int_equal(told, 1);
    assert_int_equal(asked, 6); /* EPIPE before: closed under it */
    assert_non_null(line);
    assert_non_null(strstr(line, STATS_CMD_NOT_RUN));
    assert_int_equal(asked_idle, 6);
    assert_non_null(idle_line); /* before: closed at the end with no line */
    assert_non_null(strstr(idle_line, STATS_CMD_NOT_RUN));
    assert_null(idle_more);
    free(line);
    free(idle_line);
    assert_null(fx->s);
    struct stat st;
    assert_int_equal(stat(fx->path, &st), -1);
}

/* ---- sluicectl ---- */

static bool
sluicectl_path(char *out, size_t cap)
{
    const char *env = getenv("SLUICECTL");
    if (env != NULL) {
        snprintf(out, cap, "%s", env);
        return access(out, X_OK) == 0;
    }
    /* build/tests/unit/test_stats -> build/tools/sluicectl */
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0)
        return false;
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (slash == NULL)
        return false;
    *slash = '\0';
    snprintf(out, cap, "%s/../../tools/sluicectl", self);
    return access(out, X_OK) == 0;
}

/* Run sluicectl with args; its exit status, stdout in out (malloc'd). */
static int
run_ctl(struct fixture *fx, const char *bin, char **out, const char *const *args)
{
    char outf[200], errf[200];
    snprintf(outf, sizeof(outf), "%s/ctl.out", fx->dir);
    snprintf(errf, sizeof(errf), "%s/ctl.err", fx->dir);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, outf, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&fa, 2, errf, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    char *argv[16];
    size_t n = 0;
    argv[n++] = (char *)bin;
    for (; args[n - 1] != NULL && n < 15; n++)
        argv[n] = (char *)args[n - 1];
    argv[n] = NULL;
    pid_t pid;
    assert_int_equal(posix_spawn(&pid, bin, &fa, NULL, argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    FILE *f = fopen(outf, "r");
    assert_non_null(f);
    size_t cap = 1 << 16, len = 0;
    *out = malloc(cap);
    len = fread(*out, 1, cap - 1, f);
    (*out)[len] = '\0';
    fclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void
test_sluicectl(void **state)
{
    struct fixture *fx = *state;
    char bin[PATH_MAX + 32];
    if (!sluicectl_path(bin, sizeof(bin))) {
        fprintf(stderr, "sluicectl not built next to this test (set SLUICECTL): skipped\n");
        skip();
    }
    static const struct {
        int code;
        const char *args[8];
        const char *expect; /* in stdout, or NULL */
    } cases[] = {
        {0, {"-s", "@", "stats"}, "delivered"},
        {0, {"-s", "@", "--json", "stats"}, "\"ok\":true"},
        {0, {"-s", "@", "domains", "2"}, "gmail.com"},
        {0, {"-s", "@", "domains", "2"}, " 421 rate_limited "},
        {0, {"-s", "@", "domains", "2"}, " - dns_failure "},
        {0, {"-s", "@", "message", "0123ABCD"}, "a@example.com"},
        {0, {"-s", "@", "suspend", "gmail.com"}, NULL},
        {0, {"-s", "@", "metrics"}, "sluice_recipients_delivered_total 8"},
        {0, {"-s", "@", "top", "-n", "2", "-d", "0.1"}, "gmail.com"},
        {0, {"-s", "@", "reload"}, NULL},
        {0, {"--help"}, "COMMAND"},
        {0, {"domains", "--help"}, "domains"},
        {1, {"-s", "@", "suspend", "nosuch.example"}, NULL},
        {1, {"-s", "@", "--json", "message", "missing"}, "\"ok\":false"},
        {2, {"-s", "@"}, NULL},
        {2, {"-s", "@", "frobnicate"}, NULL},
        {2, {"-s", "@", "suspend"}, NULL},
        {2, {"-s", "@", "domains", "many"}, NULL},
        {2, {"-s", "@", "top", "-n", "x"}, NULL},
        {2, {"--bogus", "stats"}, NULL},
        {3, {"-s", "/nonexistent/stats.sock", "stats"}, NULL},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *args[9];
        size_t k = 0;
        for (; k < 8 && cases[i].args[k] != NULL; k++) /* "@": the fixture's socket */
            args[k] = strcmp(cases[i].args[k], "@") == 0 ? fx->path : cases[i].args[k];
        args[k] = NULL;
        char *out;
        int code = run_ctl(fx, bin, &out, args);
        if (code != cases[i].code) {
            char errf[200], msg[512] = "";
            snprintf(errf, sizeof(errf), "%s/ctl.err", fx->dir);
            FILE *f = fopen(errf, "r");
            if (f != NULL) {
                msg[fread(msg, 1, sizeof(msg) - 1, f)] = '\0';
                fclose(f);
            }
            free(out);
            fail_msg("case %zu (%s ...): exit %d, expected %d; stderr: %s", i,
                     k > 2 ? args[2] : args[0], code, cases[i].code, msg);
        }
        if (cases[i].expect != NULL && strstr(out, cases[i].expect) == NULL)
            fail_msg("case %zu: \"%s\" not in:\n%s", i, cases[i].expect, out);
        if (k > 2 && strcmp(args[2], "--json") == 0) { /* one JSON document, one line */
            char *nl = strchr(out, '\n');
            assert_non_null(nl);
            assert_string_equal(nl + 1, "");
            *nl = '\0';
            struct jv *v = jparse(out);
            if (v == NULL)
                fail_msg("case %zu: not JSON: %s", i, out);
            jfree(v);
        }
        free(out);
    }
    /* top outlives the socket's idle time between two views: each view
     * connects anew (before, the second view found its connection
     * closed and exited 3) */
    stats_server_set_idle_timeout(fx->s, 200);
    {
        const char *targs[] = {"-s", fx->path, "top", "-n", "2", "-d", "0.6", NULL};
        char *tout;
        assert_int_equal(run_ctl(fx, bin, &tout, targs), 0);
        char *second = strstr(tout, "gmail.com");
        assert_non_null(second);
        assert_non_null(strstr(second + 1, "gmail.com"));
        free(tout);
    }
    stats_server_set_idle_timeout(fx->s, 0);
    /* the socket from the environment */
    setenv("SLUICE_SOCKET", fx->path, 1);
    const char *args[] = {"stats", NULL};
    char *out;
    assert_int_equal(run_ctl(fx, bin, &out, args), 0);
    free(out);
    unsetenv("SLUICE_SOCKET");
}

/* ---- tricklers ---- */

#define TRICKLERS 40 /* of each kind: more than either pool holds */

struct trickler {
    int fd;
    bool http;
    uint64_t opened, closed; /* monotonic ms; closed 0: still open */
    bool evicted;            /* told "too many clients" before the close */
    size_t sent;
};

struct trickle_run {
    struct trickler t[2 * TRICKLERS];
    uint64_t until; /* stop trickling then, closed or not */
};

/* One octet of a request that never ends, every 50 ms, on every trickler
 * still open; a close (EOF or reset) is noted with what came before it. */
static void *
trickle_thread(void *arg)
{
    struct trickle_run *r = arg;
    static const char ctl_req[] = "stats";
    static const char http_req[] = "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ";
    for (;;) {
        uint64_t now = clock_mono_ms();
        unsigned open = 0;
        for (int i = 0; i < 2 * TRICKLERS; i++) {
            struct trickler *t = &r->t[i];
            if (t->closed != 0)
                continue;
            char in[512];
            ssize_t n = recv(t->fd, in, sizeof(in) - 1, MSG_DONTWAIT);
            if (n > 0) {
                in[n] = '\0';
                t->evicted |= strstr(in, "too many clients") != NULL ||
                              strstr(in, "503 Service Unavailable") != NULL;
            }
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
                t->closed = now;
                continue;
            }
            const char *req = t->http ? http_req : ctl_req;
            size_t rl = t->http ? sizeof(http_req) - 1 : sizeof(ctl_req) - 1;
            char b = t->sent < rl ? req[t->sent] : 'a';
            if (send(t->fd, &b, 1, MSG_NOSIGNAL | MSG_DONTWAIT) == 1)
                t->sent++;
            open++;
        }
        if (open == 0 || now >= r->until)
            return NULL;
        struct timespec step = {0, 50 * 1000000};
        nanosleep(&step, NULL);
    }
}

static int
http_connect(struct fixture *fx)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)stats_server_http_port(fx->s))};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    return fd;
}

/* 40 HTTP and 40 socket clients each trickle a request that never ends:
 * sluicectl still gets its answer, and every trickler is closed, either
 * for a newer client or at its whole-request deadline (STATS_REQUEST_MS
 * after it connected, however many octets it sent meanwhile). */
static void
test_tricklers(void **state)
{
    struct fixture *fx = *state;
    char bin[PATH_MAX + 32];
    if (!sluicectl_path(bin, sizeof(bin))) {
        fprintf(stderr, "sluicectl not built next to this test (set SLUICECTL): skipped\n");
        skip();
    }
    struct trickle_run *r = calloc(1, sizeof(*r));
    assert_non_null(r);
    for (int i = 0; i < 2 * TRICKLERS; i++) {
        struct trickler *t = &r->t[i];
        t->http = i % 2 == 0;
        t->opened = clock_mono_ms();
        if (t->http) {
            t->fd = http_connect(fx);
        } else {
            struct conn *c = conn_open(fx->path);
            t->fd = dup(c->fd);
            conn_close(c);
        }
    }
    r->until = clock_mono_ms() + STATS_REQUEST_MS + 10000;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, trickle_thread, r), 0);
    /* every trickler has sent octets by now; ask as an operator would */
    struct timespec wait = {0, 500 * 1000000};
    nanosleep(&wait, NULL);
    char *out = NULL;
    static const char *const args[] = {"-s", NULL, "stats", NULL};
    const char *a[4] = {args[0], fx->path, args[2], NULL};
    int rc = run_ctl(fx, bin, &out, a);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(out, "received"));
    free(out);
    pthread_join(th, NULL);

    unsigned evicted[2] = {0, 0}, at_deadline[2] = {0, 0};
    for (int i = 0; i < 2 * TRICKLERS; i++) {
        struct trickler *t = &r->t[i];
        if (t->closed == 0)
            fail_msg("trickler %d (%s) still open after %u ms, %zu octets sent", i,
                     t->http ? "http" : "socket", (unsigned)(clock_mono_ms() - t->opened), t->sent);
        uint64_t held = t->closed - t->opened;
        if (t->evicted) {
            evicted[t->http]++;
            continue;
        }
        /* at the deadline: not before it, and not long after (slack for a
         * loaded machine; an idle timeout reset by each octet never fires) */
        if (held + 100 < STATS_REQUEST_MS || held > STATS_REQUEST_MS + 4000)
            fail_msg("trickler %d (%s) closed after %llu ms (%zu octets)", i,
                     t->http ? "http" : "socket", (unsigned long long)held, t->sent);
        at_deadline[t->http]++;
        assert_true(t->sent >= 20); /* it kept trickling all along */
    }
    print_message("tricklers: socket %u made room, %u closed at the deadline; http %u made "
                  "room, %u at the deadline\n",
                  evicted[0], at_deadline[0], evicted[1], at_deadline[1]);
    /* each pool holds its own 32: HTTP never took a socket slot */
    assert_true(evicted[0] >= TRICKLERS - STATS_CTL_CLIENTS_MAX + 1); /* + sluicectl */
    assert_true(evicted[1] >= TRICKLERS - STATS_HTTP_CLIENTS_MAX);
    assert_true(at_deadline[0] > 0 && at_deadline[1] > 0);
    for (int i = 0; i < 2 * TRICKLERS; i++)
        close(r->t[i].fd);
    free(r);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reader),
        cmocka_unit_test_setup_teardown(test_stats_fields, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rates, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rates_window_after_a_late_sample, setup, teardown),
        cmocka_unit_test_setup_teardown(test_domains, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commands, setup, teardown),
        cmocka_unit_test_setup_teardown(test_long_line, setup, teardown),
        cmocka_unit_test_setup_teardown(test_passed_fds, setup, teardown),
        cmocka_unit_test_setup_teardown(test_passed_fd_edges, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_and_limits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_http, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metrics_render, setup, teardown),
        cmocka_unit_test_setup_teardown(test_socket_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_answers_a_client_yet_to_ask, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sluicectl, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tricklers, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
