/*
 * open: opening a spool (queue_int.h lists the other files): its lock,
 * the LMDB environment (its flags are the durability choices described
 * in commit.c), the schema, the id generator and the event numbers seeded
 * from what is stored, the sweep of the finished messages a crash left
 * (open_sweep), the disk reserve, and the committer and notifier
 * threads; and closing it.
 *
 * Threading: the one thread that opens or closes (queue.h). open fills
 * the queue before the threads start; close stops them (queue_stop, once
 * they have committed and pushed everything submitted) before it frees
 * anything.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/fs.h"
#include "common/log.h"
#include "queue/queue_int.h"

#define SCHEMA_VERSION  2u
#define MAX_READERS     510

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
            return open_fail(err, errlen, queue_lmdb_err(rc), "cannot read spool %s: %s", path,
                             mdb_strerror(rc));
        if (st.ms_entries != 0)
            return open_fail(err, errlen, QUEUE_ECORRUPT,
                             "%s holds an LMDB environment that is not a sluice spool", path);
        uint32_t version = SCHEMA_VERSION;
        uint64_t created = clock_unix_ms();
        MDB_val k1 = {6, "schema"}, v1 = {sizeof(version), &version};
        MDB_val k2 = {7, "created"}, v2 = {sizeof(created), &created};
        if ((rc = mdb_dbi_open(txn, "meta", MDB_CREATE, &q->dbi_meta)) != 0 ||
            (rc = mdb_dbi_open(txn, "msg", MDB_CREATE, &q->dbi_msg)) != 0 ||
            (rc = mdb_dbi_open(txn, "body", MDB_CREATE, &q->dbi_body)) != 0 ||
            (rc = mdb_dbi_open(txn, "rcpt", MDB_CREATE, &q->dbi_rcpt)) != 0 ||
            (rc = mdb_dbi_open(txn, "due", MDB_CREATE, &q->dbi_due)) != 0 ||
            (rc = mdb_dbi_open(txn, "events", MDB_CREATE, &q->dbi_events)) != 0 ||
            (rc = mdb_dbi_open(txn, "notes", MDB_CREATE, &q->dbi_notes)) != 0 ||
            (rc = mdb_dbi_open(txn, "gone", MDB_CREATE, &q->dbi_gone)) != 0 ||
            (rc = mdb_put(txn, q->dbi_meta, &k1, &v1, 0)) != 0 ||
            (rc = mdb_put(txn, q->dbi_meta, &k2, &v2, 0)) != 0)
            return open_fail(err, errlen, queue_lmdb_err(rc), "cannot create spool %s: %s", path,
                             mdb_strerror(rc));
        q->has_events = q->has_notes = q->has_gone = true;
        return 0;
    }
    if (rc != 0)
        return open_fail(err, errlen, queue_lmdb_err(rc), "cannot read spool %s: %s", path,
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
        /* Older records read as they are (see queue_int.h); the
         * new version keeps an older sluice from misreading new ones. */
        uint32_t now_version = SCHEMA_VERSION;
        MDB_val nv = {sizeof(now_version), &now_version};
        rc = mdb_put(txn, q->dbi_meta, &k, &nv, 0);
        if (rc != 0)
            return open_fail(err, errlen, queue_lmdb_err(rc), "cannot upgrade spool %s: %s", path,
                             mdb_strerror(rc));
        log_msg(LOG_NOTICE, "event=spool_schema_upgraded path=%s from=%u to=%u", path, version,
                SCHEMA_VERSION);
    }
    static const char *const names[] = {"msg", "body", "rcpt", "due"};
    MDB_dbi *dbis[] = {&q->dbi_msg, &q->dbi_body, &q->dbi_rcpt, &q->dbi_due};
    for (size_t i = 0; i < 4; i++) {
        rc = mdb_dbi_open(txn, names[i], 0, dbis[i]);
        if (rc != 0)
            return open_fail(err, errlen, rc == MDB_NOTFOUND ? QUEUE_ECORRUPT : queue_lmdb_err(rc),
                             "spool %s lacks its %s database: %s", path, names[i],
                             mdb_strerror(rc));
    }
    rc = mdb_dbi_open(txn, "events", q->read_only ? 0 : MDB_CREATE, &q->dbi_events);
    if (rc == 0)
        q->has_events = true;
    else if (rc != MDB_NOTFOUND || !q->read_only) /* else an older sluice's: no events */
        return open_fail(err, errlen, queue_lmdb_err(rc),
                         "cannot open the events database of %s: %s", path, mdb_strerror(rc));
    rc = mdb_dbi_open(txn, "notes", q->read_only ? 0 : MDB_CREATE, &q->dbi_notes);
    if (rc == 0)
        q->has_notes = true;
    else if (rc != MDB_NOTFOUND || !q->read_only) /* else an older sluice's: no notes */
        return open_fail(err, errlen, queue_lmdb_err(rc),
                         "cannot open the notes database of %s: %s", path, mdb_strerror(rc));
    rc = mdb_dbi_open(txn, "gone", q->read_only ? 0 : MDB_CREATE, &q->dbi_gone);
    if (rc == 0)
        q->has_gone = true;
    else if (rc != MDB_NOTFOUND || !q->read_only) /* else an older sluice's: none waits */
        return open_fail(err, errlen, queue_lmdb_err(rc), "cannot open the gone database of %s: %s",
                         path, mdb_strerror(rc));
    return 0;
}

