/*
 * queue_int.h: what the files of the spool share (not a public header:
 * the files below include it; everyone else goes through queue/queue.h):
 * the records on disk and their keys, the requests, ports and struct
 * queue, and the calls between the files.
 *
 *   queue/queue.c   requests: built on the caller's thread and handed to
 *                   the committer (submit), completion ports and their
 *                   drain, the _wait wrappers, ids, LMDB codes to ours;
 *   queue/commit.c  the committer thread (a batch in one write
 *                   transaction, admission against the map and the disk,
 *                   the disk reserve, group commit and durability, when
 *                   to sweep) and the notifier thread;
 *   queue/apply.c   what a write transaction writes: an enqueue, an
 *                   outcome (unless stale), event lines and their trim,
 *                   the due recipients taken, the finished messages
 *                   handed to the sweep and the sweep, a message dropped
 *                   whole;
 *   queue/open.c    opening a spool (lock, environment, schema, the id
 *                   and event numbers, the sweep a crash left, the
 *                   threads) and closing it;
 *   queue/read.c    every read of the spool (envelopes, bodies, walks,
 *                   the due index, counts, check, event records, stats,
 *                   the map trim) and the record readers the committer
 *                   shares;
 *   queue/id.c      message ids; queue/config.c  the [queue] keys.
 *
 * Threading: callers build a request on their own thread (envelope and
 * recipients serialized there, so the committer only copies bytes) and
 * append it to the inbound list under q->mu. The committer takes up to
 * max_batch requests, applies them all in one write transaction, commits,
 * and only then hands the batch to the notifier thread (q->nmu), which
 * pushes each request onto its port (port->mu) and wakes the port's
 * eventfd while the committer is already on the next batch. The port
 * owner runs the callbacks and frees the requests, so requests are
 * allocated and freed on the caller's thread.
 * Readers take a read transaction of their own (MDB_NOTLS) and end it
 * before returning. Fields marked "committer only" are touched by no
 * other thread once the committer has started; "notifier only" likewise.
 * A spool opened read-only (queue_open_readonly, for the tools) has an
 * MDB_RDONLY environment and neither thread: submit() refuses every
 * write, and opening it changes nothing on disk, not even an older
 * schema number or the blocks reserved for a full disk (commit.c), and
 * makes no file (neither sluice.lock nor lock.mdb: see open_spool).
 *
 * On disk (one LMDB environment, a directory with data.mdb and lock.mdb,
 * plus sluice.lock which keeps a second process out):
 *
 *   meta  "schema"  -> u32 schema version (a newer one is refused)
 *         "created" -> u64 Unix ms
 *         "last_id" -> u64 highest message id ever stored (ids stay unique
 *                      even if the clock steps back across a restart)
 *   msg   id (8 bytes big-endian, so keys sort by time) ->
 *         struct msg_head (flags: BODY=, SMTPUTF8, and tls_relaxed and the
 *         delay warning's mark, bits that older versions ignore), then
 *         sender, envid, auth user, client address, tenant, campaign, pool
 *         (no NULs, lengths in the head), then the
 *         body when it is at most BODY_INLINE_MAX: one put per message on
 *         the hot path. Schema 2 added tenant, campaign, pool and priority
 *         in what schema 1 wrote as a zero "reserved" word, so a schema 1
 *         record reads as a message without them; opening a schema 1
 *         spool marks it 2 (an older sluice then refuses it rather than
 *         misreading the new records).
 *   body  id + chunk number (4 bytes BE) -> BODY_CHUNK bytes of a larger body.
 *         Chunks keep every LMDB allocation at 64 contiguous pages at most:
 *         a 10 MB value would need 2560 contiguous free pages, which a
 *         fragmented free list rarely has, so the file would grow instead.
 *   rcpt  id + index (2 bytes BE) -> struct rcpt_head, then address,
 *         lowercased domain, ORCPT, last reply text. Delivered and bounced
 *         recipients are deleted; their message's record and body go at
 *         the next sweep of "gone" (a record with no recipient left is a
 *         finished message to every reader). The
 *         head's tag (the caller's kind of a deferral, queue_outcome) sits
 *         in what earlier versions wrote as a zero reserved word: their
 *         records read as untagged, and they ignore it.
 *   due   due ms (8 BE) + id + index -> empty: the deferred recipients in
 *         time order that nobody took yet. queue_due_take() removes what
 *         is due and makes it ready in one commit, so the index itself is
 *         the poll's position: nothing in memory can hide an entry when
 *         the wall clock steps back.
 *   events  seq (8 BE) -> event lines (see queue.h): the lines a request
 *         carried, written in its transaction; seq numbers the first line,
 *         the next record starts after the last. Trimmed once the events
 *         module has them in its journal; meta "ev_next" keeps the next
 *         number across a trim that emptied it. Created when missing (an
 *         older sluice leaves it alone: no schema change).
 *   gone  seq (8 BE) -> message ids (8 bytes each, native): the messages
 *         whose last recipient a commit deleted, their records and
 *         bodies left for the sweep (apply_sweep), which deletes them
 *         in key order and empties this table in a commit of its own
 *         (commit.c, gone_sweep: before a batch or when idle, once
 *         GONE_SWEEP_N wait or the first has waited [queue] sweep_ms;
 *         when an enqueue finds the spool short of room; at close; and
 *         at open, in the opening transaction). Short of room for all
 *         of them, a sweep takes the first half (down to one) and leaves
 *         the table as it is: the next sweep finds those records gone,
 *         and the readers count only the records still there. An id
 *         whose message has a recipient left is never swept (logged; the
 *         check reports it). A
 *         commit's removals are then one record at the table's end
 *         instead of a leaf of "msg" and a free overflow page for each
 *         message: deliveries out of arrival order (many domains) made
 *         those fall on pages of their own (bench/README.md, "A
 *         message's record removed by a sweep"). Created when missing;
 *         an older sluice ignores it and keeps the records it names
 *         (their recipients are gone, so they are never delivered again).
 *
 * Records are native-endian (LMDB files are not portable across
 * architectures anyway) and carry lengths that readers check before use.
 * A record that fails them is skipped by every scan (walk, take, counts,
 * envelope reads), counted and logged once with its key: one bad record
 * never stops the recipients behind it.
 */
