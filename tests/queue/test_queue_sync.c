/*
 * The queue when a sync fails after a commit landed: fdatasync and fsync
 * are replaced in this binary (LMDB calls them through the PLT), so that
 * a chosen call fails with EIO while the data is in the file all the
 * same, and a chosen call waits until the test lets it go. Each test gets
 * a fresh spool in a temp dir that it removes.
 *
 * Threading: one test at a time; the hook is read by the committer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <ftw.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/log.h"
#include "queue/queue.h"

/* 0: every sync succeeds; n: the n-th sync from the arming fails, with
 * sync_errno (and, with sync_fail_on, every one after it too, until the
 * next arming: a disk that keeps failing). */
static atomic_int sync_fail_at;
static atomic_bool sync_fail_on;
static atomic_int sync_errno = EIO;
static atomic_int sync_calls;
/* n: the n-th sync from the arming waits in the hook until sync_release()
 * (0: none), so that a test can line requests up behind a commit. */
static pthread_mutex_t hold_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hold_cond = PTHREAD_COND_INITIALIZER;
static int sync_hold_at;   /* guarded by hold_mu */
static bool sync_holding;  /* guarded by hold_mu: the committer waits in the hook */
static bool sync_released; /* guarded by hold_mu */

static void
sync_release(void)
{
    pthread_mutex_lock(&hold_mu);
    sync_released = true;
    pthread_cond_broadcast(&hold_cond);
    pthread_mutex_unlock(&hold_mu);
}

static void
sync_arm(int hold, int fail)
{
    sync_release(); /* a hold from before goes on */
    pthread_mutex_lock(&hold_mu);
    atomic_store(&sync_calls, 0);
    atomic_store(&sync_fail_at, fail);
    atomic_store(&sync_fail_on, false);
    sync_hold_at = hold;
    sync_holding = sync_released = false;
    pthread_mutex_unlock(&hold_mu);
}

static void
sync_fail_arm(int n)
{
    sync_arm(0, n);
}

/* Wait until the held sync is reached. */
static void
sync_wait_held(void)
{
    pthread_mutex_lock(&hold_mu);
    while (!sync_holding)
        pthread_cond_wait(&hold_cond, &hold_mu);
    pthread_mutex_unlock(&hold_mu);
}

static int
sync_hook(void)
{
    int at = atomic_load(&sync_fail_at);
    pthread_mutex_lock(&hold_mu);
    int hold = sync_hold_at;
    pthread_mutex_unlock(&hold_mu);
    if (at == 0 && hold == 0)
        return 0;
    int n = atomic_fetch_add(&sync_calls, 1) + 1;
    if (n == hold) {
        pthread_mutex_lock(&hold_mu);
        sync_holding = true;
        pthread_cond_broadcast(&hold_cond);
        while (!sync_released)
            pthread_cond_wait(&hold_cond, &hold_mu);
        sync_hold_at = 0;
        pthread_mutex_unlock(&hold_mu);
    }
    if (at == 0 || n < at || (n > at && !atomic_load(&sync_fail_on)))
        return 0;
    if (!atomic_load(&sync_fail_on))
        atomic_store(&sync_fail_at, 0);
    errno = atomic_load(&sync_errno);
    return -1;
}

int
fdatasync(int fd)
{
    return sync_hook() != 0 ? -1 : (int)syscall(SYS_fdatasync, fd);
}

int
fsync(int fd)
{
    return sync_hook() != 0 ? -1 : (int)syscall(SYS_fsync, fd);
}

static int
rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

struct fixture {
    char dir[256];
    struct queue_config cfg;
    struct queue *q;
};

static int
setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof(f->dir), "%s/sluice-qsync-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(f->dir) == NULL)
        return -1;
    char err[512];
    if (conf_defaults(queue_conf_keys, &f->cfg, err, sizeof(err)) != 0)
        return -1;
    free(f->cfg.path);
    char path[300];
    snprintf(path, sizeof(path), "%s/spool", f->dir);
    f->cfg.path = strdup(path);
    f->cfg.map_size = 64ULL << 20;
    int rc = queue_open(&f->cfg, &f->q, err, sizeof(err));
    if (rc != 0)
        fail_msg("queue_open: %s (%s)", err, queue_strerror(rc));
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fixture *f = *state;
    sync_fail_arm(0);
    queue_close(f->q);
    conf_free(queue_conf_keys, &f->cfg);
    nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

