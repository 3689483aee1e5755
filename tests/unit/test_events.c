/*
 * test_events: the events module (pump and sinks) over a real spool in a
 * temporary directory, with small journal segments (the test hook
 * SLUICE_TEST_EVENTS_SEGMENT). The sinks are paused or talk to a socket
 * of this test on loopback: no server runs. Checks what the journal
 * keeps on disk (segments nobody needs are deleted, also when no sink is
 * left; segments a sink still needs are not, also while a reload
 * restarts it).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/conf.h"
#include "engine/events.h"
#include "engine/events_journal.h"
#include "queue/queue.h"

#define SEGMENT 1024 /* octets: a few lines a segment */

static char dir[256];
static char evdir[300];
static struct queue *q;
static struct queue_port *port;

static void
rm_tree(const char *path)
{
    DIR *d = opendir(path);
    if (d == NULL) {
        unlink(path);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' && (de->d_name[1] == '\0' || de->d_name[1] == '.'))
            continue;
        char p[700];
        snprintf(p, sizeof(p), "%s/%s", path, de->d_name);
        rm_tree(p);
    }
    closedir(d);
    rmdir(path);
}

static int
setup(void **state)
{
    (void)state;
    snprintf(dir, sizeof(dir), "/tmp/sluice-ev-XXXXXX");
    assert_non_null(mkdtemp(dir));
    snprintf(evdir, sizeof(evdir), "%s/spool/events", dir);
    setenv("SLUICE_TEST_EVENTS_SEGMENT", "1024", 1);
    struct queue_config qc = {0};
    char err[512], path[300];
    assert_int_equal(conf_defaults(queue_conf_keys, &qc, err, sizeof(err)), 0);
    free(qc.path);
    snprintf(path, sizeof(path), "%s/spool", dir);
    qc.path = strdup(path);
    qc.map_size = 64ULL << 20;
    int rc = queue_open(&qc, &q, err, sizeof(err));
    free(qc.path);
    if (rc != 0)
        fail_msg("queue_open: %s", err);
    port = queue_port_new();
    assert_non_null(port);
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    port = queue_port_free(port);
    queue_close(q);
    q = NULL;
    rm_tree(dir);
    return 0;
}

static struct events_sink_config
sink_cfg(const char *name, const char *url, bool paused)
{
    struct events_sink_config c = {0};
    char err[256];
    assert_int_equal(conf_defaults(events_sink_keys, &c, err, sizeof(err)), 0);
    c.name = (char *)name;
    c.url = strdup(url);
    c.paused = paused;
    return c;
}

static void
sink_cfg_fini(struct events_sink_config *c)
{
    c->name = NULL;
    conf_free(events_sink_keys, c);
}

static void
put_done(void *cookie, int rc)
{
    (void)cookie;
    assert_int_equal(rc, 0);
}

/* Commit n event lines (about 100 octets each) from number base on, and
 * wait until they are durable. */
static void
put_lines(unsigned base, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        char line[160];
        int len = snprintf(line, sizeof(line),
                           "{\"time\":\"2026-01-02T03:04:05.678Z\",\"event\":\"delivery\","
                           "\"id\":\"t%06u\",\"pad\":\"%040u\"}\n",
                           base + i, base + i);
        assert_int_equal(queue_events_put(q, port, line, (size_t)len, put_done, NULL), 0);
    }
    while (queue_port_pending(port) > 0)
        assert_true(queue_port_wait(port, 10000) >= 0);
}

/* The number after the last line written to the journal's files (its
 * last segment's first number and its lines): the pump has read those
 * lines from the spool and is appending them, or is done with them. */
