/*
 * config: INI file -> struct config (see config.h), against the key
 * tables of engine/config_keys.c.
 *
 * inih parses the lines; the reader callback hands it one whole line at a
 * time from a buffer of ours, counts the lines (Debian's inih does not
 * pass line numbers to the handler), enters the sections (inih cuts their
 * names to 49 characters) and reports every line that is not a header, a
 * key or a comment (inih returns the first). A line may hold
 * CONFIG_LINE_MAX characters, room for the longest value of any key (each
 * key has its own limit, checked by conf_set) and for long lists on one
 * line. inih's own buffer is 200 octets unless told otherwise: Debian
 * builds it with runtime options (ini_use_stack, ini_allow_realloc,
 * ini_max_line; a patch of Debian's, not upstream inih's), which are set
 * once, before the first parse, for a heap buffer that grows to
 * CONFIG_LINE_MAX (and for lines that stand alone: ini_allow_multiline
 * off, inih_options()). The reader never hands inih a longer line: it
 * reports one as an error and hands an empty line instead, so inih's count
 * of lines stays ours.
 * Values are checked as they are read, so each error carries its line;
 * per-domain config_sections keep their raw values and are applied after the
 * whole file is read, so that [domain *] may come after the domains that
 * inherit from it.
 *
 * Threading: config_load() on any thread, several at once included (each
 * parse has its own state; inih's options are set once, under
 * pthread_once, and only read after).
 */
#include "engine/config.h"
#include "engine/config_int.h"

#include "engine/classify.h"
#include "engine/shaping.h"
#include "engine/events.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdarg.h>
#include <strings.h>
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "engine/classify.h"

#define MAX_KEYS 64

/* The most characters a line may hold, its line end not counted. */
#define CONFIG_LINE_MAX 65536
/* The most characters between the brackets of a section header: more than
 * the longest valid one, [dkim DOMAIN SELECTOR] of 253 + 127. */
#define SECTION_NAME_MAX 511

/* ---- parsing ---- */

struct raw_value {
    unsigned key;  /* index into config_domain_keys */
    unsigned line;
    char *value;   /* owned */
};

struct domain_build {
    char *name;               /* owned until moved into the policy */
    unsigned line;
    struct raw_value *values; /* owned */
    unsigned nvalues, cap;
};

/* A [dkim DOMAIN SELECTOR] section as read; its key is loaded in finish(),
 * once [dkim] (which may come later) is known. */
struct dkim_build {
    char *domain, *selector; /* owned */
    unsigned line;
    struct dkim_sig_config sc;
    unsigned key_line[8];    /* per dkim_sig_conf_keys entry */
};

struct parse {
    const char *path;
    FILE *errs;
    FILE *in;
    char *buf;               /* owned: the line being handed to inih, with its line end */
    size_t buf_len, buf_off; /* its length; how much of it inih has taken */
    int read_err;            /* errno of a failed read, 0 none */
    unsigned nsyntax;        /* lines that inih cannot parse, reported */
    unsigned nerrors;
    unsigned line;           /* of the line inih is handling */
    unsigned header_line;    /* of the last [section] header */
    struct config *cfg;

    int sec;                 /* index into config_sections, -1 none, -2 domain, -3 unknown */
    struct domain_build *dom;
    unsigned set_line[NSECTIONS][MAX_KEYS];

    struct domain_build *doms; /* owned */
    unsigned ndoms, domcap;

    struct mx_policy **lim_v; /* the [mx] or [source] section being read: (*lim_v)[lim_i] */
    unsigned lim_i;
    struct lim_set {          /* keys set in [mx] and [source] config_sections, with their line */
        struct mx_policy **v;
        unsigned i, key, line;
    } *lim_set;               /* owned */
    unsigned nlim_set, lim_set_cap;

    struct dkim_build *dkims; /* owned */
    unsigned ndkims;
    struct dkim_build *dkim;  /* the one being read */
    unsigned ev_i; /* the [events] section being read: cfg->events[ev_i] */
    unsigned ev_set_line[EVENTS_SINKS_MAX][MAX_KEYS]; /* where each key of each was set */
    unsigned named_i; /* the [pool] or [tenant] section being read */
    unsigned warmup_i; /* the [warmup] section being read: cfg->warmups[warmup_i] */
};

static void __attribute__((format(printf, 3, 4)))
perr(struct parse *p, unsigned line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (line)
        fprintf(p->errs, "%s:%u: ", p->path, line);
    else
        fprintf(p->errs, "%s: ", p->path);
    vfprintf(p->errs, fmt, ap);
    fputc('\n', p->errs);
    va_end(ap);
    p->nerrors++;
}

/* " (did you mean \"NAME\"?)" for an unknown key close to one of keys
 * (a typo), else "": into buf. */
static const char *
key_hint(char *buf, size_t len, const struct conf_key *keys, const char *name)
{
    const char *s = conf_suggest(keys, name);
    if (s == NULL)
        return "";
    snprintf(buf, len, " (did you mean \"%s\"?)", s);
    return buf;
}

/* The same for an unknown section header: a plain section ([delivery]),
 * or the kind of one that takes a name ([domain NAME], ...). */
static const char *
section_hint(char *buf, size_t len, const char *section)
{
    static const char *const kinds[] = {"domain", "mx",   "source", "dkim",
                                        "events", "pool", "tenant", "warmup"};
    const char *plain[NSECTIONS + 1];
    size_t n = 0;
    for (unsigned i = 0; i < NSECTIONS; i++)
        plain[n++] = config_sections[i].name;
    plain[n++] = "classify";
    size_t wl = strcspn(section, " \t");
    const char *rest = section + wl;
    while (*rest == ' ' || *rest == '\t')
        rest++;
    char word[65];
    if (wl >= sizeof(word))
        return "";
    memcpy(word, section, wl);
    word[wl] = '\0';
    const char *s = *rest == '\0' ? conf_suggest_name(word, plain, n)
                                  : conf_suggest_name(word, kinds, sizeof(kinds) / sizeof(kinds[0]));
    if (s == NULL)
        return "";
    snprintf(buf, len, " (did you mean \"[%s%s%.*s]\"?)", s, *rest ? " " : "", 128, rest);
    return buf;
}

static void enter_section(struct parse *p, const char *section);

/* inih's find_chars_or_comment(): the first of chars in s, or the ';' of
 * an inline comment (one after white space), or the end of s. */
static const char *
line_find(const char *s, const char *chars)
{
    bool was_space = false;
    while (*s != '\0' && strchr(chars, *s) == NULL && !(was_space && *s == ';')) {
        was_space = isspace((unsigned char)*s);
        s++;
    }
    return s;
}

/* Read the next line of the file into p->buf, line end included. Returns
 * 0, or -1 at the end of the file or at a read error (in p->read_err,
 * which config_load reports: a directory opens, then fails to read). A
 * line longer than CONFIG_LINE_MAX characters, or one holding a NUL, is
 * reported and becomes an empty line: inih would cut it (or stop at the
 * NUL) and read the rest as lines of their own. */
static int
next_line(struct parse *p)
{
    const size_t cap = CONFIG_LINE_MAX + 2; /* room for "\r\n" */
    size_t n = 0;
    bool nul = false;
    int c;
    while ((c = getc(p->in)) != EOF) {
        if (n < cap)
            p->buf[n] = (char)c;
        n++;
        if (c == '\0')
            nul = true;
        if (c == '\n')
            break;
    }
    if (c == EOF && ferror(p->in)) {
        p->read_err = errno;
        return -1;
    }
    if (n == 0)
        return -1;
    p->line++;
    size_t len = n; /* the characters, line end not counted */
    if (n <= cap) {
        if (len > 0 && p->buf[len - 1] == '\n')
            len--;
        if (len > 0 && p->buf[len - 1] == '\r')
            len--;
    }
    if (len > CONFIG_LINE_MAX || nul) {
        if (nul)
            perr(p, p->line, "a NUL character: not a text line");
        else
            perr(p, p->line, "line longer than %d characters", CONFIG_LINE_MAX);
        n = 0;
        p->buf[n++] = '\n';
    }
    p->buf[n] = '\0';
    p->buf_len = n;
    p->buf_off = 0;

    /* The line as inih will see it, by inih's tests: after a byte order
     * mark and white space, nothing or a comment; a header, '[' then a
     * ']' before any inline comment; or a key, with '=' or ':' before
     * any inline comment. inih returns the first line that is none of
     * these; each is reported here, as --check-config promises every
     * error. Sections are entered here, not from the name inih passes to
     * on_key: inih cuts that to 49 characters (its MAX_SECTION), and
     * [dkim DOMAIN SELECTOR] or [domain NAME] are often longer. A section
     * without keys, such as a [source] that keeps every default, exists
     * all the same. */
    const char *s = p->buf;
    if (p->line == 1 && strncmp(s, "\xEF\xBB\xBF", 3) == 0)
        s += 3;
    while (isspace((unsigned char)*s))
        s++;
    if (*s == '\0' || *s == ';' || *s == '#')
        return 0;
    const char *end = *s == '[' ? line_find(s + 1, "]") : line_find(s, "=:");
    if (*end == '\0' || *end == ';') {
        perr(p, p->line, "not a [section] header, a key = value line, or a comment");
        p->nsyntax++;
        return 0;
    }
    if (*s == '[') {
        const char *close = end;
        p->header_line = p->line;
        size_t nlen = (size_t)(close - s - 1);
        if (nlen > SECTION_NAME_MAX) {
            perr(p, p->line, "[%.40s...]: section header longer than %d characters", s + 1,
                 SECTION_NAME_MAX);
            p->dom = NULL;
            p->sec = -3;
        } else {
            char name[SECTION_NAME_MAX + 1];
            memcpy(name, s + 1, nlen);
            name[nlen] = '\0';
            enter_section(p, name);
        }
    }
    return 0;
}

/* inih's fgets: the next line, or as much of it as fits in num - 1
 * octets; inih (its buffer growing to CONFIG_LINE_MAX + 3) asks again
 * for the rest, so a line is always taken whole. */
