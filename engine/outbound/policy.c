/*
 * policy: see policy.h.
 */
#include "engine/outbound/policy.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "engine/config.h"

enum classify_source
policy_source(const struct smtp_outcome *o, enum classify_source fallback)
{
    switch (o->reason) {
    case SMTP_REASON_REPLY:
    case SMTP_REASON_SIZE:
    case SMTP_REASON_ADDRESS:
    case SMTP_REASON_NEED_8BITMIME:
    case SMTP_REASON_NEED_SMTPUTF8:
    case SMTP_REASON_RCPT_LIMIT:
    case SMTP_REASON_NO_RCPT:
        return CLASSIFY_REPLY;
    case SMTP_REASON_TIMEOUT:
    case SMTP_REASON_EOF:
    case SMTP_REASON_QUIT:
    case SMTP_REASON_CONNECT_REFUSED:
    case SMTP_REASON_CONNECT_TIMEOUT:
    case SMTP_REASON_CONNECT_FAILED:
        return CLASSIFY_CONNECT;
    case SMTP_REASON_PROTOCOL:
        return CLASSIFY_PROTOCOL;
    case SMTP_REASON_TLS_UNAVAILABLE:
    case SMTP_REASON_TLS_REFUSED:
    case SMTP_REASON_TLS_FAILED:
    case SMTP_REASON_TLS_UNVERIFIED:
    case SMTP_REASON_TLS:
        return CLASSIFY_TLS;
    default:
        return o->code != 0 && fallback == CLASSIFY_REPLY ? CLASSIFY_REPLY : fallback;
    }
}

/* A refusal for the server's limit of recipients per transaction: 452,
 * or RFC 821's 552, with X.5.3, or without an enhanced code saying "too
 * many recipients". */
static bool
rcpt_limit(const struct smtp_outcome *o)
{
    if (o->code != 452 && o->code != 552)
        return false;
    if (o->enh.subject == 5 && o->enh.detail == 3)
        return true;
    return o->enh.subject == 0 && o->enh.detail == 0 &&
           strcasestr(o->text, "too many recipients") != NULL;
}

void
policy_rcpt(const struct smtp_outcome *o, enum bounce_class cls, enum classify_source src,
            uint64_t now_ms, uint64_t expire_ms, uint64_t delay_ms, struct policy_rcpt *out)
{
    memset(out, 0, sizeof(*out));
    out->src = policy_source(o, src);
    if (o->status == SMTP_STATUS_DELIVERED) {
        out->kind = POLICY_DELIVERED;
    } else if (o->status == SMTP_STATUS_PERMFAIL && !rcpt_limit(o)) {
        /* (RFC 821's 552 for too many recipients is temporary: RFC 5321
         * 4.5.3.1.10) */
        out->kind = POLICY_BOUNCE;
    } else if (now_ms + POLICY_EXPIRY_SLACK_MS >= expire_ms) {
        out->kind = POLICY_EXPIRE;
        out->src = CLASSIFY_EXPIRED;
    } else {
        uint64_t due = now_ms + delay_ms;
        out->kind = POLICY_DEFER;
        out->due_ms = due < expire_ms ? due : expire_ms;
        /* A 421 holds the whole destination already (policy_conn_end).
         * Limits of one mailbox (X.2.X, RFC 3463's mailbox status: Gmail's
         * "450 4.2.1 the user is receiving mail at a rate...") or of the
         * recipients of one transaction (452 X.5.3, whose rest goes in the
         * next) say nothing of the domain's load: its rates stay (one busy
         * mailbox halved a whole domain's, gmail.com's, again and again). */
        out->backoff = cls == BOUNCE_RATE_LIMITED && o->code != 421 && !rcpt_limit(o) &&
                       o->enh.subject != 2;
    }
}

uint64_t
policy_retry_delay(const struct conf_durations *s, unsigned attempts, unsigned pct, uint64_t rnd)
{
    if (s->n == 0)
        return 0;
    unsigned i = attempts < s->n ? attempts : s->n - 1;
    uint64_t ms = s->ms[i];
    if (pct == 0 || ms == 0)
        return ms;
    uint64_t span = ms * pct / 100; /* at most half the delay */
    return ms + rnd % (span + 1);
}

