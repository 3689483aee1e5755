/*
 * shaping_conf: the shaping rules (see shaping.h): parsing of a rules
 * file, the index that keeps matching cheap, and matching.
 *
 * A rules file is lines of words; '#' starts a comment:
 *
 *     group yahoo *.yahoodns.net *.yahoo.com
 *     rule yahoo-tss04 group=yahoo code=421 match="\[TSS04\]" action=suspend scope=source for=4h
 *
 * "group NAME PATTERN..." names a destination group by MX patterns
 * ("*.suffix" or a host). "rule NAME KEY=VALUE..." with keys:
 *   group=G       only replies from G's MX hosts
 *   mx=PATTERN    only replies from MX hosts matching it
 *   domain=PATTERN only replies for recipient domains matching it
 *   code=421|4xx|5xx  the basic code
 *   enhanced=C.S.D    each part a number, "x" (any) or a range A-B: 5.7.606-649
 *   match="REGEX" POSIX extended, case-insensitive, searched in the text
 *   action=suspend|backoff|cap:N|rate:R|bounce|count
 *                 rate:R: 10/s, 600/min (absolute) or 0.5, 50% (of the
 *                 configured message rate)
 *   scope=source|group|domain|tenant   (default source; tenant: suspend, rate:R,
 *                 bounce or count)
 *   for=DURATION  how long the action lasts (250ms, 30s, 5m, 4h, 1d)
 * Values may be in double quotes (\" and \\ inside). Rules are tried in
 * load order, first match wins.
 *
 * The index: for each basic code 200..599, the rules that may match it,
 * split by destination group (a reply's group is found once, from its MX
 * host); those with no group in a list of their own, merged in order at
 * match time. Each candidate then costs a compare of the enhanced code,
 * a memmem() of its literal (the longest run of fixed characters its
 * regex requires, lowercased) in the lowercased text, and only then a
 * regexec(). So 1,000 rules cost the few that concern the reply's code
 * and group, and a regexec only where the literal is present.
 *
 * Threading: built on one thread, then immutable (hit counters and the
 * reference count atomic).
 */

#include <ctype.h>
#include <errno.h>
#include <regex.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/evp.h>

#include "common/conf.h"
#include "common/re_cost.h"
#include "engine/config.h"
#include "engine/shaping.h"

#define CODE_MIN   200
#define CODE_SPAN  400 /* 200..599 */
#define TEXT_SCAN  512 /* octets of the reply text looked at */
#define NEEDLE_MAX 64

struct srange {
    unsigned lo, hi; /* lo > hi: any */
};

struct srule {
    struct shaping_rule_info info;
    char name[SHAPING_NAME_MAX];
    char origin[128];
    int group;           /* index, -1: any */
    unsigned code;       /* 0: any */
    unsigned code_cls;   /* 4 or 5 for 4xx/5xx, 0: none */
    bool has_enh;
    struct srange enh[3];
    char *mx, *domain;   /* owned patterns, or NULL */
    bool has_re;
    regex_t re;
    char needle[NEEDLE_MAX]; /* lowercased; "" none */
    size_t needle_len;
};

struct sgroup {
    char name[SHAPING_NAME_MAX];
    char *pat[SHAPING_PATTERNS_MAX]; /* owned */
    unsigned npat;
};

struct shaping_rules {
    struct srule *rules; /* owned */
    unsigned nrules, cap;
    struct sgroup *groups; /* owned */
    unsigned ngroups, gcap;
    /* CSR index: list (code, g) for g in 0..ngroups, slot 0 the rules of no
     * group, slot g+1 those of group g */
    uint32_t *off;       /* owned: CODE_SPAN * (ngroups + 1) + 1 */
    uint32_t *idx;       /* owned */
    _Atomic uint64_t *hits; /* owned, nrules */
    bool finished;
    _Atomic unsigned refs;
    /* What it was built from, for shaping_rules_same(): a reload that
     * changed nothing in the rules shares the running set rather than
     * keep one more (some 60 KB for the shipped rules, mostly their
     * regexes). A SHA-256 chain over "ORIGIN\0TEXT\0" of each text
     * added, in order, and their length: the texts themselves (12 KB
     * and more) need not stay in every config a reload kept. */
    unsigned char src_digest[32];
    size_t srclen;
};

