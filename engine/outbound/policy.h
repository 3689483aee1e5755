/*
 * policy: the outbound failure policy, as data in and decisions out (as
 * Postfix's smtp_trouble.c). Every "defer, bounce, expire, next address,
 * hold, back off, fail over" of delivery is taken here from what happened
 * (an SMTP outcome, a DNS status, a connection event) and the few facts it
 * needs (times, counts); the scheduler (scheduler.c, sched_conn.c), the
 * connection (connection.c) and the outcome hand-off (outcome.c) act on
 * the decision.
 * No I/O, no state, no config lookups: unit-tested by
 * tests/unit/test_policy.c.
 *
 * Threading: any; pure.
 */
#ifndef SLUICE_ENGINE_OUTBOUND_POLICY_H
#define SLUICE_ENGINE_OUTBOUND_POLICY_H

#include <stdbool.h>
#include <stdint.h>

#include "common/conf.h"
#include "dns/dns.h"
#include "engine/classify.h"
#include "engine/smtp_client.h"

#define POLICY_EXPIRY_SLACK_MS 50  /* timers and the wall clock disagree by a little */
#define POLICY_HOLD_MIN_MS     1000 /* shortest hold after every MX address failed */
#define POLICY_FAILOVER_MAX    3    /* next-address moves of one job after session failures */
#define POLICY_REUSE_LOST_MAX  2    /* requeues of one job lost on reused connections */

/* ---- one recipient's outcome ---- */

enum policy_rcpt_kind {
    POLICY_DELIVERED,
    POLICY_BOUNCE,  /* permanent */
    POLICY_EXPIRE,  /* temporary, but past its expiry */
    POLICY_DEFER,   /* temporary: again at due_ms */
};

struct policy_rcpt {
    enum policy_rcpt_kind kind;
    uint64_t due_ms;         /* POLICY_DEFER: Unix ms of the next attempt (never past expiry) */
    enum classify_source src; /* what the class comes from (not for delivered) */
    bool backoff;            /* slow the destination down (a rate-limited reply, not a 421) */
};

/* The status of an outcome o at now_ms, for a recipient that expires at
 * expire_ms and waits delay_ms (policy_retry_delay()) when deferred. cls
 * is the class the caller got from classify() for o (BOUNCE_OTHER when
 * not classified); src the source to classify with when o is not a
 * server's reply. A permanent refusal for the server's limit of
 * recipients per transaction (RFC 821's 552, as policy_rcpt_next_txn()
 * knows it) is temporary (RFC 5321 4.5.3.1.10): deferred, or expired. */
void policy_rcpt(const struct smtp_outcome *o, enum bounce_class cls, enum classify_source src,
                 uint64_t now_ms, uint64_t expire_ms, uint64_t delay_ms, struct policy_rcpt *out);

/* Where a failure's class comes from: a reply, or the kind of event. */
enum classify_source policy_source(const struct smtp_outcome *o, enum classify_source fallback);

/* The schedule's delay after attempts deferrals, lengthened by up to
 * jitter_pct percent, never shortened: the schedule is the least wait (as
 * Postfix's minimal_backoff_time), so a receiver that greylists for the
 * first delay (Postgrey: 300 s, the default schedule's 5m) does not
 * refuse the retry for coming early. rnd is a random number. */
uint64_t policy_retry_delay(const struct conf_durations *schedule, unsigned attempts,
                            unsigned jitter_pct, uint64_t rnd);
/* The step of schedule (policy_retry_delay's attempts) for a recipient
 * deferred without a try (its site resting: dest_fail_as_site) after
 * attempts tries, waited_ms after its last outcome: the step after the
 * longest delay it has waited, and never before attempts'. Such a
 * deferral is no attempt, yet the schedule goes on with the time waited,
 * as Postfix's backoff does: at attempts' step it came due at the same
 * delay again and again (an outage rests the site nearly all the time,
 * so nearly every retry was one of these), a transient_failure record
 * each time, for as long as the outage lasted. A delay counts as waited
 * from seven eighths of it (the wait is measured from the last outcome's
 * commit, a little after its due was counted from); a wait shorter than
 * that (a flush) moves nothing. */
unsigned policy_retry_step_untried(const struct conf_durations *schedule, unsigned attempts,
                                   uint64_t waited_ms);

/* When a message's recipients give up: max_age after arrival, or the
 * message's own expiry when sooner (0: none). */
uint64_t policy_expiry(uint64_t arrival_ms, uint64_t max_age_ms, uint64_t own_expire_ms);

/* A job that waits (in the queue, or for its turn on a connection) and
 * expires at expire_ms is past it at now_ms: it is failed as expired
 * (4.4.7), never sent. */