unsigned
policy_retry_step_untried(const struct conf_durations *s, unsigned attempts, uint64_t waited_ms)
{
    unsigned step = attempts;
    /* A delay counts as waited from seven eighths of it: the wait is
     * measured from the last outcome's commit, which came after the time
     * its due was counted from, so a wait of exactly the delay reads a
     * few ms short (under load, every time: the step never moved) */
    for (unsigned k = 0; k < s->n; k++)
        if (s->ms[k] - s->ms[k] / 8 <= waited_ms && k + 1 > step)
            step = k + 1; /* policy_retry_delay keeps to the last */
    return step;
}

uint64_t
policy_expiry(uint64_t arrival_ms, uint64_t max_age_ms, uint64_t own_expire_ms)
{
    uint64_t e = arrival_ms + max_age_ms;
    return own_expire_ms != 0 && own_expire_ms < e ? own_expire_ms : e;
}

bool
policy_expired(uint64_t now_ms, uint64_t expire_ms)
{
    return now_ms + POLICY_EXPIRY_SLACK_MS >= expire_ms;
}

bool
policy_rcpt_next_txn(const struct smtp_outcome *o, unsigned delivered)
{
    return delivered != 0 && rcpt_limit(o);
}

bool
policy_failover(const struct policy_txn *t)
{
    const struct smtp_outcome *m = t->msg;
    return m->scope == SMTP_SCOPE_SESSION && t->delivered == 0 && t->permfail == 0 &&
           t->txns_on_conn == 1 && t->have_answer && m->code != 421 &&
           m->stage != SMTP_CLIENT_S_DOT && t->failovers < POLICY_FAILOVER_MAX &&
           t->now_ms + POLICY_EXPIRY_SLACK_MS < t->expire_ms;
}

bool
policy_host_refusal(const struct smtp_outcome *o)
{
    return o->scope == SMTP_SCOPE_MESSAGE && o->status == SMTP_STATUS_PERMFAIL &&
           o->stage == SMTP_CLIENT_S_MAIL &&
           (o->reason == SMTP_REASON_NEED_8BITMIME || o->reason == SMTP_REASON_SIZE ||
            o->reason == SMTP_REASON_NEED_SMTPUTF8);
}

enum policy_host_verdict
policy_host(const struct policy_host *h)
{
    if (!policy_host_refusal(h->msg))
        return POLICY_HOST_REPORT;
    if (h->again)
        return POLICY_HOST_DEFER; /* the hosts left were not heard: not theirs to bounce */
    unsigned refused = h->refused + 1; /* this one too */
    if (refused < h->hosts && refused < POLICY_HOSTS_REFUSED_MAX)
        return POLICY_HOST_NEXT;
    return POLICY_HOST_REPORT;
}

bool
policy_host_pass(unsigned skips, bool addr_failed, bool elsewhere_up)
{
    return skips < POLICY_HOST_PASS_MAX && !addr_failed && elsewhere_up;
}

void
policy_host_defer(struct smtp_outcome *o)
{
    if (o->status != SMTP_STATUS_PERMFAIL)
        return;
    o->status = SMTP_STATUS_TEMPFAIL;
    if (o->code >= 500 && o->code <= 599)
        o->code = (uint16_t)(o->code - 100);
    o->enh.cls = 4;
}

/* Does a reply's text name a limit of messages per connection or
 * session ("Too many messages on this connection", Exim's
 * smtp_accept_max_per_connection, "Per-connection message limit
 * reached")? A limit word, messages (or transactions), and the
 * connection or session as the scope, all three: "too many
 * connections", "maximum number of concurrent connections" (a cap on
 * connections at once: load), "too many errors on this connection" and
 * "closing this connection" (no limit of messages) are not. */
