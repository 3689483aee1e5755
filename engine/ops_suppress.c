/*
 * ops_suppress: the stats socket's "suppress" command (see ops_int.h for
 * the other files of ops, and doc/sluicectl.md): add, remove and check
 * entries of the suppression list (engine/suppress.h), list them a page at
 * a time, import and export CSV files, purge the expired entries. Scopes
 * are the list's business (suppress.h: folded to lowercase).
 *
 * Import and export use the file the client passed with the command
 * (SCM_RIGHTS: sluicectl opens it with its own rights, as postmap runs
 * as its user): sluice opens no path for whoever the socket's mode lets
 * in, which would read what only sluice may read (its DKIM keys: a line
 * of base64 looks like an address enough to be listed, and first_error
 * echoes one that is not) and create files where only sluice may write.
 * A path is opened by sluice only for root and sluice's own user, who
 * could open it themselves. A path with a blank comes quoted, as a
 * quoted local part does ("/tmp/list 2024.csv", \" and \\ inside).
 *
 * Threading: the stats thread.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/conf.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/auth_limit.h"
#include "engine/auth_pool.h"
#include "engine/delivery.h"
#include "engine/dkim_pool.h"
#include "engine/dlog.h"
#include "engine/events.h"
#include "engine/mta_sts.h"
#include "engine/ops_int.h"
#include "engine/resolver.h"
#include "engine/server.h"
#include "engine/shaping.h"
#include "engine/suppress.h"
#include "engine/warmup.h"
#include "queue/queue.h"

#define SUPPRESS_TTL_MAX_MS    (36500ULL * 86400 * 1000) /* a hundred years */
#define SUPPRESS_EXPIRES_MAX_S 253402300799ULL          /* 9999-12-31T23:59:59Z */

/* ---- the suppression list ---- */

/* The caller's uid for the log; -1: unknown. */
static long
who_uid(const struct stats_caller *who)
{
    return who->uid == STATS_UID_NONE ? -1L : (long)who->uid;
}

/* May who have sluice open a path for it: root, or sluice's own user? */
static bool
may_name_path(const struct stats_caller *who)
{
    return who->uid == 0 || who->uid == geteuid();
}

/* An import's stop (suppress_import_csv, between its transactions): the
 * daemon's stop began. ops_stop waits for this command before any worker
 * is told to stop; an import of a million lines held it for its whole
 * length. Not the drain: an import goes on while the workers drain. */
static bool
import_stop(void *arg)
{
    struct engine *e = arg;
    return atomic_load(&e->stopping);
}

/* End the message in err with " (file PATH)": after the counts, which
 * always arrive, PATH cut at its start when the whole would not fit
 * errlen (led by "...", at a character's start: its end, the file's own
 * name, is kept). A path is up to 4,096 octets, errlen 1,024 (stats_cmd):
 * put first, a path of 830 octets pushed an import's counts out, and one
 * of 1,000 the reason a file was refused (not found, not a regular
 * file): every error naming the file ends with it. */
static void
err_file(char *err, size_t errlen, const char *path)
{
    size_t used = strnlen(err, errlen), len = strlen(path);
    const size_t frame = sizeof(" (file )") - 1, cut = sizeof("...") - 1;
    if (used + frame + len < errlen) {
        snprintf(err + used, errlen - used, " (file %s)", path);
        return;
    }
    if (used + frame + cut + 1 >= errlen)
        return; /* not a character of it fits */
    const char *tail = path + len - (errlen - 1 - used - frame - cut);
    while (((unsigned char)*tail & 0xc0) == 0x80)
        tail++; /* a UTF-8 character's continuation: begun in the part cut */
    snprintf(err + used, errlen - used, " (file ...%s)", tail);
}

