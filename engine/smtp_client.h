/*
 * smtp_client: the outbound SMTP session as a pure state machine. It takes
 * the bytes the server sent, writes the commands to send into a bounded
 * output buffer, and reports what the I/O layer must do next as events.
 * No sockets, no clock, no allocation: a caller-allocated struct, driven
 * from scripted replies in tests, from a fuzzer, or from the io_uring loop.
 *
 * Who calls what, when (the I/O layer):
 *   connect; smtp_client_init(); arm a timer of smtp_client_deadline_ms()
 *   every received buffer     -> smtp_client_input()
 *   a send completed (n)      -> smtp_client_sent(n)
 *   the deadline fired        -> smtp_client_timeout()
 *   the peer closed / error   -> smtp_client_eof()
 *   TLS failed after the handshake -> smtp_client_tls_error()
 * After each of those calls, and after smtp_client_txn(), _body(),
 * _tls_done() and _quit(), act on the events returned (a bitmask, in this
 * order), then send whatever smtp_client_output() holds:
 *   EV_TIMER     re-arm the timer with smtp_client_deadline_ms() (0: none)
 *   EV_STARTTLS  once the output is sent, run the TLS handshake, then
 *                smtp_client_tls_done(); all output from then on goes
 *                through TLS
 *   EV_SEND_BODY stream the stored message with smtp_client_body() until
 *                it reports EV_BODY_END
 *   EV_TXN_DONE  every recipient of the transaction has its outcome
 *   EV_READY     idle: start a transaction or smtp_client_quit()
 *   EV_CLOSE     send what the output holds (at most a QUIT), then close;
 *                the machine expects nothing more. smtp_client_session()
 *                says why. Comes alone or with EV_TXN_DONE. There is no
 *                separate error event: errors are reasons of the close.
 *
 * Output: smtp_client_output() gives the unsent bytes; they stay in place
 * until smtp_client_sent() is called for them, and new commands are only
 * ever appended, so one send may be in flight while input is fed. Have at
 * most one send in flight: smtp_client_sent() moves what is left to the
 * front of the buffer.
 *
 * Session rules. EHLO, and HELO when EHLO gets 5xx. STARTTLS when offered
 * and the policy is not OFF; after the handshake, EHLO again with the old
 * capabilities forgotten. Not offered (or HELO only) under REQUIRED or
 * VERIFY: the session fails with reason TLS_UNAVAILABLE. STARTTLS answered
 * 4xx/5xx: OPTIONAL goes on in plaintext on the same connection (what the
 * policy allows anyway), REQUIRED/VERIFY fail with TLS_REFUSED. A failed
 * handshake fails with TLS_FAILED: the connection is unusable, and under
 * OPTIONAL the caller may reconnect without TLS (as Postfix does). Bytes
 * after the 220 to STARTTLS in the same input, or any input during the
 * handshake, are plaintext injection (CVE-2011-0411): protocol error.
 *
 * Transactions: with PIPELINING, [RSET] MAIL, every RCPT and DATA are
 * written at once (as far as the output and SMTP_CLIENT_PIPE_MAX allow;
 * the rest follows as room frees), replies are matched in order through a
 * FIFO; without it one command at a time. RSET only before a transaction
 * that follows one left open on the server (MAIL accepted, no final dot).
 * If no RCPT was accepted, the DATA refusal is expected; a 354 anyway gets
 * an empty message (".") whose reply is ignored.
 *
 * A 421 at any point, a timeout, the connection lost (or broken by the TLS
 * layer after the handshake), or a protocol error (malformed reply, a
 * reply nobody asked for, a code that makes no sense for the command):
 * everything not yet decided gets a temporary outcome of session scope,
 * EV_TXN_DONE if a transaction was open, EV_CLOSE, and the connection is
 * never reused. Nothing counts as delivered without a 2xx to RCPT, a 354
 * to DATA and a 2xx to the final dot. A protocol error caused by a reply
 * quotes it in the outcome's text (code and first 120 octets).
 *
 * Threading: pure functions over caller memory; a session belongs to one
 * thread at a time. The trace callback runs inside the calls.
 */
