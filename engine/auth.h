/*
 * auth: SMTP AUTH for the submission server. A users file ("user:crypt
 * hash[:domain,domain]" per line) is loaded into an immutable, refcounted
 * table (a reload builds a new one; sessions keep the one they started
 * with). Passwords are checked with crypt(3) (yescrypt, SHA-512 crypt, ...
 * whatever libcrypt knows). An unknown user costs the same crypt() as a
 * wrong password, so reply and timing do not tell them apart.
 *
 * crypt() with a strong hash costs milliseconds of CPU, and applications
 * authenticate on every connection; each worker therefore keeps a small
 * cache of credentials it has verified (SHA-256 of user and password, never
 * the password), valid for the table it was verified against.
 *
 * Threading: a table is read-only once loaded: any thread. A cache belongs
 * to one worker.
 */
#ifndef SLUICE_ENGINE_AUTH_H
#define SLUICE_ENGINE_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

struct auth_db;

struct auth_user {
    char *name;     /* owned */
    char *hash;     /* owned: crypt(3) hash */
    char **domains; /* owned: sender domains this user may use; NULL: any */
    unsigned ndomains;
};

/* Load path. Errors are written to errs, one per line as "file:line:
 * what" (a bad line is an error, not skipped). Returns 0 and *out with
 * one reference, or -EINVAL / -errno. */
int auth_db_load(const char *path, struct auth_db **out, FILE *errs);
struct auth_db *auth_db_ref(struct auth_db *db);
/* Drop a reference; the last frees. Returns NULL. */
struct auth_db *auth_db_unref(struct auth_db *db);
unsigned auth_db_count(const struct auth_db *db);

#define AUTH_CACHE_SLOTS 512

struct auth_cache {
    struct {
        uint64_t gen; /* generation of the table that verified it (0: empty): tables
                       * are freed and their addresses reused, generations never */
        uint8_t key[32];
        const struct auth_user *user; /* borrowed: lives as long as db */
    } slot[AUTH_CACHE_SLOTS];
    void *crypt_scratch; /* owned: struct crypt_data, too large for the stack */
    uint64_t hits, misses;
};

int auth_cache_init(struct auth_cache *c);
void auth_cache_fini(struct auth_cache *c);

/* Check user and password against db. Returns the user (borrowed: lives as
 * long as db) or NULL; never says whether the user exists. */
const struct auth_user *auth_verify(const struct auth_db *db, struct auth_cache *cache,
                                    const char *user, size_t user_len, const char *pass,
                                    size_t pass_len);

/* May u send with a sender address in domain (case-insensitive)? */
bool auth_user_may_send_as(const struct auth_user *u, const char *domain, size_t len);

/* Strict base64 (RFC 4648, padding required, no blanks). Returns the
 * decoded length, or -1 for invalid input or when out (cap) is too small. */
long auth_b64_decode(const char *in, size_t len, char *out, size_t cap);
/* Encode; returns the length written (cap must be >= 4 * ceil(len / 3) + 1). */
size_t auth_b64_encode(const char *in, size_t len, char *out, size_t cap);

/* Split a decoded SASL PLAIN response "authzid NUL user NUL pass". The
 * spans point into buf. Returns 0 or -1 when malformed or when an authzid
 * other than the user itself is asked for. */
int auth_plain_split(const char *buf, size_t len, const char **user, size_t *user_len,
                     const char **pass, size_t *pass_len);

#endif
