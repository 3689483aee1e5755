/*
 * test_dkim_pool: dkim_pool_sign_now's buffer is sized by what its
 * signatures can hold (their h= lists, b= of the key's size), not by
 * the header section: four signers over a 20 MB header section of
 * unsigned fields allocate no block of a megabyte (the link wraps
 * malloc to see the largest request while signing; see CMakeLists.txt).
 * A header of hundreds of thousands of signed fields, each named in
 * h= and over-signed, still fits the room reckoned for it.
 *
 * Threading: one thread.
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
#include "engine/dkim_pool.h"

void *__real_malloc(size_t n);
void *__wrap_malloc(size_t n);

static int watching;      /* record requests while set */
static size_t largest;    /* the largest malloc seen while watching */

void *
__wrap_malloc(size_t n)
{
    if (watching && n > largest)
        largest = n;
    return __real_malloc(n);
}

static char tmpdir[64];

static struct dkim_key *
key_new(const char *name, const char *alg, int bits)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/%s.pem", tmpdir, name);
    EVP_PKEY *pk = bits ? EVP_PKEY_Q_keygen(NULL, NULL, alg, (size_t)bits)
                        : EVP_PKEY_Q_keygen(NULL, NULL, alg);
    assert_non_null(pk);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL), 1);
    fclose(f);
    EVP_PKEY_free(pk);
    struct dkim_key *k;
    char err[512];
    assert_int_equal(dkim_key_load(path, &k, err, sizeof(err)), 0);
    unlink(path);
    return k;
}

static char *from_to[] = {"from", "to", "subject", "date", "message-id"};
static char *over_from[] = {"from", "to"};

static void
signer_init(struct dkim_signer *s, const char *sel, struct dkim_key *k, char **headers,
            unsigned nheaders, char **over, unsigned nover)
{
    *s = (struct dkim_signer){"example.com", (char *)sel, "test", k,
                              DKIM_CANON_RELAXED, DKIM_CANON_RELAXED, headers, nheaders,
                              over, nover, 0};
}

static unsigned
count(const char *s, size_t len, const char *what)
{
    unsigned n = 0;
    size_t wl = strlen(what);
    for (const char *p = s; (p = memmem(p, len - (size_t)(p - s), what, wl)) != NULL; p += wl)
        n++;
    return n;
}

static void
test_room_follows_signed_fields(void **state)
{
    (void)state;
    struct dkim_key *ed = key_new("ed", "ED25519", 0), *rsa = key_new("rsa", "RSA", 2048);
    struct dkim_signer s[4];
    signer_init(&s[0], "s0", ed, from_to, 5, over_from, 2);
    signer_init(&s[1], "s1", rsa, from_to, 5, over_from, 2);
    signer_init(&s[2], "s2", ed, from_to, 3, NULL, 0);
    signer_init(&s[3], "s3", rsa, from_to, 1, over_from, 1);
    const struct dkim_signer *sg[4] = {&s[0], &s[1], &s[2], &s[3]};
    uint8_t bh[2][DKIM_HASH_LEN];
    memset(bh, 7, sizeof(bh));

    /* 20 MB of header section, nearly all of it one unsigned field */
    size_t cap = 20u << 20, n = 0;
    char *hdr = malloc(cap);
    assert_non_null(hdr);
    n += (size_t)sprintf(hdr, "From: a@example.com\r\nTo: b@example.org\r\nX-Big: ");
    while (n + 80 < cap) {
        memset(hdr + n, 'x', 76);
        memcpy(hdr + n + 76, "\r\n\t", 3);
        n += 79;
    }
    memcpy(hdr + n, "y\r\n", 3);
    n += 3;
    char *sig = NULL;
    size_t sig_len = 0;
    const struct dkim_signer *bad = NULL;
    largest = 0;
    watching = 1;
    int rc = dkim_pool_sign_now(sg, 4, (const uint8_t(*)[DKIM_HASH_LEN])bh, 1700000000, hdr, n,
                                &sig, &sig_len, &bad);
    watching = 0;
    assert_int_equal(rc, 0);
    assert_null(bad);
    assert_int_equal(count(sig, sig_len, "DKIM-Signature:"), 4);
    print_message("largest allocation while signing %zu MB of header: %zu octets\n", n >> 20,
                  largest);
    if (largest >= (1u << 20))
        fail_msg("signing over %zu MB of header allocated %zu octets at once", n >> 20, largest);
    free(sig);

    /* a header of many short signed fields: each is named in h= */
    static char *short_names[] = {"from", "a"};
    static char *short_over[] = {"a", "from"};
    signer_init(&s[0], "s0", ed, short_names, 2, short_over, 2);
    signer_init(&s[1], "s1", rsa, short_names, 2, short_over, 2);
    n = (size_t)sprintf(hdr, "From: a@example.com\r\n");
    unsigned fields = 0;
    while (n + 4 <= (4u << 20)) {
        memcpy(hdr + n, "a:\r\n", 4);
        n += 4;
        fields++;
    }
    rc = dkim_pool_sign_now(sg, 2, (const uint8_t(*)[DKIM_HASH_LEN])bh, 1700000000, hdr, n, &sig,
                            &sig_len, &bad);
    assert_int_equal(rc, 0);
    assert_int_equal(count(sig, sig_len, "DKIM-Signature:"), 2);
    /* each field and the over-signed one, in both signatures; ":a" or
     * folded after its colon */
    assert_int_equal(count(sig, sig_len, ":a") + count(sig, sig_len, ":\r\n\ta"),
                     2 * (fields + 1));
    free(sig);
    free(hdr);
    dkim_key_free(ed);
    dkim_key_free(rsa);
}

int
main(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_dkim_pool_XXXXXX");
    if (mkdtemp(tmpdir) == NULL)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_room_follows_signed_fields),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    rmdir(tmpdir);
    return rc;
}
