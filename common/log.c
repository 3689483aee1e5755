/*
 * log: see log.h. The destination fd and level live in atomics so that
 * logging takes no lock; reopen replaces the fd and closes the old one
 * after the swap (a writer racing the swap may write to the old file,
 * which is what logrotate's rename expects).
 */
#include "common/log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>

static _Atomic int log_fd = 2;
static _Atomic int log_min = LOG_INFO;
static char *log_path; /* owned; NULL for stderr. Changed only by log_open/close. */
static pthread_mutex_t log_path_lock = PTHREAD_MUTEX_INITIALIZER;
static _Thread_local const char *log_thread;

static const char *const level_names[] = {"debug", "info", "notice", "warn", "error", "crit"};

const char *
log_level_str(enum log_level level)
{
    if ((unsigned)level < sizeof(level_names) / sizeof(level_names[0]))
        return level_names[level];
    return "?";
}

int
log_level_parse(const char *s)
{
    for (unsigned i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++)
        if (strcmp(s, level_names[i]) == 0)
            return (int)i;
    if (strcmp(s, "warning") == 0)
        return LOG_WARN;
    if (strcmp(s, "err") == 0)
        return LOG_ERR;
    return -1;
}

static int
is_stderr_path(const char *path)
{
    return path == NULL || path[0] == '\0' || strcmp(path, "-") == 0 ||
           strcmp(path, "stderr") == 0;
}

static int
open_path(const char *path)
{
    if (is_stderr_path(path))
        return 2;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    return fd < 0 ? -errno : fd;
}

int
log_open(const char *path, enum log_level min_level)
{
    int fd = open_path(path);
    if (fd < 0)
        return fd;
    pthread_mutex_lock(&log_path_lock);
    char *copy = is_stderr_path(path) ? NULL : strdup(path);
    free(log_path);
    log_path = copy;
    int old = atomic_exchange(&log_fd, fd);
    if (old > 2 && old != fd)
        close(old);
    pthread_mutex_unlock(&log_path_lock);
    atomic_store(&log_min, (int)min_level);
    return 0;
}

int
log_reopen(void)
{
    pthread_mutex_lock(&log_path_lock);
    int rc = 0;
    if (log_path != NULL) {
        int fd = open_path(log_path);
        if (fd < 0) {
            rc = fd;
        } else {
            int old = atomic_exchange(&log_fd, fd);
            if (old > 2)
                close(old);
        }
    }
    pthread_mutex_unlock(&log_path_lock);
    return rc;
}

void
log_close(void)
{
    pthread_mutex_lock(&log_path_lock);
    int old = atomic_exchange(&log_fd, 2);
    if (old > 2)
        close(old);
    free(log_path);
    log_path = NULL;
    pthread_mutex_unlock(&log_path_lock);
}

void
log_set_level(enum log_level min_level)
{
    atomic_store(&log_min, (int)min_level);
}

enum log_level
log_get_level(void)
{
    return (enum log_level)atomic_load_explicit(&log_min, memory_order_relaxed);
}

void
log_set_thread_name(const char *name)
{
    log_thread = name;
}

void
log_vmsg(enum log_level level, const char *fmt, va_list ap)
{
    if (!log_enabled(level))
        return;
    char line[2048];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, log_level_str(level));
    if (log_thread != NULL && n > 0 && (size_t)n < sizeof(line))
        n += snprintf(line + n, sizeof(line) - (size_t)n, "thread=%s ", log_thread);
    if (n > 0 && (size_t)n < sizeof(line))
        n += vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof(line) - 1) {
        /* Truncated: keep the line a line and say so. */
        static const char mark[] = " truncated=1";
        n = (int)(sizeof(line) - sizeof(mark) - 1);
        memcpy(line + n, mark, sizeof(mark) - 1);
        n += (int)sizeof(mark) - 1;
    }
    line[n++] = '\n';
    int fd = atomic_load_explicit(&log_fd, memory_order_relaxed);
    ssize_t off = 0;
    while (off < n) {
        ssize_t w = write(fd, line + off, (size_t)(n - off));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return; /* nowhere left to report it */
        }
        off += w;
    }
}

void
log_msg(enum log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vmsg(level, fmt, ap);
    va_end(ap);
}
