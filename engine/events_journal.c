/*
 * events_journal: see events_journal.h. This file owns the segment
 * files, the node id and the cursor files of one journal directory.
 *
 * The segment table (j->segs, oldest first) and the durable end are
 * under j->mu; the appending thread alone writes the last segment, and
 * publishes what it fsynced by moving its length under the mutex.
 * Readers pread from descriptors of their own, so a segment that is
 * trimmed while a reader holds it open stays readable until it closes.
 */
#include "engine/events_journal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/fs.h"
#include "common/log.h"

#define SCAN_CHUNK (1024u * 1024)

struct seg {
    struct journal_pos start;
    uint64_t len; /* durable octets */
};

struct journal {
    char *dir; /* owned */
    char id[17];

    pthread_mutex_t mu; /* guards segs, nsegs, cap, end_seq, segment_max */
    size_t segment_max;
    struct seg *segs;   /* owned: oldest first, never empty */
    unsigned nsegs, cap;
    uint64_t end_seq; /* the seq after the last durable line */

    int fd; /* appending thread: the last segment, O_WRONLY */
};

static void
seg_path(const struct journal *j, const struct journal_pos *start, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s/%016" PRIx64 "-%016" PRIx64 ".seg", j->dir, start->off, start->seq);
}

static int
seg_push(struct journal *j, const struct journal_pos *start, uint64_t len)
{
    if (j->nsegs == j->cap) {
        unsigned cap = j->cap ? j->cap * 2 : 16;
        struct seg *s = realloc(j->segs, cap * sizeof(*s));
        if (s == NULL)
            return -ENOMEM;
        j->segs = s;
        j->cap = cap;
    }
    j->segs[j->nsegs++] = (struct seg){*start, len};
    return 0;
}

/* By offset, then by number: of two segments at one offset (below),
 * the one numbered higher comes last. */
static int
seg_cmp(const void *a, const void *b)
{
    const struct seg *x = a, *y = b;
    if (x->start.off != y->start.off)
        return x->start.off < y->start.off ? -1 : 1;
    return x->start.seq < y->start.seq ? -1 : x->start.seq > y->start.seq;
}

static int
load_id(struct journal *j)
{
    char path[PATH_MAX], text[40];
    snprintf(path, sizeof(path), "%s/id", j->dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, text, sizeof(text) - 1);
        close(fd);
        if (n >= 16) {
            memcpy(j->id, text, 16);
            j->id[16] = '\0';
            if (strspn(j->id, "0123456789abcdef") == 16)
                return 0;
        }
        return -EINVAL;
    }
    if (errno != ENOENT)
        return -errno;
    uint64_t r = 0;
    if (getrandom(&r, sizeof(r), 0) != (ssize_t)sizeof(r))
        return -EIO;
    snprintf(j->id, sizeof(j->id), "%016" PRIx64, r);
    snprintf(text, sizeof(text), "%s\n", j->id);
    return fs_write_atomic(j->dir, "id", text, strlen(text));
}

/*
 * Scan the last segment: count its whole lines and cut what follows the
 * last good one (a part line, or a line holding NUL octets: blocks the
 * file system allocated but a crash left unwritten).
 */
static int
scan_tail(struct journal *j, struct seg *s)
{
    char path[PATH_MAX];
    seg_path(j, &s->start, path, sizeof(path));
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    char *buf = malloc(SCAN_CHUNK);
    if (buf == NULL) {
        close(fd);
        return -ENOMEM;
    }
    uint64_t off = 0, good = 0, lines = 0;
    bool bad = false;
    for (;;) {
        ssize_t n = pread(fd, buf, SCAN_CHUNK, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int rc = -errno;
            free(buf);
            close(fd);
            return rc;
        }
        if (n == 0)
            break;
        for (ssize_t i = 0; i < n && !bad; i++) {
            if (buf[i] == '\0') {
                bad = true;
            } else if (buf[i] == '\n') {
                lines++;
                good = off + (uint64_t)i + 1;
            }
        }
        if (bad)
            break;
        off += (uint64_t)n;
    }
    free(buf);
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size > good) {
        log_msg(LOG_WARN, "event=events_journal_torn_tail segment=%s cut_bytes=%" PRIu64, path,
                (uint64_t)st.st_size - good);
        if (ftruncate(fd, (off_t)good) < 0 || fsync(fd) < 0)
            rc = -errno;
    }
    close(fd);
    s->len = good;
    j->end_seq = s->start.seq + lines;
    return rc;
}

