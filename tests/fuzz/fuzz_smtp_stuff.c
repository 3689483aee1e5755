/*
 * libFuzzer target: dot-stuffing. The first two octets choose the input
 * chunk size and the output room; the rest is a stored message. The
 * output must hold no bare CR or LF, end with the terminator, match the
 * output of one whole call, and unstuff back to the message with every
 * line end made CRLF (and a last CRLF added when it had none).
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

/* Stuff in chunks of step into out (room for total) cap octets at a time. */
static size_t
stuff_all(const char *in, size_t len, size_t step, size_t cap, char *out, size_t total)
{
    struct smtp_stuff s;
    size_t pos = 0, o = 0;
    int rc;

    smtp_stuff_init(&s);
    while (pos < len) {
        size_t take = len - pos < step ? len - pos : step, consumed, produced;
        size_t room = total - o < cap ? total - o : cap;

        smtp_stuff(&s, in + pos, take, out + o, room, &consumed, &produced);
        check(produced <= room && consumed <= take && (consumed > 0 || produced > 0));
        pos += consumed;
        o += produced;
    }
    do {
        size_t produced, room = total - o < cap ? total - o : cap;

        check(room > 0);
        rc = smtp_stuff_finish(&s, out + o, room, &produced);
        check(produced <= room);
        o += produced;
    } while (rc == SMTP_DATA_MORE);
    return o;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *in = (const char *)data + 2;
    size_t len, n1, n2, nn = 0, consumed, produced;
    char *w1, *w2, *norm;
    struct smtp_unstuff u;

    if (size < 2)
        return 0;
    len = size - 2;
    /* at most two octets out per octet in, and "\r\n.\r\n" */
    w1 = malloc(2 * len + 8);
    w2 = malloc(2 * len + 8);
    norm = malloc(2 * len + 4);
    n1 = stuff_all(in, len, len + 1, 2 * len + 8, w1, 2 * len + 8);
    n2 = stuff_all(in, len, 1 + data[0], 2 + data[1], w2, 2 * len + 8);
    check(n1 == n2 && memcmp(w1, w2, n1) == 0);
    check(n1 >= 3 && memcmp(w1 + n1 - 3, ".\r\n", 3) == 0);
    for (size_t i = 0; i < n1; i++) {
        if (w1[i] == '\r')
            check(i + 1 < n1 && w1[i + 1] == '\n');
        if (w1[i] == '\n')
            check(i > 0 && w1[i - 1] == '\r');
    }
    for (size_t i = 0; i < len; i++) {
        if (in[i] == '\r' || in[i] == '\n') {
            if (in[i] == '\r' && i + 1 < len && in[i + 1] == '\n')
                i++;
            norm[nn++] = '\r';
            norm[nn++] = '\n';
        } else {
            norm[nn++] = in[i];
        }
    }
    if (nn > 0 && norm[nn - 1] != '\n') {
        norm[nn++] = '\r';
        norm[nn++] = '\n';
    }
    smtp_unstuff_init(&u);
    check(smtp_unstuff(&u, w1, n1, w1, &consumed, &produced) == SMTP_DATA_END);
    check(consumed == n1 && produced == nn && memcmp(w1, norm, nn) == 0);
    check(!(u.flags & (SMTP_DATA_F_BARE_CR | SMTP_DATA_F_BARE_LF)));
    free(w1);
    free(w2);
    free(norm);
    return 0;
}
