/*
 * verp: VERP tokens under a keyed MAC (see verp.h).
 *
 * Threading: pure functions; any thread.
 */
#include "feedback/verp.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define VERP_VERSION 1
#define RAW_MAX      (1 + 8 + 2 + 4 + 1 + VERP_TENANT_MAX + VERP_MAC_LEN)
#define TENANT_AT    15 /* the tenant length octet */

static const char b32[] = "abcdefghijklmnopqrstuvwxyz234567";

const char *
verp_strerror(int rc)
{
    switch (rc) {
    case VERP_EFORMAT:
        return "not a VERP token";
    case VERP_EMAC:
        return "forged or altered token";
    default:
        return strerror(-rc);
    }
}

static size_t
b32_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        acc = (acc << 8) | in[i];
        bits += 8;
        while (bits >= 5) {
            out[o++] = b32[(acc >> (bits - 5)) & 31];
            bits -= 5;
        }
    }
    if (bits > 0)
        out[o++] = b32[(acc << (5 - bits)) & 31];
    out[o] = '\0';
    return o;
}

/* Returns the octets decoded, or -1 on a character outside the alphabet
 * or non-zero padding bits. */
static long
b32_decode(const char *in, size_t n, uint8_t *out, size_t cap)
{
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)in[i], v;
        if (c >= 'a' && c <= 'z')
            v = c - 'a';
        else if (c >= 'A' && c <= 'Z')
            v = c - 'A';
        else if (c >= '2' && c <= '7')
            v = c - '2' + 26;
        else
            return -1;
        acc = (acc << 5) | (uint32_t)v;
        bits += 5;
        if (bits >= 8) {
            if (o == cap)
                return -1;
            out[o++] = (uint8_t)(acc >> (bits - 8));
            bits -= 8;
        }
        acc &= (1u << bits) - 1;
    }
    if (bits >= 5 || acc != 0)
        return -1; /* a character too many, or padding bits set: not canonical */
    return (long)o;
}

static int
mac(const uint8_t *key, size_t keylen, const uint8_t *raw, size_t n, uint8_t out[VERP_MAC_LEN])
{
    uint8_t msg[16 + RAW_MAX];
    static const char label[] = "sluice-verp";
    memcpy(msg, label, sizeof(label) - 1);
    memcpy(msg + sizeof(label) - 1, raw, n);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned mdlen = 0;
    if (HMAC(EVP_sha256(), key, (int)keylen, msg, sizeof(label) - 1 + n, md, &mdlen) == NULL ||
        mdlen < VERP_MAC_LEN)
        return -EIO;
    memcpy(out, md, VERP_MAC_LEN);
    return 0;
}

