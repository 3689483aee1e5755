/*
 * server_int.h: what the files of the submission server share (not a
 * public header: engine/server.c, engine/server_worker.c,
 * engine/server_cmd.c, engine/server_auth.c and engine/server_msg.c
 * include it; everyone else goes through engine/server.h).
 *
 *   engine/server.c      sessions: the state machine, input and output on
 *                        the stream, greeting, STARTTLS and implicit TLS,
 *                        deadlines, lifetime, detached sessions (for
 *                        harnesses);
 *   engine/server_worker.c the worker's server: listeners and accepts, the
 *                        spool's port, start, reload, free (the wait for
 *                        the commits left), the stop's drain, the counts;
 *   engine/server_cmd.c  the commands: HELO/EHLO, STARTTLS, MAIL, RCPT,
 *                        DATA, BDAT, RSET, NOOP, VRFY, QUIT, and the
 *                        bounce role's rules at MAIL and RCPT;
 *   engine/server_auth.c AUTH: the command, its SASL exchange, the
 *                        credentials' check (cache, hashing pool), the
 *                        failure limits and the delayed 535;
 *   engine/server_msg.c  the message: its body within body_memory_limit,
 *                        the transaction, the DKIM signing hand-off, the
 *                        spool commit, the reception event and the
 *                        hand-off to delivery.
 *
 * Threading: everything on the worker's thread.
 */
#ifndef SLUICE_ENGINE_SERVER_INT_H
#define SLUICE_ENGINE_SERVER_INT_H

#include <netinet/in.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "engine/auth.h"
#include "engine/auth_limit.h"
#include "engine/auth_pool.h"
#include "engine/dkim_pool.h"
#include "engine/engine.h"
#include "engine/msa.h"
#include "engine/netaddr.h"
#include "engine/owner.h"
#include "engine/server.h"
#include "engine/smtp_cmd.h"
#include "engine/smtp_data.h"
#include "engine/stream.h"
#include "engine/worker.h"
#include "queue/queue.h"

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
    unsigned junk; /* commands that moved no mail since the last MAIL accepted
                    * ([server] max_junk_commands) */
    unsigned pipelined_rest; /* 503s to RCPT, DATA or BDAT still taken for the
                              * pipelined rest of a refused MAIL or BDAT chunk, not
                              * as junk */
    /* The suppressed and rejection events of RCPTs refused in this
     * transaction while its tenant is not known yet (X-Sluice-Tenant,
     * after DATA): sent with it, or without one when the transaction ends
     * first (server_cmd.c supp_flush). Owned; at most max_recipients. */
    struct supp_pending **supp;
    unsigned nsupp, supp_cap; /* supp_cap: max_recipients when supp was made (a
                               * reload may change it meanwhile) */
    /* Commands by verb (SMTP_VERB_NONE: unrecognized, or a line refused
     * before it was read as one), and those answered 4xx or 5xx: the
     * disconnect line's summary, as Postfix's. */
    uint32_t cmds[SMTP_VERB_AUTH + 1], cmds_refused[SMTP_VERB_AUTH + 1];
    /* The first command refused, as "VERB reply" (cut; "- reply" for a
     * refusal that answered no command, reply_seen()): the disconnect
     * line says why a client got nowhere (no AUTH, a sender it may not
     * use) in one line however often it tried; "" while none was. */
    char first_refused[112];
    /* A refusal that answered no command (a timeout between commands, a
     * stop, too many errors: each closes the session) after first_refused
     * was taken, cut: the disconnect line's closed_by; "" while none was. */
    char closed_by[112];
    /* A command is read (command_begin) and its last reply not yet said:
     * reply() counts that reply, the one place that does, wherever it is
     * made (an AUTH's 535 after its hash, a DATA's after the dot, a BDAT's
     * after its chunk). A 3xx (334, 354) leaves it open. */
    bool answering;
    unsigned answer_verb; /* its verb, an index of cmds */

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
    bool committing;           /* the spool has the message; its answer has not come */
    struct timer commit_timer; /* the commit's answer, held (SLUICE_TEST_COMMIT_DELAY) */
    int commit_rc;             /* what it was */
    char *ev_line; /* owned: the reception event committed with the message (or a bounce
                    * listener's events, committed alone), or NULL */
    size_t ev_len;
    struct oob_outcome *oob; /* owned: the bounce listener's report whose commit the spool
                              * has (committing); NULL: a message's commit */
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
    atomic_bool drain_posted; /* drain_msg went to the worker (once) */
    /* When the stop's drain ends (CLOCK_MONOTONIC ns; UINT64_MAX: not
     * bounded): a last reply has until then to leave (session_enter). */
    _Atomic uint64_t drain_until;
    struct worker_msg drain_msg; /* server_on_drain: the idle sessions told 421 */
    /* Draining: sessions that hold the worker's drain open (a message being
     * signed or committed, a last reply leaving) are waited for; when one
     * lets go, recheck_msg looks again (server_worker_drain_seal). */
    struct worker_msg recheck_msg;
    bool recheck_posted; /* recheck_msg is in the mailbox */
    bool sealed;         /* the drain is done here: nothing new is stored */
    struct session *sessions; /* list of owned sessions */
    struct session *hashing;  /* borrowed: sessions whose own hash is with the pool */
    struct auth_cache auth;
    uint64_t seq;
    unsigned tls_refusing; /* sessions with tls_refuse set, at most TLS_REFUSE_MAX */
    struct server_stats stats;
    struct stats_tenant_table tenants; /* counts per tenant */
    bool detached; /* a harness's: no listener, no ring I/O, no spool (see server.h) */
    /* Tests (SLUICE_TEST_COMMIT_DELAY, builds with test hooks): each
     * commit's answer reaches its session this many ms late; 0: at once. */
    uint64_t test_commit_delay;
};

