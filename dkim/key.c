/*
 * key: DKIM private keys (PEM files) and the private-key operation.
 * RSA keys sign with RSASSA-PKCS1-v1_5 over SHA-256 (RFC 6376 3.3.1);
 * keys under 1024 bits are refused (RFC 8301 3.2: verifiers reject
 * them). Ed25519 keys sign the SHA-256 hash of the header data (RFC 8463
 * 3: PureEdDSA over the hash, not over the data).
 *
 * Setting up an OpenSSL 3 context (fetching the algorithm from the
 * provider) costs as much as an Ed25519 signature itself, so each key
 * keeps the contexts it has set up for the next signature (an Ed25519
 * one is initialised again, keeping its key, before it signs again).
 *
 * Threading: a loaded key is immutable but for its spare contexts, taken
 * and given back under its mutex; any number of threads sign at once,
 * each with a context of its own.
 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/bio.h>
#include <pthread.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dkim/dkim.h"
#include "dkim/dkim_int.h"

#define SPARE_CTX 8 /* kept per key: one per signing thread in practice */

struct dkim_key {
    EVP_PKEY *pkey; /* owned */
    EVP_MD *sha256; /* owned: fetched once, for the header hash */
    enum dkim_alg alg;
    unsigned bits;
    pthread_mutex_t lock;
    void *spare[SPARE_CTX]; /* owned: set-up EVP_PKEY_CTX (RSA) or EVP_MD_CTX (Ed25519) */
    unsigned nspare;
};

static void
ctx_free(const struct dkim_key *k, void *ctx)
{
    if (k->alg == DKIM_ALG_ED25519_SHA256)
        EVP_MD_CTX_free(ctx);
    else
        EVP_PKEY_CTX_free(ctx);
}

/* A context ready to sign: a spare one, or a new one. NULL on failure. */
static void *
ctx_take(struct dkim_key *k)
{
    pthread_mutex_lock(&k->lock);
    void *ctx = k->nspare > 0 ? k->spare[--k->nspare] : NULL;
    pthread_mutex_unlock(&k->lock);
    if (ctx != NULL && k->alg == DKIM_ALG_ED25519_SHA256) {
        /* EVP_DigestSign finalises its context: OpenSSL 3.2 and later
         * refuse a second call (openssl#23075). Initialising it again
         * with no key keeps its key and provider algorithm: no fetch. */
        if (EVP_DigestSignInit(ctx, NULL, NULL, NULL, NULL) == 1)
            return ctx;
        ERR_clear_error();
        EVP_MD_CTX_free(ctx); /* then one set up from scratch */
    } else if (ctx != NULL) {
        return ctx;
    }
    if (k->alg == DKIM_ALG_ED25519_SHA256) {
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        if (md != NULL && EVP_DigestSignInit(md, NULL, NULL, NULL, k->pkey) != 1)
            md = (EVP_MD_CTX_free(md), NULL);
        return md;
    }
    EVP_PKEY_CTX *pc = EVP_PKEY_CTX_new(k->pkey, NULL);
    if (pc != NULL && (EVP_PKEY_sign_init(pc) != 1 ||
                       EVP_PKEY_CTX_set_rsa_padding(pc, RSA_PKCS1_PADDING) != 1 ||
                       EVP_PKEY_CTX_set_signature_md(pc, k->sha256) != 1))
        pc = (EVP_PKEY_CTX_free(pc), NULL);
    return pc;
}

static void
ctx_give(struct dkim_key *k, void *ctx)
{
    pthread_mutex_lock(&k->lock);
    if (k->nspare < SPARE_CTX) {
        k->spare[k->nspare++] = ctx;
        ctx = NULL;
    }
    pthread_mutex_unlock(&k->lock);
    if (ctx != NULL)
        ctx_free(k, ctx);
}

const char *
dkim_alg_str(enum dkim_alg a)
{
    return a == DKIM_ALG_ED25519_SHA256 ? "ed25519-sha256" : "rsa-sha256";
}

