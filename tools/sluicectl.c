/*
 * sluicectl: the operator's view of a running sluice, through its stats
 * socket (engine/stats.h): one command line out, one JSON line back,
 * rendered for people as aligned tables, or printed raw with --json.
 *
 * Exit codes: 0 ok, 1 sluice answered {"ok":false} (or the file of a
 * suppress import or export could not be opened), 2 usage (bad command,
 * argument or number: said on stderr in one line), 3 the socket cannot be
 * reached, closed, timed out (10 s) or answered something that is not a
 * JSON object. The answer is read field by field: unknown fields are
 * ignored and missing ones shown as "-", so that sluicectl and sluice
 * may be of different versions.
 *
 * `suppress import` and `export` open their file here, with the rights
 * of whoever runs sluicectl, and pass the descriptor to sluice with the
 * command line (SCM_RIGHTS): sluice opens no path for a client of its
 * socket (engine/ops_suppress.c), as postmap runs as its user.
 *
 * Threading: one thread; `top` waits in poll(2) on the terminal.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "common/clock.h"

#ifndef SLUICE_VERSION
#define SLUICE_VERSION "unknown"
#endif

#define DEFAULT_SOCKET  "/run/sluice/stats.sock"
#define TIMEOUT_MS      10000
#define LINE_MAX_OCTETS 4096 /* the server's STATS_LINE_MAX */
#define DOMAINS_MAX     1000
#define SCOPED_BULK_TIMEOUT_MS (30u * 60 * 1000) /* flush, bounce: a spool of millions */

enum { EXIT_OK = 0, EXIT_REFUSED = 1, EXIT_USAGE = 2, EXIT_UNREACHABLE = 3 };

struct ctl {
    const char *path; /* borrowed: argv or the environment */
    const char *path_from; /* static: where path came from, for the operator */
    bool json;
    int fd;    /* -1: not connected yet */
    char *buf; /* owned: what was read and not yet used */
    size_t len, cap;
    char *last; /* owned: the text of the last answer, for --json */
    unsigned timeout_ms; /* per request; 0: TIMEOUT_MS */
    int pass_fd; /* owned: a file sent with the next request (SCM_RIGHTS), then closed; -1: none */
};

static volatile sig_atomic_t interrupted;

/* The file made for an export until sluice answered it ok: removed by
 * every exit before that (a refusal, a closed connection, a timeout, an
 * interrupt), as an export that failed leaves no file. Static because
 * die() ends the process from anywhere. */
static struct {
    char path[PATH_MAX + 1]; /* "": none */
    dev_t dev;
    ino_t ino;
} made;

/* Remove the export's file if it is still the one made here (sluice,
 * which may still write to it after a timeout, writes to an unlinked
 * file then). */
static void
made_remove(void)
{
    struct stat st;
    if (made.path[0] != '\0' && lstat(made.path, &st) == 0 && st.st_dev == made.dev &&
        st.st_ino == made.ino)
        unlink(made.path);
    made.path[0] = '\0';
}

/* SIGINT, SIGTERM or SIGHUP while an export's file is made and not yet
 * answered: the file removed (lstat and unlink are async-signal-safe),
 * then the signal's own end. */
static void
on_signal_made(int sig)
{
    made_remove();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Hold (block true) or let through again the signals of on_signal_made,
 * while made changes. */
static void
made_signals(bool block, sigset_t *old)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    if (block)
        sigprocmask(SIG_BLOCK, &set, old);
    else
        sigprocmask(SIG_SETMASK, old, NULL);
}

static void
on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

/* One line on stderr, then exit. */
static void
die(int code, const char *fmt, ...)
{
    va_list ap;
    fputs("sluicectl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    made_remove();
    exit(code);
}

/* Standard output is a pipe or socket whose reader has closed it (a write
 * to it fails with EPIPE, SIGPIPE being ignored for the stats socket): as
 * other tools, sluicectl then stops quietly. */
static bool
output_reader_gone(void)
{
    struct pollfd p = {.fd = STDOUT_FILENO, .events = 0};
    return poll(&p, 1, 0) == 1 && (p.revents & (POLLERR | POLLHUP)) != 0;
}

/* poll one fd until deadline; 1 ready, 0 timed out or interrupted. */
static int
wait_fd(int fd, short events, uint64_t deadline)
{
    for (;;) {
        uint64_t now = clock_mono_ms();
        if (now >= deadline)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int rc = poll(&p, 1, (int)(deadline - now));
        if (rc > 0)
            return 1;
        if (rc < 0 && errno == EINTR) {
            if (interrupted)
                return 0;
            continue;
        }
        if (rc == 0)
            return 0;
        return 0;
    }
}

/* ---- the connection ---- */

/* The socket cannot be reached (e: errno): say what that likely means
 * and which path was tried, from where, rather than a bare errno. */
static void __attribute__((noreturn))
ctl_unreachable(const struct ctl *c, int e)
{
    /* A connect to a path that is no socket (the config file, the spool
     * directory) is refused as one that nobody listens on: say what it is. */
    struct stat st;
    if ((e == ECONNREFUSED || e == ENOTSOCK) && stat(c->path, &st) == 0 &&
        !S_ISSOCK(st.st_mode)) {
        const char *kind = S_ISDIR(st.st_mode)   ? "a directory"
                           : S_ISREG(st.st_mode) ? "a file"
                                                 : "a special file";
        die(EXIT_UNREACHABLE,
            "cannot reach sluice's stats socket %s (%s): that is %s, not a socket (the "
            "stats socket is sluice's [stats] socket)",
            c->path, c->path_from, kind);
    }
    const char *why = e == ENOENT       ? "no such socket: is sluice running?"
                      : e == ECONNREFUSED ? "connection refused: sluice may not be running "
                                          "(a socket left behind by one that stopped)"
                      : e == EACCES      ? "permission denied: run as a user that may open it"
                      : e == ENOTSOCK    ? "not a socket"
                      : e == ETIMEDOUT   ? "timed out: sluice is running but does not answer"
                                         : strerror(e);
    die(EXIT_UNREACHABLE, "cannot reach sluice's stats socket %s (%s): %s", c->path,
        c->path_from, why);
}

static void
ctl_connect(struct ctl *c)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    if (strlen(c->path) >= sizeof(sa.sun_path))
        die(EXIT_USAGE, "socket path too long: %s", c->path);
    memcpy(sa.sun_path, c->path, strlen(c->path));
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        die(EXIT_UNREACHABLE, "socket: %s", strerror(errno));
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        /* a full backlog: wait for room, as long as a request may take */
        if (errno != EAGAIN && errno != EINPROGRESS)
            ctl_unreachable(c, errno);
        if (!wait_fd(c->fd, POLLOUT, clock_mono_ms() + TIMEOUT_MS))
            ctl_unreachable(c, ETIMEDOUT);
        int e = 0;
        socklen_t el = sizeof(e);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &e, &el);
        if (e != 0)
            ctl_unreachable(c, e);
    }
}

/* Send line, read one answer line, parse it. Returns the document
 * (cJSON_Delete it); exits 3 when the socket fails. raw (may be NULL)
 * receives the answer's text, valid until the next request. */
static cJSON *
ctl_request(struct ctl *c, const char *line, const char **raw)
{
    if (c->fd < 0)
        ctl_connect(c);
    uint64_t deadline = clock_mono_ms() + (c->timeout_ms ? c->timeout_ms : TIMEOUT_MS);
    size_t n = strlen(line);
    char *msg = malloc(n + 2);
    if (msg == NULL)
        die(EXIT_UNREACHABLE, "out of memory");
    memcpy(msg, line, n);
    msg[n++] = '\n';
    for (size_t off = 0; off < n;) {
        ssize_t w;
        if (c->pass_fd >= 0) {
            /* the descriptor goes with the line's first octets: sluice
             * gives it to the line those octets end in */
            union {
                struct cmsghdr h;
                char b[CMSG_SPACE(sizeof(int))];
            } u;
            memset(&u, 0, sizeof(u));
            struct iovec iov = {.iov_base = msg + off, .iov_len = n - off};
            struct msghdr m = {.msg_iov = &iov,
                               .msg_iovlen = 1,
                               .msg_control = u.b,
                               .msg_controllen = sizeof(u.b)};
            struct cmsghdr *h = CMSG_FIRSTHDR(&m);
            h->cmsg_level = SOL_SOCKET;
            h->cmsg_type = SCM_RIGHTS;
            h->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(h), &c->pass_fd, sizeof(int));
            w = sendmsg(c->fd, &m, MSG_NOSIGNAL);
            if (w > 0) { /* sluice holds its own copy now */
                close(c->pass_fd);
                c->pass_fd = -1;
            }
        } else {
            w = send(c->fd, msg + off, n - off, MSG_NOSIGNAL);
        }
        if (w > 0) {
            off += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR && !interrupted)
            continue;
        if (w < 0 && errno == EAGAIN && wait_fd(c->fd, POLLOUT, deadline))
            continue;
        /* sluice refuses a client it has no room for with one line, then
         * closes: that line, not "Broken pipe", is what to show. */
        if (w < 0 && (errno == EPIPE || errno == ECONNRESET) && !interrupted)
            break;
        free(msg);
        die(EXIT_UNREACHABLE, "%s: cannot send: %s", c->path,
            interrupted                ? "interrupted"
            : w < 0 && errno == EAGAIN ? "timed out"
                                       : strerror(errno));
    }
    free(msg);

    char *nl;
    while ((nl = c->len > 0 ? memchr(c->buf, '\n', c->len) : NULL) == NULL) {
        if (c->cap - c->len < 65536) {
            size_t cap = c->cap ? c->cap * 2 : 1 << 17;
            char *p = realloc(c->buf, cap);
            if (p == NULL)
                die(EXIT_UNREACHABLE, "out of memory");
            c->buf = p;
            c->cap = cap;
        }
        ssize_t r = recv(c->fd, c->buf + c->len, c->cap - c->len - 1, 0);
        if (r > 0) {
            c->len += (size_t)r;
            continue;
        }
        if (r == 0)
            die(EXIT_UNREACHABLE, "%s: sluice closed the connection", c->path);
        if (errno == EINTR && !interrupted)
            continue;
        if (errno == EAGAIN && wait_fd(c->fd, POLLIN, deadline))
            continue;
        die(EXIT_UNREACHABLE, "%s: no answer: %s", c->path,
            interrupted       ? "interrupted"
            : errno == EAGAIN ? "timed out"
                              : strerror(errno));
    }
    size_t ll = (size_t)(nl - c->buf);
    *nl = '\0';
    cJSON *doc = cJSON_ParseWithLength(c->buf, ll);
    if (doc == NULL || !cJSON_IsObject(doc))
        die(EXIT_UNREACHABLE, "%s: the answer is not a JSON object", c->path);
    if (raw != NULL) {
        free(c->last);
        if ((c->last = strndup(c->buf, ll)) == NULL)
            die(EXIT_UNREACHABLE, "out of memory");
        *raw = c->last;
    }
    c->len -= ll + 1;
    memmove(c->buf, nl + 1, c->len);
    return doc;
}

static void
ctl_close(struct ctl *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    if (c->pass_fd >= 0)
        close(c->pass_fd);
    c->pass_fd = -1;
    free(c->buf);
    c->buf = NULL;
    free(c->last);
    c->last = NULL;
    c->len = c->cap = 0;
}

/* The document if ok; else the error on stderr (and the document on
 * stdout with --json), exit 1. */
