/*
 * Unit tests of the queue: config keys, ids, open/reopen/refusals, every
 * write and read operation, the deferred index, counts, walk, large
 * bodies, ports and stats. Each test gets a fresh spool in a temp dir
 * (under $TMPDIR or /tmp) that teardown removes.
 *
 * Threading: tests run one at a time; the id test starts threads of its own.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <endian.h>
#include <errno.h>
#include <ftw.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/clock.h"
#include "queue/queue.h"

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

static void
rm_rf(const char *path)
{
    nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void
fixture_open(struct fixture *f)
{
    char err[512];
    int rc = queue_open(&f->cfg, &f->q, err, sizeof(err));
    if (rc != 0)
        fail_msg("queue_open: %s (%s)", err, queue_strerror(rc));
}

static int
setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof(f->dir), "%s/sluice-queue-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(f->dir) == NULL)
        return -1;
    char err[256];
    if (conf_defaults(queue_conf_keys, &f->cfg, err, sizeof(err)) != 0)
        return -1;
    free(f->cfg.path);
    char path[300];
    snprintf(path, sizeof(path), "%s/spool", f->dir);
    f->cfg.path = strdup(path);
    f->cfg.map_size = 256ULL << 20;
    fixture_open(f);
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fixture *f = *state;
    queue_close(f->q);
    conf_free(queue_conf_keys, &f->cfg);
    rm_rf(f->dir);
    free(f);
    return 0;
}

static void
reopen(struct fixture *f)
{
    queue_close(f->q);
    f->q = NULL;
    fixture_open(f);
}

/* ---- helpers ---- */

static char *
make_body(size_t len, uint64_t seed)
{
    char *b = malloc(len + 1);
    uint64_t x = seed * 0x9E3779B97F4A7C15ULL + 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b[i] = (char)(' ' + x % 90);
        if (i % 78 == 76)
            b[i] = '\r';
        if (i % 78 == 77)
            b[i] = '\n';
    }
    b[len] = '\0';
    return b;
}

static uint64_t
put_msg(struct queue *q, unsigned nrcpt, const char *domain, const char *body, size_t len)
{
    struct queue_rcpt rc[128];
    char addrs[128][64];
    assert_true(nrcpt <= 128);
    for (unsigned i = 0; i < nrcpt; i++) {
        snprintf(addrs[i], sizeof(addrs[i]), "user%u@%s", i, domain);
        rc[i] = (struct queue_rcpt){.addr = addrs[i]};
    }
    struct queue_envelope env = {
        .id = queue_id_next(q), .sender = "bounce@sender.example", .nrcpt = nrcpt, .rcpt = rc};
    struct iovec iov = {(void *)body, len};
    assert_int_equal(queue_enqueue_wait(q, &env, &iov, 1), 0);
    return env.id;
}

static void
outcome(struct queue *q, uint64_t id, unsigned rcpt, enum queue_outcome_kind kind, uint64_t due,
        unsigned code, const char *reply)
{
    struct queue_outcome o = {id, rcpt, kind, due, code, reply, 0, false, NULL, 0};
    assert_int_equal(queue_update_wait(q, &o, 1), 0);
}

static void
assert_body(struct queue *q, uint64_t id, const char *want, size_t len)
{
    char *got = malloc(len + 1);
    size_t n = 0;
    assert_int_equal(queue_body_read(q, id, 0, got, len + 1, &n), 0);
    assert_int_equal(n, len);
    assert_memory_equal(got, want, len);
    free(got);
}

static void
assert_consistent(struct queue *q)
{
    struct queue_check_report r;
    int rc = queue_check(q, &r);
    if (rc != 0)
        fail_msg("queue_check: %s: bad=%llu orphan=%llu empty=%llu bodies=%llu due=%llu",
                 queue_strerror(rc), (unsigned long long)r.bad_records,
                 (unsigned long long)r.orphan_rcpts, (unsigned long long)r.empty_messages,
                 (unsigned long long)r.bad_bodies, (unsigned long long)r.bad_due);
}

/* ---- config ---- */

static void
test_config_keys(void **state)
{
    (void)state;
    struct queue_config c = {0};
    char err[256];
    assert_int_equal(conf_defaults(queue_conf_keys, &c, err, sizeof(err)), 0);
    assert_string_equal(c.path, "./var/spool");
    assert_true(c.map_size == 4ULL << 30);
    assert_int_equal(c.node_id, 0);
    assert_false(c.unsafe_no_sync);
    assert_int_equal(c.max_batch, 4096);
    assert_int_equal(conf_set(queue_conf_keys, &c, "node_id", "1024", err, sizeof(err)), -EINVAL);
    assert_int_equal(conf_set(queue_conf_keys, &c, "map_size", "512K", err, sizeof(err)), -EINVAL);
    assert_int_equal(conf_set(queue_conf_keys, &c, "map_size", "1M", err, sizeof(err)), 0);
    const struct conf_key *k = conf_find(queue_conf_keys, "unsafe_no_sync");
    assert_non_null(k);
    assert_non_null(strstr(k->help, "GIVES UP durability"));
    assert_non_null(strstr(k->help, "lose mail"));
    conf_free(queue_conf_keys, &c);
}

/* ---- ids ---- */

static void
test_id_text(void **state)
{
    (void)state;
    char a[QUEUE_ID_STRLEN + 1], b[QUEUE_ID_STRLEN + 1];
    uint64_t samples[] = {0, 1, 31, 32, UINT64_MAX, 0x123456789abcdefULL, 1ULL << 63};
    for (size_t i = 0; i < sizeof(samples) / sizeof(samples[0]); i++) {
        uint64_t back = 0;
        queue_id_str(samples[i], a);
        assert_int_equal(strlen(a), QUEUE_ID_STRLEN);
        assert_int_equal(queue_id_parse(a, &back), 0);
        assert_true(back == samples[i]);
    }
    /* text order is numeric order */
    uint64_t x = 88172645463325252ULL;
    for (int i = 0; i < 10000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        uint64_t y = x * 2654435761ULL;
        queue_id_str(x, a);
        queue_id_str(y, b);
        int c = strcmp(a, b);
        assert_true((x < y && c < 0) || (x > y && c > 0) || (x == y && c == 0));
    }
    uint64_t v;
    queue_id_str(0x0123456789abcdefULL, a);
    for (char *p = a; *p; p++)
        if (*p >= 'A' && *p <= 'Z')
            *p = (char)(*p - 'A' + 'a');
    assert_int_equal(queue_id_parse(a, &v), 0); /* case-insensitive */
    assert_true(v == 0x0123456789abcdefULL);
    assert_int_equal(queue_id_parse("0123456789AB", &v), -EINVAL);   /* short */
    assert_int_equal(queue_id_parse("0123456789ABCD", &v), -EINVAL); /* long */
    assert_int_equal(queue_id_parse("0123456789ABU", &v), -EINVAL);  /* not in alphabet */
    assert_int_equal(queue_id_parse("G000000000000", &v), -EINVAL);  /* 65th bit */
    assert_int_equal(queue_id_parse("", &v), -EINVAL);
}

static void
test_id_rule(void **state)
{
    (void)state;
    uint64_t t = QUEUE_ID_EPOCH_MS + 1000000;
    uint64_t a = queue_id_after(0, t, 5);
    assert_true(queue_id_time_ms(a) == t);
    assert_int_equal(queue_id_node(a), 5);
    /* same millisecond: next sequence */
    uint64_t b = queue_id_after(a, t, 5);
    assert_true(b == a + 1);
    /* clock steps back an hour: still increasing, keeps the last time */
    uint64_t c = queue_id_after(b, t - 3600000, 5);
    assert_true(c > b);
    assert_true(queue_id_time_ms(c) == t);
    assert_int_equal(queue_id_node(c), 5);
    /* sequence used up: borrows the next millisecond, node kept */
    uint64_t d = a | 0xfff;
    uint64_t e = queue_id_after(d, t, 5);
    assert_true(e > d);
    assert_true(queue_id_time_ms(e) == t + 1);
    assert_int_equal(queue_id_node(e), 5);
    assert_int_equal(e & 0xfff, 0);
    /* a last id from another node (read from the spool) */
    uint64_t f = queue_id_after(a, t, 7);
    assert_true(f > a);
    assert_int_equal(queue_id_node(f), 7);
    uint64_t g = queue_id_after(f, t, 3);
    assert_true(g > f);
    assert_int_equal(queue_id_node(g), 3);
    /* two nodes at the same instant never collide */
    assert_true(queue_id_after(0, t, 1) != queue_id_after(0, t, 2));
    /* later time wins */
    assert_true(queue_id_after(b, t + 5, 5) == queue_id_after(0, t + 5, 5));
}

#define ID_THREADS 4
#define ID_PER     50000

struct id_job {
    struct queue *q;
    uint64_t *out;
};

static void *
id_thread(void *arg)
{
    struct id_job *j = arg;
    for (int i = 0; i < ID_PER; i++)
        j->out[i] = queue_id_next(j->q);
    return NULL;
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void
test_id_unique_threads(void **state)
{
    struct fixture *f = *state;
    uint64_t *all = malloc(sizeof(uint64_t) * ID_THREADS * ID_PER);
    pthread_t th[ID_THREADS];
    struct id_job jobs[ID_THREADS];
    for (int i = 0; i < ID_THREADS; i++) {
        jobs[i] = (struct id_job){f->q, all + i * ID_PER};
        pthread_create(&th[i], NULL, id_thread, &jobs[i]);
    }
    for (int i = 0; i < ID_THREADS; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < ID_THREADS; i++)
        for (int j = 1; j < ID_PER; j++)
            assert_true(jobs[i].out[j] > jobs[i].out[j - 1]);
    qsort(all, ID_THREADS * ID_PER, sizeof(uint64_t), cmp_u64);
    for (int i = 1; i < ID_THREADS * ID_PER; i++)
        assert_true(all[i] != all[i - 1]);
    /* node id 0, close to now */
    assert_int_equal(queue_id_node(all[0]), 0);
    free(all);
}

/* ---- open ---- */

static void
test_open_refusals(void **state)
{
    struct fixture *f = *state;
    struct queue *q2;
    char err[512];
    /* a second open of the same spool */
    int rc = queue_open(&f->cfg, &q2, err, sizeof(err));
    assert_int_equal(rc, QUEUE_ELOCKED);
    assert_null(q2);
    assert_non_null(strstr(err, f->cfg.path));

    /* a path below a regular file */
    char file[300], bad[320];
    snprintf(file, sizeof(file), "%s/plainfile", f->dir);
    FILE *fp = fopen(file, "w");
    fputs("x", fp);
    fclose(fp);
    snprintf(bad, sizeof(bad), "%s/spool", file);
    struct queue_config c = f->cfg;
    c.path = bad;
    rc = queue_open(&c, &q2, err, sizeof(err));
    assert_true(rc < 0);
    assert_null(q2);
    assert_non_null(strstr(err, bad));
    assert_non_null(strstr(err, "Not a directory"));

    /* nested directories are created */
    char deep[320];
    snprintf(deep, sizeof(deep), "%s/a/b/c", f->dir);
    c.path = deep;
    assert_int_equal(queue_open(&c, &q2, err, sizeof(err)), 0);
    queue_close(q2);
    assert_int_equal(access(deep, R_OK | W_OK | X_OK), 0);

    /* map_size too small */
    c.map_size = 1000;
    rc = queue_open(&c, &q2, err, sizeof(err));
    assert_int_equal(rc, -EINVAL);
}

static void
test_schema_refused(void **state)
{
    struct fixture *f = *state;
    uint64_t id = put_msg(f->q, 1, "example.com", "x\r\n", 3);
    queue_close(f->q);
    f->q = NULL;

    /* write a newer schema version into the meta record */
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_set_mapsize(env, f->cfg.map_size), 0);
    assert_int_equal(mdb_env_open(env, f->cfg.path, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
    uint32_t v = 99;
    MDB_val k = {6, "schema"}, val = {sizeof(v), &v};
    assert_int_equal(mdb_put(txn, dbi, &k, &val, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);

    char err[512];
    int rc = queue_open(&f->cfg, &f->q, err, sizeof(err));
    assert_int_equal(rc, QUEUE_ESCHEMA);
    assert_null(f->q);
    assert_non_null(strstr(err, f->cfg.path));
    assert_non_null(strstr(err, "newer"));
    assert_non_null(strstr(err, "99"));

    /* put it back: the spool opens and the message is intact */
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_set_mapsize(env, f->cfg.map_size), 0);
    assert_int_equal(mdb_env_open(env, f->cfg.path, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
    v = 1;
    assert_int_equal(mdb_put(txn, dbi, &k, &val, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    fixture_open(f);
    assert_body(f->q, id, "x\r\n", 3);
}

/* Schema 2 stores tenant, campaign, pool and priority; a message without
 * them is laid out exactly as schema 1 wrote it (the four octets after
 * body_chunks zero), and a schema 1 spool opens, reads its messages as
 * ownerless, and is marked schema 2. */
static uint32_t
schema_get(const struct fixture *f, uint32_t set)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_set_mapsize(env, f->cfg.map_size), 0);
    assert_int_equal(mdb_env_open(env, f->cfg.path, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
    MDB_val k = {6, "schema"}, v;
    assert_int_equal(mdb_get(txn, dbi, &k, &v), 0);
    uint32_t was;
    memcpy(&was, v.mv_data, sizeof(was));
    if (set != 0) {
        MDB_val nv = {sizeof(set), &set};
        assert_int_equal(mdb_put(txn, dbi, &k, &nv, 0), 0);
    }
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    return was;
}

static void
test_owner_fields_and_schema_1(void **state)
{
    struct fixture *f = *state;
    struct queue_rcpt rc = {.addr = "a@example.org"};
    struct queue_envelope env = {.id = queue_id_next(f->q),
                                 .sender = "s@example.com",
                                 .tenant = "acme",
                                 .campaign = "spring sale",
                                 .pool = "bulk",
                                 .priority = 7,
                                 .nrcpt = 1,
                                 .rcpt = &rc};
    struct iovec iov = {"body\r\n", 6};
    assert_int_equal(queue_enqueue_wait(f->q, &env, &iov, 1), 0);
    uint64_t owned = env.id;
    uint64_t plain = put_msg(f->q, 1, "example.net", "x\r\n", 3);
    /* bounds: a tag of QUEUE_MAX_TAG octets, not one more; priority 0..9 */
    char tag[QUEUE_MAX_TAG + 2];
    memset(tag, 't', sizeof(tag) - 1);
    tag[sizeof(tag) - 1] = '\0';
    env.id = queue_id_next(f->q);
    env.campaign = tag;
    assert_int_equal(queue_enqueue_wait(f->q, &env, &iov, 1), -EINVAL);
    tag[QUEUE_MAX_TAG] = '\0';
    env.priority = 10;
    assert_int_equal(queue_enqueue_wait(f->q, &env, &iov, 1), -EINVAL);
    env.priority = 9;
    assert_int_equal(queue_enqueue_wait(f->q, &env, &iov, 1), 0);
    uint64_t longest = env.id;
    queue_close(f->q);
    f->q = NULL;

    /* the ownerless record: zero where schema 1 had its reserved word */
    MDB_env *menv;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&menv), 0);
    assert_int_equal(mdb_env_set_maxdbs(menv, 8), 0);
    assert_int_equal(mdb_env_open(menv, f->cfg.path, MDB_RDONLY, 0600), 0);
    assert_int_equal(mdb_txn_begin(menv, NULL, MDB_RDONLY, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "msg", 0, &dbi), 0);
    uint64_t be = htobe64(plain);
    MDB_val k = {8, &be}, v;
    assert_int_equal(mdb_get(txn, dbi, &k, &v), 0);
    static const unsigned char zero[4];
    assert_memory_equal((const unsigned char *)v.mv_data + 12, zero, 4);
    mdb_txn_abort(txn);
    mdb_env_close(menv);

    assert_int_equal(schema_get(f, 1), 2); /* written as 2; now made a schema 1 spool */
    fixture_open(f);
    assert_int_equal(schema_get(f, 0), 2); /* opening marked it 2 */
    struct queue_envelope *e;
    assert_int_equal(queue_envelope_get(f->q, owned, &e), 0);
    assert_string_equal(e->tenant, "acme");
    assert_string_equal(e->campaign, "spring sale");
    assert_string_equal(e->pool, "bulk");
    assert_int_equal(e->priority, 7);
    assert_string_equal(e->sender, "s@example.com");
    assert_string_equal(e->rcpt[0].addr, "a@example.org");
    queue_envelope_free(e);
    assert_body(f->q, owned, "body\r\n", 6);
    assert_int_equal(queue_envelope_get(f->q, plain, &e), 0);
    assert_null(e->tenant);
    assert_null(e->campaign);
    assert_null(e->pool);
    assert_int_equal(e->priority, 0);
    queue_envelope_free(e);
    assert_body(f->q, plain, "x\r\n", 3);
    assert_int_equal(queue_envelope_get(f->q, longest, &e), 0);
    assert_int_equal(strlen(e->campaign), QUEUE_MAX_TAG);
    assert_int_equal(e->priority, 9);
    queue_envelope_free(e);
    struct queue_check_report rep;
    assert_int_equal(queue_check(f->q, &rep), 0);
}

/* Rewrite data.mdb as a plain copy of its bytes: the blocks a sluice kept
 * allocated past its end (queue_disk_reserve) are gone, as after a cp or a
 * restore, so that an open that reserves blocks shows in st_blocks. */
static void
data_copy_plain(const struct fixture *f)
{
    char path[400], tmp[420];
    snprintf(path, sizeof(path), "%s/data.mdb", f->cfg.path);
    snprintf(tmp, sizeof(tmp), "%s/data.mdb.copy", f->cfg.path);
    FILE *in = fopen(path, "rb"), *out = fopen(tmp, "wb");
    assert_non_null(in);
    assert_non_null(out);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), in)) > 0)
        assert_int_equal(fwrite(buf, 1, n, out), n);
    fclose(in);
    assert_int_equal(fclose(out), 0);
    assert_int_equal(rename(tmp, path), 0);
}

