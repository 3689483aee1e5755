/*
 * tlsrpt: see tlsrpt.h. A struct day per (policy domain, UTC day) in a
 * hash under r->lock; sending a day walks it through RUA (the TXT lookup,
 * then a message to each mailto: address, handed to the mailer there and
 * then) -> POST (one transfer per https: address, never connected to an
 * address [delivery] allow_networks refuses) -> gone, or back to idle to
 * be tried again.
 *
 * Threading: r->lock guards the days and the counters; r->mail_lock the
 * mailer (held while it runs, so that clearing it waits); the sending
 * state of a day is the MTA-STS thread's.
 */
#include "engine/tlsrpt.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <openssl/evp.h>
#include <zlib.h>

#include "common/clock.h"
#include "common/fs.h"
#include "common/hash.h"
#include "common/json.h"
#include "common/log.h"
#include "dns/dns.h"
#include "engine/config.h"
#include "engine/mta_sts.h"
#include "engine/netaddr.h"
#include "queue/queue.h"

#define STATE_FILE    "tlsrpt.state"
#define STATE_MAGIC   "sluice-tlsrpt 2"
#define STATE_MAGIC_1 "sluice-tlsrpt 1" /* one policy a day, still read */
#define MAX_DETAILS   32          /* failure rows per policy */
#define MAX_POLICIES  8           /* per domain and day: no policy, MTA-STS, TLSA per base domain */
#define TLSA_TEXT_MAX 4096        /* of a TLSA policy's records: those beyond are left out */
#define MAX_RUA       4           /* addresses a report goes to */
#define RETRY_MS      3600000ULL  /* a report no address took */
#define GIVE_UP_DAYS  3
#define DAY_MS        86400000ULL

static const char *const result_names[TLSRPT_RESULT_COUNT] = {
    [TLSRPT_SUCCESS] = "success",
    [TLSRPT_STARTTLS_NOT_SUPPORTED] = "starttls-not-supported",
    [TLSRPT_CERTIFICATE_HOST_MISMATCH] = "certificate-host-mismatch",
    [TLSRPT_CERTIFICATE_EXPIRED] = "certificate-expired",
    [TLSRPT_CERTIFICATE_NOT_TRUSTED] = "certificate-not-trusted",
    [TLSRPT_VALIDATION_FAILURE] = "validation-failure",
    [TLSRPT_STS_POLICY_FETCH_ERROR] = "sts-policy-fetch-error",
    [TLSRPT_STS_POLICY_INVALID] = "sts-policy-invalid",
    [TLSRPT_STS_WEBPKI_INVALID] = "sts-webpki-invalid",
    [TLSRPT_TLSA_INVALID] = "tlsa-invalid",
    [TLSRPT_DNSSEC_INVALID] = "dnssec-invalid",
};

const char *
tlsrpt_result_str(enum tlsrpt_result r)
{
    return (unsigned)r < TLSRPT_RESULT_COUNT ? result_names[r] : "validation-failure";
}

static int
result_parse(const char *s)
{
    for (int i = 0; i < TLSRPT_RESULT_COUNT; i++)
        if (strcmp(s, result_names[i]) == 0)
            return i;
    return -1;
}

enum tlsrpt_result
tlsrpt_result_of_verify(const char *why)
{
    if (why == NULL)
        return TLSRPT_VALIDATION_FAILURE;
    if (strstr(why, "hostname mismatch") != NULL || strstr(why, "IP address mismatch") != NULL)
        return TLSRPT_CERTIFICATE_HOST_MISMATCH;
    if (strstr(why, "expired") != NULL)
        return TLSRPT_CERTIFICATE_EXPIRED;
    if (strstr(why, "self-signed") != NULL || strstr(why, "self signed") != NULL ||
        strstr(why, "unable to get local issuer") != NULL ||
        strstr(why, "unable to get issuer") != NULL || strstr(why, "unknown ca") != NULL ||
        strstr(why, "untrusted") != NULL || strstr(why, "not trusted") != NULL)
        return TLSRPT_CERTIFICATE_NOT_TRUSTED;
    return TLSRPT_VALIDATION_FAILURE;
}

struct detail {
    uint8_t result;
    char mx[DNS_NAME_MAX + 1];
    char addr[64];
    uint64_t count;
    uint64_t reported; /* of count, in the report being sent */
};

enum day_state { DAY_IDLE, DAY_RUA, DAY_POST };

/* RFC 8460 4.3: "no-policy-found" (a failed MTA-STS fetch with nothing
 * cached), "sts" or "tlsa" (DANE, per TLSA base domain). */
enum pol_type { POL_NONE, POL_STS, POL_TLSA };
static const char *const pol_names[] = {"no-policy-found", "sts", "tlsa"};

/* One policy of a report and what was counted under it. */
struct rpol {
    uint8_t type;              /* enum pol_type */
    char mx[DNS_NAME_MAX + 1]; /* POL_TLSA: the TLSA base domain whose records these are */
    struct mta_sts_policy *sts; /* owned reference, POL_STS: the first policy of the day */
    char *tlsa;                /* owned, POL_TLSA: "usage selector mtype HEX\n" per record */
    uint64_t success, failure;
    uint64_t rep_success, rep_failure; /* of those, in the report being sent */
    unsigned ndetails;
    struct detail *details;    /* owned: MAX_DETAILS rows, made at the first failure (most
                                * policies see none: a day costs little per domain) */
};

static const struct mta_sts_policy no_sts; /* a POL_STS whose policy is not known */

struct day {
    struct hash_node hn;   /* in r->days (first) */
    struct day *next_all;  /* the sending walk's list */
    struct tlsrpt *r;      /* borrowed */
    char key[DNS_NAME_MAX + 16]; /* "domain day" */
    char domain[DNS_NAME_MAX + 1];
    int64_t day;           /* days since 1970-01-01 UTC */
    unsigned npols;
    struct rpol *pols[MAX_POLICIES]; /* owned; the first of each kind (and MX host) stays */
    /* Sending: the thread's. */
    uint8_t st;            /* enum day_state */
    uint64_t next_try_ms;  /* Unix ms; 0: at once when due */
    unsigned posts, posted; /* transfers in flight, and those that succeeded */
    CURL *easy[MAX_RUA];
    struct curl_slist *hdrs[MAX_RUA];
    char *gz;              /* owned while posting: the gzipped report */
    size_t gzlen;
};

struct tlsrpt {
    const struct config *cfg; /* borrowed */
    char dir[PATH_MAX];
    pthread_mutex_t lock;
    /* under lock: [delivery] allow_networks and deny_networks of the
     * config in force (a reload's), not cfg's of the start */
    struct cidr allow[NETADDR_MAX_LIST], deny[NETADDR_MAX_LIST];
    int nallow, ndeny;
    struct hash days;         /* owned struct day */
    bool dirty;
    uint64_t saved_ms;
    uint64_t sent, failed;
    CURLM *multi;             /* borrowed: the thread's, once it ticked */
    unsigned seq;             /* report ids */
    pthread_mutex_t mail_lock;
    tlsrpt_mail_fn *mail;     /* under mail_lock; NULL: mailto: skipped */
    void *mail_arg;
};

