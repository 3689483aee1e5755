/*
 * AUTH parts alone: the users file ("<>" in a domain list, errors), the
 * attempt steps and the stand-in setting of unknown names, the hashing
 * pool (completions on a worker through its mailbox, a full queue
 * refuses), and the failure limits (leaky bucket, kinds and keys apart,
 * IPv6 by /64, bounded table). Time is passed in, so nothing here waits.
 */
#include <arpa/inet.h>
#include <crypt.h>
#include <errno.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "engine/auth.h"
#include "engine/auth_limit.h"
#include "engine/auth_pool.h"
#include "engine/worker.h"

#define SEC 1000000000ULL

static char *
hash_of(const char *pw, const char *setting)
{
    struct crypt_data cd;
    memset(&cd, 0, sizeof(cd));
    const char *h = crypt_rn(pw, setting, &cd, sizeof(cd));
    assert_non_null(h);
    return strdup(h);
}

/* A users file in a temporary path; returns the path (free it). */
static char *
users_file(const char *text)
{
    char *path = strdup("/tmp/sluice-test-users-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

static struct auth_db *
load(const char *text, int want_rc, char *errs, size_t errcap)
{
    char *path = users_file(text);
    FILE *ef = fmemopen(errs, errcap, "w");
    assert_non_null(ef);
    struct auth_db *db = NULL;
    int rc = auth_db_load(path, &db, ef);
    fclose(ef);
    unlink(path);
    free(path);
    assert_int_equal(rc, want_rc);
    return db;
}

static void
test_users_file_null_sender(void **state)
{
    (void)state;
    char *h = hash_of("pw", "$5$rounds=1000$abcdefgh");
    char text[1024], errs[512] = "";
    snprintf(text, sizeof(text), "shop:%s:example.com\nbounce:%s:example.com, <>\nany:%s\n", h, h,
             h);
    struct auth_db *db = load(text, 0, errs, sizeof(errs));
    struct auth_cache *c = malloc(sizeof(*c));
    assert_non_null(c);
    auth_cache_init(c);
    const struct auth_user *shop = auth_verify(db, c, "shop", 4, "pw", 2);
    const struct auth_user *bounce = auth_verify(db, c, "bounce", 6, "pw", 2);
    const struct auth_user *any = auth_verify(db, c, "any", 3, "pw", 2);
    assert_non_null(shop);
    assert_non_null(bounce);
    assert_non_null(any);
    assert_false(shop->null_sender);
    assert_true(bounce->null_sender);
    assert_true(any->null_sender);
    assert_int_equal(bounce->ndomains, 1); /* "<>" is not a domain */
    assert_true(auth_user_may_send_as(bounce, "EXAMPLE.com", 11));
    assert_false(auth_user_may_send_as(shop, "example.org", 11));
    assert_int_equal(shop->scheme, AUTH_SCHEME_SHA256);
    assert_null(auth_verify(db, c, "shop", 4, "wrong", 5));
    assert_null(auth_verify(db, c, "nobody", 6, "pw", 2));
    auth_db_unref(db);

    /* "<>" alone: refused with the line */
    snprintf(text, sizeof(text), "odd:%s:<>\n", h);
    assert_null(load(text, -EINVAL, errs, sizeof(errs)));
    assert_non_null(strstr(errs, ":1:"));
    assert_non_null(strstr(errs, "<>"));
    free(c);
    free(h);
}

static void
test_scheme_of(void **state)
{
    (void)state;
    assert_int_equal(auth_scheme_of("$y$j9T$x"), AUTH_SCHEME_YESCRYPT);
    assert_int_equal(auth_scheme_of("$gy$j9T$x"), AUTH_SCHEME_GOST_YESCRYPT);
    assert_int_equal(auth_scheme_of("$2b$12$x"), AUTH_SCHEME_BCRYPT);
    assert_int_equal(auth_scheme_of("$6$rounds=5000$x"), AUTH_SCHEME_SHA512);
    assert_int_equal(auth_scheme_of("$5$x"), AUTH_SCHEME_SHA256);
    assert_int_equal(auth_scheme_of("$1$x"), AUTH_SCHEME_MD5);
    assert_int_equal(auth_scheme_of("$7$x"), AUTH_SCHEME_SCRYPT);
    assert_int_equal(auth_scheme_of("$sha1$x"), AUTH_SCHEME_OTHER);
    assert_string_equal(auth_scheme_str(AUTH_SCHEME_SHA512), "sha512crypt");
}

/* Unknown names run a user's own setting: the same one for the same name,
 * every user's for some names. */
static void
test_unknown_name_stand_in(void **state)
{
    (void)state;
    char *a = hash_of("a", "$5$rounds=1000$aaaaaaaa");
    char *b = hash_of("b", "$6$rounds=1000$bbbbbbbb");
    char *c3 = hash_of("c", "$1$cccccccc");
    char text[1024], errs[256] = "";
    snprintf(text, sizeof(text), "a:%s\nb:%s\nc:%s\n", a, b, c3);
    struct auth_db *db = load(text, 0, errs, sizeof(errs));
    struct auth_cache *cache = malloc(sizeof(*cache));
    struct auth_attempt *at = malloc(sizeof(*at));
    assert_non_null(cache);
    assert_non_null(at);
    auth_cache_init(cache);
    unsigned seen[3] = {0, 0, 0};
    for (int i = 0; i < 300; i++) {
        char name[32];
        int n = snprintf(name, sizeof(name), "nobody%d", i);
        const struct auth_user *u;
        assert_int_equal(auth_attempt_start(db, cache, name, (size_t)n, "x", 1, at, &u),
                         AUTH_START_HASH);
        assert_null(at->user);
        const char *first = at->setting;
        assert_int_equal(auth_attempt_start(db, cache, name, (size_t)n, "y", 1, at, &u),
                         AUTH_START_HASH);
        assert_ptr_equal(at->setting, first);
        seen[strcmp(first, a) == 0 ? 0 : strcmp(first, b) == 0 ? 1 : 2]++;
        assert_true(strcmp(first, a) == 0 || strcmp(first, b) == 0 || strcmp(first, c3) == 0);
        assert_int_equal(at->scheme, auth_scheme_of(first));
        void *scratch = auth_crypt_scratch_new();
        auth_attempt_hash(at, scratch);
        free(scratch);
        assert_false(at->match);
        assert_int_equal(at->pass[0], '\0'); /* wiped */
        assert_null(auth_attempt_finish(cache, at));
    }
    for (int i = 0; i < 3; i++)
        assert_true(seen[i] >= 50); /* 300 names, 1/3 each */
    /* a known name runs its own */
    const struct auth_user *u;
    assert_int_equal(auth_attempt_start(db, cache, "b", 1, "b", 1, at, &u), AUTH_START_HASH);
    assert_string_equal(at->setting, b);
    void *scratch = auth_crypt_scratch_new();
    auth_attempt_hash(at, scratch);
    free(scratch);
    assert_non_null(auth_attempt_finish(cache, at));
    /* then from the cache */
    assert_int_equal(auth_attempt_start(db, cache, "b", 1, "b", 1, at, &u), AUTH_START_CACHED);
    assert_string_equal(u->name, "b");
    /* malformed */
    assert_int_equal(auth_attempt_start(db, cache, "", 0, "b", 1, at, &u), AUTH_START_INVALID);
    assert_int_equal(auth_attempt_start(db, cache, "b", 1, "b\0", 2, at, &u), AUTH_START_INVALID);
    auth_db_unref(db);
    free(at);
    free(cache);
    free(a);
    free(b);
    free(c3);
}

/* ---- the pool ---- */

struct pjob {
    struct auth_job j;
    unsigned *done;
    unsigned want;
    pthread_t ran_on;
};

static void
on_pool_done(struct worker *w, struct worker_msg *m)
{
    struct pjob *p = (struct pjob *)((char *)m - offsetof(struct pjob, j.m));
    p->ran_on = pthread_self();
    if (++*p->done == p->want)
        w->stopping = true;
}

static void
test_pool_completes_on_the_worker(void **state)
{
    (void)state;
    struct worker *w = calloc(1, sizeof(*w));
    assert_non_null(w);
    if (worker_init(w, 0, 64, NULL) < 0) {
        free(w);
        skip();
    }
    char *h = hash_of("pw", "$6$rounds=20000$abcdefgh");
    char text[512], errs[256] = "";
    snprintf(text, sizeof(text), "u:%s\n", h);
    struct auth_db *db = load(text, 0, errs, sizeof(errs));
    struct auth_cache *cache = malloc(sizeof(*cache));
    assert_non_null(cache);
    auth_cache_init(cache);

    struct auth_pool *pool;
    assert_int_equal(auth_pool_new(1, 2, &pool), 0);
    enum { N = 6 };
    struct pjob *jobs = calloc(N, sizeof(*jobs));
    assert_non_null(jobs);
    unsigned done = 0, queued = 0, refused = 0;
    for (int i = 0; i < N; i++) {
        const struct auth_user *u;
        assert_int_equal(
            auth_attempt_start(db, cache, "u", 1, i == 0 ? "pw" : "no", 2, &jobs[i].j.a, &u),
            AUTH_START_HASH);
        jobs[i].j.m.fn = on_pool_done;
        jobs[i].done = &done;
        int rc = auth_pool_submit(pool, &jobs[i].j, w);
        if (rc == 0)
            queued++;
        else {
            assert_int_equal(rc, -EAGAIN);
            refused++;
        }
    }
    /* one thread, a queue of two, six at once: some wait their turn, the
     * rest are refused at once (at least three: the thread can have taken
     * one at most before the queue filled... or more, if it was quick) */
    assert_true(refused >= 1);
    assert_true(queued >= 2);
    for (int i = 0; i < N; i++)
        jobs[i].want = queued;
    assert_int_equal(worker_start(w), 0);
    assert_int_equal(worker_join(w), 0);
    assert_int_equal(done, queued);
    assert_true(pthread_equal(jobs[0].ran_on, w->thread));
    assert_non_null(auth_attempt_finish(cache, &jobs[0].j.a)); /* the right password */
    struct auth_pool_stats ps;
    auth_pool_stats(pool, &ps);
    assert_int_equal(ps.hashes[AUTH_SCHEME_SHA512], queued);
    assert_int_equal(ps.refused, refused);
    assert_int_equal(ps.waiting, 0);
    auth_pool_free(pool);
    worker_fini(w);
    auth_db_unref(db);
    free(jobs);
    free(cache);
    free(h);
    free(w);
}

/* ---- the limits ---- */

static void
test_limit_leaky_bucket(void **state)
{
    (void)state;
    struct auth_limit *l;
    assert_int_equal(auth_limit_new(1024, &l), 0);
    const uint64_t win = 60000; /* 3 per minute: one drains every 20 s */
    uint64_t t = 1000 * SEC;
    for (int i = 0; i < 3; i++) {
        assert_false(auth_limit_over(l, AUTH_LIMIT_USER, "alice", 5, 3, t));
        auth_limit_fail(l, AUTH_LIMIT_USER, "alice", 5, 3, win, t);
    }
    assert_true(auth_limit_over(l, AUTH_LIMIT_USER, "alice", 5, 3, t));
    assert_true(auth_limit_over(l, AUTH_LIMIT_USER, "alice", 5, 3, t + 19 * SEC));
    assert_false(auth_limit_over(l, AUTH_LIMIT_USER, "alice", 5, 3, t + 21 * SEC));
    /* another name, the same bytes as another kind, limit 0: apart */
    assert_false(auth_limit_over(l, AUTH_LIMIT_USER, "alicf", 5, 3, t));
    assert_false(auth_limit_over(l, AUTH_LIMIT_ADDRESS, "alice", 5, 3, t));
    assert_false(auth_limit_over(l, AUTH_LIMIT_USER, "alice", 5, 0, t));
    /* keep failing: at most 3 per window get through */
    uint64_t now = t + 21 * SEC;
    unsigned through = 0;
    for (int s = 0; s < 600; s++, now += SEC) { /* one try a second for 10 min */
        if (!auth_limit_over(l, AUTH_LIMIT_USER, "alice", 5, 3, now)) {
            auth_limit_fail(l, AUTH_LIMIT_USER, "alice", 5, 3, win, now);
            through++;
        }
    }
    assert_true(through >= 29 && through <= 31); /* 10 min at 3/min */
    struct auth_limit_stats st;
    auth_limit_stats(l, &st);
    assert_int_equal(st.entries, 1);
    auth_limit_free(l);
}

/* Attempts under way hold places: no more begin than the limit leaves. */
static void
test_limit_attempts_under_way(void **state)
{
    (void)state;
    struct auth_limit *l;
    assert_int_equal(auth_limit_new(1024, &l), 0);
    uint64_t t = 1000 * SEC, win = 600000;
    assert_int_equal(auth_limit_begin(l, AUTH_LIMIT_ADDRESS, "k", 1, 0, t), 0); /* no limit */
    for (int i = 0; i < 3; i++)
        assert_int_equal(auth_limit_begin(l, AUTH_LIMIT_ADDRESS, "k", 1, 3, t), 1);
    assert_int_equal(auth_limit_begin(l, AUTH_LIMIT_ADDRESS, "k", 1, 3, t), -EBUSY);
    assert_false(auth_limit_over(l, AUTH_LIMIT_ADDRESS, "k", 1, 3, t)); /* nothing failed yet */
    /* a success gives its place back without a failure */
    auth_limit_end(l, AUTH_LIMIT_ADDRESS, "k", 1, false, 3, win, t);
    assert_int_equal(auth_limit_begin(l, AUTH_LIMIT_ADDRESS, "k", 1, 3, t), 1);
    /* three failures: over, and no place until one drains (200 s each) */
    for (int i = 0; i < 3; i++)
        auth_limit_end(l, AUTH_LIMIT_ADDRESS, "k", 1, true, 3, win, t);
    assert_true(auth_limit_over(l, AUTH_LIMIT_ADDRESS, "k", 1, 3, t));
    assert_int_equal(auth_limit_begin(l, AUTH_LIMIT_ADDRESS, "k", 1, 3, t + 199 * SEC), -EBUSY);
    assert_int_equal(auth_limit_begin(l, AUTH_LIMIT_ADDRESS, "k", 1, 3, t + 201 * SEC), 1);
    assert_int_equal(auth_limit_begin(l, AUTH_LIMIT_ADDRESS, "k", 1, 3, t + 201 * SEC), -EBUSY);
    auth_limit_free(l);
}

static void
test_limit_ipv6_by_64_and_bounded(void **state)
{
    (void)state;
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6}, b6 = a6;
    inet_pton(AF_INET6, "2001:db8:1:2::1", &a6.sin6_addr);
    inet_pton(AF_INET6, "2001:db8:1:2:ffff::9", &b6.sin6_addr);
    uint8_t ka[16], kb[16];
    size_t la, lb;
    auth_limit_addr_key((struct sockaddr *)&a6, ka, &la);
    auth_limit_addr_key((struct sockaddr *)&b6, kb, &lb);
    assert_int_equal(la, lb);
    assert_memory_equal(ka, kb, la);
    struct sockaddr_in a4 = {.sin_family = AF_INET}, b4 = a4;
    inet_pton(AF_INET, "192.0.2.1", &a4.sin_addr);
    inet_pton(AF_INET, "192.0.2.2", &b4.sin_addr);
    auth_limit_addr_key((struct sockaddr *)&a4, ka, &la);
    auth_limit_addr_key((struct sockaddr *)&b4, kb, &lb);
    assert_int_equal(la, 4);
    assert_memory_not_equal(ka, kb, 4);

    struct auth_limit *l;
    assert_int_equal(auth_limit_new(100, &l), 0);
    struct auth_limit_stats st;
    auth_limit_stats(l, &st);
    assert_int_equal(st.capacity, 128);
    for (uint32_t i = 0; i < 10000; i++)
        auth_limit_fail(l, AUTH_LIMIT_ADDRESS, &i, sizeof(i), 10, 86400000, (1000 + i) * SEC);
    auth_limit_stats(l, &st);
    assert_true(st.entries <= st.capacity);
    assert_true(st.evictions >= 10000 - 128);
    /* the newest is still counted */
    uint32_t last = 9999;
    auth_limit_fail(l, AUTH_LIMIT_ADDRESS, &last, sizeof(last), 2, 600000, 11000 * SEC);
    assert_true(auth_limit_over(l, AUTH_LIMIT_ADDRESS, &last, sizeof(last), 2, 11000 * SEC));
    auth_limit_free(l);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_users_file_null_sender),
        cmocka_unit_test(test_scheme_of),
        cmocka_unit_test(test_unknown_name_stand_in),
        cmocka_unit_test(test_pool_completes_on_the_worker),
        cmocka_unit_test(test_limit_leaky_bucket),
        cmocka_unit_test(test_limit_attempts_under_way),
        cmocka_unit_test(test_limit_ipv6_by_64_and_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
