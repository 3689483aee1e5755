/*
 * test_dns_wire: the bounded DNS message reader (dns/wire.h) on messages
 * built byte by byte: compression, CNAME chains, negative answers with
 * SOA, null MX, odd names, and malformed input (pointer loops, forward
 * pointers, over-long names, every truncation of a valid message), TXT
 * records (over-long ones and ones with a NUL octet dropped whole), and
 * the TLSA records and AD bit that DANE reads (RFC 6698, RFC 7672).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dns/wire.h"

struct mb {
    uint8_t b[16384]; /* two TXT records of about 4096 octets */
    size_t n;
};

static void
u8(struct mb *m, unsigned v)
{
    m->b[m->n++] = (uint8_t)v;
}

static void
u16(struct mb *m, unsigned v)
{
    u8(m, v >> 8);
    u8(m, v & 255);
}

static void
u32(struct mb *m, uint32_t v)
{
    u16(m, v >> 16);
    u16(m, v & 0xFFFF);
}

/* Labels of name; a label "@N" ends the name with a pointer to N. */
static void
name(struct mb *m, const char *s)
{
    while (*s) {
        size_t l = strcspn(s, ".");
        if (s[0] == '@') {
            u16(m, 0xC000u | (unsigned)atoi(s + 1));
            return;
        }
        u8(m, (unsigned)l);
        memcpy(m->b + m->n, s, l);
        m->n += l;
        s += l;
        if (*s == '.')
            s++;
    }
    u8(m, 0);
}

static void
header(struct mb *m, unsigned rcode, unsigned an, unsigned ns, unsigned ar)
{
    m->n = 0;
    u16(m, 0x1234);
    u16(m, 0x8180 | rcode);
    u16(m, 1);
    u16(m, an);
    u16(m, ns);
    u16(m, ar);
}

static void
question(struct mb *m, const char *q, unsigned type)
{
    name(m, q);
    u16(m, type);
    u16(m, 1);
}

static size_t
rr(struct mb *m, const char *owner, unsigned type, uint32_t ttl)
{
    name(m, owner);
    u16(m, type);
    u16(m, 1);
    u32(m, ttl);
    size_t at = m->n;
    u16(m, 0);
    return at;
}

static void
rr_end(struct mb *m, size_t at)
{
    size_t len = m->n - at - 2;
    m->b[at] = (uint8_t)(len >> 8);
    m->b[at + 1] = (uint8_t)len;
}

static void
mx(struct mb *m, const char *owner, uint32_t ttl, unsigned pref, const char *host)
{
    size_t at = rr(m, owner, WIRE_T_MX, ttl);
    u16(m, pref);
    name(m, host);
    rr_end(m, at);
}

static void
a_rr(struct mb *m, const char *owner, uint32_t ttl, unsigned a, unsigned b, unsigned c, unsigned d)
{
    size_t at = rr(m, owner, WIRE_T_A, ttl);
    u8(m, a);
    u8(m, b);
    u8(m, c);
    u8(m, d);
    rr_end(m, at);
}

static void
soa(struct mb *m, const char *owner, uint32_t ttl, uint32_t minimum)
{
    size_t at = rr(m, owner, WIRE_T_SOA, ttl);
    name(m, "ns.example");
    name(m, "hostmaster.example");
    u32(m, 1);
    u32(m, 3600);
    u32(m, 600);
    u32(m, 86400);
    u32(m, minimum);
    rr_end(m, at);
}

static struct wire_answer ans;

static void
test_mx_with_compression(void **state)
{
    (void)state;
    struct mb m;
    header(&m, 0, 3, 0, 1);
    question(&m, "Example.COM", WIRE_T_MX); /* name at offset 12 */
    mx(&m, "@12", 300, 20, "mx2.@12");
    mx(&m, "@12", 120, 10, "MX1.@12");
    mx(&m, "other.@12", 5, 10, "x.@12"); /* another owner: not ours */
    a_rr(&m, "mx1.@12", 60, 192, 0, 2, 1);
    assert_int_equal(wire_answer(m.b, m.n, "example.com", WIRE_T_MX, &ans), 0);
    assert_int_equal(ans.rcode, WIRE_NOERROR);
    assert_int_equal(ans.n, 2);
    assert_int_equal(ans.mx[0].preference, 20);
    assert_string_equal(ans.mx[0].host, "mx2.example.com");
    assert_string_equal(ans.mx[1].host, "mx1.example.com"); /* lowercased */
    assert_true(ans.mx[1].ok);
    assert_int_equal(ans.ttl, 120);
    assert_int_equal(ans.chain, 0);

    uint8_t addr[4][16];
    uint32_t ttl = 1000;
    assert_int_equal(wire_additional(m.b, m.n, "mx1.example.com", WIRE_T_A, addr, 4, &ttl), 1);
    assert_int_equal(ttl, 60);
    assert_memory_equal(addr[0], "\xc0\x00\x02\x01", 4);
    assert_int_equal(wire_additional(m.b, m.n, "mx2.example.com", WIRE_T_A, addr, 4, &ttl), 0);
    assert_int_equal(wire_additional(m.b, m.n, "mx1.example.com", WIRE_T_AAAA, addr, 4, &ttl), 0);
}

/* More MX records than are kept, the most preferred last: those are the
 * ones kept, whatever their place in the answer. */