struct seen {
    uint64_t id;
    unsigned rcpt, n;
};

static int
on_taken(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct seen *s = arg;
    s->id = id;
    s->rcpt = r->index;
    s->n++;
    return 0;
}

/* A take whose commit landed but whose sync then failed: the recipients
 * left the time index and are ready in the spool, so the caller must get
 * them. Reported failed, nobody owned them until the next restart (the
 * index no longer lists them, and only the start-up walk finds ready
 * recipients). */
static void
test_take_survives_a_failed_sync(void **state)
{
    struct fixture *f = *state;
    struct queue *q = f->q;
    struct queue_rcpt rc = {.addr = "a@x.example"};
    struct queue_envelope env = {
        .id = queue_id_next(q), .sender = "s@y.example", .nrcpt = 1, .rcpt = &rc};
    struct iovec iov = {(void *)"body\r\n", 6};
    assert_int_equal(queue_enqueue_wait(q, &env, &iov, 1), 0);
    uint64_t due = queue_id_time_ms(env.id) + 1000;
    struct queue_outcome o = {env.id, 0, QUEUE_DEFERRED, due, 451, "later", 0, false, NULL, 0};
    assert_int_equal(queue_update_wait(q, &o, 1), 0);

    /* the take's commit syncs its data (1st), the idle committer then
     * syncs its meta page (2nd): that one fails */
    sync_fail_arm(2);
    struct seen s = {0};
    int n = queue_due_take_wait(q, due, 0, on_taken, &s);
    assert_int_equal(atomic_load(&sync_fail_at), 0); /* the failure did happen */
    assert_int_equal(n, 1);
    assert_int_equal(s.n, 1);
    assert_true(s.id == env.id);
    assert_int_equal(s.rcpt, 0);
    /* and nothing is left to take: it is the caller's now */
    struct seen again = {0};
    assert_int_equal(queue_due_take_wait(q, due, 0, on_taken, &again), 0);
    struct queue_envelope *got = NULL;
    assert_int_equal(queue_envelope_get(q, env.id, &got), 0);
    assert_int_equal(got->nrcpt, 1);
    assert_int_equal(got->rcpt[0].state, QUEUE_RCPT_READY);
    queue_envelope_free(got);
}

struct put_wait {
    int rc;
    bool done;
};

static void
put_done(void *cookie, int rc)
{
    struct put_wait *w = cookie;
    w->rc = rc;
    w->done = true;
}

static int
lines_seen(void *arg, uint64_t seq, const char *text, size_t len)
{
    (void)seq;
    char *out = arg;
    size_t have = strlen(out);
    if (have + len < 64) {
        memcpy(out + have, text, len);
        out[have + len] = '\0';
    }
    return 0;
}

/* Event lines put alone whose commit landed but whose sync then failed:
 * they are in the spool and published durable, so the events pump moves
 * them to the journal. Reported failed, the engine logged them lost
 * (event=events_lost) although every line reached the journal. */
static void
test_events_put_survives_a_failed_sync(void **state)
{
    struct fixture *f = *state;
    struct queue *q = f->q;
    struct queue_port *port = queue_port_new();
    assert_non_null(port);

    /* the put's commit syncs its data (1st), the idle committer then
     * syncs its meta page (2nd): that one fails */
    sync_fail_arm(2);
    struct put_wait w = {0};
    assert_int_equal(queue_events_put(q, port, "e1\ne2\n", 6, put_done, &w), 0);
    for (int i = 0; i < 100 && !w.done; i++)
        queue_port_wait(port, 100);
    assert_true(w.done);
    assert_int_equal(atomic_load(&sync_fail_at), 0); /* the failure did happen */
    assert_int_equal(w.rc, 0);
    /* the lines are there, and published to the pump */
    assert_int_equal(queue_events_durable(q), 2);
    char text[64] = "";
    assert_int_equal(queue_events_read(q, 0, 1 << 20, lines_seen, text), 1);
    assert_string_equal(text, "e1\ne2\n");
    queue_port_free(port);
}

