/*
 * bench_dkim: what DKIM signing costs, beside its ceilings.
 *
 *   - per key (RSA-2048, Ed25519) and message (2 KB, 100 KB): whole
 *     messages signed per second on one thread, as sluice does it: the
 *     body hash fed in 16 KB pieces (dkim_body_feed), then dkim_sign
 *     (header canonicalization and hash, the private-key operation, the
 *     field); beside it the private-key operation alone on a 32-octet
 *     hash, which is what `openssl speed rsa2048 ed25519` measures;
 *   - the body hash alone in MB/s (relaxed, simple) beside SHA-256 of the
 *     same octets (EVP_Digest): the ceiling of hashing as the body arrives.
 *
 * Keys are generated at start. Each figure is the best of 5 short runs,
 * interleaved with the others. Prints figures, never judges them.
 *
 * Usage: bench_dkim [seconds per figure]   (default 1)
 */
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "dkim/dkim.h"

#define ROUNDS 5

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

static double
now_s(void)
{
    return (double)clock_mono_ns() / 1e9;
}

static char *
make_msg(size_t body, size_t *len)
{
    const char *hdr = "From: Newsletter <news@example.com>\r\n"
                      "To: someone@example.org\r\n"
                      "Subject: Our December offers, folded over\r\n two lines\r\n"
                      "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
                      "Message-ID: <20261201100000.12345@example.com>\r\n"
                      "MIME-Version: 1.0\r\n"
                      "Content-Type: text/plain; charset=utf-8\r\n"
                      "List-Unsubscribe: <https://example.com/u/12345>\r\n"
                      "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\n";
    size_t hl = strlen(hdr);
    char *m = malloc(hl + body + 80);
    memcpy(m, hdr, hl);
    size_t o = hl;
    while (o < hl + body) {
        o += (size_t)sprintf(m + o, "Line %06zu of the body, quoted-printable-ish text =\r\n",
                             o);
    }
    *len = o;
    return m;
}

static char tmpkey[64];

