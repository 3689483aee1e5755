/*
 * dlog: the delivery log, JSON Lines for the provider's backend. One line
 * per event: a message was received (reception), a recipient was
 * delivered, deferred (transient_failure), bounced or expired, a DSN was
 * queued, a recipient was refused at RCPT as suppressed (suppressed) or
 * for its address (rejection).
 * Every line parses as JSON whatever bytes a remote server sent
 * (common/json.h escapes and replaces invalid UTF-8).
 *
 * Threading: struct dlog is shared; each thread that logs owns one
 * struct dlog_writer and formats into it without touching the other
 * threads. A single background thread (owned by the dlog) collects the
 * writers' filled buffers and write(2)s them to the file, every 64 KB of
 * a writer or every flush interval, whichever comes first, so a worker
 * never waits on the disk; it takes its writer's mutex only to append a
 * line, which the background thread holds only to swap a buffer out.
 *
 * Memory is bounded: when the disk is stalled or failing and the lines
 * not yet written reach the cap (DLOG_MAX_BUFFERED by default), new
 * events are dropped and counted instead. Write errors are counted,
 * logged once per burst, and the unwritten batch is retried on the next
 * interval; delivery never waits for the log.
 *
 * On the way to dying (a fatal signal under log_catch_fatal, a stop given
 * up: log_flush_all), a dlog with a file writes every whole line not yet
 * written, each once (the writer thread writes nothing after), from the
 * dying thread with no lock (common/log.h's log_fatal_hook_add, taken at
 * dlog_new, given back at dlog_free). Best effort: a line being logged
 * just then may be missing, nothing is written if the writer thread is
 * stuck in a write(2) (the disk that holds it would hold this too), and
 * one held more than 200 ms elsewhere mid-turn may see a line missed or
 * written twice. Writers freed stay allocated to dlog_free, so that the
 * hook never reads freed memory.
 *
 * A NULL struct dlog or struct dlog_writer means "log off": every event
 * call is then a cheap no-op, so the engine calls unconditionally.
 */
#ifndef SLUICE_ENGINE_DLOG_H
#define SLUICE_ENGINE_DLOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/classify.h"

#define DLOG_FLUSH_MS_DEFAULT 200u
#define DLOG_BUF_SIZE         (64u * 1024)        /* one writer buffer */
#define DLOG_MAX_BUFFERED     (64u * 1024 * 1024) /* all buffers not yet written */
#define DLOG_FIELD_MAX        4096u               /* a string field is cut to this many octets */
#define DLOG_HEADER_MAX       1024u /* a delivery_log_headers value, unfolded, is cut to this many
                                     * octets (NUL included), in every event of the message */

struct dlog;
struct dlog_writer;

enum dlog_kind {
    DLOG_RECEPTION,         /* a message was accepted: per message */
    DLOG_DELIVERY,          /* per recipient, from here on */
    DLOG_TRANSIENT_FAILURE, /* deferred, will be retried */
    DLOG_BOUNCE,
    DLOG_EXPIRATION,
    DLOG_DSN, /* a DSN was queued for a message */
    /* Out-of-band feedback at the bounce listener (engine/oob.h), per
     * recipient of the original message: */
    DLOG_OOB_BOUNCE, /* a bounce that came back by mail, days later perhaps */
    DLOG_COMPLAINT,  /* a feedback-loop report (ARF) */
    DLOG_SUPPRESSED, /* a recipient refused at RCPT: on the suppression list */
    /* Traffic shaping (engine/shaping.h), not of a message: */
    DLOG_SHAPING_STARTED, /* an action starts on this node: id, action, scope, rule, reply */
    DLOG_SHAPING_ENDED,   /* ... and ends: reason expired, cleared, cleared_elsewhere */
    DLOG_REJECTION,       /* a recipient refused at RCPT for its address (553): rcpt as written */
};

/* "reception", "delivery", ...: the value of the "event" field. */
const char *dlog_kind_str(enum dlog_kind kind);

/*
 * One event. Every field is optional: NULL strings and zero numbers are
 * left out of the line; "" is printed (a sender "" is the null sender).
 * Strings are borrowed for the call only.
 */
