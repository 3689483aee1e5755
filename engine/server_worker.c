/*
 * server_worker: the submission server of one worker, around its sessions
 * (see server_int.h for the other files of the server): the listening
 * sockets (one per listen address, SO_REUSEPORT across the workers) and
 * their multishot accepts, the check at start that no other process
 * listens there (server_listen_check), the spool's completion port, the
 * worker's server made, started, reconfigured at a reload and freed (the
 * bounded wait for the commits the spool still has), the stop's drain
 * (idle sessions told 421, the drain sealed once no message is being
 * signed or stored) and the counts the stats socket reads. The sessions
 * themselves are server.c's: a connection accepted here becomes one
 * through session_new.
 *
 * Threading: as server.h says: server_worker_new and _free (and
 * server_listen_check) on the main thread while the worker is not
 * running, server_worker_drain from any thread (it posts to the worker),
 * everything else on the worker's thread.
 */
#include "engine/server_int.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/delivery.h"
#include "engine/stats.h"
#include "queue/queue.h"
#include "tls/tls.h"

static void server_on_drain(struct worker *w, struct worker_msg *m);

/* ---- listeners ---- */

static void listener_arm(struct listener *l);

static void
listener_on_retry(struct timer *t, void *ctx)
{
    struct listener *l = (struct listener *)((char *)t - offsetof(struct listener, retry));
    listener_arm(l);
}

static void
listener_on_accept(struct worker *w, struct op *op, int res, uint32_t flags)
{
    struct listener *l = (struct listener *)((char *)op - offsetof(struct listener, op));
    if (!(flags & IORING_CQE_F_MORE))
        l->armed = false;
    if (atomic_load(&l->sw->draining)) {
        if (res >= 0)
            close(res); /* accepted just before the shutdown */
        return;
    }
    if (res >= 0) {
        session_new(l->sw, res, l->implicit_tls, l->bounce);
    } else if (res != -ECANCELED) {
        /* EMFILE, ENFILE, ENOBUFS: back off instead of spinning. */
        log_msg(LOG_WARN, "event=accept_failed listen=%s err=%s", l->sw->e->cfg->server.listen,
                strerror(-res));
        if (!l->armed)
            worker_timer_arm(w, &l->retry, w->now + MS_TO_NS(ACCEPT_BACKOFF_MS));
        return;
    }
    if (!l->armed && !l->sw->stopping)
        listener_arm(l);
}

static void
listener_arm(struct listener *l)
{
    struct io_uring_sqe *sqe = worker_sqe(l->sw->w, &l->op);
    io_uring_prep_multishot_accept(sqe, l->fd, NULL, NULL, SOCK_CLOEXEC);
    l->armed = true;
}

#define LISTEN_PROBE_WAIT_MS 2000u
#define LISTEN_PROBE_STEP_MS 20u

static int
listen_probe(const struct netaddr *a, char *err, size_t errlen)
{
    in_port_t port = a->ss.ss_family == AF_INET6 ? ((const struct sockaddr_in6 *)&a->ss)->sin6_port
                                                 : ((const struct sockaddr_in *)&a->ss)->sin_port;
    if (port == 0)
        return 0; /* the kernel picks: nobody else's */
    int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0; /* listener_open says what is wrong */
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)); /* TIME_WAIT is no listener */
    if (a->ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    /* A sluice killed a moment ago may still hold its listeners: the
     * kernel tears a dead process's io_uring down after the process is
     * reaped, and the sockets its accept ops held go with it. Asked again
     * for up to LISTEN_PROBE_WAIT_MS before another process is blamed. */
    int rc;
    for (unsigned waited = 0;; waited += LISTEN_PROBE_STEP_MS) {
        rc = bind(fd, (const struct sockaddr *)&a->ss, a->len) < 0 ? -errno : 0;
        if (rc != -EADDRINUSE || waited >= LISTEN_PROBE_WAIT_MS)
            break;
        struct timespec ts = {0, LISTEN_PROBE_STEP_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
    close(fd);
    if (rc == -EADDRINUSE) {
        char text[80];
        netaddr_str((const struct sockaddr *)&a->ss, text, sizeof(text));
        snprintf(err, errlen, "listen %s: address in use (another sluice, or another server, "
                 "listens there)", text);
        return rc;
    }
    return 0;
}

int
server_listen_check(const struct config *cfg, char *err, size_t errlen)
{
    const struct server_config *sc = &cfg->server;
    const struct bounce_config *bc = &cfg->bounce;
    int rc = 0;
    for (int i = 0; rc == 0 && i < sc->nlisten; i++)
        rc = listen_probe(&sc->listen_addrs[i], err, errlen);
    for (int i = 0; rc == 0 && i < sc->nlisten_tls; i++)
        rc = listen_probe(&sc->listen_tls_addrs[i], err, errlen);
    for (int i = 0; rc == 0 && i < bc->nlisten; i++)
        rc = listen_probe(&bc->listen_addrs[i], err, errlen);
    return rc;
}

static int
listener_open(struct listener *l, const struct netaddr *a, char *err, size_t errlen)
{
    char text[80];
    netaddr_str((const struct sockaddr *)&a->ss, text, sizeof(text));
    int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int rc = -errno;
        snprintf(err, errlen, "listen %s: socket: %s", text, strerror(errno));
        return rc;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (a->ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)&a->ss, a->len) < 0 || listen(fd, 1024) < 0) {
        int rc = -errno;
        snprintf(err, errlen, "listen %s: %s", text, strerror(errno));
        close(fd);
        return rc;
    }
    l->fd = fd;
    l->addr = *a;
    l->op = (struct op){OP_CALLBACK, listener_on_accept};
    timer_init(&l->retry, listener_on_retry);
    return 0;
}

