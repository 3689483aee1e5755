/*
 * test_dns_txt: TXT lookups (dns/txt.c, the MTA-STS and TLS reporting
 * records) against a scripted server: the records at the name asked, or
 * at the end of its CNAME chain, their strings joined; records of other
 * owners in the same answer are no answer to the question.
 *
 *   _mta-sts.a.test  its record, and one of another owner beside it
 *   _mta-sts.b.test  a CNAME to _mta-sts.c.test, whose record is split
 *                    in three strings; a record at the alias itself
 *                    (which a CNAME cannot have) is not the target's
 *   _mta-sts.d.test  only another owner's record: none
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/dns/harness.h"

#define T_CNAME 5
#define T_TXT   16

static const struct script_answer table[] = {
    {"_mta-sts.a.test",
     T_TXT,
     0,
     false,
     {{"_mta-sts.a.test", T_TXT, "v=STSv1; id=1"}, {"_mta-sts.x.test", T_TXT, "v=STSv1; id=9"}}},
    {"_mta-sts.b.test",
     T_TXT,
     0,
     false,
     {{"_mta-sts.b.test", T_CNAME, "_mta-sts.c.test"},
      {"_mta-sts.b.test", T_TXT, "v=STSv1; id=8"},
      {"_mta-sts.c.test", T_TXT, "v=STSv1;| id=|2"}}},
    {"_mta-sts.d.test", T_TXT, 0, false, {{"_mta-sts.x.test", T_TXT, "v=STSv1; id=9"}}},
};
#define NTABLE (sizeof(table) / sizeof(table[0]))

struct fx {
    struct script_server srv;
    struct dns_config cfg;
    struct ploop loop;
    struct dns *d;
};

struct got {
    unsigned done;
    enum dns_status status;
    unsigned n;
    char txt[4][64];
};

static void
on_txt(void *arg, enum dns_status status, const char *why, const char *const *txt, unsigned n)
{
    (void)why;
    struct got *g = arg;
    g->status = status;
    g->n = n;
    for (unsigned i = 0; i < n && i < 4; i++)
        snprintf(g->txt[i], sizeof(g->txt[i]), "%s", txt[i]);
    g->done++;
}

static int
setup(void **state)
{
    static struct fx f;
    memset(&f, 0, sizeof(f));
    if (script_start(&f.srv, table, NTABLE) < 0)
        return -1;
    harness_config(&f.cfg, f.srv.port);
    ploop_init(&f.loop);
    char err[256];
    if (dns_new(&f.cfg, ploop_sock, &f.loop, &f.d, err, sizeof(err)) < 0) {
        fprintf(stderr, "dns_new: %s\n", err);
        script_stop(&f.srv);
        return -1;
    }
    f.loop.d = f.d;
    *state = &f;
    return 0;
}

static int
teardown(void **state)
{
    struct fx *f = *state;
    f->d = dns_free(f->d);
    conf_free(dns_conf_keys, &f->cfg);
    script_stop(&f->srv);
    return 0;
}

static void
lookup(struct fx *f, const char *name, struct got *g)
{
    memset(g, 0, sizeof(*g));
    assert_int_equal(dns_txt_lookup(f->d, name, on_txt, g), 0);
    assert_int_equal(ploop_run(&f->loop, &g->done, 1, 10000), 0);
    assert_int_equal(g->done, 1);
}

static void
test_other_owner_ignored(void **state)
{
    struct got g;
    lookup(*state, "_mta-sts.a.test", &g);
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(g.n, 1);
    assert_string_equal(g.txt[0], "v=STSv1; id=1");
}

static void
test_chain_followed_strings_joined(void **state)
{
    struct got g;
    lookup(*state, "_mta-sts.b.test", &g);
    assert_int_equal(g.status, DNS_OK);
    assert_int_equal(g.n, 1);
    assert_string_equal(g.txt[0], "v=STSv1; id=2");
}

static void
test_only_other_owner_is_none(void **state)
{
    struct got g;
    lookup(*state, "_mta-sts.d.test", &g);
    assert_int_equal(g.status, DNS_NOT_FOUND);
    assert_int_equal(g.n, 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_other_owner_ignored),
        cmocka_unit_test(test_chain_followed_strings_joined),
        cmocka_unit_test(test_only_other_owner_is_none),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
