/*
 * queue: the durable spool. It owns the LMDB environment under the
 * configured path: messages (envelope and body, the body stored once
 * whatever the number of recipients), recipients with their delivery state,
 * and a time index of deferred recipients. Every write goes through one
 * committer thread that puts every request that arrived while the previous
 * commit was syncing into one write transaction (group commit); a request's
 * completion is delivered only once the commit holding it is durable (its
 * data and meta pages synced), so a message is on disk before its caller
 * answers 250.
 *
 * Threading:
 *  - queue_open(), queue_open_readonly() and queue_close(): one thread;
 *    nothing else may be in flight on this queue once queue_close()
 *    starts.
 *  - queue_enqueue(), queue_update(), queue_update_enqueue(),
 *    queue_due_take(), queue_id_next() and every reader:
 *    any thread, concurrently. Readers use short read transactions of
 *    their own and never hold one when they return.
 *  - A struct queue_port belongs to one owner thread, the only one that
 *    drains it; any thread may submit requests through it. Completion
 *    callbacks run on the owner thread, inside queue_port_drain().
 *
 * Errors: functions return 0 (or a count) or a negative code: -errno, or
 * one of enum queue_error below; queue_strerror() names both. Callers test
 * queue_error_is_space() to answer 452 4.3.1.
 */
#ifndef SLUICE_QUEUE_QUEUE_H
#define SLUICE_QUEUE_QUEUE_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "common/conf.h"

struct queue;
struct queue_port;

/* ---- configuration: the [queue] section ---- */

struct queue_config {
    char *path;               /* owned: spool directory */
    uint64_t map_size;        /* bytes; the spool can never grow past it */
    unsigned node_id;         /* 0..1023, part of every message id */
    bool unsafe_no_sync;      /* MDB_NOSYNC: gives up durability */
    unsigned max_batch;       /* requests per commit */
    uint64_t max_batch_bytes; /* body bytes per commit (a larger message goes alone) */
    unsigned sweep_ms;        /* a finished message's records removed within this (0: at once) */
};

/* The key table for struct queue_config (conf_defaults, conf_set, conf_free). */
extern const struct conf_key queue_conf_keys[];

/* ---- errors ---- */

/* The queue's own range, below LMDB's (-30800..-30780). Also returned:
 * -ENOSPC (disk full), -EIO (write or sync failed), -ENOMEM, -EINVAL. */
enum queue_error {
    QUEUE_EMAPFULL = -31000,  /* the spool reached map_size */
    QUEUE_ESCHEMA = -31001,   /* spool written by a newer sluice */
    QUEUE_ECORRUPT = -31002,  /* not a sluice spool, or a record failed its checks */
    QUEUE_ENOTFOUND = -31003, /* no such message or recipient */
    QUEUE_ELOCKED = -31004,   /* another process has the spool open */
    QUEUE_EPANIC = -31005,    /* LMDB gave up on the environment: restart */
    QUEUE_ECLOSED = -31006,   /* the queue is closing */
    QUEUE_EREADERS = -31007,  /* too many concurrent readers */
    QUEUE_EEXIST = -31008,    /* a message with this id is already stored */
    QUEUE_ESTORE = -31009,    /* any other LMDB failure */
    QUEUE_ESTALE = -31010,    /* an update with a message has a stale outcome: nothing applied */
};

/* Text for any code this module returns (never NULL, static storage). */
const char *queue_strerror(int rc);

/* True for the failures that mean "no room": answer 452 4.3.1 and retry
 * later; the committer stays up and later commits succeed once there is
 * room again. */
static inline bool
queue_error_is_space(int rc)
{
    return rc == QUEUE_EMAPFULL || rc == -ENOSPC;
}

/* ---- open and close ---- */

/* Open (creating the directory and an empty spool if missing) and start
 * the committer. cfg is copied. On failure returns a negative code, *out
 * is NULL and err holds one line for the operator naming the path and
 * the reason. Takes an exclusive lock on the spool for this process. */
int queue_open(const struct queue_config *cfg, struct queue **out, char *err, size_t errlen);
/* Open an existing spool to read it (tools): the environment read-only
 * (MDB_RDONLY), no committer, nothing written: an older schema stays as it
 * is (queue_open would mark it), no disk blocks are reserved, no
 * directory, spool or file is created (not sluice.lock, not LMDB's
 * lock.mdb: a copy of the data file alone, or a directory it may not
 * write, is read as it is). Every reader works; every write (enqueue,
 * update, due take, events) returns -EROFS. Takes the spool's lock
 * shared when there is one: it fails with QUEUE_ELOCKED while a
 * queue_open holds it, and keeps queue_open out until queue_close. */