/* The finished messages a sweep did not remove before the spool was
 * last closed (a crash, a failed sweep) removed now (queue_int.h,
 * "gone"), in a transaction nested in the opening one: should it fail
 * (a map too full for it), the spool opens all the same and the
 * committer's sweep tries again. Read-only: nothing (readers take a
 * message without recipients for finished). Returns 0 or an LMDB code
 * (reading "gone" failed). */
static int
open_sweep(struct queue *q, MDB_txn *txn)
{
    if (q->read_only || !q->has_gone)
        return 0;
    MDB_cursor *c;
    MDB_val k, v;
    int rc = mdb_cursor_open(txn, q->dbi_gone, &c);
    if (rc != 0)
        return rc;
    rc = mdb_cursor_get(c, &k, &v, MDB_LAST);
    if (rc == 0 && k.mv_size == 8)
        q->gone_seq = key_u64(k.mv_data) + 1; /* records append after it */
    mdb_cursor_close(c);
    if (rc == MDB_NOTFOUND)
        return 0;
    uint64_t *ids;
    size_t n;
    if (rc != 0 || (rc = queue_gone_ids(q, txn, &ids, &n)) != 0)
        return rc;
    MDB_txn *sub;
    struct tally t = {0};
    rc = mdb_txn_begin(q->env, txn, 0, &sub);
    if (rc == 0) {
        rc = apply_sweep(q, sub, ids, n, true, &t);
        if (rc == 0 && t.removed > 0 && q->high_id > q->stored_id) {
            MDB_val lk = {7, "last_id"}, lv = {sizeof(q->high_id), &q->high_id};
            rc = mdb_put(sub, q->dbi_meta, &lk, &lv, 0);
        }
        if (rc == 0)
            rc = mdb_txn_commit(sub);
        else
            mdb_txn_abort(sub);
    }
    if (rc == 0) {
        if (t.removed > 0 && q->high_id > q->stored_id)
            q->stored_id = q->high_id;
        log_msg(LOG_NOTICE, "event=spool_swept path=%s finished=%zu removed=%" PRIu64, q->cfg.path,
                n, t.removed);
        free(ids);
        return 0;
    }
    log_msg(LOG_WARN,
            "event=spool_sweep_deferred path=%s finished=%zu error=\"%s\" "
            "note=\"the records stay until the running spool's sweep removes them\"",
            q->cfg.path, n, queue_strerror(queue_lmdb_err(rc)));
    q->gone = ids; /* the committer sweeps them once it runs (gone_since_us 0: due) */
    q->gone_n = q->gone_cap = n;
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
    q->open_cur = c;
    rc = mdb_cursor_get(c, &k, &v, MDB_LAST);
    if (rc == 0 && k.mv_size == 8 && key_u64(k.mv_data) + lines_of(v.mv_data, v.mv_size) > next)
        next = key_u64(k.mv_data) + lines_of(v.mv_data, v.mv_size);
    q->open_cur = NULL;
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

/* The next note number: after the last note (a trim leaves none below it). */
static int
open_seed_notes(struct queue *q, MDB_txn *txn)
{
    if (!q->has_notes)
        return 0;
    MDB_cursor *c;
    MDB_val k, v;
    int rc = mdb_cursor_open(txn, q->dbi_notes, &c);
    if (rc != 0)
        return rc;
    q->open_cur = c;
    rc = mdb_cursor_get(c, &k, &v, MDB_LAST);
    if (rc == 0 && k.mv_size == 8)
        q->note_next = key_u64(k.mv_data) + 1;
    q->open_cur = NULL;
    mdb_cursor_close(c);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return rc;
    MDB_stat st;
    if ((rc = mdb_stat(txn, q->dbi_notes, &st)) != 0)
        return rc;
    atomic_store(&q->st.notes_kept, (uint64_t)st.ms_entries);
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
    q->open_cur = c;
    rc = mdb_cursor_get(c, &k, &v, MDB_LAST);
    if (rc == 0 && k.mv_size == MSG_KEY_LEN && key_u64(k.mv_data) > high)
        high = key_u64(k.mv_data);
    q->open_cur = NULL;
    mdb_cursor_close(c);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return rc;
    q->high_id = high;
    atomic_store(&q->last_id, high);
    return 0;
}

/* Join th, waiting up to the CLOCK_MONOTONIC time at (NULL: no bound).
 * True when it ended. */
static bool
join_by(pthread_t th, const struct timespec *at)
{
    if (at == NULL)
        return pthread_join(th, NULL) == 0;
    return pthread_clockjoin_np(th, NULL, CLOCK_MONOTONIC, at) == 0;
}

/* Stop the committer once it has committed everything submitted, then
 * the notifier once it has pushed everything committed; by at (NULL: no
 * bound). False when one of them has not ended by then (a disk that
 * does not answer): it still runs, and may be waited for again. */
static bool
queue_stop(struct queue *q, const struct timespec *at)
{
    if (q->committer_started) {
        pthread_mutex_lock(&q->mu);
        q->stopping = true;
        pthread_cond_signal(&q->cond);
        pthread_mutex_unlock(&q->mu);
        if (!join_by(q->committer, at))
            return false;
        q->committer_started = false;
    }
    if (q->notifier_started) {
        pthread_mutex_lock(&q->nmu);
        q->n_stopping = true;
        pthread_cond_signal(&q->ncond);
        pthread_mutex_unlock(&q->nmu);
        if (!join_by(q->notifier, at))
            return false;
        q->notifier_started = false;
    }
    return true;
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
    free(q->gone);
    free(q->drop);
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cond);
    pthread_mutex_destroy(&q->nmu);
    pthread_cond_destroy(&q->ncond);
    pthread_mutex_destroy(&q->corrupt.mu);
    pthread_mutex_destroy(&q->ev_mu);
    conf_free(queue_conf_keys, &q->cfg);
    free(q);
}

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

