/*
 * sluicectl_suppress: "suppress add|remove|check|list|import|export|purge":
 * options become the socket's key=value words; import and export open
 * their file here with the caller's rights (an export's made with
 * O_EXCL, never over a file) and pass it to sluice with the line, its
 * path quoted when it has a blank (the path only names the file there).
 *
 * Threading: one thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tools/sluicectl_int.h"

/* ---- suppress ---- */

#define SUPPRESS_BULK_TIMEOUT_MS (30u * 60 * 1000) /* import and export of millions */

static void
render_entries(struct table *t, const cJSON *arr)
{
    const cJSON *d;
    cJSON_ArrayForEach(d, arr)
    {
        table_row(t, fmt_str(d, "address"), fmt_str(d, "scope"), fmt_str(d, "reason"),
                  fmt_str(d, "added"), fmt_str(d, "expires"), fmt_str(d, "note"));
    }
}

/* Append to the command line being built in line[cap], whose first *n
 * octets are written: the suppress command's words are long (an absolute
 * path may be PATH_MAX octets) and snprintf returns the length it would
 * have written, so the end is checked before every word, never after. */
static void line_add(char *line, size_t cap, int *n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void
line_add(char *line, size_t cap, int *n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int w = (size_t)*n < cap ? vsnprintf(line + *n, cap - (size_t)*n, fmt, ap) : -1;
    va_end(ap);
    if (w < 0 || (size_t)w >= cap - (size_t)*n)
        die(EXIT_USAGE, "suppress: the command is longer than %zu octets", cap - 1);
    *n += w;
}

/* Append an import's or export's absolute path, which only names the
 * file passed with the line (sluice's log and answer): blanks, quotes and
 * backslashes quoted as a local part's are (sluice unquotes it), since
 * the line's words are separated by blanks and a file named "list
 * 2024.csv" was refused. A line cannot carry a control character. */
static void
add_path(char *line, size_t cap, int *n, const char *sub, const char *arg, const char *path)
{
    char q[2 * PATH_MAX + 3];
    size_t o = 0;
    bool quote = false;
    for (const unsigned char *p = (const unsigned char *)path; *p != '\0'; p++) {
        if (*p < ' ' || *p == 0x7f)
            die(EXIT_USAGE,
                "suppress %s: %s: a file name with a control character cannot be named to "
                "sluice, please rename it",
                sub, arg);
        quote = quote || *p == ' ' || *p == '"' || *p == '\\';
        if (*p == '"' || *p == '\\')
            q[o++] = '\\';
        q[o++] = (char)*p;
    }
    q[o] = '\0';
    line_add(line, cap, n, quote ? " \"%s\"" : " %s", q);
}

/* "suppress SUB ...": options become the socket's key=value words. */
int
run_suppress(struct ctl *c, const struct cmd *cmd, int argc, char **argv)
{
    const char *sub = argv[0];
    char line[LINE_MAX_OCTETS];
    int n = snprintf(line, sizeof(line), "suppress %s", sub);
    bool word = strcmp(sub, "add") == 0 || strcmp(sub, "remove") == 0 ||
                strcmp(sub, "check") == 0 || strcmp(sub, "import") == 0 ||
                strcmp(sub, "export") == 0;
    bool list = strcmp(sub, "list") == 0;
    if (!word && !list && strcmp(sub, "purge") != 0)
        die(EXIT_USAGE, "suppress: unknown subcommand \"%s\" (try: sluicectl suppress --help)",
            sub);
    int i = 1;
    if (word) {
        bool file = sub[0] == 'i' || sub[0] == 'e';
        /* an empty FILE ("$LIST" unset) is none: export said "FILE is a
         * directory", import "cannot open : No such file or directory" */
        bool empty = file && argc >= 2 && argv[1][0] == '\0';
        if (argc < 2 || argv[1][0] == '-' || empty)
            die(EXIT_USAGE, "suppress %s: missing %s%s", sub, file ? "FILE" : "ADDRESS",
                empty ? " (an empty name)" : "");
        char path[PATH_MAX + 1];
        const char *w = argv[1];
        if (strcmp(sub, "import") == 0) {
            /* opened here, with the caller's rights, and passed to sluice;
             * a regular file only (a FIFO opened without waiting for a
             * writer, then refused): /dev/zero or a FIFO may never end.
             * Exit 1 as when sluice opened it and refused. */
            int fd = open(argv[1], O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
            struct stat st;
            if (fd < 0 || fstat(fd, &st) != 0)
                die(EXIT_REFUSED, "suppress import: cannot open %s: %s", argv[1], strerror(errno));
            if (!S_ISREG(st.st_mode))
                die(EXIT_REFUSED, "suppress import: %s: not a regular file", argv[1]);
            /* its absolute path names it in sluice's log and answer */
            if (realpath(argv[1], path) == NULL)
                die(EXIT_USAGE, "suppress import: %s: %s", argv[1], strerror(errno));
            w = path;
            c->pass_fd = fd;
            c->timeout_ms = SUPPRESS_BULK_TIMEOUT_MS;
        } else if (strcmp(sub, "export") == 0) {
            char dir[PATH_MAX + 1], tmp[PATH_MAX + 1];
            snprintf(tmp, sizeof(tmp), "%s", argv[1]);
            char *slash = strrchr(tmp, '/');
            const char *base = slash ? slash + 1 : tmp;
            if (slash == tmp)
                snprintf(dir, sizeof(dir), "/");
            else if (slash != NULL) {
                *slash = '\0';
                if (realpath(tmp, dir) == NULL)
                    die(EXIT_USAGE, "suppress export: %s: %s", tmp, strerror(errno));
            } else if (realpath(".", dir) == NULL) {
                die(EXIT_USAGE, "suppress export: .: %s", strerror(errno));
            }
            if (base[0] == '\0')
                die(EXIT_USAGE, "suppress export: FILE is a directory");
            if (snprintf(path, sizeof(path), "%s/%s", strcmp(dir, "/") == 0 ? "" : dir, base) >=
                (int)sizeof(path))
                die(EXIT_USAGE, "suppress export: path too long");
            w = path;
            c->timeout_ms = SUPPRESS_BULK_TIMEOUT_MS;
        } else if (w[0] == '\0' || strlen(w) > 255) {
            die(EXIT_USAGE, "suppress: ADDRESS must be 1 to 255 octets");
        }
        if (w == path) {
            add_path(line, sizeof(line), &n, sub, argv[1], path);
        } else {
            /* blanks only in a quoted local part ("a b"@x.test), as RCPT
             * takes them */
            const char *qend = NULL;
            for (const char *p = w + 1; w[0] == '"' && *p != '\0' && qend == NULL; p++) {
                if (*p == '\\' && p[1] != '\0')
                    p++;
                else if (*p == '"')
                    qend = p;
            }
            for (const unsigned char *p = (const unsigned char *)w; *p != '\0'; p++)
                if ((*p <= ' ' || *p == 0x7f) && !(*p == ' ' && (const char *)p < qend))
                    die(EXIT_USAGE,
                        "suppress %s: no spaces (but in a quoted local part: "
                        "\"a b\"@example.com) or control characters, please",
                        sub);
            line_add(line, sizeof(line), &n, " %s", w);
        }
        i = 2;
    }
    const char *note = NULL;
    long limit = 0; /* list: every entry, page by page */
    for (; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        const char *key = strcmp(o, "--scope") == 0    ? "scope"
                          : strcmp(o, "--reason") == 0 ? "reason"
                          : strcmp(o, "--ttl") == 0    ? "ttl"
                          : strcmp(o, "--note") == 0   ? "note"
                          : strcmp(o, "--limit") == 0  ? "limit"
                                                       : NULL;
        if (key == NULL || v == NULL)
            die(EXIT_USAGE, "suppress %s: %s \"%s\" (try: sluicectl suppress --help)", sub,
                key == NULL ? "unknown option" : "missing value for", o);
        i++;
        if (strcmp(key, "note") == 0) {
            note = v;
            continue;
        }
        if (strcmp(key, "limit") == 0) {
            limit = parse_number("suppress list --limit", v, 1, 100000000);
            continue;
        }
        check_word("suppress", o, v);
        line_add(line, sizeof(line), &n, " %s=%s", key, v);
    }
    if (note != NULL) {
        for (const unsigned char *p = (const unsigned char *)note; *p != '\0'; p++)
            if (*p < ' ' || *p == 0x7f)
                die(EXIT_USAGE, "suppress: --note may not hold control characters");
        line_add(line, sizeof(line), &n, " note=%s", note);
    }
    if (strcmp(sub, "export") == 0) {
        /* made here, with the caller's rights, never over a file (as
         * sluice did), once sluice is reached: an unreachable sluice
         * leaves no empty file behind */
        if (c->fd < 0)
            ctl_connect(c);
        /* a signal in between is held until made is whole and its
         * handler in place: it then removes the file */
        sigset_t old;
        made_signals(true, &old);
        int fd = open(argv[1], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0640);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0)
            die(EXIT_REFUSED, "suppress export: cannot create %s: %s", argv[1], strerror(errno));
        c->pass_fd = fd;
        made.dev = st.st_dev;
        made.ino = st.st_ino;
        if (snprintf(made.path, sizeof(made.path), "%s", argv[1]) >= (int)sizeof(made.path))
            made.path[0] = '\0'; /* cannot be: open() took it */
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = on_signal_made;
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGHUP, &sa, NULL);
        made_signals(false, &old);
    }
    if (!list) {
        const char *raw;
        cJSON *doc = ctl_ask(c, line, &raw);
        /* answered ok: the export is whole, whatever comes next (a
         * signal from now on leaves it) */
        sigset_t old;
        made_signals(true, &old);
        made.path[0] = '\0';
        made_signals(false, &old);
        if (c->json) {
            printf("%s\n", raw);
        } else if (strcmp(sub, "check") == 0) {
            const cJSON *e = get(doc, "entry");
            if (cJSON_IsTrue(get(doc, "suppressed")))
                printf("%s: suppressed by %s (scope %s, %s, added %s, expires %s): %s\n",
                       fmt_str(doc, "address"), fmt_str(e, "address"), fmt_str(e, "scope"),
                       fmt_str(e, "reason"), fmt_str(e, "added"), fmt_str(e, "expires"),
                       fmt_str(e, "note"));
            else
                printf("%s: not suppressed\n", fmt_str(doc, "address"));
        } else {
            render_generic(doc);
        }
        cJSON_Delete(doc);
        return EXIT_OK;
    }
    /* list: pages of up to 1000, each after the last one shown */
    struct table t;
    table_init(&t, 6, 0);
    if (!c->json)
        table_row(&t, "ADDRESS", "SCOPE", "REASON", "ADDED", "EXPIRES", "NOTE");
    char after[400] = "", after_scope[80] = "";
    long shown = 0;
    for (;;) {
        long want = limit == 0 || limit - shown > 1000 ? 1000 : limit - shown;
        char req[LINE_MAX_OCTETS];
        int m = 0;
        line_add(req, sizeof(req), &m, "%s limit=%ld", line, want);
        if (after[0] != '\0')
            line_add(req, sizeof(req), &m, " after=%s after_scope=%s", after, after_scope);
        const char *raw;
        cJSON *doc = ctl_ask(c, req, &raw);
        if (c->json) {
            printf("%s\n", raw);
        } else {
            /* printed as each page comes: a list of millions was held
             * whole, and nothing shown, until its last page */
            render_entries(&t, get(doc, "entries"));
            table_flush(&t, stdout);
        }
        fflush(stdout);
        shown += cJSON_GetArraySize(get(doc, "entries"));
        const cJSON *next = get(doc, "next");
        bool more = cJSON_IsObject(next) && cJSON_IsString(get(next, "after")) &&
                    cJSON_IsString(get(next, "after_scope")) && (limit == 0 || shown < limit);
        if (more) {
            snprintf(after, sizeof(after), "%s", get(next, "after")->valuestring);
            snprintf(after_scope, sizeof(after_scope), "%s", get(next, "after_scope")->valuestring);
        }
        cJSON_Delete(doc);
        if (!more || ferror(stdout)) /* the reader gone: no page more (main says why) */
            break;
    }
    if (!c->json) {
        table_print(&t, stdout);
        if (shown == 0)
            printf("(no entries)\n");
    }
    (void)cmd;
    return EXIT_OK;
}
