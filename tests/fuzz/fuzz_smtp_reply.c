/*
 * libFuzzer target: the reply parser. The first two octets choose read
 * sizes; the stream is parsed whole and in those reads, which must give
 * the same replies and the same error. Invariants: bounds, codes, the
 * enhanced class, the cut lines of a truncated reply, and EHLO parsing
 * of every 250 reply. Seeds over the text kept (long, cut_ehlo) and past
 * SMTP_REPLY_RAW_MAX (endless) lift libFuzzer's length bound (the
 * longest seed's) to reach those paths.
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/smtp_reply.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check(int cond)
{
    if (!cond)
        abort();
}

/* A digest of the replies, so two runs can be compared cheaply. */
struct trace {
    uint64_t hash;
    unsigned replies;
    int err;
};

static void
mix(struct trace *t, const void *p, size_t n)
{
    const unsigned char *s = p;

    for (size_t i = 0; i < n; i++)
        t->hash = (t->hash ^ s[i]) * 0x100000001b3ull;
}

static void
on_reply(struct trace *t, const struct smtp_reply *r)
{
    struct smtp_ehlo caps;
    struct smtp_span line;

    check(r->code >= 200 && r->code <= 559 && r->code % 100 <= 59);
    check(r->nlines >= 1 && r->nlines <= SMTP_REPLY_LINES_MAX);
    check(r->text_len <= SMTP_REPLY_TEXT_MAX && r->text[r->text_len] == '\0');
    check(memchr(r->text, '\r', r->text_len) == NULL);
    check(memchr(r->text, '\0', r->text_len) == NULL);
    if (r->enh.cls != 0)
        check(r->enh.cls == r->code / 100 && r->enh_len >= 5);
    for (unsigned i = 0; i < r->nlines; i++) {
        check(smtp_reply_line(r, i, &line) == 0);
        check(line.ptr >= r->text && line.ptr + line.len <= r->text + r->text_len);
        check(line.len <= SMTP_REPLY_LINE_MAX - 6);
        check(!smtp_reply_line_cut(r, i) || r->truncated);
        mix(t, &r->line_off[i], sizeof r->line_off[i]);
    }
    check(!smtp_reply_line_cut(r, r->nlines));
    check(smtp_reply_ehlo(r, &caps) == (r->code == 250 ? 0 : SMTP_REPLY_E_NOT_EHLO));
    mix(t, &r->code, sizeof r->code);
    mix(t, &r->nlines, sizeof r->nlines);
    mix(t, &r->enh, sizeof r->enh);
    mix(t, &r->truncated, sizeof r->truncated);
    mix(t, r->cut, sizeof r->cut);
    mix(t, r->text, r->text_len);
    t->replies++;
}

static struct smtp_reply_parser parser;

static void
run(const char *in, size_t len, size_t step1, size_t step2, struct trace *t)
{
    size_t off = 0, k = 0;

    memset(t, 0, sizeof *t);
    smtp_reply_parser_init(&parser);
    while (off < len) {
        size_t step = (k++ & 1) ? step2 : step1, end = len - off < step ? len : off + step;

        while (off < end) {
            size_t used = 0;
            int rc = smtp_reply_parse(&parser, in + off, end - off, &used);

            check(used <= end - off);
            if (rc < 0) {
                t->err = rc;
                check(smtp_reply_parse(&parser, in, len, &used) == rc && used == 0);
                return;
            }
            off += used;
            if (rc == SMTP_REPLY_DONE)
                on_reply(t, &parser.reply);
            else
                check(rc == SMTP_REPLY_MORE && off == end);
        }
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct trace whole, split;

    if (size < 2)
        return 0;
    run((const char *)data + 2, size - 2, size, size, &whole);
    run((const char *)data + 2, size - 2, 1 + data[0] % 64, 1 + data[1], &split);
    check(whole.hash == split.hash && whole.replies == split.replies && whole.err == split.err);
    return 0;
}
