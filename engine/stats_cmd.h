/*
 * stats_cmd.h: the stats socket's command thread (engine/stats_cmd.c), as
 * engine/stats.c uses it. Not a public header.
 */
#ifndef SLUICE_ENGINE_STATS_CMD_H
#define SLUICE_ENGINE_STATS_CMD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/json.h"
#include "engine/stats.h"

struct stats_cmd;

/* An engine command's answer on its way back to the stats thread, for
 * the client at slot as it was at gen (a client that left meanwhile lost
 * its slot, perhaps to another: gen tells). */
struct stats_cmd_job {
    struct stats_cmd_job *next;
    const char *verb; /* borrowed: a static string (the command table's) */
    size_t slot;      /* the client's index in the stats server's table */
    uint64_t gen;     /* that client's gen then */
    struct json out;  /* the answer line, newline included */
    struct stats_caller who; /* its fd owned: closed once the command ran */
    char args[STATS_LINE_MAX + 1];
};

/* Start the command thread, which runs ops->command (ops is copied).
 * Returns 0 and *out, or a negative code with a message in err. */
int stats_cmd_new(const struct stats_ops *ops, struct stats_cmd **out, char *err,
                  size_t errlen);
/* Stop the thread, after the command under way if any (no bound of its
 * own: the engine's commands give up once the stop began, e->stopping,
 * and the stop as a whole has its watch, engine_stop). Its answer, and
 * an error for each command queued and never run, are left for
 * stats_cmd_take() (the eventfd written), so that the stats thread, still
 * running, or the caller once it is joined, sends them before their
 * clients are closed. A command submitted from the call on is answered
 * so at once, not run. Idempotent; the owner's (stats_server_free), the
 * stats thread running or not. */
void stats_cmd_stop(struct stats_cmd *q);
/* Stop the thread if it runs (stats_cmd_stop) and free what it holds,
 * answered or not. Returns NULL. */
struct stats_cmd *stats_cmd_free(struct stats_cmd *q);
/* An eventfd, readable once answers wait in stats_cmd_take(). */
int stats_cmd_fd(const struct stats_cmd *q);
/* Queue verb (static) and args, sent by who, for the client at slot,
 * gen. who->fd, if any, is the job's from then on (closed once the
 * command ran, or with the job). Once stats_cmd_stop was called, the job
 * is answered at once (STATS_CMD_NOT_RUN) for stats_cmd_take(). False
 * without memory: who->fd stays the caller's. */
bool stats_cmd_submit(struct stats_cmd *q, const char *verb, const char *args,
                      const struct stats_caller *who, size_t slot, uint64_t gen);
/* The answers made since the last call (the eventfd is read): a list the
 * caller frees with stats_cmd_jobs_free(). */
struct stats_cmd_job *stats_cmd_take(struct stats_cmd *q);
void stats_cmd_jobs_free(struct stats_cmd_job *j);

#endif
