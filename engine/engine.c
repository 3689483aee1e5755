/*
 * engine: start and stop the daemon's parts in order (see engine.h).
 * Start: spool, users, per worker its server (listening sockets are bound
 * here, so a port in use fails the start), then the threads. Stop: the
 * threads, then each server (the commits the spool still has land and
 * are logged queued, though their clients get no reply: a bounded wait,
 * server_worker_free), then the spool. The drain before a stop
 * (engine_drain) waits, up to drain_timeout, for deliveries in flight
 * and for messages being signed or stored and their replies
 * (server_worker_drain_seal); a last reply to a client that does not
 * read has no longer than the drain. A reload swaps the config while the
 * workers are parked (engine_reload.c); a replaced one is freed once no
 * thread can reach it (config_gen.h). This file also loads what start
 * and reload share (the users file, the TLS contexts: engine_int.h) and
 * hands out references to what a reload replaces; the connections per
 * client address are engine_conn.c's.
 * A worker whose ring fails shuts its listeners and signals main, which
 * drains the others and exits ENGINE_EXIT_FAILED (engine.h); the test
 * seam SLUICE_TEST_FAIL_RING injects that failure. The stop has one last
 * bound, a thread of its own (stop_watch): a spool that answers nothing
 * would otherwise hold it forever.
 */
#include "engine/engine.h"
#include "engine/mta_sts.h"

#include <limits.h>

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/fs.h"
#include "common/intern.h"
#include "common/log.h"
#include "engine/auth_limit.h"
#include "engine/auth_pool.h"
#include "engine/config_gen.h"
#include "engine/delivery.h"
#include "engine/node_caps.h"
#include "engine/route.h"
#include "engine/outbound/site.h"
#include "dkim/dkim.h"
#include "engine/dkim_pool.h"
#include "engine/dlog.h"
#include "engine/events.h"
#include "engine/ops.h"
#include "engine/oob.h"
#include "engine/server.h"
#include "engine/suppress.h"
#include "engine/warmup.h"
#include "engine/shaping.h"
#include "engine/tlsrpt.h"
#include "common/json.h"
#include "engine/engine_int.h"

struct start_msg {
    struct worker_msg m;
    struct server_worker *sw;
    struct delivery *dlv;
};

static void
on_start(struct worker *w, struct worker_msg *m)
{
    struct start_msg *sm = (struct start_msg *)m;
    server_worker_start(sm->sw);
    delivery_start(sm->dlv);
    free(sm);
}

/* Rebuild the ready queues: every recipient not deferred is handed to the
 * worker of its domain, grouped per message and domain. Deferred ones come
 * back through the due poll when their time comes. */
static int
walk_ready(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct delivery_batch *b = arg;
    if (r->state == QUEUE_RCPT_READY)
        return delivery_batch_add(b, id, r);
    b->deferred++;
    return 0;
}

/* Returns 0, or -EIO with err set when the walk found the spool's tree
 * damaged (a fault inside LMDB, logged by the queue, or keys out of
 * order): sluice must not write into it. */
static int
requeue_spool(struct engine *e, char *err, size_t errlen)
{
    struct delivery_batch *b = calloc(1, sizeof(*b));
    if (b == NULL) {
        log_msg(LOG_ERR, "event=spool_requeued err=\"out of memory\" note=ready_recipients_wait_for_a_restart");
        return 0;
    }
    b->e = e;
    int rc = queue_walk(e->queue, walk_ready, b);
    if (rc == QUEUE_ECORRUPT) {
        /* LMDB's own word, or keys out of order: the tree is damaged,
         * and writing into it would spread the damage */
        snprintf(err, errlen,
                 "spool %s is damaged: its recipients' tree cannot be walked (LMDB faulted, "
                 "logged as queue=damaged, or found its keys out of order): restore the spool "
                 "from a copy",
                 e->cfg->queue.path);
        delivery_batch_flush(b);
        free(b);
        return -EIO;
    }
    delivery_batch_flush(b);
    /* recipients: the ready ones, queued now; deferred: those waiting for
     * their retry time, which the due poll brings back */
    log_msg(rc == 0 ? LOG_NOTICE : LOG_ERR, "event=spool_requeued recipients=%llu deferred=%llu%s%s",
            (unsigned long long)b->recipients, (unsigned long long)b->deferred,
            rc == 0 ? "" : " err=", rc == 0 ? "" : queue_strerror(rc));
    free(b);
    return 0;
}

/* Both TLS contexts of a [tls] section: the client's always, the
 * server's when a certificate is named. Returns 0, or an error with a
 * message for the operator in err (nothing is left made). */
int
engine_tls_new(const struct tls_config *tc, struct tls_ctx **server, struct tls_ctx **client,
               char *err, size_t errlen)
{
    *server = *client = NULL;
    char why[400];
    int rc = tls_ctx_new_client(tc, client, why, sizeof(why));
    if (rc == 0 && tls_config_has_server(tc))
        rc = tls_ctx_new_server(tc, server, why, sizeof(why));
    if (rc < 0) {
        *client = tls_ctx_unref(*client);
        snprintf(err, errlen, "[tls] %s", why);
    }
    return rc;
}

/* The users file loaded into e->users; *changed (may be NULL) says
 * whether it holds other contents than at the last load that took. */
int
engine_load_users(struct engine *e, bool *changed, char *err, size_t errlen)
{
    const char *path = e->cfg->server.auth_users_file;
    if (changed != NULL)
        *changed = false;
    if (path == NULL) {
        e->reread_digest[RR_USERS] = 0;
        return 0;
    }
    /* before the load: a file replaced meanwhile is only said again at
     * the next reload */
    uint64_t digest = engine_reread_digest(e->cfg, RR_USERS);
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    if (errs == NULL)
        return -ENOMEM;
    struct auth_db *db = NULL;
    int rc = auth_db_load(path, &db, errs);
    fclose(errs);
    if (rc == 0) {
        pthread_mutex_lock(&e->users_lock);
        struct auth_db *old = e->users;
        e->users = db;
        pthread_mutex_unlock(&e->users_lock);
        auth_db_unref(old);
        if (changed != NULL)
            *changed = e->reread_digest[RR_USERS] != 0 && digest != e->reread_digest[RR_USERS];
        e->reread_digest[RR_USERS] = digest;
    }
    if (rc < 0) {
        /* the first error line is enough for the start failure and
         * sluicectl reload; all of them go to the log */
        const char *first = NULL;
        char *save = NULL;
        for (char *l = strtok_r(buf, "\n", &save); l != NULL; l = strtok_r(NULL, "\n", &save)) {
            log_msg(LOG_ERR, "event=users_file_error error=\"%s\"", l);
            if (first == NULL)
                first = l;
        }
        snprintf(err, errlen, "auth_users_file %s: cannot load (%s; every error in the log)", path,
                 first != NULL ? first : "no reason given");
    } else {
        log_msg(LOG_INFO, "event=users_loaded file=%s users=%u", path, auth_db_count(db));
        /* Their messages get 451 4.3.5 until the config names these. */
        const struct config *cfg = e->cfg;
        for (unsigned i = 0; i < auth_db_count(db); i++) {
            const struct auth_user *u = auth_db_user(db, i);
            if (u->tenant != NULL && config_tenant(cfg, u->tenant, strlen(u->tenant)) == NULL)
                log_msg(LOG_WARN, "event=users_file_warning user=%s tenant=%s "
                                  "reason=no_such_tenant_in_config", u->name, u->tenant);
            if (u->pool != NULL && config_pool(cfg, u->pool, strlen(u->pool)) == NULL)
                log_msg(LOG_WARN, "event=users_file_warning user=%s pool=%s "
                                  "reason=no_such_pool_in_config", u->name, u->pool);
        }
    }
    free(buf);
    return rc;
}

