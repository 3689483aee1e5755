/*
 * events_pump: the pump (see events_int.h for the other files of the
 * event push). The spool keeps each event record in the commit of what
 * it tells (queue.h: durable with it); the pump's thread copies them, a
 * few commits gathered at a time (PUMP_GATHER_MS, up to PUMP_BYTES), to
 * the journal, then trims them from the spool, so the spool holds events
 * only for milliseconds and the journal is what the sinks read.
 *
 * Threading: the pump's thread. Idle, it waits in poll(2) on two
 * eventfds (pump_poll): its own (ev->wake_fd: the spool's hook says a
 * commit, the stop says stop) and its port's (a completion: a trim's, or
 * a line put alone's, drained at once), a second at most.
 */
#include <errno.h>
#include <inttypes.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/events_int.h"

/* ---- the pump: spool records to the journal ---- */

/* The spool's hook, on its committer thread: more lines are durable.
 * The idle pump is woken through its eventfd; ev->cond is not broadcast
 * (a gather under way waits its whole time, and the sinks wait for
 * appends, not commits: each of them woke at every commit). */
void
events_pump_wake(void *arg)
{
    struct events *ev = arg;
    pthread_mutex_lock(&ev->mu);
    ev->committed++;
    pthread_mutex_unlock(&ev->mu);
    events_pump_kick(ev);
}

void
events_pump_kick(struct events *ev)
{
    uint64_t one = 1;
    ssize_t wr = write(ev->wake_fd, &one, sizeof(one));
    (void)wr; /* EAGAIN: the count is full, the pump is woken all the same */
}

/* Wait up to ms for a kick (events_pump_kick) or a completion in the
 * pump's port, which is drained (its callbacks run). Whatever woke it,
 * the caller looks at ev->committed and ev->stop again: a kick that
 * comes after that look stays in the eventfd for the next wait. Pump
 * thread, mu not held. */
