/*
 * smtp_cmd: the server side of the SMTP protocol core. Finds command lines
 * in a receive buffer, parses one line into a verb and its arguments (RFC
 * 5321 paths with quoted local parts and address literals, the ESMTP
 * parameters of SIZE, 8BITMIME/BINARYMIME, SMTPUTF8, DSN and AUTH), and
 * formats MAIL/RCPT lines for the client side. Also holds the small types
 * that the whole core shares (struct smtp_span, AUTH mechanism bits).
 *
 * Threading: pure functions over caller-owned memory; no global state, no
 * allocation, no I/O. Any thread may call anything at any time.
 */
#ifndef SLUICE_ENGINE_SMTP_CMD_H
#define SLUICE_ENGINE_SMTP_CMD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A run of bytes inside a caller's buffer; never NUL-terminated.
 * borrowed: lives as long as the buffer it points into. */
struct smtp_span {
    const char *ptr;
    size_t len;
};

/* Line limits, octets including CRLF (RFC 5321 4.5.3.1.4). Extensions
 * raise the command line: DSN adds 100 (ENVID) to MAIL and 500 (ORCPT) to
 * RCPT (RFC 3461 section 5), AUTH= adds 500 to MAIL (RFC 4954 section 5),
 * and an AUTH line with an initial response may reach 12288 (RFC 4954
 * section 4). A session sizes its line buffer for SMTP_CMD_LINE_MAX_AUTH,
 * hands that bound to smtp_cmd_line_find() and lets smtp_cmd_parse() apply
 * the bound of the verb it finds. */
#define SMTP_CMD_LINE_MAX      512
#define SMTP_CMD_LINE_MAX_MAIL (512 + 100 + 500)
#define SMTP_CMD_LINE_MAX_RCPT (512 + 500)
#define SMTP_CMD_LINE_MAX_AUTH 12288
#define SMTP_LOCAL_MAX         64  /* RFC 5321 4.5.3.1.1 */
#define SMTP_DOMAIN_MAX        255 /* RFC 5321 4.5.3.1.2 */
#define SMTP_LABEL_MAX         63  /* RFC 1035 2.3.4 */
#define SMTP_PATH_MAX          256 /* RFC 5321 4.5.3.1.3, with the angle brackets */
#define SMTP_ENVID_MAX         100 /* RFC 3461 4.4 */
#define SMTP_ORCPT_MAX         500 /* RFC 3461 4.2, the whole value */

/*
 * Error codes, the smtp_cmd range of the project's own codes. Beside each,
 * the reply the server should send (smtp_cmd_err_reply() returns it). Where
 * MAIL and RCPT differ, the enhanced code names the sender (X.1.7) or the
 * recipient (X.1.3); [which] is the verb's word.
 */