static char *
reader(char *str, int num, void *stream)
{
    struct parse *p = stream;
    if (num < 2)
        return NULL;
    if (p->buf_off == p->buf_len && next_line(p) < 0)
        return NULL;
    size_t n = p->buf_len - p->buf_off;
    if (n > (size_t)num - 1)
        n = (size_t)num - 1;
    memcpy(str, p->buf + p->buf_off, n);
    str[n] = '\0';
    p->buf_off += n;
    return str;
}

/* Debian's inih reads these options at every parse; they are process-wide.
 * Multi-line values (Python configparser's: an indented line after a key
 * continues its value) are off: the reference has every line stand alone,
 * lists are comma-separated on one line, and with them the second of two
 * indented keys was taken for the first one's value ("workers: set twice"
 * on a line that sets hostname). An indented key is a key. */
static void
inih_options(void)
{
    ini_allow_multiline = false;
    ini_use_stack = false;
    ini_allow_realloc = true;
    ini_max_line = CONFIG_LINE_MAX + 3; /* "\r\n" and the NUL */
}

static bool
valid_domain_name(const char *s)
{
    size_t len = strlen(s);
    if (len == 0 || len > 253)
        return false;
    size_t label = 0;
    for (const char *c = s; *c; c++) {
        if (*c == '.') {
            if (label == 0 || c[-1] == '-')
                return false;
            label = 0;
            continue;
        }
        if (!isalnum((unsigned char)*c) && *c != '-' && *c != '_')
            return false;
        if (label == 0 && *c == '-')
            return false;
        if (++label > 63)
            return false;
    }
    return label != 0 && s[len - 1] != '-';
}

static struct domain_build *
domain_section(struct parse *p, const char *arg)
{
    char name[256];
    size_t len = strlen(arg);
    if (len >= sizeof(name)) {
        perr(p, p->header_line, "[domain ...]: name too long");
        return NULL;
    }
    for (size_t i = 0; i <= len; i++)
        name[i] = (char)tolower((unsigned char)arg[i]);
    if (len > 1 && name[len - 1] == '.')
        name[--len] = '\0';
    if (strcmp(name, "*") != 0 && !valid_domain_name(name)) {
        perr(p, p->header_line, "[domain %s]: not a domain name (or * for the default)", arg);
        return NULL;
    }
    for (unsigned i = 0; i < p->ndoms; i++)
        if (strcmp(p->doms[i].name, name) == 0)
            return &p->doms[i]; /* a section may be continued further down */
    if (p->ndoms == p->domcap) {
        unsigned cap = p->domcap ? p->domcap * 2 : 8;
        struct domain_build *d = realloc(p->doms, sizeof(*d) * cap);
        if (d == NULL) {
            perr(p, p->line, "out of memory");
            return NULL;
        }
        p->doms = d;
        p->domcap = cap;
    }
    struct domain_build *d = &p->doms[p->ndoms];
    memset(d, 0, sizeof(*d));
    d->name = strdup(name);
    if (d->name == NULL) {
        perr(p, p->line, "out of memory");
        return NULL;
    }
    d->line = p->header_line;
    p->ndoms++;
    return d;
}

/* Enter the [mx] or [source] section named name: a new one at the end
 * of *v (*n entries) with the keys' defaults, or one met before (a
 * section may be continued further down, as [domain] ones). Returns 0,
 * or -1 when reported. */
static int
limit_section_add(struct parse *p, struct mx_policy **v, unsigned *n, const char *name)
{
    p->lim_v = v;
    for (unsigned i = 0; i < *n; i++)
        if (strcmp((*v)[i].pattern, name) == 0) {
            p->lim_i = i;
            return 0;
        }
    p->lim_i = *n;
    struct mx_policy *nv = realloc(*v, (*n + 1) * sizeof(*nv));
    if (nv == NULL) {
        perr(p, p->line, "out of memory");
        return -1;
    }
    *v = nv;
    struct mx_policy *m = &nv[*n];
    memset(m, 0, sizeof(*m));
    char why[256];
    if (conf_defaults(v == &p->cfg->sources ? config_source_keys : config_mx_keys, m, why, sizeof(why)) < 0 ||
        (m->pattern = strdup(name)) == NULL) {
        perr(p, p->line, "out of memory");
        return -1;
    }
    m->line = p->header_line;
    (*n)++;
    return 0;
}

/* [mx PATTERN]: "*.example.com" or an exact host name. */
static int
mx_section(struct parse *p, const char *arg)
{
    while (*arg == ' ' || *arg == '\t')
        arg++;
    char name[256];
    size_t len = strlen(arg);
    if (len >= sizeof(name)) {
        perr(p, p->header_line, "[mx ...]: pattern too long");
        return -1;
    }
    for (size_t i = 0; i <= len; i++)
        name[i] = (char)tolower((unsigned char)arg[i]);
    if (len > 1 && name[len - 1] == '.')
        name[--len] = '\0';
    const char *host = strncmp(name, "*.", 2) == 0 ? name + 2 : name;
    if (!valid_domain_name(host)) {
        perr(p, p->header_line, "[mx %s]: not a host name or *.suffix pattern", arg);
        return -1;
    }
    return limit_section_add(p, &p->cfg->mxs, &p->cfg->nmxs, name);
}

/* [source ADDRESS]: an IPv4 or IPv6 address, as in [delivery] source_address. */
static int
source_section(struct parse *p, const char *arg)
{
    while (*arg == ' ' || *arg == '\t')
        arg++;
    unsigned char bin[16];
    char text[INET6_ADDRSTRLEN];
    int fam = strchr(arg, ':') ? AF_INET6 : AF_INET;
    if (inet_pton(fam, arg, bin) != 1 || inet_ntop(fam, bin, text, sizeof(text)) == NULL) {
        perr(p, p->header_line, "[source %s]: not an IPv4 or IPv6 address", arg);
        return -1;
    }
    return limit_section_add(p, &p->cfg->sources, &p->cfg->nsources, text);
}

