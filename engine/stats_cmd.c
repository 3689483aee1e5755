/*
 * stats_cmd: the stats socket's command thread. The engine's commands
 * (ops->command: flush, bounce, reload, ...; seconds to minutes for a big
 * queue) run here, one at a time, in the order they came, so that the
 * stats thread (engine/stats.c) goes on answering stats, domains, metrics
 * and HTTP meanwhile. Jobs go in at todo (stats_cmd_submit), their
 * answers come back at done, and an eventfd tells the stats thread
 * (stats_cmd_take).
 *
 * Threading: stats_cmd_new, _submit and _take are the stats thread's
 * (_take also its owner's once that thread has been joined); _stop is
 * its owner's, called while the stats thread still runs (it goes on
 * answering while the command under way ends: stats_server_free), and
 * _free its owner's once that thread has been joined; the command
 * thread runs ops->command and writes only the job it took and the
 * scratch buffer. lock guards todo, done and stop; started is the
 * owner's.
 *
 * A job owns the descriptor its client passed with the line, if any
 * (stats.h, struct stats_caller): closed once its command ran, or with
 * the job when sluice stops first. */
#include "engine/stats_cmd.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/log.h"
#include "engine/stats_int.h"

struct stats_cmd {
    struct stats_ops ops;
    pthread_t thread;
    bool started;
    pthread_mutex_t lock;
    pthread_cond_t cv;
    struct stats_cmd_job *todo, **todo_tail, *done; /* owned lists */
    bool stop;
    int done_fd;         /* owned eventfd; -1: none */
    struct json scratch; /* for ops->command, on the command thread */
};

/* One engine command's answer, as the line protocol has it: its object
 * with "ok":true first, or {"ok":false,"error":...}. */
static void
do_engine(struct stats_cmd *q, const char *verb, const char *args, const struct stats_caller *who,
          struct json *out)
{
    if (q->ops.command == NULL) {
        char b[64];
        snprintf(b, sizeof(b), "%s: not available", verb);
        stats_answer_error(out, b);
        return;
    }
    char err[1024] = ""; /* suppress import's counts, then its path (cut to fit) */
    struct json *r = &q->scratch;
    json_reset(r);
    int rc = q->ops.command(q->ops.arg, verb, args, who, r, err, sizeof(err));
    if (rc != 0) {
        err[sizeof(err) - 1] = '\0';
        stats_answer_error(out, err[0] != '\0' ? err : "failed");
        return;
    }
    if (json_failed(r)) {
        stats_answer_error(out, "out of memory");
        return;
    }
    /* A raw newline can only be whitespace between tokens (the writer
     * escapes those in strings); the protocol is one line per answer. */
    for (size_t i = 0; i < r->len; i++)
        if (r->buf[i] == '\n' || r->buf[i] == '\r')
            r->buf[i] = ' ';
    json_raw(out, "{\"ok\":true", 10);
    if (r->len >= 2 && r->buf[0] == '{' && r->buf[r->len - 1] == '}') {
        if (r->len > 2) {
            json_raw(out, ",", 1);
            json_raw(out, r->buf + 1, r->len - 1);
        } else {
            json_raw(out, "}", 1);
        }
    } else if (r->len > 0) { /* not an object: kept whole, under a key */
        json_raw(out, ",\"result\":", 10);
        json_raw(out, r->buf, r->len);
        json_raw(out, "}", 1);
    } else {
        json_raw(out, "}", 1);
    }
}

/* j, answered, to done for stats_cmd_take (the eventfd written). Under
 * lock. */
static void
done_push(struct stats_cmd *q, struct stats_cmd_job *j)
{
    j->next = q->done;
    q->done = j;
    uint64_t one = 1;
    (void)!write(q->done_fd, &one, sizeof(one));
}

/* j, never run, answered so (sluice stops): its descriptor closed, then
 * to done. Under lock. */
static void
not_run_push(struct stats_cmd *q, struct stats_cmd_job *j)
{
    if (j->who.fd >= 0)
        close(j->who.fd);
    j->who.fd = -1;
    json_reset(&j->out);
    stats_answer_error(&j->out, STATS_CMD_NOT_RUN);
    json_raw(&j->out, "\n", 1);
    done_push(q, j);
}

/* Run the engine's commands one at a time, in the order they came, as
 * the stats thread alone did before (ops.c expects one caller of
 * commands). A flush or bounce of a million recipients takes seconds to
 * minutes; on the stats thread it held every other client, /metrics and
 * the status page for as long. */
