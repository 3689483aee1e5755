/*
 * server: the submission server of one worker (see server.h).
 *
 * A session is one state machine (enum session_state, session_enter()
 * for every transition, session_run() to act on what has arrived). Input
 * is read into a fixed buffer; complete command lines are handled one by
 * one, their replies gathered in a fixed output buffer and sent in one
 * write when the input holds no further complete command (RFC 2920 reply
 * batching). The end of DATA hands the message to the spool and waits
 * (state COMMIT, no reading) until the commit holding it returned: only
 * then is 250 sent. A message body is held whole until then, within one
 * budget shared by every worker ([server] body_memory_limit, see "message
 * bodies" below). A commit that returns after the client left still hands
 * the message to delivery.
 *
 * A session can also run detached (server_session_feed(), for the fuzzer):
 * the same code, with the ring's reads and sends and the spool's commit
 * replaced by the caller's buffers and an immediate completion.
 *
 * When the message is to be DKIM-signed, its body hash is computed as the
 * content arrives, and the end of DATA first hands the header section to
 * the signing pool (state SIGN, no reading); the commit follows with the
 * DKIM-Signature fields in front. Detached sessions sign nothing.
 *
 * The socket is a stream (engine/stream.h) in room mode: plain reads
 * land in the input buffer directly; over TLS, session_run() has the
 * stream decrypt what it holds into the input buffer as the state machine
 * makes room, and only waits for the socket once nothing buffered is left
 * to read.
 *
 * AUTH hands the password to the hashing pool (auth_pool.h) and waits in
 * AUTH_HASH, reading nothing, until the answer comes back through the
 * worker's mailbox; another session with the same credentials waits for
 * that same hash.
 *
 * Lifetime (STYLE rule 7): a session counts its operations in flight
 * (recv, send, a pending spool commit, a password hash in the AUTH pool).
 * session_close() shuts the socket down so that a pending recv completes;
 * the last completion frees (the stream's reads and sends count in
 * stream_busy(), the others in inflight).
 *
 * The bounce role: sessions accepted on [bounce] listen run the same
 * machine with other rules at MAIL, RCPT and the end of the data: no AUTH
 * and no trusted networks, any sender, recipients only at the bounce
 * domains (oob_rcpt_check: a VERP address whose token verifies, or one of
 * accept_local_parts; a forged token and everything else get 550 5.7.1,
 * never a relay), and an accepted message is parsed and logged there and
 * then (oob_message) instead of being signed and committed: nothing of
 * it is queued. The [server] limits (sizes, deadlines, connections per
 * address, errors) apply unchanged.
 *
 * Threading: everything here runs on the worker's thread.
 */
#include "engine/server.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/auth.h"
#include "engine/auth_limit.h"
#include "engine/auth_pool.h"
#include "engine/delivery.h"
#include "engine/dkim_pool.h"
#include "engine/dlog.h"
#include "engine/engine.h"
#include "engine/msa.h"
#include "engine/netaddr.h"
#include "engine/oob.h"
#include "engine/owner.h"
#include "engine/smtp_cmd.h"
#include "engine/smtp_data.h"
#include "engine/stream.h"
#include "engine/suppress.h"
#include "engine/worker.h"
#include "queue/queue.h"
#include "tls/tls.h"

#define IN_CAP      (SMTP_CMD_LINE_MAX_AUTH + 4096)
#define OUT_CAP     8192
#define OUT_HIGH    (OUT_CAP - 1024) /* stop handling commands until a send drains */
#define BODY_START  (16 * 1024)
#define BODY_MMAP   (256 * 1024)  /* from here on a body buffer is a mapping of its own */
#define BODY_STEP   (1024 * 1024) /* least growth of a mapped body buffer */
#define RCPT_KEEP           64 /* a recipient array up to this stays across transactions */
#define RCPT_ALLOC_OVERHEAD 16 /* what malloc adds to each string of a recipient */
#define ACCEPT_BACKOFF_MS 100

enum session_state {
    SS_PREGREET, /* greet_pause: waiting, then a peek for early talkers */
    SS_COMMAND,  /* reading command lines */
    SS_AUTH,     /* reading a SASL response line (after 334) */
    SS_AUTH_HASH, /* the password is with the hashing pool; no reading */
    SS_AUTH_WAIT, /* a failed AUTH: the delay before 535 */
    SS_DATA,     /* reading message content after 354 */
    SS_BDAT,     /* reading the octets of a BDAT chunk */
    SS_SIGN,     /* the message is with the DKIM signing pool; no reading */
    SS_COMMIT,   /* the message is with the spool; no reading */
    SS_TLS_START, /* "220 Ready to start TLS" going out; input is discarded */
    SS_TLS,      /* TLS handshake (after STARTTLS, or at once on an implicit-TLS port) */
    SS_CLOSING,  /* sending the last reply, then closing */
    SS_CLOSED,   /* socket shut down; freed on the last completion */
};

static const char *const state_names[] = {
    "pregreet", "command", "auth",      "auth_hash", "auth_wait", "data", "bdat",
    "sign",     "commit",  "tls_start", "tls",       "closing",   "closed",
};

static const char *
session_state_str(enum session_state s)
{
    return (unsigned)s < sizeof(state_names) / sizeof(state_names[0]) ? state_names[s] : "?";
}

struct rcpt {
    char *addr;  /* owned */
    char *orcpt; /* owned; NULL when absent */
    unsigned notify;
};
/* The start-up check (config.c) leaves room for max_recipients of these. */
_Static_assert(sizeof(struct rcpt) + 2 * RCPT_ALLOC_OVERHEAD + SMTP_CMD_LINE_MAX_RCPT + 3 <=
                   CONFIG_RCPT_MEMORY_MAX,
               "a recipient's memory bound");

struct session {
    struct server_worker *sw; /* borrowed: outlives its sessions */
    struct session *prev, *next;
    uint64_t id;
    struct stream st;  /* the socket, plain or TLS; its reads and sends */
    enum session_state state;
    unsigned inflight; /* the peek, a pending commit, a signature or a hash */
    bool peek_busy;
    bool counted;      /* in the engine's client counts */
    uint8_t conn_key[16]; /* counted under this key in e->per_ip */
    struct op peek_op;
    struct timer timer;

    struct sockaddr_storage peer;
    char peer_ip[INET6_ADDRSTRLEN];
    bool trusted;  /* in trusted_networks */
    bool loopback;
    bool bounce;   /* accepted on the bounce listener: the bounce role */

    /* TLS (in the stream): in/out stay plaintext. */
    bool tls_implicit;    /* an implicit-TLS listener: greet after the handshake */
    bool tls_refuse;      /* over a connection limit on it: 421 after the handshake */
    const char *tls_proto, *tls_cipher; /* once the handshake completed: OpenSSL's
                           * constant names ("TLSv1.3", "TLS_AES_256_GCM_SHA384") */

    char helo[256];
    bool greeted;  /* HELO or EHLO seen */
    bool esmtp;
    unsigned errors;
    /* Commands by verb (SMTP_VERB_NONE: unrecognized), and those answered
     * 4xx or 5xx: the disconnect line's summary, as Postfix's. */
    uint32_t cmds[SMTP_VERB_AUTH + 1], cmds_refused[SMTP_VERB_AUTH + 1];

    /* AUTH */
    struct auth_db *users;         /* owned reference, from session start */
    const struct auth_user *user;  /* borrowed: lives as long as users */
    uint32_t auth_mech;
    unsigned auth_step;            /* LOGIN: 0 user, 1 password */
    char auth_name[256];
    unsigned auth_failures;
    struct auth_job hash_job;      /* with the pool in SS_AUTH_HASH (an op in flight) */
    bool limit_address, limit_user; /* the hash holds a place among the attempts under
                                     * way of the address, of the name (auth_limit_begin) */
    /* Identical credentials are hashed once per worker: a session whose
     * user and password are being hashed for another session (its leader)
     * waits for that hash instead of starting its own. */
    struct session *hash_leader;    /* borrowed: the session this one waits for; NULL: none */
    struct session *hash_followers; /* borrowed: sessions waiting for this one's hash */
    struct session *hash_next_follower; /* borrowed: the next in the leader's list */
    struct session *hash_next;      /* borrowed: the next in sw->hashing */
    uint8_t addr_key[16];          /* the client's key in the failure limits */
    size_t addr_key_len;

    /* the transaction */
    bool in_txn;
    char *sender;                  /* owned */
    char *envid;                   /* owned; NULL when absent */
    enum smtp_ret ret;
    enum smtp_body body_type;
    bool smtputf8;
    struct rcpt *rcpts;            /* owned */
    unsigned nrcpt, rcpt_cap;
    uint64_t rcpt_bytes; /* of the body budget, held for the recipients */

    /* message content */
    struct smtp_unstuff unstuff;
    char *body;                    /* owned: malloc'd below BODY_MMAP, else mmap'd;
                                    * body_cap bytes of it are counted in e->body_bytes */
    size_t body_len, body_cap;
    uint64_t body_seen;            /* content octets of the message so far, kept or not */
    uint64_t size_hint;            /* SIZE= of MAIL (at most max_message_size); 0: none */
    bool too_big;                  /* over max_message_size: read on, keep nothing */
    bool no_memory;                /* the body buffer could not grow (body_memory_limit,
                                    * or no memory): read on, keep nothing, 452 at the end */
    uint32_t bdat_flags;           /* enum smtp_data_flag of the BDAT octets so far */
    uint32_t bdat_line;            /* octets of the current BDAT line */
    bool bdat_cr;                  /* the last BDAT octet was a CR */
    bool bdat;                     /* this transaction uses BDAT */
    bool bdat_discard;             /* chunk read only to be dropped (a refused BDAT) */
    bool bdat_last;
    uint64_t bdat_left;
    uint64_t msg_id;
    char *ev_line; /* owned: the reception event committed with the message, or NULL */
    size_t ev_len;
    char hdrs[MSA_HEADERS_MAX];
    size_t hdrs_len;
    uint64_t expire_ms;            /* the message's own expiry; 0: none */
    struct owner owner;            /* who the message belongs to (owner.h) */
    struct owner_cut cuts[OWNER_F_COUNT]; /* control fields, removed from what is stored */
    unsigned ncuts;
    bool sep;                      /* an empty line is stored at body[sep_at]: the body */
    size_t sep_at;                 /* began without one (msa_scan's no_separator) */

    /* DKIM: the body hash as the content arrives, then the signature */
    struct dkim_keyring *dkim_keys; /* owned reference, from DATA/BDAT on; NULL: not signed */
    struct dkim_body *dkim_body;   /* owned; kept from one transaction to the next */
    unsigned dkim_canons;          /* what dkim_body hashes */
    struct dkim_job *dkim_job;     /* owned; NULL while it is with the pool */
    const char *dkim_skip;         /* why the message goes unsigned; NULL: signed or no keys */

    size_t in_len;
    bool skip_line; /* dropping the rest of an over-long line */
    size_t out_len, out_sent;
    char in[IN_CAP];
    char out[OUT_CAP];
};

struct listener {
    struct server_worker *sw;
    int fd;
    bool implicit_tls;
    bool bounce;   /* a [bounce] listen address */
    struct netaddr addr;
    struct op op;
    struct timer retry; /* re-arm after EMFILE and friends */
    bool armed;
};

struct server_worker {
    struct engine *e;  /* borrowed */
    struct worker *w;  /* borrowed */
    const struct server_config *cfg; /* borrowed from e->cfg */
    struct tls_ctx *tls;   /* owned reference to e->tls_server, taken again on reload;
                            * NULL when TLS is off */
    struct listener *ls; /* owned array */
    int nls;
    struct queue_port *port; /* owned */
    struct op port_op;
    bool port_armed;
    bool stopping;
    atomic_bool draining;    /* listeners shut: accept nothing more */
    struct session *sessions; /* list of owned sessions */
    struct session *hashing;  /* borrowed: sessions whose own hash is with the pool */
    struct auth_cache auth;
    uint64_t seq;
    unsigned tls_refusing; /* sessions with tls_refuse set, at most TLS_REFUSE_MAX */
    struct server_stats stats;
    struct stats_tenant_table tenants; /* counts per tenant */
    bool detached; /* a harness's: no listener, no ring I/O, no spool (see server.h) */
};

/* Implicit-TLS clients over a connection limit that are told so inside
 * TLS, per worker, at once. Each costs a handshake and TLS buffers, and
 * is outside the limits that bound everything else: past this, they are
 * closed without a word (as by a full listen backlog). */
#define TLS_REFUSE_MAX 64

static void session_run(struct session *s);
static void session_close(struct session *s, const char *why);
static void session_maybe_free(struct session *s);
static void session_on_peek(struct worker *w, struct op *op, int res, uint32_t flags);
static void session_on_timer(struct timer *t, void *ctx);
static void hand_to_delivery(struct session *s);
static void log_reception(struct session *s, const char *qid);
static void tenant_count(struct server_worker *sw, const char *name, unsigned nrcpt);

