/*
 * config_load: every error is reported with file:line, domain policies
 * inherit from [domain *], the bundled default config is valid.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "dkim/dkim.h"
#include "engine/config.h"

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

/* Load text; return the error output (caller frees) and the config. */
static char *
load(const char *text, struct config **cfg, int *rc)
{
    write_file(text);
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    *rc = config_load(path, cfg, errs);
    fclose(errs);
    unlink(path);
    return buf;
}

static void
expect_error(const char *errs, unsigned line, const char *what)
{
    char want[512];
    snprintf(want, sizeof(want), "%s:%u: %s", path, line, what);
    if (strstr(errs, want) == NULL)
        fail_msg("expected '%s' in:\n%s", want, errs);
}

/* hostname and dsn_from: names that go into EHLO and each DSN's
 * Message-ID and From:. One with a space made every connection fail
 * (client_init_failed), one with < or > every DSN (dsn_failed); both
 * were taken. */
static void
test_host_names(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[server]\n"                      /* 1 */
                      "hostname = mx example.test\n"    /* 2 */
                      "[bounce]\n"                      /* 3 */
                      "dsn_from = MAILER DAEMON\n",     /* 4 */
                      &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    assert_null(cfg);
    expect_error(errs, 2, "hostname: \"mx example.test\" is no domain name: ");
    expect_error(errs, 4, "dsn_from: \"MAILER DAEMON\" is no local part: ");
    free(errs);
    static const char *const bad[] = {"relay<1>.test", "b\303\274cher.test", "x..y", "-x.test",
                                      "a..", "relay>.test"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char text[256];
        snprintf(text, sizeof(text), "[server]\nhostname = %s\n", bad[i]);
        errs = load(text, &cfg, &rc);
        assert_int_equal(rc, -EINVAL);
        expect_error(errs, 2, "hostname: \"");
        free(errs);
    }
    static const char *const good[] = {"mx.example.test", "relay", "a_b.example", "[192.0.2.1]",
                                       "xn--bcher-kva.test"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        char text[256];
        snprintf(text, sizeof(text), "[server]\nhostname = %s\n[bounce]\ndsn_from = bounce.\n",
                 good[i]);
        errs = load(text, &cfg, &rc);
        if (rc != 0)
            fail_msg("%s: %s", good[i], errs);
        assert_string_equal(cfg->server.hostname, good[i]);
        config_free(cfg);
        free(errs);
    }
    /* a trailing dot, as DNS writes a name, is dropped */
    errs = load("[server]\nhostname = mx.example.test.\n", &cfg, &rc);
    if (rc != 0)
        fail_msg("trailing dot: %s", errs);
    assert_string_equal(cfg->server.hostname, "mx.example.test");
    config_free(cfg);
    free(errs);
}

static void
test_errors_with_lines(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[server]\n"                  /* 1 */
                      "workers = 2\n"               /* 2 */
                      "wokers = 3\n"                /* 3: unknown key */
                      "[queue]\n"                   /* 4 */
                      "map_size = 10Q\n"            /* 5: bad size */
                      "; a comment\n"               /* 6 */
                      "[domain example.com]\n"      /* 7 */
                      "max_message_rate = 50/fortnight\n" /* 8: bad rate */
                      "max_connections = 0\n"       /* 9: out of range */
                      "[nonsense]\n"                /* 10 */
                      "x = 1\n"                     /* 11: unknown section */
                      "[server]\n"                  /* 12 */
                      "workers = 4\n"               /* 13: twice */
                      "this line is not ini\n",     /* 14 */
                      &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    assert_null(cfg);
    expect_error(errs, 3, "wokers: unknown key in [server]");
    expect_error(errs, 5, "map_size: expected a size");
    expect_error(errs, 8, "max_message_rate: expected a rate");
    expect_error(errs, 9, "max_connections: '0' is out of range 1..100000");
    expect_error(errs, 10, "[nonsense]: unknown section");
    expect_error(errs, 13, "workers: set twice in [server] (first at line 2)");
    expect_error(errs, 14, "not a [section] header");
    free(errs);
}

/* An unknown key or section that is a typo of a known one says which
 * (edit distance, a swap counting as one edit); one far from any does not. */
