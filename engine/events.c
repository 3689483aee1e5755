/*
 * events: see events.h for the design. This file owns the sinks: their
 * threads, their batches (read from the journal, filtered, framed with
 * each event's id) and their backoff; sending a batch (the webhook over
 * libcurl, the Redis stream over hiredis) is engine/events_send.c's, and
 * the pump (the spool's event records to the journal, then a trim)
 * engine/events_pump.c's (events_int.h: what the three share).
 *
 * A sink thread's loop: wait until the journal holds events past its
 * cursor and the sink is not paused; gather a batch (closing at
 * batch_max events, EVENTS_BATCH_BYTES, or batch_wait after the first
 * event was seen); send it; on success store the cursor, on failure
 * count, keep the error text and wait retry_min doubling to retry_max
 * (a 429's or 503's Retry-After when longer, up to retry_max), then send
 * the same events again. Events the filter leaves out move
 * the cursor with the next batch. An HTTP 413 (the endpoint's body limit:
 * nginx's default is 1 MB, a catching-up batch up to 4 MB) halves the
 * sink's batch, in events and octets, and sends again at once: the limit
 * stays learnt until the sink restarts. A single event refused so is
 * dropped as a refused one is (below), and the size learnt again from
 * the next 413. A webhook's 4xx that refuses what was sent
 * (a 400 or 422 for one malformed or unwanted event; not 401, 403, 404,
 * 405, 407, 408, 410, 413, 421, 425 or 429, which say nothing about the
 * events: see sink_http_refuses) splits the batch: its first half is sent at
 * once, halved again while refused, until one event is refused alone;
 * that one is dropped (counted as rejected, logged with its id and
 * recipient) and the sink moves on with whole batches. A second event
 * dropped with nothing acknowledged since the first waits the backoff
 * first: an endpoint that refuses everything loses one event a backoff,
 * each logged, not its whole backlog at once. 5xx and connection errors
 * are retried.
 *
 * A Redis stream answers each XADD of the pipelined batch alone
 * (sink_redis_settle): the cursor moves past the events up to the first
 * one not in, the events after it that went in are noted (s->done) and
 * left out when the batch is sent again, so no event is in the stream
 * twice but after a crash or a restart. An event refused with a generic
 * -ERR is refused for what it holds: dropped as above when the stream
 * took another event of the same pipeline, or when it was sent alone; a
 * batch refused whole is sent again one event at a time, under the
 * same guard. Any other error (-OOM, -WRONGTYPE, -READONLY, -LOADING,
 * ...: the server or the key takes nothing now) and a lost connection
 * send the events not in again after the backoff, on a new connection.
 *
 * Locks: ev->mu guards every sink's stats, paused flag and stop flag,
 * and the journal's trims (a trim reads every listed sink's stored
 * cursor, where a restart after a crash resumes, and deletes under it,
 * so a reload that takes a sink out to restart it holds the trims until
 * it is back, and a start until its sinks are listed); ev->cond wakes the sink threads
 * (appends, pause, stop) and the pump's gather of commits (stop); the
 * idle pump waits on ev->wake_fd and its port (events_pump.c). A sink's
 * clients and buffers belong to its thread alone.
 */
#include "engine/events.h"

#include <curl/curl.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/dlog.h"
#include "engine/events_int.h"
#include "engine/events_journal.h"
#include "engine/redis_url.h"
#include "queue/queue.h"

_Static_assert(EVENTS_NAME_MAX == JOURNAL_NAME_MAX, "a sink's name is its cursor's");

#define EVK(f) offsetof(struct events_sink_config, f)
const struct conf_key events_sink_keys[] = {
    {"url", CONF_STRING, EVK(url), 1, 2048, NULL,
     "where events go: http://HOST[:PORT]/PATH or https://... (a webhook: batched JSON POSTs), "
     "or redis://[[USER]:PASSWORD@]HOST[:PORT]/STREAM (XADD to STREAM; AUTH with USER, a "
     "Redis 6 ACL user, when given; USER and PASSWORD may be percent-escaped, %40 for '@', "
     "%25 for '%')",
     NULL},
    {"secret", CONF_STRING, EVK(secret), 1, 1024, NULL,
     "key of the " EVENTS_SIG_HEADER " header: sha256= hex HMAC-SHA256 of the " EVENTS_TS_HEADER
     " value, a dot and the body; unset: not signed",
     NULL},
    {"events", CONF_STRING, EVK(events), 0, 1024, "",
     "event types sent, comma separated (reception, delivery, transient_failure, bounce, "
     "expiration, dsn, oob_bounce, complaint, suppressed, shaping_started, shaping_ended, "
     "rejection; "
     "another name is an error); empty: all",
     NULL},
    {"tenants", CONF_STRING, EVK(tenants), 0, 4096, "",
     "tenants sent (the event's tenant field, compared without case as tenant names are), "
     "comma separated; empty: all",
     NULL},
    {"batch_max", CONF_UINT, EVK(batch_max), 1, 10000, "500",
     "events per batch (per POST); a sink has one batch in flight at a time, so an endpoint "
     "that takes T to answer gets at most batch_max events per T (500 in 250ms: 2,000 a "
     "second, the reception and delivery of 1,000 one-recipient messages a second)",
     NULL},
    {"batch_wait", CONF_DURATION, EVK(batch_wait), 0, 60000, "200ms",
     "a batch closes this long after its first event", NULL},
    {"timeout", CONF_DURATION, EVK(timeout), 100, 600000, "10s",
     "per request: connect, send and the endpoint's answer", NULL},
    {"retry_min", CONF_DURATION, EVK(retry_min), 10, 3600000, "1s",
     "wait after a first failed attempt; doubles on each failure", NULL},
    {"retry_max", CONF_DURATION, EVK(retry_max), 10, 3600000, "1m", "ceiling of that wait", NULL},
    {"max_backlog", CONF_SIZE, EVK(max_backlog), 1024 * 1024, 0, "10G",
     "journal kept for this sink while its endpoint is away; past it the oldest events are "
     "dropped for this sink (counted, logged), a journal file at a time: the files are an "
     "eighth of the smallest max_backlog of the sinks (64K to 64M)",
     NULL},
    {"maxlen", CONF_UINT, EVK(maxlen), 0, 4000000000u, "1000000",
     "redis: XADD MAXLEN ~ this (the stream's approximate cap); 0: no cap", NULL},
    {"ca_file", CONF_STRING, EVK(ca_file), 1, 4096, NULL,
     "https: CA bundle that verifies the endpoint; unset: the system's", NULL},
    {"paused", CONF_BOOL, EVK(paused), 0, 0, "no",
     "start paused (sluicectl events resume NAME starts it)", NULL},
    CONF_END,
};

/* ---- config ---- */

