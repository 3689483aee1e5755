/*
 * stats: the operator's window into a running sluice. One thread of its
 * own serves a Unix stream socket (a line protocol: one command line in,
 * one JSON document of one line out, many commands per connection) and an
 * optional HTTP listener, read only: Prometheus (GET /metrics), a status
 * page (GET /) and the JSON it reads (GET /status.json). Every second it
 * samples the engine's counters to keep rates over the last second and
 * the last minute.
 *
 * The engine stays out of the protocol: it fills plain structs through
 * the callbacks of struct stats_ops, and answers the commands that act on
 * the queue (message, suspend, resume, flush, bounce, reload) by writing
 * one JSON object. Everything else (parsing, rates, rendering, limits on
 * clients) lives here.
 *
 * Threading: stats_server_new() and stats_server_free() are called from
 * one thread (the engine's main thread). Every callback of struct
 * stats_ops is called on the stats thread only, one at a time, so a
 * callback needs no lock against itself but does against the workers.
 * The rendering functions are pure and may be called from any thread.
 */
#ifndef SLUICE_ENGINE_STATS_H
#define SLUICE_ENGINE_STATS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct json;

#define STATS_LINE_MAX         4096 /* a longer command line: error, then close */
#define STATS_HTTP_REQUEST_MAX 8192
/* Slots: the socket's and HTTP's apart, so that HTTP clients never take
 * sluicectl's. A full pool makes room for a newcomer by closing the client
 * whose request has waited longest (then the one idle longest); one whose
 * answer is being sent is never closed for it. */
#define STATS_CTL_CLIENTS_MAX  32
#define STATS_HTTP_CLIENTS_MAX 32
#define STATS_CLIENTS_MAX      (STATS_CTL_CLIENTS_MAX + STATS_HTTP_CLIENTS_MAX)
/* The engine's commands run one at a time; those queued behind the one
 * under way (their clients wait, or left) are at most this many, and a
 * command past it is answered "busy" at once. Every waiting client holds
 * its slot, and the slot of one gone is taken again: without a bound, a
 * long flush let commands fill the socket's pool, so that even "stats"
 * was refused, and a client that sends and leaves queued without end. */
#define STATS_CMD_QUEUE_MAX    (STATS_CTL_CLIENTS_MAX - 8)
/* The answer of an engine command the stop came before: one queued and
 * never run (stats_cmd_stop), or one begun once the stop had begun
 * (ops.c ops_command). */
#define STATS_CMD_NOT_RUN      "sluice is stopping: the command was not run"
#define STATS_REQUEST_MS       5000  /* accept (or first octet) to a whole request, however
                                        the octets trickle in */
#define STATS_ANSWER_MS        10000 /* an answer made to its last octet sent */
#define STATS_IDLE_MS          60000 /* a socket client silent this long is dropped */
#define STATS_HTTP_IDLE_MS     10000
#define STATS_DOMAINS_DEFAULT  20 /* "domains" without N */
#define STATS_DOMAINS_MAX      1000
#define STATS_OBJECTS_MAX      16
#define STATS_EVENT_SINKS_MAX  16
#define STATS_AUTH_SCHEMES_MAX 8
#define STATS_TENANTS_MAX      64 /* tenants with their own series: the busiest */
#define STATS_CLASSES_MAX      16
#define STATS_WARMUP_MAX       128 /* (source, group) warm-up rows shown and with series */
#define STATS_DOMAIN_CLASSES   6  /* deferral classes per destination: the most frequent */

/* A live object count beyond the named ones ("sessions_in", "mx_hosts",
 * "tls_sessions", ...): shown under "objects" and as sluice_objects{type}. */
struct stats_object {
    char name[32]; /* [a-z0-9_]; empty: ignored */
    uint64_t live;
};

/* One [events NAME] sink: shown under "event_sinks" and as
 * sluice_events_*{sink="NAME"}. */
struct stats_event_sink {
    char name[65];          /* up to 64 octets, NUL-terminated (events_sink_stats) */
    char kind[8];           /* "http" | "redis" */
    uint64_t pending;       /* events journaled and not yet acknowledged */
    uint64_t oldest_age_ms; /* age of the oldest of them; 0 when none or not known yet */
    uint64_t sent;          /* events acknowledged by the endpoint */
    uint64_t failed;        /* failed attempts (batches) */
    uint64_t dropped;       /* events given up past max_backlog */
    uint64_t rejected;      /* events the endpoint refused alone (a webhook's 4xx, a Redis
                             * -ERR), dropped */
    bool paused;
    char last_error[200]; /* "" when none */
};

