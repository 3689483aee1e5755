/*
 * cache: client sessions per MX host, for resumption. A hash table of
 * entries keyed by the conn's cache key (case-insensitive: host names),
 * each holding one reference to an SSL_SESSION and the host its
 * certificate verified for (and under which ctx's CA store), on a list in
 * order of use; past max_entries
 * the least recently used goes. Sessions are OpenSSL's refcounted objects:
 * a conn that resumes one holds its own reference, so dropping an entry
 * never pulls a session from under a live connection.
 *
 * Threading: one cache per worker thread, used only there; no locks.
 */
#include "tls/tls_int.h"

#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

struct tls_cache_entry {
    struct tls_cache_entry *chain; /* borrowed: next in the same bucket */
    struct tls_cache_entry *newer; /* borrowed: use order, toward cache->newest */
    struct tls_cache_entry *older; /* borrowed: use order, toward cache->oldest */
    SSL_SESSION *sess;             /* owned: one reference */
    char *verified_host;           /* owned; NULL: the certificate did not verify */
    uint64_t trust_gen;            /* the ctx whose CA store verified it */
    uint64_t hash;
    char key[]; /* lowercase */
};

struct tls_cache {
    struct tls_cache_entry **buckets; /* owned; each entry owned through its bucket */
    size_t nbuckets;                  /* a power of two */
    size_t count;
    size_t max;
    struct tls_cache_entry *newest; /* borrowed */
    struct tls_cache_entry *oldest; /* borrowed */
    uint64_t hits, misses, evictions;
};

static uint64_t
cache_hash(const char *key)
{
    /* FNV-1a over the lowercased key: keys are a few host names per
     * domain, not chosen by an attacker in any useful way. */
    uint64_t h = 14695981039346656037ULL;
    for (const unsigned char *p = (const unsigned char *)key; *p != '\0'; p++) {
        h ^= (uint64_t)tolower(*p);
        h *= 1099511628211ULL;
    }
    return h;
}

int
tls_cache_new(unsigned max_entries, struct tls_cache **out)
{
    *out = NULL;
    struct tls_cache *cache = calloc(1, sizeof(*cache));
    if (cache == NULL)
        return -ENOMEM;
    size_t n = 16;
    while (n < max_entries)
        n <<= 1;
    cache->buckets = calloc(n, sizeof(*cache->buckets));
    if (cache->buckets == NULL) {
        free(cache);
        return -ENOMEM;
    }
    cache->nbuckets = n;
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
    struct tls_cache_entry *e = cache->newest;
    while (e != NULL) {
        struct tls_cache_entry *next = e->older;
        entry_free(e);
        e = next;
    }
    free(cache->buckets);
    free(cache);
    return NULL;
}

void
tls_cache_stats(const struct tls_cache *cache, struct tls_cache_stats *out)
{
    out->entries = cache->count;
    out->hits = cache->hits;
    out->misses = cache->misses;
    out->evictions = cache->evictions;
}

static struct tls_cache_entry **
cache_slot(struct tls_cache *cache, const char *key, uint64_t hash)
{
    struct tls_cache_entry **p = &cache->buckets[hash & (cache->nbuckets - 1)];
    while (*p != NULL && ((*p)->hash != hash || strcasecmp((*p)->key, key) != 0))
        p = &(*p)->chain;
    return p;
}

static void
lru_unlink(struct tls_cache *cache, struct tls_cache_entry *e)
{
    if (e->newer != NULL)
        e->newer->older = e->older;
    else
        cache->newest = e->older;
    if (e->older != NULL)
        e->older->newer = e->newer;
    else
        cache->oldest = e->newer;
    e->newer = e->older = NULL;
}

static void
lru_push(struct tls_cache *cache, struct tls_cache_entry *e)
{
    e->newer = NULL;
    e->older = cache->newest;
    if (cache->newest != NULL)
        cache->newest->newer = e;
    cache->newest = e;
    if (cache->oldest == NULL)
        cache->oldest = e;
}

/* Unlink the entry at *slot from both structures and free it. */
static void
cache_drop(struct tls_cache *cache, struct tls_cache_entry **slot)
{
    struct tls_cache_entry *e = *slot;
    *slot = e->chain;
    lru_unlink(cache, e);
    cache->count--;
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
    uint64_t hash = cache_hash(key);
    struct tls_cache_entry **slot = cache_slot(cache, key, hash);
    struct tls_cache_entry *e = *slot;
    if (e == NULL) {
        cache->misses++;
        return NULL;
    }
    if (!session_usable(e->sess)) {
        cache_drop(cache, slot);
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
    lru_unlink(cache, e);
    lru_push(cache, e);
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
    uint64_t hash = cache_hash(key);
    struct tls_cache_entry **slot = cache_slot(cache, key, hash);
    struct tls_cache_entry *e = *slot;
    if (e != NULL) {
        /* A newer ticket for the same host replaces the older one. */
        SSL_SESSION_free(e->sess);
        free(e->verified_host);
        e->sess = sess;
        e->verified_host = vh;
        e->trust_gen = trust_gen;
        lru_unlink(cache, e);
        lru_push(cache, e);
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
    e->hash = hash;
    e->sess = sess;
    e->verified_host = vh;
    e->trust_gen = trust_gen;
    if (cache->count >= cache->max) {
        struct tls_cache_entry *old = cache->oldest;
        cache_drop(cache, cache_slot(cache, old->key, old->hash));
        cache->evictions++;
        /* The drop may have emptied the bucket the new entry goes in. */
        slot = cache_slot(cache, key, hash);
    }
    e->chain = *slot;
    *slot = e;
    lru_push(cache, e);
    cache->count++;
    return 0;
}

void
tls_cache_remove(struct tls_cache *cache, const char *key, const SSL_SESSION *sess)
{
    struct tls_cache_entry **slot = cache_slot(cache, key, cache_hash(key));
    if (*slot != NULL && (*slot)->sess == sess)
        cache_drop(cache, slot);
}
