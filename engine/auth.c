/*
 * auth: see auth.h. The table is an array sorted by name (binary search);
 * it is rebuilt whole on reload, never changed in place. The key that picks
 * an unknown name's stand-in is a digest of the table itself: it stays the
 * same across restarts (an unknown name keeps its cost, as a known one
 * does) and cannot be computed without the file.
 */
#include "engine/auth.h"
#include "engine/config.h"

#include <crypt.h>
#include <ctype.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/base64.h"

static _Atomic uint64_t auth_generation;

struct auth_db {
    _Atomic unsigned refs;
    uint64_t gen;            /* unique for the process's life: keys the caches */
    struct auth_user *users; /* owned, sorted by name */
    unsigned n;
    uint8_t standin_key[32]; /* SHA-256 of every name and hash: picks an unknown
                              * name's stand-in */
};

static const char *const scheme_names[AUTH_SCHEME_COUNT] = {
    "yescrypt", "gost_yescrypt", "scrypt", "bcrypt", "sha512crypt", "sha256crypt", "md5crypt",
    "other",
};

const char *
auth_scheme_str(enum auth_scheme s)
{
    return (unsigned)s < AUTH_SCHEME_COUNT ? scheme_names[s] : "other";
}

enum auth_scheme
auth_scheme_of(const char *h)
{
    static const struct {
        const char *prefix;
        enum auth_scheme s;
    } tab[] = {
        {"$y$", AUTH_SCHEME_YESCRYPT}, {"$gy$", AUTH_SCHEME_GOST_YESCRYPT},
        {"$7$", AUTH_SCHEME_SCRYPT},   {"$2b$", AUTH_SCHEME_BCRYPT},
        {"$2a$", AUTH_SCHEME_BCRYPT},  {"$2y$", AUTH_SCHEME_BCRYPT},
        {"$6$", AUTH_SCHEME_SHA512},   {"$5$", AUTH_SCHEME_SHA256},
        {"$1$", AUTH_SCHEME_MD5},
    };
    for (size_t i = 0; i < sizeof(tab) / sizeof(tab[0]); i++)
        if (strncmp(h, tab[i].prefix, strlen(tab[i].prefix)) == 0)
            return tab[i].s;
    return AUTH_SCHEME_OTHER;
}

static int
cmp_user(const void *a, const void *b)
{
    return strcmp(((const struct auth_user *)a)->name, ((const struct auth_user *)b)->name);
}

static void
user_free(struct auth_user *u)
{
    free(u->name);
    free(u->hash);
    for (unsigned i = 0; i < u->ndomains; i++)
        free(u->domains[i]);
    free(u->domains);
    free(u->tenant);
    free(u->pool);
}


/* "example.com, example.org, <>, tenant=acme, pool=bulk": "<>" allows
 * the null sender; tenant= and pool= say who the user's messages belong
 * to. Returns 0, -ENOMEM, or -EINVAL with *bad at the item. */
static int
parse_domains(struct auth_user *u, char *list, const char **bad)
{
    for (char *save = NULL, *d = strtok_r(list, ", \t", &save); d != NULL;
         d = strtok_r(NULL, ", \t", &save)) {
        if (strcmp(d, "<>") == 0) {
            u->null_sender = true;
            continue;
        }
        char *eq = strchr(d, '=');
        if (eq != NULL) {
            char **field = strncmp(d, "tenant=", 7) == 0 ? &u->tenant
                           : strncmp(d, "pool=", 5) == 0 ? &u->pool
                                                         : NULL;
            if (field == NULL || *field != NULL || !config_name_valid(eq + 1, strlen(eq + 1))) {
                *bad = d;
                return -EINVAL;
            }
            if ((*field = strdup(eq + 1)) == NULL)
                return -ENOMEM;
            continue;
        }
        char **v = realloc(u->domains, sizeof(*v) * (u->ndomains + 1));
        if (v == NULL)
            return -ENOMEM;
        u->domains = v;
        for (char *c = d; *c; c++)
            *c = (char)tolower((unsigned char)*c);
        if ((u->domains[u->ndomains] = strdup(d)) == NULL)
            return -ENOMEM;
        u->ndomains++;
    }
    return 0;
}