int queue_open_readonly(const struct queue_config *cfg, struct queue **out, char *err,
                        size_t errlen);
/* Commit every request already submitted (their completions are pushed
 * to their ports, which the caller still drains), stop the committer and
 * close the spool. No other call on q may be in flight or follow. */
void queue_close(struct queue *q);
/* queue_close(), waiting at most ms for the committer to commit what was
 * submitted (and the notifier to push it). True: closed. False: it did
 * not end in that time (a disk that no longer answers): q is left open,
 * stopping (a submit fails with QUEUE_ECLOSED), its threads running and
 * nothing freed; queue_close() or queue_close_within() may be called
 * again, or the process exits without touching q. */
bool queue_close_within(struct queue *q, uint64_t ms);

/* ---- message ids ----
 * 64 bits: 42 bits of milliseconds since 2024-01-01 UTC, 10 bits of node
 * id, 12 bits of sequence. Unique across nodes with distinct node_id,
 * increasing on one node even when the clock steps back (the last
 * timestamp is kept and the sequence borrows milliseconds ahead) and across
 * restarts (the highest id ever stored is kept in the spool). */

#define QUEUE_ID_STRLEN   13 /* base32 text, sorts like the numbers */
#define QUEUE_ID_EPOCH_MS 1704067200000ULL

/* A new id, greater than every id this queue handed out or stored. */
uint64_t queue_id_next(struct queue *q);
/* The smallest id of this node greater than last at time now (Unix ms):
 * the pure rule behind queue_id_next(), exposed for tests and tools. */
uint64_t queue_id_after(uint64_t last, uint64_t now_unix_ms, unsigned node_id);
/* Write the 13 characters and a NUL into out. */
void queue_id_str(uint64_t id, char out[QUEUE_ID_STRLEN + 1]);
/* Parse exactly QUEUE_ID_STRLEN characters then NUL (case-insensitive).
 * Returns 0 or -EINVAL. */
int queue_id_parse(const char *s, uint64_t *id);
/* Unix milliseconds at which the id was made; its node. */
uint64_t queue_id_time_ms(uint64_t id);
unsigned queue_id_node(uint64_t id);

/* ---- envelopes ---- */

enum queue_ret { QUEUE_RET_NONE, QUEUE_RET_FULL, QUEUE_RET_HDRS };
enum queue_body_type { QUEUE_BODY_7BIT, QUEUE_BODY_8BITMIME, QUEUE_BODY_BINARYMIME };

/* DSN NOTIFY= (RFC 3461); 0 means the parameter was absent. */
enum queue_notify {
    QUEUE_NOTIFY_NEVER = 1,
    QUEUE_NOTIFY_SUCCESS = 2,
    QUEUE_NOTIFY_FAILURE = 4,
    QUEUE_NOTIFY_DELAY = 8,
};

/* Persistent recipient states. Delivered and bounced recipients are
 * removed; "in flight" is the engine's memory only, so a recipient in
 * flight at a crash is still ready (or deferred) at restart. */
enum queue_rcpt_state { QUEUE_RCPT_READY = 1, QUEUE_RCPT_DEFERRED = 2 };

#define QUEUE_MAX_RCPT  65535
#define QUEUE_MAX_ADDR  1024 /* bytes of an address (UTF-8 allowed) */
#define QUEUE_MAX_PARAM 1024 /* ENVID, ORCPT, auth user, client address */
#define QUEUE_MAX_REPLY 512  /* last reply text kept; longer is cut */
#define QUEUE_MAX_TAG   255  /* tenant, campaign, pool */
#define QUEUE_MAX_PRIORITY 9

/* Who a message belongs to, as its recipients carry it out of
 * queue_walk() and queue_due_take(): strings borrowed for the callback,
 * "" when none (or when the message record cannot be read). */
struct queue_owner {
    const char *tenant;
    const char *campaign;
    const char *pool;
    unsigned priority; /* 0..QUEUE_MAX_PRIORITY */
    bool tls_relaxed;  /* the envelope's tls_relaxed */
};

/* One recipient. As input (queue_enqueue) only addr, orcpt and notify are
 * read; the queue derives domain (the part after the last '@', ASCII
 * lowercased; "" when there is none). As output every field is set. */
