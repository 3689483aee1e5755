/*
 * config: the daemon's configuration, read from one INI file into a typed,
 * validated, immutable struct. Each module owns the keys of its section
 * (queue_conf_keys in queue/, the engine's tables in config_keys.c); this file
 * maps sections onto tables, reports every error as "file:line: key: what
 * is wrong", and resolves per-domain policies against [domain *].
 *
 * Threading: config_load() on any thread; a loaded config is never
 * modified, so any thread may read it. A reload builds a new one.
 */
#ifndef SLUICE_ENGINE_CONFIG_H
#define SLUICE_ENGINE_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "common/conf.h"
#include "dkim/dkim.h"
#include "dns/dns.h"
#include "engine/events.h"
#include "engine/mta_sts.h"
#include "engine/netaddr.h"
#include "engine/smtp_client.h"
#include "feedback/verp.h"
#include "engine/suppress.h"
#include "engine/warmup_conf.h"
#include "queue/queue.h"
#include "tls/tls.h"

enum plaintext_auth { PLAINTEXT_AUTH_NEVER, PLAINTEXT_AUTH_LOOPBACK, PLAINTEXT_AUTH_ALWAYS };

struct server_config {
    unsigned workers;        /* 0 in the file: one per core, resolved at load */
    char *hostname;          /* owned */
    unsigned ring_entries;
    /* submission */
    char *listen;            /* owned: as written; parsed into listen_addrs */
    char *listen_tls;        /* owned: implicit-TLS listeners (465); NULL: none */
    unsigned max_clients;
    unsigned max_clients_per_ip;
    unsigned max_clients_per_ip_v6_prefix; /* IPv6 clients count per this prefix */
    uint64_t max_message_size;
    uint64_t body_memory_limit; /* bytes of message bodies held in memory, all sessions */
    unsigned max_recipients;
    unsigned max_errors;
    unsigned max_junk_commands;
    uint64_t timeout_command; /* ms */
    uint64_t timeout_data;    /* ms */
    uint64_t greet_pause;     /* ms */
    char *trusted_networks;  /* owned: as written; parsed into trusted */
    char *auth_users_file;   /* owned; NULL: no AUTH */
    int plaintext_auth;      /* enum plaintext_auth */
    uint64_t auth_fail_delay; /* ms */
    unsigned auth_max_failures;
    unsigned auth_hash_threads;
    unsigned auth_hash_queue;
    unsigned auth_failures_per_address; /* 0: no limit */
    unsigned auth_failures_per_user;    /* 0: no limit */
    uint64_t auth_failure_window;       /* ms */
    unsigned auth_failure_table;        /* keys remembered */
    char *expire_header;     /* owned; NULL: no per-message expiry header */
    unsigned campaign_names; /* distinct campaign names given ids since the start */
    uint64_t drain_timeout;  /* ms: SIGTERM waits this long for transactions in flight */
    /* derived at load; allocated at their length, not NETADDR_MAX_LIST
     * (136 octets each): a replaced config lives until no thread can
     * reach it (config_gen.h), which may be a while */
    struct netaddr *listen_addrs; /* owned, nlisten */
    int nlisten;
    struct netaddr *listen_tls_addrs; /* owned, nlisten_tls; NULL: none */
    int nlisten_tls;
    struct cidr trusted[NETADDR_MAX_LIST];
    int ntrusted;
};

#define DLOG_HEADERS_MAX 8

struct log_config {
    char *file;              /* owned; "-" or unset: stderr */
    int level;               /* enum log_level */
    char *delivery_log;      /* owned; NULL: no delivery log */
    uint64_t delivery_log_flush; /* ms */
    char *delivery_log_headers; /* owned: as written; parsed into headers */
    /* derived at load */
    char *headers[DLOG_HEADERS_MAX]; /* owned: header field names, as written */
    unsigned nheaders;
};

struct tenant_config;

