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
 * A check itself (TXT, the policy host's addresses, the fetch) is
 * engine/mta_sts_check.c's (mta_sts_int.h: what the two share); the
 * policies themselves (parse, match, the TXT record) are
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

#include "common/clock.h"
#include "common/fs.h"
#include "common/hash.h"
#include "common/log.h"
#include "common/slab.h"
#include "engine/config.h"
#include "engine/netaddr.h"
#include "engine/mta_sts_int.h"
#include "engine/tlsrpt.h"

#define CACHE_MAGIC "sluice-mta-sts 1"
#define SAVE_MS     1000 /* the cache file is written at most this often */
#define DNS_FDS_MIN 16 /* room for the resolver's sockets at first; grown as it opens more */
#define SWEEP_MS    60000   /* domains without a policy are forgotten this often */
#define FORGET_MS   600000  /* ... once unused this long (and at least recheck) */
#define REFRESH_SCAN_MS 1000 /* policies near their end are looked for this often */
#define REFRESH_MAX     10   /* ... and at most this many refreshes started per scan */
#define REFRESH_MIN_MS  3000 /* the refresh window is the last tenth of max_age, at least this */
#define RETRY_MIN_MS    1000 /* a DNS failure's sts_retry_after() is at least this (error_ttl: 0) */
#define NO_POLICY_UNIT_MS 60000 /* a no-policy answer's TTL counts in these, at least one */
#define NO_POLICY_UNITS   63    /* ... and at most this many (sts_entry's again: 6 bits) */

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
bool
sts_refresh_due(const struct mta_sts_policy *p, uint64_t now)
{
    uint64_t window = p->max_age * 100; /* a tenth, in ms */
    if (window < REFRESH_MIN_MS)
        window = REFRESH_MIN_MS;
    return now + window >= p->expires_ms;
}

/* How long after a check that failed on DNS (a timeout, SERVFAIL, or the
 * resolver out of memory) a domain without a policy in force is due
 * again: [dns] error_ttl, at least RETRY_MIN_MS, at most recheck. An
 * enforce domain whose first check met one timeout is not delivered to
 * without its policy for a whole recheck; a dead resolver costs one
 * check per domain per error_ttl (busy keeps it to one at a time). */
uint64_t
sts_retry_after(const struct mta_sts *m)
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
uint8_t
sts_no_policy_again(const struct mta_sts *m, uint32_t ttl)
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

/* How long ago e's last check ended, on now's clock. A wall clock that
 * stepped back since (now < checked_ms) is as a check that just ended:
 * its stamp is brought back to now, so that the domain is due again
 * after its wait counted from the step, not at once (the unsigned
 * difference wrapped to a huge one) nor only once the clock came back
 * past the stamp (a clock that had run a day ahead). The sweep keeps
 * such an entry alike (now <= last). Under m->lock; e checked
 * (checked_ms != 0). */
static uint64_t
checked_ago(struct sts_entry *e, uint64_t now)
{
    if (now < e->checked_ms)
        e->checked_ms = now;
    return now - e->checked_ms;
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
     * in force (sts_retry_after), or once the TTL of a no-policy answer ran
     * out (sts_no_policy_again). */
    bool in_force = e->pol != NULL && now < e->pol->expires_ms;
    uint64_t again = m->sc->recheck;
    if (e->dns_failed && !in_force)
        again = sts_retry_after(m);
    else if (e->again != 0 && !in_force && e->again * no_policy_unit(m) < again)
        again = e->again * no_policy_unit(m); /* never past recheck: a reload may shorten it */
    if (!e->busy &&
        (e->checked_ms == 0 || checked_ago(e, now) >= again ||
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
    int has = sts_txt_verdict(status, why, txt, n, id, &result, &reason);
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
    e->again = has || status == DNS_RETRY || status == DNS_FAIL ? 0 : sts_no_policy_again(m, ttl);
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
 * sts_no_policy_again), which finds a new policy as soon as forgetting would,
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
            !sts_refresh_due(p, now) || checked_ago(e, now) < m->sc->recheck)
            continue;
        struct sts_check *c = entry_queue(m, e);
        if (c == NULL)
            break; /* no memory: the next scan */
        c->refresh = true;
        started++;
    }
    pthread_mutex_unlock(&m->lock);
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
        sts_check_next(m);
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
            sts_check_next(m);
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
        uint64_t now = clock_mono_ns();
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
        if (dns_timeout(m->dns, clock_mono_ns()) <= clock_mono_ns())
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
            sts_fetch_done(m, priv, msg->data.result);
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
        sts_check_free(m, m->running);
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
