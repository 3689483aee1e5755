/*
 * site: see site.h. The window arithmetic is pure and unit-tested
 * (tests/unit/test_site.c); the worker's sites are a struct hash of
 * common/; the per-address table is site_addrs.c.
 */
#include "engine/outbound/site.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- the window ---- */

void
site_window_init(struct site_window *w, unsigned initial, unsigned ceiling)
{
    w->ceiling = ceiling ? ceiling : 1;
    w->cwnd = initial ? initial : 1;
    if (w->cwnd > w->ceiling)
        w->cwnd = w->ceiling;
    w->ssthresh = w->ceiling; /* slow start until the first failure */
    w->epoch = 0;
    w->setup_ns = 0;
    w->waited = false;
    w->head_base_ns[0] = w->head_base_ns[1] = 0;
    w->head_period_ns = 0;
    w->head_avg_ns = 0;
}

void
site_window_set_ceiling(struct site_window *w, unsigned ceiling)
{
    unsigned old = w->ceiling;
    w->ceiling = ceiling ? ceiling : 1;
    if (w->cwnd > w->ceiling)
        w->cwnd = w->ceiling;
    if (w->ssthresh > w->ceiling || (w->ceiling > old && w->ssthresh >= old))
        w->ssthresh = w->ceiling; /* no failure set it: slow start up to the new one */
}

unsigned
site_window_allowed(const struct site_window *w)
{
    unsigned a = (unsigned)w->cwnd;
    return a < 1 ? 1 : a > w->ceiling ? w->ceiling : a;
}

void
site_window_on_ready(struct site_window *w, uint64_t setup_ns)
{
    if (setup_ns == 0)
        setup_ns = 1; /* 0 means none yet */
    if (w->setup_ns == 0)
        w->setup_ns = setup_ns;
    else if (setup_ns > w->setup_ns)
        w->setup_ns += (setup_ns - w->setup_ns) / 4;
    else
        w->setup_ns -= (w->setup_ns - setup_ns) / 4;
}

void
site_window_on_wait(struct site_window *w, uint64_t waited_ns)
{
    uint64_t longer = 2 * w->setup_ns > SITE_WAIT_MIN_NS ? 2 * w->setup_ns : SITE_WAIT_MIN_NS;
    if (w->setup_ns != 0 && waited_ns > longer)
        w->waited = true;
}

void
site_window_on_backlog(struct site_window *w)
{
    w->waited = true;
}

void
site_window_on_head(struct site_window *w, uint64_t head_ns, uint64_t now_ns)
{
    if (head_ns == 0)
        head_ns = 1; /* 0 means none */
    if (w->head_period_ns == 0 || now_ns - w->head_period_ns >= SITE_HEAD_PERIOD_NS ||
        now_ns < w->head_period_ns) {
        /* The period before only if it just ended: after a lull of a
         * period or more its least is older than 20 s, no base now. */
        bool last = w->head_period_ns != 0 && now_ns >= w->head_period_ns &&
                    now_ns - w->head_period_ns < 2 * SITE_HEAD_PERIOD_NS;
        w->head_base_ns[1] = last ? w->head_base_ns[0] : 0;
        w->head_base_ns[0] = 0;
        w->head_period_ns = now_ns;
    }
    if (w->head_base_ns[0] == 0 || head_ns < w->head_base_ns[0])
        w->head_base_ns[0] = head_ns;
    if (w->head_avg_ns == 0)
        w->head_avg_ns = (double)head_ns;
    else
        w->head_avg_ns += ((double)head_ns - w->head_avg_ns) / 8;
}

bool
site_window_queues(const struct site_window *w, unsigned in_use)
{
    uint64_t base = w->head_base_ns[0];
    if (base == 0 || (w->head_base_ns[1] != 0 && w->head_base_ns[1] < base))
        base = w->head_base_ns[1];
    if (base == 0 || w->head_avg_ns <= (double)base)
        return false;
    double extra = w->head_avg_ns - (double)base;
    return w->head_avg_ns >= SITE_HEAD_RATIO * (double)base &&
           extra >= (double)SITE_HEAD_SLACK_NS &&
           in_use * extra / w->head_avg_ns >= SITE_HEAD_QUEUED;
}

void
site_window_on_success(struct site_window *w, unsigned in_use)
{
    if (in_use + 1 < site_window_allowed(w))
        return; /* the window is not what limits: it earns nothing */
    if (!w->waited)
        return; /* the connections there are serve the mail as soon */
    if (site_window_queues(w, in_use))
        return; /* more would wait in line: the receiver or this worker is the limit */
    w->waited = false;
    if (w->cwnd < w->ssthresh)
        w->cwnd += 1.0;
    else
        w->cwnd += 1.0 / w->cwnd;
    if (w->cwnd > w->ceiling)
        w->cwnd = w->ceiling;
}

bool
site_window_on_failure(struct site_window *w, unsigned epoch)
{
    if (epoch != w->epoch)
        return false; /* opened before the last decrease: counted already */
    w->epoch++;
    w->ssthresh = w->cwnd / 2 < 1 ? 1 : w->cwnd / 2;
    w->cwnd = w->ssthresh;
    return true;
}

/* ---- sites ---- */

static bool
site_eq(const struct hash_node *n, const void *key)
{
    return strcmp(((const struct site *)n)->key, key) == 0;
}

/* a and b are one host's address, whatever their ports. */
static bool
addr_same_host(const union dns_addr *a, const union dns_addr *b)
{
    unsigned char k1[18], k2[18];
    size_t l1 = site_addr_key(a, k1), l2 = site_addr_key(b, k2);
    return l1 == l2 && memcmp(k1, k2, l1 - 2) == 0;
}

