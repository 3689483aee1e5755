/*
 * config_keys: the engine's own key tables (see config.h): every [section]
 * of sluice.conf, its keys with their types, ranges, defaults and help
 * text (what --config-reference prints, doc/config.md), and where each
 * value lands in struct config. The modules' own tables (dns/, tls/,
 * dkim/, the queue, events, suppression...) are theirs; this file lists
 * them as sections. engine/config.c reads the file against them.
 */
#include <limits.h>
#include <stddef.h>

#include "engine/config_int.h"
#include "engine/events.h"
#include "engine/netaddr.h"
#include "engine/shaping.h"

/* The help of listen, listen_tls, trusted_networks, [delivery]
 * allow_networks and [bounce] listen says how many they take. */
_Static_assert(NETADDR_MAX_LIST == 32, "update the help texts that say \"at most 32\"");

/* ---- the engine's own key tables ---- */

#define SRV(f) offsetof(struct server_config, f)
static const struct conf_key server_keys[] = {
    {"workers", CONF_UINT, SRV(workers), 0, 256, "0",
     "worker threads, each with its own io_uring ring; 0: one per core", NULL},
    {"hostname", CONF_STRING, SRV(hostname), 0, 253, NULL,
     "name used in greetings, Received headers and DSNs (Message-ID, Reporting-MTA, From); a "
     "domain name in ASCII (a trailing dot dropped); unset: the system host name", NULL},
    {"ring_entries", CONF_UINT, SRV(ring_entries), 64, 32768, "4096",
     "submission queue entries per worker ring (the completion queue gets four times as many)",
     NULL},
    {"listen", CONF_STRING, SRV(listen), 1, 2048, "0.0.0.0:587",
     "submission listeners, comma-separated: 0.0.0.0:587, [::]:587 (at most 32; one "
     "SO_REUSEPORT socket per worker each; an address another process listens on, another "
     "sluice too, is a start-up error, and one of listen_tls or [bounce] listen a config "
     "error)",
     NULL},
    {"listen_tls", CONF_STRING, SRV(listen_tls), 1, 2048, NULL,
     "implicit-TLS submission listeners (RFC 8314), e.g. 0.0.0.0:465 (at most 32); needs [tls] "
     "cert_file",
     NULL},
    {"max_clients", CONF_UINT, SRV(max_clients), 1, 1000000, "10000",
     "concurrent submission connections; over it a client gets 421 4.7.0 (on listen_tls "
     "inside TLS, after the handshake, as Postfix in wrapper mode; past 64 such at once per "
     "worker, a close without a word)",
     NULL},
    {"max_clients_per_ip", CONF_UINT, SRV(max_clients_per_ip), 1, 1000000, "1000",
     "concurrent submission connections from one client address (an IPv6 client: from its "
     "max_clients_per_ip_v6_prefix; an IPv4-mapped IPv6 address counts as the IPv4 address); "
     "over it 421 4.7.0",
     NULL},
    {"max_clients_per_ip_v6_prefix", CONF_UINT, SRV(max_clients_per_ip_v6_prefix), 32, 128, "64",
     "the IPv6 prefix length that max_clients_per_ip counts as one client: a host is given a "
     "whole /64 and can take any address in it",
     NULL},
    {"max_message_size", CONF_SIZE, SRV(max_message_size), 1024, 1ULL << 31, "50M",
     "largest message accepted (advertised as SIZE); larger gets 552 5.3.4", NULL},
    {"body_memory_limit", CONF_SIZE, SRV(body_memory_limit), 1024, 1ULL << 40, "1G",
     "memory that the bodies of messages being received, and the recipients of transactions "
     "in progress (up to 1,100 octets each), may take together, all sessions and "
     "workers (a body is held until its commit returns); a message that does not fit gets "
     "452 4.3.1 (at MAIL when its SIZE= does not fit, at RCPT when the recipient does not, "
     "else after its data), which clients retry; at least max_message_size + "
     "max_recipients x 1,100 octets (one message that large to that many recipients), "
     "checked at start and reload",
     NULL},
    {"max_recipients", CONF_UINT, SRV(max_recipients), 1, QUEUE_MAX_RCPT, "1000",
     "recipients per message; more get 452 4.5.3", NULL},
    {"max_errors", CONF_UINT, SRV(max_errors), 1, 1000, "20",
     "protocol errors in one session before it is closed with 421 (not a recipient refused "
     "for its address's syntax in a transaction, 553 5.1.3 or 5.6.7: a bulk list's bad "
     "addresses are refused one by one; at the bounce listener refused recipients count "
     "too)", NULL},
    {"max_junk_commands", CONF_UINT, SRV(max_junk_commands), 1, 1000000000, "100",
     "commands that move no mail (NOOP, VRFY, EXPN, HELP, an RSET outside a transaction, a "
     "MAIL refused with 5xx, an EHLO or HELO after the session's greeting, an AUTH refused "
     "with 5xx or cancelled, a STARTTLS refused, an RCPT, DATA or BDAT with no MAIL before "
     "it) a session may send "
     "since its last MAIL accepted; one more closes it with 421, so that a client that sends "
     "only these cannot hold a connection slot for ever (Postfix's "
     "smtpd_junk_command_limit). An RSET that ends a transaction, a refused RCPT (suppressed "
     "recipients), a MAIL refused for now (4xx), the RCPTs, DATA and BDATs pipelined behind "
     "a refused MAIL or BDAT chunk (up to max_recipients + 1), and the first EHLO or HELO, and the "
     "first after STARTTLS, do not count",
     NULL},
    {"timeout_command", CONF_DURATION, SRV(timeout_command), 1000, 3600000, "5m",
     "how long a client may take to send one complete command (RFC 5321 4.5.3.2)", NULL},
    {"timeout_data", CONF_DURATION, SRV(timeout_data), 1000, 7200000, "10m",
     "how long a client may take to send a whole message after 354, or a BDAT chunk", NULL},
    {"greet_pause", CONF_DURATION, SRV(greet_pause), 0, 60000, "0",
     "wait this long before the greeting (on listen_tls, from the end of the handshake); a "
     "client that talks first is refused (554)",
     NULL},
    {"trusted_networks", CONF_STRING, SRV(trusted_networks), 0, 4096, "",
     "clients that may relay without AUTH, comma-separated CIDR: 127.0.0.0/8, ::1 (at most 32 "
     "networks)",
     NULL},
    {"auth_users_file", CONF_STRING, SRV(auth_users_file), 1, 4096, NULL,
     "user:crypt-hash[:domain,...] per line (mkpasswd -m yescrypt); \"<>\" in the domain list "
     "allows the null sender; tenant=NAME and pool=NAME in the list set the tenant and pool "
     "of the user's messages ([tenant], [pool]); unset: no AUTH",
     NULL},
    {"plaintext_auth", CONF_ENUM, SRV(plaintext_auth), 0, 0, "never",
     "AUTH without TLS: never, loopback (clients on 127.0.0.0/8 and ::1), always",
     (const char *const[]){"never", "loopback", "always", NULL}},
    {"auth_fail_delay", CONF_DURATION, SRV(auth_fail_delay), 0, 60000, "1s",
     "delay before answering a failed AUTH; doubles with each failure of the session", NULL},
    {"auth_max_failures", CONF_UINT, SRV(auth_max_failures), 1, 100, "3",
     "failed AUTH attempts before the session is closed with 421 4.7.0", NULL},
    {"auth_failures_per_address", CONF_UINT, SRV(auth_failures_per_address), 0, 1000000, "10",
     "failed AUTH attempts per client address (IPv6: per /64) per auth_failure_window, "
     "across connections and workers; over it AUTH gets 421 4.7.0 and the connection "
     "closes; 0: no limit",
     NULL},
    {"auth_failures_per_user", CONF_UINT, SRV(auth_failures_per_user), 0, 1000000, "20",
     "failed AUTH attempts per user name (known or not) per auth_failure_window, from "
     "any address; over it AUTH for that name gets 454 4.7.0, even with the right "
     "password; 0: no limit",
     NULL},
    {"auth_failure_window", CONF_DURATION, SRV(auth_failure_window), 1000, 86400000, "10m",
     "the window of the two limits above: failures drain at limit per window (a leaky "
     "bucket), so a client that keeps guessing gets that many per window",
     NULL},
    {"auth_failure_table", CONF_UINT, SRV(auth_failure_table), 64, 16777216, "65536",
     "client addresses and user names whose failures are remembered (about 48 bytes "
     "each); when full the one left alone longest is forgotten; needs a restart",
     NULL},
    {"auth_hash_threads", CONF_UINT, SRV(auth_hash_threads), 1, 64, "2",
     "threads that run the password hashes of AUTH, off the worker loops and at a lower "
     "priority than them; needs a restart",
     NULL},
    {"auth_hash_queue", CONF_UINT, SRV(auth_hash_queue), 1, 100000, "64",
     "AUTH attempts waiting for a hashing thread; beyond it AUTH gets 454 4.7.0 at once; "
     "needs a restart",
     NULL},
    {"drain_timeout", CONF_DURATION, SRV(drain_timeout), 0, 600000, "30s",
     "on SIGTERM: stop accepting, then wait this long for outbound transactions in flight "
     "to finish, and for messages whose content has ended to be stored and answered, before "
     "exiting (a commit still under way then is waited for, up to 30s more, and logged "
     "queued); what is left stays queued for the next start",
     NULL},
    {"campaign_names", CONF_UINT, SRV(campaign_names), 0, 4000000, "100000",
     "distinct X-Sluice-Campaign names this node keeps, since it started (about 200 bytes "
     "each, held until a restart: a name stays valid while any message of its campaign "
     "may be queued); past it a message with a new campaign name is accepted, and keeps "
     "its campaign in the spool, the logs and its DSNs, but sluicectl suspend campaign= "
     "does not hold it (suspending its tenant does; flush and bounce by campaign, which "
     "read the spool, do); logged as event=campaign_names_full",
     NULL},
    {"expire_header", CONF_STRING, SRV(expire_header), 1, 100, "X-Sluice-Expire",
     "header field that sets a message's own expiry: a duration from arrival (90m, 2h) or "
     "an RFC 3339 time (2026-11-23T18:00:00Z); removed before delivery; a bad value is "
     "refused with 550 5.6.0",
     NULL},
    CONF_END,
};

