/*
 * classify: the one place that names why a recipient was not delivered.
 * Every transient or permanent failure gets exactly one enum bounce_class,
 * which the delivery log, the DSN and the adaptive rate backoff use.
 *
 * Where the failure came from decides first: a DNS, TLS, connection,
 * protocol or expiry failure maps straight to its class. A reply from the
 * remote server goes through one ordered table of rules, first match wins:
 * the operator's rules (from the config, in the order added), then the
 * built-in ones. Each rule is a class and one matcher:
 *
 *   enh:C.S.D   the enhanced status code; C, S or D may be "*". A "*"
 *               subject never matches subject 0: X.0.0 is the generic
 *               code and says nothing about the cause.
 *   code:NNN    the basic reply code.
 *   text:REGEX  POSIX extended regex, case-insensitive, searched in the
 *               first CLASSIFY_TEXT_MAX octets of the reply text.
 *
 * The built-in table puts the enhanced-code rules first, so the code
 * decides before the text: "550 5.7.1 rate limited" is policy (5.7.x),
 * not rate_limited, unless an operator rule (say text:rate.?limit) says
 * otherwise. Text rules decide when no code rule matched: no enhanced
 * code, the generic X.0.0, or a code the table does not list. Last come
 * a few fallbacks: enh:*.3.2 (other: "not accepting messages", mostly a
 * receiver going down; load says so in its text, which decides first),
 * code:421 (rate_limited), enh:4.7.* (policy: temporary
 * policy codes are so often throttling that their text decides first)
 * and enh:*.4.* (connection_failure). Nothing matched: other.
 * classify_print_rules() writes the table for the README.
 *
 * Threading: a table is built on one thread (classify_new(), then
 * classify_add_rule() while the config loads) and is immutable after
 * that: classify() and classify_print_rules() may run on any number of
 * threads at once (regexec() is thread-safe).
 */
#ifndef SLUICE_ENGINE_CLASSIFY_H
#define SLUICE_ENGINE_CLASSIFY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "engine/smtp_reply.h"

/* Octets of reply text that text rules see; the reply parser keeps no more. */
#define CLASSIFY_TEXT_MAX SMTP_REPLY_TEXT_MAX

/* 0 is "other" so that a zeroed struct never claims a cause. */
enum bounce_class {
    BOUNCE_OTHER = 0,
    BOUNCE_INVALID_RECIPIENT,
    BOUNCE_MAILBOX_FULL,
    BOUNCE_MESSAGE_TOO_LARGE,
    BOUNCE_POLICY, /* policy or spam block: content, auth/SPF/DKIM/DMARC, blocklist */
    BOUNCE_RATE_LIMITED,
    BOUNCE_DNS_FAILURE,
    BOUNCE_TLS_FAILURE,
    BOUNCE_CONNECTION_FAILURE, /* refused, timed out, closed */
    BOUNCE_EXPIRED,            /* max_age reached */
    BOUNCE_REFUSED_TARGET,     /* MX addresses sluice will not deliver to (loopback, ...) */
    BOUNCE_TLS_POLICY,         /* a published TLS policy (MTA-STS enforce) refused the MX */
    BOUNCE_CLASS_COUNT
};

/* Where a failure came from. Only CLASSIFY_REPLY consults the rules. */
enum classify_source {
    CLASSIFY_REPLY,    /* a 4xx/5xx reply from the remote server */
    CLASSIFY_DNS,      /* -> dns_failure */
    CLASSIFY_TLS,      /* -> tls_failure */
    CLASSIFY_CONNECT,  /* refused, timeout, EOF -> connection_failure */
    CLASSIFY_PROTOCOL, /* the server broke the protocol -> other */
    CLASSIFY_EXPIRED,  /* -> expired */
    CLASSIFY_TARGET,   /* an address refused as a delivery target -> refused_target */
    CLASSIFY_TLS_POLICY, /* MTA-STS enforce: no MX matches, or TLS did not verify -> tls_policy */
    CLASSIFY_OPERATOR,   /* an operator's or a shaping action's bounce -> other: no server's
                          * reply, whatever the last one quoted in its text says */
};

struct classify;

/* "invalid_recipient", ...; "other" for a value out of range. */
const char *bounce_class_str(enum bounce_class c);
/* Name (case-insensitive) to class. Returns 0 or -EINVAL. */
int bounce_class_parse(const char *s, enum bounce_class *out);

/* A table with no operator rules yet, on the built-in ones. Those are
 * compiled at the first call and shared by every table of the process
 * (never freed: a table costs its operator rules only, so a config kept
 * after a reload stays small). Returns NULL when out of memory. Free
 * with classify_free(). */
struct classify *classify_new(void);
/* Returns NULL. NULL is fine. */
struct classify *classify_free(struct classify *c);

/*
 * Add an operator rule: category is a bounce_class name, matcher one of
 * the forms above. Operator rules are tried before every built-in rule,
 * in the order added. Returns 0, -EINVAL with a one-line reason in err
 * (when err is not NULL), or -ENOMEM.
 */
int classify_add_rule(struct classify *c, const char *category, const char *matcher, char *err,
                      size_t errlen);

/*
 * Class of one failure. code is the basic reply code (0: none), enh the
 * enhanced code (NULL or cls 0: none), text the reply text (NULL: none;
 * any length, only the first CLASSIFY_TEXT_MAX octets are matched). c may
 * be NULL: then a reply is always "other".
 */
enum bounce_class classify(const struct classify *c, enum classify_source src, unsigned code,
                           const struct smtp_enh *enh, const char *text);

/*
 * Does a refusal speak of our sender rather than of its recipient? The
 * enhanced code X.1.7 or X.1.8, or a text that says so ("Sender address
 * rejected", "Sender verify failed", "in reply to MAIL FROM command",
 * ...; the first CLASSIFY_TEXT_MAX octets). Whatever classify() says: a
 * sender refusal worded "550 5.1.0 ... User unknown" is invalid_recipient
 * by its code and text, yet nothing is known of the recipient, which
 * must not go on the suppression list for it. c NULL: the code only.
 */
bool classify_sender_refused(const struct classify *c, const struct smtp_enh *enh,
                             const char *text);

/* Do a and b hold the same operator rules ([classify]), in the same
 * order? (The built-in ones are the process's, the same in both.) */
bool classify_same(const struct classify *a, const struct classify *b);

/* The rules in the order they are tried, as a Markdown table (order,
 * matcher, class, why), so that the README cannot drift from the code. */
void classify_print_rules(const struct classify *c, FILE *out);

#endif