#ifndef SLUICE_ENGINE_SMTP_CLIENT_H
#define SLUICE_ENGINE_SMTP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/smtp_cmd.h"
#include "engine/smtp_data.h"
#include "engine/smtp_reply.h"

#define SMTP_CLIENT_OUT_CAP      16384 /* output buffer: commands, then the stuffed body */
#define SMTP_CLIENT_PIPE_MAX     128   /* commands outstanding at once (pipelined) */
#define SMTP_CLIENT_RCPT_DEFAULT 100   /* smtp_client_opts.max_rcpt when 0 */
#define SMTP_CLIENT_RCPT_MAX     65535 /* smtp_client_opts.max_rcpt at most */
#define SMTP_CLIENT_NAME_MAX     255   /* our EHLO name */
#define SMTP_OUTCOME_TEXT_MAX    512   /* reply text kept per outcome, NUL included */

/* Error codes: the smtp_client range. Only misuse of the API; everything
 * the server does is an outcome, never an error. */
enum smtp_client_err {
    SMTP_CLIENT_E_STATE = -5300, /* not allowed in the current state */
    SMTP_CLIENT_E_ARG = -5301,   /* bad argument (options, transaction, size) */
};

enum smtp_client_state {
    SMTP_CLIENT_S_GREETING, /* waiting for the 220 greeting */
    SMTP_CLIENT_S_EHLO,     /* EHLO reply */
    SMTP_CLIENT_S_HELO,     /* HELO reply */
    SMTP_CLIENT_S_STARTTLS, /* STARTTLS reply */
    SMTP_CLIENT_S_TLS,      /* the caller runs the handshake; no input */
    SMTP_CLIENT_S_IDLE,     /* ready for a transaction */
    SMTP_CLIENT_S_RSET,     /* RSET reply (before MAIL) */
    SMTP_CLIENT_S_MAIL,     /* MAIL reply */
    SMTP_CLIENT_S_RCPT,     /* RCPT replies */
    SMTP_CLIENT_S_DATA,     /* DATA reply (354) */
    SMTP_CLIENT_S_BODY,     /* the caller streams the message */
    SMTP_CLIENT_S_DOT,      /* reply to the final dot */
    SMTP_CLIENT_S_CLOSED,   /* over: close the connection */
    SMTP_CLIENT_S_COUNT
};

/* Events, as bits of the value returned by the calls below. */
enum smtp_client_ev {
    SMTP_CLIENT_EV_TIMER = 1u << 0,
    SMTP_CLIENT_EV_STARTTLS = 1u << 1,
    SMTP_CLIENT_EV_SEND_BODY = 1u << 2,
    SMTP_CLIENT_EV_BODY_END = 1u << 3,
    SMTP_CLIENT_EV_TXN_DONE = 1u << 4,
    SMTP_CLIENT_EV_READY = 1u << 5,
    SMTP_CLIENT_EV_CLOSE = 1u << 6,
};

enum smtp_client_tls_policy {
    SMTP_CLIENT_TLS_OFF = 0,  /* never STARTTLS */
    SMTP_CLIENT_TLS_OPTIONAL, /* STARTTLS when offered, plaintext otherwise */
    SMTP_CLIENT_TLS_REQUIRED, /* TLS or nothing; any certificate */
    SMTP_CLIENT_TLS_VERIFY,   /* TLS with a verified certificate or nothing */
};

/* smtp_client_tls_done() */
enum smtp_client_tls_result {
    SMTP_CLIENT_TLS_FAILED = 0, /* handshake failed: the connection is unusable */
    SMTP_CLIENT_TLS_UNVERIFIED, /* up, certificate not verified (fails VERIFY) */
    SMTP_CLIENT_TLS_VERIFIED,   /* up, certificate verified for the destination */
};

/* An outcome's status. ACCEPTED and PENDING never survive EV_TXN_DONE. */
enum smtp_status {
    SMTP_STATUS_PENDING = 0, /* not decided yet */
    SMTP_STATUS_ACCEPTED,    /* RCPT got 2xx; the message is not through yet */
    SMTP_STATUS_DELIVERED,   /* 2xx to the final dot */
    SMTP_STATUS_TEMPFAIL,    /* try again later (deferred) */
    SMTP_STATUS_PERMFAIL,    /* do not try again (bounce) */
};