/* LMDB's own checks of a page (built with assertions, as Debian's is)
 * abort the process. Logged; where a fault guard is armed (the open, a
 * walk, sluice-spool: fault.h) it ends the reading as a fault does, else
 * LMDB aborts. */
static void
on_lmdb_assert(MDB_env *env, const char *msg)
{
    const char *path = "-";
    mdb_env_get_path(env, &path);
    log_msg(LOG_CRIT, "queue=lmdb_assertion path=%s msg=\"%s\" note=the_spool_is_likely_damaged",
            path, msg);
    fault_guard_trip(msg);
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
    mdb_env_set_assert(q->env, on_lmdb_assert); /* EINVAL where LMDB has no assertions */
    if ((rc = mdb_env_set_maxdbs(q->env, 16)) != 0 ||
        (rc = mdb_env_set_maxreaders(q->env, MAX_READERS)) != 0 ||
        (rc = mdb_env_set_mapsize(q->env, (size_t)q->cfg.map_size)) != 0 ||
        (rc = mdb_env_open(q->env, path, flags, 0600)) != 0) {
        mdb_env_close(q->env);
        q->env = NULL;
    }
    return rc;
}

/* Whether every page in [have, end) is in LMDB's free list (FREE_DBI,
 * database 0: per transaction, a count and the page numbers it freed).
 * 1: all free; 0: some page there is not; -1: the list could not be read
 * (an error, or a fault: a page of the list itself past the file's end);
 * -2: no memory for the map of the pages past the end. */
