/*
 * feedback: what comes back by mail after delivery. Given a whole message
 * as it arrived at the bounce listener, feedback_parse() says what it is:
 *
 *   FEEDBACK_DSN        an RFC 3464 delivery status notification
 *                       (multipart/report; report-type=delivery-status):
 *                       one entry per recipient block (Final-Recipient,
 *                       Original-Recipient, Action, Status,
 *                       Diagnostic-Code, Remote-MTA).
 *   FEEDBACK_BOUNCE     a bounce in no standard form (Exim's "This message
 *                       was created automatically by mail delivery
 *                       software", Exchange's "Delivery has failed to
 *                       these recipients", qmail's "I'm afraid I wasn't
 *                       able to deliver"): the recipient and the status
 *                       recovered from the text; the engine classifies
 *                       the diagnostic with its one table (classify.h).
 *   FEEDBACK_ARF        an RFC 5965 feedback report (report-type=
 *                       feedback-report): Feedback-Type, Original-Mail-
 *                       From, Original-Rcpt-To, and from the original's
 *                       header section its Message-ID, To, Return-Path and
 *                       sluice's own X-Sluice-* fields.
 *   FEEDBACK_AUTOREPLY  a vacation or other automatic reply (Auto-
 *                       Submitted other than "no", X-Autoreply,
 *                       Precedence: auto_reply, "Out of office" subjects):
 *                       not a bounce, to be ignored.
 *   FEEDBACK_UNKNOWN    anything else.
 *
 * In every kind, the first VERP address (verp_local_prefix, e.g.
 * "bounce-", then a token) found where the original's envelope sender
 * shows (the DSN's or report's Original-Mail-From, the original's
 * Return-Path, To, and the report's own To) is copied to verp_local:
 * verp.h verifies it. The parser never trusts what it finds: the caller
 * decides on a verified token.
 *
 * MIME is walked to FEEDBACK_MIME_DEPTH levels and FEEDBACK_MIME_PARTS
 * parts; a text part is decoded (base64, quoted-printable) into at most
 * FEEDBACK_TEXT_MAX octets; every field is cut to its buffer. Malformed
 * input gives a smaller answer (often UNKNOWN), never a crash: the parser
 * is fuzzed (tests/fuzz/fuzz_feedback_*.c).
 *
 * Threading: pure functions, no global state; any thread. Memory: one
 * scratch allocation per call (the decoded text), freed before return.
 */
#ifndef SLUICE_FEEDBACK_FEEDBACK_H
#define SLUICE_FEEDBACK_FEEDBACK_H

#include <stddef.h>
#include <stdint.h>

#define FEEDBACK_RCPT_MAX   32  /* recipient blocks kept from one DSN */
#define FEEDBACK_MIME_DEPTH 5   /* multipart nesting followed */
#define FEEDBACK_MIME_PARTS 64  /* parts looked at, all levels together */
#define FEEDBACK_TEXT_MAX   (64 * 1024) /* decoded text of a part searched for bounce texts */
/* Octets of a message looked at: the report parts come first, and what
 * follows them is the returned original, whose header section is all
 * that is read of it. A larger message (RET=FULL of a big newsletter) is
 * parsed on its first FEEDBACK_PARSE_MAX octets, so that a hostile one
 * costs a bounded time on the worker. */
#define FEEDBACK_PARSE_MAX  (2 * 1024 * 1024)
#define FEEDBACK_ADDR_MAX   320
#define FEEDBACK_DIAG_MAX   512

enum feedback_kind {
    FEEDBACK_UNKNOWN = 0,
    FEEDBACK_DSN,
    FEEDBACK_BOUNCE,
    FEEDBACK_ARF,
    FEEDBACK_AUTOREPLY,
};

/* "unknown", "dsn", "bounce", "arf", "autoreply". */
const char *feedback_kind_str(enum feedback_kind k);

enum feedback_action {
    FEEDBACK_ACTION_NONE = 0, /* absent or not one of these */
    FEEDBACK_ACTION_FAILED,
    FEEDBACK_ACTION_DELAYED,
    FEEDBACK_ACTION_DELIVERED,
    FEEDBACK_ACTION_RELAYED,
    FEEDBACK_ACTION_EXPANDED,
};

const char *feedback_action_str(enum feedback_action a);

/* One recipient the report is about. Strings are NUL-terminated, cut to
 * their buffers, "" when absent. */
struct feedback_rcpt {
    char addr[FEEDBACK_ADDR_MAX];      /* Final-Recipient's address, without "rfc822;" */
    char orig_addr[FEEDBACK_ADDR_MAX]; /* Original-Recipient's */
    enum feedback_action action;
    char status[16];                   /* "5.1.1": the enhanced status, checked for form */
    unsigned code;                     /* the SMTP reply code in Diagnostic-Code, 0: none */
    char diag[FEEDBACK_DIAG_MAX];      /* Diagnostic-Code's text, without "smtp;" */
    char remote_mta[256];
};

struct feedback_result {
    enum feedback_kind kind;
    /* DSN and BOUNCE: the recipients (a BOUNCE has at most one) */
    struct feedback_rcpt rcpt[FEEDBACK_RCPT_MAX];
    unsigned nrcpt;
    unsigned nrcpt_seen; /* blocks in the report, kept or not */
    char reporting_mta[256];
    char envid[128];     /* Original-Envelope-Id */
    /* the original message (DSN's returned part, ARF's third part) */
    char orig_message_id[256];
    char orig_to[FEEDBACK_ADDR_MAX];
    char orig_subject[256];
    /* VERP: the local part "bounce-<token>" (the prefix as asked) found
     * in the envelope sender of the original, and its domain. */
    char verp_local[128];
    char verp_domain[256];
    /* ARF */
    char feedback_type[32];   /* "abuse", "fraud", ... lowercase */
    char user_agent[128];
    char orig_mail_from[FEEDBACK_ADDR_MAX];
    char orig_rcpt_to[FEEDBACK_ADDR_MAX];
    char source_ip[64];
    char reported_domain[256];
    /* X-Sluice-Id, -Tenant, -Campaign, -Rcpt of the original (unverified:
     * any sender can write them) */
    char sluice_id[64];
    char sluice_tenant[128];
    char sluice_campaign[128];
    char sluice_rcpt[FEEDBACK_ADDR_MAX];
    /* the report's own header section */
    char from[FEEDBACK_ADDR_MAX];
    char subject[256];
    char autoreply_why[32]; /* AUTOREPLY: "auto-submitted", "x-autoreply", ... */
    unsigned mime_parts;    /* parts walked */
    unsigned truncated;     /* a limit was reached (depth, parts, text, recipients) */
};

/*
 * Parse msg[0..len) (a whole message, header section first; CRLF or LF
 * line ends). verp_prefix is the VERP local part's prefix ("bounce-";
 * NULL: none looked for). Fills *out (zeroed first). Returns 0, or -ENOMEM
 * (then *out says UNKNOWN).
 */
int feedback_parse(const char *msg, size_t len, const char *verp_prefix,
                   struct feedback_result *out);

/*
 * Low-level pieces, exposed for tests and for the engine's use on
 * envelope data.
 *
 * The value of header field name in the header section hdr[0..len),
 * unfolded, outer blanks cut, into out (cap octets, NUL-terminated). Only
 * the first occurrence. Returns its length, or -1 when absent.
 */
long feedback_header(const char *hdr, size_t len, const char *name, char *out, size_t cap);

/* The first address found in text (in <...> or bare local@domain), into
 * out. Returns its length, or 0 when none. */
size_t feedback_find_addr(const char *text, size_t len, char *out, size_t cap);

#endif