/* Whom an outcome is about: this recipient, the whole message (MAIL,
 * DATA, the final dot, checks of the message against the server), or the
 * session with this server (greeting, EHLO, TLS, 421, timeout, connection
 * lost, protocol error: Postfix's "site" failures; another MX may do). */
enum smtp_scope {
    SMTP_SCOPE_NONE = 0,
    SMTP_SCOPE_RCPT,
    SMTP_SCOPE_MESSAGE,
    SMTP_SCOPE_SESSION,
};

/* Where an outcome came from. REPLY: code, enh and text are the server's.
 * The others are ours: code 0 for the session and connect reasons (no
 * reply exists),
 * the reply a server would have given for the local message checks
 * (NEED_8BITMIME 554 5.6.3, NEED_SMTPUTF8 553 5.6.7, SIZE 552 5.3.4,
 * ADDRESS 553 5.1.7/5.1.3, RCPT_LIMIT 452 4.5.3). */
enum smtp_reason {
    SMTP_REASON_NONE = 0,
    SMTP_REASON_REPLY,           /* the server's reply */
    SMTP_REASON_TIMEOUT,         /* smtp_client_timeout(): 4.4.2 */
    SMTP_REASON_EOF,             /* smtp_client_eof(): 4.4.2 */
    SMTP_REASON_PROTOCOL,        /* malformed/unsolicited/senseless reply, injection: 4.5.0 */
    SMTP_REASON_TLS_UNAVAILABLE, /* STARTTLS not offered, policy needs it: 4.7.4 */
    SMTP_REASON_TLS_REFUSED,     /* STARTTLS answered 4xx/5xx, policy needs it */
    SMTP_REASON_TLS_FAILED,      /* handshake failed: 4.7.5 */
    SMTP_REASON_TLS_UNVERIFIED,  /* certificate not verified under VERIFY: 4.7.5 */
    SMTP_REASON_NEED_8BITMIME,   /* 8-bit body, no 8BITMIME (RFC 6152): bounce or downgrade */
    SMTP_REASON_NEED_SMTPUTF8,   /* UTF-8 envelope, no SMTPUTF8 (RFC 6531 3.4) */
    SMTP_REASON_SIZE,            /* over the server's SIZE */
    SMTP_REASON_ADDRESS,         /* an address or parameter that cannot be sent */
    SMTP_REASON_RCPT_LIMIT,      /* past the server's LIMITS RCPTMAX: not tried */
    SMTP_REASON_NO_RCPT,         /* message outcome when no recipient was accepted */
    SMTP_REASON_QUIT,            /* the session ended by smtp_client_quit() */
    /* Not the machine's (no session existed): the caller's connect. */
    SMTP_REASON_CONNECT_REFUSED, /* the address refused the connection (RST): 4.4.1 */
    SMTP_REASON_CONNECT_TIMEOUT, /* the connect was not answered in time: 4.4.1 */
    SMTP_REASON_CONNECT_FAILED,  /* unreachable, or another connect error: 4.4.1 */
    /* The machine's again, last so that the values above keep theirs. */
    SMTP_REASON_TLS, /* smtp_client_tls_error(): the TLS layer broke the session: 4.4.2 */
};

struct smtp_outcome {
    uint16_t code;                    /* reply code; see enum smtp_reason */
    struct smtp_enh enh;              /* the reply's, or X.0.0 of its class when it had none */
    uint8_t status;                   /* enum smtp_status */
    uint8_t scope;                    /* enum smtp_scope */
    uint8_t reason;                   /* enum smtp_reason */
    uint8_t stage;                    /* enum smtp_client_state: the command it answers */
    char text[SMTP_OUTCOME_TEXT_MAX]; /* reply text, lines joined by ' ', NUL-terminated */
};

