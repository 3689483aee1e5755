/*
 * suppress_csv: the suppression list's CSV import and export (see
 * suppress.h: suppress_import_csv, suppress_export_csv). An import is
 * read by records (RFC 4180: a quoted field may go on over lines; a
 * UTF-8 byte order mark at the start is skipped; a line is read up to
 * CSV_RECORD_MAX octets, a longer one is in error), parsed whole into an
 * arena, sorted (in runs, then merged), then written in transactions of
 * IMPORT_BATCH entries (appended when they come after the last key
 * stored), the caller's stop asked while the file is read, while it is
 * sorted, and before each transaction (a stop of the daemon ends an
 * import there); an export is a walk of the list (suppress_list).
 *
 * Threading: any thread at once (suppress.h); an import's writes take the
 * list's writer mutex, one transaction at a time.
 */
#include "engine/suppress.h"
#include "engine/suppress_int.h"

#include <ctype.h>
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"

/* ---- CSV ---- */

/* Split line (NUL-terminated, no newline) into up to max fields in place,
 * RFC 4180 quoting. Returns the number of fields, or -1 (bad quoting). */
static int
csv_split(char *line, char **f, int max)
{
    int n = 0;
    char *p = line;
    for (;;) {
        if (n == max)
            return n; /* more fields than wanted: the rest is ignored */
        if (*p == '"') {
            char *w = ++p;
            f[n++] = w;
            for (;;) {
                if (*p == '\0')
                    return -1;
                if (*p == '"') {
                    if (p[1] == '"') {
                        *w++ = '"';
                        p += 2;
                        continue;
                    }
                    p++;
                    break;
                }
                *w++ = *p++;
            }
            *w = '\0';
            if (*p == '\0')
                return n;
            if (*p != ',')
                return -1;
            p++;
        } else {
            f[n++] = p;
            char *c = strchr(p, ',');
            if (c == NULL)
                return n;
            *c = '\0';
            p = c + 1;
        }
    }
}

#define CSV_RECORD_MAX 65536 /* octets of one record over several lines, and of one line */
#define CSV_FIELDS     6     /* address,scope,reason,added,expires,note: the rest is not read */

/* One line of in into *buf (malloc'd, grown as needed, at most
 * CSV_RECORD_MAX + 2 octets: the caller frees it), its newline kept and
 * a NUL after it, as getline(3) does; its length, or -1 at the end. A
 * longer line is read to its end but not kept (*cut true, its start
 * kept): getline would hold a whole line, and a file of one line of a
 * gigabyte (no newline at all) had sluice allocate as much. A line ends
 * at LF, CRLF or a CR alone (Excel for Mac's "CSV (Macintosh)": read as
 * one line, such a file was one bad address). */
static ssize_t
csv_getline(char **buf, size_t *cap, FILE *in, bool *cut)
{
    size_t n = 0;
    int c = EOF;
    *cut = false;
    while ((c = getc_unlocked(in)) != EOF) {
        if (n < CSV_RECORD_MAX) {
            if (n + 2 > *cap) {
                size_t nc = *cap < 256 ? 256 : *cap * 2;
                nc = nc > CSV_RECORD_MAX + 2 ? CSV_RECORD_MAX + 2 : nc;
                char *b = realloc(*buf, nc);
                if (b == NULL)
                    return -2;
                *buf = b;
                *cap = nc;
            }
            (*buf)[n++] = (char)c;
        } else {
            *cut = true;
        }
        if (c == '\r') {
            int next = getc_unlocked(in);
            if (next == '\n')
                c = next; /* CRLF: the CR stands for both (stripped alike) */
            else if (next != EOF)
                ungetc(next, in);
            break;
        }
        if (c == '\n')
            break;
    }
    if (n == 0 && c == EOF)
        return -1;
    (*buf)[n] = '\0';
    return (ssize_t)n;
}

/* Whether a quoted field is open after the n octets at p, read as
 * csv_split reads them, from quoted (whether one was open before p) and
 * start (whether p starts a field): a quote opens a field only at its
 * start (a quote inside an unquoted field is text), and two in a row
 * inside are one. *field (when not NULL) counts the fields begun, from
 * 0 at p: the open one's index at the end. */
