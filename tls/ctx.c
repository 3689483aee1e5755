/*
 * ctx: the OpenSSL contexts. A server ctx holds the submission certificate
 * and key; a client ctx holds the CA store that the verify policy trusts,
 * has OpenSSL's DANE support enabled (for conns given TLSA records) and
 * hands new sessions to the conn's cache. Both carry the protocol and
 * cipher settings of [tls] and the per-connection buffer size.
 *
 * Threading: a ctx is built on one thread and never changed afterwards, so
 * any thread may make connections from it (OpenSSL locks what SSL_new
 * touches in an SSL_CTX). References are atomic. Every SSL holds its own
 * reference to its SSL_CTX, which is what lets a reload drop the old ctx
 * while its connections live on. Each ctx gets a trust generation of its
 * own (a process-wide counter), which keeps a session verified under one
 * CA store from passing for verified under the next.
 */
#include "tls/tls_int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/err.h>
#include <openssl/x509.h>

/* Fill err with what failed and OpenSSL's first reason (usually the root
 * cause: "No such file or directory" before "system lib"), then empty the
 * error queue. */
static int
ctx_fail(char *err, size_t errlen, const char *what, const char *value)
{
    unsigned long e = ERR_peek_error();
    char reason[256] = "no reason given";
    if (e != 0)
        ERR_error_string_n(e, reason, sizeof(reason));
    snprintf(err, errlen, "%s %s: %s", what, value, reason);
    ERR_clear_error();
    if (e != 0 && ERR_GET_REASON(e) == ERR_R_MALLOC_FAILURE)
        return -ENOMEM;
    return TLS_ECONFIG;
}

/* What both sides share: versions, ciphers, and the modes that fit a conn
 * whose BIO is a bounded buffer rather than a socket. */
static int
ctx_setup(SSL_CTX *s, const struct tls_config *cfg, char *err, size_t errlen)
{
    static const int versions[] = {TLS1_2_VERSION, TLS1_3_VERSION};
    static const char *const names[] = {"TLSv1.2", "TLSv1.3"};
    int lo = cfg->min_protocol, hi = cfg->max_protocol;
    if (lo < 0 || lo > 1 || hi < 0 || hi > 1 || lo > hi) {
        snprintf(err, errlen, "min_protocol %s: newer than max_protocol %s", names[lo & 1],
                 names[hi & 1]);
        return -EINVAL;
    }
    if (SSL_CTX_set_min_proto_version(s, versions[lo]) != 1)
        return ctx_fail(err, errlen, "min_protocol", names[lo]);
    if (SSL_CTX_set_max_proto_version(s, versions[hi]) != 1)
        return ctx_fail(err, errlen, "max_protocol", names[hi]);
    if (cfg->ciphers != NULL && SSL_CTX_set_cipher_list(s, cfg->ciphers) != 1)
        return ctx_fail(err, errlen, "ciphers", cfg->ciphers);
    if (cfg->ciphersuites != NULL && SSL_CTX_set_ciphersuites(s, cfg->ciphersuites) != 1)
        return ctx_fail(err, errlen, "ciphersuites", cfg->ciphersuites);
    /* Renegotiation would let a peer restart the handshake in the middle
     * of a mail transaction: more states, more CPU, no use to SMTP. */
    SSL_CTX_set_options(s, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    /* Idle connections (thousands, waiting on a slow MX) give OpenSSL's
     * record buffers back. */
    SSL_CTX_set_mode(s, SSL_MODE_RELEASE_BUFFERS);
    /* With a memory BIO there is nothing to retry on: return to the loop
     * as soon as a record is done. */
    SSL_CTX_clear_mode(s, SSL_MODE_AUTO_RETRY);
    /* Take whole buffered records at once instead of header, then body. */
    SSL_CTX_set_read_ahead(s, 1);
    return 0;
}

/* Whether any cipher is left once OpenSSL filters the lists by the
 * protocol range and its security level. SSL_CTX_set_cipher_list only
 * asks that a name match, so "@SECLEVEL=3:AES128-SHA" or a list of PSK
 * ciphers under max_protocol = TLSv1.2 loads, and then every handshake
 * fails before a ClientHello is written (an outbound peer only sees an
 * alert and hangs up) or finds no shared cipher: the operator hears it
 * at startup or reload instead. */
static int
ctx_check_ciphers(SSL_CTX *s, const struct tls_config *cfg, char *err, size_t errlen)
{
    SSL *ssl = SSL_new(s);
    if (ssl == NULL)
        return ctx_fail(err, errlen, "ciphers", "check");
    STACK_OF(SSL_CIPHER) *sk = SSL_get1_supported_ciphers(ssl);
    int n = sk != NULL ? sk_SSL_CIPHER_num(sk) : 0;
    sk_SSL_CIPHER_free(sk);
    SSL_free(ssl);
    ERR_clear_error();
    if (n > 0)
        return 0;
    snprintf(err, errlen,
             "ciphers %s, ciphersuites %s: none usable with the protocols allowed "
             "(min_protocol..max_protocol) at OpenSSL's security level",
             cfg->ciphers != NULL ? cfg->ciphers : "(default)",
             cfg->ciphersuites != NULL ? cfg->ciphersuites : "(default)");
    return TLS_ECONFIG;
}

/* The last trust generation handed out. Process-wide because it must be
 * unique across every ctx of the process, whichever thread makes one; it
 * only ever grows. */
static atomic_uint_fast64_t ctx_trust_gen;

static int
ctx_wrap(SSL_CTX *s, const struct tls_config *cfg, bool server, struct tls_ctx **out, char *err,
         size_t errlen)
{
    uint64_t size = cfg->buffer_size;
    if (size < 4096 || size > (1u << 20)) {
        snprintf(err, errlen, "buffer_size %llu: must be 4K..1M", (unsigned long long)size);
        SSL_CTX_free(s);
        return -EINVAL;
    }
    struct tls_ctx *ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL) {
        snprintf(err, errlen, "out of memory");
        SSL_CTX_free(s);
        return -ENOMEM;
    }
    atomic_init(&ctx->refs, 1);
    ctx->ssl_ctx = s;
    ctx->buffer_size = (size_t)size;
    ctx->server = server;
    ctx->trust_gen = atomic_fetch_add(&ctx_trust_gen, 1) + 1;
    *out = ctx;
    return 0;
}