static int
open_fail(char *err, size_t errlen, int rc, const char *what, const char *path)
{
    if (err != NULL && errlen > 0)
        snprintf(err, errlen, "event journal %s: %s: %s", path, what, strerror(-rc));
    return rc;
}

static struct seg *
last_seg(struct journal *j)
{
    return &j->segs[j->nsegs - 1];
}

/* Create the segment that starts at start and make it the one appended
 * to (appending thread, or open). */
static int
seg_create(struct journal *j, const struct journal_pos *start)
{
    char path[PATH_MAX];
    seg_path(j, start, path, sizeof(path));
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0)
        return -errno;
    int rc = fs_fsync_dir(j->dir);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    pthread_mutex_lock(&j->mu);
    rc = seg_push(j, start, 0);
    pthread_mutex_unlock(&j->mu);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    if (j->fd >= 0)
        close(j->fd);
    j->fd = fd;
    return 0;
}

/*
 * Two segments at one offset: a crash inside journal_skip_to of a build
 * before it renamed (it made the new segment, then deleted the empty
 * one it replaced) left both. The one numbered higher is the skip's;
 * the other is empty and goes, else the table would hold two entries
 * for one offset, and a trim would delete the file being appended to
 * under the name of the other. Sorted table; returns 0 or -errno.
 */
static int
drop_replaced(struct journal *j, char *err, size_t errlen)
{
    unsigned i = 0, dropped = 0;
    while (i + 1 < j->nsegs) {
        struct seg *s = &j->segs[i];
        if (s->start.off != j->segs[i + 1].start.off) {
            i++;
            continue;
        }
        char path[PATH_MAX];
        seg_path(j, &s->start, path, sizeof(path));
        if (s->len != 0)
            return open_fail(err, errlen, -EINVAL,
                             "another segment starts at the same offset as this one, which is "
                             "not empty",
                             path);
        if (unlink(path) < 0 && errno != ENOENT)
            return open_fail(err, errlen, -errno, "cannot delete (replaced, empty)", path);
        log_msg(LOG_WARN,
                "event=events_journal_replaced_segment segment=%s next_seq=%" PRIu64
                " note=deleted_empty_left_by_a_crash",
                path, j->segs[i + 1].start.seq);
        memmove(s, s + 1, (j->nsegs - i - 1) * sizeof(*s));
        j->nsegs--;
        dropped++;
    }
    return dropped > 0 ? fs_fsync_dir(j->dir) : 0;
}

void
journal_set_segment_max(struct journal *j, size_t segment_max)
{
    pthread_mutex_lock(&j->mu);
    j->segment_max = segment_max ? segment_max : JOURNAL_SEGMENT_DEFAULT;
    pthread_mutex_unlock(&j->mu);
}