static uint64_t
journal_written(void)
{
    DIR *d = opendir(evdir);
    assert_non_null(d);
    char last[64] = "";
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        if (strlen(de->d_name) == 37 && strcmp(de->d_name + 33, ".seg") == 0 &&
            strcmp(de->d_name, last) > 0)
            snprintf(last, sizeof(last), "%s", de->d_name);
    closedir(d);
    assert_true(last[0] != '\0');
    unsigned long long off, seq;
    assert_int_equal(sscanf(last, "%16llx-%16llx", &off, &seq), 2);
    char path[400];
    snprintf(path, sizeof(path), "%s/%s", evdir, last);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0; /* replaced meanwhile: ask again */
    int ch;
    while ((ch = fgetc(f)) != EOF)
        seq += ch == '\n';
    fclose(f);
    return seq;
}

static void
wait_written(uint64_t seq)
{
    for (int i = 0; i < 10000; i++) {
        if (journal_written() >= seq)
            return;
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    fail_msg("the pump did not copy the events up to %llu to the journal",
             (unsigned long long)seq);
}

/* Commit lines in rounds, each in the journal's files before the next is
 * committed: one append a round (a new segment once the last passed
 * SEGMENT), and the pump finished with a round (appended, fsynced,
 * trimmed) before it takes the next. */
static void
put_rounds(unsigned base, unsigned rounds, unsigned per)
{
    for (unsigned r = 0; r < rounds; r++) {
        put_lines(base + r * per, per);
        wait_written(base + (r + 1) * per);
    }
}

static unsigned
segments(void)
{
    DIR *d = opendir(evdir);
    assert_non_null(d);
    unsigned n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        n += strlen(de->d_name) > 4 && strcmp(de->d_name + strlen(de->d_name) - 4, ".seg") == 0;
    closedir(d);
    return n;
}

static struct events *
start(struct events_sink_config *c, unsigned n)
{
    struct events *ev = NULL;
    char err[256] = "";
    int rc = events_new(c, n, evdir, q, &ev, err, sizeof(err));
    if (rc != 0)
        fail_msg("events_new: %s", err);
    return ev;
}

/* The journal's end, read once the module is gone. */
static struct journal_pos
journal_end_now(struct journal_pos *begin)
{
    struct journal *j = NULL;
    char err[256];
    assert_int_equal(journal_open(evdir, SEGMENT, &j, err, sizeof(err)), 0);
    struct journal_pos end;
    journal_end(j, &end);
    journal_begin(j, begin);
    journal_close(j);
    return end;
}

/* A reload that leaves no sink: the pump still copies every event to
 * the journal (the spool must be trimmed), and the segments nobody needs
 * go, instead of piling up on disk until the next restart. */
static void
test_no_sink_left_journal_is_trimmed(void **state)
{
    (void)state;
    struct events_sink_config c = sink_cfg("a", "http://127.0.0.1:9/events", true);
    struct events *ev = start(&c, 1);
    assert_int_equal(events_reconfigure(ev, NULL, 0), 0);
    put_rounds(0, 10, 20); /* 2 kB a round: 10 segments */
    events_free(ev);   /* the pump copies what is durable before it stops */
    struct journal_pos begin, end = journal_end_now(&begin);
    assert_int_equal(end.seq, 200);
    unsigned n = segments();
    if (n > 2)
        fail_msg("%u segments kept with no sink left (begin seq %llu)", n,
                 (unsigned long long)begin.seq);
    sink_cfg_fini(&c);
}

/* A paused sink keeps every segment after its cursor. */
static void
test_paused_sink_keeps_its_backlog(void **state)
{
    (void)state;
    struct events_sink_config c = sink_cfg("a", "http://127.0.0.1:9/events", true);
    struct events *ev = start(&c, 1);
    put_rounds(0, 10, 20);
    events_free(ev);
    struct journal_pos begin, end = journal_end_now(&begin);
    assert_int_equal(end.seq, 200);
    assert_int_equal(begin.seq, 0);
    assert_true(segments() >= 10);
    sink_cfg_fini(&c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_no_sink_left_journal_is_trimmed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_paused_sink_keeps_its_backlog, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
