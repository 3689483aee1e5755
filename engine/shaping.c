/*
 * shaping: the active shaping actions of this process (see shaping.h),
 * their expiry, their state file and their sharing through Redis (the
 * Redis side is shaping_redis.c; shaping_int.h: what the two share; the
 * rules are shaping_conf.c's).
 *
 * One table under one lock. An action's id is a hash of its rule and
 * scope, so that the same rule firing for the same scope on two nodes
 * (or twice on one) is one action: the later end wins. Workers read the
 * table when they open a connection or start a transaction
 * (shaping_check); while nothing is active an atomic count answers.
 *
 * The keeper thread, every KEEPER_TICK_MS or when woken:
 *   - ends the actions whose time is over (logged: event=shaping_ended);
 *   - writes the table to the state file in the spool (a temporary file,
 *     fsync, rename) when it changed, at most every STATE_SAVE_MS, and at
 *     close: actions survive a restart, with or without Redis (a crash
 *     loses at most the last STATE_SAVE_MS of changes of this node, which
 *     Redis still has);
 *   - with [redis] url: shares them. Why a stream and a hash, not pub/sub:
 *     a hash (PREFIXshaping:active, id -> the action as one line) holds
 *     what is active now, read whole (HGETALL) at every connect, so a
 *     node that starts, or comes back after Redis was away, catches up on
 *     everything however long it missed (an action that ends leaves it:
 *     each node takes out what ended here if it ended there too, by a
 *     compare-and-delete script, and the catch-up what ended while it
 *     was away); a stream (PREFIXshaping:log,
 *     capped at stream_max entries) carries each change (add, clear) in
 *     order, read with XREAD from the last id seen every READ_POLL_MS
 *     (no BLOCK: see redis_read), so that every node applies a change
 *     within a few tens of ms. Pub/sub
 *     would lose what is sent while a node is disconnected, and would need
 *     the same hash anyway. What this node changed while Redis was away is
 *     written to the hash when it is back (merged first: the later end wins);
 *     meanwhile one change per action id waits (outbox_push), not one per
 *     extension.
 *     The keeper's connection is blocking (hiredis sync API), off the
 *     workers, as warmup.c's keeper.
 *   - Redis away: the table keeps working on this node (local only), and
 *     the keeper reconnects with backoff; event=shaping_redis_down/up.
 *   - hands each bounce action that started here (whatever its origin) to
 *     the bounce hook, outside the lock: the engine bounces what already
 *     waits in the spool for its scope (shaping_set_bounce_hook).
 *
 * Threading: any thread; the keeper is the only one doing I/O.
 */

#include "engine/shaping.h"

#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/redis.h"
#include "engine/shaping_int.h"

/* ---- actions as text ---- */

static void
clean_copy(char *dst, size_t cap, const char *src)
{
    size_t n = 0;
    for (; src != NULL && *src != '\0' && n + 1 < cap; src++)
        dst[n++] = (*src == '\t' || *src == '\n' || *src == '\r' || (unsigned char)*src < 0x20)
                       ? ' '
                       : *src;
    dst[n] = '\0';
}

int
shaping_action_format(const struct shaping_action *a, char *buf, size_t cap)
{
    int n = snprintf(buf, cap,
                     "id=%s\tkind=%s\tscope=%s\tvalue=%u\tsource=%s\tgroup=%s\tdomain=%s\t"
                     "tenant=%s\trule=%s\torigin=%s\tstarted=%llu\tuntil=%llu\tper=%u\ttrigger=%s",
                     a->id, shaping_kind_str(a->kind), shaping_scope_str(a->scope), a->value,
                     a->source, a->group, a->domain, a->tenant, a->rule, a->origin,
                     (unsigned long long)a->started_ms, (unsigned long long)a->until_ms,
                     a->per_ms, a->trigger);
    return n < 0 || (size_t)n >= cap ? -ENOSPC : n;
}

