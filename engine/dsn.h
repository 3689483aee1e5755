/*
 * dsn: the text of a delivery status notification (RFC 3464), a
 * multipart/report (RFC 6522) with report-type=delivery-status, from the
 * null reverse-path <> to the original envelope sender, and the struct
 * dsn_msg in which the engine commits it together with the outcomes that
 * cause it (queue_update_enqueue), then delivers it like any message. Three parts: a human explanation (text/plain),
 * the machine-readable report (message/delivery-status), and the original
 * message (message/rfc822) or its headers (text/rfc822-headers). For an
 * SMTPUTF8 original the RFC 6533 types are used: message/global-delivery-
 * status, message/global, message/global-headers; a part of it that
 * quotes UTF-8 is encoded (quoted-printable; base64 for a whole
 * message/global: RFC 6532 3.5 and 3.7 allow it), so that the DSN is
 * 7-bit and reaches a sender whose MX has no SMTPUTF8. Any other DSN
 * returns an 8-bit original as its headers only (message/rfc822 may not
 * be encoded, RFC 2046 5.2.1), quoted-printable when they are 8-bit
 * themselves (RFC 6522 4), so that it reaches a sender whose MX has no
 * 8BITMIME.
 *
 * Remote text is hostile. Every string that goes into a header or a
 * report field is made one line: CR, LF and TAB become spaces, runs of
 * spaces one, other controls '?', and octets above 127 '?' unless the
 * DSN is SMTPUTF8 and they are valid UTF-8 (then kept). Long fields are
 * folded at spaces, and cut (CRLF SP) where there is no space, so no line
 * exceeds 998 octets. The MIME boundary appears nowhere in any part.
 * An address (From:, To:, Final-Recipient, the text) is written as RFC
 * 5322 and 3464 want it: a local part taken at MAIL or RCPT though no
 * dot-atom (user.@docomo.ne.jp) in quotes, "user."@docomo.ne.jp, as it
 * is relayed; an ORCPT goes back as given.
 *
 * Transport notes for the caller: the DSN is CRLF text; it carries 8-bit
 * octets only when an SMTPUTF8 original's sender (its To: field) is
 * UTF-8, so
 * enqueue it with the original's SMTPUTF8 flag and as 8BITMIME when its
 * text has an octet over 127 (dsn_msg_new does both; the original's
 * body type is no guide: one declared SMTPUTF8 but all ASCII is 7BIT,
 * and goes to a server without SMTPUTF8 as such).
 * Never build one for the null sender: dsn_build() refuses an empty
 * to_addr.
 *
 * Threading: pure functions (no I/O, no globals).
 */
#ifndef SLUICE_ENGINE_DSN_H
#define SLUICE_ENGINE_DSN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/smtp_reply.h"
#include "queue/queue.h"

#define DSN_TEXT_MAX    2048u         /* octets of reply text kept per recipient */
#define DSN_HEADERS_MAX (256u * 1024) /* returned headers beyond this are cut at a line */
/* Octets of an original to read for a DSN that returns its headers only:
 * two past DSN_HEADERS_MAX, so that dsn_build() tells a header section of
 * that size (its empty line seen) from a longer one, which it cuts at a
 * line and says so. */
#define DSN_HEADERS_READ (DSN_HEADERS_MAX + 2)
#define DSN_STATUS_MAX  16            /* "5.123.456" and NUL fit */
#define DSN_MSGID_MAX   900           /* octets of message_id: its line stays under 998 */
/* The spool tag (queue_outcome) of a failed recipient whose DSN waits for
 * the rest of its message ([bounce] dsn_wait): kept deferred in the
 * spool, due when its DSN must go at the latest, with its report entry in
 * its last reply (outbound/outcome.c). Above every failure class + 1. */
#define DSN_HELD_TAG QUEUE_TAG_HELD

/* What became of a recipient: its Action field (RFC 3464 2.3.3). */
enum dsn_action {
    DSN_ACTION_FAILED,  /* bounced or expired */
    DSN_ACTION_DELAYED, /* a warning: still being retried */
    /* Accepted (NOTIFY=SUCCESS) by a next hop that did not offer DSN: it
     * got no NOTIFY and will send no report of its own (RFC 3461 5.2.2). */
    DSN_ACTION_RELAYED,
};

/* One recipient of the report. All pointers borrowed for the call. */
struct dsn_rcpt {
    const char *addr;         /* final recipient, as in the envelope */
    const char *orcpt;        /* ORCPT as given ("rfc822;a+2Bb@c", xtext), NULL or "" if none */
    enum dsn_action action;
    const char *status;       /* RFC 3463 code to report, "5.1.1": see dsn_status_format() */
    unsigned code;            /* remote reply code, 0 if none */
    const char *text;         /* remote reply text (code 0: our own reason), NULL if none */
    const char *remote_mta;   /* MX host name, NULL if none */
    uint64_t last_attempt_ms; /* Unix ms, 0: none */
    uint64_t retry_until_ms;  /* delayed only: Will-Retry-Until, 0: none */
    const char *class_str;    /* bounce_class_str(), for people and X-Sluice-Class; NULL: none
                               * (a success has no class) */
};