static bool
quotes_open(const char *p, size_t n, bool quoted, bool start, unsigned *field)
{
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (quoted) {
            if (c == '"' && i + 1 < n && p[i + 1] == '"')
                i++;
            else if (c == '"')
                quoted = false;
        } else if (start && c == '"') {
            quoted = true;
            start = false;
        } else {
            start = c == ',';
            if (start && field != NULL)
                (*field)++;
        }
    }
    return quoted;
}

/* "" -> dflt; digits: Unix seconds; else ISO 8601 UTC. Unix ms out. */
static int
parse_time(const char *t, int64_t dflt, int64_t *out)
{
    if (*t == '\0') {
        *out = dflt;
        return 0;
    }
    bool digits = true;
    for (const char *p = t; *p != '\0'; p++)
        digits = digits && isdigit((unsigned char)*p);
    if (digits) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(t, &end, 10);
        if (errno != 0 || v > 100000000000ULL)
            return -EINVAL;
        *out = (int64_t)v * 1000;
        return 0;
    }
    struct tm tm = {0};
    int used = 0;
    if (sscanf(t, "%4d-%2d-%2dT%2d:%2d:%2dZ%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
               &tm.tm_min, &tm.tm_sec, &used) != 6 ||
        used != (int)strlen(t) || tm.tm_mon < 1 || tm.tm_mon > 12 || tm.tm_mday < 1 ||
        tm.tm_mday > 31 || tm.tm_hour > 23 || tm.tm_min > 59 || tm.tm_sec > 60)
        return -EINVAL;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    time_t x = timegm(&tm);
    if (x < 0)
        return -EINVAL;
    *out = (int64_t)x * 1000;
    return 0;
}

/* Records of an import: an arena of [u16 klen][u16 vlen][key][value]. */
struct arena {
    uint8_t *buf; /* owned */
    size_t len, cap;
    size_t *off;  /* owned: one per record */
    size_t n, ncap;
};

static int
arena_push(struct arena *a, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    size_t need = 4 + kl + vl;
    if (a->len + need > a->cap) {
        size_t nc = a->cap ? a->cap * 2 : 1 << 20;
        while (nc < a->len + need)
            nc *= 2;
        uint8_t *b = realloc(a->buf, nc);
        if (b == NULL)
            return -ENOMEM;
        a->buf = b;
        a->cap = nc;
    }
    if (a->n == a->ncap) {
        size_t nc = a->ncap ? a->ncap * 2 : 65536;
        size_t *o = realloc(a->off, nc * sizeof(*o));
        if (o == NULL)
            return -ENOMEM;
        a->off = o;
        a->ncap = nc;
    }
    uint16_t k16 = (uint16_t)kl, v16 = (uint16_t)vl;
    uint8_t *p = a->buf + a->len;
    memcpy(p, &k16, 2);
    memcpy(p + 2, &v16, 2);
    memcpy(p + 4, k, kl);
    memcpy(p + 4 + kl, v, vl);
    a->off[a->n++] = a->len;
    a->len += need;
    return 0;
}

static void
arena_rec(const struct arena *a, size_t i, MDB_val *k, MDB_val *v)
{
    const uint8_t *p = a->buf + a->off[i];
    uint16_t k16, v16;
    memcpy(&k16, p, 2);
    memcpy(&v16, p + 2, 2);
    k->mv_size = k16;
    k->mv_data = (void *)(p + 4);
    v->mv_size = v16;
    v->mv_data = (void *)(p + 4 + k16);
}

/* LMDB's default order: memcmp, then the shorter first. */
static int
key_cmp(const MDB_val *a, const MDB_val *b)
{
    size_t n = a->mv_size < b->mv_size ? a->mv_size : b->mv_size;
    int c = memcmp(a->mv_data, b->mv_data, n);
    if (c != 0)
        return c;
    return a->mv_size < b->mv_size ? -1 : a->mv_size > b->mv_size ? 1 : 0;
}

