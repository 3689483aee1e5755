/*
 * test_dkim: the body hash against canonical forms written out by hand
 * (RFC 6376 3.4.5's example among them), fed at every split; the From:
 * domain of well-formed and hostile fields; the signature's shape and
 * its RSA and Ed25519 signatures checked with OpenSSL against the
 * canonical header data rebuilt here; the keyring's lookups.
 * (tests/dkim/test_vectors.py has dkimpy verify dkim-sign's output.)
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "dkim/dkim.h"

static void
sha256(const char *s, size_t n, uint8_t out[32])
{
    unsigned len;
    EVP_Digest(s, n, out, &len, EVP_sha256(), NULL);
}

/* msg fed at every two-way split and byte by byte: the hash of canon
 * equals SHA-256(want). */
static void
check_body(const char *msg, enum dkim_canon canon, const char *want)
{
    uint8_t exp[32], got[32];
    sha256(want, strlen(want), exp);
    struct dkim_body *b = dkim_body_new(3);
    assert_non_null(b);
    size_t n = strlen(msg);
    for (size_t cut = 0; cut <= n; cut++) {
        dkim_body_reset(b);
        dkim_body_feed(b, msg, cut);
        dkim_body_feed(b, msg + cut, n - cut);
        assert_int_equal(dkim_body_final(b, canon, got), 0);
        if (memcmp(got, exp, 32) != 0)
            fail_msg("canon %d, cut at %zu of \"%s\"", canon, cut, msg);
    }
    dkim_body_reset(b);
    for (size_t i = 0; i < n; i++)
        dkim_body_feed(b, msg + i, 1);
    assert_int_equal(dkim_body_final(b, canon, got), 0);
    assert_memory_equal(got, exp, 32);
    dkim_body_free(b);
}

static void
test_body_canon(void **state)
{
    (void)state;
    /* RFC 6376 3.4.5 */
    const char *ex = "A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n";
    check_body(ex, DKIM_CANON_RELAXED, " C\r\nD E\r\n");
    check_body(ex, DKIM_CANON_SIMPLE, " C \r\nD \t E\r\n");
    /* empty bodies: relaxed hashes nothing, simple one CRLF */
    check_body("A: b\r\n\r\n", DKIM_CANON_RELAXED, "");
    check_body("A: b\r\n\r\n", DKIM_CANON_SIMPLE, "\r\n");
    check_body("A: b\r\n", DKIM_CANON_SIMPLE, "\r\n");
    check_body("A: b\r\n\r\n\r\n \r\n", DKIM_CANON_RELAXED, "");
    check_body("A: b\r\n\r\n\r\n \r\n", DKIM_CANON_SIMPLE, "\r\n \r\n");
    /* empty lines inside stay; a last line without CRLF gets one */
    check_body("A: b\r\n\r\nx\r\n\r\n\r\ny", DKIM_CANON_SIMPLE, "x\r\n\r\n\r\ny\r\n");
    check_body("A: b\r\n\r\nx\r\n \r\n\r\ny  ", DKIM_CANON_RELAXED, "x\r\n\r\n\r\ny\r\n");
    /* leading whitespace is one SP, not nothing */
    check_body("A: b\r\n\r\n\t\tx  y\r\n", DKIM_CANON_RELAXED, " x y\r\n");
    /* 8-bit octets and dots are content like any other */
    check_body("A: b\r\n\r\n.\xc3\xa9t\xe9\r\n..\r\n", DKIM_CANON_SIMPLE,
               ".\xc3\xa9t\xe9\r\n..\r\n");
    /* a message whose first line is empty has no header section */
    check_body("\r\nbody\r\n", DKIM_CANON_SIMPLE, "body\r\n");
    /* bare CR and LF (refused before signing, but hashed the same at any
     * split: fuzz_dkim found simple's held-back run was not) */
    check_body("\r\n\r\n\n\r\n\r\xd6", DKIM_CANON_SIMPLE, "\r\n\n\r\n\r\xd6\r\n");
    check_body("\r\nx\r\n\r\n\r", DKIM_CANON_SIMPLE, "x\r\n\r\n\r\r\n");
    check_body("\r\nx\r\r\n", DKIM_CANON_SIMPLE, "x\r\r\n");
}