struct queue_rcpt {
    const char *addr;  /* borrowed: input for the call; output: see owner */
    const char *orcpt; /* same; NULL or "" when absent, e.g. "rfc822;a@b" */
    unsigned notify;   /* enum queue_notify bits */
    /* output only */
    const char *domain; /* lowercased */
    unsigned index;     /* position in the original RCPT list */
    enum queue_rcpt_state state;
    unsigned attempts;      /* deferrals so far */
    uint64_t due_ms;        /* Unix ms of the next attempt when deferred, else 0 */
    uint64_t last_ms;       /* Unix ms of the last outcome, 0 if none */
    unsigned last_code;     /* last reply code, 0 if none */
    const char *last_reply; /* last reply text, "" if none */
    unsigned tag;           /* its last deferral's tag (queue_outcome), kept while it is
                             * ready again (queue_due_take); 0: none */
    /* its message's owner: set by queue_walk() and queue_due_take();
     * all "" and 0 from queue_envelope_get() (the envelope has it) */
    struct queue_owner owner;
};

/* A message's envelope and metadata. As input every pointer is borrowed
 * for the call and NULL means absent ("" for sender is the null sender).
 * As output (queue_envelope_get) it lives in one allocation. */
struct queue_envelope {
    uint64_t id;                    /* from queue_id_next() */
    const char *sender;             /* "" for the null sender <> */
    const char *envid;              /* ENVID=, xtext as received */
    enum queue_ret ret;             /* RET= */
    enum queue_body_type body_type; /* BODY= */
    bool smtputf8;                  /* SMTPUTF8 */
    uint64_t arrival_ms;            /* Unix ms; 0 on input: now */
    uint64_t expire_ms;             /* Unix ms after which the engine gives up; 0: none */
    const char *auth_user;          /* authenticated user */
    const char *client_addr;        /* client address as text */
    /* Who the message belongs to (engine/owner.h), each up to QUEUE_MAX_TAG
     * octets; NULL or "": none. A spool of schema 1 has none of them. */
    const char *tenant;
    const char *campaign;
    const char *pool;
    unsigned priority;              /* 0..QUEUE_MAX_PRIORITY, higher goes first */
    /* Delivered despite TLS failures (a TLS report by mail, RFC 8460 3):
     * the engine gives it opportunistic TLS, no MTA-STS, DANE or required
     * TLS. A flag bit of the message record that older versions ignore. */
    bool tls_relaxed;
    /* Output only: a QUEUE_WARNED outcome applied (its delay warning went).
     * A flag bit of the message record that older versions ignore. */
    bool delay_warned;
    uint64_t body_len;              /* output only */
    unsigned nrcpt;                 /* output: live recipients only, in index order */
    struct queue_rcpt *rcpt;        /* nrcpt entries */
};

/* ---- ports: where completions come back ---- */

/* A port with its own eventfd. Returns NULL with errno set on failure. */
struct queue_port *queue_port_new(void);
/* Free a port. Every request submitted through it must have completed
 * and been drained (queue_port_pending() == 0): freeing earlier panics.
 * Returns NULL. */
struct queue_port *queue_port_free(struct queue_port *port);
/* Readable (an eventfd) when completions wait: poll it, e.g. with
 * IORING_OP_POLL_ADD, then call queue_port_drain(). */
int queue_port_fd(const struct queue_port *port);
/* Owner thread only. Clear the fd, then run the callback of every
 * completed request, in completion order. Callbacks may submit new
 * requests and may free the port if nothing else is pending. Returns the
 * number of callbacks run. */
int queue_port_drain(struct queue_port *port);
/* Owner thread only: wait up to timeout_ms (-1: forever) for the fd, then
 * drain. For tools and tests; a worker polls the fd instead. Returns the
 * number of callbacks run, or -errno. */
int queue_port_wait(struct queue_port *port, int timeout_ms);
/* Requests submitted through the port whose callbacks have not run. */
unsigned queue_port_pending(const struct queue_port *port);

/* Completion of a request: rc is 0 once its commit is durable, else a
 * negative code (QUEUE_EMAPFULL, -ENOSPC, -EIO, QUEUE_EPANIC, ...). */
typedef void queue_done_fn(void *cookie, int rc);

/* Walk callbacks see a recipient of message id; r and its strings are
 * valid only during the call. Returning non-zero stops the walk, which
 * then returns that value. Callbacks must not wait: a read transaction is
 * open around them (it is renewed every few thousand records, so a long
 * walk sees later commits and never pins the spool for long). */
