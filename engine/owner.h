/*
 * owner: who a message belongs to. A message carries a tenant (a
 * customer), optionally a campaign, a pool of egress sources and a
 * priority. They come from the AUTH user (tenant= and pool= in the users
 * file), the [tenant] section (its default pool and priority), and the
 * control header fields X-Sluice-Tenant (honoured from trusted_networks
 * only), X-Sluice-Campaign, X-Sluice-Pool and X-Sluice-Priority. The
 * control fields, and the per-message expiry field ([server]
 * expire_header), are cut from the message before it is stored: nothing
 * of them reaches a receiver or a DKIM signature.
 *
 * owner_scan() finds the control fields in a header section (pure: no
 * config, no I/O); owner_resolve() decides against the config and the
 * user, or says why the message is refused. Both are pure functions of
 * their inputs, so they are unit-tested and fuzzed alone.
 *
 * Threading: none (caller's buffers and an immutable config).
 */
#ifndef SLUICE_ENGINE_OWNER_H
#define SLUICE_ENGINE_OWNER_H

#include <stdbool.h>
#include <stddef.h>

#include "engine/auth.h"
#include "engine/config.h"

enum owner_field {
    OWNER_F_TENANT,
    OWNER_F_CAMPAIGN,
    OWNER_F_POOL,
    OWNER_F_PRIORITY,
    OWNER_F_EXPIRE, /* [server] expire_header: parsed by msa_parse_expiry() */
    OWNER_F_COUNT
};

#define OWNER_VALUE_MAX    128 /* octets of a control field's value, unfolded and trimmed */
#define OWNER_CAMPAIGN_MAX OWNER_VALUE_MAX

/* Errors of owner_scan(); the field is named by *field. */
enum owner_error {
    OWNER_EDUP = -1,   /* the field appears more than once */
    OWNER_ELONG = -2,  /* its value is longer than OWNER_VALUE_MAX */
    OWNER_EVALUE = -3, /* its value has characters it may not have */
};

/* A range of the message to leave out of what is stored. */
struct owner_cut {
    size_t off, len;
};

/* What the header section says. Values are unfolded (RFC 5322 2.2.3),
 * trimmed and NUL-terminated; an empty value counts as absent. */
struct owner_scan {
    bool present[OWNER_F_COUNT];
    char value[OWNER_F_COUNT][OWNER_VALUE_MAX + 1];
    struct owner_cut cuts[OWNER_F_COUNT]; /* in message order, one per field found */
    unsigned ncuts;
};

/* The header field name of f ("X-Sluice-Tenant", ...; expire_name for
 * OWNER_F_EXPIRE). */
const char *owner_field_name(enum owner_field f, const char *expire_name);

/* Scan the header section msg[0..hdr_len) (as msa_scan() measured it) for
 * the control fields, names case-insensitive, blanks before the colon
 * allowed (obsolete syntax, still a field some reader could take for
 * ours). expire_name NULL: no expiry field. Checks each value's syntax:
 * tenant and pool names (config_name_valid), a campaign of printable
 * ASCII without quotes or backslashes, a priority of one digit 0..9.
 * Returns 0, or an enum owner_error with *field set. */
int owner_scan(const char *msg, size_t hdr_len, const char *expire_name, struct owner_scan *out,
               enum owner_field *field);

/* Who the message belongs to. */
struct owner {
    const struct tenant_config *tenant; /* borrowed: lives as long as the config (a session's
                                         * keeps it: config_holders.c); NULL: none */
    const struct pool_config *pool;     /* borrowed, likewise; NULL: none */
    char campaign[OWNER_CAMPAIGN_MAX + 1]; /* "": none */
    unsigned priority;                  /* 0..9 */
};

/* Decide the owner of a message from user (NULL: not authenticated),
 * whether the client is in trusted_networks, and the scan. Returns 0, or
 * -EPERM with the whole SMTP reply (code, enhanced code, text) in reply:
 * 550 5.7.1 for what the client may not do (another tenant than its
 * user's, X-Sluice-Tenant from an untrusted client, an unknown tenant or
 * pool, a pool its tenant or user may not use), 451 4.3.5 when the
 * user's own tenant= or pool= names nothing in the config (the operator's
 * error: the client retries once it is fixed). */
int owner_resolve(const struct config *cfg, const struct auth_user *user, bool trusted,
                  const struct owner_scan *sc, struct owner *out, char *reply, size_t cap);

#endif
