/*
 * mta_sts: MTA Strict Transport Security (RFC 8461) for outbound mail.
 * One struct mta_sts per process: a store of policies by recipient
 * domain, shared by the workers under a mutex, and one thread of its own
 * that learns them. The thread asks `_mta-sts.DOMAIN` TXT through its own
 * struct dns (dns/: the same servers and timeouts as the workers'),
 * resolves `mta-sts.DOMAIN` through it too (its A/AAAA records with
 * dns_addr_resolve, not its MX) and refuses an address that
 * [delivery] allow_networks would refuse as a delivery target, then
 * fetches https://mta-sts.DOMAIN/.well-known/mta-sts.txt with libcurl's
 * multi interface (pinned with CURLOPT_RESOLVE to the addresses left, up
 * to 16, which curl tries in turn, so that one that is down fails
 * nothing; the entry is held in a DNS cache of the fetch's own, freed
 * with it, never in the multi handle's, where it would stay for good;
 * the certificate checked against [mta_sts] ca_file or the
 * system store, redirects refused, at most 64 KB, text/plain, within
 * fetch_timeout).
 * No worker ever waits on DNS or HTTP: a worker asks (mta_sts_get) and
 * is told "wait" until the thread has an answer. A domain's first check
 * starts on the worker instead: it asks the TXT record on its own
 * resolver, beside the MX lookup, and hands the answer over
 * (mta_sts_txt_answer); only a domain that has a record costs the thread
 * anything.
 *
 * Policies are kept durably in the spool directory (mta-sts.cache, one
 * line per domain, written whole to a temporary file and renamed), so a
 * restart does not forget an enforce policy (RFC 8461 10.2: that is what
 * defeats a downgrade on first contact). A known domain's TXT record is
 * asked again every `recheck`; a new id fetches the policy again; a failed
 * fetch keeps the cached policy until its max_age ends (RFC 8461 5.1). A
 * check that failed on DNS (a timeout or SERVFAIL, of the TXT record or
 * of mta-sts.DOMAIN's addresses) while no policy is in force is made
 * again after [dns] error_ttl (at least 1 s), not recheck: one timeout
 * does not leave an enforce domain without its policy for an hour. A
 * policy in the last tenth of its max_age that mail used since it was
 * fetched is fetched again before it ends (RFC 8461 3.3), at most 10 a
 * second, so a domain mail goes to never loses its policy to time.
 *
 * TLS reporting (RFC 8460) lives beside it (engine/tlsrpt.h) and uses
 * the same thread for its DNS and HTTPS.
 *
 * Threading: mta_sts_new/mta_sts_free on the main thread; everything else
 * from any thread. Policies are immutable and their count is atomic.
 */
#ifndef SLUICE_ENGINE_MTA_STS_H
#define SLUICE_ENGINE_MTA_STS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/conf.h"
#include "dns/dns.h"

struct config;
struct mta_sts;
struct tlsrpt;

#define MTA_STS_MAX_MX     32          /* mx lines kept per policy */
#define MTA_STS_MAX_BYTES  (64 * 1024) /* RFC 8461 3.2: a policy is small */
#define MTA_STS_MAX_AGE    31557600ULL /* RFC 8461 3.2: a year, in seconds */

struct mta_sts_config {
    char *ca_file;          /* owned; NULL: the system's CA store */
    uint64_t fetch_timeout; /* ms: DNS, connect and transfer of one policy */
    uint64_t recheck;       /* ms: a known domain's TXT record is asked again this often */
    unsigned max_fetches;   /* policy checks in flight at once */
    unsigned fetch_port;    /* 443, or a test's HTTPS port (documented as test-only) */
    bool tlsrpt;            /* TLS reporting on */
    char *tlsrpt_org;       /* owned; organization-name of the reports; NULL: [server] hostname */
    char *tlsrpt_contact;   /* owned; contact-info of the reports; NULL: postmaster@hostname */
    char *tlsrpt_from;      /* owned; From of the reports by mail; NULL: contact */
};
extern const struct conf_key mta_sts_conf_keys[];

enum mta_sts_mode { MTA_STS_NONE, MTA_STS_TESTING, MTA_STS_ENFORCE };
const char *mta_sts_mode_str(enum mta_sts_mode m);

/* A policy as fetched. Immutable once shared; shared by reference. Its
 * mx patterns are in the same allocation, each in the octets it needs: a
 * policy is kept for its max_age (up to a year) whether used or not, so a
 * node that met tens of thousands of policy domains holds that many (about
 * 400 octets each with two patterns, where room for 32 of 255 took 8 KB). */
struct mta_sts_policy {
    _Atomic unsigned refs;
    enum mta_sts_mode mode;
    uint64_t max_age;    /* seconds */
    uint64_t fetched_ms; /* Unix ms */
    uint64_t expires_ms; /* Unix ms: fetched_ms + max_age */
    char id[33];         /* the TXT record's id when it was fetched */
    unsigned nmx;
    const char *mx[MTA_STS_MAX_MX]; /* lowercase: "mx.example.com", "*.example.net"; into pats */
    char pats[];                    /* the nmx patterns, each NUL-terminated */
};

/* A policy being read (a fetched body, the cache file, TLS-RPT's saved
 * state): struct mta_sts_policy's fields with room for any pattern;
 * mta_sts_policy_seal() makes the policy of it. */
struct mta_sts_policy_draft {
    enum mta_sts_mode mode;
    uint64_t max_age, fetched_ms, expires_ms;
    char id[33];
    unsigned nmx;
    char mx[MTA_STS_MAX_MX][DNS_NAME_MAX + 3];
};

/* The policy of d (one reference), in the octets its patterns need; NULL
 * without memory. */
