/*
 * test_suppress: the suppression list's store (engine/suppress.h) on a
 * real LMDB environment in a temporary directory: add, check (address,
 * domain, global and scope, expiry), remove, normalisation on and off,
 * the bounce hook's policy, feeds from several threads committed by the
 * writer thread, list paging, CSV import and export (quoting, bad lines,
 * duplicates, replacement of stored entries, an import cut by the stop
 * while read, sorted or written, its entries not imported counted once
 * each), that entries survive a close and reopen, and that a note the
 * spool holds (a bounce's entry) stays there while the list cannot be
 * written.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include <endian.h>
#include <lmdb.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/suppress.h"
#include "queue/queue.h"
#include "tests/support/fd_path.h"

struct fix {
    char dir[64];
    struct suppress_config cfg;
    struct suppress *s;
};

static void
fix_open(struct fix *f)
{
    char err[256] = "";
    assert_int_equal(suppress_open(&f->cfg, &f->s, err, sizeof(err)), 0);
}

static int
setup_with(void **state, const char *const *kv)
{
    struct fix *f = calloc(1, sizeof(*f));
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_suppress.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    char err[256];
    assert_int_equal(conf_defaults(suppress_conf_keys, &f->cfg, err, sizeof(err)), 0);
    assert_int_equal(conf_set(suppress_conf_keys, &f->cfg, "map_size", "64M", err, sizeof(err)), 0);
    for (; kv != NULL && kv[0] != NULL; kv += 2)
        assert_int_equal(conf_set(suppress_conf_keys, &f->cfg, kv[0], kv[1], err, sizeof(err)), 0);
    assert_int_equal(suppress_config_check(&f->cfg, f->dir, err, sizeof(err)), 0);
    fix_open(f);
    *state = f;
    return 0;
}

static int
setup(void **state)
{
    return setup_with(state, NULL);
}

static int
setup_norm(void **state)
{
    static const char *const kv[] = {"lowercase_local", "yes", "strip_plus", "yes", "gmail_dots",
                                     "yes", "on_invalid_recipient", "30d", NULL};
    return setup_with(state, kv);
}

static int
teardown(void **state)
{
    struct fix *f = *state;
    suppress_close(f->s);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", f->dir);
    assert_int_equal(system(cmd), 0);
    conf_free(suppress_conf_keys, &f->cfg);
    free(f);
    return 0;
}

/* The len octets of csv imported into the list (suppress_import_csv
 * returns 0), its result in *r. */
static void
import_csv(struct fix *f, const void *csv, size_t len, struct suppress_import_result *r)
{
    FILE *in = fmemopen((void *)csv, len, "r");
    assert_non_null(in);
    assert_int_equal(suppress_import_csv(f->s, in, NULL, NULL, r), 0);
    fclose(in);
}

/* The whole list exported as CSV, want entries (malloc'd, the caller
 * frees it); its length in *len. */
static char *
export_csv(struct fix *f, size_t *len, long want)
{
    char *buf = NULL;
    *len = 0;
    FILE *out = open_memstream(&buf, len);
    assert_non_null(out);
    assert_int_equal(suppress_export_csv(f->s, out, NULL), want);
    fclose(out);
    return buf;
}

struct note_wait {
    int rc;
    int done;
};

static void
note_done(void *cookie, int rc)
{
    struct note_wait *w = cookie;
    w->rc = rc;
    w->done = 1;
}

static int
count_note(void *arg, uint64_t seq, const void *note, size_t len)
{
    (void)seq, (void)note, (void)len;
    (*(int *)arg)++;
    return 0;
}

/* pwrite and writev of this binary (LMDB calls them through the PLT):
 * those to the list's data file fail with EIO while fail_list_writes;
 * those to a spool's wait while hold_spool_writes (up to a minute),
 * spool_held set meanwhile: a spool that does not answer. */
static atomic_bool fail_list_writes, hold_spool_writes, spool_held;

static bool
list_fd(int fd)
{
    return fd_path_ends(fd, "/suppress/data.mdb");
}

static void
spool_hold(int fd)
{
    if (!atomic_load(&hold_spool_writes) || !fd_path_ends(fd, "/spool/data.mdb"))
        return;
    atomic_store(&spool_held, true);
    for (int i = 0; i < 60000 && atomic_load(&hold_spool_writes); i++)
        nanosleep(&(struct timespec){0, 1000000}, NULL);
}

ssize_t
pwrite(int fd, const void *buf, size_t n, off_t off)
{
    if (atomic_load(&fail_list_writes) && list_fd(fd)) {
        errno = EIO;
        return -1;
    }
    spool_hold(fd);
    return syscall(SYS_pwrite64, fd, buf, n, off);
}

ssize_t
writev(int fd, const struct iovec *iov, int cnt)
{
    if (atomic_load(&fail_list_writes) && list_fd(fd)) {
        errno = EIO;
        return -1;
    }
    spool_hold(fd);
    return syscall(SYS_writev, fd, iov, cnt);
}

/* A bounce's entry committed as a note in the spool is copied to the list
 * (suppress_sync, the writer), and trimmed from the spool; while the
 * list cannot be written (its disk fails) the note stays in the spool,
 * not lost, and is copied once it can. */
static void
test_notes_wait_for_room(void **state)
{
    (void)state;
    struct fix f = {0};
    snprintf(f.dir, sizeof(f.dir), "/tmp/test_suppress.XXXXXX");
    assert_non_null(mkdtemp(f.dir));
    char err[256], path[128];
    assert_int_equal(conf_defaults(suppress_conf_keys, &f.cfg, err, sizeof(err)), 0);
    assert_int_equal(conf_set(suppress_conf_keys, &f.cfg, "map_size", "1M", err, sizeof(err)), 0);
    assert_int_equal(
        conf_set(suppress_conf_keys, &f.cfg, "on_invalid_recipient", "30d", err, sizeof(err)), 0);
    assert_int_equal(suppress_config_check(&f.cfg, f.dir, err, sizeof(err)), 0);
    fix_open(&f);
    struct queue_config qc = {0};
    assert_int_equal(conf_defaults(queue_conf_keys, &qc, err, sizeof(err)), 0);
    free(qc.path);
    snprintf(path, sizeof(path), "%s/spool", f.dir);
    qc.path = strdup(path);
    struct queue *q = NULL;
    assert_int_equal(queue_open(&qc, &q, err, sizeof(err)), 0);
    assert_int_equal(suppress_attach_queue(f.s, q), 0);
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    uint8_t note[SUPPRESS_NOTE_BYTES];

    /* room: copied at the sync, trimmed from the spool */
    int len = suppress_note_bounce(f.s, NULL, "Gone@x.test", BOUNCE_INVALID_RECIPIENT, "550 5.1.1",
                                   note);
    assert_true(len > 0);
    assert_int_equal(suppress_note_bounce(f.s, NULL, "full@x.test", BOUNCE_MAILBOX_FULL, "552",
                                          note + len), 0);
    struct note_wait w = {0};
    assert_int_equal(queue_events_note_put(q, port, NULL, 0, note, (size_t)len, note_done, &w), 0);
    for (int i = 0; i < 1000 && !w.done; i++)
        queue_port_wait(port, 100);
    assert_int_equal(w.rc, 0);
    suppress_sync(f.s);
    struct suppress_entry e;
    assert_int_equal(suppress_check(f.s, NULL, "gone@x.test", &e), 1);
    assert_int_equal(e.reason, SUPPRESS_HARD_BOUNCE);
    assert_string_equal(e.note, "bounce: 550 5.1.1");
    int n = 0;
    assert_int_equal(queue_notes_read(q, 0, 0, count_note, &n), 0);

    atomic_store(&fail_list_writes, true); /* the list's disk fails its writes */
    len = suppress_note_bounce(f.s, NULL, "later@x.test", BOUNCE_INVALID_RECIPIENT, "550 5.1.1",
                               note);
    w = (struct note_wait){0};
    assert_int_equal(queue_events_note_put(q, port, NULL, 0, note, (size_t)len, note_done, &w), 0);
    for (int i = 0; i < 1000 && !w.done; i++)
        queue_port_wait(port, 100);
    assert_int_equal(w.rc, 0);
    suppress_sync(f.s); /* the write fails: the note stays */
    assert_int_equal(suppress_check(f.s, NULL, "later@x.test", NULL), 0);
    n = 0;
    assert_int_equal(queue_notes_read(q, 0, 0, count_note, &n), 1);
    assert_int_equal(n, 1);
    struct queue_stats qs;
    queue_stats(q, &qs);
    assert_int_equal(qs.notes_kept, 1); /* stats' suppress.notes_pending */
    /* the disk is back: the next pump copies it */
    atomic_store(&fail_list_writes, false);
    suppress_sync(f.s);
    assert_int_equal(suppress_check(f.s, NULL, "later@x.test", NULL), 1);
    n = 0;
    assert_int_equal(queue_notes_read(q, 0, 0, count_note, &n), 0);
    queue_stats(q, &qs);
    assert_int_equal(qs.notes_kept, 0);

    /* entries lost are counted: one that cannot be made (a space outside
     * a quoted local part), a damaged note skipped */
    assert_int_equal(suppress_note_bounce(f.s, NULL, "a b@x.test", BOUNCE_INVALID_RECIPIENT,
                                          "550 5.1.1", note), -EINVAL);
    w = (struct note_wait){0};
    assert_int_equal(queue_events_note_put(q, port, NULL, 0, "bad", 3, note_done, &w), 0);
    for (int i = 0; i < 1000 && !w.done; i++)
        queue_port_wait(port, 100);
    suppress_sync(f.s);
    struct suppress_stats ss;
    suppress_stats(f.s, &ss);
    assert_int_equal(ss.feed_dropped, 2);
    queue_stats(q, &qs);
    assert_int_equal(qs.notes_kept, 0);

    suppress_detach_queue(f.s);
    queue_port_free(port);
    queue_close(q);
    conf_free(queue_conf_keys, &qc);
    suppress_close(f.s);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", f.dir);
    assert_int_equal(system(cmd), 0);
    conf_free(suppress_conf_keys, &f.cfg);
}

static void *
detach_main(void *arg)
{
    suppress_detach_queue(arg);
    return NULL;
}

