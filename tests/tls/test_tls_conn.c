/*
 * Unit tests of tls/ connections: the [tls] keys and context errors, a
 * server and a client conn joined in memory with chunks from 1 byte up,
 * data both ways (10 MB through small bounded buffers), close_notify,
 * pointers from peek staying put, bounded input, garbage instead of a
 * handshake, plaintext injected after it, no cipher in common, and a ctx
 * dropped while its conns live on.
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

#define HOST "mx.example.test"

struct fixture {
    struct test_pki pki;
    struct test_cert cert;
    struct tls_config cfg;
    struct tls_ctx *srv_ctx;
    struct tls_ctx *cli_ctx;
    struct tls_conn *srv;
    struct tls_conn *cli;
};

static void
make_ctxs(struct fixture *f)
{
    char err[512];
    int rc = tls_ctx_new_server(&f->cfg, &f->srv_ctx, err, sizeof(err));
    if (rc != 0)
        fail_msg("server ctx: %s", err);
    rc = tls_ctx_new_client(&f->cfg, &f->cli_ctx, err, sizeof(err));
    if (rc != 0)
        fail_msg("client ctx: %s", err);
}

static void
make_conns(struct fixture *f)
{
    f->srv = tls_conn_free(f->srv);
    f->cli = tls_conn_free(f->cli);
    assert_int_equal(tls_conn_new_server(f->srv_ctx, &f->srv), 0);
    assert_int_equal(tls_conn_new_client(f->cli_ctx, HOST, true, NULL, NULL, &f->cli), 0);
}

static int
setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    if (f == NULL || test_pki_init(&f->pki, "sluice test CA") != 0 ||
        test_pki_issue(&f->pki, "mx", HOST, false, &f->cert) != 0)
        return -1;
    test_config(&f->cfg);
    test_config_set(&f->cfg, "cert_file", f->cert.cert_file);
    test_config_set(&f->cfg, "key_file", f->cert.key_file);
    test_config_set(&f->cfg, "ca_file", f->pki.ca_file);
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fixture *f = *state;
    tls_conn_free(f->srv);
    tls_conn_free(f->cli);
    tls_ctx_unref(f->srv_ctx);
    tls_ctx_unref(f->cli_ctx);
    conf_free(tls_conf_keys, &f->cfg);
    test_pki_fini(&f->pki);
    free(f);
    return 0;
}

static void
handshake_ok(struct fixture *f, size_t chunk)
{
    int rs, rc;
    test_handshake(f->srv, f->cli, chunk, &rs, &rc);
    if (rs != 0 || rc != 0)
        fail_msg("handshake: server %s (%s), client %s (%s)", tls_strerror(rs),
                 tls_conn_error_str(f->srv), tls_strerror(rc), tls_conn_error_str(f->cli));
}

static void
test_config_keys(void **state)
{
    (void)state;
    struct tls_config cfg;
    test_config(&cfg);
    assert_null(cfg.cert_file);
    assert_null(cfg.ca_file);
    assert_int_equal(cfg.min_protocol, 0);
    assert_int_equal(cfg.max_protocol, 1);
    assert_int_equal(cfg.session_cache_size, 1000);
    assert_int_equal(cfg.buffer_size, 16384);
    assert_false(tls_config_has_server(&cfg));
    test_config_set(&cfg, "cert_file", "/etc/sluice/cert.pem");
    test_config_set(&cfg, "min_protocol", "TLSv1.3");
    assert_true(tls_config_has_server(&cfg));
    assert_int_equal(cfg.min_protocol, 1);
    char err[256];
    assert_int_equal(conf_set(tls_conf_keys, &cfg, "min_protocol", "SSLv3", err, sizeof(err)),
                     -EINVAL);
    assert_int_equal(conf_set(tls_conf_keys, &cfg, "buffer_size", "1K", err, sizeof(err)), -EINVAL);
    conf_free(tls_conf_keys, &cfg);
    assert_null(cfg.cert_file);
}

static void
test_strerror_all(void **state)
{
    (void)state;
    static const int codes[] = {0,          TLS_WANT_IO, TLS_EPROTO, TLS_ENEGOTIATE, TLS_EVERIFY,
                                TLS_EALERT, TLS_ECLOSED, TLS_ESTATE, TLS_ECONFIG,    TLS_EINTERNAL};
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
        assert_string_not_equal(tls_strerror(codes[i]), "unknown TLS error");
        for (size_t j = 0; j < i; j++)
            assert_string_not_equal(tls_strerror(codes[i]), tls_strerror(codes[j]));
    }
    assert_string_equal(tls_strerror(-ENOMEM), "Cannot allocate memory");
    assert_string_equal(tls_strerror(-40000), "unknown TLS error");
}

static void
expect_ctx_error(const struct tls_config *cfg, bool server, int want, const char *needle)
{
    struct tls_ctx *ctx = (struct tls_ctx *)1;
    char err[512] = "";
    int rc = server ? tls_ctx_new_server(cfg, &ctx, err, sizeof(err))
                    : tls_ctx_new_client(cfg, &ctx, err, sizeof(err));
    assert_int_equal(rc, want);
    assert_null(ctx);
    if (strstr(err, needle) == NULL)
        fail_msg("message '%s' lacks '%s'", err, needle);
}

static void
test_ctx_errors(void **state)
{
    struct fixture *f = *state;
    struct tls_config cfg;
    test_config(&cfg);
    expect_ctx_error(&cfg, true, -EINVAL, "cert_file is not set");

    test_config_set(&cfg, "cert_file", "/nonexistent/cert.pem");
    expect_ctx_error(&cfg, true, TLS_ECONFIG, "cert_file /nonexistent/cert.pem: ");
    expect_ctx_error(&cfg, true, TLS_ECONFIG, "No such file or directory");

    /* A key that is not the certificate's. */
    struct test_cert other;
    assert_int_equal(test_pki_issue(&f->pki, "other", "other.test", false, &other), 0);
    test_config_set(&cfg, "cert_file", f->cert.cert_file);
    test_config_set(&cfg, "key_file", other.key_file);
    expect_ctx_error(&cfg, true, TLS_ECONFIG, "does not match");

    /* A certificate file given as the key. */
    test_config_set(&cfg, "key_file", f->cert.cert_file);
    expect_ctx_error(&cfg, true, TLS_ECONFIG, "key_file ");

    /* Unset key_file: the key is read from cert_file; here it is not. */
    free(cfg.key_file);
    cfg.key_file = NULL;
    expect_ctx_error(&cfg, true, TLS_ECONFIG, "key_file (unset, so cert_file)");

    test_config_set(&cfg, "key_file", f->cert.key_file);
    test_config_set(&cfg, "min_protocol", "TLSv1.3");
    test_config_set(&cfg, "max_protocol", "TLSv1.2");
    expect_ctx_error(&cfg, true, -EINVAL, "min_protocol TLSv1.3: newer than max_protocol");
    expect_ctx_error(&cfg, false, -EINVAL, "min_protocol TLSv1.3: newer than max_protocol");
    test_config_set(&cfg, "min_protocol", "TLSv1.2");
    test_config_set(&cfg, "ciphers", "NO-SUCH-CIPHER");
    expect_ctx_error(&cfg, true, TLS_ECONFIG, "ciphers NO-SUCH-CIPHER");
    expect_ctx_error(&cfg, false, TLS_ECONFIG, "ciphers NO-SUCH-CIPHER");
    /* Names that match, but nothing left under TLS 1.2 alone: every
     * handshake would fail (a client's before its ClientHello). */
    test_config_set(&cfg, "max_protocol", "TLSv1.2");
    test_config_set(&cfg, "ciphers", "PSK");
    expect_ctx_error(&cfg, true, TLS_ECONFIG, "ciphers PSK, ciphersuites (default): none usable");
    expect_ctx_error(&cfg, false, TLS_ECONFIG, "ciphers PSK, ciphersuites (default): none usable");
    test_config_set(&cfg, "ciphers", "@SECLEVEL=3:AES128-SHA");
    expect_ctx_error(&cfg, false, TLS_ECONFIG, "none usable");
    test_config_set(&cfg, "max_protocol", "TLSv1.3");
    free(cfg.ciphers);
    cfg.ciphers = NULL;
    test_config_set(&cfg, "ciphersuites", "TLS_NOPE");
    expect_ctx_error(&cfg, false, TLS_ECONFIG, "ciphersuites TLS_NOPE");
    free(cfg.ciphersuites);
    cfg.ciphersuites = NULL;

    test_config_set(&cfg, "ca_file", "/nonexistent/ca.pem");
    expect_ctx_error(&cfg, false, TLS_ECONFIG, "ca_file /nonexistent/ca.pem");
    free(cfg.ca_file);
    cfg.ca_file = NULL;
    test_config_set(&cfg, "ca_path", "/nonexistent/certs");
    expect_ctx_error(&cfg, false, TLS_ECONFIG, "ca_path /nonexistent/certs: No such file");
    test_config_set(&cfg, "ca_path", f->pki.ca_file);
    expect_ctx_error(&cfg, false, TLS_ECONFIG, "not a directory");
    test_config_set(&cfg, "ca_path", f->pki.dir);

    /* And the good ones: a client on the system store, a server whose
     * key follows its certificate in one file. */
    struct tls_ctx *ctx;
    char err[512];
    free(cfg.ca_path);
    cfg.ca_path = NULL;
    assert_int_equal(tls_ctx_new_client(&cfg, &ctx, err, sizeof(err)), 0);
    ctx = tls_ctx_unref(ctx);
    char both[400];
    snprintf(both, sizeof(both), "%s/both.pem", f->pki.dir);
    FILE *out = fopen(both, "w");
    assert_non_null(out);
    const char *parts[] = {f->cert.cert_file, f->cert.key_file};
    for (int i = 0; i < 2; i++) {
        FILE *in = fopen(parts[i], "r");
        assert_non_null(in);
        int ch;
        while ((ch = fgetc(in)) != EOF)
            fputc(ch, out);
        fclose(in);
    }
    fclose(out);
    test_config_set(&cfg, "cert_file", both);
    free(cfg.key_file);
    cfg.key_file = NULL;
    if (tls_ctx_new_server(&cfg, &ctx, err, sizeof(err)) != 0)
        fail_msg("combined PEM: %s", err);
    /* A client ctx cannot make server conns, nor the other way. */
    struct tls_conn *c = (struct tls_conn *)1;
    assert_int_equal(tls_conn_new_client(ctx, HOST, false, NULL, NULL, &c), -EINVAL);
    assert_null(c);
    ctx = tls_ctx_unref(ctx);
    conf_free(tls_conf_keys, &cfg);
}

