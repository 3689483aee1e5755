/*
 * oob: out-of-band feedback. What the bounce listener ([bounce] listen,
 * served by server.c in its bounce role) does with a recipient and with a
 * message, and the VERP sender of outbound transactions.
 *
 *   oob_rcpt_check()  decides RCPT at the bounce listener: a VERP address
 *                     of a bounce domain whose token verifies, or one of
 *                     accept_local_parts at a bounce domain; a token that
 *                     does not verify is refused (550 5.7.1, forged),
 *                     anything else too (550 5.7.1, never a relay).
 *   oob_message()     parses an accepted message (feedback/feedback.h)
 *                     and turns it into delivery log events: oob_bounce
 *                     per failed recipient of a DSN or non-standard
 *                     bounce (classified with the one table, classify.h),
 *                     complaint per ARF report, and the daemon log's
 *                     line of it (for the caller to log once it answered
 *                     250). Auto-replies, delay notices and what is not
 *                     recognised are logged (the daemon log) and dropped.
 *                     Nothing is queued.
 *   oob_verp_sender() the envelope sender of one recipient's transaction
 *                     when [bounce] verp_domain is set.
 *
 * Identity comes from the VERP token only: the envelope recipient at the
 * listener (a DSN goes to the original's envelope sender), else the
 * token found in the report (ARF's Original-Mail-From, the original's
 * Return-Path). A token that does not verify, or whose message id is
 * older than verp_max_age (or from the future), is logged
 * (event=oob_dropped) and dropped. The recipient a report names is
 * checked against the token's recipient tag: only a verified (token,
 * recipient) pair reaches the suppression seam; the event says
 * "verified": false otherwise, and X-Sluice-* fields of the original,
 * which anyone can write, are logged for the backend but decide nothing.
 *
 * The suppression seam: struct oob_hooks.suppress, when set (the bounce
 * listener's: it makes the entry a note committed with the report,
 * suppress.h), is called for a verified hard bounce (class invalid_recipient,
 * action failed) and a verified complaint (any feedback type but
 * not-spam and auth-failure, which say nothing of the recipient's wishes),
 * on the worker's thread, with
 * borrowed strings; it must not block. NULL: the events are logged only.
 *
 * Threading: every function may run on any worker thread at once; the
 * config is read, never written.
 */
#ifndef SLUICE_ENGINE_OOB_H
#define SLUICE_ENGINE_OOB_H

#include <stddef.h>
#include <stdint.h>

#include "feedback/verp.h"

struct bounce_config;
struct classify;
struct dlog_writer;

enum oob_suppress_kind {
    OOB_SUPPRESS_HARD_BOUNCE = 1, /* class invalid_recipient, permanent */
    OOB_SUPPRESS_COMPLAINT = 2,
};

/* The scope of a tenant known by its tag only: "tag:" and 8 hex digits. */
#define OOB_TAG_SCOPE_LEN 12

/* The scope tenant's complaints go to while the config does not name it
 * (the bounce listener finds no configured tenant with its tag): "tag:"
 * and its tag in hex under bc's key, into buf (OOB_TAG_SCOPE_LEN + 1).
 * Returns 1, or 0 (buf "") for a tenant whose tokens carry its name
 * (VERP_TENANT_MAX octets or fewer: its list is under that name) or
 * when VERP has no key. engine.c folds that list into the tenant's own
 * once the config names it again (suppress_move_scope). */
int oob_tag_scope(const struct bounce_config *bc, const char *tenant, char *buf);

/* The seam to the suppression list: the lead connects suppress_add() here. */
struct oob_hooks {
    /* tenant "" when the message had none, "tag:XXXXXXXX" for a tenant
     * whose long name the token carried as its tag (verp.h) and that the
     * config does not name (removed since, or not yet: oob_tag_scope);
     * addr as the report named it. */
    void (*suppress)(void *ctx, const char *tenant, const char *addr, int kind);
    void *ctx; /* borrowed */
};

enum oob_rcpt {
    OOB_RCPT_VERP,     /* a VERP address whose token verified: *ref is set */
    OOB_RCPT_LOCAL,    /* one of accept_local_parts at a bounce domain */
    OOB_RCPT_FORGED,   /* at a bounce domain, with the prefix, a token that does not verify */
    OOB_RCPT_NOT_OURS, /* another domain or local part: never relayed */
};

/* Is domain (any case, n octets) one of the bounce domains? */
int oob_is_bounce_domain(const struct bounce_config *bc, const char *domain, size_t n);

enum oob_rcpt oob_rcpt_check(const struct bounce_config *bc, const char *addr,
                             struct verp_ref *ref);

/* What one message did: for the caller's log line and stats. */
struct oob_outcome {
    const char *kind;   /* feedback_kind_str() */
    unsigned events;    /* delivery log events written */
    unsigned suppressed; /* calls of the suppression seam */
    const char *dropped; /* why nothing was logged: "autoreply", "unknown", "no_token",
                          * "forged_token", "stale_token", "delayed"; NULL: events */
    char line[1024];     /* the daemon log's line of the event (event=oob_bounce or
                          * event=complaint), "" none: the caller logs it once the
                          * report is answered 250, so that a report answered 451
                          * and sent again is logged once */
};

/* Parse msg[0..len) accepted from client (a session whose id is sid) for
 * the envelope recipients rcpts[0..nrcpt), log, call the seam. Returns 0
 * or -ENOMEM (the client is told 451 and sends again). */
int oob_message(const struct bounce_config *bc, const struct classify *cls,
                const struct oob_hooks *hooks, struct dlog_writer *lw, uint64_t sid,
                const char *client, const char *const *rcpts, unsigned nrcpt, const char *msg,
                size_t len, struct oob_outcome *out);

/* The VERP sender for recipient rcpt_index (address rcpt) of message id of
 * tenant (NULL: none) into out. Returns its length, 0 when VERP is off or
 * the sender is the null sender (keep it), or a negative code (logged by
 * the caller; the message goes with its own sender). */
int oob_verp_sender(const struct bounce_config *bc, const char *sender, uint64_t id,
                    unsigned rcpt_index, const char *rcpt, const char *tenant, char *out,
                    size_t cap);

#endif