#define SESSION_OF(ptr, field) ((struct session *)((char *)(ptr) - offsetof(struct session, field)))

/* ---- state ---- */

static void
session_deadline(struct session *s, uint64_t ms)
{
    worker_timer_arm(s->sw->w, &s->timer, s->sw->w->now + MS_TO_NS(ms));
}

static void
session_enter(struct session *s, enum session_state next)
{
    if (s->state == next)
        return;
    if (log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, "session=%016llx state=%s->%s", (unsigned long long)s->id,
                session_state_str(s->state), session_state_str(next));
    s->state = next;
    if (next == SS_CLOSING) {
        stream_end(&s->st); /* over TLS, close_notify after the last reply */
        /* The last reply has one command's time to leave, however the
         * session got here: some ways in (a failed AUTH's delay or hash)
         * have no deadline running, and a client that stopped reading
         * would hold the session, and its connection slots, for good. */
        session_deadline(s, s->sw->cfg->timeout_command);
    }
}

/* ---- output ---- */

static void __attribute__((format(printf, 2, 3)))
reply(struct session *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    size_t room = OUT_CAP - s->out_len;
    int n = vsnprintf(s->out + s->out_len, room, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n + 2 >= room) {
        /* Cannot happen while OUT_HIGH leaves room for the longest reply;
         * refuse to send a truncated one. */
        log_msg(LOG_ERR, "session=%016llx event=reply_overflow", (unsigned long long)s->id);
        session_close(s, "reply_overflow");
        return;
    }
    s->out_len += (size_t)n;
    s->out[s->out_len++] = '\r';
    s->out[s->out_len++] = '\n';
}

static void
flush(struct session *s)
{
    if (s->state == SS_CLOSED || s->sw->detached)
        return; /* detached: server_session_feed() takes the replies */
    stream_send(&s->st);
}

static void tls_begin(struct session *s);

/* ---- the stream's callbacks ---- */

/* Plaintext lands in s->in, up to its end; nothing while the 220 to
 * STARTTLS goes out (what follows it is dropped unread). */
static char *
session_room(struct stream *st, size_t *cap)
{
    struct session *s = SESSION_OF(st, st);
    if (s->state == SS_TLS_START || s->in_len >= IN_CAP) {
        *cap = 0;
        return NULL;
    }
    *cap = IN_CAP - s->in_len;
    return s->in + s->in_len;
}

static void
session_on_data(struct stream *st, const char *p, size_t len)
{
    struct session *s = SESSION_OF(st, st);
    (void)p; /* at s->in + s->in_len: session_room() said so */
    s->in_len += len;
}

static const char *
session_output(struct stream *st, size_t *len)
{
    struct session *s = SESSION_OF(st, st);
    *len = s->out_len - s->out_sent;
    return s->out + s->out_sent;
}

static void
session_on_sent(struct stream *st, size_t n)
{
    struct session *s = SESSION_OF(st, st);
    s->out_sent += n;
    if (s->out_sent == s->out_len)
        s->out_sent = s->out_len = 0;
}

static void tls_established(struct stream *st);

static void
session_on_readable(struct stream *st)
{
    session_run(SESSION_OF(st, st));
}

static void
session_on_writable(struct stream *st)
{
    struct session *s = SESSION_OF(st, st);
    if (s->state == SS_CLOSING)
        stream_send(&s->st); /* the rest, then close_notify once the last reply is in */
    if (stream_drained(&s->st)) {
        if (s->state == SS_CLOSING) {
            session_close(s, NULL);
            session_maybe_free(s);
            return;
        }
        if (s->state == SS_TLS_START)
            tls_begin(s);
        if (s->state == SS_CLOSED) {
            session_maybe_free(s);
            return;
        }
    }
    session_run(s);
}

static void
session_on_eof(struct stream *st, int err, bool send)
{
    struct session *s = SESSION_OF(st, st);
    session_close(s, send ? (err == -EPIPE ? "send_zero" : "send_error")
                          : (err == 0 ? "client_closed" : "recv_error"));
    session_maybe_free(s);
}

static void
session_on_release(struct stream *st)
{
    session_maybe_free(SESSION_OF(st, st));
}

static const struct stream_ops session_stream_ops = {
    .room = session_room,
    .on_data = session_on_data,
    .on_handshake = tls_established,
    .output = session_output,
    .on_sent = session_on_sent,
    .on_readable = session_on_readable,
    .on_writable = session_on_writable,
    .on_eof = session_on_eof,
    .on_release = session_on_release,
};

/* Say it and hang up. */
static void
reply_close(struct session *s, const char *text)
{
    reply(s, "%s", text);
    if (s->state != SS_CLOSED)
        session_enter(s, SS_CLOSING);
}

/* ---- message bodies ----
 *
 * A body is held whole in memory from its first octet until the commit
 * that stores it returns (the spool borrows it, no copy). Every worker's
 * sessions draw on one budget, e->body_bytes against [server]
 * body_memory_limit, counted by buffer capacity: what the daemon holds for
 * bodies, not what clients declared; the recipients of a transaction
 * draw on it too (cmd_rcpt, given back by txn_reset). A buffer that
 * cannot grow within it is dropped at once and the rest of the message is
 * read and discarded; the client gets 452 4.3.1 at the end of its data
 * and retries. Buffers from BODY_MMAP up are mappings of their own (grown
 * with mremap, which moves pages instead of copying them), so that a
 * large body's memory goes back to the system when it is released instead
 * of staying in the allocator's arenas.
 */

/* Take delta bytes of the body budget; false when they do not fit. */
static bool
body_budget_take(struct engine *e, uint64_t delta, uint64_t limit)
{
    uint64_t used = atomic_load_explicit(&e->body_bytes, memory_order_relaxed);
    do {
        if (used > limit || delta > limit - used)
            return false;
    } while (!atomic_compare_exchange_weak_explicit(&e->body_bytes, &used, used + delta,
                                                    memory_order_relaxed,
                                                    memory_order_relaxed));
    return true;
}

static void
body_budget_give(struct engine *e, uint64_t delta)
{
    atomic_fetch_sub_explicit(&e->body_bytes, delta, memory_order_relaxed);
}

static void
body_release(struct session *s)
{
    if (s->body != NULL) {
        if (s->body_cap >= BODY_MMAP)
            munmap(s->body, s->body_cap);
        else
            free(s->body);
        body_budget_give(s->sw->e, s->body_cap);
    }
    s->body = NULL;
    s->body_len = s->body_cap = 0;
}

/* Grow the buffer to hold at least want octets. Returns 0, -ENOBUFS when
 * the budget has no room, -ENOMEM. */
static int
body_grow(struct session *s, size_t want)
{
    size_t cap = s->body_cap;
    if (cap == 0) {
        /* The declared size, when there is one, is the first guess (room
         * for the pipelined commands after the data included): an honest
         * client's body takes one allocation. Up to BODY_STEP only: a
         * declaration costs a few octets, and must not let a trickling
         * client hold more of the budget than it sent. */
        uint64_t hint = s->size_hint < BODY_STEP ? s->size_hint : BODY_STEP;
        cap = BODY_START;
        if (hint + IN_CAP > cap)
            cap = (size_t)(hint + IN_CAP + 4095) & ~(size_t)4095;
    }
    while (cap < want) {
        if (cap < BODY_MMAP) {
            cap *= 2;
        } else {
            size_t step = cap / 8 > BODY_STEP ? cap / 8 : BODY_STEP;
            cap = (cap + step + 4095) & ~(size_t)4095;
        }
    }
    size_t delta = cap - s->body_cap;
    if (!body_budget_take(s->sw->e, delta, s->sw->cfg->body_memory_limit))
        return -ENOBUFS;
    char *b;
    if (cap < BODY_MMAP) {
        b = realloc(s->body, cap);
    } else if (s->body_cap >= BODY_MMAP) {
        b = mremap(s->body, s->body_cap, cap, MREMAP_MAYMOVE);
        b = b == MAP_FAILED ? NULL : b;
    } else {
        b = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (b == MAP_FAILED) {
            b = NULL;
        } else {
            if (s->body_len > 0)
                memcpy(b, s->body, s->body_len);
            free(s->body);
        }
    }
    if (b == NULL) {
        body_budget_give(s->sw->e, delta);
        return -ENOMEM;
    }
    s->body = b;
    s->body_cap = cap;
    return 0;
}

/* Make room for n more body octets; false when the message is already
 * known to be too large or its body cannot be held (then the content is
 * read and dropped, and the buffer is given back at once). n may count
 * octets past the end of the data (the next pipelined commands), so the
 * exact size is checked at the end. */
static bool
body_reserve(struct session *s, size_t n)
{
    if (s->too_big || s->no_memory)
        return false;
    if (s->body_seen > s->sw->cfg->max_message_size) {
        s->too_big = true;
        body_release(s);
        return false;
    }
    if (s->body_len + n <= s->body_cap)
        return true;
    int rc = body_grow(s, s->body_len + n);
    if (rc < 0) {
        log_msg(LOG_WARN,
                "session=%016llx event=body_memory_full client=%s size=%llu held=%llu "
                "limit=%llu err=%s",
                (unsigned long long)s->id, s->peer_ip, (unsigned long long)s->body_seen,
                (unsigned long long)atomic_load(&s->sw->e->body_bytes),
                (unsigned long long)s->sw->cfg->body_memory_limit,
                rc == -ENOBUFS ? "body_memory_limit" : "no_memory");
        s->no_memory = true;
        body_release(s);
        return false;
    }
    return true;
}

/* ---- the transaction ---- */

static void
txn_reset(struct session *s)
{
    free(s->sender);
    s->sender = NULL;
    free(s->envid);
    s->envid = NULL;
    for (unsigned i = 0; i < s->nrcpt; i++) {
        free(s->rcpts[i].addr);
        free(s->rcpts[i].orcpt);
    }
    s->nrcpt = 0;
    if (s->rcpt_cap > RCPT_KEEP) {
        /* a long list's array goes too: an idle session keeps little */
        free(s->rcpts);
        s->rcpts = NULL;
        s->rcpt_cap = 0;
    }
    body_budget_give(s->sw->e, s->rcpt_bytes);
    s->rcpt_bytes = 0;
    s->in_txn = false;
    s->ret = SMTP_RET_NONE;
    s->body_type = SMTP_BODY_NONE;
    s->smtputf8 = false;
    body_release(s);
    s->body_seen = 0;
    s->size_hint = 0;
    s->too_big = s->no_memory = false;
    s->bdat_flags = s->bdat_line = 0;
    s->bdat_cr = false;
    s->bdat = s->bdat_discard = s->bdat_last = false;
    s->bdat_left = 0;
    s->msg_id = 0;
    free(s->ev_line);
    s->ev_line = NULL;
    s->ev_len = 0;
    s->hdrs_len = 0;
    s->expire_ms = 0;
    memset(&s->owner, 0, sizeof(s->owner));
    s->ncuts = 0;
    s->sep = false;
    s->sep_at = 0;
    s->dkim_keys = dkim_keyring_unref(s->dkim_keys);
    s->dkim_job = dkim_job_free(s->dkim_job);
    s->dkim_skip = NULL;
}

static char *
span_dup(struct smtp_span sp)
{
    char *p = malloc(sp.len + 1);
    if (p != NULL) {
        memcpy(p, sp.ptr, sp.len);
        p[sp.len] = '\0';
    }
    return p;
}

/* ---- the spool ---- */

