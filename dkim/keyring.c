/*
 * keyring: the signing configuration of a node, built once per config
 * load (start and SIGHUP) and immutable after dkim_keyring_seal(): the
 * signers of [dkim DOMAIN SELECTOR] sections and of the key directory,
 * sorted by domain for a binary search, and the [dkim * SELECTOR]
 * defaults. Also the key tables of [dkim] and [dkim DOMAIN SELECTOR].
 *
 * Key directory layout: KEY_DIR/DOMAIN/SELECTOR.pem, one directory per
 * signing domain (lowercase), one file per selector, the algorithm read
 * from the key. It is read whole at each load, so a key added, replaced
 * or removed takes effect at the next SIGHUP; a file that cannot be read
 * or parsed makes the whole load fail (the running config stays).
 *
 * Threading: built on one thread; once sealed, read by any thread;
 * references are atomic.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "dkim/dkim.h"
#include "dkim/dkim_int.h"

static const char *const domain_sources[] = {"from", "envelope", NULL};
static const char *const on_worker_choices[] = {"none", "ed25519", "all", NULL};

#define DK(f) offsetof(struct dkim_config, f)
const struct conf_key dkim_conf_keys[] = {
    {"key_dir", CONF_STRING, DK(key_dir), 1, 4096, NULL,
     "directory of keys for many domains: KEY_DIR/DOMAIN/SELECTOR.pem (RSA or Ed25519, "
     "PKCS#8 or traditional PEM), read again on SIGHUP; unset: none",
     NULL},
    {"signing_domain", CONF_ENUM, DK(signing_domain), 0, 0, "from",
     "which domain's keys sign a message: from (the From: header's, aligned for DMARC) or "
     "envelope (the MAIL FROM address's)",
     domain_sources},
    {"headers", CONF_STRING, DK(headers), 1, 2048,
     "From, To, Cc, Subject, Date, Message-ID, MIME-Version, Content-Type, "
     "Content-Transfer-Encoding, Reply-To, In-Reply-To, References, List-Unsubscribe, "
     "List-Unsubscribe-Post, List-Id, Feedback-ID",
     "header fields signed (each as many times as it is present), comma-separated", NULL},
    {"oversign_headers", CONF_STRING, DK(oversign_headers), 0, 2048, "From, Subject",
     "of the signed fields, those signed once more than present, so that none can be added "
     "after signing",
     NULL},
    {"canonicalization", CONF_STRING, DK(canonicalization), 1, 32, "relaxed/relaxed",
     "header/body canonicalization: relaxed/relaxed, relaxed/simple, simple/relaxed, "
     "simple/simple (relaxed or simple alone: that for the header, simple for the body)",
     NULL},
    {"expire", CONF_DURATION, DK(expire), 0, 3650ULL * 86400 * 1000, "0",
     "signatures expire this long after signing (x= tag); 0: no x=", NULL},
    {"threads", CONF_UINT, DK(threads), 0, 256, "0",
     "signing threads, for the messages not signed on their worker (sign_on_worker); 0: one "
     "per core",
     NULL},
    {"queue_max", CONF_UINT, DK(queue_max), 1, 1000000, "10000",
     "messages waiting for a signing thread; beyond it a message gets 451 4.3.0", NULL},
    {"sign_on_worker", CONF_ENUM, DK(sign_on_worker), 0, 0, "ed25519",
     "messages signed on the worker that received them instead of in a signing thread: none, "
     "ed25519 (those whose every signature is Ed25519: about 30 us each, less than the trip "
     "to a thread and back), or all (RSA too: each RSA-2048 signature holds the worker's other "
     "sessions for about 0.3 ms)",
     on_worker_choices},
    CONF_END,
};

#define DS(f) offsetof(struct dkim_sig_config, f)
const struct conf_key dkim_sig_conf_keys[] = {
    {"key_file", CONF_STRING, DS(key_file), 1, 4096, NULL,
     "the private key, PEM (RSA of 1024 bits or more, or Ed25519): the algorithm comes "
     "from the key; required",
     NULL},
    {"domain", CONF_STRING, DS(domain), 1, 253, NULL,
     "[dkim * SELECTOR] only, required there: the provider's domain (d=) that signs mail "
     "whose domain has no key of its own",
     NULL},
    {"headers", CONF_STRING, DS(headers), 1, 2048, NULL,
     "header fields signed; unset: [dkim] headers", NULL},
    {"oversign_headers", CONF_STRING, DS(oversign_headers), 0, 2048, NULL,
     "fields signed once more than present; unset: [dkim] oversign_headers", NULL},
    {"canonicalization", CONF_STRING, DS(canonicalization), 1, 32, NULL,
     "as in [dkim]; unset: [dkim] canonicalization", NULL},
    {"expire", CONF_DURATION, DS(expire), 0, 3650ULL * 86400 * 1000, "0",
     "x= this long after signing; 0: [dkim] expire", NULL},
    CONF_END,
};

struct dkim_keyring {
    atomic_uint refs;
    int signing_domain;
    struct dkim_signer *v; /* owned array: domain-specific signers, sorted by domain */
    size_t n, cap;
    struct dkim_signer *defaults; /* owned array: [dkim * SELECTOR] */
    size_t ndefaults, defcap;
    unsigned canons;
    bool sealed;
};

