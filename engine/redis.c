/*
 * redis: the ring adapter and connection keeper of redis.h.
 *
 * A link is one hiredis context, from redisAsyncConnect() until hiredis
 * frees it (error, EOF, timeout, redis_free); it carries the two poll ops
 * (one POLLIN, one POLLOUT, each armed at most once) and outlives the
 * context until both came back. hiredis tells us it freed the context
 * through the cleanup hook, which may run inside redisAsyncHandleRead/
 * Write called from a poll completion: the link is then "busy" and the
 * completion handler frees it afterwards, never the hook.
 *
 * hiredis (0.14) runs every pending callback with a NULL reply before the
 * cleanup hook when a context dies; those callbacks see the connection as
 * not up (r->up is cleared first), so nothing queues on a dying context.
 *
 * redis_free() from inside a callback of r (a reply callback, whose
 * command's record hiredis still iterates past, or the state callback,
 * run from one or from the cleanup hook) marks r closing and leaves the
 * free to the handler that called into r (a poll completion or a timer:
 * redis_enter/redis_leave count them), once hiredis has freed the
 * context and answered the pending commands (skipped: closing).
 *
 * hiredis's reader is given a createArray that refuses more than
 * REPLY_ELEMENTS_MAX elements, so a hostile "*2147483647" costs a
 * reconnect, not a huge allocation.
 *
 * Threading: the worker's thread only.
 */
#include "engine/redis.h"
#include "engine/redis_url.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include "common/clock.h"
#include "common/log.h"

/* The most elements an array reply may announce: sluice's replies have
 * three. More is refused before hiredis allocates for them (its reader
 * would otherwise calloc what a "*2147483647" line asks for). */
#define REPLY_ELEMENTS_MAX 64

struct redis_link {
    struct op rd, wr;       /* OP_CALLBACK: link_on_read, link_on_write */
    redisReplyObjectFunctions fns; /* hiredis's, with createArray capped */
    void *(*create_array)(const redisReadTask *task, int elements); /* hiredis's */
    struct worker *w;       /* borrowed: outlives every link */
    struct redis *r;        /* borrowed; NULL once the context died */
    redisAsyncContext *ac;  /* owned by hiredis; NULL once it freed it */
    int fd;
    bool want_rd, want_wr;  /* what hiredis asked for last */
    bool rd_armed, wr_armed; /* a poll is in flight */
    bool busy;              /* inside a poll completion handler */
};

struct redis_cmd {
    struct redis_cmd *next;
    struct redis *r; /* borrowed: pending commands die before r */
    redis_reply_fn *cb;
    void *arg;        /* borrowed: the caller's */
    uint64_t deadline; /* monotonic ns */
};

struct redis {
    struct worker *w;  /* borrowed: outlives r */
    char ip[INET6_ADDRSTRLEN];
    int port;
    char addr[256 + 8]; /* "host:port" for logs */
    char *user, *password; /* owned; NULL: none */
    uint64_t cmd_timeout, backoff_min, backoff_max; /* ns */
    uint64_t backoff;        /* delay before the next attempt */
    struct redis_link *link; /* NULL between connections */
    bool up;                 /* commands may be queued */
    bool closing;            /* redis_free was called: no callback runs any more */
    unsigned depth;          /* handlers of r running (a poll completion, a timer): a
                              * redis_free from a callback frees r when the last returns */
    enum redis_state state;  /* as last told to on_state */
    redis_state_fn *on_state;
    void *state_arg; /* borrowed */
    struct redis_cmd *head, **tail; /* pending, oldest first */
    struct timer reconnect_timer;
    struct timer cmd_timer;
    struct redis_stats stats;
};

static void redis_attempt(struct redis *r);

const char *
redis_state_str(enum redis_state st)
{
    switch (st) {
    case REDIS_STATE_CONNECTING: return "connecting";
    case REDIS_STATE_UP: return "connected";
    case REDIS_STATE_DOWN: return "unreachable";
    }
    return "?";
}

enum redis_state
redis_state(const struct redis *r)
{
    return r->state;
}

const char *
redis_addr(const struct redis *r)
{
    return r->addr;
}

void
redis_stats(const struct redis *r, struct redis_stats *out)
{
    *out = r->stats;
}

static void redis_release(struct redis *r);

/* Around every way into r from the loop (a poll completion, a timer):
 * the callbacks of r run inside, and a redis_free they call must not
 * free r (nor the records of its pending commands) under the code that
 * called them, hiredis's included: it marks r closing, and the last
 * handler to return frees it. */
static void
redis_enter(struct redis *r)
{
    if (r != NULL)
        r->depth++;
}