static const char *const kind_names[SHAPING_KIND_COUNT] = {"suspend", "backoff", "cap",
                                                           "count",   "rate",    "bounce"};
static const char *const scope_names[SHAPING_SCOPE_COUNT] = {"source", "group", "domain",
                                                              "tenant"};

const char *
shaping_kind_str(enum shaping_kind k)
{
    return (unsigned)k < SHAPING_KIND_COUNT ? kind_names[k] : "?";
}

const char *
shaping_scope_str(enum shaping_scope s)
{
    return (unsigned)s < SHAPING_SCOPE_COUNT ? scope_names[s] : "?";
}

int
shaping_rate_parse(const char *arg, unsigned *value, unsigned *per_ms)
{
    if (strchr(arg, '/') != NULL) {
        struct conf_rate r;
        if (conf_parse_rate(arg, &r) != 0 || r.count == 0 || r.count > 1000000)
            return -EINVAL;
        *value = r.count;
        *per_ms = r.per_ms;
        return 0;
    }
    /* a fraction: 0.5 or 50% (in permille, 1..999) */
    char *end;
    errno = 0;
    double f = strtod(arg, &end);
    if (end == arg || errno != 0)
        return -EINVAL;
    if (*end == '%' && end[1] == '\0')
        f /= 100.0;
    else if (*end != '\0')
        return -EINVAL;
    /* The range first: converting a value a long cannot hold (1e300,
     * inf, nan) is undefined. */
    if (!(f > 0.0 && f < 1.0))
        return -EINVAL;
    long pm = (long)(f * 1000.0 + 0.5);
    if (pm < 1 || pm > 999)
        return -EINVAL;
    *value = (unsigned)pm;
    *per_ms = 0;
    return 0;
}

const char *
shaping_rate_str(unsigned value, unsigned per_ms, char *buf, size_t cap)
{
    if (per_ms == 0)
        snprintf(buf, cap, "%u.%u%%", value / 10, value % 10);
    else if (per_ms == 1000)
        snprintf(buf, cap, "%u/s", value);
    else if (per_ms == 60000)
        snprintf(buf, cap, "%u/min", value);
    else if (per_ms == 3600000)
        snprintf(buf, cap, "%u/h", value);
    else
        snprintf(buf, cap, "%u/%ums", value, per_ms);
    return buf;
}

struct shaping_rules *
shaping_rules_new(void)
{
    struct shaping_rules *r = calloc(1, sizeof(struct shaping_rules));
    if (r != NULL)
        atomic_init(&r->refs, 1);
    return r;
}

struct shaping_rules *
shaping_rules_ref(struct shaping_rules *r)
{
    atomic_fetch_add(&r->refs, 1);
    return r;
}

bool
shaping_rules_same(const struct shaping_rules *a, const struct shaping_rules *b)
{
    return a != NULL && b != NULL && a->finished && b->finished && a->srclen == b->srclen &&
           memcmp(a->src_digest, b->src_digest, sizeof(a->src_digest)) == 0;
}

struct shaping_rules *
shaping_rules_unref(struct shaping_rules *r)
{
    if (r == NULL || atomic_fetch_sub(&r->refs, 1) != 1)
        return NULL;
    for (unsigned i = 0; i < r->nrules; i++) {
        free(r->rules[i].mx);
        free(r->rules[i].domain);
        if (r->rules[i].has_re)
            regfree(&r->rules[i].re);
    }
    for (unsigned g = 0; g < r->ngroups; g++)
        for (unsigned k = 0; k < r->groups[g].npat; k++)
            free(r->groups[g].pat[k]);
    free(r->rules);
    free(r->groups);
    free(r->off);
    free(r->idx);
    free(r->hits);
    free(r);
    return NULL;
}

unsigned
shaping_rules_count(const struct shaping_rules *r)
{
    return r != NULL ? r->nrules : 0;
}

unsigned
shaping_rules_groups(const struct shaping_rules *r)
{
    return r != NULL ? r->ngroups : 0;
}

const struct shaping_rule_info *
shaping_rule(const struct shaping_rules *r, unsigned i)
{
    return r != NULL && i < r->nrules ? &r->rules[i].info : NULL;
}