static void
test_from_domain(void **state)
{
    (void)state;
    struct {
        const char *hdr;
        int rc;
        const char *dom;
    } cases[] = {
        {"From: a@Example.COM\r\n", 0, "example.com"},
        {"From: \"Doe, J@x\" <j@example.com> (c@other.org)\r\n", 0, "example.com"},
        {"From: Jane\r\n <jane@example.com>\r\nTo: b@x.org\r\n", 0, "example.com"},
        {"from:a@example.com,b@example.com\r\n", 0, "example.com"},
        {"From: a@example.com, b@other.org\r\n", DKIM_EFROMS, NULL},
        {"From: a@example.com\r\nFrom: b@example.com\r\n", 0, "example.com"},
        {"From: a@example.com\r\nFrom: b@other.org\r\n", DKIM_EFROMS, NULL},
        {"From: team: a@example.com, b@example.com;\r\n", 0, "example.com"},
        {"To: a@example.com\r\n", DKIM_ENOFROM, NULL},
        {"From: undisclosed\r\n", DKIM_ENOFROM, NULL},
        {"From: <>\r\n", DKIM_ENOFROM, NULL},
        {"From: a@\r\n", DKIM_ENOFROM, NULL},
        {"not a header\r\n", DKIM_EHEADER, NULL},
        /* comments that end, with an escaped ')' inside */
        {"From: (Bob) <bob@example.com>\r\n", 0, "example.com"},
        {"From: (a \\) (b) c) bob@example.com (x)\r\n", 0, "example.com"},
        /* a value that ends inside a comment, quoted string or <>: RFC
         * 5322 (and OpenDKIM's parser) read no address; said apart from
         * "no From:" so that the log can say why */
        {"From: (Bob <bob@example.com>\r\n", DKIM_EFROMSYNTAX, NULL},
        {"From: bob@example.com (Bob\r\n", DKIM_EFROMSYNTAX, NULL},
        {"From: (a (b) bob@example.com\r\n", DKIM_EFROMSYNTAX, NULL},
        {"From: (Bob \\)\r\n", DKIM_EFROMSYNTAX, NULL},
        {"From: \"Bob <bob@example.com>\r\n", DKIM_EFROMSYNTAX, NULL},
        {"From: \"Bob\\\" <bob@example.com>\r\n", DKIM_EFROMSYNTAX, NULL},
        {"From: Bob <bob@example.com\r\n", DKIM_EFROMSYNTAX, NULL},
        /* one From: field that cannot be read beside one that can: which
         * a receiver takes cannot be told */
        {"From: a@example.com\r\nFrom: (x <b@other.org>\r\n", DKIM_EFROMSYNTAX, NULL},
        /* an IDN written as U-labels (SMTPUTF8) is looked up as the A-labels
         * keys are configured under (RFC 8616 4): either form, one domain */
        {"From: a@b\xc3\xbc" "cher.example\r\n", 0, "xn--bcher-kva.example"},
        {"From: J <a@B\xc3\xbc" "cher.Example.>\r\n", 0, "xn--bcher-kva.example"},
        {"From: a@m\xc3\xbc" "nchen.de, b@xn--mnchen-3ya.de\r\n", 0, "xn--mnchen-3ya.de"},
        {"From: a@m\xc3\xbc" "nchen.de, b@muenchen.de\r\n", DKIM_EFROMS, NULL},
        {"From: a@\xe4\xbe\x8b\xe3\x81\x88.\xe3\x83\x86\xe3\x82\xb9\xe3\x83\x88\r\n", 0,
         "xn--r8jz45g.xn--zckzah"},
        /* IDNA2008 (libidn2): NFC first (a + combining diaeresis is
         * \xc3\xa4), and "\xc3\x9f" is a letter of its own
         * (nontransitional), not "ss" */
        {"From: a@a\xcc\x88.example\r\n", 0, "xn--4ca.example"},
        {"From: a@stra\xc3\x9f" "e.example\r\n", 0, "xn--strae-oqa.example"},
        /* not a valid IDN (an emoji is no IDNA2008 code point, a label
         * that starts with a hyphen): kept as written, which no key
         * matches; a hand-written encoder gave the emoji one an A-label
         * that no registry could have delegated */
        {"From: a@a\xf0\x9f\x98\x80" "b.example\r\n", 0, "a\xf0\x9f\x98\x80" "b.example"},
        {"From: a@-\xc3\xbc.example\r\n", 0, "-\xc3\xbc.example"},
        /* not UTF-8 (a lone continuation octet, an overlong '/'): kept as
         * written, which no key matches */
        {"From: a@b\xbc" "c.example\r\n", 0, "b\xbc" "c.example"},
        {"From: a@\xc0\xaf.example\r\n", 0, "\xc0\xaf.example"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char dom[256] = "";
        int rc = dkim_from_domain(cases[i].hdr, strlen(cases[i].hdr), dom, sizeof(dom));
        if (rc != cases[i].rc)
            fail_msg("case %zu: rc %d, want %d", i, rc, cases[i].rc);
        if (cases[i].dom != NULL)
            assert_string_equal(dom, cases[i].dom);
    }
    /* one address's domain (the envelope's, a configured From): as
     * dkim_from_domain, lowercase and without trailing dots */
    struct {
        const char *addr;
        int rc;
        const char *dom;
    } addrs[] = {
        {"user@Example.COM", 0, "example.com"},
        {"user@example.com.", 0, "example.com"},
        {"\"a@b\"@Sub.Example.com..", 0, "sub.example.com"},
        {"user@B\xc3\xbc" "cher.example", 0, "xn--bcher-kva.example"},
        {"user@", DKIM_ENOFROM, NULL},
        {"user@.", DKIM_ENOFROM, NULL},
        {"user", DKIM_ENOFROM, NULL},
        {"", DKIM_ENOFROM, NULL},
    };
    for (size_t i = 0; i < sizeof(addrs) / sizeof(addrs[0]); i++) {
        char d[256] = "";
        int rc = dkim_addr_domain(addrs[i].addr, d, sizeof(d));
        if (rc != addrs[i].rc)
            fail_msg("address %s: rc %d, want %d", addrs[i].addr, rc, addrs[i].rc);
        if (addrs[i].dom != NULL)
            assert_string_equal(d, addrs[i].dom);
    }
    char small[8];
    assert_int_equal(dkim_addr_domain("a@example.com", small, sizeof(small)), DKIM_ENOFROM);
    assert_int_equal(dkim_addr_domain("a@example", small, sizeof(small)), 0);
    assert_string_equal(small, "example");
    assert_string_equal(dkim_error_token(DKIM_EFROMSYNTAX), "no_from");
    assert_non_null(strstr(dkim_strerror(DKIM_EFROMSYNTAX), "comment"));
    /* A local part longer than any buffer: its domain still counts, so a
     * second domain beside it is still DKIM_EFROMS (README: a From:
     * naming two domains goes out unsigned). */
    char lp[1200], hdr[1400], dom[256];
    memset(lp, 'a', 1000);
    lp[1000] = '\0';
    const char *forms[] = {"From: <%s@victim.example>, me@tenant.example\r\n",
                           "From: %s@victim.example, me@tenant.example\r\n",
                           "From: me@tenant.example\r\nFrom: \"x\" <%s@Victim.example>\r\n"};
    for (size_t i = 0; i < sizeof(forms) / sizeof(forms[0]); i++) {
        snprintf(hdr, sizeof(hdr), forms[i], lp);
        dom[0] = '\0';
        int rc = dkim_from_domain(hdr, strlen(hdr), dom, sizeof(dom));
        if (rc != DKIM_EFROMS)
            fail_msg("long local part, form %zu: rc %d (domain \"%s\"), want DKIM_EFROMS", i, rc,
                     dom);
    }
    snprintf(hdr, sizeof(hdr), "From: Jane <%s@Victim.example>\r\n", lp);
    assert_int_equal(dkim_from_domain(hdr, strlen(hdr), dom, sizeof(dom)), 0);
    assert_string_equal(dom, "victim.example");
    /* a domain longer than a domain can be is no address */
    memset(lp, 'd', 1100);
    lp[1100] = '\0';
    snprintf(hdr, sizeof(hdr), "From: a@%s\r\n", lp);
    assert_int_equal(dkim_from_domain(hdr, strlen(hdr), dom, sizeof(dom)), DKIM_ENOFROM);
}

static char tmpdir[64];

static char *
make_key(const char *name, const char *alg, int bits)
{
    char *path = malloc(256);
    snprintf(path, 256, "%s/%s.pem", tmpdir, name);
    EVP_PKEY *pk = bits ? EVP_PKEY_Q_keygen(NULL, NULL, alg, (size_t)bits)
                        : EVP_PKEY_Q_keygen(NULL, NULL, alg);
    assert_non_null(pk);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL), 1);
    fclose(f);
    EVP_PKEY_free(pk);
    return path;
}