/* The log lines of the file at path that hold what. */
static unsigned
log_count(const char *path, const char *what)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[2048];
    unsigned n = 0;
    while (fgets(line, sizeof(line), f) != NULL)
        n += strstr(line, what) != NULL;
    fclose(f);
    return n;
}

/* A list and a spool in a temporary directory, the log in its file
 * "log", the list attached to the spool but not woken by its commits,
 * and one note (gone@x.test's bounce) committed in the spool: it waits
 * for the detach. */
static struct queue *
notes_fixture(struct fix *f, struct queue_config *qc, char *logpath, size_t loglen)
{
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_suppress.XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    char err[256], path[128];
    snprintf(logpath, loglen, "%s/log", f->dir);
    assert_int_equal(log_open(logpath, LOG_INFO), 0);
    assert_int_equal(conf_defaults(suppress_conf_keys, &f->cfg, err, sizeof(err)), 0);
    assert_int_equal(conf_set(suppress_conf_keys, &f->cfg, "map_size", "1M", err, sizeof(err)), 0);
    assert_int_equal(
        conf_set(suppress_conf_keys, &f->cfg, "on_invalid_recipient", "30d", err, sizeof(err)), 0);
    assert_int_equal(suppress_config_check(&f->cfg, f->dir, err, sizeof(err)), 0);
    fix_open(f);
    assert_int_equal(conf_defaults(queue_conf_keys, qc, err, sizeof(err)), 0);
    free(qc->path);
    snprintf(path, sizeof(path), "%s/spool", f->dir);
    qc->path = strdup(path);
    struct queue *q = NULL;
    assert_int_equal(queue_open(qc, &q, err, sizeof(err)), 0);
    assert_int_equal(suppress_attach_queue(f->s, q), 0);
    /* the writer is not woken by the commit: the note waits for the detach */
    queue_notes_set_hook(q, NULL, NULL);
    struct queue_port *port = queue_port_new();
    assert_non_null(port);
    uint8_t note[SUPPRESS_NOTE_BYTES];
    int len = suppress_note_bounce(f->s, NULL, "gone@x.test", BOUNCE_INVALID_RECIPIENT,
                                   "550 5.1.1", note);
    assert_true(len > 0);
    struct note_wait w = {0};
    assert_int_equal(queue_events_note_put(q, port, NULL, 0, note, (size_t)len, note_done, &w), 0);
    for (int i = 0; i < 1000 && !w.done; i++)
        queue_port_wait(port, 100);
    assert_int_equal(w.rc, 0);
    queue_port_free(port);
    return q;
}

static void
notes_fixture_close(struct fix *f, struct queue *q, struct queue_config *qc)
{
    log_open(NULL, LOG_INFO);
    queue_close(q);
    conf_free(queue_conf_keys, qc);
    suppress_close(f->s);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", f->dir);
    assert_int_equal(system(cmd), 0);
    conf_free(suppress_conf_keys, &f->cfg);
}

/* The stop's last copy of the notes (suppress_detach_queue, engine_stop)
 * trims them from the spool and waits for its answer. A spool that does
 * not answer (its write lock held by another process, a dead disk) held
 * it with nothing said; the wait cannot be cut (the spool would call back
 * into it), so it is said once slow (event=suppress_notes_trim_slow, at
 * 2 s), and goes on until the spool answers: the note is in the list and
 * trimmed from the spool. */
static void
test_detach_says_a_slow_notes_trim(void **state)
{
    (void)state;
    struct fix f = {0};
    struct queue_config qc = {0};
    char logpath[128];
    struct queue *q = notes_fixture(&f, &qc, logpath, sizeof(logpath));
    atomic_store(&hold_spool_writes, true); /* the spool answers nothing */
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, detach_main, f.s), 0);
    unsigned slow = 0;
    for (int i = 0; i < 10000 && slow == 0; i++) { /* said at 2 s */
        nanosleep(&(struct timespec){0, 1000000}, NULL);
        slow = log_count(logpath, "event=suppress_notes_trim_slow");
    }
    bool held = atomic_load(&spool_held);
    atomic_store(&hold_spool_writes, false); /* it answers: the detach ends */
    pthread_join(th, NULL);
    assert_true(held);
    assert_int_equal(slow, 1);
    assert_int_equal(suppress_check(f.s, NULL, "gone@x.test", NULL), 1);
    int n = 0;
    assert_int_equal(queue_notes_read(q, 0, 0, count_note, &n), 0); /* trimmed */
    notes_fixture_close(&f, q, &qc);
}

/* A stop that cut a wait for the spool already (it answers nothing)
 * detaches with suppress_detach_queue_stuck: the note is copied to the
 * list and left in the spool (copied again at the next start), no trim
 * asked, so nothing waits for the spool: the detach returns at once. */
static void
test_detach_from_a_stuck_spool_asks_no_trim(void **state)
{
    (void)state;
    struct fix f = {0};
    struct queue_config qc = {0};
    char logpath[128];
    struct queue *q = notes_fixture(&f, &qc, logpath, sizeof(logpath));
    atomic_store(&spool_held, false);
    atomic_store(&hold_spool_writes, true); /* the spool answers nothing */
    uint64_t t0 = clock_mono_ms();
    suppress_detach_queue_stuck(f.s);
    uint64_t ms = clock_mono_ms() - t0;
    bool held = atomic_load(&spool_held);
    atomic_store(&hold_spool_writes, false);
    assert_false(held); /* nothing written to the spool */
    assert_true(ms < 1000);
    assert_int_equal(suppress_check(f.s, NULL, "gone@x.test", NULL), 1);
    int n = 0;
    assert_int_equal(queue_notes_read(q, 0, 0, count_note, &n), 1); /* left there */
    assert_int_equal(log_count(logpath, "event=suppress_notes_untrimmed entries=1 "), 1);
    notes_fixture_close(&f, q, &qc);
}

static void *
sync_main(void *arg)
{
    suppress_sync(arg);
    return NULL;
}

struct detach_run {
    struct suppress *s;
    atomic_bool done;
};

static void *
detach_stuck_main(void *arg)
{
    struct detach_run *d = arg;
    suppress_detach_queue_stuck(d->s);
    atomic_store(&d->done, true);
    return NULL;
}

/* The stop's detach from a stuck spool asks no trim; but a pump already
 * waiting for one (the list's writer woken by a commit, here a sync) held
 * the pumps' lock while it waited without bound, so the detach waited for
 * the spool all the same, and the stop's close of the list (it joins the
 * writer) after it. That wait is left to the spool now (the port kept to
 * the close): the detach and the other pump end at once. */
static void
test_detach_from_a_stuck_spool_ends_a_trim_in_flight(void **state)
{
    (void)state;
    struct fix f = {0};
    struct queue_config qc = {0};
    char logpath[128];
    struct queue *q = notes_fixture(&f, &qc, logpath, sizeof(logpath));
    atomic_store(&spool_held, false);
    atomic_store(&hold_spool_writes, true); /* the spool answers nothing */
    pthread_t pump, det;
    assert_int_equal(pthread_create(&pump, NULL, sync_main, f.s), 0);
    for (int i = 0; i < 10000 && !atomic_load(&spool_held); i++) /* its trim in flight */
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    bool held = atomic_load(&spool_held);
    struct detach_run d = {.s = f.s};
    atomic_init(&d.done, false);
    uint64_t t0 = clock_mono_ms();
    assert_int_equal(pthread_create(&det, NULL, detach_stuck_main, &d), 0);
    for (int i = 0; i < 3000 && !atomic_load(&d.done); i++)
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    uint64_t ms = clock_mono_ms() - t0;
    bool done = atomic_load(&d.done);
    atomic_store(&hold_spool_writes, false); /* it answers: whatever waits ends */
    pthread_join(det, NULL);
    pthread_join(pump, NULL);
    assert_true(held);
    if (!done)
        fail_msg("the detach from a stuck spool waited %llu ms for a pump's trim",
                 (unsigned long long)ms);
    assert_true(ms < 1000);
    assert_int_equal(suppress_check(f.s, NULL, "gone@x.test", NULL), 1);
    assert_int_equal(log_count(logpath, "event=suppress_notes_trim_left "), 1);
    notes_fixture_close(&f, q, &qc);
}

