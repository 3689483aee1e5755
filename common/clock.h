/*
 * clock: the two clocks every part reads. Wall time (Unix ms) for what is
 * stored, logged or compared with stored times (arrival, due, expiry);
 * monotonic time for deadlines and intervals, which must not jump.
 *
 * Threading: any thread.
 */
#ifndef SLUICE_COMMON_CLOCK_H
#define SLUICE_COMMON_CLOCK_H

#include <stdint.h>
#include <time.h>

/* CLOCK_REALTIME in milliseconds since the Unix epoch. */
static inline uint64_t
clock_unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* CLOCK_MONOTONIC in milliseconds. */
static inline uint64_t
clock_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

#endif
