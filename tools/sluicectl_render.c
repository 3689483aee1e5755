/*
 * sluicectl_render: the answer read field by field into cells (counts,
 * bytes, rates, shares, durations, strings; "-" for what is missing),
 * aligned tables, and the views of stats, domains and any other document
 * (render_generic: scalars as key/value rows, arrays of objects as
 * tables).
 *
 * Threading: one thread; cells come from one static ring of buffers.
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "tools/sluicectl_int.h"

/* ---- formatting ---- */

/* Cells are small: one static ring of buffers keeps the callers simple. */
char *
cell_buf(void)
{
    static char ring[64][96];
    static unsigned next;
    return ring[next++ % 64];
}

const cJSON *
get(const cJSON *o, const char *path)
{
    char key[64];
    while (o != NULL && *path != '\0') {
        size_t n = strcspn(path, ".");
        if (n >= sizeof(key))
            return NULL;
        memcpy(key, path, n);
        key[n] = '\0';
        o = cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, key) : NULL;
        path += n + (path[n] == '.');
    }
    return o;
}

bool
num(const cJSON *o, const char *path, double *out)
{
    const cJSON *v = get(o, path);
    if (!cJSON_IsNumber(v))
        return false;
    *out = v->valuedouble;
    return true;
}

const char *
fmt_count_d(double v)
{
    char *b = cell_buf();
    if (!isfinite(v))
        return "-";
    if (v < 0 || v >= 1e18 || v != (double)(uint64_t)v) {
        snprintf(b, 96, "%.6g", v);
        return b;
    }
    char digits[32];
    int n = snprintf(digits, sizeof(digits), "%.0f", v);
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        if (i > 0 && (n - i) % 3 == 0)
            b[o++] = ',';
        b[o++] = digits[i];
    }
    b[o] = '\0';
    return b;
}

const char *
fmt_count(const cJSON *o, const char *path)
{
    double v;
    return num(o, path, &v) ? fmt_count_d(v) : "-";
}

static const char *
fmt_bytes_d(double v)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    char *b = cell_buf();
    if (!isfinite(v) || v < 0)
        return "-";
    int u = 0;
    while (v >= 1024 && u < 6) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(b, 96, "%.0f B", v);
    else
        snprintf(b, 96, "%.1f %s", v, units[u]);
    return b;
}

const char *
fmt_bytes(const cJSON *o, const char *path)
{
    double v;
    return num(o, path, &v) ? fmt_bytes_d(v) : "-";
}

static const char *
fmt_rate(const cJSON *o, const char *path)
{
    double v;
    if (!num(o, path, &v))
        return "-";
    char *b = cell_buf();
    snprintf(b, 96, "%.1f", v);
    return b;
}

static const char *
fmt_share(const cJSON *o, const char *path)
{
    double v;
    if (!num(o, path, &v))
        return "-";
    char *b = cell_buf();
    snprintf(b, 96, "%.1f%%", v * 100);
    return b;
}

/* ms as "3d 4h", "4h 12m", "12m 5s", "5s", "120ms", rounded to the
 * nearest of the last unit shown (1,500 ms is "2s", 59.6 s "1m"; it cut
 * down: 1,999 ms read "1s"), the unit chosen after rounding. */
static const char *
fmt_duration_d(double ms)
{
    if (!isfinite(ms) || ms < 0 || ms > 1e18)
        return "-";
    char *b = cell_buf();
    uint64_t r; /* a cast of x + 0.5 (x >= 0): x rounded, without libm */
    if ((r = (uint64_t)(ms + 0.5)) < 1000) {
        snprintf(b, 96, "%llums", (unsigned long long)r);
    } else if ((r = (uint64_t)(ms / 1000 + 0.5)) < 3600) {
        if (r < 60)
            snprintf(b, 96, "%llus", (unsigned long long)r);
        else
            snprintf(b, 96, "%llum %llus", (unsigned long long)(r / 60),
                     (unsigned long long)(r % 60));
    } else if ((r = (uint64_t)(ms / 60000 + 0.5)) < 1440) {
        snprintf(b, 96, "%lluh %llum", (unsigned long long)(r / 60), (unsigned long long)(r % 60));
    } else {
        r = (uint64_t)(ms / 3600000 + 0.5);
        snprintf(b, 96, "%llud %lluh", (unsigned long long)(r / 24), (unsigned long long)(r % 24));
    }
    /* a round figure as it was typed: "10m", not "10m 0s" */
    size_t n = strlen(b);
    if (n > 3 && (strcmp(b + n - 3, " 0s") == 0 || strcmp(b + n - 3, " 0m") == 0 ||
                  strcmp(b + n - 3, " 0h") == 0))
        b[n - 3] = '\0';
    return b;
}