static cJSON *
ctl_ask(struct ctl *c, const char *line, const char **raw)
{
    const char *text = NULL;
    cJSON *doc = ctl_request(c, line, &text);
    if (raw != NULL)
        *raw = text;
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(doc, "ok")))
        return doc;
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(doc, "error");
    if (c->json)
        printf("%s\n", text);
    fprintf(stderr, "sluicectl: %s\n",
            cJSON_IsString(e) ? e->valuestring : "sluice refused the command (no reason given)");
    /* Arguments sluicectl passes on as typed (shaping, tlsrpt): sluice's
     * "usage: ..." is a usage error, as one found here is. */
    bool usage = cJSON_IsString(e) && strncmp(e->valuestring, "usage: ", 7) == 0;
    cJSON_Delete(doc);
    ctl_close(c);
    made_remove(); /* sluice has answered: it writes no more */
    exit(usage ? EXIT_USAGE : EXIT_REFUSED);
}

/* ---- formatting ---- */

/* Cells are small: one static ring of buffers keeps the callers simple. */
static char *
cell_buf(void)
{
    static char ring[64][96];
    static unsigned next;
    return ring[next++ % 64];
}

static const cJSON *
get(const cJSON *o, const char *path)
{
    char key[64];
    while (o != NULL && *path != '\0') {
        size_t n = strcspn(path, ".");
        if (n >= sizeof(key))
            return NULL;
        memcpy(key, path, n);
        key[n] = '\0';
        o = cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, key) : NULL;
        path += n + (path[n] == '.');
    }
    return o;
}

static bool
num(const cJSON *o, const char *path, double *out)
{
    const cJSON *v = get(o, path);
    if (!cJSON_IsNumber(v))
        return false;
    *out = v->valuedouble;
    return true;
}

static const char *
fmt_count_d(double v)
{
    char *b = cell_buf();
    if (!isfinite(v))
        return "-";
    if (v < 0 || v >= 1e18 || v != (double)(uint64_t)v) {
        snprintf(b, 96, "%.6g", v);
        return b;
    }
    char digits[32];
    int n = snprintf(digits, sizeof(digits), "%.0f", v);
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        if (i > 0 && (n - i) % 3 == 0)
            b[o++] = ',';
        b[o++] = digits[i];
    }
    b[o] = '\0';
    return b;
}

static const char *
fmt_count(const cJSON *o, const char *path)
{
    double v;
    return num(o, path, &v) ? fmt_count_d(v) : "-";
}

static const char *
fmt_bytes_d(double v)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    char *b = cell_buf();
    if (!isfinite(v) || v < 0)
        return "-";
    int u = 0;
    while (v >= 1024 && u < 6) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(b, 96, "%.0f B", v);
    else
        snprintf(b, 96, "%.1f %s", v, units[u]);
    return b;
}

static const char *
fmt_bytes(const cJSON *o, const char *path)
{
    double v;
    return num(o, path, &v) ? fmt_bytes_d(v) : "-";
}

static const char *
fmt_rate(const cJSON *o, const char *path)
{
    double v;
    if (!num(o, path, &v))
        return "-";
    char *b = cell_buf();
    snprintf(b, 96, "%.1f", v);
    return b;
}

static const char *
fmt_share(const cJSON *o, const char *path)
{
    double v;
    if (!num(o, path, &v))
        return "-";
    char *b = cell_buf();
    snprintf(b, 96, "%.1f%%", v * 100);
    return b;
}

/* ms as "3d 4h", "4h 12m", "12m 5s", "5s", "120ms", rounded to the
 * nearest of the last unit shown (1,500 ms is "2s", 59.6 s "1m"; it cut
 * down: 1,999 ms read "1s"), the unit chosen after rounding. */
static const char *
fmt_duration_d(double ms)
{
    if (!isfinite(ms) || ms < 0 || ms > 1e18)
        return "-";
    char *b = cell_buf();
    uint64_t r; /* a cast of x + 0.5 (x >= 0): x rounded, without libm */
    if ((r = (uint64_t)(ms + 0.5)) < 1000) {
        snprintf(b, 96, "%llums", (unsigned long long)r);
    } else if ((r = (uint64_t)(ms / 1000 + 0.5)) < 3600) {
        if (r < 60)
            snprintf(b, 96, "%llus", (unsigned long long)r);
        else
            snprintf(b, 96, "%llum %llus", (unsigned long long)(r / 60),
                     (unsigned long long)(r % 60));
    } else if ((r = (uint64_t)(ms / 60000 + 0.5)) < 1440) {
        snprintf(b, 96, "%lluh %llum", (unsigned long long)(r / 60), (unsigned long long)(r % 60));
    } else {
        r = (uint64_t)(ms / 3600000 + 0.5);
        snprintf(b, 96, "%llud %lluh", (unsigned long long)(r / 24), (unsigned long long)(r % 24));
    }
    /* a round figure as it was typed: "10m", not "10m 0s" */
    size_t n = strlen(b);
    if (n > 3 && (strcmp(b + n - 3, " 0s") == 0 || strcmp(b + n - 3, " 0m") == 0 ||
                  strcmp(b + n - 3, " 0h") == 0))
        b[n - 3] = '\0';
    return b;
}

static const char *
fmt_duration(const cJSON *o, const char *path)
{
    double v;
    return num(o, path, &v) ? fmt_duration_d(v) : "-";
}

