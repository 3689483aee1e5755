/*
 * tlsrpt: see tlsrpt.h. A struct day per (policy domain, UTC day) in a
 * hash under r->lock, with the policies counted on it (struct rpol) and
 * their failure rows; the state file (tlsrpt.state: written whole, read
 * at start); the JSON of a day's report (RFC 8460 4.4); start and free.
 * Sending a day (the TXT lookup, the messages to mailto: addresses, the
 * POSTs to https: ones, the retries) is tlsrpt_send.c's; what the two
 * share (struct day, struct tlsrpt, and what the sending calls here) is
 * in tlsrpt_int.h.
 *
 * Threading: r->lock guards the days and the counters; r->mail_lock the
 * mailer (held while it runs, so that clearing it waits); the sending
 * state of a day is the MTA-STS thread's.
 */
#include "engine/tlsrpt.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/fs.h"
#include "common/hash.h"
#include "common/json.h"
#include "common/log.h"
#include "dns/dns.h"
#include "engine/config.h"
#include "engine/mta_sts.h"
#include "engine/tlsrpt_int.h"

#define STATE_FILE    "tlsrpt.state"
#define STATE_MAGIC   "sluice-tlsrpt 2"
#define STATE_MAGIC_1 "sluice-tlsrpt 1" /* one policy a day, still read */
#define MAX_DETAILS   32          /* failure rows per policy */
#define TLSA_TEXT_MAX 4096        /* of a TLSA policy's records: those beyond are left out */

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

struct day *
tlsrpt_day_free(struct day *d)
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
 * report takes away (tlsrpt_day_reported). */
void
tlsrpt_day_mark(struct day *d)
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
 * report held (tlsrpt_day_mark). Sessions counted while it was being
 * sent (a flush sends today's day, still counting) stay for the next
 * report. Returns whether any are left. */
bool
tlsrpt_day_reported(struct day *d)
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

void
tlsrpt_state_save(struct tlsrpt *r)
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

void
tlsrpt_day_iso(int64_t day, bool end, char *out, size_t cap)
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
void
tlsrpt_day_json(struct tlsrpt *r, const struct day *d, const char *report_id, struct json *j)
{
    const struct config *cfg = r->cfg;
    const char *host = cfg->server.hostname;
    char contact[300], start[32], end[32];
    if (cfg->mta_sts.tlsrpt_contact != NULL)
        snprintf(contact, sizeof(contact), "%s", cfg->mta_sts.tlsrpt_contact);
    else
        snprintf(contact, sizeof(contact), "postmaster@%s", host);
    tlsrpt_day_iso(d->day, false, start, sizeof(start));
    tlsrpt_day_iso(d->day, true, end, sizeof(end));
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
        tlsrpt_day_json(r, (const struct day *)n, report_id, &j);
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
    tlsrpt_state_save(r);
    while (all != NULL) {
        struct day *next = all->next_all;
        tlsrpt_day_free(all);
        all = next;
    }
    hash_fini(&r->days);
    pthread_mutex_destroy(&r->lock);
    pthread_mutex_destroy(&r->mail_lock);
    free(r);
    return NULL;
}
