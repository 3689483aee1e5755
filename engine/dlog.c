/*
 * dlog: see dlog.h. This file owns the per-thread line buffers, their
 * hand-over to the writer thread, the log file descriptor and the writer
 * thread itself.
 *
 * Threading and locks. A buffer (struct dlog_buf) is in exactly one place:
 * a writer's cur or sealed FIFO (under w->mu), d->orphans or d->pool
 * (under d->mu), or the writer thread's pending FIFO (writer thread only).
 * Lock order is d->mu then w->mu; a worker never holds w->mu while it
 * takes d->mu. The worker formats a line with no lock held, then takes
 * w->mu only to copy it in; the writer thread holds w->mu only to unlink
 * buffers, never across I/O, and holds d->mu only while collecting.
 *
 * The way to dying (dlog_on_fatal): the crash path sets d->seized, waits
 * for the writer thread's turn to end (d->phase), and reads the lists
 * with no lock, pending and got included; the writer thread, seeing the
 * flag, touches no buffer again. How each race ends is said there.
 *
 * Memory. d->buffered counts the capacity of every buffer handed out and
 * not yet written (cur, sealed, orphans, pending); a worker that needs a
 * new buffer past d->max_buffered drops the event. Short buffers taken
 * on an interval are copied into the tail of the pending FIFO when they
 * fit, so a trickle of events during a disk stall costs its octets, not
 * 64 KB per interval.
 */
#include "engine/dlog.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"

#define POOL_MAX 16u /* spare DLOG_BUF_SIZE buffers kept for reuse */

struct dlog_buf {
    struct dlog_buf *next;
    size_t len; /* octets of whole lines in data */
    size_t off; /* octets already written (writer thread) */
    size_t cap;
    char data[];
};

/* A FIFO of buffers. */
struct buf_list {
    struct dlog_buf *head, *last; /* both NULL when empty */
};

struct dlog_writer {
    struct dlog *log;                /* borrowed: outlives the writer */
    struct dlog_writer *prev, *next; /* d->writers, under d->mu */
    struct dlog_writer *retired_next; /* d->retired once freed, under d->mu */

    pthread_mutex_t mu;     /* guards the fields down to dropped */
    struct dlog_buf *cur;   /* owned: being filled, or NULL */
    struct buf_list sealed; /* owned: full buffers, oldest first */
    uint64_t events, dropped;
    uint64_t outcomes[DLOG_OUT_COUNT][BOUNCE_CLASS_COUNT]; /* counted even when dropped */

    /* Owner thread only. */
    struct json *capture; /* borrowed: dlog_capture's buffer, or NULL */
    bool capture_only;    /* ... and the line does not go to the file */
    struct json line;     /* the line being formatted */
    uint64_t time_sec;  /* second that time_text holds */
    char time_text[40]; /* RFC 3339 of time_sec, ms patched per event */
    size_t time_len;
};

struct dlog {
    char *path; /* owned; "-" when there is no file */
    bool nofile;
    /* The hook (dlog_set_hook), NULL: none; set before any writer.
     * hook_arg is borrowed: it outlives the dlog. */
    void (*hook)(void *arg, const char *line, size_t len);
    void *hook_arg;
    unsigned flush_ms;
    pthread_t thread;
    bool started;

    pthread_mutex_t mu;  /* guards the fields down to retired_dropped */
    pthread_cond_t cond; /* CLOCK_MONOTONIC; wakes the writer thread */
    bool stop, kick;
    struct dlog_writer *writers; /* borrowed: each unlinks itself when freed */
    struct dlog_writer *retired; /* owned: writers freed, kept to dlog_free (the crash
                                  * hook may be reading one as it is unlinked) */
    struct buf_list orphans;     /* owned: buffers of freed writers */
    struct dlog_buf *pool;       /* owned: spare buffers */
    unsigned npool;
    size_t buffered;
    uint64_t retired_events, retired_dropped; /* of freed writers */
    uint64_t retired_outcomes[DLOG_OUT_COUNT][BOUNCE_CLASS_COUNT];

    _Atomic size_t max_buffered;
    _Atomic bool reopen;
    _Atomic uint64_t bytes, write_errors, reopens, reopen_errors;

    /* The way to dying (dlog_on_fatal): */
    int fatal_slot;      /* log_fatal_hook_add's, or -1 */
    _Atomic bool seized; /* the crash path writes what is left; the writer thread no more */
    _Atomic int phase;   /* the writer thread's: enum phase */

    /* Writer thread only (and dlog_new/dlog_free around it; the crash
     * path reads them once the writer thread is idle, see dlog_on_fatal). */
    int fd;
    struct buf_list got;     /* owned: collected, not yet in pending */
    struct buf_list pending; /* owned: collected, not yet written */
    bool failing;            /* in a burst of write errors */
    uint64_t burst_errors;
    bool dropping; /* in a burst of dropped events */
    uint64_t dropped_seen;
};

