/*
 * result: the immutable, refcounted answers handed to callers. One
 * allocation holds the result, its hosts, their addresses and every
 * string, so a reference is one pointer and the last unref one free().
 *
 * Threading: results are immutable once built; the count is atomic, so
 * references may be taken and dropped on any thread.
 */
#include "dns/internal.h"

#include <stdalign.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct result_box {
    atomic_uint refs;
    struct dns_mx_result pub;
};

static struct result_box *
box_of(struct dns_mx_result *res)
{
    return (struct result_box *)((char *)res - offsetof(struct result_box, pub));
}

struct dns_mx_result *
dns_mx_result_ref(struct dns_mx_result *res)
{
    if (res != NULL)
        atomic_fetch_add_explicit(&box_of(res)->refs, 1, memory_order_relaxed);
    return res;
}

struct dns_mx_result *
dns_mx_result_unref(struct dns_mx_result *res)
{
    if (res == NULL)
        return NULL;
    struct result_box *b = box_of(res);
    /* acq_rel: the last owner's free must see every other owner's reads done */
    if (atomic_fetch_sub_explicit(&b->refs, 1, memory_order_acq_rel) == 1)
        free(b);
    return NULL;
}

static bool
addr_eq(const union dns_addr *x, const union dns_addr *y)
{
    if (x->sa.sa_family != y->sa.sa_family)
        return false;
    if (x->sa.sa_family == AF_INET6)
        return memcmp(&x->sin6.sin6_addr, &y->sin6.sin6_addr, 16) == 0;
    return x->sin.sin_addr.s_addr == y->sin.sin_addr.s_addr;
}

/* Is every address of x one of y's? */
static bool
addrs_within(const struct dns_mx_host *x, const struct dns_mx_host *y)
{
    for (unsigned i = 0; i < x->naddrs; i++) {
        unsigned k = 0;
        while (k < y->naddrs && !addr_eq(&x->addrs[i], &y->addrs[k]))
            k++;
        if (k == y->naddrs)
            return false;
    }
    return true;
}

/* Has every host of a a host in b of the same name, preference, DANE
 * status and addresses? */
static bool
hosts_within(const struct dns_mx_result *a, const struct dns_mx_result *b)
{
    for (unsigned i = 0; i < a->nhosts; i++) {
        const struct dns_mx_host *x = &a->hosts[i];
        unsigned k = 0;
        for (; k < b->nhosts; k++) {
            const struct dns_mx_host *y = &b->hosts[k];
            if (strcasecmp(x->name, y->name) == 0 && x->preference == y->preference &&
                x->dane == y->dane && addrs_within(x, y) && addrs_within(y, x))
                break;
        }
        if (k == b->nhosts)
            return false;
    }
    return true;
}

bool
dns_mx_result_same(const struct dns_mx_result *a, const struct dns_mx_result *b)
{
    /* A few hosts (max_mx_hosts), once per TTL: pairs are fine. */
    return a->status == b->status && a->nhosts == b->nhosts && a->implicit_mx == b->implicit_mx &&
           a->literal == b->literal && a->partial == b->partial && hosts_within(a, b) &&
           hosts_within(b, a);
}

static size_t
align_up(size_t n, size_t a)
{
    return (n + a - 1) & ~(a - 1);
}

static void
set_addr(union dns_addr *a, int family, const uint8_t *bytes)
{
    memset(a, 0, sizeof(*a));
    if (family == AF_INET) {
        a->sin.sin_family = AF_INET;
        memcpy(&a->sin.sin_addr, bytes, 4);
    } else {
        a->sin6.sin6_family = AF_INET6;
        memcpy(&a->sin6.sin6_addr, bytes, 16);
    }
}

struct dns_mx_result *
result_new(enum dns_status status, const char *why, const char *domain,
           const struct result_host *hosts, unsigned nhosts, bool prefer_v6)
{
    size_t naddrs = 0, ntlsa = 0, chars = strlen(domain) + 1;
    for (unsigned i = 0; i < nhosts; i++) {
        naddrs += hosts[i].n4 + hosts[i].n6;
        chars += strlen(hosts[i].name) + 1;
        if (hosts[i].expanded != NULL)
            chars += strlen(hosts[i].expanded) + 1;
        ntlsa += hosts[i].ntlsa;
        for (unsigned k = 0; k < hosts[i].ntlsa; k++)
            chars += hosts[i].tlsa[k].len;
    }
    size_t off_hosts = align_up(sizeof(struct result_box), alignof(struct dns_mx_host));
    size_t off_addrs =
        align_up(off_hosts + nhosts * sizeof(struct dns_mx_host), alignof(union dns_addr));
    size_t off_tlsa =
        align_up(off_addrs + naddrs * sizeof(union dns_addr), alignof(struct dns_tlsa));
    size_t off_chars = off_tlsa + ntlsa * sizeof(struct dns_tlsa);
    char *mem = malloc(off_chars + chars);
    if (mem == NULL)
        return NULL;
    struct result_box *b = (struct result_box *)mem;
    struct dns_mx_host *h = (struct dns_mx_host *)(mem + off_hosts);
    union dns_addr *a = (union dns_addr *)(mem + off_addrs);
    struct dns_tlsa *t = (struct dns_tlsa *)(mem + off_tlsa);
    char *s = mem + off_chars;

    atomic_init(&b->refs, 1);
    struct dns_mx_result *r = &b->pub;
    memset(r, 0, sizeof(*r));
    r->status = status;
    r->why = why;
    size_t len = strlen(domain) + 1;
    memcpy(s, domain, len);
    r->domain = s;
    s += len;
    r->nhosts = nhosts;
    r->hosts = nhosts ? h : NULL;
    for (unsigned i = 0; i < nhosts; i++) {
        const struct result_host *src = &hosts[i];
        len = strlen(src->name) + 1;
        memcpy(s, src->name, len);
        h[i].name = s;
        s += len;
        h[i].expanded = NULL;
        if (src->expanded != NULL) {
            len = strlen(src->expanded) + 1;
            memcpy(s, src->expanded, len);
            h[i].expanded = s;
            s += len;
        }
        /* the base is one of the two names: point at its copy */
        h[i].tlsa_base = src->tlsa_base == NULL       ? NULL
                         : src->tlsa_base == src->name ? h[i].name
                                                       : h[i].expanded;
        h[i].preference = src->preference;
        h[i].naddrs = src->n4 + src->n6;
        h[i].addrs = a;
        for (int pass = 0; pass < 2; pass++) {
            bool v6 = (pass == 0) == prefer_v6;
            unsigned n = v6 ? src->n6 : src->n4;
            for (unsigned k = 0; k < n; k++)
                set_addr(a++, v6 ? AF_INET6 : AF_INET, v6 ? src->a6[k] : src->a4[k]);
        }
        h[i].dane = src->dane;
        h[i].ntlsa = src->ntlsa;
        h[i].tlsa = src->ntlsa ? t : NULL;
        for (unsigned k = 0; k < src->ntlsa; k++, t++) {
            const struct wire_tlsa *w = &src->tlsa[k];
            t->usage = w->usage;
            t->selector = w->selector;
            t->mtype = w->mtype;
            t->len = w->len;
            memcpy(s, w->data, w->len);
            t->data = (const uint8_t *)s;
            s += w->len;
        }
    }
    return r;
}

struct dns_mx_result *
result_oom(void)
{
    /* Starts half way up the counter: references come and go, it is
     * never freed. */
    static struct result_box box = {
        .refs = 1u << 31,
        .pub = {.status = DNS_RETRY, .why = "out of memory", .domain = ""},
    };
    return dns_mx_result_ref(&box.pub);
}
