/*
 * cache: client sessions per MX host, for resumption. A table of entries
 * keyed by the conn's cache key (case-insensitive: host names; common/
 * hash.h), each holding one reference to an SSL_SESSION and the host its
 * certificate verified for (and under which ctx's CA store), on a list in
 * order of use (common/lru.h); past max_entries the least recently used
 * goes. Sessions are OpenSSL's refcounted objects: a conn that resumes
 * one holds its own reference, so dropping an entry never pulls a
 * session from under a live connection.
 *
 * Threading: one cache per worker thread, used only there; no locks.
 */
#include "tls/tls_int.h"

#include "common/hash.h"
#include "common/lru.h"

#include <ctype.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

struct tls_cache_entry {
    struct hash_node node; /* in cache->by_key */
    struct lru_node use;   /* on cache->use, newest the last used */
    SSL_SESSION *sess;     /* owned: one reference */
    char *verified_host;   /* owned; NULL: the certificate did not verify */
    uint64_t trust_gen;    /* the ctx whose CA store verified it */
    char key[];            /* lowercase */
};

struct tls_cache {
    struct hash by_key; /* each entry owned through it */
    struct lru use;
    size_t max;
    uint64_t hits, misses, evictions;
};

static inline struct tls_cache_entry *
entry_of_node(const struct hash_node *n)
{
    return (struct tls_cache_entry *)((const char *)n - offsetof(struct tls_cache_entry, node));
}

static inline struct tls_cache_entry *
entry_of_use(struct lru_node *x)
{
    return (struct tls_cache_entry *)((char *)x - offsetof(struct tls_cache_entry, use));
}

static bool
entry_eq(const struct hash_node *n, const void *key)
{
    return strcasecmp(entry_of_node(n)->key, key) == 0;
}

int
tls_cache_new(unsigned max_entries, struct tls_cache **out)
{
    *out = NULL;
    struct tls_cache *cache = calloc(1, sizeof(*cache));
    if (cache == NULL)
        return -ENOMEM;
    hash_init(&cache->by_key, entry_eq, 16);
    lru_init(&cache->use);
    cache->max = max_entries;
    *out = cache;
    return 0;
}

static void
entry_free(struct tls_cache_entry *e)
{
    SSL_SESSION_free(e->sess);
    free(e->verified_host);
    free(e);
}

struct tls_cache *
tls_cache_free(struct tls_cache *cache)
{
    if (cache == NULL)
        return NULL;
    struct lru_node *x;
    while ((x = lru_oldest(&cache->use)) != NULL) {
        struct tls_cache_entry *e = entry_of_use(x);
        lru_remove(&cache->use, x);
        hash_remove(&cache->by_key, &e->node);
        entry_free(e);
    }
    hash_fini(&cache->by_key);
    free(cache);
    return NULL;
}

void
tls_cache_stats(const struct tls_cache *cache, struct tls_cache_stats *out)
{
    out->entries = hash_count(&cache->by_key);
    out->hits = cache->hits;
    out->misses = cache->misses;
    out->evictions = cache->evictions;
}

static struct tls_cache_entry *
cache_find(const struct tls_cache *cache, const char *key)
{
    struct hash_node *n = hash_find(&cache->by_key, hash_str_nocase(key), key);
    return n != NULL ? entry_of_node(n) : NULL;
}

/* Take e out of both structures and free it. */
static void
cache_drop(struct tls_cache *cache, struct tls_cache_entry *e)
{
    hash_remove(&cache->by_key, &e->node);
    lru_remove(&cache->use, &e->use);
    entry_free(e);
}

static bool
session_usable(SSL_SESSION *sess)
{
    /* OpenSSL would offer an expired session and the server would refuse
     * it: a wasted ticket in every ClientHello. */
    time_t now = time(NULL);
    long born = SSL_SESSION_get_time(sess);
    long life = SSL_SESSION_get_timeout(sess);
    return SSL_SESSION_is_resumable(sess) && (long long)now < (long long)born + life;
}

SSL_SESSION *
tls_cache_get(struct tls_cache *cache, const char *key, const char *host, uint64_t trust_gen,
              bool require_verified, bool *verified)
{
    *verified = false;
    struct tls_cache_entry *e = cache_find(cache, key);
    if (e == NULL) {
        cache->misses++;
        return NULL;
    }
    if (!session_usable(e->sess)) {
        cache_drop(cache, e);
        cache->evictions++;
        cache->misses++;
        return NULL;
    }
    bool vf = e->verified_host != NULL && host != NULL && e->trust_gen == trust_gen &&
              strcasecmp(e->verified_host, host) == 0;
    if (require_verified && !vf) {
        /* Kept: an opportunistic connection may still use it, and this
         * connection's full handshake will replace it if it verifies. */
        cache->misses++;
        return NULL;
    }
    lru_touch(&cache->use, &e->use);
    cache->hits++;
    *verified = vf;
    return e->sess;
}

int
tls_cache_put(struct tls_cache *cache, const char *key, SSL_SESSION *sess,
              const char *verified_host, uint64_t trust_gen)
{
    if (cache->max == 0)
        return -ENOSPC;
    char *vh = NULL;
    if (verified_host != NULL && (vh = strdup(verified_host)) == NULL)
        return -ENOMEM;
    struct tls_cache_entry *e = cache_find(cache, key);
    if (e != NULL) {
        /* A newer ticket for the same host replaces the older one. */
        SSL_SESSION_free(e->sess);
        free(e->verified_host);
        e->sess = sess;
        e->verified_host = vh;
        e->trust_gen = trust_gen;
        lru_touch(&cache->use, &e->use);
        return 0;
    }
    size_t klen = strlen(key);
    e = calloc(1, sizeof(*e) + klen + 1);
    if (e == NULL) {
        free(vh);
        return -ENOMEM;
    }
    for (size_t i = 0; i < klen; i++)
        e->key[i] = (char)tolower((unsigned char)key[i]);
    e->node.hash = hash_str_nocase(key);
    if (hash_insert(&cache->by_key, &e->node) < 0) {
        free(e);
        free(vh);
        return -ENOMEM;
    }
    e->sess = sess;
    e->verified_host = vh;
    e->trust_gen = trust_gen;
    lru_touch(&cache->use, &e->use);
    if (hash_count(&cache->by_key) > cache->max) {
        cache_drop(cache, entry_of_use(lru_oldest(&cache->use)));
        cache->evictions++;
    }
    return 0;
}

void
tls_cache_remove(struct tls_cache *cache, const char *key, const SSL_SESSION *sess)
{
    struct tls_cache_entry *e = cache_find(cache, key);
    if (e != NULL && e->sess == sess)
        cache_drop(cache, e);
}
