/*
 * mta_sts: the policy store and the thread that learns policies (see
 * mta_sts.h for what it does). Each domain is one struct sts_entry in a
 * hash under m->lock, in a slab of the store's own (common/slab.h),
 * holding only what mta_sts_get answers from (about 60 octets with its
 * name); a check of it is a struct sts_check of its
 * own, made when the check is queued and freed when it ends, that walks
 * TXT -> ADDR -> FETCH on the thread, whose loop is curl_multi_poll()
 * watching curl's sockets and the resolver's (given as extra fds), woken
 * by curl_multi_wakeup() when a worker queues a check.
 *
 * The policies themselves (parse, match, the TXT record) are
 * engine/mta_sts_policy.c's.
 *
 * Threading: the entries, and the queue of checks, under m->lock; a
 * started check's own fields (st, easy, body) on the thread only.
 */
#include "engine/mta_sts.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "common/fs.h"
#include "common/hash.h"
#include "common/log.h"
#include "common/slab.h"
#include "engine/config.h"
#include "engine/netaddr.h"
#include "engine/tlsrpt.h"

#define CACHE_MAGIC "sluice-mta-sts 1"
#define SAVE_MS     1000 /* the cache file is written at most this often */
#define DNS_FDS_MIN 16 /* room for the resolver's sockets at first; grown as it opens more */
#define SWEEP_MS    60000   /* domains without a policy are forgotten this often */
#define FORGET_MS   600000  /* ... once unused this long (and at least recheck) */
#define REFRESH_SCAN_MS 1000 /* policies near their end are looked for this often */
#define REFRESH_MAX     10   /* ... and at most this many refreshes started per scan */
#define REFRESH_MIN_MS  3000 /* the refresh window is the last tenth of max_age, at least this */
#define RETRY_MIN_MS    1000 /* a DNS failure's retry_after() is at least this (error_ttl: 0) */
#define NO_POLICY_UNIT_MS 60000 /* a no-policy answer's TTL counts in these, at least one */
#define NO_POLICY_UNITS   63    /* ... and at most this many (sts_entry's again: 6 bits) */
#define FETCH_ADDRS     16   /* the policy host's addresses a fetch tries, at most */

#define STS(f) offsetof(struct mta_sts_config, f)
const struct conf_key mta_sts_conf_keys[] = {
    {"ca_file", CONF_STRING, STS(ca_file), 1, 4096, NULL,
     "CA bundle (PEM) that policy servers' certificates are checked against; unset: the "
     "system's store (Debian: ca-certificates, /etc/ssl/certs)",
     NULL},
    {"fetch_timeout", CONF_DURATION, STS(fetch_timeout), 100, 300000, "10s",
     "a policy fetch (connect, TLS, the answer) that takes longer fails; the domain is "
     "delivered to as if it had no policy, or under its cached one",
     NULL},
    {"recheck", CONF_DURATION, STS(recheck), 1000, 86400000, "1h",
     "a known domain's _mta-sts TXT record is asked again this often; a new id fetches its "
     "policy again; after a check that failed on DNS (a timeout or SERVFAIL of the TXT record "
     "or of mta-sts.DOMAIN's addresses) while the domain has no policy in force, after [dns] "
     "error_ttl (at least 1s) instead; after one that found no policy (while none is in "
     "force), once that TXT answer's TTL passed when it is shorter (the records' TTL, or the "
     "negative TTL of a not-found answer's SOA; in whole minutes, at least 1, at most 63)",
     NULL},
    {"max_fetches", CONF_UINT, STS(max_fetches), 1, 10000, "64",
     "policy checks (DNS and HTTPS) in flight at once; more wait in order", NULL},
    {"fetch_port", CONF_UINT, STS(fetch_port), 1, 65535, "443",
     "TCP port of the policy servers: 443 (RFC 8461); another value is for tests only", NULL},
    {"tlsrpt", CONF_BOOL, STS(tlsrpt), 0, 0, "yes",
     "TLS reporting (RFC 8460): count the TLS successes and failures of each domain under a "
     "policy (MTA-STS: type sts; DANE, with [dns] dnssec: type tlsa, per TLSA base domain; not "
     "domains without one) per UTC day, and send the day's report to each address of its _smtp._tls TXT record (rua, "
     "up to 4): https: ones by HTTP POST, mailto: ones as a message (RFC 8460 5.3: "
     "multipart/report with the gzipped report attached, at most 1 MB) committed to this "
     "node's spool and delivered like any message, with a reception in the delivery log; "
     "DKIM-signed when the node signs for the From domain (tlsrpt_from); delivered despite "
     "TLS failures (RFC 8460 3): opportunistic TLS with the plaintext fallback, whatever the "
     "recipient domain's MTA-STS, DANE or [domain] tls (off stays off; tls_policy=relaxed "
     "in the delivery log)",
     NULL},
    {"tlsrpt_org", CONF_STRING, STS(tlsrpt_org), 1, 200, NULL,
     "organization-name of the reports; unset: [server] hostname", NULL},
    {"tlsrpt_contact", CONF_STRING, STS(tlsrpt_contact), 1, 200, NULL,
     "contact-info of the reports; unset: postmaster@ [server] hostname", NULL},
    {"tlsrpt_from", CONF_STRING, STS(tlsrpt_from), 1, 200, NULL,
     "envelope and header sender of reports sent by mail; its domain is the Submitter of "
     "their subject and TLS-Report-Submitter field; unset: tlsrpt_contact when that is an "
     "address, else postmaster@ [server] hostname",
     NULL},
    CONF_END,
};

/* ---- the store ---- */

/* CHECK_IDLE: queued, not started. */
enum check_state { CHECK_IDLE, CHECK_TXT, CHECK_ADDR, CHECK_FETCH };

/* A domain asked: what mta_sts_get needs to answer, and no more. Most
 * domains a bulk sender meets have no policy and are kept so for an hour
 * after their last mail (recheck; see sweep()), a million an hour on a
 * busy node: what only a check uses lives in its struct sts_check, made
 * for the check and freed when it ends. Allocated in
 * offsetof(struct sts_entry, name) + the name's octets (no tail padding)
 * from m->entries (common/slab.h): 41 octets and the name, a 64-octet
 * object for "example.com".
 * Under m->lock, all of it (name: immutable). */
struct sts_entry {
    struct hash_node hn;          /* in m->domains (first) */
    struct mta_sts_policy *pol;   /* owned reference, or NULL */
    uint64_t checked_ms;          /* Unix ms of the last finished check; 0: never */
    uint64_t used_ms;             /* Unix ms of the last mta_sts_get */
    bool busy : 1;                /* a check is asked (MTA_STS_ASK), queued or in flight;
                                   * the sweep keeps the entry while it is */
    bool dns_failed : 1;          /* the last check ended on a temporary DNS failure
                                   * (its TXT record's or its policy host's): with no
                                   * policy in force, due again after retry_after(),
                                   * not recheck */
    uint8_t again : 6;            /* the last check found no policy: due again this many
                                   * minutes after it (no_policy_again); 0: after recheck */
    char name[];
};
_Static_assert(offsetof(struct sts_entry, name) == 41, "sts_entry grew: see its comment");
/* The names asked are destinations' (cut at 255 octets, dest.c) and the
 * cache file's (at most DNS_NAME_MAX): every one fits a slab object. A
 * longer one from elsewhere is refused by slab_alloc and answered as a
 * domain without a policy (no _mta-sts name could be asked for it). */
