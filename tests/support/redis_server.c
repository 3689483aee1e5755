/*
 * redis_server: see redis_server.h. Readiness is redis-server's own log
 * line on a pipe of its standard output, read with poll(2) and a deadline.
 */
#include "tests/support/redis_server.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long
mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *
redis_server_path(void)
{
    static const char *const paths[] = {"/usr/bin/redis-server", "/usr/local/bin/redis-server"};
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
        if (access(paths[i], X_OK) == 0)
            return paths[i];
    return NULL;
}

int
redis_server_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    int port = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

pid_t
redis_server_start(int port, char *err, size_t errlen)
{
    const char *path = redis_server_path();
    if (path == NULL) {
        snprintf(err, errlen, "redis-server is not installed");
        return -1;
    }
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        return -1;
    }
    char ports[16];
    snprintf(ports, sizeof(ports), "%d", port);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(p[1], 1);
        execl(path, path, "--port", ports, "--bind", "127.0.0.1", "--save", "", "--appendonly",
              "no", "--daemonize", "no", "--loglevel", "notice", (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    if (pid < 0) {
        close(p[0]);
        snprintf(err, errlen, "fork: %s", strerror(errno));
        return -1;
    }
    char buf[8192];
    size_t have = 0;
    bool ready = false;
    long long deadline = mono_ms() + 10000;
    while (!ready && mono_ms() < deadline) {
        struct pollfd pfd = {.fd = p[0], .events = POLLIN};
        if (poll(&pfd, 1, 200) <= 0)
            continue;
        ssize_t n = read(p[0], buf + have, sizeof(buf) - 1 - have);
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = '\0';
        ready = strstr(buf, "Ready to accept connections") != NULL;
        if (have > sizeof(buf) / 2) { /* keep a tail: the line may straddle reads */
            memmove(buf, buf + have - 64, 64);
            have = 64;
        }
    }
    /* redis-server ignores SIGPIPE: closing our end only drops its logs */
    close(p[0]);
    if (!ready) {
        redis_server_kill(pid);
        snprintf(err, errlen, "redis-server on port %d did not become ready within 10 s", port);
        return -1;
    }
    return pid;
}

void
redis_server_kill(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}
