/*
 * sluicectl: the operator's view of a running sluice, through its stats
 * socket (engine/stats.h): one command line out, one JSON line back,
 * rendered for people as aligned tables, or printed raw with --json.
 *
 * Exit codes: 0 ok, 1 sluice answered {"ok":false} (or the file of a
 * suppress import or export could not be opened), 2 usage (bad command,
 * argument or number: said on stderr in one line), 3 the socket cannot be
 * reached, closed, timed out (10 s) or answered something that is not a
 * JSON object. The answer is read field by field: unknown fields are
 * ignored and missing ones shown as "-", so that sluicectl and sluice
 * may be of different versions.
 *
 * `suppress import` and `export` open their file here, with the rights
 * of whoever runs sluicectl, and pass the descriptor to sluice with the
 * command line (SCM_RIGHTS): sluice opens no path for a client of its
 * socket (engine/ops_suppress.c), as postmap runs as its user.
 *
 * This file: the command table (each command's synopsis and help), usage
 * and --help, main. The pieces it uses: sluicectl_client.c (the socket,
 * requests and answers, die and the signals), sluicectl_render.c (cells,
 * tables, the stats and domains views), sluicectl_views.c (the commands
 * with their renderers, top among them), sluicectl_suppress.c.
 *
 * Threading: one thread; `top` waits in poll(2) on the terminal.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "tools/sluicectl_int.h"

#ifndef SLUICE_VERSION
#define SLUICE_VERSION "unknown"
#endif

static const struct cmd cmds[] = {
    {"stats", "", "counters, rates, connections, queue, spool, DNS, Redis, objects",
     "Totals since start, rates over the last second and the last minute (in\n"
     "sluice's first minute over the time since start: \"last 12s\"),\n"
     "connections, queue depth, spool, DNS cache, delivery log, traffic shaping\n"
     "(with the actions ignored: of a kind or scope this node does not know)\n"
     "and live objects.",
     0, 0, run_plain},
    {"domains", "[N]", "the N busiest destinations (default 20, at most 1000)",
     "One row per destination, busiest first (ready + deferred + in flight +\n"
     "parked): what is queued by state (READY and INFLIGHT: jobs, a message's\n"
     "recipients at the destination; DEFERRED: recipients; PARKED: jobs set\n"
     "aside while their tenant or campaign is suspended), connections and the limit, the\n"
     "message rate allowed, totals, the age of the oldest waiting recipient\n"
     "(deferred ones too), whether it is suspended, the deferral class of most\n"
     "of its recipients waiting deferred now, with their count (TOP DEFERRAL),\n"
     "its last failure (LAST: the code a server sent and the class; - for the\n"
     "code when no server sent one: DNS, a connect, a TLS handshake, a\n"
     "timeout or a connection lost in the session, an unreadable reply, a\n"
     "check of sluice's) and why its limits are what they are.",
     0, 1, run_domains},
    {"sites", "[N]", "the N busiest sites (default 20, at most 1000)",
     "One row per site of a worker, busiest first (connections + ready + in\n"
     "flight). A site is the set of MX hosts its domains' answers name (or a\n"
     "route; a pool's sites are its own): its domains share its connections\n"
     "and its adaptive window. CONN connections open or opening, IDLE of\n"
     "those idle, WINDOW the connections the window allows now, LIMIT what\n"
     "it can open: the window, or the cap below it that binds (address cap:\n"
     "max_connections_per_address times its addresses; mx cap: its [mx]\n"
     "section's max_connections; caps shared with other sites), MAX its\n"
     "ceiling (max_connections), DOMAINS the destinations on it and\n"
     "WAITING those waiting for a connection,\n"
     "READY and INFLIGHT their jobs, OPENED, FAILURES (connect failures,\n"
     "greeting timeouts, 421s, resets) and HALVED (window decreases) since\n"
     "the site was made; an idle site is forgotten with its last domain. HEAD\n"
     "the time from a transaction's MAIL to the go for its body (a moving\n"
     "average), with * while it says the connections wait in line at the\n"
     "receiver or at sluice: the window does not grow.",
     0, 1, run_sites},
    {"message", "ID", "a queued message and its recipients", NULL, 1, 1, run_plain},
    {"queue", "[N] [DOMAIN]", "the queued messages, oldest first, as mailq lists them",
     "The first N messages of the spool (default 100, at most 10000), or the\n"
     "first N with a recipient at DOMAIN: id, age, size, sender, and each\n"
     "recipient's state, attempts, next attempt and last reply. The listing\n"
     "stops at the Nth message; with a DOMAIN it reads the spool as far as it\n"
     "must. The answer holds about 8 MiB of messages at most (whole ones) and\n"
     "says so when it was cut there.",
     0, 2, run_plain},
    {"suspend", "DOMAIN | --tenant T | --campaign C | --pool P | --source ADDR [--for DURATION] [--local]",
     "stop deliveries of a scope (at once; queued mail waits)",
     "A domain (in every pool), a tenant's or a campaign's mail, a pool, or one\n"
     "source address of a pool. --for ends the suspension by itself (e.g. 30m).\n"
     "With shaping on, a domain, tenant or source is suspended on every node\n"
     "(a shaping action: shared through Redis, kept across restarts; see\n"
     "shaping list). A pool or campaign, and anything with --local, is suspended\n"
     "on this node only, in memory: a restart forgets it. A tenant or pool\n"
     "the config has no section for, or a source no pool has, is refused,\n"
     "with the names it has (a source or tenant suspended on every node\n"
     "through Redis may be another node's: taken, with a note).",
     1, 5, run_scoped},
    {"resume", "DOMAIN | --tenant T | --campaign C | --pool P | --source ADDR [--local]",
     "resume deliveries of a scope (on every node, or --local as suspend)", NULL, 1, 3,
     run_scoped},
    {"flush", "[DOMAIN | --tenant T [--campaign C] | --pool P]",
     "retry deferred recipients now (of DOMAIN, a tenant, a campaign, a pool, or all)",
     "--tenant, --campaign and --pool select the messages of that tenant, campaign\n"
     "or pool (as stored with each message at submission). The rests their\n"
     "destinations wait on (after a 421, or a host that was down) end too.",
     0, 4, run_scoped},
    {"bounce", "ID|DOMAIN | --tenant T [--campaign C] | --pool P",
     "bounce a message, or every message queued for DOMAIN, a tenant, a campaign or a pool",
     "A DOMAIN bounces the recipients at it: a message's others stay queued.\n"
     "Bounced recipients get a DSN to the sender (where enabled) and a bounce\n"
     "event in the delivery log. The answer waits (up to 8 s) for the bounce's\n"
     "commit: still_queued counts the selected recipients still in the spool then\n"
     "(deferred by a transaction under way: bounce again), not those bounced and\n"
     "kept until their message's DSN goes ([bounce] dsn_wait); a stop of sluice ends\n"
     "that wait: an error that counts those still queued (exit 1; the log's\n"
     "event=operator_bounce says note=stopping). This cannot be undone.",
     0, 4, run_scoped},
    {"reload", "", "reread the configuration file (as SIGHUP does)",
     "Waits (up to 8 s) for the outcome: \"reload done: changed\" and the\n"
     "sections and keys that changed (as the log's event=config_reloaded; a\n"
     "TLS or users file whose contents changed, \"[dkim] signing keys\"), or\n"
     "\"reload done: no change\"; then the keys that wait for a restart, if\n"
     "any; a users file that did not load (its first error, exit 1); or the\n"
     "first error\n"
     "(file:line: key) and exit 1 when the new configuration is refused and\n"
     "the running one kept; a reload not over by then prints \"reload\n"
     "requested (not finished yet: see the log)\" and exits 0; a drain or a\n"
     "stop of sluice ends that wait: the reload is not done (\"sluice is\n"
     "draining\" or \"sluice is stopping\", exit 1).",
     0, 0, run_plain},
    {"tlsrpt", "[flush]", "MTA-STS policies and TLS reports (RFC 8461, RFC 8460)",
     "Counters of the MTA-STS store: domains known, policies cached (and in\n"
     "enforce mode), TXT checks, policy fetches and their failures, TLS reports\n"
     "sent and not sent. flush sends every pending TLS report now, today's too,\n"
     "rather than after the end of the UTC day.",
     0, 1, run_plain},
    {"events", "[pause|resume NAME]",
     "the event sinks (webhooks, Redis streams); pause or resume one",
     "One row per [events NAME] sink: events journaled and not yet acknowledged,\n"
     "the age of the oldest of them, events sent, failed attempts, events\n"
     "dropped past max_backlog, whether it is paused, and its last error.\n"
     "A paused sink keeps its backlog in the journal and resumes from its cursor.",
     0, 2, run_events},
    {"warmup", "", "IP warm-up: per source and destination group, today's allowance and use",
     "One row per [source] on a [warmup] plan and destination group (gmail,\n"
     "microsoft, yahoo, those the plan defines, other): the plan, the day of the\n"
     "plan (1 on warmup_start), today's allowance (unlimited past the schedule),\n"
     "messages taken today (with [redis]: by every node) and what is left (with\n"
     "[redis]: this node's reserved share).",
     0, 0, run_warmup},
    {"shaping", "[list | clear ID|SCOPE|all | suspend|backoff|cap:N|rate:R|bounce SCOPE for=DURATION]",
     "traffic shaping: actions started by receivers' replies, on every node",
     "  shaping [list]              active actions: id, action, scope, source, group or\n"
     "                              domain, the rule, time left, the node it started on,\n"
     "                              and the reply that triggered it\n"
     "  shaping clear ID|all        end actions now, on every node (also by\n"
     "  shaping clear source=A|group=G|domain=D|rule=R   scope or rule)\n"
     "  shaping ACTION source=A group=G for=DURATION\n"
     "  shaping ACTION group=G|domain=D for=DURATION\n"
     "  shaping suspend|rate:R|bounce tenant=T group=G for=DURATION\n"
     "                              an action by hand, on every node; ACTION:\n"
     "                              suspend, backoff, cap:N, rate:R (10/s, 600/min,\n"
     "                              or 0.5 of the configured rate; with source=\n"
     "                              that source only) or bounce\n\n"
     "Actions are shared through Redis (with [redis] url) and kept in the spool\n"
     "across restarts. Rules: etc/shaping.rules and [shaping] rules.",
     0, 6, run_shaping},
    {"metrics", "", "the Prometheus text exposition, as GET /metrics serves it", NULL, 0, 0,
     run_plain},
    {"suppress", "add|remove|check|list|import|export|purge ...",
     "the suppression list: recipients refused at RCPT",
     "  suppress add ADDRESS [--scope S] [--reason R] [--ttl DURATION] [--note TEXT]\n"
     "  suppress remove ADDRESS [--scope S]\n"
     "  suppress check ADDRESS [--scope S]\n"
     "  suppress list [--scope S] [--limit N]\n"
     "  suppress import FILE        (CSV; opened by sluicectl, with your rights)\n"
     "  suppress export FILE [--scope S]  (CSV; created by sluicectl, never over a\n"
     "                              file; sluice writes it)\n"
     "  suppress purge              (delete expired entries now)\n\n"
     "ADDRESS is user@domain, or @domain (or domain) for the whole domain. The scope\n"
     "is \"global\" (the default) or a tenant's name. REASON: hard_bounce, complaint,\n"
     "unsubscribe, manual (the default). --ttl: 30d, 12h, ...; none: for ever.\n"
     "CSV columns: address,scope,reason,added,expires,note (times ISO 8601 UTC or\n"
     "Unix seconds; empty: now / never).",
     1, 12, run_suppress},
    {"top", "[-n COUNT] [-d SECONDS]", "a live view of rates and the busiest destinations",
     "Refreshed every second (-d SECONDS: another delay, at least 0.1) until\n"
     "q or Ctrl-C, or COUNT views with -n. With --json: the stats and domains\n"
     "documents, one per line, at each refresh.",
     0, 4, run_top},
};
#define NCMDS (sizeof(cmds) / sizeof(cmds[0]))

static void
usage(FILE *f)
{
    fprintf(f,
            "usage: sluicectl [-s SOCKET] [--json] COMMAND [ARGS]\n"
            "       sluicectl COMMAND --help\n\n"
            "Talks to a running sluice through its stats socket.\n\n"
            "Options:\n"
            "  -s, --socket SOCKET  the stats socket (default: $SLUICE_SOCKET, else %s)\n"
            "  -j, --json           print the JSON answer as it came, one document a line\n"
            "  -h, --help           this help\n"
            "      --version        the version of sluicectl\n\n"
            "Commands:\n",
            DEFAULT_SOCKET);
    for (size_t i = 0; i < NCMDS; i++) {
        char left[256];
        int n = snprintf(left, sizeof(left), "%s %s", cmds[i].name, cmds[i].args);
        if (n > 34) /* the whole synopsis on its line, what it does under it */
            fprintf(f, "  %s\n  %-34s %s\n", left, "", cmds[i].about);
        else
            fprintf(f, "  %-34s %s\n", left, cmds[i].about);
    }
    fprintf(f, "\nExit status: 0 ok, 1 sluice refused, 2 usage, 3 socket unreachable.\n");
}

