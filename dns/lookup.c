/*
 * lookup: one domain's resolution, as c-ares queries and their answers.
 *
 *   MX query --data--> hosts in preference order (equal ones shuffled),
 *            |         addresses from the additional section, else from
 *            |         the host cache (hosts.c: another domain's lookup
 *            |         asked), else an A and/or AAAA query per host
 *            |         (family policy); host answers go to the host cache
 *            +-nodata-> implicit MX: the domain's own A/AAAA (RFC 5321 5.1)
 *            +-one MX "."-> null MX (RFC 7505)
 *            +-NXDOMAIN-> not found
 *            +-SERVFAIL, timeout, refused, malformed-> retry
 *
 * An address lookup (dns_addr_resolve) asks no MX: the name is its one
 * host, its addresses found as an implicit MX's are (host cache, A
 * and/or AAAA per the family policy, CNAMEs followed), with no TLSA.
 *
 * With [dns] dnssec = trust_ad every query carries the AD bit, and when
 * the MX answer (or, for an implicit MX, its denial) came back with AD
 * set, each host's TLSA records (_25._tcp.HOST) are asked beside its
 * addresses: validated records, validated denial, unvalidated, or failed
 * (SERVFAIL: a validating resolver's word for bogus) go into the result
 * per host, and the records' TTL bounds the result's (RFC 7672 2.2).
 * A host whose address answers show a validated CNAME chain (AD set)
 * also has its TLSA asked at the end of the chain once the first such
 * answer is in; that answer comes first when it holds validated records
 * or failed, and the host's own otherwise (RFC 7672 2.2.2, RFC 7671 7).
 * Such a host's addresses are always asked (not taken from the host
 * cache), since the chain is only seen in an answer.
 *
 * The lookup counts its queries in flight (plus one while it is issuing
 * them, because c-ares may call back from inside ares_query); the answer
 * is built when the count drops to zero.
 *
 * Hosts are answered as the MX names them: a host that is a CNAME keeps
 * its MX name (what TLS and logs want) and gets its target's addresses;
 * under DANE a validated chain's target is in the result too.
 * MX targets that are no host names (the root among other MX records,
 * address literals, odd bytes) are skipped, as Postfix does.
 *
 * Threading: the owner thread of the struct dns.
 */
#include "dns/internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

enum fam_state {
    FS_SKIP,     /* family not wanted */
    FS_PENDING,  /* query in flight */
    FS_OK,       /* addresses found */
    FS_NODATA,   /* name exists, no address of this family */
    FS_NXDOMAIN, /* name does not exist */
    FS_TEMP,     /* try again later */
};

/* What a host's address answers say of its CNAME chain. */
enum alias_state {
    ALIAS_UNKNOWN,  /* no address answer read (yet) */
    ALIAS_NONE,     /* the name holds its addresses itself */
    ALIAS_SECURE,   /* a validated chain to expanded */
    ALIAS_INSECURE, /* a chain not validated, or answers that disagree */
};

struct lk_query {
    struct lookup *lk; /* borrowed: the lookup outlives its queries */
    int host;          /* index into hosts; -1: the MX query */
    uint16_t type;
};

/* One TLSA answer of a host. */
struct lk_tlsa {
    uint8_t st;  /* enum fam_state; FS_SKIP: not asked */
    bool ad;     /* that answer was validated */
    unsigned n;
    struct wire_tlsa rec[DNS_TLSA_MAX]; /* data in data */
    uint8_t *data;                      /* owned */
    struct lk_query q;
};

struct lk_host {
    char name[DNS_NAME_MAX + 1];
    unsigned preference;
    uint8_t st4, st6; /* enum fam_state */
    unsigned n4, n6;
    uint8_t a4[WIRE_MAX_ADDR][16];
    uint8_t a6[WIRE_MAX_ADDR][16];
    struct lk_query q4, q6;
    uint8_t alias;                      /* enum alias_state */
};

/* A host's part under DANE, beside it (lookup.dane[i] is hosts[i]'s): out
 * of line, so that without DANE one host's lk_host stays a small request
 * for malloc (a large one, over 1,008 octets, first merges every free
 * small chunk: malloc_consolidate, on each new domain). */