/* Where the writer thread is, for the crash path: waiting (it touches no
 * buffer until it has seen d->seized), moving buffers between lists, or
 * in a write(2). */
enum phase { PHASE_IDLE, PHASE_LISTS, PHASE_WRITING };

/* The dlog whose writer thread this is (NULL elsewhere): its crash path
 * does not wait for itself. */
static _Thread_local const struct dlog *dlog_self;

static const char *const kind_names[] = {
    [DLOG_RECEPTION] = "reception",
    [DLOG_DELIVERY] = "delivery",
    [DLOG_TRANSIENT_FAILURE] = "transient_failure",
    [DLOG_BOUNCE] = "bounce",
    [DLOG_EXPIRATION] = "expiration",
    [DLOG_DSN] = "dsn",
    [DLOG_OOB_BOUNCE] = "oob_bounce",
    [DLOG_COMPLAINT] = "complaint",
    [DLOG_SUPPRESSED] = "suppressed",
    [DLOG_SHAPING_STARTED] = "shaping_started",
    [DLOG_SHAPING_ENDED] = "shaping_ended",
    [DLOG_REJECTION] = "rejection",
};

const char *
dlog_kind_str(enum dlog_kind kind)
{
    if ((unsigned)kind < sizeof(kind_names) / sizeof(kind_names[0]))
        return kind_names[kind];
    return "unknown";
}

static void
list_init(struct buf_list *l)
{
    l->head = l->last = NULL;
}

static void
list_push(struct buf_list *l, struct dlog_buf *b)
{
    b->next = NULL;
    if (l->last != NULL)
        l->last->next = b;
    else
        l->head = b;
    l->last = b;
}

/* Move every buffer of from to the end of to. */
static void
list_splice(struct buf_list *to, struct buf_list *from)
{
    if (from->head == NULL)
        return;
    if (to->last != NULL)
        to->last->next = from->head;
    else
        to->head = from->head;
    to->last = from->last;
    list_init(from);
}

static struct dlog_buf *
list_pop(struct buf_list *l)
{
    struct dlog_buf *b = l->head;
    if (b != NULL) {
        l->head = b->next;
        if (l->head == NULL)
            l->last = NULL;
        b->next = NULL;
    }
    return b;
}

static void
chain_free(struct dlog_buf *b)
{
    while (b != NULL) {
        struct dlog_buf *next = b->next;
        free(b);
        b = next;
    }
}

/* ---- formatting (pure) ---- */

static void
put_str(struct json *j, const char *key, const char *s)
{
    if (s == NULL)
        return;
    json_key(j, key);
    /* Bounded so that one line stays bounded whatever a peer sent. */
    json_strn(j, s, strnlen(s, DLOG_FIELD_MAX));
}

static void
put_u64(struct json *j, const char *key, uint64_t v)
{
    if (v != 0)
        json_ku64(j, key, v);
}

