/*
 * re_cost: see re_cost.h. One pass over the pattern, the way an ERE is
 * read: atoms (a character, an escape, a bracket expression, a group)
 * each optionally followed by one quantifier. For each atom the scan
 * knows how deep its quantifiers nest and how many copies of it the
 * bounded repeats within it make; a group's are the largest of what it
 * holds.
 */
#include "common/re_cost.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define MAX_GROUPS 64 /* parentheses open at once */

struct cost {
    unsigned depth;       /* quantifiers nested, this one included */
    unsigned long copies; /* product of the bounded repeats' upper bounds */
};

static void
cost_max(struct cost *into, const struct cost *c)
{
    if (c->depth > into->depth)
        into->depth = c->depth;
    if (c->copies > into->copies)
        into->copies = c->copies;
}

/* The end of the bracket expression opening at s[i] ('['), or 0 when it
 * does not close (regcomp's error to report). */
static size_t
bracket_end(const char *s, size_t i)
{
    size_t j = i + 1;
    if (s[j] == '^')
        j++;
    if (s[j] == ']')
        j++; /* a literal ] first */
    for (; s[j] != '\0'; j++) {
        if (s[j] == '[' && (s[j + 1] == ':' || s[j + 1] == '.' || s[j + 1] == '=')) {
            char kind = s[j + 1];
            const char *end = NULL;
            for (size_t k = j + 2; s[k] != '\0' && s[k + 1] != '\0'; k++)
                if (s[k] == kind && s[k + 1] == ']') {
                    end = s + k + 1;
                    break;
                }
            if (end == NULL)
                return 0;
            j = (size_t)(end - s);
        } else if (s[j] == ']') {
            return j;
        }
    }
    return 0;
}

/* A bound {m}, {m,}, {m,n} or {,n} at s[i]: its end (the '}') and its
 * largest count (m for {m,}), or 0 when s[i] starts none. */
static size_t
brace_parse(const char *s, size_t i, unsigned long *bound)
{
    size_t j = i + 1;
    unsigned long m = 0, n = 0;
    bool comma = false, digits = false;
    for (; isdigit((unsigned char)s[j]); j++, digits = true)
        if (m <= 100000) /* past that it is too large anyway: no overflow */
            m = m * 10 + (unsigned long)(s[j] - '0');
    if (!digits && s[j] != ',')
        return 0; /* glibc takes {,n} as {0,n} */
    if (s[j] == ',') {
        comma = true;
        for (j++; isdigit((unsigned char)s[j]); j++)
            if (n <= 100000)
                n = n * 10 + (unsigned long)(s[j] - '0');
    }
    if (s[j] != '}')
        return 0;
    *bound = comma && n > m ? n : m;
    return j;
}

int
re_cost_check(const char *re, char *why, size_t whylen)
{
    size_t len = strlen(re);
    if (len > RE_COST_MAX_LEN) {
        snprintf(why, whylen, "longer than %u characters", RE_COST_MAX_LEN);
        return -EINVAL;
    }
    struct cost groups[MAX_GROUPS + 1];
    unsigned top = 0;
    groups[0] = (struct cost){0, 1};
    struct cost atom = {0, 1};
    unsigned long total = 0; /* copies made by bounded repeats, all added */
    bool have_atom = false, after_quant = false;
    for (size_t i = 0; i < len; i++) {
        char c = re[i];
        unsigned long bound = 0;
        size_t end = 0;
        bool quant = c == '*' || c == '+' || c == '?' ||
                     (c == '{' && (end = brace_parse(re, i, &bound)) != 0);
        if (quant && have_atom) {
            if (after_quant) {
                snprintf(why, whylen,
                         "a quantifier right after another at offset %zu (POSIX leaves it "
                         "undefined, and each one doubles the time to compile)",
                         i);
                return -EINVAL;
            }
            if (bound > RE_COST_MAX_BOUND) {
                snprintf(why, whylen, "a repeat bound over %u at offset %zu", RE_COST_MAX_BOUND,
                         i);
                return -EINVAL;
            }
            atom.depth++;
            atom.copies *= bound > 1 ? bound : 1;
            if (bound > 1)
                total += atom.copies; /* a nested one counts again: a bound above */
            if (atom.depth > RE_COST_MAX_DEPTH) {
                snprintf(why, whylen, "quantifiers nested more than %u deep at offset %zu",
                         RE_COST_MAX_DEPTH, i);
                return -EINVAL;
            }
            if (atom.copies > RE_COST_MAX_COPIES || total > RE_COST_MAX_COPIES) {
                snprintf(why, whylen,
                         "repeats up to offset %zu make more than %u copies to compile", i,
                         RE_COST_MAX_COPIES);
                return -EINVAL;
            }
            cost_max(&groups[top], &atom);
            after_quant = true;
            if (end != 0)
                i = end;
            continue;
        }
        after_quant = false;
        atom = (struct cost){0, 1};
        have_atom = true;
        if (c == '\\') {
            if (re[i + 1] >= '1' && re[i + 1] <= '9') {
                snprintf(why, whylen, "a back-reference at offset %zu", i);
                return -EINVAL;
            }
            if (re[i + 1] != '\0')
                i++;
        } else if (c == '[') {
            size_t e = bracket_end(re, i);
            if (e == 0)
                return 0; /* unclosed: regcomp says so */
            i = e;
        } else if (c == '(') {
            if (top == MAX_GROUPS) {
                snprintf(why, whylen, "parentheses nested more than %u deep", MAX_GROUPS);
                return -EINVAL;
            }
            groups[++top] = (struct cost){0, 1};
            have_atom = false;
        } else if (c == ')' && top > 0) {
            atom = groups[top--];
        } else if (c == '|' || c == '^') {
            have_atom = false;
        }
        if (have_atom)
            cost_max(&groups[top], &atom);
    }
    return 0;
}