int
shaping_action_parse(const char *line, struct shaping_action *a)
{
    memset(a, 0, sizeof(*a));
    bool have_id = false, have_kind = false, have_until = false;
    bool kind_unknown = false, scope_unknown = false;
    const char *s = line;
    while (*s != '\0' && *s != '\n') {
        const char *e = s;
        while (*e != '\0' && *e != '\t' && *e != '\n')
            e++;
        const char *eq = memchr(s, '=', (size_t)(e - s));
        if (eq != NULL) {
            size_t kl = (size_t)(eq - s), vl = (size_t)(e - eq - 1);
            char v[SHAPING_TEXT_MAX + 64];
            if (vl >= sizeof(v))
                vl = sizeof(v) - 1;
            memcpy(v, eq + 1, vl);
            v[vl] = '\0';
#define KEY(k) (kl == sizeof(k) - 1 && memcmp(s, k, kl) == 0)
            if (KEY("id")) {
                have_id = strlen(v) == 16 && strspn(v, "0123456789abcdef") == 16;
                memcpy(a->id, v, have_id ? 17 : 0);
            } else if (KEY("kind")) {
                for (unsigned k = 0; k < SHAPING_KIND_COUNT; k++)
                    if (strcmp(v, shaping_kind_str((enum shaping_kind)k)) == 0) {
                        a->kind = (enum shaping_kind)k;
                        have_kind = true;
                    }
                kind_unknown = !have_kind;
            } else if (KEY("scope")) {
                scope_unknown = true;
                for (unsigned k = 0; k < SHAPING_SCOPE_COUNT; k++)
                    if (strcmp(v, shaping_scope_str((enum shaping_scope)k)) == 0) {
                        a->scope = (enum shaping_scope)k;
                        scope_unknown = false;
                    }
            } else if (KEY("value")) {
                a->value = (unsigned)strtoul(v, NULL, 10);
            } else if (KEY("per")) {
                a->per_ms = (unsigned)strtoul(v, NULL, 10);
            } else if (KEY("source")) {
                clean_copy(a->source, sizeof(a->source), v);
            } else if (KEY("group")) {
                clean_copy(a->group, sizeof(a->group), v);
            } else if (KEY("domain")) {
                clean_copy(a->domain, sizeof(a->domain), v);
            } else if (KEY("tenant")) {
                clean_copy(a->tenant, sizeof(a->tenant), v);
            } else if (KEY("rule")) {
                clean_copy(a->rule, sizeof(a->rule), v);
            } else if (KEY("origin")) {
                clean_copy(a->origin, sizeof(a->origin), v);
            } else if (KEY("started")) {
                a->started_ms = strtoull(v, NULL, 10);
            } else if (KEY("until")) {
                a->until_ms = strtoull(v, NULL, 10);
                have_until = a->until_ms != 0;
            } else if (KEY("trigger")) {
                /* the last field: the rest of the line */
                size_t tl = 0;
                const char *t = eq + 1;
                while (t[tl] != '\0' && t[tl] != '\n')
                    tl++;
                char tb[SHAPING_TEXT_MAX];
                if (tl >= sizeof(tb))
                    tl = sizeof(tb) - 1;
                memcpy(tb, t, tl);
                tb[tl] = '\0';
                clean_copy(a->trigger, sizeof(a->trigger), tb);
                break;
            }
#undef KEY
        }
        s = *e == '\t' ? e + 1 : e;
    }
    if (have_id && have_until && (kind_unknown || scope_unknown))
        return -ENOTSUP; /* a newer node's: read as a known one, it would be misapplied
                          * (a scope read as the default one, source) */
    return have_id && have_kind && have_until ? 0 : -EINVAL;
}

/* ---- the table (under lock) ---- */

/* An action of a kind or scope this node does not know (a newer node's,
 * read from Redis or the state file): ignored, counted once per id (the
 * last IGNORED_IDS_MAX ids are remembered: the hash is read whole again
 * at each reconnect), and logged once per kind and scope. Under lock. */
void
shaping_note_unknown(struct shaping *s, const char *line)
{
    char kind[32] = "?", scope[32] = "?", id[17] = "";
    for (const char *p = line; *p != '\0' && *p != '\n';) {
        const char *e = p + strcspn(p, "\t\n");
        size_t n = (size_t)(e - p);
        char *dst = n > 5 && strncmp(p, "kind=", 5) == 0 ? kind
                    : n > 6 && strncmp(p, "scope=", 6) == 0 ? scope
                                                           : NULL;
        if (dst != NULL) {
            size_t off = dst == kind ? 5 : 6;
            char v[32];
            snprintf(v, sizeof(v), "%.*s", (int)(n - off < 31 ? n - off : 31), p + off);
            clean_copy(dst, 32, v);
        } else if (n == 3 + 16 && strncmp(p, "id=", 3) == 0) {
            memcpy(id, p + 3, 16); /* shaping_action_parse checked it: 16 hex digits */
            id[16] = '\0';
        }
        p = *e == '\t' ? e + 1 : e;
    }
    bool counted = false;
    for (unsigned i = 0; i < s->nignored_ids && !counted; i++)
        counted = strcmp(s->ignored_ids[i], id) == 0;
    if (!counted) {
        s->st.ignored++;
        memcpy(s->ignored_ids[s->ignored_next], id, sizeof(id));
        s->ignored_next = (s->ignored_next + 1) % IGNORED_IDS_MAX;
        if (s->nignored_ids < IGNORED_IDS_MAX)
            s->nignored_ids++;
    }
    char seen[70];
    snprintf(seen, sizeof(seen), "%s/%s", kind, scope);
    for (unsigned i = 0; i < s->nunknown; i++)
        if (strcmp(s->unknown[i], seen) == 0)
            return;
    if (s->nunknown < sizeof(s->unknown) / sizeof(s->unknown[0]))
        snprintf(s->unknown[s->nunknown++], sizeof(s->unknown[0]), "%s", seen);
    log_msg(LOG_WARN,
            "event=shaping_action_ignored kind=%s scope=%s note=\"unknown to this node (a newer "
            "node's?): ignored, logged once\"",
            kind, scope);
}

