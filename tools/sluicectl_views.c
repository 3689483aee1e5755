/*
 * sluicectl_views: the commands but suppress, each with its renderer:
 * the plain ones (stats, queue, reload, ...), the scoped ones (flush,
 * bounce, suspend, ... of an ID, domain or tenant), domains, sites,
 * events, warmup, shaping, and top (the live view on the terminal); the
 * checks of their arguments (parse_number, check_word).
 *
 * Threading: one thread; top waits in poll(2) on the terminal.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "tools/sluicectl_int.h"

/* ---- commands ---- */

long
parse_number(const char *what, const char *s, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (s[0] < '0' || s[0] > '9' || *end != '\0' || errno != 0 || v < min || v > max)
        die(EXIT_USAGE, "%s: \"%s\" is not a number from %ld to %ld", what, s, min, max);
    return v;
}

/* An ID or a domain: one word of printable ASCII or UTF-8. */
void
check_word(const char *cmd, const char *what, const char *s)
{
    if (s[0] == '\0' || strlen(s) > 255)
        die(EXIT_USAGE, "%s: %s must be 1 to 255 octets", cmd, what);
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++)
        if (*p <= ' ' || *p == 0x7f)
            die(EXIT_USAGE, "%s: %s may not hold spaces or control characters", cmd, what);
}

/* "queue": as mailq, a message a block: id, age, size, sender (and
 * tenant), then each recipient with its state, attempts, next attempt and
 * last reply. */
static void
render_queue(const cJSON *doc)
{
    const cJSON *m;
    size_t n = 0;
    cJSON_ArrayForEach(m, get(doc, "messages"))
    {
        if (n++ == 0)
            printf("%-16s %-8s %-10s %s\n", "ID", "AGE", "SIZE", "SENDER");
        printf("%-16s %-8s %-10s <%s>", fmt_str(m, "id"), fmt_duration(m, "age_ms"),
               fmt_bytes(m, "size"), cJSON_IsString(get(m, "sender")) ? fmt_str(m, "sender") : "");
        if (cJSON_IsString(get(m, "tenant")) && get(m, "tenant")->valuestring[0] != '\0')
            printf("  tenant %s", fmt_str(m, "tenant"));
        printf("\n");
        const cJSON *r;
        cJSON_ArrayForEach(r, get(m, "recipients"))
        {
            printf("    %-8s %s", fmt_str(r, "state"), fmt_str(r, "rcpt"));
            double att = 0;
            if (num(r, "attempts", &att) && att > 0)
                printf("  attempts %s", fmt_count_d(att));
            if (cJSON_IsString(get(r, "next_attempt")))
                printf("  next %s", fmt_str(r, "next_attempt"));
            printf("\n");
            /* Code 0: no reply, a failure of ours (connect, timeout, TLS). */
            bool said = cJSON_IsString(get(r, "last_reply")) && get(r, "last_reply")->valuestring[0];
            double code = 0;
            if (said && num(r, "last_code", &code) && code > 0)
                printf("             (%s %s)\n", fmt_count(r, "last_code"), fmt_str(r, "last_reply"));
            else if (said)
                printf("             (%s)\n", fmt_str(r, "last_reply"));
        }
    }
    if (n == 0 && cJSON_IsString(get(doc, "domain")))
        printf("(no queued message has a recipient at %s)\n", fmt_str(doc, "domain"));
    else if (n == 0)
        printf("(the queue is empty)\n");
    else if (cJSON_IsTrue(get(doc, "cut")))
        printf("\n%zu messages shown, cut at the answer's size cap (8 MiB); the spool holds "
               "more (a smaller N, a DOMAIN, or sluicectl message ID)\n",
               n);
    else if (cJSON_IsTrue(get(doc, "more")))
        printf("\n%zu messages shown; the spool holds more (sluicectl queue N, N up to 10000)\n", n);
    else
        printf("\n%zu message%s\n", n, n == 1 ? "" : "s");
}

/* "reload done" and what it changed, as one sentence (as a table of one
 * row it came out "reload  done"): the sections and keys the engine's
 * reload log names (changed="..."), or "no change"; then the keys that
 * changed but wait for a restart. A reload not over within the wait says
 * so and where to look. */