/* [dkim DOMAIN SELECTOR] (DOMAIN may be *). */
static int
dkim_section(struct parse *p, const char *arg)
{
    char d[256], sel[128], extra[2];
    if (sscanf(arg, " %255s %127s %1s", d, sel, extra) != 2) {
        perr(p, p->header_line, "[dkim %s]: expected [dkim DOMAIN SELECTOR] (DOMAIN may be *)",
             arg);
        return -1;
    }
    for (char *c = d; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    size_t dl = strlen(d);
    if (dl > 1 && d[dl - 1] == '.')
        d[--dl] = '\0';
    if (strcmp(d, "*") != 0 && !valid_domain_name(d)) {
        perr(p, p->header_line, "[dkim %s]: %s is not a domain name (or * for the default)", arg,
             d);
        return -1;
    }
    for (unsigned i = 0; i < p->ndkims; i++)
        if (strcmp(p->dkims[i].domain, d) == 0 && strcmp(p->dkims[i].selector, sel) == 0) {
            p->dkim = &p->dkims[i]; /* continued further down */
            return 0;
        }
    struct dkim_build *v = realloc(p->dkims, (p->ndkims + 1) * sizeof(*v));
    if (v == NULL) {
        perr(p, p->line, "out of memory");
        return -1;
    }
    p->dkims = v;
    struct dkim_build *b = &v[p->ndkims];
    memset(b, 0, sizeof(*b));
    char why[256];
    if (conf_defaults(dkim_sig_conf_keys, &b->sc, why, sizeof(why)) < 0 ||
        (b->domain = strdup(d)) == NULL || (b->selector = strdup(sel)) == NULL) {
        free(b->domain);
        perr(p, p->line, "out of memory");
        return -1;
    }
    b->line = p->header_line;
    p->ndkims++;
    p->dkim = b;
    return 0;
}

/* [events NAME]: one event sink; a section may be continued further down. */
static int
events_section(struct parse *p, const char *arg)
{
    while (*arg == ' ' || *arg == '\t')
        arg++;
    struct config *cfg = p->cfg;
    for (unsigned i = 0; i < cfg->nevents; i++)
        if (strcmp(cfg->events[i].name, arg) == 0) {
            p->ev_i = i;
            return 0;
        }
    if (cfg->nevents == EVENTS_SINKS_MAX) {
        perr(p, p->header_line, "[events %s]: at most %d [events] sections", arg,
             EVENTS_SINKS_MAX);
        return -1;
    }
    struct events_sink_config *nv = realloc(cfg->events, (cfg->nevents + 1) * sizeof(*nv));
    if (nv == NULL) {
        perr(p, p->line, "out of memory");
        return -1;
    }
    cfg->events = nv;
    struct events_sink_config *c = &nv[cfg->nevents];
    memset(c, 0, sizeof(*c));
    char why[256];
    if (conf_defaults(events_sink_keys, c, why, sizeof(why)) < 0 || (c->name = strdup(arg)) == NULL) {
        conf_free(events_sink_keys, c);
        perr(p, p->line, "out of memory");
        return -1;
    }
    c->line = p->header_line;
    p->ev_i = cfg->nevents++;
    return 0;
}

bool
config_name_valid(const char *s, size_t len)
{
    if (len == 0 || len > CONFIG_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '.' && s[i] != '_' && s[i] != '-')
            return false;
    return true;
}

/* [warmup NAME]: a warm-up plan (warmup_conf.h); a section may be
 * continued further down. */
static int
warmup_section(struct parse *p, const char *arg)
{
    while (*arg == ' ' || *arg == '\t')
        arg++;
    struct config *cfg = p->cfg;
    if (!config_name_valid(arg, strlen(arg))) {
        perr(p, p->header_line, "[warmup %s]: a plan name is 1 to %d of A-Z a-z 0-9 . _ -", arg,
             CONFIG_NAME_MAX);
        return -1;
    }
    for (unsigned i = 0; i < cfg->nwarmups; i++)
        if (strcasecmp(cfg->warmups[i].name, arg) == 0) {
            p->warmup_i = i;
            return 0;
        }
    struct warmup_plan_conf *nv = realloc(cfg->warmups, (cfg->nwarmups + 1) * sizeof(*nv));
    if (nv == NULL) {
        perr(p, p->line, "out of memory");
        return -1;
    }
    cfg->warmups = nv;
    struct warmup_plan_conf *pl = &nv[cfg->nwarmups];
    memset(pl, 0, sizeof(*pl));
    if ((pl->name = strdup(arg)) == NULL) {
        perr(p, p->line, "out of memory");
        return -1;
    }
    pl->line = p->header_line;
    p->warmup_i = cfg->nwarmups++;
    return 0;
}

/* [pool NAME] and [tenant NAME]: a section may be continued further down
 * (names compare case-insensitively). kind is "pool" or "tenant". */
static int
named_section(struct parse *p, const char *kind, const char *arg)
{
    while (*arg == ' ' || *arg == '\t')
        arg++;
    struct config *cfg = p->cfg;
    bool pool = kind[0] == 'p';
    if (!config_name_valid(arg, strlen(arg))) {
        perr(p, p->header_line,
             "[%s %s]: a %s name is 1 to %d of A-Z a-z 0-9 . _ -", kind, arg, kind,
             CONFIG_NAME_MAX);
        return -1;
    }
    unsigned n = pool ? cfg->npools : cfg->ntenants;
    for (unsigned i = 0; i < n; i++)
        if (strcasecmp(pool ? cfg->pools[i].name : cfg->tenants[i].name, arg) == 0) {
            p->named_i = i;
            return 0;
        }
    char why[256];
    char *name = strdup(arg);
    if (name == NULL) {
        perr(p, p->line, "out of memory");
        return -1;
    }
    if (pool) {
        struct pool_config *nv = realloc(cfg->pools, (n + 1) * sizeof(*nv));
        if (nv == NULL) {
            free(name);
            perr(p, p->line, "out of memory");
            return -1;
        }
        cfg->pools = nv;
        memset(&nv[n], 0, sizeof(nv[n]));
        conf_defaults(config_pool_keys, &nv[n], why, sizeof(why));
        nv[n].name = name;
        nv[n].line = p->header_line;
        cfg->npools++;
    } else {
        struct tenant_config *nv = realloc(cfg->tenants, (n + 1) * sizeof(*nv));
        if (nv == NULL) {
            free(name);
            perr(p, p->line, "out of memory");
            return -1;
        }
        cfg->tenants = nv;
        memset(&nv[n], 0, sizeof(nv[n]));
        conf_defaults(config_tenant_keys, &nv[n], why, sizeof(why));
        nv[n].name = name;
        nv[n].line = p->header_line;
        cfg->ntenants++;
    }
    p->named_i = n;
    return 0;
}

static void
enter_section(struct parse *p, const char *section)
{
    p->dom = NULL;
    if (strncmp(section, "domain", 6) == 0 && (section[6] == ' ' || section[6] == '\t')) {
        const char *arg = section + 7;
        while (*arg == ' ' || *arg == '\t')
            arg++;
        p->dom = domain_section(p, arg);
        p->sec = p->dom ? -2 : -3;
        return;
    }
    for (unsigned i = 0; i < NSECTIONS; i++)
        if (strcmp(section, config_sections[i].name) == 0) {
            p->sec = (int)i;
            return;
        }
    if (strcmp(section, "classify") == 0) {
        p->sec = -4;
        return;
    }
    if (strncmp(section, "mx", 2) == 0 && (section[2] == ' ' || section[2] == '\t')) {
        p->sec = mx_section(p, section + 3) == 0 ? -5 : -3;
        return;
    }
    if (strncmp(section, "source", 6) == 0 && (section[6] == ' ' || section[6] == '\t')) {
        p->sec = source_section(p, section + 7) == 0 ? -6 : -3;
        return;
    }
    if (strncmp(section, "dkim", 4) == 0 && (section[4] == ' ' || section[4] == '\t')) {
        p->sec = dkim_section(p, section + 5) == 0 ? -7 : -3;
        return;
    }
    if (strncmp(section, "events", 6) == 0 && (section[6] == ' ' || section[6] == '\t')) {
        p->sec = events_section(p, section + 7) == 0 ? -8 : -3;
        return;
    }
    if (strncmp(section, "pool", 4) == 0 && (section[4] == ' ' || section[4] == '\t')) {
        p->sec = named_section(p, "pool", section + 5) == 0 ? -9 : -3;
        return;
    }
    if (strncmp(section, "tenant", 6) == 0 && (section[6] == ' ' || section[6] == '\t')) {
        p->sec = named_section(p, "tenant", section + 7) == 0 ? -10 : -3;
        return;
    }
    if (strncmp(section, "warmup", 6) == 0 && (section[6] == ' ' || section[6] == '\t')) {
        p->sec = warmup_section(p, section + 7) == 0 ? -11 : -3;
        return;
    }
    p->sec = -3;
    char hint[300];
    if (section[0] == '\0')
        perr(p, p->line, "keys must follow a section header such as [server]");
    else
        perr(p, p->header_line, "[%s]: unknown section%s", section,
             section_hint(hint, sizeof(hint), section));
}

static int
on_key(void *user, const char *section, const char *name, const char *value)
{
    struct parse *p = user;
    (void)section; /* cut to 49 characters: next_line() entered the section */
    if (p->sec == -1)
        enter_section(p, "");
    if (p->sec == -3)
        return 1; /* already reported */

    char why[256], hint[160];
    if (p->sec == -11) {
        if (warmup_conf_key(&p->cfg->warmups[p->warmup_i], name, value, p->line, why,
                            sizeof(why)) < 0)
            perr(p, p->line, "%s", why);
        return 1;
    }
    if (p->sec == -7) {
        struct dkim_build *b = p->dkim;
        const struct conf_key *k = conf_find(dkim_sig_conf_keys, name);
        if (k == NULL) {
            perr(p, p->line, "%s: unknown key in [dkim %s %s]%s", name, b->domain, b->selector,
                 key_hint(hint, sizeof(hint), dkim_sig_conf_keys, name));
            return 1;
        }
        unsigned *first = &b->key_line[k - dkim_sig_conf_keys];
        if (*first != 0) {
            perr(p, p->line, "%s: set twice in [dkim %s %s] (first at line %u)", name, b->domain,
                 b->selector, *first);
            return 1;
        }
        *first = p->line;
        if (conf_set(dkim_sig_conf_keys, &b->sc, name, value, why, sizeof(why)) < 0)
            perr(p, p->line, "%s: %s", name, why);
        return 1;
    }
    if (p->sec == -9 || p->sec == -10) {
        bool pool = p->sec == -9;
        const struct conf_key *keys = pool ? config_pool_keys : config_tenant_keys;
        void *obj = pool ? (void *)&p->cfg->pools[p->named_i] : (void *)&p->cfg->tenants[p->named_i];
        const char *sname = pool ? p->cfg->pools[p->named_i].name : p->cfg->tenants[p->named_i].name;
        unsigned *lines = pool ? p->cfg->pools[p->named_i].key_line
                               : p->cfg->tenants[p->named_i].key_line;
        const struct conf_key *k = conf_find(keys, name);
        if (k == NULL) {
            perr(p, p->line, "%s: unknown key in [%s %s]%s", name, pool ? "pool" : "tenant", sname,
                 key_hint(hint, sizeof(hint), keys, name));
            return 1;
        }
        unsigned *first = &lines[k - keys];
        if (*first != 0) {
            perr(p, p->line, "%s: set twice in [%s %s] (first at line %u)", name,
                 pool ? "pool" : "tenant", sname, *first);
            return 1;
        }
        *first = p->line;
        if (conf_set(keys, obj, name, value, why, sizeof(why)) < 0)
            perr(p, p->line, "%s: %s", name, why);
        return 1;
    }
    if (p->sec == -5 || p->sec == -6) {
        struct mx_policy *m = &(*p->lim_v)[p->lim_i];
        const struct conf_key *lkeys = p->sec == -6 ? config_source_keys : config_mx_keys;
        const struct conf_key *k = conf_find(lkeys, name);
        if (k != NULL) {
            /* as in every other section: a key once, wherever the section
             * goes on further down */
            unsigned idx = (unsigned)(k - lkeys);
            for (unsigned i = 0; i < p->nlim_set; i++) {
                const struct lim_set *ls = &p->lim_set[i];
                if (ls->v == p->lim_v && ls->i == p->lim_i && ls->key == idx) {
                    perr(p, p->line, "%s: set twice in [%s %s] (first at line %u)", name,
                         p->sec == -5 ? "mx" : "source", m->pattern, ls->line);
                    return 1;
                }
            }
            if (p->nlim_set == p->lim_set_cap) {
                unsigned cap = p->lim_set_cap ? p->lim_set_cap * 2 : 16;
                struct lim_set *v = realloc(p->lim_set, cap * sizeof(*v));
                if (v == NULL) {
                    perr(p, p->line, "out of memory");
                    return 1;
                }
                p->lim_set = v;
                p->lim_set_cap = cap;
            }
            p->lim_set[p->nlim_set++] = (struct lim_set){p->lim_v, p->lim_i, idx, p->line};
        }
        if (k == NULL)
            perr(p, p->line, "%s: unknown key in [%s %s]%s", name, p->sec == -5 ? "mx" : "source",
                 m->pattern, key_hint(hint, sizeof(hint), lkeys, name));
        else if (conf_set(lkeys, m, name, value, why, sizeof(why)) < 0)
            perr(p, p->line, "%s: %s", name, why);
        return 1;
    }
    if (p->sec == -8) {
        struct events_sink_config *c = &p->cfg->events[p->ev_i];
        const struct conf_key *k = conf_find(events_sink_keys, name);
        if (k == NULL) {
            perr(p, p->line, "%s: unknown key in [events %s]%s", name, c->name,
                 key_hint(hint, sizeof(hint), events_sink_keys, name));
            return 1;
        }
        unsigned idx = (unsigned)(k - events_sink_keys);
        unsigned *first = &p->ev_set_line[p->ev_i][idx < MAX_KEYS ? idx : MAX_KEYS - 1];
        if (*first != 0) {
            perr(p, p->line, "%s: set twice in [events %s] (first at line %u)", name, c->name,
                 *first);
            return 1;
        }
        *first = p->line;
        if (conf_set(events_sink_keys, c, name, value, why, sizeof(why)) < 0)
            perr(p, p->line, "%s: %s", name, why);
        return 1;
    }
    if (p->sec == -4) {
        /* [classify]: CLASS = MATCHER, a key repeated as often as needed. */
        if (classify_add_rule(p->cfg->classify, name, value, why, sizeof(why)) < 0)
            perr(p, p->line, "%s: %s", name, why);
        return 1;
    }
    if (p->sec == -2) {
        const struct conf_key *k = conf_find(config_domain_keys, name);
        if (k == NULL) {
            perr(p, p->line, "%s: unknown key in [domain %s]%s", name, p->dom->name,
                 key_hint(hint, sizeof(hint), config_domain_keys, name));
            return 1;
        }
        unsigned idx = (unsigned)(k - config_domain_keys);
        for (unsigned i = 0; i < p->dom->nvalues; i++)
            if (p->dom->values[i].key == idx) {
                perr(p, p->line, "%s: set twice in [domain %s] (first at line %u)", name,
                     p->dom->name, p->dom->values[i].line);
                return 1;
            }
        struct domain_policy scratch = {0};
        int src = conf_set(config_domain_keys, &scratch, name, value, why, sizeof(why));
        free(scratch.route); /* the only owned field: checked, not kept */
        if (src < 0) {
            perr(p, p->line, "%s: %s", name, why);
            return 1;
        }
        struct domain_build *d = p->dom;
        if (d->nvalues == d->cap) {
            unsigned cap = d->cap ? d->cap * 2 : 8;
            struct raw_value *v = realloc(d->values, sizeof(*v) * cap);
            if (v == NULL) {
                perr(p, p->line, "out of memory");
                return 1;
            }
            d->values = v;
            d->cap = cap;
        }
        char *copy = strdup(value);
        if (copy == NULL) {
            perr(p, p->line, "out of memory");
            return 1;
        }
        d->values[d->nvalues++] = (struct raw_value){idx, p->line, copy};
        return 1;
    }

    const struct section *sec = &config_sections[p->sec];
    const struct conf_key *k = conf_find(sec->keys, name);
    if (k == NULL) {
        perr(p, p->line, "%s: unknown key in [%s]%s", name, sec->name,
             key_hint(hint, sizeof(hint), sec->keys, name));
        return 1;
    }
    unsigned idx = (unsigned)(k - sec->keys);
    unsigned *first = &p->set_line[p->sec][idx < MAX_KEYS ? idx : MAX_KEYS - 1];
    if (*first != 0) {
        perr(p, p->line, "%s: set twice in [%s] (first at line %u)", name, sec->name, *first);
        return 1;
    }
    *first = p->line;
    if (conf_set(sec->keys, (char *)p->cfg + sec->offset, name, value, why, sizeof(why)) < 0)
        perr(p, p->line, "%s: %s", name, why);
    return 1;
}

static int
apply_domain(struct parse *p, struct domain_policy *pol, const struct domain_build *d)
{
    char why[256];
    for (unsigned i = 0; i < d->nvalues; i++) {
        const struct conf_key *k = &config_domain_keys[d->values[i].key];
        if (conf_set(config_domain_keys, pol, k->name, d->values[i].value, why, sizeof(why)) < 0) {
            perr(p, d->values[i].line, "%s: %s", k->name, why);
            return -EINVAL;
        }
    }
    return 0;
}

static int
cmp_domain(const void *a, const void *b)
{
    return strcmp(((const struct domain_policy *)a)->name, ((const struct domain_policy *)b)->name);
}

static void
free_builds(struct parse *p)
{
    for (unsigned i = 0; i < p->ndkims; i++) {
        free(p->dkims[i].domain);
        free(p->dkims[i].selector);
        conf_free(dkim_sig_conf_keys, &p->dkims[i].sc);
    }
    free(p->dkims);
    p->dkims = NULL;
    p->ndkims = 0;
    for (unsigned i = 0; i < p->ndoms; i++) {
        free(p->doms[i].name);
        for (unsigned j = 0; j < p->doms[i].nvalues; j++)
            free(p->doms[i].values[j].value);
        free(p->doms[i].values);
    }
    free(p->doms);
    p->doms = NULL;
    p->ndoms = 0;
}

/* "host", "host:port", "[literal]" or "[literal]:port" into the policy. */
static int
parse_route(struct parse *p, struct domain_policy *pol, unsigned line)
{
    pol->route_host[0] = '\0';
    pol->route_port = 0;
    if (pol->route == NULL)
        return 0;
    const char *r = pol->route, *colon;
    if (r[0] == '[') {
        const char *close = strchr(r, ']');
        colon = close != NULL && close[1] == ':' ? close + 1 : NULL;
        if (close == NULL || (close[1] != '\0' && colon == NULL)) {
            perr(p, line, "route: \"%s\" is not [address] or [address]:port", r);
            return -EINVAL;
        }
    } else {
        colon = strrchr(r, ':');
    }
    size_t hl = colon ? (size_t)(colon - r) : strlen(r);
    if (hl == 0 || hl >= sizeof(pol->route_host)) {
        perr(p, line, "route: \"%s\": no host", r);
        return -EINVAL;
    }
    if (colon != NULL) {
        char *end;
        unsigned long port = strtoul(colon + 1, &end, 10);
        if (colon[1] == '\0' || *end != '\0' || port == 0 || port > 65535) {
            perr(p, line, "route: \"%s\": the port must be 1 to 65535", r);
            return -EINVAL;
        }
        pol->route_port = (unsigned)port;
    }
    memcpy(pol->route_host, r, hl);
    pol->route_host[hl] = '\0';
    for (char *c = pol->route_host; *c; c++)
        if (*c >= 'A' && *c <= 'Z')
            *c = (char)(*c + 32);
    return 0;
}

/* A route to an address literal that delivery refuses as a target
 * (loopback, link-local, ... and not in [delivery] allow_networks:
 * outbound/targets.c): every message routed there would bounce, so the
 * config is refused instead. A host name is resolved at delivery, not
 * here. */
static void
check_route_target(struct parse *p, const struct domain_policy *pol, unsigned line)
{
    const char *h = pol->route_host;
    size_t n = strlen(h);
    if (n < 3 || h[0] != '[' || h[n - 1] != ']')
        return;
    bool v6 = strncmp(h + 1, "ipv6:", 5) == 0;
    char spec[sizeof(pol->route_host) + 8];
    snprintf(spec, sizeof(spec), v6 ? "[%.*s]:25" : "%.*s:25", (int)(n - (v6 ? 7 : 2)),
             h + (v6 ? 6 : 1));
    struct netaddr a;
    if (netaddr_parse(spec, &a) < 0)
        return;
    const struct sockaddr *sa = (const struct sockaddr *)&a.ss;
    const char *what = netaddr_special(sa);
    const struct delivery_config *dc = &p->cfg->delivery;
    if (what != NULL && !cidr_match(dc->allow, dc->nallow, sa))
        perr(p, line,
             "route: %s is a %s address, which [delivery] allow_networks does not list: every "
             "message routed there would bounce (class refused_target)",
             pol->route, what);
}

static int
resolve_domains(struct parse *p)
{
    struct config *cfg = p->cfg;
    char why[256];
    if (conf_defaults(config_domain_keys, &cfg->default_domain, why, sizeof(why)) < 0) {
        perr(p, 0, "%s", why);
        return -EINVAL;
    }
    cfg->default_domain.name = strdup("*");
    if (cfg->default_domain.name == NULL)
        return -ENOMEM;
    for (unsigned i = 0; i < p->ndoms; i++)
        if (strcmp(p->doms[i].name, "*") == 0) {
            cfg->default_domain.line = p->doms[i].line;
            if (apply_domain(p, &cfg->default_domain, &p->doms[i]) < 0)
                return -EINVAL;
        }
    if (parse_route(p, &cfg->default_domain, cfg->default_domain.line) < 0)
        return -EINVAL;
    check_route_target(p, &cfg->default_domain, cfg->default_domain.line);
    unsigned n = 0;
    cfg->domains = calloc(p->ndoms ? p->ndoms : 1, sizeof(*cfg->domains));
    if (cfg->domains == NULL)
        return -ENOMEM;
    for (unsigned i = 0; i < p->ndoms; i++) {
        if (strcmp(p->doms[i].name, "*") == 0)
            continue;
        struct domain_policy *pol = &cfg->domains[n];
        *pol = cfg->default_domain; /* owned fields: the name, and the route copied */
        pol->route = NULL;
        if (cfg->default_domain.route != NULL &&
            (pol->route = strdup(cfg->default_domain.route)) == NULL)
            return -ENOMEM;
        pol->name = p->doms[i].name;
        p->doms[i].name = NULL;
        pol->line = p->doms[i].line;
        n++;
        cfg->ndomains = n;
        if (apply_domain(p, pol, &p->doms[i]) < 0 || parse_route(p, pol, pol->line) < 0)
            return -EINVAL;
        if (pol->route != NULL && (cfg->default_domain.route == NULL ||
                                   strcmp(pol->route, cfg->default_domain.route) != 0))
            check_route_target(p, pol, pol->line); /* an inherited one is said once */
    }
    qsort(cfg->domains, cfg->ndomains, sizeof(*cfg->domains), cmp_domain);
    return 0;
}

static unsigned
key_line(struct parse *p, unsigned sec, const char *name)
{
    const struct conf_key *k = conf_find(config_sections[sec].keys, name);
    return k ? p->set_line[sec][k - config_sections[sec].keys] : 0;
}

static bool
valid_field_name(const char *s, size_t n)
{
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= 32 || s[i] >= 127 || s[i] == ':')
            return false;
    return true;
}