static const char *const log_levels[] = {"debug", "info", "notice", "warn", "error", "crit", NULL};
#define LOG(f) offsetof(struct log_config, f)
static const struct conf_key log_keys[] = {
    {"file", CONF_STRING, LOG(file), 0, PATH_MAX, "-",
     "where the daemon log goes: a path (reopened on SIGHUP) or - for standard error", NULL},
    {"level", CONF_ENUM, LOG(level), 0, 0, "info", "lowest level written", log_levels},
    {"delivery_log", CONF_STRING, LOG(delivery_log), 1, PATH_MAX, NULL,
     "the JSON Lines delivery log (one event per line: reception, delivery, "
     "transient_failure, bounce, expiration, dsn, oob_bounce, complaint, suppressed, "
     "shaping_started, shaping_ended, rejection); reopened on SIGHUP; unset: none",
     NULL},
    {"delivery_log_flush", CONF_DURATION, LOG(delivery_log_flush), 10, 10000, "200ms",
     "longest time an event waits in memory before it is written (not synced: a kill -9 or "
     "a power loss loses the events still waiting, whose outcomes the spool has committed; "
     "an [events] sink gets every event, committed with its outcome)",
     NULL},
    {"delivery_log_headers", CONF_STRING, LOG(delivery_log_headers), 0, 1024, "",
     "header fields of the injected message copied into every event of it (up to 8, "
     "comma-separated), e.g. X-Campaign-ID, X-Tenant-ID: the first field of each name, its "
     "value unfolded and cut at 1,023 octets alike in every event",
     NULL},
    CONF_END,
};

