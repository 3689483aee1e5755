/*
 * events: see events.h for the design. This file owns the pump (the
 * spool's event records to the journal, then a trim) and the sinks: their
 * threads, their batches (read from the journal, filtered, framed with
 * each event's id), the HTTP client (libcurl's easy interface, one
 * handle per sink, reused for keep-alive) and the Redis client (one
 * hiredis context per sink, XADDs pipelined), and their backoff.
 *
 * A sink thread's loop: wait until the journal holds events past its
 * cursor and the sink is not paused; gather a batch (closing at
 * batch_max events, EVENTS_BATCH_BYTES, or batch_wait after the first
 * event was seen); send it; on success store the cursor, on failure
 * count, keep the error text and wait retry_min doubling to retry_max,
 * then send the same events again. Events the filter leaves out move
 * the cursor with the next batch. An HTTP 413 (the endpoint's body limit:
 * nginx's default is 1 MB, a catching-up batch up to 4 MB) halves the
 * sink's batch, in events and octets, and sends again at once: the limit
 * stays learnt until the sink restarts. A single event refused so is
 * retried like any failure. A webhook's 4xx that refuses what was sent
 * (a 400 or 422 for one malformed or unwanted event; not 401, 403, 404,
 * 405, 407, 408, 410, 413, 421, 425 or 429, which say nothing about the
 * events: see http_refuses) splits the batch: its first half is sent at
 * once, halved again while refused, until one event is refused alone;
 * that one is dropped (counted as rejected, logged with its id and
 * recipient) and the sink moves on with whole batches. A second event
 * dropped with nothing acknowledged since the first waits the backoff
 * first: an endpoint that refuses everything loses one event a backoff,
 * each logged, not its whole backlog at once. 5xx and connection errors
 * are retried.
 *
 * Locks: ev->mu guards every sink's stats, paused flag and stop flag,
 * and the journal's trims (a trim reads every listed sink's cursor and
 * deletes under it, so a reload that takes a sink out to restart it
 * holds the trims until it is back); ev->cond wakes the sink threads
 * (appends, pause, stop). A sink's
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
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/events_journal.h"
#include "queue/queue.h"

#define READ_BUF       (1024u * 1024) /* journal octets read at a time */
#define CURSOR_SYNC_MS 1000u          /* a busy sink stores its cursor this often */
#define FRAME_MAX      64u            /* an event's {"event_id":"NODE-SEQ" head */
#define HTTP_TOO_LARGE (-2)           /* http_send: the endpoint answered 413 */
#define HTTP_REFUSED   (-3)           /* http_send: a 4xx that refuses the events (http_refuses) */
#define PUMP_BYTES     (4u * 1024 * 1024) /* spool records moved per journal append */
#define PUMP_GATHER_MS 20u            /* the pump lets a few commits gather first */
#define PUMP_RETRY_MS  1000u          /* after a failed append */
#define HTTP_ANSWER_MAX (64u * 1024)  /* octets of an endpoint's answer read; past them, closed */

_Static_assert(EVENTS_NAME_MAX == JOURNAL_NAME_MAX, "a sink's name is its cursor's");

#define EVK(f) offsetof(struct events_sink_config, f)
const struct conf_key events_sink_keys[] = {
    {"url", CONF_STRING, EVK(url), 1, 2048, NULL,
     "where events go: http://HOST[:PORT]/PATH or https://... (a webhook: batched JSON POSTs), "
     "or redis://[:PASSWORD@]HOST:PORT/STREAM (XADD to STREAM)",
     NULL},
    {"secret", CONF_STRING, EVK(secret), 1, 1024, NULL,
     "key of the " EVENTS_SIG_HEADER " header: sha256= hex HMAC-SHA256 of the " EVENTS_TS_HEADER
     " value, a dot and the body; unset: not signed",
     NULL},
    {"events", CONF_STRING, EVK(events), 0, 1024, "",
     "event types sent, comma separated (reception, delivery, transient_failure, bounce, "
     "expiration, dsn); empty: all",
     NULL},
    {"tenants", CONF_STRING, EVK(tenants), 0, 4096, "",
     "tenants sent (the event's tenant field), comma separated; empty: all", NULL},
    {"batch_max", CONF_UINT, EVK(batch_max), 1, 10000, "500", "events per batch (per POST)", NULL},
    {"batch_wait", CONF_DURATION, EVK(batch_wait), 0, 60000, "200ms",
     "a batch closes this long after its first event", NULL},
    {"timeout", CONF_DURATION, EVK(timeout), 100, 600000, "10s",
     "per request: connect, send and the endpoint's answer", NULL},
    {"retry_min", CONF_DURATION, EVK(retry_min), 10, 3600000, "1s",
     "wait after a first failed attempt; doubles on each failure", NULL},
    {"retry_max", CONF_DURATION, EVK(retry_max), 10, 3600000, "1m", "ceiling of that wait", NULL},
    {"max_backlog", CONF_SIZE, EVK(max_backlog), 1024 * 1024, 0, "10G",
     "journal kept for this sink while its endpoint is away; past it the oldest events are "
     "dropped for this sink (counted, logged)",
     NULL},
    {"maxlen", CONF_UINT, EVK(maxlen), 0, 4000000000u, "1000000",
     "redis: XADD MAXLEN ~ this (the stream's approximate cap); 0: no cap", NULL},
    {"ca_file", CONF_STRING, EVK(ca_file), 1, 4096, NULL,
     "https: CA bundle that verifies the endpoint; unset: the system's", NULL},
    {"paused", CONF_BOOL, EVK(paused), 0, 0, "no",
     "start paused (sluicectl events resume NAME starts it)", NULL},
    CONF_END,
};