static void
cmd_help(const struct cmd *c)
{
    printf("usage: sluicectl [-s SOCKET] [--json] %s%s%s\n\n%s.\n", c->name, c->args[0] ? " " : "",
           c->args, c->about);
    if (c->more != NULL)
        printf("\n%s\n", c->more);
}

/* Insertions, deletions and substitutions from a to b, 3 for "far". */
static unsigned
edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 32 || lb > 32)
        return 3;
    unsigned row[33];
    for (size_t j = 0; j <= lb; j++)
        row[j] = (unsigned)j;
    for (size_t i = 1; i <= la; i++) {
        unsigned diag = row[0];
        row[0] = (unsigned)i;
        for (size_t j = 1; j <= lb; j++) {
            unsigned up = row[j];
            unsigned best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb] < 3 ? row[lb] : 3;
}

/* The command an unknown word is likely a slip for: one edit or two away
 * ("status", "domain"), or what Postfix and PowerMTA call it ("mailq",
 * "show"); NULL when none is near. */
static const char *
near_command(const char *w)
{
    static const char *const alias[][2] = {
        {"mailq", "queue"}, {"postqueue", "queue"}, {"show", "stats"}, {"status", "stats"},
        {"delete", "bounce"}, {"pause", "suspend"}, {"hold", "suspend"}, {"release", "resume"},
    };
    for (size_t k = 0; k < sizeof(alias) / sizeof(alias[0]); k++)
        if (strcasecmp(w, alias[k][0]) == 0)
            return alias[k][1];
    const char *best = NULL;
    unsigned bd = 3;
    for (size_t k = 0; k < NCMDS; k++) {
        unsigned d = edit_distance(w, cmds[k].name);
        if (d < bd && d < strlen(cmds[k].name) / 2 + 1) {
            bd = d;
            best = cmds[k].name;
        }
    }
    return best;
}