static void
test_handshake_chunks(void **state)
{
    struct fixture *f = *state;
    make_ctxs(f);
    static const size_t chunks[] = {1, 2, 3, 7, 100, 1500, 16384, 1 << 20};
    for (size_t i = 0; i < sizeof(chunks) / sizeof(chunks[0]); i++) {
        make_conns(f);
        /* Nothing works before the handshake. */
        char buf[64];
        struct tls_info info;
        assert_int_equal(tls_conn_read(f->srv, buf, sizeof(buf)), TLS_ESTATE);
        assert_int_equal(tls_conn_write(f->cli, "x", 1), TLS_ESTATE);
        assert_int_equal(tls_conn_shutdown(f->cli), TLS_ESTATE);
        assert_int_equal(tls_conn_info(f->cli, &info), TLS_ESTATE);

        handshake_ok(f, chunks[i]);
        assert_int_equal(tls_conn_handshake(f->srv), 0);
        test_send(f->srv, f->cli, "220 mx.example.test ESMTP\r\n");
        test_send(f->cli, f->srv, "EHLO client.example.test\r\n");
        test_exchange(f->srv, f->cli, 20000, chunks[i] < 3000 ? chunks[i] : 3000, 16384,
                      (unsigned)i);

        assert_int_equal(tls_conn_info(f->cli, &info), 0);
        assert_string_equal(info.protocol, "TLSv1.3");
        assert_true(strlen(info.cipher) > 0);
        assert_true(info.cipher_bits >= 128);
        assert_false(info.resumed);
        assert_true(info.verified);
        assert_string_equal(info.verify_result, "ok");
        assert_non_null(strstr(info.peer_subject, "CN=" HOST));
        assert_non_null(strstr(info.peer_issuer, "CN=sluice test CA"));
        assert_int_equal(tls_conn_info(f->srv, &info), 0);
        assert_false(info.verified);
        assert_string_equal(info.verify_result, "no peer certificate");
        assert_string_equal(info.peer_subject, "");

        /* The client says goodbye; the server sees the end once. */
        assert_int_equal(tls_conn_shutdown(f->cli), 0);
        assert_int_equal(tls_conn_shutdown(f->cli), 0);
        assert_int_equal(tls_conn_write(f->cli, "x", 1), TLS_ESTATE);
        while (test_move(f->cli, f->srv, chunks[i]) > 0)
            assert_true(tls_conn_read(f->srv, buf, sizeof(buf)) == 0 ||
                        tls_conn_pending(f->cli) == 0);
        assert_int_equal(tls_conn_read(f->srv, buf, sizeof(buf)), TLS_ECLOSED);
        assert_int_equal(tls_conn_read(f->srv, buf, sizeof(buf)), TLS_ECLOSED);
        assert_string_equal(tls_conn_error_str(f->srv), "");
        /* The server answers with its own close_notify. */
        assert_int_equal(tls_conn_shutdown(f->srv), 0);
        while (test_move(f->srv, f->cli, chunks[i]) > 0)
            ;
        assert_int_equal(tls_conn_read(f->cli, buf, sizeof(buf)), TLS_ECLOSED);
    }
}