struct dlog_event {
    enum dlog_kind kind;
    uint64_t time_ms; /* Unix ms of the event; 0: now */
    const char *id;   /* queue id */
    const char *rcpt;
    const char *sender;
    /* who the message belongs to (engine/owner.h), with tenant and
     * campaign below: the spool envelope's pool (NULL: left out) and
     * priority (left out when 0) */
    const char *pool;
    unsigned priority;
    const char *domain;
    const char *mx;             /* MX host name */
    const char *mx_addr;        /* its IP address */
    const char *source;         /* our source IP */
    unsigned code;              /* SMTP reply code */
    const char *enhanced;       /* "5.1.1" */
    const char *reply;          /* reply text */
    const char *dsn_id;         /* dsn: the DSN's own queue id (reply holds it too) */
    /* dsn: the recipients it reports, printed as the array "recipients"
     * of {"rcpt", "action", "status"} (its Final-Recipient, Action and
     * Status fields); ndsn_rcpt 0: left out */
    const struct dlog_dsn_rcpt {
        const char *rcpt, *action, *status;
    } *dsn_rcpt;
    unsigned ndsn_rcpt;
    unsigned attempt;           /* the tries of the recipient so far, this one included;
                                 * in every per-recipient outcome event, 0 too (one
                                 * deferred without a try, its site resting) */
    bool untried;               /* transient_failure: deferred without a try (its site
                                 * resting): printed "tried": false; else left out */
    const char *classification; /* printed as "class" */
    const char *reason;         /* suppressed: hard_bounce, complaint, unsubscribe, manual;
                                 * per recipient, why when no reply tells it: connect_refused,
                                 * connect_timeout, connect_failed, timeout, eof, ... */
    const char *scope;          /* suppressed: the list that holds the entry */
    const char *tls_protocol;
    const char *tls_cipher;
    const char *tls_policy;     /* none, opportunistic, mta-sts, dane, verify, relaxed */
    const char *tls_verify;     /* "ok", or why the certificate check failed, or
                                 * "plaintext fallback: ..." (opportunistic TLS
                                 * after a failed handshake) */
    uint64_t size;         /* message size in octets */
    uint64_t arrival_ms;   /* Unix ms the message arrived: gives queue_time_ms */
    unsigned rcpt_count;   /* reception */
    const char *client;    /* reception: client address */
    const char *auth_user; /* reception */
    /* Injection headers named in the config, nhdr pairs: printed as the
     * object "headers"; a pair with a NULL name or value is left out. */
    const char *const *hdr_names;
    const char *const *hdr_values;
    unsigned nhdr;
    /* reception: the DKIM signatures the message carries, printed as the
     * array "dkim" of {"d","s","a"}; or why it carries none although keys
     * are configured, as "dkim_unsigned" ("no_key", "no_from", ...). */
    const struct dlog_dkim {
        const char *d, *s, *a;
    } *dkim;
    unsigned ndkim;
    const char *dkim_unsigned;
    /* Any event of a message: its tenant (and campaign, below), as stored
     * with it (engine/owner.h); NULL: left out. Then oob_bounce, complaint: */
    const char *tenant;
    const char *report;         /* "dsn", "bounce" (non-standard), "arf" */
    const char *action;         /* the DSN's Action: "failed", "delayed" */
    const char *feedback_type;  /* ARF: "abuse", "fraud", ... */
    const char *reporter;       /* the Reporting-MTA, or the ARF User-Agent */
    const char *message_id;     /* the original's Message-ID field */
    const char *campaign;       /* X-Sluice-Campaign of the original */
    int rcpt_index;             /* the recipient's index in the message; -1: not printed */
    /* shaping_started, shaping_ended (id: the action's; action, scope,
     * source, domain, reply, reason, reporter: the node it started on) */
    const char *rule;
    const char *group;          /* the destination group */
    uint64_t until_ms;          /* Unix ms the action ends */
    int verified;               /* 1: the VERP token's MAC and recipient tag checked;
                                 * 0: not printed; -1: printed as false */
};

/* Recipient outcomes counted by the class of their event ("class"):
 * every failure passes here with the class the failure policy gave it. */
enum dlog_outcome { DLOG_OUT_DEFERRED, DLOG_OUT_BOUNCED, DLOG_OUT_COUNT };

