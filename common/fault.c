/*
 * fault: see fault.h. The handler jumps on a thread with a guard armed;
 * elsewhere it hands the signal to the action it replaced.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "common/fault.h"

static const int guarded[] = {SIGSEGV, SIGBUS};
#define NGUARDED (sizeof(guarded) / sizeof(guarded[0]))

static struct sigaction saved[NGUARDED]; /* the actions replaced, once */
static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static _Thread_local struct fault_guard *armed; /* borrowed: until restored */

/* As the saved action would have taken it: a handler is called, the
 * default is put back so that the fault, taken again on return, kills
 * (a signal sent rather than a fault is sent again). */
static void
pass_on(int sig, siginfo_t *si, void *uc)
{
    for (size_t i = 0; i < NGUARDED; i++) {
        if (guarded[i] != sig)
            continue;
        struct sigaction old = saved[i];
        sigaction(sig, &old, NULL);
        if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction != NULL) {
            old.sa_sigaction(sig, si, uc);
            return;
        }
        if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
            old.sa_handler(sig);
            return;
        }
        if (si == NULL || si->si_code <= 0)
            raise(sig);
        return;
    }
}

static void
on_fault(int sig, siginfo_t *si, void *uc)
{
    struct fault_guard *g = armed;
    if (g == NULL) {
        pass_on(sig, si, uc);
        return;
    }
    g->sig = sig;
    g->addr = si != NULL ? si->si_addr : NULL;
    armed = g->prev;
    siglongjmp(g->jb, 1);
}

static void
install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < NGUARDED; i++) {
        struct sigaction old;
        if (sigaction(guarded[i], NULL, &old) < 0)
            continue; /* not caught: a fault kills as before */
        saved[i] = old;
        sigaction(guarded[i], &sa, NULL);
    }
}

struct fault_guard *
fault_guard_arm(struct fault_guard *g)
{
    pthread_once(&install_once, install);
    g->sig = 0;
    g->addr = NULL;
    g->what[0] = '\0';
    g->prev = armed;
    armed = g;
    return g->prev;
}

void
fault_guard_restore(struct fault_guard *prev)
{
    armed = prev;
}

void
fault_guard_trip(const char *what)
{
    struct fault_guard *g = armed;
    if (g == NULL)
        return;
    g->sig = SIGABRT;
    snprintf(g->what, sizeof(g->what), "%s", what != NULL ? what : "a check failed");
    armed = g->prev;
    siglongjmp(g->jb, 1);
}

const char *
fault_guard_str(const struct fault_guard *g, char *buf, size_t len)
{
    if (g->sig == SIGABRT)
        snprintf(buf, len, "%s", g->what);
    else
        snprintf(buf, len, "%s at %p", g->sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", g->addr);
    return buf;
}
