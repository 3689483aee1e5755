/*
 * Unit tests of DANE (RFC 7672) in tls/: a DANE-EE(3 1 1) record matches a
 * self-signed certificate whatever its name; a DANE-TA(2 0 1) record
 * matches a CA that the server sends in its chain, and then the leaf must
 * name the TLSA base domain or the second reference identifier given (an
 * MX host's CNAME target, or the alias), no other; a record for another
 * key fails the handshake with TLS_EVERIFY; PKIX usages are not usable;
 * and the session cache resumes a DANE connection only from a session
 * that was DANE-authenticated under the same records and names, never
 * from an opportunistic one stored for the same host.
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

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "tests/tls/tls_test.h"
#include "tls/tls.h"

struct fixture {
    struct test_pki pki;
    struct test_cert leaf;  /* mx.example.test, issued by the CA */
    struct test_cert self;  /* self-signed, named wrong.example.test */
    struct test_cert other; /* self-signed: a key no record names */
    char chain_file[400];   /* leaf then CA: what a DANE-TA server sends */
    struct tls_config cfg;
    struct tls_ctx *cli_ctx;
    struct tls_cache *cache;
};

static int
setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    if (f == NULL || test_pki_init(&f->pki, "dane test CA") != 0 ||
        test_pki_issue(&f->pki, "leaf", "mx.example.test", false, &f->leaf) != 0 ||
        test_pki_issue(&f->pki, "self", "wrong.example.test", true, &f->self) != 0 ||
        test_pki_issue(&f->pki, "other", "mx.example.test", true, &f->other) != 0)
        return -1;
    snprintf(f->chain_file, sizeof(f->chain_file), "%s/chain.pem", f->pki.dir);
    FILE *out = fopen(f->chain_file, "w");
    if (out == NULL)
        return -1;
    const char *parts[] = {f->leaf.cert_file, f->pki.ca_file};
    for (int i = 0; i < 2; i++) {
        FILE *in = fopen(parts[i], "r");
        char buf[4096];
        size_t n;
        if (in == NULL)
            return -1;
        while ((n = fread(buf, 1, sizeof(buf), in)) > 0)
            fwrite(buf, 1, n, out);
        fclose(in);
    }
    fclose(out);
    test_config(&f->cfg);
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
    free(f);
    return 0;
}

static struct tls_ctx *
server_ctx(const char *cert_file, const char *key_file)
{
    struct tls_config cfg;
    test_config(&cfg);
    test_config_set(&cfg, "cert_file", cert_file);
    test_config_set(&cfg, "key_file", key_file);
    struct tls_ctx *ctx;
    char err[512];
    if (tls_ctx_new_server(&cfg, &ctx, err, sizeof(err)) != 0)
        fail_msg("server ctx: %s", err);
    conf_free(tls_conf_keys, &cfg);
    return ctx;
}

/* SHA-256 of the certificate (selector 0) or of its SubjectPublicKeyInfo
 * (selector 1), as a TLSA record's data. */
static void
digest(const char *pem, int selector, uint8_t out[32])
{
    FILE *fp = fopen(pem, "r");
    assert_non_null(fp);
    X509 *x = PEM_read_X509(fp, NULL, NULL, NULL);
    fclose(fp);
    assert_non_null(x);
    unsigned char *der = NULL;
    int len = selector == 0 ? i2d_X509(x, &der) : i2d_X509_PUBKEY(X509_get_X509_PUBKEY(x), &der);
    assert_true(len > 0);
    unsigned mdlen = 32;
    assert_int_equal(EVP_Digest(der, (size_t)len, out, &mdlen, EVP_sha256(), NULL), 1);
    OPENSSL_free(der);
    X509_free(x);
}

struct result {
    int srv_rc, cli_rc, new_rc;
    struct tls_info info;
    char error[160];
};

static struct result
dane_connect2(struct fixture *f, struct tls_ctx *srv_ctx, const char *host, const char *alt,
              const struct tls_tlsa *rrs, unsigned n, struct tls_cache *cache)
{
    struct result res;
    memset(&res, 0, sizeof(res));
    struct tls_conn *srv, *cli;
    res.new_rc = tls_conn_new_client_dane(f->cli_ctx, host, alt, rrs, n, cache, host, &cli);
    if (res.new_rc != 0)
        return res;
    assert_int_equal(tls_conn_new_server(srv_ctx, &srv), 0);
    test_handshake(srv, cli, 300, &res.srv_rc, &res.cli_rc);
    if (res.srv_rc == 0 && res.cli_rc == 0) {
        test_send(srv, cli, "220 ready\r\n");
        test_send(cli, srv, "EHLO client.example.test\r\n");
        test_send(srv, cli, "250 OK\r\n");
        assert_int_equal(tls_conn_shutdown(cli), 0);
        test_move(cli, srv, 65536);
    }
    tls_conn_info(cli, &res.info);
    snprintf(res.error, sizeof(res.error), "%s", tls_conn_error_str(cli));
    tls_conn_free(srv);
    tls_conn_free(cli);
    return res;
}