#define BNC(f) offsetof(struct bounce_config, f)
static const struct conf_key bounce_keys[] = {
    {"dsn", CONF_BOOL, BNC(dsn), 0, 0, "yes",
     "send a delivery status notification (RFC 3464) to the envelope sender of a message "
     "that bounces or expires, and a success one (Action: relayed) for a recipient that "
     "asked (NOTIFY=SUCCESS) delivered to a server that does not offer DSN; never to the "
     "null sender, never when NOTIFY=NEVER",
     NULL},
    {"dsn_from", CONF_STRING, BNC(dsn_from), 1, 64, "MAILER-DAEMON",
     "local part of the From of DSNs (the domain is [server] hostname), as a MAIL FROM "
     "would take it", NULL},
    {"delay_warning", CONF_DURATION, BNC(delay_warning), 0, 30ULL * 86400 * 1000, "4h",
     "a message still waiting this long after arrival gives its sender one delay DSN "
     "(once per message, as Postfix's delay_warning_time), naming each recipient still "
     "waiting (deferred, or queued: its domain suspended) that asked for one at injection "
     "(NOTIFY=DELAY; unlike Postfix, none for a recipient given without NOTIFY: a bulk "
     "sender's bounce address would get one per slow message); it goes once none of "
     "the others is queued or in flight, at the latest dsn_wait after this; 0: never",
     NULL},
    {"dsn_wait", CONF_DURATION, BNC(dsn_wait), 0, 7ULL * 86400 * 1000, "10m",
     "one DSN per message: a recipient that fails (or is delivered, asking for a success "
     "report) while others of its message are still queued or in flight waits, in the "
     "spool, for them, so that the sender gets one report naming every failure (as "
     "Postfix's bounce daemon sends); it goes once none of the others is queued or in "
     "flight (each delivered, failed, or deferred for a later retry), and at the latest "
     "this long after the message's first failure waiting; 0: a DSN for each delivery "
     "batch that has failures or successes to report, at once",
     NULL},
    {"return_max", CONF_SIZE, BNC(return_max), 0, 64ULL << 20, "1M",
     "with RET=FULL a DSN that reports a failure returns the whole message up to this "
     "size, else its headers (a delay warning or a success report: headers only; an "
     "8-bit message not SMTPUTF8: headers only, so that the DSN is 7-bit)",
     NULL},
    {"listen", CONF_STRING, BNC(listen), 1, 2048, NULL,
     "the bounce listener (host:port, comma separated, at most 32; port 25 in production): "
     "out-of-band "
     "bounces and complaints for the bounce domains, parsed and logged (oob_bounce, "
     "complaint), never queued; every other recipient is refused (never a relay); no AUTH; "
     "the [server] limits apply but for max_clients (below); unset: none",
     NULL},
    {"max_clients", CONF_UINT, BNC(max_clients), 1, 1000000, "1000",
     "connections open at once to the bounce listener, all workers: counted apart from "
     "[server] max_clients, so that remote MXs flooding it never take the submission "
     "port's (a client of both still counts once per connection in max_clients_per_ip)",
     NULL},
    {"max_clients_per_ip", CONF_UINT, BNC(max_clients_per_ip), 1, 1000000, "50",
     "connections open at once to the bounce listener from one client address (counted as "
     "[server] max_clients_per_ip counts, the submission connections of that address "
     "included; the lower of the two holds), as Postfix's "
     "smtpd_client_connection_count_limit: the listener is open to anyone, and one address "
     "trickling bytes would otherwise hold every slot for its timeouts; over it 421 4.7.0",
     NULL},
    {"domains", CONF_STRING, BNC(domains), 1, 2048, NULL,
     "the domains the bounce listener accepts mail for, comma separated; unset: verp_domain",
     NULL},
    {"verp_domain", CONF_STRING, BNC(verp_domain), 1, 180, NULL,
     "send with a VERP envelope sender <verp_prefix TOKEN@verp_domain>, one recipient per "
     "transaction, the token tying a bounce to the message id, recipient and tenant under "
     "a keyed MAC (needs verp_key_file); unset: the injected sender",
     NULL},
    {"verp_prefix", CONF_STRING, BNC(verp_prefix), 1, VERP_PREFIX_MAX, "bounce-",
     "local part of VERP senders before the token", NULL},
    {"verp_key_file", CONF_STRING, BNC(verp_key_file), 1, 4096, NULL,
     "file whose first line is the VERP MAC key, 16 to 128 octets (openssl rand -hex 32); "
     "read at load and reload; every node sharing the bounce domains needs the same key",
     NULL},
    {"accept_local_parts", CONF_STRING, BNC(accept_local_parts), 0, 1024, "postmaster, abuse, fbl",
     "local parts the bounce listener accepts at the bounce domains besides VERP addresses "
     "(postmaster, the address registered with feedback loops), comma separated",
     NULL},
    {"verp_max_age", CONF_DURATION, BNC(verp_max_age), 3600000, 365ULL * 86400 * 1000, "30d",
     "a bounce or complaint for a message older than this (by its id) is logged and dropped",
     NULL},
    CONF_END,
};