void
tlsrpt_set_allow(struct tlsrpt *r, const struct delivery_config *dc)
{
    if (r == NULL)
        return;
    pthread_mutex_lock(&r->lock);
    memcpy(r->allow, dc->allow, sizeof(r->allow));
    r->nallow = dc->nallow;
    memcpy(r->deny, dc->deny, sizeof(r->deny));
    r->ndeny = dc->ndeny;
    pthread_mutex_unlock(&r->lock);
}

void
tlsrpt_set_mailer(struct tlsrpt *r, tlsrpt_mail_fn *fn, void *arg)
{
    if (r == NULL)
        return;
    pthread_mutex_lock(&r->mail_lock);
    r->mail = fn;
    r->mail_arg = arg;
    pthread_mutex_unlock(&r->mail_lock);
}

static bool
day_eq(const struct hash_node *n, const void *key)
{
    return strcmp(((const struct day *)n)->key, key) == 0;
}

/* Under r->lock. */
static struct day *
day_get(struct tlsrpt *r, const char *domain, int64_t dayno)
{
    char key[DNS_NAME_MAX + 16];
    snprintf(key, sizeof(key), "%s %lld", domain, (long long)dayno);
    uint64_t h = hash_str_nocase(key);
    struct hash_node *n = hash_find(&r->days, h, key);
    if (n != NULL)
        return (struct day *)n;
    struct day *d = calloc(1, sizeof(*d));
    if (d == NULL)
        return NULL;
    d->r = r;
    snprintf(d->key, sizeof(d->key), "%s", key);
    snprintf(d->domain, sizeof(d->domain), "%s", domain);
    d->day = dayno;
    d->hn.hash = h;
    if (hash_insert(&r->days, &d->hn) < 0) {
        free(d);
        return NULL;
    }
    return d;
}

static struct day *
day_free(struct day *d)
{
    for (unsigned i = 0; i < d->npols; i++) {
        free(d->pols[i]->tlsa);
        free(d->pols[i]->details);
        mta_sts_policy_unref(d->pols[i]->sts);
        free(d->pols[i]);
    }
    free(d);
    return NULL;
}

/* Under r->lock, as d's report is made: what it counts is what a sent
 * report takes away (day_reported). */
static void
day_mark(struct day *d)
{
    for (unsigned i = 0; i < d->npols; i++) {
        struct rpol *p = d->pols[i];
        p->rep_success = p->success;
        p->rep_failure = p->failure;
        for (unsigned k = 0; k < p->ndetails; k++)
            p->details[k].reported = p->details[k].count;
    }
}

/* Under r->lock, once d's report went out: its counts less what the
 * report held (day_mark). Sessions counted while it was being sent (a
 * flush sends today's day, still counting) stay for the next report.
 * Returns whether any are left. */
static bool
day_reported(struct day *d)
{
    bool left = false;
    for (unsigned i = 0; i < d->npols; i++) {
        struct rpol *p = d->pols[i];
        p->success -= p->rep_success;
        p->failure -= p->rep_failure;
        p->rep_success = p->rep_failure = 0;
        for (unsigned k = 0; k < p->ndetails; k++) {
            p->details[k].count -= p->details[k].reported;
            p->details[k].reported = 0;
        }
        left |= p->success + p->failure > 0;
    }
    return left;
}

/* Under r->lock: d's policy of type t (for POL_TLSA: of base domain mx),
 * made on first use; NULL when out of room or memory (not counted). */
static struct rpol *
day_pol(struct day *d, enum pol_type t, const char *mx)
{
    for (unsigned i = 0; i < d->npols; i++)
        if (d->pols[i]->type == t && (t != POL_TLSA || strcmp(d->pols[i]->mx, mx) == 0))
            return d->pols[i];
    if (d->npols == MAX_POLICIES)
        return NULL;
    struct rpol *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->type = (uint8_t)t;
    if (t == POL_TLSA)
        snprintf(p->mx, sizeof(p->mx), "%s", mx);
    d->pols[d->npols++] = p;
    return p;
}

static void
pol_count(struct rpol *d, enum tlsrpt_result res, const char *mx, const char *addr, uint64_t n)
{
    if (res == TLSRPT_SUCCESS) {
        d->success += n;
        return;
    }
    d->failure += n;
    mx = mx != NULL ? mx : "";
    addr = addr != NULL ? addr : "";
    for (unsigned i = 0; i < d->ndetails; i++) {
        struct detail *x = &d->details[i];
        if (x->result == res && strcmp(x->mx, mx) == 0 && strcmp(x->addr, addr) == 0) {
            x->count += n;
            return;
        }
    }
    if (d->details == NULL && (d->details = calloc(MAX_DETAILS, sizeof(*d->details))) == NULL)
        return; /* counted in the summary, without a row of its own */
    if (d->ndetails == MAX_DETAILS)
        return; /* likewise */
    struct detail *x = &d->details[d->ndetails++];
    x->result = (uint8_t)res;
    snprintf(x->mx, sizeof(x->mx), "%s", mx);
    snprintf(x->addr, sizeof(x->addr), "%s", addr);
    x->count = n;
}

void
tlsrpt_record(struct tlsrpt *r, const char *domain, const struct mta_sts_policy *p,
              enum tlsrpt_result res, const char *mx, const char *addr)
{
    if (r == NULL)
        return;
    int64_t dayno = (int64_t)(clock_unix_ms() / DAY_MS);
    pthread_mutex_lock(&r->lock);
    struct day *d = day_get(r, domain, dayno);
    struct rpol *rp = d != NULL ? day_pol(d, p != NULL ? POL_STS : POL_NONE, NULL) : NULL;
    if (rp != NULL) {
        if (p != NULL && rp->sts == NULL) /* immutable: shared, not copied */
            rp->sts = mta_sts_policy_ref((struct mta_sts_policy *)(uintptr_t)p);
        pol_count(rp, res, mx, addr, 1);
        r->dirty = true;
    }
    pthread_mutex_unlock(&r->lock);
}

/* "usage selector mtype HEX\n" per record, as many whole ones as fit in
 * TLSA_TEXT_MAX; NULL when out of memory. */
static char *
tlsa_text(const struct dns_tlsa *tlsa, unsigned n)
{
    char *t = malloc(TLSA_TEXT_MAX);
    if (t == NULL)
        return NULL;
    size_t at = 0;
    for (unsigned i = 0; i < n; i++) {
        size_t need = 16 + 2 * (size_t)tlsa[i].len;
        if (at + need + 1 > TLSA_TEXT_MAX)
            break;
        at += (size_t)snprintf(t + at, TLSA_TEXT_MAX - at, "%u %u %u ", tlsa[i].usage,
                               tlsa[i].selector, tlsa[i].mtype);
        for (unsigned k = 0; k < tlsa[i].len; k++)
            at += (size_t)snprintf(t + at, TLSA_TEXT_MAX - at, "%02X", tlsa[i].data[k]);
        t[at++] = '\n';
    }
    t[at] = '\0';
    return t;
}