static void
test_unknown_names_suggest(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[delivery]\n"                 /* 1 */
                      "idle_timout = 5s\n"           /* 2: one letter short */
                      "conenct_timeout = 5s\n"       /* 3: two letters swapped */
                      "frobnicate = 1\n"             /* 4: nothing close */
                      "[delivry]\n"                  /* 5: a section */
                      "x = 1\n"                      /* 6 */
                      "[domian example.com]\n"       /* 7: a named section's kind */
                      "x = 1\n"                      /* 8 */
                      "[domain example.com]\n"       /* 9 */
                      "max_conections = 5\n"         /* 10: [domain] keys */
                      "[source 192.0.2.1]\n"         /* 11 */
                      "ehlp = a.example\n"           /* 12: [source] keys */
                      "[zzzzzz]\n"                   /* 13: nothing close */
                      "x = 1\n",                     /* 14 */
                      &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    assert_null(cfg);
    expect_error(errs, 2,
                 "idle_timout: unknown key in [delivery] (did you mean \"idle_timeout\"?)");
    expect_error(errs, 3,
                 "conenct_timeout: unknown key in [delivery] (did you mean \"connect_timeout\"?)");
    expect_error(errs, 4, "frobnicate: unknown key in [delivery]\n");
    expect_error(errs, 5, "[delivry]: unknown section (did you mean \"[delivery]\"?)");
    expect_error(errs, 7,
                 "[domian example.com]: unknown section (did you mean \"[domain example.com]\"?)");
    expect_error(errs, 10, "max_conections: unknown key in [domain example.com] (did you mean "
                           "\"max_connections\"?)");
    expect_error(errs, 12, "ehlp: unknown key in [source 192.0.2.1] (did you mean \"ehlo\"?)");
    expect_error(errs, 13, "[zzzzzz]: unknown section\n");
    free(errs);
}

/* [mx] and [source] sections report a key set twice as the others do,
 * also when the section goes on further down. */
static void
test_limit_sections_key_twice(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[mx *.example.com]\n"          /* 1 */
                      "max_connections = 4\n"         /* 2 */
                      "max_connections = 40\n"        /* 3: twice */
                      "[source 192.0.2.1]\n"          /* 4 */
                      "max_message_rate = 10/s\n"     /* 5 */
                      "[mx other.example.net]\n"      /* 6 */
                      "max_connections = 5\n"         /* 7: another section: fine */
                      "[source 192.0.2.1]\n"          /* 8: continued */
                      "max_message_rate = 20/s\n"     /* 9: twice */
                      "message_burst = 3\n",          /* 10 */
                      &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 3, "max_connections: set twice in [mx *.example.com] (first at line 2)");
    expect_error(errs, 9, "max_message_rate: set twice in [source 192.0.2.1] (first at line 5)");
    assert_null(strstr(errs, ":7:"));
    assert_null(strstr(errs, ":10:"));
    free(errs);
}

/* [events NAME] too: a key set twice is an error, not the last value
 * silently. */
static void
test_events_key_twice(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[events hook]\n"             /* 1 */
                      "url = https://a.example/x\n" /* 2 */
                      "url = https://b.example/y\n" /* 3: twice */
                      "[events other]\n"            /* 4 */
                      "url = https://c.example/z\n" /* 5: another section */
                      "url = https://d.example/w\n" /* 6: twice */
                      "[events hook]\n"             /* 7: continued */
                      "batch_max = 5\n"             /* 8 */
                      "batch_max = 6\n",            /* 9: twice */
                      &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 3, "url: set twice in [events hook] (first at line 2)");
    expect_error(errs, 6, "url: set twice in [events other] (first at line 5)");
    expect_error(errs, 9, "batch_max: set twice in [events hook] (first at line 8)");
    assert_null(strstr(errs, ":5:"));
    assert_null(strstr(errs, ":8:"));
    free(errs);
}

/* Every line that is not a header, a key or a comment is reported (inih
 * returns the first only), each on its line. */
static void
test_every_syntax_error(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[server]\n"            /* 1 */
                      "this is not ini\n"     /* 2 */
                      "workers = 2\n"         /* 3 */
                      "neither is this\n"     /* 4 */
                      "[queue\n"              /* 5: no ']' */
                      "[queue ; x]\n"         /* 6: ']' inside a comment */
                      "max_batch ; = 8\n"     /* 7: '=' inside a comment */
                      "; [a comment]\n"       /* 8 */
                      "# key = value\n"       /* 9 */
                      "hostname:mx.example\n" /* 10: name: value */
                      "a;b = c\n"             /* 11: a key (unknown) */
                      "= c\n"                 /* 12: no key name */
                      "[domain example.com]\n" /* 13 */
                      " = 5\n",               /* 14: no key name */
                      &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    static const unsigned bad[] = {2, 4, 5, 6, 7};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_error(errs, bad[i], "not a [section] header, a key = value line, or a comment");
    expect_error(errs, 11, "a;b: unknown key in [server]");
    expect_error(errs, 12, "a line with no key name before its '='");
    expect_error(errs, 14, "a line with no key name before its '='");
    assert_null(strstr(errs, ":12: : ")); /* not "unknown key" of an empty name */
    assert_null(strstr(errs, ":14: : "));
    assert_null(strstr(errs, ":3:"));
    assert_null(strstr(errs, ":8:"));
    assert_null(strstr(errs, ":9:"));
    assert_null(strstr(errs, ":10:"));
    /* once each */
    const char *first = strstr(errs, ":2: not a");
    assert_non_null(first);
    assert_null(strstr(first + 1, ":2: not a"));
    free(errs);
}

/* Each line stands alone (no multi-line values): indented keys are keys,
 * and an indented line without '=' is not taken for the value before. */