_Static_assert(offsetof(struct sts_entry, name) + 256 <= SLAB_MAX, "a name of 255 octets fits");

/* One check of a domain, queued (on m->qhead, under m->lock) and then
 * running on the thread (on m->running, the thread's), until check_done
 * frees it. A first check asked of a worker (MTA_STS_ASK) makes one only
 * when its TXT answer names an id to fetch: a domain without a record,
 * most of them, never has one. */
struct sts_check {
    struct sts_check *qnext;      /* on m->qhead, under m->lock */
    struct sts_check *prev, *next; /* on m->running, the thread's */
    struct sts_entry *e;          /* borrowed: busy, so kept, while the check lives */
    struct mta_sts *m;            /* borrowed: the store */
    bool refresh;                 /* to fetch the policy again (RFC 8461 3.3) */
    bool txt_known;               /* new_id is set: a worker asked the TXT record */
    uint8_t again;                /* its TXT answer said no policy: for the entry's
                                   * again (check_done); 0 otherwise */
    char new_id[33];              /* the id to fetch: by the thread, or by
                                   * mta_sts_txt_answer (under m->lock) before it
                                   * queues the check */
    /* The thread's only. */
    uint8_t st;                   /* enum check_state */
    struct dns_req *req;
    CURL *easy;                   /* owned while fetching */
    struct curl_slist *resolve;   /* owned while fetching */
    CURLSH *share;                /* owned while fetching: easy's DNS cache, which holds
                                   * the resolve entry (see fetch_start) */
    char *body;                   /* owned: the answer so far, MTA_STS_MAX_BYTES + 1 */
    size_t blen;
    bool too_big;
};

struct mta_sts {
    const struct config *cfg;     /* borrowed */
    const struct mta_sts_config *sc; /* borrowed: &cfg->mta_sts */
    char dir[PATH_MAX], file[128]; /* the cache */
    pthread_mutex_t lock;
    /* under lock: [delivery] allow_networks and deny_networks of the
     * config in force (a reload's: mta_sts_set_allow), not cfg's of the
     * start */
    struct cidr allow[NETADDR_MAX_LIST], deny[NETADDR_MAX_LIST];
    int nallow, ndeny;
    struct hash domains;          /* owned struct sts_entry, by name */
    struct slab entries;          /* where they live: apart from the workers' heaps, which
                                   * an hour's entries would pin page by page */
    struct sts_check *qhead, *qtail; /* owned: checks waiting for the thread */
    bool stop;
    bool dirty;                   /* the cache file is behind */
    bool flush_reports;           /* the operator asked */
    struct mta_sts_stats st;

    /* The thread's. */
    pthread_t thread;
    bool started;
    CURLM *multi;
    struct dns *dns;
    struct pollfd *dfds;          /* owned: the resolver's sockets, room for dcap */
    unsigned ndfds, dcap;
    struct curl_waitfd *wfds;     /* owned: dfds as curl_multi_poll takes them, room for
                                   * wcap; grown only between polls (on_dns_sock runs
                                   * while the last poll's are read) */
    unsigned wcap;
    unsigned inflight;
    struct sts_check *running;    /* owned: the checks started (m->inflight of them) */
    uint64_t saved_ms;
    uint64_t swept_ms;            /* monotonic ms of the last sweep */
    uint64_t sweep_every_ms;      /* SWEEP_MS, or a test hook's */
    uint64_t forget_ms;           /* 0: FORGET_MS and at least recheck; else a test hook's */
    uint64_t ttl_unit_ms;         /* 0: NO_POLICY_UNIT_MS; else a test hook's */
    uint64_t refresh_ms;          /* monotonic ms of the last refresh scan */
    struct tlsrpt *rpt;           /* owned, or NULL */
};

static bool
entry_eq(const struct hash_node *n, const void *key)
{
    return strcmp(((const struct sts_entry *)n)->name, key) == 0;
}

/* Under m->lock. */
static struct sts_entry *
entry_get(struct mta_sts *m, const char *name, bool make)
{
    uint64_t h = hash_str_nocase(name);
    struct hash_node *n = hash_find(&m->domains, h, name);
    if (n != NULL || !make)
        return (struct sts_entry *)n;
    size_t len = strlen(name);
    size_t size = offsetof(struct sts_entry, name) + len + 1;
    struct sts_entry *e = slab_alloc(&m->entries, size);
    if (e == NULL)
        return NULL;
    memset(e, 0, size);
    memcpy(e->name, name, len + 1);
    e->hn.hash = h;
    if (hash_insert(&m->domains, &e->hn) < 0) {
        slab_free(&m->entries, e);
        return NULL;
    }
    m->st.domains++;
    return e;
}

/* Is p in the last tenth of its max_age (at least REFRESH_MIN_MS), when
 * it is fetched again before it ends (RFC 8461 3.3: a policy in use is
 * never lost to its expiry)? */
static bool
refresh_due(const struct mta_sts_policy *p, uint64_t now)
{
    uint64_t window = p->max_age * 100; /* a tenth, in ms */
    if (window < REFRESH_MIN_MS)
        window = REFRESH_MIN_MS;
    return now + window >= p->expires_ms;
}

static int txt_verdict(enum dns_status status, const char *dwhy, const char *const *txt,
                       unsigned n, char id[33], const char **result, const char **why);

/* How long after a check that failed on DNS (a timeout, SERVFAIL, or the
 * resolver out of memory) a domain without a policy in force is due
 * again: [dns] error_ttl, at least RETRY_MIN_MS, at most recheck. An
 * enforce domain whose first check met one timeout is not delivered to
 * without its policy for a whole recheck; a dead resolver costs one
 * check per domain per error_ttl (busy keeps it to one at a time). */
static uint64_t
retry_after(const struct mta_sts *m)
{
    uint64_t ms = m->cfg->dns.error_ttl;
    if (ms < RETRY_MIN_MS)
        ms = RETRY_MIN_MS;
    return ms < m->sc->recheck ? ms : m->sc->recheck;
}

static uint64_t
no_policy_unit(const struct mta_sts *m)
{
    return m->ttl_unit_ms != 0 ? m->ttl_unit_ms : NO_POLICY_UNIT_MS;
}

/* How long after a check that found no policy (no record, or none
 * valid) the domain is due again, as sts_entry's again: the TTL of the
 * TXT answer that said so (ttl, s; DNS_TTL_UNKNOWN: not known), when
 * that is shorter than recheck, so that a domain that publishes a policy
 * is seen once its "no" ran out rather than up to recheck later (its
 * mail does not wait for the check: it runs on the thread). 0 (recheck,
 * as before) when the TTL is not known or not shorter.
 * In whole minutes (NO_POLICY_UNIT_MS), rounded up, at least one: TTLs
 * of 0 or a few seconds are common (RFC 2308's negative TTL is the SOA's
 * MINIMUM, which some zones set to 0), and a domain mailed all the time
 * would then be asked again after every check, one TXT query after
 * another, for a record policies are meant to change rarely (RFC 8461
 * 3.1: a new id with each change). A minute costs a busy domain one
 * query a minute at most, and finds a new policy a minute late at most.
 * Up to NO_POLICY_UNITS (63) minutes, so that it fits in the six bits
 * the entry has spare (a million entries an hour: see struct
 * sts_entry); a longer TTL counts as recheck (an hour by default: the
 * same), which asks later than the TTL only under a recheck set longer. */
