/*
 * tlsrpt_send: sending a day's report (see tlsrpt.h), on the MTA-STS
 * thread. A day due (over, or flushed) walks through RUA (the TXT lookup
 * of _smtp._tls, then a message to each mailto: address, handed to the
 * mailer there and then: tlsrpt_mail_build makes it, RFC 8460 5.3) ->
 * POST (one transfer per https: address, never connected to an address
 * [delivery] allow_networks refuses) -> gone, or back to idle to be tried
 * again (the next hour, for up to GIVE_UP_DAYS). What a report holds and
 * the days themselves are tlsrpt.c's (tlsrpt_int.h).
 *
 * Threading: the MTA-STS thread (tlsrpt_tick, tlsrpt_owns,
 * tlsrpt_on_done); r->lock is taken for the days, r->mail_lock for the
 * mailer. tlsrpt_mail_build is pure.
 */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <openssl/evp.h>
#include <zlib.h>

#include "common/clock.h"
#include "common/hash.h"
#include "common/json.h"
#include "common/log.h"
#include "dns/dns.h"
#include "engine/config.h"
#include "engine/netaddr.h"
#include "engine/tlsrpt.h"
#include "engine/tlsrpt_int.h"
#include "queue/queue.h"

#define RETRY_MS      3600000ULL  /* a report no address took */
#define GIVE_UP_DAYS  3

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
    tlsrpt_day_iso(in->start / 86400, false, start, sizeof(start));
    tlsrpt_day_iso(in->end / 86400, true, end, sizeof(end));
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
    bool drop = ok ? !tlsrpt_day_reported(d) : today - d->day > GIVE_UP_DAYS;
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
        tlsrpt_day_free(d);
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
        tlsrpt_day_free(d);
        return;
    }
    struct json j;
    json_init(&j);
    char id[2 * DNS_NAME_MAX + 64];
    snprintf(id, sizeof(id), "%lld.%u.%s@%s", (long long)d->day, ++r->seq, d->domain,
             r->cfg->server.hostname);
    pthread_mutex_lock(&r->lock);
    tlsrpt_day_json(r, d, id, &j);
    tlsrpt_day_mark(d);
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
        tlsrpt_state_save(r);
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
