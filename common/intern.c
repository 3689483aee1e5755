/*
 * intern: see intern.h. A name lives in one allocation that holds its
 * hash node and its text; the name → id direction is common/hash.h under
 * a mutex, the id → name direction an array of chunk pointers that are
 * written once (release) and read without a lock (acquire). Names made
 * through intern_id_bounded are counted apart, under the same mutex, so
 * that its bound holds exactly.
 *
 * Threading: as intern.h says.
 */
#include "common/intern.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/hash.h"

struct intern_entry {
    struct hash_node node; /* first: the table's entries are entries */
    uint32_t id;
    char name[];
};

struct intern {
    pthread_mutex_t mu;
    struct hash by_name;    /* struct intern_entry, under mu */
    uint32_t next;          /* the next id to give, under mu */
    _Atomic uint64_t refused;
    _Atomic uint32_t count;
    _Atomic uint32_t bounded;         /* names made by intern_id_bounded (written under mu) */
    _Atomic uint64_t bounded_refused; /* names it did not make: past its max */
    /* owned: chunk i holds ids i * INTERN_CHUNK .. + INTERN_CHUNK - 1 */
    struct intern_entry *_Atomic *_Atomic chunks[INTERN_MAX / INTERN_CHUNK];
};

static bool
entry_eq(const struct hash_node *n, const void *key)
{
    return strcmp(((const struct intern_entry *)n)->name, key) == 0;
}

struct intern *
intern_new(void)
{
    struct intern *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    pthread_mutex_init(&t->mu, NULL);
    hash_init(&t->by_name, entry_eq, 64);
    t->next = 1;
    return t;
}

struct intern *
intern_free(struct intern *t)
{
    if (t == NULL)
        return NULL;
    for (size_t c = 0; c < INTERN_MAX / INTERN_CHUNK; c++) {
        struct intern_entry *_Atomic *ch = atomic_load(&t->chunks[c]);
        if (ch == NULL)
            break;
        for (size_t i = 0; i < INTERN_CHUNK; i++)
            free(atomic_load(&ch[i]));
        free((void *)ch);
    }
    hash_fini(&t->by_name);
    pthread_mutex_destroy(&t->mu);
    free(t);
    return NULL;
}

/* make: a name not in t is made; bounded: only while fewer than max
 * names were made so (*over: the refusals past max so far, this one
 * included; 0 when this call was not one). */
static uint32_t
lookup(struct intern *t, const char *name, bool make, bool bounded, uint32_t max, uint64_t *over)
{
    if (name == NULL || name[0] == '\0')
        return 0;
    size_t len = strlen(name);
    if (len > INTERN_NAME_MAX) {
        atomic_fetch_add(&t->refused, 1);
        return 0;
    }
    uint64_t h = hash_bytes(name, len);
    uint32_t id = 0;
    pthread_mutex_lock(&t->mu);
    struct intern_entry *e = (struct intern_entry *)hash_find(&t->by_name, h, name);
    if (e != NULL || !make) {
        id = e ? e->id : 0;
        goto out;
    }
    if (bounded && atomic_load_explicit(&t->bounded, memory_order_relaxed) >= max) {
        *over = atomic_fetch_add(&t->bounded_refused, 1) + 1;
        goto out;
    }
    if (t->next >= INTERN_MAX)
        goto refused;
    size_t c = t->next / INTERN_CHUNK;
    struct intern_entry *_Atomic *ch = atomic_load_explicit(&t->chunks[c], memory_order_relaxed);
    if (ch == NULL) {
        ch = calloc(INTERN_CHUNK, sizeof(*ch));
        if (ch == NULL)
            goto refused;
        atomic_store_explicit(&t->chunks[c], ch, memory_order_release);
    }
    e = malloc(sizeof(*e) + len + 1);
    if (e == NULL)
        goto refused;
    memcpy(e->name, name, len + 1);
    e->node.hash = h;
    e->id = t->next;
    if (hash_insert(&t->by_name, &e->node) < 0) {
        free(e);
        goto refused;
    }
    atomic_store_explicit(&ch[t->next % INTERN_CHUNK], e, memory_order_release);
    id = t->next++;
    atomic_fetch_add(&t->count, 1);
    if (bounded)
        atomic_fetch_add(&t->bounded, 1);
    goto out;
refused:
    atomic_fetch_add(&t->refused, 1);
out:
    pthread_mutex_unlock(&t->mu);
    return id;
}

uint32_t
intern_id(struct intern *t, const char *name)
{
    return lookup(t, name, true, false, 0, NULL);
}

uint32_t
intern_id_bounded(struct intern *t, const char *name, uint32_t max, uint64_t *over)
{
    *over = 0;
    return lookup(t, name, true, true, max, over);
}

uint32_t
intern_find(struct intern *t, const char *name)
{
    return lookup(t, name, false, false, 0, NULL);
}

const char *
intern_name(const struct intern *t, uint32_t id)
{
    if (t == NULL || id == 0 || id >= INTERN_MAX)
        return NULL;
    struct intern_entry *_Atomic *ch =
        atomic_load_explicit(&((struct intern *)t)->chunks[id / INTERN_CHUNK], memory_order_acquire);
    if (ch == NULL)
        return NULL;
    struct intern_entry *e = atomic_load_explicit(&ch[id % INTERN_CHUNK], memory_order_acquire);
    return e ? e->name : NULL;
}

void
intern_counts(const struct intern *t, uint64_t *names, uint64_t *refused)
{
    *names = atomic_load(&((struct intern *)t)->count);
    *refused = atomic_load(&((struct intern *)t)->refused);
}

void
intern_bounded_counts(const struct intern *t, uint64_t *made, uint64_t *refused)
{
    *made = atomic_load(&((struct intern *)t)->bounded);
    *refused = atomic_load(&((struct intern *)t)->bounded_refused);
}