struct shaping_action *
shaping_find(struct shaping *s, const char *id)
{
    for (size_t i = 0; i < s->nact; i++)
        if (strcmp(s->act[i].id, id) == 0)
            return &s->act[i];
    return NULL;
}

void
shaping_log_started(struct shaping *s, const struct shaping_action *a, const char *how)
{
    if (s->on_event != NULL)
        s->on_event(s->on_event_arg, a, true, how);
    uint64_t now = clock_unix_ms();
    log_msg(LOG_NOTICE,
            "event=shaping_started id=%s rule=%s kind=%s value=%u scope=%s source=%s group=%s "
            "domain=%s tenant=%s for_ms=%llu origin=%s via=%s trigger=\"%s\"",
            a->id, a->rule, shaping_kind_str(a->kind), a->value, shaping_scope_str(a->scope),
            a->source[0] ? a->source : "-", a->group[0] ? a->group : "-",
            a->domain[0] ? a->domain : "-", a->tenant[0] ? a->tenant : "-",
            (unsigned long long)(a->until_ms > now ? a->until_ms - now : 0), a->origin, how,
            a->trigger);
}

static void
log_ended(struct shaping *s, const struct shaping_action *a, const char *why)
{
    if (s->on_event != NULL)
        s->on_event(s->on_event_arg, a, false, why);
    log_msg(LOG_NOTICE,
            "event=shaping_ended id=%s rule=%s kind=%s scope=%s source=%s group=%s domain=%s "
            "reason=%s",
            a->id, a->rule, shaping_kind_str(a->kind), shaping_scope_str(a->scope),
            a->source[0] ? a->source : "-", a->group[0] ? a->group : "-",
            a->domain[0] ? a->domain : "-", why);
}

/* Queue a change for Redis. While Redis is away nothing drains the
 * queue, and a reply storm extends the same actions again and again: one
 * item per action id waits, holding its latest state (an add after a
 * clear of it keeps the clear, published first), so that the queue is
 * bounded by the ids changed, not by the changes; past OUTBOX_MAX ids the
 * oldest change is dropped (a lost add is published again by the
 * reconnect's catch-up, from the table; a lost clear lets the action come
 * back from the hash until its end). Under lock. */
static void
outbox_push(struct shaping *s, const struct shaping_action *a, bool clear)
{
    if (!s->redis_on)
        return;
    for (struct outbox_item *it = s->out; it != NULL; it = it->next) {
        if (strcmp(it->a.id, a->id) != 0)
            continue;
        if (clear) {
            it->clear_first = false; /* clear, add, clear: one clear */
        } else {
            it->clear_first |= it->clear;
        }
        it->clear = clear;
        it->a = *a;
        return;
    }
    if (s->nout >= OUTBOX_MAX) {
        struct outbox_item *old = s->out;
        s->out = old->next;
        if (s->out == NULL)
            s->out_tail = &s->out;
        free(old);
        s->nout--;
        if (s->outbox_dropped++ == 0)
            log_msg(LOG_WARN, "event=shaping_outbox_full max=%d note=\"oldest change dropped: "
                              "Redis away too long\"",
                    OUTBOX_MAX);
    }
    struct outbox_item *it = calloc(1, sizeof(*it));
    if (it == NULL)
        return; /* the hash is rewritten whole at the next reconnect */
    it->a = *a;
    it->clear = clear;
    *s->out_tail = it;
    s->out_tail = &it->next;
    s->nout++;
}

/* Take the whole queue (the caller frees it). Under lock. */
struct outbox_item *
shaping_outbox_take(struct shaping *s)
{
    struct outbox_item *o = s->out;
    s->out = NULL;
    s->out_tail = &s->out;
    s->nout = 0;
    return o;
}

/* Insert or extend a (the later end wins). Returns 1 when new, 2 when
 * extended, 0 when nothing changed, -ENOSPC when the table is full. */
