/*
 * suppress_notes: the suppression list's notes (see suppress.h, "Notes"):
 * entries that must not be lost, committed in the spool's transaction
 * with the outcome or the report that caused them (queue.h, "notes") and
 * copied from there to the list, then trimmed from the spool. Making a
 * note (suppress_note_bounce, suppress_note_complaint) is engine/suppress.c's
 * entry encoding into the caller's buffer; copying them is sup_notes_pump,
 * run by the list's writer thread (engine/suppress.c) when the spool wakes
 * it (notes_wake) or a failed copy's retry time has come, by suppress_sync,
 * and by suppress_attach_queue and suppress_detach_queue at start and stop.
 * A pump's trim of the spool waits for the spool's answer, however long
 * (notes_trim): the spool holds the request and its port until it answers,
 * so the wait is not cut short. One not answered in NOTES_TRIM_SLOW_MS is
 * said (event=suppress_notes_trim_slow); a stop it holds (a spool whose
 * write lock another process keeps) is named by the stop's watch
 * (engine_stop: stage suppress_notes) and given up by its bound. A stop
 * that already knows the spool answers nothing (it cut a wait for it)
 * asks no trim (suppress_detach_queue_stuck): the notes are copied to the
 * list and left in the spool, copied again at the next start; a pump
 * already waiting for a trim (the writer's) gives it up at once
 * (event=suppress_notes_trim_left), its port kept (s->notes_left) until
 * suppress_close frees it once answered, else to the exit: it held the
 * pumps' lock, so the detach, and the writer's join in suppress_close,
 * waited for that spool all the same.
 *
 * Threading: a note is made on any thread at once (workers, the bounce
 * listener): it reads only the config and takes no lock (one that cannot
 * be made is counted in an atomic). A pump runs on a
 * thread that may block, one at a time (plock, which also guards the
 * queue attached and the first note not yet copied); its writes take the
 * list's writer mutex. notes_wake runs on the spool's committer thread
 * and takes only the feeds' mutex.
 */
#include "engine/suppress.h"
#include "engine/suppress_int.h"

#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "queue/queue.h"

/* ---- notes (suppress.h) ---- */

/* f as a note into buf (SUPPRESS_NOTE_BYTES): its lengths, then key and
 * value as stored. Returns the note's length; frees f. */
static int
note_of(struct feed *f, void *buf)
{
    uint8_t *b = buf;
    uint16_t kl = htole16(f->klen), vl = htole16(f->vlen);
    memcpy(b, &kl, 2);
    memcpy(b + 2, &vl, 2);
    memcpy(b + 4, f->kv, (size_t)f->klen + f->vlen);
    int len = 4 + f->klen + f->vlen;
    free(f);
    return len;
}

int
suppress_note_bounce(struct suppress *s, const char *tenant, const char *addr,
                     enum bounce_class cls, const char *text, void *buf)
{
    int rc = 0;
    struct feed *f = sup_bounce_entry(s, tenant, addr, cls, text, &rc);
    if (f != NULL)
        return note_of(f, buf);
    if (rc < 0)
        atomic_fetch_add(&s->feed_dropped, 1);
    return rc;
}

int
suppress_note_complaint(struct suppress *s, const char *tenant, const char *addr, void *buf)
{
    int64_t until = suppress_complaint_expiry(s, (int64_t)clock_unix_ms());
    if (until < 0)
        return 0;
    int rc = 0;
    struct feed *f = sup_feed_make(s, tenant != NULL && tenant[0] != '\0' ? tenant : NULL, addr,
                                   SUPPRESS_COMPLAINT, until, "complaint (feedback loop)", true,
                                   &rc);
    if (f != NULL)
        return note_of(f, buf);
    atomic_fetch_add(&s->feed_dropped, 1);
    return rc;
}

struct note_take {
    struct feed *head, **tail;
    uint64_t last; /* the last note taken or skipped, when any */
    bool any;
    unsigned n;    /* taken */
    unsigned damaged; /* skipped */
};

/* One note of the spool as a feed; a damaged one is skipped (and trimmed
 * with the others). Out of memory: stop before it, for the next pump. */
