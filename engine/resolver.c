/*
 * resolver: the glue of resolver.h between a struct dns and a worker.
 *
 * A watch is one c-ares socket from the moment c-ares asks to watch it
 * until it says "no more" (just before it closes the fd). While attached
 * it is on r->watches and found by fd; once detached it only waits for
 * its poll to come back (cancelled) and then frees itself. A poll whose
 * event set no longer covers what c-ares wants (a TCP connect now also
 * wants POLLOUT) is cancelled and re-armed from its completion.
 *
 * A poll that fails (any error but -ECANCELED) keeps its watch: c-ares
 * 1.18 closes a UDP socket only when the whole channel has no query left
 * (or a read on it fails), so a socket nobody polls would, under steady
 * load, time out every query sent on it. The watch is re-armed from the
 * resolver's timer after a backoff (POLL_RETRY_MIN_NS, doubling to
 * POLL_RETRY_MAX_NS while polls keep failing, reset by a poll that
 * completes), so a poll that always fails costs a few wake-ups a second,
 * not a spinning loop. Data that arrived meanwhile waits in the socket:
 * the re-armed poll reports it at once.
 *
 * Re-entrancy: dns_process_fd() may call back into on_sock_state() for
 * the very watch being handled (busy: its handler re-arms or frees it
 * afterwards) and may run request callbacks that close the resolver
 * (depth > 0: the close waits for the dns call to return).
 *
 * Threading: the worker's thread only.
 */
#include "engine/resolver.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

struct watch {
    struct op op;       /* OP_CALLBACK: watch_on_poll */
    struct resolver *r; /* borrowed: r is freed only after every poll came back */
    struct watch *next; /* on r->watches while attached */
    int fd;
    bool attached; /* c-ares still has this socket */
    bool want_read, want_write;
    bool armed;          /* a poll op is in flight */
    bool cancelling;     /* and a cancel for it was submitted */
    bool busy;           /* inside its completion handler */
    unsigned armed_mask; /* events of the poll in flight */
    unsigned failures;   /* polls failed in a row */
    uint64_t retry_at;   /* after a failed poll: re-armed by the timer then; 0: not waiting */
};

/* The backoff of a watch whose poll failed: the first retry after 10 ms
 * (a transient -ENOMEM is over by then), doubling to at most 1 s, well
 * under c-ares's per-try timeout of 2 s by default. */
#define POLL_RETRY_MIN_NS (10ULL * 1000000ULL)
#define POLL_RETRY_MAX_NS (1000ULL * 1000000ULL)

struct resolver {
    struct worker *w;      /* borrowed: outlives r */
    struct dns *d;         /* owned; NULL once closing */
    struct timer timer;    /* c-ares timeouts and due callbacks */
    struct watch *watches; /* owned: attached watches */
    unsigned nwatches;
    unsigned polls;         /* poll ops in flight, attached or not */
    uint64_t poll_failures; /* polls that failed (not cancelled), ever */
#ifdef SLUICE_TEST_HOOKS
    unsigned fail_polls; /* resolver_test_fail_polls(): completions still to fail */
    int fail_err;
#endif
    bool edns_logged;   /* event=dns_edns_off was logged (once per resolver) */
    unsigned depth;     /* inside a dns call */
    bool close_pending; /* resolver_close() came from inside a dns call */
    bool closing;
    resolver_closed_fn *closed;
    void *closed_arg; /* borrowed: the closer's */
};

static void watch_on_poll(struct worker *w, struct op *op, int res, uint32_t flags);

static struct watch *
watch_of(struct op *op)
{
    return (struct watch *)((char *)op - offsetof(struct watch, op));
}

static unsigned
watch_mask(const struct watch *wa)
{
    return (wa->want_read ? POLLIN : 0u) | (wa->want_write ? POLLOUT : 0u);
}

static void
watch_cancel(struct watch *wa)
{
    if (!wa->armed || wa->cancelling)
        return;
    struct io_uring_sqe *sqe = worker_sqe(wa->r->w, NULL);
    io_uring_prep_poll_remove(sqe, (uint64_t)(uintptr_t)&wa->op);
    wa->cancelling = true;
}

/* Arm a poll for what c-ares wants, or cancel one that misses an event
 * (its completion re-arms). */
static void
watch_arm(struct watch *wa)
{
    unsigned mask = watch_mask(wa);
    if (mask == 0 || wa->retry_at != 0)
        return; /* a watch backing off is armed by the timer */
    if (wa->armed) {
        if ((mask & ~wa->armed_mask) != 0)
            watch_cancel(wa);
        return;
    }
    struct io_uring_sqe *sqe = worker_sqe(wa->r->w, &wa->op);
    io_uring_prep_poll_add(sqe, wa->fd, mask);
    wa->armed = true;
    wa->armed_mask = mask;
    wa->r->polls++;
}