/* On the failed worker's thread (see engine.h). */
static void
engine_on_worker_failed(struct worker *w, int err)
{
    struct engine *e = w->ctx;
    log_msg(LOG_CRIT,
            "event=worker_failed worker=%s err=\"%s\" action=stopping exit=%d "
            "note=listeners_closed_spool_kept_restart_expected",
            w->name, strerror(-err), ENGINE_EXIT_FAILED);
    if (e->srv != NULL && e->srv[w->id] != NULL)
        server_worker_drain(e->srv[w->id], UINT64_MAX); /* main's drain bounds it */
    log_flush(); /* the drain's lines before main's */
    atomic_fetch_add(&e->failed, 1);
    kill(getpid(), SIGTERM); /* main's sigwaitinfo takes it */
}

unsigned
engine_failed_workers(struct engine *e)
{
    return atomic_load(&e->failed);
}

/* SLUICE_TEST_FAIL_RING=W:N: worker W's loop fails as on a ring error
 * after N turns (tests of the path above). Returns 0 or -EINVAL with err. */
static int
test_hook_fail_ring(struct engine *e, char *err, size_t errlen)
{
    const char *v = getenv("SLUICE_TEST_FAIL_RING");
    if (v == NULL || *v == '\0')
        return 0;
    unsigned wid;
    unsigned long long turns;
    char tail;
    if (sscanf(v, "%u:%llu%c", &wid, &turns, &tail) != 2 || wid >= e->nworkers || turns == 0) {
        snprintf(err, errlen,
                 "SLUICE_TEST_FAIL_RING=%s: expected WORKER:TURNS, worker below %u, turns above 0",
                 v, e->nworkers);
        return -EINVAL;
    }
    e->workers[wid].fail_after = turns;
    log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_FAIL_RING worker=%u after_turns=%llu",
            wid, turns);
    return 0;
}

/* SLUICE_TEST_WARMUP_CLOCK=DAYS: the warm-up plans count days as if
 * DAYS days had passed, and the stats socket answers "warmup clock" and
 * "warmup take" (tests of the plans through a running daemon). Only in
 * builds with test hooks (SLUICE_TESTS=ON): a production build ignores
 * the variable. Returns 0 or -EINVAL with err. */
static int
test_hook_warmup_clock(struct engine *e, char *err, size_t errlen)
{
#ifdef SLUICE_TEST_HOOKS
    const char *v = getenv("SLUICE_TEST_WARMUP_CLOCK");
    if (v == NULL || *v == '\0')
        return 0;
    char *end;
    long long days = strtoll(v, &end, 10);
    if (*end != '\0' || days < -3650 || days > 3650) {
        snprintf(err, errlen, "SLUICE_TEST_WARMUP_CLOCK=%s: expected days, -3650..3650", v);
        return -EINVAL;
    }
    warmup_clock_shift(e->warmup, days * 86400000LL);
    e->warmup_test_hooks = true;
    log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_WARMUP_CLOCK days=%lld", days);
#else
    (void)e;
    (void)err;
    (void)errlen;
#endif
    return 0;
}

/* Shaping actions that start and end on this node go to the delivery log
 * (and through its hook to the event sinks) as shaping_started and
 * shaping_ended, on one writer of their own under a lock: the shaping
 * table calls from workers, its keeper and the stats thread. */
static void
shaping_to_dlog(void *arg, const struct shaping_action *a, bool started, const char *why)
{
    struct engine *e = arg;
    pthread_mutex_lock(&e->shaping_dlog_lock);
    if (e->dlogw_shaping != NULL) {
        char value[16] = "";
        if (a->kind == SHAPING_CAP)
            snprintf(value, sizeof(value), "cap:%u", a->value);
        struct dlog_event ev = {
            .kind = started ? DLOG_SHAPING_STARTED : DLOG_SHAPING_ENDED,
            .id = a->id,
            .action = value[0] ? value : shaping_kind_str(a->kind),
            .scope = shaping_scope_str(a->scope),
            .source = a->source[0] ? a->source : NULL,
            .tenant = a->tenant[0] ? a->tenant : NULL,
            .group = a->group[0] ? a->group : NULL,
            .domain = a->domain[0] ? a->domain : NULL,
            .rule = a->rule,
            .reply = started ? a->trigger : NULL,
            .reason = why,
            .reporter = a->origin,
            .until_ms = started ? a->until_ms : 0,
            .rcpt_index = -1,
        };
        dlog_event(e->dlogw_shaping, &ev);
    }
    pthread_mutex_unlock(&e->shaping_dlog_lock);
}

struct local_commit {
    bool done;
    int rc;
};

static void
local_on_commit(void *cookie, int rc)
{
    struct local_commit *c = cookie;
    c->done = true;
    c->rc = rc;
}

/* DKIM: the signatures of a message this node wrote (text: header
 * section, empty line, body), when the keyring signs for its From domain
 * (from: the address): *sig malloc'd (NULL: unsigned), one dlog_dkim per
 * signature into sigs. The strings of sigs live in *keys, a reference
 * the caller drops (dkim_keyring_unref) after its last use of them: a
 * reload meanwhile frees the keyring it replaces. Returns how many, or a
 * negative code (unsigned). */