/* The same with a note (the bounce listener's report): its caller must
 * hear of the failed sync, since it answers 250 only for what a crash
 * cannot lose, and the reporter sends a report answered 451 again. Its
 * lines are not published: the report sent again commits them again, and
 * the sinks had the event twice. */
static void
test_events_note_fails_with_a_failed_sync(void **state)
{
    struct fixture *f = *state;
    struct queue *q = f->q;
    struct queue_port *port = queue_port_new();
    assert_non_null(port);

    sync_fail_arm(2);
    struct put_wait w = {0};
    assert_int_equal(queue_events_note_put(q, port, "e1\n", 3, "n1", 2, put_done, &w), 0);
    for (int i = 0; i < 100 && !w.done; i++)
        queue_port_wait(port, 100);
    assert_true(w.done);
    assert_int_equal(atomic_load(&sync_fail_at), 0); /* the failure did happen */
    assert_int_equal(w.rc, -EIO);
    /* the reporter's retry: told once */
    w = (struct put_wait){0};
    assert_int_equal(queue_events_note_put(q, port, "e1\n", 3, "n1", 2, put_done, &w), 0);
    for (int i = 0; i < 100 && !w.done; i++)
        queue_port_wait(port, 100);
    assert_int_equal(w.rc, 0);
    char text[64] = "";
    assert_true(queue_events_read(q, 0, 1 << 20, lines_seen, text) >= 0);
    assert_string_equal(text, "e1\n");
    queue_port_free(port);
}

/* Submit a message of one recipient; *id (when not NULL) gets its id. */
static int
enqueue_one(struct queue *q, struct queue_port *port, struct put_wait *w, uint64_t *id)
{
    struct queue_rcpt rc = {.addr = "a@x.example"};
    struct queue_envelope env = {
        .id = queue_id_next(q), .sender = "s@y.example", .nrcpt = 1, .rcpt = &rc};
    struct iovec iov = {(void *)"body\r\n", 6};
    if (id != NULL)
        *id = env.id;
    /* its reception line, as the server commits one with the message */
    char qid[QUEUE_ID_STRLEN + 1], line[64];
    queue_id_str(env.id, qid);
    int n = snprintf(line, sizeof(line), "{\"event\":\"reception\",\"id\":\"%s\"}\n", qid);
    return queue_enqueue_events(q, port, &env, &iov, 1, line, (size_t)n, put_done, w);
}

/* The published event lines so far, concatenated into buf. */
static int
events_collect(void *arg, uint64_t seq, const char *text, size_t len)
{
    (void)seq;
    char *buf = arg;
    size_t have = strlen(buf);
    if (have + len < 4096) {
        memcpy(buf + have, text, len);
        buf[have + len] = '\0';
    }
    return 0;
}

static bool
events_name(struct queue *q, uint64_t id)
{
    char buf[4096] = "", qid[QUEUE_ID_STRLEN + 1];
    assert_true(queue_events_read(q, 0, sizeof(buf), events_collect, buf) >= 0);
    queue_id_str(id, qid);
    return strstr(buf, qid) != NULL;
}

/* An enqueue whose commit landed, its meta page waiting for the next
 * sync, when the next commit fails in its data sync: that failed sync was
 * the one that would have made the meta page durable (and Linux reports a
 * write-back error once, so the idle sync after it succeeds without the
 * page). The enqueue is not confirmed and must not be reported stored:
 * its caller would answer 250 for a message a crash can lose. */