struct bounce_config {
    bool dsn;                /* send DSNs to the envelope sender */
    char *dsn_from;          /* owned: local part of the DSN's From (at server.hostname) */
    uint64_t return_max;     /* RET=FULL returns messages up to this size, else headers */
    uint64_t delay_warning;  /* ms in the queue before a NOTIFY=DELAY warning; 0: none */
    uint64_t dsn_wait;       /* ms a failure waits for the rest of its message's DSN; 0: none */
    /* Out-of-band feedback (engine/oob.h): VERP senders and the bounce listener. */
    char *listen;            /* owned: the bounce listener's addresses; NULL: none */
    char *domains;           /* owned: bounce domains, comma separated; NULL: verp_domain */
    char *verp_domain;       /* owned; NULL: VERP off */
    char *verp_prefix;       /* owned: "bounce-" */
    char *verp_key_file;     /* owned */
    char *accept_local_parts; /* owned: comma separated, accepted at the bounce domains */
    uint64_t verp_max_age;   /* ms: a token for an older message is dropped */
    unsigned max_clients;    /* the bounce listener's connections at once, all workers */
    unsigned max_clients_per_ip; /* ... from one address (with its submission ones) */
    /* derived at load */
    struct netaddr *listen_addrs; /* owned, nlisten (allocated as the server's) */
    int nlisten;
    uint8_t verp_key[VERP_KEY_MAX];
    size_t verp_key_len;     /* 0: no key (VERP off, tokens refused) */
    const struct tenant_config *tenants; /* borrowed: the config's [tenant] sections, where
                                          * the listener looks a token's tenant tag up */
    unsigned ntenants;
};

struct delivery_config {
    bool enabled;
    unsigned remote_port;
    char *source_address;     /* owned: as written; parsed into source4/source6 */
    struct sockaddr_storage source4, source6; /* family AF_UNSPEC: not set */
    uint64_t connect_timeout; /* ms */
    uint64_t idle_timeout;    /* ms */
    /* What a receiver has to answer in (ms), as Postfix's smtp_*_timeout: */
    uint64_t greeting_timeout; /* the 220 greeting; the EHLO or HELO reply */
    uint64_t starttls_timeout; /* the reply to STARTTLS; the TLS handshake */
    uint64_t command_timeout;  /* the replies to RSET, MAIL and RCPT */
    uint64_t data_timeout;     /* the 354 to DATA; each block of the body sent */
    uint64_t dot_timeout;      /* the reply to the final dot */
    uint32_t client_timeouts[SMTP_CLIENT_S_COUNT]; /* the five by client state, for
                                                    * smtp_client_opts.timeout_ms */
    unsigned retry_jitter;    /* percent: each retry delay is moved by up to this much */
    uint64_t backoff;         /* ms at half rate after a 421 or a rate-limited reply */
    uint64_t backoff_step;    /* ms between steps back up */
    /* Sites (engine/outbound/site.h): */
    unsigned max_connections_per_address; /* per node, 0: no cap */
    unsigned initial_connections;         /* a new site's window */
    uint64_t destination_idle_ttl;        /* ms: an idle destination is forgotten after */
    char *allow_networks;     /* owned: as written; parsed into allow */
    struct cidr allow[NETADDR_MAX_LIST];
    int nallow;
    char *deny_networks;      /* owned: as written; parsed into deny */
    struct cidr deny[NETADDR_MAX_LIST];
    int ndeny;
    bool mta_sts;             /* MTA-STS (RFC 8461) for every domain; [domain] mta_sts can
                               * turn it off for one */
    unsigned active_limit;    /* ready recipients above which due ones stay in the spool;
                               * 0: no limit */
};

struct redis_config {
    char *url;               /* owned; NULL: limits are local to this node */
    char *password;          /* owned; NULL: none (or the URL's) */
    char *key_prefix;        /* owned */
    unsigned nodes;          /* nodes sharing the Redis: the local share is limit / nodes */
    uint64_t lease_ttl;      /* ms */
    unsigned token_batch;
    uint64_t timeout;        /* ms */
};

/* [shaping]: traffic shaping that reacts to receivers' replies (shaping.h). */
struct shaping_config {
    bool enabled;
    char *rules;             /* owned: the operator's rules file, tried first; NULL: none */
    bool builtin_rules;      /* the shipped set (etc/shaping.rules) after the operator's */
    char *node_name;         /* owned: this node in the actions' origin; NULL: [server] hostname */
    unsigned stream_max;     /* entries the Redis stream of changes keeps */
};

struct stats_config {
    char *socket;            /* owned; NULL: no stats socket */
    unsigned socket_mode;    /* parsed from socket_mode_text */
    char *socket_mode_text;  /* owned: octal, as written */
    char *http_listen;       /* owned: host:port of /metrics; NULL: none */
    unsigned top_n;          /* destinations with their own series in /metrics */
};

enum domain_tls { DOMAIN_TLS_OFF, DOMAIN_TLS_OPTIONAL, DOMAIN_TLS_REQUIRED, DOMAIN_TLS_VERIFY };

