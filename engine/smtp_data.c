/*
 * smtp_data: dot-unstuffing (server) and dot-stuffing (client), see
 * smtp_data.h. Both spend their time in one loop that copies a run of
 * ordinary octets sixteen at a time while looking for the few octets that
 * matter (CR, LF, and NUL when receiving); the state machine around it runs
 * once per line start and line end.
 *
 * Threading: pure functions; a state struct belongs to one session.
 */
#include "engine/smtp_data.h"

#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

enum { ST_LINE_START, ST_MID, ST_CR, ST_END };

/* How run_unstuff() may write: not at all (in place, nothing removed yet,
 * the octets are already where they belong), whole blocks past the run's
 * end (out does not overlap in and has room), or only the run itself (in
 * place behind the read position: a store past the run would overwrite
 * input not yet read). */
enum copy_mode { COPY_NONE, COPY_ANY, COPY_RUN };

/*
 * Copy p[0..n) to out up to the first CR, LF or NUL and return its index
 * (n when there is none). *hi gathers the top bits of the octets copied.
 */
static inline size_t
run_unstuff(const char *p, size_t n, char *out, enum copy_mode mode, unsigned *hi)
{
    size_t i = 0;

#if defined(__SSE2__)
    const __m128i cr = _mm_set1_epi8('\r'), lf = _mm_set1_epi8('\n'), nul = _mm_setzero_si128();

    for (; i + 16 <= n; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(p + i));
        __m128i stop = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, cr), _mm_cmpeq_epi8(v, lf)),
                                    _mm_cmpeq_epi8(v, nul));
        unsigned m = (unsigned)_mm_movemask_epi8(stop);
        unsigned h = (unsigned)_mm_movemask_epi8(v);

        if (m != 0) {
            unsigned k = (unsigned)__builtin_ctz(m);

            *hi |= h & ((1u << k) - 1);
            if (mode == COPY_ANY)
                _mm_storeu_si128((__m128i *)(void *)(out + i), v);
            else if (mode == COPY_RUN)
                memmove(out + i, p + i, k);
            return i + k;
        }
        *hi |= h;
        if (mode != COPY_NONE)
            _mm_storeu_si128((__m128i *)(void *)(out + i), v);
    }
#endif
    for (; i < n; i++) {
        char c = p[i];

        if (c == '\r' || c == '\n' || c == '\0')
            break;
        *hi |= (unsigned char)c & 0x80u;
        if (mode != COPY_NONE)
            out[i] = c;
    }
    return i;
}

void
smtp_unstuff_init(struct smtp_unstuff *u)
{
    memset(u, 0, sizeof *u);
    u->state = ST_LINE_START;
}

static inline void
flag_bare(struct smtp_unstuff *u, uint32_t flag, uint64_t off)
{
    if (!(u->flags & (SMTP_DATA_F_BARE_LF | SMTP_DATA_F_BARE_CR)))
        u->bare_off = off;
    u->flags |= flag;
}

int
smtp_unstuff(struct smtp_unstuff *u, const char *in, size_t len, char *out, size_t *consumed,
             size_t *produced)
{
    const uint64_t base = u->in_total;
    const bool apart =
        (uintptr_t)out + len <= (uintptr_t)in || (uintptr_t)in + len <= (uintptr_t)out;
    unsigned st = u->state, hi = 0;
    size_t i = 0, o = 0, ll = u->line_len;
    int rc = SMTP_DATA_MORE;

    if (st == ST_END) {
        *consumed = *produced = 0;
        return SMTP_DATA_END;
    }
    for (;;) {
        enum copy_mode mode;
        size_t n;
        char c;

        if (st == ST_CR) {
            if (i == len)
                break;
            if (in[i] == '\n') {
                out[o++] = '\n';
                i++;
                if (ll > SMTP_DATA_LINE_MAX)
                    u->flags |= SMTP_DATA_F_LONG_LINE;
                ll = 0;
                st = ST_LINE_START;
                continue;
            }
            /* The CR was written already; it is content, and a bare one. */
            flag_bare(u, SMTP_DATA_F_BARE_CR, base + i - 1);
            ll++;
            st = ST_MID;
        } else if (st == ST_LINE_START) {
            if (i == len)
                break;
            if (in[i] == '.') {
                /* "." or ".\r" at the end of the input: the next octets
                 * decide, so leave them for the next call. */
                if (len - i < 2 || (in[i + 1] == '\r' && len - i < 3))
                    break;
                if (in[i + 1] == '\r' && in[i + 2] == '\n') {
                    i += 3;
                    st = ST_END;
                    rc = SMTP_DATA_END;
                    break;
                }
                i++;
            }
            st = ST_MID;
        }

        if (apart)
            mode = COPY_ANY;
        else
            mode = out + o == in + i ? COPY_NONE : COPY_RUN;
        n = run_unstuff(in + i, len - i, out + o, mode, &hi);
        i += n;
        o += n;
        ll += n;
        if (i == len)
            break;
        c = in[i++];
        out[o++] = c;
        if (c == '\r') {
            st = ST_CR;
            continue;
        }
        ll++;
        if (c == '\n')
            flag_bare(u, SMTP_DATA_F_BARE_LF, base + i - 1);
        else
            u->flags |= SMTP_DATA_F_NUL;
    }
    if (ll > SMTP_DATA_LINE_MAX)
        u->flags |= SMTP_DATA_F_LONG_LINE;
    if (hi != 0)
        u->flags |= SMTP_DATA_F_8BIT;
    u->state = (uint8_t)st;
    u->line_len = ll > SMTP_DATA_LINE_MAX + 1 ? SMTP_DATA_LINE_MAX + 1 : (uint32_t)ll;
    u->in_total += i;
    u->out_total += o;
    *consumed = i;
    *produced = o;
    return rc;
}