struct smtp_client_opts {
    const char *name; /* borrowed: lives as long as the session (sluice's
                       * comes from the connection's config, kept while it lives):
                       * our EHLO/HELO name */
    enum smtp_client_tls_policy tls;
    const char *tls_label;      /* borrowed (static): the policy that asked for TLS, put in
                                   front of the TLS failures' texts ("DANE"); NULL: none */
    bool tls_active;            /* the transport is TLS already (implicit TLS): no STARTTLS */
    bool no_pipelining;         /* never pipeline, even when offered */
    unsigned max_rcpt;          /* recipients per transaction the caller uses; 0: default;
                                   at most SMTP_CLIENT_RCPT_MAX */
    const uint32_t *timeout_ms; /* borrowed: lives as long as the session; NULL: defaults.
                                   SMTP_CLIENT_S_COUNT entries, 0 = no deadline */
    /* Called at every state change, inside the call that made it. */
    void (*trace)(void *arg, enum smtp_client_state from, enum smtp_client_state to);
    void *trace_arg;
};

/* One recipient of a transaction. addr is local@domain without brackets
 * ("Postmaster" alone allowed). params: NOTIFY and ORCPT (sent only when
 * the server offered DSN). out is written by the machine. */
struct smtp_client_rcpt {
    struct smtp_span addr; /* borrowed: lives as long as the transaction */
    /* borrowed likewise; empty: none. addr's domain in A-labels when addr
     * writes it in U-labels: to a server without SMTPUTF8 an address whose
     * local part is ASCII goes with it (RFC 6530 7.1), and needs no
     * SMTPUTF8; to one with SMTPUTF8 addr goes as it is. */
    struct smtp_span domain_ascii;
    struct smtp_params params;
    struct smtp_outcome out;
};

/* A transaction. from is the reverse path, empty for <>. params: what the
 * message is (SIZE, BODY=7BIT|8BITMIME, SMTPUTF8, RET, ENVID); each goes
 * on MAIL only when the server offered its extension, and a message that
 * needs one the server lacks gets its outcome without a command sent.
 * SMTPUTF8 is needed when set or when an address is not ASCII (and has
 * no ASCII form the server may be given instead: domain_ascii).
 * Everything below rcpt/nrcpt is written by the machine. */
struct smtp_client_txn {
    struct smtp_span from;         /* borrowed */
    struct smtp_span from_domain_ascii; /* borrowed; as smtp_client_rcpt's domain_ascii */
    struct smtp_params params;     /* its spans borrowed likewise */
    struct smtp_client_rcpt *rcpt; /* borrowed: from smtp_client_txn() to EV_TXN_DONE */
    unsigned nrcpt;
    struct smtp_outcome msg;                /* the message's outcome */
    unsigned delivered, tempfail, permfail; /* recipients, at EV_TXN_DONE */
};

/* Private state of one transaction run. */
struct smtp_client_run {
    uint32_t next_rcpt; /* next recipient to write */
    uint32_t rcpt_wait; /* RCPTs written, not answered */
    uint32_t accepted;  /* RCPTs that got 2xx */
    bool writing;       /* commands left to write */
    bool want_rset;     /* RSET still to write */
    bool mail_written, mail_refused, data_written;
    bool utf8;                      /* SMTPUTF8 transaction */
    bool ascii_domains;             /* the server has no SMTPUTF8: domain_ascii goes */
    bool dot_only;                  /* 354 with no recipient: send "." and ignore the reply */
    bool finishing;                 /* the terminator is being written */
    struct smtp_params mail_params; /* filtered by the server's extensions */
};

/* A FIFO entry: the command (as the state awaiting its reply) and the
 * recipient it names. */
/* Four octets: a connection keeps SMTP_CLIENT_PIPE_MAX of them inline
 * whether it waits or not (a recipient index fits in 16 bits: max_rcpt is
 * at most SMTP_CLIENT_RCPT_MAX). */
struct smtp_client_cmd {
    uint16_t rcpt;
    uint8_t state;
};

/*
 * The session's working memory: the output buffer and the reply parser,
 * about 21 KB. Apart from struct smtp_client so that a connection waiting
 * for a reply (or idle between transactions) need not hold one: the
 * caller lends a buffer with smtp_client_attach() before it calls the
 * machine and takes it back with smtp_client_detach() once nothing is
 * pending in it (a pool of them per worker serves thousands of sessions).
 * Fields private.
 */
