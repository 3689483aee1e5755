/*
 * read: every read of the spool (queue_int.h lists the other files):
 * envelopes and bodies, the walk of every recipient, the due index,
 * counts per domain, the consistency check, event records and the stats;
 * the map trim; and what the committer shares with the readers: the
 * owner of a message, a recipient record decoded, and the note of a
 * corrupt record. A message record with no recipient left is a finished
 * one waiting for the sweep: envelope and body reads say it is not
 * stored, and counts and the check leave out the ids "gone" names.
 *
 * Threading: any thread, concurrently. A reader takes a read transaction
 * of its own (MDB_NOTLS) and ends it before returning; a long scan
 * renews its transaction every SCAN_CHUNK records (struct scan).
 * queue_corrupt_note() keeps its keys under q->corrupt.mu.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "common/log.h"
#include "queue/queue_int.h"

#define SCAN_CHUNK      4096 /* records per read transaction in long scans */
#define LMDB_PAGE_HDR   16   /* the header of an LMDB page (PAGEHDRSZ), an overflow page's too */

/* ---- reads ---- */

static int
read_begin(struct queue *q, MDB_txn **txn)
{
    return mdb_txn_begin(q->env, NULL, MDB_RDONLY, txn);
}

/* A read transaction and a cursor on dbi in it: 0, or the queue's error
 * with nothing left open. The caller closes the cursor and aborts the
 * transaction. */
static int
read_cursor(struct queue *q, MDB_dbi dbi, MDB_txn **txn, MDB_cursor **c)
{
    int rc = read_begin(q, txn);
    if (rc != 0)
        return queue_lmdb_err(rc);
    if ((rc = mdb_cursor_open(*txn, dbi, c)) != 0) {
        mdb_txn_abort(*txn);
        return queue_lmdb_err(rc);
    }
    return 0;
}

/* A record that fails its checks: count and log it once per key and
 * process (see struct corrupt_seen); the caller skips it. db names the
 * database, key is its key (message id first for every database but
 * "due", where the id follows the time). Any thread. */
void
queue_corrupt_note(struct queue *q, const char *db, const void *key, size_t klen)
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

/* The owner of message id into o (kept when o already holds it): empty
 * when its record is missing or fails its checks (the recipient still
 * goes, as a message without an owner). */
void
queue_owner_read(struct queue *q, MDB_txn *txn, uint64_t id, struct owner_buf *o)
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

int
queue_events_read(struct queue *q, uint64_t from, size_t max_bytes, queue_events_fn *cb,
                  void *arg)
{
    uint64_t durable = atomic_load(&q->ev_durable);
    if (from >= durable)
        return 0;
    MDB_txn *txn;
    MDB_cursor *c;
    int rc = read_cursor(q, q->dbi_events, &txn, &c);
    if (rc != 0)
        return rc;
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
            queue_corrupt_note(q, "events", k.mv_data, k.mv_size);
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
    return rc == 0 || rc == MDB_NOTFOUND ? n : queue_lmdb_err(rc);
}

