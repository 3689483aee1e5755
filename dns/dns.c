/*
 * dns: the resolver of dns.h: the c-ares channel, the cache (a hash of
 * entries by domain and kind, MX or address; an LRU list of finished
 * ones; a FIFO of lookups waiting for a slot; the MX hosts' addresses in
 * hosts.c, swept with it), requests and the ready list that runs
 * callbacks.
 *
 * Callbacks run only from drain(), at the end of dns_process_fd() and
 * dns_process_timeouts(): a lookup that ends anywhere else (inside
 * dns_mx_resolve or dns_addr_resolve, or inside another lookup's
 * answer) only moves its requests to the ready list, and dns_timeout()
 * answers "now" while that list is not empty. So no caller is ever
 * called back from inside its own call, and a callback may resolve or
 * cancel anything.
 *
 * Threading: one struct dns per thread (see dns.h).
 */
#include "dns/internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <unistd.h>

/* ---- request lists ---- */

static void
list_append(struct req_list *l, struct dns_req *r)
{
    r->next = NULL;
    r->prev = l->tail;
    if (l->tail != NULL)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
}

static void
list_remove(struct req_list *l, struct dns_req *r)
{
    if (r->prev != NULL)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next != NULL)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->prev = r->next = NULL;
}

static struct dns_req *
req_new(struct dns *d)
{
    struct dns_req *r = d->req_free;
    if (r != NULL)
        d->req_free = r->next;
    else if ((r = malloc(sizeof(*r))) == NULL)
        return NULL;
    memset(r, 0, sizeof(*r));
    d->nreqs++;
    return r;
}

static void
req_release(struct dns *d, struct dns_req *r)
{
    r->next = d->req_free;
    d->req_free = r;
    d->nreqs--;
}

/* ---- the cache ---- */

/* Entries examined per turn of the expiry sweep: a cache of 100,000
 * domains is swept in 25 short turns rather than one long stall. */
#define SWEEP_BATCH 4096
/* An address literal ([192.0.2.1]) answers for an hour, as a looked-up
 * answer does for its TTL (a reload that changes a route drops it). */
#define LITERAL_TTL_NS (3600ULL * 1000000000ULL)
/* How often the sweep runs while the cache holds entries: min_ttl (no
 * answer expires sooner, but for errors kept error_ttl), between 1 and 10
 * seconds; an expired answer waits at most that long to go. */
static uint64_t
sweep_interval_ns(const struct dns *d)
{
    uint64_t ms = d->cfg.min_ttl;
    if (ms < 1000)
        ms = 1000;
    if (ms > 10000)
        ms = 10000;
    return ms * 1000000ULL;
}

static inline struct entry *
entry_of(struct hash_node *n)
{
    return (struct entry *)((char *)n - offsetof(struct entry, hn));
}

static inline struct entry *
entry_of_lru(struct lru_node *n)
{
    return (struct entry *)((char *)n - offsetof(struct entry, ln));
}

/* An entry's key: a name's MX answer and its address answer are two
 * entries. */
struct entry_key {
    const char *name;
    bool addr;
};

static bool
entry_eq(const struct hash_node *n, const void *key)
{
    const struct entry *e = entry_of((struct hash_node *)n);
    const struct entry_key *k = key;
    return e->addr == k->addr && strcmp(e->name, k->name) == 0;
}

static uint64_t
entry_hash(const char *name, size_t len, bool addr)
{
    uint64_t h = hash_bytes(name, len);
    return addr ? h ^ 0x9E3779B97F4A7C15ULL : h;
}

static struct entry *
cache_find(struct dns *d, const char *name, bool addr, uint64_t hash)
{
    struct entry_key k = {name, addr};
    struct hash_node *n = hash_find(&d->cache, hash, &k);
    return n == NULL ? NULL : entry_of(n);
}

/* Remove a DONE entry from the cache and free it. */
static void
cache_drop(struct dns *d, struct entry *e)
{
    hash_remove(&d->cache, &e->hn);
    lru_remove(&d->lru, &e->ln);
    dns_mx_result_unref(e->res);
    free(e);
}

