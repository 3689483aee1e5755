/*
 * dns: MX resolution for delivery, on c-ares, with a per-thread TTL cache.
 *
 * One struct dns per worker thread: a c-ares channel, a cache of MX
 * answers keyed by domain, and the lookups in flight. It knows no event
 * loop. Its host (engine/resolver.c on an io_uring worker, or a plain
 * poll() loop in tests and tools) is told which sockets to watch through
 * the dns_sock_fn given to dns_new(), calls dns_process_fd() when one is
 * ready, asks dns_timeout() for the next deadline and calls
 * dns_process_timeouts() once it passed. Nothing here blocks, sleeps or
 * starts a thread; dns_new() reads /etc/resolv.conf once when no servers
 * are configured.
 *
 * A lookup (dns_mx_resolve) finds the domain's MX hosts in preference
 * order (equal preferences shuffled per lookup), the implicit MX of RFC
 * 5321 5.1 when there is none, the null MX of RFC 7505, and each host's
 * IPv4/IPv6 addresses (from the additional section when the server gave
 * them, else by A/AAAA queries; CNAMEs followed as resolvers do), and,
 * with dnssec = trust_ad and a validated MX answer, each host's TLSA
 * records for DANE and whether they were validated: at _25._tcp.TARGET
 * first when the host is an alias whose CNAME chain to TARGET was
 * validated, then at _25._tcp.HOST (RFC 7672 2.2.2). A
 * domain costs one lookup per TTL: answers are cached, and a request for
 * a domain whose lookup is in flight joins it.
 *
 * An address lookup (dns_addr_resolve) finds a host name's own IPv4/IPv6
 * addresses and asks no MX: for a host that is reached by name, such as
 * the MTA-STS policy host (RFC 8461 3.3), whatever MX records its name
 * has. It shares the cache (as an entry apart from the name's MX
 * answer), the MX hosts' address answers, the TTL rules, the answer
 * checks and the completion rule below.
 *
 * Completion rule: dns_mx_resolve() (and dns_addr_resolve()) returns 1
 * when the answer is known at once (cache hit, domain literal, bad name,
 * or a lookup that failed before it could wait) and hands the result out
 * through *res; the callback is then never called. It returns 0 when the
 * answer must wait: the callback runs exactly once, later, from
 * dns_process_fd() or dns_process_timeouts() on the same thread (never
 * from inside dns_mx_resolve or dns_addr_resolve), unless dns_cancel()
 * came first.
 *
 * Threading: a struct dns and its requests belong to the thread that
 * created it. Results are immutable and their reference count is atomic,
 * so a result may be handed to and released on any thread.
 *
 * Errors: functions return 0 or a negative code: -errno or enum
 * dns_error; dns_strerror() names both. DNS outcomes are not errors: they
 * are the status of a result.
 */
#ifndef SLUICE_DNS_DNS_H
#define SLUICE_DNS_DNS_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "common/conf.h"

struct dns;
struct dns_req;

/* ---- configuration: the [dns] section ---- */

enum dns_family { DNS_FAMILY_V4, DNS_FAMILY_V6, DNS_FAMILY_BOTH };

/* Whose word on DNSSEC sluice takes. c-ares does not validate: with
 * TRUST_AD every query carries the AD bit (RFC 6840 5.7) and an answer
 * counts as validated when the server set AD in it, which only means
 * something when the server is a validating resolver on this host
 * (dns_config_check refuses servers off loopback). DANE needs it. */
enum dns_dnssec { DNS_DNSSEC_OFF, DNS_DNSSEC_TRUST_AD };

struct dns_config {
    char *servers;         /* owned; "127.0.0.1:5353, [::1]"; NULL: /etc/resolv.conf */
    uint64_t timeout;      /* ms, first try; c-ares doubles it each round of servers */
    unsigned tries;        /* rounds over the servers before a query gives up */
    int family;            /* enum dns_family: addresses wanted for MX hosts */
    int prefer;            /* enum dns_family (V4 or V6): which comes first with BOTH */
    unsigned cache_size;   /* domains kept (LRU beyond) */
    uint64_t min_ttl;      /* ms; answers are kept at least this long */
    uint64_t max_ttl;      /* ms; and at most this long */
    uint64_t negative_ttl; /* ms; not-found answers, implicit MX: without SOA; the cap with one */
    uint64_t error_ttl;    /* ms; retry answers (SERVFAIL, timeout); 0: not kept */
    unsigned max_mx_hosts; /* MX hosts kept per domain, best first */
    unsigned max_inflight; /* lookups in flight; more wait in arrival order (one whose
                            * server stayed silent a whole try gives its place up) */
    int dnssec;            /* enum dns_dnssec */
};