static int
off_cmp(const void *x, const void *y, void *arg)
{
    const size_t *a = x, *b = y;
    MDB_val ka, kb;
    const uint8_t *base = ((const struct arena *)arg)->buf;
    uint16_t l;
    memcpy(&l, base + *a, 2);
    ka.mv_size = l;
    ka.mv_data = (void *)(base + *a + 4);
    memcpy(&l, base + *b, 2);
    kb.mv_size = l;
    kb.mv_data = (void *)(base + *b + 4);
    int c = key_cmp(&ka, &kb);
    if (c != 0)
        return c;
    return *a < *b ? -1 : *a > *b ? 1 : 0; /* stable: the later line wins below */
}

/* Records sorted at once between two looks at the import's stop, and
 * merged between two: qsort_r of a whole file held a stop for its whole
 * length (2 million records: a second, three under load, for a file in
 * no order). */
#define SORT_RUN 65536

struct sort_look {
    bool (*stop)(void *arg); /* NULL: never */
    void *arg;
    size_t placed; /* records sorted or merged since the last look */
};

/* Whether the stop came, asked once SORT_RUN records were placed. */
static inline bool
sort_stop(struct sort_look *l, size_t placed)
{
    l->placed += placed;
    if (l->stop == NULL || l->placed < SORT_RUN)
        return false;
    l->placed = 0;
    return l->stop(l->arg);
}

static bool
same_key(const struct arena *a, size_t off1, size_t off2)
{
    MDB_val k1, k2;
    uint16_t l;
    memcpy(&l, a->buf + off1, 2);
    k1.mv_size = l;
    k1.mv_data = (void *)(a->buf + off1 + 4);
    memcpy(&l, a->buf + off2, 2);
    k2.mv_size = l;
    k2.mv_data = (void *)(a->buf + off2 + 4);
    return key_cmp(&k1, &k2) == 0;
}

/* Sort the arena's records by key (off_cmp: equal keys in line order),
 * looking at the stop every SORT_RUN records placed: runs of SORT_RUN
 * sorted by qsort_r, then merged two by two. *keys: the distinct keys
 * (each counted once however many lines name it), counted in the last
 * merge (without memory for the merge, one qsort_r of the whole, the
 * stop not looked at). 0, or -ECANCELED (the stop: the order is then no
 * order, and nothing may be written from it). */
static int
arena_sort(struct arena *a, bool (*stop)(void *arg), void *arg, uint64_t *keys)
{
    struct sort_look l = {stop, arg, 0};
    size_t n = a->n;
    *keys = 0;
    for (size_t i = 0; i < n; i += SORT_RUN) {
        size_t m = n - i < SORT_RUN ? n - i : SORT_RUN;
        qsort_r(a->off + i, m, sizeof(*a->off), off_cmp, a);
        if (sort_stop(&l, SORT_RUN))
            return -ECANCELED;
    }
    if (n <= SORT_RUN) {
        for (size_t i = 0; i < n; i++)
            *keys += i == 0 || !same_key(a, a->off[i - 1], a->off[i]);
        return 0;
    }
    size_t *src = a->off, *dst = malloc(n * sizeof(*dst));
    if (dst == NULL) {
        /* No room for the merge's second array: one sort of the whole, as
         * before the runs (glibc's qsort_r finds room of its own or sorts
         * in place), the stop not looked at meanwhile: slower to stop,
         * not a failed import. */
        qsort_r(a->off, n, sizeof(*a->off), off_cmp, a);
        for (size_t i = 0; i < n; i++)
            *keys += i == 0 || !same_key(a, a->off[i - 1], a->off[i]);
        return 0;
    }
    int rc = 0;
    for (size_t w = SORT_RUN; w < n && rc == 0; w *= 2) {
        bool last = w >= n - w; /* one merge of the two halves: the last */
        for (size_t lo = 0; lo < n && rc == 0; lo += 2 * w) {
            size_t mid = n - lo > w ? lo + w : n, hi = n - lo > 2 * w ? lo + 2 * w : n;
            size_t i = lo, j = mid;
            for (size_t o = lo; o < hi; o++) {
                size_t x =
                    j >= hi || (i < mid && off_cmp(&src[i], &src[j], a) < 0) ? src[i++] : src[j++];
                if (last)
                    *keys += o == 0 || !same_key(a, dst[o - 1], x);
                dst[o] = x;
                if (sort_stop(&l, 1)) {
                    rc = -ECANCELED;
                    break;
                }
            }
        }
        size_t *t = src;
        src = dst;
        dst = t;
    }
    /* the sorted offsets in src; the other array freed */
    if (src != a->off) {
        a->off = src;
        a->ncap = n;
    }
    free(dst);
    return rc;
}

