/*
 * conn_table (engine_conn.c): the key a client counts under against [server]
 * max_clients_per_ip. IPv4 per address, an IPv4-mapped IPv6 address as
 * that IPv4 address, IPv6 per max_clients_per_ip_v6_prefix (64 by
 * default): a host that owns a /64 cannot pass the limit by taking a new
 * address for each connection.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "engine/engine.h"

static struct sockaddr_storage
addr(const char *text)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, text, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
    } else {
        assert_int_equal(inet_pton(AF_INET6, text, &sin6->sin6_addr), 1);
        sin6->sin6_family = AF_INET6;
    }
    return ss;
}

static bool
same_key(const char *a, const char *b, unsigned prefix)
{
    struct sockaddr_storage sa = addr(a), sb = addr(b);
    uint8_t ka[16], kb[16];
    conn_table_key((struct sockaddr *)&sa, prefix, ka);
    conn_table_key((struct sockaddr *)&sb, prefix, kb);
    return memcmp(ka, kb, 16) == 0;
}

static void
test_keys(void **state)
{
    (void)state;
    /* IPv4: per address; the mapped form is the same client */
    assert_false(same_key("192.0.2.1", "192.0.2.2", 64));
    assert_true(same_key("192.0.2.1", "::ffff:192.0.2.1", 64));
    assert_false(same_key("192.0.2.1", "::ffff:192.0.2.2", 64));
    assert_true(same_key("::ffff:192.0.2.1", "::ffff:192.0.2.1", 32));
    /* IPv4-compatible or NAT64 forms are not IPv4: prefixed like IPv6 */
    assert_false(same_key("192.0.2.1", "64:ff9b::192.0.2.1", 64));
    /* IPv6: one /64 is one client */
    assert_true(same_key("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", 64));
    assert_false(same_key("2001:db8:1:2::1", "2001:db8:1:3::1", 64));
    /* other prefixes */
    assert_false(same_key("2001:db8:1:2::1", "2001:db8:1:2::2", 128));
    assert_true(same_key("2001:db8:1:2::1", "2001:db8:1:3::1", 48));
    assert_false(same_key("2001:db8:1:2::1", "2001:db8:2:2::1", 48));
    assert_true(same_key("2001:db8:1:2::1", "2001:db8:1:2::1:1", 112 - 16));
    assert_false(same_key("2001:db8:1:2::1", "2001:db8:1:2:8000::1", 65));
    assert_true(same_key("2001:db8:1:2::1", "2001:db8:1:2:7fff::1", 65));
    /* IPv6 never shares a key with IPv4 */
    assert_false(same_key("::", "0.0.0.0", 32));
}

static void
test_limit_per_prefix(void **state)
{
    (void)state;
    struct conn_table t;
    memset(&t, 0, sizeof(t));
    pthread_mutex_init(&t.lock, NULL);
    uint8_t k[4][16];
    const char *a[4] = {"2001:db8::1", "2001:db8::2", "2001:db8::3", "2001:db8:0:1::1"};
    for (int i = 0; i < 4; i++) {
        struct sockaddr_storage ss = addr(a[i]);
        conn_table_key((struct sockaddr *)&ss, 64, k[i]);
    }
    /* two connections per client: a third address of the /64 is refused */
    assert_true(conn_table_add(&t, k[0], 2));
    assert_true(conn_table_add(&t, k[1], 2));
    assert_false(conn_table_add(&t, k[2], 2));
    /* another /64 is another client */
    assert_true(conn_table_add(&t, k[3], 2));
    /* one leaves: the /64 has a slot again */
    conn_table_remove(&t, k[0]);
    assert_true(conn_table_add(&t, k[2], 2));
    assert_false(conn_table_add(&t, k[0], 2));
    free(t.slots);
    pthread_mutex_destroy(&t.lock);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keys),
        cmocka_unit_test(test_limit_per_prefix),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
