/*
 * sluice-spool leaves the spool it reads as it was: on a spool of an
 * older sluice (schema 1), count, check and dump succeed and leave the
 * schema number, the data file's size, blocks and time alone. It makes
 * no file in the spool's directory (neither sluice.lock nor LMDB's
 * lock.mdb): on a copy of data.mdb alone, on a copy that may not be
 * written (chmod a-w, read by a user that is not root), and on a spool a
 * sluice holds, which it refuses. The tool comes from $SLUICE_SPOOL (set
 * by ctest); without it the test skips.
 *
 * Threading: one thread; the tool runs as a child process.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "queue/queue.h"

static const char *tool;

static int
rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* The schema record; set it to set when set is not 0. */
static uint32_t
schema(const char *path, uint32_t set)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    assert_int_equal(mdb_env_create(&env), 0);
    assert_int_equal(mdb_env_set_maxdbs(env, 8), 0);
    assert_int_equal(mdb_env_open(env, path, set != 0 ? 0 : MDB_RDONLY, 0600), 0);
    assert_int_equal(mdb_txn_begin(env, NULL, set != 0 ? 0 : MDB_RDONLY, &txn), 0);
    assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
    MDB_val k = {6, "schema"}, v;
    assert_int_equal(mdb_get(txn, dbi, &k, &v), 0);
    uint32_t was;
    memcpy(&was, v.mv_data, sizeof(was));
    if (set != 0) {
        MDB_val nv = {sizeof(set), &set};
        assert_int_equal(mdb_put(txn, dbi, &k, &nv, 0), 0);
    }
    assert_int_equal(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    return was;
}

/* Exit status of sluice-spool CMD DIR, its output thrown away; as user
 * and group uid when uid is not -1 (root's test drops its rights). */
static int
run_tool_as(const char *cmd, const char *dir, int uid)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        if (fd >= 0)
            dup2(fd, 1);
        if (uid != -1 &&
            (setgroups(0, NULL) != 0 || setgid((gid_t)uid) != 0 || setuid((uid_t)uid) != 0))
            _exit(126);
        execl(tool, tool, cmd, dir, (char *)NULL);
        _exit(127);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static int
run_tool(const char *cmd, const char *dir)
{
    return run_tool_as(cmd, dir, -1);
}

/* The names in dir, sorted, comma separated, into out. */
static void
names(const char *dir, char *out, size_t outlen)
{
    struct dirent **list;
    int n = scandir(dir, &list, NULL, alphasort);
    assert_true(n >= 0);
    out[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (strcmp(list[i]->d_name, ".") != 0 && strcmp(list[i]->d_name, "..") != 0) {
            size_t l = strlen(out);
            snprintf(out + l, outlen - l, "%s%s", l > 0 ? "," : "", list[i]->d_name);
        }
        free(list[i]);
    }
    free(list);
}

/* A spool with one message at dir/spool, closed; dir made. */
static void
make_spool(char *dir, size_t dirlen, char *spool, size_t spoollen)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, dirlen, "%s/sluice-spool-tool-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    assert_non_null(mkdtemp(dir));
    snprintf(spool, spoollen, "%s/spool", dir);
    struct queue_config cfg;
    char err[512];
    memset(&cfg, 0, sizeof(cfg));
    assert_int_equal(conf_defaults(queue_conf_keys, &cfg, err, sizeof(err)), 0);
    free(cfg.path);
    cfg.path = strdup(spool);
    cfg.map_size = 64ULL << 20;
    struct queue *q;
    assert_int_equal(queue_open(&cfg, &q, err, sizeof(err)), 0);
    struct queue_rcpt rc = {.addr = "a@example.org"};
    struct queue_envelope env = {
        .id = queue_id_next(q), .sender = "s@example.com", .nrcpt = 1, .rcpt = &rc};
    struct iovec iov = {"body\r\n", 6};
    assert_int_equal(queue_enqueue_wait(q, &env, &iov, 1), 0);
    queue_close(q);
    conf_free(queue_conf_keys, &cfg);
}

/* Copy file from to to, mode mode. */
static void
copy_file(const char *from, const char *to, mode_t mode)
{
    FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
    assert_non_null(in);
    assert_non_null(out);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), in)) > 0)
        assert_int_equal(fwrite(buf, 1, n, out), n);
    fclose(in);
    assert_int_equal(fclose(out), 0);
    assert_int_equal(chmod(to, mode), 0);
}

static const char *const cmds[] = {"count", "check", "dump"};

/* A copy of the spool (data.mdb alone, as mdb_copy or a backup of the
 * data file gives; then with every file of a stopped spool, made
 * read-only): every command works, and no file appears. Before the fix
 * the tool made sluice.lock and lock.mdb in the first, and failed in the
 * read-only one (it could make neither). */
