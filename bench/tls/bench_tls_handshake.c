/*
 * bench_tls_handshake: what authenticating an MX host costs, per full
 * TLS handshake, in the same run:
 *
 *   - opportunistic: no check (the ceiling: what any TLS costs)
 *   - PKIX verify:   chain to a trusted CA and host name (tls = verify)
 *   - DANE-EE 3 1 1: the server's key matched against a TLSA digest
 *   - DANE-TA 2 0 1: the CA the server sends matched, chain and name checked
 *
 * Client and server are tls/ conns joined in memory (no sockets), both on
 * this thread, without session resumption: each figure is a whole
 * handshake, both sides' CPU. Certificates (ECDSA P-256, a CA and a leaf
 * for mx.example.test) are made at start with the openssl command in a
 * temporary directory. Each figure is the best of 5 rounds, interleaved.
 * Prints figures, never judges them.
 *
 * Usage: bench_tls_handshake [seconds per figure]   (default 0.5)
 */
#include <openssl/evp.h>
#include <stdarg.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/conf.h"
#include "tls/tls.h"

#define ROUNDS 5

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

static double
now_s(void)
{
    return (double)clock_mono_ns() / 1e9;
}

static char dir[64];

static void
sh(const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    if (system(cmd) != 0) {
        fprintf(stderr, "failed: %s\n", cmd);
        exit(1);
    }
}

static void
digest(const char *pem, int selector, uint8_t out[32])
{
    FILE *fp = fopen(pem, "r");
    X509 *x = fp ? PEM_read_X509(fp, NULL, NULL, NULL) : NULL;
    if (fp)
        fclose(fp);
    if (x == NULL)
        exit(1);
    unsigned char *der = NULL;
    int len = selector == 0 ? i2d_X509(x, &der) : i2d_X509_PUBKEY(X509_get_X509_PUBKEY(x), &der);
    unsigned mdlen = 32;
    EVP_Digest(der, (size_t)len, out, &mdlen, EVP_sha256(), NULL);
    OPENSSL_free(der);
    X509_free(x);
}

static struct tls_ctx *
ctx_make(bool server, const char *cert, const char *key, const char *ca)
{
    struct tls_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    char err[512];
    if (conf_defaults(tls_conf_keys, &cfg, err, sizeof(err)) != 0)
        exit(1);
    if ((cert != NULL && (conf_set(tls_conf_keys, &cfg, "cert_file", cert, err, sizeof(err)) != 0 ||
                          conf_set(tls_conf_keys, &cfg, "key_file", key, err, sizeof(err)) != 0)) ||
        (ca != NULL && conf_set(tls_conf_keys, &cfg, "ca_file", ca, err, sizeof(err)) != 0)) {
        fprintf(stderr, "config: %s\n", err);
        exit(1);
    }
    struct tls_ctx *ctx;
    int rc = server ? tls_ctx_new_server(&cfg, &ctx, err, sizeof(err))
                    : tls_ctx_new_client(&cfg, &ctx, err, sizeof(err));
    conf_free(tls_conf_keys, &cfg);
    if (rc != 0) {
        fprintf(stderr, "ctx: %s\n", err);
        exit(1);
    }
    return ctx;
}

static void
move(struct tls_conn *from, struct tls_conn *to)
{
    size_t len;
    const void *p;
    while ((p = tls_conn_peek(from, &len)) != NULL && len > 0) {
        ssize_t n = tls_conn_feed(to, p, len);
        if (n <= 0)
            return;
        tls_conn_consume(from, (size_t)n);
    }
}

enum mode { OPPORTUNISTIC, PKIX, DANE_EE, DANE_TA, NMODES };
static const char *const names[NMODES] = {"opportunistic (no check)", "PKIX verify (CA + name)",
                                          "DANE-EE 3 1 1", "DANE-TA 2 0 1 (chain + name)"};

struct setup {
    struct tls_ctx *cli, *srv_leaf, *srv_chain, *srv_self;
    struct tls_tlsa ee, ta;
};

/* One full handshake; returns 0 when both sides completed and the client
 * authenticated the server where the mode asks it. */
