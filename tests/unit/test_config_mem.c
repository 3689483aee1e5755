/*
 * What a config costs once a reload replaced it while something still
 * reads it (config_gen.h: freed once nothing does): a few KB, its
 * shaping rules shared with the config that replaced it when they did
 * not change. Measured with glibc's mallinfo2; skipped under a
 * sanitizer's allocator, which it does not see.
 */
#include <fcntl.h>
#include <malloc.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "engine/config.h"
#include "engine/shaping.h"

static char path[64];

static void
write_file(const char *text)
{
    snprintf(path, sizeof(path), "/tmp/sluice-conf-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t len = strlen(text);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    close(fd);
}

/* Heap in use (glibc's count; 0 when a sanitizer's allocator answers). */
static size_t
heap_used(void)
{
    return mallinfo2().uordblks;
}

static struct config *
load_path(const char *p)
{
    struct config *cfg = NULL;
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    int rc = config_load(p, &cfg, errs);
    fclose(errs);
    if (rc != 0)
        fail_msg("%s: %s", p, buf);
    free(buf);
    return cfg;
}

/* What a reload keeps while the replaced config is still read:
 * a config loaded as main.c does it on SIGHUP (shared with the running
 * one, its DKIM keys dropped) holds a few KB, with [domain], [mx],
 * [source], [pool] and [tenant] sections. It was about 280 KB: the
 * built-in bounce rules and the shaping rules compiled for each config,
 * and room for 3 x 32 listener addresses. */
static void
test_reloaded_config_is_small(void **state)
{
    (void)state;
    size_t h0 = heap_used();
    void *volatile probe = malloc(4000);
    bool counted = heap_used() >= h0 + 4000;
    free(probe);
    if (!counted)
        skip(); /* a sanitizer's allocator: mallinfo2 does not see it */
    char rules[] = "/tmp/sluice-rules-XXXXXX";
    int fd = mkstemp(rules);
    assert_true(fd >= 0);
    const char *r1 = "rule mine code=421 match=\"slow down\" action=backoff for=5m\n";
    assert_int_equal(write(fd, r1, strlen(r1)), (ssize_t)strlen(r1));
    close(fd);
    char text[2048];
    snprintf(text, sizeof(text),
             "[server]\nlisten = 127.0.0.1:2525, [::1]:2525\n[queue]\npath = /tmp/x\n"
             "[shaping]\nrules = %s\n"
             "[domain *]\nmax_connections = 20\n[domain gmail.com]\nmax_connections = 10\n"
             "[domain yahoo.com]\nmax_connections = 5\n[mx *.google.com]\nmax_connections = 30\n"
             "[source 127.0.0.2]\nehlo = a.example.net\n[source 127.0.0.3]\nehlo = b.example.net\n"
             "[pool bulk]\nsources = 127.0.0.2:3, 127.0.0.3:1\n"
             "[tenant acme]\npool = bulk\n[tenant globex]\npool = bulk\n",
             rules);
    write_file(text);
    const char *files[] = {SOURCE_DIR "/etc/sluice.conf", path};
    for (size_t f = 0; f < 2; f++) {
        struct config *running = load_path(files[f]);
        assert_non_null(running->shaping_rules);
        /* once first: what the first load leaves behind (stdio, tcache)
         * is no config's */
        struct config *w = load_path(files[f]);
        config_share_unchanged(w, running);
        config_free(w);
        size_t before = heap_used();
        struct config *next = load_path(files[f]);
        config_share_unchanged(next, running);
        config_drop_dkim_keys(next);
        size_t kept = heap_used() - before;
        if (kept > 24 * 1024)
            fail_msg("%s: a reloaded config holds %zu octets", files[f], kept);
        assert_ptr_equal(next->shaping_rules, running->shaping_rules);
        config_free(running); /* the set lives on in next */
        assert_true(shaping_rules_count(next->shaping_rules) > 1);
        config_free(next);
    }
    /* The operator's rules changed: the new config has its own. */
    struct config *running = load_path(path);
    fd = open(rules, O_WRONLY | O_APPEND);
    assert_true(fd >= 0);
    const char *r2 = "rule more code=421 action=backoff for=1m\n";
    assert_int_equal(write(fd, r2, strlen(r2)), (ssize_t)strlen(r2));
    close(fd);
    struct config *next = load_path(path);
    config_share_unchanged(next, running);
    assert_ptr_not_equal(next->shaping_rules, running->shaping_rules);
    assert_int_equal(shaping_rules_count(next->shaping_rules),
                     shaping_rules_count(running->shaping_rules) + 1);
    config_free(running);
    config_free(next);
    unlink(path);
    unlink(rules);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reloaded_config_is_small),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