static void
redis_leave(struct redis *r)
{
    if (r != NULL && --r->depth == 0 && r->closing)
        redis_release(r);
}

/* --- the poll adapter ------------------------------------------------- */

static void
link_poll(struct redis_link *ln, struct op *op, bool *armed, unsigned mask)
{
    if (*armed || ln->ac == NULL)
        return;
    struct io_uring_sqe *sqe = worker_sqe(ln->w, op);
    io_uring_prep_poll_add(sqe, ln->fd, mask);
    *armed = true;
}

static void
link_unpoll(struct redis_link *ln, struct op *op, bool *armed)
{
    if (!*armed)
        return;
    if (ln->w->stopping) {
        /* The loop will not turn again: nothing comes back to wait for. */
        *armed = false;
        return;
    }
    struct io_uring_sqe *sqe = worker_sqe(ln->w, NULL);
    io_uring_prep_poll_remove(sqe, (uint64_t)(uintptr_t)op);
}

static void
link_maybe_free(struct redis_link *ln)
{
    if (ln->ac == NULL && !ln->rd_armed && !ln->wr_armed && !ln->busy)
        free(ln);
}

static void
ev_add_read(void *data)
{
    struct redis_link *ln = data;
    ln->want_rd = true;
    link_poll(ln, &ln->rd, &ln->rd_armed, POLLIN);
}

/* A poll left in flight after a del is harmless: its completion is
 * dropped unless hiredis wants that direction again by then. */
static void
ev_del_read(void *data)
{
    struct redis_link *ln = data;
    ln->want_rd = false;
}

static void
ev_add_write(void *data)
{
    struct redis_link *ln = data;
    ln->want_wr = true;
    link_poll(ln, &ln->wr, &ln->wr_armed, POLLOUT);
}

static void
ev_del_write(void *data)
{
    struct redis_link *ln = data;
    ln->want_wr = false;
}

static void redis_lost(struct redis *r);

/* hiredis is freeing the context (every pending callback already ran). */
static void
ev_cleanup(void *data)
{
    struct redis_link *ln = data;
    ln->ac = NULL;
    ln->want_rd = ln->want_wr = false;
    link_unpoll(ln, &ln->rd, &ln->rd_armed);
    link_unpoll(ln, &ln->wr, &ln->wr_armed);
    struct redis *r = ln->r;
    ln->r = NULL;
    if (r != NULL) {
        r->link = NULL;
        r->up = false;
        if (!r->closing)
            redis_lost(r);
    }
    link_maybe_free(ln);
}

static void
link_on_read(struct worker *w, struct op *op, int res, uint32_t flags)
{
    (void)w;
    (void)flags;
    struct redis_link *ln = (struct redis_link *)((char *)op - offsetof(struct redis_link, rd));
    ln->rd_armed = false;
    if (ln->ac != NULL && ln->want_rd && res != -ECANCELED) {
        /* An error result goes to hiredis too: its read sees the error and
         * drops the connection. */
        struct redis *r = ln->r;
        redis_enter(r);
        ln->busy = true;
        redisAsyncHandleRead(ln->ac);
        ln->busy = false;
        if (ln->ac != NULL && ln->want_rd)
            link_poll(ln, &ln->rd, &ln->rd_armed, POLLIN);
        redis_leave(r);
    }
    link_maybe_free(ln);
}

static void
link_on_write(struct worker *w, struct op *op, int res, uint32_t flags)
{
    (void)w;
    (void)flags;
    struct redis_link *ln = (struct redis_link *)((char *)op - offsetof(struct redis_link, wr));
    ln->wr_armed = false;
    if (ln->ac != NULL && ln->want_wr && res != -ECANCELED) {
        struct redis *r = ln->r;
        redis_enter(r);
        ln->busy = true;
        redisAsyncHandleWrite(ln->ac);
        ln->busy = false;
        if (ln->ac != NULL && ln->want_wr)
            link_poll(ln, &ln->wr, &ln->wr_armed, POLLOUT);
        redis_leave(r);
    }
    link_maybe_free(ln);
}

/* --- commands --------------------------------------------------------- */

static void
cmd_timer_update(struct redis *r)
{
    if (r->head == NULL)
        worker_timer_cancel(r->w, &r->cmd_timer);
    else if (!timer_armed(&r->cmd_timer) || r->cmd_timer.deadline != r->head->deadline)
        worker_timer_arm(r->w, &r->cmd_timer, r->head->deadline);
}