int
shaping_upsert(struct shaping *s, const struct shaping_action *a)
{
    struct shaping_action *x = shaping_find(s, a->id);
    if (x != NULL) {
        if (a->until_ms <= x->until_ms)
            return 0;
        x->until_ms = a->until_ms;
        s->dirty = true;
        return 2;
    }
    if (s->nact == SHAPING_ACTIONS_MAX)
        return -ENOSPC;
    if (s->nact == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 16;
        struct shaping_action *v = realloc(s->act, nc * sizeof(*v));
        if (v == NULL)
            return -ENOMEM;
        s->act = v;
        s->cap = nc;
    }
    s->act[s->nact++] = *a;
    atomic_store(&s->live, s->nact);
    if (a->kind == SHAPING_BOUNCE) {
        /* what already waits for the scope in the spool: the keeper hands
         * it to the bounce hook (without memory, it bounces as it comes up) */
        struct outbox_item *it = calloc(1, sizeof(*it));
        if (it != NULL) {
            it->a = *a;
            *s->bounces_tail = it;
            s->bounces_tail = &it->next;
            pthread_cond_signal(&s->cv);
        }
    }
    s->st.active[a->kind < SHAPING_KIND_COUNT ? a->kind : SHAPING_COUNT]++;
    s->st.started++;
    s->dirty = true;
    return 1;
}

void
shaping_remove_at(struct shaping *s, size_t i, const char *why)
{
    log_ended(s, &s->act[i], why);
    enum shaping_kind k = s->act[i].kind;
    if (s->st.active[k] > 0)
        s->st.active[k]--;
    s->st.ended++;
    s->act[i] = s->act[--s->nact];
    atomic_store(&s->live, s->nact);
    s->dirty = true;
}

/* Actions whose end passed leave the table; with Redis up their ids go
 * to the keeper, which takes them out of the hash when it holds them
 * ended too (while Redis is away, the catch-up at the reconnect does). */
static void
expire(struct shaping *s, uint64_t now)
{
    for (size_t i = 0; i < s->nact;) {
        if (s->act[i].until_ms <= now) {
            if (s->gone != NULL && s->redis_up && s->ngone < SHAPING_ACTIONS_MAX)
                memcpy(s->gone[s->ngone++], s->act[i].id, sizeof(s->gone[0]));
            shaping_remove_at(s, i, "expired");
        } else {
            i++;
        }
    }
}

/* ---- the id ---- */

static uint64_t
fnv(uint64_t h, const char *p)
{
    for (; *p != '\0'; p++) {
        h ^= (unsigned char)*p;
        h *= 0x100000001b3ULL;
    }
    h ^= 0xff;
    h *= 0x100000001b3ULL;
    return h;
}

static void
make_id(struct shaping_action *a)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    h = fnv(h, a->rule);
    h = fnv(h, shaping_scope_str(a->scope));
    h = fnv(h, shaping_kind_str(a->kind));
    h = fnv(h, a->source);
    h = fnv(h, a->group);
    h = fnv(h, a->domain);
    if (a->scope == SHAPING_SCOPE_TENANT)
        h = fnv(h, a->tenant);
    snprintf(a->id, sizeof(a->id), "%016llx", (unsigned long long)h);
}

/* ---- what workers call ---- */

int
shaping_on_reply(struct shaping *s, const struct shaping_rules *r, const struct shaping_reply *rep,
                 const char *source, const char *tenant)
{
    if (s == NULL || r == NULL)
        return -1;
    int i = shaping_rules_match(r, rep);
    if (i < 0)
        return -1;
    shaping_rule_hit(r, (unsigned)i);
    const struct shaping_rule_info *ri = shaping_rule(r, (unsigned)i);
    struct shaping_action a;
    memset(&a, 0, sizeof(a));
    a.kind = ri->kind;
    a.scope = ri->scope;
    a.value = ri->value;
    a.per_ms = ri->per_ms;
    snprintf(a.rule, sizeof(a.rule), "%s", ri->name);
    if (a.scope == SHAPING_SCOPE_DOMAIN) {
        snprintf(a.domain, sizeof(a.domain), "%s", rep->domain ? rep->domain : "");
    } else {
        /* the rule's group, or the group of the MX host, or that host alone */
        const char *g = ri->group;
        int gi = g == NULL ? shaping_rules_group_of(r, rep->mx) : -1;
        if (g == NULL && gi >= 0)
            g = shaping_rules_group_name(r, (unsigned)gi);
        if (g != NULL)
            snprintf(a.group, sizeof(a.group), "%s", g);
        else
            snprintf(a.group, sizeof(a.group), "mx:%.*s", MX_GROUP_HOST_MAX,
                     rep->mx ? rep->mx : "");
        if (a.scope == SHAPING_SCOPE_SOURCE)
            snprintf(a.source, sizeof(a.source), "%s", source ? source : "");
        if (a.scope == SHAPING_SCOPE_TENANT)
            snprintf(a.tenant, sizeof(a.tenant), "%s", tenant ? tenant : "");
    }
    char text[SHAPING_TEXT_MAX];
    char enh[24] = "";
    if (rep->enh_cls != 0)
        snprintf(enh, sizeof(enh), "%u.%u.%u ", rep->enh_cls, rep->enh_subject, rep->enh_detail);
    snprintf(text, sizeof(text), "%u %s%s", rep->code, enh, rep->text ? rep->text : "");
    clean_copy(a.trigger, sizeof(a.trigger), text);
    make_id(&a);
    uint64_t now = clock_unix_ms();
    a.started_ms = now;
    a.until_ms = now + (ri->for_ms ? ri->for_ms : 1);
    pthread_mutex_lock(&s->lock);
    snprintf(a.origin, sizeof(a.origin), "%s", s->node);
    s->st.hits++;
    if (a.kind == SHAPING_COUNT || (a.scope == SHAPING_SCOPE_TENANT && a.tenant[0] == '\0')) {
        /* counted only: no action to keep or share (mail of no tenant
         * has no tenant to hold) */
        pthread_mutex_unlock(&s->lock);
        return i; /* counted: no action to keep or share */
    }
    struct shaping_action *old = shaping_find(s, a.id);
    /* extended only by a tenth of its duration or more: a storm of the
     * same reply is not a storm of writes */
    bool worth = old == NULL || a.until_ms >= old->until_ms + ri->for_ms / 10 + 1;
    int rc = worth ? shaping_upsert(s, &a) : 0;
    if (rc == 1)
        shaping_log_started(s, &a, "rule");
    if (rc > 0) {
        outbox_push(s, rc == 1 ? &a : shaping_find(s, a.id), false);
        pthread_cond_signal(&s->cv);
    }
    pthread_mutex_unlock(&s->lock);
    return i;
}