static int
no_event(void *arg, uint64_t seq, const char *text, size_t len)
{
    (void)arg;
    (void)seq;
    (void)text;
    (void)len;
    fail_msg("an event in a spool without events");
    return -1;
}

static void
data_stat(const struct fixture *f, struct stat *st)
{
    char path[400];
    snprintf(path, sizeof(path), "%s/data.mdb", f->cfg.path);
    assert_int_equal(stat(path, st), 0);
}

/* A read-only open reads everything and changes nothing: an older
 * schema number stays (queue_open would raise it and the older sluice
 * would then refuse its spool), no blocks are reserved, a spool without
 * an events database is not given one, writes are refused, nothing is
 * created where there is no spool. Its lock is shared with readers and
 * keeps a writer out. */
static void
test_open_readonly(void **state)
{
    struct fixture *f = *state;
    uint64_t id = put_msg(f->q, 2, "example.com", "x\r\n", 3);
    queue_close(f->q);
    f->q = NULL;

    /* an older sluice's spool: schema 1, no events database */
    assert_int_equal(schema_get(f, 1), 2);
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_set_mapsize(env, f->cfg.map_size), 0);
    assert_int_equal(mdb_env_open(env, f->cfg.path, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "events", 0, &dbi), 0);
    assert_int_equal(mdb_drop(txn, dbi, 1), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    data_copy_plain(f);
    struct stat before, after;
    data_stat(f, &before);

    char err[512];
    struct queue *r1, *r2, *w;
    assert_int_equal(queue_open_readonly(&f->cfg, &r1, err, sizeof(err)), 0);
    assert_int_equal(queue_open_readonly(&f->cfg, &r2, err, sizeof(err)), 0);
    assert_int_equal(queue_open(&f->cfg, &w, err, sizeof(err)), QUEUE_ELOCKED);
    assert_null(w);
    struct queue_counts c;
    assert_int_equal(queue_counts(r1, &c, NULL, NULL), 0);
    assert_int_equal(c.messages, 1);
    assert_int_equal(c.ready, 2);
    struct queue_check_report rep;
    assert_int_equal(queue_check(r2, &rep), 0);
    assert_body(r1, id, "x\r\n", 3);
    assert_int_equal(queue_events_read(r1, 0, 4096, no_event, NULL), 0);
    struct queue_rcpt rc = {.addr = "a@example.org"};
    struct queue_envelope e = {
        .id = queue_id_next(r1), .sender = "s@example.com", .nrcpt = 1, .rcpt = &rc};
    struct iovec iov = {"y\r\n", 3};
    assert_int_equal(queue_enqueue_wait(r1, &e, &iov, 1), -EROFS);
    struct queue_outcome o = {id, 0, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0};
    assert_int_equal(queue_update_wait(r2, &o, 1), -EROFS);
    queue_close(r1);
    queue_close(r2);

    data_stat(f, &after);
    assert_int_equal(after.st_size, before.st_size);
    assert_int_equal(after.st_blocks, before.st_blocks);
    assert_int_equal(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
    assert_int_equal(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
    assert_int_equal(schema_get(f, 0), 1);

    /* nothing where there is no spool: refused, not created */
    struct queue_config none = f->cfg;
    char path[300];
    snprintf(path, sizeof(path), "%s/none", f->dir);
    none.path = path;
    assert_int_not_equal(queue_open_readonly(&none, &r1, err, sizeof(err)), 0);
    assert_null(r1);
    assert_non_null(strstr(err, path));
    struct stat st;
    assert_int_equal(stat(path, &st), -1);

    /* a writer then marks it 2 and gives it its events database back */
    fixture_open(f);
    assert_body(f->q, id, "x\r\n", 3);
    queue_close(f->q);
    f->q = NULL;
    assert_int_equal(schema_get(f, 0), 2);
    fixture_open(f);
}

static void
test_not_a_spool(void **state)
{
    struct fixture *f = *state;
    /* an LMDB environment with other content */
    char other[300];
    snprintf(other, sizeof(other), "%s/other", f->dir);
    assert_int_equal(mkdir(other, 0700), 0);
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_open(env, other, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, NULL, 0, &dbi), 0);
    MDB_val k = {3, "foo"}, v = {3, "bar"};
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    struct queue_config c = f->cfg;
    c.path = other;
    struct queue *q2;
    char err[512];
    assert_int_equal(queue_open(&c, &q2, err, sizeof(err)), QUEUE_ECORRUPT);
    assert_non_null(strstr(err, other));
}

/* One message of a 256 KiB body (make_body's seed) to a@example.com
 * stored, then the spool closed (f->q NULL). */
static void
store_big_and_close(struct fixture *f, uint64_t seed)
{
    size_t len = 256 * 1024;
    char *body = make_body(len, seed);
    struct iovec iov = {body, len};
    struct queue_rcpt r = {.addr = "a@example.com"};
    struct queue_envelope env = {
        .id = queue_id_next(f->q), .sender = "s@x", .nrcpt = 1, .rcpt = &r};
    assert_int_equal(queue_enqueue_wait(f->q, &env, &iov, 1), 0);
    free(body);
    queue_close(f->q);
    f->q = NULL;
}

/* A data file cut short (a copy that stopped, a truncate by hand) is
 * refused at open with its reason, by a reader and a writer alike: the
 * pages past its end are in LMDB's map, and reading one was SIGBUS. */
static void
test_truncated_refused(void **state)
{
    struct fixture *f = *state;
    store_big_and_close(f, 7);
    char path[400];
    snprintf(path, sizeof(path), "%s/data.mdb", f->cfg.path);
    /* the two meta pages stay: LMDB opens the file, the pages are gone */
    assert_int_equal(truncate(path, 16384), 0);
    char err[512];
    struct queue *q;
    assert_int_equal(queue_open_readonly(&f->cfg, &q, err, sizeof(err)), QUEUE_ECORRUPT);
    assert_null(q);
    assert_non_null(strstr(err, "truncated"));
    assert_non_null(strstr(err, f->cfg.path));
    assert_int_equal(queue_open(&f->cfg, &q, err, sizeof(err)), QUEUE_ECORRUPT);
    assert_null(q);
    assert_non_null(strstr(err, "truncated"));
}

/* Cut by its last page only (the last commit's): refused too, whether the
 * free list is whole (the page past the end is not in it) or was on that
 * page (unreadable past the end, the fault taken): which one depends on
 * where LMDB put the list in that commit. */
static void
test_truncated_tail_refused(void **state)
{
    struct fixture *f = *state;
    store_big_and_close(f, 9);
    char path[400];
    snprintf(path, sizeof(path), "%s/data.mdb", f->cfg.path);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(truncate(path, st.st_size - 4096), 0);
    char err[512];
    struct queue *q;
    assert_int_equal(queue_open_readonly(&f->cfg, &q, err, sizeof(err)), QUEUE_ECORRUPT);
    assert_null(q);
    assert_non_null(strstr(err, "truncated"));
    assert_int_equal(queue_open(&f->cfg, &q, err, sizeof(err)), QUEUE_ECORRUPT);
    assert_null(q);
}

/* Leave data.mdb shorter than its meta page's pages in use, as LMDB
 * does: with free pages to reuse (two updates of a record free the
 * pages they copied), a value of 25 overflow pages takes them from the
 * end of the file, and deleted in the same transaction they go to the
 * free list, never written. Keys "test-..." in the meta database. */
static void
make_short_file(const char *dir)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_set_mapsize(env, 256ULL << 20), 0);
    assert_int_equal(mdb_env_open(env, dir, 0, 0600), 0);
    static char val[100000];
    memset(val, 'x', sizeof(val));
    MDB_val small = {strlen("test-a"), "test-a"}, big = {strlen("test-b"), "test-b"};
    for (size_t len = 10; len < 13; len++) {
        MDB_val v = {len, val};
        assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
        assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
        assert_int_equal(mdb_put(txn, dbi, &small, &v, 0), 0);
        assert_int_equal(mdb_txn_commit(txn), 0);
    }
    MDB_val v = {sizeof(val), val};
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
    assert_int_equal(mdb_put(txn, dbi, &big, &v, 0), 0);
    assert_int_equal(mdb_del(txn, dbi, &big, NULL), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    MDB_envinfo info;
    MDB_stat st;
    struct stat fst;
    char path[400];
    snprintf(path, sizeof(path), "%s/data.mdb", dir);
    assert_int_equal(mdb_env_info(env, &info), 0);
    assert_int_equal(mdb_env_stat(env, &st), 0);
    assert_int_equal(stat(path, &fst), 0);
    assert_true((uint64_t)fst.st_size + 20 * st.ms_psize <=
                ((uint64_t)info.me_last_pgno + 1) * st.ms_psize);
    mdb_env_close(env);
}

/* A data file shorter than its pages in use, where the pages past its
 * end are all free, is LMDB's own doing (a clean stop left one such in
 * CI, and sluice-spool then refused the spool as truncated): it opens,
 * for a reader and a writer, and a writer's next commits extend it. */
static void
test_short_file_with_free_tail_opens(void **state)
{
    struct fixture *f = *state;
    queue_close(f->q);
    f->q = NULL;
    make_short_file(f->cfg.path);
    char err[512] = "";
    struct queue *q;
    int rc = queue_open_readonly(&f->cfg, &q, err, sizeof(err));
    assert_int_equal(rc, 0);
    queue_close(q);
    rc = queue_open(&f->cfg, &f->q, err, sizeof(err));
    if (rc != 0)
        fail_msg("queue_open: %s", err);
    store_big_and_close(f, 3);
    fixture_open(f);
}

/* ---- writes and reads ---- */