typedef int queue_rcpt_fn(void *arg, uint64_t id, const struct queue_rcpt *r);

/* ---- writes ---- */

/* Submit a message. env and the iovec array are copied before returning;
 * the body bytes are borrowed: they must stay unchanged until done has run
 * (no copy of the body is made before the commit writes it). The body is
 * the message as it will be sent (CRLF lines, not dot-stuffed), any size:
 * large bodies are split into 256 KiB records. Returns 0 and later runs
 * done(cookie, rc) on port's owner thread, exactly once; or returns a
 * negative code now (-EINVAL for a bad envelope, QUEUE_ECLOSED, -ENOMEM)
 * and done never runs. */
int queue_enqueue(struct queue *q, struct queue_port *port, const struct queue_envelope *env,
                  const struct iovec *body, unsigned iovcnt, queue_done_fn *done, void *cookie);

enum queue_outcome_kind {
    QUEUE_DELIVERED, /* removes the recipient */
    QUEUE_BOUNCED,   /* removes the recipient (the DSN is the engine's) */
    QUEUE_DEFERRED,  /* keeps it, due again at due_ms, with the reply */
    QUEUE_RETIME,    /* a deferred one is due at due_ms instead; attempts and reply kept
                      * (an operator's flush); anything else is left alone */
    QUEUE_WARNED,    /* the message (id; the rest ignored) had its delay warning: marked
                      * so (queue_envelope.delay_warned), once: stale when it is marked
                      * already or gone, so that of two crossing, one applies */
};

/* One recipient outcome. The message goes with its last recipient: from
 * then on every read says it is not stored, and its record and body are
 * removed by the next sweep ([queue] sweep_ms, queue_int.h "gone").
 * An outcome for a recipient that is no longer stored (already removed,
 * e.g. a retry after a crash) is ignored and counted in the stats (stale);
 * so is a QUEUE_DEFERRED one for a recipient deferred already with the
 * same due_ms, code, tag and reply: the same deferral tried again after
 * a commit that did happen was reported failed (its sync), whose attempt
 * and event must count once. */
struct queue_outcome {
    uint64_t id;
    unsigned rcpt; /* struct queue_rcpt.index */
    enum queue_outcome_kind kind;
    uint64_t due_ms;   /* QUEUE_DEFERRED: Unix ms of the next attempt */
    unsigned code;     /* reply code, 0 if none (e.g. connection failure) */
    const char *reply; /* borrowed for the call; NULL or text, cut at QUEUE_MAX_REPLY */
    unsigned tag;      /* QUEUE_DEFERRED: the caller's kind of failure, 1..QUEUE_TAGS-1
                        * (0: none), kept with the recipient until its next outcome
                        * and counted per domain by queue_counts() (sluice's: its
                        * failure class + 1); opaque to the spool but for
                        * QUEUE_TAG_HELD (below) */
    bool untried;      /* QUEUE_DEFERRED: deferred without being tried (its destination
                        * rests); its attempts stay as they are */
    const void *note;  /* borrowed for the call (copied), or NULL: a note committed with
                        * this outcome when it applies (see "notes" below) */
    size_t note_len;   /* its octets, at most QUEUE_NOTE_MAX */
};

/* A recipient deferred with this tag is held: its outcome is final for
 * the caller, which reports it later (sluice: a failure whose DSN waits
 * for the rest of its message). Only an outcome that carries this tag
 * too (any kind) changes it; any other is stale, as for a recipient
 * already removed: it crossed the hold. QUEUE_RETIME moves it as any
 * deferred one. */
#define QUEUE_TAG_HELD (QUEUE_TAGS - 1)

/* Submit n outcomes, committed together. outcomes is copied. Same
 * contract as queue_enqueue(). When the spool is full, updates are still
 * committed (they free room) ahead of the enqueues of the same batch; an
 * update fails with a space error only when even the reserve kept for
 * them is gone, and the caller retries it later. */
int queue_update(struct queue *q, struct queue_port *port, const struct queue_outcome *outcomes,
                 size_t n, queue_done_fn *done, void *cookie);