static int
note_take(void *arg, uint64_t seq, const void *note, size_t len)
{
    struct note_take *t = arg;
    const uint8_t *b = note;
    uint16_t kl = 0, vl = 0;
    if (len >= 4) {
        memcpy(&kl, b, 2);
        memcpy(&vl, b + 2, 2);
        kl = le16toh(kl);
        vl = le16toh(vl);
    }
    if (len < 4 || kl == 0 || kl > KEY_MAX || vl < VAL_HDR || vl > VAL_MAX ||
        len != 4u + kl + vl || memchr(b + 4, '\0', kl) == NULL) {
        log_msg(LOG_ERR, "event=suppress_note_damaged seq=%llu len=%zu",
                (unsigned long long)seq, len);
        t->last = seq;
        t->any = true;
        t->damaged++;
        return 0;
    }
    struct feed *f = malloc(sizeof(*f) + (size_t)kl + vl);
    if (f == NULL)
        return 1;
    t->last = seq;
    t->any = true;
    f->next = NULL;
    f->klen = kl;
    f->vlen = vl;
    memcpy(f->kv, b + 4, (size_t)kl + vl);
    *t->tail = f;
    t->tail = &f->next;
    t->n++;
    return 0;
}

/* A trim of the spool's notes not answered in this time is said
 * (event=suppress_notes_trim_slow), once; it is waited for all the same. */
#define NOTES_TRIM_SLOW_MS 2000u

struct trim_wait {
    struct trim_wait *next;  /* in s->notes_left, once given up */
    struct queue_port *port; /* owned */
    int rc;
    bool done;
};

static void
trim_done(void *cookie, int rc)
{
    struct trim_wait *w = cookie;
    w->rc = rc;
    w->done = true;
}

static void
trim_wait_free(struct trim_wait *w)
{
    queue_port_free(w->port);
    free(w);
}

/* Trim the spool's notes below upto, waiting for its answer on a port of
 * its own: until the spool answers it holds the port and the wait (its
 * callback's cookie), so neither is freed before. Waited for without
 * bound, unless a stop's spool answers nothing (s->notes_untrimmed, with
 * a kick): then given up, both kept in s->notes_left, and -ECANCELED.
 * Returns the trim's code. A pump (plock held). */
static int
notes_trim(struct suppress *s, uint64_t upto)
{
    struct trim_wait *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return -ENOMEM;
    if ((w->port = queue_port_new()) == NULL) {
        int e = errno;
        free(w);
        return -e;
    }
    int rc = queue_notes_trim(s->queue, w->port, upto, trim_done, w);
    uint64_t t0 = clock_mono_ms();
    bool slow = false;
    while (rc == 0 && !w->done) {
        uint64_t waited = clock_mono_ms() - t0;
        if (atomic_load(&s->notes_untrimmed)) {
            log_msg(LOG_WARN,
                    "event=suppress_notes_trim_left waited_ms=%llu "
                    "note=spool_not_answering_copied_again_at_the_next_start",
                    (unsigned long long)waited);
            w->next = s->notes_left;
            s->notes_left = w;
            return -ECANCELED;
        }
        if (!slow && waited >= NOTES_TRIM_SLOW_MS) {
            log_msg(LOG_WARN,
                    "event=suppress_notes_trim_slow waited_ms=%llu note=waiting_for_the_spool",
                    (unsigned long long)waited);
            slow = true;
        }
        /* the kick stays readable until the detach ends: notes_untrimmed
         * is looked at again first */
        struct pollfd p[2] = {{.fd = queue_port_fd(w->port), .events = POLLIN},
                              {.fd = s->notes_kick_fd, .events = POLLIN}};
        if (poll(p, 2, slow ? 1000 : (int)(NOTES_TRIM_SLOW_MS - waited)) > 0 && p[0].revents != 0)
            queue_port_drain(w->port);
    }
    if (rc == 0)
        rc = w->rc;
    trim_wait_free(w);
    return rc;
}

void
sup_notes_left_free(struct suppress *s)
{
    while (s->notes_left != NULL) {
        struct trim_wait *w = s->notes_left;
        s->notes_left = w->next;
        queue_port_drain(w->port);
        if (queue_port_pending(w->port) == 0) {
            trim_wait_free(w);
        } else {
            log_msg(LOG_WARN, "event=suppress_notes_trim_unanswered note=left_to_the_exit");
            /* left: the spool may still answer into it */
        }
    }
}

/* Copy the spool's notes to the list, then trim them there. Any thread
 * that may block; one at a time. Returns how many were copied, or -errno
 * (what was not copied stays in the spool). After a write that failed
 * (the list's map full, say) the writer thread's pumps (force false) wait
 * NOTES_RETRY_MS: each would try every note waiting again, and a bounce
 * storm would make that once a bounce. */