const char *
shaping_rules_group_name(const struct shaping_rules *r, unsigned g)
{
    return r != NULL && g < r->ngroups ? r->groups[g].name : NULL;
}

uint64_t
shaping_rule_hit_count(const struct shaping_rules *r, unsigned i)
{
    return r != NULL && r->hits != NULL && i < r->nrules ? atomic_load(&r->hits[i]) : 0;
}

void
shaping_rule_hit(const struct shaping_rules *r, unsigned i)
{
    if (r != NULL && r->hits != NULL && i < r->nrules)
        atomic_fetch_add(&((struct shaping_rules *)r)->hits[i], 1);
}

/* ---- parsing ---- */

static bool
name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n >= SHAPING_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '-' && s[i] != '_' && s[i] != '.')
            return false;
    return true;
}

/* The next word of *p into out (cap), quotes removed; false at the end.
 * *bad set on an unterminated quote or a word too long. */
static bool
next_word(const char **p, char *out, size_t cap, bool *bad)
{
    const char *s = *p;
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s == '\0' || *s == '#') {
        *p = s;
        return false;
    }
    size_t n = 0;
    bool q = false;
    for (; *s != '\0'; s++) {
        if (!q && (*s == ' ' || *s == '\t'))
            break;
        if (*s == '"') {
            q = !q;
            continue;
        }
        if (q && *s == '\\' && (s[1] == '"' || s[1] == '\\')) {
            /* \" is a quote; \\ stays \\ (a regex's escaped backslash) */
            if (s[1] == '\\' && n + 1 < cap)
                out[n++] = '\\';
            s++;
        }
        if (n + 1 >= cap) {
            *bad = true;
            return false;
        }
        out[n++] = *s;
    }
    if (q) {
        *bad = true;
        return false;
    }
    out[n] = '\0';
    *p = s;
    return true;
}

static int
find_group(const struct shaping_rules *r, const char *name)
{
    for (unsigned g = 0; g < r->ngroups; g++)
        if (strcasecmp(r->groups[g].name, name) == 0)
            return (int)g;
    return -1;
}

static int
parse_range(const char *s, struct srange *out)
{
    if (strcasecmp(s, "x") == 0 || strcmp(s, "*") == 0) {
        out->lo = 1;
        out->hi = 0;
        return 0;
    }
    char *end;
    unsigned long a = strtoul(s, &end, 10), b = a;
    if (end == s)
        return -1;
    if (*end == '-') {
        const char *t = end + 1;
        b = strtoul(t, &end, 10);
        if (end == t)
            return -1;
    }
    if (*end != '\0' || a > 999 || b > 999 || b < a)
        return -1;
    out->lo = (unsigned)a;
    out->hi = (unsigned)b;
    return 0;
}

static int
parse_enh(const char *v, struct srange out[3])
{
    char buf[64];
    if (strlen(v) >= sizeof(buf))
        return -1;
    snprintf(buf, sizeof(buf), "%s", v);
    char *parts[3], *save = NULL, *t = strtok_r(buf, ".", &save);
    unsigned n = 0;
    while (t != NULL && n < 3) {
        parts[n++] = t;
        t = strtok_r(NULL, ".", &save);
    }
    if (n != 3 || t != NULL)
        return -1;
    for (unsigned i = 0; i < 3; i++)
        if (parse_range(parts[i], &out[i]) < 0)
            return -1;
    if (out[0].lo <= out[0].hi && (out[0].lo < 2 || out[0].hi > 5))
        return -1;
    return 0;
}

/* The longest run of characters every match of the ERE re contains,
 * lowercased, into out: "" when there is none to rely on (an
 * alternation anywhere). */