static void
test_indented_lines(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[server]\n"                      /* 1 */
                      "    workers = 2\n"               /* 2 */
                      "    hostname = mx.example.com\n" /* 3 */
                      "  [events hook]\n"               /* 4 */
                      "\turl = https://a.example/x\n"   /* 5 */
                      "\tbatch_max = 5\n",              /* 6 */
                      &cfg, &rc);
    assert_string_equal(errs, "");
    free(errs);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg->server.workers, 2);
    assert_string_equal(cfg->server.hostname, "mx.example.com");
    assert_int_equal(cfg->nevents, 1);
    assert_string_equal(cfg->events[0].url, "https://a.example/x");
    assert_int_equal(cfg->events[0].batch_max, 5);
    config_free(cfg);

    errs = load("[events hook]\n"             /* 1 */
                "url = https://a.example/x\n" /* 2 */
                "  https://b.example/y\n",    /* 3: no key */
                &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 3, "https: unknown key in [events hook]"); /* inih's name: value */
    free(errs);
    errs = load("[delivery]\n"                   /* 1 */
                "allow_networks = 127.0.0.0/8\n" /* 2 */
                "    10.0.0.0/8\n",              /* 3: no key */
                &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 3, "not a [section] header");
    free(errs);
}

/* "[dns]\nservers = " and a servers list of exactly len characters
 * (127.0.0.N:53 entries, padded with spaces after the first comma). */
static char *
servers_text(size_t len)
{
    char *v = malloc(len + 1);
    assert_non_null(v);
    size_t n = (size_t)snprintf(v, len + 1, "127.0.0.1:53,");
    for (unsigned i = 2; n + 16 < len; i = i % 250 + 1)
        n += (size_t)snprintf(v + n, len + 1 - n, " 127.0.0.%u:53", i);
    size_t pad = len - n - 12; /* room for the last " 127.0.0.9:5" */
    memmove(v + 13 + pad, v + 13, n - 13);
    memset(v + 13, ' ', pad);
    n += pad;
    n += (size_t)snprintf(v + n, len + 1 - n, " 127.0.0.9:5");
    assert_int_equal(n, len);
    char *text = malloc(len + 32);
    assert_non_null(text);
    snprintf(text, len + 32, "[dns]\nservers = %s\n", v);
    free(v);
    return text;
}

/* Lines far longer than inih's own 200-octet buffer: each key's own
 * limit applies ([dns] servers: 1,024 characters; [mta_sts] ca_file:
 * 4,096), and a line past CONFIG_LINE_MAX (64 KiB) is an error on its
 * own line, the lines after it keeping their numbers. */
static void
test_long_lines(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *text = servers_text(1000);
    char *errs = load(text, &cfg, &rc);
    free(text);
    assert_string_equal(errs, "");
    free(errs);
    assert_int_equal(rc, 0);
    assert_int_equal(strlen(cfg->dns.servers), 1000);
    assert_string_equal(cfg->dns.servers + 1000 - 12, " 127.0.0.9:5");
    config_free(cfg);

    text = servers_text(1025);
    errs = load(text, &cfg, &rc);
    free(text);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 2, "servers: longer than 1024 characters");
    free(errs);

    /* a 4,000-character path, CRLF line ends */
    char *path4k = malloc(4001);
    assert_non_null(path4k);
    for (size_t i = 0; i < 4000; i++)
        path4k[i] = i % 200 == 0 ? '/' : 'd';
    path4k[4000] = '\0';
    text = malloc(4100);
    assert_non_null(text);
    snprintf(text, 4100, "[mta_sts]\r\nca_file = %s  \r\n", path4k);
    errs = load(text, &cfg, &rc);
    free(text);
    assert_string_equal(errs, "");
    free(errs);
    assert_int_equal(rc, 0);
    assert_string_equal(cfg->mta_sts.ca_file, path4k);
    config_free(cfg);
    free(path4k);

    /* 64 KiB is the most a line holds: a comment that long is fine, one
     * character more is an error; the lines after either keep their
     * numbers, for our errors and for inih's. */
    size_t big = 65536 + 200;
    text = malloc(2 * big);
    assert_non_null(text);
    size_t n = (size_t)snprintf(text, big, "[server]\n;"); /* 1, 2 */
    memset(text + n, 'c', 65535);
    n += 65535;
    n += (size_t)snprintf(text + n, big, "\nworkers = 2\n"); /* 3 */
    n += (size_t)snprintf(text + n, big, "[log]\nfile = /"); /* 4, 5 */
    memset(text + n, 'f', 65536 - 7);
    n += 65536 - 7;
    n += (size_t)snprintf(text + n, big,
                          "\nwokers = 3\n"  /* 6 */
                          "not ini\n"       /* 7 */
                          "[server]\n"      /* 8 */
                          "workers = 4\n"); /* 9 */
    errs = load(text, &cfg, &rc);
    free(text);
    assert_int_equal(rc, -EINVAL);
    assert_null(cfg);
    assert_null(strstr(errs, ":2:"));
    assert_null(strstr(errs, ":3:"));
    expect_error(errs, 5, "line longer than 65536 characters\n");
    expect_error(errs, 6, "wokers: unknown key in [log]");
    expect_error(errs, 7, "not a [section] header");
    expect_error(errs, 9, "workers: set twice in [server] (first at line 3)");
    free(errs);
}

