/*
 * libFuzzer target: the shaping rules parser and matcher
 * (engine/shaping_conf.c) and the action line parser (engine/shaping.c).
 * The input is split at its first NUL octet, if any: before it a rules
 * file, after it a reply text. Invariants: a rules file either loads (and
 * then every rule's info is sane and matching the reply, from a host of
 * each group and from none, returns a rule index in range or -1) or is
 * refused with a message; any line given to the action parser either
 * fails or gives an action whose text form parses back to the same.
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/shaping.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check(int cond)
{
    if (!cond)
        abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 64 * 1024)
        return 0;
    char *buf = malloc(size + 1);
    if (buf == NULL)
        return 0;
    memcpy(buf, data, size);
    buf[size] = '\0';
    const char *rules = buf, *reply = buf + strlen(buf) + (strlen(buf) < size ? 1 : 0);
    if (reply > buf + size)
        reply = buf + size;

    struct shaping_rules *r = shaping_rules_new();
    char err[512] = "";
    int rc = r ? shaping_rules_add_text(r, rules, "fuzz", err, sizeof(err)) : -1;
    if (r != NULL && rc == 0 && shaping_rules_finish(r) == 0) {
        unsigned n = shaping_rules_count(r);
        for (unsigned i = 0; i < n; i++) {
            const struct shaping_rule_info *ri = shaping_rule(r, i);
            check(ri != NULL && ri->name != NULL && ri->name[0] != '\0');
            check((unsigned)ri->kind < SHAPING_KIND_COUNT);
            check((unsigned)ri->scope < SHAPING_SCOPE_COUNT);
        }
        static const unsigned codes[] = {421, 450, 451, 550, 554, 250, 199, 600};
        for (unsigned g = 0; g <= shaping_rules_groups(r); g++) {
            char host[128] = "mx.nowhere.invalid";
            const char *gn = shaping_rules_group_name(r, g);
            if (gn != NULL)
                snprintf(host, sizeof(host), "mx.%s.test", gn);
            for (unsigned c = 0; c < sizeof(codes) / sizeof(codes[0]); c++) {
                struct shaping_reply rep = {codes[c], codes[c] / 100, 7, c, reply, host, "d.test"};
                int m = shaping_rules_match(r, &rep);
                check(m == -1 || (m >= 0 && (unsigned)m < n));
            }
        }
    } else if (rc < 0) {
        check(err[0] != '\0' || rc == -12 /* ENOMEM */);
    }
    shaping_rules_unref(r);

    struct shaping_action a, b;
    if (shaping_action_parse(reply, &a) == 0) {
        char line[1024];
        if (shaping_action_format(&a, line, sizeof(line)) > 0) {
            check(shaping_action_parse(line, &b) == 0);
            check(strcmp(a.id, b.id) == 0 && a.until_ms == b.until_ms && a.kind == b.kind);
        }
    }
    free(buf);
    return 0;
}
