/*
 * stats: the stats thread of stats.h: the Unix socket's line protocol,
 * the HTTP listener (GET /metrics for Prometheus; GET / the status page,
 * engine/stats_page.html, and GET /status.json the live state it shows)
 * and the rates. HTTP is read only: this file reads its requests and
 * sends its answers, engine/stats_http.c makes them (status.json and the
 * metrics asked of render_status and metrics_text here). The answers'
 * JSON is rendered by engine/stats_render.c, the Prometheus text by
 * engine/stats_metrics.c.
 *
 * One poll(2) loop on a thread of its own, never a worker: it may block
 * in an engine callback for a moment, so it is kept off the rings. The
 * engine's commands (ops->command: flush, bounce, reload, ...; seconds
 * to minutes for a big queue) go to a second thread, the command thread
 * of engine/stats_cmd.c, one at a time; their client waits, unpolled but
 * for a hang-up, while this loop goes on answering stats, domains,
 * metrics and HTTP. Every
 * client has fixed buffers for its input (STATS_HTTP_REQUEST_MAX) and
 * one answer at a time for its output: the next command of a connection
 * is read only once the previous answer went out, so a client that
 * pipelines and never reads costs one answer of memory, not an unbounded
 * queue.
 *
 * A connection that must close (line too long, HTTP answered) is not
 * closed at once: its answer is sent, the write side shut, and what the
 * peer still sends is read and dropped for a moment. Closing a socket
 * with unread input makes the kernel send a reset, which can destroy the
 * answer before the peer read it (the "lingering close" of HTTP servers).
 *
 * Clients are bounded in time as in number (stats.h): a request must be
 * whole within STATS_REQUEST_MS of its start whatever its octets do, an
 * answer sent within STATS_ANSWER_MS; client_rearm() is the one place a
 * deadline is set. The socket and HTTP have pools of their own, and a
 * full pool makes room by closing its oldest waiting client.
 *
 * A socket client may pass one descriptor with a command line
 * (SCM_RIGHTS; stats.h, struct stats_caller): a file it opened with its
 * own rights, which "suppress import" reads and "export" writes, so that
 * sluice never opens a path for a client (engine/ops_suppress.c). It is
 * received close-on-exec, held by the client until the line whose octets
 * it came with ends (client_line_fd), then owned by the command's job.
 * Anything else (two descriptors, a cut control message, a second one
 * before the first was used) closes every descriptor received and the
 * connection, with an error.
 *
 * At the stop, this thread goes on answering until the command under
 * way (a bounce or a flush the stop cut, which says so) has ended; a
 * command sent meanwhile is answered "sluice is stopping: the command
 * was not run". Then the socket's path is removed and the listeners
 * closed, and what is left to answer is sent to its clients before they
 * are closed (stop_answers), within STOP_ANSWER_MS.
 *
 * Threading: the struct is written by the stats thread only, after
 * stats_server_new() handed it over; stats_server_free() stops the
 * thread through an eventfd and joins it before touching anything.
 */
#include "engine/stats.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/stats_cmd.h"
#include "engine/stats_int.h"

#define SAMPLE_MS    1000
#define RATE_SAMPLES 61    /* the newest and the one 60 s before it */
#define LINGER_MS    2000  /* how long a closing connection drains input */
#define LINGER_BYTES 65536 /* and how much of it */
#define STATS_PAGE_DOMAINS 25 /* destinations in the status page's table */
#define PASS_FDS_ROOM      8  /* descriptors one recvmsg takes, to close those past the first */
#define STOP_ANSWER_MS     1000  /* the stop's sending of the last answers, all clients */

/* ---- rates ---- */

enum { R_RECEIVED, R_DELIVERED, R_DEFERRED, R_BOUNCED, R_EXPIRED, R_COUNT };

struct rate_sample {
    uint64_t t_ms; /* monotonic */
    uint64_t v[R_COUNT];
};

static void
rates_between(const struct rate_sample *a, const struct rate_sample *b, struct stats_rates *r)
{
    memset(r, 0, sizeof(*r));
    if (b->t_ms <= a->t_ms)
        return;
    double secs = (double)(b->t_ms - a->t_ms) / 1000.0;
    double out[R_COUNT];
    for (int i = 0; i < R_COUNT; i++) /* a counter that went back (a reset) counts as 0 */
        out[i] = b->v[i] >= a->v[i] ? (double)(b->v[i] - a->v[i]) / secs : 0;
    r->received = out[R_RECEIVED];
    r->delivered = out[R_DELIVERED];
    r->deferred = out[R_DEFERRED];
    r->bounced = out[R_BOUNCED];
    r->expired = out[R_EXPIRED];
    r->window_ms = b->t_ms - a->t_ms;
    r->known = true;
}

/* ---- the server ---- */

enum client_kind { CLIENT_CTL, CLIENT_HTTP };

struct client {
    int fd; /* owned; -1: the slot is free */
    enum client_kind kind;
    bool closing;  /* close once out is sent */
    bool draining; /* write side shut: drop input until EOF or the deadline */
    bool eof;      /* the peer shut its write side */
    bool waiting;  /* its command is with the command thread: not polled until answered */
    uint64_t gen;  /* which client of the slot: a late answer finds its own or none */
    uid_t uid;     /* the peer's (SO_PEERCRED); STATS_UID_NONE: unknown, or HTTP */
    int pass_fd;   /* owned: a descriptor passed, not yet given to its line; -1: none */
    size_t pass_at;    /* where in in[] the octets that came with it end */
    bool pass_refused; /* descriptors came as the protocol does not allow: error, close */
    size_t inlen, drained;
    uint64_t deadline;  /* monotonic ms: dropped then (client_rearm) */
    uint64_t req_start; /* the request under way began (accept or its first
                           octet); 0: none, idle between requests */
    uint64_t answer_at; /* the answer being sent was made */
    uint64_t last_io;   /* last octet in or out */
    struct json out;   /* the answer being sent */
    size_t outoff;
    char in[STATS_HTTP_REQUEST_MAX];
};

