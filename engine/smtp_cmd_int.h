/*
 * smtp_cmd_int.h: what smtp_cmd.c (framing, commands, names, xtext,
 * formatting) and smtp_cmd_args.c (the grammar of paths, mailboxes and
 * ESMTP parameters) share: the character classes and a few helpers over
 * them, and the argument parsers the commands and the formatter call.
 * Not a public header: only those two files include it.
 *
 * Threading: pure functions, no global state beyond constant tables.
 */
#ifndef SLUICE_ENGINE_SMTP_CMD_INT_H
#define SLUICE_ENGINE_SMTP_CMD_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/smtp_cmd.h"

/* Character classes of the ASCII range; bytes >= 0x80 are none of these
 * and are handled as UTF-8 where the grammar allows it. The table is
 * checked against the RFC definitions by tests/smtp/test_smtp_cmd.c. */
enum {
    C_ATEXT = 1 << 0,  /* RFC 5322 atext */
    C_LETDIG = 1 << 1, /* ALPHA / DIGIT */
    C_LDH = 1 << 2,    /* ALPHA / DIGIT / "-" (also esmtp-keyword) */
    C_QTEXT = 1 << 3,  /* qtextSMTP: 32-33, 35-91, 93-126 */
    C_DCONT = 1 << 4,  /* dcontent: 33-90, 94-126 */
    C_XCHAR = 1 << 5,  /* xtext xchar: 33-126 but "+" and "=" */
    C_VALUE = 1 << 6,  /* esmtp-value: 33-60, 62-126 */
    C_DIGIT = 1 << 7,
    C_B64 = 1 << 8,   /* base64 alphabet without the "=" pad */
    C_MECH = 1 << 9,  /* SASL mech-char (either case) */
    C_HEXU = 1 << 10, /* xtext hexchar digits: 0-9 A-F */
    C_CTL = 1 << 11,  /* controls but HT */
};

/* The class bits of each octet of the ASCII range (smtp_cmd.c). */
extern const uint16_t smtp_cclass[256];

static inline unsigned
cc(const char *p)
{
    return smtp_cclass[(unsigned char)*p];
}

static inline bool
is8(const char *p)
{
    return (unsigned char)*p >= 0x80;
}

static inline int
lower(int c)
{
    return c >= 'A' && c <= 'Z' ? c + 32 : c;
}

/* Case-insensitive compare of s[0..n) with a lowercase literal. */
static inline bool
eq_nocase(const char *s, size_t n, const char *lit)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (lit[i] == '\0' || lower((unsigned char)s[i]) != lit[i])
            return false;
    }
    return lit[n] == '\0';
}

static inline struct smtp_span
span(const char *b, const char *e)
{
    struct smtp_span s = {b, (size_t)(e - b)};
    return s;
}

/* ---- smtp_cmd_args.c ---- */

/* A mailbox as parsed: where its local part ends, its domain, and the
 * SMTP_PATH_* flags it earned. borrowed: points into the parsed text. */
struct mbox {
    const char *local_end;
    const char *dom;
    const char *dom_end;
    uint32_t flags;
};

/* "[" ... "]" at p. Returns 0 and *next after "]" or an error code. */
int smtp_parse_literal(const char *p, const char *end, const char **next, uint32_t *flags);
/* Domain at p (U-labels and "_" taken): 0 or an error, *next where it
 * stopped (the first octet that cannot continue it). */
int smtp_parse_domain(const char *p, const char *end, const char **next, uint32_t *flags);
/* smtp_mailbox_check(), with the parsed mailbox in *m. */
int smtp_mbox_check(const char *addr, size_t len, bool utf8, struct mbox *m);
/* Path at p (which is "<"): "<>" (when allowed), or "<" [A-d-l ":"]
 * Mailbox ">". On return *next is after ">" or at the fault. */
int smtp_parse_path(const char *p, const char *end, bool rcpt, struct smtp_path *path,
                    const char **next);
/* A path without its angle brackets, to the end of the line or a space;
 * no null path, no source route. *next as for smtp_parse_path(). */
int smtp_parse_bare_path(const char *p, const char *end, bool rcpt, struct smtp_path *path,
                         const char **next);
/* Is p..end well-formed xtext (RFC 3461 4)? */
bool smtp_xtext_valid(const char *p, const char *end);
/* ORCPT=addr-type;value, checked (into params): 0, or -1 when malformed. */
int smtp_orcpt_check(const char *p, const char *end, bool utf8, struct smtp_params *params);
/* Decimal digits p..end, at most max_digits, into *out (saturate: one too
 * large for 64 bits is UINT64_MAX, else refused): false when not a number. */
bool smtp_parse_u64(const char *p, const char *end, size_t max_digits, bool saturate,
                    uint64_t *out);
/* [SP esmtp-param *(SP esmtp-param)] from p to end into cmd (none: no
 * parameter is offered, SMTP_CMD_F_NO_PARAMS): 0 or an error. */
int smtp_parse_params(const char *line, const char *p, const char *end, bool rcpt, bool utf8,
                      bool none, struct smtp_cmd *cmd);

#endif
