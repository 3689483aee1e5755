/*
 * Unit tests of certificate verification and session resumption: the
 * verify policy passes a certificate for the right name (exact, wildcard,
 * IP, any case, trailing dot) and fails a wrong name, an untrusted CA and a
 * self-signed certificate; the opportunistic policies pass them all and
 * record why they did not verify. The client cache resumes a second
 * connection to the same key (TLS 1.3 tickets arrive after the handshake),
 * never resumes an unverified session for a verify connection, keeps
 * keys apart, drops a session whose resumption failed (and not a newer
 * one stored under its key meanwhile), drops the least recently used,
 * survives a server reload, and does not let a session verified under one
 * CA store pass for verified under another (a reload's new client ctx).
 *
 * Threading: tests run one at a time on one thread.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/tls/tls_test.h"
#include "tls/tls.h"

struct fixture {
    struct test_pki pki;   /* the CA the client trusts */
    struct test_pki rogue; /* a CA it does not */
    struct test_cert good; /* mx.example.test, *.pool.example.test, 127.0.0.1 */
    struct test_cert untrusted;
    struct test_cert selfsigned;
    struct tls_config cfg;
    struct tls_ctx *cli_ctx;
    struct tls_cache *cache;
};

static int
setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    if (f == NULL || test_pki_init(&f->pki, "sluice test CA") != 0 ||
        test_pki_init(&f->rogue, "rogue CA") != 0 ||
        test_pki_issue(&f->pki, "good", "mx.example.test,*.pool.example.test,127.0.0.1", false,
                       &f->good) != 0 ||
        test_pki_issue(&f->rogue, "untrusted", "mx.example.test", false, &f->untrusted) != 0 ||
        test_pki_issue(&f->pki, "self", "mx.example.test", true, &f->selfsigned) != 0)
        return -1;
    test_config(&f->cfg);
    test_config_set(&f->cfg, "ca_file", f->pki.ca_file);
    char err[512];
    if (tls_ctx_new_client(&f->cfg, &f->cli_ctx, err, sizeof(err)) != 0) {
        fprintf(stderr, "client ctx: %s\n", err);
        return -1;
    }
    if (tls_cache_new(10, &f->cache) != 0)
        return -1;
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fixture *f = *state;
    tls_cache_free(f->cache);
    tls_ctx_unref(f->cli_ctx);
    conf_free(tls_conf_keys, &f->cfg);
    test_pki_fini(&f->pki);
    test_pki_fini(&f->rogue);
    free(f);
    return 0;
}

static struct tls_ctx *
server_ctx(struct fixture *f, const struct test_cert *cert)
{
    struct tls_config cfg;
    test_config(&cfg);
    test_config_set(&cfg, "cert_file", cert->cert_file);
    test_config_set(&cfg, "key_file", cert->key_file);
    struct tls_ctx *ctx;
    char err[512];
    if (tls_ctx_new_server(&cfg, &ctx, err, sizeof(err)) != 0)
        fail_msg("server ctx: %s", err);
    conf_free(tls_conf_keys, &cfg);
    (void)f;
    return ctx;
}

struct result {
    int srv_rc, cli_rc;
    struct tls_info info; /* the client's */
    char error[160];      /* the client's */
};

/* One connection from the client ctx to a server with cert: handshake,
 * one exchange each way (so the client takes its tickets), close. */
static struct result
connect_to(struct fixture *f, struct tls_ctx *srv_ctx, const char *host, bool verify,
           struct tls_cache *cache, const char *key)
{
    struct result res;
    memset(&res, 0, sizeof(res));
    struct tls_conn *srv, *cli;
    assert_int_equal(tls_conn_new_server(srv_ctx, &srv), 0);
    assert_int_equal(tls_conn_new_client(f->cli_ctx, host, verify, cache, key, &cli), 0);
    test_handshake(srv, cli, 300, &res.srv_rc, &res.cli_rc);
    if (res.srv_rc == 0 && res.cli_rc == 0) {
        test_send(srv, cli, "220 ready\r\n");
        test_send(cli, srv, "EHLO client.example.test\r\n");
        test_send(srv, cli, "250 OK\r\n");
        /* QUIT, 221, then close_notify: a conn freed without it makes
         * its sessions unresumable (OpenSSL's rule for broken ones). */
        assert_int_equal(tls_conn_shutdown(cli), 0);
        test_move(cli, srv, 65536);
    }
    tls_conn_info(cli, &res.info);
    snprintf(res.error, sizeof(res.error), "%s", tls_conn_error_str(cli));
    tls_conn_free(srv);
    tls_conn_free(cli);
    return res;
}

static void
expect_ok(const struct result *r)
{
    if (r->srv_rc != 0 || r->cli_rc != 0)
        fail_msg("handshake: server %s, client %s (%s)", tls_strerror(r->srv_rc),
                 tls_strerror(r->cli_rc), r->error);
}