static int
open_tail_is_free(struct queue *q, size_t have, size_t end)
{
    size_t missing = end - have;
    unsigned char *seen = calloc((missing + 7) / 8, 1);
    MDB_txn *txn = NULL;
    MDB_cursor *cur = NULL;
    if (seen == NULL)
        return -2;
    if (mdb_txn_begin(q->env, NULL, MDB_RDONLY, &txn) != 0 ||
        mdb_cursor_open(txn, 0, &cur) != 0) {
        if (txn != NULL)
            mdb_txn_abort(txn);
        free(seen);
        return -1;
    }
    struct fault_guard g;
    struct fault_guard *prev = fault_guard_arm(&g);
    if (sigsetjmp(g.jb, 1) != 0) {
        mdb_cursor_close(cur);
        mdb_txn_abort(txn);
        free(seen);
        return -1;
    }
    size_t found = 0;
    int rc;
    MDB_val k, v;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        size_t n, id; /* an MDB_IDL: its count, then the ids; copied, as the value's
                       * alignment is LMDB's business */
        if (v.mv_size < sizeof(n))
            break;
        memcpy(&n, v.mv_data, sizeof(n));
        if (n > v.mv_size / sizeof(id) - 1)
            break;
        for (size_t i = 1; i <= n; i++) {
            memcpy(&id, (const char *)v.mv_data + i * sizeof(id), sizeof(id));
            if (id < have || id >= end || (seen[(id - have) / 8] & (1u << ((id - have) % 8))))
                continue;
            seen[(id - have) / 8] |= (unsigned char)(1u << ((id - have) % 8));
            found++;
        }
    }
    fault_guard_restore(prev);
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    free(seen);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return -1;
    return found == missing ? 1 : 0;
}

/* A data file shorter than the pages its newest meta page says are in
 * use is LMDB's normal state when the last pages a transaction took
 * were freed in it before its commit: they are in the free list and
 * were never written (mdb_env_copy allows for it). It is damage when a
 * page in use is past the end (a copy cut short, a file truncated by
 * hand or by a full disk, a file extension lost with unsafe_no_sync):
 * LMDB reads pages through its map, and a page past the end of the file
 * is SIGBUS, not an error, in the first transaction that touches it.
 * So a short file is refused unless every page past its end is free.
 * The meta pages themselves were read and checked by mdb_env_open. */
