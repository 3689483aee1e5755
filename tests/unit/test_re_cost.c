/*
 * test_re_cost: the guard before regcomp (common/re_cost.h). Patterns of
 * the shapes replies are matched with pass, and so do the shipped shaping
 * rules' (read from etc/shaping.rules); the shapes that take glibc's
 * regcomp seconds to hours are refused with a reason: stacked
 * quantifiers (the input fuzz_shaping found: "13+++...+", forty of them),
 * quantified groups nested deep, bounded repeats nested or side by side
 * past the copies allowed, bounds too large, back-references, and
 * patterns too long. Escapes and bracket
 * expressions are read as the atoms they are ("[+*]+" and "\++" are one
 * quantifier each).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <errno.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/re_cost.h"


static void
passes(const char *re)
{
    char why[200] = "";
    if (re_cost_check(re, why, sizeof(why)) != 0)
        fail_msg("refused \"%s\": %s", re, why);
    regex_t x; /* and regcomp takes it */
    assert_int_equal(regcomp(&x, re, REG_EXTENDED | REG_ICASE | REG_NOSUB), 0);
    regfree(&x);
}

static void
refused(const char *re, const char *reason)
{
    char why[200] = "";
    if (re_cost_check(re, why, sizeof(why)) != -EINVAL)
        fail_msg("passed \"%s\"", re);
    if (strstr(why, reason) == NULL)
        fail_msg("\"%s\": \"%s\" does not say \"%s\"", re, why, reason);
}

static void
test_ordinary_patterns_pass(void **state)
{
    (void)state;
    passes("\\[TSS04\\]");
    passes("^(4|5)\\.7\\.[0-9]+ .*(spam|blocked|rbl)");
    passes("S3150|S3140");
    passes("mailbox (is )?(full|over quota)");
    passes("[[:alpha:]]+[[:digit:]]{2,4}");
    passes("[]+*]+x");       /* a literal ] first, quantifier chars inside */
    passes("[^]a]*");
    passes("\\++a\\*?");     /* escaped quantifiers are atoms */
    passes("((a+)+)+");      /* three deep */
    passes("(((a+)+)+)+");   /* four: the limit */
    passes("(a{1,40}){1,40}");
    passes("a{255}");
    passes("a{1,255}b{1,255}c{1,255}d{1,255}e{1,255}f{1,255}g{1,255}"); /* 1,785 */
    passes("x{3,}");
    passes("a\\{x");         /* an escaped brace: an atom */
    passes("a{,3}");         /* glibc's {0,3} */
    char why[200];           /* a quantifier with no atom is regcomp's business */
    assert_int_equal(re_cost_check("a|*b", why, sizeof(why)), 0);
    assert_int_equal(re_cost_check("{literal", why, sizeof(why)), 0);
}

static void
test_costly_patterns_are_refused(void **state)
{
    (void)state;
    char stacked[64] = "TSS13";
    memset(stacked + 5, '+', 40);
    refused(stacked, "right after another");
    refused("a*+", "right after another");
    refused("a??", "right after another");
    refused("a{1,255}{1,255}", "right after another");
    refused("a{,3}{,3}", "right after another");
    refused("((((a+)+)+)+)+", "nested more than 4");
    char deep[128] = "";
    for (int i = 0; i < 20; i++)
        strcat(deep, "(");
    strcat(deep, "a");
    for (int i = 0; i < 20; i++)
        strcat(deep, ")+");
    refused(deep, "nested more than 4");
    refused("(a{1,255}){1,255}", "copies");
    refused("(a{1,100}){1,100}", "copies");
    refused("((a{2,30}){2,30}){2,30}", "copies");
    char wide[1100] = ""; /* side by side: eight times 255 */
    for (int i = 0; i < 8; i++)
        strcat(wide, "a{1,255}");
    refused(wide, "copies");
    refused("a{1,1000}", "bound over 255");
    refused("a{99999999999999999999}", "bound over 255");
    refused("(a)\\1", "back-reference");
    char *big = malloc(RE_COST_MAX_LEN + 2);
    assert_non_null(big);
    memset(big, 'a', RE_COST_MAX_LEN + 1);
    big[RE_COST_MAX_LEN + 1] = '\0';
    refused(big, "longer than");
    big[RE_COST_MAX_LEN] = '\0';
    passes(big);
    free(big);
    char groups[80] = "";
    memset(groups, '(', 65);
    refused(groups, "parentheses nested");
}

/* Every match="..." of the shipped rules passes. */
static void
test_shipped_rules_pass(void **state)
{
    (void)state;
    char path[4096];
    snprintf(path, sizeof(path), "%s/etc/shaping.rules", SOURCE_DIR);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[2048];
    unsigned n = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        char *m = strstr(line, "match=\"");
        if (line[0] == '#' || m == NULL)
            continue;
        m += 7;
        char re[1024];
        size_t k = 0;
        for (; *m != '\0' && *m != '"' && k + 1 < sizeof(re); m++) {
            if (*m == '\\' && (m[1] == '"' || m[1] == '\\'))
                m++; /* the rules file's own quoting */
            re[k++] = *m;
        }
        re[k] = '\0';
        passes(re);
        n++;
    }
    fclose(f);
    assert_true(n >= 5);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ordinary_patterns_pass),
        cmocka_unit_test(test_costly_patterns_are_refused),
        cmocka_unit_test(test_shipped_rules_pass),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