int
journal_open(const char *dir, size_t segment_max, struct journal **out, char *err, size_t errlen)
{
    *out = NULL;
    struct journal *j = calloc(1, sizeof(*j));
    if (j == NULL || (j->dir = strdup(dir)) == NULL) {
        free(j);
        return open_fail(err, errlen, -ENOMEM, "cannot open", dir);
    }
    j->fd = -1;
    j->segment_max = segment_max ? segment_max : JOURNAL_SEGMENT_DEFAULT;
    pthread_mutex_init(&j->mu, NULL);
    int rc = 0;
    if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
        rc = open_fail(err, errlen, -errno, "cannot create directory", dir);
        goto fail;
    }
    if ((rc = load_id(j)) < 0) {
        open_fail(err, errlen, rc, "cannot read or make its id file", dir);
        goto fail;
    }
    DIR *dh = opendir(dir);
    if (dh == NULL) {
        rc = open_fail(err, errlen, -errno, "cannot read directory", dir);
        goto fail;
    }
    struct dirent *de;
    while ((de = readdir(dh)) != NULL) {
        uint64_t off, seq;
        char tail[8];
        if (strlen(de->d_name) != 37 ||
            sscanf(de->d_name, "%16" SCNx64 "-%16" SCNx64 "%7s", &off, &seq, tail) != 3 ||
            strcmp(tail, ".seg") != 0)
            continue;
        char path[PATH_MAX];
        struct stat st;
        snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
        if (stat(path, &st) < 0)
            continue;
        struct journal_pos p = {off, seq};
        if ((rc = seg_push(j, &p, (uint64_t)st.st_size)) < 0) {
            closedir(dh);
            open_fail(err, errlen, rc, "cannot open", dir);
            goto fail;
        }
    }
    closedir(dh);
    if (j->nsegs == 0) {
        struct journal_pos zero = {0, 0};
        if ((rc = seg_create(j, &zero)) < 0) {
            open_fail(err, errlen, rc, "cannot create a segment", dir);
            goto fail;
        }
    } else {
        qsort(j->segs, j->nsegs, sizeof(j->segs[0]), seg_cmp);
        if ((rc = drop_replaced(j, err, errlen)) < 0)
            goto fail;
        if ((rc = scan_tail(j, last_seg(j))) < 0) {
            open_fail(err, errlen, rc, "cannot check the last segment", dir);
            goto fail;
        }
        char path[PATH_MAX];
        seg_path(j, &last_seg(j)->start, path, sizeof(path));
        if ((j->fd = open(path, O_WRONLY | O_CLOEXEC)) < 0) {
            rc = open_fail(err, errlen, -errno, "cannot open the last segment", dir);
            goto fail;
        }
    }
    *out = j;
    return 0;
fail:
    journal_close(j);
    return rc;
}

struct journal *
journal_close(struct journal *j)
{
    if (j == NULL)
        return NULL;
    if (j->fd >= 0)
        close(j->fd);
    pthread_mutex_destroy(&j->mu);
    free(j->segs);
    free(j->dir);
    free(j);
    return NULL;
}

const char *
journal_id(const struct journal *j)
{
    return j->id;
}

static uint64_t
lines_in(const char *p, size_t n)
{
    uint64_t c = 0;
    const char *e = p + n;
    while (p < e && (p = memchr(p, '\n', (size_t)(e - p))) != NULL) {
        c++;
        p++;
    }
    return c;
}