/* A string for a terminal: control characters shown as '?'. */
static const char *
fmt_str(const cJSON *o, const char *path)
{
    const cJSON *v = get(o, path);
    if (!cJSON_IsString(v) || v->valuestring[0] == '\0')
        return "-";
    char *b = cell_buf();
    snprintf(b, 96, "%s", v->valuestring);
    for (char *p = b; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    return b;
}

/* ---- tables ---- */

#define COLS_MAX 16

struct table {
    unsigned ncols;
    unsigned right; /* bit c: column c is right-aligned */
    size_t nrows, cap;
    char **cells;  /* owned: nrows * ncols strings */
    bool *heading; /* owned: a row printed as is, first cell only */
    size_t w[COLS_MAX]; /* widths of the rows flushed before (table_flush) */
};

static void
table_init(struct table *t, unsigned ncols, unsigned right)
{
    memset(t, 0, sizeof(*t));
    t->ncols = ncols;
    t->right = right;
}

static void
table_grow(struct table *t)
{
    if (t->nrows < t->cap)
        return;
    t->cap = t->cap ? t->cap * 2 : 16;
    t->cells = realloc(t->cells, t->cap * t->ncols * sizeof(*t->cells));
    t->heading = realloc(t->heading, t->cap * sizeof(*t->heading));
    if (t->cells == NULL || t->heading == NULL)
        die(EXIT_UNREACHABLE, "out of memory");
}

/* ncols strings (NULL shows as "-"). */
static void
table_row(struct table *t, ...)
{
    table_grow(t);
    va_list ap;
    va_start(ap, t);
    for (unsigned c = 0; c < t->ncols; c++) {
        const char *s = va_arg(ap, const char *);
        t->cells[t->nrows * t->ncols + c] = strdup(s != NULL ? s : "-");
    }
    va_end(ap);
    t->heading[t->nrows++] = false;
}

static void
table_row_v(struct table *t, const char *const *cells)
{
    table_grow(t);
    for (unsigned c = 0; c < t->ncols; c++)
        t->cells[t->nrows * t->ncols + c] = strdup(cells[c] != NULL ? cells[c] : "-");
    t->heading[t->nrows++] = false;
}

static void
table_heading(struct table *t, const char *s)
{
    table_grow(t);
    for (unsigned c = 0; c < t->ncols; c++)
        t->cells[t->nrows * t->ncols + c] = strdup(c == 0 ? s : "");
    t->heading[t->nrows++] = true;
}

/* Display width: UTF-8 continuation octets take no column. */
static size_t
width(const char *s)
{
    size_t w = 0;
    for (; *s != '\0'; s++)
        w += ((unsigned char)*s & 0xc0) != 0x80;
    return w;
}

/* Print the rows held and let them go, keeping the table (its columns
 * and their widths) for more: a long list printed a page at a time, each
 * page's columns at least as wide as those before it. */
static void
table_flush(struct table *t, FILE *f)
{
    size_t *w = t->w;
    for (size_t r = 0; r < t->nrows; r++) {
        if (t->heading[r])
            continue;
        for (unsigned c = 0; c < t->ncols && c < COLS_MAX; c++) {
            size_t l = width(t->cells[r * t->ncols + c]);
            if (l > w[c])
                w[c] = l;
        }
    }
    for (size_t r = 0; r < t->nrows; r++) {
        if (t->heading[r]) {
            fprintf(f, "%s\n", t->cells[r * t->ncols]);
            continue;
        }
        /* built whole, so that an empty last cell leaves no trailing blanks */
        char line[8192];
        size_t o = 0;
        for (unsigned c = 0; c < t->ncols && c < COLS_MAX; c++) {
            const char *s = t->cells[r * t->ncols + c];
            int pad = (int)(w[c] - width(s));
            bool right = (t->right & (1u << c)) != 0;
            int n = snprintf(line + o, sizeof(line) - o, "%s%*s%s%*s", c > 0 ? "  " : "",
                             right ? pad : 0, "", s, right ? 0 : pad, "");
            if (n < 0 || (size_t)n >= sizeof(line) - o) {
                o = strlen(line);
                break;
            }
            o += (size_t)n;
        }
        while (o > 0 && line[o - 1] == ' ')
            o--;
        line[o] = '\0';
        fprintf(f, "%s\n", line);
    }
    for (size_t i = 0; i < t->nrows * t->ncols; i++)
        free(t->cells[i]);
    t->nrows = 0;
}

static void
table_print(struct table *t, FILE *f)
{
    table_flush(t, f);
    free(t->cells);
    free(t->heading);
    memset(t, 0, sizeof(*t));
}

/* ---- rendering ---- */

static void
print_header(const cJSON *st)
{
    /* mail queued and never sent: said where the operator looks first,
     * not only in the log line at start */
    printf("sluice %s   up %s   workers %s   redis %s%s\n", fmt_str(st, "version"),
           fmt_duration(st, "uptime_ms"), fmt_count(st, "workers"), fmt_str(st, "redis.state"),
           cJSON_IsFalse(get(st, "delivery_enabled")) ? "   delivery OFF ([delivery] enabled = no)"
                                                      : "");
}

static void
print_rates(const cJSON *st)
{
    static const char *const k[][2] = {{"received", "received messages"},
                                       {"delivered", "delivered"},
                                       {"deferred", "deferred"},
                                       {"bounced", "bounced"},
                                       {"expired", "expired"}};
    /* In sluice's first minute the "1m" rates are over the time since
     * start, and after a gap in the samples (a stats thread held up) over
     * more than a minute: the column says so ("last 12s", "last 75s")
     * rather than "last 1m" (a sampling a few ms late each second is
     * still a minute's). */
    char last[32] = "last 1m";
    double w;
    if (num(st, "rates.1m.window_ms", &w) && w >= 0 && (w < 59500 || w >= 63000))
        snprintf(last, sizeof(last), "last %llus",
                 (unsigned long long)(w < 1000 ? 1 : w / 1000 + 0.5)); /* as the page rounds */
    struct table t;
    table_init(&t, 3, 0x6);
    table_row(&t, "per second", "last 1s", last);
    for (size_t i = 0; i < 5; i++) {
        char a[48], b[48];
        snprintf(a, sizeof(a), "rates.1s.%s", k[i][0]);
        snprintf(b, sizeof(b), "rates.1m.%s", k[i][0]);
        table_row(&t, k[i][1], fmt_rate(st, a), fmt_rate(st, b));
    }
    table_print(&t, stdout);
}

static void
render_stats(const cJSON *st)
{
    print_header(st);
    putchar('\n');
    print_rates(st);
    putchar('\n');

    struct table t;
    table_init(&t, 3, 0x6);
    table_heading(&t, "Totals");
    table_row(&t, "  received messages", fmt_count(st, "counters.received_msgs"), "");
    table_row(&t, "  received recipients", fmt_count(st, "counters.received_rcpts"), "");
    table_row(&t, "  delivered", fmt_count(st, "counters.delivered"), "");
    table_row(&t, "  delivered over TLS", fmt_count(st, "counters.delivered_tls"),
              fmt_share(st, "tls_share"));
    table_row(&t, "  deferred", fmt_count(st, "counters.deferred"), "");
    table_row(&t, "  bounced", fmt_count(st, "counters.bounced"), "");
    table_row(&t, "  expired", fmt_count(st, "counters.expired"), "");
    table_row(&t, "  DSNs queued", fmt_count(st, "counters.dsn_queued"), "");
    table_heading(&t, "Bounce listener");
    table_row(&t, "  messages parsed", fmt_count(st, "counters.oob_messages"), "");
    table_row(&t, "  oob_bounce and complaint events", fmt_count(st, "counters.oob_events"), "");
    table_row(&t, "  dropped (auto-replies, no or forged token)",
              fmt_count(st, "counters.oob_dropped"), "");
    table_row(&t, "  recipients refused", fmt_count(st, "counters.oob_refused"), "");
    table_heading(&t, "Connections");
    table_row(&t, "  inbound open", fmt_count(st, "connections.inbound_open"), "");
    table_row(&t, "  outbound open", fmt_count(st, "connections.outbound_open"), "");
    table_row(&t, "  inbound total", fmt_count(st, "connections.inbound_total"), "");
    table_row(&t, "  outbound total", fmt_count(st, "connections.outbound_total"), "");
    table_row(&t, "  outbound failed", fmt_count(st, "connections.outbound_failed"), "");
    table_row(&t, "  DANE authenticated", fmt_count(st, "connections.dane_authenticated"), "");
    table_row(&t, "  DANE hosts given up", fmt_count(st, "connections.dane_failed"), "");
    table_row(&t, "  transactions", fmt_count(st, "connections.transactions"), "");
    table_row(&t, "  on reused connections", fmt_count(st, "connections.reused_transactions"),
              fmt_share(st, "connections.reuse_share"));
    table_row(&t, "  refused by an MX host (no 8BITMIME, SIZE, SMTPUTF8)",
              fmt_count(st, "connections.host_refused"), "");
    table_row(&t, "    of those, sent to the next MX host",
              fmt_count(st, "connections.host_detoured"), "");
    table_heading(&t, "Queue");
    table_row(&t, "  messages", fmt_count(st, "queue.messages"), "");
    table_row(&t, "  recipients", fmt_count(st, "queue.recipients"), "");
    table_row(&t, "  deferred recipients", fmt_count(st, "queue.deferred"), "");
    table_row(&t, "  jobs parked (tenant or campaign suspended)", fmt_count(st, "parked"), "");
    table_heading(&t, "Spool");
    table_row(&t, "  message data", fmt_bytes(st, "spool.bytes"), "");
    table_row(&t, "  map size", fmt_bytes(st, "spool.map_size"), "");
    table_row(&t, "  map used", fmt_bytes(st, "spool.map_used"),
              fmt_share(st, "spool.map_used_share"));
    table_row(&t, "  removed after a failed sync", fmt_count(st, "spool.unconfirmed_removed"), "");
    table_row(&t, "  refused while sync failing", fmt_count(st, "spool.sync_failing_refused"), "");
    table_heading(&t, "DNS");
    table_row(&t, "  lookups", fmt_count(st, "dns.lookups"), "");
    table_row(&t, "  cache hits", fmt_count(st, "dns.cache_hits"),
              fmt_share(st, "dns.cache_hit_share"));
    table_row(&t, "  cache entries", fmt_count(st, "dns.cache_entries"), "");
    table_row(&t, "  TLSA queries (DANE)", fmt_count(st, "dns.tlsa_queries"), "");
    table_row(&t, "  MX hosts with validated TLSA", fmt_count(st, "dns.tlsa_secure"), "");
    table_row(&t, "  TLSA lookups failed", fmt_count(st, "dns.tlsa_failed"), "");
    table_row(&t, "  EDNS turned off by a FORMERR", fmt_count(st, "dns.edns_off"), "");
    table_row(&t, "  lookups running", fmt_count(st, "dns.inflight"), "");
    table_row(&t, "  lookups waiting (max_inflight)", fmt_count(st, "dns.queued"), "");
    table_row(&t, "  query timeouts", fmt_count(st, "dns.timeouts"), "");
    table_row(&t, "  lookups failed", fmt_count(st, "dns.failures"), "");
    if (cJSON_IsTrue(get(st, "suppress.enabled"))) {
        table_heading(&t, "Suppression list");
        table_row(&t, "  entries", fmt_count(st, "suppress.entries"), "");
        table_row(&t, "  recipients found on it", fmt_count(st, "suppress.hits"), "");
        table_row(&t, "  added", fmt_count(st, "suppress.added"), "");
        table_row(&t, "  removed", fmt_count(st, "suppress.removed"), "");
        table_row(&t, "  entries waiting in the spool (list not written)",
                  fmt_count(st, "suppress.notes_pending"), "");
        table_row(&t, "  entries dropped", fmt_count(st, "suppress.feed_dropped"), "");
        table_row(&t, "  map used", fmt_bytes(st, "suppress.map_used"), "");
    }
    table_heading(&t, "Delivery log");
    table_row(&t, "  events", fmt_count(st, "dlog.events"), "");
    table_row(&t, "  write errors", fmt_count(st, "dlog.write_errors"), "");
    table_row(&t, "  dropped", fmt_count(st, "dlog.dropped"), "");
    if (cJSON_IsTrue(get(st, "shaping.enabled"))) {
        /* the actions in force: "shaping list" */
        table_heading(&t, "Traffic shaping");
        table_row(&t, "  actions started", fmt_count(st, "shaping.started"), "");
        table_row(&t, "  actions ended", fmt_count(st, "shaping.ended"), "");
        table_row(&t, "  replies that matched a rule", fmt_count(st, "shaping.rule_hits"), "");
        table_row(&t, "  connections quit for an action", fmt_count(st, "shaping.connections_quit"),
                  "");
        table_row(&t, "  actions ignored (unknown here)", fmt_count(st, "shaping.ignored"), "");
        table_row(&t, "  changes waiting for Redis", fmt_count(st, "shaping.outbox"), "");
        table_row(&t, "  changes dropped (Redis away)", fmt_count(st, "shaping.outbox_dropped"),
                  "");
    }
    table_heading(&t, "AUTH");
    table_row(&t, "  succeeded", fmt_count(st, "auth.ok"), "");
    table_row(&t, "  failed", fmt_count(st, "auth.failed"), "");
    table_row(&t, "  refused: address failed too often", fmt_count(st, "auth.refused_address"),
              "");
    table_row(&t, "  refused: user failed too often", fmt_count(st, "auth.refused_user"), "");
    table_row(&t, "  refused: hashing queue full", fmt_count(st, "auth.busy"), "");
    table_row(&t, "  hashes waiting", fmt_count(st, "auth.hash_waiting"), "");
    table_heading(&t, "Objects");
    const cJSON *objs = get(st, "objects");
    const cJSON *o;
    bool any = false;
    cJSON_ArrayForEach(o, objs)
    {
        if (o->string == NULL || !cJSON_IsNumber(o))
            continue;
        char label[80];
        snprintf(label, sizeof(label), "  %s", o->string);
        table_row(&t, label, fmt_count_d(o->valuedouble), "");
        any = true;
    }
    if (!any)
        table_row(&t, "  -", "-", "");
    table_print(&t, stdout);
}

/* The tenants waiting in a destination's queue, most first: "A 19,000
 * B 100 +2" (the two with most, and how many more); "-" when none. */
static const char *
fmt_tenants(const cJSON *d)
{
    const cJSON *arr = get(d, "tenants");
    double all = 0;
    if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) == 0)
        return "-";
    char *b = cell_buf();
    size_t len = 0;
    int shown = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, arr)
    {
        if (shown == 2)
            break;
        const cJSON *name = get(x, "tenant");
        const char *n = cJSON_IsString(name) ? name->valuestring : "(none)";
        len += (size_t)snprintf(b + len, 96 - len, "%s%.24s %s", shown ? " " : "", n,
                                fmt_count(x, "ready"));
        if (len >= 96)
            return b;
        shown++;
    }
    if (num(d, "tenants_waiting", &all) && all > shown)
        snprintf(b + len, 96 - len, " +%.0f", all - shown);
    for (char *p = b; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    return b;
}

static void
render_domains(const cJSON *doc, size_t limit)
{
    struct table t;
    /* right: READY DEFERRED INFLIGHT PARKED CONN MAX RATE DELIVERED BOUNCED OLDEST */
    table_init(&t, 16, 0x7fe << 1);
    table_row(&t, "DOMAIN", "POOL", "READY", "DEFERRED", "INFLIGHT", "PARKED", "CONN", "MAX",
              "RATE/s", "DELIVERED", "BOUNCED", "OLDEST", "STATE", "TOP DEFERRAL", "LIMITED BY",
              "TENANTS WAITING");
    const cJSON *arr = get(doc, "domains");
    const cJSON *d;
    size_t n = 0;
    cJSON_ArrayForEach(d, arr)
    {
        if (n++ >= limit)
            break;
        const cJSON *susp = get(d, "suspended"), *held = get(d, "held");
        const char *state = !cJSON_IsBool(susp)  ? "-"
                            : cJSON_IsTrue(susp) ? (cJSON_IsTrue(held) ? "suspended,held" : "suspended")
                            : cJSON_IsTrue(held) ? "held"
                            : cJSON_IsTrue(get(d, "resolving")) ? "resolving"
                                                                : "active";
        /* one meaning, before a restart and after: the class of most of
         * the recipients waiting deferred now (the spool keeps each one's
         * class; the engine sorts them, most first), not the deferrals
         * counted since the destination was made */
        char top[64] = "-";
        const cJSON *cls = get(d, "waiting_by_class");
        const cJSON *c0 = cJSON_IsObject(cls) ? cls->child : NULL;
        if (c0 != NULL && c0->string != NULL && cJSON_IsNumber(c0))
            snprintf(top, sizeof(top), "%s:%.0f", c0->string, c0->valuedouble);
        table_row(&t, fmt_str(d, "name"), fmt_str(d, "pool"), fmt_count(d, "ready"),
                  fmt_count(d, "deferred"), fmt_count(d, "inflight"), fmt_count(d, "parked"),
                  fmt_count(d, "connections"),
                  fmt_count(d, "max_connections"), fmt_rate(d, "rate_limit"),
                  fmt_count(d, "delivered"), fmt_count(d, "bounced"),
                  fmt_duration(d, "oldest_age_ms"), state, top, fmt_str(d, "limit_reason"),
                  fmt_tenants(d));
    }
    table_print(&t, stdout);
    if (n == 0)
        printf("(no destinations)\n");
}

