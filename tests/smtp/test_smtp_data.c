/*
 * Tests of engine/smtp_data.c: dot-unstuffing and dot-stuffing from
 * tables, each input whole, at every split into two reads and byte by
 * byte (and unstuffing both into another buffer and in place); the
 * smuggling variants; NUL, 8-bit and long lines; and seeded random
 * messages through stuff then unstuff, which must give them back.
 *
 * Threading: single-threaded test program.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "engine/smtp_data.h"

#define L(s) s, sizeof(s) - 1
#define BIG  (256 * 1024)

/* ---- unstuff driver: a server reading in chunks ---- */

struct ures {
    int rc;
    size_t consumed; /* input octets up to the end of data (when END) */
    uint32_t flags;
    uint64_t bare_off;
    size_t out_len;
    char out[BIG];
};

static char pend[BIG + 16], outbuf[BIG + 16];
static struct ures ref, got;

/*
 * Feed in[0..len) cut at cuts[0..ncuts) (ascending). Between reads the
 * unconsumed tail is kept and presented again, as a server would. inplace:
 * unstuff within the receive buffer itself.
 */
static void
unstuff_run(const char *in, size_t len, const size_t *cuts, size_t ncuts, bool inplace,
            struct ures *r)
{
    struct smtp_unstuff u;
    size_t plen = 0, pos = 0, fed = 0;

    smtp_unstuff_init(&u);
    r->rc = SMTP_DATA_MORE;
    r->out_len = 0;
    r->consumed = 0;
    for (size_t k = 0; k <= ncuts && r->rc != SMTP_DATA_END; k++) {
        size_t stop = k < ncuts ? cuts[k] : len, consumed = 0, produced = 0;
        char *out = inplace ? pend : outbuf;

        memcpy(pend + plen, in + pos, stop - pos);
        plen += stop - pos;
        pos = stop;
        memset(outbuf, '#', plen + 16);
        r->rc = smtp_unstuff(&u, pend, plen, out, &consumed, &produced);
        assert_true(consumed <= plen);
        assert_true(produced <= consumed);
        if (r->rc == SMTP_DATA_MORE)
            assert_true(plen - consumed <= 2);
        /* the output never goes past what was produced in a separate buffer
         * beyond the input length */
        if (!inplace)
            for (size_t i = plen; i < plen + 16 && i < sizeof outbuf; i++)
                assert_int_equal(outbuf[i], '#');
        memcpy(r->out + r->out_len, out, produced);
        r->out_len += produced;
        fed += consumed;
        memmove(pend, pend + consumed, plen - consumed);
        plen -= consumed;
    }
    if (r->rc == SMTP_DATA_END)
        r->consumed = fed;
    r->flags = u.flags;
    r->bare_off = u.bare_off;
    assert_true(u.out_total == r->out_len);
    assert_true(u.in_total == fed);
    /* once ended, it stays ended */
    if (r->rc == SMTP_DATA_END) {
        size_t c = 1, p = 1;

        assert_int_equal(smtp_unstuff(&u, "x\r\n", 3, outbuf, &c, &p), SMTP_DATA_END);
        assert_int_equal(c + p, 0);
    }
}

static void
same_ures(const struct ures *a, const struct ures *b, const char *how, size_t at)
{
    if (a->rc != b->rc || a->consumed != b->consumed || a->flags != b->flags ||
        a->out_len != b->out_len || memcmp(a->out, b->out, a->out_len) != 0 ||
        ((a->flags & (SMTP_DATA_F_BARE_CR | SMTP_DATA_F_BARE_LF)) && a->bare_off != b->bare_off))
        fail_msg("%s %zu: rc %d consumed %zu flags %#x out %zu, whole: rc %d consumed %zu "
                 "flags %#x out %zu",
                 how, at, a->rc, a->consumed, (unsigned)a->flags, a->out_len, b->rc, b->consumed,
                 (unsigned)b->flags, b->out_len);
}