static uint8_t
no_policy_again(const struct mta_sts *m, uint32_t ttl)
{
    if (ttl == DNS_TTL_UNKNOWN)
        return 0;
    uint64_t unit = no_policy_unit(m);
    uint64_t n = ((uint64_t)ttl * 1000 + unit - 1) / unit;
    if (n == 0)
        n = 1;
    return n > NO_POLICY_UNITS || n * unit >= m->sc->recheck ? 0 : (uint8_t)n;
}

/* Under m->lock: a check of e joins the checks to run (e is busy until
 * it ends). Returns it, or NULL without memory (e is then left as it
 * was: not busy, due as before). */
static struct sts_check *
entry_queue(struct mta_sts *m, struct sts_entry *e)
{
    struct sts_check *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->e = e;
    c->m = m;
    e->busy = true;
    if (m->qtail != NULL)
        m->qtail->qnext = c;
    else
        m->qhead = c;
    m->qtail = c;
    m->st.queued++;
    return c;
}

enum mta_sts_answer
mta_sts_get(struct mta_sts *m, const char *domain, bool can_ask, struct mta_sts_policy **out)
{
    *out = NULL;
    uint64_t now = clock_unix_ms();
    bool wake = false;
    enum mta_sts_answer a = MTA_STS_READY;
    pthread_mutex_lock(&m->lock);
    struct sts_entry *e = entry_get(m, domain, true);
    if (e == NULL) {
        pthread_mutex_unlock(&m->lock); /* no memory: as without a policy */
        return MTA_STS_READY;
    }
    e->used_ms = now;
    if (!e->busy && e->checked_ms == 0 && e->pol == NULL && can_ask) {
        /* A first contact: the caller asks the TXT record on its own
         * resolver, beside the domain's MX lookup. */
        e->busy = true;
        m->st.checks++;
        m->st.inflight++;
        pthread_mutex_unlock(&m->lock);
        return MTA_STS_ASK;
    }
    /* Due: never checked, recheck passed, or the policy ended since the
     * last check. Not again and again once it ended: a policy server
     * that is down, or a policy of max_age 0, is asked every recheck,
     * not at every mail. Sooner after a DNS failure while no policy is
     * in force (retry_after), or once the TTL of a no-policy answer ran
     * out (no_policy_again). */
    bool in_force = e->pol != NULL && now < e->pol->expires_ms;
    uint64_t again = m->sc->recheck;
    if (e->dns_failed && !in_force)
        again = retry_after(m);
    else if (e->again != 0 && !in_force && e->again * no_policy_unit(m) < again)
        again = e->again * no_policy_unit(m); /* never past recheck: a reload may shorten it */
    if (!e->busy &&
        (e->checked_ms == 0 || now - e->checked_ms >= again ||
         (e->pol != NULL && now >= e->pol->expires_ms && e->checked_ms < e->pol->expires_ms)))
        wake = entry_queue(m, e) != NULL; /* without memory: again at the next mail */
    if (e->checked_ms == 0)
        a = MTA_STS_WAIT;
    else if (e->pol != NULL && now < e->pol->expires_ms)
        *out = mta_sts_policy_ref(e->pol);
    pthread_mutex_unlock(&m->lock);
    if (wake)
        curl_multi_wakeup(m->multi);
    return a;
}

void
mta_sts_txt_answer(struct mta_sts *m, const char *domain, enum dns_status status, const char *why,
                   const char *const *txt, unsigned n, uint32_t ttl)
{
    char id[33];
    const char *result, *reason;
    int has = txt_verdict(status, why, txt, n, id, &result, &reason);
    pthread_mutex_lock(&m->lock);
    /* Busy since the ask: the sweep kept it. */
    struct sts_entry *e = entry_get(m, domain, false);
    if (e == NULL || !e->busy) {
        pthread_mutex_unlock(&m->lock);
        return;
    }
    m->st.inflight--;
    e->busy = false;
    struct sts_check *c = has ? entry_queue(m, e) : NULL;
    if (c != NULL) {
        /* A policy to fetch: the thread goes on from the id. */
        memcpy(c->new_id, id, sizeof(c->new_id));
        c->txt_known = true;
        pthread_mutex_unlock(&m->lock);
        curl_multi_wakeup(m->multi);
        return;
    }
    if (has) {
        /* No memory for the check: as a fetch that failed, the cached
         * policy (if any) stays, and the domain is due again soon. */
        result = "fetch_failed";
        reason = "out of memory";
    }
    e->checked_ms = clock_unix_ms();
    e->dns_failed = status == DNS_RETRY || has;
    e->again = has || status == DNS_RETRY || status == DNS_FAIL ? 0 : no_policy_again(m, ttl);
    /* As check_done: most domains publish nothing, a debug line each. */
    log_msg(strcmp(result, "no_record") == 0 ? LOG_DEBUG : LOG_INFO,
            "event=mta_sts_checked domain=%s result=%s mode=- id=-%s%s", e->name, result,
            reason != NULL ? " reason=" : "", reason != NULL ? reason : "");
    pthread_mutex_unlock(&m->lock);
}

void
mta_sts_stats(struct mta_sts *m, struct mta_sts_stats *out)
{
    pthread_mutex_lock(&m->lock);
    *out = m->st;
    out->entry_bytes = slab_bytes(&m->entries);
    pthread_mutex_unlock(&m->lock);
    if (m->rpt != NULL) {
        out->reports_sent = tlsrpt_sent(m->rpt);
        out->reports_failed = tlsrpt_failed(m->rpt);
    }
}

void
mta_sts_set_allow(struct mta_sts *m, const struct delivery_config *dc)
{
    pthread_mutex_lock(&m->lock);
    memcpy(m->allow, dc->allow, sizeof(m->allow));
    m->nallow = dc->nallow;
    memcpy(m->deny, dc->deny, sizeof(m->deny));
    m->ndeny = dc->ndeny;
    pthread_mutex_unlock(&m->lock);
    tlsrpt_set_allow(m->rpt, dc);
}

const struct config *
mta_sts_config(const struct mta_sts *m)
{
    return m->cfg;
}

struct tlsrpt *
mta_sts_tlsrpt(struct mta_sts *m)
{
    return m->rpt;
}

void
mta_sts_tlsrpt_flush(struct mta_sts *m)
{
    pthread_mutex_lock(&m->lock);
    m->flush_reports = true;
    pthread_mutex_unlock(&m->lock);
    curl_multi_wakeup(m->multi);
}

/* ---- the cache file ---- */

