/*
 * redis_server: a redis-server of a test's or a benchmark's own, on a
 * loopback port, without persistence (--save '' --appendonly no), started
 * in the foreground and stopped by its PID, or killed by the kernel when
 * the thread that started it exits (PR_SET_PDEATHSIG: a test whose
 * assertion failed before its redis_server_kill() leaves none behind).
 * One implementation for the unit tests (limits, shaping, warm-up) and
 * bench/limits.
 *
 * Threading: any thread; no state of its own.
 */
#ifndef SLUICE_TESTS_REDIS_SERVER_H
#define SLUICE_TESTS_REDIS_SERVER_H

#include <stddef.h>
#include <sys/types.h>

/* The redis-server binary, or NULL when none is installed. */
const char *redis_server_path(void);
/* A TCP port on 127.0.0.1 that nobody listens on, below the kernel's
 * ephemeral range (no outbound connection can take it as its source port)
 * and claimed until the process exits through the same lock files as
 * tests/integ/harness.py's free_port; -1 on error. */
int redis_server_free_port(void);
/* Start redis-server on 127.0.0.1:port and wait (at most 10 s) for its
 * "Ready to accept connections". Returns its PID, or -1 with a reason in
 * err (not installed, did not become ready). */
pid_t redis_server_start(int port, char *err, size_t errlen);
/* SIGKILL pid (when > 0) and reap it. */
void redis_server_kill(pid_t pid);

#endif