static bool
in_group(const struct shaping_rules *r, const char *group, const char *mx)
{
    if (strcmp(group, "*") == 0)
        return true; /* an operator's suspend: every destination */
    if (mx == NULL || group[0] == '\0')
        return false;
    if (strncmp(group, "mx:", 3) == 0) {
        /* a host as long as the field holds may have been cut (here or by
         * sluicectl's group=mx:HOST): its first octets stand for it */
        size_t hl = strlen(group + 3);
        return hl == MX_GROUP_HOST_MAX ? strncasecmp(group + 3, mx, hl) == 0
                                       : strcasecmp(group + 3, mx) == 0;
    }
    return shaping_rules_in_group(r, group, mx);
}

bool
shaping_check(struct shaping *s, const struct shaping_rules *r, const char *source,
              const char *mx, const char *domain, uint64_t now_ms, struct shaping_verdict *v)
{
    memset(v, 0, sizeof(*v));
    if (s == NULL || atomic_load_explicit(&s->live, memory_order_relaxed) == 0)
        return false;
    bool any = false;
    uint64_t recheck = now_ms + RECHECK_MAX_MS;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->nact; i++) {
        const struct shaping_action *a = &s->act[i];
        if (a->until_ms <= now_ms || a->kind == SHAPING_COUNT || a->scope == SHAPING_SCOPE_TENANT)
            continue; /* tenants: per job, shaping_tenant_check */
        bool applies;
        switch (a->scope) {
        case SHAPING_SCOPE_SOURCE:
            applies = strcmp(a->source, source ? source : "") == 0 && in_group(r, a->group, mx);
            break;
        case SHAPING_SCOPE_GROUP:
            applies = in_group(r, a->group, mx);
            break;
        case SHAPING_SCOPE_DOMAIN:
        default:
            applies = domain != NULL && strcasecmp(a->domain, domain) == 0;
            break;
        }
        if (!applies)
            continue;
        any = true;
        if (a->until_ms < recheck)
            recheck = a->until_ms;
        if (a->kind == SHAPING_SUSPEND) {
            v->suspended = true;
        } else if (a->kind == SHAPING_BOUNCE) {
            v->bounce = true;
        } else if (a->kind == SHAPING_RATE) {
            /* a source's rate is its own (keyed per source and group by the
             * scheduler); a group's or a domain's is everyone's */
            bool own = a->scope == SHAPING_SCOPE_SOURCE;
            unsigned *pm = own ? &v->src_rate_permille : &v->rate_permille;
            uint64_t *iv = own ? &v->src_rate_interval_ns : &v->rate_interval_ns;
            bool slower = false;
            if (a->per_ms == 0) {
                if (a->value > 0 && (*pm == 0 || a->value < *pm)) {
                    *pm = a->value;
                    slower = true;
                }
            } else if (a->value > 0) {
                uint64_t T = (uint64_t)a->per_ms * 1000000ULL / a->value;
                if (T > *iv) {
                    *iv = T;
                    slower = true;
                }
            }
            if (own && (slower || v->src_rate_group[0] == '\0'))
                snprintf(v->src_rate_group, sizeof(v->src_rate_group), "%s", a->group);
        } else {
            unsigned cap = a->kind == SHAPING_BACKOFF ? 1 : a->value;
            if (v->cap == 0 || cap < v->cap)
                v->cap = cap;
            if (a->kind == SHAPING_BACKOFF)
                v->one_txn = true;
        }
    }
    pthread_mutex_unlock(&s->lock);
    v->recheck_ms = recheck;
    return any;
}