/* ---- the spool port ---- */

static void
port_arm(struct server_worker *sw)
{
    struct io_uring_sqe *sqe = worker_sqe(sw->w, &sw->port_op);
    io_uring_prep_poll_add(sqe, queue_port_fd(sw->port), POLLIN);
    sw->port_armed = true;
}

static void
port_on_ready(struct worker *w, struct op *op, int res, uint32_t flags)
{
    struct server_worker *sw =
        (struct server_worker *)((char *)op - offsetof(struct server_worker, port_op));
    sw->port_armed = false;
    queue_port_drain(sw->port);
    if (!sw->stopping)
        port_arm(sw);
}

/* ---- the worker's server ---- */

struct server_worker *
server_worker_alloc(struct engine *e, struct worker *w)
{
    struct server_worker *sw = calloc(1, sizeof(*sw));
    if (sw == NULL)
        return NULL;
    atomic_init(&sw->draining, false);
    atomic_init(&sw->drain_posted, false);
    atomic_init(&sw->drain_until, UINT64_MAX);
    sw->e = e;
    sw->w = w;
    sw->cfg = &e->cfg->server;
    auth_cache_init(&sw->auth);
    return sw;
}

int
server_worker_new(struct engine *e, struct worker *w, struct server_worker **out, char *err,
                  size_t errlen)
{
    *out = NULL;
    struct server_worker *sw = server_worker_alloc(e, w);
    if (sw == NULL)
        return -ENOMEM;
    sw->port_op = (struct op){OP_CALLBACK, port_on_ready};
#ifdef SLUICE_TEST_HOOKS
    /* SLUICE_TEST_COMMIT_DELAY=MS: a slow spool (session_on_commit). */
    const char *delay = getenv("SLUICE_TEST_COMMIT_DELAY");
    if (delay != NULL && *delay != '\0') {
        sw->test_commit_delay = strtoull(delay, NULL, 10);
        if (w->id == 0)
            log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_COMMIT_DELAY ms=%llu",
                    (unsigned long long)sw->test_commit_delay);
    }
#endif
    int rc;
    sw->port = queue_port_new();
    if (sw->port == NULL) {
        rc = -errno;
        snprintf(err, errlen, "spool completion port: %s", strerror(errno));
        goto fail;
    }
    sw->tls = engine_tls_server(e);
    const struct bounce_config *bc = &e->cfg->bounce;
    int nsub = sw->cfg->nlisten + sw->cfg->nlisten_tls;
    int total = nsub + bc->nlisten;
    sw->ls = calloc((size_t)total, sizeof(*sw->ls));
    if (sw->ls == NULL) {
        rc = -ENOMEM;
        goto fail;
    }
    for (int i = 0; i < total; i++) {
        bool bounce = i >= nsub;
        bool implicit = !bounce && i >= sw->cfg->nlisten;
        const struct netaddr *a = bounce     ? &bc->listen_addrs[i - nsub]
                                  : implicit ? &sw->cfg->listen_tls_addrs[i - sw->cfg->nlisten]
                                             : &sw->cfg->listen_addrs[i];
        sw->ls[i].sw = sw;
        sw->ls[i].implicit_tls = implicit;
        sw->ls[i].bounce = bounce;
        rc = listener_open(&sw->ls[i], a, err, errlen);
        if (rc < 0)
            goto fail;
        sw->nls++;
    }
    *out = sw;
    return 0;
