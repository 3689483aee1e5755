/*
 * Full spool: on a 2 MB map, enqueue until the distinct "no room" error;
 * outcome updates still commit, in the same batch as refused enqueues too;
 * the messages they finish free room and enqueues succeed again; what was
 * acknowledged survives and the spool stays consistent across a reopen.
 * A bounce and its DSN commit together through the reserve when the same
 * DSN alone would be refused.
 * Then the same with a full disk: a child process mounts an 8 MB tmpfs in
 * a mount namespace of its own (skipped where namespaces are not allowed).
 *
 * Threading: one thread, plus the queue's own; the disk test forks first.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <ftw.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

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
        struct queue_outcome o = {ids[i], 0, QUEUE_DELIVERED, 0, 250, "2.0.0 ok",
                                  0, false, NULL, 0};
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
full_then_room(struct fixture *f)
{
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

static void
test_full_then_room(void **state)
{
    full_then_room(*state);
}

/* The same with the sweep of finished messages held off (sweep_ms a
 * minute): their pages come back when an enqueue finds the spool short
 * of room, and the deliveries commit all along. */
static void
test_full_then_room_sweep_held(void **state)
{
    struct fixture *f = *state;
    queue_close(f->q);
    f->cfg.sweep_ms = 60000;
    char err[512];
    assert_int_equal(queue_open(&f->cfg, &f->q, err, sizeof(err)), 0);
    full_then_room(f);
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
        o[i] = (struct queue_outcome){ids[i], 0, QUEUE_BOUNCED, 0, 550, "no", 0, false, NULL, 0};
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

/* ---- a full disk, in a child with a small tmpfs of its own ---- */

#define CHILD_CHECK(cond)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "disk-full child: %s:%d: %s\n", __FILE__, __LINE__, #cond);            \
            _exit(1);                                                                              \
        }                                                                                          \
    } while (0)

static int
write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, text, strlen(text));
    close(fd);
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

/* A mount namespace of our own: directly as root, else inside a user
 * namespace where we are root. Returns 0 or -1 (then the test skips). */
static int
private_mounts(void)
{
    if (unshare(CLONE_NEWNS) != 0) {
        uid_t uid = getuid();
        gid_t gid = getgid();
        if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0)
            return -1;
        char map[64];
        snprintf(map, sizeof(map), "0 %u 1", (unsigned)uid);
        if (write_file("/proc/self/uid_map", map) != 0)
            return -1;
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof(map), "0 %u 1", (unsigned)gid);
        if (write_file("/proc/self/gid_map", map) != 0)
            return -1;
    }
    return mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
}

static void
disk_full_child(const char *dir)
{
    if (private_mounts() != 0 || mount("tmpfs", dir, "tmpfs", 0, "size=8m") != 0)
        _exit(77);
    struct queue_config cfg = {0};
    char err[512];
    conf_defaults(queue_conf_keys, &cfg, err, sizeof(err));
    free(cfg.path);
    char path[300];
    snprintf(path, sizeof(path), "%s/spool", dir);
    cfg.path = strdup(path);
    cfg.map_size = 64u << 20; /* far more than the disk */
    struct queue *q;
    CHILD_CHECK(queue_open(&cfg, &q, err, sizeof(err)) == 0);
    memset(body, 'd', sizeof(body));
    static uint64_t ids[4096], more[4096];
    size_t n = 0;
    int rc;
    while ((rc = put(q, &ids[n])) == 0 && n < 4095)
        n++;
    CHILD_CHECK(rc == -ENOSPC); /* the disk, not the map */
    CHILD_CHECK(queue_error_is_space(rc));
    CHILD_CHECK(n > 200);
    struct queue_stats st;
    queue_stats(q, &st);
    CHILD_CHECK(st.enqueue_refused >= 1);
    /* the committer is alive, the refusal holds */
    uint64_t x;
    CHILD_CHECK(put(q, &x) == -ENOSPC);
    /* deletions commit on the full disk, and make room */
    for (size_t i = 0; i < n / 2; i++) {
        struct queue_outcome o = {ids[i], 0, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0};
        CHILD_CHECK(queue_update_wait(q, &o, 1) == 0);
    }
    size_t m = 0;
    while ((rc = put(q, &more[m])) == 0 && m < 4095)
        m++;
    CHILD_CHECK(rc == -ENOSPC);
    CHILD_CHECK(m >= n / 4);
    struct queue_check_report rep;
    CHILD_CHECK(queue_check(q, &rep) == 0);
    CHILD_CHECK(rep.messages == n - n / 2 + m);
    queue_close(q);
    CHILD_CHECK(queue_open(&cfg, &q, err, sizeof(err)) == 0);
    CHILD_CHECK(queue_check(q, &rep) == 0);
    CHILD_CHECK(rep.messages == n - n / 2 + m);
    char buf[BODY_LEN + 1];
    size_t len;
    CHILD_CHECK(queue_body_read(q, more[m - 1], 0, buf, sizeof(buf), &len) == 0);
    CHILD_CHECK(len == BODY_LEN && memcmp(buf, body, BODY_LEN) == 0);
    queue_close(q);
    conf_free(queue_conf_keys, &cfg);
    _exit(0);
}