enum sink_kind { SINK_HTTP, SINK_REDIS };

struct sink {
    struct events *ev;             /* borrowed: owns the sink */
    struct events_sink_config cfg; /* owned strings (conf_copy) */
    enum sink_kind kind;
    pthread_t thread;
    bool started;
    bool stop;          /* under ev->mu: this sink alone stops (a reload) */
    _Atomic bool quit;  /* stop, read without mu: a request in flight gives up */

    /* Under ev->mu. */
    struct journal_pos cursor; /* durable: acknowledged up to here */
    struct events_sink_stats st;
    uint64_t oldest_ms; /* Unix ms of the first pending event, 0: unknown */

    /* Sink thread only. */
    int fd; /* journal segment being read, -1 */
    uint64_t fd_seg;
    char *rbuf;          /* owned: READ_BUF */
    struct json body;    /* the batch: a JSON array of framed events */
    size_t *offs, *lens; /* owned, batch_max each: every event's object in body */
    uint64_t *seqs;      /* owned, batch_max: every event's number */
    unsigned nlines;
    unsigned max_lines;      /* a batch's events: batch_max, less after a 413 */
    size_t max_bytes;        /* a batch's octets (but for its first event): EVENTS_BATCH_BYTES,
                              * less after a 413 */
    unsigned split_lines;    /* 0, or a batch's events while a refused batch is split */
    uint64_t split_end;      /* while split: the number after the refused batch's events */
    bool rejected_last;      /* the last event dealt with was dropped as refused */
    struct journal_pos next; /* the cursor once the batch is acknowledged */
    /* http */
    CURL *curl;                 /* owned */
    struct curl_slist *headers; /* owned, rebuilt per request */
    char curl_err[CURL_ERROR_SIZE];
    size_t answer_len; /* octets of the answer's body read so far */
    /* redis */
    redisContext *redis; /* owned */
    int redis_fd;        /* under ev->mu: its socket while connected, else -1 (a stop shuts it) */
    char host[256], stream[256], password[256];
    int port;
};

struct events {
    struct journal *journal; /* owned */
    struct queue *queue;     /* borrowed: outlives the module */
    struct queue_port *port; /* owned: the pump's (trims, and lines put alone) */
    pthread_mutex_t mu;
    pthread_cond_t cond; /* CLOCK_MONOTONIC */
    bool stop;
    _Atomic bool stopping; /* stop, read without mu: a request in flight gives up */
    uint64_t appends;      /* bumped on every append: sinks wait for a change */
    uint64_t committed;    /* bumped by the spool's hook: the pump waits for a change */
    struct sink *sinks[EVENTS_SINKS_MAX]; /* owned; the array under mu */
    unsigned nsinks;
    bool trim_held; /* under mu: a reload restarts sinks, no trim meanwhile */
    pthread_t pump;
    bool pump_started;
    _Atomic uint64_t put_failed; /* lines put alone that the spool refused */

    /* Pump thread only. */
    char *pbuf; /* owned: PUMP_BYTES + one record */
    size_t plen, pcap;
    uint64_t pfrom;   /* the number the copy must start at */
    uint64_t pseq;    /* the number after the copied lines */
    uint64_t pskip;   /* non-zero: the spool's next record starts there, past pfrom */
    bool trimming;    /* a trim is in flight */
    uint64_t trim_to; /* the number the spool was (or is being) trimmed up to */
};

/* ---- config ---- */

