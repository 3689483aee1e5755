/*
 * harness: a real dnsmasq on a loopback port of the test's own, a silent
 * "server" that never answers, and a plain poll() loop that drives a
 * struct dns the way a host loop would. Shared by the DNS tests and the
 * DNS benchmark.
 *
 * dnsmasq runs in the foreground as our child, killed by PID on stop; if
 * the test dies first (an abort, a signal), a watchdog process sees the
 * pipe from the test close and kills it. (PR_SET_PDEATHSIG alone is not
 * enough: dnsmasq changes its credentials, which clears it.) With --no-resolv
 * --no-hosts, bound to 127.0.0.1 only, logging every query to a file in a
 * temp dir of its own so that tests can count the queries it saw.
 *
 * The scripted server answers what dnsmasq cannot: DNSSEC outcomes (the
 * AD bit per answer, as a validating resolver sets it), CNAME chains
 * and TLSA records, from a table the test writes; it is a forked child
 * killed by PID, with PR_SET_PDEATHSIG should the test die first.
 *
 * Threading: one thread.
 */
#ifndef SLUICE_TESTS_DNS_HARNESS_H
#define SLUICE_TESTS_DNS_HARNESS_H

#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "dns/dns.h"

#define HARNESS_SKIP 77

struct dnsmasq {
    pid_t pid;
    pid_t watchdog; /* kills dnsmasq if the test dies without stopping it */
    int watch_fd;   /* write end of the watchdog's pipe */
    int port;
    unsigned marks; /* sync markers sent so far */
    char dir[64];   /* temp dir: conf, log, stderr */
    char log[128];
};

/* Start dnsmasq with records (lines of a dnsmasq conf file, e.g.
 * "mx-host=a.test,mx1.a.test,10\n") and extra options of the same form.
 * Waits (bounded) until it answers. Returns 0, HARNESS_SKIP when dnsmasq
 * is not installed (a message says so), or -1 (a message says why). */
int dnsmasq_start(struct dnsmasq *m, const char *records, unsigned local_ttl);
void dnsmasq_stop(struct dnsmasq *m);
/* Make sure every query answered so far is in the log (a marker query,
 * then wait for its line), then count "query[TYPE] NAME from" lines.
 * Returns the count or -1. */
int dnsmasq_count(struct dnsmasq *m, const char *type, const char *name);

/* A UDP socket on 127.0.0.1 that reads and never answers. Returns the fd
 * (its port in *port) or -1. */
int silent_server(int *port);

/* One raw UDP query of type for name to 127.0.0.1:port; waits up to
 * timeout_ms. Returns the answer's rcode, or -1 without an answer. */
int raw_query(int port, const char *name, uint16_t type, int timeout_ms);

/* ---- a scripted server: fixed answers with the AD bit as told ---- */

/* One record of an answer section, data in presentation form: A
 * "192.0.2.1", AAAA "2001:db8::1", CNAME "target.test", MX "10 mx.test",
 * TXT "one string|another", TLSA "3 1 1 <hex>"; or of the authority
 * section, listed after them: SOA "mname rname serial refresh retry
 * expire minimum" (a negative answer's, RFC 2308), NS "host.test" (a
 * referral's, without an SOA). Every TTL is 300. */
struct script_rr {
    const char *owner;
    uint16_t type;
    const char *data;
};

#define SCRIPT_RR_MAX 4
/* The answer to (qname, qtype): rcode, AD, records (NULL owner ends). */
struct script_answer {
    const char *qname;
    uint16_t qtype;
    uint8_t rcode;
    bool ad;
    struct script_rr rr[SCRIPT_RR_MAX];
};

/* A child process answering UDP queries on 127.0.0.1 from a table; a
 * question not in it gets REFUSED. It counts the queries each entry
 * answered, and keeps the ids of the first SCRIPT_QIDS_MAX queries, in
 * memory shared with the test. */
#define SCRIPT_QIDS_MAX 64
struct script_server {
    pid_t pid;
    int port;
    unsigned n;
    const struct script_answer *table; /* borrowed: lives as long as the server */
    unsigned *hits; /* owned (shared mapping): per entry, then the count of ids, then the ids */
};

/* Start it (the child dies with the test). Returns 0 or -1 (a message
 * says why). */
int script_start(struct script_server *s, const struct script_answer *table, unsigned n);
/* Kill the child by its PID, reap it, unmap the counts. */
void script_stop(struct script_server *s);
/* Queries answered so far for (qname, qtype); -1 when not in the table. */
int script_hits(const struct script_server *s, const char *qname, uint16_t qtype);
/* The ids of the queries received so far (the first max, at most
 * SCRIPT_QIDS_MAX) into out; returns how many. */
unsigned script_qids(const struct script_server *s, uint16_t *out, unsigned max);

/* ---- a poll() loop for a struct dns ---- */

#define PLOOP_MAX 64
struct ploop {
    struct dns *d;
    unsigned n;
    struct pollfd fds[PLOOP_MAX];
    unsigned changes; /* socket-state calls seen */
};

void ploop_init(struct ploop *l);
/* The dns_sock_fn to give dns_new (arg: the ploop). */
void ploop_sock(void *arg, int fd, bool readable, bool writable);
/* Run until *done reaches want or timeout_ms passes. Returns 0 or -1 on
 * timeout. */
int ploop_run(struct ploop *l, const unsigned *done, unsigned want, int timeout_ms);

/* A dns config with the defaults, servers "127.0.0.1:port". Free with
 * conf_free(dns_conf_keys, cfg). */
void harness_config(struct dns_config *cfg, int port);

#endif
