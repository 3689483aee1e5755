/*
 * engine/stream over a socketpair, both ends streams on one worker's ring
 * (no network): plain transfers into a room the size of a few octets,
 * into the worker's provided buffers and into a stream's own buffer; TLS
 * both ways at once (a lend-mode client against a room-mode server with
 * a tiny room), ended with close_notify; a TLS client waiting without a
 * ciphertext buffer; a TLS server fed plaintext; a TLS write that fails
 * (OpenSSL out of memory) reported at once; a TLS 1.3 KeyUpdate
 * flood from a hostile peer (plain OpenSSL on a thread of its own) on
 * either side; a stream closed with a read in flight. Each test runs the
 * loop until every end has been released, bounded by a deadline.
 *
 * Threading: one thread, the worker's loop run on it; the hostile peer
 * runs on a thread of its own, shares nothing but its struct (read after
 * the join) and a socket.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "common/clock.h"
#include "engine/stream.h"
#include "engine/worker.h"
#include "tests/tls/tls_test.h"
#include "tls/tls.h"

#define DEADLINE_S 20
#define ROOM_MAX   256

struct end {
    struct stream st;
    const char *name;
    bool room_mode;
    char room[ROOM_MAX];
    size_t room_len, room_cap; /* room_cap: at most ROOM_MAX */
    char *got;                 /* owned: everything received */
    size_t got_len, got_cap;
    size_t expect;             /* octets to receive before it is done */
    const char *out;           /* borrowed: what it sends */
    size_t out_len, out_off;
    bool wait_peer_eof;        /* done only once the peer's close_notify came */
    bool check_idle_buf;       /* a TLS read waiting with nothing to feed holds no buffer */
    unsigned idle_checks;      /* times that was checked */
    unsigned handshakes, eofs;
    int eof_err, read_err;
    bool eof_send;             /* the EOF reported was a send's */
    size_t fail_write_len;     /* once the handshake is done, output this much with
                                * OpenSSL's allocations failing (0: never) */
    bool peer_eof, ending, closed, released;
    bool deaf;                 /* reads nothing more once its TLS handshake is done */
};

struct fixture {
    struct worker w;
    struct stream_bufs bufs;
    struct end a, b;
    struct timer deadline;
    bool timed_out;
    void (*start)(struct fixture *f);
    struct worker_msg start_msg;
    struct test_pki pki;
    struct test_cert cert;
    struct tls_config cfg;
    struct tls_ctx *srv_ctx, *cli_ctx;
};

static struct fixture *F;

/* OpenSSL's allocations fail while set (see crypto_malloc). */
static bool crypto_fail;

#define END_OF(st) ((struct end *)((char *)(st) - offsetof(struct end, st)))

static void
check_all_released(void)
{
    if (F->a.released && F->b.released)
        F->w.stopping = true;
}

static void
end_close(struct end *e)
{
    if (e->closed)
        return;
    e->closed = true;
    stream_close(&e->st);
    if (!stream_busy(&e->st))
        e->released = true;
    check_all_released();
}

/* Done receiving and sending (and, when asked, heard close_notify): end
 * TLS, and close once everything left. */
static void
end_progress(struct end *e)
{
    if (e->closed)
        return;
    bool done = e->got_len >= e->expect && e->out_off == e->out_len &&
                (!e->wait_peer_eof || e->peer_eof);
    if (!done)
        return;
    if (!e->ending) {
        e->ending = true;
        stream_end(&e->st);
        stream_send(&e->st);
    }
    if (stream_drained(&e->st))
        end_close(e);
}

static void
got_append(struct end *e, const char *p, size_t n)
{
    if (n == 0)
        return;
    if (e->got_len + n > e->got_cap) {
        e->got_cap = (e->got_len + n) * 2;
        e->got = realloc(e->got, e->got_cap);
        assert_non_null(e->got);
    }
    memcpy(e->got + e->got_len, p, n);
    e->got_len += n;
}

static char *
t_room(struct stream *st, size_t *cap)
{
    struct end *e = END_OF(st);
    if (e->room_len >= e->room_cap) {
        *cap = 0;
        return NULL;
    }
    *cap = e->room_cap - e->room_len;
    return e->room + e->room_len;
}