int
events_sink_check(const struct events_sink_config *c, char *err, size_t errlen)
{
    if (!journal_name_valid(c->name)) {
        snprintf(err, errlen, "the name must be 1 to %d of A-Z a-z 0-9 _ . - (not first .)",
                 JOURNAL_NAME_MAX);
        return -EINVAL;
    }
    if (c->url == NULL) {
        snprintf(err, errlen, "url: not set");
        return -EINVAL;
    }
    if (strncmp(c->url, "redis://", 8) == 0) {
        struct redis_url u;
        char e[200];
        if (redis_url_split(c->url, REDIS_URL_STREAM, &u, e, sizeof(e)) < 0) {
            snprintf(err, errlen, "url: %s (redis://[[USER]:PASSWORD@]HOST[:PORT]/STREAM)", e);
            return -EINVAL;
        }
    } else if (strncmp(c->url, "http://", 7) != 0 && strncmp(c->url, "https://", 8) != 0) {
        snprintf(err, errlen, "url: expected http://, https:// or redis://");
        return -EINVAL;
    }
    if (c->retry_max < c->retry_min) {
        snprintf(err, errlen, "retry_max is below retry_min");
        return -EINVAL;
    }
    /* A name no event has (a typo, or the daemon log's "delivered") would
     * filter out, for good, every event it was meant to pass. */
    for (const char *p = c->events != NULL ? c->events : ""; *p != '\0';) {
        while (*p == ' ' || *p == ',' || *p == '\t')
            p++;
        const char *e = p;
        while (*e != '\0' && *e != ',' && *e != ' ' && *e != '\t')
            e++;
        if (e == p)
            break;
        /* The names are the delivery log's (dlog_kind_str: "unknown"
         * past the last), listed in the error from there too. */
        bool known = false;
        char names[512] = "";
        size_t nl = 0;
        for (int k = 0; !known; k++) {
            const char *name = dlog_kind_str((enum dlog_kind)k);
            if (strcmp(name, "unknown") == 0)
                break;
            known = strlen(name) == (size_t)(e - p) && memcmp(name, p, (size_t)(e - p)) == 0;
            int w = snprintf(names + nl, sizeof(names) - nl, "%s%s", k ? ", " : "", name);
            if (w > 0 && (size_t)w < sizeof(names) - nl)
                nl += (size_t)w;
        }
        if (!known) {
            snprintf(err, errlen, "events: unknown event type '%.*s' (%s)",
                     (int)(e - p > 64 ? 64 : e - p), p, names);
            return -EINVAL;
        }
        p = e;
    }
    return 0;
}

/* ---- batches ---- */

/* Whether list (comma separated; "" matches all) names the n octets at v
 * (without case when nocase: tenant names compare so everywhere else). */
static bool
list_has(const char *list, const char *v, size_t n, bool nocase)
{
    if (list == NULL || list[0] == '\0')
        return true;
    const char *p = list;
    while (*p != '\0') {
        while (*p == ' ' || *p == ',' || *p == '\t')
            p++;
        const char *e = p;
        while (*e != '\0' && *e != ',' && *e != ' ' && *e != '\t')
            e++;
        if ((size_t)(e - p) == n && n > 0 &&
            (nocase ? strncasecmp(p, v, n) : memcmp(p, v, n)) == 0)
            return true;
        p = e;
    }
    return false;
}

/* The end of the JSON string that starts after its opening quote at p
 * (its closing quote), or NULL. */
static const char *
string_end(const char *p, const char *end)
{
    while (p < end && *p != '"')
        p += *p == '\\' ? 2 : 1;
    return p < end ? p : NULL;
}

const char *
events_line_field(const char *line, size_t len, const char *key, size_t *vlen)
{
    size_t klen = strlen(key);
    const char *end = line + len;
    int depth = 0;
    bool at_key = false; /* the next string at depth 1 is a member's name */
    for (const char *p = line; p < end; p++) {
        if (*p == '"') {
            const char *s = p + 1, *e = string_end(s, end);
            if (e == NULL)
                return NULL;
            p = e;
            if (depth != 1 || !at_key)
                continue;
            at_key = false;
            if ((size_t)(e - s) != klen || memcmp(s, key, klen) != 0 || e + 2 >= end ||
                e[1] != ':' || e[2] != '"')
                continue;
            const char *ve = string_end(e + 3, end);
            if (ve == NULL)
                return NULL;
            *vlen = (size_t)(ve - (e + 3));
            return e + 3;
        }
        if (*p == '{' || *p == '[') {
            depth++;
            at_key = *p == '{';
        } else if (*p == '}' || *p == ']') {
            depth--;
        } else if (*p == ',' && depth == 1) {
            at_key = true;
        }
    }
    return NULL;
}

static bool
sink_wants(const struct sink *s, const char *line, size_t len)
{
    size_t n = 0;
    const char *v;
    if (s->cfg.events != NULL && s->cfg.events[0] != '\0') {
        v = events_line_field(line, len, "event", &n);
        if (v == NULL || !list_has(s->cfg.events, v, n, false))
            return false;
    }
    if (s->cfg.tenants != NULL && s->cfg.tenants[0] != '\0') {
        v = events_line_field(line, len, "tenant", &n);
        if (v == NULL || !list_has(s->cfg.tenants, v, n, true))
            return false;
    }
    return true;
}

/* Unix ms of a line's "time" (RFC 3339, UTC, ms), 0 when unreadable. */
static uint64_t
line_time_ms(const char *line, size_t len)
{
    size_t n;
    const char *v = events_line_field(line, len, "time", &n);
    struct tm tm = {0};
    int ms = 0;
    if (v == NULL || n < 20 ||
        sscanf(v, "%4d-%2d-%2dT%2d:%2d:%2d.%3d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
               &tm.tm_min, &tm.tm_sec, &ms) < 6)
        return 0;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t t = timegm(&tm);
    return t < 0 ? 0 : (uint64_t)t * 1000 + (uint64_t)ms;
}

/* Frame one line as {"event_id":"NODE-SEQ", ...the line's members}. */
static void
batch_add(struct sink *s, const char *line, size_t len, uint64_t seq)
{
    struct json *b = &s->body;
    if (s->nlines > 0)
        json_raw(b, ",", 1);
    s->offs[s->nlines] = b->len;
    char head[FRAME_MAX];
    int hn = snprintf(head, sizeof(head), "{\"event_id\":\"%s-%" PRIu64 "\"",
                      journal_id(s->ev->journal), seq);
    json_raw(b, head, (size_t)hn);
    /* line is "{...}\n": its members follow a comma. */
    if (len > 3) {
        json_raw(b, ",", 1);
        json_raw(b, line + 1, len - 2);
    } else {
        json_raw(b, "}", 1);
    }
    s->lens[s->nlines] = b->len - s->offs[s->nlines];
    s->seqs[s->nlines] = seq;
    s->nlines++;
}

/*
 * Gather the batch that starts at from into body (a JSON array): up to
 * max_lines events the filter wants, max_bytes of them (the first
 * event whatever its size), or what the journal holds. s->next is where the cursor goes once it is
 * acknowledged (past filtered events too). Returns 0 or -errno.
 */