enum smtp_cmd_err {
    SMTP_CMD_E_LINE_TOO_LONG = -5100,  /* 500 5.5.2 Line too long */
    SMTP_CMD_E_BARE_LF = -5101,        /* 500 5.5.2 Bare LF (then close: smuggling) */
    SMTP_CMD_E_BARE_CR = -5102,        /* 500 5.5.2 Bare CR (then close) */
    SMTP_CMD_E_EMPTY = -5103,          /* 500 5.5.2 Empty command */
    SMTP_CMD_E_UNKNOWN = -5104,        /* 500 5.5.2 Command unrecognized */
    SMTP_CMD_E_BAD_CHAR = -5105,       /* 501 5.5.2 Control character in command */
    SMTP_CMD_E_ARG_MISSING = -5106,    /* 501 5.5.4 Argument required */
    SMTP_CMD_E_ARG_UNEXPECTED = -5107, /* 501 5.5.4 No arguments allowed */
    SMTP_CMD_E_ARG_SYNTAX = -5108,     /* 501 5.5.4 Syntax error in argument (HELO, BDAT, AUTH) */
    SMTP_CMD_E_FROM_TO = -5109,      /* 501 5.5.4 Syntax: MAIL FROM:<address> / RCPT TO:<address> */
    SMTP_CMD_E_PATH_SYNTAX = -5110,  /* 501 5.1.7|5.1.3 Path syntax (angle brackets, trailing) */
    SMTP_CMD_E_ROUTE_SYNTAX = -5111, /* 553 5.1.7|5.1.3 Bad source route */
    SMTP_CMD_E_LOCAL_SYNTAX = -5112, /* 553 5.1.7|5.1.3 Bad local part */
    SMTP_CMD_E_NO_DOMAIN = -5113,    /* 553 5.1.7|5.1.3 Address without @domain */
    SMTP_CMD_E_DOMAIN_SYNTAX = -5114,    /* 553 5.1.7|5.1.3 Bad domain */
    SMTP_CMD_E_LITERAL_SYNTAX = -5115,   /* 553 5.1.7|5.1.3 Bad address literal */
    SMTP_CMD_E_LOCAL_TOO_LONG = -5116,   /* 553 5.1.7|5.1.3 Local part over 64 octets */
    SMTP_CMD_E_DOMAIN_TOO_LONG = -5117,  /* 553 5.1.7|5.1.3 Domain over 255 octets */
    SMTP_CMD_E_LABEL_TOO_LONG = -5118,   /* 553 5.1.7|5.1.3 Domain label over 63 octets */
    SMTP_CMD_E_PATH_TOO_LONG = -5119,    /* 501 5.1.7|5.1.3 Path too long (RFC 5321 4.5.3.1.10) */
    SMTP_CMD_E_NULL_RCPT = -5120,        /* 501 5.1.3 Null recipient <> */
    SMTP_CMD_E_UTF8_NOT_ALLOWED = -5121, /* 553 5.6.7 Non-ASCII address needs SMTPUTF8 */
    SMTP_CMD_E_UTF8_INVALID = -5122,     /* 553 5.1.7|5.1.3 Malformed UTF-8 in address */
    SMTP_CMD_E_PARAM_SYNTAX = -5123,     /* 501 5.5.4 Malformed parameter list */
    SMTP_CMD_E_PARAM_UNKNOWN = -5124, /* 555 5.5.4 Unsupported parameter (err_param says which) */
    SMTP_CMD_E_PARAM_DUP = -5125,     /* 501 5.5.4 Duplicate parameter */
    SMTP_CMD_E_PARAM_VALUE = -5126,   /* 501 5.5.4 Bad parameter value */
    SMTP_CMD_E_NOSPACE = -5127,       /* (formatting only) output buffer too small */
    SMTP_CMD_E_FMT_VALUE = -5128,     /* (formatting only) address or value refused */
    SMTP_CMD_E_PARAM_UNOFFERED = -5129, /* 555 5.5.4 Unsupported option after HELO
                                         * (SMTP_CMD_F_NO_PARAMS) */
};
#define SMTP_CMD_E_FIRST SMTP_CMD_E_PARAM_UNOFFERED
#define SMTP_CMD_E_LAST  SMTP_CMD_E_LINE_TOO_LONG

enum smtp_verb {
    SMTP_VERB_NONE = 0, /* unknown or empty: see the error code */
    SMTP_VERB_HELO,
    SMTP_VERB_EHLO,
    SMTP_VERB_MAIL,
    SMTP_VERB_RCPT,
    SMTP_VERB_DATA,
    SMTP_VERB_BDAT,
    SMTP_VERB_RSET,
    SMTP_VERB_NOOP,
    SMTP_VERB_QUIT,
    SMTP_VERB_VRFY,
    SMTP_VERB_EXPN,
    SMTP_VERB_HELP,
    SMTP_VERB_STARTTLS,
    SMTP_VERB_AUTH,
};

/* SASL mechanisms, as bits: the server's AUTH command names one, an EHLO
 * AUTH line lists several. */