/* One tenant ([tenant NAME]): shown under "tenants" and as
 * sluice_tenant_*{tenant="NAME"}. The submission side counts what it
 * accepted, the outbound side what became of the recipients. */
struct stats_tenant {
    char name[65];
    uint64_t received_msgs, received_rcpts; /* accepted at submission */
    uint64_t delivered, deferred, bounced, expired; /* recipient outcomes (attempts for deferred) */
};

#define STATS_OWNERS_MAX 64 /* pools, and sources, with their own series: the busiest */

/* A pool ([pool NAME]) or a source ([source ADDRESS]): shown under
 * "pools" / "sources" and as sluice_pool_* / sluice_source_* series. */
struct stats_owner {
    char name[65];
    uint64_t delivered, deferred, bounced; /* recipient outcomes */
    uint64_t connections;                  /* sources: connections opened from it */
};

/* One (source, group) of a warm-up plan (engine/warmup.h): shown under
 * "warmup" and as sluice_warmup_*{source="ADDRESS",group="GROUP"}. */
struct stats_warmup {
    char source[46];
    char plan[65];
    char group[65];
    int64_t day;        /* of the plan: 1 on its start date */
    uint64_t allowance; /* today's; UINT64_MAX: past the schedule, no limit */
    uint64_t taken, left; /* left: UINT64_MAX when no limit */
};

/* A table of per-tenant counts of one thread (a worker's submission or
 * outbound side), in order of first use: tenants are named in the config,
 * so it stays small and a linear search costs less than hashing. */
struct stats_tenant_table {
    struct stats_tenant *v; /* owned */
    unsigned n, cap;
};
#define STATS_TENANT_TABLE_MAX 256 /* tenants counted per table (more are not counted) */

/* The entry of name (made, zeroed, on first use), or NULL when the table
 * is full or out of memory: that tenant is not counted. */
struct stats_tenant *stats_tenant_get(struct stats_tenant_table *t, const char *name);
/* Copy up to cap entries into out; returns how many. */
unsigned stats_tenant_copy(const struct stats_tenant_table *t, struct stats_tenant *out,
                           unsigned cap);
void stats_tenant_fini(struct stats_tenant_table *t);

/* Counters (monotonic since start) and gauges the engine fills on
 * request. The engine starts from a zeroed struct: a field it does not
 * fill shows as 0. */