static void
test_verify_good_names(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *srv = server_ctx(f, &f->good);
    static const char *const names[] = {"mx.example.test", "MX.Example.TEST.",
                                        "a.pool.example.test", "127.0.0.1"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        struct result r = connect_to(f, srv, names[i], true, NULL, NULL);
        expect_ok(&r);
        assert_true(r.info.verified);
        assert_string_equal(r.info.verify_result, "ok");
        assert_string_equal(r.info.protocol, "TLSv1.3");
        assert_non_null(strstr(r.info.peer_subject, "CN=mx.example.test"));
        assert_non_null(strstr(r.info.peer_issuer, "CN=sluice test CA"));
        assert_false(r.info.resumed);
    }
    tls_ctx_unref(srv);
}

static void
test_verify_failures(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *good = server_ctx(f, &f->good);
    struct tls_ctx *untrusted = server_ctx(f, &f->untrusted);
    struct tls_ctx *self = server_ctx(f, &f->selfsigned);
    static const struct {
        struct tls_ctx **srv;
        const char *host;
        const char *why;
    } cases[] = {
        {NULL, "other.example.test", "hostname mismatch"},
        {NULL, "b.a.pool.example.test", "hostname mismatch"}, /* a wildcard covers one label */
        {NULL, "example.test", "hostname mismatch"},
        {NULL, "127.0.0.2", "IP address mismatch"},
        {NULL, "mx.example.test", "unable to get local issuer certificate"},
        {NULL, "mx.example.test", "self-signed certificate"},
    };
    struct tls_ctx *srvs[] = {good, good, good, good, untrusted, self};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        /* verify: the handshake fails, the server hears an alert. */
        struct result r = connect_to(f, srvs[i], cases[i].host, true, f->cache, NULL);
        assert_int_equal(r.cli_rc, TLS_EVERIFY);
        assert_int_equal(r.srv_rc, TLS_EALERT);
        if (strstr(r.error, cases[i].why) == NULL)
            fail_msg("case %zu: '%s' lacks '%s'", i, r.error, cases[i].why);
        assert_non_null(strstr(r.error, "certificate verify failed"));
        /* What was refused is still there for the log. */
        assert_false(r.info.verified);
        assert_string_equal(r.info.verify_result, cases[i].why);
        assert_non_null(strstr(r.info.peer_subject, "CN="));

        /* optional/required: the same certificate passes, the log says why
         * it would not have verified. */
        r = connect_to(f, srvs[i], cases[i].host, false, NULL, NULL);
        expect_ok(&r);
        assert_false(r.info.verified);
        assert_string_equal(r.info.verify_result, cases[i].why);
    }
    /* Opportunistic without a name: nothing to check the name against. */
    struct result r = connect_to(f, good, NULL, false, f->cache, NULL);
    expect_ok(&r);
    assert_false(r.info.verified);
    /* Verify needs a name. */
    struct tls_conn *c = (struct tls_conn *)1;
    assert_int_equal(tls_conn_new_client(f->cli_ctx, NULL, true, NULL, NULL, &c), -EINVAL);
    assert_null(c);
    assert_int_equal(tls_conn_new_client(f->cli_ctx, ".", false, NULL, NULL, &c), -EINVAL);
    tls_ctx_unref(good);
    tls_ctx_unref(untrusted);
    tls_ctx_unref(self);
}

static void
test_resume(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *srv = server_ctx(f, &f->good);
    struct tls_cache_stats st;

    struct result r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    expect_ok(&r);
    assert_false(r.info.resumed);
    tls_cache_stats(f->cache, &st);
    assert_int_equal(st.entries, 1); /* the ticket came after the handshake */
    assert_int_equal(st.misses, 1);

    for (int i = 0; i < 3; i++) {
        r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
        expect_ok(&r);
        assert_true(r.info.resumed);
        assert_true(r.info.verified);
        assert_string_equal(r.info.verify_result, "ok");
        assert_non_null(strstr(r.info.peer_subject, "CN=mx.example.test"));
    }
    /* Opportunistic connections use verified sessions too; names differ
     * only in case and the trailing dot. */
    r = connect_to(f, srv, "MX.example.test.", false, f->cache, NULL);
    expect_ok(&r);
    assert_true(r.info.resumed);
    tls_cache_stats(f->cache, &st);
    assert_int_equal(st.hits, 4);
    assert_int_equal(st.entries, 1);

    /* Another key is another session: the port makes a different key. */
    r = connect_to(f, srv, "mx.example.test", true, f->cache, "mx.example.test:587");
    expect_ok(&r);
    assert_false(r.info.resumed);
    r = connect_to(f, srv, "mx.example.test", true, f->cache, "mx.example.test:587");
    assert_true(r.info.resumed);
    tls_cache_stats(f->cache, &st);
    assert_int_equal(st.entries, 2);

    /* A server reload makes new ticket keys: a full handshake, no error,
     * and the new session replaces the old. */
    tls_ctx_unref(srv);
    srv = server_ctx(f, &f->good);
    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    expect_ok(&r);
    assert_false(r.info.resumed);
    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    assert_true(r.info.resumed);

    /* No cache, no resumption. */
    r = connect_to(f, srv, "mx.example.test", true, NULL, NULL);
    expect_ok(&r);
    assert_false(r.info.resumed);
    tls_ctx_unref(srv);
}

