/*
 * txt: TXT lookups (RFC 1035 3.3.14) on the resolver's channel, for the
 * policy records of MTA-STS (_mta-sts.DOMAIN) and TLS reporting
 * (_smtp._tls.DOMAIN). Not cached here: their callers keep what they
 * learn for as long as the policy says. Each record's character-strings
 * are joined into one string, as RFC 7208 3.3 and RFC 8461 3.1 read them.
 *
 * Threading: the owner thread of the struct dns, like the rest of it.
 */
#include <ares.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dns/internal.h"

#define TXT_MAX_RECORDS 16
#define TXT_MAX_LEN     4096

struct txt_query {
    struct dns *d; /* borrowed */
    dns_txt_fn *cb;
    void *arg;
};

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
    char *txt[TXT_MAX_RECORDS];
    unsigned n = 0;
    enum dns_status st = DNS_RETRY;
    const char *why = "resolver error";
    if (status == ARES_ENOTFOUND) {
        st = DNS_NOT_FOUND;
        why = "NXDOMAIN";
    } else if (status == ARES_ENODATA) {
        st = DNS_NOT_FOUND;
        why = "no TXT record";
    } else if (status == ARES_ETIMEOUT) {
        why = "timeout";
    } else if (status == ARES_SUCCESS && abuf != NULL) {
        struct ares_txt_ext *head = NULL;
        int prc = ares_parse_txt_reply_ext(abuf, alen, &head);
        if (prc == ARES_ENODATA) {
            st = DNS_NOT_FOUND;
            why = "no TXT record";
        } else if (prc != ARES_SUCCESS) {
            why = "malformed answer";
        } else {
            st = DNS_OK;
            why = "ok";
            size_t len = 0;
            for (struct ares_txt_ext *t = head; t != NULL; t = t->next) {
                if (t->record_start) {
                    if (n == TXT_MAX_RECORDS)
                        break;
                    txt[n] = calloc(1, TXT_MAX_LEN + 1);
                    if (txt[n] == NULL) {
                        st = DNS_RETRY;
                        why = "out of memory";
                        break;
                    }
                    n++;
                    len = 0;
                }
                if (n == 0)
                    continue;
                size_t k = t->length;
                if (k > TXT_MAX_LEN - len)
                    k = TXT_MAX_LEN - len;
                memcpy(txt[n - 1] + len, t->txt, k);
                len += k;
            }
            ares_free_data(head);
            if (st == DNS_OK && n == 0) {
                st = DNS_NOT_FOUND;
                why = "no TXT record";
            }
        }
    }
    if (st != DNS_OK) {
        d->stats.failures += st == DNS_RETRY;
        for (unsigned i = 0; i < n; i++)
            free(txt[i]);
        n = 0;
    }
    q->cb(q->arg, st, why, (const char *const *)txt, n);
    for (unsigned i = 0; i < n; i++)
        free(txt[i]);
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
    d->stats.queries++;
    d->deadline_dirty = true;
    ares_query(d->channel, norm, 1 /* IN */, 16 /* TXT */, on_txt, q);
    return 0;
}