static void
format_line(struct json *j, const struct dlog_event *ev, uint64_t time_ms, const char *time_text,
            size_t time_len)
{
    json_reset(j);
    json_obj_begin(j);
    json_key(j, "time");
    json_strn(j, time_text, time_len);
    json_kstr(j, "event", dlog_kind_str(ev->kind));
    put_str(j, "id", ev->id);
    put_str(j, "rcpt", ev->rcpt);
    put_str(j, "sender", ev->sender);
    put_str(j, "domain", ev->domain);
    put_str(j, "mx", ev->mx);
    put_str(j, "mx_addr", ev->mx_addr);
    put_str(j, "source", ev->source);
    put_u64(j, "code", ev->code);
    put_str(j, "enhanced", ev->enhanced);
    put_str(j, "reply", ev->reply);
    put_str(j, "dsn_id", ev->dsn_id);
    if (ev->ndsn_rcpt > 0 && ev->dsn_rcpt != NULL) {
        json_key(j, "recipients");
        json_arr_begin(j);
        for (unsigned i = 0; i < ev->ndsn_rcpt; i++) {
            json_obj_begin(j);
            put_str(j, "rcpt", ev->dsn_rcpt[i].rcpt);
            put_str(j, "action", ev->dsn_rcpt[i].action);
            put_str(j, "status", ev->dsn_rcpt[i].status);
            json_obj_end(j);
        }
        json_arr_end(j);
    }
    if (ev->kind >= DLOG_DELIVERY && ev->kind <= DLOG_EXPIRATION)
        json_ku64(j, "attempt", ev->attempt); /* 0 too: a recipient never tried */
    else
        put_u64(j, "attempt", ev->attempt);
    if (ev->untried)
        json_kbool(j, "tried", false);
    put_str(j, "class", ev->classification);
    put_str(j, "reason", ev->reason);
    put_str(j, "scope", ev->scope);
    put_str(j, "tls_protocol", ev->tls_protocol);
    put_str(j, "tls_cipher", ev->tls_cipher);
    put_str(j, "tls_policy", ev->tls_policy);
    put_str(j, "tls_verify", ev->tls_verify);
    put_u64(j, "size", ev->size);
    if (ev->arrival_ms != 0)
        json_ku64(j, "queue_time_ms", time_ms > ev->arrival_ms ? time_ms - ev->arrival_ms : 0);
    put_u64(j, "rcpt_count", ev->rcpt_count);
    put_str(j, "client", ev->client);
    put_str(j, "auth_user", ev->auth_user);
    bool open = false;
    for (unsigned i = 0; ev->hdr_names != NULL && ev->hdr_values != NULL && i < ev->nhdr; i++) {
        const char *name = ev->hdr_names[i], *value = ev->hdr_values[i];
        if (name == NULL || value == NULL)
            continue;
        if (!open) {
            json_key(j, "headers");
            json_obj_begin(j);
            open = true;
        }
        json_key(j, name);
        json_strn(j, value, strnlen(value, DLOG_FIELD_MAX));
    }
    if (open)
        json_obj_end(j);
    if (ev->ndkim > 0) {
        json_key(j, "dkim");
        json_arr_begin(j);
        for (unsigned i = 0; i < ev->ndkim; i++) {
            json_obj_begin(j);
            json_kstr(j, "d", ev->dkim[i].d);
            json_kstr(j, "s", ev->dkim[i].s);
            json_kstr(j, "a", ev->dkim[i].a);
            json_obj_end(j);
        }
        json_arr_end(j);
    }
    put_str(j, "dkim_unsigned", ev->dkim_unsigned);
    put_str(j, "tenant", ev->tenant);
    put_str(j, "report", ev->report);
    put_str(j, "action", ev->action);
    put_str(j, "feedback_type", ev->feedback_type);
    put_str(j, "reporter", ev->reporter);
    put_str(j, "message_id", ev->message_id);
    put_str(j, "campaign", ev->campaign);
    put_str(j, "pool", ev->pool);
    put_u64(j, "priority", ev->priority);
    put_str(j, "rule", ev->rule);
    put_str(j, "group", ev->group);
    if (ev->until_ms != 0) {
        json_key(j, "until");
        json_time_ms(j, ev->until_ms);
    }
    if (ev->kind == DLOG_OOB_BOUNCE || ev->kind == DLOG_COMPLAINT) {
        if (ev->rcpt_index >= 0)
            json_ku64(j, "rcpt_index", (uint64_t)ev->rcpt_index);
        if (ev->verified != 0)
            json_kbool(j, "verified", ev->verified > 0);
    }
    json_obj_end(j);
    json_raw(j, "\n", 1);
}

int
dlog_format(struct json *j, const struct dlog_event *ev, uint64_t time_ms)
{
    char text[40];
    size_t n = json_format_time(text, sizeof(text), time_ms);
    format_line(j, ev, time_ms, text, n);
    return json_failed(j) ? -ENOMEM : 0;
}

/*
 * The RFC 3339 text of t. json_format_time goes through gmtime_r, which
 * in glibc takes a process-wide lock, so each writer formats a second
 * once and patches the milliseconds: no shared lock per event.
 */
static const char *
writer_time(struct dlog_writer *w, uint64_t t)
{
    uint64_t sec = t / 1000;
    if (w->time_len == 0 || sec != w->time_sec) {
        w->time_len = json_format_time(w->time_text, sizeof(w->time_text), sec * 1000);
        w->time_sec = sec;
    }
    if (w->time_len >= 5) { /* "...SS.mmmZ" */
        unsigned ms = (unsigned)(t % 1000);
        char *p = w->time_text + w->time_len - 4;
        p[0] = (char)('0' + ms / 100);
        p[1] = (char)('0' + ms / 10 % 10);
        p[2] = (char)('0' + ms % 10);
    }
    return w->time_text;
}

/* ---- buffers ---- */

/* A buffer for a line of n octets, or NULL (cap reached, no memory). */
static struct dlog_buf *
buf_get(struct dlog *d, size_t n)
{
    size_t need = n > DLOG_BUF_SIZE ? n : DLOG_BUF_SIZE;
    struct dlog_buf *b = NULL;
    pthread_mutex_lock(&d->mu);
    size_t max = atomic_load_explicit(&d->max_buffered, memory_order_relaxed);
    if (d->buffered + need > max) {
        pthread_mutex_unlock(&d->mu);
        return NULL;
    }
    if (need == DLOG_BUF_SIZE && d->pool != NULL) {
        b = d->pool;
        d->pool = b->next;
        d->npool--;
    }
    d->buffered += need;
    pthread_mutex_unlock(&d->mu);
    if (b == NULL) {
        b = malloc(sizeof(*b) + need);
        if (b == NULL) {
            pthread_mutex_lock(&d->mu);
            d->buffered -= need;
            pthread_mutex_unlock(&d->mu);
            return NULL;
        }
        b->cap = need;
    }
    b->next = NULL;
    b->len = b->off = 0;
    return b;
}

