/*
 * fd_path: the path a descriptor of this process is open on, as
 * /proc/self/fd names it, for the tests' write interposers (a disk that
 * fails or stalls the writes to one file: LMDB's data file, a journal
 * segment) and the checks of which files a process holds. One
 * implementation for the unit tests and tests/integ's fail-writes shim.
 *
 * Threading: any thread; no state. Calls readlink(2) alone, so an
 * interposed write(2) or pwrite(2) may call it.
 */
#ifndef SLUICE_TESTS_FD_PATH_H
#define SLUICE_TESTS_FD_PATH_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* The path fd is open on, in buf (cap octets, NUL-terminated); its
 * length, or -1 (not open, or the path does not fit: a longer one is
 * not cut to look like another). */
ssize_t fd_path_read(int fd, char *buf, size_t cap);
/* Whether the path fd is open on ends with suffix. */
bool fd_path_ends(int fd, const char *suffix);

#endif
