/*
 * mta_sts_check: a check of a domain's MTA-STS policy on the store's
 * thread (see mta_sts.c for the store, its entries and the thread's
 * loop; mta_sts_int.h: what the two share). A check walks TXT -> ADDR ->
 * FETCH: the _mta-sts TXT record asked (or the answer a worker gave,
 * mta_sts_txt_answer) and its id compared with the cached policy's; the
 * policy host's addresses resolved and checked against [delivery]
 * allow_networks and deny_networks; the policy fetched over HTTPS with
 * curl on the thread's multi handle (pinned to those addresses) and
 * parsed (mta_sts_policy.c); the outcome stored in the domain's entry
 * under m->lock (sts_check_done), a failure reported for TLS reporting.
 * sts_check_next starts the checks queued, up to max_fetches at once.
 *
 * Threading: the store's thread; the entries under m->lock.
 */
#include "engine/mta_sts.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/mta_sts_int.h"
#include "engine/netaddr.h"
#include "engine/tlsrpt.h"

#define FETCH_ADDRS     16   /* the policy host's addresses a fetch tries, at most */

/* ---- checks, on the thread ---- */

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
struct sts_check *
sts_check_free(struct mta_sts *m, struct sts_check *c)
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
 * sts_retry_after). */
static void
check_done(struct mta_sts *m, struct sts_check *c, bool replace, struct mta_sts_policy *pol,
           bool dns_temp, const char *result, const char *why)
{
    struct sts_entry *e = c->e;
    uint8_t again = c->again;
    sts_check_free(m, c);
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

void
sts_fetch_done(struct mta_sts *m, struct sts_check *c, CURLcode res)
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
int
sts_txt_verdict(enum dns_status status, const char *dwhy, const char *const *txt, unsigned n,
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
                !sts_refresh_due(e->pol, now);
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
    if (sts_txt_verdict(status, why, txt, n, id, &result, &reason) == 0) {
        if (status == DNS_OK || status == DNS_NOT_FOUND)
            c->again = sts_no_policy_again(c->m, ttl);
        check_done(c->m, c, false, NULL, status == DNS_RETRY, result, reason);
    }
    else
        check_id(c->m, c, id);
}

/* c, taken off the queue by sts_check_next and counted there (in flight,
 * a check if its TXT record is to be asked), starts. known and id: read
 * under that lock. */
static void
check_start(struct mta_sts *m, struct sts_check *c, bool known, const char *id)
{
    check_run(m, c);
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
void
sts_check_next(struct mta_sts *m)
{
    while (m->inflight < m->sc->max_fetches) {
        pthread_mutex_lock(&m->lock);
        struct sts_check *c = m->qhead;
        bool known = false;
        char id[33];
        if (c != NULL) {
            m->qhead = c->qnext;
            if (m->qhead == NULL)
                m->qtail = NULL;
            /* Queued to in flight in one step: counted apart, a reader
             * of mta_sts_stats between the two saw neither queued nor in
             * flight (nor the check counted) and took the store for
             * idle while a check was starting. */
            m->st.queued--;
            m->st.inflight++;
            known = c->txt_known; /* a worker asked the TXT record (mta_sts_txt_answer) */
            memcpy(id, c->new_id, sizeof(id));
            if (!known)
                m->st.checks++;
        }
        pthread_mutex_unlock(&m->lock);
        if (c == NULL)
            return;
        check_start(m, c, known, id);
    }
}