static void
test_enqueue_read(void **state)
{
    struct fixture *f = *state;
    struct queue_rcpt rcpt[3] = {
        {.addr = "Alice@Example.COM",
         .notify = QUEUE_NOTIFY_FAILURE | QUEUE_NOTIFY_DELAY,
         .orcpt = "rfc822;alice@example.com"},
        {.addr = "bob@example.org"},
        {.addr = "\"odd@local\"@Sub.Example.Net", .notify = QUEUE_NOTIFY_NEVER},
    };
    struct queue_envelope env = {
        .id = queue_id_next(f->q),
        .sender = "",
        .envid = "QQ314159",
        .ret = QUEUE_RET_HDRS,
        .body_type = QUEUE_BODY_8BITMIME,
        .smtputf8 = true,
        .arrival_ms = 1700000000123ULL,
        .expire_ms = 1700432000123ULL,
        .auth_user = "newsletter",
        .client_addr = "192.0.2.7",
        .nrcpt = 3,
        .rcpt = rcpt,
    };
    const char *part1 = "Subject: hi\r\n\r\n";
    const char *part2 = "body line\r\n";
    struct iovec iov[2] = {{(void *)part1, strlen(part1)}, {(void *)part2, strlen(part2)}};
    assert_int_equal(queue_enqueue_wait(f->q, &env, iov, 2), 0);

    struct queue_envelope *e;
    assert_int_equal(queue_envelope_get(f->q, env.id, &e), 0);
    assert_true(e->id == env.id);
    assert_string_equal(e->sender, "");
    assert_string_equal(e->envid, "QQ314159");
    assert_int_equal(e->ret, QUEUE_RET_HDRS);
    assert_int_equal(e->body_type, QUEUE_BODY_8BITMIME);
    assert_true(e->smtputf8);
    assert_true(e->arrival_ms == 1700000000123ULL);
    assert_true(e->expire_ms == 1700432000123ULL);
    assert_string_equal(e->auth_user, "newsletter");
    assert_string_equal(e->client_addr, "192.0.2.7");
    assert_true(e->body_len == strlen(part1) + strlen(part2));
    assert_int_equal(e->nrcpt, 3);
    assert_string_equal(e->rcpt[0].addr, "Alice@Example.COM");
    assert_string_equal(e->rcpt[0].domain, "example.com");
    assert_string_equal(e->rcpt[0].orcpt, "rfc822;alice@example.com");
    assert_int_equal(e->rcpt[0].notify, QUEUE_NOTIFY_FAILURE | QUEUE_NOTIFY_DELAY);
    assert_int_equal(e->rcpt[0].state, QUEUE_RCPT_READY);
    assert_int_equal(e->rcpt[0].attempts, 0);
    assert_null(e->rcpt[1].orcpt);
    assert_string_equal(e->rcpt[1].domain, "example.org");
    assert_int_equal(e->rcpt[1].index, 1);
    assert_string_equal(e->rcpt[2].domain, "sub.example.net");
    assert_int_equal(e->rcpt[2].notify, QUEUE_NOTIFY_NEVER);
    assert_string_equal(e->rcpt[2].last_reply, "");
    queue_envelope_free(e);

    /* body: whole, in pieces, past the end */
    assert_body(f->q, env.id, "Subject: hi\r\n\r\nbody line\r\n", 26);
    char buf[8];
    size_t n;
    assert_int_equal(queue_body_read(f->q, env.id, 9, buf, 4, &n), 0);
    assert_int_equal(n, 4);
    assert_memory_equal(buf, "hi\r\n", 4);
    assert_int_equal(queue_body_read(f->q, env.id, 24, buf, 8, &n), 0);
    assert_int_equal(n, 2);
    assert_int_equal(queue_body_read(f->q, env.id, 26, buf, 8, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(queue_body_read(f->q, env.id + 1, 0, buf, 8, &n), QUEUE_ENOTFOUND);
    assert_int_equal(queue_envelope_get(f->q, env.id + 1, &e), QUEUE_ENOTFOUND);
    assert_null(e);

    /* same id twice */
    assert_int_equal(queue_enqueue_wait(f->q, &env, iov, 2), QUEUE_EEXIST);
    assert_consistent(f->q);
}

static void
test_enqueue_invalid(void **state)
{
    struct fixture *f = *state;
    struct queue_port *p = queue_port_new();
    struct queue_rcpt r = {.addr = "a@b.example"};
    struct queue_envelope env = {
        .id = queue_id_next(f->q), .sender = "x@y", .nrcpt = 1, .rcpt = &r};
    struct iovec iov = {"x", 1};
    struct queue_envelope bad = env;
    bad.nrcpt = 0;
    assert_int_equal(queue_enqueue(f->q, p, &bad, &iov, 1, NULL, NULL), -EINVAL);
    bad = env;
    bad.id = 0;
    assert_int_equal(queue_enqueue_wait(f->q, &bad, &iov, 1), -EINVAL);
    struct queue_rcpt empty = {.addr = ""};
    bad = env;
    bad.rcpt = &empty;
    assert_int_equal(queue_enqueue_wait(f->q, &bad, &iov, 1), -EINVAL);
    char longaddr[QUEUE_MAX_ADDR + 10];
    memset(longaddr, 'a', sizeof(longaddr) - 1);
    longaddr[sizeof(longaddr) - 1] = '\0';
    struct queue_rcpt lr = {.addr = longaddr};
    bad = env;
    bad.rcpt = &lr;
    assert_int_equal(queue_enqueue_wait(f->q, &bad, &iov, 1), -EINVAL);
    struct queue_outcome o = {.id = 1, .rcpt = 70000};
    assert_int_equal(queue_update_wait(f->q, &o, 1), -EINVAL);
    assert_int_equal(queue_update_wait(f->q, &o, 0), -EINVAL);
    assert_int_equal(queue_port_pending(p), 0);
    queue_port_free(p);
}

static void
test_reopen_keeps_data(void **state)
{
    struct fixture *f = *state;
    char *body = make_body(5000, 1);
    uint64_t ids[20];
    for (int i = 0; i < 20; i++)
        ids[i] = put_msg(f->q, 1 + i % 3, "example.com", body, 5000);
    outcome(f->q, ids[1], 0, QUEUE_DEFERRED, 1234567, 451, "4.7.1 try later");
    reopen(f);
    for (int i = 0; i < 20; i++)
        assert_body(f->q, ids[i], body, 5000);
    struct queue_envelope *e;
    assert_int_equal(queue_envelope_get(f->q, ids[1], &e), 0);
    assert_int_equal(e->rcpt[0].state, QUEUE_RCPT_DEFERRED);
    assert_true(e->rcpt[0].due_ms == 1234567);
    assert_int_equal(e->rcpt[0].last_code, 451);
    assert_string_equal(e->rcpt[0].last_reply, "4.7.1 try later");
    assert_int_equal(e->rcpt[0].attempts, 1);
    queue_envelope_free(e);
    /* new ids are above the stored ones */
    assert_true(queue_id_next(f->q) > ids[19]);
    assert_consistent(f->q);
    free(body);
}

static void
test_ids_survive_delete_and_reopen(void **state)
{
    struct fixture *f = *state;
    uint64_t id = put_msg(f->q, 1, "example.com", "x", 1);
    outcome(f->q, id, 0, QUEUE_DELIVERED, 0, 250, NULL);
    reopen(f);
    /* the spool is empty but remembers the highest id */
    struct queue_counts c;
    assert_int_equal(queue_counts(f->q, &c, NULL, NULL), 0);
    assert_true(c.messages == 0);
    assert_true(queue_id_next(f->q) > id);
}

/* A 100-recipient message keeps one copy of its body. */
static void
test_hundred_rcpts_one_body(void **state)
{
    struct fixture *f = *state;
    size_t len = 80 * 1024;
    char *body = make_body(len, 7);
    uint64_t id = put_msg(f->q, 100, "example.com", body, len);
    queue_close(f->q);
    f->q = NULL;

    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi msg, rcpt, bdy;
    MDB_stat st;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_set_mapsize(env, f->cfg.map_size), 0);
    assert_int_equal(mdb_env_open(env, f->cfg.path, MDB_RDONLY, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "msg", 0, &msg), 0);
    assert_int_equal(mdb_dbi_open(txn, "rcpt", 0, &rcpt), 0);
    assert_int_equal(mdb_dbi_open(txn, "body", 0, &bdy), 0);
    assert_int_equal(mdb_stat(txn, msg, &st), 0);
    assert_int_equal(st.ms_entries, 1);
    size_t msg_pages = st.ms_overflow_pages;
    assert_true(msg_pages * st.ms_psize < len + 2 * st.ms_psize);
    assert_int_equal(mdb_stat(txn, rcpt, &st), 0);
    assert_int_equal(st.ms_entries, 100);
    assert_int_equal(st.ms_overflow_pages, 0);
    /* recipient records are small: all of them in a few pages */
    assert_true(st.ms_leaf_pages + st.ms_branch_pages <= 6);
    assert_int_equal(mdb_stat(txn, bdy, &st), 0);
    assert_int_equal(st.ms_entries, 0);
    mdb_txn_abort(txn);
    mdb_env_close(env);

    fixture_open(f);
    assert_body(f->q, id, body, len);
    struct queue_envelope *e;
    assert_int_equal(queue_envelope_get(f->q, id, &e), 0);
    assert_int_equal(e->nrcpt, 100);
    assert_string_equal(e->rcpt[99].addr, "user99@example.com");
    queue_envelope_free(e);
    free(body);
}

static void
test_delete_with_last_rcpt(void **state)
{
    struct fixture *f = *state;
    uint64_t id = put_msg(f->q, 4, "example.com", "body\r\n", 6);
    uint64_t other = put_msg(f->q, 1, "example.com", "other\r\n", 7);
    outcome(f->q, id, 0, QUEUE_DELIVERED, 0, 250, "2.0.0 ok");
    outcome(f->q, id, 1, QUEUE_BOUNCED, 0, 550, "5.1.1 no such user");
    outcome(f->q, id, 2, QUEUE_DEFERRED, 5000, 421, "4.4.2 timeout");
    struct queue_envelope *e;
    assert_int_equal(queue_envelope_get(f->q, id, &e), 0);
    assert_int_equal(e->nrcpt, 2);
    assert_int_equal(e->rcpt[0].index, 2);
    assert_int_equal(e->rcpt[0].state, QUEUE_RCPT_DEFERRED);
    assert_int_equal(e->rcpt[1].index, 3);
    assert_int_equal(e->rcpt[1].state, QUEUE_RCPT_READY);
    queue_envelope_free(e);
    assert_consistent(f->q);

    /* the last two in one update: the message goes */
    struct queue_outcome last[2] = {
        {id, 2, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0},
        {id, 3, QUEUE_BOUNCED, 0, 550, "no", 0, false, NULL, 0},
    };
    assert_int_equal(queue_update_wait(f->q, last, 2), 0);
    assert_int_equal(queue_envelope_get(f->q, id, &e), QUEUE_ENOTFOUND);
    char buf[8];
    size_t n;
    assert_int_equal(queue_body_read(f->q, id, 0, buf, 8, &n), QUEUE_ENOTFOUND);
    assert_body(f->q, other, "other\r\n", 7);
    struct queue_stats st;
    queue_stats(f->q, &st);
    assert_true(st.removed == 1);
    assert_true(st.outcomes == 5);

    /* an outcome for a recipient already gone is ignored and counted */
    outcome(f->q, id, 2, QUEUE_DELIVERED, 0, 250, NULL);
    queue_stats(f->q, &st);
    assert_true(st.outcomes_stale == 1);
    struct queue_counts c;
    assert_int_equal(queue_counts(f->q, &c, NULL, NULL), 0);
    assert_true(c.messages == 1 && c.ready == 1 && c.deferred == 0);
    assert_consistent(f->q);
}

/* A recipient deferred with QUEUE_TAG_HELD (its outcome final for the
 * caller, reported later) is changed only by an outcome of that tag:
 * others (a transaction that crossed the hold) are stale; a retime moves
 * it; the held outcome removes it, the message with it. */
static void
test_held_recipient(void **state)
{
    struct fixture *f = *state;
    uint64_t id = put_msg(f->q, 2, "example.com", "body\r\n", 6);
    uint64_t now = clock_unix_ms();
    struct queue_outcome held = {.id = id, .rcpt = 0, .kind = QUEUE_DEFERRED,
                                 .due_ms = now + 60000, .code = 550,
                                 .reply = "dsn-held 5.1.1 invalid_recipient - r 1 no such user",
                                 .tag = QUEUE_TAG_HELD};
    assert_int_equal(queue_update_wait(f->q, &held, 1), 0);
    outcome(f->q, id, 0, QUEUE_DELIVERED, 0, 250, "2.0.0 ok");
    outcome(f->q, id, 0, QUEUE_BOUNCED, 0, 550, "5.0.0 bounced by the operator");
    outcome(f->q, id, 0, QUEUE_DEFERRED, now + 5000, 451, "4.3.0 later");
    struct queue_stats st;
    queue_stats(f->q, &st);
    assert_int_equal(st.outcomes_stale, 3);
    struct queue_envelope *e;
    assert_int_equal(queue_envelope_get(f->q, id, &e), 0);
    assert_int_equal(e->nrcpt, 2);
    assert_int_equal(e->rcpt[0].state, QUEUE_RCPT_DEFERRED);
    assert_int_equal(e->rcpt[0].tag, QUEUE_TAG_HELD);
    assert_int_equal(e->rcpt[0].due_ms, now + 60000);
    queue_envelope_free(e);
    outcome(f->q, id, 0, QUEUE_RETIME, now + 10, 0, NULL);
    assert_int_equal(queue_envelope_get(f->q, id, &e), 0);
    assert_int_equal(e->rcpt[0].due_ms, now + 10);
    assert_int_equal(e->rcpt[0].tag, QUEUE_TAG_HELD);
    queue_envelope_free(e);
    outcome(f->q, id, 1, QUEUE_DELIVERED, 0, 250, "2.0.0 ok");
    struct queue_outcome end = {.id = id, .rcpt = 0, .kind = QUEUE_BOUNCED, .code = 550,
                                .tag = QUEUE_TAG_HELD};
    assert_int_equal(queue_update_wait(f->q, &end, 1), 0);
    assert_int_equal(queue_envelope_get(f->q, id, &e), QUEUE_ENOTFOUND);
    assert_consistent(f->q);
}

/* QUEUE_WARNED marks a message (its delay warning went) once: the mark
 * applies with the DSN it rides with, the body and recipients left as
 * they were; a second one is stale, its DSN not stored, and with an
 * outcome that applies the request is refused whole (QUEUE_ESTALE); a
 * mark for a message gone is stale. */
static void
test_delay_warned_mark(void **state)
{
    struct fixture *f = *state;
    char body[3000];
    for (size_t i = 0; i < sizeof(body); i++)
        body[i] = (char)('a' + i % 26);
    uint64_t id = put_msg(f->q, 2, "example.com", body, sizeof(body));
    struct queue_envelope *e = NULL;
    assert_int_equal(queue_envelope_get(f->q, id, &e), 0);
    assert_false(e->delay_warned);
    queue_envelope_free(e);
    struct queue_rcpt dr = {.addr = "sender@sender.example"};
    struct queue_envelope denv = {.id = queue_id_next(f->q), .sender = "", .nrcpt = 1, .rcpt = &dr};
    struct iovec diov = {(void *)"the warning", 11};
    struct queue_outcome mark = {.id = id, .kind = QUEUE_WARNED};
    assert_int_equal(queue_update_enqueue_wait(f->q, &mark, 1, &denv, &diov, 1), 0);
    assert_int_equal(queue_envelope_get(f->q, id, &e), 0);
    assert_true(e->delay_warned);
    assert_int_equal(e->nrcpt, 2);
    assert_int_equal(e->body_len, sizeof(body));
    queue_envelope_free(e);
    assert_body(f->q, id, body, sizeof(body));
    assert_int_equal(queue_envelope_get(f->q, denv.id, &e), 0);
    queue_envelope_free(e);
    /* a second warning, crossing the first: stale, not stored */
    struct queue_stats s0, s1;
    queue_stats(f->q, &s0);
    struct queue_envelope d2 = denv;
    d2.id = queue_id_next(f->q);
    assert_int_equal(queue_update_enqueue_wait(f->q, &mark, 1, &d2, &diov, 1), 0);
    queue_stats(f->q, &s1);
    assert_int_equal(s1.outcomes_stale - s0.outcomes_stale, 1);
    assert_int_equal(queue_envelope_get(f->q, d2.id, &e), QUEUE_ENOTFOUND);
    /* with an outcome that applies: refused whole, the outcome too */
    struct queue_outcome two[2] = {
        {.id = id, .rcpt = 0, .kind = QUEUE_DEFERRED, .due_ms = clock_unix_ms() + 60000,
         .code = 451, .reply = "4.3.0 later"},
        mark};
    d2.id = queue_id_next(f->q);
    assert_int_equal(queue_update_enqueue_wait(f->q, two, 2, &d2, &diov, 1), QUEUE_ESTALE);
    assert_int_equal(queue_envelope_get(f->q, id, &e), 0);
    assert_int_equal(e->rcpt[0].state, QUEUE_RCPT_READY);
    queue_envelope_free(e);
    /* the mark survives a reopen and is kept by later outcomes */
    outcome(f->q, id, 0, QUEUE_DEFERRED, clock_unix_ms() + 60000, 451, "4.3.0 later");
    reopen(f);
    assert_int_equal(queue_envelope_get(f->q, id, &e), 0);
    assert_true(e->delay_warned);
    assert_int_equal(e->rcpt[0].state, QUEUE_RCPT_DEFERRED);
    queue_envelope_free(e);
    /* gone: stale */
    outcome(f->q, id, 0, QUEUE_DELIVERED, 0, 250, "2.0.0 ok");
    outcome(f->q, id, 1, QUEUE_DELIVERED, 0, 250, "2.0.0 ok");
    assert_int_equal(queue_envelope_get(f->q, id, &e), QUEUE_ENOTFOUND);
    queue_stats(f->q, &s0);
    assert_int_equal(queue_update_wait(f->q, &mark, 1), 0);
    queue_stats(f->q, &s1);
    assert_int_equal(s1.outcomes_stale - s0.outcomes_stale, 1);
    /* a kind past the last is refused */
    struct queue_outcome bad = {.id = id, .kind = (enum queue_outcome_kind)(QUEUE_WARNED + 1)};
    assert_int_equal(queue_update_wait(f->q, &bad, 1), -EINVAL);
    assert_consistent(f->q);
}

struct seen {
    uint64_t id[64];
    unsigned rcpt[64];
    uint64_t due[64];
    unsigned attempts[64];
    int n;
    int stop_at;
};

static int
collect(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct seen *s = arg;
    if (s->n < 64) {
        s->id[s->n] = id;
        s->rcpt[s->n] = r->index;
        s->due[s->n] = r->due_ms;
        s->attempts[s->n] = r->attempts;
    }
    s->n++;
    return s->stop_at && s->n == s->stop_at ? 7 : 0;
}

static void
test_deferred_index(void **state)
{
    struct fixture *f = *state;
    uint64_t a = put_msg(f->q, 3, "example.com", "a", 1);
    uint64_t b = put_msg(f->q, 2, "example.org", "b", 1);
    uint64_t base = 1800000000000ULL;
    struct queue_outcome o[] = {
        {a, 0, QUEUE_DEFERRED, base + 300, 451, "x", 0, false, NULL, 0},
        {a, 2, QUEUE_DEFERRED, base + 100, 451, "x", 0, false, NULL, 0},
        {b, 1, QUEUE_DEFERRED, base + 200, 451, "x", 0, false, NULL, 0},
        {b, 0, QUEUE_DEFERRED, base + 100, 451, "x", 0, false, NULL, 0},
    };
    assert_int_equal(queue_update_wait(f->q, o, 4), 0);

    struct seen s = {0};
    struct queue_due_pos pos = {0};
    assert_int_equal(queue_due(f->q, &pos, base + 99, 0, collect, &s), 0);
    assert_int_equal(queue_due(f->q, &pos, base + 250, 0, collect, &s), 3);
    /* due order, then id order */
    assert_true(s.id[0] == a && s.rcpt[0] == 2 && s.due[0] == base + 100);
    assert_true(s.id[1] == b && s.rcpt[1] == 0);
    assert_true(s.id[2] == b && s.rcpt[2] == 1 && s.due[2] == base + 200);
    /* the position moved: only the later one now */
    assert_int_equal(queue_due(f->q, &pos, base + 1000, 0, collect, &s), 1);
    assert_true(s.id[3] == a && s.rcpt[3] == 0 && s.due[3] == base + 300);
    assert_int_equal(queue_due(f->q, &pos, base + 1000, 0, collect, &s), 0);

    /* limit */
    struct queue_due_pos p2 = {0};
    s.n = 0;
    assert_int_equal(queue_due(f->q, &p2, UINT64_MAX, 2, collect, &s), 2);
    assert_int_equal(queue_due(f->q, &p2, UINT64_MAX, 2, collect, &s), 2);
    assert_int_equal(queue_due(f->q, &p2, UINT64_MAX, 2, collect, &s), 0);

    /* deferring again moves the entry; attempts count up */
    outcome(f->q, a, 2, QUEUE_DEFERRED, base + 5000, 452, "y");
    struct queue_due_pos p3 = {0};
    s.n = 0;
    assert_int_equal(queue_due(f->q, &p3, base + 1000, 0, collect, &s), 3);
    assert_int_equal(queue_due(f->q, &p3, base + 5000, 0, collect, &s), 1);
    assert_true(s.id[3] == a && s.rcpt[3] == 2 && s.attempts[3] == 2);
    /* delivery removes it from the index */
    outcome(f->q, b, 0, QUEUE_DELIVERED, 0, 250, NULL);
    struct queue_due_pos p4 = {0};
    s.n = 0;
    assert_int_equal(queue_due(f->q, &p4, UINT64_MAX, 0, collect, &s), 3);
    assert_consistent(f->q);
}

/* An operator's flush moves a deferred recipient's time and nothing else;
 * a ready one is left alone. */
static void
test_retime(void **state)
{
    struct fixture *f = *state;
    uint64_t a = put_msg(f->q, 2, "example.com", "r", 1);
    uint64_t base = 1800000000000ULL;
    outcome(f->q, a, 0, QUEUE_DEFERRED, base + 9000, 451, "busy");
    outcome(f->q, a, 1, QUEUE_RETIME, base + 10, 0, NULL); /* ready: unchanged */
    outcome(f->q, a, 0, QUEUE_RETIME, base + 10, 0, NULL);
    struct seen s = {0};
    struct queue_due_pos pos = {0};
    assert_int_equal(queue_due(f->q, &pos, base + 10, 0, collect, &s), 1);
    assert_true(s.id[0] == a && s.rcpt[0] == 0 && s.due[0] == base + 10);
    assert_int_equal(s.attempts[0], 1); /* the flush is not an attempt */
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(f->q, a, &env), 0);
    assert_int_equal(env->rcpt[0].state, QUEUE_RCPT_DEFERRED);
    queue_envelope_free(env);
    /* Nor a deferral of mail that was not tried (its destination rests):
     * the time, code and reply move, the attempts stay. */
    struct queue_outcome u = {a, 0, QUEUE_DEFERRED, base + 20000, 0, "refused", 0, true, NULL, 0};
    assert_int_equal(queue_update_wait(f->q, &u, 1), 0);
    assert_int_equal(queue_envelope_get(f->q, a, &env), 0);
    assert_int_equal(env->rcpt[0].attempts, 1);
    assert_true(env->rcpt[0].state == QUEUE_RCPT_DEFERRED && env->rcpt[0].due_ms == base + 20000);
    queue_envelope_free(env);
    env = NULL;
    outcome(f->q, a, 0, QUEUE_DEFERRED, base + 30000, 451, "busy");
    assert_int_equal(queue_envelope_get(f->q, a, &env), 0);
    assert_int_equal(env->rcpt[0].attempts, 2); /* a tried one counts */
    assert_int_equal(env->rcpt[0].last_code, 451);
    assert_string_equal(env->rcpt[0].last_reply, "busy");
    assert_int_equal(env->rcpt[1].state, QUEUE_RCPT_READY);
    queue_envelope_free(env);
    /* the old time is gone from the index */
    struct queue_due_pos p2 = {0};
    s.n = 0;
    assert_int_equal(queue_due(f->q, &p2, UINT64_MAX, 0, collect, &s), 1);
    assert_consistent(f->q);
}