static struct entry *
cache_add(struct dns *d, const char *name, size_t len, bool addr, uint64_t hash)
{
    /* Only finished answers are evicted: a lookup in flight has callers
     * waiting, so while many are in flight the cache may run over. */
    struct lru_node *old;
    while (hash_count(&d->cache) >= d->cfg.cache_size && (old = lru_oldest(&d->lru)) != NULL) {
        cache_drop(d, entry_of_lru(old));
        d->stats.evictions++;
    }
    struct entry *e = calloc(1, sizeof(*e) + len + 1);
    if (e == NULL)
        return NULL;
    memcpy(e->name, name, len + 1);
    e->addr = addr;
    e->hn.hash = hash;
    e->state = ENTRY_QUEUED;
    if (hash_insert(&d->cache, &e->hn) < 0) {
        free(e);
        return NULL;
    }
    return e;
}

static void edns_check(struct dns *d);

/* One turn of the expiry sweep: drop the DONE entries whose answer has
 * expired (a later request would look them up again anyway), SWEEP_BATCH
 * at most, going on from where the last turn stopped. A turn that did not
 * reach the end asks for the next at once; the end of a pass shrinks the
 * table and waits SWEEP_INTERVAL_NS. Entries added or a table resized
 * between turns may be missed or seen twice by this pass: the next one
 * takes them. */
static void
cache_sweep(struct dns *d, uint64_t now)
{
    size_t seen = 0;
    size_t bucket = d->sweep_bucket;
    struct hash_node *cursor = NULL;
    while (seen < SWEEP_BATCH || cursor != NULL) {
        struct hash_node *n = hash_next(&d->cache, &bucket, &cursor);
        if (n == NULL)
            break;
        seen++;
        struct entry *e = entry_of(n);
        if (e->state == ENTRY_DONE && e->expires <= now) {
            cache_drop(d, e);
            d->stats.expired++;
        }
    }
    hosts_sweep(d, now); /* the MX hosts' addresses, in batches of their own */
    edns_check(d);
    if (bucket >= d->cache.nb && cursor == NULL) {
        d->sweep_bucket = 0;
        hash_compact(&d->cache);
        d->next_sweep = now + sweep_interval_ns(d);
    } else {
        d->sweep_bucket = bucket;
        d->next_sweep = now;
    }
}

/* ---- lookups ---- */

static void
start_queued(struct dns *d)
{
    /* A lookup may end inside lookup_start and come back here: the flag
     * turns that into another turn of this loop instead of recursion. */
    if (d->starting || d->destroying)
        return;
    d->starting = true;
    while (d->queue_head != NULL && d->inflight < d->cfg.max_inflight) {
        struct entry *e = d->queue_head;
        d->queue_head = e->qnext;
        if (d->queue_head == NULL)
            d->queue_tail = NULL;
        e->qnext = NULL;
        d->queued--;
        e->state = ENTRY_INFLIGHT;
        d->inflight++;
        e->started = clock_mono_ns();
        lru_touch(&d->slots, &e->ln);
        lookup_start(d, e);
    }
    d->starting = false;
}

/* e leaves the lookups holding a slot (done, or slow). */
static void
slot_release(struct dns *d, struct entry *e)
{
    lru_remove(&d->slots, &e->ln);
    d->inflight--;
}

/* The lookups in flight a whole try's timeout give their slots up (see
 * struct dns), and queued ones take them. */
static void
slots_slow(struct dns *d, uint64_t now)
{
    uint64_t try_ns = d->cfg.timeout * 1000000ULL;
    bool freed = false;
    struct lru_node *n;
    while ((n = lru_oldest(&d->slots)) != NULL && now - entry_of_lru(n)->started >= try_ns) {
        slot_release(d, entry_of_lru(n));
        d->slow++;
        freed = true;
    }
    if (freed)
        start_queued(d);
}

