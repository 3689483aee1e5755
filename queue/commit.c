/*
 * commit: the committer thread and the notifier thread (queue_int.h
 * lists the other files of the spool). The committer takes the requests
 * submitted (queue.c) in batches (gather), admits enqueues against the
 * room left in the map and on disk (admit, admit_msgs and the blocks of
 * queue_disk_reserve), applies a batch in one write transaction
 * (commit_set; what it writes is apply.c's), and sends the completions on
 * once their commit is durable (flush_pending); it sweeps the finished
 * messages' records in commits of their own (before a batch or when
 * idle once due, short of room, closing: gone_due, gone_wait,
 * gone_sweep); the notifier pushes the completions to their ports
 * (deliver).
 *
 * Threading: all of it runs on the committer thread, except
 * queue_notifier_main() on the notifier thread and what it calls
 * (deliver, port_push), which the committer also calls for half of a
 * batch when both are idle (notify). queue_disk_reserve() and
 * queue_refresh_map_use() also run at open, before either thread starts
 * (open.c).
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
 * is durable: completions wait in q->pend for that next sync (should it
 * fail, in a commit or alone, they fail: Linux reports a failed
 * write-back once, so no later sync can confirm them; the enqueues among
 * them are then removed, durably, before they fail: drop_unconfirmed).
 * Under load every commit thus costs one sync and carries the previous
 * one's durability; when idle, a commit costs two, as by default. With
 * unsafe_no_sync the commits are not synced at all (MDB_NOSYNC) and
 * completions leave at once; the file is synced once at close.
 *
 * A full map. LMDB needs free pages even to delete (copy-on-write), so a
 * spool filled to the last page could never be emptied. The committer
 * therefore admits an enqueue only if the pages it needs leave a reserve
 * (2% of the map, 32 pages at least, 32 MB at most) for outcome updates.
 * If a commit still fails for space, the enqueues of that batch get the
 * error and its updates are committed alone (split in halves on failure).
 * Deliveries free their messages' pages only when the finished messages
 * are swept (queue_int.h, "gone"): an enqueue refused for room sweeps
 * them at once and is admitted again, and a sweep too large for the
 * reserve takes half of them, down to one (gone_sweep); sweeps are
 * commits of their own, so a failing one never holds up the outcomes.
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
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/hash.h"
#include "common/log.h"
#include "queue/queue_int.h"

#define GATHER_GAP_US   100
/* How soon the committer tries again to remove the enqueues it failed
 * after a failed sync (drop_unconfirmed) while that keeps failing: soon,
 * since new mail is refused meanwhile, and then less often, since each
 * try is a commit and a sync on a disk that is failing. */
#define DROP_RETRY_MIN_US 100000
#define DROP_RETRY_MAX_US 5000000

/* ---- the committer ---- */