/* queue_update() plus one new message (a DSN the outcomes cause),
 * committed in the same write transaction: both are durable, or neither.
 * env and the iovecs are copied, the body bytes borrowed until done has
 * run, as for queue_enqueue(). The message is admitted as an update: it
 * may use the first half of the reserve kept for updates (a bounce frees
 * its original's recipient, and mass bounces come when the spool is
 * full); the other half stays for updates that only delete. When its
 * half is gone the request fails whole with a space error (outcomes
 * included: the recipients stay as they were) and the caller retries it
 * once deliveries have made room. It is left
 * out when every outcome of the request is stale (a retry of a commit
 * that did happen: the message is already stored), and a message with
 * the same id already stored is not an error, for the same reason. When
 * only some are stale the request is refused whole: QUEUE_ESTALE (see
 * queue_update_enqueue_events). Returns as queue_update(), or -EINVAL
 * for a bad envelope. */
int queue_update_enqueue(struct queue *q, struct queue_port *port,
                         const struct queue_outcome *outcomes, size_t n,
                         const struct queue_envelope *env, const struct iovec *body,
                         unsigned iovcnt, queue_done_fn *done, void *cookie);

/* Blocking forms for tools and tests: submit through a private port and
 * wait. Return the completion code. */
int queue_enqueue_wait(struct queue *q, const struct queue_envelope *env, const struct iovec *body,
                       unsigned iovcnt);
int queue_update_wait(struct queue *q, const struct queue_outcome *outcomes, size_t n);
int queue_update_enqueue_wait(struct queue *q, const struct queue_outcome *outcomes, size_t n,
                              const struct queue_envelope *env, const struct iovec *body,
                              unsigned iovcnt);

/* ---- events: records committed with what they describe ----
 *
 * The event lines of a request (engine/events.h: one JSON object a line,
 * each ended by '\n') are written in the same write transaction as its
 * message or outcomes, to the "events" database, and numbered there: the
 * first line of the first record gets the number after the last one
 * committed, and so on, in commit order. So a reception (committed with
 * its message) is numbered below every outcome of that message (which
 * can only be committed after it), and an event is durable exactly when
 * what it tells is. The events module copies the durable records to its
 * journal under the same numbers, then trims them here.
 *
 * An update's lines are split between its outcomes and itself (ev_lines
 * below): each outcome's lines are written only when that outcome
 * applies, not when it is ignored as stale (a recipient an operator
 * bounced meanwhile is not told delivered too); the request's own lines
 * (a DSN's, say) when at least one of its outcomes applies. So a retry
 * of a commit that did happen writes none: they were written then. An
 * enqueue's lines are written with its message (not for QUEUE_EEXIST). */

/* queue_enqueue() and queue_update_enqueue() with event lines (events
 * NULL or len 0: none). The lines are copied. ev_lines: NULL, or n
 * counts (copied): outcomes[0] is told by the first ev_lines[0] lines,
 * outcomes[1] by the ev_lines[1] lines after them, and so on; the lines
 * after all of theirs are the request's own. NULL: every line is the
 * request's. -EINVAL also when the text does not end with '\n', or when
 * the counts add up to more lines than it has.
 *
 * applied: NULL, or n flags of the caller's, which must stay valid until
 * done has run; set on port's owner thread just before done runs with 0
 * or QUEUE_ESTALE: applied[i] says whether outcomes[i] applied (0), or
 * would have (QUEUE_ESTALE), as opposed to being ignored as stale. So
 * the caller tells (counts, logs, suppresses) exactly the outcomes the
 * spool applied, decided in the commit itself, whatever crossed them.
 *
 * The message an update carries (a DSN) names some of its recipients,
 * and must not be stored with an outcome of theirs that is stale: it
 * would say "failed" of a recipient delivered meanwhile, or name it a
 * second time. So when some outcome of such a request is stale and some
 * other is not, the whole request is refused in the commit, nothing of
 * it applied (no outcome, no message, no line): done gets QUEUE_ESTALE
 * with the flags set, and the caller submits again without the stale
 * outcomes and with a message that names the others only (or none).
 * When every outcome is stale the request applies nothing, as above,
 * and done gets 0. */
int queue_enqueue_events(struct queue *q, struct queue_port *port,
                         const struct queue_envelope *env, const struct iovec *body,
                         unsigned iovcnt, const char *events, size_t events_len,
                         queue_done_fn *done, void *cookie);
int queue_update_enqueue_events(struct queue *q, struct queue_port *port,
                                const struct queue_outcome *outcomes, size_t n,
                                const struct queue_envelope *env, const struct iovec *body,
                                unsigned iovcnt, const char *events, size_t events_len,
                                const unsigned *ev_lines, bool *applied, queue_done_fn *done,
                                void *cookie);