bool
shaping_tenant_check(struct shaping *s, const struct shaping_rules *r, const char *tenant,
                     const char *mx, uint64_t now_ms, struct shaping_tenant_verdict *v)
{
    memset(v, 0, sizeof(*v));
    v->recheck_ms = now_ms + RECHECK_MAX_MS;
    if (s == NULL || tenant == NULL || tenant[0] == '\0' ||
        atomic_load_explicit(&s->live, memory_order_relaxed) == 0)
        return false;
    bool any = false;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->nact; i++) {
        const struct shaping_action *a = &s->act[i];
        if (a->scope != SHAPING_SCOPE_TENANT || a->until_ms <= now_ms ||
            strcmp(a->tenant, tenant) != 0 || !in_group(r, a->group, mx))
            continue;
        if (a->kind == SHAPING_SUSPEND) {
            v->held = true;
        } else if (a->kind == SHAPING_BOUNCE) {
            v->bounce = true;
        } else if (a->kind == SHAPING_RATE && a->value > 0) {
            bool slower = false;
            if (a->per_ms == 0 && (v->rate_permille == 0 || a->value < v->rate_permille)) {
                v->rate_permille = a->value;
                slower = true;
            } else if (a->per_ms != 0) {
                uint64_t T = (uint64_t)a->per_ms * 1000000ULL / a->value;
                if (T > v->rate_interval_ns) {
                    v->rate_interval_ns = T;
                    slower = true;
                }
            }
            if (slower || v->rate_group[0] == '\0')
                snprintf(v->rate_group, sizeof(v->rate_group), "%s", a->group);
        } else {
            continue; /* count, or a kind a tenant has not (backoff, cap) */
        }
        any = true;
        if (a->until_ms < v->recheck_ms)
            v->recheck_ms = a->until_ms;
    }
    pthread_mutex_unlock(&s->lock);
    return any;
}

bool
shaping_tenant_held(struct shaping *s, const struct shaping_rules *r, const char *tenant,
                    const char *mx, uint64_t now_ms, uint64_t *recheck_ms)
{
    struct shaping_tenant_verdict v;
    bool any = shaping_tenant_check(s, r, tenant, mx, now_ms, &v);
    *recheck_ms = v.recheck_ms;
    return any && v.held;
}

/* ---- operators ---- */

int
shaping_add(struct shaping *s, const struct shaping_action *in)
{
    struct shaping_action a = *in;
    if (a.rule[0] == '\0')
        snprintf(a.rule, sizeof(a.rule), "operator");
    make_id(&a);
    a.started_ms = clock_unix_ms();
    pthread_mutex_lock(&s->lock);
    snprintf(a.origin, sizeof(a.origin), "%s", s->node);
    struct shaping_action *old = shaping_find(s, a.id);
    if (old != NULL) {
        /* an operator's word sets the end, shorter or longer, and the
         * value (the id is the same for cap:3 and cap:10) */
        old->until_ms = a.until_ms;
        old->value = a.value;
        old->per_ms = a.per_ms;
    }
    int rc = old != NULL ? 2 : shaping_upsert(s, &a);
    if (rc == 1)
        shaping_log_started(s, &a, "operator");
    if (rc > 0) {
        s->dirty = true;
        outbox_push(s, shaping_find(s, a.id), false);
        pthread_cond_signal(&s->cv);
    }
    pthread_mutex_unlock(&s->lock);
    return rc < 0 ? rc : 0;
}

int
shaping_remove(struct shaping *s, const struct shaping_action *in)
{
    struct shaping_action a = *in;
    if (a.rule[0] == '\0')
        snprintf(a.rule, sizeof(a.rule), "operator");
    make_id(&a);
    return shaping_clear(s, a.id);
}

static bool
selected(const struct shaping_action *a, const char *sel)
{
    if (strcmp(sel, "all") == 0 || strcmp(sel, a->id) == 0)
        return true;
    const char *eq = strchr(sel, '=');
    if (eq == NULL)
        return false;
    size_t kl = (size_t)(eq - sel);
    const char *v = eq + 1;
    if (kl == 6 && strncmp(sel, "source", 6) == 0)
        return strcmp(a->source, v) == 0 && a->scope == SHAPING_SCOPE_SOURCE;
    if (kl == 5 && strncmp(sel, "group", 5) == 0)
        return strcasecmp(a->group, v) == 0;
    if (kl == 6 && strncmp(sel, "domain", 6) == 0)
        return strcasecmp(a->domain, v) == 0;
    if (kl == 6 && strncmp(sel, "tenant", 6) == 0)
        return strcmp(a->tenant, v) == 0 && a->scope == SHAPING_SCOPE_TENANT;
    if (kl == 4 && strncmp(sel, "rule", 4) == 0)
        return strcmp(a->rule, v) == 0;
    return false;
}

