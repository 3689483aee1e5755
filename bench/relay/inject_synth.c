/*
 * inject_synth: the synthetic injector of bench/relay/bench_sites.py, in
 * C. Issue 14 asks for "smtp-source into sluice", but smtp-source sends
 * every message to the one recipient address it is given (-t), and the
 * sites grid needs message k addressed to r<k>@d<k mod D>.<zone>; hence a
 * synthetic injector. The Python one (bench_sites.py's inject()) took 3
 * to 5 s of CPU per 20,000 messages from the two cores that sluice and the
 * receivers share; this one sends the same messages, shaped the same way,
 * for a fraction of that.
 *
 * What goes over the wire, per session, is what the Python injector
 * sends: EHLO, then for each of its messages MAIL, RCPT and DATA in one
 * write (PIPELINING, RFC 2920), the body once 354 came back, then the
 * next message once the body's 250 came back; QUIT at the end. Message k
 * (k = 0 .. N-1) goes on session k mod S, from <bench@example.com> to
 * <r<k>@d<k mod D>.<zone>>; its body is "Subject: bench", an empty line
 * and max(1, size / 78) lines of 76 x's.
 *
 *   inject_synth --port P [--host 127.0.0.1] [--messages 20000]
 *                [--sessions 50] [--size 2048] [--domains 1]
 *                [--zone test] [--timeout 120]
 *
 * Every reply is parsed (multi-line replies included) and checked: a
 * transaction whose MAIL or RCPT is refused is reset (RSET) and counted
 * as not accepted; a greeting other than 220, an EHLO without PIPELINING,
 * a 421, a closed connection or a reply not seen within --timeout seconds
 * ends the session, whose remaining messages count as not accepted. One
 * thread, poll(2) over the sessions, non-blocking sockets, fixed buffers.
 *
 * Prints one line when done:
 *   inject_synth: messages=N accepted=A secs=S msg_s=R cpu_s=C
 * (cpu_s: its own user + system CPU, from getrusage), and on stderr the
 * first errors. Exits 0 when every message was accepted with 250, 1 when
 * any was not, 2 on bad arguments.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/clock.h"

#define MAX_SESSIONS 10000
#define MAX_ERRORS   10   /* printed; the rest only counted */
#define RBUF_SIZE    4096 /* one reply line is at most 512 octets (RFC 5321 4.5.3.1.5) */
#define CMD_SIZE     1024
#define MAX_PENDING  8 /* commands awaiting a reply: RSET MAIL RCPT DATA at most */

/* What a reply answers, oldest first: the session's FIFO of commands. */
enum cmd { CMD_GREETING, CMD_EHLO, CMD_RSET, CMD_MAIL, CMD_RCPT, CMD_DATA, CMD_DOT, CMD_QUIT };

enum state {
    ST_CONNECTING, /* non-blocking connect in progress */
    ST_OPEN,       /* replies expected (the FIFO says to what) */
    ST_DONE,       /* QUIT answered or the server closed after it */
    ST_FAILED,     /* ended before its messages were all sent */
};

struct session {
    int fd;
    unsigned idx;
    enum state state;
    unsigned next_msg; /* the next message number this session sends */
    unsigned in_msg;   /* the message number in flight */
    int msg_bad;       /* MAIL or RCPT of the message in flight refused */
    int saw_pipelining;
    enum cmd pending[MAX_PENDING];
    unsigned npending;
    char rbuf[RBUF_SIZE];
    size_t rlen;
    char cmd[CMD_SIZE]; /* the last command group, until written */
    const char *out;    /* borrowed: cmd or the shared body */
    size_t outlen, outoff;
    double last; /* monotonic seconds of the last progress */
};

struct opts {
    const char *host;
    const char *port;
    unsigned messages, sessions, size, domains, timeout;
    const char *zone;
};

static struct opts opt = {"127.0.0.1", NULL, 20000, 50, 2048, 1, 120, "test"};
static char *body; /* owned: the message, ending in CRLF.CRLF */
static size_t bodylen;
static unsigned accepted, errors;

static const char *
cmd_str(enum cmd c)
{
    static const char *const names[] = {"greeting", "EHLO", "RSET",        "MAIL",
                                        "RCPT",     "DATA", "end of data", "QUIT"};
    return names[c];
}

static double
now_s(void)
{
    return (double)clock_mono_ns() / 1e9;
}

static void
report(struct session *s, const char *fmt, ...)
{
    errors++;
    if (errors > MAX_ERRORS)
        return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "inject_synth: session %u: ", s->idx);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    if (errors == MAX_ERRORS)
        fprintf(stderr, "inject_synth: further errors counted, not printed\n");
}

/* Ends s: its remaining messages are not sent (they count as not accepted). */
static void
session_fail(struct session *s)
{
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
    s->state = ST_FAILED;
}