static void
t_on_data(struct stream *st, const char *p, size_t len)
{
    struct end *e = END_OF(st);
    assert_true(len > 0);
    if (e->room_mode) {
        assert_ptr_equal(p, e->room + e->room_len); /* appended where room() said */
        assert_true(e->room_len + len <= e->room_cap);
        e->room_len += len;
    } else {
        got_append(e, p, len);
    }
}

static void
t_on_handshake(struct stream *st)
{
    END_OF(st)->handshakes++;
}

static const char *
t_output(struct stream *st, size_t *len)
{
    struct end *e = END_OF(st);
    *len = e->out_len - e->out_off;
    return e->out + e->out_off;
}

static void
t_on_sent(struct stream *st, size_t n)
{
    struct end *e = END_OF(st);
    assert_true(e->out_off + n <= e->out_len);
    e->out_off += n;
}

/* Take what arrived, emptying the room each time, until nothing moves. */
static void
t_on_readable(struct stream *st)
{
    struct end *e = END_OF(st);
    for (;;) {
        int rc = stream_read(st);
        if (e->room_mode) {
            got_append(e, e->room, e->room_len);
            e->room_len = 0;
        }
        if (rc < 0) {
            e->read_err = rc;
            end_close(e);
            return;
        }
        if (rc == 0 || e->closed)
            break;
    }
    if (stream_eof(st))
        e->peer_eof = true;
    if (e->fail_write_len != 0 && stream_tls_ready(st) && !e->closed) {
        /* The owner's own send, outside any read: the write fails there. */
        e->out_len = e->fail_write_len;
        e->fail_write_len = 0;
        crypto_fail = true;
        stream_send(st);
        crypto_fail = false;
    }
    stream_send(st);
    if (!(e->deaf && stream_tls_ready(st)))
        stream_recv(st);
    if (e->check_idle_buf && stream_busy(st) && st->recv_busy && st->cin_len == 0) {
        assert_null(st->buf);
        e->idle_checks++;
    }
    end_progress(e);
}

static void
t_on_writable(struct stream *st)
{
    struct end *e = END_OF(st);
    stream_send(st);
    end_progress(e);
}

static void
t_on_eof(struct stream *st, int err, bool send)
{
    struct end *e = END_OF(st);
    e->eofs++;
    e->eof_err = err;
    e->eof_send = send;
    end_close(e);
}

static void
t_on_release(struct stream *st)
{
    struct end *e = END_OF(st);
    if (e->closed && !stream_busy(st))
        e->released = true;
    check_all_released();
}

static const struct stream_ops room_ops = {
    .room = t_room,
    .on_data = t_on_data,
    .on_handshake = t_on_handshake,
    .output = t_output,
    .on_sent = t_on_sent,
    .on_readable = t_on_readable,
    .on_writable = t_on_writable,
    .on_eof = t_on_eof,
    .on_release = t_on_release,
};

static const struct stream_ops lend_ops = {
    .on_data = t_on_data,
    .on_handshake = t_on_handshake,
    .output = t_output,
    .on_sent = t_on_sent,
    .on_readable = t_on_readable,
    .on_writable = t_on_writable,
    .on_eof = t_on_eof,
    .on_release = t_on_release,
};

/* ---- the loop ---- */

static void
on_deadline(struct timer *t, void *ctx)
{
    (void)t;
    (void)ctx;
    F->timed_out = true;
    F->w.stopping = true;
}

static void
on_start(struct worker *w, struct worker_msg *m)
{
    (void)w;
    (void)m;
    F->start(F);
}

/* a uses lend mode (with the worker's provided buffers when bufs), b
 * room mode with a room of room_cap octets (0: lend mode as well). */
static void
ends_init(struct fixture *f, bool bufs, size_t room_cap)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    f->a.name = "a";
    f->b.name = "b";
    stream_init(&f->a.st, &f->w, sv[0], &lend_ops, bufs ? &f->bufs : NULL);
    f->b.room_mode = room_cap != 0;
    f->b.room_cap = room_cap;
    stream_init(&f->b.st, &f->w, sv[1], room_cap != 0 ? &room_ops : &lend_ops,
                bufs ? &f->bufs : NULL);
}

