/*
 * delivery: see delivery.h.
 *
 * A destination (struct dest) is a domain with its FIFO of jobs, its MX
 * answer (or its route's), its limiter key and its site. dest_run() is the
 * scheduler's one decision point: resolve when there is no answer, fail
 * the jobs when the answer says so, else hand jobs to idle connections of
 * the site and open new ones within the domain's max_connections, the
 * site's window and this worker's share of each MX address. Destinations
 * idle for destination_idle_ttl are evicted (dest_on_evict).
 *
 * A site (outbound/site.h) owns the idle connections of every domain whose
 * answer names the same MX hosts; a connection with nothing left for its
 * domain moves to a domain of its site that waits (conn_take_waiting).
 *
 * A connection (struct conn, conn=ID in the logs) drives the pure client
 * machine of smtp_client.h, plain or over TLS after STARTTLS: bytes
 * received go in, its output goes out, and its events say when to stream
 * the body, when a transaction is done and when to close. Lifetime as in
 * server.c: ops in flight are counted, and the last completion after
 * conn_close() frees.
 *
 * What an outcome means (defer, bounce, expire, next address, hold, back
 * off) is decided by outbound/policy.h; this file acts on it, writes the
 * spool, the logs and the DSNs.
 *
 * Threading: the worker's thread, but delivery_submit().
 */
#include "engine/delivery.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/hash.h"
#include "common/lru.h"
#include "common/log.h"
#include "dns/dns.h"
#include "engine/classify.h"
#include "engine/dlog.h"
#include "engine/oob.h"
#include "engine/suppress.h"
#include "engine/dsn.h"
#include "engine/limits.h"
#include "engine/engine.h"
#include "engine/netaddr.h"
#include "engine/outbound/policy.h"
#include "engine/outbound/site.h"
#include "engine/resolver.h"
#include "engine/smtp_client.h"
#include "engine/stats.h"
#include "engine/worker.h"
#include "queue/queue.h"
#include "tls/tls.h"

#define EVICT_SWEEP_MS 5000 /* idle destinations looked for */
#define IN_CAP         4096 /* one provided receive buffer */
#define IN_BUFS        512  /* provided receive buffers per worker (a power of two) */
#define IN_BGID        7    /* their buffer group on the worker's ring */
#define CIN_CAP        (17 * 1024) /* ciphertext in: a whole TLS record fits */
#define BODY_CHUNK     (64 * 1024)
#define POOL_KEEP      256  /* free buffers a pool keeps for the next burst */
#define DUE_POLL_MS    1000
#define DUE_BATCH      10000
#define HOLD_MIN_MS    POLICY_HOLD_MIN_MS
#define SWEEP_MS       1000 /* expiry checks of the jobs waiting in a held destination */
#define EXPIRY_SLACK_MS POLICY_EXPIRY_SLACK_MS
#define DSN_ORIG_MAX   (256 * 1024) /* of the original read for a headers-only DSN */
#define HDR_SCAN_MAX   (16 * 1024)  /* of a message searched for delivery-log headers */

struct job {
    struct worker_msg m; /* while it travels to the owner */
    struct job *next;
    uint64_t id;
    uint64_t expire_ms;  /* Unix ms, once known (a held destination asks); 0: not yet */
    bool bounce;         /* the operator bounces these recipients */
    unsigned failovers;  /* times a session failure moved it to the next address */
    unsigned n;
    char domain[256];
    unsigned idx[];
};

struct dest;

struct conn {
    struct delivery *d;   /* borrowed: outlives its connections */
    struct dest *dest;    /* borrowed: a dest lives while it has connections */
    struct conn *next_idle;
    struct site *site;    /* owned reference: the site it was opened for */
    unsigned epoch;       /* its site's window epoch when it opened */
    int tls_pol;          /* enum domain_tls it was opened with: a domain it
                           * moves to must have the same */
    bool addr_counted;    /* counted in the worker's per-address table */
    uint64_t id;          /* for the logs: conn=ID on each line */
    int fd;
    unsigned inflight;
    bool closed, connected, recv_busy, send_busy, want_close;
    struct op connect_op, recv_op, send_op;
    struct timer timer;
    union dns_addr addr;
    char addr_str[64];
    char mx[256];
    unsigned nmsgs;       /* transactions finished on this connection */
    unsigned max_rcpt;    /* recipients per transaction, as the machine was told */
    bool txn_done_seen;
    bool ready_once;      /* the session reached IDLE at least once */
    bool leased;          /* holds a connection lease of its destination */
    struct mxkey *mxk;    /* borrowed: holds a lease of it when not NULL */
    struct mxkey *srck;   /* borrowed: its source address's [source] lease, or NULL */
    struct conn *prev_all, *next_all; /* every connection of the worker */

    struct job *job;      /* owned: the job in flight, or NULL */
    struct queue_envelope *env; /* owned: its envelope */
    struct smtp_client_txn txn;
    struct smtp_client_rcpt *rc; /* owned, job->n entries */
    char verp[256];       /* the VERP sender of the transaction (oob.h), when on: a
                           * local part of at most 64, a verp_domain of at most 180 */
    uint64_t body_off;    /* octets of the body read from the spool */
    size_t chunk_len, chunk_pos;
    bool body_last;

    /* STARTTLS: once tls is set the socket carries ciphertext (cin in,
     * tls_conn_peek out) and the machine sees plaintext. */
    struct tls_conn *tls; /* owned */
    bool tls_wanted;      /* EV_STARTTLS: handshake once the output is sent */
    bool tls_ready;
    bool tls_shut;
    char tls_desc[96];
    char tls_proto[16], tls_cipher[64];
    char src_str[64];     /* our address on this connection */
    uint64_t expire_ms;   /* Unix ms at which the job in flight expires, 0: none */
    char *cin;            /* owned, CIN_CAP */
    size_t cin_off;       /* cin[cin_off..cin_len) waits to be fed; compacted only
                           * while no recv is writing into cin */
    size_t cin_len;
    int pending_ev;       /* events not acted on yet (see conn_handle) */
    bool handling;

    /* Memory only while it is used (a connection waiting for a reply,
     * thousands of them, holds none): the machine's buffer comes from
     * d->cli_pool, received octets from the ring's provided buffers. */
    struct smtp_client cli;
    char *in;             /* owned, IN_CAP: only without provided buffers */
    char *chunk;          /* owned, from d->chunk_pool, only while a body is
                           * being sent */
};

/* A free list of equal buffers: connections borrow and return them many
 * times a second, so malloc is only met in bursts. */
struct pool {
    void *free;           /* owned: a list through each buffer's first word */
    unsigned nfree;
    size_t size;
    uint64_t out;         /* borrowed now */
};

/* The limits of one [mx PATTERN] on this worker, shared by the
 * destinations whose preferred MX host matches. */
struct mxkey {
    struct mxkey *next;       /* on d->mxkeys */
    struct delivery *d;       /* borrowed */
    const struct mx_policy *pol; /* borrowed from the config; NULL: gone after a reload */
    char pattern[LIMIT_KEY_MAX]; /* "mx:" or "src:" and the section's name */
    struct limit_key lim;
    struct dest *waiters;     /* refused a lease with no time to wait: woken on a release */
};

struct dest {
    struct hash_node node;   /* on d->dests: first, the table's entries are dests */
    struct lru_node lru;     /* on d->dest_lru: eviction when idle */
    uint64_t touched;        /* monotonic ns of its last activity */
    struct delivery *d;
    char name[256];
    const struct domain_policy *pol; /* borrowed from the config */
    struct job *head, **tail;
    unsigned queued;
    unsigned conns;          /* open or opening */
    unsigned opening;        /* not yet ready for a transaction */
    struct site *site;       /* owned reference: the site of its answer, or NULL */
    const struct dns_mx_result *site_for; /* borrowed, compared only: the answer site is of */
    struct lru_node want;    /* on site->want: waits for a connection */
    const struct dns_mx_result *targets_for; /* borrowed, compared only: what ntargets counts */
    unsigned ntargets;       /* its addresses that may be delivered to */
    struct dns_mx_result *mx; /* owned reference */
    struct dns_req *req;     /* lookup in flight */
    unsigned next_addr;      /* failover cursor over the answer's addresses */
    unsigned failed_addrs;   /* consecutive connection failures */
    uint64_t hold_until;     /* monotonic ns: no new connection before */
    struct smtp_outcome last_fail; /* why the last address failed, for the deferral */
    struct timer hold_timer;
    struct timer sweep_timer; /* while held: expire what waits */
    bool suspended;          /* by the operator: no new transaction */
    bool running, rerun;     /* in dest_run; asked again meanwhile */
    struct mxkey *mxk;       /* borrowed: its MX host's [mx] limits, or NULL */
    const struct dns_mx_result *mxk_for; /* the answer mxk was chosen from */
    struct dest *next_mxwait; /* on mxk->waiters */
    bool mx_waiting;
    struct limit_key lim;    /* rates and connection leases (limits.h) */
    struct timer lim_timer;  /* a refused token or lease: ask again then */
    unsigned inflight;       /* jobs on connections now */
    uint64_t delivered, failed; /* recipients, since start */
    uint64_t last_ms;        /* Unix ms of the last outcome */
    char last_reply[160];    /* the last reply that was not a delivery */
};

struct delivery {
    struct engine *e;  /* borrowed */
    struct worker *w;  /* borrowed */
    struct tls_cache *tls_cache; /* owned: client sessions of this worker, per MX */
    struct resolver *res; /* owned */
    struct limits *lim;   /* owned: rate limits and leases of this worker's domains */
    struct queue_port *port; /* owned */
    struct op port_op;
    bool stopping;
    bool draining;           /* SIGTERM: finish what is in flight, start nothing */
    bool drained;            /* ... and it is done: told the engine */
    struct hash dests;       /* struct dest by name */
    struct lru dest_lru;     /* least recently active first */
    struct timer evict_timer;
    uint64_t evicted;        /* destinations dropped when idle */
    struct timer due_timer; /* worker 0: take due recipients from the spool */
    struct delivery_stats stats;
    struct pool cli_pool;    /* struct smtp_client_buf */
    struct pool chunk_pool;  /* BODY_CHUNK */
    struct io_uring_buf_ring *br; /* owned (mmap): provided receive buffers, or NULL */
    char *br_mem;            /* owned: IN_BUFS * IN_CAP */
    struct conn *all;        /* every connection, for shutdown */
    uint64_t rng;            /* xorshift state: retry jitter */
    struct outcome_batch *retrying; /* owned: outcomes waiting to be committed again */
    struct mxkey *mxkeys;    /* owned: [mx] limits met so far, and [source] ones ("src:") */
    struct sites sites;      /* sites and connections per MX address (outbound/site.h) */
    uint64_t dsn_seq;        /* makes DSN Message-IDs unique */
    uint64_t conn_seq;       /* connection ids: worker id in the top byte */
    char (*local)[64];       /* owned: this host's interface addresses, as text */
    unsigned nlocal;
    bool resolver_closed;
    struct worker_msg stop_msg;
    struct worker_msg drain_msg;
};

static void dest_run(struct dest *t);
static void drain_check(struct delivery *d);
static void dest_hold(struct dest *t, uint64_t ms);
static void delivery_check_done(struct delivery *d);
static void conn_close(struct conn *c, const char *why);
static void conn_handle(struct conn *c, int ev);
static void conn_flush(struct conn *c);

static void *
pool_get(struct pool *p)
{
    void *b = p->free;
    if (b != NULL) {
        memcpy(&p->free, b, sizeof(void *));
        p->nfree--;
    } else if ((b = malloc(p->size)) == NULL) {
        return NULL;
    }
    p->out++;
    return b;
}

static void
pool_put(struct pool *p, void *b)
{
    if (b == NULL)
        return;
    p->out--;
    if (p->nfree >= POOL_KEEP) {
        free(b);
        return;
    }
    memcpy(b, &p->free, sizeof(void *));
    p->free = b;
    p->nfree++;
}

static void
pool_fini(struct pool *p)
{
    while (p->free != NULL) {
        void *b = p->free;
        memcpy(&p->free, b, sizeof(void *));
        free(b);
    }
    p->nfree = 0;
}

uint32_t
delivery_domain_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (uint8_t)(*s | 0x20)) * 16777619u;
    return h;
}

/* ---- jobs between workers ---- */

static void delivery_on_job(struct worker *w, struct worker_msg *m);

static void
submit(struct engine *e, uint64_t id, const char *domain, const unsigned *idx, unsigned n,
       bool bounce)
{
    if (n == 0 || e->nworkers == 0 || (!bounce && !e->cfg->delivery.enabled))
        return; /* stays in the spool */
    size_t dl = strlen(domain);
    if (dl >= 256)
        dl = 255;
    struct job *j = malloc(sizeof(*j) + n * sizeof(unsigned));
    if (j == NULL) {
        /* Still in the spool: a restart delivers it. Say so. */
        log_msg(LOG_ERR, "event=job_lost_until_restart id=%016llx reason=out_of_memory",
                (unsigned long long)id);
        return;
    }
    j->m.fn = delivery_on_job;
    j->next = NULL;
    j->id = id;
    j->expire_ms = 0;
    j->bounce = bounce;
    j->failovers = 0;
    j->n = n;
    for (size_t i = 0; i < dl; i++)
        j->domain[i] = (char)((domain[i] >= 'A' && domain[i] <= 'Z') ? domain[i] + 32 : domain[i]);
    j->domain[dl] = '\0';
    memcpy(j->idx, idx, n * sizeof(unsigned));
    worker_post(&e->workers[delivery_domain_hash(j->domain) % e->nworkers], &j->m);
}

void
delivery_submit(struct engine *e, uint64_t id, const char *domain, const unsigned *idx,
                unsigned n)
{
    submit(e, id, domain, idx, n, false);
}

void
delivery_submit_bounce(struct engine *e, uint64_t id, const char *domain, const unsigned *idx,
                       unsigned n)
{
    submit(e, id, domain, idx, n, true);
}

/* ---- destinations ---- */

static void dest_on_hold(struct timer *t, void *ctx);
static void dest_on_sweep(struct timer *t, void *ctx);

static void
dest_limit_conf(const struct domain_policy *pol, struct limit_conf *lc)
{
    memset(lc, 0, sizeof(*lc));
    lc->msg_rate = pol->max_message_rate;
    lc->msg_burst = pol->message_burst;
    lc->conn_rate = pol->max_connection_rate;
    lc->conn_burst = pol->connection_burst;
    lc->max_connections = pol->max_connections;
}

/* The limiter has news for t (a refill, a lease, a resume). */
static void
dest_on_wake(void *arg)
{
    dest_run(arg);
}

static void
dest_on_lim_timer(struct timer *tm, void *ctx)
{
    (void)ctx;
    dest_run((struct dest *)((char *)tm - offsetof(struct dest, lim_timer)));
}

/* A token or lease was refused: run again when the limiter says. */
static void
dest_lim_wait(struct dest *t, uint64_t retry_at)
{
    if (retry_at == UINT64_MAX)
        return; /* the waker will run */
    if (!timer_armed(&t->lim_timer) || t->lim_timer.deadline > retry_at)
        worker_timer_arm(t->d->w, &t->lim_timer, retry_at);
}