struct stats_server {
    struct stats_ops ops;
    unsigned top_n;
    int wake_fd, ctl_fd, http_fd; /* owned; -1: none */
    unsigned http_port;
    char *path; /* owned */
    dev_t dev;  /* of the socket file made, so that free removes only that */
    ino_t ino;
    atomic_uint idle_ms;
    pthread_t thread;
    bool started;
    struct rate_sample ring[RATE_SAMPLES];
    unsigned ring_n, ring_head;
    uint64_t next_sample;
    struct stats_cmd *cmd; /* owned: the command thread (stats_cmd.c) */
    unsigned cmd_queued;   /* commands handed to it and not answered yet */
    uint64_t next_gen;
    struct stats_domain *doms; /* owned, ndoms_cap entries */
    size_t ndoms_cap;
    uint64_t evict_logged; /* monotonic ms of the last event=stats_client_evicted */
    unsigned evicted;      /* since then */
    struct client clients[STATS_CLIENTS_MAX]; /* the socket's first, then HTTP's */
};

static void errf(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
errf(char *err, size_t errlen, const char *fmt, ...)
{
    if (errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void
gather_counters(struct stats_server *s, struct stats_counters *c)
{
    memset(c, 0, sizeof(*c));
    if (s->ops.counters != NULL)
        s->ops.counters(s->ops.arg, c);
}

static size_t
gather_domains(struct stats_server *s, size_t cap)
{
    if (s->ops.domains == NULL || cap == 0)
        return 0;
    if (cap > s->ndoms_cap) {
        struct stats_domain *p = realloc(s->doms, cap * sizeof(*p));
        if (p == NULL)
            return 0;
        s->doms = p;
        s->ndoms_cap = cap;
    }
    memset(s->doms, 0, cap * sizeof(*s->doms));
    size_t n = s->ops.domains(s->ops.arg, s->doms, cap);
    return n < cap ? n : cap;
}

static void
rates_sample(struct stats_server *s, uint64_t now)
{
    struct stats_counters c;
    gather_counters(s, &c);
    struct rate_sample *p = &s->ring[s->ring_head];
    p->t_ms = now;
    p->v[R_RECEIVED] = c.received_msgs;
    p->v[R_DELIVERED] = c.delivered;
    p->v[R_DEFERRED] = c.deferred;
    p->v[R_BOUNCED] = c.bounced;
    p->v[R_EXPIRED] = c.expired;
    s->ring_head = (s->ring_head + 1) % RATE_SAMPLES;
    if (s->ring_n < RATE_SAMPLES)
        s->ring_n++;
}

/* The back-th newest sample (1: the newest; at most ring_n). */
static const struct rate_sample *
rates_back(const struct stats_server *s, unsigned back)
{
    return &s->ring[(s->ring_head + RATE_SAMPLES - back) % RATE_SAMPLES];
}

/* The last second's rates are from the newest sample and the newest one
 * at least half a period (SAMPLE_MS / 2) before it, not always the one
 * before: the samples keep their schedule, so one the thread took late
 * (a callback or an answer held it) is followed by the next a moment
 * after, and a rate over those few ms is noise (one delivery in 5 ms
 * reads as 200 a second). Two samples apart are more than SAMPLE_MS
 * apart (each is taken at its time or later, and the next is due a
 * period after that time or after a late one; the second is due a
 * period after the first), so the walk goes back two samples at most.
 * The minute's: from the oldest kept. */
static void
rates_get(const struct stats_server *s, struct stats_rates *r1s, struct stats_rates *r1m)
{
    memset(r1s, 0, sizeof(*r1s));
    memset(r1m, 0, sizeof(*r1m));
    if (s->ring_n < 2)
        return;
    const struct rate_sample *newest = rates_back(s, 1);
    for (unsigned back = 2; back <= s->ring_n; back++) {
        const struct rate_sample *p = rates_back(s, back);
        if (newest->t_ms - p->t_ms >= SAMPLE_MS / 2) {
            rates_between(p, newest, r1s);
            break;
        }
    }
    rates_between(rates_back(s, s->ring_n), newest, r1m);
}

/* ---- the line protocol ---- */

int
stats_parse_top(const char *args, unsigned long *n)
{
    *n = STATS_DOMAINS_DEFAULT;
    if (args[0] == '\0')
        return 0;
    char *end;
    errno = 0;
    unsigned long v = strtoul(args, &end, 10);
    if (args[0] < '0' || args[0] > '9' || *end != '\0' || errno != 0 || v == 0 ||
        v > STATS_DOMAINS_MAX)
        return -1;
    *n = v;
    return 0;
}

struct command {
    const char *verb, *args, *about;
    unsigned min_args, max_args;
    bool engine; /* answered by ops->command */
};

static const struct command commands[] = {
    {"stats", "", "counters, rates, connections, queue, spool, DNS, Redis, objects", 0, 0, false},
    {"domains", "[N]", "the N busiest destinations (default 20, at most 1000)", 0, 1, false},
    {"sites", "[N]",
     "the N busiest sites (default 20, at most 1000): the MX hosts domains share connections "
     "at, with their adaptive windows",
     0, 1, true},
    {"message", "ID", "a queued message and its recipients", 1, 1, true},
    {"queue", "[N] [DOMAIN]",
     "the first N queued messages (oldest first; default 100, at most 10000), or those with "
     "a recipient at DOMAIN, each with its recipients",
     0, 2, true},
    {"suspend", "SCOPE [for=DURATION]",
     "stop deliveries of a scope: DOMAIN, domain=D, tenant=T, campaign=C, pool=P or source=ADDR",
     1, 16, true},
    {"resume", "SCOPE", "resume deliveries of a scope (as suspend)", 1, 16, true},
    {"flush", "[DOMAIN|tenant=T [campaign=C]|pool=P]",
     "retry deferred recipients now (of DOMAIN, of a tenant, campaign or pool, or all)", 0, 16,
     true},
    {"bounce", "ID|DOMAIN|tenant=T [campaign=C]|pool=P",
     "bounce a message, or every message queued for DOMAIN, a tenant, campaign or pool", 1, 16,
     true},
    {"reload", "", "reread the configuration file", 0, 0, true},
    {"events", "[pause|resume NAME]", "the event sinks; pause or resume one", 0, 2, true},
    {"suppress", "add|remove|check|list|import|export|purge ...",
     "the suppression list (see doc/sluicectl.md)", 1, 64, true},
    {"warmup", "", "warm-up plans: per source and group the day, allowance, taken, left", 0, 8,
     true},
    {"shaping", "[list|clear ID|SCOPE|all|suspend|backoff|cap:N SCOPE for=DURATION]",
     "traffic-shaping actions on every node: list them, clear them (by id, source=A, group=G, "
     "domain=D, tenant=T, rule=R or all), or start one by hand (source=A group=G | tenant=T "
     "group=G | group=G | domain=D)",
     0, 8, true},
    {"tlsrpt", "[flush]",
     "MTA-STS policies and TLS reports: counters; flush sends every pending report now", 0, 1,
     true},
    {"metrics", "", "the Prometheus text exposition, as \"text\"", 0, 0, false},
    {"help", "", "this list", 0, 0, false},
};

static void answer_errorf(struct json *out, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
answer_errorf(struct json *out, const char *fmt, ...)
{
    char b[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof(b), fmt, ap);
    va_end(ap);
    stats_answer_error(out, b);
}

/* The words of args against a command's bounds. A word that opens with
 * a quote runs to its closing one (a backslash takes the octet after it)
 * and on to the next blank, as ops_suppress.c's word_len reads it: a
 * suppress import's or export's path with blanks comes quoted, and
 * counted blank by blank a name with some sixty of them was refused
 * here as "usage: suppress ..." before suppress saw it. */
static unsigned
count_words(const char *s)
{
    unsigned n = 0;
    bool in = false;
    for (; *s != '\0'; s++) {
        bool space = *s == ' ' || *s == '\t';
        if (!space && !in) {
            n++;
            if (*s == '"') {
                const char *q = s + 1;
                while (*q != '\0' && *q != '"')
                    q += q[0] == '\\' && q[1] != '\0' ? 2 : 1;
                if (*q == '"')
                    s = q; /* its closing quote: the word goes on to a blank */
            }
        }
        in = !space;
    }
    return n;
}

static void
do_help(struct json *out)
{
    json_obj_begin(out);
    json_kbool(out, "ok", true);
    json_key(out, "commands");
    json_arr_begin(out);
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        json_obj_begin(out);
        json_kstr(out, "name", commands[i].verb);
        json_kstr(out, "args", commands[i].args);
        json_kstr(out, "about", commands[i].about);
        json_obj_end(out);
    }
    json_arr_end(out);
    json_obj_end(out);
}

static int client_flush(struct stats_server *s, struct client *c, uint64_t now);
static int client_process(struct stats_server *s, struct client *c, uint64_t now);
static void client_rearm(const struct stats_server *s, struct client *c);

/* Hand c's command to the command thread: c waits, unpolled for input,
 * until cmd_answers() gives it the answer. False without memory. */
static bool
cmd_submit(struct stats_server *s, struct client *c, const struct command *cmd, const char *args,
           int *fd)
{
    struct stats_caller who = {.uid = c->uid, .fd = *fd};
    if (!stats_cmd_submit(s->cmd, cmd->verb, args, &who, (size_t)(c - s->clients), c->gen))
        return false;
    *fd = -1; /* the job's */
    s->cmd_queued++;
    c->waiting = true;
    return true;
}

/* j's answer becomes its client's, if that client is still there (one
 * that left meanwhile lost its slot, perhaps to another: gen tells):
 * that client, else NULL. */
static struct client *
cmd_answer_take(struct stats_server *s, struct stats_cmd_job *j)
{
    struct client *c = &s->clients[j->slot];
    if (c->fd < 0 || c->gen != j->gen || !c->waiting)
        return NULL;
    c->waiting = false;
    struct json t = c->out; /* empty: the answer is swapped in */
    c->out = j->out;
    j->out = t;
    c->outoff = 0;
    return c;
}

/* The answers the command thread made go to their clients, those still
 * there. */
static void
cmd_answers(struct stats_server *s, uint64_t now)
{
    struct stats_cmd_job *list = stats_cmd_take(s->cmd);
    for (struct stats_cmd_job *j = list; j != NULL; j = j->next) {
        s->cmd_queued--;
        struct client *c = cmd_answer_take(s, j);
        if (c == NULL)
            continue;
        c->answer_at = now;
        c->req_start = c->inlen > 0 ? now : 0;
        client_rearm(s, c);
        if (client_flush(s, c, now) == 0)
            client_process(s, c, now);
    }
    stats_cmd_jobs_free(list);
}

/* The Prometheus text of /metrics and "metrics" (malloc'd), or NULL when
 * out of memory. */
static char *
metrics_text(struct stats_server *s)
{
    struct stats_counters c;
    gather_counters(s, &c);
    size_t n = gather_domains(s, s->top_n);
    return stats_render_metrics(&c, s->doms, n, clock_unix_ms());
}

static void
do_metrics(struct stats_server *s, struct json *out)
{
    char *text = metrics_text(s);
    if (text == NULL) {
        stats_answer_error(out, "out of memory");
        return;
    }
    json_obj_begin(out);
    json_kbool(out, "ok", true);
    json_kstr(out, "text", text);
    json_obj_end(out);
    free(text);
}

/* Answer one command line (no newline) of c into out, newline included;
 * or, for a command of the engine's, hand it to the command thread and
 * return true: the answer comes later (cmd_answers). *fd: the descriptor
 * that came with the line, or -1; set to -1 when the job took it. */
static bool
line_answer(struct stats_server *s, struct client *c, char *line, size_t len, int *fd,
            struct json *out)
{
    if (memchr(line, '\0', len) != NULL) {
        stats_answer_error(out, "NUL octet in the command line");
        json_raw(out, "\n", 1);
        return false;
    }
    line[len] = '\0';
    while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == ' ' || line[len - 1] == '\t'))
        line[--len] = '\0';
    char *p = line;
    while (*p == ' ' || *p == '\t')
        p++;
    char *verb = p;
    while (*p != '\0' && *p != ' ' && *p != '\t')
        p++;
    if (*p != '\0')
        *p++ = '\0';
    while (*p == ' ' || *p == '\t')
        p++;
    const char *args = p;

    const struct command *cmd = NULL;
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (strcasecmp(verb, commands[i].verb) == 0)
            cmd = &commands[i];
    if (verb[0] == '\0') {
        stats_answer_error(out, "empty command (try help)");
    } else if (cmd == NULL) {
        char shown[40];
        snprintf(shown, sizeof(shown), "%s", verb); /* bounded: the line may be 4 KB */
        answer_errorf(out, "unknown command \"%s\" (try help)", shown);
    } else if (count_words(args) < cmd->min_args || count_words(args) > cmd->max_args) {
        answer_errorf(out, "usage: %s%s%s", cmd->verb, cmd->args[0] ? " " : "", cmd->args);
    } else if (*fd >= 0 && !cmd->engine) {
        answer_errorf(out, "%s: a file descriptor came with it, and it takes none", cmd->verb);
    } else if (cmd->engine && s->cmd_queued > STATS_CMD_QUEUE_MAX) {
        answer_errorf(out, "busy: %u commands are queued behind the one under way (a flush or "
                           "bounce of a big queue takes a while); try again once they are answered",
                      s->cmd_queued - 1);
    } else if (cmd->engine) {
        if (cmd_submit(s, c, cmd, args, fd))
            return true;
        stats_answer_error(out, "out of memory");
    } else if (strcmp(cmd->verb, "stats") == 0) {
        struct stats_counters k;
        struct stats_rates r1s, r1m;
        gather_counters(s, &k);
        rates_get(s, &r1s, &r1m);
        stats_render_stats(out, &k, &r1s, &r1m);
    } else if (strcmp(cmd->verb, "domains") == 0) {
        unsigned long want;
        if (stats_parse_top(args, &want) < 0) {
            answer_errorf(out, "domains: N must be a number from 1 to %d", STATS_DOMAINS_MAX);
            json_raw(out, "\n", 1);
            return false;
        }
        size_t n = gather_domains(s, want);
        /* with delivery off no destination is made, and the list is
         * empty while mail waits: the answer says why (as stats does).
         * Known from the start: gathering the counters for it asked every
         * worker again and read the spool's, warm-up's and the others'
         * at each domains. */
        json_obj_begin(out);
        json_kbool(out, "ok", true);
        json_kbool(out, "delivery_enabled", !s->ops.delivery_off);
        stats_render_domains(out, s->doms, n, clock_unix_ms());
        json_obj_end(out);
    } else if (strcmp(cmd->verb, "metrics") == 0) {
        do_metrics(s, out);
    } else {
        do_help(out);
    }
    if (json_failed(out)) {
        json_reset(out);
        stats_answer_error(out, "out of memory");
    }
    json_raw(out, "\n", 1);
    return false;
}

/* line_answer, and the descriptor that came with the line closed unless
 * its command's job took it: on every path, none is left open. */
static bool
stats_on_line(struct stats_server *s, struct client *c, char *line, size_t len, int fd,
              struct json *out)
{
    bool later = line_answer(s, c, line, len, &fd, out);
    if (fd >= 0)
        close(fd);
    return later;
}

/* ---- HTTP: what its answers show (stats_http.c answers) ---- */

/* status.json, what the status page shows: {"stats": the answer to
 * "stats", "domains": the STATS_PAGE_DOMAINS busiest, "suspended" and
 * "held": every suspended, and every held, destination among the
 * STATS_DOMAINS_MAX busiest}. */
static void
render_status(void *arg, struct json *j)
{
    struct stats_server *s = arg;
    struct stats_counters c;
    struct stats_rates r1s, r1m;
    gather_counters(s, &c);
    rates_get(s, &r1s, &r1m);
    size_t n = gather_domains(s, STATS_DOMAINS_MAX);
    uint64_t now = clock_unix_ms();
    json_obj_begin(j);
    json_key(j, "stats");
    stats_render_stats(j, &c, &r1s, &r1m);
    stats_render_domains(j, s->doms, n < STATS_PAGE_DOMAINS ? n : STATS_PAGE_DOMAINS, now);
    /* The suspended ones, then the held ones, moved to the front of the
     * array for rendering (the busiest-first order is no longer needed
     * past the top). */
    for (int held = 0; held < 2; held++) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            if (!(held ? s->doms[i].held : s->doms[i].suspended))
                continue;
            if (i != k) {
                struct stats_domain t = s->doms[k];
                s->doms[k] = s->doms[i];
                s->doms[i] = t;
            }
            k++;
        }
        render_domain_array(j, held ? "held" : "suspended", s->doms, k, now);
    }
    json_obj_end(j);
}