static int
parse_redis_url(const char *url, char *host, size_t hostlen, int *port, char *stream,
                size_t streamlen, char *password, size_t passlen)
{
    if (strncmp(url, "redis://", 8) != 0)
        return -EINVAL;
    const char *p = url + 8;
    password[0] = '\0';
    const char *at = strchr(p, '@');
    const char *slash = strchr(p, '/');
    if (at != NULL && (slash == NULL || at < slash)) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        const char *pw = colon != NULL ? colon + 1 : p;
        size_t n = (size_t)(at - pw);
        if (n >= passlen)
            return -EINVAL;
        memcpy(password, pw, n);
        password[n] = '\0';
        p = at + 1;
    }
    if (slash == NULL || slash[1] == '\0')
        return -EINVAL;
    const char *colon = memchr(p, ':', (size_t)(slash - p));
    const char *hend = colon != NULL ? colon : slash;
    if (*p == '[') { /* [::1]:6379 */
        const char *rb = memchr(p, ']', (size_t)(slash - p));
        if (rb == NULL)
            return -EINVAL;
        p++;
        hend = rb;
        colon = rb[1] == ':' ? rb + 1 : NULL;
    }
    size_t hn = (size_t)(hend - p);
    if (hn == 0 || hn >= hostlen)
        return -EINVAL;
    memcpy(host, p, hn);
    host[hn] = '\0';
    *port = 6379;
    if (colon != NULL) {
        char *end;
        long v = strtol(colon + 1, &end, 10);
        if (end != slash || v < 1 || v > 65535)
            return -EINVAL;
        *port = (int)v;
    }
    size_t sn = strlen(slash + 1);
    if (sn >= streamlen)
        return -EINVAL;
    memcpy(stream, slash + 1, sn + 1);
    return 0;
}

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
        char host[256], stream[256], pw[256];
        int port;
        if (parse_redis_url(c->url, host, sizeof(host), &port, stream, sizeof(stream), pw,
                            sizeof(pw)) < 0) {
            snprintf(err, errlen, "url: expected redis://[:PASSWORD@]HOST:PORT/STREAM");
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
    return 0;
}

/* ---- signature ---- */

void
events_sign(const char *secret, uint64_t ts, const char *body, size_t len, char *out)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    size_t maclen = 0;
    char prefix[32];
    int pn = snprintf(prefix, sizeof(prefix), "%" PRIu64 ".", ts);
    EVP_MAC *m = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *c = m != NULL ? EVP_MAC_CTX_new(m) : NULL;
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string("digest", (char *)"SHA256", 0),
                           OSSL_PARAM_construct_end()};
    if (c == NULL || !EVP_MAC_init(c, (const unsigned char *)secret, strlen(secret), params) ||
        !EVP_MAC_update(c, (const unsigned char *)prefix, (size_t)pn) ||
        !EVP_MAC_update(c, (const unsigned char *)body, len) ||
        !EVP_MAC_final(c, mac, &maclen, sizeof(mac)))
        maclen = 0;
    EVP_MAC_CTX_free(c);
    EVP_MAC_free(m);
    static const char hex[] = "0123456789abcdef";
    memcpy(out, "sha256=", 7);
    for (size_t i = 0; i < maclen; i++) {
        out[7 + 2 * i] = hex[mac[i] >> 4];
        out[8 + 2 * i] = hex[mac[i] & 15];
    }
    out[7 + 2 * maclen] = '\0';
}

/* ---- batches ---- */

/* Whether list (comma separated; "" matches all) names the n octets at v. */
static bool
list_has(const char *list, const char *v, size_t n)
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
        if ((size_t)(e - p) == n && n > 0 && memcmp(p, v, n) == 0)
            return true;
        p = e;
    }
    return false;
}

/* The string value of "key" in one delivery log line (no escapes are
 * expected in the values filtered on), or NULL. */
static const char *
line_field(const char *line, size_t len, const char *key, size_t *vlen)
{
    char pat[40];
    int pn = snprintf(pat, sizeof(pat), "\"%s\":\"", key);
    const char *p = memmem(line, len, pat, (size_t)pn);
    if (p == NULL)
        return NULL;
    p += pn;
    const char *e = memchr(p, '"', len - (size_t)(p - line));
    if (e == NULL)
        return NULL;
    *vlen = (size_t)(e - p);
    return p;
}

static bool
sink_wants(const struct sink *s, const char *line, size_t len)
{
    size_t n = 0;
    const char *v;
    if (s->cfg.events != NULL && s->cfg.events[0] != '\0') {
        v = line_field(line, len, "event", &n);
        if (v == NULL || !list_has(s->cfg.events, v, n))
            return false;
    }
    if (s->cfg.tenants != NULL && s->cfg.tenants[0] != '\0') {
        v = line_field(line, len, "tenant", &n);
        if (v == NULL || !list_has(s->cfg.tenants, v, n))
            return false;
    }
    return true;
}

