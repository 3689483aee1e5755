/*
 * server_auth: AUTH in a submission session (see server_int.h for the
 * other files of the server): where it is offered (auth_allowed_here),
 * the command and its SASL exchange (PLAIN, LOGIN), the check of the
 * credentials (from the worker's cache, else hashed by the auth pool
 * while the session waits in SS_AUTH_HASH, one hash for sessions that
 * try the same credentials at once), the failure limits per address and
 * per user (auth_limit.h) and the delayed answer to a failure.
 * server_cmd.c calls cmd_auth and auth_response; server.c answers a
 * failure once its delay has passed (auth_fail_reply) and unlinks a
 * session that closes from the hashes under way.
 *
 * Threading: the worker's thread; a hash runs on the auth pool's threads
 * and comes back through the worker's mailbox (session_on_hash).
 */
#include <openssl/crypto.h>
#include <string.h>

#include "common/log.h"
#include "engine/server_int.h"

/* ---- AUTH ---- */

bool
auth_allowed_here(const struct session *s)
{
    if (stream_tls_ready(&s->st))
        return true;
    switch (s->sw->cfg->plaintext_auth) {
    case PLAINTEXT_AUTH_ALWAYS:
        return true;
    case PLAINTEXT_AUTH_LOOPBACK:
        return s->loopback;
    default:
        return false;
    }
}

/* The answer to a failed AUTH, once its delay has passed. */
void
auth_fail_reply(struct session *s)
{
    reply(s, "535 5.7.8 Authentication credentials invalid");
    if (s->auth_failures >= s->sw->cfg->auth_max_failures) {
        reply_close(s, "421 4.7.0 Too many failed authentications: closing");
        return;
    }
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
}