/* A session whose certificate did not verify is never resumed by a
 * verify connection: that would skip the check it needs. */
static void
test_resume_unverified(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *srv = server_ctx(f, &f->untrusted);
    struct result r = connect_to(f, srv, "mx.example.test", false, f->cache, NULL);
    expect_ok(&r);
    r = connect_to(f, srv, "mx.example.test", false, f->cache, NULL);
    expect_ok(&r);
    assert_true(r.info.resumed);
    assert_false(r.info.verified);
    assert_string_equal(r.info.verify_result, "unable to get local issuer certificate");

    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    assert_int_equal(r.cli_rc, TLS_EVERIFY);
    assert_false(r.info.resumed);

    /* Nor one verified for another name under the same key. */
    tls_ctx_unref(srv);
    srv = server_ctx(f, &f->good);
    r = connect_to(f, srv, "a.pool.example.test", true, f->cache, "shared");
    expect_ok(&r);
    r = connect_to(f, srv, "b.pool.example.test", true, f->cache, "shared");
    expect_ok(&r);
    assert_false(r.info.resumed);
    r = connect_to(f, srv, "b.pool.example.test", true, f->cache, "shared");
    assert_true(r.info.resumed);
    /* An opportunistic resumption of a session verified for another name
     * does not count as verified, nor do the sessions it brings. */
    r = connect_to(f, srv, "c.pool.example.test", false, f->cache, "shared");
    expect_ok(&r);
    assert_true(r.info.resumed);
    assert_false(r.info.verified);
    r = connect_to(f, srv, "c.pool.example.test", true, f->cache, "shared");
    expect_ok(&r);
    assert_false(r.info.resumed);
    tls_ctx_unref(srv);
}

/* A resumed handshake that fails drops the session it offered from the
 * cache, and only that one: another connection to the same host may have
 * stored a fresh session under the key meanwhile, and the next connection
 * resumes that. */
static void
test_resume_failure_keeps_newer(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *srv = server_ctx(f, &f->good);
    struct tls_cache_stats st;
    struct result r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    expect_ok(&r);
    /* b offers the cached session and waits for its server's answer. */
    struct tls_conn *b;
    assert_int_equal(tls_conn_new_client(f->cli_ctx, "mx.example.test", true, f->cache, NULL, &b),
                     0);
    assert_int_equal(tls_conn_handshake(b), TLS_WANT_IO);
    /* Meanwhile another connection to the host stores its new session. */
    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    expect_ok(&r);
    assert_true(r.info.resumed);
    tls_cache_stats(f->cache, &st);
    assert_int_equal(st.entries, 1);
    /* b's server answers with what is not TLS: b's resumption fails. */
    static const char junk[] = "HTTP/1.1 400 Bad Request\r\n\r\n";
    assert_int_equal(tls_conn_feed(b, junk, sizeof(junk) - 1), (ssize_t)(sizeof(junk) - 1));
    assert_true(tls_conn_handshake(b) < 0);
    b = tls_conn_free(b);
    /* The fresh session is still there, and resumes. */
    tls_cache_stats(f->cache, &st);
    assert_int_equal(st.entries, 1);
    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    expect_ok(&r);
    assert_true(r.info.resumed);

    /* The session offered is still the one cached: dropped, so the next
     * connection starts afresh. */
    assert_int_equal(tls_conn_new_client(f->cli_ctx, "mx.example.test", true, f->cache, NULL, &b),
                     0);
    assert_int_equal(tls_conn_handshake(b), TLS_WANT_IO);
    assert_int_equal(tls_conn_feed(b, junk, sizeof(junk) - 1), (ssize_t)(sizeof(junk) - 1));
    assert_true(tls_conn_handshake(b) < 0);
    b = tls_conn_free(b);
    tls_cache_stats(f->cache, &st);
    assert_int_equal(st.entries, 0);
    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    expect_ok(&r);
    assert_false(r.info.resumed);
    tls_ctx_unref(srv);
}