static int
batch_gather(struct sink *s, const struct journal_pos *from, uint64_t *filtered, uint64_t *skipped,
             uint64_t *first_ms)
{
    struct journal_pos pos = *from;
    json_reset(&s->body);
    json_raw(&s->body, "[", 1);
    s->nlines = 0;
    *first_ms = 0;
    /* what the cursor passed is behind: no longer left out */
    unsigned gone = 0;
    while (gone < s->ndone && s->done[gone] < pos.seq)
        gone++;
    memmove(s->done, s->done + gone, (s->ndone - gone) * sizeof(s->done[0]));
    s->ndone -= gone;
    unsigned next_done = 0;
    bool full = false;
    while (!full) {
        long n = journal_read(s->ev->journal, &pos, s->rbuf, READ_BUF, &s->fd, &s->fd_seg, skipped);
        if (n < 0)
            return (int)n;
        if (n == 0)
            break;
        const char *p = s->rbuf, *end = s->rbuf + n;
        while (p < end) {
            if (s->nlines == s->max_lines || (s->split_lines > 0 && s->nlines == s->split_lines) ||
                (s->ndone > 0 && pos.seq >= s->done_end)) {
                full = true;
                break;
            }
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            size_t len = (size_t)(nl - p) + 1;
            while (next_done < s->ndone && s->done[next_done] < pos.seq)
                next_done++;
            if (next_done < s->ndone && s->done[next_done] == pos.seq) {
                /* in the stream already, or dropped: a part of a batch
                 * taken in part (sink_redis_settle) */
                pos.off += len;
                pos.seq++;
                p = nl + 1;
                continue;
            }
            bool wanted = sink_wants(s, p, len);
            /* framed: the line, its event_id member (under FRAME_MAX),
             * a comma and the closing bracket */
            if (wanted && s->nlines > 0 && s->body.len + len + FRAME_MAX + 2 > s->max_bytes) {
                full = true;
                break;
            }
            if (*first_ms == 0)
                *first_ms = line_time_ms(p, len);
            if (wanted) {
                s->marks[s->nlines] = (struct batch_mark){pos, *filtered};
                batch_add(s, p, len, pos.seq);
            } else
                (*filtered)++;
            pos.off += len;
            pos.seq++;
            p = nl + 1;
        }
    }
    json_raw(&s->body, "]", 1);
    s->next = pos;
    return json_failed(&s->body) ? -ENOMEM : 0;
}

/* ---- the sink thread ---- */

/* Wait on ev->cond until the monotonic deadline (ms) or a signal; mu held. */
void
events_wait_until(struct events *ev, uint64_t deadline_ms)
{
    struct timespec ts = {.tv_sec = (time_t)(deadline_ms / 1000),
                          .tv_nsec = (long)(deadline_ms % 1000 * 1000000)};
    pthread_cond_timedwait(&ev->cond, &ev->mu, &ts);
}

static void sink_store_cursor(struct sink *s, const struct journal_pos *pos);

/* Delete the segments every sink passed. By the cursors on disk, not
 * those in memory, which a busy sink stores once a CURSOR_SYNC_MS: a
 * crash restarts each sink from its stored cursor, and the events after
 * it must still be there. Not while a reload restarts sinks: one it took
 * out of the list to stop it would not count, and it resumes from its
 * cursor. */
void
events_trim(struct events *ev)
{
    struct journal_pos keep = {UINT64_MAX, UINT64_MAX};
    pthread_mutex_lock(&ev->mu);
    if (!ev->trim_held) {
        for (unsigned i = 0; i < ev->nsinks; i++)
            if (ev->sinks[i]->stored.off < keep.off)
                keep = ev->sinks[i]->stored;
        /* under mu: the list cannot change between the two */
        journal_trim(ev->journal, &keep);
    }
    pthread_mutex_unlock(&ev->mu);
}

/* Move the cursor past what max_backlog allows; mu held. Returns
 * whether it moved (then the caller stores it and trims, without mu). */
static bool
sink_cap_backlog(struct sink *s, const struct journal_pos *end)
{
    if (end->off - s->cursor.off <= s->cfg.max_backlog)
        return false;
    struct journal_pos np;
    journal_pos_within(s->ev->journal, s->cfg.max_backlog, &np);
    if (np.off <= s->cursor.off)
        return false;
    uint64_t lost = np.seq - s->cursor.seq;
    s->st.dropped += lost;
    log_msg(LOG_ERR,
            "event=events_backlog_dropped sink=%s events=%" PRIu64 " max_backlog=%" PRIu64
            " note=endpoint_away_too_long",
            s->cfg.name, lost, s->cfg.max_backlog);
    s->cursor = np;
    s->oldest_ms = 0;
    return true;
}

/* After sink_cap_backlog moved the cursor: store it, drop the segments
 * nobody needs. Called with mu held; drops it meanwhile. */
static void
sink_after_cap(struct sink *s)
{
    struct journal_pos pos = s->cursor;
    pthread_mutex_unlock(&s->ev->mu);
    sink_store_cursor(s, &pos);
    events_trim(s->ev);
    pthread_mutex_lock(&s->ev->mu);
}

/* Store the cursor pos on disk; mu not held. */
static void
sink_store_cursor(struct sink *s, const struct journal_pos *pos)
{
    int rc = journal_cursor_store(s->ev->journal, s->cfg.name, pos);
    if (rc < 0)
        log_msg(LOG_ERR, "event=events_cursor_store_failed sink=%s err=\"%s\"", s->cfg.name,
                strerror(-rc));
    /* Failed too: a cursor that cannot be stored (a full disk) does not
     * hold back the trims, which free the space the disk needs. */
    pthread_mutex_lock(&s->ev->mu);
    s->stored = *pos;
    pthread_mutex_unlock(&s->ev->mu);
}

/* The time of the first event after the cursor, for the stats of a sink
 * that reads nothing meanwhile (paused). mu held; dropped meanwhile. */
static void
sink_peek_oldest(struct sink *s)
{
    struct journal_pos pos = s->cursor;
    uint64_t at = pos.seq, skipped = 0, ms = 0;
    pthread_mutex_unlock(&s->ev->mu);
    long n = journal_read(s->ev->journal, &pos, s->rbuf, READ_BUF, &s->fd, &s->fd_seg, &skipped);
    if (n > 0) {
        const char *nl = memchr(s->rbuf, '\n', (size_t)n);
        ms = line_time_ms(s->rbuf, (size_t)(nl - s->rbuf) + 1);
    }
    pthread_mutex_lock(&s->ev->mu);
    if (s->cursor.seq == at)
        s->oldest_ms = ms;
}

/* Log event i of the batch, dropped: its endpoint refused it alone,
 * with a status (a webhook) or a reply (Redis: s->refusal). */
static void
sink_log_rejected(const struct sink *s, unsigned i, long status)
{
    const char *ev = s->body.buf + s->offs[i];
    size_t len = s->lens[i];
    char type[32] = "", id[64] = "", rcpt[320] = "";
    struct {
        const char *key;
        char *out;
        size_t cap;
    } f[] = {{"event", type, sizeof(type)}, {"id", id, sizeof(id)}, {"rcpt", rcpt, sizeof(rcpt)}};
    for (size_t k = 0; k < sizeof(f) / sizeof(f[0]); k++) {
        size_t n = 0;
        const char *v = events_line_field(ev, len, f[k].key, &n);
        if (v != NULL)
            snprintf(f[k].out, f[k].cap, "%.*s", (int)(n < f[k].cap ? n : f[k].cap - 1), v);
    }
    if (s->kind == SINK_REDIS)
        log_msg(LOG_ERR,
                "event=events_rejected sink=%s reply=\"%.100s\" event_id=%s-%" PRIu64
                " type=%s id=%s rcpt=<%s> note=dropped_refused_alone",
                s->cfg.name, s->refusal, journal_id(s->ev->journal), s->seqs[i],
                type[0] ? type : "-", id[0] ? id : "-", rcpt);
    else
        log_msg(LOG_ERR,
                "event=events_rejected sink=%s status=%ld event_id=%s-%" PRIu64
                " type=%s id=%s rcpt=<%s> note=dropped_refused_alone",
                s->cfg.name, status, journal_id(s->ev->journal), s->seqs[i], type[0] ? type : "-",
                id[0] ? id : "-", rcpt);
}