int
auth_db_load(const char *path, struct auth_db **out, FILE *errs)
{
    *out = NULL;
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        int err = errno;
        fprintf(errs, "%s: cannot read: %s\n", path, strerror(err));
        return -err;
    }
    struct auth_db *db = calloc(1, sizeof(*db));
    if (db == NULL) {
        fclose(f);
        return -ENOMEM;
    }
    atomic_init(&db->refs, 1);
    db->gen = atomic_fetch_add(&auth_generation, 1) + 1;
    unsigned cap = 0, lineno = 0, nerr = 0;
    char *line = NULL;
    size_t linecap = 0;
    ssize_t len;
    while ((len = getline(&line, &linecap, f)) >= 0) {
        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '\0' || *p == '#')
            continue;
        char *save = NULL;
        char *name = strtok_r(p, ":", &save);
        char *hash = strtok_r(NULL, ":", &save);
        char *domains = strtok_r(NULL, "", &save);
        if (name == NULL || hash == NULL || *name == '\0') {
            fprintf(errs, "%s:%u: expected user:hash[:domain,...,tenant=T,pool=P]\n", path,
                    lineno);
            nerr++;
            continue;
        }
        int ok = crypt_checksalt(hash);
        if (hash[0] != '$' || (ok != CRYPT_SALT_OK && ok != CRYPT_SALT_METHOD_LEGACY)) {
            fprintf(errs, "%s:%u: %s: not a crypt(3) hash this system supports "
                          "(use e.g. mkpasswd -m yescrypt)\n",
                    path, lineno, name);
            nerr++;
            continue;
        }
        if (db->n == cap) {
            cap = cap ? cap * 2 : 16;
            struct auth_user *v = realloc(db->users, sizeof(*v) * cap);
            if (v == NULL) {
                nerr++;
                break;
            }
            db->users = v;
        }
        struct auth_user *u = &db->users[db->n++];
        memset(u, 0, sizeof(*u));
        u->name = strdup(name);
        u->hash = strdup(hash);
        u->scheme = (uint8_t)auth_scheme_of(hash);
        const char *bad = NULL;
        int prc = u->name == NULL || u->hash == NULL ? -ENOMEM
                  : domains                          ? parse_domains(u, domains, &bad)
                                                     : 0;
        if (prc == -EINVAL) {
            fprintf(errs, "%s:%u: %s: \"%s\": tenant= and pool= once each, with a name of 1 "
                          "to 64 of A-Z a-z 0-9 . _ -\n",
                    path, lineno, u->name, bad);
            nerr++;
            continue;
        }
        if (prc < 0) {
            fprintf(errs, "%s:%u: out of memory\n", path, lineno);
            nerr++;
            continue;
        }
        if (strlen(u->name) > AUTH_NAME_MAX) {
            fprintf(errs, "%s:%u: user name longer than %d octets\n", path, lineno,
                    AUTH_NAME_MAX);
            nerr++;
        }
        if (u->domains == NULL) {
            if (u->null_sender) {
                fprintf(errs, "%s:%u: %s: \"<>\" needs sender domains beside it (a user "
                              "without a domain list may use any sender, <> included)\n",
                        path, lineno, u->name);
                nerr++;
            }
            u->null_sender = true;
        }
    }
    free(line);
    fclose(f);
    if (db->n > 1) {
        qsort(db->users, db->n, sizeof(*db->users), cmp_user);
        for (unsigned i = 1; i < db->n; i++)
            if (strcmp(db->users[i - 1].name, db->users[i].name) == 0) {
                fprintf(errs, "%s: user %s is listed twice\n", path, db->users[i].name);
                nerr++;
            }
    }
    if (nerr != 0) {
        auth_db_unref(db);
        return -EINVAL;
    }
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md != NULL && EVP_DigestInit_ex(md, EVP_sha256(), NULL);
    for (unsigned i = 0; ok && i < db->n; i++)
        ok = EVP_DigestUpdate(md, db->users[i].name, strlen(db->users[i].name) + 1) &&
             EVP_DigestUpdate(md, db->users[i].hash, strlen(db->users[i].hash) + 1);
    ok = ok && EVP_DigestFinal_ex(md, db->standin_key, NULL);
    EVP_MD_CTX_free(md);
    if (!ok) {
        fprintf(errs, "%s: cannot compute SHA-256 (OpenSSL)\n", path);
        auth_db_unref(db);
        return -ENOMEM;
    }
    *out = db;
    return 0;
}