/* inih's buffer starts at 200 octets and doubles up to 64 KiB + 3; the
 * reader hands it a line in as many pieces as it asks for. A value whose
 * line ends just before, at or just after each size (LF or CRLF) arrives
 * whole, and the key after it keeps its line. */
static void
test_line_length_boundaries(void **state)
{
    (void)state;
    static const size_t sizes[] = {200, 400, 800, 1600, 3200, 4106};
    char *val = malloc(4097);
    char *text = malloc(4200);
    assert_non_null(val);
    assert_non_null(text);
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        for (size_t line = sizes[i] - 6; line <= sizes[i] + 2 && line - 10 <= 4096; line++) {
            for (int crlf = 0; crlf < 2; crlf++) {
                size_t vlen = line - 10; /* "ca_file = " */
                val[0] = '/';
                memset(val + 1, 'p', vlen - 1);
                val[vlen] = '\0';
                const char *eol = crlf ? "\r\n" : "\n";
                snprintf(text, 4200, "[mta_sts]%sca_file = %s%swokers = 1%s", eol, val, eol, eol);
                struct config *cfg;
                int rc;
                char *errs = load(text, &cfg, &rc);
                assert_int_equal(rc, -EINVAL);
                expect_error(errs, 3, "wokers: unknown key in [mta_sts]");
                assert_null(strstr(errs, ":2:"));
                free(errs);
                snprintf(text, 4200, "[mta_sts]%sca_file = %s%s", eol, val, eol);
                errs = load(text, &cfg, &rc);
                assert_string_equal(errs, "");
                free(errs);
                assert_int_equal(rc, 0);
                assert_string_equal(cfg->mta_sts.ca_file, val);
                config_free(cfg);
            }
        }
    }
    free(val);
    free(text);
}

/* Address lists take NETADDR_MAX_LIST (32) entries; one more is said to
 * be one too many, not "cannot parse" a good address. */
static void
test_address_list_limit(void **state)
{
    (void)state;
    char text[2048];
    size_t n = (size_t)snprintf(text, sizeof(text), "[server]\ntrusted_networks = 10.0.0.0/24");
    for (int i = 1; i < 32; i++)
        n += (size_t)snprintf(text + n, sizeof(text) - n, ", 10.0.%d.0/24", i);
    snprintf(text + n, sizeof(text) - n, "\n");
    struct config *cfg;
    int rc;
    char *errs = load(text, &cfg, &rc);
    assert_string_equal(errs, "");
    free(errs);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg->server.ntrusted, 32);
    config_free(cfg);
    snprintf(text + n, sizeof(text) - n, ", 10.0.32.0/24\n[delivery]\nallow_networks = ");
    n = strlen(text);
    for (int i = 0; i < 33; i++)
        n += (size_t)snprintf(text + n, sizeof(text) - n, "%s127.0.0.%d", i ? ", " : "", i + 1);
    snprintf(text + n, sizeof(text) - n, "\n");
    errs = load(text, &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 2,
                 "trusted_networks: more than 32 entries, the most it takes ('10.0.32.0/24' is "
                 "one too many)");
    expect_error(errs, 4,
                 "allow_networks: more than 32 entries, the most it takes ('127.0.0.33' is one "
                 "too many)");
    free(errs);
}

/* What [dns] checks across keys is reported on the line of the key at
 * fault, not on servers' (or on no line when servers is unset). */
static void
test_dns_check_lines(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        unsigned line;
        const char *what;
    } cases[] = {
        {"[dns]\nservers = 127.0.0.1\nmin_ttl = 2h\nmax_ttl = 1h\n", 3,
         "[dns] min_ttl is longer than max_ttl"},
        {"[dns]\nmin_ttl = 2d\n", 2, "[dns] min_ttl is longer than max_ttl"},
        {"[dns]\n\nmax_ttl = 10s\n", 3, "[dns] min_ttl is longer than max_ttl"},
        {"[dns]\nservers = 192.0.2.1\ndnssec = trust_ad\n", 3,
         "[dns] dnssec = trust_ad needs servers on loopback"},
        {"[dns]\ntimeout = 1s\nservers = 127.0.0.1, localhost\n", 3,
         "[dns] 'localhost' is not an address"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct config *cfg;
        int rc;
        char *errs = load(cases[i].text, &cfg, &rc);
        assert_int_equal(rc, -EINVAL);
        expect_error(errs, cases[i].line, cases[i].what);
        free(errs);
    }
}

/* [stats] socket_mode is octal digits: a sign or a blank is refused (strtoul
 * took "-0" and "+660"). */