fail:
    server_worker_free(sw);
    return rc;
}

void
server_worker_start(struct server_worker *sw)
{
    port_arm(sw);
    for (int i = 0; i < sw->nls; i++)
        listener_arm(&sw->ls[i]);
}

/* Answers held by the test hook (SLUICE_TEST_COMMIT_DELAY) due by now,
 * or all of them, reach their sessions. Returns when the next one is due
 * (CLOCK_MONOTONIC ns), UINT64_MAX when none is held. */
static uint64_t
held_commits_release(struct server_worker *sw, uint64_t now, bool all)
{
    uint64_t next = UINT64_MAX;
    for (struct session *s = sw->sessions, *n; s != NULL; s = n) {
        n = s->next; /* the answer may free s */
        if (!timer_armed(&s->commit_timer))
            continue;
        if (all || s->commit_timer.deadline <= now) {
            worker_timer_cancel(sw->w, &s->commit_timer);
            session_on_commit_timer(&s->commit_timer, NULL);
        } else if (s->commit_timer.deadline < next) {
            next = s->commit_timer.deadline;
        }
    }
    return next;
}

/* Stopping: wait, up to SERVER_STOP_COMMIT_WAIT_MS after the stop began
 * to free the servers (one bound for all of them), for every commit the spool
 * has (and every answer the test hook holds: a slow commit, waited for
 * as one). True when all came back; false when the wait was cut: each
 * message still with the spool is logged by id (stored or not, the spool
 * says: sluice-spool), and its session and the port stay allocated (the
 * spool borrows the body; its answer would come to the port) until the
 * process exits. */
static bool
stop_commits_wait(struct server_worker *sw)
{
    /* The stop's one bound (engine_stop): the workers are freed one after
     * another, and a spool that no longer answers must not cost the wait
     * once per worker (eight of them, four minutes: past a service
     * manager's stop timeout). A server freed outside a stop (a failed
     * start) has its own. */
    uint64_t start = clock_mono_ns();
    uint64_t end = sw->e != NULL && sw->e->stop_commit_until != 0
                       ? sw->e->stop_commit_until
                       : start + MS_TO_NS(SERVER_STOP_COMMIT_WAIT_MS);
    uint64_t began = end - MS_TO_NS(SERVER_STOP_COMMIT_WAIT_MS);
    bool said = false;
    for (;;) {
        uint64_t now = clock_mono_ns();
        uint64_t next = held_commits_release(sw, now, false);
        unsigned pending = sw->port != NULL ? queue_port_pending(sw->port) : 0;
        if (pending == 0 && next == UINT64_MAX)
            return true;
        if (!said) {
            /* every worker's loop has ended (engine_stop joined them all
             * first): what the stop waits for now, and where */
            said = true;
            log_msg(LOG_INFO, "event=stop_commit_wait worker=%u requests=%u held=%d left_ms=%llu",
                    sw->w != NULL ? sw->w->id : 0u, pending, next != UINT64_MAX,
                    (unsigned long long)(now < end ? (end - now) / 1000000 : 0));
        }
        if (now >= end) {
            /* What came already is told, not cut: the bound is the
             * stop's, and another worker's wait may have taken it all
             * while answers to this one waited in its port since its
             * loop ended (delivery.c's outcomes_wait does the same). */
            if (pending > 0)
                queue_port_drain(sw->port);
            break;
        }
        uint64_t until = next < end ? next : end;
        uint64_t ms = (until - now + 999999) / 1000000;
        ms = ms > 1000 ? 1000 : ms;
        if (pending > 0) {
            queue_port_wait(sw->port, (int)ms);
        } else {
            struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000};
            nanosleep(&ts, NULL);
        }
    }
    held_commits_release(sw, 0, true); /* stored already: the hook held only the answer */
    if (sw->port == NULL || queue_port_pending(sw->port) == 0)
        return true; /* every answer came, and was told */
    unsigned n = 0;
    for (const struct session *s = sw->sessions; s != NULL; s = s->next) {
        if (!s->committing)
            continue;
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(s->msg_id, qid);
        if (s->oob != NULL) /* a bounce listener's report: no message, no id */
            log_msg(LOG_CRIT,
                    "session=%016llx event=commit_unanswered report=%s client=%s "
                    "note=stored_or_not_the_spool_says",
                    (unsigned long long)s->id, s->oob->kind, s->peer_ip);
        else
            log_msg(LOG_CRIT,
                    "session=%016llx event=commit_unanswered id=%s client=%s "
                    "note=stored_or_not_the_spool_says",
                    (unsigned long long)s->id, qid, s->peer_ip);
        n++;
    }
    log_msg(LOG_CRIT,
            "event=stop_commit_wait_cut pending=%u waited_ms=%llu note=spool_not_answering", n,
            (unsigned long long)((clock_mono_ns() - began) / 1000000));
    if (sw->e != NULL)
        sw->e->stop_cut = true; /* the spool's close: not waited for as long again */
    return false;
}