static int
import_line(struct suppress *s, char *line, int64_t now, struct arena *a, char *why, size_t wl)
{
    char *f[CSV_FIELDS] = {0};
    int nf = csv_split(line, f, CSV_FIELDS);
    if (nf < 1 || f[0][0] == '\0') {
        snprintf(why, wl, "%s", nf < 0 ? "bad quoting" : "no address");
        return nf < 0 ? -EBADMSG : -EINVAL;
    }
    /* An address in another encoding (Latin-1, Windows-1252: a
     * spreadsheet's export) was stored as its octets, which no recipient
     * given in UTF-8 (SMTPUTF8) matches: listed, and never refused. */
    if (!sup_utf8_text(f[0])) {
        snprintf(why, wl, "address not UTF-8 (save the file as UTF-8)");
        return -EINVAL;
    }
    char scope[SUPPRESS_SCOPE_MAX + 1];
    enum suppress_reason reason = SUPPRESS_MANUAL;
    if (nf > 2 && f[2][0] != '\0' && suppress_reason_parse(f[2], &reason) != 0) {
        snprintf(why, wl, "unknown reason");
        return -EINVAL;
    }
    int64_t added, expires;
    if (parse_time(nf > 3 ? f[3] : "", now, &added) != 0 ||
        parse_time(nf > 4 ? f[4] : "", 0, &expires) != 0) {
        snprintf(why, wl, "bad time (ISO 8601 UTC or Unix seconds)");
        return -EINVAL;
    }
    char norm[SUPPRESS_ADDR_MAX + 2];
    if (sup_scope_fold(nf > 1 && f[1][0] != '\0' ? f[1] : NULL, scope) != 0) {
        snprintf(why, wl, "bad scope");
        return -EINVAL;
    }
    if (sup_normalize(&s->cfg, f[0], norm, sizeof(norm)) != 0 || strlen(norm) > SUPPRESS_ADDR_MAX ||
        sup_storable(norm) != 0) {
        snprintf(why, wl, "bad address");
        return -EINVAL;
    }
    uint8_t kb[KEY_MAX], vb[VAL_MAX];
    size_t kl = sup_key_make(kb, scope, norm);
    size_t vl = sup_val_make(vb, reason, added, expires, nf > 5 ? f[5] : NULL);
    return arena_push(a, kb, kl, vb, vl);
}

/* Write records [from, to) of the sorted arena in one transaction. */
static int
import_batch(struct suppress *s, const struct arena *a, size_t from, size_t to)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = sup_cursor_open(s, 0, &txn, &cur);
    if (rc != 0)
        return rc;
    /* MDB_APPEND when the batch's first key comes after the last stored. */
    MDB_val lk, lv, k, v;
    arena_rec(a, from, &k, &v);
    rc = mdb_cursor_get(cur, &lk, &lv, MDB_LAST);
    bool append = rc == MDB_NOTFOUND || (rc == 0 && key_cmp(&lk, &k) < 0);
    rc = 0;
    size_t n = 0;
    for (size_t i = from; i < to && rc == 0; i++) {
        arena_rec(a, i, &k, &v);
        if (i + 1 < to) { /* duplicates: the later line wins */
            MDB_val k2, v2;
            arena_rec(a, i + 1, &k2, &v2);
            if (key_cmp(&k, &k2) == 0)
                continue;
        }
        rc = mdb_cursor_put(cur, &k, &v, append ? MDB_APPEND : 0);
        n++;
    }
    mdb_cursor_close(cur);
    if (rc != 0) {
        mdb_txn_abort(txn);
        return sup_mdb_errno(rc);
    }
    if ((rc = mdb_txn_commit(txn)) != 0)
        return sup_mdb_errno(rc);
    atomic_fetch_add(&s->added, n);
    return 0;
}

/* Lines read between two looks at the import's stop (a record over
 * several lines may carry the next look a few lines on). */
