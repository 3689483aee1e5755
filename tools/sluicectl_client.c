/*
 * sluicectl_client: sluicectl's side of the stats socket: connecting
 * (saying why it cannot), sending one command line and reading its one
 * JSON answer line within the timeout, with the descriptor of a suppress
 * import or export passed along (SCM_RIGHTS); ctl_ask's refusal (an
 * export's "File exists" from a sluice older than the passing said as
 * such); die()
 * and the signals, the export's file made here and removed by every exit
 * before sluice answered it ok.
 *
 * Threading: one thread; the signal handlers touch only interrupted and
 * the made file (lstat, unlink).
 */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/clock.h"
#include "tools/sluicectl_int.h"

volatile sig_atomic_t interrupted;

/* The file made for an export until sluice answered it ok: removed by
 * every exit before that (a refusal, a closed connection, a timeout, an
 * interrupt), as an export that failed leaves no file. A global because
 * die() ends the process from anywhere; suppress export makes it. */
struct made made;

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
void
on_signal_made(int sig)
{
    made_remove();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Hold (block true) or let through again the signals of on_signal_made,
 * while made changes. */
void
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

void
on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

/* One line on stderr, then exit. */
void
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
bool
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

void
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

void
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
cJSON *
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
    /* An export's file made here and refused as "File exists" in the
     * old form ("suppress: PATH: ..."): a sluice older than this
     * sluicectl, which takes no descriptor and makes the file itself,
     * found the one made for it. Said, since "File exists" of a file
     * sluicectl itself made (and now removes) tells the user nothing. */
    if (made.path[0] != '\0' && cJSON_IsString(e)) {
        const char *m = e->valuestring, *x = strerror(EEXIST);
        size_t ml = strlen(m), xl = strlen(x);
        if (strncmp(m, "suppress: /", 11) == 0 && ml > 11 + 2 + xl &&
            strncmp(m + ml - xl - 2, ": ", 2) == 0 &&
            strcmp(m + ml - xl, x) == 0)
            fprintf(stderr,
                    "sluicectl: this sluice is older than sluicectl: it takes no file passed "
                    "and makes an export's file itself, with its own rights, so it found the "
                    "one sluicectl made (removed now; restart sluice on this version, or use "
                    "the sluicectl of sluice's version)\n");
    }
    /* Arguments sluicectl passes on as typed (shaping, tlsrpt): sluice's
     * "usage: ..." is a usage error, as one found here is. */
    bool usage = cJSON_IsString(e) && strncmp(e->valuestring, "usage: ", 7) == 0;
    cJSON_Delete(doc);
    ctl_close(c);
    made_remove(); /* sluice has answered: it writes no more */
    exit(usage ? EXIT_USAGE : EXIT_REFUSED);
}
