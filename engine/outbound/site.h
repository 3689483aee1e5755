/*
 * site: the unit that owns outbound connections. A site is the set of MX
 * hosts a domain resolves to (or its route): every domain whose answer
 * names the same hosts shares the site's connections, its idle list and
 * its concurrency window (MX rollup, as KumoMTA's site name and
 * PowerMTA's MX rollup). Per domain stay the queue, the rates, the retry
 * schedule, max_age and suspend (engine/outbound/dest.c).
 *
 * Concurrency is adaptive, TCP's rule applied to connections: a site
 * starts with [delivery] initial_connections; while its window is in use
 * and its mail waits, every transaction that completes adds one connection
 * (slow start) up to the threshold, then 1/window (additive increase, one
 * a round). Mail waits when a job a connection takes had been waiting
 * for one (since it was queued, or since its domain's MX answer and
 * MTA-STS policy came, or since the message token its rate made it wait
 * for came: a wait for tokens is not one more connections shorten) for
 * longer than twice the time the site's
 * connections take to open (connect, greeting, EHLO, STARTTLS: a moving
 * average), and at least 100 ms: a connection opened when it came would
 * have carried it sooner; or when more than SITE_BACKLOG_PER_CONN jobs
 * per connection of the site wait behind it in its domain's queue, and
 * no message rate held the domain back in the last second (a
 * burst handed over by one spool commit waits only milliseconds on a LAN,
 * yet is what more connections carry sooner: without it, one domain's
 * relay ran 5% slower). Jobs that wait less are served as soon by the
 * connections there are, and a window that grew for them only adds
 * connections each receiver must serve: over 100 MX hosts, a site that
 * started at 4 and grew on every transaction held 7 to 10 connections per
 * address where 1 or 2 carried the mail, and the receivers' cost of the
 * extra ones took 40% of the rate (bench/relay/bench_sites.py). The
 * default start is 1: a domain with a backlog waits more than that on
 * its first transactions and slow start doubles its window each round
 * trip. Growth also stops while the connections queue (TCP Vegas's test
 * applied to connections): the time from a transaction's MAIL to the go
 * for its body (the pipelined MAIL, RCPT and DATA answered: a round trip
 * and the receiver's and our worker's turn, whatever the message's size)
 * is compared with the least such time of the last 10 to 20 seconds; when
 * the average is SITE_HEAD_RATIO times that least or more, and the
 * excess, times the connections open, over the average, comes to
 * SITE_HEAD_QUEUED connections' worth (and to SITE_HEAD_SLACK_NS), the
 * receiver or our own worker is the bottleneck and one more connection
 * would only wait in line. The ratio keeps a receiver whose answers
 * merely vary out of it: the least of many samples is far below their
 * average when a receiver's work varies (a lognormal time with sigma 0.5
 * has its least of a thousand at a fifth of its average), and a test on
 * the least alone stopped sites at 6 to 10 connections with no queue in
 * a simulation of Internet receivers; their round trip is a floor that
 * keeps the average within about 3 times the least. A queue at a
 * saturated worker is of another order: 50 us became 5 ms. On a machine
 * loaded by other work the wait rule above saw every job wait: 10,000
 * domains over 100 MX hosts held up to 22 connections per address, 30
 * per 1,000 domains, where with this test they hold 7 and 9, at the same
 * rate within the load's noise (bench/relay/bench_sites.py without
 * chrt). A connect
 * failure, a greeting that times out or refuses, a 421 or a connection
 * reset before the session was ready halves the window (multiplicative
 * decrease, never below one), at most once per round: failures of
 * connections opened before the last decrease do not count again. The
 * configured max_connections is the ceiling.
 *
 * Connections per MX address: one table for the node, shared by the
 * workers (site_addrs.c; entries live while connections do; a v4-mapped
 * IPv6 address, ::ffff:a.b.c.d, is counted as the IPv4 address it
 * reaches). A connection takes its slot there before it is opened, so
 * max_connections_per_address holds for the node whichever workers the
 * domains are on, and one worker may use all of it: a site's domains
 * are gathered on one worker (site affinity, scheduler.c: a domain moves
 * to its site's worker once its answer names the site), and a domain
 * never leaves its worker. (Each worker used to hold an equal share: two
 * workers gave a slow receiver capped at 6 connections 3, sixteen gave a
 * large provider's domain 2 of the default 40.)
 *
 * Threading: one worker's thread, but for the per-address table
 * (site_addrs.c: any worker's, under its locks); the window is pure.
 */
#ifndef SLUICE_ENGINE_OUTBOUND_SITE_H
#define SLUICE_ENGINE_OUTBOUND_SITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/hash.h"
#include "common/lru.h"
#include "dns/dns.h"

#define SITE_KEY_MAX 256

/* ---- the concurrency window (pure) ---- */