#define IMPORT_STOP_LINES 65536

int
suppress_import_csv(struct suppress *s, FILE *in, bool (*stop)(void *arg), void *arg,
                    struct suppress_import_result *res)
{
    memset(res, 0, sizeof(*res));
    struct arena a = {0};
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int64_t now = (int64_t)clock_unix_ms();
    int rc = 0;
    char *more = NULL;
    size_t more_cap = 0;
    bool cut;
    /* The next look at the stop: at the first record that starts at or
     * past this line. Not lines % IMPORT_STOP_LINES == 0 there: the lines
     * of a record over several go by in the loop of its own below, and
     * records of two lines each never started at an even line. */
    uint64_t look_at = IMPORT_STOP_LINES;
    while ((len = csv_getline(&line, &cap, in, &cut)) >= 0) {
        res->lines++;
        if (stop != NULL && res->lines >= look_at) {
            look_at = res->lines + IMPORT_STOP_LINES;
            if (stop(arg)) {
                rc = -ECANCELED; /* nothing written */
                res->lines--;    /* this line not taken */
                break;
            }
        }
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        /* A UTF-8 byte order mark (a spreadsheet's export) is not part of
         * the first field: it made the header a bad line, and the first
         * address of a file without one unknown. */
        if (res->lines == 1 && len >= 3 && memcmp(line, "\xef\xbb\xbf", 3) == 0) {
            memmove(line, line + 3, (size_t)len - 2);
            len -= 3;
        }
        if (len == 0 || line[0] == '#')
            continue;
        /* A quoted field may hold line breaks (RFC 4180): while a quote
         * is open, the record goes on at the next line, up to
         * CSV_RECORD_MAX octets (tried below: one that is no record was
         * a stray quote). */
        uint64_t first = res->lines;
        bool nul = memchr(line, '\0', (size_t)len) != NULL, long_line = cut;
        unsigned field = 0;
        bool open = !nul && !cut && quotes_open(line, (size_t)len, false, true, &field);
        if (field >= CSV_FIELDS)
            open = false; /* in a column not read (csv_split stops at the 6th) */
        off_t back = open ? ftello(in) : -1;
        while (open && !nul && (size_t)len < CSV_RECORD_MAX) {
            ssize_t ml = csv_getline(&more, &more_cap, in, &cut);
            if (ml == -2)
                rc = -ENOMEM;
            if (ml < 0)
                break;
            res->lines++;
            if (cut) {
                long_line = true; /* read again alone: it is in error there */
                break;
            }
            while (ml > 0 && (more[ml - 1] == '\n' || more[ml - 1] == '\r'))
                more[--ml] = '\0';
            nul = memchr(more, '\0', (size_t)ml) != NULL;
            if ((size_t)len + 1 + (size_t)ml + 1 > cap) {
                size_t ncap = (size_t)len + 1 + (size_t)ml + 1;
                char *p = realloc(line, ncap);
                if (p == NULL) {
                    rc = -ENOMEM;
                    break;
                }
                line = p;
                cap = ncap;
            }
            line[len++] = '\n';
            memcpy(line + len, more, (size_t)ml + 1);
            len += ml;
            open = quotes_open(more, (size_t)ml, true, false, NULL);
        }
        if (rc == -ENOMEM)
            break;
        if (first == 1 && !long_line && strncasecmp(line, "address,", 8) == 0)
            continue;
        char why[100];
        if (first == 1 && len >= 2 && ((uint8_t)line[0] == 0xff || (uint8_t)line[0] == 0xfe) &&
            (uint8_t)line[1] == ((uint8_t)line[0] ^ 1)) {
            /* a UTF-16 byte order mark: every line would be a "NUL octet" */
            snprintf(why, sizeof(why), "UTF-16 (save the file as UTF-8)");
            rc = -EINVAL;
        } else if (long_line) {
            snprintf(why, sizeof(why), "a line over %d octets", CSV_RECORD_MAX);
            rc = res->lines > first ? -EBADMSG : -EINVAL;
        } else if (nul) {
            snprintf(why, sizeof(why), "NUL octet");
            rc = res->lines > first ? -EBADMSG : -EINVAL; /* in a later line: read again */
        } else {
            rc = import_line(s, line, now, &a, why, sizeof(why));
        }
        if (rc == -EBADMSG && res->lines > first && back >= 0 &&
            fseeko(in, back, SEEK_SET) == 0) {
            /* Not a record over several lines after all (a stray quote:
             * never closed, or closed by another stray one): its first
             * line alone is in error, and the lines after it are read
             * again as records of their own. A record that was one but
             * failed otherwise (an unknown reason) is skipped whole. */
            res->lines = first;
            snprintf(why, sizeof(why), "bad quoting (a quote left open)");
        }
        if (rc == -ENOMEM)
            break;
        if (rc != 0) {
            res->skipped++;
            if (res->first_bad_line == 0) {
                res->first_bad_line = first; /* a record's first line */
                snprintf(res->first_error, sizeof(res->first_error), "line %llu: %s",
                         (unsigned long long)first, why);
            }
            rc = 0;
        }
    }
    if (len == -2 && rc == 0)
        rc = -ENOMEM;
    free(line);
    free(more);
    if (rc == 0 && ferror(in))
        rc = -EIO;
    if (rc == 0)
        rc = arena_sort(&a, stop, arg, &res->entries);
    res->counted = rc == 0; /* cut before: nothing written, the entries not all known */
    if (rc == 0 && a.n > 0) {
        for (size_t from = 0; from < a.n && rc == 0;) {
            if (stop != NULL && stop(arg)) {
                res->not_imported = res->entries - res->imported;
                rc = -ECANCELED;
                break;
            }
            size_t to = from + IMPORT_BATCH < a.n ? from + IMPORT_BATCH : a.n;
            /* keep equal keys in one batch, so that the later line wins */
            while (to < a.n) {
                MDB_val k1, v1, k2, v2;
                arena_rec(&a, to - 1, &k1, &v1);
                arena_rec(&a, to, &k2, &v2);
                if (key_cmp(&k1, &k2) != 0)
                    break;
                to++;
            }
            pthread_mutex_lock(&s->wlock);
            rc = import_batch(s, &a, from, to);
            pthread_mutex_unlock(&s->wlock);
            if (rc == 0) {
                for (size_t i = from; i < to; i++) {
                    if (i + 1 < to) {
                        MDB_val k1, v1, k2, v2;
                        arena_rec(&a, i, &k1, &v1);
                        arena_rec(&a, i + 1, &k2, &v2);
                        if (key_cmp(&k1, &k2) == 0)
                            continue;
                    }
                    res->imported++;
                }
            }
            from = to;
        }
    }
    free(a.buf);
    free(a.off);
    if (res->imported > 0) {
        pthread_mutex_lock(&s->flock);
        s->warm = true;
        pthread_cond_signal(&s->fcv);
        pthread_mutex_unlock(&s->flock);
    }
    return rc;
}