struct stats_counters {
    uint64_t received_msgs, received_rcpts;         /* accepted at submission */
    uint64_t delivered, deferred, bounced, expired; /* recipient outcomes */
    uint64_t dsn_queued;
    uint64_t rcpt_suppressed; /* recipients refused at RCPT: on the suppression list */
    /* lookups of a name (tenant, pool, campaign, source) that got no id
     * (common/intern.h): the table's cap, memory or a name too long; and of a
     * campaign past [server] campaign_names (a message's, at its reception and
     * each time its recipients are queued again) */
    uint64_t names_refused, campaign_names_refused;
    /* the suppression list (engine/suppress.h); suppress_on false: off */
    bool suppress_on;
    uint64_t suppress_entries, suppress_checks, suppress_hits, suppress_added,
        suppress_removed, suppress_feed_dropped, suppress_map_size, suppress_map_used;
    /* entries bounces and complaints committed to the spool (its notes),
     * not yet copied to the list: grows while the list cannot be written */
    uint64_t suppress_notes_pending;
    uint64_t dkim_signed, dkim_unsigned, dkim_failed; /* messages, at reception */
    uint64_t conn_in_total, conn_out_total, conn_out_failed;
    uint64_t conn_in_open, conn_out_open; /* gauges */
    uint64_t delivered_tls;               /* deliveries over TLS */
    uint64_t dane_authenticated, dane_failed; /* outbound TLS to DANE hosts (RFC 7672) */
    uint64_t transactions, reused_transactions;
    uint64_t reuse_lost; /* reused transactions lost at their first command, job requeued */
    uint64_t handed_over; /* jobs handed to another worker with their domain (site affinity) */
    uint64_t site_turns;  /* connections a domain with mail left gave another of its site */
    uint64_t host_refused;  /* transactions an MX host refused before MAIL for a lack of its own */
    uint64_t host_detoured; /* of those, jobs sent on to the domain's next MX host */
    uint64_t queue_msgs, queue_rcpts, queue_deferred; /* gauges: spool depth */
    uint64_t spool_bytes, map_size, map_used;         /* gauges: LMDB */
    uint64_t spool_corrupt; /* spool records skipped: they fail their checks */
    /* after a failed sync: messages answered 451 then removed, and mail
     * refused while that removal could not be made durable */
    uint64_t spool_unconfirmed_removed, spool_sync_failing_refused;
    uint64_t dns_lookups, dns_cache_hits, dns_cache_entries;
    uint64_t dns_tlsa_queries, dns_tlsa_secure, dns_tlsa_failed; /* DANE's TLSA lookups */
    uint64_t dns_edns_off; /* times c-ares turned EDNS off on a worker's channel */
    /* gauges: MX lookups running now, and waiting for [dns] max_inflight;
     * counters: query tries that timed out, lookups that failed (retry
     * or fail: SERVFAIL, timeout, no MX host with an address) */
    uint64_t dns_inflight, dns_queued, dns_timeouts, dns_failures;
    uint64_t config_generations; /* gauge: configs allocated (engine/config_gen.h): the one
                                  * in force, pinned ones, replaced ones still read */
    uint64_t dlog_events, dlog_write_errors, dlog_dropped;
    /* Recipients deferred, and bounced (expired ones included), by the
     * class of their failure ("rate_limited", "policy", ...), counted
     * where the delivery log sees every outcome: zero without a delivery
     * log or event sinks. name "" ends nothing; ignored. */
    struct stats_object deferred_by_class[STATS_CLASSES_MAX];
    struct stats_object bounced_by_class[STATS_CLASSES_MAX];
    unsigned nclasses;
    uint64_t auth_ok, auth_failed;                  /* AUTH outcomes */
    uint64_t auth_refused_address, auth_refused_user; /* refused: too many failures */
    uint64_t auth_busy;                             /* refused: no room for another hash */
    uint64_t auth_coalesced;                        /* answered by another session's hash */
    /* the bounce listener (engine/oob.h) */
    uint64_t oob_messages; /* accepted and parsed */
    uint64_t oob_events;   /* oob_bounce and complaint events logged */
    uint64_t oob_dropped;  /* messages that gave no event (auto-replies, no token, ...) */
    uint64_t oob_refused;  /* recipients refused: forged tokens, other addresses */
    uint64_t auth_hash_waiting;                     /* gauge: hashes queued */
    uint64_t auth_limit_entries, auth_limit_evictions; /* the failure table */
    struct stats_object auth_hashes[STATS_AUTH_SCHEMES_MAX]; /* hashes run, by scheme */
    unsigned nauth_hashes;
    uint64_t destinations, jobs_inflight;           /* live object counts */
    struct stats_object objects[STATS_OBJECTS_MAX]; /* more live counts */
    unsigned nobjects;
    unsigned workers;
    /* the workers' loops (engine/worker.h): turns, the turns busy at
     * least WORKER_SLOW_TURN_MS, the busiest turn of any since start */
    uint64_t turns, slow_turns, longest_turn_us;
    struct stats_event_sink event_sinks[STATS_EVENT_SINKS_MAX];
    unsigned nevent_sinks;
    struct stats_tenant tenants[STATS_TENANTS_MAX]; /* the busiest, by messages received */
    unsigned ntenants;
    /* warm-up plans (engine/warmup.h) */
    unsigned warmup_sources;       /* sources on a plan */
    const char *warmup_redis;      /* static: "off" | "connected" | "unreachable"; NULL: off */
    uint64_t warmup_refused;       /* takes refused: the day's allowance was spent */
    uint64_t warmup_saves, warmup_save_failures, warmup_syncs, warmup_sync_failures;
    struct stats_warmup warmup[STATS_WARMUP_MAX];
    unsigned nwarmup;              /* rows filled (the first STATS_WARMUP_MAX) */
    struct stats_owner pools[STATS_OWNERS_MAX];   /* the busiest, by recipients handled */
    unsigned npools;
    struct stats_owner sources[STATS_OWNERS_MAX]; /* likewise */
    unsigned nsources;
    uint64_t source_holds;  /* a pool's source held at a site after a receiver's push-back */
    /* traffic shaping (engine/shaping.h) */
    bool shaping_on;               /* [shaping] enabled */
    const char *shaping_redis;     /* static: "off" | "connected" | "unreachable" */
    uint64_t shaping_active[6];    /* by kind: suspend, backoff, cap, count, rate, bounce */
    uint64_t shaping_started, shaping_ended, shaping_hits, shaping_published,
        shaping_received, shaping_quits;
    uint64_t shaping_ignored; /* actions read of a kind or scope unknown here (a newer
                               * node's, from Redis or the state file): not applied */
    uint64_t shaping_outbox;         /* changes waiting to be published (Redis away) */
    uint64_t shaping_outbox_dropped; /* changes dropped: the outbox was full */
    unsigned shaping_rules;        /* rules loaded */
    struct stats_shaping_rule {
        char name[64];
        uint64_t hits;
    } shaping_rule_hits[STATS_OWNERS_MAX]; /* rules that fired, the most first */
    unsigned nshaping_rule_hits;
    uint64_t parked;        /* jobs set aside now: tenant or campaign suspended */
    uint64_t due_paused;    /* 1 while due recipients wait: [delivery] active_limit reached */
    uint64_t delivery_on;   /* 0: [delivery] enabled = no (as started: a reload keeps it) */
    const char *redis_state; /* borrowed for the call: "off" | "connected" | "unreachable"
                                ...; NULL shows as "off" */
    uint64_t uptime_ms;
};

