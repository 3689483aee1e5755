/*
 * engine_reload: the config replaced while the engine runs (see
 * engine.h, engine_reload and what follows it): the workers parked while
 * the main thread swaps the config, the TLS contexts and the DKIM keys,
 * then each takes the new one up (park_on_worker); what only a restart
 * applies logged as kept (report_kept); the files read again under the
 * same names whose contents changed (enum reread, engine_int.h) added to
 * the changed list; the outcome kept for `sluicectl reload`
 * (engine_reload_done, engine_reload_wait; the drain and the stop end
 * that wait: engine_reload_draining, engine_reload_stopping); and the
 * configs a reload left alive, asked of the workers and freed
 * (engine_config_collect, config_gen.h); a SIGHUP once the drain has
 * begun, which reloads nothing but reopens the logs (engine_hup_draining,
 * and the stop's taker of it, struct stop_hup). The start, the stop and
 * the loads both share (the users file, the TLS contexts) are engine.c's.
 *
 * Threading: engine_reload, engine_reload_done, engine_reload_draining,
 * engine_reload_stopping, engine_hup_draining, engine_stop_hup_* and
 * engine_config_collect on the main thread; park_on_worker and
 * gens_on_worker on each worker; the stop's taker of SIGHUP on its own
 * thread; engine_reload_wait and the config's enter/leave on any thread.
 */
#include "engine/engine.h"

#include <errno.h>
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
#include "common/log.h"
#include "dkim/dkim.h"
#include "engine/config_gen.h"
#include "engine/delivery.h"
#include "engine/dlog.h"
#include "engine/engine_int.h"
#include "engine/events.h"
#include "engine/server.h"
#include "engine/warmup.h"

/* A SIGHUP in the drain or the stop is logged this often at most. */
#define HUP_LOG_EVERY_MS 1000

/* The keys and the paths of the files of enum reread (engine_int.h). */
static const char *const reread_key[RR_COUNT] = {"[tls] cert_file", "[tls] key_file",
                                                 "[tls] ca_file", "[server] auth_users_file"};

static const char *
reread_path(const struct config *c, enum reread i)
{
    switch (i) {
    case RR_CERT:
        return c->tls.cert_file;
    case RR_KEY:
        return c->tls.key_file;
    case RR_CA:
        return c->tls.ca_file;
    default:
        return c->server.auth_users_file;
    }
}

/* The digest of c's file i; 0: none named, or it cannot be read (the
 * load that follows says why). */
uint64_t
engine_reread_digest(const struct config *c, enum reread i)
{
    const char *p = reread_path(c, i);
    uint64_t d = 0;
    if (p == NULL || fs_digest(p, &d) < 0)
        return 0;
    return d;
}

/* ---- reload ---- */

struct park {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    unsigned arrived, left;
    bool go;
    struct engine *e;
    struct park_msg {
        struct worker_msg m;
        struct park *p;
    } *msgs; /* owned */
};

static void
park_unref(struct park *p)
{
    pthread_mutex_lock(&p->lock);
    bool last = --p->left == 0;
    pthread_mutex_unlock(&p->lock);
    if (last) {
        pthread_mutex_destroy(&p->lock);
        pthread_cond_destroy(&p->cv);
        free(p->msgs);
        free(p);
    }
}

/* On each worker: wait while the main thread swaps the config, then take
 * up the new one. */
static void
park_on_worker(struct worker *w, struct worker_msg *m)
{
    struct park *p = ((struct park_msg *)m)->p;
    struct engine *e = p->e;
    log_flush(); /* the worker's lines before the reload's (log.h) */
    pthread_mutex_lock(&p->lock);
    p->arrived++;
    pthread_cond_broadcast(&p->cv);
    while (!p->go)
        pthread_cond_wait(&p->cv, &p->lock);
    pthread_mutex_unlock(&p->lock);
    /* Read before the holders are re-pointed at e->cfg, which is this
     * generation or newer (config_gen.h); a worker late for this park
     * comes here with a newer config already, which is as good. */
    uint64_t view = config_gens_current(e->gens);
    server_worker_reconfigure(e->srv[w->id]);
    delivery_reconfigure(e->dlv[w->id]);
    config_gens_set_view(e->gens, w->id, view);
    config_holders_publish(e, w->id);
    park_unref(p);
}