static void
signer_fini(struct dkim_signer *s)
{
    free(s->domain);
    free(s->selector);
    free(s->source);
    dkim_key_free(s->key);
    for (unsigned i = 0; i < s->nheaders; i++)
        free(s->headers[i]);
    free(s->headers);
    for (unsigned i = 0; i < s->noversign; i++)
        free(s->oversign[i]);
    free(s->oversign);
}

struct dkim_keyring *
dkim_keyring_new(int signing_domain)
{
    struct dkim_keyring *kr = calloc(1, sizeof(*kr));
    if (kr == NULL)
        return NULL;
    atomic_init(&kr->refs, 1);
    kr->signing_domain = signing_domain;
    return kr;
}

struct dkim_keyring *
dkim_keyring_ref(struct dkim_keyring *kr)
{
    atomic_fetch_add(&kr->refs, 1);
    return kr;
}

struct dkim_keyring *
dkim_keyring_unref(struct dkim_keyring *kr)
{
    if (kr == NULL || atomic_fetch_sub(&kr->refs, 1) != 1)
        return NULL;
    for (size_t i = 0; i < kr->n; i++)
        signer_fini(&kr->v[i]);
    for (size_t i = 0; i < kr->ndefaults; i++)
        signer_fini(&kr->defaults[i]);
    free(kr->v);
    free(kr->defaults);
    free(kr);
    return NULL;
}

static int
parse_canon(const char *s, enum dkim_canon *h, enum dkim_canon *b)
{
    char a[16], c[16];
    const char *slash = strchr(s, '/');
    size_t al = slash ? (size_t)(slash - s) : strlen(s);
    if (al >= sizeof(a) || (slash && strlen(slash + 1) >= sizeof(c)))
        return -EINVAL;
    memcpy(a, s, al);
    a[al] = '\0';
    snprintf(c, sizeof(c), "%s", slash ? slash + 1 : "simple");
    enum dkim_canon *out[2] = {h, b};
    const char *in[2] = {a, c};
    for (int i = 0; i < 2; i++) {
        if (strcasecmp(in[i], "relaxed") == 0)
            *out[i] = DKIM_CANON_RELAXED;
        else if (strcasecmp(in[i], "simple") == 0)
            *out[i] = DKIM_CANON_SIMPLE;
        else
            return -EINVAL;
    }
    return 0;
}