int
dkim_key_load(const char *path, struct dkim_key **out, char *err, size_t errlen)
{
    *out = NULL;
    /* Not blocking in open: a FIFO (or a device) in the key's place would
     * hold the config load, and with it a reload on the main thread, for
     * ever. Only a regular file is read. */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "cannot read %s: %s", path, strerror(e));
        return -e;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        snprintf(err, errlen, "%s: not a regular file", path);
        return DKIM_EKEY;
    }
    FILE *fp = fdopen(fd, "r");
    if (fp == NULL) {
        int e = errno;
        close(fd);
        snprintf(err, errlen, "cannot read %s: %s", path, strerror(e));
        return -e;
    }
    ERR_clear_error();
    EVP_PKEY *pkey = PEM_read_PrivateKey(fp, NULL, NULL, (void *)"");
    fclose(fp);
    if (pkey == NULL) {
        unsigned long e = ERR_get_error();
        char why[256];
        ERR_error_string_n(e, why, sizeof(why));
        snprintf(err, errlen, "%s: not a PEM private key (%s)", path, e ? why : "no key found");
        ERR_clear_error();
        return DKIM_EKEY;
    }
    struct dkim_key *k = calloc(1, sizeof(*k));
    if (k == NULL) {
        EVP_PKEY_free(pkey);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    k->pkey = pkey;
    k->bits = (unsigned)EVP_PKEY_get_bits(pkey);
    pthread_mutex_init(&k->lock, NULL);
    if ((k->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL)) == NULL) {
        snprintf(err, errlen, "SHA-256 is not available from OpenSSL");
        dkim_key_free(k);
        return DKIM_EKEY;
    }
    switch (EVP_PKEY_get_base_id(pkey)) {
    case EVP_PKEY_RSA:
        k->alg = DKIM_ALG_RSA_SHA256;
        if (k->bits >= 1024)
            break;
        snprintf(err, errlen, "%s: an RSA key of %u bits (at least 1024: RFC 8301)", path,
                 k->bits);
        dkim_key_free(k);
        return DKIM_EKEYTYPE;
    case EVP_PKEY_ED25519:
        k->alg = DKIM_ALG_ED25519_SHA256;
        break;
    default:
        snprintf(err, errlen, "%s: a %s key; DKIM signs with RSA or Ed25519", path,
                 OBJ_nid2sn(EVP_PKEY_get_base_id(pkey)));
        dkim_key_free(k);
        return DKIM_EKEYTYPE;
    }
    *out = k;
    return 0;
}

struct dkim_key *
dkim_key_free(struct dkim_key *k)
{
    if (k != NULL) {
        for (unsigned i = 0; i < k->nspare; i++)
            ctx_free(k, k->spare[i]);
        pthread_mutex_destroy(&k->lock);
        EVP_MD_free(k->sha256);
        EVP_PKEY_free(k->pkey);
        free(k);
    }
    return NULL;
}

const EVP_MD *
dkim_key_md(const struct dkim_key *k)
{
    return k->sha256;
}

bool
dkim_key_same(const struct dkim_key *a, const struct dkim_key *b)
{
    return a == b ||
           (a != NULL && b != NULL && a->alg == b->alg && EVP_PKEY_eq(a->pkey, b->pkey) == 1);
}

enum dkim_alg
dkim_key_alg(const struct dkim_key *k)
{
    return k->alg;
}

unsigned
dkim_key_bits(const struct dkim_key *k)
{
    return k->bits;
}

long
dkim_key_txt(const struct dkim_key *k, char *out, size_t cap)
{
    unsigned char *der = NULL;
    size_t dlen = 0;
    if (k->alg == DKIM_ALG_ED25519_SHA256) {
        der = malloc(32);
        dlen = 32;
        if (der == NULL || EVP_PKEY_get_raw_public_key(k->pkey, der, &dlen) != 1) {
            free(der);
            return DKIM_EKEY;
        }
    } else {
        int n = i2d_PUBKEY(k->pkey, &der); /* SubjectPublicKeyInfo, as RFC 6376 3.6.1 */
        if (n <= 0)
            return DKIM_EKEY;
        dlen = (size_t)n;
    }
    char *b64 = malloc(4 * ((dlen + 2) / 3) + 1);
    long rc = DKIM_ETOOBIG;
    if (b64 != NULL) {
        dkim_b64(der, dlen, b64, 4 * ((dlen + 2) / 3) + 1);
        int n = snprintf(out, cap, "v=DKIM1; k=%s; p=%s",
                         k->alg == DKIM_ALG_ED25519_SHA256 ? "ed25519" : "rsa", b64);
        if (n >= 0 && (size_t)n < cap)
            rc = n;
    }
    free(b64);
    if (k->alg == DKIM_ALG_ED25519_SHA256)
        free(der);
    else
        OPENSSL_free(der);
    return rc;
}

int
dkim_key_sign(const struct dkim_key *key, const uint8_t hash[DKIM_HASH_LEN], char **sig,
              size_t *siglen)
{
    /* Only the spare contexts change: the key stays const to its users. */
    struct dkim_key *k = (struct dkim_key *)key;
    *sig = NULL;
    size_t len = (size_t)EVP_PKEY_get_size(k->pkey);
    unsigned char *s = malloc(len ? len : 1);
    if (s == NULL)
        return -ENOMEM;
    void *ctx = ctx_take(k);
    int ok = 0;
    if (ctx != NULL && k->alg == DKIM_ALG_ED25519_SHA256)
        ok = EVP_DigestSign(ctx, s, &len, hash, DKIM_HASH_LEN) == 1;
    else if (ctx != NULL)
        ok = EVP_PKEY_sign(ctx, s, &len, hash, DKIM_HASH_LEN) == 1;
    if (!ok) {
        if (ctx != NULL)
            ctx_free(k, ctx); /* its state is unknown now */
        ERR_clear_error();
        free(s);
        return DKIM_ESIGN;
    }
    ctx_give(k, ctx);
    *sig = (char *)s;
    *siglen = len;
    return 0;
}