struct lk_dane {
    char expanded[DNS_NAME_MAX + 1];    /* ALIAS_SECURE: where the chain ends */
    /* the TLSA answers at _25._tcp.NAME ([0]) and, for a validated
     * alias, at _25._tcp.EXPANDED ([1]) */
    struct lk_tlsa tl[2];
};

struct lookup {
    struct dns *d;    /* borrowed: owns the lookup through its entry */
    struct entry *e;  /* borrowed: owns this lookup */
    unsigned pending; /* queries in flight, +1 while issuing */
    struct lk_query qmx;
    bool decided; /* the MX answer alone decided (status, why) */
    enum dns_status status;
    const char *why;
    const char *temp_why; /* why the last temporary failure of a host */
    bool implicit;
    bool mx_ad;       /* the MX answer (or its denial, for an implicit MX) was validated */
    bool tlsa_temp;   /* a TLSA lookup failed: keep the answer only error_ttl */
    bool mx_no_host;  /* MX records, none of them naming a host */
    uint32_t ttl;     /* s: min TTL of the records the answer rests on */
    uint32_t neg_ttl; /* s: min negative TTL from SOAs; UINT32_MAX: none seen */
    unsigned nhosts;
    struct lk_host *hosts; /* owned array */
    struct lk_dane *dane;  /* owned array of nhosts: when TLSA records are asked
                            * (hosts_alloc); NULL: not */
};

enum ans_kind { ANS_DATA, ANS_NODATA, ANS_NXDOMAIN, ANS_TEMP };

static inline uint32_t
min32(uint32_t a, uint32_t b)
{
    return a < b ? a : b;
}

static void
lookup_free(struct lookup *lk)
{
    if (lk->e != NULL && lk->e->lookup == lk)
        lk->e->lookup = NULL;
    for (unsigned i = 0; lk->dane != NULL && i < lk->nhosts; i++) {
        free(lk->dane[i].tl[0].data);
        free(lk->dane[i].tl[1].data);
    }
    free(lk->dane);
    free(lk->hosts);
    free(lk);
}

static void on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen);

static void
send_query(struct lookup *lk, struct lk_query *q, const char *name, uint16_t type)
{
    struct dns *d = lk->d;
    q->lk = lk;
    q->type = type;
    lk->pending++;
    d->stats.queries++;
    if (!d->deadline_dirty) {
        /* c-ares arms a first try at now + timeout: the deadline can only
         * move that early, so no linear ares_timeout() walk is needed. */
        uint64_t t = clock_mono_ns() + d->cfg.timeout * 1000000ULL;
        if (t < d->deadline)
            d->deadline = t;
    }
    if (d->cfg.dnssec != DNS_DNSSEC_TRUST_AD) {
        ares_query(d->channel, name, 1 /* IN */, type, on_answer, q);
        return;
    }
    /* c-ares 1.18 has no flag for it: make the query, set AD (RFC 6840
     * 5.7: "tell me whether you validated this"; no DO, so no RRSIGs
     * swell the answer), send it as it is. ares_send() keeps the id the
     * message has, so it gets a random one here (ares_query() draws its
     * own; with 0 for all, every query had the same id). */
    unsigned char *buf = NULL;
    int len = 0;
    int arc = ares_create_query(name, 1 /* IN */, type, dns_qid(d), 1, &buf, &len, 1232);
    if (arc != ARES_SUCCESS) {
        on_answer(q, arc, 0, NULL, 0);
        return;
    }
    buf[3] |= 0x20;
    ares_send(d->channel, buf, len, on_answer, q);
    ares_free_string(buf);
}

/* "_25._tcp.HOST" (RFC 7672 2.2.2). Returns false when it is too long to
 * exist. */
static bool
tlsa_name(const char *host, char out[DNS_NAME_MAX + 1])
{
    static const char prefix[] = "_25._tcp.";
    size_t p = sizeof(prefix) - 1, n = strlen(host);
    if (p + n > DNS_NAME_MAX)
        return false;
    memcpy(out, prefix, p);
    memcpy(out + p, host, n + 1);
    return true;
}

static uint64_t
clamp_ms(uint64_t ms, uint64_t lo, uint64_t hi)
{
    if (ms < lo)
        ms = lo;
    if (ms > hi)
        ms = hi;
    return ms;
}