static void
mx_limit_conf(const struct delivery *d, const struct mx_policy *m, struct limit_conf *lc)
{
    memset(lc, 0, sizeof(*lc));
    if (m == NULL)
        return; /* a pattern gone after a reload: no limit */
    /* Without Redis each worker holds its share: the domains behind one MX
     * are spread over the workers. */
    unsigned share = d->e->cfg->redis.url == NULL ? d->e->nworkers : 1;
    lc->msg_rate = m->max_message_rate;
    if (share > 1 && lc->msg_rate.count != 0)
        lc->msg_rate.count = lc->msg_rate.count / share ? lc->msg_rate.count / share : 1;
    lc->msg_burst = m->message_burst / share;
    lc->conn_rate = m->max_connection_rate;
    if (share > 1 && lc->conn_rate.count != 0)
        lc->conn_rate.count = lc->conn_rate.count / share ? lc->conn_rate.count / share : 1;
    lc->conn_burst = m->connection_burst / share;
    lc->max_connections = m->max_connections == 0 ? 0
                          : m->max_connections / share ? m->max_connections / share : 1;
}

static void
mx_on_wake(void *arg)
{
    struct mxkey *k = arg;
    struct dest *w = k->waiters;
    k->waiters = NULL;
    while (w != NULL) {
        struct dest *next = w->next_mxwait;
        w->next_mxwait = NULL;
        w->mx_waiting = false;
        dest_run(w);
        w = next;
    }
}

/* The key of an [mx] ("mx:") or [source] ("src:") section m, made on
 * first use: its name for the limiter is prefix + the section's name. */
static struct mxkey *
mxkey_get(struct delivery *d, const char *prefix, const struct mx_policy *m)
{
    char name[LIMIT_KEY_MAX];
    snprintf(name, sizeof(name), "%s%s", prefix, m->pattern);
    for (struct mxkey *k = d->mxkeys; k != NULL; k = k->next)
        if (strcmp(k->pattern, name) == 0)
            return k;
    struct mxkey *k = calloc(1, sizeof(*k));
    if (k == NULL)
        return NULL;
    k->d = d;
    k->pol = m;
    snprintf(k->pattern, sizeof(k->pattern), "%s", name);
    struct limit_conf lc;
    mx_limit_conf(d, m, &lc);
    if (limits_key_init(d->lim, &k->lim, name, &lc, mx_on_wake, k) < 0) {
        free(k);
        return NULL;
    }
    k->next = d->mxkeys;
    d->mxkeys = k;
    return k;
}

/* The [mx] limits for t's preferred MX host, looked up once per answer. */
static struct mxkey *
dest_mxkey(struct dest *t)
{
    struct delivery *d = t->d;
    if (t->mx != NULL && t->mxk_for == t->mx)
        return t->mxk;
    t->mxk_for = t->mx;
    t->mxk = NULL;
    if (t->mx == NULL || t->mx->nhosts == 0 || d->e->cfg->nmxs == 0)
        return NULL;
    const struct mx_policy *m = config_mx(d->e->cfg, t->mx->hosts[0].name);
    if (m == NULL)
        return NULL;
    return t->mxk = mxkey_get(d, "mx:", m);
}

/* The [source] limits of connections in family fam (from [delivery]
 * source_address), or NULL. */
static struct mxkey *
src_key(struct delivery *d, int fam)
{
    const struct delivery_config *dc = &d->e->cfg->delivery;
    const struct sockaddr_storage *ss = fam == AF_INET6 ? &dc->source6 : &dc->source4;
    if (d->e->cfg->nsources == 0 || ss->ss_family == AF_UNSPEC)
        return NULL;
    const struct mx_policy *m = config_source(d->e->cfg, (const struct sockaddr *)ss);
    if (m == NULL)
        return NULL;
    return mxkey_get(d, "src:", m);
}

static void
mx_wait(struct mxkey *k, struct dest *t, uint64_t retry_at)
{
    if (retry_at != UINT64_MAX) {
        dest_lim_wait(t, retry_at);
        return;
    }
    if (!t->mx_waiting) {
        t->mx_waiting = true;
        t->next_mxwait = k->waiters;
        k->waiters = t;
    }
}

/* ---- targets: where mail must not go ---- */

struct dest;
static unsigned dest_port(const struct dest *t);

/* This host's interface addresses (for listeners on a wildcard address).
 * Without them only the listeners' own addresses are known. */
static void
local_addrs_load(struct delivery *d)
{
    struct ifaddrs *ifa = NULL;
    if (getifaddrs(&ifa) < 0)
        return;
    unsigned n = 0;
    for (struct ifaddrs *i = ifa; i != NULL; i = i->ifa_next)
        n += i->ifa_addr != NULL &&
             (i->ifa_addr->sa_family == AF_INET || i->ifa_addr->sa_family == AF_INET6);
    d->local = n ? calloc(n, sizeof(*d->local)) : NULL;
    for (struct ifaddrs *i = ifa; i != NULL && d->local != NULL; i = i->ifa_next)
        if (i->ifa_addr != NULL &&
            (i->ifa_addr->sa_family == AF_INET || i->ifa_addr->sa_family == AF_INET6))
            netaddr_ip_str(i->ifa_addr, d->local[d->nlocal++], sizeof(d->local[0]));
    freeifaddrs(ifa);
}

/* Is a (on port) one of this node's SMTP listeners? Delivering there is
 * a loop, whatever allow_networks says. */
static bool
target_is_self(const struct delivery *d, const union dns_addr *a, unsigned port)
{
    const struct server_config *srv = &d->e->cfg->server;
    char ip[64];
    netaddr_ip_str(&a->sa, ip, sizeof(ip));
    for (int k = 0; k < 2; k++) {
        const struct netaddr *l = k == 0 ? srv->listen_addrs : srv->listen_tls_addrs;
        int n = k == 0 ? srv->nlisten : srv->nlisten_tls;
        for (int i = 0; i < n; i++) {
            const struct sockaddr *sa = (const struct sockaddr *)&l[i].ss;
            unsigned lport = sa->sa_family == AF_INET6
                                 ? ntohs(((const struct sockaddr_in6 *)sa)->sin6_port)
                                 : ntohs(((const struct sockaddr_in *)sa)->sin_port);
            if (lport != port || sa->sa_family != a->sa.sa_family)
                continue;
            char lip[64];
            netaddr_ip_str(sa, lip, sizeof(lip));
            if (strcmp(lip, ip) == 0)
                return true;
            const char *sp = netaddr_special(sa);
            if (sp != NULL && strcmp(sp, "unspecified") == 0) {
                if (netaddr_is_loopback(&a->sa))
                    return true;
                for (unsigned j = 0; j < d->nlocal; j++)
                    if (strcmp(d->local[j], ip) == 0)
                        return true;
            }
        }
    }
    return false;
}

/* Why a (on port) is refused as a delivery target ("loopback", ...), or
 * NULL. */
static const char *
target_refused(const struct delivery *d, const union dns_addr *a, unsigned port)
{
    const struct delivery_config *dc = &d->e->cfg->delivery;
    if (target_is_self(d, a, port))
        return "this node's own listener";
    const char *what = netaddr_special(&a->sa);
    if (what != NULL && cidr_match(dc->allow, dc->nallow, &a->sa))
        return NULL;
    return what;
}

/* ---- sites (outbound/site.h): connections shared by domains ---- */

static void
want_remove(struct dest *t)
{
    if (t->site != NULL)
        lru_remove(&t->site->want, &t->want);
}

/* t waits for a connection of its site: a slot when one closes or the
 * window grows, or an idle one of another domain. In arrival order: a
 * domain already waiting keeps its place. */
static void
want_push(struct dest *t)
{
    if (t->site != NULL && !t->want.on)
        lru_touch(&t->site->want, &t->want);
}

static struct dest *
want_pop(struct site *s)
{
    struct lru_node *x = lru_oldest(&s->want);
    if (x == NULL)
        return NULL;
    lru_remove(&s->want, x);
    return (struct dest *)((char *)x - offsetof(struct dest, want));
}

/* Connections t may have through its site now: the window, and the
 * domain's own max_connections. */
static unsigned
site_allowed(const struct dest *t)
{
    unsigned a = site_window_allowed(&t->site->win);
    return a < t->pol->max_connections ? a : t->pol->max_connections;
}

/* The addresses of t's answer that may be delivered to, counted once per
 * answer. With none, t->last_fail says why (for the bounce). */
static unsigned
dest_targets(struct dest *t)
{
    if (t->targets_for == t->mx)
        return t->ntargets;
    t->targets_for = t->mx;
    t->ntargets = 0;
    const char *why = NULL;
    const struct dns_mx_host *wh = NULL;
    const union dns_addr *wa = NULL;
    for (unsigned h = 0; h < t->mx->nhosts; h++)
        for (unsigned i = 0; i < t->mx->hosts[h].naddrs; i++) {
            const char *r = target_refused(t->d, &t->mx->hosts[h].addrs[i], dest_port(t));
            if (r == NULL) {
                t->ntargets++;
            } else if (why == NULL) {
                why = r;
                wh = &t->mx->hosts[h];
                wa = &t->mx->hosts[h].addrs[i];
            }
        }
    if (why != NULL) {
        char ip[64];
        netaddr_ip_str(&wa->sa, ip, sizeof(ip));
        log_msg(t->ntargets ? LOG_INFO : LOG_NOTICE,
                "event=target_refused domain=%s mx=%s addr=%s reason=\"%s\" usable=%u", t->name,
                wh->name, ip, why, t->ntargets);
        if (t->ntargets == 0) {
            struct smtp_outcome *o = &t->last_fail;
            memset(o, 0, sizeof(*o));
            bool self = strcmp(why, "this node's own listener") == 0;
            o->enh = (struct smtp_enh){5, 4, self ? 6 : 4};
            if (self)
                snprintf(o->text, sizeof(o->text), "mail for %s loops back to myself (MX %s, %s)",
                         t->name, wh->name, ip);
            else
                snprintf(o->text, sizeof(o->text),
                         "MX %s of %s has address %s (%s): not a delivery target, see "
                         "[delivery] allow_networks",
                         wh->name, t->name, ip, why);
        }
    }
    return t->ntargets;
}

/* The site of t's answer, joined when the answer is new. */
static void
dest_site(struct dest *t)
{
    struct delivery *d = t->d;
    if (t->mx == NULL || t->mx->status != DNS_OK || t->site_for == t->mx)
        return;
    const struct delivery_config *dc = &d->e->cfg->delivery;
    char key[SITE_KEY_MAX];
    site_key(t->mx, dest_port(t), key, sizeof(key));
    struct site *s = site_get(&d->sites, key, dc->initial_connections, t->pol->max_connections);
    if (s == NULL)
        return; /* no memory: keep the old one, ask again with the next answer */
    t->site_for = t->mx;
    if (s == t->site) {
        site_unref(&d->sites, s);
        return;
    }
    want_remove(t);
    site_unref(&d->sites, t->site);
    t->site = s;
    if (s->win.ceiling < t->pol->max_connections)
        site_window_set_ceiling(&s->win, t->pol->max_connections);
}

/* Hand an idle (or finishing) connection c to domain t of its site: the
 * domain's connection lease moves with it. False when t's own limits
 * refuse or its TLS policy differs from the one c was opened with. */
static bool
conn_move(struct conn *c, struct dest *t)
{
    struct delivery *d = c->d;
    struct dest *old = c->dest;
    if (old == t)
        return true;
    if (t->pol->tls != c->tls_pol || t->site != c->site)
        return false;
    uint64_t retry_at;
    if (!limits_conn_acquire(d->lim, &t->lim, d->w->now, &retry_at))
        return false; /* t has its max_connections: those serve it */
    if (c->leased)
        limits_conn_release(d->lim, &old->lim);
    c->leased = true;
    old->conns--;
    t->conns++;
    c->dest = t;
    if (log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, "conn=%llx event=conn_moved site=%s from=%s to=%s",
                (unsigned long long)c->id, c->site->key, old->name,
                t->name);
    return true;
}

/* A domain of c's site that waits for a connection, c moved to it; NULL
 * when none can take it. */
static struct dest *
conn_take_waiting(struct conn *c)
{
    struct site *s = c->site;
    struct delivery *d = c->d;
    struct dest *t;
    while (s != NULL && (t = want_pop(s)) != NULL) {
        if (t->head == NULL || t->suspended || d->w->now < t->hold_until || !conn_move(c, t))
            continue;
        if (t->queued > 1)
            want_push(t); /* more for other idle connections */
        return t;
    }
    return NULL;
}

static void dest_run(struct dest *t);

/* Room at site s (a connection closed, the window grew): let the domains
 * waiting for it run, as many as it has room for. */
static void
site_wake(struct delivery *d, struct site *s)
{
    if (s == NULL || d->stopping)
        return;
    s->refs++; /* dest_run may drop the last other reference */
    unsigned n = 0;
    struct dest *t;
    while (n++ < 64 && s->conns < site_window_allowed(&s->win) && (t = want_pop(s)) != NULL) {
        dest_run(t);
        if (t->want.on)
            break; /* it could not open one: the others would not either */
    }
    site_unref(&d->sites, s);
}

static bool
dest_eq(const struct hash_node *n, const void *key)
{
    return strcmp(((const struct dest *)n)->name, key) == 0;
}

static struct dest *
dest_get(struct delivery *d, const char *name)
{
    uint64_t h = hash_str_nocase(name);
    struct dest *t = (struct dest *)hash_find(&d->dests, h, name);
    if (t != NULL)
        return t;
    t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    t->d = d;
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->pol = config_domain(d->e->cfg, name);
    t->tail = &t->head;
    timer_init(&t->hold_timer, dest_on_hold);
    timer_init(&t->sweep_timer, dest_on_sweep);
    timer_init(&t->lim_timer, dest_on_lim_timer);
    struct limit_conf lc;
    dest_limit_conf(t->pol, &lc);
    if (limits_key_init(d->lim, &t->lim, t->name, &lc, dest_on_wake, t) < 0) {
        /* a name the limiter refuses ('{' '}'): no domain has one */
        free(t);
        return NULL;
    }
    t->node.hash = h;
    if (hash_insert(&d->dests, &t->node) < 0) {
        limits_key_fini(d->lim, &t->lim);
        free(t);
        return NULL;
    }
    t->touched = d->w->now;
    lru_touch(&d->dest_lru, &t->lru);
    return t;
}

/* Iteration over the destinations of a worker. */
struct dest_iter {
    size_t bucket;
    struct hash_node *cur;
};

static struct dest *
dest_next(const struct delivery *d, struct dest_iter *it)
{
    return (struct dest *)hash_next(&d->dests, &it->bucket, &it->cur);
}

static struct job *dest_pop(struct dest *t);

/* Forget t and what waits in it (the spool keeps the recipients). live:
 * the loop turns, so timers, the lookup and the limiter are let go of
 * too; else they went with the loop. */
static void
dest_free(struct dest *t, bool live)
{
    struct delivery *d = t->d;
    struct job *j;
    while ((j = dest_pop(t)) != NULL)
        free(j);
    if (live) {
        worker_timer_cancel(d->w, &t->hold_timer);
        worker_timer_cancel(d->w, &t->sweep_timer);
        worker_timer_cancel(d->w, &t->lim_timer);
        if (t->req != NULL && d->res != NULL)
            resolver_cancel(d->res, t->req);
        if (t->lim.l != NULL)
            limits_key_fini(d->lim, &t->lim);
    }
    dns_mx_result_unref(t->mx);
    want_remove(t);
    site_unref(&d->sites, t->site);
    hash_remove(&d->dests, &t->node);
    lru_remove(&d->dest_lru, &t->lru);
    free(t);
}

/* Nothing of t is going on, nor has been for the idle time: it may go
 * (what it knows, the MX answer, is in the resolver's cache). A held or
 * suspended destination stays: that is state an operator or a receiver
 * set. */
static bool
dest_evictable(const struct dest *t, uint64_t now)
{
    return t->queued == 0 && t->inflight == 0 && t->conns == 0 && !t->suspended &&
           t->req == NULL && !t->mx_waiting && !t->running && now >= t->hold_until &&
           t->lim.nleases == 0;
}