void
tlsrpt_record_tlsa(struct tlsrpt *r, const char *domain, const char *mx,
                   const struct dns_tlsa *tlsa, unsigned n, enum tlsrpt_result res,
                   const char *addr, const char *base)
{
    if (r == NULL || mx == NULL)
        return;
    int64_t dayno = (int64_t)(clock_unix_ms() / DAY_MS);
    pthread_mutex_lock(&r->lock);
    struct day *d = day_get(r, domain, dayno);
    struct rpol *rp = d != NULL ? day_pol(d, POL_TLSA, base != NULL ? base : mx) : NULL;
    if (rp != NULL) {
        if (rp->tlsa == NULL)
            rp->tlsa = tlsa_text(tlsa, n);
        pol_count(rp, res, mx, addr, 1);
        r->dirty = true;
    }
    pthread_mutex_unlock(&r->lock);
}

uint64_t
tlsrpt_sent(struct tlsrpt *r)
{
    pthread_mutex_lock(&r->lock);
    uint64_t v = r->sent;
    pthread_mutex_unlock(&r->lock);
    return v;
}

uint64_t
tlsrpt_failed(struct tlsrpt *r)
{
    pthread_mutex_lock(&r->lock);
    uint64_t v = r->failed;
    pthread_mutex_unlock(&r->lock);
    return v;
}

/* ---- the state file ---- */

/* Version 2: "D domain day", then per policy one of "P sts success
 * failure mode max_age id mx,mx", "P none success failure" or "P tlsa
 * success failure mx u:s:m:HEX,...", each followed by its failure rows
 * "F result count mx addr" ("-" for empty). Version 1 had one policy a
 * day on its D line ("D domain day success failure have mode max_age id
 * mx,mx"); it is still read. */
static void
pol_save(struct json *j, const struct rpol *p)
{
    char line[DNS_NAME_MAX * 2 + 256];
    int k = snprintf(line, sizeof(line), "P %s %llu %llu", p->type == POL_STS    ? "sts"
                                                           : p->type == POL_TLSA ? "tlsa"
                                                                                 : "none",
                     (unsigned long long)p->success, (unsigned long long)p->failure);
    json_raw(j, line, (size_t)k);
    if (p->type == POL_STS) {
        const struct mta_sts_policy *sp = p->sts != NULL ? p->sts : &no_sts;
        k = snprintf(line, sizeof(line), " %s %llu %s ", mta_sts_mode_str(sp->mode),
                     (unsigned long long)sp->max_age, sp->id[0] ? sp->id : "-");
        json_raw(j, line, (size_t)k);
        for (unsigned i = 0; i < sp->nmx; i++) {
            json_raw(j, sp->mx[i], strlen(sp->mx[i]));
            if (i + 1 < sp->nmx)
                json_raw(j, ",", 1);
        }
        if (sp->nmx == 0)
            json_raw(j, "-", 1);
    } else if (p->type == POL_TLSA) {
        json_raw(j, " ", 1);
        json_raw(j, p->mx, strlen(p->mx));
        json_raw(j, " ", 1);
        const char *t = p->tlsa != NULL && p->tlsa[0] ? p->tlsa : "-";
        size_t n = strlen(t);
        for (size_t i = 0; i < n; i++) {
            char c = t[i] == ' ' ? ':' : t[i] == '\n' ? ',' : t[i];
            if (!(c == ',' && i + 1 == n))
                json_raw(j, &c, 1);
        }
    }
    json_raw(j, "\n", 1);
    for (unsigned i = 0; i < p->ndetails; i++) {
        const struct detail *x = &p->details[i];
        if (x->count == 0)
            continue;
        k = snprintf(line, sizeof(line), "F %s %llu %s %s\n", result_names[x->result],
                     (unsigned long long)x->count, x->mx[0] ? x->mx : "-",
                     x->addr[0] ? x->addr : "-");
        json_raw(j, line, (size_t)k);
    }
}

static void
state_save(struct tlsrpt *r)
{
    struct json j; /* used as a growing buffer only */
    json_init(&j);
    char line[DNS_NAME_MAX * 2 + 256];
    snprintf(line, sizeof(line), "%s\n", STATE_MAGIC);
    json_raw(&j, line, strlen(line));
    pthread_mutex_lock(&r->lock);
    r->dirty = false;
    size_t b = 0;
    struct hash_node *cur = NULL;
    for (struct hash_node *n; (n = hash_next(&r->days, &b, &cur)) != NULL;) {
        const struct day *d = (const struct day *)n;
        int k = snprintf(line, sizeof(line), "D %s %lld\n", d->domain, (long long)d->day);
        json_raw(&j, line, (size_t)k);
        for (unsigned i = 0; i < d->npols; i++)
            pol_save(&j, d->pols[i]);
    }
    pthread_mutex_unlock(&r->lock);
    int rc = json_failed(&j) ? -ENOMEM : fs_write_atomic(r->dir, STATE_FILE, j.buf, j.len);
    json_fini(&j);
    if (rc < 0) {
        log_msg(LOG_ERR, "event=tlsrpt_state_write_failed dir=%s err=\"%s\"", r->dir,
                strerror(-rc));
        pthread_mutex_lock(&r->lock);
        r->dirty = true;
        pthread_mutex_unlock(&r->lock);
    }
}

/* The fields of an MTA-STS policy as saved: mode max_age id mx,mx, into
 * a policy of its own (one reference); NULL when out of memory. */
static struct mta_sts_policy *
sts_load(const char *mode, const char *age, const char *id, char *mxs)
{
    struct mta_sts_policy_draft draft, *p = &draft;
    memset(p, 0, sizeof(*p));
    p->mode = strcmp(mode, "enforce") == 0   ? MTA_STS_ENFORCE
              : strcmp(mode, "testing") == 0 ? MTA_STS_TESTING
                                             : MTA_STS_NONE;
    p->max_age = strtoull(age, NULL, 10);
    snprintf(p->id, sizeof(p->id), "%s", strcmp(id, "-") == 0 ? "" : id);
    char *s2 = NULL;
    for (char *x = strtok_r(mxs, ",", &s2); x != NULL && p->nmx < MTA_STS_MAX_MX;
         x = strtok_r(NULL, ",", &s2))
        if (strcmp(x, "-") != 0)
            snprintf(p->mx[p->nmx++], sizeof(p->mx[0]), "%s", x);
    return mta_sts_policy_seal(p);
}