static void
test_many_mx_keeps_the_most_preferred(void **state)
{
    (void)state;
    struct mb m;
    unsigned total = WIRE_MAX_MX + 36;
    header(&m, 0, total, 0, 0);
    question(&m, "many.test", WIRE_T_MX); /* name at offset 12 */
    for (unsigned i = 0; i < total; i++) {
        char host[32];
        snprintf(host, sizeof(host), "h%u.@12", i);
        mx(&m, "@12", 300, total - i, host); /* preferences total .. 1 */
    }
    assert_true(m.n <= sizeof(m.b));
    assert_int_equal(wire_answer(m.b, m.n, "many.test", WIRE_T_MX, &ans), 0);
    assert_int_equal(ans.n, WIRE_MAX_MX);
    bool seen[WIRE_MAX_MX + 1] = {false};
    for (unsigned i = 0; i < ans.n; i++) {
        assert_in_range(ans.mx[i].preference, 1, WIRE_MAX_MX);
        assert_false(seen[ans.mx[i].preference]);
        seen[ans.mx[i].preference] = true;
        char host[32];
        snprintf(host, sizeof(host), "h%u.many.test", total - ans.mx[i].preference);
        assert_string_equal(ans.mx[i].host, host);
        assert_true(ans.mx[i].ok);
    }
}

/* More MX records than the walk reads (WIRE_MAX_RR), the most preferred
 * last: no answer (-E2BIG), not the best of the records read. Exactly
 * WIRE_MAX_RR records are read whole. */
static void
test_mx_past_the_walk_bound(void **state)
{
    (void)state;
    static struct mb m;
    for (unsigned total = WIRE_MAX_RR; total <= WIRE_MAX_RR + 1; total++) {
        header(&m, 0, total, 0, 0);
        question(&m, "many.test", WIRE_T_MX);
        for (unsigned i = 0; i < total; i++) {
            char host[32];
            snprintf(host, sizeof(host), "h%u.@12", i);
            mx(&m, "@12", 300, i + 1 == total ? 1 : 100 + i, host);
        }
        assert_true(m.n <= sizeof(m.b));
        int rc = wire_answer(m.b, m.n, "many.test", WIRE_T_MX, &ans);
        if (total > WIRE_MAX_RR) {
            assert_int_equal(rc, -E2BIG);
            continue;
        }
        assert_int_equal(rc, 0);
        bool best = false;
        for (unsigned i = 0; i < ans.n; i++)
            best |= ans.mx[i].preference == 1;
        assert_true(best);
    }
    /* addresses: any will do, the first ones read are kept */
    header(&m, 0, WIRE_MAX_RR + 8, 0, 0);
    question(&m, "many.test", WIRE_T_A);
    for (unsigned i = 0; i < WIRE_MAX_RR + 8; i++)
        a_rr(&m, "@12", 300, 192, 0, 2, i & 255);
    assert_int_equal(wire_answer(m.b, m.n, "many.test", WIRE_T_A, &ans), 0);
    assert_int_equal(ans.n, WIRE_MAX_ADDR);
}

static void
test_cname_chain(void **state)
{
    (void)state;
    struct mb m;
    header(&m, 0, 4, 0, 0);
    question(&m, "mx.a.test", WIRE_T_A);
    size_t at = rr(&m, "@12", WIRE_T_CNAME, 50);
    name(&m, "b.test");
    rr_end(&m, at);
    a_rr(&m, "c.test", 40, 10, 0, 0, 3); /* out of order: still found */
    at = rr(&m, "b.test", WIRE_T_CNAME, 30);
    name(&m, "c.test");
    rr_end(&m, at);
    a_rr(&m, "c.test", 70, 10, 0, 0, 4);
    assert_int_equal(wire_answer(m.b, m.n, "mx.a.test", WIRE_T_A, &ans), 0);
    assert_int_equal(ans.chain, 2);
    assert_string_equal(ans.final, "c.test");
    assert_int_equal(ans.n, 2);
    assert_int_equal(ans.ttl, 30);
    assert_memory_equal(ans.addr[1], "\x0a\x00\x00\x04", 4);

    /* A chain that loops ends as a bad chain, not forever. */
    header(&m, 0, 2, 0, 0);
    question(&m, "x.test", WIRE_T_A);
    at = rr(&m, "x.test", WIRE_T_CNAME, 5);
    name(&m, "y.test");
    rr_end(&m, at);
    at = rr(&m, "y.test", WIRE_T_CNAME, 5);
    name(&m, "x.test");
    rr_end(&m, at);
    assert_int_equal(wire_answer(m.b, m.n, "x.test", WIRE_T_A, &ans), 0);
    assert_int_equal(ans.n, 0);
    assert_true(ans.chain_bad);

    /* A chain that ends without data is no data at its end. */
    header(&m, 0, 1, 1, 0);
    question(&m, "x.test", WIRE_T_AAAA);
    at = rr(&m, "x.test", WIRE_T_CNAME, 5);
    name(&m, "y.test");
    rr_end(&m, at);
    soa(&m, "test", 900, 60);
    assert_int_equal(wire_answer(m.b, m.n, "x.test", WIRE_T_AAAA, &ans), 0);
    assert_int_equal(ans.n, 0);
    assert_false(ans.chain_bad);
    assert_string_equal(ans.final, "y.test");
    assert_true(ans.soa);
    assert_int_equal(ans.neg_ttl, 60);
}