/* The b= value of a signature field, unfolded and decoded. */
static size_t
sig_b(const char *field, unsigned char *out)
{
    const char *b = strstr(field, "\tb=");
    assert_non_null(b);
    char txt[2048];
    size_t n = 0;
    for (b += 3; *b; b++)
        if (*b != ' ' && *b != '\t' && *b != '\r' && *b != '\n')
            txt[n++] = *b;
    txt[n] = '\0';
    int len = EVP_DecodeBlock(out, (unsigned char *)txt, (int)n);
    while (n > 0 && txt[--n] == '=')
        len--;
    return (size_t)len;
}

static void
test_sign_and_check(void **state)
{
    (void)state;
    const char *algs[] = {"RSA", "ED25519"};
    for (int a = 0; a < 2; a++) {
        char *path = make_key(algs[a], algs[a], a == 0 ? 1024 : 0);
        struct dkim_key *k;
        char err[512];
        assert_int_equal(dkim_key_load(path, &k, err, sizeof(err)), 0);
        const char *hdr = "From: Jane <j@example.com>\r\nSubject:  Hi\r\n\tthere \r\n"
                          "To: b@x.org\r\n";
        const char *names[] = {"from", "subject", "date"};
        const char *over[] = {"from"};
        struct dkim_sig_params p = {"example.com", "s1", k, DKIM_CANON_RELAXED,
                                    DKIM_CANON_RELAXED, names, 3, over, 1, 1700000000, 3600};
        uint8_t bh[32] = {1, 2, 3};
        char out[DKIM_SIG_MAX];
        size_t used = 0;
        assert_int_equal(dkim_sign(&p, hdr, strlen(hdr), bh, out, sizeof(out), &used), 0);
        out[used] = '\0';
        assert_non_null(strstr(out, "h=from:from:subject;"));
        assert_non_null(strstr(out, "t=1700000000;"));
        assert_non_null(strstr(out, "x=1700003600;"));
        assert_non_null(strstr(out, a ? "a=ed25519-sha256" : "a=rsa-sha256"));
        assert_string_equal(out + used - 2, "\r\n");
        for (const char *c = out; *c; c++) /* lines stay short */
            if (*c == '\n') {
                const char *nl = strchr(c + 1, '\n');
                assert_true((nl ? (size_t)(nl - c) : strlen(c)) < 80);
            }

        /* Rebuild what was signed: relaxed From, Subject, then the
         * signature field with b= empty. */
        char data[4096];
        int n = snprintf(data, sizeof(data), "from:Jane <j@example.com>\r\nsubject:Hi there\r\n");
        const char *f = out + strlen("DKIM-Signature:");
        n += snprintf(data + n, sizeof(data) - (size_t)n, "dkim-signature:");
        bool wsp = false, started = false;
        const char *bend = strstr(out, "\tb=") + 3;
        for (; f < bend; f++) {
            if (*f == '\r' || *f == '\n')
                continue;
            if (*f == ' ' || *f == '\t') {
                wsp = true;
                continue;
            }
            if (wsp && started)
                data[n++] = ' ';
            wsp = false;
            started = true;
            data[n++] = *f;
        }
        uint8_t hh[32];
        sha256(data, (size_t)n, hh);
        unsigned char sig[1024];
        size_t sl = sig_b(out, sig);
        FILE *fp = fopen(path, "r");
        EVP_PKEY *pk = PEM_read_PrivateKey(fp, NULL, NULL, NULL);
        fclose(fp);
        EVP_MD_CTX *md = EVP_MD_CTX_new();
        if (a == 0) {
            assert_int_equal(EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, pk), 1);
            /* RSA signs SHA-256 of the data, which is hh's input */
            assert_int_equal(EVP_DigestVerify(md, sig, sl, (unsigned char *)data, (size_t)n), 1);
        } else {
            assert_int_equal(EVP_DigestVerifyInit(md, NULL, NULL, NULL, pk), 1);
            assert_int_equal(EVP_DigestVerify(md, sig, sl, hh, 32), 1);
        }
        /* one octet changed: no longer verifies */
        data[0] = 'F';
        EVP_MD_CTX_reset(md);
        if (a == 0) {
            EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, pk);
            assert_int_not_equal(EVP_DigestVerify(md, sig, sl, (unsigned char *)data, (size_t)n),
                                 1);
        } else {
            sha256(data, (size_t)n, hh);
            EVP_DigestVerifyInit(md, NULL, NULL, NULL, pk);
            assert_int_not_equal(EVP_DigestVerify(md, sig, sl, hh, 32), 1);
        }
        EVP_MD_CTX_free(md);
        EVP_PKEY_free(pk);

        char txt[2048];
        long tl = dkim_key_txt(k, txt, sizeof(txt));
        assert_true(tl > 0);
        assert_non_null(strstr(txt, a ? "v=DKIM1; k=ed25519; p=" : "v=DKIM1; k=rsa; p=MIGf"));
        dkim_key_free(k);
        unlink(path);
        free(path);
    }
}