struct server_worker *
server_worker_free(struct server_worker *sw)
{
    if (sw == NULL)
        return NULL;
    sw->stopping = true;
    /* The loop has ended: no completion comes back through the ring, and
     * no reply can leave. Commits the spool already has still land (a
     * drain that timed out leaves them): each is waited for here and
     * logged queued (unanswered=stopping), its message delivered after
     * the restart, so that nothing is stored that the log does not
     * tell. */
    if (!stop_commits_wait(sw))
        return NULL; /* the spool does not answer: left to the exit */
    /* The hashing pool has stopped (engine_stop): hashes finished after
     * the loop ended wait in the mailbox, pointing into sessions. */
    worker_mbox_cancel(sw->w, session_on_hash);
    worker_mbox_cancel(sw->w, server_on_drain); /* embedded in sw */
    worker_mbox_cancel(sw->w, server_on_drain_recheck);
    while (sw->sessions != NULL) {
        struct session *s = sw->sessions;
        if (txn_unfinished(s)) /* the client sees a close: say what it cost */
            log_msg(LOG_NOTICE,
                    "session=%016llx event=connection_lost client=%s state=%s how=stopping "
                    "octets=%llu note=transaction_dropped",
                    (unsigned long long)s->id, s->peer_ip, session_state_str(s->state),
                    (unsigned long long)s->body_seen);
        s->state = SS_CLOSED;
        s->inflight = 0;
        session_free(s);
    }
    for (int i = 0; i < sw->nls; i++)
        close(sw->ls[i].fd);
    free(sw->ls);
    queue_port_free(sw->port);
    tls_ctx_unref(sw->tls);
    stats_tenant_fini(&sw->tenants);
    free(sw);
    return NULL;
}

void
server_worker_reconfigure(struct server_worker *sw)
{
    sw->cfg = &sw->e->cfg->server;
    /* Sessions hold their own conn (and OpenSSL's reference to the old
     * SSL_CTX); new handshakes take the new certificate. */
    tls_ctx_unref(sw->tls);
    sw->tls = engine_tls_server(sw->e);
}

/* A stop is under way: s, waiting for a command outside a transaction
 * or for its greeting (greet_pause), is told so and closed (RFC 5321
 * 3.8: a server shut down SHOULD send 421). True when it was. One in a
 * transaction finishes it first, within the stop's drain, and is told
 * when it is back to waiting for a command (session_drain_check), or at
 * its next command (run_commands); once the worker is sealed nothing it
 * sends can be stored, and one waiting for a command in its envelope is
 * told at once (server_worker_drain_seal): it was cut without a word
 * when the loop ended, the drain done before it sent its DATA. */
bool
session_drain_close(struct session *s)
{
    if ((s->state != SS_COMMAND && s->state != SS_PREGREET) || (s->in_txn && !s->sw->sealed))
        return false;
    log_msg(LOG_INFO, "session=%016llx event=shutting_down client=%s%s",
            (unsigned long long)s->id, s->peer_ip, s->in_txn ? " note=transaction_dropped" : "");
    reply_close(s, "421 4.3.2 Service shutting down: try again later");
    return true;
}