int
shaping_clear(struct shaping *s, const char *sel)
{
    int n = 0;
    pthread_mutex_lock(&s->lock);
    for (size_t i = 0; i < s->nact;) {
        if (!selected(&s->act[i], sel)) {
            i++;
            continue;
        }
        outbox_push(s, &s->act[i], true);
        shaping_remove_at(s, i, "cleared");
        n++;
    }
    if (n > 0)
        pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->lock);
    return n;
}

int
shaping_list(struct shaping *s, struct shaping_action **out, size_t *n)
{
    pthread_mutex_lock(&s->lock);
    expire(s, clock_unix_ms());
    *n = s->nact;
    *out = malloc((s->nact ? s->nact : 1) * sizeof(**out));
    if (*out != NULL && s->nact > 0)
        memcpy(*out, s->act, s->nact * sizeof(**out));
    pthread_mutex_unlock(&s->lock);
    return *out != NULL ? 0 : -ENOMEM;
}

void
shaping_stats(struct shaping *s, struct shaping_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (s == NULL)
        return;
    pthread_mutex_lock(&s->lock);
    *out = s->st;
    out->outbox = s->nout;
    out->outbox_dropped = s->outbox_dropped;
    out->redis_on = s->redis_on;
    out->redis_up = s->redis_up;
    pthread_mutex_unlock(&s->lock);
}

/* ---- the state file ---- */

static void
state_load(struct shaping *s)
{
    if (s->state_path == NULL)
        return;
    FILE *f = fopen(s->state_path, "r");
    if (f == NULL)
        return;
    char line[LINE_MAX_LEN];
    uint64_t now = clock_unix_ms();
    unsigned n = 0, bad = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        struct shaping_action a;
        int prc = shaping_action_parse(line, &a);
        if (prc == -ENOTSUP) {
            shaping_note_unknown(s, line); /* before the keeper: no lock needed */
            continue;
        }
        if (prc < 0) {
            bad++;
            continue;
        }
        if (a.until_ms <= now)
            continue;
        if (shaping_upsert(s, &a) == 1) {
            shaping_log_started(s, &a, "state_file");
            n++;
        }
    }
    fclose(f);
    s->dirty = false;
    log_msg(bad ? LOG_WARN : LOG_INFO, "event=shaping_state_loaded path=%s actions=%u bad_lines=%u",
            s->state_path, n, bad);
}

static int
state_write(struct shaping *s)
{
    pthread_mutex_lock(&s->lock);
    size_t n = s->nact;
    struct shaping_action *v = malloc((n ? n : 1) * sizeof(*v));
    if (v != NULL && n > 0)
        memcpy(v, s->act, n * sizeof(*v));
    s->dirty = false;
    pthread_mutex_unlock(&s->lock);
    if (v == NULL)
        return -ENOMEM;
    char tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", s->state_path);
    int rc = 0;
    FILE *f = fopen(tmp, "w");
    if (f == NULL) {
        rc = -errno;
    } else {
        char line[LINE_MAX_LEN];
        for (size_t i = 0; i < n; i++)
            if (shaping_action_format(&v[i], line, sizeof(line)) > 0)
                fprintf(f, "%s\n", line);
        if (fflush(f) != 0 || fsync(fileno(f)) != 0)
            rc = -errno;
        if (fclose(f) != 0 && rc == 0)
            rc = -errno;
        if (rc == 0 && rename(tmp, s->state_path) != 0)
            rc = -errno;
        if (rc < 0)
            unlink(tmp);
    }
    free(v);
    if (rc < 0) {
        pthread_mutex_lock(&s->lock);
        s->dirty = true;
        pthread_mutex_unlock(&s->lock);
        log_msg(LOG_ERR, "event=shaping_state_write_failed path=%s error=\"%s\"", s->state_path,
                strerror(-rc));
    }
    return rc;
}

/* Bounce actions started: the hook bounces what waits for each. */
static void
bounce_pass(struct shaping *s)
{
    pthread_mutex_lock(&s->hook_lock);
    if (s->on_bounce == NULL) {
        pthread_mutex_unlock(&s->hook_lock);
        return; /* they wait for the hook */
    }
    pthread_mutex_lock(&s->lock);
    struct outbox_item *o = s->bounces;
    s->bounces = NULL;
    s->bounces_tail = &s->bounces;
    pthread_mutex_unlock(&s->lock);
    while (o != NULL) {
        struct outbox_item *nx = o->next;
        s->on_bounce(s->on_bounce_arg, &o->a);
        free(o);
        o = nx;
    }
    pthread_mutex_unlock(&s->hook_lock);
}