static void
test_negative_answers(void **state)
{
    (void)state;
    struct mb m;
    header(&m, WIRE_NXDOMAIN, 0, 1, 0);
    question(&m, "nx.test", WIRE_T_MX);
    soa(&m, "test", 30, 3600); /* RFC 2308: min(TTL, MINIMUM) */
    assert_int_equal(wire_answer(m.b, m.n, "nx.test", WIRE_T_MX, &ans), 0);
    assert_int_equal(ans.rcode, WIRE_NXDOMAIN);
    assert_int_equal(ans.n, 0);
    assert_true(ans.soa);
    assert_int_equal(ans.neg_ttl, 30);

    header(&m, WIRE_NOERROR, 0, 0, 0);
    question(&m, "nodata.test", WIRE_T_MX);
    assert_int_equal(wire_answer(m.b, m.n, "nodata.test", WIRE_T_MX, &ans), 0);
    assert_int_equal(ans.n, 0);
    assert_false(ans.soa);

    header(&m, WIRE_SERVFAIL, 0, 0, 0);
    question(&m, "x.test", WIRE_T_MX);
    assert_int_equal(wire_answer(m.b, m.n, "x.test", WIRE_T_MX, &ans), 0);
    assert_int_equal(ans.rcode, WIRE_SERVFAIL);
}

static void
ns(struct mb *m, const char *owner, const char *host)
{
    size_t at = rr(m, owner, WIRE_T_NS, 86400);
    name(m, host);
    rr_end(m, at);
}

/* A server that does not recurse answers NOERROR with NS records but no
 * SOA in the authority section (RFC 2308 2.2): a referral, not "no
 * records"; with an SOA, or with records of the type asked (TLSA and
 * TXT, which wire_answer does not keep, too), it is an answer. */
static void
test_referral(void **state)
{
    (void)state;
    struct mb m;
    static const uint16_t types[] = {WIRE_T_MX, WIRE_T_A, WIRE_T_TXT, WIRE_T_TLSA};
    for (unsigned i = 0; i < 4; i++) {
        header(&m, WIRE_NOERROR, 0, 1, 0);
        question(&m, "x.test", types[i]);
        ns(&m, "", "a.root-servers.net"); /* old BIND's upward referral */
        assert_int_equal(wire_answer(m.b, m.n, "x.test", types[i], &ans), 0);
        assert_true(ans.referral);
        assert_false(ans.soa);
    }
    /* down to the zone's servers, after a CNAME */
    header(&m, WIRE_NOERROR, 1, 1, 0);
    question(&m, "x.test", WIRE_T_MX);
    size_t at = rr(&m, "x.test", WIRE_T_CNAME, 5);
    name(&m, "y.other");
    rr_end(&m, at);
    ns(&m, "other", "ns.other");
    assert_int_equal(wire_answer(m.b, m.n, "x.test", WIRE_T_MX, &ans), 0);
    assert_true(ans.referral);
    assert_string_equal(ans.final, "y.other");

    /* NODATA with the zone's NS beside its SOA */
    header(&m, WIRE_NOERROR, 0, 2, 0);
    question(&m, "x.test", WIRE_T_MX);
    ns(&m, "test", "ns.test");
    soa(&m, "test", 60, 60);
    assert_int_equal(wire_answer(m.b, m.n, "x.test", WIRE_T_MX, &ans), 0);
    assert_false(ans.referral);
    assert_true(ans.soa);
    /* NXDOMAIN is an answer whatever its authority section holds */
    header(&m, WIRE_NXDOMAIN, 0, 1, 0);
    question(&m, "x.test", WIRE_T_MX);
    ns(&m, "test", "ns.test");
    assert_int_equal(wire_answer(m.b, m.n, "x.test", WIRE_T_MX, &ans), 0);
    assert_false(ans.referral);
    /* records of the type asked, with the zone's NS in authority */
    static const uint16_t kept_not[] = {WIRE_T_TXT, WIRE_T_TLSA};
    for (unsigned i = 0; i < 2; i++) {
        header(&m, WIRE_NOERROR, 1, 1, 0);
        question(&m, "x.test", kept_not[i]);
        at = rr(&m, "x.test", kept_not[i], 60);
        u8(&m, 3);
        u8(&m, 1);
        u8(&m, 1);
        u8(&m, 0xab);
        rr_end(&m, at);
        ns(&m, "test", "ns.test");
        assert_int_equal(wire_answer(m.b, m.n, "x.test", kept_not[i], &ans), 0);
        assert_false(ans.referral);
    }
    header(&m, WIRE_NOERROR, 1, 1, 0);
    question(&m, "x.test", WIRE_T_MX);
    mx(&m, "x.test", 60, 10, "mx.test");
    ns(&m, "test", "ns.test");
    assert_int_equal(wire_answer(m.b, m.n, "x.test", WIRE_T_MX, &ans), 0);
    assert_false(ans.referral);
    assert_int_equal(ans.n, 1);
}

static void
test_odd_targets(void **state)
{
    (void)state;
    struct mb m;
    header(&m, 0, 4, 0, 0);
    question(&m, "d.test", WIRE_T_MX);
    mx(&m, "d.test", 60, 0, "");                          /* null MX target */
    mx(&m, "d.test", 60, 5, "192.0.2.1");                 /* an address as a name */
    mx(&m, "d.test", 60, 5, "a b.test");                  /* a blank in a label */
    size_t at = rr(&m, "d.test", WIRE_T_MX, 0x80000010u); /* TTL top bit: 0 */
    u16(&m, 7);
    name(&m, "_mx.test");
    rr_end(&m, at);
    assert_int_equal(wire_answer(m.b, m.n, "d.test", WIRE_T_MX, &ans), 0);
    assert_int_equal(ans.n, 4);
    assert_string_equal(ans.mx[0].host, "");
    assert_false(ans.mx[0].ok);
    assert_false(ans.mx[1].ok);
    assert_string_equal(ans.mx[2].host, "a?b.test");
    assert_false(ans.mx[2].ok);
    assert_true(ans.mx[3].ok);
    assert_int_equal(ans.ttl, 0);
    assert_true(wire_host_ok("mx.example"));
    assert_false(wire_host_ok("10"));
    assert_false(wire_host_ok(""));
    assert_true(wire_host_ok("1.2.3.x4"));
}

