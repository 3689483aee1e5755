/*
 * fd_path: see fd_path.h.
 */
#include "tests/support/fd_path.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

ssize_t
fd_path_read(int fd, char *buf, size_t cap)
{
    char link[64];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    if (cap < 2)
        return -1;
    ssize_t n = readlink(link, buf, cap - 1);
    if (n <= 0 || (size_t)n >= cap - 1) /* a full buffer may be a cut path */
        return -1;
    buf[n] = '\0';
    return n;
}

bool
fd_path_ends(int fd, const char *suffix)
{
    char target[4096];
    ssize_t n = fd_path_read(fd, target, sizeof(target));
    size_t sl = strlen(suffix);
    return n >= 0 && (size_t)n >= sl && strcmp(target + n - sl, suffix) == 0;
}
