/*
 * owner: the control header fields of a message and who it belongs to
 * (see owner.h). Duplicated control fields are refused rather than one of
 * them picked: a message whose owner is ambiguous is the client's error,
 * and a guess would file it under the wrong customer.
 */
#include "engine/owner.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

static const char *const field_names[OWNER_F_COUNT] = {
    "X-Sluice-Tenant", "X-Sluice-Campaign", "X-Sluice-Pool", "X-Sluice-Priority", NULL,
};

const char *
owner_field_name(enum owner_field f, const char *expire_name)
{
    if (f == OWNER_F_EXPIRE)
        return expire_name;
    return (unsigned)f < OWNER_F_COUNT ? field_names[f] : "?";
}

/* The end of the line at off (past its LF), within len. */
static size_t
line_end(const char *msg, size_t len, size_t off)
{
    const char *lf = memchr(msg + off, '\n', len - off);
    return lf ? (size_t)(lf - msg) + 1 : len;
}

static bool
value_ok(enum owner_field f, const char *v, size_t n)
{
    switch (f) {
    case OWNER_F_TENANT:
    case OWNER_F_POOL:
        return config_name_valid(v, n);
    case OWNER_F_CAMPAIGN:
        for (size_t i = 0; i < n; i++)
            if ((unsigned char)v[i] < 0x20 || (unsigned char)v[i] > 0x7e || v[i] == '"' ||
                v[i] == '\\')
                return false;
        return true;
    case OWNER_F_PRIORITY:
        return n == 1 && v[0] >= '0' && v[0] <= '9';
    default:
        return true; /* the expiry's syntax is msa_parse_expiry()'s */
    }
}

int
owner_scan(const char *msg, size_t hdr_len, const char *expire_name, struct owner_scan *out,
           enum owner_field *field)
{
    memset(out, 0, sizeof(*out));
    bool seen[OWNER_F_COUNT] = {false};
    size_t pos = 0;
    while (pos < hdr_len) {
        const char *line = msg + pos;
        size_t end = line_end(msg, hdr_len, pos);
        if (line[0] == ' ' || line[0] == '\t') {
            pos = end; /* a continuation of a field that is not ours */
            continue;
        }
        const char *colon = memchr(line, ':', end - pos);
        if (colon == NULL) {
            pos = end;
            continue;
        }
        size_t nlen = (size_t)(colon - line);
        while (nlen > 0 && (line[nlen - 1] == ' ' || line[nlen - 1] == '\t'))
            nlen--;
        int f = -1;
        for (int i = 0; i < OWNER_F_COUNT && f < 0; i++) {
            const char *name = owner_field_name((enum owner_field)i, expire_name);
            if (name != NULL && strlen(name) == nlen && strncasecmp(line, name, nlen) == 0)
                f = i;
        }
        /* the field with its continuation lines */
        while (end < hdr_len && (msg[end] == ' ' || msg[end] == '\t'))
            end = line_end(msg, hdr_len, end);
        if (f < 0) {
            pos = end;
            continue;
        }
        *field = (enum owner_field)f;
        if (seen[f])
            return OWNER_EDUP;
        seen[f] = true;
        out->cuts[out->ncuts++] = (struct owner_cut){pos, end - pos};
        /* unfold: drop CR and LF, keep the blanks; then trim */
        char *v = out->value[f];
        size_t n = 0;
        for (const char *c = colon + 1; c < msg + end; c++) {
            if (*c == '\r' || *c == '\n')
                continue;
            if (n == 0 && (*c == ' ' || *c == '\t'))
                continue;
            if (n == OWNER_VALUE_MAX) {
                /* trailing blanks may still fit once trimmed */
                const char *r = c;
                while (r < msg + end && (*r == ' ' || *r == '\t' || *r == '\r' || *r == '\n'))
                    r++;
                if (r < msg + end)
                    return OWNER_ELONG;
                break;
            }
            v[n++] = *c == '\t' ? ' ' : *c; /* a folded tab reads as a blank */
        }
        while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t'))
            n--;
        v[n] = '\0';
        if (n > 0 && !value_ok((enum owner_field)f, v, n))
            return OWNER_EVALUE;
        out->present[f] = n > 0;
        pos = end;
    }
    return 0;
}

