/*
 * queue: the spool (see queue.h). This file owns the LMDB environment, the
 * committer thread, the request hand-over between callers and the
 * committer, completion ports, and every read of the spool.
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
 * schema number or the blocks reserved below, and makes no file (neither
 * sluice.lock nor lock.mdb: see open_spool).
 *
 * On disk (one LMDB environment, a directory with data.mdb and lock.mdb,
 * plus sluice.lock which keeps a second process out):
 *
 *   meta  "schema"  -> u32 schema version (a newer one is refused)
 *         "created" -> u64 Unix ms
 *         "last_id" -> u64 highest message id ever stored (ids stay unique
 *                      even if the clock steps back across a restart)
 *   msg   id (8 bytes big-endian, so keys sort by time) ->
 *         struct msg_head (flags: BODY=, SMTPUTF8, and tls_relaxed, a bit that
 *         older versions ignore), then sender, envid, auth user, client address,
 *         tenant, campaign, pool (no NULs, lengths in the head), then the
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
 *         recipients are deleted; the message goes with its last one. The
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
 *
 * Records are native-endian (LMDB files are not portable across
 * architectures anyway) and carry lengths that readers check before use.
 * A record that fails them is skipped by every scan (walk, take, counts,
 * envelope reads), counted and logged once with its key: one bad record
 * never stops the recipients behind it.
 *
 * An update may carry one new message (a DSN) that the committer writes
 * in the same transaction as its outcomes, admitted as an update (it may
 * use the reserve below).
 *
 * Durability choices. The environment is opened without MDB_WRITEMAP:
 * pages are written with pwrite, so a full disk is an ENOSPC error from a
 * commit, which we report, instead of a SIGBUS on a write into a sparse
 * mapping, which would kill the server; it also keeps application bugs
 * from scribbling on the map, and keeps nested transactions available.
 * LMDB's default commit syncs twice: the data pages (fdatasync), then the
 * meta page (an O_DSYNC write). We open with MDB_NOMETASYNC instead: a
 * commit syncs its data pages, then writes its meta page without a sync,
 * and the next sync on the file (the next commit's data sync, or our own
 * mdb_env_sync when there is no next commit yet) makes that meta page
 * durable. Integrity is the same (data is on disk before any meta page
 * that points at it), and a completion still leaves only once its commit
 * is durable: completions wait in q->pend for that next sync. Under load
 * every commit thus costs one sync and carries the previous one's
 * durability; when idle, a commit costs two, as by default. With
 * unsafe_no_sync the commits are not synced at all (MDB_NOSYNC) and
 * completions leave at once; the file is synced once at close.
 *
 * A full map. LMDB needs free pages even to delete (copy-on-write), so a
 * spool filled to the last page could never be emptied. The committer
 * therefore admits an enqueue only if the pages it needs leave a reserve
 * (2% of the map, 32 pages at least, 32 MB at most) for outcome updates.
 * If a commit still fails for space, the enqueues of that batch get the
 * error and its updates are committed alone (split in halves on failure).
 * The map cannot grow while the server runs: raise map_size and restart.
 *
 * A full disk. The same reserve must exist on disk: the committer keeps
 * blocks allocated (fallocate, file size unchanged) for the reserve plus
 * some slack past the end of the data, so writes into that area cannot
 * fail with ENOSPC. When the disk fills, extending the allocation fails,
 * admission refuses new mail with -ENOSPC, and deletions still commit
 * within the allocated blocks. On a filesystem without fallocate a full
 * disk fails whole commits with -ENOSPC (updates included) until space
 * returns; acknowledged mail is never at stake either way.
 */
#include "queue/queue.h"

#include <endian.h>
#include <fcntl.h>
#include <inttypes.h>
#include <lmdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/sysmacros.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/fs.h"
#include "common/log.h"

#define SCHEMA_VERSION  2u
#define MSG_MAGIC       0x314d5153u /* "SQM1" */
#define BODY_INLINE_MAX (256u * 1024)
#define BODY_CHUNK      (256u * 1024)
#define SCAN_CHUNK      4096 /* records per read transaction in long scans */
#define MAX_READERS     510
#define GATHER_GAP_US   100
#define REPLY_STORE_MAX QUEUE_MAX_REPLY
#define RCPT_REC_MAX                                                                               \
    (sizeof(struct rcpt_head) + 2 * QUEUE_MAX_ADDR + QUEUE_MAX_PARAM + QUEUE_MAX_REPLY)

/* ---- records ---- */

enum { MSG_F_8BITMIME = 1, MSG_F_BINARYMIME = 2, MSG_F_SMTPUTF8 = 4, MSG_F_TLS_RELAXED = 8 };

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

static void
msg_key(unsigned char *k, uint64_t id)
{
    uint64_t be = htobe64(id);
    memcpy(k, &be, 8);
}

static void
rcpt_key(unsigned char *k, uint64_t id, unsigned idx)
{
    msg_key(k, id);
    k[8] = (unsigned char)(idx >> 8);
    k[9] = (unsigned char)idx;
}

static void
body_key(unsigned char *k, uint64_t id, uint32_t chunk)
{
    msg_key(k, id);
    uint32_t be = htobe32(chunk);
    memcpy(k + 8, &be, 4);
}

static void
due_key(unsigned char *k, uint64_t due, uint64_t id, unsigned idx)
{
    msg_key(k, due);
    rcpt_key(k + 8, id, idx);
}

static uint64_t
key_u64(const void *p)
{
    uint64_t be;
    memcpy(&be, p, 8);
    return be64toh(be);
}