/* [log] delivery_log_headers into cfg->log.headers. */
static int
parse_headers(struct parse *p)
{
    struct log_config *lc = &p->cfg->log;
    unsigned sec = 0;
    while (strcmp(config_sections[sec].name, "log") != 0)
        sec++;
    unsigned line = key_line(p, sec, "delivery_log_headers");
    for (const char *s = lc->delivery_log_headers; s != NULL && *s != '\0';) {
        while (*s == ' ' || *s == '\t' || *s == ',')
            s++;
        size_t n = strcspn(s, ", \t");
        if (n == 0)
            break;
        if (!valid_field_name(s, n)) {
            perr(p, line, "delivery_log_headers: \"%.*s\" is not a header field name", (int)n,
                 s);
        } else if (lc->nheaders == DLOG_HEADERS_MAX) {
            perr(p, line, "delivery_log_headers: at most %d fields", DLOG_HEADERS_MAX);
            return 0;
        } else if ((lc->headers[lc->nheaders] = strndup(s, n)) == NULL) {
            return -ENOMEM;
        } else {
            lc->nheaders++;
        }
        s += n;
    }
    struct stats_config *sc = &p->cfg->stats;
    char *end = NULL;
    unsigned long mode = sc->socket_mode_text ? strtoul(sc->socket_mode_text, &end, 8) : 0660;
    /* octal digits only: strtoul takes a sign and leading blanks */
    if (sc->socket_mode_text != NULL &&
        (*end != '\0' || mode > 0777 ||
         strspn(sc->socket_mode_text, "01234567") != strlen(sc->socket_mode_text))) {
        unsigned ss = 0;
        while (strcmp(config_sections[ss].name, "stats") != 0)
            ss++;
        perr(p, key_line(p, ss, "socket_mode"), "socket_mode: octal permissions, e.g. 0660");
    }
    sc->socket_mode = (unsigned)mode;
    /* One message of max_message_size to max_recipients recipients must
     * fit, or its client would be told 452 for ever. */
    uint64_t one_txn = p->cfg->server.max_message_size +
                       (uint64_t)p->cfg->server.max_recipients * CONFIG_RCPT_MEMORY_MAX;
    if (p->cfg->server.body_memory_limit < one_txn)
        perr(p,
             key_line(p, 0, "body_memory_limit") ? key_line(p, 0, "body_memory_limit")
             : key_line(p, 0, "max_message_size") ? key_line(p, 0, "max_message_size")
                                                  : key_line(p, 0, "max_recipients"),
             "body_memory_limit: smaller than max_message_size (%llu) and the memory of "
             "max_recipients (%u) recipients (%u octets each at most): %llu; a message of that "
             "size to that many recipients could never be received",
             (unsigned long long)p->cfg->server.max_message_size, p->cfg->server.max_recipients,
             CONFIG_RCPT_MEMORY_MAX, (unsigned long long)one_txn);
    const char *eh = p->cfg->server.expire_header;
    if (eh != NULL && !valid_field_name(eh, strlen(eh)))
        perr(p, key_line(p, 0, "expire_header"), "expire_header: not a header field name");
    static const char *const control[] = {"X-Sluice-Tenant", "X-Sluice-Campaign", "X-Sluice-Pool",
                                          "X-Sluice-Priority"};
    for (size_t i = 0; eh != NULL && i < sizeof(control) / sizeof(control[0]); i++)
        if (strcasecmp(eh, control[i]) == 0)
            perr(p, key_line(p, 0, "expire_header"), "expire_header: %s is a control field of "
                 "its own (engine/owner.h)", control[i]);
    return 0;
}