static void
session_on_commit(void *cookie, int rc)
{
    struct session *s = cookie;
    s->inflight--;
    if (s->sw->stopping) {
        /* The loop has ended (server_worker_free): the message is in the
         * spool and the next start delivers it. */
        session_maybe_free(s);
        return;
    }
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(s->msg_id, qid);
    /* Closing (a TLS failure while the spool had the message): the last
     * reply is on its way and no 250 can follow it; the session stays
     * closing, as a closed one stays closed. */
    bool gone = s->state == SS_CLOSED || s->state == SS_CLOSING;
    if (rc == 0) {
        /* Stored: it is delivered and logged even when the client left
         * before its 250 (it may send it again: at least once). */
        s->sw->stats.messages++;
        s->sw->stats.recipients += s->nrcpt;
        if (s->owner.tenant != NULL)
            tenant_count(s->sw, s->owner.tenant->name, s->nrcpt);
        if (!s->sw->detached)
            hand_to_delivery(s);
        if (s->ev_line != NULL) /* committed with the message: now the file */
            dlog_line(s->sw->e->dlogw[s->sw->w->id], s->ev_line, s->ev_len);
        else
            log_reception(s, qid);
        log_msg(LOG_INFO,
                "session=%016llx event=queued id=%s from=<%s> nrcpt=%u size=%zu body=%s "
                "user=%s client=%s tenant=%s pool=%s campaign=\"%s\" priority=%u%s",
                (unsigned long long)s->id, qid, s->sender, s->nrcpt, s->body_len + s->hdrs_len,
                s->body_type == SMTP_BODY_8BITMIME ? "8BITMIME" : "7BIT",
                s->user ? s->user->name : "-", s->peer_ip,
                s->owner.tenant ? s->owner.tenant->name : "-",
                s->owner.pool ? s->owner.pool->name : "-", s->owner.campaign, s->owner.priority,
                gone ? " client_gone=1" : "");
        if (!gone)
            reply(s, "250 2.0.0 Ok: queued as %s", qid);
    } else if (gone) {
        log_msg(LOG_NOTICE, "session=%016llx event=commit_failed id=%s err=\"%s\" client_gone=1",
                (unsigned long long)s->id, qid, queue_strerror(rc));
    } else if (queue_error_is_space(rc)) {
        log_msg(LOG_CRIT, "session=%016llx event=spool_full id=%s err=\"%s\"",
                (unsigned long long)s->id, qid, queue_strerror(rc));
        reply(s, "452 4.3.1 Insufficient system storage");
    } else {
        log_msg(LOG_ERR, "session=%016llx event=spool_error id=%s err=\"%s\"",
                (unsigned long long)s->id, qid, queue_strerror(rc));
        reply(s, "451 4.3.0 Local error in processing");
    }
    if (gone) {
        txn_reset(s); /* the body's memory goes back now, not at the close */
        session_maybe_free(s);
        return;
    }
    txn_reset(s);
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
    session_run(s);
}

/* Count a message of tenant name. */
static void
tenant_count(struct server_worker *sw, const char *name, unsigned nrcpt)
{
    struct stats_tenant *t = stats_tenant_get(&sw->tenants, name);
    if (t != NULL) {
        t->received_msgs++;
        t->received_rcpts += nrcpt;
    }
}

unsigned
server_worker_tenants(const struct server_worker *sw, struct stats_tenant *out, unsigned cap)
{
    return stats_tenant_copy(&sw->tenants, out, cap);
}

/* The reception event of the delivery log, with the configured header
 * fields of the message. */
static void
log_reception(struct session *s, const char *qid)
{
    struct engine *e = s->sw->e;
    struct dlog_writer *lw = e->dlogw ? e->dlogw[s->sw->w->id] : NULL;
    if (lw == NULL)
        return;
    const struct log_config *lc = &e->cfg->log;
    char vals[DLOG_HEADERS_MAX][256];
    const char *hv[DLOG_HEADERS_MAX];
    if (lc->nheaders > 0) {
        struct msa_scan scan;
        msa_scan(s->body, s->body_len, &scan);
        for (unsigned i = 0; i < lc->nheaders; i++) {
            size_t off, len, vl;
            const char *v;
            hv[i] = NULL;
            if (msa_find_field(s->body, scan.header_len, lc->headers[i], &off, &len, &v, &vl)) {
                snprintf(vals[i], sizeof(vals[i]), "%.*s", (int)vl, v);
                hv[i] = vals[i];
            }
        }
    }
    struct dlog_event ev = {
        .kind = DLOG_RECEPTION,
        .id = qid,
        .sender = s->sender,
        .tenant = s->owner.tenant ? s->owner.tenant->name : NULL,
        .campaign = s->owner.campaign[0] ? s->owner.campaign : NULL,
        .pool = s->owner.pool ? s->owner.pool->name : NULL,
        .priority = s->owner.priority,
        .size = s->body_len + s->hdrs_len,
        .rcpt_count = s->nrcpt,
        .client = s->peer_ip,
        .auth_user = s->user ? s->user->name : NULL,
        .hdr_names = (const char *const *)lc->headers,
        .hdr_values = hv,
        .nhdr = lc->nheaders,
        .dkim_unsigned = s->dkim_skip,
    };
    struct dlog_dkim sigs[DKIM_MAX_SIGNERS];
    for (unsigned i = 0; s->dkim_job != NULL && i < s->dkim_job->nsigners; i++) {
        const struct dkim_signer *sg = s->dkim_job->signers[i];
        sigs[i] = (struct dlog_dkim){sg->domain, sg->selector, dkim_alg_str(dkim_key_alg(sg->key))};
        ev.dkim = sigs;
        ev.ndkim = i + 1;
    }
    dlog_event(lw, &ev);
}

/* The message is safe in the spool: give its recipients, grouped by
 * domain, to the workers that own those domains. Recipient i of the
 * session is recipient i of the stored message. */
static void
hand_to_delivery(struct session *s)
{
    unsigned idx[256];
    bool *done = calloc(s->nrcpt, sizeof(*done));
    if (done == NULL) {
        /* in the spool: the next start delivers it */
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(s->msg_id, qid);
        log_msg(LOG_ERR, "id=%s event=job_lost_until_restart recipients=%u reason=out_of_memory",
                qid, s->nrcpt);
        return;
    }
    struct job_owner own;
    delivery_owner(s->sw->e, s->owner.tenant ? s->owner.tenant->name : NULL,
                   s->owner.pool ? s->owner.pool->name : NULL, s->owner.campaign,
                   s->owner.priority, &own);
    for (unsigned i = 0; i < s->nrcpt; i++) {
        if (done[i])
            continue;
        const char *dom = strrchr(s->rcpts[i].addr, '@');
        dom = dom ? dom + 1 : "";
        unsigned n = 0;
        for (unsigned k = i; k < s->nrcpt; k++) {
            const char *dk = strrchr(s->rcpts[k].addr, '@');
            dk = dk ? dk + 1 : "";
            if (done[k] || strcasecmp(dk, dom) != 0)
                continue;
            done[k] = true;
            idx[n++] = k;
            if (n == sizeof(idx) / sizeof(idx[0])) {
                delivery_submit(s->sw->e, s->msg_id, dom, idx, n, &own);
                n = 0;
            }
        }
        delivery_submit(s->sw->e, s->msg_id, dom, idx, n, &own);
    }
    free(done);
}

static const char *
protocol_name(const struct session *s)
{
    if (!s->esmtp)
        return "SMTP";
    if (stream_tls_ready(&s->st))
        return s->user ? "ESMTPSA" : "ESMTPS";
    return s->user ? "ESMTPA" : "ESMTP";
}

static void message_commit(struct session *s);
static bool dkim_sign_start(struct session *s, size_t header_len);
static int suppress_after_data(struct session *s, char *text, size_t tlen);

/* The bounce role: the message is whole and clean; parse it and log what
 * it says (oob.h). Nothing is stored: once the events are in the delivery
 * log's buffer the 250 goes out (a crash before the log's next write
 * loses them; the reporting MTA does not send again: at most once, as
 * bounces by mail always were). */
static void
bounce_finish(struct session *s)
{
    struct server_worker *sw = s->sw;
    struct engine *e = sw->e;
    const char *rcpts[64];
    unsigned n = s->nrcpt < 64 ? s->nrcpt : 64;
    for (unsigned i = 0; i < n; i++)
        rcpts[i] = s->rcpts[i].addr;
    struct oob_outcome o;
    struct dlog_writer *lw = e->dlogw ? e->dlogw[sw->w->id] : NULL;
    int rc = oob_message(&e->cfg->bounce, e->cfg->classify, &e->oob, lw, s->id, s->peer_ip,
                         rcpts, n, s->body, s->body_len, &o);
    if (rc < 0) {
        reply(s, "451 4.3.0 Local error in processing");
    } else {
        sw->stats.oob_messages++;
        sw->stats.oob_events += o.events;
        if (o.dropped != NULL)
            sw->stats.oob_dropped++;
        log_msg(LOG_INFO, "session=%016llx event=oob_received client=%s from=<%s> nrcpt=%u "
                "size=%zu kind=%s events=%u suppressed=%u%s%s",
                (unsigned long long)s->id, s->peer_ip, s->sender, s->nrcpt, s->body_len, o.kind,
                o.events, o.suppressed, o.dropped ? " dropped=" : "", o.dropped ? o.dropped : "");
        reply(s, "250 2.0.0 Ok: %s %s", o.kind, o.dropped ? "dropped" : "recorded");
    }
    txn_reset(s);
    session_enter(s, SS_COMMAND);
}

/* Two recipients are one when their addresses are: the local part as it
 * is (only the receiving host may fold it, RFC 5321 2.4), the domain
 * without case. */
static int
rcpt_addr_cmp(const char *a, const char *b)
{
    const char *da = strrchr(a, '@'), *db = strrchr(b, '@');
    size_t la = da ? (size_t)(da - a) : strlen(a), lb = db ? (size_t)(db - b) : strlen(b);
    if (la != lb)
        return la < lb ? -1 : 1;
    int c = memcmp(a, b, la);
    return c != 0 ? c : strcasecmp(da ? da : "", db ? db : "");
}

struct rcpt_ref {
    const char *addr; /* borrowed: s->rcpts[i].addr */
    unsigned i;
};

static int
rcpt_ref_cmp(const void *a, const void *b)
{
    const struct rcpt_ref *x = a, *y = b;
    int c = rcpt_addr_cmp(x->addr, y->addr);
    return c != 0 ? c : x->i < y->i ? -1 : x->i > y->i;
}

/* A recipient given twice in the transaction is kept once, with what its
 * first RCPT said (as Postfix's cleanup drops duplicates): one copy goes
 * out, one outcome is logged. Sorted, not compared pairwise: a message
 * may have max_recipients of them. Without memory they all stay. */
static void
rcpts_dedup(struct session *s)
{
    if (s->nrcpt < 2)
        return;
    struct rcpt_ref *v = malloc(sizeof(*v) * s->nrcpt);
    bool *dup = calloc(s->nrcpt, sizeof(*dup));
    if (v == NULL || dup == NULL) {
        free(v);
        free(dup);
        return;
    }
    for (unsigned i = 0; i < s->nrcpt; i++)
        v[i] = (struct rcpt_ref){s->rcpts[i].addr, i};
    qsort(v, s->nrcpt, sizeof(*v), rcpt_ref_cmp);
    for (unsigned k = 1; k < s->nrcpt; k++)
        if (rcpt_addr_cmp(v[k - 1].addr, v[k].addr) == 0)
            dup[v[k].i] = true;
    unsigned kept = 0;
    for (unsigned i = 0; i < s->nrcpt; i++) {
        if (dup[i]) {
            free(s->rcpts[i].addr);
            free(s->rcpts[i].orcpt);
        } else {
            s->rcpts[kept++] = s->rcpts[i];
        }
    }
    s->nrcpt = kept;
    free(v);
    free(dup);
}

/* The whole message is in s->body: check it, add the MSA's fields and
 * hand it to the spool (after DKIM signing, when it is signed). */
