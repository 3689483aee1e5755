/*
 * config: the [tls] keys and the text of the module's error codes.
 *
 * Threading: constant data and pure functions.
 */
#include "tls/tls.h"

#include <limits.h>
#include <string.h>

static const char *const tls_protocols[] = {"TLSv1.2", "TLSv1.3", NULL};

#define TLS(f) offsetof(struct tls_config, f)
const struct conf_key tls_conf_keys[] = {
    {"cert_file", CONF_STRING, TLS(cert_file), 1, PATH_MAX, NULL,
     "PEM certificate chain of the submission server, leaf first; unset: no STARTTLS and no "
     "implicit TLS",
     NULL},
    {"key_file", CONF_STRING, TLS(key_file), 1, PATH_MAX, NULL,
     "PEM private key of cert_file; unset: the key is in cert_file", NULL},
    /* OpenSSL 3 refuses TLS 1.0 and 1.1 at its default security level, so
     * offering them would need level 0 for every peer; not worth it. */
    {"min_protocol", CONF_ENUM, TLS(min_protocol), 0, 0, "TLSv1.2",
     "oldest TLS version accepted, inbound and outbound", tls_protocols},
    /* For the peer that breaks on TLS 1.3; a per-domain setting would be
     * finer, this is the blunt tool. */
    {"max_protocol", CONF_ENUM, TLS(max_protocol), 0, 0, "TLSv1.3",
     "newest TLS version offered, inbound and outbound", tls_protocols},
    {"ciphers", CONF_STRING, TLS(ciphers), 1, 4096, NULL,
     "OpenSSL cipher list for TLS 1.2; unset: OpenSSL's default; with ciphersuites, one "
     "that leaves no cipher usable under the protocols allowed is refused", NULL},
    {"ciphersuites", CONF_STRING, TLS(ciphersuites), 1, 4096, NULL,
     "OpenSSL ciphersuites for TLS 1.3, colon-separated; unset: OpenSSL's default", NULL},
    {"ca_file", CONF_STRING, TLS(ca_file), 1, PATH_MAX, NULL,
     "PEM bundle of CAs trusted for the verify policy; unset with ca_path: the system store", NULL},
    {"ca_path", CONF_STRING, TLS(ca_path), 1, PATH_MAX, NULL,
     "directory of hashed CA certificates (c_rehash) trusted for the verify policy", NULL},
    {"session_cache_size", CONF_UINT, TLS(session_cache_size), 0, 1000000, "1000",
     "outbound TLS sessions kept per worker thread for resumption per MX host; 0: none", NULL},
    /* Each connection holds up to two of these (ciphertext in and out),
     * each only while bytes wait in it, on top of OpenSSL's own record
     * buffers (also released when idle); 16K takes a full record per
     * write. */
    {"buffer_size", CONF_SIZE, TLS(buffer_size), 4096, 1ULL << 20, "16K",
     "ciphertext buffered per TLS connection in each direction, at most (held only while "
     "bytes wait in it: an idle connection holds none)",
     NULL},
    /* A client that opens the handshake and stalls holds a connection
     * slot and two ciphertext buffers; a command's deadline (minutes) is
     * far too generous for something a real client does in milliseconds. */
    {"handshake_timeout", CONF_DURATION, TLS(handshake_timeout), 1000, 600000, "30s",
     "how long a submission client may take for its whole TLS handshake (STARTTLS or "
     "implicit TLS) before the connection is closed",
     NULL},
    CONF_END,
};

bool
tls_config_has_server(const struct tls_config *cfg)
{
    return cfg->cert_file != NULL && cfg->cert_file[0] != '\0';
}

const char *
tls_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "success";
    case TLS_WANT_IO:
        return "waiting for the network";
    case TLS_EPROTO:
        return "peer sent data that is not valid TLS";
    case TLS_ENEGOTIATE:
        return "no TLS version or cipher in common with the peer";
    case TLS_EVERIFY:
        return "peer certificate failed verification";
    case TLS_EALERT:
        return "peer aborted TLS with an alert";
    case TLS_ECLOSED:
        return "peer closed TLS";
    case TLS_ESTATE:
        return "TLS connection not in a state for this";
    case TLS_ECONFIG:
        return "TLS certificate, key or settings could not be loaded";
    case TLS_EINTERNAL:
        return "TLS library failed internally";
    }
    if (rc < 0) {
        /* strerrordesc_np is thread-safe and returns static text. */
        const char *s = strerrordesc_np(-rc);
        if (s != NULL)
            return s;
    }
    return "unknown TLS error";
}
