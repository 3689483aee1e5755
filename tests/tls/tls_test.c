/*
 * tls_test: the throwaway PKI and the in-memory pump shared by the tls/
 * tests. Certificates are EC P-256, valid from an hour ago for a day, made
 * with the OpenSSL API so the tests need no openssl binary.
 *
 * Threading: single-threaded test code.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "tests/tls/tls_test.h"

static int
pki_error(const char *what)
{
    char buf[256] = "";
    ERR_error_string_n(ERR_get_error(), buf, sizeof(buf));
    fprintf(stderr, "test_pki: %s: %s\n", what, buf);
    ERR_clear_error();
    return -1;
}

static int
add_ext(X509 *issuer, X509 *cert, int nid, const char *value)
{
    X509V3_CTX v3;
    X509V3_set_ctx(&v3, issuer, cert, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    if (ext == NULL)
        return -1;
    int ok = X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
    return ok == 1 ? 0 : -1;
}

/* A new certificate for key, named cn, signed by issuer_key (issuer NULL:
 * self-signed). */
static X509 *
make_cert(struct test_pki *pki, EVP_PKEY *key, const char *cn, X509 *issuer, EVP_PKEY *issuer_key,
          bool ca, const char *san)
{
    X509 *x = X509_new();
    if (x == NULL)
        return NULL;
    X509_NAME *name = X509_get_subject_name(x);
    bool ok = X509_set_version(x, X509_VERSION_3) == 1 &&
              ASN1_INTEGER_set(X509_get_serialNumber(x), (long)++pki->serial) == 1 &&
              X509_gmtime_adj(X509_getm_notBefore(x), -3600) != NULL &&
              X509_gmtime_adj(X509_getm_notAfter(x), 86400) != NULL &&
              X509_set_pubkey(x, key) == 1 &&
              X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                                         (const unsigned char *)"sluice tests", -1, -1, 0) == 1 &&
              X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1,
                                         -1, 0) == 1 &&
              X509_set_issuer_name(x, issuer != NULL ? X509_get_subject_name(issuer) : name) == 1;
    X509 *signer = issuer != NULL ? issuer : x;
    if (ok && ca)
        ok = add_ext(signer, x, NID_basic_constraints, "critical,CA:TRUE") == 0 &&
             add_ext(signer, x, NID_key_usage, "critical,keyCertSign,cRLSign") == 0 &&
             add_ext(signer, x, NID_subject_key_identifier, "hash") == 0;
    if (ok && !ca)
        ok = add_ext(signer, x, NID_basic_constraints, "CA:FALSE") == 0 &&
             add_ext(signer, x, NID_ext_key_usage, "serverAuth,clientAuth") == 0 &&
             add_ext(signer, x, NID_subject_alt_name, san) == 0;
    if (ok)
        ok = X509_sign(x, issuer_key != NULL ? issuer_key : key, EVP_sha256()) > 0;
    if (!ok) {
        X509_free(x);
        return NULL;
    }
    return x;
}

static int
write_pem(const char *path, X509 *cert, EVP_PKEY *key)
{
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return -1;
    int ok = cert != NULL ? PEM_write_X509(f, cert)
                          : PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL);
    return fclose(f) == 0 && ok == 1 ? 0 : -1;
}

int
test_pki_init(struct test_pki *pki, const char *cn)
{
    memset(pki, 0, sizeof(*pki));
    const char *tmp = getenv("TMPDIR");
    snprintf(pki->dir, sizeof(pki->dir), "%s/sluice-tls-XXXXXX", tmp != NULL ? tmp : "/tmp");
    if (mkdtemp(pki->dir) == NULL) {
        fprintf(stderr, "test_pki: mkdtemp %s: %s\n", pki->dir, strerror(errno));
        return -1;
    }
    EVP_PKEY *key = EVP_EC_gen("P-256");
    if (key == NULL)
        return pki_error("CA key");
    X509 *cert = make_cert(pki, key, cn, NULL, NULL, true, NULL);
    pki->ca_key = key;
    pki->ca_cert = cert;
    if (cert == NULL)
        return pki_error("CA certificate");
    snprintf(pki->ca_file, sizeof(pki->ca_file), "%s/ca.pem", pki->dir);
    return write_pem(pki->ca_file, cert, NULL);
}

