/*
 * netaddr: see netaddr.h.
 */
#include "engine/netaddr.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int
parse_port(const char *s, uint16_t *port)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v == 0 || v > 65535)
        return -EINVAL;
    *port = (uint16_t)v;
    return 0;
}

int
netaddr_parse(const char *s, struct netaddr *out)
{
    char host[64];
    const char *colon;
    uint16_t port;
    memset(out, 0, sizeof(*out));
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (close == NULL || close[1] != ':' || (size_t)(close - s - 1) >= sizeof(host))
            return -EINVAL;
        memcpy(host, s + 1, (size_t)(close - s - 1));
        host[close - s - 1] = '\0';
        if (parse_port(close + 2, &port) < 0)
            return -EINVAL;
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&out->ss;
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1)
            return -EINVAL;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        out->len = sizeof(*a);
        return 0;
    }
    colon = strrchr(s, ':');
    if (colon == NULL || (size_t)(colon - s) >= sizeof(host))
        return -EINVAL;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    if (parse_port(colon + 1, &port) < 0)
        return -EINVAL;
    struct sockaddr_in *a = (struct sockaddr_in *)&out->ss;
    if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
        return -EINVAL;
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    out->len = sizeof(*a);
    return 0;
}

/* Split a comma list into trimmed items; calls fn for each. */
static int
each_item(const char *s, int (*fn)(const char *item, void *arg), void *arg, char *err,
          size_t errlen)
{
    char item[128];
    int n = 0;
    const char *p = s;
    while (*p != '\0') {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        if (*p == '\0')
            break;
        size_t len = strcspn(p, ", \t");
        if (len >= sizeof(item)) {
            snprintf(err, errlen, "item too long: '%.20s...'", p);
            return -EINVAL;
        }
        memcpy(item, p, len);
        item[len] = '\0';
        int rc = fn(item, arg);
        if (rc == -E2BIG) {
            snprintf(err, errlen, "more than %d entries, the most it takes ('%s' is one too many)",
                     n, item);
            return rc;
        }
        if (rc < 0) {
            snprintf(err, errlen, "cannot parse '%s'", item);
            return rc;
        }
        n++;
        p += len;
    }
    return n;
}

struct list_ctx {
    void *out;
    int n, max;
};

static int
add_netaddr(const char *item, void *arg)
{
    struct list_ctx *c = arg;
    if (c->n == c->max)
        return -E2BIG;
    return netaddr_parse(item, (struct netaddr *)c->out + c->n++);
}

int
netaddr_parse_list(const char *s, struct netaddr *out, int max, char *err, size_t errlen)
{
    struct list_ctx c = {out, 0, max};
    int rc = each_item(s, add_netaddr, &c, err, errlen);
    return rc < 0 ? rc : c.n;
}

static int
add_cidr(const char *item, void *arg)
{
    struct list_ctx *c = arg;
    if (c->n == c->max)
        return -E2BIG;
    struct cidr *net = (struct cidr *)c->out + c->n;
    char host[64];
    const char *slash = strchr(item, '/');
    size_t hl = slash ? (size_t)(slash - item) : strlen(item);
    if (hl >= sizeof(host))
        return -EINVAL;
    memcpy(host, item, hl);
    host[hl] = '\0';
    memset(net, 0, sizeof(*net));
    unsigned maxbits;
    if (inet_pton(AF_INET, host, net->addr) == 1) {
        net->family = AF_INET;
        maxbits = 32;
    } else if (inet_pton(AF_INET6, host, net->addr) == 1) {
        net->family = AF_INET6;
        maxbits = 128;
    } else {
        return -EINVAL;
    }
    unsigned bits = maxbits;
    if (slash != NULL) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(slash + 1, &end, 10);
        if (errno != 0 || end == slash + 1 || *end != '\0' || v > maxbits)
            return -EINVAL;
        bits = (unsigned)v;
    }
    net->bits = (uint8_t)bits;
    c->n++;
    return 0;
}

int
cidr_parse_list(const char *s, struct cidr *out, int max, char *err, size_t errlen)
{
    struct list_ctx c = {out, 0, max};
    int rc = each_item(s, add_cidr, &c, err, errlen);
    return rc < 0 ? rc : c.n;
}