/* What became of a Redis batch that was not taken whole. */
struct xadd_settled {
    struct journal_pos ack; /* the cursor: past every event dealt with from the batch's start */
    uint64_t filtered;      /* events the filter left out before ack */
    unsigned in;            /* events in the stream (counted as sent) */
    unsigned dropped;       /* events refused and dropped (logged here) */
};

/*
 * A Redis batch that was not taken whole (sink_redis_send, s->fates):
 * the replies say which events are in, so none of those is sent again.
 * An event refused for what it holds (XADD_REFUSED) while the stream
 * took another of the same pipeline is dropped (rejected); alone in its
 * batch too. The cursor moves past the events dealt with from the
 * batch's start; those dealt with after the first that was not are
 * noted in s->done, and the batch sent again leaves them out. Returns
 * 0 when every event was dealt with, HTTP_REFUSED when nothing went in
 * and refusals alone are left (one event: dropped by the caller; more:
 * sent again one at a time, so that each is refused alone), or -1 when
 * some are to be sent again after the backoff.
 */
static int
sink_redis_settle(struct sink *s, struct xadd_settled *out)
{
    unsigned in = 0, retry = 0;
    for (unsigned i = 0; i < s->nlines; i++) {
        in += s->fates[i] == XADD_IN;
        retry += s->fates[i] == XADD_RETRY;
    }
    out->in = in;
    out->dropped = 0;
    if (in == 0 && retry == 0)
        return HTTP_REFUSED; /* the caller drops one alone, or sends several one by one */
    unsigned first = s->nlines, later = 0; /* the first event not dealt with; those after */
    for (unsigned i = 0; i < s->nlines; i++) {
        if (s->fates[i] == XADD_REFUSED && in > 0) {
            sink_log_rejected(s, i, 0);
            s->fates[i] = XADD_IN; /* dealt with: dropped */
            out->dropped++;
        }
        if (s->fates[i] != XADD_IN && first == s->nlines)
            first = i;
        else if (s->fates[i] == XADD_IN && first < s->nlines)
            later++;
    }
    /* Merged into s->done (ascending; the batch left out the numbers it
     * holds, so none is there twice). Every number there lies between the
     * cursor and done_end, in one batch's span: batch_max at most. */
    if (later > 0 && s->ndone + later <= s->cfg.batch_max) {
        if (s->ndone == 0)
            s->done_end = s->next.seq;
        unsigned w = s->ndone + later, k = s->ndone;
        for (unsigned i = s->nlines; i-- > first + 1;) {
            if (s->fates[i] != XADD_IN)
                continue;
            while (k > 0 && s->done[k - 1] > s->seqs[i])
                s->done[--w] = s->done[--k];
            s->done[--w] = s->seqs[i];
        }
        s->ndone += later;
    }
    if (first == s->nlines) {
        out->ack = s->next;
        out->filtered = UINT64_MAX; /* all of them: the caller's count */
        return 0;
    }
    out->ack = s->marks[first].at;
    out->filtered = s->marks[first].filtered;
    return -1;
}

/* This sink is to stop (all, or it alone); ev->mu held. */
#define SINK_STOP(s) ((s)->ev->stop || (s)->stop)