/* One destination. */
#define STATS_DOMAIN_TENANTS 8 /* tenants shown per destination: the most queued */

struct stats_domain {
    char name[256];
    /* The tenants with the most jobs waiting in the destination's queue
     * (name "": untenanted mail), most first; tenants_waiting counts all. */
    struct stats_domain_tenant {
        char name[72];
        uint64_t ready;
    } tenants[STATS_DOMAIN_TENANTS];
    unsigned ntenants, tenants_waiting;
    char pool[65]; /* "" : no pool (a destination is a domain and a pool) */
    uint64_t ready, deferred, inflight, connections, delivered, bounced;
    uint64_t host_refused, host_detoured; /* an MX host's refusals for a lack of its own, and
                                           * of those the jobs sent on to another host */
    uint64_t parked; /* jobs set aside: their tenant or campaign is suspended */
    double rate_limit; /* msgs/s in force, 0: none */
    unsigned max_connections;
    char limit_reason[64]; /* why the limits in force are what they are */
    /* The last outcome that was not a delivery: a server's code and text,
     * or the text alone for a failure no server sent (DNS, a connect, a
     * TLS handshake, a check of this node's); last_code the server's code
     * (0: none sent it); last_class and last_reason its delivery log
     * event's class and reason ("": none). */
    char last_reply[256];
    unsigned last_code;
    char last_class[24];
    char last_reason[24];
    uint64_t oldest_ms; /* Unix ms of the oldest waiting recipient's message (ready, in
                         * flight or deferred), 0: none */
    bool suspended;
    /* No new connection before held_until_ms (Unix ms): after a 421, or
     * when every MX address failed in a row ([domain] site_hold). */
    bool held;
    uint64_t held_until_ms;
    /* No answer yet: its MX lookup (or its MTA-STS TXT lookup, asked
     * first) is in flight or waits for [dns] max_inflight. */
    bool resolving;
    /* Recipient deferrals since the destination was last made (it is
     * forgotten when idle), by the class of their failure: the
     * STATS_DOMAIN_CLASSES most frequent, most first; zeros left out. */
    struct stats_object deferred_by_class[STATS_DOMAIN_CLASSES];
    unsigned nclasses;
    /* Its deferred recipients waiting in the spool, by the class of their
     * last deferral (kept with each recipient, so it holds across a
     * restart): likewise the most frequent, most first. */
    struct stats_object waiting_by_class[STATS_DOMAIN_CLASSES];
    unsigned nwaiting_classes;
};

/* Who sent an engine command on the Unix socket, and the descriptor
 * that came with its line (SCM_RIGHTS: a file the client opened with its
 * own rights, as sluicectl passes for "suppress import" and "export").
 * The octets sent with a descriptor end in the line it belongs to: a
 * client sends the line and the descriptor in one sendmsg. More than one
 * descriptor at a time, or a cut control message, closes the connection
 * with an error; a descriptor sent with a command that the stats thread
 * answers itself is refused. */
struct stats_caller {
    uid_t uid; /* the peer's, from SO_PEERCRED when it connected; STATS_UID_NONE: unknown */
    int fd;    /* borrowed: closed by the server once the command returned; -1: none */
};