static bool
prefix_equal(const uint8_t *a, const uint8_t *b, unsigned bits)
{
    unsigned bytes = bits / 8, rem = bits % 8;
    if (memcmp(a, b, bytes) != 0)
        return false;
    if (rem == 0)
        return true;
    uint8_t mask = (uint8_t)(0xff << (8 - rem));
    return (a[bytes] & mask) == (b[bytes] & mask);
}

bool
cidr_match(const struct cidr *nets, int n, const struct sockaddr *sa)
{
    uint8_t v4[4], v6[16];
    bool has4 = false, has6 = false;
    if (sa->sa_family == AF_INET) {
        memcpy(v4, &((const struct sockaddr_in *)sa)->sin_addr, 4);
        has4 = true;
    } else if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        memcpy(v6, a, 16);
        has6 = true;
        if (IN6_IS_ADDR_V4MAPPED(a)) {
            memcpy(v4, v6 + 12, 4);
            has4 = true;
        }
    }
    for (int i = 0; i < n; i++) {
        if (nets[i].family == AF_INET && has4 && prefix_equal(nets[i].addr, v4, nets[i].bits))
            return true;
        if (nets[i].family == AF_INET6 && has6 && prefix_equal(nets[i].addr, v6, nets[i].bits))
            return true;
    }
    return false;
}

void
netaddr_ip_str(const struct sockaddr *sa, char *out, size_t outlen)
{
    const void *src = NULL;
    if (sa->sa_family == AF_INET)
        src = &((const struct sockaddr_in *)sa)->sin_addr;
    else if (sa->sa_family == AF_INET6)
        src = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    if (src == NULL || inet_ntop(sa->sa_family, src, out, (socklen_t)outlen) == NULL)
        snprintf(out, outlen, "unknown");
}

void
netaddr_str(const struct sockaddr *sa, char *out, size_t outlen)
{
    char ip[64];
    netaddr_ip_str(sa, ip, sizeof(ip));
    unsigned port = 0;
    if (sa->sa_family == AF_INET)
        port = ntohs(((const struct sockaddr_in *)sa)->sin_port);
    else if (sa->sa_family == AF_INET6)
        port = ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
    snprintf(out, outlen, sa->sa_family == AF_INET6 ? "[%s]:%u" : "%s:%u", ip, port);
}

bool
netaddr_v4mapped(const struct sockaddr *sa, struct sockaddr_in *out)
{
    if (sa->sa_family != AF_INET6)
        return false;
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
    if (!IN6_IS_ADDR_V4MAPPED(&a->sin6_addr))
        return false;
    memset(out, 0, sizeof(*out));
    out->sin_family = AF_INET;
    out->sin_port = a->sin6_port;
    memcpy(&out->sin_addr, &a->sin6_addr.s6_addr[12], 4);
    return true;
}

bool
netaddr_is_loopback(const struct sockaddr *sa)
{
    static const struct cidr lo[] = {
        {AF_INET, 8, {127}},
        {AF_INET6, 128, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}},
    };
    return cidr_match(lo, 2, sa);
}

const char *
netaddr_special(const struct sockaddr *sa)
{
    static const struct {
        struct cidr net;
        const char *what;
    } special[] = {
        {{AF_INET, 8, {127}}, "loopback"},
        {{AF_INET6, 128, {[15] = 1}}, "loopback"},
        {{AF_INET, 8, {0}}, "unspecified"},
        {{AF_INET6, 128, {0}}, "unspecified"},
        {{AF_INET, 16, {169, 254}}, "link-local"},
        {{AF_INET6, 10, {0xfe, 0x80}}, "link-local"},
        {{AF_INET, 4, {224}}, "multicast"},
        {{AF_INET6, 8, {0xff}}, "multicast"},
        {{AF_INET, 32, {255, 255, 255, 255}}, "broadcast"},
        /* after broadcast, which it holds: the old class E, reserved and
         * routed nowhere (RFC 1112 4, RFC 6890) */
        {{AF_INET, 4, {240}}, "reserved"},
    };
    for (size_t i = 0; i < sizeof(special) / sizeof(special[0]); i++)
        if (cidr_match(&special[i].net, 1, sa))
            return special[i].what;
    return NULL;
}

const char *
netaddr_target_refused(const struct sockaddr *sa, const struct cidr *allow, int nallow,
                       const struct cidr *deny, int ndeny)
{
    if (cidr_match(deny, ndeny, sa))
        return NETADDR_DENIED;
    const char *what = netaddr_special(sa);
    return what != NULL && !cidr_match(allow, nallow, sa) ? what : NULL;
}
