/*
 * config: the [dns] keys, the servers list, and the text of the module's
 * codes.
 *
 * The servers list is parsed here rather than by c-ares's CSV reader,
 * which counts colons across the whole list and so misreads a list that
 * mixes "host:port" and IPv6 entries; parsing it ourselves also gives the
 * operator a message naming the bad entry.
 *
 * Threading: constant data and pure functions.
 */
#include "dns/internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const families[] = {"v4", "v6", "both", NULL};
static const char *const preferences[] = {"v4", "v6", NULL};
static const char *const dnssec_modes[] = {"off", "trust_ad", NULL};

#define DNS(f) offsetof(struct dns_config, f)
const struct conf_key dns_conf_keys[] = {
    {"servers", CONF_STRING, DNS(servers), 1, 1024, NULL,
     "DNS servers to ask, comma-separated: 192.0.2.53, 192.0.2.54:5353, [2001:db8::53]:53; "
     "unset: the nameservers of /etc/resolv.conf",
     NULL},
    {"timeout", CONF_DURATION, DNS(timeout), 10, 60000, "2s",
     "wait for an answer to the first try of a query; each later round over the servers waits "
     "twice as long",
     NULL},
    {"tries", CONF_UINT, DNS(tries), 1, 10, "2",
     "rounds over the servers before a query gives up and the domain is deferred", NULL},
    {"family", CONF_ENUM, DNS(family), 0, 0, "both",
     "addresses looked up for MX hosts: v4 (A), v6 (AAAA) or both", families},
    {"prefer", CONF_ENUM, DNS(prefer), 0, 0, "v4",
     "with family = both, which addresses of a host come first", preferences},
    {"cache_size", CONF_UINT, DNS(cache_size), 16, 10000000, "100000",
     "domains whose answers each worker keeps; the least recently used go first", NULL},
    {"min_ttl", CONF_DURATION, DNS(min_ttl), 0, 7ULL * 86400 * 1000, "1m",
     "keep answers at least this long, whatever their TTL", NULL},
    {"max_ttl", CONF_DURATION, DNS(max_ttl), 0, 7ULL * 86400 * 1000, "1d",
     "keep answers at most this long, whatever their TTL", NULL},
    {"negative_ttl", CONF_DURATION, DNS(negative_ttl), 0, 7ULL * 86400 * 1000, "5m",
     "keep not-found answers this long when they carry no SOA; with an SOA, its minimum but "
     "never longer than this; an implicit MX (no MX records, mail to the domain's own "
     "addresses) is kept no longer than its denial of MX records",
     NULL},
    {"error_ttl", CONF_DURATION, DNS(error_ttl), 0, 3600 * 1000, "10s",
     "keep temporary failures (SERVFAIL, timeout) this long so that a burst of mail for the "
     "domain costs one query; 0: not kept; an MTA-STS check that failed that way, for a "
     "domain without a policy in force, is made again after this long (at least 1s, at most "
     "[mta_sts] recheck)",
     NULL},
    {"max_mx_hosts", CONF_UINT, DNS(max_mx_hosts), 1, 64, "10",
     "MX hosts resolved per domain, best preference first", NULL},
    /* A burst of queries lands in the server's socket buffer at once: a
     * single-threaded resolver with the default 208K buffer (dnsmasq,
     * unbound's default so-rcvbuf) drops beyond a hundred or so, and a
     * dropped query costs a whole timeout. */
    {"max_inflight", CONF_UINT, DNS(max_inflight), 1, 65536, "64",
     "MX lookups each worker runs at once; more wait their turn (bounds the burst a DNS "
     "server sees); a lookup still unanswered a whole try's timeout after it began (a dead "
     "domain's silent servers) stops counting, so a flood of dead domains does not keep the "
     "others waiting; a worker's MTA-STS first checks (TXT) are bounded by it too, apart: "
     "beyond it they go to the MTA-STS thread",
     NULL},
    {"dnssec", CONF_ENUM, DNS(dnssec), 0, 0, "off",
     "off, or trust_ad: ask every query with the AD bit and count an answer as DNSSEC-validated "
     "when the servers set it; this turns on DANE (RFC 7672) for MX hosts with validated TLSA "
     "records. Only for a validating resolver on this host (unbound on 127.0.0.1): servers must "
     "be set, all on loopback",
     dnssec_modes},
    CONF_END,
};

const char *
dns_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "success";
    case DNS_EINIT:
        return "cannot set up the DNS resolver";
    case DNS_ESERVERS:
        return "bad DNS servers list";
    }
    if (rc < 0) {
        const char *s = strerrordesc_np(-rc);
        if (s != NULL)
            return s;
    }
    return "unknown dns error";
}

const char *
dns_dane_str(enum dns_dane dane)
{
    switch (dane) {
    case DNS_DANE_NONE:
        return "none";
    case DNS_DANE_INSECURE:
        return "insecure";
    case DNS_DANE_NO_TLSA:
        return "no_tlsa";
    case DNS_DANE_SECURE:
        return "secure";
    case DNS_DANE_TEMPFAIL:
        return "tempfail";
    }
    return "?";
}

