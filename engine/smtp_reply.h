/*
 * smtp_reply: the client side of the SMTP protocol core. An incremental
 * reply parser (bytes in at any read boundary, complete replies out, all
 * state in a fixed-size struct), RFC 3463 enhanced status codes, and the
 * EHLO capabilities of a 250 reply.
 *
 * Strict on the grammar, lenient on length: a reply that breaks RFC 5321
 * 4.2 (code, separator, CRLF, NUL) is an error, never a guess, and the
 * parser stays in error until smtp_reply_parser_init(): the session
 * closes the connection. A reply longer than what is kept (a line over
 * SMTP_REPLY_LINE_MAX, more than SMTP_REPLY_LINES_MAX lines, more than
 * SMTP_REPLY_TEXT_MAX octets of text) is returned with its code and its
 * text cut (truncated set), as Postfix's smtp client reads one: the code
 * is the server's word, and a 250 to the final dot that says too much is
 * still a delivery (an error there sent the message again at every
 * retry). Only a reply over SMTP_REPLY_RAW_MAX octets in all is an error.
 *
 * Threading: pure functions; a parser belongs to one session at a time.
 */
#ifndef SLUICE_ENGINE_SMTP_REPLY_H
#define SLUICE_ENGINE_SMTP_REPLY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/smtp_cmd.h"

#define SMTP_REPLY_LINE_MAX  512   /* octets with CRLF kept of a line (RFC 5321 4.5.3.1.5) */
#define SMTP_REPLY_LINES_MAX 100   /* lines kept of one reply */
#define SMTP_REPLY_TEXT_MAX  4096  /* octets of text kept, separators included */
#define SMTP_REPLY_RAW_MAX   65536 /* octets of one reply, CRLFs included, read at most */

enum smtp_reply_err {
    SMTP_REPLY_E_CODE = -5200,         /* not three digits [2-5][0-5][0-9] */
    SMTP_REPLY_E_SEPARATOR = -5201,    /* fourth octet neither '-' nor ' ' */
    SMTP_REPLY_E_CODE_CHANGED = -5202, /* a line of a multiline reply changed the code */
    SMTP_REPLY_E_TOO_LONG = -5203,     /* reply over SMTP_REPLY_RAW_MAX octets */
    SMTP_REPLY_E_BARE_LF = -5204,      /* LF without CR */
    SMTP_REPLY_E_BARE_CR = -5205,      /* CR not followed by LF */
    SMTP_REPLY_E_NUL = -5206,          /* NUL octet */
    SMTP_REPLY_E_NOT_EHLO = -5207,     /* smtp_reply_ehlo() on a reply other than 250 */
};

/* smtp_reply_parse() results besides errors. */
enum { SMTP_REPLY_MORE = 0, SMTP_REPLY_DONE = 1 };

/* RFC 3463 class.subject.detail; cls 0 when the reply carried none. */
struct smtp_enh {
    uint8_t cls;
    uint16_t subject;
    uint16_t detail;
};

/* One complete reply. The text of each line (after "250-" / "250 ") is
 * kept as sent, the enhanced code included, lines joined by '\n' and the
 * whole NUL-terminated. Line i starts at text + line_off[i] and runs to the
 * next '\n' (or the end). Truncated: a line's text cut at
 * SMTP_REPLY_LINE_MAX - 6 octets, lines after the SMTP_REPLY_LINES_MAX-th
 * or after the text filled SMTP_REPLY_TEXT_MAX left out (their codes were
 * checked all the same). */
struct smtp_reply {
    uint16_t code;
    uint16_t nlines;
    uint16_t text_len;
    uint8_t enh_len; /* octets of "X.Y.Z " opening line 0's text when enh.cls != 0 */
    bool truncated;  /* the server said more than is kept */
    uint8_t cut[(SMTP_REPLY_LINES_MAX + 7) / 8]; /* bit i: line i's text was cut */
    struct smtp_enh enh;
    uint16_t line_off[SMTP_REPLY_LINES_MAX];
    char text[SMTP_REPLY_TEXT_MAX + 1]; /* and the '\n' or NUL after what is kept */
};