/* Unix ms of a line's "time" (RFC 3339, UTC, ms), 0 when unreadable. */
static uint64_t
line_time_ms(const char *line, size_t len)
{
    size_t n;
    const char *v = line_field(line, len, "time", &n);
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
    bool full = false;
    while (!full) {
        long n = journal_read(s->ev->journal, &pos, s->rbuf, READ_BUF, &s->fd, &s->fd_seg, skipped);
        if (n < 0)
            return (int)n;
        if (n == 0)
            break;
        const char *p = s->rbuf, *end = s->rbuf + n;
        while (p < end) {
            if (s->nlines == s->max_lines || (s->split_lines > 0 && s->nlines == s->split_lines)) {
                full = true;
                break;
            }
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            size_t len = (size_t)(nl - p) + 1;
            bool wanted = sink_wants(s, p, len);
            /* framed: the line, its event_id member (under FRAME_MAX),
             * a comma and the closing bracket */
            if (wanted && s->nlines > 0 && s->body.len + len + FRAME_MAX + 2 > s->max_bytes) {
                full = true;
                break;
            }
            if (*first_ms == 0)
                *first_ms = line_time_ms(p, len);
            if (wanted)
                batch_add(s, p, len, pos.seq);
            else
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

/* ---- HTTP ---- */

/* The answer's body means nothing (the status is the answer): read and
 * dropped, up to HTTP_ANSWER_MAX; past it the transfer stops (the
 * connection is closed), so an endless or huge body costs no more. */
static size_t
discard(char *p, size_t size, size_t n, void *arg)
{
    (void)p;
    struct sink *s = arg;
    s->answer_len += size * n;
    return s->answer_len > HTTP_ANSWER_MAX ? 0 : size * n;
}

/* libcurl calls this while a request runs: a stop abandons it (the
 * batch is sent again from the cursor after the restart). */
static int
http_progress(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
    (void)dltotal;
    (void)dlnow;
    (void)ultotal;
    (void)ulnow;
    const struct sink *s = arg;
    return atomic_load(&s->ev->stopping) || atomic_load(&s->quit) ? 1 : 0;
}

static int
http_init(struct sink *s)
{
    s->curl = curl_easy_init();
    if (s->curl == NULL)
        return -ENOMEM;
    CURL *c = s->curl;
    curl_easy_setopt(c, CURLOPT_URL, s->cfg.url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)s->cfg.timeout);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long)s->cfg.timeout);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, s->curl_err);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, http_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, s);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "sluice/" SLUICE_VERSION);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    if (s->cfg.ca_file != NULL)
        curl_easy_setopt(c, CURLOPT_CAINFO, s->cfg.ca_file);
    return 0;
}

/*
 * Whether an HTTP status refuses the events sent, so that sending them
 * again can only be refused again: a 4xx but those that say nothing
 * about the body (a wrong secret or URL refuses every batch alike, and
 * dropping events one by one would empty the backlog into the log), those
 * that ask to come back later, and 413 (the batch's size, not its
 * events: halved).
 */
static bool
http_refuses(long code)
{
    switch (code) {
    case 401: /* Unauthorized: a wrong secret */
    case 403: /* Forbidden: an address or credentials refused */
    case 404: /* Not Found, 405 Method Not Allowed, 410 Gone: a wrong URL */
    case 405:
    case 407: /* Proxy Authentication Required */
    case 408: /* Request Timeout */
    case 410:
    case 413: /* Content Too Large: halved (HTTP_TOO_LARGE) */
    case 421: /* Misdirected Request */
    case 425: /* Too Early */
    case 429: /* Too Many Requests */
        return false;
    default:
        return code >= 400 && code <= 499;
    }
}

/* POST the batch. Returns 0 on a 2xx, else -1 with the reason in err. A
 * 2xx status acknowledges the batch whatever happens to the body after
 * it (cut short, too long, a stop): the endpoint took the batch; sending
 * it again would only repeat it, and for an endpoint that always answers
 * so, for ever. A 413 returns HTTP_TOO_LARGE, a status http_refuses
 * HTTP_REFUSED; *status is the status (0: none). */
static int
http_send(struct sink *s, long *status, char *err, size_t errlen)
{
    *status = 0;
    uint64_t ts = clock_unix_ms() / 1000;
    char line[128], sig[80];
    curl_slist_free_all(s->headers);
    s->headers = NULL;
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    snprintf(line, sizeof(line), EVENTS_TS_HEADER ": %" PRIu64, ts);
    if (h != NULL)
        h = curl_slist_append(h, line);
    if (h != NULL && s->cfg.secret != NULL) {
        events_sign(s->cfg.secret, ts, s->body.buf, s->body.len, sig);
        snprintf(line, sizeof(line), EVENTS_SIG_HEADER ": %s", sig);
        h = curl_slist_append(h, line);
    }
    if (h != NULL)
        h = curl_slist_append(h, "Expect:"); /* no 100-continue round trip */
    if (h == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    s->headers = h;
    curl_easy_setopt(s->curl, CURLOPT_HTTPHEADER, s->headers);
    curl_easy_setopt(s->curl, CURLOPT_POSTFIELDS, s->body.buf);
    curl_easy_setopt(s->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)s->body.len);
    s->curl_err[0] = '\0';
    s->answer_len = 0;
    CURLcode rc = curl_easy_perform(s->curl);
    long code = 0; /* this transfer's: libcurl clears it as a transfer starts */
    curl_easy_getinfo(s->curl, CURLINFO_RESPONSE_CODE, &code);
    *status = code;
    if (code >= 200 && code <= 299)
        return 0;
    if (code != 0) /* the status says more than what became of its body */
        snprintf(err, errlen, "HTTP status %ld", code);
    else
        snprintf(err, errlen, "%.180s", s->curl_err[0] ? s->curl_err : curl_easy_strerror(rc));
    return code == 413 ? HTTP_TOO_LARGE : http_refuses(code) ? HTTP_REFUSED : -1;
}

