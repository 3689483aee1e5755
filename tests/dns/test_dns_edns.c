/*
 * test_dns_edns: c-ares 1.18 turns EDNS off for the whole channel after
 * one FORMERR answer without an OPT record. The resolver finds it at a
 * sweep turn (dns.stats edns_off) and makes its channel again, with
 * EDNS, once no query is left on it (edns_restored). Against the
 * scripted server of harness.h, whose answers carry no OPT record.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dns/internal.h"
#include "tests/dns/harness.h"

#define T_TXT 16
#define FORMERR 1

static const struct script_answer table[] = {
    {"formerr.test", T_TXT, FORMERR, false, {{NULL, 0, NULL}}},
    {"ok.test", T_TXT, 0, false, {{"ok.test", T_TXT, "hello"}}},
};
#define NTABLE (sizeof(table) / sizeof(table[0]))

struct got {
    unsigned done;
    enum dns_status status;
    unsigned n;
};

static void
on_txt(void *arg, enum dns_status status, const char *why, const char *const *txt, unsigned n,
       uint32_t ttl)
{
    (void)why;
    (void)txt;
    (void)ttl;
    struct got *g = arg;
    g->status = status;
    g->n = n;
    g->done++;
}

/* Does d's channel ask with EDNS now? */
static bool
channel_edns(struct dns *d)
{
    struct ares_options o;
    int mask = 0;
    assert_int_equal(ares_save_options(d->channel, &o, &mask), ARES_SUCCESS);
    bool on = (o.flags & ARES_FLAG_EDNS) != 0;
    ares_destroy_options(&o);
    return on;
}

/* A sweep turn now (it is due every second at most otherwise). */
static void
sweep_now(struct dns *d)
{
    d->next_sweep = 0;
    dns_process_timeouts(d);
}

static void
test_edns_off_found_and_restored(void **state)
{
    (void)state;
    struct script_server srv;
    if (script_start(&srv, table, NTABLE) < 0)
        fail_msg("scripted server did not start");
    struct dns_config cfg;
    harness_config(&cfg, srv.port);
    struct ploop loop;
    ploop_init(&loop);
    struct dns *d = NULL;
    char err[256];
    if (dns_new(&cfg, ploop_sock, &loop, &d, err, sizeof(err)) < 0)
        fail_msg("dns_new: %s", err);
    loop.d = d;
    assert_true(channel_edns(d));

    struct got g = {0};
    assert_int_equal(dns_txt_lookup(d, "formerr.test", on_txt, &g), 0);
    assert_int_equal(ploop_run(&loop, &g.done, 1, 10000), 0);
    assert_int_equal(g.status, DNS_RETRY);
    if (channel_edns(d)) {
        /* A c-ares that keeps EDNS on: nothing to find. */
        d = dns_free(d);
        conf_free(dns_conf_keys, &cfg);
        script_stop(&srv);
        skip();
    }
    struct dns_stats st;
    dns_stats(d, &st);
    assert_int_equal(st.edns_off, 0); /* not swept yet */

    /* Found at the next sweep turn; a query still on the channel keeps
     * it until it ends. */
    struct got ok = {0};
    assert_int_equal(dns_txt_lookup(d, "ok.test", on_txt, &ok), 0);
    sweep_now(d);
    dns_stats(d, &st);
    assert_int_equal(st.edns_off, 1);
    assert_int_equal(st.edns_restored, 0);
    assert_false(channel_edns(d));
    assert_int_equal(ok.done, 0);
    assert_int_equal(ploop_run(&loop, &ok.done, 1, 10000), 0);
    assert_int_equal(ok.status, DNS_OK);

    /* Idle: made again, with EDNS; found once, not again. */
    sweep_now(d);
    dns_stats(d, &st);
    assert_int_equal(st.edns_off, 1);
    assert_int_equal(st.edns_restored, 1);
    assert_true(channel_edns(d));
    sweep_now(d);
    dns_stats(d, &st);
    assert_int_equal(st.edns_off, 1);
    assert_int_equal(st.edns_restored, 1);

    /* The new channel asks the same server. */
    memset(&ok, 0, sizeof(ok));
    assert_int_equal(dns_txt_lookup(d, "ok.test", on_txt, &ok), 0);
    assert_int_equal(ploop_run(&loop, &ok.done, 1, 10000), 0);
    assert_int_equal(ok.status, DNS_OK);
    assert_int_equal(ok.n, 1);
    assert_int_equal(script_hits(&srv, "ok.test", T_TXT), 2);

    d = dns_free(d);
    assert_int_equal(loop.n, 0); /* every socket was handed back */
    conf_free(dns_conf_keys, &cfg);
    script_stop(&srv);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_edns_off_found_and_restored),
    };
    return cmocka_run_group_tests_name("dns edns", tests, NULL, NULL);
}