static void
state_load(struct tlsrpt *r)
{
    char path[PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/%s", r->dir, STATE_FILE);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    char line[MTA_STS_MAX_MX * (DNS_NAME_MAX + 2) + TLSA_TEXT_MAX + 512];
    struct day *d = NULL;
    struct rpol *p = NULL;
    unsigned lineno = 0;
    bool v1 = false;
    while (fgets(line, sizeof(line), f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        if (lineno++ == 0) {
            v1 = strcmp(line, STATE_MAGIC_1) == 0;
            if (!v1 && strcmp(line, STATE_MAGIC) != 0)
                break;
            continue;
        }
        char *save = NULL;
        char *tag = strtok_r(line, " ", &save);
        if (tag != NULL && strcmp(tag, "D") == 0) {
            char *dom = strtok_r(NULL, " ", &save), *dayno = strtok_r(NULL, " ", &save);
            d = NULL;
            p = NULL;
            char norm[DNS_NAME_MAX + 1];
            if (dayno == NULL || dns_name_normalize(dom, norm) < 0)
                continue;
            d = day_get(r, norm, strtoll(dayno, NULL, 10));
            if (d == NULL || !v1)
                continue;
            char *succ = strtok_r(NULL, " ", &save), *fail = strtok_r(NULL, " ", &save),
                 *have = strtok_r(NULL, " ", &save), *mode = strtok_r(NULL, " ", &save),
                 *age = strtok_r(NULL, " ", &save), *id = strtok_r(NULL, " ", &save),
                 *mxs = strtok_r(NULL, " ", &save);
            if (mxs == NULL)
                continue;
            bool sts = strcmp(have, "1") == 0;
            p = day_pol(d, sts ? POL_STS : POL_NONE, NULL);
            if (p == NULL)
                continue;
            p->success = strtoull(succ, NULL, 10);
            p->failure = strtoull(fail, NULL, 10);
            if (sts && p->sts == NULL)
                p->sts = sts_load(mode, age, id, mxs);
        } else if (tag != NULL && strcmp(tag, "P") == 0 && d != NULL && !v1) {
            char *type = strtok_r(NULL, " ", &save), *succ = strtok_r(NULL, " ", &save),
                 *fail = strtok_r(NULL, " ", &save);
            p = NULL;
            if (fail == NULL)
                continue;
            if (strcmp(type, "sts") == 0) {
                char *mode = strtok_r(NULL, " ", &save), *age = strtok_r(NULL, " ", &save),
                     *id = strtok_r(NULL, " ", &save), *mxs = strtok_r(NULL, " ", &save);
                if (mxs == NULL || (p = day_pol(d, POL_STS, NULL)) == NULL)
                    continue;
                if (p->sts == NULL)
                    p->sts = sts_load(mode, age, id, mxs);
            } else if (strcmp(type, "tlsa") == 0) {
                char *mx = strtok_r(NULL, " ", &save), *recs = strtok_r(NULL, " ", &save);
                char norm[DNS_NAME_MAX + 1];
                if (recs == NULL || dns_name_normalize(mx, norm) < 0 ||
                    (p = day_pol(d, POL_TLSA, norm)) == NULL)
                    continue;
                size_t n = strlen(recs);
                if (p->tlsa == NULL && strcmp(recs, "-") != 0 && n + 2 <= TLSA_TEXT_MAX &&
                    (p->tlsa = malloc(n + 2)) != NULL) {
                    for (size_t i = 0; i < n; i++)
                        p->tlsa[i] = recs[i] == ':' ? ' ' : recs[i] == ',' ? '\n' : recs[i];
                    p->tlsa[n] = '\n';
                    p->tlsa[n + 1] = '\0';
                }
            } else if (strcmp(type, "none") == 0) {
                p = day_pol(d, POL_NONE, NULL);
            }
            if (p != NULL) {
                p->success = strtoull(succ, NULL, 10);
                p->failure = strtoull(fail, NULL, 10);
            }
        } else if (tag != NULL && strcmp(tag, "F") == 0 && p != NULL &&
                   p->ndetails < MAX_DETAILS &&
                   (p->details != NULL ||
                    (p->details = calloc(MAX_DETAILS, sizeof(*p->details))) != NULL)) {
            char *res = strtok_r(NULL, " ", &save), *cnt = strtok_r(NULL, " ", &save),
                 *mx = strtok_r(NULL, " ", &save), *addr = strtok_r(NULL, " ", &save);
            int rs = res != NULL ? result_parse(res) : -1;
            if (addr == NULL || rs <= 0)
                continue;
            struct detail *x = &p->details[p->ndetails++];
            x->result = (uint8_t)rs;
            x->count = strtoull(cnt, NULL, 10);
            snprintf(x->mx, sizeof(x->mx), "%s", strcmp(mx, "-") == 0 ? "" : mx);
            snprintf(x->addr, sizeof(x->addr), "%s", strcmp(addr, "-") == 0 ? "" : addr);
        }
    }
    fclose(f);
}

/* ---- the report ---- */

static void
day_iso(int64_t day, bool end, char *out, size_t cap)
{
    time_t t = (time_t)(day * 86400 + (end ? 86399 : 0));
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, cap, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* One element of "policies" (RFC 8460 4.4): the policy and its counts. */
static void
pol_json(const struct day *d, const struct rpol *p, struct json *j)
{
    json_obj_begin(j);
    json_key(j, "policy");
    json_obj_begin(j);
    json_kstr(j, "policy-type", pol_names[p->type]);
    const struct mta_sts_policy *sp = p->sts != NULL ? p->sts : &no_sts;
    if (p->type == POL_STS) {
        char line[DNS_NAME_MAX + 16];
        json_key(j, "policy-string");
        json_arr_begin(j);
        json_str(j, "version: STSv1");
        snprintf(line, sizeof(line), "mode: %s", mta_sts_mode_str(sp->mode));
        json_str(j, line);
        for (unsigned i = 0; i < sp->nmx; i++) {
            snprintf(line, sizeof(line), "mx: %s", sp->mx[i]);
            json_str(j, line);
        }
        snprintf(line, sizeof(line), "max_age: %llu", (unsigned long long)sp->max_age);
        json_str(j, line);
        json_arr_end(j);
    } else if (p->type == POL_TLSA) {
        /* RFC 8460 4.2: the TLSA records, one string each */
        json_key(j, "policy-string");
        json_arr_begin(j);
        for (const char *t = p->tlsa; t != NULL && *t != '\0';) {
            const char *nl = strchr(t, '\n');
            size_t n = nl != NULL ? (size_t)(nl - t) : strlen(t);
            char rec[TLSA_TEXT_MAX];
            memcpy(rec, t, n);
            rec[n] = '\0';
            json_str(j, rec);
            t += n + (nl != NULL);
        }
        json_arr_end(j);
    }
    json_kstr(j, "policy-domain", d->domain);
    if (p->type != POL_NONE) {
        json_key(j, "mx-host");
        json_arr_begin(j);
        for (unsigned i = 0; p->type == POL_STS && i < sp->nmx; i++)
            json_str(j, sp->mx[i]);
        if (p->type == POL_TLSA)
            json_str(j, p->mx);
        json_arr_end(j);
    }
    json_obj_end(j);
    json_key(j, "summary");
    json_obj_begin(j);
    json_ku64(j, "total-successful-session-count", p->success);
    json_ku64(j, "total-failure-session-count", p->failure);
    json_obj_end(j);
    json_key(j, "failure-details");
    json_arr_begin(j);
    for (unsigned i = 0; i < p->ndetails; i++) {
        const struct detail *x = &p->details[i];
        if (x->count == 0)
            continue; /* all of it in a report sent before */
        json_obj_begin(j);
        json_kstr(j, "result-type", result_names[x->result]);
        if (x->addr[0])
            json_kstr(j, "receiving-ip", x->addr);
        if (x->mx[0])
            json_kstr(j, "receiving-mx-hostname", x->mx);
        json_ku64(j, "failed-session-count", x->count);
        json_obj_end(j);
    }
    json_arr_end(j);
    json_obj_end(j);
}

/* The JSON of RFC 8460 4.4 for d, into j. */
static void
report_json(struct tlsrpt *r, const struct day *d, const char *report_id, struct json *j)
{
    const struct config *cfg = r->cfg;
    const char *host = cfg->server.hostname;
    char contact[300], start[32], end[32];
    if (cfg->mta_sts.tlsrpt_contact != NULL)
        snprintf(contact, sizeof(contact), "%s", cfg->mta_sts.tlsrpt_contact);
    else
        snprintf(contact, sizeof(contact), "postmaster@%s", host);
    day_iso(d->day, false, start, sizeof(start));
    day_iso(d->day, true, end, sizeof(end));
    json_obj_begin(j);
    json_kstr(j, "organization-name",
              cfg->mta_sts.tlsrpt_org != NULL ? cfg->mta_sts.tlsrpt_org : host);
    json_key(j, "date-range");
    json_obj_begin(j);
    json_kstr(j, "start-datetime", start);
    json_kstr(j, "end-datetime", end);
    json_obj_end(j);
    json_kstr(j, "contact-info", contact);
    json_kstr(j, "report-id", report_id);
    json_key(j, "policies");
    json_arr_begin(j);
    for (unsigned i = 0; i < d->npols; i++)
        if (d->pols[i]->success + d->pols[i]->failure > 0) /* else all in a report sent */
            pol_json(d, d->pols[i], j);
    json_arr_end(j);
    json_obj_end(j);
}

int
tlsrpt_report_json(struct tlsrpt *r, const char *domain, int64_t day, const char *report_id,
                   char **out, size_t *len)
{
    *out = NULL;
    char key[DNS_NAME_MAX + 16];
    snprintf(key, sizeof(key), "%s %lld", domain, (long long)day);
    struct json j;
    json_init(&j);
    pthread_mutex_lock(&r->lock);
    struct hash_node *n = hash_find(&r->days, hash_str_nocase(key), key);
    if (n != NULL)
        report_json(r, (const struct day *)n, report_id, &j);
    pthread_mutex_unlock(&r->lock);
    int rc = n == NULL ? -ENOENT : json_failed(&j) ? -ENOMEM : 0;
    if (rc == 0 && (*out = malloc(j.len + 1)) == NULL)
        rc = -ENOMEM;
    if (rc == 0) {
        memcpy(*out, j.buf, j.len);
        (*out)[j.len] = '\0';
        *len = j.len;
    }
    json_fini(&j);
    return rc;
}

/* gzip (RFC 1952) of in; *out is malloc'd. */
static int
gzip(const char *in, size_t len, char **out, size_t *outlen)
{
    z_stream z;
    memset(&z, 0, sizeof(z));
    if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) !=
        Z_OK)
        return -ENOMEM;
    size_t cap = deflateBound(&z, (uLong)len) + 64;
    char *buf = malloc(cap);
    if (buf == NULL) {
        deflateEnd(&z);
        return -ENOMEM;
    }
    z.next_in = (Bytef *)(uintptr_t)in;
    z.avail_in = (uInt)len;
    z.next_out = (Bytef *)buf;
    z.avail_out = (uInt)cap;
    int rc = deflate(&z, Z_FINISH);
    deflateEnd(&z);
    if (rc != Z_STREAM_END) {
        free(buf);
        return -EIO;
    }
    *out = buf;
    *outlen = cap - z.avail_out;
    return 0;
}

/* ---- the report by mail (RFC 8460 5.3) ---- */

/* One line of printable ASCII, none of the characters in bad. */
static bool
field_ok(const char *s, size_t max, const char *bad)
{
    if (s == NULL || *s == '\0' || strlen(s) > max)
        return false;
    for (const char *c = s; *c != '\0'; c++)
        if (*c < 0x20 || *c > 0x7e || strchr(bad, *c) != NULL)
            return false;
    return true;
}

/* A domain name as it may stand in a header field and a file name. */
static bool
name_ok(const char *s)
{
    if (!field_ok(s, DNS_NAME_MAX, ""))
        return false;
    for (const char *c = s; *c != '\0'; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              *c == '.' || *c == '-' || *c == '_'))
            return false;
    return true;
}

