/*
 * dkim_int: what the files of dkim/ share and nothing else sees.
 */
#ifndef SLUICE_DKIM_DKIM_INT_H
#define SLUICE_DKIM_DKIM_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dkim/dkim.h"

/* One header field: p[0..len) with its continuation lines and CRLF. */
struct dkim_field {
    const char *p;   /* borrowed: lives as long as the header section */
    size_t len;
    size_t name_len; /* without blanks before the colon */
    bool used;       /* already signed (h= takes fields bottom-up) */
};

/* Split a header section into fields, keeping those named in
 * names[0..nnames) (lowercase; NULL: every field): the memory is that of
 * the fields kept, whatever the number of the others. *out (free())
 * borrows hdr. Returns 0, DKIM_EHEADER (a line that is not a field, kept
 * or not) or -ENOMEM. */
int dkim_fields_split(const char *hdr, size_t len, const char *const *names, unsigned nnames,
                      struct dkim_field **out, size_t *nout);

/* Sign the SHA-256 hash of the header data: RSASSA-PKCS1-v1_5 with SHA-256,
 * or Ed25519 over the hash (RFC 8463). *sig is malloc'd (free()). */
int dkim_key_sign(const struct dkim_key *k, const uint8_t hash[DKIM_HASH_LEN], char **sig,
                  size_t *siglen);

/* Whether a and b hold the same key (their public halves compared). */
bool dkim_key_same(const struct dkim_key *a, const struct dkim_key *b);

/* SHA-256, fetched once with the key. */
struct evp_md_st;
const struct evp_md_st *dkim_key_md(const struct dkim_key *k);

/* Base64 of in[0..n) into out (NUL-terminated). Returns its length or
 * DKIM_ETOOBIG. */
int dkim_b64(const uint8_t *in, size_t n, char *out, size_t cap);

#endif