static int
session_queue(struct session *s, const char *data, size_t len, const enum cmd *cmds, unsigned n)
{
    if (s->outoff < s->outlen || s->npending + n > MAX_PENDING) {
        report(s, "internal: a command group queued while another is unsent");
        session_fail(s);
        return -1;
    }
    s->out = data;
    s->outlen = len;
    s->outoff = 0;
    for (unsigned i = 0; i < n; i++)
        s->pending[s->npending++] = cmds[i];
    return 0;
}

/* The next message's MAIL, RCPT and DATA in one group (RSET first after a
 * refused transaction), or QUIT when this session has sent its share. */
static void
session_next(struct session *s, int rset)
{
    enum cmd cmds[4];
    unsigned n = 0;
    int len = 0;
    if (rset) {
        len = snprintf(s->cmd, sizeof(s->cmd), "RSET\r\n");
        cmds[n++] = CMD_RSET;
    }
    if (s->next_msg >= opt.messages) {
        len += snprintf(s->cmd + len, sizeof(s->cmd) - (size_t)len, "QUIT\r\n");
        cmds[n++] = CMD_QUIT;
    } else {
        unsigned k = s->next_msg;
        s->in_msg = k;
        s->next_msg += opt.sessions;
        s->msg_bad = 0;
        len += snprintf(s->cmd + len, sizeof(s->cmd) - (size_t)len,
                        "MAIL FROM:<bench@example.com>\r\nRCPT TO:<r%u@d%u.%s>\r\nDATA\r\n", k,
                        k % opt.domains, opt.zone);
        cmds[n++] = CMD_MAIL;
        cmds[n++] = CMD_RCPT;
        cmds[n++] = CMD_DATA;
    }
    session_queue(s, s->cmd, (size_t)len, cmds, n);
}

/* One complete reply: code and its last line (for errors). */
static void
session_on_reply(struct session *s, unsigned code, const char *line)
{
    if (s->npending == 0) {
        report(s, "reply with no command outstanding: %s", line);
        session_fail(s);
        return;
    }
    enum cmd c = s->pending[0];
    memmove(s->pending, s->pending + 1, (s->npending - 1) * sizeof(s->pending[0]));
    s->npending--;
    if (code == 421 && c != CMD_QUIT) {
        report(s, "%s: %s (message r%u)", cmd_str(c), line, s->in_msg);
        session_fail(s);
        return;
    }
    switch (c) {
    case CMD_GREETING: {
        static const enum cmd ehlo = CMD_EHLO;
        if (code != 220) {
            report(s, "greeting: %s", line);
            session_fail(s);
            return;
        }
        snprintf(s->cmd, sizeof(s->cmd), "EHLO bench\r\n");
        session_queue(s, s->cmd, strlen(s->cmd), &ehlo, 1);
        return;
    }
    case CMD_EHLO:
        if (code != 250) {
            report(s, "EHLO: %s", line);
            session_fail(s);
        } else if (!s->saw_pipelining) {
            report(s, "the server does not offer PIPELINING (RFC 2920): %s", line);
            session_fail(s);
        } else {
            session_next(s, 0);
        }
        return;
    case CMD_RSET:
        if (code != 250) {
            report(s, "RSET: %s", line);
            session_fail(s);
        }
        return;
    case CMD_MAIL:
    case CMD_RCPT:
        if (code != 250) {
            report(s, "message r%u: %s: %s", s->in_msg, cmd_str(c), line);
            s->msg_bad = 1;
        }
        return;
    case CMD_DATA:
        if (code == 354 && !s->msg_bad) {
            static const enum cmd dot = CMD_DOT;
            session_queue(s, body, bodylen, &dot, 1);
        } else if (code == 354) {
            report(s, "message r%u: DATA accepted after a refused envelope: %s", s->in_msg, line);
            session_fail(s);
        } else {
            if (!s->msg_bad)
                report(s, "message r%u: DATA: %s", s->in_msg, line);
            session_next(s, 1);
        }
        return;
    case CMD_DOT:
        if (code == 250)
            accepted++;
        else
            report(s, "message r%u: end of data: %s", s->in_msg, line);
        session_next(s, 0);
        return;
    case CMD_QUIT:
        close(s->fd);
        s->fd = -1;
        s->state = ST_DONE;
        return;
    }
}