int
tlsrpt_mail_build(const struct tlsrpt_mail_input *in, char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    /* Addresses and ids go between <> or in a quoted file name: none of
     * the characters that would end them early, no spaces. */
    if (in->gz == NULL || in->gzlen == 0 || !field_ok(in->from, QUEUE_MAX_ADDR, " <>\"\\(),;") ||
        !field_ok(in->to, QUEUE_MAX_ADDR, " <>\"\\(),;") ||
        strchr(in->from, '@') == NULL || strchr(in->to, '@') == NULL ||
        !field_ok(in->report_id, 400, " <>\"\\(),;") || strchr(in->report_id, '@') == NULL ||
        !name_ok(in->domain) || !name_ok(in->submitter) || !field_ok(in->org, 200, ""))
        return -EINVAL;
    size_t b64 = 4 * ((in->gzlen + 2) / 3);
    size_t need = b64 + b64 / 76 * 2 + 4096 + 4 * DNS_NAME_MAX + 2 * QUEUE_MAX_ADDR;
    if (need > TLSRPT_MAIL_MAX)
        return -EFBIG;
    char *m = malloc(need);
    if (m == NULL)
        return -ENOMEM;
    char date[64], boundary[96], fname[2 * DNS_NAME_MAX + 64], start[32], end[32];
    time_t now = (time_t)(in->now_ms / 1000);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
    /* The boundary cannot occur in base64 ('=' and '_' pairs never do)
     * nor in the text part, which says nothing with "=_". */
    snprintf(boundary, sizeof(boundary), "=_tlsrpt_%llu_%u_=",
             (unsigned long long)in->now_ms, (unsigned)(in->gzlen * 2654435761u));
    /* RFC 8460 5.3: submitter!policy-domain!begin!end!unique-id.json.gz,
     * the unique id alphanumeric: the report id's first label. */
    char uniq[32];
    size_t k = 0;
    for (const char *c = in->report_id; *c != '\0' && k + 1 < sizeof(uniq); c++)
        if ((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z'))
            uniq[k++] = *c;
        else if (k > 0 && *c == '@')
            break;
    uniq[k] = '\0';
    snprintf(fname, sizeof(fname), "%s!%s!%lld!%lld%s%s.json.gz", in->submitter, in->domain,
             (long long)in->start, (long long)in->end, k > 0 ? "!" : "", uniq);
    day_iso(in->start / 86400, false, start, sizeof(start));
    day_iso(in->end / 86400, true, end, sizeof(end));
    int n = snprintf(m, need,
                     "From: <%s>\r\n"
                     "To: <%s>\r\n"
                     "Date: %s\r\n"
                     "Message-ID: <%s>\r\n"
                     "Subject: Report Domain: %s Submitter: %s Report-ID: <%s>\r\n"
                     "TLS-Report-Domain: %s\r\n"
                     "TLS-Report-Submitter: %s\r\n"
                     "Auto-Submitted: auto-generated\r\n"
                     "MIME-Version: 1.0\r\n"
                     "Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n"
                     "\tboundary=\"%s\"\r\n"
                     "\r\n"
                     "This is a multi-part message in MIME format.\r\n"
                     "\r\n"
                     "--%s\r\n"
                     "Content-Type: text/plain; charset=us-ascii\r\n"
                     "Content-Transfer-Encoding: 7bit\r\n"
                     "\r\n"
                     "This is an aggregate TLS report (RFC 8460) from %s\r\n"
                     "for the policy domain %s, %s to %s.\r\n"
                     "The report is attached as %s.\r\n"
                     "\r\n"
                     "--%s\r\n"
                     "Content-Type: application/tlsrpt+gzip;\r\n"
                     "\tname=\"%s\"\r\n"
                     "Content-Transfer-Encoding: base64\r\n"
                     "Content-Disposition: attachment;\r\n"
                     "\tfilename=\"%s\"\r\n"
                     "\r\n",
                     in->from, in->to, date, in->report_id, in->domain, in->submitter,
                     in->report_id, in->domain, in->submitter, boundary, boundary, in->org,
                     in->domain, start, end, fname, boundary, fname, fname);
    if (n < 0 || (size_t)n >= need) {
        free(m);
        return -EFBIG;
    }
    size_t at = (size_t)n;
    /* 57 octets make one line of 76 base64 characters. */
    for (size_t off = 0; off < in->gzlen; off += 57) {
        size_t chunk = in->gzlen - off < 57 ? in->gzlen - off : 57;
        at += (size_t)EVP_EncodeBlock((unsigned char *)m + at,
                                      (const unsigned char *)in->gz + off, (int)chunk);
        m[at++] = '\r';
        m[at++] = '\n';
    }
    n = snprintf(m + at, need - at, "\r\n--%s--\r\n", boundary);
    if (n < 0 || (size_t)n >= need - at) {
        free(m);
        return -EFBIG;
    }
    *out = m;
    *len = at + (size_t)n;
    return 0;
}

/* The address of a mailto: URI (RFC 6068): up to '?', %XX decoded.
 * Returns false when it is not one address that can be sent to. */
static bool
mailto_addr(const char *uri, char *out, size_t cap)
{
    const char *s = uri + 7, *e = s + strcspn(s, "?");
    size_t k = 0;
    for (; s < e; s++) {
        char c = *s;
        if (c == '%' && e - s >= 3 && isxdigit((unsigned char)s[1]) &&
            isxdigit((unsigned char)s[2])) {
            char hex[3] = {s[1], s[2], '\0'};
            c = (char)strtol(hex, NULL, 16);
            s += 2;
        }
        if (k + 1 >= cap)
            return false;
        out[k++] = c;
    }
    out[k] = '\0';
    const char *at = strrchr(out, '@');
    return at != NULL && at != out && at[1] != '\0' && k <= QUEUE_MAX_ADDR &&
           field_ok(out, QUEUE_MAX_ADDR, " <>\"\\(),;:[]") && strchr(out, '@') == at;
}

/* The From of reports by mail: [mta_sts] tlsrpt_from, else the contact
 * when it is an address, else postmaster@ [server] hostname. */
static void
mail_from(const struct config *cfg, char *out, size_t cap)
{
    const struct mta_sts_config *sc = &cfg->mta_sts;
    if (sc->tlsrpt_from != NULL)
        snprintf(out, cap, "%s", sc->tlsrpt_from);
    else if (sc->tlsrpt_contact != NULL && strchr(sc->tlsrpt_contact, '@') != NULL &&
             strchr(sc->tlsrpt_contact, ' ') == NULL && strchr(sc->tlsrpt_contact, ':') == NULL)
        snprintf(out, cap, "%s", sc->tlsrpt_contact);
    else
        snprintf(out, cap, "postmaster@%s", cfg->server.hostname);
}

/* Mail d's report (d->gz) to the mailto: URI uri. Returns true when the
 * mailer took it (it is in the spool). */
static bool
mail_start(struct tlsrpt *r, struct day *d, const char *uri, const char *report_id)
{
    const struct config *cfg = r->cfg;
    char to[QUEUE_MAX_ADDR + 2], from[QUEUE_MAX_ADDR + 2];
    const char *why = NULL;
    int rc = 0;
    char *text = NULL;
    size_t len = 0;
    mail_from(cfg, from, sizeof(from));
    if (!mailto_addr(uri, to, sizeof(to))) {
        why = "not one address";
    } else {
        const char *at = strrchr(from, '@');
        struct tlsrpt_mail_input in = {
            .from = from,
            .to = to,
            .domain = d->domain,
            .submitter = at != NULL ? at + 1 : cfg->server.hostname,
            .org = cfg->mta_sts.tlsrpt_org != NULL ? cfg->mta_sts.tlsrpt_org
                                                   : cfg->server.hostname,
            .report_id = report_id,
            .start = d->day * 86400,
            .end = d->day * 86400 + 86399,
            .gz = d->gz,
            .gzlen = d->gzlen,
            .now_ms = clock_unix_ms(),
        };
        rc = tlsrpt_mail_build(&in, &text, &len);
        if (rc == -EINVAL)
            why = "the From ([mta_sts] tlsrpt_from) or the report's fields cannot be sent";
        else if (rc == -EFBIG)
            why = "report larger than the bound for mail";
        else if (rc < 0)
            why = "out of memory";
    }
    if (why == NULL) {
        pthread_mutex_lock(&r->mail_lock);
        if (r->mail == NULL)
            why = "mail not ready (starting or stopping)";
        else if ((rc = r->mail(r->mail_arg, from, to, text, len)) < 0)
            why = "the spool did not take it";
        pthread_mutex_unlock(&r->mail_lock);
    }
    free(text);
    if (why != NULL) {
        log_msg(LOG_WARN, "event=tlsrpt_mail_failed domain=%s day=%lld rua=%s reason=\"%s\"%s%s",
                d->domain, (long long)d->day, uri, why, rc < 0 ? " err=" : "",
                rc < 0 ? strerror(-rc) : "");
        return false;
    }
    log_msg(LOG_INFO, "event=tlsrpt_mailed domain=%s day=%lld to=<%s> size=%zu report_id=%s",
            d->domain, (long long)d->day, to, len, report_id);
    return true;
}

/* ---- sending ---- */

static void
day_sent(struct tlsrpt *r, struct day *d)
{
    bool ok = d->posted > 0;
    free(d->gz);
    d->gz = NULL;
    d->st = DAY_IDLE;
    int64_t today = (int64_t)(clock_unix_ms() / DAY_MS);
    pthread_mutex_lock(&r->lock);
    if (ok)
        r->sent++;
    else
        r->failed++;
    bool drop = ok ? !day_reported(d) : today - d->day > GIVE_UP_DAYS;
    if (drop) {
        hash_remove(&r->days, &d->hn);
        r->dirty = true;
    } else if (ok) {
        d->next_try_ms = 0; /* what came in meanwhile: due with the day, or the next flush */
        r->dirty = true;
    } else {
        d->next_try_ms = clock_unix_ms() + RETRY_MS;
    }
    pthread_mutex_unlock(&r->lock);
    log_msg(ok ? LOG_INFO : LOG_WARN, "event=tlsrpt_%s domain=%s day=%lld%s%s",
            ok ? "sent" : "not_sent", d->domain, (long long)d->day,
            ok || !drop ? "" : " reason=", ok || !drop ? "" : "given up");
    if (drop)
        day_free(d);
}

/* libcurl's socket for a report's POST: none for an address no mail may
 * go to ([delivery] allow_networks and deny_networks, as for MX targets
 * and policy fetches). The rua URL is the policy domain's word, from DNS: without
 * this, any domain could have this node POST to its own loopback or
 * link-local services. Checked at connect, on the address curl resolved
 * and is about to use, so no second lookup can answer otherwise. */
static curl_socket_t
post_socket(void *arg, curlsocktype purpose, struct curl_sockaddr *a)
{
    struct day *d = arg;
    const char *kind = NULL;
    if (purpose == CURLSOCKTYPE_IPCXN) {
        pthread_mutex_lock(&d->r->lock);
        kind = netaddr_target_refused(&a->addr, d->r->allow, d->r->nallow, d->r->deny,
                                      d->r->ndeny);
        pthread_mutex_unlock(&d->r->lock);
    }
    if (kind != NULL) {
        char ip[INET6_ADDRSTRLEN + 8];
        netaddr_str(&a->addr, ip, sizeof(ip));
        if (strcmp(kind, NETADDR_DENIED) == 0)
            log_msg(LOG_WARN, "event=tlsrpt_refused domain=%s addr=%s reason=\"%s\"",
                    d->domain, ip, kind);
        else
            log_msg(LOG_WARN,
                    "event=tlsrpt_refused domain=%s addr=%s reason=\"%s address, not in "
                    "[delivery] allow_networks\"",
                    d->domain, ip, kind);
        return CURL_SOCKET_BAD;
    }
    return socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
}

/* The report server's answer: read and dropped. Without a write function
 * libcurl fwrite()s it to stdout: the journal under systemd, or whatever
 * file holds descriptor 1, filled by a server any recipient domain names
 * in its rua, for as long as the POST's timeout lets it send. */
static size_t
post_discard(char *data, size_t size, size_t nmemb, void *arg)
{
    (void)data;
    (void)arg;
    return size * nmemb;
}

static void
post_start(struct tlsrpt *r, struct day *d, const char *url)
{
    if (d->posts == MAX_RUA)
        return;
    CURL *c = curl_easy_init();
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/tlsrpt+gzip");
    if (h != NULL)
        h = curl_slist_append(h, "Expect:");
    if (c == NULL || h == NULL) {
        if (c != NULL)
            curl_easy_cleanup(c);
        curl_slist_free_all(h);
        return;
    }
    unsigned i = 0;
    while (d->easy[i] != NULL)
        i++;
    d->easy[i] = c;
    d->hdrs[i] = h;
    d->posts++;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_PRIVATE, d);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_POST, 1L);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, d->gz);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)d->gzlen);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, post_discard);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)r->cfg->mta_sts.fetch_timeout * 3);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "sluice/" SLUICE_VERSION);
    curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, post_socket);
    /* No proxy from the environment (https_proxy, all_proxy): through one,
     * the address checked above would be the proxy's, not the report's. */
    curl_easy_setopt(c, CURLOPT_PROXY, "");
    curl_easy_setopt(c, CURLOPT_OPENSOCKETDATA, d);
    if (r->cfg->mta_sts.ca_file != NULL)
        curl_easy_setopt(c, CURLOPT_CAINFO, r->cfg->mta_sts.ca_file);
    curl_multi_add_handle(r->multi, c);
}