static void
test_socket_mode_digits(void **state)
{
    (void)state;
    static const char *const bad[] = {"-0", "+660", "0x1", "0999", "1000"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char text[64];
        snprintf(text, sizeof(text), "[stats]\nsocket_mode = %s\n", bad[i]);
        struct config *cfg;
        int rc;
        char *errs = load(text, &cfg, &rc);
        assert_int_equal(rc, -EINVAL);
        expect_error(errs, 2, "socket_mode: octal permissions, e.g. 0660");
        free(errs);
    }
    struct config *cfg;
    int rc;
    char *errs = load("[stats]\nsocket_mode = 0600\n", &cfg, &rc);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg->stats.socket_mode, 0600);
    free(errs);
    config_free(cfg);
}

/* [tls] min_protocol newer than max_protocol is refused by the check, on
 * the line of min_protocol (of max_protocol when min keeps its default):
 * before, --check-config said ok and the start refused it. */
static void
test_tls_protocol_order(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        unsigned line;
    } cases[] = {
        {"[tls]\nmin_protocol = TLSv1.3\nmax_protocol = TLSv1.2\n", 2},
        {"[tls]\n\nmax_protocol = TLSv1.2\nmin_protocol = TLSv1.3\n", 4},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct config *cfg;
        int rc;
        char *errs = load(cases[i].text, &cfg, &rc);
        assert_int_equal(rc, -EINVAL);
        expect_error(errs, cases[i].line, "[tls] min_protocol is newer than max_protocol");
        free(errs);
    }
    struct config *cfg;
    int rc;
    char *errs = load("[tls]\nmin_protocol = TLSv1.3\nmax_protocol = TLSv1.3\n", &cfg, &rc);
    assert_int_equal(rc, 0);
    free(errs);
    config_free(cfg);
}

/* The reader checks what inih cannot see: a NUL inside a line. */
static void
test_nul_in_line(void **state)
{
    (void)state;
    static const char text[] = "[server]\nworkers = 2\0 and more\nwokers = 3\n";
    snprintf(path, sizeof(path), "/tmp/sluice-conf-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, sizeof(text) - 1), (ssize_t)sizeof(text) - 1);
    close(fd);
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    struct config *cfg;
    int rc = config_load(path, &cfg, errs);
    fclose(errs);
    unlink(path);
    assert_int_equal(rc, -EINVAL);
    expect_error(buf, 2, "a NUL character");
    expect_error(buf, 3, "wokers: unknown key in [server]");
    free(buf);
}

/* Section names longer than inih's 49 characters: the keys go to the
 * section named in full (inih passes the name cut short). */
static void
test_long_section_names(void **state)
{
    (void)state;
    char key[] = "/tmp/sluice-dkim-key-XXXXXX";
    int fd = mkstemp(key);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    assert_non_null(f);
    EVP_PKEY *pk = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    assert_non_null(pk);
    assert_int_equal(PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL), 1);
    EVP_PKEY_free(pk);
    fclose(f);
    char text[1024];
    snprintf(text, sizeof(text),
             "[domain mail-relay.newsletters.example-company-group.com]\n" /* 1 */
             "max_connections = 3\n"                                       /* 2 */
             "[dkim newsletters.example-company.co.uk s2024-01-ed25519]\n" /* 3 */
             "key_file = %s\n"                                             /* 4 */
             "[mx mx-cluster-07.inbound.mail-provider.example.net]\n"      /* 5 */
             "max_connections = 7\n",                                      /* 6 */
             key);
    struct config *cfg;
    int rc;
    char *errs = load(text, &cfg, &rc);
    unlink(key);
    assert_string_equal(errs, "");
    free(errs);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg->ndomains, 1);
    assert_int_equal(dkim_keyring_count(cfg->dkim_keys), 1);
    const struct domain_policy *d =
        config_domain(cfg, "mail-relay.newsletters.example-company-group.com");
    assert_string_equal(d->name, "mail-relay.newsletters.example-company-group.com");
    assert_int_equal(d->max_connections, 3);
    assert_int_equal(cfg->nmxs, 1);
    assert_string_equal(cfg->mxs[0].pattern, "mx-cluster-07.inbound.mail-provider.example.net");
    assert_int_equal(cfg->mxs[0].max_connections, 7);
    config_free(cfg);

    /* a header past SECTION_NAME_MAX: an error on its line, its keys
     * not taken for the section before */
    char name[600];
    memset(name, 'x', sizeof(name) - 1);
    name[sizeof(name) - 1] = '\0';
    snprintf(text, sizeof(text), "[server]\nworkers = 2\n[%s]\nworkers = 3\n", name);
    errs = load(text, &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 3,
                 "[xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...]: section header longer than "
                 "511 characters");
    assert_null(strstr(errs, ":4:"));
    free(errs);
}