void
dns_lookup_done(struct dns *d, struct entry *e, struct dns_mx_result *res)
{
    e->state = ENTRY_DONE;
    e->res = res;
    e->expires = res->expires;
    if (e->ln.on) /* still holding its slot */
        slot_release(d, e);
    else
        d->slow--;
    if (d->next_sweep == UINT64_MAX)
        d->next_sweep = clock_mono_ns() + sweep_interval_ns(d);
    if (res->status == DNS_RETRY || res->status == DNS_FAIL)
        d->stats.failures++;
    struct dns_req *r;
    while ((r = e->waiters.head) != NULL) {
        list_remove(&e->waiters, r);
        r->entry = NULL;
        r->res = dns_mx_result_ref(res);
        list_append(&d->ready, r);
    }
    lru_touch(&d->lru, &e->ln);
    start_queued(d);
}

static void
drain(struct dns *d)
{
    if (d->draining)
        return;
    d->draining = true;
    struct dns_req *r;
    while ((r = d->ready.head) != NULL) {
        list_remove(&d->ready, r);
        dns_mx_fn *cb = r->cb;
        void *arg = r->arg;
        struct dns_mx_result *res = r->res;
        req_release(d, r); /* the handle dies as its callback starts */
        cb(arg, res);
    }
    d->draining = false;
}

/* ---- answers without DNS ---- */

/* "[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321 4.1.3). Returns a
 * result (OK or FAIL) or NULL when out of memory. */
static struct dns_mx_result *
literal_result(const char *domain)
{
    char text[INET6_ADDRSTRLEN + 8];
    size_t len = strlen(domain);
    uint8_t a[1][16] = {{0}};
    struct result_host h = {.name = domain, .preference = 0};
    struct dns_mx_result *res;
    if (len < 3 || len - 2 >= sizeof(text) || domain[len - 1] != ']')
        goto bad;
    memcpy(text, domain + 1, len - 2);
    text[len - 2] = '\0';
    if (strncasecmp(text, "ipv6:", 5) == 0) {
        if (inet_pton(AF_INET6, text + 5, a[0]) != 1)
            goto bad;
        h.n6 = 1;
        h.a6 = (const uint8_t(*)[16])a;
    } else {
        if (inet_pton(AF_INET, text, a[0]) != 1)
            goto bad;
        h.n4 = 1;
        h.a4 = (const uint8_t(*)[16])a;
    }
    res = result_new(DNS_OK, "address literal", domain, &h, 1, false);
    if (res != NULL) {
        res->literal = true;
        /* It never changes: kept as an answer is, for its TTL (a route's
         * literal asked again after every failed connection never had all
         * its addresses fail, and connected again at once, endlessly). */
        res->expires = clock_mono_ns() + LITERAL_TTL_NS;
    }
    return res;
bad:
    res = result_new(DNS_FAIL, "bad address literal", domain, NULL, 0, false);
    if (res != NULL) {
        res->bad_name = true;
        res->expires = clock_mono_ns();
    }
    return res;
}

static struct dns_mx_result *
bad_name_result(const char *domain)
{
    char shown[DNS_NAME_MAX + 1];
    snprintf(shown, sizeof(shown), "%s", domain);
    struct dns_mx_result *res = result_new(DNS_FAIL, "invalid domain name", shown, NULL, 0, false);
    if (res != NULL) {
        res->bad_name = true;
        res->expires = clock_mono_ns();
    }
    return res;
}

/* ---- API ---- */

/* dns_mx_resolve (addr false) and dns_addr_resolve (addr true): one
 * cache, one queue, one completion rule. */