/* The file of "suppress import" (wr false) or "export" (wr true), as a
 * descriptor of its own (close-on-exec; the caller closes it): a dup of
 * the one the client passed, or, for root and sluice's own user alone,
 * word opened by sluice (export: created, never over an existing file;
 * one passed must be empty).
 * A regular file only: /dev/zero never ends (the command thread held,
 * and a stop, which waits for an import's read), a FIFO or socket may never be read
 * or drained; a FIFO named is opened without waiting for its writer.
 * -1 with the reason in err. */
static int
sup_file(const struct stats_caller *who, const char *sub, const char *word, bool wr, char *err,
         size_t errlen)
{
    int fd;
    if (who->fd >= 0) {
        fd = fcntl(who->fd, F_DUPFD_CLOEXEC, 3);
        int fl = fd >= 0 ? fcntl(fd, F_GETFL) : -1;
        if (fl < 0) {
            snprintf(err, errlen, "suppress %s: the file descriptor passed: %s", sub,
                     strerror(errno));
            if (fd >= 0)
                close(fd);
            return -1;
        }
        if ((fl & O_PATH) != 0 || (fl & O_ACCMODE) == (wr ? O_RDONLY : O_WRONLY)) {
            snprintf(err, errlen, "suppress %s: the file descriptor passed is not open for %s", sub,
                     wr ? "writing" : "reading");
            close(fd);
            return -1;
        }
    } else if (!may_name_path(who)) {
        log_msg(LOG_WARN,
                "event=suppress_path_refused by=operator uid=%ld command=%s file=%s "
                "note=a_path_without_the_file",
                who_uid(who), sub, word);
        snprintf(err, errlen,
                 "suppress %s: pass the file (sluicectl does): sluice opens a path itself only "
                 "for root and its own user",
                 sub);
        return -1;
    } else {
        if (word[0] != '/') {
            snprintf(err, errlen, "suppress: %s needs an absolute path (%s by sluice)", sub,
                     wr ? "written" : "read");
            return -1;
        }
        /* export: never over an existing file, not even for root's
         * request: the socket is no way to overwrite what sluice can */
        fd = wr ? open(word, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0640)
                : open(word, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) {
            snprintf(err, errlen, "suppress: %s", strerror(errno));
            err_file(err, errlen, word);
            return -1;
        }
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        snprintf(err, errlen, "suppress: %s", strerror(errno));
        err_file(err, errlen, word);
        close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "suppress: not a regular file");
        err_file(err, errlen, word);
        close(fd);
        return -1;
    }
    /* an export is never written over a file (the one sluice creates is
     * new): over one passed with content, written from its offset, it
     * would leave the old tail after its lines */
    if (wr && st.st_size != 0) {
        snprintf(err, errlen, "suppress export: the file passed is not empty");
        err_file(err, errlen, word);
        close(fd);
        return -1;
    }
    return fd;
}

static void
entry_json(struct json *out, const struct suppress_entry *x)
{
    json_obj_begin(out);
    json_kstr(out, "address", x->addr);
    json_kstr(out, "scope", x->scope);
    json_kstr(out, "reason", suppress_reason_str(x->reason));
    json_key(out, "added");
    json_time_ms(out, (uint64_t)x->added_ms);
    json_key(out, "expires");
    if (x->expires_ms != 0)
        json_time_ms(out, (uint64_t)x->expires_ms);
    else
        json_null(out);
    json_kstr(out, "note", x->note);
    json_obj_end(out);
}

struct list_last {
    struct json *out;
    struct suppress_entry last;
};

static int
list_keep(void *arg, const struct suppress_entry *x)
{
    struct list_last *l = arg;
    entry_json(l->out, x);
    l->last = *x;
    return 0;
}

/* The length of the word at p: up to the first blank, or, for an address
 * whose quoted local part holds blanks ("a b"@x.test, as RCPT takes it),
 * the first after its closing quote. */
static size_t
word_len(const char *p)
{
    size_t q = 0;
    for (size_t i = 1; p[0] == '"' && p[i] != '\0' && q == 0; i++) {
        if (p[i] == '\\' && p[i + 1] != '\0')
            i++;
        else if (p[i] == '"')
            q = i;
    }
    return q + strcspn(p + q, " \t");
}