static int
tenant_ok(const char *t, size_t n)
{
    if (n > VERP_TENANT_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)t[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* The first 4 octets of HMAC-SHA256 under key of label and s lowercased
 * (at most 512 octets of it); 0 on a failure of OpenSSL. */
static uint32_t
keyed_tag(const uint8_t *key, size_t keylen, const char *label, const char *s)
{
    uint8_t msg[32 + 512];
    size_t n = strlen(label);
    if (n > 32)
        return 0;
    memcpy(msg, label, n);
    for (size_t i = 0; s != NULL && s[i] != '\0' && n < sizeof(msg); i++) {
        unsigned char c = (unsigned char)s[i];
        msg[n++] = (uint8_t)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned mdlen = 0;
    if (HMAC(EVP_sha256(), key, (int)keylen, msg, n, md, &mdlen) == NULL || mdlen < 4)
        return 0;
    return (uint32_t)md[0] << 24 | (uint32_t)md[1] << 16 | (uint32_t)md[2] << 8 | md[3];
}

static uint32_t
rcpt_tag(const uint8_t *key, size_t keylen, const char *addr)
{
    return keyed_tag(key, keylen, "sluice-verp-rcpt", addr);
}

uint32_t
verp_tenant_tag(const uint8_t *key, size_t keylen, const char *name)
{
    uint32_t t = keyed_tag(key, keylen, "sluice-verp-tenant", name);
    return t != 0 ? t : 1;
}

int
verp_rcpt_matches(const uint8_t *key, size_t keylen, const struct verp_ref *ref, const char *addr)
{
    return addr != NULL && addr[0] != '\0' && keylen >= VERP_KEY_MIN &&
           rcpt_tag(key, keylen, addr) == ref->rcpt_tag;
}

int
verp_token(const uint8_t *key, size_t keylen, const struct verp_ref *ref, const char *rcpt,
           char *out, size_t cap)
{
    if (keylen < VERP_KEY_MIN)
        return -EINVAL;
    uint8_t raw[RAW_MAX];
    size_t n = 0;
    raw[n++] = VERP_VERSION;
    for (int i = 7; i >= 0; i--)
        raw[n++] = (uint8_t)(ref->msg_id >> (i * 8));
    raw[n++] = (uint8_t)(ref->rcpt_index >> 8);
    raw[n++] = (uint8_t)ref->rcpt_index;
    uint32_t tag = rcpt_tag(key, keylen, rcpt);
    for (int i = 3; i >= 0; i--)
        raw[n++] = (uint8_t)(tag >> (i * 8));
    size_t tl = strnlen(ref->tenant, sizeof(ref->tenant));
    if (!tenant_ok(ref->tenant, tl))
        tl = 0;
    if (tl == 0 && ref->tenant_tag != 0) {
        raw[n++] = VERP_TENANT_TAGGED;
        for (int i = 3; i >= 0; i--)
            raw[n++] = (uint8_t)(ref->tenant_tag >> (i * 8));
    } else {
        raw[n++] = (uint8_t)tl;
        memcpy(raw + n, ref->tenant, tl);
        n += tl;
    }
    int rc = mac(key, keylen, raw, n, raw + n);
    if (rc < 0)
        return rc;
    n += VERP_MAC_LEN;
    if ((n * 8 + 4) / 5 + 1 > cap)
        return -ENOSPC;
    return (int)b32_encode(raw, n, out);
}

int
verp_parse(const uint8_t *key, size_t keylen, const char *token, size_t len, struct verp_ref *ref)
{
    if (keylen < VERP_KEY_MIN)
        return -EINVAL;
    memset(ref, 0, sizeof(*ref));
    uint8_t raw[RAW_MAX];
    if (len > VERP_TOKEN_MAX)
        return VERP_EFORMAT;
    long n = b32_decode(token, len, raw, sizeof(raw));
    if (n < TENANT_AT + 1 + VERP_MAC_LEN || raw[0] != VERP_VERSION)
        return VERP_EFORMAT;
    size_t tl = raw[TENANT_AT];
    bool tagged = tl == VERP_TENANT_TAGGED;
    if (tagged)
        tl = 4;
    else if (tl > VERP_TENANT_MAX)
        return VERP_EFORMAT;
    if ((size_t)n != TENANT_AT + 1 + tl + VERP_MAC_LEN)
        return VERP_EFORMAT;
    uint8_t want[VERP_MAC_LEN];
    int rc = mac(key, keylen, raw, TENANT_AT + 1 + tl, want);
    if (rc < 0)
        return rc;
    if (CRYPTO_memcmp(want, raw + TENANT_AT + 1 + tl, VERP_MAC_LEN) != 0)
        return VERP_EMAC;
    if (!tagged && !tenant_ok((const char *)raw + TENANT_AT + 1, tl))
        return VERP_EFORMAT; /* signed by us, so never: but never trust a length */
    uint64_t id = 0;
    for (int i = 1; i <= 8; i++)
        id = (id << 8) | raw[i];
    ref->msg_id = id;
    ref->rcpt_index = (unsigned)raw[9] << 8 | raw[10];
    ref->rcpt_tag = (uint32_t)raw[11] << 24 | (uint32_t)raw[12] << 16 | (uint32_t)raw[13] << 8 |
                    raw[14];
    if (tagged) {
        const uint8_t *t = raw + TENANT_AT + 1;
        ref->tenant_tag = (uint32_t)t[0] << 24 | (uint32_t)t[1] << 16 | (uint32_t)t[2] << 8 | t[3];
        return 0;
    }
    memcpy(ref->tenant, raw + TENANT_AT + 1, tl);
    ref->tenant[tl] = '\0';
    return 0;
}

int
verp_address(const uint8_t *key, size_t keylen, const char *prefix, const char *domain,
             const struct verp_ref *ref, const char *rcpt, char *out, size_t cap)
{
    char tok[VERP_TOKEN_MAX + 1];
    int n = verp_token(key, keylen, ref, rcpt, tok, sizeof(tok));
    if (n < 0)
        return n;
    int k = snprintf(out, cap, "%s%s@%s", prefix, tok, domain);
    if (k < 0 || (size_t)k >= cap)
        return -ENOSPC;
    return k;
}

int
verp_key_load(const char *path, uint8_t *key, size_t cap, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int rc = -errno;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return rc;
    }
    char buf[512];
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    int saved = errno;
    close(fd);
    if (n < 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(saved));
        return -saved;
    }
    size_t len = 0;
    while (len < (size_t)n && buf[len] != '\n' && buf[len] != '\r')
        len++;
    if (len < VERP_KEY_MIN || len > cap) {
        snprintf(err, errlen, "%s: the key's first line must hold %d to %zu octets, has %zu",
                 path, VERP_KEY_MIN, cap, len);
        OPENSSL_cleanse(buf, sizeof(buf));
        return -EINVAL;
    }
    memcpy(key, buf, len);
    OPENSSL_cleanse(buf, sizeof(buf));
    return (int)len;
}