/* One DSN. All pointers borrowed for the call. */
struct dsn_input {
    const char *reporting_mta; /* our host name: Reporting-MTA: dns; ... */
    const char *from_addr;     /* header From address, e.g. MAILER-DAEMON@host */
    const char *to_addr;       /* the original envelope sender; never "" */
    const char *message_id;    /* the DSN's own Message-ID, without <>, unique */
    const char *boundary_seed; /* something unique (the queue id) for the MIME boundary */
    const char *envid;         /* ENVID as received (xtext), NULL or "" if none */
    const char *queue_id;      /* our id of the original, X-Sluice-Queue-ID; NULL if none */
    uint64_t arrival_ms;       /* Arrival-Date, 0: left out */
    uint64_t now_ms;           /* Date */
    const char *orig;          /* the original message as stored (CRLF text), NULL if none */
    size_t orig_len;
    size_t orig_size; /* the whole original's octets when orig holds its start only (its
                       * headers: read so when it goes back no whole), 0: orig_len */
    bool ret_full;   /* RET=FULL: return the whole message, else only its headers */
    size_t full_max; /* bigger originals: headers only even with RET=FULL; 0: no limit */
    bool smtputf8;   /* the original was SMTPUTF8: RFC 6533 types, UTF-8 kept */
    const struct dsn_rcpt *rcpt;
    unsigned nrcpt; /* at least 1 */
};

/*
 * Build the DSN. Subject "Undelivered Mail Returned to Sender" when any
 * recipient failed, else "Delayed Mail (still being retried)" when any is
 * delayed, else (all relayed) "Successful Mail Delivery Report". The
 * original goes back whole only when RET=FULL, some recipient failed
 * (RFC 3461 4.3: RET is for failures; a delay warning or a success report
 * carries headers only), it is no
 * bigger than full_max, it is clean CRLF text with lines of at most
 * 998 octets (otherwise it could not travel unchanged), and it is 7-bit
 * or the DSN SMTPUTF8 (an 8-bit message/rfc822 would make the DSN 8-bit:
 * refused by an MX without 8BITMIME, and a DSN's bounce is dropped); else its headers
 * (everything up to the first empty line, all of it if there is none) go
 * back, and the human part says why. No original: two parts only.
 * Returns 0 with *out (malloc'd, NUL-terminated, *out_len octets without
 * the NUL; the caller frees it), -EINVAL (a required field missing or
 * malformed: empty to_addr, message_id with <>, space or controls or
 * longer than DSN_MSGID_MAX, a
 * status that is not C.S.D, no recipients), or -ENOMEM.
 */
int dsn_build(const struct dsn_input *in, char **out, size_t *out_len);

/* A DSN ready to be committed in one write transaction with the outcomes
 * that cause it (queue_update_enqueue), so that neither is durable
 * without the other; kept whole while that commit is retried. */
struct dsn_msg {
    uint64_t id;                   /* the DSN's queue id */
    uint64_t orig;                 /* the original's */
    char *text;                    /* owned: the message (dsn_build) */
    size_t len;
    char rcpt[QUEUE_MAX_ADDR + 1]; /* the original's envelope sender */
    const char *domain;            /* borrowed: points into rcpt, after its last '@' */
    enum queue_body_type body_type;
    bool smtputf8;
    bool failure; /* it reports a failure; else only delays or successes (advisory) */
    /* the original's owner: a DSN is its tenant's mail, through its pool */
    char tenant[QUEUE_MAX_TAG + 1], campaign[QUEUE_MAX_TAG + 1], pool[QUEUE_MAX_TAG + 1];
};

/*
 * Build the DSN of in (dsn_build) to orig's envelope sender, as message id
 * of the spool, with orig's SMTPUTF8 flag and the body type its own text
 * needs (8BITMIME when it holds an octet over 127; see the transport
 * notes above). Returns 0 with *out (free with dsn_msg_free), or a code of
 * dsn_build(), or -EINVAL when orig has the null sender or one too long.
 */
int dsn_msg_new(const struct dsn_input *in, const struct queue_envelope *orig, uint64_t id,
                struct dsn_msg **out);
/* What dsn_msg_new(in, orig, ...) failing with rc means, for the log: the
 * input it refused (-EINVAL: "the original has the null sender", "Message-ID
 * malformed: ..."), else strerror(-rc). A static string (strerror's
 * lives until the next call in this thread). */
const char *dsn_msg_strerror(int rc, const struct dsn_input *in, const struct queue_envelope *orig);
/* Free m (NULL is fine). Returns NULL. */
struct dsn_msg *dsn_msg_free(struct dsn_msg *m);
/* The envelope to enqueue m with: from <>, to m->rcpt, no DSN of its own
 * requested. env, rcpt and body point into m, which must outlive them. */
void dsn_msg_envelope(const struct dsn_msg *m, struct queue_envelope *env, struct queue_rcpt *rcpt,
                      struct iovec *body);

/* The Action field's word for a: "failed", "delayed", "relayed"
 * (a static string). */
const char *dsn_action_str(enum dsn_action a);

/*
 * Whether a recipient's NOTIFY bits (enum queue_notify of queue/queue.h)
 * ask for a DSN of action a (failed, delayed, relayed). NEVER: none.
 * NOTIFY absent (0): failures yes, delays and successes no; RFC 3461 4.1
 * leaves delays to the MTA, and like Postfix's default we send no warnings
 * nobody asked for. A success only with SUCCESS.
 */
bool dsn_wanted(unsigned notify_bits, enum dsn_action a);

/*
 * The Status to report for action a. A failure or a delay: the reply's
 * enhanced code when it had one, else X.0.0 from the reply code's class
 * (4xx, 5xx), else (no reply) 4.0.0 for a delay and 5.0.0 for a failure.
 * A success: the reply's enhanced code when it is 2.X.X, else 2.0.0.
 * Writes NUL-terminated text into buf (at least DSN_STATUS_MAX octets).
 * Returns 0 or -EINVAL when buf is too small.
 */
int dsn_status_format(char *buf, size_t cap, const struct smtp_enh *enh, unsigned code,
                      enum dsn_action a);

#endif