/* Return written or dead buffers; d->mu held. */
static void
buf_release_locked(struct dlog *d, struct dlog_buf *b)
{
    while (b != NULL) {
        struct dlog_buf *next = b->next;
        d->buffered -= b->cap;
        if (b->cap == DLOG_BUF_SIZE && d->npool < POOL_MAX) {
            b->next = d->pool;
            d->pool = b;
            d->npool++;
        } else {
            free(b);
        }
        b = next;
    }
}

static void
kick(struct dlog *d)
{
    pthread_mutex_lock(&d->mu);
    d->kick = true;
    pthread_cond_signal(&d->cond);
    pthread_mutex_unlock(&d->mu);
}

/* ---- workers ---- */

struct dlog_writer *
dlog_writer_new(struct dlog *d)
{
    if (d == NULL)
        return NULL;
    struct dlog_writer *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return NULL;
    w->log = d;
    pthread_mutex_init(&w->mu, NULL);
    list_init(&w->sealed);
    json_init(&w->line);
    pthread_mutex_lock(&d->mu);
    w->next = d->writers;
    if (d->writers != NULL)
        d->writers->prev = w;
    d->writers = w;
    pthread_mutex_unlock(&d->mu);
    return w;
}

struct dlog_writer *
dlog_writer_free(struct dlog_writer *w)
{
    if (w == NULL)
        return NULL;
    struct dlog *d = w->log;
    pthread_mutex_lock(&w->mu);
    struct dlog_buf *empty = NULL;
    if (w->cur != NULL && w->cur->len > 0)
        list_push(&w->sealed, w->cur);
    else
        empty = w->cur;
    w->cur = NULL;
    struct buf_list sealed = w->sealed;
    list_init(&w->sealed);
    uint64_t events = w->events, dropped = w->dropped;
    pthread_mutex_unlock(&w->mu);

    pthread_mutex_lock(&d->mu);
    if (w->prev != NULL)
        w->prev->next = w->next;
    else
        d->writers = w->next;
    if (w->next != NULL)
        w->next->prev = w->prev;
    bool any = sealed.head != NULL;
    list_splice(&d->orphans, &sealed);
    buf_release_locked(d, empty);
    d->retired_events += events;
    d->retired_dropped += dropped;
    for (int k = 0; k < DLOG_OUT_COUNT; k++)
        for (int c = 0; c < BOUNCE_CLASS_COUNT; c++)
            d->retired_outcomes[k][c] += w->outcomes[k][c]; /* w is unlinked: no other reader */
    if (any) {
        d->kick = true;
        pthread_cond_signal(&d->cond);
    }
    pthread_mutex_unlock(&d->mu);

    pthread_mutex_destroy(&w->mu);
    json_fini(&w->line);
    /* Not freed: the crash hook (dlog_on_fatal), which walks the writers
     * with no lock, may be at w right now (at a stop given up, the main
     * thread frees the writers while the stop watch runs it). Kept to
     * dlog_free, which takes the hook off first: a few hundred octets for
     * each writer of the process's life (one per worker and a few). */
    pthread_mutex_lock(&d->mu);
    w->retired_next = d->retired;
    d->retired = w;
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

/* Append n octets (whole lines) to w; the slow path seals a full buffer
 * and gets another without holding w->mu across d->mu. */
static void
writer_append(struct dlog_writer *w, const char *p, size_t n)
{
    pthread_mutex_lock(&w->mu);
    struct dlog_buf *b = w->cur;
    if (b != NULL && b->cap - b->len >= n) {
        memcpy(b->data + b->len, p, n);
        /* release: the crash path reads len with no lock, and writes
         * the octets below it (whole lines) */
        __atomic_store_n(&b->len, b->len + n, __ATOMIC_RELEASE);
        w->events++;
        pthread_mutex_unlock(&w->mu);
        return;
    }
    bool sealed = false;
    if (b != NULL) {
        /* Never empty here: an empty buffer has room for any line up to
         * its cap, and a larger line gets a buffer of its own size. */
        list_push(&w->sealed, b);
        w->cur = NULL;
        sealed = true;
    }
    pthread_mutex_unlock(&w->mu);

    struct dlog *d = w->log;
    if (sealed)
        kick(d);
    b = buf_get(d, n);
    pthread_mutex_lock(&w->mu);
    if (b == NULL) {
        w->dropped++;
    } else {
        /* cur is still NULL: only this thread installs a buffer. */
        memcpy(b->data, p, n);
        b->len = n;
        __atomic_store_n(&w->cur, b, __ATOMIC_RELEASE); /* its lines before it (crash path) */
        w->events++;
    }
    pthread_mutex_unlock(&w->mu);
}

void
dlog_count(struct dlog_writer *w, enum dlog_kind kind, enum bounce_class cls)
{
    if (w == NULL ||
        (kind != DLOG_TRANSIENT_FAILURE && kind != DLOG_BOUNCE && kind != DLOG_EXPIRATION))
        return;
    if ((unsigned)cls >= BOUNCE_CLASS_COUNT)
        cls = BOUNCE_OTHER;
    pthread_mutex_lock(&w->mu);
    w->outcomes[kind == DLOG_TRANSIENT_FAILURE ? DLOG_OUT_DEFERRED : DLOG_OUT_BOUNCED][cls]++;
    pthread_mutex_unlock(&w->mu);
}

void
dlog_event(struct dlog_writer *w, const struct dlog_event *ev)
{
    if (w == NULL || ev == NULL)
        return;
    if (!w->capture_only) {
        /* captured for the file later: counted when told (dlog_count) */
        enum bounce_class cls = BOUNCE_OTHER;
        if (ev->classification != NULL && bounce_class_parse(ev->classification, &cls) < 0)
            cls = BOUNCE_OTHER;
        dlog_count(w, ev->kind, cls);
    }
    uint64_t t = ev->time_ms != 0 ? ev->time_ms : clock_unix_ms();
    const char *text = writer_time(w, t);
    format_line(&w->line, ev, t, text, w->time_len);
    if (json_failed(&w->line)) {
        pthread_mutex_lock(&w->mu);
        w->dropped++;
        pthread_mutex_unlock(&w->mu);
        json_fini(&w->line); /* give the memory back; json_init state again */
        json_init(&w->line);
        return;
    }
    if (w->capture != NULL)
        json_raw(w->capture, w->line.buf, w->line.len);
    else if (w->log->hook != NULL)
        w->log->hook(w->log->hook_arg, w->line.buf, w->line.len);
    if (!w->capture_only)
        writer_append(w, w->line.buf, w->line.len);
}

void
dlog_capture(struct dlog_writer *w, struct json *buf, bool file)
{
    if (w == NULL)
        return;
    w->capture = buf;
    w->capture_only = buf != NULL && !file;
}

void
dlog_line(struct dlog_writer *w, const char *line, size_t len)
{
    if (w != NULL && len > 0)
        writer_append(w, line, len);
}

void
dlog_told(struct dlog_writer *w, const char *lines, size_t len)
{
    if (w == NULL || len == 0)
        return;
    for (size_t at = 0; w->log->hook != NULL && at < len;) {
        const char *nl = memchr(lines + at, '\n', len - at);
        size_t end = nl != NULL ? (size_t)(nl - lines) + 1 : len;
        w->log->hook(w->log->hook_arg, lines + at, end - at);
        at = end;
    }
    writer_append(w, lines, len);
}

/* ---- the writer thread ---- */

/*
 * Take the buffers to write into out: orphans, every writer's full
 * buffers, and on an interval (all) the partly filled ones too. Returns
 * the total of dropped events so far. d->mu held.
 */
static uint64_t
collect_locked(struct dlog *d, struct buf_list *out, bool all)
{
    uint64_t dropped = d->retired_dropped;
    list_splice(out, &d->orphans);
    for (struct dlog_writer *w = d->writers; w != NULL; w = w->next) {
        pthread_mutex_lock(&w->mu);
        list_splice(out, &w->sealed);
        if (all && w->cur != NULL && w->cur->len > 0) {
            list_push(out, w->cur);
            w->cur = NULL;
        }
        dropped += w->dropped;
        pthread_mutex_unlock(&w->mu);
    }
    return dropped;
}

/* Move got to the pending FIFO; short buffers are copied into the tail
 * when they fit, and go to done. */
static void
pending_add(struct dlog *d, struct buf_list *got, struct buf_list *done)
{
    struct dlog_buf *b;
    while ((b = list_pop(got)) != NULL) {
        struct dlog_buf *tail = d->pending.last;
        if (tail != NULL && b->len <= DLOG_BUF_SIZE / 4 && tail->cap - tail->len >= b->len) {
            memcpy(tail->data + tail->len, b->data, b->len);
            tail->len += b->len;
            list_push(done, b);
        } else {
            list_push(&d->pending, b);
        }
    }
}

static size_t
pending_bytes(const struct dlog *d)
{
    size_t n = 0;
    for (const struct dlog_buf *b = d->pending.head; b != NULL; b = b->next)
        n += b->len - b->off;
    return n;
}

/* Write the pending FIFO in order; stop at the first error (the rest is
 * retried on the next interval). Written buffers go to done. */
static void
pending_write(struct dlog *d, struct buf_list *done)
{
    struct dlog_buf *b;
    if (d->nofile) {
        list_splice(done, &d->pending);
        return;
    }
    while ((b = d->pending.head) != NULL) {
        while (b->off < b->len) {
            /* The crash path has taken over (it waits for this thread
             * to be idle): what is left is its to write, once. */
            if (atomic_load(&d->seized))
                return;
            atomic_store(&d->phase, PHASE_WRITING);
            ssize_t n = write(d->fd, b->data + b->off, b->len - b->off);
            if (n > 0)
                b->off += (size_t)n; /* before the phase says so */
            atomic_store(&d->phase, PHASE_LISTS);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                int e = n < 0 ? errno : EIO; /* 0 would spin: treat as an error */
                atomic_fetch_add_explicit(&d->write_errors, 1, memory_order_relaxed);
                d->burst_errors++;
                if (!d->failing)
                    log_msg(LOG_ERR,
                            "event=dlog_write_failed path=%s err=\"%s\" pending_bytes=%zu "
                            "retry_ms=%u",
                            d->path, strerror(e), pending_bytes(d), d->flush_ms);
                d->failing = true;
                return;
            }
            atomic_fetch_add_explicit(&d->bytes, (uint64_t)n, memory_order_relaxed);
        }
        list_push(done, list_pop(&d->pending));
    }
    if (d->failing) {
        log_msg(LOG_NOTICE, "event=dlog_write_recovered path=%s failed_writes=%" PRIu64, d->path,
                d->burst_errors);
        d->failing = false;
        d->burst_errors = 0;
    }
}

