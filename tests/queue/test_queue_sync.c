/*
 * The queue when a sync fails after a commit landed: fdatasync and fsync
 * are replaced in this binary (LMDB calls them through the PLT), so that
 * a chosen call fails with EIO while the data is in the file all the
 * same. Each test gets a fresh spool in a temp dir that it removes.
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
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "queue/queue.h"

/* 0: every sync succeeds; n: the n-th sync from the arming fails. */
static atomic_int sync_fail_at;
static atomic_int sync_calls;

static void
sync_fail_arm(int n)
{
    atomic_store(&sync_calls, 0);
    atomic_store(&sync_fail_at, n);
}

static int
sync_hook(void)
{
    int at = atomic_load(&sync_fail_at);
    if (at == 0 || atomic_fetch_add(&sync_calls, 1) + 1 != at)
        return 0;
    atomic_store(&sync_fail_at, 0);
    errno = EIO;
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
    struct queue_outcome o = {env.id, 0, QUEUE_DEFERRED, due, 451, "later", 0};
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

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_take_survives_a_failed_sync, setup, teardown),
        cmocka_unit_test_setup_teardown(test_events_put_survives_a_failed_sync, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