static void
watch_detach(struct resolver *r, struct watch *wa)
{
    struct watch **p = &r->watches;
    while (*p != wa)
        p = &(*p)->next;
    *p = wa->next;
    wa->next = NULL;
    wa->attached = false;
    r->nwatches--;
    watch_cancel(wa);
}

static void
watch_maybe_free(struct watch *wa)
{
    if (!wa->attached && !wa->armed && !wa->busy)
        free(wa);
}

static void
on_sock_state(void *arg, int fd, bool readable, bool writable)
{
    struct resolver *r = arg;
    struct watch *wa = r->watches;
    while (wa != NULL && wa->fd != fd)
        wa = wa->next;
    if (!readable && !writable) {
        if (wa != NULL) {
            watch_detach(r, wa);
            watch_maybe_free(wa);
        }
        return;
    }
    if (wa == NULL) {
        wa = calloc(1, sizeof(*wa));
        if (wa == NULL) {
            /* c-ares will time the socket's queries out: a retry, not a hang */
            log_msg(LOG_ERR, "worker=%s event=dns_watch_failed fd=%d err=%s", r->w->name, fd,
                    strerror(ENOMEM));
            return;
        }
        wa->op.kind = OP_CALLBACK;
        wa->op.done = watch_on_poll;
        wa->r = r;
        wa->fd = fd;
        wa->attached = true;
        wa->next = r->watches;
        r->watches = wa;
        r->nwatches++;
    }
    wa->want_read = readable;
    wa->want_write = writable;
    if (!wa->busy)
        watch_arm(wa);
}

static void resolver_settle(struct resolver *r);

static void
resolver_shut(struct resolver *r)
{
    r->closing = true;
    worker_timer_cancel(r->w, &r->timer);
    r->depth++;
    r->d = dns_free(r->d); /* tells on_sock_state to drop every socket */
    r->depth--;
    while (r->watches != NULL) {
        struct watch *wa = r->watches; /* c-ares forgot one: drop it anyway */
        watch_detach(r, wa);
        watch_maybe_free(wa);
    }
}

/* After every call into the dns: run a close that had to wait, free a
 * closed resolver whose last op came back, or re-arm the timer. */
static void
resolver_settle(struct resolver *r)
{
    if (r->depth > 0)
        return;
    if (r->close_pending) {
        r->close_pending = false;
        resolver_shut(r);
    }
    if (r->closing) {
        if (r->polls == 0 && r->nwatches == 0) {
            struct worker *w = r->w;
            resolver_closed_fn *closed = r->closed;
            void *arg = r->closed_arg;
            free(r);
            if (closed != NULL)
                closed(w, arg);
        }
        return;
    }
    uint64_t t = dns_timeout(r->d, r->w->now);
    for (struct watch *wa = r->watches; wa != NULL; wa = wa->next)
        if (wa->retry_at != 0 && wa->retry_at < t)
            t = wa->retry_at;
    if (t == UINT64_MAX)
        worker_timer_cancel(r->w, &r->timer);
    else if (!timer_armed(&r->timer) || r->timer.deadline != t)
        worker_timer_arm(r->w, &r->timer, t);
}

