/*
 * dns_synth (C): the UDP half of tests/support/dns_synth.py, the same
 * synthesised answers (see there), for the relay benchmarks. The Python
 * responder spends 200-400 us of CPU per query on the benchmark's two
 * cores: 10,000 domains took 2 to 7 s of CPU from sluice and the injector
 * during a run of 10 to 20 s, which the benchmark then counted against
 * the many-domain lines. A real relay asks a caching resolver that
 * answers in microseconds; this one answers in a few, so the lines
 * measure the relay. UDP only (the answers are small, never truncated),
 * one socket, one blocking loop.
 *
 *   dns_synth [--zone test] [--mx-hosts 1] [--mx-addrs N] [--mx-addr A]
 *             [--ttl 300] [--port 0] [--listen 127.0.0.1] [--own-names 1]
 *
 * --own-names 1 (this responder only): each domain's MX host has a name
 * of its own, "mx<k>-<n>.<zone>" for the domain whose first label ends
 * with n, on host k's address, as Microsoft 365 names one per domain
 * (contoso-com.mail.protection.outlook.com) on shared servers.
 *
 * Prints "ready PORT" once bound, then serves until killed.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define T_A  1
#define T_MX 15

static const char *zone = "test";
static unsigned mx_hosts = 1, mx_addrs = 0, ttl = 300, own_names = 0;
static struct in_addr mx_addr;
static int have_mx_addr;

static void
host_addr(unsigned k, uint8_t out[4])
{
    if (have_mx_addr) {
        memcpy(out, &mx_addr, 4);
        return;
    }
    if (mx_addrs)
        k %= mx_addrs;
    out[0] = 127;
    out[1] = 0;
    out[2] = k >= 255 ? (uint8_t)((1 + k) >> 8 & 255) : 0;
    out[3] = (uint8_t)((1 + k) & 255);
}

static size_t
put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
    return 2;
}

static size_t
put_rr_head(uint8_t *p, unsigned type, unsigned rdlen)
{
    size_t n = put16(p, type);
    n += put16(p + n, 1);
    p[n++] = (uint8_t)(ttl >> 24);
    p[n++] = (uint8_t)(ttl >> 16);
    p[n++] = (uint8_t)(ttl >> 8);
    p[n++] = (uint8_t)ttl;
    n += put16(p + n, rdlen);
    return n;
}

/* "mx<k>.<zone>" ("mx<k>-<num>.<zone>" with --own-names) in wire form
 * into p; its length. */
static size_t
put_host(uint8_t *p, unsigned k, unsigned long long num)
{
    char label[48];
    int ll = own_names ? snprintf(label, sizeof(label), "mx%u-%llu", k, num)
                       : snprintf(label, sizeof(label), "mx%u", k);
    size_t n = 0;
    p[n++] = (uint8_t)ll;
    memcpy(p + n, label, (size_t)ll);
    n += (size_t)ll;
    for (const char *z = zone; *z;) {
        const char *dot = strchr(z, '.');
        size_t zl = dot ? (size_t)(dot - z) : strlen(z);
        p[n++] = (uint8_t)zl;
        memcpy(p + n, z, zl);
        n += zl;
        z += zl + (dot ? 1 : 0);
    }
    p[n++] = 0;
    return n;
}