/* The shortest wait that earns a connection, however fast connections
 * open: on a LAN or loopback they open in well under a millisecond while a
 * job behind a busy one waits a few, and a window grown for those waits
 * held 4 to 5 times the connections that carried the mail over 100 hosts
 * at 60% of the rate (bench/relay/bench_sites.py: 10 and 25 ms gave the
 * same). 25 ms was still short of what a worker busy with a cold campaign
 * makes a job wait: a spool commit hands a site tens of jobs at once, and
 * on a saturated worker the last of them waits 25 to 100 ms behind the
 * first whatever the connections, so 10,000 domains over 100 hosts grew
 * to 6 to 10 connections per address where one carried the mail, and the
 * extra ones cost the node and the receivers a tenth of the rate (session
 * 63, bench/README.md, on loopback). A trade-off: a receiver a few
 * milliseconds away (setup with STARTTLS 10 to 30 ms) now earns a
 * connection for waits over 100 ms, not 25 to 60; one further away
 * already had twice its setup time over either floor. A site short of
 * connections sees waits that grow without end: it still earns them. */
#define SITE_WAIT_MIN_NS 100000000ULL
/* ... or when more jobs of the domain wait behind the one a connection
 * takes than this many per connection of the site (a backlog). */
#define SITE_BACKLOG_PER_CONN 4
/* The head latency's test (above): the base is the least of this period's
 * and the last's; the connections queue when the average is
 * SITE_HEAD_RATIO times the base or more, open * (average - base) /
 * average comes to SITE_HEAD_QUEUED and average - base to
 * SITE_HEAD_SLACK_NS (the jitter of a worker's turn on a LAN is not a
 * queue). */
#define SITE_HEAD_PERIOD_NS 10000000000ULL
#define SITE_HEAD_RATIO     10.0
#define SITE_HEAD_QUEUED    4.0
#define SITE_HEAD_SLACK_NS  1000000ULL

struct site_window {
    double cwnd;       /* connections allowed now */
    double ssthresh;   /* slow start below, additive increase above */
    unsigned epoch;    /* decreases so far: a connection remembers the one it opened in */
    unsigned ceiling;  /* max_connections; never above */
    uint64_t setup_ns; /* connections' time from connect to ready: a moving average
                        * (0: none ready yet) */
    bool waited;       /* mail waited since the last growth: a job longer than twice
                        * setup_ns (and SITE_WAIT_MIN_NS), or a backlog */
    uint64_t head_base_ns[2]; /* the least head latency of this period [0] and the
                               * last [1] (0: none; none after a lull) */
    uint64_t head_period_ns;  /* worker clock: this period began */
    double head_avg_ns;       /* head latency, a moving average (1/8; 0: none yet) */
};

void site_window_init(struct site_window *w, unsigned initial, unsigned ceiling);
/* A new ceiling (a reload, or a domain with another max_connections). */
void site_window_set_ceiling(struct site_window *w, unsigned ceiling);
/* Connections the window allows now (>= 1). */
unsigned site_window_allowed(const struct site_window *w);
/* A connection of the site became ready setup_ns after it began. */
void site_window_on_ready(struct site_window *w, uint64_t setup_ns);
/* A connection took a job queued waited_ns ago. */
void site_window_on_wait(struct site_window *w, uint64_t waited_ns);
/* A connection took a job with more than SITE_BACKLOG_PER_CONN jobs per
 * connection of the site behind it in its domain's queue. */
void site_window_on_backlog(struct site_window *w);
/* A transaction's MAIL, RCPT and DATA were answered (the body may go)
 * head_ns after its MAIL went; now_ns: the worker's clock. */
void site_window_on_head(struct site_window *w, uint64_t head_ns, uint64_t now_ns);
/* Whether in_use connections queue by the head latency's test (above). */
bool site_window_queues(const struct site_window *w, unsigned in_use);
/* A transaction completed on a connection of the site while in_use
 * connections were open: grow, if the window is used (in_use + 1 >=
 * allowed; an unused window earns nothing), mail waited (above) since
 * the last growth, and the connections do not queue (above; the wait
 * stays noted for when they no longer do). */
void site_window_on_success(struct site_window *w, unsigned in_use);
/* A connection opened in epoch failed as above: halve, unless the window
 * was halved since that connection opened. Returns whether it shrank. */
bool site_window_on_failure(struct site_window *w, unsigned epoch);

/* ---- sites of a worker ---- */

struct conn;
struct dest;
struct dest_fail;

#define SITE_SOURCES_MAX   64   /* sources of one pool a site keeps state for */
#define SITE_SHARE_WINDOW  2048 /* transactions after which the sources' counts halve */

/* One egress source of a pool as a site sees it: its own hold (a
 * receiver throttled or refused it) and its share of the transactions. */
