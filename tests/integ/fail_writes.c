/*
 * fail-writes: an LD_PRELOAD shim for tests, a disk that fails its
 * writes. While the file named by FAIL_WRITES_TRIGGER exists, write(2),
 * pwrite(2), writev(2) and pwritev(2) to a file whose path ends with
 * FAIL_WRITES_PATH fail with EIO (LMDB writes its pages and meta pages
 * with the first three, so a commit of that environment fails; the event
 * journal appends with pwritev), and so does rename(2) of a file whose
 * path ends so (the journal numbers on past a gap by renaming an empty
 * segment); every other call passes through.
 * With FAIL_WRITES_MODE=stall they wait instead, for as long as the
 * trigger exists (at most ten minutes), then go on: a disk that stops
 * answering. The first to wait creates the trigger's name + ".held", for
 * the test to know.
 *
 * Threading: any thread; no state but the next symbols, set once.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "tests/support/fd_path.h"

/* Whether a call on the file at target fails (true), or goes on after
 * a stall while the trigger exists (false). */
static bool
failing_path(const char *target)
{
    const char *trigger = getenv("FAIL_WRITES_TRIGGER");
    const char *path = getenv("FAIL_WRITES_PATH");
    if (trigger == NULL || path == NULL || access(trigger, F_OK) != 0)
        return false;
    size_t n = strlen(target), pl = strlen(path);
    if (n < pl || strcmp(target + n - pl, path) != 0)
        return false;
    const char *mode = getenv("FAIL_WRITES_MODE");
    if (mode == NULL || strcmp(mode, "stall") != 0)
        return true;
    char held[4096];
    snprintf(held, sizeof(held), "%s.held", trigger);
    int hfd = open(held, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (hfd >= 0)
        close(hfd);
    struct timespec tick = {0, 10 * 1000 * 1000};
    for (int i = 0; i < 60000 && access(trigger, F_OK) == 0; i++)
        nanosleep(&tick, NULL);
    return false;
}

static bool
failing(int fd)
{
    char target[4096];
    return fd_path_read(fd, target, sizeof(target)) > 0 && failing_path(target);
}

int
rename(const char *from, const char *to)
{
    static int (*next)(const char *, const char *);
    if (next == NULL)
        next = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    if (failing_path(from)) {
        errno = EIO;
        return -1;
    }
    return next(from, to);
}

ssize_t
write(int fd, const void *buf, size_t n)
{
    static ssize_t (*next)(int, const void *, size_t);
    if (next == NULL)
        next = (ssize_t(*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    if (failing(fd)) {
        errno = EIO;
        return -1;
    }
    return next(fd, buf, n);
}

ssize_t
pwrite(int fd, const void *buf, size_t n, off_t off)
{
    static ssize_t (*next)(int, const void *, size_t, off_t);
    if (next == NULL)
        next = (ssize_t(*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite");
    if (failing(fd)) {
        errno = EIO;
        return -1;
    }
    return next(fd, buf, n, off);
}

ssize_t
writev(int fd, const struct iovec *iov, int cnt)
{
    static ssize_t (*next)(int, const struct iovec *, int);
    if (next == NULL)
        next = (ssize_t(*)(int, const struct iovec *, int))dlsym(RTLD_NEXT, "writev");
    if (failing(fd)) {
        errno = EIO;
        return -1;
    }
    return next(fd, iov, cnt);
}

typedef ssize_t (*pwritev_fn)(int, const struct iovec *, int, off_t);

/* pwritev and pwritev64 (what callers built with _FILE_OFFSET_BITS=64,
 * sluice, call: the same function on 64-bit), each passing on to its own
 * next symbol. */
static ssize_t
vec_write(pwritev_fn *next, const char *name, int fd, const struct iovec *iov, int cnt,
          off_t off)
{
    if (*next == NULL)
        *next = (pwritev_fn)dlsym(RTLD_NEXT, name);
    if (failing(fd)) {
        errno = EIO;
        return -1;
    }
    return (*next)(fd, iov, cnt, off);
}

ssize_t
pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
    static pwritev_fn next;
    return vec_write(&next, "pwritev", fd, iov, cnt, off);
}

ssize_t
pwritev64(int fd, const struct iovec *iov, int cnt, off_t off)
{
    static pwritev_fn next;
    return vec_write(&next, "pwritev64", fd, iov, cnt, off);
}