bool policy_expired(uint64_t now_ms, uint64_t expire_ms);

/* A recipient refused for the server's limit of recipients per
 * transaction (452, or RFC 821's 552, with X.5.3, or without an enhanced
 * code saying "too many recipients"; not 452 4.2.2, a full mailbox) in a
 * transaction that delivered to others: it goes in the next transaction
 * at once, not along the retry schedule (RFC 5321 4.5.3.1.10). */
bool policy_rcpt_next_txn(const struct smtp_outcome *o, unsigned delivered);

/* ---- a job whose transaction ended in a session failure ---- */

struct policy_txn {
    const struct smtp_outcome *msg; /* borrowed: the transaction's message outcome */
    unsigned delivered, permfail;  /* recipients so */
    unsigned txns_on_conn;          /* transactions this connection finished, this one included */
    unsigned failovers;             /* times this job was moved already */
    bool have_answer;               /* the destination has MX addresses to move to */
    bool idled;                     /* the connection sat idle since its last transaction
                                     * (or before its first) */
    unsigned reuse_lost;            /* times this job was lost on a reused connection already */
    uint64_t now_ms, expire_ms;
};

/* Give the job to the next MX address (true) rather than report its
 * outcome: a session failure before this connection delivered anything is
 * the server's, not the message's; never after the final dot (the server
 * may have the message), nor after a 421 (the receiver pushes back), and a
 * few times at most. */
bool policy_failover(const struct policy_txn *t);

/* Requeue the job for another connection at once (true) rather than
 * report its outcome or fail over: its transaction was lost on a reused
 * connection (one that finished transactions before, or sat idle) at its
 * first command, RSET or MAIL, with the connection lost (EOF, reset, a
 * failed send, TLS broken after the handshake), or with a 421 after the
 * connection sat idle since its last transaction, or a 421 whose text
 * names a limit of messages per connection or session ("Too many
 * messages on this connection"). That is the receiver closing a
 * connection it thought idle (its own idle timeout, "421 4.4.2 ...
 * timeout", crossing our command) or full, not a verdict on the
 * message or a sign of load: no
 * deferral, and policy_conn_end(reuse_lost) neither holds nor backs off
 * nor shrinks the window (Postfix retries a cached connection that fails
 * so on a new one). Bounded: a fresh connection never qualifies, and a
 * job is requeued so at most POLICY_REUSE_LOST_MAX times (each costs the
 * connection that failed); then its failure is a normal one. A 250 to a
 * pipelined RSET followed by a 421 to MAIL counts too (the machine
 * reports the stage, not the replies heard): bounded all the same. Any
 * other 421 to a connection reused straight after a transaction is no
 * idle close but the receiver's pushback ("421 ... [TSS04]" under load):
 * a normal failure, which holds the destination. The reply goes past
 * the shaping rules either way. */
bool policy_reuse_lost(const struct policy_txn *t);

/* ---- a refusal of one MX host's, decided before MAIL ---- */

/*
 * The rule. Some refusals are the MX host's, not the message's nor the
 * domain's: the client machine decides them from what the host announced
 * in its EHLO, before MAIL, with nothing sent (smtp_client_txn): an 8-bit
 * message (BODY=8BITMIME) to a host without 8BITMIME (5.6.3), a message
 * larger than the host's announced SIZE (5.3.4), a message that needs
 * SMTPUTF8 at a host without it (5.6.7). Another MX host of the domain
 * may well announce what this one lacks (a primary behind an old filter,
 * a backup MX with a smaller SIZE): the message goes there, as Postfix,
 * PowerMTA and KumoMTA operators expect (Postfix would even convert to
 * 7-bit), and bounces only when no MX host of the domain could take it:
 *   - a host refusal by a host that had not refused this job in this
 *     attempt, with MX hosts left that have not (and fewer than
 *     POLICY_HOSTS_REFUSED_MAX refused it): POLICY_HOST_NEXT, the job
 *     goes to the next such host now; no deferral, no attempt counted,
 *     the connection that refused it stays open for the rest of the
 *     destination's mail and its site's other domains (it is no failed
 *     address: the host works, it only lacks what this message needs);
 *   - every MX host the destination may deliver to refused it (or
 *     POLICY_HOSTS_REFUSED_MAX did): POLICY_HOST_REPORT, the bounce,
 *     with the reply of the last host tried;
 *   - the job came back to a host that refused it already, because the
 *     hosts left could not be reached (down, refused the connection,
 *     their slots full for long): POLICY_HOST_DEFER, deferred along the
 *     retry schedule with the refusal made temporary (a host left may
 *     take it later; max_age expires it in the end), never bounced for
 *     a host that was not heard;
 *   - any other outcome: POLICY_HOST_REPORT, as before.
 * A server's own reply to MAIL (552 5.3.4 to MAIL SIZE=, 555 to a
 * parameter) stays the message's: reported as it is, as Postfix does.
 * Recipient-level refusals (a UTF-8 local part beside ASCII recipients
 * that go) are reported as they are. Other host-level refusals before
 * MAIL are session failures and go to the next address already
 * (policy_conn_end: STARTTLS missing or broken under required, verify,
 * MTA-STS or DANE, a refused greeting or EHLO); sluice sends no
 * REQUIRETLS. How the hosts are counted: MX host names (all addresses of
 * a host announce alike), those of the answer that may be delivered to.
 */
