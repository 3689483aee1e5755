/*
 * suppress_int.h: what engine/suppress.c (the list) and
 * engine/suppress_csv.c (its CSV import and export) share. Not a public
 * header.
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

    _Atomic uint64_t checks, hits, added, removed, feed_dropped;
};

/* addr normalised by cfg's rules into out ("local@domain" or "@domain");
 * 0 or -EINVAL. */
int sup_normalize(const struct suppress_config *cfg, const char *addr, char *out, size_t outlen);
/* scope (NULL: global) in lowercase into out (SUPPRESS_SCOPE_MAX + 1
 * octets); -EINVAL for a name that is no scope. */
int sup_scope_fold(const char *scope, char *out);
/* An entry's key (scope, NUL, address) and value; their lengths. */
size_t sup_key_make(uint8_t *k, const char *scope, const char *norm);
size_t sup_val_make(uint8_t *v, enum suppress_reason reason, int64_t added, int64_t expires,
                    const char *note);
/* An LMDB code as -errno. */
int sup_mdb_errno(int rc);

#endif