static void
test_bad_domain(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[log]\nfile = /tmp/x\n[domain bad_-.]\nmax_age = 1d\n", &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 3, "[domain bad_-.]: not a domain name");
    free(errs);
    /* an IDN in U-labels: the A-labels to write, or why it is no IDN */
    errs = load("[domain B\xc3\xbc" "cher.example]\nmax_age = 1d\n"
                "[domain a\xf0\x9f\x98\x80" "b.example]\nmax_age = 1d\n",
                &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 1,
                 "[domain B\xc3\xbc" "cher.example]: not a domain name (or * for the default); "
                 "write an IDN in A-labels: xn--bcher-kva.example");
    expect_error(errs, 3,
                 "[domain a\xf0\x9f\x98\x80" "b.example]: not a domain name (or * for the "
                 "default); not a valid IDN: ");
    free(errs);
}

/* A body memory smaller than the largest message could never take it:
 * refused, on the line that sets either. */
static void
test_body_memory_limit_below_message_size(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[server]\nmax_message_size = 100M\nbody_memory_limit = 64M\n", &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 3, "body_memory_limit: smaller than max_message_size (104857600)");
    free(errs);
    errs = load("[server]\nmax_message_size = 2G\n", &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 2, "body_memory_limit: smaller than max_message_size");
    free(errs);
    errs = load("[server]\nmax_message_size = 2G\nbody_memory_limit = 4G\n", &cfg, &rc);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg->server.body_memory_limit, 4ULL << 30);
    config_free(cfg);
    free(errs);
    /* Room for the recipients of a message that large too: 1000 of them
     * (the default max_recipients) at 1,100 octets each. */
    errs = load("[server]\nmax_message_size = 10M\nbody_memory_limit = 10M\n", &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 3,
                 "body_memory_limit: smaller than max_message_size (10485760) and the memory "
                 "of max_recipients (1000) recipients (1100 octets each at most): 11585760");
    free(errs);
    errs = load("[server]\nmax_message_size = 10M\nbody_memory_limit = 12M\n", &cfg, &rc);
    assert_int_equal(rc, 0);
    config_free(cfg);
    free(errs);
    errs = load("[server]\nmax_message_size = 10M\nbody_memory_limit = 10500K\n"
                "max_recipients = 100\n",
                &cfg, &rc);
    assert_int_equal(rc, 0);
    config_free(cfg);
    free(errs);
}

/* [bounce]: the listener needs domains and a key; the key file is read at
 * load; a bad prefix is refused. */
static void
test_bounce_listener_and_verp(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[bounce]\nlisten = 127.0.0.1:2526\n", &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 2, "[bounce] listen: needs domains or verp_domain");
    expect_error(errs, 2, "[bounce] listen: needs verp_key_file");
    free(errs);
    errs = load("[bounce]\nverp_domain = b.example\nverp_key_file = /nonexistent/k\n"
                "verp_prefix = a b\n", &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 3, "[bounce] verp_key_file: /nonexistent/k: No such file");
    expect_error(errs, 4, "[bounce] verp_prefix: letters, digits");
    free(errs);
    char key[] = "/tmp/sluice-verp-key-XXXXXX";
    int fd = mkstemp(key);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "short\n", 6), 6);
    close(fd);
    char text[512];
    snprintf(text, sizeof(text), "[bounce]\nverp_domain = b.example\nverp_key_file = %s\n", key);
    errs = load(text, &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 3, "[bounce] verp_key_file:");
    assert_non_null(strstr(errs, "must hold 16 to 128 octets, has 5"));
    free(errs);
    fd = open(key, O_WRONLY | O_TRUNC);
    assert_int_equal(write(fd, "0123456789abcdef0123456789abcdef\n", 33), 33);
    close(fd);
    snprintf(text, sizeof(text),
             "[bounce]\nverp_domain = b.example\nverp_key_file = %s\nlisten = 127.0.0.1:2526\n",
             key);
    errs = load(text, &cfg, &rc);
    assert_int_equal(rc, 0);
    assert_int_equal(cfg->bounce.verp_key_len, 32);
    assert_int_equal(cfg->bounce.nlisten, 1);
    assert_string_equal(cfg->bounce.verp_prefix, "bounce-");
    config_free(cfg);
    free(errs);
    unlink(key);
}

/* An address given to two listeners (submission and the bounce
 * listener, or implicit TLS) is refused: each binds SO_REUSEPORT sockets,
 * so both bound and the kernel spread the connections over them. */
static void
test_listeners_apart(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char key[] = "/tmp/sluice-verp-key-XXXXXX";
    int fd = mkstemp(key);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "0123456789abcdef0123456789abcdef\n", 33), 33);
    close(fd);
    char text[512];
    snprintf(text, sizeof(text),
             "[server]\nlisten = 127.0.0.1:2525, [::1]:2525\n"
             "[bounce]\nverp_domain = b.example\nverp_key_file = %s\n"
             "listen = 127.0.0.1:2526, [::1]:2525\n",
             key);
    char *errs = load(text, &cfg, &rc);
    assert_int_equal(rc, -EINVAL);
    expect_error(errs, 6, "[bounce] listen: [::1]:2525 is also listen's: each listener needs");
    free(errs);
    /* the same port on other addresses, and other ports, are apart */
    snprintf(text, sizeof(text),
             "[server]\nlisten = 127.0.0.1:2525, [::1]:2525\n"
             "[bounce]\nverp_domain = b.example\nverp_key_file = %s\n"
             "listen = 127.0.0.2:2525, [::1]:2526\n",
             key);
    errs = load(text, &cfg, &rc);
    assert_int_equal(rc, 0);
    assert_string_equal(errs, "");
    config_free(cfg);
    free(errs);
    unlink(key);
}

