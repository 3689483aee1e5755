/*
 * suppress_scope: a scope's entries moved under another scope of the
 * suppression list (see suppress.h, suppress_move_scope), and the fold at
 * open of lists an earlier sluice stored under a scope with capitals into
 * the scope in lowercase (sup_fold_stored_scopes): an address on both
 * keeps the entry that holds longer. Moves are written in transactions of
 * MOVE_BATCH entries.
 *
 * Threading: suppress_move_scope from any thread at once (suppress.h);
 * each batch takes the list's writer mutex. The fold runs in
 * suppress_open, on its thread, before the writer thread starts and
 * before any check.
 */
#include "engine/suppress.h"
#include "engine/suppress_int.h"

#include <ctype.h>
#include <errno.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

/* ---- moves of a scope ---- */

/* One batch of suppress_move_scope (wlock held): up to MOVE_BATCH entries
 * of from (key prefix pfx, pl octets with its NUL) under to. Returns how
 * many moved, or -errno. */
static long
move_batch(struct suppress *s, const uint8_t *pfx, size_t pl, const char *to)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = sup_cursor_open(s, 0, &txn, &cur);
    if (rc != 0)
        return rc;
    /* Copied out first, then written: no put while a cursor walks the
     * same database (the values point into pages a put may move). */
    struct feed *head = NULL, **tail = &head;
    long n = 0;
    MDB_val k = {pl, (void *)pfx}, v;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE); rc == 0 && n < MOVE_BATCH;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        if (k.mv_size < pl || memcmp(k.mv_data, pfx, pl) != 0)
            break;
        size_t al = k.mv_size - pl;
        if (al > SUPPRESS_ADDR_MAX || v.mv_size > VAL_MAX)
            continue; /* damaged: not ours to carry (list and export skip it too) */
        struct feed *f = malloc(sizeof(*f) + 2 * KEY_MAX + VAL_MAX);
        if (f == NULL) {
            rc = ENOMEM;
            break;
        }
        /* kv: the new key, the value, then the old key */
        f->next = NULL;
        f->klen = (uint16_t)(strlen(to) + 1 + al);
        f->vlen = (uint16_t)v.mv_size;
        memcpy(f->kv, to, strlen(to) + 1);
        memcpy(f->kv + strlen(to) + 1, (const uint8_t *)k.mv_data + pl, al);
        memcpy(f->kv + f->klen, v.mv_data, v.mv_size);
        memcpy(f->kv + f->klen + f->vlen, k.mv_data, k.mv_size);
        *tail = f;
        tail = &f->next;
        n++;
    }
    mdb_cursor_close(cur);
    if (rc == MDB_NOTFOUND)
        rc = 0;
    for (struct feed *f = head; f != NULL && rc == 0; f = f->next) {
        MDB_val ok = {f->klen - strlen(to) - 1 + pl, f->kv + f->klen + f->vlen};
        MDB_val nk = {f->klen, f->kv}, nv = {f->vlen, f->kv + f->klen}, cv;
        if ((rc = mdb_del(txn, s->dbi, &ok, NULL)) != 0)
            break;
        rc = mdb_get(txn, s->dbi, &nk, &cv);
        if (rc != 0 && rc != MDB_NOTFOUND)
            break;
        int64_t have = rc == 0 ? sup_val_expires(&cv) : -1, got = sup_val_expires(&nv);
        rc = 0;
        if (have == 0 || (have > 0 && got != 0 && have >= got))
            continue; /* the entry there holds longer */
        rc = mdb_put(txn, s->dbi, &nk, &nv, 0);
    }
    while (head != NULL) {
        struct feed *next = head->next;
        free(head);
        head = next;
    }
    if (rc != 0) {
        mdb_txn_abort(txn);
        return sup_mdb_errno(rc);
    }
    if ((rc = mdb_txn_commit(txn)) != 0)
        return sup_mdb_errno(rc);
    return n;
}

/* suppress_move_scope, from and to as stored (from may be a scope that
 * needs folding: sup_fold_stored_scopes). */
static long
move_scope(struct suppress *s, const char *from, const char *to)
{
    uint8_t pfx[SUPPRESS_SCOPE_MAX + 1];
    size_t pl = sup_key_make(pfx, from, "");
    long total = 0;
    for (;;) {
        pthread_mutex_lock(&s->wlock);
        long n = move_batch(s, pfx, pl, to);
        pthread_mutex_unlock(&s->wlock);
        if (n < 0)
            return n;
        total += n;
        if (n < MOVE_BATCH)
            return total;
    }
}

long
suppress_move_scope(struct suppress *s, const char *from, const char *to)
{
    char f[SUPPRESS_SCOPE_MAX + 1], t[SUPPRESS_SCOPE_MAX + 1];
    if (from == NULL || to == NULL || sup_scope_fold(from, f) != 0 || sup_scope_fold(to, t) != 0 ||
        strcmp(f, t) == 0)
        return -EINVAL;
    return move_scope(s, f, t);
}

/* Lists stored under a scope with capitals (written before scopes were
 * folded, or by such a sluice run since) move to the scope in lowercase,
 * where every check now looks; an address on both keeps the entry that
 * holds longer. Walks the scopes, not the entries: one seek per scope.
 * At open, before any check. Returns the number of entries moved, or
 * -errno. */
long
sup_fold_stored_scopes(struct suppress *s)
{
    uint8_t from[SUPPRESS_SCOPE_MAX + 2]; /* where the walk goes on */
    size_t fl = 0;
    long total = 0;
    for (;;) {
        char found[SUPPRESS_SCOPE_MAX + 1] = "";
        MDB_txn *txn;
        MDB_cursor *cur;
        int rc = sup_cursor_open(s, MDB_RDONLY, &txn, &cur);
        if (rc != 0)
            return rc;
        MDB_val k = {fl, from}, v;
        rc = mdb_cursor_get(cur, &k, &v, fl > 0 ? MDB_SET_RANGE : MDB_FIRST);
        while (rc == 0) {
            const uint8_t *kp = k.mv_data, *z = memchr(kp, '\0', k.mv_size);
            size_t sl = z != NULL ? (size_t)(z - kp) : 0;
            if (z == NULL || sl == 0 || sl > SUPPRESS_SCOPE_MAX) { /* damaged: step over it */
                rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
                continue;
            }
            /* past this scope: its name and 0x01 (no scope has octets below 0x21) */
            memcpy(from, kp, sl);
            from[sl] = 0x01;
            fl = sl + 1;
            bool upper = false;
            for (size_t i = 0; i < sl && !upper; i++)
                upper = kp[i] >= 'A' && kp[i] <= 'Z';
            if (upper) {
                memcpy(found, kp, sl);
                found[sl] = '\0';
                break;
            }
            k = (MDB_val){fl, from};
            rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
        }
        mdb_cursor_close(cur);
        mdb_txn_abort(txn);
        if (rc != 0 && rc != MDB_NOTFOUND)
            return sup_mdb_errno(rc);
        if (found[0] == '\0')
            return total;
        char low[SUPPRESS_SCOPE_MAX + 1];
        for (size_t i = 0; i <= strlen(found); i++)
            low[i] = (char)tolower((unsigned char)found[i]);
        long n = move_scope(s, found, low);
        if (n < 0)
            return n;
        log_msg(LOG_NOTICE, "event=suppress_scope_folded from=%s to=%s entries=%ld", found, low, n);
        total += n;
    }
}
