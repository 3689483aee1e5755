/*
 * events_int.h: what the files of the event push share (not a public
 * header; events.h is):
 *
 *   engine/events.c       the module: config, sinks and their threads,
 *                         batches read from the journal, backoff, stats,
 *                         reload;
 *   engine/events_send.c  sending a batch: the webhook (libcurl, the
 *                         signature header) and the Redis stream (hiredis,
 *                         XADD);
 *   engine/events_pump.c  the pump: the spool's event records to the
 *                         journal, then their trim from the spool.
 */
#ifndef SLUICE_ENGINE_EVENTS_INT_H
#define SLUICE_ENGINE_EVENTS_INT_H

#include <curl/curl.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/json.h"
#include "engine/events.h"
#include "engine/events_journal.h"
#include "queue/queue.h"

#define READ_BUF       (1024u * 1024) /* journal octets read at a time */
#define CURSOR_SYNC_MS 1000u          /* a busy sink stores its cursor this often */
#define FRAME_MAX      64u            /* an event's {"event_id":"NODE-SEQ" head */
#define HTTP_TOO_LARGE (-2)           /* sink_http_send: the endpoint answered 413 */
#define HTTP_REFUSED   (-3)           /* sink_http_send: a 4xx that refuses the events (sink_http_refuses) */
#define PUMP_BYTES     (4u * 1024 * 1024) /* spool records moved per journal append */
#define PUMP_GATHER_MS 20u            /* the pump lets a few commits gather first */
#define PUMP_RETRY_MS  1000u          /* after a failed append, or a first failed trim */
#define PUMP_IDLE_MS   1000u          /* the idle pump's longest wait, a backstop (pump_poll) */
#define PUMP_TRIM_RETRY_MAX_MS 60000u /* trims failing in a row: the longest wait */
#define HTTP_ANSWER_MAX (64u * 1024)  /* octets of an endpoint's answer read; past them, closed */

enum sink_kind { SINK_HTTP, SINK_REDIS };

/* What became of one event of a Redis batch (sink_redis_send). */
enum xadd_fate {
    XADD_IN,      /* answered with an entry id: in the stream */
    XADD_REFUSED, /* a generic error (-ERR ...): refused for what it holds */
    XADD_RETRY,   /* an error that says the server or the key takes nothing now (-OOM,
                   * -WRONGTYPE, -READONLY, -LOADING, ...), or no answer: sent again */
};

/* Where one event of the batch starts in the journal, and how many
 * events the filter left out between the batch's start and it. */
struct batch_mark {
    struct journal_pos at;
    uint64_t filtered;
};

struct sink {
    struct events *ev;             /* borrowed: owns the sink */
    struct events_sink_config cfg; /* owned strings (conf_copy) */
    enum sink_kind kind;
    pthread_t thread;
    bool started;
    bool stop;          /* under ev->mu: this sink alone stops (a reload) */
    _Atomic bool quit;  /* stop, read without mu: a request in flight gives up */

    /* Under ev->mu. */
    struct journal_pos cursor; /* acknowledged up to here */
    struct journal_pos stored; /* the cursor on disk, where a restart resumes (a busy
                                * sink's lags by up to CURSOR_SYNC_MS; or the one a store
                                * failed to write): trims keep what follows it */
    struct events_sink_stats st;
    uint64_t oldest_ms; /* Unix ms of the first pending event, 0: unknown */