#ifndef SLUICE_QUEUE_QUEUE_INT_H
#define SLUICE_QUEUE_QUEUE_INT_H

#include <endian.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "common/fault.h"
#include "queue/queue.h"

#define MSG_MAGIC       0x314d5153u /* "SQM1" */
#define BODY_INLINE_MAX (256u * 1024)
#define BODY_CHUNK      (256u * 1024)
#define RCPT_REC_MAX                                                                               \
    (sizeof(struct rcpt_head) + 2 * QUEUE_MAX_ADDR + QUEUE_MAX_PARAM + QUEUE_MAX_REPLY)

/* ---- records ---- */

enum {
    MSG_F_8BITMIME = 1,
    MSG_F_BINARYMIME = 2,
    MSG_F_SMTPUTF8 = 4,
    MSG_F_TLS_RELAXED = 8,
    MSG_F_WARNED = 16, /* its delay warning went (QUEUE_WARNED) */
};

struct msg_head {
    uint32_t magic;
    uint8_t flags;
    uint8_t ret;
    uint16_t nrcpt;       /* recipients at enqueue */
    uint32_t body_chunks; /* 0: the body follows the strings in this record */
    /* schema 2 (zero in schema 1, where this word was reserved): */
    uint8_t tenant_len, campaign_len, pool_len;
    uint8_t priority;
    uint16_t sender_len, envid_len, auth_len, client_len;
    uint64_t arrival_ms;
    uint64_t expire_ms;
    uint64_t body_len;
};
_Static_assert(sizeof(struct msg_head) == 48, "msg_head is an on-disk format");