static void
test_bad_keys(void **state)
{
    (void)state;
    char path[128], err[512];
    struct dkim_key *k;
    snprintf(path, sizeof(path), "%s/garbage.pem", tmpdir);
    FILE *f = fopen(path, "w");
    fputs("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n", f);
    fclose(f);
    assert_int_equal(dkim_key_load(path, &k, err, sizeof(err)), DKIM_EKEY);
    assert_non_null(strstr(err, "garbage.pem"));
    unlink(path);
    assert_int_equal(dkim_key_load(path, &k, err, sizeof(err)), -ENOENT);
    snprintf(path, sizeof(path), "%s/ec.pem", tmpdir);
    EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    f = fopen(path, "w");
    PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL);
    fclose(f);
    EVP_PKEY_free(pk);
    assert_int_equal(dkim_key_load(path, &k, err, sizeof(err)), DKIM_EKEYTYPE);
    assert_non_null(strstr(err, "RSA or Ed25519"));
    unlink(path);
    /* A FIFO where the key should be (no writer will ever come) is an
     * error at once, not a config load blocked for ever; a directory too.
     * The alarm ends the test if the load blocks. */
    snprintf(path, sizeof(path), "%s/fifo.pem", tmpdir);
    assert_int_equal(mkfifo(path, 0600), 0);
    alarm(10);
    assert_int_equal(dkim_key_load(path, &k, err, sizeof(err)), DKIM_EKEY);
    alarm(0);
    assert_non_null(strstr(err, "fifo.pem: not a regular file"));
    unlink(path);
    snprintf(path, sizeof(path), "%s/dir.pem", tmpdir);
    assert_int_equal(mkdir(path, 0700), 0);
    assert_int_equal(dkim_key_load(path, &k, err, sizeof(err)), DKIM_EKEY);
    assert_non_null(strstr(err, "dir.pem: not a regular file"));
    rmdir(path);
}

