/*
 * conn: one TLS connection over two bounded ciphertext buffers. OpenSSL
 * reads the input buffer (filled by tls_conn_feed from what the ring
 * received) and writes the output buffer (drained by tls_conn_peek and
 * tls_conn_consume into what the ring sends) through a BIO of our own, so
 * it never touches a socket and never allocates beyond those bounds:
 * a peer that sends faster than we read, or sends garbage, stops at a full
 * input buffer or a failed record, never at more memory.
 *
 * Bytes handed out by tls_conn_peek are "lent" to a send in flight: the
 * output buffer only moves its contents to the front when nothing is lent,
 * which is what keeps a peeked pointer valid while more is written behind.
 *
 * Each buffer is allocated when bytes arrive in it and freed when it is
 * empty again (nothing lent), so a connection that waits (an outbound one
 * idle between transactions or waiting for a slow reply, a submission
 * client between commands) holds neither: with OpenSSL's own record
 * buffers released (SSL_MODE_RELEASE_BUFFERS, ctx.c), what an idle conn
 * keeps is the SSL object and this struct.
 *
 * A client conn checks the server one of three ways: not at all
 * (opportunistic: the result is only recorded), against the ctx's CA store
 * and the host name (verify), or against the MX host's TLSA records with
 * OpenSSL's DANE matcher (tls_conn_new_client_dane, RFC 7672: the TLSA
 * base domain as SNI, and it and an MX host's CNAME'd other name as the
 * names a DANE-TA chain may match); a DANE conn's sessions are cached
 * under a key that includes its records and those names.
 *
 * Threading: a conn is used by one thread at a time (its worker). The BIO
 * method is made once per process (pthread_once) and never changes.
 */
#include "tls/tls_int.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>

/* Room kept free beyond a record's plaintext when encrypting: its header,
 * explicit IV, MAC or tag and padding (under 100 bytes for any TLS 1.2 or
 * 1.3 cipher), plus a key update answer that OpenSSL may queue ahead of it.
 * With this much room, SSL_write never sees a full BIO halfway through a
 * record, so it never asks to be retried with the same bytes. */
#define RECORD_SLACK 512

struct tls_buf {
    unsigned char *data; /* owned: cap octets while it holds any, else NULL */
    size_t cap;
    size_t head, tail; /* pending bytes: data[head..tail) */
    size_t lent;       /* bytes from head handed out by peek: they must not move */
};

enum conn_state { CONN_HANDSHAKE, CONN_OPEN, CONN_FAILED };

struct tls_conn {
    SSL *ssl;                /* owned */
    struct tls_cache *cache; /* borrowed: outlives the conn, on the same thread */
    char *cache_key;         /* owned; NULL without a cache */
    char *host;              /* owned; the name checked, lowercase; NULL for servers */
    enum conn_state state;
    int error;             /* what failed the conn, returned from then on */
    SSL_SESSION *offered;  /* owned: a reference to the cached session that went into the
                            * ClientHello, until the handshake ends; NULL: none */
    bool offered_verified; /* and its certificate had verified for host */
    bool dane;             /* authenticated by TLSA records (tls_conn_new_client_dane) */
    uint64_t trust_gen;    /* the ctx's: see struct tls_ctx */
    bool peer_closed;      /* close_notify received */
    bool shutdown_sent;    /* close_notify queued */
    bool wants_room;       /* the last handshake step or read stopped at a full output */
    unsigned key_updates;  /* TLS 1.3 KeyUpdate messages received (conn_on_msg) */
    uint64_t read_bytes;   /* plaintext read: it earns key updates (KEY_UPDATE_PER) */
    struct tls_buf in;
    struct tls_buf out;
    char errstr[160];
};

/* ---- buffers ---- */

static size_t
buf_len(const struct tls_buf *b)
{
    return b->tail - b->head;
}

/* Room for appending: all the free space, unless lent bytes pin the
 * contents where they are. */
static size_t
buf_room(const struct tls_buf *b)
{
    return b->lent == 0 ? b->cap - buf_len(b) : b->cap - b->tail;
}