/* Run the loop until every end is released or the deadline passed;
 * check_deadline: fail the test at once if it did. */
static void
run_until(struct fixture *f, bool check_deadline)
{
    f->start_msg.fn = on_start;
    worker_post(&f->w, &f->start_msg);
    timer_init(&f->deadline, on_deadline);
    worker_timer_arm(&f->w, &f->deadline, clock_mono_ns() + DEADLINE_S * 1000000000ULL);
    assert_int_equal(worker_run(&f->w), 0);
    worker_timer_cancel(&f->w, &f->deadline);
    if (check_deadline)
        assert_false(f->timed_out);
}

static void
run(struct fixture *f)
{
    run_until(f, true);
}

static int
setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -1;
    if (worker_init(&f->w, 0, 256, NULL) < 0) {
        free(f);
        return -1;
    }
    if (test_pki_init(&f->pki, "sluice test CA") != 0 ||
        test_pki_issue(&f->pki, "mx", "mx.example.test", false, &f->cert) != 0)
        return -1;
    test_config(&f->cfg);
    test_config_set(&f->cfg, "cert_file", f->cert.cert_file);
    test_config_set(&f->cfg, "key_file", f->cert.key_file);
    test_config_set(&f->cfg, "buffer_size", "4096"); /* records cut small: more rounds */
    char err[256];
    if (tls_ctx_new_server(&f->cfg, &f->srv_ctx, err, sizeof(err)) != 0 ||
        tls_ctx_new_client(&f->cfg, &f->cli_ctx, err, sizeof(err)) != 0)
        return -1;
    F = f;
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fixture *f = *state;
    stream_fini(&f->a.st);
    stream_fini(&f->b.st);
    stream_bufs_fini(&f->bufs);
    worker_fini(&f->w);
    free(f->a.got);
    free(f->b.got);
    tls_ctx_unref(f->srv_ctx);
    tls_ctx_unref(f->cli_ctx);
    conf_free(tls_conf_keys, &f->cfg);
    test_pki_fini(&f->pki);
    free(f);
    F = NULL;
    return 0;
}

static char *
pattern(size_t len, unsigned seed)
{
    char *p = malloc(len);
    assert_non_null(p);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (char)x;
    }
    return p;
}

/* ---- plaintext ---- */

static char *plain_data;

/* a sends, b receives; a closes when all has left, b on the EOF. */
static void
start_plain(struct fixture *f)
{
    stream_send(&f->a.st);
    assert_int_equal(stream_recv(&f->b.st), 0);
    end_progress(&f->a);
}

static void
plain_case(struct fixture *f, bool bufs, size_t room_cap, size_t len)
{
    if (bufs && stream_bufs_init(&f->bufs, &f->w, 16, 3) < 0)
        skip(); /* an old kernel: no provided buffers */
    plain_data = pattern(len, 7);
    ends_init(f, bufs, room_cap);
    f->a.out = plain_data;
    f->a.out_len = len;
    f->b.expect = SIZE_MAX; /* until the EOF */
    f->start = start_plain;
    run(f);
    assert_int_equal(f->a.out_off, len);
    assert_int_equal(f->b.got_len, len);
    assert_memory_equal(f->b.got, plain_data, len);
    assert_int_equal(f->b.eofs, 1);
    assert_int_equal(f->b.eof_err, 0); /* the peer closed */
    assert_int_equal(f->a.read_err, 0);
    free(plain_data);
}

static void
test_plain_room(void **state)
{
    plain_case(*state, false, 7, 64 * 1024);
}

static void
test_plain_provided_buffers(void **state)
{
    plain_case(*state, true, 0, 512 * 1024);
}

static void
test_plain_own_buffer(void **state)
{
    plain_case(*state, false, 0, 256 * 1024);
}

/* ---- TLS ---- */