void
shaping_set_bounce_hook(struct shaping *s, void (*fn)(void *arg, const struct shaping_action *a),
                        void *arg)
{
    if (s == NULL)
        return;
    pthread_mutex_lock(&s->hook_lock);
    s->on_bounce = fn;
    s->on_bounce_arg = arg;
    pthread_mutex_unlock(&s->hook_lock);
    pthread_mutex_lock(&s->lock);
    s->hook_set = fn != NULL;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->lock);
}

static void *
keeper_main(void *arg)
{
    struct shaping *s = arg;
    log_altstack_init();
    uint64_t saved = 0;
    for (;;) {
        pthread_mutex_lock(&s->lock);
        if (s->stop) {
            pthread_mutex_unlock(&s->lock);
            break;
        }
        expire(s, clock_unix_ms());
        bool dirty = s->dirty && clock_mono_ms() >= saved + STATE_SAVE_MS;
        long wait_ms = s->redis_on && s->rc != NULL ? READ_POLL_MS : KEEPER_TICK_MS;
        /* what waits for Redis waits for its reconnect, not in a spin */
        if ((s->out == NULL || s->rc == NULL) && !dirty &&
            (s->bounces == NULL || !s->hook_set)) {
            /* the cv waits on CLOCK_MONOTONIC: a step of the wall clock
             * neither stalls nor spins the keeper */
            struct timespec ts = clock_mono_deadline((uint64_t)wait_ms);
            pthread_cond_timedwait(&s->cv, &s->lock, &ts);
        }
        pthread_mutex_unlock(&s->lock);
        /* Redis first: the other nodes wait on it, the file only on a crash */
        if (s->redis_on)
            shaping_redis_pass(s);
        bounce_pass(s);
        if (dirty && s->state_path != NULL) {
            state_write(s);
            saved = clock_mono_ms();
        }
    }
    if (s->state_path != NULL)
        state_write(s);
    return NULL;
}

int
shaping_open(const struct shaping_opts *o, struct shaping **out, char *err, size_t errlen)
{
    struct shaping *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->hook_lock, NULL);
    clock_cond_init_mono(&s->cv);
    s->out_tail = &s->out;
    s->bounces_tail = &s->bounces;
    s->on_event = o->on_event;
    s->on_event_arg = o->arg;
    snprintf(s->node, sizeof(s->node), "%s", o->node ? o->node : "sluice");
    uint64_t rnd = 0;
    if (getrandom(&rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
        rnd = clock_unix_ms() ^ ((uint64_t)getpid() << 32);
    snprintf(s->instance, sizeof(s->instance), "%016llx", (unsigned long long)rnd);
    s->stream_max = o->stream_max ? o->stream_max : 10000;
    s->timeout_ms = o->redis_timeout_ms ? o->redis_timeout_ms : 1000;
    snprintf(s->prefix, sizeof(s->prefix), "%s", o->key_prefix ? o->key_prefix : "sluice:");
    if (o->state_path != NULL && (s->state_path = strdup(o->state_path)) == NULL) {
        shaping_close(s);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    if (o->redis_url != NULL) {
        char e2[256];
        int rc = redis_url_parse(o->redis_url, &s->ep, e2, sizeof(e2));
        if (rc < 0) {
            snprintf(err, errlen, "[shaping] redis: %s", e2);
            shaping_close(s);
            return rc;
        }
        if (o->redis_password != NULL) {
            free(s->ep.password);
            s->ep.password = strdup(o->redis_password);
        }
        s->redis_on = true;
        if ((s->gone = calloc(SHAPING_ACTIONS_MAX, sizeof(*s->gone))) == NULL) {
            snprintf(err, errlen, "out of memory");
            shaping_close(s);
            return -ENOMEM;
        }
    }
    state_load(s);
    if (pthread_create(&s->keeper, NULL, keeper_main, s) != 0) {
        snprintf(err, errlen, "cannot start the shaping keeper thread");
        shaping_close(s);
        return -EAGAIN;
    }
    s->keeper_started = true;
    *out = s;
    return 0;
}

struct shaping *
shaping_close(struct shaping *s)
{
    if (s == NULL)
        return NULL;
    if (s->keeper_started) {
        pthread_mutex_lock(&s->lock);
        s->stop = true;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->lock);
        pthread_join(s->keeper, NULL);
    }
    if (s->rc != NULL)
        redisFree(s->rc);
    while (s->out != NULL) {
        struct outbox_item *nx = s->out->next;
        free(s->out);
        s->out = nx;
    }
    while (s->bounces != NULL) {
        struct outbox_item *nx = s->bounces->next;
        free(s->bounces);
        s->bounces = nx;
    }
    free(s->ep.user);
    free(s->ep.password);
    free(s->act);
    free(s->gone);
    free(s->state_path);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->hook_lock);
    pthread_cond_destroy(&s->cv);
    free(s);
    return NULL;
}