enum smtp_auth_mech {
    SMTP_AUTH_PLAIN = 1u << 0,
    SMTP_AUTH_LOGIN = 1u << 1,
    SMTP_AUTH_CRAM_MD5 = 1u << 2,
    SMTP_AUTH_DIGEST_MD5 = 1u << 3,
    SMTP_AUTH_XOAUTH2 = 1u << 4,
    SMTP_AUTH_OAUTHBEARER = 1u << 5,
    SMTP_AUTH_SCRAM_SHA_1 = 1u << 6,
    SMTP_AUTH_SCRAM_SHA_256 = 1u << 7,
    SMTP_AUTH_EXTERNAL = 1u << 8,
    SMTP_AUTH_GSSAPI = 1u << 9,
    SMTP_AUTH_NTLM = 1u << 10,
    SMTP_AUTH_ANONYMOUS = 1u << 11,
};

enum smtp_body { SMTP_BODY_NONE = 0, SMTP_BODY_7BIT, SMTP_BODY_8BITMIME, SMTP_BODY_BINARYMIME };
enum smtp_ret { SMTP_RET_NONE = 0, SMTP_RET_FULL, SMTP_RET_HDRS };

/* smtp_params.seen: which parameters the command carried. */
enum smtp_param {
    SMTP_PARAM_SIZE = 1u << 0,
    SMTP_PARAM_BODY = 1u << 1,
    SMTP_PARAM_SMTPUTF8 = 1u << 2,
    SMTP_PARAM_RET = 1u << 3,
    SMTP_PARAM_ENVID = 1u << 4,
    SMTP_PARAM_AUTH = 1u << 5,
    SMTP_PARAM_NOTIFY = 1u << 6,
    SMTP_PARAM_ORCPT = 1u << 7,
};

/* smtp_params.notify. NEVER excludes the others. */
enum smtp_notify {
    SMTP_NOTIFY_NEVER = 1u << 0,
    SMTP_NOTIFY_SUCCESS = 1u << 1,
    SMTP_NOTIFY_FAILURE = 1u << 2,
    SMTP_NOTIFY_DELAY = 1u << 3,
};

/* ESMTP parameters of MAIL (SIZE BODY SMTPUTF8 RET ENVID AUTH) and RCPT
 * (NOTIFY ORCPT). The parser knows the syntax of each; whether this server
 * offers the extension (e.g. refusing RET= without DSN) is the session's
 * call, from seen. xtext values stay encoded, exactly as on the wire, so
 * the relay can hand them on; smtp_xtext_decode() gives the text. */
struct smtp_params {
    uint32_t seen;               /* enum smtp_param bits */
    uint64_t size;               /* SIZE=; saturates at UINT64_MAX (20 digits) */
    enum smtp_body body;         /* BODY= */
    enum smtp_ret ret;           /* RET= */
    uint32_t notify;             /* NOTIFY=, enum smtp_notify bits */
    struct smtp_span envid;      /* ENVID= xtext */
    struct smtp_span auth;       /* AUTH= xtext, or "<>" */
    struct smtp_span orcpt_type; /* ORCPT= addr-type ("rfc822", "utf-8") */
    struct smtp_span orcpt_addr; /* ORCPT= value after the ';' */
};

/* smtp_path.flags */
enum smtp_path_flag {
    SMTP_PATH_NULL = 1u << 0,       /* <>: the null reverse path */
    SMTP_PATH_QUOTED = 1u << 1,     /* quoted local part */
    SMTP_PATH_LIT_IPV4 = 1u << 2,   /* domain is [1.2.3.4] */
    SMTP_PATH_LIT_IPV6 = 1u << 3,   /* domain is [IPv6:...] */
    SMTP_PATH_LIT_OTHER = 1u << 4,  /* domain is [tag:content] */
    SMTP_PATH_UTF8 = 1u << 5,       /* non-ASCII octets in the mailbox */
    SMTP_PATH_POSTMASTER = 1u << 6, /* RCPT TO:<Postmaster>, no domain */
    SMTP_PATH_ROUTE = 1u << 7,      /* a source route was given (and is ignored) */
    SMTP_PATH_DOTS = 1u << 8,       /* unquoted local part with dots leading, trailing
                                       or doubled: sent quoted, counted with the quotes */
    SMTP_PATH_ROOT_DOT = 1u << 9,   /* domain written with one trailing dot (a@example.com.):
                                       mailbox and domain leave it out */
};