static char *
metrics_text_of(void *arg)
{
    return metrics_text(arg);
}

/* ---- clients ---- */

/* The descriptor c holds for a line it will never send: closed. */
static void
client_drop_fd(struct client *c)
{
    if (c->pass_fd >= 0)
        close(c->pass_fd);
    c->pass_fd = -1;
}

static void
client_close(struct client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    client_drop_fd(c);
    json_fini(&c->out);
}

/* The line in[0..len) is taken (its newline at len, or the input's end):
 * the descriptor whose octets end in it, if any, is its own (returned,
 * the caller's now); one that came later stays, moved with the input. */
static int
client_line_fd(struct client *c, size_t len)
{
    if (c->pass_fd < 0)
        return -1;
    if (c->pass_at <= len) {
        int fd = c->pass_fd;
        c->pass_fd = -1;
        return fd;
    }
    c->pass_at -= len + 1;
    return -1;
}

static uint64_t
idle_of(const struct stats_server *s, const struct client *c)
{
    if (c->kind == CLIENT_HTTP)
        return STATS_HTTP_IDLE_MS;
    unsigned ms = atomic_load(&s->idle_ms);
    return ms != 0 ? ms : STATS_IDLE_MS;
}

/* The one place a client's deadline is set: a lingering close has its
 * own; an answer must go out within STATS_ANSWER_MS of being made; a
 * request must be whole within STATS_REQUEST_MS of its start, however
 * its octets trickle in; and a client is dropped after its idle time. */