static void
test_copy_gets_no_new_file(void **state)
{
    (void)state;
    char dir[256], spool[300], copy[300], from[340], to[340], got[256];
    make_spool(dir, sizeof(dir), spool, sizeof(spool));
    snprintf(copy, sizeof(copy), "%s/copy", dir);
    assert_int_equal(mkdir(copy, 0755), 0);
    snprintf(from, sizeof(from), "%s/data.mdb", spool);
    snprintf(to, sizeof(to), "%s/data.mdb", copy);
    copy_file(from, to, 0600);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(run_tool(cmds[i], copy), 0);
        names(copy, got, sizeof(got));
        assert_string_equal(got, "data.mdb");
    }

    /* read-only: chmod a-w, read by a user that is not root, for whom
     * the modes hold (root's test runs the tool as nobody) */
    int uid = geteuid() == 0 ? 65534 : -1;
    assert_int_equal(chmod(dir, 0755), 0);
    static const char *const files[] = {"data.mdb", "lock.mdb", "sluice.lock"};
    for (int all = 0; all < 2; all++) {
        /* data.mdb alone, then every file a stopped sluice leaves */
        for (size_t i = 0; i < (all ? 3 : 1); i++) {
            snprintf(from, sizeof(from), "%s/%s", spool, files[i]);
            snprintf(to, sizeof(to), "%s/%s", copy, files[i]);
            chmod(to, 0600);
            copy_file(from, to, 0444);
        }
        assert_int_equal(chmod(copy, 0555), 0);
        char want[256];
        names(copy, want, sizeof(want));
        assert_string_equal(want, all ? "data.mdb,lock.mdb,sluice.lock" : "data.mdb");
        for (size_t i = 0; i < 3; i++) {
            assert_int_equal(run_tool_as(cmds[i], copy, uid), 0);
            names(copy, got, sizeof(got));
            assert_string_equal(got, want);
        }
        assert_int_equal(chmod(copy, 0755), 0);
    }
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* A spool a sluice holds (queue_open's exclusive lock): every command
 * refuses it, and leaves its directory as it was. */
static void
test_held_spool_refused(void **state)
{
    (void)state;
    char dir[256], spool[300], before[256], after[256];
    make_spool(dir, sizeof(dir), spool, sizeof(spool));
    struct queue_config cfg;
    char err[512];
    memset(&cfg, 0, sizeof(cfg));
    assert_int_equal(conf_defaults(queue_conf_keys, &cfg, err, sizeof(err)), 0);
    free(cfg.path);
    cfg.path = strdup(spool);
    cfg.map_size = 64ULL << 20;
    struct queue *q;
    assert_int_equal(queue_open(&cfg, &q, err, sizeof(err)), 0);
    names(spool, before, sizeof(before));
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(run_tool(cmds[i], spool), 1);
        names(spool, after, sizeof(after));
        assert_string_equal(after, before);
    }
    queue_close(q);
    conf_free(queue_conf_keys, &cfg);
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void
test_read_commands_change_nothing(void **state)
{
    (void)state;
    char dir[256], spool[300], data[320], copy[340];
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof(dir), "%s/sluice-spool-tool-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    assert_non_null(mkdtemp(dir));
    snprintf(spool, sizeof(spool), "%s/spool", dir);
    snprintf(data, sizeof(data), "%s/data.mdb", spool);
    snprintf(copy, sizeof(copy), "%s/data.copy", spool);

    struct queue_config cfg;
    char err[512];
    memset(&cfg, 0, sizeof(cfg));
    assert_int_equal(conf_defaults(queue_conf_keys, &cfg, err, sizeof(err)), 0);
    free(cfg.path);
    cfg.path = strdup(spool);
    cfg.map_size = 64ULL << 20;
    struct queue *q;
    assert_int_equal(queue_open(&cfg, &q, err, sizeof(err)), 0);
    struct queue_rcpt rc = {.addr = "a@example.org"};
    struct queue_envelope env = {
        .id = queue_id_next(q), .sender = "s@example.com", .nrcpt = 1, .rcpt = &rc};
    struct iovec iov = {"body\r\n", 6};
    assert_int_equal(queue_enqueue_wait(q, &env, &iov, 1), 0);
    queue_close(q);
    conf_free(queue_conf_keys, &cfg);

    /* as an older sluice left it, copied without the blocks a sluice
     * keeps allocated past the end of the data */
    assert_int_equal(schema(spool, 1), 2);
    FILE *in = fopen(data, "rb"), *out = fopen(copy, "wb");
    assert_non_null(in);
    assert_non_null(out);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), in)) > 0)
        assert_int_equal(fwrite(buf, 1, n, out), n);
    fclose(in);
    assert_int_equal(fclose(out), 0);
    assert_int_equal(rename(copy, data), 0);

    struct stat before, after;
    assert_int_equal(stat(data, &before), 0);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(run_tool(cmds[i], spool), 0);
        assert_int_equal(schema(spool, 0), 1);
        assert_int_equal(stat(data, &after), 0);
        assert_int_equal(after.st_size, before.st_size);
        assert_int_equal(after.st_blocks, before.st_blocks);
        assert_int_equal(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
        assert_int_equal(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
    }
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* How sluice-spool CMD DIR ended: its exit status, or 128 + the signal
 * that killed it (a hang ends by the alarm: SIGALRM). Output thrown
 * away; stderr too, when quiet. */
static int
run_tool_end(const char *cmd, const char *dir, bool quiet)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        if (fd >= 0) {
            dup2(fd, 1);
            if (quiet)
                dup2(fd, 2);
        }
        alarm(20); /* kept across exec */
        execl(tool, tool, cmd, dir, (char *)NULL);
        _exit(127);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* A spool damaged inside its pages (LMDB keeps no checksum: a bad node
 * count or a zeroed page is followed where it points): every command
 * ends with status 0 or 1, never by a signal or a hang, and some report
 * the damage. Each page past the two meta pages in turn, three ways.
 * Before the fix, several runs died of SIGSEGV, SIGBUS or LMDB's
 * assertion (SIGABRT), and list went round for ever on a leaf page whose
 * node count was garbage. */
static void
test_damaged_pages_reported(void **state)
{
    (void)state;
    char dir[256], spool[300], data[320], work[320], wdata[340];
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof(dir), "%s/sluice-spool-tool-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    assert_non_null(mkdtemp(dir));
    snprintf(spool, sizeof(spool), "%s/spool", dir);
    snprintf(data, sizeof(data), "%s/data.mdb", spool);
    snprintf(work, sizeof(work), "%s/work", dir);
    snprintf(wdata, sizeof(wdata), "%s/data.mdb", work);
    assert_int_equal(mkdir(work, 0700), 0);

    struct queue_config cfg;
    char err[512];
    memset(&cfg, 0, sizeof(cfg));
    assert_int_equal(conf_defaults(queue_conf_keys, &cfg, err, sizeof(err)), 0);
    free(cfg.path);
    cfg.path = strdup(spool);
    cfg.map_size = 64ULL << 20;
    struct queue *q;
    assert_int_equal(queue_open(&cfg, &q, err, sizeof(err)), 0);
    /* enough for trees of two levels, and bodies on overflow pages */
    static char big[9000];
    memset(big, 'x', sizeof(big));
    for (int i = 0; i < 40; i++) {
        char a[64], b[64];
        snprintf(a, sizeof(a), "user%d@example.org", i);
        snprintf(b, sizeof(b), "other%d@example.net", i);
        struct queue_rcpt rc[2] = {{.addr = a}, {.addr = b}};
        struct queue_envelope env = {
            .id = queue_id_next(q), .sender = "s@example.com", .nrcpt = 2, .rcpt = rc};
        struct iovec iov = {big, i % 4 == 0 ? sizeof(big) : 300};
        assert_int_equal(queue_enqueue_wait(q, &env, &iov, 1), 0);
    }
    queue_close(q);
    conf_free(queue_conf_keys, &cfg);

    FILE *f = fopen(data, "rb");
    assert_non_null(f);
    static unsigned char orig[1 << 20], img[1 << 20];
    size_t len = fread(orig, 1, sizeof(orig), f);
    fclose(f);
    const size_t psize = 4096;
    assert_true(len > 10 * psize && len < sizeof(orig));
    static const char *const all[] = {"count", "check", "list", "dump"};
    unsigned reported = 0, runs = 0;
    for (size_t pg = 2; pg < len / psize; pg++) {
        for (int how = 0; how < 3; how++) {
            memcpy(img, orig, len);
            unsigned char *p = img + pg * psize;
            if (how == 0) {
                p[12] = 0xf0; /* mp_lower: a node count of garbage */
                p[13] = 0x0f;
            } else if (how == 1) {
                memset(p + 8, 0xff, 8); /* flags, lower, upper */
            } else {
                memset(p, 0, psize);
            }
            f = fopen(wdata, "wb");
            assert_non_null(f);
            assert_int_equal(fwrite(img, 1, len, f), len);
            assert_int_equal(fclose(f), 0);
            for (size_t c = 0; c < 4; c++) {
                int end = run_tool_end(all[c], work, true);
                if (end != 0 && end != 1)
                    fprintf(stderr, "page %zu, damage %d: %s ended with %d\n", pg, how, all[c],
                            end);
                assert_true(end == 0 || end == 1);
                reported += end == 1;
                runs++;
            }
        }
    }
    assert_true(reported > 0 && reported < runs);
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

int
main(void)
{
    tool = getenv("SLUICE_SPOOL");
    if (tool == NULL || access(tool, X_OK) != 0) {
        fprintf(stderr, "SKIP: SLUICE_SPOOL does not name the sluice-spool tool\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_commands_change_nothing),
        cmocka_unit_test(test_copy_gets_no_new_file),
        cmocka_unit_test(test_held_spool_refused),
        cmocka_unit_test(test_damaged_pages_reported),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
