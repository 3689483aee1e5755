/*
 * bench_dns: MX resolution of 10,000 distinct domains against a local
 * dnsmasq (started and stopped here), then cache hits, each beside its
 * ceiling:
 *
 *  - raw: MX queries written by hand on one UDP socket, 64 in flight, no
 *    parsing: what the server answers at most (the lookups' ceiling);
 *  - burst: 10,000 dns_mx_resolve() calls at once (max_inflight queues
 *    them), latency from the call to the callback, queueing included;
 *  - window: 64 lookups kept in flight, a new one from each callback:
 *    latency of a lookup that does not queue;
 *  - hits: the same 10,000 names again and again, answered at once from
 *    the cache, beside dns_name_normalize() alone (the ceiling: a hit must
 *    at least normalise the name).
 *
 * Lookups run on one thread through the test harness's poll() loop (the
 * resolver is loop-agnostic). Family v4 and dnsmasq's additional section
 * make one query per domain; a second burst with family both adds the
 * AAAA query per MX host.
 *
 * Threading: one thread; dnsmasq is a child process.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/clock.h"
#include "dns/dns.h"
#include "tests/dns/harness.h"

#ifndef BENCH_BUILD
#define BENCH_BUILD "unknown"
#endif

enum { NDOM = 10000, WINDOW = 64 };

static char names[NDOM][24];

/* CPU time of this process (dnsmasq, a child, is not in it), ns. */
static uint64_t
cpu_ns(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000ULL +
           (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000ULL;
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void
report(const char *what, unsigned n, uint64_t ns, uint64_t *lat)
{
    qsort(lat, n, sizeof(*lat), cmp_u64);
    printf("%-34s %8.0f /s   p50 %7.3f ms   p99 %7.3f ms   max %7.3f ms\n", what, n / (ns / 1e9),
           lat[n / 2] / 1e6, lat[(size_t)n * 99 / 100] / 1e6, lat[n - 1] / 1e6);
}

/* ---- the ceiling: hand-made queries, 64 in flight ---- */

static size_t
make_query(uint8_t *q, uint16_t id, const char *name)
{
    size_t n = 0;
    q[n++] = (uint8_t)(id >> 8);
    q[n++] = (uint8_t)id;
    q[n++] = 1;
    q[n++] = 0;
    memcpy(q + n, "\0\1\0\0\0\0\0\0", 8);
    n += 8;
    for (const char *p = name; *p;) {
        size_t l = strcspn(p, ".");
        q[n++] = (uint8_t)l;
        memcpy(q + n, p, l);
        n += l;
        p += l + (p[l] == '.');
    }
    q[n++] = 0;
    memcpy(q + n, "\0\x0f\0\1", 4); /* MX, IN */
    return n + 4;
}

static void
bench_raw(int port, uint64_t *lat)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("raw socket");
        return;
    }
    static uint64_t sent_at[NDOM];
    unsigned next = 0, got = 0;
    uint64_t t0 = clock_mono_ns();
    while (got < NDOM) {
        while (next < NDOM && next - got < WINDOW) {
            uint8_t q[300];
            size_t n = make_query(q, (uint16_t)next, names[next]);
            sent_at[next] = clock_mono_ns();
            if (send(fd, q, n, 0) < 0)
                perror("send");
            next++;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 2000) <= 0) {
            fprintf(stderr, "raw: an answer was lost (%u of %u back)\n", got, NDOM);
            break;
        }
        uint8_t a[1500];
        ssize_t len = recv(fd, a, sizeof(a), 0);
        if (len >= 12) {
            unsigned id = ((unsigned)a[0] << 8) | a[1];
            lat[got++] = clock_mono_ns() - sent_at[id];
        }
    }
    uint64_t ns = clock_mono_ns() - t0;
    close(fd);
    if (got == NDOM)
        report("raw UDP queries (ceiling)", NDOM, ns, lat);
}

/* ---- lookups ---- */

struct run {
    struct dns *d;
    unsigned done, next, failed;
    uint64_t start[NDOM];
    uint64_t *lat;
    bool window;
};

struct tag {
    struct run *r;
    unsigned i;
};

static struct tag tags[NDOM];

static void start_one(struct run *r, unsigned i);

static void
on_done(void *arg, struct dns_mx_result *res)
{
    struct tag *t = arg;
    struct run *r = t->r;
    r->lat[r->done++] = clock_mono_ns() - r->start[t->i];
    if (res->status != DNS_OK || res->nhosts != 1)
        r->failed++;
    dns_mx_result_unref(res);
    if (r->window && r->next < NDOM)
        start_one(r, r->next++);
}

static void
start_one(struct run *r, unsigned i)
{
    struct dns_mx_result *res;
    struct dns_req *req;
    tags[i].r = r;
    tags[i].i = i;
    r->start[i] = clock_mono_ns();
    int rc = dns_mx_resolve(r->d, names[i], on_done, &tags[i], &res, &req);
    if (rc == 1) {
        on_done(&tags[i], res);
    } else if (rc < 0) {
        fprintf(stderr, "resolve: %s\n", dns_strerror(rc));
        exit(1);
    }
}