static void
client_rearm(const struct stats_server *s, struct client *c)
{
    if (c->draining)
        return; /* set once, when the draining began */
    if (c->waiting) { /* as long as its command takes (a flush of millions: a minute) */
        c->deadline = UINT64_MAX;
        return;
    }
    if (c->outoff < c->out.len) {
        c->deadline = c->answer_at + STATS_ANSWER_MS;
        return;
    }
    uint64_t d = c->last_io + idle_of(s, c);
    if (c->req_start != 0 && c->req_start + STATS_REQUEST_MS < d)
        d = c->req_start + STATS_REQUEST_MS;
    c->deadline = d;
}

/* Send what can be sent now; then start draining if the client is closing.
 * Returns -1 when the client was closed. */
static int
client_flush(struct stats_server *s, struct client *c, uint64_t now)
{
    while (c->outoff < c->out.len) {
        ssize_t n = send(c->fd, c->out.buf + c->outoff, c->out.len - c->outoff,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            client_close(c);
            return -1;
        }
        c->outoff += (size_t)n;
        c->last_io = now;
    }
    json_reset(&c->out);
    c->outoff = 0;
    client_rearm(s, c);
    if (c->closing && !c->draining) {
        shutdown(c->fd, SHUT_WR);
        c->draining = true;
        c->deadline = now + LINGER_MS;
        if (c->eof) {
            client_close(c);
            return -1;
        }
    }
    return 0;
}