static bool
lmdb_space_err(int rc)
{
    return rc == MDB_MAP_FULL || rc == ENOSPC || rc == EDQUOT || rc == EFBIG;
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
void
queue_disk_reserve(struct queue *q, size_t need)
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

void
queue_refresh_map_use(struct queue *q)
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
        int rc = apply_outcome_stale(q, txn, it, &v, &h, &stale);
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
    uint64_t t0 = clock_mono_us();
    MDB_txn *txn;
    int rc = mdb_txn_begin(q->env, NULL, 0, &txn);
    if (rc != 0)
        return rc;
    struct tally t = {0};
    uint64_t now = clock_unix_ms();
    q->touched_n = 0;
    size_t gone_mark = q->gone_n;
    for (size_t i = 0; i < nu && rc == 0; i++) {
        struct queue_req *r = upd[i];
        if (r->kind == REQ_TAKE) {
            rc = apply_take(q, txn, r, &t);
            continue;
        }
        if (r->kind == REQ_EVENTS || r->kind == REQ_TRIM || r->kind == REQ_NOTES_TRIM)
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
        rc = apply_remove_finished(q, txn, &t);
    /* The messages it finished: their ids one record at the end of
     * "gone", their records and bodies left for the sweep (gone_sweep). */
    if (rc == 0)
        rc = apply_gone_log(q, txn, gone_mark);
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
    /* The notes, numbered in commit order as the lines are (queue.h). */
    uint64_t note_seq = q->note_next;
    unsigned notes = 0, notes_trimmed = 0;
    bool note_trims = false;
    for (size_t i = 0; i < nu && rc == 0; i++) {
        struct queue_req *r = upd[i];
        if (r->kind == REQ_EVENTS || (r->kind == REQ_UPDATE && r->applied))
            rc = apply_notes(q, txn, r, &note_seq, &notes);
        else if (r->kind == REQ_NOTES_TRIM &&
                 (rc = apply_notes_trim(q, txn, r, &notes_trimmed)) == 0)
            note_trims = true;
    }
    if (rc == 0 && ne == 0 && t.outcomes == 0 && t.stale == 0 && t.taken == 0 && t.fixed == 0 &&
        t.enq == 0) {
        /* Only takes, and nothing was due: no commit, no sync (the due
         * poll asks every second, also when there is nothing to do). */
        bool takes_only = t.ev_records == 0;
        for (size_t i = 0; i < nu; i++)
            takes_only &= upd[i]->kind == REQ_TAKE;
        if (takes_only) {
            mdb_txn_abort(txn);
            q->gone_n = gone_mark;
            return 0;
        }
    }
    uint64_t high = t.max_id > q->high_id ? t.max_id : q->high_id;
    bool clean = t.enq == 0 && t.outcomes == 0 && t.removed == 0 && t.taken == 0 &&
                 t.ev_records == 0 && !trims && notes == 0 && !note_trims;
    bool store = clean || (t.removed > 0 && high > q->stored_id);
    if (rc == 0 && store) {
        /* The highest id must outlive the messages that carried it
         * (opening takes the larger of it and the last live id; the
         * messages these outcomes finish go later, by sweep_commit,
         * which stores it then). And a commit with no dirty page skips
         * its data sync, on which flush_pending counts: give it one. */
        MDB_val k = {7, "last_id"}, v = {sizeof(high), &high};
        rc = mdb_put(txn, q->dbi_meta, &k, &v, 0);
    }
    if (rc != 0) {
        mdb_txn_abort(txn);
        q->gone_n = gone_mark;
        counter_add(&q->st.commit_failures, 1);
        return rc;
    }
    rc = mdb_txn_commit(txn);
    if (rc != 0) {
        q->gone_n = gone_mark;
        counter_add(&q->st.commit_failures, 1);
        if (rc > 0)
            q->io_err = rc; /* see queue_committer_main */
        return rc;
    }
    if (q->gone_n > gone_mark) {
        q->gone_seq++;
        if (gone_mark == 0)
            q->gone_since_us = clock_mono_us();
    }
    q->batch_commits++;
    q->high_id = high;
    q->ev_next = seq;
    q->note_next = note_seq;
    counter_add(&q->st.notes_kept, notes);
    if (notes_trimmed > 0)
        atomic_fetch_sub(&q->st.notes_kept, notes_trimmed);
    if (notes > 0) {
        pthread_mutex_lock(&q->ev_mu);
        if (q->note_hook != NULL)
            q->note_hook(q->note_hook_arg);
        pthread_mutex_unlock(&q->ev_mu);
    }
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
    uint64_t us = clock_mono_us() - t0;
    q->last_commit_us = us;
    counter_add(&q->st.commits, 1);
    counter_add(&q->st.enqueued, t.enq);
    counter_add(&q->st.enqueued_rcpts, t.enq_rcpts);
    counter_add(&q->st.enqueued_bytes, t.enq_bytes);
    counter_add(&q->st.outcomes, t.outcomes);
    counter_add(&q->st.outcomes_stale, t.stale);
    counter_add(&q->st.removed, t.finished); /* finished: swept later (gone_sweep) */
    counter_add(&q->st.taken, t.taken);
    counter_add(&q->st.commit_us_total, us);
    counter_max(&q->st.commit_us_max, us);
    counter_max(&q->st.batch_max, nu + ne);
    queue_refresh_map_use(q);
    queue_disk_reserve(q, 0);
    return 0;
}

/* The sweep of ids[0..n) of the sorted q->gone in a commit of its own
 * ("gone" emptied when that is all of them). Returns 0 or an LMDB code. */
static int
sweep_commit(struct queue *q, size_t n)
{
    uint64_t t0 = clock_mono_us();
    MDB_txn *txn;
    int rc = mdb_txn_begin(q->env, NULL, 0, &txn);
    if (rc != 0)
        return rc;
    struct tally t = {0};
    rc = apply_sweep(q, txn, q->gone, n, n == q->gone_n, &t);
    /* the highest id outlives the messages that carried it */
    bool store = rc == 0 && t.removed > 0 && q->high_id > q->stored_id;
    if (store) {
        MDB_val k = {7, "last_id"}, v = {sizeof(q->high_id), &q->high_id};
        rc = mdb_put(txn, q->dbi_meta, &k, &v, 0);
    }
    if (rc != 0) {
        mdb_txn_abort(txn);
        counter_add(&q->st.commit_failures, 1);
        return rc;
    }
    if ((rc = mdb_txn_commit(txn)) != 0) {
        counter_add(&q->st.commit_failures, 1);
        if (rc > 0)
            q->io_err = rc; /* see queue_committer_main: it may have been the pending's sync */
        return rc;
    }
    q->batch_commits++;
    if (store)
        q->stored_id = q->high_id;
    if (t.removed > 0)
        q->since_free = 0;
    counter_add(&q->st.commits, 1);
    counter_add(&q->st.swept, t.removed);
    uint64_t us = clock_mono_us() - t0;
    counter_add(&q->st.commit_us_total, us);
    counter_max(&q->st.commit_us_max, us);
    queue_refresh_map_use(q);
    return 0;
}

/* Whether the finished messages are due for their sweep: GONE_SWEEP_N
 * wait or the first has waited sweep_ms, and no failed sweep asks for
 * a wait. *at: when they will be, when not. */
static bool
gone_due(const struct queue *q, uint64_t now, uint64_t *at)
{
    uint64_t due = q->gone_n >= GONE_SWEEP_N ? 0 : q->gone_since_us + q->cfg.sweep_ms * 1000ULL;
    if (due < q->gone_retry_us)
        due = q->gone_retry_us;
    *at = due;
    return q->gone_n > 0 && now >= due;
}

/* The sweep of the finished messages, in commits of their own: all of
 * them, or on a space failure (the sweep dirties a leaf of "msg" for
 * each and frees their pages only as it commits) the first half, down
 * to one. Failing, it is tried again after a wait that doubles from
 * 100 ms to 5 s, logged once until one works. Returns 0 or an LMDB code. */
static int
gone_sweep(struct queue *q)
{
    qsort(q->gone, q->gone_n, sizeof(*q->gone), queue_cmp_u64);
    size_t m = 0;
    for (size_t i = 0; i < q->gone_n; i++)
        if (m == 0 || q->gone[i] != q->gone[m - 1])
            q->gone[m++] = q->gone[i];
    q->gone_n = m;
    size_t n = q->gone_n;
    int rc;
    while ((rc = sweep_commit(q, n)) != 0 && lmdb_space_err(rc) && n > 1)
        n /= 2;
    uint64_t now = clock_mono_us();
    if (rc != 0) {
        q->gone_backoff_ms = !q->gone_failing             ? 100
                             : q->gone_backoff_ms >= 2500 ? 5000
                                                          : q->gone_backoff_ms * 2;
        q->gone_retry_us = now + q->gone_backoff_ms * 1000ULL;
        if (!q->gone_failing)
            log_msg(LOG_WARN,
                    "queue=sweep_failed path=%s error=\"%s\" finished=%zu "
                    "note=\"their records stay until a sweep works; tried again from 100 ms "
                    "to every 5 s\"",
                    q->cfg.path, queue_strerror(queue_lmdb_err(rc)), q->gone_n);
        q->gone_failing = true;
        return rc;
    }
    if (q->gone_failing)
        log_msg(LOG_NOTICE, "queue=sweep_works path=%s swept=%zu left=%zu", q->cfg.path, n,
                q->gone_n - n);
    q->gone_failing = false;
    q->gone_retry_us = 0;
    memmove(q->gone, q->gone + n, (q->gone_n - n) * sizeof(*q->gone));
    q->gone_n -= n;
    q->gone_since_us = now;
    if (q->gone_n == 0 && q->gone_cap > 4 * GONE_SWEEP_N) {
        /* after a mass bounce: back to the usual size */
        free(q->gone);
        q->gone = NULL;
        q->gone_cap = 0;
    }
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
        upd[i]->rc = queue_lmdb_err(rc);
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
    uint64_t now = clock_unix_ms();
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
 * is (the blocks reserved ahead of the data, see queue_disk_reserve, are not
 * enough and could not be extended). Either way a reserve is left for
 * the updates that free room. */
static size_t
admit(struct queue *q, struct queue_req **enq, size_t ne, bool note)
{
    size_t need_all = 0;
    for (size_t i = 0; i < ne; i++)
        need_all += enqueue_pages(q, enq[i]);
    queue_disk_reserve(q, need_all);
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
    if (note && refused_map + refused_disk > 0)
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

/* Remember an enqueue failed as not confirmed, for drop_unconfirmed. Its
 * id is new (the caller sends the message again under another), so
 * removing it can only remove what this request wrote. Without memory
 * for the id, say which message a restart may deliver. A report's event
 * lines (event lines with a note) likewise: its reporter sends it again,
 * and this copy published too was an event told twice at the sinks. */
static void
drop_note(struct queue *q, const struct queue_req *r)
{
    bool lines = r->kind == REQ_EVENTS;
    uint64_t id = lines ? 0 : r->enq.id;
    if (q->drop_n == q->drop_cap) {
        size_t cap = q->drop_cap ? q->drop_cap * 2 : 64;
        struct drop_ent *d = realloc(q->drop, cap * sizeof(*d));
        if (d == NULL) {
            char qid[QUEUE_ID_STRLEN + 1];
            queue_id_str(id, qid);
            if (lines)
                log_msg(LOG_CRIT,
                        "queue=unconfirmed_kept path=%s event_record=%" PRIu64
                        " error=\"out of memory\" note=\"a report answered 451: its events "
                        "are published, and again when it is sent again\"",
                        q->cfg.path, r->ev_seq);
            else
                log_msg(LOG_CRIT,
                        "queue=unconfirmed_kept path=%s id=%s error=\"out of memory\" "
                        "note=\"answered 451: if the spool holds it, the next start delivers "
                        "it\"",
                        q->cfg.path, qid);
            return;
        }
        q->drop = d;
        q->drop_cap = cap;
    }
    if (lines)
        q->drop[q->drop_n++] = (struct drop_ent){.ev_seq = r->ev_seq, .ev = true,
                                                 .lines_only = true, .ev_len = r->ev_len,
                                                 .ev_hash = hash_bytes(r->ev_text, r->ev_len)};
    else
        q->drop[q->drop_n++] =
            (struct drop_ent){.id = id, .ev_seq = r->ev_seq, .ev = r->ev_len > 0};
    q->drop_fresh = true;
}

/* A sync that was to confirm the commits holding list's requests failed:
 * they fail with err, or with -EIO for a space error, which says "not
 * applied" (queue.h: the caller's retry of an update then tells nothing
 * of what this one did), while these may well have been. Not a take:
 * what it took left the index and is ready in the spool this process
 * reads, so only its caller can own it (failed, nobody would until a
 * restart); should a crash lose the commit, the recipients are deferred
 * as before. Nor event lines put alone: nobody puts them again, and they
 * are published all the same, so the pump moves them to the journal;
 * failed, they were reported lost. But event lines with a note (the
 * bounce listener's report, queue_events_note_put) do fail: their caller
 * answers 451 and the reporter sends the report again, where a 250 would
 * promise a note a crash may still lose (a second copy of its note is
 * harmless: the list's entry is the same; its lines are removed before
 * they are published, as an enqueue's are, or its event would reach the
 * sinks twice).
 * An enqueue failed here is removed before its failure leaves (see
 * drop_unconfirmed): its caller sends the message again. Not the message
 * an update carries (a DSN): the update's retry finds its outcomes
 * applied and leaves its message out (queue.h), so that one is the only
 * copy. */
static void
fail_unconfirmed(struct queue *q, struct queue_req *list, int err)
{
    if (queue_error_is_space(err))
        err = -EIO;
    for (struct queue_req *r = list; r != NULL; r = r->next) {
        if (r->rc != 0 || r->kind == REQ_TAKE || (r->kind == REQ_EVENTS && r->note_len == 0))
            continue;
        r->rc = err;
        if (r->kind == REQ_ENQUEUE || (r->kind == REQ_EVENTS && r->ev_len > 0))
            drop_note(q, r);
    }
}

/* Remove the enqueues failed as not confirmed (q->drop), in a commit of
 * their own followed by a sync, before their failures leave (release):
 * their callers answer 451 and the client sends the message again, so a
 * record left behind, ready and unknown to the engine, would be delivered
 * by the next start's walk, a duplicate hours later. Their commit may
 * not have landed at all (the failed sync was theirs): the removal finds
 * nothing, but still commits and syncs, since the view this process reads
 * may be newer than what a restart finds on disk.
 *
 * If that fails as well, the spool cannot make anything durable: the
 * ids stay, the removal is tried again before each later batch and, when
 * no batch comes, on the committer's own timer (100 ms after a failure,
 * doubling to 5 s: queue_committer_main), and meanwhile the batches'
 * enqueues are refused and counted (run_batch). Nothing can
 * tell a restart about them in the meantime: a mark on disk would need
 * the very sync that fails. So the log says so once, and the committer
 * names each id still there when it stops (queue_committer_main): a
 * restart before a removal worked delivers them.
 * Failure paths only: the hot path never comes here. */
static void
drop_unconfirmed(struct queue *q)
{
    q->drop_fresh = false;
    struct tally t = {0};
    MDB_txn *txn;
    int rc = mdb_txn_begin(q->env, NULL, 0, &txn);
    if (rc == 0) {
        for (size_t i = 0; i < q->drop_n && rc == 0; i++)
            rc = apply_drop(q, txn, &q->drop[i], &t);
        /* a dirty page, so that the commit syncs even when nothing was found */
        MDB_val k = {7, "last_id"}, v = {sizeof(q->high_id), &q->high_id};
        if (rc == 0)
            rc = mdb_put(txn, q->dbi_meta, &k, &v, 0);
        if (rc == 0) {
            rc = mdb_txn_commit(txn);
            if (rc == 0) {
                q->stored_id = q->high_id;
                counter_add(&q->st.commits, 1);
                counter_add(&q->st.removed, t.removed);
                counter_add(&q->st.unconfirmed_removed, t.removed);
                if (t.ev_trimmed > 0)
                    atomic_fetch_sub(&q->st.events_kept, t.ev_trimmed);
                if (t.removed > 0)
                    q->since_free = 0;
                else if (q->since_free < 2)
                    q->since_free++;
                queue_refresh_map_use(q);
                rc = mdb_env_sync(q->env, 1);
            }
        } else {
            mdb_txn_abort(txn);
        }
    }
    if (rc == 0) {
        /* everything committed before is durable too */
        q->pend_unsynced = false;
        if (t.removed > 0 || q->drop_logged)
            log_msg(LOG_NOTICE, "queue=unconfirmed_removed path=%s messages=%" PRIu64, q->cfg.path,
                    t.removed);
        q->drop_n = 0;
        q->drop_logged = false;
        q->drop_backoff_us = 0;
        return;
    }
    counter_add(&q->st.commit_failures, 1);
    uint64_t backoff = q->drop_backoff_us * 2;
    q->drop_backoff_us = backoff == 0                   ? DROP_RETRY_MIN_US
                         : backoff > DROP_RETRY_MAX_US ? DROP_RETRY_MAX_US
                                                       : backoff;
    q->drop_retry_us = clock_mono_us() + q->drop_backoff_us;
    int err = queue_lmdb_err(rc);
    note_failure(q, err);
    /* the sync that was to confirm the pending commit's meta page */
    if (rc > 0 && q->pend_unsynced)
        fail_unconfirmed(q, q->pend_head, err);
    if (!q->drop_logged) {
        q->drop_logged = true;
        log_msg(LOG_CRIT,
                "queue=sync_failing path=%s unconfirmed=%zu error=\"%s\" "
                "action=refusing_new_mail note=\"messages answered 451 may be in the spool "
                "until a sync works: a restart before that may deliver them\"",
                q->cfg.path, q->drop_n, queue_strerror(err));
    }
}

/* At stop, with removals still failing: a last try, then each message
 * still there named, since the next start will deliver what of it is on
 * disk and nothing on disk can say otherwise (drop_unconfirmed). */
static void
drop_kept(struct queue *q)
{
    drop_unconfirmed(q);
    for (size_t i = 0; i < q->drop_n; i++) {
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(q->drop[i].id, qid);
        if (q->drop[i].lines_only) {
            log_msg(LOG_CRIT,
                    "queue=unconfirmed_kept path=%s event_record=%" PRIu64
                    " note=\"a report answered 451, its events' removal not durable: they may "
                    "be published again at the next start\"",
                    q->cfg.path, q->drop[i].ev_seq);
            continue;
        }
        log_msg(LOG_CRIT,
                "queue=unconfirmed_kept path=%s id=%s note=\"answered 451, its removal not "
                "durable: if the spool holds it, the next start delivers it\"",
                q->cfg.path, qid);
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
    } else if (rc > 0) {
        q->io_err = rc; /* see queue_committer_main */
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
    /* Messages answered 451 whose removal did not become durable: try
     * again, and take no new mail while it fails (drop_unconfirmed). */
    if (q->drop_n > 0)
        drop_unconfirmed(q);
    bool refuse = q->drop_n > 0;
    size_t nu = 0, ne = 0, refused = 0;
    for (struct queue_req *r = batch; r != NULL; r = r->next) {
        r->rc = 0;
        if (r->kind != REQ_ENQUEUE)
            q->vec_upd[nu++] = r;
        else if (refuse) {
            r->rc = -EIO;
            refused++;
        } else
            q->vec_enq[ne++] = r;
    }
    if (refused > 0)
        counter_add(&q->st.sync_failing_refused, refused);
    bool sweep = q->gone_n > 0 && clock_mono_us() >= q->gone_retry_us;
    size_t na = ne > 0 ? admit(q, q->vec_enq, ne, !sweep) : 0;
    if (na < ne && sweep) {
        /* Short of room while finished messages wait for the sweep:
         * their pages first (reusable two commits on: retry_enqueues),
         * then the batch's enqueues admitted again. */
        gone_sweep(q);
        ne = 0;
        for (struct queue_req *r = batch; r != NULL; r = r->next)
            if (r->kind == REQ_ENQUEUE && r->rc != -EIO) {
                r->rc = 0;
                q->vec_enq[ne++] = r;
            }
        na = admit(q, q->vec_enq, ne, true);
    }
    nu = admit_msgs(q, q->vec_upd, nu);
    int rc = (nu + na) > 0 ? commit_set(q, q->vec_upd, nu, q->vec_enq, na) : 0;
    if (rc == 0) {
        /* room again once a batch's enqueues all went in (one that
         * refused some of them is still full: admit() said so) */
        if (q->full && na > 0 && na == ne) {
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
                q->vec_enq[i]->rc = queue_lmdb_err(rc);
            full_note(q, rc == MDB_MAP_FULL ? "map_full" : "disk_full", na);
        }
    } else {
        int err = queue_lmdb_err(rc);
        note_failure(q, err);
        for (size_t i = 0; i < nu; i++)
            q->vec_upd[i]->rc = err;
        for (size_t i = 0; i < na; i++)
            q->vec_enq[i]->rc = err;
    }
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

void *
queue_notifier_main(void *arg)
{
    struct queue *q = arg;
    log_altstack_init();
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
    if (q->drop_fresh)
        drop_unconfirmed(q); /* before the failures it is for leave */
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
             * the client retries, a duplicate is better than a loss. */
            int err = queue_lmdb_err(rc);
            note_failure(q, err);
            fail_unconfirmed(q, q->pend_head, err);
        }
    }
    if (q->drop_fresh)
        drop_unconfirmed(q); /* before their reception lines are published */
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
    uint64_t end = clock_mono_us() + cap;
    q->gathering = true;
    while (q->in_count < q->gather_target && !q->stopping && clock_mono_us() < end) {
        size_t before = q->in_count;
        struct timespec ts = clock_mono_deadline_us(GATHER_GAP_US);
        q->idle = true;
        pthread_cond_timedwait(&q->cond, &q->mu, &ts);
        q->idle = false;
        if (q->in_count == before)
            break;
    }
    q->gathering = false;
    q->gather_target = 0;
}

/* Under q->mu, idle with removals failing: wait until the next try is
 * due or a request comes. Returns whether the try is due. */
static bool
drop_wait(struct queue *q)
{
    uint64_t now = clock_mono_us();
    if (now >= q->drop_retry_us)
        return true;
    struct timespec ts = clock_mono_deadline_us(q->drop_retry_us - now);
    q->idle = true;
    pthread_cond_timedwait(&q->cond, &q->mu, &ts);
    q->idle = false;
    return false; /* the loop looks again: a request first, then the time */
}

/* With q->mu held and the committer idle: whether the finished messages
 * are due for their sweep (then the caller sweeps); else waits until
 * they will be, or a request comes, and returns false. */
static bool
gone_wait(struct queue *q)
{
    uint64_t now = clock_mono_us(), at;
    if (gone_due(q, now, &at))
        return true;
    struct timespec ts = clock_mono_deadline_us(at - now);
    q->idle = true;
    pthread_cond_timedwait(&q->cond, &q->mu, &ts);
    q->idle = false;
    return false;
}

void *
queue_committer_main(void *arg)
{
    struct queue *q = arg;
    log_altstack_init();
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
            if (q->stopping) {
                if (q->gone_n > 0 && !q->gone_failing) {
                    /* the finished messages' sweep (one that fails is
                     * the next open's) */
                    pthread_mutex_unlock(&q->mu);
                    gone_sweep(q);
                    pthread_mutex_lock(&q->mu);
                }
                if (q->drop_n > 0) {
                    pthread_mutex_unlock(&q->mu);
                    drop_kept(q);
                    pthread_mutex_lock(&q->mu);
                }
                break; /* everything submitted is committed and sent */
            }
            if (q->drop_n > 0) {
                /* Removals failing (drop_unconfirmed): they are tried
                 * again on a timer of our own, not only when a batch
                 * comes, since until one works new mail is refused. */
                if (drop_wait(q)) {
                    pthread_mutex_unlock(&q->mu);
                    drop_unconfirmed(q);
                    pthread_mutex_lock(&q->mu);
                }
                continue;
            }
            if (q->gone_n > 0) {
                /* the finished messages' sweep once due: idle meanwhile */
                if (gone_wait(q)) {
                    pthread_mutex_unlock(&q->mu);
                    gone_sweep(q);
                    pthread_mutex_lock(&q->mu);
                }
                continue;
            }
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
        q->io_err = 0;
        uint64_t due_at;
        if (gone_due(q, clock_mono_us(), &due_at))
            gone_sweep(q); /* its sync counts as the batch's (batch_commits, io_err) */
        run_batch(q, batch);
        if (q->io_err != 0 && !q->cfg.unsafe_no_sync) {
            /* A commit failed writing or syncing. Its sync may have been
             * the one that was to make the meta pages written since the
             * last confirmed sync durable (the pending commit's, or one
             * of this batch's), and Linux reports a failed write-back
             * once: the next sync succeeds without those pages. What
             * they hold is not confirmed (this batch's later commits
             * too: a retry is harmless, a loss is not). */
            int err = queue_lmdb_err(q->io_err);
            if (q->pend_unsynced)
                fail_unconfirmed(q, q->pend_head, err);
            fail_unconfirmed(q, batch, err);
        }
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