const char *
dns_status_str(enum dns_status status)
{
    switch (status) {
    case DNS_OK:
        return "ok";
    case DNS_NOT_FOUND:
        return "not_found";
    case DNS_NULL_MX:
        return "null_mx";
    case DNS_RETRY:
        return "retry";
    case DNS_FAIL:
        return "fail";
    }
    return "?";
}

/* One entry: "a.b.c.d", "a.b.c.d:port", "[v6]", "[v6]:port" or a bare
 * IPv6 address. */
static int
server_parse(const char *item, struct ares_addr_port_node *n, char *err, size_t errlen)
{
    char host[INET6_ADDRSTRLEN + 1];
    const char *port = NULL;
    size_t hlen;
    if (item[0] == '[') {
        const char *close = strchr(item, ']');
        if (close == NULL)
            goto bad;
        hlen = (size_t)(close - item - 1);
        if (close[1] == ':')
            port = close + 2;
        else if (close[1] != '\0')
            goto bad;
        item++;
    } else {
        const char *colon = strchr(item, ':');
        if (colon != NULL && strchr(colon + 1, ':') == NULL) {
            hlen = (size_t)(colon - item);
            port = colon + 1;
        } else {
            hlen = strlen(item); /* no colon, or a bare IPv6 address */
        }
    }
    if (hlen == 0 || hlen >= sizeof(host))
        goto bad;
    memcpy(host, item, hlen);
    host[hlen] = '\0';
    memset(n, 0, sizeof(*n));
    if (inet_pton(AF_INET, host, &n->addr.addr4) == 1) {
        n->family = AF_INET;
    } else if (inet_pton(AF_INET6, host, &n->addr.addr6) == 1) {
        n->family = AF_INET6;
    } else {
        goto bad;
    }
    if (port != NULL) {
        char *end;
        unsigned long p = strtoul(port, &end, 10);
        if (*port == '\0' || *end != '\0' || p == 0 || p > 65535)
            goto bad;
        n->udp_port = n->tcp_port = (int)p;
    }
    return 0;
bad:
    snprintf(err, errlen, "'%s' is not an address like 192.0.2.53, 192.0.2.53:5353 or [::1]:53",
             item);
    return DNS_ESERVERS;
}

int
servers_parse(const char *s, struct ares_addr_port_node **out, char *err, size_t errlen)
{
    *out = NULL;
    if (s == NULL)
        return 0;
    size_t max = 1;
    for (const char *p = s; *p; p++)
        max += *p == ',' || *p == ' ';
    struct ares_addr_port_node *nodes = calloc(max, sizeof(*nodes));
    if (nodes == NULL)
        return -ENOMEM;
    unsigned n = 0;
    const char *p = s;
    while (*p != '\0') {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        size_t len = strcspn(p, " \t,");
        if (len == 0)
            break;
        char item[64];
        if (len >= sizeof(item)) {
            snprintf(err, errlen, "'%.*s' is too long for an address", (int)len, p);
            free(nodes);
            return DNS_ESERVERS;
        }
        memcpy(item, p, len);
        item[len] = '\0';
        int rc = server_parse(item, &nodes[n], err, errlen);
        if (rc < 0) {
            free(nodes);
            return rc;
        }
        if (n > 0)
            nodes[n - 1].next = &nodes[n];
        n++;
        p += len;
    }
    if (n == 0) {
        snprintf(err, errlen, "no server in '%s'", s);
        free(nodes);
        return DNS_ESERVERS;
    }
    *out = nodes;
    return 0;
}

int
dns_config_check(const struct dns_config *cfg, const char **bad, char *err, size_t errlen)
{
    struct ares_addr_port_node *nodes;
    *bad = "servers";
    int rc = servers_parse(cfg->servers, &nodes, err, errlen);
    free(nodes);
    if (rc == 0 && cfg->min_ttl > cfg->max_ttl) {
        *bad = "min_ttl";
        snprintf(err, errlen, "min_ttl is longer than max_ttl");
        return -EINVAL;
    }
    if (rc == 0 && cfg->dnssec == DNS_DNSSEC_TRUST_AD) {
        /* The AD bit is unsigned: anyone on the path can set it. Trust it
         * only from a resolver on this host, as Postfix's
         * smtp_dns_support_level = dnssec asks. */
        rc = servers_parse(cfg->servers, &nodes, err, errlen);
        if (rc < 0)
            return rc;
        bool local = nodes != NULL;
        for (struct ares_addr_port_node *n = nodes; n != NULL; n = n->next) {
            if (n->family == AF_INET)
                local &= (ntohl(n->addr.addr4.s_addr) >> 24) == 127;
            else
                local &= IN6_IS_ADDR_LOOPBACK((const struct in6_addr *)&n->addr.addr6);
        }
        free(nodes);
        if (!local) {
            *bad = "dnssec";
            snprintf(err, errlen,
                     "dnssec = trust_ad needs servers on loopback: a validating resolver "
                     "(unbound) on this host, e.g. servers = 127.0.0.1");
            return -EINVAL;
        }
    }
    return rc;
}