/* How long the cache keeps a result of this status, in ms. */
static uint64_t
result_ttl_ms(const struct lookup *lk, enum dns_status status, bool partial)
{
    const struct dns_config *c = &lk->d->cfg;
    uint64_t ms;
    switch (status) {
    case DNS_OK:
    case DNS_NULL_MX:
        ms = clamp_ms((uint64_t)lk->ttl * 1000, c->min_ttl, c->max_ttl);
        if (partial && ms > c->error_ttl)
            ms = c->error_ttl; /* come back soon for the hosts that failed */
        return ms;
    case DNS_NOT_FOUND:
    case DNS_FAIL:
        ms = c->negative_ttl;
        if (lk->neg_ttl != UINT32_MAX && (uint64_t)lk->neg_ttl * 1000 < ms)
            ms = (uint64_t)lk->neg_ttl * 1000;
        return clamp_ms(ms, c->min_ttl, c->max_ttl);
    case DNS_RETRY:
        return c->error_ttl;
    }
    return 0;
}

/* How long a not-found answer (NXDOMAIN, or no data of the type asked)
 * is kept, in ms before clamping: negative_ttl, or less when its SOA says
 * so (RFC 2308 5). */
static uint64_t
negative_ms(const struct dns_config *c, const struct wire_answer *a)
{
    uint64_t ms = c->negative_ttl;
    if (a->soa && (uint64_t)a->neg_ttl * 1000 < ms)
        ms = (uint64_t)a->neg_ttl * 1000;
    return ms;
}

static void
finish(struct lookup *lk)
{
    struct dns *d = lk->d;
    struct result_host rh[WIRE_MAX_MX];
    unsigned n = 0;
    enum dns_status status;
    const char *why;
    bool partial = false, nx = false;

    if (lk->decided) {
        status = lk->status;
        why = lk->why;
    } else {
        bool temp = false;
        for (unsigned i = 0; i < lk->nhosts; i++) {
            struct lk_host *h = &lk->hosts[i];
            temp |= h->st4 == FS_TEMP || h->st6 == FS_TEMP;
            if (h->n4 + h->n6 == 0)
                continue;
            rh[n].name = h->name;
            rh[n].preference = h->preference;
            rh[n].n4 = h->n4;
            rh[n].n6 = h->n6;
            rh[n].a4 = (const uint8_t(*)[16])h->a4;
            rh[n].a6 = (const uint8_t(*)[16])h->a6;
            rh[n].ntlsa = 0;
            rh[n].tlsa = NULL;
            static const struct lk_tlsa not_asked; /* FS_SKIP */
            struct lk_dane *dn = lk->dane != NULL ? &lk->dane[i] : NULL;
            rh[n].expanded = dn != NULL && h->alias == ALIAS_SECURE ? dn->expanded : NULL;
            /* RFC 7672 2.2.2: the expanded name's answer when it has
             * validated records or failed, else the MX name's. */
            const struct lk_tlsa *t = dn != NULL ? &dn->tl[0] : &not_asked;
            rh[n].tlsa_base = h->name;
            if (rh[n].expanded != NULL &&
                (dn->tl[1].st == FS_TEMP || (dn->tl[1].st == FS_OK && dn->tl[1].ad))) {
                t = &dn->tl[1];
                rh[n].tlsa_base = dn->expanded;
            }
            switch (t->st) {
            case FS_OK:
                rh[n].dane = t->ad ? DNS_DANE_SECURE : DNS_DANE_INSECURE;
                if (t->ad) {
                    rh[n].ntlsa = t->n;
                    rh[n].tlsa = t->rec;
                    d->stats.tlsa_secure++;
                }
                break;
            case FS_NODATA:
            case FS_NXDOMAIN:
                rh[n].dane = t->ad ? DNS_DANE_NO_TLSA : DNS_DANE_INSECURE;
                break;
            case FS_TEMP:
                rh[n].dane = DNS_DANE_TEMPFAIL;
                break;
            default:
                rh[n].dane = DNS_DANE_NONE;
                rh[n].tlsa_base = NULL;
                break;
            }
            n++;
        }
        if (n > 0) {
            status = DNS_OK;
            why = lk->e->addr ? "addresses" : lk->implicit ? "implicit MX" : "MX";
            partial = temp;
        } else if (temp) {
            status = DNS_RETRY;
            why = lk->temp_why;
        } else if (lk->e->addr) {
            status = DNS_NOT_FOUND;
            why = "no address records";
        } else if (lk->implicit) {
            status = DNS_NOT_FOUND;
            why = "no MX and no address records";
        } else {
            /* Every MX host's name NXDOMAIN for each family asked (not a
             * host without records of the family configured, NODATA): a
             * recipient domain's MX records name hosts that do not
             * exist, an error of its own (RFC 5321 5.1), as Postfix's
             * "Host not found" is. */
            nx = lk->nhosts > 0;
            for (unsigned i = 0; i < lk->nhosts && nx; i++) {
                const struct lk_host *h = &lk->hosts[i];
                nx = (h->st4 == FS_NXDOMAIN || h->st4 == FS_SKIP) &&
                     (h->st6 == FS_NXDOMAIN || h->st6 == FS_SKIP) &&
                     (h->st4 == FS_NXDOMAIN || h->st6 == FS_NXDOMAIN);
            }
            status = DNS_FAIL;
            why = nx ? "no MX host exists (NXDOMAIN)" : "no MX host has an address";
        }
    }
    uint64_t ttl_ms = result_ttl_ms(lk, status, partial);
    if (lk->tlsa_temp && ttl_ms > d->cfg.error_ttl)
        ttl_ms = d->cfg.error_ttl; /* ask again soon: the host is unusable meanwhile */
    struct dns_mx_result *res =
        result_new(status, why, lk->e->name, rh, n, d->cfg.prefer == DNS_FAMILY_V6);
    if (res == NULL) {
        res = result_oom();
    } else {
        res->implicit_mx = lk->implicit && status == DNS_OK;
        res->partial = partial;
        res->hosts_nx = nx;
        res->mx_no_host = lk->mx_no_host;
        res->ttl = (uint32_t)(ttl_ms / 1000);
        res->expires = clock_mono_ns() + ttl_ms * 1000000ULL;
    }
    struct entry *e = lk->e;
    lookup_free(lk);
    dns_lookup_done(d, e, res);
}