/* A client-supplied name, safe in a key=value log line. */
static const char *
log_name(const char *name, char *buf, size_t cap)
{
    size_t o = 0;
    for (const char *p = name; *p != '\0' && o + 1 < cap; p++) {
        unsigned char c = (unsigned char)*p;
        buf[o++] = (char)((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                                  (c >= '0' && c <= '9') || strchr("@._+-", c) != NULL
                              ? c
                              : '?');
    }
    buf[o] = '\0';
    return buf;
}

/* A failed attempt: counted for the session and, unless counted already
 * (a hash's end counts its own), for the client's address and the name
 * (when one was given); answered after the delay. */
static void
auth_fail(struct session *s, bool counted, const char *name)
{
    struct server_worker *sw = s->sw;
    const struct server_config *cfg = sw->cfg;
    s->auth_failures++;
    sw->stats.auth_failed++;
    if (!counted) {
        auth_limit_fail(sw->e->auth_limit, AUTH_LIMIT_ADDRESS, s->addr_key, s->addr_key_len,
                        cfg->auth_failures_per_address, cfg->auth_failure_window, sw->w->now);
        if (name != NULL && name[0] != '\0')
            auth_limit_fail(sw->e->auth_limit, AUTH_LIMIT_USER, name, strlen(name),
                            cfg->auth_failures_per_user, cfg->auth_failure_window, sw->w->now);
    }
    log_msg(LOG_NOTICE, "session=%016llx event=auth_failed client=%s failures=%u",
            (unsigned long long)s->id, s->peer_ip, s->auth_failures);
    uint64_t delay = cfg->auth_fail_delay;
    if (delay == 0) {
        auth_fail_reply(s);
        return;
    }
    unsigned shift = s->auth_failures - 1 < 5 ? s->auth_failures - 1 : 5;
    session_enter(s, SS_AUTH_WAIT);
    session_deadline(s, delay << shift);
}

/* Has the client's address failed too often lately (all sessions, all
 * workers)? Then it is told so and the session closes. */
static bool
auth_address_refused(struct session *s)
{
    struct server_worker *sw = s->sw;
    if (!auth_limit_over(sw->e->auth_limit, AUTH_LIMIT_ADDRESS, s->addr_key, s->addr_key_len,
                         sw->cfg->auth_failures_per_address, sw->w->now))
        return false;
    sw->stats.auth_refused_address++;
    log_msg(LOG_NOTICE, "session=%016llx event=auth_refused reason=address_failures client=%s",
            (unsigned long long)s->id, s->peer_ip);
    reply_close(s, "421 4.7.0 Too many failed authentications from your address: try again "
                   "later");
    return true;
}

static void
auth_ok(struct session *s, const struct auth_user *u)
{
    s->user = u;
    s->sw->stats.auth_ok++;
    log_msg(LOG_INFO, "session=%016llx event=auth_ok client=%s user=%s",
            (unsigned long long)s->id, s->peer_ip, u->name);
    reply(s, "235 2.7.0 Authentication successful");
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
}

/* End the attempt's place in the failure limits (begun in auth_check). */
static void
auth_limits_end(struct session *s, bool failed)
{
    struct server_worker *sw = s->sw;
    const struct server_config *cfg = sw->cfg;
    const char *name = s->hash_job.a.name;
    if (s->limit_address)
        auth_limit_end(sw->e->auth_limit, AUTH_LIMIT_ADDRESS, s->addr_key, s->addr_key_len,
                       failed, cfg->auth_failures_per_address, cfg->auth_failure_window,
                       sw->w->now);
    if (s->limit_user)
        auth_limit_end(sw->e->auth_limit, AUTH_LIMIT_USER, name, strlen(name), failed,
                       cfg->auth_failures_per_user, cfg->auth_failure_window, sw->w->now);
    s->limit_address = s->limit_user = false;
}

/* A session with a hash of its own with the pool and the same users
 * table and credentials as s's attempt, or NULL. */
static struct session *
hash_leader_find(struct server_worker *sw, const struct session *s)
{
    for (struct session *l = sw->hashing; l != NULL; l = l->hash_next)
        if (l->users == s->users && CRYPTO_memcmp(l->hash_job.a.key, s->hash_job.a.key, 32) == 0)
            return l;
    return NULL;
}

/* Take s out of the lists of hashes under way (its own, or its leader's). */
void
session_hash_unlink(struct session *s)
{
    struct session **pp;
    for (pp = &s->sw->hashing; *pp != NULL && *pp != s; pp = &(*pp)->hash_next)
        ;
    if (*pp == s)
        *pp = s->hash_next;
    s->hash_next = NULL;
    if (s->hash_leader != NULL) {
        for (pp = &s->hash_leader->hash_followers; *pp != NULL && *pp != s;
             pp = &(*pp)->hash_next_follower)
            ;
        if (*pp == s)
            *pp = s->hash_next_follower;
        s->hash_leader = NULL;
        s->hash_next_follower = NULL;
    }
    /* Followers left only when the worker stops (else s lives until its
     * hash ends and hands them the answer). */
    for (struct session *f = s->hash_followers, *next; f != NULL; f = next) {
        next = f->hash_next_follower;
        f->hash_leader = NULL;
        f->hash_next_follower = NULL;
    }
    s->hash_followers = NULL;
}

/* The hash is done: back on the worker, through its mailbox. Sessions
 * that waited for it get its answer too. */
void
session_on_hash(struct worker *w, struct worker_msg *m)
{
    struct session *s = SESSION_OF(m, hash_job.m);
    s->inflight--;
    const struct auth_user *u = auth_attempt_finish(&s->sw->auth, &s->hash_job.a);
    auth_limits_end(s, u == NULL);
    struct session *f = s->hash_followers;
    s->hash_followers = NULL;
    session_hash_unlink(s);
    while (f != NULL) {
        struct session *next = f->hash_next_follower;
        f->hash_leader = NULL;
        f->hash_next_follower = NULL;
        if (f->state == SS_AUTH_HASH) { /* else closed: its own completions free it */
            if (u != NULL)
                auth_ok(f, u);
            else
                auth_fail(f, true, f->hash_job.a.name);
            session_run(f);
        }
        f = next;
    }
    if (s->state == SS_CLOSED || s->state == SS_CLOSING) {
        /* Gone, or going with its last reply (a TLS failure meanwhile):
         * no 235 or 535 after it, and closing stays closing. */
        session_maybe_free(s);
        return;
    }
    if (u != NULL)
        auth_ok(s, u);
    else
        auth_fail(s, true, s->hash_job.a.name);
    session_run(s);
}

/* No hash for this attempt now: too many under way, or the queue is full.
 * Nothing was guessed; the client may try again. */
static void
auth_busy(struct session *s, const char *why)
{
    OPENSSL_cleanse(s->hash_job.a.pass, sizeof(s->hash_job.a.pass));
    auth_limits_end(s, false);
    s->sw->stats.auth_busy++;
    log_msg(LOG_NOTICE, "session=%016llx event=auth_busy client=%s reason=%s",
            (unsigned long long)s->id, s->peer_ip, why);
    reply(s, "454 4.7.0 Temporary authentication failure");
    session_enter(s, SS_COMMAND);
}

/* Check user and password: refused at once when the address or the name
 * failed too often; from the cache when this worker verified them lately;
 * else hashed by the pool while the session waits, reading nothing. A
 * hash takes a place among the address's and the name's attempts under
 * way (auth_limit.h), so that concurrent connections cannot guess past the
 * limits. */
static void
auth_check(struct session *s, const char *user, size_t ulen, const char *pass, size_t plen)
{
    struct server_worker *sw = s->sw;
    const struct server_config *cfg = sw->cfg;
    struct auth_limit *lim = sw->e->auth_limit;
    if (auth_address_refused(s))
        return;
    const struct auth_user *u = NULL;
    struct auth_attempt *a = &s->hash_job.a;
    enum auth_start st = auth_attempt_start(s->users, &sw->auth, user, ulen, pass, plen, a, &u);
    if (st == AUTH_START_INVALID) {
        auth_fail(s, false, NULL);
        return;
    }
    if (auth_limit_over(lim, AUTH_LIMIT_USER, a->name, strlen(a->name),
                        cfg->auth_failures_per_user, sw->w->now)) {
        /* Even the right password: else guessing from many addresses
         * would go on. Not counted against the address or the name: the
         * refusal guessed nothing, and the user's own application retrying
         * must not get its address blocked too. */
        OPENSSL_cleanse(a->pass, sizeof(a->pass));
        char nb[80];
        sw->stats.auth_refused_user++;
        s->auth_failures++;
        log_msg(LOG_NOTICE,
                "session=%016llx event=auth_refused reason=user_failures client=%s user=%s",
                (unsigned long long)s->id, s->peer_ip, log_name(a->name, nb, sizeof(nb)));
        reply(s, "454 4.7.0 Too many failed authentications for this user: try again later");
        if (s->auth_failures >= cfg->auth_max_failures)
            reply_close(s, "421 4.7.0 Too many failed authentications: closing");
        else
            session_enter(s, SS_COMMAND);
        return;
    }
    if (st == AUTH_START_CACHED) {
        auth_ok(s, u); /* the right password: no guess to count */
        return;
    }
    struct session *lead = hash_leader_find(sw, s);
    if (lead != NULL) {
        /* The same guess as one under way: no second hash, no second count. */
        OPENSSL_cleanse(a->pass, sizeof(a->pass));
        s->hash_leader = lead;
        s->hash_next_follower = lead->hash_followers;
        lead->hash_followers = s;
        sw->stats.auth_coalesced++;
        worker_timer_cancel(sw->w, &s->timer);
        session_enter(s, SS_AUTH_HASH);
        return;
    }
    int rc = auth_limit_begin(lim, AUTH_LIMIT_ADDRESS, s->addr_key, s->addr_key_len,
                              cfg->auth_failures_per_address, sw->w->now);
    s->limit_address = rc == 1;
    if (rc < 0) {
        auth_busy(s, "address_attempts_under_way");
        return;
    }
    rc = auth_limit_begin(lim, AUTH_LIMIT_USER, a->name, strlen(a->name),
                          cfg->auth_failures_per_user, sw->w->now);
    s->limit_user = rc == 1;
    if (rc < 0) {
        auth_busy(s, "user_attempts_under_way");
        return;
    }
    s->hash_job.m.fn = session_on_hash;
    if (auth_pool_submit(sw->e->auth_pool, &s->hash_job, sw->w) < 0) {
        auth_busy(s, "hash_queue_full");
        return;
    }
    s->inflight++;
    s->hash_next = sw->hashing;
    sw->hashing = s;
    worker_timer_cancel(sw->w, &s->timer); /* the pool's time is not the client's */
    session_enter(s, SS_AUTH_HASH);
}

/* One SASL response (initial response or a line after 334). */
void
auth_response(struct session *s, const char *line, size_t len)
{
    if (len == 1 && line[0] == '*') {
        s->junk++; /* an AUTH that moved nothing, as a refused one (handle_line) */
        reply(s, "501 5.0.0 Authentication cancelled");
        session_enter(s, SS_COMMAND);
        return;
    }
    /* PLAIN: authzid NUL name NUL password, each at its longest */
    char buf[AUTH_NAME_MAX + 1 + AUTH_NAME_MAX + 1 + AUTH_PASS_MAX];
    long n;
    if (len == 1 && line[0] == '=')
        n = 0; /* an empty initial response (RFC 4954 4) */
    else
        n = auth_b64_decode(line, len, buf, sizeof(buf));
    if (n < 0) {
        reply(s, "501 5.5.2 Invalid base64 data");
        session_enter(s, SS_COMMAND);
        s->errors++;
        return;
    }
    if (s->auth_mech == SMTP_AUTH_PLAIN) {
        const char *u, *p;
        size_t ul, pl;
        if (auth_plain_split(buf, (size_t)n, &u, &ul, &p, &pl) < 0) {
            OPENSSL_cleanse(buf, sizeof(buf));
            auth_fail(s, false, NULL);
            return;
        }
        auth_check(s, u, ul, p, pl);
        OPENSSL_cleanse(buf, sizeof(buf));
        return;
    }
    /* LOGIN */
    if (s->auth_step == 0) {
        if ((size_t)n >= sizeof(s->auth_name) || memchr(buf, '\0', (size_t)n) != NULL) {
            /* too long, or a NUL that would cut the name short */
            auth_fail(s, false, NULL);
            return;
        }
        memcpy(s->auth_name, buf, (size_t)n);
        s->auth_name[n] = '\0';
        s->auth_step = 1;
        reply(s, "334 UGFzc3dvcmQ6");
        session_enter(s, SS_AUTH);
        return;
    }
    auth_check(s, s->auth_name, strlen(s->auth_name), buf, (size_t)n);
    OPENSSL_cleanse(buf, sizeof(buf));
}

void
cmd_auth(struct session *s, const struct smtp_cmd *c)
{
    if (s->users == NULL) {
        reply(s, "503 5.5.1 AUTH is not offered here");
        return;
    }
    /* AUTH is shown only to EHLO (RFC 4954 3, RFC 1869 4). Postfix takes
     * it after HELO; here, as the parameters and BDAT, it is not: the
     * reply says what to do, and the Received field's "with" (ESMTPA,
     * RFC 3848) stays true of every authenticated session. */
    if (!s->greeted || !s->esmtp) {
        reply(s, "503 5.5.1 Send EHLO first");
        return;
    }
    if (s->user != NULL) {
        reply(s, "503 5.5.1 Already authenticated");
        return;
    }
    if (s->in_txn) {
        reply(s, "503 5.5.1 AUTH not allowed during a mail transaction");
        return;
    }
    /* RFC 4954: a mechanism we do not offer is 504 whatever the TLS state;
     * 538 is only for one we would accept once encrypted. */
    if (c->auth_mech != SMTP_AUTH_PLAIN && c->auth_mech != SMTP_AUTH_LOGIN) {
        reply(s, "504 5.5.4 Unrecognized authentication type");
        return;
    }
    if (!auth_allowed_here(s)) {
        reply(s, "538 5.7.11 Encryption required for requested authentication mechanism");
        return;
    }
    if (auth_address_refused(s))
        return;
    s->auth_mech = c->auth_mech;
    s->auth_step = 0;
    if (c->auth_ir.len != 0) {
        auth_response(s, c->auth_ir.ptr, c->auth_ir.len);
        return;
    }
    reply(s, s->auth_mech == SMTP_AUTH_PLAIN ? "334 " : "334 VXNlcm5hbWU6");
    session_enter(s, SS_AUTH);
}