static bool
per_connection_limit(const char *text)
{
    static const char *const limit[] = {"too many", "maximum", "max ", "limit", "exceed"};
    static const char *const noun[] = {"messag", "transaction"};
    static const char *const scope[] = {"this", "per", "one", "each", "same", "single", "current"};
    static const char *const join[] = {" ", "-", " smtp "};
    bool said = false, msgs = false;
    for (size_t i = 0; i < sizeof(limit) / sizeof(limit[0]) && !said; i++)
        said = strcasestr(text, limit[i]) != NULL;
    for (size_t i = 0; i < sizeof(noun) / sizeof(noun[0]) && !msgs; i++)
        msgs = strcasestr(text, noun[i]) != NULL;
    if (!said || !msgs)
        return false;
    if (strcasestr(text, "connection messag") != NULL || strcasestr(text, "session messag") != NULL)
        return true;
    char w[40];
    for (size_t i = 0; i < sizeof(scope) / sizeof(scope[0]); i++) {
        for (size_t k = 0; k < sizeof(join) / sizeof(join[0]); k++) {
            snprintf(w, sizeof(w), "%s%sconnection", scope[i], join[k]);
            if (strcasestr(text, w) != NULL)
                return true;
            snprintf(w, sizeof(w), "%s%ssession", scope[i], join[k]);
            if (strcasestr(text, w) != NULL)
                return true;
        }
    }
    return false;
}

bool
policy_reuse_lost(const struct policy_txn *t)
{
    const struct smtp_outcome *m = t->msg;
    /* A 421 after the connection sat idle (the receiver's idle close), or
     * one naming its limit of messages per connection; not any other
     * right after a transaction: that is the receiver pushing back
     * ("421 ... [TSS04]"). */
    bool lost = (m->reason == SMTP_REASON_REPLY && m->code == 421 &&
                 (t->idled || per_connection_limit(m->text))) ||
                m->reason == SMTP_REASON_EOF || m->reason == SMTP_REASON_TLS;
    bool first = m->stage == SMTP_CLIENT_S_RSET || m->stage == SMTP_CLIENT_S_MAIL;
    bool reused = t->txns_on_conn > 1 || t->idled;
    return m->scope == SMTP_SCOPE_SESSION && m->status == SMTP_STATUS_TEMPFAIL && lost && first &&
           reused && t->delivered == 0 && t->permfail == 0 &&
           t->reuse_lost < POLICY_REUSE_LOST_MAX &&
           t->now_ms + POLICY_EXPIRY_SLACK_MS < t->expire_ms;
}

void
policy_conn_end(const struct policy_conn_end *e, struct policy_conn_decision *out)
{
    memset(out, 0, sizeof(*out));
    if (e->stopping)
        return;
    const struct smtp_outcome *so = e->connected ? e->session : NULL;
    if (so != NULL && so->code == 421 && !e->idle && !e->reuse_lost) {
        /* The server pushes back: give it a rest (RFC 5321 3.8). A 421
         * to an idle connection, no transaction at stake, is its idle
         * timeout ("421 4.4.2 ... timeout exceeded", Postfix's smtpd) or
         * a shutdown: the connection ends, the next job opens another.
         * So is one that crossed the first command of a transaction on
         * a reused connection (policy_reuse_lost): the job went back. */
        out->hold = true;
        /* A shutdown or maintenance is no sign of load, nor of what the
         * receiver thinks of the source: rates and the site's window stay
         * whole, and the hold rests the destination and its site for
         * every source of a pool alike (one source resting would send
         * the pool's others to the same host going down). */
        out->backoff = !e->going_down;
        out->congested = !e->going_down;
        out->source_hold = !e->going_down;
    }
    if (!e->ready_once && e->connected && e->tls_fallback && e->tls_retry_left) {
        /* Opportunistic TLS whose handshake failed: the address answered,
         * its TLS is broken, not its SMTP; plaintext there now, as a
         * server without STARTTLS gets (policy_tls_fallback). Neither a
         * failed address nor a sign of load. Each job once per attempt:
         * a job that already had its retry meets a failed address. */
        out->retry_plain = true;
        out->remember = so != NULL && so->status != SMTP_STATUS_PENDING;
        return;
    }
    if (!e->ready_once) {
        /* Refused, timed out, or greeting, EHLO or the TLS policy failed:
         * the next address; a reason to remember when there is one. */
        out->congested = true;
        if (e->connected) {
            out->next_addr = true;
            /* Temporary even for a 5xx greeting: another MX, or a later
             * try, may do (Postfix's smtp_skip_5xx_greeting). */
            out->remember = so != NULL && so->status != SMTP_STATUS_PENDING;
        }
    }
}