static void
test_pending_fails_with_a_failed_commit_sync(void **state)
{
    struct fixture *f = *state;
    char err[512];
    queue_close(f->q);
    f->cfg.max_batch = 1; /* one request per commit */
    int rc = queue_open(&f->cfg, &f->q, err, sizeof(err));
    if (rc != 0)
        fail_msg("queue_open: %s (%s)", err, queue_strerror(rc));
    struct queue *q = f->q;
    struct queue_port *port = queue_port_new();
    assert_non_null(port);

    /* x's commit syncs its data (1st, held while a and b line up); a's
     * commit syncs its data (2nd), which makes x's meta page durable; b's
     * commit syncs its data (3rd) and would make a's durable: it fails */
    sync_arm(1, 3);
    struct put_wait x = {0}, a = {0}, b = {0};
    assert_int_equal(enqueue_one(q, port, &x, NULL), 0);
    sync_wait_held();
    assert_int_equal(enqueue_one(q, port, &a, NULL), 0);
    assert_int_equal(enqueue_one(q, port, &b, NULL), 0);
    sync_release();
    for (int i = 0; i < 100 && !(x.done && a.done && b.done); i++)
        queue_port_wait(port, 100);
    assert_true(x.done && a.done && b.done);
    assert_int_equal(atomic_load(&sync_fail_at), 0); /* the failure did happen */
    assert_int_equal(x.rc, 0);
    assert_int_equal(b.rc, -EIO);
    assert_int_equal(a.rc, -EIO);
    queue_port_free(port);
}

/* Reopen f's spool with max_batch 1: one request per commit. */
static struct queue *
reopen_batch_one(struct fixture *f)
{
    char err[512];
    queue_close(f->q);
    f->cfg.max_batch = 1;
    int rc = queue_open(&f->cfg, &f->q, err, sizeof(err));
    if (rc != 0)
        fail_msg("queue_open: %s (%s)", err, queue_strerror(rc));
    return f->q;
}

struct find {
    uint64_t id;
    bool found;
};

static int
find_id(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    (void)r;
    struct find *fd = arg;
    fd->found |= id == fd->id;
    return 0;
}

/* Whether the walk the engine makes at start (requeue_spool) meets id. */
static bool
walk_has(struct queue *q, uint64_t id)
{
    struct find fd = {id, false};
    assert_int_equal(queue_walk(q, find_id, &fd), 0);
    return fd.found;
}

/* As in test_pending_fails_with_a_failed_commit_sync: x stored, a's
 * commit landed but the sync that was to confirm it (b's data sync, the
 * 3rd) failed, b's commit did not land. With keep_failing, every sync
 * from that one on fails. ids: x, a, b. */
static void
unconfirmed_run(struct queue *q, struct queue_port *port, bool keep_failing, uint64_t ids[3])
{
    sync_arm(1, 3);
    atomic_store(&sync_fail_on, keep_failing);
    struct put_wait x = {0}, a = {0}, b = {0};
    assert_int_equal(enqueue_one(q, port, &x, &ids[0]), 0);
    sync_wait_held();
    assert_int_equal(enqueue_one(q, port, &a, &ids[1]), 0);
    assert_int_equal(enqueue_one(q, port, &b, &ids[2]), 0);
    sync_release();
    for (int i = 0; i < 100 && !(x.done && a.done && b.done); i++)
        queue_port_wait(port, 100);
    assert_true(x.done && a.done && b.done);
    assert_int_equal(x.rc, 0);
    assert_int_equal(a.rc, -EIO);
    assert_int_equal(b.rc, -EIO);
}

/* An enqueue failed as not confirmed ("maybe applied": its client is
 * answered 451 and sends the message again) whose commit did land: its
 * record sat ready in the spool, unknown to the engine, and the walk of
 * the next start delivered it, a duplicate hours later. The spool removes
 * it, durably, before the failure is reported. */
static void
test_unconfirmed_enqueue_is_removed(void **state)
{
    struct fixture *f = *state;
    struct queue *q = reopen_batch_one(f);
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    uint64_t ids[3];
    unconfirmed_run(q, port, false, ids);
    queue_port_free(port);
    assert_true(walk_has(q, ids[0]));
    struct queue_envelope *got = NULL;
    assert_int_equal(queue_envelope_get(q, ids[1], &got), QUEUE_ENOTFOUND);
    queue_envelope_free(got);
    assert_false(walk_has(q, ids[1]));
    assert_false(walk_has(q, ids[2]));
    /* nor its reception line: no event sink hears of a message that is
     * never delivered (the client's retry makes one of its own) */
    assert_true(events_name(q, ids[0]));
    assert_false(events_name(q, ids[1]));
    /* and a restart does not find it either */
    q = reopen_batch_one(f);
    assert_true(walk_has(q, ids[0]));
    assert_false(walk_has(q, ids[1]));
    assert_false(events_name(q, ids[1]));
}