static void
cache_save(struct mta_sts *m)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (buf == NULL)
        return;
    len = (size_t)snprintf(buf, cap, "%s\n", CACHE_MAGIC);
    uint64_t now = clock_unix_ms();
    pthread_mutex_lock(&m->lock);
    m->dirty = false;
    size_t b = 0;
    struct hash_node *cur = NULL;
    for (struct hash_node *n; (n = hash_next(&m->domains, &b, &cur)) != NULL;) {
        struct sts_entry *e = (struct sts_entry *)n;
        const struct mta_sts_policy *p = e->pol;
        if (p == NULL || p->expires_ms <= now)
            continue;
        size_t need = strlen(e->name) + 128 + p->nmx * (DNS_NAME_MAX + 4);
        if (len + need > cap) {
            size_t ncap = (len + need) * 2;
            char *nb = realloc(buf, ncap);
            if (nb == NULL) {
                m->dirty = true;
                pthread_mutex_unlock(&m->lock);
                free(buf);
                return;
            }
            buf = nb;
            cap = ncap;
        }
        len += (size_t)snprintf(buf + len, cap - len, "%s %s %s %llu %llu", e->name, p->id,
                                mta_sts_mode_str(p->mode), (unsigned long long)p->max_age,
                                (unsigned long long)p->fetched_ms);
        for (unsigned i = 0; i < p->nmx; i++)
            len += (size_t)snprintf(buf + len, cap - len, " %s", p->mx[i]);
        buf[len++] = '\n';
    }
    pthread_mutex_unlock(&m->lock);
    int rc = fs_write_atomic(m->dir, m->file, buf, len);
    free(buf);
    if (rc < 0) {
        log_msg(LOG_ERR, "event=mta_sts_cache_write_failed dir=%s err=\"%s\"", m->dir,
                strerror(-rc));
        pthread_mutex_lock(&m->lock);
        m->dirty = true;
        pthread_mutex_unlock(&m->lock);
    }
}

/* A cache file's number: digits only, 19 at most (no sign, no wrap past
 * UINT64_MAX). */
static bool
cache_number(const char *s, uint64_t *out)
{
    size_t n = strlen(s);
    if (n == 0 || n > 19 || strspn(s, "0123456789") != n)
        return false;
    *out = strtoull(s, NULL, 10);
    return true;
}

/* Before the thread starts: the policies a previous run learned. A line
 * that does not parse is skipped (logged); an expired policy is dropped. */
static void
cache_load(struct mta_sts *m)
{
    char path[PATH_MAX + 130];
    snprintf(path, sizeof(path), "%s/%s", m->dir, m->file);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    char line[MTA_STS_MAX_MX * (DNS_NAME_MAX + 4) + 512];
    uint64_t now = clock_unix_ms();
    unsigned lineno = 0, loaded = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        lineno++;
        line[strcspn(line, "\n")] = '\0';
        if (lineno == 1) {
            if (strcmp(line, CACHE_MAGIC) != 0) {
                log_msg(LOG_WARN, "event=mta_sts_cache_skipped path=%s reason=\"unknown format\"",
                        path);
                break;
            }
            continue;
        }
        char *save = NULL;
        char *name = strtok_r(line, " ", &save), *id = strtok_r(NULL, " ", &save),
             *mode = strtok_r(NULL, " ", &save), *age = strtok_r(NULL, " ", &save),
             *fetched = strtok_r(NULL, " ", &save);
        struct mta_sts_policy_draft draft, *d = &draft;
        memset(d, 0, sizeof(*d));
        char norm[DNS_NAME_MAX + 1];
        bool ok = fetched != NULL && dns_name_normalize(name, norm) > 0 &&
                  strlen(id) < sizeof(d->id);
        if (ok) {
            /* As the fetch would have left it: a line that no fetch could
             * have written (a mode that is not one, a max_age past the
             * RFC's year, a fetch in the future, an enforce policy without
             * mx) is corruption, not a policy to keep for years. */
            snprintf(d->id, sizeof(d->id), "%s", id);
            d->mode = strcmp(mode, "enforce") == 0   ? MTA_STS_ENFORCE
                      : strcmp(mode, "testing") == 0 ? MTA_STS_TESTING
                                                     : MTA_STS_NONE;
            ok = d->mode != MTA_STS_NONE || strcmp(mode, "none") == 0;
            ok = ok && cache_number(age, &d->max_age) && d->max_age <= MTA_STS_MAX_AGE;
            ok = ok && cache_number(fetched, &d->fetched_ms) && d->fetched_ms <= now + SAVE_MS;
            d->expires_ms = d->fetched_ms + d->max_age * 1000;
            for (char *x;
                 ok && d->nmx < MTA_STS_MAX_MX && (x = strtok_r(NULL, " ", &save)) != NULL;)
                ok = mta_sts_mx_pattern(x, x + strlen(x), d->mx[d->nmx++], sizeof(d->mx[0]));
            ok = ok && (d->nmx > 0 || d->mode == MTA_STS_NONE);
        }
        if (!ok) {
            log_msg(LOG_WARN, "event=mta_sts_cache_line_skipped path=%s line=%u", path, lineno);
            continue;
        }
        if (d->expires_ms <= now)
            continue;
        struct mta_sts_policy *p = mta_sts_policy_seal(d);
        struct sts_entry *e = p != NULL ? entry_get(m, norm, true) : NULL;
        if (e == NULL) {
            mta_sts_policy_unref(p);
            continue;
        }
        if (e->pol != NULL) { /* a second line for the domain: the last stands */
            m->st.policies--;
            m->st.enforce -= e->pol->mode == MTA_STS_ENFORCE;
            loaded--;
        }
        mta_sts_policy_unref(e->pol);
        e->pol = p;
        e->checked_ms = 1; /* known, and due for a check at first use */
        m->st.policies++;
        m->st.enforce += p->mode == MTA_STS_ENFORCE;
        loaded++;
    }
    fclose(f);
    log_msg(LOG_INFO, "event=mta_sts_cache_loaded path=%s policies=%u", path, loaded);
}

/* ---- checks, on the thread ---- */

static void check_next(struct mta_sts *m);

static void fetch_free(struct mta_sts *m, struct sts_check *c);

/* On the thread: c starts, on m->running. */
static void
check_run(struct mta_sts *m, struct sts_check *c)
{
    m->inflight++;
    c->prev = NULL;
    c->next = m->running;
    if (m->running != NULL)
        m->running->prev = c;
    m->running = c;
}

/* Frees c and what it holds, off m->running. Returns NULL. */
static struct sts_check *
check_free(struct mta_sts *m, struct sts_check *c)
{
    fetch_free(m, c);
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        m->running = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    m->inflight--;
    free(c);
    return NULL;
}

/* Check c ended, and is freed: pol (a reference moved in, or NULL)
 * replaces the cached policy when replace; otherwise the cached one
 * stays. dns_temp: it ended on a temporary DNS failure (see
 * retry_after). */
static void
check_done(struct mta_sts *m, struct sts_check *c, bool replace, struct mta_sts_policy *pol,
           bool dns_temp, const char *result, const char *why)
{
    struct sts_entry *e = c->e;
    uint8_t again = c->again;
    check_free(m, c);
    uint64_t now = clock_unix_ms();
    pthread_mutex_lock(&m->lock);
    m->st.inflight--;
    if (replace) {
        if (e->pol != NULL) {
            m->st.policies--;
            m->st.enforce -= e->pol->mode == MTA_STS_ENFORCE;
        }
        mta_sts_policy_unref(e->pol);
        e->pol = pol;
        if (pol != NULL) {
            m->st.policies++;
            m->st.enforce += pol->mode == MTA_STS_ENFORCE;
        }
        m->dirty = true;
    } else {
        mta_sts_policy_unref(pol);
    }
    e->checked_ms = now;
    e->busy = false;
    e->dns_failed = dns_temp;
    e->again = again;
    const struct mta_sts_policy *p = e->pol;
    /* Most domains publish nothing: their checks are debug lines, not one
     * info line per new domain of a campaign. */
    bool nothing = strcmp(result, "no_record") == 0 && p == NULL;
    log_msg(nothing ? LOG_DEBUG : LOG_INFO,
            "event=mta_sts_checked domain=%s result=%s mode=%s id=%s%s%s", e->name,
            result, p != NULL ? mta_sts_mode_str(p->mode) : "-", p != NULL ? p->id : "-",
            why != NULL ? " reason=" : "", why != NULL ? why : "");
    pthread_mutex_unlock(&m->lock);
}