static void
dkim_report(void *ctx, const char *what)
{
    struct parse *p = ctx;
    unsigned sec = 0;
    while (strcmp(config_sections[sec].name, "dkim") != 0)
        sec++;
    perr(p, key_line(p, sec, "key_dir"), "[dkim] %s", what);
}

/* Load every key of [dkim DOMAIN SELECTOR] config_sections and of [dkim] key_dir
 * into cfg->dkim_keys: a key that cannot be read or parsed is an error of
 * this config, with the line of its key_file. */
static int
build_dkim(struct parse *p)
{
    struct config *cfg = p->cfg;
    unsigned sec = 0;
    while (strcmp(config_sections[sec].name, "dkim") != 0)
        sec++;
    char why[256];
    const char *bad = NULL;
    if (dkim_config_check(&cfg->dkim, &bad, why, sizeof(why)) < 0)
        perr(p, key_line(p, sec, bad), "%s: %s", bad, why);
    if (p->ndkims == 0 && cfg->dkim.key_dir == NULL)
        return 0;
    struct dkim_keyring *kr = dkim_keyring_new(cfg->dkim.signing_domain);
    if (kr == NULL)
        return -ENOMEM;
    for (unsigned i = 0; i < p->ndkims; i++) {
        struct dkim_build *b = &p->dkims[i];
        char err[1200];
        bad = NULL;
        int rc = dkim_keyring_add(kr, b->domain, b->selector, &b->sc, &cfg->dkim, &bad, err,
                                  sizeof(err));
        if (rc == -ENOMEM) {
            dkim_keyring_unref(kr);
            return rc;
        }
        if (rc < 0) {
            const struct conf_key *k = bad ? conf_find(dkim_sig_conf_keys, bad) : NULL;
            unsigned line = k ? b->key_line[k - dkim_sig_conf_keys] : 0;
            perr(p, line ? line : b->line, "[dkim %s %s] %s: %s", b->domain, b->selector,
                 bad ? bad : "key_file", err);
        }
    }
    if (cfg->dkim.key_dir != NULL)
        dkim_keyring_add_dir(kr, &cfg->dkim, dkim_report, p);
    dkim_keyring_seal(kr, dkim_report, p);
    cfg->dkim_keys = kr;
    return 0;
}

/* [bounce]: the listener's addresses, the VERP key, the prefix. */
static void
check_bounce(struct parse *p)
{
    struct bounce_config *b = &p->cfg->bounce;
    unsigned sec = 0;
    while (strcmp(config_sections[sec].name, "bounce") != 0)
        sec++;
    char why[256];
    if (b->listen != NULL) {
        b->nlisten = netaddr_parse_list(b->listen, b->listen_addrs, NETADDR_MAX_LIST, why,
                                        sizeof(why));
        if (b->nlisten <= 0)
            perr(p, key_line(p, sec, "listen"), "[bounce] listen: %s",
                 b->nlisten == 0 ? "no address given" : why);
        if (b->domains == NULL && b->verp_domain == NULL)
            perr(p, key_line(p, sec, "listen"),
                 "[bounce] listen: needs domains or verp_domain (the domains it accepts for)");
    }
    for (const char *c = b->verp_prefix; c != NULL && *c; c++)
        if (!isalnum((unsigned char)*c) && *c != '-' && *c != '_' && *c != '.') {
            perr(p, key_line(p, sec, "verp_prefix"),
                 "[bounce] verp_prefix: letters, digits, '-', '_' and '.' only");
            break;
        }
    if (b->verp_key_file != NULL) {
        int n = verp_key_load(b->verp_key_file, b->verp_key, sizeof(b->verp_key), why,
                              sizeof(why));
        if (n < 0)
            perr(p, key_line(p, sec, "verp_key_file"), "[bounce] verp_key_file: %s", why);
        else
            b->verp_key_len = (size_t)n;
    } else if (b->verp_domain != NULL || b->listen != NULL) {
        perr(p, key_line(p, sec, b->verp_domain ? "verp_domain" : "listen"),
             "[bounce] %s: needs verp_key_file (the key of the VERP tokens)",
             b->verp_domain ? "verp_domain" : "listen");
    }
}

/* One "ADDRESS[:weight]" of a pool's sources (IPv6 with a weight in
 * brackets) into its canonical address text and weight. */
static int
parse_pool_source(const char *tok, char *addr, size_t cap, unsigned *weight, char *why,
                  size_t whylen)
{
    char buf[80];
    unsigned char bin[16];
    size_t n = strlen(tok);
    if (n >= sizeof(buf)) {
        snprintf(why, whylen, "\"%.40s...\" is too long", tok);
        return -EINVAL;
    }
    memcpy(buf, tok, n + 1);
    *weight = 1;
    char *a = buf, *w = NULL;
    int fam;
    if (buf[0] == '[') {
        char *close = strchr(buf, ']');
        if (close == NULL || (close[1] != '\0' && close[1] != ':')) {
            snprintf(why, whylen, "\"%s\": expected [IPv6]:weight", tok);
            return -EINVAL;
        }
        *close = '\0';
        a = buf + 1;
        w = close[1] == ':' ? close + 2 : NULL;
        fam = AF_INET6;
    } else if (inet_pton(AF_INET6, buf, bin) == 1) {
        fam = AF_INET6;
    } else {
        char *colon = strrchr(buf, ':');
        if (colon != NULL) {
            *colon = '\0';
            w = colon + 1;
        }
        fam = AF_INET;
    }
    if (inet_pton(fam, a, bin) != 1 || inet_ntop(fam, bin, addr, (socklen_t)cap) == NULL) {
        snprintf(why, whylen, "\"%s\" is not an address (IPv6 with a weight: [ADDRESS]:weight)",
                 tok);
        return -EINVAL;
    }
    if (w != NULL) {
        uint64_t v;
        if (conf_parse_uint(w, &v) < 0 || v > 1000) {
            snprintf(why, whylen, "\"%s\": the weight must be 0 to 1000", tok);
            return -EINVAL;
        }
        *weight = (unsigned)v;
    }
    return 0;
}

/* Resolve [pool] sources against [source] config_sections and [tenant] pools
 * against [pool] config_sections, reporting every name that matches nothing. */
