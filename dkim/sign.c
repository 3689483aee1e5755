/*
 * sign: the DKIM-Signature field (RFC 6376 3.5, 3.7, 5.4; RFC 8463).
 * Splits the header section into fields, picks the signed ones bottom-up
 * as h= lists them, canonicalizes them (simple or relaxed, 3.4.1/3.4.2)
 * straight into SHA-256, adds the DKIM-Signature field itself with an
 * empty b=, and signs the hash: RSA PKCS#1 v1.5 over SHA-256, or Ed25519
 * over the SHA-256 hash (RFC 8463 3). Also the From: domain.
 *
 * Threading: pure functions over caller memory; any thread.
 */
#include <ctype.h>
#include <errno.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/idn.h"
#include "dkim/dkim.h"
#include "dkim/dkim_int.h"

const char *
dkim_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "ok";
    case DKIM_EKEY:
        return "not a PEM private key";
    case DKIM_EKEYTYPE:
        return "not an RSA key of at least 1024 bits or an Ed25519 key";
    case DKIM_ESIGN:
        return "the signing operation failed";
    case DKIM_ENOFROM:
        return "no From: address";
    case DKIM_EFROMS:
        return "From: names more than one domain";
    case DKIM_EHEADER:
        return "the header section cannot be signed";
    case DKIM_ENOKEY:
        return "no key for the signing domain";
    case DKIM_ETOOBIG:
        return "the signature does not fit";
    case DKIM_EFROMSYNTAX:
        return "a From: field ends inside a comment, quoted string or <address>";
    default:
        return rc < 0 ? strerror(-rc) : "?";
    }
}

const char *
dkim_error_token(int rc)
{
    switch (rc) {
    case DKIM_ENOFROM:
    case DKIM_EFROMSYNTAX:
        return "no_from";
    case DKIM_EFROMS:
        return "several_from_domains";
    case DKIM_EHEADER:
        return "bad_header";
    case DKIM_ENOKEY:
        return "no_key";
    case DKIM_ESIGN:
        return "sign_failed";
    case DKIM_ETOOBIG:
        return "too_big";
    case -ENOMEM:
        return "no_memory";
    default:
        return "error";
    }
}

/* ---- the header section ---- */

/* The field at hdr[*off..len) into *f, *off moved past it. Returns 1, 0
 * at the end, or DKIM_EHEADER (a line that is not a field). */
static int
field_next(const char *hdr, size_t len, size_t *off, struct dkim_field *f)
{
    size_t start = *off, o = *off;
    if (o >= len)
        return 0;
    /* the field runs through every line that starts with WSP */
    for (;;) {
        const char *lf = memchr(hdr + o, '\n', len - o);
        o = lf ? (size_t)(lf - hdr) + 1 : len;
        if (o >= len || (hdr[o] != ' ' && hdr[o] != '\t'))
            break;
    }
    const char *colon = memchr(hdr + start, ':', o - start);
    if (colon == NULL || hdr[start] == ' ' || hdr[start] == '\t')
        return DKIM_EHEADER;
    size_t nl = (size_t)(colon - (hdr + start));
    while (nl > 0 && (hdr[start + nl - 1] == ' ' || hdr[start + nl - 1] == '\t'))
        nl--;
    if (nl == 0 || nl > 998)
        return DKIM_EHEADER;
    *f = (struct dkim_field){hdr + start, o - start, nl, false};
    *off = o;
    return 1;
}

static bool name_is(const struct dkim_field *f, const char *name);

int
dkim_fields_split(const char *hdr, size_t len, const char *const *names, unsigned nnames,
                  struct dkim_field **out, size_t *nout)
{
    size_t cap = 32, n = 0, off = 0;
    struct dkim_field *v = malloc(cap * sizeof(*v));
    if (v == NULL)
        return -ENOMEM;
    struct dkim_field f;
    int rc;
    while ((rc = field_next(hdr, len, &off, &f)) > 0) {
        bool want = names == NULL;
        for (unsigned i = 0; !want && i < nnames; i++)
            want = name_is(&f, names[i]);
        if (!want)
            continue;
        if (n == cap) {
            cap *= 2;
            struct dkim_field *g = realloc(v, cap * sizeof(*v));
            if (g == NULL) {
                free(v);
                return -ENOMEM;
            }
            v = g;
        }
        v[n++] = f;
    }
    if (rc < 0) {
        free(v);
        return rc;
    }
    *out = v;
    *nout = n;
    return 0;
}

static bool
name_is(const struct dkim_field *f, const char *name)
{
    return strlen(name) == f->name_len && strncasecmp(f->p, name, f->name_len) == 0;
}