#define DLV(f) offsetof(struct delivery_config, f)
static const struct conf_key delivery_keys[] = {
    {"enabled", CONF_BOOL, DLV(enabled), 0, 0, "yes",
     "no: accept and store mail but deliver nothing (maintenance, or testing the "
     "submission side alone); it stays queued for when delivery is enabled again; needs a "
     "restart (a reload logs event=reload_kept key=delivery.enabled)",
     NULL},
    {"remote_port", CONF_UINT, DLV(remote_port), 1, 65535, "25",
     "TCP port of the receiving MX hosts (tests use an unprivileged one)", NULL},
    {"source_address", CONF_STRING, DLV(source_address), 1, 200, NULL,
     "local addresses outbound connections come from: one IPv4 and/or one IPv6, "
     "comma-separated; unset: the kernel chooses. One this host does not have defers "
     "the mail (connection_failure) and rests its domains for site_hold",
     NULL},
    {"connect_timeout", CONF_DURATION, DLV(connect_timeout), 1000, 600000, "30s",
     "how long a connection to an MX address may take before the next address is tried", NULL},
    {"idle_timeout", CONF_DURATION, DLV(idle_timeout), 100, 600000, "5s",
     "how long an idle outbound connection waits for another message before QUIT", NULL},
    {"greeting_timeout", CONF_DURATION, DLV(greeting_timeout), 1000, 3600000, "5m",
     "how long a receiver may take to send its 220 greeting, and to answer EHLO or HELO "
     "(RFC 5321 4.5.3.2 asks for 5 minutes); past it the connection is closed and the "
     "mail deferred",
     NULL},
    {"starttls_timeout", CONF_DURATION, DLV(starttls_timeout), 1000, 3600000, "5m",
     "how long a receiver may take to answer STARTTLS, and then to complete the TLS "
     "handshake",
     NULL},
    {"command_timeout", CONF_DURATION, DLV(command_timeout), 1000, 3600000, "5m",
     "how long a receiver may take to answer RSET, MAIL FROM and each RCPT TO; and, once a session "
     "has ended, to take its last octets (QUIT) before the connection is closed anyway", NULL},
    {"data_timeout", CONF_DURATION, DLV(data_timeout), 1000, 3600000, "3m",
     "how long a receiver may take to answer DATA with 354, and to take each block of the "
     "message sent (16 KB; a send waits while 64 KB or more wait unsent in the socket, which "
     "holds at most 128 KB so): a receiver that stops reading is given up on, one that takes "
     "some 80 KB within it is not, however slowly it reads",
     NULL},
    {"dot_timeout", CONF_DURATION, DLV(dot_timeout), 1000, 3600000, "10m",
     "how long a receiver may take to answer the final dot (RFC 5321 asks for 10 minutes: "
     "receivers scan the message then; shorter risks a message delivered twice)",
     NULL},
    {"backoff", CONF_DURATION, DLV(backoff), 1000, 86400000, "1m",
     "after a 421 (at the greeting or in a transaction; not one to an idle connection, nor "
     "one to the first RSET or MAIL on a reused connection after it sat idle or naming a "
     "limit of messages per connection or session, nor one classified other: the "
     "receiver going down) or a reply classified "
     "rate_limited (not one of a mailbox's status, X.2.X: Gmail's 450 4.2.1 for a user who "
     "receives too fast, nor a limit of recipients per transaction, 452 X.5.3), the "
     "destination's message and connection rates are halved (again on each further one) for "
     "this long; read when the workers start: a later change needs a restart (logged as "
     "event=reload_kept key=delivery.backoff)",
     NULL},
    {"backoff_step", CONF_DURATION, DLV(backoff_step), 1000, 86400000, "30s",
     "then they come back by a quarter of the configured rate at each step; read when the "
     "workers start, as backoff", NULL},
    {"retry_jitter", CONF_UINT, DLV(retry_jitter), 0, 50, "10",
     "percent: each retry delay is lengthened at random by up to this much, so that "
     "messages deferred together do not come back together (one draw per transaction: its "
     "recipients come back together, in one transaction); never shortened (a receiver "
     "that greylists for the schedule's first delay, Postgrey's 300 s, sees no retry "
     "before it)",
     NULL},
    {"max_connections_per_address", CONF_UINT, DLV(max_connections_per_address), 0, 100000,
     "40",
     "connections open at once to one MX address (and port) from this node, whatever the "
     "domains behind it (an AAAA record of a v4-mapped address, ::ffff:a.b.c.d, is the IPv4 "
     "address a.b.c.d: connected over IPv4 and counted with it); one count for the node, "
     "whichever workers the connections are on; a worker may hold all of it, but when "
     "another worker's domain finds it full, each worker's share (cap / workers, at least "
     "one) is kept for it, and for each wanting worker that the slots free and those already "
     "on their way do not cover one connection of a worker past its share gives its slot back "
     "after its transaction, as an idle one does while its worker holds more than its share "
     "and the wanting one less (0: no cap); lowered by a reload, the connections over it end "
     "after their transaction. Each [pool] has it "
     "whole, shared by the pool's sources; mail without a pool has it too. The domains of one "
     "site (one set of MX hosts) are sent from one worker once their MX answer is known (site "
     "affinity), which may hold the whole cap; not the domains of a site "
     "that has 20 connections there (busy: for 10 minutes, its new "
     "domains are sent from every worker), nor mail through a pool: they stay on "
     "the worker their name hashes to. Domains under an [mx] or [source] section's limits are "
     "gathered too (without [redis] its cap is the node's and one worker may take its whole "
     "rate)",
     NULL},
    {"allow_networks", CONF_STRING, DLV(allow_networks), 1, 1024, NULL,
     "networks (CIDR, comma-separated, at most 32) that may be delivered to although they are "
     "loopback, "
     "unspecified, link-local, multicast, broadcast or reserved (240.0.0.0/4), which are "
     "refused by default (a domain whose MX "
     "addresses are all refused bounces, class refused_target); this node's own listeners "
     "are refused whatever this says. The same rule holds for MTA-STS policy fetches and "
     "TLS report POSTs, which never go through a proxy (https_proxy and all_proxy in the "
     "environment are ignored: the address checked would be the proxy's)",
     NULL},
    {"deny_networks", CONF_STRING, DLV(deny_networks), 1, 1024, NULL,
     "networks (CIDR, comma-separated, at most 32) never delivered to, whatever "
     "allow_networks says: an MX address in one is refused as a target as a loopback one is "
     "(a domain whose MX addresses are all refused bounces, class refused_target, logged "
     "event=target_refused), and so are MTA-STS policy hosts and TLS report POSTs there; "
     "e.g. 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, fc00::/7, so that a "
     "sender's own domain whose MX names an address of the internal network cannot have "
     "this node deliver into it; a [domain] route to a literal address in one is an error; "
     "unset: none",
     NULL},
    {"destination_idle_ttl", CONF_DURATION, DLV(destination_idle_ttl), 1000, 86400000, "10m",
     "a destination domain with nothing queued, in flight or held is forgotten after this "
     "long (its counters on the stats socket restart when mail for it comes again): memory "
     "follows the domains in use, not every domain ever seen",
     NULL},
    {"initial_connections", CONF_UINT, DLV(initial_connections), 1, 100000, "1",
     "connections a site (the MX hosts a set of domains share) starts with; it earns one more "
     "per completed transaction while its mail waits for a connection longer than twice the "
     "time one takes to open (and at least 100 ms) or a domain's backlog exceeds 4 jobs per "
     "connection (waits for a message rate's tokens do not count), while its connections do "
     "not queue (the time from MAIL to the go for the body is not 10 times its least of the "
     "last 10 to 20 s, 1 ms and 4 connections' worth over it: sluicectl sites, HEAD), up to "
     "max_connections, and "
     "halves on connect failures, greeting failures, 421 and resets (not the connection "
     "lost (closed, reset, a failed send, TLS broken) at the first RSET or MAIL on a reused "
     "connection, nor a 421 there after it sat idle or naming "
     "a limit of messages per connection or session: the receiver's idle timeout or "
     "connection limit)",
     NULL},
    {"active_limit", CONF_UINT, DLV(active_limit), 0, 100000000, "1000000",
     "recipients ready for delivery (held in memory, about 350 octets each) above which "
     "deferred recipients that come due wait in the spool: each take of due mail is cut to "
     "what fits under the limit, and none is taken while the spool holds this many ready, "
     "less those that cannot go before a resume (of a suspended tenant, campaign, domain "
     "or pool) "
     "(logged once as event=due_paused, then event=due_resumed), so an outage's backlog "
     "coming due at once does not take its weight in memory; new mail is accepted and "
     "queued whatever the count, and the ready mail found at start is all taken; 0: no "
     "limit (Postfix's qmgr_message_active_limit, in recipients)",
     NULL},
    {"mta_sts", CONF_BOOL, DLV(mta_sts), 0, 0, "yes",
     "MTA-STS (RFC 8461): look up each recipient domain's policy (see [mta_sts]); in "
     "enforce mode deliver only to the MX hosts it names, over TLS with a certificate that "
     "verifies for the MX name, else defer (class tls_policy); [domain] mta_sts = no turns "
     "it off for one domain; a reload turns it on or off (on starts the MTA-STS thread); TLS "
     "reports (DANE's too) are sent from that thread, so only while it is on",
     NULL},
    CONF_END,
};