void
session_drain_check(struct session *s)
{
    if (atomic_load_explicit(&s->sw->draining, memory_order_relaxed))
        session_drain_close(s);
}

/* On the worker, once its listeners are shut for the stop: every idle
 * session is told 421 now, not cut without a word when the loop ends. */
static void
server_on_drain(struct worker *w, struct worker_msg *m)
{
    (void)w;
    struct server_worker *sw =
        (struct server_worker *)((char *)m - offsetof(struct server_worker, drain_msg));
    for (struct session *s = sw->sessions, *next; s != NULL; s = next) {
        next = s->next;
        if (s->state == SS_CLOSING) { /* its last reply: within the drain too */
            /* never later than the deadline it has (a long drain_timeout
             * must not lengthen a closing session's time) */
            uint64_t had = timer_armed(&s->timer) ? s->timer.deadline : UINT64_MAX;
            session_closing_deadline(s);
            if (had < s->timer.deadline)
                worker_timer_arm(sw->w, &s->timer, had);
        }
        else if (session_drain_close(s))
            session_run(s);
    }
}

bool
server_worker_drain_seal(struct server_worker *sw)
{
    unsigned closing = 0;
    for (const struct session *s = sw->sessions; s != NULL; s = s->next) {
        if (s->state == SS_SIGN || s->state == SS_COMMIT)
            return false;
        closing += s->state == SS_CLOSING;
    }
    /* Sealed once no message is being signed or stored, whatever last
     * replies are still leaving: a client that stopped reading its 421
     * must not keep the worker storing messages that end from now on
     * (the loop may stop before their 250 leaves). The drain itself is
     * done when those replies left too, or at drain_timeout. */
    if (!sw->sealed) {
        log_msg(LOG_INFO, "event=drain_sealed closing=%u note=messages_ending_now_refused",
                closing);
        sw->sealed = true;
        /* The sessions waiting for a command in their envelope: told
         * now (session_drain_close), their 421 leaving within the drain */
        for (struct session *s = sw->sessions, *next; s != NULL; s = next) {
            next = s->next;
            if (s->in_txn && session_drain_close(s))
                session_run(s);
        }
        closing = 0;
        for (const struct session *s = sw->sessions; s != NULL; s = s->next)
            closing += s->state == SS_CLOSING;
    }
    return closing == 0;
}

/* A session that held the drain let go: the idle ones are told 421 (one
 * whose message was refused meanwhile is idle now), and when nothing
 * holds the drain any more, delivery reports it done (or does once its
 * own connections are gone). */
void
server_on_drain_recheck(struct worker *w, struct worker_msg *m)
{
    struct server_worker *sw =
        (struct server_worker *)((char *)m - offsetof(struct server_worker, recheck_msg));
    sw->recheck_posted = false;
    for (struct session *s = sw->sessions, *next; s != NULL; s = next) {
        next = s->next;
        if (session_drain_close(s))
            session_run(s);
    }
    for (const struct session *s = sw->sessions; s != NULL; s = s->next)
        if (session_state_holds_drain(s->state))
            return; /* its own move away posts the next look */
    delivery_drain_recheck(sw->e->dlv[w->id]);
}

void
server_worker_drain(struct server_worker *sw, uint64_t within_ms)
{
    uint64_t until = within_ms == UINT64_MAX ? UINT64_MAX : clock_mono_ns() + MS_TO_NS(within_ms);
    atomic_store(&sw->drain_until, until);
    atomic_store(&sw->draining, true);
    for (int i = 0; i < sw->nls; i++)
        shutdown(sw->ls[i].fd, SHUT_RDWR); /* ends the accepts; new clients are refused */
    if (!sw->detached && !atomic_exchange(&sw->drain_posted, true)) {
        sw->drain_msg.fn = server_on_drain;
        worker_post(sw->w, &sw->drain_msg);
    }
}

void
server_worker_stats(const struct server_worker *sw, struct server_stats *out)
{
    *out = sw->stats;
}

void
server_worker_each_owner(const struct server_worker *sw,
                         void (*fn)(const struct owner *o, void *arg), void *arg)
{
    for (const struct session *s = sw->sessions; s != NULL; s = s->next)
        fn(&s->owner, arg);
}