/* Feed one field, canonicalized, into md. The field is f[0..len) with its
 * line end(s); crlf: end it with CRLF (every field but the signature's). */
static void
canon_field(EVP_MD_CTX *md, const char *f, size_t len, size_t name_len, enum dkim_canon c,
            bool crlf)
{
    if (c == DKIM_CANON_SIMPLE) {
        size_t body = len;
        if (body >= 2 && f[body - 2] == '\r' && f[body - 1] == '\n')
            body -= 2;
        EVP_DigestUpdate(md, f, body);
        if (crlf)
            EVP_DigestUpdate(md, "\r\n", 2);
        return;
    }
    unsigned char buf[1024];
    size_t o = 0;
    for (size_t i = 0; i < name_len; i++)
        buf[o++] = (unsigned char)tolower((unsigned char)f[i]); /* name_len <= 998 */
    buf[o++] = ':';
    size_t i = (size_t)((const char *)memchr(f, ':', len) - f) + 1;
    bool wsp = false, started = false;
    for (; i < len; i++) {
        unsigned char ch = (unsigned char)f[i];
        if (ch == '\r' || ch == '\n')
            continue; /* unfold */
        if (ch == ' ' || ch == '\t') {
            wsp = true;
            continue;
        }
        if (o + 2 > sizeof(buf)) {
            EVP_DigestUpdate(md, buf, o);
            o = 0;
        }
        if (wsp && started)
            buf[o++] = ' ';
        wsp = false;
        started = true;
        buf[o++] = ch;
    }
    if (o + 2 > sizeof(buf)) {
        EVP_DigestUpdate(md, buf, o);
        o = 0;
    }
    if (crlf) {
        buf[o++] = '\r';
        buf[o++] = '\n';
    }
    EVP_DigestUpdate(md, buf, o);
}

/* ---- IDN: U-labels to A-labels ---- */

/* The domain d[0..n) as signing looks it up: lowercase, U-labels (RFC
 * 6531 allows them under SMTPUTF8) written as their A-labels (RFC 5890,
 * common/idn.h), the form the keyring's domains are configured in and DNS
 * knows (RFC 8616 4: either form names the same domain). One that is not
 * UTF-8 or not a valid IDNA2008 name is lowercased octet by octet (as it
 * was before A-labels: a name no key matches). Returns 0, or -1 when it
 * does not fit in out[0..cap). */
static int
domain_lower(const char *d, size_t n, char *out, size_t cap)
{
    if (idn_domain_ascii(d, n, out, cap, NULL) >= 0)
        return 0;
    if (n >= cap)
        return -1;
    for (size_t k = 0; k < n; k++)
        out[k] = (char)tolower((unsigned char)d[k]);
    out[n] = '\0';
    return 0;
}

/* ---- the From: domain ---- */

/* Collect the domains of the addresses in one From: value (unfolded as
 * it goes): comments and quoted strings are skipped, an angle-addr wins
 * over the words around it, a group's addresses count. Only what follows
 * an address's last @ is kept: a local part of any length cannot push
 * its domain out of the buffer (and out of the count of domains). A
 * value that ends inside a comment, quoted string or angle-addr is
 * DKIM_EFROMSYNTAX (dkim.h). */