/* A path as written inside <...>. Spans point into the parsed line. A
 * domain's one trailing dot, the DNS root, is not in mailbox or domain
 * (SMTP_PATH_ROOT_DOT): it names the same domain, as Postfix's
 * trivial-rewrite has it, and nothing after the parser sees it. */
struct smtp_path {
    struct smtp_span mailbox; /* local@domain, no brackets, no route; empty for <> */
    struct smtp_span local;   /* as written: a quoted local part keeps its quotes */
    struct smtp_span domain;  /* a literal keeps its brackets; empty for <Postmaster> */
    struct smtp_span route;   /* "@a,@b" (RFC 5321 3.3: accepted, ignored) */
    uint32_t flags;           /* enum smtp_path_flag */
};

/* One parsed command. Every span is borrowed from the line handed to
 * smtp_cmd_parse() and lives as long as that line. Only the fields of the
 * parsed verb are meaningful; the others are zero. */
struct smtp_cmd {
    enum smtp_verb verb;
    struct smtp_span arg;       /* all after "VERB ": HELO/EHLO domain, VRFY/EXPN/HELP/NOOP text */
    struct smtp_path path;      /* MAIL, RCPT */
    struct smtp_params params;  /* MAIL, RCPT */
    uint64_t bdat_size;         /* BDAT */
    bool bdat_last;             /* BDAT ... LAST */
    bool helo_literal;          /* HELO/EHLO argument is an address literal */
    bool helo_valid;            /* HELO/EHLO argument is a valid domain or address literal */
    uint32_t auth_mech;         /* AUTH: enum smtp_auth_mech bit, 0 if not one we know */
    struct smtp_span auth_name; /* AUTH: the mechanism as written */
    struct smtp_span auth_ir;   /* AUTH: initial response ("=" for an empty one), may be empty */
    /* On error: where in the line the parser stopped, and for parameter
     * errors the keyword at fault (for "555 5.5.4 Unsupported option: X"). */
    size_t err_off;
    struct smtp_span err_param;
};

/* smtp_cmd_parse() flags */
enum smtp_cmd_flag {
    /* The transaction is SMTPUTF8 (its MAIL carried SMTPUTF8): RCPT may
     * then use UTF-8 addresses. MAIL decides from its own parameters. */
    SMTP_CMD_F_UTF8 = 1u << 0,
    /* No ESMTP extension was offered (the session greeted with HELO): a
     * MAIL or RCPT with parameters is SMTP_CMD_E_PARAM_UNOFFERED, their
     * values left unread (a bad value is no reason to say otherwise);
     * params.seen names the known keywords given, err_param the first
     * unknown one (empty when none). The list's syntax is checked as
     * always. */
    SMTP_CMD_F_NO_PARAMS = 1u << 1,
};

/*
 * Find the end of the next line in buf. Lines end with CRLF and nothing
 * else: a LF without CR before it, or a CR followed by anything but LF, is
 * an error the server must refuse (SMTP smuggling). max is the longest
 * line accepted, CRLF included (SMTP_CMD_LINE_MAX_AUTH for commands).
 * Returns the length of the line with its CRLF (> 0) when one is complete,
 * 0 when buf holds no complete line yet and no error, or SMTP_CMD_E_BARE_LF,
 * SMTP_CMD_E_BARE_CR, SMTP_CMD_E_LINE_TOO_LONG. On an error *err_off (may
 * be NULL) is the offset of the offending byte or of the limit.
 */
long smtp_cmd_line_find(const char *buf, size_t len, size_t max, size_t *err_off);

/*
 * Parse one command line, without its CRLF. flags: enum smtp_cmd_flag.
 * Returns 0 with cmd filled, or a negative enum smtp_cmd_err with
 * cmd->verb set when the verb was recognised and cmd->err_off (and
 * err_param for parameter errors) saying where. The line must stay
 * unchanged while cmd's spans are used.
 */
