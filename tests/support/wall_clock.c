/*
 * wall_clock: see wall_clock.h.
 */
#include "tests/support/wall_clock.h"

#include <stdbool.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

_Atomic long long wall_clock_ahead_ms;
static _Thread_local bool keep_real;

void
wall_clock_keep_real(void)
{
    keep_real = true;
}

int
clock_gettime(clockid_t clk, struct timespec *ts)
{
    int rc = (int)syscall(SYS_clock_gettime, clk, ts);
    long long ahead = wall_clock_ahead_ms;
    if (rc == 0 && clk == CLOCK_REALTIME && ahead != 0 && !keep_real) {
        long long ns = (long long)ts->tv_nsec + ahead % 1000 * 1000000LL;
        ts->tv_sec += (time_t)(ahead / 1000 + ns / 1000000000LL);
        ts->tv_nsec = (long)(ns % 1000000000LL);
    }
    return rc;
}