/* Answer the complete lines or request in c->in, one answer at a time. */
static int
client_process(struct stats_server *s, struct client *c, uint64_t now)
{
    while (!c->closing && c->out.len == 0 && !c->waiting) {
        if (c->kind == CLIENT_HTTP) {
            size_t end = stats_http_request_end(c->in, c->inlen);
            if (end == 0 && c->inlen >= sizeof(c->in))
                stats_http_error(&c->out, 1, "431 Request Header Fields Too Large", "", false);
            else if (end == 0 && c->eof)
                stats_http_error(&c->out, 1, "400 Bad Request", "", false);
            else if (end == 0)
                return 0;
            else
                stats_http_answer(&(const struct stats_http_views){s, render_status,
                                                                   metrics_text_of},
                                  c->in, end, &c->out);
            c->closing = true;
            c->inlen = 0;
        } else if (c->pass_refused) {
            stats_answer_error(&c->out, "one file descriptor at most, sent with the command "
                                        "line that uses it (or sluice is out of descriptors): "
                                        "closing");
            json_raw(&c->out, "\n", 1);
            c->closing = true;
            c->inlen = 0;
            client_drop_fd(c);
        } else {
            char *nl = memchr(c->in, '\n', c->inlen);
            if (nl == NULL && c->inlen > STATS_LINE_MAX) {
                answer_errorf(&c->out, "line too long (at most %d octets)", STATS_LINE_MAX);
                json_raw(&c->out, "\n", 1);
                c->closing = true;
                c->inlen = 0;
                client_drop_fd(c);
            } else if (nl == NULL && c->eof && c->inlen > 0) {
                /* a last command without its newline ("printf stats | nc -U") */
                char line[STATS_LINE_MAX + 1];
                size_t len = c->inlen;
                memcpy(line, c->in, len);
                c->inlen = 0;
                stats_on_line(s, c, line, len, client_line_fd(c, len), &c->out);
                c->closing = true;
            } else if (nl == NULL) {
                if (c->eof)
                    c->closing = true;
                else
                    return 0;
            } else {
                char line[STATS_LINE_MAX + 2];
                size_t len = (size_t)(nl - c->in);
                if (len > STATS_LINE_MAX) {
                    answer_errorf(&c->out, "line too long (at most %d octets)", STATS_LINE_MAX);
                    json_raw(&c->out, "\n", 1);
                    c->closing = true;
                    c->inlen = 0;
                    client_drop_fd(c);
                } else {
                    memcpy(line, c->in, len);
                    c->inlen -= len + 1;
                    memmove(c->in, nl + 1, c->inlen);
                    int fd = client_line_fd(c, len);
                    stats_on_line(s, c, line, len, fd, &c->out);
                }
            }
        }
        if (c->waiting) { /* the command thread answers: cmd_answers */
            client_rearm(s, c);
            return 0;
        }
        /* An answer was made: the next request, if any octet of it is
         * here already, starts now. */
        c->answer_at = now;
        c->req_start = c->inlen > 0 ? now : 0;
        client_rearm(s, c);
        if (client_flush(s, c, now) < 0)
            return -1;
    }
    if (c->closing && c->out.len == 0 && !c->draining && !c->waiting)
        return client_flush(s, c, now);
    return 0;
}

/* Read what c sent into its input, room octets at most; for a socket
 * client, with the descriptors that came with them (received
 * close-on-exec): one is held for its line (client_line_fd); every other
 * is closed at once and the connection refused (pass_refused). As recv. */
static ssize_t
client_recv(struct client *c, size_t room)
{
    if (c->kind == CLIENT_HTTP)
        return recv(c->fd, c->in + c->inlen, room, MSG_DONTWAIT);
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(PASS_FDS_ROOM * sizeof(int))];
    } ctl;
    struct iovec iov = {.iov_base = c->in + c->inlen, .iov_len = room};
    struct msghdr m = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof(ctl.b)};
    ssize_t n = recvmsg(c->fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0)
        return n;
    /* Past PASS_FDS_ROOM the kernel closed the rest (MSG_CTRUNC). */
    int fds[PASS_FDS_ROOM];
    size_t nfds = 0;
    bool bad = (m.msg_flags & MSG_CTRUNC) != 0;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h != NULL; h = CMSG_NXTHDR(&m, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(h) + i * sizeof(int), sizeof(fd));
            if (nfds < PASS_FDS_ROOM) {
                fds[nfds++] = fd;
            } else { /* not in the room asked: cannot be */
                close(fd);
                bad = true;
            }
        }
    }
    if (nfds == 0 && !bad)
        return n;
    if (!bad && nfds == 1 && n > 0 && c->pass_fd < 0 && !c->pass_refused) {
        c->pass_fd = fds[0];
        c->pass_at = c->inlen + (size_t)n - 1;
        return n;
    }
    for (size_t i = 0; i < nfds; i++)
        close(fds[i]);
    client_drop_fd(c);
    c->pass_refused = true;
    return n;
}