const char *
fmt_duration(const cJSON *o, const char *path)
{
    double v;
    return num(o, path, &v) ? fmt_duration_d(v) : "-";
}

/* A string for a terminal: control characters shown as '?'. */
const char *
fmt_str(const cJSON *o, const char *path)
{
    const cJSON *v = get(o, path);
    if (!cJSON_IsString(v) || v->valuestring[0] == '\0')
        return "-";
    char *b = cell_buf();
    snprintf(b, 96, "%s", v->valuestring);
    for (char *p = b; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    return b;
}

/* ---- tables ---- */

void
table_init(struct table *t, unsigned ncols, unsigned right)
{
    memset(t, 0, sizeof(*t));
    t->ncols = ncols;
    t->right = right;
}

static void
table_grow(struct table *t)
{
    if (t->nrows < t->cap)
        return;
    t->cap = t->cap ? t->cap * 2 : 16;
    t->cells = realloc(t->cells, t->cap * t->ncols * sizeof(*t->cells));
    t->heading = realloc(t->heading, t->cap * sizeof(*t->heading));
    if (t->cells == NULL || t->heading == NULL)
        die(EXIT_UNREACHABLE, "out of memory");
}

/* ncols strings (NULL shows as "-"). */
void
table_row(struct table *t, ...)
{
    table_grow(t);
    va_list ap;
    va_start(ap, t);
    for (unsigned c = 0; c < t->ncols; c++) {
        const char *s = va_arg(ap, const char *);
        t->cells[t->nrows * t->ncols + c] = strdup(s != NULL ? s : "-");
    }
    va_end(ap);
    t->heading[t->nrows++] = false;
}

static void
table_row_v(struct table *t, const char *const *cells)
{
    table_grow(t);
    for (unsigned c = 0; c < t->ncols; c++)
        t->cells[t->nrows * t->ncols + c] = strdup(cells[c] != NULL ? cells[c] : "-");
    t->heading[t->nrows++] = false;
}

static void
table_heading(struct table *t, const char *s)
{
    table_grow(t);
    for (unsigned c = 0; c < t->ncols; c++)
        t->cells[t->nrows * t->ncols + c] = strdup(c == 0 ? s : "");
    t->heading[t->nrows++] = true;
}

/* Display width: UTF-8 continuation octets take no column. */
static size_t
width(const char *s)
{
    size_t w = 0;
    for (; *s != '\0'; s++)
        w += ((unsigned char)*s & 0xc0) != 0x80;
    return w;
}

/* Print the rows held and let them go, keeping the table (its columns
 * and their widths) for more: a long list printed a page at a time, each
 * page's columns at least as wide as those before it. */
void
table_flush(struct table *t, FILE *f)
{
    size_t *w = t->w;
    for (size_t r = 0; r < t->nrows; r++) {
        if (t->heading[r])
            continue;
        for (unsigned c = 0; c < t->ncols && c < COLS_MAX; c++) {
            size_t l = width(t->cells[r * t->ncols + c]);
            if (l > w[c])
                w[c] = l;
        }
    }
    for (size_t r = 0; r < t->nrows; r++) {
        if (t->heading[r]) {
            fprintf(f, "%s\n", t->cells[r * t->ncols]);
            continue;
        }
        /* built whole, so that an empty last cell leaves no trailing blanks */
        char line[8192];
        size_t o = 0;
        for (unsigned c = 0; c < t->ncols && c < COLS_MAX; c++) {
            const char *s = t->cells[r * t->ncols + c];
            int pad = (int)(w[c] - width(s));
            bool right = (t->right & (1u << c)) != 0;
            int n = snprintf(line + o, sizeof(line) - o, "%s%*s%s%*s", c > 0 ? "  " : "",
                             right ? pad : 0, "", s, right ? 0 : pad, "");
            if (n < 0 || (size_t)n >= sizeof(line) - o) {
                o = strlen(line);
                break;
            }
            o += (size_t)n;
        }
        while (o > 0 && line[o - 1] == ' ')
            o--;
        line[o] = '\0';
        fprintf(f, "%s\n", line);
    }
    for (size_t i = 0; i < t->nrows * t->ncols; i++)
        free(t->cells[i]);
    t->nrows = 0;
}

void
table_print(struct table *t, FILE *f)
{
    table_flush(t, f);
    free(t->cells);
    free(t->heading);
    memset(t, 0, sizeof(*t));
}

/* ---- rendering ---- */

void
print_header(const cJSON *st)
{
    /* mail queued and never sent: said where the operator looks first,
     * not only in the log line at start */
    printf("sluice %s   up %s   workers %s   redis %s%s\n", fmt_str(st, "version"),
           fmt_duration(st, "uptime_ms"), fmt_count(st, "workers"), fmt_str(st, "redis.state"),
           cJSON_IsFalse(get(st, "delivery_enabled")) ? "   delivery OFF ([delivery] enabled = no)"
                                                      : "");
}

void
print_rates(const cJSON *st)
{
    static const char *const k[][2] = {{"received", "received messages"},
                                       {"delivered", "delivered"},
                                       {"deferred", "deferred"},
                                       {"bounced", "bounced"},
                                       {"expired", "expired"}};
    /* In sluice's first minute the "1m" rates are over the time since
     * start, and after a gap in the samples (a stats thread held up) over
     * more than a minute: the column says so ("last 12s", "last 75s")
     * rather than "last 1m" (a sampling a few ms late each second is
     * still a minute's). */
    char last[32] = "last 1m";
    double w;
    if (num(st, "rates.1m.window_ms", &w) && w >= 0 && (w < 59500 || w >= 63000))
        snprintf(last, sizeof(last), "last %llus",
                 (unsigned long long)(w < 1000 ? 1 : w / 1000 + 0.5)); /* as the page rounds */
    struct table t;
    table_init(&t, 3, 0x6);
    table_row(&t, "per second", "last 1s", last);
    for (size_t i = 0; i < 5; i++) {
        char a[48], b[48];
        snprintf(a, sizeof(a), "rates.1s.%s", k[i][0]);
        snprintf(b, sizeof(b), "rates.1m.%s", k[i][0]);
        table_row(&t, k[i][1], fmt_rate(st, a), fmt_rate(st, b));
    }
    table_print(&t, stdout);
}

void
render_stats(const cJSON *st)
{
    print_header(st);
    putchar('\n');
    print_rates(st);
    putchar('\n');

    struct table t;
    table_init(&t, 3, 0x6);
    table_heading(&t, "Totals");
    table_row(&t, "  received messages", fmt_count(st, "counters.received_msgs"), "");
    table_row(&t, "  received recipients", fmt_count(st, "counters.received_rcpts"), "");
    table_row(&t, "  delivered", fmt_count(st, "counters.delivered"), "");
    table_row(&t, "  delivered over TLS", fmt_count(st, "counters.delivered_tls"),
              fmt_share(st, "tls_share"));
    table_row(&t, "  deferred", fmt_count(st, "counters.deferred"), "");
    table_row(&t, "  bounced", fmt_count(st, "counters.bounced"), "");
    table_row(&t, "  expired", fmt_count(st, "counters.expired"), "");
    table_row(&t, "  DSNs queued", fmt_count(st, "counters.dsn_queued"), "");
    table_heading(&t, "Bounce listener");
    table_row(&t, "  messages parsed", fmt_count(st, "counters.oob_messages"), "");
    table_row(&t, "  oob_bounce and complaint events", fmt_count(st, "counters.oob_events"), "");
    table_row(&t, "  dropped (auto-replies, no or forged token)",
              fmt_count(st, "counters.oob_dropped"), "");
    table_row(&t, "  recipients refused", fmt_count(st, "counters.oob_refused"), "");
    table_heading(&t, "Connections");
    table_row(&t, "  inbound open", fmt_count(st, "connections.inbound_open"), "");
    table_row(&t, "  outbound open", fmt_count(st, "connections.outbound_open"), "");
    table_row(&t, "  inbound total", fmt_count(st, "connections.inbound_total"), "");
    table_row(&t, "  outbound total", fmt_count(st, "connections.outbound_total"), "");
    table_row(&t, "  outbound failed", fmt_count(st, "connections.outbound_failed"), "");
    table_row(&t, "  DANE authenticated", fmt_count(st, "connections.dane_authenticated"), "");
    table_row(&t, "  DANE hosts given up", fmt_count(st, "connections.dane_failed"), "");
    table_row(&t, "  transactions", fmt_count(st, "connections.transactions"), "");
    table_row(&t, "  on reused connections", fmt_count(st, "connections.reused_transactions"),
              fmt_share(st, "connections.reuse_share"));
    table_row(&t, "  refused by an MX host (no 8BITMIME, SIZE, SMTPUTF8)",
              fmt_count(st, "connections.host_refused"), "");
    table_row(&t, "    of those, sent to the next MX host",
              fmt_count(st, "connections.host_detoured"), "");
    table_heading(&t, "Queue");
    table_row(&t, "  messages", fmt_count(st, "queue.messages"), "");
    table_row(&t, "  recipients", fmt_count(st, "queue.recipients"), "");
    table_row(&t, "  deferred recipients", fmt_count(st, "queue.deferred"), "");
    table_row(&t, "  jobs parked (tenant or campaign suspended)", fmt_count(st, "parked"), "");
    table_heading(&t, "Spool");
    table_row(&t, "  message data", fmt_bytes(st, "spool.bytes"), "");
    table_row(&t, "  map size", fmt_bytes(st, "spool.map_size"), "");
    table_row(&t, "  map used", fmt_bytes(st, "spool.map_used"),
              fmt_share(st, "spool.map_used_share"));
    table_row(&t, "  removed after a failed sync", fmt_count(st, "spool.unconfirmed_removed"), "");
    table_row(&t, "  refused while sync failing", fmt_count(st, "spool.sync_failing_refused"), "");
    table_heading(&t, "DNS");
    table_row(&t, "  lookups", fmt_count(st, "dns.lookups"), "");
    table_row(&t, "  cache hits", fmt_count(st, "dns.cache_hits"),
              fmt_share(st, "dns.cache_hit_share"));
    table_row(&t, "  cache entries", fmt_count(st, "dns.cache_entries"), "");
    table_row(&t, "  TLSA queries (DANE)", fmt_count(st, "dns.tlsa_queries"), "");
    table_row(&t, "  MX hosts with validated TLSA", fmt_count(st, "dns.tlsa_secure"), "");
    table_row(&t, "  TLSA lookups failed", fmt_count(st, "dns.tlsa_failed"), "");
    table_row(&t, "  EDNS turned off by a FORMERR", fmt_count(st, "dns.edns_off"), "");
    table_row(&t, "  lookups running", fmt_count(st, "dns.inflight"), "");
    table_row(&t, "  lookups waiting (max_inflight)", fmt_count(st, "dns.queued"), "");
    table_row(&t, "  query timeouts", fmt_count(st, "dns.timeouts"), "");
    table_row(&t, "  lookups failed", fmt_count(st, "dns.failures"), "");
    if (cJSON_IsTrue(get(st, "suppress.enabled"))) {
        table_heading(&t, "Suppression list");
        table_row(&t, "  entries", fmt_count(st, "suppress.entries"), "");
        table_row(&t, "  recipients found on it", fmt_count(st, "suppress.hits"), "");
        table_row(&t, "  added", fmt_count(st, "suppress.added"), "");
        table_row(&t, "  removed", fmt_count(st, "suppress.removed"), "");
        table_row(&t, "  entries waiting in the spool (list not written)",
                  fmt_count(st, "suppress.notes_pending"), "");
        table_row(&t, "  entries dropped", fmt_count(st, "suppress.feed_dropped"), "");
        table_row(&t, "  map used", fmt_bytes(st, "suppress.map_used"), "");
    }
    table_heading(&t, "Delivery log");
    table_row(&t, "  events", fmt_count(st, "dlog.events"), "");
    table_row(&t, "  write errors", fmt_count(st, "dlog.write_errors"), "");
    table_row(&t, "  dropped", fmt_count(st, "dlog.dropped"), "");
    if (cJSON_IsTrue(get(st, "shaping.enabled"))) {
        /* the actions in force: "shaping list" */
        table_heading(&t, "Traffic shaping");
        table_row(&t, "  actions started", fmt_count(st, "shaping.started"), "");
        table_row(&t, "  actions ended", fmt_count(st, "shaping.ended"), "");
        table_row(&t, "  replies that matched a rule", fmt_count(st, "shaping.rule_hits"), "");
        table_row(&t, "  connections quit for an action", fmt_count(st, "shaping.connections_quit"),
                  "");
        table_row(&t, "  actions ignored (unknown here)", fmt_count(st, "shaping.ignored"), "");
        table_row(&t, "  changes waiting for Redis", fmt_count(st, "shaping.outbox"), "");
        table_row(&t, "  changes dropped (Redis away)", fmt_count(st, "shaping.outbox_dropped"),
                  "");
    }
    table_heading(&t, "AUTH");
    table_row(&t, "  succeeded", fmt_count(st, "auth.ok"), "");
    table_row(&t, "  failed", fmt_count(st, "auth.failed"), "");
    table_row(&t, "  refused: address failed too often", fmt_count(st, "auth.refused_address"),
              "");
    table_row(&t, "  refused: user failed too often", fmt_count(st, "auth.refused_user"), "");
    table_row(&t, "  refused: hashing queue full", fmt_count(st, "auth.busy"), "");
    table_row(&t, "  hashes waiting", fmt_count(st, "auth.hash_waiting"), "");
    table_heading(&t, "Objects");
    const cJSON *objs = get(st, "objects");
    const cJSON *o;
    bool any = false;
    cJSON_ArrayForEach(o, objs)
    {
        if (o->string == NULL || !cJSON_IsNumber(o))
            continue;
        char label[80];
        snprintf(label, sizeof(label), "  %s", o->string);
        table_row(&t, label, fmt_count_d(o->valuedouble), "");
        any = true;
    }
    if (!any)
        table_row(&t, "  -", "-", "");
    table_print(&t, stdout);
}

/* The tenants waiting in a destination's queue, most first: "A 19,000
 * B 100 +2" (the two with most, and how many more); "-" when none. */
static const char *
fmt_tenants(const cJSON *d)
{
    const cJSON *arr = get(d, "tenants");
    double all = 0;
    if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) == 0)
        return "-";
    char *b = cell_buf();
    size_t len = 0;
    int shown = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, arr)
    {
        if (shown == 2)
            break;
        const cJSON *name = get(x, "tenant");
        const char *n = cJSON_IsString(name) ? name->valuestring : "(none)";
        len += (size_t)snprintf(b + len, 96 - len, "%s%.24s %s", shown ? " " : "", n,
                                fmt_count(x, "ready"));
        if (len >= 96)
            return b;
        shown++;
    }
    if (num(d, "tenants_waiting", &all) && all > shown)
        snprintf(b + len, 96 - len, " +%.0f", all - shown);
    for (char *p = b; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    return b;
}