int
journal_append(struct journal *j, const struct iovec *iov, unsigned n)
{
    size_t total = 0;
    uint64_t lines = 0;
    for (unsigned i = 0; i < n; i++) {
        total += iov[i].iov_len;
        lines += lines_in(iov[i].iov_base, iov[i].iov_len);
    }
    if (total == 0)
        return 0;
    pthread_mutex_lock(&j->mu);
    struct seg cur = *last_seg(j);
    size_t segment_max = j->segment_max;
    pthread_mutex_unlock(&j->mu);
    if (cur.len >= segment_max) {
        struct journal_pos end;
        journal_end(j, &end);
        int rc = seg_create(j, &end);
        if (rc < 0)
            return rc;
        cur.start = end;
        cur.len = 0;
    }
    uint64_t at = cur.len;
    unsigned i = 0;
    size_t skip = 0;
    while (i < n) {
        struct iovec v[64];
        unsigned k = 0;
        for (unsigned t = i; t < n && k < 64; t++, k++) {
            v[k].iov_base = (char *)iov[t].iov_base + (t == i ? skip : 0);
            v[k].iov_len = iov[t].iov_len - (t == i ? skip : 0);
        }
        ssize_t w = pwritev(j->fd, v, (int)k, (off_t)at);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int rc = w < 0 ? -errno : -EIO;
            if (ftruncate(j->fd, (off_t)cur.len) < 0) {
                /* the durable length is unchanged: readers stop before it */
            }
            return rc;
        }
        at += (uint64_t)w;
        size_t left = (size_t)w;
        while (left > 0 && i < n) {
            size_t room = iov[i].iov_len - skip;
            if (left >= room) {
                left -= room;
                i++;
                skip = 0;
            } else {
                skip += left;
                left = 0;
            }
        }
    }
    if (fdatasync(j->fd) < 0) {
        int rc = -errno;
        if (ftruncate(j->fd, (off_t)cur.len) < 0) {
            /* as above */
        }
        return rc;
    }
    pthread_mutex_lock(&j->mu);
    struct seg *s = last_seg(j);
    s->len = at;
    j->end_seq += lines;
    pthread_mutex_unlock(&j->mu);
    return 0;
}

int
journal_skip_to(struct journal *j, uint64_t seq)
{
    struct journal_pos end;
    journal_end(j, &end);
    if (seq <= end.seq)
        return 0;
    pthread_mutex_lock(&j->mu);
    struct seg last = *last_seg(j);
    pthread_mutex_unlock(&j->mu);
    struct journal_pos start = {end.off, seq};
    char path[PATH_MAX], old[PATH_MAX];
    seg_path(j, &start, path, sizeof(path));
    seg_path(j, &last.start, old, sizeof(old));
    int rc;
    if (last.len == 0) {
        /* An empty last segment would share its offset with the new one:
         * it takes the new name (nobody read anything from it), in one
         * step, so that no crash leaves both on disk (journal_open would
         * take either for the last). j->fd stays: the same file. */
        if (rename(old, path) < 0)
            return -errno;
        pthread_mutex_lock(&j->mu);
        last_seg(j)->start = start;
        j->end_seq = seq;
        pthread_mutex_unlock(&j->mu);
        if ((rc = fs_fsync_dir(j->dir)) < 0)
            return rc; /* renamed all the same: either name is the segment */
    } else {
        int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0640);
        if (fd < 0)
            return -errno;
        rc = fs_fsync_dir(j->dir);
        if (rc == 0) {
            pthread_mutex_lock(&j->mu);
            rc = seg_push(j, &start, 0);
            if (rc == 0)
                j->end_seq = seq;
            pthread_mutex_unlock(&j->mu);
        }
        if (rc < 0) {
            /* Not left on disk: past the offset where the last segment
             * goes on, a restart would take it for the last. */
            close(fd);
            unlink(path);
            return rc;
        }
        close(j->fd);
        j->fd = fd;
    }
    log_msg(LOG_WARN,
            "event=events_journal_skip from_seq=%" PRIu64 " to_seq=%" PRIu64
            " note=numbers_missing_from_the_spool",
            end.seq, seq);
    return 0;
}

void
journal_end(struct journal *j, struct journal_pos *end)
{
    pthread_mutex_lock(&j->mu);
    const struct seg *s = last_seg(j);
    end->off = s->start.off + s->len;
    end->seq = j->end_seq;
    pthread_mutex_unlock(&j->mu);
}

void
journal_begin(struct journal *j, struct journal_pos *begin)
{
    pthread_mutex_lock(&j->mu);
    *begin = j->segs[0].start;
    pthread_mutex_unlock(&j->mu);
}

uint64_t
journal_bytes(struct journal *j)
{
    pthread_mutex_lock(&j->mu);
    uint64_t n = 0;
    for (unsigned i = 0; i < j->nsegs; i++)
        n += j->segs[i].len;
    pthread_mutex_unlock(&j->mu);
    return n;
}