static void *
sink_main(void *arg)
{
    struct sink *s = arg;
    struct events *ev = s->ev;
    log_altstack_init();
    char name[16];
    snprintf(name, sizeof(name), "ev-%.12s", s->cfg.name);
    log_set_thread_name(name);
    uint64_t first_seen = 0, backoff = 0, last_store = 0;
    char err[EVENTS_ERROR_MAX];
    bool failing = false, dirty = false;

    pthread_mutex_lock(&ev->mu);
    for (;;) {
        struct journal_pos end;
        journal_end(ev->journal, &end);
        while (!SINK_STOP(s) && (s->st.paused || end.seq <= s->cursor.seq)) {
            first_seen = 0;
            uint64_t seen = ev->appends;
            while (!SINK_STOP(s) && seen == ev->appends && !s->st.paused) {
                events_wait_until(ev, clock_mono_ms() + 1000);
                /* a move of the journal's end told to nobody waits a
                 * second at most */
                journal_end(ev->journal, &end);
                if (end.seq > s->cursor.seq)
                    break;
            }
            if (s->st.paused && !SINK_STOP(s))
                events_wait_until(ev, clock_mono_ms() + 1000);
            journal_end(ev->journal, &end);
            if (s->st.paused && sink_cap_backlog(s, &end))
                sink_after_cap(s); /* a paused sink's backlog is bounded too */
            if (s->st.paused && !SINK_STOP(s) && s->oldest_ms == 0 && end.seq > s->cursor.seq)
                sink_peek_oldest(s); /* its lag, on the stats */
        }
        if (SINK_STOP(s))
            break;
        if (sink_cap_backlog(s, &end))
            sink_after_cap(s);
        uint64_t now = clock_mono_ms();
        if (first_seen == 0)
            first_seen = now;
        /* A batch closes at batch_max events or batch_wait after the
         * first: wait for either (a backlog, or the rest of a refused
         * batch being split, sends at once). */
        while (!SINK_STOP(s) && !s->st.paused && s->split_lines == 0 &&
               end.seq - s->cursor.seq < s->max_lines && now < first_seen + s->cfg.batch_wait) {
            events_wait_until(ev, first_seen + s->cfg.batch_wait);
            journal_end(ev->journal, &end);
            now = clock_mono_ms();
        }
        if (SINK_STOP(s))
            break;
        if (s->st.paused)
            continue;
        struct journal_pos from = s->cursor;
        pthread_mutex_unlock(&ev->mu);

        uint64_t filtered = 0, skipped = 0, first_ms = 0;
        int rc = batch_gather(s, &from, &filtered, &skipped, &first_ms);
        if (first_ms != 0) {
            /* the oldest pending event, while the batch is on its way */
            pthread_mutex_lock(&ev->mu);
            s->oldest_ms = first_ms;
            pthread_mutex_unlock(&ev->mu);
        }
        int sent = -1;
        long status = 0;
        err[0] = '\0';
        if (rc < 0)
            snprintf(err, sizeof(err), "journal read: %s", strerror(-rc));
        else if (s->nlines == 0)
            sent = 0;
        else if (s->kind == SINK_HTTP)
            sent = sink_http_send(s, &status, err, sizeof(err));
        else
            sent = sink_redis_send(s, err, sizeof(err));
        /* What the endpoint took: the whole batch, or (Redis) a part. */
        struct xadd_settled part = {sent == 0 ? s->next : from, UINT64_MAX,
                                    sent == 0 ? s->nlines : 0, 0};
        if (s->kind == SINK_REDIS && rc == 0 && sent < 0)
            sent = sink_redis_settle(s, &part);
        /* One event refused alone: the poison of a refused batch, or one
         * event over the endpoint's body limit (a 413 to it alone). */
        bool reject = (sent == HTTP_REFUSED || sent == HTTP_TOO_LARGE) && s->nlines == 1;
        if (reject)
            part.ack = s->next;
        bool acked = sent == 0 || reject || part.ack.seq > from.seq;
        if (acked) {
            /* The cursor goes to disk when the sink is idle, else once a
             * CURSOR_SYNC_MS: two fsyncs a batch would bound a backlog's
             * catch-up, and a crash re-sends at most that much. */
            struct journal_pos now_end;
            journal_end(ev->journal, &now_end);
            uint64_t t = clock_mono_ms();
            if (now_end.seq <= part.ack.seq || t - last_store >= CURSOR_SYNC_MS) {
                sink_store_cursor(s, &part.ack);
                last_store = t;
                dirty = false;
            } else {
                dirty = true;
            }
        }

        pthread_mutex_lock(&ev->mu);
        s->st.dropped += skipped;
        s->st.sent += part.in;
        s->st.rejected += part.dropped;
        if (part.in > 0)
            s->rejected_last = false;
        if (acked) {
            s->st.filtered += part.filtered == UINT64_MAX ? filtered : part.filtered;
            s->cursor = part.ack;
            s->oldest_ms = 0;
            first_seen = 0;
            if (s->split_lines > 0 && (reject || s->cursor.seq >= s->split_end))
                s->split_lines = 0; /* the refused batch is behind: whole batches again */
        }
        if (sent == 0) {
            s->st.batches += s->nlines > 0;
            backoff = 0;
            if (failing)
                log_msg(LOG_NOTICE, "event=events_sink_recovered sink=%s", s->cfg.name);
            failing = false;
            pthread_mutex_unlock(&ev->mu);
            events_trim(ev);
            pthread_mutex_lock(&ev->mu);
            continue;
        }
        s->st.failed++;
        snprintf(s->st.last_error, sizeof(s->st.last_error), "%s", err);
        if (reject) {
            s->st.rejected++;
            sink_log_rejected(s, 0, status);
            if (sent == HTTP_TOO_LARGE) {
                /* The batches were halved down to it: the size is learnt
                 * again from the next 413, not kept at one event. */
                s->max_lines = s->cfg.batch_max;
                s->max_bytes = EVENTS_BATCH_BYTES;
            }
            bool again = s->rejected_last;
            s->rejected_last = true;
            pthread_mutex_unlock(&ev->mu);
            events_trim(ev);
            pthread_mutex_lock(&ev->mu);
            if (!again)
                continue;
            /* Nothing acknowledged since the last event dropped: the
             * endpoint may refuse everything; it does not get the next
             * before the backoff. */
            backoff = backoff == 0 ? s->cfg.retry_min : backoff * 2;
            if (backoff > s->cfg.retry_max)
                backoff = s->cfg.retry_max;
            uint64_t until = clock_mono_ms() + backoff;
            while (!SINK_STOP(s) && clock_mono_ms() < until)
                events_wait_until(ev, until);
            continue;
        }
        if (sent == HTTP_REFUSED) {
            /* Refused for what it holds: its first half, at once, until
             * the event refused is alone. */
            if (s->split_lines == 0)
                s->split_end = s->next.seq;
            /* Redis answered each event: they go one at a time, so that
             * each is refused alone (or taken) */
            s->split_lines = s->kind == SINK_REDIS ? 1 : s->nlines / 2;
            log_msg(LOG_NOTICE,
                    "event=events_batch_split sink=%s status=%ld err=\"%s\" events=%u "
                    "first_seq=%" PRIu64 " next_events=%u",
                    s->cfg.name, status, err, s->nlines, s->seqs[0], s->split_lines);
            continue;
        }
        if (sent == HTTP_TOO_LARGE && s->nlines > 1) {
            /* Over the endpoint's body limit: half as much, at once. */
            s->max_lines = s->nlines / 2;
            s->max_bytes = s->body.len / 2;
            log_msg(LOG_WARN,
                    "event=events_batch_smaller sink=%s status=413 events=%u bytes=%zu "
                    "max_events=%u max_bytes=%zu",
                    s->cfg.name, s->nlines, s->body.len, s->max_lines, s->max_bytes);
            continue;
        }
        backoff = backoff == 0 ? s->cfg.retry_min : backoff * 2;
        if (backoff > s->cfg.retry_max)
            backoff = s->cfg.retry_max;
        /* the endpoint's Retry-After, when longer, up to retry_max */
        if (s->retry_after_ms > backoff)
            backoff = s->retry_after_ms < s->cfg.retry_max ? s->retry_after_ms : s->cfg.retry_max;
        if (!failing)
            log_msg(LOG_WARN,
                    "event=events_sink_failing sink=%s err=\"%s\" retry_ms=%" PRIu64
                    " note=kept_in_journal",
                    s->cfg.name, err, backoff);
        failing = true;
        uint64_t until = clock_mono_ms() + backoff;
        while (!SINK_STOP(s) && clock_mono_ms() < until)
            events_wait_until(ev, until);
    }
    struct journal_pos last = s->cursor;
    pthread_mutex_unlock(&ev->mu);
    if (dirty)
        sink_store_cursor(s, &last);
    return NULL;
}

/* ---- the module ---- */

static void
sink_fini(struct sink *s)
{
    if (s->fd >= 0)
        close(s->fd);
    free(s->rbuf);
    free(s->offs);
    free(s->lens);
    free(s->seqs);
    free(s->marks);
    free(s->fates);
    free(s->done);
    json_fini(&s->body);
    if (s->curl != NULL)
        curl_easy_cleanup(s->curl);
    curl_slist_free_all(s->headers);
    sink_redis_drop(s);
    conf_free(events_sink_keys, &s->cfg);
    free(s->cfg.name);
}