static int
open_dns(struct ploop *l, int port, int family, struct dns_config *cfg)
{
    harness_config(cfg, port);
    cfg->family = family;
    ploop_init(l);
    char err[256];
    int rc = dns_new(cfg, ploop_sock, l, &l->d, err, sizeof(err));
    if (rc < 0)
        fprintf(stderr, "dns_new: %s\n", err);
    return rc;
}

static void
bench_lookups(int port, int family, bool window, const char *what, uint64_t *lat)
{
    struct ploop l;
    struct dns_config cfg;
    static struct run r;
    if (open_dns(&l, port, family, &cfg) < 0)
        return;
    memset(&r, 0, sizeof(r));
    r.d = l.d;
    r.lat = lat;
    r.window = window;
    uint64_t t0 = clock_mono_ns(), c0 = cpu_ns();
    unsigned first = window ? WINDOW : NDOM;
    for (r.next = 0; r.next < first;)
        start_one(&r, r.next++);
    if (ploop_run(&l, &r.done, NDOM, 120000) < 0)
        fprintf(stderr, "%s: %u of %u answered in time\n", what, r.done, NDOM);
    uint64_t ns = clock_mono_ns() - t0, cpu = cpu_ns() - c0;
    struct dns_stats st;
    dns_stats(l.d, &st);
    if (r.done == NDOM)
        report(what, NDOM, ns, lat);
    printf("%-34s queries %" PRIu64 ", timeouts %" PRIu64 ", not ok %u, our CPU %.1f us/lookup\n",
           "", st.queries, st.timeouts, r.failed, cpu / 1e3 / NDOM);

    if (!window && family == DNS_FAMILY_V4) {
        /* cache hits: every name is cached now */
        enum { ROUNDS = 100 };
        unsigned hits = 0;
        t0 = clock_mono_ns();
        for (int round = 0; round < ROUNDS; round++)
            for (unsigned i = 0; i < NDOM; i++) {
                struct dns_mx_result *res;
                struct dns_req *req;
                if (dns_mx_resolve(l.d, names[i], on_done, NULL, &res, &req) == 1) {
                    hits++;
                    dns_mx_result_unref(res);
                }
            }
        ns = clock_mono_ns() - t0;
        printf("%-34s %8.2f M/s   %5.0f ns each (%u of %u hits)\n", "cache hits", hits / (ns / 1e3),
               (double)ns / hits, hits, ROUNDS * NDOM);
        char out[DNS_NAME_MAX + 1];
        size_t sum = 0;
        t0 = clock_mono_ns();
        for (int round = 0; round < ROUNDS; round++)
            for (unsigned i = 0; i < NDOM; i++)
                sum += (size_t)dns_name_normalize(names[i], out);
        ns = clock_mono_ns() - t0;
        printf("%-34s %8.2f M/s   %5.0f ns each (checksum %zu)\n", "dns_name_normalize (ceiling)",
               (double)ROUNDS * NDOM / (ns / 1e3), (double)ns / (ROUNDS * NDOM), sum);
    }
    l.d = dns_free(l.d);
    conf_free(dns_conf_keys, &cfg);
}

int
main(void)
{
    printf("bench_dns: build %s\n", BENCH_BUILD);
    size_t cap = (size_t)NDOM * 100;
    char *text = malloc(cap);
    uint64_t *lat = malloc(sizeof(uint64_t) * NDOM);
    if (text == NULL || lat == NULL)
        return 1;
    size_t len = 0;
    for (unsigned i = 0; i < NDOM; i++) {
        snprintf(names[i], sizeof(names[i]), "bench%u.test", i);
        len += (size_t)snprintf(text + len, cap - len,
                                "mx-host=bench%u.test,mx.bench%u.test,10\n"
                                "host-record=mx.bench%u.test,10.%u.%u.%u\n",
                                i, i, i, i >> 16, (i >> 8) & 255, i & 255);
    }
    struct dnsmasq m;
    int rc = dnsmasq_start(&m, text, 3600);
    free(text);
    if (rc != 0)
        return rc == HARNESS_SKIP ? 0 : 1;
    printf("dnsmasq 127.0.0.1:%d, %u domains (MX + A each), one worker thread\n", m.port, NDOM);

    bench_raw(m.port, lat);
    bench_lookups(m.port, DNS_FAMILY_V4, false, "lookups, burst of 10000, v4", lat);
    bench_lookups(m.port, DNS_FAMILY_V4, true, "lookups, 64 in flight, v4", lat);
    bench_lookups(m.port, DNS_FAMILY_BOTH, false, "lookups, burst of 10000, v4+v6", lat);

    dnsmasq_stop(&m);
    free(lat);
    return 0;
}
