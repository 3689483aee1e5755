/*
 * apply: what one write transaction of the committer writes (see
 * queue_int.h for the other files of the spool): an enqueue's message,
 * body chunks and recipients (apply_enqueue), an outcome on a recipient
 * unless it is stale (apply_outcome, apply_outcome_stale), or on a message
 * (QUEUE_WARNED: the delay warning's mark in its record), event lines
 * and their trimming (apply_events, apply_trim), the due recipients taken
 * out of the time index (apply_take), the messages left without
 * recipients handed to the sweep (apply_remove_finished, apply_gone_log)
 * and the sweep that removes their records (apply_sweep), and a message
 * dropped whole (apply_drop: an enqueue reported failed whose commit may
 * have landed). commit.c opens the transaction, calls these, and commits.
 *
 * Threading: the committer thread, inside its write transaction.
 */
#include <stdlib.h>
#include <string.h>

#include "common/hash.h"
#include "common/log.h"
#include "queue/queue_int.h"

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

int
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
int
apply_outcome_stale(struct queue *q, MDB_txn *txn, const struct upd_item *it, MDB_val *v,
              struct rcpt_head *h, bool *stale)
{
    unsigned char key[RCPT_KEY_LEN];
    *stale = true;
    if (it->kind == QUEUE_WARNED) {
        /* the message's mark, not a recipient's: set once */
        msg_key(key, it->id);
        MDB_val mk = {MSG_KEY_LEN, key}, mv;
        struct msg_head mh;
        int rc = mdb_get(txn, q->dbi_msg, &mk, &mv);
        if (rc == MDB_NOTFOUND)
            return 0;
        if (rc != 0)
            return rc;
        if (!msg_decode(&mv, &mh))
            return MDB_CORRUPTED;
        if ((mh.flags & MSG_F_WARNED) != 0)
            return 0;
        /* A message with no recipient left is finished, its record
         * waiting for the sweep (queue_int.h, "gone"): nothing to warn of. */
        bool has;
        if ((rc = queue_msg_has_rcpt(q, txn, it->id, &has)) != 0)
            return rc;
        *stale = !has;
        return 0;
    }
    rcpt_key(key, it->id, it->rcpt);
    MDB_val k = {RCPT_KEY_LEN, key};
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
    /* Held (QUEUE_TAG_HELD): its outcome is the caller's already; only
     * one of that tag (the caller reporting it) changes it, any other
     * crossed the hold. */
    if (h->tag == QUEUE_TAG_HELD && it->tag != QUEUE_TAG_HELD)
        return 0;
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

/* Set the delay warning's mark in message id's record (read whole: the
 * body may follow its strings). */
static int
msg_mark_warned(struct queue *q, MDB_txn *txn, uint64_t id, struct tally *t)
{
    unsigned char key[MSG_KEY_LEN];
    msg_key(key, id);
    MDB_val k = {MSG_KEY_LEN, key}, v;
    int rc = mdb_get(txn, q->dbi_msg, &k, &v);
    if (rc != 0)
        return rc;
    unsigned char *rec = malloc(v.mv_size);
    if (rec == NULL)
        return ENOMEM;
    memcpy(rec, v.mv_data, v.mv_size);
    struct msg_head h;
    memcpy(&h, rec, sizeof(h));
    h.flags |= MSG_F_WARNED;
    memcpy(rec, &h, sizeof(h));
    MDB_val nv = {v.mv_size, rec};
    rc = mdb_put(txn, q->dbi_msg, &k, &nv, 0);
    free(rec);
    if (rc == 0)
        t->outcomes++;
    return rc;
}

int
apply_outcome(struct queue *q, MDB_txn *txn, const struct upd_item *it, uint64_t now,
              struct tally *t)
{
    unsigned char key[RCPT_KEY_LEN], dkey[DUE_KEY_LEN];
    rcpt_key(key, it->id, it->rcpt);
    MDB_val k = {RCPT_KEY_LEN, key}, v;
    struct rcpt_head h = {0}; /* not read for QUEUE_WARNED, which sets no recipient's
                               * (gcc -O2 could not tell, -Wmaybe-uninitialized) */
    bool stale;
    int rc = apply_outcome_stale(q, txn, it, &v, &h, &stale);
    if (rc != 0)
        return rc;
    if (stale) {
        t->stale++;
        return 0;
    }
    if (it->kind == QUEUE_WARNED)
        return msg_mark_warned(q, txn, it->id, t);
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
    if (h.attempts < UINT16_MAX && !it->untried)
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

/* Committer: delete the records wholly below r->ev_seq and keep the next
 * number in meta. */
int
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

static int
note_put(struct queue *q, MDB_txn *txn, const void *note, size_t len, uint64_t *seq)
{
    unsigned char key[8];
    msg_key(key, *seq);
    MDB_val k = {8, key}, v = {len, (void *)note};
    int rc = mdb_put(txn, q->dbi_notes, &k, &v, MDB_APPEND);
    if (rc == MDB_KEYEXIST) /* not above the last key: cannot happen, but not fatal */
        rc = mdb_put(txn, q->dbi_notes, &k, &v, 0);
    if (rc == 0)
        (*seq)++;
    return rc;
}

int
apply_notes(struct queue *q, MDB_txn *txn, const struct queue_req *r, uint64_t *seq,
            unsigned *wrote)
{
    int rc = 0;
    if (!q->has_notes)
        return 0;
    if (r->kind == REQ_EVENTS && r->note_len > 0 && (rc = note_put(q, txn, r->note,
                                                                    r->note_len, seq)) == 0)
        (*wrote)++;
    for (size_t i = 0; r->kind == REQ_UPDATE && i < r->u.upd.n && rc == 0; i++) {
        const struct upd_item *it = &r->u.upd.items[i];
        if (it->applied && it->note_len > 0 &&
            (rc = note_put(q, txn, it->note, it->note_len, seq)) == 0)
            (*wrote)++;
    }
    return rc;
}

int
apply_notes_trim(struct queue *q, MDB_txn *txn, const struct queue_req *r, unsigned *trimmed)
{
    if (!q->has_notes)
        return 0;
    MDB_cursor *c;
    int rc = mdb_cursor_open(txn, q->dbi_notes, &c);
    if (rc != 0)
        return rc;
    MDB_val k, v;
    while ((rc = mdb_cursor_get(c, &k, &v, MDB_FIRST)) == 0) {
        if (k.mv_size == 8 && key_u64(k.mv_data) >= r->note_upto)
            break;
        if ((rc = mdb_cursor_del(c, 0)) != 0)
            break;
        (*trimmed)++;
    }
    mdb_cursor_close(c);
    return rc == MDB_NOTFOUND ? 0 : rc;
}

/* Committer: write r's event lines as the record numbered *seq; of an
 * update, only the lines of the outcomes that applied and its own (the
 * lines after its outcomes'): a stale outcome tells nothing. */
int
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

/* Move the deferred recipients due by the request's time out of the time
 * index and make them ready, in due order, up to its limit. The index is
 * the truth about what nobody took yet: it is read from its start, so
 * that no remembered position can hide an entry (a deferral behind it
 * after the wall clock stepped back). An entry without its recipient is
 * removed; one whose recipient does not decode is skipped and counted.
 * Returns 0 or an LMDB code. */
int
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
            queue_corrupt_note(q, "due", last, last_len);
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
            queue_corrupt_note(q, "due", last, DUE_KEY_LEN);
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
            queue_corrupt_note(q, "rcpt", last + 8, RCPT_KEY_LEN);
            continue;
        }
        if ((rc = mdb_del(txn, q->dbi_due, &dk, NULL)) != 0)
            break;
        if (h.state != QUEUE_RCPT_DEFERRED || h.due_ms != due) {
            /* the record disagrees with its index entry: the record wins;
             * a deferred one is taken all the same, or it might never be */
            queue_corrupt_note(q, "due", last, DUE_KEY_LEN);
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
        queue_owner_read(q, txn, id, ob);
        if ((rc = take_append(r, id, idx, rec, rv.mv_size, ob)) != 0)
            break;
        t->taken++;
    }
    free(ob);
    mdb_cursor_close(c);
    return rc == MDB_NOTFOUND ? 0 : rc;
}