/* The segment holding pos (moving pos to the next segment's start when
 * it is at the end of a full one, or to the first one when before it),
 * and the octets readable there. mu held. */
static const struct seg *
seg_at_locked(struct journal *j, struct journal_pos *pos, uint64_t *avail)
{
    if (pos->off < j->segs[0].start.off)
        *pos = j->segs[0].start;
    unsigned i = j->nsegs - 1;
    while (i > 0 && j->segs[i].start.off > pos->off)
        i--;
    for (;;) {
        const struct seg *s = &j->segs[i];
        uint64_t end = s->start.off + s->len;
        if (pos->off < end || i + 1 == j->nsegs) {
            /* at a segment's start: its numbers (they may jump, see
             * journal_skip_to) */
            if (pos->off == s->start.off && pos->seq < s->start.seq)
                pos->seq = s->start.seq;
            *avail = end > pos->off ? end - pos->off : 0;
            return s;
        }
        i++;
        *pos = j->segs[i].start;
    }
}

long
journal_read(struct journal *j, struct journal_pos *pos, char *buf, size_t cap, int *fd,
             uint64_t *fd_seg, uint64_t *skipped)
{
    for (int tries = 0; tries < 8; tries++) {
        uint64_t avail;
        pthread_mutex_lock(&j->mu);
        struct seg s = *seg_at_locked(j, pos, &avail);
        pthread_mutex_unlock(&j->mu);
        if (avail == 0)
            return 0;
        if (*fd >= 0 && *fd_seg != s.start.off) {
            close(*fd);
            *fd = -1;
        }
        if (*fd < 0) {
            char path[PATH_MAX];
            seg_path(j, &s.start, path, sizeof(path));
            *fd = open(path, O_RDONLY | O_CLOEXEC);
            if (*fd < 0) {
                if (errno == ENOENT)
                    continue; /* trimmed meanwhile: pos now lies before the first */
                return -errno;
            }
            *fd_seg = s.start.off;
        }
        size_t want = avail < cap ? (size_t)avail : cap;
        ssize_t n;
        do
            n = pread(*fd, buf, want, (off_t)(pos->off - s.start.off));
        while (n < 0 && errno == EINTR);
        if (n < 0)
            return -errno;
        if (n == 0)
            return 0;
        const char *nl = memrchr(buf, '\n', (size_t)n);
        if (nl != NULL)
            return (long)(nl - buf + 1);
        /* No line ends in what was read: a line longer than cap, or
         * octets without a newline up to the segment's durable end (a
         * segment damaged on disk: appends write whole lines). Skip to
         * the next newline within the segment, or to its end. */
        uint64_t at = pos->off - s.start.off + (uint64_t)n;
        bool found = false;
        while (at < s.len && !found) {
            size_t w = s.len - at < cap ? (size_t)(s.len - at) : cap;
            do
                n = pread(*fd, buf, w, (off_t)at);
            while (n < 0 && errno == EINTR);
            if (n < 0)
                return -errno;
            if (n == 0)
                break; /* the file is shorter than its length: as its end */
            nl = memchr(buf, '\n', (size_t)n);
            at += nl != NULL ? (uint64_t)(nl - buf + 1) : (uint64_t)n;
            found = nl != NULL;
        }
        if (found) {
            pos->off = s.start.off + at;
            pos->seq++;
            (*skipped)++;
            log_msg(LOG_ERR, "event=events_journal_line_skipped reason=longer_than_buffer cap=%zu",
                    cap);
            continue;
        }
        /* The segment ends inside a line: read on from the next segment,
         * under its numbers; the numbers passed are events lost. */
        char path[PATH_MAX];
        seg_path(j, &s.start, path, sizeof(path));
        uint64_t from = pos->seq, cut = s.start.off + s.len - pos->off;
        pos->off = s.start.off + s.len;
        pthread_mutex_lock(&j->mu);
        seg_at_locked(j, pos, &avail);
        pthread_mutex_unlock(&j->mu);
        uint64_t lost = pos->seq > from ? pos->seq - from : 0;
        *skipped += lost;
        log_msg(LOG_ERR,
                "event=events_journal_corrupt segment=%s bytes=%" PRIu64 " events=%" PRIu64
                " note=no_newline_before_segment_end",
                path, cut, lost);
    }
    return 0;
}