static void
test_cache_lru(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *srv = server_ctx(f, &f->good);
    struct tls_cache *small;
    assert_int_equal(tls_cache_new(2, &small), 0);
    struct tls_cache_stats st;

    static const char *const hosts[] = {"a.pool.example.test", "b.pool.example.test",
                                        "c.pool.example.test"};
    struct result r = connect_to(f, srv, hosts[0], true, small, NULL);
    r = connect_to(f, srv, hosts[1], true, small, NULL);
    /* Use a, so that b is the least recently used when c comes. */
    r = connect_to(f, srv, hosts[0], true, small, NULL);
    assert_true(r.info.resumed);
    r = connect_to(f, srv, hosts[2], true, small, NULL);
    tls_cache_stats(small, &st);
    assert_int_equal(st.entries, 2);
    assert_int_equal(st.evictions, 1);
    r = connect_to(f, srv, hosts[1], true, small, NULL);
    assert_false(r.info.resumed);
    r = connect_to(f, srv, hosts[2], true, small, NULL);
    assert_true(r.info.resumed);
    small = tls_cache_free(small);

    /* A cache of 0 keeps nothing. */
    assert_int_equal(tls_cache_new(0, &small), 0);
    r = connect_to(f, srv, hosts[0], true, small, NULL);
    expect_ok(&r);
    r = connect_to(f, srv, hosts[0], true, small, NULL);
    assert_false(r.info.resumed);
    tls_cache_stats(small, &st);
    assert_int_equal(st.entries, 0);
    small = tls_cache_free(small);
    assert_null(tls_cache_free(NULL));
    tls_ctx_unref(srv);
}

/* TLS 1.2 peers still abound among MX hosts: their sessions come in the
 * handshake, not after it. */
static void
test_resume_tls12(void **state)
{
    struct fixture *f = *state;
    struct tls_config cfg;
    test_config(&cfg);
    test_config_set(&cfg, "cert_file", f->good.cert_file);
    test_config_set(&cfg, "key_file", f->good.key_file);
    test_config_set(&cfg, "max_protocol", "TLSv1.2");
    struct tls_ctx *srv;
    char err[512];
    if (tls_ctx_new_server(&cfg, &srv, err, sizeof(err)) != 0)
        fail_msg("server ctx: %s", err);
    conf_free(tls_conf_keys, &cfg);

    struct result r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    expect_ok(&r);
    assert_string_equal(r.info.protocol, "TLSv1.2");
    assert_false(r.info.resumed);
    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    expect_ok(&r);
    assert_string_equal(r.info.protocol, "TLSv1.2");
    assert_true(r.info.resumed);
    assert_true(r.info.verified);
    tls_ctx_unref(srv);
}

/* A reload makes a new client ctx, maybe with other CAs: a session that
 * verified under the old CA store must not let a verify connection of the
 * new ctx skip the check. */
static void
test_resume_after_trust_change(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *srv = server_ctx(f, &f->good);
    struct result r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    expect_ok(&r);
    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    assert_true(r.info.resumed);

    /* The new store trusts only the rogue CA: a full handshake, refused. */
    struct tls_config cfg;
    test_config(&cfg);
    test_config_set(&cfg, "ca_file", f->rogue.ca_file);
    struct tls_ctx *rogue_only;
    char err[512];
    if (tls_ctx_new_client(&cfg, &rogue_only, err, sizeof(err)) != 0)
        fail_msg("client ctx: %s", err);
    conf_free(tls_conf_keys, &cfg);
    struct tls_ctx *old = f->cli_ctx;
    f->cli_ctx = rogue_only;
    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    assert_int_equal(r.cli_rc, TLS_EVERIFY);
    assert_false(r.info.resumed);
    /* Opportunistic: the session resumes, and is not called verified. */
    r = connect_to(f, srv, "mx.example.test", false, f->cache, NULL);
    expect_ok(&r);
    assert_true(r.info.resumed);
    assert_false(r.info.verified);

    /* Even the same CAs in a new ctx: one full handshake, then resumed. */
    f->cli_ctx = tls_ctx_unref(rogue_only);
    test_config(&cfg);
    test_config_set(&cfg, "ca_file", f->pki.ca_file);
    struct tls_ctx *again;
    if (tls_ctx_new_client(&cfg, &again, err, sizeof(err)) != 0)
        fail_msg("client ctx: %s", err);
    conf_free(tls_conf_keys, &cfg);
    f->cli_ctx = again;
    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    expect_ok(&r);
    assert_false(r.info.resumed);
    assert_true(r.info.verified);
    r = connect_to(f, srv, "mx.example.test", true, f->cache, NULL);
    assert_true(r.info.resumed);
    assert_true(r.info.verified);
    tls_ctx_unref(old);
    tls_ctx_unref(srv);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_verify_good_names, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resume, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resume_unverified, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resume_failure_keeps_newer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cache_lru, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resume_tls12, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resume_after_trust_change, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