#define SHP(f) offsetof(struct shaping_config, f)
static const struct conf_key shaping_keys[] = {
    {"enabled", CONF_BOOL, SHP(enabled), 0, 0, "yes",
     "match receivers' replies against the shaping rules and act on them (suspend a source at "
     "a destination group, back off, cap connections); actions are shared through [redis] url "
     "with every node and kept in the spool (shaping.state) across restarts",
     NULL},
    {"rules", CONF_STRING, SHP(rules), 1, 4096, NULL,
     "the operator's rules file (\"group NAME PATTERN...\" and \"rule NAME KEY=VALUE...\" "
     "lines, see etc/shaping.rules), tried before the shipped rules; its groups and rules "
     "replace shipped ones of the same name",
     NULL},
    {"builtin_rules", CONF_BOOL, SHP(builtin_rules), 0, 0, "yes",
     "also use the shipped rules for the large receivers (Yahoo, Microsoft, Gmail, Comcast, "
     "Orange, GMX/web.de, ...; etc/shaping.rules, built in)",
     NULL},
    {"node_name", CONF_STRING, SHP(node_name), 1, 63, NULL,
     "this node's name in the origin of the actions it starts (default: [server] hostname)",
     NULL},
    {"stream_max", CONF_UINT, SHP(stream_max), 100, 10000000, "10000",
     "changes the Redis stream PREFIXshaping:log keeps (nodes catch up from the hash of "
     "active actions after a longer absence)",
     NULL},
    CONF_END,
};