/* ---- Redis ---- */

static void
redis_drop(struct sink *s)
{
    if (s->redis == NULL)
        return;
    pthread_mutex_lock(&s->ev->mu);
    s->redis_fd = -1; /* closed below: a stop no longer touches it */
    pthread_mutex_unlock(&s->ev->mu);
    redisFree(s->redis);
    s->redis = NULL;
}

/* A stop abandons the request in flight: libcurl's through its progress
 * callback, a Redis one (hiredis blocks in read or write until the
 * timeout) by shutting its socket down, which ends the wait at once.
 * mu held. */
static void
sink_abort_locked(struct sink *s)
{
    if (s->redis_fd >= 0)
        shutdown(s->redis_fd, SHUT_RDWR);
}

static int
redis_connect(struct sink *s, char *err, size_t errlen)
{
    struct timeval tv = {.tv_sec = (time_t)(s->cfg.timeout / 1000),
                         .tv_usec = (suseconds_t)(s->cfg.timeout % 1000 * 1000)};
    s->redis = redisConnectWithTimeout(s->host, s->port, tv);
    if (s->redis == NULL || s->redis->err) {
        snprintf(err, errlen, "connect %.64s:%d: %.100s", s->host, s->port,
                 s->redis ? s->redis->errstr : "out of memory");
        redis_drop(s);
        return -1;
    }
    redisSetTimeout(s->redis, tv);
    pthread_mutex_lock(&s->ev->mu);
    s->redis_fd = s->redis->fd;
    if (s->ev->stop || s->stop) /* the stop came during the connect */
        sink_abort_locked(s);
    pthread_mutex_unlock(&s->ev->mu);
    if (s->password[0] != '\0') {
        redisReply *r = redisCommand(s->redis, "AUTH %s", s->password);
        bool ok = r != NULL && r->type != REDIS_REPLY_ERROR;
        if (!ok)
            snprintf(err, errlen, "AUTH: %s", r ? r->str : s->redis->errstr);
        if (r != NULL)
            freeReplyObject(r);
        if (!ok) {
            redis_drop(s);
            return -1;
        }
    }
    return 0;
}

/* XADD every event of the batch, pipelined. Returns 0 when each was
 * answered with an id, else -1 with the reason in err. */
static int
redis_send(struct sink *s, char *err, size_t errlen)
{
    if (s->redis == NULL && redis_connect(s, err, errlen) < 0)
        return -1;
    char maxlen[24], id[64];
    snprintf(maxlen, sizeof(maxlen), "%u", s->cfg.maxlen);
    for (unsigned i = 0; i < s->nlines; i++) {
        int idn = snprintf(id, sizeof(id), "%s-%" PRIu64, journal_id(s->ev->journal), s->seqs[i]);
        const char *av[10];
        size_t al[10];
        int argc = 0;
#define ARG(p, n) (av[argc] = (p), al[argc] = (n), argc++)
        ARG("XADD", 4);
        ARG(s->stream, strlen(s->stream));
        if (s->cfg.maxlen > 0) {
            ARG("MAXLEN", 6);
            ARG("~", 1);
            ARG(maxlen, strlen(maxlen));
        }
        ARG("*", 1);
        ARG("event_id", 8);
        ARG(id, (size_t)idn);
        ARG("data", 4);
        ARG(s->body.buf + s->offs[i], s->lens[i]);
#undef ARG
        if (redisAppendCommandArgv(s->redis, argc, av, al) != REDIS_OK) {
            snprintf(err, errlen, "%s", s->redis->errstr);
            redis_drop(s);
            return -1;
        }
    }
    int rc = 0;
    for (unsigned i = 0; i < s->nlines; i++) {
        void *rp = NULL;
        if (redisGetReply(s->redis, &rp) != REDIS_OK) {
            snprintf(err, errlen, "%s", s->redis->errstr[0] ? s->redis->errstr : "I/O error");
            redis_drop(s);
            return -1;
        }
        redisReply *r = rp;
        if (r->type == REDIS_REPLY_ERROR && rc == 0) {
            snprintf(err, errlen, "XADD: %s", r->str);
            rc = -1;
        }
        freeReplyObject(r);
    }
    return rc;
}

