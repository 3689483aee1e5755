/*
 * Full spool: on a 2 MB map, enqueue until the distinct "no room" error;
 * outcome updates still commit, in the same batch as refused enqueues too;
 * the messages they finish free room and enqueues succeed again; what was
 * acknowledged survives and the spool stays consistent across a reopen.
 *
 * Threading: one thread, plus the queue's own.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "queue/queue.h"

#define MAP_SIZE (2u << 20)
#define BODY_LEN 4000

struct fixture {
    char dir[256];
    struct queue_config cfg;
    struct queue *q;
};

static int
rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int
setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof(f->dir), "%s/sluice-full-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(f->dir) == NULL)
        return -1;
    char err[512];
    conf_defaults(queue_conf_keys, &f->cfg, err, sizeof(err));
    free(f->cfg.path);
    char path[300];
    snprintf(path, sizeof(path), "%s/spool", f->dir);
    f->cfg.path = strdup(path);
    f->cfg.map_size = MAP_SIZE;
    if (queue_open(&f->cfg, &f->q, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fixture *f = *state;
    queue_close(f->q);
    conf_free(queue_conf_keys, &f->cfg);
    nftw(f->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static char body[BODY_LEN];

static int
put(struct queue *q, uint64_t *id)
{
    struct queue_rcpt r = {.addr = "someone@example.com"};
    struct queue_envelope env = {
        .id = queue_id_next(q), .sender = "s@example.com", .nrcpt = 1, .rcpt = &r};
    struct iovec iov = {body, BODY_LEN};
    *id = env.id;
    return queue_enqueue_wait(q, &env, &iov, 1);
}

/* Enqueue until refused; returns how many were acknowledged. */
static size_t
fill(struct queue *q, uint64_t *ids, size_t max)
{
    size_t n = 0;
    for (;;) {
        assert_true(n < max);
        int rc = put(q, &ids[n]);
        if (rc != 0) {
            assert_int_equal(rc, QUEUE_EMAPFULL);
            assert_true(queue_error_is_space(rc));
            return n;
        }
        n++;
    }
}

static void
deliver(struct queue *q, const uint64_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct queue_outcome o = {ids[i], 0, QUEUE_DELIVERED, 0, 250, "2.0.0 ok"};
        assert_int_equal(queue_update_wait(q, &o, 1), 0);
    }
}

static void
assert_readable(struct queue *q, const uint64_t *ids, size_t n)
{
    char buf[BODY_LEN + 1];
    for (size_t i = 0; i < n; i++) {
        size_t len;
        assert_int_equal(queue_body_read(q, ids[i], 0, buf, sizeof(buf), &len), 0);
        assert_int_equal(len, BODY_LEN);
        assert_memory_equal(buf, body, BODY_LEN);
    }
}

static void
test_full_then_room(void **state)
{
    struct fixture *f = *state;
    memset(body, 'x', sizeof(body));
    static uint64_t ids[4096];
    size_t n = fill(f->q, ids, 4096);
    assert_true(n > 50); /* 2 MB holds a good number of 4 KB messages */
    struct queue_stats st;
    queue_stats(f->q, &st);
    assert_true(st.enqueue_refused >= 1);
    assert_true(st.map_used <= MAP_SIZE);
    struct queue_check_report rep;
    assert_int_equal(queue_check(f->q, &rep), 0);
    assert_true(rep.messages == n);
    assert_readable(f->q, ids, n);

    /* still refused: the committer did not die and did not let one slip */
    uint64_t extra;
    assert_int_equal(put(f->q, &extra), QUEUE_EMAPFULL);

    /* deliveries commit although the spool is full, and free room */
    deliver(f->q, ids, n / 2);
    uint64_t more[4096];
    size_t m = fill(f->q, more, 4096);
    assert_true(m >= n / 4);
    assert_readable(f->q, ids + n / 2, n - n / 2);
    assert_readable(f->q, more, m);

    /* and again, to the bottom and back */
    deliver(f->q, ids + n / 2, n - n / 2);
    deliver(f->q, more, m);
    assert_int_equal(queue_check(f->q, &rep), 0);
    assert_true(rep.messages == 0);
    size_t k = fill(f->q, ids, 4096);
    assert_true(k >= n * 3 / 4);

    /* everything acknowledged survives a reopen */
    queue_close(f->q);
    f->q = NULL;
    char err[512];
    assert_int_equal(queue_open(&f->cfg, &f->q, err, sizeof(err)), 0);
    assert_int_equal(queue_check(f->q, &rep), 0);
    assert_true(rep.messages == k);
    assert_readable(f->q, ids, k);
}