/* A generic answer (message, suspend, flush, ...): scalars as key/value
 * rows, nested objects flattened with dots, arrays of objects as tables. */
static bool
bytes_key(const char *k)
{
    size_t n = strlen(k);
    return strcmp(k, "size") == 0 || (n >= 5 && strcmp(k + n - 5, "bytes") == 0) ||
           (n >= 5 && strcmp(k + n - 5, "_size") == 0);
}

/* Is v under key a duration in ms (shown as one: "10m")? A time (Unix
 * ms, past 1e11) under an _ms key is not. */
static bool
duration_key(const char *key, const cJSON *v)
{
    size_t n = key != NULL ? strlen(key) : 0;
    return n > 3 && strcmp(key + n - 3, "_ms") == 0 && cJSON_IsNumber(v) && v->valuedouble < 1e11;
}

/* The label of key for people: a duration's key without its "_ms"
 * (for_ms 600000 reads "for  10m", not "for_ms  10m"), into buf. */
static const char *
label_of(const char *key, const cJSON *v, char *buf, size_t len)
{
    size_t n = strlen(key);
    if (duration_key(key, v))
        n -= 3;
    snprintf(buf, len, "%.*s", (int)n, key);
    return buf;
}

static const char *
fmt_scalar(const cJSON *v, const char *key)
{
    if (cJSON_IsNumber(v)) {
        if (key != NULL && bytes_key(key))
            return fmt_bytes_d(v->valuedouble);
        if (duration_key(key, v))
            return fmt_duration_d(v->valuedouble);
        return fmt_count_d(v->valuedouble);
    }
    if (cJSON_IsBool(v))
        return cJSON_IsTrue(v) ? "yes" : "no";
    if (cJSON_IsString(v)) {
        char *b = cell_buf();
        snprintf(b, 96, "%s", v->valuestring[0] ? v->valuestring : "-");
        for (char *p = b; *p != '\0'; p++)
            if ((unsigned char)*p < 0x20 || *p == 0x7f)
                *p = '?';
        return b;
    }
    return "-";
}

static void
flatten(struct table *kv, const cJSON *o, const char *prefix, const cJSON **arrays, size_t *narr)
{
    const cJSON *v;
    cJSON_ArrayForEach(v, o)
    {
        if (v->string == NULL || (prefix[0] == '\0' && strcmp(v->string, "ok") == 0))
            continue;
        char key[128];
        snprintf(key, sizeof(key), "%s%s", prefix, v->string);
        if (cJSON_IsObject(v)) {
            char p[130];
            snprintf(p, sizeof(p), "%s.", key);
            flatten(kv, v, p, arrays, narr);
        } else if (cJSON_IsArray(v) && cJSON_IsObject(v->child)) {
            if (*narr < 8)
                arrays[(*narr)++] = v;
        } else if (cJSON_IsArray(v)) {
            char joined[96] = "";
            const cJSON *e;
            size_t off = 0;
            cJSON_ArrayForEach(e, v)
            {
                off +=
                    (size_t)snprintf(joined + off, off < sizeof(joined) ? sizeof(joined) - off : 0,
                                     "%s%s", off ? ", " : "", fmt_scalar(e, NULL));
                if (off >= sizeof(joined))
                    break;
            }
            table_row(kv, key, joined[0] ? joined : "-");
        } else {
            char label[128];
            table_row(kv, label_of(key, v, label, sizeof(label)), fmt_scalar(v, v->string));
        }
    }
}

static void
render_generic(const cJSON *doc)
{
    struct table kv;
    table_init(&kv, 2, 0);
    const cJSON *arrays[8];
    size_t narr = 0;
    flatten(&kv, doc, "", arrays, &narr);
    bool any = kv.nrows > 0;
    table_print(&kv, stdout);
    for (size_t i = 0; i < narr; i++) {
        /* columns: the scalar keys of the elements, in first-seen order */
        const char *cols[COLS_MAX];
        unsigned ncols = 0;
        const cJSON *e, *f;
        cJSON_ArrayForEach(e, arrays[i])
        {
            cJSON_ArrayForEach(f, e)
            {
                if (f->string == NULL || cJSON_IsObject(f) || cJSON_IsArray(f))
                    continue;
                bool seen = false;
                for (unsigned c = 0; c < ncols && !seen; c++)
                    seen = strcmp(cols[c], f->string) == 0;
                if (!seen && ncols < COLS_MAX)
                    cols[ncols++] = f->string;
            }
        }
        if (ncols == 0)
            continue;
        printf("%s%s:\n", any ? "\n" : "", arrays[i]->string);
        any = true;
        unsigned right = 0;
        struct table t;
        const cJSON *first = arrays[i]->child;
        for (unsigned c = 0; c < ncols; c++)
            if (cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(first, cols[c])))
                right |= 1u << c;
        table_init(&t, ncols, right);
        char upper[COLS_MAX][48];
        const char *hdr[COLS_MAX];
        for (unsigned c = 0; c < ncols; c++) {
            label_of(cols[c], cJSON_GetObjectItemCaseSensitive(first, cols[c]), upper[c],
                     sizeof(upper[c]));
            for (char *p = upper[c]; *p; p++)
                *p = *p >= 'a' && *p <= 'z' ? (char)(*p - 32) : *p == '_' ? ' ' : *p;
            hdr[c] = upper[c];
        }
        table_row_v(&t, hdr);
        cJSON_ArrayForEach(e, arrays[i])
        {
            const char *row[COLS_MAX];
            for (unsigned c = 0; c < ncols; c++) {
                const cJSON *v = cJSON_GetObjectItemCaseSensitive(e, cols[c]);
                row[c] = v != NULL ? fmt_scalar(v, cols[c]) : "-";
            }
            table_row_v(&t, row);
        }
        table_print(&t, stdout);
    }
    if (!any)
        printf("ok\n");
}

/* ---- commands ---- */

struct cmd;
typedef int cmd_fn(struct ctl *c, const struct cmd *cmd, int argc, char **argv);

struct cmd {
    const char *name, *args, *about, *more;
    int min, max;
    cmd_fn *run;
};

static long
parse_number(const char *what, const char *s, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (s[0] < '0' || s[0] > '9' || *end != '\0' || errno != 0 || v < min || v > max)
        die(EXIT_USAGE, "%s: \"%s\" is not a number from %ld to %ld", what, s, min, max);
    return v;
}

/* An ID or a domain: one word of printable ASCII or UTF-8. */
static void
check_word(const char *cmd, const char *what, const char *s)
{
    if (s[0] == '\0' || strlen(s) > 255)
        die(EXIT_USAGE, "%s: %s must be 1 to 255 octets", cmd, what);
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++)
        if (*p <= ' ' || *p == 0x7f)
            die(EXIT_USAGE, "%s: %s may not hold spaces or control characters", cmd, what);
}

/* "queue": as mailq, a message a block: id, age, size, sender (and
 * tenant), then each recipient with its state, attempts, next attempt and
 * last reply. */
static void
render_queue(const cJSON *doc)
{
    const cJSON *m;
    size_t n = 0;
    cJSON_ArrayForEach(m, get(doc, "messages"))
    {
        if (n++ == 0)
            printf("%-16s %-8s %-10s %s\n", "ID", "AGE", "SIZE", "SENDER");
        printf("%-16s %-8s %-10s <%s>", fmt_str(m, "id"), fmt_duration(m, "age_ms"),
               fmt_bytes(m, "size"), cJSON_IsString(get(m, "sender")) ? fmt_str(m, "sender") : "");
        if (cJSON_IsString(get(m, "tenant")) && get(m, "tenant")->valuestring[0] != '\0')
            printf("  tenant %s", fmt_str(m, "tenant"));
        printf("\n");
        const cJSON *r;
        cJSON_ArrayForEach(r, get(m, "recipients"))
        {
            printf("    %-8s %s", fmt_str(r, "state"), fmt_str(r, "rcpt"));
            double att = 0;
            if (num(r, "attempts", &att) && att > 0)
                printf("  attempts %s", fmt_count_d(att));
            if (cJSON_IsString(get(r, "next_attempt")))
                printf("  next %s", fmt_str(r, "next_attempt"));
            printf("\n");
            /* Code 0: no reply, a failure of ours (connect, timeout, TLS). */
            bool said = cJSON_IsString(get(r, "last_reply")) && get(r, "last_reply")->valuestring[0];
            double code = 0;
            if (said && num(r, "last_code", &code) && code > 0)
                printf("             (%s %s)\n", fmt_count(r, "last_code"), fmt_str(r, "last_reply"));
            else if (said)
                printf("             (%s)\n", fmt_str(r, "last_reply"));
        }
    }
    if (n == 0 && cJSON_IsString(get(doc, "domain")))
        printf("(no queued message has a recipient at %s)\n", fmt_str(doc, "domain"));
    else if (n == 0)
        printf("(the queue is empty)\n");
    else if (cJSON_IsTrue(get(doc, "cut")))
        printf("\n%zu messages shown, cut at the answer's size cap (8 MiB); the spool holds "
               "more (a smaller N, a DOMAIN, or sluicectl message ID)\n",
               n);
    else if (cJSON_IsTrue(get(doc, "more")))
        printf("\n%zu messages shown; the spool holds more (sluicectl queue N, N up to 10000)\n", n);
    else
        printf("\n%zu message%s\n", n, n == 1 ? "" : "s");
}

/* "reload done" and what it changed, as one sentence (as a table of one
 * row it came out "reload  done"): the sections and keys the engine's
 * reload log names (changed="..."), or "no change"; then the keys that
 * changed but wait for a restart. A reload not over within the wait says
 * so and where to look. */
static void
render_reload(const cJSON *doc)
{
    const cJSON *st = get(doc, "reload"), *note = get(doc, "note");
    const cJSON *changed = get(doc, "changed"), *kept = get(doc, "needs_restart");
    printf("reload %s", cJSON_IsString(st) ? st->valuestring : "?");
    if (cJSON_IsString(changed))
        printf(": %s%s", changed->valuestring[0] != '\0' ? "changed " : "no change",
               changed->valuestring);
    if (cJSON_IsString(note))
        printf(" (%s)", note->valuestring);
    printf("\n");
    if (cJSON_IsString(kept) && kept->valuestring[0] != '\0')
        printf("not in force until a restart: %s\n", kept->valuestring);
}

/* The config took but the users file did not load: said on stderr, and
 * the exit code is a failure's (the file the operator fixed is not in
 * force). */
static int
reload_users_failed(const cJSON *doc)
{
    const cJSON *u = get(doc, "users_not_loaded");
    if (!cJSON_IsString(u))
        return EXIT_OK;
    fprintf(stderr, "sluicectl: users file not loaded, the previous users kept: %s\n",
            u->valuestring);
    return EXIT_REFUSED;
}

static int
run_plain(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    char line[LINE_MAX_OCTETS];
    int n = snprintf(line, sizeof(line), "%s", cmd->name);
    for (int i = 0; i < argc; i++) {
        check_word(cmd->name, cmd->args, argv[i]);
        /* queue's N, checked here as domains' and sites' are (exit 2) */
        if (strcmp(cmd->name, "queue") == 0 && argv[i][0] >= '0' && argv[i][0] <= '9' &&
            argv[i][strspn(argv[i], "0123456789")] == '\0')
            parse_number("queue", argv[i], 1, 10000);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " %s", argv[i]);
    }
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else if (strcmp(cmd->name, "stats") == 0)
        render_stats(doc);
    else if (strcmp(cmd->name, "queue") == 0)
        render_queue(doc);
    else if (strcmp(cmd->name, "metrics") == 0)
        fputs(cJSON_IsString(get(doc, "text")) ? get(doc, "text")->valuestring : "", stdout);
    else if (strcmp(cmd->name, "reload") == 0)
        render_reload(doc);
    else
        render_generic(doc);
    int rc = strcmp(cmd->name, "reload") == 0 ? reload_users_failed(doc) : EXIT_OK;
    cJSON_Delete(doc);
    return rc;
}