static void
cmd_unlink(struct redis *r, struct redis_cmd *c)
{
    struct redis_cmd **p = &r->head;
    while (*p != NULL && *p != c)
        p = &(*p)->next;
    if (*p == NULL)
        return;
    *p = c->next;
    if (r->tail == &c->next)
        r->tail = p;
    r->stats.pending--;
}

static void
on_hiredis_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)ac;
    struct redis_cmd *c = privdata;
    struct redis *r = c->r;
    cmd_unlink(r, c);
    if (reply == NULL)
        r->up = false; /* the context is dying: queue nothing more on it */
    else
        r->stats.replies++;
    if (!r->closing) {
        c->cb(r, reply, c->arg);
        if (!r->closing) /* else the callback freed r: its timers stay cancelled */
            cmd_timer_update(r);
    }
    free(c);
}

static int
cmd_send(struct redis *r, redis_reply_fn *cb, void *arg, int argc, const char **argv,
         const size_t *lens)
{
    if (r->link == NULL || r->link->ac == NULL)
        return -ENOTCONN;
    struct redis_cmd *c = malloc(sizeof(*c));
    if (c == NULL)
        return -ENOMEM;
    c->next = NULL;
    c->r = r;
    c->cb = cb;
    c->arg = arg;
    c->deadline = clock_mono_ns() + r->cmd_timeout;
    if (redisAsyncCommandArgv(r->link->ac, on_hiredis_reply, c, argc, argv, lens) != REDIS_OK) {
        free(c);
        return -ENOTCONN;
    }
    *r->tail = c;
    r->tail = &c->next;
    r->stats.pending++;
    r->stats.commands++;
    cmd_timer_update(r);
    return 0;
}

int
redis_command(struct redis *r, redis_reply_fn *cb, void *arg, int argc, const char **argv,
              const size_t *lens)
{
    if (!r->up || r->closing)
        return -ENOTCONN;
    return cmd_send(r, cb, arg, argc, argv, lens);
}

/* Drop the context; from a hiredis callback the free happens when it
 * returns. Pending commands get NULL replies, then ev_cleanup runs. */
static void
link_drop(struct redis *r)
{
    r->up = false;
    if (r->link != NULL && r->link->ac != NULL)
        redisAsyncFree(r->link->ac);
}

static void
redis_on_cmd_timer(struct timer *t, void *ctx)
{
    (void)ctx;
    struct redis *r = (struct redis *)((char *)t - offsetof(struct redis, cmd_timer));
    uint64_t now = clock_mono_ns();
    if (r->head == NULL)
        return;
    if (r->head->deadline > now) {
        cmd_timer_update(r);
        return;
    }
    r->stats.timeouts++;
    log_msg(LOG_WARN, "event=redis_timeout redis=%s pending=%u timeout_ms=%llu", r->addr,
            r->stats.pending, (unsigned long long)(r->cmd_timeout / 1000000ULL));
    redis_enter(r); /* the NULL replies and the state callback run inside */
    link_drop(r);
    redis_leave(r);
}

/* --- connection keeping ----------------------------------------------- */

static void
redis_set_state(struct redis *r, enum redis_state st)
{
    if (r->state == st)
        return;
    r->state = st;
    if (r->on_state != NULL)
        r->on_state(r, st, r->state_arg);
}

static void
redis_schedule(struct redis *r)
{
    worker_timer_arm(r->w, &r->reconnect_timer, clock_mono_ns() + r->backoff);
    r->backoff = r->backoff * 2 > r->backoff_max ? r->backoff_max : r->backoff * 2;
}

static void
redis_lost(struct redis *r)
{
    r->stats.failures++;
    redis_schedule(r);
    redis_set_state(r, REDIS_STATE_DOWN);
}

/* Does an error reply start with this code (its first word)? */
static bool
error_is(const struct redisReply *reply, const char *code)
{
    size_t n = strlen(code);
    return reply->len >= n && memcmp(reply->str, code, n) == 0 &&
           (reply->len == n || reply->str[n] == ' ');
}

/* arg: the first command's name ("AUTH" or "PING", a literal). An error
 * reply to it is logged as what it is: a Redis still loading its dataset
 * (or busy with a script, or a replica without its master) is not ready
 * yet, which is no fault of ours and passes like a refused connect; a
 * refused AUTH, or a PING that asks for one, is the operator's to fix.
 * Either way the connection is dropped and re-made with backoff. */
