/*
 * fuzz_dkim: the DKIM parsers of untrusted input. The input is a message:
 * its From: domain and header fields are parsed (never a crash, the
 * domain is lowercase when found), and its body hash, for both
 * canonicalizations, is the same fed whole and fed in three pieces cut
 * where the input's first two octets say (streaming must not depend on
 * how the body arrives).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dkim/dkim.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char dom[256];
    if (dkim_from_domain((const char *)data, size, dom, sizeof(dom)) == 0)
        for (const char *c = dom; *c; c++)
            if (*c >= 'A' && *c <= 'Z')
                abort();
    static struct dkim_body *a, *b;
    if (a == NULL) {
        a = dkim_body_new(3);
        b = dkim_body_new(3);
    }
    size_t c1 = size ? data[0] % (size + 1) : 0;
    size_t c2 = size > 1 ? c1 + data[1] % (size - c1 + 1) : c1;
    dkim_body_reset(a);
    dkim_body_reset(b);
    dkim_body_feed(a, data, size);
    dkim_body_feed(b, data, c1);
    dkim_body_feed(b, data + c1, c2 - c1);
    dkim_body_feed(b, data + c2, size - c2);
    for (int k = 0; k < 2; k++) {
        uint8_t ha[DKIM_HASH_LEN], hb[DKIM_HASH_LEN];
        dkim_body_final(a, (enum dkim_canon)k, ha);
        dkim_body_final(b, (enum dkim_canon)k, hb);
        if (memcmp(ha, hb, sizeof(ha)) != 0)
            abort();
    }
    return 0;
}
