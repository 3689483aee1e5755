/*
 * mta_sts_policy: MTA-STS policies as data (see mta_sts.h): a policy body
 * parsed (RFC 8461 3.2) into a draft and sealed into a policy that takes
 * the octets its patterns need, shared by reference; the _mta-sts TXT
 * record parsed (3.1); an MX host matched against a policy's patterns
 * (4.1). Pure functions, no I/O: the store and its thread are
 * engine/mta_sts.c's.
 *
 * Threading: any thread; a policy's reference count is atomic, the rest
 * of a sealed policy is never written once it is shared.
 */
#include "engine/mta_sts.h"

#include <ctype.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

const char *
mta_sts_mode_str(enum mta_sts_mode m)
{
    return m == MTA_STS_ENFORCE ? "enforce" : m == MTA_STS_TESTING ? "testing" : "none";
}

/* ---- policies ---- */

struct mta_sts_policy *
mta_sts_policy_ref(struct mta_sts_policy *p)
{
    if (p != NULL)
        atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed);
    return p;
}

struct mta_sts_policy *
mta_sts_policy_unref(struct mta_sts_policy *p)
{
    if (p != NULL && atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) == 1)
        free(p);
    return NULL;
}

struct mta_sts_policy *
mta_sts_policy_seal(const struct mta_sts_policy_draft *d)
{
    size_t room = 0;
    unsigned n = d->nmx < MTA_STS_MAX_MX ? d->nmx : MTA_STS_MAX_MX;
    for (unsigned i = 0; i < n; i++)
        room += strlen(d->mx[i]) + 1;
    struct mta_sts_policy *p = calloc(1, sizeof(*p) + room);
    if (p == NULL)
        return NULL;
    atomic_init(&p->refs, 1);
    p->mode = d->mode;
    p->max_age = d->max_age;
    p->fetched_ms = d->fetched_ms;
    p->expires_ms = d->expires_ms;
    memcpy(p->id, d->id, sizeof(p->id));
    p->nmx = n;
    char *at = p->pats;
    for (unsigned i = 0; i < n; i++) {
        size_t l = strlen(d->mx[i]) + 1;
        memcpy(at, d->mx[i], l);
        p->mx[i] = at;
        at += l;
    }
    return p;
}

static void
trim(const char **s, const char **e)
{
    while (*s < *e && (**s == ' ' || **s == '\t'))
        (*s)++;
    while (*e > *s && ((*e)[-1] == ' ' || (*e)[-1] == '\t' || (*e)[-1] == '\r'))
        (*e)--;
}

static bool
span_is(const char *s, const char *e, const char *word)
{
    size_t n = strlen(word);
    return (size_t)(e - s) == n && memcmp(s, word, n) == 0;
}

/* An mx pattern: a host name, or "*." and one; normalised into out as
 * mta_sts_match() normalises the MX host (lowercase, no trailing dot), so
 * that a pattern the parser takes is one a host can match. */
bool
mta_sts_mx_pattern(const char *s, const char *e, char *out, size_t cap)
{
    size_t n = (size_t)(e - s);
    if (n == 0 || n + 1 > cap || memchr(s, '\0', n) != NULL)
        return false;
    memcpy(out, s, n);
    out[n] = '\0';
    char *name = out;
    if (n > 2 && out[0] == '*' && out[1] == '.')
        name = out + 2;
    char norm[DNS_NAME_MAX + 1];
    if (strchr(name, '*') != NULL || dns_name_normalize(name, norm) <= 0)
        return false;
    memcpy(name, norm, strlen(norm) + 1); /* no longer than name */
    return true;
}