#define POLICY_HOSTS_REFUSED_MAX 3 /* hosts one job tries for a host refusal per attempt */

enum policy_host_verdict {
    POLICY_HOST_REPORT, /* report the outcome as it is */
    POLICY_HOST_NEXT,   /* the job goes to another MX host, now */
    POLICY_HOST_DEFER,  /* report it made temporary (policy_host_defer) */
};

struct policy_host {
    const struct smtp_outcome *msg; /* borrowed: the transaction's message outcome */
    unsigned hosts;    /* MX hosts of the destination mail may go to */
    unsigned refused;  /* other hosts that refused this job so in this attempt */
    bool again;        /* this host refused it so before, in this attempt */
};

/* Is o a refusal of the host's, decided before MAIL (the rule above)? */
bool policy_host_refusal(const struct smtp_outcome *o);
enum policy_host_verdict policy_host(const struct policy_host *h);
/* o (a host refusal) made temporary: 4xx, 4.X.X, for POLICY_HOST_DEFER. */
void policy_host_defer(struct smtp_outcome *o);

/* A connection to a host that refused a job so (POLICY_HOST_NEXT) pops
 * it again: pass it over (true), for a connection to another host, while
 * one of those has an address that is not down (elsewhere_up), no
 * address of the destination failed since its last connection came up
 * (addr_failed: the detour's, most likely), and it was passed over fewer
 * than POLICY_HOST_PASS_MAX times while no connection was on its way for
 * it (skips: none to another host opening or open, none ending to make
 * room for one; a connection elsewhere may not come, a [source] cap or an
 * address's slots full). Else it is taken, refused again, and deferred
 * (POLICY_HOST_DEFER). */
#define POLICY_HOST_PASS_MAX 32
bool policy_host_pass(unsigned skips, bool addr_failed, bool elsewhere_up);

/* ---- a connection that ended ---- */

struct policy_conn_end {
    bool connected;       /* TCP connected */
    bool ready_once;      /* the session reached a transaction */
    const struct smtp_outcome *session; /* borrowed: the machine's session outcome, or NULL */
    bool stopping;        /* the worker stops: no decision but release */
    bool tls_fallback;    /* its STARTTLS handshake failed or stalled, and its address
                           * goes in plaintext now (policy_tls_fallback) */
    bool tls_retry_left;  /* a job waits at the destination that has not had its
                           * plaintext retry in this attempt (job.tls_retried) */
    bool idle;            /* the session ended between transactions, no command
                           * outstanding (its outcome's stage SMTP_CLIENT_S_IDLE) */
    bool reuse_lost;      /* its last transaction was lost on reuse and its job
                           * requeued (policy_reuse_lost): the end is no pushback */
    bool going_down;      /* its 421 says the receiver is going down or in
                           * maintenance (classified `other`, not `rate_limited`):
                           * a hold of the destination and its site, not a reason
                           * to halve the domain's rates or the site's window, nor
                           * to rest a pool's source alone */
};

struct policy_conn_decision {
    bool next_addr;       /* this address failed: move the cursor, count a failure */
    bool remember;        /* keep session (made temporary) as the reason for a deferral */
    bool hold;            /* no new connection to the destination for site_hold: a 421
                           * at the greeting or in a transaction (the receiver pushes
                           * back); never a 421 to an idle connection, the receiver's
                           * idle timeout or shutdown, nor one lost on reuse
                           * (policy_reuse_lost): that connection ends, no more */
    bool backoff;         /* and halve its rates */
    bool congested;       /* the site's window comes down (site.h) */
    bool source_hold;     /* a pool's source: it rests at the site on its own
                           * (policy_source_hold) instead of hold, backoff and
                           * next_addr (the address works; the source was refused).
                           * Never for a refused connect: a host that is down
                           * refuses every source alike, the next address is tried */
    bool retry_plain;     /* a plaintext connection to the same address at once for the
                           * jobs that wait (each once per attempt): the address did not
                           * fail, nothing is deferred */
};