static void
lookup_put(struct lookup *lk)
{
    if (--lk->pending > 0)
        return;
    if (lk->d->destroying)
        lookup_free(lk);
    else
        finish(lk);
}

static void
decide(struct lookup *lk, enum dns_status status, const char *why)
{
    lk->decided = true;
    lk->status = status;
    lk->why = why;
}

/* Sort by preference, shuffle each run of equal preferences, drop
 * repeated names (keeping the best preference). Returns the count. */
static unsigned
order_mx(struct dns *d, struct wire_mx *mx, unsigned n)
{
    for (unsigned i = 1; i < n; i++) {
        struct wire_mx t = mx[i];
        unsigned j = i;
        for (; j > 0 && mx[j - 1].preference > t.preference; j--)
            mx[j] = mx[j - 1];
        mx[j] = t;
    }
    for (unsigned start = 0; start < n;) {
        unsigned end = start + 1;
        while (end < n && mx[end].preference == mx[start].preference)
            end++;
        for (unsigned i = end - 1; i > start; i--) {
            unsigned j = start + (unsigned)(dns_rand(d) % (i - start + 1));
            if (j != i) {
                struct wire_mx t = mx[i];
                mx[i] = mx[j];
                mx[j] = t;
            }
        }
        start = end;
    }
    unsigned out = 0;
    for (unsigned i = 0; i < n; i++) {
        bool dup = false;
        for (unsigned k = 0; k < out && !dup; k++)
            dup = strcmp(mx[k].host, mx[i].host) == 0;
        if (!dup) {
            if (out != i)
                mx[out] = mx[i];
            out++;
        }
    }
    return out;
}

/* Ask name's TLSA records into t; a name too long for the prefix is
 * not asked (t stays FS_SKIP). */
static void
ask_tlsa(struct lookup *lk, struct lk_tlsa *t, const char *name)
{
    char tname[DNS_NAME_MAX + 1];
    if (!tlsa_name(name, tname))
        return;
    t->st = FS_PENDING;
    lk->d->stats.tlsa_queries++;
    send_query(lk, &t->q, tname, WIRE_T_TLSA);
}

