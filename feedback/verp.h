/*
 * verp: the envelope sender that ties a bounce back to what caused it.
 * With VERP on, each recipient's transaction goes out with
 *
 *     MAIL FROM:<PREFIX TOKEN@VERP_DOMAIN>      e.g. bounce-ab2c...@bounces.example.com
 *
 * where TOKEN is base32 (RFC 4648 alphabet, lowercase, no padding) of
 *
 *     version (1) | message id (8, big-endian) | recipient index (2) |
 *     recipient tag (4) | tenant length (1) | tenant (0..VERP_TENANT_MAX) |
 *     MAC (VERP_MAC_LEN)
 *
 * or, for a tenant whose name is longer than VERP_TENANT_MAX, the octet
 * VERP_TENANT_TAGGED in place of the length and the tenant's tag (4: the
 * first octets of HMAC-SHA256 under the key of "sluice-verp-tenant" and
 * the lowercased name) in place of the name; the bounce listener finds
 * the tenant among the configured ones by that tag (verp_tenant_tag).
 *
 * MAC is HMAC-SHA256 under the configured key over "sluice-verp" and
 * every octet before it, truncated to VERP_MAC_LEN octets (80 bits: a
 * forger needs 2^79 tries on average, each one an SMTP transaction). The
 * recipient tag is the first 4 octets of HMAC-SHA256 under the same key of
 * the recipient's address (lowercased): the token does not show the
 * address, yet says whether the address a bounce names is the one the
 * token was made for (verp_rcpt_matches), so a replayed token cannot make
 * sluice suppress some other address.
 * Decoding is case-insensitive (some MTAs fold local parts) and compares
 * the MAC in constant time; anything altered, cut or forged is refused.
 * A tenant with octets outside [A-Za-z0-9._-] is left out of the token
 * (the delivery log ties the message id to it anyway); the local part
 * stays within RFC 5321's 64.
 *
 * Threading: pure functions (OpenSSL's HMAC is thread-safe); any thread.
 */
#ifndef SLUICE_FEEDBACK_VERP_H
#define SLUICE_FEEDBACK_VERP_H

#include <stddef.h>
#include <stdint.h>

#define VERP_KEY_MIN    16  /* octets of key at least */
#define VERP_KEY_MAX    128
#define VERP_TENANT_MAX 8
#define VERP_MAC_LEN    10
#define VERP_TENANT_TAGGED 0xff /* the tenant length octet of a tagged tenant */
#define VERP_PREFIX_MAX 9 /* "bounce-" and a token of 55 fit in 64 */
/* the longest token: base32 of 1 + 8 + 2 + 4 + 1 + 8 + 10 = 34 octets */
#define VERP_TOKEN_MAX 55

#define VERP_EFORMAT (-1001) /* not a token: wrong length, alphabet or version */
#define VERP_EMAC    (-1002) /* a token whose MAC does not verify: forged or altered */

struct verp_ref {
    uint64_t msg_id;
    unsigned rcpt_index;
    char tenant[VERP_TENANT_MAX + 1]; /* "" when none, or when tenant_tag names it */
    uint32_t tenant_tag;              /* non-zero with tenant "": a longer tenant's tag
                                       * (verp_tenant_tag) */
    uint32_t rcpt_tag;                /* verp_token() sets it from the address */
};

/* "not a VERP token", "forged or altered token", or strerror's. */
const char *verp_strerror(int rc);

/* Write the token for ref and the recipient's address rcpt into out (cap
 * >= VERP_TOKEN_MAX + 1 to be safe). Returns its length, or -ENOSPC /
 * -EINVAL (key too short) / -EIO. */
int verp_token(const uint8_t *key, size_t keylen, const struct verp_ref *ref, const char *rcpt,
               char *out, size_t cap);

/* The tag of tenant name (any case) under key; never 0 (0 becomes 1). */
uint32_t verp_tenant_tag(const uint8_t *key, size_t keylen, const char *name);

/* Whether addr (any case) is the recipient ref's token was made for. */
int verp_rcpt_matches(const uint8_t *key, size_t keylen, const struct verp_ref *ref,
                      const char *addr);

/* Read token[0..len) back. Returns 0 and *ref, VERP_EFORMAT, VERP_EMAC,
 * or -EINVAL (key too short) / -EIO. */
int verp_parse(const uint8_t *key, size_t keylen, const char *token, size_t len,
               struct verp_ref *ref);

/* The whole address "<prefix><token>@<domain>" into out. Returns its
 * length or a negative code as verp_token(). */
int verp_address(const uint8_t *key, size_t keylen, const char *prefix, const char *domain,
                 const struct verp_ref *ref, const char *rcpt, char *out, size_t cap);

/* Load a key: a file holding at least VERP_KEY_MIN octets (its first
 * line, as written: `openssl rand -hex 32 > verp.key` makes one).
 * Returns the key's length or -errno / -EINVAL with a message in err. */
int verp_key_load(const char *path, uint8_t *key, size_t cap, char *err, size_t errlen);

#endif