static void
start_tls(struct fixture *f)
{
    struct tls_conn *cli = NULL, *srv = NULL;
    assert_int_equal(tls_conn_new_server(f->srv_ctx, &srv), 0);
    assert_int_equal(stream_start_tls(&f->b.st, srv), 0);
    assert_int_equal(stream_recv(&f->b.st), 0);
    assert_int_equal(tls_conn_new_client(f->cli_ctx, "mx.example.test", false, NULL, NULL, &cli),
                     0);
    assert_int_equal(stream_start_tls(&f->a.st, cli), 0); /* the ClientHello goes out */
    assert_int_equal(stream_recv(&f->a.st), 0);
}

static void
test_tls_both_ways(void **state)
{
    struct fixture *f = *state;
    if (stream_bufs_init(&f->bufs, &f->w, 16, 3) < 0)
        skip();
    size_t len = 300 * 1000;
    char *da = pattern(len, 1), *db = pattern(len, 2);
    ends_init(f, true, 100); /* the server reads through a room of 100 octets */
    f->a.out = da;
    f->a.out_len = len;
    f->a.expect = len;
    f->b.out = db;
    f->b.out_len = len;
    f->b.expect = len;
    f->b.wait_peer_eof = true; /* b closes on a's close_notify */
    f->start = start_tls;
    run(f);
    assert_int_equal(f->a.handshakes, 1);
    assert_int_equal(f->b.handshakes, 1);
    assert_true(stream_tls_ready(&f->a.st));
    assert_int_equal(f->a.read_err, 0);
    assert_int_equal(f->b.read_err, 0);
    assert_int_equal(f->a.got_len, len);
    assert_int_equal(f->b.got_len, len);
    assert_memory_equal(f->a.got, db, len);
    assert_memory_equal(f->b.got, da, len);
    assert_true(f->b.peer_eof); /* close_notify arrived after the data */
    free(da);
    free(db);
}

/* A TLS client with the worker's provided buffers waiting for the
 * server holds no ciphertext buffer of its own (17 KB per idle outbound
 * connection otherwise); what it reads still arrives whole. */
static void
test_tls_idle_holds_no_buffer(void **state)
{
    struct fixture *f = *state;
    if (stream_bufs_init(&f->bufs, &f->w, 16, 3) < 0)
        skip();
    size_t len = 40 * 1000; /* records over several provided buffers */
    char *da = pattern(len, 3), *db = pattern(len, 4);
    ends_init(f, true, 0);
    f->a.out = da;
    f->a.out_len = len;
    f->a.expect = len;
    f->a.check_idle_buf = true;
    f->b.out = db;
    f->b.out_len = len;
    f->b.expect = len;
    f->b.wait_peer_eof = true;
    f->start = start_tls;
    run(f);
    assert_int_equal(f->a.read_err, 0);
    assert_int_equal(f->a.got_len, len);
    assert_memory_equal(f->a.got, db, len);
    assert_memory_equal(f->b.got, da, len);
    assert_true(f->a.idle_checks > 0);
    free(da);
    free(db);
}

/* A client that talks plaintext to a TLS server: the server's read fails
 * before any handshake, and nothing reaches it as data. */
static void
start_garbage(struct fixture *f)
{
    struct tls_conn *srv = NULL;
    assert_int_equal(tls_conn_new_server(f->srv_ctx, &srv), 0);
    assert_int_equal(stream_start_tls(&f->b.st, srv), 0);
    assert_int_equal(stream_recv(&f->b.st), 0);
    stream_send(&f->a.st);
    assert_int_equal(stream_recv(&f->a.st), 0);
}

static void
test_tls_plaintext_refused(void **state)
{
    struct fixture *f = *state;
    static const char ehlo[] = "EHLO client.example\r\nMAIL FROM:<a@b>\r\n";
    ends_init(f, false, 64);
    f->a.out = ehlo;
    f->a.out_len = sizeof(ehlo) - 1;
    f->a.expect = SIZE_MAX; /* until the server hangs up */
    f->b.expect = SIZE_MAX;
    f->start = start_garbage;
    run(f);
    assert_true(f->b.read_err < 0);
    assert_false(stream_tls_ready(&f->b.st));
    assert_int_equal(f->b.handshakes, 0);
    assert_int_equal(f->b.got_len, 0);
    assert_int_equal(f->a.eofs, 1); /* a sees the end (after the alert, if any) */
}

