/*
 * connection: one outbound SMTP connection (struct conn, conn=ID in the
 * logs) on the worker's ring. It connects to the address the scheduler
 * picked, drives the pure client machine of smtp_client.h (every state
 * transition traced at debug level) over its stream (engine/stream.h:
 * the socket's reads and sends, plain or TLS after STARTTLS; to an MX
 * host with validated TLSA records, DANE decides: STARTTLS mandatory,
 * authenticated by the records, except for tls_relaxed mail (a TLS
 * report, opened opportunistic); under opportunistic TLS, an address whose
 * handshake failed is connected to in plaintext for a while, the
 * scheduler's retry of the jobs that wait first: policy_tls_fallback),
 * streams the body from the spool in
 * chunks, and when the session is ready asks the scheduler for its next
 * job (reuse: a job of any domain of its site) or goes idle. Transaction
 * outcomes go to outcome.c (but recipients refused for the server's
 * limit per transaction, which go first in line for the next one); what a
 * connection that could not be opened (conn_open says why: struct
 * open_fail), a failed connect, a timeout or the end of the session means
 * is the scheduler's and the policy's.
 *
 * Memory only while it is used: the machine's buffer is lent from a pool
 * for each call, received octets come from the ring's provided buffers
 * (the stream's lend mode), a body chunk is held only while a body is
 * sent; a pool keeps up to POOL_KEEP freed buffers for the next burst
 * and gives back those a sweep found untaken (conn_pool_decay).
 * Lifetime (STYLE rule 7): the stream counts its ops in flight,
 * conn_close() closes it, and the last completion after that frees.
 *
 * Threading: the worker's thread.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/idn.h"
#include "common/intern.h"
#include "common/log.h"
#include "engine/config_gen.h"
#include "engine/netaddr.h"
#include "engine/oob.h"
#include "engine/outbound/internal.h"
#include "engine/tlsrpt.h"
#include "tls/tls.h"

#define IN_BUFS        512  /* provided receive buffers per worker (a power of two) */
#define IN_BGID        7    /* their buffer group on the worker's ring */
#define POOL_KEEP      256  /* free buffers a pool keeps for the next burst */
/* Octets a socket holds that are not yet sent (TCP_NOTSENT_LOWAT).
 * data_timeout bounds how long a receiver may take nothing; a send
 * completes once the kernel holds it. Without this bound the kernel's
 * send buffer (up to tcp_wmem's 4 MB) fills, and a full one wakes a
 * sender only after a third of it has drained: a receiver reading 6 MB
 * steadily at 800 KB/s stalled a send 1.7 s, one under 8 KB/s timed out
 * at the default 3 min. With it, a send waits only while half of it or
 * more is unsent (the kernel's wake-up, tcp_stream_memory_free), and a
 * slow reader is given up on only when it stops. */
#define CONN_NOTSENT_LOWAT (128 * 1024)

#define CONN_OF(ptr, field) ((struct conn *)((char *)(ptr) - offsetof(struct conn, field)))

static void conn_handle(struct conn *c, int ev);
static const struct dns_mx_host *conn_dane(const struct conn *c);
static bool conn_tls_fallback_mark(struct conn *c);
static unsigned conn_tlsa(const struct dns_mx_host *h, struct tls_tlsa out[DNS_TLSA_MAX]);
static void conn_flush(struct conn *c);
static void conn_next(struct conn *c);

/* ---- buffer pools ---- */

void *
conn_pool_get(struct pool *p)
{
    void *b = p->free;
    if (b != NULL) {
        memcpy(&p->free, b, sizeof(void *));
        if (--p->nfree < p->low)
            p->low = p->nfree;
    } else if ((b = malloc(p->size)) == NULL) {
        return NULL;
    }
    p->out++;
    return b;
}

void
conn_pool_put(struct pool *p, void *b)
{
    if (b == NULL)
        return;
    p->out--;
    if (p->nfree >= POOL_KEEP) {
        free(b);
        return;
    }
    memcpy(b, &p->free, sizeof(void *));
    p->free = b;
    p->nfree++;
}

unsigned
conn_pool_decay(struct pool *p)
{
    unsigned n = 0;
    for (; n < p->low && p->free != NULL; n++) {
        void *b = p->free;
        memcpy(&p->free, b, sizeof(void *));
        free(b);
        p->nfree--;
    }
    p->low = p->nfree;
    return n;
}

void
conn_pool_fini(struct pool *p)
{
    while (p->free != NULL) {
        void *b = p->free;
        memcpy(&p->free, b, sizeof(void *));
        free(b);
    }
    p->nfree = p->low = 0;
}

/* ---- the connection ---- */

/* The state's deadline, or the expiry of the job in flight when sooner:
 * a recipient expires even on a connection that hangs. */
static void
conn_deadline(struct conn *c, uint64_t ms)
{
    uint64_t now = c->d->w->now;
    uint64_t at = ms == 0 ? 0 : now + MS_TO_NS(ms);
    /* Not once the final dot is out: the server may have accepted the
     * message, and its reply must be heard (RFC 5321 4.5.3.2.6). */
    if (c->job != NULL && c->expire_ms != 0 && smtp_client_state(&c->cli) != SMTP_CLIENT_S_DOT) {
        uint64_t wall = clock_unix_ms();
        uint64_t e = now + MS_TO_NS(c->expire_ms > wall ? c->expire_ms - wall : 0);
        if (at == 0 || e < at)
            at = e;
    }
    if (at == 0)
        worker_timer_cancel(c->d->w, &c->timer);
    else
        worker_timer_arm(c->d->w, &c->timer, at);
}

/* The machine, with a buffer lent from the pool: every call that may
 * write output or parse input goes through here. Without memory the call
 * fails (SMTP_CLIENT_E_STATE) and conn_handle() closes the connection. */
static struct smtp_client *
conn_cli(struct conn *c)
{
    if (c->cli.buf == NULL) {
        struct smtp_client_buf *b = conn_pool_get(&c->d->cli_pool);
        if (b != NULL)
            smtp_client_attach(&c->cli, b);
    }
    return &c->cli;
}

/* Give the buffer back when the machine holds nothing in it. */
static void
conn_cli_release(struct conn *c)
{
    conn_pool_put(&c->d->cli_pool, smtp_client_detach(&c->cli));
}

/* Count c's TLS result for TLS reporting (RFC 8460), once per
 * connection, when its MX host is under DANE (policy type tlsa, which
 * comes first) or its domain under an MTA-STS policy (sts). A DANE
 * session that did not authenticate is a DANE failure: tlsa-invalid when
 * none of the host's records is usable, else validation-failure (no
 * record matched the certificate). */
static void
conn_tlsrpt(struct conn *c, enum tlsrpt_result res)
{
    struct mta_sts *m = delivery_mta_sts(c->d);
    struct tlsrpt *r = m != NULL ? mta_sts_tlsrpt(m) : NULL;
    const struct dns_mx_host *dane = conn_dane(c);
    if (c->tls_reported || r == NULL || (dane == NULL && c->dest->sts == NULL))
        return;
    c->tls_reported = true;
    char ip[64];
    netaddr_ip_str(&c->addr.sa, ip, sizeof(ip));
    if (dane == NULL) {
        tlsrpt_record(r, c->dest->name, c->dest->sts, res, c->mx, ip);
        return;
    }
    struct tls_tlsa tlsa[DNS_TLSA_MAX];
    if (res != TLSRPT_SUCCESS && res != TLSRPT_STARTTLS_NOT_SUPPORTED)
        res = conn_tlsa(dane, tlsa) == 0 ? TLSRPT_TLSA_INVALID : TLSRPT_VALIDATION_FAILURE;
    tlsrpt_record_tlsa(r, c->dest->name, c->mx, dane->tlsa,
                       dane->ntlsa < DNS_TLSA_MAX ? dane->ntlsa : DNS_TLSA_MAX, res, ip,
                       dane->tlsa_base);
}