static void
test_large_transfer(void **state)
{
    struct fixture *f = *state;
    static const char *const sizes[] = {"4K", "16K", "64K"};
    for (unsigned i = 0; i < 3; i++) {
        test_config_set(&f->cfg, "buffer_size", sizes[i]);
        f->srv_ctx = tls_ctx_unref(f->srv_ctx);
        f->cli_ctx = tls_ctx_unref(f->cli_ctx);
        make_ctxs(f);
        make_conns(f);
        handshake_ok(f, 1000);
        size_t len = i == 1 ? 10u << 20 : 2u << 20;
        test_exchange(f->cli, f->srv, len, 40000, f->cfg.buffer_size, i + 7);
    }
}

static void
test_one_byte_data(void **state)
{
    struct fixture *f = *state;
    make_ctxs(f);
    make_conns(f);
    handshake_ok(f, 1);
    test_exchange(f->cli, f->srv, 50000, 1, f->cfg.buffer_size, 3);
}

/* A pointer from peek keeps its bytes while more is written behind them,
 * across partial consumes, until everything peeked has been consumed. */
static void
test_peek_stays(void **state)
{
    struct fixture *f = *state;
    test_config_set(&f->cfg, "buffer_size", "4K");
    make_ctxs(f);
    make_conns(f);
    handshake_ok(f, 65536);
    while (test_move(f->srv, f->cli, 65536) > 0)
        ;
    char buf[4096];
    assert_int_equal(tls_conn_read(f->cli, buf, sizeof(buf)), 0);

    static char data[100000];
    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (char)(i * 7);
    size_t off = 0, got = 0;
    ssize_t w = tls_conn_write(f->cli, data, 1000);
    assert_int_equal(w, 1000);
    off += 1000;
    size_t len;
    const unsigned char *p = tls_conn_peek(f->cli, &len);
    unsigned char copy[4096];
    assert_true(len > 1000 && len <= sizeof(copy));
    memcpy(copy, p, len);
    /* Fill the rest of the buffer: the lent bytes must not move. */
    while ((w = tls_conn_write(f->cli, data + off, sizeof(data) - off)) > 0)
        off += (size_t)w;
    assert_int_equal(w, 0);
    assert_memory_equal(p, copy, len);
    /* "Send" part of it, then the rest, from the same pointer. */
    assert_int_equal(tls_conn_feed(f->srv, p, 10), 10);
    assert_int_equal(tls_conn_consume(f->cli, 10), 0);
    while ((w = tls_conn_write(f->cli, data + off, sizeof(data) - off)) > 0)
        off += (size_t)w;
    assert_memory_equal(p + 10, copy + 10, len - 10);
    assert_int_equal(tls_conn_feed(f->srv, p + 10, len - 10), (ssize_t)(len - 10));
    assert_int_equal(tls_conn_consume(f->cli, len - 10), 0);
    assert_int_equal(tls_conn_consume(f->cli, tls_conn_pending(f->cli) + 1), -EINVAL);
    /* Now everything lent came back: the rest flows normally. */
    while (got < sizeof(data)) {
        if (off < sizeof(data)) {
            w = tls_conn_write(f->cli, data + off, sizeof(data) - off);
            if (w > 0)
                off += (size_t)w;
        }
        assert_true(tls_conn_pending(f->cli) <= 4096);
        test_move(f->cli, f->srv, 3000);
        ssize_t r;
        while ((r = tls_conn_read(f->srv, buf, sizeof(buf))) > 0) {
            assert_memory_equal(buf, data + got, (size_t)r);
            got += (size_t)r;
        }
        assert_int_equal(r, 0);
    }
    assert_int_equal(tls_conn_pending(f->cli), 0);
    assert_null(tls_conn_peek(f->cli, &len));
    assert_int_equal(len, 0);
}

