/*
 * shaping: rules files (groups, every key, the errors an operator gets),
 * matching of the large receivers' real replies against the shipped
 * rules (and replies that must not match), the operator's rules and
 * groups first, the literal prefilter never hiding a match, 1,000 rules;
 * actions as text and back; action=rate (its forms and errors, the
 * verdict, the rate a local limiter then lets through) and action=bounce
 * parsed; actions kept in the state file across a
 * close and open; two instances sharing one real redis-server: an action
 * reaches the other within a second, a clear likewise, a late starter
 * catches up from the hash; while Redis is away, what waits for it is
 * one change per action, and none is lost when it comes; a keeper whose
 * wall clock steps still reads Redis on time (the binary's own
 * clock_gettime() moves the keepers' wall clock).
 *
 * Threading: the keeper threads of the instances; redis-server is
 * started before any of them, but in the test where Redis comes late
 * (the child calls only async-signal-safe functions before its exec).
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <hiredis/hiredis.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/limits.h"
#include "engine/shaping.h"
#include "tests/support/redis_server.h"
#include "tests/support/wall_clock.h"

/* The keepers' wall clock is moved ahead of the kernel's (the binary's
 * clock_gettime(), tests/support/wall_clock.h; the main thread reads the
 * real one). A deadline computed from that clock and handed to a wait on
 * CLOCK_REALTIME ends as late as after a step back of the wall clock by
 * as much: what test_keeper_wall_clock_step shows. */

static struct shaping_rules *
load(const char *text, char *err, size_t errlen, bool builtin)
{
    struct shaping_rules *r = shaping_rules_new();
    assert_non_null(r);
    int rc = text ? shaping_rules_add_text(r, text, "test.rules", err, errlen) : 0;
    if (rc == 0 && builtin)
        rc = shaping_rules_add_text(r, shaping_builtin_rules, "builtin", err, errlen);
    if (rc < 0)
        return shaping_rules_unref(r);
    assert_int_equal(shaping_rules_finish(r), 0);
    return r;
}

/* What a reload shares (config_share_unchanged): sets built from the same
 * texts under the same names are the same; another text, name or order
 * is not; a shared set lives until its last reference. */
static void
test_rules_same_and_shared(void **state)
{
    (void)state;
    char err[256] = "";
    const char *t = "rule r1 code=421 action=suspend for=1m\n";
    struct shaping_rules *a = load(t, err, sizeof(err), true);
    struct shaping_rules *b = load(t, err, sizeof(err), true);
    struct shaping_rules *c = load("rule r1 code=421 action=suspend for=2m\n", err, sizeof(err),
                                   true);
    struct shaping_rules *d = load(t, err, sizeof(err), false);
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_non_null(d);
    assert_true(shaping_rules_same(a, b));
    assert_false(shaping_rules_same(a, c));
    assert_false(shaping_rules_same(a, d));
    assert_false(shaping_rules_same(a, NULL));
    struct shaping_rules *e = shaping_rules_new(); /* the same text under another name */
    assert_int_equal(shaping_rules_add_text(e, t, "other.rules", err, sizeof(err)), 0);
    assert_int_equal(shaping_rules_add_text(e, shaping_builtin_rules, "builtin", err, sizeof(err)),
                     0);
    assert_int_equal(shaping_rules_finish(e), 0);
    assert_false(shaping_rules_same(a, e));
    /* a second reference: the set outlives the first unref (ASan would
     * see the use after free) */
    struct shaping_rules *a2 = shaping_rules_ref(a);
    shaping_rule_hit(a, 0);
    assert_null(shaping_rules_unref(a));
    assert_int_equal(shaping_rule_hit_count(a2, 0), 1);
    assert_int_equal(shaping_rules_count(a2), shaping_rules_count(b));
    shaping_rules_unref(a2);
    shaping_rules_unref(b);
    shaping_rules_unref(c);
    shaping_rules_unref(d);
    shaping_rules_unref(e);
}

static const char *
match(const struct shaping_rules *r, unsigned code, const char *enh, const char *text,
      const char *mx)
{
    struct shaping_reply rep = {.code = code, .text = text, .mx = mx, .domain = "example.com"};
    if (enh != NULL)
        sscanf(enh, "%u.%u.%u", &rep.enh_cls, &rep.enh_subject, &rep.enh_detail);
    int i = shaping_rules_match(r, &rep);
    return i < 0 ? NULL : shaping_rule(r, (unsigned)i)->name;
}

static void
test_builtin_replies(void **state)
{
    (void)state;
    char err[256] = "";
    struct shaping_rules *r = load(NULL, err, sizeof(err), true);
    assert_non_null(r);
    const char *y = "mta6.am0.yahoodns.net", *m = "example-com.mail.protection.outlook.com",
               *g = "gmail-smtp-in.l.google.com";
    assert_string_equal(match(r, 421, "4.7.0",
                              "[TSS04] Messages from 192.0.2.1 temporarily deferred due to "
                              "unexpected volume or user complaints - 4.16.55.1; see "
                              "https://postmaster.yahooinc.com/error-codes",
                              y),
                        "yahoo-tss04");
    assert_string_equal(match(r, 421, "4.7.0", "[TS01] Messages from 192.0.2.1 temporarily "
                                              "deferred due to user complaints", y),
                        "yahoo-ts01");
    assert_string_equal(match(r, 421, "4.7.1", "[TS03] All messages from 192.0.2.1 will be "
                                              "permanently deferred; Retrying will NOT succeed.",
                              y),
                        "yahoo-ts03");
    /* the same Yahoo reply from a host of another group: no rule */
    assert_null(match(r, 421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred",
                      "mx.example.net"));
    assert_string_equal(
        match(r, 550, "5.7.1",
              "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your "
              "Internet service provider since part of their network is on our block list "
              "(S3150). You can also refer your provider to "
              "http://mail.live.com/mail/troubleshooting.aspx#errors.",
              m),
        "microsoft-s3150");
    assert_string_equal(match(r, 550, "5.7.606",
                              "Access denied, banned sending IP [192.0.2.1]. To request removal "
                              "from this list please visit https://sender.office.com/",
                              m),
                        "microsoft-banned-ip");
    assert_string_equal(match(r, 550, "5.7.649", "Access denied, banned sending IP", m),
                        "microsoft-banned-ip");
    assert_null(match(r, 550, "5.7.650", "Access denied", m)); /* out of the range */
    assert_string_equal(match(r, 451, "4.7.500",
                              "Server busy. Please try again later from [192.0.2.1]. (S77714)", m),
                        "microsoft-busy");
    assert_string_equal(
        match(r, 421, "4.7.28",
              "[192.0.2.1 15] Gmail has detected an unusual rate of unsolicited mail "
              "originating from your IP address. To protect our users from spam, mail sent "
              "from your IP address has been temporarily rate limited.",
              g),
        "gmail-4.7.28");
    assert_string_equal(match(r, 421, "4.7.0",
                              "[192.0.2.1 15] Our system has detected an unusual rate of "
                              "UNSOLICITED mail originating from your IP address.",
                              g),
                        "gmail-unusual-rate");
    assert_string_equal(match(r, 550, "5.7.26", "This mail is unauthenticated, which poses a "
                                               "security risk to the sender and Gmail users",
                              g),
                        "gmail-5.7.26");
    assert_string_equal(match(r, 421, NULL, "mwinf5c10 ME Trop de connexions, veuillez verifier "
                                            "votre configuration. Too many connections, slow "
                                            "down. OFR005_104 [104]",
                              "smtp-in.orange.fr"),
                        "orange-too-many-connections");
    assert_string_equal(match(r, 421, NULL, "Reject due to policy restrictions. For explanation "
                                            "visit https://postmaster.gmx.net/en/error-messages",
                              "mx01.emig.gmx.net"),
                        "gmx-policy");
    /* ordinary replies: nothing */
    assert_null(match(r, 450, "4.2.0", "mailbox busy", y));
    assert_null(match(r, 250, "2.0.0", "ok", y));
    assert_null(match(r, 421, "4.7.0", "too many connections", g));
    assert_true(shaping_rules_count(r) >= 20);
    shaping_rules_unref(r);
}