static int __attribute__((format(printf, 3, 4)))
refuse(char *reply, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reply, cap, fmt, ap);
    va_end(ap);
    return -EPERM;
}

int
owner_resolve(const struct config *cfg, const struct auth_user *user, bool trusted,
              const struct owner_scan *sc, struct owner *out, char *reply, size_t cap)
{
    memset(out, 0, sizeof(*out));
    const char *ht = sc->present[OWNER_F_TENANT] ? sc->value[OWNER_F_TENANT] : NULL;
    const char *hp = sc->present[OWNER_F_POOL] ? sc->value[OWNER_F_POOL] : NULL;
    const char *uname = user ? user->name : "";

    /* the tenant: the user's binds; a header only from trusted networks */
    if (user != NULL && user->tenant != NULL) {
        out->tenant = config_tenant(cfg, user->tenant, strlen(user->tenant));
        if (out->tenant == NULL)
            return refuse(reply, cap,
                          "451 4.3.5 tenant \"%s\" of user \"%s\" is not configured: try again "
                          "later",
                          user->tenant, uname);
        if (ht != NULL && strcasecmp(ht, out->tenant->name) != 0)
            return refuse(reply, cap, "550 5.7.1 tenant \"%s\" not allowed for user \"%s\"", ht,
                          uname);
    } else if (ht != NULL) {
        if (!trusted)
            return refuse(reply, cap,
                          "550 5.7.1 X-Sluice-Tenant is honoured from trusted networks only");
        out->tenant = config_tenant(cfg, ht, strlen(ht));
        if (out->tenant == NULL)
            return refuse(reply, cap, "550 5.7.1 unknown tenant \"%s\"", ht);
    }
    const struct tenant_config *t = out->tenant;

    /* the pool: the header's, else the user's, else the tenant's default */
    if (hp != NULL) {
        out->pool = config_pool(cfg, hp, strlen(hp));
        if (out->pool == NULL)
            return refuse(reply, cap, "550 5.7.1 unknown pool \"%s\"", hp);
        if (user != NULL && user->pool != NULL && strcasecmp(user->pool, out->pool->name) != 0)
            return refuse(reply, cap, "550 5.7.1 pool \"%s\" not allowed for user \"%s\"",
                          out->pool->name, uname);
        if (t != NULL && !config_tenant_may_use(t, out->pool))
            return refuse(reply, cap, "550 5.7.1 pool \"%s\" not allowed for tenant \"%s\"",
                          out->pool->name, t->name);
        if (t == NULL && !trusted && (user == NULL || user->pool == NULL))
            return refuse(reply, cap, "550 5.7.1 pool \"%s\" not allowed for user \"%s\"",
                          out->pool->name, uname);
    } else if (user != NULL && user->pool != NULL) {
        out->pool = config_pool(cfg, user->pool, strlen(user->pool));
        if (out->pool == NULL)
            return refuse(reply, cap,
                          "451 4.3.5 pool \"%s\" of user \"%s\" is not configured: try again "
                          "later",
                          user->pool, uname);
        if (t != NULL && !config_tenant_may_use(t, out->pool))
            return refuse(reply, cap, "550 5.7.1 pool \"%s\" not allowed for tenant \"%s\"",
                          out->pool->name, t->name);
    } else if (t != NULL) {
        out->pool = t->pool;
    }

    out->priority = sc->present[OWNER_F_PRIORITY]
                        ? (unsigned)(sc->value[OWNER_F_PRIORITY][0] - '0')
                        : (t != NULL ? t->priority : 0);
    if (sc->present[OWNER_F_CAMPAIGN])
        snprintf(out->campaign, sizeof(out->campaign), "%s", sc->value[OWNER_F_CAMPAIGN]);
    return 0;
}