int
tls_ctx_new_server(const struct tls_config *cfg, struct tls_ctx **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!tls_config_has_server(cfg)) {
        snprintf(err, errlen, "cert_file is not set");
        return -EINVAL;
    }
    ERR_clear_error();
    SSL_CTX *s = SSL_CTX_new(TLS_server_method());
    if (s == NULL)
        return ctx_fail(err, errlen, "server", "context");
    int rc = ctx_setup(s, cfg, err, errlen);
    if (rc != 0)
        goto fail;
    const char *key = cfg->key_file != NULL ? cfg->key_file : cfg->cert_file;
    if (SSL_CTX_use_certificate_chain_file(s, cfg->cert_file) != 1) {
        rc = ctx_fail(err, errlen, "cert_file", cfg->cert_file);
        goto fail;
    }
    /* A key of another certificate is the usual mistake after a renewal:
     * OpenSSL calls it "key values mismatch"; say it plainly. */
    bool loaded = SSL_CTX_use_PrivateKey_file(s, key, SSL_FILETYPE_PEM) == 1;
    if (!loaded && ERR_GET_REASON(ERR_peek_last_error()) != X509_R_KEY_VALUES_MISMATCH) {
        rc = ctx_fail(err, errlen,
                      cfg->key_file != NULL ? "key_file" : "key_file (unset, so cert_file)", key);
        goto fail;
    }
    if (!loaded || SSL_CTX_check_private_key(s) != 1) {
        ERR_clear_error();
        snprintf(err, errlen, "key_file %s: does not match the certificate in %s", key,
                 cfg->cert_file);
        rc = TLS_ECONFIG;
        goto fail;
    }
    /* Resumption by tickets only: the ticket keys live in this SSL_CTX,
     * shared by every worker, so no session store (and no lock on one)
     * is needed. A reload makes new keys; old tickets then fall back to a
     * full handshake. */
    SSL_CTX_set_session_cache_mode(s, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(s, 1);
    static const unsigned char sid_ctx[] = "sluice";
    SSL_CTX_set_session_id_context(s, sid_ctx, sizeof(sid_ctx) - 1);
    SSL_CTX_set_options(s, SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_dh_auto(s, 1);
    SSL_CTX_set_verify(s, SSL_VERIFY_NONE, NULL);
    if ((rc = ctx_check_ciphers(s, cfg, err, errlen)) != 0)
        goto fail;
    ERR_clear_error();
    return ctx_wrap(s, cfg, true, out, err, errlen);
fail:
    SSL_CTX_free(s);
    ERR_clear_error();
    return rc;
}

int
tls_ctx_new_client(const struct tls_config *cfg, struct tls_ctx **out, char *err, size_t errlen)
{
    *out = NULL;
    ERR_clear_error();
    SSL_CTX *s = SSL_CTX_new(TLS_client_method());
    if (s == NULL)
        return ctx_fail(err, errlen, "client", "context");
    int rc = ctx_setup(s, cfg, err, errlen);
    if (rc != 0)
        goto fail;
    if (cfg->ca_file != NULL && SSL_CTX_load_verify_file(s, cfg->ca_file) != 1) {
        rc = ctx_fail(err, errlen, "ca_file", cfg->ca_file);
        goto fail;
    }
    if (cfg->ca_path != NULL) {
        /* OpenSSL reads a CA directory lazily, at the first verification;
         * a typo would only show as every verify delivery failing. */
        struct stat st;
        const char *why = NULL;
        if (stat(cfg->ca_path, &st) != 0)
            why = strerrordesc_np(errno);
        else if (!S_ISDIR(st.st_mode))
            why = "not a directory";
        if (why != NULL) {
            snprintf(err, errlen, "ca_path %s: %s", cfg->ca_path, why);
            rc = TLS_ECONFIG;
            goto fail;
        }
        if (SSL_CTX_load_verify_dir(s, cfg->ca_path) != 1) {
            rc = ctx_fail(err, errlen, "ca_path", cfg->ca_path);
            goto fail;
        }
    }
    if (cfg->ca_file == NULL && cfg->ca_path == NULL && SSL_CTX_set_default_verify_paths(s) != 1) {
        rc = ctx_fail(err, errlen, "ca_file", "(unset: the system store)");
        goto fail;
    }
    /* Each conn decides whether a bad certificate fails its handshake;
     * the chain is checked and the result kept either way. */
    SSL_CTX_set_verify(s, SSL_VERIFY_NONE, NULL);
    /* DANE (RFC 7672) for conns made with TLSA records: OpenSSL's own
     * matcher, with its default digests (SHA-256, SHA-512). */
    if (SSL_CTX_dane_enable(s) <= 0) {
        rc = ctx_fail(err, errlen, "client", "DANE");
        goto fail;
    }
    /* Sessions go to the conn's own cache (per worker, keyed by MX host),
     * never to OpenSSL's internal one, which is locked and keyed by
     * session id. */
    SSL_CTX_set_session_cache_mode(s, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(s, tls_conn_on_new_session);
    if ((rc = ctx_check_ciphers(s, cfg, err, errlen)) != 0)
        goto fail;
    ERR_clear_error();
    return ctx_wrap(s, cfg, false, out, err, errlen);
fail:
    SSL_CTX_free(s);
    ERR_clear_error();
    return rc;
}

struct tls_ctx *
tls_ctx_ref(struct tls_ctx *ctx)
{
    atomic_fetch_add_explicit(&ctx->refs, 1, memory_order_relaxed);
    return ctx;
}

struct tls_ctx *
tls_ctx_unref(struct tls_ctx *ctx)
{
    if (ctx == NULL)
        return NULL;
    /* acq_rel: the last holder must see every other holder's writes to
     * the SSL_CTX's internals before freeing it. */
    if (atomic_fetch_sub_explicit(&ctx->refs, 1, memory_order_acq_rel) == 1) {
        SSL_CTX_free(ctx->ssl_ctx);
        free(ctx);
    }
    return NULL;
}
