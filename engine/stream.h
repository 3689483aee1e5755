/*
 * stream: one TCP socket on a worker's ring, carrying plaintext or TLS
 * (OpenSSL over memory BIOs, tls/tls.h): the transport under the
 * submission server's sessions (engine/server.c) and outbound connections
 * (engine/outbound/connection.c), as Redis's ConnectionType and HAProxy's
 * xprt_ops serve plain and TLS sockets alike. It owns the socket's reads
 * and sends on the ring, the ciphertext buffer and the TLS conn; it knows
 * nothing of SMTP. Its owner embeds it, keeps its own buffers (what it has
 * to say, where it wants what arrives) and hears back through the
 * callbacks of struct stream_ops.
 *
 * Input. The owner asks for input with stream_recv(); a completed read is
 * announced with on_readable(), and the owner takes what arrived with
 * stream_read(), which hands plaintext over through on_data() (and, over
 * TLS, drives the handshake: on_handshake() when it completes) for as long
 * as the owner has room. Where plaintext lands is the owner's choice:
 *  - room mode (ops->room set): into the owner's own buffer, where room()
 *    says; a plain read goes there directly, with no copy (the server's
 *    line buffer);
 *  - lend mode (ops->room NULL): the stream lends its bytes for the time
 *    of on_data(), which must take them all; plain reads land in the
 *    worker's provided buffers (struct stream_bufs: the kernel picks one
 *    when octets arrive, so a connection waiting for a reply holds no
 *    input buffer), or in a buffer of the stream's own when there are
 *    none (an old kernel). Outbound connections use it.
 * Over TLS, ciphertext is read into a buffer of the stream's (a whole
 * record fits) and fed to the conn; plaintext goes to the room, or in lend
 * mode through a buffer on the stack. That buffer is allocated at
 * stream_start_tls(), or, with provided buffers, only while ciphertext
 * waits in it: a read with nothing left to feed goes to a provided buffer
 * and is copied in, so an idle TLS connection holds none.
 *
 * Output. The owner keeps what it has to say; stream_send() pulls it with
 * output() and sends it as it stands (plain: the send SQE points into the
 * owner's buffer, which must not move until on_sent() takes those octets)
 * or encrypts what the conn takes (on_sent() at once) and sends the
 * ciphertext. Each send completion calls on_writable(): room again;
 * stream_drained() says whether everything said has left. stream_end()
 * asks for TLS close_notify after the owner's last octets.
 *
 * Over TLS, input can wait behind output: a peer that asks for many key
 * updates at once makes OpenSSL queue an answer to each, and once the
 * conn's output is full it reads no further until that has been sent,
 * while the peer, having sent everything, waits. When a send completes
 * with input so stuck, the stream posts a no-op on the ring whose
 * completion calls on_readable() as a read's would: the owner's
 * stream_read() takes the input on, whether or not it reads in
 * on_writable(). A TLS write that fails (OpenSSL could not encrypt) posts
 * the same no-op, whose completion calls on_eof() with that error and
 * send set, as a failed send on a plain socket does: the owner hears of
 * it at once, not when the peer next sends something.
 *
 * Lifetime (STYLE rule 7): the stream counts its reads, sends and no-ops
 * in flight (stream_busy()); stream_close() shuts the socket down (and
 * cancels a connect) so that they come back. Each completion ends in
 * exactly one of the owner's completion callbacks (on_readable,
 * on_writable, on_eof, on_connect; on_release once the stream is closed),
 * after which the stream does not touch st: the owner may free itself
 * (and the stream in it) there when it is closed and nothing else is in
 * flight. The inner callbacks (room, on_data, on_handshake, output,
 * on_sent), called from inside stream_read() and stream_send(), must not
 * free it.
 *
 * Threading: the worker's thread, like everything on its ring.
 */
#ifndef SLUICE_ENGINE_STREAM_H
#define SLUICE_ENGINE_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "engine/worker.h"

struct stream;
struct tls_conn;
struct tls_info;

#define STREAM_BUF_SIZE 4096 /* one provided buffer; the lend mode's own buffer */
#define STREAM_CIN_CAP (17 * 1024) /* ciphertext in: a whole TLS record fits */

