/*
 * auth_limit: see auth_limit.h. An entry stores a 128-bit digest of its
 * kind and key (keyed with a random secret: the table never holds a name,
 * and the set an entry lands in cannot be predicted), the bucket's level
 * and when it was last updated.
 */
#include "engine/auth_limit.h"

#include <errno.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define WAYS 8

struct entry {
    uint8_t id[16];   /* digest of kind and key; all zero: free */
    double level;     /* failures not yet drained, as of `last` */
    double per_ns;    /* how fast it drains: its kind's limit / window */
    uint64_t last;    /* CLOCK_MONOTONIC ns */
    uint32_t pending; /* attempts under way (auth_limit_begin, not yet ended) */
};

struct auth_limit {
    pthread_mutex_t lock;
    struct entry *e; /* owned: nsets * WAYS */
    uint32_t nsets;  /* a power of two */
    uint8_t secret[32];
    uint64_t used, evictions;
};

int
auth_limit_new(unsigned entries, struct auth_limit **out)
{
    *out = NULL;
    struct auth_limit *l = calloc(1, sizeof(*l));
    if (l == NULL)
        return -ENOMEM;
    uint32_t sets = 8;
    while ((uint64_t)sets * WAYS < entries && sets < (1u << 28))
        sets *= 2;
    l->nsets = sets;
    l->e = calloc((size_t)sets * WAYS, sizeof(*l->e));
    if (l->e == NULL || RAND_bytes(l->secret, sizeof(l->secret)) != 1) {
        free(l->e);
        free(l);
        return -ENOMEM;
    }
    pthread_mutex_init(&l->lock, NULL);
    *out = l;
    return 0;
}

struct auth_limit *
auth_limit_free(struct auth_limit *l)
{
    if (l == NULL)
        return NULL;
    pthread_mutex_destroy(&l->lock);
    free(l->e);
    free(l);
    return NULL;
}

void
auth_limit_addr_key(const struct sockaddr *sa, uint8_t key[16], size_t *len)
{
    memset(key, 0, 16);
    *len = 16;
    if (sa->sa_family == AF_INET) {
        memcpy(key, &((const struct sockaddr_in *)sa)->sin_addr, 4);
        *len = 4;
    } else if (sa->sa_family == AF_INET6) {
        memcpy(key, &((const struct sockaddr_in6 *)sa)->sin6_addr, 8); /* the /64 */
        *len = 8;
    }
}

/* id: 16 octets naming the key; returns its set. */
static uint32_t
digest(const struct auth_limit *l, enum auth_limit_kind kind, const void *key, size_t len,
       uint8_t id[16])
{
    uint8_t d[32], k = (uint8_t)kind;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (md == NULL || !EVP_DigestInit_ex(md, EVP_sha256(), NULL) ||
        !EVP_DigestUpdate(md, l->secret, sizeof(l->secret)) || !EVP_DigestUpdate(md, &k, 1) ||
        !EVP_DigestUpdate(md, key, len) || !EVP_DigestFinal_ex(md, d, NULL)) {
        /* OpenSSL out of memory: a plain mix still keeps kinds and keys apart */
        memset(d, 0, sizeof(d));
        d[0] = k;
        memcpy(d + 1, key, len < 15 ? len : 15);
        for (size_t i = 15; i < len; i++)
            d[16 + i % 16] ^= ((const uint8_t *)key)[i];
    }
    EVP_MD_CTX_free(md);
    memcpy(id, d, 16);
    id[0] |= 1; /* never all zero */
    return ((uint32_t)d[16] | (uint32_t)d[17] << 8 | (uint32_t)d[18] << 16 |
            (uint32_t)d[19] << 24) &
           (l->nsets - 1);
}

/* The level drained to now. */
static double
drained(const struct entry *e, uint64_t now)
{
    if (now <= e->last)
        return e->level;
    double v = e->level - (double)(now - e->last) * e->per_ns;
    return v > 0 ? v : 0;
}

static struct entry *
find(struct auth_limit *l, uint32_t set, const uint8_t id[16])
{
    struct entry *s = &l->e[(size_t)set * WAYS];
    for (int i = 0; i < WAYS; i++)
        if (memcmp(s[i].id, id, 16) == 0)
            return &s[i];
    return NULL;
}