static void
client_on_readable(struct stats_server *s, struct client *c, uint64_t now)
{
    if (c->draining) {
        char junk[4096];
        ssize_t n = recv(c->fd, junk, sizeof(junk), MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n <= 0 || (c->drained += (size_t)n) > LINGER_BYTES)
            client_close(c);
        return;
    }
    size_t room = sizeof(c->in) - c->inlen;
    if (room == 0)
        return; /* client_process decides: it answers before reading more */
    ssize_t n = client_recv(c, room);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        client_close(c);
        return;
    }
    if (n == 0)
        c->eof = true;
    else if (c->req_start == 0)
        c->req_start = now; /* the first octet of a request */
    c->inlen += (size_t)n;
    c->last_io = now;
    client_rearm(s, c);
    if (client_process(s, c, now) == 0 && c->eof && !c->closing && c->out.len == 0 &&
        !c->waiting)
        client_close(c);
}

/* A full pool's client to close for a newcomer: one lingering already,
 * else the one whose request began first, else the one idle longest;
 * never one whose answer is being sent. NULL: none may go. */
static struct client *
pool_victim(struct client *pool, size_t n)
{
    struct client *best = NULL;
    int best_rank = 0;
    uint64_t best_t = 0;
    for (size_t i = 0; i < n; i++) {
        struct client *c = &pool[i];
        int rank;
        uint64_t t;
        if (c->draining) {
            rank = 3, t = 0;
        } else if (c->out.len > 0 || c->waiting) {
            continue; /* its answer is being sent, or made */
        } else if (c->req_start != 0) {
            rank = 2, t = c->req_start;
        } else {
            rank = 1, t = c->last_io;
        }
        if (best == NULL || rank > best_rank || (rank == best_rank && t < best_t)) {
            best = c;
            best_rank = rank;
            best_t = t;
        }
    }
    return best;
}

static void
client_refuse(int fd, enum client_kind kind, const char *why)
{
    char msg[256];
    int n = kind == CLIENT_CTL
                ? snprintf(msg, sizeof(msg), "{\"ok\":false,\"error\":\"%s\"}\n", why)
                : snprintf(msg, sizeof(msg),
                           "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                           "Connection: close\r\n\r\n");
    (void)!send(fd, msg, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    shutdown(fd, SHUT_WR);
}

static void
stats_on_accept(struct stats_server *s, int lfd, enum client_kind kind, uint64_t now)
{
    struct client *pool = kind == CLIENT_CTL ? s->clients : s->clients + STATS_CTL_CLIENTS_MAX;
    size_t npool = kind == CLIENT_CTL ? STATS_CTL_CLIENTS_MAX : STATS_HTTP_CLIENTS_MAX;
    for (int k = 0; k < 16; k++) { /* a bounded batch: the loop stays fair */
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        struct client *c = NULL;
        for (size_t i = 0; i < npool && c == NULL; i++)
            if (pool[i].fd < 0)
                c = &pool[i];
        if (c == NULL && (c = pool_victim(pool, npool)) != NULL) {
            if (!c->draining)
                client_refuse(c->fd, kind, "too many clients: closed for a newer one");
            client_close(c);
            s->evicted++;
            if (s->evict_logged == 0 || now - s->evict_logged >= 60000) {
                log_msg(LOG_NOTICE, "event=stats_client_evicted kind=%s count=%u note=pool_full",
                        kind == CLIENT_CTL ? "socket" : "http", s->evicted);
                s->evict_logged = now;
                s->evicted = 0;
            }
        }
        if (c == NULL) {
            client_refuse(fd, kind, "too many clients: every slot of the stats socket "
                                    "waits for an answer; try again");
            close(fd);
            continue;
        }
        c->fd = fd;
        c->kind = kind;
        c->closing = c->draining = c->eof = c->waiting = c->pass_refused = false;
        c->pass_fd = -1;
        /* who asks, for the commands that care (ops_suppress.c: only root
         * and sluice's own user may name a path for sluice to open) */
        struct ucred cred;
        socklen_t cl = sizeof(cred);
        c->uid = STATS_UID_NONE;
        if (kind == CLIENT_CTL && getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0 &&
            cl == sizeof(cred))
            c->uid = cred.uid;
        c->gen = ++s->next_gen;
        c->inlen = c->drained = c->outoff = 0;
        json_init(&c->out);
        c->req_start = c->last_io = now; /* a request is owed from the start */
        c->answer_at = 0;
        client_rearm(s, c);
    }
}

/* ---- the thread ---- */

static void *
stats_thread(void *arg)
{
    struct stats_server *s = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the main thread's */
    log_altstack_init();
    log_set_thread_name("stats");

    uint64_t now = clock_mono_ms();
    rates_sample(s, now);
    s->next_sample = now + SAMPLE_MS;
    struct pollfd pfd[4 + STATS_CLIENTS_MAX];
    struct client *owner[4 + STATS_CLIENTS_MAX];
    for (;;) {
        now = clock_mono_ms();
        if (now >= s->next_sample) {
            rates_sample(s, now);
            s->next_sample += SAMPLE_MS;
            if (s->next_sample <= now) /* a callback took long: no burst of catch-up samples */
                s->next_sample = now + SAMPLE_MS;
        }
        uint64_t wake = s->next_sample;
        nfds_t n = 0;
        pfd[n] = (struct pollfd){.fd = s->wake_fd, .events = POLLIN};
        owner[n++] = NULL;
        pfd[n] = (struct pollfd){.fd = s->ctl_fd, .events = POLLIN};
        owner[n++] = NULL;
        pfd[n] = (struct pollfd){.fd = stats_cmd_fd(s->cmd), .events = POLLIN};
        owner[n++] = NULL;
        if (s->http_fd >= 0) {
            pfd[n] = (struct pollfd){.fd = s->http_fd, .events = POLLIN};
            owner[n++] = NULL;
        }
        for (size_t i = 0; i < STATS_CLIENTS_MAX; i++) {
            struct client *c = &s->clients[i];
            if (c->fd < 0)
                continue;
            if (now >= c->deadline) {
                client_close(c);
                continue;
            }
            if (c->deadline < wake)
                wake = c->deadline;
            if (c->waiting) { /* only a hang-up is heard (no events asked) */
                pfd[n] = (struct pollfd){.fd = c->fd, .events = 0};
                owner[n++] = c;
                continue;
            }
            short ev = c->out.len > c->outoff ? POLLOUT : 0;
            if (c->draining || (ev == 0 && !c->eof && c->inlen < sizeof(c->in)))
                ev |= POLLIN;
            pfd[n] = (struct pollfd){.fd = c->fd, .events = ev};
            owner[n++] = c;
        }
        int rc = poll(pfd, n, wake > now ? (int)(wake - now) : 0);
        if (rc < 0 && errno != EINTR) {
            log_msg(LOG_ERR, "stats: poll failed error=\"%s\"", strerror(errno));
            break;
        }
        if (rc <= 0)
            continue;
        if (pfd[0].revents != 0)
            break; /* stats_server_free */
        now = clock_mono_ms();
        for (nfds_t i = 1; i < n; i++) {
            if (pfd[i].revents == 0)
                continue;
            struct client *c = owner[i];
            if (c == NULL && pfd[i].fd == stats_cmd_fd(s->cmd)) {
                cmd_answers(s, now);
                continue;
            }
            if (c == NULL) {
                stats_on_accept(s, pfd[i].fd, pfd[i].fd == s->ctl_fd ? CLIENT_CTL : CLIENT_HTTP,
                                now);
                continue;
            }
            if (c->fd < 0)
                continue;
            if (c->waiting) { /* it left before its answer: dropped when that comes */
                client_close(c);
                continue;
            }
            if (pfd[i].revents & POLLOUT) {
                if (client_flush(s, c, now) < 0 || client_process(s, c, now) < 0)
                    continue;
            }
            if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR))
                client_on_readable(s, c, now);
        }
    }
    return NULL;
}

