/*
 * wire: the bounded DNS message reader of wire.h.
 *
 * Loops are impossible by construction: a compression pointer must point
 * before the start of the label run it interrupts, so every jump lands
 * strictly lower than the last, and the record walk stops after
 * WIRE_MAX_RR records whatever the header counts claim.
 *
 * The cost is bounded too: a name follows at most WIRE_MAX_JUMPS
 * pointers. Going lower alone is no bound: a 64 KB answer (over TCP) can
 * hold a chain of 30,000 pointers each pointing at the one before, give
 * every record's name the top of it, and then each walk over the records
 * (one per CNAME step, one per MX host and family for the additional
 * section) took about 10 ms, so one such answer held a worker for up to a
 * second. A name has at most 127 labels, so one jump per label and one
 * more is all a real encoder can need.
 *
 * Threading: pure functions.
 */
#include "dns/wire.h"

#include <errno.h>
#include <string.h>

static inline uint16_t
get16(const uint8_t *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t
get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

#define WIRE_MAX_JUMPS 128

static inline bool
host_byte(uint8_t c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
}

int
wire_name(const uint8_t *buf, size_t len, size_t off, char out[WIRE_NAME_MAX + 1], bool *ok,
          size_t *after)
{
    size_t pos = off;
    size_t run = off; /* start of the current label run: pointers must go below it */
    size_t o = 0;
    unsigned wirelen = 1; /* the root label */
    unsigned jumps = 0;
    bool jumped = false;
    *ok = true;
    for (;;) {
        if (pos >= len)
            return -EBADMSG;
        uint8_t c = buf[pos];
        if ((c & 0xC0) == 0xC0) {
            if (pos + 1 >= len)
                return -EBADMSG;
            size_t ptr = ((size_t)(c & 0x3F) << 8) | buf[pos + 1];
            if (!jumped)
                *after = pos + 2;
            if (ptr >= run || ++jumps > WIRE_MAX_JUMPS)
                return -EBADMSG;
            jumped = true;
            pos = run = ptr;
            continue;
        }
        if ((c & 0xC0) != 0)
            return -EBADMSG; /* extended label types (RFC 6891) are obsolete */
        if (c == 0) {
            if (!jumped)
                *after = pos + 1;
            break;
        }
        wirelen += 1u + c;
        if (wirelen > 255 || pos + 1 + c > len)
            return -EBADMSG;
        /* Leading '-' or '_' and trailing '-' still pass here: they are
         * rare, harmless to connect to, and resolvers return them. */
        if (o != 0)
            out[o++] = '.';
        for (unsigned i = 0; i < c; i++) {
            uint8_t b = buf[pos + 1 + i];
            if (b >= 'A' && b <= 'Z')
                b = (uint8_t)(b - 'A' + 'a');
            if (!host_byte(b)) {
                b = '?';
                *ok = false;
            }
            out[o++] = (char)b;
        }
        pos += 1u + c;
    }
    out[o] = '\0';
    return 0;
}

int
wire_open(struct wire_msg *m, const uint8_t *buf, size_t len)
{
    memset(m, 0, sizeof(*m));
    if (buf == NULL || len < 12)
        return -EBADMSG;
    m->buf = buf;
    m->len = len;
    m->tc = (buf[2] & 0x02) != 0;
    m->rcode = buf[3] & 0x0F;
    m->ad = (buf[3] & 0x20) != 0;
    unsigned qd = get16(buf + 4);
    m->count[0] = get16(buf + 6);
    m->count[1] = get16(buf + 8);
    m->count[2] = get16(buf + 10);
    size_t pos = 12;
    char name[WIRE_NAME_MAX + 1];
    for (unsigned i = 0; i < qd; i++) {
        bool ok;
        if (i >= 4 || wire_name(buf, len, pos, name, &ok, &pos) < 0 || pos + 4 > len)
            return -EBADMSG;
        pos += 4;
    }
    m->first = m->pos = pos;
    return 0;
}

void
wire_rewind(struct wire_msg *m)
{
    m->pos = m->first;
    m->sec = 0;
    m->idx = 0;
    m->seen = 0;
}

int
wire_next(struct wire_msg *m, struct wire_rr *rr)
{
    while (m->sec < 3 && m->idx >= m->count[m->sec]) {
        m->sec++;
        m->idx = 0;
    }
    if (m->sec >= 3 || m->seen >= WIRE_MAX_RR)
        return 0;
    size_t pos;
    if (wire_name(m->buf, m->len, m->pos, rr->owner, &rr->owner_ok, &pos) < 0)
        return -EBADMSG;
    if (pos + 10 > m->len)
        return -EBADMSG;
    rr->section = (enum wire_section)m->sec;
    rr->type = get16(m->buf + pos);
    rr->cls = get16(m->buf + pos + 2);
    rr->ttl = get32(m->buf + pos + 4);
    if (rr->ttl & 0x80000000u)
        rr->ttl = 0;
    rr->rdlen = get16(m->buf + pos + 8);
    rr->rdoff = pos + 10;
    if (rr->rdoff + rr->rdlen > m->len)
        return -EBADMSG;
    m->pos = rr->rdoff + rr->rdlen;
    m->idx++;
    m->seen++;
    return 1;
}

bool
wire_host_ok(const char *name)
{
    if (name[0] == '\0')
        return false;
    const char *last = strrchr(name, '.');
    last = last ? last + 1 : name;
    for (const char *p = last; *p; p++)
        if (*p < '0' || *p > '9')
            return true;
    return false; /* "192.0.2.1" or "10": an address, not a host (RFC 5321 5.1) */
}

/* A name inside rdata must end inside it; compression may point out. */
static int
rdata_name(const struct wire_msg *m, const struct wire_rr *rr, size_t off,
           char out[WIRE_NAME_MAX + 1], bool *ok, size_t *after)
{
    if (wire_name(m->buf, m->len, off, out, ok, after) < 0 || *after > rr->rdoff + rr->rdlen)
        return -EBADMSG;
    return 0;
}

static inline uint32_t
min32(uint32_t a, uint32_t b)
{
    return a < b ? a : b;
}

/* One pass over the answer section for the records of qtype at name;
 * also finds the CNAME at name, if any. *found: some record of qtype is
 * at name (for the types it does not keep, TXT and TLSA, too). */
static int
answer_pass(struct wire_msg *m, const char *name, uint16_t qtype, struct wire_answer *a,
            char cname[WIRE_NAME_MAX + 1], bool *cname_ok, uint32_t *cname_ttl, bool *has_cname,
            bool *found)
{
    struct wire_rr rr;
    int rc;
    *has_cname = false;
    *found = false;
    wire_rewind(m);
    uint32_t ttl = UINT32_MAX;
    while ((rc = wire_next(m, &rr)) > 0) {
        if (rr.section != WIRE_SEC_ANSWER)
            break;
        if (rr.cls != 1 || !rr.owner_ok || strcmp(rr.owner, name) != 0)
            continue;
        if (rr.type == WIRE_T_CNAME && qtype != WIRE_T_CNAME) {
            size_t after;
            if (!*has_cname) {
                if (rdata_name(m, &rr, rr.rdoff, cname, cname_ok, &after) < 0)
                    return -EBADMSG;
                *cname_ttl = rr.ttl;
                *has_cname = true;
            }
            continue;
        }
        if (rr.type != qtype)
            continue;
        *found = true;
        if (qtype == WIRE_T_MX) {
            if (rr.rdlen < 3)
                return -EBADMSG;
            uint16_t pref = get16(m->buf + rr.rdoff);
            struct wire_mx *mx = &a->mx[a->n];
            if (a->n == WIRE_MAX_MX) {
                /* Full: the best WIRE_MAX_MX by preference are kept, not
                 * the first ones, so that a long answer cannot push the
                 * most preferred hosts out (RFC 5321 5.1). */
                mx = &a->mx[0];
                for (unsigned i = 1; i < WIRE_MAX_MX; i++)
                    if (a->mx[i].preference > mx->preference)
                        mx = &a->mx[i];
                if (pref >= mx->preference)
                    continue;
                a->n--; /* replaced: counted again below */
            }
            size_t after;
            bool ok;
            mx->preference = pref;
            if (rdata_name(m, &rr, rr.rdoff + 2, mx->host, &ok, &after) < 0)
                return -EBADMSG;
            mx->ok = ok && wire_host_ok(mx->host);
        } else if (qtype == WIRE_T_A || qtype == WIRE_T_AAAA) {
            size_t alen = qtype == WIRE_T_A ? 4 : 16;
            if (rr.rdlen != alen)
                return -EBADMSG;
            if (a->n == WIRE_MAX_ADDR)
                continue;
            memset(a->addr[a->n], 0, 16);
            memcpy(a->addr[a->n], m->buf + rr.rdoff, alen);
        } else {
            continue; /* other types: counted, not kept */
        }
        a->n++;
        ttl = min32(ttl, rr.ttl);
    }
    if (rc < 0)
        return rc;
    if (a->n > 0)
        a->ttl = min32(a->ttl, ttl);
    return 0;
}

/* The SOA of the authority section (its negative TTL), or, with none,
 * whether NS records there make the answer a referral. */
static int
authority_soa(struct wire_msg *m, struct wire_answer *a)
{
    struct wire_rr rr;
    int rc;
    bool ns = false;
    wire_rewind(m);
    while ((rc = wire_next(m, &rr)) > 0) {
        if (rr.section == WIRE_SEC_ADDITIONAL)
            break;
        if (rr.section != WIRE_SEC_AUTHORITY || rr.cls != 1)
            continue;
        if (rr.type == WIRE_T_NS)
            ns = true;
        if (rr.type != WIRE_T_SOA)
            continue;
        char name[WIRE_NAME_MAX + 1];
        bool ok;
        size_t after;
        if (rdata_name(m, &rr, rr.rdoff, name, &ok, &after) < 0 || /* MNAME */
            rdata_name(m, &rr, after, name, &ok, &after) < 0 ||    /* RNAME */
            after + 20 != rr.rdoff + rr.rdlen)
            return -EBADMSG;
        uint32_t minimum = get32(m->buf + after + 16);
        a->soa = true;
        a->neg_ttl = min32(rr.ttl, minimum);
        return 0;
    }
    if (rc < 0)
        return rc;
    a->referral = ns && a->rcode == WIRE_NOERROR;
    return 0;
}

int
wire_answer(const uint8_t *buf, size_t len, const char *qname, uint16_t qtype,
            struct wire_answer *a)
{
    struct wire_msg m;
    a->rcode = 0;
    a->ad = false;
    a->chain = 0;
    a->chain_bad = false;
    a->ttl = UINT32_MAX;
    a->soa = false;
    a->referral = false;
    a->neg_ttl = 0;
    a->n = 0;
    size_t qlen = strlen(qname);
    if (qlen > WIRE_NAME_MAX)
        return -EINVAL;
    memcpy(a->final, qname, qlen + 1);
    int rc = wire_open(&m, buf, len);
    if (rc < 0)
        return rc;
    bool found = false;
    a->rcode = m.rcode;
    a->ad = m.ad;
    if (m.rcode != WIRE_NOERROR && m.rcode != WIRE_NXDOMAIN)
        return 0;
    for (;;) {
        char cname[WIRE_NAME_MAX + 1];
        bool cname_ok = false, has_cname;
        uint32_t cname_ttl = 0;
        rc = answer_pass(&m, a->final, qtype, a, cname, &cname_ok, &cname_ttl, &has_cname, &found);
        if (rc < 0)
            return rc;
        if (a->n > 0 || !has_cname)
            break;
        if (!cname_ok || a->chain == WIRE_MAX_CHAIN) {
            a->chain_bad = true;
            break;
        }
        a->chain++;
        a->ttl = min32(a->ttl, cname_ttl);
        memcpy(a->final, cname, sizeof(cname));
    }
    /* MX records past the walk's bound could be the most preferred: the
     * best of a part is no answer (RFC 5321 5.1), as a part of the TXT
     * records is none (wire_txt). Addresses need no such care: any is
     * one to use. */
    if (qtype == WIRE_T_MX && m.sec == 0 && m.idx < m.count[0])
        return -E2BIG;
    if (a->n == 0) {
        rc = authority_soa(&m, a);
        if (found || a->chain_bad)
            a->referral = false; /* records (TXT, TLSA: not kept here), or a bad chain */
        return rc;
    }
    return 0;
}

int
wire_tlsa(const uint8_t *buf, size_t len, const char *name, struct wire_tlsa *out, unsigned max,
          uint32_t *ttl)
{
    struct wire_msg m;
    struct wire_rr rr;
    int rc = wire_open(&m, buf, len);
    if (rc < 0)
        return rc;
    unsigned n = 0;
    while ((rc = wire_next(&m, &rr)) > 0) {
        if (rr.section != WIRE_SEC_ANSWER)
            break;
        if (rr.type != WIRE_T_TLSA || rr.cls != 1 || strcmp(rr.owner, name) != 0)
            continue;
        if (rr.rdlen < 3)
            return -EBADMSG;
        *ttl = min32(*ttl, rr.ttl);
        if (n == max)
            continue;
        const uint8_t *p = m.buf + rr.rdoff;
        out[n].usage = p[0];
        out[n].selector = p[1];
        out[n].mtype = p[2];
        out[n].len = (uint16_t)(rr.rdlen - 3);
        out[n].data = p + 3;
        n++;
    }
    return rc < 0 ? rc : (int)n;
}

int
wire_txt(const uint8_t *buf, size_t len, const char *name, char *out, size_t cap,
         const char **txt, unsigned max, uint32_t *ttl)
{
    struct wire_msg m;
    struct wire_rr rr;
    int rc = wire_open(&m, buf, len);
    if (rc < 0)
        return rc;
    unsigned n = 0;
    size_t used = 0; /* octets of out taken by the records kept */
    while ((rc = wire_next(&m, &rr)) > 0) {
        if (rr.section != WIRE_SEC_ANSWER)
            break;
        if (rr.type != WIRE_T_TXT || rr.cls != 1 || !rr.owner_ok || strcmp(rr.owner, name) != 0)
            continue;
        char *t = n < max ? out + used : NULL;
        size_t room = t != NULL ? cap - used : 0; /* for the text and its NUL */
        size_t o = 0, pos = rr.rdoff, end = rr.rdoff + rr.rdlen;
        bool nul = false;
        while (pos < end) {
            size_t l = buf[pos];
            if (pos + 1 + l > end)
                return -EBADMSG;
            /* Past the room left the record is dropped, not cut: a cut
             * policy (a TLS-RPT rua list) could end in a truncated URI
             * that still parses. Its strings are still checked. A NUL
             * octet would cut it as well (callers read a C string:
             * "v=STSv1; id=1\0junk" as "v=STSv1; id=1"): dropped too. */
            if (memchr(buf + pos + 1, '\0', l) != NULL)
                nul = true;
            if (t != NULL && o + l < room)
                memcpy(t + o, buf + pos + 1, l);
            o += l;
            pos += 1 + l;
        }
        if (t != NULL && o < room && !nul) {
            t[o] = '\0';
            txt[n++] = t;
            used += o + 1;
            if (ttl != NULL)
                *ttl = min32(*ttl, rr.ttl);
        }
    }
    if (rc == 0 && m.sec == 0 && m.idx < m.count[0])
        return -E2BIG; /* the walk stopped at WIRE_MAX_RR: records unread */
    return rc < 0 ? rc : (int)n;
}

unsigned
wire_additional(const uint8_t *buf, size_t len, const char *name, uint16_t type, uint8_t (*out)[16],
                unsigned max, uint32_t *ttl)
{
    struct wire_msg m;
    struct wire_rr rr;
    size_t alen = type == WIRE_T_A ? 4 : 16;
    unsigned n = 0;
    uint32_t t = *ttl;
    if (wire_open(&m, buf, len) < 0)
        return 0;
    int rc;
    while ((rc = wire_next(&m, &rr)) > 0) {
        if (rr.section != WIRE_SEC_ADDITIONAL || rr.type != type || rr.cls != 1 || !rr.owner_ok ||
            strcmp(rr.owner, name) != 0)
            continue;
        if (rr.rdlen != alen)
            return 0;
        if (n == max)
            continue;
        memset(out[n], 0, 16);
        memcpy(out[n], buf + rr.rdoff, alen);
        n++;
        t = min32(t, rr.ttl);
    }
    if (rc < 0)
        return 0;
    if (n > 0)
        *ttl = t;
    return n;
}