/* The last failure's code and class: "451 rate_limited"; "-" for the
 * code when no server sent one (a DNS failure, a connect, a TLS
 * handshake, a check of sluice's: last_code null), "- dns_failure";
 * "-" when there was none. */
static const char *
fmt_last(const cJSON *d)
{
    const cJSON *cls = get(d, "last_class");
    double code;
    if (!cJSON_IsString(cls))
        return "-";
    char *b = cell_buf();
    if (num(d, "last_code", &code) && code > 0)
        snprintf(b, 96, "%.0f %.48s", code, cls->valuestring);
    else
        snprintf(b, 96, "- %.48s", cls->valuestring);
    for (char *p = b; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    return b;
}

void
render_domains(const cJSON *doc, size_t limit)
{
    struct table t;
    /* right: READY DEFERRED INFLIGHT PARKED CONN MAX RATE DELIVERED BOUNCED OLDEST */
    table_init(&t, 17, 0x7fe << 1);
    table_row(&t, "DOMAIN", "POOL", "READY", "DEFERRED", "INFLIGHT", "PARKED", "CONN", "MAX",
              "RATE/s", "DELIVERED", "BOUNCED", "OLDEST", "STATE", "TOP DEFERRAL", "LAST",
              "LIMITED BY", "TENANTS WAITING");
    const cJSON *arr = get(doc, "domains");
    const cJSON *d;
    size_t n = 0;
    cJSON_ArrayForEach(d, arr)
    {
        if (n++ >= limit)
            break;
        const cJSON *susp = get(d, "suspended"), *held = get(d, "held");
        const char *state = !cJSON_IsBool(susp)  ? "-"
                            : cJSON_IsTrue(susp) ? (cJSON_IsTrue(held) ? "suspended,held" : "suspended")
                            : cJSON_IsTrue(held) ? "held"
                            : cJSON_IsTrue(get(d, "resolving")) ? "resolving"
                                                                : "active";
        /* one meaning, before a restart and after: the class of most of
         * the recipients waiting deferred now (the spool keeps each one's
         * class; the engine sorts them, most first), not the deferrals
         * counted since the destination was made */
        char top[64] = "-";
        const cJSON *cls = get(d, "waiting_by_class");
        const cJSON *c0 = cJSON_IsObject(cls) ? cls->child : NULL;
        if (c0 != NULL && c0->string != NULL && cJSON_IsNumber(c0))
            snprintf(top, sizeof(top), "%s:%.0f", c0->string, c0->valuedouble);
        table_row(&t, fmt_str(d, "name"), fmt_str(d, "pool"), fmt_count(d, "ready"),
                  fmt_count(d, "deferred"), fmt_count(d, "inflight"), fmt_count(d, "parked"),
                  fmt_count(d, "connections"), fmt_count(d, "max_connections"),
                  fmt_rate(d, "rate_limit"), fmt_count(d, "delivered"), fmt_count(d, "bounced"),
                  fmt_duration(d, "oldest_age_ms"), state, top, fmt_last(d),
                  fmt_str(d, "limit_reason"), fmt_tenants(d));
    }
    table_print(&t, stdout);
    /* delivery off makes no destination: the mail waits in the queue,
     * and "(no destinations)" alone read as an empty queue */
    if (n == 0)
        printf("(no destinations%s)\n",
               cJSON_IsFalse(get(doc, "delivery_enabled"))
                   ? ": delivery is off ([delivery] enabled = no), the mail waits in the queue"
                   : "");
}

/* A generic answer (message, suspend, flush, ...): scalars as key/value
 * rows, nested objects flattened with dots, arrays of objects as tables. */
static bool
bytes_key(const char *k)
{
    size_t n = strlen(k);
    return strcmp(k, "size") == 0 || (n >= 5 && strcmp(k + n - 5, "bytes") == 0) ||
           (n >= 5 && strcmp(k + n - 5, "_size") == 0);
}

/* Is v under key a duration in ms (shown as one: "10m")? A time (Unix
 * ms, past 1e11) under an _ms key is not. */
static bool
duration_key(const char *key, const cJSON *v)
{
    size_t n = key != NULL ? strlen(key) : 0;
    return n > 3 && strcmp(key + n - 3, "_ms") == 0 && cJSON_IsNumber(v) && v->valuedouble < 1e11;
}

/* The label of key for people: a duration's key without its "_ms"
 * (for_ms 600000 reads "for  10m", not "for_ms  10m"), into buf. */
static const char *
label_of(const char *key, const cJSON *v, char *buf, size_t len)
{
    size_t n = strlen(key);
    if (duration_key(key, v))
        n -= 3;
    snprintf(buf, len, "%.*s", (int)n, key);
    return buf;
}

static const char *
fmt_scalar(const cJSON *v, const char *key)
{
    if (cJSON_IsNumber(v)) {
        if (key != NULL && bytes_key(key))
            return fmt_bytes_d(v->valuedouble);
        if (duration_key(key, v))
            return fmt_duration_d(v->valuedouble);
        return fmt_count_d(v->valuedouble);
    }
    if (cJSON_IsBool(v))
        return cJSON_IsTrue(v) ? "yes" : "no";
    if (cJSON_IsString(v)) {
        char *b = cell_buf();
        snprintf(b, 96, "%s", v->valuestring[0] ? v->valuestring : "-");
        for (char *p = b; *p != '\0'; p++)
            if ((unsigned char)*p < 0x20 || *p == 0x7f)
                *p = '?';
        return b;
    }
    return "-";
}

static void
flatten(struct table *kv, const cJSON *o, const char *prefix, const cJSON **arrays, size_t *narr)
{
    const cJSON *v;
    cJSON_ArrayForEach(v, o)
    {
        if (v->string == NULL || (prefix[0] == '\0' && strcmp(v->string, "ok") == 0))
            continue;
        char key[128];
        snprintf(key, sizeof(key), "%s%s", prefix, v->string);
        if (cJSON_IsObject(v)) {
            char p[130];
            snprintf(p, sizeof(p), "%s.", key);
            flatten(kv, v, p, arrays, narr);
        } else if (cJSON_IsArray(v) && cJSON_IsObject(v->child)) {
            if (*narr < 8)
                arrays[(*narr)++] = v;
        } else if (cJSON_IsArray(v)) {
            char joined[96] = "";
            const cJSON *e;
            size_t off = 0;
            cJSON_ArrayForEach(e, v)
            {
                off +=
                    (size_t)snprintf(joined + off, off < sizeof(joined) ? sizeof(joined) - off : 0,
                                     "%s%s", off ? ", " : "", fmt_scalar(e, NULL));
                if (off >= sizeof(joined))
                    break;
            }
            table_row(kv, key, joined[0] ? joined : "-");
        } else {
            char label[128];
            table_row(kv, label_of(key, v, label, sizeof(label)), fmt_scalar(v, v->string));
        }
    }
}

void
render_generic(const cJSON *doc)
{
    struct table kv;
    table_init(&kv, 2, 0);
    const cJSON *arrays[8];
    size_t narr = 0;
    flatten(&kv, doc, "", arrays, &narr);
    bool any = kv.nrows > 0;
    table_print(&kv, stdout);
    for (size_t i = 0; i < narr; i++) {
        /* columns: the scalar keys of the elements, in first-seen order */
        const char *cols[COLS_MAX];
        unsigned ncols = 0;
        const cJSON *e, *f;
        cJSON_ArrayForEach(e, arrays[i])
        {
            cJSON_ArrayForEach(f, e)
            {
                if (f->string == NULL || cJSON_IsObject(f) || cJSON_IsArray(f))
                    continue;
                bool seen = false;
                for (unsigned c = 0; c < ncols && !seen; c++)
                    seen = strcmp(cols[c], f->string) == 0;
                if (!seen && ncols < COLS_MAX)
                    cols[ncols++] = f->string;
            }
        }
        if (ncols == 0)
            continue;
        printf("%s%s:\n", any ? "\n" : "", arrays[i]->string);
        any = true;
        unsigned right = 0;
        struct table t;
        const cJSON *first = arrays[i]->child;
        for (unsigned c = 0; c < ncols; c++)
            if (cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(first, cols[c])))
                right |= 1u << c;
        table_init(&t, ncols, right);
        char upper[COLS_MAX][48];
        const char *hdr[COLS_MAX];
        for (unsigned c = 0; c < ncols; c++) {
            label_of(cols[c], cJSON_GetObjectItemCaseSensitive(first, cols[c]), upper[c],
                     sizeof(upper[c]));
            for (char *p = upper[c]; *p; p++)
                *p = *p >= 'a' && *p <= 'z' ? (char)(*p - 32) : *p == '_' ? ' ' : *p;
            hdr[c] = upper[c];
        }
        table_row_v(&t, hdr);
        cJSON_ArrayForEach(e, arrays[i])
        {
            const char *row[COLS_MAX];
            for (unsigned c = 0; c < ncols; c++) {
                const cJSON *v = cJSON_GetObjectItemCaseSensitive(e, cols[c]);
                row[c] = v != NULL ? fmt_scalar(v, cols[c]) : "-";
            }
            table_row_v(&t, row);
        }
        table_print(&t, stdout);
    }
    if (!any)
        printf("ok\n");
}
