/*
 * dns: the resolver of dns.h: the c-ares channel, the cache (a hash of
 * entries by domain, an LRU list of finished ones, a FIFO of lookups
 * waiting for a slot), requests and the ready list that runs callbacks.
 *
 * Callbacks run only from drain(), at the end of dns_process_fd() and
 * dns_process_timeouts(): a lookup that ends anywhere else (inside
 * dns_mx_resolve, or inside another lookup's answer) only moves its
 * requests to the ready list, and dns_timeout() answers "now" while that
 * list is not empty. So no caller is ever called back from inside its own
 * call, and a callback may resolve or cancel anything.
 *
 * Threading: one struct dns per thread (see dns.h).
 */
#include "dns/internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

uint64_t
dns_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

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

static uint32_t
hash_name(const char *s, size_t len)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < len; i++) {
        h ^= (uint8_t)s[i];
        h *= 16777619u;
    }
    return h;
}

static struct entry *
cache_find(struct dns *d, const char *name, uint32_t hash)
{
    for (struct entry *e = d->buckets[hash & (d->nbuckets - 1)]; e != NULL; e = e->hnext)
        if (e->hash == hash && strcmp(e->name, name) == 0)
            return e;
    return NULL;
}

static void
cache_grow(struct dns *d)
{
    uint32_t n = d->nbuckets * 2;
    struct entry **b = calloc(n, sizeof(*b));
    if (b == NULL)
        return; /* longer chains, still correct */
    for (uint32_t i = 0; i < d->nbuckets; i++) {
        struct entry *e = d->buckets[i];
        while (e != NULL) {
            struct entry *next = e->hnext;
            e->hnext = b[e->hash & (n - 1)];
            b[e->hash & (n - 1)] = e;
            e = next;
        }
    }
    free(d->buckets);
    d->buckets = b;
    d->nbuckets = n;
}

static void
lru_unlink(struct dns *d, struct entry *e)
{
    if (e->lprev != NULL)
        e->lprev->lnext = e->lnext;
    else
        d->lru_head = e->lnext;
    if (e->lnext != NULL)
        e->lnext->lprev = e->lprev;
    else
        d->lru_tail = e->lprev;
    e->lprev = e->lnext = NULL;
}

static void
lru_push(struct dns *d, struct entry *e)
{
    e->lprev = NULL;
    e->lnext = d->lru_head;
    if (d->lru_head != NULL)
        d->lru_head->lprev = e;
    else
        d->lru_tail = e;
    d->lru_head = e;
}

/* Remove a DONE entry from the cache and free it. */
static void
cache_drop(struct dns *d, struct entry *e)
{
    struct entry **p = &d->buckets[e->hash & (d->nbuckets - 1)];
    while (*p != e)
        p = &(*p)->hnext;
    *p = e->hnext;
    lru_unlink(d, e);
    dns_mx_result_unref(e->res);
    free(e);
    d->nentries--;
}

static struct entry *
cache_add(struct dns *d, const char *name, size_t len, uint32_t hash)
{
    /* Only finished answers are evicted: a lookup in flight has callers
     * waiting, so while many are in flight the cache may run over. */
    while (d->nentries >= d->cfg.cache_size && d->lru_tail != NULL) {
        cache_drop(d, d->lru_tail);
        d->stats.evictions++;
    }
    struct entry *e = calloc(1, sizeof(*e) + len + 1);
    if (e == NULL)
        return NULL;
    memcpy(e->name, name, len + 1);
    e->hash = hash;
    e->state = ENTRY_QUEUED;
    if (d->nentries >= d->nbuckets)
        cache_grow(d);
    struct entry **b = &d->buckets[hash & (d->nbuckets - 1)];
    e->hnext = *b;
    *b = e;
    d->nentries++;
    return e;
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
        lookup_start(d, e);
    }
    d->starting = false;
}

void
dns_lookup_done(struct dns *d, struct entry *e, struct dns_mx_result *res)
{
    e->state = ENTRY_DONE;
    e->res = res;
    e->expires = res->expires;
    d->inflight--;
    if (res->status == DNS_RETRY || res->status == DNS_FAIL)
        d->stats.failures++;
    struct dns_req *r;
    while ((r = e->waiters.head) != NULL) {
        list_remove(&e->waiters, r);
        r->entry = NULL;
        r->res = dns_mx_result_ref(res);
        list_append(&d->ready, r);
    }
    lru_push(d, e);
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
        res->expires = dns_now();
    }
    return res;
bad:
    res = result_new(DNS_FAIL, "bad address literal", domain, NULL, 0, false);
    if (res != NULL)
        res->expires = dns_now();
    return res;
}