/* Complete lines in rbuf: a reply ends at a line "ddd " (or "ddd" alone). */
static void
session_parse(struct session *s)
{
    size_t start = 0;
    for (;;) {
        if (s->state != ST_OPEN)
            return;
        char *nl = memchr(s->rbuf + start, '\n', s->rlen - start);
        if (!nl)
            break;
        char *line = s->rbuf + start;
        size_t len = (size_t)(nl - line);
        start += len + 1;
        if (len > 0 && line[len - 1] == '\r')
            len--;
        line[len] = '\0';
        if (len < 3 || line[0] < '2' || line[0] > '5' || line[1] < '0' || line[1] > '9' ||
            line[2] < '0' || line[2] > '9' || (len > 3 && line[3] != ' ' && line[3] != '-')) {
            report(s, "not an SMTP reply line: %.80s", line);
            session_fail(s);
            return;
        }
        if (s->npending && s->pending[0] == CMD_EHLO && len >= 14 &&
            strncasecmp(line + 4, "PIPELINING", 10) == 0 && (len == 14 || line[14] == ' '))
            s->saw_pipelining = 1;
        if (len > 3 && line[3] == '-')
            continue;
        unsigned code = (unsigned)(line[0] - '0') * 100 + (unsigned)(line[1] - '0') * 10 +
                        (unsigned)(line[2] - '0');
        session_on_reply(s, code, line);
    }
    if (s->state != ST_OPEN)
        return;
    memmove(s->rbuf, s->rbuf + start, s->rlen - start);
    s->rlen -= start;
    if (s->rlen == sizeof(s->rbuf) - 1) {
        report(s, "a reply line longer than %zu octets", sizeof(s->rbuf) - 1);
        session_fail(s);
    }
}

static void
session_on_readable(struct session *s)
{
    ssize_t n = recv(s->fd, s->rbuf + s->rlen, sizeof(s->rbuf) - 1 - s->rlen, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        const char *what = s->npending ? cmd_str(s->pending[0]) : "nothing";
        if (n == 0)
            report(s, "connection closed by the server while waiting for the reply to %s", what);
        else
            report(s, "recv while waiting for the reply to %s: %s", what, strerror(errno));
        session_fail(s);
        return;
    }
    s->rlen += (size_t)n;
    s->last = now_s();
    session_parse(s);
}

static void
session_on_writable(struct session *s)
{
    if (s->state == ST_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof(err);
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            report(s, "connect to %s port %s: %s", opt.host, opt.port, strerror(err));
            session_fail(s);
            return;
        }
        s->state = ST_OPEN;
        s->last = now_s();
        return;
    }
    while (s->outoff < s->outlen) {
        ssize_t n = send(s->fd, s->out + s->outoff, s->outlen - s->outoff, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n < 0) {
            report(s, "send: %s", strerror(errno));
            session_fail(s);
            return;
        }
        s->outoff += (size_t)n;
        s->last = now_s();
    }
}

static int
parse_uint(const char *name, const char *v, unsigned lo, unsigned hi, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long x = strtoul(v, &end, 10);
    if (errno || *v == '\0' || *end != '\0' || *v == '-' || x < lo || x > hi) {
        fprintf(stderr, "inject_synth: %s wants a number from %u to %u, not '%s'\n", name, lo, hi,
                v);
        return -1;
    }
    *out = (unsigned)x;
    return 0;
}

static int
parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i += 2) {
        const char *k = argv[i];
        if (i + 1 >= argc) {
            fprintf(stderr, "inject_synth: %s needs a value\n", k);
            return -1;
        }
        const char *v = argv[i + 1];
        int r = 0;
        if (strcmp(k, "--host") == 0)
            opt.host = v;
        else if (strcmp(k, "--port") == 0)
            opt.port = v;
        else if (strcmp(k, "--zone") == 0)
            opt.zone = v;
        else if (strcmp(k, "--messages") == 0)
            r = parse_uint(k, v, 1, 100000000, &opt.messages);
        else if (strcmp(k, "--sessions") == 0)
            r = parse_uint(k, v, 1, MAX_SESSIONS, &opt.sessions);
        else if (strcmp(k, "--size") == 0)
            r = parse_uint(k, v, 0, 100 << 20, &opt.size);
        else if (strcmp(k, "--domains") == 0)
            r = parse_uint(k, v, 1, 100000000, &opt.domains);
        else if (strcmp(k, "--timeout") == 0)
            r = parse_uint(k, v, 1, 3600, &opt.timeout);
        else {
            fprintf(stderr, "inject_synth: unknown option %s\n", k);
            return -1;
        }
        if (r < 0)
            return -1;
    }
    if (!opt.port) {
        fprintf(stderr, "inject_synth: --port is required\n");
        return -1;
    }
    /* a recipient is r<k>@d<j>.<zone>: 20 + 2 * 10 digits + the zone */
    if (strlen(opt.zone) == 0 || strlen(opt.zone) > 200) {
        fprintf(stderr, "inject_synth: --zone must have 1 to 200 characters\n");
        return -1;
    }
    if (opt.sessions > opt.messages)
        opt.sessions = opt.messages;
    return 0;
}

