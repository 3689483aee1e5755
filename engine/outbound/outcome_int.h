/*
 * outcome_int: what outbound/outcome.c (the outcomes of a job, their
 * commit, the DSN committed with them) and outbound/outcome_held.c (one
 * DSN per message: failures held for it) share.
 *
 * Threading: the worker's thread.
 */
#ifndef SLUICE_ENGINE_OUTBOUND_OUTCOME_INT_H
#define SLUICE_ENGINE_OUTBOUND_OUTCOME_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/dsn.h"
#include "engine/outbound/internal.h"
#include "queue/queue.h"

/* What telling o[i] takes once its commit says it applied. */
struct outcome_tell {
    const char *addr;    /* into the allocation: the recipient, or NULL (unknown) */
    const char *orcpt;   /* into the allocation: its ORCPT, or NULL */
    unsigned dsn_code;   /* the DSN's Diagnostic-Code, 0: none */
    uint8_t kind;        /* enum dlog_kind */
    uint8_t cls;         /* enum bounce_class */
    bool tls;            /* delivered over TLS */
    bool dsn;            /* named in the DSN, with action (below) */
    bool dsn_dropped;    /* failed, asking a DSN, but the sender is <> (a bounce is not bounced) */
    uint8_t action;      /* enum dsn_action */
    bool session;        /* an MTA answered: the DSN's Remote-MTA is info.mx */
    bool rcpt_named;     /* a server's reply after RCPT named the recipient: it may speak of it */
    bool held;           /* a failure held for its message's DSN (outcome_held.c): told now, named
                          * in the DSN that goes with the message's last */
    bool quiet;          /* a held failure's removal, its DSN going now: told when held */
    uint8_t reason;      /* enum smtp_reason: the log line's */
    uint16_t reply_skip; /* held: octets of its DSN entry before the reply in o.reply */
    const char *mx;      /* into the allocation: quiet: its DSN's Remote-MTA, or NULL */
    uint64_t at_ms;      /* quiet: its DSN's Last-Attempt-Date */
    char status[DSN_STATUS_MAX];
    char enh[16];        /* the log line's enhanced code, "" none */
    char tls_verify[96]; /* the log line's certificate check, "" none */
};

/* What a batch's outcomes share: the owners they are counted for, and
 * what a DSN made again needs. */
struct outcome_info {
    char tenant[QUEUE_MAX_TAG + 1]; /* "" none */
    uint32_t pool, src;             /* name ids, 0: none */
    char mx[256];                   /* "" none */
    uint64_t now_ms, expire_ms;
    char tls[24];        /* the log line's TLS protocol, "" none */
    char tls_policy[24]; /* the log line's TLS policy */
    bool delay_check;    /* once durable, see whether the message's delay warning is due
                          * (outcome_delay_check) */
};

/* ---- outcome.c ---- */

struct outcome_batch; /* outcome.c's: the outcomes of one job on their way to the spool */
/* The MX host whose session deferred recipient rcpt (its index) of b's
 * message by b, with reply code code (the spool's last of it), when an
 * MTA answered and that outcome applied; else NULL. b may be NULL. */
const char *outcome_batch_deferred_mx(const struct outcome_batch *b, unsigned rcpt, unsigned code);

/* Copy qo[0..n), their replies, what telling them takes (tl) and their
 * delivery log lines (ev[0..evlen): lines[i] of them tell qo[i], the
 * DSN's follow) into one batch and submit it, with the DSN they cause
 * (owned: taken over, but left to the caller when this fails) or NULL.
 * was: the batch this one is made again from, or NULL. recheck: once
 * durable, see whether the message's held failures can go
 * (outcome_held_recheck). Returns 0 or a negative code. */
int outcome_commit(struct delivery *d, struct dest *t, const struct queue_outcome *qo,
                   const struct outcome_tell *tl, const unsigned *lines, size_t n,
                   struct dsn_msg *dsn, const char *ev, size_t evlen,
                   const struct outcome_info *info, const struct outcome_batch *was, bool recheck);
/* The DSN for the recipients r[0..n) of env to its sender, to be
 * committed with their outcomes; NULL (logged) when it cannot be built.
 * Free with dsn_msg_free. */
struct dsn_msg *outcome_dsn_make(struct delivery *d, const struct queue_envelope *env,
                                 const struct dsn_rcpt *r, unsigned n);
/* The delivery log's dsn event of m, naming r[0..n) (captured with the
 * outcomes that cause it). */
void outcome_dsn_event(struct delivery *d, const struct dsn_msg *m, const struct dsn_rcpt *r,
                       unsigned n);
/* The DSN's entry for the outcome told by tl (reply: its reply); its
 * strings borrowed from tl, reply and info. */
void outcome_dsn_rcpt_of(struct dsn_rcpt *x, const struct outcome_tell *tl, const char *reply,
                         const struct outcome_info *info);

/* ---- outcome_held.c ---- */

/* A held failure's Remote-MTA, read back from the spool. */
struct outcome_held_ent {
    char mx[256]; /* "" none */
};

/* The reply the spool keeps with the held failure tl (text: the
 * server's reply or our reason; at_ms: when it failed), into buf (cap
 * octets, QUEUE_MAX_REPLY + 1). Returns the octets before text (the log
 * line skips them). */
uint16_t outcome_held_reply(char *buf, size_t cap, const struct outcome_tell *tl, const char *mx,
                            uint64_t at_ms, const char *text);
/* The held failures of env as quiet outcomes qo[0..) told by tl[0..),
 * their DSN entries dr[0..) (their strings in e[0..), which must outlive
 * dr). Returns how many. */
unsigned outcome_held_collect(const struct queue_envelope *env, struct queue_outcome *qo,
                              struct outcome_tell *tl, struct dsn_rcpt *dr,
                              struct outcome_held_ent *e, const struct outcome_info *info);
/* For job_finish: whether recipients of env not in j are ready (queued,
 * or in flight: j's failures are held for them); *nheld the held ones of
 * env, *due when j's held ones are due. */
bool outcome_held_scan(const struct delivery *d, const struct queue_envelope *env,
                       const struct job *j, unsigned *nheld, uint64_t *due);
/* A commit of message id is durable: when no recipient of it is ready
 * now, the DSN of its held failures goes (committed on t). */
void outcome_held_recheck(struct delivery *d, struct dest *t, uint64_t id);

/* ---- outcome_delay.c ---- */

/* For job_finish: whether a deferral of env's at now may make its delay
 * warning due: past [bounce] delay_warning since its arrival, the
 * warning not gone (as env was read), a recipient asking for one
 * (NOTIFY=DELAY), a sender to tell. */
bool outcome_delay_due(const struct delivery *d, const struct queue_envelope *env, uint64_t now);
/* A deferral of message id (by the batch whose info is given, on t) is
 * durable: when its delay warning is due and has not gone, it goes, and
 * the message is marked warned in the same commit (QUEUE_WARNED): one
 * warning per message, whichever of its batches comes first. b: that
 * batch, or NULL (a recheck): the recipients it deferred after an MTA
 * answered name its MX as their Remote-MTA (the spool keeps no MX of a
 * deferral: the others name none). */
void outcome_delay_check(struct delivery *d, struct dest *t, uint64_t id,
                         const struct outcome_info *info, const struct outcome_batch *b);

#endif