void policy_conn_end(const struct policy_conn_end *e, struct policy_conn_decision *out);

/* A transaction ended with the message outcome o: does the site's window
 * come down (a reset, TLS broken after the handshake, a timeout or a 421
 * in the session)? Else it grows. */
bool policy_txn_congested(const struct smtp_outcome *o);

/* Events of a connection that are not the end of its session. */
enum policy_conn_event {
    POLICY_CONNECT_FAILED,   /* the TCP connect was refused or failed */
    POLICY_CONNECT_TIMEOUT,  /* ... or did not finish in connect_timeout */
    POLICY_CLIENT_MISUSE,    /* the client machine refused a call: a bug of ours */
    POLICY_SPOOL_UNREADABLE, /* a job's envelope could not be read (I/O, readers) */
};

struct policy_event_decision {
    bool next_addr;          /* this address failed: move the cursor, count a failure */
    uint64_t rest_ms;        /* no new connection to the destination for this long (0: none) */
};

void policy_conn_event(enum policy_conn_event ev, struct policy_event_decision *out);

/* ---- a destination's answer ---- */

struct policy_fail {
    bool fail;            /* fail every waiting job with what follows */
    bool permanent;
    unsigned code;
    struct smtp_enh enh;  /* 5.1.2 */
    enum classify_source src;
    bool forget_answer;   /* ask DNS again next time */
    const char *text;     /* static: the reply text when the caller has none better */
};

/* What a DNS status means for the jobs of a destination. bad_name: the
 * answer's (dns_mx_result.bad_name): a DNS_FAIL for a name that can
 * exist nowhere (192.0.2.1 without brackets, an all-numeric last label)
 * bounces, as the NXDOMAIN that DNS would answer does; hosts_nx (the
 * answer's): every MX host's name NXDOMAIN, bounced 5.4.4 as Postfix's
 * "Host not found" is; mx_no_host (the answer's): no MX record names a
 * host (MX 10 192.0.2.1), bounced 5.4.4 as Postfix bounces its
 * "numeric domain name in resource data of MX record" (a malformed
 * reply) and Exim without allow_mx_to_ip; other DNS_FAILs (an MX host
 * without an address of the family configured) are deferred. */
void policy_dns(enum dns_status st, bool bad_name, bool hosts_nx, bool mx_no_host,
                struct policy_fail *out);
/* The reply text of policy_dns()'s failure for the answer mx: its why,
 * but a name not found (NXDOMAIN, no MX and no address records) in the
 * words an operator knows from Postfix, with the name asked: "Host or
 * domain name not found. Name service error for name=example.test
 * type=MX: Host not found (NXDOMAIN)", written to buf (cap octets);
 * NULL for a null MX (policy_dns's own text). */
const char *policy_dns_text(const struct dns_mx_result *mx, char *buf, size_t cap);

/* A destination's MX answer expired while its connections are open: it
 * is asked again in the background (scheduler.c dest_mx_refresh), its
 * mail going on over the old answer meanwhile. A refresh that comes back
 * as what policy_dns() defers (SERVFAIL, timeout: a lookup that failed,
 * not an answer; and DNS_FAIL, no MX host with an address, which it
 * defers alike) keeps the old answer, RFC 8767's serve-stale, and asks
 * again after POLICY_MX_REFRESH_RETRY_MS, not at every run of a busy
 * destination; for at most POLICY_MX_STALE_MAX_MS past the old answer's
 * expiry (RFC 8767 4 suggests 1 to 3 days), after which the failure is
 * taken as a fresh lookup's (deferral). Any other status (a new list of
 * hosts, NXDOMAIN, null MX) is the domain's answer now, as a fresh
 * lookup's. stale_ms: how long ago the old answer expired. */
#define POLICY_MX_REFRESH_RETRY_MS 60000
#define POLICY_MX_STALE_MAX_MS     (86400ULL * 1000)
bool policy_mx_refresh_keeps(enum dns_status st, uint64_t stale_ms);