static struct result
dane_connect(struct fixture *f, struct tls_ctx *srv_ctx, const char *host,
             const struct tls_tlsa *rrs, unsigned n, struct tls_cache *cache)
{
    return dane_connect2(f, srv_ctx, host, NULL, rrs, n, cache);
}

static void
expect_ok(const struct result *r)
{
    if (r->new_rc != 0 || r->srv_rc != 0 || r->cli_rc != 0)
        fail_msg("new %d, handshake: server %s, client %s (%s)", r->new_rc, tls_strerror(r->srv_rc),
                 tls_strerror(r->cli_rc), r->error);
}

static void
test_dane_ee(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *srv = server_ctx(f->self.cert_file, f->self.key_file);
    uint8_t d[32], wrong[32];
    digest(f->self.cert_file, 1, d);
    digest(f->other.cert_file, 1, wrong);
    /* A PKIX-EE record beside it is ignored, not required. */
    struct tls_tlsa rr[2] = {{1, 1, 1, 32, wrong}, {3, 1, 1, 32, d}};
    struct result r = dane_connect(f, srv, "mx.example.test", rr, 2, NULL);
    expect_ok(&r);
    assert_true(r.info.verified);
    assert_true(r.info.dane);
    assert_int_equal(r.info.dane_usage, 3);

    /* the full certificate (3 0 1) matches too */
    digest(f->self.cert_file, 0, d);
    struct tls_tlsa full = {3, 0, 1, 32, d};
    r = dane_connect(f, srv, "mx.example.test", &full, 1, NULL);
    expect_ok(&r);

    /* another key's record: refused */
    struct tls_tlsa bad = {3, 1, 1, 32, wrong};
    r = dane_connect(f, srv, "mx.example.test", &bad, 1, NULL);
    assert_int_equal(r.cli_rc, TLS_EVERIFY);
    assert_false(r.info.verified);
    tls_ctx_unref(srv);
}

static void
test_dane_ta(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *srv = server_ctx(f->chain_file, f->leaf.key_file);
    uint8_t d[32];
    digest(f->pki.ca_file, 0, d);
    struct tls_tlsa rr = {2, 0, 1, 32, d};
    struct result r = dane_connect(f, srv, "mx.example.test", &rr, 1, NULL);
    expect_ok(&r);
    assert_true(r.info.verified);
    assert_int_equal(r.info.dane_usage, 2);
    /* A trust anchor vouches for names: the leaf must name the host. */
    r = dane_connect(f, srv, "mx2.example.test", &rr, 1, NULL);
    assert_int_equal(r.cli_rc, TLS_EVERIFY);
    tls_ctx_unref(srv);

    /* The server that sends no CA cannot be matched by its digest. */
    srv = server_ctx(f->leaf.cert_file, f->leaf.key_file);
    r = dane_connect(f, srv, "mx.example.test", &rr, 1, NULL);
    assert_int_equal(r.cli_rc, TLS_EVERIFY);
    tls_ctx_unref(srv);
}

/* An MX host that is a validated CNAME: alias.customer.test -> mx.example.test,
 * whose certificate (issued under the pinned CA) names only the target.
 * With the TLSA records at the alias (the base domain when the target has
 * none), the target is the second reference identifier (RFC 7672 3.2.2). */
static void
test_dane_ta_cname(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *srv = server_ctx(f->chain_file, f->leaf.key_file);
    uint8_t d[32];
    digest(f->pki.ca_file, 0, d);
    struct tls_tlsa rr = {2, 0, 1, 32, d};
    /* Base domain the alias, the target given beside it: accepted. */
    struct result r =
        dane_connect2(f, srv, "alias.customer.test", "MX.example.test.", &rr, 1, NULL);
    expect_ok(&r);
    assert_true(r.info.verified);
    assert_int_equal(r.info.dane_usage, 2);
    /* The alias alone: the leaf does not name it. */
    r = dane_connect2(f, srv, "alias.customer.test", NULL, &rr, 1, NULL);
    assert_int_equal(r.cli_rc, TLS_EVERIFY);
    assert_false(r.info.verified);
    /* Base domain the target (records there), the alias beside it. */
    r = dane_connect2(f, srv, "mx.example.test", "alias.customer.test", &rr, 1, NULL);
    expect_ok(&r);
    /* A second name is one more name, not a wildcard: neither matches. */
    r = dane_connect2(f, srv, "alias.customer.test", "other.example.test", &rr, 1, NULL);
    assert_int_equal(r.cli_rc, TLS_EVERIFY);
    /* DANE-EE needs no name: the same leaf's key authenticates either way. */
    uint8_t k[32];
    digest(f->leaf.cert_file, 1, k);
    struct tls_tlsa ee = {3, 1, 1, 32, k};
    r = dane_connect2(f, srv, "alias.customer.test", NULL, &ee, 1, NULL);
    expect_ok(&r);

    /* A session authenticated through the second name does not resume a
     * conn that lacks it (the alias went away, same records): a full
     * handshake, refused. */
    r = dane_connect2(f, srv, "alias.customer.test", "mx.example.test", &rr, 1, f->cache);
    expect_ok(&r);
    r = dane_connect2(f, srv, "alias.customer.test", "mx.example.test", &rr, 1, f->cache);
    expect_ok(&r);
    assert_true(r.info.resumed);
    r = dane_connect2(f, srv, "alias.customer.test", NULL, &rr, 1, f->cache);
    assert_false(r.info.resumed);
    assert_int_equal(r.cli_rc, TLS_EVERIFY);

    /* A second name that is no DNS name is refused up front. */
    struct tls_conn *c;
    assert_int_equal(
        tls_conn_new_client_dane(f->cli_ctx, "mx.example.test", "", &rr, 1, NULL, NULL, &c),
        -EINVAL);
    assert_null(c);
    tls_ctx_unref(srv);
}