/* The key table for struct dns_config (conf_defaults, conf_set, conf_free). */
extern const struct conf_key dns_conf_keys[];

/* Check what the key table cannot: the servers list, min_ttl <= max_ttl,
 * and with dnssec = trust_ad servers that are all on loopback (an AD bit
 * that crossed a network proves nothing). Returns 0, DNS_ESERVERS or
 * -EINVAL, with the key at fault in *bad ("servers", "min_ttl" or
 * "dnssec"; a static string) and one line in err for the operator. */
int dns_config_check(const struct dns_config *cfg, const char **bad, char *err, size_t errlen);

/* ---- errors ---- */

/* The module's own range (the queue has -31000..). Also returned: -ENOMEM. */
enum dns_error {
    DNS_EINIT = -32000,    /* c-ares could not set up a channel */
    DNS_ESERVERS = -32001, /* the servers list does not parse */
};

/* Text for any code this module returns (never NULL, static storage). */
const char *dns_strerror(int rc);

/* ---- results ---- */

enum dns_status {
    DNS_OK,        /* hosts[] holds at least one host with an address */
    DNS_NOT_FOUND, /* NXDOMAIN, or neither MX nor address records: bounce */
    DNS_NULL_MX,   /* RFC 7505 null MX: bounce at once with 5.1.10 */
    DNS_RETRY,     /* SERVFAIL, timeout, refused, local shortage: defer */
    DNS_FAIL,      /* a bad domain name (bad_name), no MX host with an address or name */
};
const char *dns_status_str(enum dns_status status);

/* One address, port 0 (the caller sets it): sa.sa_family says which. */
union dns_addr {
    struct sockaddr sa;
    struct sockaddr_in sin;
    struct sockaddr_in6 sin6;
};

static inline socklen_t
dns_addr_len(const union dns_addr *a)
{
    return a->sa.sa_family == AF_INET6 ? sizeof(a->sin6) : sizeof(a->sin);
}

/* What DNS says about DANE (RFC 7672) for one MX host: its TLSA records,
 * looked up only with dnssec = trust_ad and when the MX answer itself
 * was validated (2.2.1: an insecure MX name is no reference identifier
 * worth authenticating). The TLSA base domain (2.2.2) is the host's
 * expanded name (the end of its validated CNAME chain) when the answer
 * there holds validated records or failed, else the host's own name:
 * a validated denial or an unvalidated answer at the expanded name
 * falls back to _25._tcp.HOST. A chain not validated end to end leaves
 * the host's own name only. */
enum dns_dane {
    DNS_DANE_NONE,     /* not looked up: dnssec off, MX answer not validated, literal */
    DNS_DANE_INSECURE, /* the TLSA answer was not validated (unsigned zone): opportunistic */
    DNS_DANE_NO_TLSA,  /* validated denial: no TLSA records, opportunistic */
    DNS_DANE_SECURE,   /* validated TLSA records: TLS mandatory, authenticated by them */
    DNS_DANE_TEMPFAIL, /* SERVFAIL (bogus), timeout: the host may not be used now (2.2) */
};
const char *dns_dane_str(enum dns_dane dane);

/* One TLSA record (RFC 6698 2.1). */
struct dns_tlsa {
    uint8_t usage;       /* 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE */
    uint8_t selector;    /* 0 full certificate, 1 SubjectPublicKeyInfo */
    uint8_t mtype;       /* 0 exact, 1 SHA-256, 2 SHA-512 */
    uint16_t len;        /* octets of data, 1..DNS_TLSA_DATA_MAX */
    const uint8_t *data; /* borrowed: lives as long as the result */
};
#define DNS_TLSA_MAX      16   /* records kept per host; more are dropped */
#define DNS_TLSA_DATA_MAX 4096 /* larger association data is dropped */

struct dns_mx_host {
    const char *name;            /* borrowed: lives as long as the result; as the MX names it */
    unsigned preference;         /* 0 for an implicit MX or a literal */
    unsigned naddrs;             /* >= 1 */
    const union dns_addr *addrs; /* borrowed: lives as long as the result; preferred family first */
    enum dns_dane dane;
    unsigned ntlsa;              /* DNS_DANE_SECURE: records (may be 0 after drops) */
    const struct dns_tlsa *tlsa; /* borrowed: lives as long as the result */
    /* borrowed: lives as long as the result. Where name's CNAME chain
     * ends, when TLSA records were looked up (dane is not
     * DNS_DANE_NONE), name is an alias and the address answers that
     * show the chain were validated; else NULL. With DNS_DANE_SECURE
     * both name and expanded are reference identifiers for the
     * certificate's names (RFC 7672 3.2.2). */
    const char *expanded;
    /* borrowed: lives as long as the result. The TLSA base domain whose
     * answer dane tells ("_25._tcp." + it was asked): name or expanded;
     * NULL with DNS_DANE_NONE. */
    const char *tlsa_base;
};

