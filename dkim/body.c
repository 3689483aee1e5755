/*
 * body: the DKIM body hash (RFC 6376 3.4.3, 3.4.4) computed as the
 * message streams in. One pass per octet: find the end of the header
 * section, then run each wanted canonicalization as a small state machine
 * whose output goes through a buffer into SHA-256. Trailing empty lines
 * are counted, never buffered, so memory is constant whatever the body.
 *
 * Threading: a hasher belongs to one thread at a time.
 */
#include <errno.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "dkim/dkim.h"

#define OUT_BUF 4096

enum hdr_state { HS_LINE_START, HS_MID, HS_CR_AT_START, HS_CR_MID };

struct canon {
    EVP_MD_CTX *md;   /* owned; NULL when this canonicalization is not wanted */
    size_t held;      /* simple: CRLF pairs after the last content, not yet hashed */
    size_t empty;     /* empty lines seen and not yet written (maybe trailing) */
    bool cr;          /* a CR is pending: a line end if LF follows */
    bool wsp;         /* relaxed: whitespace pending inside the line */
    bool nonempty;    /* the current line has content */
    bool any;         /* something was written */
    size_t olen;
    unsigned char out[OUT_BUF];
};

struct dkim_body {
    EVP_MD *sha256; /* owned: fetched once (an implicit fetch per message takes a global lock) */
    bool in_body;
    enum hdr_state hs;
    struct canon c[2]; /* indexed by enum dkim_canon */
};

static void
out_flush(struct canon *c)
{
    if (c->olen > 0)
        EVP_DigestUpdate(c->md, c->out, c->olen);
    c->olen = 0;
}

static inline void
out_byte(struct canon *c, unsigned char ch)
{
    if (c->olen == OUT_BUF)
        out_flush(c);
    c->out[c->olen++] = ch;
    c->any = true;
}

static inline void
out_crlf(struct canon *c)
{
    out_byte(c, '\r');
    out_byte(c, '\n');
}

/* The empty lines held back turn out not to be trailing. */
static inline void
flush_empty(struct canon *c)
{
    for (; c->empty > 0; c->empty--)
        out_crlf(c);
}

static inline void
line_end(struct canon *c)
{
    if (c->nonempty)
        out_crlf(c);
    else
        c->empty++;
    c->nonempty = false;
    c->wsp = false;
}

static inline void
content(struct canon *c, unsigned char ch, bool relaxed)
{
    flush_empty(c);
    if (relaxed && c->wsp) {
        out_byte(c, ' ');
        c->wsp = false;
    }
    out_byte(c, ch);
    c->nonempty = true;
}

/* Octets that need the per-octet path: CR always; SP and HT in relaxed. */
static const bool special_relaxed[256] = {['\r'] = true, [' '] = true, ['\t'] = true};

/* A run of plain octets: written as one copy. */
static inline void
content_run(struct canon *c, const unsigned char *p, size_t k, bool relaxed)
{
    flush_empty(c);
    if (relaxed && c->wsp) {
        out_byte(c, ' ');
        c->wsp = false;
    }
    while (k > 0) {
        if (c->olen == OUT_BUF)
            out_flush(c);
        size_t take = OUT_BUF - c->olen < k ? OUT_BUF - c->olen : k;
        memcpy(c->out + c->olen, p, take);
        c->olen += take;
        p += take;
        k -= take;
    }
    c->any = true;
    c->nonempty = true;
}

static void
canon_feed(struct canon *c, const unsigned char *p, size_t n, bool relaxed)
{
    size_t i = 0;
    while (i < n) {
        if (!c->cr) {
            size_t j = i;
            if (relaxed) {
                /* a single SP before more content stays as it is: part of the run */
                while (j < n) {
                    if (!special_relaxed[p[j]])
                        j++;
                    else if (p[j] == ' ' && j > i && j + 1 < n && !special_relaxed[p[j + 1]])
                        j += 2;
                    else
                        break;
                }
            } else {
                const unsigned char *cr = memchr(p + i, '\r', n - i);
                j = cr ? (size_t)(cr - p) : n;
            }
            if (j > i)
                content_run(c, p + i, j - i, relaxed);
            i = j;
            if (i == n)
                break;
        }
        unsigned char ch = p[i++];
        if (c->cr) {
            c->cr = false;
            if (ch == '\n') {
                line_end(c);
                continue;
            }
            content(c, '\r', relaxed); /* a bare CR is content */
        }
        if (ch == '\r') {
            c->cr = true;
        } else if (relaxed && (ch == ' ' || ch == '\t')) {
            c->wsp = true; /* written as one SP if content follows on the line */
        } else {
            content(c, ch, relaxed);
        }
    }
}

/* Simple canonicalization changes nothing but the end of the body (the
 * empty lines there go, one CRLF stays): the octets go straight into
 * SHA-256, except the CRLF pairs (and a last lone CR) at the end of what
 * has arrived, held back (counted) until content follows them or the
 * body ends. What is held is always exactly the octets received, so any
 * split of the body gives the same hash. */
static void
held_emit(struct canon *c)
{
    static const unsigned char crlfs[64] = "\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n"
                                          "\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n";
    for (size_t h = 2 * c->held; h > 0;) {
        size_t take = h < sizeof(crlfs) ? h : sizeof(crlfs);
        EVP_DigestUpdate(c->md, crlfs, take);
        h -= take;
    }
    if (c->cr)
        EVP_DigestUpdate(c->md, "\r", 1);
    c->held = 0;
    c->cr = false;
}