bool
tlsrpt_owns(struct tlsrpt *r, CURL *easy)
{
    /* The handle's private pointer may be another module's (a policy
     * fetch): only compare it, never read through it, until it is found
     * among the days. */
    void *priv = NULL;
    curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
    bool mine = false;
    pthread_mutex_lock(&r->lock);
    size_t b = 0;
    struct hash_node *cur = NULL;
    for (struct hash_node *n; !mine && (n = hash_next(&r->days, &b, &cur)) != NULL;) {
        const struct day *d = (const struct day *)n;
        if ((const void *)d != priv)
            continue;
        for (unsigned i = 0; i < MAX_RUA; i++)
            mine = mine || d->easy[i] == easy;
    }
    pthread_mutex_unlock(&r->lock);
    return mine;
}

void
tlsrpt_on_done(struct tlsrpt *r, CURL *easy, CURLcode res)
{
    void *priv = NULL;
    curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
    struct day *d = priv;
    long code = 0;
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &code);
    char *url = NULL;
    curl_easy_getinfo(easy, CURLINFO_EFFECTIVE_URL, &url);
    bool ok = res == CURLE_OK && code >= 200 && code < 300;
    log_msg(ok ? LOG_INFO : LOG_WARN, "event=tlsrpt_post domain=%s url=%s status=%ld%s%s",
            d->domain, url ? url : "-", code, ok ? "" : " err=",
            ok ? "" : (res != CURLE_OK ? curl_easy_strerror(res) : "HTTP status"));
    for (unsigned i = 0; i < MAX_RUA; i++)
        if (d->easy[i] == easy) {
            curl_multi_remove_handle(r->multi, easy);
            curl_easy_cleanup(easy);
            curl_slist_free_all(d->hdrs[i]);
            d->easy[i] = NULL;
            d->hdrs[i] = NULL;
            d->posts--;
        }
    d->posted += ok;
    if (d->posts == 0)
        day_sent(r, d);
}