/* Every EVICT_SWEEP_MS: drop the destinations idle for
 * [delivery] destination_idle_ttl, oldest first; busy ones met on the
 * way go to the recent end. Their sites go with their last reference. */
static void
dest_on_evict(struct timer *tm, void *ctx)
{
    (void)ctx;
    struct delivery *d = (struct delivery *)((char *)tm - offsetof(struct delivery, evict_timer));
    if (d->stopping)
        return;
    uint64_t now = d->w->now, ttl = MS_TO_NS(d->e->cfg->delivery.destination_idle_ttl);
    size_t budget = d->dest_lru.n;
    struct lru_node *x;
    while (budget-- > 0 && (x = lru_oldest(&d->dest_lru)) != NULL) {
        struct dest *t = (struct dest *)((char *)x - offsetof(struct dest, lru));
        if (now - t->touched < ttl)
            break;
        if (!dest_evictable(t, now)) {
            t->touched = now;
            lru_touch(&d->dest_lru, &t->lru);
            continue;
        }
        dest_free(t, true);
        d->evicted++;
    }
    hash_compact(&d->dests);
    if (!d->stopping)
        worker_timer_arm(d->w, &d->evict_timer, now + MS_TO_NS(EVICT_SWEEP_MS));
}

/* t is active now. */
static void
dest_touch(struct dest *t)
{
    t->touched = t->d->w->now;
    lru_touch(&t->d->dest_lru, &t->lru);
}

static void
dest_push(struct dest *t, struct job *j, bool front)
{
    if (front) {
        j->next = t->head;
        t->head = j;
        if (t->tail == &t->head)
            t->tail = &j->next;
    } else {
        j->next = NULL;
        *t->tail = j;
        t->tail = &j->next;
    }
    t->queued++;
}

static struct job *
dest_pop(struct dest *t)
{
    struct job *j = t->head;
    if (j == NULL)
        return NULL;
    t->head = j->next;
    if (t->head == NULL)
        t->tail = &t->head;
    t->queued--;
    j->next = NULL;
    return j;
}

static void job_fail(struct delivery *d, struct dest *t, struct job *j, bool permanent,
                     unsigned code, const char *enh, const char *text, enum classify_source src);

/* An operator bounce on the owning worker. A recipient on a connection now
 * is left alone (its transaction decides: bouncing it could contradict a
 * 250 a moment later); one waiting here is taken out of its job. */
static void
bounce_now(struct delivery *d, struct dest *t, struct job *j)
{
    unsigned n = 0, busy = 0;
    for (unsigned i = 0; i < j->n; i++) {
        bool flight = false;
        for (struct conn *c = d->all; c != NULL && !flight; c = c->next_all)
            if (c->dest == t && c->job != NULL && c->job->id == j->id)
                for (unsigned k = 0; k < c->job->n; k++)
                    flight |= c->job->idx[k] == j->idx[i];
        if (flight) {
            busy++;
            continue;
        }
        for (struct job **pp = &t->head; *pp != NULL;) {
            struct job *q = *pp;
            if (q->id == j->id) {
                unsigned m = 0;
                for (unsigned k = 0; k < q->n; k++)
                    if (q->idx[k] != j->idx[i])
                        q->idx[m++] = q->idx[k];
                q->n = m;
            }
            if (q->n == 0) {
                *pp = q->next;
                if (t->tail == &q->next)
                    t->tail = pp;
                t->queued--;
                free(q);
                continue;
            }
            pp = &q->next;
        }
        j->idx[n++] = j->idx[i];
    }
    j->n = n;
    if (busy > 0) {
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(j->id, qid);
        log_msg(LOG_NOTICE, "id=%s event=operator_bounce_skipped domain=%s in_flight=%u", qid,
                t->name, busy);
    }
    if (n == 0) {
        free(j);
        return;
    }
    job_fail(d, t, j, true, 550, "5.0.0", "bounced by the operator", CLASSIFY_REPLY);
}

static void
delivery_on_job(struct worker *w, struct worker_msg *m)
{
    struct engine *e = w->ctx;
    struct delivery *d = e->dlv[w->id];
    struct job *j = (struct job *)m;
    struct dest *t = d ? dest_get(d, j->domain) : NULL;
    if (t == NULL) {
        free(j);
        return;
    }
    if (j->bounce) {
        bounce_now(d, t, j);
        return;
    }
    /* Split to the domain's recipients per transaction. */
    unsigned max = t->pol->max_rcpt_per_txn;
    while (j->n > max) {
        struct job *rest = malloc(sizeof(*rest) + (j->n - max) * sizeof(unsigned));
        if (rest == NULL)
            break;
        *rest = *j;
        rest->n = j->n - max;
        memcpy(rest->idx, j->idx + max, rest->n * sizeof(unsigned));
        j->n = max;
        dest_push(t, j, false);
        j = rest;
    }
    dest_push(t, j, false);
    if (d->w->now < t->hold_until && !timer_armed(&t->sweep_timer))
        worker_timer_arm(d->w, &t->sweep_timer, d->w->now + MS_TO_NS(SWEEP_MS));
    dest_run(t);
}

/* ---- outcomes ---- */

/* The outcomes of one job, kept (replies copied) until their commit is
 * durable: a commit that fails (I/O, or a spool so full that even the
 * reserve for outcomes is gone) is tried again, backing off, for as long
 * as the worker runs. Without that the recipients would wait in the spool,
 * ready, with nobody to take them until a restart. */
struct outcome_batch {
    struct delivery *d;
    struct outcome_batch *prev, *next; /* on d->retrying while waiting to retry */
    struct timer timer;
    unsigned tries;
    struct dsn_msg *dsn; /* owned: committed with the outcomes, or NULL */
    size_t n;
    struct queue_outcome o[]; /* then the reply texts */
};

static void outcome_done(void *cookie, int rc);
static void dsn_committed(struct delivery *d, const struct dsn_msg *m);

static void
outcome_submit(struct outcome_batch *b)
{
    struct delivery *d = b->d;
    struct queue_envelope denv;
    struct queue_rcpt drcpt;
    struct iovec dbody;
    if (b->dsn != NULL)
        dsn_msg_envelope(b->dsn, &denv, &drcpt, &dbody);
    int rc = queue_update_enqueue(d->e->queue, d->port, b->o, b->n, b->dsn ? &denv : NULL,
                                  &dbody, b->dsn ? 1 : 0, outcome_done, b);
    if (rc < 0)
        outcome_done(b, rc);
}

static void
outcome_on_retry(struct timer *tm, void *ctx)
{
    (void)ctx;
    struct outcome_batch *b = (struct outcome_batch *)((char *)tm - offsetof(struct outcome_batch, timer));
    struct delivery *d = b->d;
    if (b->prev)
        b->prev->next = b->next;
    else
        d->retrying = b->next;
    if (b->next)
        b->next->prev = b->prev;
    b->prev = b->next = NULL;
    outcome_submit(b);
}

static void
outcome_done(void *cookie, int rc)
{
    struct outcome_batch *b = cookie;
    struct delivery *d = b->d;
    if (rc == 0) {
        if (b->dsn != NULL)
            dsn_committed(d, b->dsn);
        dsn_msg_free(b->dsn);
        free(b);
        return;
    }
    b->tries++;
    if (d->stopping) {
        /* neither the outcomes nor their DSN are stored: the recipients
         * are tried again after the restart, and fail (and tell) again */
        log_msg(LOG_ERR, "event=outcome_commit_failed err=\"%s\" recipients=%zu dsn=%s "
                         "note=retried_after_restart",
                queue_strerror(rc), b->n, b->dsn ? "yes" : "no");
        dsn_msg_free(b->dsn);
        free(b);
        return;
    }
    unsigned shift = b->tries < 6 ? b->tries : 6;
    log_msg(b->tries == 1 ? LOG_ERR : LOG_WARN,
            "event=outcome_commit_failed err=\"%s\" recipients=%zu tries=%u retry_in_ms=%u",
            queue_strerror(rc), b->n, b->tries, 500u << shift);
    b->next = d->retrying;
    if (b->next)
        b->next->prev = b;
    d->retrying = b;
    timer_init(&b->timer, outcome_on_retry);
    worker_timer_arm(d->w, &b->timer, d->w->now + MS_TO_NS(500u << shift));
}

/* Copy qo[0..n) and their replies into one batch and submit it, with the
 * DSN they cause (owned: taken over, freed on failure too) or NULL. */
static int
outcome_commit(struct delivery *d, const struct queue_outcome *qo, size_t n, struct dsn_msg *dsn)
{
    size_t text = 0;
    for (size_t i = 0; i < n; i++)
        text += qo[i].reply ? strlen(qo[i].reply) + 1 : 0;
    struct outcome_batch *b = malloc(sizeof(*b) + n * sizeof(b->o[0]) + text);
    if (b == NULL) {
        dsn_msg_free(dsn);
        return -ENOMEM;
    }
    memset(b, 0, sizeof(*b));
    b->d = d;
    b->dsn = dsn;
    b->n = n;
    char *t = (char *)&b->o[n];
    for (size_t i = 0; i < n; i++) {
        b->o[i] = qo[i];
        if (qo[i].reply != NULL) {
            size_t l = strlen(qo[i].reply) + 1;
            memcpy(t, qo[i].reply, l);
            b->o[i].reply = t;
            t += l;
        }
    }
    outcome_submit(b);
    return 0;
}

static uint64_t
rng_next(struct delivery *d)
{
    uint64_t x = d->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return d->rng = x;
}

/* The schedule's delay for a recipient deferred attempts times already,
 * moved at random by up to retry_jitter percent either way. */
static uint64_t
retry_delay_ms(struct delivery *d, const struct domain_policy *pol, unsigned attempts)
{
    return policy_retry_delay(&pol->retry_schedule, attempts, d->e->cfg->delivery.retry_jitter,
                              rng_next(d));
}

/* When the recipients of id give up: max_age after arrival, or earlier
 * when the message carried its own expiry. */
static uint64_t
job_expire_ms(const struct domain_policy *pol, const struct queue_envelope *env, uint64_t id)
{
    uint64_t arrival = env != NULL && env->arrival_ms != 0 ? env->arrival_ms : queue_id_time_ms(id);
    return policy_expiry(arrival, pol->max_age, env != NULL ? env->expire_ms : 0);
}

/* Where an outcome was met, for the log and the classification. */
struct outcome_where {
    const char *mx, *mx_addr, *source;
    const char *tls_proto, *tls_cipher;
    enum classify_source src; /* for outcomes that are not a server's reply */
};

/* Values of the configured delivery-log headers in the message's header
 * section; vals[i] points into buf (NULL when absent). */
static void
job_headers(struct delivery *d, const struct config *cfg, uint64_t id, char *buf, size_t cap,
            const char **vals)
{
    const struct log_config *lc = &cfg->log;
    for (unsigned i = 0; i < lc->nheaders; i++)
        vals[i] = NULL;
    size_t len = 0;
    if (lc->nheaders == 0 || queue_body_read(d->e->queue, id, 0, buf, cap - 1, &len) != 0)
        return;
    buf[len] = '\0';
    for (char *line = buf; *line != '\0' && *line != '\r' && *line != '\n';) {
        char *eol = strstr(line, "\r\n");
        if (eol == NULL)
            break; /* cut by the scan's size */
        *eol = '\0';
        char *colon = strchr(line, ':');
        for (unsigned i = 0; colon != NULL && i < lc->nheaders; i++) {
            size_t n = strlen(lc->headers[i]);
            if (vals[i] == NULL && (size_t)(colon - line) == n &&
                strncasecmp(line, lc->headers[i], n) == 0) {
                char *v = colon + 1;
                while (*v == ' ' || *v == '\t')
                    v++;
                vals[i] = v; /* a folded value keeps its first line only */
            }
        }
        line = eol + 2;
    }
}

/* A DSN's commit (with its outcomes) is durable: count, log, deliver it. */
static void
dsn_committed(struct delivery *d, const struct dsn_msg *m)
{
    char qid[QUEUE_ID_STRLEN + 1], oqid[QUEUE_ID_STRLEN + 1];
    queue_id_str(m->id, qid);
    queue_id_str(m->orig, oqid);
    unsigned idx = 0;
    d->stats.dsn_queued++;
    log_msg(LOG_INFO, "id=%s event=dsn_queued dsn_id=%s", oqid, qid);
    struct dlog_event ev = {.kind = DLOG_DSN, .id = oqid, .reply = qid, .size = m->len};
    dlog_event(d->e->dlogw ? d->e->dlogw[d->w->id] : NULL, &ev);
    delivery_submit(d->e, m->id, m->domain, &idx, 1);
}

/* The DSN for the failed recipients r[0..n) of env to its sender, to be
 * committed with their outcomes; NULL (logged) when it cannot be built. */
static struct dsn_msg *
dsn_make(struct delivery *d, const struct queue_envelope *env, const struct dsn_rcpt *r,
         unsigned n)
{
    const struct config *cfg = d->e->cfg;
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(env->id, qid);
    bool full = env->ret == QUEUE_RET_FULL && env->body_len <= cfg->bounce.return_max;
    size_t want = full ? env->body_len : (env->body_len < DSN_ORIG_MAX ? env->body_len : DSN_ORIG_MAX);
    char *orig = malloc(want ? want : 1);
    size_t got = 0;
    if (orig == NULL || queue_body_read(d->e->queue, env->id, 0, orig, want, &got) != 0)
        got = 0;
    char from[300], msgid[400];
    snprintf(from, sizeof(from), "%s@%s", cfg->bounce.dsn_from, cfg->server.hostname);
    snprintf(msgid, sizeof(msgid), "%s.dsn%llu.w%u@%s", qid, (unsigned long long)++d->dsn_seq,
             d->w->id, cfg->server.hostname);
    struct dsn_input in = {
        .reporting_mta = cfg->server.hostname,
        .from_addr = from,
        .to_addr = env->sender,
        .message_id = msgid,
        .boundary_seed = msgid,
        .envid = env->envid,
        .queue_id = qid,
        .arrival_ms = env->arrival_ms,
        .now_ms = clock_unix_ms(),
        .orig = got ? orig : NULL,
        .orig_len = got,
        .ret_full = full,
        .full_max = cfg->bounce.return_max,
        .smtputf8 = env->smtputf8,
        .rcpt = r,
        .nrcpt = n,
    };
    struct dsn_msg *m = NULL;
    int rc = dsn_msg_new(&in, env, queue_id_next(d->e->queue), &m);
    free(orig);
    if (rc != 0)
        log_msg(LOG_ERR, "id=%s event=dsn_failed err=%d", qid, rc);
    return m;
}

/* Report the outcome of every recipient of job (from the transaction, or
 * one outcome for all when all is given) to the spool, the logs and the
 * sender (DSN). A temporary failure past the recipient's expiry is an
 * expiration; a deferral never reaches past it, so that a deferred
 * recipient comes due when it expires. */