static void
test_domain_inheritance(void **state)
{
    (void)state;
    struct config *cfg;
    int rc;
    char *errs = load("[domain Example.COM.]\n"
                      "max_connections = 5\n"
                      "[domain *]\n"
                      "max_connections = 10\n"
                      "max_message_rate = 3000/h\n"
                      "tls = required\n"
                      "[domain other.org]\n"
                      "tls = off\n",
                      &cfg, &rc);
    assert_string_equal(errs, "");
    free(errs);
    assert_int_equal(rc, 0);
    assert_non_null(cfg);
    const struct domain_policy *d = config_domain(cfg, "example.com");
    assert_string_equal(d->name, "example.com");
    assert_int_equal(d->max_connections, 5);
    assert_int_equal(d->max_message_rate.count, 3000); /* from [domain *] */
    assert_int_equal(d->tls, DOMAIN_TLS_REQUIRED);
    d = config_domain(cfg, "OTHER.org");
    assert_int_equal(d->tls, DOMAIN_TLS_OFF);
    assert_int_equal(d->max_connections, 10);
    d = config_domain(cfg, "unlisted.net");
    assert_string_equal(d->name, "*");
    assert_int_equal(d->max_connections, 10);
    assert_int_equal(d->retry_schedule.n, 7); /* built-in default */
    assert_int_equal(d->max_age, 3ULL * 86400 * 1000);
    assert_true(cfg->server.workers >= 1); /* 0 means one per core */
    assert_non_null(cfg->server.hostname);
    config_free(cfg);
}

static void
test_bundled_config_is_valid(void **state)
{
    (void)state;
    struct config *cfg;
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    int rc = config_load(SOURCE_DIR "/etc/sluice.conf", &cfg, errs);
    fclose(errs);
    if (rc != 0)
        fail_msg("etc/sluice.conf: %s", buf);
    free(buf);
    assert_string_equal(cfg->queue.path, "./var/spool");
    config_free(cfg);
}

static void
test_missing_file(void **state)
{
    (void)state;
    struct config *cfg;
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    int rc = config_load("/nonexistent/sluice.conf", &cfg, errs);
    fclose(errs);
    assert_int_equal(rc, -ENOENT);
    assert_non_null(strstr(buf, "/nonexistent/sluice.conf: cannot read"));
    free(buf);
}

/* A file that opens but cannot be read (a directory) is an error, not an
 * empty config of defaults. */
static void
test_unreadable_file(void **state)
{
    (void)state;
    char dir[] = "/tmp/sluice-conf-dir-XXXXXX";
    assert_non_null(mkdtemp(dir));
    struct config *cfg = NULL;
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    int rc = config_load(dir, &cfg, errs);
    fclose(errs);
    rmdir(dir);
    assert_int_equal(rc, -EINVAL);
    assert_null(cfg);
    char want[128];
    snprintf(want, sizeof(want), "%s: cannot read: %s", dir, strerror(EISDIR));
    if (strstr(buf, want) == NULL)
        fail_msg("expected '%s' in:\n%s", want, buf);
    free(buf);
}

/* What a reload changed, for its log line: the keys of the single
 * sections, each [domain], [mx], [source], [pool] or [tenant] added,
 * removed or with a key changed; a domain key that follows [domain *] in
 * both is [domain *]'s change alone. Before, event=config_reloaded said
 * nothing of what changed. */
static void
test_reload_changes_named(void **state)
{
    (void)state;
    const char *base = "[queue]\npath = /tmp/x\n"
                       "[delivery]\ninitial_connections = 2\n"
                       "[domain *]\nmax_age = 3d\n"
                       "[domain gmail.com]\nmax_connections = 10\n"
                       "[domain yahoo.com]\nmax_connections = 5\n"
                       "[mx *.google.com]\nmax_connections = 30\n"
                       "[source 127.0.0.2]\nehlo = a.example.net\n";
    char next[1024];
    snprintf(next, sizeof(next), "%s", base);
    char *p = strstr(next, "initial_connections = 2");
    p[strlen("initial_connections = ")] = '4';
    p = strstr(next, "max_age = 3d");
    p[strlen("max_age = ")] = '5';
    p = strstr(next, "[domain yahoo.com]");
    *p = '\0'; /* yahoo.com and what follows go */
    strcat(next, "[mx *.google.com]\nmax_connections = 40\n[domain new.example]\nmax_age = 1h\n");
    struct config *a = NULL, *b = NULL;
    int rc;
    char *errs = load(base, &a, &rc);
    assert_int_equal(rc, 0);
    free(errs);
    errs = load(next, &b, &rc);
    assert_int_equal(rc, 0);
    free(errs);
    char out[512];
    assert_int_equal(config_changes(a, a, out, sizeof(out)), 0);
    assert_string_equal(out, "");
    unsigned n = config_changes(a, b, out, sizeof(out));
    assert_string_equal(out, "[delivery] initial_connections, [domain *] max_age, "
                             "+[domain new.example], -[domain yahoo.com], "
                             "[mx *.google.com] max_connections, -[source 127.0.0.2]");
    assert_int_equal(n, 6);
    /* a short buffer: cut, never past it */
    char tiny[16];
    config_changes(a, b, tiny, sizeof(tiny));
    assert_true(strlen(tiny) < sizeof(tiny));
    config_free(a);
    config_free(b);
}