static void
test_due_many_renews(void **state)
{
    /* more entries than one read transaction covers */
    struct fixture *f = *state;
    uint64_t base = 1800000000000ULL;
    for (int m = 0; m < 50; m++) {
        uint64_t id = put_msg(f->q, 100, "example.com", "m", 1);
        struct queue_outcome o[100];
        for (unsigned i = 0; i < 100; i++)
            o[i] = (struct queue_outcome){id,  i,  QUEUE_DEFERRED, base + 100000 - m * 100 - i,
                                          451, "z", 0, false, NULL, 0};
        assert_int_equal(queue_update_wait(f->q, o, 100), 0);
    }
    struct seen s = {0};
    struct queue_due_pos pos = {0};
    assert_int_equal(queue_due(f->q, &pos, UINT64_MAX, 0, collect, &s), 5000);
    for (int i = 1; i < 64; i++)
        assert_true(s.due[i] > s.due[i - 1]);
    assert_true(pos.due_ms == base + 100000);
    assert_int_equal(queue_due(f->q, &pos, UINT64_MAX, 0, collect, &s), 0);
}

static int
count_domain(void *arg, const char *domain, const struct queue_counts *c)
{
    char *out = arg;
    char line[128];
    snprintf(line, sizeof(line), "%s=%llu/%llu;", domain, (unsigned long long)c->ready,
             (unsigned long long)c->deferred);
    strcat(out, line);
    return 0;
}

static void
test_counts(void **state)
{
    struct fixture *f = *state;
    uint64_t a = put_msg(f->q, 3, "Example.COM", "a", 1);
    put_msg(f->q, 2, "example.org", "b", 1);
    struct queue_rcpt r = {.addr = "postmaster"};
    struct queue_envelope env = {.id = queue_id_next(f->q), .sender = "", .nrcpt = 1, .rcpt = &r};
    struct iovec iov = {"c", 1};
    assert_int_equal(queue_enqueue_wait(f->q, &env, &iov, 1), 0);
    outcome(f->q, a, 1, QUEUE_DEFERRED, 1, 450, "busy");
    struct queue_counts c;
    char out[512] = "";
    assert_int_equal(queue_counts(f->q, &c, count_domain, out), 0);
    assert_true(c.messages == 3);
    assert_true(c.ready == 5);
    assert_true(c.deferred == 1);
    assert_string_equal(out, "=1/0;example.com=2/1;example.org=2/0;");
}

static void
test_walk(void **state)
{
    struct fixture *f = *state;
    uint64_t a = put_msg(f->q, 2, "example.com", "a", 1);
    uint64_t b = put_msg(f->q, 3, "example.net", "b", 1);
    outcome(f->q, a, 0, QUEUE_DELIVERED, 0, 250, NULL);
    outcome(f->q, b, 2, QUEUE_DEFERRED, 777, 421, "later");
    struct seen s = {0};
    assert_int_equal(queue_walk(f->q, collect, &s), 0);
    assert_int_equal(s.n, 4);
    assert_true(s.id[0] == a && s.rcpt[0] == 1 && s.due[0] == 0);
    assert_true(s.id[1] == b && s.rcpt[1] == 0);
    assert_true(s.id[3] == b && s.rcpt[3] == 2 && s.due[3] == 777 && s.attempts[3] == 1);
    /* a callback stops the walk with its value */
    struct seen s2 = {.stop_at = 2};
    assert_int_equal(queue_walk(f->q, collect, &s2), 7);
    assert_int_equal(s2.n, 2);
}

static int
count_only(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    (void)id;
    (void)r;
    (*(unsigned *)arg)++;
    return 0;
}

static void
test_walk_many(void **state)
{
    /* several read transactions' worth, nothing lost or repeated */
    struct fixture *f = *state;
    struct queue_port *p = queue_port_new();
    static struct queue_rcpt r[100];
    static char addr[100][32];
    for (int i = 0; i < 100; i++) {
        snprintf(addr[i], sizeof(addr[i]), "u%d@d%d.example", i, i % 7);
        r[i].addr = addr[i];
    }
    struct iovec iov = {"b", 1};
    for (int m = 0; m < 100; m++) {
        struct queue_envelope env = {
            .id = queue_id_next(f->q), .sender = "s@x", .nrcpt = 100, .rcpt = r};
        if (m == 0) /* no callback: refused */
            assert_int_equal(queue_enqueue(f->q, p, &env, &iov, 1, NULL, NULL), -EINVAL);
        assert_int_equal(queue_enqueue_wait(f->q, &env, &iov, 1), 0);
    }
    unsigned n = 0;
    assert_int_equal(queue_walk(f->q, count_only, &n), 0);
    assert_int_equal(n, 10000);
    queue_port_free(p);
}