/* A hostile TLS 1.3 peer on a thread of its own, with OpenSSL over the
 * other end of the socketpair: after the handshake it asks for a key
 * update n times, in one write, then sends msg and reads (answering
 * nothing) until our close_notify. Each request makes the stream's conn
 * queue an answer; many more than its output buffer holds arrive at
 * once, and the last of them wait in the input behind a full output
 * while the peer waits too. */
struct hostile {
    int fd;             /* owned by the test: shut down and closed after the join */
    bool server;        /* the peer is the TLS server */
    const char *cert_file, *key_file;
    unsigned updates;
    const char *msg;
    bool done;          /* the thread saw our close_notify */
    char err[160];
    pthread_t thread;
};

static void *
hostile_run(void *arg)
{
    struct hostile *h = arg;
    SSL_CTX *ctx = SSL_CTX_new(h->server ? TLS_server_method() : TLS_client_method());
    SSL *ssl = NULL;
    BIO *mem = NULL;
    if (ctx == NULL || SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 ||
        (h->server && (SSL_CTX_use_certificate_chain_file(ctx, h->cert_file) != 1 ||
                       SSL_CTX_use_PrivateKey_file(ctx, h->key_file, SSL_FILETYPE_PEM) != 1))) {
        snprintf(h->err, sizeof(h->err), "ctx");
        goto out;
    }
    ssl = SSL_new(ctx);
    if (ssl == NULL || SSL_set_fd(ssl, h->fd) != 1 ||
        (h->server ? SSL_accept(ssl) : SSL_connect(ssl)) != 1) {
        snprintf(h->err, sizeof(h->err), "handshake");
        goto out;
    }
    /* Gather the flood in memory and write it at once. */
    mem = BIO_new(BIO_s_mem());
    if (mem == NULL) {
        snprintf(h->err, sizeof(h->err), "bio");
        goto out;
    }
    BIO *sock = SSL_get_wbio(ssl);
    BIO_up_ref(sock);
    BIO_up_ref(mem);
    SSL_set0_wbio(ssl, mem);
    for (unsigned i = 0; i < h->updates; i++) {
        if (SSL_key_update(ssl, SSL_KEY_UPDATE_REQUESTED) != 1 || SSL_do_handshake(ssl) != 1) {
            snprintf(h->err, sizeof(h->err), "key update %u", i);
            BIO_free(sock);
            goto out;
        }
    }
    size_t n = 0;
    if (SSL_write_ex(ssl, h->msg, strlen(h->msg), &n) != 1) {
        snprintf(h->err, sizeof(h->err), "write");
        BIO_free(sock);
        goto out;
    }
    char *p;
    long len = BIO_get_mem_data(mem, &p);
    for (long off = 0; off < len;) {
        ssize_t w = write(h->fd, p + off, (size_t)(len - off));
        if (w <= 0) {
            snprintf(h->err, sizeof(h->err), "send: %s", strerror(errno));
            BIO_free(sock);
            goto out;
        }
        off += w;
    }
    SSL_set0_wbio(ssl, sock); /* the socket again, for whatever a read writes */
    char buf[256];
    int r;
    while ((r = SSL_read(ssl, buf, sizeof(buf))) > 0) {
    }
    h->done = SSL_get_error(ssl, r) == SSL_ERROR_ZERO_RETURN;
    if (!h->done)
        snprintf(h->err, sizeof(h->err), "read ended with %d", SSL_get_error(ssl, r));
out:
    SSL_free(ssl);
    BIO_free(mem);
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
}

static struct hostile *flood_peer;

/* Our side: e, a TLS client or server, reads until it has the peer's
 * message, then ends TLS and closes. */
static void
start_flood(struct fixture *f)
{
    struct end *e = flood_peer->server ? &f->a : &f->b;
    struct tls_conn *tls = NULL;
    if (flood_peer->server)
        assert_int_equal(tls_conn_new_client(f->cli_ctx, "mx.example.test", false, NULL, NULL,
                                             &tls),
                         0);
    else
        assert_int_equal(tls_conn_new_server(f->srv_ctx, &tls), 0);
    assert_int_equal(stream_start_tls(&e->st, tls), 0);
    assert_int_equal(stream_recv(&e->st), 0);
}