/* flush and bounce: a DOMAIN or ID, or a scope by owner (--tenant T,
 * --campaign C), sent as "tenant=T campaign=C" (the campaign last: it may
 * hold blanks). */
static int
run_scoped(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    const char *tenant = NULL, *campaign = NULL, *target = NULL, *pool = NULL, *source = NULL,
               *dur = NULL;
    bool susp = strcmp(cmd->name, "suspend") == 0 || strcmp(cmd->name, "resume") == 0;
    bool local = false;
    for (int i = 0; i < argc; i++) {
        if (susp && strcmp(argv[i], "--local") == 0) {
            local = true;
            continue;
        }
        const char **slot = strcmp(argv[i], "--tenant") == 0     ? &tenant
                            : strcmp(argv[i], "--campaign") == 0 ? &campaign
                            : strcmp(argv[i], "--pool") == 0     ? &pool
                            : strcmp(argv[i], "--source") == 0 && susp ? &source
                            : strcmp(argv[i], "--for") == 0 && strcmp(cmd->name, "suspend") == 0
                                ? &dur
                                : NULL;
        if (slot != NULL) {
            if (i + 1 >= argc)
                die(EXIT_USAGE, "%s: %s needs a value", cmd->name, argv[i]);
            *slot = argv[++i];
        } else if (argv[i][0] == '-') {
            die(EXIT_USAGE, "%s: unknown option \"%s\"", cmd->name, argv[i]);
        } else if (target == NULL) {
            target = argv[i];
        } else {
            die(EXIT_USAGE, "%s: too many arguments (usage: sluicectl %s %s)", cmd->name,
                cmd->name, cmd->args);
        }
    }
    int scopes = (target != NULL) + (tenant != NULL) + (campaign != NULL) + (pool != NULL) +
                 (source != NULL);
    if (susp && scopes != 1)
        die(EXIT_USAGE, "%s: one scope: DOMAIN, --tenant, --campaign, --pool or --source "
                        "(usage: sluicectl %s %s)", cmd->name, cmd->name, cmd->args);
    if (!susp && target != NULL && (tenant != NULL || campaign != NULL || pool != NULL))
        die(EXIT_USAGE, "%s: a DOMAIN or ID, or --tenant/--campaign/--pool, not both", cmd->name);
    if (!susp && pool != NULL && (tenant != NULL || campaign != NULL))
        die(EXIT_USAGE, "%s: --pool alone, or --tenant/--campaign", cmd->name);
    if (target == NULL && tenant == NULL && campaign == NULL && pool == NULL &&
        strcmp(cmd->name, "bounce") == 0)
        die(EXIT_USAGE, "bounce: missing argument (usage: sluicectl bounce %s)", cmd->args);
    char line[LINE_MAX_OCTETS];
    int n = snprintf(line, sizeof(line), "%s%s", cmd->name, local ? " local" : "");
    if (target != NULL) {
        check_word(cmd->name, susp ? "DOMAIN" : "ID|DOMAIN", target);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " %s", target);
    }
    if (pool != NULL) {
        check_word(cmd->name, "--pool", pool);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " pool=%s", pool);
    }
    if (source != NULL) {
        check_word(cmd->name, "--source", source);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " source=%s", source);
    }
    if (tenant != NULL) {
        check_word(cmd->name, "--tenant", tenant);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " tenant=%s", tenant);
    }
    if (campaign != NULL) {
        for (const unsigned char *p = (const unsigned char *)campaign; *p != '\0'; p++)
            if (*p < ' ' || *p == 0x7f)
                die(EXIT_USAGE, "%s: --campaign may not hold control characters", cmd->name);
        if (campaign[0] == '\0' || strlen(campaign) > 255)
            die(EXIT_USAGE, "%s: --campaign must be 1 to 255 octets", cmd->name);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " campaign=%s", campaign);
    }
    if (dur != NULL) {
        check_word(cmd->name, "--for", dur);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " for=%s", dur);
    }
    /* A flush or bounce answers once every recipient it selected was
     * updated in the spool: about 10 s for a million (a flush of a
     * 1,000,000-recipient queue). Within TIMEOUT_MS this said "timed
     * out" and exited 3, sluice unreachable, while the flush went on. */
    if (!susp)
        c->timeout_ms = SCOPED_BULK_TIMEOUT_MS;
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else
        render_generic(doc);
    cJSON_Delete(doc);
    return EXIT_OK;
}