/* The record and body chunks of message id deleted (counted in
 * t->removed); nothing when it is not stored. Returns 0 or an LMDB code. */
static int
msg_remove(struct queue *q, MDB_txn *txn, uint64_t id, struct tally *t)
{
    unsigned char key[BODY_KEY_LEN];
    msg_key(key, id);
    MDB_val mk = {MSG_KEY_LEN, key}, mv;
    int rc = mdb_get(txn, q->dbi_msg, &mk, &mv);
    if (rc == MDB_NOTFOUND)
        return 0;
    if (rc != 0)
        return rc;
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
    return rc;
}

/* id to q->gone; 0 or ENOMEM. */
static int
gone_add(struct queue *q, uint64_t id)
{
    if (q->gone_n == q->gone_cap) {
        size_t cap = q->gone_cap ? q->gone_cap * 2 : GONE_SWEEP_N;
        uint64_t *g = realloc(q->gone, cap * sizeof(*g));
        if (g == NULL)
            return ENOMEM;
        q->gone = g;
        q->gone_cap = cap;
    }
    q->gone[q->gone_n++] = id;
    return 0;
}

/* Every touched id left without recipients goes to q->gone: its record
 * and body wait for the sweep (queue_int.h, "gone"). */
int
apply_remove_finished(struct queue *q, MDB_txn *txn, struct tally *t)
{
    if (q->touched_n == 0)
        return 0;
    qsort(q->touched, q->touched_n, sizeof(uint64_t), queue_cmp_u64);
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
        unsigned char key[RCPT_KEY_LEN];
        rcpt_key(key, id, 0);
        MDB_val k = {RCPT_KEY_LEN, key}, v;
        rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        if (rc == 0 && k.mv_size == RCPT_KEY_LEN && key_u64(k.mv_data) == id)
            continue; /* recipients left */
        if (rc != 0 && rc != MDB_NOTFOUND)
            break;
        if ((rc = gone_add(q, id)) == 0)
            t->finished++;
    }
    mdb_cursor_close(c);
    return rc;
}