/* A fetch or a TXT record failed: the cached policy (if any) stays, and
 * the failure is reported under the domain's policy (RFC 8460 4.3.1).
 * dns_temp: the policy host's address lookup failed for now. */
static void
check_failed(struct mta_sts *m, struct sts_check *c, enum tlsrpt_result r, bool dns_temp,
             const char *why)
{
    pthread_mutex_lock(&m->lock);
    m->st.fetch_failed++;
    struct mta_sts_policy *p = mta_sts_policy_ref(c->e->pol);
    pthread_mutex_unlock(&m->lock);
    if (m->rpt != NULL)
        tlsrpt_record(m->rpt, c->e->name, p, r, NULL, NULL);
    mta_sts_policy_unref(p);
    check_done(m, c, false, NULL, dns_temp, "fetch_failed", why);
}

static size_t
on_body(char *data, size_t size, size_t nmemb, void *arg)
{
    struct sts_check *c = arg;
    size_t n = size * nmemb;
    if (c->blen + n > MTA_STS_MAX_BYTES) {
        c->too_big = true;
        return 0; /* curl stops: CURLE_WRITE_ERROR */
    }
    memcpy(c->body + c->blen, data, n);
    c->blen += n;
    return n;
}

/* Fetch the policy of c's domain from the policy host at addrs (n >= 1, each one
 * allowed as a target): curl connects to them in turn (and both
 * families at once, RFC 8305), so one address that is down does not fail
 * the fetch while another answers. */
static void
fetch_start(struct mta_sts *m, struct sts_check *c, const union dns_addr *const *addrs,
            unsigned n)
{
    /* host:port:addr[,addr]... (libcurl 7.59 and later: several), each
     * address less than 64 octets and 3 more ("," "[" "]") */
    char rs[DNS_NAME_MAX + 32 + FETCH_ADDRS * (64 + 3)], url[DNS_NAME_MAX + 100];
    unsigned port = m->sc->fetch_port;
    size_t o = (size_t)snprintf(rs, sizeof(rs), "mta-sts.%s:%u:", c->e->name, port);
    for (unsigned i = 0; i < n && i < FETCH_ADDRS; i++) {
        char ip[64];
        bool v6 = addrs[i]->sa.sa_family == AF_INET6;
        netaddr_ip_str(&addrs[i]->sa, ip, sizeof(ip));
        o += (size_t)snprintf(rs + o, sizeof(rs) - o, "%s%s%s%s", i > 0 ? "," : "",
                              v6 ? "[" : "", ip, v6 ? "]" : "");
    }
    if (port == 443)
        snprintf(url, sizeof(url), "https://mta-sts.%s/.well-known/mta-sts.txt", c->e->name);
    else
        snprintf(url, sizeof(url), "https://mta-sts.%s:%u/.well-known/mta-sts.txt", c->e->name,
                 port);
    c->body = malloc(MTA_STS_MAX_BYTES + 1);
    c->resolve = curl_slist_append(NULL, rs);
    c->easy = curl_easy_init();
    /* CURLOPT_RESOLVE puts its entry in the DNS cache the handle uses,
     * for good (an entry without "+" never expires): in the multi
     * handle's, that is one entry per domain ever fetched, for the life
     * of the process. A cache of the fetch's own (a share of DNS alone)
     * holds it instead, and goes with the fetch (fetch_free). */
    c->share = curl_share_init();
    c->blen = 0;
    c->too_big = false;
    if (c->body == NULL || c->resolve == NULL || c->easy == NULL || c->share == NULL ||
        curl_share_setopt(c->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS) != CURLSHE_OK ||
        curl_easy_setopt(c->easy, CURLOPT_SHARE, c->share) != CURLE_OK) {
        fetch_free(m, c);
        check_failed(m, c, TLSRPT_STS_POLICY_FETCH_ERROR, false, "out of memory");
        return;
    }
    CURL *h = c->easy;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_RESOLVE, c->resolve);
    /* No proxy from the environment (https_proxy, all_proxy): the policy
     * host's addresses are the ones resolved and checked here. */
    curl_easy_setopt(h, CURLOPT_PROXY, "");
    curl_easy_setopt(h, CURLOPT_PRIVATE, c);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)m->sc->fetch_timeout);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)m->sc->fetch_timeout);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, c);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L); /* RFC 8461 3.3: no redirects */
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "sluice/" SLUICE_VERSION);
    curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)MTA_STS_MAX_BYTES);
    if (m->sc->ca_file != NULL)
        curl_easy_setopt(h, CURLOPT_CAINFO, m->sc->ca_file);
    /* Refused (out of memory), the entry would wait in CHECK_FETCH for
     * good, holding a max_fetches slot: it fails now, as a fetch. */
    if (curl_multi_add_handle(m->multi, h) != CURLM_OK) {
        fetch_free(m, c);
        check_failed(m, c, TLSRPT_STS_POLICY_FETCH_ERROR, false, "out of memory");
        return;
    }
    c->st = CHECK_FETCH;
    pthread_mutex_lock(&m->lock);
    m->st.fetches++;
    pthread_mutex_unlock(&m->lock);
}

/* Frees what fetch_start made (any part of it): the handle first, then
 * its DNS cache (a share in use by a handle is not freed) with the
 * resolve entry in it. */
static void
fetch_free(struct mta_sts *m, struct sts_check *c)
{
    if (c->easy != NULL) {
        curl_multi_remove_handle(m->multi, c->easy);
        curl_easy_cleanup(c->easy);
        c->easy = NULL;
    }
    if (c->share != NULL) {
        curl_share_cleanup(c->share);
        c->share = NULL;
    }
    curl_slist_free_all(c->resolve);
    c->resolve = NULL;
    free(c->body);
    c->body = NULL;
}

