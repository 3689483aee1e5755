/*
 * name: domain names as recipients give them, normalised into the form
 * the cache is keyed by and queries are made for.
 *
 * IDN: a domain arrives as A-labels ("xn--..."), which are plain LDH
 * labels here; U-labels (UTF-8) are refused: a recipient's domain is
 * converted once, where it becomes a destination (engine/outbound/dest.c
 * job_new, common/idn.h), not by the resolver.
 *
 * Threading: pure functions.
 */
#include "dns/internal.h"

#include <errno.h>
#include <string.h>

int
dns_name_normalize(const char *in, char out[DNS_NAME_MAX + 1])
{
    size_t len = strlen(in);
    if (len > 0 && in[len - 1] == '.')
        len--;
    if (len == 0 || len > DNS_NAME_MAX)
        return -EINVAL;
    size_t label = 0;   /* length of the current label */
    bool digits = true; /* the current label is all digits so far */
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (c == '.') {
            if (label == 0 || out[i - 1] == '-')
                return -EINVAL;
            label = 0;
            digits = true;
        } else if ((c >= 'a' && c <= 'z') || c == '_') {
            label++;
            digits = false;
        } else if (c >= '0' && c <= '9') {
            label++;
        } else if (c == '-') {
            if (label == 0)
                return -EINVAL;
            label++;
            digits = false;
        } else {
            return -EINVAL; /* non-ASCII (a U-label), blank, '@', ... */
        }
        if (label > 63)
            return -EINVAL;
        out[i] = c;
    }
    if (out[len - 1] == '-' || digits)
        return -EINVAL;
    out[len] = '\0';
    return (int)len;
}