static int
sink_init(struct events *ev, struct sink *s, const struct events_sink_config *c, char *err,
          size_t errlen)
{
    s->ev = ev;
    s->fd = -1;
    s->redis_fd = -1;
    json_init(&s->body);
    int crc = conf_copy(events_sink_keys, &s->cfg, c, sizeof(*c));
    s->cfg.name = NULL; /* not a key: copied below */
    if (crc < 0 || (s->cfg.name = strdup(c->name)) == NULL) {
        snprintf(err, errlen, "[events %s]: out of memory", c->name);
        return -ENOMEM;
    }
    unsigned bm = c->batch_max;
    s->max_lines = bm;
    s->max_bytes = EVENTS_BATCH_BYTES;
    s->rbuf = malloc(READ_BUF);
    s->offs = calloc(bm, sizeof(*s->offs));
    s->lens = calloc(bm, sizeof(*s->lens));
    s->seqs = calloc(bm, sizeof(*s->seqs));
    s->marks = calloc(bm, sizeof(*s->marks));
    s->fates = calloc(bm, sizeof(*s->fates));
    s->done = calloc(bm, sizeof(*s->done));
    if (s->rbuf == NULL || s->offs == NULL || s->lens == NULL || s->seqs == NULL ||
        s->marks == NULL || s->fates == NULL || s->done == NULL) {
        snprintf(err, errlen, "[events %s]: out of memory", c->name);
        return -ENOMEM;
    }
    snprintf(s->st.name, sizeof(s->st.name), "%s", c->name);
    s->st.paused = c->paused;
    if (strncmp(c->url, "redis://", 8) == 0) {
        s->kind = SINK_REDIS;
        snprintf(s->st.kind, sizeof(s->st.kind), "redis");
        struct redis_url u;
        char e[200];
        if (redis_url_split(c->url, REDIS_URL_STREAM, &u, e, sizeof(e)) < 0) {
            snprintf(err, errlen, "[events %s]: url: %s", c->name, e);
            return -EINVAL;
        }
        _Static_assert(sizeof(s->host) == sizeof(u.host) && sizeof(s->stream) == sizeof(u.path) &&
                           sizeof(s->user) == sizeof(u.user) &&
                           sizeof(s->password) == sizeof(u.password),
                       "a sink holds a redis_url's parts");
        memcpy(s->host, u.host, sizeof(s->host));
        memcpy(s->stream, u.path, sizeof(s->stream));
        memcpy(s->user, u.user, sizeof(s->user));
        memcpy(s->password, u.password, sizeof(s->password));
        s->port = u.port;
    } else {
        s->kind = SINK_HTTP;
        snprintf(s->st.kind, sizeof(s->st.kind), "http");
        if (sink_http_init(s) < 0) {
            snprintf(err, errlen, "[events %s]: cannot make an HTTP client", c->name);
            return -ENOMEM;
        }
    }
    uint64_t lost = 0;
    int rc = journal_cursor_load(ev->journal, c->name, &s->cursor, &lost);
    if (rc < 0) {
        snprintf(err, errlen, "[events %s]: cannot read its cursor: %s", c->name, strerror(-rc));
        return rc;
    }
    s->stored = s->cursor;
    if (lost > 0) {
        /* Removed (by a reload, or from the config across a restart)
         * while the other sinks moved on: the journal was trimmed
         * behind them, not kept for it. The cursor it resumes from is
         * stored at once: the next start does not count them again. */
        s->st.dropped = lost;
        log_msg(LOG_ERR,
                "event=events_backlog_dropped sink=%s events=%" PRIu64
                " note=trimmed_while_the_sink_was_away",
                c->name, lost);
        sink_store_cursor(s, &s->cursor);
    }
    return 0;
}

/* Start s's thread; mu not held. */
static int
sink_start(struct sink *s, char *err, size_t errlen)
{
    int rc = pthread_create(&s->thread, NULL, sink_main, s);
    if (rc != 0) {
        snprintf(err, errlen, "[events %s]: cannot start its thread: %s", s->cfg.name,
                 strerror(rc));
        return -rc;
    }
    s->started = true;
    struct journal_pos end;
    journal_end(s->ev->journal, &end);
    uint64_t head = end.seq; /* as events_stats counts: the spool's on their way too */
    if (s->ev->queue != NULL && queue_events_durable(s->ev->queue) > head)
        head = queue_events_durable(s->ev->queue);
    log_msg(LOG_INFO, "event=events_sink_start sink=%s kind=%s pending=%" PRIu64 " paused=%s",
            s->cfg.name, s->st.kind, head > s->cursor.seq ? head - s->cursor.seq : 0,
            s->st.paused ? "yes" : "no");
    return 0;
}

/* A new sink for c, not started; NULL with a message in err. */
static struct sink *
sink_new(struct events *ev, const struct events_sink_config *c, char *err, size_t errlen)
{
    struct sink *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        snprintf(err, errlen, "[events %s]: out of memory", c->name);
        return NULL;
    }
    atomic_init(&s->quit, false);
    if (sink_init(ev, s, c, err, errlen) < 0) {
        sink_fini(s);
        free(s);
        return NULL;
    }
    return s;
}

/* SLUICE_TEST_EVENTS_SEGMENT=BYTES: journal segments of that size
 * (tests of rollover and trimming without 64 MB of events). Only in
 * builds with test hooks (SLUICE_TESTS=ON); 0: the default. */
static size_t
test_hook_segment_max(void)
{
#ifdef SLUICE_TEST_HOOKS
    const char *v = getenv("SLUICE_TEST_EVENTS_SEGMENT");
    char *end;
    unsigned long long n = v != NULL && *v != '\0' ? strtoull(v, &end, 10) : 0;
    if (n > 0 && *end == '\0') {
        log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_EVENTS_SEGMENT bytes=%llu", n);
        return (size_t)n;
    }
#endif
    return 0;
}

/* SLUICE_TEST_EVENTS_TRIM_RETRY_MS=MS: the pump's first wait after a
 * failed trim of the spool, instead of PUMP_RETRY_MS (the longest is
 * scaled alike: 60 times it), so that a test sees the backoff double and
 * reach its cap in a second or two. Test-hook builds only. */
static unsigned
test_hook_trim_retry_ms(void)
{
#ifdef SLUICE_TEST_HOOKS
    const char *v = getenv("SLUICE_TEST_EVENTS_TRIM_RETRY_MS");
    char *end;
    unsigned long n = v != NULL && *v != '\0' ? strtoul(v, &end, 10) : 0;
    if (n > 0 && n <= PUMP_RETRY_MS && *end == '\0') {
        log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_EVENTS_TRIM_RETRY_MS ms=%lu", n);
        return (unsigned)n;
    }
#endif
    return PUMP_RETRY_MS;
}

/* SLUICE_TEST_EVENTS_GATHER_MS=MS: the pump's gather of commits before an
 * append, instead of PUMP_GATHER_MS (a test makes it long enough that
 * its commits surely fall in one). Test-hook builds only. */
static unsigned
test_hook_gather_ms(void)
{
#ifdef SLUICE_TEST_HOOKS
    const char *v = getenv("SLUICE_TEST_EVENTS_GATHER_MS");
    char *end;
    unsigned long n = v != NULL && *v != '\0' ? strtoul(v, &end, 10) : 0;
    if (n > 0 && n <= 10000 && *end == '\0') {
        log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_EVENTS_GATHER_MS ms=%lu", n);
        return (unsigned)n;
    }
#endif
    return PUMP_GATHER_MS;
}

/* The journal's segment size for these sinks: an eighth of the smallest
 * max_backlog, 64 KB to 64 MB. A backlog is cut a whole segment at a
 * time (the oldest ones): with segments larger than the cap, the last
 * one alone could hold more than the cap and nothing was ever dropped.
 * The pump moves no more than that per append (one append is in one
 * segment); the test hook sets the segments alone. */
static void
size_segments(struct events *ev, const struct events_sink_config *sinks, unsigned n)
{
    uint64_t seg = JOURNAL_SEGMENT_DEFAULT;
    for (unsigned i = 0; i < n; i++)
        if (sinks[i].max_backlog / 8 < seg)
            seg = sinks[i].max_backlog / 8;
    if (seg < 64 * 1024)
        seg = 64 * 1024;
    atomic_store(&ev->pump_bytes, seg < PUMP_BYTES ? (size_t)seg : PUMP_BYTES);
    size_t hook = test_hook_segment_max();
    journal_set_segment_max(ev->journal, hook > 0 ? hook : (size_t)seg);
}