/* Jobs that fail as a whole, without a session. */
enum policy_job_event {
    POLICY_NO_RESOLVER,       /* this worker has no resolver */
    POLICY_NO_TARGET,         /* every address is one mail must not go to */
    POLICY_NO_TARGET_SELF,    /* ... and one is this node's own listener: a loop */
    POLICY_NO_TARGET_PARTIAL, /* every address of an answer that misses MX hosts whose
                               * lookups failed for now (dns_mx_result.partial) */
    POLICY_NO_MX_ANSWERED,    /* every address failed in a row, and none said why */
    POLICY_OPERATOR_BOUNCE,   /* sluicectl bounce */
    POLICY_TLS_POLICY_NO_MX,  /* MTA-STS enforce: no MX host matches the policy */
    POLICY_OPEN_FAILED,       /* no connection could be opened, for a reason of this
                               * node (policy_open_failed); the caller's text says which */
    POLICY_BAD_IDN,           /* the domain is UTF-8 but no valid IDN: it has no A-labels
                               * to look up (job_new kept it as received) */
};

void policy_job(enum policy_job_event ev, struct policy_fail *out);

/* No connection could be opened (before any connect) for err, a -errno
 * of this node's (struct open_fail): true for a failure that lasts: no
 * socket (EMFILE), a source address that cannot be bound (not on this
 * host: EADDRNOTAVAIL), a pool's source of the other family. As when
 * every address failed: the jobs that wait are deferred
 * (POLICY_OPEN_FAILED, connection_failure, the retry schedule: max_age
 * bounces them in the end) and the destination rests
 * policy_all_failed_hold(); its other addresses are not tried, each
 * would fail alike from this node and source, nor does its site rest,
 * its hosts did nothing. It was tried again every second before, its
 * mail never deferred nor expired, an error logged each time. False for
 * no memory (-ENOMEM, or 0: none said): tried again after
 * POLICY_HOLD_MIN_MS, as every
 * "no memory now" of the scheduler; a moment's shortage says nothing of
 * the destination or the source, and a deferral would cost its mail
 * the retry schedule's first delay for nothing. */
bool policy_open_failed(int err);

/* Every address of the answer failed in a row: how long the destination
 * rests (its waiting jobs are deferred with the last failure). */
uint64_t policy_all_failed_hold(uint64_t site_hold_ms);
/* ... and whether its site rests with it, when the last failure was o
 * (NULL: none said why): every domain of the site would meet the same
 * hosts refusing, timing out or closing (KumoMTA's and PowerMTA's queues
 * per site back off together), so that a host that is down for a
 * provider's thousands of domains is not tried by each of them in turn.
 * Not for a TLS failure, which may be the domain's own policy (MTA-STS,
 * DANE, required) and not the host's. */
bool policy_site_failure(const struct smtp_outcome *o);

/* A source of a pool that a receiver throttled or refused (a 421, a
 * rate-limited reply, a refused or reset connection) rests at that site
 * on its own while the pool's other sources carry on: site_hold for the
 * first hold, doubled for each further one in a row, at most 8 times
 * site_hold, never under POLICY_HOLD_MIN_MS. holds: this one included. */
uint64_t policy_source_hold(uint64_t site_hold_ms, unsigned holds);

/* Greylisting (Postgrey's "Greylisted", milter-greylist's "Greylisting
 * in action", ...): a 4xx reply other than 421 whose text says greylist
 * or graylist (with or without a hyphen: the classifier's built-in rule,
 * engine/classify.c, which counts it as class other). The receiver
 * accepts the retry of the same sender and recipient only from the
 * address (or network) it saw first, so the retry should leave from the
 * same source: for POLICY_GREYLIST_STICK_MS after the last such reply,
 * the destination's new connections go from the source that met it, and
 * its connections from other sources end after their transaction, while
 * that source may go (dest_source, source_may_send). */
bool policy_greylisted(const struct smtp_outcome *o);
#define POLICY_GREYLIST_STICK_MS (60 * 60 * 1000)

/* How long an MX address whose STARTTLS handshake failed is delivered to
 * in plaintext when the TLS policy is opportunistic. */
#define POLICY_TLS_FALLBACK_MS (60 * 60 * 1000)

/* A STARTTLS handshake failed (or stalled past starttls_timeout) on a
 * connection opened under TLS policy tls_pol (enum domain_tls), dane: the
 * MX host has validated TLSA records. True: that address goes in
 * plaintext, at once and for POLICY_TLS_FALLBACK_MS: policy_conn_end()
 * then retries the jobs that wait on a plaintext connection to it in the
 * same attempt (retry_plain), once per job, instead of counting a failed
 * address and deferring them until their next retry. Only opportunistic
 * TLS, which takes plaintext from a server without STARTTLS anyway
 * (Postfix's "may" level retries in plaintext at once likewise, or mail
 * to a server with broken TLS would wait until it expires); never
 * required, verify, MTA-STS enforce or DANE. */
bool policy_tls_fallback(int tls_pol, bool dane);

#endif