static int
local_dkim(struct engine *e, const char *from, const char *text, size_t len, char **sig,
           size_t *sig_len, struct dlog_dkim sigs[DKIM_MAX_SIGNERS], struct dkim_keyring **keys)
{
    *sig = NULL;
    *sig_len = 0;
    struct dkim_keyring *kr = engine_dkim_keys(e);
    *keys = kr;
    char dom[256];
    const struct dkim_signer *sg[DKIM_MAX_SIGNERS];
    unsigned n = kr != NULL && dkim_addr_domain(from, dom, sizeof(dom)) == 0
                     ? dkim_keyring_lookup(kr, dom, sg, DKIM_MAX_SIGNERS)
                     : 0;
    int rc = 0;
    if (n > 0) {
        const char *end = strstr(text, "\r\n\r\n");
        size_t hlen = end != NULL ? (size_t)(end - text) + 2 : len;
        unsigned canons = dkim_keyring_body_canons(kr);
        struct dkim_body *b = dkim_body_new(canons);
        uint8_t bh[2][DKIM_HASH_LEN];
        memset(bh, 0, sizeof(bh));
        rc = b != NULL ? 0 : -ENOMEM;
        if (b != NULL)
            dkim_body_feed(b, text, len);
        for (unsigned c = 0; rc == 0 && c < 2; c++)
            if (canons & (1u << c))
                rc = dkim_body_final(b, (enum dkim_canon)c, bh[c]);
        dkim_body_free(b);
        const struct dkim_signer *bad = NULL;
        if (rc == 0)
            rc = dkim_pool_sign_now(sg, n, (const uint8_t(*)[DKIM_HASH_LEN])bh,
                                    clock_unix_ms() / 1000, text, hlen, sig, sig_len, &bad);
        for (unsigned i = 0; rc == 0 && i < n; i++)
            sigs[i] = (struct dlog_dkim){sg[i]->domain, sg[i]->selector,
                                         dkim_alg_str(dkim_key_alg(sg[i]->key))};
        if (rc < 0)
            log_msg(LOG_WARN, "event=tlsrpt_unsigned from=<%s> err=\"%s\"%s%s", from,
                    dkim_strerror(rc), bad != NULL ? " key=" : "", bad != NULL ? bad->source : "");
    }
    return rc < 0 ? rc : (int)n;
}

/* A TLS report's commit not answered in this time is said
 * (event=tlsrpt_enqueue_slow): the MTA-STS thread, policy fetches
 * included, waits for it. */
#define TLSRPT_SLOW_MS 2000u

/* The mailer of TLS reports (tlsrpt.h), on the MTA-STS thread: the report
 * is DKIM-signed when the node signs for its From domain (here: the
 * signing threads serve the workers), committed to the spool with its
 * reception event, as a DSN is with its outcomes, then handed to
 * delivery like any message, but tls_relaxed (queue.h: RFC 8460 3, a
 * report is delivered despite TLS failures, so opportunistic TLS whatever
 * the recipient domain's policy). The thread waits for the commit on a port
 * of its own: it serves no client, and a report is a few a day per
 * domain. That wait holds mail_lock, which the stop's first step takes
 * (tlsrpt_set_mailer, stage "tlsrpt_mail"), and it is not cut short:
 * the spool borrows the report's text and signature until it answers,
 * so they cannot be freed before. A spool that never answers (a dead
 * disk) holds the stop there until the stop's own bound gives it up,
 * naming that stage (event=stop_stuck stage=tlsrpt_mail). A signature
 * that cannot be made leaves the report unsigned (logged): a key error
 * must not stop the reports. */
static int
engine_tlsrpt_mail(void *arg, const char *from, const char *rcpt, const char *text, size_t len)
{
    struct engine *e = arg;
    struct queue_port *port = queue_port_new();
    if (port == NULL)
        return -ENOMEM;
    uint64_t id = queue_id_next(e->queue);
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(id, qid);
    struct queue_rcpt r = {.addr = rcpt};
    struct queue_envelope env = {
        .id = id,
        .sender = from,
        .ret = QUEUE_RET_NONE,
        .body_type = QUEUE_BODY_7BIT,
        /* RFC 8460 3: delivered despite the TLS failures it may report,
         * whatever the TLS policy of the report's domain. */
        .tls_relaxed = true,
        .nrcpt = 1,
        .rcpt = &r,
    };
    char *sig = NULL;
    size_t sig_len = 0;
    struct dlog_dkim sigs[DKIM_MAX_SIGNERS];
    struct dkim_keyring *keys; /* owned reference: sigs' strings live in it */
    int nsig = local_dkim(e, from, text, len, &sig, &sig_len, sigs, &keys);
    struct iovec body[2] = {{sig, sig_len}, {(void *)(uintptr_t)text, len}};
    struct dlog_writer *lw = e->dlogw_tlsrpt;
    struct dlog_event ev = {
        .kind = DLOG_RECEPTION,
        .id = qid,
        .sender = from,
        .rcpt = rcpt,
        .size = sig_len + len,
        .rcpt_count = 1,
        .report = "tlsrpt",
        .rcpt_index = -1,
        .dkim = nsig > 0 ? sigs : NULL,
        .ndkim = nsig > 0 ? (unsigned)nsig : 0,
    };
    /* With event sinks the reception event is committed with the message
     * (queue.h, "events"); the file gets it once that is done. */
    struct json line;
    json_init(&line);
    bool capture = e->events != NULL && lw != NULL;
    if (capture) {
        dlog_capture(lw, &line, false);
        dlog_event(lw, &ev);
        dlog_capture(lw, NULL, false);
    }
    bool have = capture && !json_failed(&line) && line.len > 0;
    struct local_commit c = {false, 0};
    int rc = queue_enqueue_events(e->queue, port, &env, body, 2, have ? line.buf : NULL,
                                  have ? line.len : 0, local_on_commit, &c);
    /* done runs exactly once when the enqueue was taken */
    uint64_t t0 = clock_mono_ms();
    bool slow = false;
    while (rc == 0 && !c.done) {
        uint64_t now = clock_mono_ms();
        if (!slow && now - t0 >= TLSRPT_SLOW_MS) {
            log_msg(LOG_WARN,
                    "id=%s event=tlsrpt_enqueue_slow to=<%s> waited_ms=%llu "
                    "note=mta_sts_thread_waits_for_the_spool",
                    qid, rcpt, (unsigned long long)(now - t0));
            slow = true;
        }
        queue_port_wait(port, slow ? 1000 : (int)(TLSRPT_SLOW_MS - (now - t0)));
    }
    if (rc == 0)
        rc = c.rc;
    queue_port_free(port);
    if (rc == 0) {
        if (have)
            dlog_line(lw, line.buf, line.len);
        else if (!capture)
            dlog_event(lw, &ev);
        log_msg(LOG_INFO, "id=%s event=tlsrpt_queued from=<%s> to=<%s> size=%zu dkim=%d", qid,
                from, rcpt, sig_len + len, nsig > 0 ? nsig : 0);
        /* The MTA-STS thread: submit reads e->cfg. */
        uint64_t cg = engine_config_enter(e);
        delivery_submit_local(e, id, rcpt, NULL, NULL, NULL, true);
        engine_config_leave(e, cg);
    } else {
        log_msg(LOG_ERR, "event=tlsrpt_enqueue_failed to=<%s> err=\"%s\"", rcpt,
                queue_strerror(rc));
    }
    json_fini(&line);
    free(sig);
    dkim_keyring_unref(keys); /* after the last dlog_event that names sigs */
    return rc;
}

