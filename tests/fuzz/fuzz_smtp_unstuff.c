/*
 * libFuzzer target: dot-unstuffing. The first two octets choose read
 * sizes; the rest is a DATA stream, unstuffed whole into another buffer
 * and in chunks in place, which must agree. Invariants: output never
 * longer than input; the end is a real CRLF . CRLF; without bare CR/LF
 * the content is CRLF lines, and stuffing it again then unstuffing gives
 * it back.
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/smtp_data.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check(int cond)
{
    if (!cond)
        abort();
}

struct result {
    int rc;
    size_t consumed, out_len;
    uint32_t flags;
    uint64_t bare_off;
};

/* Chunks of step1, step2, step1, ... with the unconsumed tail kept in
 * front of the next chunk, unstuffed in place when inplace is set. */
static void
run(const char *in, size_t len, size_t step1, size_t step2, int inplace, char *work, char *out,
    struct result *r)
{
    struct smtp_unstuff u;
    size_t pos = 0, plen = 0, k = 0;

    smtp_unstuff_init(&u);
    memset(r, 0, sizeof *r);
    r->rc = SMTP_DATA_MORE;
    while (r->rc == SMTP_DATA_MORE && pos < len) {
        size_t step = (k++ & 1) ? step2 : step1, take = len - pos < step ? len - pos : step;
        size_t consumed = 0, produced = 0;
        char *o = inplace ? work : out + r->out_len;

        memcpy(work + plen, in + pos, take);
        pos += take;
        plen += take;
        r->rc = smtp_unstuff(&u, work, plen, o, &consumed, &produced);
        check(consumed <= plen && produced <= consumed);
        check(r->rc == SMTP_DATA_END || plen - consumed <= 2);
        if (inplace)
            memcpy(out + r->out_len, work, produced);
        r->out_len += produced;
        r->consumed += consumed;
        memmove(work, work + consumed, plen - consumed);
        plen -= consumed;
    }
    check(u.out_total == r->out_len && u.in_total == r->consumed);
    r->flags = u.flags;
    r->bare_off = u.bare_off;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *in = (const char *)data + 2;
    size_t len = size < 2 ? 0 : size - 2;
    char *work, *out1, *out2, *wire;
    struct result whole, split;

    if (size < 2)
        return 0;
    work = malloc(len + 1);
    out1 = malloc(len + 1);
    out2 = malloc(len + 1);
    run(in, len, len + 1, len + 1, 0, work, out1, &whole);
    run(in, len, 1 + data[0] % 32, 1 + data[1], 1, work, out2, &split);
    check(whole.rc == split.rc && whole.consumed == split.consumed &&
          whole.out_len == split.out_len && whole.flags == split.flags);
    check(memcmp(out1, out2, whole.out_len) == 0);
    if (whole.flags & (SMTP_DATA_F_BARE_CR | SMTP_DATA_F_BARE_LF))
        check(whole.bare_off == split.bare_off && whole.bare_off < whole.consumed);
    check(whole.out_len <= whole.consumed);

    if (whole.rc == SMTP_DATA_END) {
        size_t c = whole.consumed;

        check(c >= 3 && memcmp(in + c - 3, ".\r\n", 3) == 0);
        check(c == 3 || memcmp(in + c - 5, "\r\n", 2) == 0);
        check(whole.out_len == 0 || memcmp(out1 + whole.out_len - 2, "\r\n", 2) == 0);
    }
    if (!(whole.flags & (SMTP_DATA_F_BARE_CR | SMTP_DATA_F_BARE_LF)) && whole.rc == SMTP_DATA_END) {
        /* clean content: stuff it, unstuff that, get it back */
        struct smtp_stuff s;
        struct smtp_unstuff u;
        size_t consumed, produced, fin, w;

        wire = malloc(2 * whole.out_len + 8);
        smtp_stuff_init(&s);
        smtp_stuff(&s, out1, whole.out_len, wire, 2 * whole.out_len + 8, &consumed, &w);
        check(consumed == whole.out_len);
        check(smtp_stuff_finish(&s, wire + w, 8, &fin) == SMTP_DATA_END);
        w += fin;
        smtp_unstuff_init(&u);
        check(smtp_unstuff(&u, wire, w, wire, &consumed, &produced) == SMTP_DATA_END);
        check(consumed == w && produced == whole.out_len);
        check(memcmp(wire, out1, produced) == 0);
        free(wire);
    }
    free(work);
    free(out1);
    free(out2);
    return 0;
}