/* "From, To" into lowercase names. Returns 0 or -EINVAL with err. */
static int
parse_names(const char *s, char ***out, unsigned *n, char *err, size_t errlen)
{
    *out = NULL;
    *n = 0;
    unsigned cap = 0;
    while (s != NULL && *s != '\0') {
        while (*s == ' ' || *s == '\t' || *s == ',' || *s == ':')
            s++;
        size_t len = strcspn(s, ", \t:");
        if (len == 0)
            break;
        for (size_t i = 0; i < len; i++)
            if ((unsigned char)s[i] <= 32 || (unsigned char)s[i] >= 127) {
                snprintf(err, errlen, "\"%.*s\" is not a header field name", (int)len, s);
                return -EINVAL;
            }
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            char **g = realloc(*out, cap * sizeof(*g));
            if (g == NULL)
                return -ENOMEM;
            *out = g;
        }
        char *name = strndup(s, len);
        if (name == NULL)
            return -ENOMEM;
        for (char *c = name; *c; c++)
            *c = (char)tolower((unsigned char)*c);
        (*out)[(*n)++] = name;
        s += len;
    }
    return 0;
}

static bool
valid_selector(const char *s)
{
    if (*s == '\0' || strlen(s) > 63)
        return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '-' && *s != '_' && *s != '.')
            return false;
    return true;
}

static bool
valid_domain(const char *s)
{
    size_t len = strlen(s);
    if (len == 0 || len > 253 || s[0] == '.' || s[len - 1] == '.' || strstr(s, "..") != NULL)
        return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '-' && *s != '_' && *s != '.')
            return false;
    return true;
}

/* What to add to "not a domain name" for s: an IDN written in U-labels
 * has a form that is one (keys are looked up by A-labels, sign.c). */
static const char *
idn_hint(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return " (write an IDN in A-labels: xn--...)";
    return "";
}

int
dkim_config_check(const struct dkim_config *c, const char **bad, char *err, size_t errlen)
{
    enum dkim_canon h, b;
    if (parse_canon(c->canonicalization, &h, &b) < 0) {
        *bad = "canonicalization";
        snprintf(err, errlen, "\"%s\": expected relaxed/relaxed, relaxed/simple, "
                              "simple/relaxed or simple/simple", c->canonicalization);
        return -EINVAL;
    }
    const char *keys[2] = {"headers", "oversign_headers"};
    const char *vals[2] = {c->headers, c->oversign_headers};
    for (int i = 0; i < 2; i++) {
        char **names;
        unsigned n;
        int rc = parse_names(vals[i], &names, &n, err, errlen);
        bool has_from = false;
        for (unsigned k = 0; k < n; k++) {
            has_from |= strcmp(names[k], "from") == 0;
            free(names[k]);
        }
        free(names);
        if (rc == 0 && i == 0 && !has_from) {
            snprintf(err, errlen, "must include From (RFC 6376 5.4)");
            rc = -EINVAL;
        }
        if (rc < 0) {
            *bad = keys[i];
            return rc;
        }
    }
    return 0;
}

static int
push(struct dkim_signer **v, size_t *n, size_t *cap, struct dkim_signer *s)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 16;
        struct dkim_signer *g = realloc(*v, nc * sizeof(*g));
        if (g == NULL)
            return -ENOMEM;
        *v = g;
        *cap = nc;
    }
    (*v)[(*n)++] = *s;
    return 0;
}

