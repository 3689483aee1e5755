/*
 * tls_int: what the files of tls/ share and nobody else sees: the layout
 * of struct tls_ctx, the cache operations a conn uses, and the callback
 * through which OpenSSL hands a client its new sessions.
 *
 * Threading: as tls.h says: a ctx is immutable after creation, a cache and
 * its conns stay on one thread.
 */
#ifndef SLUICE_TLS_TLS_INT_H
#define SLUICE_TLS_TLS_INT_H

#include <stdatomic.h>

#include <openssl/ssl.h>

#include "tls/tls.h"

struct tls_ctx {
    atomic_uint refs;
    SSL_CTX *ssl_ctx; /* owned: one reference; every SSL made from it holds its own */
    size_t buffer_size;
    bool server;
    /* Unique per ctx made in this process. A cached session counts as
     * verified only for conns of the ctx whose CA store verified it: after
     * a reload changes the trusted CAs, no resumption skips the new check. */
    uint64_t trust_gen;
};

/* The session stored under key if it is still resumable and, with
 * require_verified, its certificate verified for host by the CA store of
 * trust_gen (a ctx's). *verified says whether it did. Borrowed: valid until
 * the next call on the cache (SSL_set_session takes its own reference).
 * Counts a hit or a miss. */
SSL_SESSION *tls_cache_get(struct tls_cache *cache, const char *key, const char *host,
                           uint64_t trust_gen, bool require_verified, bool *verified);
/* Store sess under key, replacing what was there; verified_host says for
 * which host its certificate verified (NULL: it did not), under the CA
 * store of trust_gen. Returns 0 when the cache took over the caller's
 * reference to sess, or -ENOMEM / -ENOSPC (a cache of size 0) when it did
 * not. */
int tls_cache_put(struct tls_cache *cache, const char *key, SSL_SESSION *sess,
                  const char *verified_host, uint64_t trust_gen);
/* Forget key if it still holds sess (a resumption with sess failed; a
 * session stored under key since is kept). sess is only compared: the
 * caller holds a reference to it, so no other session has its address. */
void tls_cache_remove(struct tls_cache *cache, const char *key, const SSL_SESSION *sess);

/* SSL_CTX_sess_set_new_cb for client contexts: finds the conn through its
 * BIO and stores the session in the conn's cache. Returns 1 when the cache
 * kept the reference. */
int tls_conn_on_new_session(SSL *ssl, SSL_SESSION *sess);

#endif