static int
run_domains(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    long n = 20;
    if (argc == 1)
        n = parse_number("domains", argv[0], 1, DOMAINS_MAX);
    char line[64];
    snprintf(line, sizeof(line), "domains %ld", n);
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else
        render_domains(doc, (size_t)n);
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* A site's head latency in ms, one decimal, "*" after it while its
 * connections queue ("-" before the first). */
static const char *
fmt_head(const cJSON *s)
{
    double us;
    if (!num(s, "head_us", &us) || us <= 0)
        return "-";
    char *b = cell_buf();
    snprintf(b, 96, "%.1fms%s", us / 1000, cJSON_IsTrue(get(s, "queues")) ? "*" : "");
    return b;
}

/* "sites [N]": one row per site of a worker, busiest first. */
static void
render_sites(const cJSON *doc)
{
    struct table t;
    /* right: every column but SITE */
    table_init(&t, 14, 0x3ffeu);
    table_row(&t, "SITE", "WORKER", "CONN", "IDLE", "WINDOW", "MAX", "DOMAINS", "WAITING",
              "READY", "INFLIGHT", "OPENED", "FAILURES", "HALVED", "HEAD");
    const cJSON *s;
    size_t n = 0;
    cJSON_ArrayForEach(s, get(doc, "sites"))
    {
        n++;
        table_row(&t, fmt_str(s, "site"), fmt_count(s, "worker"), fmt_count(s, "connections"),
                  fmt_count(s, "idle"), fmt_count(s, "window"), fmt_count(s, "max_connections"),
                  fmt_count(s, "domains"), fmt_count(s, "domains_waiting"), fmt_count(s, "ready"),
                  fmt_count(s, "inflight"), fmt_count(s, "opened"), fmt_count(s, "failures"),
                  fmt_count(s, "window_halved"), fmt_head(s));
    }
    table_print(&t, stdout);
    if (n == 0)
        printf("(no sites)\n");
    double total;
    if (num(doc, "sites_total", &total) && total > (double)n)
        printf("(%zu of %.0f sites shown)\n", n, total);
}

static int
run_sites(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    (void)cmd;
    long n = 20;
    if (argc == 1)
        n = parse_number("sites", argv[0], 1, DOMAINS_MAX);
    char line[64];
    snprintf(line, sizeof(line), "sites %ld", n);
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else
        render_sites(doc);
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* "events" and "events pause|resume NAME": one row per sink. */
static void
render_events(const cJSON *doc)
{
    struct table t;
    /* right: PENDING OLDEST SENT FAILED DROPPED REJECTED */
    table_init(&t, 10, 0xfcu);
    table_row(&t, "SINK", "KIND", "PENDING", "OLDEST", "SENT", "FAILED", "DROPPED", "REJECTED",
              "STATE", "LAST ERROR");
    const cJSON *d;
    size_t n = 0;
    cJSON_ArrayForEach(d, get(doc, "sinks"))
    {
        n++;
        const cJSON *paused = get(d, "paused");
        table_row(&t, fmt_str(d, "name"), fmt_str(d, "kind"), fmt_count(d, "pending"),
                  fmt_duration(d, "oldest_pending_age_ms"), fmt_count(d, "sent"),
                  fmt_count(d, "failed_attempts"), fmt_count(d, "dropped"),
                  fmt_count(d, "rejected"), cJSON_IsTrue(paused) ? "paused" : "active", fmt_str(d, "last_error"));
    }
    table_print(&t, stdout);
    if (n == 0)
        printf("(no [events] sinks configured)\n");
}

static int
run_events(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    char line[LINE_MAX_OCTETS] = "events";
    if (argc > 0) {
        if (argc != 2 || (strcmp(argv[0], "pause") != 0 && strcmp(argv[0], "resume") != 0))
            die(EXIT_USAGE, "usage: sluicectl events [pause|resume NAME]");
        check_word(cmd->name, "NAME", argv[1]);
        snprintf(line, sizeof(line), "events %s %s", argv[0], argv[1]);
    }
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else
        render_events(doc);
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* A count, or "unlimited" where the answer has null (no limit). */
static const char *
fmt_limit(const cJSON *o, const char *path)
{
    return cJSON_IsNull(get(o, path)) ? "unlimited" : fmt_count(o, path);
}

/* "warmup": one row per source and destination group. */
static void
render_warmup(const cJSON *doc)
{
    struct table t;
    /* right: DAY ALLOWANCE TAKEN LEFT */
    table_init(&t, 8, 0x78u);
    table_row(&t, "SOURCE", "PLAN", "GROUP", "DAY", "ALLOWANCE", "TAKEN", "LEFT", "STARTED");
    const cJSON *d;
    size_t n = 0;
    cJSON_ArrayForEach(d, get(doc, "rows"))
    {
        n++;
        table_row(&t, fmt_str(d, "source"), fmt_str(d, "plan"), fmt_str(d, "group"),
                  fmt_count(d, "day"), fmt_limit(d, "allowance"), fmt_count(d, "taken"),
                  fmt_limit(d, "left"), fmt_str(d, "start"));
    }
    table_print(&t, stdout);
    if (n == 0)
        printf("(no [source] carries a warm-up plan)\n");
    double total;
    if (num(doc, "rows_total", &total) && total > (double)n)
        printf("(%zu of %.0f rows shown)\n", n, total);
    printf("redis: %s; messages refused over an allowance since start: %s\n",
           fmt_str(doc, "redis"), fmt_count(doc, "refused"));
}

static int
run_warmup(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    (void)cmd;
    (void)argc;
    (void)argv;
    const char *raw;
    cJSON *doc = ctl_ask(c, "warmup", &raw);
    if (c->json)
        printf("%s\n", raw);
    else
        render_warmup(doc);
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* "shaping": one row per active action, its trigger below it. */
static void
render_shaping(const cJSON *doc)
{
    struct table t;
    table_init(&t, 8, 0x40u); /* right: LEFT */
    table_row(&t, "ID", "ACTION", "SCOPE", "SOURCE/TENANT", "GROUP/DOMAIN", "RULE", "LEFT",
              "ORIGIN");
    const cJSON *a;
    size_t n = 0;
    cJSON_ArrayForEach(a, get(doc, "actions"))
    {
        n++;
        char act[32];
        const char *k = fmt_str(a, "action");
        double v;
        if (strcmp(k, "cap") == 0 && num(a, "value", &v))
            snprintf(act, sizeof(act), "cap:%.0f", v);
        else if (strcmp(k, "rate") == 0)
            snprintf(act, sizeof(act), "rate:%s", fmt_str(a, "rate"));
        else
            snprintf(act, sizeof(act), "%s", k);
        const char *where = fmt_str(a, "domain");
        if (strcmp(where, "-") == 0)
            where = fmt_str(a, "group");
        const char *who = fmt_str(a, "tenant");
        if (strcmp(who, "-") == 0)
            who = fmt_str(a, "source");
        /* an operator's suspend without --for lasts a year: "until resumed" */
        double left = 0;
        bool open_ended = strcmp(fmt_str(a, "rule"), "operator") == 0 &&
                          num(a, "remaining_ms", &left) && left > 300 * 86400000.0;
        table_row(&t, fmt_str(a, "id"), act, fmt_str(a, "scope"), who, where,
                  fmt_str(a, "rule"), open_ended ? "until resumed" : fmt_duration(a, "remaining_ms"),
                  fmt_str(a, "origin"));
    }
    table_print(&t, stdout);
    if (n == 0)
        printf("(no shaping action in force)\n");
    cJSON_ArrayForEach(a, get(doc, "actions"))
    printf("%s: %s\n", fmt_str(a, "id"), fmt_str(a, "trigger"));
    printf("redis: %s; rules loaded: %s\n", fmt_str(doc, "redis"), fmt_count(doc, "rules"));
}

/* Which nodes an operator's shaping action reaches: every node through
 * Redis, this one alone without [redis] (cluster false); a sluice that
 * does not say is taken at its word of then, every node. */
static const char *
shaping_where(const cJSON *doc)
{
    return cJSON_IsFalse(get(doc, "cluster")) ? "on this node (no [redis]: no other node hears)"
                                               : "on every node";
}

static int
run_shaping(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    (void)cmd;
    char line[512];
    size_t n = (size_t)snprintf(line, sizeof(line), "shaping");
    for (int i = 0; i < argc && n < sizeof(line); i++)
        n += (size_t)snprintf(line + n, sizeof(line) - n, " %s", argv[i]);
    if (n >= sizeof(line)) {
        fprintf(stderr, "sluicectl: arguments too long\n");
        return EXIT_USAGE;
    }
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else if (argc == 0 || strcmp(argv[0], "list") == 0)
        render_shaping(doc);
    else if (strcmp(argv[0], "clear") == 0)
        printf("cleared %s action(s) %s\n", fmt_count(doc, "cleared"), shaping_where(doc));
    else
        printf("%s: %s %s for %s %s\n", fmt_str(doc, "action.id"),
               fmt_str(doc, "action.action"), fmt_str(doc, "action.scope"),
               fmt_duration(doc, "action.remaining_ms"), shaping_where(doc));
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* Rows of the terminal left for domains, or 20 off a terminal. */
static size_t
top_rows(void)
{
    struct winsize ws;
    if (!isatty(STDOUT_FILENO) || ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) != 0 || ws.ws_row == 0)
        return 20;
    int rows = (int)ws.ws_row - 14; /* header, rates, summary, table header, prompt */
    return rows < 3 ? 3 : (size_t)rows;
}

/* The terminal's settings before top changed them, put back however
 * sluicectl exits: die() (sluice stopped, the socket closed) included. */
static struct termios top_saved;
static bool top_changed;

static void
top_restore(void)
{
    if (top_changed)
        tcsetattr(STDIN_FILENO, TCSANOW, &top_saved);
    top_changed = false;
}

static int
run_top(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    long count = 0; /* 0: until q or Ctrl-C */
    double delay = 1.0;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "-n") == 0 && i + 1 < argc) {
            count = parse_number("top -n", argv[++i], 1, 1000000);
        } else if (strcmp(argv[i], "-d") == 0 && i + 1 < argc) {
            char *end;
            const char *s = argv[++i];
            delay = strtod(s, &end);
            if (s[0] < '0' || s[0] > '9' || *end != '\0' || !(delay >= 0.1 && delay <= 3600))
                die(EXIT_USAGE, "top -d: \"%s\" is not a number of seconds from 0.1 to 3600", s);
        } else {
            die(EXIT_USAGE, "top: unexpected \"%s\" (try: sluicectl top --help)", argv[i]);
        }
    }
    bool tty_out = isatty(STDOUT_FILENO), tty_in = isatty(STDIN_FILENO);
    bool raw_mode = false;
    if (tty_in && !c->json && tcgetattr(STDIN_FILENO, &top_saved) == 0) {
        struct termios t = top_saved;
        t.c_lflag &= ~(tcflag_t)(ICANON | ECHO); /* q without Enter; ISIG stays: Ctrl-C */
        t.c_cc[VMIN] = 0;
        t.c_cc[VTIME] = 0;
        raw_mode = tcsetattr(STDIN_FILENO, TCSANOW, &t) == 0;
        if (raw_mode && !top_changed) {
            top_changed = true;
            atexit(top_restore);
        }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    int rc = EXIT_OK;
    for (long it = 0; !interrupted; it++) {
        size_t rows = top_rows();
        char line[64];
        snprintf(line, sizeof(line), "domains %zu", rows);
        const char *raw;
        cJSON *st = ctl_ask(c, "stats", &raw);
        if (c->json)
            printf("%s\n", raw);
        cJSON *doms = ctl_ask(c, line, &raw);
        if (c->json) {
            printf("%s\n", raw);
        } else {
            if (tty_out)
                fputs("\033[H\033[2J", stdout);
            else if (it > 0)
                putchar('\n');
            char now[32];
            time_t t = time(NULL);
            struct tm tm;
            strftime(now, sizeof(now), "%H:%M:%S", localtime_r(&t, &tm));
            print_header(st);
            printf("%s   connections in %s out %s   queue %s recipients   spool %s\n", now,
                   fmt_count(st, "connections.inbound_open"),
                   fmt_count(st, "connections.outbound_open"), fmt_count(st, "queue.recipients"),
                   fmt_bytes(st, "spool.bytes"));
            putchar('\n');
            print_rates(st);
            putchar('\n');
            render_domains(doms, rows);
            if (tty_out && count == 0)
                printf("\n(q to quit)\n");
        }
        cJSON_Delete(st);
        cJSON_Delete(doms);
        /* a view that could not be written ends the loop (its reader gone:
         * sluicectl top | head); main says why when it is another error */
        if (fflush(stdout) != 0 || ferror(stdout))
            break;
        if (count > 0 && it + 1 >= count)
            break;
        /* Not held open across the wait: sluice drops a client silent for
         * its idle time (60 s, and -d may be longer) and, with its pool
         * full, the one idle longest first; the next view connects anew. */
        ctl_close(c);
        /* wait, watching the keyboard for q */
        uint64_t deadline = clock_mono_ms() + (uint64_t)(delay * 1000);
        while (!interrupted) {
            uint64_t now = clock_mono_ms();
            if (now >= deadline)
                break;
            struct pollfd p = {.fd = STDIN_FILENO, .events = POLLIN};
            int r = poll(&p, raw_mode ? 1 : 0, (int)(deadline - now));
            if (r > 0) {
                char k;
                ssize_t got = read(STDIN_FILENO, &k, 1);
                if (got == 1 && (k == 'q' || k == 'Q'))
                    interrupted = 1;
                else if (got <= 0)
                    raw_mode = false; /* stdin closed: stop watching it */
            }
        }
    }
    top_restore();
    (void)cmd;
    return rc;
}

/* ---- suppress ---- */

#define SUPPRESS_BULK_TIMEOUT_MS (30u * 60 * 1000) /* import and export of millions */

static void
render_entries(struct table *t, const cJSON *arr)
{
    const cJSON *d;
    cJSON_ArrayForEach(d, arr)
    {
        table_row(t, fmt_str(d, "address"), fmt_str(d, "scope"), fmt_str(d, "reason"),
                  fmt_str(d, "added"), fmt_str(d, "expires"), fmt_str(d, "note"));
    }
}

/* Append to the command line being built in line[cap], whose first *n
 * octets are written: the suppress command's words are long (an absolute
 * path may be PATH_MAX octets) and snprintf returns the length it would
 * have written, so the end is checked before every word, never after. */
static void line_add(char *line, size_t cap, int *n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void
line_add(char *line, size_t cap, int *n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int w = (size_t)*n < cap ? vsnprintf(line + *n, cap - (size_t)*n, fmt, ap) : -1;
    va_end(ap);
    if (w < 0 || (size_t)w >= cap - (size_t)*n)
        die(EXIT_USAGE, "suppress: the command is longer than %zu octets", cap - 1);
    *n += w;
}

/* "suppress SUB ...": options become the socket's key=value words. */
static int
run_suppress(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    const char *sub = argv[0];
    char line[LINE_MAX_OCTETS];
    int n = snprintf(line, sizeof(line), "suppress %s", sub);
    bool word = strcmp(sub, "add") == 0 || strcmp(sub, "remove") == 0 ||
                strcmp(sub, "check") == 0 || strcmp(sub, "import") == 0 ||
                strcmp(sub, "export") == 0;
    bool list = strcmp(sub, "list") == 0;
    if (!word && !list && strcmp(sub, "purge") != 0)
        die(EXIT_USAGE, "suppress: unknown subcommand \"%s\" (try: sluicectl suppress --help)",
            sub);
    int i = 1;
    if (word) {
        if (argc < 2 || argv[1][0] == '-')
            die(EXIT_USAGE, "suppress %s: missing %s", sub,
                sub[0] == 'i' || sub[0] == 'e' ? "FILE" : "ADDRESS");
        char path[PATH_MAX + 1];
        const char *w = argv[1];
        if (strcmp(sub, "import") == 0) {
            /* opened here, with the caller's rights, and passed to sluice;
             * a regular file only (a FIFO opened without waiting for a
             * writer, then refused): /dev/zero or a FIFO may never end.
             * Exit 1 as when sluice opened it and refused. */
            int fd = open(argv[1], O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
            struct stat st;
            if (fd < 0 || fstat(fd, &st) != 0)
                die(EXIT_REFUSED, "suppress import: cannot open %s: %s", argv[1], strerror(errno));
            if (!S_ISREG(st.st_mode))
                die(EXIT_REFUSED, "suppress import: %s: not a regular file", argv[1]);
            /* its absolute path names it in sluice's log and answer */
            if (realpath(argv[1], path) == NULL)
                die(EXIT_USAGE, "suppress import: %s: %s", argv[1], strerror(errno));
            w = path;
            c->pass_fd = fd;
            c->timeout_ms = SUPPRESS_BULK_TIMEOUT_MS;
        } else if (strcmp(sub, "export") == 0) {
            char dir[PATH_MAX + 1], tmp[PATH_MAX + 1];
            snprintf(tmp, sizeof(tmp), "%s", argv[1]);
            char *slash = strrchr(tmp, '/');
            const char *base = slash ? slash + 1 : tmp;
            if (slash == tmp)
                snprintf(dir, sizeof(dir), "/");
            else if (slash != NULL) {
                *slash = '\0';
                if (realpath(tmp, dir) == NULL)
                    die(EXIT_USAGE, "suppress export: %s: %s", tmp, strerror(errno));
            } else if (realpath(".", dir) == NULL) {
                die(EXIT_USAGE, "suppress export: .: %s", strerror(errno));
            }
            if (base[0] == '\0')
                die(EXIT_USAGE, "suppress export: FILE is a directory");
            if (snprintf(path, sizeof(path), "%s/%s", strcmp(dir, "/") == 0 ? "" : dir, base) >=
                (int)sizeof(path))
                die(EXIT_USAGE, "suppress export: path too long");
            w = path;
            c->timeout_ms = SUPPRESS_BULK_TIMEOUT_MS;
        } else if (w[0] == '\0' || strlen(w) > 255) {
            die(EXIT_USAGE, "suppress: ADDRESS must be 1 to 255 octets");
        }
        /* blanks only in a quoted local part ("a b"@x.test), as RCPT
         * takes them */
        const char *qend = NULL;
        for (const char *p = w + 1; w[0] == '"' && *p != '\0' && qend == NULL; p++) {
            if (*p == '\\' && p[1] != '\0')
                p++;
            else if (*p == '"')
                qend = p;
        }
        for (const unsigned char *p = (const unsigned char *)w; *p != '\0'; p++)
            if ((*p <= ' ' || *p == 0x7f) && !(*p == ' ' && (const char *)p < qend))
                die(EXIT_USAGE,
                    "suppress %s: no spaces (but in a quoted local part: "
                    "\"a b\"@example.com) or control characters, please",
                    sub);
        line_add(line, sizeof(line), &n, " %s", w);
        i = 2;
    }
    const char *note = NULL;
    long limit = 0; /* list: every entry, page by page */
    for (; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        const char *key = strcmp(o, "--scope") == 0    ? "scope"
                          : strcmp(o, "--reason") == 0 ? "reason"
                          : strcmp(o, "--ttl") == 0    ? "ttl"
                          : strcmp(o, "--note") == 0   ? "note"
                          : strcmp(o, "--limit") == 0  ? "limit"
                                                       : NULL;
        if (key == NULL || v == NULL)
            die(EXIT_USAGE, "suppress %s: %s \"%s\" (try: sluicectl suppress --help)", sub,
                key == NULL ? "unknown option" : "missing value for", o);
        i++;
        if (strcmp(key, "note") == 0) {
            note = v;
            continue;
        }
        if (strcmp(key, "limit") == 0) {
            limit = parse_number("suppress list --limit", v, 1, 100000000);
            continue;
        }
        check_word("suppress", o, v);
        line_add(line, sizeof(line), &n, " %s=%s", key, v);
    }
    if (note != NULL) {
        for (const unsigned char *p = (const unsigned char *)note; *p != '\0'; p++)
            if (*p < ' ' || *p == 0x7f)
                die(EXIT_USAGE, "suppress: --note may not hold control characters");
        line_add(line, sizeof(line), &n, " note=%s", note);
    }
    if (strcmp(sub, "export") == 0) {
        /* made here, with the caller's rights, never over a file (as
         * sluice did), once sluice is reached: an unreachable sluice
         * leaves no empty file behind */
        if (c->fd < 0)
            ctl_connect(c);
        /* a signal in between is held until made is whole and its
         * handler in place: it then removes the file */
        sigset_t old;
        made_signals(true, &old);
        int fd = open(argv[1], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0640);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0)
            die(EXIT_REFUSED, "suppress export: cannot create %s: %s", argv[1], strerror(errno));
        c->pass_fd = fd;
        made.dev = st.st_dev;
        made.ino = st.st_ino;
        if (snprintf(made.path, sizeof(made.path), "%s", argv[1]) >= (int)sizeof(made.path))
            made.path[0] = '\0'; /* cannot be: open() took it */
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = on_signal_made;
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGHUP, &sa, NULL);
        made_signals(false, &old);
    }
    if (!list) {
        const char *raw;
        cJSON *doc = ctl_ask(c, line, &raw);
        /* answered ok: the export is whole, whatever comes next (a
         * signal from now on leaves it) */
        sigset_t old;
        made_signals(true, &old);
        made.path[0] = '\0';
        made_signals(false, &old);
        if (c->json) {
            printf("%s\n", raw);
        } else if (strcmp(sub, "check") == 0) {
            const cJSON *e = get(doc, "entry");
            if (cJSON_IsTrue(get(doc, "suppressed")))
                printf("%s: suppressed by %s (scope %s, %s, added %s, expires %s): %s\n",
                       fmt_str(doc, "address"), fmt_str(e, "address"), fmt_str(e, "scope"),
                       fmt_str(e, "reason"), fmt_str(e, "added"), fmt_str(e, "expires"),
                       fmt_str(e, "note"));
            else
                printf("%s: not suppressed\n", fmt_str(doc, "address"));
        } else {
            render_generic(doc);
        }
        cJSON_Delete(doc);
        return EXIT_OK;
    }
    /* list: pages of up to 1000, each after the last one shown */
    struct table t;
    table_init(&t, 6, 0);
    if (!c->json)
        table_row(&t, "ADDRESS", "SCOPE", "REASON", "ADDED", "EXPIRES", "NOTE");
    char after[400] = "", after_scope[80] = "";
    long shown = 0;
    for (;;) {
        long want = limit == 0 || limit - shown > 1000 ? 1000 : limit - shown;
        char req[LINE_MAX_OCTETS];
        int m = 0;
        line_add(req, sizeof(req), &m, "%s limit=%ld", line, want);
        if (after[0] != '\0')
            line_add(req, sizeof(req), &m, " after=%s after_scope=%s", after, after_scope);
        const char *raw;
        cJSON *doc = ctl_ask(c, req, &raw);
        if (c->json) {
            printf("%s\n", raw);
        } else {
            /* printed as each page comes: a list of millions was held
             * whole, and nothing shown, until its last page */
            render_entries(&t, get(doc, "entries"));
            table_flush(&t, stdout);
        }
        fflush(stdout);
        shown += cJSON_GetArraySize(get(doc, "entries"));
        const cJSON *next = get(doc, "next");
        bool more = cJSON_IsObject(next) && cJSON_IsString(get(next, "after")) &&
                    cJSON_IsString(get(next, "after_scope")) && (limit == 0 || shown < limit);
        if (more) {
            snprintf(after, sizeof(after), "%s", get(next, "after")->valuestring);
            snprintf(after_scope, sizeof(after_scope), "%s", get(next, "after_scope")->valuestring);
        }
        cJSON_Delete(doc);
        if (!more || ferror(stdout)) /* the reader gone: no page more (main says why) */
            break;
    }
    if (!c->json) {
        table_print(&t, stdout);
        if (shown == 0)
            printf("(no entries)\n");
    }
    (void)cmd;
    return EXIT_OK;
}

static const struct cmd cmds[] = {
    {"stats", "", "counters, rates, connections, queue, spool, DNS, Redis, objects",
     "Totals since start, rates over the last second and the last minute (in\n"
     "sluice's first minute over the time since start: \"last 12s\"),\n"
     "connections, queue depth, spool, DNS cache, delivery log, traffic shaping\n"
     "(with the actions ignored: of a kind or scope this node does not know)\n"
     "and live objects.",
     0, 0, run_plain},
    {"domains", "[N]", "the N busiest destinations (default 20, at most 1000)",
     "One row per destination, busiest first (ready + deferred + in flight +\n"
     "parked): what is queued by state (READY and INFLIGHT: jobs, a message's\n"
     "recipients at the destination; DEFERRED: recipients; PARKED: jobs set\n"
     "aside while their tenant or campaign is suspended), connections and the limit, the\n"
     "message rate allowed, totals, the age of the oldest waiting recipient\n"
     "(deferred ones too), whether it is suspended, the deferral class of most\n"
     "of its recipients waiting deferred now, with their count (TOP DEFERRAL),\n"
     "and why its limits are what they are.",
     0, 1, run_domains},
    {"sites", "[N]", "the N busiest sites (default 20, at most 1000)",
     "One row per site of a worker, busiest first (connections + ready + in\n"
     "flight). A site is the set of MX hosts its domains' answers name (or a\n"
     "route; a pool's sites are its own): its domains share its connections\n"
     "and its adaptive window. CONN connections open or opening, IDLE of\n"
     "those idle, WINDOW the connections the window allows now, MAX its\n"
     "ceiling (max_connections), DOMAINS the destinations on it and WAITING\n"
     "those waiting for a connection, READY and INFLIGHT their jobs, OPENED,\n"
     "FAILURES (connect failures, greeting timeouts, 421s, resets) and HALVED\n"
     "(window decreases) since the site was made; an idle site is forgotten\n"
     "with its last domain. HEAD the time from a transaction's MAIL to the go\n"
     "for its body (a moving average), with * while it says the connections\n"
     "wait in line at the receiver or at sluice: the window does not grow.",
     0, 1, run_sites},
    {"message", "ID", "a queued message and its recipients", NULL, 1, 1, run_plain},
    {"queue", "[N] [DOMAIN]", "the queued messages, oldest first, as mailq lists them",
     "The first N messages of the spool (default 100, at most 10000), or the\n"
     "first N with a recipient at DOMAIN: id, age, size, sender, and each\n"
     "recipient's state, attempts, next attempt and last reply. The listing\n"
     "stops at the Nth message; with a DOMAIN it reads the spool as far as it\n"
     "must. The answer holds about 8 MiB of messages at most (whole ones) and\n"
     "says so when it was cut there.",
     0, 2, run_plain},
    {"suspend", "DOMAIN | --tenant T | --campaign C | --pool P | --source ADDR [--for DURATION] [--local]",
     "stop deliveries of a scope (at once; queued mail waits)",
     "A domain (in every pool), a tenant's or a campaign's mail, a pool, or one\n"
     "source address of a pool. --for ends the suspension by itself (e.g. 30m).\n"
     "With shaping on, a domain, tenant or source is suspended on every node\n"
     "(a shaping action: shared through Redis, kept across restarts; see\n"
     "shaping list). A pool or campaign, and anything with --local, is suspended\n"
     "on this node only, in memory: a restart forgets it. A tenant or pool\n"
     "the config has no section for, or a source no pool has, is refused,\n"
     "with the names it has (a source suspended on every node through Redis\n"
     "may be another node's: taken, with a note).",
     1, 5, run_scoped},
    {"resume", "DOMAIN | --tenant T | --campaign C | --pool P | --source ADDR [--local]",
     "resume deliveries of a scope (on every node, or --local as suspend)", NULL, 1, 3,
     run_scoped},
    {"flush", "[DOMAIN | --tenant T [--campaign C] | --pool P]",
     "retry deferred recipients now (of DOMAIN, a tenant, a campaign, a pool, or all)",
     "--tenant, --campaign and --pool select the messages of that tenant, campaign\n"
     "or pool (as stored with each message at submission). The rests their\n"
     "destinations wait on (after a 421, or a host that was down) end too.",
     0, 4, run_scoped},
    {"bounce", "ID|DOMAIN | --tenant T [--campaign C] | --pool P",
     "bounce a message, or every message queued for DOMAIN, a tenant, a campaign or a pool",
     "A DOMAIN bounces the recipients at it: a message's others stay queued.\n"
     "Bounced recipients get a DSN to the sender (where enabled) and a bounce\n"
     "event in the delivery log. The answer waits (up to 8 s) for the bounce's\n"
     "commit: still_queued counts the selected recipients still in the spool then\n"
     "(deferred by a transaction under way: bounce again). This cannot be undone.",
     0, 4, run_scoped},
    {"reload", "", "reread the configuration file (as SIGHUP does)",
     "Waits (up to 8 s) for the outcome: \"reload done: changed\" and the\n"
     "sections and keys that changed (as the log's event=config_reloaded; a\n"
     "TLS or users file whose contents changed, \"[dkim] signing keys\"), or\n"
     "\"reload done: no change\"; then the keys that wait for a restart, if\n"
     "any; a users file that did not load (its first error, exit 1); or the\n"
     "first error\n"
     "(file:line: key) and exit 1 when the new configuration is refused and\n"
     "the running one kept; a reload not over by then prints \"reload\n"
     "requested (not finished yet: see the log)\" and exits 0.",
     0, 0, run_plain},
    {"tlsrpt", "[flush]", "MTA-STS policies and TLS reports (RFC 8461, RFC 8460)",
     "Counters of the MTA-STS store: domains known, policies cached (and in\n"
     "enforce mode), TXT checks, policy fetches and their failures, TLS reports\n"
     "sent and not sent. flush sends every pending TLS report now, today's too,\n"
     "rather than after the end of the UTC day.",
     0, 1, run_plain},
    {"events", "[pause|resume NAME]",
     "the event sinks (webhooks, Redis streams); pause or resume one",
     "One row per [events NAME] sink: events journaled and not yet acknowledged,\n"
     "the age of the oldest of them, events sent, failed attempts, events\n"
     "dropped past max_backlog, whether it is paused, and its last error.\n"
     "A paused sink keeps its backlog in the journal and resumes from its cursor.",
     0, 2, run_events},
    {"warmup", "", "IP warm-up: per source and destination group, today's allowance and use",
     "One row per [source] on a [warmup] plan and destination group (gmail,\n"
     "microsoft, yahoo, those the plan defines, other): the plan, the day of the\n"
     "plan (1 on warmup_start), today's allowance (unlimited past the schedule),\n"
     "messages taken today (with [redis]: by every node) and what is left (with\n"
     "[redis]: this node's reserved share).",
     0, 0, run_warmup},
    {"shaping", "[list | clear ID|SCOPE|all | suspend|backoff|cap:N|rate:R|bounce SCOPE for=DURATION]",
     "traffic shaping: actions started by receivers' replies, on every node",
     "  shaping [list]              active actions: id, action, scope, source, group or\n"
     "                              domain, the rule, time left, the node it started on,\n"
     "                              and the reply that triggered it\n"
     "  shaping clear ID|all        end actions now, on every node (also by\n"
     "  shaping clear source=A|group=G|domain=D|rule=R   scope or rule)\n"
     "  shaping ACTION source=A group=G for=DURATION\n"
     "  shaping ACTION group=G|domain=D for=DURATION\n"
     "  shaping suspend|rate:R|bounce tenant=T group=G for=DURATION\n"
     "                              an action by hand, on every node; ACTION:\n"
     "                              suspend, backoff, cap:N, rate:R (10/s, 600/min,\n"
     "                              or 0.5 of the configured rate; with source=\n"
     "                              that source only) or bounce\n\n"
     "Actions are shared through Redis (with [redis] url) and kept in the spool\n"
     "across restarts. Rules: etc/shaping.rules and [shaping] rules.",
     0, 6, run_shaping},
    {"metrics", "", "the Prometheus text exposition, as GET /metrics serves it", NULL, 0, 0,
     run_plain},
    {"suppress", "add|remove|check|list|import|export|purge ...",
     "the suppression list: recipients refused at RCPT",
     "  suppress add ADDRESS [--scope S] [--reason R] [--ttl DURATION] [--note TEXT]\n"
     "  suppress remove ADDRESS [--scope S]\n"
     "  suppress check ADDRESS [--scope S]\n"
     "  suppress list [--scope S] [--limit N]\n"
     "  suppress import FILE        (CSV; opened by sluicectl, with your rights)\n"
     "  suppress export FILE [--scope S]  (CSV; created by sluicectl, never over a\n"
     "                              file; sluice writes it)\n"
     "  suppress purge              (delete expired entries now)\n\n"
     "ADDRESS is user@domain, or @domain (or domain) for the whole domain. The scope\n"
     "is \"global\" (the default) or a tenant's name. REASON: hard_bounce, complaint,\n"
     "unsubscribe, manual (the default). --ttl: 30d, 12h, ...; none: for ever.\n"
     "CSV columns: address,scope,reason,added,expires,note (times ISO 8601 UTC or\n"
     "Unix seconds; empty: now / never).",
     1, 12, run_suppress},
    {"top", "[-n COUNT] [-d SECONDS]", "a live view of rates and the busiest destinations",
     "Refreshed every second (-d SECONDS: another delay, at least 0.1) until\n"
     "q or Ctrl-C, or COUNT views with -n. With --json: the stats and domains\n"
     "documents, one per line, at each refresh.",
     0, 4, run_top},
};
#define NCMDS (sizeof(cmds) / sizeof(cmds[0]))

static void
usage(FILE *f)
{
    fprintf(f,
            "usage: sluicectl [-s SOCKET] [--json] COMMAND [ARGS]\n"
            "       sluicectl COMMAND --help\n\n"
            "Talks to a running sluice through its stats socket.\n\n"
            "Options:\n"
            "  -s, --socket SOCKET  the stats socket (default: $SLUICE_SOCKET, else %s)\n"
            "  -j, --json           print the JSON answer as it came, one document a line\n"
            "  -h, --help           this help\n"
            "      --version        the version of sluicectl\n\n"
            "Commands:\n",
            DEFAULT_SOCKET);
    for (size_t i = 0; i < NCMDS; i++) {
        char left[256];
        int n = snprintf(left, sizeof(left), "%s %s", cmds[i].name, cmds[i].args);
        if (n > 34) /* the whole synopsis on its line, what it does under it */
            fprintf(f, "  %s\n  %-34s %s\n", left, "", cmds[i].about);
        else
            fprintf(f, "  %-34s %s\n", left, cmds[i].about);
    }
    fprintf(f, "\nExit status: 0 ok, 1 sluice refused, 2 usage, 3 socket unreachable.\n");
}

static void
cmd_help(const struct cmd *c)
{
    printf("usage: sluicectl [-s SOCKET] [--json] %s%s%s\n\n%s.\n", c->name, c->args[0] ? " " : "",
           c->args, c->about);
    if (c->more != NULL)
        printf("\n%s\n", c->more);
}

/* Insertions, deletions and substitutions from a to b, 3 for "far". */
static unsigned
edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 32 || lb > 32)
        return 3;
    unsigned row[33];
    for (size_t j = 0; j <= lb; j++)
        row[j] = (unsigned)j;
    for (size_t i = 1; i <= la; i++) {
        unsigned diag = row[0];
        row[0] = (unsigned)i;
        for (size_t j = 1; j <= lb; j++) {
            unsigned up = row[j];
            unsigned best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb] < 3 ? row[lb] : 3;
}

/* The command an unknown word is likely a slip for: one edit or two away
 * ("status", "domain"), or what Postfix and PowerMTA call it ("mailq",
 * "show"); NULL when none is near. */
static const char *
near_command(const char *w)
{
    static const char *const alias[][2] = {
        {"mailq", "queue"}, {"postqueue", "queue"}, {"show", "stats"}, {"status", "stats"},
        {"delete", "bounce"}, {"pause", "suspend"}, {"hold", "suspend"}, {"release", "resume"},
    };
    for (size_t k = 0; k < sizeof(alias) / sizeof(alias[0]); k++)
        if (strcasecmp(w, alias[k][0]) == 0)
            return alias[k][1];
    const char *best = NULL;
    unsigned bd = 3;
    for (size_t k = 0; k < NCMDS; k++) {
        unsigned d = edit_distance(w, cmds[k].name);
        if (d < bd && d < strlen(cmds[k].name) / 2 + 1) {
            bd = d;
            best = cmds[k].name;
        }
    }
    return best;
}

int
main(int argc, char **argv)
{
    struct ctl c = {.fd = -1, .pass_fd = -1};
    c.path = getenv("SLUICE_SOCKET");
    c.path_from = "from $SLUICE_SOCKET";
    if (c.path == NULL || c.path[0] == '\0') {
        c.path = DEFAULT_SOCKET;
        c.path_from = "the default; -s or $SLUICE_SOCKET names another";
    }
    signal(SIGPIPE, SIG_IGN);

    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        } else if (strcmp(a, "-s") == 0 || strcmp(a, "--socket") == 0) {
            if (i + 1 >= argc)
                die(EXIT_USAGE, "%s needs a socket path", a);
            c.path = argv[++i];
            c.path_from = "from -s";
        } else if (strncmp(a, "--socket=", 9) == 0) {
            c.path = a + 9;
            c.path_from = "from --socket";
        } else if (strcmp(a, "-j") == 0 || strcmp(a, "--json") == 0) {
            c.json = true;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return EXIT_OK;
        } else if (strcmp(a, "--version") == 0) {
            printf("sluicectl %s\n", SLUICE_VERSION);
            return EXIT_OK;
        } else {
            die(EXIT_USAGE, "unknown option \"%s\" (try: sluicectl --help)", a);
        }
    }
    if (i >= argc)
        die(EXIT_USAGE, "no command (try: sluicectl --help)");
    if (c.path[0] == '\0')
        die(EXIT_USAGE, "empty socket path");
    const struct cmd *cmd = NULL;
    for (size_t k = 0; k < NCMDS; k++)
        if (strcmp(argv[i], cmds[k].name) == 0)
            cmd = &cmds[k];
    if (cmd == NULL) {
        const char *near = near_command(argv[i]);
        if (near != NULL)
            die(EXIT_USAGE, "unknown command \"%s\" (did you mean \"%s\"? try: sluicectl --help)",
                argv[i], near);
        die(EXIT_USAGE, "unknown command \"%s\" (try: sluicectl --help)", argv[i]);
    }
    int cargc = argc - i - 1;
    char **cargv = argv + i + 1;
    for (int k = 0; k < cargc; k++) {
        if (strcmp(cargv[k], "--help") == 0 || strcmp(cargv[k], "-h") == 0) {
            cmd_help(cmd);
            return EXIT_OK;
        }
    }
    for (int k = 0; k < cargc; k++) {
        const char *a = cargv[k];
        if (strcmp(a, "-s") == 0 || strcmp(a, "--socket") == 0 ||
            strncmp(a, "--socket=", 9) == 0 || strcmp(a, "-j") == 0 || strcmp(a, "--json") == 0)
            die(EXIT_USAGE, "%s: %s goes before the command (sluicectl %s %s ...)", cmd->name, a,
                a[1] == 's' || a[2] == 's' ? "-s SOCKET" : "--json", cmd->name);
    }
    if (cmd->run != run_top && cmd->run != run_scoped && cmd->run != run_suppress) {
        for (int k = 0; k < cargc; k++)
            if (cargv[k][0] == '-')
                die(EXIT_USAGE, "%s: unknown option \"%s\"", cmd->name, cargv[k]);
    }
    if (cargc < cmd->min || cargc > cmd->max)
        die(EXIT_USAGE, "%s: %s (usage: sluicectl %s%s%s)", cmd->name,
            cargc < cmd->min ? "missing argument" : "too many arguments", cmd->name,
            cmd->args[0] ? " " : "", cmd->args);
    int rc = cmd->run(&c, cmd, cargc, cargv);
    ctl_close(&c);
    /* A write that failed before (stdio's buffer full) leaves only the
     * error flag: its errno is gone, a full disk says so all the same. */
    bool flushed = fflush(stdout) == 0;
    int err = errno;
    if (!flushed || ferror(stdout)) {
        if (output_reader_gone())
            return rc; /* sluicectl queue | head: the reader took what it wanted */
        die(EXIT_UNREACHABLE, "cannot write the output%s%s", flushed ? " (a write failed)" : ": ",
            flushed ? "" : strerror(err));
    }
    return rc;
}
