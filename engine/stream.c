/*
 * stream: a socket on the worker's ring, plaintext or TLS over memory
 * (see stream.h). The reads and sends posted on the ring, the provided
 * receive buffers, the ciphertext buffer and the TLS pumping (feed,
 * handshake, read, write, peek, consume, close_notify) live here, once,
 * for the submission server and outbound connections alike.
 *
 * The rule of the TLS loop (tls/tls.h): after every call, send what
 * tls_conn_peek shows; after feeding, retry what wanted input. A handshake
 * step or a read may take ciphertext out of the conn's full input buffer
 * while yielding nothing (a record larger than it, such as a long
 * certificate chain), so stream_read() offers what its buffer still holds
 * again after each of them, and only then waits for the socket: the peer
 * may have sent all it will send until it hears back. And a handshake
 * step or a read that stopped at a full output (key update answers) is
 * retried once a send made room: stream_on_send posts a no-op whose
 * completion is announced as readable (stream.h). A TLS write that fails
 * posts the same no-op, whose completion then ends the stream with that
 * error (on_eof, as a failed send), rather than leave it to a read that
 * may never complete.
 *
 * Threading: the worker's thread.
 */
#include "engine/stream.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/log.h"
#include "tls/tls.h"

#define STREAM_OF(ptr, field) ((struct stream *)((char *)(ptr) - offsetof(struct stream, field)))

static void stream_on_recv(struct worker *w, struct op *op, int res, uint32_t flags);
static void stream_on_send(struct worker *w, struct op *op, int res, uint32_t flags);
static void stream_on_connect(struct worker *w, struct op *op, int res, uint32_t flags);
static void stream_on_kick(struct worker *w, struct op *op, int res, uint32_t flags);

/* ---- provided buffers ---- */

