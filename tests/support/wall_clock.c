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
        /* ahead < 0 (behind) makes ns negative, and C's / and % truncate
         * toward 0: borrowed from the seconds, tv_nsec stays in
         * [0, 1e9) as every reader of a timespec expects. */
        long long ns = (long long)ts->tv_nsec + ahead % 1000 * 1000000LL;
        long long sec = ahead / 1000 + ns / 1000000000LL;
        ns %= 1000000000LL;
        if (ns < 0) {
            ns += 1000000000LL;
            sec--;
        }
        ts->tv_sec += (time_t)sec;
        ts->tv_nsec = (long)ns;
    }
    return rc;
}