struct rcpt_head {
    uint8_t state;
    uint8_t notify;
    uint16_t attempts;
    uint16_t code;
    uint16_t addr_len, domain_len, orcpt_len, reply_len;
    uint16_t tag; /* a deferral's queue_outcome tag; 0: none (and in records of
                   * versions that wrote it as a zero "reserved" word) */
    uint64_t due_ms;
    uint64_t last_ms;
};
_Static_assert(sizeof(struct rcpt_head) == 32, "rcpt_head is an on-disk format");

#define MSG_KEY_LEN  8
#define RCPT_KEY_LEN 10
#define BODY_KEY_LEN 12
#define DUE_KEY_LEN  18

static inline void
msg_key(unsigned char *k, uint64_t id)
{
    uint64_t be = htobe64(id);
    memcpy(k, &be, 8);
}

static inline void
rcpt_key(unsigned char *k, uint64_t id, unsigned idx)
{
    msg_key(k, id);
    k[8] = (unsigned char)(idx >> 8);
    k[9] = (unsigned char)idx;
}

static inline void
body_key(unsigned char *k, uint64_t id, uint32_t chunk)
{
    msg_key(k, id);
    uint32_t be = htobe32(chunk);
    memcpy(k + 8, &be, 4);
}

static inline void
due_key(unsigned char *k, uint64_t due, uint64_t id, unsigned idx)
{
    msg_key(k, due);
    rcpt_key(k + 8, id, idx);
}

static inline uint64_t
key_u64(const void *p)
{
    uint64_t be;
    memcpy(&be, p, 8);
    return be64toh(be);
}