/* Between batches, so that no line is split across the two files. */
static void
dlog_do_reopen(struct dlog *d)
{
    if (d->nofile)
        return;
    int fd = open(d->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0) {
        atomic_fetch_add_explicit(&d->reopen_errors, 1, memory_order_relaxed);
        log_msg(LOG_ERR, "event=dlog_reopen_failed path=%s err=\"%s\" note=keeping_old_file",
                d->path, strerror(errno));
        return;
    }
    close(d->fd);
    d->fd = fd;
    atomic_fetch_add_explicit(&d->reopens, 1, memory_order_relaxed);
}

/* Once when drops start, once with the total when a quiet interval ends
 * the burst. */
static void
report_drops(struct dlog *d, uint64_t dropped, bool interval)
{
    if (dropped > d->dropped_seen) {
        if (!d->dropping)
            log_msg(LOG_ERR,
                    "event=dlog_dropping path=%s reason=buffer_full_or_no_memory "
                    "max_buffered=%zu",
                    d->path, atomic_load_explicit(&d->max_buffered, memory_order_relaxed));
        d->dropping = true;
        d->dropped_seen = dropped;
    } else if (d->dropping && interval) {
        log_msg(LOG_NOTICE, "event=dlog_dropping_stopped path=%s dropped_total=%" PRIu64, d->path,
                dropped);
        d->dropping = false;
    }
}