/* Under DANE, what an address answer (data or no data) of host i says
 * of its CNAME chain; the first validated chain asks the TLSA records at
 * its end. Answers that disagree leave no expanded name. */
static void
note_alias(struct lookup *lk, unsigned i, const struct wire_answer *a)
{
    struct lk_host *h = &lk->hosts[i];
    if (lk->dane == NULL) /* no DANE (hosts_alloc) */
        return;
    struct lk_dane *dn = &lk->dane[i];
    enum alias_state seen = a->chain == 0 ? ALIAS_NONE : a->ad ? ALIAS_SECURE : ALIAS_INSECURE;
    if (h->alias == ALIAS_UNKNOWN) {
        h->alias = (uint8_t)seen;
        if (seen != ALIAS_SECURE)
            return;
        memcpy(dn->expanded, a->final, sizeof(dn->expanded));
        ask_tlsa(lk, &dn->tl[1], dn->expanded);
    } else if (h->alias != seen || (seen == ALIAS_SECURE && strcmp(dn->expanded, a->final) != 0)) {
        h->alias = ALIAS_INSECURE;
    }
}

static void
want_addresses(struct lookup *lk, unsigned i, const uint8_t *abuf, size_t alen)
{
    struct lk_host *h = &lk->hosts[i];
    int family = lk->d->cfg.family;
    h->st4 = family == DNS_FAMILY_V6 ? FS_SKIP : FS_PENDING;
    h->st6 = family == DNS_FAMILY_V4 ? FS_SKIP : FS_PENDING;
    h->q4.host = h->q6.host = (int)i;
    /* The additional section of the MX answer often holds the addresses:
     * take them per family, and ask only for what is missing. */
    if (abuf != NULL && h->st4 == FS_PENDING) {
        uint32_t ttl = UINT32_MAX;
        h->n4 = wire_additional(abuf, alen, h->name, WIRE_T_A, h->a4, WIRE_MAX_ADDR, &ttl);
        if (h->n4 > 0) {
            h->st4 = FS_OK;
            lk->ttl = min32(lk->ttl, ttl);
        }
    }
    if (abuf != NULL && h->st6 == FS_PENDING) {
        uint32_t ttl = UINT32_MAX;
        h->n6 = wire_additional(abuf, alen, h->name, WIRE_T_AAAA, h->a6, WIRE_MAX_ADDR, &ttl);
        if (h->n6 > 0) {
            h->st6 = FS_OK;
            lk->ttl = min32(lk->ttl, ttl);
        }
    }
    /* Addresses held by the name itself: no CNAME. */
    if (h->n4 + h->n6 > 0)
        h->alias = ALIAS_NONE;
    /* DANE: TLSA records matter only when the MX name itself was
     * validated (RFC 7672 2.2.1); they are asked beside the addresses. */
    bool dane = lk->dane != NULL; /* hosts_alloc */
    /* What another domain naming this host was answered (hosts.c); not
     * under DANE before the name is known to be no alias: only an
     * answer shows the CNAME chain (2.2.2). */
    for (int v6 = 0; v6 < 2; v6++) {
        uint8_t *st = v6 ? &h->st6 : &h->st4;
        struct host_addrs ha;
        if (*st != FS_PENDING || (dane && h->alias != ALIAS_NONE) ||
            !hosts_find(lk->d, h->name, v6, &ha))
            continue;
        if (ha.st == HOST_OK) {
            memcpy(v6 ? h->a6 : h->a4, ha.addr, (size_t)ha.n * 16);
            if (v6)
                h->n6 = ha.n;
            else
                h->n4 = ha.n;
            *st = FS_OK;
            lk->ttl = min32(lk->ttl, ha.ttl);
        } else {
            *st = ha.st == HOST_NODATA ? FS_NODATA : FS_NXDOMAIN;
            lk->neg_ttl = min32(lk->neg_ttl, ha.ttl);
        }
    }
    if (dane) {
        lk->dane[i].tl[0].q.host = lk->dane[i].tl[1].q.host = (int)i;
        ask_tlsa(lk, &lk->dane[i].tl[0], h->name);
    }
    if (h->st4 == FS_PENDING)
        send_query(lk, &h->q4, h->name, WIRE_T_A);
    if (h->st6 == FS_PENDING)
        send_query(lk, &h->q6, h->name, WIRE_T_AAAA);
}