#define STATS_UID_NONE ((uid_t)-1)

struct stats_ops {
    void *arg;
    /* Fill *out (zeroed before the call). The engine may block briefly
     * to gather from its workers. */
    void (*counters)(void *arg, struct stats_counters *out);
    /* Fill up to cap domains (zeroed before the call), busiest first (by
     * ready + deferred + inflight); return how many. NULL: no domains. */
    size_t (*domains)(void *arg, struct stats_domain *out, size_t cap);
    /* The commands that act on the engine: "message ID", "suspend DOMAIN",
     * "resume DOMAIN", "flush [DOMAIN]", "bounce ID|DOMAIN", "reload",
     * "events ...", "suppress add|remove|check|list|import|export ...".
     * The stats thread has checked the verb and the number of arguments
     * already: verb is one of those (lowercase), args the rest of the
     * line, trimmed ("" when none). Write one JSON object into *out (empty
     * on entry; the server puts "ok":true in front of its members) and
     * return 0, or return -1 with a one-line reason in err (sent as
     * {"ok":false,"error":"..."}). who: the client that sent it (never
     * NULL from the server; a caller of its own may pass NULL: no uid
     * known, no descriptor). NULL command: every such command answers
     * "not available". */
    int (*command)(void *arg, const char *verb, const char *args, const struct stats_caller *who,
                   struct json *out, char *err, size_t errlen);
    /* [delivery] enabled = no as the engine started (a reload keeps it):
     * the domains answer says so, with no counters gathered for it. */
    bool delivery_off;
};

/* The N of "domains [N]" and "sites [N]": args empty gives
 * STATS_DOMAINS_DEFAULT; else a number from 1 to STATS_DOMAINS_MAX in
 * *n (0), or -1. */
int stats_parse_top(const char *args, unsigned long *n);

struct stats_server;

/* Create the Unix socket at socket_path with socket_mode (e.g. 0660): a
 * stale socket file is unlinked first, but a path where something still
 * accepts, or that is not a socket, is refused. http_listen ("127.0.0.1:9187",
 * "[::1]:9187", port 0 for any) opens the Prometheus listener; NULL: none.
 * top_n bounds the per-domain series in /metrics. ops is copied; ops->arg
 * must outlive the server. Starts the stats thread. Returns 0 and *out
 * (free with stats_server_free), or a negative errno with a message for
 * the operator in err. */
int stats_server_new(const char *socket_path, unsigned socket_mode, const char *http_listen,
                     unsigned top_n, const struct stats_ops *ops, struct stats_server **out,
                     char *err, size_t errlen);
/* Stop the thread (no callback runs after it returns), waiting for the
 * engine command under way, if any; send its answer, an error to those
 * queued behind it and what other answers are not all sent, for 1 s at
 * most (stats.c stop_answers); close every client, remove the socket
 * file if it is still the one this server made. Returns NULL. */
struct stats_server *stats_server_free(struct stats_server *s);
/* The TCP port the HTTP listener is bound to (port 0 asked: the one the
 * kernel chose); 0 when there is none. */
unsigned stats_server_http_port(const struct stats_server *s);
/* Tests: shorten the idle timeout of socket clients (ms, 0: the default).
 * May be called from any thread. */
void stats_server_set_idle_timeout(struct stats_server *s, unsigned idle_ms);

/* Rates per second of the five outcome counters. */
struct stats_rates {
    double received, delivered, deferred, bounced, expired;
    uint64_t window_ms; /* the span they are over: for "1m", less in sluice's first minute */
    bool known;         /* false until two samples were taken */
};

/* Pure rendering, used by the server and its tests. Each appends to j:
 * the whole answer to "stats", and the "domains" array member. */
void stats_render_stats(struct json *j, const struct stats_counters *c,
                        const struct stats_rates *r1s, const struct stats_rates *r1m);
void stats_render_domains(struct json *j, const struct stats_domain *d, size_t n, uint64_t now_ms);
/* The Prometheus text exposition (format 0.0.4) of c and the first n
 * domains: one series per domain and pool (a pool label when it has
 * one), the rows of the same domain and pool added up. Returns a malloc'd NUL-terminated string (the caller frees),
 * or NULL when out of memory. */
char *stats_render_metrics(const struct stats_counters *c, const struct stats_domain *d, size_t n,
                           uint64_t now_ms);

#endif
