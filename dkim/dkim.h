/*
 * dkim: DKIM signing (RFC 6376) with rsa-sha256 and, per RFC 8463,
 * ed25519-sha256, written here over OpenSSL's libcrypto. What it owns:
 * the body hash computed as the body streams in (struct dkim_body), the
 * header canonicalization and the private-key operation (dkim_sign), the
 * keys (struct dkim_key, PEM files), the signing configuration of a node
 * (struct dkim_keyring: which keys sign for which domain) and the TXT
 * record to publish for a key.
 *
 * Why not libopendkim: it wants the whole message through its own API
 * (dkim_header/dkim_body/dkim_eom) and does the private-key operation
 * inside dkim_eom on the calling thread; sluice hashes the body in the
 * same pass that unstuffs it on the worker, and runs only the small
 * header hash and the key operation on a signing thread. Canonicalization
 * is a few hundred lines; the cryptography is OpenSSL's either way.
 *
 * Threading: no global state. A struct dkim_body belongs to one thread
 * at a time. Keys and keyrings are immutable once built and may be read
 * by any number of threads at once (OpenSSL 3 allows concurrent signing
 * with one EVP_PKEY); keyrings are reference-counted.
 *
 * Errors: 0 or a negative code, -errno or enum dkim_error; dkim_strerror
 * names both.
 */
#ifndef SLUICE_DKIM_DKIM_H
#define SLUICE_DKIM_DKIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/conf.h"

enum dkim_error {
    DKIM_EKEY = -32000,      /* the key file cannot be parsed */
    DKIM_EKEYTYPE = -32001,  /* not an RSA (>= 1024 bits) or Ed25519 key */
    DKIM_ESIGN = -32002,     /* the private-key operation failed */
    DKIM_ENOFROM = -32003,   /* no From: field, or no address in it */
    DKIM_EFROMS = -32004,    /* From: names more than one domain */
    DKIM_EHEADER = -32005,   /* the header section cannot be signed as it is */
    DKIM_ENOKEY = -32006,    /* no key for the signing domain */
    DKIM_ETOOBIG = -32007,   /* output does not fit */
    DKIM_EFROMSYNTAX = -32008, /* a From: field ends inside a comment, quoted string or <> */
};

/* Text for any code this module returns (static storage). */
const char *dkim_strerror(int rc);
/* A short token for logs: "no_from", "several_from_domains", "no_key", ...
 * (DKIM_EFROMSYNTAX is "no_from" too: dkim_strerror says why). */
const char *dkim_error_token(int rc);

enum dkim_canon { DKIM_CANON_SIMPLE = 0, DKIM_CANON_RELAXED = 1 };
enum dkim_alg { DKIM_ALG_RSA_SHA256, DKIM_ALG_ED25519_SHA256 };

#define DKIM_HASH_LEN 32

/* ---- keys ---- */

struct dkim_key;

/* Read a PEM private key (PKCS#8 or traditional RSA) from a regular file
 * (anything else, a FIFO or a directory, is DKIM_EKEY at once). Returns 0
 * and *out, or a negative code with a message for the operator in err. */
int dkim_key_load(const char *path, struct dkim_key **out, char *err, size_t errlen);
struct dkim_key *dkim_key_free(struct dkim_key *k);
enum dkim_alg dkim_key_alg(const struct dkim_key *k);
/* "rsa-sha256" or "ed25519-sha256" */
const char *dkim_alg_str(enum dkim_alg a);
unsigned dkim_key_bits(const struct dkim_key *k);
/* The TXT record value to publish at SELECTOR._domainkey.DOMAIN:
 * "v=DKIM1; k=rsa; p=BASE64". Returns its length, or a negative code. */
long dkim_key_txt(const struct dkim_key *k, char *out, size_t cap);

/* ---- the body hash, as the message streams in ---- */

struct dkim_body;

/* A hasher computing the body hash for each canonicalization in canons
 * (a mask of 1 << enum dkim_canon). Returns NULL when out of memory. */
struct dkim_body *dkim_body_new(unsigned canons);
struct dkim_body *dkim_body_free(struct dkim_body *b);
/* Start a new message. */
void dkim_body_reset(struct dkim_body *b);
/* Feed the next octets of the message as stored (header section, empty
 * line, body; CRLF line ends): the hasher skips the header section
 * itself. Any split of the message gives the same hashes. */