/* Returns 0, or -ENOMEM when an empty buffer cannot get its memory. */
static int
buf_append(struct tls_buf *b, const void *data, size_t n)
{
    if (b->data == NULL && (b->data = malloc(b->cap)) == NULL) /* no zeroing needed */
        return -ENOMEM;
    if (b->cap - b->tail < n) {
        /* buf_room said there is room, so nothing is lent: move. */
        memmove(b->data, b->data + b->head, buf_len(b));
        b->tail -= b->head;
        b->head = 0;
    }
    memcpy(b->data + b->tail, data, n);
    b->tail += n;
    return 0;
}

static void
buf_drop(struct tls_buf *b, size_t n)
{
    b->head += n;
    b->lent = b->lent > n ? b->lent - n : 0;
    if (b->head == b->tail) {
        /* Empty, so nothing is lent: the memory goes back until needed. */
        b->head = b->tail = 0;
        free(b->data);
        b->data = NULL;
    }
}

/* ---- the BIO OpenSSL reads and writes ---- */

static int
bio_write(BIO *bio, const char *data, int len)
{
    struct tls_conn *c = BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    if (len <= 0)
        return 0;
    size_t n = buf_room(&c->out);
    if (n == 0) {
        BIO_set_retry_write(bio);
        return -1;
    }
    if (n > (size_t)len)
        n = (size_t)len;
    if (buf_append(&c->out, data, n) < 0)
        return -1; /* no retry flag: OpenSSL fails the conn */
    return (int)n;
}

static int
bio_read(BIO *bio, char *out, int len)
{
    struct tls_conn *c = BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    if (len <= 0)
        return 0;
    size_t n = buf_len(&c->in);
    if (n == 0) {
        /* Not EOF: the ring may bring more. End of stream is the
         * caller's to see (recv returns 0), not OpenSSL's. */
        BIO_set_retry_read(bio);
        return -1;
    }
    if (n > (size_t)len)
        n = (size_t)len;
    memcpy(out, c->in.data + c->in.head, n);
    buf_drop(&c->in, n);
    return (int)n;
}

static long
bio_ctrl(BIO *bio, int cmd, long num, void *ptr)
{
    struct tls_conn *c = BIO_get_data(bio);
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_CTRL_PENDING:
        return (long)buf_len(&c->in);
    case BIO_CTRL_WPENDING:
        return (long)buf_len(&c->out);
    default:
        return 0;
    }
}

/* Process-wide because OpenSSL wants a BIO_METHOD to outlive every BIO made
 * from it, and conns outlive the ctx that made them. Made once, never
 * freed; it holds no state. */
static BIO_METHOD *conn_bio_method;
static pthread_once_t conn_bio_once = PTHREAD_ONCE_INIT;

static void
conn_bio_init(void)
{
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "sluice buffer");
    if (m == NULL)
        return;
    if (BIO_meth_set_write(m, bio_write) != 1 || BIO_meth_set_read(m, bio_read) != 1 ||
        BIO_meth_set_ctrl(m, bio_ctrl) != 1) {
        BIO_meth_free(m);
        return;
    }
    conn_bio_method = m;
}

/* ---- errors ---- */

static void
conn_set_errstr(struct tls_conn *c, unsigned long e)
{
    const char *reason = ERR_reason_error_string(e);
    if (reason != NULL)
        snprintf(c->errstr, sizeof(c->errstr), "%s", reason);
    else
        ERR_error_string_n(e, c->errstr, sizeof(c->errstr));
}

/* Turn the error queue after SSL_ERROR_SSL into one code and a text. The
 * first error of the SSL library says what happened at the TLS level;
 * errors of other libraries before it are details (a provider's "bad
 * decrypt" behind "bad record mac"). */