static void
fetch_done(struct mta_sts *m, struct sts_check *c, CURLcode res)
{
    long code = 0;
    char *ctype = NULL;
    curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_getinfo(c->easy, CURLINFO_CONTENT_TYPE, &ctype);
    char why[160];
    enum tlsrpt_result r = TLSRPT_STS_POLICY_FETCH_ERROR;
    bool ok = false;
    if (c->too_big || res == CURLE_FILESIZE_EXCEEDED) {
        snprintf(why, sizeof(why), "policy larger than %u octets", MTA_STS_MAX_BYTES);
    } else if (res == CURLE_PEER_FAILED_VERIFICATION || res == CURLE_SSL_CACERT_BADFILE) {
        r = TLSRPT_STS_WEBPKI_INVALID;
        snprintf(why, sizeof(why), "policy server certificate: %s", curl_easy_strerror(res));
    } else if (res != CURLE_OK) {
        snprintf(why, sizeof(why), "%s", curl_easy_strerror(res));
    } else if (code != 200) {
        snprintf(why, sizeof(why), "HTTP status %ld%s", code,
                 code >= 300 && code < 400 ? " (redirects are refused)" : "");
    } else if (ctype == NULL || strncasecmp(ctype, "text/plain", 10) != 0 ||
               (ctype[10] != '\0' && ctype[10] != ';' && ctype[10] != ' ')) {
        r = TLSRPT_STS_POLICY_INVALID;
        snprintf(why, sizeof(why), "media type %s, not text/plain", ctype ? ctype : "none");
    } else {
        ok = true;
    }
    if (!ok) {
        fetch_free(m, c);
        check_failed(m, c, r, false, why);
        return;
    }
    struct mta_sts_policy *p = NULL;
    const char *pwhy = NULL;
    int rc = mta_sts_policy_parse(c->body, c->blen, &p, &pwhy);
    fetch_free(m, c);
    if (rc < 0) {
        snprintf(why, sizeof(why), "policy does not parse: %s", pwhy);
        check_failed(m, c, TLSRPT_STS_POLICY_INVALID, false, why);
        return;
    }
    snprintf(p->id, sizeof(p->id), "%s", c->new_id);
    p->fetched_ms = clock_unix_ms();
    p->expires_ms = p->fetched_ms + p->max_age * 1000;
    pthread_mutex_lock(&m->lock);
    m->st.fetched++;
    bool refreshed = c->refresh;
    m->st.refreshed += refreshed;
    pthread_mutex_unlock(&m->lock);
    check_done(m, c, true, p, false, refreshed ? "refreshed" : "fetched", NULL);
}

static void
on_addr(void *arg, struct dns_mx_result *res)
{
    struct sts_check *c = arg;
    struct mta_sts *m = c->m;
    c->req = NULL;
    /* Every address a delivery could use, in the resolver's order (the
     * preferred family first); the others are never connected to. */
    const union dns_addr *pick[FETCH_ADDRS];
    unsigned npick = 0;
    const char *why = res->why;
    if (res->status == DNS_OK) {
        pthread_mutex_lock(&m->lock);
        for (unsigned i = 0; i < res->hosts[0].naddrs && npick < FETCH_ADDRS; i++) {
            const union dns_addr *a = &res->hosts[0].addrs[i];
            if (netaddr_target_refused(&a->sa, m->allow, m->nallow, m->deny, m->ndeny) == NULL)
                pick[npick++] = a;
        }
        pthread_mutex_unlock(&m->lock);
        if (npick == 0)
            why = "mta-sts host's addresses are refused ([delivery] allow_networks, "
                  "deny_networks)";
    }
    if (npick > 0)
        fetch_start(m, c, pick, npick);
    else
        check_failed(m, c, TLSRPT_STS_POLICY_FETCH_ERROR, res->status == DNS_RETRY, why);
    dns_mx_result_unref(res);
}

static void
check_addr(struct mta_sts *m, struct sts_check *c)
{
    char host[DNS_NAME_MAX + 16];
    snprintf(host, sizeof(host), "mta-sts.%s", c->e->name);
    c->st = CHECK_ADDR;
    struct dns_mx_result *res = NULL;
    /* Its A/AAAA records (RFC 8461 3.3: an HTTPS GET to the host), not
     * its MX: a name under a wildcard MX has both. */
    int rc = dns_addr_resolve(m->dns, host, on_addr, c, &res, &c->req);
    if (rc == 1) {
        c->req = NULL;
        on_addr(c, res);
    } else if (rc < 0) {
        c->req = NULL;
        check_failed(m, c, TLSRPT_STS_POLICY_FETCH_ERROR, false, "out of memory");
    }
}

/* What a TXT answer for _mta-sts.DOMAIN says: 1 with the policy's id
 * (exactly one valid STSv1 record), or 0 with the result and reason of a
 * check that ends there (no policy, unless a valid one is cached: RFC
 * 8461 5.1, a removed record does not end a policy early). */
static int
txt_verdict(enum dns_status status, const char *dwhy, const char *const *txt, unsigned n,
            char id[33], const char **result, const char **why)
{
    *why = NULL;
    if (status == DNS_NOT_FOUND) {
        *result = "no_record";
        return 0;
    }
    if (status != DNS_OK) {
        *result = "dns_failed";
        *why = dwhy;
        return 0;
    }
    unsigned found = 0, bad = 0;
    id[0] = '\0';
    for (unsigned i = 0; i < n; i++) {
        char x[33];
        int rc = mta_sts_txt_parse(txt[i], x);
        if (rc == 0 && found++ == 0)
            memcpy(id, x, 33);
        else if (rc == -EINVAL)
            bad++;
    }
    if (found == 1 && bad == 0)
        return 1;
    /* RFC 8461 3.1: unless exactly one STSv1 record remains and it is
     * valid, there is no policy: several STSv1 records (valid or broken
     * alike) or a broken one count as none. */
    *result = found + bad > 0 ? "bad_record" : "no_record";
    *why = found + bad > 1 ? "several STSv1 records"
           : bad > 0       ? "STSv1 record without a valid id"
                           : NULL;
    return 0;
}

/* The TXT record named policy id: fetch it, unless the cached policy has
 * that id and is neither ended nor in its last tenth. */
static void
check_id(struct mta_sts *m, struct sts_check *c, const char id[33])
{
    const struct sts_entry *e = c->e;
    pthread_mutex_lock(&m->lock);
    uint64_t now = clock_unix_ms();
    bool same = e->pol != NULL && strcmp(e->pol->id, id) == 0 && now < e->pol->expires_ms &&
                !refresh_due(e->pol, now);
    c->refresh = e->pol != NULL && strcmp(e->pol->id, id) == 0; /* else a new policy */
    pthread_mutex_unlock(&m->lock);
    if (same) {
        check_done(m, c, false, NULL, false, "unchanged", NULL);
        return;
    }
    memcpy(c->new_id, id, sizeof(c->new_id));
    check_addr(m, c);
}

static void
on_txt(void *arg, enum dns_status status, const char *why, const char *const *txt, unsigned n,
       uint32_t ttl)
{
    struct sts_check *c = arg;
    char id[33];
    const char *result, *reason;
    if (txt_verdict(status, why, txt, n, id, &result, &reason) == 0) {
        if (status == DNS_OK || status == DNS_NOT_FOUND)
            c->again = no_policy_again(c->m, ttl);
        check_done(c->m, c, false, NULL, status == DNS_RETRY, result, reason);
    }
    else
        check_id(c->m, c, id);
}

static void
check_start(struct mta_sts *m, struct sts_check *c)
{
    char id[33];
    check_run(m, c);
    pthread_mutex_lock(&m->lock);
    m->st.inflight++;
    bool known = c->txt_known; /* a worker asked the TXT record (mta_sts_txt_answer) */
    memcpy(id, c->new_id, sizeof(id));
    if (!known)
        m->st.checks++;
    pthread_mutex_unlock(&m->lock);
    if (known) {
        check_id(m, c, id);
        return;
    }
    char name[DNS_NAME_MAX + 16];
    snprintf(name, sizeof(name), "_mta-sts.%s", c->e->name);
    c->st = CHECK_TXT;
    int rc = dns_txt_lookup(m->dns, name, on_txt, c);
    if (rc < 0) {
        check_done(m, c, false, NULL, rc != -EINVAL, "dns_failed",
                   rc == -EINVAL ? "bad name" : "out of memory");
    }
}