struct mta_sts_policy *mta_sts_policy_seal(const struct mta_sts_policy_draft *d);

struct mta_sts_policy *mta_sts_policy_ref(struct mta_sts_policy *p);
/* Drop one reference (NULL is fine). Returns NULL. */
struct mta_sts_policy *mta_sts_policy_unref(struct mta_sts_policy *p);

/* Parse a policy body (RFC 8461 3.2): version STSv1, mode, max_age, mx
 * lines, in any order; CRLF or LF; unknown keys ignored; of a repeated
 * version, mode or max_age the first stands. Returns 0 with *out (one
 * reference, id and times unset), or -EINVAL with *why (static text). */
int mta_sts_policy_parse(const char *text, size_t len, struct mta_sts_policy **out,
                         const char **why);
/* Parse a TXT record: "v=STSv1; id=..." (RFC 8461 3.1: fields after
 * ";", each id= or an extension name=value). Returns 0 and the id (1..32
 * alphanumerics; of several, the last), -ENOENT when it is not an STSv1
 * record (it does not begin with "v=STSv1" and ";"), -EINVAL when it is
 * one but broken. */
int mta_sts_txt_parse(const char *txt, char id[33]);
/* An mx pattern [s, e): a host name, or "*." and one; normalised into out
 * (cap octets) as mta_sts_match() normalises the MX host. False when it is
 * neither (or does not fit). */
bool mta_sts_mx_pattern(const char *s, const char *e, char *out, size_t cap);
/* Does MX host name mx match one of p's patterns (RFC 8461 4.1: exact, or
 * "*.suffix" for exactly one more leftmost label)? */
bool mta_sts_match(const struct mta_sts_policy *p, const char *mx);

/* Start the thread and load the cache (cache_path: the file; its
 * directory must exist). cfg is borrowed and must outlive m (the engine
 * pins it: config_gen.h). Returns 0, or a negative code with one line in err. */
int mta_sts_new(const struct config *cfg, const char *cache_path, struct mta_sts **out, char *err,
                size_t errlen);
/* Stop the thread (checks in flight are abandoned), write the cache,
 * free. Returns NULL. */
struct mta_sts *mta_sts_free(struct mta_sts *m);

enum mta_sts_answer {
    MTA_STS_READY, /* *out: the policy (a reference) or NULL when the domain has none */
    MTA_STS_WAIT,  /* the first check of the domain runs: ask again shortly */
    MTA_STS_ASK,   /* (can_ask only) the domain's first check is the caller's: it asks
                    * _mta-sts.DOMAIN TXT on its own resolver and hands the answer to
                    * mta_sts_txt_answer(); until then others are told WAIT */
};
/* The policy of domain (normalised, lowercase) now; starts a check when
 * there is none yet or the last one is older than recheck (than [dns]
 * error_ttl, at least 1 s, when it failed on DNS and no policy is in
 * force; than the TTL of its TXT answer, in whole minutes, at least one
 * and at most 63, when that found no policy and none is in force; the
 * check runs on the thread, the mail goes on). With can_ask,
 * a domain never seen is answered ASK rather than queued for the thread:
 * a worker asks the TXT record beside the domain's MX lookup, and a
 * domain without a record (most of a campaign's) never costs the thread
 * a wake-up nor its mail a wait for one. */
enum mta_sts_answer mta_sts_get(struct mta_sts *m, const char *domain, bool can_ask,
                                struct mta_sts_policy **out);
/* The answer to the TXT lookup an ASK asked for (status, why, the
 * records and ttl as dns_txt_fn gives them). No record, a broken one or a DNS
 * failure end the check (no policy; after DNS_RETRY the domain is due
 * again after error_ttl, after no record or a broken one once ttl ran
 * out, when that is sooner than recheck: see mta_sts_get); a record with an id hands the check
 * to the thread, which fetches the policy (WAIT until then). Any thread. */
void mta_sts_txt_answer(struct mta_sts *m, const char *domain, enum dns_status status,
                        const char *why, const char *const *txt, unsigned n, uint32_t ttl);

/* A reload's [delivery] allow_networks and deny_networks: policy fetches
 * and TLS report POSTs refuse what deliveries refuse, under the config in
 * force (its [mta_sts] settings aside, which hold to the end). Any
 * thread. */
struct delivery_config;
void mta_sts_set_allow(struct mta_sts *m, const struct delivery_config *dc);

/* The config m started with (its [mta_sts] settings hold to the end). */
const struct config *mta_sts_config(const struct mta_sts *m);

/* The TLS reporting half, on this thread (NULL when [mta_sts] tlsrpt is
 * off). */
struct tlsrpt *mta_sts_tlsrpt(struct mta_sts *m);
/* Send every finished day's reports now, and with all the today's too
 * (the operator's `sluicectl tlsrpt flush`): the thread does it. */
void mta_sts_tlsrpt_flush(struct mta_sts *m);

struct mta_sts_stats {
    uint64_t domains;     /* domains known now */
    uint64_t entry_bytes; /* the memory they take (mapped for them), table aside */
    uint64_t policies;    /* of them with a policy */
    uint64_t enforce;     /* of them in enforce mode */
    uint64_t checks;      /* TXT checks started */
    uint64_t fetches;     /* policy fetches started */
    uint64_t fetched;     /* policies fetched and valid */
    uint64_t fetch_failed; /* fetches that failed (a cached policy stays) */
    uint64_t refreshed;   /* of fetched: a policy fetched again before its end */
    uint64_t inflight;    /* checks in flight now */
    uint64_t queued;      /* checks waiting for a slot */
    uint64_t reports_sent; /* TLS reports delivered */
    uint64_t reports_failed;
};
void mta_sts_stats(struct mta_sts *m, struct mta_sts_stats *out);

#endif
