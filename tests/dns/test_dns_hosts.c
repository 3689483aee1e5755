/*
 * test_dns_hosts: the MX hosts' address cache of dns/hosts.c alone, its
 * entries put and swept directly (no server is asked: the resolver's
 * channel is made but never used).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/hash.h"
#include "dns/internal.h"
#include "tests/dns/harness.h"

/* Enough entries that one sweep turn cannot take them all. */
#define CHAINED (HOSTS_SWEEP_BATCH + 4)
/* The table's buckets once CHAINED entries are in (hash_insert doubles
 * from 64 when full). */
#define CHAINED_BUCKETS 8192

/* "h<i in hex>.test" (snprintf is slow for the tens of millions of
 * names tried). */
static void
name_of(uint32_t i, char out[32])
{
    static const char hex[] = "0123456789abcdef";
    char *p = out;
    *p++ = 'h';
    for (int k = 28; k >= 0; k -= 4)
        *p++ = hex[(i >> k) & 15];
    memcpy(p, ".test", 6);
}

/* A turn of the sweep that stops inside a bucket's chain goes on there
 * next turn, not at the next bucket: a pass takes every expired entry.
 * Here every entry is in one chain (names whose hashes share their low
 * bits), so the first turn's batch ends inside it; before, the entries
 * left in that chain waited for the next pass (the sweep interval, up to
 * ten seconds, later; with unlucky names, pass after pass). */
static void
test_sweep_goes_on_inside_a_chain(void **state)
{
    (void)state;
    struct dns_config cfg;
    harness_config(&cfg, 9); /* never asked */
    cfg.cache_size = 2 * CHAINED;
    struct ploop loop;
    ploop_init(&loop);
    struct dns *d = NULL;
    char err[256];
    assert_int_equal(dns_new(&cfg, ploop_sock, &loop, &d, err, sizeof(err)), 0);
    loop.d = d;

    char name[32];
    unsigned put = 0;
    for (uint32_t i = 0; put < CHAINED; i++) {
        name_of(i, name);
        if ((hash_str_nocase(name) & (CHAINED_BUCKETS - 1)) != 0)
            continue;
        hosts_put(d, name, false, HOST_NODATA, NULL, 0, 1000);
        put++;
    }
    hosts_put(d, "keep.test", false, HOST_NODATA, NULL, 0, 3600 * 1000);
    assert_int_equal(hash_count(&d->hosts), CHAINED + 1);
    assert_int_equal(d->hosts.nb, CHAINED_BUCKETS); /* so: one chain */

    /* One pass, in turns, once the chained entries have expired. */
    uint64_t later = clock_mono_ns() + 2000000000ULL;
    unsigned turns = 0;
    do {
        hosts_sweep(d, later);
        turns++;
    } while (d->hosts_sweep_bucket != 0 && turns < 100);
    assert_int_equal(turns, 2);
    assert_int_equal(hash_count(&d->hosts), 1);
    struct host_addrs ha;
    assert_int_equal(hosts_find(d, "keep.test", false, &ha), 1);

    d = dns_free(d);
    conf_free(dns_conf_keys, &cfg);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sweep_goes_on_inside_a_chain),
    };
    return cmocka_run_group_tests_name("dns hosts", tests, NULL, NULL);
}