/* ---- life cycle ---- */

/* The answer of a socket client the stop finds owed one that was never
 * going to come (its line unread, or not come yet): that sluice is
 * stopping, sent by stop_answers. */
static void
stop_refuse(struct client *c)
{
    json_reset(&c->out);
    stats_answer_error(&c->out, STATS_CMD_NOT_RUN);
    json_raw(&c->out, "\n", 1);
    c->outoff = 0;
    c->closing = true;
}

/* Whether socket client c is owed an answer no one will make: the stats
 * thread is gone, its command not with the command thread, and a
 * request of it began (accepted and none yet, or octets of one read or
 * waiting in its socket). Closed without one, sluicectl said "no
 * answer: Connection reset by peer" (exit 3) for a command sent as the
 * stop began. A client idle between requests (sluicectl top) is not: a
 * line it did not ask for would answer its next request. */
static bool
stop_owed(struct client *c)
{
    if (c->fd < 0 || c->kind != CLIENT_CTL || c->waiting || c->closing || c->draining ||
        c->outoff < c->out.len)
        return false;
    char b;
    return c->req_start != 0 || c->inlen > 0 || recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
}

/* The stop (stats_server_free, the thread joined, the command thread
 * stopped): the answers the command thread made since the stats thread
 * last took them (a bounce or a flush the stop cut: its error, which
 * counts what stayed queued; those queued and never run: an error too),
 * and any answer not all sent, go out before the clients are closed.
 * They were freed with the command thread, and sluicectl saw the
 * connection close (exit 3, no reason) while only the log told why.
 * A socket client owed an answer nobody will make is told that sluice
 * stops (stop_owed), and so is one idle till now whose request comes
 * meanwhile. A client whose answer is sent and write side shut
 * (draining) lingers: its input is read and dropped to its end, or to
 * LINGER_BYTES (client_on_readable), before it is closed; closed at
 * once, a client told that sluice stops before it had written its
 * request (one from the backlog) saw its write fail (EPIPE) and never
 * read the line waiting for it. Bounded: STOP_ANSWER_MS for every
 * client together, a client that does not read, or does not close, is
 * closed then; idle ones do not hold the stop. The caller's wait for
 * the command itself is stats_cmd_stop's. */
static void
stop_answers(struct stats_server *s)
{
    uint64_t now = clock_mono_ms();
    uint64_t end = now + STOP_ANSWER_MS;
    struct stats_cmd_job *list = stats_cmd_take(s->cmd);
    for (struct stats_cmd_job *j = list; j != NULL; j = j->next) {
        struct client *c = cmd_answer_take(s, j);
        if (c != NULL)
            c->closing = true; /* its write side shut once sent: it reads the end */
    }
    stats_cmd_jobs_free(list);
    for (size_t i = 0; i < STATS_CLIENTS_MAX; i++)
        if (stop_owed(&s->clients[i]))
            stop_refuse(&s->clients[i]);
    for (;;) {
        struct pollfd pfd[STATS_CLIENTS_MAX];
        struct client *of[STATS_CLIENTS_MAX];
        nfds_t n = 0, busy = 0;
        for (size_t i = 0; i < STATS_CLIENTS_MAX; i++) {
            struct client *c = &s->clients[i];
            if (stop_owed(c))
                stop_refuse(c); /* idle till now, its request came meanwhile */
            if (c->fd >= 0 && c->outoff < c->out.len && client_flush(s, c, now) != 0)
                continue; /* closed */
            if (c->fd < 0)
                continue;
            bool sending = c->outoff < c->out.len;
            busy += sending || c->draining;
            pfd[n] = (struct pollfd){.fd = c->fd, .events = sending ? POLLOUT : POLLIN};
            of[n++] = c;
        }
        if (busy == 0 || now >= end)
            return;
        if (poll(pfd, n, (int)(end - now)) < 0 && errno != EINTR)
            return;
        now = clock_mono_ms();
        for (nfds_t k = 0; k < n; k++) {
            struct client *c = of[k];
            if (c->fd < 0 || (pfd[k].revents & (POLLIN | POLLHUP | POLLERR)) == 0 ||
                c->outoff < c->out.len)
                continue;
            if (c->draining)
                client_on_readable(s, c, now); /* its input dropped, to its end */
            else if (!stop_owed(c))
                client_close(c); /* idle, and its end came (or an HTTP request): none owed */
        }
    }
}