int
events_new(const struct events_sink_config *sinks, unsigned n, const char *dir, struct queue *q,
           struct events **out, char *err, size_t errlen)
{
    *out = NULL;
    if (n == 0)
        return 0;
    if (n > EVENTS_SINKS_MAX) {
        snprintf(err, errlen, "at most %d [events] sections", EVENTS_SINKS_MAX);
        return -EINVAL;
    }
    /* Not thread-safe: here, before any sink thread, once per process
     * (curl counts the calls). */
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        snprintf(err, errlen, "events: libcurl did not initialise");
        return -ENOMEM;
    }
    struct events *ev = calloc(1, sizeof(*ev));
    if (ev == NULL) {
        curl_global_cleanup();
        snprintf(err, errlen, "events: out of memory");
        return -ENOMEM;
    }
    atomic_init(&ev->stopping, false);
    ev->wake_fd = -1;
    pthread_mutex_init(&ev->mu, NULL);
    clock_cond_init_mono(&ev->cond);
    ev->queue = q;
    int rc = journal_open(dir, 0, &ev->journal, err, errlen);
    if (rc < 0)
        goto fail;
    size_segments(ev, sinks, n);
    if ((ev->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
        rc = -errno;
        snprintf(err, errlen, "events: cannot make the pump's eventfd: %s", strerror(errno));
        goto fail;
    }
    if ((ev->port = queue_port_new()) == NULL) {
        rc = -errno;
        snprintf(err, errlen, "events: cannot make a spool port: %s", strerror(errno));
        goto fail;
    }
    /* The spool numbers its event lines on from the journal's end (a
     * journal ahead of a spool made anew, or of one from before the
     * events database), so that a number names one event for ever. */
    struct journal_pos jend;
    journal_end(ev->journal, &jend);
    queue_events_floor(q, jend.seq);
    queue_events_set_hook(q, events_pump_wake, ev);
    /* No trim until the sinks are listed: the pump copies what the spool
     * holds (a crash's backlog) at once, and its trim would take no
     * sink's cursor into account, deleting every segment but the last. */
    ev->trim_held = true;
    ev->trim_retry_ms = test_hook_trim_retry_ms();
    ev->gather_ms = test_hook_gather_ms();
    if ((rc = pthread_create(&ev->pump, NULL, events_pump_main, ev)) != 0) {
        snprintf(err, errlen, "events: cannot start the pump thread: %s", strerror(rc));
        rc = -rc;
        goto fail;
    }
    ev->pump_started = true;
    for (unsigned i = 0; i < n; i++) {
        struct sink *s = sink_new(ev, &sinks[i], err, errlen);
        if (s == NULL) {
            rc = -EINVAL;
            goto fail;
        }
        pthread_mutex_lock(&ev->mu);
        ev->sinks[ev->nsinks++] = s;
        pthread_mutex_unlock(&ev->mu);
        if ((rc = sink_start(s, err, errlen)) < 0)
            goto fail;
    }
    pthread_mutex_lock(&ev->mu);
    ev->trim_held = false;
    pthread_mutex_unlock(&ev->mu);
    events_trim(ev);
    *out = ev;
    return 0;
fail:
    events_free(ev);
    return rc;
}

struct events *
events_free(struct events *ev)
{
    return events_free_busy(ev, NULL);
}

struct events *
events_free_busy(struct events *ev, bool *spool_busy)
{
    if (spool_busy != NULL)
        *spool_busy = false;
    if (ev == NULL)
        return NULL;
    atomic_store(&ev->stopping, true);
    pthread_mutex_lock(&ev->mu);
    ev->stop = true;
    for (unsigned i = 0; i < ev->nsinks; i++)
        sink_abort_locked(ev->sinks[i]);
    pthread_cond_broadcast(&ev->cond);
    pthread_mutex_unlock(&ev->mu);
    if (ev->wake_fd >= 0)
        events_pump_kick(ev);
    for (unsigned i = 0; i < ev->nsinks; i++)
        if (ev->sinks[i]->started)
            pthread_join(ev->sinks[i]->thread, NULL);
    if (ev->pump_started)
        pthread_join(ev->pump, NULL);
    if (ev->queue != NULL)
        queue_events_set_hook(ev->queue, NULL, NULL);
    if (ev->port != NULL && queue_port_pending(ev->port) > 0) {
        log_msg(LOG_ERR, "event=events_port_busy_at_stop pending=%u note=left_to_the_exit",
                queue_port_pending(ev->port)); /* the spool did not answer: freeing would panic */
        if (spool_busy != NULL)
            *spool_busy = true;
    } else {
        queue_port_free(ev->port);
    }
    for (unsigned i = 0; i < ev->nsinks; i++) {
        sink_fini(ev->sinks[i]);
        free(ev->sinks[i]);
    }
    free(ev->pbuf);
    if (ev->wake_fd >= 0)
        close(ev->wake_fd);
    journal_close(ev->journal);
    pthread_mutex_destroy(&ev->mu);
    pthread_cond_destroy(&ev->cond);
    free(ev);
    curl_global_cleanup();
    return NULL;
}