#define RDS(f) offsetof(struct redis_config, f)
static const struct conf_key redis_keys[] = {
    {"url", CONF_STRING, RDS(url), 1, 1024, NULL,
     "redis://[[user]:password@]host[:port][/0] of the Redis shared by all nodes (message "
     "and connection rates, connection leases; user: a Redis 6 ACL user; user and password "
     "may be percent-escaped, %40 for '@', %25 for '%'); unset: limits hold per node, in "
     "memory",
     NULL},
    {"password", CONF_STRING, RDS(password), 1, 512, NULL, "AUTH password (or in the URL)",
     NULL},
    {"key_prefix", CONF_STRING, RDS(key_prefix), 1, 64, "sluice:",
     "prefix of every Redis key (keys carry a {hash tag} per destination)", NULL},
    {"nodes", CONF_UINT, RDS(nodes), 1, 1000, "1",
     "nodes sharing the Redis: while it is unreachable each node keeps 1/nodes of every limit",
     NULL},
    {"lease_ttl", CONF_DURATION, RDS(lease_ttl), 1000, 3600000, "30s",
     "a connection lease of a node that died expires after this long", NULL},
    {"token_batch", CONF_UINT, RDS(token_batch), 1, 1000, "10",
     "message tokens booked per Redis round trip (1: one round trip per message)", NULL},
    {"timeout", CONF_DURATION, RDS(timeout), 10, 60000, "1s",
     "a Redis reply slower than this counts as Redis down (local shares until it is back)",
     NULL},
    CONF_END,
};

#define STS(f) offsetof(struct stats_config, f)
static const struct conf_key stats_keys[] = {
    {"socket", CONF_STRING, STS(socket), 1, 107, NULL,
     "path of the Unix stats socket, e.g. /run/sluice/stats.sock (sluicectl -s PATH); its "
     "directory must exist; unset: no socket and no /metrics",
     NULL},
    {"socket_mode", CONF_STRING, STS(socket_mode_text), 1, 4, "0660",
     "permissions of the socket file, octal: whoever may open it may steer sluice (but not "
     "have it open a file: an import or export uses the file sluicectl opened with its "
     "user's rights, doc/sluicectl.md)",
     NULL},
    {"http_listen", CONF_STRING, STS(http_listen), 1, 200, NULL,
     "address:port of the read-only HTTP listener: Prometheus metrics at GET /metrics, the "
     "status page at GET / and its JSON at GET /status.json (e.g. 127.0.0.1:9187; keep it on "
     "loopback or a management network: it has no authentication); unset: none",
     NULL},
    {"top_n", CONF_UINT, STS(top_n), 0, 10000, "50",
     "destinations with their own series in /metrics (the busiest ones)", NULL},
    CONF_END,
};