/* A complaint about a tenant the config did not name (removed since, or
 * not yet on this node) went to the list "tag:XXXXXXXX" when its token
 * carried the tenant's tag, not its name (oob.c). Once cfg names the
 * tenant, that list becomes its own: RCPT checks the tenant's list only,
 * and a complained-about recipient must not be mailed by that sender
 * again. At start and after each reload (the main thread); the feeds
 * queued before are committed first. A complaint taken meanwhile by a
 * worker still on the previous config (one that did not park for the
 * swap) is folded at the next reload or start. */
void
engine_suppress_fold_tags(struct engine *e, const struct config *cfg)
{
    if (e->suppress == NULL || cfg->ntenants == 0 || cfg->bounce.verp_key_len == 0)
        return;
    suppress_sync(e->suppress);
    for (unsigned i = 0; i < cfg->ntenants; i++) {
        char scope[OOB_TAG_SCOPE_LEN + 1];
        const char *name = cfg->tenants[i].name;
        if (!oob_tag_scope(&cfg->bounce, name, scope))
            continue;
        long n = suppress_move_scope(e->suppress, scope, name);
        if (n > 0)
            log_msg(LOG_NOTICE, "event=suppress_scope_folded from=%s to=%s entries=%ld", scope,
                    name, n);
        else if (n < 0)
            log_msg(LOG_ERR, "event=suppress_fold_failed from=%s to=%s err=\"%s\"", scope, name,
                    strerror((int)-n));
    }
}

/* The MTA-STS store and its thread, under cfg (kept to the end). */
static int
mta_sts_start(const struct config *cfg, struct mta_sts **out, char *err, size_t errlen)
{
    /* The policy cache lives with the spool: a restart keeps it. */
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/mta-sts.cache", cfg->queue.path);
    return mta_sts_new(cfg, path, out, err, errlen);
}

/* A reload: [delivery] mta_sts turned on starts the store (workers that
 * see the new config before it is stored deliver as without a policy
 * meanwhile, as for a domain whose first check runs). Its [mta_sts]
 * settings are those it started with: a change is logged as kept, and
 * returns true (what `sluicectl reload` says waits for a restart). */
bool
engine_mta_sts_reload(struct engine *e, const struct config *n)
{
    struct mta_sts *m = e->mta_sts;
    if (m == NULL && n->delivery.mta_sts && n->delivery.enabled && e->nworkers > 0) {
        char err[512];
        int rc = mta_sts_start(n, &m, err, sizeof(err));
        if (rc < 0) {
            log_msg(LOG_ERR, "event=reload_failed what=mta_sts reason=\"%s\"", err);
            return false;
        }
        tlsrpt_set_mailer(mta_sts_tlsrpt(m), engine_tlsrpt_mail, e);
        /* Its thread (and its TLS reports') keeps n to the end. */
        config_gens_pin(e->gens, n);
        e->mta_sts = m;
        log_msg(LOG_NOTICE, "event=mta_sts_started reason=reload");
        return false;
    }
    if (m == NULL)
        return false;
    /* Fetches and report POSTs refuse what deliveries do, now. */
    mta_sts_set_allow(m, &n->delivery);
    const struct config *o = mta_sts_config(m); /* the one it started with */
    const struct mta_sts_config *a = &o->mta_sts, *b = &n->mta_sts;
#define SAME_STR(x, y) ((x) == (y) || ((x) != NULL && (y) != NULL && strcmp((x), (y)) == 0))
    bool same = SAME_STR(a->ca_file, b->ca_file) && a->fetch_timeout == b->fetch_timeout &&
                a->recheck == b->recheck && a->max_fetches == b->max_fetches &&
                a->fetch_port == b->fetch_port && a->tlsrpt == b->tlsrpt &&
                SAME_STR(a->tlsrpt_org, b->tlsrpt_org) &&
                SAME_STR(a->tlsrpt_contact, b->tlsrpt_contact) &&
                SAME_STR(a->tlsrpt_from, b->tlsrpt_from) &&
                SAME_STR(o->server.hostname, n->server.hostname);
#undef SAME_STR
    if (!same)
        log_msg(LOG_WARN, "event=reload_kept key=mta_sts note=needs_a_restart "
                          "reason=\"the MTA-STS thread keeps the settings it started with\"");
    return !same;
}

