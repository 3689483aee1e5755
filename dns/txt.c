/*
 * txt: TXT lookups (RFC 1035 3.3.14) on the resolver's channel, for the
 * policy records of MTA-STS (_mta-sts.DOMAIN) and TLS reporting
 * (_smtp._tls.DOMAIN). Not cached here: their callers keep what they
 * learn for as long as the policy says, or the answer's TTL (handed over
 * with it: the records', or a not-found answer's SOA's, RFC 2308 5).
 * Each record's character-strings are joined into one string, as RFC 7208 3.3 and RFC 8461 3.1 read them.
 * Every record of the answer is handed over, however many and however
 * long (the room is sized from the answer, which bounds both): "exactly
 * one v=STSv1 record" (RFC 8461 3.1) and "exactly one v=TLSRPTv1 record"
 * (RFC 8460 3) are judged on the whole answer, never on its first few
 * records; an answer of more records than wire.h reads (WIRE_MAX_RR) is
 * DNS_FAIL, not judged on the part read. A record with a NUL octet is
 * left out whole, never cut (a NUL would cut "v=STSv1; id=1\0junk" to a
 * policy record).
 * Answers are read by wire.h, as MX answers are: the CNAME chain from the
 * name asked, and the TXT records (class IN) where it ends, no others
 * (c-ares's TXT parser took every TXT record of the answer section,
 * whatever its owner or class).
 *
 * Threading: the owner thread of the struct dns, like the rest of it.
 */
#include <ares.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dns/internal.h"

struct txt_query {
    struct dns *d; /* borrowed */
    dns_txt_fn *cb;
    void *arg;
    char name[DNS_NAME_MAX + 1]; /* normalised: what the answer must be about */
};

/* How long a not-found answer (read by wire_answer into a) holds, in s:
 * the negative TTL of its SOA (RFC 2308 5), no longer than the CNAME
 * chain to the name without records; without an SOA, not known (RFC
 * 2308 5: such an answer should not be kept at all; the caller keeps its
 * own rule). */
static uint32_t
negative_ttl(const struct wire_answer *a)
{
    if (!a->soa)
        return DNS_TTL_UNKNOWN;
    return a->neg_ttl < a->ttl ? a->neg_ttl : a->ttl;
}

/* The same for a not-found answer c-ares judged itself (NXDOMAIN, or
 * NOERROR without answer records), read here for its SOA; *referral: it
 * is a referral (wire.h), no answer. */
static uint32_t
negative_ttl_of(const unsigned char *abuf, size_t len, const char *name, bool *referral)
{
    struct wire_answer a; /* big: on the stack, as in on_txt */
    uint32_t ttl = DNS_TTL_UNKNOWN;
    *referral = false;
    if (wire_answer(abuf, len, name, WIRE_T_TXT, &a) == 0 && !a.chain_bad) {
        ttl = negative_ttl(&a);
        *referral = a.referral;
    }
    return ttl;
}

static const char referral_why[] = "referral, not an answer (the DNS server does not recurse)";

static void
on_txt(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    struct txt_query *q = arg;
    struct dns *d = q->d;
    d->stats.timeouts += (unsigned)timeouts;
    d->deadline_dirty = true;
    if (d->destroying || status == ARES_EDESTRUCTION || status == ARES_ECANCELLED) {
        free(q); /* dropped without a call, as dns_free() says */
        return;
    }
    const char **txt = NULL; /* owned: the records, pointing into buf */
    char *buf = NULL;        /* owned: the records' text */
    unsigned n = 0;
    uint32_t ttl = DNS_TTL_UNKNOWN;
    enum dns_status st = DNS_RETRY;
    const char *why = dns_ares_why(status); /* SERVFAIL, timeout, REFUSED, ... */
    if (status == ARES_ENOTFOUND || status == ARES_ENODATA) {
        st = DNS_NOT_FOUND;
        why = status == ARES_ENOTFOUND ? "NXDOMAIN" : "no TXT record";
        /* c-ares hands over the answer with these: its SOA, if any, says
         * how long the "no" holds (RFC 2308 5). */
        bool referral = false;
        if (abuf != NULL && alen > 0)
            ttl = negative_ttl_of(abuf, (size_t)alen, q->name, &referral);
        if (referral) {
            st = DNS_RETRY;
            why = referral_why;
        }
    } else if (status == ARES_SUCCESS && abuf != NULL && alen > 0) {
        /* Big (the MX targets, some 17 KB): on the stack of this callback
         * only, as lookup.c's on_answer has it. A malloc of its size is a
         * large request, which first merges every free small chunk
         * (glibc's malloc_consolidate): on each new domain's MTA-STS TXT
         * answer. */
        struct wire_answer a_mem, *a = &a_mem;
        /* Room for every record: the answer's size bounds their text
         * and their count (wire_txt), 64 KB and 5958 at most. */
        size_t len = (size_t)alen;
        unsigned max = (unsigned)WIRE_TXT_MAX(len);
        buf = malloc(len);
        txt = malloc(max * sizeof(*txt));
        int rc = buf == NULL || txt == NULL
                     ? -ENOMEM
                     : wire_answer(abuf, len, q->name, WIRE_T_TXT, a);
        if (rc == 0 && a->chain_bad)
            rc = -ELOOP;
        if (rc == 0 && a->rcode == WIRE_NXDOMAIN)
            rc = -ENOENT;
        bool referral = rc == 0 && a->referral;
        uint32_t rec_ttl = UINT32_MAX;
        if (rc == 0)
            rc = wire_txt(abuf, len, a->final, buf, len, txt, max, &rec_ttl);
        if (rc > 0)
            ttl = a->ttl < rec_ttl ? a->ttl : rec_ttl; /* the chain's and the records' */
        else if (rc == 0 || rc == -ENOENT)
            ttl = negative_ttl(a);
        if (rc > 0) {
            st = DNS_OK;
            why = "ok";
            n = (unsigned)rc;
        } else if (rc == 0 && referral) {
            why = referral_why; /* DNS_RETRY */
        } else if (rc == 0 || rc == -ENOENT) {
            st = DNS_NOT_FOUND;
            why = rc == 0 ? "no TXT record" : "NXDOMAIN";
        } else if (rc == -E2BIG) {
            st = DNS_FAIL; /* what the records say cannot be known: no answer */
            why = "more records than are read (512)";
        } else {
            why = rc == -ENOMEM  ? "out of memory"
                  : rc == -ELOOP ? "CNAME chain too long or to a bad name"
                                 : "malformed answer";
        }
    }
    if (st != DNS_OK) {
        d->stats.failures += st == DNS_RETRY;
        n = 0;
        if (st != DNS_NOT_FOUND)
            ttl = DNS_TTL_UNKNOWN;
    }
    q->cb(q->arg, st, why, txt, n, ttl);
    free(txt);
    free(buf);
    free(q);
}

int
dns_txt_lookup(struct dns *d, const char *name, dns_txt_fn *cb, void *arg)
{
    char norm[DNS_NAME_MAX + 1];
    if (dns_name_normalize(name, norm) < 0)
        return -EINVAL;
    struct txt_query *q = calloc(1, sizeof(*q));
    if (q == NULL)
        return -ENOMEM;
    q->d = d;
    q->cb = cb;
    q->arg = arg;
    memcpy(q->name, norm, sizeof(norm));
    d->stats.queries++;
    d->deadline_dirty = true;
    ares_query(d->channel, norm, 1 /* IN */, 16 /* TXT */, on_txt, q);
    return 0;
}
