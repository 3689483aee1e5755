/*
 * msa: what the message submission agent adds to a message (RFC 6409
 * section 8): a Received trace field always, Message-ID and Date where
 * the message has none. Pure: scans and formats into caller buffers.
 * The caller ends the header section with an empty line where the message
 * has none (struct msa_scan's no_separator).
 */
#ifndef SLUICE_ENGINE_MSA_H
#define SLUICE_ENGINE_MSA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

struct msa_scan {
    bool has_message_id;
    bool has_date;
    size_t header_len; /* octets of the header section, the empty line excluded */
    /* The text after the header fields is not an empty line (a body that
     * began without one, or a message with no field at all): whoever puts
     * fields in front of it must end them with an empty line there. */
    bool no_separator;
};

/* A header field of the header section (its first hdr_len octets, as
 * msa_scan() measured): the whole field with its continuation lines and
 * CRLF at msg[*off .. *off + *len), its value's first line at *val
 * (*vlen octets, surrounding blanks trimmed). Returns false when absent. */
bool msa_find_field(const char *msg, size_t hdr_len, const char *name, size_t *off, size_t *len,
                    const char **val, size_t *vlen);

/* A field's value unfolded (RFC 5322 2.2.3: each CRLF before a blank
 * removed) from v[0 .. n), the value from after its colon to the end of
 * its last continuation line, surrounding blanks trimmed, into out: at
 * most cap - 1 octets and a NUL (cap > 0). out may equal v. Returns the
 * length written. */
size_t msa_unfold(const char *v, size_t n, char *out, size_t cap);

/* A per-message expiry: a duration from now ("90m", "2h", "3600") or an
 * RFC 3339 UTC time ("2026-11-23T18:00:00Z"). Sets *expire_ms (Unix ms).
 * Returns 0 or -EINVAL (also for a duration whose end is past what 64-bit
 * Unix ms can hold). */
int msa_parse_expiry(const char *val, size_t vlen, uint64_t now_ms, uint64_t *expire_ms);

/* Look through the header section of a CRLF message (up to the first
 * empty line, or the first line that is not a header field; a first line
 * that starts with a blank continues no field, so it is not one). */
void msa_scan(const char *msg, size_t len, struct msa_scan *out);

struct msa_trace {
    const char *hostname;  /* this MSA */
    const char *helo;      /* what the client said in HELO/EHLO, untrusted */
    const char *client_ip; /* "1.2.3.4" or "::1" */
    const char *protocol;  /* "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA", "SMTP" */
    const char *tls;       /* "TLSv1.3 TLS_AES_256_GCM_SHA384" or NULL */
    const char *queue_id;
    const char *rcpt;      /* the recipient when there is exactly one, else NULL */
    time_t now;
    bool add_message_id;
    bool add_date;
};

/* Room for the longest fields: a 253-octet host name twice, an 80-octet
 * HELO, a 256-octet recipient, the TLS description and the dates. */
#define MSA_HEADERS_MAX 2048

/* Format the fields to put in front of the message into out (cap >=
 * MSA_HEADERS_MAX). Returns their length. */
size_t msa_headers(const struct msa_trace *t, char *out, size_t cap);

#endif