static void
pump_poll(struct events *ev, uint64_t ms)
{
    struct pollfd p[2] = {{.fd = ev->wake_fd, .events = POLLIN},
                          {.fd = queue_port_fd(ev->port), .events = POLLIN}};
    int n = poll(p, 2, (int)ms);
    if (n < 0 && errno != EINTR) {
        /* not expected (the set is two eventfds): a millisecond's pause,
         * so that a poll failing at once does not spin the idle loop */
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    if (n <= 0)
        return;
    if (p[0].revents != 0) {
        uint64_t v;
        ssize_t rd = read(ev->wake_fd, &v, sizeof(v));
        (void)rd;
    }
    if (p[1].revents != 0)
        queue_port_drain(ev->port);
}

/* Copy one spool record (its lines from ev->pfrom on) to the buffer. A
 * record that starts past the copy's end means numbers the spool no
 * longer holds: the copy stops there (the caller skips them). */
static int
pump_record(void *arg, uint64_t seq, const char *text, size_t len)
{
    struct events *ev = arg;
    if (seq > ev->pseq) {
        /* numbers the spool does not hold: append what is before them,
         * then the journal skips them (pump_move) */
        if (ev->plen == 0)
            ev->pskip = seq;
        return 1;
    }
    const char *p = text, *end = text + len;
    for (uint64_t n = seq; n < ev->pseq && p < end; n++) { /* lines already in the journal */
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        p = nl != NULL ? nl + 1 : end;
    }
    size_t n = (size_t)(end - p);
    if (ev->plen + n > ev->pcap) {
        size_t cap = ev->plen + n;
        char *b = realloc(ev->pbuf, cap);
        if (b == NULL)
            return 1;
        ev->pbuf = b;
        ev->pcap = cap;
    }
    memcpy(ev->pbuf + ev->plen, p, n);
    ev->plen += n;
    for (const char *q = p; (q = memchr(q, '\n', (size_t)(end - q))) != NULL; q++)
        ev->pseq++;
    return 0;
}

static void pump_trim_done(void *cookie, int rc);
static void pump_trim_failed(struct events *ev, int rc);

/* Ask the spool to trim what the journal holds, unless a trim is in
 * flight (its completion asks again for what came meanwhile) or one
 * failed and its retry time has not come. Pump thread. */
static void
pump_trim(struct events *ev)
{
    struct journal_pos end;
    journal_end(ev->journal, &end);
    if (ev->trimming || end.seq <= ev->trim_to ||
        (ev->trim_retry_at != 0 && clock_mono_ms() < ev->trim_retry_at))
        return;
    ev->trimming = true;
    int rc = queue_events_trim(ev->queue, ev->port, end.seq, pump_trim_done, ev);
    if (rc < 0) {
        ev->trimming = false;
        pump_trim_failed(ev, rc);
    } else {
        ev->trim_to = end.seq;
    }
}

/* A trim refused, at once or by its completion: asked again after
 * PUMP_RETRY_MS, doubled on each failure in a row up to
 * PUMP_TRIM_RETRY_MAX_MS (a spool whose disk stays full or broken gets a
 * write transaction and a log line that often, not each second). A test
 * shortens both alike (ev->trim_retry_ms: events_new's test hook). */
static void
pump_trim_failed(struct events *ev, int rc)
{
    unsigned first = ev->trim_retry_ms;
    unsigned longest = first * (PUMP_TRIM_RETRY_MAX_MS / PUMP_RETRY_MS);
    ev->trim_to = 0;
    ev->trim_backoff_ms = ev->trim_backoff_ms == 0            ? first
                          : ev->trim_backoff_ms * 2 > longest ? longest
                                                              : ev->trim_backoff_ms * 2;
    ev->trim_retry_at = clock_mono_ms() + ev->trim_backoff_ms;
    log_msg(LOG_WARN, "event=events_spool_trim_failed err=\"%s\" retry_ms=%u note=retried",
            queue_strerror(rc), ev->trim_backoff_ms);
}

static void
pump_trim_done(void *cookie, int rc)
{
    struct events *ev = cookie;
    ev->trimming = false;
    if (rc < 0) {
        pump_trim_failed(ev, rc);
        return;
    }
    if (ev->trim_backoff_ms != 0)
        log_msg(LOG_NOTICE, "event=events_spool_trim_recovered");
    ev->trim_backoff_ms = 0;
    ev->trim_retry_at = 0;
    pump_trim(ev); /* what was appended while it ran */
}

static void
pump_put_done(void *cookie, int rc)
{
    struct events *ev = cookie;
    if (rc < 0) {
        atomic_fetch_add(&ev->put_failed, 1);
        log_msg(LOG_ERR, "event=events_lost err=\"%s\" note=spool_refused_the_lines",
                queue_strerror(rc));
    }
}

/* The journal's end moved (an append, or numbers skipped): the sinks
 * waiting for a change look again. A skip told to nobody left a sink
 * whose cursor lay before the skipped numbers waiting for the next
 * append, with them counted as pending (events_stats) until then. */
static void
pump_tell_sinks(struct events *ev, bool appended)
{
    pthread_mutex_lock(&ev->mu);
    if (appended)
        ev->pump_failing_ms = 0;
    ev->appends++;
    pthread_cond_broadcast(&ev->cond);
    pthread_mutex_unlock(&ev->mu);
}

/* Number the journal on from seq; the sinks are told, also when it
 * failed: a skip of an empty last segment whose directory sync failed
 * (journal_skip_to's rename) moved the end all the same, and the retry
 * finds nothing to skip, or to append (elsewhere a failure leaves the
 * end where it was: the tell is spurious, and harmless). */
static int
pump_skip(struct events *ev, uint64_t seq)
{
    int rc = journal_skip_to(ev->journal, seq);
    pump_tell_sinks(ev, false);
    if (rc < 0)
        log_msg(LOG_ERR,
                "event=events_journal_skip_failed to_seq=%" PRIu64 " err=\"%s\" note=retried", seq,
                strerror(-rc));
    return rc < 0 ? rc : 1;
}

/*
 * Move every durable spool record past the journal's end to the journal
 * (fsynced), under the spool's numbers, then ask the spool to trim what
 * the journal holds. Returns 0 when it caught up, 1 when there is more,
 * -errno when the journal refused (nothing trimmed: tried again).
 */
static int
pump_move(struct events *ev)
{
    struct journal_pos end;
    journal_end(ev->journal, &end);
    ev->plen = 0;
    ev->pskip = 0;
    ev->pfrom = ev->pseq = end.seq;
    /* Loaded before the read: every number below it was committed before
     * the read's transaction began. */
    uint64_t durable = queue_events_durable(ev->queue);
    int n = queue_events_read(ev->queue, end.seq, atomic_load(&ev->pump_bytes), pump_record, ev);
    if (n < 0) {
        log_msg(LOG_ERR, "event=events_spool_read_failed err=\"%s\"", queue_strerror(n));
        return n;
    }
    if (n == 0 && durable > ev->pfrom) {
        /* No record holds the numbers from pfrom to durable, and none
         * will: a journal made anew beside a spool whose records were
         * trimmed, or the last lines of commits removed as unconfirmed.
         * Numbered on from there, else a sink's pending (counted to the
         * spool's last number, events_stats) kept them until the next
         * event came. */
        return pump_skip(ev, durable);
    }
    if (ev->pskip > ev->pfrom) {
        /* the spool holds nothing from pfrom to pskip: a journal made anew
         * beside an older spool, or records lost; number on from there */
        return pump_skip(ev, ev->pskip);
    }
    if (ev->plen == 0) {
        pump_trim(ev); /* records a crash left between a copy and its trim */
        return 0;
    }
    struct iovec v = {ev->pbuf, ev->plen};
    int rc = journal_append(ev->journal, &v, 1);
    if (rc < 0) {
        log_msg(LOG_ERR, "event=events_journal_append_failed err=\"%s\" bytes=%zu "
                "note=kept_in_spool_retried", strerror(-rc), ev->plen);
        pthread_mutex_lock(&ev->mu);
        if (ev->pump_failing_ms == 0)
            ev->pump_failing_ms = clock_unix_ms(); /* the sinks' oldest age (events_stats) */
        pthread_mutex_unlock(&ev->mu);
        return rc;
    }
    pump_tell_sinks(ev, true);
    /* Sinks trim as their cursors move; with none left (a reload removed
     * the last), nobody else would, and every segment stayed on disk. */
    events_trim(ev);
    pump_trim(ev);
    return queue_events_durable(ev->queue) > ev->pseq ? 1 : 0;
}

void *
events_pump_main(void *arg)
{
    struct events *ev = arg;
    log_altstack_init();
    log_set_thread_name("ev-pump");
    uint64_t seen = 0;
    bool stop = false;
    while (!stop) {
        queue_port_drain(ev->port);
        int rc = pump_move(ev);
        pthread_mutex_lock(&ev->mu);
        /* Caught up (also without an append: numbers skipped, the
         * spool's records gone): no event waits in the spool for a
         * journal that refuses it. Cleared by an append alone, the age
         * of a failure stayed, and events_stats gave it to every event
         * pending after that. */
        if (rc == 0)
            ev->pump_failing_ms = 0;
        if (rc < 0) {
            /* the port's completions are drained meanwhile, commits are not
             * waited for */
            uint64_t until = clock_mono_ms() + PUMP_RETRY_MS;
            for (uint64_t now; !ev->stop && (now = clock_mono_ms()) < until;) {
                pthread_mutex_unlock(&ev->mu);
                pump_poll(ev, until - now);
                pthread_mutex_lock(&ev->mu);
            }
        } else if (rc == 0) {
            /* Caught up: wait for the next commit, then a little more so
             * that one append (one fsync) carries several commits. The
             * port's completions are drained as they come meanwhile
             * (pump_poll): a trim's, which trims what was appended
             * since it was asked, else that stays in the spool until
             * the next commit; a line put alone's (events_put), whose
             * refusal by the spool commits nothing: its completion
             * (event=events_lost) is told as soon as it comes. A trim that failed
             * is asked again (pump_move) at its retry time: waiting
             * for the next commit left what the journal holds in the
             * spool for as long as no event came. PUMP_IDLE_MS bounds
             * each wait, a backstop. */
            while (!ev->stop && seen == ev->committed) {
                uint64_t now = clock_mono_ms();
                bool retry = !ev->trimming && ev->trim_retry_at != 0;
                if (retry && now >= ev->trim_retry_at)
                    break;
                uint64_t until = now + PUMP_IDLE_MS;
                if (retry && ev->trim_retry_at < until)
                    until = ev->trim_retry_at;
                pthread_mutex_unlock(&ev->mu);
                pump_poll(ev, until - now);
                pthread_mutex_lock(&ev->mu);
            }
            seen = ev->committed;
            /* the gather, its whole time (the cond is broadcast at the
             * stop, and by the spool's hook at every commit it once was:
             * one timed wait ended at the next commit, and an append
             * carried two commits, not PUMP_GATHER_MS of them) */
            uint64_t gather_end = clock_mono_ms() + ev->gather_ms;
            while (!ev->stop && clock_mono_ms() < gather_end)
                events_wait_until(ev, gather_end);
        }
        stop = ev->stop;
        pthread_mutex_unlock(&ev->mu);
    }
    /* What is durable now goes to the journal before the stop. */
    for (int i = 0; i < 64 && pump_move(ev) == 1; i++) {
    }
    /* The trim in flight (and lines put alone) complete: the spool still runs. */
    for (int i = 0; i < 100 && queue_port_pending(ev->port) > 0; i++)
        queue_port_wait(ev->port, 100);
    return NULL;
}

void
events_put(void *arg, const char *line, size_t len)
{
    struct events *ev = arg;
    int rc = queue_events_put(ev->queue, ev->port, line, len, pump_put_done, ev);
    if (rc < 0) {
        atomic_fetch_add(&ev->put_failed, 1);
        log_msg(LOG_ERR, "event=events_lost err=\"%s\" note=spool_refused_the_lines",
                queue_strerror(rc));
    }
}