/* Whole, in place, every split in two (both ways), byte by byte. Leaves
 * the whole-input result in ref. */
static void
unstuff_all_ways(const char *in, size_t len, bool every_split)
{
    static size_t cuts[BIG];

    unstuff_run(in, len, NULL, 0, false, &ref);
    unstuff_run(in, len, NULL, 0, true, &got);
    same_ures(&got, &ref, "in place", 0);
    if (every_split) {
        for (size_t cut = 0; cut <= len; cut++) {
            unstuff_run(in, len, &cut, 1, false, &got);
            same_ures(&got, &ref, "split at", cut);
            unstuff_run(in, len, &cut, 1, true, &got);
            same_ures(&got, &ref, "in place, split at", cut);
        }
    }
    for (size_t i = 0; i < len; i++)
        cuts[i] = i + 1;
    unstuff_run(in, len, cuts, len, false, &got);
    same_ures(&got, &ref, "byte by byte", 0);
    unstuff_run(in, len, cuts, len, true, &got);
    same_ures(&got, &ref, "in place, byte by byte", 0);
}

#define F(x) SMTP_DATA_F_##x

struct ucase {
    const char *in;
    size_t len;
    const char *out;
    size_t out_len;
    int rc;
    size_t consumed; /* when END */
    uint32_t flags;
    uint64_t bare_off;
};

/* clang-format off */
#define END_(i, o, c, f, b) {L(i), L(o), SMTP_DATA_END, c, f, b}
#define MORE_(i, o, f, b)   {L(i), L(o), SMTP_DATA_MORE, 0, f, b}
/* clang-format on */