static void
test_malformed(void **state)
{
    (void)state;
    struct mb m;
    char out[WIRE_NAME_MAX + 1];
    bool ok;
    size_t after;
    /* a pointer to itself */
    header(&m, 0, 0, 0, 0);
    u16(&m, 0xC000 | 12);
    assert_int_equal(wire_name(m.b, m.n, 12, out, &ok, &after), -EBADMSG);
    /* a label, then a pointer back to it: a loop through the label */
    header(&m, 0, 0, 0, 0);
    name(&m, "a.@12");
    assert_int_equal(wire_name(m.b, m.n, 12, out, &ok, &after), -EBADMSG);
    /* a forward pointer */
    header(&m, 0, 0, 0, 0);
    u16(&m, 0xC000 | 14);
    name(&m, "a");
    assert_int_equal(wire_name(m.b, m.n, 12, out, &ok, &after), -EBADMSG);
    /* two pointers chasing each other */
    header(&m, 0, 0, 0, 0);
    u16(&m, 0xC000 | 14);
    u16(&m, 0xC000 | 12);
    assert_int_equal(wire_name(m.b, m.n, 14, out, &ok, &after), -EBADMSG);
    /* longer than 255 octets */
    header(&m, 0, 0, 0, 0);
    for (int i = 0; i < 5; i++) {
        u8(&m, 60);
        memset(m.b + m.n, 'a', 60);
        m.n += 60;
    }
    u8(&m, 0);
    assert_int_equal(wire_name(m.b, m.n, 12, out, &ok, &after), -EBADMSG);
    /* 253 characters is the most */
    header(&m, 0, 0, 0, 0);
    for (int i = 0; i < 4; i++) {
        unsigned l = i < 3 ? 63 : 61;
        u8(&m, l);
        memset(m.b + m.n, 'a', l);
        m.n += l;
    }
    u8(&m, 0);
    assert_int_equal(wire_name(m.b, m.n, 12, out, &ok, &after), 0);
    assert_int_equal(strlen(out), 253);
    assert_int_equal(after, m.n);
    /* extended label type */
    header(&m, 0, 0, 0, 0);
    u8(&m, 0x41);
    u8(&m, 0);
    assert_int_equal(wire_name(m.b, m.n, 12, out, &ok, &after), -EBADMSG);
    /* an A record of 5 bytes */
    header(&m, 0, 1, 0, 0);
    question(&m, "x.test", WIRE_T_A);
    size_t at = rr(&m, "x.test", WIRE_T_A, 5);
    u32(&m, 1);
    u8(&m, 2);
    rr_end(&m, at);
    assert_int_equal(wire_answer(m.b, m.n, "x.test", WIRE_T_A, &ans), -EBADMSG);
    /* an MX whose name runs past its rdata */
    header(&m, 0, 1, 0, 0);
    question(&m, "x.test", WIRE_T_MX);
    at = rr(&m, "x.test", WIRE_T_MX, 5);
    u16(&m, 1);
    name(&m, "mx.x.test");
    m.b[at + 1] = 5; /* rdlen claims 5 */
    assert_int_equal(wire_answer(m.b, m.n, "x.test", WIRE_T_MX, &ans), -EBADMSG);
    /* header only, and less */
    assert_int_equal(wire_answer(m.b, 11, "x.test", WIRE_T_MX, &ans), -EBADMSG);
    assert_int_equal(wire_answer(NULL, 0, "x.test", WIRE_T_MX, &ans), -EBADMSG);
}

/* k pointers, each to the one before, the first to target. Returns the
 * offset of the last: a name there takes k jumps. */
static size_t
pointer_chain(struct mb *m, size_t target, unsigned k)
{
    size_t prev = target;
    for (unsigned i = 0; i < k; i++) {
        size_t at = m->n;
        u16(m, 0xC000u | (unsigned)prev);
        prev = at;
    }
    return prev;
}

/* Pointers that go ever lower cannot loop, but a chain of them made one
 * name cost as many steps as the message has pairs of bytes (30,000 in a
 * 64 KB answer over TCP), and every walk over the records paid it again
 * for each record. A name follows at most 128 pointers. */