long
sup_notes_pump(struct suppress *s, bool force)
{
    long total = 0;
    uint64_t retry = atomic_load(&s->notes_retry_ms);
    if (s->test_hold || (!force && retry != 0 && clock_mono_ms() < retry))
        return 0;
    pthread_mutex_lock(&s->plock);
    while (s->queue != NULL) {
        struct note_take t = {.tail = &t.head};
        int n = queue_notes_read(s->queue, s->note_from, NOTES_BATCH, note_take, &t);
        if (n <= 0) {
            if (n < 0)
                log_msg(LOG_ERR, "event=suppress_notes_read_failed err=\"%s\"",
                        queue_strerror(n));
            total = n < 0 && total == 0 ? n : total;
            break;
        }
        int rc = 0;
        if (t.head != NULL) {
            pthread_mutex_lock(&s->wlock);
            rc = sup_write_pairs(s, t.head);
            pthread_mutex_unlock(&s->wlock);
        }
        while (t.head != NULL) {
            struct feed *next = t.head->next;
            free(t.head);
            t.head = next;
        }
        if (rc != 0) {
            /* kept in the spool: tried again NOTES_RETRY_MS later */
            log_msg(LOG_ERR,
                    "event=suppress_write_failed entries=%u source=spool err=\"%s\" "
                    "retry_in_ms=%u",
                    t.n, strerror(-rc), NOTES_RETRY_MS);
            atomic_store(&s->notes_retry_ms, clock_mono_ms() + NOTES_RETRY_MS);
            total = total == 0 ? rc : total;
            break;
        }
        atomic_store(&s->notes_retry_ms, 0);
        if (!t.any)
            break; /* out of memory at the first: the next pump */
        total += t.n;
        atomic_fetch_add(&s->feed_dropped, t.damaged); /* trimmed with the others */
        s->note_from = t.last + 1;
        if (atomic_load(&s->notes_untrimmed))
            log_msg(LOG_WARN,
                    "event=suppress_notes_untrimmed entries=%u note=spool_not_answering_"
                    "copied_again_at_the_next_start",
                    t.n);
        else if ((rc = notes_trim(s, s->note_from)) != 0 && rc != -ECANCELED)
            /* in the list now; a later trim takes them with its own */
            log_msg(LOG_WARN, "event=suppress_notes_trim_failed err=\"%s\"", queue_strerror(rc));
        if ((unsigned)n < NOTES_BATCH)
            break;
    }
    pthread_mutex_unlock(&s->plock);
    return total;
}

/* The spool's hook, on its committer thread: wake the writer. */
static void
notes_wake(void *arg)
{
    struct suppress *s = arg;
    pthread_mutex_lock(&s->flock);
    s->notes_due = true;
    pthread_cond_signal(&s->fcv);
    pthread_mutex_unlock(&s->flock);
}

long
suppress_attach_queue(struct suppress *s, struct queue *q)
{
    pthread_mutex_lock(&s->plock);
    s->queue = q;
    s->note_from = 0;
    pthread_mutex_unlock(&s->plock);
    long n = sup_notes_pump(s, true);
    queue_notes_set_hook(q, notes_wake, s);
    if (n < 0)
        notes_wake(s); /* the writer's wait was set before the retry time: set it again */
    if (n > 0)
        log_msg(LOG_NOTICE, "event=suppress_notes_replayed entries=%ld", n);
    return n;
}

static void
detach(struct suppress *s, bool trim)
{
    if (s == NULL || s->queue == NULL)
        return;
    queue_notes_set_hook(s->queue, NULL, NULL);
    uint64_t v = 1;
    if (!trim) {
        /* before the pumps' lock: a pump waiting for its trim holds it */
        atomic_store(&s->notes_untrimmed, true);
        if (write(s->notes_kick_fd, &v, sizeof(v)) < 0)
            log_msg(LOG_ERR, "event=suppress_notes_kick_failed err=\"%s\"", strerror(errno));
    }
    sup_notes_pump(s, true);
    pthread_mutex_lock(&s->plock);
    s->queue = NULL;
    pthread_mutex_unlock(&s->plock);
    if (!trim) {
        atomic_store(&s->notes_untrimmed, false);
        ssize_t rd = read(s->notes_kick_fd, &v, sizeof(v)); /* an attach waits again */
        (void)rd;
    }
}

void
suppress_detach_queue(struct suppress *s)
{
    detach(s, true);
}

void
suppress_detach_queue_stuck(struct suppress *s)
{
    detach(s, false);
}
