/*
 * tlsrpt: SMTP TLS reporting (RFC 8460) for the domains sluice delivers
 * to under an MTA-STS policy. Each TLS session with such a domain's MX
 * (and each failed policy fetch) is counted per policy domain and UTC
 * day: successes, and failures by result type, MX host and address.
 * The counts are kept in tlsrpt.state beside the MTA-STS cache in the
 * spool directory (written whole and renamed, at most once a second), so
 * a restart loses none. Once a day is over (or when the operator asks:
 * `sluicectl tlsrpt flush`), the day's report (the JSON of RFC 8460 4.4,
 * gzipped) goes to the https: addresses of the domain's `_smtp._tls` TXT
 * record (rua) as an HTTP POST of application/tlsrpt+gzip (RFC 8460 5.3).
 * A report that no address took is tried again the next hour, for up to
 * three days. mailto: addresses are logged as not supported yet.
 *
 * Threading: tlsrpt_record from any thread (under the struct's lock);
 * everything else on the MTA-STS thread (engine/mta_sts.c), which owns
 * the resolver and the curl multi handle the sending uses.
 */
#ifndef SLUICE_ENGINE_TLSRPT_H
#define SLUICE_ENGINE_TLSRPT_H

#include <curl/curl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct config;
struct dns;
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

/* On the MTA-STS thread, each loop turn: write the state when due; start
 * sending the reports that are due (all of them, today's too, with
 * flush). */
void tlsrpt_tick(struct tlsrpt *r, struct dns *dns, CURLM *multi, bool flush);
/* Is easy one of the report's transfers? Then tlsrpt_on_done takes it. */
bool tlsrpt_owns(struct tlsrpt *r, CURL *easy);
void tlsrpt_on_done(struct tlsrpt *r, CURL *easy, CURLcode res);

uint64_t tlsrpt_sent(struct tlsrpt *r);
uint64_t tlsrpt_failed(struct tlsrpt *r);

#endif