/* [events NAME], [warmup NAME] and [classify] were not compared: a
 * reload that changed only them logged changed="none". */
static void
test_reload_changes_named_more(void **state)
{
    (void)state;
    const char *base = "[queue]\npath = /tmp/x\n"
                       "[events hook]\nurl = http://127.0.0.1:9/e\nbatch_max = 10\n"
                       "[events gone]\nurl = http://127.0.0.1:9/g\n"
                       "[warmup ramp]\nschedule = 50, 100\n"
                       "[warmup same]\nschedule = 10\n"
                       "[classify]\nmailbox_full = code:552\n";
    const char *next = "[queue]\npath = /tmp/x\n"
                       "[events hook]\nurl = http://127.0.0.1:9/e\nbatch_max = 20\n"
                       "[warmup ramp]\nschedule = 50, 200\n"
                       "[warmup same]\nschedule = 10\n"
                       "[warmup new]\nschedule = 5\n"
                       "[classify]\nmailbox_full = code:552\npolicy = enh:5.7.1\n";
    struct config *a = NULL, *b = NULL;
    int rc;
    char *errs = load(base, &a, &rc);
    assert_int_equal(rc, 0);
    free(errs);
    errs = load(next, &b, &rc);
    assert_int_equal(rc, 0);
    free(errs);
    char out[512];
    assert_int_equal(config_changes(a, a, out, sizeof(out)), 0);
    assert_int_equal(config_changes(b, b, out, sizeof(out)), 0);
    unsigned n = config_changes(a, b, out, sizeof(out));
    assert_string_equal(out, "[events hook] batch_max, -[events gone], [warmup ramp], "
                             "+[warmup new], [classify]");
    assert_int_equal(n, 5);
    config_free(a);
    config_free(b);

    /* a shaping rules file edited in place: same path, other rules */
    char rules[64], conf[256];
    snprintf(rules, sizeof(rules), "/tmp/sluice-rules-XXXXXX");
    int fd = mkstemp(rules);
    assert_true(fd >= 0);
    assert_true(write(fd, "group g *.g.example\n", 20) == 20);
    close(fd);
    snprintf(conf, sizeof(conf), "[queue]\npath = /tmp/x\n[shaping]\nrules = %s\n", rules);
    errs = load(conf, &a, &rc);
    assert_int_equal(rc, 0);
    free(errs);
    FILE *f = fopen(rules, "a");
    assert_non_null(f);
    fputs("rule r group=g code=4xx match=\"slow down\" action=suspend scope=source for=1h\n", f);
    fclose(f);
    errs = load(conf, &b, &rc);
    unlink(rules);
    assert_int_equal(rc, 0);
    free(errs);
    assert_int_equal(config_changes(a, a, out, sizeof(out)), 0);
    assert_int_equal(config_changes(a, b, out, sizeof(out)), 1);
    assert_string_equal(out, "[shaping] rules (the file's contents)");
    config_free(a);
    config_free(b);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_errors_with_lines),
        cmocka_unit_test(test_host_names),
        cmocka_unit_test(test_unknown_names_suggest),
        cmocka_unit_test(test_long_lines),
        cmocka_unit_test(test_line_length_boundaries),
        cmocka_unit_test(test_address_list_limit),
        cmocka_unit_test(test_dns_check_lines),
        cmocka_unit_test(test_tls_protocol_order),
        cmocka_unit_test(test_socket_mode_digits),
        cmocka_unit_test(test_nul_in_line),
        cmocka_unit_test(test_long_section_names),
        cmocka_unit_test(test_bad_domain),
        cmocka_unit_test(test_body_memory_limit_below_message_size),
        cmocka_unit_test(test_bounce_listener_and_verp),
        cmocka_unit_test(test_listeners_apart),
        cmocka_unit_test(test_limit_sections_key_twice),
        cmocka_unit_test(test_events_key_twice),
        cmocka_unit_test(test_indented_lines),
        cmocka_unit_test(test_every_syntax_error),
        cmocka_unit_test(test_domain_inheritance),
        cmocka_unit_test(test_bundled_config_is_valid),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_unreadable_file),
        cmocka_unit_test(test_reload_changes_named),
        cmocka_unit_test(test_reload_changes_named_more),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