/* The same when the removal cannot be made durable either (every sync
 * fails): the spool is failing. The record stays (nothing could remove
 * it; a restart now would deliver it, which the log says), new mail is
 * refused, and the first commit that works again removes it before it
 * takes mail. */
static void
test_unconfirmed_removal_is_retried(void **state)
{
    struct fixture *f = *state;
    struct queue *q = reopen_batch_one(f);
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    uint64_t ids[3];
    unconfirmed_run(q, port, true, ids);
    assert_true(walk_has(q, ids[1])); /* the removal failed */

    struct put_wait c = {0}, d = {0};
    uint64_t idc, idd;
    assert_int_equal(enqueue_one(q, port, &c, &idc), 0);
    for (int i = 0; i < 100 && !c.done; i++)
        queue_port_wait(port, 100);
    assert_true(c.done);
    assert_int_equal(c.rc, -EIO);
    assert_false(walk_has(q, idc));
    assert_true(walk_has(q, ids[1]));

    sync_fail_arm(0); /* the disk is back */
    assert_int_equal(enqueue_one(q, port, &d, &idd), 0);
    for (int i = 0; i < 100 && !d.done; i++)
        queue_port_wait(port, 100);
    assert_true(d.done);
    assert_int_equal(d.rc, 0);
    assert_true(walk_has(q, idd));
    assert_false(walk_has(q, ids[1]));
    queue_port_free(port);
    /* counted: a's record removed (b's commit never landed: nothing to
     * remove), c refused while the spool was failing */
    struct queue_stats st;
    queue_stats(q, &st);
    assert_int_equal(st.unconfirmed_removed, 1);
    assert_int_equal(st.sync_failing_refused, 1);
    q = reopen_batch_one(f);
    assert_true(walk_has(q, ids[0]));
    assert_true(walk_has(q, idd));
    assert_false(walk_has(q, ids[1]));
}

/* The same, but no request comes once the disk is back: the committer
 * tries the removal again on its own timer. It used to try only before a
 * batch, so that the spool's taking mail again (and the record's going)
 * waited for whoever submitted next: the engine's due poll, every
 * second, but nothing in the spool promised it. */
static void
test_unconfirmed_removal_retried_without_a_batch(void **state)
{
    struct fixture *f = *state;
    struct queue *q = reopen_batch_one(f);
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    uint64_t ids[3];
    unconfirmed_run(q, port, true, ids);
    queue_port_free(port);
    assert_true(walk_has(q, ids[1])); /* the removal failed */
    /* the timer keeps trying while the disk fails */
    int calls = atomic_load(&sync_calls);
    for (int i = 0; i < 200 && atomic_load(&sync_calls) == calls; i++)
        usleep(10000);
    assert_true(atomic_load(&sync_calls) > calls);
    assert_true(walk_has(q, ids[1]));

    sync_fail_arm(0); /* the disk is back; nobody submits anything */
    /* at most the longest backoff (5 s) away; readers do not wake it */
    for (int i = 0; i < 700 && walk_has(q, ids[1]); i++)
        usleep(10000);
    assert_false(walk_has(q, ids[1]));
    struct queue_stats st;
    queue_stats(q, &st);
    assert_int_equal(st.unconfirmed_removed, 1);
    assert_int_equal(st.sync_failing_refused, 0);
    /* and durably: a restart does not find it */
    q = reopen_batch_one(f);
    assert_true(walk_has(q, ids[0]));
    assert_false(walk_has(q, ids[1]));
}

/* The spool stops while the removal still fails: each message is named
 * in the log, and it is still there at the next start. That is the limit
 * the spool documents (commit.c, drop_unconfirmed): nothing on disk can
 * mark it when no write can be made durable. */