/* The one host is the name itself (an implicit MX, or an address
 * lookup); a CNAME'd name is followed by the A/AAAA queries, as for any
 * host. */
/* n hosts for lk, and their DANE part when it asks TLSA records (the MX
 * name itself validated, RFC 7672 2.2.1); 0, or -ENOMEM (none made). */
static int
hosts_alloc(struct lookup *lk, unsigned n)
{
    bool dane = lk->d->cfg.dnssec == DNS_DNSSEC_TRUST_AD && lk->mx_ad;
    lk->hosts = calloc(n, sizeof(*lk->hosts));
    if (lk->hosts != NULL && dane && (lk->dane = calloc(n, sizeof(*lk->dane))) == NULL) {
        free(lk->hosts);
        lk->hosts = NULL;
    }
    return lk->hosts != NULL ? 0 : -ENOMEM;
}

static void
want_own_addresses(struct lookup *lk)
{
    if (hosts_alloc(lk, 1) < 0) {
        decide(lk, DNS_RETRY, "out of memory");
        return;
    }
    lk->nhosts = 1;
    memcpy(lk->hosts[0].name, lk->e->name, strlen(lk->e->name) + 1);
    lk->hosts[0].preference = 0;
    want_addresses(lk, 0, NULL, 0);
}

static void
on_mx(struct lookup *lk, enum ans_kind kind, struct wire_answer *a, const char *temp_why,
      const uint8_t *abuf, size_t alen)
{
    struct dns *d = lk->d;
    lk->mx_ad = a->ad;
    switch (kind) {
    case ANS_TEMP:
        decide(lk, DNS_RETRY, temp_why);
        return;
    case ANS_NXDOMAIN:
        if (a->soa)
            lk->neg_ttl = min32(lk->neg_ttl, a->neg_ttl);
        decide(lk, DNS_NOT_FOUND, "NXDOMAIN");
        return;
    case ANS_NODATA:
        if (a->soa)
            lk->neg_ttl = min32(lk->neg_ttl, a->neg_ttl);
        /* An implicit MX rests on there being no MX records as much as
         * on the domain's addresses: it is kept no longer than that
         * denial, so that MX records or a null MX published later are
         * seen when a resolver would see them, not after the address
         * records' TTL (up to max_ttl). */
        lk->ttl = min32(lk->ttl, (uint32_t)(negative_ms(&d->cfg, a) / 1000));
        lk->implicit = true;
        want_own_addresses(lk);
        return;
    case ANS_DATA:
        break;
    }
    lk->ttl = min32(lk->ttl, a->ttl);
    /* A null MX: the root as the only target (RFC 7505 3: no other MX
     * beside it; the record twice over, as a careless server sends it,
     * says no more than once). Beside real targets it is ignored. */
    unsigned roots = 0;
    for (unsigned i = 0; i < a->n; i++)
        roots += a->mx[i].host[0] == '\0';
    if (a->n > 0 && roots == a->n) {
        decide(lk, DNS_NULL_MX, "null MX (RFC 7505)");
        return;
    }
    unsigned n = 0;
    for (unsigned i = 0; i < a->n; i++)
        if (a->mx[i].ok)
            a->mx[n++] = a->mx[i];
    n = order_mx(d, a->mx, n);
    if (n == 0) {
        lk->mx_no_host = true;
        decide(lk, DNS_FAIL, "no MX target is a host name (an IP address or a malformed name)");
        return;
    }
    if (n > d->cfg.max_mx_hosts)
        n = d->cfg.max_mx_hosts;
    if (hosts_alloc(lk, n) < 0) {
        decide(lk, DNS_RETRY, "out of memory");
        return;
    }
    lk->nhosts = n;
    for (unsigned i = 0; i < n; i++) {
        memcpy(lk->hosts[i].name, a->mx[i].host, sizeof(a->mx[i].host));
        lk->hosts[i].preference = a->mx[i].preference;
    }
    for (unsigned i = 0; i < n; i++)
        want_addresses(lk, i, abuf, alen);
}