static const struct ucase ucases[] = {
    END_(".\r\n", "", 3, 0, 0),
    END_("\r\n.\r\n", "\r\n", 5, 0, 0),
    END_("a\r\n.\r\n", "a\r\n", 6, 0, 0),
    END_("a\r\n.\r\nMAIL FROM:<>\r\n", "a\r\n", 6, 0, 0),
    END_("a\r\n.\r\n.\r\n", "a\r\n", 6, 0, 0),
    END_("..\r\n.\r\n", ".\r\n", 7, 0, 0),
    END_("...\r\n.\r\n", "..\r\n", 8, 0, 0),
    END_(".a\r\n.\r\n", "a\r\n", 7, 0, 0),
    END_("a.\r\n.\r\n", "a.\r\n", 7, 0, 0),
    END_("a\r\n..\r\nb\r\n.\r\n", "a\r\n.\r\nb\r\n", 13, 0, 0),
    END_("a\r\n. \r\n.\r\n", "a\r\n \r\n", 10, 0, 0),
    MORE_("", "", 0, 0),
    MORE_("a\r\n", "a\r\n", 0, 0),
    MORE_("a\r\n.", "a\r\n", 0, 0),
    MORE_("a\r\n.\r", "a\r\n", 0, 0),
    MORE_("a\r", "a\r", 0, 0),
    MORE_("a\r\n..", "a\r\n.", 0, 0),

    /* smuggling: none of these ends the data, all are flagged */
    END_("a\n.\nb\r\n.\r\n", "a\n.\nb\r\n", 10, F(BARE_LF), 1),
    END_("a\r.\rb\r\n.\r\n", "a\r.\rb\r\n", 10, F(BARE_CR), 1),
    END_("a\r\n.\nb\r\n.\r\n", "a\r\n\nb\r\n", 11, F(BARE_LF), 4),
    END_("a\n.\r\nb\r\n.\r\n", "a\n.\r\nb\r\n", 11, F(BARE_LF), 1),
    END_("a\r\n.\rb\r\n.\r\n", "a\r\n\rb\r\n", 11, F(BARE_CR), 4),
    END_("a\r\n.\r.\r\n.\r\n", "a\r\n\r.\r\n", 11, F(BARE_CR), 4),
    END_("a\n..\nb\r\n.\r\n", "a\n..\nb\r\n", 11, F(BARE_LF), 1),
    END_("a\r..\rb\r\n.\r\n", "a\r..\rb\r\n", 11, F(BARE_CR), 1),
    END_("a\r\n..\nb\r\n.\r\n", "a\r\n.\nb\r\n", 12, F(BARE_LF), 5),
    END_("a\n..\r\nb\r\n.\r\n", "a\n..\r\nb\r\n", 12, F(BARE_LF), 1),
    END_("a\r\n..\rb\r\n.\r\n", "a\r\n.\rb\r\n", 12, F(BARE_CR), 5),
    MORE_("a\n.\n", "a\n.\n", F(BARE_LF), 1),
    MORE_("a\r.\r", "a\r.\r", F(BARE_CR), 1),
    MORE_("a\r\n.\n", "a\r\n\n", F(BARE_LF), 4),
    MORE_("a\n.\r\n", "a\n.\r\n", F(BARE_LF), 1),
    MORE_("a\r\n.\rx", "a\r\n\rx", F(BARE_CR), 4),
    MORE_("a\r\n.\r\r\n", "a\r\n\r\r\n", F(BARE_CR), 4),
    MORE_(".\n", "\n", F(BARE_LF), 1),
    MORE_("\n.\r\n", "\n.\r\n", F(BARE_LF), 0),
    MORE_("\r.\r\n", "\r.\r\n", F(BARE_CR), 0),
    /* a bare CR, then a real CRLF . CRLF: that one ends */
    END_("a\r\r\n.\r\n", "a\r\r\n", 7, F(BARE_CR), 1),
    MORE_("a\n\r\n.\r", "a\n\r\n", F(BARE_LF), 1),
    /* the first bare octet is the one reported */
    END_("a\rb\nc\r\n.\r\n", "a\rb\nc\r\n", 10, F(BARE_CR) | F(BARE_LF), 1),
    END_("ab\ncd\re\r\n.\r\n", "ab\ncd\re\r\n", 12, F(BARE_CR) | F(BARE_LF), 2),

    /* NUL and 8-bit: content, flagged */
    END_("a\0b\r\n.\r\n", "a\0b\r\n", 8, F(NUL), 0),
    END_(".\0\r\n.\r\n", "\0\r\n", 7, F(NUL), 0),
    END_("caf\xc3\xa9\r\n.\r\n", "caf\xc3\xa9\r\n", 10, F(8BIT), 0),
    END_("\x80\r\n.\r\n\xff", "\x80\r\n", 6, F(8BIT), 0),
    /* octets after the end are not the message's */
    END_("a\r\n.\r\n\xff\0\n", "a\r\n", 6, 0, 0),
    END_("abcdefghijklmnopqrstuvwxyz0123456789\r\n.\r\n\xff\0\nabcdefghijklmnopqrstuvwxyz",
         "abcdefghijklmnopqrstuvwxyz0123456789\r\n", 41, 0, 0),
};

static void
test_unstuff_table(void **state)
{
    for (size_t i = 0; i < sizeof ucases / sizeof ucases[0]; i++) {
        const struct ucase *c = &ucases[i];

        unstuff_all_ways(c->in, c->len, true);
        if (ref.rc != c->rc || ref.out_len != c->out_len ||
            memcmp(ref.out, c->out, c->out_len) != 0 || ref.flags != c->flags ||
            (c->rc == SMTP_DATA_END && ref.consumed != c->consumed))
            fail_msg("case %zu: rc %d out %zu consumed %zu flags %#x", i, ref.rc, ref.out_len,
                     ref.consumed, (unsigned)ref.flags);
        if ((c->flags & (F(BARE_LF) | F(BARE_CR))) && ref.bare_off != c->bare_off)
            fail_msg("case %zu: bare_off %llu, want %llu", i, (unsigned long long)ref.bare_off,
                     (unsigned long long)c->bare_off);
    }
}