struct smtp_client_buf {
    size_t out_len;
    struct smtp_reply_parser rp;
    char out[SMTP_CLIENT_OUT_CAP];
};

/*
 * One session. Visible, unlike the house rule for public structs, so that
 * the caller allocates it (inside its connection object) and the machine
 * allocates nothing, as with struct smtp_reply_parser. The fields are
 * private: use the functions. About 1 KB without its buffer.
 */
struct smtp_client {
    enum smtp_client_state state;
    uint32_t ev; /* events of the current call */
    uint64_t transitions;
    struct smtp_client_opts opts;
    struct smtp_ehlo caps;
    bool esmtp;      /* EHLO accepted (caps valid) */
    bool pipelining; /* caps & PIPELINING and allowed */
    bool tls;        /* the transport is TLS */
    bool tls_verified;
    bool need_rset;              /* a transaction is open on the server */
    bool broken;                 /* never reuse */
    struct smtp_client_txn *txn; /* borrowed: the transaction in flight, or NULL */
    struct smtp_client_run run;
    struct smtp_stuff stuff;
    uint16_t pipe_head, pipe_len;
    /* The FIFO is needed while the session runs, the reason it ended
     * only once it has (state CLOSED, FIFO empty for good): one place
     * for both, 512 octets less per connection. */
    union {
        struct smtp_client_cmd pipe[SMTP_CLIENT_PIPE_MAX];
        struct smtp_outcome session; /* why the session ended: valid when CLOSED */
    } u;
    struct smtp_client_buf *buf; /* borrowed: lent by the caller, or NULL */
};

/* RFC 5321 4.5.3.2 deadlines, in ms, indexed by state: greeting, EHLO,
 * HELO, STARTTLS, handshake, RSET, MAIL, RCPT 5 min; DATA 2 min; body 3
 * min per send; final dot 10 min; idle and closed none. Copy and change
 * it to override, and pass the copy in smtp_client_opts. */
extern const uint32_t smtp_client_default_timeout_ms[SMTP_CLIENT_S_COUNT];

/* Start a session on a connection that was just made: wait for the
 * greeting. Returns 0 or SMTP_CLIENT_E_ARG (no name, a name with spaces
 * or control characters, over SMTP_CLIENT_NAME_MAX; max_rcpt over
 * SMTP_CLIENT_RCPT_MAX). Arm the timer with
 * smtp_client_deadline_ms() afterwards. */
int smtp_client_init(struct smtp_client *c, const struct smtp_client_opts *o);

/*
 * Lend b (any content: it is reset) to the session; every call below but
 * smtp_client_output(), smtp_client_state() and the outcome readers needs
 * one attached and returns SMTP_CLIENT_E_STATE without. Attaching when
 * one is attached returns SMTP_CLIENT_E_STATE.
 */
int smtp_client_attach(struct smtp_client *c, struct smtp_client_buf *b);
/* Take the buffer back when it holds nothing the session still needs: no
 * unsent output, and no reply half received (unless the session is
 * closed). Returns it, or NULL when it must stay (or none is attached). */
struct smtp_client_buf *smtp_client_detach(struct smtp_client *c);

/*
 * Bytes received. Returns the events (>= 0); *used says how far the
 * replies handled reach. No need to loop: all of buf is consumed unless
 * the session closed part way (the rest is not read). The 220 to
 * STARTTLS must end the buffer: anything after it in the same input, or
 * any input before smtp_client_tls_done(), is injected plaintext and
 * closes the session (EV_CLOSE, never EV_STARTTLS).
 */
int smtp_client_input(struct smtp_client *c, const char *buf, size_t len, size_t *used);

/* The unsent output: *len octets at the returned pointer. */
const char *smtp_client_output(const struct smtp_client *c, size_t *len);

/* n octets of the output were sent. Frees room, so pipelined commands or
 * the body terminator may follow. Returns the events or SMTP_CLIENT_E_ARG
 * when n is more than the output held. */
int smtp_client_sent(struct smtp_client *c, size_t n);

/* The handshake asked by EV_STARTTLS is over. Returns the events or
 * SMTP_CLIENT_E_STATE outside SMTP_CLIENT_S_TLS. */
