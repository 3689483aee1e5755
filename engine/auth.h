/*
 * auth: SMTP AUTH for the submission server. A users file ("user:crypt
 * hash[:domain,domain,<>,tenant=T,pool=P]" per line) is loaded into an immutable,
 * refcounted table (a reload builds a new one; sessions keep the one they
 * started with). Passwords are checked with crypt(3) (yescrypt, bcrypt,
 * SHA-512 crypt, ... whatever libcrypt knows).
 *
 * A check is an attempt in three steps, so that the hashing runs off the
 * worker loops (auth_pool.h): auth_attempt_start() on the worker looks the
 * user up and tries the cache; auth_attempt_hash() runs crypt(3) on any
 * thread; auth_attempt_finish() on the worker reads the result and caches a
 * success.
 *
 * An unknown name costs what a known one costs: it is hashed with the
 * setting (scheme, cost and salt) of a user picked from the table by a
 * keyed hash of the name. The same unknown name always runs the same
 * setting, as a known name does, and unknown names run each setting as
 * often as known names do: whatever schemes the file mixes, the time of an
 * attempt is drawn from the same distribution for both. (A dummy of the
 * dearest setting instead would make every fast user stand out.)
 *
 * crypt() with a strong hash costs milliseconds of CPU, and applications
 * authenticate on every connection; each worker therefore keeps a small
 * cache of credentials it has verified (SHA-256 of user and password, never
 * the password), valid for the table it was verified against.
 *
 * Threading: a table is read-only once loaded: any thread. A cache belongs
 * to one worker. An attempt belongs to whoever holds it: its owner, then
 * the hashing thread, then its owner again.
 */
#ifndef SLUICE_ENGINE_AUTH_H
#define SLUICE_ENGINE_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define AUTH_NAME_MAX 255
#define AUTH_PASS_MAX 1024

struct auth_db;

/* Hash schemes, for the counters of hashes run (and the choice of nothing:
 * the stand-in for an unknown name is picked by user, not by scheme). */
enum auth_scheme {
    AUTH_SCHEME_YESCRYPT,
    AUTH_SCHEME_GOST_YESCRYPT,
    AUTH_SCHEME_SCRYPT,
    AUTH_SCHEME_BCRYPT,
    AUTH_SCHEME_SHA512,
    AUTH_SCHEME_SHA256,
    AUTH_SCHEME_MD5,
    AUTH_SCHEME_OTHER,
    AUTH_SCHEME_COUNT
};

/* "yescrypt", "bcrypt", "sha512crypt", ...: names for stats. */
const char *auth_scheme_str(enum auth_scheme s);
/* The scheme of a crypt(3) hash, from its prefix. */
enum auth_scheme auth_scheme_of(const char *hash);

struct auth_user {
    char *name;     /* owned */
    char *hash;     /* owned: crypt(3) hash */
    char **domains; /* owned: sender domains this user may use; NULL: any */
    unsigned ndomains;
    bool null_sender; /* may use MAIL FROM:<> (always when domains is NULL; else
                       * when the list holds "<>") */
    char *tenant;     /* owned: tenant= of its line (the tenant of its messages); NULL: none */
    char *pool;       /* owned: pool= of its line (the pool of its messages); NULL: none */
    uint8_t scheme;   /* enum auth_scheme of hash */
};

/* Load path. Errors are written to errs, one per line as "file:line:
 * what" (a bad line is an error, not skipped). Returns 0 and *out with
 * one reference, or -EINVAL / -errno. */
int auth_db_load(const char *path, struct auth_db **out, FILE *errs);
struct auth_db *auth_db_ref(struct auth_db *db);
/* Drop a reference; the last frees. Returns NULL. */
struct auth_db *auth_db_unref(struct auth_db *db);
unsigned auth_db_count(const struct auth_db *db);
/* User i (0 .. auth_db_count - 1), in name order. Borrowed: lives as
 * long as db. */
const struct auth_user *auth_db_user(const struct auth_db *db, unsigned i);

#define AUTH_CACHE_SLOTS 512

struct auth_cache {
    struct {
        uint64_t gen; /* generation of the table that verified it (0: empty): tables
                       * are freed and their addresses reused, generations never */
        uint8_t key[32];
        const struct auth_user *user; /* borrowed: lives as long as db */
    } slot[AUTH_CACHE_SLOTS];
    uint64_t hits, misses;
};

void auth_cache_init(struct auth_cache *c);

/* One password check. Fixed size: a session embeds one. */
struct auth_attempt {
    const struct auth_user *user; /* borrowed: lives as long as the table; NULL: unknown name */
    const char *setting;          /* borrowed, likewise: the hash crypt(3) runs with */
    uint64_t gen;                 /* the table's */
    uint8_t key[32];              /* the cache key: SHA-256(user NUL pass) */
    uint8_t scheme;               /* enum auth_scheme of setting */
    bool match;                   /* set by auth_attempt_hash */
    char name[AUTH_NAME_MAX + 1]; /* as given, NUL-terminated */
    size_t pass_len;
    char pass[AUTH_PASS_MAX + 1]; /* wiped by auth_attempt_hash (and on any refusal) */
};

enum auth_start {
    AUTH_START_INVALID, /* malformed (empty or long name, NUL, ...): a failure, nothing to hash */
    AUTH_START_CACHED,  /* verified from the cache: *out is the user */
    AUTH_START_HASH,    /* run auth_attempt_hash(), then auth_attempt_finish() */
};

/* Prepare a check of user and password against db (which must stay
 * referenced until auth_attempt_finish). Worker thread (the cache's). */
enum auth_start auth_attempt_start(const struct auth_db *db, struct auth_cache *cache,
                                   const char *user, size_t user_len, const char *pass,
                                   size_t pass_len, struct auth_attempt *a,
                                   const struct auth_user **out);
/* Run crypt(3): any thread. scratch is a struct crypt_data of the calling
 * thread (auth_crypt_scratch_new). Sets a->match and wipes the password. */
void auth_attempt_hash(struct auth_attempt *a, void *scratch);
/* The user when the password matched (borrowed: lives as long as the
 * table), else NULL; never says whether the user exists. A success is
 * cached. The cache's thread. */
const struct auth_user *auth_attempt_finish(struct auth_cache *cache, struct auth_attempt *a);

/* Per-thread crypt(3) scratch (large: a struct crypt_data); free() it. */
void *auth_crypt_scratch_new(void);

/* All three steps on the calling thread, for tools and tests. */
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