static int
resolve(struct dns *d, const char *domain, bool addr, dns_mx_fn *cb, void *arg,
        struct dns_mx_result **res, struct dns_req **req)
{
    *res = NULL;
    *req = NULL;
    d->stats.lookups++;
    if (domain[0] == '[' && !addr) {
        *res = literal_result(domain);
        if (*res == NULL)
            *res = result_oom();
        return 1;
    }
    char name[DNS_NAME_MAX + 1];
    int len = dns_name_normalize(domain, name);
    if (len < 0) {
        *res = bad_name_result(domain);
        if (*res == NULL)
            *res = result_oom();
        return 1;
    }
    uint64_t hash = entry_hash(name, (size_t)len, addr);
    struct entry *e = cache_find(d, name, addr, hash);
    if (e != NULL && e->state != ENTRY_DONE) {
        struct dns_req *r = req_new(d);
        if (r == NULL)
            return -ENOMEM;
        r->cb = cb;
        r->arg = arg;
        r->entry = e;
        list_append(&e->waiters, r);
        d->stats.joined++;
        *req = r;
        return 0;
    }
    if (e != NULL && clock_mono_ns() < e->expires) {
        d->stats.hits++;
        lru_touch(&d->lru, &e->ln);
        *res = dns_mx_result_ref(e->res);
        return 1;
    }
    struct dns_req *r = req_new(d);
    if (r == NULL)
        return -ENOMEM;
    if (e != NULL) {
        lru_remove(&d->lru, &e->ln); /* expired: look it up again in place */
        e->res = dns_mx_result_unref(e->res);
        e->state = ENTRY_QUEUED;
    } else if ((e = cache_add(d, name, (size_t)len, addr, hash)) == NULL) {
        req_release(d, r);
        return -ENOMEM;
    }
    d->stats.misses++;
    if (d->queue_tail != NULL)
        d->queue_tail->qnext = e;
    else
        d->queue_head = e;
    d->queue_tail = e;
    d->queued++;
    start_queued(d);
    if (e->state == ENTRY_DONE) {
        /* It ended before it could wait (no server, no memory). */
        req_release(d, r);
        *res = dns_mx_result_ref(e->res);
        return 1;
    }
    r->cb = cb;
    r->arg = arg;
    r->entry = e;
    list_append(&e->waiters, r);
    *req = r;
    return 0;
}

int
dns_mx_resolve(struct dns *d, const char *domain, dns_mx_fn *cb, void *arg,
               struct dns_mx_result **res, struct dns_req **req)
{
    return resolve(d, domain, false, cb, arg, res, req);
}

int
dns_addr_resolve(struct dns *d, const char *name, dns_mx_fn *cb, void *arg,
                 struct dns_mx_result **res, struct dns_req **req)
{
    return resolve(d, name, true, cb, arg, res, req);
}

void
dns_cancel(struct dns *d, struct dns_req *r)
{
    if (r == NULL)
        return;
    if (r->entry != NULL)
        list_remove(&r->entry->waiters, r);
    else
        list_remove(&d->ready, r);
    r->res = dns_mx_result_unref(r->res);
    req_release(d, r);
}

void
dns_process_fd(struct dns *d, int fd, bool readable, bool writable)
{
    ares_process_fd(d->channel, readable ? fd : ARES_SOCKET_BAD, writable ? fd : ARES_SOCKET_BAD);
    d->deadline_dirty = true;
    drain(d);
}

