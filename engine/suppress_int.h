/*
 * suppress_int.h: what engine/suppress.c (the list), engine/suppress_csv.c
 * (its CSV import and export), engine/suppress_notes.c (the spool's
 * notes, copied to the list) and engine/suppress_scope.c (a scope's
 * moves) share. Not a public header.
 */
#ifndef SLUICE_ENGINE_SUPPRESS_INT_H
#define SLUICE_ENGINE_SUPPRESS_INT_H

#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/suppress.h"

#define KEY_MAX       (SUPPRESS_SCOPE_MAX + 1 + SUPPRESS_ADDR_MAX)
#define VAL_HDR       20
#define VAL_MAX       (VAL_HDR + SUPPRESS_NOTE_MAX)
#define IMPORT_BATCH  250000   /* entries per write transaction of an import */
#define PURGE_BATCH   10000    /* expired entries deleted per write transaction */
#define PURGE_EVERY_MS (3600ULL * 1000)
#define MOVE_BATCH     10000 /* entries moved per write transaction (suppress_move_scope) */
#define NOTES_BATCH    4096  /* spool notes written to the list per transaction */
#define NOTES_RETRY_MS 5000  /* after a write of notes failed (the list's map full) */

struct trim_wait; /* a pump's trim of the spool's notes (suppress_notes.c) */

struct feed {
    struct feed *next;
    uint16_t klen, vlen;
    uint8_t kv[]; /* key, then value */
};

struct suppress {
    struct suppress_config cfg; /* a copy: strings owned */
    MDB_env *env;               /* owned */
    MDB_dbi dbi;
    pthread_mutex_t wlock;      /* one writer at a time */

    /* feeds for the writer thread */
    pthread_mutex_t flock;
    pthread_cond_t fcv;         /* work for the thread */
    pthread_cond_t dcv;         /* a batch committed */
    struct feed *fhead, **ftail; /* owned list */
    unsigned nfeed;
    uint64_t fseq_in, fseq_done; /* feeds queued, feeds committed (or given up) */
    bool stop;
    bool warm;                  /* walk the list again (after an import) */
    atomic_bool closing;        /* cuts a walk short */
    pthread_t thread;
    bool thread_started;

    /* notes: entries committed with the spool's outcomes (suppress.h) */
    pthread_mutex_t plock;      /* one pump at a time; guards queue and note_from */
    struct queue *queue;        /* borrowed: attached until suppress_detach_queue */
    uint64_t note_from;         /* the first note not yet in the list */
    _Atomic bool notes_untrimmed; /* pumps leave the notes in the spool, and one waiting
                                   * for its trim gives it up (a stop's spool that
                                   * answers nothing: notes_trim) */
    int notes_kick_fd;            /* owned eventfd: wakes a pump waiting for its trim when
                                   * notes_untrimmed is set; -1: none */
    struct trim_wait *notes_left; /* owned, under plock: trims given up, their ports
                                   * freed by suppress_close once answered */
    bool notes_due;             /* guarded by flock: the spool committed notes */
    _Atomic uint64_t notes_retry_ms; /* CLOCK_MONOTONIC ms: a write of notes failed, the
                                      * writer tries again then; 0: none failed */
    bool test_hold;             /* SLUICE_TEST_SUPPRESS_HOLD: the writer writes nothing */

    _Atomic uint64_t checks, hits, added, removed, feed_dropped;
};

/* addr normalised by cfg's rules into out ("local@domain" or "@domain");
 * 0 or -EINVAL. */
int sup_normalize(const struct suppress_config *cfg, const char *addr, char *out, size_t outlen);
/* Whether s is UTF-8 (ASCII is): an address that is not matches no
 * recipient (RCPT takes only UTF-8) and is not stored. */
bool sup_utf8_text(const char *s);
/* Whether a normalised address (or "@domain") may be stored: UTF-8, and a
 * mailbox (with "x" before a whole domain's "@") as RCPT takes one, for
 * an entry no recipient could match is only noise (a bare word with ':'
 * or '$' was taken as a domain: a file that is no list, imported whole).
 * Its path limit is not applied to a domain in A-labels: RCPT counted it
 * as the client wrote it, perhaps in U-labels, shorter.
 * 0, -EILSEQ (not UTF-8) or -EINVAL. */
int sup_storable(const char *norm);
/* scope (NULL: global) in lowercase into out (SUPPRESS_SCOPE_MAX + 1
 * octets); -EINVAL for a name that is no scope. */
int sup_scope_fold(const char *scope, char *out);
/* An entry's key (scope, NUL, address) and value; their lengths. */
size_t sup_key_make(uint8_t *k, const char *scope, const char *norm);
size_t sup_val_make(uint8_t *v, enum suppress_reason reason, int64_t added, int64_t expires,
                    const char *note);
/* An LMDB code as -errno. */
int sup_mdb_errno(int rc);
/* A transaction (flags: 0 or MDB_RDONLY) and a cursor on the list in it:
 * 0, or -errno with nothing left open. The caller closes the cursor and
 * ends the transaction. */
int sup_cursor_open(struct suppress *s, unsigned flags, MDB_txn **txn, MDB_cursor **cur);
/* A stored value's expiry (Unix ms, 0: never; 0 for a value too short). */
int64_t sup_val_expires(const MDB_val *v);
/* Move the entries stored under scopes with capitals to the scope in
 * lowercase (engine/suppress_scope.c). At open, before any check and
 * before the writer thread starts. How many moved, or -errno. */
long sup_fold_stored_scopes(struct suppress *s);
/* Commit the feeds of list in one write transaction, wlock held (the
 * caller frees them): 0 or -errno. */
int sup_write_pairs(struct suppress *s, struct feed *list);
/* An entry as a feed (malloc'd, the caller frees it; its added time now);
 * fold: its local part in lowercase. NULL with *err -EINVAL, -EILSEQ (not
 * UTF-8) or -ENOMEM. */
struct feed *sup_feed_make(const struct suppress *s, const char *scope, const char *addr,
                           enum suppress_reason reason, int64_t expires_at, const char *note,
                           bool fold, int *err);
/* The entry a bounce of class cls asks for under [suppress]
 * on_invalid_recipient, as sup_feed_make's; NULL: none (*err 0), or a bad
 * address. s may be NULL. */
struct feed *sup_bounce_entry(const struct suppress *s, const char *tenant, const char *addr,
                              enum bounce_class cls, const char *text, int *err);
/* Copy the spool's notes to the list and trim them (engine/suppress_notes.c);
 * force: even before a failed copy's retry time. How many, or -errno. */
long sup_notes_pump(struct suppress *s, bool force);
/* The trims the pumps gave up (notes_left) whose ports the spool answered,
 * freed; the others left to the exit (the spool holds them). After the
 * spool's close, no pump running. */
void sup_notes_left_free(struct suppress *s);

#endif