struct result {
    int rc;
    bool done;
};

static void
on_done(void *cookie, int rc)
{
    struct result *r = cookie;
    r->rc = rc;
    r->done = true;
}

/* Enqueues refused and an update in the same batch: the update commits. */
static void
test_mixed_batch(void **state)
{
    struct fixture *f = *state;
    memset(body, 'y', sizeof(body));
    static uint64_t ids[4096];
    size_t n = fill(f->q, ids, 4096);
    struct queue_port *p = queue_port_new();
    struct result res[9] = {{0}};
    struct queue_rcpt r = {.addr = "a@example.com"};
    struct iovec iov = {body, BODY_LEN};
    /* submitted back to back: they end up in one or two batches */
    for (int i = 0; i < 4; i++) {
        struct queue_envelope env = {
            .id = queue_id_next(f->q), .sender = "", .nrcpt = 1, .rcpt = &r};
        assert_int_equal(queue_enqueue(f->q, p, &env, &iov, 1, on_done, &res[i]), 0);
    }
    struct queue_outcome o[8];
    for (int i = 0; i < 8; i++)
        o[i] = (struct queue_outcome){ids[i], 0, QUEUE_BOUNCED, 0, 550, "no"};
    assert_int_equal(queue_update(f->q, p, o, 8, on_done, &res[4]), 0);
    for (int i = 5; i < 9; i++) {
        struct queue_envelope env = {
            .id = queue_id_next(f->q), .sender = "", .nrcpt = 1, .rcpt = &r};
        assert_int_equal(queue_enqueue(f->q, p, &env, &iov, 1, on_done, &res[i]), 0);
    }
    while (queue_port_pending(p) > 0)
        assert_true(queue_port_wait(p, 5000) >= 0);
    queue_port_free(p);
    assert_int_equal(res[4].rc, 0); /* the update */
    for (int i = 0; i < 9; i++) {
        assert_true(res[i].done);
        if (i != 4)
            assert_true(res[i].rc == 0 || res[i].rc == QUEUE_EMAPFULL);
    }
    for (int i = 0; i < 4; i++)
        assert_int_equal(res[i].rc, QUEUE_EMAPFULL); /* before the room was freed */
    struct queue_check_report rep;
    assert_int_equal(queue_check(f->q, &rep), 0);
    char buf[16];
    size_t len;
    for (int i = 0; i < 8; i++)
        assert_int_equal(queue_body_read(f->q, ids[i], 0, buf, sizeof(buf), &len), QUEUE_ENOTFOUND);
    assert_readable(f->q, ids + 8, n - 8);
}

/* A message larger than the whole map: refused, nothing else disturbed. */
static void
test_too_large(void **state)
{
    struct fixture *f = *state;
    memset(body, 'z', sizeof(body));
    uint64_t a;
    assert_int_equal(put(f->q, &a), 0);
    size_t len = 3u << 20;
    char *big = malloc(len);
    memset(big, 'B', len);
    struct queue_rcpt r = {.addr = "a@example.com"};
    struct queue_envelope env = {.id = queue_id_next(f->q), .sender = "", .nrcpt = 1, .rcpt = &r};
    struct iovec iov = {big, len};
    assert_int_equal(queue_enqueue_wait(f->q, &env, &iov, 1), QUEUE_EMAPFULL);
    free(big);
    uint64_t b;
    assert_int_equal(put(f->q, &b), 0);
    assert_readable(f->q, &a, 1);
    assert_readable(f->q, &b, 1);
    struct queue_check_report rep;
    assert_int_equal(queue_check(f->q, &rep), 0);
    assert_true(rep.messages == 2);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_full_then_room, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mixed_batch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_too_large, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