static void
test_unstuff_long_lines(void **state)
{
    static char in[4096];
    size_t n;

    for (size_t len = 996; len <= 1001; len++) {
        memset(in, 'x', len);
        memcpy(in + len, "\r\n.\r\n", 5);
        n = len + 5;
        unstuff_all_ways(in, n, len == 998 || len == 999);
        assert_int_equal(ref.rc, SMTP_DATA_END);
        assert_int_equal(ref.out_len, len + 2);
        assert_int_equal(ref.flags, len > SMTP_DATA_LINE_MAX ? F(LONG_LINE) : 0);
    }
    /* a stuffed dot is not content: 998 after unstuffing */
    in[0] = '.';
    memset(in + 1, 'x', 998);
    memcpy(in + 999, "\r\n.\r\n", 5);
    unstuff_all_ways(in, 1004, false);
    assert_int_equal(ref.out_len, 1000);
    assert_int_equal(ref.flags, 0);
    /* an unterminated long line is flagged before its end arrives */
    memset(in, 'y', 2000);
    unstuff_all_ways(in, 2000, false);
    assert_int_equal(ref.rc, SMTP_DATA_MORE);
    assert_int_equal(ref.flags, F(LONG_LINE));
}

/* ---- stuff driver ---- */

struct sres {
    size_t len;
    char out[2 * BIG + 16];
};

static struct sres sref, sgot;

/* Feed chunks cut at cuts[], each into an output buffer of cap octets
 * (as many rounds as it takes), then finish. */
static void
stuff_run(const char *in, size_t len, const size_t *cuts, size_t ncuts, size_t cap, struct sres *r)
{
    struct smtp_stuff s;
    size_t pos = 0;
    char *o = r->out;
    int rc;

    smtp_stuff_init(&s);
    for (size_t k = 0; k <= ncuts; k++) {
        size_t stop = k < ncuts ? cuts[k] : len;

        while (pos < stop) {
            size_t consumed = 0, produced = 0;

            memset(o, '#', cap + 16);
            smtp_stuff(&s, in + pos, stop - pos, o, cap, &consumed, &produced);
            assert_true(produced <= cap);
            for (size_t i = cap; i < cap + 16; i++)
                assert_int_equal(o[i], '#');
            /* progress unless out is (nearly) full */
            assert_true(consumed > 0 || produced > 0 || cap < 2);
            pos += consumed;
            o += produced;
        }
    }
    do {
        size_t produced = 0;

        rc = smtp_stuff_finish(&s, o, cap, &produced);
        assert_true(produced <= cap);
        o += produced;
    } while (rc == SMTP_DATA_MORE);
    r->len = (size_t)(o - r->out);
}

/* No CR without LF after it, no LF without CR before it. */
static void
assert_crlf_only(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\r' && (i + 1 == n || p[i + 1] != '\n'))
            fail_msg("bare CR at %zu", i);
        if (p[i] == '\n' && (i == 0 || p[i - 1] != '\r'))
            fail_msg("bare LF at %zu", i);
    }
}

static void
same_sres(const struct sres *a, const struct sres *b, const char *how, size_t at)
{
    if (a->len != b->len || memcmp(a->out, b->out, a->len) != 0)
        fail_msg("%s %zu: %zu octets, whole: %zu", how, at, a->len, b->len);
}

static void
stuff_all_ways(const char *in, size_t len, bool every_split)
{
    static size_t cuts[BIG];

    stuff_run(in, len, NULL, 0, 2 * len + 16, &sref);
    assert_crlf_only(sref.out, sref.len);
    if (every_split) {
        for (size_t cut = 0; cut <= len; cut++) {
            stuff_run(in, len, &cut, 1, 2 * len + 16, &sgot);
            same_sres(&sgot, &sref, "split at", cut);
        }
        for (size_t cap = 2; cap < sref.len + 2; cap++) {
            stuff_run(in, len, NULL, 0, cap, &sgot);
            same_sres(&sgot, &sref, "out cap", cap);
        }
    }
    for (size_t i = 0; i < len; i++)
        cuts[i] = i + 1;
    stuff_run(in, len, cuts, len, 2 * len + 16, &sgot);
    same_sres(&sgot, &sref, "byte by byte", 0);
    stuff_run(in, len, cuts, len, 2, &sgot);
    same_sres(&sgot, &sref, "byte by byte, out cap", 2);
}