/* Counters since dlog_new; each read is consistent per counter only. */
struct dlog_stats {
    /* transient_failure events (deferred) and bounce or expiration events
     * (bounced), by enum bounce_class; an unknown class counts as other */
    uint64_t outcomes[DLOG_OUT_COUNT][BOUNCE_CLASS_COUNT];
    uint64_t events;        /* lines accepted into a buffer */
    uint64_t bytes;         /* octets written to the file */
    uint64_t write_errors;  /* failed write(2) calls */
    uint64_t dropped;       /* events not logged: buffer cap reached, no memory */
    uint64_t reopens;       /* successful reopens */
    uint64_t reopen_errors; /* reopens that failed (the old file is kept) */
};

/*
 * Open path (O_APPEND|O_CREAT, mode 0640) and start the writer thread;
 * path NULL: no file (the events are only handed to the hook and captures below).
 * flush_interval_ms 0 means DLOG_FLUSH_MS_DEFAULT. Returns 0 and *out
 * (free with dlog_free), or -errno with a message for the operator in err.
 */
int dlog_new(const char *path, unsigned flush_interval_ms, struct dlog **out, char *err,
             size_t errlen);
/* Write everything buffered (one attempt; what fails is logged as lost),
 * stop the writer thread, close. Every writer must have been freed first
 * (else: panic, abort). Returns NULL. */
struct dlog *dlog_free(struct dlog *d);

/*
 * The event sinks' hook (events.h): every event logged on a writer that
 * has no capture (below) is also handed to fn, on the logging thread,
 * as one line ('\n' included). Set it before the first writer is made.
 */
void dlog_set_hook(struct dlog *d, void (*fn)(void *arg, const char *line, size_t len),
                   void *arg);

/*
 * Capture: until dlog_capture(w, NULL, ...), each event logged on w is
 * appended to buf (one line each) instead of going to the hook, so that
 * the caller commits the lines in the spool transaction of what they
 * tell (queue.h, "events"). file false: the lines go to buf only, and
 * outcome events are not counted (dlog_stats outcomes); the caller hands
 * them to the file with dlog_line (or dlog_told), and counts them with
 * dlog_count, once that commit is durable and says they apply. Owner
 * thread of w.
 */
struct json;
void dlog_capture(struct dlog_writer *w, struct json *buf, bool file);
/* Append whole preformatted lines (from a capture) to w's buffer. */
void dlog_line(struct dlog_writer *w, const char *line, size_t len);
/* The same for captured lines that the spool did not commit for the
 * event sinks: each also goes to the hook, as dlog_event would have. */
void dlog_told(struct dlog_writer *w, const char *lines, size_t len);
/* Count an outcome event of kind and class in dlog_stats (other kinds:
 * nothing), for one captured with file false. Owner thread of w. */
void dlog_count(struct dlog_writer *w, enum dlog_kind kind, enum bounce_class cls);

/* Cap the octets held in buffers not yet written (default
 * DLOG_MAX_BUFFERED, at least 2 * DLOG_BUF_SIZE). Any thread. */
void dlog_set_max_buffered(struct dlog *d, size_t bytes);

/* Ask the writer thread to reopen the same path before its next batch
 * (logrotate: rename, then SIGHUP). Lines are not split across the two
 * files (only a write that failed half-way can leave a line's tail for
 * the new file). Takes effect within one flush interval. Any thread; it
 * only sets a flag, so it is also async-signal-safe. */
void dlog_reopen(struct dlog *d);

void dlog_stats(struct dlog *d, struct dlog_stats *out);

/*
 * A per-thread handle (NULL when d is NULL or out of memory: logging is
 * then off for that thread). Borrows d, which must outlive it. Only the
 * thread that owns it may pass it to dlog_event.
 */
struct dlog_writer *dlog_writer_new(struct dlog *d);
/* Hand what is buffered to the writer thread and free. Returns NULL. */
struct dlog_writer *dlog_writer_free(struct dlog_writer *w);

/* Format one event and append it to w's buffer; never blocks on I/O. */
void dlog_event(struct dlog_writer *w, const struct dlog_event *ev);

/*
 * Replace j's text with ev as one line, '\n' included, stamped time_ms
 * (ev->time_ms is not read). Pure: for tests and the benchmark. Returns 0,
 * or -ENOMEM (then j's text is not to be used).
 */
int dlog_format(struct json *j, const struct dlog_event *ev, uint64_t time_ms);

#endif
