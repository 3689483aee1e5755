/*
 * events: the delivery log's events pushed to the backend, at least
 * once, through [events NAME] sinks: signed, batched HTTP webhooks
 * (libcurl) and Redis Streams (hiredis, XADD MAXLEN ~).
 *
 * Where events become durable. An event is committed in the spool
 * transaction of what it tells (queue.h, "events"): the reception with
 * its message, before the 250 (server_msg.c); delivery, transient_failure,
 * bounce, expiration and dsn with the outcomes and the DSN they belong
 * to (outbound/outcome.c passes the lines with its outcome batch).
 * Events that change nothing in the spool come through the delivery
 * log's hook (events_put) and are committed alone (suppressed,
 * rejection); the bounce listener's (oob_bounce, complaint) are committed alone too, but
 * before the report's 250 (server_msg.c bounce_finish). The spool numbers the lines in commit order; the
 * pump thread copies the durable ones to the event journal
 * (events_journal.h) under those numbers, fsyncs, wakes the sinks and
 * asks the spool to trim what the journal holds. A crash between the
 * copy and the trim re-reads nothing twice: the pump starts from the
 * journal's end, a number. So what the spool holds, the journal gets,
 * and there is no window: an outcome is durable only with its event.
 * The journal is opened first and the spool numbers on from its end
 * (queue_events_floor), so a number names one event for ever.
 *
 * Each sink keeps a durable cursor in the journal and moves it only once
 * its endpoint acknowledged a batch (a 2xx; for a Redis stream, which
 * answers every XADD of the pipeline alone, the events up to the first
 * one not in: those after it that went in are left out when the rest is
 * sent again), or refused one event alone for what it holds (a
 * webhook's 400 or 422, a Redis -ERR: that event is dropped, counted and
 * logged; events.c). The
 * cursor is written (fsync, rename) when the sink has caught up, else
 * once a second: two fsyncs a batch would bound the catch-up of a
 * backlog to the disk's fsync rate. So a restart or a kill -9 resumes
 * from the cursor and re-sends at most the last second of acknowledged
 * events and the batch in flight: consumers drop those duplicates by
 * "event_id" ("<node id>-<event number>", the same on every retry).
 *
 * Order. Numbers follow commit order, and a message's reception commits
 * before any outcome of it can; the journal and each sink keep the
 * numbers' order (one batch in flight), so the first copy of a
 * message's reception arrives before the first copy of its outcomes;
 * but on a Redis stream that refused the reception's XADD for a moment
 * (-OOM, ...) and took a later one of the same pipeline: the reception,
 * sent again, then follows.
 *
 * Threads. The pump (spool to journal, PUMP_GATHER_MS after a commit so
 * that one fsync carries several commits), and one thread per sink, blocking on its own client with
 * timeouts: libcurl's easy interface (the handle is reused, so the
 * connection is kept alive) or a hiredis context. Not the worker rings:
 * a sink has at most one batch in flight (that keeps order per message),
 * so a multi-socket driver would multiplex nothing, and the journal's
 * reads are file I/O that must not run on a worker. A slow or dead
 * endpoint thus costs its own thread only; delivery never waits for it.
 *
 * Memory is bounded per sink (one batch: batch_max events and at most
 * EVENTS_BATCH_BYTES, less once an endpoint answered 413); the backlog is the journal on disk, bounded per
 * sink by max_backlog (past it, the oldest segment is skipped for that
 * sink and the events it held are counted as dropped, loudly).
 *
 * Threading: events_new and events_free from the main thread (the spool
 * open around them); events_put, events_stats and events_pause from any
 * thread.
 */
#ifndef SLUICE_ENGINE_EVENTS_H
#define SLUICE_ENGINE_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/conf.h"

#define EVENTS_SINKS_MAX   16
#define EVENTS_NAME_MAX    64                 /* a sink's name (its cursor's: JOURNAL_NAME_MAX) */
#define EVENTS_BATCH_BYTES (4u * 1024 * 1024) /* a batch closes before this size */
#define EVENTS_ERROR_MAX   200
#define EVENTS_SIG_HEADER  "X-Sluice-Signature" /* "sha256=" hex HMAC of "TIMESTAMP.BODY" */
#define EVENTS_TS_HEADER   "X-Sluice-Timestamp" /* Unix seconds */