/* The options after the address: scope=, reason=, ttl=, expires=, limit=,
 * after=, after_scope=, and note= (the rest of the line). */
struct sup_opts {
    char scope[SUPPRESS_SCOPE_MAX + 1];
    bool has_scope;
    char reason[32];
    char ttl[32];
    char expires[32];
    char after[SUPPRESS_ADDR_MAX + 1];
    char after_scope[SUPPRESS_SCOPE_MAX + 1];
    char limit[16];
    const char *note; /* borrowed: the rest of args */
};

static int
sup_opts_parse(const char *p, struct sup_opts *o, char *err, size_t errlen)
{
    memset(o, 0, sizeof(*o));
    while (*p != '\0') {
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '\0')
            break;
        if (strncmp(p, "note=", 5) == 0) {
            o->note = p + 5;
            break;
        }
        size_t kn = strcspn(p, "= \t");
        const char *eq = p[kn] == '=' ? p + kn : NULL;
        size_t n = eq != NULL ? kn + 1 + word_len(eq + 1) : kn; /* after= may be quoted */
        if (eq == NULL) {
            snprintf(err, errlen, "suppress: expected key=value, got \"%.*s\"", (int)(n > 40 ? 40 : n), p);
            return -1;
        }
        size_t kl = (size_t)(eq - p), vl = n - kl - 1;
        struct {
            const char *k;
            char *v;
            size_t cap;
        } keys[] = {{"scope", o->scope, sizeof(o->scope)},
                    {"reason", o->reason, sizeof(o->reason)},
                    {"ttl", o->ttl, sizeof(o->ttl)},
                    {"expires", o->expires, sizeof(o->expires)},
                    {"after", o->after, sizeof(o->after)},
                    {"after_scope", o->after_scope, sizeof(o->after_scope)},
                    {"limit", o->limit, sizeof(o->limit)}};
        bool found = false;
        for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
            if (strlen(keys[i].k) != kl || strncmp(keys[i].k, p, kl) != 0)
                continue;
            if (vl == 0 || vl >= keys[i].cap) {
                snprintf(err, errlen, "suppress: %s: empty or too long", keys[i].k);
                return -1;
            }
            memcpy(keys[i].v, eq + 1, vl);
            keys[i].v[vl] = '\0';
            found = true;
        }
        if (!found) {
            snprintf(err, errlen, "suppress: unknown option \"%.*s\"", (int)(kl > 30 ? 30 : kl), p);
            return -1;
        }
        p += n;
    }
    o->has_scope = o->scope[0] != '\0';
    return 0;
}