static void
on_addr(struct lookup *lk, struct lk_query *q, enum ans_kind kind, struct wire_answer *a,
        const char *temp_why)
{
    struct lk_host *h = &lk->hosts[q->host];
    bool v4 = q->type == WIRE_T_A;
    uint8_t *st = v4 ? &h->st4 : &h->st6;
    if (kind == ANS_DATA || kind == ANS_NODATA)
        note_alias(lk, (unsigned)q->host, a);
    switch (kind) {
    case ANS_DATA:
        memcpy(v4 ? h->a4 : h->a6, a->addr, (size_t)a->n * 16);
        if (v4)
            h->n4 = a->n;
        else
            h->n6 = a->n;
        *st = FS_OK;
        lk->ttl = min32(lk->ttl, a->ttl);
        hosts_put(lk->d, h->name, !v4, HOST_OK, (const uint8_t(*)[16])a->addr, a->n,
                  clamp_ms((uint64_t)a->ttl * 1000, lk->d->cfg.min_ttl, lk->d->cfg.max_ttl));
        return;
    case ANS_NODATA:
    case ANS_NXDOMAIN: {
        *st = kind == ANS_NODATA ? FS_NODATA : FS_NXDOMAIN;
        if (a->soa)
            lk->neg_ttl = min32(lk->neg_ttl, a->neg_ttl);
        /* As long as a not-found domain is kept (result_ttl_ms). */
        const struct dns_config *c = &lk->d->cfg;
        hosts_put(lk->d, h->name, !v4, kind == ANS_NODATA ? HOST_NODATA : HOST_NXDOMAIN, NULL, 0,
                  clamp_ms(negative_ms(c, a), c->min_ttl, c->max_ttl));
        return;
    }
    case ANS_TEMP:
        *st = FS_TEMP;
        lk->temp_why = temp_why;
        return;
    }
}

/* A TLSA answer of a host (q->type TLSA, q is lk->dane[host].tl[k].q), its records
 * copied out of the message. */
static void
on_tlsa(struct lookup *lk, struct lk_query *q, enum ans_kind kind, struct wire_answer *a,
        const uint8_t *abuf, size_t alen)
{
    struct lk_dane *dn = &lk->dane[q->host]; /* TLSA: asked under DANE only */
    struct lk_tlsa *t = q == &dn->tl[1].q ? &dn->tl[1] : &dn->tl[0];
    t->ad = a->ad;
    /* wire_answer keeps no TLSA records (kind is NODATA when there are
     * some): wire_tlsa reads them at the end of the CNAME chain. */
    if (kind == ANS_TEMP) {
        t->st = FS_TEMP;
        lk->tlsa_temp = true;
        lk->d->stats.tlsa_failed++;
        return;
    }
    if (kind == ANS_NXDOMAIN || abuf == NULL) {
        t->st = kind == ANS_NXDOMAIN ? FS_NXDOMAIN : FS_NODATA;
        if (a->soa)
            lk->ttl = min32(lk->ttl, a->neg_ttl);
        return;
    }
    struct wire_tlsa rec[DNS_TLSA_MAX];
    uint32_t ttl = UINT32_MAX;
    int n = wire_tlsa(abuf, alen, a->final, rec, DNS_TLSA_MAX, &ttl);
    if (n < 0) {
        /* A validated answer we cannot read is no proof of absence. */
        t->st = FS_TEMP;
        lk->tlsa_temp = true;
        lk->d->stats.tlsa_failed++;
        return;
    }
    if (n == 0) {
        t->st = FS_NODATA;
        if (a->soa)
            lk->ttl = min32(lk->ttl, a->neg_ttl);
        return;
    }
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += rec[i].len <= DNS_TLSA_DATA_MAX ? rec[i].len : 0;
    t->data = malloc(total ? total : 1);
    if (t->data == NULL) {
        t->st = FS_TEMP;
        lk->tlsa_temp = true;
        return;
    }
    uint8_t *p = t->data;
    t->n = 0;
    for (int i = 0; i < n; i++) {
        if (rec[i].len > DNS_TLSA_DATA_MAX)
            continue; /* no digest is that long; an oversized full certificate is unusable */
        memcpy(p, rec[i].data, rec[i].len);
        t->rec[t->n] = rec[i];
        t->rec[t->n].data = p;
        t->n++;
        p += rec[i].len;
    }
    t->st = FS_OK;
    lk->ttl = min32(lk->ttl, min32(a->ttl, ttl));
}