static void
re_needle(const char *re, char *out, size_t cap)
{
    out[0] = '\0';
    if (strchr(re, '|') != NULL)
        return;
    char run[NEEDLE_MAX];
    size_t n = 0, best = 0;
    int depth = 0;
#define END_RUN()                                                                                \
    do {                                                                                         \
        if (n > best && n < cap) {                                                               \
            memcpy(out, run, n);                                                                 \
            out[n] = '\0';                                                                       \
            best = n;                                                                            \
        }                                                                                        \
        n = 0;                                                                                   \
    } while (0)
    for (const char *s = re; *s != '\0'; s++) {
        char c = *s;
        bool lit = false;
        if (c == '\\' && s[1] != '\0' && strchr(".[]()*+?{}|^$\\", s[1]) != NULL) {
            c = *++s;
            lit = true;
        } else if (c == '\\') {
            END_RUN();
            if (s[1] != '\0')
                s++;
            continue;
        } else if (c == '[') {
            END_RUN();
            /* skip the bracket expression: ']' first is a member, and
             * so is the ']' that closes a class, an equivalence class or
             * a collating element inside it ("[[:digit:]]", "[[=e=]]",
             * "[[.-.]]") */
            s++;
            if (*s == '^')
                s++;
            if (*s == ']')
                s++;
            while (*s != '\0' && *s != ']') {
                if (*s == '[' && (s[1] == ':' || s[1] == '=' || s[1] == '.')) {
                    char kind = s[1];
                    s += 2;
                    while (*s != '\0' && !(*s == kind && s[1] == ']'))
                        s++;
                    if (*s == '\0')
                        return;
                    s++; /* onto its ']' */
                }
                s++;
            }
            if (*s == '\0')
                return;
            continue;
        } else if (c == '(') {
            END_RUN();
            depth++;
            continue;
        } else if (c == ')') {
            END_RUN();
            depth--;
            /* an optional group: its runs were not kept (depth > 0) */
            continue;
        } else if (c == '*' || c == '?' || c == '{') {
            if (n > 0)
                n--; /* the character before may be absent */
            END_RUN();
            if (c == '{')
                while (s[1] != '\0' && *s != '}')
                    s++;
            continue;
        } else if (c == '+' || c == '.' || c == '^' || c == '$') {
            END_RUN();
            continue;
        } else {
            lit = true;
        }
        if (lit && depth == 0) {
            /* a quantifier after it makes it optional: looked at next */
            if (n + 1 < sizeof(run))
                run[n++] = (char)tolower((unsigned char)c);
        } else if (lit) {
            END_RUN();
        }
    }
    END_RUN();
#undef END_RUN
}

static int
add_group(struct shaping_rules *r, const char *line, const char *origin, unsigned ln, char *err,
          size_t errlen)
{
    char name[SHAPING_NAME_MAX + 1], w[256];
    bool bad = false;
    const char *p = line;
    if (!next_word(&p, name, sizeof(name), &bad) || !name_ok(name)) {
        snprintf(err, errlen, "%s:%u: group: a name of 1 to %d of A-Z a-z 0-9 . _ -", origin, ln,
                 SHAPING_NAME_MAX - 1);
        return -EINVAL;
    }
    if (find_group(r, name) >= 0)
        return 0; /* defined before (the operator's): that one holds */
    if (r->ngroups == 64) {
        snprintf(err, errlen, "%s:%u: more than 64 groups", origin, ln);
        return -EINVAL;
    }
    if (r->ngroups == r->gcap) {
        unsigned nc = r->gcap ? r->gcap * 2 : 8;
        struct sgroup *v = realloc(r->groups, nc * sizeof(*v));
        if (v == NULL)
            return -ENOMEM;
        r->groups = v;
        r->gcap = nc;
    }
    struct sgroup *g = &r->groups[r->ngroups];
    memset(g, 0, sizeof(*g));
    memcpy(g->name, name, strlen(name) + 1); /* name_ok: shorter than the field */
    while (next_word(&p, w, sizeof(w), &bad)) {
        if (g->npat == SHAPING_PATTERNS_MAX || strlen(w) > 253) {
            for (unsigned k = 0; k < g->npat; k++)
                free(g->pat[k]);
            snprintf(err, errlen, "%s:%u: group %s: at most %d patterns of at most 253 octets",
                     origin, ln, name, SHAPING_PATTERNS_MAX);
            return -EINVAL;
        }
        if ((g->pat[g->npat] = strdup(w)) == NULL)
            return -ENOMEM;
        g->npat++;
    }
    if (bad || g->npat == 0) {
        for (unsigned k = 0; k < g->npat; k++)
            free(g->pat[k]);
        snprintf(err, errlen, "%s:%u: group %s: needs MX patterns (*.example.com)", origin, ln,
                 name);
        return -EINVAL;
    }
    r->ngroups++;
    return 0;
}