/* An answer. Immutable and refcounted: whoever is handed one owns one
 * reference and drops it with dns_mx_result_unref(). */
struct dns_mx_result {
    enum dns_status status;
    const char *why;    /* static text: "NXDOMAIN", "timeout", "no MX host has an address", ... */
    const char *domain; /* borrowed: lives as long as the result; normalised */
    bool implicit_mx;   /* no MX records: hosts[0] is the domain itself */
    bool literal;       /* the domain was [IPv4] or [IPv6:...]: no DNS asked */
    /* DNS_FAIL for a name that can exist nowhere (bad syntax, an
     * all-numeric last label such as 192.0.2.1, a bad address literal):
     * no DNS asked, and asking again later cannot change the answer. */
    bool bad_name;
    /* DNS_FAIL: every MX host's name is NXDOMAIN (for each family
     * asked): the domain's MX records name hosts that do not exist */
    bool hosts_nx;
    /* DNS_FAIL: the domain has MX records, but none names a host: each
     * target is an address (MX 10 192.0.2.1, which RFC 5321 5.1 does not
     * allow) or no host name at all; looking again will not change it */
    bool mx_no_host;
    bool partial;       /* some MX hosts failed temporarily and are missing */
    uint32_t ttl;       /* seconds the cache keeps it (after clamping) */
    uint64_t expires;   /* CLOCK_MONOTONIC ns when the cache drops it */
    unsigned nhosts;    /* 0 unless status is DNS_OK */
    const struct dns_mx_host *hosts; /* borrowed: lives as long as the result; best first */
};

struct dns_mx_result *dns_mx_result_ref(struct dns_mx_result *res);
/* Drop one reference; frees on the last. Returns NULL. */
struct dns_mx_result *dns_mx_result_unref(struct dns_mx_result *res);
/* Do a and b say the same of their domain: status, flags, and the same
 * MX hosts (name, preference, DANE status) with the same addresses, in
 * whatever order (hosts of equal preference are shuffled per lookup)?
 * TLSA records, TTLs and why are not compared. For a caller that asks
 * again once an answer expires and keeps what it worked out from the old
 * one when nothing changed. */
bool dns_mx_result_same(const struct dns_mx_result *a, const struct dns_mx_result *b);

/* ---- the resolver ---- */

/* Watch fd: readable and/or writable; both false: stop watching, the fd
 * is about to be closed (its number may come back for another socket). */
typedef void dns_sock_fn(void *arg, int fd, bool readable, bool writable);
/* A lookup finished: res is the caller's reference (unref it). */
typedef void dns_mx_fn(void *arg, struct dns_mx_result *res);

/* Make a resolver for the calling thread. cfg is copied. sock is called
 * from inside dns calls (never from another thread). On failure returns a
 * negative code with one line for the operator in err. */
int dns_new(const struct dns_config *cfg, dns_sock_fn *sock, void *sock_arg, struct dns **out,
            char *err, size_t errlen);
/* Close every socket (sock is told) and free everything. Pending requests
 * are dropped: their callbacks never run. Not from inside a dns callback.
 * Returns NULL. */
struct dns *dns_free(struct dns *d);

/* Resolve domain (any case, trailing dot allowed, IDN as A-labels;
 * "[192.0.2.1]" and "[IPv6:2001:db8::1]" are literals). See the
 * completion rule above: returns 1 and *res, or 0 and *req (valid until
 * the callback starts or dns_cancel), or -ENOMEM. */
int dns_mx_resolve(struct dns *d, const char *domain, dns_mx_fn *cb, void *arg,
                   struct dns_mx_result **res, struct dns_req **req);
/* Resolve host name's own addresses (any case, trailing dot allowed,
 * A-labels), with the family policy; its MX records are not asked. The
 * result is DNS_OK with one host (name, preference 0, addresses
 * preferred family first, implicit_mx false, dane DNS_DANE_NONE),
 * DNS_NOT_FOUND (NXDOMAIN, or no address of the wanted families),
 * DNS_RETRY, or DNS_FAIL for a bad name (address literals included).
 * Same completion rule as dns_mx_resolve: returns 1 and *res, or 0 and
 * *req (valid until the callback starts or dns_cancel), or -ENOMEM. */
int dns_addr_resolve(struct dns *d, const char *name, dns_mx_fn *cb, void *arg,
                     struct dns_mx_result **res, struct dns_req **req);
/* Forget a pending request: its callback will not run. The lookup goes
 * on for the others and for the cache. */
void dns_cancel(struct dns *d, struct dns_req *req);