static const char *const tls_policies[] = {"off", "optional", "required", "verify", NULL};
#define DOM(f) offsetof(struct domain_policy, f)
const struct conf_key config_domain_keys[] = {
    {"max_connections", CONF_UINT, DOM(max_connections), 1, 100000, "20",
     "concurrent connections to the domain's MX hosts: per node, and across all nodes "
     "(leases in Redis) with [redis] url; lowered by a reload, those over it end after their "
     "transaction; with [redis], those the nodes hold beyond it (opened on local shares while "
     "Redis was away) end after their transaction once a lease refresh counts them (the one "
     "when Redis is back, or a later one: every lease_ttl/3)",
     NULL},
    {"max_message_rate", CONF_RATE, DOM(max_message_rate), 0, 0, "unlimited",
     "messages per second, minute, hour or day (50/s, 3000/h, 20000/d, or per a duration: "
     "100/10s); across all nodes with [redis] url",
     NULL},
    {"message_burst", CONF_UINT, DOM(message_burst), 0, 1000000, "0",
     "messages that may go at once beyond the steady rate", NULL},
    {"max_connection_rate", CONF_RATE, DOM(max_connection_rate), 0, 0, "unlimited",
     "new connections per second, minute, hour or day (an open connection of the site taking up "
     "the domain's mail opens none); across all nodes with [redis] url",
     NULL},
    {"connection_burst", CONF_UINT, DOM(connection_burst), 0, 100000, "0",
     "connections that may open at once beyond the steady rate", NULL},
    {"max_messages_per_connection", CONF_UINT, DOM(max_messages_per_connection), 1, 1000000,
     "1000", "transactions on one connection before QUIT", NULL},
    {"max_rcpt_per_txn", CONF_UINT, DOM(max_rcpt_per_txn), 1, 10000, "100",
     "recipients of one message in one transaction", NULL},
    {"tls", CONF_ENUM, DOM(tls), 0, 0, "optional",
     "outbound STARTTLS: off, optional (when offered; after a failed handshake, plaintext to "
     "that MX address at once, in the same attempt, and for an hour), required, verify "
     "(chain and MX name)",
     tls_policies},
    {"retry_schedule", CONF_DURATIONS, DOM(retry_schedule), 0, 0, "5m, 10m, 20m, 40m, 1h, 2h, 4h",
     "delays between attempts after a temporary failure, each the least wait; the last "
     "repeats ([delivery] retry_jitter lengthens each)",
     NULL},
    {"max_age", CONF_DURATION, DOM(max_age), 1000, 30ULL * 86400 * 1000, "3d",
     "how long a recipient may stay queued before it expires and bounces, whether ready, "
     "deferred or in flight (a message's expire_header may shorten it)",
     NULL},
    {"route", CONF_STRING, DOM(route), 1, 270, NULL,
     "host[:port] to deliver to instead of the domain's MX hosts (a smarthost, as Postfix's "
     "relayhost or transport map): the host's MX records if it has any, else its addresses; "
     "[192.0.2.1] or [IPv6:2001:db8::1] as is (a literal on loopback, link-local and the "
     "like is an error unless [delivery] allow_networks lists it); the port overrides "
     "[delivery] remote_port. Domains routed to the same host share its connections (a site)",
     NULL},
    {"site_hold", CONF_DURATION, DOM(site_hold), 0, 3600000, "1m",
     "after a 421 at the greeting or in a transaction, or when every MX address failed, no "
     "new connection to the domain for this long (at least 1s after every address failed), "
     "nor to the other domains of its site (the same MX hosts) when the hosts were at fault "
     "(refused, timed out, closed, a 4xx or 5xx greeting, a 421; not the domain's own TLS or "
     "DANE policy); after a 421 the waiting recipients keep their place (after a 421 greeting "
     "again at the next try, none of the site's connections ready nor delivering since, they "
     "are deferred "
     "with it), after every address "
     "failed they are deferred with that failure, the site's other domains' too (a "
     "421 to an idle connection, the receiver's idle timeout or shutdown, ends that "
     "connection only; so does one to the first RSET or MAIL of a transaction on a reused "
     "connection after it sat idle, or one there naming a limit of messages per connection "
     "or session, whose job goes on another connection at once); 0: no rest, for the domain "
     "nor from its site (nor for a pool's source after a 421 saying the receiver goes "
     "down, which rests no source alone)",
     NULL},
    {"mta_sts", CONF_BOOL, DOM(mta_sts), 0, 0, "yes",
     "apply the domain's MTA-STS policy (with [delivery] mta_sts); never for a domain with a "
     "route",
     NULL},
    CONF_END,
};

#define MXP(f) offsetof(struct mx_policy, f)
#define MX_LIMIT_KEYS                                                                              \
    {"max_connections", CONF_UINT, MXP(max_connections), 0, 1000000, "0",                          \
     "concurrent connections to the matching MX hosts, whatever the domain (0: no cap); "         \
     "without [redis] the node's, counted for every worker, a worker kept its part (the cap "     \
     "over the workers, at least one) when it wants it (the section's rates and bursts are "    \
     "split between the workers, the parts adding up to the whole, and a part its worker "     \
     "leaves unused is lent to the others); lowered by a reload, "                               \
     "those over it end after their transaction (with [redis] a worker ends those of its own "   \
     "beyond the whole cap, and those the nodes hold beyond it once a lease refresh counts "     \
     "them, every lease_ttl/3; so too those opened on local shares while Redis was away, from "  \
     "the refresh when it is back)",                                                              \
     NULL},                                                                                        \
        {"max_message_rate", CONF_RATE, MXP(max_message_rate), 0, 0, "unlimited",                  \
         "messages per second, minute, hour or day to the matching MX hosts", NULL},               \
        {"message_burst", CONF_UINT, MXP(message_burst), 0, 1000000, "0",                          \
         "messages beyond the steady rate", NULL},                                                 \
        {"max_connection_rate", CONF_RATE, MXP(max_connection_rate), 0, 0, "unlimited",            \
         "new connections per second, minute, hour or day to the matching MX hosts", NULL},       \
        {"connection_burst", CONF_UINT, MXP(connection_burst), 0, 100000, "0",                     \
         "connections beyond the steady rate", NULL},                                              \
        {"max_messages_per_connection", CONF_UINT, MXP(max_messages_per_connection), 0, 1000000,   \
         "0",                                                                                      \
         "transactions on one connection before QUIT, when lower than the domain's (0: the "      \
         "domain's)",                                                                              \
         NULL},                                                                                    \
        {"max_rcpt_per_txn", CONF_UINT, MXP(max_rcpt_per_txn), 0, 10000, "0",                      \
         "recipients per transaction, when lower than the domain's (0: the domain's)", NULL}