struct smtp_reply_parser {
    int err;        /* sticky: 0 or the first error */
    bool done;      /* reply holds a complete reply; the next call starts anew */
    bool cr;        /* the last octet of the current line was CR */
    uint32_t lpos;  /* octets of the current line so far, LF excluded */
    uint32_t raw;   /* octets of the current reply so far, its LFs included */
    uint16_t lkept; /* octets of the current line's text stored (its CR, if room) */
    uint16_t ls;    /* where the current line's text starts in reply.text */
    char head[4];   /* code and separator of the current line */
    struct smtp_reply reply;
};

void smtp_reply_parser_init(struct smtp_reply_parser *p);
/* Between replies: nothing of a reply received but not yet returned, so
 * the parser may be re-initialised (or its memory reused) losing nothing. */
bool smtp_reply_parser_idle(const struct smtp_reply_parser *p);

/*
 * Feed bytes. Consumes input up to the end of one reply at most and sets
 * *used (the rest belongs to the next reply: call again with it). Returns
 * SMTP_REPLY_DONE when p->reply holds a complete reply (valid until the
 * next call), SMTP_REPLY_MORE when all of buf was consumed without
 * completing one, or a negative enum smtp_reply_err, also for every later
 * call until smtp_reply_parser_init().
 */
int smtp_reply_parse(struct smtp_reply_parser *p, const char *buf, size_t len, size_t *used);

/* Text of line i (without CRLF, with any enhanced code). Returns 0 or
 * -1 when i >= nlines. */
int smtp_reply_line(const struct smtp_reply *r, unsigned i, struct smtp_span *text);
/* Was line i's text cut (longer than a line keeps, or where the reply's
 * text filled)? */
bool smtp_reply_line_cut(const struct smtp_reply *r, unsigned i);

/* Text for an error code of this module. */
const char *smtp_reply_err_str(int err);

/* EHLO extensions (struct smtp_ehlo.ext bits) */
enum smtp_ext {
    SMTP_EXT_PIPELINING = 1u << 0,
    SMTP_EXT_SIZE = 1u << 1,
    SMTP_EXT_STARTTLS = 1u << 2,
    SMTP_EXT_8BITMIME = 1u << 3,
    SMTP_EXT_SMTPUTF8 = 1u << 4,
    SMTP_EXT_CHUNKING = 1u << 5,
    SMTP_EXT_BINARYMIME = 1u << 6,
    SMTP_EXT_ENHANCEDSTATUSCODES = 1u << 7,
    SMTP_EXT_DSN = 1u << 8,
    SMTP_EXT_AUTH = 1u << 9,
    SMTP_EXT_REQUIRETLS = 1u << 10,
    SMTP_EXT_LIMITS = 1u << 11,
};

struct smtp_ehlo {
    uint32_t ext;      /* enum smtp_ext */
    uint64_t size_max; /* SIZE n; 0 when no limit was given */
    uint32_t auth;     /* enum smtp_auth_mech bits from AUTH (and the old AUTH=) lines */
    uint32_t rcpt_max; /* LIMITS RCPTMAX= (RFC 9422); 0 when not given */
    uint32_t mail_max; /* LIMITS MAILMAX=; 0 when not given */
};

/*
 * Capabilities of an EHLO reply (code 250; line 0 is the greeting).
 * Keywords are case-insensitive; unknown ones are skipped, and so is a
 * known one whose parameter does not parse (a SIZE with a non-number is
 * taken as no SIZE at all, never as a guess), and a line whose text was
 * cut (a SIZE cut short would be a smaller limit than the server's).
 * Lines the reply did not keep (past SMTP_REPLY_LINES_MAX, or once its
 * text filled) are not seen. Returns 0 or SMTP_REPLY_E_NOT_EHLO.
 */
int smtp_reply_ehlo(const struct smtp_reply *r, struct smtp_ehlo *caps);

#endif