static struct dns_mx_result *
bad_name_result(const char *domain)
{
    char shown[DNS_NAME_MAX + 1];
    snprintf(shown, sizeof(shown), "%s", domain);
    struct dns_mx_result *res = result_new(DNS_FAIL, "invalid domain name", shown, NULL, 0, false);
    if (res != NULL)
        res->expires = dns_now();
    return res;
}

/* ---- API ---- */

int
dns_mx_resolve(struct dns *d, const char *domain, dns_mx_fn *cb, void *arg,
               struct dns_mx_result **res, struct dns_req **req)
{
    *res = NULL;
    *req = NULL;
    d->stats.lookups++;
    if (domain[0] == '[') {
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
    uint32_t hash = hash_name(name, (size_t)len);
    struct entry *e = cache_find(d, name, hash);
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
    if (e != NULL && dns_now() < e->expires) {
        d->stats.hits++;
        lru_unlink(d, e);
        lru_push(d, e);
        *res = dns_mx_result_ref(e->res);
        return 1;
    }
    struct dns_req *r = req_new(d);
    if (r == NULL)
        return -ENOMEM;
    if (e != NULL) {
        lru_unlink(d, e); /* expired: look it up again in place */
        e->res = dns_mx_result_unref(e->res);
        e->state = ENTRY_QUEUED;
    } else if ((e = cache_add(d, name, (size_t)len, hash)) == NULL) {
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
    drain(d);
}

uint64_t
dns_timeout(struct dns *d, uint64_t now)
{
    if (d->ready.head != NULL)
        return now;
    if (d->deadline_dirty) {
        /* Linear in the queries in flight (c-ares 1.18): done once per
         * processing, not once per query. */
        struct timeval tvbuf, *tv = ares_timeout(d->channel, NULL, &tvbuf);
        d->deadline = tv == NULL ? UINT64_MAX
                                 : now + (uint64_t)tv->tv_sec * 1000000000ULL +
                                       (uint64_t)tv->tv_usec * 1000ULL;
        d->deadline_dirty = false;
    }
    return d->deadline;
}

void
dns_cache_clear(struct dns *d)
{
    while (d->lru_tail != NULL)
        cache_drop(d, d->lru_tail);
}

void
dns_stats(const struct dns *d, struct dns_stats *out)
{
    *out = d->stats;
    out->entries = d->nentries;
    out->inflight = d->inflight;
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
    d->nbuckets = 1024;
    d->buckets = calloc(d->nbuckets, sizeof(*d->buckets));
    if (d->buckets == NULL) {
        rc = -ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if (getrandom(&d->rng, sizeof(d->rng), GRND_NONBLOCK) != sizeof(d->rng))
        d->rng = dns_now() ^ ((uint64_t)getpid() << 32);
    d->rng |= 1; /* xorshift must not start at zero */

    struct ares_options o;
    memset(&o, 0, sizeof(o));
    /* EDNS with the 1232-byte payload of DNS flag day 2020: most MX
     * answers with their additional records fit in one datagram. */
    o.flags = ARES_FLAG_EDNS | ARES_FLAG_NOSEARCH | ARES_FLAG_NOALIASES;
    o.timeout = (int)cfg->timeout;
    o.tries = (int)cfg->tries;
    o.sock_state_cb = on_sock_state;
    o.sock_state_cb_data = d;
    o.ednspsz = 1232;
    /* A burst of answers lands on one UDP socket between two loop turns. */
    o.socket_receive_buffer_size = 1 << 20;
    int mask = ARES_OPT_FLAGS | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_SOCK_STATE_CB |
               ARES_OPT_EDNSPSZ | ARES_OPT_SOCK_RCVBUF;
    int arc = ares_init_options(&d->channel, &o, mask);
    if (arc != ARES_SUCCESS) {
        d->channel = NULL;
        snprintf(err, errlen, "c-ares: %s", ares_strerror(arc));
        rc = DNS_EINIT;
        goto fail;
    }
    if (servers != NULL && (arc = ares_set_servers_ports(d->channel, servers)) != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares servers: %s", ares_strerror(arc));
        rc = DNS_EINIT;
        goto fail;
    }
    free(servers);
    *out = d;
    return 0;
fail:
    free(servers);
    dns_free(d);
    return rc;
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
    for (uint32_t i = 0; d->buckets != NULL && i < d->nbuckets; i++) {
        struct entry *e = d->buckets[i];
        while (e != NULL) {
            struct entry *next = e->hnext;
            free_waiters(d, &e->waiters);
            dns_mx_result_unref(e->res);
            free(e);
            e = next;
        }
    }
    free_waiters(d, &d->ready);
    while (d->req_free != NULL) {
        struct dns_req *r = d->req_free;
        d->req_free = r->next;
        free(r);
    }
    free(d->buckets);
    conf_free(dns_conf_keys, &d->cfg);
    free(d);
    return NULL;
}
