/*
 * small-sndbuf: an LD_PRELOAD shim for tests. Every TCP socket made with
 * socket(2) gets SO_SNDBUF = SMALL_SNDBUF octets (the kernel doubles it
 * and no longer tunes it), so that against a receiver that stops reading
 * (and has a small receive buffer of its own) the kernel holds a known,
 * small part of what the sender gives: the rest waits in the sender's
 * own buffer. Without SMALL_SNDBUF every call passes through.
 *
 * Threading: any thread; no state but the next symbol, set once.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/socket.h>

int
socket(int domain, int type, int protocol)
{
    static int (*next)(int, int, int);
    if (next == NULL)
        next = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    int fd = next(domain, type, protocol);
    const char *v = getenv("SMALL_SNDBUF");
    if (fd >= 0 && v != NULL && (domain == AF_INET || domain == AF_INET6) &&
        (type & 0xf) == SOCK_STREAM) {
        int n = atoi(v);
        if (n > 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &n, sizeof(n));
    }
    return fd;
}