static void conn_cut_log(const struct conn *c, enum smtp_client_state st);

void
conn_free(struct conn *c)
{
    struct delivery *d = c->d;
    struct dest *t = c->dest;
    worker_timer_cancel(d->w, &c->timer);
    /* the send that held the dot came back (or, the loop gone, never
     * will: in flight, it may have left) */
    if (c->cut_untold && c->job != NULL)
        conn_cut_log(c, SMTP_CLIENT_S_DOT);
    c->cut_untold = false;
    stream_fini(&c->st);
    if (c->job != NULL) {
        /* Not finished by the machine (cannot happen after EV_TXN_DONE):
         * back to the queue, it was not sent. */
        dest_push(t, c->job, true);
        c->job = NULL;
        t->inflight--;
    }
    queue_envelope_free(c->env);
    free(c->rc);
    free(c->verp);
    free(c->from_ascii);
    conn_pool_put(&d->chunk_pool, c->chunk);
    /* Whatever the machine still held is moot: nothing is in flight. */
    conn_pool_put(&d->cli_pool, c->cli.buf);
    const struct smtp_outcome *so = c->connected ? smtp_client_session(&c->cli) : NULL;
    if (so != NULL && so->reason == SMTP_REASON_TLS_UNAVAILABLE) {
        conn_tlsrpt(c, TLSRPT_STARTTLS_NOT_SUPPORTED);
        snprintf(t->tls_verify, sizeof(t->tls_verify), "STARTTLS not offered");
    }
    /* The scheduler acts on what the end means, and frees c. */
    sched_conn_detach(c, so);
}

static void
conn_maybe_free(struct conn *c)
{
    if (c->closed && !stream_busy(&c->st))
        conn_free(c);
}