struct stream_ops {
    /* Room mode: where plaintext may go now, *cap octets at the returned
     * pointer (NULL or 0: none; a read posted there must find it
     * unchanged when it completes). NULL: lend mode. */
    char *(*room)(struct stream *st, size_t *cap);
    /* len octets of plaintext at p: appended at the room (room mode) or
     * lent until return (lend mode: take them all). From stream_read(). */
    void (*on_data)(struct stream *st, const char *p, size_t len);
    /* The TLS handshake completed (stream_tls_info() says how); from
     * stream_read(), before any plaintext of the session. NULL: nothing
     * to do. */
    void (*on_handshake)(struct stream *st);
    /* What the owner has to send: *len octets at the returned pointer
     * (NULL and 0: nothing). */
    const char *(*output)(struct stream *st, size_t *len);
    /* n octets at the start of output() were taken: sent on a plain
     * socket, or encrypted into TLS. */
    void (*on_sent)(struct stream *st, size_t n);
    /* A read completed, or (over TLS) input already received can move
     * again: take it with stream_read(). */
    void (*on_readable)(struct stream *st);
    /* A send completed (after on_sent): room for more. */
    void (*on_writable)(struct stream *st);
    /* The connection ended: the peer closed (err 0) or a read or send
     * failed (-errno; -EPIPE for a send that sent nothing; over TLS, the
     * tls error of a write that failed, stream_tls_error() saying why:
     * reported at once, from a completion of its own). send: it was a
     * send. */
    void (*on_eof)(struct stream *st, int err, bool send);
    /* stream_connect() completed: 0 or -errno. NULL: never connects. */
    void (*on_connect)(struct stream *st, int res);
    /* An op came back to a closed stream: the owner frees itself here
     * when nothing else is in flight. */
    void (*on_release)(struct stream *st);
};

/* A worker's provided receive buffers for lend-mode streams: a buffer
 * ring registered on its io_uring. */
struct stream_bufs {
    struct io_uring_buf_ring *br; /* owned (mmap), NULL: none registered */
    char *mem;                    /* owned: count * STREAM_BUF_SIZE */
    unsigned count;
    uint16_t bgid;
    uint64_t nobufs;              /* reads retried: every buffer was taken */
};

/* Register count (a power of two) buffers as group bgid on w's ring.
 * Returns 0, or -errno without them (an old kernel: lend-mode streams
 * then read into buffers of their own); logged as
 * event=provided_buffers_unavailable. */
int stream_bufs_init(struct stream_bufs *b, struct worker *w, unsigned count, uint16_t bgid);
/* After the loop ended, on the thread that frees: no read is in flight. */
void stream_bufs_fini(struct stream_bufs *b);

/*
 * One socket. Fields private, visible so that the owner embeds it (about
 * 120 octets; a connection's buffers are lent or allocated only while
 * used).
 */
struct stream {
    struct op recv_op;
    struct op send_op;           /* the connect, before the first send */
    struct op kick_op;           /* a no-op: TLS input can move again */
    struct worker *w;            /* borrowed: the ring, lives longer */
    const struct stream_ops *ops; /* borrowed (static) */
    struct stream_bufs *bufs;    /* borrowed, lend mode; NULL: none */
    struct tls_conn *tls;        /* owned, from stream_start_tls(); NULL: plaintext */
    char *buf;                   /* owned: TLS: ciphertext in, STREAM_CIN_CAP
                                  * (with provided buffers: NULL while empty);
                                  * plaintext in lend mode without provided
                                  * buffers: STREAM_BUF_SIZE; else NULL */
    uint32_t cin_off, cin_len;   /* buf[cin_off..cin_len) waits to be fed; compacted
                                  * only while no read writes into buf */
    int fd;                      /* owned; -1: none (a detached session) */
    uint32_t held;               /* octets of a completed plain read not yet handed over */
    uint16_t held_bid;           /* its provided buffer */
    bool held_buf : 1;           /* ... is a provided buffer */
    bool recv_busy : 1, send_busy : 1, connecting : 1, closed : 1;
    bool kick_busy : 1;          /* kick_op is in flight */
    bool recv_tls : 1;           /* the read in flight is of ciphertext (into buf, or a
                                  * provided buffer while buf is empty) */
    bool tls_ready : 1;          /* handshake complete */
    bool ending : 1;             /* close_notify after the output */
    bool tls_shut : 1;           /* close_notify queued */
    bool eof : 1;                /* the peer's close_notify came: nothing more is read */
    bool tls_heard : 1;          /* an octet came since TLS began */
    bool plain_watch : 1;        /* a first octet that is a letter is plaintext */
    bool plain_peer : 1;         /* ... and it was: the peer spoke plaintext */
    int send_err;                /* a TLS write's error, for the kick's completion to
                                  * report (on_eof); 0: none */
    size_t send_len;             /* octets of the send in flight (plain: of the output;
                                  * TLS: of the ciphertext) */
    uint8_t tail;                /* enum stream_tail, set by stream_close() */
};

/* Take fd (connected, or about to be with stream_connect()). w and ops
 * are borrowed; bufs (lend mode) may be NULL. */
void stream_init(struct stream *st, struct worker *w, int fd, const struct stream_ops *ops,
                 struct stream_bufs *bufs);
/* Free what the stream holds and close the socket. Nothing may be in
 * flight on the ring, or the ring is gone. */
void stream_fini(struct stream *st);