/* Implicit-TLS clients over a connection limit that are told so inside
 * TLS, per worker, at once. Each costs a handshake and TLS buffers, and
 * is outside the limits that bound everything else: past this, they are
 * closed without a word (as by a full listen backlog). */
#define TLS_REFUSE_MAX 64


#define SESSION_OF(ptr, field) ((struct session *)((char *)(ptr) - offsetof(struct session, field)))

/* ---- calls between the files ---- */

/* The state's name, for the logs. */
const char *session_state_str(enum session_state s);

/* server.c: the session */
/* A command of verb v (enum smtp_verb; SMTP_VERB_NONE for an unknown one
 * or a line refused unread) is read: counted, its reply awaited. */
void command_begin(struct session *s, unsigned v);
/* Queue a reply line (CRLF added) in the output buffer. The first line of
 * the reply to the command read last closes it: 4xx and 5xx count as
 * refused, and the first of those is kept for the disconnect line. */
void reply(struct session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Say text and hang up. */
void reply_close(struct session *s, const char *text);
/* The deadline of the state entered, ms from now. */
void session_deadline(struct session *s, uint64_t ms);
/* Every state change goes through here (logged at debug). */
void session_enter(struct session *s, enum session_state next);
/* Free s once nothing is in flight and it is closed. */
void session_maybe_free(struct session *s);
/* Act on what has arrived: lines, body octets, or wait. */
void session_run(struct session *s);
/* s has just come back to waiting for a command (its message stored, its
 * TLS handshake done): if a stop is under way, it is told 421 and closed
 * (server_on_drain ran before it got there). */
void session_drain_check(struct session *s);
/* Does a session in state st hold a stop's drain open (a message being
 * signed or stored, a last reply leaving)? */
bool session_state_holds_drain(enum session_state st);
/* The deadline of a last reply: one command's time, within what is left
 * of a stop's drain. */
void session_closing_deadline(struct session *s);
/* Did the client leave a transaction unfinished (its envelope given, its
 * content not ended)? */
bool txn_unfinished(const struct session *s);
/* Out of the worker's list, the disconnect line logged, everything freed. */
void session_free(struct session *s);
/* A session for the connection accepted on fd (closed when out of
 * memory), on an implicit-TLS listener or the bounce listener. */
void session_new(struct server_worker *sw, int fd, bool implicit_tls, bool bounce);

/* server_worker.c: the worker's server */
/* A worker's server zeroed, not draining, on e's [server] config (calloc'd,
 * server_worker_free frees it); NULL when out of memory. */
struct server_worker *server_worker_alloc(struct engine *e, struct worker *w);
/* Stopping: s, idle (waiting for a command outside a transaction, or for
 * its greeting), is told 421 and closed. True when it was. */
bool session_drain_close(struct session *s);
/* A session that held the drain let go (posted by session_enter): the
 * idle ones are told 421, and delivery hears when nothing holds it. */
void server_on_drain_recheck(struct worker *w, struct worker_msg *m);

/* server_cmd.c: the commands */
/* BDAT chunk octets b[0..len) into the body, checked across chunks. */
void bdat_scan(struct session *s, const char *b, size_t len);
/* The client broke BDAT's framing: say why and hang up. */
void bdat_unframed(struct session *s, const char *why);
void cmd_rcpt(struct session *s, const struct smtp_cmd *c);
/* One command line (without its CRLF); rest: octets after it in the input. */
void handle_line(struct session *s, const char *line, size_t len, size_t rest);
/* Is buf[0..len) a BDAT command line? */
bool is_bdat_line(const char *buf, size_t len);
/* After DATA, once the message's tenant is known: recipients on that
 * tenant's suppression list are dropped. 0 with at least one left, or a
 * negative value with the reply for the whole message in text. */
int suppress_after_data(struct session *s, char *text, size_t tlen);
/* The suppressed events RCPT kept back, sent with tenant (NULL: none). */
void supp_flush(struct session *s, const char *tenant);

/* server_auth.c: AUTH */
/* Is AUTH offered to s (over TLS, or in plaintext as plaintext_auth says)? */
bool auth_allowed_here(const struct session *s);
/* AUTH (c: its mechanism and initial response, if any). */
void cmd_auth(struct session *s, const struct smtp_cmd *c);
/* One SASL response (AUTH's initial response, or a line after 334). */
void auth_response(struct session *s, const char *line, size_t len);
/* A failed AUTH: 535 after the delay, or the close past the limit. */
void auth_fail_reply(struct session *s);
/* s leaves the password-hashing lists (as leader or follower). */
void session_hash_unlink(struct session *s);
/* A password hash came back from the pool (the worker's mailbox). */
void session_on_hash(struct worker *w, struct worker_msg *m);

/* server_msg.c: the message */
/* The body budget shared by every worker (e->body_bytes against limit). */
void body_budget_give(struct engine *e, uint64_t delta);
bool body_budget_take(struct engine *e, uint64_t delta, uint64_t limit);
/* Room for n more body octets (within the budget); false: none. */
bool body_reserve(struct session *s, size_t n);
/* The DKIM body hash starts with the content (when the message is signed). */
void dkim_body_start(struct session *s);
/* The content ended (the dot, or BDAT LAST): check, sign, commit. */
void message_finish(struct session *s, uint32_t data_flags);
/* The spool's commit of the message returned (rc 0: stored). */
void session_on_commit(void *cookie, int rc);
/* The commit's answer, held by the test hook, reaches the session. */
void session_on_commit_timer(struct timer *t, void *ctx);
/* A malloc'ed, NUL-terminated copy of sp; NULL without memory. */
char *session_span_dup(struct smtp_span sp);
/* The transaction ends: what it held is freed and given back. */
void txn_reset(struct session *s);

#endif