static bool
str_same(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* Whether a reload leaves the sink as it runs ("paused" aside: it only
 * says how the sink starts). */
static bool
sink_cfg_same(const struct events_sink_config *a, const struct events_sink_config *b)
{
    return str_same(a->url, b->url) && str_same(a->secret, b->secret) &&
           str_same(a->events, b->events) && str_same(a->tenants, b->tenants) &&
           str_same(a->ca_file, b->ca_file) && a->batch_max == b->batch_max &&
           a->batch_wait == b->batch_wait && a->timeout == b->timeout &&
           a->retry_min == b->retry_min && a->retry_max == b->retry_max &&
           a->max_backlog == b->max_backlog && a->maxlen == b->maxlen;
}

int
events_reconfigure(struct events *ev, const struct events_sink_config *sinks, unsigned n)
{
    if (ev == NULL)
        return n == 0 ? 0 : -ENOENT;
    if (n > EVENTS_SINKS_MAX)
        return -EINVAL;
    size_segments(ev, sinks, n);
    char err[256];
    int failed = 0;
    /* Removed, or changed: stop the old one (it stores its cursor). */
    struct sink *old[EVENTS_SINKS_MAX];
    unsigned nold = 0;
    pthread_mutex_lock(&ev->mu);
    /* Until every sink is listed again: stopping one waits for its
     * request in flight (up to its timeout), and the others' trims would
     * delete what it resumes from. */
    ev->trim_held = true;
    for (unsigned i = 0; i < ev->nsinks;) {
        struct sink *s = ev->sinks[i];
        const struct events_sink_config *c = NULL;
        for (unsigned k = 0; k < n && c == NULL; k++)
            if (strcmp(sinks[k].name, s->cfg.name) == 0)
                c = &sinks[k];
        if (c != NULL && sink_cfg_same(&s->cfg, c)) {
            if (c->paused != s->cfg.paused) { /* the config's word on the start wins */
                s->cfg.paused = c->paused;
                s->st.paused = c->paused;
                pthread_cond_broadcast(&ev->cond);
            }
            i++;
            continue;
        }
        old[nold++] = s;
        memmove(&ev->sinks[i], &ev->sinks[i + 1], (ev->nsinks - i - 1) * sizeof(ev->sinks[0]));
        ev->nsinks--;
    }
    pthread_mutex_unlock(&ev->mu);
    struct events_sink_stats kept[EVENTS_SINKS_MAX];
    bool was_paused[EVENTS_SINKS_MAX];
    bool had_paused_cfg[EVENTS_SINKS_MAX];
    for (unsigned i = 0; i < nold; i++) {
        struct sink *s = old[i];
        pthread_mutex_lock(&ev->mu);
        kept[i] = s->st;
        was_paused[i] = s->st.paused;
        had_paused_cfg[i] = s->cfg.paused;
        pthread_mutex_unlock(&ev->mu);
        if (s->started) {
            pthread_mutex_lock(&ev->mu);
            s->stop = true;
            sink_abort_locked(s);
            pthread_cond_broadcast(&ev->cond);
            pthread_mutex_unlock(&ev->mu);
            atomic_store(&s->quit, true);
            pthread_join(s->thread, NULL);
            s->started = false;
        }
        /* The cursor on disk is where it resumes, now or when added back. */
        sink_store_cursor(s, &s->cursor);
    }
    /* Added, or changed: start from the stored cursor (a changed URL keeps
     * it); a name never seen starts at the journal's end: from now on. */
    for (unsigned k = 0; k < n; k++) {
        bool running = false;
        pthread_mutex_lock(&ev->mu);
        for (unsigned i = 0; i < ev->nsinks && !running; i++)
            running = strcmp(ev->sinks[i]->cfg.name, sinks[k].name) == 0;
        pthread_mutex_unlock(&ev->mu);
        if (running)
            continue;
        int prev = -1;
        for (unsigned i = 0; i < nold && prev < 0; i++)
            if (strcmp(old[i]->cfg.name, sinks[k].name) == 0)
                prev = (int)i;
        bool known = prev >= 0 || journal_cursor_exists(ev->journal, sinks[k].name);
        struct sink *s = sink_new(ev, &sinks[k], err, sizeof(err));
        if (s == NULL) {
            log_msg(LOG_ERR, "event=events_sink_reload_failed sink=%s err=\"%s\"", sinks[k].name,
                    err);
            failed = -EINVAL;
            continue;
        }
        if (!known) {
            journal_end(ev->journal, &s->cursor);
            sink_store_cursor(s, &s->cursor);
        }
        if (prev >= 0) {
            /* the same sink, changed: its counters go on */
            struct events_sink_stats *o = &kept[prev];
            s->st.sent = o->sent;
            s->st.batches = o->batches;
            s->st.failed = o->failed;
            s->st.filtered = o->filtered;
            s->st.dropped += o->dropped;
            s->st.rejected = o->rejected;
            memcpy(s->st.last_error, o->last_error, sizeof(s->st.last_error));
            s->st.paused = sinks[k].paused != had_paused_cfg[prev] ? sinks[k].paused
                                                                    : was_paused[prev];
        }
        pthread_mutex_lock(&ev->mu);
        ev->sinks[ev->nsinks++] = s;
        pthread_mutex_unlock(&ev->mu);
        if (sink_start(s, err, sizeof(err)) < 0) {
            /* Not left listed without a thread: its cursor would never
             * move and would hold back every trim until a restart. Out
             * of the list it is as a removed sink (its cursor stored, the
             * journal trimmed behind it, what it missed counted when it
             * comes back); the next reload naming it starts it again. */
            pthread_mutex_lock(&ev->mu);
            for (unsigned i = 0; i < ev->nsinks; i++)
                if (ev->sinks[i] == s) {
                    memmove(&ev->sinks[i], &ev->sinks[i + 1],
                            (ev->nsinks - i - 1) * sizeof(ev->sinks[0]));
                    ev->nsinks--;
                    break;
                }
            pthread_mutex_unlock(&ev->mu);
            sink_store_cursor(s, &s->cursor);
            log_msg(LOG_ERR,
                    "event=events_sink_reload_failed sink=%s err=\"%s\" "
                    "note=dropped_until_the_next_reload cursor=kept",
                    sinks[k].name, err);
            sink_fini(s);
            free(s);
            failed = -EINVAL;
            continue;
        }
        log_msg(LOG_NOTICE, "event=events_sink_%s sink=%s", prev >= 0 ? "changed" : "added",
                sinks[k].name);
    }
    for (unsigned i = 0; i < nold; i++) {
        bool again = false;
        for (unsigned k = 0; k < n && !again; k++)
            again = strcmp(sinks[k].name, old[i]->cfg.name) == 0;
        if (!again)
            log_msg(LOG_NOTICE, "event=events_sink_removed sink=%s note=cursor_kept",
                    old[i]->cfg.name);
        sink_fini(old[i]);
        free(old[i]);
    }
    pthread_mutex_lock(&ev->mu);
    ev->trim_held = false;
    pthread_mutex_unlock(&ev->mu);
    events_trim(ev);
    return failed;
}

unsigned
events_stats(struct events *ev, struct events_sink_stats *out, unsigned cap)
{
    if (ev == NULL)
        return 0;
    struct journal_pos end;
    journal_end(ev->journal, &end);
    /* Pending from the spool's last durable number: the events committed
     * and not yet copied to the journal (the pump's few milliseconds) are
     * pending too. Counted from the journal's end alone, a sink showed 0
     * while a message's delivery events were still in the spool, and a
     * backend that waited for 0 to read its events missed them. */
    uint64_t head = end.seq;
    if (ev->queue != NULL && queue_events_durable(ev->queue) > head)
        head = queue_events_durable(ev->queue);
    uint64_t now = clock_unix_ms();
    unsigned n = 0;
    pthread_mutex_lock(&ev->mu);
    for (; n < ev->nsinks && n < cap; n++) {
        const struct sink *s = ev->sinks[n];
        out[n] = s->st;
        out[n].pending = head > s->cursor.seq ? head - s->cursor.seq : 0;
        out[n].oldest_age_ms =
            out[n].pending > 0 && s->oldest_ms != 0 && now > s->oldest_ms ? now - s->oldest_ms : 0;
        /* Events the pump cannot append (the journal's disk full or
         * failing) wait in the spool since its first failure: as old as
         * that at least, so that the age's alert fires for them too (it
         * read 0 while nothing pending was in the journal). */
        if (out[n].pending > 0 && ev->pump_failing_ms != 0 && now > ev->pump_failing_ms &&
            now - ev->pump_failing_ms > out[n].oldest_age_ms)
            out[n].oldest_age_ms = now - ev->pump_failing_ms;
    }
    pthread_mutex_unlock(&ev->mu);
    return n;
}

int
events_pause(struct events *ev, const char *name, bool paused)
{
    if (ev == NULL)
        return -ENOENT;
    int rc = -ENOENT;
    pthread_mutex_lock(&ev->mu);
    for (unsigned i = 0; i < ev->nsinks; i++)
        if (strcmp(ev->sinks[i]->cfg.name, name) == 0) {
            ev->sinks[i]->st.paused = paused;
            rc = 0;
        }
    pthread_cond_broadcast(&ev->cond);
    pthread_mutex_unlock(&ev->mu);
    if (rc == 0)
        log_msg(LOG_NOTICE, "event=events_sink_%s sink=%s", paused ? "paused" : "resumed", name);
    return rc;
}

const char *
events_node_id(const struct events *ev)
{
    return ev != NULL ? journal_id(ev->journal) : NULL;
}