static void
on_rua(void *arg, enum dns_status status, const char *why, const char *const *txt, unsigned n,
       uint32_t ttl)
{
    (void)ttl; /* the report goes out once a day: asked afresh each time */
    struct day *d = arg;
    struct tlsrpt *r = d->r;
    const char *rec = NULL;
    unsigned nrec = 0;
    for (unsigned i = 0; i < n; i++)
        if (strncmp(txt[i], "v=TLSRPTv1", 10) == 0 && (txt[i][10] == ';' || txt[i][10] == ' ')) {
            rec = txt[i];
            nrec++;
        }
    if (nrec > 1) {
        /* RFC 8460 3: "If the number of resulting records is not one,
         * senders MUST assume the recipient domain does not implement
         * TLSRPT." */
        rec = NULL;
        why = "several TLSRPTv1 records";
    }
    if (rec == NULL) {
        log_msg(LOG_INFO, "event=tlsrpt_no_record domain=%s%s%s", d->domain,
                status != DNS_OK || nrec > 1 ? " reason=" : "",
                status != DNS_OK || nrec > 1 ? why : "");
        if (status == DNS_RETRY) { /* a DNS failure: a failed try, tried again */
            d->posted = 0;
            day_sent(r, d);
            return;
        }
        /* Nobody to tell: the day is done, and no report was sent (not
         * counted in reports_sent, no tlsrpt_sent line). */
        d->st = DAY_IDLE;
        pthread_mutex_lock(&r->lock);
        hash_remove(&r->days, &d->hn);
        r->dirty = true;
        pthread_mutex_unlock(&r->lock);
        day_free(d);
        return;
    }
    struct json j;
    json_init(&j);
    char id[2 * DNS_NAME_MAX + 64];
    snprintf(id, sizeof(id), "%lld.%u.%s@%s", (long long)d->day, ++r->seq, d->domain,
             r->cfg->server.hostname);
    pthread_mutex_lock(&r->lock);
    report_json(r, d, id, &j);
    day_mark(d);
    pthread_mutex_unlock(&r->lock);
    int rc = json_failed(&j) ? -ENOMEM : gzip(j.buf, j.len, &d->gz, &d->gzlen);
    json_fini(&j);
    if (rc < 0) {
        day_sent(r, d);
        return;
    }
    d->st = DAY_POST;
    /* rua=uri,uri (RFC 8460 3): each address gets the report, up to
     * MAX_RUA of them; mailto: ones are in the spool when the mailer
     * returns, https: ones posted. */
    /* RFC 8460 3: tlsrpt-record = tlsrpt-version 1*(field-delim
     * tlsrpt-field), field-delim = *WSP ";" *WSP: the rua field is one
     * that begins with "rua=", not a "rua=" inside another field (the
     * extension "xrua=..." is ignored, as unknown fields are). */
    const char *list = "";
    for (const char *f = strchr(rec, ';'); f != NULL; f = strchr(f, ';')) {
        f++;
        f += strspn(f, " \t");
        if (strncmp(f, "rua=", 4) == 0) {
            list = f + 4;
            break;
        }
    }
    /* The list whole, however long (dns_txt_lookup gives every record
     * whole): one cut to a buffer can end in a truncated URI that still
     * parses, and the report goes there (mailto:x@example.co of
     * mailto:x@example.com). NULL (no memory): as no address. */
    char *uris = strndup(list, strcspn(list, ";"));
    char *save = NULL;
    unsigned tried = 0;
    for (char *u = uris != NULL ? strtok_r(uris, ", \t", &save) : NULL; u != NULL;
         u = strtok_r(NULL, ", \t", &save)) {
        bool https = strncasecmp(u, "https://", 8) == 0, mail = strncasecmp(u, "mailto:", 7) == 0;
        if ((https || mail) && tried++ >= MAX_RUA) {
            log_msg(LOG_NOTICE, "event=tlsrpt_rua_skipped domain=%s rua=%s reason=\"%s\"",
                    d->domain, u, "more than 4 addresses");
        } else if (https) {
            post_start(r, d, u);
        } else if (mail) {
            d->posted += mail_start(r, d, u, id);
        } else {
            log_msg(LOG_NOTICE, "event=tlsrpt_rua_skipped domain=%s rua=%s reason=\"%s\"",
                    d->domain, u, "not an https: or mailto: URI");
        }
    }
    free(uris);
    if (d->posts == 0)
        day_sent(r, d);
}