static void
on_hello(struct redis *r, const struct redisReply *reply, void *arg)
{
    const char *cmd = arg;
    if (reply == NULL)
        return; /* the link is dying; ev_cleanup counts it */
    if (reply->type == REDIS_REPLY_ERROR) {
        int len = (int)(reply->len > 200 ? 200 : reply->len);
        if (error_is(reply, "LOADING") || error_is(reply, "BUSY") ||
            error_is(reply, "MASTERDOWN") || error_is(reply, "TRYAGAIN"))
            log_msg(LOG_INFO, "event=redis_not_ready redis=%s cmd=%s reply=\"%.*s\" note=retrying",
                    r->addr, cmd, len, reply->str);
        else if (strcmp(cmd, "AUTH") == 0 || error_is(reply, "NOAUTH") ||
                 error_is(reply, "WRONGPASS"))
            log_msg(LOG_ERR, "event=redis_auth_failed redis=%s cmd=%s reply=\"%.*s\"", r->addr,
                    cmd, len, reply->str);
        else
            log_msg(LOG_ERR, "event=redis_hello_failed redis=%s cmd=%s reply=\"%.*s\"", r->addr,
                    cmd, len, reply->str);
        link_drop(r);
        return;
    }
    r->up = true;
    r->backoff = r->backoff_min;
    r->stats.connects++;
    redis_set_state(r, REDIS_STATE_UP);
}

/* The reader's privdata is the link (set in redis_attempt). Returning
 * NULL makes hiredis fail the read: the connection drops and is re-made,
 * as after any protocol error. */
static void *
reply_create_array(const redisReadTask *task, int elements)
{
    const struct redis_link *ln = task->privdata;
    if (elements > REPLY_ELEMENTS_MAX)
        return NULL;
    return ln->create_array(task, elements);
}

static void
redis_attempt(struct redis *r)
{
    redisAsyncContext *ac = redisAsyncConnect(r->ip, r->port);
    if (ac == NULL || ac->err) {
        log_msg(LOG_DEBUG, "event=redis_connect_failed redis=%s err=\"%s\"", r->addr,
                ac != NULL ? ac->errstr : "out of memory");
        if (ac != NULL)
            redisAsyncFree(ac);
        redis_lost(r);
        return;
    }
    struct redis_link *ln = calloc(1, sizeof(*ln));
    if (ln == NULL) {
        redisAsyncFree(ac);
        redis_lost(r);
        return;
    }
    ln->rd.kind = OP_CALLBACK;
    ln->rd.done = link_on_read;
    ln->wr.kind = OP_CALLBACK;
    ln->wr.done = link_on_write;
    ln->w = r->w;
    ln->r = r;
    ln->ac = ac;
    ln->fd = ac->c.fd;
    redisReader *rd = ac->c.reader;
    ln->fns = *rd->fn;
    ln->create_array = rd->fn->createArray;
    ln->fns.createArray = reply_create_array;
    rd->fn = &ln->fns;
    rd->privdata = ln;
    ac->ev.data = ln;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    r->link = ln;
    /* The first command proves the connection (and bounds the connect
     * with its deadline); hiredis writes it once connect(2) completes. */
    int rc;
    if (r->password != NULL && r->user != NULL) {
        const char *argv[] = {"AUTH", r->user, r->password};
        size_t lens[] = {4, strlen(r->user), strlen(r->password)};
        rc = cmd_send(r, on_hello, (void *)"AUTH", 3, argv, lens);
    } else if (r->password != NULL) {
        const char *argv[] = {"AUTH", r->password};
        size_t lens[] = {4, strlen(r->password)};
        rc = cmd_send(r, on_hello, (void *)"AUTH", 2, argv, lens);
    } else {
        const char *argv[] = {"PING"};
        size_t lens[] = {4};
        rc = cmd_send(r, on_hello, (void *)"PING", 1, argv, lens);
    }
    if (rc < 0)
        link_drop(r); /* its cleanup schedules the next attempt */
}

static void
redis_on_reconnect_timer(struct timer *t, void *ctx)
{
    (void)ctx;
    struct redis *r = (struct redis *)((char *)t - offsetof(struct redis, reconnect_timer));
    if (r->link == NULL && !r->closing) {
        redis_enter(r); /* a failed attempt tells the state callback */
        redis_attempt(r);
        redis_leave(r);
    }
}

/* --- setup ------------------------------------------------------------ */