int
cmd_suppress(struct engine *e, const char *args, const struct stats_caller *who, struct json *out,
             char *err, size_t errlen)
{
    struct suppress *sup = e->suppress;
    if (sup == NULL) {
        snprintf(err, errlen, "suppress: the suppression list is off ([suppress] enabled = no)");
        return -1;
    }
    char sub[16], word[STATS_LINE_MAX];
    int used = 0;
    if (sscanf(args, "%15s%n", sub, &used) != 1) {
        snprintf(err, errlen, "usage: suppress add|remove|check|list|import|export|purge ...");
        return -1;
    }
    const char *rest = args + used;
    while (*rest == ' ' || *rest == '\t')
        rest++;
    bool file = strcmp(sub, "import") == 0 || strcmp(sub, "export") == 0;
    bool takes_word =
        strcmp(sub, "add") == 0 || strcmp(sub, "remove") == 0 || strcmp(sub, "check") == 0 || file;
    if (who->fd >= 0 && !file) {
        snprintf(err, errlen, "suppress %.15s: a file descriptor came with it, and it takes none",
                 sub);
        return -1;
    }
    word[0] = '\0';
    if (takes_word) {
        size_t n = word_len(rest);
        if (n == 0 || n >= sizeof(word)) {
            snprintf(err, errlen, "usage: suppress %s %s", sub, file ? "PATH" : "ADDRESS");
            return -1;
        }
        memcpy(word, rest, n);
        word[n] = '\0';
        rest += n;
        /* A file's path quoted (sluicectl quotes one with a blank, a
         * quote or a backslash, as a local part is: "/tmp/list 2024.csv")
         * names it unquoted. An absolute path never begins with a quote. */
        if (file && word[0] == '"') {
            size_t o = 0, i = 1;
            for (; word[i] != '\0' && word[i] != '"'; i++)
                word[o++] = word[i] == '\\' && word[i + 1] != '\0' ? word[++i] : word[i];
            if (word[i] != '"' || word[i + 1] != '\0') {
                snprintf(err, errlen, "suppress %s: a quoted PATH must end with its quote", sub);
                return -1;
            }
            if (o == 0) {
                snprintf(err, errlen, "suppress %s: missing PATH (an empty name)", sub);
                return -1;
            }
            word[o] = '\0';
        }
    }
    struct sup_opts o;
    if (sup_opts_parse(rest, &o, err, errlen) != 0)
        return -1;
    /* The scope as the list stores it, for the answer and the log: in
     * lowercase, as tenant names compare ("ACME" is [tenant Acme]'s list,
     * where RCPT looks and its complaints land, configured yet or not).
     * A name that is no scope is refused here, for every command: a check
     * of one would otherwise answer for the global list alone. */
    char folded[SUPPRESS_SCOPE_MAX + 1];
    const char *scope = NULL;
    if (o.has_scope) {
        if (suppress_normalize_scope(o.scope, folded, sizeof(folded)) != 0) {
            snprintf(err, errlen, "suppress: not a scope: %.*s", SUPPRESS_SCOPE_MAX, o.scope);
            return -1;
        }
        scope = folded;
    }
    int rc;
    if (strcmp(sub, "add") == 0) {
        enum suppress_reason reason = SUPPRESS_MANUAL;
        if (o.reason[0] != '\0' && suppress_reason_parse(o.reason, &reason) != 0) {
            snprintf(err, errlen, "suppress: reason is one of hard_bounce, complaint, "
                                  "unsubscribe, manual");
            return -1;
        }
        int64_t expires = 0;
        if (o.ttl[0] != '\0') {
            uint64_t ms;
            if (conf_parse_duration(o.ttl, &ms) != 0 || ms == 0) {
                snprintf(err, errlen, "suppress: ttl is a duration like 30d");
                return -1;
            }
            if (ms > SUPPRESS_TTL_MAX_MS) {
                /* the sum below would wrap, and the entry be refused as
                 * "not an address" */
                snprintf(err, errlen, "suppress: ttl is at most 36500d (none: for ever)");
                return -1;
            }
            expires = (int64_t)(clock_unix_ms() + ms);
        } else if (o.expires[0] != '\0') {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(o.expires, &end, 10);
            if (errno != 0 || *end != '\0' || v == 0 || v > SUPPRESS_EXPIRES_MAX_S) {
                snprintf(err, errlen, "suppress: expires is Unix seconds, before the year 10000");
                return -1;
            }
            expires = (int64_t)v * 1000;
        }
        rc = suppress_add(sup, scope, word, reason, expires, o.note ? o.note : "operator");
        if (rc < 0) {
            snprintf(err, errlen, "suppress: %s: %s", word,
                     rc == -EINVAL   ? "not an address, domain or scope"
                     : rc == -EILSEQ ? "not UTF-8 (a recipient's address is: none would match it)"
                                     : strerror(-rc));
            return -1;
        }
        log_msg(LOG_NOTICE, "event=suppress_added by=operator address=<%s> scope=%s reason=%s",
                word, scope ? scope : SUPPRESS_SCOPE_GLOBAL, suppress_reason_str(reason));
        char norm[SUPPRESS_ADDR_MAX + 2];
        suppress_normalize(sup, word, norm, sizeof(norm));
        json_obj_begin(out);
        json_kstr(out, "added", norm);
        json_kstr(out, "scope", scope ? scope : SUPPRESS_SCOPE_GLOBAL);
        json_obj_end(out);
        return 0;
    }
    if (strcmp(sub, "remove") == 0) {
        rc = suppress_remove(sup, scope, word);
        if (rc < 0) {
            snprintf(err, errlen, "suppress: %s: %s", word,
                     rc == -ENOENT   ? "not on the list"
                     : rc == -EINVAL ? "not an address, domain or scope"
                                     : strerror(-rc));
            return -1;
        }
        log_msg(LOG_NOTICE, "event=suppress_removed by=operator address=<%s> scope=%s", word,
                scope ? scope : SUPPRESS_SCOPE_GLOBAL);
        json_obj_begin(out);
        json_kstr(out, "removed", word);
        json_obj_end(out);
        return 0;
    }
    if (strcmp(sub, "check") == 0) {
        struct suppress_entry x;
        rc = suppress_check(sup, scope, word, &x);
        if (rc < 0) {
            snprintf(err, errlen, "suppress: %s", strerror(-rc));
            return -1;
        }
        json_obj_begin(out);
        json_kstr(out, "address", word);
        json_kbool(out, "suppressed", rc == 1);
        if (rc == 1) {
            json_key(out, "entry");
            entry_json(out, &x);
        }
        json_obj_end(out);
        return 0;
    }
    if (strcmp(sub, "list") == 0) {
        unsigned long limit = 100;
        if (o.limit[0] != '\0') {
            char *end;
            limit = strtoul(o.limit, &end, 10);
            if (*end != '\0' || limit == 0 || limit > 1000) {
                snprintf(err, errlen, "suppress: limit is 1 to 1000");
                return -1;
            }
        }
        struct list_last l = {.out = out};
        json_obj_begin(out);
        json_key(out, "entries");
        json_arr_begin(out);
        long n = suppress_list(sup, scope, o.after_scope[0] ? o.after_scope : NULL,
                               o.after[0] ? o.after : NULL, limit, list_keep, &l);
        json_arr_end(out);
        if (n < 0) {
            snprintf(err, errlen, "suppress: %s", strerror((int)-n));
            return -1;
        }
        /* where the next page starts; null: this was the last */
        json_key(out, "next");
        if ((unsigned long)n == limit) {
            json_obj_begin(out);
            json_kstr(out, "after", l.last.addr);
            json_kstr(out, "after_scope", l.last.scope);
            json_obj_end(out);
        } else {
            json_null(out);
        }
        json_obj_end(out);
        return 0;
    }
    if (strcmp(sub, "import") == 0) {
        int fd = sup_file(who, sub, word, false, err, errlen);
        if (fd < 0)
            return -1;
        FILE *f = fdopen(fd, "r");
        if (f == NULL) {
            snprintf(err, errlen, "suppress: %s", strerror(errno));
            err_file(err, errlen, word);
            close(fd);
            return -1;
        }
        uint64_t t0 = clock_mono_ms();
        struct suppress_import_result r;
        rc = suppress_import_csv(sup, f, import_stop, e, &r);
        fclose(f);
        uint64_t ms = clock_mono_ms() - t0;
        if (rc == -ECANCELED) {
            /* not_imported counted once the file is read and sorted
             * whole; cut before, none of it was written: "all" */
            char left[24] = "all";
            if (r.counted)
                snprintf(left, sizeof(left), "%llu", (unsigned long long)r.not_imported);
            /* the file last: a long path cut off the log line (2,048
             * octets, truncated=1) takes none of the counts with it */
            log_msg(LOG_WARN,
                    "event=suppress_import by=operator uid=%ld lines=%llu imported=%llu "
                    "not_imported=%s skipped=%llu ms=%llu cut=stopping "
                    "note=run_the_same_import_again_to_complete_it passed=%s file=%s",
                    who_uid(who), (unsigned long long)r.lines, (unsigned long long)r.imported, left,
                    (unsigned long long)r.skipped, (unsigned long long)ms,
                    who->fd >= 0 ? "yes" : "no", word);
            if (r.counted)
                snprintf(err, errlen,
                         "suppress: import cut by sluice's stop after %llu lines read: %llu "
                         "entries imported (the first in scope and address order), %llu not; "
                         "run the same import again to complete it",
                         (unsigned long long)r.lines, (unsigned long long)r.imported,
                         (unsigned long long)r.not_imported);
            else
                snprintf(err, errlen,
                         "suppress: import cut by sluice's stop while the file was read or "
                         "sorted, after %llu lines read: nothing imported; run the same import "
                         "again",
                         (unsigned long long)r.lines);
            err_file(err, errlen, word);
            return -1;
        }
        log_msg(rc < 0 ? LOG_ERR : LOG_NOTICE,
                "event=suppress_import by=operator uid=%ld lines=%llu imported=%llu "
                "skipped=%llu ms=%llu%s%s passed=%s file=%s",
                who_uid(who), (unsigned long long)r.lines, (unsigned long long)r.imported,
                (unsigned long long)r.skipped, (unsigned long long)ms, rc < 0 ? " err=" : "",
                rc < 0 ? strerror(-rc) : "", who->fd >= 0 ? "yes" : "no", word);
        if (rc < 0) {
            snprintf(err, errlen, "suppress: import failed after %llu entries: %s",
                     (unsigned long long)r.imported, strerror(-rc));
            err_file(err, errlen, word);
            return -1;
        }
        json_obj_begin(out);
        json_ku64(out, "lines", r.lines);
        json_ku64(out, "imported", r.imported);
        json_ku64(out, "skipped", r.skipped);
        if (r.first_bad_line != 0)
            json_kstr(out, "first_error", r.first_error);
        json_ku64(out, "ms", ms);
        json_obj_end(out);
        return 0;
    }
    if (strcmp(sub, "export") == 0) {
        int fd = sup_file(who, sub, word, true, err, errlen);
        if (fd < 0)
            return -1;
        FILE *f = fdopen(fd, "w");
        if (f == NULL) {
            snprintf(err, errlen, "suppress: %s", strerror(errno));
            err_file(err, errlen, word);
            close(fd);
            return -1;
        }
        long n = suppress_export_csv(sup, f, scope);
        if (fclose(f) != 0 && n >= 0)
            n = -EIO;
        log_msg(n < 0 ? LOG_ERR : LOG_NOTICE,
                "event=suppress_export by=operator uid=%ld file=%s passed=%s scope=%s "
                "exported=%ld%s%s",
                who_uid(who), word, who->fd >= 0 ? "yes" : "no", scope ? scope : "all",
                n < 0 ? 0 : n, n < 0 ? " err=" : "", n < 0 ? strerror((int)-n) : "");
        if (n < 0) {
            snprintf(err, errlen, "suppress: export failed: %s", strerror((int)-n));
            err_file(err, errlen, word);
            return -1;
        }
        json_obj_begin(out);
        json_ku64(out, "exported", (uint64_t)n);
        json_kstr(out, "path", word);
        json_obj_end(out);
        return 0;
    }
    if (strcmp(sub, "purge") == 0) {
        long n = suppress_purge(sup, (int64_t)clock_unix_ms());
        if (n < 0) {
            snprintf(err, errlen, "suppress: %s", strerror((int)-n));
            return -1;
        }
        json_obj_begin(out);
        json_ku64(out, "purged", (uint64_t)n);
        json_obj_end(out);
        return 0;
    }
    snprintf(err, errlen, "usage: suppress add|remove|check|list|import|export|purge ...");
    return -1;
}