static void
test_add_check_remove(void **state)
{
    struct fix *f = *state;
    struct suppress_entry e;
    assert_int_equal(suppress_check(f->s, NULL, "a@example.com", &e), 0);
    assert_int_equal(suppress_add(f->s, NULL, "a@Example.COM", SUPPRESS_HARD_BOUNCE, 0, "550 5.1.1"),
                     0);
    assert_int_equal(suppress_check(f->s, NULL, "a@example.com", &e), 1);
    assert_string_equal(e.addr, "a@example.com");
    assert_string_equal(e.scope, "global");
    assert_int_equal(e.reason, SUPPRESS_HARD_BOUNCE);
    assert_string_equal(e.note, "550 5.1.1");
    assert_int_equal(e.expires_ms, 0);
    assert_true(e.added_ms > 0);
    /* domains are case-insensitive, local parts are not (by default)...
     * but for a hard bounce's or complaint's entry in lowercase, which
     * holds for the local part in any case (below) */
    assert_int_equal(suppress_check(f->s, NULL, "a@EXAMPLE.com", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "A@example.com", NULL), 1);
    assert_int_equal(suppress_add(f->s, NULL, "m@example.com", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_add(f->s, NULL, "u@example.com", SUPPRESS_UNSUBSCRIBE, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "M@example.com", NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "U@example.com", NULL), 0);
    assert_int_equal(suppress_add(f->s, NULL, "B@example.com", SUPPRESS_HARD_BOUNCE, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "b@example.com", NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "b@example.com", NULL), 0);
    /* a global entry holds in every scope */
    assert_int_equal(suppress_check(f->s, "tenant1", "a@example.com", NULL), 1);
    assert_int_equal(suppress_remove(f->s, NULL, "a@example.com"), 0);
    assert_int_equal(suppress_remove(f->s, NULL, "a@example.com"), -ENOENT);
    assert_int_equal(suppress_check(f->s, NULL, "a@example.com", NULL), 0);
    /* bad input */
    assert_int_equal(suppress_add(f->s, NULL, "a b@example.com", SUPPRESS_MANUAL, 0, NULL), -EINVAL);
    /* blanks in a quoted local part, which RCPT takes: one entry */
    assert_int_equal(suppress_add(f->s, NULL, "\"a b\"@Example.COM", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "<\"a b\"@example.com>", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "\"a  b\"@example.com", NULL), 0);
    assert_int_equal(suppress_add(f->s, NULL, "\"a\\\" b\"@example.com", SUPPRESS_MANUAL, 0, NULL),
                     0);
    assert_int_equal(suppress_add(f->s, NULL, "\"a b\"c d@example.com", SUPPRESS_MANUAL, 0, NULL),
                     -EINVAL);
    assert_int_equal(suppress_add(f->s, NULL, "\"a\tb\"@example.com", SUPPRESS_MANUAL, 0, NULL),
                     -EINVAL);
    assert_int_equal(suppress_remove(f->s, NULL, "\"a b\"@example.com"), 0);
    assert_int_equal(suppress_add(f->s, NULL, "a@", SUPPRESS_MANUAL, 0, NULL), -EINVAL);
    /* not UTF-8 (Latin-1 typed into a terminal): stored, it was listed as
     * U+FFFD, which removed nothing, and no recipient ever matched it */
    assert_int_equal(suppress_add(f->s, NULL, "m\xfcller@x.example", SUPPRESS_MANUAL, 0, NULL),
                     -EILSEQ);
    assert_int_equal(suppress_add(f->s, NULL, "@b\xfc" "cher.example", SUPPRESS_MANUAL, 0, NULL),
                     -EILSEQ);
    assert_int_equal(suppress_add(f->s, NULL, "\xc0\xaf@x.example", SUPPRESS_MANUAL, 0, NULL),
                     -EILSEQ); /* an overlong '/' */
    assert_int_equal(suppress_feed(f->s, NULL, "m\xfcller@x.example", SUPPRESS_COMPLAINT, 0, NULL),
                     -EILSEQ);
    assert_int_equal(suppress_add(f->s, NULL, "m\xc3\xbcller@x.example", SUPPRESS_MANUAL, 0, NULL),
                     0);
    assert_int_equal(suppress_check(f->s, NULL, "m\xc3\xbcller@x.example", NULL), 1);
    /* what RCPT's syntax refuses matches no recipient: a line of a file
     * that is no list ("root:$y$j9T$...:19000:0:99999:7:::" was a domain),
     * a quote in an unquoted local part, a label over 63 octets */
    assert_int_equal(suppress_add(f->s, NULL, "root:$y$j9T$abc:19000:0:99999:7:::", SUPPRESS_MANUAL,
                                  0, NULL),
                     -EINVAL);
    assert_int_equal(suppress_add(f->s, NULL, "o\"brien@x.example", SUPPRESS_MANUAL, 0, NULL),
                     -EINVAL);
    assert_int_equal(suppress_add(f->s, NULL, "a@-x.example", SUPPRESS_MANUAL, 0, NULL), -EINVAL);
    assert_int_equal(suppress_add(f->s, NULL,
                                  "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9"
                                  "Us8cKjMzEfYyjiWA4R4",
                                  SUPPRESS_MANUAL, 0, NULL),
                     -EINVAL);
    assert_int_equal(suppress_add(f->s, NULL, "u@[192.0.2.1]", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_add(f->s, NULL, "@[192.0.2.1]", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_add(f->s, NULL, "\"john.\"@x.example", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_add(f->s, NULL, "_dmarc.x.example", SUPPRESS_MANUAL, 0, NULL), 0);
    /* RCPT takes a mailbox of 253 octets whose domain is in U-labels;
     * stored in its A-labels it is 283, over RCPT's path limit, and it
     * was refused: its hard bounce suppressed nothing. A path as long in
     * ASCII is one no RCPT takes. */
    char lp[65], at[300], dom[200];
    memset(lp, 'a', 64);
    lp[64] = '\0';
    snprintf(dom, sizeof(dom), "%s.%.63s.%.63s.%.20s",
             "b\xc3\xbc" "cher.b\xc3\xbc" "cher.b\xc3\xbc" "cher.b\xc3\xbc" "cher.b\xc3\xbc" "cher",
             lp, lp, lp);
    snprintf(at, sizeof(at), "%s@%s", lp, dom);
    assert_int_equal(strlen(at), 253);
    assert_int_equal(suppress_add(f->s, NULL, at, SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, at, NULL), 1);
    snprintf(at, sizeof(at), "%s@bbbbbbbbbbbbb.%.63s.%.63s.%.50s", lp, lp, lp, lp);
    assert_int_equal(suppress_add(f->s, NULL, at, SUPPRESS_MANUAL, 0, NULL), -EINVAL);
    assert_int_equal(suppress_add(f->s, "bad scope", "a@b.c", SUPPRESS_MANUAL, 0, NULL), -EINVAL);
    assert_int_equal(suppress_add(f->s, "", "a@b.c", SUPPRESS_MANUAL, 0, NULL), -EINVAL);
    assert_int_equal(suppress_check(f->s, NULL, "", NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "no-at-sign-but-a-domain", NULL), 0);
}

static int
count_one(void *arg, const struct suppress_entry *e)
{
    (void)arg;
    (void)e;
    return 0;
}

/* A tenant's "tag:" list (complaints taken while the config did not name
 * it) moves into its own list, whole, past a batch; an address on both
 * keeps the entry that holds longer; other scopes stay as they were. */
static void
test_move_scope(void **state)
{
    struct fix *f = *state;
    struct suppress_entry e;
    int64_t now = (int64_t)clock_unix_ms();
    for (int i = 0; i < 10005; i++) { /* MOVE_BATCH and some */
        char a[64];
        snprintf(a, sizeof(a), "u%d@example.com", i);
        assert_int_equal(suppress_feed(f->s, "tag:0a1b2c3d", a, SUPPRESS_COMPLAINT, 0, "fbl"), 0);
    }
    suppress_sync(f->s);
    /* on both: for ever under the tag beats a day; two days beat one */
    assert_int_equal(suppress_add(f->s, "customer-0042", "u1@example.com", SUPPRESS_MANUAL,
                                  now + 86400000, NULL),
                     0);
    assert_int_equal(suppress_add(f->s, "tag:0a1b2c3d", "v@example.com", SUPPRESS_COMPLAINT,
                                  now + 86400000, NULL),
                     0);
    assert_int_equal(suppress_add(f->s, "customer-0042", "v@example.com", SUPPRESS_MANUAL,
                                  now + 2 * 86400000, "kept"),
                     0);
    assert_int_equal(
        suppress_add(f->s, "tag:0a1b2c3e", "u2@example.com", SUPPRESS_COMPLAINT, 0, NULL), 0);
    assert_int_equal(
        suppress_add(f->s, "tag:0a1b2c3", "u3@example.com", SUPPRESS_COMPLAINT, 0, NULL), 0);
    /* before: the tenant's mail goes to the complainers */
    assert_int_equal(suppress_check(f->s, "customer-0042", "u2@example.com", NULL), 0);

    assert_int_equal(suppress_move_scope(f->s, "tag:0a1b2c3d", "customer-0042"), 10006);
    assert_int_equal(suppress_check(f->s, "customer-0042", "u2@example.com", &e), 1);
    assert_string_equal(e.scope, "customer-0042");
    assert_int_equal(e.reason, SUPPRESS_COMPLAINT);
    assert_string_equal(e.note, "fbl");
    assert_int_equal(suppress_check(f->s, "customer-0042", "u10004@example.com", NULL), 1);
    assert_int_equal(suppress_check(f->s, "customer-0042", "u1@example.com", &e), 1);
    assert_int_equal(e.reason, SUPPRESS_COMPLAINT);
    assert_int_equal(e.expires_ms, 0);
    assert_int_equal(suppress_check(f->s, "customer-0042", "v@example.com", &e), 1);
    assert_string_equal(e.note, "kept");
    /* nothing left under the tag; the neighbours untouched */
    assert_int_equal(suppress_list(f->s, "tag:0a1b2c3d", NULL, NULL, 0, count_one, NULL), 0);
    assert_int_equal(suppress_list(f->s, "tag:0a1b2c3e", NULL, NULL, 0, count_one, NULL), 1);
    assert_int_equal(suppress_list(f->s, "tag:0a1b2c3", NULL, NULL, 0, count_one, NULL), 1);
    assert_int_equal(suppress_list(f->s, "customer-0042", NULL, NULL, 0, count_one, NULL), 10006);
    struct suppress_stats st;
    suppress_stats(f->s, &st);
    assert_int_equal(st.entries, 10006 + 2);
    /* again: nothing to move */
    assert_int_equal(suppress_move_scope(f->s, "tag:0a1b2c3d", "customer-0042"), 0);
    assert_int_equal(suppress_move_scope(f->s, "x", "x"), -EINVAL);
    assert_int_equal(suppress_move_scope(f->s, "bad scope", "x"), -EINVAL);
}

static void
test_domain_and_scope(void **state)
{
    struct fix *f = *state;
    struct suppress_entry e;
    assert_int_equal(suppress_add(f->s, NULL, "@Dead.Example", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_add(f->s, "t1", "gone.example", SUPPRESS_COMPLAINT, 0, NULL), 0);
    assert_int_equal(suppress_add(f->s, "t1", "x@live.example", SUPPRESS_UNSUBSCRIBE, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "anyone@dead.example", &e), 1);
    assert_string_equal(e.addr, "@dead.example");
    /* a local part too long for any entry: its domain's entry still holds */
    char longer[200];
    memset(longer, 'x', 100);
    snprintf(longer + 100, sizeof(longer) - 100, "@DEAD.example");
    assert_int_equal(suppress_check(f->s, NULL, longer, &e), 1);
    assert_string_equal(e.addr, "@dead.example");
    /* a quoted local part with an '@' in it (RFC 5321 4.1.2): the domain
     * is what follows the last '@', for the address's entry and its
     * domain's alike */
    assert_int_equal(suppress_check(f->s, NULL, "\"a@b\"@dead.example", &e), 1);
    assert_string_equal(e.addr, "@dead.example");
    assert_int_equal(suppress_check(f->s, "t1", "\"x@live.example\"@gone.example", &e), 1);
    assert_string_equal(e.addr, "@gone.example");
    /* the tenant's entries hold for that tenant only */
    assert_int_equal(suppress_check(f->s, NULL, "y@gone.example", NULL), 0);
    assert_int_equal(suppress_check(f->s, "t2", "y@gone.example", NULL), 0);
    assert_int_equal(suppress_check(f->s, "t1", "y@gone.example", &e), 1);
    assert_string_equal(e.scope, "t1");
    assert_int_equal(e.reason, SUPPRESS_COMPLAINT);
    assert_int_equal(suppress_check(f->s, "t1", "x@live.example", &e), 1);
    assert_int_equal(e.reason, SUPPRESS_UNSUBSCRIBE);
    assert_int_equal(suppress_check(f->s, NULL, "x@live.example", NULL), 0);
    /* the address is looked up before the domain */
    assert_int_equal(suppress_add(f->s, NULL, "who@dead.example", SUPPRESS_HARD_BOUNCE, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "who@dead.example", &e), 1);
    assert_string_equal(e.addr, "who@dead.example");
}

static void
test_expiry_and_purge(void **state)
{
    struct fix *f = *state;
    int64_t now = (int64_t)clock_unix_ms();
    assert_int_equal(suppress_add(f->s, NULL, "old@x.example", SUPPRESS_MANUAL, now - 1000, NULL), 0);
    assert_int_equal(suppress_add(f->s, NULL, "new@x.example", SUPPRESS_MANUAL, now + 3600000, NULL),
                     0);
    assert_int_equal(suppress_check(f->s, NULL, "old@x.example", NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "new@x.example", NULL), 1);
    struct suppress_stats st;
    suppress_stats(f->s, &st);
    assert_int_equal(st.entries, 2);
    assert_int_equal(suppress_purge(f->s, now), 1);
    suppress_stats(f->s, &st);
    assert_int_equal(st.entries, 1);
}

/* A purge over more than one batch (PURGE_BATCH, 10,000): each batch
 * goes on from the last key it deleted, and every expired entry goes,
 * live ones interleaved with them stay. */
static void
test_purge_in_batches(void **state)
{
    struct fix *f = *state;
    int64_t now = (int64_t)clock_unix_ms();
    size_t cap = 26000 * 48, len = 0;
    char *csv = malloc(cap);
    assert_non_null(csv);
    for (unsigned i = 0; i < 25000; i++) /* every other one expired in 2001 */
        len += (size_t)snprintf(csv + len, cap - len, "u%05u@p.example,,manual,,%s,\n", i,
                                i % 2 ? "1000000000" : "");
    struct suppress_import_result res;
    import_csv(f, csv, len, &res);
    free(csv);
    assert_int_equal(res.imported, 25000);
    assert_int_equal(suppress_purge(f->s, now), 12500);
    struct suppress_stats st;
    suppress_stats(f->s, &st);
    assert_int_equal(st.entries, 12500);
    assert_int_equal(suppress_check(f->s, NULL, "u24998@p.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "u24999@p.example", NULL), 0);
    assert_int_equal(suppress_purge(f->s, now), 0);
}

/* The stop of test_import_cut_by_the_stop: true once the list holds
 * anything (the first transaction committed), or always (*arg). */
struct import_stop {
    struct suppress *s;
    bool always;
    unsigned asked;
};

static bool
import_stop_once_written(void *arg)
{
    struct import_stop *st = arg;
    st->asked++;
    struct suppress_stats ss;
    suppress_stats(st->s, &ss);
    return st->always || ss.entries > 0;
}

/* A stop during an import ends it at the next transaction (250,000
 * entries): before, nothing looked at the stop and an import of a
 * million lines held it for the whole file. What was committed stays,
 * the first entries in key order; the rest is counted, not written;
 * -ECANCELED. The same import run again completes the list (an entry
 * replaces one with its key). A stop already there while the file is
 * read ends the import there, at 65,536 lines, nothing written. */
static void
test_import_cut_by_the_stop(void **state)
{
    struct fix *f = *state;
    enum { N = 300000 };
    size_t cap = (size_t)N * 32, len = 0;
    char *csv = malloc(cap);
    assert_non_null(csv);
    for (unsigned i = 0; i < N; i++) /* written backwards: the sort puts u000000 first */
        len += (size_t)snprintf(csv + len, cap - len, "u%06u@cut.example,,manual,,,\n",
                                N - 1 - i);
    /* a stop there before the read reaches line 65,536 */
    struct import_stop st = {.s = f->s, .always = true};
    struct suppress_import_result r;
    FILE *in = fmemopen(csv, len, "r");
    assert_non_null(in);
    assert_int_equal(suppress_import_csv(f->s, in, import_stop_once_written, &st, &r),
                     -ECANCELED);
    fclose(in);
    assert_int_equal(st.asked, 1);
    assert_int_equal(r.lines, 65535);
    assert_int_equal(r.imported, 0);
    assert_false(r.counted); /* the file not read whole: its entries not known */
    assert_int_equal(r.not_imported, 0);
    struct suppress_stats ss;
    suppress_stats(f->s, &ss);
    assert_int_equal(ss.entries, 0);
    /* a stop that comes once the first transaction is in */
    st = (struct import_stop){.s = f->s};
    in = fmemopen(csv, len, "r");
    assert_non_null(in);
    assert_int_equal(suppress_import_csv(f->s, in, import_stop_once_written, &st, &r),
                     -ECANCELED);
    fclose(in);
    assert_int_equal(r.lines, N);
    assert_true(r.counted);
    assert_int_equal(r.entries, N);
    assert_int_equal(r.imported, 250000);
    assert_int_equal(r.not_imported, N - 250000);
    suppress_stats(f->s, &ss);
    assert_int_equal(ss.entries, 250000);
    assert_int_equal(suppress_check(f->s, NULL, "u249999@cut.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "u250000@cut.example", NULL), 0);
    /* run again, no stop: the rest goes in, the first replaced */
    import_csv(f, csv, len, &r);
    free(csv);
    assert_int_equal(r.imported, N);
    assert_int_equal(r.not_imported, 0);
    suppress_stats(f->s, &ss);
    assert_int_equal(ss.entries, N);
    assert_int_equal(suppress_check(f->s, NULL, "u299999@cut.example", NULL), 1);
}

/* The stop looked at while the file is read, whatever the records' lines:
 * it was asked at a line number that is a multiple of 65,536 only, and a
 * record's first line alone is there, so that in a file of records of two
 * lines each (a note with a line break), which start at odd lines, it was
 * never asked before the whole file was read. */
static void
test_import_of_two_line_records_cut_while_read(void **state)
{
    struct fix *f = *state;
    enum { N = 100000 };
    size_t cap = (size_t)N * 64, len = 0;
    char *csv = malloc(cap);
    assert_non_null(csv);
    for (unsigned i = 0; i < N; i++)
        len += (size_t)snprintf(csv + len, cap - len,
                                "u%06u@two.example,,manual,,,\"line one\nline two\"\n", i);
    struct import_stop st = {.s = f->s, .always = true};
    struct suppress_import_result r;
    FILE *in = fmemopen(csv, len, "r");
    assert_non_null(in);
    assert_int_equal(suppress_import_csv(f->s, in, import_stop_once_written, &st, &r),
                     -ECANCELED);
    fclose(in);
    free(csv);
    assert_int_equal(st.asked, 1);
    /* asked at line 65,537, the first of record 32,769: not taken */
    assert_int_equal(r.lines, 65536);
    assert_int_equal(r.imported, 0);
    assert_false(r.counted);
    assert_int_equal(r.not_imported, 0);
    assert_int_equal(r.skipped, 0);
    struct suppress_stats ss;
    suppress_stats(f->s, &ss);
    assert_int_equal(ss.entries, 0);
}

/* An import cut counts each entry not imported once, however many lines
 * name it: cut while the file was read, not_imported counted the
 * records read, an address on two lines twice (and the lines not read
 * not at all): nothing is written then, and the answer says so rather
 * than a count (counted false, not_imported 0). Cut between
 * transactions, the entries of the file (its keys) less those written. */
static void
test_import_cut_counts_each_entry_once(void **state)
{
    struct fix *f = *state;
    enum { N = 600000 }; /* 300,000 addresses, each on two lines in a row */
    size_t cap = (size_t)N * 40, len = 0;
    char *csv = malloc(cap);
    assert_non_null(csv);
    for (unsigned i = 0; i < N; i++) /* the later line of each: complaint */
        len += (size_t)snprintf(csv + len, cap - len, "u%06u@dup.example,,%s,,,\n", i / 2,
                                i % 2 ? "complaint" : "manual");
    struct import_stop st = {.s = f->s, .always = true};
    struct suppress_import_result r;
    FILE *in = fmemopen(csv, len, "r");
    assert_non_null(in);
    assert_int_equal(suppress_import_csv(f->s, in, import_stop_once_written, &st, &r),
                     -ECANCELED);
    fclose(in);
    assert_int_equal(r.lines, 65535);
    assert_int_equal(r.imported, 0);
    assert_int_equal(r.not_imported, 0); /* was 65,535: the records read */
    assert_false(r.counted);
    /* cut once the first transaction is in: the keys left, once each */
    st = (struct import_stop){.s = f->s};
    in = fmemopen(csv, len, "r");
    assert_non_null(in);
    assert_int_equal(suppress_import_csv(f->s, in, import_stop_once_written, &st, &r),
                     -ECANCELED);
    fclose(in);
    assert_int_equal(r.lines, N);
    assert_true(r.counted);
    assert_int_equal(r.entries, N / 2);
    assert_int_equal(r.imported, 125000); /* a transaction: 250,000 lines' records */
    assert_int_equal(r.not_imported, N / 2 - 125000);
    struct suppress_entry e;
    assert_int_equal(suppress_check(f->s, NULL, "u124999@dup.example", &e), 1);
    assert_int_equal(e.reason, SUPPRESS_COMPLAINT);
    assert_int_equal(suppress_check(f->s, NULL, "u125000@dup.example", NULL), 0);
    import_csv(f, csv, len, &r);
    free(csv);
    assert_true(r.counted);
    assert_int_equal(r.entries, N / 2);
    assert_int_equal(r.imported, N / 2);
    assert_int_equal(r.not_imported, 0);
}

/* The stop of the tests of the sort: it counts its looks once the file is
 * read whole (feof) and before the list holds anything (the first
 * transaction), and is true at the stop_at-th of those (0: never). */
struct sort_stop {
    struct suppress *s;
    FILE *in;
    unsigned stop_at;
    unsigned looks; /* after the read, before the first transaction */
};

static bool
sort_stop_at(void *arg)
{
    struct sort_stop *st = arg;
    struct suppress_stats ss;
    suppress_stats(st->s, &ss);
    if (!feof(st->in) || ss.entries > 0)
        return false;
    st->looks++;
    return st->stop_at != 0 && st->looks == st->stop_at;
}

/* The sort is cut by the stop: qsort_r of the whole file, after its read,
 * was asked nothing (2 million lines: a second and more), and the stop
 * waited for it; it is now asked every 65,536 records sorted or merged.
 * A stop during the sort writes nothing (counted false). The sort in
 * runs and merges keeps the order and the later line of a key. */
static void
test_import_sort_cut_by_the_stop(void **state)
{
    struct fix *f = *state;
    enum { N = 300000, HALF = N / 2 };
    size_t cap = (size_t)N * 40, len = 0;
    char *csv = malloc(cap);
    assert_non_null(csv);
    /* each address twice, in runs of the sort apart: backwards as
     * manual, then in another order as complaint (the later wins) */
    for (unsigned i = 0; i < HALF; i++)
        len +=
            (size_t)snprintf(csv + len, cap - len, "u%06u@sort.example,,manual,,,\n", HALF - 1 - i);
    for (unsigned i = 0; i < HALF; i++)
        len += (size_t)snprintf(csv + len, cap - len, "u%06u@sort.example,,complaint,,,\n",
                                (unsigned)(((uint64_t)i * 7919) % HALF));
    struct sort_stop st = {.s = f->s, .stop_at = 2};
    struct suppress_import_result r;
    st.in = fmemopen(csv, len, "r");
    assert_non_null(st.in);
    assert_int_equal(suppress_import_csv(f->s, st.in, sort_stop_at, &st, &r), -ECANCELED);
    fclose(st.in);
    /* before: looked at once after the read (the first transaction's,
     * the sort done), and the import went through whole */
    assert_int_equal(r.imported, 0);
    assert_int_equal(st.looks, 2);
    assert_false(r.counted);
    assert_int_equal(r.not_imported, 0);
    assert_int_equal(r.lines, N);
    struct suppress_stats ss;
    suppress_stats(f->s, &ss);
    assert_int_equal(ss.entries, 0);
    /* never stopped: asked once per run sorted at least (before: once,
     * at the first transaction) */
    st = (struct sort_stop){.s = f->s};
    st.in = fmemopen(csv, len, "r");
    assert_non_null(st.in);
    assert_int_equal(suppress_import_csv(f->s, st.in, sort_stop_at, &st, &r), 0);
    fclose(st.in);
    free(csv);
    assert_true(st.looks >= N / 65536 + 1);
    assert_true(r.counted);
    assert_int_equal(r.entries, HALF);
    assert_int_equal(r.imported, HALF);
    suppress_stats(f->s, &ss);
    assert_int_equal(ss.entries, HALF);
    for (unsigned i = 0; i < HALF; i += 997) {
        char a[64];
        snprintf(a, sizeof(a), "u%06u@sort.example", i);
        struct suppress_entry e;
        assert_int_equal(suppress_check(f->s, NULL, a, &e), 1);
        assert_int_equal(e.reason, SUPPRESS_COMPLAINT);
    }
}

/* The sort's runs of 65,536 records and their merges at the sizes about
 * their edges (one run whole, one record past it, two runs and one past,
 * three and a short fourth): each address on several lines scattered
 * over the runs, the later line kept (manual or complaint by the line),
 * each entry counted once in r.entries. */
static void
test_import_sort_at_the_edges_of_its_runs(void **state)
{
    struct fix *f = *state;
    static const unsigned sizes[] = {1, 2, 65535, 65536, 65537, 131072, 131073, 200003};
    for (size_t t = 0; t < sizeof(sizes) / sizeof(sizes[0]); t++) {
        unsigned n = sizes[t], keys = n / 3 + 1;
        size_t cap = (size_t)n * 48, len = 0;
        char *csv = malloc(cap);
        unsigned *last = malloc(keys * sizeof(*last));
        assert_non_null(csv);
        assert_non_null(last);
        for (unsigned k = 0; k < keys; k++)
            last[k] = UINT32_MAX;
        unsigned distinct = 0;
        for (unsigned i = 0; i < n; i++) {
            unsigned k = (unsigned)(((uint64_t)i * 7919 + 13) % keys);
            distinct += last[k] == UINT32_MAX;
            last[k] = i;
            len += (size_t)snprintf(csv + len, cap - len, "u%07u@e%u.example,,%s,,,\n", k, n,
                                    i % 2 ? "complaint" : "manual");
        }
        struct suppress_import_result r;
        import_csv(f, csv, len, &r);
        free(csv);
        assert_int_equal(r.lines, n);
        assert_true(r.counted);
        assert_int_equal(r.entries, distinct);
        assert_int_equal(r.imported, distinct);
        for (unsigned k = 0; k < keys; k++) {
            char a[64];
            snprintf(a, sizeof(a), "u%07u@e%u.example", k, n);
            struct suppress_entry e;
            if (last[k] == UINT32_MAX) {
                assert_int_equal(suppress_check(f->s, NULL, a, NULL), 0);
                continue;
            }
            assert_int_equal(suppress_check(f->s, NULL, a, &e), 1);
            if (e.reason != (last[k] % 2 ? SUPPRESS_COMPLAINT : SUPPRESS_MANUAL))
                fail_msg("%u lines: %s has not the reason of its last line (%u)", n, a,
                         last[k] + 1);
        }
        free(last);
    }
}

static void
test_normalisation(void **state)
{
    struct fix *f = *state;
    char out[400];
    assert_int_equal(suppress_normalize(f->s, "F.O.O+news@GMail.com", out, sizeof(out)), 0);
    assert_string_equal(out, "foo@gmail.com");
    assert_int_equal(suppress_normalize(f->s, "First.Last+x@example.com", out, sizeof(out)), 0);
    assert_string_equal(out, "first.last@example.com");
    assert_int_equal(suppress_normalize(f->s, "<a@b.example.>", out, sizeof(out)), 0);
    assert_string_equal(out, "a@b.example");
    /* a local part quoted for its dots gets the rules inside the quotes,
     * and keeps them only while it needs them */
    assert_int_equal(suppress_normalize(f->s, "User+x.@x.example", out, sizeof(out)), 0);
    assert_string_equal(out, "user@x.example");
    /* any other quoted one keeps its quotes ("a b"@, not "a b@, which no
     * entry could be), its quoted pairs whole */
    assert_int_equal(suppress_normalize(f->s, "\"A B+news\"@x.example", out, sizeof(out)), 0);
    assert_string_equal(out, "\"a b\"@x.example");
    assert_int_equal(suppress_normalize(f->s, "\"a\\+b c+d\"@x.example", out, sizeof(out)), 0);
    assert_string_equal(out, "\"a\\+b c\"@x.example");
    assert_int_equal(suppress_add(f->s, NULL, "\"A B\"@x.example", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "\"a b+tag\"@x.example", NULL), 1);
    assert_int_equal(suppress_normalize(f->s, "u.ser.@gmail.com", out, sizeof(out)), 0);
    assert_string_equal(out, "user@gmail.com");
    assert_int_equal(suppress_normalize(f->s, "User.@x.example", out, sizeof(out)), 0);
    assert_string_equal(out, "\"user.\"@x.example");
    assert_int_equal(suppress_normalize(f->s, "a..b+c@x.example", out, sizeof(out)), 0);
    assert_string_equal(out, "\"a..b\"@x.example");
    assert_int_equal(suppress_add(f->s, NULL, "John.Doe@gmail.com", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "johndoe+promo@googlemail.com", NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "j.o.h.n.d.o.e+promo@GMAIL.COM", NULL), 1);
    /* A domain in U-labels is its A-labels, as delivery sends to them:
     * every spelling of one IDN is one mailbox on the list. */
    assert_int_equal(suppress_normalize(f->s, "x@B\xc3\x9c" "CHER.test", out, sizeof(out)), 0);
    assert_string_equal(out, "x@xn--bcher-kva.test");
    assert_int_equal(suppress_add(f->s, NULL, "x@b\xc3\xbc" "cher.test", SUPPRESS_MANUAL, 0, NULL),
                     0);
    assert_int_equal(suppress_check(f->s, NULL, "x@xn--bcher-kva.test", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "x@B\xc3\x9c" "CHER.test", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "x@bu\xcc\x88" "cher.test", NULL), 1); /* NFD */
    assert_int_equal(suppress_add(f->s, NULL, "@xn--mnchen-3ya.test", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "y@m\xc3\xbc" "nchen.test", NULL), 1);
}

static void
test_normalisation_off(void **state)
{
    struct fix *f = *state;
    char out[400];
    assert_int_equal(suppress_normalize(f->s, "F.O.O+news@GMail.com", out, sizeof(out)), 0);
    assert_string_equal(out, "F.O.O+news@gmail.com");
    /* a quoted local part that needs no quotes is its dot-atom (RFC 5321
     * 4.1.2): "John" and "J\ohn" are John's mailbox, on the list or not */
    assert_int_equal(suppress_normalize(f->s, "\"John\"@x.example", out, sizeof(out)), 0);
    assert_string_equal(out, "John@x.example");
    assert_int_equal(suppress_normalize(f->s, "<\"J\\ohn.Smith\"@x.example>", out, sizeof(out)),
                     0);
    assert_string_equal(out, "John.Smith@x.example");
    assert_int_equal(suppress_add(f->s, NULL, "John@x.example", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "\"John\"@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "\"J\\ohn\"@x.example", NULL), 1);
    /* ones that need them stay quoted */
    static const char *const quoted[] = {"\"a@b\"@x.example", "\"a..b\"@x.example",
                                         "\".a\"@x.example", "\"a.\"@x.example",
                                         "\"a\\\"b\"@x.example", "\"\"@x.example"};
    for (unsigned i = 0; i < sizeof(quoted) / sizeof(quoted[0]); i++) {
        int rc = suppress_normalize(f->s, quoted[i], out, sizeof(out));
        if (rc == 0)
            assert_string_equal(out, quoted[i]);
    }
    /* and one written without the quotes it needs (user.@docomo.ne.jp, as
     * Postfix takes it) is the same mailbox, in the form it is sent in */
    assert_int_equal(suppress_normalize(f->s, "user.@x.example", out, sizeof(out)), 0);
    assert_string_equal(out, "\"user.\"@x.example");
    assert_int_equal(suppress_add(f->s, NULL, "\"user.\"@x.example", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "user.@x.example", NULL), 1);
    assert_int_equal(suppress_add(f->s, NULL, "a..b@x.example", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "\"a..b\"@x.example", NULL), 1);
}

static void
test_bounce_policy(void **state)
{
    struct fix *f = *state;
    /* default: off */
    assert_int_equal(suppress_on_bounce(f->s, NULL, "x@y.example", BOUNCE_INVALID_RECIPIENT, "550"),
                     0);
    assert_int_equal(suppress_on_bounce(NULL, NULL, "x@y.example", BOUNCE_INVALID_RECIPIENT, "550"),
                     0);
    suppress_sync(f->s);
    assert_int_equal(suppress_check(f->s, NULL, "x@y.example", NULL), 0);
}

static void
test_bounce_policy_on(void **state)
{
    struct fix *f = *state;
    assert_int_equal(suppress_on_bounce(f->s, NULL, "x@y.example", BOUNCE_MAILBOX_FULL, "552"), 0);
    assert_int_equal(suppress_on_bounce(f->s, NULL, "x@y.example", BOUNCE_INVALID_RECIPIENT,
                                        "550 5.1.1 no such user"),
                     1);
    suppress_sync(f->s);
    struct suppress_entry e;
    assert_int_equal(suppress_check(f->s, NULL, "x@y.example", &e), 1);
    assert_int_equal(e.reason, SUPPRESS_HARD_BOUNCE);
    int64_t d = e.expires_ms - e.added_ms;
    assert_true(d > 30LL * 86400 * 1000 - 5000 && d <= 30LL * 86400 * 1000 + 5000);
    assert_string_equal(e.note, "bounce: 550 5.1.1 no such user");
}

/* A complaint or a bounce fed from a report names the address in the
 * report's spelling, which its VERP tag proves only up to case: the
 * entry is stored with the local part in lowercase and holds for the
 * recipient in any case (before, Carol@d2.test's complaint was stored
 * so, and carol@d2.test, the real recipient, was still mailed). A scoped
 * one too; a remove in another case finds it. */
static void
test_fed_entries_hold_without_case(void **state)
{
    struct fix *f = *state;
    assert_int_equal(suppress_feed(f->s, NULL, "Carol@D2.test", SUPPRESS_COMPLAINT, 0, "fbl"), 0);
    assert_int_equal(suppress_feed(f->s, "acme", "Dave@d1.test", SUPPRESS_HARD_BOUNCE, 0, "oob"),
                     0);
    suppress_sync(f->s);
    struct suppress_entry e;
    assert_int_equal(suppress_check(f->s, NULL, "carol@d2.test", &e), 1);
    assert_string_equal(e.addr, "carol@d2.test");
    assert_int_equal(e.reason, SUPPRESS_COMPLAINT);
    assert_int_equal(suppress_check(f->s, NULL, "Carol@d2.test", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "CAROL@d2.test", NULL), 1);
    assert_int_equal(suppress_check(f->s, "acme", "dave@d1.test", NULL), 1);
    assert_int_equal(suppress_check(f->s, "acme", "DAVE@d1.test", &e), 1);
    assert_string_equal(e.scope, "acme");
    assert_int_equal(suppress_check(f->s, "other", "dave@d1.test", NULL), 0);
    assert_int_equal(suppress_remove(f->s, NULL, "CAROL@d2.test"), 0);
    assert_int_equal(suppress_check(f->s, NULL, "Carol@d2.test", NULL), 0);
    assert_int_equal(suppress_remove(f->s, NULL, "CAROL@d2.test"), -ENOENT);
    /* an operator's manual entry keeps its case (lowercase_local = no) */
    assert_int_equal(suppress_add(f->s, NULL, "x@d3.test", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_remove(f->s, NULL, "X@d3.test"), -ENOENT);
}

struct feeder {
    struct suppress *s;
    int id;
};

static void *
feeder_main(void *arg)
{
    struct feeder *fd = arg;
    char a[64];
    for (int i = 0; i < 2000; i++) {
        snprintf(a, sizeof(a), "u%d-%d@feed.example", fd->id, i);
        while (suppress_feed(fd->s, NULL, a, SUPPRESS_HARD_BOUNCE, 0, "feed") == -EAGAIN)
            suppress_sync(fd->s);
    }
    return NULL;
}

static void
test_feed_threads(void **state)
{
    struct fix *f = *state;
    pthread_t t[4];
    struct feeder fd[4];
    for (int i = 0; i < 4; i++) {
        fd[i] = (struct feeder){f->s, i};
        assert_int_equal(pthread_create(&t[i], NULL, feeder_main, &fd[i]), 0);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    suppress_sync(f->s);
    struct suppress_stats st;
    suppress_stats(f->s, &st);
    assert_int_equal(st.entries, 8000);
    assert_int_equal(suppress_check(f->s, NULL, "u3-1999@feed.example", NULL), 1);
}

struct collect {
    char addrs[64][400];
    int n;
};

static int
collect_fn(void *arg, const struct suppress_entry *e)
{
    struct collect *c = arg;
    snprintf(c->addrs[c->n++], sizeof(c->addrs[0]), "%s/%s", e->scope, e->addr);
    return 0;
}

static void
test_list_pages(void **state)
{
    struct fix *f = *state;
    char a[64];
    for (int i = 0; i < 10; i++) {
        snprintf(a, sizeof(a), "u%d@l.example", i);
        assert_int_equal(suppress_add(f->s, i < 5 ? "aa" : "zz", a, SUPPRESS_MANUAL, 0, NULL), 0);
    }
    struct collect c = {0};
    assert_int_equal(suppress_list(f->s, "zz", NULL, NULL, 0, collect_fn, &c), 5);
    assert_string_equal(c.addrs[0], "zz/u5@l.example");
    memset(&c, 0, sizeof(c));
    assert_int_equal(suppress_list(f->s, NULL, NULL, NULL, 3, collect_fn, &c), 3);
    assert_string_equal(c.addrs[2], "aa/u2@l.example");
    /* next page: after the last one seen */
    memset(&c, 0, sizeof(c));
    assert_int_equal(suppress_list(f->s, NULL, "aa", "u2@l.example", 3, collect_fn, &c), 3);
    assert_string_equal(c.addrs[0], "aa/u3@l.example");
    assert_string_equal(c.addrs[2], "zz/u5@l.example");
    /* A page of one scope after a position in another (the stats socket
     * takes any: sluicectl never sends it). One that sorts before the
     * scope asked ("aa" before "zz", and "z" before "zz": a prefix) is
     * before all of it: from its start. It listed nothing. */
    memset(&c, 0, sizeof(c));
    assert_int_equal(suppress_list(f->s, "zz", "aa", "u2@l.example", 2, collect_fn, &c), 2);
    assert_string_equal(c.addrs[0], "zz/u5@l.example");
    assert_string_equal(c.addrs[1], "zz/u6@l.example");
    memset(&c, 0, sizeof(c));
    assert_int_equal(suppress_list(f->s, "zz", "z", "zzz@l.example", 0, collect_fn, &c), 5);
    assert_string_equal(c.addrs[0], "zz/u5@l.example");
    /* One that sorts after it is past all of it: nothing. */
    memset(&c, 0, sizeof(c));
    assert_int_equal(suppress_list(f->s, "aa", "zz", "u0@l.example", 0, collect_fn, &c), 0);
    assert_int_equal(suppress_list(f->s, "aa", "aaa", "a@l.example", 0, collect_fn, &c), 0);
    /* the same scope, as before: after the address */
    assert_int_equal(suppress_list(f->s, "aa", "AA", "u3@l.example", 0, collect_fn, &c), 1);
    assert_string_equal(c.addrs[0], "aa/u4@l.example");
}

static void
test_csv_round_trip(void **state)
{
    struct fix *f = *state;
    assert_int_equal(suppress_add(f->s, NULL, "keep@x.example", SUPPRESS_MANUAL, 0, "old"), 0);
    assert_int_equal(suppress_add(f->s, NULL, "zzz@x.example", SUPPRESS_MANUAL, 0, "old"), 0);
    const char *csv = "address,scope,reason,added,expires,note\n"
                      "b@x.example,,hard_bounce,2026-01-31T12:00:00Z,,\"550, \"\"gone\"\"\"\n"
                      "a@x.example,t1,complaint,1700000000,2000000000,fbl\n"
                      "not an address,,,,,\n"
                      "c@x.example,,nonsense,,,\n"
                      "@whole.example\n"
                      "zzz@x.example,,unsubscribe,,,new\n"
                      "dup@x.example,,manual,,,first\n"
                      "dup@x.example,,manual,,,second\n";
    struct suppress_import_result r;
    import_csv(f, csv, strlen(csv), &r);
    assert_int_equal(r.lines, 9);
    assert_int_equal(r.imported, 5);
    assert_int_equal(r.skipped, 2);
    assert_int_equal(r.first_bad_line, 4);
    struct suppress_entry e;
    assert_int_equal(suppress_check(f->s, NULL, "b@x.example", &e), 1);
    assert_string_equal(e.note, "550, \"gone\"");
    assert_int_equal(e.added_ms, 1769860800000LL);
    assert_int_equal(suppress_check(f->s, "t1", "a@x.example", &e), 1);
    assert_int_equal(e.expires_ms, 2000000000000LL);
    assert_int_equal(e.reason, SUPPRESS_COMPLAINT);
    assert_int_equal(suppress_check(f->s, NULL, "anyone@whole.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "zzz@x.example", &e), 1);
    assert_int_equal(e.reason, SUPPRESS_UNSUBSCRIBE); /* replaced */
    assert_int_equal(suppress_check(f->s, NULL, "dup@x.example", &e), 1);
    assert_string_equal(e.note, "second");
    assert_int_equal(suppress_check(f->s, NULL, "keep@x.example", NULL), 1);

    size_t len;
    char *buf = export_csv(f, &len, 6);
    assert_non_null(strstr(buf, "address,scope,reason,added,expires,note\n"));
    assert_non_null(strstr(buf, "b@x.example,global,hard_bounce,2026-01-31T12:00:00Z,,"
                                "\"550, \"\"gone\"\"\"\n"));
    assert_non_null(strstr(buf, "a@x.example,t1,complaint,2023-11-14T22:13:20Z,"
                                "2033-05-18T03:33:20Z,fbl\n"));
    /* export -> import into an empty list gives the same export */
    suppress_close(f->s);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s/suppress", f->dir);
    assert_int_equal(system(cmd), 0);
    fix_open(f);
    import_csv(f, buf, len, &r);
    assert_int_equal(r.imported, 6);
    size_t len2;
    char *buf2 = export_csv(f, &len2, 6);
    assert_int_equal(len, len2);
    assert_memory_equal(buf, buf2, len);
    free(buf);
    free(buf2);
}

/* A spreadsheet's CSV: a UTF-8 byte order mark before the header (it
 * made the header a bad line: "line 1: unknown reason"), a note with line
 * breaks in quotes (RFC 4180; "bad quoting" before, and the lines after
 * it read as records of their own; a note keeps them as spaces), and the
 * export imports again. A quote inside an unquoted field, or a comment,
 * is text and opens nothing; a quote left open to the end of the file
 * spoils its own line only (the lines after it are read again). */
static void
test_csv_from_a_spreadsheet(void **state)
{
    struct fix *f = *state;
    const char *csv = "\xef\xbb\xbf"
                      "address,scope,reason,added,expires,note\r\n"
                      "one@x.example,,manual,,,\"line one\r\nline two, \"\"quoted\"\"\"\r\n"
                      "obrien@x.example,,manual,,,st\"ray\r\n"
                      "# from the crm,\"Q3 list\r\n"
                      "two@x.example,,manual,,,\"\"\r\n"
                      "four@x.example,,manual,,,\"oops\r\n"
                      "five@x.example,,manual,,,\r\n"
                      "six@x.example,,manual,,,note,\"an extra column\r\n"
                      "seven@x.example,,manual,,,\r\n"
                      "eight@x.example,,unsubscribed,,,\"called in:\r\nnine@x.example\"\r\n"
                      "three@x.example,,manual,,,\"never closed\r\n";
    struct suppress_import_result r;
    import_csv(f, csv, strlen(csv), &r);
    /* four's and three's open quotes spoil their own lines only: the
     * lines after them are records (a comment's quote opens nothing, nor
     * one in a column past the sixth, which is not read); eight's record
     * of two lines fails whole for its reason, nine is no record */
    assert_int_equal(r.lines, 13);
    assert_int_equal(r.imported, 6);
    assert_int_equal(r.skipped, 3);
    assert_int_equal(r.first_bad_line, 7);
    assert_int_equal(suppress_check(f->s, NULL, "five@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "four@x.example", NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "six@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "seven@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "eight@x.example", NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "nine@x.example", NULL), 0);
    struct suppress_entry e;
    assert_int_equal(suppress_check(f->s, NULL, "one@x.example", &e), 1);
    assert_string_equal(e.note, "line one line two, \"quoted\""); /* a note is one line */
    assert_int_equal(suppress_check(f->s, NULL, "obrien@x.example", &e), 1);
    assert_string_equal(e.note, "st\"ray");
    assert_int_equal(suppress_check(f->s, NULL, "two@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "three@x.example", NULL), 0);
    /* the export imports again */
    size_t len;
    char *buf = export_csv(f, &len, 6);
    assert_int_equal(suppress_remove(f->s, NULL, "one@x.example"), 0);
    import_csv(f, buf, len, &r);
    assert_int_equal(r.skipped, 0);
    assert_int_equal(r.imported, 6);
    assert_int_equal(suppress_check(f->s, NULL, "one@x.example", &e), 1);
    assert_string_equal(e.note, "line one line two, \"quoted\""); /* a note is one line */
    free(buf);
}

/* Excel for Mac's "CSV (Macintosh)" ends its lines with a CR alone: each
 * is a line (a quoted note's too). Before, the whole file was one line,
 * one bad address, nothing imported. */
static void
test_csv_mac_line_ends(void **state)
{
    struct fix *f = *state;
    const char *csv = "address,scope,reason,added,expires,note\r"
                      "one@x.example,,manual,,,\"two\rlines\"\r"
                      "two@x.example\r\n"
                      "three@x.example\r"
                      "four@x.example,,manual,,,\"never closed\r"
                      "five@x.example\r";
    struct suppress_import_result r;
    import_csv(f, csv, strlen(csv), &r);
    /* four's open quote spoils its own line: five is read again */
    assert_int_equal(r.lines, 7);
    assert_int_equal(r.imported, 4);
    assert_int_equal(r.skipped, 1);
    assert_int_equal(suppress_check(f->s, NULL, "five@x.example", NULL), 1);
    struct suppress_entry e;
    assert_int_equal(suppress_check(f->s, NULL, "one@x.example", &e), 1);
    assert_string_equal(e.note, "two lines");
    assert_int_equal(suppress_check(f->s, NULL, "two@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "three@x.example", NULL), 1);
}

/* A file in another encoding: an address in Latin-1 (Windows-1252, as
 * Excel on Windows saves CSV) is refused by name, for no recipient in
 * UTF-8 ever matched it (imported before, it was listed and never
 * refused); a note in it is kept as it is. A UTF-16 file is named so, not
 * "NUL octet". */
static void
test_csv_other_encodings(void **state)
{
    struct fix *f = *state;
    const char *csv = "m\xfcller@x.example,,manual,,,\n"
                      "ascii@x.example,,manual,,,caf\xe9\n"
                      "m\xc3\xbcller@x.example,,manual,,,\n";
    struct suppress_import_result r;
    import_csv(f, csv, strlen(csv), &r);
    assert_int_equal(r.imported, 2);
    assert_int_equal(r.skipped, 1);
    assert_string_equal(r.first_error, "line 1: address not UTF-8 (save the file as UTF-8)");
    assert_int_equal(suppress_check(f->s, NULL, "m\xc3\xbcller@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "ascii@x.example", NULL), 1);
    static const char utf16[] = "\xff\xfe" "a\0@\0x\0.\0t\0\n\0";
    import_csv(f, utf16, sizeof(utf16) - 1, &r);
    assert_int_equal(r.imported, 0);
    assert_string_equal(r.first_error, "line 1: UTF-16 (save the file as UTF-8)");
}

/* A line is read up to 65,536 octets: one longer (a hostile or broken
 * file: a gigabyte with no newline) is skipped as a bad line, named so,
 * and the lines after it are read. Before, getline held the whole line
 * in sluice's memory (as much as the file) and named it "bad address". */
static void
test_csv_long_line(void **state)
{
    struct fix *f = *state;
    size_t big = 8u << 20;
    const char *head = "long@x.example,,manual,,,";
    const char *tail = "\nok@x.example,,manual,,,\n"
                       "open@x.example,,manual,,,\"a note\n";
    size_t hl = strlen(head), tl = strlen(tail);
    size_t total = hl + big + tl + big + 32;
    char *csv = malloc(total);
    assert_non_null(csv);
    memcpy(csv, head, hl);
    memset(csv + hl, 'a', big);
    memcpy(csv + hl + big, tail, tl);
    size_t len = hl + big + tl;
    memset(csv + len, 'b', big); /* a record's next line, too long as well */
    len += big;
    len += (size_t)snprintf(csv + len, total - len, "\"\nlast@x.example\n");
    struct suppress_import_result r;
    import_csv(f, csv, len, &r);
    free(csv);
    assert_int_equal(r.imported, 2);
    assert_int_equal(r.skipped, 3); /* lines 1, 3 (its quote left open) and 4 */
    assert_int_equal(r.lines, 5);
    assert_string_equal(r.first_error, "line 1: a line over 65536 octets");
    assert_int_equal(suppress_check(f->s, NULL, "ok@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "last@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "long@x.example", NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "open@x.example", NULL), 0);
}

static void
test_reopen(void **state)
{
    struct fix *f = *state;
    assert_int_equal(suppress_add(f->s, NULL, "stay@x.example", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_feed(f->s, NULL, "fed@x.example", SUPPRESS_COMPLAINT, 0, NULL), 0);
    suppress_close(f->s); /* commits the feeds still waiting */
    fix_open(f);
    assert_int_equal(suppress_check(f->s, NULL, "stay@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, NULL, "fed@x.example", NULL), 1);
}

/* Scopes compare without case, as tenant names: an entry given under
 * one spelling (an operator's "foo" for a tenant the config does not
 * name yet) is found under any other (the config's later [tenant Foo],
 * at RCPT), removed under any, listed and imported the same way. */
static void
test_scope_case(void **state)
{
    struct fix *f = *state;
    struct suppress_entry e;
    assert_int_equal(suppress_add(f->s, "foo", "a@x.example", SUPPRESS_MANUAL, 0, "op"), 0);
    assert_int_equal(suppress_check(f->s, "Foo", "a@x.example", &e), 1);
    assert_string_equal(e.scope, "foo");
    assert_int_equal(suppress_add(f->s, "Bar.Co", "b@x.example", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, "bar.co", "b@x.example", &e), 1);
    assert_string_equal(e.scope, "bar.co");
    assert_int_equal(suppress_check(f->s, "BAR.CO", "b@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, "other", "b@x.example", NULL), 0);
    /* "GLOBAL" is the global list */
    assert_int_equal(suppress_add(f->s, "GLOBAL", "c@x.example", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_check(f->s, NULL, "c@x.example", &e), 1);
    assert_string_equal(e.scope, "global");
    assert_int_equal(suppress_list(f->s, "FOO", NULL, NULL, 0, count_one, NULL), 1);
    assert_int_equal(suppress_list(f->s, NULL, "Bar.Co", "b@x.example", 0, count_one, NULL), 2);
    assert_int_equal(suppress_remove(f->s, "fOO", "a@x.example"), 0);
    assert_int_equal(suppress_check(f->s, "foo", "a@x.example", NULL), 0);
    const char *csv = "d@x.example,Acme,,,,\n";
    struct suppress_import_result r;
    import_csv(f, csv, strlen(csv), &r);
    assert_int_equal(r.imported, 1);
    assert_int_equal(suppress_check(f->s, "ACME", "d@x.example", &e), 1);
    assert_string_equal(e.scope, "acme");
    char out[SUPPRESS_SCOPE_MAX + 1];
    assert_int_equal(suppress_normalize_scope("Customer-0042", out, sizeof(out)), 0);
    assert_string_equal(out, "customer-0042");
    assert_int_equal(suppress_normalize_scope(NULL, out, sizeof(out)), 0);
    assert_string_equal(out, "global");
    assert_int_equal(suppress_normalize_scope("a b", out, sizeof(out)), -EINVAL);
    assert_int_equal(suppress_normalize_scope("", out, sizeof(out)), -EINVAL);
}

/* The list closed and its LMDB environment opened as it is, to write
 * entries as an earlier version did: a write transaction begun in *txn
 * on the entries' database (*dbi). raw_end() ends it. */
static MDB_env *
raw_begin(struct fix *f, MDB_txn **txn, MDB_dbi *dbi)
{
    suppress_close(f->s);
    f->s = NULL;
    MDB_env *env;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 2), 0);
    assert_int_equal(mdb_env_set_mapsize(env, 64 << 20), 0);
    assert_int_equal(mdb_env_open(env, f->cfg.path, 0, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, 0, txn), 0);
    assert_int_equal(mdb_dbi_open(*txn, "entries", 0, dbi), 0);
    return env;
}

/* raw_begin()'s transaction committed, its environment closed, the list
 * opened again. */
static void
raw_end(struct fix *f, MDB_env *env, MDB_txn *txn)
{
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    fix_open(f);
}

/* Write key scope NUL addr with a value as suppress.c stores it. */
static void
raw_put(MDB_txn *txn, MDB_dbi dbi, const char *scope, const char *addr, int64_t expires,
        const char *note)
{
    uint8_t k[512], v[64];
    size_t sl = strlen(scope), al = strlen(addr), nl = strlen(note);
    memcpy(k, scope, sl + 1);
    memcpy(k + sl + 1, addr, al);
    uint16_t l16 = htole16((uint16_t)nl);
    uint64_t a = htole64((uint64_t)clock_unix_ms()), x = htole64((uint64_t)expires);
    v[0] = 1;
    v[1] = 3; /* manual */
    memcpy(v + 2, &l16, 2);
    memcpy(v + 4, &a, 8);
    memcpy(v + 12, &x, 8);
    memcpy(v + 20, note, nl);
    MDB_val kv = {sl + 1 + al, k}, vv = {20 + nl, v};
    assert_int_equal(mdb_put(txn, dbi, &kv, &vv, 0), 0);
}

/* A list an earlier version wrote under scopes as typed ("Foo", "BAR")
 * is folded at open: every entry is then found, under the lowercase
 * scope; where both spellings held the address, the entry that holds
 * longer stays. */
static void
test_scope_case_folded_at_open(void **state)
{
    struct fix *f = *state;
    assert_int_equal(suppress_add(f->s, "foo", "both@x.example", SUPPRESS_MANUAL,
                                  (int64_t)clock_unix_ms() + 3600000, "an hour"),
                     0);
    assert_int_equal(suppress_add(f->s, NULL, "g@x.example", SUPPRESS_MANUAL, 0, NULL), 0);
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_env *env = raw_begin(f, &txn, &dbi);
    raw_put(txn, dbi, "Foo", "a@x.example", 0, "typed Foo");
    raw_put(txn, dbi, "Foo", "both@x.example", 0, "for ever");
    raw_put(txn, dbi, "BAR", "b@x.example", 0, "typed BAR");
    raw_put(txn, dbi, "FOO", "c@x.example", 0, "typed FOO");
    raw_end(f, env, txn);
    struct suppress_entry e;
    assert_int_equal(suppress_check(f->s, "foo", "a@x.example", &e), 1);
    assert_string_equal(e.scope, "foo");
    assert_string_equal(e.note, "typed Foo");
    assert_int_equal(suppress_check(f->s, "Foo", "c@x.example", NULL), 1);
    assert_int_equal(suppress_check(f->s, "bar", "b@x.example", &e), 1);
    assert_string_equal(e.scope, "bar");
    assert_int_equal(suppress_check(f->s, "foo", "both@x.example", &e), 1);
    assert_string_equal(e.note, "for ever");
    assert_int_equal(e.expires_ms, 0);
    assert_int_equal(suppress_check(f->s, NULL, "g@x.example", NULL), 1);
    struct suppress_stats st;
    suppress_stats(f->s, &st);
    assert_int_equal(st.entries, 5);
    assert_int_equal(suppress_list(f->s, "foo", NULL, NULL, 0, count_one, NULL), 3);
}

/* An entry an earlier version stored for a local part that is no
 * dot-string (user.@, written as typed: the quotes came with 54ff884)
 * is still found, and can still be removed, once such addresses are
 * taken at RCPT and looked up in their quoted form. */
static void
test_unquoted_dots_stored_before(void **state)
{
    struct fix *f = *state;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_env *env = raw_begin(f, &txn, &dbi);
    raw_put(txn, dbi, SUPPRESS_SCOPE_GLOBAL, "user.@docomo.example", 0, "imported");
    raw_end(f, env, txn);
    assert_int_equal(suppress_check(f->s, NULL, "user.@docomo.example", NULL), 1);
    assert_int_equal(suppress_remove(f->s, NULL, "user.@docomo.example"), 0);
    assert_int_equal(suppress_check(f->s, NULL, "user.@docomo.example", NULL), 0);
    /* both forms stored (the old entry, then a re-import's): one removal
     * takes both, or the address stayed suppressed */
    env = raw_begin(f, &txn, &dbi);
    raw_put(txn, dbi, SUPPRESS_SCOPE_GLOBAL, "user.@docomo.example", 0, "imported");
    raw_end(f, env, txn);
    assert_int_equal(suppress_add(f->s, NULL, "user.@docomo.example", SUPPRESS_MANUAL, 0, NULL), 0);
    assert_int_equal(suppress_remove(f->s, NULL, "user.@docomo.example"), 0);
    assert_int_equal(suppress_check(f->s, NULL, "user.@docomo.example", NULL), 0);
    assert_int_equal(suppress_remove(f->s, NULL, "user.@docomo.example"), -ENOENT);
}

static void
test_config_check(void **state)
{
    (void)state;
    struct suppress_config c = {0};
    char err[256];
    assert_int_equal(conf_defaults(suppress_conf_keys, &c, err, sizeof(err)), 0);
    assert_int_equal(suppress_config_check(&c, "/var/spool/x", err, sizeof(err)), 0);
    assert_string_equal(c.path, "/var/spool/x/suppress");
    assert_int_equal(c.invalid_recipient_ttl, -1);
    assert_int_equal(c.complaint_ttl, 0);
    assert_int_equal(conf_set(suppress_conf_keys, &c, "reply", "250 ok", err, sizeof(err)), 0);
    assert_int_equal(suppress_config_check(&c, NULL, err, sizeof(err)), -EINVAL);
    assert_int_equal(conf_set(suppress_conf_keys, &c, "reply", "550 5.7.1 no", err, sizeof(err)), 0);
    assert_int_equal(conf_set(suppress_conf_keys, &c, "on_complaint", "soon", err, sizeof(err)), 0);
    assert_int_equal(suppress_config_check(&c, NULL, err, sizeof(err)), -EINVAL);
    assert_non_null(strstr(err, "on_complaint"));
    conf_free(suppress_conf_keys, &c);
}

static void
test_reply(void **state)
{
    struct fix *f = *state;
    struct suppress_entry e = {.reason = SUPPRESS_COMPLAINT};
    char out[256];
    suppress_reply(f->s, "a@b.example", &e, out, sizeof(out));
    assert_string_equal(out, "550 5.7.1 <a@b.example>: recipient suppressed (complaint)");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_add_check_remove, setup, teardown),
        cmocka_unit_test_setup_teardown(test_domain_and_scope, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expiry_and_purge, setup, teardown),
        cmocka_unit_test_setup_teardown(test_purge_in_batches, setup, teardown),
        cmocka_unit_test_setup_teardown(test_import_cut_by_the_stop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_import_of_two_line_records_cut_while_read, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_import_cut_counts_each_entry_once, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_import_sort_cut_by_the_stop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_import_sort_at_the_edges_of_its_runs, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_normalisation, setup_norm, teardown),
        cmocka_unit_test_setup_teardown(test_normalisation_off, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bounce_policy, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bounce_policy_on, setup_norm, teardown),
        cmocka_unit_test_setup_teardown(test_fed_entries_hold_without_case, setup, teardown),
        cmocka_unit_test_setup_teardown(test_feed_threads, setup, teardown),
        cmocka_unit_test_setup_teardown(test_list_pages, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csv_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csv_from_a_spreadsheet, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csv_long_line, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csv_mac_line_ends, setup, teardown),
        cmocka_unit_test_setup_teardown(test_csv_other_encodings, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_move_scope, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scope_case, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scope_case_folded_at_open, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unquoted_dots_stored_before, setup, teardown),
        cmocka_unit_test(test_config_check),
        cmocka_unit_test(test_notes_wait_for_room),
        cmocka_unit_test(test_detach_says_a_slow_notes_trim),
        cmocka_unit_test(test_detach_from_a_stuck_spool_asks_no_trim),
        cmocka_unit_test(test_detach_from_a_stuck_spool_ends_a_trim_in_flight),
        cmocka_unit_test_setup_teardown(test_reply, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