void
site_addr_down(struct site *site, const union dns_addr *a, uint64_t until)
{
    struct site_down *slot = &site->down[0];
    for (unsigned i = 0; i < SITE_DOWN_MAX; i++) {
        struct site_down *x = &site->down[i];
        if (x->until != 0 && addr_same_host(&x->a, a)) {
            slot = x;
            break;
        }
        if (x->until < slot->until)
            slot = x; /* a free slot (0), else the one that ends first */
    }
    slot->a = *a;
    slot->until = until;
}

void
site_addr_up(struct site *site, const union dns_addr *a)
{
    for (unsigned i = 0; i < SITE_DOWN_MAX; i++)
        if (site->down[i].until != 0 && addr_same_host(&site->down[i].a, a))
            site->down[i].until = 0;
}

bool
site_addr_is_down(const struct site *site, const union dns_addr *a, uint64_t now)
{
    for (unsigned i = 0; i < SITE_DOWN_MAX; i++)
        if (site->down[i].until > now && addr_same_host(&site->down[i].a, a))
            return true;
    return false;
}

int
sites_init(struct sites *s, struct site_addrs *shared, unsigned worker)
{
    hash_init(&s->by_key, site_eq, 64);
    s->live = 0;
    return sites_addrs_init(s, shared, worker);
}

void
sites_fini(struct sites *s)
{
    size_t b = 0;
    struct hash_node *cur = NULL, *n;
    while ((n = hash_next(&s->by_key, &b, &cur)) != NULL) {
        free(((struct site *)n)->rest_fail);
        free(((struct site *)n)->src);
        free(n);
    }
    sites_addrs_fini(s);
    hash_fini(&s->by_key);
    s->live = 0;
}

static int
name_cmp(const void *a, const void *b)
{
    return strcasecmp(*(const char *const *)a, *(const char *const *)b);
}

void
site_key(const struct dns_mx_result *mx, unsigned port, char *out, size_t outlen,
         const char *(*alias)(const void *arg, const struct dns_mx_host *h), const void *arg)
{
    const char *names[64];
    unsigned n = 0;
    for (unsigned i = 0; i < mx->nhosts && n < 64; i++) {
        const char *a = alias != NULL ? alias(arg, &mx->hosts[i]) : NULL;
        names[n++] = a != NULL ? a : mx->hosts[i].name;
    }
    qsort(names, n, sizeof(names[0]), name_cmp);
    /* The port's room is kept: two keys differ by port whatever the names. */
    char suffix[16];
    size_t sl = (size_t)snprintf(suffix, sizeof(suffix), ":%u", port);
    size_t room = outlen > sl ? outlen - sl : 0, len = 0;
    out[0] = '\0';
    for (unsigned i = 0; i < n; i++) {
        if (i > 0 && strcasecmp(names[i], names[i - 1]) == 0)
            continue;
        int w = snprintf(out + len, room - len, "%s%s", len ? "," : "", names[i]);
        if (w < 0 || (size_t)w >= room - len) {
            /* Too many names to spell: their hash names the site. */
            uint64_t h = 0;
            for (unsigned k = 0; k < n; k++)
                h = h * 31 + hash_str_nocase(names[k]);
            len = (size_t)snprintf(out, room, "#%016llx", (unsigned long long)h);
            if (len >= room)
                len = room > 0 ? room - 1 : 0; /* (outlen is SITE_KEY_MAX: never) */
            break;
        }
        len += (size_t)w;
    }
    snprintf(out + len, outlen - len, "%s", suffix);
    for (char *p = out; *p; p++)
        if (*p >= 'A' && *p <= 'Z')
            *p = (char)(*p + 32);
}

struct site *
site_get(struct sites *s, const char *key, unsigned initial, unsigned ceiling)
{
    uint64_t h = hash_bytes(key, strlen(key));
    struct site *site = (struct site *)hash_find(&s->by_key, h, key);
    if (site != NULL) {
        site->refs++;
        return site;
    }
    if ((site = calloc(1, sizeof(*site))) == NULL)
        return NULL;
    snprintf(site->key, sizeof(site->key), "%s", key);
    site->node.hash = h;
    site->refs = 1;
    site_window_init(&site->win, initial, ceiling);
    if (hash_insert(&s->by_key, &site->node) < 0) {
        free(site);
        return NULL;
    }
    s->live++;
    return site;
}

struct site *
site_unref(struct sites *s, struct site *site)
{
    if (site == NULL || --site->refs > 0)
        return NULL;
    hash_remove(&s->by_key, &site->node);
    hash_compact(&s->by_key);
    s->live--;
    free(site->rest_fail);
    free(site->src);
    free(site);
    return NULL;
}

struct site_source *
site_source(struct site *site, uint32_t id)
{
    for (unsigned i = 0; i < site->nsrc; i++)
        if (site->src[i].id == id)
            return &site->src[i];
    if (site->nsrc == SITE_SOURCES_MAX)
        return NULL;
    struct site_source *v = realloc(site->src, (site->nsrc + 1) * sizeof(*v));
    if (v == NULL)
        return NULL;
    site->src = v;
    memset(&v[site->nsrc], 0, sizeof(v[0]));
    v[site->nsrc].id = id;
    return &v[site->nsrc++];
}

void
site_source_sent(struct site *site, struct site_source *ss)
{
    ss->sent++;
    if (++site->src_sent < SITE_SHARE_WINDOW)
        return;
    /* Halve every count: the shares follow the recent past, so a source
     * back from a hold is not owed everything it missed. */
    site->src_sent = 0;
    for (unsigned i = 0; i < site->nsrc; i++) {
        site->src[i].sent /= 2;
        site->src_sent += site->src[i].sent;
    }
}