static void
simple_feed(struct canon *c, const unsigned char *p, size_t n)
{
    if (n > 0 && c->cr && p[0] == '\n') {
        c->cr = false; /* the held CR's LF: one more pair */
        c->held++;
        p++;
        n--;
    }
    if (n == 0)
        return;
    bool cr_end = p[n - 1] == '\r';
    size_t t = cr_end ? n - 1 : n;
    while (t >= 2 && p[t - 2] == '\r' && p[t - 1] == '\n')
        t -= 2;
    if (t > 0 || c->cr) {
        held_emit(c); /* content follows what was held */
        if (t > 0) {
            EVP_DigestUpdate(c->md, p, t);
            c->any = true;
        }
    }
    c->held += (n - t - (cr_end ? 1 : 0)) / 2;
    c->cr = cr_end;
}

struct dkim_body *
dkim_body_new(unsigned canons)
{
    struct dkim_body *b = calloc(1, sizeof(*b));
    if (b == NULL)
        return NULL;
    if ((b->sha256 = EVP_MD_fetch(NULL, "SHA256", NULL)) == NULL)
        return dkim_body_free(b);
    for (int i = 0; i < 2; i++) {
        if (!(canons & (1u << i)))
            continue;
        if ((b->c[i].md = EVP_MD_CTX_new()) == NULL)
            return dkim_body_free(b);
    }
    dkim_body_reset(b);
    return b;
}

struct dkim_body *
dkim_body_free(struct dkim_body *b)
{
    if (b == NULL)
        return NULL;
    for (int i = 0; i < 2; i++)
        EVP_MD_CTX_free(b->c[i].md);
    EVP_MD_free(b->sha256);
    free(b);
    return NULL;
}

void
dkim_body_reset(struct dkim_body *b)
{
    b->in_body = false;
    b->hs = HS_LINE_START;
    for (int i = 0; i < 2; i++) {
        struct canon *c = &b->c[i];
        EVP_MD_CTX *md = c->md;
        c->empty = c->held = 0;
        c->cr = c->wsp = c->nonempty = c->any = false;
        c->olen = 0;
        c->md = md;
        if (md != NULL)
            EVP_DigestInit_ex(md, b->sha256, NULL);
    }
}

void
dkim_body_feed(struct dkim_body *b, const void *data, size_t n)
{
    const unsigned char *p = data;
    size_t i = 0;
    while (!b->in_body && i < n) {
        unsigned char ch = p[i++];
        switch (b->hs) {
        case HS_LINE_START:
            b->hs = ch == '\r' ? HS_CR_AT_START : ch == '\n' ? HS_LINE_START : HS_MID;
            break;
        case HS_MID:
            b->hs = ch == '\r' ? HS_CR_MID : ch == '\n' ? HS_LINE_START : HS_MID;
            break;
        case HS_CR_AT_START:
            if (ch == '\n')
                b->in_body = true; /* the empty line */
            else
                b->hs = ch == '\r' ? HS_CR_MID : HS_MID;
            break;
        case HS_CR_MID:
            b->hs = ch == '\n' ? HS_LINE_START : ch == '\r' ? HS_CR_MID : HS_MID;
            break;
        }
    }
    if (i == n)
        return;
    if (b->c[DKIM_CANON_SIMPLE].md != NULL)
        simple_feed(&b->c[DKIM_CANON_SIMPLE], p + i, n - i);
    if (b->c[DKIM_CANON_RELAXED].md != NULL)
        canon_feed(&b->c[DKIM_CANON_RELAXED], p + i, n - i, true);
}

int
dkim_body_final(struct dkim_body *b, enum dkim_canon canon, uint8_t out[DKIM_HASH_LEN])
{
    if ((unsigned)canon > 1 || b->c[canon].md == NULL)
        return -EINVAL;
    struct canon *c = &b->c[canon];
    bool relaxed = canon == DKIM_CANON_RELAXED;
    if (!relaxed) {
        /* A last lone CR is content; then the last line's CRLF (the empty
         * lines before it go), or one added, or one CRLF for no body. */
        if (c->cr)
            held_emit(c);
        EVP_DigestUpdate(c->md, "\r\n", 2);
        c->held = 0;
        c->cr = false;
        c->any = false;
        unsigned int slen = 0;
        if (EVP_DigestFinal_ex(c->md, out, &slen) != 1 || slen != DKIM_HASH_LEN)
            return DKIM_ESIGN;
        EVP_DigestInit_ex(c->md, b->sha256, NULL);
        return 0;
    }
    if (c->cr) {
        c->cr = false;
        content(c, '\r', relaxed);
    }
    if (c->nonempty)
        out_crlf(c); /* a last line without CRLF gets one */
    c->nonempty = false;
    if (!relaxed && !c->any)
        out_crlf(c); /* simple: an empty body is one CRLF */
    out_flush(c);
    unsigned int len = 0;
    if (EVP_DigestFinal_ex(c->md, out, &len) != 1 || len != DKIM_HASH_LEN)
        return DKIM_ESIGN;
    EVP_DigestInit_ex(c->md, b->sha256, NULL); /* a second call gets an empty hash */
    return 0;
}
