/*
 * tls: TLS for sluice's connections, with OpenSSL 3 driven over memory.
 * The io_uring loop moves ciphertext between a socket and a tls_conn;
 * OpenSSL never sees a file descriptor and nothing here does I/O. This
 * module owns the OpenSSL contexts (server: the submission certificate;
 * client: the CA store for the verify policy, and DANE: authentication by
 * an MX host's TLSA records, RFC 7672, with the TLSA base domain as SNI
 * and a CNAME'd host's two names as reference identifiers), one SSL per
 * connection with its two bounded ciphertext buffers, and the client
 * session cache that resumes sessions per MX host.
 *
 * One connection, as its owner drives it:
 *
 *   recv completed      -> tls_conn_feed (it may take less than offered)
 *   handshake           -> tls_conn_handshake until it returns 0
 *   plaintext           -> tls_conn_read, tls_conn_write
 *   ciphertext to send  -> tls_conn_peek; send; tls_conn_consume what went out
 *   end                 -> tls_conn_shutdown, send what is pending, close
 *
 * Rule of the loop: after every call, send what tls_conn_peek shows; after
 * tls_conn_feed or tls_conn_consume, retry the call that returned
 * TLS_WANT_IO (or 0 from tls_conn_read or tls_conn_write). Any call may produce ciphertext:
 * a read can answer a key update, a failed handshake leaves an alert.
 * A handshake step or a read that stopped at a full output buffer
 * (tls_conn_wants_room: a peer that asked for many key updates at once)
 * reads nothing more until its answer is written: retry it after
 * tls_conn_consume even when no ciphertext arrived, since what it has not
 * read yet is already in the conn and the peer may send nothing more.
 * And a handshake step or a read may take ciphertext out of the input
 * buffer even when it yields nothing (a record larger than the buffer is
 * gathered inside OpenSSL): when tls_conn_feed took less than offered,
 * offer the rest again after each of them, before waiting for the socket;
 * the peer may have sent all it will send until it hears back.
 *
 * Threading:
 *  - struct tls_ctx is immutable once made and its reference count is
 *    atomic: any thread may make connections from it, ref it and unref it.
 *    A reload makes a new ctx and drops the old; connections made from the
 *    old one keep working (each holds OpenSSL's own reference to what it
 *    needs), whichever is freed first.
 *  - struct tls_cache and struct tls_conn belong to one thread (a worker)
 *    and take no locks. A conn that uses a cache must run on the cache's
 *    thread: one cache per worker, shared by that worker's connections.
 *
 * Errors: functions return 0 (or a count) or a negative code: -ENOMEM,
 * -EINVAL, or enum tls_error; tls_strerror() names all of them. OpenSSL's
 * per-thread error queue is emptied before each function returns, so one
 * connection's failure never shows up in another's.
 */
#ifndef SLUICE_TLS_TLS_H
#define SLUICE_TLS_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/conf.h"

struct tls_ctx;
struct tls_cache;
struct tls_conn;

/* ---- configuration: the [tls] section ---- */

struct tls_config {
    char *cert_file;             /* owned; PEM chain, leaf first; NULL: no server TLS */
    char *key_file;              /* owned; PEM key; NULL: the key is in cert_file */
    int min_protocol;            /* 0: TLSv1.2, 1: TLSv1.3 (both sides) */
    int max_protocol;            /* same scale; at least min_protocol */
    char *ciphers;               /* owned; TLS 1.2 cipher list; NULL: OpenSSL's default */
    char *ciphersuites;          /* owned; TLS 1.3 suites; NULL: OpenSSL's default */
    char *ca_file;               /* owned; CA bundle for verify; NULL with ca_path NULL: system */
    char *ca_path;               /* owned; hashed CA directory for verify */
    unsigned session_cache_size; /* client sessions kept per cache (per worker); 0: none */
    uint64_t buffer_size;        /* ciphertext bytes buffered per connection, each way */
    uint64_t handshake_timeout;  /* ms a submission client has for its whole handshake */
};

/* The key table for struct tls_config (conf_defaults, conf_set, conf_free). */
extern const struct conf_key tls_conf_keys[];