/* One [domain NAME] section, with every key resolved (unset keys come
 * from [domain *], then from the built-in defaults). */
struct domain_policy {
    char *name;              /* owned; lowercase, no trailing dot; "*" for the default */
    unsigned line;           /* where its section starts, for messages */
    unsigned max_connections;
    struct conf_rate max_message_rate;
    struct conf_rate max_connection_rate;
    unsigned message_burst;
    unsigned connection_burst;
    unsigned max_messages_per_connection;
    unsigned max_rcpt_per_txn;
    int tls;                 /* enum domain_tls */
    struct conf_durations retry_schedule;
    uint64_t max_age;        /* ms */
    uint64_t site_hold;      /* ms: no new connection after a 421 or a site failure */
    char *route;             /* owned: "host[:port]" as written; NULL: the domain's MX hosts */
    char route_host[256];    /* derived: the host (or [literal]) resolved instead */
    unsigned route_port;     /* derived: 0 for [delivery] remote_port */
    bool mta_sts;            /* this domain's MTA-STS policy is looked up and applied (with
                              * [delivery] mta_sts; never for a routed domain) */
};

struct classify;

/* One [mx PATTERN] section: limits shared by every destination whose
 * preferred MX host matches (e.g. *.google.com for Gmail's many domains). */
struct mx_policy {
    char *pattern;           /* owned; lowercase: "*.google.com" or an exact host */
    unsigned line;
    unsigned max_connections; /* 0: no cap */
    struct conf_rate max_message_rate;
    unsigned message_burst;
    struct conf_rate max_connection_rate;
    unsigned connection_burst;
    unsigned max_messages_per_connection; /* 0: the domain's own only */
    unsigned max_rcpt_per_txn;            /* 0: the domain's own only */
    bool rollup;             /* [mx] only: the matching hosts are one site's (site key) */
    char *ehlo;              /* owned: [source] only: the name said in EHLO from this
                              * address (its PTR); NULL: [server] hostname */
    /* [source] only: its warm-up plan ([warmup NAME]) */
    char *warmup;            /* owned: the plan's name as written; NULL: none */
    char *warmup_start;      /* owned: "YYYY-MM-DD", day 1 of the plan */
    const struct warmup_plan_conf *warmup_plan; /* derived, borrowed: an entry of
                                                 * config.warmups; NULL: none */
    int64_t warmup_start_day; /* derived: days since 1970-01-01 */
};

#define CONFIG_NAME_MAX 64 /* tenant and pool names */
/* What one recipient of a transaction in reception takes from
 * body_memory_limit at most: its RCPT line's address and ORCPT, its
 * record and the allocator's share (server_cmd.c charges the real cost). */
#define CONFIG_RCPT_MEMORY_MAX 1100

/* One source of a [pool NAME]: a [source ADDRESS] section and its share. */
struct pool_source {
    const struct mx_policy *source; /* borrowed: an entry of config.sources */
    unsigned weight;                /* 0: kept in the pool but carries nothing */
};

/* [pool NAME]: egress sources that mail of a pool is spread over by weight. */
struct pool_config {
    char *name;              /* owned: as written (matched case-insensitively) */
    unsigned line;
    char *sources_text;      /* owned: "ADDRESS[:weight], ..." as written */
    unsigned key_line[1];    /* where each key was set (parse only) */
    /* derived at load */
    struct pool_source *sources; /* owned array */
    unsigned nsources;
};

/* [tenant NAME]: a customer whose mail is kept apart from the others'. */
struct tenant_config {
    char *name;              /* owned: as written (matched case-insensitively) */
    unsigned line;
    unsigned weight;         /* share of a site's connections against other tenants */
    char *pools_text;        /* owned: the pools it may use, as written */
    char *pool_text;         /* owned: its default pool, as written; NULL: none */
    unsigned priority;       /* 0..9: the default of its messages (higher goes first) */
    unsigned key_line[4];    /* where each key was set (parse only) */
    /* derived at load */
    const struct pool_config **pools; /* owned array of borrowed pools: those allowed */
    unsigned npools;
    const struct pool_config *pool;   /* borrowed: the default; NULL: none */
};