const char *
dns_ares_why(int status)
{
    switch (status) {
    case ARES_ESERVFAIL:
        return "SERVFAIL";
    case ARES_ETIMEOUT:
        return "timeout";
    case ARES_ECONNREFUSED:
        /* what c-ares 1.18 ends with after skipping servers that answered
         * SERVFAIL, REFUSED or NOTIMP, as well as when none could be reached */
        return "server failure (SERVFAIL, REFUSED or unreachable)";
    case ARES_EREFUSED:
        return "REFUSED";
    case ARES_ENOTIMP:
        return "NOTIMP";
    case ARES_EFORMERR:
        return "FORMERR";
    case ARES_EBADRESP:
        return "malformed answer";
    case ARES_ENOMEM:
        return "out of memory";
    default:
        return "resolver error";
    }
}

static void
on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    struct lk_query *q = arg;
    struct lookup *lk = q->lk;
    struct dns *d = lk->d;
    d->stats.timeouts += (unsigned)timeouts;
    if (d->destroying || status == ARES_EDESTRUCTION || status == ARES_ECANCELLED) {
        lookup_put(lk);
        return;
    }
    const char *qname = q->host < 0 ? lk->e->name : lk->hosts[q->host].name;
    char tname[DNS_NAME_MAX + 1];
    if (q->type == WIRE_T_TLSA) {
        if (q == &lk->dane[q->host].tl[1].q)
            qname = lk->dane[q->host].expanded;
        tlsa_name(qname, tname);
        qname = tname;
    }
    /* Big (the MX targets): on the stack of this callback only. */
    struct wire_answer a;
    a.n = 0;
    a.soa = false;
    a.ad = false;
    enum ans_kind kind = ANS_TEMP;
    const char *temp_why = dns_ares_why(status);
    if (abuf != NULL && alen > 0 &&
        (status == ARES_SUCCESS || status == ARES_ENODATA || status == ARES_ENOTFOUND)) {
        int wrc = wire_answer(abuf, (size_t)alen, qname, q->type, &a);
        if (wrc == -E2BIG) {
            temp_why = "more MX records than are read (512)";
        } else if (wrc < 0) {
            temp_why = "malformed answer";
        } else if (a.rcode == WIRE_NXDOMAIN) {
            kind = ANS_NXDOMAIN;
        } else if (a.rcode != WIRE_NOERROR) {
            temp_why = "resolver error";
        } else if (a.n > 0) {
            kind = ANS_DATA;
        } else if (a.chain_bad) {
            temp_why = "CNAME chain too long or to a bad name";
        } else if (a.referral) {
            /* not "no such records": a server that does not recurse (an
             * authoritative one in [dns] servers, a broken forwarder)
             * says where to ask; taken as no data, it bounced all mail */
            temp_why = "referral, not an answer (the DNS server does not recurse)";
        } else {
            kind = ANS_NODATA;
        }
    } else if (status == ARES_ENOTFOUND || status == ARES_ENODATA) {
        /* no message to read: still the server's word */
        memset(&a, 0, sizeof(a));
        kind = status == ARES_ENOTFOUND ? ANS_NXDOMAIN : ANS_NODATA;
    }
    if (q->host < 0)
        on_mx(lk, kind, &a, temp_why, abuf, abuf ? (size_t)alen : 0);
    else if (q->type == WIRE_T_TLSA)
        on_tlsa(lk, q, kind, &a, abuf, abuf ? (size_t)alen : 0);
    else
        on_addr(lk, q, kind, &a, temp_why);
    lookup_put(lk);
}

void
lookup_start(struct dns *d, struct entry *e)
{
    struct lookup *lk = calloc(1, sizeof(*lk));
    if (lk == NULL) {
        dns_lookup_done(d, e, result_oom());
        return;
    }
    lk->d = d;
    lk->e = e;
    lk->ttl = UINT32_MAX;
    lk->neg_ttl = UINT32_MAX;
    lk->qmx.host = -1;
    lk->temp_why = "resolver error";
    e->lookup = lk;
    lk->pending = 1; /* held while issuing: c-ares may answer from inside ares_query */
    if (e->addr)
        want_own_addresses(lk); /* no MX query: the name's A/AAAA only */
    else
        send_query(lk, &lk->qmx, e->name, WIRE_T_MX);
    lookup_put(lk);
}
