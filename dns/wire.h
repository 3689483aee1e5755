/*
 * wire: a small, bounded reader of DNS messages (RFC 1035), internal to
 * dns/. c-ares's own parsers drop what delivery needs (TTLs of MX
 * records, the SOA of a negative answer, the additional section), so
 * answers are read here: names with compression (pointers must go back,
 * so a message cannot loop, and a name follows at most 128 of them, so a
 * message cannot make one name cost thousands of steps), records of
 * every section, and the analysis
 * of one answer (follow the CNAME chain from the question to the records
 * of the type asked), the AD bit, and TLSA records (RFC 6698) for DANE.
 *
 * Every read is checked against the message length; a malformed message
 * is -EBADMSG, never a crash. Names come out lowercased, dot-separated,
 * without the trailing dot ("" is the root); a byte outside letters,
 * digits, '-' and '_' becomes '?' and marks the name as no host name.
 *
 * Threading: pure functions.
 */
#ifndef SLUICE_DNS_WIRE_H
#define SLUICE_DNS_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define WIRE_NAME_MAX  253 /* presentation characters, without the NUL */
#define WIRE_MAX_RR    512 /* records read per message; the rest is ignored */
#define WIRE_MAX_MX    64  /* MX records kept per answer: the most preferred */
#define WIRE_MAX_ADDR  16  /* addresses kept per name and family */
#define WIRE_MAX_CHAIN 8   /* CNAMEs followed per answer */

enum wire_type {
    WIRE_T_A = 1,
    WIRE_T_NS = 2,
    WIRE_T_CNAME = 5,
    WIRE_T_SOA = 6,
    WIRE_T_MX = 15,
    WIRE_T_TXT = 16,
    WIRE_T_AAAA = 28,
    WIRE_T_TLSA = 52,
};

enum wire_rcode {
    WIRE_NOERROR = 0,
    WIRE_FORMERR = 1,
    WIRE_SERVFAIL = 2,
    WIRE_NXDOMAIN = 3,
    WIRE_NOTIMP = 4,
    WIRE_REFUSED = 5,
};

enum wire_section { WIRE_SEC_ANSWER, WIRE_SEC_AUTHORITY, WIRE_SEC_ADDITIONAL };

struct wire_msg {
    const uint8_t *buf; /* borrowed: the message, for as long as the reader is used */
    size_t len;
    unsigned rcode;
    bool tc;
    bool ad; /* the server says it validated the answer (RFC 4035 3.2.3) */
    unsigned count[3]; /* records per section */
    size_t first;      /* offset of the answer section */
    size_t pos;        /* iterator */
    unsigned sec, idx, seen;
};

struct wire_rr {
    enum wire_section section;
    uint16_t type, cls;
    uint32_t ttl; /* RFC 2181 8: a TTL with the top bit set reads as 0 */
    uint16_t rdlen;
    size_t rdoff;
    bool owner_ok;
    char owner[WIRE_NAME_MAX + 1];
};

/* Read the header and skip the questions. Returns 0 or -EBADMSG. */
int wire_open(struct wire_msg *m, const uint8_t *buf, size_t len);
/* Restart the record iterator at the answer section. */
void wire_rewind(struct wire_msg *m);
/* The next record, in section order. Returns 1, 0 at the end (or after
 * WIRE_MAX_RR records), or -EBADMSG. */
int wire_next(struct wire_msg *m, struct wire_rr *rr);
/* The name at off. *ok: every label is a host-name label; *after: the
 * offset just past the name where it was found. Returns 0 or -EBADMSG. */
int wire_name(const uint8_t *buf, size_t len, size_t off, char out[WIRE_NAME_MAX + 1], bool *ok,
              size_t *after);

struct wire_mx {
    uint16_t preference;
    bool ok; /* host is a usable host name (LDH labels, not an address, not the root) */
    char host[WIRE_NAME_MAX + 1];
};

