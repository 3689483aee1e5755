/*
 * shaping_int.h: what the files of the shaping table share (not a public
 * header: engine/shaping.c and engine/shaping_redis.c include it;
 * everyone else goes through engine/shaping.h).
 *
 *   engine/shaping.c       the table of active actions (under its lock):
 *                          actions as text, what workers and operators
 *                          call, the state file, the bounce hook, the
 *                          keeper thread, open and close;
 *   engine/shaping_redis.c the sharing through Redis: connect, catch-up,
 *                          publish, the stream read (the keeper's);
 *   engine/shaping_conf.c  the rules (shaping.h), apart from the table.
 *
 * Threading: as shaping.c says; s->lock guards the table.
 */
#ifndef SLUICE_ENGINE_SHAPING_INT_H
#define SLUICE_ENGINE_SHAPING_INT_H

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/redis.h"
#include "engine/shaping.h"

#define KEEPER_TICK_MS     100
#define READ_POLL_MS       20  /* the stream is read this often while Redis is up */
#define STATE_SAVE_MS      250 /* changes reach the state file within this (fsync off the
                                * path of what other nodes wait for) */
#define REDIS_BACKOFF_MAX  5000
#define LINE_MAX_LEN       1024
#define IGNORED_IDS_MAX    256  /* distinct ignored actions remembered, to count each once */
#define RECHECK_MAX_MS     1000 /* a worker asks again at least this often: clears from
                                 * other nodes and operators act within it */
#define MX_GROUP_HOST_MAX  (SHAPING_NAME_MAX - 4) /* of a host in a group "mx:HOST" (with
                                                   * the NUL): a longer one is cut there */
#define OUTBOX_MAX         (2 * SHAPING_ACTIONS_MAX) /* changes waiting for Redis: one per
                                                      * action id (see outbox_push) */

struct outbox_item {
    struct outbox_item *next;
    bool clear;
    bool clear_first; /* an add that followed a clear of its id: the clear goes out first */
    struct shaping_action a;
};

struct shaping {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    struct shaping_action *act; /* owned: nact entries */
    size_t nact, cap;
    _Atomic size_t live;        /* nact, read without the lock */
    bool dirty;                 /* the state file is behind */
    bool stop;
    struct outbox_item *out, **out_tail; /* owned: changes to publish */
    size_t nout;                /* items in out (st.outbox) */
    char (*gone)[17];           /* owned (with Redis): ids of actions that ended here, for
                                 * the keeper to take out of the hash if they ended there */
    size_t ngone;               /* at most SHAPING_ACTIONS_MAX */
    uint64_t outbox_dropped;    /* changes dropped at OUTBOX_MAX (logged on the first) */
    char *state_path;           /* owned, or NULL */
    char node[64];
    char instance[17];          /* this process: its own stream entries are skipped */
    /* Redis (keeper only, but for redis_up) */
    bool redis_on;
    struct redis_endpoint ep;
    char prefix[64];
    uint64_t timeout_ms;
    unsigned stream_max;
    redisContext *rc;           /* owned: keeper's */
    char last_id[64];           /* of the stream, read up to */
    uint64_t next_try, backoff; /* mono ms */
    bool redis_up;
    pthread_t keeper;
    bool keeper_started;
    struct shaping_stats st;
    void (*on_event)(void *arg, const struct shaping_action *a, bool started, const char *why);
    void *on_event_arg;
    struct outbox_item *bounces, **bounces_tail; /* owned: bounce actions started, for the
                                                  * hook (the keeper's) */
    pthread_mutex_t hook_lock;  /* held while the bounce hook runs, and to change it */
    void (*on_bounce)(void *arg, const struct shaping_action *a);
    void *on_bounce_arg;
    bool hook_set;              /* on_bounce is set (under lock: the keeper's wait) */
    char unknown[8][70];        /* kinds/scopes of actions ignored, logged already */
    unsigned nunknown;
    char ignored_ids[IGNORED_IDS_MAX][17]; /* ids of actions ignored, counted already: the
                                            * hash is read again at each (re)connect */
    unsigned nignored_ids, ignored_next;   /* a ring: the oldest id is forgotten first */
};

/* shaping.c: the table */
/* An action of a kind or scope this node does not know (a newer node's):
 * ignored, counted once per id, logged once per kind and scope. Under
 * lock. */
void shaping_note_unknown(struct shaping *s, const char *line);
/* The active action of that id, or NULL. Under lock. */
struct shaping_action *shaping_find(struct shaping *s, const char *id);
/* a started here (how: rule, operator, state_file, or how it arrived):
 * the event hook told and event=shaping_started logged. */
void shaping_log_started(struct shaping *s, const struct shaping_action *a, const char *how);
/* Take the whole queue of changes for Redis (the caller frees it).
 * Under lock. */
struct outbox_item *shaping_outbox_take(struct shaping *s);
/* Insert or extend a (the later end wins). Returns 1 when new, 2 when
 * extended, 0 when nothing changed, -ENOSPC when the table is full.
 * Under lock. */
int shaping_upsert(struct shaping *s, const struct shaping_action *a);
/* The action at index i ends (why: logged as its reason). Under lock. */
void shaping_remove_at(struct shaping *s, size_t i, const char *why);

/* shaping_redis.c: Redis (the keeper's) */
/* One pass of the keeper with [redis] url: (re)connect when due, publish
 * what waits, take out of the hash what ended here, read the stream. */
void shaping_redis_pass(struct shaping *s);

#endif