static int
conn_classify(struct tls_conn *c)
{
    unsigned long first = 0, ssl_err = 0, e;
    while ((e = ERR_get_error()) != 0) {
        if (first == 0)
            first = e;
        if (ssl_err == 0 && ERR_GET_LIB(e) == ERR_LIB_SSL)
            ssl_err = e;
    }
    if (ssl_err == 0) {
        if (first == 0) {
            snprintf(c->errstr, sizeof(c->errstr), "no reason given");
            return TLS_EINTERNAL;
        }
        conn_set_errstr(c, first);
        return ERR_GET_REASON(first) == ERR_R_MALLOC_FAILURE ? -ENOMEM : TLS_EINTERNAL;
    }
    int reason = ERR_GET_REASON(ssl_err);
    if (reason == SSL_R_CERTIFICATE_VERIFY_FAILED) {
        snprintf(c->errstr, sizeof(c->errstr), "certificate verify failed: %s",
                 X509_verify_cert_error_string(SSL_get_verify_result(c->ssl)));
        return TLS_EVERIFY;
    }
    conn_set_errstr(c, ssl_err);
    /* Alerts received are reported as reasons offset by 1000. */
    if (reason >= SSL_AD_REASON_OFFSET && reason < SSL_AD_REASON_OFFSET + 256)
        return TLS_EALERT;
    switch (reason) {
    case SSL_R_NO_SHARED_CIPHER:
    case SSL_R_NO_CIPHERS_AVAILABLE:
    case SSL_R_UNSUPPORTED_PROTOCOL:
    case SSL_R_NO_PROTOCOLS_AVAILABLE:
    case SSL_R_VERSION_TOO_LOW:
    case SSL_R_NO_SHARED_GROUPS:
    case SSL_R_NO_SUITABLE_KEY_SHARE:
    case SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM:
    case SSL_R_NO_SHARED_SIGNATURE_ALGORITHMS:
        return TLS_ENEGOTIATE;
    case ERR_R_MALLOC_FAILURE:
        return -ENOMEM;
    case ERR_R_INTERNAL_ERROR:
        return TLS_EINTERNAL;
    default:
        return TLS_EPROTO;
    }
}

/* After an OpenSSL call returned r (failure): TLS_WANT_IO, TLS_ECLOSED,
 * or an error that fails the conn for good. */
static int
conn_check(struct tls_conn *c, int r)
{
    int rc;
    switch (SSL_get_error(c->ssl, r)) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        return TLS_WANT_IO;
    case SSL_ERROR_ZERO_RETURN:
        c->peer_closed = true;
        if (c->state == CONN_OPEN)
            return TLS_ECLOSED;
        snprintf(c->errstr, sizeof(c->errstr), "close_notify during the handshake");
        rc = TLS_EPROTO;
        break;
    case SSL_ERROR_SSL:
        rc = conn_classify(c);
        break;
    default:
        /* SYSCALL would be a socket error or EOF: our BIO has neither. */
        snprintf(c->errstr, sizeof(c->errstr), "unexpected OpenSSL state %d",
                 SSL_get_error(c->ssl, r));
        rc = TLS_EINTERNAL;
        break;
    }
    c->state = CONN_FAILED;
    c->error = rc;
    return rc;
}

/* ---- making and freeing ---- */

/* TLS 1.3 KeyUpdate messages a peer may send: KEY_UPDATE_FREE, and one
 * more per KEY_UPDATE_PER octets of plaintext read. OpenSSL derives new
 * keys for each and answers each one that asks for it, so a peer that
 * floods them (hundreds in one write, on and on) keeps the worker busy
 * for nothing until a deadline ends the connection; a peer that rekeys
 * to protect its traffic does so once in gigabytes. Past the budget the
 * connection fails (TLS_EPROTO). */
#define KEY_UPDATE_FREE 32
#define KEY_UPDATE_PER  (1024 * 1024)

/* OpenSSL's message callback: counts the KeyUpdate messages received. */
static void
conn_on_msg(int write_p, int version, int content_type, const void *buf, size_t len, SSL *ssl,
            void *arg)
{
    (void)version;
    (void)ssl;
    struct tls_conn *c = arg;
    if (!write_p && content_type == SSL3_RT_HANDSHAKE && len >= 1 &&
        ((const unsigned char *)buf)[0] == SSL3_MT_KEY_UPDATE)
        c->key_updates++;
}