static void
test_stuff_table(void **state)
{
    static const struct {
        const char *in;
        size_t len;
        const char *out;
        size_t out_len;
    } cases[] = {
        {L(""), L(".\r\n")},
        {L("a\r\n"), L("a\r\n.\r\n")},
        {L("a"), L("a\r\n.\r\n")},
        {L(".\r\n"), L("..\r\n.\r\n")},
        {L("."), L("..\r\n.\r\n")},
        {L(".."), L("...\r\n.\r\n")},
        {L("a\r\n.b\r\n"), L("a\r\n..b\r\n.\r\n")},
        {L("a.b\r\n"), L("a.b\r\n.\r\n")},
        {L("\r\n.\r\n.\r\n"), L("\r\n..\r\n..\r\n.\r\n")},
        /* bare CR and LF go out as CRLF, and what follows starts a line */
        {L("a\n.b"), L("a\r\n..b\r\n.\r\n")},
        {L("a\r.b"), L("a\r\n..b\r\n.\r\n")},
        {L("a\r"), L("a\r\n.\r\n")},
        {L("\r"), L("\r\n.\r\n")},
        {L("\r\r\n"), L("\r\n\r\n.\r\n")},
        {L("\n"), L("\r\n.\r\n")},
        {L("\n\n"), L("\r\n\r\n.\r\n")},
        {L("\n\r"), L("\r\n\r\n.\r\n")},
        {L("a\r\n\r\n"), L("a\r\n\r\n.\r\n")},
        {L("a\n.\n"), L("a\r\n..\r\n.\r\n")},
        {L("a\0b\xff\r\n"), L("a\0b\xff\r\n.\r\n")},
        {L("0123456789abcdef0123456789abcdef\n.0123456789abcdef0123456789abcdef\r"),
         L("0123456789abcdef0123456789abcdef\r\n..0123456789abcdef0123456789abcdef\r\n.\r\n")},
    };

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        stuff_all_ways(cases[i].in, cases[i].len, true);
        if (sref.len != cases[i].out_len || memcmp(sref.out, cases[i].out, sref.len) != 0)
            fail_msg("case %zu: got %zu octets '%.*s'", i, sref.len, (int)sref.len, sref.out);
    }
}

/* ---- random round trips ---- */

static uint64_t rng_state;

