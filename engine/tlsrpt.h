/*
 * tlsrpt: SMTP TLS reporting (RFC 8460) for the domains sluice delivers
 * to under a policy: MTA-STS (policy type "sts"), or DANE (type "tlsa",
 * one policy per TLSA base domain (the MX host, or the end of its
 * validated CNAME chain), its TLSA records as the policy string; DANE
 * comes first where both apply). Each TLS session with such a domain's
 * MX (and each failed MTA-STS fetch: type "sts", or "no-policy-found"
 * when nothing is cached) is counted per policy domain, policy and UTC
 * day: successes, and failures by result type, MX host and address.
 * Sessions of domains without a policy are not counted (a report is sent
 * only to a domain with a TLSRPT record, and most have none: counting
 * every domain would cost memory for nothing).
 * The counts are kept in tlsrpt.state beside the MTA-STS cache in the
 * spool directory (written whole and renamed, at most once a second), so
 * a restart loses none. Once a day is over (or when the operator asks:
 * `sluicectl tlsrpt flush`), the day's report (the JSON of RFC 8460 4.4,
 * gzipped) goes to every address of the domain's `_smtp._tls` TXT record
 * (rua, at most four): https: ones get an HTTP POST of
 * application/tlsrpt+gzip, mailto: ones a message (RFC 8460 5.3: a
 * multipart/report; report-type="tlsrpt" with the gzipped JSON attached,
 * built by tlsrpt_mail_build) that the engine's mailer commits to the
 * spool and delivers like any message (tlsrpt_set_mailer), but despite
 * TLS failures (RFC 8460 3: stored tls_relaxed, queue.h). A report that
 * no address took is tried again the next hour, for up to three days.
 *
 * Threading: tlsrpt_record and tlsrpt_set_mailer from any thread (under
 * the struct's locks); everything else on the MTA-STS thread
 * (engine/mta_sts.c), which owns the resolver and the curl multi handle
 * the sending uses.
 */
#ifndef SLUICE_ENGINE_TLSRPT_H
#define SLUICE_ENGINE_TLSRPT_H

#include <curl/curl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct config;
struct dns;
struct dns_tlsa;
struct mta_sts_policy;
struct tlsrpt;

/* RFC 8460 4.3: the result types sluice can see, and success. */
enum tlsrpt_result {
    TLSRPT_SUCCESS,
    TLSRPT_STARTTLS_NOT_SUPPORTED,
    TLSRPT_CERTIFICATE_HOST_MISMATCH,
    TLSRPT_CERTIFICATE_EXPIRED,
    TLSRPT_CERTIFICATE_NOT_TRUSTED,
    TLSRPT_VALIDATION_FAILURE,
    TLSRPT_STS_POLICY_FETCH_ERROR,
    TLSRPT_STS_POLICY_INVALID,
    TLSRPT_STS_WEBPKI_INVALID,
    TLSRPT_TLSA_INVALID,   /* DANE: none of the host's TLSA records is usable */
    TLSRPT_DNSSEC_INVALID, /* DANE: the TLSA lookup did not validate (bogus) */
    TLSRPT_RESULT_COUNT
};
/* "starttls-not-supported", ... ("success" for TLSRPT_SUCCESS). */
const char *tlsrpt_result_str(enum tlsrpt_result r);
/* The result type of a failed certificate check, from OpenSSL's words
 * (tls_info.verify_result or the handshake's error). */
enum tlsrpt_result tlsrpt_result_of_verify(const char *why);

/* dir: where tlsrpt.state lives (the spool directory). */
int tlsrpt_new(const struct config *cfg, const char *dir, struct tlsrpt **out, char *err,
               size_t errlen);
/* Transfers in flight leave multi; the state is written. Returns NULL. */
struct tlsrpt *tlsrpt_free(struct tlsrpt *r, CURLM *multi);

/* Count one session (or fetch) of domain under policy p (borrowed; NULL:
 * none was found). mx and addr may be NULL. Any thread. */
void tlsrpt_record(struct tlsrpt *r, const char *domain, const struct mta_sts_policy *p,
                   enum tlsrpt_result res, const char *mx, const char *addr);