static void
test_pointer_chain(void **state)
{
    (void)state;
    struct mb m;
    char out[WIRE_NAME_MAX + 1];
    bool ok;
    size_t after;
    header(&m, 0, 0, 0, 0);
    name(&m, "x.test");
    size_t top = pointer_chain(&m, 12, 128);
    assert_int_equal(wire_name(m.b, m.n, top, out, &ok, &after), 0);
    assert_string_equal(out, "x.test");
    assert_int_equal(after, top + 2);
    top = pointer_chain(&m, top, 1);
    assert_int_equal(wire_name(m.b, m.n, top, out, &ok, &after), -EBADMSG);

    /* In an answer: the chain in the rdata of a record of another type,
     * the MX record's owner a pointer to its top (one jump more). */
    for (unsigned k = 127; k <= 128; k++) {
        header(&m, 0, 2, 0, 0);
        question(&m, "x.test", WIRE_T_MX);
        size_t at = rr(&m, "@12", 99, 60);
        top = pointer_chain(&m, 12, k);
        rr_end(&m, at);
        char owner[16];
        snprintf(owner, sizeof(owner), "@%zu", top);
        mx(&m, owner, 60, 10, "mx.@12");
        int rc = wire_answer(m.b, m.n, "x.test", WIRE_T_MX, &ans);
        if (k == 127) {
            assert_int_equal(rc, 0);
            assert_int_equal(ans.n, 1);
            assert_string_equal(ans.mx[0].host, "mx.x.test");
        } else {
            assert_int_equal(rc, -EBADMSG);
        }
    }
}

/* TXT records: the strings of each record joined, one after the other
 * in out; a record that does not fit in the room left dropped whole (not
 * cut) while later ones that fit are kept; at most max; only the records
 * of the name asked and of class IN; a string running past its record is
 * malformed. */
static void
test_txt(void **state)
{
    (void)state;
    struct mb m;
    char out[64];
    const char *txt[8];
    header(&m, 0, 6, 0, 0);
    question(&m, "_mta-sts.x.test", WIRE_T_TXT);
    size_t at = rr(&m, "@12", WIRE_T_TXT, 60);
    u8(&m, 4);
    memcpy(m.b + m.n, "v=ST", 4);
    m.n += 4;
    u8(&m, 3);
    memcpy(m.b + m.n, "Sv1", 3);
    m.n += 3;
    rr_end(&m, at);
    at = rr(&m, "other.test", WIRE_T_TXT, 60); /* another owner */
    u8(&m, 1);
    u8(&m, 'o');
    rr_end(&m, at);
    at = rr(&m, "@12", WIRE_T_TXT, 60);
    m.b[at - 5] = 3; /* class CHAOS */
    u8(&m, 1);
    u8(&m, 'c');
    rr_end(&m, at);
    at = rr(&m, "@12", WIRE_T_TXT, 60); /* 9 octets in two strings */
    u8(&m, 5);
    memcpy(m.b + m.n, "ABCDE", 5);
    m.n += 5;
    u8(&m, 4);
    memcpy(m.b + m.n, "FGHI", 4);
    m.n += 4;
    rr_end(&m, at);
    at = rr(&m, "@12", WIRE_T_TXT, 40); /* 8 octets */
    u8(&m, 8);
    memcpy(m.b + m.n, "abcdefgh", 8);
    m.n += 8;
    rr_end(&m, at);
    at = rr(&m, "@12", WIRE_T_TXT, 30);
    u8(&m, 1);
    u8(&m, 'z');
    rr_end(&m, at);
    /* Room for all (as dns/txt.c gives it: the message's size): all, and
     * the smallest TTL of them. */
    uint32_t ttl = 3600;
    assert_int_equal(
        wire_txt(m.b, m.n, "_mta-sts.x.test", out, m.n, txt, WIRE_TXT_MAX(m.n), &ttl), 4);
    assert_int_equal(ttl, 30);
    assert_string_equal(txt[0], "v=STSv1");
    assert_string_equal(txt[1], "ABCDEFGHI");
    assert_string_equal(txt[2], "abcdefgh");
    assert_string_equal(txt[3], "z");
    assert_ptr_equal(txt[1], txt[0] + 8); /* one after the other */
    /* At most max. */
    assert_int_equal(wire_txt(m.b, m.n, "_mta-sts.x.test", out, sizeof(out), txt, 2, NULL), 2);
    assert_string_equal(txt[0], "v=STSv1");
    assert_string_equal(txt[1], "ABCDEFGHI");
    /* Room for 17 octets: "v=STSv1" (8 with its NUL), then ABCDEFGHI (10)
     * does not fit and is dropped whole, abcdefgh (9) fits; z has none. */
    ttl = 3600;
    assert_int_equal(wire_txt(m.b, m.n, "_mta-sts.x.test", out, 17, txt, 8, &ttl), 2);
    assert_string_equal(txt[0], "v=STSv1");
    assert_string_equal(txt[1], "abcdefgh");
    assert_int_equal(ttl, 40); /* of the records kept only */
    assert_int_equal(wire_txt(m.b, m.n, "other.test", out, sizeof(out), txt, 8, NULL), 1);
    assert_string_equal(txt[0], "o");
    /* Only a record longer than the room: none left. */
    header(&m, 0, 1, 0, 0);
    question(&m, "x.test", WIRE_T_TXT);
    at = rr(&m, "@12", WIRE_T_TXT, 60);
    u8(&m, 9);
    memcpy(m.b + m.n, "abcdefghi", 9);
    m.n += 9;
    rr_end(&m, at);
    assert_int_equal(wire_txt(m.b, m.n, "x.test", out, 9, txt, 8, NULL), 0);
    assert_int_equal(wire_txt(m.b, m.n, "x.test", out, 10, txt, 8, NULL), 1);
    assert_string_equal(txt[0], "abcdefghi");
    /* No data, no SOA, an additional section (an OPT record, say):
     * wire_answer says 0, as it promises, not 1 (the walk that stopped at
     * the additional section), which a caller would take for a count. */
    header(&m, 0, 0, 0, 1);
    question(&m, "x.test", WIRE_T_TXT);
    a_rr(&m, "ns.x.test", 60, 192, 0, 2, 1);
    assert_int_equal(wire_answer(m.b, m.n, "x.test", WIRE_T_TXT, &ans), 0);
    assert_int_equal(ans.n, 0);
    assert_false(ans.soa);
    /* a string longer than what is left of its record */
    header(&m, 0, 1, 0, 0);
    question(&m, "x.test", WIRE_T_TXT);
    at = rr(&m, "@12", WIRE_T_TXT, 60);
    u8(&m, 5);
    memcpy(m.b + m.n, "abcde", 5);
    m.n += 5;
    rr_end(&m, at);
    m.b[at + 2] = 6;
    assert_int_equal(wire_txt(m.b, m.n, "x.test", out, sizeof(out), txt, 8, NULL), -EBADMSG);
}