static int
resolve_owners(struct parse *p)
{
    struct config *cfg = p->cfg;
    char why[256];
    for (unsigned i = 0; i < cfg->nsources; i++) {
        const char *e = cfg->sources[i].ehlo;
        if (e != NULL && !valid_domain_name(e))
            perr(p, cfg->sources[i].line, "[source %s] ehlo: \"%s\" is not a host name",
                 cfg->sources[i].pattern, e);
    }
    for (unsigned i = 0; i < cfg->npools; i++) {
        struct pool_config *pl = &cfg->pools[i];
        unsigned line = pl->key_line[0] ? pl->key_line[0] : pl->line;
        if (pl->sources_text == NULL) {
            perr(p, pl->line, "[pool %s]: sources: not set (a pool needs at least one source)",
                 pl->name);
            continue;
        }
        unsigned total = 0;
        for (const char *s = pl->sources_text; *s != '\0';) {
            while (*s == ' ' || *s == '\t' || *s == ',')
                s++;
            size_t n = strcspn(s, ", \t");
            if (n == 0)
                break;
            char tok[128], addr[INET6_ADDRSTRLEN];
            snprintf(tok, sizeof(tok), "%.*s", (int)(n < 127 ? n : 127), s);
            s += n;
            unsigned weight;
            if (parse_pool_source(tok, addr, sizeof(addr), &weight, why, sizeof(why)) < 0) {
                perr(p, line, "[pool %s] sources: %s", pl->name, why);
                continue;
            }
            const struct mx_policy *src = NULL;
            for (unsigned k = 0; k < cfg->nsources; k++)
                if (strcmp(cfg->sources[k].pattern, addr) == 0)
                    src = &cfg->sources[k];
            if (src == NULL) {
                perr(p, line, "[pool %s] sources: %s has no [source %s] section", pl->name, addr,
                     addr);
                continue;
            }
            bool dup = false;
            for (unsigned k = 0; k < pl->nsources; k++)
                dup |= pl->sources[k].source == src;
            if (dup) {
                perr(p, line, "[pool %s] sources: %s is listed twice", pl->name, addr);
                continue;
            }
            struct pool_source *v = realloc(pl->sources, (pl->nsources + 1) * sizeof(*v));
            if (v == NULL)
                return -ENOMEM;
            pl->sources = v;
            v[pl->nsources++] = (struct pool_source){src, weight};
            total += weight;
        }
        if (pl->nsources > 0 && total == 0)
            perr(p, line, "[pool %s] sources: every weight is 0: the pool could send nothing",
                 pl->name);
    }
    for (unsigned i = 0; i < cfg->ntenants; i++) {
        struct tenant_config *t = &cfg->tenants[i];
        unsigned pools_line = t->key_line[1] ? t->key_line[1] : t->line;
        unsigned pool_line = t->key_line[2] ? t->key_line[2] : t->line;
        for (const char *s = t->pools_text; s != NULL && *s != '\0';) {
            while (*s == ' ' || *s == '\t' || *s == ',')
                s++;
            size_t n = strcspn(s, ", \t");
            if (n == 0)
                break;
            const struct pool_config *pl = config_pool(cfg, s, n);
            if (pl == NULL) {
                perr(p, pools_line, "[tenant %s] pools: no [pool %.*s] section", t->name, (int)n,
                     s);
            } else if (config_tenant_may_use(t, pl)) {
                perr(p, pools_line, "[tenant %s] pools: %s is listed twice", t->name, pl->name);
            } else {
                const struct pool_config **v = realloc(t->pools, (t->npools + 1) * sizeof(*v));
                if (v == NULL)
                    return -ENOMEM;
                t->pools = v;
                v[t->npools++] = pl;
            }
            s += n;
        }
        if (t->pool_text != NULL) {
            t->pool = config_pool(cfg, t->pool_text, strlen(t->pool_text));
            if (t->pool == NULL) {
                perr(p, pool_line, "[tenant %s] pool: no [pool %s] section", t->name,
                     t->pool_text);
            } else if (t->pools_text == NULL) {
                const struct pool_config **v = malloc(sizeof(*v));
                if (v == NULL)
                    return -ENOMEM;
                v[0] = t->pool;
                t->pools = v;
                t->npools = 1;
            } else if (!config_tenant_may_use(t, t->pool)) {
                perr(p, pool_line, "[tenant %s] pool: %s is not among its pools (%s)", t->name,
                     t->pool->name, t->pools_text);
            }
        } else if (t->npools > 0) {
            t->pool = t->pools[0];
        }
    }
    cfg->bounce.tenants = cfg->tenants;
    cfg->bounce.ntenants = cfg->ntenants;
    return 0;
}

/* Where key (of config_source_keys) was set in [source] i; its header's line
 * when it was not. */
static unsigned
source_key_line(struct parse *p, unsigned i, const char *key)
{
    const struct conf_key *k = conf_find(config_source_keys, key);
    for (unsigned n = 0; k != NULL && n < p->nlim_set; n++) {
        const struct lim_set *ls = &p->lim_set[n];
        if (ls->v == &p->cfg->sources && ls->i == i && ls->key == (unsigned)(k - config_source_keys))
            return ls->line;
    }
    return p->cfg->sources[i].line;
}

/* [shaping]: the operator's rules file, then the shipped set, compiled
 * once (a bad rule is an error of this config). */
static int
build_shaping(struct parse *p)
{
    struct config *cfg = p->cfg;
    if (!cfg->shaping.enabled)
        return 0;
    if ((cfg->shaping_rules = shaping_rules_new()) == NULL)
        return -ENOMEM;
    char why[512];
    int rc = 0;
    if (cfg->shaping.rules != NULL)
        rc = shaping_rules_add_file(cfg->shaping_rules, cfg->shaping.rules, why, sizeof(why));
    if (rc == 0 && cfg->shaping.builtin_rules)
        rc = shaping_rules_add_text(cfg->shaping_rules, shaping_builtin_rules,
                                    "(built-in shaping.rules)", why, sizeof(why));
    if (rc == -ENOMEM)
        return -ENOMEM;
    if (rc < 0) {
        unsigned sec = 0;
        while (strcmp(config_sections[sec].name, "shaping") != 0)
            sec++;
        perr(p, key_line(p, sec, "rules"), "[shaping] rules: %s", why);
        return 0;
    }
    return shaping_rules_finish(cfg->shaping_rules);
}

/* Finish each [warmup] plan and put each [source] on its plan. */
static void
resolve_warmups(struct parse *p)
{
    struct config *cfg = p->cfg;
    char why[256];
    for (unsigned i = 0; i < cfg->nwarmups; i++) {
        unsigned line;
        if (warmup_conf_finish(&cfg->warmups[i], &line, why, sizeof(why)) < 0)
            perr(p, line, "%s", why);
    }
    for (unsigned i = 0; i < cfg->nsources; i++) {
        struct mx_policy *src = &cfg->sources[i];
        if (src->warmup == NULL) {
            if (src->warmup_start != NULL)
                perr(p, source_key_line(p, i, "warmup_start"),
                     "[source %s] warmup_start: set without warmup (a plan)", src->pattern);
            continue;
        }
        for (unsigned k = 0; k < cfg->nwarmups; k++)
            if (strcasecmp(cfg->warmups[k].name, src->warmup) == 0)
                src->warmup_plan = &cfg->warmups[k];
        if (src->warmup_plan == NULL)
            perr(p, source_key_line(p, i, "warmup"), "[source %s] warmup: no [warmup %s] section",
                 src->pattern, src->warmup);
        if (src->warmup_start == NULL)
            perr(p, source_key_line(p, i, "warmup"),
                 "[source %s] warmup: needs warmup_start = YYYY-MM-DD (day 1 of the plan)",
                 src->pattern);
        else if (warmup_conf_parse_date(src->warmup_start, &src->warmup_start_day) < 0)
            perr(p, source_key_line(p, i, "warmup_start"),
                 "[source %s] warmup_start: \"%s\" is not a date YYYY-MM-DD", src->pattern,
                 src->warmup_start);
    }
}