/* Count one session of domain with MX host mx under DANE: the TLSA
 * records tlsa[0..n) (borrowed; kept as text once a day, as many whole
 * records as fit in 4 KB) of base, the TLSA base domain (the end of mx's
 * validated CNAME chain when the records are there; NULL: mx). The policy
 * is named by base (its mx-host), a failure row by mx (receiving-mx-
 * hostname: the MX record's name). res is TLSRPT_SUCCESS, a DANE failure
 * (TLSA_INVALID, DNSSEC_INVALID, VALIDATION_FAILURE: no record matched) or
 * STARTTLS_NOT_SUPPORTED. Any thread. */
void tlsrpt_record_tlsa(struct tlsrpt *r, const char *domain, const char *mx,
                        const struct dns_tlsa *tlsa, unsigned n, enum tlsrpt_result res,
                        const char *addr, const char *base);

/* The report JSON (RFC 8460 4.4) of domain's UTC day (days since the
 * epoch) as it stands, with report_id: *out malloc'd, NUL-terminated.
 * Returns 0, -ENOENT (nothing counted) or -ENOMEM. For tests and tools. */
int tlsrpt_report_json(struct tlsrpt *r, const char *domain, int64_t day, const char *report_id,
                       char **out, size_t *len);

/* On the MTA-STS thread, each loop turn: write the state when due; start
 * sending the reports that are due (all of them, today's too, with
 * flush). */
void tlsrpt_tick(struct tlsrpt *r, struct dns *dns, CURLM *multi, bool flush);
/* Is easy one of the report's transfers? Then tlsrpt_on_done takes it. */
bool tlsrpt_owns(struct tlsrpt *r, CURL *easy);
void tlsrpt_on_done(struct tlsrpt *r, CURL *easy, CURLcode res);

/* The engine's mailer: commit one message from `from` to `rcpt` (text:
 * CRLF lines, 7-bit) to the spool and hand it to delivery. Returns 0 once
 * it is durable, or a negative code. Runs on the MTA-STS thread, which it
 * may block for one commit. */
typedef int tlsrpt_mail_fn(void *arg, const char *from, const char *rcpt, const char *text,
                           size_t len);
/* Set (fn NULL: clear) the mailer. Without one, mailto: addresses are
 * skipped (logged). Clearing waits for a send in progress to end, so
 * that after it returns fn is never called again. */
void tlsrpt_set_mailer(struct tlsrpt *r, tlsrpt_mail_fn *fn, void *arg);
/* [delivery] allow_networks and deny_networks of the config in force (a
 * reload's): a report's POST refuses what a delivery would (NULL r:
 * nothing). Any thread. */
struct delivery_config;
void tlsrpt_set_allow(struct tlsrpt *r, const struct delivery_config *dc);

#define TLSRPT_MAIL_MAX (1024 * 1024) /* octets of a report by mail; bigger ones are not mailed */

/* One report by mail. All pointers borrowed for the call. */
struct tlsrpt_mail_input {
    const char *from;       /* header From: an address */
    const char *to;         /* the rua mailto: address */
    const char *domain;     /* the policy domain */
    const char *submitter;  /* the reporting domain (RFC 8460 5.3: a domain name) */
    const char *org;        /* organization-name, for people */
    const char *report_id;  /* "left@right": the Report-ID and the Message-ID */
    int64_t start, end;     /* the report's range, Unix seconds */
    const char *gz;         /* the gzipped JSON report */
    size_t gzlen;
    uint64_t now_ms;        /* Date */
};
/* The message of RFC 8460 5.3: Subject "Report Domain: D Submitter: S
 * Report-ID: <ID>", TLS-Report-Domain and TLS-Report-Submitter fields, a
 * multipart/report; report-type="tlsrpt" of a text/plain part and the
 * report as application/tlsrpt+gzip (base64) named
 * "S!D!start!end!unique.json.gz". Every field is checked to be one line of
 * printable ASCII without the characters that would end it early.
 * Returns 0 with *out (malloc'd, NUL-terminated, *len octets without the
 * NUL), -EINVAL (a field missing or unsafe), -EFBIG (more than
 * TLSRPT_MAIL_MAX octets) or -ENOMEM. */
int tlsrpt_mail_build(const struct tlsrpt_mail_input *in, char **out, size_t *len);

uint64_t tlsrpt_sent(struct tlsrpt *r);
uint64_t tlsrpt_failed(struct tlsrpt *r);

#endif