/* A string of s's text at the end of m (at most 255 octets). */
static void
txt_string(struct mb *m, const char *s, size_t l)
{
    u8(m, (unsigned)l);
    memcpy(m->b + m->n, s, l);
    m->n += l;
}

/* A TLS-RPT record (RFC 8460 3) whose rua list of mailto: URIs makes it
 * exactly `total` octets (the last URI's local part pads it), in strings
 * of at most 255 octets: the last URI's end is the record's end. */
static void
tlsrpt_record(struct mb *m, size_t total)
{
    static const char dom[] = "@reports.x.test";
    char rec[5000];
    size_t n = (size_t)snprintf(rec, sizeof(rec), "v=TLSRPTv1; rua=");
    for (unsigned i = 0; n + 80 < total; i++)
        n += (size_t)snprintf(rec + n, sizeof(rec) - n, "mailto:r%04u%s,", i, dom);
    n += (size_t)snprintf(rec + n, sizeof(rec) - n, "mailto:");
    while (n < total - (sizeof(dom) - 1))
        rec[n++] = 'x';
    memcpy(rec + n, dom, sizeof(dom));
    n += sizeof(dom) - 1;
    assert_int_equal(n, total);
    size_t at = rr(m, "@12", WIRE_T_TXT, 60);
    for (size_t o = 0; o < n; o += 255)
        txt_string(m, rec + o, n - o < 255 ? n - o : 255);
    rr_end(m, at);
}

/* A record is never cut: with room for a TLS-RPT record of 4096 octets
 * and its NUL, one of 4097 is left out, not cut to 4096 (which would end
 * its rua list in a truncated URI that still parses as one), and the
 * 4096 one comes back whole. With the room dns/txt.c gives (the
 * message's size), both come back whole: no length is too long. */
static void
test_txt_over_room_dropped(void **state)
{
    (void)state;
    enum { CAP = 4096 };
    struct mb m;
    static char out[sizeof(m.b)];
    const char *txt[2];
    header(&m, 0, 2, 0, 0);
    question(&m, "_smtp._tls.x.test", WIRE_T_TXT);
    tlsrpt_record(&m, CAP + 1);
    tlsrpt_record(&m, CAP);
    assert_true(m.n <= sizeof(m.b));
    assert_int_equal(wire_txt(m.b, m.n, "_smtp._tls.x.test", out, CAP + 1, txt, 2, NULL), 1);
    assert_int_equal(strlen(txt[0]), CAP);
    assert_memory_equal(txt[0], "v=TLSRPTv1; rua=mailto:", 23);
    assert_string_equal(txt[0] + CAP - 15, "@reports.x.test");
    assert_int_equal(wire_txt(m.b, m.n, "_smtp._tls.x.test", out, m.n, txt, 2, NULL), 2);
    assert_int_equal(strlen(txt[0]), CAP + 1);
    assert_string_equal(txt[0] + CAP + 1 - 15, "@reports.x.test");
    assert_int_equal(strlen(txt[1]), CAP);
    /* The longer one alone, with room for 4096: no record at all. */
    header(&m, 0, 1, 0, 0);
    question(&m, "_smtp._tls.x.test", WIRE_T_TXT);
    tlsrpt_record(&m, CAP + 1);
    assert_int_equal(wire_txt(m.b, m.n, "_smtp._tls.x.test", out, CAP + 1, txt, 2, NULL), 0);
}

/* n records at _mta-sts.x.test, each as small as a record gets (a
 * compressed owner, one empty string) but the first and the last, which
 * are STSv1 records. */
static void
txt_many(struct mb *m, unsigned n)
{
    header(m, 0, n, 0, 0);
    question(m, "_mta-sts.x.test", WIRE_T_TXT);
    for (unsigned i = 0; i < n; i++) {
        size_t at = rr(m, "@12", WIRE_T_TXT, 60);
        if (i == 0 || i == n - 1)
            txt_string(m, "v=STSv1; id=1", 13);
        else
            u8(m, 0);
        rr_end(m, at);
    }
    assert_true(m->n <= sizeof(m->b));
}

/* Every record of the answer, up to the WIRE_MAX_RR the walk reads:
 * WIRE_TXT_MAX(len) and len make room for them all. One more and the
 * answer is too big to judge (-E2BIG), not cut to its first 512 records,
 * whose one STSv1 record would pass for the only one. */
