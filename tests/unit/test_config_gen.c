/*
 * config_gen: when a config a reload replaced is freed. A worker's floor
 * keeps every config from its view on (one late for a park keeps the old
 * one); a session's or connection's config is kept exactly, not the later
 * ones; a read section keeps what was current when it began; a pinned
 * config and the first stay. Under ASan a config freed too early is a
 * use-after-free when the test reads it.
 */
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
#include "engine/config_gen.h"
#include "engine/owner.h"

static struct config *
load(unsigned i)
{
    char path[] = "/tmp/sluice-gen-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    char text[1024];
    int n = snprintf(text, sizeof(text),
                     "[server]\nlisten = 127.0.0.1:2525\n[queue]\npath = /tmp/x\n"
                     "[source 127.0.0.2]\nehlo = e%u.example.net\n"
                     "[pool p]\nsources = 127.0.0.2\n[tenant acme]\npool = p\n",
                     i);
    assert_int_equal(write(fd, text, (size_t)n), n);
    close(fd);
    struct config *cfg = NULL;
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    int rc = config_load(path, &cfg, errs);
    fclose(errs);
    unlink(path);
    if (rc != 0)
        fail_msg("config %u: %s", i, buf);
    free(buf);
    return cfg;
}

/* Two workers; each swap as engine_reload makes it, then each worker's
 * park (view, then what it publishes). */
static uint64_t
swap(struct config_gens *g, struct config *c)
{
    assert_int_equal(config_gens_reserve(g), 0);
    return config_gens_swap(g, c);
}

static void
park(struct config_gens *g, unsigned w, const uint64_t *held, unsigned n)
{
    uint64_t view = config_gens_current(g);
    config_gens_set_view(g, w, view);
    config_gens_hold(g, w, view, held, n);
}

static void
test_freed_when_unreachable(void **state)
{
    (void)state;
    struct config *first = load(0);
    struct config_gens *g = config_gens_new(first, 2);
    assert_non_null(g);
    assert_int_equal(config_gens_alive(g), 1);

    /* Worker 1 is late for the park: the replaced config stays. */
    struct config *c2 = load(2);
    assert_int_equal(swap(g, c2), 2);
    park(g, 0, NULL, 0);
    struct config *c3 = load(3);
    assert_int_equal(swap(g, c3), 3);
    park(g, 0, NULL, 0);
    assert_int_equal(config_gens_collect(g), 0);
    assert_int_equal(config_gens_alive(g), 3);
    assert_true(config_gens_pending(g));
    /* Worker 1 parks; one of its sessions holds a message owned as c2
     * says: c2 stays, c3 is current, nothing else to free yet. */
    struct owner o = {.tenant = config_tenant(c2, "acme", 4)};
    assert_non_null(o.tenant);
    uint64_t og = config_gens_of_owner(g, &o);
    assert_int_equal(og, 2);
    park(g, 1, &og, 1);
    assert_int_equal(config_gens_collect(g), 0);
    assert_string_equal(o.tenant->name, "acme"); /* still there */

    /* A connection opened under c3 (its source's config), then 20
     * reloads: it keeps c3 only, not the 20 after it. */
    const struct config *cc = NULL;
    uint64_t cg = config_gens_of_source(g, &c3->sources[0], &cc);
    assert_int_equal(cg, 3);
    assert_ptr_equal(cc, c3);
    uint64_t held[2] = {og, cg};
    for (unsigned i = 4; i < 24; i++) {
        swap(g, load(i));
        park(g, 0, &cg, 1);
        park(g, 1, held, 2);
        config_gens_collect(g);
        assert_true(config_gens_alive(g) <= 4); /* first, c2, c3, the current */
    }
    assert_string_equal(c3->sources[0].ehlo, "e3.example.net");
    /* The message is committed, the connection closed. */
    park(g, 0, NULL, 0);
    park(g, 1, NULL, 0);
    assert_int_equal(config_gens_collect(g), 2);
    assert_int_equal(config_gens_alive(g), 2);
    assert_false(config_gens_pending(g));

    /* A read section begun before a swap keeps what it may have read. */
    uint64_t tok = config_gens_enter(g);
    const struct config *read = NULL;
    config_gens_of_source(g, NULL, &read);
    swap(g, load(30));
    park(g, 0, NULL, 0);
    park(g, 1, NULL, 0);
    assert_int_equal(config_gens_collect(g), 0);
    assert_non_null(read->path);
    config_gens_leave(g, tok);
    assert_int_equal(config_gens_collect(g), 1);

    /* Pinned: kept to the end (freed with g); the one before it goes. */
    struct config *c31 = load(31);
    swap(g, c31);
    config_gens_pin(g, c31);
    swap(g, load(32));
    park(g, 0, NULL, 0);
    park(g, 1, NULL, 0);
    assert_int_equal(config_gens_collect(g), 1);
    assert_int_equal(config_gens_alive(g), 3);
    assert_false(config_gens_pending(g));

    config_gens_free(g);
    config_free(first); /* the caller's */
}

/* More held configs than a worker can list: everything from the oldest
 * on is kept, nothing freed too early. */
static void
test_too_many_held(void **state)
{
    (void)state;
    struct config *first = load(0);
    struct config_gens *g = config_gens_new(first, 1);
    uint64_t held[CONFIG_GENS_HELD_MAX + 4];
    unsigned n = 0;
    for (unsigned i = 1; i <= CONFIG_GENS_HELD_MAX + 4; i++) {
        struct config *c = load(i);
        uint64_t gen = swap(g, c);
        held[n++] = gen;
    }
    swap(g, load(99));
    park(g, 0, held, n);
    assert_int_equal(config_gens_collect(g), 0);
    park(g, 0, held + 1, n - 1); /* the oldest one let go */
    assert_int_equal(config_gens_collect(g), 1);
    park(g, 0, NULL, 0);
    assert_int_equal(config_gens_collect(g), CONFIG_GENS_HELD_MAX + 3);
    assert_int_equal(config_gens_alive(g), 2);
    config_gens_free(g);
    config_free(first);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_freed_when_unreachable),
        cmocka_unit_test(test_too_many_held),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