static int
make_body(void)
{
    static const char head[] = "Subject: bench\r\n\r\n";
    size_t lines = opt.size / 78 ? opt.size / 78 : 1;
    bodylen = sizeof(head) - 1 + lines * 78 + 3;
    body = malloc(bodylen);
    if (!body)
        return -1;
    char *p = body;
    memcpy(p, head, sizeof(head) - 1);
    p += sizeof(head) - 1;
    for (size_t i = 0; i < lines; i++) {
        memset(p, 'x', 76);
        p[76] = '\r';
        p[77] = '\n';
        p += 78;
    }
    memcpy(p, ".\r\n", 3);
    return 0;
}

int
main(int argc, char **argv)
{
    if (parse_args(argc, argv) < 0)
        return 2;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai;
    int gr = getaddrinfo(opt.host, opt.port, &hints, &ai);
    if (gr != 0) {
        fprintf(stderr, "inject_synth: --host %s --port %s: %s\n", opt.host, opt.port,
                gai_strerror(gr));
        return 2;
    }
    struct session *ss = calloc(opt.sessions, sizeof(*ss));
    struct pollfd *pf = calloc(opt.sessions, sizeof(*pf));
    if (!ss || !pf || make_body() < 0) {
        fprintf(stderr, "inject_synth: out of memory\n");
        return 2;
    }
    double t0 = now_s();
    for (unsigned i = 0; i < opt.sessions; i++) {
        struct session *s = &ss[i];
        s->idx = i;
        s->next_msg = i;
        s->last = t0;
        s->pending[s->npending++] = CMD_GREETING;
        s->fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (s->fd < 0) {
            report(s, "socket: %s", strerror(errno));
            s->state = ST_FAILED;
            continue;
        }
        s->state = ST_CONNECTING;
        if (connect(s->fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            s->state = ST_OPEN;
        } else if (errno != EINPROGRESS) {
            report(s, "connect to %s port %s: %s", opt.host, opt.port, strerror(errno));
            session_fail(s);
        }
    }
    freeaddrinfo(ai);

    /* Each turn either makes progress on a session or waits at most a
     * second; a session without progress for --timeout seconds ends, so
     * the loop ends within messages x timeout at the very worst. */
    for (;;) {
        unsigned n = 0;
        for (unsigned i = 0; i < opt.sessions; i++) {
            struct session *s = &ss[i];
            if (s->state != ST_CONNECTING && s->state != ST_OPEN)
                continue;
            pf[n].fd = s->fd;
            pf[n].events = s->state == ST_CONNECTING ? POLLOUT
                           : s->outoff < s->outlen   ? POLLIN | POLLOUT
                                                     : POLLIN;
            pf[n].revents = 0;
            n++;
        }
        if (n == 0)
            break;
        int r = poll(pf, n, 1000);
        if (r < 0 && errno != EINTR) {
            fprintf(stderr, "inject_synth: poll: %s\n", strerror(errno));
            return 1;
        }
        double now = now_s();
        unsigned j = 0;
        for (unsigned i = 0; i < opt.sessions && j < n; i++) {
            struct session *s = &ss[i];
            if (s->state != ST_CONNECTING && s->state != ST_OPEN)
                continue;
            short ev = pf[j++].revents;
            if (ev & (POLLOUT | POLLERR | POLLHUP) && s->state == ST_CONNECTING)
                session_on_writable(s);
            else if (ev & POLLOUT)
                session_on_writable(s);
            if (s->state == ST_OPEN && ev & (POLLIN | POLLERR | POLLHUP))
                session_on_readable(s);
            if (s->state == ST_OPEN && s->outoff < s->outlen)
                session_on_writable(s); /* what a reply just queued */
            if ((s->state == ST_OPEN || s->state == ST_CONNECTING) && now - s->last > opt.timeout) {
                report(s, "no progress in %u s (waiting for the reply to %s)", opt.timeout,
                       s->npending ? cmd_str(s->pending[0]) : "nothing");
                session_fail(s);
            }
        }
    }
    double secs = now_s() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    printf("inject_synth: messages=%u accepted=%u secs=%.3f msg_s=%.0f cpu_s=%.3f\n", opt.messages,
           accepted, secs, secs > 0 ? accepted / secs : 0.0, cpu);
    if (accepted < opt.messages)
        fprintf(stderr, "inject_synth: %u of %u messages not accepted with 250\n",
                opt.messages - accepted, opt.messages);
    for (unsigned i = 0; i < opt.sessions; i++)
        if (ss[i].fd >= 0)
            close(ss[i].fd);
    free(ss);
    free(pf);
    free(body);
    return accepted == opt.messages ? 0 : 1;
}
