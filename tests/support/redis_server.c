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
#include <stdint.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/clock.h"

/* Ports below the ephemeral range, claimed through flock on files that
 * tests/integ/harness.py claims through too (see its PORT_DIR). */
enum { PORT_LOW = 20000 };

const char *
redis_server_path(void)
{
    static const char *const paths[] = {"/usr/bin/redis-server", "/usr/local/bin/redis-server"};
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
        if (access(paths[i], X_OK) == 0)
            return paths[i];
    return NULL;
}

/* The first port of the kernel's ephemeral range (32768 when unreadable). */
static int
ephemeral_low(void)
{
    int low = 32768;
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f) {
        if (fscanf(f, "%d", &low) != 1)
            low = 32768;
        fclose(f);
    }
    return low;
}

/* Whether a TCP listener could bind 127.0.0.1:port now. */
static bool
bindable(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    bool ok = bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
    close(fd);
    return ok;
}

int
redis_server_free_port(void)
{
    const char *tmp = getenv("TMPDIR");
    char dir[512];
    snprintf(dir, sizeof(dir), "%s/sluice-test-ports", tmp && *tmp ? tmp : "/tmp");
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return -1;
    int high = ephemeral_low() - 1;
    if (high < PORT_LOW + 1000)
        high = PORT_LOW + 1000;
    int span = high - PORT_LOW + 1;
    int start = (int)((unsigned)getpid() * 2654435761u % (unsigned)span);
    for (int i = 0; i < span; i++) {
        int port = PORT_LOW + (start + i) % span;
        char path[600];
        snprintf(path, sizeof(path), "%s/%d", dir, port);
        /* The descriptor stays open (and the claim held) until the process
         * exits, like the harness's. */
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
        if (fd < 0)
            return -1;
        if (flock(fd, LOCK_EX | LOCK_NB) != 0 || !bindable(port)) {
            close(fd);
            continue;
        }
        return port;
    }
    return -1;
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
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        /* Gone with the test: a failed assertion skips the test's own
         * redis_server_kill(), and a server left running would hold the
         * test's output open (ctest then waits for its timeout). */
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
            _exit(127);
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
    uint64_t deadline = clock_mono_ms() + 10000;
    while (!ready && clock_mono_ms() < deadline) {
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