const struct conf_key config_mx_keys[] = {
    MX_LIMIT_KEYS,
    {"rollup", CONF_BOOL, MXP(rollup), 0, 0, "no",
     "domains whose MX hosts match this pattern share one site, its connections and its "
     "window, whatever the hosts' names (the pattern stands for them in the site's key): "
     "for a provider that gives each domain an MX host name of its own on shared servers "
     "(Microsoft 365's *.mail.protection.outlook.com). A connection to one domain's host "
     "then carries the others' mail, which only such a provider accepts; never a host with "
     "TLSA records (or whose TLSA lookup failed), nor across TLS or MTA-STS policies that "
     "would refuse the host. The first [mx] section matching a host decides; a site under "
     "an [mx] section is sent from every worker, one site on each",
     NULL},
    CONF_END,
};
/* [source ADDRESS]: the same limits, and the name it greets with. */
const struct conf_key config_source_keys[] = {
    MX_LIMIT_KEYS,
    {"ehlo", CONF_STRING, MXP(ehlo), 1, 253, NULL,
     "the host name said in EHLO on connections from this address: the name its PTR "
     "record gives, which receivers check; unset: [server] hostname",
     NULL},
    {"warmup", CONF_STRING, MXP(warmup), 1, 64, NULL,
     "the [warmup NAME] plan this address follows: a daily volume per destination group "
     "that rises along the plan's schedule; unset: none",
     NULL},
    {"warmup_start", CONF_STRING, MXP(warmup_start), 10, 10, NULL,
     "YYYY-MM-DD: day 1 of the plan (required with warmup)", NULL},
    CONF_END,
};

#define POOL(f) offsetof(struct pool_config, f)
const struct conf_key config_pool_keys[] = {
    {"sources", CONF_STRING, POOL(sources_text), 1, 4096, NULL,
     "the pool's egress sources, comma-separated: ADDRESS[:weight] (IPv6 with a weight: "
     "[ADDRESS]:weight); each ADDRESS has a [source ADDRESS] section; weights 0..1000, 1 by "
     "default (0 keeps the source listed but sends nothing through it)",
     NULL},
    CONF_END,
};

#define TEN(f) offsetof(struct tenant_config, f)
const struct conf_key config_tenant_keys[] = {
    {"weight", CONF_UINT, TEN(weight), 1, 1000, "1",
     "the tenant's share of a destination's transactions (so of its connections and rate) "
     "against the other tenants with mail waiting there: turns of up to weight messages each",
     NULL},
    {"pools", CONF_STRING, TEN(pools_text), 1, 4096, NULL,
     "the pools the tenant may send through, comma-separated (an X-Sluice-Pool header or a "
     "user's pool= chooses among them); unset: only its default pool",
     NULL},
    {"pool", CONF_STRING, TEN(pool_text), 1, CONFIG_NAME_MAX, NULL,
     "the pool of its messages that name none; unset: the first of pools (none without "
     "pools)",
     NULL},
    {"priority", CONF_UINT, TEN(priority), 0, 9, "0",
     "priority of its messages that do not say (X-Sluice-Priority): 0..9, higher goes first "
     "within the tenant",
     NULL},
    CONF_END,
};


#define SECTION(name, help, keys, type, field)                                                   \
    {name, help, keys, offsetof(struct config, field), sizeof(type)}

const struct section config_sections[] = {
    SECTION("server", "the daemon, its workers and the submission server", server_keys,
            struct server_config, server),
    SECTION("queue", "the durable spool (LMDB)", queue_conf_keys, struct queue_config, queue),
    SECTION("tls", "TLS: the server certificate, protocols, the CA store for verify",
            tls_conf_keys, struct tls_config, tls),
    SECTION("delivery", "outbound SMTP", delivery_keys, struct delivery_config, delivery),
    SECTION("mta_sts", "MTA-STS policies (RFC 8461) and TLS reporting (RFC 8460): how "
            "policies are fetched, how reports are sent; read when the MTA-STS thread starts "
            "(at the start, or at the reload that turns [delivery] mta_sts on): a later change "
            "needs a restart (logged as event=reload_kept key=mta_sts)", mta_sts_conf_keys,
            struct mta_sts_config, mta_sts),
    SECTION("dns",
            "MX resolution and its cache, per worker; read when the workers start: a later "
            "change needs a restart (logged as event=reload_kept key=dns)",
            dns_conf_keys,
            struct dns_config, dns),
    SECTION("redis",
            "limits shared by several nodes; read when the workers start: a later change needs "
            "a restart (logged as event=reload_kept key=redis)",
            redis_keys, struct redis_config, redis),
    SECTION("shaping", "traffic shaping from receivers' replies, shared by every node",
            shaping_keys, struct shaping_config, shaping),
    SECTION("stats", "the stats socket", stats_keys, struct stats_config, stats),
    SECTION("log", "the daemon log and the delivery log", log_keys, struct log_config, log),
    SECTION("bounce", "bounces and delivery status notifications", bounce_keys,
            struct bounce_config, bounce),
    SECTION("suppress", "the suppression list: recipients refused at RCPT, fed by bounces, "
            "complaints and operators", suppress_conf_keys, struct suppress_config, suppress),
    SECTION("dkim", "DKIM signing: defaults for every signature, the key directory, the "
            "signing threads", dkim_conf_keys, struct dkim_config, dkim),
};
_Static_assert(sizeof(config_sections) / sizeof(config_sections[0]) == NSECTIONS,
               "NSECTIONS (config_int.h) counts the sections");

const char *
domain_tls_str(int policy)
{
    if (policy >= 0 && policy < 4)
        return tls_policies[policy];
    return "?";
}
