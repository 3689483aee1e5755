/*
 * libFuzzer target: the submission session as a whole (engine/server.c),
 * bytes in, replies out, through the server's own state machine with no
 * socket, ring or spool (server_session_feed()). The first octet picks the
 * read size (how the input is cut, as the network would) and whether the
 * spool's commits succeed, fail for space or fail otherwise; the rest is
 * what the client sends. The config keeps the limits small so that the
 * fuzzer reaches them: 64 KiB messages, 8 recipients, 256 KiB of body
 * memory across sessions.
 *
 * Invariants: every reply is whole lines of "NNN" + ' ' or '-' + text +
 * CRLF, codes 2xx to 5xx, with no CR or LF inside a line; at most
 * one session at a time holds body memory and it is all given back when
 * the session ends; nothing leaks (ASan).
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "engine/config.h"
#include "engine/engine.h"
#include "engine/server.h"
#include "engine/worker.h"
#include "queue/queue.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define OUT_MAX (1 << 20)

static struct engine eng;
static struct worker wk;
static struct server_worker *sw;
static char *replies;

static void
check(int cond)
{
    if (!cond)
        abort();
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    static const char conf[] = "[server]\n"
                               "hostname = fuzz.sluice.test\n"
                               "listen = 127.0.0.1:1\n"
                               "trusted_networks = 127.0.0.0/8\n"
                               "max_message_size = 64K\n"
                               "body_memory_limit = 256K\n"
                               "max_recipients = 8\n"
                               "max_errors = 50\n"
                               "[queue]\n"
                               "path = /nonexistent/sluice-fuzz\n";
    char path[] = "/tmp/sluice-fuzz-session-XXXXXX";
    int fd = mkstemp(path);
    check(fd >= 0);
    check(write(fd, conf, sizeof(conf) - 1) == (ssize_t)(sizeof(conf) - 1));
    close(fd);
    struct config *cfg = NULL;
    int rc = config_load(path, &cfg, stderr);
    unlink(path);
    check(rc == 0 && cfg != NULL);
    check(log_open("/dev/null", LOG_CRIT) == 0);
    eng.cfg = cfg;
    pthread_mutex_init(&eng.users_lock, NULL);
    check(timer_heap_init(&wk.timers, 64) == 0);
    sw = server_worker_new_detached(&eng, &wk);
    check(sw != NULL);
    replies = malloc(OUT_MAX);
    check(replies != NULL);
    return 0;
}

/* Whole reply lines only. */
static void
check_replies(const char *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        const char *crlf = memchr(p + i, '\n', n - i);
        check(crlf != NULL);
        size_t len = (size_t)(crlf - (p + i)) + 1;
        check(len >= 6 && p[i + len - 2] == '\r');
        check(p[i] >= '2' && p[i] <= '5');
        check(p[i + 1] >= '0' && p[i + 1] <= '9' && p[i + 2] >= '0' && p[i + 2] <= '9');
        check(p[i + 3] == ' ' || p[i + 3] == '-');
        check(memchr(p + i, '\r', len - 2) == NULL);
        i += len;
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const int commit_rcs[] = {0, 0, QUEUE_EMAPFULL, -EIO};
    static const size_t reads[] = {0, 1, 2, 3, 7, 64, 1000, 4096};
    if (size < 1)
        return 0;
    size_t read_max = reads[data[0] & 7];
    int commit_rc = commit_rcs[(data[0] >> 3) & 3];
    struct session *s = server_session_new_detached(sw);
    if (s == NULL)
        return 0;
    bool closed = false;
    size_t n = server_session_feed(s, (const char *)data + 1, size - 1, read_max, commit_rc,
                                   replies, OUT_MAX, &closed);
    if (n < OUT_MAX)
        check_replies(replies, n);
    if (getenv("FUZZ_SESSION_PRINT") != NULL) /* to see what a seed does */
        fwrite(replies, 1, n < OUT_MAX ? n : OUT_MAX, stdout);
    if (!closed)
        server_session_end(s);
    check(atomic_load(&eng.body_bytes) == 0);
    return 0;
}