int
test_pki_issue(struct test_pki *pki, const char *stem, const char *names, bool self_signed,
               struct test_cert *out)
{
    char cn[256], san[1024];
    size_t cnlen = strcspn(names, ",");
    snprintf(cn, sizeof(cn), "%.*s", (int)cnlen, names);
    /* "mx.test,127.0.0.1" -> "DNS:mx.test,IP:127.0.0.1" */
    size_t off = 0;
    for (const char *p = names; *p != '\0';) {
        size_t n = strcspn(p, ",");
        bool ip = strspn(p, "0123456789.:") == n;
        off += (size_t)snprintf(san + off, sizeof(san) - off, "%s%s:%.*s", off ? "," : "",
                                ip ? "IP" : "DNS", (int)n, p);
        p += n + (p[n] == ',');
    }
    EVP_PKEY *key = EVP_EC_gen("P-256");
    if (key == NULL)
        return pki_error("key");
    X509 *cert = self_signed ? make_cert(pki, key, cn, NULL, NULL, false, san)
                             : make_cert(pki, key, cn, pki->ca_cert, pki->ca_key, false, san);
    if (cert == NULL) {
        EVP_PKEY_free(key);
        return pki_error("certificate");
    }
    snprintf(out->cert_file, sizeof(out->cert_file), "%s/%s.pem", pki->dir, stem);
    snprintf(out->key_file, sizeof(out->key_file), "%s/%s.key", pki->dir, stem);
    int rc = write_pem(out->cert_file, cert, NULL) == 0 && write_pem(out->key_file, NULL, key) == 0
                 ? 0
                 : -1;
    X509_free(cert);
    EVP_PKEY_free(key);
    return rc;
}