/* True when the config names a server certificate: only then may the
 * submission server offer STARTTLS or listen for implicit TLS. */
bool tls_config_has_server(const struct tls_config *cfg);

/* ---- status and errors ---- */

/* From tls_conn_handshake and tls_conn_shutdown, which return no counts:
 * not an error; feed more ciphertext or send what is pending, then call
 * again. Positive, so that `rc < 0` still means failure. (Read and write
 * say the same with 0.) */
enum { TLS_WANT_IO = 1 };

/* The module's own range, below the queue's (-31000..). */
enum tls_error {
    TLS_EPROTO = -32000, /* the peer sent what is not TLS here: garbage, plaintext, a bad record */
    TLS_ENEGOTIATE = -32001, /* no protocol version, cipher or group in common */
    TLS_EVERIFY = -32002,    /* the peer's certificate failed verification (chain or name) */
    TLS_EALERT = -32003,     /* the peer aborted the connection with a fatal alert */
    TLS_ECLOSED = -32004,    /* the peer ended TLS with close_notify: no more data */
    TLS_ESTATE = -32005,     /* not valid now: before the handshake, after shutdown or failure */
    TLS_ECONFIG = -32006,    /* a certificate, key, CA or cipher setting could not be loaded */
    TLS_EINTERNAL = -32007,  /* OpenSSL failed inside */
};

/* Text for any code this module returns (never NULL, static storage). */
const char *tls_strerror(int rc);

/* ---- contexts ---- */

/* Make a server context from cfg->cert_file and key_file (the certificate
 * must match the key) and the protocol and cipher settings. Returns 0 and
 * *out with one reference, or -EINVAL (no cert_file), TLS_ECONFIG or
 * -ENOMEM with a message for the operator in err naming the key, the file
 * and OpenSSL's reason. cfg is read only during the call. */
int tls_ctx_new_server(const struct tls_config *cfg, struct tls_ctx **out, char *err,
                       size_t errlen);
/* Make a client context: protocol and cipher settings and the CA store
 * (ca_file, ca_path, or the system's) that the verify policy trusts. Same
 * returns as tls_ctx_new_server. */
int tls_ctx_new_client(const struct tls_config *cfg, struct tls_ctx **out, char *err,
                       size_t errlen);
/* Take another reference (any thread). Returns ctx. */
struct tls_ctx *tls_ctx_ref(struct tls_ctx *ctx);
/* Drop a reference; the last one frees the ctx. Connections made from it
 * are unaffected. NULL is fine. Returns NULL. */
struct tls_ctx *tls_ctx_unref(struct tls_ctx *ctx);

/* ---- client session cache ---- */

struct tls_cache_stats {
    size_t entries;     /* sessions held now */
    uint64_t hits;      /* a session was offered to a server */
    uint64_t misses;    /* nothing usable for the key */
    uint64_t evictions; /* dropped to stay under the bound, or expired */
};

/* A cache of at most max_entries client sessions, least recently used
 * dropped first; max_entries 0 keeps nothing. Returns 0 and *out, or
 * -ENOMEM. Owned by one thread; sessions in it do not depend on any ctx,
 * so it survives a reload, but a session counts as verified only for
 * conns of the ctx whose CA store verified it: after a reload a verify
 * connection makes one full handshake (its CAs may have changed). */
int tls_cache_new(unsigned max_entries, struct tls_cache **out);
/* Free the cache and its sessions. Every conn that used it must be freed
 * first. NULL is fine. Returns NULL. */
struct tls_cache *tls_cache_free(struct tls_cache *cache);
void tls_cache_stats(const struct tls_cache *cache, struct tls_cache_stats *out);

/* ---- connections ---- */

/* A server connection (STARTTLS on 587, implicit TLS on 465). ctx is
 * needed only during the call. Returns 0 and *out, or -EINVAL (not a
 * server ctx), -ENOMEM. */
int tls_conn_new_server(struct tls_ctx *ctx, struct tls_conn **out);

