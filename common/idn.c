/*
 * idn: see idn.h. libidn2 earns its place (README, "IDN"): IDNA2008 is
 * NFC, the UTS #46 mapping tables and per-code-point validity rules that
 * follow each Unicode release, which a distribution keeps current and a
 * hand-written Punycode encoder does not have.
 */
#include "common/idn.h"

#include <errno.h>
#include <idn2.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

bool
idn_is_ascii(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] >= 0x80)
            return false;
    return true;
}

bool
idn_domain_is(const char *name, const char *d)
{
    if (strcasecmp(name, d) == 0)
        return true;
    size_t n = strlen(d);
    char a[256];
    return !idn_is_ascii(d, n) && idn_domain_ascii(d, n, a, sizeof(a), NULL) > 0 &&
           strcasecmp(name, a) == 0;
}

int
idn_domain_ascii(const char *d, size_t len, char *out, size_t cap, const char **why)
{
    if (why != NULL)
        *why = NULL;
    if (idn_is_ascii(d, len)) {
        if (len >= cap)
            return -ENAMETOOLONG;
        for (size_t i = 0; i < len; i++) {
            char c = d[i];
            out[i] = c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
        }
        out[len] = '\0';
        return (int)len;
    }
    if (memchr(d, '\0', len) != NULL) {
        if (why != NULL)
            *why = "NUL in the name";
        return -EINVAL;
    }
    char *in = strndup(d, len);
    if (in == NULL)
        return -ENOMEM;
    char *a = NULL;
    /* NFC_INPUT: a name typed in decomposed form is the same name;
     * NONTRANSITIONAL: "ß" is its own label, as registries have it. */
    int rc = idn2_to_ascii_8z(in, &a, IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL);
    free(in);
    if (rc != IDN2_OK) {
        if (why != NULL)
            *why = idn2_strerror(rc);
        return rc == IDN2_MALLOC ? -ENOMEM : -EINVAL;
    }
    size_t n = strlen(a);
    int ret = -ENAMETOOLONG;
    if (n < cap) {
        /* lowercase already (the mapping folds case); A-labels are ASCII */
        memcpy(out, a, n + 1);
        ret = (int)n;
    }
    idn2_free(a);
    return ret;
}