int
apply_gone_log(struct queue *q, MDB_txn *txn, size_t mark)
{
    if (q->gone_n <= mark)
        return 0;
    unsigned char key[8];
    msg_key(key, q->gone_seq);
    MDB_val k = {sizeof(key), key}, v = {(q->gone_n - mark) * sizeof(uint64_t), q->gone + mark};
    return mdb_put(txn, q->dbi_gone, &k, &v, 0);
}

int
apply_sweep(struct queue *q, MDB_txn *txn, const uint64_t *ids, size_t n, bool all,
            struct tally *t)
{
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        /* Never from under a recipient: an id "gone" names wrongly (a
         * bug, a damaged record) keeps its message, said loudly. */
        bool has;
        if ((rc = queue_msg_has_rcpt(q, txn, ids[i], &has)) != 0)
            break;
        if (has) {
            char qid[QUEUE_ID_STRLEN + 1];
            queue_id_str(ids[i], qid);
            log_msg(LOG_CRIT,
                    "queue=sweep_skipped id=%s path=%s reason=recipients_left "
                    "hint=\"sluice-spool check lists it\"",
                    qid, q->cfg.path);
            continue;
        }
        rc = msg_remove(q, txn, ids[i], t);
    }
    return rc == 0 && all ? mdb_drop(txn, q->dbi_gone, 0) : rc;
}

/* Delete message d->id whole: its recipients (and the time index entries
 * of the deferred ones), its record, its body chunks and its event record. For an enqueue whose
 * caller was told it failed while its commit may have landed (commit.c,
 * drop_unconfirmed): its recipients are ready and nobody owns them, so
 * left alone they would be delivered by the next start's walk. Nothing
 * when it is not stored. Returns 0 or an LMDB code. */
int
apply_drop(struct queue *q, MDB_txn *txn, const struct drop_ent *d, struct tally *t)
{
    uint64_t id = d->id;
    if (d->lines_only) {
        /* A report's lines (its event at a sink), unpublished as a
         * message's reception line is: its reporter sends it again and
         * the copy it then commits is the one told. Only if it is this
         * record, as below. */
        unsigned char ek[8];
        msg_key(ek, d->ev_seq);
        MDB_val k = {8, ek}, v;
        int rc = mdb_get(txn, q->dbi_events, &k, &v);
        if (rc == MDB_NOTFOUND)
            return 0;
        if (rc == 0 && v.mv_size == d->ev_len && hash_bytes(v.mv_data, v.mv_size) == d->ev_hash) {
            if ((rc = mdb_del(txn, q->dbi_events, &k, NULL)) == 0)
                t->ev_trimmed++;
        }
        return rc;
    }
    if (d->ev) {
        /* Its reception line: not published yet (flush_pending drops
         * before it publishes), so no sink hears of a message that is
         * never delivered; the journal skips the number. */
        unsigned char ek[8];
        msg_key(ek, d->ev_seq);
        MDB_val k = {8, ek}, v;
        int rc = mdb_get(txn, q->dbi_events, &k, &v);
        if (rc != 0 && rc != MDB_NOTFOUND)
            return rc;
        /* Only if it is this message's: a number whose commit did not
         * land is written again by a later one (defence in depth: a
         * request failed here had committed). */
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(id, qid);
        if (rc == 0 && memmem(v.mv_data, v.mv_size, qid, strlen(qid)) != NULL) {
            if ((rc = mdb_del(txn, q->dbi_events, &k, NULL)) != 0)
                return rc;
            t->ev_trimmed++;
        }
    }
    unsigned char key[RCPT_KEY_LEN], dkey[DUE_KEY_LEN];
    MDB_cursor *c;
    int rc = mdb_cursor_open(txn, q->dbi_rcpt, &c);
    if (rc != 0)
        return rc;
    for (;;) {
        /* from the first recipient left each time: a delete moves the cursor */
        rcpt_key(key, id, 0);
        MDB_val k = {RCPT_KEY_LEN, key}, v;
        rc = mdb_cursor_get(c, &k, &v, MDB_SET_RANGE);
        if (rc != 0 || k.mv_size != RCPT_KEY_LEN || key_u64(k.mv_data) != id)
            break;
        struct rcpt_head h;
        if (rcpt_decode(&v, &h) && h.state == QUEUE_RCPT_DEFERRED) {
            due_key(dkey, h.due_ms, id, key_u16((const unsigned char *)k.mv_data + 8));
            MDB_val dk = {DUE_KEY_LEN, dkey};
            rc = mdb_del(txn, q->dbi_due, &dk, NULL);
            if (rc != 0 && rc != MDB_NOTFOUND)
                break;
        }
        if ((rc = mdb_cursor_del(c, 0)) != 0)
            break;
    }
    mdb_cursor_close(c);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return rc;
    return msg_remove(q, txn, id, t);
}