bool
journal_name_valid(const char *name)
{
    size_t n = strlen(name);
    return n > 0 && n <= JOURNAL_NAME_MAX &&
           strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") == n &&
           name[0] != '.';
}

int
journal_cursor_load(struct journal *j, const char *name, struct journal_pos *pos,
                    uint64_t *lost)
{
    if (lost != NULL)
        *lost = 0;
    if (!journal_name_valid(name))
        return -EINVAL;
    struct journal_pos begin, end;
    journal_begin(j, &begin);
    journal_end(j, &end);
    *pos = begin;
    char path[PATH_MAX], text[80];
    snprintf(path, sizeof(path), "%s/cursor.%s", j->dir, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -errno;
    ssize_t n = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    text[n] = '\0';
    uint64_t off, seq;
    if (sscanf(text, "%" SCNu64 " %" SCNu64, &off, &seq) != 2)
        return 0;
    /* Outside the journal (a journal made anew under an old cursor):
     * from the beginning. Before it: the segments were trimmed, and
     * the events in them are lost to this cursor. */
    if (off > end.off || seq > end.seq)
        return 0;
    if (off < begin.off) {
        if (lost != NULL && begin.seq > seq)
            *lost = begin.seq - seq;
        return 0;
    }
    pos->off = off;
    pos->seq = seq;
    return 0;
}

bool
journal_cursor_exists(struct journal *j, const char *name)
{
    char path[PATH_MAX];
    if (!journal_name_valid(name))
        return false;
    snprintf(path, sizeof(path), "%s/cursor.%s", j->dir, name);
    return access(path, F_OK) == 0;
}

int
journal_cursor_store(struct journal *j, const char *name, const struct journal_pos *pos)
{
    if (!journal_name_valid(name))
        return -EINVAL;
    char file[JOURNAL_NAME_MAX + 16], text[80];
    snprintf(file, sizeof(file), "cursor.%s", name);
    int n = snprintf(text, sizeof(text), "%" PRIu64 " %" PRIu64 "\n", pos->off, pos->seq);
    return fs_write_atomic(j->dir, file, text, (size_t)n);
}

unsigned
journal_trim(struct journal *j, const struct journal_pos *keep)
{
    unsigned gone = 0;
    pthread_mutex_lock(&j->mu);
    while (j->nsegs > 1 && j->segs[1].start.off <= keep->off) {
        char path[PATH_MAX];
        seg_path(j, &j->segs[0].start, path, sizeof(path));
        if (unlink(path) < 0 && errno != ENOENT) {
            log_msg(LOG_ERR, "event=events_journal_trim_failed segment=%s err=\"%s\"", path,
                    strerror(errno));
            break;
        }
        memmove(&j->segs[0], &j->segs[1], (j->nsegs - 1) * sizeof(j->segs[0]));
        j->nsegs--;
        gone++;
    }
    pthread_mutex_unlock(&j->mu);
    return gone;
}

void
journal_pos_within(struct journal *j, uint64_t max_bytes, struct journal_pos *out)
{
    pthread_mutex_lock(&j->mu);
    const struct seg *last = last_seg(j);
    uint64_t end = last->start.off + last->len;
    unsigned i = 0;
    while (i + 1 < j->nsegs && end - j->segs[i].start.off > max_bytes)
        i++;
    *out = j->segs[i].start;
    pthread_mutex_unlock(&j->mu);
}