static int
finish(struct parse *p)
{
    struct config *cfg = p->cfg;
    char why[256];
    struct delivery_config *dc = &cfg->delivery;
    uint32_t *t = dc->client_timeouts; /* each key is at most an hour: fits */
    t[SMTP_CLIENT_S_GREETING] = t[SMTP_CLIENT_S_EHLO] = t[SMTP_CLIENT_S_HELO] =
        (uint32_t)dc->greeting_timeout;
    t[SMTP_CLIENT_S_STARTTLS] = t[SMTP_CLIENT_S_TLS] = (uint32_t)dc->starttls_timeout;
    t[SMTP_CLIENT_S_RSET] = t[SMTP_CLIENT_S_MAIL] = t[SMTP_CLIENT_S_RCPT] =
        (uint32_t)dc->command_timeout;
    t[SMTP_CLIENT_S_DATA] = t[SMTP_CLIENT_S_BODY] = (uint32_t)dc->data_timeout;
    t[SMTP_CLIENT_S_DOT] = (uint32_t)dc->dot_timeout;
    t[SMTP_CLIENT_S_IDLE] = t[SMTP_CLIENT_S_CLOSED] = 0; /* the caller's idle_timeout */
    for (unsigned i = 0; i < NSECTIONS; i++)
        if (strcmp(config_sections[i].name, "suppress") == 0 &&
            suppress_config_check(&cfg->suppress, cfg->queue.path, why, sizeof(why)) != 0) {
            const char *k = strncmp(why, "reply", 5) == 0             ? "reply"
                            : strncmp(why, "on_complaint", 12) == 0   ? "on_complaint"
                            : strncmp(why, "on_invalid", 10) == 0     ? "on_invalid_recipient"
                                                                      : "path";
            perr(p, key_line(p, i, k), "%s", why);
        }
    struct server_config *srv = &cfg->server;
    srv->nlisten = netaddr_parse_list(srv->listen, srv->listen_addrs, NETADDR_MAX_LIST, why,
                                      sizeof(why));
    if (srv->nlisten <= 0)
        perr(p, key_line(p, 0, "listen"), "listen: %s",
             srv->nlisten == 0 ? "no address given" : why);
    if (srv->listen_tls != NULL) {
        srv->nlisten_tls = netaddr_parse_list(srv->listen_tls, srv->listen_tls_addrs,
                                              NETADDR_MAX_LIST, why, sizeof(why));
        if (srv->nlisten_tls < 0)
            perr(p, key_line(p, 0, "listen_tls"), "listen_tls: %s", why);
        else if (!tls_config_has_server(&cfg->tls))
            perr(p, key_line(p, 0, "listen_tls"), "listen_tls: needs [tls] cert_file");
    }
    check_bounce(p);
    if (cfg->delivery.source_address != NULL) {
        struct cidr src[4];
        int n = cidr_parse_list(cfg->delivery.source_address, src, 4, why, sizeof(why));
        unsigned line = 0;
        for (unsigned i = 0; i < NSECTIONS; i++)
            if (strcmp(config_sections[i].name, "delivery") == 0)
                line = key_line(p, i, "source_address");
        for (int i = 0; i < n; i++) {
            struct sockaddr_storage *ss =
                src[i].family == AF_INET ? &cfg->delivery.source4 : &cfg->delivery.source6;
            if (ss->ss_family != AF_UNSPEC || src[i].bits != (src[i].family == AF_INET ? 32 : 128)) {
                perr(p, line, "source_address: one address per family, without /prefix");
                n = -1;
                break;
            }
            if (src[i].family == AF_INET) {
                struct sockaddr_in *a = (struct sockaddr_in *)ss;
                a->sin_family = AF_INET;
                memcpy(&a->sin_addr, src[i].addr, 4);
            } else {
                struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
                a->sin6_family = AF_INET6;
                memcpy(&a->sin6_addr, src[i].addr, 16);
            }
        }
        if (n == -EINVAL || n == -E2BIG)
            perr(p, line, "source_address: %s", why);
    }
    if (cfg->delivery.allow_networks != NULL) {
        cfg->delivery.nallow = cidr_parse_list(cfg->delivery.allow_networks, cfg->delivery.allow,
                                               NETADDR_MAX_LIST, why, sizeof(why));
        unsigned line = 0;
        for (unsigned i = 0; i < NSECTIONS; i++)
            if (strcmp(config_sections[i].name, "delivery") == 0)
                line = key_line(p, i, "allow_networks");
        if (cfg->delivery.nallow < 0) {
            perr(p, line, "allow_networks: %s", why);
            cfg->delivery.nallow = 0;
        }
    }
    const char *dns_bad;
    if (dns_config_check(&cfg->dns, &dns_bad, why, sizeof(why)) < 0) {
        unsigned dns_sec = 0;
        while (strcmp(config_sections[dns_sec].name, "dns") != 0)
            dns_sec++;
        /* the line of the key at fault, or of the other key it is checked
         * against when that one keeps its default */
        unsigned line = key_line(p, dns_sec, dns_bad);
        if (line == 0)
            line = key_line(p, dns_sec, strcmp(dns_bad, "min_ttl") == 0 ? "max_ttl" : "servers");
        perr(p, line, "[dns] %s", why);
    }
    if (cfg->tls.min_protocol > cfg->tls.max_protocol) {
        /* refused by the TLS context at start; said here, with its line */
        unsigned tls_sec = 0;
        while (strcmp(config_sections[tls_sec].name, "tls") != 0)
            tls_sec++;
        unsigned line = key_line(p, tls_sec, "min_protocol");
        if (line == 0)
            line = key_line(p, tls_sec, "max_protocol");
        perr(p, line, "[tls] min_protocol is newer than max_protocol");
    }
    srv->ntrusted = cidr_parse_list(srv->trusted_networks, srv->trusted, NETADDR_MAX_LIST, why,
                                    sizeof(why));
    if (srv->ntrusted < 0)
        perr(p, key_line(p, 0, "trusted_networks"), "trusted_networks: %s", why);
    if (parse_headers(p) < 0)
        return -ENOMEM;
    if (resolve_owners(p) < 0)
        return -ENOMEM;
    resolve_warmups(p);
    if (build_shaping(p) < 0)
        return -ENOMEM;
    if (build_dkim(p) < 0)
        return -ENOMEM;
    for (unsigned i = 0; i < cfg->nevents; i++)
        if (events_sink_check(&cfg->events[i], why, sizeof(why)) < 0)
            perr(p, cfg->events[i].line, "[events %s]: %s", cfg->events[i].name, why);
    if (p->nerrors != 0)
        return -EINVAL;
    if (cfg->server.workers == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        cfg->server.workers = n > 0 ? (unsigned)n : 1;
    }
    if (cfg->server.hostname == NULL) {
        char host[256];
        if (gethostname(host, sizeof(host)) != 0)
            snprintf(host, sizeof(host), "localhost");
        host[sizeof(host) - 1] = '\0';
        cfg->server.hostname = strdup(host);
        if (cfg->server.hostname == NULL)
            return -ENOMEM;
    }
    return resolve_domains(p);
}

int
config_load(const char *path, struct config **out, FILE *errs)
{
    *out = NULL;
    struct parse p;
    memset(&p, 0, sizeof(p));
    p.path = path;
    p.errs = errs;
    p.sec = -1;

    p.in = fopen(path, "r");
    if (p.in == NULL) {
        int err = errno;
        fprintf(errs, "%s: cannot read: %s\n", path, strerror(err));
        return -err;
    }
    struct config *cfg = calloc(1, sizeof(*cfg));
    if (cfg == NULL) {
        fclose(p.in);
        return -ENOMEM;
    }
    p.cfg = cfg;
    cfg->path = strdup(path);
    cfg->classify = classify_new();
    if (cfg->classify == NULL)
        perr(&p, 0, "out of memory");
    char why[256];
    for (unsigned i = 0; i < NSECTIONS; i++)
        if (conf_defaults(config_sections[i].keys, (char *)cfg + config_sections[i].offset, why, sizeof(why)) <
            0)
            perr(&p, 0, "[%s] %s", config_sections[i].name, why);

    static pthread_once_t inih_once = PTHREAD_ONCE_INIT;
    pthread_once(&inih_once, inih_options);
    p.buf = malloc(CONFIG_LINE_MAX + 3);
    int rc = p.buf != NULL ? ini_parse_stream(reader, &p, on_key, &p) : -2;
    if (rc > 0 && p.nsyntax == 0) /* next_line() reports every such line */
        perr(&p, (unsigned)rc, "not a [section] header, a key = value line, or a comment");
    else if (rc == -2)
        perr(&p, 0, "out of memory");
    else if (rc < 0)
        perr(&p, 0, "cannot parse (error %d)", rc);
    if (p.read_err != 0)
        perr(&p, 0, "cannot read: %s", strerror(p.read_err));
    fclose(p.in);
    free(p.buf);

    if (p.nerrors == 0 && finish(&p) < 0 && p.nerrors == 0)
        perr(&p, 0, "out of memory");
    free_builds(&p);
    free(p.lim_set);
    if (p.nerrors != 0 || cfg->path == NULL) {
        config_free(cfg);
        return -EINVAL;
    }
    *out = cfg;
    return 0;
}

struct config *
config_free(struct config *cfg)
{
    if (cfg == NULL)
        return NULL;
    for (unsigned i = 0; i < NSECTIONS; i++)
        conf_free(config_sections[i].keys, (char *)cfg + config_sections[i].offset);
    for (unsigned i = 0; i < cfg->ndomains; i++) {
        free(cfg->domains[i].name);
        free(cfg->domains[i].route);
    }
    free(cfg->domains);
    free(cfg->default_domain.name);
    free(cfg->default_domain.route);
    for (unsigned i = 0; i < cfg->log.nheaders; i++)
        free(cfg->log.headers[i]);
    for (unsigned i = 0; i < cfg->nmxs; i++) {
        conf_free(config_mx_keys, &cfg->mxs[i]);
        free(cfg->mxs[i].pattern);
    }
    free(cfg->mxs);
    for (unsigned i = 0; i < cfg->nsources; i++) {
        conf_free(config_source_keys, &cfg->sources[i]);
        free(cfg->sources[i].pattern);
    }
    free(cfg->sources);
    for (unsigned i = 0; i < cfg->npools; i++) {
        conf_free(config_pool_keys, &cfg->pools[i]);
        free(cfg->pools[i].name);
        free(cfg->pools[i].sources);
    }
    free(cfg->pools);
    for (unsigned i = 0; i < cfg->ntenants; i++) {
        conf_free(config_tenant_keys, &cfg->tenants[i]);
        free(cfg->tenants[i].name);
        free(cfg->tenants[i].pools);
    }
    free(cfg->tenants);
    for (unsigned i = 0; i < cfg->nwarmups; i++)
        warmup_conf_free(&cfg->warmups[i]);
    free(cfg->warmups);
    for (unsigned i = 0; i < cfg->nevents; i++) {
        conf_free(events_sink_keys, &cfg->events[i]);
        free(cfg->events[i].name);
    }
    free(cfg->events);
    classify_free(cfg->classify);
    shaping_rules_free(cfg->shaping_rules);
    dkim_keyring_unref(cfg->dkim_keys);
    free(cfg->path);
    free(cfg);
    return NULL;
}

void
config_drop_dkim_keys(struct config *cfg)
{
    cfg->dkim_keys = dkim_keyring_unref(cfg->dkim_keys);
}