/* Start queued checks while there is room. */
static void
check_next(struct mta_sts *m)
{
    while (m->inflight < m->sc->max_fetches) {
        pthread_mutex_lock(&m->lock);
        struct sts_check *c = m->qhead;
        if (c != NULL) {
            m->qhead = c->qnext;
            if (m->qhead == NULL)
                m->qtail = NULL;
            m->st.queued--;
        }
        pthread_mutex_unlock(&m->lock);
        if (c == NULL)
            return;
        check_start(m, c);
    }
}

/* ---- the thread ---- */

static void
on_dns_sock(void *arg, int fd, bool readable, bool writable)
{
    struct mta_sts *m = arg;
    unsigned i = 0;
    while (i < m->ndfds && m->dfds[i].fd != fd)
        i++;
    if (!readable && !writable) {
        if (i < m->ndfds)
            m->dfds[i] = m->dfds[--m->ndfds];
        return;
    }
    if (i == m->ndfds) {
        /* Every socket is watched, however many servers there are: the
         * answers of one left out would never be read, and its queries
         * could only time out. */
        if (m->ndfds == m->dcap) {
            unsigned cap = m->dcap != 0 ? m->dcap * 2 : DNS_FDS_MIN;
            struct pollfd *n = realloc(m->dfds, cap * sizeof(*n));
            if (n == NULL) {
                log_msg(LOG_ERR, "event=mta_sts_dns_socket_unwatched fd=%d reason=\"out of memory\"",
                        fd);
                return; /* c-ares's timeouts still move its queries on */
            }
            m->dfds = n;
            m->dcap = cap;
        }
        m->ndfds++;
    }
    m->dfds[i].fd = fd;
    m->dfds[i].events = (short)((readable ? POLLIN : 0) | (writable ? POLLOUT : 0));
}

/* Forget the domains that have no policy (or only an expired one), no
 * check running, and neither use nor check for a while (FORGET_MS, at
 * least recheck, so that a domain mail goes to now and then is not asked
 * afresh each time): memory follows the domains mail goes to, not every
 * domain ever seen. A policy in force stays (it is in the cache file
 * too). Use counts, not only the last check: a domain checked an hour
 * ago and used a second ago is known, and forgetting it would hold its
 * next mail for a first check.
 * Why not sooner (after FORGET_MS alone, or the TXT answer's TTL)? RFC
 * 8461 would allow it: it says nothing of how long a sender remembers
 * that a domain published no record (section 5 finds a policy by one
 * TXT lookup, and asking again only finds a new one sooner). But a
 * forgotten domain's next mail waits for its TXT answer (MTA_STS_ASK),
 * and TXT lookups are not cached (dns_txt_lookup): a domain mailed every
 * 20 minutes would wait on DNS at every mail instead of once an hour, a
 * whole [dns] timeout where its servers ignore _mta-sts names. The
 * answer's TTL is used otherwise: a kept entry whose "no policy" ran out
 * is asked again on the thread while its mail goes on (mta_sts_get,
 * no_policy_again), which finds a new policy as soon as forgetting would,
 * without the wait. An idle entry is about 60 octets (struct sts_entry),
 * so the hour costs little. */
static void
sweep(struct mta_sts *m)
{
    uint64_t now = clock_unix_ms();
    uint64_t idle = m->sc->recheck > FORGET_MS ? m->sc->recheck : FORGET_MS;
    if (m->forget_ms != 0)
        idle = m->forget_ms;
    pthread_mutex_lock(&m->lock);
    size_t b = 0;
    struct hash_node *cur = NULL;
    /* hash_next() has the next entry in hand: the one returned may go. */
    for (struct hash_node *n; (n = hash_next(&m->domains, &b, &cur)) != NULL;) {
        struct sts_entry *e = (struct sts_entry *)n;
        uint64_t last = e->used_ms > e->checked_ms ? e->used_ms : e->checked_ms;
        /* now < last: the wall clock stepped back; kept until it passes */
        if (e->busy || now <= last || now - last <= idle ||
            (e->pol != NULL && e->pol->expires_ms > now))
            continue;
        hash_remove(&m->domains, &e->hn);
        if (e->pol != NULL) {
            m->st.policies--;
            m->st.enforce -= e->pol->mode == MTA_STS_ENFORCE;
            m->dirty = true;
        }
        mta_sts_policy_unref(e->pol);
        m->st.domains--;
        slab_free(&m->entries, e);
    }
    /* The buckets follow too: after a burst of new domains, halved
     * while a quarter full or less, down to what is left. */
    for (size_t nb = 0; nb != m->domains.nb;) {
        nb = m->domains.nb;
        hash_compact(&m->domains);
    }
    pthread_mutex_unlock(&m->lock);
}

/* RFC 8461 3.3: fetch again, before they end, the policies in their
 * last tenth that mail used since they were fetched, at most
 * REFRESH_MAX a scan, and a domain no more often than recheck (a policy
 * server that is down is not asked every second). A policy nobody uses
 * ends at its max_age. */
static void
refresh_scan(struct mta_sts *m)
{
    uint64_t now = clock_unix_ms();
    unsigned started = 0;
    pthread_mutex_lock(&m->lock);
    size_t b = 0;
    struct hash_node *cur = NULL;
    for (struct hash_node *n;
         started < REFRESH_MAX && (n = hash_next(&m->domains, &b, &cur)) != NULL;) {
        struct sts_entry *e = (struct sts_entry *)n;
        const struct mta_sts_policy *p = e->pol;
        if (e->busy || p == NULL || now >= p->expires_ms || e->used_ms < p->fetched_ms ||
            !refresh_due(p, now) || now - e->checked_ms < m->sc->recheck)
            continue;
        struct sts_check *c = entry_queue(m, e);
        if (c == NULL)
            break; /* no memory: the next scan */
        c->refresh = true;
        started++;
    }
    pthread_mutex_unlock(&m->lock);
}

static uint64_t
mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void *
thread_main(void *arg)
{
    struct mta_sts *m = arg;
    log_altstack_init();
    log_set_thread_name("mta-sts");
    for (;;) {
        pthread_mutex_lock(&m->lock);
        bool stop = m->stop, flush = m->flush_reports, dirty = m->dirty;
        m->flush_reports = false;
        pthread_mutex_unlock(&m->lock);
        if (stop)
            break;
        check_next(m);
        uint64_t now_ms = clock_mono_ms();
        if (dirty && now_ms - m->saved_ms >= SAVE_MS) {
            m->saved_ms = now_ms;
            cache_save(m);
        }
        if (m->rpt != NULL)
            tlsrpt_tick(m->rpt, m->dns, m->multi, flush);
        if (now_ms - m->swept_ms >= m->sweep_every_ms) {
            m->swept_ms = now_ms;
            sweep(m);
        }
        if (now_ms - m->refresh_ms >= REFRESH_SCAN_MS) {
            m->refresh_ms = now_ms;
            refresh_scan(m);
            check_next(m);
        }

        if (m->wcap < m->ndfds) {
            struct curl_waitfd *n = realloc(m->wfds, m->dcap * sizeof(*n));
            if (n != NULL) {
                m->wfds = n;
                m->wcap = m->dcap;
            }
        }
        struct curl_waitfd *w = m->wfds;
        unsigned nw = m->ndfds < m->wcap ? m->ndfds : m->wcap;
        for (unsigned i = 0; i < nw; i++)
            w[i] = (struct curl_waitfd){.fd = m->dfds[i].fd, .events = m->dfds[i].events};
        int timeout = 1000;
        uint64_t now = mono_ns();
        uint64_t dl = dns_timeout(m->dns, now);
        if (dl != UINT64_MAX) {
            uint64_t ms = dl <= now ? 0 : (dl - now + 999999) / 1000000;
            if (ms < (uint64_t)timeout)
                timeout = (int)ms;
        }
        if (dirty && timeout > (int)SAVE_MS)
            timeout = SAVE_MS;
        curl_multi_poll(m->multi, w, nw, timeout, NULL);
        for (unsigned i = 0; i < nw; i++)
            if (w[i].revents != 0)
                dns_process_fd(m->dns, w[i].fd,
                               (w[i].revents & (CURL_WAIT_POLLIN | CURL_WAIT_POLLPRI)) != 0 ||
                                   (w[i].revents & ~(CURL_WAIT_POLLIN | CURL_WAIT_POLLOUT |
                                                     CURL_WAIT_POLLPRI)) != 0,
                               (w[i].revents & CURL_WAIT_POLLOUT) != 0);
        if (dns_timeout(m->dns, mono_ns()) <= mono_ns())
            dns_process_timeouts(m->dns);
        int running = 0;
        curl_multi_perform(m->multi, &running);
        int left = 0;
        for (CURLMsg *msg; (msg = curl_multi_info_read(m->multi, &left)) != NULL;) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            void *priv = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
            if (m->rpt != NULL && tlsrpt_owns(m->rpt, msg->easy_handle)) {
                tlsrpt_on_done(m->rpt, msg->easy_handle, msg->data.result);
                continue;
            }
            fetch_done(m, priv, msg->data.result);
        }
    }
    return NULL;
}