static void
test_large_body(void **state)
{
    struct fixture *f = *state;
    size_t len = 10 * 1024 * 1024 + 12345;
    char *body = make_body(len, 42);
    /* handed over in uneven pieces */
    struct iovec iov[3] = {
        {body, 1000}, {body + 1000, 5 * 1024 * 1024}, {body + 1000 + 5 * 1024 * 1024, 0}};
    iov[2].iov_len = len - 1000 - 5 * 1024 * 1024;
    struct queue_rcpt r[2] = {{.addr = "a@example.com"}, {.addr = "b@example.com"}};
    struct queue_envelope env = {.id = queue_id_next(f->q), .sender = "s@x", .nrcpt = 2, .rcpt = r};
    assert_int_equal(queue_enqueue_wait(f->q, &env, iov, 3), 0);
    reopen(f);
    assert_body(f->q, env.id, body, len);
    /* in odd-sized pieces, crossing chunk boundaries */
    char *buf = malloc(len);
    size_t off = 0, n;
    while (off < len) {
        assert_int_equal(queue_body_read(f->q, env.id, off, buf + off, 300007, &n), 0);
        assert_true(n > 0);
        off += n;
    }
    assert_memory_equal(buf, body, len);
    struct queue_check_report rep;
    assert_int_equal(queue_check(f->q, &rep), 0);
    assert_true(rep.body_chunks == 41);
    struct queue_outcome o[2] = {{env.id, 0, QUEUE_DELIVERED, 0, 250, NULL, 0, false, NULL, 0},
                                 {env.id, 1, QUEUE_DELIVERED, 0, 250, NULL, 0, false, NULL, 0}};
    assert_int_equal(queue_update_wait(f->q, o, 2), 0);
    assert_int_equal(queue_check(f->q, &rep), 0);
    assert_true(rep.body_chunks == 0 && rep.messages == 0);
    free(buf);
    free(body);
}

/* ---- ports ---- */

struct done_log {
    int rc[64];
    int order[64];
    int n;
};

struct done_cookie {
    struct done_log *log;
    int tag;
};

static void
on_done(void *cookie, int rc)
{
    struct done_cookie *c = cookie;
    c->log->rc[c->log->n] = rc;
    c->log->order[c->log->n] = c->tag;
    c->log->n++;
}

static void
test_port_async(void **state)
{
    struct fixture *f = *state;
    struct queue_port *p = queue_port_new();
    assert_non_null(p);
    assert_true(queue_port_fd(p) >= 0);
    struct done_log log = {0};
    struct done_cookie ck[32];
    struct queue_rcpt r = {.addr = "a@example.com"};
    struct iovec iov = {"hello\r\n", 7};
    uint64_t ids[32];
    for (int i = 0; i < 32; i++) {
        ck[i] = (struct done_cookie){&log, i};
        struct queue_envelope env = {
            .id = queue_id_next(f->q), .sender = "s@x", .nrcpt = 1, .rcpt = &r};
        ids[i] = env.id;
        assert_int_equal(queue_enqueue(f->q, p, &env, &iov, 1, on_done, &ck[i]), 0);
    }
    assert_true(queue_port_pending(p) > 0);
    /* nothing runs until the owner drains */
    while (log.n < 32) {
        int n = queue_port_wait(p, 5000);
        assert_true(n >= 0);
    }
    assert_int_equal(queue_port_pending(p), 0);
    for (int i = 0; i < 32; i++) {
        assert_int_equal(log.rc[i], 0);
        assert_int_equal(log.order[i], i); /* submission order */
    }
    /* an update through the same port */
    struct queue_outcome o[32];
    for (int i = 0; i < 32; i++)
        o[i] = (struct queue_outcome){ids[i], 0, QUEUE_DELIVERED, 0, 250, NULL, 0, false, NULL, 0};
    struct done_cookie uc = {&log, 100};
    assert_int_equal(queue_update(f->q, p, o, 32, on_done, &uc), 0);
    while (log.n < 33)
        assert_true(queue_port_wait(p, 5000) >= 0);
    assert_int_equal(log.rc[32], 0);
    assert_int_equal(queue_port_drain(p), 0);
    queue_port_free(p);

    struct queue_stats st;
    queue_stats(f->q, &st);
    assert_true(st.enqueued == 32);
    assert_true(st.enqueued_rcpts == 32);
    assert_true(st.enqueued_bytes == 32 * 7);
    assert_true(st.removed == 32);
    assert_true(st.commits >= 2);
    assert_true(st.map_size == 256ULL << 20);
    assert_true(st.map_used > 0);
    assert_true(st.backlog == 0);
}

/* Close finishes what was submitted; the completions wait in the port. */
static void
test_close_finishes_queued(void **state)
{
    struct fixture *f = *state;
    struct queue_port *p = queue_port_new();
    struct done_log log = {0};
    struct done_cookie ck[16];
    struct queue_rcpt r = {.addr = "a@example.com"};
    struct iovec iov = {"x", 1};
    uint64_t ids[16];
    for (int i = 0; i < 16; i++) {
        ck[i] = (struct done_cookie){&log, i};
        struct queue_envelope env = {
            .id = queue_id_next(f->q), .sender = "s@x", .nrcpt = 1, .rcpt = &r};
        ids[i] = env.id;
        assert_int_equal(queue_enqueue(f->q, p, &env, &iov, 1, on_done, &ck[i]), 0);
    }
    queue_close(f->q);
    f->q = NULL;
    assert_int_equal(queue_port_drain(p), 16);
    for (int i = 0; i < 16; i++)
        assert_int_equal(log.rc[i], 0);
    queue_port_free(p);
    fixture_open(f);
    for (int i = 0; i < 16; i++)
        assert_body(f->q, ids[i], "x", 1);
}


/* The committer held in a commit (its events hook blocks, as a write to a
 * disk that no longer answers would): queue_close_within gives up at its
 * bound, leaves the queue open and refusing, and closes it once the
 * committer is free again; the commits it had are done, their answers
 * in the port. Before, the only close joined the committer with no bound
 * (a stop cut at its wait for the spool then sat there until the stop's
 * last resort). */
struct stall {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool entered, released;
};

static void
stall_hook(void *arg)
{
    struct stall *st = arg;
    pthread_mutex_lock(&st->mu);
    st->entered = true;
    pthread_cond_broadcast(&st->cv);
    while (!st->released)
        pthread_cond_wait(&st->cv, &st->mu);
    pthread_mutex_unlock(&st->mu);
}

static void
test_close_within_gives_up_on_a_stuck_committer(void **state)
{
    struct fixture *f = *state;
    struct stall st = {.entered = false, .released = false};
    pthread_mutex_init(&st.mu, NULL);
    pthread_cond_init(&st.cv, NULL);
    struct queue_port *p = queue_port_new();
    assert_non_null(p);
    struct done_log log = {0};
    struct done_cookie ck[2] = {{&log, 0}, {&log, 1}};
    queue_events_set_hook(f->q, stall_hook, &st);
    assert_int_equal(queue_events_put(f->q, p, "x\n", 2, on_done, &ck[0]), 0);
    pthread_mutex_lock(&st.mu);
    while (!st.entered)
        pthread_cond_wait(&st.cv, &st.mu);
    pthread_mutex_unlock(&st.mu);
    /* one more, behind the held commit */
    struct queue_rcpt r = {.addr = "a@example.com"};
    struct iovec iov = {"y", 1};
    struct queue_envelope env = {
        .id = queue_id_next(f->q), .sender = "s@x", .nrcpt = 1, .rcpt = &r};
    assert_int_equal(queue_enqueue(f->q, p, &env, &iov, 1, on_done, &ck[1]), 0);

    uint64_t t0 = clock_mono_ms();
    assert_false(queue_close_within(f->q, 200));
    uint64_t took = clock_mono_ms() - t0;
    assert_true(took >= 150 && took < 5000);
    /* stopping: nothing more is taken */
    struct queue_envelope env2 = env;
    env2.id = queue_id_next(f->q);
    assert_int_equal(queue_enqueue(f->q, p, &env2, &iov, 1, on_done, &ck[1]),
                     QUEUE_ECLOSED);

    pthread_mutex_lock(&st.mu);
    st.released = true;
    pthread_cond_broadcast(&st.cv);
    pthread_mutex_unlock(&st.mu);
    assert_true(queue_close_within(f->q, 30000));
    f->q = NULL;
    assert_int_equal(queue_port_drain(p), 2);
    assert_int_equal(log.rc[0], 0);
    assert_int_equal(log.rc[1], 0);
    queue_port_free(p);
    pthread_cond_destroy(&st.cv);
    pthread_mutex_destroy(&st.mu);
    fixture_open(f);
    assert_body(f->q, env.id, "y", 1);
}

/* A DSN rides with the outcomes that cause it: one commit for both; left
 * out when every outcome is stale (the commit it belongs to happened
 * already), and a retry of one that did commit is not an error. */
static void
test_update_enqueue(void **state)
{
    struct fixture *f = *state;
    uint64_t a = put_msg(f->q, 2, "example.com", "original", 8);
    struct queue_rcpt dr = {.addr = "bounce@sender.example"};
    struct queue_envelope denv = {.id = queue_id_next(f->q), .sender = "", .nrcpt = 1, .rcpt = &dr};
    struct iovec diov = {(void *)"the dsn", 7};
    struct queue_outcome o = {a, 0, QUEUE_BOUNCED, 0, 550, "5.1.1 unknown", 0, false, NULL, 0};
    struct queue_stats s0, s1;
    queue_stats(f->q, &s0);
    assert_int_equal(queue_update_enqueue_wait(f->q, &o, 1, &denv, &diov, 1), 0);
    queue_stats(f->q, &s1);
    assert_int_equal(s1.commits - s0.commits, 1);
    assert_int_equal(s1.enqueued - s0.enqueued, 1);
    assert_int_equal(s1.outcomes - s0.outcomes, 1);
    assert_body(f->q, denv.id, "the dsn", 7);
    struct queue_envelope *e = NULL;
    assert_int_equal(queue_envelope_get(f->q, denv.id, &e), 0);
    assert_string_equal(e->sender, "");
    assert_string_equal(e->rcpt[0].domain, "sender.example");
    queue_envelope_free(e);
    /* the same request again: the outcome is stale, the DSN not stored twice */
    assert_int_equal(queue_update_enqueue_wait(f->q, &o, 1, &denv, &diov, 1), 0);
    /* a new DSN for stale outcomes only: left out */
    struct queue_envelope d2 = denv;
    d2.id = queue_id_next(f->q);
    assert_int_equal(queue_update_enqueue_wait(f->q, &o, 1, &d2, &diov, 1), 0);
    assert_int_equal(queue_envelope_get(f->q, d2.id, &e), QUEUE_ENOTFOUND);
    struct queue_counts c;
    assert_int_equal(queue_counts(f->q, &c, NULL, NULL), 0);
    assert_int_equal(c.messages, 2); /* the original (one recipient left) and one DSN */
    /* a bad envelope is refused at once */
    struct queue_envelope bad = denv;
    bad.nrcpt = 0;
    assert_int_equal(queue_update_enqueue_wait(f->q, &o, 1, &bad, &diov, 1), -EINVAL);
    assert_consistent(f->q);
}

static int
collect_take(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    assert_int_equal(r->state, QUEUE_RCPT_READY);
    collect(arg, id, r);
    return 0;
}

/* Taking due recipients keeps no position: after the wall clock steps
 * back, a recipient deferred to a time before the last take is taken when
 * its time comes; after it steps forward, what is due is taken at once.
 * A taken recipient is ready (attempts and reply kept), is not taken
 * twice, and is ready after a restart. Nothing due: no commit. */
static void
test_due_take_clock_steps(void **state)
{
    struct fixture *f = *state;
    uint64_t a = put_msg(f->q, 3, "example.com", "t", 1);
    uint64_t base = 1800000000000ULL;
    struct queue_outcome o[] = {
        {a, 0, QUEUE_DEFERRED, base + 100, 451, "busy", 0, false, NULL, 0},
        {a, 1, QUEUE_DEFERRED, base + 200, 451, "busy", 0, false, NULL, 0},
        {a, 2, QUEUE_DEFERRED, base + 86400000, 451, "busy", 0, false, NULL, 0},
    };
    assert_int_equal(queue_update_wait(f->q, o, 3), 0);
    struct seen s = {0};
    struct queue_stats s0, s1;
    queue_stats(f->q, &s0);
    assert_int_equal(queue_due_take_wait(f->q, base + 99, 0, collect_take, &s), 0);
    queue_stats(f->q, &s1);
    assert_int_equal(s1.commits, s0.commits); /* nothing due, nothing written */
    assert_int_equal(queue_due_take_wait(f->q, base + 150, 0, collect_take, &s), 1);
    assert_true(s.id[0] == a && s.rcpt[0] == 0 && s.attempts[0] == 1);
    assert_int_equal(queue_due_take_wait(f->q, base + 150, 0, collect_take, &s), 0);
    struct queue_envelope *e = NULL;
    assert_int_equal(queue_envelope_get(f->q, a, &e), 0);
    assert_int_equal(e->rcpt[0].state, QUEUE_RCPT_READY);
    assert_int_equal(e->rcpt[0].due_ms, 0);
    assert_int_equal(e->rcpt[0].last_code, 451);
    assert_string_equal(e->rcpt[0].last_reply, "busy");
    queue_envelope_free(e);

    /* The wall clock steps back an hour; recipient 0 fails again and is
     * deferred by a minute of the new clock: before anything taken so far
     * (a position kept from the last poll would hide it until a restart). */
    uint64_t back = base - 3600000;
    struct queue_due_pos pos = {0};
    struct seen view = {0};
    assert_int_equal(queue_due(f->q, &pos, base + 150, 0, collect, &view), 0);
    pos = (struct queue_due_pos){base + 100, a, 0}; /* where the old poll stood */
    outcome(f->q, a, 0, QUEUE_DEFERRED, back + 60000, 451, "again");
    assert_int_equal(queue_due(f->q, &pos, back + 60000, 0, collect, &view), 0); /* the old bug */
    assert_int_equal(queue_due_take_wait(f->q, back + 59999, 0, collect_take, &s), 0);
    assert_int_equal(queue_due_take_wait(f->q, back + 60000, 0, collect_take, &s), 1);
    assert_true(s.id[1] == a && s.rcpt[1] == 0 && s.attempts[1] == 2);
    /* recipient 1 (due at base + 200) is not due on the stepped-back clock */
    assert_int_equal(queue_due_take_wait(f->q, back + 120000, 0, collect_take, &s), 0);
    /* a step forward by a day: both left are due at once, in due order */
    assert_int_equal(queue_due_take_wait(f->q, base + 86400000 + 5, 0, collect_take, &s), 2);
    assert_true(s.rcpt[2] == 1 && s.rcpt[3] == 2);
    assert_int_equal(queue_due_take_wait(f->q, UINT64_MAX, 0, collect_take, &s), 0);
    queue_stats(f->q, &s1);
    assert_int_equal(s1.taken, 4);

    /* a limit; and a crash after a take leaves the taken ones ready */
    outcome(f->q, a, 0, QUEUE_DEFERRED, base, 451, "x");
    outcome(f->q, a, 1, QUEUE_DEFERRED, base, 451, "x");
    assert_int_equal(queue_due_take_wait(f->q, base, 1, NULL, NULL), 1);
    reopen(f);
    struct queue_counts c;
    assert_int_equal(queue_counts(f->q, &c, NULL, NULL), 0);
    assert_int_equal(c.ready, 2);
    assert_int_equal(c.deferred, 1);
    assert_consistent(f->q);
}