static int
rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void
test_pki_fini(struct test_pki *pki)
{
    if (pki->dir[0] != '\0')
        nftw(pki->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    X509_free(pki->ca_cert);
    EVP_PKEY_free(pki->ca_key);
    memset(pki, 0, sizeof(*pki));
}

void
test_config(struct tls_config *cfg)
{
    char err[256];
    memset(cfg, 0, sizeof(*cfg));
    if (conf_defaults(tls_conf_keys, cfg, err, sizeof(err)) != 0)
        fail_msg("conf_defaults: %s", err);
}

void
test_config_set(struct tls_config *cfg, const char *key, const char *value)
{
    char err[256];
    if (conf_set(tls_conf_keys, cfg, key, value, err, sizeof(err)) != 0)
        fail_msg("conf_set %s=%s: %s", key, value, err);
}

size_t
test_move(struct tls_conn *from, struct tls_conn *to, size_t chunk)
{
    size_t len;
    const unsigned char *p = tls_conn_peek(from, &len);
    if (len == 0)
        return 0;
    assert_non_null(p);
    size_t n = len < chunk ? len : chunk;
    ssize_t fed = tls_conn_feed(to, p, n);
    if (fed <= 0)
        return 0; /* full, or failed: the caller sees which */
    assert_int_equal(tls_conn_consume(from, (size_t)fed), 0);
    return (size_t)fed;
}

void
test_handshake(struct tls_conn *srv, struct tls_conn *cli, size_t chunk, int *srv_rc, int *cli_rc)
{
    int rs = TLS_WANT_IO, rc = TLS_WANT_IO;
    for (long i = 0; i < 50L * 1000 * 1000; i++) {
        if (rs == TLS_WANT_IO)
            rs = tls_conn_handshake(srv);
        if (rc == TLS_WANT_IO)
            rc = tls_conn_handshake(cli);
        size_t moved = test_move(cli, srv, chunk) + test_move(srv, cli, chunk);
        if (rs != TLS_WANT_IO && rc != TLS_WANT_IO)
            break;
        if (moved == 0 && (rs < 0 || rc < 0))
            break; /* one failed and the other has nothing more to hear */
        if (moved == 0 && tls_conn_pending(cli) == 0 && tls_conn_pending(srv) == 0) {
            /* Both wait for bytes that will never come: one more turn to
             * take what the last move brought, then give up. */
            if (rs == TLS_WANT_IO)
                rs = tls_conn_handshake(srv);
            if (rc == TLS_WANT_IO)
                rc = tls_conn_handshake(cli);
            if (tls_conn_pending(cli) == 0 && tls_conn_pending(srv) == 0)
                break;
        }
    }
    *srv_rc = rs;
    *cli_rc = rc;
}

static uint32_t
rng(uint32_t *s)
{
    /* xorshift32: reproducible chunk sizes from a seed. */
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

static unsigned char
pattern(size_t off, unsigned salt)
{
    return (unsigned char)(((off * 2654435761u) >> 11) ^ (off >> 16) ^ salt);
}

struct dir {
    struct tls_conn *from, *to;
    size_t sent, got;
    unsigned salt;
};

void
test_exchange(struct tls_conn *a, struct tls_conn *b, size_t len, size_t max_chunk,
              size_t buffer_size, unsigned seed)
{
    struct dir dirs[2] = {{a, b, 0, 0, 0x5a}, {b, a, 0, 0, 0xc3}};
    uint32_t s = seed * 2654435761u + 1;
    unsigned char *tmp = malloc(max_chunk);
    assert_non_null(tmp);
    long idle = 0;
    while (dirs[0].got < len || dirs[1].got < len) {
        size_t progress = 0;
        for (int i = 0; i < 2; i++) {
            struct dir *d = &dirs[i];
            if (d->sent < len) {
                size_t n = 1 + rng(&s) % max_chunk;
                if (n > len - d->sent)
                    n = len - d->sent;
                for (size_t k = 0; k < n; k++)
                    tmp[k] = pattern(d->sent + k, d->salt);
                ssize_t w = tls_conn_write(d->from, tmp, n);
                if (w < 0)
                    fail_msg("write: %s", tls_strerror((int)w));
                d->sent += (size_t)w;
                progress += (size_t)w;
            }
            assert_true(tls_conn_pending(d->from) <= buffer_size);
            progress += test_move(d->from, d->to, 1 + rng(&s) % max_chunk);
            for (;;) {
                size_t cap = 1 + rng(&s) % max_chunk;
                ssize_t r = tls_conn_read(d->to, tmp, cap);
                if (r == 0)
                    break;
                if (r < 0)
                    fail_msg("read: %s (%s)", tls_strerror((int)r), tls_conn_error_str(d->to));
                for (ssize_t k = 0; k < r; k++)
                    if (tmp[k] != pattern(d->got + (size_t)k, d->salt))
                        fail_msg("byte %zu differs", d->got + (size_t)k);
                d->got += (size_t)r;
                progress += (size_t)r;
            }
            assert_true(tls_conn_pending(d->to) <= buffer_size);
        }
        if (progress == 0 && ++idle > 1000)
            fail_msg("stalled: sent %zu/%zu got %zu/%zu", dirs[0].sent, dirs[1].sent, dirs[0].got,
                     dirs[1].got);
        if (progress != 0)
            idle = 0;
    }
    free(tmp);
}

void
test_send(struct tls_conn *from, struct tls_conn *to, const char *msg)
{
    size_t len = strlen(msg), off = 0, got = 0;
    char buf[4096];
    assert_true(len < sizeof(buf));
    for (int i = 0; i < 100000 && got < len; i++) {
        if (off < len) {
            ssize_t w = tls_conn_write(from, msg + off, len - off);
            if (w < 0)
                fail_msg("write: %s", tls_strerror((int)w));
            off += (size_t)w;
        }
        test_move(from, to, 65536);
        test_move(to, from, 65536);
        ssize_t r = tls_conn_read(to, buf + got, sizeof(buf) - got);
        if (r < 0)
            fail_msg("read: %s (%s)", tls_strerror((int)r), tls_conn_error_str(to));
        got += (size_t)r;
        /* The sender reads too: that is where a TLS 1.3 client takes the
         * server's session tickets. */
        char scratch[64];
        ssize_t r2 = tls_conn_read(from, scratch, sizeof(scratch));
        if (r2 < 0)
            fail_msg("read: %s (%s)", tls_strerror((int)r2), tls_conn_error_str(from));
        assert_int_equal(r2, 0);
    }
    assert_int_equal(got, len);
    assert_memory_equal(buf, msg, len);
}