void dkim_body_feed(struct dkim_body *b, const void *p, size_t n);
/* The SHA-256 body hash for canon (which must be in the hasher's mask).
 * Only once per message. Returns 0 or a negative code. */
int dkim_body_final(struct dkim_body *b, enum dkim_canon canon, uint8_t out[DKIM_HASH_LEN]);

/* ---- header fields ---- */

/* The domain of the address(es) in the From: fields of the header
 * section hdr[0..len): exactly one domain, lowercase, its U-labels (UTF-8,
 * RFC 6532) written as A-labels ("xn--..."), into out. Several
 * From: fields or addresses sharing that domain are fine (DMARC aligns
 * with it); several domains are DKIM_EFROMS, none DKIM_ENOFROM. A From:
 * field that ends inside a comment, a quoted string or an angle-addr
 * ("From: (Bob <bob@example.com>") is DKIM_EFROMSYNTAX: RFC 5322 reads
 * no address there (what follows the '(' is all comment), and neither do
 * OpenDKIM's and OpenDMARC's parsers (unbalanced), so no domain can be
 * picked that a receiver would align with. */
int dkim_from_domain(const char *hdr, size_t len, char *out, size_t cap);
/* The signing domain of one address (an envelope sender, a configured
 * From): what follows its last '@', lowercase, U-labels as A-labels,
 * without trailing dots (a
 * keyring's domains have none, and d= must not: "example.com." is not
 * example.com to a verifier's alignment check), as dkim_from_domain
 * does. Returns 0, or DKIM_ENOFROM when there is none or it does not
 * fit in cap. */
int dkim_addr_domain(const char *addr, char *out, size_t cap);

/* ---- signing ---- */

struct dkim_sig_params {
    const char *domain;              /* d= */
    const char *selector;            /* s= */
    const struct dkim_key *key;      /* borrowed */
    enum dkim_canon hdr_canon, body_canon;
    const char *const *headers;      /* lowercase field names to sign */
    unsigned nheaders;
    const char *const *oversign;     /* of those, the ones signed once more than present */
    unsigned noversign;
    uint64_t timestamp;              /* t=, Unix seconds */
    uint64_t expire;                 /* x= is t= plus this many seconds; 0: no x= */
};

/* Sign the message whose header section is hdr[0..len) (every field with
 * its CRLF, without the empty line) and whose body hash for p->body_canon
 * is bh: append one "DKIM-Signature: ...\r\n" field to out[*used..cap).
 * Returns 0 or a negative code (out unchanged then). */
int dkim_sign(const struct dkim_sig_params *p, const char *hdr, size_t len,
              const uint8_t bh[DKIM_HASH_LEN], char *out, size_t cap, size_t *used);

/* Room enough for one DKIM-Signature field with an RSA-4096 signature
 * and the default h= list, over a header section with a field or two of
 * each name signed; dkim_sig_room() says what any one needs. */
#define DKIM_SIG_MAX 4096

/* The most octets dkim_sign(p, hdr, len, ...) can append: DKIM_SIG_MAX,
 * plus d=, s= and a b= of p's key size, plus the h= list (a name for each
 * field of hdr that p->headers names, and for each over-signed name): it
 * grows with the number of signed fields, not with the header's size. */
size_t dkim_sig_room(const struct dkim_sig_params *p, const char *hdr, size_t len);

/* ---- configuration: [dkim] and [dkim DOMAIN SELECTOR] ---- */

enum dkim_domain_source { DKIM_FROM_HEADER, DKIM_FROM_ENVELOPE };
/* Which messages are signed on the worker that received them rather than
 * in the signing threads ([dkim] sign_on_worker). */
enum dkim_on_worker { DKIM_ON_WORKER_NONE, DKIM_ON_WORKER_ED25519, DKIM_ON_WORKER_ALL };

/* The [dkim] section: defaults for every signature, and the key directory. */
struct dkim_config {
    char *key_dir;           /* owned; NULL: none. DOMAIN/SELECTOR.pem under it */
    int signing_domain;      /* enum dkim_domain_source */
    char *headers;           /* owned: comma-separated field names */
    char *oversign_headers;  /* owned */
    char *canonicalization;  /* owned: "relaxed/relaxed" ... */
    uint64_t expire;         /* ms; 0: no x= */
    unsigned threads;        /* signing threads; 0: one per core */
    unsigned queue_max;      /* messages waiting for a signing thread */
    int sign_on_worker;      /* enum dkim_on_worker */
};
extern const struct conf_key dkim_conf_keys[];
/* Check the [dkim] values that signers inherit. Returns 0, or -EINVAL with
 * the key at fault in *bad and the reason in err. */