void
dns_process_timeouts(struct dns *d)
{
    ares_process_fd(d->channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    d->deadline_dirty = true;
    uint64_t now = clock_mono_ns();
    slots_slow(d, now);
    drain(d);
    if (now >= d->next_sweep)
        cache_sweep(d, now);
}

uint64_t
dns_timeout(struct dns *d, uint64_t now)
{
    if (d->ready.head != NULL)
        return now;
    if (lru_oldest(&d->lru) == NULL && !hosts_any(d)) {
        d->next_sweep = UINT64_MAX; /* nothing to expire: no wake-ups while idle */
        d->sweep_bucket = 0;
    }
    uint64_t sweep = d->next_sweep;
    if (d->deadline_dirty) {
        /* Linear in the queries in flight (c-ares 1.18): done once per
         * processing, not once per query. */
        struct timeval tvbuf, *tv = ares_timeout(d->channel, NULL, &tvbuf);
        d->deadline = tv == NULL ? UINT64_MAX
                                 : now + (uint64_t)tv->tv_sec * 1000000000ULL +
                                       (uint64_t)tv->tv_usec * 1000ULL;
        d->deadline_dirty = false;
    }
    /* and when the oldest lookup holding a slot gives it up (slots_slow) */
    struct lru_node *first = lru_oldest(&d->slots);
    uint64_t slow_at = first != NULL
                           ? entry_of_lru(first)->started + d->cfg.timeout * 1000000ULL
                           : UINT64_MAX;
    uint64_t t = d->deadline < sweep ? d->deadline : sweep;
    return slow_at < t ? slow_at : t;
}

void
dns_cache_clear(struct dns *d)
{
    struct lru_node *n;
    while ((n = lru_oldest(&d->lru)) != NULL)
        cache_drop(d, entry_of_lru(n));
    hash_compact(&d->cache);
    hosts_fini(d);
    hosts_init(d);
}

void
dns_stats(const struct dns *d, struct dns_stats *out)
{
    *out = d->stats;
    out->entries = hash_count(&d->cache);
    out->host_entries = hash_count(&d->hosts);
    out->inflight = d->inflight + d->slow;
    out->queued = d->queued;
    out->requests = d->nreqs;
}

/* ---- life ---- */

static pthread_once_t lib_once = PTHREAD_ONCE_INIT;
static int lib_rc;

static void
lib_init(void)
{
    /* Process-wide and never undone: c-ares 1.18 keeps no per-process
     * allocations on Linux, so there is nothing to clean up at exit. */
    lib_rc = ares_library_init(ARES_LIB_INIT_ALL);
}

static void
on_sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    struct dns *d = data;
    d->sock(d->sock_arg, fd, readable != 0, writable != 0);
}

/* A channel for d (its config, servers from servers_parse: NULL for
 * /etc/resolv.conf's). Returns 0 or DNS_EINIT with one line in err. */
static int
channel_new(struct dns *d, const struct ares_addr_port_node *servers, ares_channel *out,
            char *err, size_t errlen)
{
    struct ares_options o;
    memset(&o, 0, sizeof(o));
    /* EDNS with the 1232-byte payload of DNS flag day 2020: most MX
     * answers with their additional records fit in one datagram. */
    o.flags = ARES_FLAG_EDNS | ARES_FLAG_NOSEARCH | ARES_FLAG_NOALIASES;
    o.timeout = (int)d->cfg.timeout;
    o.tries = (int)d->cfg.tries;
    o.sock_state_cb = on_sock_state;
    o.sock_state_cb_data = d;
    o.ednspsz = 1232;
    /* A burst of answers lands on one UDP socket between two loop turns. */
    o.socket_receive_buffer_size = 1 << 20;
    int mask = ARES_OPT_FLAGS | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_SOCK_STATE_CB |
               ARES_OPT_EDNSPSZ | ARES_OPT_SOCK_RCVBUF;
    ares_channel ch;
    int arc = ares_init_options(&ch, &o, mask);
    if (arc != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares: %s", ares_strerror(arc));
        return DNS_EINIT;
    }
    /* (c-ares 1.18 takes a non-const list it only reads) */
    if (servers != NULL && (arc = ares_set_servers_ports(
                                ch, (struct ares_addr_port_node *)servers)) != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares servers: %s", ares_strerror(arc));
        ares_destroy(ch);
        return DNS_EINIT;
    }
    *out = ch;
    return 0;
}

/* c-ares 1.18 turns EDNS off for the whole channel, for good, after one
 * FORMERR answer without an OPT record (process_answer clears
 * ARES_FLAG_EDNS): from then on a UDP answer over 512 octets is taken as
 * truncated and asked again over TCP, which fails where TCP/53 is
 * blocked. Looked for at each sweep turn (counted in edns_off); the
 * channel is then made again, with EDNS, once no query is left on it
 * (counted in edns_restored): nothing to move over, and no socket to
 * hand back (c-ares closes its sockets when its last query ends). A
 * resolver that keeps answering FORMERR turns it off again, as c-ares
 * means to. */