static int
url_parse(const char *url, struct redis_endpoint *r, char *err, size_t errlen)
{
    struct redis_url u;
    char e[200];
    if (redis_url_split(url, REDIS_URL_DB, &u, e, sizeof(e)) < 0) {
        snprintf(err, errlen, "redis url: %s", e);
        return -EINVAL;
    }
    if (u.path[0] != '\0' && strcmp(u.path, "0") != 0) {
        snprintf(err, errlen,
                 "redis url: unexpected path '/%s' (database numbers other than 0 are not "
                 "supported: keys carry hash tags so that a Cluster can hold them)",
                 u.path);
        return -EINVAL;
    }
    /* A user goes with a password, even an empty one (AUTH user "" for a
     * nopass ACL user); an empty password alone is none. */
    if (u.user[0] != '\0' && (r->user = strdup(u.user)) == NULL)
        return -ENOMEM;
    if ((u.user[0] != '\0' || u.password[0] != '\0') && (r->password = strdup(u.password)) == NULL)
        return -ENOMEM;
    const char *host = u.host;
    r->port = u.port;
    /* Resolved once, now, so that no connect on the worker waits on DNS. */
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc != 0 || res == NULL) {
        snprintf(err, errlen, "redis url: cannot resolve '%s': %s", host, gai_strerror(rc));
        return -EINVAL;
    }
    const void *a = res->ai_family == AF_INET6
                        ? (const void *)&((struct sockaddr_in6 *)res->ai_addr)->sin6_addr
                        : (const void *)&((struct sockaddr_in *)res->ai_addr)->sin_addr;
    inet_ntop(res->ai_family, a, r->ip, sizeof(r->ip));
    freeaddrinfo(res);
    snprintf(r->addr, sizeof(r->addr), "%s:%d", host, r->port);
    return 0;
}

int
redis_url_parse(const char *url, struct redis_endpoint *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    int rc = url_parse(url, out, err, errlen);
    if (rc < 0) {
        free(out->user);
        free(out->password);
        out->user = out->password = NULL;
    }
    return rc;
}

int
redis_new(struct worker *w, const struct redis_opts *o, redis_state_fn *on_state, void *arg,
          struct redis **out, char *err, size_t errlen)
{
    *out = NULL;
    if (o->url == NULL || *o->url == '\0') {
        snprintf(err, errlen, "redis: no url");
        return -EINVAL;
    }
    struct redis *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    r->w = w;
    r->on_state = on_state;
    r->state_arg = arg;
    r->tail = &r->head;
    r->state = REDIS_STATE_CONNECTING;
    r->cmd_timeout = MS_TO_NS(o->cmd_timeout_ms ? o->cmd_timeout_ms : 1000);
    r->backoff_min = MS_TO_NS(o->reconnect_min_ms ? o->reconnect_min_ms : 100);
    r->backoff_max = MS_TO_NS(o->reconnect_max_ms ? o->reconnect_max_ms : 5000);
    if (r->backoff_max < r->backoff_min)
        r->backoff_max = r->backoff_min;
    r->backoff = r->backoff_min;
    timer_init(&r->reconnect_timer, redis_on_reconnect_timer);
    timer_init(&r->cmd_timer, redis_on_cmd_timer);
    struct redis_endpoint ep;
    int rc = redis_url_parse(o->url, &ep, err, errlen);
    memcpy(r->ip, ep.ip, sizeof(r->ip));
    r->port = ep.port;
    memcpy(r->addr, ep.addr, sizeof(r->addr));
    r->user = ep.user;
    r->password = ep.password;
    if (rc == 0 && o->password != NULL) {
        free(r->password);
        r->password = strdup(o->password);
        if (r->password == NULL)
            rc = -ENOMEM;
    }
    if (rc == 0)
        rc = worker_timer_arm(w, &r->reconnect_timer, 0);
    if (rc < 0) {
        if (rc == -ENOMEM)
            snprintf(err, errlen, "out of memory");
        free(r->user);
        free(r->password);
        free(r);
        return rc;
    }
    *out = r;
    return 0;
}

/* Free r: no handler of it runs, hiredis holds none of its commands. */
static void
redis_release(struct redis *r)
{
    worker_timer_cancel(r->w, &r->reconnect_timer);
    worker_timer_cancel(r->w, &r->cmd_timer);
    while (r->head != NULL) {
        struct redis_cmd *c = r->head; /* hiredis never took it: cannot happen */
        r->head = c->next;
        free(c);
    }
    free(r->user);
    free(r->password);
    free(r);
}

struct redis *
redis_free(struct redis *r)
{
    if (r == NULL || r->closing)
        return NULL;
    r->closing = true;
    worker_timer_cancel(r->w, &r->reconnect_timer);
    worker_timer_cancel(r->w, &r->cmd_timer);
    /* Pending callbacks are skipped (closing). From inside a callback of
     * r, hiredis frees the context once the callback returns, answering
     * the pending commands first: their records and r stay until then,
     * and the handler that called into r frees it (redis_leave). */
    link_drop(r);
    if (r->depth == 0)
        redis_release(r);
    return NULL;
}