/* On each worker, asked by engine_config_collect: publish how old a
 * config its state still points into (its sessions' messages and its
 * connections finish by and by). */
static void
gens_on_worker(struct worker *w, struct worker_msg *m)
{
    struct engine *e = w->ctx;
    config_holders_publish(e, w->id);
    atomic_store(&((struct gens_msg *)m)->posted, false);
}

unsigned
engine_config_generations(struct engine *e)
{
    return config_gens_alive(e->gens);
}

bool
engine_config_pending(struct engine *e)
{
    return e->gens != NULL && config_gens_pending(e->gens);
}

void
engine_config_collect(struct engine *e)
{
    if (e->gens == NULL)
        return;
    /* What the workers said last time frees now; what they say now frees
     * at the next call (the main thread does not wait for them). */
    unsigned n = config_gens_collect(e->gens);
    if (n > 0)
        log_msg(LOG_DEBUG, "event=configs_freed count=%u alive=%u", n,
                config_gens_alive(e->gens));
    if (!config_gens_pending(e->gens))
        return;
    for (unsigned i = 0; i < e->nworkers; i++) {
        struct gens_msg *g = &e->gens_msgs[i];
        if (atomic_exchange(&g->posted, true))
            continue; /* still in its mailbox */
        g->m.fn = gens_on_worker;
        worker_post(&e->workers[i], &g->m);
    }
}

uint64_t
engine_config_enter(struct engine *e)
{
    return config_gens_enter(e->gens);
}

void
engine_config_leave(struct engine *e, uint64_t token)
{
    config_gens_leave(e->gens, token);
}

/* Tell what the new config n changes that only a restart applies: where
 * it differs from o, the config the engine started on (what still runs:
 * a second reload of the same file says so again, and one that goes back
 * to o's values says nothing). */
static void
report_kept(const struct config *o, const struct config *n, char *out, size_t len)
{
#define SAME_STR(a, b) ((a) == (b) || ((a) != NULL && (b) != NULL && strcmp((a), (b)) == 0))
    struct {
        const char *key;
        bool same;
    } k[] = {
        {"server.listen", SAME_STR(o->server.listen, n->server.listen)},
        {"server.listen_tls", SAME_STR(o->server.listen_tls, n->server.listen_tls)},
        {"bounce.listen", SAME_STR(o->bounce.listen, n->bounce.listen)},
        {"server.workers", o->server.workers == n->server.workers},
        {"server.ring_entries", o->server.ring_entries == n->server.ring_entries},
        {"server.auth_hash_threads", o->server.auth_hash_threads == n->server.auth_hash_threads},
        {"server.auth_hash_queue", o->server.auth_hash_queue == n->server.auth_hash_queue},
        {"server.auth_failure_table",
         o->server.auth_failure_table == n->server.auth_failure_table},
        {"queue", SAME_STR(o->queue.path, n->queue.path) && o->queue.map_size == n->queue.map_size},
        /* Each worker's client session cache is sized at start. */
        {"tls.session_cache_size", o->tls.session_cache_size == n->tls.session_cache_size},
        {"stats", SAME_STR(o->stats.socket, n->stats.socket) &&
                      SAME_STR(o->stats.http_listen, n->stats.http_listen)},
        /* Each worker's limiter is made at start from the [redis] of
         * then (its connection, its outage share, its leases and
         * batches), and its backoff from [delivery]'s. */
        {"redis", SAME_STR(o->redis.url, n->redis.url) &&
                      SAME_STR(o->redis.password, n->redis.password) &&
                      SAME_STR(o->redis.key_prefix, n->redis.key_prefix) &&
                      o->redis.nodes == n->redis.nodes &&
                      o->redis.lease_ttl == n->redis.lease_ttl &&
                      o->redis.token_batch == n->redis.token_batch &&
                      o->redis.timeout == n->redis.timeout},
        {"delivery.backoff", o->delivery.backoff == n->delivery.backoff &&
                                 o->delivery.backoff_step == n->delivery.backoff_step},
        {"log.file", SAME_STR(o->log.file, n->log.file)},
        {"log.delivery_log", SAME_STR(o->log.delivery_log, n->log.delivery_log)},
        /* The list holds its own copy of [suppress] from the start. */
        {"suppress", o->suppress.enabled == n->suppress.enabled &&
                         SAME_STR(o->suppress.path, n->suppress.path) &&
                         o->suppress.map_size == n->suppress.map_size &&
                         o->suppress.lowercase_local == n->suppress.lowercase_local &&
                         o->suppress.strip_plus == n->suppress.strip_plus &&
                         o->suppress.gmail_dots == n->suppress.gmail_dots &&
                         SAME_STR(o->suppress.reply, n->suppress.reply) &&
                         SAME_STR(o->suppress.on_invalid_recipient,
                                  n->suppress.on_invalid_recipient) &&
                         SAME_STR(o->suppress.on_complaint, n->suppress.on_complaint)},
        {"dkim.threads", o->dkim.threads == n->dkim.threads},
        {"dkim.queue_max", o->dkim.queue_max == n->dkim.queue_max},
        {"dkim.sign_on_worker", o->dkim.sign_on_worker == n->dkim.sign_on_worker},
        /* Each worker's resolver (and the MTA-STS thread's) is made at
         * start from the [dns] of then: the servers, dnssec (DANE on or
         * off), timeouts and TTLs of a reload do not reach it. */
        {"dns", SAME_STR(o->dns.servers, n->dns.servers) && o->dns.timeout == n->dns.timeout &&
                    o->dns.tries == n->dns.tries && o->dns.family == n->dns.family &&
                    o->dns.prefer == n->dns.prefer && o->dns.cache_size == n->dns.cache_size &&
                    o->dns.min_ttl == n->dns.min_ttl && o->dns.max_ttl == n->dns.max_ttl &&
                    o->dns.negative_ttl == n->dns.negative_ttl &&
                    o->dns.error_ttl == n->dns.error_ttl &&
                    o->dns.max_mx_hosts == n->dns.max_mx_hosts && o->dns.dnssec == n->dns.dnssec &&
                    o->dns.max_inflight == n->dns.max_inflight},
    };
#undef SAME_STR
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < sizeof(k) / sizeof(k[0]); i++) {
        if (k[i].same)
            continue;
        log_msg(LOG_WARN, "event=reload_kept key=%s note=needs_a_restart", k[i].key);
        if (used < len)
            used += (size_t)snprintf(out + used, len - used, "%s%s", used > 0 ? ", " : "",
                                     k[i].key);
    }
}