static void
test_txt_every_record(void **state)
{
    (void)state;
    struct mb m;
    static char out[sizeof(m.b)];
    static const char *txt[WIRE_TXT_MAX(sizeof(m.b))];
    txt_many(&m, WIRE_MAX_RR);
    assert_int_equal(wire_txt(m.b, m.n, "_mta-sts.x.test", out, m.n, txt, WIRE_TXT_MAX(m.n), NULL),
                     WIRE_MAX_RR);
    assert_string_equal(txt[0], "v=STSv1; id=1");
    assert_string_equal(txt[1], "");
    assert_string_equal(txt[WIRE_MAX_RR - 1], "v=STSv1; id=1");
    txt_many(&m, WIRE_MAX_RR + 1);
    assert_int_equal(wire_txt(m.b, m.n, "_mta-sts.x.test", out, m.n, txt, WIRE_TXT_MAX(m.n), NULL),
                     -E2BIG);
}

/* A TXT record with a NUL octet in it is dropped whole, not read as the
 * text before the NUL: "v=STSv1; id=1\0junk" would otherwise pass for
 * the policy record "v=STSv1; id=1", and a NUL in the second string
 * likewise. The records around it are kept, and the count of records
 * kept is the count returned. */
static void
test_txt_nul_dropped(void **state)
{
    (void)state;
    struct mb m;
    char out[99];
    const char *txt[3];
    header(&m, 0, 4, 0, 0);
    question(&m, "_mta-sts.x.test", WIRE_T_TXT);
    size_t at = rr(&m, "@12", WIRE_T_TXT, 60);
    txt_string(&m, "v=STSv1; id=1\0junk", 18);
    rr_end(&m, at);
    at = rr(&m, "@12", WIRE_T_TXT, 60);
    txt_string(&m, "v=STSv1; id=2", 13);
    rr_end(&m, at);
    at = rr(&m, "@12", WIRE_T_TXT, 60); /* the NUL in the second string */
    txt_string(&m, "v=STSv1; ", 9);
    txt_string(&m, "id=3\0", 5);
    rr_end(&m, at);
    at = rr(&m, "@12", WIRE_T_TXT, 60); /* a NUL alone */
    txt_string(&m, "\0", 1);
    rr_end(&m, at);
    assert_int_equal(wire_txt(m.b, m.n, "_mta-sts.x.test", out, sizeof(out), txt, 3, NULL), 1);
    assert_string_equal(txt[0], "v=STSv1; id=2");
    /* The record with a NUL alone: no record at all. */
    header(&m, 0, 1, 0, 0);
    question(&m, "_mta-sts.x.test", WIRE_T_TXT);
    at = rr(&m, "@12", WIRE_T_TXT, 60);
    txt_string(&m, "v=STSv1; id=1\0junk", 18);
    rr_end(&m, at);
    assert_int_equal(wire_txt(m.b, m.n, "_mta-sts.x.test", out, sizeof(out), txt, 3, NULL), 0);
}

static void
test_every_truncation(void **state)
{
    (void)state;
    struct mb m;
    header(&m, 0, 2, 1, 1);
    question(&m, "trunc.test", WIRE_T_MX);
    mx(&m, "@12", 300, 10, "mx1.@12");
    mx(&m, "@12", 300, 20, "mx2.@12");
    soa(&m, "test", 60, 60);
    a_rr(&m, "mx1.@12", 60, 192, 0, 2, 1);
    size_t answer_end = 0;
    {
        /* where the answer section ends: after the second MX */
        struct wire_msg w;
        struct wire_rr r;
        assert_int_equal(wire_open(&w, m.b, m.n), 0);
        assert_int_equal(wire_next(&w, &r), 1);
        assert_int_equal(wire_next(&w, &r), 1);
        answer_end = w.pos;
    }
    assert_int_equal(wire_answer(m.b, m.n, "trunc.test", WIRE_T_MX, &ans), 0);
    assert_int_equal(ans.n, 2);
    for (size_t len = 0; len < m.n; len++) {
        /* a copy of exactly len bytes, so that ASan sees any overread */
        uint8_t *cut = malloc(len ? len : 1);
        memcpy(cut, m.b, len);
        int rc = wire_answer(cut, len, "trunc.test", WIRE_T_MX, &ans);
        if (len < answer_end)
            assert_int_equal(rc, -EBADMSG);
        uint8_t addr[2][16];
        uint32_t ttl = 0;
        (void)wire_additional(cut, len, "mx1.trunc.test", WIRE_T_A, addr, 2, &ttl);
        free(cut);
    }
}

static void
tlsa_rr(struct mb *m, const char *owner, uint32_t ttl, unsigned u, unsigned sel, unsigned mt,
        unsigned dlen, uint8_t fill)
{
    size_t at = rr(m, owner, WIRE_T_TLSA, ttl);
    u8(m, u);
    u8(m, sel);
    u8(m, mt);
    for (unsigned i = 0; i < dlen; i++)
        u8(m, fill);
    rr_end(m, at);
}