/* SLUICE_TEST_MTA_STS_TTL_UNIT=MS: a no-policy answer's TTL counts in
 * units of MS ms instead of minutes (NO_POLICY_UNIT_MS; tests of it
 * without waiting minutes). Test-hook builds only, as below. */
static void
test_hook_ttl_unit(struct mta_sts *m)
{
#ifdef SLUICE_TEST_HOOKS
    const char *v = getenv("SLUICE_TEST_MTA_STS_TTL_UNIT");
    char *end;
    unsigned long long ms = v != NULL && *v != '\0' ? strtoull(v, &end, 10) : 0;
    if (ms >= 1 && ms <= 86400000 && *end == '\0') {
        m->ttl_unit_ms = ms;
        log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_MTA_STS_TTL_UNIT ms=%llu", ms);
    }
#else
    (void)m;
#endif
}

/* SLUICE_TEST_MTA_STS_FORGET=MS: domains are forgotten after MS ms
 * without use or check (whatever recheck says), looked for every MS/2
 * (tests of the sweep without waiting ten minutes). Only in builds with
 * test hooks (SLUICE_TESTS=ON): a production build ignores it. */
static void
test_hook_forget(struct mta_sts *m)
{
#ifdef SLUICE_TEST_HOOKS
    const char *v = getenv("SLUICE_TEST_MTA_STS_FORGET");
    char *end;
    unsigned long long ms = v != NULL && *v != '\0' ? strtoull(v, &end, 10) : 0;
    if (ms >= 2 && ms <= 86400000 && *end == '\0') {
        m->forget_ms = ms;
        m->sweep_every_ms = ms / 2;
        log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_MTA_STS_FORGET ms=%llu", ms);
    }
#else
    (void)m;
#endif
}

int
mta_sts_new(const struct config *cfg, const char *cache_path, struct mta_sts **out, char *err,
            size_t errlen)
{
    *out = NULL;
    struct mta_sts *m = calloc(1, sizeof(*m));
    if (m == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    m->cfg = cfg;
    memcpy(m->allow, cfg->delivery.allow, sizeof(m->allow));
    m->nallow = cfg->delivery.nallow;
    memcpy(m->deny, cfg->delivery.deny, sizeof(m->deny));
    m->ndeny = cfg->delivery.ndeny;
    m->sc = &cfg->mta_sts;
    const char *slash = strrchr(cache_path, '/');
    if (slash == NULL || (size_t)(slash - cache_path) >= sizeof(m->dir) ||
        strlen(slash + 1) >= sizeof(m->file)) {
        snprintf(err, errlen, "mta-sts cache path %s: not a file in a directory", cache_path);
        free(m);
        return -EINVAL;
    }
    memcpy(m->dir, cache_path, (size_t)(slash - cache_path));
    m->dir[slash - cache_path] = '\0';
    snprintf(m->file, sizeof(m->file), "%s", slash + 1);
    pthread_mutex_init(&m->lock, NULL);
    hash_init(&m->domains, entry_eq, 64);
    slab_init(&m->entries);
    m->sweep_every_ms = SWEEP_MS;
    test_hook_forget(m);
    test_hook_ttl_unit(m);
    int rc = dns_new(&cfg->dns, on_dns_sock, m, &m->dns, err, errlen);
    if (rc < 0)
        goto fail;
    m->multi = curl_multi_init();
    if (m->multi == NULL) {
        snprintf(err, errlen, "libcurl: cannot make a multi handle");
        rc = -ENOMEM;
        goto fail;
    }
    curl_multi_setopt(m->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)m->sc->max_fetches);
    if (m->sc->tlsrpt) {
        char rdir[PATH_MAX];
        snprintf(rdir, sizeof(rdir), "%s", m->dir);
        rc = tlsrpt_new(cfg, rdir, &m->rpt, err, errlen);
        if (rc < 0)
            goto fail;
    }
    cache_load(m);
    rc = pthread_create(&m->thread, NULL, thread_main, m);
    if (rc != 0) {
        snprintf(err, errlen, "cannot start the MTA-STS thread: %s", strerror(rc));
        rc = -rc;
        goto fail;
    }
    m->started = true;
    *out = m;
    return 0;
fail:
    mta_sts_free(m);
    return rc;
}

struct mta_sts *
mta_sts_free(struct mta_sts *m)
{
    if (m == NULL)
        return NULL;
    if (m->started) {
        pthread_mutex_lock(&m->lock);
        m->stop = true;
        pthread_mutex_unlock(&m->lock);
        curl_multi_wakeup(m->multi);
        pthread_join(m->thread, NULL);
    }
    /* Checks in flight are abandoned: their DNS lookups go with the
     * resolver, their transfers with their handles; queued ones were
     * never started. */
    while (m->running != NULL)
        check_free(m, m->running);
    while (m->qhead != NULL) {
        struct sts_check *c = m->qhead;
        m->qhead = c->qnext;
        free(c);
    }
    m->qtail = NULL;
    if (m->rpt != NULL)
        m->rpt = tlsrpt_free(m->rpt, m->multi);
    m->dns = dns_free(m->dns);
    if (m->started && m->dirty)
        cache_save(m);
    /* hash_next() has the next entry in hand: the one returned may go. */
    size_t b = 0;
    struct hash_node *cur = NULL;
    for (struct hash_node *n; (n = hash_next(&m->domains, &b, &cur)) != NULL;) {
        struct sts_entry *e = (struct sts_entry *)n;
        mta_sts_policy_unref(e->pol);
        slab_free(&m->entries, e);
    }
    hash_fini(&m->domains);
    slab_fini(&m->entries);
    if (m->multi != NULL)
        curl_multi_cleanup(m->multi);
    free(m->dfds);
    free(m->wfds);
    pthread_mutex_destroy(&m->lock);
    free(m);
    return NULL;
}