const struct domain_policy *
config_domain(const struct config *cfg, const char *domain)
{
    size_t lo = 0, hi = cfg->ndomains;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcasecmp(domain, cfg->domains[mid].name);
        if (c == 0)
            return &cfg->domains[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return &cfg->default_domain;
}

const struct mx_policy *
config_source(const struct config *cfg, const struct sockaddr *sa)
{
    char text[INET6_ADDRSTRLEN];
    const void *bin = sa->sa_family == AF_INET6
                          ? (const void *)&((const struct sockaddr_in6 *)sa)->sin6_addr
                          : (const void *)&((const struct sockaddr_in *)sa)->sin_addr;
    if ((sa->sa_family != AF_INET && sa->sa_family != AF_INET6) ||
        inet_ntop(sa->sa_family, bin, text, sizeof(text)) == NULL)
        return NULL;
    for (unsigned i = 0; i < cfg->nsources; i++)
        if (strcmp(cfg->sources[i].pattern, text) == 0)
            return &cfg->sources[i];
    return NULL;
}

const struct tenant_config *
config_tenant(const struct config *cfg, const char *name, size_t len)
{
    for (unsigned i = 0; i < cfg->ntenants; i++)
        if (strlen(cfg->tenants[i].name) == len && strncasecmp(cfg->tenants[i].name, name, len) == 0)
            return &cfg->tenants[i];
    return NULL;
}

const struct pool_config *
config_pool(const struct config *cfg, const char *name, size_t len)
{
    for (unsigned i = 0; i < cfg->npools; i++)
        if (strlen(cfg->pools[i].name) == len && strncasecmp(cfg->pools[i].name, name, len) == 0)
            return &cfg->pools[i];
    return NULL;
}

bool
config_tenant_may_use(const struct tenant_config *t, const struct pool_config *p)
{
    for (unsigned i = 0; i < t->npools; i++)
        if (t->pools[i] == p)
            return true;
    return false;
}

const struct mx_policy *
config_mx(const struct config *cfg, const char *host)
{
    size_t hl = strlen(host);
    if (hl > 0 && host[hl - 1] == '.')
        hl--;
    for (unsigned i = 0; i < cfg->nmxs; i++)
        if (config_host_matches(cfg->mxs[i].pattern, host, hl))
            return &cfg->mxs[i];
    return NULL;
}

bool
config_host_matches(const char *pat, const char *host, size_t hl)
{
    if (pat[0] == '*' && pat[1] == '.') {
        size_t sl = strlen(pat + 1); /* ".suffix" */
        return hl > sl && strncasecmp(host + hl - sl, pat + 1, sl) == 0;
    }
    return strlen(pat) == hl && strncasecmp(host, pat, hl) == 0;
}

/* ---- reference ---- */

static void
reference_table(FILE *out, const struct conf_key *keys, size_t objsize)
{
    char *obj = calloc(1, objsize);
    char why[256], def[256];
    if (obj == NULL || conf_defaults(keys, obj, why, sizeof(why)) < 0) {
        free(obj);
        return;
    }
    fprintf(out, "| key | type | default | range | meaning |\n|---|---|---|---|---|\n");
    for (const struct conf_key *k = keys; k->name != NULL; k++) {
        if (k->def != NULL)
            conf_format(k, obj, def, sizeof(def));
        else
            snprintf(def, sizeof(def), "(unset)");
        char range[160];
        conf_format_range(k, range, sizeof(range));
        fprintf(out, "| `%s` | %s | %s | %s | %s |\n", k->name, conf_type_str(k->type),
                def[0] ? def : "\"\"", range, k->help);
    }
    fputc('\n', out);
    conf_free(keys, obj);
    free(obj);
}

void
config_reference(FILE *out)
{
    fprintf(out,
            "# sluice configuration reference\n\n"
            "Generated by `sluice --config-reference`; a test checks that this file "
            "matches the binary.\n"
            "Sizes: 512, 64K, 10M, 2G. Durations: 250ms, 30s (a bare number is "
            "seconds), 5m, 2h, 3d. Rates: 50/s, 3000/min, 100/h, unlimited. "
            "A line holds at most %d characters, and a string value as many as "
            "its range says. "
            "Unknown sections and keys, and values out of range, are errors. "
            "Keys marked [not yet in effect] are parsed and checked but nothing uses "
            "them yet.\n\n",
            CONFIG_LINE_MAX);
    for (unsigned i = 0; i < NSECTIONS; i++) {
        fprintf(out, "## [%s]: %s\n\n", config_sections[i].name, config_sections[i].help);
        reference_table(out, config_sections[i].keys, config_sections[i].size);
    }
    fprintf(out, "## [domain NAME] and [domain *]: per-destination policy\n\n"
                 "`[domain *]` sets the defaults; `[domain example.com]` overrides them for "
                 "one domain (names are case-insensitive; a trailing dot is ignored). Keys a "
                 "domain does not set come from `[domain *]`, then from the defaults below.\n\n");
    reference_table(out, config_domain_keys, sizeof(struct domain_policy));
    fprintf(out, "## [mx PATTERN]: limits per MX host\n\n"
                 "Limits shared by every destination whose preferred MX host matches: "
                 "`[mx *.google.com]` (any host under google.com) or `[mx mx.example.net]` "
                 "(that host). They hold on top of each domain's own; the first matching "
                 "section wins. With [redis] url they hold across all nodes; without, each "
                 "worker keeps 1/workers of them (the domains behind one MX are spread over "
                 "the workers).\n\n");
    reference_table(out, config_mx_keys, sizeof(struct mx_policy));
    fprintf(out, "## [source ADDRESS]: limits per source address\n\n"
                 "The same keys as [mx], for every connection that comes from ADDRESS, one of "
                 "the [delivery] source_address ones (what receivers see of this node), and "
                 "the name it greets with. With "
                 "[redis] url they hold across all nodes; without, each worker keeps "
                 "1/workers of them. A [pool] lists sources by their ADDRESS.\n\n");
    reference_table(out, config_source_keys, sizeof(struct mx_policy));
    fprintf(out, "## [pool NAME]: egress sources\n\n"
                 "A set of [source ADDRESS] sections that a message's mail is spread over by "
                 "weight. A message's pool comes from its tenant (the user's pool=, the "
                 "tenant's default, or an X-Sluice-Pool header naming one of the tenant's "
                 "pools). Names: 1 to 64 of A-Z a-z 0-9 . _ -, case-insensitive. A "
                 "destination is a (domain, pool) pair: a pool's mail leaves only from its "
                 "sources, each connection from one source picked by weight among those "
                 "not held, not suspended and with warm-up allowance left; a source a "
                 "receiver answers with 421 or a rate-limited reply is held at that site "
                 "alone. Mail without a pool leaves from [delivery] source_address.\n\n");
    reference_table(out, config_pool_keys, sizeof(struct pool_config));
    fprintf(out, "## [tenant NAME]: who a message belongs to\n\n"
                 "A customer whose mail is kept apart. A message's tenant is its AUTH user's "
                 "(tenant= in the users file) or, from trusted_networks only, the "
                 "X-Sluice-Tenant header's; an unknown tenant is refused (550 5.7.1). "
                 "X-Sluice-Campaign, X-Sluice-Pool and X-Sluice-Priority set the rest; "
                 "these four header fields (and [server] expire_header) are removed before the message is stored. "
                 "Tenant, campaign, pool and priority are stored with the message and "
                 "logged with its events. Names as for [pool]. Each destination shares "
                 "its transactions between the tenants with mail waiting there by weight "
                 "(untenanted mail is one more tenant of weight 1), and within a tenant "
                 "sends the highest priority first, oldest first within a priority: one "
                 "tenant's backlog delays another's mail by at most one round of turns.\n\n");
    reference_table(out, config_tenant_keys, sizeof(struct tenant_config));
    warmup_conf_reference(out);
    fprintf(out, "## [dkim DOMAIN SELECTOR]: one DKIM signature\n\n"
                 "Mail whose signing domain ([dkim] signing_domain: the From: header's by "
                 "default) is DOMAIN, or a subdomain of it without a key of its own, is signed "
                 "with this key as d=DOMAIN, s=SELECTOR; two sections for one domain sign "
                 "twice (RSA and Ed25519 side by side, RFC 8463; up to 4 keys per domain). "
                 "[dkim] key_dir adds keys laid out KEY_DIR/DOMAIN/SELECTOR.pem with the "
                 "[dkim] settings. `[dkim * SELECTOR]` signs, "
                 "with its `domain`, mail whose domain has no key at all. Keys not set here "
                 "come from [dkim]. A key that cannot be read or parsed is an error (at "
                 "start, and a refused reload); mail whose domain has no key goes out "
                 "unsigned, and the delivery log's reception event says why. "
                 "`sluice --dkim-dns DOMAIN SELECTOR` prints the TXT record to publish.\n\n");
    reference_table(out, dkim_sig_conf_keys, sizeof(struct dkim_sig_config));
    fprintf(out, "## [events NAME]: delivery events pushed to a webhook or a Redis stream\n\n"
                 "Every delivery log event (whether or not [log] delivery_log is set) is "
                 "committed in the spool transaction of what it tells, journaled under the "
                 "spool directory (events/) and pushed to each sink at least once, from a "
                 "durable cursor per sink, each event with a unique event_id whose number "
                 "orders a message's events. A webhook gets JSON arrays in POSTs, signed when "
                 "secret is set; a Redis sink XADDs one entry per event (fields event_id and "
                 "data). A reload adds, changes (from the sink's cursor) and removes sinks "
                 "(the cursor stays: added back, a sink resumes there as far as the journal "
                 "still holds, the events it missed counted as dropped); a node started "
                 "without a sink needs a restart for its first. A webhook's 2xx acknowledges a "
                 "batch; a 413 halves the sink's batches (one event alone is dropped as "
                 "below); a 4xx that refuses the events "
                 "themselves (400, 422: any 4xx but 401, 403, 404, 405, 407, 408, 410, 413, "
                 "421, 425 and 429) splits the batch until one event is refused alone, which "
                 "is dropped, logged (event=events_rejected) and counted (rejected); anything "
                 "else is retried from retry_min doubling to retry_max. A Redis sink "
                 "pipelines a batch's XADDs and reads each reply: an event answered with an id "
                 "is in and not sent again while the sink runs (a restart, a crash or a reload "
                 "that restarts the sink may send it again: at least once); one refused with "
                 "a generic -ERR is dropped as "
                 "above when the stream took another of the same batch or it was sent alone "
                 "(a batch refused whole goes again one event at a time); any other error "
                 "(-OOM, -WRONGTYPE, -READONLY, -LOADING, ...: the server or the key takes "
                 "nothing now) or a lost connection retries the events not in, alone, after "
                 "the backoff.\n\n");
    reference_table(out, events_sink_keys, sizeof(struct events_sink_config));
    fprintf(out, "## [classify]: bounce classification rules\n\n"
                 "Each line is `CLASS = MATCHER`, and a class may be named on as many lines as "
                 "needed. Classes: invalid_recipient, mailbox_full, message_too_large, policy, "
                 "rate_limited, dns_failure, tls_failure, connection_failure, expired, "
                 "refused_target, tls_policy, other. "
                 "Matchers: `enh:5.7.1` (subject or detail may be `*`), `code:421`, or "
                 "`text:REGEX` (POSIX extended, case-insensitive). Rules from this section are "
                 "tried in order before the built-in table (see the README), and the first "
                 "match wins:\n\n"
                 "    [classify]\n"
                 "    rate_limited = text:temporarily rate limited\n"
                 "    policy = enh:5.7.26\n\n");
}