static void *
dlog_main(void *arg)
{
    struct dlog *d = arg;
    log_altstack_init();
    log_set_thread_name("dlog");
    dlog_self = d;
    const uint64_t interval = (uint64_t)d->flush_ms * 1000000u;
    uint64_t deadline = clock_mono_ns() + interval;
    struct buf_list done;
    list_init(&done);

    pthread_mutex_lock(&d->mu);
    for (;;) {
        uint64_t now = clock_mono_ns();
        while (!d->stop && !d->kick && now < deadline) {
            /* The reopen flag is only a flag (signal-safe), so it is
             * seen here when the interval ends. */
            struct timespec ts = {.tv_sec = (time_t)(deadline / 1000000000u),
                                  .tv_nsec = (long)(deadline % 1000000000u)};
            pthread_cond_timedwait(&d->cond, &d->mu, &ts);
            now = clock_mono_ns();
        }
        /* The phase first, then the flag (both seq_cst), as the crash
         * path sets the flag, then reads the phase: either it waits for
         * this turn, or this turn sees the flag and touches nothing. */
        atomic_store(&d->phase, PHASE_LISTS);
        if (atomic_load(&d->seized)) {
            atomic_store(&d->phase, PHASE_IDLE);
            break;
        }
        bool stop = d->stop, interval_due = stop || now >= deadline;
        d->kick = false;
        uint64_t dropped = collect_locked(d, &d->got, interval_due);
        pthread_mutex_unlock(&d->mu);

        pending_add(d, &d->got, &done);
        if (atomic_exchange(&d->reopen, false))
            dlog_do_reopen(d);
        /* While failing, retry only on the interval, not on every kick. */
        if (!d->failing || interval_due)
            pending_write(d, &done);
        report_drops(d, dropped, interval_due);
        if (interval_due)
            deadline = now + interval;
        /* done holds written buffers only: nothing the crash path reads */
        atomic_store(&d->phase, PHASE_IDLE);

        pthread_mutex_lock(&d->mu);
        buf_release_locked(d, done.head);
        list_init(&done);
        if (stop)
            break;
    }
    if (atomic_load(&d->seized)) {
        /* The crash path wrote what was left (or is writing it): the
         * process is dying. Only dlog_free, in a test, would end this
         * wait; it frees the buffers. */
        while (!d->stop)
            pthread_cond_wait(&d->cond, &d->mu);
        pthread_mutex_unlock(&d->mu);
        return NULL;
    }
    /* What one last attempt could not write is lost: say how much.
     * (No crash path can be reading: dlog_free took its hook off first.) */
    if (d->pending.head != NULL) {
        log_msg(LOG_ERR, "event=dlog_lost_at_close path=%s bytes=%zu", d->path, pending_bytes(d));
        buf_release_locked(d, d->pending.head);
        list_init(&d->pending);
    }
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

/* ---- on the way to dying ---- */

/* Write the whole lines of b from off on (an EINTR retried; an error
 * ends it: nowhere to report it). Async-signal-safe. */
static void
fatal_write_buf(int fd, const struct dlog_buf *b, size_t off)
{
    size_t len = __atomic_load_n(&b->len, __ATOMIC_ACQUIRE);
    if (len > b->cap)
        len = b->cap; /* torn: a buffer freed under us */
    while (len > off && b->data[len - 1] != '\n')
        len--; /* whole lines only (len always ends on one; in case) */
    while (off < len) {
        ssize_t n = write(fd, b->data + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        off += (size_t)n;
    }
}

static void
fatal_write_list(int fd, const struct dlog_buf *b, bool from_off)
{
    for (; b != NULL; b = __atomic_load_n(&b->next, __ATOMIC_ACQUIRE))
        fatal_write_buf(fd, b, from_off ? b->off : 0);
}

/*
 * The hook of log_fatal_hook_add: at a fatal signal (in its handler) and
 * at a stop given up (engine.c's stop watch, before its _exit), write
 * every line not yet written, in the order the writer thread would have:
 * pending (from what it wrote of it), collected, orphans, then each
 * writer's sealed buffers and cur. Async-signal-safe: write(2),
 * nanosleep, atomics; no lock (a thread that died or hangs may hold any
 * of them: a lock-free read, at the stop given up too, where a mutex
 * could be held forever).
 *
 * No line twice: the writer thread checks d->seized before each turn and
 * each write(2), and this waits (up to 200 ms) for its turn to end, so
 * it never writes again what this writes; this reads pending's off once
 * it has stopped. Still waiting then: in a write(2) (a disk that does not
 * take it), this writes nothing (it would hang the same way, and the
 * write in flight could land twice); elsewhere (blocked on a writer's
 * mutex that a crashed worker holds, in collect_locked), it writes, got
 * holding what was collected so far.
 *
 * Best effort: the workers run on while this reads their buffers. A line
 * being appended just then is left out (len is stored, release, after the
 * line is whole, so only whole lines are written); a buffer sealed just
 * then may be missed or, if seen both sealed and cur, is written once; a
 * writer freed just then stays readable (dlog_writer_free keeps it to
 * dlog_free), and its buffers, moved to the orphans, may be missed or
 * written twice. Lines logged after this ran are lost: the process is
 * dying. "No line twice" above holds while the writer thread's turn ends
 * within the 200 ms: one held longer mid-turn (preempted while it
 * collects, or in a reopen's open(2)) may see lists change under this,
 * and a line missed or written twice.
 */
static void
dlog_on_fatal(void *arg)
{
    struct dlog *d = arg;
    int saved = errno;
    atomic_store(&d->seized, true);
    if (dlog_self != d) {
        struct timespec ms = {0, 1000000};
        for (int i = 0; i < 200 && atomic_load(&d->phase) != PHASE_IDLE; i++)
            nanosleep(&ms, NULL);
        if (atomic_load(&d->phase) == PHASE_WRITING) {
            errno = saved;
            return;
        }
    }
    int fd = d->fd;
    fatal_write_list(fd, d->pending.head, true);
    fatal_write_list(fd, d->got.head, false);
    fatal_write_list(fd, __atomic_load_n(&d->orphans.head, __ATOMIC_ACQUIRE), false);
    for (const struct dlog_writer *w = __atomic_load_n(&d->writers, __ATOMIC_ACQUIRE); w != NULL;
         w = __atomic_load_n(&w->next, __ATOMIC_ACQUIRE)) {
        const struct dlog_buf *cur = __atomic_load_n(&w->cur, __ATOMIC_ACQUIRE);
        for (const struct dlog_buf *b = __atomic_load_n(&w->sealed.head, __ATOMIC_ACQUIRE);
             b != NULL; b = __atomic_load_n(&b->next, __ATOMIC_ACQUIRE)) {
            fatal_write_buf(fd, b, 0);
            if (b == cur)
                cur = NULL; /* sealed since it was read: written once */
        }
        if (cur != NULL)
            fatal_write_buf(fd, cur, 0);
    }
    errno = saved;
}

/* ---- the log ---- */

static int new_fail(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int
new_fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    if (err != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

static void
dlog_destroy(struct dlog *d)
{
    if (d->fd >= 0)
        close(d->fd);
    chain_free(d->pool);
    chain_free(d->orphans.head);
    chain_free(d->got.head);
    chain_free(d->pending.head);
    for (struct dlog_writer *w = d->retired, *next; w != NULL; w = next) {
        next = w->retired_next;
        free(w);
    }
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->cond);
    free(d->path);
    free(d);
}

int
dlog_new(const char *path, unsigned flush_interval_ms, struct dlog **out, char *err, size_t errlen)
{
    *out = NULL;
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if (path != NULL && path[0] == '\0')
        return new_fail(err, errlen, -EINVAL, "delivery log: path is empty");
    struct dlog *d = calloc(1, sizeof(*d));
    if (d == NULL)
        return new_fail(err, errlen, -ENOMEM, "delivery log: out of memory");
    d->fd = -1;
    d->flush_ms = flush_interval_ms != 0 ? flush_interval_ms : DLOG_FLUSH_MS_DEFAULT;
    atomic_init(&d->max_buffered, (size_t)DLOG_MAX_BUFFERED);
    atomic_init(&d->reopen, false);
    atomic_init(&d->bytes, 0);
    atomic_init(&d->write_errors, 0);
    atomic_init(&d->reopens, 0);
    atomic_init(&d->reopen_errors, 0);
    d->fatal_slot = -1;
    atomic_init(&d->seized, false);
    atomic_init(&d->phase, PHASE_IDLE);
    list_init(&d->orphans);
    list_init(&d->got);
    list_init(&d->pending);
    pthread_mutex_init(&d->mu, NULL);
    clock_cond_init_mono(&d->cond);
    d->nofile = path == NULL;
    d->path = strdup(path != NULL ? path : "-");
    if (d->path == NULL) {
        dlog_destroy(d);
        return new_fail(err, errlen, -ENOMEM, "delivery log: out of memory");
    }
    if (!d->nofile)
        d->fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (!d->nofile && d->fd < 0) {
        int rc = -errno;
        new_fail(err, errlen, rc, "cannot open delivery log %s: %s", path, strerror(-rc));
        dlog_destroy(d);
        return rc;
    }
    int rc = pthread_create(&d->thread, NULL, dlog_main, d);
    if (rc != 0) {
        new_fail(err, errlen, -rc, "delivery log %s: cannot start writer thread: %s", path,
                 strerror(rc));
        dlog_destroy(d);
        return -rc;
    }
    d->started = true;
    /* Its lines at a crash or a stop given up (dlog_on_fatal). Past the
     * hooks' few slots (tests that open many), it goes without. */
    if (!d->nofile)
        d->fatal_slot = log_fatal_hook_add(dlog_on_fatal, d);
    *out = d;
    return 0;
}

struct dlog *
dlog_free(struct dlog *d)
{
    if (d == NULL)
        return NULL;
    /* First: past it no crash path reads d (it waits for one running). */
    log_fatal_hook_remove(d->fatal_slot);
    d->fatal_slot = -1;
    pthread_mutex_lock(&d->mu);
    if (d->writers != NULL) {
        /* A writer would be left pointing at freed memory. */
        pthread_mutex_unlock(&d->mu);
        log_msg(LOG_CRIT, "event=panic reason=dlog_free_with_open_writers path=%s", d->path);
        abort();
    }
    d->stop = true;
    pthread_cond_signal(&d->cond);
    pthread_mutex_unlock(&d->mu);
    if (d->started)
        pthread_join(d->thread, NULL);
    dlog_destroy(d);
    return NULL;
}

void
dlog_set_hook(struct dlog *d, void (*fn)(void *arg, const char *line, size_t len), void *arg)
{
    if (d == NULL)
        return;
    d->hook = fn;
    d->hook_arg = arg;
}

void
dlog_set_max_buffered(struct dlog *d, size_t bytes)
{
    if (d == NULL)
        return;
    if (bytes < 2 * (size_t)DLOG_BUF_SIZE)
        bytes = 2 * (size_t)DLOG_BUF_SIZE;
    atomic_store_explicit(&d->max_buffered, bytes, memory_order_relaxed);
}

void
dlog_reopen(struct dlog *d)
{
    if (d != NULL)
        atomic_store(&d->reopen, true);
}

void
dlog_stats(struct dlog *d, struct dlog_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (d == NULL)
        return;
    pthread_mutex_lock(&d->mu);
    out->events = d->retired_events;
    out->dropped = d->retired_dropped;
    memcpy(out->outcomes, d->retired_outcomes, sizeof(out->outcomes));
    for (struct dlog_writer *w = d->writers; w != NULL; w = w->next) {
        pthread_mutex_lock(&w->mu);
        out->events += w->events;
        out->dropped += w->dropped;
        for (int k = 0; k < DLOG_OUT_COUNT; k++)
            for (int c = 0; c < BOUNCE_CLASS_COUNT; c++)
                out->outcomes[k][c] += w->outcomes[k][c];
        pthread_mutex_unlock(&w->mu);
    }
    pthread_mutex_unlock(&d->mu);
    out->bytes = atomic_load_explicit(&d->bytes, memory_order_relaxed);
    out->write_errors = atomic_load_explicit(&d->write_errors, memory_order_relaxed);
    out->reopens = atomic_load_explicit(&d->reopens, memory_order_relaxed);
    out->reopen_errors = atomic_load_explicit(&d->reopen_errors, memory_order_relaxed);
}