static void *
cmd_thread(void *arg)
{
    struct stats_cmd *q = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    log_altstack_init();
    log_set_thread_name("stats-cmd");
    pthread_mutex_lock(&q->lock);
    for (;;) {
        while (q->todo == NULL && !q->stop)
            pthread_cond_wait(&q->cv, &q->lock);
        if (q->stop)
            break; /* what is left is answered by stats_cmd_stop: not run */
        struct stats_cmd_job *j = q->todo;
        q->todo = j->next;
        if (q->todo == NULL)
            q->todo_tail = &q->todo;
        pthread_mutex_unlock(&q->lock);
        do_engine(q, j->verb, j->args, &j->who, &j->out);
        /* The client's file is released before it hears the answer: an
         * export it reads next is written whole, and closed. */
        if (j->who.fd >= 0)
            close(j->who.fd);
        j->who.fd = -1;
        if (json_failed(&j->out)) {
            json_reset(&j->out);
            stats_answer_error(&j->out, "out of memory");
        }
        json_raw(&j->out, "\n", 1);
        pthread_mutex_lock(&q->lock);
        done_push(q, j);
    }
    pthread_mutex_unlock(&q->lock);
    return NULL;
}

int
stats_cmd_new(const struct stats_ops *ops, struct stats_cmd **out, char *err, size_t errlen)
{
    *out = NULL;
    struct stats_cmd *q = calloc(1, sizeof(*q));
    if (q == NULL) {
        snprintf(err, errlen, "stats: out of memory");
        return -ENOMEM;
    }
    q->ops = *ops;
    q->todo_tail = &q->todo;
    json_init(&q->scratch);
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->cv, NULL);
    int rc;
    q->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->done_fd < 0) {
        rc = -errno;
        snprintf(err, errlen, "eventfd: %s", strerror(-rc));
        goto fail;
    }
    if ((rc = pthread_create(&q->thread, NULL, cmd_thread, q)) != 0) {
        snprintf(err, errlen, "stats command thread: %s", strerror(rc));
        rc = -rc;
        goto fail;
    }
    q->started = true;
    *out = q;
    return 0;
fail:
    stats_cmd_free(q);
    return rc;
}

void
stats_cmd_stop(struct stats_cmd *q)
{
    if (q == NULL || !q->started)
        return;
    /* After the command under way, if any: it may wait a while */
    pthread_mutex_lock(&q->lock);
    q->stop = true;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->lock);
    pthread_join(q->thread, NULL);
    q->started = false;
    /* Those it never came to are answered so, beside the one it ran: a
     * client told why, not a connection closed. */
    pthread_mutex_lock(&q->lock);
    while (q->todo != NULL) { /* the eventfd: a stats thread still running takes them */
        struct stats_cmd_job *j = q->todo;
        q->todo = j->next;
        not_run_push(q, j);
    }
    q->todo_tail = &q->todo;
    pthread_mutex_unlock(&q->lock);
}

struct stats_cmd *
stats_cmd_free(struct stats_cmd *q)
{
    if (q == NULL)
        return NULL;
    stats_cmd_stop(q);
    stats_cmd_jobs_free(q->todo);
    stats_cmd_jobs_free(q->done);
    pthread_mutex_destroy(&q->lock);
    pthread_cond_destroy(&q->cv);
    if (q->done_fd >= 0)
        close(q->done_fd);
    json_fini(&q->scratch);
    free(q);
    return NULL;
}

int
stats_cmd_fd(const struct stats_cmd *q)
{
    return q->done_fd;
}

bool
stats_cmd_submit(struct stats_cmd *q, const char *verb, const char *args,
                 const struct stats_caller *who, size_t slot, uint64_t gen)
{
    struct stats_cmd_job *j = calloc(1, sizeof(*j));
    if (j == NULL)
        return false;
    j->who = *who;
    j->verb = verb;
    j->slot = slot;
    j->gen = gen;
    snprintf(j->args, sizeof(j->args), "%s", args);
    json_init(&j->out);
    pthread_mutex_lock(&q->lock);
    if (q->stop) {
        /* The stop has begun: the command thread takes nothing more, and
         * queued the job would wait unanswered to the close. Told so
         * now, as those it never came to are (stats_cmd_stop). */
        not_run_push(q, j);
        pthread_mutex_unlock(&q->lock);
        return true;
    }
    *q->todo_tail = j;
    q->todo_tail = &j->next;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->lock);
    return true;
}

struct stats_cmd_job *
stats_cmd_take(struct stats_cmd *q)
{
    uint64_t v;
    (void)!read(q->done_fd, &v, sizeof(v));
    pthread_mutex_lock(&q->lock);
    struct stats_cmd_job *list = q->done;
    q->done = NULL;
    pthread_mutex_unlock(&q->lock);
    return list;
}

void
stats_cmd_jobs_free(struct stats_cmd_job *j)
{
    while (j != NULL) {
        struct stats_cmd_job *next = j->next;
        if (j->who.fd >= 0) /* queued, never run: sluice stops */
            close(j->who.fd);
        json_fini(&j->out);
        free(j);
        j = next;
    }
}