static void
job_finish(struct delivery *d, struct dest *t, struct job *j, const struct queue_envelope *env,
           const struct smtp_client_rcpt *rc, const struct smtp_outcome *all,
           const struct outcome_where *where)
{
    const struct config *cfg = d->e->cfg;
    struct queue_outcome *qo = calloc(j->n, sizeof(*qo));
    struct dsn_rcpt *dr = calloc(j->n, sizeof(*dr));
    char (*status)[16] = calloc(j->n, sizeof(*status));
    if (qo == NULL || dr == NULL || status == NULL) {
        log_msg(LOG_ERR, "event=outcome_lost_until_restart id=%016llx", (unsigned long long)j->id);
        free(qo);
        free(dr);
        free(status);
        return;
    }
    static const struct outcome_where nowhere = {.src = CLASSIFY_CONNECT};
    if (where == NULL)
        where = &nowhere;
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(j->id, qid);
    uint64_t now = clock_unix_ms();
    uint64_t expire = job_expire_ms(t->pol, env, j->id);
    struct dlog_writer *lw = d->e->dlogw ? d->e->dlogw[d->w->id] : NULL;
    const char *hvals[DLOG_HEADERS_MAX];
    char *hbuf = NULL;
    unsigned nhdr = lw != NULL ? cfg->log.nheaders : 0;
    if (nhdr > 0 && (hbuf = malloc(HDR_SCAN_MAX)) != NULL)
        job_headers(d, cfg, j->id, hbuf, HDR_SCAN_MAX, hvals);
    else
        nhdr = 0;
    unsigned ndsn = 0, nq = 0;
    for (unsigned i = 0; i < j->n; i++) {
        const struct smtp_outcome *o = all ? all : &rc[i].out;
        const struct queue_rcpt *r = NULL;
        for (unsigned k = 0; env != NULL && k < env->nrcpt; k++)
            if (env->rcpt[k].index == j->idx[i])
                r = &env->rcpt[k];
        if (env != NULL && r == NULL)
            continue; /* no longer stored (done meanwhile): nothing to tell */
        struct queue_outcome *q = &qo[nq++];
        q->id = j->id;
        q->rcpt = j->idx[i];
        q->code = o->code;
        q->reply = o->text;
        enum dlog_kind kind;
        enum bounce_class cls = BOUNCE_OTHER;
        bool failed = false;
        /* The decision is the failure policy's (outbound/policy.h). */
        enum bounce_class oc = o->status == SMTP_STATUS_DELIVERED
                                   ? BOUNCE_OTHER
                                   : classify(cfg->classify, policy_source(o, where->src), o->code,
                                              &o->enh, o->text);
        struct policy_rcpt pr;
        policy_rcpt(o, oc, where->src, now, expire,
                    o->status == SMTP_STATUS_TEMPFAIL ? retry_delay_ms(d, t->pol, r ? r->attempts : 0)
                                                      : 0,
                    &pr);
        if (pr.kind == POLICY_DELIVERED) {
            q->kind = QUEUE_DELIVERED;
            kind = DLOG_DELIVERY;
            d->stats.delivered++;
            t->delivered++;
            if (where->tls_proto != NULL)
                d->stats.delivered_tls++;
        } else if (pr.kind == POLICY_BOUNCE) {
            q->kind = QUEUE_BOUNCED;
            kind = DLOG_BOUNCE;
            cls = oc;
            failed = true;
            d->stats.bounced++;
        } else if (pr.kind == POLICY_EXPIRE) {
            q->kind = QUEUE_BOUNCED;
            kind = DLOG_EXPIRATION;
            cls = BOUNCE_EXPIRED;
            failed = true;
            d->stats.expired++;
        } else {
            q->kind = QUEUE_DEFERRED;
            q->due_ms = pr.due_ms;
            kind = DLOG_TRANSIENT_FAILURE;
            cls = oc;
            d->stats.deferred++;
            if (pr.backoff)
                limits_backoff(d->lim, &t->lim, d->w->now);
        }
        if (failed)
            t->failed++;
        if (kind != DLOG_DELIVERY)
            snprintf(t->last_reply, sizeof(t->last_reply), "%u %.150s", o->code, o->text);
        t->last_ms = now;
        char enh[16] = "";
        if (o->enh.cls != 0)
            snprintf(enh, sizeof(enh), "%u.%u.%u", o->enh.cls, o->enh.subject, o->enh.detail);
        const char *cls_str = kind == DLOG_DELIVERY ? NULL : bounce_class_str(cls);
        log_msg(LOG_INFO,
                "id=%s event=%s rcpt=<%s> domain=%s mx=%s tls=\"%s\" code=%u "
                "enhanced=%s reason=%s class=%s reply=\"%s\"",
                qid, kind == DLOG_DELIVERY ? "delivered" : kind == DLOG_TRANSIENT_FAILURE ? "deferred"
                     : kind == DLOG_EXPIRATION ? "expired" : "bounced",
                r ? r->addr : "?", t->name, where->mx ? where->mx : "-",
                where->tls_proto ? where->tls_proto : "none", o->code, enh[0] ? enh : "-",
                smtp_reason_str(o->reason), cls_str ? cls_str : "-", o->text);
        struct dlog_event ev = {
            .kind = kind,
            .time_ms = now,
            .id = qid,
            .rcpt = r ? r->addr : NULL,
            .sender = env ? env->sender : NULL,
            .domain = t->name,
            .mx = where->mx,
            .mx_addr = where->mx_addr,
            .source = where->source,
            .code = o->code,
            .enhanced = enh[0] ? enh : NULL,
            .reply = o->text[0] ? o->text : NULL,
            .attempt = (r ? r->attempts : 0) + 1,
            .classification = cls_str,
            .tls_protocol = where->tls_proto,
            .tls_cipher = where->tls_cipher,
            .size = env ? env->body_len : 0,
            .arrival_ms = env ? env->arrival_ms : queue_id_time_ms(j->id),
            .hdr_names = (const char *const *)cfg->log.headers,
            .hdr_values = hvals,
            .nhdr = nhdr,
        };
        dlog_event(lw, &ev);
        /* An address that is gone goes on the suppression list, as the
         * config says for its class: the global list (gone is gone, for
         * every tenant). */
        if (kind == DLOG_BOUNCE && r != NULL)
            suppress_on_bounce(d->e->suppress, NULL, r->addr, cls, o->text);
        /* A delay warning, for recipients that asked for one (NOTIFY=DELAY),
         * once: at the deferral that carries it past delay_warning. */
        bool warn = false;
        if (kind == DLOG_TRANSIENT_FAILURE && r != NULL && env != NULL &&
            cfg->bounce.delay_warning != 0) {
            uint64_t at = env->arrival_ms + cfg->bounce.delay_warning;
            uint64_t prev = r->last_ms != 0 ? r->last_ms : env->arrival_ms;
            warn = prev < at && at <= now && dsn_wanted(r->notify, false);
        }
        if ((failed || warn) && r != NULL && env != NULL && env->sender[0] != '\0' &&
            cfg->bounce.dsn && dsn_wanted(r->notify, failed)) {
            struct dsn_rcpt *x = &dr[ndsn++];
            dsn_status_format(status[i], sizeof(status[i]), &o->enh, o->code, warn);
            if (warn && status[i][0] == '5')
                status[i][0] = '4'; /* a 5xx greeting, retried elsewhere: still a delay */
            x->delayed = warn;
            x->retry_until_ms = warn ? expire : 0;
            if (kind == DLOG_EXPIRATION)
                snprintf(status[i], sizeof(status[i]), "%s", "4.4.7");
            x->addr = r->addr;
            x->orcpt = r->orcpt;
            x->status = status[i];
            x->code = o->reason == SMTP_REASON_REPLY ? o->code : 0;
            x->text = o->text[0] ? o->text : NULL;
            x->remote_mta = where->mx;
            x->last_attempt_ms = now;
            x->class_str = cls_str;
        }
    }
    /* The DSN goes in the commit of the outcomes that cause it. */
    struct dsn_msg *dm = ndsn > 0 && nq > 0 ? dsn_make(d, env, dr, ndsn) : NULL;
    int rc2 = nq == 0 ? 0 : outcome_commit(d, qo, nq, dm);
    if (rc2 < 0)
        log_msg(LOG_ERR, "event=outcome_submit_failed id=%s err=\"%s\"", qid,
                queue_strerror(rc2));
    free(hbuf);
    free(qo);
    free(dr);
    free(status);
}

/* A failure for a whole job without a session: DNS, no address. */
static void
job_fail(struct delivery *d, struct dest *t, struct job *j, bool permanent, unsigned code,
         const char *enh, const char *text, enum classify_source src)
{
    struct smtp_outcome o;
    memset(&o, 0, sizeof(o));
    o.code = (uint16_t)code;
    o.status = permanent ? SMTP_STATUS_PERMFAIL : SMTP_STATUS_TEMPFAIL;
    o.scope = SMTP_SCOPE_SESSION;
    o.reason = SMTP_REASON_NONE;
    unsigned a = 0, b = 0, c = 0;
    if (sscanf(enh, "%u.%u.%u", &a, &b, &c) == 3) {
        o.enh.cls = (uint8_t)a;
        o.enh.subject = (uint16_t)b;
        o.enh.detail = (uint16_t)c;
    }
    snprintf(o.text, sizeof(o.text), "%s", text);
    struct queue_envelope *env = NULL;
    queue_envelope_get(d->e->queue, j->id, &env);
    struct outcome_where where = {.src = src};
    job_finish(d, t, j, env, NULL, &o, &where);
    queue_envelope_free(env);
    free(j);
}

/* ---- connections ---- */

#define CONN_OF(ptr, field) ((struct conn *)((char *)(ptr) - offsetof(struct conn, field)))

/* The state's deadline, or the expiry of the job in flight when sooner:
 * a recipient expires even on a connection that hangs. */
static void
conn_deadline(struct conn *c, uint64_t ms)
{
    uint64_t now = c->d->w->now;
    uint64_t at = ms == 0 ? 0 : now + MS_TO_NS(ms);
    /* Not once the final dot is out: the server may have accepted the
     * message, and its reply must be heard (RFC 5321 4.5.3.2.6). */
    if (c->job != NULL && c->expire_ms != 0 && smtp_client_state(&c->cli) != SMTP_CLIENT_S_DOT) {
        uint64_t wall = clock_unix_ms();
        uint64_t e = now + MS_TO_NS(c->expire_ms > wall ? c->expire_ms - wall : 0);
        if (at == 0 || e < at)
            at = e;
    }
    if (at == 0)
        worker_timer_cancel(c->d->w, &c->timer);
    else
        worker_timer_arm(c->d->w, &c->timer, at);
}

/* The machine, with a buffer lent from the pool: every call that may
 * write output or parse input goes through here. Without memory the call
 * fails (SMTP_CLIENT_E_STATE) and conn_handle() closes the connection. */
static struct smtp_client *
conn_cli(struct conn *c)
{
    if (c->cli.buf == NULL) {
        struct smtp_client_buf *b = pool_get(&c->d->cli_pool);
        if (b != NULL)
            smtp_client_attach(&c->cli, b);
    }
    return &c->cli;
}

/* Give the buffer back when the machine holds nothing in it. */
static void
conn_cli_release(struct conn *c)
{
    pool_put(&c->d->cli_pool, smtp_client_detach(&c->cli));
}

/* The site's window learns of a refusal, timeout, reset or 421. */
static void
conn_congested(struct conn *c, const char *why)
{
    struct site *s = c->site;
    s->failures++;
    if (!site_window_on_failure(&s->win, c->epoch))
        return;
    s->shrinks++;
    log_msg(LOG_NOTICE, "conn=%llx event=site_window_down site=%s addr=%s reason=%s window=%u",
            (unsigned long long)c->id, s->key, c->addr_str, why, site_window_allowed(&s->win));
}

static void
conn_free(struct conn *c)
{
    struct delivery *d = c->d;
    struct dest *t = c->dest;
    worker_timer_cancel(d->w, &c->timer);
    if (c->fd >= 0)
        close(c->fd);
    if (c->job != NULL) {
        /* Not finished by the machine (cannot happen after EV_TXN_DONE):
         * back to the queue, it was not sent. */
        dest_push(t, c->job, true);
        c->job = NULL;
        t->inflight--;
    }
    queue_envelope_free(c->env);
    free(c->rc);
    tls_conn_free(c->tls);
    free(c->cin);
    free(c->in);
    pool_put(&d->chunk_pool, c->chunk);
    /* Whatever the machine still held is moot: nothing is in flight. */
    pool_put(&d->cli_pool, c->cli.buf);
    struct site *site = c->site;
    for (struct conn **p = site ? &site->idle : NULL; p != NULL && *p != NULL; p = &(*p)->next_idle)
        if (*p == c) {
            *p = c->next_idle;
            break;
        }
    const struct smtp_outcome *so = c->connected ? smtp_client_session(&c->cli) : NULL;
    /* What the end of this connection means: the failure policy's call
     * (a reset in a transaction is seen in conn_txn_done). */
    struct policy_conn_end pe = {
        .connected = c->connected,
        .ready_once = c->ready_once,
        .session = so,
        .stopping = d->stopping,
    };
    struct policy_conn_decision pd;
    policy_conn_end(&pe, &pd);
    if (site != NULL && pd.congested && !d->draining)
        conn_congested(c, so != NULL && so->code == 421 ? "421" : "not_ready");
    if (pd.hold) {
        log_msg(LOG_NOTICE,
                "conn=%llx event=destination_held domain=%s mx=%s for_ms=%llu reply=\"%s\"",
                (unsigned long long)c->id, t->name, c->mx, (unsigned long long)t->pol->site_hold,
                so->text);
        dest_hold(t, t->pol->site_hold);
    }
    if (pd.backoff)
        limits_backoff(d->lim, &t->lim, d->w->now);
    if (!c->ready_once)
        t->opening--;
    if (pd.remember) {
        t->last_fail = *so;
        t->last_fail.status = SMTP_STATUS_TEMPFAIL;
    }
    if (pd.next_addr) {
        t->failed_addrs++;
        t->next_addr++;
    }
    if (c->prev_all)
        c->prev_all->next_all = c->next_all;
    else
        d->all = c->next_all;
    if (c->next_all)
        c->next_all->prev_all = c->prev_all;
    t->conns--;
    d->stats.open--;
    if (site != NULL)
        site->conns--;
    if (c->addr_counted)
        site_addr_del(&d->sites, &c->addr);
    if (c->leased && !d->stopping)
        limits_conn_release(d->lim, &t->lim);
    struct mxkey *mk = c->mxk, *sk = c->srck;
    if (mk != NULL && !d->stopping)
        limits_conn_release(d->lim, &mk->lim);
    if (sk != NULL && !d->stopping)
        limits_conn_release(d->lim, &sk->lim);
    free(c);
    if (mk != NULL && !d->stopping)
        mx_on_wake(mk); /* a slot is free: the others behind this MX may go */
    if (sk != NULL && !d->stopping)
        mx_on_wake(sk);
    drain_check(d);
    if (!d->stopping) {
        dest_run(t);
        site_wake(d, site); /* a slot of the site, and of an address, is free */
    } else {
        delivery_check_done(d);
    }
    site_unref(&d->sites, site);
}

static void
conn_maybe_free(struct conn *c)
{
    if (c->closed && c->inflight == 0)
        conn_free(c);
}