struct site_source {
    uint32_t id;         /* the source's name id (its address text) */
    uint64_t hold_until; /* monotonic ns: no new connection from it before */
    uint64_t shaped_until; /* monotonic ns: a shaping rate holds it back (egress.c)
                            * until about then: it cannot carry its share */
    unsigned holds;      /* holds in a row: the next one is longer */
    uint64_t sent;       /* transactions from it, halved now and then */
    unsigned conns;      /* open or opening from it */
};

/* An address of a site that refused or timed out a connect: passed over
 * by the site's other domains until `until` (site_addr_down). */
#define SITE_DOWN_MAX 4
struct site_down {
    union dns_addr a; /* its port ignored */
    uint64_t until;   /* monotonic ns; 0: a free slot */
};

struct site {
    struct hash_node node;
    unsigned refs;           /* destinations and connections pointing here */
    char key[SITE_KEY_MAX];  /* "mx1.example,mx2.example:25", or "route:host:port" */
    unsigned conns;          /* open or opening */
    unsigned conns_quitting; /* of them: told to end over a ceiling a reload lowered
                              * (conn.over_site) */
    unsigned reconf_ceiling; /* scratch of delivery_reconfigure(): the highest
                              * max_connections of its domains; 0: none seen */
    struct site_window win;
    struct conn *idle;       /* borrowed: idle connections of the site, any domain */
    struct lru want;         /* domains (struct dest) waiting for a connection, fewest
                              * turns first (site_share.c want_push) */
    uint64_t turn_clock;     /* the most turns any of its domains has had (dest.turn_tag) */
    uint64_t opened, failures, shrinks; /* since it was made */
    struct site_down down[SITE_DOWN_MAX]; /* addresses that refused a connect lately */
    uint64_t hold_until;     /* monotonic ns: no new connection of the site before: its
                              * hosts all failed, or one pushed back with a 421
                              * (scheduler.c, site_hold_set); its idle ones still serve */
    struct dest_fail *rest_fail; /* owned: while it rests because every address failed
                                  * for one of its domains, that failure (scheduler.c:
                                  * its other domains' mail is deferred with it); NULL
                                  * for a 421's rest, or none */
    unsigned greeting_421s;  /* rests in a row that a 421 greeting began, no connection of
                              * the site ready nor a delivery on one since (sched_conn.c:
                              * from the second on, a rest_fail) */
    struct site_source *src; /* owned: nsrc entries, made on first use */
    unsigned nsrc;
    uint64_t src_sent;       /* transactions counted in the entries now */
    size_t view_row;         /* scratch of delivery_sites(): its row in the view */
    unsigned lift_gen;       /* scratch of delivery_lift_holds(): its rest ends in that
                              * call, and it is not yet woken; 0: neither */
};

struct site_addrs;
struct site_addr;

struct sites {
    struct hash by_key;        /* struct site */
    struct site_addrs *addrs;  /* the node's per-address table (own_addrs: this one's) */
    bool own_addrs;
    unsigned worker;           /* the worker's id: wants are told apart by it */
    uint64_t live;             /* sites now */
};

/* The worker's sites, counting its connections per address in shared
 * (the node's table, site_addrs_new()), or in a table of their own when
 * shared is NULL (one worker, the unit tests). -ENOMEM without memory. */
int sites_init(struct sites *s, struct site_addrs *shared, unsigned worker);
/* Every site must be released. */
void sites_fini(struct sites *s);
/* The node's per-address table, for every worker's sites_init(); freed
 * once no worker uses it. */
struct site_addrs *site_addrs_new(unsigned workers);
void site_addrs_free(struct site_addrs *t);
/* Entries (addresses with a connection of some owner) now. */
size_t site_addrs_count(struct site_addrs *t);
/* (site_addrs.c, for sites_init/fini) */
int sites_addrs_init(struct sites *s, struct site_addrs *shared, unsigned worker);
void sites_addrs_fini(struct sites *s);

/* The site key of an answer: its MX host names sorted and joined, and the
 * port. Same hosts, same key, whatever the order or preferences. Names
 * that do not fit before the port are hashed ("#HEX:PORT"): the port is
 * never cut. With alias, each host's name is alias(arg, host) instead
 * (an [mx] rollup pattern for the hosts it rolls up), NULL meaning the
 * name. */
void site_key(const struct dns_mx_result *mx, unsigned port, char *out, size_t outlen,
              const char *(*alias)(const void *arg, const struct dns_mx_host *h),
              const void *arg);
/* The site of key, made on first use with the window given; one more
 * reference. NULL without memory. */
struct site *site_get(struct sites *s, const char *key, unsigned initial, unsigned ceiling);
/* One reference less; the site goes with the last. Returns NULL. */
struct site *site_unref(struct sites *s, struct site *site);

