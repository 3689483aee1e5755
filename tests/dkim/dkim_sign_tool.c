/*
 * dkim-sign: sign a message with the dkim library, as the server does
 * (body hash fed in pieces of varying size as they would arrive), for
 * tests/dkim/test_vectors.py to verify with dkimpy.
 *
 *   dkim-sign KEY.pem DOMAIN SELECTOR CANON < message > signed-message
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dkim/dkim.h"

int
main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: dkim-sign KEY.pem DOMAIN SELECTOR CANON < msg\n");
        return 2;
    }
    size_t cap = 1 << 20, len = 0;
    char *msg = malloc(cap);
    size_t n;
    while (msg != NULL && (n = fread(msg + len, 1, cap - len, stdin)) > 0) {
        len += n;
        if (len == cap)
            msg = realloc(msg, cap *= 2);
    }
    if (msg == NULL)
        return 1;
    struct dkim_config def = {0};
    char err[1024];
    conf_defaults(dkim_conf_keys, &def, err, sizeof(err));
    struct dkim_sig_config sc = {.key_file = argv[1], .canonicalization = argv[4]};
    struct dkim_keyring *kr = dkim_keyring_new(DKIM_FROM_HEADER);
    const char *bad;
    if (dkim_keyring_add(kr, argv[2], argv[3], &sc, &def, &bad, err, sizeof(err)) < 0) {
        fprintf(stderr, "dkim-sign: %s: %s\n", bad, err);
        return 1;
    }
    const struct dkim_signer *s = dkim_keyring_find(kr, argv[2], argv[3]);
    struct dkim_body *b = dkim_body_new(3);
    srand(1);
    for (size_t off = 0; off < len;) {
        size_t step = 1 + (size_t)rand() % 700;
        if (step > len - off)
            step = len - off;
        dkim_body_feed(b, msg + off, step);
        off += step;
    }
    uint8_t bh[DKIM_HASH_LEN];
    dkim_body_final(b, s->body_canon, bh);
    size_t hl = 0; /* the header section: up to the empty line */
    while (hl < len && !(msg[hl] == '\r' && hl + 1 < len && msg[hl + 1] == '\n'))
        hl = (size_t)((char *)memchr(msg + hl, '\n', len - hl) - msg) + 1;
    struct dkim_sig_params p = {s->domain, s->selector, s->key, s->hdr_canon, s->body_canon,
                                (const char *const *)s->headers, s->nheaders,
                                (const char *const *)s->oversign, s->noversign,
                                (uint64_t)time(NULL), 0};
    char out[DKIM_SIG_MAX];
    size_t used = 0;
    int rc = dkim_sign(&p, msg, hl, bh, out, sizeof(out), &used);
    if (rc < 0) {
        fprintf(stderr, "dkim-sign: %s\n", dkim_strerror(rc));
        return 1;
    }
    fwrite(out, 1, used, stdout);
    fwrite(msg, 1, len, stdout);
    dkim_body_free(b);
    dkim_keyring_unref(kr);
    conf_free(dkim_conf_keys, &def);
    free(msg);
    return 0;
}