static void
test_unconfirmed_kept_at_stop(void **state)
{
    struct fixture *f = *state;
    struct queue *q = reopen_batch_one(f);
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    uint64_t ids[3];
    unconfirmed_run(q, port, true, ids);
    queue_port_free(port);
    char logp[300], qid[QUEUE_ID_STRLEN + 1], want[64], text[8192];
    snprintf(logp, sizeof(logp), "%s/stop.log", f->dir);
    assert_int_equal(log_open(logp, LOG_INFO), 0);
    queue_close(f->q); /* names ids[1]: the next start delivers what is on disk */
    log_close();
    f->q = NULL;
    FILE *lf = fopen(logp, "r");
    assert_non_null(lf);
    size_t got = fread(text, 1, sizeof(text) - 1, lf);
    text[got] = '\0';
    fclose(lf);
    queue_id_str(ids[1], qid);
    snprintf(want, sizeof(want), "queue=unconfirmed_kept path=");
    assert_non_null(strstr(text, want));
    snprintf(want, sizeof(want), "id=%s ", qid);
    assert_non_null(strstr(text, want));
    sync_fail_arm(0);
    q = reopen_batch_one(f);
    assert_true(walk_has(q, ids[0]));
    assert_true(walk_has(q, ids[1]));
}

/* The same with a sync that fails for want of space (ENOSPC: a quota, a
 * file system without fallocate): the commits of the batch were retried
 * and went in, and what was not confirmed must not fail with a space
 * error, which says "not applied" (queue.h): the engine's retry of such
 * an update finds its outcomes applied already and tells nothing (no
 * delivery-log line, no DSN handed on). -EIO says "maybe applied". */
static void
test_unconfirmed_fails_without_a_space_error(void **state)
{
    struct fixture *f = *state;
    struct queue *q = f->q;
    uint64_t ids[2];
    for (int i = 0; i < 2; i++) {
        struct queue_rcpt rc = {.addr = "a@x.example"};
        struct queue_envelope env = {
            .id = queue_id_next(q), .sender = "s@y.example", .nrcpt = 1, .rcpt = &rc};
        struct iovec iov = {(void *)"body\r\n", 6};
        assert_int_equal(queue_enqueue_wait(q, &env, &iov, 1), 0);
        ids[i] = env.id;
    }
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    atomic_store(&sync_errno, ENOSPC);
    sync_arm(1, 2); /* x's data sync held while the updates line up; the next fails */
    struct put_wait x = {0}, u1 = {0}, u2 = {0};
    assert_int_equal(enqueue_one(q, port, &x, NULL), 0);
    sync_wait_held();
    struct queue_outcome o1 = {ids[0], 0, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0};
    struct queue_outcome o2 = {ids[1], 0, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0};
    assert_int_equal(queue_update(q, port, &o1, 1, put_done, &u1), 0);
    assert_int_equal(queue_update(q, port, &o2, 1, put_done, &u2), 0);
    sync_release();
    for (int i = 0; i < 100 && !(x.done && u1.done && u2.done); i++)
        queue_port_wait(port, 100);
    atomic_store(&sync_errno, EIO);
    assert_true(x.done && u1.done && u2.done);
    assert_int_equal(atomic_load(&sync_fail_at), 0); /* the failure did happen */
    const struct put_wait *u[] = {&u1, &u2};
    for (int i = 0; i < 2; i++) {
        struct queue_envelope *got = NULL;
        int rc = queue_envelope_get(q, ids[i], &got);
        queue_envelope_free(got);
        /* applied (the message went with its last recipient) ... */
        assert_int_equal(rc, QUEUE_ENOTFOUND);
        /* ... so never "not applied" */
        if (queue_error_is_space(u[i]->rc))
            fail_msg("update %d applied, reported %s", i, queue_strerror(u[i]->rc));
        assert_true(u[i]->rc == 0 || u[i]->rc == -EIO);
    }
    queue_port_free(port);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_take_survives_a_failed_sync, setup, teardown),
        cmocka_unit_test_setup_teardown(test_events_put_survives_a_failed_sync, setup, teardown),
        cmocka_unit_test_setup_teardown(test_events_note_fails_with_a_failed_sync, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pending_fails_with_a_failed_commit_sync, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_unconfirmed_fails_without_a_space_error, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_unconfirmed_enqueue_is_removed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unconfirmed_removal_is_retried, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unconfirmed_removal_retried_without_a_batch, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_unconfirmed_kept_at_stop, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