static void
srule_clear(struct srule *x)
{
    free(x->mx);
    free(x->domain);
    if (x->has_re)
        regfree(&x->re);
    memset(x, 0, sizeof(*x));
}

static int
add_rule(struct shaping_rules *r, const char *line, const char *origin, unsigned ln, char *err,
         size_t errlen)
{
    if (r->nrules == r->cap) {
        unsigned nc = r->cap ? r->cap * 2 : 16;
        struct srule *v = realloc(r->rules, nc * sizeof(*v));
        if (v == NULL)
            return -ENOMEM;
        r->rules = v;
        r->cap = nc;
    }
    struct srule *x = &r->rules[r->nrules];
    memset(x, 0, sizeof(*x));
    x->group = -1;
    x->info.for_ms = 0;
    char name[SHAPING_NAME_MAX + 1], w[1024];
    bool bad = false, have_action = false, have_for = false;
    const char *p = line;
    if (!next_word(&p, name, sizeof(name), &bad) || !name_ok(name) || strchr(name, '=')) {
        snprintf(err, errlen, "%s:%u: rule: a name of 1 to %d of A-Z a-z 0-9 . _ -", origin, ln,
                 SHAPING_NAME_MAX - 1);
        return -EINVAL;
    }
    memcpy(x->name, name, strlen(name) + 1); /* name_ok: shorter than the field */
    snprintf(x->origin, sizeof(x->origin), "%s:%u", origin, ln);
    const char *why = NULL;
    char cost[160];
    while (why == NULL && next_word(&p, w, sizeof(w), &bad)) {
        char *eq = strchr(w, '=');
        if (eq == NULL) {
            why = "expected KEY=VALUE";
            break;
        }
        *eq = '\0';
        const char *k = w, *v = eq + 1;
        if (strcmp(k, "group") == 0) {
            if ((x->group = find_group(r, v)) < 0)
                why = "group: not defined (a \"group NAME PATTERN...\" line before)";
        } else if (strcmp(k, "mx") == 0 || strcmp(k, "domain") == 0) {
            char **dst = k[0] == 'm' ? &x->mx : &x->domain;
            free(*dst); /* a second mx= or domain= replaces the first */
            *dst = NULL;
            if (v[0] == '\0' || strlen(v) > 253)
                why = "mx, domain: a pattern (*.example.com or a host)";
            else if ((*dst = strdup(v)) == NULL)
                why = "out of memory";
        } else if (strcmp(k, "code") == 0) {
            if (strlen(v) == 3 && (v[0] == '4' || v[0] == '5') && (v[1] == 'x' || v[1] == 'X') &&
                (v[2] == 'x' || v[2] == 'X')) {
                x->code_cls = (unsigned)(v[0] - '0');
            } else {
                char *end;
                unsigned long c = strtoul(v, &end, 10);
                if (*end != '\0' || c < 200 || c > 599)
                    why = "code: 200..599, 4xx or 5xx";
                x->code = (unsigned)c;
            }
        } else if (strcmp(k, "enhanced") == 0) {
            if (parse_enh(v, x->enh) < 0)
                why = "enhanced: C.S.D, each a number, x or a range A-B (5.7.606-649)";
            x->has_enh = true;
        } else if (strcmp(k, "match") == 0) {
            if (x->has_re) {
                why = "match: given twice";
            } else if (re_cost_check(v, cost, sizeof(cost)) < 0) {
                snprintf(err, errlen, "%s:%u: rule %s: match: %s", origin, ln, name, cost);
                srule_clear(x);
                return -EINVAL;
            } else {
                int rc = regcomp(&x->re, v, REG_EXTENDED | REG_ICASE | REG_NOSUB);
                if (rc != 0) {
                    char b[128];
                    regerror(rc, &x->re, b, sizeof(b));
                    snprintf(err, errlen, "%s:%u: rule %s: match: %s", origin, ln, name, b);
                    srule_clear(x);
                    return -EINVAL;
                }
                x->has_re = true;
                re_needle(v, x->needle, sizeof(x->needle));
                x->needle_len = strlen(x->needle);
            }
        } else if (strcmp(k, "action") == 0) {
            have_action = true;
            unsigned kk = 0;
            for (; kk < SHAPING_KIND_COUNT; kk++)
                if (strcasecmp(v, kind_names[kk]) == 0)
                    break;
            if (kk == SHAPING_KIND_COUNT && strncasecmp(v, "cap:", 4) == 0) {
                char *end;
                unsigned long n = strtoul(v + 4, &end, 10);
                if (*end != '\0' || n == 0 || n > 100000)
                    why = "action=cap:N: N connections, 1..100000";
                kk = SHAPING_CAP;
                x->info.value = (unsigned)n;
            } else if (kk == SHAPING_KIND_COUNT && strncasecmp(v, "rate:", 5) == 0) {
                if (shaping_rate_parse(v + 5, &x->info.value, &x->info.per_ms) < 0)
                    why = "action=rate:R: a rate (10/s, 600/min) or a fraction of the "
                          "configured rate (0.5, 50%)";
                kk = SHAPING_RATE;
            } else if (kk == SHAPING_CAP || kk == SHAPING_RATE) {
                why = "action=cap:N, rate:R: give N or R";
            } else if (kk == SHAPING_KIND_COUNT) {
                why = "action: suspend, backoff, cap:N, rate:R, bounce or count";
            }
            x->info.kind = (enum shaping_kind)kk;
        } else if (strcmp(k, "scope") == 0) {
            unsigned s = 0;
            for (; s < SHAPING_SCOPE_COUNT; s++)
                if (strcasecmp(v, scope_names[s]) == 0)
                    break;
            if (s == SHAPING_SCOPE_COUNT)
                why = "scope: source, group, domain or tenant";
            x->info.scope = (enum shaping_scope)s;
        } else if (strcmp(k, "for") == 0) {
            have_for = true;
            if (conf_parse_duration(v, &x->info.for_ms) != 0 || x->info.for_ms == 0 ||
                x->info.for_ms > 30ULL * 86400000)
                why = "for: a duration, at most 30d (250ms, 30s, 5m, 4h, 1d)";
        } else {
            why = "unknown key (group, mx, domain, code, enhanced, match, action, scope, for)";
        }
    }
    if (why == NULL && bad)
        why = "an unterminated quote or a value too long";
    if (why == NULL && !have_action)
        why = "needs action=";
    if (why == NULL && !have_for && x->info.kind != SHAPING_COUNT)
        why = "needs for=DURATION";
    if (why == NULL && x->info.scope == SHAPING_SCOPE_TENANT &&
        (x->info.kind == SHAPING_BACKOFF || x->info.kind == SHAPING_CAP))
        why = "scope=tenant: action=suspend, rate:R, bounce or count (a tenant's jobs are "
              "set aside, slowed or bounced; connections are not a tenant's)";
    if (why == NULL && x->code == 0 && x->code_cls == 0 && !x->has_enh && !x->has_re)
        why = "needs code=, enhanced= or match=";
    if (why != NULL) {
        snprintf(err, errlen, "%s:%u: rule %s: %s", origin, ln, name, why);
        srule_clear(x);
        return -EINVAL;
    }
    for (unsigned i = 0; i < r->nrules; i++)
        if (strcasecmp(r->rules[i].name, x->name) == 0) {
            /* the first (the operator's) holds */
            srule_clear(x);
            return 0;
        }
    r->nrules++;
    return 0;
}

