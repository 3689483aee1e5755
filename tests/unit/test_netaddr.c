/*
 * Delivery targets refused by address (engine/netaddr.h
 * netaddr_target_refused): [delivery] deny_networks over everything,
 * then the special networks (loopback, link-local, ...) unless
 * allow_networks lists them; a v4-mapped IPv6 address as its IPv4 one.
 * No network.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <cmocka.h>

#include "engine/netaddr.h"

static const char *
refused(const char *ip, const char *allow, const char *deny)
{
    struct cidr a[NETADDR_MAX_LIST], d[NETADDR_MAX_LIST];
    char err[128];
    int na = allow ? cidr_parse_list(allow, a, NETADDR_MAX_LIST, err, sizeof(err)) : 0;
    int nd = deny ? cidr_parse_list(deny, d, NETADDR_MAX_LIST, err, sizeof(err)) : 0;
    assert_true(na >= 0 && nd >= 0);
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (strchr(ip, ':') != NULL) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        s6->sin6_family = AF_INET6;
        assert_int_equal(inet_pton(AF_INET6, ip, &s6->sin6_addr), 1);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        s4->sin_family = AF_INET;
        assert_int_equal(inet_pton(AF_INET, ip, &s4->sin_addr), 1);
    }
    return netaddr_target_refused((const struct sockaddr *)&ss, a, na, d, nd);
}

static void
test_deny_over_allow(void **state)
{
    (void)state;
    const char *deny = "10.0.0.0/8, 192.168.0.0/16, fc00::/7, 127.0.0.2";
    assert_null(refused("192.0.2.1", NULL, deny));
    assert_string_equal(refused("10.1.2.3", NULL, deny), NETADDR_DENIED);
    assert_string_equal(refused("192.168.7.7", "192.168.0.0/16", deny), NETADDR_DENIED);
    assert_string_equal(refused("fd00::25", NULL, deny), NETADDR_DENIED);
    assert_string_equal(refused("::ffff:10.9.9.9", NULL, deny), NETADDR_DENIED);
    /* loopback: allowed by allow_networks but for the one address denied */
    assert_null(refused("127.0.0.1", "127.0.0.0/8", deny));
    assert_string_equal(refused("127.0.0.2", "127.0.0.0/8", deny), NETADDR_DENIED);
}

static void
test_special_unless_allowed(void **state)
{
    (void)state;
    assert_string_equal(refused("127.0.0.1", NULL, NULL), "loopback");
    assert_null(refused("127.0.0.1", "127.0.0.0/8", NULL));
    assert_string_equal(refused("169.254.169.254", "127.0.0.0/8", NULL), "link-local");
    assert_string_equal(refused("::ffff:224.0.0.1", NULL, NULL), "multicast");
    assert_null(refused("10.1.2.3", NULL, NULL)); /* private, but not refused unless denied */
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deny_over_allow),
        cmocka_unit_test(test_special_unless_allowed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
