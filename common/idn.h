/*
 * idn: a domain name as DNS knows it. Under SMTPUTF8 (RFC 6531) a domain
 * may arrive in U-labels ("bücher.example"); keys, destinations and DNS
 * queries use its A-labels ("xn--bcher-kva.example", RFC 5890). The
 * conversion is libidn2's (IDNA2008 with UTS #46 nontransitional mapping:
 * NFC, case folding, the validity rules), not one written here.
 *
 * Threading: any thread (libidn2 keeps no state).
 */
#ifndef SLUICE_COMMON_IDN_H
#define SLUICE_COMMON_IDN_H

#include <stdbool.h>
#include <stddef.h>

/* Whether s[0..len) is all ASCII (nothing to convert). */
bool idn_is_ascii(const char *s, size_t len);

/* The A-label form of the domain name d[0..len) (U-labels, A-labels or
 * plain ASCII, no trailing dot), lowercase, into out[0..cap) with a NUL.
 * An all-ASCII name is only lowercased: its labels are what DNS is asked
 * for as they are ("xn--" ones included), as before IDN. Returns its
 * length, or -EINVAL when d is not UTF-8 or not a valid IDNA2008 name
 * (*why, when why is not NULL, then says why: static text), or
 * -ENAMETOOLONG when the result does not fit in cap. */
int idn_domain_ascii(const char *d, size_t len, char *out, size_t cap, const char **why);

/* Whether the domain d as written (the spool keeps a recipient's domain
 * as received: U-labels stay) is name, an ASCII domain (A-labels, the
 * form of destinations and the delivery log), case aside. */
bool idn_domain_is(const char *name, const char *d);

#endif