static int
conn_new(struct tls_ctx *ctx, struct tls_conn **out)
{
    pthread_once(&conn_bio_once, conn_bio_init);
    if (conn_bio_method == NULL)
        return -ENOMEM;
    size_t size = ctx->buffer_size;
    /* The buffers come when bytes do (buf_append). */
    struct tls_conn *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return -ENOMEM;
    c->in.cap = size;
    c->out.cap = size;
    c->trust_gen = ctx->trust_gen;
    ERR_clear_error();
    c->ssl = SSL_new(ctx->ssl_ctx);
    BIO *bio = c->ssl != NULL ? BIO_new(conn_bio_method) : NULL;
    if (bio == NULL) {
        ERR_clear_error();
        SSL_free(c->ssl);
        free(c);
        return -ENOMEM;
    }
    BIO_set_data(bio, c);
    BIO_set_init(bio, 1);
    /* One BIO both ways: each setter takes one reference. */
    BIO_up_ref(bio);
    SSL_set0_rbio(c->ssl, bio);
    SSL_set0_wbio(c->ssl, bio);
    SSL_set_msg_callback(c->ssl, conn_on_msg);
    SSL_set_msg_callback_arg(c->ssl, c);
    *out = c;
    return 0;
}

struct tls_conn *
tls_conn_free(struct tls_conn *c)
{
    if (c == NULL)
        return NULL;
    SSL_free(c->ssl);
    SSL_SESSION_free(c->offered);
    ERR_clear_error();
    free(c->cache_key);
    free(c->host);
    free(c->in.data);
    free(c->out.data);
    free(c);
    return NULL;
}

int
tls_conn_new_server(struct tls_ctx *ctx, struct tls_conn **out)
{
    *out = NULL;
    if (ctx == NULL || !ctx->server)
        return -EINVAL;
    struct tls_conn *c;
    int rc = conn_new(ctx, &c);
    if (rc != 0)
        return rc;
    SSL_set_accept_state(c->ssl);
    *out = c;
    return 0;
}

/* host without a trailing dot, lowercase, into name (which has room for
 * any DNS name). Returns 0 or -EINVAL. */
static int
host_normalize(const char *host, char *name, size_t cap)
{
    size_t len = strlen(host);
    if (len > 0 && host[len - 1] == '.')
        len--;
    if (len == 0 || len >= cap)
        return -EINVAL;
    for (size_t i = 0; i < len; i++)
        name[i] = (char)tolower((unsigned char)host[i]);
    name[len] = '\0';
    return 0;
}

static int
conn_set_host(struct tls_conn *c, const char *name)
{
    struct in6_addr a6;
    c->host = strdup(name);
    if (c->host == NULL)
        return -ENOMEM;
    if (inet_pton(AF_INET, name, &a6) == 1 || inet_pton(AF_INET6, name, &a6) == 1) {
        /* No SNI for an address (RFC 6066); check it against the
         * certificate's IP SANs instead. */
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), name) != 1)
            return -EINVAL;
        return 0;
    }
    if (SSL_set_tlsext_host_name(c->ssl, name) != 1 || SSL_set1_host(c->ssl, name) != 1)
        return -ENOMEM;
    /* "*.example.com" matches "mx.example.com"; "mx*.example.com" matches
     * nothing: partial wildcards are a known source of surprises. */
    SSL_set_hostflags(c->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    return 0;
}

/* Remember key as c's session-cache key, and offer the session the cache
 * holds under it (verified: whether a verified session is wanted). */
static int
conn_offer_session(struct tls_conn *c, struct tls_cache *cache, const char *key, bool verify)
{
    c->cache = cache;
    c->cache_key = strdup(key);
    if (c->cache_key == NULL)
        return -ENOMEM;
    bool verified;
    SSL_SESSION *sess = tls_cache_get(cache, key, c->host, c->trust_gen, verify, &verified);
    if (sess != NULL && SSL_set_session(c->ssl, sess) == 1) {
        /* Our own reference: the cache may replace its entry meanwhile,
         * and only this session is to be dropped if it fails. */
        SSL_SESSION_up_ref(sess);
        c->offered = sess;
        c->offered_verified = verified;
    }
    return 0;
}

