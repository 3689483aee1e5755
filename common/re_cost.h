/*
 * re_cost: refuse POSIX extended regular expressions whose compilation
 * would take glibc's regcomp() seconds or more, before they reach it.
 *
 * Operators write reply patterns (the classification table, shaping
 * rules); regcomp() runs at start and on each reload, on the main thread.
 * Its cost is exponential in some shapes that look harmless: each
 * quantifier stacked on another ("a+++", POSIX leaves it undefined) or a
 * quantified group nested in another roughly doubles it (twenty: three
 * seconds, forty: hours), and bounded repeats are copied out, so nested
 * ones multiply ("(a{1,255}){1,255}": 65,025 copies, half a second) and
 * side by side they add up (a hundred "a{1,1000}": three seconds).
 * Matching is not the problem (glibc runs a DFA when there is no
 * back-reference; none is allowed here): compiling is.
 *
 * The rules, each a clear error: at most RE_COST_MAX_LEN octets; no
 * quantifier right after another; quantifiers nested at most
 * RE_COST_MAX_DEPTH deep; a {m,n} bound at most RE_COST_MAX_BOUND, and
 * the copies bounded repeats make (nested ones multiplied, the others
 * added) at most RE_COST_MAX_COPIES in all; no back-reference (\1 to
 * \9). What passes compiles in milliseconds.
 *
 * Threading: any thread (no state).
 */
#ifndef SLUICE_COMMON_RE_COST_H
#define SLUICE_COMMON_RE_COST_H

#include <stddef.h>

#define RE_COST_MAX_LEN    1024
#define RE_COST_MAX_DEPTH  4
#define RE_COST_MAX_BOUND  255  /* POSIX's RE_DUP_MAX at the least */
#define RE_COST_MAX_COPIES 2000

/* 0 when re may be given to regcomp(REG_EXTENDED); else -EINVAL with why
 * (a sentence naming the offset). The syntax itself is regcomp's to
 * judge: an unbalanced parenthesis or bracket passes here. */
int re_cost_check(const char *re, char *why, size_t whylen);

#endif