static void
csv_field(FILE *out, const char *s)
{
    if (strpbrk(s, ",\"\r\n") == NULL) {
        fputs(s, out);
        return;
    }
    fputc('"', out);
    for (; *s != '\0'; s++) {
        if (*s == '"')
            fputc('"', out);
        fputc(*s, out);
    }
    fputc('"', out);
}

static void
iso_time(int64_t ms, char *out, size_t outlen)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, outlen, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static int
export_one(void *arg, const struct suppress_entry *e)
{
    FILE *out = arg;
    char added[32], expires[32] = "";
    iso_time(e->added_ms, added, sizeof(added));
    if (e->expires_ms != 0)
        iso_time(e->expires_ms, expires, sizeof(expires));
    csv_field(out, e->addr);
    fputc(',', out);
    csv_field(out, e->scope);
    fprintf(out, ",%s,%s,%s,", suppress_reason_str(e->reason), added, expires);
    csv_field(out, e->note);
    fputc('\n', out);
    return ferror(out) ? -1 : 0;
}

long
suppress_export_csv(struct suppress *s, FILE *out, const char *scope)
{
    fputs("address,scope,reason,added,expires,note\n", out);
    long n = suppress_list(s, scope, NULL, NULL, 0, export_one, out);
    if (n >= 0 && (fflush(out) != 0 || ferror(out)))
        return -EIO;
    return n;
}
