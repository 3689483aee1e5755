/*
 * test_redis: engine/redis.c's connection on a real worker ring, against
 * a redis-server of the test's own on loopback (tests/support). Checks
 * that redis_free() may be called from inside the connection's own
 * callbacks (a reply callback with more replies pending, the state
 * callback as the connection comes up) without freeing what hiredis and
 * redis.c still use once the callback returns: run under ASan
 * (-DSLUICE_SANITIZE=ON) a use after free fails the test.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <semaphore.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <hiredis/hiredis.h>

#include "engine/redis.h"
#include "engine/worker.h"
#include "tests/support/redis_server.h"

enum free_from { FREE_IN_REPLY, FREE_IN_STATE };

struct fixture {
    struct worker w;
    struct redis *r;
    enum free_from where;
    unsigned replies;  /* replies the callbacks saw (NULL ones too) */
    bool freed;
    sem_t done;
};

/* The connection's end: the loop stops with this turn (so the link's
 * polls are not waited for: redis.h), r goes. */
static void
free_here(struct fixture *f)
{
    f->w.stopping = true;
    f->r = redis_free(f->r);
    f->freed = true;
    sem_post(&f->done);
}

static void
on_reply(struct redis *r, const struct redisReply *reply, void *arg)
{
    (void)r;
    (void)reply;
    struct fixture *f = arg;
    f->replies++;
    if (!f->freed)
        free_here(f); /* the other two PINGs are still pending */
}

static void
on_state(struct redis *r, enum redis_state st, void *arg)
{
    struct fixture *f = arg;
    if (st != REDIS_STATE_UP || f->freed)
        return;
    if (f->where == FREE_IN_STATE) {
        free_here(f); /* inside the reply callback of the first PING */
        return;
    }
    const char *argv[] = {"PING"};
    size_t lens[] = {4};
    for (int i = 0; i < 3; i++)
        assert_int_equal(redis_command(r, on_reply, f, 1, argv, lens), 0);
}

static void
sem_wait_bounded(sem_t *s, unsigned secs)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += secs;
    int rc;
    while ((rc = sem_timedwait(s, &ts)) < 0 && errno == EINTR)
        ;
    assert_int_equal(rc, 0);
}

static void
free_from_callback(enum free_from where)
{
    if (redis_server_path() == NULL) {
        print_message("redis-server is not installed: skipping\n");
        skip();
    }
    static struct fixture f;
    memset(&f, 0, sizeof(f));
    f.where = where;
    if (worker_init(&f.w, 0, 256, NULL) < 0) {
        print_message("io_uring is not available: skipping\n");
        skip();
    }
    int port = redis_server_free_port();
    assert_true(port > 0);
    char err[256];
    pid_t pid = redis_server_start(port, err, sizeof(err));
    if (pid < 0)
        fail_msg("%s", err);
    char url[64];
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", port);
    struct redis_opts o = {.url = url, .cmd_timeout_ms = 5000};
    sem_init(&f.done, 0, 0);
    assert_int_equal(redis_new(&f.w, &o, on_state, &f, &f.r, err, sizeof(err)), 0);
    assert_int_equal(worker_start(&f.w), 0);
    sem_wait_bounded(&f.done, 30);
    worker_stop(&f.w);
    worker_join(&f.w);
    redis_server_kill(pid);
    assert_true(f.freed);
    assert_null(f.r);
    /* redis_free: no callback runs after it, not even with a NULL reply */
    assert_int_equal(f.replies, where == FREE_IN_REPLY ? 1 : 0);
    worker_fini(&f.w);
    sem_destroy(&f.done);
}

/* redis_free() from a reply callback while two more replies are pending:
 * hiredis frees the context once the callback returns and answers the
 * pending ones (NULL replies) first; their records and the struct redis
 * must still be there. */
static void
test_free_in_a_reply_callback(void **state)
{
    (void)state;
    free_from_callback(FREE_IN_REPLY);
}

/* redis_free() from the state callback as the connection comes up: it
 * runs inside the reply callback of the connection's first command. */
static void
test_free_in_the_state_callback(void **state)
{
    (void)state;
    free_from_callback(FREE_IN_STATE);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_free_in_a_reply_callback),
        cmocka_unit_test(test_free_in_the_state_callback),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