int smtp_client_tls_done(struct smtp_client *c, enum smtp_client_tls_result res);
/* As smtp_client_tls_done(SMTP_CLIENT_TLS_FAILED), with why (the TLS
 * layer's words, copied; NULL or "": none) after "TLS handshake failed"
 * in the outcome's text, so that the deferral and a DSN say what failed. */
int smtp_client_tls_failed(struct smtp_client *c, const char *why);

/*
 * Start a transaction (EV_READY seen, state IDLE). t stays the caller's
 * and is written until EV_TXN_DONE, which may come from this very call
 * (a message the server cannot take). Returns the events,
 * SMTP_CLIENT_E_STATE, or SMTP_CLIENT_E_ARG (no recipients, more than
 * max_rcpt, BODY=BINARYMIME: there is no BDAT here).
 */
int smtp_client_txn(struct smtp_client *c, struct smtp_client_txn *t);

/*
 * In SMTP_CLIENT_S_BODY: stuff message octets (the stored CRLF text, any
 * chunking) into the output. *consumed may fall short of len when the
 * output is full: send, smtp_client_sent(), then call again with the
 * rest. last: this is the end of the message (len may be 0); once it is
 * all consumed the terminator is written (now, or by smtp_client_sent()
 * when room frees) and EV_BODY_END reported. Returns the events or
 * SMTP_CLIENT_E_STATE.
 */
int smtp_client_body(struct smtp_client *c, const char *in, size_t len, bool last,
                     size_t *consumed);

/*
 * End the session. When idle: QUIT is written and EV_CLOSE returned (the
 * 221 is not waited for, as Postfix by default). Anywhere else this is an
 * abort: no command, everything in flight temporarily failed. Returns the
 * events (EV_CLOSE at least, EV_TXN_DONE too when a transaction was open).
 */
int smtp_client_quit(struct smtp_client *c);

/* The deadline of the current state expired / the connection was lost
 * (EOF or error). Return the events; everything undecided fails
 * temporarily. No-ops (0) once closed. A timeout while idle is a quit. */
int smtp_client_timeout(struct smtp_client *c);
int smtp_client_eof(struct smtp_client *c);
/* The TLS layer failed the session after its handshake (a fatal alert
 * from the server, a record that did not decrypt, a flood of key updates):
 * as smtp_client_eof(), with reason TLS and why (the TLS layer's words,
 * copied; NULL or "": none) in the text, so that the recipients' outcomes
 * say what broke the connection. */
int smtp_client_tls_error(struct smtp_client *c, const char *why);

/* The deadline for the current state, in ms; 0: none. */
uint32_t smtp_client_deadline_ms(const struct smtp_client *c);

enum smtp_client_state smtp_client_state(const struct smtp_client *c);
const char *smtp_client_state_str(enum smtp_client_state s);
/* State changes so far (for logs and tests). */
uint64_t smtp_client_transitions(const struct smtp_client *c);
/* The server's EHLO capabilities (all zero after HELO). */
const struct smtp_ehlo *smtp_client_caps(const struct smtp_client *c);
/* The transport is TLS; with a verified certificate. */
bool smtp_client_tls(const struct smtp_client *c, bool *verified);
/* May another transaction run on this connection (idle and sane)? */
bool smtp_client_reusable(const struct smtp_client *c);
/* Why the session ended: reason NONE while it runs; QUIT after a
 * smtp_client_quit() while idle (status PENDING: nothing failed). Ask
 * again after the session ends: the outcome is written in place of the
 * pipelining FIFO then, so the pointer returned while it ran is not it. */
const struct smtp_outcome *smtp_client_session(const struct smtp_client *c);

const char *smtp_status_str(enum smtp_status s);
const char *smtp_scope_str(enum smtp_scope s);
const char *smtp_reason_str(enum smtp_reason r);
/* Is the code of an outcome of reason r a server's: its reply (REPLY), or
 * its refusal of STARTTLS (TLS_REFUSED)? The others' codes are ours: 0,
 * what a server would have said to a local check, or the failure
 * policy's for a failure no server sent (a DNS failure's 451). */
bool smtp_reason_server_code(enum smtp_reason r);
const char *smtp_client_strerror(int err);

#endif