int
main(int argc, char **argv)
{
    struct ctl c = {.fd = -1, .pass_fd = -1};
    c.path = getenv("SLUICE_SOCKET");
    c.path_from = "from $SLUICE_SOCKET";
    if (c.path == NULL || c.path[0] == '\0') {
        c.path = DEFAULT_SOCKET;
        c.path_from = "the default; -s or $SLUICE_SOCKET names another";
    }
    signal(SIGPIPE, SIG_IGN);

    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        } else if (strcmp(a, "-s") == 0 || strcmp(a, "--socket") == 0) {
            if (i + 1 >= argc)
                die(EXIT_USAGE, "%s needs a socket path", a);
            c.path = argv[++i];
            c.path_from = "from -s";
        } else if (strncmp(a, "--socket=", 9) == 0) {
            c.path = a + 9;
            c.path_from = "from --socket";
        } else if (strcmp(a, "-j") == 0 || strcmp(a, "--json") == 0) {
            c.json = true;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return EXIT_OK;
        } else if (strcmp(a, "--version") == 0) {
            printf("sluicectl %s\n", SLUICE_VERSION);
            return EXIT_OK;
        } else {
            die(EXIT_USAGE, "unknown option \"%s\" (try: sluicectl --help)", a);
        }
    }
    if (i >= argc)
        die(EXIT_USAGE, "no command (try: sluicectl --help)");
    if (c.path[0] == '\0')
        die(EXIT_USAGE, "empty socket path");
    const struct cmd *cmd = NULL;
    for (size_t k = 0; k < NCMDS; k++)
        if (strcmp(argv[i], cmds[k].name) == 0)
            cmd = &cmds[k];
    if (cmd == NULL) {
        const char *near = near_command(argv[i]);
        if (near != NULL)
            die(EXIT_USAGE, "unknown command \"%s\" (did you mean \"%s\"? try: sluicectl --help)",
                argv[i], near);
        die(EXIT_USAGE, "unknown command \"%s\" (try: sluicectl --help)", argv[i]);
    }
    int cargc = argc - i - 1;
    char **cargv = argv + i + 1;
    for (int k = 0; k < cargc; k++) {
        if (strcmp(cargv[k], "--help") == 0 || strcmp(cargv[k], "-h") == 0) {
            cmd_help(cmd);
            return EXIT_OK;
        }
    }
    for (int k = 0; k < cargc; k++) {
        const char *a = cargv[k];
        if (strcmp(a, "-s") == 0 || strcmp(a, "--socket") == 0 ||
            strncmp(a, "--socket=", 9) == 0 || strcmp(a, "-j") == 0 || strcmp(a, "--json") == 0)
            die(EXIT_USAGE, "%s: %s goes before the command (sluicectl %s %s ...)", cmd->name, a,
                a[1] == 's' || a[2] == 's' ? "-s SOCKET" : "--json", cmd->name);
    }
    if (cmd->run != run_top && cmd->run != run_scoped && cmd->run != run_suppress) {
        for (int k = 0; k < cargc; k++)
            if (cargv[k][0] == '-')
                die(EXIT_USAGE, "%s: unknown option \"%s\"", cmd->name, cargv[k]);
    }
    if (cargc < cmd->min || cargc > cmd->max)
        die(EXIT_USAGE, "%s: %s (usage: sluicectl %s%s%s)", cmd->name,
            cargc < cmd->min ? "missing argument" : "too many arguments", cmd->name,
            cmd->args[0] ? " " : "", cmd->args);
    int rc = cmd->run(&c, cmd, cargc, cargv);
    ctl_close(&c);
    /* A write that failed before (stdio's buffer full) leaves only the
     * error flag: its errno is gone, a full disk says so all the same. */
    bool flushed = fflush(stdout) == 0;
    int err = errno;
    if (!flushed || ferror(stdout)) {
        if (output_reader_gone())
            return rc; /* sluicectl queue | head: the reader took what it wanted */
        die(EXIT_UNREACHABLE, "cannot write the output%s%s", flushed ? " (a write failed)" : ": ",
            flushed ? "" : strerror(err));
    }
    return rc;
}