/* A client connection to host (the MX host name, or an IP literal): sent as
 * SNI and checked against the certificate. With verify, the handshake
 * fails with TLS_EVERIFY unless the chain leads to a trusted CA and the
 * certificate matches host; without it (opportunistic, RFC 7435) the
 * handshake succeeds whatever the certificate and tls_conn_info() records
 * the result. host may be NULL only without verify.
 *
 * With a cache, a session stored under cache_key (NULL: host; callers that
 * reach one host on several ports put the port in it) is offered for
 * resumption, and the sessions this connection receives are stored there.
 * A verify connection only resumes a session whose certificate verified for
 * this host, so resumption never skips a check. ctx is needed only during
 * the call; host and cache_key are copied; cache is borrowed and must
 * outlive the conn. Returns 0 and *out, -EINVAL, or -ENOMEM. */
int tls_conn_new_client(struct tls_ctx *ctx, const char *host, bool verify, struct tls_cache *cache,
                        const char *cache_key, struct tls_conn **out);

/* One TLSA record (RFC 6698 2.1) as DNS gave it. */
struct tls_tlsa {
    uint8_t usage;       /* 0 PKIX-TA, 1 PKIX-EE, 2 DANE-TA, 3 DANE-EE */
    uint8_t selector;    /* 0 certificate, 1 SubjectPublicKeyInfo */
    uint8_t mtype;       /* 0 exact, 1 SHA-256, 2 SHA-512 */
    uint16_t len;
    const uint8_t *data; /* borrowed: during the call only */
};

/* How many of the records DANE for SMTP can use (RFC 7672 3.1.3): usage
 * DANE-TA(2) or DANE-EE(3), a known selector and matching type. PKIX-TA(0)
 * and PKIX-EE(1) are not: SMTP has no agreed trust store. None usable
 * means TLS is still mandatory but cannot be authenticated (RFC 7672 2.2). */
unsigned tls_tlsa_usable(const struct tls_tlsa *rrs, unsigned n);

/* A client connection to an MX host authenticated by DANE. host is the
 * TLSA base domain (the name whose _25._tcp TLSA records rrs are): it is
 * sent as SNI (RFC 7672 8.1). The handshake fails with TLS_EVERIFY unless
 * the server's certificate matches a DANE-EE(3) record (its name and dates
 * are then not checked, RFC 7672 3.1.1) or chains to a DANE-TA(2) record's
 * certificate or key and names host or alt_name (3.1.2, 3.2.2: for an MX
 * host that is a validated CNAME, both the MX host name and the end of the
 * chain are reference identifiers; pass the one that is not host, or NULL
 * for none). Unusable records are skipped. A cached session is resumed
 * only when it was DANE-authenticated for host under the same TLSA records
 * and alt_name (they are part of the key), so resumption never skips the
 * check and a new record set makes a full handshake. Otherwise as
 * tls_conn_new_client (host and alt_name are copied). Returns 0 and *out,
 * -ENODATA when no record is usable, -EINVAL or -ENOMEM. */
int tls_conn_new_client_dane(struct tls_ctx *ctx, const char *host, const char *alt_name,
                             const struct tls_tlsa *rrs, unsigned n, struct tls_cache *cache,
                             const char *cache_key, struct tls_conn **out);

/* Free the conn without sending anything. Nothing handed out by
 * tls_conn_peek may still be in use (a send in flight). A client conn
 * freed after its handshake but before tls_conn_shutdown counts as broken:
 * OpenSSL marks its sessions unresumable and the cache drops them. NULL is
 * fine. Returns NULL. */
struct tls_conn *tls_conn_free(struct tls_conn *c);

/* Copy ciphertext received from the socket into the conn's input buffer
 * (allocated while it holds bytes: an idle conn keeps no buffers).
 * Returns how many bytes it took (0..len; fewer than len when the buffer is
 * full: read plaintext out, then offer the rest again), the error that
 * failed the conn, or -ENOMEM (the conn is unharmed; offer it again). */
ssize_t tls_conn_feed(struct tls_conn *c, const void *data, size_t len);