static void
test_unusable(void **state)
{
    struct fixture *f = *state;
    uint8_t d[32] = {0};
    struct tls_tlsa rr[4] = {
        {0, 0, 1, 32, d}, /* PKIX-TA */
        {1, 1, 1, 32, d}, /* PKIX-EE */
        {3, 2, 1, 32, d}, /* unknown selector */
        {2, 0, 9, 32, d}, /* unknown matching type */
    };
    assert_int_equal(tls_tlsa_usable(rr, 4), 0);
    struct tls_conn *c;
    assert_int_equal(
        tls_conn_new_client_dane(f->cli_ctx, "mx.example.test", NULL, rr, 4, NULL, NULL, &c),
        -ENODATA);
    assert_null(c);
    /* a SHA-256 record of the wrong length: OpenSSL calls it unusable */
    struct tls_tlsa shortd = {3, 1, 1, 5, d};
    /* and so does the count: the caller's "none usable" (unauthenticated
     * TLS, RFC 7672 2.2), not a DANE connection that cannot start */
    assert_int_equal(tls_tlsa_usable(&shortd, 1), 0);
    struct tls_tlsa bad[3] = {
        {3, 1, 2, 32, d}, /* SHA-512 of 32 octets */
        {2, 1, 1, 20, d}, /* SHA-256 of 20 */
        {3, 0, 0, 32, d}, /* a "certificate" that is no DER */
    };
    assert_int_equal(tls_tlsa_usable(bad, 3), 0);
    struct tls_tlsa good = {3, 1, 1, 32, d};
    assert_int_equal(tls_tlsa_usable(&good, 1), 1);
    assert_int_equal(
        tls_conn_new_client_dane(f->cli_ctx, "mx.example.test", NULL, &shortd, 1, NULL, NULL, &c),
        -ENODATA);
}

/* Resumption never stands in for DANE authentication it did not have. */
static void
test_resume(void **state)
{
    struct fixture *f = *state;
    struct tls_ctx *srv = server_ctx(f->self.cert_file, f->self.key_file);
    uint8_t d[32], wrong[32];
    digest(f->self.cert_file, 1, d);
    digest(f->other.cert_file, 1, wrong);
    struct tls_tlsa rr = {3, 1, 1, 32, d};

    /* An opportunistic session for the host, under the same cache key. */
    struct tls_conn *srvc, *cli;
    int src, crc;
    assert_int_equal(tls_conn_new_server(srv, &srvc), 0);
    assert_int_equal(
        tls_conn_new_client(f->cli_ctx, "mx.example.test", false, f->cache, NULL, &cli), 0);
    test_handshake(srvc, cli, 300, &src, &crc);
    assert_int_equal(crc, 0);
    test_send(srvc, cli, "220 ready\r\n");
    test_send(cli, srvc, "QUIT\r\n");
    assert_int_equal(tls_conn_shutdown(cli), 0);
    tls_conn_free(srvc);
    tls_conn_free(cli);
    struct tls_cache_stats st;
    tls_cache_stats(f->cache, &st);
    assert_int_equal(st.entries, 1);

    /* The DANE conn does not take it: a full, authenticated handshake. */
    struct result r = dane_connect(f, srv, "mx.example.test", &rr, 1, f->cache);
    expect_ok(&r);
    assert_false(r.info.resumed);
    assert_int_equal(r.info.dane_usage, 3);
    /* Its own session resumes the next DANE conn with the same records. */
    r = dane_connect(f, srv, "mx.example.test", &rr, 1, f->cache);
    expect_ok(&r);
    assert_true(r.info.resumed);
    assert_true(r.info.verified);
    /* Other records (a rollover): no resumption; and these fail. */
    struct tls_tlsa other = {3, 1, 1, 32, wrong};
    r = dane_connect(f, srv, "mx.example.test", &other, 1, f->cache);
    assert_false(r.info.resumed);
    assert_int_equal(r.cli_rc, TLS_EVERIFY);
    tls_ctx_unref(srv);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_dane_ee, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dane_ta, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dane_ta_cname, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unusable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_resume, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