/* Event lines alone (events that change nothing in the spool: a
 * recipient refused as suppressed, a bounce that came back by mail).
 * done gets 0 also when the sync after a commit that holds them fails:
 * they are in the spool and published durable (queue_events_durable), so
 * they reach the journal; a negative rc means they were not stored. */
int queue_events_put(struct queue *q, struct queue_port *port, const char *events,
                     size_t events_len, queue_done_fn *done, void *cookie);
/* Delete the records whose lines are all numbered below upto (they are
 * in the journal), and remember the next number for the restart. */
int queue_events_trim(struct queue *q, struct queue_port *port, uint64_t upto,
                      queue_done_fn *done, void *cookie);

/* One record: seq is the number of its first line; text holds whole
 * lines and is valid during the call only (a read transaction is open:
 * do not wait). Non-zero stops the read. */
typedef int queue_events_fn(void *arg, uint64_t seq, const char *text, size_t len);
/* The durable records that hold numbers at or above from, in order, until
 * about max_bytes were passed. The first record may start below from
 * (the caller skips its first lines). Returns how many records were
 * passed, or a negative code. */
int queue_events_read(struct queue *q, uint64_t from, size_t max_bytes, queue_events_fn *cb,
                      void *arg);
/* The number after the last durable event line. Any thread. */
uint64_t queue_events_durable(struct queue *q);
/* Number the next lines at least from seq (the journal is ahead of a
 * spool made anew). Any thread. */
void queue_events_floor(struct queue *q, uint64_t seq);
/* fn(arg) on the committer thread each time queue_events_durable moves
 * (it only wakes someone); NULL: none. The call and the change are under
 * one lock: once this returns, the old hook is no longer running. */
void queue_events_set_hook(struct queue *q, void (*fn)(void *arg), void *arg);

/* ---- notes: the caller's to-do, committed with what causes it ----
 *
 * A note is an opaque record (1..QUEUE_NOTE_MAX octets) written in the
 * same write transaction as an outcome (struct queue_outcome note: only
 * when that outcome applies, as its event lines) or as event lines
 * (queue_events_note_put), to the "notes" database, numbered in commit
 * order. It stays there until queue_notes_trim(): its reader acts on
 * it (sluice: the suppression entry of a hard bounce or a complaint,
 * engine/suppress.h), then trims; what a crash cut between the commit and
 * the act is still there at the next start. */
#define QUEUE_NOTE_MAX 1024

/* queue_events_put() with a note (NULL: none); events may be NULL (len 0)
 * when a note is given. Same contract otherwise; -EINVAL for a note over
 * QUEUE_NOTE_MAX or neither lines nor a note. */
int queue_events_note_put(struct queue *q, struct queue_port *port, const char *events,
                          size_t events_len, const void *note, size_t note_len,
                          queue_done_fn *done, void *cookie);
/* One note: seq its number, note valid during the call only (a read
 * transaction is open: do not wait). Non-zero stops the read. */
typedef int queue_note_fn(void *arg, uint64_t seq, const void *note, size_t len);
/* The notes committed so far numbered at or above from, in order, at most
 * max of them (0: all). Any thread. Returns how many were passed, or a
 * negative code. */
int queue_notes_read(struct queue *q, uint64_t from, unsigned max, queue_note_fn *cb, void *arg);
/* Delete the notes numbered below upto: done(cookie, rc) on port's owner
 * thread once committed (rc 0) or refused, exactly once; or returns a
 * negative code (and done is not called). */
int queue_notes_trim(struct queue *q, struct queue_port *port, uint64_t upto,
                     queue_done_fn *done, void *cookie);
/* queue_notes_trim() waited for, without bound (a thread that may block:
 * not a worker). Returns the completion code. */
int queue_notes_trim_wait(struct queue *q, uint64_t upto);
/* fn(arg) on the committer thread after each commit that wrote a note
 * (it only wakes someone); NULL: none. Once this returns, the old hook is
 * no longer running. */
void queue_notes_set_hook(struct queue *q, void (*fn)(void *arg), void *arg);

