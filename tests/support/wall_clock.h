/*
 * wall_clock: this binary's clock_gettime(), with CLOCK_REALTIME ahead of
 * the kernel's by wall_clock_ahead_ms (0: the real one; negative: behind),
 * for the tests whose subject is the wall clock: one passing (moved on
 * instead of slept through, so that no stall of a loaded machine adds to
 * what passed) or stepping. Every call of a binary that links it comes here
 * (it defines the symbol) and goes to the kernel; CLOCK_MONOTONIC (the
 * deadlines and waits of common/clock.h), time(2), gettimeofday(2) and
 * the _COARSE clocks are left be. A thread that called
 * wall_clock_keep_real() reads the kernel's (a test's own, which works
 * out what the others should do from the real time). One implementation
 * for test_outcome, test_shaping and test_mta_sts.
 *
 * Threading: any thread; wall_clock_ahead_ms is atomic, and
 * wall_clock_keep_real marks only the thread that calls it.
 */
#ifndef SLUICE_TESTS_WALL_CLOCK_H
#define SLUICE_TESTS_WALL_CLOCK_H

extern _Atomic long long wall_clock_ahead_ms;

/* The calling thread reads the kernel's wall clock from now on. */
void wall_clock_keep_real(void);

#endif