static void
render_reload(const cJSON *doc)
{
    const cJSON *st = get(doc, "reload"), *note = get(doc, "note");
    const cJSON *changed = get(doc, "changed"), *kept = get(doc, "needs_restart");
    printf("reload %s", cJSON_IsString(st) ? st->valuestring : "?");
    if (cJSON_IsString(changed))
        printf(": %s%s", changed->valuestring[0] != '\0' ? "changed " : "no change",
               changed->valuestring);
    if (cJSON_IsString(note))
        printf(" (%s)", note->valuestring);
    printf("\n");
    if (cJSON_IsString(kept) && kept->valuestring[0] != '\0')
        printf("not in force until a restart: %s\n", kept->valuestring);
}

/* The config took but the users file did not load: said on stderr, and
 * the exit code is a failure's (the file the operator fixed is not in
 * force). */
static int
reload_users_failed(const cJSON *doc)
{
    const cJSON *u = get(doc, "users_not_loaded");
    if (!cJSON_IsString(u))
        return EXIT_OK;
    fprintf(stderr, "sluicectl: users file not loaded, the previous users kept: %s\n",
            u->valuestring);
    return EXIT_REFUSED;
}

int
run_plain(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    char line[LINE_MAX_OCTETS];
    int n = snprintf(line, sizeof(line), "%s", cmd->name);
    for (int i = 0; i < argc; i++) {
        check_word(cmd->name, cmd->args, argv[i]);
        /* queue's N, checked here as domains' and sites' are (exit 2) */
        if (strcmp(cmd->name, "queue") == 0 && argv[i][0] >= '0' && argv[i][0] <= '9' &&
            argv[i][strspn(argv[i], "0123456789")] == '\0')
            parse_number("queue", argv[i], 1, 10000);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " %s", argv[i]);
    }
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else if (strcmp(cmd->name, "stats") == 0)
        render_stats(doc);
    else if (strcmp(cmd->name, "queue") == 0)
        render_queue(doc);
    else if (strcmp(cmd->name, "metrics") == 0)
        fputs(cJSON_IsString(get(doc, "text")) ? get(doc, "text")->valuestring : "", stdout);
    else if (strcmp(cmd->name, "reload") == 0)
        render_reload(doc);
    else
        render_generic(doc);
    int rc = strcmp(cmd->name, "reload") == 0 ? reload_users_failed(doc) : EXIT_OK;
    cJSON_Delete(doc);
    return rc;
}

/* flush and bounce: a DOMAIN or ID, or a scope by owner (--tenant T,
 * --campaign C), sent as "tenant=T campaign=C" (the campaign last: it may
 * hold blanks). */