static int
from_value_domains(const char *v, size_t len, char *dom, size_t cap, bool *have)
{
    char addr[512]; /* the domain part of the address being read */
    size_t alen = 0;
    bool at = false;   /* an @ was seen: addr holds what follows the last one */
    bool over = false; /* addr overflowed: no domain is that long */
    bool angle = false, had_angle = false;
    int depth = 0;
    for (size_t i = 0; i <= len; i++) {
        char ch = i < len ? v[i] : ',';
        if (i == len && (depth > 0 || angle))
            return DKIM_EFROMSYNTAX; /* unterminated: no address can be told */
        if (depth > 0) {
            if (ch == '\\' && i + 1 < len)
                i++;
            else if (ch == '(')
                depth++;
            else if (ch == ')')
                depth--;
            continue;
        }
        if (ch == '(') {
            depth = 1;
            continue;
        }
        if (ch == '"') {
            for (i++; i < len && v[i] != '"'; i++)
                if (v[i] == '\\')
                    i++;
            if (i >= len)
                return DKIM_EFROMSYNTAX;
            if (!had_angle && !angle) {
                alen = 0; /* a display name, not an address */
                at = over = false;
            }
            continue;
        }
        if (ch == '<') {
            angle = true;
            had_angle = true;
            alen = 0;
            at = over = false;
            continue;
        }
        if (ch == '>') {
            angle = false;
            continue;
        }
        if (!angle && (ch == ':' || ch == ';')) {
            alen = 0; /* a group's name, or its end */
            at = over = false;
            had_angle = false;
            continue;
        }
        if (!angle && ch == ',') {
            if (at) {
                size_t dl = alen;
                while (dl > 0 && addr[dl - 1] == '.')
                    dl--;
                char d[256];
                if (over || dl == 0 || domain_lower(addr, dl, d, cap < sizeof(d) ? cap : sizeof(d)))
                    return DKIM_ENOFROM;
                if (*have && strcmp(d, dom) != 0)
                    return DKIM_EFROMS;
                memcpy(dom, d, strlen(d) + 1);
                *have = true;
            }
            alen = 0;
            at = over = false;
            had_angle = false;
            continue;
        }
        if (ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n')
            continue;
        if (had_angle && !angle)
            continue; /* words after the angle-addr */
        if (ch == '@') {
            alen = 0; /* the local part (or a route) is not needed */
            at = true;
            over = false;
        } else if (alen + 1 < sizeof(addr)) {
            addr[alen++] = ch;
        } else {
            over = true;
        }
    }
    return 0;
}

int
dkim_from_domain(const char *hdr, size_t len, char *out, size_t cap)
{
    /* One field at a time: this runs on the worker, over a header
     * section that may be the whole message. */
    size_t off = 0;
    struct dkim_field f;
    bool have = false;
    int rc;
    while ((rc = field_next(hdr, len, &off, &f)) > 0) {
        if (!name_is(&f, "from"))
            continue;
        const char *colon = memchr(f.p, ':', f.len);
        rc = from_value_domains(colon + 1, f.len - (size_t)(colon + 1 - f.p), out, cap, &have);
        if (rc < 0)
            return rc;
    }
    if (rc == 0 && !have)
        rc = DKIM_ENOFROM;
    return rc;
}

int
dkim_addr_domain(const char *addr, char *out, size_t cap)
{
    const char *at = addr != NULL ? strrchr(addr, '@') : NULL;
    if (at == NULL)
        return DKIM_ENOFROM;
    size_t n = strlen(at + 1);
    while (n > 0 && at[n] == '.')
        n--;
    if (n == 0 || domain_lower(at + 1, n, out, cap) < 0)
        return DKIM_ENOFROM;
    return 0;
}

/* ---- the signature ---- */

struct text {
    char *p; /* borrowed: the caller's output buffer */
    size_t len, cap;
    size_t line; /* octets on the current line */
    bool over;
};

static void __attribute__((format(printf, 2, 3)))
put(struct text *t, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(t->p + t->len, t->cap - t->len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= t->cap - t->len) {
        t->over = true;
        return;
    }
    t->len += (size_t)n;
    const char *nl = NULL;
    for (const char *c = t->p + t->len - n; c < t->p + t->len; c++)
        if (*c == '\n')
            nl = c;
    t->line = nl ? (size_t)(t->p + t->len - nl - 1) : t->line + (size_t)n;
}

/* A tag, folded onto a new line when it would pass 76 columns. */
static void
put_tag(struct text *t, const char *tag)
{
    size_t n = strlen(tag);
    if (t->line + 1 + n > 76)
        put(t, "\r\n\t%s", tag);
    else
        put(t, " %s", tag);
}

/* One name of h=, folded after a colon (FWS is allowed there). */
static void
put_hname(struct text *t, const char *name, bool first)
{
    size_t n = strlen(name);
    if (first)
        put(t, t->line + 3 + n > 76 ? "\r\n\th=%s" : " h=%s", name);
    else
        put(t, t->line + 1 + n > 76 ? ":\r\n\t%s" : ":%s", name);
}

static const char *
canon_str(enum dkim_canon c)
{
    return c == DKIM_CANON_RELAXED ? "relaxed" : "simple";
}

int
dkim_b64(const uint8_t *in, size_t n, char *out, size_t cap)
{
    if (cap < 4 * ((n + 2) / 3) + 1)
        return DKIM_ETOOBIG;
    return EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

size_t
dkim_sig_room(const struct dkim_sig_params *p, const char *hdr, size_t len)
{
    /* The fixed tags and bh= (DKIM_SIG_MAX holds them with an RSA-4096
     * b=), d= and s= whatever their length, b= for a larger key (base64,
     * folded every 72 octets with 4), then h=: a name with its ':' and a
     * fold (CRLF TAB) for each field it will name. The header text itself
     * is never copied into the field. */
    size_t sig = dkim_key_bits(p->key) / 8 + 1, b64 = 4 * ((sig + 2) / 3);
    size_t room = DKIM_SIG_MAX + strlen(p->domain) + strlen(p->selector) + b64 + b64 / 72 * 4 + 8;
    size_t off = 0;
    struct dkim_field f;
    while (field_next(hdr, len, &off, &f) > 0) {
        for (unsigned h = 0; h < p->nheaders; h++) {
            if (name_is(&f, p->headers[h])) {
                room += f.name_len + 4;
                break;
            }
        }
    }
    for (unsigned h = 0; h < p->nheaders; h++) {
        for (unsigned o = 0; o < p->noversign; o++) {
            if (strcasecmp(p->oversign[o], p->headers[h]) == 0) {
                room += strlen(p->headers[h]) + 4;
                break;
            }
        }
    }
    return room;
}

int
dkim_sign(const struct dkim_sig_params *p, const char *hdr, size_t len,
          const uint8_t bh[DKIM_HASH_LEN], char *out, size_t cap, size_t *used)
{
    struct dkim_field *f = NULL;
    size_t nf = 0;
    /* only the fields h= may name: the others are never hashed */
    int rc = dkim_fields_split(hdr, len, p->headers, p->nheaders, &f, &nf);
    if (rc < 0)
        return rc;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    char *sig = NULL;
    if (md == NULL || EVP_DigestInit_ex(md, dkim_key_md(p->key), NULL) != 1) {
        rc = -ENOMEM;
        goto done;
    }
    struct text t = {out + *used, 0, cap - *used, 0, false};
    put(&t, "DKIM-Signature: v=1; a=%s; c=%s/%s;", dkim_alg_str(dkim_key_alg(p->key)),
        canon_str(p->hdr_canon), canon_str(p->body_canon));
    char tag[600];
    snprintf(tag, sizeof(tag), "d=%s;", p->domain);
    put_tag(&t, tag);
    snprintf(tag, sizeof(tag), "s=%s;", p->selector);
    put_tag(&t, tag);
    snprintf(tag, sizeof(tag), "t=%llu;", (unsigned long long)p->timestamp);
    put_tag(&t, tag);
    if (p->expire > 0) {
        snprintf(tag, sizeof(tag), "x=%llu;", (unsigned long long)(p->timestamp + p->expire));
        put_tag(&t, tag);
    }
    /* h=: each name once per field present (bottom-up, 5.4.2), once more
     * when over-signed (no field may be added later); the fields go into
     * the hash in the same order. */
    bool first = true;
    for (unsigned h = 0; h < p->nheaders; h++) {
        const char *name = p->headers[h];
        unsigned extra = 0;
        for (unsigned o = 0; o < p->noversign; o++)
            if (strcasecmp(p->oversign[o], name) == 0)
                extra = 1;
        for (size_t i = nf; i-- > 0;) {
            if (f[i].used || !name_is(&f[i], name))
                continue;
            f[i].used = true;
            canon_field(md, f[i].p, f[i].len, f[i].name_len, p->hdr_canon, true);
            put_hname(&t, name, first);
            first = false;
        }
        if (extra) {
            put_hname(&t, name, first);
            first = false;
        }
    }
    if (first) {
        rc = DKIM_EHEADER; /* nothing to sign: no From: at least */
        goto done;
    }
    put(&t, ";");
    char b64[64];
    dkim_b64(bh, DKIM_HASH_LEN, b64, sizeof(b64));
    snprintf(tag, sizeof(tag), "bh=%s;", b64);
    put_tag(&t, tag);
    put(&t, "\r\n\tb=");
    if (t.over) {
        rc = DKIM_ETOOBIG;
        goto done;
    }
    /* the signature field itself, b= empty, without its CRLF (3.7) */
    canon_field(md, t.p, t.len, strlen("DKIM-Signature"), p->hdr_canon, false);
    uint8_t hh[DKIM_HASH_LEN];
    unsigned hl = 0;
    if (EVP_DigestFinal_ex(md, hh, &hl) != 1) {
        rc = DKIM_ESIGN;
        goto done;
    }
    size_t slen = 0;
    rc = dkim_key_sign(p->key, hh, &sig, &slen);
    if (rc < 0)
        goto done;
    char *sb = malloc(4 * ((slen + 2) / 3) + 1);
    if (sb == NULL) {
        rc = -ENOMEM;
        goto done;
    }
    int bl = dkim_b64((uint8_t *)sig, slen, sb, 4 * ((slen + 2) / 3) + 1);
    for (int i = 0; i < bl; i += 72) {
        int n = bl - i < 72 ? bl - i : 72;
        put(&t, "%s%.*s", i ? "\r\n\t " : "", n, sb + i);
    }
    free(sb);
    put(&t, "\r\n");
    if (t.over) {
        rc = DKIM_ETOOBIG;
        goto done;
    }
    *used += t.len;
    rc = 0;
done:
    free(sig);
    EVP_MD_CTX_free(md);
    free(f);
    return rc;
}