void
tlsrpt_tick(struct tlsrpt *r, struct dns *dns, CURLM *multi, bool flush)
{
    r->multi = multi;
    uint64_t now = clock_unix_ms();
    int64_t today = (int64_t)(now / DAY_MS);
    pthread_mutex_lock(&r->lock);
    bool dirty = r->dirty;
    struct day *due = NULL;
    size_t b = 0;
    struct hash_node *cur = NULL;
    for (struct hash_node *n; (n = hash_next(&r->days, &b, &cur)) != NULL;) {
        struct day *d = (struct day *)n;
        if (d->st == DAY_IDLE && (flush || (d->day < today && now >= d->next_try_ms))) {
            d->next_all = due;
            due = d;
        }
    }
    pthread_mutex_unlock(&r->lock);
    if (dirty && clock_mono_ms() - r->saved_ms >= 1000) {
        r->saved_ms = clock_mono_ms();
        state_save(r);
    }
    for (struct day *d = due; d != NULL;) {
        struct day *next = d->next_all;
        char name[DNS_NAME_MAX + 16];
        snprintf(name, sizeof(name), "_smtp._tls.%s", d->domain);
        d->st = DAY_RUA;
        d->posted = 0;
        if (dns_txt_lookup(dns, name, on_rua, d) < 0)
            on_rua(d, DNS_RETRY, "out of memory", NULL, 0, DNS_TTL_UNKNOWN);
        d = next;
    }
}

int
tlsrpt_new(const struct config *cfg, const char *dir, struct tlsrpt **out, char *err,
           size_t errlen)
{
    struct tlsrpt *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    r->cfg = cfg;
    memcpy(r->allow, cfg->delivery.allow, sizeof(r->allow));
    r->nallow = cfg->delivery.nallow;
    memcpy(r->deny, cfg->delivery.deny, sizeof(r->deny));
    r->ndeny = cfg->delivery.ndeny;
    snprintf(r->dir, sizeof(r->dir), "%s", dir);
    pthread_mutex_init(&r->lock, NULL);
    pthread_mutex_init(&r->mail_lock, NULL);
    hash_init(&r->days, day_eq, 16);
    state_load(r);
    *out = r;
    return 0;
}

struct tlsrpt *
tlsrpt_free(struct tlsrpt *r, CURLM *multi)
{
    if (r == NULL)
        return NULL;
    struct day *all = NULL;
    size_t b = 0;
    struct hash_node *cur = NULL;
    for (struct hash_node *n; (n = hash_next(&r->days, &b, &cur)) != NULL;) {
        struct day *d = (struct day *)n;
        d->next_all = all;
        all = d;
        for (unsigned i = 0; i < MAX_RUA; i++)
            if (d->easy[i] != NULL) {
                curl_multi_remove_handle(multi, d->easy[i]);
                curl_easy_cleanup(d->easy[i]);
                curl_slist_free_all(d->hdrs[i]);
            }
        free(d->gz);
        d->gz = NULL;
        d->st = DAY_IDLE;
    }
    state_save(r);
    while (all != NULL) {
        struct day *next = all->next_all;
        day_free(all);
        all = next;
    }
    hash_fini(&r->days);
    pthread_mutex_destroy(&r->lock);
    pthread_mutex_destroy(&r->mail_lock);
    free(r);
    return NULL;
}
