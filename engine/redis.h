/*
 * redis: one hiredis async connection (hiredis/async.h) driven by one
 * worker's ring. hiredis's event hooks (addRead/delRead/addWrite/delWrite/
 * cleanup) arm one-shot IORING_OP_POLL_ADD ops on the connection's fd; a
 * completion calls redisAsyncHandleRead/Write. Connect is non-blocking;
 * a lost connection is re-made from a worker timer with exponential
 * backoff (reconnect_min_ms doubling up to reconnect_max_ms, back to the
 * minimum once a connection is up). No call here blocks the worker,
 * except the one getaddrinfo() of redis_new() (setup time) that turns the
 * URL's host into a numeric address for every later connect.
 *
 * A command that gets no reply within cmd_timeout_ms counts as Redis
 * down: the connection is dropped (every pending command is answered with
 * a NULL reply) and re-made with backoff. The first command of every
 * connection (AUTH or PING) carries the same deadline, so it also bounds
 * the connect. An error reply to it fails the attempt like a refused
 * connect (dropped, re-made with backoff) and is logged as what it is:
 * redis_not_ready (info: -LOADING, -BUSY, -MASTERDOWN, -TRYAGAIN),
 * redis_auth_failed (error: a refused AUTH, or -NOAUTH to a PING) or
 * redis_hello_failed (error: anything else).
 *
 * Replies come in the order commands were sent (one FIFO of pending
 * commands), so one timer at the oldest deadline covers them all.
 *
 * Lifetime (STYLE rule 7): the poll ops live in a per-connection link
 * allocated apart from struct redis. redis_free() cancels them and leaves
 * the link to free itself when the last one comes back; when the worker's
 * loop no longer turns (w->stopping), nothing will come back and the link
 * is freed at once.
 *
 * Threading: everything on the worker's thread.
 */
#ifndef SLUICE_ENGINE_REDIS_H
#define SLUICE_ENGINE_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/worker.h"

struct redis;
struct redisReply;

struct redis_opts {
    const char *url;      /* redis://[[user]:password@]host[:port], or host[:port]; required */
    const char *password; /* NULL: the URL's, if any */
    uint64_t cmd_timeout_ms;   /* 0: 1000 */
    uint64_t reconnect_min_ms; /* 0: 100 */
    uint64_t reconnect_max_ms; /* 0: 5000 */
};

enum redis_state {
    REDIS_STATE_CONNECTING, /* first attempt under way */
    REDIS_STATE_UP,         /* connected, authenticated, answering */
    REDIS_STATE_DOWN,       /* lost or never reached: reconnecting with backoff */
};

/* A command's reply (borrowed: valid during the call only), or NULL when
 * none will come (timeout, connection lost). Runs exactly once for every
 * command redis_command() accepted, on the worker, never inside
 * redis_command() itself; not at all once redis_free() was called. */
typedef void redis_reply_fn(struct redis *r, const struct redisReply *reply, void *arg);
/* The connection went up or down (each change once). */
typedef void redis_state_fn(struct redis *r, enum redis_state st, void *arg);

/* A Redis URL taken apart, its host resolved (getaddrinfo: setup time
 * only). Also used by warmup.c's keeper thread (a blocking connection off
 * the workers). */
struct redis_endpoint {
    char ip[46];          /* numeric */
    int port;
    char addr[256 + 8];   /* "host:port" for logs */
    char *user, *password; /* owned (free()); NULL: none */
};
/* Returns 0, or -EINVAL / -ENOMEM with one line in err (on failure user
 * and password are freed). */
int redis_url_parse(const char *url, struct redis_endpoint *out, char *err, size_t errlen);

/* A connection on w (borrowed: outlives r). The first connect starts from
 * a timer, so on w's thread once its loop turns. Returns 0, or -EINVAL
 * (bad URL, unknown host) / -ENOMEM with one line in err. */
int redis_new(struct worker *w, const struct redis_opts *o, redis_state_fn *on_state, void *arg,
              struct redis **out, char *err, size_t errlen);
/* Drop the connection; pending callbacks never run. Returns NULL. Also
 * from inside a callback of r (a reply or a state change): r is then
 * freed once that callback returned, and nothing of r runs meanwhile. */
struct redis *redis_free(struct redis *r);

enum redis_state redis_state(const struct redis *r);
const char *redis_state_str(enum redis_state st);
/* "host:port" as connected to (for logs). */
const char *redis_addr(const struct redis *r);

/* Queue one command (argv copied). Returns 0 (cb will run), -ENOTCONN
 * when the connection is not up, or -ENOMEM. */
int redis_command(struct redis *r, redis_reply_fn *cb, void *arg, int argc, const char **argv,
                  const size_t *lens);

struct redis_stats {
    uint64_t connects;    /* connections that came up */
    uint64_t failures;    /* attempts that failed or connections lost */
    uint64_t timeouts;    /* commands whose reply did not come in time */
    uint64_t commands;    /* commands sent */
    uint64_t replies;     /* replies received */
    unsigned pending;     /* commands waiting for a reply now */
};
void redis_stats(const struct redis *r, struct redis_stats *out);

#endif