static void
test_tlsa_records_and_ad(void **state)
{
    (void)state;
    struct mb m;
    struct wire_tlsa t[4];
    uint32_t ttl = UINT32_MAX;
    header(&m, 0, 3, 0, 0);
    m.b[3] |= 0x20; /* AD */
    question(&m, "_25._tcp.mx.x.test", WIRE_T_TLSA);
    tlsa_rr(&m, "@12", 300, 3, 1, 1, 32, 0xAB);
    tlsa_rr(&m, "_25._tcp.other.test", 10, 3, 1, 1, 32, 0xCD); /* another owner: ignored */
    tlsa_rr(&m, "@12", 120, 2, 0, 2, 64, 0xEF);
    assert_int_equal(wire_answer(m.b, m.n, "_25._tcp.mx.x.test", WIRE_T_TLSA, &ans), 0);
    assert_true(ans.ad);
    assert_int_equal(ans.rcode, 0);
    assert_int_equal(wire_tlsa(m.b, m.n, ans.final, t, 4, &ttl), 2);
    assert_int_equal(ttl, 120);
    assert_int_equal(t[0].usage, 3);
    assert_int_equal(t[0].selector, 1);
    assert_int_equal(t[0].mtype, 1);
    assert_int_equal(t[0].len, 32);
    assert_int_equal(t[0].data[0], 0xAB);
    assert_int_equal(t[0].data[31], 0xAB);
    assert_int_equal(t[1].usage, 2);
    assert_int_equal(t[1].mtype, 2);
    assert_int_equal(t[1].len, 64);
    assert_int_equal(t[1].data[63], 0xEF);
    /* capped at max: the TTL of the dropped one still counts */
    ttl = UINT32_MAX;
    assert_int_equal(wire_tlsa(m.b, m.n, ans.final, t, 1, &ttl), 1);
    assert_int_equal(ttl, 120);

    /* no AD bit: read as not validated */
    m.b[3] &= (uint8_t)~0x20;
    assert_int_equal(wire_answer(m.b, m.n, "_25._tcp.mx.x.test", WIRE_T_TLSA, &ans), 0);
    assert_false(ans.ad);

    /* a CNAME to the records: they are read at the chain's end */
    header(&m, 0, 2, 0, 0);
    question(&m, "_25._tcp.mx.y.test", WIRE_T_TLSA);
    size_t at = rr(&m, "@12", WIRE_T_CNAME, 60);
    name(&m, "tlsa.y.test");
    rr_end(&m, at);
    tlsa_rr(&m, "tlsa.y.test", 300, 3, 0, 0, 5, 1);
    assert_int_equal(wire_answer(m.b, m.n, "_25._tcp.mx.y.test", WIRE_T_TLSA, &ans), 0);
    assert_string_equal(ans.final, "tlsa.y.test");
    assert_int_equal(ans.chain, 1);
    ttl = UINT32_MAX;
    assert_int_equal(wire_tlsa(m.b, m.n, ans.final, t, 4, &ttl), 1);
    assert_int_equal(t[0].len, 5);
    assert_int_equal(ttl, 300);

    /* no records: 0 */
    header(&m, 0, 0, 0, 0);
    question(&m, "_25._tcp.mx.x.test", WIRE_T_TLSA);
    assert_int_equal(wire_tlsa(m.b, m.n, "_25._tcp.mx.x.test", t, 4, &ttl), 0);

    /* three octets of rdata, no association data: an unusable record
     * kept beside the good one, not a malformed answer */
    header(&m, 0, 2, 0, 0);
    question(&m, "_25._tcp.mx.x.test", WIRE_T_TLSA);
    tlsa_rr(&m, "@12", 300, 3, 1, 1, 0, 0);
    tlsa_rr(&m, "@12", 300, 3, 1, 1, 32, 0xAB);
    assert_int_equal(wire_tlsa(m.b, m.n, "_25._tcp.mx.x.test", t, 4, &ttl), 2);
    assert_int_equal(t[0].len, 0);
    assert_int_equal(t[1].len, 32);

    /* two octets: malformed */
    header(&m, 0, 1, 0, 0);
    question(&m, "_25._tcp.mx.x.test", WIRE_T_TLSA);
    size_t at2 = rr(&m, "@12", WIRE_T_TLSA, 300);
    u8(&m, 3);
    u8(&m, 1);
    rr_end(&m, at2);
    assert_int_equal(wire_tlsa(m.b, m.n, "_25._tcp.mx.x.test", t, 4, &ttl), -EBADMSG);
}

static void
test_tlsa_every_truncation(void **state)
{
    (void)state;
    struct mb m;
    struct wire_tlsa t[4];
    header(&m, 0, 2, 0, 0);
    question(&m, "_25._tcp.mx.x.test", WIRE_T_TLSA);
    tlsa_rr(&m, "@12", 300, 3, 1, 1, 32, 0xAB);
    tlsa_rr(&m, "@12", 300, 2, 1, 1, 32, 0xAC);
    uint32_t ttl = UINT32_MAX;
    assert_int_equal(wire_tlsa(m.b, m.n, "_25._tcp.mx.x.test", t, 4, &ttl), 2);
    for (size_t len = 0; len < m.n; len++) {
        uint8_t *cut = malloc(len ? len : 1);
        memcpy(cut, m.b, len);
        ttl = UINT32_MAX;
        int rc = wire_tlsa(cut, len, "_25._tcp.mx.x.test", t, 4, &ttl);
        /* never both records from a cut message: each one is whole or refused */
        assert_true(rc == -EBADMSG || rc == 0 || rc == 1);
        for (int i = 0; i < rc; i++)
            assert_true(t[i].data + t[i].len <= cut + len);
        free(cut);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mx_with_compression),
        cmocka_unit_test(test_many_mx_keeps_the_most_preferred),
        cmocka_unit_test(test_mx_past_the_walk_bound),
        cmocka_unit_test(test_cname_chain),
        cmocka_unit_test(test_negative_answers),
        cmocka_unit_test(test_referral),
        cmocka_unit_test(test_odd_targets),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_pointer_chain),
        cmocka_unit_test(test_txt),
        cmocka_unit_test(test_txt_over_room_dropped),
        cmocka_unit_test(test_txt_every_record),
        cmocka_unit_test(test_txt_nul_dropped),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_tlsa_records_and_ad),
        cmocka_unit_test(test_tlsa_every_truncation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