/* The peer sends updates key update requests, then msg, in one write.
 * Within the budget (tls/conn.c: KEY_UPDATE_FREE) msg arrives; past it
 * the connection fails at once with TLS_EPROTO: neither waits for a
 * deadline. */
static void
flood_case(struct fixture *f, bool peer_is_server, unsigned updates)
{
    bool within = updates <= 32;
    if (stream_bufs_init(&f->bufs, &f->w, 16, 3) < 0)
        skip();
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    static const char msg[] = "250 still here after the flood\r\n";
    struct hostile h = {.fd = sv[1],
                        .server = peer_is_server,
                        .cert_file = f->cert.cert_file,
                        .key_file = f->cert.key_file,
                        .updates = updates, /* 400: answers of 11 KB, the output holds 4 KB */
                        .msg = msg};
    /* Ours: an outbound connection's client (lend mode, provided buffers)
     * or the submission server's (room mode, a small room, ciphertext read
     * into a buffer of its own: the flood arrives in one read). */
    struct end *e = peer_is_server ? &f->a : &f->b, *unused = peer_is_server ? &f->b : &f->a;
    e->name = peer_is_server ? "client" : "server";
    e->room_mode = !peer_is_server;
    e->room_cap = peer_is_server ? 0 : 100;
    stream_init(&e->st, &f->w, sv[0], peer_is_server ? &lend_ops : &room_ops,
                peer_is_server ? &f->bufs : NULL);
    e->expect = sizeof(msg) - 1;
    stream_init(&unused->st, &f->w, -1, &lend_ops, NULL);
    unused->closed = unused->released = true;
    flood_peer = &h;
    assert_int_equal(pthread_create(&h.thread, NULL, hostile_run, &h), 0);
    f->start = start_flood;
    run_until(f, false);
    shutdown(sv[1], SHUT_RDWR); /* a peer still waiting gives up */
    pthread_join(h.thread, NULL);
    close(sv[1]);
    flood_peer = NULL;
    assert_false(f->timed_out); /* it did not stall */
    assert_int_equal(e->handshakes, 1);
    if (!within) {
        assert_int_equal(e->read_err, TLS_EPROTO); /* a flood: failed at once */
        assert_true(e->got_len < sizeof(msg) - 1);
        return;
    }
    assert_string_equal(h.err, "");
    assert_int_equal(e->read_err, 0);
    assert_int_equal(e->got_len, sizeof(msg) - 1);
    assert_memory_equal(e->got, msg, sizeof(msg) - 1);
    assert_true(h.done); /* it got our close_notify after every answer */
}

/* Outbound: the receiver is the hostile server. */
static void
test_tls_key_update_flood_from_server(void **state)
{
    flood_case(*state, true, 400);
}

/* Inbound: the submission client is the hostile one. */
static void
test_tls_key_update_flood_from_client(void **state)
{
    flood_case(*state, false, 400);
}

/* A burst within the budget, either way: taken on, msg arrives. */
static void
test_tls_key_update_burst_from_server(void **state)
{
    flood_case(*state, true, 30);
}

static void
test_tls_key_update_burst_from_client(void **state)
{
    flood_case(*state, false, 30);
}

/* OpenSSL's allocations, failed on demand (set in main(), before
 * OpenSSL allocates anything). */

static void *
crypto_malloc(size_t n, const char *file, int line)
{
    (void)file;
    (void)line;
    return crypto_fail ? NULL : malloc(n);
}

static void *
crypto_realloc(void *p, size_t n, const char *file, int line)
{
    (void)file;
    (void)line;
    return crypto_fail ? NULL : realloc(p, n);
}

static void
crypto_free(void *p, const char *file, int line)
{
    (void)file;
    (void)line;
    free(p);
}

/* A client whose ClientHello OpenSSL cannot make (no memory): TLS fails
 * at once, where it would otherwise wait for a server that never heard
 * from it; the stream stays plaintext, holding nothing of TLS. */