bool
auth_limit_over(struct auth_limit *l, enum auth_limit_kind kind, const void *key, size_t len,
                unsigned limit, uint64_t now_ns)
{
    if (limit == 0)
        return false;
    uint8_t id[16];
    uint32_t set = digest(l, kind, key, len, id);
    pthread_mutex_lock(&l->lock);
    struct entry *e = find(l, set, id);
    bool over = e != NULL && drained(e, now_ns) > (double)limit - 1.0;
    pthread_mutex_unlock(&l->lock);
    return over;
}

/* The entry of id, made when missing: a free entry of the set, else a
 * drained one, else the one left alone longest (one with attempts under
 * way only when all are). Under the lock. */
static struct entry *
claim(struct auth_limit *l, uint32_t set, const uint8_t id[16], uint64_t now)
{
    struct entry *e = find(l, set, id);
    if (e != NULL)
        return e;
    struct entry *s = &l->e[(size_t)set * WAYS];
    struct entry *oldest = NULL;
    for (int i = 0; i < WAYS; i++) {
        static const uint8_t zero[16];
        if (memcmp(s[i].id, zero, 16) == 0) {
            e = &s[i];
            l->used++;
            break;
        }
        if (s[i].pending == 0 && drained(&s[i], now) == 0) {
            e = &s[i];
            break;
        }
        if (oldest == NULL || (oldest->pending != 0 && s[i].pending == 0) ||
            ((oldest->pending == 0) == (s[i].pending == 0) && s[i].last < oldest->last))
            oldest = &s[i];
    }
    if (e == NULL) {
        e = oldest;
        l->evictions++;
    }
    memcpy(e->id, id, 16);
    e->level = 0;
    e->per_ns = 0;
    e->pending = 0;
    e->last = now;
    return e;
}

static void
count_failure(struct entry *e, unsigned limit, uint64_t window_ms, uint64_t now)
{
    e->level = drained(e, now) + 1.0;
    e->per_ns = (double)limit / ((double)window_ms * 1e6);
    if (now > e->last)
        e->last = now;
}

int
auth_limit_begin(struct auth_limit *l, enum auth_limit_kind kind, const void *key, size_t len,
                 unsigned limit, uint64_t now_ns)
{
    if (limit == 0)
        return 0;
    uint8_t id[16];
    uint32_t set = digest(l, kind, key, len, id);
    pthread_mutex_lock(&l->lock);
    struct entry *e = claim(l, set, id, now_ns);
    int rc = -EBUSY;
    if (drained(e, now_ns) + (double)e->pending + 1.0 <= (double)limit + 1e-9) {
        e->pending++;
        rc = 1;
    }
    pthread_mutex_unlock(&l->lock);
    return rc;
}

void
auth_limit_end(struct auth_limit *l, enum auth_limit_kind kind, const void *key, size_t len,
               bool failed, unsigned limit, uint64_t window_ms, uint64_t now_ns)
{
    uint8_t id[16];
    uint32_t set = digest(l, kind, key, len, id);
    pthread_mutex_lock(&l->lock);
    struct entry *e = find(l, set, id); /* evicted meanwhile: nothing to end */
    if (e != NULL && e->pending > 0)
        e->pending--;
    if (e != NULL && failed && limit != 0)
        count_failure(e, limit, window_ms, now_ns);
    pthread_mutex_unlock(&l->lock);
}

void
auth_limit_fail(struct auth_limit *l, enum auth_limit_kind kind, const void *key, size_t len,
                unsigned limit, uint64_t window_ms, uint64_t now_ns)
{
    if (limit == 0)
        return;
    uint8_t id[16];
    uint32_t set = digest(l, kind, key, len, id);
    pthread_mutex_lock(&l->lock);
    count_failure(claim(l, set, id, now_ns), limit, window_ms, now_ns);
    pthread_mutex_unlock(&l->lock);
}

void
auth_limit_stats(struct auth_limit *l, struct auth_limit_stats *out)
{
    pthread_mutex_lock(&l->lock);
    out->entries = l->used;
    out->capacity = (uint64_t)l->nsets * WAYS;
    out->evictions = l->evictions;
    pthread_mutex_unlock(&l->lock);
}
