/*
 * engine_conn: the connections per client address (struct conn_table,
 * engine.h): one table shared by every worker's submission server,
 * counting the sessions of each client address (an IPv6 one by its
 * prefix) against [server] max_clients_per_ip (and [bounce]'s). Open
 * addressing; a slot whose count went back to 0 stays idle, so that probe
 * chains stay whole, until a rebuild drops it.
 *
 * Threading: any thread, under the table's one lock (accepting is not
 * hot enough for anything finer).
 */
#include "engine/engine.h"

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* ---- connections per client address ---- */

void
conn_table_key(const struct sockaddr *sa, unsigned v6_prefix, uint8_t key[16])
{
    memset(key, 0, 16);
    if (sa->sa_family == AF_INET) {
        /* as ::ffff:a.b.c.d, the form a dual-stack socket reports */
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        memcpy(key, a, 16);
        if (IN6_IS_ADDR_V4MAPPED(a))
            return;
        if (v6_prefix > 128)
            v6_prefix = 128;
        for (unsigned bit = v6_prefix; bit < 128; bit++)
            key[bit / 8] &= (uint8_t) ~(0x80u >> (bit % 8));
    }
}

static uint32_t
addr_hash(const uint8_t key[16])
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < 16; i++)
        h = (h ^ key[i]) * 16777619u;
    return h;
}

enum { SLOT_EMPTY, SLOT_LIVE, SLOT_IDLE }; /* IDLE: count 0, keeps probe chains whole */

static struct conn_slot *
slot_find(struct conn_table *t, const uint8_t key[16], bool insert)
{
    if (t->cap == 0)
        return NULL;
    uint32_t mask = t->cap - 1;
    struct conn_slot *reuse = NULL;
    for (uint32_t i = addr_hash(key) & mask, n = 0; n < t->cap; i = (i + 1) & mask, n++) {
        struct conn_slot *s = &t->slots[i];
        if (s->state == SLOT_EMPTY)
            return insert ? (reuse ? reuse : s) : NULL;
        if (memcmp(s->addr, key, 16) == 0)
            return s; /* live, or idle with our address: take it again */
        if (s->state == SLOT_IDLE && reuse == NULL)
            reuse = s;
    }
    return insert ? reuse : NULL;
}

/* Rebuild with room for four times the live entries (idle ones are
 * dropped), so that the table follows the clients connected now, not every
 * address ever seen. */
static int
table_rebuild(struct conn_table *t)
{
    uint32_t live = 0;
    for (uint32_t i = 0; i < t->cap; i++)
        live += t->slots[i].state == SLOT_LIVE;
    uint32_t cap = 1024;
    while (cap < 4 * (live + 1))
        cap *= 2;
    struct conn_slot *old = t->slots;
    uint32_t oldcap = t->cap;
    t->slots = calloc(cap, sizeof(*t->slots));
    if (t->slots == NULL) {
        t->slots = old;
        return -ENOMEM;
    }
    t->cap = cap;
    t->used = 0;
    for (uint32_t i = 0; i < oldcap; i++)
        if (old[i].state == SLOT_LIVE) {
            *slot_find(t, old[i].addr, true) = old[i];
            t->used++;
        }
    free(old);
    return 0;
}

bool
conn_table_add(struct conn_table *t, const uint8_t key[16], unsigned max)
{
    pthread_mutex_lock(&t->lock);
    struct conn_slot *s = slot_find(t, key, false);
    bool ok = true;
    if (s != NULL && s->state == SLOT_LIVE) {
        if (s->count >= max)
            ok = false;
        else
            s->count++;
    } else {
        /* At most half the slots taken (live or idle): else rebuild. */
        if ((t->used + 1) * 2 > t->cap && table_rebuild(t) < 0) {
            ok = false;
        } else {
            s = slot_find(t, key, true);
            if (s->state == SLOT_EMPTY)
                t->used++;
            memcpy(s->addr, key, 16);
            s->state = SLOT_LIVE;
            s->count = 1;
        }
    }
    pthread_mutex_unlock(&t->lock);
    return ok;
}

void
conn_table_remove(struct conn_table *t, const uint8_t key[16])
{
    pthread_mutex_lock(&t->lock);
    struct conn_slot *s = slot_find(t, key, false);
    if (s != NULL && s->state == SLOT_LIVE && --s->count == 0)
        s->state = SLOT_IDLE;
    pthread_mutex_unlock(&t->lock);
}