static int
handshake(struct setup *s, enum mode m)
{
    struct tls_ctx *srv_ctx = m == DANE_EE   ? s->srv_self
                              : m == DANE_TA ? s->srv_chain
                                             : s->srv_leaf;
    struct tls_conn *srv, *cli;
    int rc = tls_conn_new_server(srv_ctx, &srv);
    if (rc != 0)
        return rc;
    if (m == DANE_EE || m == DANE_TA)
        rc = tls_conn_new_client_dane(s->cli, "mx.example.test", NULL,
                                      m == DANE_EE ? &s->ee : &s->ta, 1, NULL, NULL, &cli);
    else
        rc = tls_conn_new_client(s->cli, "mx.example.test", m == PKIX, NULL, NULL, &cli);
    if (rc != 0) {
        tls_conn_free(srv);
        return rc;
    }
    int crc = TLS_WANT_IO, src = TLS_WANT_IO;
    for (int i = 0; i < 20 && (crc != 0 || src != 0); i++) {
        crc = tls_conn_handshake(cli);
        move(cli, srv);
        src = tls_conn_handshake(srv);
        move(srv, cli);
        if (crc < 0 || src < 0)
            break;
    }
    struct tls_info info;
    bool ok = crc == 0 && src == 0 && tls_conn_info(cli, &info) == 0 &&
              (m == OPPORTUNISTIC || info.verified);
    tls_conn_free(cli);
    tls_conn_free(srv);
    return ok ? 0 : -1;
}

int
main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 0.5;
    snprintf(dir, sizeof(dir), "/tmp/bench-tls-XXXXXX");
    if (mkdtemp(dir) == NULL)
        return 1;
    const char *ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    sh("cd %s && openssl req -x509 %s -days 2 -subj /CN=bench-CA -addext "
       "basicConstraints=critical,CA:TRUE -keyout ca.key -out ca.pem 2>/dev/null",
       dir, ec);
    sh("cd %s && openssl req %s -subj /CN=mx.example.test -keyout leaf.key -out leaf.csr "
       "2>/dev/null && printf 'subjectAltName=DNS:mx.example.test\\n' > ext && openssl x509 -req "
       "-in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out leaf.pem "
       "2>/dev/null && cat leaf.pem ca.pem > chain.pem",
       dir, ec);
    sh("cd %s && openssl req -x509 %s -days 2 -subj /CN=mx.example.test -keyout self.key -out "
       "self.pem 2>/dev/null",
       dir, ec);
    char p1[128], p2[128], p3[128];
    struct setup s;
    snprintf(p1, sizeof(p1), "%s/ca.pem", dir);
    s.cli = ctx_make(false, NULL, NULL, p1);
    snprintf(p1, sizeof(p1), "%s/leaf.pem", dir);
    snprintf(p2, sizeof(p2), "%s/leaf.key", dir);
    s.srv_leaf = ctx_make(true, p1, p2, NULL);
    snprintf(p3, sizeof(p3), "%s/chain.pem", dir);
    s.srv_chain = ctx_make(true, p3, p2, NULL);
    snprintf(p1, sizeof(p1), "%s/self.pem", dir);
    snprintf(p2, sizeof(p2), "%s/self.key", dir);
    s.srv_self = ctx_make(true, p1, p2, NULL);
    static uint8_t ee[32], ta[32];
    digest(p1, 1, ee);
    snprintf(p1, sizeof(p1), "%s/ca.pem", dir);
    digest(p1, 0, ta);
    s.ee = (struct tls_tlsa){3, 1, 1, 32, ee};
    s.ta = (struct tls_tlsa){2, 0, 1, 32, ta};

    for (int m = 0; m < NMODES; m++)
        if (handshake(&s, (enum mode)m) != 0) {
            fprintf(stderr, "%s: handshake failed\n", names[m]);
            return 1;
        }
    double best[NMODES] = {0};
    for (int r = 0; r < ROUNDS; r++) {
        for (int m = 0; m < NMODES; m++) {
            unsigned n = 0;
            double t0 = now_s(), t;
            do {
                if (handshake(&s, (enum mode)m) != 0)
                    return 1;
                n++;
                t = now_s();
            } while (t - t0 < secs);
            double rate = n / (t - t0);
            if (rate > best[m])
                best[m] = rate;
        }
    }
    printf("bench_tls_handshake: full handshakes (client and server in one thread, in memory, "
           "ECDSA P-256, TLS 1.3, no resumption), best of %d x %.1f s\n",
           ROUNDS, secs);
    for (int m = 0; m < NMODES; m++)
        printf("  %-30s %8.0f handshakes/s  %7.1f us each  %5.1f%% of the ceiling\n", names[m],
               best[m], 1e6 / best[m], 100.0 * best[m] / best[OPPORTUNISTIC]);
    printf("  ceiling: opportunistic TLS, the same handshake without any check\n");
    printf("  build: %s\n", BENCH_BUILD);
    tls_ctx_unref(s.cli);
    tls_ctx_unref(s.srv_leaf);
    tls_ctx_unref(s.srv_chain);
    tls_ctx_unref(s.srv_self);
    sh("rm -rf %s", dir);
    return 0;
}