static void
test_tls_start_fails_at_once(void **state)
{
    struct fixture *f = *state;
    ends_init(f, false, 0);
    struct tls_conn *cli = NULL;
    assert_int_equal(tls_conn_new_client(f->cli_ctx, "mx.example.test", false, NULL, NULL, &cli),
                     0);
    crypto_fail = true;
    int rc = stream_start_tls(&f->a.st, cli);
    crypto_fail = false;
    assert_true(rc < 0);
    assert_false(stream_tls(&f->a.st));
    assert_null(f->a.st.buf);
    assert_false(stream_busy(&f->a.st)); /* nothing was sent */
}

/* A TLS write that fails (OpenSSL cannot encrypt: no memory) while the
 * peer waits for what it would have said: the writer hears of it at once,
 * as on_eof of a send with the tls error, and closes; the peer sees the
 * socket end. Before, the failure was left for the writer's next read,
 * which saw it as a read error (eofs 0, read_err set) and only because
 * the server's TLS 1.3 session ticket happened to arrive; a peer that
 * says nothing more leaves both waiting for a deadline. */
static void
test_tls_write_error_ends_at_once(void **state)
{
    struct fixture *f = *state;
    size_t len = 100 * 1000;
    char *da = pattern(len, 5);
    ends_init(f, false, 0);
    f->a.out = da;
    f->a.fail_write_len = len; /* nothing to say before the handshake is done */
    f->a.expect = SIZE_MAX;
    f->b.expect = SIZE_MAX; /* until the client hangs up */
    f->start = start_tls;
    run(f);
    assert_int_equal(f->a.handshakes, 1);
    assert_int_equal(f->a.eofs, 1);
    assert_true(f->a.eof_send);
    assert_true(f->a.eof_err < 0);
    assert_int_equal(f->a.read_err, 0);
    assert_int_equal(f->a.out_off, 0); /* nothing was taken */
    /* The socket ended: b's read saw it, or its session tickets' send */
    assert_int_equal(f->b.eofs, 1);
    assert_true(f->b.eof_err == 0 || f->b.eof_err == -EPIPE || f->b.eof_err == -ECONNRESET);
    assert_int_equal(f->b.got_len, 0);
    free(da);
}

/* Closed with a read in flight: the read comes back, then release. */
static void
start_close_inflight(struct fixture *f)
{
    assert_int_equal(stream_recv(&f->a.st), 0);
    assert_int_equal(stream_recv(&f->b.st), 0);
    assert_true(stream_busy(&f->a.st));
    end_close(&f->a);
    assert_false(f->a.released); /* not before the read came back */
    end_close(&f->b);
}

static void
test_close_with_read_in_flight(void **state)
{
    struct fixture *f = *state;
    ends_init(f, false, 0);
    f->start = start_close_inflight;
    run(f);
    assert_true(f->a.released);
    assert_true(f->b.released);
    assert_int_equal(f->a.eofs, 0); /* closed by its owner: no EOF reported */
}

/* ---- what left before the close (stream_close_tail) ---- */

/* The stop cuts an outbound transaction at the dot (delivery's
 * transaction_cut): the message may have arrived only if the dot left.
 * a sends to b, which never reads; 300 ms later (step) a is closed. */
static struct timer step_timer;
static char *tail_data;
static size_t tail_more; /* octets the owner adds to its output just before the close */
static enum stream_tail tail_at_close;

static void
on_step(struct timer *t, void *ctx)
{
    (void)t;
    (void)ctx;
    struct fixture *f = F;
    if (f->a.st.tls != NULL && !stream_tls_ready(&f->a.st)) { /* a slow handshake: later */
        worker_timer_arm(&f->w, &step_timer, clock_mono_ns() + 50 * 1000000ULL);
        return;
    }
    f->a.out_len += tail_more; /* given after the send in flight was posted */
    end_close(&f->a);
    tail_at_close = stream_close_tail(&f->a.st);
    end_close(&f->b);
}

static void
start_tail(struct fixture *f)
{
    stream_send(&f->a.st);
    timer_init(&step_timer, on_step);
    worker_timer_arm(&f->w, &step_timer, clock_mono_ns() + 300 * 1000000ULL);
}

