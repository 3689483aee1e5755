/*
 * hosts: the addresses of MX hosts, per host name and family, shared by
 * every domain whose MX records name the host. Thousands of domains
 * (Google Workspace, Microsoft 365 customers) name the same few hosts:
 * the MX answer's additional section often carries the A records, but an
 * AAAA (or A) query per host was asked again for every domain. Now a
 * host's answer, data or none (NODATA, NXDOMAIN), is kept as long as the
 * domain cache would keep it (its TTL clamped to min_ttl..max_ttl; the
 * negative TTL for no data), so the next domain naming the host asks
 * nothing. Temporary failures are not kept.
 *
 * Bounded like the domain cache: at most cache_size entries, the least
 * recently used dropped first, and expired ones taken out by the same
 * expiry sweep (hosts_sweep(), from dns.c's sweep turn), in batches.
 *
 * Threading: the owner thread of the struct dns only.
 */
#include "dns/internal.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct hentry {
    struct hash_node hn; /* in d->hosts (first member) */
    struct lru_node ln;  /* on d->hosts_lru */
    uint64_t expires;    /* CLOCK_MONOTONIC ns */
    uint8_t st;          /* HOST_OK, HOST_NODATA, HOST_NXDOMAIN */
    bool v6;
    uint8_t n;           /* addresses (HOST_OK) */
    char data[];         /* n * 16 address octets, then the name */
};

struct hkey {
    const char *name;
    bool v6;
};

static struct hentry *
hentry_of(struct hash_node *n)
{
    return (struct hentry *)n;
}

static struct hentry *
hentry_of_lru(struct lru_node *n)
{
    return (struct hentry *)((char *)n - offsetof(struct hentry, ln));
}

static const char *
hentry_name(const struct hentry *h)
{
    return h->data + (size_t)h->n * 16;
}

static bool
hentry_eq(const struct hash_node *n, const void *key)
{
    const struct hentry *h = hentry_of((struct hash_node *)n);
    const struct hkey *k = key;
    return h->v6 == k->v6 && strcasecmp(hentry_name(h), k->name) == 0;
}

static uint64_t
hkey_hash(const char *name, bool v6)
{
    return hash_str_nocase(name) ^ (v6 ? 0x9e3779b97f4a7c15ULL : 0);
}

void
hosts_init(struct dns *d)
{
    hash_init(&d->hosts, hentry_eq, 64);
    lru_init(&d->hosts_lru);
}

static void
hosts_drop(struct dns *d, struct hentry *h)
{
    hash_remove(&d->hosts, &h->hn);
    lru_remove(&d->hosts_lru, &h->ln);
    free(h);
}

void
hosts_fini(struct dns *d)
{
    struct lru_node *n;
    while ((n = lru_oldest(&d->hosts_lru)) != NULL)
        hosts_drop(d, hentry_of_lru(n));
    hash_fini(&d->hosts);
}

int
hosts_find(struct dns *d, const char *name, bool v6, struct host_addrs *out)
{
    struct hkey k = {name, v6};
    struct hash_node *n = hash_find(&d->hosts, hkey_hash(name, v6), &k);
    if (n == NULL)
        return 0;
    struct hentry *h = hentry_of(n);
    uint64_t now = clock_mono_ns();
    if (h->expires <= now) {
        hosts_drop(d, h);
        return 0;
    }
    lru_touch(&d->hosts_lru, &h->ln);
    out->st = h->st;
    out->n = h->n;
    out->addr = (const uint8_t(*)[16])h->data;
    uint64_t left = (h->expires - now) / 1000000000ULL;
    out->ttl = left > UINT32_MAX ? UINT32_MAX : (uint32_t)left;
    d->stats.host_hits++;
    return 1;
}

void
hosts_put(struct dns *d, const char *name, bool v6, enum host_st st, const uint8_t (*addr)[16],
          unsigned n, uint64_t ttl_ms)
{
    if (ttl_ms == 0 || d->cfg.cache_size == 0)
        return; /* nothing is kept (max_ttl 0) */
    if (n > WIRE_MAX_ADDR)
        n = WIRE_MAX_ADDR;
    if (st != HOST_OK)
        n = 0;
    struct hkey k = {name, v6};
    uint64_t hash = hkey_hash(name, v6);
    struct hash_node *old = hash_find(&d->hosts, hash, &k);
    if (old != NULL)
        hosts_drop(d, hentry_of(old)); /* a fresher answer replaces it */
    struct lru_node *lo;
    while (hash_count(&d->hosts) >= d->cfg.cache_size && (lo = lru_oldest(&d->hosts_lru)) != NULL)
        hosts_drop(d, hentry_of_lru(lo));
    size_t nl = strlen(name);
    struct hentry *h = malloc(sizeof(*h) + (size_t)n * 16 + nl + 1);
    if (h == NULL)
        return; /* not kept: asked again next time */
    memset(h, 0, sizeof(*h));
    h->st = (uint8_t)st;
    h->v6 = v6;
    h->n = (uint8_t)n;
    if (n > 0)
        memcpy(h->data, addr, (size_t)n * 16);
    memcpy(h->data + (size_t)n * 16, name, nl + 1);
    h->expires = clock_mono_ns() + ttl_ms * 1000000ULL;
    h->hn.hash = hash;
    if (hash_insert(&d->hosts, &h->hn) < 0) {
        free(h);
        return;
    }
    lru_touch(&d->hosts_lru, &h->ln);
}

void
hosts_sweep(struct dns *d, uint64_t now)
{
    unsigned seen = 0;
    size_t bucket = d->hosts_sweep_bucket;
    struct hash_node *cursor = NULL;
    struct hash_node *n = NULL;
    /* A turn ends between buckets, never inside a chain: the next one
     * starts at a bucket, and the rest of the chain would wait for the
     * next pass (as cache_sweep does). */
    while ((seen < HOSTS_SWEEP_BATCH || cursor != NULL) &&
           (n = hash_next(&d->hosts, &bucket, &cursor)) != NULL) {
        seen++;
        struct hentry *h = hentry_of(n);
        if (h->expires <= now)
            hosts_drop(d, h);
    }
    if (n == NULL || seen < HOSTS_SWEEP_BATCH) {
        d->hosts_sweep_bucket = 0;
        hash_compact(&d->hosts);
    } else {
        d->hosts_sweep_bucket = bucket;
    }
}

bool
hosts_any(const struct dns *d)
{
    return lru_oldest(&d->hosts_lru) != NULL;
}