int
stream_bufs_init(struct stream_bufs *b, struct worker *w, unsigned count, uint16_t bgid)
{
    memset(b, 0, sizeof(*b));
    size_t ring_len = count * sizeof(struct io_uring_buf);
    void *ring = mmap(NULL, ring_len, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (ring == MAP_FAILED)
        return -errno;
    b->mem = malloc((size_t)count * STREAM_BUF_SIZE);
    struct io_uring_buf_reg reg = {
        .ring_addr = (uint64_t)(uintptr_t)ring, .ring_entries = count, .bgid = bgid};
    int rc = b->mem != NULL ? io_uring_register_buf_ring(&w->ring, &reg, 0) : -ENOMEM;
    if (rc < 0) {
        log_msg(LOG_NOTICE, "event=provided_buffers_unavailable err=\"%s\" note=per_connection_buffers",
                strerror(-rc));
        munmap(ring, ring_len);
        free(b->mem);
        b->mem = NULL;
        return rc;
    }
    b->br = ring;
    b->count = count;
    b->bgid = bgid;
    io_uring_buf_ring_init(b->br);
    for (unsigned i = 0; i < count; i++)
        io_uring_buf_ring_add(b->br, b->mem + (size_t)i * STREAM_BUF_SIZE, STREAM_BUF_SIZE,
                              (unsigned short)i, io_uring_buf_ring_mask(count), (int)i);
    io_uring_buf_ring_advance(b->br, (int)count);
    return 0;
}

/* The ring (a single-issuer ring refuses registrations from other
 * threads) drops its reference when it closes. */
void
stream_bufs_fini(struct stream_bufs *b)
{
    if (b->br == NULL)
        return;
    munmap(b->br, b->count * sizeof(struct io_uring_buf));
    free(b->mem);
    b->br = NULL;
    b->mem = NULL;
}

static char *
bufs_at(const struct stream_bufs *b, unsigned bid)
{
    return b->mem + (size_t)bid * STREAM_BUF_SIZE;
}

static void
bufs_put(struct stream_bufs *b, unsigned bid)
{
    io_uring_buf_ring_add(b->br, bufs_at(b, bid), STREAM_BUF_SIZE, (unsigned short)bid,
                          io_uring_buf_ring_mask(b->count), 0);
    io_uring_buf_ring_advance(b->br, 1);
}

/* ---- the stream ---- */

void
stream_init(struct stream *st, struct worker *w, int fd, const struct stream_ops *ops,
            struct stream_bufs *bufs)
{
    memset(st, 0, sizeof(*st));
    st->recv_op = (struct op){OP_CALLBACK, stream_on_recv};
    st->send_op = (struct op){OP_CALLBACK, stream_on_send};
    st->kick_op = (struct op){OP_CALLBACK, stream_on_kick};
    st->w = w;
    st->ops = ops;
    st->bufs = bufs != NULL && bufs->br != NULL ? bufs : NULL;
    st->fd = fd;
}

/* Give back a completed plain read that was never handed over. */
static void
held_drop(struct stream *st)
{
    if (st->held_buf)
        bufs_put(st->bufs, st->held_bid);
    st->held = 0;
    st->held_buf = false;
}

void
stream_fini(struct stream *st)
{
    if (st->held_buf && st->bufs != NULL && st->bufs->br != NULL)
        held_drop(st);
    st->held = 0;
    if (st->fd >= 0)
        close(st->fd);
    st->fd = -1;
    st->tls = tls_conn_free(st->tls);
    free(st->buf);
    st->buf = NULL;
}

void
stream_connect(struct stream *st, const struct sockaddr *addr, socklen_t len)
{
    st->send_op.done = stream_on_connect;
    struct io_uring_sqe *sqe = worker_sqe(st->w, &st->send_op);
    io_uring_prep_connect(sqe, st->fd, addr, len);
    st->connecting = true;
    st->send_busy = true;
}

void
stream_close(struct stream *st)
{
    if (st->closed)
        return;
    /* What is left to send: plain, the output (a send in flight holds
     * the front of it until its completion); TLS, the plaintext not yet
     * encrypted and the ciphertext (the in-flight send's included). */
    size_t left = 0;
    st->ops->output(st, &left);
    if (st->tls != NULL)
        left += tls_conn_pending(st->tls);
    st->tail = left == 0                                ? STREAM_TAIL_LEFT
               : st->send_busy && left == st->send_len ? STREAM_TAIL_IN_FLIGHT
                                                        : STREAM_TAIL_HELD;
    st->closed = true;
    if (st->connecting) {
        /* shutdown() does not end a connect in progress; a cancel does */
        struct io_uring_sqe *sqe = worker_sqe(st->w, NULL);
        io_uring_prep_cancel64(sqe, (uint64_t)(uintptr_t)&st->send_op, 0);
    }
    if (st->fd >= 0)
        shutdown(st->fd, SHUT_RDWR);
}

int
stream_recv(struct stream *st)
{
    if (st->closed || st->recv_busy || st->connecting || st->eof || st->held != 0 || st->fd < 0)
        return 0;
    struct io_uring_sqe *sqe;
    if (st->tls != NULL) {
        if (st->cin_len == STREAM_CIN_CAP)
            return 0;
        sqe = worker_sqe(st->w, &st->recv_op);
        if (st->bufs != NULL && st->cin_len == 0) {
            /* Nothing waits to be fed: the kernel picks a provided buffer
             * when octets arrive, so a connection that waits holds no
             * ciphertext buffer (stream_on_recv copies into buf). */
            free(st->buf);
            st->buf = NULL;
            io_uring_prep_recv(sqe, st->fd, NULL, STREAM_BUF_SIZE, 0);
            sqe->flags |= IOSQE_BUFFER_SELECT;
            sqe->buf_group = st->bufs->bgid;
        } else {
            io_uring_prep_recv(sqe, st->fd, st->buf + st->cin_len, STREAM_CIN_CAP - st->cin_len,
                               0);
        }
        st->recv_tls = true;
    } else if (st->ops->room != NULL) {
        size_t cap = 0;
        char *p = st->ops->room(st, &cap);
        if (p == NULL || cap == 0)
            return 0;
        sqe = worker_sqe(st->w, &st->recv_op);
        io_uring_prep_recv(sqe, st->fd, p, cap, 0);
        st->recv_tls = false;
    } else if (st->bufs != NULL) {
        /* The kernel picks a buffer when octets arrive, not now. */
        sqe = worker_sqe(st->w, &st->recv_op);
        io_uring_prep_recv(sqe, st->fd, NULL, STREAM_BUF_SIZE, 0);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = st->bufs->bgid;
        st->recv_tls = false;
    } else {
        if (st->buf == NULL && (st->buf = malloc(STREAM_BUF_SIZE)) == NULL)
            return -ENOMEM;
        sqe = worker_sqe(st->w, &st->recv_op);
        io_uring_prep_recv(sqe, st->fd, st->buf, STREAM_BUF_SIZE, 0);
        st->recv_tls = false;
    }
    st->recv_busy = true;
    return 0;
}

static void
stream_on_recv(struct worker *w, struct op *op, int res, uint32_t flags)
{
    (void)w;
    struct stream *st = STREAM_OF(op, recv_op);
    st->recv_busy = false;
    bool provided = st->bufs != NULL && (flags & IORING_CQE_F_BUFFER);
    unsigned bid = provided ? flags >> IORING_CQE_BUFFER_SHIFT : 0;
    if (st->closed || res <= 0) {
        if (provided)
            bufs_put(st->bufs, bid);
        if (st->closed) {
            st->ops->on_release(st);
        } else if (res == -EINTR || res == -EAGAIN || res == -ENOBUFS) {
            /* ENOBUFS: every provided buffer was taken in this batch of
             * completions; they are back by the time this is submitted. */
            if (res == -ENOBUFS)
                st->bufs->nobufs++;
            stream_recv(st);
        } else {
            st->ops->on_eof(st, res, false);
        }
        return;
    }
    if (st->recv_tls && provided) {
        /* Posted only while buf was empty (stream_recv), so it fits. */
        if (st->buf == NULL && (st->buf = malloc(STREAM_CIN_CAP)) == NULL) {
            bufs_put(st->bufs, bid);
            st->ops->on_eof(st, -ENOMEM, false);
            return;
        }
        memcpy(st->buf, bufs_at(st->bufs, bid), (size_t)res);
        bufs_put(st->bufs, bid);
        st->cin_off = 0;
        st->cin_len = (uint32_t)res;
    } else if (st->recv_tls) {
        st->cin_len += (uint32_t)res;
    } else {
        st->held = (uint32_t)res;
        st->held_buf = provided;
        st->held_bid = (uint16_t)bid;
    }
    st->ops->on_readable(st);
}

/* ---- TLS in ---- */

/* Move what buf holds into the conn, as much as it takes. Returns the
 * count moved, or a tls error. */
static ssize_t
tls_feed(struct stream *st)
{
    size_t moved = 0;
    if (!st->tls_heard && st->cin_off < st->cin_len) {
        st->tls_heard = true;
        unsigned char c = (unsigned char)st->buf[st->cin_off];
        if (st->plain_watch && ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'))) {
            st->plain_peer = true;
            return TLS_EPROTO;
        }
    }
    if (st->plain_peer)
        return TLS_EPROTO;
    while (st->cin_off < st->cin_len) {
        ssize_t n = tls_conn_feed(st->tls, st->buf + st->cin_off, st->cin_len - st->cin_off);
        if (n < 0)
            return n;
        if (n == 0)
            break; /* the conn's buffer is full until OpenSSL reads from it */
        st->cin_off += (uint32_t)n;
        moved += (size_t)n;
    }
    if (st->cin_off != 0 && !st->recv_busy) {
        memmove(st->buf, st->buf + st->cin_off, st->cin_len - st->cin_off);
        st->cin_len -= st->cin_off;
        st->cin_off = 0;
    }
    if (st->cin_len == 0 && st->bufs != NULL && !st->recv_busy) {
        /* All fed: the next read goes to a provided buffer; buf comes
         * back when one completes. */
        free(st->buf);
        st->buf = NULL;
    }
    return (ssize_t)moved;
}

static int
tls_read(struct stream *st)
{
    int moved = 0;
    if (st->eof)
        return 0; /* close_notify came: whatever followed it is not read */
    for (;;) {
        ssize_t n = tls_feed(st);
        if (n < 0)
            return (int)n;
        bool progress = n > 0;
        if (!st->tls_ready) {
            int rc = tls_conn_handshake(st->tls);
            stream_send(st); /* the next flight, or the alert of a failure */
            if (rc < 0)
                return rc;
            if (rc == 0) {
                st->tls_ready = true;
                progress = true;
                if (st->ops->on_handshake != NULL)
                    st->ops->on_handshake(st);
                if (st->closed)
                    return 1;
                stream_send(st); /* what the owner said at once */
            }
        }
        while (st->tls_ready && !st->closed) {
            char lent[STREAM_BUF_SIZE];
            size_t cap = sizeof(lent);
            char *p = st->ops->room != NULL ? st->ops->room(st, &cap) : lent;
            if (p == NULL || cap == 0)
                break;
            n = tls_conn_read(st->tls, p, cap);
            if (n == 0)
                break;
            if (n == TLS_ECLOSED) {
                /* The peer ended TLS: what it said before still counts. */
                st->eof = true;
                return 1;
            }
            if (n < 0)
                return (int)n;
            progress = true;
            st->ops->on_data(st, p, (size_t)n);
        }
        if (st->closed)
            return 1;
        /* A read may have answered a key update; a handshake step or a
         * read that produced nothing may still have taken ciphertext out
         * of the conn's full buffer: feed again, or the rest of buf would
         * wait for a read that never completes. */
        stream_send(st);
        n = tls_feed(st);
        if (n < 0)
            return (int)n;
        if (n > 0)
            progress = true;
        if (!progress)
            return moved;
        moved = 1;
    }
}

int
stream_read(struct stream *st)
{
    if (st->closed)
        return 0;
    if (st->tls != NULL)
        return tls_read(st);
    if (st->held == 0)
        return 0;
    /* Taken off the stream before the owner sees it: it may post the
     * next read from inside on_data. */
    size_t n = st->held;
    bool provided = st->held_buf;
    unsigned bid = st->held_bid;
    st->held = 0;
    st->held_buf = false;
    const char *p;
    if (provided) {
        p = bufs_at(st->bufs, bid);
    } else if (st->ops->room != NULL) {
        size_t cap = 0;
        p = st->ops->room(st, &cap); /* where the read was posted */
    } else {
        p = st->buf;
    }
    st->ops->on_data(st, p, n);
    if (provided)
        bufs_put(st->bufs, bid);
    return 1;
}

/* ---- out ---- */

/* Post the no-op whose completion is stream_on_kick (unless one is in
 * flight: it will do), so that a completion callback says what happened
 * outside the call that found it. */
static void
stream_kick(struct stream *st)
{
    if (st->kick_busy)
        return;
    struct io_uring_sqe *sqe = worker_sqe(st->w, &st->kick_op);
    io_uring_prep_nop(sqe);
    st->kick_busy = true;
}

void
stream_send(struct stream *st)
{
    if (st->closed || st->connecting || st->fd < 0)
        return;
    size_t len;
    const char *p;
    if (st->tls != NULL) {
        if (st->tls_ready && !st->tls_shut && st->send_err == 0) {
            /* Plaintext into TLS; what TLS took counts as sent. */
            p = st->ops->output(st, &len);
            while (len > 0) {
                ssize_t n = tls_conn_write(st->tls, p, len);
                if (n < 0) {
                    /* The conn failed (OpenSSL could not encrypt): a
                     * read would say so only once the peer spoke, and a
                     * peer waiting for what we send never would. The
                     * kick's completion ends the stream as a failed send
                     * does; what the conn still holds (an alert) goes. */
                    st->send_err = (int)n;
                    stream_kick(st);
                    break;
                }
                if (n == 0)
                    break; /* no room: after the next send */
                st->ops->on_sent(st, (size_t)n);
                p = st->ops->output(st, &len);
            }
            if (len == 0 && st->ending)
                st->tls_shut = tls_conn_shutdown(st->tls) != TLS_WANT_IO;
        }
        if (st->send_busy)
            return;
        p = tls_conn_peek(st->tls, &len);
    } else {
        if (st->send_busy)
            return;
        p = st->ops->output(st, &len);
    }
    if (len == 0)
        return;
    struct io_uring_sqe *sqe = worker_sqe(st->w, &st->send_op);
    io_uring_prep_send(sqe, st->fd, p, len, MSG_NOSIGNAL);
    st->send_busy = true;
    st->send_len = len;
}

bool
stream_input_waiting(const struct stream *st)
{
    return st->held > 0 || st->cin_len > st->cin_off ||
           (st->tls != NULL && tls_conn_input_waiting(st->tls));
}

bool
stream_drained(const struct stream *st)
{
    if (st->send_busy)
        return false;
    size_t len = 0;
    st->ops->output((struct stream *)st, &len);
    if (len != 0)
        return false;
    return st->tls == NULL || tls_conn_pending(st->tls) == 0;
}

void
stream_end(struct stream *st)
{
    st->ending = true;
}

static void
stream_on_send(struct worker *w, struct op *op, int res, uint32_t flags)
{
    (void)w;
    (void)flags;
    struct stream *st = STREAM_OF(op, send_op);
    st->send_busy = false;
    if (st->closed) {
        if (st->tail == STREAM_TAIL_IN_FLIGHT) /* all of it went, or the end did not */
            st->tail = res > 0 && (size_t)res == st->send_len ? STREAM_TAIL_LEFT
                                                               : STREAM_TAIL_HELD;
        st->ops->on_release(st);
    } else if (res <= 0) {
        st->ops->on_eof(st, res == 0 ? -EPIPE : res, true);
    } else {
        if (st->tls != NULL) {
            tls_conn_consume(st->tls, (size_t)res);
            if (tls_conn_wants_room(st->tls))
                /* Input waits behind the output that just made room, and
                 * no read completion will come for it: a no-op's
                 * completion announces it (stream_on_kick), since this
                 * one ends in on_writable. */
                stream_kick(st);
        } else {
            st->ops->on_sent(st, (size_t)res);
        }
        st->ops->on_writable(st);
    }
}

static void
stream_on_kick(struct worker *w, struct op *op, int res, uint32_t flags)
{
    (void)w;
    (void)res;
    (void)flags;
    struct stream *st = STREAM_OF(op, kick_op);
    st->kick_busy = false;
    if (st->closed)
        st->ops->on_release(st);
    else if (st->send_err != 0)
        st->ops->on_eof(st, st->send_err, true);
    else
        st->ops->on_readable(st);
}

static void
stream_on_connect(struct worker *w, struct op *op, int res, uint32_t flags)
{
    (void)w;
    (void)flags;
    struct stream *st = STREAM_OF(op, send_op);
    st->send_op.done = stream_on_send;
    st->send_busy = false;
    st->connecting = false;
    if (st->closed)
        st->ops->on_release(st);
    else
        st->ops->on_connect(st, res);
}

/* ---- TLS ---- */

int
stream_start_tls(struct stream *st, struct tls_conn *tls)
{
    if (st->recv_busy || st->tls != NULL) {
        /* the owner's mistake: a read in flight would land in what is
         * freed here, or there is TLS already */
        tls_conn_free(tls);
        return -EBUSY;
    }
    held_drop(st);
    free(st->buf);
    st->buf = NULL;
    /* With provided buffers, buf comes when ciphertext does (stream_on_recv). */
    if (st->bufs == NULL && (st->buf = malloc(STREAM_CIN_CAP)) == NULL) {
        tls_conn_free(tls);
        return -ENOMEM;
    }
    st->cin_off = st->cin_len = 0;
    st->tls = tls;
    st->tls_heard = st->plain_watch = st->plain_peer = false;
    /* A client's ClientHello goes out now (a server's conn waits for one);
     * the rest in stream_read(). */
    int rc = tls_conn_handshake(st->tls);
    if (rc < 0) {
        /* OpenSSL could not make it (out of memory, mostly): nothing was
         * sent and nothing will come, so say so now rather than wait for
         * a deadline. */
        st->tls = tls_conn_free(st->tls);
        free(st->buf);
        st->buf = NULL;
        return rc;
    }
    stream_send(st);
    return 0;
}

int
stream_tls_info(const struct stream *st, struct tls_info *out)
{
    return st->tls != NULL ? tls_conn_info(st->tls, out) : TLS_ESTATE;
}

const char *
stream_tls_error(const struct stream *st)
{
    if (st->plain_peer)
        return "plaintext where a TLS handshake belongs";
    return st->tls != NULL ? tls_conn_error_str(st->tls) : "";
}

void
stream_tls_watch_plaintext(struct stream *st)
{
    st->plain_watch = true;
}

int
stream_tls_drop(struct stream *st)
{
    if (st->tls == NULL)
        return 0;
    if (st->send_busy || tls_conn_pending(st->tls) != 0)
        return -EBUSY;
    st->tls = tls_conn_free(st->tls);
    st->tls_ready = st->ending = st->tls_shut = false;
    if (!st->recv_busy) {
        /* a read posted into buf keeps it until it completes (stream_fini frees it) */
        free(st->buf);
        st->buf = NULL;
        st->cin_off = st->cin_len = 0;
    }
    return 0;
}
