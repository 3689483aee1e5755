/*
 * config_gen: which configs are alive, and freeing those no party can
 * reach (see config_gen.h for the rule and why it is safe).
 *
 * Threading: one mutex over the list and the workers' holds; the
 * current generation is also an atomic, read without it.
 */
#include "engine/config_gen.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "engine/config.h"
#include "engine/owner.h"

struct gen {
    struct config *cfg; /* owned unless first */
    uint64_t gen;
    unsigned readers; /* read sections entered while this was current */
    bool pinned;      /* kept until config_gens_free */
    bool first;       /* the caller's: never freed here */
};

struct config_gens {
    pthread_mutex_t lock;
    struct gen *v; /* owned array, oldest first */
    unsigned n, cap;
    _Atomic uint64_t cur;
    unsigned nworkers;
    struct {
        uint64_t view; /* the worker's own */
        /* What it published, under lock: it points into hold or newer,
         * and into the generations of held, older ones, exactly. */
        uint64_t hold;
        uint64_t held[CONFIG_GENS_HELD_MAX];
        unsigned nheld;
    } * w; /* owned array of nworkers */
};

struct config_gens *
config_gens_new(const struct config *first, unsigned nworkers)
{
    struct config_gens *g = calloc(1, sizeof(*g));
    if (g == NULL)
        return NULL;
    g->cap = 4;
    g->v = calloc(g->cap, sizeof(*g->v));
    g->w = calloc(nworkers > 0 ? nworkers : 1, sizeof(*g->w));
    if (g->v == NULL || g->w == NULL) {
        free(g->v);
        free(g->w);
        free(g);
        return NULL;
    }
    pthread_mutex_init(&g->lock, NULL);
    g->v[0] = (struct gen){(struct config *)(uintptr_t)first, 1, 0, true, true};
    g->n = 1;
    atomic_store(&g->cur, 1);
    g->nworkers = nworkers;
    for (unsigned i = 0; i < nworkers; i++) {
        g->w[i].view = 1;
        g->w[i].hold = 1;
    }
    return g;
}

struct config_gens *
config_gens_free(struct config_gens *g)
{
    if (g == NULL)
        return NULL;
    for (unsigned i = 0; i < g->n; i++)
        if (!g->v[i].first)
            config_free(g->v[i].cfg);
    pthread_mutex_destroy(&g->lock);
    free(g->v);
    free(g->w);
    free(g);
    return NULL;
}

int
config_gens_reserve(struct config_gens *g)
{
    pthread_mutex_lock(&g->lock);
    int rc = 0;
    if (g->n == g->cap) {
        struct gen *v = realloc(g->v, 2 * g->cap * sizeof(*v));
        if (v == NULL) {
            rc = -ENOMEM;
        } else {
            g->v = v;
            g->cap *= 2;
        }
    }
    pthread_mutex_unlock(&g->lock);
    return rc;
}

uint64_t
config_gens_swap(struct config_gens *g, const struct config *ncfg)
{
    pthread_mutex_lock(&g->lock);
    /* config_gens_reserve made the room; without it, the old way: kept
     * to the end (a leak, never a free too early). */
    uint64_t gen = atomic_load(&g->cur) + 1;
    if (g->n < g->cap)
        g->v[g->n++] = (struct gen){(struct config *)(uintptr_t)ncfg, gen, 0, false, false};
    /* After e->cfg was stored (the caller did): see config_gen.h. */
    atomic_store(&g->cur, gen);
    pthread_mutex_unlock(&g->lock);
    return gen;
}

void
config_gens_pin(struct config_gens *g, const struct config *cfg)
{
    pthread_mutex_lock(&g->lock);
    for (unsigned i = 0; i < g->n; i++)
        if (g->v[i].cfg == cfg)
            g->v[i].pinned = true;
    pthread_mutex_unlock(&g->lock);
}

uint64_t
config_gens_current(struct config_gens *g)
{
    return g != NULL ? atomic_load(&g->cur) : 0;
}

uint64_t
config_gens_enter(struct config_gens *g)
{
    if (g == NULL)
        return 0;
    pthread_mutex_lock(&g->lock);
    /* The current one is in the list: it is the last (or, after a swap
     * without room, the last is older: counting there is safe too). */
    g->v[g->n - 1].readers++;
    uint64_t token = g->v[g->n - 1].gen;
    pthread_mutex_unlock(&g->lock);
    return token;
}

void
config_gens_leave(struct config_gens *g, uint64_t token)
{
    if (g == NULL)
        return;
    pthread_mutex_lock(&g->lock);
    /* Not freed meanwhile: its readers count kept it. */
    for (unsigned i = 0; i < g->n; i++)
        if (g->v[i].gen == token && g->v[i].readers > 0) {
            g->v[i].readers--;
            break;
        }
    pthread_mutex_unlock(&g->lock);
}

void
config_gens_set_view(struct config_gens *g, unsigned w, uint64_t view)
{
    if (g != NULL && w < g->nworkers)
        g->w[w].view = view;
}

uint64_t
config_gens_view(const struct config_gens *g, unsigned w)
{
    return g != NULL && w < g->nworkers ? g->w[w].view : 0;
}