static void
conn_close(struct conn *c, const char *why)
{
    if (c->closed)
        return;
    if (why != NULL && log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, "conn=%llx event=conn_close domain=%s mx=%s addr=%s reason=%s",
                (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str, why);
    c->closed = true;
    worker_timer_cancel(c->d->w, &c->timer);
    if (!c->connected) {
        /* shutdown() does not end a connect in progress; a cancel does */
        struct io_uring_sqe *sqe = worker_sqe(c->d->w, NULL);
        io_uring_prep_cancel64(sqe, (uint64_t)(uintptr_t)&c->connect_op, 0);
    }
    if (c->fd >= 0)
        shutdown(c->fd, SHUT_RDWR);
}

static void
conn_recv(struct conn *c)
{
    if (c->closed || c->recv_busy || !c->connected)
        return;
    struct delivery *d = c->d;
    if (c->tls != NULL) {
        if (c->cin_len == CIN_CAP)
            return;
        struct io_uring_sqe *sqe = worker_sqe(d->w, &c->recv_op);
        io_uring_prep_recv(sqe, c->fd, c->cin + c->cin_len, CIN_CAP - c->cin_len, 0);
    } else if (d->br != NULL) {
        /* The kernel picks a buffer when octets arrive, not now. */
        struct io_uring_sqe *sqe = worker_sqe(d->w, &c->recv_op);
        io_uring_prep_recv(sqe, c->fd, NULL, IN_CAP, 0);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = IN_BGID;
    } else {
        if (c->in == NULL && (c->in = malloc(IN_CAP)) == NULL) {
            conn_close(c, "out_of_memory");
            return;
        }
        struct io_uring_sqe *sqe = worker_sqe(d->w, &c->recv_op);
        io_uring_prep_recv(sqe, c->fd, c->in, IN_CAP, 0);
    }
    c->recv_busy = true;
    c->inflight++;
}

/* Register the worker's provided receive buffers. Without them (an old
 * kernel) each connection reads into its own buffer. */
static void
delivery_bufs_init(struct delivery *d)
{
    size_t ring_len = IN_BUFS * sizeof(struct io_uring_buf);
    void *ring = mmap(NULL, ring_len, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (ring == MAP_FAILED)
        return;
    d->br_mem = malloc((size_t)IN_BUFS * IN_CAP);
    struct io_uring_buf_reg reg = {.ring_addr = (uint64_t)(uintptr_t)ring,
                                   .ring_entries = IN_BUFS,
                                   .bgid = IN_BGID};
    int rc = d->br_mem ? io_uring_register_buf_ring(&d->w->ring, &reg, 0) : -ENOMEM;
    if (rc < 0) {
        log_msg(LOG_NOTICE, "event=provided_buffers_unavailable err=\"%s\" note=per_connection_buffers",
                strerror(-rc));
        munmap(ring, ring_len);
        free(d->br_mem);
        d->br_mem = NULL;
        return;
    }
    d->br = ring;
    io_uring_buf_ring_init(d->br);
    for (unsigned i = 0; i < IN_BUFS; i++)
        io_uring_buf_ring_add(d->br, d->br_mem + (size_t)i * IN_CAP, IN_CAP, (unsigned short)i,
                              io_uring_buf_ring_mask(IN_BUFS), (int)i);
    io_uring_buf_ring_advance(d->br, IN_BUFS);
}

/* After the loop ended, from the thread that frees: no read is in flight,
 * and the ring (a single-issuer ring refuses registrations from other
 * threads) drops its reference when it closes. */
static void
delivery_bufs_fini(struct delivery *d)
{
    if (d->br == NULL)
        return;
    munmap(d->br, IN_BUFS * sizeof(struct io_uring_buf));
    free(d->br_mem);
    d->br = NULL;
    d->br_mem = NULL;
}

/* The provided buffer a completion carries, or NULL. */
static char *
recv_buf(struct delivery *d, uint32_t flags, unsigned *bid)
{
    if (d->br == NULL || !(flags & IORING_CQE_F_BUFFER))
        return NULL;
    *bid = flags >> IORING_CQE_BUFFER_SHIFT;
    return d->br_mem + (size_t)*bid * IN_CAP;
}

static void
recv_buf_put(struct delivery *d, unsigned bid)
{
    io_uring_buf_ring_add(d->br, d->br_mem + (size_t)bid * IN_CAP, IN_CAP, (unsigned short)bid,
                          io_uring_buf_ring_mask(IN_BUFS), 0);
    io_uring_buf_ring_advance(d->br, 1);
}

static void tls_start(struct conn *c);

static void
conn_flush(struct conn *c)
{
    if (c->closed || c->send_busy || !c->connected)
        return;
    size_t len;
    const char *p = smtp_client_output(&c->cli, &len);
    if (c->tls != NULL && c->tls_ready) {
        /* Plaintext into TLS; what TLS took counts as sent. */
        while (len > 0) {
            ssize_t n = tls_conn_write(c->tls, p, len);
            if (n <= 0)
                break;
            c->pending_ev |= smtp_client_sent(conn_cli(c), (size_t)n);
            p = smtp_client_output(&c->cli, &len);
        }
        if (len == 0 && c->want_close && !c->tls_shut)
            c->tls_shut = tls_conn_shutdown(c->tls) != TLS_WANT_IO;
    }
    if (c->tls != NULL)
        p = tls_conn_peek(c->tls, &len);
    if (len == 0) {
        if (c->want_close)
            conn_close(c, "done");
        else if (c->tls_wanted && c->tls == NULL)
            tls_start(c);
        return;
    }
    struct io_uring_sqe *sqe = worker_sqe(c->d->w, &c->send_op);
    io_uring_prep_send(sqe, c->fd, p, len, MSG_NOSIGNAL);
    c->send_busy = true;
    c->inflight++;
}

/* Feed the body from the spool while the machine's output has room. */
static void
conn_body(struct conn *c)
{
    while (!c->closed && smtp_client_state(&c->cli) == SMTP_CLIENT_S_BODY) {
        if (c->chunk_pos == c->chunk_len && !c->body_last) {
            size_t got = 0;
            if (c->chunk == NULL && (c->chunk = pool_get(&c->d->chunk_pool)) == NULL) {
                conn_handle(c, smtp_client_quit(conn_cli(c))); /* aborts: all temporary */
                return;
            }
            int rc = queue_body_read(c->d->e->queue, c->job->id, c->body_off, c->chunk,
                                     BODY_CHUNK, &got);
            if (rc != 0) {
                log_msg(LOG_ERR, "conn=%llx event=body_read_failed domain=%s err=\"%s\"",
                        (unsigned long long)c->id, c->dest->name, queue_strerror(rc));
                conn_handle(c, smtp_client_quit(conn_cli(c))); /* aborts: all temporary */
                return;
            }
            c->body_off += got;
            c->chunk_len = got;
            c->chunk_pos = 0;
            c->body_last = c->body_off >= c->env->body_len || got == 0;
        }
        size_t consumed = 0;
        int ev = smtp_client_body(conn_cli(c), c->chunk + c->chunk_pos, c->chunk_len - c->chunk_pos,
                                  c->body_last, &consumed);
        c->chunk_pos += consumed;
        if (ev < 0)
            return;
        bool full = c->chunk_pos < c->chunk_len;
        if (ev & ~SMTP_CLIENT_EV_SEND_BODY)
            conn_handle(c, ev & ~SMTP_CLIENT_EV_SEND_BODY);
        if (full || (c->body_last && c->chunk_pos == c->chunk_len))
            break; /* wait for room, or the terminator is queued */
    }
}

/* The smaller of two caps, 0 meaning none. */
static unsigned
lower(unsigned a, unsigned b)
{
    return a == 0 ? b : b == 0 ? a : a < b ? a : b;
}

/* Transactions on c before QUIT: its domain's, or its [mx] or [source]
 * section's when lower. */
static unsigned
conn_max_msgs(const struct conn *c)
{
    unsigned m = c->dest->pol->max_messages_per_connection;
    if (c->mxk != NULL && c->mxk->pol != NULL)
        m = lower(m, c->mxk->pol->max_messages_per_connection);
    if (c->srck != NULL && c->srck->pol != NULL)
        m = lower(m, c->srck->pol->max_messages_per_connection);
    return m;
}

/* Start the next transaction, go idle, or say goodbye. */
static void
conn_next(struct conn *c)
{
    struct dest *t = c->dest;
    if (!c->ready_once) {
        c->ready_once = true;
        t->opening--;
        t->failed_addrs = 0; /* this address works */
    }
    if (c->nmsgs >= conn_max_msgs(c) || c->d->stopping || c->d->draining) {
        conn_handle(c, smtp_client_quit(conn_cli(c)));
        return;
    }
    unsigned moves = 0;
    for (;;) {
        struct job *j = NULL;
        uint64_t retry_at;
        if (!t->suspended && t->head != NULL) {
            struct mxkey *mk = c->mxk, *sk = c->srck;
            if (limits_take_msgs(c->d->lim, &t->lim, 1, c->d->w->now, &retry_at) != 1)
                dest_lim_wait(t, retry_at);
            else if (mk != NULL &&
                     limits_take_msgs(c->d->lim, &mk->lim, 1, c->d->w->now, &retry_at) != 1)
                mx_wait(mk, t, retry_at); /* the domain's token is spent: a small loss */
            else if (sk != NULL &&
                     limits_take_msgs(c->d->lim, &sk->lim, 1, c->d->w->now, &retry_at) != 1)
                mx_wait(sk, t, retry_at); /* likewise */
            else
                j = dest_pop(t);
        }
        if (j == NULL && (t->head == NULL || t->suspended) && moves < 8) {
            /* Nothing here: the next transaction of another domain of
             * the site (MX rollup). */
            struct dest *w = conn_take_waiting(c);
            if (w != NULL) {
                t = w;
                moves++;
                continue;
            }
        }
        if (j == NULL) {
            if (t->head == NULL && ((c->mxk != NULL && c->mxk->waiters != NULL) ||
                                    (c->srck != NULL && c->srck->waiters != NULL))) {
                /* Nothing more here while other domains wait for a slot at
                 * this MX: give it back now rather than after idling. */
                conn_handle(c, smtp_client_quit(conn_cli(c)));
                return;
            }
            /* Idle: wait for work of any domain of the site up to the
             * idle time. */
            c->next_idle = c->site->idle;
            c->site->idle = c;
            conn_deadline(c, c->d->e->cfg->delivery.idle_timeout);
            return;
        }
        struct queue_envelope *env;
        int erc = queue_envelope_get(c->d->e->queue, j->id, &env);
        if (erc == QUEUE_ENOTFOUND) {
            free(j); /* gone: bounced by an operator, or done before a restart */
            continue;
        }
        if (erc != 0) {
            /* The spool could not say (I/O, readers): keep the job, rest. */
            log_msg(LOG_ERR, "event=envelope_read_failed domain=%s err=\"%s\"", t->name,
                    queue_strerror(erc));
            dest_push(t, j, true);
            dest_hold(t, HOLD_MIN_MS);
            conn_handle(c, smtp_client_quit(conn_cli(c)));
            return;
        }
        /* VERP (oob.h): each recipient has its own sender, so its own transaction. */
        unsigned maxr = c->d->e->cfg->bounce.verp_domain != NULL && env->sender[0] ? 1 : c->max_rcpt;
        if (j->n > maxr) {
            /* Split with a larger max_rcpt_per_txn before a reload. */
            struct job *rest = malloc(sizeof(*rest) + (j->n - maxr) * sizeof(unsigned));
            if (rest == NULL) {
                queue_envelope_free(env);
                dest_push(t, j, true);
                conn_handle(c, smtp_client_quit(conn_cli(c)));
                return;
            }
            *rest = *j;
            rest->n = j->n - maxr;
            memcpy(rest->idx, j->idx + maxr, rest->n * sizeof(unsigned));
            j->n = maxr;
            dest_push(t, rest, true);
        }
        uint64_t expire = job_expire_ms(t->pol, env, j->id);
        if (clock_unix_ms() + EXPIRY_SLACK_MS >= expire) {
            /* Expired while it waited here: bounce it, do not send it. */
            struct smtp_outcome o;
            memset(&o, 0, sizeof(o));
            o.status = SMTP_STATUS_TEMPFAIL;
            o.scope = SMTP_SCOPE_MESSAGE;
            o.enh = (struct smtp_enh){4, 4, 7};
            snprintf(o.text, sizeof(o.text), "message expired in the queue");
            struct outcome_where where = {.src = CLASSIFY_EXPIRED};
            job_finish(c->d, t, j, env, NULL, &o, &where);
            queue_envelope_free(env);
            free(j);
            continue;
        }
        struct smtp_client_rcpt *rc = calloc(j->n, sizeof(*rc));
        if (rc == NULL) {
            queue_envelope_free(env);
            dest_push(t, j, true);
            conn_handle(c, smtp_client_quit(conn_cli(c)));
            return;
        }
        unsigned n = 0;
        for (unsigned i = 0; i < j->n; i++)
            for (unsigned k = 0; k < env->nrcpt; k++)
                if (env->rcpt[k].index == j->idx[i]) {
                    j->idx[n] = j->idx[i];
                    struct smtp_client_rcpt *r = &rc[n++];
                    r->addr.ptr = env->rcpt[k].addr;
                    r->addr.len = strlen(env->rcpt[k].addr);
                    if (env->rcpt[k].notify) {
                        r->params.seen |= SMTP_PARAM_NOTIFY;
                        r->params.notify = env->rcpt[k].notify;
                    }
                    /* RFC 3461 5.2: DSN parameters go on to the next hop
                     * (the machine drops them when it does not offer DSN). */
                    const char *oc = env->rcpt[k].orcpt;
                    const char *semi = oc ? strchr(oc, ';') : NULL;
                    if (semi != NULL && semi > oc && semi[1] != '\0') {
                        r->params.seen |= SMTP_PARAM_ORCPT;
                        r->params.orcpt_type = (struct smtp_span){oc, (size_t)(semi - oc)};
                        r->params.orcpt_addr = (struct smtp_span){semi + 1, strlen(semi + 1)};
                    }
                }
        j->n = n; /* recipients already done (before a restart) drop out */
        if (n == 0) {
            free(rc);
            queue_envelope_free(env);
            free(j);
            continue;
        }
        c->job = j;
        c->env = env;
        c->rc = rc;
        c->expire_ms = expire;
        t->inflight++;
        break;
    }
    struct queue_envelope *env = c->env;
    c->body_off = 0;
    c->chunk_len = c->chunk_pos = 0;
    c->body_last = false;
    c->txn_done_seen = false;
    memset(&c->txn, 0, sizeof(c->txn));
    c->txn.from.ptr = env->sender;
    c->txn.from.len = strlen(env->sender);
    int vn = oob_verp_sender(&c->d->e->cfg->bounce, env->sender, env->id, c->job->idx[0],
                             c->rc[0].addr.ptr, env->tenant, c->verp, sizeof(c->verp));
    if (vn > 0)
        c->txn.from = (struct smtp_span){c->verp, (size_t)vn};
    else if (vn < 0) /* cannot happen within the config's bounds: said, then sent as injected */
        log_msg(LOG_ERR, "conn=%llx event=verp_failed err=%d", (unsigned long long)c->id, vn);
    c->txn.params.seen = SMTP_PARAM_SIZE | SMTP_PARAM_BODY;
    c->txn.params.size = env->body_len;
    c->txn.params.body =
        env->body_type == QUEUE_BODY_8BITMIME ? SMTP_BODY_8BITMIME : SMTP_BODY_7BIT;
    if (env->smtputf8)
        c->txn.params.seen |= SMTP_PARAM_SMTPUTF8;
    if (env->ret != QUEUE_RET_NONE) {
        c->txn.params.seen |= SMTP_PARAM_RET;
        c->txn.params.ret = env->ret == QUEUE_RET_FULL ? SMTP_RET_FULL : SMTP_RET_HDRS;
    }
    if (env->envid != NULL && env->envid[0] != '\0') {
        c->txn.params.seen |= SMTP_PARAM_ENVID;
        c->txn.params.envid = (struct smtp_span){env->envid, strlen(env->envid)};
    }
    c->txn.rcpt = c->rc;
    c->txn.nrcpt = c->job->n;
    if (c->nmsgs > 0)
        c->d->stats.reused++;
    c->d->stats.transactions++;
    conn_handle(c, smtp_client_txn(conn_cli(c), &c->txn));
}

static void
conn_txn_done(struct conn *c)
{
    struct dest *t = c->dest;
    struct job *j = c->job;
    c->job = NULL;
    c->nmsgs++;
    t->inflight--;
    const struct smtp_outcome *mo = &c->txn.msg;
    if (mo->scope == SMTP_SCOPE_SESSION &&
        (mo->reason == SMTP_REASON_EOF || mo->reason == SMTP_REASON_TIMEOUT || mo->code == 421))
        conn_congested(c, mo->code == 421 ? "421" : "reset");
    else if (c->site != NULL) {
        unsigned before = site_window_allowed(&c->site->win);
        site_window_on_success(&c->site->win, c->site->conns);
        if (site_window_allowed(&c->site->win) > before)
            site_wake(c->d, c->site); /* grew: room for a domain that waits */
    }
    /* A session failure before this connection delivered anything is the
     * server's, not the message's: give the job to the next MX address.
     * Not after a 421: the server is pushing back, the destination waits
     * (site_hold) and the job is deferred like any temporary failure. */
    struct policy_txn pt = {
        .msg = &c->txn.msg,
        .delivered = c->txn.delivered,
        .permfail = c->txn.permfail,
        .txns_on_conn = c->nmsgs,
        .failovers = j->failovers,
        .have_answer = t->mx != NULL,
        .now_ms = clock_unix_ms(),
        .expire_ms = c->expire_ms,
    };
    if (policy_failover(&pt)) {
        /* Never after the final dot (the server may have the message:
         * sending it again elsewhere is a duplicate), and a few times at
         * most: then it is deferred like any temporary failure. */
        j->failovers++;
        t->last_fail = c->txn.msg;
        t->failed_addrs++;
        t->next_addr++;
        dest_push(t, j, true);
    } else {
        t->failed_addrs = 0;
        struct outcome_where where = {
            .mx = c->mx,
            .mx_addr = c->addr_str,
            .source = c->src_str[0] ? c->src_str : NULL,
            .tls_proto = c->tls_ready ? c->tls_proto : NULL,
            .tls_cipher = c->tls_ready ? c->tls_cipher : NULL,
            .src = CLASSIFY_CONNECT,
        };
        job_finish(c->d, t, j, c->env, c->rc, NULL, &where);
        free(j);
    }
    queue_envelope_free(c->env);
    c->env = NULL;
    free(c->rc);
    c->rc = NULL;
    pool_put(&c->d->chunk_pool, c->chunk);
    c->chunk = NULL;
}

/* Act on the machine's events. Acting may produce more (a send frees
 * room, a transaction ends): they gather in pending_ev and the loop here
 * takes them, so no handler runs inside another. */
static void
conn_handle(struct conn *c, int ev)
{
    if (ev < 0) {
        log_msg(LOG_ERR, "conn=%llx event=client_misuse domain=%s err=%s",
                (unsigned long long)c->id, c->dest->name, smtp_client_strerror(ev));
        dest_hold(c->dest, HOLD_MIN_MS); /* no reconnect storm */
        conn_close(c, "misuse");
        return;
    }
    c->pending_ev |= ev;
    if (c->handling)
        return;
    c->handling = true;
    while (c->pending_ev != 0 && !c->closed) {
        ev = c->pending_ev;
        c->pending_ev = 0;
        if (ev & SMTP_CLIENT_EV_TIMER)
            conn_deadline(c, smtp_client_deadline_ms(&c->cli));
        if (ev & SMTP_CLIENT_EV_TXN_DONE)
            conn_txn_done(c);
        if (ev & SMTP_CLIENT_EV_CLOSE) {
            c->want_close = true;
            c->pending_ev = 0;
            break;
        }
        if (ev & SMTP_CLIENT_EV_STARTTLS)
            c->tls_wanted = true; /* after the output has left: conn_flush */
        if (ev & SMTP_CLIENT_EV_SEND_BODY)
            conn_body(c);
        if (ev & SMTP_CLIENT_EV_READY)
            conn_next(c);
        conn_flush(c);
    }
    conn_flush(c);
    c->handling = false;
    conn_cli_release(c);
    if (!c->want_close)
        conn_recv(c);
}

/* ---- STARTTLS ---- */

static void
tls_start(struct conn *c)
{
    c->tls_wanted = false;
    bool verify = c->dest->pol->tls == DOMAIN_TLS_VERIFY;
    char key[sizeof(c->mx) + sizeof(c->addr_str) + 1];
    snprintf(key, sizeof(key), "%s:%s", c->mx, c->addr_str);
    c->cin = malloc(CIN_CAP);
    /* The engine's current ctx: a reload may have brought other CAs. */
    struct tls_ctx *ctx = engine_tls_client(c->d->e);
    int rc = c->cin == NULL || ctx == NULL
                 ? -ENOMEM
                 : tls_conn_new_client(ctx, c->mx, verify, c->d->tls_cache, key, &c->tls);
    tls_ctx_unref(ctx);
    if (rc < 0) {
        free(c->cin);
        c->cin = NULL;
        conn_handle(c, smtp_client_tls_done(conn_cli(c), SMTP_CLIENT_TLS_FAILED));
        return;
    }
    c->cin_off = c->cin_len = 0;
    /* The ClientHello goes out now; the rest in tls_in(). */
    tls_conn_handshake(c->tls);
    conn_flush(c);
    conn_recv(c);
}

/* Move what cin holds into the conn, as much as it takes (an error shows
 * on the next call on the conn). Returns the count moved. */
static size_t
tls_feed(struct conn *c)
{
    size_t moved = 0;
    while (c->cin_off < c->cin_len) {
        ssize_t n = tls_conn_feed(c->tls, c->cin + c->cin_off, c->cin_len - c->cin_off);
        if (n <= 0)
            break;
        c->cin_off += (size_t)n;
        moved += (size_t)n;
    }
    if (c->cin_off != 0 && !c->recv_busy) {
        memmove(c->cin, c->cin + c->cin_off, c->cin_len - c->cin_off);
        c->cin_len -= c->cin_off;
        c->cin_off = 0;
    }
    return moved;
}

/* Ciphertext in: drive the handshake, then hand plaintext to the machine.
 * A handshake step or a read that yields nothing may still have taken
 * ciphertext out of the conn's full buffer (a record larger than it, such
 * as a long certificate chain): feed again before waiting for the socket,
 * or the rest of cin would wait for bytes the server never sends. */
static void
tls_in(struct conn *c)
{
    for (;;) {
        tls_feed(c);
        if (!c->tls_ready) {
            int rc = tls_conn_handshake(c->tls);
            if (rc == TLS_WANT_IO) {
                if (tls_feed(c) > 0)
                    continue;
                conn_flush(c);
                return;
            }
            if (rc < 0) {
                log_msg(LOG_NOTICE,
                        "conn=%llx event=tls_failed domain=%s mx=%s err=\"%s\" detail=\"%s\"",
                        (unsigned long long)c->id, c->dest->name, c->mx, tls_strerror(rc),
                        tls_conn_error_str(c->tls));
                conn_handle(c, smtp_client_tls_done(conn_cli(c), SMTP_CLIENT_TLS_FAILED));
                return;
            }
            struct tls_info info;
            c->tls_ready = true;
            bool verified = false;
            if (tls_conn_info(c->tls, &info) == 0) {
                snprintf(c->tls_proto, sizeof(c->tls_proto), "%s", info.protocol);
                snprintf(c->tls_cipher, sizeof(c->tls_cipher), "%s", info.cipher);
                snprintf(c->tls_desc, sizeof(c->tls_desc), "%s %s%s", info.protocol, info.cipher,
                         info.resumed ? " resumed" : "");
                verified = info.verified;
            }
            conn_handle(c, smtp_client_tls_done(conn_cli(c), verified ? SMTP_CLIENT_TLS_VERIFIED
                                                                  : SMTP_CLIENT_TLS_UNVERIFIED));
            if (c->closed)
                return;
        }
        char plain[IN_CAP];
        ssize_t n = tls_conn_read(c->tls, plain, sizeof(plain));
        if (n < 0) {
            conn_handle(c, smtp_client_eof(conn_cli(c)));
            return;
        }
        if (n > 0) {
            size_t used;
            conn_handle(c, smtp_client_input(conn_cli(c), plain, (size_t)n, &used));
            if (c->closed || c->want_close)
                return;
        } else if (tls_feed(c) == 0) {
            return; /* nothing read, nothing more to feed: wait for the socket */
        }
    }
}

static void
conn_on_recv(struct worker *w, struct op *op, int res, uint32_t flags)
{
    struct conn *c = CONN_OF(op, recv_op);
    struct delivery *d = c->d;
    unsigned bid = 0;
    char *in = recv_buf(d, flags, &bid);
    c->recv_busy = false;
    c->inflight--;
    if (c->closed) {
        if (in != NULL)
            recv_buf_put(d, bid);
        conn_maybe_free(c);
        return;
    }
    if (res <= 0) {
        if (in != NULL)
            recv_buf_put(d, bid);
        if (res == -EINTR || res == -EAGAIN || res == -ENOBUFS) {
            /* ENOBUFS: every provided buffer was taken in this batch of
             * completions; they are back by the time this is submitted. */
            if (res == -ENOBUFS)
                d->stats.recv_nobufs++;
            conn_recv(c);
            return;
        }
        conn_handle(c, smtp_client_eof(conn_cli(c)));
        conn_close(c, "eof");
        conn_maybe_free(c);
        return;
    }
    if (c->tls != NULL) {
        if (in != NULL) {
            /* A read posted before STARTTLS cannot complete after it
             * (tls_start posts the first ciphertext read). */
            recv_buf_put(d, bid);
            conn_close(c, "tls_read_state");
            conn_maybe_free(c);
            return;
        }
        c->cin_len += (size_t)res;
        tls_in(c);
        conn_recv(c);
        conn_maybe_free(c);
        return;
    }
    size_t used;
    /* An idle connection that hears from the server leaves the idle list
     * through conn_free or the events; the machine knows what it means.
     * The machine consumes all it is given (or closes), so the buffer goes
     * back at once. */
    int ev = smtp_client_input(conn_cli(c), in != NULL ? in : c->in, (size_t)res, &used);
    if (in != NULL)
        recv_buf_put(d, bid);
    conn_handle(c, ev);
    conn_maybe_free(c);
}

static void
conn_on_send(struct worker *w, struct op *op, int res, uint32_t flags)
{
    struct conn *c = CONN_OF(op, send_op);
    c->send_busy = false;
    c->inflight--;
    if (c->closed) {
        conn_maybe_free(c);
        return;
    }
    if (res <= 0) {
        conn_handle(c, smtp_client_eof(conn_cli(c)));
        conn_close(c, "send_failed");
        conn_maybe_free(c);
        return;
    }
    int ev = 0;
    if (c->tls != NULL)
        tls_conn_consume(c->tls, (size_t)res);
    else
        ev = smtp_client_sent(conn_cli(c), (size_t)res);
    if (smtp_client_state(&c->cli) == SMTP_CLIENT_S_BODY)
        ev |= SMTP_CLIENT_EV_SEND_BODY;
    conn_handle(c, ev);
    conn_maybe_free(c);
}

static void
conn_on_timer(struct timer *tm, void *ctx)
{
    struct conn *c = (struct conn *)((char *)tm - offsetof(struct conn, timer));
    if (!c->connected) {
        /* connect timed out: the pending connect completes on shutdown */
        c->dest->failed_addrs++;
        c->dest->next_addr++;
        conn_close(c, "connect_timeout");
        return;
    }
    conn_handle(c, smtp_client_timeout(conn_cli(c)));
}

/* Every state transition of the client machine, at debug level. */
static void
conn_on_trace(void *arg, enum smtp_client_state from, enum smtp_client_state to)
{
    const struct conn *c = arg;
    log_msg(LOG_DEBUG, "conn=%llx event=state domain=%s from=%s to=%s", (unsigned long long)c->id,
            c->dest->name, smtp_client_state_str(from), smtp_client_state_str(to));
}

static void
conn_on_connect(struct worker *w, struct op *op, int res, uint32_t flags)
{
    struct conn *c = CONN_OF(op, connect_op);
    c->inflight--;
    if (c->closed) {
        conn_maybe_free(c);
        return;
    }
    if (res < 0) {
        log_msg(LOG_NOTICE, "conn=%llx event=connect_failed domain=%s mx=%s addr=%s err=%s",
                (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str, strerror(-res));
        struct smtp_outcome *o = &c->dest->last_fail;
        memset(o, 0, sizeof(*o));
        o->status = SMTP_STATUS_TEMPFAIL;
        o->scope = SMTP_SCOPE_SESSION;
        o->enh = (struct smtp_enh){4, 4, 1};
        snprintf(o->text, sizeof(o->text), "connect to %s (%s): %s", c->mx, c->addr_str,
                 strerror(-res));
        c->d->stats.connect_failures++;
        c->dest->failed_addrs++;
        c->dest->next_addr++;
        conn_close(c, "connect_failed");
        conn_maybe_free(c);
        return;
    }
    c->connected = true;
    struct sockaddr_storage local;
    socklen_t llen = sizeof(local);
    if (getsockname(c->fd, (struct sockaddr *)&local, &llen) == 0)
        netaddr_ip_str((const struct sockaddr *)&local, c->src_str, sizeof(c->src_str));
    log_msg(LOG_INFO, "conn=%llx event=connected domain=%s mx=%s addr=%s",
            (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct smtp_client_opts o = {
        .name = c->d->e->cfg->server.hostname,
        .trace = log_enabled(LOG_DEBUG) ? conn_on_trace : NULL,
        .trace_arg = c,
        .tls = c->d->e->tls_client == NULL ? SMTP_CLIENT_TLS_OFF
               : c->dest->pol->tls == DOMAIN_TLS_VERIFY   ? SMTP_CLIENT_TLS_VERIFY
               : c->dest->pol->tls == DOMAIN_TLS_REQUIRED ? SMTP_CLIENT_TLS_REQUIRED
               : c->dest->pol->tls == DOMAIN_TLS_OPTIONAL ? SMTP_CLIENT_TLS_OPTIONAL
                                                          : SMTP_CLIENT_TLS_OFF,
        .max_rcpt = lower(c->dest->pol->max_rcpt_per_txn,
                          lower(c->mxk && c->mxk->pol ? c->mxk->pol->max_rcpt_per_txn : 0,
                                c->srck && c->srck->pol ? c->srck->pol->max_rcpt_per_txn : 0)),
    };
    c->max_rcpt = o.max_rcpt;
    int rc = smtp_client_init(&c->cli, &o);
    if (rc < 0) {
        log_msg(LOG_ERR, "conn=%llx event=client_init_failed name=%s err=%s",
                (unsigned long long)c->id, o.name, smtp_client_strerror(rc));
        conn_close(c, "init");
        conn_maybe_free(c);
        return;
    }
    conn_deadline(c, smtp_client_deadline_ms(&c->cli));
    conn_recv(c);
}

/* Pick the next address of the answer, in MX order, failover cursor
 * included. Returns false when every address has failed in a row. */
static bool
dest_address(struct dest *t, const struct dns_mx_host **host, const union dns_addr **addr)
{
    unsigned total = t->targets_for == t->mx ? t->ntargets : 0;
    if (total == 0 || t->failed_addrs >= total)
        return false;
    unsigned k = t->next_addr % total;
    for (unsigned h = 0; h < t->mx->nhosts; h++)
        for (unsigned i = 0; i < t->mx->hosts[h].naddrs; i++) {
            if (target_refused(t->d, &t->mx->hosts[h].addrs[i], dest_port(t)) != NULL)
                continue;
            if (k-- == 0) {
                *host = &t->mx->hosts[h];
                *addr = &t->mx->hosts[h].addrs[i];
                return true;
            }
        }
    return false;
}

/* a with t's port. */
static void
dest_addr_port(const struct dest *t, const union dns_addr *a, union dns_addr *out)
{
    *out = *a;
    uint16_t port = htons((uint16_t)dest_port(t));
    if (out->sa.sa_family == AF_INET6)
        out->sin6.sin6_port = port;
    else
        out->sin.sin_port = port;
}

/* The address a new connection of t goes to: the failover cursor's,
 * unless this worker has its share of max_connections_per_address there;
 * then the least busy address of an MX host of the same preference with
 * room (never a backup MX for want of room). False when none has room. */
static bool
dest_address_room(struct dest *t, const struct dns_mx_host **host, const union dns_addr **addr)
{
    struct delivery *d = t->d;
    unsigned cap = site_addr_share(d->e->cfg->delivery.max_connections_per_address,
                                   d->e->nworkers);
    union dns_addr k;
    dest_addr_port(t, *addr, &k);
    if (cap == 0 || site_addr_conns(&d->sites, &k) < cap)
        return true;
    unsigned pref = (*host)->preference, best = cap;
    for (unsigned h = 0; h < t->mx->nhosts; h++) {
        const struct dns_mx_host *x = &t->mx->hosts[h];
        if (x->preference != pref)
            continue;
        for (unsigned i = 0; i < x->naddrs; i++) {
            if (target_refused(d, &x->addrs[i], dest_port(t)) != NULL)
                continue;
            dest_addr_port(t, &x->addrs[i], &k);
            unsigned n = site_addr_conns(&d->sites, &k);
            if (n < best) {
                best = n;
                *host = x;
                *addr = &x->addrs[i];
            }
        }
    }
    return best < cap;
}

static void
conn_open(struct dest *t, const struct dns_mx_host *host, const union dns_addr *addr)
{
    struct delivery *d = t->d;
    struct conn *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return;
    c->d = d;
    c->dest = t;
    c->id = ((uint64_t)d->w->id << 56) | ++d->conn_seq;
    dest_addr_port(t, addr, &c->addr);
    netaddr_str(&c->addr.sa, c->addr_str, sizeof(c->addr_str));
    snprintf(c->mx, sizeof(c->mx), "%s", host->name);
    c->connect_op = (struct op){OP_CALLBACK, conn_on_connect};
    c->recv_op = (struct op){OP_CALLBACK, conn_on_recv};
    c->send_op = (struct op){OP_CALLBACK, conn_on_send};
    timer_init(&c->timer, conn_on_timer);
    c->fd = socket(c->addr.sa.sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        log_msg(LOG_ERR, "event=socket_failed err=%s", strerror(errno));
        free(c);
        return;
    }
    const struct sockaddr_storage *src = c->addr.sa.sa_family == AF_INET6
                                             ? &d->e->cfg->delivery.source6
                                             : &d->e->cfg->delivery.source4;
    if (src->ss_family != AF_UNSPEC &&
        bind(c->fd, (const struct sockaddr *)src,
             src->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                        : sizeof(struct sockaddr_in)) < 0) {
        char text[64];
        netaddr_ip_str((const struct sockaddr *)src, text, sizeof(text));
        log_msg(LOG_ERR, "event=source_bind_failed source=%s err=%s", text, strerror(errno));
        close(c->fd);
        free(c);
        return;
    }
    c->addr_counted = site_addr_add(&d->sites, &c->addr) == 0;
    c->site = t->site;
    c->site->refs++;
    c->site->conns++;
    c->site->opened++;
    c->epoch = c->site->win.epoch;
    c->tls_pol = t->pol->tls;
    t->conns++;
    t->opening++;
    d->stats.open++;
    d->stats.connections++;
    c->next_all = d->all;
    if (d->all)
        d->all->prev_all = c;
    d->all = c;
    struct io_uring_sqe *sqe = worker_sqe(d->w, &c->connect_op);
    io_uring_prep_connect(sqe, c->fd, &c->addr.sa, dns_addr_len(&c->addr));
    c->inflight++;
    conn_deadline(c, d->e->cfg->delivery.connect_timeout);
}

/* ---- the scheduler ---- */

static unsigned
dest_port(const struct dest *t)
{
    return t->pol->route_port ? t->pol->route_port : t->d->e->cfg->delivery.remote_port;
}

static void
dest_on_mx(void *arg, struct dns_mx_result *res)
{
    struct dest *t = arg;
    t->req = NULL;
    dns_mx_result_unref(t->mx);
    t->mx = res;
    t->next_addr = 0;
    t->failed_addrs = 0;
    dest_run(t);
}

static void
dest_on_hold(struct timer *tm, void *ctx)
{
    struct dest *t = (struct dest *)((char *)tm - offsetof(struct dest, hold_timer));
    t->failed_addrs = 0;
    t->next_addr = 0;
    dest_run(t);
}

/* No new connection to t for ms; what waits keeps its place, and is
 * checked for expiry while it waits. */
static void
dest_hold(struct dest *t, uint64_t ms)
{
    struct delivery *d = t->d;
    uint64_t until = d->w->now + MS_TO_NS(ms);
    if (until <= t->hold_until)
        return;
    t->hold_until = until;
    worker_timer_arm(d->w, &t->hold_timer, until);
    worker_timer_arm(d->w, &t->sweep_timer, d->w->now + MS_TO_NS(SWEEP_MS));
}

/* While held: bounce the waiting jobs whose time is up (each job's
 * expiry is read from the spool once). */
static void
dest_on_sweep(struct timer *tm, void *ctx)
{
    struct dest *t = (struct dest *)((char *)tm - offsetof(struct dest, sweep_timer));
    struct delivery *d = t->d;
    if (d->stopping || d->w->now >= t->hold_until)
        return;
    uint64_t now = clock_unix_ms();
    for (struct job **pp = &t->head; *pp != NULL;) {
        struct job *j = *pp;
        struct queue_envelope *env = NULL;
        if (j->expire_ms == 0) {
            if (queue_envelope_get(d->e->queue, j->id, &env) != 0) {
                pp = &j->next; /* gone or unreadable: conn_next drops it */
                continue;
            }
            j->expire_ms = job_expire_ms(t->pol, env, j->id);
        }
        if (now + EXPIRY_SLACK_MS < j->expire_ms) {
            queue_envelope_free(env);
            pp = &j->next;
            continue;
        }
        *pp = j->next;
        if (t->tail == &j->next)
            t->tail = pp;
        t->queued--;
        j->next = NULL;
        if (env == NULL && queue_envelope_get(d->e->queue, j->id, &env) != 0) {
            free(j);
            continue;
        }
        struct smtp_outcome o;
        memset(&o, 0, sizeof(o));
        o.status = SMTP_STATUS_TEMPFAIL;
        o.scope = SMTP_SCOPE_MESSAGE;
        o.enh = (struct smtp_enh){4, 4, 7};
        snprintf(o.text, sizeof(o.text), "message expired while %s was held", t->name);
        struct outcome_where where = {.src = CLASSIFY_EXPIRED};
        job_finish(d, t, j, env, NULL, &o, &where);
        queue_envelope_free(env);
        free(j);
    }
    if (t->head != NULL)
        worker_timer_arm(d->w, &t->sweep_timer, d->w->now + MS_TO_NS(SWEEP_MS));
}

static void
dest_fail_all(struct dest *t, bool permanent, unsigned code, const char *enh, const char *text,
              enum classify_source src)
{
    struct job *j;
    while ((j = dest_pop(t)) != NULL)
        job_fail(t->d, t, j, permanent, code, enh, text, src);
}

static void dest_run_once(struct dest *t);

/* The scheduler's one decision point, never re-entered for the same
 * destination: a limiter's wake-up or a connection's events inside a run
 * ask for another pass, made when this one ends. */
static void
dest_run(struct dest *t)
{
    dest_touch(t);
    if (t->running) {
        t->rerun = true;
        return;
    }
    t->running = true;
    for (unsigned pass = 0; pass < 8; pass++) {
        t->rerun = false;
        dest_run_once(t);
        if (!t->rerun)
            break;
    }
    t->running = false;
    if (t->rerun) /* still asked: on the next turn, not in a loop here */
        worker_timer_arm(t->d->w, &t->lim_timer, t->d->w->now + MS_TO_NS(1));
}

static void
dest_run_once(struct dest *t)
{
    struct delivery *d = t->d;
    if (t->head == NULL || d->stopping || d->draining || t->suspended)
        return;
    if (t->mx != NULL && t->mx->expires <= d->w->now && t->conns == 0) {
        t->mx = dns_mx_result_unref(t->mx);
    }
    if (t->mx == NULL) {
        if (t->req != NULL)
            return;
        if (d->res == NULL) {
            dest_fail_all(t, false, 451, "4.4.3", "no resolver on this worker", CLASSIFY_DNS);
            return;
        }
        struct dns_mx_result *res = NULL;
        /* A route: its host's answer stands for the domain's (a site like
         * any other). */
        const char *name = t->pol->route_host[0] ? t->pol->route_host : t->name;
        int rc = resolver_mx_resolve(d->res, name, dest_on_mx, t, &res, &t->req);
        if (rc == 1) {
            t->req = NULL;
            t->mx = res;
            t->next_addr = t->failed_addrs = 0;
        } else {
            if (rc < 0)
                t->req = NULL;
            return;
        }
    }
    struct policy_fail pf;
    policy_dns(t->mx->status, &pf);
    if (pf.fail) {
        dest_fail_all(t, pf.permanent, pf.code, pf.enh,
                      t->mx->status == DNS_NULL_MX ? "domain accepts no mail (null MX, RFC 7505)"
                                                   : t->mx->why,
                      pf.src);
        if (pf.forget_answer)
            t->mx = dns_mx_result_unref(t->mx); /* ask again next time */
        return;
    }
    if (dest_targets(t) == 0) {
        /* Every address is one mail must not go to: a configuration
         * error of the domain (or an attack), not a passing failure. */
        dest_fail_all(t, true, 550, t->last_fail.enh.detail == 6 ? "5.4.6" : "5.4.4",
                      t->last_fail.text, CLASSIFY_TARGET);
        memset(&t->last_fail, 0, sizeof(t->last_fail));
        return;
    }
    dest_site(t);
    struct site *site = t->site;
    if (site == NULL) {
        dest_lim_wait(t, d->w->now + MS_TO_NS(HOLD_MIN_MS)); /* no memory now */
        return;
    }
    /* Idle connections of the site first, whichever domain they served
     * last: reuse. One that goes back to the idle list found no token
     * (the message rate): the others would not either. */
    while (t->head != NULL && site->idle != NULL) {
        struct conn **pc = &site->idle;
        while (*pc != NULL && (*pc)->tls_pol != t->pol->tls)
            pc = &(*pc)->next_idle;
        struct conn *c = *pc;
        if (c == NULL)
            break;
        *pc = c->next_idle;
        c->next_idle = NULL;
        if (!conn_move(c, t)) {
            c->next_idle = site->idle;
            site->idle = c;
            break; /* t has its own max_connections already */
        }
        conn_next(c);
        conn_flush(c);
        if (site->idle == c)
            return;
    }
    if (t->head == NULL || d->w->now < t->hold_until)
        return;
    /* New connections: one per job waiting beyond those being opened,
     * within the domain's max_connections and the site's window. */
    while (t->queued > t->opening && t->conns < t->pol->max_connections) {
        const struct dns_mx_host *h;
        const union dns_addr *a;
        if (site->conns >= site_allowed(t)) {
            want_push(t); /* a slot, or an idle connection, will come */
            return;
        }
        if (!dest_address(t, &h, &a)) {
            /* Every address failed in a row: defer what waits, and hold. */
            if (t->conns == 0) {
                if (t->last_fail.text[0] != '\0') {
                    struct job *j;
                    while ((j = dest_pop(t)) != NULL) {
                        struct queue_envelope *env = NULL;
                        queue_envelope_get(d->e->queue, j->id, &env);
                        struct outcome_where where = {.src = CLASSIFY_CONNECT};
                        job_finish(d, t, j, env, NULL, &t->last_fail, &where);
                        queue_envelope_free(env);
                        free(j);
                    }
                } else {
                    dest_fail_all(t, false, 451, "4.4.1", "no MX host answered", CLASSIFY_CONNECT);
                }
                memset(&t->last_fail, 0, sizeof(t->last_fail));
                dest_hold(t, policy_all_failed_hold(t->pol->site_hold));
            }
            return;
        }
        if (!dest_address_room(t, &h, &a)) {
            /* This worker's share of the address is taken: a connection of
             * the site that closes wakes t; one of another site sharing the
             * address does not, hence the timer. */
            want_push(t);
            dest_lim_wait(t, d->w->now + MS_TO_NS(HOLD_MIN_MS));
            return;
        }
        uint64_t retry_at;
        if (!limits_conn_acquire(d->lim, &t->lim, d->w->now, &retry_at)) {
            dest_lim_wait(t, retry_at);
            return;
        }
        struct mxkey *mk = dest_mxkey(t);
        if (mk != NULL && !limits_conn_acquire(d->lim, &mk->lim, d->w->now, &retry_at)) {
            limits_conn_release(d->lim, &t->lim);
            mx_wait(mk, t, retry_at);
            return;
        }
        struct mxkey *sk = src_key(d, a->sa.sa_family); /* a: the address conn_open takes */
        if (sk != NULL && !limits_conn_acquire(d->lim, &sk->lim, d->w->now, &retry_at)) {
            limits_conn_release(d->lim, &t->lim);
            if (mk != NULL)
                limits_conn_release(d->lim, &mk->lim);
            mx_wait(sk, t, retry_at);
            return;
        }
        unsigned before = t->conns;
        conn_open(t, h, a);
        if (t->conns == before) {
            limits_conn_release(d->lim, &t->lim);
            if (mk != NULL)
                limits_conn_release(d->lim, &mk->lim);
            if (sk != NULL)
                limits_conn_release(d->lim, &sk->lim);
            return; /* could not open one now */
        }
        d->all->leased = true; /* conn_open puts the new one first */
        d->all->mxk = mk;
        d->all->srck = sk;
    }
}

/* ---- the spool port and due recipients ---- */

static void
port_arm(struct delivery *d)
{
    struct io_uring_sqe *sqe = worker_sqe(d->w, &d->port_op);
    io_uring_prep_poll_add(sqe, queue_port_fd(d->port), POLLIN);
}

static void
port_on_ready(struct worker *w, struct op *op, int res, uint32_t flags)
{
    struct delivery *d = (struct delivery *)((char *)op - offsetof(struct delivery, port_op));
    queue_port_drain(d->port);
    if (!d->stopping)
        port_arm(d);
}

void
delivery_batch_flush(struct delivery_batch *b)
{
    if (b->n != 0)
        delivery_submit(b->e, b->id, b->domain, b->idx, b->n);
    b->recipients += b->n;
    b->n = 0;
}

int
delivery_batch_add(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct delivery_batch *b = arg;
    if (b->n != 0 && (b->id != id || strcmp(b->domain, r->domain) != 0 ||
                      b->n == sizeof(b->idx) / sizeof(b->idx[0])))
        delivery_batch_flush(b);
    if (b->n == 0) {
        b->id = id;
        snprintf(b->domain, sizeof(b->domain), "%s", r->domain);
    }
    b->idx[b->n++] = r->index;
    return 0;
}

/* One take of due recipients from the spool (queue_due_take) in flight. */
struct due_take {
    struct delivery *d; /* borrowed: waits for its port's requests */
    unsigned taken;
    struct delivery_batch b;
};

/* A recipient the spool took for us: ready now, and ours to deliver; when
 * stopping, the start-up walk of the next run finds it. */
static int
due_on_taken(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct due_take *dt = arg;
    dt->taken++;
    return dt->d->stopping ? 0 : delivery_batch_add(&dt->b, id, r);
}

static void
due_on_done(void *cookie, int rc)
{
    struct due_take *dt = cookie;
    struct delivery *d = dt->d;
    if (rc != 0)
        log_msg(LOG_ERR, "event=due_poll_failed err=\"%s\"", queue_strerror(rc));
    /* a full batch: more are due, ask again at once */
    uint64_t next = rc == 0 && dt->taken >= DUE_BATCH ? 0 : DUE_POLL_MS;
    if (!d->stopping) {
        delivery_batch_flush(&dt->b);
        worker_timer_arm(d->w, &d->due_timer, d->w->now + MS_TO_NS(next));
    }
    free(dt);
}

static void
due_on_timer(struct timer *tm, void *ctx)
{
    struct delivery *d = (struct delivery *)((char *)tm - offsetof(struct delivery, due_timer));
    struct due_take *dt = calloc(1, sizeof(*dt));
    int rc = -ENOMEM;
    if (dt != NULL) {
        dt->d = d;
        dt->b.e = d->e;
        rc = queue_due_take(d->e->queue, d->port, clock_unix_ms(), DUE_BATCH, due_on_taken, dt,
                            due_on_done, dt);
    }
    if (rc == 0)
        return; /* due_on_done arms the timer again */
    free(dt);
    log_msg(LOG_ERR, "event=due_poll_failed err=\"%s\"", queue_strerror(rc));
    worker_timer_arm(d->w, &d->due_timer, d->w->now + MS_TO_NS(DUE_POLL_MS));
}

/* ---- stopping ---- */

static void
delivery_check_done(struct delivery *d)
{
    if (d->resolver_closed && d->all == NULL)
        d->w->stopping = true; /* the loop ends with this turn */
}

static void
delivery_on_resolver_closed(struct worker *w, void *arg)
{
    struct delivery *d = arg;
    d->res = NULL;
    d->resolver_closed = true;
    delivery_check_done(d);
}

/* On the worker: drop the connections (their jobs stay in the spool),
 * close the resolver, and end the loop once both are done. */
static void
delivery_on_stop(struct worker *w, struct worker_msg *m)
{
    struct delivery *d = (struct delivery *)((char *)m - offsetof(struct delivery, stop_msg));
    d->stopping = true;
    worker_timer_cancel(w, &d->due_timer);
    worker_timer_cancel(w, &d->evict_timer);
    struct dest_iter it1 = {0};
    for (struct dest *t; (t = dest_next(d, &it1)) != NULL;) {
        worker_timer_cancel(w, &t->hold_timer);
        worker_timer_cancel(w, &t->sweep_timer);
        if (t->req != NULL && d->res != NULL)
            resolver_cancel(d->res, t->req);
        t->req = NULL;
    }
    for (struct conn *c = d->all; c != NULL; c = c->next_all)
        conn_close(c, "stopping");
    /* Leases go back now, not after their ttl (the loop still turns). */
    struct dest_iter it2 = {0};
    for (struct dest *t; (t = dest_next(d, &it2)) != NULL;) {
        worker_timer_cancel(w, &t->lim_timer);
        limits_key_fini(d->lim, &t->lim);
    }
    for (struct mxkey *k = d->mxkeys; k != NULL; k = k->next)
        limits_key_fini(d->lim, &k->lim);
    if (d->res != NULL)
        resolver_close(d->res, delivery_on_resolver_closed, d);
    else
        d->resolver_closed = true;
    delivery_check_done(d);
}

static void
delivery_on_drain(struct worker *w, struct worker_msg *m)
{
    struct delivery *d = (struct delivery *)((char *)m - offsetof(struct delivery, drain_msg));
    (void)w;
    d->draining = true;
    log_msg(LOG_NOTICE, "event=draining connections=%llu", (unsigned long long)d->stats.open);
    /* Idle ones say goodbye now; busy ones after their transaction. */
    size_t bucket = 0;
    struct hash_node *cur = NULL, *n;
    while ((n = hash_next(&d->sites.by_key, &bucket, &cur)) != NULL) {
        struct site *s = (struct site *)n;
        while (s->idle != NULL) {
            struct conn *c = s->idle;
            s->idle = c->next_idle;
            c->next_idle = NULL;
            conn_handle(c, smtp_client_quit(conn_cli(c)));
        }
    }
    drain_check(d);
}

void
delivery_drain(struct delivery *d)
{
    worker_post(d->w, &d->drain_msg);
}

const char *
delivery_redis_state(const struct delivery *d)
{
    struct limits_stats ls;
    if (d->lim == NULL)
        return "off";
    limits_stats(d->lim, &ls);
    return ls.redis;
}

int
delivery_resolver_stats(const struct delivery *d, struct resolver_stats *out)
{
    if (d->res == NULL)
        return -ENOENT;
    resolver_stats(d->res, out);
    return 0;
}

bool
delivery_idle(const struct delivery *d)
{
    return d->all == NULL;
}

/* Draining and no connection left: tell the engine, once. */
static void
drain_check(struct delivery *d)
{
    if (d == NULL || !d->draining || d->drained || d->all != NULL)
        return;
    d->drained = true;
    log_msg(LOG_NOTICE, "event=drained");
    atomic_fetch_add(&d->e->drained, 1);
}

int
delivery_domains(struct delivery *d, struct stats_domain **out, size_t *n, size_t *cap)
{
    uint64_t now = clock_unix_ms();
    struct dest_iter it3 = {0};
    for (struct dest *t; (t = dest_next(d, &it3)) != NULL;) {
        if (t->queued == 0 && t->inflight == 0 && t->conns == 0 && !t->suspended &&
            (t->last_ms == 0 || now - t->last_ms > 600000))
            continue;
        if (*n == *cap) {
            size_t nc = *cap ? *cap * 2 : 64;
            struct stats_domain *a = realloc(*out, nc * sizeof(*a));
            if (a == NULL)
                return -ENOMEM;
            *out = a;
            *cap = nc;
        }
        struct stats_domain *x = &(*out)[(*n)++];
        memset(x, 0, sizeof(*x));
        snprintf(x->name, sizeof(x->name), "%s", t->name);
        x->ready = t->queued;
        x->inflight = t->inflight;
        x->connections = t->conns;
        x->delivered = t->delivered;
        x->bounced = t->failed;
        x->max_connections = t->pol->max_connections;
        x->suspended = t->suspended;
        snprintf(x->last_reply, sizeof(x->last_reply), "%s", t->last_reply);
        bool held = d->w->now < t->hold_until;
        unsigned pct = limits_key_rate_pct(&t->lim, d->w->now);
        const struct conf_rate *mr = &t->pol->max_message_rate;
        if (mr->count != 0 && mr->per_ms != 0)
            x->rate_limit = (double)mr->count * 1000.0 / mr->per_ms * pct / 100.0;
        const char *redis = delivery_redis_state(d);
        if (t->suspended)
            snprintf(x->limit_reason, sizeof(x->limit_reason), "suspended by the operator");
        else if (held)
            snprintf(x->limit_reason, sizeof(x->limit_reason), "held after a 421");
        else if (pct < 100)
            snprintf(x->limit_reason, sizeof(x->limit_reason),
                     "backoff: %u%% of the rates after rate limiting", pct);
        else if (strcmp(redis, "unreachable") == 0)
            snprintf(x->limit_reason, sizeof(x->limit_reason), "local share (Redis unreachable)");
        else
            snprintf(x->limit_reason, sizeof(x->limit_reason), "%s",
                     t->pol == &d->e->cfg->default_domain ? "[domain *]" : "[domain] section");
        uint64_t oldest = 0;
        for (struct job *j = t->head; j != NULL; j = j->next) {
            uint64_t a = queue_id_time_ms(j->id);
            if (oldest == 0 || a < oldest)
                oldest = a;
        }
        x->oldest_ms = oldest;
    }
    return 0;
}

void
delivery_reconfigure(struct delivery *d)
{
    struct dest_iter it4 = {0};
    for (struct dest *t; (t = dest_next(d, &it4)) != NULL;) {
        const struct domain_policy *old = t->pol;
        t->pol = config_domain(d->e->cfg, t->name);
        if (strcmp(old->route_host, t->pol->route_host) != 0 ||
            old->route_port != t->pol->route_port) {
            /* Another route: the next connection asks for its answer. */
            if (t->req != NULL && d->res != NULL)
                resolver_cancel(d->res, t->req);
            t->req = NULL;
            t->mx = dns_mx_result_unref(t->mx);
        }
        struct limit_conf lc;
        dest_limit_conf(t->pol, &lc);
        limits_key_set(d->lim, &t->lim, &lc);
        t->mxk_for = NULL; /* the [mx] sections may have changed */
        t->mxk = NULL;
    }
    for (struct mxkey *k = d->mxkeys; k != NULL; k = k->next) {
        const struct mx_policy *m = NULL;
        bool src = strncmp(k->pattern, "src:", 4) == 0; /* else "mx:" */
        const struct mx_policy *v = src ? d->e->cfg->sources : d->e->cfg->mxs;
        unsigned nv = src ? d->e->cfg->nsources : d->e->cfg->nmxs;
        for (unsigned i = 0; i < nv && m == NULL; i++)
            if (strcmp(v[i].pattern, k->pattern + (src ? 4 : 3)) == 0)
                m = &v[i];
        struct limit_conf lc;
        mx_limit_conf(d, m, &lc);
        limits_key_set(d->lim, &k->lim, &lc);
        k->pol = m;
    }
    /* Connections keep the client options they started with; new ones
     * take the new policy. Let the new limits act on what waits. */
    struct dest_iter it5 = {0};
    for (struct dest *t; (t = dest_next(d, &it5)) != NULL;)
        dest_run(t);
}

int
delivery_suspend(struct delivery *d, const char *domain, bool on)
{
    struct dest *t = dest_get(d, domain);
    if (t == NULL)
        return -ENOMEM;
    t->suspended = on;
    log_msg(LOG_NOTICE, "event=%s domain=%s", on ? "suspended" : "resumed", t->name);
    if (!on)
        dest_run(t);
    return 0;
}

void
delivery_objects(const struct delivery *d, uint64_t *dests, uint64_t *waiting, uint64_t *inflight)
{
    *dests = *waiting = *inflight = 0;
    struct dest_iter it6 = {0};
    for (const struct dest *t; (t = dest_next(d, &it6)) != NULL;) {
        (*dests)++;
        *waiting += t->queued;
        *inflight += t->inflight;
    }
}

void
delivery_stop(struct delivery *d)
{
    worker_post(d->w, &d->stop_msg);
}

/* ---- the worker's delivery ---- */

int
delivery_new(struct engine *e, struct worker *w, struct delivery **out, char *err,
             size_t errlen)
{
    *out = NULL;
    struct delivery *d = calloc(1, sizeof(*d));
    if (d == NULL)
        return -ENOMEM;
    d->e = e;
    d->w = w;
    d->port_op = (struct op){OP_CALLBACK, port_on_ready};
    timer_init(&d->due_timer, due_on_timer);
    d->cli_pool.size = sizeof(struct smtp_client_buf);
    d->rng = (clock_now_ns() ^ ((uint64_t)(w->id + 1) * 0x9e3779b97f4a7c15ULL)) | 1;
    d->chunk_pool.size = BODY_CHUNK;
    sites_init(&d->sites);
    local_addrs_load(d);
    hash_init(&d->dests, dest_eq, 256);
    lru_init(&d->dest_lru);
    timer_init(&d->evict_timer, dest_on_evict);
    d->stop_msg.fn = delivery_on_stop;
    {
        const struct config *cfg = e->cfg;
        struct limits_opts lo = {
            .redis_url = cfg->redis.url,
            .redis_password = cfg->redis.password,
            .key_prefix = cfg->redis.key_prefix,
            .nodes = cfg->redis.nodes,
            .lease_ttl_ms = cfg->redis.lease_ttl,
            .token_batch = cfg->redis.token_batch,
            .backoff_ms = cfg->delivery.backoff,
            .backoff_step_ms = cfg->delivery.backoff_step,
            .redis_timeout_ms = cfg->redis.timeout,
        };
        int lrc = limits_new(w, &lo, &d->lim, err, errlen);
        if (lrc < 0) {
            delivery_free(d);
            return lrc;
        }
    }
    d->drain_msg.fn = delivery_on_drain;
    d->port = queue_port_new();
    if (d->port == NULL) {
        int rc = -errno;
        snprintf(err, errlen, "delivery spool port: %s", strerror(errno));
        delivery_free(d);
        return rc;
    }
    if (tls_cache_new(e->cfg->tls.session_cache_size, &d->tls_cache) < 0)
        d->tls_cache = NULL; /* no resumption: still correct */
    *out = d;
    return 0;
}

void
delivery_start(struct delivery *d)
{
    char err[256];
    int rc = resolver_new(d->w, &d->e->cfg->dns, &d->res, err, sizeof(err));
    if (rc < 0) {
        log_msg(LOG_CRIT, "event=resolver_failed err=\"%s\" note=no_delivery_on_this_worker",
                err);
        d->res = NULL;
    }
    delivery_bufs_init(d);
    port_arm(d);
    if (d->w->id == 0 && d->e->cfg->delivery.enabled)
        worker_timer_arm(d->w, &d->due_timer, d->w->now + MS_TO_NS(DUE_POLL_MS));
    worker_timer_arm(d->w, &d->evict_timer, d->w->now + MS_TO_NS(EVICT_SWEEP_MS));
}

struct delivery *
delivery_free(struct delivery *d)
{
    if (d == NULL)
        return NULL;
    d->stopping = true;
    /* After a failed ring delivery_on_stop never ran: take this worker's
     * own timers out of its heap before their memory goes (the heap is
     * freed after us and touches what it still holds). */
    worker_timer_cancel(d->w, &d->due_timer);
    worker_timer_cancel(d->w, &d->evict_timer);
    for (struct outcome_batch *b = d->retrying; b != NULL; b = b->next)
        worker_timer_cancel(d->w, &b->timer);
    /* The loop has ended. Connections left (a start that failed half
     * way) are dropped; jobs not acknowledged stay in the spool. */
    while (d->all != NULL) {
        struct conn *c = d->all;
        c->closed = true;
        c->inflight = 0;
        conn_free(c);
    }
    struct dest_iter itf = {0};
    for (struct dest *t; (t = dest_next(d, &itf)) != NULL;)
        dest_free(t, false);
    hash_fini(&d->dests);
    while (d->port != NULL && queue_port_pending(d->port) > 0)
        queue_port_wait(d->port, 1000);
    while (d->retrying != NULL) {
        struct outcome_batch *b = d->retrying;
        d->retrying = b->next;
        log_msg(LOG_ERR, "event=outcome_commit_failed recipients=%zu dsn=%s "
                         "note=retried_after_restart",
                b->n, b->dsn ? "yes" : "no");
        dsn_msg_free(b->dsn);
        free(b);
    }
    queue_port_free(d->port);
    if (d->tls_cache != NULL)
        tls_cache_free(d->tls_cache);
    delivery_bufs_fini(d);
    d->lim = limits_free(d->lim);
    while (d->mxkeys != NULL) {
        struct mxkey *k = d->mxkeys;
        d->mxkeys = k->next;
        free(k);
    }
    pool_fini(&d->cli_pool);
    pool_fini(&d->chunk_pool);
    sites_fini(&d->sites);
    free(d->local);
    free(d);
    return NULL;
}

bool
delivery_msg_free(struct worker_msg *m)
{
    if (m->fn != delivery_on_job)
        return false;
    free(m);
    return true;
}

void
delivery_stats(const struct delivery *d, struct delivery_stats *out)
{
    *out = d->stats;
    out->bufs_out = d->cli_pool.out;
    out->sites = d->sites.live;
    out->mx_addresses = hash_count(&d->sites.addrs);
    out->dests_evicted = d->evicted;
}