/* The owner of each recipient's message, as queue_walk() and
 * queue_due_take() hand them out. */
struct owners {
    unsigned n;
    uint64_t id[8];
    char tenant[8][QUEUE_MAX_TAG + 1], campaign[8][QUEUE_MAX_TAG + 1], pool[8][QUEUE_MAX_TAG + 1];
    unsigned priority[8];
    bool tls_relaxed[8];
};

static int
collect_owner(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct owners *o = arg;
    assert_true(o->n < 8);
    o->id[o->n] = id;
    snprintf(o->tenant[o->n], sizeof(o->tenant[0]), "%s", r->owner.tenant);
    snprintf(o->campaign[o->n], sizeof(o->campaign[0]), "%s", r->owner.campaign);
    snprintf(o->pool[o->n], sizeof(o->pool[0]), "%s", r->owner.pool);
    o->priority[o->n] = r->owner.priority;
    o->tls_relaxed[o->n] = r->owner.tls_relaxed;
    o->n++;
    return 0;
}

/* A job's owner survives a restart: the start-up walk and the due take
 * (the spool's two ways back to delivery) hand each recipient out with
 * its message's tenant, campaign, pool, priority and tls_relaxed (a TLS
 * report's exemption from TLS policies), also after a reopen, and "" (or
 * false) for a message without them; the envelope has tls_relaxed too. */
static void
test_owner_walk_and_due_take(void **state)
{
    struct fixture *f = *state;
    struct queue_rcpt rc[2] = {{.addr = "a@example.org"}, {.addr = "b@example.net"}};
    char longest[QUEUE_MAX_TAG + 1];
    memset(longest, 'c', QUEUE_MAX_TAG);
    longest[QUEUE_MAX_TAG] = '\0';
    struct queue_envelope env = {.id = queue_id_next(f->q),
                                 .sender = "s@example.com",
                                 .tenant = "acme",
                                 .campaign = longest,
                                 .pool = "transactional",
                                 .priority = 8,
                                 .tls_relaxed = true,
                                 .nrcpt = 2,
                                 .rcpt = rc};
    struct iovec iov = {"body\r\n", 6};
    assert_int_equal(queue_enqueue_wait(f->q, &env, &iov, 1), 0);
    uint64_t owned = env.id;
    uint64_t plain = put_msg(f->q, 1, "example.com", "x\r\n", 3);
    uint64_t base = 1800000000000ULL;
    struct queue_outcome o[] = {
        {owned, 1, QUEUE_DEFERRED, base + 10, 451, "later", 0, false, NULL, 0},
        {plain, 0, QUEUE_DEFERRED, base + 20, 451, "later", 0, false, NULL, 0},
    };
    assert_int_equal(queue_update_wait(f->q, o, 2), 0);
    reopen(f);

    struct owners w = {0};
    assert_int_equal(queue_walk(f->q, collect_owner, &w), 0);
    assert_int_equal(w.n, 3);
    for (unsigned i = 0; i < 2; i++) {
        assert_true(w.id[i] == owned);
        assert_string_equal(w.tenant[i], "acme");
        assert_string_equal(w.campaign[i], longest);
        assert_string_equal(w.pool[i], "transactional");
        assert_int_equal(w.priority[i], 8);
        assert_true(w.tls_relaxed[i]);
    }
    assert_true(w.id[2] == plain);
    assert_false(w.tls_relaxed[2]);
    assert_string_equal(w.tenant[2], "");
    assert_string_equal(w.pool[2], "");
    assert_int_equal(w.priority[2], 0);

    struct owners t = {0};
    assert_int_equal(queue_due_take_wait(f->q, base + 100, 0, collect_owner, &t), 2);
    assert_true(t.id[0] == owned && t.id[1] == plain); /* due order */
    assert_string_equal(t.tenant[0], "acme");
    assert_string_equal(t.campaign[0], longest);
    assert_string_equal(t.pool[0], "transactional");
    assert_int_equal(t.priority[0], 8);
    assert_true(t.tls_relaxed[0]);
    assert_false(t.tls_relaxed[1]);
    struct queue_envelope *e = NULL;
    assert_int_equal(queue_envelope_get(f->q, owned, &e), 0);
    assert_true(e->tls_relaxed);
    queue_envelope_free(e);
    assert_int_equal(queue_envelope_get(f->q, plain, &e), 0);
    assert_false(e->tls_relaxed);
    queue_envelope_free(e);
    assert_string_equal(t.tenant[1], "");
    assert_string_equal(t.campaign[1], "");
    assert_string_equal(t.pool[1], "");
    assert_int_equal(t.priority[1], 0);
    assert_consistent(f->q);
}

/* Write val under key in database db of the closed spool, through LMDB. */
static void
raw_put(struct fixture *f, const char *db, const void *key, size_t klen, const void *val,
        size_t vlen)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_set_mapsize(env, f->cfg.map_size), 0);
    assert_int_equal(mdb_env_open(env, f->cfg.path, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, db, 0, &dbi), 0);
    MDB_val k = {klen, (void *)key}, v = {vlen, (void *)val};
    assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
}

static void
rcpt_key_of(unsigned char *k, uint64_t id, unsigned idx)
{
    for (int i = 0; i < 8; i++)
        k[i] = (unsigned char)(id >> (56 - 8 * i));
    k[8] = (unsigned char)(idx >> 8);
    k[9] = (unsigned char)idx;
}

/* A record that fails its checks is skipped, counted once and reported by
 * queue_check; the walk, the take and the envelope read go on past it. */
static void
test_corrupt_skipped(void **state)
{
    struct fixture *f = *state;
    uint64_t a = put_msg(f->q, 1, "a.example", "a", 1);
    uint64_t b = put_msg(f->q, 2, "b.example", "b", 1);
    uint64_t c = put_msg(f->q, 1, "c.example", "c", 1);
    uint64_t base = 1800000000000ULL;
    struct queue_outcome o[] = {
        {b, 0, QUEUE_DEFERRED, base, 451, "x", 0, false, NULL, 0},
        {c, 0, QUEUE_DEFERRED, base + 1, 451, "x", 0, false, NULL, 0},
    };
    assert_int_equal(queue_update_wait(f->q, o, 2), 0);
    queue_close(f->q);
    f->q = NULL;
    unsigned char key[10];
    rcpt_key_of(key, b, 0);
    raw_put(f, "rcpt", key, sizeof(key), "\x09garbage", 8);
    fixture_open(f);

    struct seen s = {0};
    assert_int_equal(queue_walk(f->q, collect, &s), 0);
    assert_int_equal(s.n, 3); /* a, b's second, c: not stopped at b's first */
    assert_true(s.id[0] == a && s.id[1] == b && s.rcpt[1] == 1 && s.id[2] == c);
    struct queue_stats st;
    queue_stats(f->q, &st);
    assert_int_equal(st.corrupt, 1);
    /* the take skips it (it is first in the index) and takes the next */
    s.n = 0;
    assert_int_equal(queue_due_take_wait(f->q, base + 10, 0, collect_take, &s), 1);
    assert_true(s.id[0] == c);
    assert_int_equal(queue_due_take_wait(f->q, base + 10, 0, collect_take, &s), 0);
    struct queue_envelope *e = NULL;
    assert_int_equal(queue_envelope_get(f->q, b, &e), 0);
    assert_int_equal(e->nrcpt, 1);
    assert_int_equal(e->rcpt[0].index, 1);
    queue_envelope_free(e);
    queue_stats(f->q, &st);
    assert_int_equal(st.corrupt, 1); /* once per record, however often met */
    struct queue_check_report rep;
    assert_int_equal(queue_check(f->q, &rep), QUEUE_ECORRUPT);
    assert_int_equal(rep.bad_records, 1);
    assert_int_equal(rep.nlisted, 2); /* the record, and its index entry that points at it */
    assert_string_equal(rep.listed[0].db, "rcpt");
    assert_string_equal(rep.listed[0].what, "bad_record");
    assert_true(rep.listed[0].id == b);
    assert_string_equal(rep.listed[1].db, "due");
    assert_true(rep.listed[1].id == b);
}

static void
test_strerror(void **state)
{
    (void)state;
    assert_non_null(strstr(queue_strerror(QUEUE_EMAPFULL), "full"));
    assert_non_null(strstr(queue_strerror(QUEUE_ESCHEMA), "newer"));
    assert_string_equal(queue_strerror(-ENOSPC), "No space left on device");
    assert_true(queue_error_is_space(QUEUE_EMAPFULL));
    assert_true(queue_error_is_space(-ENOSPC));
    assert_false(queue_error_is_space(-EIO));
    int codes[] = {QUEUE_EMAPFULL, QUEUE_ESCHEMA, QUEUE_ECORRUPT, QUEUE_ENOTFOUND, QUEUE_ELOCKED,
                   QUEUE_EPANIC,   QUEUE_ECLOSED, QUEUE_EREADERS, QUEUE_EEXIST,    QUEUE_ESTORE};
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++)
        for (size_t j = i + 1; j < sizeof(codes) / sizeof(codes[0]); j++)
            assert_string_not_equal(queue_strerror(codes[i]), queue_strerror(codes[j]));
}

/* ---- events (queue.h): lines committed with their requests ---- */

struct ev_wait {
    int rc;
    bool done;
};

static void
ev_done(void *cookie, int rc)
{
    struct ev_wait *w = cookie;
    w->rc = rc;
    w->done = true;
}

static int
ev_finish(struct queue_port *port, struct ev_wait *w, int submitted)
{
    if (submitted < 0)
        return submitted;
    for (int i = 0; i < 1000 && !w->done; i++)
        queue_port_wait(port, 100);
    assert_true(w->done);
    return w->rc;
}

/* A DSN whose request has a stale outcome beside one that applies (a
 * transaction whose envelope was read before an operator's bounce of one
 * of its recipients): the DSN may name a recipient that is done, so the
 * request is refused whole, nothing applied, and the flags say which
 * outcomes would have applied; tried again without the stale one it
 * commits, and each outcome's flag says it applied. */
static void
test_update_enqueue_stale_refused(void **state)
{
    struct fixture *f = *state;
    struct queue *q = f->q;
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    uint64_t a = put_msg(q, 2, "example.com", "original", 8);
    struct queue_outcome op = {a, 0, QUEUE_BOUNCED, 0, 550, "bounced by operator",
                               0, false, NULL, 0};
    assert_int_equal(queue_update_wait(q, &op, 1), 0);

    struct queue_rcpt dr = {.addr = "bounce@sender.example"};
    struct queue_envelope denv = {.id = queue_id_next(q), .sender = "", .nrcpt = 1, .rcpt = &dr};
    struct iovec diov = {(void *)"the dsn", 7};
    struct queue_outcome o[2] = {
        {a, 0, QUEUE_BOUNCED, 0, 550, "5.1.1 unknown", 0, false, NULL, 0},
        {a, 1, QUEUE_BOUNCED, 0, 550, "5.1.1 unknown", 0, false, NULL, 0},
    };
    unsigned lines[2] = {1, 1};
    bool applied[2] = {true, false};
    struct queue_stats s0, s1;
    queue_stats(q, &s0);
    struct ev_wait w = {0};
    assert_int_equal(
        ev_finish(port, &w,
                  queue_update_enqueue_events(q, port, o, 2, &denv, &diov, 1, "b0\nb1\nm\n", 8,
                                              lines, applied, ev_done, &w)),
        QUEUE_ESTALE);
    assert_false(applied[0]); /* stale: recipient 0 is done */
    assert_true(applied[1]);  /* would have applied */
    struct queue_envelope *e = NULL;
    assert_int_equal(queue_envelope_get(q, denv.id, &e), QUEUE_ENOTFOUND); /* no DSN */
    assert_int_equal(queue_envelope_get(q, a, &e), 0); /* recipient 1 still there */
    assert_int_equal(e->nrcpt, 1);
    assert_int_equal(e->rcpt[0].index, 1);
    e = queue_envelope_free(e);
    queue_stats(q, &s1);
    assert_int_equal(s1.outcomes - s0.outcomes, 0);
    assert_int_equal(s1.event_lines - s0.event_lines, 0);

    /* again without the stale outcome: committed with its DSN */
    applied[0] = false;
    w = (struct ev_wait){0};
    assert_int_equal(
        ev_finish(port, &w,
                  queue_update_enqueue_events(q, port, &o[1], 1, &denv, &diov, 1, "b1\nm\n", 5,
                                              lines, applied, ev_done, &w)),
        0);
    assert_true(applied[0]);
    assert_body(q, denv.id, "the dsn", 7);
    assert_int_equal(queue_envelope_get(q, a, &e), QUEUE_ENOTFOUND);
    queue_stats(q, &s1);
    assert_int_equal(s1.outcomes - s0.outcomes, 1);
    assert_int_equal(s1.event_lines - s0.event_lines, 2);

    /* every outcome stale (a retry of that commit): 0, nothing applied */
    applied[0] = true;
    w = (struct ev_wait){0};
    assert_int_equal(ev_finish(port, &w,
                               queue_update_enqueue_events(q, port, o, 2, &denv, &diov, 1, NULL, 0,
                                                           NULL, applied, ev_done, &w)),
                     0);
    assert_false(applied[0]);
    assert_false(applied[1]);
    queue_port_free(port);
    assert_consistent(q);
}