/* ---- the sink thread ---- */

static uint64_t
mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Wait on ev->cond until the monotonic deadline (ms) or a signal; mu held. */
static void
wait_until(struct events *ev, uint64_t deadline_ms)
{
    struct timespec ts = {.tv_sec = (time_t)(deadline_ms / 1000),
                          .tv_nsec = (long)(deadline_ms % 1000 * 1000000)};
    pthread_cond_timedwait(&ev->cond, &ev->mu, &ts);
}

static void sink_store_cursor(struct sink *s, const struct journal_pos *pos);

/* Delete the segments every sink passed. Not while a reload restarts
 * sinks: one it took out of the list to stop it would not count, and it
 * resumes from its cursor. */
static void
events_trim(struct events *ev)
{
    struct journal_pos keep = {UINT64_MAX, UINT64_MAX};
    pthread_mutex_lock(&ev->mu);
    if (!ev->trim_held) {
        for (unsigned i = 0; i < ev->nsinks; i++)
            if (ev->sinks[i]->cursor.off < keep.off)
                keep = ev->sinks[i]->cursor;
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

static void
sink_store_cursor(struct sink *s, const struct journal_pos *pos)
{
    int rc = journal_cursor_store(s->ev->journal, s->cfg.name, pos);
    if (rc < 0)
        log_msg(LOG_ERR, "event=events_cursor_store_failed sink=%s err=\"%s\"", s->cfg.name,
                strerror(-rc));
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

/* Log the one event of the batch, dropped: its endpoint refused it
 * alone with status. */
static void
sink_log_rejected(const struct sink *s, long status)
{
    const char *ev = s->body.buf + s->offs[0];
    size_t len = s->lens[0];
    char type[32] = "", id[64] = "", rcpt[320] = "";
    struct {
        const char *key;
        char *out;
        size_t cap;
    } f[] = {{"event", type, sizeof(type)}, {"id", id, sizeof(id)}, {"rcpt", rcpt, sizeof(rcpt)}};
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++) {
        size_t n = 0;
        const char *v = line_field(ev, len, f[i].key, &n);
        if (v != NULL)
            snprintf(f[i].out, f[i].cap, "%.*s", (int)(n < f[i].cap ? n : f[i].cap - 1), v);
    }
    log_msg(LOG_ERR,
            "event=events_rejected sink=%s status=%ld event_id=%s-%" PRIu64
            " type=%s id=%s rcpt=<%s> note=dropped_refused_alone",
            s->cfg.name, status, journal_id(s->ev->journal), s->seqs[0], type[0] ? type : "-",
            id[0] ? id : "-", rcpt);
}

/* This sink is to stop (all, or it alone); ev->mu held. */
#define SINK_STOP(s) ((s)->ev->stop || (s)->stop)

static void *
sink_main(void *arg)
{
    struct sink *s = arg;
    struct events *ev = s->ev;
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
            while (!SINK_STOP(s) && seen == ev->appends && !s->st.paused)
                wait_until(ev, mono_ms() + 1000);
            if (s->st.paused && !SINK_STOP(s))
                wait_until(ev, mono_ms() + 1000);
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
        uint64_t now = mono_ms();
        if (first_seen == 0)
            first_seen = now;
        /* A batch closes at batch_max events or batch_wait after the
         * first: wait for either (a backlog, or the rest of a refused
         * batch being split, sends at once). */
        while (!SINK_STOP(s) && !s->st.paused && s->split_lines == 0 &&
               end.seq - s->cursor.seq < s->max_lines && now < first_seen + s->cfg.batch_wait) {
            wait_until(ev, first_seen + s->cfg.batch_wait);
            journal_end(ev->journal, &end);
            now = mono_ms();
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
            sent = http_send(s, &status, err, sizeof(err));
        else
            sent = redis_send(s, err, sizeof(err));
        /* One event refused alone: the poison of a refused batch. */
        bool reject = sent == HTTP_REFUSED && s->nlines == 1;
        if (sent == 0 || reject) {
            /* The cursor goes to disk when the sink is idle, else once a
             * CURSOR_SYNC_MS: two fsyncs a batch would bound a backlog's
             * catch-up, and a crash re-sends at most that much. */
            struct journal_pos now_end;
            journal_end(ev->journal, &now_end);
            uint64_t t = mono_ms();
            if (now_end.seq <= s->next.seq || t - last_store >= CURSOR_SYNC_MS) {
                sink_store_cursor(s, &s->next);
                last_store = t;
                dirty = false;
            } else {
                dirty = true;
            }
        }

        pthread_mutex_lock(&ev->mu);
        s->st.dropped += skipped;
        if (sent == 0 || reject) {
            s->st.filtered += filtered;
            s->cursor = s->next;
            s->oldest_ms = 0;
            first_seen = 0;
            if (s->split_lines > 0 && (reject || s->next.seq >= s->split_end))
                s->split_lines = 0; /* the refused batch is behind: whole batches again */
        }
        if (sent == 0) {
            s->st.sent += s->nlines;
            s->st.batches += s->nlines > 0;
            if (s->nlines > 0)
                s->rejected_last = false;
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
            sink_log_rejected(s, status);
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
            uint64_t until = mono_ms() + backoff;
            while (!SINK_STOP(s) && mono_ms() < until)
                wait_until(ev, until);
            continue;
        }
        if (sent == HTTP_REFUSED) {
            /* Refused for what it holds: its first half, at once, until
             * the event refused is alone. */
            if (s->split_lines == 0)
                s->split_end = s->next.seq;
            s->split_lines = s->nlines / 2;
            log_msg(LOG_NOTICE,
                    "event=events_batch_split sink=%s status=%ld events=%u first_seq=%" PRIu64
                    " next_events=%u",
                    s->cfg.name, status, s->nlines, s->seqs[0], s->split_lines);
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
        if (!failing)
            log_msg(LOG_WARN,
                    "event=events_sink_failing sink=%s err=\"%s\" retry_ms=%" PRIu64
                    " note=kept_in_journal",
                    s->cfg.name, err, backoff);
        failing = true;
        uint64_t until = mono_ms() + backoff;
        while (!SINK_STOP(s) && mono_ms() < until)
            wait_until(ev, until);
    }
    struct journal_pos last = s->cursor;
    pthread_mutex_unlock(&ev->mu);
    if (dirty)
        sink_store_cursor(s, &last);
    return NULL;
}

/* ---- the pump: spool records to the journal ---- */

/* The spool's hook, on its committer thread: more lines are durable. */
static void
pump_wake(void *arg)
{
    struct events *ev = arg;
    pthread_mutex_lock(&ev->mu);
    ev->committed++;
    pthread_cond_broadcast(&ev->cond);
    pthread_mutex_unlock(&ev->mu);
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

/* Ask the spool to trim what the journal holds, unless a trim is in
 * flight: its completion asks again for what came meanwhile. Pump
 * thread. */
static void
pump_trim(struct events *ev)
{
    struct journal_pos end;
    journal_end(ev->journal, &end);
    if (ev->trimming || end.seq <= ev->trim_to)
        return;
    ev->trimming = true;
    if (queue_events_trim(ev->queue, ev->port, end.seq, pump_trim_done, ev) < 0)
        ev->trimming = false;
    else
        ev->trim_to = end.seq;
}

static void
pump_trim_done(void *cookie, int rc)
{
    struct events *ev = cookie;
    ev->trimming = false;
    if (rc < 0) {
        log_msg(LOG_WARN, "event=events_spool_trim_failed err=\"%s\" note=retried",
                queue_strerror(rc));
        ev->trim_to = 0; /* asked again with the next append */
        return;
    }
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
    int n = queue_events_read(ev->queue, end.seq, PUMP_BYTES, pump_record, ev);
    if (n < 0) {
        log_msg(LOG_ERR, "event=events_spool_read_failed err=\"%s\"", queue_strerror(n));
        return n;
    }
    if (ev->pskip > ev->pfrom) {
        /* the spool holds nothing from pfrom to pskip: a journal made anew
         * beside an older spool, or records lost; number on from there */
        int rc = journal_skip_to(ev->journal, ev->pskip);
        return rc < 0 ? rc : 1;
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
        return rc;
    }
    pthread_mutex_lock(&ev->mu);
    ev->appends++;
    pthread_cond_broadcast(&ev->cond);
    pthread_mutex_unlock(&ev->mu);
    /* Sinks trim as their cursors move; with none left (a reload removed
     * the last), nobody else would, and every segment stayed on disk. */
    events_trim(ev);
    pump_trim(ev);
    return queue_events_durable(ev->queue) > ev->pseq ? 1 : 0;
}

static void *
pump_main(void *arg)
{
    struct events *ev = arg;
    log_set_thread_name("ev-pump");
    uint64_t seen = 0;
    bool stop = false;
    while (!stop) {
        queue_port_drain(ev->port);
        int rc = pump_move(ev);
        pthread_mutex_lock(&ev->mu);
        if (rc < 0) {
            wait_until(ev, mono_ms() + PUMP_RETRY_MS);
        } else if (rc == 0) {
            /* Caught up: wait for the next commit, then a little more so
             * that one append (one fsync) carries several commits. A
             * trim in flight is waited for meanwhile: its completion
             * trims what was appended since it was asked, else that
             * stays in the spool until the next commit. */
            while (!ev->stop && seen == ev->committed) {
                if (!ev->trimming) {
                    wait_until(ev, mono_ms() + 1000);
                    continue;
                }
                pthread_mutex_unlock(&ev->mu);
                queue_port_wait(ev->port, (int)PUMP_GATHER_MS);
                pthread_mutex_lock(&ev->mu);
            }
            seen = ev->committed;
            if (!ev->stop)
                wait_until(ev, mono_ms() + PUMP_GATHER_MS);
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
    json_fini(&s->body);
    if (s->curl != NULL)
        curl_easy_cleanup(s->curl);
    curl_slist_free_all(s->headers);
    redis_drop(s);
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
    if (s->rbuf == NULL || s->offs == NULL || s->lens == NULL || s->seqs == NULL) {
        snprintf(err, errlen, "[events %s]: out of memory", c->name);
        return -ENOMEM;
    }
    snprintf(s->st.name, sizeof(s->st.name), "%s", c->name);
    s->st.paused = c->paused;
    if (strncmp(c->url, "redis://", 8) == 0) {
        s->kind = SINK_REDIS;
        snprintf(s->st.kind, sizeof(s->st.kind), "redis");
        if (parse_redis_url(c->url, s->host, sizeof(s->host), &s->port, s->stream,
                            sizeof(s->stream), s->password, sizeof(s->password)) < 0) {
            snprintf(err, errlen, "[events %s]: url: not a redis:// URL", c->name);
            return -EINVAL;
        }
    } else {
        s->kind = SINK_HTTP;
        snprintf(s->st.kind, sizeof(s->st.kind), "http");
        if (http_init(s) < 0) {
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
    if (lost > 0) {
        /* Removed (by a reload, or from the config across a restart)
         * while the other sinks moved on: the journal was trimmed
         * behind them, not kept for it. */
        s->st.dropped = lost;
        log_msg(LOG_ERR,
                "event=events_backlog_dropped sink=%s events=%" PRIu64
                " note=trimmed_while_the_sink_was_away",
                c->name, lost);
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
    log_msg(LOG_INFO, "event=events_sink_start sink=%s kind=%s pending=%" PRIu64 " paused=%s",
            s->cfg.name, s->st.kind, end.seq > s->cursor.seq ? end.seq - s->cursor.seq : 0,
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
    pthread_mutex_init(&ev->mu, NULL);
    clock_cond_init_mono(&ev->cond);
    ev->queue = q;
    int rc = journal_open(dir, test_hook_segment_max(), &ev->journal, err, errlen);
    if (rc < 0)
        goto fail;
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
    queue_events_set_hook(q, pump_wake, ev);
    if ((rc = pthread_create(&ev->pump, NULL, pump_main, ev)) != 0) {
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
    *out = ev;
    return 0;
fail:
    events_free(ev);
    return rc;
}

struct events *
events_free(struct events *ev)
{
    if (ev == NULL)
        return NULL;
    atomic_store(&ev->stopping, true);
    pthread_mutex_lock(&ev->mu);
    ev->stop = true;
    for (unsigned i = 0; i < ev->nsinks; i++)
        sink_abort_locked(ev->sinks[i]);
    pthread_cond_broadcast(&ev->cond);
    pthread_mutex_unlock(&ev->mu);
    for (unsigned i = 0; i < ev->nsinks; i++)
        if (ev->sinks[i]->started)
            pthread_join(ev->sinks[i]->thread, NULL);
    if (ev->pump_started)
        pthread_join(ev->pump, NULL);
    if (ev->queue != NULL)
        queue_events_set_hook(ev->queue, NULL, NULL);
    if (ev->port != NULL && queue_port_pending(ev->port) > 0)
        log_msg(LOG_ERR, "event=events_port_busy_at_stop pending=%u note=left_to_the_exit",
                queue_port_pending(ev->port)); /* the spool did not answer: freeing would panic */
    else
        queue_port_free(ev->port);
    for (unsigned i = 0; i < ev->nsinks; i++) {
        sink_fini(ev->sinks[i]);
        free(ev->sinks[i]);
    }
    free(ev->pbuf);
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
            log_msg(LOG_ERR, "event=events_sink_reload_failed sink=%s err=\"%s\"", sinks[k].name,
                    err);
            failed = -EINVAL;
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
    uint64_t now = clock_unix_ms();
    unsigned n = 0;
    pthread_mutex_lock(&ev->mu);
    for (; n < ev->nsinks && n < cap; n++) {
        const struct sink *s = ev->sinks[n];
        out[n] = s->st;
        out[n].pending = end.seq > s->cursor.seq ? end.seq - s->cursor.seq : 0;
        out[n].oldest_age_ms =
            out[n].pending > 0 && s->oldest_ms != 0 && now > s->oldest_ms ? now - s->oldest_ms : 0;
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