static inline unsigned
key_u16(const unsigned char *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

/* Check a msg record and return its head; strings and inline body follow. */
static inline bool
msg_decode(const MDB_val *v, struct msg_head *h)
{
    if (v->mv_size < sizeof(*h))
        return false;
    memcpy(h, v->mv_data, sizeof(*h));
    size_t strings = (size_t)h->sender_len + h->envid_len + h->auth_len + h->client_len +
                     h->tenant_len + h->campaign_len + h->pool_len;
    size_t body = h->body_chunks ? 0 : h->body_len;
    return h->magic == MSG_MAGIC && h->nrcpt > 0 && h->body_len <= SIZE_MAX - strings &&
           v->mv_size == sizeof(*h) + strings + body;
}

static inline size_t
msg_head_len(const struct msg_head *h)
{
    return sizeof(*h) + h->sender_len + h->envid_len + h->auth_len + h->client_len +
           h->tenant_len + h->campaign_len + h->pool_len;
}

static inline bool
rcpt_decode(const MDB_val *v, struct rcpt_head *h)
{
    if (v->mv_size < sizeof(*h))
        return false;
    memcpy(h, v->mv_data, sizeof(*h));
    return (h->state == QUEUE_RCPT_READY || h->state == QUEUE_RCPT_DEFERRED) &&
           v->mv_size ==
               sizeof(*h) + (size_t)h->addr_len + h->domain_len + h->orcpt_len + h->reply_len;
}

/* ---- requests and ports ---- */

enum req_kind { REQ_ENQUEUE, REQ_UPDATE, REQ_TAKE, REQ_EVENTS, REQ_TRIM, REQ_NOTES_TRIM };

struct upd_item {
    uint64_t id;
    uint64_t due_ms;
    const char *reply; /* borrowed: points into the request's data */
    const void *note;  /* borrowed: into the request's data, or NULL */
    size_t note_len;
    size_t ev_len;     /* octets of the request's event lines that tell this outcome */
    unsigned ev_lines; /* ... and their count (queue_update_enqueue_events) */
    uint32_t rcpt;
    uint16_t code;
    uint16_t reply_len;
    uint8_t kind;
    uint8_t tag;
    bool untried; /* QUEUE_DEFERRED: no attempt counted */
    bool applied; /* committer: not stale in the last transaction tried (QUEUE_ESTALE:
                   * would not have been); read by the owner once the request is back */
};

struct queue_req {
    struct queue_req *next;  /* inbound list, then the port's list */
    struct queue_port *port; /* borrowed: the caller keeps it until the callback ran */
    queue_done_fn *done;
    void *cookie;
    int rc;
    enum req_kind kind;
    uint64_t cost; /* body bytes, against max_batch_bytes */
    bool has_msg;  /* REQ_ENQUEUE, or a REQ_UPDATE carrying a message (enq) */
    bool applied;  /* committer only: some outcome of this update was not stale */
    bool *applied_out; /* borrowed, or NULL: the caller's flags, set before done runs */
    /* Event lines to commit with the request (into data), or none; for
     * REQ_TRIM ev_seq is the bound. */
    const char *ev_text;
    size_t ev_len;
    uint64_t ev_lines;
    uint64_t ev_seq;
    /* REQ_EVENTS: a note (into data) or none; REQ_NOTES_TRIM: the bound */
    const void *note;
    size_t note_len;
    uint64_t note_upto;
    struct {
        uint64_t id;
        uint64_t body_len;
        const struct iovec *iov; /* into data: the caller's iovecs, copied */
        unsigned iovcnt;
        unsigned nrcpt;
        uint32_t chunks;
        size_t head_len;
        const unsigned char *head;  /* into data: the msg record's head */
        const unsigned char *rcpts; /* into data: nrcpt times (u32 len, record, pad to 4) */
        size_t rcpt_bytes;
    } enq;
    union {
        struct {
            size_t n;
            struct upd_item *items; /* into data */
        } upd;
        struct {
            uint64_t now_ms;
            unsigned limit;
            queue_rcpt_fn *cb;
            void *arg;
            unsigned char *buf; /* owned: what was taken, see take_append */
            size_t len, cap;
            unsigned n;
        } take;
    } u;
    uint64_t data[]; /* 8-aligned serialized payload */
};

struct queue_port {
    int efd;
    pthread_mutex_t mu;
    struct queue_req *head, *tail; /* completed, not drained; guarded by mu */
    atomic_uint pending;           /* submitted, callback not yet run */
    /* only the thread delivering this port's completions (see deliver) */
    uint64_t mark;
    struct queue_req *chain_head, *chain_tail;
};

/* What a take found, as the committer wrote it into the request: per
 * recipient a struct take_rec, then its record, padded to 8. */
struct take_rec {
    uint64_t id;
    uint32_t index;
    uint32_t len;                 /* of the record; the owner's strings follow it */
    uint8_t tenant_len, campaign_len, pool_len, priority;
    bool tls_relaxed;
};

/* The owner of one message, read once per message by a scan. */
/* A read that faulted (fault.h): logged once here, counted with the
 * corrupt records; the caller returns QUEUE_ECORRUPT. */
void queue_fault_note(struct queue *q, const char *db, const struct fault_guard *g);

/* Whether message id has a recipient left in txn (*has); one without is
 * finished, its record waiting for the sweep ("gone"). 0 or an LMDB code. */
int queue_msg_has_rcpt(struct queue *q, MDB_txn *txn, uint64_t id, bool *has);
/* The message ids txn's "gone" names: how many in *n and, when ids is not
 * NULL, sorted in *ids (the caller frees it). Records of the wrong size
 * are noted as corrupt and skipped. 0 or an LMDB code (ENOMEM). */
int queue_gone_ids(struct queue *q, MDB_txn *txn, uint64_t **ids, size_t *n);

static inline int
queue_cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

struct owner_buf {
    uint64_t id; /* whose: 0 before the first read */
    uint8_t tenant_len, campaign_len, pool_len, priority;
    bool tls_relaxed;
    char tenant[QUEUE_MAX_TAG + 1], campaign[QUEUE_MAX_TAG + 1], pool[QUEUE_MAX_TAG + 1];
};

struct queue_counters {
    _Atomic uint64_t commits, commit_failures, enqueued, enqueued_rcpts, enqueued_bytes,
        enqueue_refused, outcomes, outcomes_stale, removed, swept, taken, corrupt, batch_max,
        commit_us_total, commit_us_max, backlog, map_size, map_used, event_lines, events_kept,
        notes_kept, unconfirmed_removed, sync_failing_refused;
};

/* Keys of records found corrupt, so that each is counted and logged once
 * however often a scan meets it (the due poll meets it every second). */
#define CORRUPT_KEEP 1024
/* A sweep of "gone" (apply_sweep) once this many finished messages wait,
 * or the first has waited [queue] sweep_ms. */
#define GONE_SWEEP_N 4096
struct corrupt_seen {
    pthread_mutex_t mu;
    unsigned n;                                  /* guarded by mu */
    unsigned char key[CORRUPT_KEEP][DUE_KEY_LEN + 1]; /* guarded by mu: db tag, key */
};

struct queue {
    struct queue_config cfg; /* owned copy */
    MDB_env *env;            /* owned */
    MDB_dbi dbi_meta, dbi_msg, dbi_body, dbi_rcpt, dbi_due, dbi_events, dbi_notes, dbi_gone;
    int lock_fd;
    bool read_only;          /* queue_open_readonly: no committer, nothing written */
    MDB_cursor *open_cur; /* open_spool: the cursor of its reads while open, for a fault */
    bool has_events;         /* the events database exists (read-only: it may not) */
    bool has_notes;          /* the notes database exists (read-only: it may not) */
    bool has_gone;           /* the gone database exists (read-only: it may not) */
    size_t psize;
    void *map_addr;          /* the map's address (queue_map_trim) */
    size_t map_pages;
    size_t reserve_pages;
    _Atomic uint64_t last_id; /* generator state, see queue_id_next */

    pthread_mutex_t mu;
    pthread_cond_t cond;
    struct queue_req *in_head, *in_tail; /* guarded by mu */
    size_t in_count;                     /* guarded by mu */
    bool stopping;                       /* guarded by mu */
    bool idle;                           /* guarded by mu: committer waits on cond */
    bool gathering;                      /* guarded by mu: ... in gather() */
    size_t gather_target;                /* guarded by mu: see gather() */
    pthread_t committer;
    bool committer_started;

    /* Committed requests on their way to their ports. Waking a port's
     * thread costs microseconds (more in a VM); with many ports that
     * would hold the committer off the disk, so a second thread does it
     * while the committer syncs the next batch. */
    pthread_mutex_t nmu;
    pthread_cond_t ncond;
    struct queue_req *n_head, *n_tail; /* guarded by nmu */
    bool n_stopping, n_idle;           /* guarded by nmu */
    pthread_t notifier;
    bool notifier_started;
    struct queue_port **ports;  /* notifier only; owned, max_batch */
    struct queue_port **cports; /* committer only; owned, max_batch: see notify() */
    _Atomic uint64_t round;     /* see deliver() */

    /* committer only */
    struct queue_req **vec_upd, **vec_enq; /* owned, max_batch each */
    uint64_t *touched;                     /* owned: ids whose recipients changed */
    size_t touched_n, touched_cap;
    uint64_t *gone; /* owned: finished message ids the sweep removes */
    size_t gone_n, gone_cap;
    uint64_t gone_seq;        /* key of the next record of "gone" */
    uint64_t gone_since_us;   /* monotonic: when gone[0] was committed or swept (0: open) */
    uint64_t gone_retry_us;   /* monotonic: no sweep before (after a failed one) */
    unsigned gone_backoff_ms; /* the wait after the last failed sweep */
    bool gone_failing;        /* the last sweep failed (logged once an episode) */
    size_t last_pgno;
    int data_fd;             /* borrowed from LMDB: data.mdb */
    bool prealloc;           /* queue_disk_reserve() is in use */
    size_t alloc_pages;      /* pages of data.mdb with blocks allocated */
    uint64_t high_id;        /* highest message id committed */
    uint64_t stored_id;      /* "last_id" as stored in meta */
    unsigned since_free;     /* commits since the last one that removed messages, up to 2 */
    unsigned batch_commits;  /* successful commits while running this batch */
    int io_err;              /* a commit of this batch failed writing or syncing: its errno */
    uint64_t last_commit_us; /* duration of the last successful commit */
    struct queue_req *pend_head, *pend_tail; /* committed, not yet durable (see flush_pending) */
    bool pend_unsynced;                      /* the last commit's meta page is not synced */
    bool full;                               /* enqueues are being refused for lack of room */
    bool full_logged;                        /* and that was logged */
    uint64_t full_logged_ms;
    bool panic_logged;
    /* Enqueues failed as not confirmed whose commit may have landed: their
     * ids until a durable commit has removed them (commit.c,
     * drop_unconfirmed); and, likewise, the event records of failed
     * reports (event lines with a note: lines_only). */
    struct drop_ent {
        uint64_t id;         /* 0 when lines_only */
        uint64_t ev_seq;     /* its event record's number, when ev */
        bool ev;             /* it wrote one (its reception) */
        bool lines_only;     /* a report's lines, no message: ev_len and ev_hash say which */
        size_t ev_len;
        uint64_t ev_hash;    /* hash_bytes of its lines */
    } *drop;                 /* owned */
    size_t drop_n, drop_cap;
    bool drop_fresh;         /* ids added since the last removal tried */
    bool drop_logged;        /* a removal that failed was logged */
    uint64_t drop_backoff_us; /* the wait after the last removal that failed; 0: none failed */
    uint64_t drop_retry_us;   /* monotonic time of the committer's next try (drop_unconfirmed) */

    /* events (queue.h) */
    uint64_t ev_next;             /* committer only: the number of the next line */
    uint64_t ev_pend;             /* committer only: ev_next as of the last commit pending */
    _Atomic uint64_t ev_durable;  /* lines below are durable */
    _Atomic uint64_t ev_floor;    /* queue_events_floor */
    pthread_mutex_t ev_mu;        /* guards the hook and its calls */
    void (*ev_hook)(void *arg);   /* guarded by ev_mu */
    void *ev_hook_arg;            /* borrowed; guarded by ev_mu */

    /* notes (queue.h) */
    uint64_t note_next;           /* committer only: the number of the next note */
    void (*note_hook)(void *arg); /* guarded by ev_mu */
    void *note_hook_arg;          /* borrowed; guarded by ev_mu */

    struct queue_counters st;
    struct corrupt_seen corrupt;
};

/* ---- helpers ---- */

static inline size_t
align4(size_t n)
{
    return (n + 3) & ~(size_t)3;
}

static inline uint64_t
lines_of(const char *p, size_t n)
{
    uint64_t c = 0;
    for (const char *e = p + n; (p = memchr(p, '\n', (size_t)(e - p))) != NULL; p++)
        c++;
    return c;
}

/* ---- calls between the files ---- */

/* queue.c */

/* LMDB (and errno) codes to ours: the only place they are translated. */
int queue_lmdb_err(int rc);

/* commit.c */

/* Keep disk blocks allocated ahead of the data (see its comment).
 * Committer (or open) only. */
void queue_disk_reserve(struct queue *q, size_t need);
/* Read the end of the data from LMDB into last_pgno and the stats.
 * Committer (or open) only. */
void queue_refresh_map_use(struct queue *q);
/* The two threads' functions, for pthread_create; arg is the queue. */
void *queue_notifier_main(void *arg);
void *queue_committer_main(void *arg);

/* read.c */

/* Count and log a record that fails its checks, once per key. Any thread. */
void queue_corrupt_note(struct queue *q, const char *db, const void *key, size_t klen);
/* The owner of message id, read in txn, into o. Any thread. */
void queue_owner_read(struct queue *q, MDB_txn *txn, uint64_t id, struct owner_buf *o);
/* Fill r from a decoded rcpt record, its strings copied to *strs. */
void queue_rcpt_fill(struct queue_rcpt *r, const struct rcpt_head *h, const MDB_val *v,
                     unsigned index, char **strs);

/* ---- apply.c: what a write transaction writes (committer thread) ---- */

/* Counts of one write transaction, folded into the stats after commit. */
struct tally {
    uint64_t enq, enq_rcpts, enq_bytes, outcomes, stale, removed, taken, fixed, max_id;
    uint64_t finished; /* messages whose last recipient went (removed: records deleted) */
    uint64_t ev_records, ev_lines, ev_trimmed; /* event records written, their lines, deleted */
};

/* r's message, body and recipients; 0 or an LMDB code. */
int apply_enqueue(struct queue *q, MDB_txn *txn, struct queue_req *r, struct tally *t);
/* Whether it, applied in txn now, would be ignored as stale (struct
 * queue_outcome): sets *stale, and *v and *h to the recipient's record
 * when there is one. Changes nothing. 0 or an LMDB code. */
int apply_outcome_stale(struct queue *q, MDB_txn *txn, const struct upd_item *it, MDB_val *v,
                        struct rcpt_head *h, bool *stale);
/* Outcome it on its recipient (nothing when stale); 0 or an LMDB code. */
int apply_outcome(struct queue *q, MDB_txn *txn, const struct upd_item *it, uint64_t now,
                  struct tally *t);
/* The event records wholly below r->ev_seq deleted, next kept in meta. */
int apply_trim(struct queue *q, MDB_txn *txn, const struct queue_req *r, uint64_t next,
               struct tally *t);
/* r's event lines as the record numbered *seq (of an update, only those
 * of the outcomes that applied and its own). */
int apply_events(struct queue *q, MDB_txn *txn, struct queue_req *r, uint64_t *seq,
                 struct tally *t);
/* The deferred recipients due by r's time made ready, up to its limit. */
/* Write the notes of r (its applied outcomes', or its own) numbered from
 * *seq on; *wrote counts them. */
int apply_notes(struct queue *q, MDB_txn *txn, const struct queue_req *r, uint64_t *seq,
                unsigned *wrote);
/* Delete the notes numbered below r->note_upto; *trimmed counts them. */
int apply_notes_trim(struct queue *q, MDB_txn *txn, const struct queue_req *r,
                     unsigned *trimmed);
int apply_take(struct queue *q, MDB_txn *txn, struct queue_req *r, struct tally *t);
/* Every touched id left without recipients to q->gone, for the sweep. */
int apply_remove_finished(struct queue *q, MDB_txn *txn, struct tally *t);
/* The ids of q->gone from mark on as the record q->gone_seq of "gone"
 * (the caller counts it once txn commits). */
int apply_gone_log(struct queue *q, MDB_txn *txn, size_t mark);
/* The sweep: the message and body of ids[0..n) deleted (sorted: in key
 * order; one that has a recipient left is kept and logged), and, when
 * they are all that "gone" names, "gone" emptied. A part leaves "gone"
 * as it is: the ids it removed are nothing to the next sweep, and the
 * readers count only the records that are still there. */
int apply_sweep(struct queue *q, MDB_txn *txn, const uint64_t *ids, size_t n, bool all,
                struct tally *t);
/* Message id with its body, recipients and their time index entries,
 * whatever their state; nothing when it is not stored. */
int apply_drop(struct queue *q, MDB_txn *txn, const struct drop_ent *d, struct tally *t);

#endif