/* The stop: each client still in the socket's backlog (connected as the
 * stats thread left) is told that sluice stops, then closed: closed
 * unaccepted with the listener, it was reset with no answer. A free slot
 * for each takes it to stop_answers; past the pool, the line is sent
 * here if the socket takes it at once. */
static void
stop_refuse_backlog(struct stats_server *s)
{
    uint64_t now = clock_mono_ms();
    for (unsigned n = 0; n < STATS_CLIENTS_MAX; n++) {
        int fd = accept4(s->ctl_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        struct client *c = NULL;
        for (size_t i = 0; i < STATS_CLIENTS_MAX && c == NULL; i++)
            if (s->clients[i].fd < 0)
                c = &s->clients[i];
        if (c == NULL) {
            static const char line[] = "{\"ok\":false,\"error\":\"" STATS_CMD_NOT_RUN "\"}\n";
            (void)!send(fd, line, sizeof(line) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
            close(fd);
            continue;
        }
        memset(c, 0, sizeof(*c));
        c->fd = fd;
        c->pass_fd = -1;
        c->kind = CLIENT_CTL;
        c->gen = ++s->next_gen;
        c->last_io = now;
        json_init(&c->out);
        stop_refuse(c);
    }
}

int
stats_server_new(const char *socket_path, unsigned socket_mode, const char *http_listen,
                 unsigned top_n, const struct stats_ops *ops, struct stats_server **out, char *err,
                 size_t errlen)
{
    *out = NULL;
    if (socket_path == NULL || socket_path[0] == '\0' || ops == NULL) {
        errf(err, errlen, "stats: no socket path");
        return -EINVAL;
    }
    struct stats_server *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        errf(err, errlen, "stats: out of memory");
        return -ENOMEM;
    }
    s->ops = *ops;
    s->top_n = top_n;
    s->wake_fd = s->ctl_fd = s->http_fd = -1;
    for (size_t i = 0; i < STATS_CLIENTS_MAX; i++)
        s->clients[i].fd = s->clients[i].pass_fd = -1;
    int rc;
    s->path = strdup(socket_path);
    if (s->path == NULL) {
        errf(err, errlen, "stats: out of memory");
        rc = -ENOMEM;
        goto fail;
    }
    s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->wake_fd < 0) {
        rc = -errno;
        errf(err, errlen, "eventfd: %s", strerror(-rc));
        goto fail;
    }
    if ((rc = stats_listen_unix(socket_path, socket_mode, &s->ctl_fd, &s->dev, &s->ino, err,
                                errlen)) != 0)
        goto fail;
    if (http_listen != NULL &&
        (rc = stats_listen_http(http_listen, &s->http_fd, &s->http_port, err, errlen)) != 0)
        goto fail;
    if ((rc = stats_cmd_new(&s->ops, &s->cmd, err, errlen)) != 0)
        goto fail;
    if ((rc = pthread_create(&s->thread, NULL, stats_thread, s)) != 0) {
        errf(err, errlen, "stats thread: %s", strerror(rc));
        rc = -rc;
        goto fail;
    }
    s->started = true;
    *out = s;
    return 0;
fail:
    stats_server_free(s);
    return rc;
}

struct stats_server *
stats_server_free(struct stats_server *s)
{
    if (s == NULL)
        return NULL;
    /* The command under way, if any, ends first (a flush or bounce the
     * stop cuts, an import at the end of its transaction: up to a second
     * or so), while the stats thread goes on answering: a command sent
     * meanwhile is told that sluice is stopping (stats_cmd_submit), a
     * stats answered. Joined first, as before, the socket stayed open
     * with nobody serving it: a sluicectl connected, wrote, and waited
     * for the join, then saw its connection reset, no answer. */
    stats_cmd_stop(s->cmd);
    if (s->started) {
        uint64_t one = 1;
        (void)!write(s->wake_fd, &one, sizeof(one));
        pthread_join(s->thread, NULL);
    }
    /* Nobody accepts any more: the path goes at once, so that a client
     * now is told there is no sluice (not a connection that waits, then
     * is reset, while the last answers below are sent); those connected
     * meanwhile, in the listener's backlog, are told that sluice stops. */
    if (s->ctl_fd >= 0) {
        struct stat st;
        /* Remove the file only if it is still ours: a newer sluice may
         * have replaced it (a stale-looking file while this one stopped). */
        if (lstat(s->path, &st) == 0 && st.st_dev == s->dev && st.st_ino == s->ino)
            unlink(s->path);
        /* A connect that found the path before it went could still join
         * the backlog after the last accept below, then be reset by the
         * close: shut, the listener refuses any new one (ECONNREFUSED,
         * "no sluice"), and the backlog it has is all there is to answer. */
        shutdown(s->ctl_fd, SHUT_RDWR);
        stop_refuse_backlog(s);
        close(s->ctl_fd);
        s->ctl_fd = -1;
    }
    if (s->http_fd >= 0)
        close(s->http_fd);
    s->http_fd = -1;
    if (s->cmd != NULL)
        stop_answers(s);
    s->cmd = stats_cmd_free(s->cmd);
    for (size_t i = 0; i < STATS_CLIENTS_MAX; i++)
        if (s->clients[i].fd >= 0)
            client_close(&s->clients[i]);
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    free(s->doms);
    free(s->path);
    free(s);
    return NULL;
}

unsigned
stats_server_http_port(const struct stats_server *s)
{
    return s->http_fd >= 0 ? s->http_port : 0;
}

void
stats_server_set_idle_timeout(struct stats_server *s, unsigned idle_ms)
{
    atomic_store(&s->idle_ms, idle_ms);
}