/* Append ", key" (or "key" first) to the list of keys kept, out. */
static void
kept_add(char *out, size_t len, const char *key)
{
    size_t used = strlen(out);
    if (used < len)
        snprintf(out + used, len - used, "%s%s", used > 0 ? ", " : "", key);
}

/* Append ", what" (or "what" first) to the changed list out. */
static void changed_add(char *out, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
changed_add(char *out, size_t len, const char *fmt, ...)
{
    size_t used = strlen(out);
    if (used > 0 && used < len)
        used += (size_t)snprintf(out + used, len - used, ", ");
    if (used >= len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out + used, len - used, fmt, ap);
    va_end(ap);
}

/* What config_changes cannot see, added to its list: a file read again
 * under the same name (o's and n's) that holds other contents than at
 * its last load (digest: n's, read before this load), and DKIM signers
 * (key files, [dkim DOMAIN SELECTOR] sections, key_dir) that sign
 * otherwise. */
static void
changed_files(struct engine *e, const struct config *o, const struct config *n,
              const uint64_t digest[RR_COUNT], bool users_changed,
              const struct dkim_keyring *old_keys, char *out, size_t len)
{
#define SAME_STR(a, b) ((a) == (b) || ((a) != NULL && (b) != NULL && strcmp((a), (b)) == 0))
    for (enum reread i = RR_CERT; i < RR_USERS; i++) {
        if (SAME_STR(reread_path(o, i), reread_path(n, i)) && e->reread_digest[i] != 0 &&
            digest[i] != e->reread_digest[i])
            changed_add(out, len, "%s (the file's contents)", reread_key[i]);
        e->reread_digest[i] = digest[i];
    }
    if (users_changed && SAME_STR(reread_path(o, RR_USERS), reread_path(n, RR_USERS)))
        changed_add(out, len, "%s (the file's contents)", reread_key[RR_USERS]);
#undef SAME_STR
    if (!dkim_keyring_same(old_keys, n->dkim_keys))
        changed_add(out, len, "[dkim] signing keys");
}

int
engine_reload(struct engine *e, const struct config *ncfg)
{
    char err[512];
    int refused = 0;
    /* before the loads: a file replaced meanwhile is said at the next */
    uint64_t digest[RR_COUNT] = {0};
    for (enum reread i = RR_CERT; ncfg != NULL && i < RR_USERS; i++)
        digest[i] = engine_reread_digest(ncfg, i);
    /* The certificate and key are read again even when their paths did
     * not change: renewals replace the files in place. A file that does
     * not load refuses the whole config, as a config error would. */
    struct tls_ctx *tls_server = NULL, *tls_client = NULL;
    if (ncfg != NULL && e->nworkers > 0 &&
        (refused = engine_tls_new(&ncfg->tls, &tls_server, &tls_client, err, sizeof(err))) < 0) {
        log_msg(LOG_ERR, "event=reload_refused error=\"%s\"", err);
        pthread_mutex_lock(&e->reload_lock);
        snprintf(e->reload_why, sizeof(e->reload_why), "%s", err);
        pthread_mutex_unlock(&e->reload_lock);
        log_msg(LOG_ERR, "event=reload_failed what=config note=previous_config_kept");
        ncfg = NULL;
    }
    char changed[1024] = "", kept[512] = "";
    int users_rc = 0;
    bool users_loaded = false;
    pthread_mutex_lock(&e->reload_lock);
    e->reload_changed[0] = e->reload_kept[0] = '\0';
    pthread_mutex_unlock(&e->reload_lock);
    if (ncfg != NULL && e->nworkers > 0) {
        report_kept(e->cfg_start, ncfg, kept, sizeof(kept));
        config_changes(e->cfg, ncfg, changed, sizeof(changed));
        struct park *p = config_gens_reserve(e->gens) == 0 ? calloc(1, sizeof(*p)) : NULL;
        if (p != NULL && (p->msgs = calloc(e->nworkers, sizeof(*p->msgs))) == NULL) {
            free(p);
            p = NULL;
        }
        if (p == NULL) {
            log_msg(LOG_ERR, "event=reload_failed what=config reason=out_of_memory");
        } else {
            pthread_mutex_init(&p->lock, NULL);
            clock_cond_init_mono(&p->cv);
            p->e = e;
            p->left = e->nworkers + 1;
            for (unsigned i = 0; i < e->nworkers; i++) {
                p->msgs[i].m.fn = park_on_worker;
                p->msgs[i].p = p;
                worker_post(&e->workers[i], &p->msgs[i].m);
            }
            /* Every worker parked (or 2 s passed: a late one takes the new
             * config when it gets there), swap, let them go. */
            struct timespec until = clock_mono_deadline(2000);
            pthread_mutex_lock(&p->lock);
            while (p->arrived < e->nworkers)
                if (pthread_cond_timedwait(&p->cv, &p->lock, &until) != 0)
                    break;
            unsigned parked = p->arrived;
            const struct config *ocfg = e->cfg;
            e->cfg = ncfg;
            atomic_store(&e->campaign_names, ncfg->server.campaign_names);
            /* After the store: a reader that sees the new generation sees
             * ncfg (config_gen.h). The old one is freed by a later
             * engine_config_collect, once every worker, parked now or late,
             * and every reader outside them moved past it. */
            config_gens_swap(e->gens, ncfg);
            pthread_mutex_lock(&e->dkim_lock);
            struct dkim_keyring *old_keys = e->dkim_keys;
            e->dkim_keys = ncfg->dkim_keys ? dkim_keyring_ref(ncfg->dkim_keys) : NULL;
            pthread_mutex_unlock(&e->dkim_lock);
            pthread_mutex_lock(&e->tls_lock);
            struct tls_ctx *old_server = e->tls_server, *old_client = e->tls_client;
            e->tls_server = tls_server;
            e->tls_client = tls_client;
            pthread_mutex_unlock(&e->tls_lock);
            tls_server = old_server; /* dropped below; their connections hold their own */
            tls_client = old_client;
            p->go = true;
            pthread_cond_broadcast(&p->cv);
            pthread_mutex_unlock(&p->lock);
            park_unref(p);
            /* Plans follow the new config; today's counts stay. */
            if (warmup_reload(e->warmup, ncfg) < 0) {
                log_msg(LOG_ERR, "event=reload_failed what=warmup reason=out_of_memory "
                                 "note=previous_plans_kept");
                /* Its plans still point into that one: kept to the end. */
                config_gens_pin(e->gens, e->warmup_cfg);
            } else {
                e->warmup_cfg = ncfg; /* it no longer reads the one before */
            }
            if (engine_mta_sts_reload(e, ncfg))
                kept_add(kept, sizeof(kept), "mta_sts");
            engine_suppress_fold_tags(e, ncfg);
            log_set_level((enum log_level)ncfg->log.level);
            /* The users of the new config's file, before the log line
             * says whether they changed. */
            bool users_changed = false;
            users_rc = engine_load_users(e, &users_changed, err, sizeof(err));
            users_loaded = true;
            changed_files(e, ocfg, ncfg, digest, users_changed, old_keys, changed,
                          sizeof(changed));
            dkim_keyring_unref(old_keys);
            log_msg(LOG_NOTICE, "event=config_reloaded path=%s workers_parked=%u/%u changed=\"%s\"",
                    ncfg->path, parked, e->nworkers, changed[0] != '\0' ? changed : "none");
            pthread_mutex_lock(&e->reload_lock); /* for `sluicectl reload` */
            snprintf(e->reload_changed, sizeof(e->reload_changed), "%s", changed);
            snprintf(e->reload_kept, sizeof(e->reload_kept), "%s", kept);
            pthread_mutex_unlock(&e->reload_lock);
        }
    }
    tls_ctx_unref(tls_server);
    tls_ctx_unref(tls_client);
    if (ncfg != NULL && e->nworkers > 0) {
        /* [events NAME] sections (events.h); the module is made at start
         * only when there is a sink (with the delivery log's writers). */
        if (e->events != NULL)
            events_reconfigure(e->events, ncfg->events, ncfg->nevents);
        else if (ncfg->nevents > 0) {
            log_msg(LOG_WARN, "event=reload_kept key=events note=needs_a_restart "
                              "reason=no_sink_at_start");
            if (e->cfg == ncfg) { /* taken: what `sluicectl reload` says */
                pthread_mutex_lock(&e->reload_lock);
                kept_add(e->reload_kept, sizeof(e->reload_kept), "events");
                pthread_mutex_unlock(&e->reload_lock);
            }
        }
    }
    if (e->dlog != NULL)
        dlog_reopen(e->dlog); /* logrotate: the writer thread reopens the path */
    /* A config refused (or not taken: no memory) is refused whole: the
     * users file stays as it was loaded too. Read again with it, a
     * reload that said "previous config kept" let new users in. */
    int rc = users_loaded ? users_rc : 0;
    if (rc < 0)
        log_msg(LOG_ERR, "event=reload_failed what=users reason=\"%s\" kept=previous", err);
    pthread_mutex_lock(&e->reload_lock); /* for `sluicectl reload` */
    snprintf(e->reload_users, sizeof(e->reload_users), "%s", rc < 0 ? err : "");
    pthread_mutex_unlock(&e->reload_lock);
    return refused < 0 ? refused : rc;
}

void
engine_reload_done(struct engine *e, bool ok, const char *why)
{
    pthread_mutex_lock(&e->reload_lock);
    e->reload_ok = ok;
    if (ok)
        e->reload_why[0] = '\0';
    else if (why != NULL)
        snprintf(e->reload_why, sizeof(e->reload_why), "%s", why);
    e->reload_gen++;
    pthread_cond_broadcast(&e->reload_cv);
    pthread_mutex_unlock(&e->reload_lock);
}

uint64_t
engine_reload_gen(struct engine *e)
{
    pthread_mutex_lock(&e->reload_lock);
    uint64_t g = e->reload_gen;
    pthread_mutex_unlock(&e->reload_lock);
    return g;
}

void
engine_reload_stopping(struct engine *e)
{
    /* Under the lock: a waiter that looked at e->stopping before it was
     * set is in its wait by now, and this wakes it. */
    pthread_mutex_lock(&e->reload_lock);
    pthread_cond_broadcast(&e->reload_cv);
    pthread_mutex_unlock(&e->reload_lock);
}

void
engine_reload_draining(struct engine *e)
{
    pthread_mutex_lock(&e->reload_lock);
    atomic_store(&e->draining, true);
    pthread_cond_broadcast(&e->reload_cv);
    pthread_mutex_unlock(&e->reload_lock);
}

int
engine_reload_wait(struct engine *e, uint64_t gen, unsigned timeout_ms,
                   struct engine_reload_outcome *out)
{
    struct timespec until = clock_mono_deadline(timeout_ms);
    int rc = -ETIMEDOUT;
    pthread_mutex_lock(&e->reload_lock);
    /* Once the drain has begun (or the stop, without one) the main thread
     * takes no SIGHUP: a reload not finished by then never will be.
     * Waited for, it answered "requested" after timeout_ms, as if it were
     * still to come, and a stop held in ops_stop as long: the drain and
     * the stop wake it (engine_reload_draining, _stopping). */
    while (e->reload_gen == gen && !atomic_load(&e->stopping) && !atomic_load(&e->draining))
        if (pthread_cond_timedwait(&e->reload_cv, &e->reload_lock, &until) != 0)
            break;
    if (e->reload_gen == gen && atomic_load(&e->stopping))
        rc = -ECANCELED;
    else if (e->reload_gen == gen && atomic_load(&e->draining))
        rc = -ESHUTDOWN;
    if (e->reload_gen != gen) { /* finished, the drain or stop begun or not: its outcome */
        rc = e->reload_ok ? 1 : 0;
        snprintf(out->why, sizeof(out->why), "%s", e->reload_why);
        snprintf(out->changed, sizeof(out->changed), "%s", rc == 1 ? e->reload_changed : "");
        snprintf(out->kept, sizeof(out->kept), "%s", rc == 1 ? e->reload_kept : "");
        snprintf(out->users, sizeof(out->users), "%s", rc == 1 ? e->reload_users : "");
    }
    pthread_mutex_unlock(&e->reload_lock);
    return rc;
}

/* The logs reopened for a SIGHUP that reloads nothing, and the line that
 * says so. dl: the delivery log to reopen (its writer thread does, before
 * its next batch; a failure is its own line, event=dlog_reopen_failed),
 * or NULL; dl_state: what the line says of it. The log first, so that
 * the line is in the new file. One line a second at most: a storm of
 * SIGHUPs in a drain (a loop of kill -HUP, a logrotate run per file)
 * wrote one each, thousands; each is still a reopen, and the next line
 * counts those not logged since the last (unlogged_before). A reopen
 * whose outcome differs from the last line's is logged at once. */
static void
hup_ignored(struct engine *e, const siginfo_t *si, const char *reason, struct dlog *dl,
            const char *dl_state)
{
    int rc = log_reopen();
    if (dl != NULL)
        dlog_reopen(dl);
    uint64_t now = clock_mono_ms();
    /* A reopen that fails where the last line's worked (the log's
     * directory gone, a disk full) is said at once, and so is one that
     * works again: a rotation right after another in the same second
     * left its failure unsaid, the log kept in the renamed file. */
    bool failed = rc < 0;
    if (now < atomic_load(&e->hup_log_next_ms) && failed == atomic_load(&e->hup_log_failed)) {
        atomic_fetch_add(&e->hup_unlogged, 1);
        return;
    }
    atomic_store(&e->hup_log_next_ms, now + HUP_LOG_EVERY_MS);
    atomic_store(&e->hup_log_failed, failed);
    unsigned before = atomic_exchange(&e->hup_unlogged, 0);
    if (rc < 0)
        log_msg(LOG_ERR,
                "event=reload_ignored reason=%s signal=HUP sender_pid=%ld log_reopened=no "
                "err=\"%s\" delivery_log=%s unlogged_before=%u "
                "note=the_next_start_reads_the_file",
                reason, (long)si->si_pid, strerror(-rc), dl_state, before);
    else
        log_msg(LOG_WARN,
                "event=reload_ignored reason=%s signal=HUP sender_pid=%ld log_reopened=yes "
                "delivery_log=%s unlogged_before=%u note=the_next_start_reads_the_file",
                reason, (long)si->si_pid, dl_state, before);
}

void
engine_hup_draining(struct engine *e, const siginfo_t *si)
{
    hup_ignored(e, si, "draining", e->dlog, e->dlog != NULL ? "reopened" : "none");
}

static void
stop_hup_take(struct stop_hup *h, const siginfo_t *si)
{
    struct engine *e = h->e;
    /* Under the lock: the stop does not close the delivery log between
     * the look and the reopen's flag (dlog_reopen only sets it). */
    pthread_mutex_lock(&h->mu);
    struct dlog *dl = h->dlog_closed ? NULL : e->dlog;
    if (dl != NULL)
        dlog_reopen(dl);
    const char *state = dl != NULL ? "reopened" : h->had_dlog ? "closed" : "none";
    pthread_mutex_unlock(&h->mu);
    hup_ignored(e, si, "stopping", NULL, state);
}

static void *
stop_hup_main(void *arg)
{
    struct stop_hup *h = arg;
    log_altstack_init();
    log_set_thread_name("stop");
    sigset_t hup;
    sigemptyset(&hup);
    sigaddset(&hup, SIGHUP);
    sigaddset(&hup, SIGTERM);
    sigaddset(&hup, SIGINT);
    for (;;) {
        siginfo_t si;
        int sig = sigwaitinfo(&hup, &si); /* blocked here, as in every thread (main.c) */
        if (sig < 0) {
            if (errno == EINTR)
                continue;
            log_msg(LOG_ERR, "event=sigwait_failed err=\"%s\" note=sighup_not_taken_in_the_stop",
                    strerror(errno));
            return NULL;
        }
        /* The stop's end wakes this by a SIGHUP of its own, sent to this
         * thread alone (pthread_kill; its si_code is not always SI_TKILL:
         * SI_USER, as an operator's kill(1), on a Linux 6.18 here, so
         * only the sender tells them apart). An operator's that comes
         * with it is taken by engine_stop_hup_end. */
        if (sig == SIGHUP && si.si_pid == getpid() && atomic_load(&h->done))
            return NULL;
        if (sig != SIGHUP) {
            /* The stop is under way already (the drain is over): it goes
             * on to its end, bounded by its watch; said, not left
             * pending and unseen. */
            log_msg(LOG_WARN, "event=signal_ignored signal=%s sender_pid=%ld reason=stopping",
                    sig == SIGTERM ? "TERM" : "INT", (long)si.si_pid);
            continue;
        }
        stop_hup_take(h, &si);
    }
}

bool
engine_stop_hup_start(struct stop_hup *h, struct engine *e)
{
    memset(h, 0, sizeof(*h));
    h->e = e;
    h->had_dlog = e->dlog != NULL;
    atomic_init(&h->done, false);
    pthread_mutex_init(&h->mu, NULL);
    int rc = pthread_create(&h->th, NULL, stop_hup_main, h);
    if (rc != 0) {
        pthread_mutex_destroy(&h->mu);
        log_msg(LOG_WARN, "event=sighup_not_taken_in_the_stop reason=no_thread err=\"%s\"",
                strerror(rc));
        return false;
    }
    return true;
}

void
engine_stop_hup_dlog_closes(struct stop_hup *h)
{
    pthread_mutex_lock(&h->mu);
    h->dlog_closed = true;
    pthread_mutex_unlock(&h->mu);
}

void
engine_stop_hup_end(struct stop_hup *h)
{
    atomic_store(&h->done, true);
    pthread_kill(h->th, SIGHUP);
    pthread_join(h->th, NULL);
    /* One come after the taker's last look (or while it could not look):
     * taken here, without waiting, rather than left pending, unseen, to
     * the exit. A few at most: a sender that never stops does not hold
     * the stop (pending, they merge into one; one more may come as each
     * is taken). */
    sigset_t hup;
    sigemptyset(&hup);
    sigaddset(&hup, SIGHUP);
    struct timespec now = {0, 0};
    siginfo_t si;
    for (unsigned i = 0; i < 4 && sigtimedwait(&hup, &si, &now) == SIGHUP; i++)
        stop_hup_take(h, &si);
    /* Those taken since the last line of the once-a-second limit
     * (hup_ignored): no later line comes to count them */
    unsigned unlogged = atomic_exchange(&h->e->hup_unlogged, 0);
    if (unlogged > 0)
        log_msg(LOG_WARN, "event=reload_ignored_unlogged count=%u reason=stopping "
                          "note=sighups_taken_since_the_last_reload_ignored_line",
                unlogged);
    pthread_mutex_destroy(&h->mu);
}
