/*
 * fault: see fault.h. The handler jumps on a thread with a guard armed;
 * elsewhere it hands the signal to the action it replaced. Each arm
 * checks that the handler is still in place: code that sets its own
 * action after the first arm (a test runner's per-test handler, a
 * library) would else take a guarded fault; its action becomes the one
 * passed on to.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "common/fault.h"

static const int guarded[] = {SIGSEGV, SIGBUS};
#define NGUARDED (sizeof(guarded) / sizeof(guarded[0]))

static struct sigaction saved[NGUARDED]; /* the actions replaced, under install_mu */
/* A fault passed on to saved[i] since it was saved: one that comes back
 * here unguarded found this handler put back by that action (as
 * log_catch_fatal's puts back what it replaced, this one when it came
 * after a first arm), and passed on again would go round for ever. */
static atomic_bool passed[NGUARDED];
static pthread_mutex_t install_mu = PTHREAD_MUTEX_INITIALIZER;
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
        if (atomic_exchange(&passed[i], true)) {
            memset(&old, 0, sizeof(old)); /* round again: the default, which kills */
            old.sa_handler = SIG_DFL;
        }
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

/* Put on_fault in place where another action is (at the first arm, or
 * set since by someone else), keeping that action to pass on to. */
static void
install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    pthread_mutex_lock(&install_mu);
    for (size_t i = 0; i < NGUARDED; i++) {
        struct sigaction old;
        if (sigaction(guarded[i], NULL, &old) < 0)
            continue; /* not caught: a fault kills as before */
        if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction == on_fault)
            continue;
        saved[i] = old;
        atomic_store(&passed[i], false);
        sigaction(guarded[i], &sa, NULL);
    }
    pthread_mutex_unlock(&install_mu);
}

struct fault_guard *
fault_guard_arm(struct fault_guard *g)
{
    install();
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