void
conn_close(struct conn *c, const char *why)
{
    if (c->closed)
        return;
    if (why != NULL && log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, "conn=%llx event=conn_close domain=%s mx=%s addr=%s reason=%s",
                (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str, why);
    c->closed = true;
    worker_timer_cancel(c->d->w, &c->timer);
    stream_close(&c->st);
}

/* The stop ended c with a job in flight (a drain that timed out, or was
 * cut): said, with how far it got, as the drain's line says only that
 * something stayed queued. Its recipients stay in the spool and go after
 * the restart. At the dot (the terminator given to the stream) the
 * message may have arrived (RFC 1047), and then arrives twice, only if
 * the dot left: its send completed, before the close or after it (a
 * send in flight at the close may have handed it to the kernel). One
 * whose dot never left cannot have been accepted. */
static void
conn_cut_log(const struct conn *c, enum smtp_client_state st)
{
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(c->job->id, qid);
    const char *note = "stays_queued";
    if (st == SMTP_CLIENT_S_DOT)
        note = stream_close_tail(&c->st) == STREAM_TAIL_HELD
                   ? "stays_queued_dot_not_sent_not_accepted"
                   : "stays_queued_sent_whole_may_arrive_twice";
    log_msg(LOG_NOTICE,
            "id=%s event=transaction_cut conn=%llx domain=%s mx=%s addr=%s state=%s "
            "recipients=%u note=%s",
            qid, (unsigned long long)c->id, c->dest->name, c->mx != NULL ? c->mx : "-",
            c->addr_str[0] != '\0' ? c->addr_str : "-", smtp_client_state_str(st), c->job->n,
            note);
}

void
conn_stop_cut(struct conn *c)
{
    bool cut = c->job != NULL && !c->closed;
    enum smtp_client_state st = smtp_client_state(&c->cli);
    conn_close(c, "stopping");
    if (!cut)
        return;
    if (st == SMTP_CLIENT_S_DOT && stream_close_tail(&c->st) == STREAM_TAIL_IN_FLIGHT)
        c->cut_untold = true; /* told once that send is back: conn_free */
    else
        conn_cut_log(c, st);
}

static void
conn_recv(struct conn *c)
{
    /* Nothing is read between the 220 to STARTTLS and the handshake: the
     * first read after it is of ciphertext (stream_start_tls). */
    if (c->closed || !c->connected || c->want_close || c->tls_wanted)
        return;
    if (stream_recv(&c->st) < 0)
        conn_close(c, "out_of_memory");
}

/* Register the worker's provided receive buffers. Without them (an old
 * kernel) each connection reads into its own buffer. */
void
conn_bufs_init(struct delivery *d)
{
    stream_bufs_init(&d->bufs, d->w, IN_BUFS, IN_BGID);
}

/* After the loop ended, from the thread that frees: no read is in flight. */
void
conn_bufs_fini(struct delivery *d)
{
    stream_bufs_fini(&d->bufs);
}

static void tls_start(struct conn *c);

/* Send what the machine has to say; once all has left, close or begin
 * TLS as the machine asked. */
static void
conn_flush(struct conn *c)
{
    if (c->closed || !c->connected)
        return;
    stream_send(&c->st);
    if (c->closed || !stream_drained(&c->st))
        return;
    if (c->want_close)
        conn_close(c, c->quit_why != NULL ? c->quit_why : "done");
    else if (c->tls_wanted && !stream_tls(&c->st))
        tls_start(c);
}

/* Feed the body from the spool while the machine's output has room. */
static void
conn_body(struct conn *c)
{
    if (c->txn_ns != 0 && c->site != NULL && c->d->w->now >= c->txn_ns)
        site_window_on_head(&c->site->win, c->d->w->now - c->txn_ns, c->d->w->now);
    c->txn_ns = 0;
    while (!c->closed && smtp_client_state(&c->cli) == SMTP_CLIENT_S_BODY) {
        if (c->chunk_pos == c->chunk_len && !c->body_last) {
            size_t got = 0;
            if (c->chunk == NULL && (c->chunk = conn_pool_get(&c->d->chunk_pool)) == NULL) {
                conn_handle(c, smtp_client_quit(conn_cli(c))); /* aborts: all temporary */
                return;
            }
            int rc =
                queue_body_read(c->d->queue, c->job->id, c->body_off, c->chunk, BODY_CHUNK, &got);
            if (rc != 0) {
                log_msg(LOG_ERR, "conn=%llx event=body_read_failed domain=%s err=\"%s\"",
                        (unsigned long long)c->id, c->dest->name, queue_strerror(rc));
                conn_handle(c, smtp_client_quit(conn_cli(c))); /* aborts: all temporary */
                return;
            }
            c->body_off += got;
            c->chunk_len = got;
            c->chunk_pos = 0;
            c->body_last = c->body_off >= c->env->body_len || got == 0;
        }
        size_t consumed = 0;
        int ev = smtp_client_body(conn_cli(c), c->chunk + c->chunk_pos, c->chunk_len - c->chunk_pos,
                                  c->body_last, &consumed);
        c->chunk_pos += consumed;
        if (ev < 0) {
            conn_handle(c, ev); /* no buffer (conn_cli) or the wrong state: closed */
            return;
        }
        bool full = c->chunk_pos < c->chunk_len;
        if (ev & ~SMTP_CLIENT_EV_SEND_BODY)
            conn_handle(c, ev & ~SMTP_CLIENT_EV_SEND_BODY);
        if (full || (c->body_last && c->chunk_pos == c->chunk_len))
            break; /* wait for room, or the terminator is queued */
    }
}

/* c idles up to ms: at once, or in steps of LIMIT_WANT_POLL_MS while it
 * holds a slot of a cap shared through [redis] or by the node's workers
 * (idle_poll: each step asks whether a worker or node elsewhere waits
 * for one). */
static void
conn_idle_wait(struct conn *c, uint64_t ms)
{
    c->idle_left_ms = 0;
    if (c->idle_poll && ms > LIMIT_WANT_POLL_MS) {
        c->idle_left_ms = ms - LIMIT_WANT_POLL_MS;
        ms = LIMIT_WANT_POLL_MS;
    }
    conn_deadline(c, ms);
}

/* Start the next transaction, go idle, or say goodbye. */
static void
conn_next(struct conn *c)
{
    unsigned moves = 0;
    for (;;) {
        /* Which job, of which domain of the site: the scheduler's call. */
        enum sched_next what;
        struct job *j = sched_conn_next(c, &moves, &what);
        if (what == SCHED_NEXT_QUIT) {
            conn_handle(c, smtp_client_quit(conn_cli(c)));
            return;
        }
        if (what == SCHED_NEXT_IDLE) {
            /* on its site's idle list up to the idle time; a moment when
             * another site waits for its [mx] or [source] slot */
            uint64_t ms = c->d->cfg->delivery.idle_timeout;
            if (c->idle_short && ms > KEY_IDLE_GRACE_MS)
                ms = KEY_IDLE_GRACE_MS;
            conn_idle_wait(c, ms);
            return;
        }
        struct dest *t = c->dest;
        struct queue_envelope *env;
        int erc = queue_envelope_get(c->d->queue, j->id, &env);
        if (erc == QUEUE_ENOTFOUND) {
            free(j); /* gone: bounced by an operator, or done before a restart */
            continue;
        }
        if (erc != 0) {
            /* The spool could not say (I/O, readers): keep the job, rest. */
            log_msg(LOG_ERR, "conn=%llx event=envelope_read_failed domain=%s err=\"%s\"",
                    (unsigned long long)c->id, t->name, queue_strerror(erc));
            dest_push(t, j, true);
            sched_conn_event(c, POLICY_SPOOL_UNREADABLE, NULL);
            conn_handle(c, smtp_client_quit(conn_cli(c)));
            return;
        }
        /* VERP (oob.h): each recipient has its own sender, so its own transaction. */
        unsigned maxr = c->d->cfg->bounce.verp_domain != NULL && env->sender[0] ? 1 : c->max_rcpt;
        /* RFC 9422: no more than the server's LIMITS RCPTMAX in one
         * transaction; the rest go back first in line for the next one
         * (the machine would fail them for now, 452 4.5.3, and they would
         * wait for the retry schedule). */
        uint32_t rcptmax = smtp_client_caps(&c->cli)->rcpt_max;
        if (rcptmax != 0 && rcptmax < maxr)
            maxr = rcptmax;
        if (j->n > maxr) {
            /* Split with a larger max_rcpt_per_txn before a reload, or
             * past the server's RCPTMAX. */
            struct job *rest = job_copy(j, j->n - maxr);
            if (rest == NULL) {
                queue_envelope_free(env);
                dest_push(t, j, true);
                conn_handle(c, smtp_client_quit(conn_cli(c)));
                return;
            }
            rest->n = j->n - maxr;
            memcpy(rest->idx, j->idx + maxr, rest->n * sizeof(unsigned));
            j->n = maxr;
            dest_push(t, rest, true);
        }
        uint64_t expire = job_expire_ms(t->pol, env, j->id);
        if (policy_expired(clock_unix_ms(), expire)) {
            /* Expired while it waited here: bounce it, do not send it. */
            struct smtp_outcome o;
            memset(&o, 0, sizeof(o));
            o.status = SMTP_STATUS_TEMPFAIL;
            o.scope = SMTP_SCOPE_MESSAGE;
            o.enh = (struct smtp_enh){4, 4, 7};
            job_last_attempt_text(&o, "message expired in the queue", env, j);
            struct outcome_where where = {.src = CLASSIFY_EXPIRED};
            job_finish(c->d, t, j, env, NULL, &o, &where);
            queue_envelope_free(env);
            free(j);
            continue;
        }
        struct smtp_client_rcpt *rc = calloc(j->n, sizeof(*rc));
        if (rc == NULL) {
            queue_envelope_free(env);
            dest_push(t, j, true);
            conn_handle(c, smtp_client_quit(conn_cli(c)));
            return;
        }
        unsigned n = 0;
        for (unsigned i = 0; i < j->n; i++) {
            const struct queue_rcpt *er = queue_envelope_rcpt(env, j->idx[i]);
            if (er == NULL)
                continue;
            j->idx[n] = j->idx[i];
            struct smtp_client_rcpt *r = &rc[n++];
            r->addr.ptr = er->addr;
            r->addr.len = strlen(er->addr);
            /* its domain's A-labels: the job's (job_new), for a server
             * without SMTPUTF8 (smtp_client.h) */
            if (!idn_is_ascii(r->addr.ptr, r->addr.len))
                r->domain_ascii = (struct smtp_span){j->domain, strlen(j->domain)};
            if (er->notify) {
                r->params.seen |= SMTP_PARAM_NOTIFY;
                r->params.notify = er->notify;
            }
            /* RFC 3461 5.2: DSN parameters go on to the next hop (the
             * machine drops them when it does not offer DSN). */
            const char *oc = er->orcpt;
            const char *semi = oc ? strchr(oc, ';') : NULL;
            if (semi != NULL && semi > oc && semi[1] != '\0') {
                r->params.seen |= SMTP_PARAM_ORCPT;
                r->params.orcpt_type = (struct smtp_span){oc, (size_t)(semi - oc)};
                r->params.orcpt_addr = (struct smtp_span){semi + 1, strlen(semi + 1)};
            }
        }
        j->n = n; /* recipients already done (before a restart) drop out */
        if (n == 0) {
            free(rc);
            queue_envelope_free(env);
            free(j);
            continue;
        }
        c->job = j;
        c->env = env;
        c->rc = rc;
        c->expire_ms = expire;
        t->inflight++;
        if (t->site == c->site)
            site_turn_taken(t); /* (not for the jobs dropped above: no turn had; nor
                                 * on a site a new answer moved t from) */
        break;
    }
    struct queue_envelope *env = c->env;
    c->body_off = 0;
    c->chunk_len = c->chunk_pos = 0;
    c->body_last = false;
    c->txn_done_seen = false;
    memset(&c->txn, 0, sizeof(c->txn));
    c->txn.from.ptr = env->sender;
    c->txn.from.len = strlen(env->sender);
    /* The VERP sender's room only on a connection that sends one. */
    int vn = 0;
    if (c->d->cfg->bounce.verp_domain != NULL && env->sender[0] != '\0') {
        if (c->verp == NULL)
            c->verp = malloc(CONN_VERP_CAP);
        vn = c->verp == NULL
                 ? -ENOMEM
                 : oob_verp_sender(&c->d->cfg->bounce, env->sender, env->id, c->job->idx[0],
                                   c->rc[0].addr.ptr, env->tenant, c->verp, CONN_VERP_CAP);
    }
    /* A sender whose domain is in U-labels: its A-labels, for a server
     * without SMTPUTF8 (smtp_client.h). */
    const char *sat = strrchr(env->sender, '@');
    if (vn <= 0 && sat != NULL && !idn_is_ascii(sat + 1, strlen(sat + 1))) {
        if (c->from_ascii == NULL)
            c->from_ascii = malloc(CONN_FROM_ASCII_CAP);
        int an = c->from_ascii == NULL ? -ENOMEM
                                       : idn_domain_ascii(sat + 1, strlen(sat + 1), c->from_ascii,
                                                          CONN_FROM_ASCII_CAP, NULL);
        if (an > 0)
            c->txn.from_domain_ascii = (struct smtp_span){c->from_ascii, (size_t)an};
    }
    /* Under VERP the next hop's DSNs come back to the bounce listener,
     * which reads failures only: a success it would report is one this
     * node reports (relayed, job_finish), so SUCCESS is not asked of it
     * (SUCCESS alone: NEVER). */
    c->txn_verp = vn > 0;
    for (unsigned i = 0; vn > 0 && i < c->job->n; i++) {
        struct smtp_params *p = &c->rc[i].params;
        if ((p->seen & SMTP_PARAM_NOTIFY) && (p->notify & SMTP_NOTIFY_SUCCESS)) {
            p->notify &= ~(unsigned)SMTP_NOTIFY_SUCCESS;
            if (p->notify == 0)
                p->notify = SMTP_NOTIFY_NEVER;
        }
    }
    if (vn > 0)
        c->txn.from = (struct smtp_span){c->verp, (size_t)vn};
    else if (vn < 0) /* no memory, or beyond the config's bounds: said, then sent as injected */
        log_msg(LOG_ERR, "conn=%llx event=verp_failed err=%d", (unsigned long long)c->id, vn);
    c->txn.params.seen = SMTP_PARAM_SIZE | SMTP_PARAM_BODY;
    c->txn.params.size = env->body_len;
    c->txn.params.body =
        env->body_type == QUEUE_BODY_8BITMIME ? SMTP_BODY_8BITMIME : SMTP_BODY_7BIT;
    if (env->smtputf8)
        c->txn.params.seen |= SMTP_PARAM_SMTPUTF8;
    if (env->ret != QUEUE_RET_NONE) {
        c->txn.params.seen |= SMTP_PARAM_RET;
        c->txn.params.ret = env->ret == QUEUE_RET_FULL ? SMTP_RET_FULL : SMTP_RET_HDRS;
    }
    if (env->envid != NULL && env->envid[0] != '\0') {
        c->txn.params.seen |= SMTP_PARAM_ENVID;
        c->txn.params.envid = (struct smtp_span){env->envid, strlen(env->envid)};
    }
    c->txn.rcpt = c->rc;
    c->txn.nrcpt = c->job->n;
    if (c->nmsgs > 0)
        c->d->stats.reused++;
    c->d->stats.transactions++;
    c->txn_ns = c->d->w->now;
    conn_handle(c, smtp_client_txn(conn_cli(c), &c->txn));
}

/* Recipients the policy sends in the next transaction (refused for the
 * server's limit per transaction, policy_rcpt_next_txn) go first in line
 * for it, now; this connection sends no more than were accepted from now
 * on. j keeps the rest, c->rc compacted beside it. */
static void
conn_rcpt_overflow(struct conn *c, struct job *j)
{
    unsigned over = 0;
    for (unsigned i = 0; i < j->n; i++)
        over += policy_rcpt_next_txn(&c->rc[i].out, c->txn.delivered);
    if (over == 0)
        return;
    struct job *next = job_copy(j, over);
    if (next == NULL)
        return; /* reported as they are: deferred along the schedule */
    next->n = 0;
    unsigned keep = 0;
    for (unsigned i = 0; i < j->n; i++) {
        if (policy_rcpt_next_txn(&c->rc[i].out, c->txn.delivered)) {
            next->idx[next->n++] = j->idx[i];
            continue;
        }
        j->idx[keep] = j->idx[i];
        c->rc[keep++] = c->rc[i];
    }
    j->n = keep;
    if (c->txn.delivered < c->max_rcpt)
        c->max_rcpt = c->txn.delivered;
    log_msg(LOG_INFO, "conn=%llx event=rcpt_limit domain=%s mx=%s accepted=%u next_txn=%u",
            (unsigned long long)c->id, c->dest->name, c->mx, c->txn.delivered, next->n);
    dest_push(c->dest, next, true);
}

static void
conn_txn_done(struct conn *c)
{
    struct job *j = c->job;
    c->job = NULL;
    c->nmsgs++;
    /* a greylisting reply: the retry leaves from this source (also when
     * the job goes on to the next MX address) */
    source_note_reply(c, &c->txn.msg);
    for (unsigned i = 0; c->rc != NULL && i < j->n; i++)
        source_note_reply(c, &c->rc[i].out);
    /* The window learns; the job may go to the next MX address instead
     * of being reported (the scheduler asks the policy). */
    if (!sched_txn_done(c, j)) {
        struct outcome_where where = {
            .mx = c->mx,
            .mx_addr = c->addr_str,
            .source = c->src_str[0] ? c->src_str : NULL,
            .src_id = c->src_id,
            .tls_proto = stream_tls_ready(&c->st) ? c->tls_proto : NULL,
            .tls_cipher = stream_tls_ready(&c->st) ? c->tls_cipher : NULL,
            .tls_verify = c->tls_verify[0] ? c->tls_verify : NULL,
            .tls_policy = conn_dane(c) != NULL ? "dane" : dest_tls_policy_str(c->dest, c->tls_pol),
            .src = CLASSIFY_CONNECT,
            .dsn_passed = (smtp_client_caps(&c->cli)->ext & SMTP_EXT_DSN) != 0 && !c->txn_verp,
        };
        if (!stream_tls(&c->st))
            conn_tlsrpt(c, TLSRPT_STARTTLS_NOT_SUPPORTED); /* testing mode: it went plain */
        conn_rcpt_overflow(c, j);
        job_finish(c->d, c->dest, j, c->env, c->rc, NULL, &where);
        free(j);
    }
    queue_envelope_free(c->env);
    c->env = NULL;
    free(c->rc);
    c->rc = NULL;
    conn_pool_put(&c->d->chunk_pool, c->chunk);
    c->chunk = NULL;
}

/* Act on the machine's events. Acting may produce more (a send frees
 * room, a transaction ends): they gather in pending_ev and the loop here
 * takes them, so no handler runs inside another. */
static void
conn_handle(struct conn *c, int ev)
{
    if (ev < 0) {
        log_msg(LOG_ERR, "conn=%llx event=client_misuse domain=%s err=%s",
                (unsigned long long)c->id, c->dest->name, smtp_client_strerror(ev));
        sched_conn_event(c, POLICY_CLIENT_MISUSE, NULL); /* no reconnect storm */
        conn_close(c, "misuse");
        return;
    }
    c->pending_ev |= ev;
    if (c->handling)
        return;
    c->handling = true;
    while (c->pending_ev != 0 && !c->closed) {
        ev = c->pending_ev;
        c->pending_ev = 0;
        if (ev & SMTP_CLIENT_EV_TIMER)
            conn_deadline(c, smtp_client_deadline_ms(&c->cli));
        if (ev & SMTP_CLIENT_EV_TXN_DONE)
            conn_txn_done(c);
        if (ev & SMTP_CLIENT_EV_CLOSE) {
            const struct smtp_outcome *so = smtp_client_session(&c->cli);
            /* A handshake that stalled past starttls_timeout failed too
             * (one that failed outright is marked where it is read). */
            if (so != NULL && so->reason == SMTP_REASON_TIMEOUT &&
                so->stage == SMTP_CLIENT_S_TLS && conn_tls_fallback_mark(c))
                log_msg(LOG_NOTICE,
                        "conn=%llx event=tls_failed domain=%s mx=%s addr=%s tls_policy=%s "
                        "err=\"handshake timed out\" next=plaintext",
                        (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str,
                        dest_tls_policy_str(c->dest, c->tls_pol));
            if (so != NULL && so->reason >= SMTP_REASON_TLS_UNAVAILABLE &&
                so->reason <= SMTP_REASON_TLS_UNVERIFIED && conn_dane(c) != NULL) {
                /* No STARTTLS, refused, a handshake or a TLSA match that
                 * failed: the host stays unused, never plaintext. */
                c->d->stats.dane_failed++;
                log_msg(LOG_NOTICE, "conn=%llx event=dane_failed domain=%s mx=%s reason=%s",
                        (unsigned long long)c->id, c->dest->name, c->mx,
                        smtp_reason_str(so->reason));
            }
            c->want_close = true;
            c->pending_ev = 0;
            stream_end(&c->st); /* over TLS, close_notify after the last octets */
            /* The machine arms nothing once closed, and a receiver that
             * stopped reading never takes what is left: give up on the
             * goodbye after one more period, as the submission server
             * does, or the connection and its slot would stay forever.
             * After a timeout (a body block not taken in data_timeout, a
             * reply not come) at once: the receiver has had its time, and
             * its slot is the site's (it held the site's only one for
             * another command_timeout, the job waiting for it).
             * conn_flush() closes sooner once drained. */
            bool timed_out = so != NULL && so->reason == SMTP_REASON_TIMEOUT;
            conn_deadline(c, timed_out ? 1 : c->d->cfg->delivery.command_timeout);
            break;
        }
        if (ev & SMTP_CLIENT_EV_STARTTLS)
            c->tls_wanted = true; /* after the output has left: conn_flush */
        if (ev & SMTP_CLIENT_EV_SEND_BODY)
            conn_body(c);
        if (ev & SMTP_CLIENT_EV_READY)
            conn_next(c);
        conn_flush(c);
    }
    conn_flush(c);
    c->handling = false;
    conn_cli_release(c);
    conn_recv(c);
}

/* ---- STARTTLS ---- */

/* The slot of c's MX address in the plaintext fallback table, and its key. */
static struct tls_fallback *
conn_tls_fallback_slot(const struct conn *c, uint64_t *key)
{
    char name[DNS_NAME_MAX + 2 + sizeof(c->addr_str)];
    int n = snprintf(name, sizeof(name), "%s@%s", c->mx, c->addr_str);
    uint64_t k = hash_bytes(name, n > 0 ? (size_t)n : 0);
    *key = k != 0 ? k : 1;
    size_t nslots = sizeof(c->d->tls_fallback) / sizeof(c->d->tls_fallback[0]);
    return &c->d->tls_fallback[*key % nslots];
}

/* Does c go in plaintext: its address failed a handshake lately? */
static bool
conn_tls_fallback(const struct conn *c)
{
    uint64_t key;
    const struct tls_fallback *f = conn_tls_fallback_slot(c, &key);
    return f->key == key && c->d->w->now < f->until_ns;
}

/* c's handshake failed: may its address go in plaintext from now on? */
static bool
conn_tls_fallback_mark(struct conn *c)
{
    if (!policy_tls_fallback(c->tls_pol, conn_dane(c) != NULL))
        return false;
    uint64_t key;
    struct tls_fallback *f = conn_tls_fallback_slot(c, &key);
    *f = (struct tls_fallback){key, c->d->w->now + MS_TO_NS(POLICY_TLS_FALLBACK_MS)};
    c->tls_fell_back = true; /* the scheduler retries in plaintext at once */
    return true;
}

/* The MX host this connection goes to as DNS answered it, when DANE
 * decides its TLS (RFC 7672): validated TLSA records, so TLS is mandatory
 * and authenticated by them, whatever the domain's tls policy (DANE comes
 * first). NULL: the domain's policy decides. (A host whose TLSA lookup
 * failed is never connected to: the scheduler skips it.) */
static const struct dns_mx_host *
conn_dane(const struct conn *c)
{
    if (c->tls_pol != -1)
        return NULL; /* not opened under DANE (site_share.c dest_tls_key): tls_relaxed mail */
    for (unsigned i = 0; c->answer != NULL && i < c->answer->nhosts; i++) {
        const struct dns_mx_host *h = &c->answer->hosts[i];
        if (h->name == c->mx)
            return h->dane == DNS_DANE_SECURE ? h : NULL;
    }
    return NULL;
}

/* Where c's failure happened beyond its MX host and address: the
 * source address it left from (the delivery log's source, as for an
 * outcome reported with its transaction) and the TLS it had. */
void
conn_fail_note(const struct conn *c, struct dest_fail *f)
{
    snprintf(f->source, sizeof(f->source), "%s", c->src_str);
    f->tls_policy = conn_dane(c) != NULL ? "dane" : dest_tls_policy_str(c->dest, c->tls_pol);
    f->tls_proto = stream_tls_ready(&c->st) ? c->tls_proto : NULL;
    f->tls_cipher = stream_tls_ready(&c->st) ? c->tls_cipher : NULL;
    snprintf(f->tls_verify, sizeof(f->tls_verify), "%s", c->tls_verify);
}

/* The host's usable TLSA records in TLS's terms; returns the count. */
static unsigned
conn_tlsa(const struct dns_mx_host *h, struct tls_tlsa out[DNS_TLSA_MAX])
{
    unsigned n = h->ntlsa < DNS_TLSA_MAX ? h->ntlsa : DNS_TLSA_MAX;
    for (unsigned i = 0; i < n; i++)
        out[i] = (struct tls_tlsa){h->tlsa[i].usage, h->tlsa[i].selector, h->tlsa[i].mtype,
                                   h->tlsa[i].len, h->tlsa[i].data};
    return tls_tlsa_usable(out, n) > 0 ? n : 0;
}

static void
tls_start(struct conn *c)
{
    c->tls_wanted = false;
    bool verify = c->tls_pol == DOMAIN_TLS_VERIFY;
    const struct dns_mx_host *dane = conn_dane(c);
    struct tls_tlsa tlsa[DNS_TLSA_MAX];
    unsigned ntlsa = dane != NULL ? conn_tlsa(dane, tlsa) : 0;
    if (dane != NULL)
        verify = false; /* authenticated by the TLSA records, or (none usable) not at all */
    /* DANE: SNI is the TLSA base domain; the other end of a validated
     * CNAME chain is a second name a DANE-TA leaf may carry (RFC 7672
     * 3.2.2, 8.1). Borrowed from c->answer, which c holds. */
    const char *base = dane != NULL && dane->tlsa_base != NULL ? dane->tlsa_base : c->mx;
    const char *alt = dane == NULL ? NULL : base == dane->expanded ? dane->name : dane->expanded;
    /* Sessions per source and MX address: a receiver may tie a session to
     * the address that made it, and a source's sessions are its own. */
    char key[DNS_NAME_MAX + 1 + sizeof(c->addr_str) + 68];
    snprintf(key, sizeof(key), "%s:%s@%s", c->mx, c->addr_str, c->src ? c->src->pattern : "");
    /* The engine's current ctx: a reload may have brought other CAs. */
    struct tls_ctx *ctx = delivery_tls_client(c->d);
    struct tls_conn *tls = NULL;
    int rc = ctx == NULL ? -ENOMEM
             : ntlsa > 0
                 ? tls_conn_new_client_dane(ctx, base, alt, tlsa, ntlsa, c->d->tls_cache, key, &tls)
                 : tls_conn_new_client(ctx, c->mx, verify, c->d->tls_cache, key, &tls);
    tls_ctx_unref(ctx);
    /* The ClientHello goes out now; the rest in conn_on_readable(). */
    if (rc < 0 || stream_start_tls(&c->st, tls) < 0) {
        conn_handle(c, smtp_client_tls_done(conn_cli(c), SMTP_CLIENT_TLS_FAILED));
        return;
    }
    conn_recv(c);
}

/* ---- the stream's callbacks ---- */

/* Replies, plain or decrypted, lent for the call: the machine consumes
 * all it is given (or closes). */
static void
conn_on_data(struct stream *st, const char *p, size_t len)
{
    struct conn *c = CONN_OF(st, st);
    if (c->closed || c->want_close)
        return;
    size_t used;
    conn_handle(c, smtp_client_input(conn_cli(c), p, len, &used));
}

static void
conn_on_handshake(struct stream *st)
{
    struct conn *c = CONN_OF(st, st);
    struct tls_info info;
    bool verified = false;
    if (stream_tls_info(&c->st, &info) == 0) {
        c->tls_proto = info.protocol;
        c->tls_cipher = info.cipher;
        verified = info.verified;
        if (conn_dane(c) != NULL && info.dane && verified)
            c->d->stats.dane_authenticated++;
        if (conn_dane(c) != NULL)
            log_msg(LOG_INFO,
                    "conn=%llx event=tls_dane domain=%s mx=%s authenticated=%s "
                    "usage=%s resumed=%s protocol=%s peer=\"%s\"",
                    (unsigned long long)c->id, c->dest->name, c->mx,
                    info.dane && verified ? "yes" : "no",
                    info.dane_usage == 3   ? "dane-ee"
                    : info.dane_usage == 2 ? "dane-ta"
                    : info.dane            ? "session"
                                           : "none-usable",
                    info.resumed ? "yes" : "no", info.protocol, info.peer_subject);
        snprintf(c->tls_verify, sizeof(c->tls_verify), "%s",
                 verified ? "ok" : info.verify_result ? info.verify_result : "unverified");
        snprintf(c->dest->tls_verify, sizeof(c->dest->tls_verify), "%s", c->tls_verify);
        conn_tlsrpt(c, verified ? TLSRPT_SUCCESS : tlsrpt_result_of_verify(info.verify_result));
    }
    conn_handle(c, smtp_client_tls_done(conn_cli(c), verified ? SMTP_CLIENT_TLS_VERIFIED
                                                          : SMTP_CLIENT_TLS_UNVERIFIED));
}

static const char *
conn_output(struct stream *st, size_t *len)
{
    struct conn *c = CONN_OF(st, st);
    return smtp_client_output(&c->cli, len);
}

static void
conn_on_sent(struct stream *st, size_t n)
{
    struct conn *c = CONN_OF(st, st);
    int ev = smtp_client_sent(conn_cli(c), n);
    if (ev < 0)
        conn_handle(c, ev); /* misuse: closes */
    else
        c->pending_ev |= ev; /* acted on by the conn_handle() under way, or below */
}

/* The STARTTLS handshake failed (err, OpenSSL's detail, why for the
 * outcome and tls_verify; verify: a certificate that did not verify):
 * logged, counted for TLS reporting, the address marked for plaintext
 * where the policy allows it (conn_tls_fallback_mark), and the machine
 * told. Why goes whole into the outcome's text (a DSN has no tls_verify,
 * which may cut it). */
static void
conn_handshake_failed(struct conn *c, const char *err, const char *detail, const char *why,
                      bool verify)
{
    bool fallback = conn_tls_fallback_mark(c);
    log_msg(LOG_NOTICE,
            "conn=%llx event=tls_failed domain=%s mx=%s addr=%s tls_policy=%s err=\"%s\" "
            "detail=\"%s\" next=%s",
            (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str,
            conn_dane(c) != NULL ? "dane" : dest_tls_policy_str(c->dest, c->tls_pol), err, detail,
            fallback ? "plaintext" : "tls");
    snprintf(c->tls_verify, sizeof(c->tls_verify), "%s", why);
    snprintf(c->dest->tls_verify, sizeof(c->dest->tls_verify), "%s", c->tls_verify);
    conn_tlsrpt(c, verify ? tlsrpt_result_of_verify(c->tls_verify) : TLSRPT_VALIDATION_FAILURE);
    conn_handle(c, smtp_client_tls_failed(conn_cli(c), why));
}

/* An idle connection that hears from the server leaves the idle list
 * through conn_free or the events; the machine knows what it means. */
static void
conn_on_readable(struct stream *st)
{
    struct conn *c = CONN_OF(st, st);
    int rc = stream_read(&c->st);
    if (rc < 0 && !c->closed) {
        /* OpenSSL's words (tls/conn.c's, for a key update flood) */
        const char *why = stream_tls_error(&c->st)[0] ? stream_tls_error(&c->st) : tls_strerror(rc);
        if (stream_tls(&c->st) && !stream_tls_ready(&c->st)) {
            conn_handshake_failed(c, tls_strerror(rc), stream_tls_error(&c->st), why,
                                  rc == TLS_EVERIFY);
        } else if (stream_tls(&c->st) && rc <= TLS_EPROTO && rc >= TLS_EINTERNAL) {
            /* The session broke in TLS after the handshake (an alert, a
             * record that did not decrypt, a key update flood): its
             * outcomes say so, not "lost connection". */
            if (smtp_client_state(&c->cli) != SMTP_CLIENT_S_CLOSED) /* else: after our QUIT */
                log_msg(LOG_NOTICE,
                        "conn=%llx event=tls_failed domain=%s mx=%s addr=%s state=%s err=\"%s\" "
                        "detail=\"%s\"",
                        (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str,
                        smtp_client_state_str(smtp_client_state(&c->cli)), tls_strerror(rc), why);
            conn_handle(c, smtp_client_tls_error(conn_cli(c), why));
        } else {
            conn_handle(c, smtp_client_eof(conn_cli(c)));
        }
    } else if (stream_eof(&c->st) && !c->closed) {
        conn_handle(c, smtp_client_eof(conn_cli(c))); /* the server's close_notify */
    }
    conn_handle(c, 0); /* what sending produced meanwhile; the next read */
    conn_maybe_free(c);
}

static void
conn_on_writable(struct stream *st)
{
    struct conn *c = CONN_OF(st, st);
    conn_handle(c, smtp_client_state(&c->cli) == SMTP_CLIENT_S_BODY ? SMTP_CLIENT_EV_SEND_BODY
                                                                     : 0);
    conn_maybe_free(c);
}

static void
conn_on_eof(struct stream *st, int err, bool send)
{
    struct conn *c = CONN_OF(st, st);
    if (!c->closed && stream_tls(&c->st) && !stream_tls_ready(&c->st) &&
        smtp_client_state(&c->cli) == SMTP_CLIENT_S_TLS &&
        (err == 0 || err == -ECONNRESET || err == -EPIPE)) {
        /* Closed or reset by the receiver in the handshake (one whose
         * TLS stack hangs up at our ClientHello): a failed handshake, as
         * one that answered garbage is, so opportunistic TLS goes on in
         * plaintext rather than meeting the same close at every attempt
         * until the mail expires. Not a local failure (no memory for
         * the read): that is a lost connection, the receiver's TLS not
         * in question. */
        const char *why = send ? "connection lost in the TLS handshake (send failed)"
                               : "connection closed in the TLS handshake";
        conn_handshake_failed(c, why, "-", why, false);
        conn_close(c, send ? "send_failed" : "eof");
        conn_maybe_free(c);
        return;
    }
    conn_handle(c, smtp_client_eof(conn_cli(c)));
    conn_close(c, send ? "send_failed" : "eof");
    conn_maybe_free(c);
}

static void
conn_on_release(struct stream *st)
{
    conn_maybe_free(CONN_OF(st, st));
}

static void conn_on_connect(struct stream *st, int res);

static const struct stream_ops conn_stream_ops = {
    .on_data = conn_on_data, /* lend mode: no room */
    .on_handshake = conn_on_handshake,
    .output = conn_output,
    .on_sent = conn_on_sent,
    .on_readable = conn_on_readable,
    .on_writable = conn_on_writable,
    .on_eof = conn_on_eof,
    .on_connect = conn_on_connect,
    .on_release = conn_on_release,
};

/* Why the connect to c's address failed (err: -errno, or -ETIMEDOUT for
 * our own deadline), for the deferral of what waits when no address is
 * left: no reply exists, so no code; the reason and the text say what. */
static void
conn_connect_outcome(const struct conn *c, int err, struct smtp_outcome *o)
{
    memset(o, 0, sizeof(*o));
    o->status = SMTP_STATUS_TEMPFAIL;
    o->scope = SMTP_SCOPE_SESSION;
    o->reason = err == -ECONNREFUSED ? SMTP_REASON_CONNECT_REFUSED
                : err == -ETIMEDOUT  ? SMTP_REASON_CONNECT_TIMEOUT
                                     : SMTP_REASON_CONNECT_FAILED;
    o->enh = (struct smtp_enh){4, 4, 1};
    snprintf(o->text, sizeof(o->text), "connect to %s (%s): %s", c->mx, c->addr_str,
             err == -ETIMEDOUT ? "timed out" : strerror(-err));
}

static void
conn_on_timer(struct timer *tm, void *ctx)
{
    struct conn *c = (struct conn *)((char *)tm - offsetof(struct conn, timer));
    if (!c->connected) {
        /* connect timed out: the pending connect completes on the cancel */
        log_msg(LOG_NOTICE, "conn=%llx event=connect_failed domain=%s mx=%s addr=%s err=timeout",
                (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str);
        struct smtp_outcome o;
        conn_connect_outcome(c, -ETIMEDOUT, &o);
        c->d->stats.connect_failures++;
        sched_conn_event(c, POLICY_CONNECT_TIMEOUT, &o); /* the reason, for a deferral */
        conn_close(c, "connect_timeout");
        return;
    }
    if (c->want_close) {
        /* The session is over; its last octets were not taken in time. */
        conn_close(c, "send_timeout");
        conn_maybe_free(c);
        return;
    }
    bool idle = smtp_client_state(conn_cli(c)) == SMTP_CLIENT_S_IDLE;
    if (c->idle_short && idle && !sched_conn_key_wanted(c)) {
        /* the site that waited for its [mx] or [source] slot has one now:
         * it idles on for the rest of idle_timeout */
        c->idle_short = false;
        c->idle_poll = sched_conn_key_polled(c);
        uint64_t ms = c->d->cfg->delivery.idle_timeout;
        conn_idle_wait(c, ms > KEY_IDLE_GRACE_MS ? ms - KEY_IDLE_GRACE_MS : 1);
        return;
    }
    if (c->idle_poll && idle && !c->idle_short) {
        /* a step of its idle time: a worker or node elsewhere waiting
         * for its shared cap's slot gets it now, else it idles on */
        if (sched_conn_wanted_elsewhere(c))
            c->idle_short = true; /* goodbye, limit_wanted */
        else if (c->idle_left_ms > 0) {
            conn_idle_wait(c, c->idle_left_ms);
            return;
        }
    }
    /* idle_timeout: its goodbye, after idling; else the machine's
     * command timeout, which it says goodbye after too */
    c->quit_why = smtp_client_state(conn_cli(c)) != SMTP_CLIENT_S_IDLE ? "timeout"
                  : c->idle_short                                        ? "limit_wanted"
                                                                         : "idle_timeout";
    conn_handle(c, smtp_client_timeout(conn_cli(c)));
}

/* Every state transition of the client machine, at debug level. */
static void
conn_on_trace(void *arg, enum smtp_client_state from, enum smtp_client_state to)
{
    const struct conn *c = arg;
    log_msg(LOG_DEBUG, "conn=%llx event=state domain=%s from=%s to=%s", (unsigned long long)c->id,
            c->dest->name, smtp_client_state_str(from), smtp_client_state_str(to));
}

static void
conn_on_connect(struct stream *st, int res)
{
    struct conn *c = CONN_OF(st, st);
    if (res < 0) {
        log_msg(LOG_NOTICE, "conn=%llx event=connect_failed domain=%s mx=%s addr=%s err=%s",
                (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str, strerror(-res));
        struct smtp_outcome o;
        conn_connect_outcome(c, res, &o);
        c->d->stats.connect_failures++;
        sched_conn_event(c, POLICY_CONNECT_FAILED, &o); /* the reason, for a deferral */
        conn_close(c, "connect_failed");
        conn_maybe_free(c);
        return;
    }
    const struct dns_mx_host *dane = conn_dane(c);
    c->connected = true;
    struct sockaddr_storage local;
    socklen_t llen = sizeof(local);
    if (getsockname(stream_fd(&c->st), (struct sockaddr *)&local, &llen) == 0)
        netaddr_ip_str((const struct sockaddr *)&local, c->src_str, sizeof(c->src_str));
    log_msg(LOG_INFO, "conn=%llx event=connected domain=%s mx=%s addr=%s source=%s pool=%s",
            (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str,
            c->src_str[0] ? c->src_str : "-",
            c->dest->pool ? intern_name(c->d->names, c->dest->pool) : "-");
    int one = 1;
    setsockopt(stream_fd(&c->st), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    /* The EHLO name: the source's (its PTR), else the [source] section of
     * the default address's, else [server] hostname. The machine borrows
     * it for the session: c->cfg_gen keeps its config (config_gen.h), so a
     * reload does not pull it away. */
    const char *ehlo = c->src && c->src->ehlo ? c->src->ehlo : NULL;
    if (ehlo == NULL && c->src == NULL && c->srck != NULL && c->srck->pol != NULL) {
        /* The section as c's config has it (srck's may be newer). */
        const char *pat = c->srck->pattern + 4; /* "src:" */
        for (unsigned i = 0; i < c->cfg->nsources && ehlo == NULL; i++)
            if (strcmp(c->cfg->sources[i].pattern, pat) == 0)
                ehlo = c->cfg->sources[i].ehlo;
    }
    struct smtp_client_opts o = {
        .name = ehlo ? ehlo : c->cfg->server.hostname,
        .trace = log_enabled(LOG_DEBUG) ? conn_on_trace : NULL,
        .trace_arg = c,
        .tls = !delivery_tls_on(c->d)              ? SMTP_CLIENT_TLS_OFF
               : c->tls_pol == DOMAIN_TLS_VERIFY   ? SMTP_CLIENT_TLS_VERIFY
               : c->tls_pol == DOMAIN_TLS_REQUIRED ? SMTP_CLIENT_TLS_REQUIRED
               : c->tls_pol == DOMAIN_TLS_OPTIONAL ? SMTP_CLIENT_TLS_OPTIONAL
                                                   : SMTP_CLIENT_TLS_OFF,
        .max_rcpt = sched_conn_max_rcpt(c),
        /* c->cfg_gen keeps the config: the table outlives c */
        .timeout_ms = c->cfg->delivery.client_timeouts,
    };
    if (dane != NULL) {
        /* DANE comes before the domain's policy (and MTA-STS): TLS or
         * nothing, authenticated when a record is usable. */
        struct tls_tlsa tlsa[DNS_TLSA_MAX];
        o.tls = conn_tlsa(dane, tlsa) > 0 ? SMTP_CLIENT_TLS_VERIFY : SMTP_CLIENT_TLS_REQUIRED;
        o.tls_label = "DANE";
    } else if (o.tls == SMTP_CLIENT_TLS_OPTIONAL && conn_tls_fallback(c)) {
        o.tls = SMTP_CLIENT_TLS_OFF;
        /* The delivery log's tls_verify says why this went in plaintext. */
        snprintf(c->tls_verify, sizeof(c->tls_verify), "%s",
                 "plaintext fallback: a STARTTLS handshake failed here lately");
        log_msg(LOG_INFO,
                "conn=%llx event=tls_plaintext_fallback domain=%s mx=%s addr=%s "
                "reason=\"a STARTTLS handshake failed here lately; opportunistic TLS\"",
                (unsigned long long)c->id, c->dest->name, c->mx, c->addr_str);
    }
    c->max_rcpt = o.max_rcpt;
    int rc = smtp_client_init(&c->cli, &o);
    if (rc < 0) {
        log_msg(LOG_ERR, "conn=%llx event=client_init_failed name=%s err=%s",
                (unsigned long long)c->id, o.name, smtp_client_strerror(rc));
        conn_close(c, "init");
        conn_maybe_free(c);
        return;
    }
    conn_deadline(c, smtp_client_deadline_ms(&c->cli));
    conn_recv(c);
    conn_maybe_free(c);
}

/* ---- what the scheduler calls ---- */

/* The address of a [source ADDRESS] section, for bind(). */
static bool
source_sockaddr(const struct mx_policy *src, int family, struct sockaddr_storage *out)
{
    memset(out, 0, sizeof(*out));
    if (family == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)out;
        s6->sin6_family = AF_INET6;
        return inet_pton(AF_INET6, src->pattern, &s6->sin6_addr) == 1;
    }
    struct sockaddr_in *s4 = (struct sockaddr_in *)out;
    s4->sin_family = AF_INET;
    return inet_pton(AF_INET, src->pattern, &s4->sin_addr) == 1;
}

struct conn *
conn_open(struct dest *t, const struct dns_mx_host *host, const union dns_addr *addr,
          const struct mx_policy *srcpol, uint32_t src_id, struct open_fail *why)
{
    struct delivery *d = t->d;
    memset(why, 0, sizeof(*why));
    struct conn *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        why->err = -ENOMEM;
        return NULL;
    }
    int fd = socket(addr->sa.sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        why->err = -errno;
        log_msg(LOG_ERR, "event=socket_failed domain=%s err=%s", t->name, strerror(errno));
        free(c);
        return NULL;
    }
    int lowat = CONN_NOTSENT_LOWAT;
    setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof(lowat));
    const struct sockaddr_storage *src =
        addr->sa.sa_family == AF_INET6 ? &d->cfg->delivery.source6 : &d->cfg->delivery.source4;
    struct sockaddr_storage pool_src;
    if (srcpol != NULL) {
        /* A pool's source: its address, of the target's family. */
        if (!source_sockaddr(srcpol, addr->sa.sa_family, &pool_src)) {
            log_msg(LOG_ERR, "event=source_family_mismatch source=%s domain=%s",
                    srcpol->pattern, t->name);
            why->err = -EAFNOSUPPORT;
            snprintf(why->source, sizeof(why->source), "%s", srcpol->pattern);
            close(fd);
            free(c);
            return NULL;
        }
        src = &pool_src;
    }
    if (src->ss_family != AF_UNSPEC &&
        bind(fd, (const struct sockaddr *)src,
             src->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                        : sizeof(struct sockaddr_in)) < 0) {
        why->err = -errno;
        netaddr_ip_str((const struct sockaddr *)src, why->source, sizeof(why->source));
        log_msg(LOG_ERR, "event=source_bind_failed source=%s domain=%s err=%s", why->source,
                t->name, strerror(-why->err));
        close(fd);
        free(c);
        return NULL;
    }
    stream_init(&c->st, d->w, fd, &conn_stream_ops, &d->bufs);
    timer_init(&c->timer, conn_on_timer);
    /* What c borrows from a config is of one: srcpol's (of t's pool as
     * this worker sees the config), else the one in force. Harnesses
     * without generations: d->cfg, which they never replace. */
    c->cfg_gen = config_gens_of_source(d->gens, srcpol, &c->cfg);
    if (c->cfg == NULL)
        c->cfg = d->cfg;
    /* Counted from here on: the id, the site, the caps. */
    sched_conn_attach(c, t, host, addr, srcpol, src_id);
    /* The source it is bound to, known before the connect: a failure to
     * connect names it too (after it, getsockname() says the same). */
    if (src->ss_family != AF_UNSPEC)
        netaddr_ip_str((const struct sockaddr *)src, c->src_str, sizeof(c->src_str));
    stream_connect(&c->st, &c->addr.sa, dns_addr_len(&c->addr));
    conn_deadline(c, d->cfg->delivery.connect_timeout);
    return c;
}

/* An idle connection handed to a domain with work (the scheduler's
 * reuse): its next transaction goes out now. */
void
conn_resume(struct conn *c)
{
    conn_next(c);
    conn_flush(c);
}

/* Say goodbye now (drain), after what is in flight. */
void
conn_quit(struct conn *c)
{
    conn_handle(c, smtp_client_quit(conn_cli(c)));
}