int
queue_notes_read(struct queue *q, uint64_t from, unsigned max, queue_note_fn *cb, void *arg)
{
    if (!q->has_notes)
        return 0;
    MDB_txn *txn;
    MDB_cursor *c;
    int rc = read_cursor(q, q->dbi_notes, &txn, &c);
    if (rc != 0)
        return rc;
    unsigned char key[8];
    msg_key(key, from);
    MDB_val k = {8, key}, v;
    int n = 0;
    rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
    while (rc == 0 && (max == 0 || (unsigned)n < max)) {
        if (k.mv_size != 8) {
            queue_corrupt_note(q, "notes", k.mv_data, k.mv_size);
        } else {
            n++;
            if (cb(arg, key_u64(k.mv_data), v.mv_data, v.mv_size) != 0)
                break;
        }
        rc = mdb_cursor_get(c, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close(c);
    mdb_txn_abort(txn);
    return rc == 0 || rc == MDB_NOTFOUND ? n : queue_lmdb_err(rc);
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
void
queue_rcpt_fill(struct queue_rcpt *r, const struct rcpt_head *h, const MDB_val *v, unsigned index,
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
    r->tag = h->tag;
    r->owner = (struct queue_owner){"", "", "", 0, false};
}

int
queue_msg_has_rcpt(struct queue *q, MDB_txn *txn, uint64_t id, bool *has)
{
    MDB_cursor *c;
    int rc = mdb_cursor_open(txn, q->dbi_rcpt, &c);
    if (rc != 0)
        return rc;
    unsigned char key[RCPT_KEY_LEN];
    rcpt_key(key, id, 0);
    MDB_val k = {RCPT_KEY_LEN, key}, v;
    rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
    mdb_cursor_close(c);
    *has = rc == 0 && k.mv_size == RCPT_KEY_LEN && key_u64(k.mv_data) == id;
    return rc == MDB_NOTFOUND ? 0 : rc;
}

int
queue_gone_ids(struct queue *q, MDB_txn *txn, uint64_t **ids, size_t *n)
{
    *n = 0;
    if (ids != NULL)
        *ids = NULL;
    if (!q->has_gone)
        return 0;
    MDB_cursor *c;
    int rc = mdb_cursor_open(txn, q->dbi_gone, &c);
    if (rc != 0)
        return rc;
    MDB_val k, v;
    size_t cap = 0;
    while ((rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) == 0) {
        if (k.mv_size != 8 || v.mv_size % sizeof(uint64_t) != 0) {
            queue_corrupt_note(q, "gone", k.mv_data, k.mv_size);
            continue;
        }
        size_t m = v.mv_size / sizeof(uint64_t);
        if (ids != NULL && *n + m > cap) {
            size_t ncap = cap ? cap : 1024;
            while (ncap < *n + m)
                ncap *= 2;
            uint64_t *g = realloc(*ids, ncap * sizeof(*g));
            if (g == NULL) {
                rc = ENOMEM;
                break;
            }
            *ids = g;
            cap = ncap;
        }
        if (ids != NULL)
            memcpy(*ids + *n, v.mv_data, m * sizeof(uint64_t));
        *n += m;
    }
    mdb_cursor_close(c);
    if (rc != MDB_NOTFOUND) {
        if (ids != NULL) {
            free(*ids);
            *ids = NULL;
        }
        *n = 0;
        return rc;
    }
    if (ids != NULL && *n > 1)
        qsort(*ids, *n, sizeof(**ids), queue_cmp_u64);
    return 0;
}

int
queue_envelope_get(struct queue *q, uint64_t id, struct queue_envelope **out)
{
    *out = NULL;
    MDB_txn *txn;
    int rc = read_begin(q, &txn);
    if (rc != 0)
        return queue_lmdb_err(rc);
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
            e->delay_warned = (h.flags & MSG_F_WARNED) != 0;
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
                queue_corrupt_note(q, "rcpt", rk.mv_data, rk.mv_size);
                continue;
            }
            if (pass == 0) {
                n++;
                bytes += rv.mv_size - sizeof(rh) + 4;
            } else if (i < n) {
                queue_rcpt_fill(&e->rcpt[i++], &rh, &rv,
                                key_u16((const unsigned char *)rk.mv_data + 8), &strs);
            }
        }
        if (rc == MDB_NOTFOUND || rc == 0)
            rc = 0;
        /* None left: a finished message whose record waits for the sweep
         * (queue_int.h, "gone"). */
        if (rc == 0 && pass == 0 && n == 0)
            rc = MDB_NOTFOUND;
    }
    if (c != NULL)
        mdb_cursor_close(c);
    mdb_txn_abort(txn);
    if (rc != 0) {
        *out = queue_envelope_free(*out);
        return queue_lmdb_err(rc);
    }
    return 0;
}

struct queue_envelope *
queue_envelope_free(struct queue_envelope *env)
{
    free(env);
    return NULL;
}

