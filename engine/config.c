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
 * inherit from it: that, and every check across keys and sections, is
 * engine/config_check.c's (config_finish).
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

#include "common/idn.h"
#include "common/log.h"
#include "engine/classify.h"

/* The most characters a line may hold, its line end not counted. */
#define CONFIG_LINE_MAX 65536
/* The most characters between the brackets of a section header: more than
 * the longest valid one, [dkim DOMAIN SELECTOR] of 253 + 127. */
#define SECTION_NAME_MAX 511

/* ---- parsing ---- */

void
config_err(struct parse *p, unsigned line, const char *fmt, ...)
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
            config_err(p, p->line, "a NUL character: not a text line");
        else
            config_err(p, p->line, "line longer than %d characters", CONFIG_LINE_MAX);
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
        config_err(p, p->line, "not a [section] header, a key = value line, or a comment");
        p->nsyntax++;
        return 0;
    }
    if (*s == '[') {
        const char *close = end;
        p->header_line = p->line;
        size_t nlen = (size_t)(close - s - 1);
        if (nlen > SECTION_NAME_MAX) {
            config_err(p, p->line, "[%.40s...]: section header longer than %d characters", s + 1,
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

bool
config_valid_domain_name(const char *s)
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

/* What to add to "not a domain name" for d: for an IDN written in U-labels
 * (sections are named in A-labels, the form destinations and keys have:
 * common/idn.h), its A-labels, or why it is no IDN; "" for anything else. */
static const char *
idn_hint(const char *d, char *buf, size_t cap)
{
    size_t len = strlen(d);
    if (idn_is_ascii(d, len))
        return "";
    char a[256];
    const char *why = NULL;
    if (idn_domain_ascii(d, len, a, sizeof(a), &why) > 0)
        snprintf(buf, cap, "; write an IDN in A-labels: %s", a);
    else
        snprintf(buf, cap, "; not a valid IDN: %s", why != NULL ? why : "too long");
    return buf;
}

static struct domain_build *
domain_section(struct parse *p, const char *arg)
{
    char name[256];
    size_t len = strlen(arg);
    if (len >= sizeof(name)) {
        config_err(p, p->header_line, "[domain ...]: name too long");
        return NULL;
    }
    for (size_t i = 0; i <= len; i++)
        name[i] = (char)tolower((unsigned char)arg[i]);
    if (len > 1 && name[len - 1] == '.')
        name[--len] = '\0';
    if (strcmp(name, "*") != 0 && !config_valid_domain_name(name)) {
        char hint[320];
        config_err(p, p->header_line, "[domain %s]: not a domain name (or * for the default)%s",
                   arg, idn_hint(name, hint, sizeof(hint)));
        return NULL;
    }
    for (unsigned i = 0; i < p->ndoms; i++)
        if (strcmp(p->doms[i].name, name) == 0)
            return &p->doms[i]; /* a section may be continued further down */
    if (p->ndoms == p->domcap) {
        unsigned cap = p->domcap ? p->domcap * 2 : 8;
        struct domain_build *d = realloc(p->doms, sizeof(*d) * cap);
        if (d == NULL) {
            config_err(p, p->line, "out of memory");
            return NULL;
        }
        p->doms = d;
        p->domcap = cap;
    }
    struct domain_build *d = &p->doms[p->ndoms];
    memset(d, 0, sizeof(*d));
    d->name = strdup(name);
    if (d->name == NULL) {
        config_err(p, p->line, "out of memory");
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
        config_err(p, p->line, "out of memory");
        return -1;
    }
    *v = nv;
    struct mx_policy *m = &nv[*n];
    memset(m, 0, sizeof(*m));
    char why[256];
    if (conf_defaults(v == &p->cfg->sources ? config_source_keys : config_mx_keys, m, why, sizeof(why)) < 0 ||
        (m->pattern = strdup(name)) == NULL) {
        config_err(p, p->line, "out of memory");
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
        config_err(p, p->header_line, "[mx ...]: pattern too long");
        return -1;
    }
    for (size_t i = 0; i <= len; i++)
        name[i] = (char)tolower((unsigned char)arg[i]);
    if (len > 1 && name[len - 1] == '.')
        name[--len] = '\0';
    const char *host = strncmp(name, "*.", 2) == 0 ? name + 2 : name;
    if (!config_valid_domain_name(host)) {
        config_err(p, p->header_line, "[mx %s]: not a host name or *.suffix pattern", arg);
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
        config_err(p, p->header_line, "[source %s]: not an IPv4 or IPv6 address", arg);
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
        config_err(p, p->header_line, "[dkim %s]: expected [dkim DOMAIN SELECTOR] (DOMAIN may be *)",
             arg);
        return -1;
    }
    for (char *c = d; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    size_t dl = strlen(d);
    if (dl > 1 && d[dl - 1] == '.')
        d[--dl] = '\0';
    if (strcmp(d, "*") != 0 && !config_valid_domain_name(d)) {
        char hint[320];
        config_err(p, p->header_line, "[dkim %s]: %s is not a domain name (or * for the default)%s",
                   arg, d, idn_hint(d, hint, sizeof(hint)));
        return -1;
    }
    for (unsigned i = 0; i < p->ndkims; i++)
        if (strcmp(p->dkims[i].domain, d) == 0 && strcmp(p->dkims[i].selector, sel) == 0) {
            p->dkim = &p->dkims[i]; /* continued further down */
            return 0;
        }
    struct dkim_build *v = realloc(p->dkims, (p->ndkims + 1) * sizeof(*v));
    if (v == NULL) {
        config_err(p, p->line, "out of memory");
        return -1;
    }
    p->dkims = v;
    struct dkim_build *b = &v[p->ndkims];
    memset(b, 0, sizeof(*b));
    char why[256];
    if (conf_defaults(dkim_sig_conf_keys, &b->sc, why, sizeof(why)) < 0 ||
        (b->domain = strdup(d)) == NULL || (b->selector = strdup(sel)) == NULL) {
        free(b->domain);
        config_err(p, p->line, "out of memory");
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
        config_err(p, p->header_line, "[events %s]: at most %d [events] sections", arg,
             EVENTS_SINKS_MAX);
        return -1;
    }
    struct events_sink_config *nv = realloc(cfg->events, (cfg->nevents + 1) * sizeof(*nv));
    if (nv == NULL) {
        config_err(p, p->line, "out of memory");
        return -1;
    }
    cfg->events = nv;
    struct events_sink_config *c = &nv[cfg->nevents];
    memset(c, 0, sizeof(*c));
    char why[256];
    if (conf_defaults(events_sink_keys, c, why, sizeof(why)) < 0 || (c->name = strdup(arg)) == NULL) {
        conf_free(events_sink_keys, c);
        config_err(p, p->line, "out of memory");
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
        config_err(p, p->header_line, "[warmup %s]: a plan name is 1 to %d of A-Z a-z 0-9 . _ -", arg,
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
        config_err(p, p->line, "out of memory");
        return -1;
    }
    cfg->warmups = nv;
    struct warmup_plan_conf *pl = &nv[cfg->nwarmups];
    memset(pl, 0, sizeof(*pl));
    if ((pl->name = strdup(arg)) == NULL) {
        config_err(p, p->line, "out of memory");
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
        config_err(p, p->header_line,
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
        config_err(p, p->line, "out of memory");
        return -1;
    }
    if (pool) {
        struct pool_config *nv = realloc(cfg->pools, (n + 1) * sizeof(*nv));
        if (nv == NULL) {
            free(name);
            config_err(p, p->line, "out of memory");
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
            config_err(p, p->line, "out of memory");
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
        config_err(p, p->line, "keys must follow a section header such as [server]");
    else
        config_err(p, p->header_line, "[%s]: unknown section%s", section,
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
    if (name[0] == '\0') {
        /* "= value": inih hands an empty name; every section's "unknown
         * key" would then begin with ": ". */
        config_err(p, p->line, "a line with no key name before its '='");
        return 1;
    }
    if (p->sec == -11) {
        if (warmup_conf_key(&p->cfg->warmups[p->warmup_i], name, value, p->line, why,
                            sizeof(why)) < 0)
            config_err(p, p->line, "%s", why);
        return 1;
    }
    if (p->sec == -7) {
        struct dkim_build *b = p->dkim;
        const struct conf_key *k = conf_find(dkim_sig_conf_keys, name);
        if (k == NULL) {
            config_err(p, p->line, "%s: unknown key in [dkim %s %s]%s", name, b->domain, b->selector,
                 key_hint(hint, sizeof(hint), dkim_sig_conf_keys, name));
            return 1;
        }
        unsigned *first = &b->key_line[k - dkim_sig_conf_keys];
        if (*first != 0) {
            config_err(p, p->line, "%s: set twice in [dkim %s %s] (first at line %u)", name, b->domain,
                 b->selector, *first);
            return 1;
        }
        *first = p->line;
        if (conf_set(dkim_sig_conf_keys, &b->sc, name, value, why, sizeof(why)) < 0)
            config_err(p, p->line, "%s: %s", name, why);
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
            config_err(p, p->line, "%s: unknown key in [%s %s]%s", name, pool ? "pool" : "tenant", sname,
                 key_hint(hint, sizeof(hint), keys, name));
            return 1;
        }
        unsigned *first = &lines[k - keys];
        if (*first != 0) {
            config_err(p, p->line, "%s: set twice in [%s %s] (first at line %u)", name,
                 pool ? "pool" : "tenant", sname, *first);
            return 1;
        }
        *first = p->line;
        if (conf_set(keys, obj, name, value, why, sizeof(why)) < 0)
            config_err(p, p->line, "%s: %s", name, why);
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
                    config_err(p, p->line, "%s: set twice in [%s %s] (first at line %u)", name,
                         p->sec == -5 ? "mx" : "source", m->pattern, ls->line);
                    return 1;
                }
            }
            if (p->nlim_set == p->lim_set_cap) {
                unsigned cap = p->lim_set_cap ? p->lim_set_cap * 2 : 16;
                struct lim_set *v = realloc(p->lim_set, cap * sizeof(*v));
                if (v == NULL) {
                    config_err(p, p->line, "out of memory");
                    return 1;
                }
                p->lim_set = v;
                p->lim_set_cap = cap;
            }
            p->lim_set[p->nlim_set++] = (struct lim_set){p->lim_v, p->lim_i, idx, p->line};
        }
        if (k == NULL)
            config_err(p, p->line, "%s: unknown key in [%s %s]%s", name, p->sec == -5 ? "mx" : "source",
                 m->pattern, key_hint(hint, sizeof(hint), lkeys, name));
        else if (conf_set(lkeys, m, name, value, why, sizeof(why)) < 0)
            config_err(p, p->line, "%s: %s", name, why);
        return 1;
    }
    if (p->sec == -8) {
        struct events_sink_config *c = &p->cfg->events[p->ev_i];
        const struct conf_key *k = conf_find(events_sink_keys, name);
        if (k == NULL) {
            config_err(p, p->line, "%s: unknown key in [events %s]%s", name, c->name,
                 key_hint(hint, sizeof(hint), events_sink_keys, name));
            return 1;
        }
        unsigned idx = (unsigned)(k - events_sink_keys);
        unsigned *first = &p->ev_set_line[p->ev_i][idx < MAX_KEYS ? idx : MAX_KEYS - 1];
        if (*first != 0) {
            config_err(p, p->line, "%s: set twice in [events %s] (first at line %u)", name, c->name,
                 *first);
            return 1;
        }
        *first = p->line;
        if (conf_set(events_sink_keys, c, name, value, why, sizeof(why)) < 0)
            config_err(p, p->line, "%s: %s", name, why);
        return 1;
    }
    if (p->sec == -4) {
        /* [classify]: CLASS = MATCHER, a key repeated as often as needed. */
        if (classify_add_rule(p->cfg->classify, name, value, why, sizeof(why)) < 0)
            config_err(p, p->line, "%s: %s", name, why);
        return 1;
    }
    if (p->sec == -2) {
        const struct conf_key *k = conf_find(config_domain_keys, name);
        if (k == NULL) {
            config_err(p, p->line, "%s: unknown key in [domain %s]%s", name, p->dom->name,
                 key_hint(hint, sizeof(hint), config_domain_keys, name));
            return 1;
        }
        unsigned idx = (unsigned)(k - config_domain_keys);
        for (unsigned i = 0; i < p->dom->nvalues; i++)
            if (p->dom->values[i].key == idx) {
                config_err(p, p->line, "%s: set twice in [domain %s] (first at line %u)", name,
                     p->dom->name, p->dom->values[i].line);
                return 1;
            }
        struct domain_policy scratch = {0};
        int src = conf_set(config_domain_keys, &scratch, name, value, why, sizeof(why));
        free(scratch.route); /* the only owned field: checked, not kept */
        if (src < 0) {
            config_err(p, p->line, "%s: %s", name, why);
            return 1;
        }
        struct domain_build *d = p->dom;
        if (d->nvalues == d->cap) {
            unsigned cap = d->cap ? d->cap * 2 : 8;
            struct raw_value *v = realloc(d->values, sizeof(*v) * cap);
            if (v == NULL) {
                config_err(p, p->line, "out of memory");
                return 1;
            }
            d->values = v;
            d->cap = cap;
        }
        char *copy = strdup(value);
        if (copy == NULL) {
            config_err(p, p->line, "out of memory");
            return 1;
        }
        d->values[d->nvalues++] = (struct raw_value){idx, p->line, copy};
        return 1;
    }

    const struct section *sec = &config_sections[p->sec];
    const struct conf_key *k = conf_find(sec->keys, name);
    if (k == NULL) {
        config_err(p, p->line, "%s: unknown key in [%s]%s", name, sec->name,
             key_hint(hint, sizeof(hint), sec->keys, name));
        return 1;
    }
    unsigned idx = (unsigned)(k - sec->keys);
    unsigned *first = &p->set_line[p->sec][idx < MAX_KEYS ? idx : MAX_KEYS - 1];
    if (*first != 0) {
        config_err(p, p->line, "%s: set twice in [%s] (first at line %u)", name, sec->name, *first);
        return 1;
    }
    *first = p->line;
    if (conf_set(sec->keys, (char *)p->cfg + sec->offset, name, value, why, sizeof(why)) < 0)
        config_err(p, p->line, "%s: %s", name, why);
    return 1;
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
        config_err(&p, 0, "out of memory");
    char why[256];
    for (unsigned i = 0; i < NSECTIONS; i++)
        if (conf_defaults(config_sections[i].keys, (char *)cfg + config_sections[i].offset, why, sizeof(why)) <
            0)
            config_err(&p, 0, "[%s] %s", config_sections[i].name, why);

    static pthread_once_t inih_once = PTHREAD_ONCE_INIT;
    pthread_once(&inih_once, inih_options);
    p.buf = malloc(CONFIG_LINE_MAX + 3);
    int rc = p.buf != NULL ? ini_parse_stream(reader, &p, on_key, &p) : -2;
    if (rc > 0 && p.nsyntax == 0) /* next_line() reports every such line */
        config_err(&p, (unsigned)rc, "not a [section] header, a key = value line, or a comment");
    else if (rc == -2)
        config_err(&p, 0, "out of memory");
    else if (rc < 0)
        config_err(&p, 0, "cannot parse (error %d)", rc);
    if (p.read_err != 0)
        config_err(&p, 0, "cannot read: %s", strerror(p.read_err));
    fclose(p.in);
    free(p.buf);

    if (p.nerrors == 0 && config_finish(&p) < 0 && p.nerrors == 0)
        config_err(&p, 0, "out of memory");
    config_free_builds(&p);
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
    free(cfg->server.listen_addrs);
    free(cfg->server.listen_tls_addrs);
    free(cfg->bounce.listen_addrs);
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
    shaping_rules_unref(cfg->shaping_rules);
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

void
config_share_unchanged(struct config *ncfg, const struct config *cur)
{
    if (shaping_rules_same(ncfg->shaping_rules, cur->shaping_rules)) {
        shaping_rules_unref(ncfg->shaping_rules);
        ncfg->shaping_rules = shaping_rules_ref(cur->shaping_rules);
    }
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
                 "section wins. With [redis] url they hold across all nodes; without, the "
                 "rates and bursts are split between the workers, the parts adding up to "
                 "the whole (the sites one section covers are spread over the workers), a "
                 "worker with no token left in its part taking one of a part that its "
                 "worker has asked for none of lately (so a domain alone gets the whole "
                 "rate), and max_connections is the node's, counted for every worker: a domain (whose "
                 "mail goes from one worker) may hold all of it while no other worker "
                 "wants a slot, and each worker is kept its part (the cap over the "
                 "workers, at least one) when it wants it. "
                 "A section a reload "
                 "adds holds for the connections already open too: each takes a slot of it "
                 "at its next transaction, or ends after the one it is in (with [redis] it "
                 "ends, and its domain asks for a slot as a new connection does).\n\n");
    reference_table(out, config_mx_keys, sizeof(struct mx_policy));
    fprintf(out, "## [source ADDRESS]: limits per source address\n\n"
                 "The same keys as [mx], for every connection that comes from ADDRESS, one of "
                 "the [delivery] source_address ones (what receivers see of this node), and "
                 "the name it greets with. With "
                 "[redis] url they hold across all nodes; without, as [mx] ones: the rates "
                 "and bursts split between the workers, max_connections the node's. A "
                 "[pool] lists sources by their "
                 "ADDRESS.\n\n");
    reference_table(out, config_source_keys, sizeof(struct mx_policy));
    fprintf(out, "## [pool NAME]: egress sources\n\n"
                 "A set of [source ADDRESS] sections that a message's mail is spread over by "
                 "weight. A message's pool comes from its tenant (the user's pool=, the "
                 "tenant's default, or an X-Sluice-Pool header naming one of the tenant's "
                 "pools). Names: 1 to 64 of A-Z a-z 0-9 . _ -, case-insensitive. A "
                 "destination is a (domain, pool) pair: a pool's mail leaves only from its "
                 "sources, each connection from one source picked by weight among those "
                 "not held, not suspended and with warm-up allowance left (the weights "
                 "hold per site, and across sites where a site has no say: each new "
                 "site's first connection goes by the pool's weighted round robin); a "
                 "source a receiver answers with 421 or a rate-limited reply is held at "
                 "that site alone. Mail without a pool leaves from [delivery] "
                 "source_address.\n\n");
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
                 "else is retried from retry_min doubling to retry_max (or after a 429's or "
                 "503's Retry-After when longer, up to retry_max). A Redis sink "
                 "pipelines a batch's XADDs and reads each reply: an event answered with an id "
                 "is in and not sent again while the sink runs (a restart, a crash or a reload "
                 "that restarts the sink may send it again: at least once); one refused with "
                 "a generic -ERR is dropped as "
                 "above when the stream took another of the same batch or it was sent alone "
                 "(a batch refused whole goes again one event at a time); any other error "
                 "(-OOM, -WRONGTYPE, -READONLY, -LOADING, ...: the server or the key takes "
                 "nothing now) or a lost connection retries the events not in, alone, after "
                 "the backoff, on a new connection (after a failover, the new master).\n\n");
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