int smtp_cmd_parse(const char *line, size_t len, uint32_t flags, struct smtp_cmd *cmd);

/* Text for an error code (any smtp_cmd code; "unknown error" otherwise). */
const char *smtp_cmd_err_str(int err);
/* The reply recommended for err after a command of this verb, without
 * CRLF, e.g. "553 5.1.3 Bad recipient address syntax". Static storage. */
const char *smtp_cmd_err_reply(int err, enum smtp_verb verb);
/* "MAIL", "RCPT", ...; "?" for SMTP_VERB_NONE. */
const char *smtp_verb_str(enum smtp_verb verb);
/* "SIZE", "NOTIFY", ...: the keyword of one enum smtp_param bit; "?" for
 * anything else. */
const char *smtp_param_str(uint32_t param);

/* The enum smtp_auth_mech bit of a mechanism name (case-insensitive),
 * 0 when not one of ours. */
uint32_t smtp_auth_mech_parse(const char *name, size_t len);
/* "PLAIN", "LOGIN", ... for one bit; NULL for anything else. */
const char *smtp_auth_mech_str(uint32_t mech);

/*
 * One local part, one form: the form it is sent in. A quoted local part
 * that needs no quoting ("john", "jo\hn") is the same mailbox as its
 * dot-string (RFC 5321 4.1.2, 4.1.4: john), and an unquoted one that is
 * no dot-string (john., .john, jo..hn, taken as Postfix takes them) is
 * the same as its quoted string ("john."). That form is written to buf
 * (SMTP_LOCAL_MAX octets, no NUL) and *out points at it; any other local
 * part is left as it is (*out = local). Returns the length of *out.
 */
size_t smtp_local_canon(const char *local, size_t len, char *buf, const char **out);

/*
 * Check a mailbox (local@domain, or empty for the null path) the way
 * smtp_cmd_parse() checks a path's content, but for a trailing dot after
 * the domain: a mailbox here is one the parser gave (or one as stored),
 * which has none, and one with it is SMTP_CMD_E_DOMAIN_SYNTAX. utf8:
 * non-ASCII is allowed. Returns 0 or an address error code
 * (SMTP_CMD_E_LOCAL_SYNTAX ...).
 */
int smtp_mailbox_check(const char *addr, size_t len, bool utf8);

/*
 * Format "MAIL FROM:<addr> params\r\n" or "RCPT TO:<addr> params\r\n" into
 * out (cap octets). The parameters emitted are those in p->seen (p may be
 * NULL): MAIL takes SIZE BODY SMTPUTF8 RET ENVID AUTH, RCPT takes NOTIFY
 * ORCPT; xtext values are written as they are (already encoded, as parsed;
 * see smtp_xtext_encode()). addr is checked with smtp_mailbox_check() and
 * values for what their parameter allows, so that nothing from the queue
 * can inject a command. For RCPT, utf8 says whether the transaction is
 * SMTPUTF8 (MAIL decides from p). Returns the line length (> 0, CRLF
 * included; no NUL written), SMTP_CMD_E_NOSPACE, or SMTP_CMD_E_FMT_VALUE
 * (or the address error code).
 */
int smtp_fmt_mail(char *out, size_t cap, const char *addr, size_t addr_len,
                  const struct smtp_params *p);
int smtp_fmt_rcpt(char *out, size_t cap, const char *addr, size_t addr_len,
                  const struct smtp_params *p, bool utf8);

/* xtext (RFC 3461 4): encode in into out, '+' and '=' and bytes outside
 * 33..126 as "+XX". Returns the encoded length or SMTP_CMD_E_NOSPACE. */
long smtp_xtext_encode(const char *in, size_t len, char *out, size_t cap);
/* Decode xtext. Returns the decoded length, SMTP_CMD_E_PARAM_VALUE for
 * malformed xtext, or SMTP_CMD_E_NOSPACE. out may equal in. */
long smtp_xtext_decode(const char *in, size_t len, char *out, size_t cap);

#endif