void
config_gens_hold(struct config_gens *g, unsigned w, uint64_t hold, const uint64_t *held,
                 unsigned nheld)
{
    if (g == NULL || w >= g->nworkers)
        return;
    pthread_mutex_lock(&g->lock);
    g->w[w].hold = hold;
    g->w[w].nheld = 0;
    for (unsigned i = 0; i < nheld; i++) {
        if (held[i] >= hold)
            continue;
        if (g->w[w].nheld == CONFIG_GENS_HELD_MAX) {
            /* More than it can list: everything from the oldest on. */
            for (unsigned k = 0; k < nheld; k++)
                if (held[k] < g->w[w].hold)
                    g->w[w].hold = held[k];
            g->w[w].nheld = 0;
            break;
        }
        g->w[w].held[g->w[w].nheld++] = held[i];
    }
    pthread_mutex_unlock(&g->lock);
}

static bool
within(const void *p, const void *base, size_t n, size_t size)
{
    uintptr_t a = (uintptr_t)p, b = (uintptr_t)base;
    return base != NULL && a >= b && a < b + n * size;
}

/* The entry whose config holds p (in says whether one does). */
static const struct gen *
gen_of(struct config_gens *g, const void *p, bool (*in)(const struct config *, const void *))
{
    for (unsigned i = 0; i < g->n; i++)
        if (in(g->v[i].cfg, p))
            return &g->v[i];
    return NULL;
}

static bool
in_tenants(const struct config *c, const void *p)
{
    return within(p, c->tenants, c->ntenants, sizeof(*c->tenants));
}

static bool
in_pools(const struct config *c, const void *p)
{
    return within(p, c->pools, c->npools, sizeof(*c->pools));
}

static bool
in_sources(const struct config *c, const void *p)
{
    return within(p, c->sources, c->nsources, sizeof(*c->sources));
}

uint64_t
config_gens_of_owner(struct config_gens *g, const struct owner *o)
{
    if (g == NULL)
        return 0;
    if (o->tenant == NULL && o->pool == NULL)
        return config_gens_current(g);
    pthread_mutex_lock(&g->lock);
    const struct gen *x =
        o->tenant != NULL ? gen_of(g, o->tenant, in_tenants) : gen_of(g, o->pool, in_pools);
    uint64_t gen = x != NULL ? x->gen : 0;
    pthread_mutex_unlock(&g->lock);
    return gen;
}

uint64_t
config_gens_of_source(struct config_gens *g, const struct mx_policy *src, const struct config **cfg)
{
    *cfg = NULL;
    if (g == NULL)
        return 0;
    pthread_mutex_lock(&g->lock);
    const struct gen *x = src != NULL ? gen_of(g, src, in_sources) : &g->v[g->n - 1];
    uint64_t gen = 0;
    if (x != NULL) {
        gen = x->gen;
        *cfg = x->cfg;
    }
    pthread_mutex_unlock(&g->lock);
    return gen;
}

static unsigned
collect_some(struct config_gens *g)
{
    struct config *drop[16];
    unsigned ndrop = 0;
    pthread_mutex_lock(&g->lock);
    uint64_t cur = atomic_load(&g->cur), oldest = cur;
    for (unsigned i = 0; i < g->nworkers; i++)
        if (g->w[i].hold < oldest)
            oldest = g->w[i].hold;
    for (unsigned i = 0; i < g->n; i++)
        if (g->v[i].readers > 0 && g->v[i].gen < oldest)
            oldest = g->v[i].gen;
    unsigned k = 0;
    for (unsigned i = 0; i < g->n; i++) {
        struct gen *x = &g->v[i];
        bool held = false;
        for (unsigned w = 0; w < g->nworkers && !held; w++)
            for (unsigned h = 0; h < g->w[w].nheld && !held; h++)
                held = g->w[w].held[h] == x->gen;
        if (x->gen < oldest && !held && x->gen != cur && !x->pinned && !x->first &&
            ndrop < sizeof(drop) / sizeof(drop[0]))
            drop[ndrop++] = x->cfg;
        else
            g->v[k++] = *x;
    }
    g->n = k;
    pthread_mutex_unlock(&g->lock);
    /* Outside the lock: a config's free takes its time (rule sets). */
    for (unsigned i = 0; i < ndrop; i++)
        config_free(drop[i]);
    return ndrop;
}

unsigned
config_gens_collect(struct config_gens *g)
{
    /* A few at a time (no allocation here), as many rounds as it takes. */
    unsigned n = 0, k;
    while ((k = collect_some(g)) > 0)
        n += k;
    return n;
}

unsigned
config_gens_alive(struct config_gens *g)
{
    if (g == NULL)
        return 0;
    pthread_mutex_lock(&g->lock);
    unsigned n = g->n;
    pthread_mutex_unlock(&g->lock);
    return n;
}

bool
config_gens_pending(struct config_gens *g)
{
    pthread_mutex_lock(&g->lock);
    bool pending = false;
    for (unsigned i = 0; i < g->n && !pending; i++)
        pending = g->v[i].gen != atomic_load(&g->cur) && !g->v[i].pinned && !g->v[i].first;
    pthread_mutex_unlock(&g->lock);
    return pending;
}