static void
tail_case(struct fixture *f, size_t len, size_t more, enum stream_tail at_close,
          enum stream_tail at_end)
{
    tail_data = pattern(len + more, 3);
    tail_more = more;
    ends_init(f, false, 0);
    f->a.out = tail_data;
    f->a.out_len = len;
    f->a.expect = SIZE_MAX; /* closed by the step, not when done */
    f->b.expect = SIZE_MAX;
    f->start = start_tail;
    run(f);
    assert_true(f->a.released);
    assert_int_equal(tail_at_close, at_close);
    assert_int_equal(stream_close_tail(&f->a.st), at_end);
    free(tail_data);
}

/* All of it fitted in the socket: sent, it may reach the peer. */
static void
test_close_tail_sent(void **state)
{
    tail_case(*state, 100, 0, STREAM_TAIL_LEFT, STREAM_TAIL_LEFT);
}

/* More than the socket holds: the send in flight holds the last octets
 * at the close, and the close makes it fail: they never left. */
static void
test_close_tail_in_flight_never_left(void **state)
{
    tail_case(*state, 8 << 20, 0, STREAM_TAIL_IN_FLIGHT, STREAM_TAIL_HELD);
}

/* The last octets given after the send in flight was posted (the dot
 * behind a body's last chunk): not in any send, they never leave. */
static void
test_close_tail_behind_the_send(void **state)
{
    tail_case(*state, 8 << 20, 5, STREAM_TAIL_HELD, STREAM_TAIL_HELD);
}

/* Over TLS what is left counts the ciphertext too: the plaintext all
 * taken by TLS (a small message), it left only once its records did. b
 * reads nothing after its handshake. */
static void
start_tail_tls(struct fixture *f)
{
    start_tls(f);
    timer_init(&step_timer, on_step);
    worker_timer_arm(&f->w, &step_timer, clock_mono_ns() + 300 * 1000000ULL);
}

static void
tail_case_tls(struct fixture *f, size_t len, enum stream_tail *at_close, enum stream_tail *at_end)
{
    if (stream_bufs_init(&f->bufs, &f->w, 16, 3) < 0)
        skip();
    tail_data = pattern(len, 4);
    tail_more = 0;
    ends_init(f, true, 0);
    f->a.out = tail_data;
    f->a.out_len = len;
    f->a.expect = SIZE_MAX;
    f->b.expect = SIZE_MAX;
    f->b.deaf = true;
    f->start = start_tail_tls;
    run(f);
    assert_true(f->a.released);
    assert_int_equal(f->a.handshakes, 1);
    *at_close = tail_at_close;
    *at_end = stream_close_tail(&f->a.st);
    free(tail_data);
}

static void
test_close_tail_tls_sent(void **state)
{
    enum stream_tail at_close, at_end;
    tail_case_tls(*state, 100, &at_close, &at_end);
    assert_int_equal(at_close, STREAM_TAIL_LEFT);
    assert_int_equal(at_end, STREAM_TAIL_LEFT);
}

/* More than the socket holds: records still to send at the close, in
 * flight or not, never leave. */
static void
test_close_tail_tls_records_held(void **state)
{
    enum stream_tail at_close, at_end;
    tail_case_tls(*state, 8 << 20, &at_close, &at_end);
    assert_int_not_equal(at_close, STREAM_TAIL_LEFT);
    assert_int_equal(at_end, STREAM_TAIL_HELD);
}

int
main(void)
{
    if (CRYPTO_set_mem_functions(crypto_malloc, crypto_realloc, crypto_free) != 1) {
        fprintf(stderr, "OpenSSL allocated before main\n");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN); /* the hostile peer writes with write(2) */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_plain_room, setup, teardown),
        cmocka_unit_test_setup_teardown(test_plain_provided_buffers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_plain_own_buffer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_both_ways, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_idle_holds_no_buffer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_plaintext_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_start_fails_at_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_write_error_ends_at_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_key_update_flood_from_server, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_key_update_flood_from_client, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_key_update_burst_from_server, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_key_update_burst_from_client, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_with_read_in_flight, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_tail_sent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_tail_in_flight_never_left, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_tail_behind_the_send, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_tail_tls_sent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_tail_tls_records_held, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