void
policy_dns(enum dns_status st, bool bad_name, bool hosts_nx, bool mx_no_host,
           struct policy_fail *out)
{
    memset(out, 0, sizeof(*out));
    out->src = CLASSIFY_DNS;
    if (st == DNS_FAIL && bad_name) {
        *out = (struct policy_fail){true, true, 550, {5, 1, 2}, CLASSIFY_DNS, false,
                                    "invalid domain name"};
        return;
    }
    if (st == DNS_FAIL && hosts_nx) {
        *out = (struct policy_fail){true, true, 550, {5, 4, 4}, CLASSIFY_DNS, false,
                                    "no MX host exists (NXDOMAIN)"};
        return;
    }
    if (st == DNS_FAIL && mx_no_host) {
        *out = (struct policy_fail){true, true, 550, {5, 4, 4}, CLASSIFY_DNS, false,
                                    "no MX target is a host name"};
        return;
    }
    switch (st) {
    case DNS_OK:
        return;
    case DNS_NOT_FOUND:
        *out = (struct policy_fail){true, true, 550, {5, 1, 2}, CLASSIFY_DNS, false, "NXDOMAIN"};
        return;
    case DNS_NULL_MX:
        *out = (struct policy_fail){true, true, 556, {5, 1, 10}, CLASSIFY_DNS, false,
                                    "domain accepts no mail (null MX, RFC 7505)"};
        return;
    case DNS_RETRY:
    case DNS_FAIL:
    default:
        *out = (struct policy_fail){true, false, 451, {4, 4, 3}, CLASSIFY_DNS, true,
                                    "DNS lookup failed"};
        return;
    }
}

const char *
policy_dns_text(const struct dns_mx_result *mx, char *buf, size_t cap)
{
    if (mx->status == DNS_NULL_MX)
        return NULL;
    if (mx->status != DNS_NOT_FOUND)
        return mx->why;
    /* An MX lookup's NXDOMAIN is the only one that says "NXDOMAIN" (a
     * host's, or a route's address lookup, is "no address records"). */
    bool nx = strcmp(mx->why, "NXDOMAIN") == 0;
    snprintf(buf, cap, "Host or domain name not found. Name service error for name=%s%s: %s",
             mx->domain, nx ? " type=MX" : "", nx ? "Host not found (NXDOMAIN)" : mx->why);
    return buf;
}

bool
policy_mx_refresh_keeps(enum dns_status st, uint64_t stale_ms)
{
    struct policy_fail pf;
    policy_dns(st, false, false, false, &pf);
    return pf.fail && !pf.permanent && stale_ms < POLICY_MX_STALE_MAX_MS;
}