static void
test_operator_first_and_errors(void **state)
{
    (void)state;
    char err[256] = "";
    /* the operator's group replaces the shipped one; its rule comes first */
    struct shaping_rules *r =
        load("group yahoo mx.yahoo.test\n"
             "rule mine group=yahoo code=421 match=\"TSS04\" action=cap:2 scope=group for=10m\n",
             err, sizeof(err), true);
    assert_non_null(r);
    assert_string_equal(match(r, 421, "4.7.0", "[TSS04] deferred", "mx.yahoo.test"), "mine");
    assert_null(match(r, 421, "4.7.0", "[TSS04] deferred", "mta6.am0.yahoodns.net"));
    const struct shaping_rule_info *ri = shaping_rule(r, 0);
    assert_int_equal(ri->kind, SHAPING_CAP);
    assert_int_equal(ri->value, 2);
    assert_int_equal(ri->scope, SHAPING_SCOPE_GROUP);
    assert_int_equal(ri->for_ms, 600000);
    shaping_rules_unref(r);

    static const struct {
        const char *text, *want;
    } bad[] = {
        {"rule a code=421 action=suspend\n", "needs for="},
        {"rule a code=421 for=1h\n", "needs action="},
        {"rule a action=suspend for=1h\n", "needs code="},
        {"rule a code=621 action=suspend for=1h\n", "code: 200..599"},
        {"rule a enhanced=5.7 action=suspend for=1h\n", "enhanced: C.S.D"},
        {"rule a enhanced=5.7.9-3 action=suspend for=1h\n", "enhanced: C.S.D"},
        {"rule a match=\"([\" action=suspend for=1h\n", "match:"},
        {"rule a match=\"x action=suspend for=1h\n", "unterminated quote"},
        {"rule a code=421 group=nosuch action=suspend for=1h\n", "group: not defined"},
        {"rule a code=421 action=cap for=1h\n", "cap:N"},
        {"rule a code=421 action=suspend scope=mailbox for=1h\n", "scope:"},
        {"rule a code=421 action=backoff scope=tenant for=1h\n", "scope=tenant"},
        {"rule a code=421 action=suspend for=40d\n", "for:"},
        {"rule a code=421 action=suspend for=1h color=red\n", "unknown key"},
        /* a second domain= that is refused: the first was freed (a
         * double free the fuzzer found) */
        {"rule a code=421 domain=a.test domain= action=suspend for=1h\n", "mx, domain"},
        {"rule a code=421 mx=mx.a.test mx= action=suspend for=1h\n", "mx, domain"},
        {"group g\n", "needs MX patterns"},
        {"bogus line\n", "expected group or rule"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        assert_null(load(bad[i].text, err, sizeof(err), false));
        if (strstr(err, bad[i].want) == NULL || strstr(err, "test.rules:1") == NULL)
            fail_msg("%s: got \"%s\", want \"%s\"", bad[i].text, err, bad[i].want);
    }
}

/* The literal taken from a regex never hides a match the regex makes. */
static void
test_prefilter(void **state)
{
    (void)state;
    char err[256] = "";
    struct shaping_rules *r = load("rule opt code=421 match=\"abc?d\" action=count\n"
                                   "rule grp code=421 match=\"x(yz)*w\" action=count\n"
                                   "rule alt code=421 match=\"foo|bar\" action=count\n"
                                   "rule cls code=421 match=\"q[0-9]+r\" action=count\n"
                                   "rule esc code=421 match=\"\\(S3150\\)\" action=count\n"
                                   "rule any enhanced=4.x.x match=\"^ZZZ\" action=count\n",
                                   err, sizeof(err), false);
    assert_non_null(r);
    assert_string_equal(match(r, 421, NULL, "..ABD..", NULL), "opt");
    assert_string_equal(match(r, 421, NULL, "..abcd..", NULL), "opt");
    assert_string_equal(match(r, 421, NULL, "..xw..", NULL), "grp");
    assert_string_equal(match(r, 421, NULL, "..BAR..", NULL), "alt");
    assert_string_equal(match(r, 421, NULL, "q123r", NULL), "cls");
    assert_string_equal(match(r, 421, NULL, "list (S3150).", NULL), "esc");
    assert_null(match(r, 421, NULL, "list S3150.", NULL));
    assert_string_equal(match(r, 451, "4.3.0", "zzz top", NULL), "any");
    assert_null(match(r, 451, NULL, "zzz top", NULL)); /* no enhanced code */
    shaping_rules_unref(r);
    /* bracket expressions holding a class, an equivalence class or a
     * collating element: their inner ']' does not end them */
    r = load("rule cc code=421 match=\"[[:digit:]]xyz\" action=count\n"
             "rule ncc code=421 match=\"[^[:space:]]+blocked\" action=count\n"
             "rule eq code=421 match=\"[[=k=]]lmn\" action=count\n"
             "rule coll code=421 match=\"[[.-.]a]pqr\" action=count\n",
             err, sizeof(err), false);
    assert_non_null(r);
    assert_string_equal(match(r, 421, NULL, "code 5xyz", NULL), "cc");
    assert_string_equal(match(r, 421, NULL, "ip-blocked", NULL), "ncc");
    assert_string_equal(match(r, 421, NULL, "klmn", NULL), "eq");
    assert_string_equal(match(r, 421, NULL, "-pqr", NULL), "coll");
    assert_null(match(r, 421, NULL, "code xyz", NULL));
    shaping_rules_unref(r);
}

/* 1,000 rules: the right one still wins, and the first of equals. */
static void
test_many_rules(void **state)
{
    (void)state;
    size_t cap = 200000, len = 0;
    char *text = malloc(cap);
    assert_non_null(text);
    for (unsigned i = 0; i < 16; i++)
        len += (size_t)snprintf(text + len, cap - len, "group g%u *.g%u.test\n", i, i);
    for (unsigned i = 0; i < 1000; i++)
        len += (size_t)snprintf(text + len, cap - len,
                                "rule r%u group=g%u code=%u match=\"code-%u\\b\" action=count\n",
                                i, i % 16, i % 2 ? 421 : 550, i);
    char err[256] = "";
    struct shaping_rules *r = load(text, err, sizeof(err), false);
    free(text);
    assert_non_null(r);
    assert_int_equal(shaping_rules_count(r), 1000);
    assert_string_equal(match(r, 421, NULL, "deferred code-777 now", "mx.g9.test"), "r777");
    assert_null(match(r, 421, NULL, "deferred code-777 now", "mx.g8.test"));
    assert_null(match(r, 550, NULL, "deferred code-777 now", "mx.g9.test"));
    assert_string_equal(match(r, 550, NULL, "code-998", "a.b.g6.test"), "r998");
    shaping_rules_unref(r);
}

static void
test_action_text(void **state)
{
    (void)state;
    struct shaping_action a = {.kind = SHAPING_CAP, .scope = SHAPING_SCOPE_SOURCE, .value = 3,
                               .started_ms = 1700000000000ULL, .until_ms = 1700000600000ULL};
    snprintf(a.id, sizeof(a.id), "0123456789abcdef");
    snprintf(a.source, sizeof(a.source), "192.0.2.7");
    snprintf(a.group, sizeof(a.group), "yahoo");
    snprintf(a.rule, sizeof(a.rule), "yahoo-tss04");
    snprintf(a.origin, sizeof(a.origin), "node-a");
    snprintf(a.trigger, sizeof(a.trigger), "421 4.7.0 [TSS04] a=b c");
    char line[1024];
    assert_true(shaping_action_format(&a, line, sizeof(line)) > 0);
    struct shaping_action b;
    assert_int_equal(shaping_action_parse(line, &b), 0);
    assert_memory_equal(&a, &b, sizeof(a));
    assert_int_equal(shaping_action_parse("id=zz\tkind=suspend\tuntil=5", &b), -EINVAL);
    assert_int_equal(shaping_action_parse("", &b), -EINVAL);
}

static struct shaping *
open_node(const char *dir, const char *node, int redis_port)
{
    char path[512], url[64], err[256];
    snprintf(path, sizeof(path), "%s/%s.state", dir, node);
    snprintf(url, sizeof(url), "redis://127.0.0.1:%d", redis_port);
    struct shaping_opts o = {.state_path = path, .node = node,
                             .redis_url = redis_port > 0 ? url : NULL,
                             .key_prefix = "t:", .redis_timeout_ms = 1000};
    struct shaping *s = NULL;
    if (shaping_open(&o, &s, err, sizeof(err)) < 0)
        fail_msg("shaping_open: %s", err);
    return s;
}

static size_t
count(struct shaping *s)
{
    struct shaping_action *v;
    size_t n;
    assert_int_equal(shaping_list(s, &v, &n), 0);
    free(v);
    return n;
}

/* The bound on a wait for what another thread (a keeper, Redis) does:
 * generous, for ASan on a loaded machine; only a failure waits it out.
 * What is timed is timed apart (test_two_nodes_through_redis). */
#define WAIT_MS 20000

static bool
wait_count(struct shaping *s, size_t want, unsigned ms)
{
    for (unsigned i = 0; i < ms / 10; i++) {
        if (count(s) == want)
            return true;
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
    return count(s) == want;
}

/* For each of the n instances s[i], the ms from t0 (clock_mono_ms) until
 * it holds want actions, in took[i], or UINT64_MAX after WAIT_MS. All are
 * watched in one loop, so that each time is its own: one instance's late
 * change does not add to the time another is seen at. */
static void
count_reached(struct shaping *const *s, size_t n, size_t want, uint64_t t0, uint64_t *took)
{
    size_t left = n;
    for (size_t i = 0; i < n; i++)
        took[i] = UINT64_MAX;
    for (;;) {
        for (size_t i = 0; i < n; i++) {
            if (took[i] == UINT64_MAX && count(s[i]) == want) {
                took[i] = clock_mono_ms() - t0;
                left--;
            }
        }
        if (left == 0 || clock_mono_ms() - t0 > WAIT_MS)
            return;
        struct timespec ts = {0, 2 * 1000000};
        nanosleep(&ts, NULL);
    }
}

static void
test_state_file_and_check(void **state)
{
    (void)state;
    char dir[] = "/tmp/sluice-shaping-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char err[256] = "";
    struct shaping_rules *r = load(NULL, err, sizeof(err), true);
    struct shaping *s = open_node(dir, "a", 0);
    struct shaping_reply rep = {.code = 421, .enh_cls = 4, .enh_subject = 7,
                                .text = "[TSS04] Messages from 192.0.2.1 temporarily deferred",
                                .mx = "mta5.am0.yahoodns.net", .domain = "yahoo.com"};
    assert_true(shaping_on_reply(s, r, &rep, "192.0.2.1", NULL) >= 0);
    assert_true(shaping_on_reply(s, r, &rep, "192.0.2.1", NULL) >= 0); /* the same action */
    assert_int_equal(count(s), 1);
    struct shaping_verdict v;
    uint64_t now = clock_unix_ms();
    assert_true(shaping_check(s, r, "192.0.2.1", "mta7.am0.yahoodns.net", "aol.com", now, &v));
    assert_true(v.suspended);
    assert_true(v.recheck_ms <= now + 1000);
    assert_false(shaping_check(s, r, "192.0.2.2", "mta7.am0.yahoodns.net", "aol.com", now, &v));
    assert_false(shaping_check(s, r, "192.0.2.1", "gmail-smtp-in.l.google.com", "x", now, &v));
    /* kept across a close and an open */
    s = shaping_close(s);
    s = open_node(dir, "a", 0);
    assert_int_equal(count(s), 1);
    assert_true(shaping_check(s, r, "192.0.2.1", "mta7.am0.yahoodns.net", "aol.com",
                              clock_unix_ms(), &v));
    /* a tenant's spam block holds that tenant at the group, nobody else */
    struct shaping_reply t57 = {.code = 550, .enh_cls = 5, .enh_subject = 7, .enh_detail = 26,
                                .text = "This mail is unauthenticated, which poses a security "
                                        "risk to the sender and Gmail users",
                                .mx = "gmail-smtp-in.l.google.com", .domain = "gmail.com"};
    int gi = shaping_on_reply(s, r, &t57, "192.0.2.1", "acme");
    assert_true(gi >= 0);
    assert_string_equal(shaping_rule(r, (unsigned)gi)->name, "gmail-5.7.26");
    uint64_t rc_ms;
    assert_true(shaping_tenant_held(s, r, "acme", "alt1.gmail-smtp-in.l.google.com",
                                    clock_unix_ms(), &rc_ms));
    assert_false(shaping_tenant_held(s, r, "globex", "alt1.gmail-smtp-in.l.google.com",
                                     clock_unix_ms(), &rc_ms));
    assert_false(shaping_tenant_held(s, r, "acme", "mta5.am0.yahoodns.net", clock_unix_ms(),
                                     &rc_ms));
    /* no connection check is held by it */
    assert_false(shaping_check(s, r, "192.0.2.5", "alt1.gmail-smtp-in.l.google.com", "gmail.com",
                               clock_unix_ms(), &v));
    assert_int_equal(shaping_on_reply(s, r, &t57, "192.0.2.1", NULL), gi); /* no tenant */
    assert_int_equal(count(s), 2);
    assert_int_equal(shaping_clear(s, "tenant=acme"), 1);
    /* a tenant's rate and bounce: that tenant's verdict, at that group */
    struct shaping_action tr = {.kind = SHAPING_RATE, .scope = SHAPING_SCOPE_TENANT, .value = 2,
                                .per_ms = 1000, .until_ms = clock_unix_ms() + 60000};
    snprintf(tr.tenant, sizeof(tr.tenant), "acme");
    snprintf(tr.group, sizeof(tr.group), "gmail");
    assert_int_equal(shaping_add(s, &tr), 0);
    struct shaping_tenant_verdict tv;
    assert_true(shaping_tenant_check(s, r, "acme", "alt1.gmail-smtp-in.l.google.com",
                                     clock_unix_ms(), &tv));
    assert_false(tv.held || tv.bounce);
    assert_true(tv.rate_interval_ns == 500000000ULL && tv.rate_permille == 0);
    assert_string_equal(tv.rate_group, "gmail");
    assert_false(shaping_tenant_held(s, r, "acme", "alt1.gmail-smtp-in.l.google.com",
                                     clock_unix_ms(), &rc_ms));
    assert_false(shaping_tenant_check(s, r, "globex", "alt1.gmail-smtp-in.l.google.com",
                                      clock_unix_ms(), &tv));
    tr.kind = SHAPING_BOUNCE;
    tr.value = tr.per_ms = 0;
    assert_int_equal(shaping_add(s, &tr), 0);
    assert_true(shaping_tenant_check(s, r, "acme", "gmail-smtp-in.l.google.com", clock_unix_ms(),
                                     &tv));
    assert_true(tv.bounce && !tv.held);
    assert_false(shaping_tenant_check(s, r, "acme", "mta5.am0.yahoodns.net", clock_unix_ms(), &tv));
    /* neither reaches a connection's verdict */
    assert_false(shaping_check(s, r, "192.0.2.5", "alt1.gmail-smtp-in.l.google.com", "gmail.com",
                               clock_unix_ms(), &v));
    assert_int_equal(shaping_clear(s, "tenant=acme"), 2);
    /* an operator's short action ends on time; clear by selector */
    struct shaping_action a = {.kind = SHAPING_BACKOFF, .scope = SHAPING_SCOPE_DOMAIN};
    snprintf(a.domain, sizeof(a.domain), "example.org");
    /* (2 s: the check below comes before the keeper ends it, however
     * slow the machine between the two) */
    a.until_ms = clock_unix_ms() + 2000;
    assert_int_equal(shaping_add(s, &a), 0);
    assert_true(shaping_check(s, r, "", "mx.example.org", "example.org", clock_unix_ms(), &v));
    assert_true(v.one_txn && v.cap == 1 && !v.suspended);
    assert_true(wait_count(s, 1, WAIT_MS));
    assert_int_equal(shaping_clear(s, "source=192.0.2.1"), 1);
    assert_int_equal(count(s), 0);
    s = shaping_close(s);
    s = open_node(dir, "a", 0);
    assert_int_equal(count(s), 0); /* the clear was written too */
    shaping_close(s);
    shaping_rules_unref(r);
    char cmdline[600];
    snprintf(cmdline, sizeof(cmdline), "rm -rf %s", dir);
    assert_int_equal(system(cmdline), 0);
}


/* action=rate: its forms and errors, kept as text, what shaping_check
 * says, and the rate a local limiter then lets through (simulated time). */
static struct worker fake_worker; /* a local limiter touches neither ring nor timers */

static unsigned
drive(struct limits *l, struct limit_key *k, uint64_t start_ns, unsigned ms)
{
    unsigned total = 0;
    for (unsigned i = 0; i < ms; i++) {
        uint64_t r;
        total += limits_take_msgs(l, k, 1000, start_ns + (uint64_t)i * 1000000ULL, &r);
    }
    return total;
}

static void
test_rate_action(void **state)
{
    (void)state;
    unsigned v, per;
    assert_int_equal(shaping_rate_parse("10/s", &v, &per), 0);
    assert_true(v == 10 && per == 1000);
    assert_int_equal(shaping_rate_parse("600/min", &v, &per), 0);
    assert_true(v == 600 && per == 60000);
    assert_int_equal(shaping_rate_parse("0.5", &v, &per), 0);
    assert_true(v == 500 && per == 0);
    assert_int_equal(shaping_rate_parse("25%", &v, &per), 0);
    assert_true(v == 250 && per == 0);
    const char *bad[] = {"0", "1", "1.5", "0/s", "abc", "10/fortnight", "-0.5", "", "50%x",
                         "1e300", "1e300%", "nan", "inf", "-inf", "0.00001"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(shaping_rate_parse(bad[i], &v, &per), -EINVAL);
    char rb[32];
    assert_string_equal(shaping_rate_str(500, 0, rb, sizeof(rb)), "50.0%");
    assert_string_equal(shaping_rate_str(10, 1000, rb, sizeof(rb)), "10/s");

    char err[256] = "";
    struct shaping_rules *r = load("group slow *.slow.test\n"
                                   "rule slow-abs group=slow code=421 match=\"slow down\" "
                                   "action=rate:20/s scope=group for=1h\n"
                                   "rule slow-half group=slow code=451 action=rate:0.5 "
                                   "scope=source for=1h\n"
                                   "rule gone group=slow code=550 match=\"no such list\" "
                                   "action=bounce scope=domain for=10m\n",
                                   err, sizeof(err), false);
    assert_non_null(r);
    assert_int_equal(shaping_rule(r, 0)->kind, SHAPING_RATE);
    assert_true(shaping_rule(r, 0)->value == 20 && shaping_rule(r, 0)->per_ms == 1000);
    assert_true(shaping_rule(r, 1)->value == 500 && shaping_rule(r, 1)->per_ms == 0);
    assert_int_equal(shaping_rule(r, 2)->kind, SHAPING_BOUNCE);
    struct shaping_rules *b = load("rule x code=421 action=rate:2 for=1h\n", err, sizeof(err), false);
    assert_null(b);
    assert_non_null(strstr(err, "action=rate:R"));
    /* a tenant is slowed or bounced (not capped) */
    b = load("rule t1 code=554 action=rate:1/s scope=tenant for=1h\n"
             "rule t2 code=550 action=bounce scope=tenant for=1h\n",
             err, sizeof(err), false);
    assert_non_null(b);
    assert_int_equal(shaping_rule(b, 0)->scope, SHAPING_SCOPE_TENANT);
    assert_int_equal(shaping_rule(b, 1)->kind, SHAPING_BOUNCE);
    shaping_rules_unref(b);
    assert_null(load("rule t3 code=554 action=cap:2 scope=tenant for=1h\n", err, sizeof(err),
                     false));
    assert_non_null(strstr(err, "scope=tenant"));

    /* the text form keeps the rate */
    struct shaping_action a = {.kind = SHAPING_RATE, .scope = SHAPING_SCOPE_GROUP, .value = 20,
                               .per_ms = 1000, .until_ms = 2};
    snprintf(a.id, sizeof(a.id), "0123456789abcdef");
    snprintf(a.group, sizeof(a.group), "slow");
    char line[1024];
    assert_true(shaping_action_format(&a, line, sizeof(line)) > 0);
    struct shaping_action back;
    assert_int_equal(shaping_action_parse(line, &back), 0);
    assert_true(back.kind == SHAPING_RATE && back.value == 20 && back.per_ms == 1000);

    /* fired by replies: the verdict carries both, the slower of each; the
     * source's own apart from the group's (everyone's) */
    char dir[] = "/tmp/sluice-shaping-rate-XXXXXX";
    assert_non_null(mkdtemp(dir));
    struct shaping *s = open_node(dir, "a", 0);
    struct shaping_reply r421 = {.code = 421, .text = "slow down please", .mx = "mx1.slow.test",
                                 .domain = "slow.test"};
    struct shaping_reply r451 = {.code = 451, .text = "try later", .mx = "mx1.slow.test",
                                 .domain = "slow.test"};
    assert_int_equal(shaping_on_reply(s, r, &r421, "192.0.2.1", NULL), 0);
    assert_int_equal(shaping_on_reply(s, r, &r451, "192.0.2.1", NULL), 1);
    struct shaping_verdict vd;
    uint64_t now = clock_unix_ms();
    assert_true(shaping_check(s, r, "192.0.2.1", "mx2.slow.test", "slow.test", now, &vd));
    assert_false(vd.suspended || vd.bounce || vd.one_txn || vd.cap != 0);
    assert_int_equal(vd.rate_permille, 0);
    assert_true(vd.rate_interval_ns == 50000000ULL); /* 20/s, the group's */
    assert_int_equal(vd.src_rate_permille, 500);     /* the source's, at its group */
    assert_int_equal(vd.src_rate_interval_ns, 0);
    assert_string_equal(vd.src_rate_group, "slow");
    /* another source: the group's absolute rate only */
    assert_true(shaping_check(s, r, "192.0.2.2", "mx2.slow.test", "slow.test", now, &vd));
    assert_int_equal(vd.rate_permille, 0);
    assert_int_equal(vd.src_rate_permille, 0);
    assert_string_equal(vd.src_rate_group, "");
    assert_false(shaping_check(s, r, "192.0.2.1", "mx.other.test", "other.test", now, &vd));

    /* the limiter: 100/s configured; half of it, then 20/s where no rate
     * is configured at all, then lifted */
    struct limits_opts o = {0};
    struct limits *l = NULL;
    assert_int_equal(limits_new(&fake_worker, &o, &l, err, sizeof(err)), 0);
    struct limit_key k, u;
    struct limit_conf c = {.msg_rate = {100, 1000}, .msg_burst = 1};
    struct limit_conf none = {0};
    assert_int_equal(limits_key_init(l, &k, "rate.test", &c, NULL, NULL), 0);
    assert_int_equal(limits_key_init(l, &u, "unlimited.test", &none, NULL, NULL), 0);
    uint64_t t = 1000ULL * 1000000000ULL;
    unsigned n = drive(l, &k, t, 4000);
    assert_true(n >= 399 && n <= 403);
    t += 4000000000ULL;
    limits_key_shape(l, &k, 500, 0);
    assert_int_equal(limits_key_rate_pct(&k, t), 50);
    n = drive(l, &k, t, 4000);
    assert_true(n >= 198 && n <= 203); /* 50/s */
    t += 4000000000ULL;
    limits_key_shape(l, &k, 500, 50000000ULL); /* and at most 20/s: the slower */
    n = drive(l, &k, t, 4000);
    assert_true(n >= 79 && n <= 82);
    t += 4000000000ULL;
    limits_key_shape(l, &k, 0, 0);
    assert_int_equal(limits_key_rate_pct(&k, t), 100);
    n = drive(l, &k, t, 4000);
    assert_true(n >= 390 && n <= 403);
    /* unlimited: only an absolute rate holds it */
    limits_key_shape(l, &u, 500, 0);
    assert_int_equal(drive(l, &u, t, 1000), 1000u * 1000u);
    limits_key_shape(l, &u, 0, vd.rate_interval_ns ? vd.rate_interval_ns : 50000000ULL);
    n = drive(l, &u, t + 2000000000ULL, 4000);
    assert_true(n >= 79 && n <= 82);
    limits_key_fini(l, &k);
    limits_key_fini(l, &u);
    limits_free(l);

    shaping_close(s);
    shaping_rules_unref(r);
    char cmdline[600];
    snprintf(cmdline, sizeof(cmdline), "rm -rf %s", dir);
    assert_int_equal(system(cmdline), 0);
}

/* Lines of the log file at path holding needle. */
static unsigned
log_lines_with(const char *path, const char *needle)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    char line[2048];
    unsigned n = 0;
    while (fgets(line, sizeof(line), f) != NULL)
        n += strstr(line, needle) != NULL;
    fclose(f);
    return n;
}

/* An action of a kind (or scope) this node does not know, as a newer
 * node would publish it to Redis: ignored (never read as another kind or
 * as the default scope), counted, logged once, whether it comes by the
 * stream or by the hash at a (re)connect. */
static void
test_unknown_kind_from_redis(void **state)
{
    (void)state;
    if (redis_server_path() == NULL)
        skip();
    int port = redis_server_free_port();
    char err[256] = "";
    pid_t pid = redis_server_start(port, err, sizeof(err));
    if (pid < 0)
        fail_msg("redis-server: %s", err);
    char dir[] = "/tmp/sluice-shaping-unknown-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char logpath[600];
    snprintf(logpath, sizeof(logpath), "%s/log", dir);
    assert_int_equal(log_open(logpath, LOG_INFO), 0);
    struct shaping_rules *r = load(NULL, err, sizeof(err), true);
    struct shaping *a = open_node(dir, "a", port);
    struct shaping_stats st;
    for (int i = 0; i < WAIT_MS / 10; i++) { /* connected */
        shaping_stats(a, &st);
        if (st.redis_up)
            break;
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
    assert_true(st.redis_up);
    redisContext *rc = redisConnect("127.0.0.1", port);
    assert_true(rc != NULL && rc->err == 0);
    unsigned long long until = (unsigned long long)clock_unix_ms() + 3600000ULL;
    /* a kind unknown here, twice (two ids), and a known kind in an
     * unknown scope (read as scope=source with source "" it would suspend
     * the default source everywhere) */
    const char *fmt[] = {"id=%s\tkind=throttle\tscope=group\tvalue=3\tsource=\tgroup=*\t"
                         "domain=\ttenant=\trule=r1\torigin=n2\tstarted=1\tuntil=%llu\tper=0\t"
                         "trigger=x",
                         "id=%s\tkind=throttle\tscope=group\tvalue=3\tsource=\tgroup=*\t"
                         "domain=\ttenant=\trule=r2\torigin=n2\tstarted=1\tuntil=%llu\tper=0\t"
                         "trigger=x",
                         "id=%s\tkind=suspend\tscope=campaign\tvalue=0\tsource=\tgroup=*\t"
                         "domain=\ttenant=\trule=r3\torigin=n2\tstarted=1\tuntil=%llu\tper=0\t"
                         "trigger=x"};
    const char *ids[] = {"00000000000000a1", "00000000000000a2", "00000000000000a3"};
    for (unsigned i = 0; i < 3; i++) {
        char line[512];
        snprintf(line, sizeof(line), fmt[i], ids[i], until);
        redisReply *x = redisCommand(rc, "HSET t:shaping:active %s %s", ids[i], line);
        assert_non_null(x);
        freeReplyObject(x);
        x = redisCommand(rc, "XADD t:shaping:log * op add node other a %s", line);
        assert_true(x != NULL && x->type == REDIS_REPLY_STRING);
        freeReplyObject(x);
    }
    for (int i = 0; i < WAIT_MS / 10; i++) { /* read from the stream */
        shaping_stats(a, &st);
        if (st.ignored >= 3)
            break;
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(st.ignored, 3);
    assert_int_equal(count(a), 0);
    /* a reconnect reads the hash whole again: the same three actions, not
     * counted again */
    unsigned ups = log_lines_with(logpath, "event=shaping_redis_up");
    redisReply *k = redisCommand(rc, "CLIENT KILL SKIPME yes TYPE normal");
    assert_true(k != NULL && k->type == REDIS_REPLY_INTEGER && k->integer >= 1);
    freeReplyObject(k);
    for (int i = 0; i < WAIT_MS / 10; i++) { /* the keeper is back (it logs after the catch-up) */
        if (log_lines_with(logpath, "event=shaping_redis_up") > ups)
            break;
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
    assert_true(log_lines_with(logpath, "event=shaping_redis_up") > ups);
    shaping_stats(a, &st);
    assert_int_equal(st.ignored, 3);
    struct shaping_verdict v;
    assert_false(shaping_check(a, r, "", "mta5.am0.yahoodns.net", "yahoo.com", clock_unix_ms(),
                               &v));
    assert_false(shaping_check(a, r, "192.0.2.1", "mx.example.net", "example.net",
                               clock_unix_ms(), &v));
    /* a known one beside them still applies */
    struct shaping_action ok = {.kind = SHAPING_SUSPEND, .scope = SHAPING_SCOPE_DOMAIN,
                                .until_ms = clock_unix_ms() + 60000};
    snprintf(ok.domain, sizeof(ok.domain), "example.net");
    assert_int_equal(shaping_add(a, &ok), 0);
    assert_true(shaping_check(a, r, "", "mx.example.net", "example.net", clock_unix_ms(), &v));
    assert_true(v.suspended);
    /* a restart reads the hash at connect: ignored again, logged once per
     * process (kind and scope) */
    a = shaping_close(a);
    a = open_node(dir, "a", port);
    for (int i = 0; i < WAIT_MS / 10; i++) {
        shaping_stats(a, &st);
        if (st.redis_up && st.ignored >= 3)
            break;
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(st.ignored, 3);
    assert_int_equal(count(a), 1);
    shaping_close(a);
    log_open(NULL, LOG_INFO);
    /* two processes' worth (two opens), one line for each kind/scope in each */
    assert_int_equal(log_lines_with(logpath, "event=shaping_action_ignored kind=throttle"), 2);
    assert_int_equal(log_lines_with(logpath, "event=shaping_action_ignored kind=suspend "
                                             "scope=campaign"), 2);
    redisFree(rc);
    redis_server_kill(pid);
    shaping_rules_unref(r);
    char cmdline[700];
    snprintf(cmdline, sizeof(cmdline), "rm -rf %s", dir);
    assert_int_equal(system(cmdline), 0);
}

static void
test_two_nodes_through_redis(void **state)
{
    (void)state;
    if (redis_server_path() == NULL)
        skip();
    int port = redis_server_free_port();
    char err[256] = "";
    pid_t pid = redis_server_start(port, err, sizeof(err));
    if (pid < 0)
        fail_msg("redis-server: %s", err);
    char dir[] = "/tmp/sluice-shaping-XXXXXX";
    assert_non_null(mkdtemp(dir));
    struct shaping_rules *r = load(NULL, err, sizeof(err), true);
    struct shaping *a = open_node(dir, "a", port), *b = open_node(dir, "b", port);
    struct shaping_stats st;
    bool up = false;
    for (int i = 0; i < WAIT_MS / 10 && !up; i++) { /* both connected */
        shaping_stats(a, &st);
        bool ua = st.redis_up;
        shaping_stats(b, &st);
        up = ua && st.redis_up;
        if (!up) {
            struct timespec ts = {0, 10 * 1000000};
            nanosleep(&ts, NULL);
        }
    }
    assert_true(up);
    struct shaping_reply rep = {.code = 550, .enh_cls = 5, .enh_subject = 7, .enh_detail = 1,
                                .text = "Unfortunately, messages from [192.0.2.9] weren't sent. "
                                        "(S3150)",
                                .mx = "x.mail.protection.outlook.com", .domain = "hotmail.com"};
    /* Each change reaches the others through the stream; the time each
     * took is kept, the wait itself bounded generously (WAIT_MS). */
    uint64_t took[3];
    uint64_t t0 = clock_mono_ms();
    assert_true(shaping_on_reply(a, r, &rep, "192.0.2.9", NULL) >= 0);
    count_reached(&b, 1, 1, t0, &took[0]);
    assert_true(took[0] != UINT64_MAX);
    struct shaping_verdict v;
    assert_true(shaping_check(b, r, "192.0.2.9", "y.mail.protection.outlook.com", "outlook.com",
                              clock_unix_ms(), &v));
    assert_true(v.suspended);
    /* a third starts late: the hash catches it up */
    struct shaping *c = open_node(dir, "c", port);
    assert_true(wait_count(c, 1, WAIT_MS));
    /* a clear on b reaches a and c (each watched from the clear on, the
     * two together: three samples, none counted from another's end) */
    t0 = clock_mono_ms();
    assert_int_equal(shaping_clear(b, "group=microsoft"), 1);
    struct shaping *ac[] = {a, c};
    count_reached(ac, 2, 0, t0, &took[1]);
    assert_true(took[1] != UINT64_MAX && took[2] != UINT64_MAX);
    print_message("changes on the other instances after %llu, %llu and %llu ms\n",
                  (unsigned long long)took[0], (unsigned long long)took[1],
                  (unsigned long long)took[2]);
    /* Within a second (a few tens of ms: the stream is read every
     * READ_POLL_MS): asked of the quickest of the three (b reading a's
     * add; a and c each reading b's clear, timed apart), so that a
     * keeper or a test stalled under load at one of them does not fail
     * it, while a stream read late (a blocking read, a tick of seconds)
     * or not at all (a change seen only at a reconnect) delays all
     * three. */
    uint64_t best = took[0] < took[1] ? took[0] : took[1];
    best = took[2] < best ? took[2] : best;
    if (best >= 1000)
        fail_msg("no change reached another instance within a second: %llu, %llu, %llu ms",
                 (unsigned long long)took[0], (unsigned long long)took[1],
                 (unsigned long long)took[2]);
    shaping_close(c);
    shaping_close(b);
    shaping_close(a);
    shaping_rules_unref(r);
    redis_server_kill(pid);
    char cmdline[600];
    snprintf(cmdline, sizeof(cmdline), "rm -rf %s", dir);
    assert_int_equal(system(cmdline), 0);
}

/* Redis away: a storm of changes to the same actions waits as one change
 * per action (the queue is bounded by the ids, not by the changes), and
 * nothing of what waited is lost when Redis comes: an action extended a
 * thousand times, one added and cleared, one added, cleared and added
 * again. */
static void
test_outbox_bounded_while_redis_away(void **state)
{
    (void)state;
    int port = redis_server_free_port(); /* nobody listens: Redis is away */
    assert_true(port > 0);
    char dir[] = "/tmp/sluice-shaping-outbox-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char err[256] = "";
    struct shaping *a = open_node(dir, "a", port);
    uint64_t now = clock_unix_ms();
    struct shaping_action x = {.kind = SHAPING_SUSPEND, .scope = SHAPING_SCOPE_DOMAIN};
    snprintf(x.domain, sizeof(x.domain), "storm.example");
    for (int i = 0; i < 1000; i++) {
        x.until_ms = now + 600000 + (uint64_t)i;
        assert_int_equal(shaping_add(a, &x), 0);
    }
    struct shaping_action y = x, z = x;
    snprintf(y.domain, sizeof(y.domain), "gone.example");
    snprintf(z.domain, sizeof(z.domain), "back.example");
    assert_int_equal(shaping_add(a, &y), 0);
    assert_int_equal(shaping_remove(a, &y), 1);
    assert_int_equal(shaping_add(a, &z), 0);
    assert_int_equal(shaping_remove(a, &z), 1);
    assert_int_equal(shaping_add(a, &z), 0);
    struct shaping_stats st;
    shaping_stats(a, &st);
    assert_false(st.redis_up);
    assert_int_equal(st.outbox, 3);
    assert_int_equal(st.outbox_dropped, 0);
    assert_int_equal(count(a), 2);
    if (redis_server_path() != NULL) {
        pid_t pid = redis_server_start(port, err, sizeof(err));
        if (pid < 0)
            fail_msg("redis-server: %s", err);
        struct shaping *b = open_node(dir, "b", port);
        /* a reconnects (backoff: at most 5 s) and publishes what waited */
        assert_true(wait_count(b, 2, WAIT_MS));
        shaping_stats(a, &st);
        assert_true(st.redis_up);
        assert_int_equal(st.outbox, 0);
        struct shaping_action *v;
        size_t n;
        assert_int_equal(shaping_list(b, &v, &n), 0);
        for (size_t i = 0; i < n; i++) {
            assert_true(strcmp(v[i].domain, "storm.example") == 0 ||
                        strcmp(v[i].domain, "back.example") == 0);
            if (strcmp(v[i].domain, "storm.example") == 0)
                assert_int_equal(v[i].until_ms, now + 600999);
        }
        free(v);
        shaping_close(b);
        shaping_close(a);
        redis_server_kill(pid);
    } else {
        shaping_close(a);
    }
    char cmdline[600];
    snprintf(cmdline, sizeof(cmdline), "rm -rf %s", dir);
    assert_int_equal(system(cmdline), 0);
}

/* An operator's action given again with another value (cap:3, then
 * cap:10; rate:10/s, then 50/s) takes the new value, here and on the
 * other nodes, as it takes the new end. */
static void
test_operator_changes_value(void **state)
{
    (void)state;
    char dir[] = "/tmp/sluice-shaping-value-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char err[256] = "";
    struct shaping_rules *r = load(NULL, err, sizeof(err), true);
    pid_t pid = -1;
    int port = 0;
    if (redis_server_path() != NULL) {
        port = redis_server_free_port();
        pid = redis_server_start(port, err, sizeof(err));
        if (pid < 0)
            fail_msg("redis-server: %s", err);
    }
    struct shaping *a = open_node(dir, "a", port), *b = port ? open_node(dir, "b", port) : NULL;
    const char *mx = "mta5.am0.yahoodns.net";
    struct shaping_action cap = {.kind = SHAPING_CAP, .scope = SHAPING_SCOPE_GROUP, .value = 3,
                                 .until_ms = clock_unix_ms() + 600000};
    snprintf(cap.group, sizeof(cap.group), "yahoo");
    struct shaping_action rate = {.kind = SHAPING_RATE, .scope = SHAPING_SCOPE_DOMAIN,
                                  .value = 10, .per_ms = 1000,
                                  .until_ms = clock_unix_ms() + 600000};
    snprintf(rate.domain, sizeof(rate.domain), "example.net");
    assert_int_equal(shaping_add(a, &cap), 0);
    assert_int_equal(shaping_add(a, &rate), 0);
    struct shaping_verdict v;
    assert_true(shaping_check(a, r, "", mx, "example.net", clock_unix_ms(), &v));
    assert_int_equal(v.cap, 3);
    assert_int_equal(v.rate_interval_ns, 100000000ULL);
    if (b != NULL) {
        assert_true(wait_count(b, 2, WAIT_MS));
        for (int i = 0; i < WAIT_MS / 10; i++) {
            shaping_check(b, r, "", mx, "example.net", clock_unix_ms(), &v);
            if (v.cap == 3)
                break;
            struct timespec ts = {0, 10 * 1000000};
            nanosleep(&ts, NULL);
        }
        assert_int_equal(v.cap, 3);
    }
    cap.value = 10; /* same end */
    rate.value = 50;
    assert_int_equal(shaping_add(a, &cap), 0);
    assert_int_equal(shaping_add(a, &rate), 0);
    assert_true(shaping_check(a, r, "", mx, "example.net", clock_unix_ms(), &v));
    assert_int_equal(v.cap, 10);
    assert_int_equal(v.rate_interval_ns, 20000000ULL);
    assert_int_equal(count(a), 2);
    if (b != NULL) {
        for (int i = 0; i < WAIT_MS / 10; i++) {
            shaping_check(b, r, "", mx, "example.net", clock_unix_ms(), &v);
            if (v.cap == 10 && v.rate_interval_ns == 20000000ULL)
                break;
            struct timespec ts = {0, 10 * 1000000};
            nanosleep(&ts, NULL);
        }
        assert_int_equal(v.cap, 10);
        assert_int_equal(v.rate_interval_ns, 20000000ULL);
        shaping_close(b);
    }
    shaping_close(a);
    if (pid > 0)
        redis_server_kill(pid);
    shaping_rules_unref(r);
    char cmdline[600];
    snprintf(cmdline, sizeof(cmdline), "rm -rf %s", dir);
    assert_int_equal(system(cmdline), 0);
}

/* The keeper's waits do not follow the wall clock: stepped back by an hour
 * (seen here as the keepers' wall clock an hour ahead of the kernel's),
 * a keeper still connects to Redis and applies another node's action
 * in seconds (WAIT_MS at most), not an hour later. */
static void
test_keeper_wall_clock_step(void **state)
{
    (void)state;
    if (redis_server_path() == NULL)
        skip();
    int port = redis_server_free_port();
    char err[256] = "";
    pid_t pid = redis_server_start(port, err, sizeof(err));
    if (pid < 0)
        fail_msg("redis-server: %s", err);
    char dir[] = "/tmp/sluice-shaping-step-XXXXXX";
    assert_non_null(mkdtemp(dir));
    wall_clock_ahead_ms = 3600000;
    struct shaping *a = open_node(dir, "a", port), *b = open_node(dir, "b", port);
    struct shaping_action x = {.kind = SHAPING_SUSPEND, .scope = SHAPING_SCOPE_DOMAIN,
                               .until_ms = clock_unix_ms() + 2 * 3600000ULL};
    snprintf(x.domain, sizeof(x.domain), "step.example");
    assert_int_equal(shaping_add(b, &x), 0);
    bool reached = wait_count(a, 1, WAIT_MS);
    /* "up" once its catch-up is whole: just after the action it applied */
    struct shaping_stats st;
    shaping_stats(a, &st);
    for (int i = 0; i < WAIT_MS / 10 && !st.redis_up; i++) {
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
        shaping_stats(a, &st);
    }
    shaping_close(b);
    shaping_close(a);
    wall_clock_ahead_ms = 0;
    redis_server_kill(pid);
    char cmdline[600];
    snprintf(cmdline, sizeof(cmdline), "rm -rf %s", dir);
    assert_int_equal(system(cmdline), 0);
    assert_true(st.redis_up);
    assert_true(reached);
}

/* A rule without a group, from an MX host in no group, acts at that host
 * ("mx:HOST"), however long its name (the action keeps its first octets). */
static void
test_long_mx_host(void **state)
{
    (void)state;
    char dir[] = "/tmp/sluice-shaping-mx-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char err[256] = "";
    struct shaping_rules *r = load("rule slow code=421 match=\"slow down\" action=suspend "
                                   "scope=group for=1h\n",
                                   err, sizeof(err), false);
    assert_non_null(r);
    struct shaping *s = open_node(dir, "a", 0);
    const char *hosts[] = {"mx.short.example",
                           "inbound-smtp-relay-01.eu-west-1.mail-filtering.example-provider.net"};
    for (unsigned i = 0; i < 2; i++) {
        struct shaping_reply rep = {.code = 421, .text = "4.7.0 slow down", .mx = hosts[i],
                                    .domain = "example.org"};
        assert_int_equal(shaping_on_reply(s, r, &rep, "", NULL), 0);
        struct shaping_verdict v;
        if (!shaping_check(s, r, "", hosts[i], "example.org", clock_unix_ms(), &v) ||
            !v.suspended)
            fail_msg("%s: not suspended by its own action", hosts[i]);
        assert_false(shaping_check(s, r, "", "mx.other.example", "example.org",
                                   clock_unix_ms(), &v));
    }
    shaping_close(s);
    shaping_rules_unref(r);
    char cmdline[600];
    snprintf(cmdline, sizeof(cmdline), "rm -rf %s", dir);
    assert_int_equal(system(cmdline), 0);
}

/* An action that ended leaves the hash of active actions in Redis: the
 * hash holds what is active, not every action ever started (it is read
 * whole at each connect). One extended meanwhile by another node stays. */
static void
test_ended_actions_leave_the_hash(void **state)
{
    (void)state;
    if (redis_server_path() == NULL)
        skip();
    int port = redis_server_free_port();
    char err[256] = "";
    pid_t pid = redis_server_start(port, err, sizeof(err));
    if (pid < 0)
        fail_msg("redis-server: %s", err);
    char dir[] = "/tmp/sluice-shaping-ended-XXXXXX";
    assert_non_null(mkdtemp(dir));
    struct shaping *a = open_node(dir, "a", port);
    struct shaping_stats st;
    for (int i = 0; i < WAIT_MS / 10; i++) {
        shaping_stats(a, &st);
        if (st.redis_up)
            break;
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
    assert_true(st.redis_up);
    redisContext *rc = redisConnect("127.0.0.1", port);
    assert_true(rc != NULL && rc->err == 0);
    struct shaping_action x = {.kind = SHAPING_SUSPEND, .scope = SHAPING_SCOPE_DOMAIN,
                               .until_ms = clock_unix_ms() + 1000};
    snprintf(x.domain, sizeof(x.domain), "short.example");
    assert_int_equal(shaping_add(a, &x), 0);
    struct shaping_action y = x;
    snprintf(y.domain, sizeof(y.domain), "kept.example");
    assert_int_equal(shaping_add(a, &y), 0);
    struct shaping_action *v;
    size_t n;
    assert_int_equal(shaping_list(a, &v, &n), 0);
    assert_int_equal(n, 2);
    char ids[2][17];
    memcpy(ids[0], strcmp(v[0].domain, "short.example") == 0 ? v[0].id : v[1].id, 17);
    memcpy(ids[1], strcmp(v[0].domain, "short.example") == 0 ? v[1].id : v[0].id, 17);
    free(v);
    long long hlen = 0;
    for (int i = 0; i < WAIT_MS / 10 && hlen != 2; i++) { /* both published */
        redisReply *h = redisCommand(rc, "HLEN t:shaping:active");
        assert_non_null(h);
        hlen = h->integer;
        freeReplyObject(h);
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(hlen, 2);
    /* another node extended kept.example in the hash (its HSET, before
     * this node reads its stream entry), while here it ends */
    char line[1024];
    y.until_ms = clock_unix_ms() + 3600000;
    memcpy(y.id, ids[1], 17);
    snprintf(y.rule, sizeof(y.rule), "operator");
    snprintf(y.origin, sizeof(y.origin), "b");
    assert_true(shaping_action_format(&y, line, sizeof(line)) > 0);
    redisReply *h = redisCommand(rc, "HSET t:shaping:active %s %s", ids[1], line);
    assert_non_null(h);
    freeReplyObject(h);
    assert_true(wait_count(a, 0, WAIT_MS)); /* both ended here */
    long long short_left = 1;
    for (int i = 0; i < WAIT_MS / 10 && short_left != 0; i++) {
        h = redisCommand(rc, "HEXISTS t:shaping:active %s", ids[0]);
        assert_non_null(h);
        short_left = h->integer;
        freeReplyObject(h);
        struct timespec ts = {0, 10 * 1000000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(short_left, 0);
    h = redisCommand(rc, "HEXISTS t:shaping:active %s", ids[1]);
    assert_non_null(h);
    assert_int_equal(h->integer, 1); /* extended elsewhere: kept */
    freeReplyObject(h);
    shaping_close(a);
    redisFree(rc);
    redis_server_kill(pid);
    char cmdline[600];
    snprintf(cmdline, sizeof(cmdline), "rm -rf %s", dir);
    assert_int_equal(system(cmdline), 0);
}

int
main(void)
{
    wall_clock_keep_real();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_builtin_replies),
        cmocka_unit_test(test_operator_first_and_errors),
        cmocka_unit_test(test_prefilter),
        cmocka_unit_test(test_many_rules),
        cmocka_unit_test(test_action_text),
        cmocka_unit_test(test_state_file_and_check),
        cmocka_unit_test(test_rate_action),
        cmocka_unit_test(test_unknown_kind_from_redis),
        cmocka_unit_test(test_two_nodes_through_redis),
        cmocka_unit_test(test_outbox_bounded_while_redis_away),
        cmocka_unit_test(test_operator_changes_value),
        cmocka_unit_test(test_keeper_wall_clock_step),
        cmocka_unit_test(test_long_mx_host),
        cmocka_unit_test(test_ended_actions_leave_the_hash),
        cmocka_unit_test(test_rules_same_and_shared),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