struct auth_db *
auth_db_ref(struct auth_db *db)
{
    atomic_fetch_add(&db->refs, 1);
    return db;
}

struct auth_db *
auth_db_unref(struct auth_db *db)
{
    if (db == NULL || atomic_fetch_sub(&db->refs, 1) != 1)
        return NULL;
    for (unsigned i = 0; i < db->n; i++)
        user_free(&db->users[i]);
    free(db->users);
    free(db);
    return NULL;
}

unsigned
auth_db_count(const struct auth_db *db)
{
    return db->n;
}

const struct auth_user *
auth_db_user(const struct auth_db *db, unsigned i)
{
    return i < db->n ? &db->users[i] : NULL;
}

void
auth_cache_init(struct auth_cache *c)
{
    memset(c, 0, sizeof(*c));
}

void *
auth_crypt_scratch_new(void)
{
    return calloc(1, sizeof(struct crypt_data));
}

static const struct auth_user *
find_user(const struct auth_db *db, const char *name, size_t len)
{
    size_t lo = 0, hi = db->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const char *n = db->users[mid].name;
        int c = strncmp(name, n, len);
        if (c == 0 && n[len] != '\0')
            c = -1; /* name is a prefix of n: sorts before it */
        if (c == 0)
            return &db->users[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

/* SHA-256 of the parts; false when OpenSSL fails. */
static bool
sha256_parts(uint8_t out[32], const void *a, size_t alen, const void *b, size_t blen,
             const void *c, size_t clen)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md != NULL && EVP_DigestInit_ex(md, EVP_sha256(), NULL) &&
              EVP_DigestUpdate(md, a, alen) && EVP_DigestUpdate(md, b, blen) &&
              EVP_DigestUpdate(md, c, clen) && EVP_DigestFinal_ex(md, out, NULL);
    EVP_MD_CTX_free(md);
    return ok;
}

/* The user whose setting an unknown name runs: fixed per name and table. */
static const struct auth_user *
standin(const struct auth_db *db, const char *name, size_t len)
{
    uint8_t d[32];
    if (!sha256_parts(d, db->standin_key, sizeof(db->standin_key), name, len, "", 0))
        return &db->users[0];
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | d[i];
    return &db->users[v % db->n];
}

enum auth_start
auth_attempt_start(const struct auth_db *db, struct auth_cache *cache, const char *user,
                   size_t user_len, const char *pass, size_t pass_len, struct auth_attempt *a,
                   const struct auth_user **out)
{
    *out = NULL;
    a->user = NULL;
    a->setting = NULL;
    a->match = false;
    a->pass_len = 0;
    if (db == NULL || db->n == 0 || user_len == 0 || user_len > AUTH_NAME_MAX ||
        pass_len > AUTH_PASS_MAX || memchr(user, '\0', user_len) != NULL ||
        memchr(pass, '\0', pass_len) != NULL)
        return AUTH_START_INVALID;
    memcpy(a->name, user, user_len);
    a->name[user_len] = '\0';
    /* key = SHA-256(user NUL pass): the cache never holds a password. */
    if (!sha256_parts(a->key, user, user_len, "", 1, pass, pass_len))
        return AUTH_START_INVALID;
    a->gen = db->gen;
    unsigned slot = (unsigned)(a->key[0] | a->key[1] << 8) % AUTH_CACHE_SLOTS;
    if (cache->slot[slot].gen == db->gen &&
        CRYPTO_memcmp(cache->slot[slot].key, a->key, 32) == 0) {
        cache->hits++;
        *out = cache->slot[slot].user;
        return AUTH_START_CACHED;
    }
    cache->misses++;
    a->user = find_user(db, user, user_len);
    const struct auth_user *run = a->user ? a->user : standin(db, user, user_len);
    a->setting = run->hash;
    a->scheme = run->scheme;
    memcpy(a->pass, pass, pass_len);
    a->pass[pass_len] = '\0';
    a->pass_len = pass_len;
    return AUTH_START_HASH;
}

void
auth_attempt_hash(struct auth_attempt *a, void *scratch)
{
    struct crypt_data *cd = scratch;
    const char *out = crypt_rn(a->pass, a->setting, cd, sizeof(*cd));
    OPENSSL_cleanse(a->pass, sizeof(a->pass));
    a->pass_len = 0;
    size_t hl = strlen(a->setting);
    a->match = out != NULL && a->user != NULL && strlen(out) == hl &&
               CRYPTO_memcmp(out, a->setting, hl) == 0;
    OPENSSL_cleanse(cd, sizeof(*cd));
}

const struct auth_user *
auth_attempt_finish(struct auth_cache *cache, struct auth_attempt *a)
{
    OPENSSL_cleanse(a->pass, sizeof(a->pass)); /* in case it never reached the hash */
    if (!a->match || a->user == NULL)
        return NULL;
    unsigned slot = (unsigned)(a->key[0] | a->key[1] << 8) % AUTH_CACHE_SLOTS;
    cache->slot[slot].gen = a->gen;
    memcpy(cache->slot[slot].key, a->key, 32);
    cache->slot[slot].user = a->user;
    return a->user;
}

const struct auth_user *
auth_verify(const struct auth_db *db, struct auth_cache *cache, const char *user,
            size_t user_len, const char *pass, size_t pass_len)
{
    struct auth_attempt *a = malloc(sizeof(*a));
    if (a == NULL)
        return NULL;
    const struct auth_user *u = NULL;
    if (auth_attempt_start(db, cache, user, user_len, pass, pass_len, a, &u) ==
        AUTH_START_HASH) {
        void *scratch = auth_crypt_scratch_new();
        if (scratch != NULL)
            auth_attempt_hash(a, scratch);
        free(scratch);
        u = auth_attempt_finish(cache, a);
    }
    OPENSSL_cleanse(a, sizeof(*a));
    free(a);
    return u;
}

bool
auth_user_may_send_as(const struct auth_user *u, const char *domain, size_t len)
{
    if (u->domains == NULL)
        return true;
    for (unsigned i = 0; i < u->ndomains; i++)
        if (strlen(u->domains[i]) == len && strncasecmp(u->domains[i], domain, len) == 0)
            return true;
    return false;
}

long
auth_b64_decode(const char *in, size_t len, char *out, size_t cap)
{
    if (len % 4 != 0)
        return -1;
    size_t o = 0;
    for (size_t i = 0; i < len; i += 4) {
        int v[4];
        int pad = 0;
        for (int j = 0; j < 4; j++) {
            unsigned char c = (unsigned char)in[i + j];
            if (c == '=' && i + 4 == len && j >= 2) {
                v[j] = 0;
                pad++;
                continue;
            }
            if (pad != 0 || (v[j] = base64_value(c)) < 0)
                return -1;
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 |
                     (uint32_t)v[3];
        size_t n = 3 - (size_t)pad;
        if (o + n > cap)
            return -1;
        out[o++] = (char)(w >> 16);
        if (n > 1)
            out[o++] = (char)(w >> 8);
        if (n > 2)
            out[o++] = (char)w;
    }
    return (long)o;
}

size_t
auth_b64_encode(const char *in, size_t len, char *out, size_t cap)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len && o + 5 <= cap; i += 3) {
        uint32_t w = (uint32_t)(unsigned char)in[i] << 16;
        if (i + 1 < len)
            w |= (uint32_t)(unsigned char)in[i + 1] << 8;
        if (i + 2 < len)
            w |= (uint32_t)(unsigned char)in[i + 2];
        out[o++] = tab[w >> 18 & 63];
        out[o++] = tab[w >> 12 & 63];
        out[o++] = i + 1 < len ? tab[w >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? tab[w & 63] : '=';
    }
    if (o < cap)
        out[o] = '\0';
    return o;
}

int
auth_plain_split(const char *buf, size_t len, const char **user, size_t *user_len,
                 const char **pass, size_t *pass_len)
{
    const char *nul1 = memchr(buf, '\0', len);
    if (nul1 == NULL)
        return -1;
    const char *u = nul1 + 1;
    const char *nul2 = memchr(u, '\0', len - (size_t)(u - buf));
    if (nul2 == NULL)
        return -1;
    size_t authz_len = (size_t)(nul1 - buf);
    *user = u;
    *user_len = (size_t)(nul2 - u);
    *pass = nul2 + 1;
    *pass_len = len - (size_t)(*pass - buf);
    if (memchr(*pass, '\0', *pass_len) != NULL)
        return -1;
    /* An authorization identity other than the user (proxy auth) is not
     * offered. */
    if (authz_len != 0 && (authz_len != *user_len || memcmp(buf, u, authz_len) != 0))
        return -1;
    return 0;
}