static void
message_finish(struct session *s, uint32_t data_flags)
{
    struct server_worker *sw = s->sw;
    if (s->body_seen > sw->cfg->max_message_size)
        s->too_big = true;
    /* "BDAT 0 LAST" as the only chunk: no octet came, so no buffer was
     * made. The empty message gets one, as after DATA and a lone dot:
     * what follows copies from s->body (the DKIM header copy, the spool's
     * iovecs, the bounce parser), and a copy from NULL is undefined even
     * for 0 octets. Without memory it is refused like any other body. */
    if (s->body == NULL)
        body_reserve(s, 1);
    if (s->too_big || s->no_memory) {
        sw->stats.rejected++;
        log_msg(LOG_NOTICE, "session=%016llx event=message_refused client=%s size=%llu reason=%s",
                (unsigned long long)s->id, s->peer_ip, (unsigned long long)s->body_seen,
                s->too_big ? "max_message_size" : "body_memory");
        reply(s, s->too_big ? "552 5.3.4 Message size exceeds fixed maximum message size"
                            : "452 4.3.1 Insufficient system resources: too many large messages "
                              "in progress, try again later");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    const char *why = NULL;
    if (data_flags & (SMTP_DATA_F_BARE_LF | SMTP_DATA_F_BARE_CR))
        why = "550 5.6.0 Message refused: bare CR or LF in the content (lines must end "
              "with CRLF)";
    else if (data_flags & SMTP_DATA_F_NUL)
        why = "550 5.6.0 Message refused: NUL octet in the content";
    else if (data_flags & SMTP_DATA_F_LONG_LINE)
        why = "550 5.6.0 Message refused: a line is longer than 998 octets (RFC 5322 2.1.1)";
    if (why != NULL) {
        sw->stats.rejected++;
        log_msg(LOG_NOTICE, "session=%016llx event=message_refused client=%s reason=\"%s\"",
                (unsigned long long)s->id, s->peer_ip, why + 10);
        reply(s, "%s", why);
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    /* What it is, whatever was declared: an 8-bit body under BODY=7BIT (or
     * none) is the client's error, and relaying it as 7BIT would hand 8-bit
     * octets to a server that never agreed to take them. As 8BITMIME it
     * goes out with BODY=8BITMIME, or bounces (5.6.3) where the next hop
     * has no 8BITMIME (smtp_client.c). */
    if (data_flags & SMTP_DATA_F_8BIT)
        s->body_type = SMTP_BODY_8BITMIME;
    if (s->bounce) {
        bounce_finish(s);
        return;
    }
    rcpts_dedup(s);

    struct msa_scan scan;
    msa_scan(s->body, s->body_len, &scan);
    /* The control fields (owner.h) and the message's own expiry, fields
     * for us alone: they never leave. */
    struct owner_scan scanned, *sc = &scanned;
    enum owner_field bad;
    int rc = owner_scan(s->body, scan.header_len, sw->cfg->expire_header, sc, &bad);
    uint64_t expire_ms = 0;
    char refusal[300];
    refusal[0] = '\0';
    if (rc < 0 && bad == OWNER_F_EXPIRE)
        rc = -EINVAL;
    else if (rc < 0)
        snprintf(refusal, sizeof(refusal), "550 5.6.0 Message refused: %s %s",
                 owner_field_name(bad, NULL),
                 rc == OWNER_EDUP    ? "must appear once"
                 : rc == OWNER_ELONG ? "is too long (at most 128 characters)"
                 : bad == OWNER_F_PRIORITY ? "must be one digit, 0 to 9"
                 : bad == OWNER_F_CAMPAIGN ? "must be printable ASCII without quotes"
                                           : "must be a name of A-Z a-z 0-9 . _ -");
    if (rc == 0 && sc->present[OWNER_F_EXPIRE] &&
        msa_parse_expiry(sc->value[OWNER_F_EXPIRE], strlen(sc->value[OWNER_F_EXPIRE]),
                         clock_unix_ms(), &expire_ms) < 0)
        rc = -EINVAL;
    if (rc == -EINVAL)
        snprintf(refusal, sizeof(refusal),
                 "550 5.6.0 Message refused: %s must appear once, as a duration (90m, 2h) "
                 "or an RFC 3339 UTC time (2026-11-23T18:00:00Z)",
                 sw->cfg->expire_header);
    struct owner owner;
    if (rc == 0)
        rc = owner_resolve(sw->e->cfg, s->user, s->trusted, sc, &owner, refusal,
                           sizeof(refusal));
    if (rc == 0) {
        memcpy(s->cuts, sc->cuts, sizeof(s->cuts));
        s->ncuts = sc->ncuts;
    }
    if (rc == 0) {
        s->owner = owner;
        rc = suppress_after_data(s, refusal, sizeof(refusal));
    }
    if (rc < 0) {
        sw->stats.rejected++;
        log_msg(LOG_NOTICE, "session=%016llx event=message_refused client=%s user=%s reason=\"%s\"",
                (unsigned long long)s->id, s->peer_ip, s->user ? s->user->name : "-",
                refusal + 4);
        reply(s, "%s", refusal);
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(s->msg_id, qid);
    char tls_desc[96]; /* "TLSv1.3 TLS_AES_256_GCM_SHA384" */
    snprintf(tls_desc, sizeof(tls_desc), "%s %s", s->tls_proto ? s->tls_proto : "",
             s->tls_cipher ? s->tls_cipher : "");
    struct msa_trace t = {
        .hostname = sw->e->cfg->server.hostname,
        .helo = s->helo,
        .client_ip = s->peer_ip,
        .protocol = protocol_name(s),
        .tls = stream_tls_ready(&s->st) ? tls_desc : NULL,
        .queue_id = qid,
        .rcpt = s->nrcpt == 1 ? s->rcpts[0].addr : NULL,
        .now = time(NULL),
        .add_message_id = !scan.has_message_id,
        .add_date = !scan.has_date,
    };
    s->hdrs_len = msa_headers(&t, s->hdrs, sizeof(s->hdrs));
    s->sep = scan.no_separator;
    s->sep_at = scan.header_len;
    s->expire_ms = expire_ms;
    if (dkim_sign_start(s, scan.header_len))
        return; /* signing (SS_SIGN), or refused */
    message_commit(s);
}

/* Hand the message to the spool: the DKIM-Signature fields (if signed),
 * the MSA's fields, the message without its expiry field. */
static void
message_commit(struct session *s)
{
    struct server_worker *sw = s->sw;
    struct queue_rcpt *qr = calloc(s->nrcpt, sizeof(*qr));
    if (qr == NULL) {
        reply(s, "451 4.3.0 Local error in processing");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    for (unsigned i = 0; i < s->nrcpt; i++) {
        qr[i].addr = s->rcpts[i].addr;
        qr[i].orcpt = s->rcpts[i].orcpt;
        qr[i].notify = s->rcpts[i].notify; /* same bits as enum queue_notify */
    }
    struct queue_envelope env = {
        .id = s->msg_id,
        .sender = s->sender,
        .envid = s->envid,
        .ret = s->ret == SMTP_RET_FULL   ? QUEUE_RET_FULL
               : s->ret == SMTP_RET_HDRS ? QUEUE_RET_HDRS
                                         : QUEUE_RET_NONE,
        .body_type = s->body_type == SMTP_BODY_8BITMIME ? QUEUE_BODY_8BITMIME : QUEUE_BODY_7BIT,
        .smtputf8 = s->smtputf8,
        .auth_user = s->user ? s->user->name : NULL,
        .client_addr = s->peer_ip,
        .expire_ms = s->expire_ms,
        .tenant = s->owner.tenant ? s->owner.tenant->name : NULL,
        .campaign = s->owner.campaign,
        .pool = s->owner.pool ? s->owner.pool->name : NULL,
        .priority = s->owner.priority,
        .nrcpt = s->nrcpt,
        .rcpt = qr,
    };
    struct iovec iov[4 + OWNER_F_COUNT] = {
        {s->dkim_job ? s->dkim_job->sig : NULL, s->dkim_job ? s->dkim_job->sig_len : 0},
        {s->hdrs, s->hdrs_len},
    };
    unsigned niov = 2;
    size_t at = 0;
    for (unsigned i = 0; i < s->ncuts; i++) {
        iov[niov++] = (struct iovec){s->body + at, s->cuts[i].off - at};
        at = s->cuts[i].off + s->cuts[i].len;
    }
    /* The cuts are all in the header section, before sep_at. */
    if (s->sep) {
        iov[niov++] = (struct iovec){s->body + at, s->sep_at - at};
        iov[niov++] = (struct iovec){(char *)"\r\n", 2};
        at = s->sep_at;
    }
    iov[niov++] = (struct iovec){s->body + at, s->body_len - at};
    /* With event sinks, the reception event is committed with the
     * message (queue.h, "events"); the file gets it once that is done. */
    struct dlog_writer *lw = sw->e->dlogw ? sw->e->dlogw[sw->w->id] : NULL;
    if (sw->e->events != NULL && lw != NULL && !sw->detached) {
        char qid[QUEUE_ID_STRLEN + 1];
        struct json line;
        json_init(&line);
        queue_id_str(s->msg_id, qid);
        dlog_capture(lw, &line, false);
        log_reception(s, qid);
        dlog_capture(lw, NULL, false);
        if (!json_failed(&line) && line.len > 0 && (s->ev_line = malloc(line.len)) != NULL) {
            memcpy(s->ev_line, line.buf, line.len);
            s->ev_len = line.len;
        }
        json_fini(&line);
    }
    /* Detached, the commit is the harness's: server_session_feed(). */
    int rc = sw->detached ? 0
                          : queue_enqueue_events(sw->e->queue, sw->port, &env, iov, niov,
                                                 s->ev_line, s->ev_len, session_on_commit, s);
    free(qr);
    if (rc < 0) {
        log_msg(LOG_ERR, "session=%016llx event=enqueue_failed err=\"%s\"",
                (unsigned long long)s->id, queue_strerror(rc));
        reply(s, queue_error_is_space(rc) ? "452 4.3.1 Insufficient system storage"
                                          : "451 4.3.0 Local error in processing");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return;
    }
    s->inflight++;
    worker_timer_cancel(sw->w, &s->timer); /* the spool's time is not the client's */
    session_enter(s, SS_COMMIT);
}

/* ---- DKIM (dkim/dkim.h, engine/dkim_pool.h) ---- */

/* DATA or BDAT begins: with keys configured, the body is hashed as it
 * arrives (the keyring is held to the end, so a reload meanwhile cannot
 * change which hashes the signers need). */
static void
dkim_body_start(struct session *s)
{
    s->dkim_keys = dkim_keyring_unref(s->dkim_keys);
    s->dkim_skip = NULL;
    struct dkim_keyring *kr =
        s->sw->detached || s->bounce ? NULL : engine_dkim_keys(s->sw->e);
    if (kr == NULL)
        return;
    unsigned canons = dkim_keyring_body_canons(kr);
    if (s->dkim_body != NULL && s->dkim_canons == canons) {
        dkim_body_reset(s->dkim_body);
    } else {
        dkim_body_free(s->dkim_body);
        s->dkim_canons = canons;
        if ((s->dkim_body = dkim_body_new(canons)) == NULL) {
            s->no_memory = true; /* refused at the end: never sent unsigned */
            dkim_keyring_unref(kr);
            return;
        }
    }
    s->dkim_keys = kr;
}

static void session_on_signed(struct dkim_job *j);

/* The message is whole: when its signing domain has keys, hand its header
 * section and body hashes to the signing pool and wait (SS_SIGN). Returns
 * false when the message goes on unsigned (logged, and said in the
 * delivery log), true when signing or refused. */
static bool
dkim_sign_start(struct session *s, size_t header_len)
{
    struct dkim_keyring *kr = s->dkim_keys;
    if (kr == NULL)
        return false;
    struct server_worker *sw = s->sw;
    const char *b = s->body;
    char dom[256] = "";
    int rc = 0;
    struct dkim_job *j = NULL;
    if (s->sep) {
        /* The body began without an empty line: one is stored at sep_at
         * (message_commit). The streamed hash looked for an empty line
         * that is not there (or took a later one): hash the body again as
         * it will be stored, after the inserted one. */
        dkim_body_reset(s->dkim_body);
        dkim_body_feed(s->dkim_body, "\r\n", 2);
        dkim_body_feed(s->dkim_body, b + header_len, s->body_len - header_len);
    }
    if (dkim_keyring_signing_domain(kr) == DKIM_FROM_ENVELOPE) {
        rc = dkim_addr_domain(s->sender, dom, sizeof(dom));
        if (rc < 0)
            dom[0] = '\0';
    } else {
        rc = dkim_from_domain(b, header_len, dom, sizeof(dom));
    }
    if (rc == 0 && (j = dkim_job_new()) == NULL)
        rc = -ENOMEM;
    if (rc == 0 && (j->nsigners = dkim_keyring_lookup(kr, dom, j->signers, DKIM_MAX_SIGNERS)) == 0)
        rc = DKIM_ENOKEY;
    /* What will be stored in front of the body: our fields, then the
     * message's header section without the control fields. */
    size_t cut = 0;
    for (unsigned i = 0; i < s->ncuts; i++)
        cut += s->cuts[i].len;
    if (rc == 0 && (j->hdr = malloc(s->hdrs_len + header_len - cut + 1)) == NULL)
        rc = -ENOMEM;
    if (rc < 0) {
        dkim_job_free(j);
        if (rc == -ENOMEM) {
            sw->stats.rejected++;
            reply(s, "452 4.3.1 Insufficient system resources");
            txn_reset(s);
            session_enter(s, SS_COMMAND);
            return true;
        }
        s->dkim_skip = dkim_error_token(rc);
        sw->stats.dkim_unsigned++;
        log_msg(LOG_INFO, "session=%016llx event=dkim_unsigned reason=%s domain=%s error=\"%s\"",
                (unsigned long long)s->id, s->dkim_skip, dom[0] ? dom : "-", dkim_strerror(rc));
        return false;
    }
    memcpy(j->hdr, s->hdrs, s->hdrs_len);
    size_t hl = s->hdrs_len, at = 0;
    for (unsigned i = 0; i < s->ncuts; i++) {
        memcpy(j->hdr + hl, b + at, s->cuts[i].off - at);
        hl += s->cuts[i].off - at;
        at = s->cuts[i].off + s->cuts[i].len;
    }
    memcpy(j->hdr + hl, b + at, header_len - at);
    j->hdr_len = hl + header_len - at;
    for (int c = 0; c < 2; c++)
        if (s->dkim_canons & (1u << c))
            dkim_body_final(s->dkim_body, (enum dkim_canon)c, j->bh[c]);
    j->timestamp = (uint64_t)time(NULL);
    j->w = sw->w;
    j->done = session_on_signed;
    j->cookie = s;
    j->keys = dkim_keyring_ref(kr);
    rc = dkim_pool_submit(sw->e->dkim_pool, j);
    if (rc < 0) {
        dkim_job_free(j);
        sw->stats.rejected++;
        sw->stats.dkim_failed++;
        log_msg(LOG_WARN, "session=%016llx event=dkim_busy reason=%s",
                (unsigned long long)s->id, rc == -EAGAIN ? "queue_full" : "stopping");
        reply(s, "451 4.3.0 DKIM signing is busy: try again later");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
        return true;
    }
    s->inflight++;
    worker_timer_cancel(sw->w, &s->timer); /* the pool's time is not the client's */
    session_enter(s, SS_SIGN);
    return true;
}

/* Back from the signing pool, on the worker: commit, signature in front. */
static void
session_on_signed(struct dkim_job *j)
{
    struct session *s = j->cookie;
    s->inflight--;
    s->dkim_job = j;
    if (s->sw->stopping) {
        session_maybe_free(s);
        return;
    }
    if (s->state == SS_CLOSED || s->state == SS_CLOSING) {
        /* The client is gone, or going (a TLS failure meanwhile): nothing
         * is committed that no 250 could answer; closing stays closing. */
        txn_reset(s);
        session_maybe_free(s);
        return;
    }
    if (j->rc < 0) {
        /* Never sent unsigned when a key exists: the client retries. */
        s->sw->stats.rejected++;
        s->sw->stats.dkim_failed++;
        log_msg(LOG_ERR, "session=%016llx event=dkim_failed domain=%s selector=%s err=\"%s\"",
                (unsigned long long)s->id, j->failed ? j->failed->domain : "-",
                j->failed ? j->failed->selector : "-", dkim_strerror(j->rc));
        reply(s, "451 4.3.0 Local error in processing (DKIM signing)");
        txn_reset(s);
        session_enter(s, SS_COMMAND);
    } else {
        s->sw->stats.dkim_signed++;
        message_commit(s);
    }
    if (s->state == SS_COMMAND)
        session_deadline(s, s->sw->cfg->timeout_command);
    session_run(s);
}

/* ---- commands ---- */

static bool
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

static void
cmd_ehlo(struct session *s, const struct smtp_cmd *c, bool ehlo)
{
    size_t n = c->arg.len < sizeof(s->helo) ? c->arg.len : sizeof(s->helo) - 1;
    memcpy(s->helo, c->arg.ptr, n);
    s->helo[n] = '\0';
    s->greeted = true;
    s->esmtp = ehlo;
    txn_reset(s);
    const char *host = s->sw->e->cfg->server.hostname;
    if (!ehlo) {
        reply(s, "250 %s", host);
        return;
    }
    reply(s, "250-%s", host);
    reply(s, "250-PIPELINING");
    if (s->sw->tls != NULL && !stream_tls(&s->st))
        reply(s, "250-STARTTLS");
    reply(s, "250-SIZE %llu", (unsigned long long)s->sw->cfg->max_message_size);
    if (s->users != NULL && auth_allowed_here(s))
        reply(s, "250-AUTH PLAIN LOGIN");
    reply(s, "250-ENHANCEDSTATUSCODES");
    reply(s, "250-8BITMIME");
    reply(s, "250-SMTPUTF8");
    reply(s, "250-DSN");
    reply(s, "250 CHUNKING");
}

static void
cmd_mail(struct session *s, const struct smtp_cmd *c)
{
    const struct server_config *cfg = s->sw->cfg;
    if (!s->greeted) {
        reply(s, "503 5.5.1 Send HELO or EHLO first");
        return;
    }
    if (s->in_txn) {
        reply(s, "503 5.5.1 Nested MAIL command");
        return;
    }
    if (s->user == NULL && !s->trusted && !s->bounce) {
        reply(s, "530 5.7.0 Authentication required");
        return;
    }
    const struct smtp_params *p = &c->params;
    if ((p->seen & SMTP_PARAM_SIZE) && p->size > cfg->max_message_size) {
        reply(s, "552 5.3.4 Message size exceeds fixed maximum message size");
        return;
    }
    /* Known now, said now: a declared size the body memory cannot hold at
     * the moment. Nothing is set aside for it (a client may declare more
     * than it sends); the data is held to the same budget as it comes. */
    uint64_t held = atomic_load_explicit(&s->sw->e->body_bytes, memory_order_relaxed);
    if ((p->seen & SMTP_PARAM_SIZE) &&
        (held > cfg->body_memory_limit || p->size > cfg->body_memory_limit - held)) {
        log_msg(LOG_NOTICE,
                "session=%016llx event=body_memory_full client=%s size=%llu held=%llu "
                "limit=%llu at=mail",
                (unsigned long long)s->id, s->peer_ip, (unsigned long long)p->size,
                (unsigned long long)held, (unsigned long long)cfg->body_memory_limit);
        reply(s, "452 4.3.1 Insufficient system resources for a message of this size now: "
                 "try again later");
        return;
    }
    if ((p->seen & SMTP_PARAM_BODY) && p->body == SMTP_BODY_BINARYMIME) {
        reply(s, "555 5.5.4 BODY=BINARYMIME is not offered here");
        return;
    }
    if (s->user != NULL && !(c->path.flags & SMTP_PATH_NULL) &&
        !auth_user_may_send_as(s->user, c->path.domain.ptr, c->path.domain.len)) {
        reply(s, "553 5.7.1 Sender address not owned by user %s", s->user->name);
        return;
    }
    if (s->user != NULL && (c->path.flags & SMTP_PATH_NULL) && !s->user->null_sender) {
        /* A bounce from a user tied to sender domains would carry no
         * domain of theirs: only where the users file says "<>". */
        reply(s, "553 5.7.1 Null sender not allowed for user %s", s->user->name);
        return;
    }
    s->sender = span_dup(c->path.mailbox);
    if ((p->seen & SMTP_PARAM_ENVID) && (s->envid = span_dup(p->envid)) == NULL)
        s->sender = (free(s->sender), NULL);
    if (s->sender == NULL) {
        reply(s, "451 4.3.0 Local error in processing");
        return;
    }
    s->size_hint = (p->seen & SMTP_PARAM_SIZE) ? p->size : 0;
    s->ret = p->ret;
    s->body_type = p->body;
    s->smtputf8 = (p->seen & SMTP_PARAM_SMTPUTF8) != 0;
    s->in_txn = true;
    reply(s, "250 2.1.0 Ok");
}

/* The bounce role's RCPT rule (oob.h); false when refused (said). */
static bool
bounce_rcpt_ok(struct session *s, const struct smtp_cmd *c)
{
    char addr[SMTP_CMD_LINE_MAX];
    size_t n = c->path.mailbox.len < sizeof(addr) - 1 ? c->path.mailbox.len : sizeof(addr) - 1;
    memcpy(addr, c->path.mailbox.ptr, n);
    addr[n] = '\0';
    struct verp_ref ref;
    enum oob_rcpt r = oob_rcpt_check(&s->sw->e->cfg->bounce, addr, &ref);
    if (r == OOB_RCPT_VERP || r == OOB_RCPT_LOCAL)
        return true;
    s->sw->stats.oob_refused++;
    log_msg(LOG_NOTICE, "session=%016llx event=oob_rcpt_refused client=%s rcpt=<%.*s> reason=%s",
            (unsigned long long)s->id, s->peer_ip, (int)(n < 200 ? n : 200), addr,
            r == OOB_RCPT_FORGED ? "forged_token" : "not_a_bounce_address");
    if (r == OOB_RCPT_FORGED)
        reply(s, "550 5.7.1 <%.*s>: bounce address not recognised", (int)(n < 200 ? n : 200),
              addr);
    else
        reply(s, "550 5.7.1 <%.*s>: relay access denied", (int)(n < 200 ? n : 200), addr);
    return false;
}

/* Check addr against the suppression list: the global list, then
 * tenant's own (NULL: none). Returns 1 when it is suppressed (the
 * event logged and counted, the reply to give in text), 0 when not, or a
 * negative errno when the list cannot be read (logged). */
static int
suppress_one(struct session *s, const char *addr, const char *tenant, char *text, size_t tlen)
{
    struct suppress_entry ent;
    int rc = suppress_check(s->sw->e->suppress, tenant, addr, &ent);
    if (rc == 0)
        return 0;
    if (rc < 0) {
        log_msg(LOG_ERR, "session=%016llx event=suppress_check_failed rcpt=<%s> err=\"%s\"",
                (unsigned long long)s->id, addr, strerror(-rc));
        return rc;
    }
    suppress_reply(s->sw->e->suppress, addr, &ent, text, tlen);
    s->sw->stats.rcpt_suppressed++;
    log_msg(LOG_INFO,
            "session=%016llx event=suppressed rcpt=<%s> from=<%s> reason=%s scope=%s entry=%s "
            "user=%s client=%s",
            (unsigned long long)s->id, addr, s->sender, suppress_reason_str(ent.reason), ent.scope,
            ent.addr, s->user ? s->user->name : "-", s->peer_ip);
    struct engine *e = s->sw->e;
    struct dlog_writer *lw = e->dlogw ? e->dlogw[s->sw->w->id] : NULL;
    struct dlog_event ev = {
        .kind = DLOG_SUPPRESSED,
        .rcpt = addr,
        .sender = s->sender,
        .domain = strrchr(addr, '@') != NULL ? strrchr(addr, '@') + 1 : NULL,
        .code = (unsigned)atoi(text),
        .reply = text,
        .reason = suppress_reason_str(ent.reason),
        .scope = ent.scope,
        .client = s->peer_ip,
        .auth_user = s->user ? s->user->name : NULL,
        .tenant = tenant,
    };
    dlog_event(lw, &ev);
    return 1;
}

/* The tenant whose list RCPT checks: the AUTH user's tenant= under the
 * config's name for it, the one the message, its VERP token and so its
 * complaints carry (names compare without case, list scopes with it: the
 * users file's "ACME" is [tenant acme], whose list is scope "acme"). A
 * tenant the config does not name is checked as written (the message is
 * refused after DATA anyway). A tenant named by control header fields is
 * known only after DATA (suppress_after_data). */
static const char *
rcpt_tenant(const struct session *s)
{
    if (s->user == NULL || s->user->tenant == NULL)
        return NULL;
    const struct tenant_config *t =
        config_tenant(s->sw->e->cfg, s->user->tenant, strlen(s->user->tenant));
    return t != NULL ? t->name : s->user->tenant;
}

/* The suppression list at RCPT: one read transaction. True when the
 * recipient was refused (the reply is said, the event logged). A list
 * that cannot be read defers the recipient: better late than to a
 * complainer. */
static bool
rcpt_suppressed(struct session *s, const struct smtp_cmd *c)
{
    char addr[1024];
    if (c->path.mailbox.len >= sizeof(addr))
        return false; /* the parser keeps paths far shorter */
    memcpy(addr, c->path.mailbox.ptr, c->path.mailbox.len);
    addr[c->path.mailbox.len] = '\0';
    char text[512];
    int rc = suppress_one(s, addr, rcpt_tenant(s), text, sizeof(text));
    if (rc == 0)
        return false;
    if (rc < 0)
        reply(s, "451 4.3.0 Local error in processing");
    else
        reply(s, "%s", text);
    return true;
}

/* After DATA, once the message's tenant is known: when it is not the one
 * RCPT checked (a tenant named by X-Sluice-Tenant from a trusted client),
 * each recipient is checked against that tenant's list too, and the ones
 * on it are dropped from the transaction (each with its suppressed event,
 * as at RCPT). Returns 0 with at least one recipient left, or a negative
 * value with the reply for the whole message in text: every recipient
 * suppressed (550) or the list unreadable (451). */
static int
suppress_after_data(struct session *s, char *text, size_t tlen)
{
    const char *tenant = s->owner.tenant != NULL ? s->owner.tenant->name : NULL;
    const char *checked = rcpt_tenant(s);
    if (s->sw->e->suppress == NULL || tenant == NULL ||
        (checked != NULL && strcasecmp(checked, tenant) == 0))
        return 0;
    unsigned kept = 0;
    char one[512];
    for (unsigned i = 0; i < s->nrcpt; i++) {
        int rc = suppress_one(s, s->rcpts[i].addr, tenant, one, sizeof(one));
        if (rc < 0) {
            snprintf(text, tlen, "451 4.3.0 Local error in processing");
            /* What was dropped so far stays dropped: the message is refused. */
            for (unsigned k = i; k < s->nrcpt; k++)
                s->rcpts[kept++] = s->rcpts[k];
            s->nrcpt = kept;
            return rc;
        }
        if (rc == 1) {
            free(s->rcpts[i].addr);
            free(s->rcpts[i].orcpt);
            continue;
        }
        s->rcpts[kept++] = s->rcpts[i];
    }
    s->nrcpt = kept;
    if (kept == 0) {
        snprintf(text, tlen, "550 5.7.1 Every recipient is suppressed for tenant %s", tenant);
        return -EPERM;
    }
    return 0;
}

static void
cmd_rcpt(struct session *s, const struct smtp_cmd *c)
{
    if (!s->in_txn) {
        reply(s, "503 5.5.1 Need MAIL command");
        return;
    }
    if ((c->path.flags & SMTP_PATH_POSTMASTER) && !s->bounce) {
        reply(s, "550 5.1.1 No local mailboxes here: give Postmaster a domain");
        return;
    }
    if (s->bounce && !(c->path.flags & SMTP_PATH_POSTMASTER) && !bounce_rcpt_ok(s, c))
        return;
    if (c->path.flags & SMTP_PATH_LIT_OTHER) {
        /* [tag:content]: no address sluice could connect to */
        reply(s, "553 5.1.3 Address literals other than IPv4 and IPv6 cannot be delivered");
        return;
    }
    if (s->nrcpt >= s->sw->cfg->max_recipients) {
        reply(s, "452 4.5.3 Too many recipients");
        return;
    }
    if (!s->bounce && s->sw->e->suppress != NULL && rcpt_suppressed(s, c))
        return;
    /* A recipient's memory comes from the body budget until the
     * transaction ends: max_recipients of the longest addresses with an
     * ORCPT are about 0.8 MB a session, which max_clients sessions
     * would hold outside body_memory_limit. */
    uint64_t cost = sizeof(struct rcpt) + RCPT_ALLOC_OVERHEAD + c->path.mailbox.len + 1;
    if (c->params.seen & SMTP_PARAM_ORCPT)
        cost += RCPT_ALLOC_OVERHEAD + c->params.orcpt_type.len + c->params.orcpt_addr.len + 2;
    if (!body_budget_take(s->sw->e, cost, s->sw->cfg->body_memory_limit)) {
        log_msg(LOG_WARN,
                "session=%016llx event=body_memory_full client=%s nrcpt=%u held=%llu limit=%llu "
                "err=body_memory_limit",
                (unsigned long long)s->id, s->peer_ip, s->nrcpt,
                (unsigned long long)atomic_load(&s->sw->e->body_bytes),
                (unsigned long long)s->sw->cfg->body_memory_limit);
        reply(s, "452 4.3.1 Insufficient system resources");
        return;
    }
    s->rcpt_bytes += cost;
    if (s->nrcpt == s->rcpt_cap) {
        unsigned cap = s->rcpt_cap ? s->rcpt_cap * 2 : 8;
        struct rcpt *v = realloc(s->rcpts, sizeof(*v) * cap);
        if (v == NULL) {
            body_budget_give(s->sw->e, cost);
            s->rcpt_bytes -= cost;
            reply(s, "452 4.3.1 Insufficient system resources");
            return;
        }
        s->rcpts = v;
        s->rcpt_cap = cap;
    }
    struct rcpt *r = &s->rcpts[s->nrcpt];
    memset(r, 0, sizeof(*r));
    r->addr = span_dup(c->path.mailbox);
    r->notify = c->params.notify;
    if (c->params.seen & SMTP_PARAM_ORCPT) {
        size_t tl = c->params.orcpt_type.len, al = c->params.orcpt_addr.len;
        r->orcpt = malloc(tl + al + 2);
        if (r->orcpt != NULL) {
            memcpy(r->orcpt, c->params.orcpt_type.ptr, tl);
            r->orcpt[tl] = ';';
            memcpy(r->orcpt + tl + 1, c->params.orcpt_addr.ptr, al);
            r->orcpt[tl + al + 1] = '\0';
        }
    }
    if (r->addr == NULL || ((c->params.seen & SMTP_PARAM_ORCPT) && r->orcpt == NULL)) {
        free(r->addr);
        free(r->orcpt);
        body_budget_give(s->sw->e, cost);
        s->rcpt_bytes -= cost;
        reply(s, "452 4.3.1 Insufficient system resources");
        return;
    }
    s->nrcpt++;
    reply(s, "250 2.1.5 Ok");
}

static void dkim_body_start(struct session *s);

static void
data_start(struct session *s)
{
    s->msg_id = s->sw->detached ? s->sw->seq++ : queue_id_next(s->sw->e->queue);
    smtp_unstuff_init(&s->unstuff);
    s->body_len = 0;
    s->body_seen = 0;
    s->too_big = false;
    dkim_body_start(s);
}

static void
cmd_data(struct session *s, size_t rest)
{
    if (rest != 0) {
        /* RFC 2920 3.1: DATA ends a pipelined group; the client must wait
         * for its reply. Bytes already here were sent before it: treating
         * them as content or as commands would both be guesses, and when
         * the DATA is refused (no valid recipient, no MAIL) they are most
         * likely the content, whose lines must never run as commands. */
        log_msg(LOG_NOTICE, "session=%016llx event=early_data client=%s octets=%zu",
                (unsigned long long)s->id, s->peer_ip, rest);
        reply_close(s, "554 5.5.0 Message content sent before the 354 reply: closing");
        return;
    }
    if (!s->in_txn) {
        reply(s, "503 5.5.1 Need MAIL command");
        return;
    }
    if (s->nrcpt == 0) {
        reply(s, "554 5.5.1 No valid recipients");
        return;
    }
    if (s->bdat) {
        reply(s, "503 5.5.1 DATA after BDAT in one transaction");
        return;
    }
    data_start(s);
    reply(s, "354 End data with <CR><LF>.<CR><LF>");
    session_enter(s, SS_DATA);
    session_deadline(s, s->sw->cfg->timeout_data);
}

static void
cmd_bdat(struct session *s, const struct smtp_cmd *c)
{
    s->bdat_left = c->bdat_size;
    s->bdat_last = c->bdat_last;
    s->bdat_discard = false;
    const char *refuse = NULL;
    if (!s->in_txn)
        refuse = "503 5.5.1 Need MAIL command";
    else if (s->nrcpt == 0)
        refuse = "554 5.5.1 No valid recipients";
    if (refuse != NULL) {
        /* The chunk follows the command whatever we say: read it, drop it. */
        s->bdat_discard = true;
        reply(s, "%s", refuse);
    } else if (!s->bdat) {
        s->bdat = true;
        data_start(s);
    }
    session_enter(s, SS_BDAT);
    session_deadline(s, s->sw->cfg->timeout_data);
}

/* A BDAT body has no terminator to protect, but it is stored and relayed
 * like any other: refuse what DATA would refuse. The octets of each chunk
 * are looked at as they are stored (while they are in cache), the state
 * carried across chunks. */
static void
bdat_scan(struct session *s, const char *b, size_t len)
{
    uint32_t flags = s->bdat_flags, line = s->bdat_line;
    bool cr = s->bdat_cr;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)b[i];
        if (cr && c != '\n')
            flags |= SMTP_DATA_F_BARE_CR;
        cr = c == '\r';
        if (c == '\n') {
            if (i == 0 ? !s->bdat_cr : b[i - 1] != '\r')
                flags |= SMTP_DATA_F_BARE_LF;
            line = 0;
            continue;
        }
        if (c == '\0')
            flags |= SMTP_DATA_F_NUL;
        else if (c >= 0x80)
            flags |= SMTP_DATA_F_8BIT;
        if (c != '\r' && ++line > SMTP_DATA_LINE_MAX)
            flags |= SMTP_DATA_F_LONG_LINE;
    }
    s->bdat_flags = flags;
    s->bdat_line = line > SMTP_DATA_LINE_MAX ? SMTP_DATA_LINE_MAX + 1 : line;
    s->bdat_cr = cr;
}

/* The answer to a failed AUTH, once its delay has passed. */
static void
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
static void
hash_unlink(struct session *s)
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
static void
session_on_hash(struct worker *w, struct worker_msg *m)
{
    struct session *s = SESSION_OF(m, hash_job.m);
    s->inflight--;
    const struct auth_user *u = auth_attempt_finish(&s->sw->auth, &s->hash_job.a);
    auth_limits_end(s, u == NULL);
    struct session *f = s->hash_followers;
    s->hash_followers = NULL;
    hash_unlink(s);
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
static void
auth_response(struct session *s, const char *line, size_t len)
{
    if (len == 1 && line[0] == '*') {
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

static void
cmd_auth(struct session *s, const struct smtp_cmd *c)
{
    if (s->users == NULL) {
        reply(s, "503 5.5.1 AUTH is not offered here");
        return;
    }
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

static void handle_verb(struct session *s, struct smtp_cmd *cp, size_t rest);

/* A BDAT command whose size could not be read: its chunk follows, and
 * where it ends is unknown. Reading on would take the client's octets
 * for commands (an RCPT or a MAIL hidden in a chunk would be acted on);
 * RFC 3030 leaves no other safe answer than to refuse and hang up. */
static void
bdat_unframed(struct session *s, const char *why)
{
    log_msg(LOG_NOTICE, "session=%016llx event=bdat_unframed client=%s reason=%s",
            (unsigned long long)s->id, s->peer_ip, why);
    reply_close(s, "501 5.5.4 Syntax error in BDAT size; closing");
}

/* A line too long for the line finder that is a BDAT: "BDAT" and a space
 * at the start of buf. */
static bool
is_bdat_line(const char *buf, size_t len)
{
    return len >= 5 && strncasecmp(buf, "bdat ", 5) == 0;
}

/* Handle one command line (without CRLF). rest: octets after it. */
static void
handle_line(struct session *s, const char *line, size_t len, size_t rest)
{
    if (s->state == SS_AUTH) {
        auth_response(s, line, len);
        return;
    }
    struct smtp_cmd c;
    int rc = smtp_cmd_parse(line, len, s->smtputf8 ? SMTP_CMD_F_UTF8 : 0, &c);
    unsigned v = (unsigned)c.verb <= SMTP_VERB_AUTH ? (unsigned)c.verb : SMTP_VERB_NONE;
    size_t at = s->out_len; /* where this command's reply starts */
    s->cmds[v]++;
    if (rc < 0) {
        s->errors++;
        s->cmds_refused[v]++;
        if (c.verb == SMTP_VERB_BDAT) {
            bdat_unframed(s, rc == SMTP_CMD_E_LINE_TOO_LONG ? "line_too_long" : "bad_size");
            return;
        }
        reply(s, "%s", smtp_cmd_err_reply(rc, c.verb));
        return;
    }
    handle_verb(s, &c, rest);
    if (s->out_len > at && (s->out[at] == '4' || s->out[at] == '5'))
        s->cmds_refused[v]++;
}

static void
handle_verb(struct session *s, struct smtp_cmd *cp, size_t rest)
{
    struct smtp_cmd c = *cp;
    switch (c.verb) {
    case SMTP_VERB_EHLO:
        cmd_ehlo(s, &c, true);
        break;
    case SMTP_VERB_HELO:
        cmd_ehlo(s, &c, false);
        break;
    case SMTP_VERB_MAIL:
        cmd_mail(s, &c);
        break;
    case SMTP_VERB_RCPT:
        cmd_rcpt(s, &c);
        break;
    case SMTP_VERB_DATA:
        cmd_data(s, rest);
        break;
    case SMTP_VERB_BDAT:
        cmd_bdat(s, &c);
        break;
    case SMTP_VERB_RSET:
        txn_reset(s);
        reply(s, "250 2.0.0 Ok");
        break;
    case SMTP_VERB_NOOP:
        reply(s, "250 2.0.0 Ok");
        break;
    case SMTP_VERB_QUIT:
        reply_close(s, "221 2.0.0 Bye");
        break;
    case SMTP_VERB_VRFY:
        reply(s, "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery");
        break;
    case SMTP_VERB_EXPN:
        reply(s, "502 5.5.1 EXPN is not offered here");
        break;
    case SMTP_VERB_HELP:
        reply(s, "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY "
                 "HELP AUTH; see RFC 5321");
        break;
    case SMTP_VERB_STARTTLS:
        if (s->sw->tls == NULL) {
            reply(s, "502 5.5.1 STARTTLS is not offered here");
        } else if (stream_tls(&s->st)) {
            reply(s, "503 5.5.1 TLS is already active");
        } else if (s->in_txn) {
            reply(s, "503 5.5.1 STARTTLS not allowed during a mail transaction");
        } else {
            reply(s, "220 2.0.0 Ready to start TLS");
            session_enter(s, SS_TLS_START);
        }
        break;
    case SMTP_VERB_AUTH:
        cmd_auth(s, &c);
        break;
    case SMTP_VERB_NONE:
    default:
        s->errors++;
        reply(s, "500 5.5.2 Command unrecognized");
        break;
    }
}

/* ---- input ---- */

static void
in_consume(struct session *s, size_t n)
{
    memmove(s->in, s->in + n, s->in_len - n);
    s->in_len -= n;
}

/* Commands: handle every complete line there is room to answer. Returns
 * false when nothing more can be done until more input arrives. */
static bool
run_commands(struct session *s)
{
    if (s->skip_line) {
        char *lf = memchr(s->in, '\n', s->in_len);
        if (lf == NULL) {
            s->in_len = 0; /* keep memory bounded: drop what we have */
            return false;
        }
        in_consume(s, (size_t)(lf - s->in) + 1);
        s->skip_line = false;
    }
    /* A TLS handshake record (type 22, version 3.x) where a command
     * should start: a client set to implicit TLS on a plaintext port. No
     * command starts with a control octet; answered at once, not after a
     * line end that its ClientHello may never hold. */
    if (s->in_len >= 2 && s->in[0] == 0x16 && s->in[1] == 0x03) {
        log_msg(LOG_NOTICE,
                "session=%016llx event=tls_on_plaintext_port client=%s "
                "hint=\"the client starts with TLS: here it must say STARTTLS; implicit TLS is "
                "[server] listen_tls\"",
                (unsigned long long)s->id, s->peer_ip);
        reply_close(s, "500 5.5.2 TLS handshake on a plaintext port: use STARTTLS");
        return true;
    }
    size_t off;
    long n = smtp_cmd_line_find(s->in, s->in_len, SMTP_CMD_LINE_MAX_AUTH, &off);
    if (n == 0)
        return false;
    if (n == SMTP_CMD_E_LINE_TOO_LONG) {
        if (is_bdat_line(s->in, s->in_len)) {
            s->errors++;
            s->cmds[SMTP_VERB_BDAT]++;
            s->cmds_refused[SMTP_VERB_BDAT]++;
            bdat_unframed(s, "line_too_long");
            return true;
        }
        s->errors++;
        s->cmds[SMTP_VERB_NONE]++;
        s->cmds_refused[SMTP_VERB_NONE]++;
        log_msg(LOG_INFO, "session=%016llx event=line_too_long client=%s",
                (unsigned long long)s->id, s->peer_ip);
        if (s->state == SS_AUTH) {
            /* RFC 4954 4: the AUTH fails; the line after this one is a
             * command again, not a name or password. */
            reply(s, "500 5.5.6 Authentication Exchange line is too long");
            session_enter(s, SS_COMMAND);
        } else {
            reply(s, "500 5.5.2 Line too long");
        }
        /* Drop the line: through its end when it is here (what follows is
         * the next command), else all we have, and the rest as it comes. */
        char *lf = memchr(s->in, '\n', s->in_len);
        if (lf != NULL) {
            in_consume(s, (size_t)(lf - s->in) + 1);
        } else {
            s->in_len = 0;
            s->skip_line = true;
        }
        return true;
    }
    if (n < 0) {
        /* A bare CR or LF in a command line: the client's idea of a line
         * differs from ours (RFC 5321 2.3.8); nothing it says can be
         * trusted any more. */
        log_msg(LOG_NOTICE, "session=%016llx event=bare_line_end client=%s",
                (unsigned long long)s->id, s->peer_ip);
        reply_close(s, "500 5.5.2 Bare CR or LF in a command line: closing");
        return true;
    }
    size_t len = (size_t)n;
    handle_line(s, s->in, len - 2, s->in_len - len);
    in_consume(s, len);
    if (s->state == SS_COMMAND || s->state == SS_AUTH)
        session_deadline(s, s->sw->cfg->timeout_command);
    if (s->errors >= s->sw->cfg->max_errors && s->state != SS_CLOSING) {
        log_msg(LOG_NOTICE, "session=%016llx event=too_many_errors client=%s errors=%u",
                (unsigned long long)s->id, s->peer_ip, s->errors);
        reply_close(s, "421 4.7.0 Too many errors: closing");
    }
    return true;
}

static bool
run_data(struct session *s)
{
    if (s->in_len == 0)
        return false;
    size_t consumed, produced;
    char *out;
    if (body_reserve(s, s->in_len))
        out = s->body + s->body_len;
    else
        out = s->in; /* over the limit: unstuff in place, keep nothing */
    int rc = smtp_unstuff(&s->unstuff, s->in, s->in_len, out, &consumed, &produced);
    if (out != s->in) {
        if (s->dkim_keys != NULL) /* hashed while still in the cache */
            dkim_body_feed(s->dkim_body, out, produced);
        s->body_len += produced;
    }
    s->body_seen += produced;
    in_consume(s, consumed);
    if (rc == SMTP_DATA_END) {
        message_finish(s, s->unstuff.flags);
        if (s->state == SS_COMMAND) /* refused: the client's next command */
            session_deadline(s, s->sw->cfg->timeout_command);
        return true;
    }
    return false; /* the unconsumed tail (". " or ".\r") waits for more */
}

static bool
run_bdat(struct session *s)
{
    if (s->bdat_left > 0) {
        if (s->in_len == 0)
            return false;
        size_t take = s->in_len < s->bdat_left ? s->in_len : (size_t)s->bdat_left;
        if (!s->bdat_discard) {
            if (body_reserve(s, take)) {
                memcpy(s->body + s->body_len, s->in, take);
                bdat_scan(s, s->body + s->body_len, take);
                if (s->dkim_keys != NULL)
                    dkim_body_feed(s->dkim_body, s->body + s->body_len, take);
                s->body_len += take;
            }
            s->body_seen += take;
        }
        in_consume(s, take);
        s->bdat_left -= take;
        if (s->bdat_left > 0)
            return false;
    }
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
    if (s->bdat_discard) {
        s->bdat_discard = false;
        return true; /* the refusal was already said */
    }
    if (s->body_seen > s->sw->cfg->max_message_size)
        s->too_big = true;
    if (!s->bdat_last && !s->too_big && !s->no_memory) {
        reply(s, "250 2.0.0 %llu octets received", (unsigned long long)s->body_seen);
        return true;
    }
    /* The last chunk, or one the message cannot take: the transaction ends
     * here either way (RFC 3030 2: after an error to a BDAT the client
     * sends no more chunks of it; any already pipelined find no
     * transaction, are refused with 503 and dropped). */
    message_finish(s, s->bdat_flags | (s->bdat_cr ? SMTP_DATA_F_BARE_CR : 0u));
    if (s->state == SS_COMMAND)
        session_deadline(s, s->sw->cfg->timeout_command);
    return true;
}

/* States that wait for the client's next bytes (others wait for a send,
 * a commit or a timer). */
static bool
want_input(const struct session *s)
{
    switch (s->state) {
    case SS_COMMAND:
    case SS_AUTH:
    case SS_DATA:
    case SS_BDAT:
    case SS_TLS:
        return true;
    default:
        return false;
    }
}

static bool
want_recv(const struct session *s)
{
    return want_input(s) && s->out_len < OUT_HIGH && !stream_eof(&s->st);
}

/* A TLS error: say why in the log, send the alert OpenSSL may have queued
 * (the client learns what failed instead of seeing a reset), then close.
 * Plaintext replies not yet encrypted are dropped: nothing can carry them. */
static void
tls_fail(struct session *s, int rc)
{
    log_msg(LOG_NOTICE, "session=%016llx event=tls_failed client=%s state=%s err=\"%s\" "
                        "detail=\"%s\"",
            (unsigned long long)s->id, s->peer_ip, session_state_str(s->state),
            tls_strerror(rc), stream_tls_error(&s->st));
    s->out_len = s->out_sent = 0;
    session_enter(s, SS_CLOSING);
    flush(s);
    if (stream_drained(&s->st)) {
        session_close(s, "tls");
        session_maybe_free(s);
    }
}

/* The client sent close_notify and everything before it was handled: a
 * session waiting for input has nothing more to wait for. Replies queued
 * go out, then our close_notify, then the socket closes. */
static void
tls_on_eof(struct session *s)
{
    bool mid_txn = s->state == SS_DATA || s->state == SS_BDAT || s->in_txn;
    log_msg(mid_txn ? LOG_NOTICE : LOG_INFO,
            "session=%016llx event=tls_closed client=%s state=%s%s", (unsigned long long)s->id,
            s->peer_ip, session_state_str(s->state),
            mid_txn ? " note=transaction_dropped" : "");
    session_enter(s, SS_CLOSING);
    flush(s);
    if (stream_drained(&s->st)) {
        session_close(s, NULL);
        session_maybe_free(s);
    }
}

static void
session_run(struct session *s)
{
    /* Until nothing moves: TLS may hold more plaintext than s->in took,
     * and no recv completion will come for bytes already received. */
    for (;;) {
        bool moved = false;
        if (s->state != SS_CLOSED && s->state != SS_CLOSING) {
            int rc = stream_read(&s->st);
            if (rc < 0) {
                tls_fail(s, rc);
                return;
            }
            moved = rc > 0;
        }
        for (;;) {
            if (s->out_len >= OUT_HIGH)
                break; /* answer what we have first: the send completion resumes */
            bool progress = false;
            switch (s->state) {
            case SS_COMMAND:
            case SS_AUTH:
                progress = run_commands(s);
                break;
            case SS_DATA:
                progress = run_data(s);
                break;
            case SS_BDAT:
                progress = run_bdat(s);
                break;
            default:
                break;
            }
            if (!progress)
                break;
            moved = true;
        }
        if (!moved)
            break;
    }
    if (stream_eof(&s->st) && want_input(s) && s->out_len < OUT_HIGH) {
        tls_on_eof(s);
        return;
    }
    flush(s);
    if (want_recv(s) && !s->sw->detached)
        stream_recv(&s->st);
}

/* ---- greeting and TLS ---- */

static void
greet(struct session *s)
{
    reply(s, "220 %s ESMTP sluice", s->sw->e->cfg->server.hostname);
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
}

/* The 220 to STARTTLS has left (or an implicit-TLS client connected): from
 * here the socket carries TLS. Whatever plaintext the client pipelined
 * after STARTTLS is dropped unread (CVE-2011-0411). */
static void
tls_begin(struct session *s)
{
    if (s->in_len > 0) /* Postfix: "improper command pipelining after STARTTLS" */
        log_msg(LOG_NOTICE, "session=%016llx event=pipelined_after_starttls client=%s dropped=%zu",
                (unsigned long long)s->id, s->peer_ip, s->in_len);
    s->in_len = 0;
    s->skip_line = false;
    struct tls_conn *tls = NULL;
    int rc = tls_conn_new_server(s->sw->tls, &tls);
    if (rc == 0)
        rc = stream_start_tls(&s->st, tls);
    if (rc < 0) {
        log_msg(LOG_ERR, "session=%016llx event=tls_setup_failed err=\"%s\"",
                (unsigned long long)s->id, tls_strerror(rc));
        session_close(s, "tls_setup");
        return;
    }
    session_enter(s, SS_TLS);
    /* One deadline for the whole handshake: a client that trickles it
     * byte by byte gains nothing. */
    session_deadline(s, s->sw->e->cfg->tls.handshake_timeout);
}

/* The handshake completed (from inside stream_read()). */
static void
tls_established(struct stream *st)
{
    struct session *s = SESSION_OF(st, st);
    struct tls_info info;
    if (stream_tls_info(&s->st, &info) == 0) {
        s->tls_proto = info.protocol;
        s->tls_cipher = info.cipher;
    }
    log_msg(LOG_INFO, "session=%016llx event=tls client=%s tls=\"%s %s\"",
            (unsigned long long)s->id, s->peer_ip, s->tls_proto ? s->tls_proto : "",
            s->tls_cipher ? s->tls_cipher : "");
    if (s->tls_refuse) {
        reply_close(s, "421 4.7.0 Too many connections: try again later");
        return;
    }
    if (s->tls_implicit) {
        greet(s); /* queues the 220: the stream sends it */
        return;
    }
    /* RFC 3207 4.2: forget what the client said before TLS. */
    s->greeted = s->esmtp = false;
    s->helo[0] = '\0';
    s->user = NULL;
    txn_reset(s);
    session_enter(s, SS_COMMAND);
    session_deadline(s, s->sw->cfg->timeout_command);
}

/* After greet_pause: anything already sent is a client that did not wait
 * for the greeting (RFC 5321 3.1). */
static void
session_on_peek(struct worker *w, struct op *op, int res, uint32_t flags)
{
    struct session *s = SESSION_OF(op, peek_op);
    s->peek_busy = false;
    s->inflight--;
    if (s->state == SS_CLOSED) {
        session_maybe_free(s);
        return;
    }
    if (res > 0) {
        log_msg(LOG_NOTICE, "session=%016llx event=pregreet client=%s",
                (unsigned long long)s->id, s->peer_ip);
        reply_close(s, "554 5.5.1 Protocol error: client sent data before the greeting");
        flush(s);
        return;
    }
    if (res == 0) {
        session_close(s, "client_closed");
        session_maybe_free(s);
        return;
    }
    greet(s);
    session_run(s);
}

static void
session_on_timer(struct timer *t, void *ctx)
{
    struct session *s = (struct session *)((char *)t - offsetof(struct session, timer));
    switch (s->state) {
    case SS_PREGREET: {
        struct io_uring_sqe *sqe = worker_sqe(s->sw->w, &s->peek_op);
        io_uring_prep_recv(sqe, stream_fd(&s->st), s->in, 1, MSG_PEEK | MSG_DONTWAIT);
        s->peek_busy = true;
        s->inflight++;
        return;
    }
    case SS_AUTH_WAIT:
        auth_fail_reply(s);
        session_run(s);
        return;
    case SS_TLS:
        log_msg(LOG_NOTICE, "session=%016llx event=tls_timeout client=%s implicit=%d "
                            "note=handshake_not_completed",
                (unsigned long long)s->id, s->peer_ip, s->tls_implicit);
        /* fall through */
    case SS_CLOSING:
    case SS_TLS_START:
        session_close(s, s->state == SS_CLOSING ? "send_timeout" : "tls_timeout");
        session_maybe_free(s);
        return;
    default:
        log_msg(LOG_NOTICE, "session=%016llx event=timeout client=%s state=%s",
                (unsigned long long)s->id, s->peer_ip, session_state_str(s->state));
        /* If the client does not read either, give up after one more period
         * (the deadline of SS_CLOSING). */
        reply_close(s, "421 4.4.2 Timeout: closing connection");
        flush(s);
        return;
    }
}

/* ---- lifetime ---- */

static void
session_close(struct session *s, const char *why)
{
    if (s->state == SS_CLOSED)
        return;
    if (why != NULL && log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, "session=%016llx event=close reason=%s", (unsigned long long)s->id,
                why);
    session_enter(s, SS_CLOSED);
    worker_timer_cancel(s->sw->w, &s->timer);
    /* Completes the pending recv (and fails a pending send) so that the
     * ops come back and the last one frees the session. */
    stream_close(&s->st);
}

static void
session_free(struct session *s)
{
    struct server_worker *sw = s->sw;
    if (s->prev)
        s->prev->next = s->next;
    else
        sw->sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    /* "ehlo=1 mail=1 rcpt=2/3 data=1 quit=1 commands=6/7": per verb the
     * commands answered 2xx or 3xx (of all, where some were refused), as
     * Postfix's smtpd says at disconnect */
    char sum[512] = ""; /* empty for a session that said nothing */
    size_t o = 0;
    uint32_t all = 0, ok = 0;
    for (unsigned v = 1; v <= SMTP_VERB_AUTH + 1 && o < sizeof(sum) - 48; v++) {
        unsigned k = v <= SMTP_VERB_AUTH ? v : SMTP_VERB_NONE; /* unknown ones last */
        if (s->cmds[k] == 0)
            continue;
        uint32_t good = s->cmds[k] - s->cmds_refused[k];
        all += s->cmds[k];
        ok += good;
        char name[16];
        snprintf(name, sizeof(name), "%s", k == SMTP_VERB_NONE ? "unknown" : smtp_verb_str(k));
        for (char *p = name; *p; p++)
            *p = (char)tolower((unsigned char)*p);
        o += (size_t)(s->cmds_refused[k] ? snprintf(sum + o, sizeof(sum) - o, " %s=%u/%u", name,
                                                    good, s->cmds[k])
                                         : snprintf(sum + o, sizeof(sum) - o, " %s=%u", name,
                                                    good));
    }
    log_msg(LOG_INFO, "session=%016llx event=disconnect client=%s user=%s%s commands=%u/%u",
            (unsigned long long)s->id, s->peer_ip, s->user ? s->user->name : "-", sum, ok, all);
    hash_unlink(s);
    if (s->tls_refuse)
        sw->tls_refusing--;
    if (s->counted) {
        atomic_fetch_sub(s->bounce ? &sw->e->bounce_clients : &sw->e->clients, 1);
        conn_table_remove(&sw->e->per_ip, s->conn_key);
    }
    worker_timer_cancel(sw->w, &s->timer);
    stream_fini(&s->st);
    txn_reset(s);
    dkim_body_free(s->dkim_body);
    free(s->rcpts);
    auth_db_unref(s->users);
    sw->stats.sessions--;
    free(s);
}

static void
session_maybe_free(struct session *s)
{
    if (s->state == SS_CLOSED && s->inflight == 0 && !stream_busy(&s->st))
        session_free(s);
}

/* A session on fd, in the worker's list; NULL when out of memory. */
static struct session *
session_alloc(struct server_worker *sw, int fd)
{
    struct session *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    s->sw = sw;
    stream_init(&s->st, sw->w, fd, &session_stream_ops, NULL);
    s->id = (uint64_t)sw->w->id << 56 | ++sw->seq;
    s->state = SS_PREGREET;
    s->peek_op = (struct op){OP_CALLBACK, session_on_peek};
    timer_init(&s->timer, session_on_timer);
    s->next = sw->sessions;
    if (s->next)
        s->next->prev = s;
    sw->sessions = s;
    sw->stats.sessions++;
    sw->stats.accepted++;
    return s;
}

static void
session_new(struct server_worker *sw, int fd, bool implicit_tls, bool bounce)
{
    struct session *s = session_alloc(sw, fd);
    if (s == NULL) {
        close(fd);
        return;
    }
    socklen_t len = sizeof(s->peer);
    if (getpeername(fd, (struct sockaddr *)&s->peer, &len) < 0) {
        s->peer.ss_family = AF_UNSPEC;
        snprintf(s->peer_ip, sizeof(s->peer_ip), "unknown");
    } else {
        netaddr_ip_str((struct sockaddr *)&s->peer, s->peer_ip, sizeof(s->peer_ip));
    }
    const struct server_config *cfg = sw->cfg;
    s->bounce = bounce;
    /* the bounce role: no relay by address, no AUTH */
    s->trusted = !bounce && cidr_match(cfg->trusted, cfg->ntrusted, (struct sockaddr *)&s->peer);
    s->loopback = netaddr_is_loopback((struct sockaddr *)&s->peer);
    auth_limit_addr_key((struct sockaddr *)&s->peer, s->addr_key, &s->addr_key_len);
    s->users = bounce ? NULL : engine_users(sw->e);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    _Atomic unsigned *open = bounce ? &sw->e->bounce_clients : &sw->e->clients;
    unsigned n = atomic_fetch_add(open, 1) + 1;
    bool ok = n <= (bounce ? sw->e->cfg->bounce.max_clients : cfg->max_clients);
    if (s->peer.ss_family != AF_INET && s->peer.ss_family != AF_INET6) {
        /* gone before we could ask who it was (a reset): nothing to serve */
        ok = false;
    } else if (ok) {
        conn_table_key((struct sockaddr *)&s->peer, cfg->max_clients_per_ip_v6_prefix, s->conn_key);
        s->counted = conn_table_add(&sw->e->per_ip, s->conn_key, cfg->max_clients_per_ip);
        ok = s->counted;
    }
    if (!s->counted)
        atomic_fetch_sub(open, 1);
    log_msg(LOG_INFO, "session=%016llx event=connect client=%s trusted=%d%s%s",
            (unsigned long long)s->id, s->peer_ip, s->trusted, bounce ? " role=bounce" : "",
            ok ? "" : " refused=limit");
    if (!ok && implicit_tls && sw->tls_refusing < TLS_REFUSE_MAX &&
        (s->peer.ss_family == AF_INET || s->peer.ss_family == AF_INET6)) {
        /* A plaintext 421 would be garbage to a client that starts with
         * its ClientHello. Postfix (smtpd_tls_wrappermode) completes the
         * handshake before its connection-count check and says 421
         * inside TLS: so does this, within TLS_REFUSE_MAX. */
        sw->stats.refused++;
        sw->tls_refusing++;
        s->tls_refuse = true;
    } else if (!ok) {
        sw->stats.refused++;
        if (implicit_tls) {
            session_close(s, "limit");
            session_maybe_free(s);
            return;
        }
        reply_close(s, "421 4.7.0 Too many connections: try again later");
        flush(s);
        return;
    }
    if (implicit_tls) {
        s->tls_implicit = true;
        tls_begin(s);
        if (s->state == SS_CLOSED) {
            session_maybe_free(s);
            return;
        }
        session_run(s);
        return;
    }
    if (cfg->greet_pause > 0) {
        session_deadline(s, cfg->greet_pause);
        return;
    }
    greet(s);
    session_run(s);
}

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

int
server_worker_new(struct engine *e, struct worker *w, struct server_worker **out, char *err,
                  size_t errlen)
{
    *out = NULL;
    struct server_worker *sw = calloc(1, sizeof(*sw));
    if (sw != NULL)
        atomic_init(&sw->draining, false);
    if (sw == NULL)
        return -ENOMEM;
    sw->e = e;
    sw->w = w;
    sw->cfg = &e->cfg->server;
    sw->port_op = (struct op){OP_CALLBACK, port_on_ready};
    auth_cache_init(&sw->auth);
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

struct server_worker *
server_worker_free(struct server_worker *sw)
{
    if (sw == NULL)
        return NULL;
    sw->stopping = true;
    /* The loop has ended: no completion will come back through the ring.
     * Pending commits still finish (queue_close commits them); their
     * callbacks see `stopping` and only drop their count. */
    while (sw->port != NULL && queue_port_pending(sw->port) > 0)
        queue_port_wait(sw->port, 1000);
    /* The hashing pool has stopped (engine_stop): hashes finished after
     * the loop ended wait in the mailbox, pointing into sessions. */
    worker_mbox_cancel(sw->w, session_on_hash);
    while (sw->sessions != NULL) {
        struct session *s = sw->sessions;
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

void
server_worker_drain(struct server_worker *sw)
{
    atomic_store(&sw->draining, true);
    for (int i = 0; i < sw->nls; i++)
        shutdown(sw->ls[i].fd, SHUT_RDWR); /* ends the accepts; new clients are refused */
}

void
server_worker_stats(const struct server_worker *sw, struct server_stats *out)
{
    *out = sw->stats;
}

/* ---- sessions without a socket (server.h: for harnesses) ---- */

struct server_worker *
server_worker_new_detached(struct engine *e, struct worker *w)
{
    struct server_worker *sw = calloc(1, sizeof(*sw));
    if (sw == NULL)
        return NULL;
    atomic_init(&sw->draining, false);
    sw->e = e;
    sw->w = w;
    sw->cfg = &e->cfg->server;
    sw->detached = true;
    auth_cache_init(&sw->auth);
    return sw;
}

struct session *
server_session_new_detached(struct server_worker *sw)
{
    struct session *s = session_alloc(sw, -1);
    if (s == NULL)
        return NULL;
    struct sockaddr_in *sin = (struct sockaddr_in *)&s->peer;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    snprintf(s->peer_ip, sizeof(s->peer_ip), "127.0.0.1");
    s->trusted = cidr_match(sw->cfg->trusted, sw->cfg->ntrusted, (struct sockaddr *)&s->peer);
    s->loopback = true;
    auth_limit_addr_key((struct sockaddr *)&s->peer, s->addr_key, &s->addr_key_len);
    s->users = engine_users(sw->e);
    greet(s);
    return s;
}

/* Move the replies said so far to out; what does not fit is dropped. */
static void
detached_take(struct session *s, char *out, size_t cap, size_t *got)
{
    size_t n = s->out_len - s->out_sent;
    size_t room = cap - *got;
    size_t k = n < room ? n : room;
    memcpy(out + *got, s->out + s->out_sent, k);
    *got += k;
    s->out_sent = s->out_len = 0;
}

size_t
server_session_feed(struct session *s, const char *in, size_t len, size_t read_max,
                    int commit_rc, char *out, size_t cap, bool *closed)
{
    size_t got = 0, off = 0;
    *closed = false;
    for (;;) {
        bool held = s->out_len >= OUT_HIGH; /* input left unhandled until a send drains */
        detached_take(s, out, cap, &got);
        if (s->state == SS_CLOSING)
            session_close(s, NULL);
        if (s->state == SS_CLOSED) {
            *closed = true;
            session_maybe_free(s);
            return got;
        }
        if (s->state == SS_COMMIT) {
            /* The spool's answer, at once; session_on_commit runs the
             * session on what is waiting, as after a real commit. */
            session_on_commit(s, commit_rc);
            continue;
        }
        if (held) {
            session_run(s);
            continue;
        }
        if (off < len && want_recv(s)) {
            size_t n = len - off;
            n = n < IN_CAP - s->in_len ? n : IN_CAP - s->in_len;
            n = read_max != 0 && n > read_max ? read_max : n;
            memcpy(s->in + s->in_len, in + off, n);
            s->in_len += n;
            off += n;
            session_run(s);
            continue;
        }
        return got;
    }
}

void
server_session_end(struct session *s)
{
    session_close(s, NULL);
    session_maybe_free(s);
}