int
engine_start(struct engine *e, const struct config *cfg, char *err, size_t errlen)
{
    struct oob_hooks oob = e->oob; /* the caller's, set before the start */
    memset(e, 0, sizeof(*e));
    e->oob = oob;
    e->cfg = cfg;
    atomic_store(&e->campaign_names, cfg->server.campaign_names);
    atomic_init(&e->clients, 0);
    atomic_init(&e->bounce_clients, 0);
    atomic_init(&e->drained, 0);
    atomic_init(&e->failed, 0);
    e->started_ms = clock_unix_ms();
    pthread_mutex_init(&e->per_ip.lock, NULL);
    pthread_mutex_init(&e->users_lock, NULL);
    pthread_mutex_init(&e->dkim_lock, NULL);
    pthread_mutex_init(&e->reload_lock, NULL);
    clock_cond_init_mono(&e->reload_cv);
    e->dkim_keys = cfg->dkim_keys ? dkim_keyring_ref(cfg->dkim_keys) : NULL;
    pthread_mutex_init(&e->tls_lock, NULL);
    pthread_mutex_init(&e->shaping_dlog_lock, NULL);
    e->names = intern_new();
    if (e->names == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    int rc = queue_open(&cfg->queue, &e->queue, err, errlen);
    if (rc < 0) {
        e->names = intern_free(e->names);
        return rc;
    }
    if (cfg->suppress.enabled && (rc = suppress_open(&cfg->suppress, &e->suppress, err, errlen)) < 0)
        goto fail;
    /* What the last run's spool committed and the list did not get yet.
     * A list that cannot take them now (its map full, a failing disk)
     * does not stop the start: they stay in the spool, and the writer
     * tries them again every few seconds, as while running (logged
     * event=suppress_write_failed). */
    if (e->suppress != NULL && (rc = (int)suppress_attach_queue(e->suppress, e->queue)) < 0)
        log_msg(LOG_ERR,
                "event=suppress_notes_waiting reason=\"the spool's entries could not be copied "
                "to the list at start; kept in the spool and tried again\" err=\"%s\"",
                strerror(-rc));
    if ((rc = warmup_open(cfg, &e->warmup, err, errlen)) < 0 ||
        (rc = test_hook_warmup_clock(e, err, errlen)) < 0)
        goto fail;
    if (cfg->shaping.enabled) {
        /* Active actions are kept with the spool: same disk, same backups. */
        char spath[PATH_MAX];
        snprintf(spath, sizeof(spath), "%s/shaping.state", cfg->queue.path);
        struct shaping_opts so = {
            .state_path = spath,
            .node = cfg->shaping.node_name ? cfg->shaping.node_name : cfg->server.hostname,
            .redis_url = cfg->redis.url,
            .redis_password = cfg->redis.password,
            .key_prefix = cfg->redis.key_prefix,
            .redis_timeout_ms = cfg->redis.timeout,
            .stream_max = cfg->shaping.stream_max,
            .on_event = shaping_to_dlog,
            .arg = e,
        };
        if ((rc = shaping_open(&so, &e->shaping, err, errlen)) < 0)
            goto fail;
    }
    engine_suppress_fold_tags(e, cfg);
    rc = engine_load_users(e, NULL, err, errlen);
    if (rc < 0)
        goto fail;
    rc = auth_pool_new(cfg->server.auth_hash_threads, cfg->server.auth_hash_queue, &e->auth_pool);
    if (rc == 0)
        rc = auth_limit_new(cfg->server.auth_failure_table, &e->auth_limit);
    if (rc < 0) {
        snprintf(err, errlen, "cannot start the AUTH hashing threads: %s", strerror(-rc));
        goto fail;
    }
    if (cfg->nevents > 0) {
        /* The journal lives with the spool: same disk, same backups. */
        char dir[PATH_MAX];
        snprintf(dir, sizeof(dir), "%s/events", cfg->queue.path);
        rc = events_new(cfg->events, cfg->nevents, dir, e->queue, &e->events, err, errlen);
        if (rc < 0)
            goto fail;
    }
    if (cfg->log.delivery_log != NULL || e->events != NULL) {
        rc = dlog_new(cfg->log.delivery_log, (unsigned)cfg->log.delivery_log_flush, &e->dlog,
                      err, errlen);
        if (rc < 0)
            goto fail;
        if (e->events != NULL)
            dlog_set_hook(e->dlog, events_put, e->events);
        pthread_mutex_lock(&e->shaping_dlog_lock);
        e->dlogw_shaping = dlog_writer_new(e->dlog); /* NULL: no events, still logged */
        pthread_mutex_unlock(&e->shaping_dlog_lock);
        e->dlogw_tlsrpt = dlog_writer_new(e->dlog);
    }
    if (cfg->delivery.mta_sts && cfg->delivery.enabled) {
        struct mta_sts *m = NULL;
        rc = mta_sts_start(cfg, &m, err, errlen);
        e->mta_sts = m;
        if (rc < 0)
            goto fail;
    }
    struct tls_ctx *tls_server, *tls_client;
    rc = engine_tls_new(&cfg->tls, &tls_server, &tls_client, err, errlen);
    if (rc < 0)
        goto fail;
    e->tls_server = tls_server;
    e->tls_client = tls_client;
    for (enum reread i = RR_CERT; i < RR_USERS; i++)
        e->reread_digest[i] = engine_reread_digest(cfg, i);
    rc = dkim_pool_new(cfg->dkim.threads, cfg->dkim.queue_max, cfg->dkim.sign_on_worker,
                       &e->dkim_pool, err, errlen);
    if (rc < 0)
        goto fail;
    e->workers = calloc(cfg->server.workers, sizeof(*e->workers));
    e->srv = calloc(cfg->server.workers, sizeof(*e->srv));
    e->dlv = calloc(cfg->server.workers, sizeof(*e->dlv));
    e->dlogw = calloc(cfg->server.workers, sizeof(*e->dlogw));
    if (cfg->server.workers > 1)
        e->route = route_new();
    e->site_addrs = site_addrs_new(cfg->server.workers);
    e->node_caps = node_caps_new(cfg->server.workers);
    e->gens = config_gens_new(cfg, cfg->server.workers);
    e->cfg_start = cfg;
    e->gens_msgs = calloc(cfg->server.workers, sizeof(*e->gens_msgs));
    e->warmup_cfg = cfg;
    if (e->workers == NULL || e->srv == NULL || e->dlv == NULL || e->dlogw == NULL ||
        (cfg->server.workers > 1 && e->route == NULL) || e->site_addrs == NULL || e->node_caps == NULL ||
        e->gens == NULL || e->gens_msgs == NULL) {
        snprintf(err, errlen, "out of memory for %u workers", cfg->server.workers);
        rc = -ENOMEM;
        goto fail;
    }
    for (unsigned i = 0; i < cfg->server.workers; i++) {
        rc = worker_init(&e->workers[i], i, cfg->server.ring_entries, e);
        if (rc < 0) {
            snprintf(err, errlen,
                     "cannot set up io_uring for worker %u: %s%s", i, strerror(-rc),
                     rc == -EPERM || rc == -ENOSYS
                         ? " (io_uring disabled? see /proc/sys/kernel/io_uring_disabled)"
                     : rc == -ENOMEM ? " (locked memory limit? try a smaller [server] ring_entries)"
                                     : "");
            goto fail;
        }
        e->nworkers++;
        e->workers[i].on_failed = engine_on_worker_failed;
        if (e->dlog != NULL && (e->dlogw[i] = dlog_writer_new(e->dlog)) == NULL) {
            snprintf(err, errlen, "out of memory for the delivery log");
            rc = -ENOMEM;
            goto fail;
        }
        if (i == 0 && (rc = server_listen_check(cfg, err, errlen)) < 0)
            goto fail;
        rc = server_worker_new(e, &e->workers[i], &e->srv[i], err, errlen);
        if (rc < 0)
            goto fail;
        rc = delivery_new(e, &e->workers[i], &e->dlv[i], err, errlen);
        if (rc < 0)
            goto fail;
        struct start_msg *sm = calloc(1, sizeof(*sm));
        if (sm == NULL) {
            rc = -ENOMEM;
            goto fail;
        }
        sm->m.fn = on_start;
        sm->sw = e->srv[i];
        sm->dlv = e->dlv[i];
        worker_post(&e->workers[i], &sm->m);
    }
    /* Before any listener is armed, so that no message being injected can
     * also be found by the walk (it would be delivered twice). The jobs
     * wait in the workers' mailboxes behind their start messages. */
    if ((rc = requeue_spool(e, err, errlen)) < 0)
        goto fail;
    rc = test_hook_fail_ring(e, err, errlen);
    if (rc < 0)
        goto fail;
    for (unsigned i = 0; i < e->nworkers; i++) {
        rc = worker_start(&e->workers[i]);
        if (rc < 0) {
            snprintf(err, errlen, "cannot start worker thread %u: %s", i, strerror(-rc));
            goto fail;
        }
    }
    /* the workers take jobs now: a bounce action bounces what waits */
    shaping_set_bounce_hook(e->shaping, delivery_shaping_bounce, e);
    rc = ops_start(e, err, errlen);
    if (rc < 0)
        goto fail;
    /* Reports by mail once the workers run: delivery_submit posts to them. */
    if (e->mta_sts != NULL)
        tlsrpt_set_mailer(mta_sts_tlsrpt(e->mta_sts), engine_tlsrpt_mail, e);
    return 0;
fail:
    engine_stop(e);
    return rc;
}

enum engine_drain_end
engine_drain(struct engine *e, uint64_t timeout_ms, const sigset_t *cut)
{
    /* The main thread, which called this, does no reload from now on (it
     * waits for the signals of cut, then stops; a SIGHUP only reopens the
     * logs, below): a `sluicectl reload` waiting for one is told now, not
     * "requested" 8 s later. */
    engine_reload_draining(e);
    /* From before the workers hear of it: their event=draining lines come
     * after the deadline is set. */
    uint64_t end = clock_mono_ns() + MS_TO_NS(timeout_ms);
    for (unsigned i = 0; i < e->nworkers; i++) {
        if (e->srv[i] != NULL)
            server_worker_drain(e->srv[i], timeout_ms);
        if (e->dlv[i] != NULL)
            delivery_drain(e->dlv[i]);
    }
    /* A bounded wait for the workers' word (no event to block on here:
     * the main thread has nothing else to do meanwhile). The bound is the
     * clock's: counted in steps of 20 ms, each sleep's lateness added up
     * (a loaded machine: 32 s for a drain_timeout of 30), and a process
     * stopped meanwhile (SIGSTOP, a VM paused) drained for that long too. */
    /* A failed worker never reports: it holds nothing that can finish. */
    /* A SIGHUP now is taken here too (it would otherwise stay pending,
     * unseen, to the exit), and so is one during the stop that follows
     * (stop_takes_hup): no reload (a config swapped under a stop, for a
     * process about to exit), but the logs are reopened, as logrotate's
     * postrotate asks; kept on the renamed file to the exit, the drain's
     * lines would go where the rotation may have compressed them. */
    sigset_t waited;
    sigemptyset(&waited);
    if (cut != NULL) {
        waited = *cut;
        sigaddset(&waited, SIGHUP);
        e->stop_takes_hup = true;
    }
    for (;;) {
        if (atomic_load(&e->drained) + atomic_load(&e->failed) >= e->nworkers)
            return ENGINE_DRAIN_DONE;
        uint64_t now = clock_mono_ns();
        if (now >= end)
            return ENGINE_DRAIN_TIMED_OUT;
        uint64_t ns = end - now < 20 * 1000000ull ? end - now : 20 * 1000000ull;
        struct timespec step = {0, (long)ns};
        if (cut == NULL) {
            nanosleep(&step, NULL);
            continue;
        }
        /* An operator who will not wait (Ctrl-C again, a second kill):
         * the stop goes on at once, what is in flight stays queued, and
         * the stop's own waits for the spool are not shortened. */
        siginfo_t si;
        int sig = sigtimedwait(&waited, &si, &step);
        if (sig == SIGHUP) {
            engine_hup_draining(e, &si);
            continue;
        }
        if (sig > 0 && si.si_pid != getpid()) {
            uint64_t waited_ms = (clock_mono_ns() - (end - MS_TO_NS(timeout_ms))) / 1000000;
            log_msg(LOG_WARN,
                    "event=drain_cut signal=%s sender_pid=%ld waited_ms=%llu "
                    "note=what_was_in_flight_stays_queued",
                    sig == SIGINT ? "INT" : "TERM", (long)si.si_pid, (unsigned long long)waited_ms);
            return ENGINE_DRAIN_CUT;
        }
    }
}

/* The stop's last bound (engine_stop): past it, the process exits. */
#define STOP_BOUND_MS (SERVER_STOP_COMMIT_WAIT_MS + 30000)

/* After a wait for the spool's answers was cut (it answered nothing for
 * SERVER_STOP_COMMIT_WAIT_MS), the spool's close waits this long for its
 * committer: one that answers now (a disk slow, not dead) is closed as
 * always; one still stuck is not waited for what is left of
 * STOP_BOUND_MS. */
#define STOP_SPOOL_CLOSE_AFTER_CUT_MS 5000u

struct stop_watch {
    pthread_mutex_t mu;
    pthread_cond_t cv; /* on CLOCK_MONOTONIC */
    bool done;         /* engine_stop came to its end */
    uint64_t bound_ms;
    pthread_t th;
    _Atomic(const char *) stage; /* static: what engine_stop waits for now */
    atomic_bool said;  /* the last lines of a stop given up are written */
};

/* A stop given up waits this long at most for its last lines (the logs
 * may be on the disk that hung it). */
#define STOP_LAST_WORDS_MS 1000u

/* A stop given up: what a worker stuck in its stop kept, the delivery
 * log's lines not yet written (its hook: no lock taken, one may be held
 * forever there), then why the process exits. */
static void *
stop_last_words(void *arg)
{
    struct stop_watch *sw = arg;
    log_altstack_init();
    log_flush_all();
    log_msg(LOG_CRIT,
            "event=stop_stuck waited_ms=%llu stage=%s exit=%d "
            "note=what_the_spool_did_not_confirm_was_never_acknowledged",
            (unsigned long long)sw->bound_ms, atomic_load(&sw->stage), ENGINE_EXIT_FAILED);
    atomic_store(&sw->said, true);
    return NULL;
}

/* The watch's thread: waits for the stop's end; past the bound, the stop
 * waits on something that will not answer, most likely a dead disk under
 * the spool's committer (queue_close joins it, with no bound of its own;
 * the servers' and deliveries' waits for its answers end at
 * stop_commit_until, their messages logged); stage says which
 * step. Exiting then loses no mail: what the spool did not confirm was
 * never acknowledged to a client, and what it did is on disk (as after a
 * kill -9); a delivery whose outcome it did not store is sent again after
 * the restart (at least once); the warm-up counts and shaping state taken since their last
 * save are lost when the stop hung before their close. */
static void *
stop_watch_main(void *arg)
{
    struct stop_watch *sw = arg;
    log_altstack_init();
    struct timespec at = clock_mono_deadline(sw->bound_ms);
    pthread_mutex_lock(&sw->mu);
    int rc = 0;
    while (!sw->done && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&sw->cv, &sw->mu, &at);
    bool done = sw->done;
    pthread_mutex_unlock(&sw->mu);
    if (!done) {
        /* The last lines are written by a thread of their own: the disk
         * that hangs the stop may hold the logs too, and a write(2) to it
         * would hang this one past its own bound. The exit comes after
         * STOP_LAST_WORDS_MS whatever they managed. */
        pthread_t th;
        atomic_store(&sw->said, false);
        bool wrote = pthread_create(&th, NULL, stop_last_words, sw) == 0;
        if (wrote)
            pthread_detach(th);
        struct timespec tick = {0, 10 * 1000000L};
        for (unsigned i = 0; wrote && i < STOP_LAST_WORDS_MS / 10 && !atomic_load(&sw->said); i++)
            nanosleep(&tick, NULL);
        _exit(ENGINE_EXIT_FAILED);
    }
    return NULL;
}

/* Start the watch; false when it could not start (the stop then has no
 * bound, as before). */
static bool
stop_watch_start(struct stop_watch *sw)
{
    memset(sw, 0, sizeof(*sw));
    sw->bound_ms = STOP_BOUND_MS;
#ifdef SLUICE_TEST_HOOKS
    /* SLUICE_TEST_STOP_BOUND_MS=MS: the bound, shorter than the stop's own
     * waits, for a test. */
    const char *b = getenv("SLUICE_TEST_STOP_BOUND_MS");
    if (b != NULL && *b != '\0') {
        sw->bound_ms = strtoull(b, NULL, 10);
        log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_STOP_BOUND_MS ms=%llu",
                (unsigned long long)sw->bound_ms);
    }
#endif
    atomic_init(&sw->stage, "workers");
    atomic_init(&sw->said, false);
    int rc = clock_cond_init_mono(&sw->cv);
    if (rc != 0) {
        log_msg(LOG_WARN, "event=stop_unbounded reason=no_clock err=\"%s\"", strerror(-rc));
        return false;
    }
    pthread_mutex_init(&sw->mu, NULL);
    if (pthread_create(&sw->th, NULL, stop_watch_main, sw) != 0) {
        pthread_cond_destroy(&sw->cv);
        pthread_mutex_destroy(&sw->mu);
        log_msg(LOG_WARN, "event=stop_unbounded reason=no_thread");
        return false;
    }
    return true;
}