/* A header section that is the whole message (every line a field): what
 * the From: domain and the signature cost beside it is the fields they
 * use, not one record per field (hostile: 32 octets per 4-octet "a:"). */
static void
test_big_header(void **state)
{
    (void)state;
    size_t cap = 20u << 20, n = 0;
    char *hdr = malloc(cap);
    assert_non_null(hdr);
    n += (size_t)sprintf(hdr, "From: a@example.com\r\nTo: b@example.org\r\n");
    while (n + 4 <= cap) {
        memcpy(hdr + n, "a:\r\n", 4);
        n += 4;
    }
    char *path = make_key("big", "ED25519", 0);
    struct dkim_key *k;
    char err[512];
    assert_int_equal(dkim_key_load(path, &k, err, sizeof(err)), 0);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    long before = ru.ru_maxrss; /* KiB, the header section touched */

    char dom[256];
    assert_int_equal(dkim_from_domain(hdr, n, dom, sizeof(dom)), 0);
    assert_string_equal(dom, "example.com");
    const char *names[] = {"from", "to", "subject"};
    const char *over[] = {"from"};
    struct dkim_sig_params p = {
        "example.com", "s1", k, DKIM_CANON_RELAXED, DKIM_CANON_RELAXED, names, 3, over, 1,
        1700000000,    0};
    uint8_t bh[32] = {0};
    char out[DKIM_SIG_MAX];
    size_t used = 0;
    assert_int_equal(dkim_sign(&p, hdr, n, bh, out, sizeof(out), &used), 0);
    out[used] = '\0';
    assert_non_null(strstr(out, "h=from:from:to;"));

    getrusage(RUSAGE_SELF, &ru);
    long grew = (ru.ru_maxrss - before) / 1024;
    if (grew > 16)
        fail_msg("%zu MB of header fields took %ld MB more", n >> 20, grew);
    dkim_key_free(k);
    unlink(path);
    free(path);
    free(hdr);
}