const struct queue_rcpt *
queue_envelope_rcpt(const struct queue_envelope *env, unsigned index)
{
    /* the records' keys end in the index, big-endian (rcpt_key) */
    size_t lo = 0, hi = env->nrcpt;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (env->rcpt[mid].index == index)
            return &env->rcpt[mid];
        if (env->rcpt[mid].index < index)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

int
queue_body_read(struct queue *q, uint64_t id, uint64_t off, void *buf, size_t cap, size_t *len)
{
    *len = 0;
    MDB_txn *txn;
    int rc = read_begin(q, &txn);
    if (rc != 0)
        return queue_lmdb_err(rc);
    unsigned char key[BODY_KEY_LEN];
    msg_key(key, id);
    MDB_val k = {MSG_KEY_LEN, key}, v;
    struct msg_head h;
    rc = mdb_get(txn, q->dbi_msg, &k, &v);
    if (rc == 0 && !msg_decode(&v, &h))
        rc = MDB_CORRUPTED;
    bool has = true;
    if (rc == 0 && (rc = queue_msg_has_rcpt(q, txn, id, &has)) == 0 && !has)
        rc = MDB_NOTFOUND; /* finished, its record waiting for the sweep */
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
    return queue_lmdb_err(rc);
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
    bool have_last; /* last holds a key returned */
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

/* Is key k after the key of n octets at last, in LMDB's default order
 * (memcmp, then the shorter first)? */
static bool
key_after(const MDB_val *k, const unsigned char *last, size_t n)
{
    int c = memcmp(k->mv_data, last, k->mv_size < n ? k->mv_size : n);
    return c > 0 || (c == 0 && k->mv_size > n);
}

/* Next record at or after start (first call) or after the last one.
 * Returns 0, MDB_NOTFOUND at the end, or an LMDB code: MDB_CORRUPTED
 * for a key not after the one before it, which only a damaged page
 * gives (LMDB trusts the order it finds; a page whose header claims
 * thousands of keys of garbage made a walk go round for ever, renewing
 * its transaction at a key it had passed). */
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
    if (rc == 0 && s->have_last && !key_after(k, s->last, s->last_len))
        rc = MDB_CORRUPTED;
    if (rc == 0) {
        s->have_last = true;
        s->in_txn++;
        s->last_len = k->mv_size <= sizeof(s->last) ? k->mv_size : sizeof(s->last);
        memcpy(s->last, k->mv_data, s->last_len);
    }
    return rc;
}

/* A read of the spool faulted inside LMDB, or in a record it handed
 * out (fault.h): the spool is damaged where LMDB, without checksums,
 * cannot tell. Logged here, where it is known; the caller gets
 * QUEUE_ECORRUPT. */
void
queue_fault_note(struct queue *q, const char *db, const struct fault_guard *g)
{
    char what[240];
    atomic_fetch_add_explicit(&q->st.corrupt, 1, memory_order_relaxed);
    log_msg(LOG_CRIT,
            "queue=damaged db=%s path=%s what=\"%s\" note=lmdb_keeps_no_checksums "
            "hint=\"restore the spool from a copy\"",
            db, q->cfg.path, fault_guard_str(g, what, sizeof(what)));
}

/* The walk's state on the heap: what a fault's jump finds as it was. */
struct walk {
    struct scan s;
    struct owner_buf ob;
    char strs[RCPT_REC_MAX + 8];
};

int
queue_walk(struct queue *q, queue_rcpt_fn *cb, void *arg)
{
    struct walk *w = calloc(1, sizeof(*w));
    if (w == NULL)
        return -ENOMEM;
    w->s = (struct scan){.q = q, .dbi = q->dbi_rcpt};
    MDB_val k, v;
    int rc;
    volatile int ret = 0; /* kept across a jump (fault.h) */
    /* Armed for LMDB's reads and the decoding of what they return (a
     * damaged page points anywhere), not for the callback. */
    struct fault_guard g;
    struct fault_guard *prev = fault_guard_arm(&g);
    if (sigsetjmp(g.jb, 1) != 0) {
        queue_fault_note(q, "rcpt", &g);
        scan_end(&w->s);
        free(w);
        return QUEUE_ECORRUPT;
    }
    while ((rc = scan_next(&w->s, &k, &v)) == 0) {
        struct rcpt_head h;
        if (k.mv_size != RCPT_KEY_LEN || !rcpt_decode(&v, &h) || v.mv_size > RCPT_REC_MAX) {
            queue_corrupt_note(q, "rcpt", k.mv_data, k.mv_size);
            continue;
        }
        struct queue_rcpt r;
        char *p = w->strs;
        queue_rcpt_fill(&r, &h, &v, key_u16((const unsigned char *)k.mv_data + 8), &p);
        uint64_t id = key_u64(k.mv_data);
        queue_owner_read(q, w->s.txn, id, &w->ob);
        r.owner = (struct queue_owner){w->ob.tenant, w->ob.campaign, w->ob.pool,
                                       w->ob.priority, w->ob.tls_relaxed};
        fault_guard_restore(prev);
        ret = cb(arg, id, &r);
        fault_guard_restore(&g);
        if (ret != 0)
            break;
    }
    fault_guard_restore(prev);
    scan_end(&w->s);
    free(w);
    if (ret != 0)
        return ret;
    return rc == MDB_NOTFOUND ? 0 : queue_lmdb_err(rc);
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
            queue_corrupt_note(q, "due", k.mv_data, k.mv_size);
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
            queue_corrupt_note(q, "due", kp, DUE_KEY_LEN);
            continue;
        }
        if (rc != 0)
            break;
        if (!rcpt_decode(&rv, &h) || rv.mv_size > RCPT_REC_MAX) {
            queue_corrupt_note(q, "rcpt", kp + 8, RCPT_KEY_LEN);
            continue;
        }
        struct queue_rcpt r;
        char *p = strs;
        queue_rcpt_fill(&r, &h, &rv, idx, &p);
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
    return rc == MDB_NOTFOUND ? n : queue_lmdb_err(rc);
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

/* Of the n finished messages ids, those whose record is still there
 * (*left: a part of a sweep leaves the ids it removed in "gone"), and
 * the pages of their own that their records and bodies hold (a record
 * too large for a leaf and each body chunk take whole pages; a small
 * record's share of a leaf is not counted): what queue_counts leaves
 * out of its messages and bytes. */
static uint64_t
finished_pages(struct queue *q, MDB_txn *txn, const uint64_t *ids, size_t n, size_t psize,
               size_t *left)
{
    uint64_t pages = 0;
    *left = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char key[MSG_KEY_LEN];
        msg_key(key, ids[i]);
        MDB_val k = {MSG_KEY_LEN, key}, v;
        struct msg_head h;
        if (mdb_get(txn, q->dbi_msg, &k, &v) != 0)
            continue;
        (*left)++;
        if (!msg_decode(&v, &h))
            continue;
        if (v.mv_size >= psize / 2)
            pages += (v.mv_size + LMDB_PAGE_HDR + psize - 1) / psize;
        for (uint64_t rest = h.body_chunks > 0 ? h.body_len : 0; rest > 0;) {
            uint64_t chunk = rest < BODY_CHUNK ? rest : BODY_CHUNK;
            pages += (chunk + LMDB_PAGE_HDR + psize - 1) / psize;
            rest -= chunk;
        }
    }
    return pages;
}