static void
edns_check(struct dns *d)
{
    if (!d->edns_off) {
        struct ares_options o;
        int mask = 0;
        if (ares_save_options(d->channel, &o, &mask) != ARES_SUCCESS)
            return;
        bool off = (mask & ARES_OPT_FLAGS) != 0 && (o.flags & ARES_FLAG_EDNS) == 0;
        ares_destroy_options(&o);
        if (!off)
            return;
        d->edns_off = true;
        d->stats.edns_off++;
    }
    struct timeval tvbuf;
    if (ares_timeout(d->channel, NULL, &tvbuf) != NULL)
        return; /* queries on it: a later turn */
    struct ares_addr_port_node *servers = NULL;
    char err[128];
    ares_channel ch;
    if (servers_parse(d->cfg.servers, &servers, err, sizeof(err)) < 0)
        return; /* (it parsed at dns_new: no memory now) a later turn */
    int rc = channel_new(d, servers, &ch, err, sizeof(err));
    free(servers);
    if (rc < 0)
        return;
    ares_destroy(d->channel);
    d->channel = ch;
    d->edns_off = false;
    d->deadline_dirty = true;
    d->stats.edns_restored++;
}

int
dns_new(const struct dns_config *cfg, dns_sock_fn *sock, void *sock_arg, struct dns **out,
        char *err, size_t errlen)
{
    *out = NULL;
    pthread_once(&lib_once, lib_init);
    if (lib_rc != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares: %s", ares_strerror(lib_rc));
        return DNS_EINIT;
    }
    struct ares_addr_port_node *servers = NULL;
    int rc = servers_parse(cfg->servers, &servers, err, errlen);
    if (rc < 0)
        return rc;
    struct dns *d = calloc(1, sizeof(*d));
    if (d == NULL || conf_copy(dns_conf_keys, &d->cfg, cfg, sizeof(*cfg)) < 0) {
        free(d);
        free(servers);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    d->sock = sock;
    d->sock_arg = sock_arg;
    d->deadline = UINT64_MAX;
    hash_init(&d->cache, entry_eq, 1024);
    lru_init(&d->lru);
    lru_init(&d->slots);
    hosts_init(d);
    d->next_sweep = UINT64_MAX;
    if (getrandom(&d->rng, sizeof(d->rng), GRND_NONBLOCK) != sizeof(d->rng))
        d->rng = clock_mono_ns() ^ ((uint64_t)getpid() << 32);
    d->rng |= 1; /* xorshift must not start at zero */
    if (getrandom(&d->qid_rng, sizeof(d->qid_rng), GRND_NONBLOCK) != sizeof(d->qid_rng))
        d->qid_rng = dns_rand(d) ^ ((uint64_t)(uintptr_t)d << 16);
    d->qid_rng |= 1;

    rc = channel_new(d, servers, &d->channel, err, errlen);
    free(servers);
    if (rc < 0) {
        dns_free(d);
        return rc;
    }
    *out = d;
    return 0;
}

static void
free_waiters(struct dns *d, struct req_list *l)
{
    struct dns_req *r;
    while ((r = l->head) != NULL) {
        list_remove(l, r);
        r->res = dns_mx_result_unref(r->res);
        req_release(d, r);
    }
}

struct dns *
dns_free(struct dns *d)
{
    if (d == NULL)
        return NULL;
    d->destroying = true;
    /* c-ares calls every query back with ARES_EDESTRUCTION (each lookup
     * frees itself on its last one) and tells the host to stop watching
     * each socket. */
    if (d->channel != NULL)
        ares_destroy(d->channel);
    size_t bucket = 0;
    struct hash_node *cursor = NULL, *n;
    while ((n = hash_next(&d->cache, &bucket, &cursor)) != NULL) {
        struct entry *e = entry_of(n);
        free_waiters(d, &e->waiters);
        dns_mx_result_unref(e->res);
        free(e);
    }
    free_waiters(d, &d->ready);
    while (d->req_free != NULL) {
        struct dns_req *r = d->req_free;
        d->req_free = r->next;
        free(r);
    }
    hash_fini(&d->cache);
    hosts_fini(d);
    conf_free(dns_conf_keys, &d->cfg);
    free(d);
    return NULL;
}