/* Connect to addr on the ring; ops->on_connect says how it went. */
void stream_connect(struct stream *st, const struct sockaddr *addr, socklen_t len);

/* The owner wants input: post a read unless one is in flight, the stream
 * is closed or at its TLS end, a completed read waits for stream_read(),
 * or there is no room. Returns 0, or -ENOMEM (lend mode without provided
 * buffers: no memory for its own). */
int stream_recv(struct stream *st);
/* Hand what has arrived to the owner (on_data, on_handshake) while it has
 * room. Returns 1 when anything moved (plaintext handed over, ciphertext
 * fed, the handshake completed, the peer's close_notify seen), 0 when
 * nothing did, or a tls error (the handshake failed, when
 * stream_tls_ready() is still false; or the session broke). */
int stream_read(struct stream *st);

/* Send what output() holds (over TLS: encrypt what fits, and after it
 * close_notify when stream_end() was called), unless a send is in
 * flight: its completion calls on_writable(), and the owner sends again. */
void stream_send(struct stream *st);
/* Nothing left to send: the output, the ciphertext, no send in flight. */
bool stream_drained(const struct stream *st);
/* Received bytes not yet handed to on_data: a plain read held back, or
 * ciphertext short of a whole record. */
bool stream_input_waiting(const struct stream *st);
/* No more output after what output() holds: over TLS, close_notify
 * follows it. The owner closes once stream_drained(). */
void stream_end(struct stream *st);

/* Begin TLS on the connection: the stream takes tls (a client conn sends
 * its ClientHello at once). A completed plain read not yet handed over is
 * dropped (sent before TLS began: CVE-2011-0411). Returns 0, -EBUSY (a
 * read is in flight, or TLS has begun already: the owner's mistake),
 * -ENOMEM, or the tls error of the first handshake step (a ClientHello
 * OpenSSL could not make: out of memory, mostly; stream_tls_error() no
 * longer has its text); tls is freed on failure and the stream stays
 * plaintext. */
int stream_start_tls(struct stream *st, struct tls_conn *tls);

/* A server's stream (after stream_start_tls()) whose peer may speak
 * plaintext where a ClientHello belongs (an implicit-TLS port): a first
 * octet that is a letter (EHLO, GET: no TLS record starts with one) fails
 * the handshake with TLS_EPROTO before OpenSSL reads anything, so that no
 * alert is sent, and stream_tls_plaintext() says so. */
void stream_tls_watch_plaintext(struct stream *st);
static inline bool
stream_tls_plaintext(const struct stream *st)
{
    return st->plain_peer;
}
/* Whether any octet came from the peer since TLS began. */
static inline bool
stream_tls_heard(const struct stream *st)
{
    return st->tls_heard;
}
/* Back to plaintext after a handshake that sent nothing (the peer was
 * silent, or spoke plaintext: stream_tls_plaintext()), so that the owner
 * can say in the clear why it closes. A read in flight stays as posted
 * (what it brings is not read). Returns 0, or -EBUSY when a send is in
 * flight or the conn has ciphertext to send. */
int stream_tls_drop(struct stream *st);

/* Shut the socket down (and cancel a connect in progress) so that the ops
 * in flight come back; nothing more is read or sent. */
void stream_close(struct stream *st);

/* After stream_close(): whether the last octets the owner gave (output(),
 * over TLS their ciphertext) left. A send completed for them: they are
 * the kernel's (they may reach the peer). One still in flight at the
 * close may have taken them to the kernel or not: its completion says
 * (before on_release). Others were never sent, and never will be. */
enum stream_tail {
    STREAM_TAIL_LEFT,      /* everything given was sent */
    STREAM_TAIL_IN_FLIGHT, /* the last octets are in the send in flight */
    STREAM_TAIL_HELD,      /* the last octets never left */
};

static inline enum stream_tail
stream_close_tail(const struct stream *st)
{
    return (enum stream_tail)st->tail;
}

static inline bool
stream_busy(const struct stream *st)
{
    return st->recv_busy || st->send_busy || st->kick_busy;
}

static inline int
stream_fd(const struct stream *st)
{
    return st->fd;
}

/* TLS has begun (it may still be handshaking). */
static inline bool
stream_tls(const struct stream *st)
{
    return st->tls != NULL;
}

/* The handshake completed. */
static inline bool
stream_tls_ready(const struct stream *st)
{
    return st->tls_ready;
}

/* The peer ended TLS with close_notify (everything before it was handed over). */
static inline bool
stream_eof(const struct stream *st)
{
    return st->eof;
}

/* The TLS conn's description (tls_conn_info) and why it failed
 * (tls_conn_error_str, "" when it has not). */
int stream_tls_info(const struct stream *st, struct tls_info *out);
const char *stream_tls_error(const struct stream *st);

#endif
