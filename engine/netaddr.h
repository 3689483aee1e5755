/*
 * netaddr: socket addresses as config and logs need them: "host:port" and
 * "[v6]:port" listen specs, CIDR network lists ("127.0.0.0/8, ::1"), text
 * for logs. Pure; any thread.
 */
#ifndef SLUICE_ENGINE_NETADDR_H
#define SLUICE_ENGINE_NETADDR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct netaddr {
    struct sockaddr_storage ss;
    socklen_t len;
};

struct cidr {
    uint8_t family; /* AF_INET or AF_INET6 */
    uint8_t bits;
    uint8_t addr[16];
};

#define NETADDR_MAX_LIST 32

/* "127.0.0.1:2525", "[::1]:2525", "0.0.0.0:587". Returns 0 or -EINVAL. */
int netaddr_parse(const char *s, struct netaddr *out);
/* A comma-separated list of the above, at most max of them. Returns the
 * count, -EINVAL or -E2BIG (err says which item). */
int netaddr_parse_list(const char *s, struct netaddr *out, int max, char *err, size_t errlen);
/* "1.2.3.4" or "::1" (no port) into out (INET6_ADDRSTRLEN at least). */
void netaddr_ip_str(const struct sockaddr *sa, char *out, size_t outlen);
/* "1.2.3.4:25" or "[::1]:25". */
void netaddr_str(const struct sockaddr *sa, char *out, size_t outlen);
bool netaddr_is_loopback(const struct sockaddr *sa);
/* A v4-mapped IPv6 address (::ffff:a.b.c.d: an AAAA record may name an
 * IPv4 host so) is the IPv4 address a connect to it reaches: when sa is
 * one, that address and sa's port into *out and true; else false, out
 * untouched. What counts or keys by address uses the IPv4 form. */
bool netaddr_v4mapped(const struct sockaddr *sa, struct sockaddr_in *out);
/* "loopback", "unspecified", "link-local", "multicast", "broadcast" or
 * "reserved" (240.0.0.0/4)
 * (a v4-mapped v6 address as its v4), or NULL for any other address:
 * what no mail should be delivered to unless allowed. */
const char *netaddr_special(const struct sockaddr *sa);

/* "10.0.0.0/8, ::1, 192.168.1.7": a bare address is a /32 or /128; at
 * most max of them. Returns the count, -EINVAL or -E2BIG (err says which
 * item). */
int cidr_parse_list(const char *s, struct cidr *out, int max, char *err, size_t errlen);
/* True when sa is inside one of the n networks. A v4-mapped v6 address
 * (::ffff:1.2.3.4) matches v4 networks. */
bool cidr_match(const struct cidr *nets, int n, const struct sockaddr *sa);

#define NETADDR_DENIED "a [delivery] deny_networks address"
/* Why a delivery target at sa (an MX address, an MTA-STS policy host, a
 * TLS report's POST) is refused, or NULL: NETADDR_DENIED when one of the
 * ndeny networks holds it (whatever allow says); else its kind
 * (netaddr_special) unless one of the nallow networks holds it. */
const char *netaddr_target_refused(const struct sockaddr *sa, const struct cidr *allow,
                                   int nallow, const struct cidr *deny, int ndeny);

#endif