static unsigned
key_u16(const unsigned char *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

/* Check a msg record and return its head; strings and inline body follow. */
static bool
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

static size_t
msg_head_len(const struct msg_head *h)
{
    return sizeof(*h) + h->sender_len + h->envid_len + h->auth_len + h->client_len +
           h->tenant_len + h->campaign_len + h->pool_len;
}

static bool
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

enum req_kind { REQ_ENQUEUE, REQ_UPDATE, REQ_TAKE, REQ_EVENTS, REQ_TRIM };

struct upd_item {
    uint64_t id;
    uint64_t due_ms;
    const char *reply; /* borrowed: points into the request's data */
    size_t ev_len;     /* octets of the request's event lines that tell this outcome */
    unsigned ev_lines; /* ... and their count (queue_update_enqueue_events) */
    uint32_t rcpt;
    uint16_t code;
    uint16_t reply_len;
    uint8_t kind;
    uint8_t tag;
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

/* Counts of one write transaction, folded into the stats after commit. */
struct tally {
    uint64_t enq, enq_rcpts, enq_bytes, outcomes, stale, removed, taken, fixed, max_id;
    uint64_t ev_records, ev_lines, ev_trimmed; /* event records written, their lines, deleted */
};

struct queue_counters {
    _Atomic uint64_t commits, commit_failures, enqueued, enqueued_rcpts, enqueued_bytes,
        enqueue_refused, outcomes, outcomes_stale, removed, taken, corrupt, batch_max,
        commit_us_total, commit_us_max, backlog, map_size, map_used, event_lines, events_kept;
};

/* Keys of records found corrupt, so that each is counted and logged once
 * however often a scan meets it (the due poll meets it every second). */
#define CORRUPT_KEEP 1024
struct corrupt_seen {
    pthread_mutex_t mu;
    unsigned n;                                  /* guarded by mu */
    unsigned char key[CORRUPT_KEEP][DUE_KEY_LEN + 1]; /* guarded by mu: db tag, key */
};

struct queue {
    struct queue_config cfg; /* owned copy */
    MDB_env *env;            /* owned */
    MDB_dbi dbi_meta, dbi_msg, dbi_body, dbi_rcpt, dbi_due, dbi_events;
    int lock_fd;
    bool read_only;          /* queue_open_readonly: no committer, nothing written */
    bool has_events;         /* the events database exists (read-only: it may not) */
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
    size_t last_pgno;
    int data_fd;             /* borrowed from LMDB: data.mdb */
    bool prealloc;           /* disk_reserve() is in use */
    size_t alloc_pages;      /* pages of data.mdb with blocks allocated */
    uint64_t high_id;        /* highest message id committed */
    uint64_t stored_id;      /* "last_id" as stored in meta */
    unsigned since_free;     /* commits since the last one that removed messages, up to 2 */
    unsigned batch_commits;  /* successful commits while running this batch */
    uint64_t last_commit_us; /* duration of the last successful commit */
    struct queue_req *pend_head, *pend_tail; /* committed, not yet durable (see flush_pending) */
    bool pend_unsynced;                      /* the last commit's meta page is not synced */
    bool full;                               /* enqueues are being refused for lack of room */
    bool full_logged;                        /* and that was logged */
    uint64_t full_logged_ms;
    bool panic_logged;

    /* events (queue.h) */
    uint64_t ev_next;             /* committer only: the number of the next line */
    uint64_t ev_pend;             /* committer only: ev_next as of the last commit pending */
    _Atomic uint64_t ev_durable;  /* lines below are durable */
    _Atomic uint64_t ev_floor;    /* queue_events_floor */
    pthread_mutex_t ev_mu;        /* guards the hook and its calls */
    void (*ev_hook)(void *arg);   /* guarded by ev_mu */
    void *ev_hook_arg;            /* borrowed; guarded by ev_mu */

    struct queue_counters st;
    struct corrupt_seen corrupt;
};

static uint64_t
now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t
mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

/* LMDB (and errno) codes to ours: the only place they are translated. */
static int
lmdb_err(int rc)
{
    switch (rc) {
    case 0:
        return 0;
    case MDB_MAP_FULL:
        return QUEUE_EMAPFULL;
    case MDB_NOTFOUND:
        return QUEUE_ENOTFOUND;
    case MDB_KEYEXIST:
        return QUEUE_EEXIST;
    case MDB_PANIC:
    case MDB_MAP_RESIZED:
        return QUEUE_EPANIC;
    case MDB_READERS_FULL:
        return QUEUE_EREADERS;
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
    case MDB_INVALID:
    case MDB_VERSION_MISMATCH:
    case MDB_INCOMPATIBLE:
        return QUEUE_ECORRUPT;
    case ENOSPC:
    case EDQUOT:
    case EFBIG: /* a file size limit: the file cannot grow, as on a full disk */
        return -ENOSPC;
    }
    if (rc > 0)
        return -rc;
    return QUEUE_ESTORE;
}

static bool
lmdb_space_err(int rc)
{
    return rc == MDB_MAP_FULL || rc == ENOSPC || rc == EDQUOT || rc == EFBIG;
}

/* ---- ports ---- */

struct queue_port *
queue_port_new(void)
{
    struct queue_port *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->efd < 0) {
        int e = errno;
        free(p);
        errno = e;
        return NULL;
    }
    pthread_mutex_init(&p->mu, NULL);
    atomic_init(&p->pending, 0);
    return p;
}

struct queue_port *
queue_port_free(struct queue_port *port)
{
    if (port == NULL)
        return NULL;
    if (atomic_load(&port->pending) != 0) {
        log_msg(LOG_CRIT, "queue=port_free pending=%u bug=freed_with_requests_in_flight",
                atomic_load(&port->pending));
        abort();
    }
    close(port->efd);
    pthread_mutex_destroy(&port->mu);
    free(port);
    return NULL;
}

int
queue_port_fd(const struct queue_port *port)
{
    return port->efd;
}

unsigned
queue_port_pending(const struct queue_port *port)
{
    return atomic_load(&((struct queue_port *)port)->pending);
}

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
struct owner_buf {
    uint64_t id; /* whose: 0 before the first read */
    uint8_t tenant_len, campaign_len, pool_len, priority;
    bool tls_relaxed;
    char tenant[QUEUE_MAX_TAG + 1], campaign[QUEUE_MAX_TAG + 1], pool[QUEUE_MAX_TAG + 1];
};

static void rcpt_fill(struct queue_rcpt *r, const struct rcpt_head *h, const MDB_val *v,
                      unsigned index, char **strs);

/* Owner thread: run a take's callback for each recipient it took. */
static void
take_report(struct queue_req *r)
{
    char strs[RCPT_REC_MAX + 8];
    for (size_t off = 0; off < r->u.take.len;) {
        struct take_rec tr;
        memcpy(&tr, r->u.take.buf + off, sizeof(tr));
        MDB_val v = {tr.len, r->u.take.buf + off + sizeof(tr)};
        struct rcpt_head h;
        memcpy(&h, v.mv_data, sizeof(h));
        struct queue_rcpt qr;
        char *p = strs;
        rcpt_fill(&qr, &h, &v, tr.index, &p);
        struct owner_buf ob;
        const char *os = (const char *)v.mv_data + tr.len;
        memcpy(ob.tenant, os, tr.tenant_len);
        ob.tenant[tr.tenant_len] = '\0';
        os += tr.tenant_len;
        memcpy(ob.campaign, os, tr.campaign_len);
        ob.campaign[tr.campaign_len] = '\0';
        os += tr.campaign_len;
        memcpy(ob.pool, os, tr.pool_len);
        ob.pool[tr.pool_len] = '\0';
        qr.owner = (struct queue_owner){ob.tenant, ob.campaign, ob.pool, tr.priority,
                                        tr.tls_relaxed};
        r->u.take.cb(r->u.take.arg, tr.id, &qr);
        off += (sizeof(tr) + tr.len + tr.tenant_len + tr.campaign_len + tr.pool_len + 7) &
               ~(size_t)7;
    }
}

int
queue_port_drain(struct queue_port *port)
{
    /* Clear the eventfd before taking the list: a push after the take
     * finds the list empty and signals again, so nothing is missed. */
    uint64_t v;
    ssize_t rd = read(port->efd, &v, sizeof(v));
    (void)rd;
    pthread_mutex_lock(&port->mu);
    struct queue_req *r = port->head;
    port->head = port->tail = NULL;
    pthread_mutex_unlock(&port->mu);
    unsigned n = 0;
    for (struct queue_req *x = r; x != NULL; x = x->next)
        n++;
    /* Counted down before any callback, so a callback may free the port. */
    if (n > 0)
        atomic_fetch_sub(&port->pending, n);
    while (r != NULL) {
        struct queue_req *next = r->next;
        if (r->kind == REQ_TAKE) {
            if (r->rc == 0)
                take_report(r);
            free(r->u.take.buf);
        }
        if (r->kind == REQ_UPDATE && r->applied_out != NULL &&
            (r->rc == 0 || r->rc == QUEUE_ESTALE))
            for (size_t i = 0; i < r->u.upd.n; i++)
                r->applied_out[i] = r->u.upd.items[i].applied;
        r->done(r->cookie, r->rc);
        free(r);
        r = next;
    }
    return (int)n;
}

int
queue_port_wait(struct queue_port *port, int timeout_ms)
{
    struct pollfd pfd = {.fd = port->efd, .events = POLLIN};
    int rc = poll(&pfd, 1, timeout_ms);
    if (rc < 0)
        return -errno;
    return queue_port_drain(port);
}

/* Notifier: hand a chain of completed requests to their port. The
 * eventfd is written under the lock: once the lock is released the owner
 * may drain, see pending reach 0 and free the port. */
static void
port_push(struct queue_port *p, struct queue_req *head, struct queue_req *tail)
{
    pthread_mutex_lock(&p->mu);
    bool was_empty = p->head == NULL;
    if (was_empty)
        p->head = head;
    else
        p->tail->next = head;
    p->tail = tail;
    if (was_empty) {
        uint64_t one = 1;
        ssize_t wr = write(p->efd, &one, sizeof(one));
        (void)wr; /* only fails when the counter is saturated: still readable */
    }
    pthread_mutex_unlock(&p->mu);
}

/* ---- submitting ---- */

static int
submit(struct queue *q, struct queue_req *r)
{
    if (q->read_only)
        return -EROFS; /* no committer to take it */
    r->next = NULL;
    atomic_fetch_add(&r->port->pending, 1);
    pthread_mutex_lock(&q->mu);
    if (q->stopping) {
        pthread_mutex_unlock(&q->mu);
        atomic_fetch_sub(&r->port->pending, 1);
        return QUEUE_ECLOSED;
    }
    if (q->in_tail != NULL)
        q->in_tail->next = r;
    else
        q->in_head = r;
    q->in_tail = r;
    q->in_count++;
    atomic_store_explicit(&q->st.backlog, q->in_count, memory_order_relaxed);
    if (q->idle && (!q->gathering || q->in_count >= q->gather_target))
        pthread_cond_signal(&q->cond);
    pthread_mutex_unlock(&q->mu);
    return 0;
}

static size_t
str_len(const char *s)
{
    return s ? strlen(s) : 0;
}

static size_t
align4(size_t n)
{
    return (n + 3) & ~(size_t)3;
}

static unsigned char *
put_bytes(unsigned char *p, const char *s, size_t n)
{
    if (n > 0)
        memcpy(p, s, n);
    return p + n;
}

/* Sizes of a message's serialized form (see enq_build). */
struct enq_size {
    size_t sender, envid, auth, client, tenant, campaign, pool;
    uint64_t body_len;
    size_t rcpt_bytes, head_len, iov_bytes;
    size_t data_len; /* a multiple of 8 */
};

/* Check an envelope for queue_enqueue() and size its serialized form.
 * Returns 0 or -EINVAL. */
static int
enq_measure(const struct queue_envelope *env, const struct iovec *body, unsigned iovcnt,
            struct enq_size *sz)
{
    if (env == NULL || env->id == 0 || env->nrcpt == 0 || env->nrcpt > QUEUE_MAX_RCPT ||
        env->rcpt == NULL || (iovcnt > 0 && body == NULL) || iovcnt > 1024 ||
        (unsigned)env->ret > QUEUE_RET_HDRS || (unsigned)env->body_type > QUEUE_BODY_BINARYMIME)
        return -EINVAL;
    sz->sender = str_len(env->sender);
    sz->envid = str_len(env->envid);
    sz->auth = str_len(env->auth_user);
    sz->client = str_len(env->client_addr);
    sz->tenant = str_len(env->tenant);
    sz->campaign = str_len(env->campaign);
    sz->pool = str_len(env->pool);
    if (sz->sender > QUEUE_MAX_ADDR || sz->envid > QUEUE_MAX_PARAM || sz->auth > QUEUE_MAX_PARAM ||
        sz->client > QUEUE_MAX_PARAM || sz->tenant > QUEUE_MAX_TAG ||
        sz->campaign > QUEUE_MAX_TAG || sz->pool > QUEUE_MAX_TAG ||
        env->priority > QUEUE_MAX_PRIORITY)
        return -EINVAL;
    sz->body_len = 0;
    for (unsigned i = 0; i < iovcnt; i++)
        sz->body_len += body[i].iov_len;
    sz->rcpt_bytes = 0;
    for (unsigned i = 0; i < env->nrcpt; i++) {
        const struct queue_rcpt *r = &env->rcpt[i];
        size_t alen = str_len(r->addr), olen = str_len(r->orcpt);
        if (alen == 0 || alen > QUEUE_MAX_ADDR || olen > QUEUE_MAX_PARAM || r->notify > 15)
            return -EINVAL;
        const char *at = strrchr(r->addr, '@');
        size_t dlen = at ? alen - (size_t)(at + 1 - r->addr) : 0;
        sz->rcpt_bytes += 4 + align4(sizeof(struct rcpt_head) + alen + dlen + olen);
    }
    sz->head_len = sizeof(struct msg_head) + sz->sender + sz->envid + sz->auth + sz->client +
                   sz->tenant + sz->campaign + sz->pool;
    sz->iov_bytes = iovcnt * sizeof(struct iovec);
    sz->data_len = (sz->iov_bytes + align4(sz->head_len) + sz->rcpt_bytes + 7) & ~(size_t)7;
    return 0;
}

/* Serialize the message into data (sz->data_len bytes, 8-aligned) and
 * point req->enq into it. */
static void
enq_build(struct queue_req *req, unsigned char *data, const struct queue_envelope *env,
          const struct iovec *body, unsigned iovcnt, const struct enq_size *sz)
{
    req->has_msg = true;
    req->cost = sz->body_len;
    req->enq.id = env->id;
    req->enq.body_len = sz->body_len;
    req->enq.iovcnt = iovcnt;
    req->enq.nrcpt = env->nrcpt;
    req->enq.chunks = sz->body_len > BODY_INLINE_MAX
                          ? (uint32_t)((sz->body_len + BODY_CHUNK - 1) / BODY_CHUNK)
                          : 0;
    if (iovcnt > 0)
        memcpy(data, body, sz->iov_bytes);
    req->enq.iov = (const struct iovec *)data;

    struct msg_head h = {
        .magic = MSG_MAGIC,
        .flags = (uint8_t)((env->body_type == QUEUE_BODY_8BITMIME ? MSG_F_8BITMIME : 0) |
                           (env->body_type == QUEUE_BODY_BINARYMIME ? MSG_F_BINARYMIME : 0) |
                           (env->smtputf8 ? MSG_F_SMTPUTF8 : 0) |
                           (env->tls_relaxed ? MSG_F_TLS_RELAXED : 0)),
        .ret = (uint8_t)env->ret,
        .nrcpt = (uint16_t)env->nrcpt,
        .body_chunks = req->enq.chunks,
        .sender_len = (uint16_t)sz->sender,
        .envid_len = (uint16_t)sz->envid,
        .auth_len = (uint16_t)sz->auth,
        .client_len = (uint16_t)sz->client,
        .tenant_len = (uint8_t)sz->tenant,
        .campaign_len = (uint8_t)sz->campaign,
        .pool_len = (uint8_t)sz->pool,
        .priority = (uint8_t)env->priority,
        .arrival_ms = env->arrival_ms ? env->arrival_ms : now_ms(),
        .expire_ms = env->expire_ms,
        .body_len = sz->body_len,
    };
    unsigned char *p = data + sz->iov_bytes;
    req->enq.head = p;
    req->enq.head_len = sz->head_len;
    memcpy(p, &h, sizeof(h));
    p += sizeof(h);
    p = put_bytes(p, env->sender, sz->sender);
    p = put_bytes(p, env->envid, sz->envid);
    p = put_bytes(p, env->auth_user, sz->auth);
    p = put_bytes(p, env->client_addr, sz->client);
    p = put_bytes(p, env->tenant, sz->tenant);
    p = put_bytes(p, env->campaign, sz->campaign);
    p = put_bytes(p, env->pool, sz->pool);

    p = data + sz->iov_bytes + align4(sz->head_len);
    req->enq.rcpts = p;
    req->enq.rcpt_bytes = sz->rcpt_bytes;
    for (unsigned i = 0; i < env->nrcpt; i++) {
        const struct queue_rcpt *r = &env->rcpt[i];
        size_t alen = strlen(r->addr), olen = str_len(r->orcpt);
        const char *at = strrchr(r->addr, '@');
        size_t dlen = at ? alen - (size_t)(at + 1 - r->addr) : 0;
        struct rcpt_head rh = {
            .state = QUEUE_RCPT_READY,
            .notify = (uint8_t)r->notify,
            .addr_len = (uint16_t)alen,
            .domain_len = (uint16_t)dlen,
            .orcpt_len = (uint16_t)olen,
        };
        uint32_t len = (uint32_t)(sizeof(rh) + alen + dlen + olen);
        memcpy(p, &len, 4);
        unsigned char *rec = p + 4;
        memcpy(rec, &rh, sizeof(rh));
        unsigned char *s = put_bytes(rec + sizeof(rh), r->addr, alen);
        for (size_t j = 0; j < dlen; j++) {
            char c = at[1 + j];
            s[j] = (unsigned char)(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
        }
        put_bytes(s + dlen, r->orcpt, olen);
        p += 4 + align4(len);
    }
}

/* Whether text[0..len) is whole lines (or nothing); their count in *lines. */
static bool
events_ok(const char *text, size_t len, uint64_t *lines)
{
    *lines = 0;
    if (len == 0)
        return true;
    if (text == NULL || text[len - 1] != '\n')
        return false;
    for (const char *p = text, *e = text + len; (p = memchr(p, '\n', (size_t)(e - p))) != NULL;
         p++)
        (*lines)++;
    return true;
}

/* Copy the event lines to dst (inside req's allocation) and point req at them. */
static void
events_attach(struct queue_req *req, char *dst, const char *text, size_t len, uint64_t lines)
{
    if (len == 0)
        return;
    memcpy(dst, text, len);
    req->ev_text = dst;
    req->ev_len = len;
    req->ev_lines = lines;
}

int
queue_enqueue(struct queue *q, struct queue_port *port, const struct queue_envelope *env,
              const struct iovec *body, unsigned iovcnt, queue_done_fn *done, void *cookie)
{
    return queue_enqueue_events(q, port, env, body, iovcnt, NULL, 0, done, cookie);
}

int
queue_enqueue_events(struct queue *q, struct queue_port *port, const struct queue_envelope *env,
                     const struct iovec *body, unsigned iovcnt, const char *events,
                     size_t events_len, queue_done_fn *done, void *cookie)
{
    struct enq_size sz;
    uint64_t lines;
    if (q == NULL || port == NULL || done == NULL || enq_measure(env, body, iovcnt, &sz) != 0 ||
        !events_ok(events, events_len, &lines) || events_len > SIZE_MAX / 4)
        return -EINVAL;
    struct queue_req *req = malloc(sizeof(*req) + sz.data_len + events_len);
    if (req == NULL)
        return -ENOMEM;
    memset(req, 0, sizeof(*req));
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->kind = REQ_ENQUEUE;
    enq_build(req, (unsigned char *)req->data, env, body, iovcnt, &sz);
    events_attach(req, (char *)req->data + sz.data_len, events, events_len, lines);
    int rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

/* An update request for outcomes[0..n), with room for extra (8-aligned)
 * bytes at the start of its data for a message. NULL: -EINVAL or -ENOMEM
 * in *rc. */
static struct queue_req *
upd_new(const struct queue_outcome *outcomes, size_t n, size_t extra, size_t tail, int *rc)
{
    *rc = -EINVAL;
    if (outcomes == NULL || n == 0 || n > SIZE_MAX / 2 / sizeof(struct upd_item))
        return NULL;
    size_t text = 0;
    for (size_t i = 0; i < n; i++) {
        const struct queue_outcome *o = &outcomes[i];
        if (o->rcpt >= QUEUE_MAX_RCPT || o->code > 999 || (unsigned)o->kind > QUEUE_RETIME)
            return NULL;
        size_t len = str_len(o->reply);
        text += len > REPLY_STORE_MAX ? REPLY_STORE_MAX : len;
    }
    *rc = -ENOMEM;
    struct queue_req *req =
        malloc(sizeof(*req) + extra + n * sizeof(struct upd_item) + text + tail);
    if (req == NULL)
        return NULL;
    memset(req, 0, sizeof(*req));
    struct upd_item *items = (struct upd_item *)((unsigned char *)req->data + extra);
    char *t = (char *)(items + n);
    for (size_t i = 0; i < n; i++) {
        const struct queue_outcome *o = &outcomes[i];
        size_t len = str_len(o->reply);
        if (len > REPLY_STORE_MAX)
            len = REPLY_STORE_MAX;
        items[i] = (struct upd_item){
            .id = o->id,
            .due_ms = o->due_ms,
            .reply = t,
            .rcpt = o->rcpt,
            .code = (uint16_t)o->code,
            .reply_len = (uint16_t)len,
            .tag = o->tag < QUEUE_TAGS ? (uint8_t)o->tag : 0,
            .kind = (uint8_t)o->kind,
        };
        if (len > 0)
            memcpy(t, o->reply, len);
        t += len;
    }
    req->kind = REQ_UPDATE;
    req->u.upd.n = n;
    req->u.upd.items = items;
    req->ev_text = t; /* where the caller's tail goes */
    *rc = 0;
    return req;
}

/* Give each outcome of req its lines of the event text, in order:
 * ev_lines[i] of them (NULL: none), their octets in ev_len. False when
 * they add up to more lines than the text has. */
static bool
upd_events_split(struct queue_req *req, const unsigned *ev_lines)
{
    size_t off = 0;
    for (size_t i = 0; ev_lines != NULL && i < req->u.upd.n; i++) {
        struct upd_item *it = &req->u.upd.items[i];
        size_t start = off;
        it->ev_lines = ev_lines[i];
        for (unsigned l = 0; l < it->ev_lines; l++) {
            const char *nl = off < req->ev_len
                                 ? memchr(req->ev_text + off, '\n', req->ev_len - off)
                                 : NULL;
            if (nl == NULL)
                return false;
            off = (size_t)(nl - req->ev_text) + 1;
        }
        it->ev_len = off - start;
    }
    return true;
}

int
queue_update(struct queue *q, struct queue_port *port, const struct queue_outcome *outcomes,
             size_t n, queue_done_fn *done, void *cookie)
{
    return queue_update_enqueue(q, port, outcomes, n, NULL, NULL, 0, done, cookie);
}

int
queue_update_enqueue(struct queue *q, struct queue_port *port,
                     const struct queue_outcome *outcomes, size_t n,
                     const struct queue_envelope *env, const struct iovec *body, unsigned iovcnt,
                     queue_done_fn *done, void *cookie)
{
    return queue_update_enqueue_events(q, port, outcomes, n, env, body, iovcnt, NULL, 0, NULL, NULL,
                                       done, cookie);
}

int
queue_update_enqueue_events(struct queue *q, struct queue_port *port,
                            const struct queue_outcome *outcomes, size_t n,
                            const struct queue_envelope *env, const struct iovec *body,
                            unsigned iovcnt, const char *events, size_t events_len,
                            const unsigned *ev_lines, bool *applied, queue_done_fn *done,
                            void *cookie)
{
    struct enq_size sz = {0};
    uint64_t lines;
    if (q == NULL || port == NULL || done == NULL ||
        (env != NULL && enq_measure(env, body, iovcnt, &sz) != 0) ||
        !events_ok(events, events_len, &lines) || events_len > SIZE_MAX / 4)
        return -EINVAL;
    int rc;
    struct queue_req *req = upd_new(outcomes, n, sz.data_len, events_len, &rc);
    if (req == NULL)
        return rc;
    char *tail = (char *)req->ev_text;
    req->ev_text = NULL;
    events_attach(req, tail, events, events_len, lines);
    if (!upd_events_split(req, ev_lines)) {
        free(req);
        return -EINVAL;
    }
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->applied_out = applied;
    /* No cost against max_batch_bytes: an update is never held back, and
     * a DSN is small next to the batch bound. */
    if (env != NULL) {
        enq_build(req, (unsigned char *)req->data, env, body, iovcnt, &sz);
        req->cost = 0;
    }
    rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

int
queue_events_put(struct queue *q, struct queue_port *port, const char *events, size_t events_len,
                 queue_done_fn *done, void *cookie)
{
    uint64_t lines;
    if (q == NULL || port == NULL || done == NULL || events_len == 0 ||
        !events_ok(events, events_len, &lines) || events_len > SIZE_MAX / 4)
        return -EINVAL;
    struct queue_req *req = malloc(sizeof(*req) + events_len);
    if (req == NULL)
        return -ENOMEM;
    memset(req, 0, sizeof(*req));
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->kind = REQ_EVENTS;
    events_attach(req, (char *)req->data, events, events_len, lines);
    int rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

int
queue_events_trim(struct queue *q, struct queue_port *port, uint64_t upto, queue_done_fn *done,
                  void *cookie)
{
    if (q == NULL || port == NULL || done == NULL)
        return -EINVAL;
    struct queue_req *req = calloc(1, sizeof(*req));
    if (req == NULL)
        return -ENOMEM;
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->kind = REQ_TRIM;
    req->ev_seq = upto;
    int rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

uint64_t
queue_events_durable(struct queue *q)
{
    return atomic_load(&q->ev_durable);
}

void
queue_events_floor(struct queue *q, uint64_t seq)
{
    uint64_t cur = atomic_load(&q->ev_floor);
    while (cur < seq && !atomic_compare_exchange_weak(&q->ev_floor, &cur, seq)) {
    }
}

void
queue_events_set_hook(struct queue *q, void (*fn)(void *arg), void *arg)
{
    pthread_mutex_lock(&q->ev_mu);
    q->ev_hook = fn;
    q->ev_hook_arg = arg;
    pthread_mutex_unlock(&q->ev_mu);
}

/* Committer: lines below seq are durable; wake the hook. */
static void
events_publish(struct queue *q, uint64_t seq)
{
    if (seq <= atomic_load(&q->ev_durable))
        return;
    atomic_store(&q->ev_durable, seq);
    pthread_mutex_lock(&q->ev_mu);
    if (q->ev_hook != NULL)
        q->ev_hook(q->ev_hook_arg);
    pthread_mutex_unlock(&q->ev_mu);
}

static void corrupt_note(struct queue *q, const char *db, const void *key, size_t klen);

static uint64_t
lines_of(const char *p, size_t n)
{
    uint64_t c = 0;
    for (const char *e = p + n; (p = memchr(p, '\n', (size_t)(e - p))) != NULL; p++)
        c++;
    return c;
}

int
queue_events_read(struct queue *q, uint64_t from, size_t max_bytes, queue_events_fn *cb,
                  void *arg)
{
    uint64_t durable = atomic_load(&q->ev_durable);
    if (from >= durable)
        return 0;
    MDB_txn *txn;
    int rc = mdb_txn_begin(q->env, NULL, MDB_RDONLY, &txn);
    if (rc != 0)
        return lmdb_err(rc);
    MDB_cursor *c;
    if ((rc = mdb_cursor_open(txn, q->dbi_events, &c)) != 0) {
        mdb_txn_abort(txn);
        return lmdb_err(rc);
    }
    unsigned char key[8];
    msg_key(key, from);
    MDB_val k = {8, key}, v;
    rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
    if (rc == 0 || rc == MDB_NOTFOUND) {
        /* The record before the first at or above from may hold from. */
        MDB_val pk, pv;
        int prc = mdb_cursor_get(c, &pk, &pv, rc == 0 ? MDB_PREV : MDB_LAST);
        if (prc == 0 && pk.mv_size == 8 && key_u64(pk.mv_data) < from &&
            key_u64(pk.mv_data) + lines_of(pv.mv_data, pv.mv_size) > from) {
            k = pk;
            v = pv;
            rc = 0;
        } else if (rc == 0) {
            k = (MDB_val){8, key};
            rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        }
    }
    int n = 0;
    size_t bytes = 0;
    while (rc == 0) {
        if (k.mv_size != 8) {
            corrupt_note(q, "events", k.mv_data, k.mv_size);
            rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
            continue;
        }
        uint64_t seq = key_u64(k.mv_data);
        if (seq >= durable)
            break;
        n++;
        bytes += v.mv_size;
        if (cb(arg, seq, v.mv_data, v.mv_size) != 0 || bytes >= max_bytes)
            break;
        rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close(c);
    mdb_txn_abort(txn);
    return rc == 0 || rc == MDB_NOTFOUND ? n : lmdb_err(rc);
}

/* Committer: delete the records wholly below r->ev_seq and keep the next
 * number in meta. */
static int
apply_trim(struct queue *q, MDB_txn *txn, const struct queue_req *r, uint64_t next,
           struct tally *t)
{
    MDB_cursor *c;
    int rc = mdb_cursor_open(txn, q->dbi_events, &c);
    if (rc != 0)
        return rc;
    MDB_val k, v;
    while ((rc = mdb_cursor_get(c, &k, &v, MDB_FIRST)) == 0) {
        if (k.mv_size == 8 && key_u64(k.mv_data) + lines_of(v.mv_data, v.mv_size) > r->ev_seq)
            break;
        if ((rc = mdb_cursor_del(c, 0)) != 0)
            break;
        t->ev_trimmed++;
    }
    mdb_cursor_close(c);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return rc;
    MDB_val nk = {7, "ev_next"}, nv = {sizeof(next), &next};
    return mdb_put(txn, q->dbi_meta, &nk, &nv, 0);
}

/* Committer: write r's event lines as the record numbered *seq; of an
 * update, only the lines of the outcomes that applied and its own (the
 * lines after its outcomes'): a stale outcome tells nothing. */
static int
apply_events(struct queue *q, MDB_txn *txn, struct queue_req *r, uint64_t *seq, struct tally *t)
{
    size_t len = r->ev_len;
    uint64_t lines = r->ev_lines;
    for (size_t i = 0; r->kind == REQ_UPDATE && i < r->u.upd.n; i++) {
        const struct upd_item *it = &r->u.upd.items[i];
        if (!it->applied) {
            len -= it->ev_len;
            lines -= it->ev_lines;
        }
    }
    if (len == 0)
        return 0;
    unsigned char key[8];
    msg_key(key, *seq);
    MDB_val k = {8, key}, v = {len, NULL};
    int rc = mdb_put(txn, q->dbi_events, &k, &v, MDB_APPEND | MDB_RESERVE);
    if (rc == MDB_KEYEXIST) /* not above the last key: cannot happen, but not fatal */
        rc = mdb_put(txn, q->dbi_events, &k, &v, MDB_RESERVE);
    if (rc != 0)
        return rc;
    if (len == r->ev_len) {
        memcpy(v.mv_data, r->ev_text, len);
    } else {
        char *dst = v.mv_data;
        size_t off = 0;
        for (size_t i = 0; i < r->u.upd.n; i++) {
            const struct upd_item *it = &r->u.upd.items[i];
            if (it->applied && it->ev_len > 0) {
                memcpy(dst, r->ev_text + off, it->ev_len);
                dst += it->ev_len;
            }
            off += it->ev_len;
        }
        memcpy(dst, r->ev_text + off, r->ev_len - off);
    }
    r->ev_seq = *seq;
    *seq += lines;
    t->ev_records++;
    t->ev_lines += lines;
    return 0;
}

int
queue_due_take(struct queue *q, struct queue_port *port, uint64_t now_ms_, unsigned limit,
               queue_rcpt_fn *cb, void *arg, queue_done_fn *done, void *cookie)
{
    if (q == NULL || port == NULL || cb == NULL || done == NULL)
        return -EINVAL;
    struct queue_req *req = calloc(1, sizeof(*req));
    if (req == NULL)
        return -ENOMEM;
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->kind = REQ_TAKE;
    req->u.take.now_ms = now_ms_;
    req->u.take.limit = limit;
    req->u.take.cb = cb;
    req->u.take.arg = arg;
    int rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

struct waiter {
    int rc;
    bool done;
};

static void
waiter_done(void *cookie, int rc)
{
    struct waiter *w = cookie;
    w->rc = rc;
    w->done = true;
}

static int
wait_on(struct queue_port *port, struct waiter *w)
{
    while (!w->done) {
        int rc = queue_port_wait(port, -1);
        if (rc < 0 && rc != -EINTR) {
            /* poll cannot fail on a valid fd short of EINTR; spin rather
             * than free a port with a request in flight */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
    }
    queue_port_free(port);
    return w->rc;
}

int
queue_enqueue_wait(struct queue *q, const struct queue_envelope *env, const struct iovec *body,
                   unsigned iovcnt)
{
    struct queue_port *port = queue_port_new();
    if (port == NULL)
        return -errno;
    struct waiter w = {0, false};
    int rc = queue_enqueue(q, port, env, body, iovcnt, waiter_done, &w);
    if (rc < 0) {
        queue_port_free(port);
        return rc;
    }
    return wait_on(port, &w);
}

int
queue_update_wait(struct queue *q, const struct queue_outcome *outcomes, size_t n)
{
    struct queue_port *port = queue_port_new();
    if (port == NULL)
        return -errno;
    struct waiter w = {0, false};
    int rc = queue_update(q, port, outcomes, n, waiter_done, &w);
    if (rc < 0) {
        queue_port_free(port);
        return rc;
    }
    return wait_on(port, &w);
}

int
queue_update_enqueue_wait(struct queue *q, const struct queue_outcome *outcomes, size_t n,
                          const struct queue_envelope *env, const struct iovec *body,
                          unsigned iovcnt)
{
    struct queue_port *port = queue_port_new();
    if (port == NULL)
        return -errno;
    struct waiter w = {0, false};
    int rc = queue_update_enqueue(q, port, outcomes, n, env, body, iovcnt, waiter_done, &w);
    if (rc < 0) {
        queue_port_free(port);
        return rc;
    }
    return wait_on(port, &w);
}

struct take_waiter {
    queue_rcpt_fn *cb;
    void *arg;
    int n;
};

static int
take_count(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct take_waiter *tw = arg;
    tw->n++;
    return tw->cb != NULL ? tw->cb(tw->arg, id, r) : 0;
}

int
queue_due_take_wait(struct queue *q, uint64_t now_ms_, unsigned limit, queue_rcpt_fn *cb,
                    void *arg)
{
    struct queue_port *port = queue_port_new();
    if (port == NULL)
        return -errno;
    struct waiter w = {0, false};
    struct take_waiter tw = {cb, arg, 0};
    int rc = queue_due_take(q, port, now_ms_, limit, take_count, &tw, waiter_done, &w);
    if (rc < 0) {
        queue_port_free(port);
        return rc;
    }
    rc = wait_on(port, &w);
    return rc < 0 ? rc : tw.n;
}

/* ---- ids ---- */

uint64_t
queue_id_next(struct queue *q)
{
    uint64_t now = now_ms();
    uint64_t last = atomic_load_explicit(&q->last_id, memory_order_relaxed);
    uint64_t id;
    do {
        id = queue_id_after(last, now, q->cfg.node_id);
    } while (!atomic_compare_exchange_weak_explicit(&q->last_id, &last, id, memory_order_relaxed,
                                                    memory_order_relaxed));
    return id;
}

/* ---- the committer ---- */

/* Copy from a caller's iovecs, in order, across calls. */
struct iov_cursor {
    const struct iovec *iov;
    unsigned n, i;
    size_t off;
};

static void
iov_read(struct iov_cursor *c, unsigned char *dst, size_t len)
{
    while (len > 0 && c->i < c->n) {
        size_t avail = c->iov[c->i].iov_len - c->off;
        size_t take = avail < len ? avail : len;
        if (take > 0)
            memcpy(dst, (const char *)c->iov[c->i].iov_base + c->off, take);
        dst += take;
        len -= take;
        c->off += take;
        if (c->off == c->iov[c->i].iov_len) {
            c->i++;
            c->off = 0;
        }
    }
}

static int
apply_enqueue(struct queue *q, MDB_txn *txn, struct queue_req *r, struct tally *t)
{
    unsigned char key[BODY_KEY_LEN];
    uint64_t id = r->enq.id;
    msg_key(key, id);
    bool inline_body = r->enq.chunks == 0;
    MDB_val k = {MSG_KEY_LEN, key};
    MDB_val v = {r->enq.head_len + (inline_body ? r->enq.body_len : 0), NULL};
    int rc = mdb_put(txn, q->dbi_msg, &k, &v, MDB_NOOVERWRITE | MDB_RESERVE);
    if (rc == MDB_KEYEXIST) {
        /* Nothing written: the transaction is still good for the others. */
        r->rc = QUEUE_EEXIST;
        return 0;
    }
    if (rc != 0)
        return rc;
    struct iov_cursor cur = {r->enq.iov, r->enq.iovcnt, 0, 0};
    memcpy(v.mv_data, r->enq.head, r->enq.head_len);
    if (inline_body) {
        iov_read(&cur, (unsigned char *)v.mv_data + r->enq.head_len, r->enq.body_len);
    } else {
        uint64_t left = r->enq.body_len;
        for (uint32_t c = 0; c < r->enq.chunks; c++) {
            body_key(key, id, c);
            MDB_val ck = {BODY_KEY_LEN, key};
            MDB_val cv = {left < BODY_CHUNK ? (size_t)left : BODY_CHUNK, NULL};
            rc = mdb_put(txn, q->dbi_body, &ck, &cv, MDB_RESERVE);
            if (rc != 0)
                return rc;
            iov_read(&cur, cv.mv_data, cv.mv_size);
            left -= cv.mv_size;
        }
    }
    const unsigned char *p = r->enq.rcpts;
    for (unsigned i = 0; i < r->enq.nrcpt; i++) {
        uint32_t len;
        memcpy(&len, p, 4);
        rcpt_key(key, id, i);
        MDB_val rk = {RCPT_KEY_LEN, key};
        MDB_val rv = {len, (void *)(p + 4)};
        rc = mdb_put(txn, q->dbi_rcpt, &rk, &rv, 0);
        if (rc != 0)
            return rc;
        p += 4 + align4(len);
    }
    t->enq++;
    t->enq_rcpts += r->enq.nrcpt;
    t->enq_bytes += r->enq.body_len;
    if (id > t->max_id)
        t->max_id = id;
    return 0;
}

static int
touched_add(struct queue *q, uint64_t id)
{
    if (q->touched_n > 0 && q->touched[q->touched_n - 1] == id)
        return 0;
    if (q->touched_n == q->touched_cap) {
        size_t cap = q->touched_cap ? q->touched_cap * 2 : 256;
        uint64_t *t = realloc(q->touched, cap * sizeof(*t));
        if (t == NULL)
            return ENOMEM;
        q->touched = t;
        q->touched_cap = cap;
    }
    q->touched[q->touched_n++] = id;
    return 0;
}

/* Whether it, applied in txn now, would be ignored as stale (struct
 * queue_outcome): sets *stale, and *v and *h to the recipient's record
 * when there is one. Changes nothing. Returns 0 or an LMDB code. */
static int
outcome_stale(struct queue *q, MDB_txn *txn, const struct upd_item *it, MDB_val *v,
              struct rcpt_head *h, bool *stale)
{
    unsigned char key[RCPT_KEY_LEN];
    rcpt_key(key, it->id, it->rcpt);
    MDB_val k = {RCPT_KEY_LEN, key};
    *stale = true;
    int rc = mdb_get(txn, q->dbi_rcpt, &k, v);
    if (rc == MDB_NOTFOUND)
        return 0;
    if (rc != 0)
        return rc;
    if (!rcpt_decode(v, h))
        return MDB_CORRUPTED;
    /* Only a deferred recipient has a time to move. */
    if (it->kind == QUEUE_RETIME) {
        *stale = h->state != QUEUE_RCPT_DEFERRED;
        return 0;
    }
    size_t fixed = (size_t)h->addr_len + h->domain_len + h->orcpt_len;
    if (it->kind == QUEUE_DEFERRED && h->state == QUEUE_RCPT_DEFERRED && h->due_ms == it->due_ms &&
        h->code == it->code && h->tag == it->tag && h->reply_len == it->reply_len &&
        memcmp((const unsigned char *)v->mv_data + sizeof(*h) + fixed, it->reply, it->reply_len) ==
            0) {
        /* This very deferral again: its commit happened but was reported
         * failed (the sync after it), and the caller tried again. Applied
         * twice it would count two attempts and tell its event twice; a
         * deferral of its own comes only once queue_due_take made the
         * recipient ready again, and names a later time. */
        return 0;
    }
    *stale = false;
    return 0;
}

static int
apply_outcome(struct queue *q, MDB_txn *txn, const struct upd_item *it, uint64_t now,
              struct tally *t)
{
    unsigned char key[RCPT_KEY_LEN], dkey[DUE_KEY_LEN];
    rcpt_key(key, it->id, it->rcpt);
    MDB_val k = {RCPT_KEY_LEN, key}, v;
    struct rcpt_head h;
    bool stale;
    int rc = outcome_stale(q, txn, it, &v, &h, &stale);
    if (rc != 0)
        return rc;
    if (stale) {
        t->stale++;
        return 0;
    }
    if (it->kind == QUEUE_RETIME) {
        /* The rest of its record (attempts, last reply) stays as it is. */
        unsigned char rec[RCPT_REC_MAX];
        if (v.mv_size > sizeof(rec))
            return MDB_CORRUPTED;
        due_key(dkey, h.due_ms, it->id, it->rcpt);
        MDB_val odk = {DUE_KEY_LEN, dkey};
        rc = mdb_del(txn, q->dbi_due, &odk, NULL);
        if (rc != 0 && rc != MDB_NOTFOUND)
            return rc;
        memcpy(rec, v.mv_data, v.mv_size);
        h.due_ms = it->due_ms;
        memcpy(rec, &h, sizeof(h));
        MDB_val nv = {v.mv_size, rec};
        if ((rc = mdb_put(txn, q->dbi_rcpt, &k, &nv, 0)) != 0)
            return rc;
        t->outcomes++;
        due_key(dkey, it->due_ms, it->id, it->rcpt);
        MDB_val dk = {DUE_KEY_LEN, dkey}, empty = {0, NULL};
        return mdb_put(txn, q->dbi_due, &dk, &empty, 0);
    }
    size_t fixed = (size_t)h.addr_len + h.domain_len + h.orcpt_len;
    if (h.state == QUEUE_RCPT_DEFERRED) {
        due_key(dkey, h.due_ms, it->id, it->rcpt);
        MDB_val dk = {DUE_KEY_LEN, dkey};
        rc = mdb_del(txn, q->dbi_due, &dk, NULL);
        if (rc != 0 && rc != MDB_NOTFOUND)
            return rc;
    }
    t->outcomes++;
    if (it->kind != QUEUE_DEFERRED) {
        rc = mdb_del(txn, q->dbi_rcpt, &k, NULL);
        return rc != 0 ? rc : touched_add(q, it->id);
    }
    /* Rebuild the record: v points into a page the puts below may move. */
    unsigned char rec[RCPT_REC_MAX];
    if (sizeof(h) + fixed + it->reply_len > sizeof(rec))
        return MDB_CORRUPTED;
    memcpy(rec + sizeof(h), (const unsigned char *)v.mv_data + sizeof(h), fixed);
    if (it->reply_len > 0)
        memcpy(rec + sizeof(h) + fixed, it->reply, it->reply_len);
    h.state = QUEUE_RCPT_DEFERRED;
    if (h.attempts < UINT16_MAX)
        h.attempts++;
    h.code = it->code;
    h.tag = it->tag;
    h.reply_len = it->reply_len;
    h.due_ms = it->due_ms;
    h.last_ms = now;
    memcpy(rec, &h, sizeof(h));
    MDB_val nv = {sizeof(h) + fixed + it->reply_len, rec};
    rc = mdb_put(txn, q->dbi_rcpt, &k, &nv, 0);
    if (rc != 0)
        return rc;
    due_key(dkey, it->due_ms, it->id, it->rcpt);
    MDB_val dk = {DUE_KEY_LEN, dkey}, empty = {0, NULL};
    return mdb_put(txn, q->dbi_due, &dk, &empty, 0);
}

/* A record that fails its checks: count and log it once per key and
 * process (see struct corrupt_seen); the caller skips it. db names the
 * database, key is its key (message id first for every database but
 * "due", where the id follows the time). Any thread. */
static void
corrupt_note(struct queue *q, const char *db, const void *key, size_t klen)
{
    unsigned char tag[DUE_KEY_LEN + 1] = {0};
    tag[0] = (unsigned char)db[0];
    memcpy(tag + 1, key, klen < DUE_KEY_LEN ? klen : DUE_KEY_LEN);
    struct corrupt_seen *cs = &q->corrupt;
    pthread_mutex_lock(&cs->mu);
    for (unsigned i = 0; i < cs->n; i++) {
        if (memcmp(cs->key[i], tag, sizeof(tag)) == 0) {
            pthread_mutex_unlock(&cs->mu);
            return;
        }
    }
    bool kept = cs->n < CORRUPT_KEEP;
    if (kept)
        memcpy(cs->key[cs->n++], tag, sizeof(tag));
    pthread_mutex_unlock(&cs->mu);
    atomic_fetch_add_explicit(&q->st.corrupt, 1, memory_order_relaxed);
    char hex[2 * DUE_KEY_LEN + 1];
    size_t n = klen < DUE_KEY_LEN ? klen : DUE_KEY_LEN;
    for (size_t i = 0; i < n; i++)
        snprintf(hex + 2 * i, 3, "%02x", ((const unsigned char *)key)[i]);
    hex[2 * n] = '\0';
    const unsigned char *k = key;
    size_t id_off = strcmp(db, "due") == 0 ? 8 : 0;
    char qid[QUEUE_ID_STRLEN + 1] = "-";
    if (klen >= id_off + 8)
        queue_id_str(key_u64(k + id_off), qid);
    log_msg(LOG_ERR,
            "id=%s queue=corrupt_record db=%s key=%s path=%s action=skipped%s "
            "hint=\"sluice-spool check lists the damage\"",
            qid, db, hex, q->cfg.path, kept ? "" : " note=not_remembered");
}

/* Append a taken recipient to r's result (committer; freed by the owner). */
static int
take_append(struct queue_req *r, uint64_t id, unsigned index, const void *rec, size_t len,
            const struct owner_buf *o)
{
    size_t olen = (size_t)o->tenant_len + o->campaign_len + o->pool_len;
    size_t need = (sizeof(struct take_rec) + len + olen + 7) & ~(size_t)7;
    if (r->u.take.len + need > r->u.take.cap) {
        size_t cap = r->u.take.cap ? r->u.take.cap * 2 : 4096;
        while (cap < r->u.take.len + need)
            cap *= 2;
        unsigned char *b = realloc(r->u.take.buf, cap);
        if (b == NULL)
            return ENOMEM;
        r->u.take.buf = b;
        r->u.take.cap = cap;
    }
    struct take_rec tr = {.id = id,
                          .index = index,
                          .len = (uint32_t)len,
                          .tenant_len = o->tenant_len,
                          .campaign_len = o->campaign_len,
                          .pool_len = o->pool_len,
                          .priority = o->priority,
                          .tls_relaxed = o->tls_relaxed};
    unsigned char *p = r->u.take.buf + r->u.take.len;
    memcpy(p, &tr, sizeof(tr));
    memcpy(p + sizeof(tr), rec, len);
    p += sizeof(tr) + len;
    memcpy(p, o->tenant, o->tenant_len);
    memcpy(p + o->tenant_len, o->campaign, o->campaign_len);
    memcpy(p + o->tenant_len + o->campaign_len, o->pool, o->pool_len);
    r->u.take.len += need;
    r->u.take.n++;
    return 0;
}

/* The owner of message id into o (kept when o already holds it): empty
 * when its record is missing or fails its checks (the recipient still
 * goes, as a message without an owner). */
static void
owner_read(struct queue *q, MDB_txn *txn, uint64_t id, struct owner_buf *o)
{
    if (o->id == id && id != 0)
        return;
    o->id = id;
    o->tenant_len = o->campaign_len = o->pool_len = o->priority = 0;
    o->tls_relaxed = false;
    o->tenant[0] = o->campaign[0] = o->pool[0] = '\0';
    unsigned char key[MSG_KEY_LEN];
    msg_key(key, id);
    MDB_val k = {MSG_KEY_LEN, key}, v;
    struct msg_head h;
    if (mdb_get(txn, q->dbi_msg, &k, &v) != 0 || !msg_decode(&v, &h))
        return;
    const char *p = (const char *)v.mv_data + sizeof(h) + h.sender_len + h.envid_len +
                    h.auth_len + h.client_len;
    o->tenant_len = h.tenant_len;
    memcpy(o->tenant, p, h.tenant_len);
    o->tenant[h.tenant_len] = '\0';
    p += h.tenant_len;
    o->campaign_len = h.campaign_len;
    memcpy(o->campaign, p, h.campaign_len);
    o->campaign[h.campaign_len] = '\0';
    p += h.campaign_len;
    o->pool_len = h.pool_len;
    memcpy(o->pool, p, h.pool_len);
    o->pool[h.pool_len] = '\0';
    o->priority = h.priority <= QUEUE_MAX_PRIORITY ? h.priority : QUEUE_MAX_PRIORITY;
    o->tls_relaxed = (h.flags & MSG_F_TLS_RELAXED) != 0;
}

/* Move the deferred recipients due by the request's time out of the time
 * index and make them ready, in due order, up to its limit. The index is
 * the truth about what nobody took yet: it is read from its start, so
 * that no remembered position can hide an entry (a deferral behind it
 * after the wall clock stepped back). An entry without its recipient is
 * removed; one whose recipient does not decode is skipped and counted.
 * Returns 0 or an LMDB code. */
static int
apply_take(struct queue *q, MDB_txn *txn, struct queue_req *r, struct tally *t)
{
    r->u.take.len = 0;
    r->u.take.n = 0;
    MDB_cursor *c;
    int rc = mdb_cursor_open(txn, q->dbi_due, &c);
    if (rc != 0)
        return rc;
    unsigned char last[DUE_KEY_LEN];
    size_t last_len = 0;
    unsigned limit = r->u.take.limit;
    struct owner_buf *ob = calloc(1, sizeof(*ob));
    if (ob == NULL) {
        mdb_cursor_close(c);
        return ENOMEM;
    }
    while (limit == 0 || r->u.take.n < limit) {
        MDB_val k, v;
        if (last_len == 0) {
            rc = mdb_cursor_get(c, &k, &v, MDB_FIRST);
        } else {
            /* taken entries are gone; a skipped one is still there */
            k = (MDB_val){last_len, last};
            rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
            if (rc == 0 && k.mv_size == last_len && memcmp(k.mv_data, last, last_len) == 0)
                rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
        }
        if (rc != 0)
            break;
        last_len = k.mv_size < sizeof(last) ? k.mv_size : sizeof(last);
        memcpy(last, k.mv_data, last_len);
        if (k.mv_size != DUE_KEY_LEN) {
            corrupt_note(q, "due", last, last_len);
            continue;
        }
        uint64_t due = key_u64(last), id = key_u64(last + 8);
        unsigned idx = key_u16(last + 16);
        if (due > r->u.take.now_ms)
            break;
        MDB_val dk = {DUE_KEY_LEN, last}, rk = {RCPT_KEY_LEN, last + 8}, rv;
        rc = mdb_get(txn, q->dbi_rcpt, &rk, &rv);
        if (rc == MDB_NOTFOUND) {
            /* an index entry for nobody: drop it, or it stays due forever */
            corrupt_note(q, "due", last, DUE_KEY_LEN);
            if ((rc = mdb_del(txn, q->dbi_due, &dk, NULL)) != 0)
                break;
            t->fixed++;
            continue;
        }
        if (rc != 0)
            break;
        struct rcpt_head h;
        unsigned char rec[RCPT_REC_MAX];
        if (!rcpt_decode(&rv, &h) || rv.mv_size > sizeof(rec)) {
            corrupt_note(q, "rcpt", last + 8, RCPT_KEY_LEN);
            continue;
        }
        if ((rc = mdb_del(txn, q->dbi_due, &dk, NULL)) != 0)
            break;
        if (h.state != QUEUE_RCPT_DEFERRED || h.due_ms != due) {
            /* the record disagrees with its index entry: the record wins;
             * a deferred one is taken all the same, or it might never be */
            corrupt_note(q, "due", last, DUE_KEY_LEN);
            t->fixed++;
            if (h.state != QUEUE_RCPT_DEFERRED)
                continue;
            unsigned char okey[DUE_KEY_LEN];
            due_key(okey, h.due_ms, id, idx);
            MDB_val ok = {DUE_KEY_LEN, okey};
            if ((rc = mdb_del(txn, q->dbi_due, &ok, NULL)) != 0 && rc != MDB_NOTFOUND)
                break;
        }
        memcpy(rec, rv.mv_data, rv.mv_size);
        h.state = QUEUE_RCPT_READY;
        h.due_ms = 0;
        memcpy(rec, &h, sizeof(h));
        MDB_val nv = {rv.mv_size, rec};
        if ((rc = mdb_put(txn, q->dbi_rcpt, &rk, &nv, 0)) != 0)
            break;
        owner_read(q, txn, id, ob);
        if ((rc = take_append(r, id, idx, rec, rv.mv_size, ob)) != 0)
            break;
        t->taken++;
    }
    free(ob);
    mdb_cursor_close(c);
    return rc == MDB_NOTFOUND ? 0 : rc;
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Remove the message and body of every touched id left without recipients. */
static int
remove_finished(struct queue *q, MDB_txn *txn, struct tally *t)
{
    if (q->touched_n == 0)
        return 0;
    qsort(q->touched, q->touched_n, sizeof(uint64_t), cmp_u64);
    MDB_cursor *c;
    int rc = mdb_cursor_open(txn, q->dbi_rcpt, &c);
    if (rc != 0)
        return rc;
    uint64_t prev = 0;
    for (size_t i = 0; i < q->touched_n && rc == 0; i++) {
        uint64_t id = q->touched[i];
        if (i > 0 && id == prev)
            continue;
        prev = id;
        unsigned char key[BODY_KEY_LEN];
        rcpt_key(key, id, 0);
        MDB_val k = {RCPT_KEY_LEN, key}, v;
        rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        if (rc == 0 && k.mv_size == RCPT_KEY_LEN && key_u64(k.mv_data) == id)
            continue; /* recipients left */
        if (rc != 0 && rc != MDB_NOTFOUND)
            break;
        msg_key(key, id);
        MDB_val mk = {MSG_KEY_LEN, key}, mv;
        rc = mdb_get(txn, q->dbi_msg, &mk, &mv);
        if (rc == MDB_NOTFOUND) {
            rc = 0;
            continue;
        }
        if (rc != 0)
            break;
        struct msg_head h;
        uint32_t chunks = msg_decode(&mv, &h) ? h.body_chunks : 0;
        rc = mdb_del(txn, q->dbi_msg, &mk, NULL);
        for (uint32_t ch = 0; ch < chunks && rc == 0; ch++) {
            body_key(key, id, ch);
            MDB_val bk = {BODY_KEY_LEN, key};
            rc = mdb_del(txn, q->dbi_body, &bk, NULL);
            if (rc == MDB_NOTFOUND)
                rc = 0;
        }
        if (rc == 0)
            t->removed++;
    }
    mdb_cursor_close(c);
    return rc;
}

static void
counter_add(_Atomic uint64_t *c, uint64_t n)
{
    /* one writer (the committer): a relaxed load and store is enough */
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n,
                          memory_order_relaxed);
}

static void
counter_max(_Atomic uint64_t *c, uint64_t v)
{
    if (v > atomic_load_explicit(c, memory_order_relaxed))
        atomic_store_explicit(c, v, memory_order_relaxed);
}

/* Keep disk blocks allocated (fallocate, file size unchanged) for some
 * pages past the end of the data: a full disk then stops new mail at
 * admission, with a reserve of blocks left for the updates that delete
 * mail, instead of failing every commit, deletions included, on ENOSPC.
 * need: pages about to be used by enqueues. Committer (or open) only. */
static void
disk_reserve(struct queue *q, size_t need)
{
    if (!q->prealloc)
        return;
    size_t want = q->last_pgno + 1 + need + q->reserve_pages;
    if (want > q->map_pages)
        want = q->map_pages;
    if (q->alloc_pages >= want)
        return;
    /* grow by a good step: one call per few MB written, not per commit */
    size_t step = q->reserve_pages < 512 ? 256 : q->reserve_pages / 2;
    size_t target = want + step < q->map_pages ? want + step : q->map_pages;
    off_t off = (off_t)q->alloc_pages * (off_t)q->psize;
    off_t len = (off_t)(target - q->alloc_pages) * (off_t)q->psize;
    if (fallocate(q->data_fd, FALLOC_FL_KEEP_SIZE, off, len) == 0) {
        q->alloc_pages = target;
        return;
    }
    if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) {
        q->prealloc = false; /* this filesystem cannot: plain ENOSPC it is */
        return;
    }
    /* ENOSPC and the like: take what fits, page by page would be slow;
     * admission sees the shortfall and refuses new mail. */
    if (target > want && fallocate(q->data_fd, FALLOC_FL_KEEP_SIZE, off,
                                   (off_t)(want - q->alloc_pages) * (off_t)q->psize) == 0)
        q->alloc_pages = want;
}

static void *map_find(const struct stat *st);

static void
refresh_map_use(struct queue *q)
{
    MDB_envinfo info;
    if (mdb_env_info(q->env, &info) == 0) {
        q->last_pgno = info.me_last_pgno;
        atomic_store_explicit(&q->st.map_used, (uint64_t)(info.me_last_pgno + 1) * q->psize,
                              memory_order_relaxed);
    }
}

/* An update carrying a message (a DSN) with an outcome that would be
 * stale, while another would apply: the message may tell a recipient
 * that is done already (delivered, say, by a delivery that crossed an
 * operator's bounce). Nothing of it is applied: *refuse, r->rc
 * QUEUE_ESTALE, and each outcome's applied flag says whether it would
 * have applied, so that the caller tries again without the stale ones
 * and with a message that names only the others. When every outcome
 * would be stale (a retry of a commit that happened), the request goes
 * on and changes nothing (queue.h). Returns 0 or an LMDB code. */
static int
msg_check(struct queue *q, MDB_txn *txn, struct queue_req *r, bool *refuse)
{
    bool stale_one = false, any = false;
    *refuse = false;
    for (size_t j = 0; j < r->u.upd.n; j++) {
        struct upd_item *it = &r->u.upd.items[j];
        MDB_val v;
        struct rcpt_head h;
        bool stale;
        int rc = outcome_stale(q, txn, it, &v, &h, &stale);
        if (rc != 0)
            return rc;
        it->applied = !stale;
        any |= !stale;
        stale_one |= stale;
    }
    if (stale_one && any) {
        *refuse = true;
        r->rc = QUEUE_ESTALE;
    }
    return 0;
}

/* One write transaction: the updates, then the enqueues. Returns 0 or an
 * LMDB code, with nothing committed on failure. */
static int
commit_set(struct queue *q, struct queue_req **upd, size_t nu, struct queue_req **enq, size_t ne)
{
    uint64_t t0 = mono_us();
    MDB_txn *txn;
    int rc = mdb_txn_begin(q->env, NULL, 0, &txn);
    if (rc != 0)
        return rc;
    struct tally t = {0};
    uint64_t now = now_ms();
    q->touched_n = 0;
    for (size_t i = 0; i < nu && rc == 0; i++) {
        struct queue_req *r = upd[i];
        if (r->kind == REQ_TAKE) {
            rc = apply_take(q, txn, r, &t);
            continue;
        }
        if (r->kind == REQ_EVENTS || r->kind == REQ_TRIM)
            continue;
        r->rc = 0; /* a try before this one (halved for space) may have set it */
        r->applied = false;
        if (r->has_msg) {
            bool refuse;
            rc = msg_check(q, txn, r, &refuse);
            if (rc != 0 || refuse)
                continue;
        }
        uint64_t before = t.outcomes;
        for (size_t j = 0; j < r->u.upd.n && rc == 0; j++) {
            uint64_t b = t.outcomes;
            rc = apply_outcome(q, txn, &r->u.upd.items[j], now, &t);
            r->u.upd.items[j].applied = t.outcomes > b;
        }
        r->applied = t.outcomes > before;
    }
    if (rc == 0)
        rc = remove_finished(q, txn, &t);
    /* The messages updates carry (DSNs), with the outcomes that caused
     * them; not when those were all stale (that commit happened before). */
    for (size_t i = 0; i < nu && rc == 0; i++) {
        struct queue_req *r = upd[i];
        if (r->kind != REQ_UPDATE || !r->has_msg || !r->applied)
            continue;
        rc = apply_enqueue(q, txn, r, &t);
        if (r->rc == QUEUE_EEXIST)
            r->rc = 0; /* stored by an earlier try */
    }
    for (size_t i = 0; i < ne && rc == 0; i++)
        rc = apply_enqueue(q, txn, enq[i], &t);
    /* The event lines, numbered in commit order: the updates' (those of
     * the outcomes applied and their own, or lines alone), then the
     * enqueues' (stored now). */
    uint64_t floor = atomic_load(&q->ev_floor);
    uint64_t seq = q->ev_next > floor ? q->ev_next : floor;
    bool trims = false;
    for (size_t i = 0; i < nu && rc == 0; i++) {
        struct queue_req *r = upd[i];
        if (r->kind == REQ_EVENTS || (r->kind == REQ_UPDATE && r->applied))
            rc = apply_events(q, txn, r, &seq, &t);
        trims |= r->kind == REQ_TRIM;
    }
    for (size_t i = 0; i < ne && rc == 0; i++)
        if (enq[i]->rc == 0)
            rc = apply_events(q, txn, enq[i], &seq, &t);
    for (size_t i = 0; i < nu && rc == 0 && trims; i++)
        if (upd[i]->kind == REQ_TRIM)
            rc = apply_trim(q, txn, upd[i], seq, &t);
    if (rc == 0 && ne == 0 && t.outcomes == 0 && t.stale == 0 && t.taken == 0 && t.fixed == 0 &&
        t.enq == 0) {
        /* Only takes, and nothing was due: no commit, no sync (the due
         * poll asks every second, also when there is nothing to do). */
        bool takes_only = t.ev_records == 0;
        for (size_t i = 0; i < nu; i++)
            takes_only &= upd[i]->kind == REQ_TAKE;
        if (takes_only) {
            mdb_txn_abort(txn);
            return 0;
        }
    }
    uint64_t high = t.max_id > q->high_id ? t.max_id : q->high_id;
    bool clean = t.enq == 0 && t.outcomes == 0 && t.removed == 0 && t.taken == 0 &&
                 t.ev_records == 0 && !trims;
    bool store = clean || (t.removed > 0 && high > q->stored_id);
    if (rc == 0 && store) {
        /* The highest id must outlive the messages that carried it
         * (opening takes the larger of it and the last live id). And a
         * commit with no dirty page skips its data sync, on which
         * flush_pending counts: give it one. */
        MDB_val k = {7, "last_id"}, v = {sizeof(high), &high};
        rc = mdb_put(txn, q->dbi_meta, &k, &v, 0);
    }
    if (rc != 0) {
        mdb_txn_abort(txn);
        counter_add(&q->st.commit_failures, 1);
        return rc;
    }
    rc = mdb_txn_commit(txn);
    if (rc != 0) {
        counter_add(&q->st.commit_failures, 1);
        return rc;
    }
    q->batch_commits++;
    q->high_id = high;
    q->ev_next = seq;
    counter_add(&q->st.event_lines, t.ev_lines);
    counter_add(&q->st.events_kept, t.ev_records);
    if (t.ev_trimmed > 0)
        atomic_fetch_sub(&q->st.events_kept, t.ev_trimmed);
    if (store)
        q->stored_id = high;
    if (t.removed > 0)
        q->since_free = 0;
    else if (q->since_free < 2)
        q->since_free++;
    uint64_t us = mono_us() - t0;
    q->last_commit_us = us;
    counter_add(&q->st.commits, 1);
    counter_add(&q->st.enqueued, t.enq);
    counter_add(&q->st.enqueued_rcpts, t.enq_rcpts);
    counter_add(&q->st.enqueued_bytes, t.enq_bytes);
    counter_add(&q->st.outcomes, t.outcomes);
    counter_add(&q->st.outcomes_stale, t.stale);
    counter_add(&q->st.removed, t.removed);
    counter_add(&q->st.taken, t.taken);
    counter_add(&q->st.commit_us_total, us);
    counter_max(&q->st.commit_us_max, us);
    counter_max(&q->st.batch_max, nu + ne);
    refresh_map_use(q);
    disk_reserve(q, 0);
    return 0;
}

/* Updates alone; on a space failure, halves, so that what fits commits. */
static void
commit_updates(struct queue *q, struct queue_req **upd, size_t n)
{
    int rc = commit_set(q, upd, n, NULL, 0);
    if (rc == 0)
        return;
    if (lmdb_space_err(rc) && n > 1) {
        commit_updates(q, upd, n / 2);
        commit_updates(q, upd + n / 2, n - n / 2);
        return;
    }
    for (size_t i = 0; i < n; i++)
        upd[i]->rc = lmdb_err(rc);
}

/* Pages in LMDB's free list, read the way mdb_stat -f does (each record
 * of database 0 is a page list whose first word is its length). Only
 * called when the end of the map is near, so the scan is rare. */
static size_t
freelist_pages(struct queue *q)
{
    MDB_txn *txn;
    MDB_cursor *c;
    size_t pages = 0;
    if (mdb_txn_begin(q->env, NULL, MDB_RDONLY, &txn) != 0)
        return 0;
    if (mdb_cursor_open(txn, 0, &c) == 0) {
        MDB_val k, v;
        while (mdb_cursor_get(c, &k, &v, MDB_NEXT) == 0) {
            size_t n;
            if (v.mv_size >= sizeof(n)) {
                memcpy(&n, v.mv_data, sizeof(n));
                pages += n;
            }
        }
        mdb_cursor_close(c);
    }
    mdb_txn_abort(txn);
    return pages;
}

static size_t
enqueue_pages(const struct queue *q, const struct queue_req *r)
{
    /* Rough: the record and body pages, the recipients at half-full
     * leaves, and a couple of branch pages. */
    uint64_t bytes = r->enq.head_len + r->enq.body_len + 64ULL * r->enq.chunks;
    return (size_t)(bytes / q->psize) + 2 * r->enq.rcpt_bytes / q->psize + 3;
}

static void
full_note(struct queue *q, const char *reason, size_t refused)
{
    counter_add(&q->st.enqueue_refused, refused);
    if (q->full)
        return;
    q->full = true;
    uint64_t now = now_ms();
    /* once per episode, and episodes at most once a minute */
    q->full_logged = q->full_logged_ms == 0 || now - q->full_logged_ms >= 60000;
    if (!q->full_logged)
        return;
    q->full_logged_ms = now;
    bool disk = strcmp(reason, "disk_full") == 0;
    log_msg(LOG_WARN,
            "queue=full reason=%s path=%s map_size=%" PRIu64 " map_used=%" PRIu64
            " action=refusing_new_mail hint=\"deliveries free room; %s\"",
            reason, q->cfg.path, (uint64_t)q->map_pages * q->psize,
            (uint64_t)(q->last_pgno + 1) * q->psize,
            disk ? "so does freeing disk space" : "raise map_size and restart to grow");
}

/* Keep the enqueues that fit in front of enq; refuse the others, with
 * QUEUE_EMAPFULL when the map is short of room and -ENOSPC when the disk
 * is (the blocks reserved ahead of the data, see disk_reserve, are not
 * enough and could not be extended). Either way a reserve is left for
 * the updates that free room. */
static size_t
admit(struct queue *q, struct queue_req **enq, size_t ne)
{
    size_t need_all = 0;
    for (size_t i = 0; i < ne; i++)
        need_all += enqueue_pages(q, enq[i]);
    disk_reserve(q, need_all);
    size_t end = q->last_pgno + 1;
    size_t map_avail = q->map_pages > end ? q->map_pages - end : 0;
    size_t disk_avail = !q->prealloc ? SIZE_MAX : q->alloc_pages > end ? q->alloc_pages - end : 0;
    size_t low = map_avail < disk_avail ? map_avail : disk_avail;
    size_t free_pages = 0;
    if (low < q->reserve_pages + need_all + 256)
        free_pages = freelist_pages(q);
    size_t used = 0, na = 0, refused_map = 0, refused_disk = 0;
    for (size_t i = 0; i < ne; i++) {
        size_t want = q->reserve_pages + used + enqueue_pages(q, enq[i]);
        if (map_avail + free_pages < want) {
            enq[i]->rc = QUEUE_EMAPFULL;
            refused_map++;
        } else if (disk_avail != SIZE_MAX && disk_avail + free_pages < want) {
            enq[i]->rc = -ENOSPC;
            refused_disk++;
        } else {
            used = want - q->reserve_pages;
            enq[na++] = enq[i];
        }
    }
    if (refused_map + refused_disk > 0)
        full_note(q, refused_map ? "map_full" : "disk_full", refused_map + refused_disk);
    return na;
}

/* Updates that carry a message (a DSN) use the reserve, but only its
 * first half: the rest stays for the updates that only delete, so that
 * the DSNs of a mass bounce can never take the last pages and leave the
 * deliveries that would free room unable to commit. One that does not
 * fit fails with QUEUE_EMAPFULL (its outcomes with it: both or neither),
 * and its caller tries again once deliveries have made room. Returns
 * how many of upd[0..n) are left, in order. */
static size_t
admit_msgs(struct queue *q, struct queue_req **upd, size_t n)
{
    size_t need_all = 0;
    for (size_t i = 0; i < n; i++)
        if (upd[i]->has_msg)
            need_all += enqueue_pages(q, upd[i]);
    if (need_all == 0)
        return n;
    size_t end = q->last_pgno + 1;
    size_t map_avail = q->map_pages > end ? q->map_pages - end : 0;
    size_t disk_avail = !q->prealloc ? SIZE_MAX : q->alloc_pages > end ? q->alloc_pages - end : 0;
    size_t avail = map_avail < disk_avail ? map_avail : disk_avail;
    size_t keep = q->reserve_pages / 2;
    if (avail >= keep + need_all + 256)
        return n;
    avail += freelist_pages(q);
    size_t used = 0, na = 0;
    for (size_t i = 0; i < n; i++) {
        if (upd[i]->has_msg) {
            size_t want = keep + used + enqueue_pages(q, upd[i]);
            if (avail < want) {
                upd[i]->rc = map_avail <= disk_avail ? QUEUE_EMAPFULL : -ENOSPC;
                continue;
            }
            used = want - keep;
        }
        upd[na++] = upd[i];
    }
    return na;
}

static void
note_failure(struct queue *q, int rc)
{
    if (rc == QUEUE_EPANIC && !q->panic_logged) {
        q->panic_logged = true;
        log_msg(LOG_CRIT, "queue=panic path=%s error=\"%s\" action=restart_needed", q->cfg.path,
                queue_strerror(rc));
    }
}

/* A commit that changes nothing but the txn id. */
static int
commit_tick(struct queue *q)
{
    MDB_txn *txn;
    int rc = mdb_txn_begin(q->env, NULL, 0, &txn);
    if (rc != 0)
        return rc;
    MDB_val k = {7, "last_id"}, v = {sizeof(q->high_id), &q->high_id};
    rc = mdb_put(txn, q->dbi_meta, &k, &v, 0);
    if (rc != 0) {
        mdb_txn_abort(txn);
        return rc;
    }
    rc = mdb_txn_commit(txn);
    if (rc == 0) {
        q->stored_id = q->high_id;
        q->since_free++;
        q->batch_commits++;
    }
    return rc;
}

/* Enqueues failed for space. Pages freed by commit N are reusable from
 * commit N+2 on (LMDB keeps the previous snapshot intact until the next
 * meta page is durable), and a failed transaction does not advance the
 * txn id: right after deletions, commit once more and try again, or a
 * spool whose free pages are not reusable yet would refuse mail until
 * some unrelated commit came. Returns 0 or the LMDB code of the failure. */
static int
retry_enqueues(struct queue *q, struct queue_req **enq, size_t n, int rc)
{
    if (q->since_free >= 2)
        return rc;
    if (q->since_free == 0 && (rc = commit_tick(q)) != 0)
        return rc;
    for (size_t i = 0; i < n; i++)
        enq[i]->rc = 0;
    return commit_set(q, NULL, 0, enq, n);
}

static void
run_batch(struct queue *q, struct queue_req *batch)
{
    size_t nu = 0, ne = 0;
    for (struct queue_req *r = batch; r != NULL; r = r->next) {
        r->rc = 0;
        if (r->kind != REQ_ENQUEUE)
            q->vec_upd[nu++] = r;
        else
            q->vec_enq[ne++] = r;
    }
    nu = admit_msgs(q, q->vec_upd, nu);
    size_t na = ne > 0 ? admit(q, q->vec_enq, ne) : 0;
    int rc = (nu + na) > 0 ? commit_set(q, q->vec_upd, nu, q->vec_enq, na) : 0;
    if (rc == 0) {
        if (q->full && na > 0) {
            q->full = false;
            if (q->full_logged)
                log_msg(LOG_NOTICE, "queue=room_again path=%s map_used=%" PRIu64, q->cfg.path,
                        (uint64_t)(q->last_pgno + 1) * q->psize);
        }
    } else if (lmdb_space_err(rc)) {
        if (nu > 0)
            commit_updates(q, q->vec_upd, nu);
        if (na > 0 && (rc = retry_enqueues(q, q->vec_enq, na, rc)) != 0) {
            for (size_t i = 0; i < na; i++)
                q->vec_enq[i]->rc = lmdb_err(rc);
            full_note(q, rc == MDB_MAP_FULL ? "map_full" : "disk_full", na);
        }
    } else {
        int err = lmdb_err(rc);
        note_failure(q, err);
        for (size_t i = 0; i < nu; i++)
            q->vec_upd[i]->rc = err;
        for (size_t i = 0; i < na; i++)
            q->vec_enq[i]->rc = err;
    }
}

/* Push every request of the list to its port, one push per port and
 * round (ports: room for max_batch). A port sees its completions in the
 * order they were committed. Rounds are numbered across both threads that
 * deliver, so a port's mark never matches another thread's round. */
static void
deliver(struct queue *q, struct queue_req *list, struct queue_port **ports)
{
    struct queue_req *next;
    size_t np = 0;
    uint64_t mark = atomic_fetch_add(&q->round, 1) + 1;
    for (struct queue_req *r = list; r != NULL; r = next) {
        next = r->next;
        r->next = NULL;
        struct queue_port *p = r->port;
        if (p->mark != mark) {
            if (np == q->cfg.max_batch) {
                for (size_t i = 0; i < np; i++)
                    port_push(ports[i], ports[i]->chain_head, ports[i]->chain_tail);
                np = 0;
                mark = atomic_fetch_add(&q->round, 1) + 1;
            }
            p->mark = mark;
            p->chain_head = NULL;
            ports[np++] = p;
        }
        if (p->chain_head == NULL)
            p->chain_head = r;
        else
            p->chain_tail->next = r;
        p->chain_tail = r;
    }
    for (size_t i = 0; i < np; i++)
        port_push(ports[i], ports[i]->chain_head, ports[i]->chain_tail);
}

static void *
notifier_main(void *arg)
{
    struct queue *q = arg;
    log_set_thread_name("queue-notify");
    pthread_mutex_lock(&q->nmu);
    for (;;) {
        while (q->n_head == NULL && !q->n_stopping) {
            q->n_idle = true;
            pthread_cond_wait(&q->ncond, &q->nmu);
            q->n_idle = false;
        }
        struct queue_req *list = q->n_head;
        if (list == NULL)
            break;
        q->n_head = q->n_tail = NULL;
        pthread_mutex_unlock(&q->nmu);
        deliver(q, list, q->ports);
        pthread_mutex_lock(&q->nmu);
    }
    pthread_mutex_unlock(&q->nmu);
    return NULL;
}

/* Committer: hand committed requests to the notifier. When the committer
 * has nothing else to do (idle is true) and the notifier has nothing
 * queued, they share the work: the notifier takes the ports of one half,
 * the committer pushes to the other half itself before returning, so
 * each port still gets its completions in order. */
static void
notify(struct queue *q, struct queue_req *batch, struct queue_req *last, bool idle)
{
    struct queue_req *mine = NULL, **mine_tail = &mine;
    pthread_mutex_lock(&q->nmu);
    if (idle && q->n_head == NULL && q->n_idle) {
        struct queue_req *theirs = NULL, **theirs_tail = &theirs, *theirs_last = NULL, *next;
        for (struct queue_req *r = batch; r != NULL; r = next) {
            next = r->next;
            r->next = NULL;
            uintptr_t h = (uintptr_t)r->port;
            if (((h >> 6) ^ (h >> 11)) & 1) {
                *mine_tail = r;
                mine_tail = &r->next;
            } else {
                *theirs_tail = r;
                theirs_tail = &r->next;
                theirs_last = r;
            }
        }
        batch = theirs;
        last = theirs_last;
    }
    if (batch != NULL) {
        if (q->n_tail != NULL)
            q->n_tail->next = batch;
        else
            q->n_head = batch;
        q->n_tail = last;
        if (q->n_idle)
            pthread_cond_signal(&q->ncond);
    }
    pthread_mutex_unlock(&q->nmu);
    if (mine != NULL)
        deliver(q, mine, q->cports);
}

/* Send durable completions to the notifier. The callers they complete
 * tend to come straight back (a worker answering 250 reads the next
 * DATA): expect them, so that gather() lets them share the next commit.
 * The target is set before they can come back, so none is counted twice. */
static void
release(struct queue *q, struct queue_req *head, struct queue_req *tail)
{
    size_t n = 0;
    for (struct queue_req *r = head; r != NULL; r = r->next)
        n++;
    pthread_mutex_lock(&q->mu);
    size_t base = q->gather_target > 0 ? q->gather_target : q->in_count;
    q->gather_target = base + n < q->cfg.max_batch ? base + n : q->cfg.max_batch;
    bool idle = q->in_head == NULL;
    pthread_mutex_unlock(&q->mu);
    notify(q, head, tail, idle);
}

/* Completions wait in q->pend until the commit that holds them is
 * durable. With MDB_NOMETASYNC a commit syncs its data pages and writes
 * its meta page without syncing it; the next commit's data sync (or
 * mdb_env_sync) makes that meta page durable. So when a commit succeeds,
 * everything pending before it is durable and goes to the notifier; when
 * the committer runs out of work, it syncs and sends what is pending. */
static void
flush_pending(struct queue *q)
{
    if (q->pend_head == NULL)
        return;
    uint64_t ev = q->ev_pend;
    if (q->pend_unsynced) {
        int rc = mdb_env_sync(q->env, 1);
        q->pend_unsynced = false;
        if (rc != 0) {
            /* The data may well be on disk, but it was not confirmed:
             * the client retries, a duplicate is better than a loss. Not
             * a take: what it took left the index and is ready in the
             * spool this process reads, so only its caller can own it
             * (failed, nobody would until a restart); should a crash
             * lose the commit, the recipients are deferred as before.
             * Nor event lines put alone: nobody puts them again, and
             * they are published below all the same, so the pump moves
             * them to the journal; failed, they were reported lost. */
            int err = lmdb_err(rc);
            note_failure(q, err);
            for (struct queue_req *r = q->pend_head; r != NULL; r = r->next)
                if (r->rc == 0 && r->kind != REQ_TAKE && r->kind != REQ_EVENTS)
                    r->rc = err;
        }
    }
    events_publish(q, ev);
    release(q, q->pend_head, q->pend_tail);
    q->pend_head = q->pend_tail = NULL;
}

static void
pend_append(struct queue *q, struct queue_req *batch, struct queue_req *last)
{
    if (q->pend_tail != NULL)
        q->pend_tail->next = batch;
    else
        q->pend_head = batch;
    q->pend_tail = last;
}

/* Wait, under q->mu, for the inbound list to reach gather_target, as long
 * as it keeps growing: checked every GATHER_GAP_US (submitters wake us
 * only when the target is reached, not for each arrival). A commit costs
 * one or two syncs whatever its size, so a fraction of a millisecond spent
 * here buys a batch twice as large, instead of splitting the callers into
 * groups that each pay for their own syncs. When nothing more comes, the
 * wait ends after one gap: the price at low load. */
static void
gather(struct queue *q)
{
    /* Never longer than a commit takes (within bounds): past that, a
     * second commit would have served the late ones as fast. */
    uint64_t cap = q->last_commit_us < 200    ? 200
                   : q->last_commit_us > 2000 ? 2000
                                              : q->last_commit_us;
    uint64_t end = mono_us() + cap;
    q->gathering = true;
    while (q->in_count < q->gather_target && !q->stopping && mono_us() < end) {
        size_t before = q->in_count;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += GATHER_GAP_US * 1000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        q->idle = true;
        pthread_cond_timedwait(&q->cond, &q->mu, &ts);
        q->idle = false;
        if (q->in_count == before)
            break;
    }
    q->gathering = false;
    q->gather_target = 0;
}

static void *
committer_main(void *arg)
{
    struct queue *q = arg;
    log_set_thread_name("queue");
    pthread_mutex_lock(&q->mu);
    for (;;) {
        if (q->in_head == NULL) {
            if (q->pend_head != NULL) {
                pthread_mutex_unlock(&q->mu);
                flush_pending(q);
                pthread_mutex_lock(&q->mu);
                continue;
            }
            if (q->stopping)
                break; /* everything submitted is committed and sent */
            q->idle = true;
            pthread_cond_wait(&q->cond, &q->mu);
            q->idle = false;
            continue;
        }
        gather(q);
        /* Everything that arrived during the last commit, up to the bounds. */
        struct queue_req *batch = q->in_head, *last = batch;
        size_t n = 1;
        uint64_t bytes = batch->cost;
        while (last->next != NULL && n < q->cfg.max_batch &&
               bytes + last->next->cost <= q->cfg.max_batch_bytes) {
            last = last->next;
            bytes += last->cost;
            n++;
        }
        q->in_head = last->next;
        if (q->in_head == NULL)
            q->in_tail = NULL;
        last->next = NULL;
        q->in_count -= n;
        atomic_store_explicit(&q->st.backlog, q->in_count, memory_order_relaxed);
        pthread_mutex_unlock(&q->mu);

        q->batch_commits = 0;
        run_batch(q, batch);
        if (q->cfg.unsafe_no_sync) {
            events_publish(q, q->ev_next);
            release(q, batch, last);
        } else if (q->batch_commits > 0) {
            /* that commit synced the data after the pending meta page */
            q->pend_unsynced = false;
            flush_pending(q);
            pend_append(q, batch, last);
            q->ev_pend = q->ev_next;
            q->pend_unsynced = true;
        } else {
            /* nothing committed (all refused or failed): wait behind the
             * pending ones so that each port keeps its order */
            pend_append(q, batch, last);
        }

        pthread_mutex_lock(&q->mu);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

/* ---- open and close ---- */

static int open_fail(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int
open_fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (err != NULL && errlen > 0)
        vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return rc;
}

/* Create a fresh spool's databases, or check an existing one's schema.
 * Read-only (txn is then a read transaction): check only; a spool without
 * its meta database is refused, an older schema is read as it is and not
 * marked, a missing events database stays missing. */
static int
open_schema(struct queue *q, MDB_txn *txn, char *err, size_t errlen)
{
    const char *path = q->cfg.path;
    int rc = mdb_dbi_open(txn, "meta", 0, &q->dbi_meta);
    if (rc == MDB_NOTFOUND && q->read_only)
        return open_fail(err, errlen, QUEUE_ECORRUPT, "%s holds no sluice spool", path);
    if (rc == MDB_NOTFOUND) {
        MDB_dbi main_dbi;
        MDB_stat st;
        rc = mdb_dbi_open(txn, NULL, 0, &main_dbi);
        if (rc == 0)
            rc = mdb_stat(txn, main_dbi, &st);
        if (rc != 0)
            return open_fail(err, errlen, lmdb_err(rc), "cannot read spool %s: %s", path,
                             mdb_strerror(rc));
        if (st.ms_entries != 0)
            return open_fail(err, errlen, QUEUE_ECORRUPT,
                             "%s holds an LMDB environment that is not a sluice spool", path);
        uint32_t version = SCHEMA_VERSION;
        uint64_t created = now_ms();
        MDB_val k1 = {6, "schema"}, v1 = {sizeof(version), &version};
        MDB_val k2 = {7, "created"}, v2 = {sizeof(created), &created};
        if ((rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &q->dbi_meta)) != 0 ||
            (rc = mdb_dbi_open(txn, "msg", MDB_CREATE, &q->dbi_msg)) != 0 ||
            (rc = mdb_dbi_open(txn, "body", MDB_CREATE, &q->dbi_body)) != 0 ||
            (rc = mdb_dbi_open(txn, "rcpt", MDB_CREATE, &q->dbi_rcpt)) != 0 ||
            (rc = mdb_dbi_open(txn, "due", MDB_CREATE, &q->dbi_due)) != 0 ||
            (rc = mdb_dbi_open(txn, "events", MDB_CREATE, &q->dbi_events)) != 0 ||
            (rc = mdb_put(txn, q->dbi_meta, &k1, &v1, 0)) != 0 ||
            (rc = mdb_put(txn, q->dbi_meta, &k2, &v2, 0)) != 0)
            return open_fail(err, errlen, lmdb_err(rc), "cannot create spool %s: %s", path,
                             mdb_strerror(rc));
        q->has_events = true;
        return 0;
    }
    if (rc != 0)
        return open_fail(err, errlen, lmdb_err(rc), "cannot read spool %s: %s", path,
                         mdb_strerror(rc));
    MDB_val k = {6, "schema"}, v;
    rc = mdb_get(txn, q->dbi_meta, &k, &v);
    uint32_t version = 0;
    if (rc == 0 && v.mv_size == sizeof(version))
        memcpy(&version, v.mv_data, sizeof(version));
    if (version == 0)
        return open_fail(err, errlen, QUEUE_ECORRUPT, "spool %s has no valid schema record", path);
    if (version > SCHEMA_VERSION)
        return open_fail(err, errlen, QUEUE_ESCHEMA,
                         "spool %s has schema version %u, written by a newer sluice; this one "
                         "reads up to version %u and will not touch it",
                         path, version, SCHEMA_VERSION);
    if (version < SCHEMA_VERSION && !q->read_only) {
        /* Older records read as they are (see the top of the file); the
         * new version keeps an older sluice from misreading new ones. */
        uint32_t now_version = SCHEMA_VERSION;
        MDB_val nv = {sizeof(now_version), &now_version};
        rc = mdb_put(txn, q->dbi_meta, &k, &nv, 0);
        if (rc != 0)
            return open_fail(err, errlen, lmdb_err(rc), "cannot upgrade spool %s: %s", path,
                             mdb_strerror(rc));
        log_msg(LOG_NOTICE, "event=spool_schema_upgraded path=%s from=%u to=%u", path, version,
                SCHEMA_VERSION);
    }
    static const char *const names[] = {"msg", "body", "rcpt", "due"};
    MDB_dbi *dbis[] = {&q->dbi_msg, &q->dbi_body, &q->dbi_rcpt, &q->dbi_due};
    for (size_t i = 0; i < 4; i++) {
        rc = mdb_dbi_open(txn, names[i], 0, dbis[i]);
        if (rc != 0)
            return open_fail(err, errlen, rc == MDB_NOTFOUND ? QUEUE_ECORRUPT : lmdb_err(rc),
                             "spool %s lacks its %s database: %s", path, names[i],
                             mdb_strerror(rc));
    }
    rc = mdb_dbi_open(txn, "events", q->read_only ? 0 : MDB_CREATE, &q->dbi_events);
    if (rc == MDB_NOTFOUND && q->read_only)
        return 0; /* an older sluice's spool: no events to read */
    if (rc != 0)
        return open_fail(err, errlen, lmdb_err(rc), "cannot open the events database of %s: %s",
                         path, mdb_strerror(rc));
    q->has_events = true;
    return 0;
}

/* The meta record key as a native u64 into *out (0 when absent or of
 * another size). Returns 0 or an LMDB error. */
static int
meta_get_u64(struct queue *q, MDB_txn *txn, const char *key, uint64_t *out)
{
    *out = 0;
    MDB_val k = {strlen(key), (void *)key}, v;
    int rc = mdb_get(txn, q->dbi_meta, &k, &v);
    if (rc == 0 && v.mv_size == sizeof(*out))
        memcpy(out, v.mv_data, sizeof(*out));
    return rc == MDB_NOTFOUND ? 0 : rc;
}

/* The next event number: after the last record, or as a trim kept it. */
static int
open_seed_events(struct queue *q, MDB_txn *txn)
{
    uint64_t next;
    int rc = meta_get_u64(q, txn, "ev_next", &next);
    if (rc != 0 || !q->has_events)
        return rc; /* without the database, ev_durable 0: nothing to read */
    MDB_val k, v;
    MDB_cursor *c;
    if ((rc = mdb_cursor_open(txn, q->dbi_events, &c)) != 0)
        return rc;
    rc = mdb_cursor_get(c, &k, &v, MDB_LAST);
    if (rc == 0 && k.mv_size == 8 && key_u64(k.mv_data) + lines_of(v.mv_data, v.mv_size) > next)
        next = key_u64(k.mv_data) + lines_of(v.mv_data, v.mv_size);
    mdb_cursor_close(c);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return rc;
    MDB_stat st;
    if ((rc = mdb_stat(txn, q->dbi_events, &st)) != 0)
        return rc;
    q->ev_next = q->ev_pend = next;
    atomic_store(&q->ev_durable, next);
    atomic_store(&q->st.events_kept, (uint64_t)st.ms_entries);
    return 0;
}

/* The highest id stored or ever stored, so new ids are above it. */
static int
open_seed_ids(struct queue *q, MDB_txn *txn)
{
    uint64_t high;
    int rc = meta_get_u64(q, txn, "last_id", &high);
    if (rc != 0)
        return rc;
    q->stored_id = high;
    MDB_val k, v;
    MDB_cursor *c;
    rc = mdb_cursor_open(txn, q->dbi_msg, &c);
    if (rc != 0)
        return rc;
    rc = mdb_cursor_get(c, &k, &v, MDB_LAST);
    if (rc == 0 && k.mv_size == MSG_KEY_LEN && key_u64(k.mv_data) > high)
        high = key_u64(k.mv_data);
    mdb_cursor_close(c);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return rc;
    q->high_id = high;
    atomic_store(&q->last_id, high);
    return 0;
}

/* Stop the committer once it has committed everything submitted, then
 * the notifier once it has pushed everything committed. */
static void
queue_stop(struct queue *q)
{
    if (q->committer_started) {
        pthread_mutex_lock(&q->mu);
        q->stopping = true;
        pthread_cond_signal(&q->cond);
        pthread_mutex_unlock(&q->mu);
        pthread_join(q->committer, NULL);
        q->committer_started = false;
    }
    if (q->notifier_started) {
        pthread_mutex_lock(&q->nmu);
        q->n_stopping = true;
        pthread_cond_signal(&q->ncond);
        pthread_mutex_unlock(&q->nmu);
        pthread_join(q->notifier, NULL);
        q->notifier_started = false;
    }
}

static void
queue_destroy(struct queue *q)
{
    if (q->env != NULL)
        mdb_env_close(q->env);
    if (q->lock_fd >= 0)
        close(q->lock_fd);
    free(q->vec_upd);
    free(q->vec_enq);
    free(q->ports);
    free(q->cports);
    free(q->touched);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cond);
    pthread_mutex_destroy(&q->nmu);
    pthread_cond_destroy(&q->ncond);
    pthread_mutex_destroy(&q->corrupt.mu);
    pthread_mutex_destroy(&q->ev_mu);
    conf_free(queue_conf_keys, &q->cfg);
    free(q);
}

/* Make q->env and open it at path with flags; on failure the
 * environment is closed (LMDB's rule: it cannot be opened again) and
 * q->env is NULL. Returns 0 or LMDB's code. */
static int
env_open(struct queue *q, const char *path, unsigned flags)
{
    int rc;
    if ((rc = mdb_env_create(&q->env)) != 0) {
        q->env = NULL;
        return rc;
    }
    if ((rc = mdb_env_set_maxdbs(q->env, 8)) != 0 ||
        (rc = mdb_env_set_maxreaders(q->env, MAX_READERS)) != 0 ||
        (rc = mdb_env_set_mapsize(q->env, (size_t)q->cfg.map_size)) != 0 ||
        (rc = mdb_env_open(q->env, path, flags, 0600)) != 0) {
        mdb_env_close(q->env);
        q->env = NULL;
    }
    return rc;
}

/* queue_open and queue_open_readonly. */
static int
open_spool(const struct queue_config *cfg, bool read_only, struct queue **out, char *err,
           size_t errlen)
{
    *out = NULL;
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if (cfg == NULL || cfg->path == NULL || cfg->path[0] == '\0')
        return open_fail(err, errlen, -EINVAL, "queue: path is not set");
    if (cfg->map_size < (1u << 20) || cfg->node_id > 1023 || cfg->max_batch == 0)
        return open_fail(err, errlen, -EINVAL,
                         "queue: map_size, node_id or max_batch out of range for %s", cfg->path);
    struct queue *q = calloc(1, sizeof(*q));
    if (q == NULL)
        return open_fail(err, errlen, -ENOMEM, "queue: out of memory");
    q->lock_fd = -1;
    q->read_only = read_only;
    q->since_free = 2;
    pthread_mutex_init(&q->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&q->cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&q->nmu, NULL);
    pthread_cond_init(&q->ncond, NULL);
    pthread_mutex_init(&q->corrupt.mu, NULL);
    pthread_mutex_init(&q->ev_mu, NULL);
    if (conf_copy(queue_conf_keys, &q->cfg, cfg, sizeof(*cfg)) < 0) {
        memset(&q->cfg, 0, sizeof(q->cfg));
        queue_destroy(q);
        return open_fail(err, errlen, -ENOMEM, "queue: out of memory");
    }
    if (q->cfg.max_batch_bytes == 0)
        q->cfg.max_batch_bytes = UINT64_MAX;
    const char *path = q->cfg.path;
    int rc = read_only ? 0 : fs_mkdir_p(path);
    if (rc < 0) {
        open_fail(err, errlen, rc, "cannot create spool directory %s: %s", path, strerror(-rc));
        queue_destroy(q);
        return rc;
    }
    /* A reader shares the lock with other readers: a sluice (exclusive)
     * stays out while it reads, and it stays out while a sluice runs. A
     * reader makes no file: without sluice.lock (a copy of the data file,
     * a spool of mdb_copy) no sluice has the spool open, since a sluice
     * makes the file before it opens the environment. */
    char lock_path[4200];
    snprintf(lock_path, sizeof(lock_path), "%s/sluice.lock", path);
    q->lock_fd =
        open(lock_path, read_only ? O_RDONLY | O_CLOEXEC : O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (q->lock_fd < 0 && !(read_only && errno == ENOENT)) {
        rc = -errno;
        open_fail(err, errlen, rc, "cannot open spool lock %s: %s", lock_path, strerror(-rc));
        queue_destroy(q);
        return rc;
    }
    if (q->lock_fd >= 0 && flock(q->lock_fd, (read_only ? LOCK_SH : LOCK_EX) | LOCK_NB) < 0) {
        rc = errno == EWOULDBLOCK ? QUEUE_ELOCKED : -errno;
        if (rc == QUEUE_ELOCKED)
            open_fail(err, errlen, rc, "spool %s is in use by another process (lock %s)", path,
                      lock_path);
        else
            open_fail(err, errlen, rc, "cannot lock spool %s (lock %s): %s", path, lock_path,
                      queue_strerror(rc));
        queue_destroy(q);
        return rc;
    }

    /* Not MDB_NORDAHEAD: it only pays when the spool is much larger than
     * memory, and its MADV_RANDOM also stops the kernel mapping a page's
     * cached neighbours on a fault, so that every first touch of a page
     * of the map (tree pages, the overflow page of a message being
     * removed) faults alone; the profile of outcome commits showed it. */
    unsigned flags = MDB_NOTLS | (read_only                ? MDB_RDONLY
                                  : q->cfg.unsafe_no_sync ? MDB_NOSYNC
                                                          : MDB_NOMETASYNC);
    /* A reader joins LMDB's lock file (lock.mdb) where there is one it may
     * write, and reads without one (MDB_NOLOCK) where there is none, so
     * as not to make it, or where it may not write it (a read-only copy):
     * no writer can be at work, as the spool lock says above. */
    char lmdb_lock[4200];
    snprintf(lmdb_lock, sizeof(lmdb_lock), "%s/lock.mdb", path);
    if (read_only && access(lmdb_lock, F_OK) != 0 && errno == ENOENT)
        flags |= MDB_NOLOCK;
    rc = env_open(q, path, flags);
    if (rc != 0 && read_only && !(flags & MDB_NOLOCK) && (rc == EACCES || rc == EROFS)) {
        flags |= MDB_NOLOCK;
        rc = env_open(q, path, flags);
    }
    if (rc != 0) {
        int code = lmdb_err(rc);
        if (rc == MDB_INVALID || rc == MDB_VERSION_MISMATCH)
            open_fail(err, errlen, code, "cannot open spool %s: %s (not a spool of this LMDB)",
                      path, mdb_strerror(rc));
        else
            open_fail(err, errlen, code, "cannot open spool %s (map_size %" PRIu64 "): %s", path,
                      q->cfg.map_size, mdb_strerror(rc));
        queue_destroy(q);
        return code;
    }
    int dead = 0;
    mdb_reader_check(q->env, &dead); /* slots of readers killed with us */

    /* Read-only, a read transaction: its commit keeps the handles of the
     * databases it opened and writes nothing. */
    MDB_txn *txn;
    rc = mdb_txn_begin(q->env, NULL, read_only ? MDB_RDONLY : 0, &txn);
    if (rc != 0) {
        int code = lmdb_err(rc);
        open_fail(err, errlen, code, "cannot open spool %s: %s", path, mdb_strerror(rc));
        queue_destroy(q);
        return code;
    }
    int code = open_schema(q, txn, err, errlen);
    if (code == 0 && ((rc = open_seed_ids(q, txn)) != 0 || (rc = open_seed_events(q, txn)) != 0))
        code = open_fail(err, errlen, lmdb_err(rc), "cannot read spool %s: %s", path,
                         mdb_strerror(rc));
    if (code == 0 && (rc = mdb_txn_commit(txn)) != 0)
        code = open_fail(err, errlen, lmdb_err(rc), "cannot write spool %s: %s", path,
                         mdb_strerror(rc));
    else if (code != 0)
        mdb_txn_abort(txn);
    if (code != 0) {
        queue_destroy(q);
        return code;
    }

    MDB_envinfo info;
    MDB_stat st;
    mdb_env_info(q->env, &info);
    mdb_env_stat(q->env, &st);
    q->psize = st.ms_psize;
    q->map_pages = info.me_mapsize / q->psize;
    q->reserve_pages = q->map_pages / 50;
    if (q->reserve_pages < 32)
        q->reserve_pages = 32;
    if (q->reserve_pages > (32u << 20) / q->psize)
        q->reserve_pages = (32u << 20) / q->psize;
    atomic_store(&q->st.map_size, (uint64_t)info.me_mapsize);
    refresh_map_use(q);
    struct stat fst;
    if (mdb_env_get_fd(q->env, &q->data_fd) == 0 && fstat(q->data_fd, &fst) == 0) {
        q->map_addr = map_find(&fst);
        q->prealloc = !read_only; /* a reader allocates no blocks */
        q->alloc_pages = (size_t)fst.st_size / q->psize;
        disk_reserve(q, 0);
    }
    if (read_only) {
        *out = q;
        return 0;
    }

    q->vec_upd = calloc(q->cfg.max_batch, sizeof(*q->vec_upd));
    q->vec_enq = calloc(q->cfg.max_batch, sizeof(*q->vec_enq));
    q->ports = calloc(q->cfg.max_batch, sizeof(*q->ports));
    q->cports = calloc(q->cfg.max_batch, sizeof(*q->cports));
    if (q->vec_upd == NULL || q->vec_enq == NULL || q->ports == NULL || q->cports == NULL) {
        queue_destroy(q);
        return open_fail(err, errlen, -ENOMEM, "queue: out of memory");
    }

    /* The committer takes no signals: the engine handles them on its own
     * terms (signalfd on a worker), whatever mask this thread has. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&q->notifier, NULL, notifier_main, q);
    if (rc == 0) {
        q->notifier_started = true;
        pthread_setname_np(q->notifier, "sluice-qnotify");
        rc = pthread_create(&q->committer, NULL, committer_main, q);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        queue_stop(q);
        queue_destroy(q);
        return open_fail(err, errlen, -rc, "queue: cannot start the queue threads: %s",
                         strerror(rc));
    }
    pthread_setname_np(q->committer, "sluice-queue");
    q->committer_started = true;
    *out = q;
    return 0;
}

int
queue_open(const struct queue_config *cfg, struct queue **out, char *err, size_t errlen)
{
    return open_spool(cfg, false, out, err, errlen);
}

int
queue_open_readonly(const struct queue_config *cfg, struct queue **out, char *err, size_t errlen)
{
    return open_spool(cfg, true, out, err, errlen);
}

void
queue_close(struct queue *q)
{
    if (q == NULL)
        return;
    queue_stop(q);
    if (q->cfg.unsafe_no_sync && !q->read_only)
        mdb_env_sync(q->env, 1);
    queue_destroy(q);
}

/* ---- reads ---- */

static int
read_begin(struct queue *q, MDB_txn **txn)
{
    return mdb_txn_begin(q->env, NULL, MDB_RDONLY, txn);
}

/*
 * The map keeps every page a reader touched mapped in this process: a
 * worker that starts 10,000 transactions keeps their messages' records
 * (and, through the kernel's fault-around, their cached neighbours) in
 * its RSS for as long as the map lives, though nothing reads them again
 * until a body is sent. queue_map_trim() unmaps the map's used range at
 * once: the map is shared and read-only, so the data stays in the page
 * cache (nothing is lost or written) and a later read costs a minor
 * fault. Once a second, not per record: unmapping each record after its
 * read cost 130 us of CPU per relayed message on the 2-core VM (the
 * madvise, its TLB shootdown and the refaults, at every envelope and
 * body read).
 */
/* Where LMDB mapped the data file (it says only for MDB_FIXEDMAP): the
 * mapping of st's file at offset 0 in /proc/self/maps. NULL: not found
 * (queue_map_trim then does nothing). At open, once. */
static void *
map_find(const struct stat *st)
{
    FILE *f = fopen("/proc/self/maps", "re");
    if (f == NULL)
        return NULL;
    char line[4096 + 128];
    void *found = NULL;
    while (found == NULL && fgets(line, sizeof(line), f) != NULL) {
        unsigned long lo, hi, off, ino;
        unsigned maj, min;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s %lx %x:%x %lu", &lo, &hi, perms, &off, &maj, &min, &ino) ==
                7 &&
            ino == (unsigned long)st->st_ino && makedev(maj, min) == st->st_dev && off == 0)
            found = (void *)(uintptr_t)lo;
    }
    fclose(f);
    return found;
}

void
queue_map_trim(struct queue *q)
{
    uint64_t used = atomic_load_explicit(&q->st.map_used, memory_order_relaxed);
    if (q->map_addr == NULL || used == 0)
        return;
    madvise(q->map_addr, (size_t)used, MADV_DONTNEED);
}

/* Copy n bytes as a NUL-terminated string at *dst; returns it. */
static char *
copy_str(char **dst, const void *src, size_t n)
{
    char *s = *dst;
    if (n > 0)
        memcpy(s, src, n);
    s[n] = '\0';
    *dst += n + 1;
    return s;
}

/* Fill r from a decoded rcpt record; strings go to *strs (room checked by
 * the caller: the record's size plus 4 NULs). */
static void
rcpt_fill(struct queue_rcpt *r, const struct rcpt_head *h, const MDB_val *v, unsigned index,
          char **strs)
{
    const unsigned char *p = (const unsigned char *)v->mv_data + sizeof(*h);
    r->addr = copy_str(strs, p, h->addr_len);
    p += h->addr_len;
    r->domain = copy_str(strs, p, h->domain_len);
    p += h->domain_len;
    r->orcpt = h->orcpt_len ? copy_str(strs, p, h->orcpt_len) : NULL;
    p += h->orcpt_len;
    r->last_reply = copy_str(strs, p, h->reply_len);
    r->notify = h->notify;
    r->index = index;
    r->state = (enum queue_rcpt_state)h->state;
    r->attempts = h->attempts;
    r->due_ms = h->state == QUEUE_RCPT_DEFERRED ? h->due_ms : 0;
    r->last_ms = h->last_ms;
    r->last_code = h->code;
    r->owner = (struct queue_owner){"", "", "", 0, false};
}

int
queue_envelope_get(struct queue *q, uint64_t id, struct queue_envelope **out)
{
    *out = NULL;
    MDB_txn *txn;
    int rc = read_begin(q, &txn);
    if (rc != 0)
        return lmdb_err(rc);
    unsigned char key[RCPT_KEY_LEN];
    msg_key(key, id);
    MDB_val k = {MSG_KEY_LEN, key}, mv, rv;
    MDB_cursor *c = NULL;
    struct msg_head h;
    rc = mdb_get(txn, q->dbi_msg, &k, &mv);
    if (rc == 0 && !msg_decode(&mv, &h))
        rc = MDB_CORRUPTED;
    if (rc == 0)
        rc = mdb_cursor_open(txn, q->dbi_rcpt, &c);
    /* Pass 1 sizes the allocation, pass 2 fills it. */
    size_t n = 0, bytes = rc == 0 ? msg_head_len(&h) - sizeof(h) + 7 : 0;
    for (int pass = 0; rc == 0 && pass < 2; pass++) {
        struct queue_envelope *e = *out;
        char *strs = NULL;
        if (pass == 1) {
            e = calloc(1, sizeof(*e) + n * sizeof(struct queue_rcpt) + bytes);
            if (e == NULL) {
                rc = ENOMEM;
                break;
            }
            *out = e;
            e->rcpt = (struct queue_rcpt *)(e + 1);
            strs = (char *)(e->rcpt + n);
            const char *p = (const char *)mv.mv_data + sizeof(h);
            e->id = id;
            e->sender = copy_str(&strs, p, h.sender_len);
            p += h.sender_len;
            e->envid = h.envid_len ? copy_str(&strs, p, h.envid_len) : NULL;
            p += h.envid_len;
            e->auth_user = h.auth_len ? copy_str(&strs, p, h.auth_len) : NULL;
            p += h.auth_len;
            e->client_addr = h.client_len ? copy_str(&strs, p, h.client_len) : NULL;
            p += h.client_len;
            e->tenant = h.tenant_len ? copy_str(&strs, p, h.tenant_len) : NULL;
            p += h.tenant_len;
            e->campaign = h.campaign_len ? copy_str(&strs, p, h.campaign_len) : NULL;
            p += h.campaign_len;
            e->pool = h.pool_len ? copy_str(&strs, p, h.pool_len) : NULL;
            e->priority = h.priority;
            e->ret = (enum queue_ret)h.ret;
            e->body_type = h.flags & MSG_F_BINARYMIME ? QUEUE_BODY_BINARYMIME
                           : h.flags & MSG_F_8BITMIME ? QUEUE_BODY_8BITMIME
                                                      : QUEUE_BODY_7BIT;
            e->smtputf8 = (h.flags & MSG_F_SMTPUTF8) != 0;
            e->tls_relaxed = (h.flags & MSG_F_TLS_RELAXED) != 0;
            e->arrival_ms = h.arrival_ms;
            e->expire_ms = h.expire_ms;
            e->body_len = h.body_len;
            e->nrcpt = (unsigned)n;
        }
        rcpt_key(key, id, 0);
        MDB_val rk = {RCPT_KEY_LEN, key};
        size_t i = 0;
        for (rc = mdb_cursor_get(c, &rk, &rv, MDB_SET_RANGE);
             rc == 0 && rk.mv_size == RCPT_KEY_LEN && key_u64(rk.mv_data) == id;
             rc = mdb_cursor_get(c, &rk, &rv, MDB_NEXT)) {
            struct rcpt_head rh;
            if (!rcpt_decode(&rv, &rh) || rv.mv_size > RCPT_REC_MAX) {
                /* the other recipients of the message still go */
                corrupt_note(q, "rcpt", rk.mv_data, rk.mv_size);
                continue;
            }
            if (pass == 0) {
                n++;
                bytes += rv.mv_size - sizeof(rh) + 4;
            } else if (i < n) {
                rcpt_fill(&e->rcpt[i++], &rh, &rv, key_u16((const unsigned char *)rk.mv_data + 8),
                          &strs);
            }
        }
        if (rc == MDB_NOTFOUND || rc == 0)
            rc = 0;
    }
    if (c != NULL)
        mdb_cursor_close(c);
    mdb_txn_abort(txn);
    if (rc != 0) {
        *out = queue_envelope_free(*out);
        return lmdb_err(rc);
    }
    return 0;
}

struct queue_envelope *
queue_envelope_free(struct queue_envelope *env)
{
    free(env);
    return NULL;
}

int
queue_body_read(struct queue *q, uint64_t id, uint64_t off, void *buf, size_t cap, size_t *len)
{
    *len = 0;
    MDB_txn *txn;
    int rc = read_begin(q, &txn);
    if (rc != 0)
        return lmdb_err(rc);
    unsigned char key[BODY_KEY_LEN];
    msg_key(key, id);
    MDB_val k = {MSG_KEY_LEN, key}, v;
    struct msg_head h;
    rc = mdb_get(txn, q->dbi_msg, &k, &v);
    if (rc == 0 && !msg_decode(&v, &h))
        rc = MDB_CORRUPTED;
    if (rc == 0 && off < h.body_len) {
        uint64_t want = h.body_len - off < cap ? h.body_len - off : cap;
        unsigned char *dst = buf;
        if (h.body_chunks == 0) {
            memcpy(dst, (const unsigned char *)v.mv_data + msg_head_len(&h) + off, (size_t)want);
            *len = (size_t)want;
        } else {
            while (want > 0) {
                uint32_t chunk = (uint32_t)(off / BODY_CHUNK);
                size_t in = (size_t)(off % BODY_CHUNK);
                body_key(key, id, chunk);
                MDB_val ck = {BODY_KEY_LEN, key}, cv;
                rc = mdb_get(txn, q->dbi_body, &ck, &cv);
                if (rc == MDB_NOTFOUND || (rc == 0 && cv.mv_size <= in))
                    rc = MDB_CORRUPTED;
                if (rc != 0)
                    break;
                size_t take = cv.mv_size - in < want ? cv.mv_size - in : (size_t)want;
                memcpy(dst + *len, (const unsigned char *)cv.mv_data + in, take);
                *len += take;
                off += take;
                want -= take;
            }
        }
    }
    mdb_txn_abort(txn);
    if (rc != 0)
        *len = 0;
    return lmdb_err(rc);
}

/* A cursor over one database that renews its read transaction every
 * SCAN_CHUNK records, restarting after the last key it returned. */
struct scan {
    struct queue *q;
    MDB_dbi dbi;
    MDB_txn *txn;
    MDB_cursor *cur;
    unsigned char last[DUE_KEY_LEN];
    size_t last_len;
    unsigned in_txn;
    bool started;
};

static void
scan_end(struct scan *s)
{
    if (s->cur != NULL)
        mdb_cursor_close(s->cur);
    if (s->txn != NULL)
        mdb_txn_abort(s->txn);
    s->cur = NULL;
    s->txn = NULL;
}

/* Next record at or after start (first call) or after the last one.
 * Returns 0, MDB_NOTFOUND at the end, or an LMDB code. */
static int
scan_next(struct scan *s, MDB_val *k, MDB_val *v)
{
    int rc;
    if (s->txn != NULL && s->in_txn < SCAN_CHUNK) {
        rc = mdb_cursor_get(s->cur, k, v, MDB_NEXT);
    } else {
        scan_end(s);
        if ((rc = read_begin(s->q, &s->txn)) != 0 ||
            (rc = mdb_cursor_open(s->txn, s->dbi, &s->cur)) != 0) {
            scan_end(s);
            return rc;
        }
        s->in_txn = 0;
        if (s->last_len == 0) {
            rc = mdb_cursor_get(s->cur, k, v, MDB_FIRST);
        } else {
            k->mv_size = s->last_len;
            k->mv_data = s->last;
            rc = mdb_cursor_get(s->cur, k, v, MDB_SET_RANGE);
            /* the saved key was already returned unless this is the first call */
            if (rc == 0 && s->started && k->mv_size == s->last_len &&
                memcmp(k->mv_data, s->last, s->last_len) == 0)
                rc = mdb_cursor_get(s->cur, k, v, MDB_NEXT);
        }
    }
    s->started = true;
    if (rc == 0) {
        s->in_txn++;
        s->last_len = k->mv_size <= sizeof(s->last) ? k->mv_size : sizeof(s->last);
        memcpy(s->last, k->mv_data, s->last_len);
    }
    return rc;
}

int
queue_walk(struct queue *q, queue_rcpt_fn *cb, void *arg)
{
    struct scan s = {.q = q, .dbi = q->dbi_rcpt};
    MDB_val k, v;
    int rc, ret = 0;
    char strs[RCPT_REC_MAX + 8];
    struct owner_buf *ob = calloc(1, sizeof(*ob));
    if (ob == NULL)
        return -ENOMEM;
    while ((rc = scan_next(&s, &k, &v)) == 0) {
        struct rcpt_head h;
        if (k.mv_size != RCPT_KEY_LEN || !rcpt_decode(&v, &h) || v.mv_size > RCPT_REC_MAX) {
            corrupt_note(q, "rcpt", k.mv_data, k.mv_size);
            continue;
        }
        struct queue_rcpt r;
        char *p = strs;
        rcpt_fill(&r, &h, &v, key_u16((const unsigned char *)k.mv_data + 8), &p);
        uint64_t id = key_u64(k.mv_data);
        owner_read(q, s.txn, id, ob);
        r.owner = (struct queue_owner){ob->tenant, ob->campaign, ob->pool, ob->priority,
                                       ob->tls_relaxed};
        ret = cb(arg, id, &r);
        if (ret != 0)
            break;
    }
    free(ob);
    scan_end(&s);
    if (ret != 0)
        return ret;
    return rc == MDB_NOTFOUND ? 0 : lmdb_err(rc);
}

int
queue_due(struct queue *q, struct queue_due_pos *pos, uint64_t now_ms_, unsigned limit,
          queue_rcpt_fn *cb, void *arg)
{
    struct scan s = {.q = q, .dbi = q->dbi_due};
    if (pos->due_ms != 0 || pos->id != 0 || pos->rcpt != 0) {
        due_key(s.last, pos->due_ms, pos->id, pos->rcpt);
        s.last_len = DUE_KEY_LEN;
        s.started = true; /* *pos itself was returned before */
    }
    MDB_val k, v;
    int rc, ret = 0, n = 0;
    char strs[RCPT_REC_MAX + 8];
    while ((limit == 0 || (unsigned)n < limit) && (rc = scan_next(&s, &k, &v)) == 0) {
        if (k.mv_size != DUE_KEY_LEN) {
            corrupt_note(q, "due", k.mv_data, k.mv_size);
            continue;
        }
        const unsigned char *kp = k.mv_data;
        uint64_t due = key_u64(kp), id = key_u64(kp + 8);
        unsigned idx = key_u16(kp + 16);
        if (due > now_ms_) {
            rc = MDB_NOTFOUND;
            break;
        }
        MDB_val rk = {RCPT_KEY_LEN, (void *)(kp + 8)}, rv;
        struct rcpt_head h;
        rc = mdb_get(s.txn, q->dbi_rcpt, &rk, &rv);
        if (rc == MDB_NOTFOUND) {
            corrupt_note(q, "due", kp, DUE_KEY_LEN);
            continue;
        }
        if (rc != 0)
            break;
        if (!rcpt_decode(&rv, &h) || rv.mv_size > RCPT_REC_MAX) {
            corrupt_note(q, "rcpt", kp + 8, RCPT_KEY_LEN);
            continue;
        }
        struct queue_rcpt r;
        char *p = strs;
        rcpt_fill(&r, &h, &rv, idx, &p);
        pos->due_ms = due;
        pos->id = id;
        pos->rcpt = idx;
        n++;
        ret = cb(arg, id, &r);
        if (ret != 0)
            break;
    }
    if (limit != 0 && (unsigned)n >= limit)
        rc = MDB_NOTFOUND;
    scan_end(&s);
    if (ret != 0)
        return ret < 0 ? ret : n;
    return rc == MDB_NOTFOUND ? n : lmdb_err(rc);
}

/* Per-domain tallies for queue_counts: open addressing on the name. */
struct domain_slot {
    char *name; /* owned */
    struct queue_counts c;
};

struct domain_map {
    struct domain_slot *slots; /* owned */
    size_t cap, n;
};

static uint64_t
name_hash(const void *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ ((const unsigned char *)p)[i]) * 1099511628211ULL;
    return h;
}

static struct domain_slot *
domain_find(struct domain_map *m, const char *name, size_t len)
{
    if (m->n * 2 >= m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 64;
        struct domain_slot *s = calloc(cap, sizeof(*s));
        if (s == NULL)
            return NULL;
        for (size_t i = 0; i < m->cap; i++) {
            if (m->slots[i].name == NULL)
                continue;
            size_t j = name_hash(m->slots[i].name, strlen(m->slots[i].name)) & (cap - 1);
            while (s[j].name != NULL)
                j = (j + 1) & (cap - 1);
            s[j] = m->slots[i];
        }
        free(m->slots);
        m->slots = s;
        m->cap = cap;
    }
    size_t j = name_hash(name, len) & (m->cap - 1);
    while (m->slots[j].name != NULL) {
        if (strlen(m->slots[j].name) == len && memcmp(m->slots[j].name, name, len) == 0)
            return &m->slots[j];
        j = (j + 1) & (m->cap - 1);
    }
    char *copy = malloc(len + 1);
    if (copy == NULL)
        return NULL;
    memcpy(copy, name, len);
    copy[len] = '\0';
    m->slots[j].name = copy;
    m->n++;
    return &m->slots[j];
}

static int
cmp_slot(const void *a, const void *b)
{
    const struct domain_slot *x = a, *y = b;
    if (x->name == NULL || y->name == NULL)
        return (x->name == NULL) - (y->name == NULL);
    return strcmp(x->name, y->name);
}

int
queue_counts(struct queue *q, struct queue_counts *total, queue_domain_fn *cb, void *arg)
{
    MDB_txn *txn;
    int rc = read_begin(q, &txn);
    if (rc != 0)
        return lmdb_err(rc);
    MDB_stat sm, sr, sd;
    if ((rc = mdb_stat(txn, q->dbi_msg, &sm)) == 0 && (rc = mdb_stat(txn, q->dbi_rcpt, &sr)) == 0)
        rc = mdb_stat(txn, q->dbi_due, &sd);
    mdb_txn_abort(txn);
    if (rc != 0)
        return lmdb_err(rc);
    total->messages = sm.ms_entries;
    total->deferred = sd.ms_entries;
    total->ready = sr.ms_entries > sd.ms_entries ? sr.ms_entries - sd.ms_entries : 0;
    if (cb == NULL)
        return 0;

    struct domain_map m = {0};
    struct scan s = {.q = q, .dbi = q->dbi_rcpt};
    MDB_val k, v;
    while ((rc = scan_next(&s, &k, &v)) == 0) {
        struct rcpt_head h;
        if (!rcpt_decode(&v, &h)) {
            corrupt_note(q, "rcpt", k.mv_data, k.mv_size);
            continue;
        }
        const char *dom = (const char *)v.mv_data + sizeof(h) + h.addr_len;
        struct domain_slot *slot = domain_find(&m, dom, h.domain_len);
        if (slot == NULL) {
            rc = ENOMEM;
            break;
        }
        if (h.state == QUEUE_RCPT_DEFERRED) {
            slot->c.deferred++;
            slot->c.deferred_by_tag[h.tag < QUEUE_TAGS ? h.tag : 0]++;
        } else {
            slot->c.ready++;
        }
        uint64_t at = k.mv_size >= 8 ? queue_id_time_ms(key_u64(k.mv_data)) : 0;
        if (at != 0 && (slot->c.oldest_ms == 0 || at < slot->c.oldest_ms))
            slot->c.oldest_ms = at;
    }
    scan_end(&s);
    int ret = rc == MDB_NOTFOUND ? 0 : lmdb_err(rc);
    if (ret == 0 && m.cap > 0) {
        qsort(m.slots, m.cap, sizeof(*m.slots), cmp_slot);
        for (size_t i = 0; i < m.n && ret == 0; i++)
            ret = cb(arg, m.slots[i].name, &m.slots[i].c);
    }
    for (size_t i = 0; i < m.cap; i++)
        free(m.slots[i].name);
    free(m.slots);
    return ret;
}

static bool
key_exists(MDB_txn *txn, MDB_dbi dbi, void *key, size_t len, MDB_val *v)
{
    MDB_val k = {len, key}, tmp;
    return mdb_get(txn, dbi, &k, v ? v : &tmp) == 0;
}

/* Count a problem of queue_check() and list the first ones. */
static void
check_note(struct queue_check_report *rep, uint64_t *counter, const char *db, const char *what,
           const MDB_val *k)
{
    (*counter)++;
    if (rep->nlisted >= QUEUE_CHECK_LIST)
        return;
    struct queue_check_problem *p = &rep->listed[rep->nlisted++];
    snprintf(p->db, sizeof(p->db), "%s", db);
    snprintf(p->what, sizeof(p->what), "%s", what);
    size_t n = k->mv_size < DUE_KEY_LEN ? k->mv_size : DUE_KEY_LEN;
    for (size_t i = 0; i < n; i++)
        snprintf(p->key + 2 * i, 3, "%02x", ((const unsigned char *)k->mv_data)[i]);
    p->key[2 * n] = '\0';
    size_t off = strcmp(db, "due") == 0 ? 8 : 0;
    p->id = k->mv_size >= off + 8 ? key_u64((const unsigned char *)k->mv_data + off) : 0;
}

int
queue_check(struct queue *q, struct queue_check_report *rep)
{
    memset(rep, 0, sizeof(*rep));
    MDB_txn *txn;
    int rc = read_begin(q, &txn);
    if (rc != 0)
        return lmdb_err(rc);
    MDB_cursor *c = NULL;
    MDB_val k, v;
    unsigned char key[DUE_KEY_LEN];

    /* messages: decode, at least one recipient, chunks complete */
    if ((rc = mdb_cursor_open(txn, q->dbi_msg, &c)) != 0)
        goto out;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        rep->messages++;
        struct msg_head h;
        if (k.mv_size != MSG_KEY_LEN || !msg_decode(&v, &h)) {
            check_note(rep, &rep->bad_records, "msg", "bad_record", &k);
            continue;
        }
        uint64_t id = key_u64(k.mv_data);
        MDB_cursor *rc2;
        if (mdb_cursor_open(txn, q->dbi_rcpt, &rc2) == 0) {
            rcpt_key(key, id, 0);
            MDB_val rk = {RCPT_KEY_LEN, key}, rv;
            if (mdb_cursor_get(rc2, &rk, &rv, MDB_SET_RANGE) != 0 || key_u64(rk.mv_data) != id)
                check_note(rep, &rep->empty_messages, "msg", "empty_message", &k);
            mdb_cursor_close(rc2);
        }
        uint64_t got = 0;
        for (uint32_t ch = 0; ch < h.body_chunks; ch++) {
            body_key(key, id, ch);
            MDB_val cv;
            if (key_exists(txn, q->dbi_body, key, BODY_KEY_LEN, &cv))
                got += cv.mv_size;
        }
        if (h.body_chunks > 0 && got != h.body_len)
            check_note(rep, &rep->bad_bodies, "msg", "bad_body", &k);
    }
    mdb_cursor_close(c);
    c = NULL;
    if (rc != MDB_NOTFOUND)
        goto out;

    /* chunks: each belongs to a chunked message, within its count */
    if ((rc = mdb_cursor_open(txn, q->dbi_body, &c)) != 0)
        goto out;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        rep->body_chunks++;
        MDB_val mv;
        struct msg_head h;
        uint32_t ch;
        memcpy(&ch, (const unsigned char *)k.mv_data + 8, 4);
        ch = be32toh(ch);
        if (k.mv_size != BODY_KEY_LEN ||
            !key_exists(txn, q->dbi_msg, k.mv_data, MSG_KEY_LEN, &mv) || !msg_decode(&mv, &h) ||
            ch >= h.body_chunks)
            check_note(rep, &rep->bad_bodies, "body", "bad_body", &k);
    }
    mdb_cursor_close(c);
    c = NULL;
    if (rc != MDB_NOTFOUND)
        goto out;

    /* recipients: decode, message present, deferred ones indexed */
    if ((rc = mdb_cursor_open(txn, q->dbi_rcpt, &c)) != 0)
        goto out;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        rep->recipients++;
        struct rcpt_head h;
        if (k.mv_size != RCPT_KEY_LEN || !rcpt_decode(&v, &h)) {
            check_note(rep, &rep->bad_records, "rcpt", "bad_record", &k);
            continue;
        }
        if (!key_exists(txn, q->dbi_msg, k.mv_data, MSG_KEY_LEN, NULL))
            check_note(rep, &rep->orphan_rcpts, "rcpt", "orphan_rcpt", &k);
        if (h.state == QUEUE_RCPT_DEFERRED) {
            msg_key(key, h.due_ms);
            memcpy(key + 8, k.mv_data, RCPT_KEY_LEN);
            if (!key_exists(txn, q->dbi_due, key, DUE_KEY_LEN, NULL))
                check_note(rep, &rep->bad_due, "rcpt", "bad_due", &k);
        }
    }
    mdb_cursor_close(c);
    c = NULL;
    if (rc != MDB_NOTFOUND)
        goto out;

    /* index: every entry names a deferred recipient due then */
    if ((rc = mdb_cursor_open(txn, q->dbi_due, &c)) != 0)
        goto out;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        rep->deferred++;
        MDB_val rv;
        struct rcpt_head h;
        if (k.mv_size != DUE_KEY_LEN ||
            !key_exists(txn, q->dbi_rcpt, (unsigned char *)k.mv_data + 8, RCPT_KEY_LEN, &rv) ||
            !rcpt_decode(&rv, &h) || h.state != QUEUE_RCPT_DEFERRED ||
            h.due_ms != key_u64(k.mv_data))
            check_note(rep, &rep->bad_due, "due", "bad_due", &k);
    }
    mdb_cursor_close(c);
    c = NULL;
    if (rc == MDB_NOTFOUND)
        rc = 0;
out:
    if (c != NULL)
        mdb_cursor_close(c);
    mdb_txn_abort(txn);
    if (rc != 0)
        return lmdb_err(rc);
    if (rep->bad_records || rep->orphan_rcpts || rep->empty_messages || rep->bad_bodies ||
        rep->bad_due)
        return QUEUE_ECORRUPT;
    return 0;
}

void
queue_stats(struct queue *q, struct queue_stats *out)
{
#define LOAD(f) out->f = atomic_load_explicit(&q->st.f, memory_order_relaxed)
    LOAD(commits);
    LOAD(commit_failures);
    LOAD(enqueued);
    LOAD(enqueued_rcpts);
    LOAD(enqueued_bytes);
    LOAD(enqueue_refused);
    LOAD(outcomes);
    LOAD(outcomes_stale);
    LOAD(removed);
    LOAD(taken);
    LOAD(corrupt);
    LOAD(batch_max);
    LOAD(commit_us_total);
    LOAD(commit_us_max);
    LOAD(backlog);
    LOAD(map_size);
    LOAD(map_used);
    LOAD(event_lines);
    LOAD(events_kept);
#undef LOAD
}
