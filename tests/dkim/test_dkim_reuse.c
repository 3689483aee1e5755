/*
 * test_dkim_reuse: a key signs many times with the contexts it keeps
 * (dkim/key.c) under OpenSSL's rule for one-shot signing contexts: since
 * OpenSSL 3.2, EVP_DigestSign finalises its EVP_MD_CTX and refuses a
 * second call until EVP_DigestSignInit runs again (openssl#23075). Older
 * versions (3.0, 3.1) let it pass, so the rule is enforced here around
 * the real functions (the link wraps EVP_DigestSign, EVP_DigestSignInit
 * and EVP_MD_CTX_free; see CMakeLists.txt), whatever OpenSSL is
 * installed. Every signature is checked with the public key.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "dkim/dkim.h"
#include "dkim/dkim_int.h"

/* ---- OpenSSL 3.2's one-shot rule, around the real calls ---- */

int __real_EVP_DigestSign(EVP_MD_CTX *ctx, unsigned char *sig, size_t *siglen,
                          const unsigned char *tbs, size_t tbslen);
int __real_EVP_DigestSignInit(EVP_MD_CTX *ctx, EVP_PKEY_CTX **pctx, const EVP_MD *type, ENGINE *e,
                              EVP_PKEY *pkey);
void __real_EVP_MD_CTX_free(EVP_MD_CTX *ctx);
int __wrap_EVP_DigestSign(EVP_MD_CTX *ctx, unsigned char *sig, size_t *siglen,
                          const unsigned char *tbs, size_t tbslen);
int __wrap_EVP_DigestSignInit(EVP_MD_CTX *ctx, EVP_PKEY_CTX **pctx, const EVP_MD *type, ENGINE *e,
                              EVP_PKEY *pkey);
void __wrap_EVP_MD_CTX_free(EVP_MD_CTX *ctx);

#define MAX_SPENT 64
static EVP_MD_CTX *spent[MAX_SPENT]; /* contexts that have made a signature */
static unsigned refused;             /* second calls refused */

static int
spent_find(const EVP_MD_CTX *ctx)
{
    for (int i = 0; i < MAX_SPENT; i++)
        if (spent[i] == ctx)
            return i;
    return -1;
}

static void
spent_forget(const EVP_MD_CTX *ctx)
{
    int i = spent_find(ctx);
    if (i >= 0)
        spent[i] = NULL;
}

int
__wrap_EVP_DigestSign(EVP_MD_CTX *ctx, unsigned char *sig, size_t *siglen, const unsigned char *tbs,
                      size_t tbslen)
{
    if (spent_find(ctx) >= 0) {
        refused++;
        return 0; /* EVP_R_FINAL_ERROR */
    }
    int rc = __real_EVP_DigestSign(ctx, sig, siglen, tbs, tbslen);
    if (sig != NULL) {
        int i = spent_find(NULL);
        assert_true(i >= 0);
        spent[i] = ctx;
    }
    return rc;
}

int
__wrap_EVP_DigestSignInit(EVP_MD_CTX *ctx, EVP_PKEY_CTX **pctx, const EVP_MD *type, ENGINE *e,
                          EVP_PKEY *pkey)
{
    spent_forget(ctx);
    return __real_EVP_DigestSignInit(ctx, pctx, type, e, pkey);
}

void
__wrap_EVP_MD_CTX_free(EVP_MD_CTX *ctx)
{
    spent_forget(ctx); /* its address may come back for another one */
    __real_EVP_MD_CTX_free(ctx);
}

/* ---- the test ---- */

static char tmpdir[64];

static void
test_ed25519_signs_again(void **state)
{
    (void)state;
    char path[128];
    snprintf(path, sizeof(path), "%s/ed.pem", tmpdir);
    EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    assert_non_null(pk);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL), 1);
    fclose(f);

    struct dkim_key *k;
    char err[512];
    assert_int_equal(dkim_key_load(path, &k, err, sizeof(err)), 0);
    refused = 0;
    for (int i = 0; i < 5; i++) {
        uint8_t hash[DKIM_HASH_LEN];
        memset(hash, 'a' + i, sizeof(hash));
        char *sig = NULL;
        size_t sl = 0;
        int rc = dkim_key_sign(k, hash, &sig, &sl);
        if (rc != 0)
            fail_msg("signature %d: %s (second calls refused: %u)", i + 1, dkim_strerror(rc),
                     refused);
        assert_int_equal(sl, 64);
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        assert_int_equal(EVP_DigestVerifyInit(md, NULL, NULL, NULL, pk), 1);
        assert_int_equal(EVP_DigestVerify(md, (unsigned char *)sig, sl, hash, sizeof(hash)), 1);
        EVP_MD_CTX_free(md);
        free(sig);
    }
    assert_int_equal(refused, 0);

    /* and through dkim_sign, as the signing threads do */
    const char *hdr = "From: a@example.com\r\nSubject: x\r\n";
    const char *names[] = {"from", "subject"};
    struct dkim_sig_params p = {
        "example.com", "s", k, DKIM_CANON_RELAXED, DKIM_CANON_RELAXED, names, 2, NULL, 0,
        1700000000,    0};
    uint8_t bh[DKIM_HASH_LEN] = {0};
    for (int i = 0; i < 3; i++) {
        char out[DKIM_SIG_MAX];
        size_t used = 0;
        assert_int_equal(dkim_sign(&p, hdr, strlen(hdr), bh, out, sizeof(out), &used), 0);
    }
    assert_int_equal(refused, 0);
    dkim_key_free(k);
    EVP_PKEY_free(pk);
    unlink(path);
}

int
main(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_dkim_reuse.XXXXXX");
    if (mkdtemp(tmpdir) == NULL)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ed25519_signs_again),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    rmdir(tmpdir);
    return rc;
}
