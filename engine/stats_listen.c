/*
 * stats_listen: the stats server's listeners, opened once at start: the
 * Unix socket of the line protocol (never stealing one a running sluice
 * answers on; a stale file left by a crash is replaced) and the HTTP
 * listener of [stats] http_listen.
 *
 * Threading: the caller's (stats_server_new); no state of its own.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "engine/stats_int.h"

int
stats_listen_unix(const char *path, unsigned mode, int *out, dev_t *dev, ino_t *ino, char *err,
                  size_t errlen)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(sa.sun_path)) {
        snprintf(err, errlen, "stats socket path too long (at most %zu octets): %s",
             sizeof(sa.sun_path) - 1, path);
        return -ENAMETOOLONG;
    }
    memcpy(sa.sun_path, path, strlen(path));

    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            snprintf(err, errlen, "%s exists and is not a socket: not removing it", path);
            return -EEXIST;
        }
        /* Something listening there is a running sluice: never steal its
         * socket. A refused connection is a stale file left by a crash. */
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (probe < 0) {
            int e = errno;
            snprintf(err, errlen, "socket: %s", strerror(e));
            return -e;
        }
        int rc = connect(probe, (struct sockaddr *)&sa, sizeof(sa));
        int e = errno;
        close(probe);
        if (rc == 0 || e == EAGAIN || e == EINPROGRESS) {
            snprintf(err, errlen, "%s: a running sluice answers on it", path);
            return -EADDRINUSE;
        }
        if (e != ECONNREFUSED) {
            snprintf(err, errlen, "%s: cannot tell whether it is stale: %s", path, strerror(e));
            return -e;
        }
        if (unlink(path) != 0 && errno != ENOENT) {
            e = errno;
            snprintf(err, errlen, "%s: cannot remove the stale socket: %s", path, strerror(e));
            return -e;
        }
    }

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "socket: %s", strerror(e));
        return -e;
    }
    /* No client can connect between bind and listen, so the mode is
     * right before anyone can use the socket, whatever the umask. */
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || chmod(path, mode & 07777) != 0 ||
        listen(fd, 64) != 0 || stat(path, &st) != 0) {
        int e = errno;
        snprintf(err, errlen, "stats socket %s: %s", path, strerror(e));
        close(fd);
        return -e;
    }
    *out = fd;
    *dev = st.st_dev;
    *ino = st.st_ino;
    return 0;
}

int
stats_listen_http(const char *spec, int *out, unsigned *port_out, char *err, size_t errlen)
{
    char host[256], port[16];
    const char *colon;
    const char *h = spec;
    size_t hl;
    if (spec[0] == '[') {
        const char *close_br = strchr(spec, ']');
        if (close_br == NULL || close_br[1] != ':') {
            snprintf(err, errlen, "http listen address \"%s\": expected [ADDR]:PORT", spec);
            return -EINVAL;
        }
        h = spec + 1;
        hl = (size_t)(close_br - h);
        colon = close_br + 1;
    } else {
        colon = strrchr(spec, ':');
        if (colon == NULL) {
            snprintf(err, errlen, "http listen address \"%s\": expected HOST:PORT", spec);
            return -EINVAL;
        }
        hl = (size_t)(colon - spec);
    }
    if (hl >= sizeof(host) || strlen(colon + 1) >= sizeof(port) || colon[1] == '\0') {
        snprintf(err, errlen, "http listen address \"%s\": expected HOST:PORT", spec);
        return -EINVAL;
    }
    memcpy(host, h, hl);
    host[hl] = '\0';
    snprintf(port, sizeof(port), "%s", colon + 1);

    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int g = getaddrinfo(hl > 0 ? host : NULL, port, &hints, &res);
    if (g != 0) {
        snprintf(err, errlen, "http listen address \"%s\": %s", spec, gai_strerror(g));
        return -EINVAL;
    }
    int e = 0;
    for (struct addrinfo *a = res; a != NULL; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            e = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 64) != 0) {
            e = errno;
            close(fd);
            continue;
        }
        struct sockaddr_storage ss;
        socklen_t sl = sizeof(ss);
        getsockname(fd, (struct sockaddr *)&ss, &sl);
        *port_out = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                                : ntohs(((struct sockaddr_in *)&ss)->sin_port);
        *out = fd;
        break;
    }
    freeaddrinfo(res);
    if (*out < 0) {
        snprintf(err, errlen, "http listen address \"%s\": %s", spec, strerror(e ? e : EINVAL));
        return -(e ? e : EINVAL);
    }
    return 0;
}