    /* Sink thread only. */
    int fd; /* journal segment being read, -1 */
    uint64_t fd_seg;
    char *rbuf;          /* owned: READ_BUF */
    struct json body;    /* the batch: a JSON array of framed events */
    size_t *offs, *lens; /* owned, batch_max each: every event's object in body */
    uint64_t *seqs;      /* owned, batch_max: every event's number */
    struct batch_mark *marks; /* owned, batch_max: every event's start */
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
    uint64_t retry_after_ms; /* the last answer's Retry-After (a 429 or 503), 0: none;
                              * the sink's thread's */
    /* redis */
    unsigned char *fates; /* owned, batch_max: every event's enum xadd_fate */
    uint64_t *done;       /* owned, batch_max: numbers past the cursor already dealt with (in
                           * the stream, or dropped), ascending: a batch sent again leaves
                           * them out */
    unsigned ndone;
    uint64_t done_end; /* while ndone > 0: the end of the batch they came from; no batch
                        * reaches past it until they are behind the cursor */
    char refusal[EVENTS_ERROR_MAX]; /* the batch's first XADD_REFUSED reply */
    redisContext *redis; /* owned */
    int redis_fd;        /* under ev->mu: its socket while connected, else -1 (a stop shuts it) */
    char host[256], stream[256], user[256], password[256];
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
    uint64_t appends;      /* bumped on every append or skip: sinks wait for a change */
    uint64_t pump_failing_ms; /* under mu: Unix ms of the first of the appends failing
                               * since the last that went in, or since the pump last
                               * caught up (0: none failing) */
    uint64_t committed;    /* bumped by the spool's hook: the pump waits for a change */
    int wake_fd;           /* eventfd: the spool's hook and the stop wake the pump
                            * (events_pump_kick); owned, -1: none */
    struct sink *sinks[EVENTS_SINKS_MAX]; /* owned; the array under mu */
    unsigned nsinks;
    bool trim_held; /* under mu: a start lists its sinks, or a reload restarts
                     * them: no trim meanwhile */
    pthread_t pump;
    bool pump_started;
    _Atomic uint64_t put_failed; /* lines put alone that the spool refused */
    _Atomic size_t pump_bytes;   /* spool records moved per append: PUMP_BYTES, or less when
                                  * a sink's max_backlog wants smaller segments */

    /* Pump thread only. */
    char *pbuf; /* owned: PUMP_BYTES + one record */
    size_t plen, pcap;
    uint64_t pfrom;   /* the number the copy must start at */
    uint64_t pseq;    /* the number after the copied lines */
    uint64_t pskip;   /* non-zero: the spool's next record starts there, past pfrom */
    bool trimming;    /* a trim is in flight */
    uint64_t trim_retry_at;   /* mono ms a failed trim is asked again at; 0: none failed */
    unsigned trim_backoff_ms; /* the wait after the last failure in a row (pump_trim_failed) */
    unsigned trim_retry_ms;   /* the first of those waits: PUMP_RETRY_MS (set before the
                               * pump starts; a test's hook shortens it) */
    unsigned gather_ms;       /* the gather of commits before an append: PUMP_GATHER_MS
                               * (set before the pump starts; a test's hook changes it) */
    uint64_t trim_to; /* the number the spool was (or is being) trimmed up to */
};

/* ---- calls between the files ---- */

/* events.c */
/* The value of the top-level string member "key" of one delivery log line
 * (a JSON object as dlog writes it), escapes left as they are, or NULL.
 * A member of a nested object is not taken for it: the logged headers
 * are named by [log] delivery_log_headers, and one named "tenant" must
 * not steer a sink's tenants filter (its value is the sender's). */
const char *events_line_field(const char *line, size_t len, const char *key, size_t *vlen);
/* Delete the journal segments every sink's stored cursor passed (not
 * while a reload restarts sinks). */
void events_trim(struct events *ev);
/* Wait on ev->cond until the monotonic deadline (ms) or a signal; mu held. */
void events_wait_until(struct events *ev, uint64_t deadline_ms);

/* events_pump.c */
/* The pump's thread (arg: the struct events). */
void *events_pump_main(void *arg);
/* The spool's hook, on its committer thread: more lines are durable. */
void events_pump_wake(void *arg);
/* Wake the pump's wait (ev->wake_fd); any thread. */
void events_pump_kick(struct events *ev);

/* events_send.c */
/* The sink's libcurl handle, made once; 0 or -ENOMEM. */
int sink_http_init(struct sink *s);
/* Does a webhook's 4xx code refuse the events themselves (split the
 * batch), rather than every batch alike (retried)? */
bool sink_http_refuses(long code);
/* POST the sink's batch; 0 on a 2xx, HTTP_TOO_LARGE, HTTP_REFUSED or -1
 * with the reason in err; *status: the code, 0 when none came. */
int sink_http_send(struct sink *s, long *status, char *err, size_t errlen);
/* Drop the sink's Redis connection (the next send connects again). */
void sink_redis_drop(struct sink *s);
/* XADD the sink's batch, pipelined: s->fates says what became of each
 * event. Returns 0 when every one is in the stream, else -1 with the
 * first failure in err. */
int sink_redis_send(struct sink *s, char *err, size_t errlen);
/* A stop abandons the sink's request in flight; mu held. */
void sink_abort_locked(struct sink *s);

#endif