struct config {
    char *path;              /* owned: the file it was read from */
    struct server_config server;
    struct queue_config queue;
    struct tls_config tls;
    struct delivery_config delivery;
    struct mta_sts_config mta_sts;
    struct dns_config dns;
    struct redis_config redis;
    struct stats_config stats;
    struct log_config log;
    struct bounce_config bounce;
    struct suppress_config suppress;
    struct shaping_config shaping;
    struct shaping_rules *shaping_rules; /* owned: [shaping] rules, then the shipped set;
                                          * NULL when [shaping] is off */
    struct classify *classify; /* owned: built-in rules, then [classify] ones first */
    struct domain_policy default_domain;
    struct domain_policy *domains; /* owned array, sorted by name */
    unsigned ndomains;
    struct mx_policy *mxs;   /* owned array, in file order: the first match wins */
    unsigned nmxs;
    /* [source ADDRESS] sections: the same limits for every connection from
     * that address ([delivery] source_address); pattern holds the address. */
    struct mx_policy *sources; /* owned array */
    unsigned nsources;
    /* [dkim] and [dkim DOMAIN SELECTOR] sections, and [dkim] key_dir:
     * every key loaded at config load, so that a bad key is an error of
     * this config (and a reload with one is refused). */
    struct dkim_config dkim;
    struct dkim_keyring *dkim_keys; /* owned reference; NULL: nothing is signed */
    struct events_sink_config *events; /* owned array: [events NAME] sections, in file order */
    unsigned nevents;
    struct pool_config *pools;     /* owned array: [pool NAME] sections, in file order */
    unsigned npools;
    struct tenant_config *tenants; /* owned array: [tenant NAME] sections, in file order */
    unsigned ntenants;
    struct warmup_plan_conf *warmups; /* owned array: [warmup NAME] sections (warmup_conf.h) */
    unsigned nwarmups;
};

/* Read and validate path. On success returns 0 and *out (free with
 * config_free). On failure returns -EINVAL (or -errno when the file cannot
 * be read) and writes one line per error to errs ("file:line: key: why"). */
int config_load(const char *path, struct config **out, FILE *errs);
struct config *config_free(struct config *cfg);
/* Drop cfg's reference to its DKIM keys once the engine runs on another
 * config (the engine keeps its own while in force): a reload then frees
 * the keys it replaced instead of keeping every generation until exit. */
void config_drop_dkim_keys(struct config *cfg);
/* Before ncfg replaces cur (a reload): where ncfg built the same as cur,
 * take cur's instead (a reference) and free ncfg's own copy, so that
 * the configs a reload keeps (engine.h) share it. Today: the shaping
 * rules (same files, same contents). Main thread, before engine_reload. */
void config_share_unchanged(struct config *ncfg, const struct config *cur);
/* What b changes from a, for a reload's log (config_diff.c): "[delivery]
 * initial_connections, [mx *.google.com] max_connections, +[domain x],
 * -[pool y]", the first dozen and ", and N more", into out (empty when
 * nothing). Returns the number of changes. */
unsigned config_changes(const struct config *a, const struct config *b, char *out, size_t len);

/* The policy for a destination domain (exact match, else [domain *]).
 * Borrowed: lives as long as cfg. */
const struct domain_policy *config_domain(const struct config *cfg, const char *domain);

/* The [mx] policy for an MX host name (the first pattern that matches),
 * or NULL. Borrowed: lives as long as cfg. */
const struct mx_policy *config_mx(const struct config *cfg, const char *host);

/* Does host (its first hl octets, no trailing dot) match pattern
 * ("*.suffix": any host under suffix; else that host, case-insensitive)? */
bool config_host_matches(const char *pattern, const char *host, size_t hl);

/* The [source] policy for connections from sa, or NULL. */
const struct mx_policy *config_source(const struct config *cfg, const struct sockaddr *sa);

/* The [tenant] / [pool] named name (len octets, case-insensitive), or
 * NULL. Borrowed: lives as long as cfg. */
const struct tenant_config *config_tenant(const struct config *cfg, const char *name, size_t len);
const struct pool_config *config_pool(const struct config *cfg, const char *name, size_t len);
/* May tenant t send through pool p? */
bool config_tenant_may_use(const struct tenant_config *t, const struct pool_config *p);
/* Is s (len octets) a valid tenant or pool name: 1..CONFIG_NAME_MAX of
 * A-Z a-z 0-9 . _ - */
bool config_name_valid(const char *s, size_t len);

/* Print every section and key with type, default and help (Markdown);
 * this is how doc/config.md is made, and a test checks they agree. */
void config_reference(FILE *out);

const char *domain_tls_str(int policy);

#endif