int
tls_conn_new_client(struct tls_ctx *ctx, const char *host, bool verify, struct tls_cache *cache,
                    const char *cache_key, struct tls_conn **out)
{
    *out = NULL;
    char name[256];
    if (ctx == NULL || ctx->server || (verify && host == NULL))
        return -EINVAL;
    if (host != NULL && host_normalize(host, name, sizeof(name)) != 0)
        return -EINVAL;
    struct tls_conn *c;
    int rc = conn_new(ctx, &c);
    if (rc != 0)
        return rc;
    SSL_set_connect_state(c->ssl);
    if (host != NULL && (rc = conn_set_host(c, name)) != 0)
        goto fail;
    /* Without verify the chain and name are still checked (the result
     * goes in the delivery log); only the failure is not fatal. */
    SSL_set_verify(c->ssl, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    const char *key = cache_key != NULL ? cache_key : c->host;
    if (cache != NULL && key != NULL && (rc = conn_offer_session(c, cache, key, verify)) != 0)
        goto fail;
    ERR_clear_error();
    *out = c;
    return 0;
fail:
    ERR_clear_error();
    tls_conn_free(c);
    return rc;
}

/* DANE-TA(2) or DANE-EE(3), a selector and matching type OpenSSL knows,
 * and data it takes (SSL_dane_tlsa_add's checks): a digest of its
 * type's length, or a whole certificate or SubjectPublicKeyInfo in DER.
 * The PKIX usages are ignored (RFC 7672 3.1.3); so is a malformed record
 * (RFC 7671 4.1: a SHA-512 digest in a SHA-256 record), which is no
 * record to authenticate with: were it counted, a host whose records are
 * all so would have no TLS at all rather than unauthenticated TLS (RFC
 * 7672 2.2). */
static bool
tlsa_usable(const struct tls_tlsa *r)
{
    if (!(r->usage == 2 || r->usage == 3) || r->selector > 1 || r->mtype > 2 || r->len == 0 ||
        r->data == NULL)
        return false;
    if (r->mtype == 1)
        return r->len == 32;
    if (r->mtype == 2)
        return r->len == 64;
    const unsigned char *p = r->data;
    bool ok;
    if (r->selector == 0) {
        X509 *x = d2i_X509(NULL, &p, r->len);
        ok = x != NULL && p == r->data + r->len && X509_get0_pubkey(x) != NULL;
        X509_free(x);
    } else {
        EVP_PKEY *k = d2i_PUBKEY(NULL, &p, r->len);
        ok = k != NULL && p == r->data + r->len;
        EVP_PKEY_free(k);
    }
    ERR_clear_error();
    return ok;
}

unsigned
tls_tlsa_usable(const struct tls_tlsa *rrs, unsigned n)
{
    unsigned k = 0;
    for (unsigned i = 0; i < n; i++)
        k += tlsa_usable(&rrs[i]);
    return k;
}

int
tls_conn_new_client_dane(struct tls_ctx *ctx, const char *host, const char *alt_name,
                         const struct tls_tlsa *rrs, unsigned n, struct tls_cache *cache,
                         const char *cache_key, struct tls_conn **out)
{
    *out = NULL;
    char name[256], alt[256];
    if (ctx == NULL || ctx->server || host == NULL || host_normalize(host, name, sizeof(name)) != 0)
        return -EINVAL;
    if (alt_name != NULL && host_normalize(alt_name, alt, sizeof(alt)) != 0)
        return -EINVAL;
    if (alt_name == NULL || strcmp(alt, name) == 0)
        alt[0] = '\0';
    if (tls_tlsa_usable(rrs, n) == 0)
        return -ENODATA;
    struct tls_conn *c;
    int rc = conn_new(ctx, &c);
    if (rc != 0)
        return rc;
    SSL_set_connect_state(c->ssl);
    c->dane = true;
    if ((c->host = strdup(name)) == NULL) {
        rc = -ENOMEM;
        goto fail;
    }
    /* SNI is the TLSA base domain (RFC 7672 8.1), which is also the first
     * name a DANE-TA(2) chain's leaf may match; the other end of a CNAME
     * chain is the second (3.2.2): OpenSSL accepts any of them.
     * DANE-EE(3) matches the key alone (3.2.1). */
    if (SSL_set_tlsext_host_name(c->ssl, name) != 1 || SSL_dane_enable(c->ssl, name) <= 0 ||
        (alt[0] != '\0' && SSL_add1_host(c->ssl, alt) != 1)) {
        rc = -ENOMEM;
        goto fail;
    }
    SSL_dane_set_flags(c->ssl, DANE_FLAG_NO_DANE_EE_NAMECHECKS);
    SSL_set_hostflags(c->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    unsigned added = 0;
    /* The records go into the session key: a session authenticated under
     * other records is not this one's. */
    uint64_t h = 14695981039346656037ULL;
    for (unsigned i = 0; i < n; i++) {
        const struct tls_tlsa *r = &rrs[i];
        if (!tlsa_usable(r))
            continue;
        int ar = SSL_dane_tlsa_add(c->ssl, r->usage, r->selector, r->mtype, r->data, r->len);
        if (ar < 0) {
            rc = -ENOMEM;
            goto fail;
        }
        if (ar == 0)
            continue; /* malformed for OpenSSL (a digest of the wrong length): unusable */
        added++;
        uint8_t head[3] = {r->usage, r->selector, r->mtype};
        for (unsigned k = 0; k < 3; k++)
            h = (h ^ head[k]) * 1099511628211ULL;
        for (unsigned k = 0; k < r->len; k++)
            h = (h ^ r->data[k]) * 1099511628211ULL;
    }
    if (added == 0) {
        rc = -ENODATA;
        goto fail;
    }
    /* So does the second name: a session whose leaf named only it must
     * not resume a conn that no longer accepts it (the alias is gone). */
    for (const char *p = alt; *p != '\0'; p++)
        h = (h ^ (uint8_t)*p) * 1099511628211ULL;
    SSL_set_verify(c->ssl, SSL_VERIFY_PEER, NULL);
    if (cache != NULL) {
        char key[512];
        snprintf(key, sizeof(key), "%s|dane:%016llx", cache_key != NULL ? cache_key : c->host,
                 (unsigned long long)h);
        if ((rc = conn_offer_session(c, cache, key, true)) != 0)
            goto fail;
    }
    ERR_clear_error();
    *out = c;
    return 0;
fail:
    ERR_clear_error();
    tls_conn_free(c);
    return rc;
}

/* Whether the peer's certificate is known good for c->host. A resumed
 * session carries no new certificate check: it is as good as the session
 * the cache offered. */
static bool
conn_verified(const struct tls_conn *c)
{
    if (c->host == NULL)
        return false;
    if (SSL_session_reused(c->ssl))
        return c->offered_verified;
    if (c->dane && SSL_get0_dane_authority(c->ssl, NULL, NULL) < 0)
        return false;
    return SSL_get0_peer_certificate(c->ssl) != NULL && SSL_get_verify_result(c->ssl) == X509_V_OK;
}

int
tls_conn_on_new_session(SSL *ssl, SSL_SESSION *sess)
{
    BIO *bio = SSL_get_rbio(ssl);
    struct tls_conn *c = bio != NULL ? BIO_get_data(bio) : NULL;
    if (c == NULL || c->cache == NULL || !SSL_SESSION_is_resumable(sess))
        return 0;
    const char *vh = conn_verified(c) ? c->host : NULL;
    /* 1: the cache keeps OpenSSL's reference; 0: OpenSSL drops it. */
    return tls_cache_put(c->cache, c->cache_key, sess, vh, c->trust_gen) == 0;
}

/* ---- driving ---- */

ssize_t
tls_conn_feed(struct tls_conn *c, const void *data, size_t len)
{
    if (c->state == CONN_FAILED)
        return c->error;
    size_t n = buf_room(&c->in);
    if (n > len)
        n = len;
    if (n > 0 && buf_append(&c->in, data, n) < 0)
        return -ENOMEM;
    return (ssize_t)n;
}

int
tls_conn_handshake(struct tls_conn *c)
{
    if (c->state == CONN_FAILED)
        return c->error;
    if (c->state == CONN_OPEN)
        return 0;
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    int rc = r == 1 ? 0 : conn_check(c, r);
    c->wants_room = rc == TLS_WANT_IO && SSL_want_write(c->ssl);
    if (rc == 0)
        c->state = CONN_OPEN;
    else if (rc < 0 && c->offered != NULL)
        /* The session may be what the server choked on; the next attempt
         * starts afresh, unless another connection stored a newer session
         * under the key meanwhile: that one stays. */
        tls_cache_remove(c->cache, c->cache_key, c->offered);
    if (rc <= 0 && c->offered != NULL) {
        SSL_SESSION_free(c->offered); /* the SSL holds what it still needs */
        c->offered = NULL;
    }
    ERR_clear_error();
    return rc;
}

ssize_t
tls_conn_read(struct tls_conn *c, void *buf, size_t cap)
{
    if (c->state == CONN_FAILED)
        return c->error;
    if (c->peer_closed)
        return TLS_ECLOSED;
    if (c->state != CONN_OPEN)
        return TLS_ESTATE;
    if (cap == 0)
        return 0;
    /* Nothing received, nothing inside OpenSSL and no answer waiting for
     * room: a read could only say "want more", and on its way OpenSSL
     * would allocate its read buffer (about 17 KB) and keep it while the
     * connection waits. */
    if (buf_len(&c->in) == 0 && !SSL_has_pending(c->ssl) && !c->wants_room)
        return 0;
    ERR_clear_error();
    size_t n = 0;
    ssize_t rc;
    for (;;) {
        size_t in_before = buf_len(&c->in);
        bool had_pending = SSL_has_pending(c->ssl) == 1;
        c->wants_room = false;
        if (SSL_read_ex(c->ssl, buf, cap, &n) == 1) {
            rc = (ssize_t)n;
            break;
        }
        int e = conn_check(c, 0);
        rc = e == TLS_WANT_IO ? 0 : e; /* a count of 1 is not TLS_WANT_IO */
        if (e != TLS_WANT_IO)
            break;
        if (SSL_want_write(c->ssl)) {
            /* A key update answer that did not fit: OpenSSL reads no
             * further until it is written (tls_conn_wants_room). */
            c->wants_room = true;
            break;
        }
        /* Without SSL_MODE_AUTO_RETRY (ctx.c), OpenSSL returns after a
         * record that carries no data (a key update, a session ticket)
         * once its read-ahead buffer is empty, even with more in ours:
         * go on while it takes something, or no one would call again
         * for input that has all arrived. */
        if (buf_len(&c->in) == 0 || (buf_len(&c->in) == in_before && !had_pending))
            break;
    }
    ERR_clear_error();
    if (rc > 0)
        c->read_bytes += (uint64_t)rc;
    if (c->key_updates > KEY_UPDATE_FREE + c->read_bytes / KEY_UPDATE_PER) {
        snprintf(c->errstr, sizeof(c->errstr), "%u key updates after %llu octets: a flood",
                 c->key_updates, (unsigned long long)c->read_bytes);
        c->state = CONN_FAILED;
        c->error = TLS_EPROTO;
        return c->error;
    }
    return rc;
}

/* The most plaintext one record carries: 16K, or less when the peer asked
 * for a maximum fragment length (RFC 6066). */
static size_t
conn_max_fragment(const struct tls_conn *c)
{
    const SSL_SESSION *sess = SSL_get_session(c->ssl);
    uint8_t mode = sess != NULL ? SSL_SESSION_get_max_fragment_length(sess) : 0;
    if (mode >= TLSEXT_max_fragment_length_512 && mode <= TLSEXT_max_fragment_length_4096)
        return (size_t)256 << mode;
    return SSL3_RT_MAX_PLAIN_LENGTH;
}

ssize_t
tls_conn_write(struct tls_conn *c, const void *buf, size_t len)
{
    if (c->state == CONN_FAILED)
        return c->error;
    if (c->state != CONN_OPEN || c->shutdown_sent)
        return TLS_ESTATE;
    const unsigned char *p = buf;
    size_t frag = conn_max_fragment(c);
    size_t done = 0;
    ssize_t rc = 0;
    ERR_clear_error();
    /* One record per SSL_write, each only when its ciphertext surely fits:
     * then a full buffer stops us between records, where OpenSSL has
     * nothing half-written that it would want retried. */
    while (done < len) {
        size_t room = buf_room(&c->out);
        if (room <= RECORD_SLACK)
            break;
        size_t chunk = len - done;
        if (chunk > frag)
            chunk = frag;
        if (chunk > room - RECORD_SLACK)
            chunk = room - RECORD_SLACK;
        size_t n = 0;
        if (SSL_write_ex(c->ssl, p + done, chunk, &n) != 1) {
            rc = conn_check(c, 0);
            break;
        }
        done += n;
    }
    ERR_clear_error();
    if (done > 0)
        return (ssize_t)done; /* a failure shows on the next call */
    return rc < 0 ? rc : 0;
}

int
tls_conn_shutdown(struct tls_conn *c)
{
    if (c->state == CONN_FAILED)
        return c->error;
    if (c->state != CONN_OPEN)
        return TLS_ESTATE;
    if (c->shutdown_sent)
        return 0;
    ERR_clear_error();
    int r = SSL_shutdown(c->ssl);
    int rc = r >= 0 ? 0 : conn_check(c, r);
    if (rc == 0)
        c->shutdown_sent = true;
    ERR_clear_error();
    return rc;
}

const void *
tls_conn_peek(struct tls_conn *c, size_t *len)
{
    *len = buf_len(&c->out);
    c->out.lent = *len;
    return *len > 0 ? c->out.data + c->out.head : NULL;
}

int
tls_conn_consume(struct tls_conn *c, size_t n)
{
    if (n > buf_len(&c->out))
        return -EINVAL;
    buf_drop(&c->out, n);
    return 0;
}

size_t
tls_conn_pending(const struct tls_conn *c)
{
    return buf_len(&c->out);
}

bool
tls_conn_input_waiting(const struct tls_conn *c)
{
    return buf_len(&c->in) > 0 || SSL_has_pending(c->ssl) == 1;
}

bool
tls_conn_wants_room(const struct tls_conn *c)
{
    return c->wants_room && c->state != CONN_FAILED;
}

/* ---- for logs ---- */

static void
name_str(const X509_NAME *name, char *out, size_t cap)
{
    out[0] = '\0';
    BIO *b = BIO_new(BIO_s_mem());
    if (b == NULL)
        return;
    /* RFC 2253 with its escaping: control and non-ASCII bytes come out
     * as \XX, so a hostile certificate cannot forge log lines. */
    if (X509_NAME_print_ex(b, name, 0, XN_FLAG_RFC2253) >= 0) {
        int n = BIO_read(b, out, (int)cap - 1);
        out[n > 0 ? n : 0] = '\0';
    }
    BIO_free(b);
}

int
tls_conn_info(const struct tls_conn *c, struct tls_info *out)
{
    memset(out, 0, sizeof(*out));
    /* A failed handshake has things worth logging too: the certificate
     * that did not verify, and by whom it was issued. */
    if (c->state == CONN_HANDSHAKE)
        return TLS_ESTATE;
    const SSL_CIPHER *cipher = SSL_get_current_cipher(c->ssl);
    out->protocol = SSL_get_version(c->ssl);
    out->cipher = cipher != NULL ? SSL_CIPHER_get_name(cipher) : "";
    out->cipher_bits = cipher != NULL ? SSL_CIPHER_get_bits(cipher, NULL) : 0;
    out->resumed = SSL_session_reused(c->ssl) == 1;
    out->verified = conn_verified(c);
    out->dane = c->dane;
    out->dane_usage = -1;
    uint8_t usage;
    if (c->dane && out->verified && !out->resumed &&
        SSL_get0_dane_tlsa(c->ssl, &usage, NULL, NULL, NULL, NULL) >= 0)
        out->dane_usage = usage;
    X509 *peer = SSL_get0_peer_certificate(c->ssl);
    if (peer == NULL && SSL_get_peer_cert_chain(c->ssl) != NULL) {
        /* A certificate that failed verification is not kept as the peer's,
         * but the chain it came in is, leaf first on a client. */
        STACK_OF(X509) *chain = SSL_get_peer_cert_chain(c->ssl);
        peer = sk_X509_num(chain) > 0 ? sk_X509_value(chain, 0) : NULL;
    }
    if (peer == NULL) {
        out->verify_result = "no peer certificate";
    } else {
        long vr = SSL_get_verify_result(c->ssl);
        out->verify_result = vr == X509_V_OK ? "ok" : X509_verify_cert_error_string(vr);
        name_str(X509_get_subject_name(peer), out->peer_subject, sizeof(out->peer_subject));
        name_str(X509_get_issuer_name(peer), out->peer_issuer, sizeof(out->peer_issuer));
    }
    ERR_clear_error();
    return 0;
}

const char *
tls_conn_error_str(const struct tls_conn *c)
{
    return c->errstr;
}