static struct dkim_key *
make_key(const char *alg, int bits, EVP_PKEY **raw)
{
    EVP_PKEY *pk = bits ? EVP_PKEY_Q_keygen(NULL, NULL, alg, (size_t)bits)
                        : EVP_PKEY_Q_keygen(NULL, NULL, alg);
    snprintf(tmpkey, sizeof(tmpkey), "/tmp/bench_dkim.XXXXXX");
    int fd = mkstemp(tmpkey);
    FILE *f = fdopen(fd, "w");
    PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL);
    fclose(f);
    struct dkim_key *k;
    char err[256];
    if (dkim_key_load(tmpkey, &k, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    unlink(tmpkey);
    *raw = pk;
    return k;
}

/* The private-key operation alone on a context set up once, as openssl
 * speed does it. */
static double
raw_sign_rate(EVP_PKEY *pk, bool rsa, double secs)
{
    unsigned char h[32] = {1}, sig[1024];
    unsigned long n = 0;
    EVP_PKEY_CTX *c = NULL;
    EVP_MD_CTX *m = NULL;
    if (rsa) {
        c = EVP_PKEY_CTX_new(pk, NULL);
        EVP_PKEY_sign_init(c);
        EVP_PKEY_CTX_set_rsa_padding(c, RSA_PKCS1_PADDING);
        EVP_PKEY_CTX_set_signature_md(c, EVP_sha256());
    } else {
        m = EVP_MD_CTX_new();
        EVP_DigestSignInit(m, NULL, NULL, NULL, pk);
    }
    double t0 = now_s(), t;
    do {
        for (int i = 0; i < 20; i++) {
            size_t sl = sizeof(sig);
            if (rsa)
                EVP_PKEY_sign(c, sig, &sl, h, 32);
            else
                EVP_DigestSign(m, sig, &sl, h, 32);
            n++;
        }
        t = now_s() - t0;
    } while (t < secs);
    EVP_PKEY_CTX_free(c);
    EVP_MD_CTX_free(m);
    return (double)n / t;
}

static const char *const headers[] = {"from", "to", "subject", "date", "message-id",
                                      "mime-version", "content-type", "list-unsubscribe",
                                      "list-unsubscribe-post"};
static const char *const over[] = {"from", "subject"};

/* Whole messages: body hash + header hash + key operation + the field. */
static double
message_rate(struct dkim_key *k, const char *m, size_t len, double secs)
{
    struct dkim_body *b = dkim_body_new(1u << DKIM_CANON_RELAXED);
    const char *sep = strstr(m, "\r\n\r\n");
    size_t hl = (size_t)(sep - m) + 2;
    struct dkim_sig_params p = {"example.com", "s1", k, DKIM_CANON_RELAXED, DKIM_CANON_RELAXED,
                                headers, 9, over, 2, 1764583200, 0};
    char out[DKIM_SIG_MAX];
    unsigned long n = 0;
    double t0 = now_s(), t;
    do {
        for (int i = 0; i < 10; i++) {
            dkim_body_reset(b);
            for (size_t off = 0; off < len; off += 16384)
                dkim_body_feed(b, m + off, len - off < 16384 ? len - off : 16384);
            uint8_t bh[32];
            dkim_body_final(b, DKIM_CANON_RELAXED, bh);
            size_t used = 0;
            if (dkim_sign(&p, m, hl, bh, out, sizeof(out), &used) < 0) {
                fprintf(stderr, "sign failed\n");
                exit(1);
            }
            n++;
        }
        t = now_s() - t0;
    } while (t < secs);
    dkim_body_free(b);
    return (double)n / t;
}

static double
hash_rate(const char *m, size_t len, int canon, double secs)
{
    struct dkim_body *b = canon >= 0 ? dkim_body_new(1u << canon) : NULL;
    unsigned long n = 0;
    double t0 = now_s(), t;
    uint8_t h[32];
    do {
        for (int i = 0; i < 20; i++) {
            if (b != NULL) {
                dkim_body_reset(b);
                for (size_t off = 0; off < len; off += 16384)
                    dkim_body_feed(b, m + off, len - off < 16384 ? len - off : 16384);
                dkim_body_final(b, (enum dkim_canon)canon, h);
            } else {
                unsigned hl;
                EVP_Digest(m, len, h, &hl, EVP_sha256(), NULL);
            }
            n++;
        }
        t = now_s() - t0;
    } while (t < secs);
    dkim_body_free(b);
    return (double)n * (double)len / t / 1e6;
}

int
main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 1.0;
    double load[3] = {0};
    if (getloadavg(load, 3) < 0)
        load[0] = -1;
    printf("bench_dkim: build %s; %s; load average %.2f\n", BENCH_BUILD,
           OpenSSL_version(OPENSSL_VERSION), load[0]);
    size_t l2, l100;
    char *m2 = make_msg(2048, &l2), *m100 = make_msg(100 * 1024, &l100);
    struct {
        const char *name, *alg;
        int bits;
    } keys[] = {{"rsa-2048", "RSA", 2048}, {"ed25519", "ED25519", 0}};
    printf("%-9s %-8s %14s %14s %8s\n", "key", "message", "signed msg/s", "key op/s", "share");
    for (int i = 0; i < 2; i++) {
        EVP_PKEY *raw;
        struct dkim_key *k = make_key(keys[i].alg, keys[i].bits, &raw);
        /* Interleaved, best of ROUNDS each: the machine's load moves every
         * figure, and a ratio is only fair between runs side by side. */
        double ceiling = 0, r2 = 0, r100 = 0;
        for (int r = 0; r < ROUNDS; r++) {
            double c = raw_sign_rate(raw, keys[i].bits != 0, secs / ROUNDS);
            double a2 = message_rate(k, m2, l2, secs / ROUNDS);
            double a100 = message_rate(k, m100, l100, secs / ROUNDS);
            ceiling = c > ceiling ? c : ceiling;
            r2 = a2 > r2 ? a2 : r2;
            r100 = a100 > r100 ? a100 : r100;
        }
        printf("%-9s %-8s %14.0f %14.0f %7.0f%%\n", keys[i].name, "2 KB", r2, ceiling,
               100 * r2 / ceiling);
        printf("%-9s %-8s %14.0f %14.0f %7.0f%%\n", keys[i].name, "100 KB", r100, ceiling,
               100 * r100 / ceiling);
        dkim_key_free(k);
        EVP_PKEY_free(raw);
    }
    double hr = 0, hs = 0, hsha = 0;
    for (int r = 0; r < ROUNDS; r++) {
        double a = hash_rate(m100, l100, DKIM_CANON_RELAXED, secs / ROUNDS);
        double b = hash_rate(m100, l100, DKIM_CANON_SIMPLE, secs / ROUNDS);
        double c = hash_rate(m100, l100, -1, secs / ROUNDS);
        hr = a > hr ? a : hr;
        hs = b > hs ? b : hs;
        hsha = c > hsha ? c : hsha;
    }
    printf("body hash of 100 KB: relaxed %.0f MB/s, simple %.0f MB/s; SHA-256 alone %.0f MB/s\n",
           hr, hs, hsha);
    free(m2);
    free(m100);
    return 0;
}