/* The per-address table counts connections per (owner, MX address): the
 * scheduler's owner is a pool (its name id; 0 for mail without a pool,
 * which leaves from the node's default source). Each pool has the cap
 * whole at an MX address, so one customer's flood never takes another's
 * slots there; the sources of a pool share the pool's, so the receiving
 * host sees no more connections from a pool of eight addresses than from
 * one (its capacity does not grow with our addresses; each source's own
 * limits are its [source] section's). */
/* Connections of src (an owner) to one address (and port) now, from
 * every worker. */
unsigned site_addr_conns(const struct sites *s, uint32_t src, const union dns_addr *a);
/* A slot at a for a connection of src about to open (now: monotonic ns):
 * fewer than cap (0: no cap) are open there from every worker, and, once
 * s's worker holds its floor there (site_addr_floor), more are left than
 * other workers that want one are owed up to theirs. *out, kept by the
 * connection until site_addr_give. 0, -EBUSY when there is no slot for
 * s's worker, -ENOMEM without memory. */
int site_addr_take(const struct sites *s, uint32_t src, const union dns_addr *a, unsigned cap,
                   uint64_t now, struct site_addr **out);
/* A worker's floor at an address: its share of cap (cap / workers, at
 * least one), what it holds whatever the others want. */
unsigned site_addr_floor(const struct sites *s, unsigned cap);
/* A connection holding slot x should give it back now rather than take
 * another transaction: s's worker holds more than its floor there once
 * those already yielding have gone, and more workers below their floor
 * want one than the slots free and yielding cover (one slot per wanting
 * worker). True counts it as yielding until its site_addr_give (with
 * yielded true): the caller's connection must then end. */
bool site_addr_yield(const struct sites *s, struct site_addr *x, unsigned cap, uint64_t now);
/* A connection holding slot x should end after its transaction: more
 * connections are open at its address, from every worker, than cap
 * (a reload lowered it: the cap holds at the take only) once those
 * already told to go have gone. True counts it as yielding until its
 * site_addr_give (with yielded true): the caller's connection must then
 * end. */
bool site_addr_over(const struct sites *s, struct site_addr *x, unsigned cap);
/* The slot given back (x NULL: nothing); yielded: site_addr_yield or
 * site_addr_wanted had told its connection to end (*yielded). */
void site_addr_give(const struct sites *s, struct site_addr *x, bool yielded);
/* A destination of site `by` (on s's worker) found a taken: until
 * `until` (ns), site_addr_wanted() says so to the connections holding a
 * slot there, and one that has nothing left for its own site quits
 * instead of idling on the slot; another worker past its floor yields
 * (site_addr_yield). Sites share addresses (an MX host in two answers),
 * and workers do; without this, an idle connection of one kept the slot
 * for idle_timeout while another waited. A site's own want on the same
 * worker does not count: its idle connections go to its waiting domains
 * anyway, and quitting would only cost reuse. Another worker's counts as
 * for site_addr_yield: while it holds less than its floor and s's worker
 * more than its own. Each worker has its want; on a worker the latest
 * wins. */
void site_addr_want(const struct sites *s, uint32_t src, const union dns_addr *a, uint64_t until,
                    const struct site *by);
/* Whether a connection of site `mine` (on s's worker) holding slot x
 * should give it back when it has nothing to send (no lock, but for a
 * yield to another worker: site_addr_yield's);
 * cap: max_connections_per_address, whose share is each worker's floor.
 * *yielded: true when it was for another worker (site_addr_yield's,
 * counted: the connection must end and say so to site_addr_give). */
bool site_addr_wanted(const struct sites *s, struct site_addr *x, unsigned cap,
                      uint64_t now, const struct site *mine, bool *yielded);
/* a's key as counted: address and port (a v4-mapped address as its
 * IPv4 one); out holds 18 octets. Its length. */
size_t site_addr_key(const union dns_addr *a, unsigned char *out);

/* Address a of site refused or timed out a connect: the site's domains
 * pass it over until `until` (monotonic ns) while they have another to
 * try, instead of each meeting the same failure on its first connection
 * (a primary MX that is down costs every new domain a connect_timeout).
 * The oldest entry gives way when all SITE_DOWN_MAX are in use. */
void site_addr_down(struct site *site, const union dns_addr *a, uint64_t until);
/* A connection to a got to its greeting and EHLO: it is up. */
void site_addr_up(struct site *site, const union dns_addr *a);
bool site_addr_is_down(const struct site *site, const union dns_addr *a, uint64_t now);

/* The entry of source id at site, made on first use; NULL without
 * memory or past SITE_SOURCES_MAX. */
struct site_source *site_source(struct site *site, uint32_t id);
/* Count one transaction of ss (an entry of site). */
void site_source_sent(struct site *site, struct site_source *ss);

#endif