/* A peer that sends and never reads cannot make us buffer more than the
 * bound: feed takes what fits and the rest waits at the socket. */
static void
test_input_bounded(void **state)
{
    struct fixture *f = *state;
    test_config_set(&f->cfg, "buffer_size", "4K");
    make_ctxs(f);
    make_conns(f);
    handshake_ok(f, 65536);
    static char data[200000];
    size_t off = 0, fed_total = 0;
    for (int i = 0; i < 1000; i++) {
        ssize_t w = tls_conn_write(f->cli, data + off, sizeof(data) - off);
        if (w > 0)
            off += (size_t)w;
        size_t moved = test_move(f->cli, f->srv, 65536);
        fed_total += moved;
        if (moved == 0 && w == 0)
            break;
    }
    /* Everything stops at 4K in each direction (plus what OpenSSL holds
     * in its one record buffer), and nothing failed. */
    assert_true(fed_total <= 4096 + 20000);
    assert_true(tls_conn_pending(f->cli) <= 4096);
    assert_int_equal(tls_conn_feed(f->srv, data, 100), 0);
    char buf[1024];
    assert_true(tls_conn_read(f->srv, buf, sizeof(buf)) > 0);
}

static void
test_garbage_handshake(void **state)
{
    struct fixture *f = *state;
    make_ctxs(f);

    /* An SMTP client that did not wait for "220 Ready to start TLS". */
    make_conns(f);
    const char *smtp = "EHLO client.example.test\r\nMAIL FROM:<a@example.test>\r\n";
    assert_int_equal(tls_conn_feed(f->srv, smtp, strlen(smtp)), (ssize_t)strlen(smtp));
    assert_int_equal(tls_conn_handshake(f->srv), TLS_EPROTO);
    assert_true(strlen(tls_conn_error_str(f->srv)) > 0);
    /* Sticky: every call gives the same answer, nothing crashes. */
    char buf[64];
    assert_int_equal(tls_conn_handshake(f->srv), TLS_EPROTO);
    assert_int_equal(tls_conn_read(f->srv, buf, sizeof(buf)), TLS_EPROTO);
    assert_int_equal(tls_conn_write(f->srv, "x", 1), TLS_EPROTO);
    assert_int_equal(tls_conn_feed(f->srv, "x", 1), TLS_EPROTO);
    assert_int_equal(tls_conn_shutdown(f->srv), TLS_EPROTO);

    /* Pseudo-random bytes, a megabyte of them, one small chunk at a time. */
    make_conns(f);
    uint32_t s = 12345;
    int rc = TLS_WANT_IO;
    size_t total = 0;
    unsigned char junk[100];
    while (rc == TLS_WANT_IO && total < (1u << 20)) {
        for (size_t i = 0; i < sizeof(junk); i++) {
            s ^= s << 13, s ^= s >> 17, s ^= s << 5;
            junk[i] = (unsigned char)s;
        }
        ssize_t n = tls_conn_feed(f->srv, junk, sizeof(junk));
        assert_true(n >= 0);
        total += (size_t)n;
        rc = tls_conn_handshake(f->srv);
    }
    assert_true(rc < 0);
    assert_true(total < 1000);

    /* A record header announcing 64K: refused at the header, before any
     * buffering of the body. */
    make_conns(f);
    static const unsigned char big[] = {0x16, 0x03, 0x01, 0xff, 0xff};
    assert_int_equal(tls_conn_feed(f->srv, big, sizeof(big)), (ssize_t)sizeof(big));
    assert_int_equal(tls_conn_handshake(f->srv), TLS_EPROTO);

    /* A server that answers STARTTLS with more SMTP. */
    make_conns(f);
    assert_int_equal(tls_conn_handshake(f->cli), TLS_WANT_IO);
    assert_true(tls_conn_pending(f->cli) > 0);
    const char *reply = "454 4.7.0 TLS not available due to local problem\r\n";
    tls_conn_feed(f->cli, reply, strlen(reply));
    assert_int_equal(tls_conn_handshake(f->cli), TLS_EPROTO);
}