struct ev_rec {
    uint64_t seq[16];
    char text[16][64];
    unsigned n;
};

static int
ev_collect(void *arg, uint64_t seq, const char *text, size_t len)
{
    struct ev_rec *r = arg;
    assert_true(r->n < 16 && len < 64);
    r->seq[r->n] = seq;
    memcpy(r->text[r->n], text, len);
    r->text[r->n][len] = '\0';
    r->n++;
    return 0;
}

struct note_rec {
    unsigned n;
    uint64_t seq[8];
    char text[8][32];
};

static int
note_collect(void *arg, uint64_t seq, const void *note, size_t len)
{
    struct note_rec *r = arg;
    assert_true(r->n < 8 && len < 32);
    r->seq[r->n] = seq;
    memcpy(r->text[r->n], note, len);
    r->text[r->n][len] = '\0';
    r->n++;
    return 0;
}

static int hook_calls;

static void
note_hook(void *arg)
{
    (void)arg;
    hook_calls++; /* the committer thread; read after a completion */
}

/* Notes: committed with an outcome only when it applies (not with a
 * retry found stale), or alone with event lines or without; numbered in
 * commit order; kept across a reopen (a crash) until trimmed. */
static void
test_notes_with_outcomes(void **state)
{
    struct fixture *f = *state;
    struct queue *q = f->q;
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    queue_notes_set_hook(q, note_hook, NULL);
    hook_calls = 0;
    char body[] = "body\r\n";
    uint64_t id = put_msg(q, 3, "x.example", body, strlen(body));
    struct queue_outcome o[2] = {
        {id, 0, QUEUE_BOUNCED, 0, 550, "gone", 0, false, "n-bounce0", 9},
        {id, 1, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0},
    };
    assert_int_equal(queue_update_wait(q, o, 2), 0);
    /* the same again: stale, no second note */
    assert_int_equal(queue_update_wait(q, o, 2), 0);
    struct ev_wait w = {0};
    assert_int_equal(ev_finish(port, &w, queue_events_note_put(q, port, NULL, 0, "n-alone", 7,
                                                               ev_done, &w)),
                     0);
    w = (struct ev_wait){0};
    assert_int_equal(ev_finish(port, &w, queue_events_note_put(q, port, "l\n", 2, "n-lines", 7,
                                                               ev_done, &w)),
                     0);
    assert_int_equal(hook_calls, 3); /* the first update and the two puts */
    assert_int_equal(queue_events_note_put(q, port, NULL, 0, NULL, 0, ev_done, &w), -EINVAL);
    char big[QUEUE_NOTE_MAX + 1] = {0};
    assert_int_equal(queue_events_note_put(q, port, NULL, 0, big, sizeof(big), ev_done, &w),
                     -EINVAL);
    struct queue_outcome o2 = {id, 2, QUEUE_BOUNCED, 0, 550, "x", 0, false, big, sizeof(big)};
    assert_int_equal(queue_update_wait(q, &o2, 1), -EINVAL);

    reopen(f);
    q = f->q;
    struct queue_stats qs;
    queue_stats(q, &qs);
    assert_int_equal(qs.notes_kept, 3); /* counted at open */
    struct note_rec r = {0};
    assert_int_equal(queue_notes_read(q, 0, 0, note_collect, &r), 3);
    assert_string_equal(r.text[0], "n-bounce0");
    assert_string_equal(r.text[1], "n-alone");
    assert_string_equal(r.text[2], "n-lines");
    assert_true(r.seq[0] < r.seq[1] && r.seq[1] < r.seq[2]);
    r = (struct note_rec){0};
    assert_int_equal(queue_notes_read(q, r.seq[0], 1, note_collect, &r), 1);
    assert_int_equal(queue_notes_trim_wait(q, r.seq[0] + 2), 0);
    struct note_rec t = {0};
    assert_int_equal(queue_notes_read(q, 0, 0, note_collect, &t), 1);
    assert_string_equal(t.text[0], "n-lines");
    queue_stats(q, &qs);
    assert_int_equal(qs.notes_kept, 1); /* less the trimmed */
    /* numbering goes on after a reopen */
    uint64_t last = t.seq[0];
    reopen(f);
    q = f->q;
    struct queue_outcome o3 = {id, 2, QUEUE_BOUNCED, 0, 550, "x", 0, false, "n-after", 7};
    assert_int_equal(queue_update_wait(q, &o3, 1), 0);
    t = (struct note_rec){0};
    assert_int_equal(queue_notes_read(q, 0, 0, note_collect, &t), 2);
    queue_stats(q, &qs);
    assert_int_equal(qs.notes_kept, 2); /* and the written */
    assert_true(t.seq[1] > last);
    assert_string_equal(t.text[1], "n-after");
    assert_int_equal(queue_notes_trim_wait(q, UINT64_MAX), 0);
    t = (struct note_rec){0};
    assert_int_equal(queue_notes_read(q, 0, 0, note_collect, &t), 0);
    queue_stats(q, &qs);
    assert_int_equal(qs.notes_kept, 0);
    assert_consistent(q);
    queue_port_free(port);
}

static void
test_events_committed_and_numbered(void **state)
{
    struct fixture *f = *state;
    struct queue *q = f->q;
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    assert_int_equal(queue_events_durable(q), 0);

    /* a reception with its message */
    struct queue_rcpt rc[2] = {{.addr = "a@x.example"}, {.addr = "b@x.example"}};
    struct queue_envelope env = {.id = queue_id_next(q), .sender = "s@y.example", .nrcpt = 2,
                                 .rcpt = rc};
    struct iovec iov = {(void *)"body\r\n", 6};
    struct ev_wait w = {0};
    assert_int_equal(ev_finish(port, &w, queue_enqueue_events(q, port, &env, &iov, 1, "r1\n", 3,
                                                              ev_done, &w)),
                     0);
    /* two outcome lines with their outcome */
    struct queue_outcome o = {env.id, 0, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0};
    w = (struct ev_wait){0};
    assert_int_equal(ev_finish(port, &w,
                               queue_update_enqueue_events(q, port, &o, 1, NULL, NULL, 0,
                                                           "d1\nd2\n", 6, NULL, NULL, ev_done, &w)),
                     0);
    /* the same outcome again (a retry of a commit that happened): no lines */
    w = (struct ev_wait){0};
    assert_int_equal(ev_finish(port, &w,
                               queue_update_enqueue_events(q, port, &o, 1, NULL, NULL, 0, "x\n", 2,
                                                           NULL, NULL, ev_done, &w)),
                     0);
    /* lines alone */
    w = (struct ev_wait){0};
    assert_int_equal(ev_finish(port, &w, queue_events_put(q, port, "s1\n", 3, ev_done, &w)), 0);
    assert_int_equal(queue_events_durable(q), 4);
    /* not whole lines */
    assert_int_equal(queue_events_put(q, port, "s1", 2, ev_done, &w), -EINVAL);
    assert_int_equal(queue_enqueue_events(q, port, &env, &iov, 1, "r", 1, ev_done, &w), -EINVAL);

    struct ev_rec r = {0};
    assert_int_equal(queue_events_read(q, 0, 1 << 20, ev_collect, &r), 3);
    assert_int_equal(r.seq[0], 0);
    assert_string_equal(r.text[0], "r1\n");
    assert_int_equal(r.seq[1], 1);
    assert_string_equal(r.text[1], "d1\nd2\n");
    assert_int_equal(r.seq[2], 3);
    assert_string_equal(r.text[2], "s1\n");
    /* from the middle of a record: that record first */
    r = (struct ev_rec){0};
    assert_int_equal(queue_events_read(q, 2, 1 << 20, ev_collect, &r), 2);
    assert_int_equal(r.seq[0], 1);
    assert_int_equal(r.seq[1], 3);
    r = (struct ev_rec){0};
    assert_int_equal(queue_events_read(q, 4, 1 << 20, ev_collect, &r), 0);

    /* a trim keeps what is not wholly below its bound */
    w = (struct ev_wait){0};
    assert_int_equal(ev_finish(port, &w, queue_events_trim(q, port, 2, ev_done, &w)), 0);
    r = (struct ev_rec){0};
    assert_int_equal(queue_events_read(q, 0, 1 << 20, ev_collect, &r), 2);
    assert_int_equal(r.seq[0], 1);
    struct queue_stats st;
    queue_stats(q, &st);
    assert_int_equal(st.events_kept, 2);

    /* numbers survive a reopen, and a trim that empties the database */
    queue_port_free(port);
    reopen(f);
    q = f->q;
    port = queue_port_new();
    assert_int_equal(queue_events_durable(q), 4);
    w = (struct ev_wait){0};
    assert_int_equal(ev_finish(port, &w, queue_events_trim(q, port, 4, ev_done, &w)), 0);
    queue_port_free(port);
    reopen(f);
    q = f->q;
    port = queue_port_new();
    assert_int_equal(queue_events_durable(q), 4);
    w = (struct ev_wait){0};
    assert_int_equal(ev_finish(port, &w, queue_events_put(q, port, "t\n", 2, ev_done, &w)), 0);
    r = (struct ev_rec){0};
    assert_int_equal(queue_events_read(q, 0, 1 << 20, ev_collect, &r), 1);
    assert_int_equal(r.seq[0], 4);
    /* a floor (the journal ahead) moves the next number up */
    queue_events_floor(q, 100);
    w = (struct ev_wait){0};
    assert_int_equal(ev_finish(port, &w, queue_events_put(q, port, "u\n", 2, ev_done, &w)), 0);
    r = (struct ev_rec){0};
    assert_int_equal(queue_events_read(q, 5, 1 << 20, ev_collect, &r), 1);
    assert_int_equal(r.seq[0], 100);
    assert_int_equal(queue_events_durable(q), 101);
    queue_port_free(port);
}

/* An outcome's own lines go with it: one that is stale (the recipient
 * bounced by an operator meanwhile) tells nothing, while the others of
 * the same update and the update's own lines (a DSN's) are written. */
static void
test_events_stale_outcome_untold(void **state)
{
    struct fixture *f = *state;
    struct queue *q = f->q;
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    uint64_t id = put_msg(q, 3, "x.example", "body\r\n", 6);

    /* the operator's bounce of recipient 1, with its line */
    struct queue_outcome b = {id, 1, QUEUE_BOUNCED, 0, 550, "bounced by operator",
                              0, false, NULL, 0};
    unsigned one = 1;
    struct ev_wait w = {0};
    assert_int_equal(ev_finish(port, &w,
                               queue_update_enqueue_events(q, port, &b, 1, NULL, NULL, 0, "b1\n", 3,
                                                           &one, NULL, ev_done, &w)),
                     0);
    /* a transaction that started before it ends: all three delivered, a
     * line each, and a line of the update's own after them */
    struct queue_outcome o[3] = {
        {id, 0, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0},
        {id, 1, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0},
        {id, 2, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0},
    };
    unsigned lines[3] = {1, 1, 1};
    w = (struct ev_wait){0};
    assert_int_equal(
        ev_finish(port, &w,
                  queue_update_enqueue_events(q, port, o, 3, NULL, NULL, 0, "d0\nd1\nd2\nm\n", 11,
                                              lines, NULL, ev_done, &w)),
        0);
    struct ev_rec r = {0};
    assert_int_equal(queue_events_read(q, 0, 1 << 20, ev_collect, &r), 2);
    assert_int_equal(r.seq[0], 0);
    assert_string_equal(r.text[0], "b1\n");
    assert_int_equal(r.seq[1], 1);
    assert_string_equal(r.text[1], "d0\nd2\nm\n"); /* not d1: recipient 1 was bounced */
    assert_int_equal(queue_events_durable(q), 4);
    struct queue_stats st;
    queue_stats(q, &st);
    assert_int_equal(st.event_lines, 4);
    assert_int_equal(st.outcomes_stale, 1);

    /* counts that claim more lines than the text has */
    unsigned two = 2;
    assert_int_equal(queue_update_enqueue_events(q, port, o, 1, NULL, NULL, 0, "x\n", 2, &two, NULL,
                                                 ev_done, &w),
                     -EINVAL);
    assert_int_equal(
        queue_update_enqueue_events(q, port, o, 1, NULL, NULL, 0, NULL, 0, &one, NULL, ev_done, &w),
        -EINVAL);
    assert_int_equal(queue_port_pending(port), 0);
    queue_port_free(port);
}

/* A deferral tried again after its commit happened but was reported
 * failed (a sync that failed after the data landed): the spool has it
 * already, so the retry changes nothing: one attempt, one event line. A
 * later deferral of the recipient (another time) applies as usual. */