int
run_scoped(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    const char *tenant = NULL, *campaign = NULL, *target = NULL, *pool = NULL, *source = NULL,
               *dur = NULL;
    bool susp = strcmp(cmd->name, "suspend") == 0 || strcmp(cmd->name, "resume") == 0;
    bool local = false;
    for (int i = 0; i < argc; i++) {
        if (susp && strcmp(argv[i], "--local") == 0) {
            local = true;
            continue;
        }
        const char **slot = strcmp(argv[i], "--tenant") == 0     ? &tenant
                            : strcmp(argv[i], "--campaign") == 0 ? &campaign
                            : strcmp(argv[i], "--pool") == 0     ? &pool
                            : strcmp(argv[i], "--source") == 0 && susp ? &source
                            : strcmp(argv[i], "--for") == 0 && strcmp(cmd->name, "suspend") == 0
                                ? &dur
                                : NULL;
        if (slot != NULL) {
            if (i + 1 >= argc)
                die(EXIT_USAGE, "%s: %s needs a value", cmd->name, argv[i]);
            *slot = argv[++i];
        } else if (argv[i][0] == '-') {
            die(EXIT_USAGE, "%s: unknown option \"%s\"", cmd->name, argv[i]);
        } else if (target == NULL) {
            target = argv[i];
        } else {
            die(EXIT_USAGE, "%s: too many arguments (usage: sluicectl %s %s)", cmd->name,
                cmd->name, cmd->args);
        }
    }
    int scopes = (target != NULL) + (tenant != NULL) + (campaign != NULL) + (pool != NULL) +
                 (source != NULL);
    if (susp && scopes != 1)
        die(EXIT_USAGE, "%s: one scope: DOMAIN, --tenant, --campaign, --pool or --source "
                        "(usage: sluicectl %s %s)", cmd->name, cmd->name, cmd->args);
    if (!susp && target != NULL && (tenant != NULL || campaign != NULL || pool != NULL))
        die(EXIT_USAGE, "%s: a DOMAIN or ID, or --tenant/--campaign/--pool, not both", cmd->name);
    if (!susp && pool != NULL && (tenant != NULL || campaign != NULL))
        die(EXIT_USAGE, "%s: --pool alone, or --tenant/--campaign", cmd->name);
    if (target == NULL && tenant == NULL && campaign == NULL && pool == NULL &&
        strcmp(cmd->name, "bounce") == 0)
        die(EXIT_USAGE, "bounce: missing argument (usage: sluicectl bounce %s)", cmd->args);
    char line[LINE_MAX_OCTETS];
    int n = snprintf(line, sizeof(line), "%s%s", cmd->name, local ? " local" : "");
    if (target != NULL) {
        check_word(cmd->name, susp ? "DOMAIN" : "ID|DOMAIN", target);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " %s", target);
    }
    if (pool != NULL) {
        check_word(cmd->name, "--pool", pool);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " pool=%s", pool);
    }
    if (source != NULL) {
        check_word(cmd->name, "--source", source);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " source=%s", source);
    }
    if (tenant != NULL) {
        check_word(cmd->name, "--tenant", tenant);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " tenant=%s", tenant);
    }
    if (campaign != NULL) {
        for (const unsigned char *p = (const unsigned char *)campaign; *p != '\0'; p++)
            if (*p < ' ' || *p == 0x7f)
                die(EXIT_USAGE, "%s: --campaign may not hold control characters", cmd->name);
        if (campaign[0] == '\0' || strlen(campaign) > 255)
            die(EXIT_USAGE, "%s: --campaign must be 1 to 255 octets", cmd->name);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " campaign=%s", campaign);
    }
    if (dur != NULL) {
        check_word(cmd->name, "--for", dur);
        n += snprintf(line + n, sizeof(line) - (size_t)n, " for=%s", dur);
    }
    /* A flush or bounce answers once every recipient it selected was
     * updated in the spool: about 10 s for a million (a flush of a
     * 1,000,000-recipient queue). Within TIMEOUT_MS this said "timed
     * out" and exited 3, sluice unreachable, while the flush went on. */
    if (!susp)
        c->timeout_ms = SCOPED_BULK_TIMEOUT_MS;
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else
        render_generic(doc);
    cJSON_Delete(doc);
    return EXIT_OK;
}