static void
report_fail(void *ctx, const char *what)
{
    (void)ctx;
    fail_msg("unexpected: %s", what);
}

static void
test_keyring(void **state)
{
    (void)state;
    char *k1 = make_key("k1", "ED25519", 0);
    struct dkim_config def = {0};
    char err[512];
    assert_int_equal(conf_defaults(dkim_conf_keys, &def, err, sizeof(err)), 0);
    struct dkim_keyring *kr = dkim_keyring_new(DKIM_FROM_HEADER);
    struct dkim_sig_config sc = {.key_file = k1};
    const char *bad = NULL;
    assert_int_equal(dkim_keyring_add(kr, "Example.com", "a", &sc, &def, &bad, err, sizeof(err)),
                     0);
    assert_int_equal(dkim_keyring_add(kr, "example.com", "b", &sc, &def, &bad, err, sizeof(err)),
                     0);
    assert_int_equal(dkim_keyring_add(kr, "example.com", "a", &sc, &def, &bad, err, sizeof(err)),
                     -EEXIST);
    /* a default needs its d= */
    assert_int_equal(dkim_keyring_add(kr, "*", "p", &sc, &def, &bad, err, sizeof(err)), -EINVAL);
    assert_string_equal(bad, "domain");
    sc.domain = strdup("provider.net");
    assert_int_equal(dkim_keyring_add(kr, "*", "p", &sc, &def, &bad, err, sizeof(err)), 0);
    sc.canonicalization = strdup("relaxed/sloppy");
    free(sc.domain);
    sc.domain = NULL;
    assert_int_equal(dkim_keyring_add(kr, "other.org", "a", &sc, &def, &bad, err, sizeof(err)),
                     -EINVAL);
    assert_string_equal(bad, "canonicalization");
    free(sc.canonicalization);
    assert_int_equal(dkim_keyring_seal(kr, report_fail, NULL), 0);
    const struct dkim_signer *v[4];
    assert_int_equal(dkim_keyring_lookup(kr, "example.com", v, 4), 2);
    assert_string_equal(v[0]->selector, "a");
    assert_string_equal(v[1]->selector, "b");
    assert_int_equal(dkim_keyring_lookup(kr, "news.example.com", v, 4), 2);
    assert_int_equal(dkim_keyring_lookup(kr, "customer.org", v, 4), 1);
    assert_string_equal(v[0]->domain, "provider.net");
    assert_int_equal(dkim_keyring_body_canons(kr), 1u << DKIM_CANON_RELAXED);
    dkim_keyring_unref(kr);
    conf_free(dkim_conf_keys, &def);
    unlink(k1);
    free(k1);
}

int
main(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_dkim.XXXXXX");
    if (mkdtemp(tmpdir) == NULL)
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_body_canon),      cmocka_unit_test(test_from_domain),
        cmocka_unit_test(test_sign_and_check),  cmocka_unit_test(test_bad_keys),
        cmocka_unit_test(test_keyring),         cmocka_unit_test(test_big_header),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    rmdir(tmpdir);
    return rc;
}