int
shaping_rules_add_text(struct shaping_rules *r, const char *text, const char *origin, char *err,
                       size_t errlen)
{
    if (r->finished)
        return -EINVAL;
    size_t ol = strlen(origin) + 1, tl = strlen(text) + 1;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    bool ok = md != NULL && EVP_DigestInit_ex(md, EVP_sha256(), NULL) &&
              EVP_DigestUpdate(md, r->src_digest, sizeof(r->src_digest)) &&
              EVP_DigestUpdate(md, origin, ol) && EVP_DigestUpdate(md, text, tl) &&
              EVP_DigestFinal_ex(md, r->src_digest, NULL);
    EVP_MD_CTX_free(md);
    if (!ok) {
        snprintf(err, errlen, "%s: out of memory", origin);
        return -ENOMEM;
    }
    r->srclen += ol + tl;
    unsigned ln = 0;
    const char *s = text;
    char line[4096];
    while (*s != '\0') {
        ln++;
        const char *nl = strchr(s, '\n');
        size_t n = nl ? (size_t)(nl - s) : strlen(s);
        if (n >= sizeof(line)) {
            snprintf(err, errlen, "%s:%u: line longer than %zu octets", origin, ln,
                     sizeof(line) - 1);
            return -EINVAL;
        }
        memcpy(line, s, n);
        line[n] = '\0';
        if (n > 0 && line[n - 1] == '\r')
            line[n - 1] = '\0';
        s = nl ? nl + 1 : s + n;
        char word[16];
        bool bad = false;
        const char *p = line;
        if (!next_word(&p, word, sizeof(word), &bad)) {
            if (bad) {
                snprintf(err, errlen, "%s:%u: expected group or rule", origin, ln);
                return -EINVAL;
            }
            continue; /* blank or comment */
        }
        int rc;
        if (strcmp(word, "group") == 0)
            rc = add_group(r, p, origin, ln, err, errlen);
        else if (strcmp(word, "rule") == 0)
            rc = add_rule(r, p, origin, ln, err, errlen);
        else {
            snprintf(err, errlen, "%s:%u: expected group or rule, not \"%s\"", origin, ln, word);
            rc = -EINVAL;
        }
        if (rc == -ENOMEM)
            snprintf(err, errlen, "%s:%u: out of memory", origin, ln);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int
shaping_rules_add_file(struct shaping_rules *r, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        int e = errno;
        snprintf(err, errlen, "%s: %s", path, strerror(e));
        return -e;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    char chunk[8192];
    size_t got;
    while ((got = fread(chunk, 1, sizeof(chunk), f)) > 0) {
        if (len + got + 1 > cap) {
            size_t nc = cap ? cap * 2 : 16384;
            while (nc < len + got + 1)
                nc *= 2;
            if (nc > 64u << 20) {
                fclose(f);
                free(buf);
                snprintf(err, errlen, "%s: larger than 64 MB", path);
                return -EFBIG;
            }
            char *v = realloc(buf, nc);
            if (v == NULL) {
                fclose(f);
                free(buf);
                return -ENOMEM;
            }
            buf = v;
            cap = nc;
        }
        memcpy(buf + len, chunk, got);
        len += got;
    }
    bool ferr = ferror(f) != 0;
    fclose(f);
    if (ferr) {
        free(buf);
        snprintf(err, errlen, "%s: read error", path);
        return -EIO;
    }
    if (buf == NULL)
        return 0;
    buf[len] = '\0';
    if (memchr(buf, '\0', len) != NULL) {
        free(buf);
        snprintf(err, errlen, "%s: a NUL octet (not a text file)", path);
        return -EINVAL;
    }
    int rc = shaping_rules_add_text(r, buf, path, err, errlen);
    free(buf);
    return rc;
}

static bool
code_fits(const struct srule *x, unsigned code)
{
    if (x->code != 0)
        return x->code == code;
    if (x->code_cls != 0)
        return code / 100 == x->code_cls;
    return true;
}

int
shaping_rules_finish(struct shaping_rules *r)
{
    unsigned slots = CODE_SPAN * (r->ngroups + 1);
    free(r->off);
    free(r->idx);
    free(r->hits);
    r->off = calloc(slots + 1, sizeof(*r->off));
    r->hits = calloc(r->nrules ? r->nrules : 1, sizeof(*r->hits));
    if (r->off == NULL || r->hits == NULL)
        return -ENOMEM;
    /* count, then fill */
    size_t total = 0;
    for (unsigned c = 0; c < CODE_SPAN; c++)
        for (unsigned i = 0; i < r->nrules; i++)
            if (code_fits(&r->rules[i], CODE_MIN + c)) {
                r->off[c * (r->ngroups + 1) + (unsigned)(r->rules[i].group + 1) + 1]++;
                total++;
            }
    for (unsigned s = 0; s < slots; s++)
        r->off[s + 1] += r->off[s];
    r->idx = malloc((total ? total : 1) * sizeof(*r->idx));
    uint32_t *at = malloc((slots ? slots : 1) * sizeof(*at));
    if (r->idx == NULL || at == NULL) {
        free(at);
        return -ENOMEM;
    }
    memcpy(at, r->off, slots * sizeof(*at));
    for (unsigned c = 0; c < CODE_SPAN; c++)
        for (unsigned i = 0; i < r->nrules; i++)
            if (code_fits(&r->rules[i], CODE_MIN + c))
                r->idx[at[c * (r->ngroups + 1) + (unsigned)(r->rules[i].group + 1)]++] = i;
    free(at);
    for (unsigned i = 0; i < r->nrules; i++) {
        struct srule *x = &r->rules[i];
        x->info.name = x->name;
        x->info.origin = x->origin;
        x->info.group = x->group >= 0 ? r->groups[x->group].name : NULL;
    }
    r->finished = true;
    return 0;
}

static bool
host_in(const struct sgroup *g, const char *host)
{
    size_t hl = strlen(host);
    while (hl > 0 && host[hl - 1] == '.')
        hl--;
    for (unsigned k = 0; k < g->npat; k++)
        if (hl > 0 && config_host_matches(g->pat[k], host, hl))
            return true;
    return false;
}

int
shaping_rules_group_of(const struct shaping_rules *r, const char *host)
{
    if (r == NULL || host == NULL || host[0] == '\0')
        return -1;
    for (unsigned g = 0; g < r->ngroups; g++)
        if (host_in(&r->groups[g], host))
            return (int)g;
    return -1;
}

bool
shaping_rules_in_group(const struct shaping_rules *r, const char *group, const char *host)
{
    if (r == NULL || group == NULL || host == NULL)
        return false;
    int g = find_group(r, group);
    return g >= 0 && host_in(&r->groups[g], host);
}

static bool
in_range(const struct srange *x, unsigned v)
{
    return x->lo > x->hi || (v >= x->lo && v <= x->hi);
}

static bool
pattern_ok(const char *pat, const char *host)
{
    if (pat == NULL)
        return true;
    if (host == NULL)
        return false;
    size_t hl = strlen(host);
    while (hl > 0 && host[hl - 1] == '.')
        hl--;
    return hl > 0 && config_host_matches(pat, host, hl);
}

static bool
rule_fits(const struct srule *x, const struct shaping_reply *rep, const char *low, size_t lowlen)
{
    if (x->has_enh && (rep->enh_cls == 0 || !in_range(&x->enh[0], rep->enh_cls) ||
                       !in_range(&x->enh[1], rep->enh_subject) ||
                       !in_range(&x->enh[2], rep->enh_detail)))
        return false;
    if (!pattern_ok(x->mx, rep->mx) || !pattern_ok(x->domain, rep->domain))
        return false;
    if (!x->has_re)
        return true;
    if (x->needle_len > 0 && memmem(low, lowlen, x->needle, x->needle_len) == NULL)
        return false;
    return regexec(&x->re, low, 0, NULL, 0) == 0;
}

int
shaping_rules_match(const struct shaping_rules *r, const struct shaping_reply *rep)
{
    if (r == NULL || !r->finished || r->nrules == 0 || rep->code < CODE_MIN ||
        rep->code >= CODE_MIN + CODE_SPAN)
        return -1;
    /* The text, lowercased and bounded once: the literals are lowercase,
     * the regexes case-insensitive. */
    char low[TEXT_SCAN + 1];
    size_t n = 0;
    const char *t = rep->text ? rep->text : "";
    for (; t[n] != '\0' && n < TEXT_SCAN; n++)
        low[n] = (char)tolower((unsigned char)t[n]);
    low[n] = '\0';
    int g = shaping_rules_group_of(r, rep->mx);
    unsigned base = (rep->code - CODE_MIN) * (r->ngroups + 1);
    const uint32_t *a = r->idx + r->off[base], *ae = r->idx + r->off[base + 1];
    const uint32_t *b = a, *be = a;
    if (g >= 0) {
        b = r->idx + r->off[base + (unsigned)g + 1];
        be = r->idx + r->off[base + (unsigned)g + 2];
    }
    /* merge the two lists in load order: the first match wins */
    while (a < ae || b < be) {
        uint32_t i = (b >= be || (a < ae && *a < *b)) ? *a++ : *b++;
        if (rule_fits(&r->rules[i], rep, low, n))
            return (int)i;
    }
    return -1;
}