static void
test_deferral_retried_counts_once(void **state)
{
    struct fixture *f = *state;
    struct queue *q = f->q;
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    uint64_t id = put_msg(q, 2, "x.example", "body\r\n", 6);
    uint64_t due = queue_id_time_ms(id) + 600000;
    struct queue_outcome o[2] = {
        {id, 0, QUEUE_DEFERRED, due, 451, "4.7.1 try later", 3, false, NULL, 0},
        {id, 1, QUEUE_DELIVERED, 0, 250, "ok", 0, false, NULL, 0},
    };
    unsigned lines[2] = {1, 1};
    for (int i = 0; i < 2; i++) { /* the commit, then the caller's retry */
        struct ev_wait w = {0};
        assert_int_equal(
            ev_finish(port, &w,
                      queue_update_enqueue_events(q, port, o, 2, NULL, NULL, 0, "t0\nd1\n", 6,
                                                  lines, NULL, ev_done, &w)),
            0);
    }
    struct ev_rec r = {0};
    assert_int_equal(queue_events_read(q, 0, 1 << 20, ev_collect, &r), 1);
    assert_string_equal(r.text[0], "t0\nd1\n");
    assert_int_equal(queue_events_durable(q), 2);
    struct queue_envelope *env = NULL;
    assert_int_equal(queue_envelope_get(q, id, &env), 0);
    assert_int_equal(env->nrcpt, 1);
    assert_int_equal(env->rcpt[0].attempts, 1);
    assert_true(env->rcpt[0].due_ms == due);
    env = queue_envelope_free(env);
    struct queue_stats st;
    queue_stats(q, &st);
    assert_int_equal(st.outcomes, 2);
    assert_int_equal(st.outcomes_stale, 2);

    /* the next attempt's deferral: a later time */
    o[0].due_ms = due + 1200000;
    struct ev_wait w = {0};
    assert_int_equal(ev_finish(port, &w,
                               queue_update_enqueue_events(q, port, o, 1, NULL, NULL, 0, "t0\n", 3,
                                                           lines, NULL, ev_done, &w)),
                     0);
    assert_int_equal(queue_envelope_get(q, id, &env), 0);
    assert_int_equal(env->rcpt[0].attempts, 2);
    assert_true(env->rcpt[0].due_ms == due + 1200000);
    queue_envelope_free(env);
    assert_int_equal(queue_events_durable(q), 3);
    queue_port_free(port);
}

/* ---- the sweep of finished messages (queue_int.h, "gone") ---- */

/* Entries of database db of the closed spool, through LMDB (0 when the
 * database is missing). */
static size_t
raw_entries(struct fixture *f, const char *db)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_stat st = {0};
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 16), 0);
    assert_int_equal(mdb_env_set_mapsize(env, f->cfg.map_size), 0);
    assert_int_equal(mdb_env_open(env, f->cfg.path, MDB_RDONLY, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0);
    if (mdb_dbi_open(txn, db, 0, &dbi) == 0)
        assert_int_equal(mdb_stat(txn, dbi, &st), 0);
    mdb_txn_abort(txn);
    mdb_env_close(env);
    return st.ms_entries;
}

/* A message whose last recipient is done is gone to every reader at once,
 * while its record and body wait for the sweep (here held off: sweep_ms
 * a minute); closing sweeps them. */
static void
test_finished_gone_before_the_sweep(void **state)
{
    struct fixture *f = *state;
    f->cfg.sweep_ms = 60000;
    reopen(f);
    size_t len = 600000; /* chunked: the body table too */
    char *big = make_body(len, 7);
    uint64_t a = put_msg(f->q, 1, "example.com", "a", 1);
    uint64_t b = put_msg(f->q, 2, "example.org", "bb", 2);
    uint64_t c = put_msg(f->q, 1, "example.net", big, len);
    struct queue_counts before;
    assert_int_equal(queue_counts(f->q, &before, NULL, NULL), 0);
    assert_true(before.bytes > len);
    outcome(f->q, a, 0, QUEUE_DELIVERED, 0, 250, NULL);
    outcome(f->q, c, 0, QUEUE_BOUNCED, 0, 550, "no");
    outcome(f->q, b, 0, QUEUE_DELIVERED, 0, 250, NULL);

    struct queue_envelope *e;
    char buf[8];
    size_t n;
    assert_int_equal(queue_envelope_get(f->q, a, &e), QUEUE_ENOTFOUND);
    assert_int_equal(queue_envelope_get(f->q, c, &e), QUEUE_ENOTFOUND);
    assert_int_equal(queue_body_read(f->q, a, 0, buf, 8, &n), QUEUE_ENOTFOUND);
    assert_int_equal(queue_body_read(f->q, c, 0, buf, 8, &n), QUEUE_ENOTFOUND);
    assert_int_equal(queue_envelope_get(f->q, b, &e), 0);
    assert_int_equal(e->nrcpt, 1);
    assert_int_equal(e->rcpt[0].index, 1);
    queue_envelope_free(e);
    assert_body(f->q, b, "bb", 2);
    struct queue_counts qc;
    assert_int_equal(queue_counts(f->q, &qc, NULL, NULL), 0);
    assert_true(qc.messages == 1);
    assert_true(qc.ready == 1);
    assert_true(qc.bytes + len <= before.bytes); /* c's body is not counted */
    unsigned walked = 0;
    assert_int_equal(queue_walk(f->q, count_only, &walked), 0);
    assert_int_equal(walked, 1);
    struct queue_check_report rep;
    assert_int_equal(queue_check(f->q, &rep), 0);
    assert_true(rep.messages == 1 && rep.body_chunks == 0 && rep.empty_messages == 0);
    /* an outcome for a finished recipient is stale, and so is a delay
     * warning's mark for a finished message */
    struct queue_stats st;
    queue_stats(f->q, &st);
    assert_true(st.removed == 2);
    assert_true(st.swept == 0);
    outcome(f->q, a, 0, QUEUE_BOUNCED, 0, 550, "late");
    struct queue_outcome w = {c, 0, QUEUE_WARNED, 0, 0, NULL, 0, false, NULL, 0};
    assert_int_equal(queue_update_wait(f->q, &w, 1), 0);
    struct queue_stats st2;
    queue_stats(f->q, &st2);
    assert_int_equal(st2.outcomes_stale - st.outcomes_stale, 2);
    assert_true(st2.swept == 0);

    /* the records are there until the sweep; closing makes it */
    queue_close(f->q);
    f->q = NULL;
    assert_int_equal(raw_entries(f, "msg"), 1);
    assert_int_equal(raw_entries(f, "body"), 0);
    assert_int_equal(raw_entries(f, "gone"), 0);
    fixture_open(f);
    assert_body(f->q, b, "bb", 2);
    assert_consistent(f->q);
    free(big);
}

/* A process that dies before its sweep leaves the finished messages'
 * records and their ids in "gone": the next open removes them. */
static void
test_finished_swept_at_open_after_a_crash(void **state)
{
    struct fixture *f = *state;
    queue_close(f->q);
    f->q = NULL;
    f->cfg.sweep_ms = 60000;
    int pipefd[2];
    assert_int_equal(pipe(pipefd), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* plain checks: a cmocka assert here would run the rest of the
         * tests in this copy of the process */
        char err[256];
        struct queue *q;
        if (queue_open(&f->cfg, &q, err, sizeof(err)) != 0)
            _exit(2);
        uint64_t ids[3];
        for (int i = 0; i < 3; i++) {
            struct queue_rcpt r = {.addr = "user@example.com"};
            struct queue_envelope env = {
                .id = queue_id_next(q), .sender = "s@example.org", .nrcpt = 1, .rcpt = &r};
            struct iovec iov = {"x", 1};
            if (queue_enqueue_wait(q, &env, &iov, 1) != 0)
                _exit(3);
            ids[i] = env.id;
        }
        for (int i = 0; i < 3; i += 2) {
            struct queue_outcome o = {ids[i], 0, QUEUE_DELIVERED, 0, 250, NULL, 0, false, NULL, 0};
            if (queue_update_wait(q, &o, 1) != 0)
                _exit(4);
        }
        ssize_t wr = write(pipefd[1], &ids[1], sizeof(ids[1]));
        _exit(wr == sizeof(ids[1]) ? 0 : 5); /* no close: no sweep */
    }
    close(pipefd[1]);
    uint64_t left = 0;
    assert_int_equal(read(pipefd[0], &left, sizeof(left)), sizeof(left));
    close(pipefd[0]);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_int_equal(raw_entries(f, "msg"), 3);
    assert_true(raw_entries(f, "gone") >= 1);

    /* a reader (sluice-spool's open) sweeps nothing and sees one message */
    char err[256];
    struct queue *ro;
    assert_int_equal(queue_open_readonly(&f->cfg, &ro, err, sizeof(err)), 0);
    struct queue_counts rc;
    assert_int_equal(queue_counts(ro, &rc, NULL, NULL), 0);
    assert_true(rc.messages == 1 && rc.ready == 1);
    struct queue_check_report rep;
    assert_int_equal(queue_check(ro, &rep), 0);
    assert_true(rep.messages == 1 && rep.bad_records == 0 && rep.empty_messages == 0);
    queue_close(ro);
    assert_int_equal(raw_entries(f, "msg"), 3);

    fixture_open(f);
    struct queue_counts qc;
    assert_int_equal(queue_counts(f->q, &qc, NULL, NULL), 0);
    assert_true(qc.messages == 1);
    assert_body(f->q, left, "x", 1);
    assert_consistent(f->q);
    queue_close(f->q);
    f->q = NULL;
    assert_int_equal(raw_entries(f, "msg"), 1);
    assert_int_equal(raw_entries(f, "gone"), 0);
    fixture_open(f);
}

/* An id "gone" names while its message still has a recipient (a damaged
 * record, a bug) is reported by the check and never swept: the message
 * stays, and is delivered. */
static void
test_sweep_never_removes_a_message_with_recipients(void **state)
{
    struct fixture *f = *state;
    uint64_t id = put_msg(f->q, 1, "example.com", "live", 4);
    queue_close(f->q);
    f->q = NULL;
    unsigned char key[8] = {0, 0, 0, 0, 0, 0, 0, 7};
    raw_put(f, "gone", key, sizeof(key), &id, sizeof(id));

    char err[256];
    struct queue *ro;
    assert_int_equal(queue_open_readonly(&f->cfg, &ro, err, sizeof(err)), 0);
    struct queue_check_report rep;
    assert_int_not_equal(queue_check(ro, &rep), 0);
    assert_true(rep.bad_records == 1);
    queue_close(ro);

    fixture_open(f); /* its sweep skips the id */
    assert_body(f->q, id, "live", 4);
    struct queue_envelope *e;
    assert_int_equal(queue_envelope_get(f->q, id, &e), 0);
    assert_int_equal(e->nrcpt, 1);
    queue_envelope_free(e);
    assert_consistent(f->q);
    queue_close(f->q);
    f->q = NULL;
    assert_int_equal(raw_entries(f, "gone"), 0);
    assert_int_equal(raw_entries(f, "msg"), 1);
    fixture_open(f);
}

/* An idle committer sweeps once the first finished message has waited
 * sweep_ms (0 and the default 200). */
static void
test_sweep_when_idle(void **state)
{
    struct fixture *f = *state;
    static const unsigned waits[] = {0, 200};
    for (size_t w = 0; w < sizeof(waits) / sizeof(waits[0]); w++) {
        f->cfg.sweep_ms = waits[w];
        reopen(f);
        uint64_t a = put_msg(f->q, 1, "example.com", "a", 1);
        outcome(f->q, a, 0, QUEUE_DELIVERED, 0, 250, NULL);
        struct queue_stats st;
        for (int i = 0; i < 100; i++) { /* up to 10 s */
            queue_stats(f->q, &st);
            if (st.swept == 1)
                break;
            usleep(100 * 1000);
        }
        assert_true(st.removed == 1 && st.swept == 1);
    }
}

/* GONE_SWEEP_N finished messages waiting make a sweep, whatever the time
 * (sweep_ms a minute here). */
static void
test_sweep_when_many_wait(void **state)
{
    struct fixture *f = *state;
    f->cfg.sweep_ms = 60000;
    f->cfg.unsafe_no_sync = true; /* 4,600 messages one at a time */
    reopen(f);
    enum { N = 4600 };
    uint64_t *ids = calloc(N, sizeof(*ids));
    for (int i = 0; i < N; i++)
        ids[i] = put_msg(f->q, 1, "example.com", "m", 1);
    struct queue_outcome *o = calloc(N, sizeof(*o));
    for (int i = 0; i < N; i++)
        o[i] = (struct queue_outcome){ids[i], 0, QUEUE_DELIVERED, 0, 250, NULL, 0, false, NULL, 0};
    for (int i = 0; i < N; i += 500)
        assert_int_equal(queue_update_wait(f->q, o + i, N - i < 500 ? N - i : 500), 0);
    /* the sweep comes before the first batch once GONE_SWEEP_N wait: the
     * 4,500 finished by the first nine updates, before the tenth */
    struct queue_stats st;
    queue_stats(f->q, &st);
    assert_true(st.removed == N);
    assert_true(st.swept == 4500);
    struct queue_counts qc;
    assert_int_equal(queue_counts(f->q, &qc, NULL, NULL), 0);
    assert_true(qc.messages == 0 && qc.ready == 0);
    free(o);
    free(ids);
}

int
main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_keys),
        cmocka_unit_test(test_id_text),
        cmocka_unit_test(test_id_rule),
        cmocka_unit_test(test_strerror),
        T(test_owner_walk_and_due_take),
        T(test_id_unique_threads),
        T(test_open_refusals),
        T(test_schema_refused),
        T(test_owner_fields_and_schema_1),
        T(test_open_readonly),
        T(test_not_a_spool),
        T(test_truncated_refused),
        T(test_truncated_tail_refused),
        T(test_short_file_with_free_tail_opens),
        T(test_enqueue_read),
        T(test_enqueue_invalid),
        T(test_reopen_keeps_data),
        T(test_ids_survive_delete_and_reopen),
        T(test_hundred_rcpts_one_body),
        T(test_delete_with_last_rcpt),
        T(test_held_recipient),
        T(test_delay_warned_mark),
        T(test_deferred_index),
        T(test_retime),
        T(test_due_many_renews),
        T(test_update_enqueue),
        T(test_due_take_clock_steps),
        T(test_corrupt_skipped),
        T(test_counts),
        T(test_walk),
        T(test_walk_many),
        T(test_large_body),
        T(test_port_async),
        T(test_close_finishes_queued),
        T(test_close_within_gives_up_on_a_stuck_committer),
        T(test_events_committed_and_numbered),
        T(test_events_stale_outcome_untold),
        T(test_update_enqueue_stale_refused),
        T(test_deferral_retried_counts_once),
        T(test_notes_with_outcomes),
        T(test_finished_gone_before_the_sweep),
        T(test_finished_swept_at_open_after_a_crash),
        T(test_sweep_when_idle),
        T(test_sweep_never_removes_a_message_with_recipients),
        T(test_sweep_when_many_wait),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