int
run_domains(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    long n = 20;
    if (argc == 1)
        n = parse_number("domains", argv[0], 1, DOMAINS_MAX);
    char line[64];
    snprintf(line, sizeof(line), "domains %ld", n);
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else
        render_domains(doc, (size_t)n);
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* A site's head latency in ms, one decimal, "*" after it while its
 * connections queue ("-" before the first). */
static const char *
fmt_head(const cJSON *s)
{
    double us;
    if (!num(s, "head_us", &us) || us <= 0)
        return "-";
    char *b = cell_buf();
    snprintf(b, 96, "%.1fms%s", us / 1000, cJSON_IsTrue(get(s, "queues")) ? "*" : "");
    return b;
}

/* What a site can open: the window, or the cap below it and which one
 * ("40 (address cap)", "6 (mx cap)"). */
static const char *
fmt_site_limit(const cJSON *s)
{
    const cJSON *by = get(s, "limited_by");
    if (!cJSON_IsString(by) || strcmp(by->valuestring, "window") == 0)
        return fmt_count(s, "limit");
    char *b = cell_buf();
    snprintf(b, 96, "%s (%s)", fmt_count(s, "limit"),
             strcmp(by->valuestring, "address_cap") == 0 ? "address cap"
             : strcmp(by->valuestring, "mx_cap") == 0    ? "mx cap"
                                                         : "cap");
    return b;
}

/* "sites [N]": one row per site of a worker, busiest first. */
static void
render_sites(const cJSON *doc)
{
    struct table t;
    /* right: every column but SITE */
    table_init(&t, 15, 0x7ffeu);
    table_row(&t, "SITE", "WORKER", "CONN", "IDLE", "WINDOW", "LIMIT", "MAX", "DOMAINS", "WAITING",
              "READY", "INFLIGHT", "OPENED", "FAILURES", "HALVED", "HEAD");
    const cJSON *s;
    size_t n = 0;
    cJSON_ArrayForEach(s, get(doc, "sites"))
    {
        n++;
        table_row(&t, fmt_str(s, "site"), fmt_count(s, "worker"), fmt_count(s, "connections"),
                  fmt_count(s, "idle"), fmt_count(s, "window"), fmt_site_limit(s),
                  fmt_count(s, "max_connections"), fmt_count(s, "domains"),
                  fmt_count(s, "domains_waiting"), fmt_count(s, "ready"), fmt_count(s, "inflight"),
                  fmt_count(s, "opened"), fmt_count(s, "failures"), fmt_count(s, "window_halved"),
                  fmt_head(s));
    }
    table_print(&t, stdout);
    if (n == 0)
        printf("(no sites)\n");
    double total;
    if (num(doc, "sites_total", &total) && total > (double)n)
        printf("(%zu of %.0f sites shown)\n", n, total);
}

int
run_sites(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    (void)cmd;
    long n = 20;
    if (argc == 1)
        n = parse_number("sites", argv[0], 1, DOMAINS_MAX);
    char line[64];
    snprintf(line, sizeof(line), "sites %ld", n);
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else
        render_sites(doc);
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* "events" and "events pause|resume NAME": one row per sink. */
static void
render_events(const cJSON *doc)
{
    struct table t;
    /* right: PENDING OLDEST SENT FAILED DROPPED REJECTED */
    table_init(&t, 10, 0xfcu);
    table_row(&t, "SINK", "KIND", "PENDING", "OLDEST", "SENT", "FAILED", "DROPPED", "REJECTED",
              "STATE", "LAST ERROR");
    const cJSON *d;
    size_t n = 0;
    cJSON_ArrayForEach(d, get(doc, "sinks"))
    {
        n++;
        const cJSON *paused = get(d, "paused");
        table_row(&t, fmt_str(d, "name"), fmt_str(d, "kind"), fmt_count(d, "pending"),
                  fmt_duration(d, "oldest_pending_age_ms"), fmt_count(d, "sent"),
                  fmt_count(d, "failed_attempts"), fmt_count(d, "dropped"),
                  fmt_count(d, "rejected"), cJSON_IsTrue(paused) ? "paused" : "active", fmt_str(d, "last_error"));
    }
    table_print(&t, stdout);
    if (n == 0)
        printf("(no [events] sinks configured)\n");
}

int
run_events(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    char line[LINE_MAX_OCTETS] = "events";
    if (argc > 0) {
        if (argc != 2 || (strcmp(argv[0], "pause") != 0 && strcmp(argv[0], "resume") != 0))
            die(EXIT_USAGE, "usage: sluicectl events [pause|resume NAME]");
        check_word(cmd->name, "NAME", argv[1]);
        snprintf(line, sizeof(line), "events %s %s", argv[0], argv[1]);
    }
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else
        render_events(doc);
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* A count, or "unlimited" where the answer has null (no limit). */
static const char *
fmt_limit(const cJSON *o, const char *path)
{
    return cJSON_IsNull(get(o, path)) ? "unlimited" : fmt_count(o, path);
}

/* "warmup": one row per source and destination group. */
static void
render_warmup(const cJSON *doc)
{
    struct table t;
    /* right: DAY ALLOWANCE TAKEN LEFT */
    table_init(&t, 8, 0x78u);
    table_row(&t, "SOURCE", "PLAN", "GROUP", "DAY", "ALLOWANCE", "TAKEN", "LEFT", "STARTED");
    const cJSON *d;
    size_t n = 0;
    cJSON_ArrayForEach(d, get(doc, "rows"))
    {
        n++;
        table_row(&t, fmt_str(d, "source"), fmt_str(d, "plan"), fmt_str(d, "group"),
                  fmt_count(d, "day"), fmt_limit(d, "allowance"), fmt_count(d, "taken"),
                  fmt_limit(d, "left"), fmt_str(d, "start"));
    }
    table_print(&t, stdout);
    if (n == 0)
        printf("(no [source] carries a warm-up plan)\n");
    double total;
    if (num(doc, "rows_total", &total) && total > (double)n)
        printf("(%zu of %.0f rows shown)\n", n, total);
    printf("redis: %s; messages refused over an allowance since start: %s\n",
           fmt_str(doc, "redis"), fmt_count(doc, "refused"));
}

int
run_warmup(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    (void)cmd;
    (void)argc;
    (void)argv;
    const char *raw;
    cJSON *doc = ctl_ask(c, "warmup", &raw);
    if (c->json)
        printf("%s\n", raw);
    else
        render_warmup(doc);
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* "shaping": one row per active action, its trigger below it. */
static void
render_shaping(const cJSON *doc)
{
    struct table t;
    table_init(&t, 8, 0x40u); /* right: LEFT */
    table_row(&t, "ID", "ACTION", "SCOPE", "SOURCE/TENANT", "GROUP/DOMAIN", "RULE", "LEFT",
              "ORIGIN");
    const cJSON *a;
    size_t n = 0;
    cJSON_ArrayForEach(a, get(doc, "actions"))
    {
        n++;
        char act[32];
        const char *k = fmt_str(a, "action");
        double v;
        if (strcmp(k, "cap") == 0 && num(a, "value", &v))
            snprintf(act, sizeof(act), "cap:%.0f", v);
        else if (strcmp(k, "rate") == 0)
            snprintf(act, sizeof(act), "rate:%s", fmt_str(a, "rate"));
        else
            snprintf(act, sizeof(act), "%s", k);
        const char *where = fmt_str(a, "domain");
        if (strcmp(where, "-") == 0)
            where = fmt_str(a, "group");
        const char *who = fmt_str(a, "tenant");
        if (strcmp(who, "-") == 0)
            who = fmt_str(a, "source");
        /* an operator's suspend without --for lasts a year: "until resumed" */
        double left = 0;
        bool open_ended = strcmp(fmt_str(a, "rule"), "operator") == 0 &&
                          num(a, "remaining_ms", &left) && left > 300 * 86400000.0;
        table_row(&t, fmt_str(a, "id"), act, fmt_str(a, "scope"), who, where,
                  fmt_str(a, "rule"), open_ended ? "until resumed" : fmt_duration(a, "remaining_ms"),
                  fmt_str(a, "origin"));
    }
    table_print(&t, stdout);
    if (n == 0)
        printf("(no shaping action in force)\n");
    cJSON_ArrayForEach(a, get(doc, "actions"))
    printf("%s: %s\n", fmt_str(a, "id"), fmt_str(a, "trigger"));
    printf("redis: %s; rules loaded: %s\n", fmt_str(doc, "redis"), fmt_count(doc, "rules"));
}

/* Which nodes an operator's shaping action reaches: every node through
 * Redis, this one alone without [redis] (cluster false); a sluice that
 * does not say is taken at its word of then, every node. */
static const char *
shaping_where(const cJSON *doc)
{
    return cJSON_IsFalse(get(doc, "cluster")) ? "on this node (no [redis]: no other node hears)"
                                               : "on every node";
}

int
run_shaping(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    (void)cmd;
    char line[512];
    size_t n = (size_t)snprintf(line, sizeof(line), "shaping");
    for (int i = 0; i < argc && n < sizeof(line); i++)
        n += (size_t)snprintf(line + n, sizeof(line) - n, " %s", argv[i]);
    if (n >= sizeof(line)) {
        fprintf(stderr, "sluicectl: arguments too long\n");
        return EXIT_USAGE;
    }
    const char *raw;
    cJSON *doc = ctl_ask(c, line, &raw);
    if (c->json)
        printf("%s\n", raw);
    else if (argc == 0 || strcmp(argv[0], "list") == 0)
        render_shaping(doc);
    else if (strcmp(argv[0], "clear") == 0)
        printf("cleared %s action(s) %s\n", fmt_count(doc, "cleared"), shaping_where(doc));
    else
        printf("%s: %s %s for %s %s\n", fmt_str(doc, "action.id"),
               fmt_str(doc, "action.action"), fmt_str(doc, "action.scope"),
               fmt_duration(doc, "action.remaining_ms"), shaping_where(doc));
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* Rows of the terminal left for domains, or 20 off a terminal. */
static size_t
top_rows(void)
{
    struct winsize ws;
    if (!isatty(STDOUT_FILENO) || ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) != 0 || ws.ws_row == 0)
        return 20;
    int rows = (int)ws.ws_row - 14; /* header, rates, summary, table header, prompt */
    return rows < 3 ? 3 : (size_t)rows;
}

/* The terminal's settings before top changed them, put back however
 * sluicectl exits: die() (sluice stopped, the socket closed) included. */
static struct termios top_saved;
static bool top_changed;

static void
top_restore(void)
{
    if (top_changed)
        tcsetattr(STDIN_FILENO, TCSANOW, &top_saved);
    top_changed = false;
}

int
run_top(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    long count = 0; /* 0: until q or Ctrl-C */
    double delay = 1.0;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "-n") == 0 && i + 1 < argc) {
            count = parse_number("top -n", argv[++i], 1, 1000000);
        } else if (strcmp(argv[i], "-d") == 0 && i + 1 < argc) {
            char *end;
            const char *s = argv[++i];
            delay = strtod(s, &end);
            if (s[0] < '0' || s[0] > '9' || *end != '\0' || !(delay >= 0.1 && delay <= 3600))
                die(EXIT_USAGE, "top -d: \"%s\" is not a number of seconds from 0.1 to 3600", s);
        } else {
            die(EXIT_USAGE, "top: unexpected \"%s\" (try: sluicectl top --help)", argv[i]);
        }
    }
    bool tty_out = isatty(STDOUT_FILENO), tty_in = isatty(STDIN_FILENO);
    bool raw_mode = false;
    if (tty_in && !c->json && tcgetattr(STDIN_FILENO, &top_saved) == 0) {
        struct termios t = top_saved;
        t.c_lflag &= ~(tcflag_t)(ICANON | ECHO); /* q without Enter; ISIG stays: Ctrl-C */
        t.c_cc[VMIN] = 0;
        t.c_cc[VTIME] = 0;
        raw_mode = tcsetattr(STDIN_FILENO, TCSANOW, &t) == 0;
        if (raw_mode && !top_changed) {
            top_changed = true;
            atexit(top_restore);
        }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    int rc = EXIT_OK;
    for (long it = 0; !interrupted; it++) {
        size_t rows = top_rows();
        char line[64];
        snprintf(line, sizeof(line), "domains %zu", rows);
        const char *raw;
        cJSON *st = ctl_ask(c, "stats", &raw);
        if (c->json)
            printf("%s\n", raw);
        cJSON *doms = ctl_ask(c, line, &raw);
        if (c->json) {
            printf("%s\n", raw);
        } else {
            if (tty_out)
                fputs("\033[H\033[2J", stdout);
            else if (it > 0)
                putchar('\n');
            char now[32];
            time_t t = time(NULL);
            struct tm tm;
            strftime(now, sizeof(now), "%H:%M:%S", localtime_r(&t, &tm));
            print_header(st);
            printf("%s   connections in %s out %s   queue %s recipients   spool %s\n", now,
                   fmt_count(st, "connections.inbound_open"),
                   fmt_count(st, "connections.outbound_open"), fmt_count(st, "queue.recipients"),
                   fmt_bytes(st, "spool.bytes"));
            putchar('\n');
            print_rates(st);
            putchar('\n');
            render_domains(doms, rows);
            if (tty_out && count == 0)
                printf("\n(q to quit)\n");
        }
        cJSON_Delete(st);
        cJSON_Delete(doms);
        /* a view that could not be written ends the loop (its reader gone:
         * sluicectl top | head); main says why when it is another error */
        if (fflush(stdout) != 0 || ferror(stdout))
            break;
        if (count > 0 && it + 1 >= count)
            break;
        /* Not held open across the wait: sluice drops a client silent for
         * its idle time (60 s, and -d may be longer) and, with its pool
         * full, the one idle longest first; the next view connects anew. */
        ctl_close(c);
        /* wait, watching the keyboard for q */
        uint64_t deadline = clock_mono_ms() + (uint64_t)(delay * 1000);
        while (!interrupted) {
            uint64_t now = clock_mono_ms();
            if (now >= deadline)
                break;
            struct pollfd p = {.fd = STDIN_FILENO, .events = POLLIN};
            int r = poll(&p, raw_mode ? 1 : 0, (int)(deadline - now));
            if (r > 0) {
                char k;
                ssize_t got = read(STDIN_FILENO, &k, 1);
                if (got == 1 && (k == 'q' || k == 'Q'))
                    interrupted = 1;
                else if (got <= 0)
                    raw_mode = false; /* stdin closed: stop watching it */
            }
        }
    }
    top_restore();
    (void)cmd;
    return rc;
}