static void
test_disk_full(void **state)
{
    struct fixture *f = *state;
    char dir[300];
    snprintf(dir, sizeof(dir), "%s/small", f->dir);
    assert_int_equal(mkdir(dir, 0700), 0);
    /* The child forks from a process with one thread: the fixture's queue
     * threads are stopped first. A fork beside them may copy a lock one of
     * them holds (the sanitizers' allocator lock, for one), and the
     * child's own queue threads then wait on it for ever. */
    queue_close(f->q);
    f->q = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        signal(SIGSEGV, SIG_DFL);
        signal(SIGABRT, SIG_DFL);
        disk_full_child(dir);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 77)
        skip(); /* no mount namespace here */
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}


/* A DSN is committed with the bounce that causes it, through the reserve
 * kept for updates: on a spool so full that the same message is refused
 * as an enqueue, the bounce and its DSN still commit, in one commit. The
 * originals have a second recipient still waiting, so a bounce frees
 * (almost) nothing: the DSN's room comes from the reserve alone. */
static void
test_dsn_through_reserve(void **state)
{
    struct fixture *f = *state;
    uint64_t ids[2000];
    size_t n = 0;
    for (;; n++) {
        assert_true(n < 2000);
        struct queue_rcpt r[2] = {{.addr = "gone@bounce.example"}, {.addr = "later@defer.example"}};
        struct queue_envelope env = {
            .id = queue_id_next(f->q), .sender = "s@sender.example", .nrcpt = 2, .rcpt = r};
        struct iovec iov = {body, BODY_LEN};
        ids[n] = env.id;
        int rc = queue_enqueue_wait(f->q, &env, &iov, 1);
        if (rc != 0) {
            assert_int_equal(rc, QUEUE_EMAPFULL);
            break;
        }
    }
    assert_true(n > 10);
    static char dsn[3000];
    memset(dsn, 'd', sizeof(dsn));
    struct queue_rcpt dr = {.addr = "s@sender.example"};
    struct queue_envelope denv = {.id = queue_id_next(f->q), .sender = "", .nrcpt = 1, .rcpt = &dr};
    struct iovec diov = {dsn, sizeof(dsn)};
    /* as a plain enqueue, as the DSN used to go: refused */
    assert_int_equal(queue_enqueue_wait(f->q, &denv, &diov, 1), QUEUE_EMAPFULL);

    for (size_t i = 0; i < 8; i++) {
        struct queue_stats before, after;
        queue_stats(f->q, &before);
        denv.id = queue_id_next(f->q);
        struct queue_outcome o = {ids[i], 0, QUEUE_BOUNCED, 0, 550, "5.1.1 no such user",
                                  0, false, NULL, 0};
        assert_int_equal(queue_update_enqueue_wait(f->q, &o, 1, &denv, &diov, 1), 0);
        queue_stats(f->q, &after);
        assert_int_equal(after.commits - before.commits, 1); /* one commit holds both */
        assert_int_equal(after.enqueued - before.enqueued, 1);
        struct queue_envelope *e = NULL;
        assert_int_equal(queue_envelope_get(f->q, denv.id, &e), 0);
        assert_int_equal(e->body_len, sizeof(dsn));
        assert_string_equal(e->rcpt[0].addr, "s@sender.example");
        queue_envelope_free(e);
        assert_int_equal(queue_envelope_get(f->q, ids[i], &e), 0);
        assert_int_equal(e->nrcpt, 1); /* the bounced one is gone, the other waits */
        assert_int_equal(e->rcpt[0].index, 1);
        queue_envelope_free(e);
    }
    /* DSNs may take half the reserve, never the rest: once it is gone a
     * bounce with its DSN fails whole (the recipient stays, to be tried
     * again), while an update that only deletes still commits. */
    size_t i = 8;
    int rc = 0;
    for (; i < n && rc == 0; i++) {
        denv.id = queue_id_next(f->q);
        struct queue_outcome o = {ids[i], 0, QUEUE_BOUNCED, 0, 550, "5.1.1 no such user",
                                  0, false, NULL, 0};
        rc = queue_update_enqueue_wait(f->q, &o, 1, &denv, &diov, 1);
    }
    assert_int_equal(rc, QUEUE_EMAPFULL);
    struct queue_envelope *e = NULL;
    assert_int_equal(queue_envelope_get(f->q, ids[i - 1], &e), 0);
    assert_int_equal(e->nrcpt, 2); /* its bounce was not committed either */
    queue_envelope_free(e);
    assert_int_equal(queue_envelope_get(f->q, denv.id, &e), QUEUE_ENOTFOUND);
    struct queue_outcome del[2] = {{ids[i - 1], 0, QUEUE_DELIVERED, 0, 250, "ok",
                                    0, false, NULL, 0},
                                   {ids[i - 1], 1, QUEUE_DELIVERED, 0, 250, "ok",
                                    0, false, NULL, 0}};
    assert_int_equal(queue_update_wait(f->q, del, 2), 0);
    struct queue_check_report rep;
    assert_int_equal(queue_check(f->q, &rep), 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_full_then_room, setup, teardown),
        cmocka_unit_test_setup_teardown(test_full_then_room_sweep_held, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mixed_batch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_too_large, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dsn_through_reserve, setup, teardown),
        cmocka_unit_test_setup_teardown(test_disk_full, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