static void
watch_on_poll(struct worker *w, struct op *op, int res, uint32_t flags)
{
    (void)flags;
    struct watch *wa = watch_of(op);
    struct resolver *r = wa->r;
    wa->armed = false;
    wa->cancelling = false;
    r->polls--;
#ifdef SLUICE_TEST_HOOKS
    if (r->fail_polls > 0 && res > 0 && wa->attached) {
        r->fail_polls--;
        res = r->fail_err;
    }
#endif
    /* Busy until the end: a close run below (a deferred resolver_close)
     * detaches this watch, and only this handler may free it. */
    wa->busy = true;
    if (wa->attached && !r->closing && res > 0) {
        wa->failures = 0;
        bool broken = (res & (POLLERR | POLLHUP | POLLNVAL)) != 0;
        /* An error or hang-up goes to whichever side c-ares watches: its
         * read or write then sees the error and drops the socket. */
        bool rd = wa->want_read && ((res & POLLIN) || broken);
        bool wr = wa->want_write && ((res & POLLOUT) || broken);
        if (rd || wr) {
            r->depth++;
            dns_process_fd(r->d, wa->fd, rd, wr);
            r->depth--;
        }
    } else if (wa->attached && !r->closing && res < 0 && res != -ECANCELED) {
        /* Not re-armed now, or it could fail again at once: the timer
         * re-arms it after the backoff (see the header comment). */
        uint64_t delay = POLL_RETRY_MAX_NS;
        if (wa->failures < 7)
            delay = POLL_RETRY_MIN_NS << wa->failures;
        if (delay > POLL_RETRY_MAX_NS)
            delay = POLL_RETRY_MAX_NS;
        wa->failures++;
        wa->retry_at = w->now + delay;
        r->poll_failures++;
        log_msg(LOG_WARN, "worker=%s event=dns_poll_failed fd=%d err=%s failures=%u retry_ms=%llu",
                w->name, wa->fd, strerror(-res), wa->failures,
                (unsigned long long)(delay / 1000000ULL));
    }
    if (r->close_pending && r->depth == 0) {
        r->close_pending = false;
        resolver_shut(r);
    }
    wa->busy = false;
    if (wa->attached && !r->closing)
        watch_arm(wa);
    watch_maybe_free(wa);
    resolver_settle(r);
}

static void
resolver_on_timer(struct timer *t, void *ctx)
{
    (void)ctx;
    struct resolver *r = (struct resolver *)((char *)t - offsetof(struct resolver, timer));
    for (struct watch *wa = r->watches; wa != NULL; wa = wa->next) {
        if (wa->retry_at != 0 && wa->retry_at <= r->w->now) {
            wa->retry_at = 0;
            watch_arm(wa);
        }
    }
    r->depth++;
    dns_process_timeouts(r->d);
    if (!r->edns_logged && r->d != NULL) {
        /* Found at a sweep turn (dns.c's edns_check): said once, counted
         * in the stats (dns.edns_off) every time. */
        struct dns_stats st;
        dns_stats(r->d, &st);
        if (st.edns_off > 0) {
            r->edns_logged = true;
            log_msg(LOG_WARN,
                    "worker=%s event=dns_edns_off reason=\"FORMERR without OPT from a DNS "
                    "server: c-ares turned EDNS off, answers over 512 octets go over TCP until "
                    "the channel is idle and made again\"",
                    r->w->name);
        }
    }
    r->depth--;
    resolver_settle(r);
}

int
resolver_new(struct worker *w, const struct dns_config *cfg, struct resolver **out, char *err,
             size_t errlen)
{
    *out = NULL;
    struct resolver *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    r->w = w;
    timer_init(&r->timer, resolver_on_timer);
    int rc = dns_new(cfg, on_sock_state, r, &r->d, err, errlen);
    if (rc < 0) {
        free(r);
        return rc;
    }
    *out = r;
    return 0;
}

int
resolver_mx_resolve(struct resolver *r, const char *domain, dns_mx_fn *cb, void *arg,
                    struct dns_mx_result **res, struct dns_req **req)
{
    if (r->closing || r->close_pending) {
        log_msg(LOG_CRIT, "worker=%s event=panic reason=resolve_on_closed_resolver", r->w->name);
        abort();
    }
    r->depth++;
    int rc = dns_mx_resolve(r->d, domain, cb, arg, res, req);
    r->depth--;
    resolver_settle(r);
    return rc;
}

int
resolver_txt_lookup(struct resolver *r, const char *name, dns_txt_fn *cb, void *arg)
{
    if (r->closing || r->close_pending)
        return -ENXIO;
    r->depth++;
    int rc = dns_txt_lookup(r->d, name, cb, arg);
    r->depth--;
    resolver_settle(r);
    return rc;
}

void
resolver_cancel(struct resolver *r, struct dns_req *req)
{
    if (r->d != NULL)
        dns_cancel(r->d, req);
}

void
resolver_stats(const struct resolver *r, struct resolver_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (r->d != NULL)
        dns_stats(r->d, &out->dns);
    out->watches = r->nwatches;
    out->polls = r->polls;
    out->poll_failures = r->poll_failures;
}

#ifdef SLUICE_TEST_HOOKS
void
resolver_test_fail_polls(struct resolver *r, unsigned n, int err)
{
    r->fail_polls = n;
    r->fail_err = err;
}
#endif

void
resolver_close(struct resolver *r, resolver_closed_fn *closed, void *arg)
{
    r->closed = closed;
    r->closed_arg = arg;
    if (r->depth > 0) {
        r->close_pending = true;
        return;
    }
    resolver_shut(r);
    resolver_settle(r);
}