void
policy_job(enum policy_job_event ev, struct policy_fail *out)
{
    switch (ev) {
    case POLICY_NO_RESOLVER:
        *out = (struct policy_fail){true, false, 451, {4, 4, 3}, CLASSIFY_DNS, false,
                                    "no resolver on this worker"};
        return;
    case POLICY_NO_TARGET:
        /* A configuration error of the domain (or an attack), not a
         * passing failure. */
        *out = (struct policy_fail){true, true, 550, {5, 4, 4}, CLASSIFY_TARGET, false,
                                    "no delivery target"};
        return;
    case POLICY_NO_TARGET_PARTIAL:
        /* The hosts whose addresses could not be looked up may be
         * targets: a DNS failure for now, never a bounce. */
        *out = (struct policy_fail){true, false, 451, {4, 4, 3}, CLASSIFY_DNS, true,
                                    "no delivery target yet: some MX hosts' lookups failed"};
        return;
    case POLICY_NO_TARGET_SELF:
        *out = (struct policy_fail){true, true, 550, {5, 4, 6}, CLASSIFY_TARGET, false,
                                    "mail loops back to myself"};
        return;
    case POLICY_NO_MX_ANSWERED:
        *out = (struct policy_fail){true, false, 451, {4, 4, 1}, CLASSIFY_CONNECT, false,
                                    "no MX host answered"};
        return;
    case POLICY_BAD_IDN:
        /* It never becomes one: bounced now, not retried for days (a
         * lookup of the UTF-8 name failed "invalid domain name" and was
         * deferred as a DNS failure); a DNS failure as NXDOMAIN is. */
        *out = (struct policy_fail){true, true, 553, {5, 1, 2}, CLASSIFY_DNS, false,
                                    "recipient domain is not a valid IDN"};
        return;
    case POLICY_TLS_POLICY_NO_MX:
        /* The policy or the MX records may be mid-change (RFC 8461 8.3):
         * wait for either, never deliver elsewhere. */
        *out = (struct policy_fail){true, false, 451, {4, 7, 5}, CLASSIFY_TLS_POLICY, false,
                                    "no MX host matches the domain's MTA-STS policy"};
        return;
    case POLICY_OPEN_FAILED:
        /* This node's, not the receiver's: temporary, a network status
         * (Postfix defers a failed bind() with 4.4.0 too). */
        *out = (struct policy_fail){true, false, 451, {4, 4, 0}, CLASSIFY_CONNECT, false,
                                    "cannot open a connection"};
        return;
    case POLICY_OPERATOR_BOUNCE:
    default:
        /* No server said it: not a reply to classify by its text (which
         * quotes the last reply, outbound/outcome.c) nor to pass by the
         * shaping rules (outcome_shaping: a bounce of a domain's stuck
         * mail must not start an action for it). */
        *out = (struct policy_fail){true, true, 550, {5, 0, 0}, CLASSIFY_OPERATOR, false,
                                    "bounced by the operator"};
        return;
    }
}

bool
policy_txn_congested(const struct smtp_outcome *o)
{
    return o->scope == SMTP_SCOPE_SESSION &&
           (o->reason == SMTP_REASON_EOF || o->reason == SMTP_REASON_TLS ||
            o->reason == SMTP_REASON_TIMEOUT || o->code == 421);
}

void
policy_conn_event(enum policy_conn_event ev, struct policy_event_decision *out)
{
    memset(out, 0, sizeof(*out));
    switch (ev) {
    case POLICY_CONNECT_FAILED:
    case POLICY_CONNECT_TIMEOUT:
        /* An MX host down refuses every source alike: the next address,
         * not a hold of the source (source_hold stays false). */
        out->next_addr = true;
        return;
    case POLICY_CLIENT_MISUSE:
    case POLICY_SPOOL_UNREADABLE:
        /* Ours, not the receiver's: rest a little, no reconnect storm. */
        out->rest_ms = POLICY_HOLD_MIN_MS;
        return;
    }
}

bool
policy_open_failed(int err)
{
    return err < 0 && err != -ENOMEM;
}

uint64_t
policy_all_failed_hold(uint64_t site_hold_ms)
{
    return site_hold_ms > POLICY_HOLD_MIN_MS ? site_hold_ms : POLICY_HOLD_MIN_MS;
}

bool
policy_site_failure(const struct smtp_outcome *o)
{
    return o == NULL || policy_source(o, CLASSIFY_CONNECT) != CLASSIFY_TLS;
}

bool
policy_greylisted(const struct smtp_outcome *o)
{
    if (o->reason != SMTP_REASON_REPLY || o->code < 400 || o->code > 499 || o->code == 421)
        return false;
    /* what the classifier's built-in rule text:gr[ae]y-?list matches */
    static const char *const words[] = {"greylist", "graylist", "grey-list", "gray-list"};
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++)
        if (strcasestr(o->text, words[i]) != NULL)
            return true;
    return false;
}

uint64_t
policy_source_hold(uint64_t site_hold_ms, unsigned holds)
{
    uint64_t base = policy_all_failed_hold(site_hold_ms), ms = base;
    for (unsigned i = 1; i < holds && ms < 8 * base; i++)
        ms *= 2;
    return ms < 8 * base ? ms : 8 * base;
}

bool
policy_tls_fallback(int tls_pol, bool dane)
{
    return tls_pol == DOMAIN_TLS_OPTIONAL && !dane;
}