static int
open_check_length(struct queue *q, const char *path, char *err, size_t errlen)
{
    MDB_envinfo info;
    MDB_stat st;
    int fd;
    struct stat fst;
    if (mdb_env_info(q->env, &info) != 0 || mdb_env_stat(q->env, &st) != 0 ||
        mdb_env_get_fd(q->env, &fd) != 0 || fstat(fd, &fst) != 0 || st.ms_psize == 0)
        return 0; /* nothing to compare with: LMDB's own checks stand */
    uint64_t need = ((uint64_t)info.me_last_pgno + 1) * st.ms_psize;
    if (fst.st_size < 0 || (uint64_t)fst.st_size >= need)
        return 0;
    size_t have = (size_t)((uint64_t)fst.st_size / st.ms_psize); /* a partial page is missing */
    int free_tail = open_tail_is_free(q, have, info.me_last_pgno + 1);
    if (free_tail == 1)
        return 0;
    return open_fail(err, errlen, QUEUE_ECORRUPT,
                     "cannot open spool %s: data.mdb is truncated: %" PRIu64
                     " octets, its pages in use end at %" PRIu64 "%s",
                     path, (uint64_t)fst.st_size, need,
                     free_tail == 0    ? ""
                     : free_tail == -2 ? " (no memory to check that the pages past it are free)"
                                       : " (its free list past the end is unreadable)");
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
    clock_cond_init_mono(&q->cond);
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
        int code = queue_lmdb_err(rc);
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
    if ((rc = open_check_length(q, path, err, errlen)) != 0) {
        queue_destroy(q);
        return rc;
    }

    /* Read-only, a read transaction: its commit keeps the handles of the
     * databases it opened and writes nothing. */
    MDB_txn *txn;
    rc = mdb_txn_begin(q->env, NULL, read_only ? MDB_RDONLY : 0, &txn);
    if (rc != 0) {
        int code = queue_lmdb_err(rc);
        open_fail(err, errlen, code, "cannot open spool %s: %s", path, mdb_strerror(rc));
        queue_destroy(q);
        return code;
    }
    /* The schema record and the last keys: a page damaged inside faults
     * in LMDB (no checksums), here as in a walk (read.c). */
    struct fault_guard g;
    struct fault_guard *prev = fault_guard_arm(&g);
    if (sigsetjmp(g.jb, 1) != 0) {
        char what[240];
        open_fail(err, errlen, QUEUE_ECORRUPT,
                  "spool %s is damaged: reading data.mdb failed inside LMDB (%s); LMDB keeps no "
                  "checksums, so damage inside a page shows only so: restore it from a copy",
                  path, fault_guard_str(&g, what, sizeof(what)));
        if (q->open_cur != NULL)
            mdb_cursor_close(q->open_cur); /* a read transaction's is not closed with it */
        mdb_txn_abort(txn);
        queue_destroy(q);
        return QUEUE_ECORRUPT;
    }
    int code = open_schema(q, txn, err, errlen);
    if (code == 0 && ((rc = open_seed_ids(q, txn)) != 0 || (rc = open_seed_events(q, txn)) != 0 ||
                      (rc = open_seed_notes(q, txn)) != 0 || (rc = open_sweep(q, txn)) != 0))
        code = open_fail(err, errlen, queue_lmdb_err(rc), "cannot read spool %s: %s", path,
                         mdb_strerror(rc));
    fault_guard_restore(prev);
    if (code == 0 && (rc = mdb_txn_commit(txn)) != 0)
        code = open_fail(err, errlen, queue_lmdb_err(rc), "cannot write spool %s: %s", path,
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
    queue_refresh_map_use(q);
    struct stat fst;
    if (mdb_env_get_fd(q->env, &q->data_fd) == 0 && fstat(q->data_fd, &fst) == 0) {
        q->map_addr = map_find(&fst);
        q->prealloc = !read_only; /* a reader allocates no blocks */
        q->alloc_pages = (size_t)fst.st_size / q->psize;
        queue_disk_reserve(q, 0);
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
    rc = pthread_create(&q->notifier, NULL, queue_notifier_main, q);
    if (rc == 0) {
        q->notifier_started = true;
        pthread_setname_np(q->notifier, "sluice-qnotify");
        rc = pthread_create(&q->committer, NULL, queue_committer_main, q);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        queue_stop(q, NULL);
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
    queue_stop(q, NULL);
    if (q->cfg.unsafe_no_sync && !q->read_only)
        mdb_env_sync(q->env, 1);
    queue_destroy(q);
}

bool
queue_close_within(struct queue *q, uint64_t ms)
{
    if (q == NULL)
        return true;
    struct timespec at = clock_mono_deadline(ms);
    if (!queue_stop(q, &at))
        return false;
    if (q->cfg.unsafe_no_sync && !q->read_only)
        mdb_env_sync(q->env, 1);
    queue_destroy(q);
    return true;
}