/* ---- stuffing ---- */

/* Copy p[0..n) to out (room for n) up to the first CR or LF; return its
 * index, n when there is none. */
static inline size_t
run_stuff(const char *p, size_t n, char *out)
{
    size_t i = 0;

#if defined(__SSE2__)
    const __m128i cr = _mm_set1_epi8('\r'), lf = _mm_set1_epi8('\n');

    for (; i + 16 <= n; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(p + i));
        unsigned m =
            (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, cr), _mm_cmpeq_epi8(v, lf)));

        /* The whole block fits: octets past the stop are rewritten later. */
        _mm_storeu_si128((__m128i *)(void *)(out + i), v);
        if (m != 0)
            return i + (unsigned)__builtin_ctz(m);
    }
#endif
    for (; i < n; i++) {
        char c = p[i];

        if (c == '\r' || c == '\n')
            break;
        out[i] = c;
    }
    return i;
}

void
smtp_stuff_init(struct smtp_stuff *s)
{
    s->state = ST_LINE_START;
    s->fin = 0;
    s->fin_pos = 0;
}

void
smtp_stuff(struct smtp_stuff *s, const char *in, size_t len, char *out, size_t cap,
           size_t *consumed, size_t *produced)
{
    unsigned st = s->state;
    size_t i = 0, o = 0;

    for (;;) {
        size_t lim, n;

        if (st == ST_CR) {
            /* A CR is followed by LF on the wire whatever came next. */
            if (i == len || o == cap)
                break;
            out[o++] = '\n';
            if (in[i] == '\n')
                i++;
            st = ST_LINE_START;
        }
        if (st == ST_LINE_START) {
            if (i == len)
                break;
            if (in[i] == '.') {
                if (cap - o < 2)
                    break;
                out[o++] = '.';
                out[o++] = '.';
                i++;
            }
            st = ST_MID;
        }
        lim = len - i < cap - o ? len - i : cap - o;
        n = run_stuff(in + i, lim, out + o);
        i += n;
        o += n;
        if (n == lim)
            break;
        if (in[i] == '\r') {
            out[o++] = '\r';
            st = ST_CR;
        } else {
            if (cap - o < 2)
                break;
            out[o++] = '\r';
            out[o++] = '\n';
            st = ST_LINE_START;
        }
        i++;
    }
    s->state = (uint8_t)st;
    *consumed = i;
    *produced = o;
}

int
smtp_stuff_finish(struct smtp_stuff *s, char *out, size_t cap, size_t *produced)
{
    static const char *const tails[] = {"", ".\r\n", "\n.\r\n", "\r\n.\r\n"};
    const char *t;
    size_t tl, k;

    if (s->fin == 0)
        s->fin = s->state == ST_LINE_START ? 1 : s->state == ST_CR ? 2 : 3;
    t = tails[s->fin];
    tl = strlen(t);
    k = tl - s->fin_pos < cap ? tl - s->fin_pos : cap;
    memcpy(out, t + s->fin_pos, k);
    s->fin_pos = (uint8_t)(s->fin_pos + k);
    *produced = k;
    return s->fin_pos == tl ? SMTP_DATA_END : SMTP_DATA_MORE;
}