/* One [events NAME] section. */
struct events_sink_config {
    char *name;           /* owned: the section's NAME */
    unsigned line;        /* where its section starts */
    char *url;            /* owned: http://, https:// or redis://[[USER]:PASSWORD@]HOST[:PORT]/STREAM */
    char *secret;         /* owned: HMAC-SHA256 key of the signature header; NULL: unsigned */
    char *events;         /* owned: event types sent, comma separated; "": all */
    char *tenants;        /* owned: tenants sent ("tenant" field), comma separated; "": all */
    unsigned batch_max;   /* events per batch */
    uint64_t batch_wait;  /* ms: a batch closes this long after its first event */
    uint64_t timeout;     /* ms: per request */
    uint64_t retry_min;   /* ms: first backoff */
    uint64_t retry_max;   /* ms: backoff ceiling */
    uint64_t max_backlog; /* octets of journal kept for this sink */
    unsigned maxlen;      /* redis: XADD MAXLEN ~ this; 0: none */
    char *ca_file;        /* owned: https: CA bundle; NULL: the system's */
    bool paused;          /* start paused */
};

/* The keys of [events NAME] (for config.c and the reference). */
extern const struct conf_key events_sink_keys[];

/* Check one section once read (url scheme, redis URL, name). Returns 0
 * or -EINVAL with a message in err. */
int events_sink_check(const struct events_sink_config *c, char *err, size_t errlen);

struct events;

/* One sink's counters and gauges. */
struct events_sink_stats {
    char name[EVENTS_NAME_MAX + 1];
    char kind[8];           /* "http" | "redis" */
    uint64_t pending;       /* events committed after its cursor: in the journal,
                             * or in the spool on their way to it */
    uint64_t oldest_age_ms; /* age of the first of them in the journal, or since the
                             * journal's appends began failing (the spool's then
                             * wait that long); 0 when none is there */
    uint64_t sent;          /* events acknowledged */
    uint64_t batches;       /* batches acknowledged */
    uint64_t failed;        /* failed attempts (batches) */
    uint64_t filtered;      /* events its filter left out */
    uint64_t dropped;       /* events skipped past max_backlog */
    uint64_t rejected;      /* events the endpoint refused alone (a webhook's 4xx, a
                             * Redis -ERR), dropped */
    bool paused;
    char last_error[EVENTS_ERROR_MAX]; /* "" when none yet */
};

/*
 * Open the journal in dir and start one thread per sink (n sinks, the
 * configs are copied). n 0: *out NULL, nothing started. Returns 0 or
 * -errno with a message for the operator in err.
 */
struct queue;
int events_new(const struct events_sink_config *sinks, unsigned n, const char *dir,
               struct queue *q, struct events **out, char *err, size_t errlen);
/* Stop the sink threads (a batch in flight is abandoned at once: it is
 * sent again from the cursor on the next start; only a Redis connect in
 * progress runs to its timeout) and close. Returns NULL. */
struct events *events_free(struct events *ev);
/* events_free, and *spool_busy (when not NULL) says whether the pump's
 * requests were still with the spool (event=events_port_busy_at_stop:
 * the spool answered none of them in the pump's last wait, 10 s; its port
 * is left allocated to the exit). */
struct events *events_free_busy(struct events *ev, bool *spool_busy);

/* The delivery log's hook (dlog_set_hook) for events logged outside a
 * spool transaction (suppressed, rejection, oob_bounce, complaint): the line is
 * committed alone (queue_events_put). arg is the struct events. Any
 * thread. */
void events_put(void *arg, const char *line, size_t len);

/*
 * A reload (main thread): sinks no longer configured stop (their cursor
 * stays on disk: added back, they resume there, or at the journal's
 * first event when it was trimmed meanwhile, the events between counted
 * as dropped and logged); sinks whose settings
 * changed (url, secret, filters, batch and retry settings, ...) stop
 * and start again from their cursor (a batch in flight is sent again);
 * new ones start, from their stored cursor if they ever had one, else at
 * the journal's end (every event from now on). A change of "paused"
 * alone pauses or resumes. Segments before every running sink's cursor
 * are deleted (with no sink left, all but the one being appended to): a
 * removed sink's cursor holds nothing on disk. The module must exist (a
 * node started without any sink needs a restart for its first). Returns
 * 0 or -errno (a sink that could not start, its thread included, is
 * logged and left out, as if removed, until a reload names it again).
 */
int events_reconfigure(struct events *ev, const struct events_sink_config *sinks, unsigned n);

/* Fill up to cap sinks' stats; returns how many. */
unsigned events_stats(struct events *ev, struct events_sink_stats *out, unsigned cap);

/* Pause (stop sending; events keep accumulating in the journal) or
 * resume the sink named name. Returns 0 or -ENOENT. */
int events_pause(struct events *ev, const char *name, bool paused);

/* The journal's node id (for tests and the stats). */
const char *events_node_id(const struct events *ev);

/* "sha256=" + hex of HMAC-SHA256(secret, ts "." body) into out (at
 * least 72 octets). Pure: for the sinks and the tests. */
void events_sign(const char *secret, uint64_t ts, const char *body, size_t len, char *out);

#endif