int dkim_config_check(const struct dkim_config *c, const char **bad, char *err, size_t errlen);

/* A [dkim DOMAIN SELECTOR] section; unset keys come from [dkim]. */
struct dkim_sig_config {
    char *key_file;          /* owned */
    char *domain;            /* owned: d= of a [dkim * SELECTOR] section */
    char *headers;           /* owned; NULL: [dkim] headers */
    char *oversign_headers;  /* owned; NULL: [dkim] oversign_headers */
    char *canonicalization;  /* owned; NULL: [dkim] canonicalization */
    uint64_t expire;         /* ms; 0: [dkim] expire */
};
extern const struct conf_key dkim_sig_conf_keys[];

/* ---- the keyring: which keys sign for which domain ---- */

/* One signature to make: a key and how to use it. */
struct dkim_signer {
    char *domain;            /* owned: lowercase; the d= */
    char *selector;          /* owned */
    char *source;            /* owned: the key file, for messages */
    struct dkim_key *key;    /* owned */
    enum dkim_canon hdr_canon, body_canon;
    char **headers;          /* owned */
    unsigned nheaders;
    char **oversign;         /* owned */
    unsigned noversign;
    uint64_t expire_s;
};

#define DKIM_MAX_SIGNERS 4 /* signatures on one message: more keys for one domain is a
                            * config error */

struct dkim_keyring;

/* An empty keyring. NULL when out of memory. */
struct dkim_keyring *dkim_keyring_new(int signing_domain);
struct dkim_keyring *dkim_keyring_ref(struct dkim_keyring *kr);
/* Drop a reference; the last one frees. Returns NULL. */
struct dkim_keyring *dkim_keyring_unref(struct dkim_keyring *kr);

/* Add the signature of one [dkim DOMAIN SELECTOR] section (domain "*":
 * the default for domains without a key; sc->domain is its d=), loading
 * its key. defaults: the [dkim] section. Returns 0, or a negative code
 * with the reason in err; *bad_key names the key at fault ("key_file",
 * "headers", ...). */
int dkim_keyring_add(struct dkim_keyring *kr, const char *domain, const char *selector,
                     const struct dkim_sig_config *sc, const struct dkim_config *defaults,
                     const char **bad_key, char *err, size_t errlen);
/* Add every KEY_DIR/DOMAIN/SELECTOR.pem under defaults->key_dir, with
 * the [dkim] settings. Each error goes to report() as one line ("path:
 * why"); returns the number of errors, or -errno when the directory
 * itself cannot be read (reported too). */
int dkim_keyring_add_dir(struct dkim_keyring *kr, const struct dkim_config *defaults,
                         void (*report)(void *ctx, const char *what), void *ctx);
/* Sort for lookups, after the last add; a domain and selector given two
 * keys (a section and the key directory) is reported. Returns the number
 * of errors. */
int dkim_keyring_seal(struct dkim_keyring *kr, void (*report)(void *ctx, const char *what),
                      void *ctx);

unsigned dkim_keyring_count(const struct dkim_keyring *kr);
/* Whether a and b (sealed; NULL: no keyring) sign alike: the same
 * signers, by domain and selector, with the same settings and keys (a
 * key compared by its public half: a file replaced by a new key is a
 * change, the same key read again is not). */
bool dkim_keyring_same(const struct dkim_keyring *a, const struct dkim_keyring *b);
/* The mask of body canonicalizations some signer uses (for dkim_body_new). */
unsigned dkim_keyring_body_canons(const struct dkim_keyring *kr);
int dkim_keyring_signing_domain(const struct dkim_keyring *kr);
/* The signers for domain: its own, else its parent domains' (relaxed
 * DMARC alignment: news.example.com under example.com's key), else the
 * defaults ([dkim * SELECTOR]). Up to max, borrowed from kr. Returns how
 * many. */
unsigned dkim_keyring_lookup(const struct dkim_keyring *kr, const char *domain,
                             const struct dkim_signer **out, unsigned max);
/* The signer of exactly domain and selector, or NULL. */
const struct dkim_signer *dkim_keyring_find(const struct dkim_keyring *kr, const char *domain,
                                            const char *selector);

#endif