/* Take the deferred recipients due at or before now_ms (Unix ms, the
 * caller's clock), at most limit of them (0: no limit), in due order: in
 * one write transaction they leave the time index and become ready
 * (attempts and last reply kept). Once that commit is durable (or made,
 * when the sync after it fails: the spool lists them ready now, so they
 * are the caller's all the same), cb(arg, id, r) runs for each on port's
 * owner thread (r as in queue_walk, state ready; its return value is
 * ignored), then done(cookie, rc); on failure cb never runs and the
 * recipients stay deferred. The caller now owns them as it owns the
 * ready ones it found at start: it must deliver them or record an
 * outcome; after a crash they are ready, found by the start-up walk.
 * There is no position to keep: the index holds only what nobody took,
 * so a wall clock that steps back or forward changes nothing but which
 * recipients are due (each when now_ms reaches its time). Returns 0 or a
 * negative code now (-EINVAL, QUEUE_ECLOSED, -ENOMEM), then done never
 * runs. A take that finds nothing due writes nothing (no commit, no
 * sync), so polling it every second costs an idle spool nothing. */
int queue_due_take(struct queue *q, struct queue_port *port, uint64_t now_ms, unsigned limit,
                   queue_rcpt_fn *cb, void *arg, queue_done_fn *done, void *cookie);
/* Blocking form: returns how many were taken, or a negative code. */
int queue_due_take_wait(struct queue *q, uint64_t now_ms, unsigned limit, queue_rcpt_fn *cb,
                        void *arg);

/* ---- reads ---- */

/* The envelope and live recipients of message id, in index order. *out
 * is one allocation owned by the caller (free with queue_envelope_free);
 * it does not change when the spool does. Returns 0 or QUEUE_ENOTFOUND or
 * another code. */
int queue_envelope_get(struct queue *q, uint64_t id, struct queue_envelope **out);
/* Free an envelope from queue_envelope_get (NULL is fine). Returns NULL. */
struct queue_envelope *queue_envelope_free(struct queue_envelope *env);
/* The live recipient of env (from queue_envelope_get) at position index
 * of the original RCPT list, or NULL (done, or never there): a binary
 * search, so that a job of many recipients does not scan the envelope
 * once for each. Borrowed from env. */
const struct queue_rcpt *queue_envelope_rcpt(const struct queue_envelope *env, unsigned index);

/* Copy up to cap bytes of the body of id, from offset off, into buf;
 * *len gets the count (0 at or past the end). The copy is the only way to
 * the bytes: no pointer into the spool escapes and no read transaction
 * outlives the call, so a delivery may send from buf across any network
 * wait. Read a large body in pieces. Returns 0 or QUEUE_ENOTFOUND or
 * another code. */
int queue_body_read(struct queue *q, uint64_t id, uint64_t off, void *buf, size_t cap, size_t *len);

/* Unmap the spool's pages from this process (they stay in the page cache;
 * the next read of one refaults it): what readers touched stops counting
 * in the RSS. Any thread, any time; cheap enough for once a second. */
void queue_map_trim(struct queue *q);

/* Every stored recipient, in (message id, index) order: ready ones and
 * deferred ones with their due time. To rebuild the ready queues at start.
 * A record that fails its checks is skipped, not returned: the walk goes
 * on to the next one, and the record is counted (queue_stats corrupt)
 * and logged with its key, once per record and process, so one bad
 * record never keeps the recipients behind it waiting. queue_check()
 * and sluice-spool check report them. Returns 0, a callback's non-zero
 * value, or a negative code. */
int queue_walk(struct queue *q, queue_rcpt_fn *cb, void *arg);

/* Position in the time index of deferred recipients; all zero is the
 * start. queue_due() moves it past what it returned. */
struct queue_due_pos {
    uint64_t due_ms;
    uint64_t id;
    unsigned rcpt;
};

/* A read-only view of the time index, for tools and tests: deferred
 * recipients due at or before now_ms, in due order, after *pos, at most
 * limit of them (0: no limit). Returns how many the callback saw, or a
 * negative code (a callback's negative return stops the scan and is
 * returned; a positive one stops it too). A recipient deferred again to a
 * time behind *pos (e.g. a flush to "now", or any deferral after the wall
 * clock stepped back) is seen only after *pos is zeroed: to hand
 * recipients out, use queue_due_take(), which keeps no position. Records
 * that fail their checks are skipped and counted as in queue_walk(). */
int queue_due(struct queue *q, struct queue_due_pos *pos, uint64_t now_ms, unsigned limit,
              queue_rcpt_fn *cb, void *arg);

#define QUEUE_TAGS 16