static uint64_t
rng(void)
{
    /* xorshift64*: deterministic, so a failure repeats */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static size_t
rnd(size_t n)
{
    return (size_t)(rng() % n);
}

/* A message of CRLF lines (bare CR/LF too when bare is set), with the
 * lines that matter: empty, only dots, leading dots, long. */
static size_t
gen_message(char *m, size_t cap, bool bare)
{
    size_t n = 0, lines = rnd(40);

    for (size_t l = 0; l < lines; l++) {
        size_t kind = rnd(8), len;

        switch (kind) {
        case 0: /* empty */
            len = 0;
            break;
        case 1: /* only dots */
            len = 1 + rnd(4);
            if (n + len + 2 > cap)
                return n;
            memset(m + n, '.', len);
            break;
        case 2: /* long */
            len = 900 + rnd(1200);
            break;
        default:
            len = rnd(100);
            break;
        }
        if (n + len + 2 > cap)
            break;
        if (kind != 1) {
            for (size_t i = 0; i < len; i++) {
                size_t r = rnd(100);
                char c = (char)(' ' + rnd(95));

                if (r < 3)
                    c = '.';
                else if (r < 4)
                    c = (char)(0x80 + rnd(128));
                else if (r < 5)
                    c = '\0';
                else if (bare && r < 7)
                    c = r == 5 ? '\r' : '\n';
                m[n + i] = c;
            }
            if (len > 0 && rnd(3) == 0)
                m[n] = '.';
        }
        n += len;
        if (l + 1 < lines || rnd(4) != 0) {
            m[n++] = '\r';
            m[n++] = '\n';
        }
    }
    return n;
}

/* What the wire makes of a stored message: every CR, LF or CRLF a CRLF. */
static size_t
normalise(const char *in, size_t len, char *out)
{
    size_t o = 0;

    for (size_t i = 0; i < len; i++) {
        if (in[i] == '\r' || in[i] == '\n') {
            if (in[i] == '\r' && i + 1 < len && in[i + 1] == '\n')
                i++;
            out[o++] = '\r';
            out[o++] = '\n';
        } else {
            out[o++] = in[i];
        }
    }
    return o;
}

/* Random cuts of [0, len). */
static size_t
random_cuts(size_t len, size_t *cuts, size_t max)
{
    size_t n = 0, at = 0;

    while (n < max) {
        at += 1 + rnd(rnd(2) ? 7 : 3000);
        if (at >= len)
            break;
        cuts[n++] = at;
    }
    return n;
}

static void
round_trip(bool bare, int rounds)
{
    static char msg[BIG], norm[2 * BIG], wire[2 * BIG + 64];
    static size_t cuts[4096];

    for (int r = 0; r < rounds; r++) {
        size_t n = gen_message(msg, sizeof msg / 4, bare), nn, ncuts, w;
        size_t cap = 2 + rnd(rnd(2) ? 10 : 5000);

        nn = normalise(msg, n, norm);
        /* the wire ends the last line when the message did not */
        if (nn > 0 && norm[nn - 1] != '\n') {
            norm[nn++] = '\r';
            norm[nn++] = '\n';
        }
        ncuts = random_cuts(n, cuts, 4096);
        stuff_run(msg, n, cuts, ncuts, cap, &sgot);
        assert_crlf_only(sgot.out, sgot.len);
        /* the next command follows in the same read */
        w = sgot.len;
        memcpy(wire, sgot.out, w);
        memcpy(wire + w, "QUIT\r\n", 6);
        ncuts = random_cuts(w + 6, cuts, 4096);
        unstuff_run(wire, w + 6, cuts, ncuts, rnd(2) == 0, &got);
        assert_int_equal(got.rc, SMTP_DATA_END);
        assert_int_equal(got.consumed, w);
        assert_int_equal(got.out_len, nn);
        assert_memory_equal(got.out, norm, nn);
        assert_int_equal(got.flags & (F(BARE_CR) | F(BARE_LF)), 0);
        assert_int_equal((got.flags & F(NUL)) != 0, memchr(norm, 0, nn) != NULL);
    }
}

static void
test_round_trip(void **state)
{
    rng_state = 0x5eed5eed12345678ull;
    round_trip(false, 400);
}

static void
test_round_trip_bare(void **state)
{
    rng_state = 0xdeadbeefcafef00dull;
    round_trip(true, 400);
}

/* Random messages, CRLF only: every split of the stuffed wire into two
 * reads unstuffs the same (smaller messages, so that every cut is cheap). */
static void
test_random_splits(void **state)
{
    static char msg[8192];

    rng_state = 42;
    for (int r = 0; r < 30; r++) {
        size_t n = gen_message(msg, sizeof msg, r % 3 == 0);

        stuff_all_ways(msg, n, n < 3000);
        unstuff_all_ways(sref.out, sref.len, sref.len < 3000);
        assert_int_equal(ref.rc, SMTP_DATA_END);
        assert_int_equal(ref.consumed, sref.len);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unstuff_table),   cmocka_unit_test(test_unstuff_long_lines),
        cmocka_unit_test(test_stuff_table),     cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_round_trip_bare), cmocka_unit_test(test_random_splits),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