/* Drive the handshake. Returns 0 once it is complete (and on every later
 * call), TLS_WANT_IO, or an error; a failed conn returns the same error
 * from then on. */
int tls_conn_handshake(struct tls_conn *c);

/* Decrypt up to cap bytes of plaintext into buf. Returns the count (> 0),
 * 0 when no whole record is buffered yet (feed more, send what is
 * pending), TLS_ECLOSED once the peer sent close_notify, TLS_ESTATE before
 * the handshake completed, or an error (plaintext injected into the stream
 * gives TLS_EPROTO). */
ssize_t tls_conn_read(struct tls_conn *c, void *buf, size_t cap);

/* Encrypt plaintext into the output buffer. Returns how many bytes it took
 * (maybe fewer than len: the output buffer is bounded), 0 when it has no
 * room (send, consume, retry), TLS_ESTATE before the handshake or after
 * tls_conn_shutdown, or an error. Bytes taken are never asked for again:
 * the caller may reuse buf at once. */
ssize_t tls_conn_write(struct tls_conn *c, const void *buf, size_t len);

/* Queue close_notify. Returns 0 once it is queued (send what is pending,
 * then close the socket; sluice does not wait for the peer's), TLS_WANT_IO
 * when the output buffer is full, TLS_ESTATE during the handshake, or the
 * error that failed the conn (then just close). */
int tls_conn_shutdown(struct tls_conn *c);

/* Ciphertext waiting to be sent: returns a pointer to *len bytes (NULL and
 * 0 when there is none). Those bytes stay at that address, unchanged, until
 * tls_conn_consume() releases them or the conn is freed, whatever else is
 * called meanwhile (new ciphertext is appended after them, never moved over
 * them), so the pointer can go straight into a send SQE. Peeking pins
 * the bytes shown: to ask how much is waiting, use tls_conn_pending. */
const void *tls_conn_peek(struct tls_conn *c, size_t *len);
/* Release the first n bytes that tls_conn_peek showed (they were sent).
 * Returns 0, or -EINVAL when n exceeds what is pending. */
int tls_conn_consume(struct tls_conn *c, size_t n);
/* Ciphertext bytes waiting to be sent. */
size_t tls_conn_pending(const struct tls_conn *c);
/* Received bytes not yet read out as plaintext: ciphertext fed but not
 * decrypted (part of a record), or a record OpenSSL holds. */
bool tls_conn_input_waiting(const struct tls_conn *c);
/* The last tls_conn_handshake or tls_conn_read stopped because the output
 * buffer was full (OpenSSL holds a key update answer or a handshake
 * message it could not write): after tls_conn_consume, call it again,
 * even with nothing new fed. False once the conn failed. */
bool tls_conn_wants_room(const struct tls_conn *c);

/* What to log about a connection once its handshake completed or failed
 * (a failed verify still shows the certificate it refused). Strings are
 * static or copied into the struct: none depends on the conn. */
struct tls_info {
    const char *protocol; /* "TLSv1.3" */
    const char *cipher;   /* "TLS_AES_256_GCM_SHA384" */
    int cipher_bits;
    bool resumed;              /* an earlier session was resumed */
    bool verified;             /* chain trusted and certificate matched the host, or
                                  DANE-authenticated */
    bool dane;                 /* a DANE conn (tls_conn_new_client_dane) */
    int dane_usage;            /* the record that authenticated it: 2 or 3; -1: none, or
                                  resumed (the session had been authenticated) */
    const char *verify_result; /* "ok", or why not: "hostname mismatch", "no peer certificate" */
    char peer_subject[256];    /* RFC 2253, cut to fit; "" without a peer certificate */
    char peer_issuer[256];
};
/* Fill *out. Returns 0, or TLS_ESTATE while the handshake is under way. */
int tls_conn_info(const struct tls_conn *c, struct tls_info *out);

/* Why the conn failed, in OpenSSL's words ("wrong version number",
 * "certificate verify failed: hostname mismatch", "tlsv1 alert unknown
 * ca"); "" while it has not failed. Valid until the conn is freed. */
const char *tls_conn_error_str(const struct tls_conn *c);

#endif