/* What an answer says about (qname, qtype). */
struct wire_answer {
    unsigned rcode;
    bool ad;                         /* the AD bit of the message */
    unsigned chain;                  /* CNAMEs followed from qname */
    bool chain_bad;                  /* a CNAME chain longer than WIRE_MAX_CHAIN or to a bad name */
    char final[WIRE_NAME_MAX + 1];   /* where the chain ended */
    uint32_t ttl;                    /* min TTL of the chain and the records found */
    bool soa;                        /* the authority section had an SOA */
    uint32_t neg_ttl;                /* then min(its TTL, its MINIMUM) (RFC 2308 5) */
    /* NOERROR, no record of qtype at final, and NS records but no SOA in
     * the authority section: a referral (RFC 2308 2.2: what a server that
     * does not recurse answers for a zone it does not serve), no word on
     * whether the records exist */
    bool referral;
    unsigned n;                      /* records of qtype found at final (n <= the caps) */
    struct wire_mx mx[WIRE_MAX_MX];  /* qtype MX */
    uint8_t addr[WIRE_MAX_ADDR][16]; /* qtype A (4 bytes used) or AAAA */
};

/* Read the answer to (qname, qtype): follow CNAMEs in the answer section
 * from qname, collect the records of qtype there, and the negative TTL
 * (or a referral) from the authority section. qname must be normalised. Returns 0,
 * -EBADMSG or, for qtype MX, -E2BIG (more answer records than
 * WIRE_MAX_RR: the most preferred hosts may be among those unread). */
int wire_answer(const uint8_t *buf, size_t len, const char *qname, uint16_t qtype,
                struct wire_answer *a);

/* One TLSA record (RFC 6698 2.1), its data pointing into the message. */
struct wire_tlsa {
    uint8_t usage, selector, mtype;
    uint16_t len;        /* 0: no association data, a record no one can use */
    const uint8_t *data; /* borrowed: points into the message */
};

/* The TLSA records at name (the end of wire_answer's chain) in the answer
 * section: at most max copied to out, *ttl lowered to theirs. A record
 * with less than 3 octets of rdata is malformed (-EBADMSG); one of 3 (no
 * association data) is kept with len 0, an unusable record among the
 * others (RFC 7672 2.2: it does not spoil the RRset, and an RRset of
 * only unusable records still asks for TLS). Records past max are
 * skipped. Returns the count or -EBADMSG. */
int wire_tlsa(const uint8_t *buf, size_t len, const char *name, struct wire_tlsa *out,
              unsigned max, uint32_t *ttl);

/* The TXT records (RFC 1035 3.3.14) at name (the end of wire_answer's
 * chain) in the answer section, of class IN: each one's
 * character-strings joined and NUL-terminated, one after the other in
 * out (cap octets), txt[i] pointing at the i-th; at most max records. A
 * record with a NUL octet in it, or that does not fit in what is left of
 * out or of txt, is dropped whole (never cut: a cut one could still
 * parse, as a shorter policy; read as a C string, a NUL cuts it). With
 * cap >= len and max >= WIRE_TXT_MAX(len) none is dropped for room: a
 * record's text and its NUL take fewer octets than the record itself.
 * Records of other owners or classes are no answer to the question.
 * Returns the count, -EBADMSG (a string running past its record) or
 * -E2BIG (more answer records than WIRE_MAX_RR: the answer cannot be
 * read whole, and a caller that counts records must not judge a part).
 * *ttl (unless ttl is NULL) is lowered to the TTLs of the records kept. */
int wire_txt(const uint8_t *buf, size_t len, const char *name, char *out, size_t cap,
             const char **txt, unsigned max, uint32_t *ttl);
/* The most TXT records a message of len octets can hold: each takes at
 * least 11 (a 1-octet owner, type, class, TTL, rdlength). */
#define WIRE_TXT_MAX(len) ((len) / 11 + 1)

/* Addresses of name (A or AAAA) in the additional section. Returns how
 * many were copied (at most max) and lowers *ttl to theirs; 0 when none
 * or when the message is malformed. */
unsigned wire_additional(const uint8_t *buf, size_t len, const char *name, uint16_t type,
                         uint8_t (*out)[16], unsigned max, uint32_t *ttl);

/* True when name is a host name a client may connect to: non-empty, and
 * its last label is not all digits (an address written as a name). */
bool wire_host_ok(const char *name);

#endif