int
queue_counts(struct queue *q, struct queue_counts *total, queue_domain_fn *cb, void *arg)
{
    MDB_txn *txn;
    int rc = read_begin(q, &txn);
    if (rc != 0)
        return queue_lmdb_err(rc);
    MDB_stat sm, sr, sd, sb;
    uint64_t *finished = NULL;
    size_t nfinished = 0, left = 0;
    uint64_t finished_bytes = 0;
    if ((rc = mdb_stat(txn, q->dbi_msg, &sm)) == 0 && (rc = mdb_stat(txn, q->dbi_rcpt, &sr)) == 0 &&
        (rc = mdb_stat(txn, q->dbi_due, &sd)) == 0 && (rc = mdb_stat(txn, q->dbi_body, &sb)) == 0 &&
        (rc = queue_gone_ids(q, txn, &finished, &nfinished)) == 0)
        finished_bytes =
            finished_pages(q, txn, finished, nfinished, sm.ms_psize, &left) * sm.ms_psize;
    free(finished);
    mdb_txn_abort(txn);
    if (rc != 0)
        return queue_lmdb_err(rc);
    total->bytes = 0;
    const MDB_stat *st[] = {&sm, &sr, &sd, &sb};
    for (size_t i = 0; i < sizeof(st) / sizeof(st[0]); i++)
        total->bytes +=
            (uint64_t)(st[i]->ms_branch_pages + st[i]->ms_leaf_pages + st[i]->ms_overflow_pages) *
            st[i]->ms_psize;
    total->bytes = total->bytes > finished_bytes ? total->bytes - finished_bytes : 0;
    total->messages = sm.ms_entries > left ? sm.ms_entries - left : 0;
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
            queue_corrupt_note(q, "rcpt", k.mv_data, k.mv_size);
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
        /* A held recipient's outcome is final (QUEUE_TAG_HELD): it waits
         * for its message's report, not for its domain, whose oldest
         * waiting recipient it is not (a domain all of whose mail failed
         * would look stuck for as long as the hold lasts). */
        bool held = h.state == QUEUE_RCPT_DEFERRED && h.tag == QUEUE_TAG_HELD;
        uint64_t at = k.mv_size >= 8 ? queue_id_time_ms(key_u64(k.mv_data)) : 0;
        if (!held && at != 0 && (slot->c.oldest_ms == 0 || at < slot->c.oldest_ms))
            slot->c.oldest_ms = at;
    }
    scan_end(&s);
    int ret = rc == MDB_NOTFOUND ? 0 : queue_lmdb_err(rc);
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
        return queue_lmdb_err(rc);
    MDB_cursor *c = NULL;
    MDB_val k, v;
    unsigned char key[DUE_KEY_LEN];
    uint64_t *finished = NULL;
    size_t nfinished = 0;

    /* finished messages waiting for the sweep: none may have a recipient
     * (the sweep would remove its record from under it) */
    if ((rc = queue_gone_ids(q, txn, &finished, &nfinished)) != 0)
        goto out;
    for (size_t i = 0; i < nfinished; i++) {
        bool has;
        if ((rc = queue_msg_has_rcpt(q, txn, finished[i], &has)) != 0)
            goto out;
        if (has) {
            msg_key(key, finished[i]);
            MDB_val fk = {MSG_KEY_LEN, key};
            check_note(rep, &rep->bad_records, "gone", "finished_with_recipients", &fk);
        }
    }

    /* messages: decode, at least one recipient, chunks complete; not
     * the finished ones */
    if ((rc = mdb_cursor_open(txn, q->dbi_msg, &c)) != 0)
        goto out;
    for (rc = mdb_cursor_get(c, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(c, &k, &v, MDB_NEXT)) {
        if (k.mv_size == MSG_KEY_LEN && nfinished > 0) {
            uint64_t fid = key_u64(k.mv_data);
            if (bsearch(&fid, finished, nfinished, sizeof(fid), queue_cmp_u64) != NULL)
                continue;
        }
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
            if (mdb_cursor_get(rc2, &rk, &rv, MDB_SET_RANGE) != 0 || rk.mv_size < 8 ||
                key_u64(rk.mv_data) != id)
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
        if (k.mv_size >= MSG_KEY_LEN && nfinished > 0) {
            uint64_t fid = key_u64(k.mv_data);
            if (bsearch(&fid, finished, nfinished, sizeof(fid), queue_cmp_u64) != NULL)
                continue;
        }
        rep->body_chunks++;
        MDB_val mv;
        struct msg_head h;
        uint32_t ch = 0;
        if (k.mv_size == BODY_KEY_LEN) { /* a short key is not read past its end */
            memcpy(&ch, (const unsigned char *)k.mv_data + 8, 4);
            ch = be32toh(ch);
        }
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
    free(finished);
    if (c != NULL)
        mdb_cursor_close(c);
    mdb_txn_abort(txn);
    /* A damaged page that LMDB noticed (a node count or a child that
     * cannot be): the operation that met it failed, which the lookups
     * above take for a record missing, and every later one in the
     * snapshot says MDB_BAD_TXN (nothing else makes a read transaction
     * bad). Said as damage, not as a storage error. */
    if (rc == MDB_CORRUPTED || rc == MDB_PAGE_NOTFOUND || rc == MDB_BAD_TXN) {
        rep->lmdb_damage = mdb_strerror(rc);
        return QUEUE_ECORRUPT;
    }
    if (rc != 0)
        return queue_lmdb_err(rc);
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
    LOAD(swept);
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
    LOAD(notes_kept);
    LOAD(unconfirmed_removed);
    LOAD(sync_failing_refused);
#undef LOAD
}
