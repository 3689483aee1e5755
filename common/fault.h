/*
 * fault: turn a memory fault (SIGSEGV, SIGBUS) inside a stretch of code
 * into an error the caller handles, for reading a file through a map
 * whose own format cannot tell damage from data: LMDB keeps no checksum,
 * so a spool's page damaged inside follows a wild pointer, and the only
 * sign of it is the fault. For reads that can stop cleanly afterwards
 * (a walk of the spool, sluice-spool), not as a way to go on running
 * code that faulted for another reason.
 *
 *   struct fault_guard g;
 *   struct fault_guard *prev = fault_guard_arm(&g);
 *   if (sigsetjmp(g.jb, 1) != 0) {
 *       ... faulted (g.sig, g.addr; the guard is disarmed, prev armed
 *       again): undo what the reads had begun, return an error ...
 *   }
 *   ... the guarded reads ...
 *   fault_guard_restore(prev);
 *
 * sigsetjmp is the caller's, in the frame that stays live (C allows it
 * only as a whole controlling expression or compared with a constant);
 * what the caller reads after a jump it had set before sigsetjmp.
 * Guards nest (prev); code that must not be taken for the reads (a
 * callback) runs between fault_guard_restore(prev) and a new arm.
 *
 * Threading: each thread has its own armed guard (thread-local); the
 * handler is for the process, put over the action that was there
 * (log_catch_fatal's, a sanitizer's, the default, or one set since the
 * last arm), which takes a fault of a thread with no guard armed; where
 * that action puts this handler back and the fault comes again, the
 * default takes it (dies).
 */
#ifndef SLUICE_COMMON_FAULT_H
#define SLUICE_COMMON_FAULT_H

#include <setjmp.h>
#include <stddef.h>

struct fault_guard {
    sigjmp_buf jb;
    struct fault_guard *prev; /* borrowed: the guard armed before, put back at a jump */
    int sig;        /* the signal taken (SIGABRT: fault_guard_trip), 0 while none */
    void *addr;     /* the address that faulted */
    char what[200]; /* fault_guard_trip's text */
};

/* Arm g on this thread (putting the handler in place if it is not: a
 * sigaction call per signal guarded, two where it is not in place);
 * returns the guard armed before (NULL: none), for fault_guard_restore. */
struct fault_guard *fault_guard_arm(struct fault_guard *g);

/* Arm prev again (NULL: none) on this thread. */
void fault_guard_restore(struct fault_guard *prev);

/* For a check that fails where a library would abort (LMDB's assert
 * callback): on a thread with a guard armed, jump to it as a fault,
 * with what (copied) as its text; elsewhere return, and the caller goes
 * on to abort. */
void fault_guard_trip(const char *what);

/* What g took, for a message: "SIGSEGV at 0x..." or the trip's text;
 * into buf, which is returned. */
const char *fault_guard_str(const struct fault_guard *g, char *buf, size_t len);

#endif