/* An attacker on the path injects plaintext into the stream after
 * STARTTLS (or after the handshake): never taken as data. */
static void
test_injected_plaintext(void **state)
{
    struct fixture *f = *state;
    make_ctxs(f);
    char buf[256];

    make_conns(f);
    handshake_ok(f, 65536);
    test_send(f->cli, f->srv, "EHLO client.example.test\r\n");
    const char *evil = "RCPT TO:<victim@example.test>\r\n";
    tls_conn_feed(f->srv, evil, strlen(evil));
    assert_int_equal(tls_conn_read(f->srv, buf, sizeof(buf)), TLS_EPROTO);
    assert_int_equal(tls_conn_read(f->srv, buf, sizeof(buf)), TLS_EPROTO);

    /* Injected toward the client, in the middle of a genuine record. */
    make_conns(f);
    handshake_ok(f, 65536);
    test_send(f->srv, f->cli, "220 ready\r\n");
    assert_int_equal(tls_conn_write(f->srv, "250 OK\r\n", 8), 8);
    size_t len;
    const unsigned char *p = tls_conn_peek(f->srv, &len);
    assert_int_equal(tls_conn_feed(f->cli, p, len / 2), (ssize_t)(len / 2));
    tls_conn_feed(f->cli, "250 OK\r\n", 8);
    tls_conn_feed(f->cli, p + len / 2, len - len / 2);
    tls_conn_consume(f->srv, len);
    ssize_t r = tls_conn_read(f->cli, buf, sizeof(buf));
    assert_true(r < 0);
    assert_int_equal(r, TLS_EPROTO);

    /* A flipped bit in a record: the tag fails, no data comes out. */
    make_conns(f);
    handshake_ok(f, 65536);
    test_send(f->srv, f->cli, "220 ready\r\n");
    assert_int_equal(tls_conn_write(f->srv, "250 OK\r\n", 8), 8);
    p = tls_conn_peek(f->srv, &len);
    unsigned char copy[256];
    assert_true(len <= sizeof(copy));
    memcpy(copy, p, len);
    copy[len - 3] ^= 0x01;
    tls_conn_feed(f->cli, copy, len);
    tls_conn_consume(f->srv, len);
    assert_int_equal(tls_conn_read(f->cli, buf, sizeof(buf)), TLS_EPROTO);
    assert_true(strlen(tls_conn_error_str(f->cli)) > 0);
}