/* The host's side of the loop. fd became readable and/or writable (error
 * and hang-up count as both). Runs due callbacks. */
void dns_process_fd(struct dns *d, int fd, bool readable, bool writable);
/* The deadline from dns_timeout() passed. Runs due callbacks. */
void dns_process_timeouts(struct dns *d);
/* When the host must call dns_process_timeouts(): CLOCK_MONOTONIC ns
 * (now itself when callbacks are due), or UINT64_MAX for never. While the
 * cache holds answers this is at most 10 s away (min_ttl, from 1 to 10
 * s): the turn that drops the expired ones (in batches, so a big cache costs several short turns).
 * Ask again after every call into this module. */
uint64_t dns_timeout(struct dns *d, uint64_t now);

/* ---- TXT records (dns/txt.c): MTA-STS and TLS reporting policies ---- */

/* A TXT lookup finished: status DNS_OK with n >= 1 records (each one's
 * character-strings joined; every record of the answer, whatever their
 * number and length, but for those with a NUL octet, which are left out
 * whole, never cut; borrowed: valid during the call only), DNS_NOT_FOUND
 * (NXDOMAIN or no TXT record without a NUL), DNS_FAIL (more than 512
 * records: the answer is not judged on a part of it) or DNS_RETRY; why
 * is static text. ttl: seconds the answer holds, as its records say (the
 * smallest TTL of the CNAME chain and the TXT records; for a not-found
 * answer, RFC 2308 5's negative TTL, min(the SOA's TTL, its MINIMUM)),
 * unclamped ([dns] min_ttl and max_ttl are for the cache, which TXT
 * answers skip); DNS_TTL_UNKNOWN when the answer does not say (a
 * not-found without an SOA, DNS_FAIL, DNS_RETRY). */
#define DNS_TTL_UNKNOWN UINT32_MAX
typedef void dns_txt_fn(void *arg, enum dns_status status, const char *why,
                        const char *const *txt, unsigned n, uint32_t ttl);
/* Ask for name's TXT records; not cached. The callback runs exactly once,
 * from dns_process_fd() or dns_process_timeouts(), or from inside this
 * call when c-ares fails at once; dns_free() drops pending lookups
 * without calling them. Returns 0, -EINVAL (a bad name: no call) or
 * -ENOMEM. */
int dns_txt_lookup(struct dns *d, const char *name, dns_txt_fn *cb, void *arg);

/* Drop every cached answer (lookups in flight finish and are kept). */
void dns_cache_clear(struct dns *d);

struct dns_stats {
    uint64_t lookups;   /* dns_mx_resolve() and dns_addr_resolve() calls */
    uint64_t hits;      /* answered from the cache */
    uint64_t misses;    /* started a lookup: not cached or expired */
    uint64_t joined;    /* joined a lookup in flight for the same domain */
    uint64_t queries;   /* DNS queries sent (MX, A, AAAA) */
    uint64_t timeouts;  /* query tries that timed out */
    uint64_t failures;  /* lookups that ended in retry or fail */
    uint64_t evictions; /* answers dropped to make room (cache_size) */
    uint64_t expired;   /* answers dropped by the sweep once their TTL passed */
    uint64_t entries;   /* domains in the cache now */
    uint64_t inflight;  /* lookups in flight now */
    uint64_t queued;    /* lookups waiting for max_inflight now */
    uint64_t requests;  /* requests waiting for a callback now */
    uint64_t host_hits;  /* MX host addresses (A or AAAA) answered from the host cache */
    uint64_t host_entries; /* host answers (per family) kept now */
    uint64_t tlsa_queries; /* TLSA queries sent (dnssec = trust_ad) */
    uint64_t tlsa_secure;  /* MX hosts found with validated TLSA records */
    uint64_t tlsa_failed;  /* TLSA lookups that failed (SERVFAIL, bogus, timeout) */
    uint64_t edns_off;      /* times c-ares turned EDNS off on the channel (a FORMERR
                             * answer without OPT): UDP answers over 512 octets then
                             * go over TCP until ... */
    uint64_t edns_restored; /* ... the channel is made again, once it has no query */
};
void dns_stats(const struct dns *d, struct dns_stats *out);

/* ---- names ---- */

#define DNS_NAME_MAX 253

/* Lowercase, drop one trailing dot and check: labels of 1..63 letters,
 * digits, hyphens (not first or last) or underscores; 253 characters at
 * most; a last label that is all digits is refused (an address is no
 * domain); non-ASCII is refused (pass A-labels). out needs
 * DNS_NAME_MAX + 1 bytes. Returns the length or -EINVAL. */
int dns_name_normalize(const char *in, char out[DNS_NAME_MAX + 1]);

#endif