int
mta_sts_policy_parse(const char *text, size_t len, struct mta_sts_policy **out, const char **why)
{
    *out = NULL;
    struct mta_sts_policy_draft draft, *p = &draft;
    memset(p, 0, sizeof(*p));
    /* RFC 8461 3.2: the fields come in any order (sts-policy-record is
     * any sts-policy-field after another); version, mode and max_age are
     * each required once, and "If any non-repeated field--i.e., all
     * fields excepting mx--is duplicated, all entries except for the
     * first SHALL be ignored". */
    bool have_version = false, have_mode = false, have_age = false;
    const char *end = text + len;
    for (const char *l = text; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l));
        const char *le = nl != NULL ? nl : end;
        const char *next = nl != NULL ? nl + 1 : end;
        const char *colon = memchr(l, ':', (size_t)(le - l));
        const char *ks = l, *ke = colon != NULL ? colon : le;
        trim(&ks, &ke);
        if (ks == ke && colon == NULL) { /* an empty line */
            l = next;
            continue;
        }
        if (colon == NULL) {
            *why = "a line without a colon";
            goto bad;
        }
        const char *vs = colon + 1, *ve = le;
        trim(&vs, &ve);
        if ((span_is(ks, ke, "version") && have_version) || (span_is(ks, ke, "mode") && have_mode) ||
            (span_is(ks, ke, "max_age") && have_age)) {
            l = next; /* a repeated field: the first stands */
            continue;
        }
        if (span_is(ks, ke, "version")) {
            if (!span_is(vs, ve, "STSv1")) {
                *why = "version is not STSv1";
                goto bad;
            }
            have_version = true;
        } else if (span_is(ks, ke, "mode")) {
            if (span_is(vs, ve, "enforce"))
                p->mode = MTA_STS_ENFORCE;
            else if (span_is(vs, ve, "testing"))
                p->mode = MTA_STS_TESTING;
            else if (span_is(vs, ve, "none"))
                p->mode = MTA_STS_NONE;
            else {
                *why = "mode is not enforce, testing or none";
                goto bad;
            }
            have_mode = true;
        } else if (span_is(ks, ke, "max_age")) {
            uint64_t v = 0;
            if (vs == ve || ve - vs > 10) {
                *why = "max_age is not a number of seconds";
                goto bad;
            }
            for (const char *c = vs; c < ve; c++) {
                if (!isdigit((unsigned char)*c)) {
                    *why = "max_age is not a number of seconds";
                    goto bad;
                }
                v = v * 10 + (uint64_t)(*c - '0');
            }
            p->max_age = v > MTA_STS_MAX_AGE ? MTA_STS_MAX_AGE : v;
            have_age = true;
        } else if (span_is(ks, ke, "mx")) {
            if (p->nmx == MTA_STS_MAX_MX) {
                l = next; /* beyond what is kept: the first ones stand */
                continue;
            }
            if (!mta_sts_mx_pattern(vs, ve, p->mx[p->nmx], sizeof(p->mx[0]))) {
                *why = "an mx line is not a host name or *.name";
                goto bad;
            }
            p->nmx++;
        } /* other keys: ignored (RFC 8461 3.2 extensions) */
        l = next;
    }
    if (!have_version || !have_mode || !have_age) {
        *why = !have_version ? "no version" : !have_mode ? "no mode" : "no max_age";
        goto bad;
    }
    if (p->nmx == 0 && p->mode != MTA_STS_NONE) {
        *why = "no mx line";
        goto bad;
    }
    if ((*out = mta_sts_policy_seal(p)) == NULL) {
        *why = "out of memory";
        return -ENOMEM;
    }
    *why = "ok";
    return 0;
bad:
    return -EINVAL;
}

static bool
is_wsp(char c)
{
    return c == ' ' || c == '\t';
}

/* sts-ext-name "=" sts-ext-value (RFC 8461 3.1) over [f, fe). */
static bool
txt_extension_ok(const char *f, const char *fe)
{
    const char *eq = memchr(f, '=', (size_t)(fe - f));
    if (eq == NULL || eq == f || eq - f > 32 || !isalnum((unsigned char)*f) || eq + 1 == fe)
        return false;
    for (const char *c = f + 1; c < eq; c++)
        if (!isalnum((unsigned char)*c) && *c != '_' && *c != '-' && *c != '.')
            return false;
    for (const char *c = eq + 1; c < fe; c++) /* %x21-3A / %x3C / %x3E-7E */
        if ((unsigned char)*c < 0x21 || (unsigned char)*c > 0x7e || *c == ';' || *c == '=')
            return false;
    return true;
}

int
mta_sts_txt_parse(const char *txt, char id[33])
{
    /* RFC 8461 3.1:
     *   sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim]
     *   sts-field-delim = *WSP ";" *WSP
     *   sts-version     = %s"v=STSv1"
     *   sts-field       = sts-id / sts-extension
     * A record that does not begin with the version and a delimiter is
     * no STSv1 record: it is discarded, and so cannot hide a valid one
     * beside it ("v=STSv1 is not a policy"). One that does and then
     * breaks the grammar is broken. Trailing blanks are tolerated. */
    const char *s = txt;
    if (strncmp(s, "v=STSv1", 7) != 0)
        return -ENOENT;
    s += 7;
    while (is_wsp(*s))
        s++;
    if (*s != ';')
        return -ENOENT;
    id[0] = '\0';
    bool fields = false;
    while (*s == ';') {
        s++;
        while (is_wsp(*s))
            s++;
        if (*s == '\0')
            break; /* the optional last delimiter */
        const char *fe = s;
        while (*fe != '\0' && *fe != ';' && !is_wsp(*fe))
            fe++;
        if (strncmp(s, "id=", 3) == 0) {
            /* the grammar lets a field repeat: the last id= stands */
            size_t n = (size_t)(fe - (s + 3));
            if (n == 0 || n > 32)
                return -EINVAL;
            for (size_t i = 0; i < n; i++)
                if (!isalnum((unsigned char)s[3 + i]))
                    return -EINVAL;
            memcpy(id, s + 3, n);
            id[n] = '\0';
        } else if (!txt_extension_ok(s, fe)) {
            return -EINVAL;
        }
        fields = true;
        s = fe;
        while (is_wsp(*s))
            s++;
    }
    if (*s != '\0' || !fields)
        return -EINVAL; /* a field not after a ";" ("id=1 id=2"), or no field */
    return id[0] != '\0' ? 0 : -EINVAL;
}

bool
mta_sts_match(const struct mta_sts_policy *p, const char *mx)
{
    char host[DNS_NAME_MAX + 1];
    if (p == NULL || dns_name_normalize(mx, host) < 0)
        return false;
    for (unsigned i = 0; i < p->nmx; i++) {
        const char *pat = p->mx[i];
        if (pat[0] == '*' && pat[1] == '.') {
            /* One label, not more: "*.example.com" matches mx.example.com,
             * not a.b.example.com nor example.com. */
            const char *dot = strchr(host, '.');
            if (dot != NULL && dot != host && strcmp(dot + 1, pat + 2) == 0)
                return true;
        } else if (strcmp(host, pat) == 0) {
            return true;
        }
    }
    return false;
}