static void
test_no_common_cipher(void **state)
{
    struct fixture *f = *state;
    char err[512];
    test_config_set(&f->cfg, "min_protocol", "TLSv1.3");
    test_config_set(&f->cfg, "ciphersuites", "TLS_AES_128_GCM_SHA256");
    assert_int_equal(tls_ctx_new_server(&f->cfg, &f->srv_ctx, err, sizeof(err)), 0);
    test_config_set(&f->cfg, "ciphersuites", "TLS_CHACHA20_POLY1305_SHA256");
    assert_int_equal(tls_ctx_new_client(&f->cfg, &f->cli_ctx, err, sizeof(err)), 0);
    make_conns(f);
    int rs, rc;
    test_handshake(f->srv, f->cli, 65536, &rs, &rc);
    assert_int_equal(rs, TLS_ENEGOTIATE);
    assert_int_equal(rc, TLS_EALERT);
    assert_non_null(strstr(tls_conn_error_str(f->cli), "handshake failure"));
}

/* A reload drops the contexts; connections made from them carry on, and
 * new ones come from the new contexts. */
static void
test_ctx_reload(void **state)
{
    struct fixture *f = *state;
    make_ctxs(f);
    make_conns(f);
    struct tls_ctx *extra = tls_ctx_ref(f->srv_ctx);
    f->srv_ctx = tls_ctx_unref(f->srv_ctx);
    f->cli_ctx = tls_ctx_unref(f->cli_ctx);
    assert_null(tls_ctx_unref(NULL));
    /* The extra reference keeps one alive; conns need neither. */
    extra = tls_ctx_unref(extra);
    handshake_ok(f, 500);
    test_exchange(f->srv, f->cli, 100000, 5000, 16384, 11);
    make_ctxs(f);
    make_conns(f);
    handshake_ok(f, 500);
    assert_null(tls_conn_free(NULL));
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_keys),
        cmocka_unit_test(test_strerror_all),
        cmocka_unit_test_setup_teardown(test_ctx_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_handshake_chunks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_large_transfer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_one_byte_data, setup, teardown),
        cmocka_unit_test_setup_teardown(test_peek_stays, setup, teardown),
        cmocka_unit_test_setup_teardown(test_input_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_garbage_handshake, setup, teardown),
        cmocka_unit_test_setup_teardown(test_injected_plaintext, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_common_cipher, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ctx_reload, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
