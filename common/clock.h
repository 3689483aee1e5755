/*
 * clock: the two clocks every part reads. Wall time (Unix ms) for what is
 * stored, logged or compared with stored times (arrival, due, expiry);
 * monotonic time (ms, us or ns) for deadlines and intervals, which must
 * not jump, and as struct timespec deadlines for condition variables.
 *
 * Threading: any thread.
 */
#ifndef SLUICE_COMMON_CLOCK_H
#define SLUICE_COMMON_CLOCK_H

#include <pthread.h>
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

/* CLOCK_MONOTONIC in nanoseconds: the worker loop's and the timers' time
 * (engine/timer.h), and the DNS resolver's. The one reading of the
 * monotonic clock's now, which the ms and us below divide: the same
 * value as tv_sec * 1000 + tv_nsec / 1000000 (or 1000). */
static inline uint64_t
clock_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* CLOCK_MONOTONIC in microseconds. */
static inline uint64_t
clock_mono_us(void)
{
    return clock_mono_ns() / 1000;
}

/* CLOCK_MONOTONIC in milliseconds. */
static inline uint64_t
clock_mono_ms(void)
{
    return clock_mono_ns() / 1000000;
}

/* A condition variable whose timed waits take monotonic deadlines
 * (clock_mono_deadline()): against CLOCK_REALTIME, pthread's default, a
 * wall clock stepped back an hour stretches a 2 s wait by that hour.
 * Returns 0, or -errno of pthread_condattr_setclock() or
 * pthread_cond_init() (cv is then not made). With glibc neither fails for
 * CLOCK_MONOTONIC; the callers that ignore the return (as they ignore
 * pthread_mutex_init's) rely on that, the stop watch checks it. */
static inline int
clock_cond_init_mono(pthread_cond_t *cv)
{
    pthread_condattr_t ca;
    int rc = pthread_condattr_init(&ca);
    if (rc != 0)
        return -rc;
    /* Failed, the variable would wait on the wall clock while its
     * deadlines are monotonic ones (days since boot: past at once), so
     * it is not made: the caller hears why. */
    rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if (rc == 0)
        rc = pthread_cond_init(cv, &ca);
    pthread_condattr_destroy(&ca);
    return -rc;
}

/* The CLOCK_MONOTONIC time sec seconds and nsec (< 1e9) nanoseconds from
 * now: what clock_mono_deadline() and clock_mono_deadline_us() share. */
static inline struct timespec
clock_mono_after(time_t sec, long nsec)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += sec;
    ts.tv_nsec += nsec;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* The CLOCK_MONOTONIC time ms from now, for pthread_cond_timedwait() on a
 * condition variable made by clock_cond_init_mono(). */
static inline struct timespec
clock_mono_deadline(uint64_t ms)
{
    return clock_mono_after((time_t)(ms / 1000), (long)(ms % 1000) * 1000000L);
}

/* clock_mono_deadline() to the microsecond: us from now. */
static inline struct timespec
clock_mono_deadline_us(uint64_t us)
{
    return clock_mono_after((time_t)(us / 1000000), (long)(us % 1000000) * 1000L);
}

#endif