/* Build one signer; on failure *bad names the key at fault. */
static int
signer_build(struct dkim_keyring *kr, const char *domain, const char *selector,
             const char *key_file, const struct dkim_sig_config *sc,
             const struct dkim_config *def, const char **bad, char *err, size_t errlen)
{
    struct dkim_signer s;
    memset(&s, 0, sizeof(s));
    int rc = -ENOMEM;
    const char *canon = sc && sc->canonicalization ? sc->canonicalization : def->canonicalization;
    const char *hdrs = sc && sc->headers ? sc->headers : def->headers;
    const char *over = sc && sc->oversign_headers ? sc->oversign_headers : def->oversign_headers;
    uint64_t expire = sc && sc->expire ? sc->expire : def->expire;
    bool is_default = strcmp(domain, "*") == 0;
    const char *d = is_default ? (sc ? sc->domain : NULL) : domain;
    if (!valid_selector(selector)) {
        *bad = "selector";
        snprintf(err, errlen, "\"%s\" is not a selector (letters, digits, - _ .)", selector);
        return -EINVAL;
    }
    if (d == NULL) {
        *bad = "domain";
        snprintf(err, errlen, "[dkim * %s] needs domain = the provider's domain (d=)", selector);
        return -EINVAL;
    }
    if (!valid_domain(d)) {
        *bad = "domain";
        snprintf(err, errlen, "\"%s\" is not a domain name%s", d, idn_hint(d));
        return -EINVAL;
    }
    if (key_file == NULL) {
        *bad = "key_file";
        snprintf(err, errlen, "missing: the PEM private key of this signature");
        return -EINVAL;
    }
    if (parse_canon(canon, &s.hdr_canon, &s.body_canon) < 0) {
        *bad = "canonicalization";
        snprintf(err, errlen, "\"%s\": expected relaxed/relaxed, relaxed/simple, "
                              "simple/relaxed or simple/simple", canon);
        return -EINVAL;
    }
    if ((rc = parse_names(hdrs, &s.headers, &s.nheaders, err, errlen)) < 0) {
        *bad = "headers";
        goto fail;
    }
    bool has_from = false;
    for (unsigned i = 0; i < s.nheaders; i++)
        has_from |= strcmp(s.headers[i], "from") == 0;
    if (!has_from) {
        *bad = "headers";
        snprintf(err, errlen, "must include From (RFC 6376 5.4)");
        rc = -EINVAL;
        goto fail;
    }
    if ((rc = parse_names(over, &s.oversign, &s.noversign, err, errlen)) < 0) {
        *bad = "oversign_headers";
        goto fail;
    }
    s.expire_s = (expire + 999) / 1000;
    *bad = "key_file";
    rc = dkim_key_load(key_file, &s.key, err, errlen);
    if (rc < 0)
        goto fail;
    rc = -ENOMEM;
    s.domain = strdup(d);
    s.selector = strdup(selector);
    s.source = strdup(key_file);
    if (s.domain == NULL || s.selector == NULL || s.source == NULL)
        goto fail;
    for (char *c = s.domain; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    if (sc != NULL && dkim_keyring_find(kr, is_default ? "*" : s.domain, selector) != NULL) {
        *bad = "selector";
        snprintf(err, errlen, "%s and selector %s already have a key", is_default ? "*" : d,
                 selector);
        rc = -EEXIST;
        goto fail;
    }
    rc = is_default ? push(&kr->defaults, &kr->ndefaults, &kr->defcap, &s)
                    : push(&kr->v, &kr->n, &kr->cap, &s);
    if (rc < 0)
        goto fail;
    kr->canons |= 1u << s.body_canon;
    return 0;
fail:
    if (rc == -ENOMEM && err[0] == '\0')
        snprintf(err, errlen, "out of memory");
    signer_fini(&s);
    return rc;
}

int
dkim_keyring_add(struct dkim_keyring *kr, const char *domain, const char *selector,
                 const struct dkim_sig_config *sc, const struct dkim_config *defaults,
                 const char **bad_key, char *err, size_t errlen)
{
    err[0] = '\0';
    char d[256];
    snprintf(d, sizeof(d), "%s", domain);
    for (char *c = d; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    size_t dl = strlen(d);
    if (dl > 1 && d[dl - 1] == '.')
        d[dl - 1] = '\0';
    if (strcmp(d, "*") != 0 && sc->domain != NULL) {
        *bad_key = "domain";
        snprintf(err, errlen, "only for [dkim * SELECTOR]: here the section names the domain");
        return -EINVAL;
    }
    return signer_build(kr, d, selector, sc->key_file, sc, defaults, bad_key, err, errlen);
}

int
dkim_keyring_add_dir(struct dkim_keyring *kr, const struct dkim_config *defaults,
                     void (*report)(void *ctx, const char *what), void *ctx)
{
    char msg[9000];
    DIR *top = opendir(defaults->key_dir);
    if (top == NULL) {
        int e = errno;
        snprintf(msg, sizeof(msg), "key_dir %s: %s", defaults->key_dir, strerror(e));
        report(ctx, msg);
        return -e;
    }
    int errors = 0;
    struct dirent *de;
    while ((de = readdir(top)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        char dpath[4096];
        snprintf(dpath, sizeof(dpath), "%s/%s", defaults->key_dir, de->d_name);
        struct stat st;
        if (stat(dpath, &st) < 0 || !S_ISDIR(st.st_mode))
            continue; /* README files and the like */
        if (!valid_domain(de->d_name)) {
            snprintf(msg, sizeof(msg), "%s: not a domain name%s (KEY_DIR/DOMAIN/SELECTOR.pem)",
                     dpath, idn_hint(de->d_name));
            report(ctx, msg);
            errors++;
            continue;
        }
        DIR *sub = opendir(dpath);
        if (sub == NULL) {
            snprintf(msg, sizeof(msg), "%s: %s", dpath, strerror(errno));
            report(ctx, msg);
            errors++;
            continue;
        }
        struct dirent *fe;
        while ((fe = readdir(sub)) != NULL) {
            size_t fl = strlen(fe->d_name);
            if (fe->d_name[0] == '.' || fl < 5 || strcmp(fe->d_name + fl - 4, ".pem") != 0)
                continue;
            char sel[256], fpath[4400], err[1024];
            snprintf(sel, sizeof(sel), "%.*s", (int)(fl - 4), fe->d_name);
            snprintf(fpath, sizeof(fpath), "%s/%s", dpath, fe->d_name);
            const char *bad = NULL;
            err[0] = '\0';
            char dom[256];
            snprintf(dom, sizeof(dom), "%s", de->d_name);
            for (char *c = dom; *c; c++)
                *c = (char)tolower((unsigned char)*c);
            if (signer_build(kr, dom, sel, fpath, NULL, defaults, &bad, err, sizeof(err)) < 0) {
                snprintf(msg, sizeof(msg), "%s: %s", fpath, err);
                report(ctx, msg);
                errors++;
            }
        }
        closedir(sub);
    }
    closedir(top);
    return errors;
}

static int
cmp_signer(const void *a, const void *b)
{
    const struct dkim_signer *x = a, *y = b;
    int c = strcmp(x->domain, y->domain);
    return c ? c : strcmp(x->selector, y->selector);
}

int
dkim_keyring_seal(struct dkim_keyring *kr, void (*report)(void *ctx, const char *what),
                  void *ctx)
{
    if (kr->n > 1)
        qsort(kr->v, kr->n, sizeof(*kr->v), cmp_signer);
    kr->sealed = true;
    int errors = 0;
    char msg[9000];
    for (size_t i = 0, run = 1; i < kr->n; i++, run++) {
        if (i > 0 && strcmp(kr->v[i - 1].domain, kr->v[i].domain) != 0)
            run = 1;
        if (run == DKIM_MAX_SIGNERS + 1) {
            snprintf(msg, sizeof(msg), "%s: domain %s has more than %d keys", kr->v[i].source,
                     kr->v[i].domain, DKIM_MAX_SIGNERS);
            report(ctx, msg);
            errors++;
        }
    }
    if (kr->ndefaults > DKIM_MAX_SIGNERS) {
        snprintf(msg, sizeof(msg), "%s: more than %d [dkim * SELECTOR] sections",
                 kr->defaults[DKIM_MAX_SIGNERS].source, DKIM_MAX_SIGNERS);
        report(ctx, msg);
        errors++;
    }
    for (size_t i = 1; i < kr->n; i++)
        if (cmp_signer(&kr->v[i - 1], &kr->v[i]) == 0) {
            snprintf(msg, sizeof(msg), "%s: domain %s selector %s already has a key (%s)",
                     kr->v[i].source, kr->v[i].domain, kr->v[i].selector, kr->v[i - 1].source);
            report(ctx, msg);
            errors++;
        }
    return errors;
}

unsigned
dkim_keyring_count(const struct dkim_keyring *kr)
{
    return kr ? (unsigned)(kr->n + kr->ndefaults) : 0;
}

static bool
strs_same(char *const *a, unsigned na, char *const *b, unsigned nb)
{
    if (na != nb)
        return false;
    for (unsigned i = 0; i < na; i++)
        if (strcmp(a[i], b[i]) != 0)
            return false;
    return true;
}

static bool
signer_same(const struct dkim_signer *s, const struct dkim_signer *t)
{
    return t != NULL && strcmp(s->domain, t->domain) == 0 && s->hdr_canon == t->hdr_canon &&
           s->body_canon == t->body_canon && s->expire_s == t->expire_s &&
           strs_same(s->headers, s->nheaders, t->headers, t->nheaders) &&
           strs_same(s->oversign, s->noversign, t->oversign, t->noversign) &&
           dkim_key_same(s->key, t->key);
}

bool
dkim_keyring_same(const struct dkim_keyring *a, const struct dkim_keyring *b)
{
    if (a == b)
        return true;
    if (a == NULL || b == NULL || a->n != b->n || a->ndefaults != b->ndefaults ||
        a->signing_domain != b->signing_domain)
        return false;
    /* as many signers each, each of a's in b: one domain and selector
     * has one signer in a sealed keyring, so none of b's is left over */
    for (size_t i = 0; i < a->n; i++)
        if (!signer_same(&a->v[i], dkim_keyring_find(b, a->v[i].domain, a->v[i].selector)))
            return false;
    for (size_t i = 0; i < a->ndefaults; i++)
        if (!signer_same(&a->defaults[i], dkim_keyring_find(b, "*", a->defaults[i].selector)))
            return false;
    return true;
}

unsigned
dkim_keyring_body_canons(const struct dkim_keyring *kr)
{
    return kr ? kr->canons : 0;
}

int
dkim_keyring_signing_domain(const struct dkim_keyring *kr)
{
    return kr->signing_domain;
}

/* The first signer of domain in the sorted array, or n. */
static size_t
lower_bound(const struct dkim_keyring *kr, const char *domain)
{
    size_t lo = 0, hi = kr->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (strcmp(kr->v[mid].domain, domain) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

unsigned
dkim_keyring_lookup(const struct dkim_keyring *kr, const char *domain,
                    const struct dkim_signer **out, unsigned max)
{
    unsigned n = 0;
    for (const char *d = domain; d != NULL && *d != '\0';) {
        size_t i = lower_bound(kr, d);
        for (; i < kr->n && n < max && strcmp(kr->v[i].domain, d) == 0; i++)
            out[n++] = &kr->v[i];
        if (n > 0)
            return n;
        d = strchr(d, '.');
        if (d != NULL)
            d++;
        if (d != NULL && strchr(d, '.') == NULL)
            break; /* never a bare top-level domain's key */
    }
    for (size_t i = 0; i < kr->ndefaults && n < max; i++)
        out[n++] = &kr->defaults[i];
    return n;
}

const struct dkim_signer *
dkim_keyring_find(const struct dkim_keyring *kr, const char *domain, const char *selector)
{
    if (strcmp(domain, "*") == 0) {
        for (size_t i = 0; i < kr->ndefaults; i++)
            if (strcmp(kr->defaults[i].selector, selector) == 0)
                return &kr->defaults[i];
        return NULL;
    }
    if (kr->sealed) {
        for (size_t i = lower_bound(kr, domain); i < kr->n && strcmp(kr->v[i].domain, domain) == 0;
             i++)
            if (strcmp(kr->v[i].selector, selector) == 0)
                return &kr->v[i];
        return NULL;
    }
    /* before seal the array is unsorted: a plain scan (sections only) */
    for (size_t i = 0; i < kr->n; i++)
        if (strcmp(kr->v[i].domain, domain) == 0 && strcmp(kr->v[i].selector, selector) == 0)
            return &kr->v[i];
    return NULL;
}