/* The answer to q in out; its length, or 0 to drop the query. */
static size_t
answer(const uint8_t *q, size_t qlen, uint8_t *out)
{
    if (qlen < 12 || (q[2] & 0x80) || q[4] != 0 || q[5] != 1)
        return 0;
    char name[256];
    size_t i = 12, nl = 0;
    char first[64];
    size_t firstl = 0;
    unsigned nlabels = 0;
    for (;;) {
        if (i >= qlen)
            return 0;
        unsigned l = q[i];
        if (l == 0) {
            i++;
            break;
        }
        if ((l & 0xC0) || i + 1 + l > qlen || nl + l + 1 >= sizeof(name))
            return 0;
        if (nlabels == 0) {
            memcpy(first, q + i + 1, l);
            firstl = l;
            first[l] = '\0';
        }
        if (nl)
            name[nl++] = '.';
        for (unsigned k = 0; k < l; k++)
            name[nl++] = (char)tolower(q[i + 1 + k]);
        nlabels++;
        i += 1 + l;
    }
    name[nl] = '\0';
    if (i + 4 > qlen)
        return 0;
    unsigned qtype = (unsigned)q[i] << 8 | q[i + 1];
    size_t qend = i + 4;
    for (size_t k = 0; k < firstl; k++)
        first[k] = (char)tolower((unsigned char)first[k]);

    size_t zl = strlen(zone);
    unsigned rcode = 0, an = 0, ar = 0;
    uint8_t body[600];
    size_t bl = 0;
    int in_zone = strcmp(name, zone) == 0 ||
                  (nl > zl + 1 && name[nl - zl - 1] == '.' && strcmp(name + nl - zl, zone) == 0);
    if (!in_zone) {
        rcode = 5; /* REFUSED */
    } else if (strcmp(name, zone) != 0) {
        /* single: the name is one label under the zone */
        unsigned zlabels = 1;
        for (const char *z = zone; *z; z++)
            zlabels += *z == '.';
        int single = nlabels == zlabels + 1;
        long k = -1;
        if (single && firstl > 2 && first[0] == 'm' && first[1] == 'x') {
            size_t d = 2;
            while (d < firstl && isdigit((unsigned char)first[d]))
                d++;
            size_t e = d; /* with --own-names, "-<num>" may follow */
            if (own_names && e < firstl && first[e] == '-' && e + 1 < firstl) {
                e++;
                while (e < firstl && isdigit((unsigned char)first[e]))
                    e++;
            }
            if (e == firstl && d > 2) {
                unsigned long v = strtoul(first + 2, NULL, 10);
                if (v < mx_hosts)
                    k = (long)v;
            }
        }
        if (k >= 0) {
            if (qtype == T_A) {
                bl += put16(body + bl, 0xC00C);
                bl += put_rr_head(body + bl, T_A, 4);
                host_addr((unsigned)k, body + bl);
                bl += 4;
                an = 1;
            }
        } else if (qtype == T_MX) {
            /* the number the first label ends with, 0 if none */
            size_t d = firstl;
            while (d > 0 && isdigit((unsigned char)first[d - 1]))
                d--;
            unsigned long long num = d < firstl ? strtoull(first + d, NULL, 10) : 0;
            unsigned hk = (unsigned)(num % mx_hosts);
            uint8_t host[300];
            size_t hl = put_host(host, hk, num);
            bl += put16(body + bl, 0xC00C);
            bl += put_rr_head(body + bl, T_MX, (unsigned)(2 + hl));
            bl += put16(body + bl, 10);
            memcpy(body + bl, host, hl);
            bl += hl;
            memcpy(body + bl, host, hl);
            bl += hl;
            bl += put_rr_head(body + bl, T_A, 4);
            host_addr(hk, body + bl);
            bl += 4;
            an = 1;
            ar = 1;
        }
    }
    unsigned flags = 0x8400 | (q[2] << 8 & 0x0100) | rcode;
    out[0] = q[0];
    out[1] = q[1];
    put16(out + 2, flags);
    put16(out + 4, 1);
    put16(out + 6, an);
    put16(out + 8, 0);
    put16(out + 10, ar);
    memcpy(out + 12, q + 12, qend - 12);
    memcpy(out + qend, body, bl);
    return qend + bl;
}

int
main(int argc, char **argv)
{
    const char *listen_addr = "127.0.0.1";
    unsigned port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (strcmp(k, "--zone") == 0)
            zone = v;
        else if (strcmp(k, "--mx-hosts") == 0)
            mx_hosts = (unsigned)strtoul(v, NULL, 10);
        else if (strcmp(k, "--mx-addrs") == 0)
            mx_addrs = (unsigned)strtoul(v, NULL, 10);
        else if (strcmp(k, "--ttl") == 0)
            ttl = (unsigned)strtoul(v, NULL, 10);
        else if (strcmp(k, "--port") == 0)
            port = (unsigned)strtoul(v, NULL, 10);
        else if (strcmp(k, "--listen") == 0)
            listen_addr = v;
        else if (strcmp(k, "--own-names") == 0)
            own_names = (unsigned)strtoul(v, NULL, 10);
        else if (strcmp(k, "--mx-addr") == 0) {
            if (*v && inet_pton(AF_INET, v, &mx_addr) == 1)
                have_mx_addr = 1;
        } else {
            fprintf(stderr, "dns_synth: unknown option %s\n", k);
            return 2;
        }
    }
    if (mx_hosts == 0)
        mx_hosts = 1;
    while (*zone == '.')
        zone++;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    int big = 4 << 20;
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (s < 0 || inet_pton(AF_INET, listen_addr, &sa.sin_addr) != 1 ||
        bind(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("dns_synth: bind");
        return 1;
    }
    socklen_t sl = sizeof(sa);
    getsockname(s, (struct sockaddr *)&sa, &sl);
    printf("ready %u\n", ntohs(sa.sin_port));
    fflush(stdout);
    for (;;) {
        uint8_t q[1500], out[2048];
        struct sockaddr_storage from;
        socklen_t fl = sizeof(from);
        ssize_t n = recvfrom(s, q, sizeof(q), 0, (struct sockaddr *)&from, &fl);
        if (n <= 0)
            continue;
        size_t r = answer(q, (size_t)n, out);
        if (r > 0)
            sendto(s, out, r, 0, (struct sockaddr *)&from, fl);
    }
}