struct queue_counts {
    uint64_t messages; /* totals only */
    uint64_t ready;    /* recipients */
    uint64_t deferred; /* recipients */
    uint64_t bytes;    /* totals only: the pages the messages take (envelopes, bodies,
                        * recipients and their due index; of finished ones waiting for
                        * their sweep only their share of a leaf), not those LMDB keeps
                        * free */
    /* Per domain only (zero in the totals): */
    uint64_t oldest_ms; /* queue_id_time_ms() of its oldest recipient, ready or deferred,
                         * a held one (QUEUE_TAG_HELD) left out: it waits for no try */
    uint64_t deferred_by_tag[QUEUE_TAGS]; /* its deferred recipients by their last
                                           * outcome's tag ([0]: none, e.g. stored
                                           * by an earlier version) */
};

typedef int queue_domain_fn(void *arg, const char *domain, const struct queue_counts *c);

/* Totals in *total, cheaply (from the databases' entry and page counts). When cb is
 * not NULL, also the counts per recipient domain, which scans every
 * recipient (for operators, not hot paths); cb is called once per domain
 * after the scan, with no transaction open. Returns 0 or a code. */
int queue_counts(struct queue *q, struct queue_counts *total, queue_domain_fn *cb, void *arg);

#define QUEUE_CHECK_LIST 32

/* One problem queue_check() found: where, what, and the record's key. */
struct queue_check_problem {
    char db[8];    /* "msg", "body", "rcpt" or "due" */
    char what[16]; /* "bad_record", "empty_message", "bad_body", "orphan_rcpt", "bad_due" */
    char key[40];  /* the key in hex (at most 18 octets) */
    uint64_t id;   /* the message id in the key, 0 if the key is too short */
};

/* Result of queue_check(). */
struct queue_check_report {
    uint64_t messages, recipients, deferred, body_chunks;
    uint64_t bad_records;    /* records that do not decode */
    uint64_t orphan_rcpts;   /* recipients without their message */
    uint64_t empty_messages; /* messages without any recipient */
    uint64_t bad_bodies;     /* chunked bodies missing chunks or bytes, stray chunks */
    uint64_t bad_due;        /* index entries and deferred recipients that disagree */
    unsigned nlisted;        /* the first QUEUE_CHECK_LIST problems, in scan order */
    struct queue_check_problem listed[QUEUE_CHECK_LIST];
    const char *lmdb_damage; /* static: LMDB's words for the error (MDB_CORRUPTED,
                              * MDB_PAGE_NOTFOUND, or MDB_BAD_TXN after one of them)
                              * that ended the walk, a page damaged inside; the
                              * problems counted before it may be its echoes. NULL:
                              * none */
};

/* Verify the whole spool in one read snapshot (slow: for tools and tests).
 * Returns 0 when consistent, QUEUE_ECORRUPT when the report counts a
 * problem or LMDB found a damaged page (report->lmdb_damage), or another
 * code. */
int queue_check(struct queue *q, struct queue_check_report *report);

/* ---- stats ---- */

struct queue_stats {
    uint64_t commits;         /* successful write transactions */
    uint64_t commit_failures; /* aborted ones (space, I/O, ...) */
    uint64_t enqueued;        /* messages committed */
    uint64_t enqueued_rcpts;
    uint64_t enqueued_bytes;  /* body bytes committed */
    uint64_t enqueue_refused; /* refused for lack of room */
    uint64_t outcomes;        /* recipient outcomes committed */
    uint64_t outcomes_stale;  /* outcomes for recipients no longer stored */
    uint64_t taken;           /* deferred recipients made ready by queue_due_take() */
    uint64_t corrupt;         /* records skipped because they fail their checks */
    uint64_t removed;         /* messages finished with their last recipient, and those
                               * removed unconfirmed (unconfirmed_removed) */
    uint64_t swept;           /* of them, those whose record and body a sweep removed */
    uint64_t batch_max;       /* most requests in one commit */
    uint64_t commit_us_total; /* time in commits, to average */
    uint64_t commit_us_max;
    uint64_t backlog;  /* requests waiting for the committer */
    uint64_t map_size; /* bytes */
    uint64_t map_used; /* bytes up to the highest page in use (free pages inside count) */
    uint64_t event_lines;  /* event lines committed with their requests */
    uint64_t events_kept;  /* event records in the spool, not yet trimmed */
    uint64_t notes_kept;   /* notes in the spool, not yet trimmed (queue_notes_trim) */
    /* After a sync failed: messages answered 451 whose records were then
     * removed (their commit had landed), and enqueues refused while that
     * removal could not be made durable (the spool was failing). */
    uint64_t unconfirmed_removed;
    uint64_t sync_failing_refused;
};

/* Copy the counters (each read atomically; any thread, no lock). */
void queue_stats(struct queue *q, struct queue_stats *out);

#endif