static void
stop_watch_end(struct stop_watch *sw)
{
    pthread_mutex_lock(&sw->mu);
    sw->done = true;
    pthread_cond_signal(&sw->cv);
    pthread_mutex_unlock(&sw->mu);
    pthread_join(sw->th, NULL);
    pthread_cond_destroy(&sw->cv);
    pthread_mutex_destroy(&sw->mu);
}

#ifdef SLUICE_TEST_HOOKS
/* SLUICE_TEST_STOP_STALL=STAGE: the stop hangs when it comes to that
 * stage of engine_stop (up to ten minutes), as it would on a dead disk in
 * one of its waits that have no bound of their own (queue_close's join of
 * a committer that never returns: stage spool), for the stop watch's
 * test. Test-hook builds only. */
static void
test_hook_stop_stall(const char *stage)
{
    const char *want = getenv("SLUICE_TEST_STOP_STALL");
    if (want == NULL || strcmp(want, stage) != 0)
        return;
    log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_STOP_STALL stage=%s", stage);
    struct timespec tick = {0, 100 * 1000000L};
    for (unsigned i = 0; i < 6000; i++)
        nanosleep(&tick, NULL);
}
#else
#define test_hook_stop_stall(stage) ((void)0)
#endif

void
engine_stop(struct engine *e)
{
    struct stop_watch watch;
    struct stop_hup hup;
    atomic_store(&e->stopping, true); /* before ops_stop waits for a command under way */
    engine_reload_stopping(e);        /* a `sluicectl reload` waits no more: no reload now */
    /* A SIGHUP from now on (the main thread takes none until the exit)
     * reopens the logs; one sent since the drain ended is taken first. */
    bool hup_taken = e->stop_takes_hup && engine_stop_hup_start(&hup, e);
    bool watched = e->nworkers > 0 && stop_watch_start(&watch);
#define STOP_STAGE(name)                                                                           \
    do {                                                                                           \
        if (watched)                                                                               \
            atomic_store(&watch.stage, name);                                                      \
        test_hook_stop_stall(name);                                                                \
    } while (0)
    STOP_STAGE("shaping_bounce_hook"); /* a bounce action's spool walk under way ends first */
    shaping_set_bounce_hook(e->shaping, NULL, NULL); /* before the workers go */
    /* No report is mailed once the workers stop (it waits for the next
     * start); a send in progress ends first, once the spool answered its
     * commit (engine_tlsrpt_mail). */
    STOP_STAGE("tlsrpt_mail");
    if (e->mta_sts != NULL)
        tlsrpt_set_mailer(mta_sts_tlsrpt(e->mta_sts), NULL, NULL);
    STOP_STAGE("stats");
    ops_stop(e);
    for (unsigned i = 0; i < e->nworkers; i++) {
        if (!e->workers[i].started)
            continue;
        if (e->dlv[i] != NULL)
            delivery_stop(e->dlv[i]); /* ends the loop once it has let go */
        else
            worker_stop(&e->workers[i]);
    }
    STOP_STAGE("workers");
    for (unsigned i = 0; i < e->nworkers; i++) {
        int rc = worker_join(&e->workers[i]);
        if (rc < 0 && !e->workers[i].failed)
            log_msg(LOG_ERR, "event=worker_failed worker=%u err=%s", i, strerror(-rc));
    }
    /* Signing jobs still in the pool come back (cancelled) to the
     * mailboxes swept below, before their sessions are freed. */
    e->dkim_pool = dkim_pool_free(e->dkim_pool);
    /* Before the servers free their sessions: no hash job may still run
     * for one (those done wait in the mailboxes; each server takes its own
     * out). */
    e->auth_pool = auth_pool_free(e->auth_pool);
    STOP_STAGE("servers_and_spool_answers");
    for (unsigned i = 0; i < e->nworkers; i++) {
        /* Messages never delivered (a failed start, or a worker whose ring
         * failed), before their owners go: some are embedded in them. */
        struct worker_msg *m = e->workers[i].mbox_head;
        while (m != NULL) {
            struct worker_msg *next = m->next;
            if (m->fn == on_start)
                free(m);
            else if (!dkim_pool_msg_free(m))
                delivery_msg_free(m);
            m = next;
        }
        e->workers[i].mbox_head = NULL;
        if (e->stop_commit_until == 0)
            e->stop_commit_until = clock_mono_ns() + MS_TO_NS(SERVER_STOP_COMMIT_WAIT_MS);
        e->srv[i] = server_worker_free(e->srv[i]);
        e->dlv[i] = delivery_free(e->dlv[i]);
        worker_fini(&e->workers[i]);
        if (e->dlogw != NULL)
            e->dlogw[i] = dlog_writer_free(e->dlogw[i]);
    }
    /* After the workers and the stats thread (nobody asks), before the
     * delivery log (its events are written out). */
    STOP_STAGE("shaping");
    e->shaping = shaping_close(e->shaping); /* after the workers: nobody asks */
    pthread_mutex_lock(&e->shaping_dlog_lock);
    e->dlogw_shaping = dlog_writer_free(e->dlogw_shaping);
    pthread_mutex_unlock(&e->shaping_dlog_lock);
    pthread_mutex_destroy(&e->shaping_dlog_lock);
    /* After every worker: none asks for a policy or reports a session. */
    e->mta_sts = mta_sts_free(e->mta_sts);
    e->dlogw_tlsrpt = dlog_writer_free(e->dlogw_tlsrpt);
    /* After every worker: what they logged is written out. */
    STOP_STAGE("delivery_log");
    if (hup_taken)
        engine_stop_hup_dlog_closes(&hup); /* its last lines go to the file it has now */
    e->dlog = dlog_free(e->dlog);
    bool events_busy = false;
    e->events = events_free_busy(e->events, &events_busy); /* after every writer, before the spool */
    if (events_busy)
        /* the pump's requests went unanswered for its last wait (10 s,
         * events_port_busy_at_stop): the spool's committer is as stuck as
         * after a cut, its close is not waited for longer either */
        e->stop_cut = true;
    free(e->dlogw);
    e->dlogw = NULL;
    free(e->workers);
    free(e->srv);
    free(e->dlv);
    route_free(e->route);
    e->route = NULL;
    site_addrs_free(e->site_addrs); /* after every worker's connections */
    e->site_addrs = NULL;
    node_caps_free(e->node_caps); /* after every worker's limiter */
    e->node_caps = NULL;
    e->workers = NULL;
    e->srv = NULL;
    e->dlv = NULL;
    e->nworkers = 0;
    /* After every worker: the last notes. Their trim waits for the spool's
     * answer, not cut short (suppress_notes.c): a spool that never answers
     * holds the stop here until its bound names this stage. After a cut
     * (the spool answered nothing already) none is asked: they stay in
     * the spool, copied again at the next start. */
    STOP_STAGE("suppress_notes");
    if (e->stop_cut)
        suppress_detach_queue_stuck(e->suppress);
    else
        suppress_detach_queue(e->suppress);
    STOP_STAGE("spool");
    if (e->queue != NULL && e->stop_cut) {
        /* The spool answered nothing for the whole wait: its committer is
         * most likely stuck in a write or sync that will not return (a
         * dead disk). A short wait for one that answers now; past it the
         * spool is left open to the exit (as after a kill -9: what it did
         * not confirm was never acknowledged, what it did is on disk). */
        uint64_t t0 = clock_mono_ns();
        if (!queue_close_within(e->queue, STOP_SPOOL_CLOSE_AFTER_CUT_MS)) {
            e->stop_given_up = true;
            log_msg(LOG_CRIT,
                    "event=stop_spool_given_up waited_ms=%llu exit=%d "
                    "note=spool_not_answering_what_it_did_not_confirm_was_never_acknowledged",
                    (unsigned long long)((clock_mono_ns() - t0) / 1000000), ENGINE_EXIT_FAILED);
        }
    } else if (e->queue != NULL) {
        queue_close(e->queue);
    }
    e->queue = NULL;
    suppress_close(e->suppress); /* after the workers and the stats thread: nobody checks */
    e->suppress = NULL;
    STOP_STAGE("warmup");
    e->warmup = warmup_close(e->warmup);
    e->names = intern_free(e->names); /* after every worker: jobs hold ids */
    e->users = auth_db_unref(e->users);
    e->auth_limit = auth_limit_free(e->auth_limit);
    pthread_mutex_destroy(&e->users_lock);
    e->dkim_keys = dkim_keyring_unref(e->dkim_keys);
    pthread_mutex_destroy(&e->dkim_lock);
    pthread_mutex_destroy(&e->reload_lock);
    pthread_cond_destroy(&e->reload_cv);
    e->tls_server = tls_ctx_unref(e->tls_server);
    e->tls_client = tls_ctx_unref(e->tls_client);
    pthread_mutex_destroy(&e->tls_lock);
    free(e->per_ip.slots);
    e->per_ip.slots = NULL;
    pthread_mutex_destroy(&e->per_ip.lock);
    /* Last: nobody reads a config any more (warm-up's flush above reads
     * its plans). The first is the caller's. */
    e->gens = config_gens_free(e->gens);
    free(e->gens_msgs);
    e->gens_msgs = NULL;
    /* Its join waits for a reopen under way: the log's open(2), on a disk
     * that may hang as the spool's does (a stop_stuck names this step). */
    STOP_STAGE("sighup_taker");
    if (hup_taken)
        engine_stop_hup_end(&hup);
    if (watched)
        stop_watch_end(&watch);
#undef STOP_STAGE
}

static struct tls_ctx *
tls_ref_locked(struct engine *e, struct tls_ctx *_Atomic *field)
{
    pthread_mutex_lock(&e->tls_lock);
    struct tls_ctx *ctx = *field != NULL ? tls_ctx_ref(*field) : NULL;
    pthread_mutex_unlock(&e->tls_lock);
    return ctx;
}

struct tls_ctx *
engine_tls_server(struct engine *e)
{
    return tls_ref_locked(e, &e->tls_server);
}

struct tls_ctx *
engine_tls_client(struct engine *e)
{
    return tls_ref_locked(e, &e->tls_client);
}

struct dkim_keyring *
engine_dkim_keys(struct engine *e)
{
    pthread_mutex_lock(&e->dkim_lock);
    struct dkim_keyring *kr = e->dkim_keys ? dkim_keyring_ref(e->dkim_keys) : NULL;
    pthread_mutex_unlock(&e->dkim_lock);
    return kr;
}

struct auth_db *
engine_users(struct engine *e)
{
    pthread_mutex_lock(&e->users_lock);
    struct auth_db *db = e->users ? auth_db_ref(e->users) : NULL;
    pthread_mutex_unlock(&e->users_lock);
    return db;
}
